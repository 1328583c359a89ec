//! The data directory's reserve: a file of a few MiB (`reserve`) kept allocated on the data
//! directory's disk, so that when the disk fills up, the writes that free space (deleting a
//! manifest or a repository, garbage collection) still find room for their database
//! transaction. Releasing it is the registry's call; taking it again happens once the disk has
//! room to spare. Also: how much room the disk has (`statvfs`), and whether it ran out of
//! inodes rather than bytes.

use crate::{Result, Storage, io_err};
use std::io::Write;
use std::path::Path;

/// The reserve's largest size.
pub const RESERVE_MAX: u64 = 16 << 20;

/// Room on the file system holding `path`, as an unprivileged writer sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DiskRoom {
    /// Bytes free for this process.
    pub free: u64,
    /// The file system's size in bytes.
    pub size: u64,
    /// Inodes free for this process (`None`: the file system does not count them).
    pub inodes_free: Option<u64>,
}

/// [`DiskRoom`] of the file system holding `path`.
pub fn disk_room(path: &Path) -> std::io::Result<DiskRoom> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(path.as_os_str().as_bytes())
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
    // SAFETY: `c` is a valid NUL-terminated path and `st` a writable statvfs that lives
    // across the call; statvfs writes only into it.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statvfs(c.as_ptr(), &mut st) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    let unit = st.f_frsize as u64;
    Ok(DiskRoom {
        free: (st.f_bavail as u64).saturating_mul(unit),
        size: (st.f_blocks as u64).saturating_mul(unit),
        // tmpfs without nr_inodes and some others report 0 of 0.
        inodes_free: (st.f_files > 0).then_some(st.f_favail as u64),
    })
}

/// The reserve's size on a file system of `size` bytes: [`RESERVE_MAX`], or 1/32 of a small
/// disk.
fn reserve_size(size: u64) -> u64 {
    RESERVE_MAX.min(size / 32)
}

impl Storage {
    fn reserve_path(&self) -> std::path::PathBuf {
        self.layout().root().join("reserve")
    }

    /// Takes the reserve if it is not in place and the disk has room to spare (four times its
    /// size free). Returns whether it is in place afterwards.
    pub async fn keep_reserve(&self) -> Result<bool> {
        let path = self.reserve_path();
        if path.exists() {
            return Ok(true);
        }
        let root = self.layout().root().to_path_buf();
        tokio::task::spawn_blocking(move || {
            let room = disk_room(&root).map_err(io_err(&root))?;
            let size = reserve_size(room.size);
            if size == 0 || room.free < size.saturating_mul(4) {
                return Ok(false);
            }
            // Written out, not just sized: a sparse file holds no blocks to give back.
            let tmp = path.with_extension("tmp");
            let written = (|| {
                let mut f = std::fs::File::create(&tmp)?;
                let zeros = vec![0u8; 1 << 20];
                let mut left = size;
                while left > 0 {
                    let n = left.min(zeros.len() as u64) as usize;
                    f.write_all(&zeros[..n])?;
                    left -= n as u64;
                }
                f.sync_all()?;
                std::fs::rename(&tmp, &path)
            })();
            if let Err(e) = written {
                let _ = std::fs::remove_file(&tmp);
                return Err(io_err(&path)(e));
            }
            tracing::info!(bytes = size, path = %path.display(), "took the data directory's reserve");
            Ok(true)
        })
        .await
        .map_err(|e| io_err(self.reserve_path())(std::io::Error::other(e)))?
    }

    /// Gives the reserve's space back to the disk. Returns whether there was one.
    pub async fn release_reserve(&self) -> Result<bool> {
        let path = self.reserve_path();
        match tokio::fs::remove_file(&path).await {
            Ok(()) => Ok(true),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
            Err(e) => Err(io_err(path)(e)),
        }
    }

    /// Room on the data directory's disk.
    pub fn disk_room(&self) -> Result<DiskRoom> {
        let root = self.layout().root();
        disk_room(root).map_err(io_err(root))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_reserve_is_a_sixteen_mib_or_a_thirty_second_of_a_small_disk() {
        assert_eq!(reserve_size(1 << 40), RESERVE_MAX);
        assert_eq!(reserve_size(32 << 20), 1 << 20);
        assert_eq!(reserve_size(0), 0);
    }

    #[tokio::test]
    async fn the_reserve_is_taken_with_real_blocks_and_released() {
        let dir = tempfile::tempdir().unwrap();
        let s = Storage::open(dir.path(), false).await.unwrap();
        let path = dir.path().join("reserve");
        assert!(!path.exists());
        assert!(s.keep_reserve().await.unwrap());
        let meta = std::fs::metadata(&path).unwrap();
        use std::os::unix::fs::MetadataExt;
        assert!(meta.len() > 0);
        assert!(meta.blocks() * 512 >= meta.len(), "allocated, not sparse");
        assert!(s.keep_reserve().await.unwrap(), "kept as it is");
        assert!(s.release_reserve().await.unwrap());
        assert!(!path.exists());
        assert!(
            !s.release_reserve().await.unwrap(),
            "nothing left to release"
        );
    }
}
