//! Upload sessions: appending bodies to `uploads/<id>` while hashing them, rolling a failed chunk
//! back, and committing a verified upload into the blob store with temp → fsync → rename (or, with
//! an object store, one write of the verified file to its key).
//!
//! Bytes are written and hashed on a blocking thread fed through a bounded channel, so reading
//! the request body from the network, hashing and writing overlap instead of alternating.

use crate::{Layout, Result, StorageError, io_err};
use bytes::Bytes;
use futures_util::{Stream, StreamExt};
use outpost_oci::{Algorithm, Digest, Digester};
use std::io::{self, Read, Write};
use std::path::Path;

/// One upload's progress, guarded by a per-upload lock.
pub(crate) struct State {
    size: u64,
    /// SHA-256 state over bytes `0..size`, when this process has seen all of them.
    hasher: Option<Digester>,
    /// Committed or cancelled: a request that waited for the lock meanwhile finds no upload.
    pub(crate) closed: bool,
}

impl State {
    /// Bytes accepted so far: the upload's size after its last complete chunk.
    pub(crate) fn size(&self) -> u64 {
        self.size
    }

    /// State for an upload found on disk with `size` bytes.
    pub(crate) fn resumed(size: u64) -> State {
        State {
            size,
            hasher: (size == 0).then(|| Digester::new(Algorithm::Sha256)),
            closed: false,
        }
    }
}

/// A chunk accepted into an upload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AppendOutcome {
    /// Total bytes the upload now holds.
    pub size: u64,
    /// Bytes this request added.
    pub written: u64,
}

const CHANNEL_DEPTH: usize = 64;
/// Bytes of one upload that may wait between the network and the disk. Enough to ride out a
/// slow write; small, so a dozen concurrent uploads of fast clients do not grow the heap by
/// hundreds of MiB (which the allocator then keeps).
const BYTES_IN_FLIGHT: usize = 4 << 20;
/// After a refused chunk (disk full, too large), how much more of the body is read and dropped
/// so the client sees the error.
const DRAIN_LIMIT: u64 = 64 << 20;

pub(crate) async fn append<S, E>(
    layout: &Layout,
    id: &str,
    state: &mut State,
    start: Option<u64>,
    limit: Option<u64>,
    mut body: S,
) -> Result<AppendOutcome>
where
    S: Stream<Item = Result<Bytes, E>> + Send + Unpin,
    E: std::fmt::Display,
{
    if let Some(got) = start
        && got != state.size
    {
        // Read the chunk anyway, so the client gets the 416 and the Range it needs.
        drain(&mut body).await;
        return Err(StorageError::OutOfOrder {
            offset: state.size,
            got,
        });
    }
    let path = layout.upload(id);
    if state.closed {
        drain(&mut body).await;
        return Err(StorageError::UploadUnknown(id.to_string()));
    }
    // An append whose caller went away mid-write (a cancelled future) may have left bytes past
    // the last completed chunk; drop them so the file matches the hash state again.
    let on_disk = match tokio::fs::metadata(&path).await {
        Ok(m) => m.len(),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            drain(&mut body).await;
            return Err(StorageError::UploadUnknown(id.to_string()));
        }
        Err(e) => return Err(io_err(&path)(e)),
    };
    if on_disk != state.size {
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(&path)
            .map_err(io_err(&path))?;
        f.set_len(state.size).map_err(io_err(&path))?;
    }
    let before = state.size;
    let snapshot = state.hasher.clone();
    let mut hasher = state.hasher.take();

    let (tx, mut rx) = tokio::sync::mpsc::channel::<Bytes>(CHANNEL_DEPTH);
    let room = std::sync::Arc::new(tokio::sync::Semaphore::new(BYTES_IN_FLIGHT));
    let freed = room.clone();
    let wpath = path.clone();
    let writer = tokio::task::spawn_blocking(move || -> io::Result<Option<Digester>> {
        // However the writer ends, a sender waiting for room must not wait forever.
        struct CloseOnExit(std::sync::Arc<tokio::sync::Semaphore>);
        impl Drop for CloseOnExit {
            fn drop(&mut self) {
                self.0.close();
            }
        }
        let freed = CloseOnExit(freed);
        let mut f = std::fs::OpenOptions::new().append(true).open(&wpath)?;
        let mut writeback = Writeback::new(before);
        while let Some(chunk) = rx.blocking_recv() {
            f.write_all(&chunk)?;
            if let Some(h) = hasher.as_mut() {
                h.update(&chunk);
            }
            writeback.wrote(&f, chunk.len() as u64);
            freed.0.add_permits(chunk.len().min(BYTES_IN_FLIGHT));
        }
        Ok(hasher)
    });

    let mut received: u64 = 0;
    let mut failure: Option<StorageError> = None;
    let mut refused = false;
    while let Some(item) = body.next().await {
        match item {
            Ok(chunk) => {
                received += chunk.len() as u64;
                if let Some(limit) = limit
                    && before + received > limit
                {
                    failure = Some(StorageError::TooLarge {
                        size: before + received,
                        limit,
                    });
                    refused = true;
                    break;
                }
                let n = chunk.len().min(BYTES_IN_FLIGHT) as u32;
                match room.acquire_many(n).await {
                    Ok(p) => p.forget(), // given back by the writer once the bytes are written
                    Err(_) => {
                        refused = true; // the writer failed; its error is reported below
                        break;
                    }
                }
                if tx.send(chunk).await.is_err() {
                    refused = true;
                    break;
                }
            }
            Err(e) => {
                failure = Some(StorageError::Interrupted {
                    received,
                    reason: e.to_string(),
                });
                break;
            }
        }
    }
    drop(tx);
    if refused {
        drain(&mut body).await;
    }
    let written = writer
        .await
        .map_err(|e| StorageError::Io {
            path: path.clone(),
            cause: io::Error::other(e),
        })
        .and_then(|r| r.map_err(io_err(&path)));
    let error = match (written, failure) {
        // Cancelled while this chunk was written (the cancel does not wait for it): the
        // bytes went to a removed file, and the client must not hear they were accepted.
        (Ok(_), None) if !tokio::fs::try_exists(&path).await.unwrap_or(true) => {
            state.closed = true;
            return Err(StorageError::UploadUnknown(id.to_string()));
        }
        (Ok(hasher), None) => {
            state.size = before + received;
            state.hasher = hasher;
            return Ok(AppendOutcome {
                size: state.size,
                written: received,
            });
        }
        (_, Some(failure)) => failure,
        (Err(e), None) => e,
    };
    // Roll back to the last complete chunk so the client can resend this one.
    let f = match std::fs::OpenOptions::new().write(true).open(&path) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            state.closed = true;
            return Err(StorageError::UploadUnknown(id.to_string()));
        }
        Err(e) => return Err(io_err(&path)(e)),
    };
    f.set_len(before).map_err(io_err(&path))?;
    state.size = before;
    state.hasher = snapshot;
    Err(error)
}

