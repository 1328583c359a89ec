//! `outpost-oci` holds the pure vocabulary of the OCI Distribution and Image specs: digests and
//! streaming digesters, repository names, tags and references, the `/v2/` route parser, HTTP
//! `Range`/`Content-Range` parsing, manifest parsing and reference extraction, and the spec's
//! error codes. It performs no I/O and knows nothing about storage, HTTP servers or async, so
//! everything here can be unit-tested, property-tested and fuzzed in isolation.

pub mod digest;
pub mod error;
pub mod manifest;
pub mod name;
pub mod range;
pub mod route;

pub use digest::{Algorithm, Digest, DigestError, Digester};
pub use error::ErrorCode;
pub use manifest::{Descriptor, Manifest, ManifestError, ManifestKind};
pub use name::{NameError, Reference, RepoName, Tag};
pub use range::{ByteRange, RangeError};
pub use route::{Route, RouteError};
