//! Read-only memory maps of blobs, shared by all concurrent readers of the same digest, so a
//! blob is served to the socket straight from the page cache with no copy through a user-space
//! buffer, and a hundred clients pulling one layer hold one mapping, not a hundred.
//!
//! How a blob's pages enter the page cache decides how fast it is served later. Pages faulted in
//! through a mapping arrive as small folios, and every later pull must fill page tables for them
//! 16 pages at a time; pages read through the file's read path arrive as large folios, which a
//! mapping advised `MADV_HUGEPAGE` can map 2 MiB per entry. So large mappings are advised
//! `MADV_HUGEPAGE`, and when a large blob is not fully in memory a prefetch reads it ahead of the
//! socket with `sendfile` into `/dev/null` (the read path, no copy to user space). Measured on
//! a warm 1 GiB pull after a cold one: ~2.9 GB/s without this, ~4.7 GB/s with it
//! (docs/benchmarks.md).
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
        let from = range.map_or(0, |(start, _)| start);
        let Some(map) = self.get_or_map(digest, path, from).await? else {
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
        if end > start && len < PREFETCH_MIN {
            let _ = map
                .0
                .advise_range(memmap2::Advice::WillNeed, start, end - start);
        }
        Ok(Bytes::from_owner(Shared(map)).slice(start..end))
    }

    /// The shared mapping of the blob, made if none is alive; a new large mapping whose pages
    /// from `from` on are not all in memory starts a prefetch there.
    async fn get_or_map(
        &self,
        digest: &Digest,
        path: &Path,
        from: usize,
    ) -> Result<Option<Arc<Map>>> {
        if let Some(m) = self.lock().get(digest).and_then(Weak::upgrade) {
            return Ok(Some(m));
        }
        let p = path.to_path_buf();
        let mapped = tokio::task::spawn_blocking(move || -> Result<Option<(Map, Prefetch)>> {
            let file = std::fs::File::open(&p).map_err(io_err(&p))?;
            let len = file.metadata().map_err(io_err(&p))?.len();
            if len == 0 {
                return Ok(None);
            }
            // SAFETY: blob files are never modified after publication (see module docs).
            let map = unsafe { memmap2::Mmap::map(&file) }.map_err(io_err(&p))?;
            let _ = map.advise(memmap2::Advice::Sequential);
            let prefetch = if map.len() >= PREFETCH_MIN {
                #[cfg(target_os = "linux")]
                let _ = map.advise(memmap2::Advice::HugePage);
                first_missing_page(&map, from).map(|at| (file, at))
            } else {
                None
            };
            Ok(Some((Map(map), prefetch)))
        })
        .await
        .map_err(|e| StorageError::Io {
            path: path.to_path_buf(),
            cause: io::Error::other(e),
        })??;
        let Some((map, prefetch)) = mapped else {
            return Ok(None);
        };
        let shared = {
            let mut live = self.lock();
            // Readers that arrived together each made a mapping; all but the first drop theirs
            // before touching a page, so many clients of one blob share one set of mapped pages.
            if let Some(m) = live.get(digest).and_then(Weak::upgrade) {
                return Ok(Some(m));
            }
            let shared = Arc::new(map);
            live.retain(|_, w| w.strong_count() > 0);
            live.insert(digest.clone(), Arc::downgrade(&shared));
            shared
        };
        if let Some((file, from)) = prefetch {
            let alive = Arc::downgrade(&shared);
            tokio::task::spawn_blocking(move || read_ahead(&file, from, &alive));
        }
        Ok(Some(shared))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<Digest, Weak<Map>>> {
        self.live.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Blobs at least this large get `MADV_HUGEPAGE` and, when cold, a read-path prefetch. Smaller
/// ones are read ahead with `MADV_WILLNEED` on the requested range.
const PREFETCH_MIN: usize = 8 << 20;
/// How much one prefetch step reads before checking that someone still holds the mapping.
const PREFETCH_STEP: usize = 8 << 20;

/// The blob file and the offset of its first page not in memory, when a prefetch is needed.
type Prefetch = Option<(std::fs::File, u64)>;

/// The offset of the first page of `map` at or after byte `from` that is not in the page cache,
/// if any.
#[cfg(target_os = "linux")]
fn first_missing_page(map: &memmap2::Mmap, from: usize) -> Option<u64> {
    // SAFETY: sysconf has no preconditions.
    let page = usize::try_from(unsafe { libc::sysconf(libc::_SC_PAGESIZE) }).ok()?;
    let mut resident = vec![0u8; map.len().div_ceil(page)];
    // SAFETY: `map` is a live mapping of `map.len()` bytes starting at a page boundary, and
    // `resident` has one byte per page of it, as mincore requires.
    let rc = unsafe {
        libc::mincore(
            map.as_ptr() as *mut libc::c_void,
            map.len(),
            resident.as_mut_ptr(),
        )
    };
    if rc != 0 {
        return Some(0); // cannot tell: prefetching cached pages only costs a little CPU
    }
    let skip = from / page;
    let first = resident.iter().skip(skip).position(|r| r & 1 == 0)?;
    Some(((skip + first) * page) as u64)
}

#[cfg(not(target_os = "linux"))]
fn first_missing_page(_: &memmap2::Mmap, _: usize) -> Option<u64> {
    None
}

/// Reads `file` from `from` to its end through the kernel's read path (`sendfile` into
/// `/dev/null`: readahead fills the page cache with large folios, and nothing is copied to user
/// space), a step at a time, stopping early once no reader holds the mapping any more. Errors
/// only end the prefetch: readers fault the pages in themselves.
#[cfg(target_os = "linux")]
fn read_ahead(file: &std::fs::File, from: u64, alive: &Weak<Map>) {
    use std::os::fd::AsRawFd;
    let Ok(null) = std::fs::OpenOptions::new().write(true).open("/dev/null") else {
        return;
    };
    let mut offset = libc::off_t::try_from(from).unwrap_or(libc::off_t::MAX);
    while alive.strong_count() > 0 {
        // SAFETY: both descriptors are open for the whole call; `offset` is a valid pointer.
        let n = unsafe {
            libc::sendfile(
                null.as_raw_fd(),
                file.as_raw_fd(),
                &mut offset,
                PREFETCH_STEP,
            )
        };
        if n <= 0 {
            return; // end of file, or an error readers will meet and report themselves
        }
    }
}

#[cfg(not(target_os = "linux"))]
fn read_ahead(_: &std::fs::File, _: u64, _: &Weak<Map>) {}

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

    /// A large blob that is not in memory is read into the page cache ahead of its reader,
    /// from the requested offset on, while the reader holds the mapping.
    #[cfg(target_os = "linux")]
    #[tokio::test]
    async fn cold_large_blob_is_read_ahead_from_the_requested_offset() {
        use std::os::fd::AsRawFd;
        // Next to the test binary, in the target directory: a disk, where /tmp may be a tmpfs
        // whose pages cannot be evicted.
        let exe = std::env::current_exe().unwrap();
        let dir = tempfile::tempdir_in(exe.parent().unwrap()).unwrap();
        let path = dir.path().join("blob");
        let data: Vec<u8> = (0..PREFETCH_MIN * 2).map(|i| (i % 251) as u8).collect();
        std::fs::write(&path, &data).unwrap();
        let file = std::fs::File::open(&path).unwrap();
        file.sync_all().unwrap();
        let evict = || {
            // SAFETY: plain syscall on an open descriptor; clean pages are simply dropped.
            let rc =
                unsafe { libc::posix_fadvise(file.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
            assert_eq!(rc, 0);
        };
        let resident = |map: &memmap2::Mmap| first_missing_page(map, 0);
        // SAFETY: the test owns the file and does not modify it while mapped.
        let probe = unsafe { memmap2::Mmap::map(&file) }.unwrap();
        evict();
        if resident(&probe) != Some(0) {
            panic!("posix_fadvise(DONTNEED) left the file cached; cannot test a cold read");
        }
        let m = Mapped::default();
        let half = PREFETCH_MIN;
        let d = Digest::sha256_of(b"cold");
        let tail = m.slice(&d, &path, Some((half, data.len()))).await.unwrap();
        // Nobody touches the bytes: only the prefetch can bring the tail into memory.
        let mut waited = 0;
        while first_missing_page(&probe, half).is_some() {
            assert!(waited < 500, "the tail was not read ahead within 10 s");
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            waited += 1;
        }
        assert_eq!(
            resident(&probe),
            Some(0),
            "the part before the requested offset was not read"
        );
        assert_eq!(&tail[..], &data[half..]);
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
