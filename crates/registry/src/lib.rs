//! `outpost-registry` is the registry domain: what it means to push, pull and delete blobs and
//! manifests, run upload sessions, list tags and repositories, and answer referrers queries. It
//! combines `outpost-storage` (bytes) and `outpost-meta` (everything else) and enforces the
//! rules that span both: a blob is linked to a repository only after its digest was verified;
//! a manifest is accepted only if it parses, fits the size limit, matches the digest it was
//! pushed under, and everything it references is present. No HTTP types appear here; the server
//! maps [`RegistryError`] to status codes in one place.

mod cache;
mod error;
pub mod metrics;

pub use cache::CachedManifest;

pub use error::RegistryError;
pub use outpost_meta::is_disk_full;
pub use outpost_meta::{EVENT_MANIFEST_PUT, Event, Meta, MetaError, TagCondition};
pub use outpost_storage::{BlobBody, Storage, StorageError};

use bytes::Bytes;
use cache::ManifestCache;
use futures_util::Stream;
use outpost_meta::NewManifest;
use outpost_oci::manifest::OCI_INDEX;
use outpost_oci::{ByteRange, Descriptor, Digest, Manifest, Reference, RepoName};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

pub type Result<T, E = RegistryError> = std::result::Result<T, E>;

/// Limits and knobs of the registry domain.
#[derive(Debug, Clone)]
pub struct RegistryConfig {
    /// Largest manifest accepted, in bytes.
    pub max_manifest_bytes: usize,
    /// Largest blob accepted, in bytes (`None`: no limit).
    pub max_blob_bytes: Option<u64>,
    /// Whether blob and database writes are fsynced (always, outside tests).
    pub fsync: bool,
    /// Manifests kept in memory for GET by tag or digest (0 disables the cache).
    pub manifest_cache_entries: usize,
    /// Keep blobs in this object store (`s3://…` or `az://…`) instead of on local disk.
    pub blob_store: Option<String>,
    /// Keep metadata in this PostgreSQL database (`postgres://…`) instead of `meta.db`.
    /// Replicas of one registry share it, and must then share `blob_store` too.
    pub database_url: Option<String>,
    /// How the other replicas sharing `database_url` reach this one (`http://host:port`):
    /// upload sessions started here are recorded under it, so a replica that receives a
    /// request for one forwards it here.
    pub replica_url: Option<String>,
}

impl Default for RegistryConfig {
    fn default() -> Self {
        RegistryConfig {
            max_manifest_bytes: 4 * 1024 * 1024,
            max_blob_bytes: None,
            fsync: true,
            manifest_cache_entries: 10_000,
            blob_store: None,
            database_url: None,
            replica_url: None,
        }
    }
}

/// A manifest as served: its digest, media type and exact bytes.
pub type StoredManifest = CachedManifest;

/// The result of a manifest push.
#[derive(Debug, Clone)]
pub struct PushedManifest {
    pub digest: Digest,
    pub subject: Option<Digest>,
    /// For a put by tag: what the tag pointed at before this put moved it (`None`: the tag
    /// is new, or already pointed here). Read in the same transaction as the move, so two
    /// writers racing for a tag each learn exactly what they replaced.
    pub replaced: Option<String>,
    /// Where the put stands in the event log (see `outpost_meta::PutOutcome::log_position`).
    pub log_position: i64,
}

/// `log_state` names of the times (Unix seconds) of the last garbage collection and the
/// last successful sync.
const GC_LAST_RUN: &str = "gc_last_run";
const SYNC_LAST_SUCCESS: &str = "sync_last_success";

/// One node's registry: blob store plus metadata.
#[derive(Clone)]
pub struct Registry {
    storage: Storage,
    meta: Meta,
    config: RegistryConfig,
    cache: Arc<ManifestCache>,
    /// Ticks after every committed change to manifests or tags, so the gateway can long-poll.
    changes: Arc<tokio::sync::watch::Sender<u64>>,
    /// Held shared while a blob file is put in place or found and then linked, and exclusively
    /// while garbage collection deletes rows and files: a blob is never linked between the two.
    blob_gate: Arc<tokio::sync::RwLock<()>>,
    metrics: metrics::Metrics,
    /// Blobs garbage collection must leave alone right now, with how many holders each.
    pins: Arc<std::sync::Mutex<std::collections::HashMap<Digest, usize>>>,
    gc_running: Arc<tokio::sync::Mutex<()>>,
    /// Uploads whose bytes reached the blob store but whose link to the repository could not
    /// be recorded (the database did not answer): upload id → repository, digest, size. The
    /// client was told to try again; its next `PUT` (or status request) finds the upload here.
    unlinked: Arc<std::sync::Mutex<std::collections::HashMap<String, Unlinked>>>,
    /// Linked blobs found missing or damaged in the store, for a connected registry's sync
    /// to fetch again from its parent.
    damage: Arc<Damage>,
}

/// Blobs found damaged, kept for [`Registry::take_damaged`] once a connected registry's sync
/// asked for them ([`Registry::repair_from_parent`]); no one repairs them at the root.
#[derive(Default)]
struct Damage {
    wanted: std::sync::atomic::AtomicBool,
    found: std::sync::Mutex<std::collections::HashMap<Digest, (RepoName, u64)>>,
    notify: tokio::sync::Notify,
    /// When each damaged blob was last logged: once a minute, however often it is read.
    logged: std::sync::Mutex<std::collections::HashMap<Digest, std::time::Instant>>,
}

/// How often the same damaged blob is logged.
const DAMAGE_LOG_EVERY: std::time::Duration = std::time::Duration::from_secs(60);

static VERSION: std::sync::OnceLock<String> = std::sync::OnceLock::new();

/// Sets the build's version for [`version`], once (the binary's `main` does); returns it.
pub fn set_version(version: String) -> &'static str {
    VERSION.get_or_init(|| version)
}

/// The build's version: the release, with `+<commit>` when the binary knows it (tests that
/// run the server in-process see the release alone).
pub fn version() -> &'static str {
    VERSION
        .get()
        .map_or(env!("CARGO_PKG_VERSION"), String::as_str)
}

/// The most damaged blobs kept for repair at once; more are found again at their next read.
const DAMAGE_KEPT: usize = 1000;

/// An upload committed to the blob store but not linked: its repository, digest and size.
type Unlinked = (RepoName, Digest, u64);

/// Blobs kept from garbage collection until this is dropped: [`Registry::pin_blobs`].
pub struct BlobPins {
    pins: Arc<std::sync::Mutex<std::collections::HashMap<Digest, usize>>>,
    digests: Vec<Digest>,
}

impl Drop for BlobPins {
    fn drop(&mut self) {
        let mut pins = self.pins.lock().unwrap_or_else(|p| p.into_inner());
        for d in &self.digests {
            if let Some(n) = pins.get_mut(d) {
                *n -= 1;
                if *n == 0 {
                    pins.remove(d);
                }
            }
        }
    }
}