/// Reads (and drops) what a client is still sending, up to a bound, so that it gets the error
/// answer rather than a connection reset: a server that closes with unread request bytes makes
/// the kernel send RST, which can destroy the answer in flight.
pub async fn drain<S, E>(body: &mut S)
where
    S: Stream<Item = Result<Bytes, E>> + Unpin,
{
    let mut drained = 0u64;
    while drained < DRAIN_LIMIT {
        match body.next().await {
            Some(Ok(chunk)) => drained += chunk.len() as u64,
            _ => break,
        }
    }
}

/// Starts writing a large upload back to disk while it is still arriving, a window at a time,
/// so the fsync at commit waits only for the tail instead of the whole blob.
struct Writeback {
    flushed: u64,
    written: u64,
}

impl Writeback {
    const WINDOW: u64 = 8 << 20;

    fn new(offset: u64) -> Writeback {
        Writeback {
            flushed: offset,
            written: offset,
        }
    }

    fn wrote(&mut self, f: &std::fs::File, n: u64) {
        self.written += n;
        if self.written - self.flushed >= Self::WINDOW {
            start_writeback(f, self.flushed, self.written - self.flushed);
            self.flushed = self.written;
        }
    }
}

#[cfg(target_os = "linux")]
fn start_writeback(f: &std::fs::File, offset: u64, len: u64) {
    use std::os::fd::AsRawFd;
    // SAFETY: a plain syscall on a file descriptor we own; it only schedules I/O.
    // Failure is harmless: the fsync at commit still makes the data durable.
    unsafe {
        libc::sync_file_range(
            f.as_raw_fd(),
            offset as libc::off64_t,
            len as libc::off64_t,
            libc::SYNC_FILE_RANGE_WRITE,
        );
    }
}

#[cfg(not(target_os = "linux"))]
fn start_writeback(_: &std::fs::File, _: u64, _: u64) {}

