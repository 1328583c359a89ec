//! `outpost-storage` owns blob bytes: the content-addressed store (`blobs/` on local disk, or
//! the same layout in an object store, see `remote.rs`) and upload sessions (`uploads/`, always
//! on local disk). It knows digests, upload ids and an opaque owner string per upload, never
//! repositories, tags or HTTP.
//!
//! Invariant: a file appears under `blobs/<alg>/<2 hex>/<hex>` only after its bytes were hashed
//! to exactly that digest, fsynced, and atomically renamed into place (followed by an fsync of
//! the directory). A crash at any point leaves either no blob or a complete one; partial data
//! only ever lives under `uploads/`, which is never served. With an object store, the hashed
//! upload is written to its key in one request or one multipart upload, which the store
//! publishes whole.

mod layout;
mod mapped;
mod remote;
mod reserve;
mod upload;

pub use layout::Layout;
pub use reserve::{DiskRoom, RESERVE_MAX, disk_room};
pub use upload::{AppendOutcome, drain};

use bytes::Bytes;
use futures_util::Stream;
use futures_util::stream::BoxStream;
use outpost_oci::{ByteRange, Digest};
use std::collections::HashMap;
use std::io;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StorageError {
    // Causes are part of the text, not a `source()`: reports that print an error with its
    // causes would otherwise say them twice.
    #[error("storage I/O error on {path}: {cause}")]
    Io { path: PathBuf, cause: io::Error },
    #[error("upload {0} does not exist")]
    UploadUnknown(String),
    #[error("chunk starts at byte {got} but the upload has {offset} bytes; resume from {offset}")]
    OutOfOrder { offset: u64, got: u64 },
    #[error("uploaded content hashes to {actual}, not {expected}")]
    DigestMismatch { expected: Digest, actual: Digest },
    #[error("upload body was cut off after {received} bytes: {reason}")]
    Interrupted { received: u64, reason: String },
    #[error(
        "the blob is at least {size} bytes, larger than this registry's {limit} byte limit for a blob (max_blob_bytes)"
    )]
    TooLarge { size: u64, limit: u64 },
    #[error("blob {0} does not exist")]
    BlobUnknown(Digest),
    #[error("blob store request for {key} failed: {cause}")]
    Remote {
        key: String,
        cause: object_store::Error,
    },
    #[error("{0}")]
    Config(String),
}

impl StorageError {
    /// A failure to reach or write the store, after which the operation may be retried as is
    /// (an upload keeps its data), as opposed to an answer about the content.
    fn is_transient(&self) -> bool {
        matches!(self, StorageError::Io { .. } | StorageError::Remote { .. })
    }
}

/// Whether an error opening or reading a blob file means the file is damaged rather than the
/// system short of something: an I/O error (a bad sector), a symbolic link loop, a directory
/// where the file should be (which cannot be mapped: `ENODEV`). Such a blob counts as missing
/// (see [`Storage::blob_size`]).
fn unreadable(e: &io::Error) -> bool {
    const EIO: i32 = 5;
    const ENODEV: i32 = 19;
    const EISDIR: i32 = 21;
    const ELOOP: i32 = 40;
    matches!(e.raw_os_error(), Some(EIO | ENODEV | EISDIR | ELOOP))
}

/// Writes a small file whole or not at all: temp file, fsync, rename, fsync of the directory.
fn write_durably(path: &std::path::Path, bytes: &[u8]) -> Result<()> {
    let tmp = path.with_extension("tmp");
    let dir = path.parent().unwrap_or(std::path::Path::new("."));
    std::fs::write(&tmp, bytes)
        .and_then(|()| std::fs::File::open(&tmp)?.sync_all())
        .and_then(|()| std::fs::rename(&tmp, path))
        .and_then(|()| std::fs::File::open(dir)?.sync_all())
        .map_err(io_err(path))
}

