//! Everything that can go wrong in a registry operation, in terms a client can act on. The
//! mapping to OCI error codes and HTTP statuses lives in `outpost-server::error`.

use outpost_meta::MetaError;
use outpost_oci::{Digest, ManifestError, RepoName};
use outpost_storage::StorageError;

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RegistryError {
    #[error("repository {0} is not known to this registry")]
    NameUnknown(RepoName),
    #[error("manifest {0} is not in the repository")]
    ManifestUnknown(String),
    #[error("blob {0} is not in the repository")]
    BlobUnknown(Digest),
    #[error("upload {0} does not exist in this repository; start a new upload with POST")]
    UploadUnknown(String),
    #[error("content hashes to {actual}, not to its digest {expected}")]
    DigestMismatch { expected: Digest, actual: Digest },
    #[error("manifest is invalid: {0}")]
    ManifestInvalid(#[from] ManifestError),
    #[error("manifest is {size} bytes, larger than this registry's {limit} byte limit")]
    ManifestTooLarge { size: usize, limit: usize },
    #[error("manifest references blob {0}, which is not in the repository; push the blob first")]
    ManifestBlobUnknown(Digest),
    #[error("index references manifest {0}, which is not in the repository; push it first")]
    ManifestChildUnknown(Digest),
    #[error("manifest {digest} is listed by index {index}{}; delete the index first, or push it again without this manifest", tagged(.tags))]
    ManifestReferenced {
        digest: Digest,
        index: String,
        tags: Vec<String>,
    },
    /// A conditional push whose condition did not hold: nothing was stored.
    #[error("{0}")]
    TagCondition(String),
    #[error(transparent)]
    Storage(StorageError),
    #[error(transparent)]
    Meta(MetaError),
}

fn tagged(tags: &[String]) -> String {
    match tags {
        [] => String::new(),
        [t] => format!(" (tag {t})"),
        _ => format!(" (tags {})", tags.join(", ")),
    }
}

impl From<MetaError> for RegistryError {
    fn from(e: MetaError) -> Self {
        match e {
            MetaError::ManifestListed {
                digest,
                index,
                tags,
            } => RegistryError::ManifestReferenced {
                digest,
                index,
                tags,
            },
            e @ MetaError::TagCondition { .. } => RegistryError::TagCondition(e.to_string()),
            other => RegistryError::Meta(other),
        }
    }
}

impl RegistryError {
    /// Whether the store could not be written because its disk (or quota) is full.
    pub fn is_disk_full(&self) -> bool {
        match self {
            RegistryError::Storage(StorageError::Io { cause: source, .. }) => {
                outpost_meta::is_disk_full(source)
            }
            RegistryError::Meta(e) => e.is_disk_full(),
            _ => false,
        }
    }

    /// Whether a file could not be opened because the process (or the system) is out of file
    /// descriptors: a passing condition, worth retrying shortly.
    pub fn is_out_of_files(&self) -> bool {
        matches!(
            self,
            RegistryError::Storage(StorageError::Io { cause, .. })
                // EMFILE, ENFILE
                if matches!(cause.raw_os_error(), Some(24 | 23))
        )
    }
}

impl From<StorageError> for RegistryError {
    fn from(e: StorageError) -> Self {
        match e {
            StorageError::UploadUnknown(id) => RegistryError::UploadUnknown(id),
            StorageError::BlobUnknown(d) => RegistryError::BlobUnknown(d),
            StorageError::DigestMismatch { expected, actual } => {
                RegistryError::DigestMismatch { expected, actual }
            }
            other => RegistryError::Storage(other),
        }
    }
}