pub(crate) async fn commit(
    layout: &Layout,
    id: &str,
    state: &mut State,
    digest: &Digest,
    fsync: bool,
    remote: Option<std::sync::Arc<crate::remote::Remote>>,
) -> Result<u64> {
    let src = layout.upload(id);
    let dst = layout.blob(digest);
    let size = state.size;
    // Bytes past the last accepted chunk (an append whose request was dropped mid-way) are
    // not part of the upload: cut them off, so what is hashed and stored is exactly `size`.
    match tokio::fs::metadata(&src).await {
        Ok(m) if m.len() != size => std::fs::OpenOptions::new()
            .write(true)
            .open(&src)
            .and_then(|f| f.set_len(size))
            .map_err(io_err(&src))?,
        Ok(_) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            return Err(StorageError::UploadUnknown(id.to_string()));
        }
        Err(e) => return Err(io_err(&src)(e)),
    }
    let hasher = state
        .hasher
        .take()
        .filter(|h| h.algorithm() == digest.algorithm());
    let algorithm = digest.algorithm();
    let path = src.clone();
    let actual = tokio::task::spawn_blocking(move || -> Result<Digest> {
        match hasher {
            Some(h) => Ok(h.finish()),
            None => rehash(&path, algorithm),
        }
    })
    .await
    .map_err(|e| StorageError::Io {
        path: src.clone(),
        cause: io::Error::other(e),
    })??;
    if &actual != digest {
        return Err(StorageError::DigestMismatch {
            expected: digest.clone(),
            actual,
        });
    }
    if let Some(remote) = remote {
        // The file moves to a name no session has, so nothing can append to it while it is
        // sent, and the sending runs in a task of its own: a client that disconnects
        // mid-commit (which releases the session's lock) neither leaves a multipart upload
        // half sent nor changes what is sent. Sent, the session is gone (its owner file too);
        // not sent, the file goes back for the client to try again.
        let sending = layout.upload(&uuid::Uuid::new_v4().to_string());
        tokio::fs::rename(&src, &sending)
            .await
            .map_err(io_err(&src))?;
        let (back, owner, digest) = (src.clone(), layout.upload_owner(id), digest.clone());
        tokio::spawn(async move {
            match remote.put_file(&sending, &digest, size).await {
                Ok(()) => {
                    let _ = tokio::fs::remove_file(&sending).await;
                    let _ = tokio::fs::remove_file(&owner).await;
                    Ok(())
                }
                Err(e) => {
                    let _ = tokio::fs::rename(&sending, &back).await;
                    Err(e)
                }
            }
        })
        .await
        .map_err(|e| StorageError::Io {
            path: src.clone(),
            cause: io::Error::other(e),
        })??;
        return Ok(size);
    }
    let target = dst.clone();
    tokio::task::spawn_blocking(move || publish(&src, &target, fsync))
        .await
        .map_err(|e| StorageError::Io {
            path: dst.clone(),
            cause: io::Error::other(e),
        })??;
    Ok(size)
}

fn rehash(path: &Path, algorithm: Algorithm) -> Result<Digest> {
    let mut f = std::fs::File::open(path).map_err(io_err(path))?;
    let mut h = Digester::new(algorithm);
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf).map_err(io_err(path))?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(h.finish())
}

/// Makes verified bytes at `src` visible at `dst`: fsync, rename, fsync the directory. If the
/// blob already exists (a concurrent upload of the same content won), `src` is just removed;
/// an existing file of another size is damage (a verified blob has exactly this size), and
/// the verified bytes replace it.
pub(crate) fn publish(src: &Path, dst: &Path, fsync: bool) -> Result<()> {
    if fsync {
        std::fs::File::open(src)
            .and_then(|f| f.sync_all())
            .map_err(io_err(src))?;
    }
    let dir = dst
        .parent()
        .ok_or_else(|| io_err(dst)(io::Error::other("blob path has no parent")))?;
    if let Ok(existing) = std::fs::symlink_metadata(dst) {
        let len = std::fs::metadata(src).map_err(io_err(src))?.len();
        let whole = existing.is_file() && existing.len() == len;
        if whole {
            std::fs::remove_file(src).map_err(io_err(src))?;
            return Ok(());
        }
        tracing::warn!(path = %dst.display(), on_disk = existing.len(), verified = len, "replacing a damaged blob file with the bytes just verified");
        // A directory where the file should be: a rename cannot replace it.
        if existing.is_dir() {
            std::fs::remove_dir_all(dst).map_err(io_err(dst))?;
        }
    }
    std::fs::create_dir_all(dir).map_err(io_err(dir))?;
    std::fs::rename(src, dst).map_err(io_err(dst))?;
    if fsync {
        std::fs::File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(io_err(dir))?;
    }
    Ok(())
}