/// Whether an image (or index) is complete on this node: [`Registry::readiness`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Readiness {
    /// The manifest the reference resolved to.
    pub digest: Digest,
    /// Platforms an index names (`os/architecture[/variant]`); empty for a single image.
    pub platforms: Vec<String>,
    /// Manifests and distinct blobs it needs, and the blobs' total size.
    pub manifests: u64,
    pub blobs: u64,
    pub bytes: u64,
    /// What is not here.
    pub missing: Vec<Missing>,
}

/// A manifest or blob an image needs that this node does not hold.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Missing {
    pub digest: Digest,
    /// `manifest` or `blob`.
    pub kind: &'static str,
    /// The platform that needs it, below an index.
    pub platform: Option<String>,
}

/// `os/architecture[/variant]` of an index entry's platform.
fn platform_name(p: &serde_json::Value) -> String {
    let field = |k: &str| p.get(k).and_then(|v| v.as_str()).unwrap_or("");
    let mut s = format!("{}/{}", field("os"), field("architecture"));
    if !field("variant").is_empty() {
        s.push('/');
        s.push_str(field("variant"));
    }
    s
}

/// What one garbage collection did (or, with `dry_run`, would do).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GcReport {
    pub dry_run: bool,
    /// Blobs no manifest references, removed with their repository links.
    pub blobs_removed: u64,
    pub bytes_freed: u64,
    /// Files in the blob store with no record at all (left by a crash), removed.
    pub orphan_files_removed: u64,
    /// Files of removed blobs that could not be deleted now (the store failed or was too
    /// slow): their records are gone, and the next collection deletes them as orphans.
    pub files_left: u64,
}

/// The longest a collection holds the exclusive blob gate (pushes wait meanwhile) before
/// letting go and taking it again for the rest of its batch.
const HOLD_GATE: std::time::Duration = std::time::Duration::from_secs(1);

impl Registry {
    /// Opens the registry stored in `data_dir` (creating it if needed).
    pub async fn open(data_dir: &Path, config: RegistryConfig) -> Result<Registry> {
        let mut storage = Storage::open(data_dir, config.fsync).await?;
        if let Some(url) = &config.blob_store {
            storage = storage.with_blob_store(url)?;
        }
        let meta = match &config.database_url {
            None => {
                storage.claim(None).await?;
                Meta::open(&data_dir.join("meta.db")).await?
            }
            Some(url) => {
                // Nothing is copied from SQLite: a directory that has been a registry already
                // would start empty, and its blobs would be collected as orphans.
                if data_dir.join("meta.db").exists() || storage.has_local_blob_files() {
                    return Err(RegistryError::Storage(StorageError::Config(format!(
                        "the data directory {} already holds a registry (meta.db or blobs), and \
                         database_url would start a new, empty one beside it: Outpost does not \
                         move metadata from SQLite to PostgreSQL. Give database_url a fresh data \
                         directory (and a fresh blob_store prefix)",
                        data_dir.display()
                    ))));
                }
                let meta = Meta::connect(url, 16).await?;
                // One id for the registry, whichever replica starts first: every replica's
                // data directory claims the object store under it.
                let id = meta
                    .shared_secret("registry-id", uuid::Uuid::new_v4().to_string().as_bytes())
                    .await?;
                let id = String::from_utf8_lossy(&id).into_owned();
                let location = storage.claim(Some(&id)).await?;
                let recorded = meta
                    .shared_secret("blob-location", location.as_bytes())
                    .await?;
                if recorded != location.as_bytes() {
                    let recorded = String::from_utf8_lossy(&recorded).into_owned();
                    return Err(RegistryError::Storage(StorageError::Config(format!(
                        "the metadata database {} lists blobs kept in {recorded:?}, but this \
                         server keeps them in {location:?}: replicas sharing a database must \
                         share one object store (set the same blob_store on each)",
                        outpost_meta::redact_url(url),
                    ))));
                }
                meta
            }
        };
        let cache = Arc::new(ManifestCache::new(config.manifest_cache_entries));
        // When the last collection and the last sync happened survive a restart: an alert on
        // their age must not fire, nor a site claim it never synced, because it restarted.
        let metrics = metrics::Metrics::new();
        metrics.restore_times(
            meta.log_state(GC_LAST_RUN).await.ok().flatten(),
            meta.log_state(SYNC_LAST_SUCCESS).await.ok().flatten(),
        );
        Ok(Registry {
            storage,
            meta,
            config,
            cache,
            changes: Arc::new(tokio::sync::watch::Sender::new(0)),
            blob_gate: Arc::default(),
            metrics,
            pins: Arc::default(),
            gc_running: Arc::default(),
            unlinked: Arc::default(),
            damage: Arc::default(),
        })
    }

    /// A connected registry's status report went through (`synced`: content was applied):
    /// the metrics, and the time of the sync as in [`Self::sync_succeeded`].
    pub async fn sync_reported(&self, synced: bool, lag: Option<i64>, outbox: Option<i64>) {
        if let Some(now) = self.metrics.sync_reported(synced, lag, outbox)
            && let Err(e) = self.meta.set_log_state(SYNC_LAST_SUCCESS, now).await
        {
            tracing::debug!(error = %e, "could not record the time of the last sync");
        }
    }

    /// Records that a connected registry's sync succeeded now, for the metrics and, at most
    /// once a minute, in the database (so a restart still knows when).
    pub async fn sync_succeeded(&self) {
        if let Some(now) = self.metrics.sync_succeeded()
            && let Err(e) = self.meta.set_log_state(SYNC_LAST_SUCCESS, now).await
        {
            tracing::debug!(error = %e, "could not record the time of the last sync");
        }
    }

    pub fn meta(&self) -> &Meta {
        &self.meta
    }

    /// Whether this registry can serve: its database answers and its blob store (a directory
    /// or an object store) can be read. `Err` says what is wrong, for the readiness endpoint.
    pub async fn ready(&self) -> std::result::Result<(), String> {
        self.meta
            .check()
            .await
            .map_err(|e| format!("the metadata database does not answer: {e}"))?;
        // A probe wants an answer within seconds: a store that hangs (rather than refusing
        // connections) is not ready, whatever it answers a minute later.
        let checked = tokio::time::timeout(std::time::Duration::from_secs(5), self.storage.check())
            .await
            .map_err(|_| {
                format!(
                    "the blob store {} did not answer within 5 s",
                    self.storage.blob_store()
                )
            })?;
        checked.map_err(|e| match e {
            // The store's own answer (endpoint, account, provider message) goes to the log;
            // readiness is asked without credentials.
            StorageError::Remote { .. } => {
                tracing::warn!(error = %e, "the blob store is not ready");
                format!(
                    "the blob store {} does not answer or is not this registry's; the server log \
                     says why",
                    self.storage.blob_store()
                )
            }
            e => format!(
                "the blob store {} cannot be read: {e}",
                self.storage.blob_store()
            ),
        })
    }

    /// Where blobs are kept: the object store's URL, or the local directory.
    pub fn blob_store(&self) -> String {
        self.storage.blob_store()
    }

    pub fn config(&self) -> &RegistryConfig {
        &self.config
    }

    /// This node's Prometheus metrics.
    pub fn metrics(&self) -> &metrics::Metrics {
        &self.metrics
    }