/// A blob's bytes as read for serving.
pub enum BlobBody {
    /// Memory-mapped from local disk: nothing is copied until the socket write.
    Mapped(Bytes),
    /// Fetched from an object store, segment by segment. `object_size` is the size of the
    /// object in the store, so a caller can tell a damaged one (another size than the blob).
    Streamed {
        stream: BoxStream<'static, io::Result<Bytes>>,
        object_size: u64,
    },
}

impl BlobBody {
    /// All of it in one buffer (for callers that send bounded pieces).
    pub async fn into_bytes(self) -> Result<Bytes> {
        match self {
            BlobBody::Mapped(b) => Ok(b),
            BlobBody::Streamed { stream: mut s, .. } => {
                use futures_util::StreamExt;
                let mut out = bytes::BytesMut::new();
                while let Some(piece) = s.next().await {
                    out.extend_from_slice(&piece.map_err(io_err("blob store"))?);
                }
                Ok(out.freeze())
            }
        }
    }
}

pub type Result<T, E = StorageError> = std::result::Result<T, E>;

pub(crate) fn io_err(path: impl Into<PathBuf>) -> impl FnOnce(io::Error) -> StorageError {
    let path = path.into();
    move |source| StorageError::Io {
        path,
        cause: source,
    }
}

/// The blob store and upload sessions under one data directory.
#[derive(Clone)]
pub struct Storage {
    layout: Layout,
    fsync: bool,
    /// Hash state of uploads written since this process started, keyed by upload id. A missing
    /// entry (after a restart) means the upload's file is re-read when it is committed.
    uploads: Arc<Mutex<HashMap<String, Arc<tokio::sync::Mutex<upload::State>>>>>,
    /// Uploads with a chunk arriving right now, and the size each had before it: what the
    /// upload holds for sure, since a chunk that fails is rolled back to there.
    appending: Arc<Mutex<HashMap<String, u64>>>,
    mapped: Arc<mapped::Mapped>,
    /// Where blobs live when not on local disk.
    remote: Option<Arc<remote::Remote>>,
}

/// Takes an upload out of [`Storage::appending`] when its append ends.
struct Appending<'a> {
    storage: &'a Storage,
    id: &'a str,
}

