//! `outpost-storage` owns blob bytes on disk: the content-addressed store (`blobs/`) and upload
//! sessions (`uploads/`). It knows digests and upload ids, never repositories, tags or HTTP.
//!
//! Invariant: a file appears under `blobs/<alg>/<2 hex>/<hex>` only after its bytes were hashed
//! to exactly that digest, fsynced, and atomically renamed into place (followed by an fsync of
//! the directory). A crash at any point leaves either no blob or a complete one; partial data
//! only ever lives under `uploads/`, which is never served.

mod layout;
mod upload;

pub use layout::Layout;
pub use upload::{AppendOutcome, Chunk};

use bytes::Bytes;
use futures_util::Stream;
use outpost_oci::{ByteRange, Digest};
use std::collections::HashMap;
use std::io;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StorageError {
    #[error("storage I/O error on {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("upload {0} does not exist")]
    UploadUnknown(String),
    #[error("chunk starts at byte {got} but the upload has {offset} bytes; resume from {offset}")]
    OutOfOrder { offset: u64, got: u64 },
    #[error("uploaded content hashes to {actual}, not {expected}")]
    DigestMismatch { expected: Digest, actual: Digest },
    #[error("upload body was cut off after {received} bytes: {reason}")]
    Interrupted { received: u64, reason: String },
    #[error("upload would be {size} bytes, larger than the {limit} byte limit")]
    TooLarge { size: u64, limit: u64 },
    #[error("blob {0} does not exist")]
    BlobUnknown(Digest),
}

pub type Result<T, E = StorageError> = std::result::Result<T, E>;

pub(crate) fn io_err(path: impl Into<PathBuf>) -> impl FnOnce(io::Error) -> StorageError {
    let path = path.into();
    move |source| StorageError::Io { path, source }
}

/// A readable slice of a blob, ready to stream.
pub struct BlobRead {
    pub file: tokio::fs::File,
    /// Bytes to send, starting at the file's current position.
    pub len: u64,
    /// The blob's full size.
    pub size: u64,
}

/// The blob store and upload sessions under one data directory.
#[derive(Clone)]
pub struct Storage {
    layout: Layout,
    fsync: bool,
    /// Hash state of uploads written since this process started, keyed by upload id. A missing
    /// entry (after a restart) means the upload's file is re-read when it is committed.
    uploads: Arc<Mutex<HashMap<String, Arc<tokio::sync::Mutex<upload::State>>>>>,
}

impl Storage {
    /// Opens (creating if needed) the store under `root`. `fsync` should be true outside tests.
    pub async fn open(root: impl Into<PathBuf>, fsync: bool) -> Result<Storage> {
        let layout = Layout::new(root.into());
        for dir in [layout.blobs_dir(), layout.uploads_dir()] {
            tokio::fs::create_dir_all(&dir)
                .await
                .map_err(io_err(&dir))?;
        }
        Ok(Storage {
            layout,
            fsync,
            uploads: Arc::default(),
        })
    }

    pub fn layout(&self) -> &Layout {
        &self.layout
    }

    /// Size of a stored blob, or `None` if absent.
    pub async fn blob_size(&self, digest: &Digest) -> Result<Option<u64>> {
        let path = self.layout.blob(digest);
        match tokio::fs::metadata(&path).await {
            Ok(m) => Ok(Some(m.len())),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(io_err(path)(e)),
        }
    }