    /// A handle for sync: the changes it makes are marked as coming from the parent, so a
    /// ReadWrite site's outbox does not send them back up.
    pub fn for_sync(&self) -> Registry {
        Registry {
            meta: self.meta.with_origin("sync"),
            ..self.clone()
        }
    }

    /// A handle for changes that stay on this node: marked as local, so a ReadWrite site's
    /// outbox does not send them up (a delete of what the site kept of a repository that
    /// left its scope, which its parent no longer syncs).
    pub fn for_local(&self) -> Registry {
        Registry {
            meta: self.meta.with_origin("local"),
            ..self.clone()
        }
    }

    /// A receiver that changes after every committed manifest or tag change.
    pub fn subscribe(&self) -> tokio::sync::watch::Receiver<u64> {
        self.changes.subscribe()
    }

    /// Holds `blob_gate` shared and, on a PostgreSQL database that replicas share, its
    /// cluster-wide twin: a garbage collection at any replica then waits for the link, or the
    /// link sees what it deleted. Always taken in that order, as the exclusive holds are.
    async fn blob_gate_shared(
        &self,
    ) -> Result<(
        tokio::sync::RwLockReadGuard<'_, ()>,
        Option<outpost_meta::ClusterGate>,
    )> {
        let local = self.blob_gate.read().await;
        let cluster = self.meta.cluster_blob_gate(false).await?;
        Ok((local, cluster))
    }

    /// Ends every wait for a change now (a long-poll then answers with what it has): at
    /// shutdown, so the server stops without waiting out its children's long-polls.
    pub fn wake_waiters(&self) {
        self.changes.send_modify(|n| *n += 1);
    }

    /// Another replica sharing the metadata database changed `repos` (`None`: too many to
    /// name): what this one cached of them is dropped, and sync's long-polls wake up.
    pub fn changed_elsewhere(&self, repos: Option<&[String]>) {
        match repos {
            Some(repos) => {
                for r in repos {
                    self.cache.invalidate(r);
                }
            }
            None => self.cache.clear(),
        }
        self.changes.send_modify(|n| *n += 1);
    }

    fn changed(&self, repo: &RepoName) {
        self.cache.invalidate(repo.as_str());
        self.changes.send_modify(|n| *n += 1);
    }

    pub async fn close(&self) {
        self.meta.close().await;
    }

    // ---- blobs ----------------------------------------------------------------------------

    /// Size of a blob `repo` may serve.
    pub async fn blob_size(&self, repo: &RepoName, digest: &Digest) -> Result<u64> {
        self.meta
            .linked_blob(repo.as_str(), digest)
            .await?
            .ok_or_else(|| RegistryError::BlobUnknown(digest.clone()))
    }

    /// [`Self::blob_size`], also checking that the blob's file is there: a blob the metadata
    /// links whose file is gone (storage damage) is unknown, so a client pushes it again,
    /// which repairs it. Logged as an error.
    pub async fn blob_size_checked(&self, repo: &RepoName, digest: &Digest) -> Result<u64> {
        let size = self.blob_size(repo, digest).await?;
        match self.storage.blob_size(digest).await? {
            None => self.damaged(repo, digest, None, size),
            Some(n) if n != size => self.damaged(repo, digest, Some(n), size),
            Some(_) => return Ok(size),
        }
        Err(RegistryError::BlobUnknown(digest.clone()))
    }

    /// A blob's bytes (or a range of them, resolved by the caller against
    /// [`Self::blob_size`]): memory-mapped from local disk, so nothing is copied until the
    /// socket write, or streamed from the object store.
    pub async fn read_blob(
        &self,
        repo: &RepoName,
        digest: &Digest,
        range: Option<ByteRange>,
    ) -> Result<BlobBody> {
        let size = self.blob_size(repo, digest).await?;
        match self.storage.read_blob(digest, range).await {
            Err(StorageError::BlobUnknown(_)) => {
                self.damaged(repo, digest, None, size);
                Err(RegistryError::BlobUnknown(digest.clone()))
            }
            // A file of another size than the blob (cut short on disk) is answered as
            // unknown, like a missing one, not with a body that ends before its length.
            Ok(BlobBody::Mapped(b)) if range.is_none() && b.len() as u64 != size => {
                self.damaged(repo, digest, Some(b.len() as u64), size);
                Err(RegistryError::BlobUnknown(digest.clone()))
            }
            // The same for an object in a store, whatever the range.
            Ok(BlobBody::Streamed { object_size, .. }) if object_size != size => {
                self.damaged(repo, digest, Some(object_size), size);
                Err(RegistryError::BlobUnknown(digest.clone()))
            }
            Err(e) => match self.storage.blob_size(digest).await {
                Ok(Some(n)) if n != size => {
                    self.damaged(repo, digest, Some(n), size);
                    Err(RegistryError::BlobUnknown(digest.clone()))
                }
                _ => Err(e.into()),
            },
            Ok(body) => Ok(body),
        }
    }

    /// Removes a blob from a repository. The bytes stay while other repositories use them.
    pub async fn delete_blob(&self, repo: &RepoName, digest: &Digest) -> Result<()> {
        if self
            .freeing(|| self.meta.unlink_blob(repo.as_str(), digest))
            .await?
        {
            Ok(())
        } else if !self.meta.repo_exists(repo.as_str()).await? {
            // As a GET of it answers.
            Err(RegistryError::NameUnknown(repo.clone()))
        } else {
            Err(RegistryError::BlobUnknown(digest.clone()))
        }
    }

    /// Links an existing blob from `from` into `repo` (cross-repository mount). Returns its size,
    /// or `None` if `from` does not hold it (the caller then starts a normal upload).
    pub async fn mount_blob(
        &self,
        repo: &RepoName,
        digest: &Digest,
        from: &RepoName,
    ) -> Result<Option<u64>> {
        let _gate = self.blob_gate_shared().await?;
        let Some(size) = self.meta.linked_blob(from.as_str(), digest).await? else {
            return Ok(None);
        };
        // Missing or damaged (another size): not mounted, so the client uploads the blob,
        // which repairs it.
        match self.storage.blob_size(digest).await? {
            Some(n) if n == size => {}
            None => return Ok(None),
            Some(n) => {
                self.damaged(from, digest, Some(n), size);
                return Ok(None);
            }
        }
        self.meta.link_blob(repo.as_str(), digest, size).await?;
        Ok(Some(size))
    }

    /// Links a blob that is already in the local store (under any repository) into `repo`,
    /// so sync never downloads what it has. `size` is what the manifest's descriptor says:
    /// a stored copy of another size (cut short or grown by storage damage) is not linked,
    /// so the caller fetches the blob again, which replaces it. Returns the size, or `None`
    /// if no whole copy is stored.
    pub async fn link_existing_blob(
        &self,
        repo: &RepoName,
        digest: &Digest,
        size: u64,
    ) -> Result<Option<u64>> {
        let _gate = self.blob_gate_shared().await?;
        match self.storage.blob_size(digest).await? {
            None => return Ok(None),
            Some(n) if n != size => {
                tracing::warn!(repository = %repo, %digest, stored = n, size, "a stored blob has another size than its descriptor says (storage damage, or a wrong descriptor); it is fetched again");
                return Ok(None);
            }
            Some(_) => {}
        }
        self.meta.link_blob(repo.as_str(), digest, size).await?;
        Ok(Some(size))
    }

