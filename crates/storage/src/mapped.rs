//! Read-only memory maps of blobs, shared by all concurrent readers of the same digest, so a
//! blob is served to the socket straight from the page cache with no copy through a user-space
//! buffer, and a hundred clients pulling one layer hold one mapping, not a hundred.
//!
//! Safety: mapping a file is only sound while nobody modifies it. Blob files are immutable by
//! construction — they are created by renaming a verified upload and never opened for writing
//! again; garbage collection only unlinks them, which leaves existing mappings valid. (An
//! operator truncating files under `blobs/` by hand would break that, as it would corrupt any
//! registry.)

use crate::{Result, StorageError, io_err};
use bytes::Bytes;
use outpost_oci::Digest;
use std::collections::HashMap;
use std::io;
use std::path::Path;
use std::sync::{Arc, Mutex, Weak};

/// One mapping of one blob file.
struct Map(memmap2::Mmap);

/// The owner handed to `Bytes`: every slice given to a reader keeps the mapping alive.
struct Shared(Arc<Map>);

impl AsRef<[u8]> for Shared {
    fn as_ref(&self) -> &[u8] {
        &self.0.0
    }
}

#[derive(Default)]
pub(crate) struct Mapped {
    live: Mutex<HashMap<Digest, Weak<Map>>>,
}

impl Mapped {
    /// The whole blob at `path`, mapped (or the existing mapping, if one is alive).
    pub(crate) async fn get_or_map(&self, digest: &Digest, path: &Path) -> Result<Bytes> {
        if let Some(m) = self.lock().get(digest).and_then(Weak::upgrade) {
            return Ok(Bytes::from_owner(Shared(m)));
        }
        let p = path.to_path_buf();
        let map = tokio::task::spawn_blocking(move || -> Result<Option<Map>> {
            let file = std::fs::File::open(&p).map_err(io_err(&p))?;
            let len = file.metadata().map_err(io_err(&p))?.len();
            if len == 0 {
                return Ok(None);
            }
            // SAFETY: blob files are never modified after publication (see module docs).
            let map = unsafe { memmap2::Mmap::map(&file) }.map_err(io_err(&p))?;
            let _ = map.advise(memmap2::Advice::Sequential);
            Ok(Some(Map(map)))
        })
        .await
        .map_err(|e| StorageError::Io {
            path: path.to_path_buf(),
            source: io::Error::other(e),
        })??;
        let Some(map) = map else {
            return Ok(Bytes::new());
        };
        let shared = Arc::new(map);
        let mut live = self.lock();
        live.retain(|_, w| w.strong_count() > 0);
        live.insert(digest.clone(), Arc::downgrade(&shared));
        Ok(Bytes::from_owner(Shared(shared)))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<Digest, Weak<Map>>> {
        self.live.lock().unwrap_or_else(|p| p.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn readers_share_one_mapping() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("blob");
        std::fs::write(&path, b"hello mapped world").unwrap();
        let d = Digest::sha256_of(b"hello mapped world");
        let m = Mapped::default();
        let a = m.get_or_map(&d, &path).await.unwrap();
        let b = m.get_or_map(&d, &path).await.unwrap();
        assert_eq!(&a[..], b"hello mapped world");
        assert_eq!(a.as_ptr(), b.as_ptr(), "one mapping for both readers");
        // Unlinking the file (as GC does) leaves live readers intact.
        std::fs::remove_file(&path).unwrap();
        assert_eq!(&b.slice(6..12)[..], b"mapped");
        drop((a, b));
        assert!(
            m.get_or_map(&d, &path).await.is_err(),
            "gone once nobody holds it"
        );
    }
}