impl Drop for Appending<'_> {
    fn drop(&mut self) {
        self.storage.appending_lock().remove(self.id);
    }
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
            appending: Arc::default(),
            mapped: Arc::default(),
            remote: None,
        })
    }

    /// Keeps blobs in the object store `url` names (`s3://<bucket>[/<prefix>]` or
    /// `az://<container>[/<prefix>]`) instead of under `blobs/`; uploads stay on local disk.
    /// Nothing is requested until the first use: [`Self::check`] says whether it answers.
    pub fn with_blob_store(mut self, url: &str) -> Result<Storage> {
        self.remote = Some(Arc::new(remote::Remote::open(url)?));
        Ok(self)
    }

    /// Checks a `blob_store` URL the way [`Self::with_blob_store`] would, without opening
    /// anything (for configuration checks).
    pub fn check_blob_store_url(url: &str) -> Result<()> {
        remote::Remote::open(url).map(drop)
    }

    /// Whether blobs live in an object store (where writing one can take minutes).
    pub fn is_remote(&self) -> bool {
        self.remote.is_some()
    }

    /// Records where this data directory keeps its blobs (`blob-store` in it: `local`, or the
    /// store's URL and this directory's owner id) the first time, and refuses a different
    /// choice later: started against another store (or none), the registry would find none of
    /// the blobs its metadata lists. A directory from before this record existed, with
    /// metadata or blobs already, counts as `local`. Moving blobs is a copy of the `blobs/`
    /// tree followed by an edit of that file.
    ///
    /// With an object store, the prefix is claimed too: `<prefix>/outpost-owner` names the
    /// data directory that uses it, and a second one is refused (each would collect the
    /// other's blobs as orphans). At the first start the store must answer; later, a store
    /// that does not answer is only a warning (the registry reports it as not ready).
    ///
    /// `shared_owner` is the owner id of a registry whose replicas share one metadata database
    /// (and so one prefix): each replica's data directory claims the prefix under that id.
    /// Returns where the blobs are: the store's URL, or `local <id of this directory>`.
    pub async fn claim(&self, shared_owner: Option<&str>) -> Result<String> {
        let root = self.layout.root();
        let record = root.join("blob-store");
        let wanted = match &self.remote {
            Some(r) => r.url().to_string(),
            None => "local".to_string(),
        };
        let text = match std::fs::read_to_string(&record) {
            Ok(t) if !t.trim().is_empty() => Some(t),
            Ok(_) => None,
            Err(e) if e.kind() == io::ErrorKind::NotFound => None,
            Err(e) => return Err(io_err(record)(e)),
        };
        let existing = root.join("meta.db").exists() || self.has_local_blob_files();
        let (had, mut id) = match &text {
            Some(t) => {
                let mut lines = t.lines().map(str::trim);
                let had = lines.next().unwrap_or_default().to_string();
                (
                    had,
                    lines.next().filter(|l| !l.is_empty()).map(String::from),
                )
            }
            None if existing => ("local".to_string(), None),
            None => (wanted.clone(), None),
        };
        let had = remote::canonical(&had);
        // A store recorded but never claimed (its first start failed, say, at a prefix that
        // was another registry's) holds nothing of this directory's: another may be chosen.
        let claimed = text
            .as_deref()
            .is_some_and(|t| t.lines().nth(2).map(str::trim) == Some("claimed"));
        let unclaimed_store = had != "local" && !claimed;
        if had != wanted && !unclaimed_store {
            return Err(StorageError::Config(format!(
                "this data directory keeps its blobs in {had:?} (recorded in {}), not \
                 {wanted:?}; start it with blob_store {}, or copy the blobs over and edit that \
                 file",
                record.display(),
                match had.as_str() {
                    "local" => "unset".to_string(),
                    url => format!("= {url:?}"),
                },
            )));
        }
        if let Some(r) = &self.remote {
            if let Some(owner) = shared_owner {
                id = Some(owner.to_string());
            }
            let mine = id
                .get_or_insert_with(|| uuid::Uuid::new_v4().to_string())
                .clone();
            let foreign = |owner: &str| {
                StorageError::Config(format!(
                    "the blob store {} belongs to another data directory (owner id {owner} in \
                     its outpost-owner object; this one is {mine}): two registries sharing a \
                     prefix would each delete the other's blobs; give each its own prefix",
                    r.url()
                ))
            };
            if !claimed {
                // The id is recorded before the marker is written: a start that fails in
                // between finds its own id in the marker next time.
                write_durably(&record, format!("{wanted}\n{mine}\n").as_bytes())?;
                let owner = match r.marker_owner().await {
                    Ok(remote::Marker::Absent) => r.mark_owner(&mine).await,
                    Ok(remote::Marker::Owner(o)) => Ok(o),
                    Err(e) => Err(e),
                }
                .map_err(|e| {
                    StorageError::Config(format!(
                        "cannot claim the blob store {} for this data directory (the first start \
                         must reach it): {e}",
                        r.url()
                    ))
                })?;
                if owner != mine {
                    return Err(foreign(&owner));
                }
                write_durably(&record, format!("{wanted}\n{mine}\nclaimed\n").as_bytes())?;
            } else {
                match r.marker_owner().await {
                    Ok(remote::Marker::Owner(o)) if o == mine => {}
                    Ok(remote::Marker::Owner(o)) => return Err(foreign(&o)),
                    Ok(remote::Marker::Absent) => {
                        return Err(StorageError::Config(format!(
                            "the blob store {url} has lost its owner marker \
                             ({url}/outpost-owner): the bucket or prefix was deleted or \
                             replaced, and the blobs this registry's metadata lists may be gone \
                             with it. If it is the right store, claim it again by removing the \
                             third line (\"claimed\") of {}",
                            record.display(),
                            url = r.url(),
                        )));
                    }
                    Err(e) => {
                        tracing::warn!(store = %r.url(), error = %e, "the blob store does not answer at start; serving what it can");
                    }
                }
            }
            r.set_owner(&mine);
            return Ok(wanted);
        }
        // A local store gets an id too, the first time one is asked for: replicas sharing a
        // metadata database compare it, to refuse blobs kept on separate disks.
        let mine = match (id, shared_owner) {
            (Some(id), _) => id,
            (None, None) => {
                if text.as_deref().map(str::trim) != Some(wanted.as_str()) {
                    write_durably(&record, format!("{wanted}\n").as_bytes())?;
                }
                return Ok(wanted);
            }
            (None, Some(_)) => {
                let id = uuid::Uuid::new_v4().to_string();
                write_durably(&record, format!("{wanted}\n{id}\n").as_bytes())?;
                id
            }
        };
        Ok(format!("{wanted} {mine}"))
    }

    /// Whether `data_dir/blobs` holds any blob file.
    pub fn has_local_blob_files(&self) -> bool {
        let blobs = self.layout.blobs_dir();
        std::fs::read_dir(&blobs).is_ok_and(|algs| {
            algs.flatten().any(|alg| {
                std::fs::read_dir(alg.path()).is_ok_and(|mut prefixes| {
                    prefixes.any(|p| {
                        p.is_ok_and(|p| {
                            std::fs::read_dir(p.path()).is_ok_and(|mut f| f.next().is_some())
                        })
                    })
                })
            })
        })
    }

    /// Where blobs are kept: the object store's URL, or the local directory.
    pub fn blob_store(&self) -> String {
        match &self.remote {
            Some(r) => r.url().to_string(),
            None => self.layout.blobs_dir().display().to_string(),
        }
    }

    /// Whether the blob store can be read: the directory, or the object store answering.
    pub async fn check(&self) -> Result<()> {
        if let Some(r) = &self.remote {
            return r.check().await;
        }
        let blobs = self.layout.blobs_dir();
        tokio::fs::read_dir(&blobs)
            .await
            .map(drop)
            .map_err(io_err(blobs))
    }

    pub fn layout(&self) -> &Layout {
        &self.layout
    }

    /// Size of a stored blob, or `None` if absent. A path that is no readable file (a
    /// directory, a symbolic link loop, an I/O error: damage) counts as absent, so the blob is
    /// answered as unknown and stored again over it.
    pub async fn blob_size(&self, digest: &Digest) -> Result<Option<u64>> {
        if let Some(r) = &self.remote {
            return r.size(digest).await;
        }
        let path = self.layout.blob(digest);
        match tokio::fs::metadata(&path).await {
            Ok(m) if m.is_dir() => Ok(None),
            Ok(m) => Ok(Some(m.len())),
            Err(e) if e.kind() == io::ErrorKind::NotFound || unreadable(&e) => Ok(None),
            Err(e) => Err(io_err(path)(e)),
        }
    }

    /// A blob's bytes, or a range of them. On local disk they are memory-mapped for zero-copy
    /// serving (every concurrent reader of the same blob shares one mapping); from an object
    /// store they stream. A blob that is gone is [`StorageError::BlobUnknown`].
    pub async fn read_blob(&self, digest: &Digest, range: Option<ByteRange>) -> Result<BlobBody> {
        if let Some(r) = &self.remote {
            let range = range.map(|r| (r.start, r.end + 1));
            let (stream, object_size) = r.read(digest, range).await?;
            return Ok(BlobBody::Streamed {
                stream,
                object_size,
            });
        }
        let path = self.layout.blob(digest);
        let range = range.map(|r| (r.start as usize, r.end as usize + 1));
        match self.mapped.slice(digest, &path, range).await {
            Err(StorageError::Io { cause: source, .. })
                if source.kind() == io::ErrorKind::NotFound || unreadable(&source) =>
            {
                Err(StorageError::BlobUnknown(digest.clone()))
            }
            other => other.map(BlobBody::Mapped),
        }
    }

    /// Every file in the blob store whose path names a digest, with when it was last written.
    /// Anything else under `blobs/` is left out (and so never collected).
    pub async fn blob_files(&self) -> Result<Vec<(Digest, SystemTime)>> {
        if let Some(r) = &self.remote {
            return r.list().await;
        }
        let root = self.layout.blobs_dir();
        let layout = self.layout.clone();
        tokio::task::spawn_blocking(move || {
            let mut out = Vec::new();
            // Directories only at the two upper levels: anything else is not ours to judge.
            let entries = |dir: &std::path::Path| -> Result<Vec<std::fs::DirEntry>> {
                if !std::fs::symlink_metadata(dir).is_ok_and(|m| m.is_dir()) {
                    return Ok(Vec::new());
                }
                match std::fs::read_dir(dir) {
                    Ok(rd) => rd.collect::<io::Result<_>>().map_err(io_err(dir)),
                    Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(Vec::new()),
                    Err(e) => Err(io_err(dir)(e)),
                }
            };
            for alg in entries(&root)? {
                for prefix in entries(&alg.path())? {
                    for file in entries(&prefix.path())? {
                        let name = format!(
                            "{}:{}",
                            alg.file_name().to_string_lossy(),
                            file.file_name().to_string_lossy()
                        );
                        let Ok(digest) = name.parse::<Digest>() else {
                            continue;
                        };
                        if layout.blob(&digest) != file.path()
                            || !file.file_type().is_ok_and(|t| t.is_file())
                        {
                            continue;
                        }
                        let modified = match file.metadata().and_then(|m| m.modified()) {
                            Ok(m) => m,
                            // Deleted since it was listed.
                            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                            Err(e) => return Err(io_err(file.path())(e)),
                        };
                        out.push((digest, modified));
                    }
                }
            }
            Ok(out)
        })
        .await
        .map_err(|e| StorageError::Io {
            path: self.layout.blobs_dir(),
            cause: io::Error::other(e),
        })?
    }

    /// Removes a blob's bytes. Used by garbage collection only: a blob still referenced by any
    /// repository must not be deleted.
    pub async fn delete_blob(&self, digest: &Digest) -> Result<bool> {
        if let Some(r) = &self.remote {
            return r.delete(digest).await;
        }
        let path = self.layout.blob(digest);
        match tokio::fs::remove_file(&path).await {
            Ok(()) => Ok(true),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
            Err(e) => Err(io_err(path)(e)),
        }
    }

    /// Starts an empty upload session owned by `owner` and returns its id.
    pub async fn create_upload(&self, owner: &str) -> Result<String> {
        let id = uuid::Uuid::new_v4().to_string();
        let path = self.layout.upload(&id);
        tokio::fs::File::create(&path)
            .await
            .map_err(io_err(&path))?;
        let owner_path = self.layout.upload_owner(&id);
        if let Err(e) = tokio::fs::write(&owner_path, owner).await {
            // A full disk, say: leave no half-made session behind.
            let _ = tokio::fs::remove_file(&owner_path).await;
            let _ = tokio::fs::remove_file(&path).await;
            return Err(io_err(&owner_path)(e));
        }
        Ok(id)
    }

    /// Who started an upload, or `None` if no such upload exists.
    pub async fn upload_owner(&self, id: &str) -> Result<Option<String>> {
        let path = self.layout.upload_owner(id);
        match tokio::fs::read_to_string(&path).await {
            Ok(owner) => Ok(Some(owner)),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(io_err(path)(e)),
        }
    }

    /// Bytes an upload has accepted, or `None` if it does not exist: its size after the last
    /// complete chunk. The file can briefly hold more (a chunk being written, or one whose
    /// request was dropped mid-way and is cut off by the next append), and a client resuming
    /// from the file's length would be refused. Waits up to 10 s for a chunk in flight, then
    /// answers from the file.
    pub async fn upload_progress(&self, id: &str) -> Result<Option<u64>> {
        let state = match self.state(id).await {
            Ok(s) => s,
            Err(StorageError::UploadUnknown(_)) => return Ok(None),
            Err(e) => return Err(e),
        };
        match tokio::time::timeout(Duration::from_secs(10), state.lock()).await {
            Ok(s) => Ok(Some(s.size())),
            // A chunk still arriving: what the upload had before it, which a client can
            // resume from whether the chunk completes or is rolled back (the file's size
            // would count bytes a rollback takes away).
            Err(_) => {
                let before = self.appending_lock().get(id).copied();
                match before {
                    Some(before) => Ok(Some(before)),
                    None => self.upload_size(id).await,
                }
            }
        }
    }

    /// Bytes in an upload's file, or `None` if it does not exist.
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
        self.appending_lock().insert(id.to_string(), state.size());
        // Removed however the append ends, cancelled included.
        let _done = Appending { storage: self, id };
        upload::append(&self.layout, id, &mut state, start, limit, body).await
    }

    fn appending_lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, u64>> {
        self.appending.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Verifies an upload against `digest` and, if it matches, moves it into the blob store.
    /// Returns the blob size. On mismatch the upload is discarded.
    pub async fn commit_upload(&self, id: &str, digest: &Digest) -> Result<u64> {
        let state = self.state(id).await?;
        let mut state = state.lock().await;
        if state.closed {
            // A request that completed (or cancelled) it ran while this one waited.
            return Err(StorageError::UploadUnknown(id.to_string()));
        }
        let res = upload::commit(
            &self.layout,
            id,
            &mut state,
            digest,
            self.fsync,
            self.remote.clone(),
        )
        .await;
        // A failure to write leaves the upload as it was, for the client to try again.
        let done = !res.as_ref().is_err_and(StorageError::is_transient);
        if done {
            state.closed = true;
            self.forget(id);
            let _ = tokio::fs::remove_file(self.layout.upload_owner(id)).await;
        }
        if matches!(res, Err(StorageError::DigestMismatch { .. })) {
            let _ = tokio::fs::remove_file(self.layout.upload(id)).await;
        }
        res
    }

    /// Stores a whole blob held in memory: verified against `digest`, then written to a
    /// temporary file in `uploads/` and published like a committed upload (fsync, rename,
    /// directory fsync), all on one blocking thread. For small blobs, where an upload session
    /// (owner file, per-chunk bookkeeping) would cost more than the bytes. Returns the size.
    pub async fn put_blob(&self, digest: &Digest, bytes: Bytes) -> Result<u64> {
        if let Some(r) = &self.remote {
            let (d, b) = (digest.clone(), bytes.clone());
            let actual =
                tokio::task::spawn_blocking(move || outpost_oci::Digest::of(d.algorithm(), &b))
                    .await
                    .map_err(|e| StorageError::Io {
                        path: self.layout.uploads_dir(),
                        cause: io::Error::other(e),
                    })?;
            if &actual != digest {
                return Err(StorageError::DigestMismatch {
                    expected: digest.clone(),
                    actual,
                });
            }
            let size = bytes.len() as u64;
            r.put_bytes(digest, bytes).await?;
            return Ok(size);
        }
        let tmp = self.layout.upload(&uuid::Uuid::new_v4().to_string());
        let dst = self.layout.blob(digest);
        let (digest, fsync) = (digest.clone(), self.fsync);
        let path = tmp.clone();
        tokio::task::spawn_blocking(move || -> Result<u64> {
            let actual = outpost_oci::Digest::of(digest.algorithm(), &bytes);
            if actual != digest {
                return Err(StorageError::DigestMismatch {
                    expected: digest,
                    actual,
                });
            }
            if std::fs::metadata(&dst).is_ok_and(|m| m.is_file() && m.len() == bytes.len() as u64) {
                return Ok(bytes.len() as u64);
            }
            let written = std::fs::write(&path, &bytes)
                .map_err(io_err(&path))
                .and_then(|()| upload::publish(&path, &dst, fsync));
            if written.is_err() {
                let _ = std::fs::remove_file(&path);
            }
            written.map(|()| bytes.len() as u64)
        })
        .await
        .map_err(|e| StorageError::Io {
            path: tmp,
            cause: io::Error::other(e),
        })?
    }

    /// Cancels an upload, removing what it received.
    pub async fn abort_upload(&self, id: &str) -> Result<()> {
        // Marked closed for a request waiting on it; one holding it now (a chunk in flight)
        // is not waited for (the reaper must not hang on a silent client): it finds the file
        // gone when it next looks.
        let live = self.lock_map().get(id).cloned();
        if let Some(state) = live
            && let Ok(mut state) = state.try_lock()
        {
            state.closed = true;
        }
        self.forget(id);
        let _ = tokio::fs::remove_file(self.layout.upload_owner(id)).await;
        let path = self.layout.upload(id);
        match tokio::fs::remove_file(&path).await {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                Err(StorageError::UploadUnknown(id.to_string()))
            }
            Err(e) => Err(io_err(path)(e)),
        }
    }

    /// Removes upload sessions whose data was last written before `now - age` (and owner
    /// files left without data), except those in `keep`. Returns how many sessions were
    /// removed.
    pub async fn reap_uploads(
        &self,
        age: Duration,
        keep: &std::collections::HashSet<String>,
    ) -> Result<usize> {
        let dir = self.layout.uploads_dir();
        let cutoff = SystemTime::now()
            .checked_sub(age)
            .unwrap_or(SystemTime::UNIX_EPOCH);
        let mut removed = 0;
        let mut rd = tokio::fs::read_dir(&dir).await.map_err(io_err(&dir))?;
        while let Some(e) = rd.next_entry().await.map_err(io_err(&dir))? {
            let Ok(meta) = e.metadata().await else {
                continue;
            };
            let Some(name) = e.file_name().to_str().map(str::to_string) else {
                continue;
            };
            let old = meta.modified().map(|m| m < cutoff).unwrap_or(false);
            let id = name.trim_end_matches(".owner");
            let valid =
                !id.is_empty() && id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-');
            if !old || !valid || keep.contains(id) {
                continue;
            }
            if name.ends_with(".owner") {
                if self.upload_size(id).await?.is_none() {
                    let _ = tokio::fs::remove_file(e.path()).await;
                }
            } else if self.abort_upload(id).await.is_ok() {
                removed += 1;
            }
        }
        Ok(removed)
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

#[cfg(test)]
mod tests {
    use super::*;
    use futures_util::StreamExt;

    /// A chunk whose request is dropped half-way leaves bytes in the file that the upload did
    /// not accept; the progress a client resumes from is the accepted size, and resuming there
    /// works.
    #[tokio::test]
    async fn progress_is_what_was_accepted_not_what_the_file_holds() {
        let dir = tempfile::tempdir().unwrap();
        let s = Storage::open(dir.path(), true).await.unwrap();
        let id = s.create_upload("repo").await.unwrap();
        let first = futures_util::stream::iter([Ok::<_, std::io::Error>(Bytes::from_static(
            b"0123456789",
        ))]);
        s.append(&id, Some(0), None, first).await.unwrap();
        // A second chunk: some bytes arrive, then the client goes silent and the request is
        // dropped (the future is cancelled mid-append).
        let stalled =
            futures_util::stream::iter([Ok::<_, std::io::Error>(Bytes::from_static(b"abcdef"))])
                .chain(futures_util::stream::pending());
        let cut = tokio::time::timeout(
            Duration::from_millis(300),
            s.append(&id, Some(10), None, Box::pin(stalled)),
        )
        .await;
        assert!(cut.is_err(), "the stalled append should still be waiting");
        assert_eq!(
            s.upload_size(&id).await.unwrap(),
            Some(16),
            "the file holds more"
        );
        assert_eq!(s.upload_progress(&id).await.unwrap(), Some(10));
        let rest =
            futures_util::stream::iter([Ok::<_, std::io::Error>(Bytes::from_static(b"ABCDEF"))]);
        s.append(&id, Some(10), None, rest).await.unwrap();
        let d = Digest::sha256_of(b"0123456789ABCDEF");
        assert_eq!(s.commit_upload(&id, &d).await.unwrap(), 16);
    }

    /// While a chunk is still arriving (its client silent, not gone), the progress answered
    /// after the 10 s wait is what the upload had before the chunk: a client resuming from
    /// there is right whether the chunk then completes or is rolled back. The file's size
    /// would count bytes that a rollback takes away.
    #[tokio::test]
    async fn progress_during_a_stalled_chunk_is_what_came_before_it() {
        let dir = tempfile::tempdir().unwrap();
        let s = Arc::new(Storage::open(dir.path(), true).await.unwrap());
        let id = s.create_upload("repo").await.unwrap();
        let first = futures_util::stream::iter([Ok::<_, std::io::Error>(Bytes::from_static(
            b"0123456789",
        ))]);
        s.append(&id, Some(0), None, first).await.unwrap();
        let stalled =
            futures_util::stream::iter([Ok::<_, std::io::Error>(Bytes::from_static(b"abcdef"))])
                .chain(futures_util::stream::pending());
        let (s2, id2) = (s.clone(), id.clone());
        let chunk =
            tokio::spawn(async move { s2.append(&id2, Some(10), None, Box::pin(stalled)).await });
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert_eq!(s.upload_size(&id).await.unwrap(), Some(16));
        assert_eq!(s.upload_progress(&id).await.unwrap(), Some(10));
        chunk.abort();
        let _ = chunk.await;
        assert!(
            s.appending_lock().is_empty(),
            "the chunk's mark goes with it"
        );
    }

    /// A cancel that arrives while a chunk is being written does not wait for it, and the
    /// chunk's request must not then report the bytes as accepted.
    #[tokio::test]
    async fn a_chunk_cut_short_by_a_cancel_is_not_accepted() {
        let dir = tempfile::tempdir().unwrap();
        let s = Arc::new(Storage::open(dir.path(), true).await.unwrap());
        let id = s.create_upload("repo").await.unwrap();
        let (go, wait) = tokio::sync::oneshot::channel::<()>();
        let body = futures_util::stream::iter([Ok::<_, std::io::Error>(Bytes::from_static(
            b"first half",
        ))])
        .chain(futures_util::stream::once(async move {
            let _ = wait.await;
            Ok(Bytes::from_static(b" second half"))
        }));
        let (s2, id2) = (s.clone(), id.clone());
        let chunk =
            tokio::spawn(async move { s2.append(&id2, Some(0), None, Box::pin(body)).await });
        tokio::time::sleep(Duration::from_millis(100)).await;
        s.abort_upload(&id).await.unwrap();
        let _ = go.send(());
        let err = chunk.await.unwrap().unwrap_err();
        assert!(matches!(err, StorageError::UploadUnknown(_)), "{err}");
        assert_eq!(s.upload_progress(&id).await.unwrap(), None);
        let more = futures_util::stream::iter([Ok::<_, std::io::Error>(Bytes::from_static(b"x"))]);
        assert!(matches!(
            s.append(&id, None, None, more).await,
            Err(StorageError::UploadUnknown(_))
        ));
    }

    #[tokio::test]
    async fn put_blob_stores_only_verified_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let s = Storage::open(dir.path(), true).await.unwrap();
        let good = Digest::sha256_of(b"layer bytes");
        assert_eq!(
            s.put_blob(&good, Bytes::from_static(b"layer bytes"))
                .await
                .unwrap(),
            11
        );
        assert_eq!(s.blob_size(&good).await.unwrap(), Some(11));
        let read = s.read_blob(&good, None).await.unwrap();
        assert_eq!(&read.into_bytes().await.unwrap()[..], b"layer bytes");
        // Storing it again is a no-op that reports the size.
        assert_eq!(
            s.put_blob(&good, Bytes::from_static(b"layer bytes"))
                .await
                .unwrap(),
            11
        );

        let claimed = Digest::sha256_of(b"what the parent said");
        let err = s
            .put_blob(&claimed, Bytes::from_static(b"what arrived"))
            .await
            .unwrap_err();
        assert!(matches!(err, StorageError::DigestMismatch { .. }), "{err}");
        assert_eq!(s.blob_size(&claimed).await.unwrap(), None);
        let leftovers = std::fs::read_dir(s.layout().uploads_dir()).unwrap().count();
        assert_eq!(leftovers, 0, "a refused blob leaves nothing in uploads/");
    }
}