    /// Stores a small blob held in memory (verified against `digest`) and links it into
    /// `repo`. Returns its size.
    pub async fn put_blob(&self, repo: &RepoName, digest: &Digest, bytes: Bytes) -> Result<u64> {
        if let Some(max) = self.config.max_blob_bytes
            && bytes.len() as u64 > max
        {
            return Err(StorageError::TooLarge {
                size: bytes.len() as u64,
                limit: max,
            }
            .into());
        }
        // Received like an upload's bytes (a connected registry's small blobs come this way).
        self.metrics.upload_bytes(bytes.len());
        if self.storage.is_remote() {
            let size = self.storage.put_blob(digest, bytes).await?;
            return self.link_stored(repo, digest, size, None).await;
        }
        let _gate = self.blob_gate_shared().await?;
        let size = self.storage.put_blob(digest, bytes).await?;
        self.meta.link_blob(repo.as_str(), digest, size).await?;
        Ok(size)
    }

    /// Links a blob just written to an object store, outside `blob_gate` (a write there can
    /// take minutes, and garbage collection waiting for the exclusive gate would stall every
    /// push behind it). Under the gate, the object is checked again: a collection could have
    /// deleted an old copy it found unreferenced since. Then the client is told to upload
    /// again (`upload`: the session to report unknown), or sync tries again later.
    async fn link_stored(
        &self,
        repo: &RepoName,
        digest: &Digest,
        size: u64,
        upload: Option<&str>,
    ) -> Result<u64> {
        let _gate = self.blob_gate_shared().await?;
        if self.storage.blob_size(digest).await?.is_none() {
            tracing::warn!(%digest, "a blob was collected while it was being stored; the client uploads it again");
            return Err(match upload {
                Some(id) => RegistryError::UploadUnknown(id.to_string()),
                None => RegistryError::BlobUnknown(digest.clone()),
            });
        }
        self.meta.link_blob(repo.as_str(), digest, size).await?;
        Ok(size)
    }

    // ---- uploads --------------------------------------------------------------------------

    pub async fn start_upload(&self, repo: &RepoName) -> Result<String> {
        let id = self.storage.create_upload(repo.as_str()).await?;
        if let Some(me) = &self.config.replica_url
            && let Err(e) = self.meta.record_upload_replica(&id, me).await
        {
            let _ = self.storage.abort_upload(&id).await;
            return Err(e.into());
        }
        Ok(id)
    }

    /// Where to forward a request for upload `id`: the URL of the replica that holds it, when
    /// that is another replica (`None`: it is here, unknown, or replicas do not forward).
    pub async fn upload_elsewhere(&self, id: &str) -> Result<Option<String>> {
        // Only replicas share a database: elsewhere there is no elsewhere. A replica without
        // a `replica_url` of its own still forwards to the replicas that have one.
        if self.meta.backend() != outpost_meta::Backend::Postgres
            || self.storage.upload_owner(id).await?.is_some()
        {
            return Ok(None);
        }
        let me = self.config.replica_url.as_deref();
        Ok(self
            .meta
            .upload_replica(id)
            .await?
            .filter(|owner| Some(owner.as_str()) != me))
    }

    async fn check_upload(&self, repo: &RepoName, id: &str) -> Result<()> {
        match self.storage.upload_owner(id).await? {
            Some(r) if r == repo.as_str() => Ok(()),
            _ => Err(RegistryError::UploadUnknown(id.to_string())),
        }
    }

    /// An upload committed to the blob store and waiting to be linked into `repo`: its
    /// digest and size.
    fn unlinked_upload(&self, repo: &RepoName, id: &str) -> Option<(Digest, u64)> {
        self.unlinked
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(id)
            .filter(|(r, _, _)| r == repo)
            .map(|(_, d, size)| (d.clone(), *size))
    }

    /// Bytes an upload holds so far.
    pub async fn upload_status(&self, repo: &RepoName, id: &str) -> Result<u64> {
        if let Some((_, size)) = self.unlinked_upload(repo, id) {
            return Ok(size);
        }
        self.check_upload(repo, id).await?;
        self.storage
            .upload_progress(id)
            .await?
            .ok_or_else(|| RegistryError::UploadUnknown(id.to_string()))
    }

    /// Appends a chunk (`start` from `Content-Range`, if given). Returns the new size.
    pub async fn append_upload<S, E>(
        &self,
        repo: &RepoName,
        id: &str,
        start: Option<u64>,
        body: S,
    ) -> Result<u64>
    where
        S: Stream<Item = Result<Bytes, E>> + Send + Unpin,
        E: std::fmt::Display,
    {
        let mut body = body;
        if let Err(e) = self.check_upload(repo, id).await {
            outpost_storage::drain(&mut body).await;
            return Err(e);
        }
        let out = self
            .storage
            .append(id, start, self.config.max_blob_bytes, self.counted(body))
            .await?;
        Ok(out.size)
    }

    /// Completes an upload: appends the final body (if any, at `start` when the client
    /// said where it goes), verifies `digest`, and links the blob into `repo`. Returns the
    /// blob size.
    pub async fn finish_upload<S, E>(
        &self,
        repo: &RepoName,
        id: &str,
        digest: &Digest,
        start: Option<u64>,
        body: Option<S>,
    ) -> Result<u64>
    where
        S: Stream<Item = Result<Bytes, E>> + Send + Unpin,
        E: std::fmt::Display,
    {
        // Committed by an earlier PUT whose link failed: this one (the client trying again)
        // only has to record the link. What it sends again is what the blob already holds,
        // if it hashes to the same digest, which is all a PUT can claim.
        if let Some((committed, size)) = self.unlinked_upload(repo, id) {
            if let Some(mut body) = body {
                outpost_storage::drain(&mut body).await;
            }
            if &committed != digest {
                return Err(RegistryError::DigestMismatch {
                    expected: digest.clone(),
                    actual: committed,
                });
            }
            let size = self.link_stored(repo, digest, size, Some(id)).await?;
            self.unlinked
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .remove(id);
            return Ok(size);
        }
        if let Err(e) = self.check_upload(repo, id).await {
            if let Some(mut body) = body {
                outpost_storage::drain(&mut body).await;
            }
            return Err(e);
        }
        if let Some(body) = body {
            self.storage
                .append(id, start, self.config.max_blob_bytes, self.counted(body))
                .await?;
        }
        // Once every byte is in, the commit runs to its end on a task of its own, even if the
        // client goes away meanwhile: cut between moving the file into the blob store and
        // recording it, it left an upload that still claimed its bytes but could not be
        // completed (404), and a blob no repository could serve.
        let this = self.clone();
        let (repo, task_id, digest) = (repo.clone(), id.to_string(), digest.clone());
        tokio::spawn(async move { this.commit_upload(&repo, &task_id, &digest).await })
            .await
            .map_err(|e| {
                RegistryError::Storage(StorageError::Io {
                    path: self.storage.layout().upload(id),
                    cause: std::io::Error::other(format!("completing the upload: {e}")),
                })
            })?
    }