    /// Opens a blob for reading, positioned at the start of `range` (or of the blob).
    /// `range` must already be resolved against the blob's size.
    pub async fn open_blob(&self, digest: &Digest, range: Option<ByteRange>) -> Result<BlobRead> {
        use tokio::io::AsyncSeekExt;
        let path = self.layout.blob(digest);
        let mut file = match tokio::fs::File::open(&path).await {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Err(StorageError::BlobUnknown(digest.clone()));
            }
            Err(e) => return Err(io_err(path)(e)),
        };
        let size = file.metadata().await.map_err(io_err(&path))?.len();
        let len = match range {
            Some(r) => {
                file.seek(io::SeekFrom::Start(r.start))
                    .await
                    .map_err(io_err(&path))?;
                r.len()
            }
            None => size,
        };
        Ok(BlobRead { file, len, size })
    }

    /// Removes a blob's bytes. Used by garbage collection only: a blob still referenced by any
    /// repository must not be deleted.
    pub async fn delete_blob(&self, digest: &Digest) -> Result<bool> {
        let path = self.layout.blob(digest);
        match tokio::fs::remove_file(&path).await {
            Ok(()) => Ok(true),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
            Err(e) => Err(io_err(path)(e)),
        }
    }

    /// Starts an empty upload session and returns its id.
    pub async fn create_upload(&self) -> Result<String> {
        let id = uuid::Uuid::new_v4().to_string();
        let path = self.layout.upload(&id);
        tokio::fs::File::create(&path)
            .await
            .map_err(io_err(&path))?;
        Ok(id)
    }

    /// Bytes received so far by an upload, or `None` if it does not exist.
    pub async fn upload_size(&self, id: &str) -> Result<Option<u64>> {
        let path = self.layout.upload(id);
        match tokio::fs::metadata(&path).await {
            Ok(m) => Ok(Some(m.len())),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(io_err(path)(e)),
        }
    }

    /// Appends a body to an upload. With `start = Some(n)` the chunk must begin at byte `n`
    /// (the current size) or nothing is written. `limit` caps the upload's total size. If the
    /// body fails half-way, the upload is rolled back to where it was, so a client can resend
    /// the chunk.
    pub async fn append<S, E>(
        &self,
        id: &str,
        start: Option<u64>,
        limit: Option<u64>,
        body: S,
    ) -> Result<AppendOutcome>
    where
        S: Stream<Item = Result<Bytes, E>> + Send + Unpin,
        E: std::fmt::Display,
    {
        let state = self.state(id).await?;
        let mut state = state.lock().await;
        upload::append(&self.layout, id, &mut state, start, limit, body).await
    }

    /// Verifies an upload against `digest` and, if it matches, moves it into the blob store.
    /// Returns the blob size. On mismatch the upload is discarded.
    pub async fn commit_upload(&self, id: &str, digest: &Digest) -> Result<u64> {
        let state = self.state(id).await?;
        let mut state = state.lock().await;
        let res = upload::commit(&self.layout, id, &mut state, digest, self.fsync).await;
        if !matches!(res, Err(StorageError::Io { .. })) {
            self.forget(id);
        }
        if matches!(res, Err(StorageError::DigestMismatch { .. })) {
            let _ = tokio::fs::remove_file(self.layout.upload(id)).await;
        }
        res
    }

    /// Cancels an upload, removing what it received.
    pub async fn abort_upload(&self, id: &str) -> Result<()> {
        self.forget(id);
        let path = self.layout.upload(id);
        match tokio::fs::remove_file(&path).await {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                Err(StorageError::UploadUnknown(id.to_string()))
            }
            Err(e) => Err(io_err(path)(e)),
        }
    }

    /// Ids of upload files last written before `now - age`.
    pub async fn stale_uploads(&self, age: Duration) -> Result<Vec<String>> {
        let dir = self.layout.uploads_dir();
        let cutoff = SystemTime::now()
            .checked_sub(age)
            .unwrap_or(SystemTime::UNIX_EPOCH);
        let mut out = Vec::new();
        let mut rd = tokio::fs::read_dir(&dir).await.map_err(io_err(&dir))?;
        while let Some(e) = rd.next_entry().await.map_err(io_err(&dir))? {
            let Ok(meta) = e.metadata().await else {
                continue;
            };
            if meta.modified().map(|m| m < cutoff).unwrap_or(false)
                && let Some(name) = e.file_name().to_str()
            {
                out.push(name.to_string());
            }
        }
        Ok(out)
    }

    async fn state(&self, id: &str) -> Result<Arc<tokio::sync::Mutex<upload::State>>> {
        if let Some(s) = self.lock_map().get(id) {
            return Ok(s.clone());
        }
        let size = self
            .upload_size(id)
            .await?
            .ok_or_else(|| StorageError::UploadUnknown(id.to_string()))?;
        let mut map = self.lock_map();
        Ok(map
            .entry(id.to_string())
            .or_insert_with(|| Arc::new(tokio::sync::Mutex::new(upload::State::resumed(size))))
            .clone())
    }

    fn forget(&self, id: &str) {
        self.lock_map().remove(id);
    }

    fn lock_map(
        &self,
    ) -> std::sync::MutexGuard<'_, HashMap<String, Arc<tokio::sync::Mutex<upload::State>>>> {
        // A poisoned map only means another request panicked mid-insert; the map itself is fine.
        self.uploads.lock().unwrap_or_else(|p| p.into_inner())
    }
}
