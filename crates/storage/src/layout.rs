//! The one place that maps digests and upload ids to paths under the data directory:
//!
//! ```text
//! <root>/
//!   blobs/<algorithm>/<first 2 hex>/<hex>   verified blob bytes, immutable
//!   uploads/<uuid>                          bytes received by an upload session so far
//!   uploads/<uuid>.owner                    who started the session (the repository name)
//!   reserve                                 a few MiB held for deletes when the disk fills up
//! ```
//!
//! Digests and upload ids are validated before they get here (`Digest` only holds lowercase
//! hex; upload ids come from `Route::parse`, which allows only alphanumerics and `-`).

use outpost_oci::Digest;
use std::path::{Path, PathBuf};

#[derive(Debug, Clone)]
pub struct Layout {
    root: PathBuf,
}

impl Layout {
    pub fn new(root: PathBuf) -> Layout {
        Layout { root }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn blobs_dir(&self) -> PathBuf {
        self.root.join("blobs")
    }

    pub fn uploads_dir(&self) -> PathBuf {
        self.root.join("uploads")
    }

    pub fn blob(&self, digest: &Digest) -> PathBuf {
        let hex = digest.hex();
        self.blobs_dir()
            .join(digest.algorithm().as_str())
            .join(&hex[..2])
            .join(hex)
    }

    pub fn upload(&self, id: &str) -> PathBuf {
        debug_assert!(id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-'));
        self.uploads_dir().join(id)
    }

    pub fn upload_owner(&self, id: &str) -> PathBuf {
        debug_assert!(id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-'));
        self.uploads_dir().join(format!("{id}.owner"))
    }
}