    async fn commit_upload(&self, repo: &RepoName, id: &str, digest: &Digest) -> Result<u64> {
        let linked = if self.storage.is_remote() {
            let size = self.storage.commit_upload(id, digest).await?;
            self.link_stored(repo, digest, size, Some(id))
                .await
                .map_err(|e| (e, size))
        } else {
            let _gate = self.blob_gate_shared().await?;
            let size = self.storage.commit_upload(id, digest).await?;
            self.meta
                .link_blob(repo.as_str(), digest, size)
                .await
                .map(|()| size)
                .map_err(|e| (e.into(), size))
        };
        match linked {
            Ok(size) => Ok(size),
            // The blob is in the store and the upload closed, but the database did not
            // answer: kept here, so that the client's next try (it was told to retry) links
            // it rather than finding no upload.
            Err((RegistryError::Meta(e), size)) if e.is_unavailable() => {
                let mut unlinked = self.unlinked.lock().unwrap_or_else(|p| p.into_inner());
                if unlinked.len() >= 10_000 {
                    unlinked.clear();
                }
                unlinked.insert(id.to_string(), (repo.clone(), digest.clone(), size));
                Err(RegistryError::Meta(e))
            }
            Err((e, _)) => Err(e),
        }
    }

    /// `body`, counting its bytes in the metrics as they arrive (chunked ones too).
    fn counted<S, E>(&self, body: S) -> impl Stream<Item = Result<Bytes, E>> + Send + Unpin
    where
        S: Stream<Item = Result<Bytes, E>> + Send + Unpin,
    {
        let metrics = self.metrics.clone();
        futures_util::TryStreamExt::inspect_ok(body, move |b| metrics.upload_bytes(b.len()))
    }

