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
    /// Bytes `start..end` of the blob at `path`, from a shared mapping of the whole file (made
    /// if none is alive). The kernel is asked to start reading the range ahead of the socket,
    /// so a cold blob streams at disk speed instead of one page fault at a time.
    pub(crate) async fn slice(
        &self,
        digest: &Digest,
        path: &Path,
        range: Option<(usize, usize)>,
    ) -> Result<Bytes> {
        let Some(map) = self.get_or_map(digest, path).await? else {
            return match range {
                None | Some((0, 0)) => Ok(Bytes::new()),
                Some(_) => Err(io_err(path)(io::Error::other("range beyond the blob"))),
            };
        };
        let len = map.0.len();
        let (start, end) = range.unwrap_or((0, len));
        if start > end || end > len {
            return Err(io_err(path)(io::Error::other("range beyond the blob")));
        }
        if end > start {
            let _ = map
                .0
                .advise_range(memmap2::Advice::WillNeed, start, end - start);
        }
        Ok(Bytes::from_owner(Shared(map)).slice(start..end))
    }

    async fn get_or_map(&self, digest: &Digest, path: &Path) -> Result<Option<Arc<Map>>> {
        if let Some(m) = self.lock().get(digest).and_then(Weak::upgrade) {
            return Ok(Some(m));
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
            return Ok(None);
        };
        let mut live = self.lock();
        // Readers that arrived together each made a mapping; all but the first drop theirs
        // before touching a page, so many clients of one blob share one set of mapped pages.
        if let Some(m) = live.get(digest).and_then(Weak::upgrade) {
            return Ok(Some(m));
        }
        let shared = Arc::new(map);
        live.retain(|_, w| w.strong_count() > 0);
        live.insert(digest.clone(), Arc::downgrade(&shared));
        Ok(Some(shared))
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
        let a = m.slice(&d, &path, None).await.unwrap();
        let b = m.slice(&d, &path, Some((6, 12))).await.unwrap();
        assert_eq!(&a[..], b"hello mapped world");
        assert_eq!(&b[..], b"mapped");
        assert_eq!(a[6..].as_ptr(), b.as_ptr(), "one mapping for both readers");
        assert!(m.slice(&d, &path, Some((6, 40))).await.is_err());
        // Unlinking the file (as GC does) leaves live readers intact.
        std::fs::remove_file(&path).unwrap();
        assert_eq!(&b[..], b"mapped");
        drop((a, b));
        assert!(
            m.slice(&d, &path, None).await.is_err(),
            "gone once nobody holds it"
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn readers_arriving_together_share_one_mapping() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("blob");
        std::fs::write(&path, vec![7u8; 1 << 20]).unwrap();
        let d = Digest::sha256_of(b"any key");
        let m = Arc::new(Mapped::default());
        let readers: Vec<_> = (0..64)
            .map(|_| {
                let (m, d, path) = (m.clone(), d.clone(), path.clone());
                tokio::spawn(async move { m.slice(&d, &path, None).await.unwrap() })
            })
            .collect();
        let mut slices = Vec::new();
        for r in readers {
            slices.push(r.await.unwrap());
        }
        let first = slices[0].as_ptr();
        assert!(
            slices.iter().all(|s| s.as_ptr() == first),
            "every concurrent reader got the same mapping"
        );
    }
}