    pub async fn cancel_upload(&self, repo: &RepoName, id: &str) -> Result<()> {
        self.check_upload(repo, id).await?;
        match self.storage.abort_upload(id).await {
            Ok(()) | Err(StorageError::UploadUnknown(_)) => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    /// Removes upload sessions untouched for longer than `age`, except those in `keep` (a
    /// connected registry's partial downloads, which wait for the link however long it is
    /// down). Returns how many.
    pub async fn reap_uploads(
        &self,
        age: Duration,
        keep: &std::collections::HashSet<String>,
    ) -> Result<usize> {
        let n = self.storage.reap_uploads(age, keep).await?;
        if let Some(me) = &self.config.replica_url {
            // This replica's sessions that are over (finished, cancelled, reaped) no longer
            // need forwarding; records older than 30 days are of replicas gone for good.
            let mut over = Vec::new();
            for id in self.meta.uploads_of_replica(me).await? {
                if self.storage.upload_owner(&id).await?.is_none() {
                    over.push(id);
                }
            }
            let month = std::time::SystemTime::now()
                .checked_sub(Duration::from_secs(30 * 24 * 3600))
                .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
                .map_or(0, |d| d.as_millis() as i64);
            self.meta.forget_upload_replicas(&over, month).await?;
        }
        if n > 0 {
            tracing::info!(removed = n, "reaped stale upload sessions");
        }
        Ok(n)
    }

    // ---- readiness --------------------------------------------------------------------------

    /// Whether everything `reference` needs is here: for an index, every child manifest it
    /// lists (every platform) and, below each, the config and layers; each blob linked to the
    /// repository and its file present. A site answers "can `app:1.4` run here offline?".
    pub async fn readiness(&self, repo: &RepoName, reference: &Reference) -> Result<Readiness> {
        let top = self.get_manifest(repo, reference).await?;
        let mut out = Readiness {
            digest: top.digest.clone(),
            platforms: Vec::new(),
            manifests: 0,
            blobs: 0,
            bytes: 0,
            missing: Vec::new(),
        };
        let mut seen_manifests = std::collections::HashSet::new();
        let mut seen_blobs = std::collections::HashSet::new();
        // (manifest bytes and type, its digest, the platform it serves)
        let mut todo = vec![(top.content, top.media_type, top.digest, None::<String>)];
        while let Some((content, media_type, digest, platform)) = todo.pop() {
            if !seen_manifests.insert(digest.clone()) {
                continue;
            }
            out.manifests += 1;
            let m = Manifest::parse(&content, Some(&media_type))?;
            if let Some(p) = &platform
                && !out.platforms.contains(p)
            {
                out.platforms.push(p.clone());
            }
            for child in m.required_manifests() {
                let platform = child
                    .platform
                    .as_ref()
                    .map(platform_name)
                    .or(platform.clone());
                match self
                    .meta
                    .manifest_by_digest(repo.as_str(), &child.digest)
                    .await?
                {
                    Some(c) => {
                        todo.push((Bytes::from(c.content), c.media_type, c.digest, platform))
                    }
                    None => out.missing.push(Missing {
                        digest: child.digest.clone(),
                        kind: "manifest",
                        platform,
                    }),
                }
            }
            for blob in m.required_blobs() {
                if !seen_blobs.insert(blob.digest.clone()) {
                    continue;
                }
                out.blobs += 1;
                out.bytes += blob.size;
                let linked = self.meta.linked_blob(repo.as_str(), &blob.digest).await?;
                let stored = match linked {
                    Some(_) => self.storage.blob_size(&blob.digest).await?.is_some(),
                    None => false,
                };
                if !stored {
                    out.missing.push(Missing {
                        digest: blob.digest.clone(),
                        kind: "blob",
                        platform: platform.clone(),
                    });
                }
            }
        }
        out.platforms.sort();
        Ok(out)
    }

    // ---- garbage collection ---------------------------------------------------------------

    /// Deletes blobs that no manifest references and that were last stored or linked more than
    /// `min_age` ago, and files in the blob store that have no record and are that old. The
    /// age spares a push or a sync that has stored its layers and not yet its manifest;
    /// `blob_gate` keeps a concurrent upload, mount or sync from linking a blob while its file
    /// is being removed. Manifests are never removed here.
    pub async fn collect_garbage(&self, min_age: Duration, dry_run: bool) -> Result<GcReport> {
        self.freeing(|| self.collect_garbage_once(min_age, dry_run))
            .await
    }

    async fn collect_garbage_once(&self, min_age: Duration, dry_run: bool) -> Result<GcReport> {
        // One collection at a time (the schedule and `outpost gc` may meet), and one at a
        // time among replicas sharing a database: each lists the whole store.
        let _one = self.gc_running.lock().await;
        let _cluster = self
            .meta
            .cluster_lock(outpost_meta::ClusterLock::Gc)
            .await?;
        let now = std::time::SystemTime::now();
        let cutoff = now.checked_sub(min_age).unwrap_or(std::time::UNIX_EPOCH);
        let cutoff_ms = cutoff
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() as i64)
            .unwrap_or(0);
        let mut report = GcReport {
            dry_run,
            ..Default::default()
        };
        let keep: std::collections::HashSet<String> = self
            .pins
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .keys()
            .map(|d| d.to_string())
            .collect();
        let doomed = self
            .meta
            .collect_unreferenced_blobs(cutoff_ms, dry_run, &keep)
            .await?;
        report.blobs_removed = doomed.len() as u64;
        report.bytes_freed = doomed.iter().map(|(_, s)| *s).sum();
        // Files this run tried and failed to delete are left for the next one, not counted
        // again as orphans below.
        let mut failed = std::collections::HashSet::new();
        if !dry_run {
            let names: Vec<String> = doomed.iter().map(|(d, _)| d.clone()).collect();
            failed = self.delete_unrecorded_files(&names).await?;
            report.files_left += failed.len() as u64;
            report.bytes_freed -= doomed
                .iter()
                .filter(|(d, _)| failed.contains(d))
                .map(|(_, s)| *s)
                .sum::<u64>();
        }
        // Files with no row: a crash between a blob's rename and its row, or between a
        // collection's commit and its deletes.
        let old: Vec<String> = self
            .storage
            .blob_files()
            .await?
            .into_iter()
            .filter(|(_, modified)| *modified <= cutoff)
            .map(|(d, _)| d.to_string())
            .collect();
        let known = self.meta.known_blobs(&old).await?;
        let orphans: Vec<String> = old
            .into_iter()
            .filter(|d| !known.contains(d) && !failed.contains(d))
            .collect();
        let mut sizes = Vec::with_capacity(orphans.len());
        for d in &orphans {
            if let Ok(digest) = d.parse::<Digest>()
                && let Some(size) = self.storage.blob_size(&digest).await?
            {
                sizes.push((d.clone(), size));
            }
        }
        let not_deleted = if dry_run {
            Default::default()
        } else {
            self.delete_unrecorded_files(&orphans).await?
        };
        report.files_left += not_deleted.len() as u64;
        for (d, size) in sizes {
            if !not_deleted.contains(&d) {
                report.bytes_freed += size;
                report.orphan_files_removed += 1;
            }
        }
        if !dry_run {
            let now = self.metrics.gc(
                report.blobs_removed + report.orphan_files_removed,
                report.bytes_freed,
            );
            if let Err(e) = self.meta.set_log_state(GC_LAST_RUN, now).await {
                tracing::debug!(error = %e, "could not record the time of the collection");
            }
        }
        if report.blobs_removed + report.orphan_files_removed > 0 {
            tracing::info!(
                dry_run,
                blobs = report.blobs_removed,
                orphan_files = report.orphan_files_removed,
                bytes = report.bytes_freed,
                "garbage collection"
            );
        }
        Ok(report)
    }

    /// Deletes the files of `digests` that still have no row, a batch at a time under the
    /// exclusive `blob_gate`: an upload, mount or sync that put the blob back since (file and
    /// row, under the shared gate) is seen and left alone, and none waits for the whole run.
    async fn delete_unrecorded_files(
        &self,
        digests: &[String],
    ) -> Result<std::collections::HashSet<String>> {
        // On a shared database every replica's links wait while a batch is deleted: smaller
        // batches there.
        let batch_size = match self.meta.backend() {
            outpost_meta::Backend::Sqlite => 256,
            outpost_meta::Backend::Postgres => 32,
        };
        let mut rest = digests;
        let mut left = std::collections::HashSet::new();
        while !rest.is_empty() {
            let batch = &rest[..rest.len().min(batch_size)];
            let _gate = self.blob_gate.write().await;
            let _cluster = self.meta.cluster_blob_gate(true).await?;
            let known = self.meta.known_blobs(batch).await?;
            // Pushes wait while the gate is held: a slow store (each delete a request, which
            // may take its full timeout) must not hold them for a whole batch. The gate is let
            // go after HOLD_GATE, and the rest of the batch checked again under the next one.
            let held = std::time::Instant::now();
            let mut done = 0;
            for d in batch {
                done += 1;
                if known.contains(d) {
                    continue;
                }
                let Ok(digest) = d.parse::<Digest>() else {
                    tracing::warn!(digest = %d, "a blob with an unparsable digest");
                    continue;
                };
                // No timeout of our own: a delete given up on might still land at the store
                // after the gate is let go, and remove a blob pushed again meanwhile. The
                // store client's own timeouts bound it.
                if let Err(e) = self.storage.delete_blob(&digest).await {
                    // Its row is gone: the file is an orphan the next run removes.
                    left.insert(d.clone());
                    tracing::warn!(%digest, error = %e, "could not delete a collected blob's file; the next collection removes it");
                }
                if held.elapsed() >= HOLD_GATE {
                    break;
                }
            }
            rest = &rest[done..];
        }
        Ok(left)
    }

    /// Keeps `digests` from garbage collection while the returned guard lives: sync holds the
    /// blobs of a manifest it is fetching, which nothing references until it is stored.
    pub fn pin_blobs(&self, digests: impl IntoIterator<Item = Digest>) -> BlobPins {
        let digests: Vec<Digest> = digests.into_iter().collect();
        let mut pins = self.pins.lock().unwrap_or_else(|p| p.into_inner());
        for d in &digests {
            *pins.entry(d.clone()).or_default() += 1;
        }
        BlobPins {
            pins: self.pins.clone(),
            digests,
        }
    }

    // ---- manifests ------------------------------------------------------------------------

    /// Validates and stores a manifest pushed to `repo` under `reference`.
    pub async fn put_manifest(
        &self,
        repo: &RepoName,
        reference: &Reference,
        content_type: Option<&str>,
        bytes: &[u8],
    ) -> Result<PushedManifest> {
        self.put_manifest_if(repo, reference, content_type, bytes, None)
            .await
    }

    /// [`Registry::put_manifest`], but a tag is only set if its current digest meets
    /// `condition` (a client's `If-Match`/`If-None-Match`); nothing is stored otherwise.
    pub async fn put_manifest_if(
        &self,
        repo: &RepoName,
        reference: &Reference,
        content_type: Option<&str>,
        bytes: &[u8],
        condition: Option<&TagCondition>,
    ) -> Result<PushedManifest> {
        if bytes.len() > self.config.max_manifest_bytes {
            return Err(RegistryError::ManifestTooLarge {
                size: bytes.len(),
                limit: self.config.max_manifest_bytes,
            });
        }
        let manifest = Manifest::parse(bytes, content_type)?;
        let (digest, tag) = match reference {
            Reference::Digest(d) => {
                let actual = Digest::of(d.algorithm(), bytes);
                if &actual != d {
                    return Err(RegistryError::DigestMismatch {
                        expected: d.clone(),
                        actual,
                    });
                }
                (actual, None)
            }
            Reference::Tag(t) => (Digest::sha256_of(bytes), Some(t.as_str())),
        };
        let annotations = manifest
            .annotations
            .as_ref()
            .filter(|a| !a.is_empty())
            .and_then(|a| serde_json::to_string(a).ok());
        let artifact_type = manifest.effective_artifact_type();
        let subject = manifest.subject.as_ref().map(|s| s.digest.clone());
        let result = self
            .meta
            .put_manifest(NewManifest {
                repo: repo.as_str(),
                digest: &digest,
                media_type: &manifest.media_type,
                artifact_type: artifact_type.as_deref(),
                subject: subject.as_ref(),
                annotations,
                content: bytes,
                tag,
                tag_condition: condition,
                blobs: manifest.required_blobs().map(|d| &d.digest).collect(),
                children: manifest.required_manifests().map(|d| &d.digest).collect(),
            })
            .await;
        match result {
            Ok(outcome) => {
                if outcome.tag_changed || outcome.manifest_created {
                    self.changed(repo);
                }
                Ok(PushedManifest {
                    digest,
                    subject,
                    replaced: outcome.replaced,
                    log_position: outcome.log_position,
                })
            }
            Err(MetaError::MissingBlob(d)) => Err(RegistryError::ManifestBlobUnknown(d)),
            Err(MetaError::MissingManifest(d)) => Err(RegistryError::ManifestChildUnknown(d)),
            Err(e) => Err(e.into()),
        }
    }

    pub async fn get_manifest(
        &self,
        repo: &RepoName,
        reference: &Reference,
    ) -> Result<StoredManifest> {
        let key = reference.to_string();
        if let Some(m) = self.cache.get(repo.as_str(), &key) {
            return Ok(m);
        }
        let generation = self.cache.generation();
        let found = match reference {
            Reference::Tag(t) => self.meta.manifest_by_tag(repo.as_str(), t.as_str()).await?,
            Reference::Digest(d) => self.meta.manifest_by_digest(repo.as_str(), d).await?,
        };
        match found {
            Some(m) => {
                let m = CachedManifest {
                    digest: m.digest,
                    media_type: m.media_type,
                    content: Bytes::from(m.content),
                };
                self.cache
                    .insert(generation, repo.as_str(), &key, m.clone());
                Ok(m)
            }
            None if !self.meta.repo_exists(repo.as_str()).await? => {
                Err(RegistryError::NameUnknown(repo.clone()))
            }
            None => Err(RegistryError::ManifestUnknown(reference.to_string())),
        }
    }

    /// Deletes a manifest (by digest, with every tag pointing at it) or just a tag, for a
    /// client. A manifest that an index of the repository lists is kept
    /// ([`RegistryError::ManifestReferenced`]). For a tag, returns where the removal stands in
    /// the event log (as [`PushedManifest::log_position`]).
    pub async fn delete_manifest(
        &self,
        repo: &RepoName,
        reference: &Reference,
    ) -> Result<Option<i64>> {
        self.delete(repo, reference, true).await
    }

    /// Deletes as the parent did, for sync: also a manifest that an index here still lists
    /// (the parent deleted that index too, earlier in its log, or a reconciliation removes it
    /// in the same pass).
    pub async fn follow_deletion(
        &self,
        repo: &RepoName,
        reference: &Reference,
    ) -> Result<Option<i64>> {
        self.delete(repo, reference, false).await
    }

    async fn delete(
        &self,
        repo: &RepoName,
        reference: &Reference,
        unless_listed: bool,
    ) -> Result<Option<i64>> {
        let found = self
            .freeing(|| async {
                Ok::<_, outpost_meta::MetaError>(match reference {
                    Reference::Digest(d) => self
                        .meta
                        .delete_manifest(repo.as_str(), d, unless_listed)
                        .await?
                        .map(|_| None),
                    Reference::Tag(t) => self
                        .meta
                        .delete_tag(repo.as_str(), t.as_str())
                        .await?
                        .map(Some),
                })
            })
            .await?;
        self.changed(repo);
        match found {
            Some(f) => Ok(f),
            // As a GET of it answers.
            None if !self.meta.repo_exists(repo.as_str()).await? => {
                Err(RegistryError::NameUnknown(repo.clone()))
            }
            None => Err(RegistryError::ManifestUnknown(reference.to_string())),
        }
    }

    /// Deletes a whole repository (tags, manifests, blob links).
    pub async fn delete_repository(&self, repo: &RepoName) -> Result<bool> {
        let existed = self
            .freeing(|| self.meta.delete_repository(repo.as_str()))
            .await?;
        self.changed(repo);
        Ok(existed)
    }

    // ---- room on a full disk ------------------------------------------------------------

    /// Runs `op`, a change that frees space (a delete, a collection); when the disk is too
    /// full even for its database transaction, releases the data directory's reserve (and the
    /// write-ahead log's leftover growth) and runs it once more. Deleting is how an operator
    /// makes room, so it must not need room itself.
    async fn freeing<T, E, F, Fut>(&self, op: F) -> Result<T>
    where
        F: Fn() -> Fut,
        Fut: std::future::Future<Output = std::result::Result<T, E>>,
        E: Into<RegistryError>,
    {
        match op().await.map_err(Into::into) {
            Err(e) if e.is_disk_full() && self.storage.release_reserve().await? => {
                tracing::warn!(
                    "the disk is full: released the data directory's reserve so that a delete \
                     can go through; it is taken again once the disk has room"
                );
                if let Err(e) = self.meta.truncate_wal().await {
                    tracing::debug!(error = %e, "truncating the write-ahead log failed");
                }
                op().await.map_err(Into::into)
            }
            r => r,
        }
    }

    /// Keeps room for deletes on the data directory's disk (SQLite only: a PostgreSQL
    /// database lives elsewhere): takes the reserve when the disk has room to spare, gives a
    /// failed transaction's write-ahead log growth back when it is short, and says so in the
    /// log when the disk runs out of space or inodes. Returns whether the disk is short of room
    /// now. Called every few seconds by the server.
    pub async fn keep_headroom(&self, was_short: bool) -> bool {
        if self.meta.backend() != outpost_meta::Backend::Sqlite {
            return false;
        }
        let room = match self.storage.disk_room() {
            Ok(r) => r,
            Err(e) => {
                tracing::debug!(error = %e, "could not read the data directory's free space");
                return was_short;
            }
        };
        let reserve = outpost_storage::RESERVE_MAX.min(room.size / 32);
        let no_inodes = room.inodes_free == Some(0);
        let short = room.free < reserve.saturating_mul(2) || no_inodes;
        if short {
            if !was_short {
                tracing::warn!(
                    free_bytes = room.free,
                    free_inodes = %room
                        .inodes_free
                        .map_or_else(|| "unknown".to_string(), |n| n.to_string()),
                    "the data directory's disk is {}: pushes and syncs fail until an operator \
                     frees room (deleting images and `outpost gc` work while it is full)",
                    if no_inodes { "out of inodes" } else { "full" }
                );
            }
            let wal = self.storage.layout().root().join("meta.db-wal");
            if std::fs::metadata(&wal).is_ok_and(|m| m.len() > 0)
                && let Err(e) = self.meta.truncate_wal().await
            {
                tracing::debug!(error = %e, "truncating the write-ahead log failed");
            }
        } else if was_short {
            tracing::info!(
                free_bytes = room.free,
                "the data directory's disk has room again"
            );
        }
        if let Err(e) = self.storage.keep_reserve().await {
            tracing::debug!(error = %e, "could not take the data directory's reserve");
        }
        short
    }

    // ---- discovery ------------------------------------------------------------------------

    pub async fn tags(
        &self,
        repo: &RepoName,
        n: Option<u32>,
        last: Option<&str>,
    ) -> Result<Vec<String>> {
        self.meta
            .tags(repo.as_str(), n, last)
            .await?
            .ok_or_else(|| RegistryError::NameUnknown(repo.clone()))
    }

    pub async fn catalog(&self, n: Option<u32>, last: Option<&str>) -> Result<Vec<String>> {
        Ok(self.meta.catalog(n, last).await?)
    }

    /// Digests of the manifests `repo` holds, tagged or not, after `last` in byte order, at
    /// most `n` (see `outpost_meta::Meta::manifest_digests`).
    pub async fn manifest_digests(
        &self,
        repo: &RepoName,
        n: u32,
        last: &str,
    ) -> Result<Vec<String>> {
        Ok(self.meta.manifest_digests(repo.as_str(), n, last).await?)
    }

    /// The referrers index of `subject` in `repo` (an OCI image index, empty when there are
    /// none), optionally filtered to one artifact type.
    pub async fn referrers(
        &self,
        repo: &RepoName,
        subject: &Digest,
        artifact_type: Option<&str>,
    ) -> Result<Vec<u8>> {
        let refs = self
            .meta
            .referrers(repo.as_str(), subject, artifact_type)
            .await?;
        let manifests: Vec<Descriptor> = refs
            .into_iter()
            .map(|r| Descriptor {
                media_type: r.media_type,
                digest: r.digest,
                size: r.size,
                urls: None,
                artifact_type: r.artifact_type,
                annotations: r.annotations.and_then(|a| serde_json::from_str(&a).ok()),
                platform: None,
            })
            .collect();
        let index = serde_json::json!({
            "schemaVersion": 2,
            "mediaType": OCI_INDEX,
            "manifests": manifests,
        });
        Ok(serde_json::to_vec(&index).unwrap_or_default())
    }
}

impl Registry {
    /// A blob the metadata links has no file (`on_disk` is `None`: a disk error, a file
    /// deleted by hand) or a file of `on_disk` bytes where the blob has `size` (cut short):
    /// storage damage. It is answered as unknown, so the next push of it repairs it; at a
    /// connected registry it is also kept for the sync to fetch again from the parent.
    fn damaged(&self, repo: &RepoName, digest: &Digest, on_disk: Option<u64>, size: u64) {
        use std::sync::atomic::Ordering::Relaxed;
        self.metrics.blob_damaged();
        let repaired = self.damage.wanted.load(Relaxed);
        let until = match repaired {
            true => "until it is fetched again from the parent",
            false => "until it is pushed again",
        };
        let log = {
            let mut logged = self.damage.logged.lock().unwrap_or_else(|p| p.into_inner());
            let now = std::time::Instant::now();
            if logged.len() >= DAMAGE_KEPT {
                logged.retain(|_, t| now.duration_since(*t) < DAMAGE_LOG_EVERY);
            }
            match logged.get(digest) {
                Some(t) if now.duration_since(*t) < DAMAGE_LOG_EVERY => false,
                _ => {
                    logged.insert(digest.clone(), now);
                    true
                }
            }
        };
        match on_disk {
            _ if !log => {}
            None => {
                tracing::error!(repository = %repo, %digest, "a linked blob has no file in the store (storage damage); it is answered as unknown {until}")
            }
            Some(n) => {
                tracing::error!(repository = %repo, %digest, on_disk = n, size, "a linked blob's file has the wrong size (storage damage); it is answered as unknown {until}")
            }
        }
        if repaired {
            self.keep_for_repair(repo, digest, size);
        }
    }

    /// Keeps damaged blob `digest` for [`Self::take_damaged`] and wakes the sync.
    fn keep_for_repair(&self, repo: &RepoName, digest: &Digest, size: u64) {
        let mut found = self.damage.found.lock().unwrap_or_else(|p| p.into_inner());
        if found.len() < DAMAGE_KEPT && !found.contains_key(digest) {
            found.insert(digest.clone(), (repo.clone(), size));
            self.damage.notify.notify_one();
        }
    }

    /// Hashes the stored copy of blob `digest`, read whole: only for a copy found suspect
    /// (its parent refused it as not matching its digest). A copy that does not hash to its
    /// digest (damage that kept its size: flipped bits, zeroed sectors) is deleted, logged and
    /// counted as storage damage, so from now on it is answered as unknown and the next push
    /// of it (at a connected registry, a fetch from the parent) replaces it. Returns whether
    /// the copy was whole.
    pub async fn verify_stored_blob(&self, repo: &RepoName, digest: &Digest) -> Result<bool> {
        use futures_util::StreamExt as _;
        let actual = match self.storage.read_blob(digest, None).await? {
            BlobBody::Mapped(bytes) => {
                let algorithm = digest.algorithm();
                tokio::task::spawn_blocking(move || Digest::of(algorithm, &bytes))
                    .await
                    .map_err(|e| StorageError::Io {
                        path: self.storage.layout().blob(digest),
                        cause: std::io::Error::other(e),
                    })?
            }
            BlobBody::Streamed { mut stream, .. } => {
                let mut hasher = outpost_oci::Digester::new(digest.algorithm());
                while let Some(piece) = stream.next().await {
                    hasher.update(&piece.map_err(|e| StorageError::Io {
                        path: self.storage.layout().blob(digest),
                        cause: e,
                    })?);
                }
                hasher.finish()
            }
        };
        if &actual == digest {
            return Ok(true);
        }
        self.metrics.blob_damaged();
        tracing::error!(repository = %repo, %digest, %actual, "a stored blob does not hash to its digest (storage damage that kept its size); it is removed and answered as unknown until it arrives again");
        {
            let _gate = self.blob_gate_shared().await?;
            self.storage.delete_blob(digest).await?;
        }
        if self
            .damage
            .wanted
            .load(std::sync::atomic::Ordering::Relaxed)
        {
            let size = self.blob_size(repo, digest).await.unwrap_or_default();
            self.keep_for_repair(repo, digest, size);
        }
        Ok(false)
    }

    /// Whether the store holds a whole copy of blob `digest` (`size` bytes), linked or not.
    pub async fn holds_blob(&self, digest: &Digest, size: u64) -> Result<bool> {
        Ok(self.storage.blob_size(digest).await? == Some(size))
    }

    /// Called by a connected registry's sync: from now on, blobs found damaged are kept for
    /// [`Self::take_damaged`].
    pub fn repair_from_parent(&self) {
        self.damage
            .wanted
            .store(true, std::sync::atomic::Ordering::Relaxed);
    }

    /// The blobs found damaged since the last call: a repository that links each, the digest
    /// and the size its metadata records.
    pub fn take_damaged(&self) -> Vec<(RepoName, Digest, u64)> {
        let mut found = self.damage.found.lock().unwrap_or_else(|p| p.into_inner());
        found.drain().map(|(d, (r, n))| (r, d, n)).collect()
    }

    /// Returns once a damaged blob was found since the last [`Self::take_damaged`] (at once if
    /// one was found while no one waited).
    pub async fn damage_found(&self) {
        self.damage.notify.notified().await;
    }
}
