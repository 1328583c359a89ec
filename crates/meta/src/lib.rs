//! `outpost-meta` is the only crate that speaks SQL. It stores repositories, manifests (the exact
//! bytes), tags, which blobs each repository may serve, and the event log, in SQLite (WAL mode)
//! through `sqlx`.
//!
//! Invariants: every state change — tag set or removed, manifest put or deleted — is appended to
//! `events` in the same transaction as the change. A manifest is inserted only after checking,
//! inside that transaction, that every blob and child manifest it references is present in the
//! repository, so a concurrent delete cannot slip between the check and the insert. All writes go
//! through one connection, so writers never see `SQLITE_BUSY`.

mod access;
mod connected;
mod notifications;
mod schema;

pub use access::{AccessWrite, PasswordRow, ScopeMapRow, TokenRow};
pub use connected::ConnectedRegistryRow;
pub use notifications::NotificationRow;

use outpost_oci::Digest;
use sqlx::AnyPool;
use sqlx::any::AnyPoolOptions;
use sqlx::{Connection as _, Executor, Row, TransactionManager as _};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum MetaError {
    /// The cause is part of this error's text, not its `source()`: reports that print the
    /// chain (`anyhow`'s `{:#}`) would otherwise repeat it.
    #[error("metadata database error: {0}")]
    Db(sqlx::Error),
    #[error("blob {0} is not in the repository")]
    MissingBlob(Digest),
    #[error("manifest {0} is not in the repository")]
    MissingManifest(Digest),
    /// A manifest could not be deleted because an index in its repository lists it.
    #[error("manifest {digest} is listed by index {index}")]
    ManifestListed {
        digest: Digest,
        index: String,
        /// The index's tags, for the message.
        tags: Vec<String>,
    },
    /// A conditional tag write (`If-Match`/`If-None-Match`) whose condition did not hold.
    #[error("tag {tag} {found}, so the condition of this push does not hold ({wanted})")]
    TagCondition {
        tag: String,
        /// What the tag is now: `points at sha256:…` or `does not exist`.
        found: String,
        /// The condition, as the client sent it.
        wanted: String,
    },
    #[error("metadata database holds an invalid value: {0}")]
    Corrupt(String),
    /// The SQLite file is not a database, or a damaged one.
    #[error(
        "the metadata database {path} is damaged ({cause}): restore it from a backup \
         (docs/storage-layout.md, \"Backing up and restoring\"); a connected registry can \
         instead start on an empty data directory and fetch everything again from its parent"
    )]
    Damaged { path: String, cause: String },
    /// A planned change no longer fits the rows it was planned on.
    #[error("metadata changed while a change was planned: {0}")]
    Stale(String),
    /// The database cannot be used as configured (a bad URL, a newer schema).
    #[error("metadata database: {0}")]
    Config(String),
}

impl From<sqlx::Error> for MetaError {
    fn from(e: sqlx::Error) -> Self {
        MetaError::Db(e)
    }
}

impl MetaError {
    /// Whether a value could not be stored or compared because it holds text the database
    /// refuses: PostgreSQL's text cannot hold a NUL character (SQLSTATE 22021).
    pub fn is_invalid_text(&self) -> bool {
        match self {
            MetaError::Db(sqlx::Error::Database(e)) => e
                .try_downcast_ref::<sqlx::postgres::PgDatabaseError>()
                .is_some_and(|pg| matches!(pg.code(), "22021" | "22P05")),
            _ => false,
        }
    }

    /// Whether the database could not be reached at all (not a refused statement): its
    /// server is down, unreachable or out of connections. Worth trying again later.
    pub fn is_unavailable(&self) -> bool {
        match self {
            MetaError::Db(
                sqlx::Error::Io(_)
                | sqlx::Error::Tls(_)
                | sqlx::Error::PoolTimedOut
                | sqlx::Error::PoolClosed
                | sqlx::Error::WorkerCrashed,
            ) => true,
            // 57P01-57P03: the server is shutting down or starting; 08xxx: connection failures;
            // 25P03: this session stalled inside a transaction and the server ended it.
            MetaError::Db(sqlx::Error::Database(e)) => e
                .try_downcast_ref::<sqlx::postgres::PgDatabaseError>()
                .is_some_and(|pg| {
                    pg.code().starts_with("57P")
                        || pg.code().starts_with("08")
                        || pg.code() == "25P03"
                }),
            _ => false,
        }
    }

    /// What an unavailable database's error means, for the log, where the driver's own words
    /// do not say it: a pool that timed out hides why no connection could be opened.
    pub fn unavailable_hint(&self) -> Option<&'static str> {
        match self {
            MetaError::Db(sqlx::Error::PoolTimedOut) => Some(
                "no connection to the database within 5 s: it refuses connections (stopped or \
                 restarting), does not answer (network, firewall), or every connection of this \
                 server's pool is in use",
            ),
            MetaError::Db(sqlx::Error::Io(_)) => {
                Some("the connection to the database failed (stopped, restarted or unreachable)")
            }
            _ => None,
        }
    }

    /// Whether the database could not be written because its disk (or quota) is full.
    pub fn is_disk_full(&self) -> bool {
        match self {
            MetaError::Db(sqlx::Error::Database(e)) => {
                if e.try_downcast_ref::<sqlx::postgres::PgDatabaseError>()
                    .is_some()
                {
                    // SQLSTATE 53100: disk_full.
                    e.code().as_deref() == Some("53100")
                } else {
                    e.code()
                        .and_then(|c| c.parse::<i32>().ok())
                        .is_some_and(sqlite_code_means_full)
                }
            }
            MetaError::Db(sqlx::Error::Io(e)) => is_disk_full(e),
            _ => false,
        }
    }
}

/// Whether an SQLite result code says the disk is full: `SQLITE_FULL` (13, with any extended
/// code, which keeps the primary one in the low byte), or `SQLITE_IOERR_SHMSIZE` (4874),
/// which SQLite reports when growing the WAL index in `meta.db-shm` fails, on Linux when its
/// file system is full (seen on a full tmpfs).
fn sqlite_code_means_full(code: i32) -> bool {
    code & 0xff == 13 || code == 4874
}

/// Whether an I/O error says the disk or the quota is full.
pub fn is_disk_full(e: &std::io::Error) -> bool {
    matches!(
        e.kind(),
        std::io::ErrorKind::StorageFull | std::io::ErrorKind::QuotaExceeded
    )
}

pub type Result<T, E = MetaError> = std::result::Result<T, E>;

/// Counts of what a node stores ([`Meta::summary`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Summary {
    pub repositories: u64,
    pub tags: u64,
    pub manifests: u64,
    pub blobs: u64,
    pub blob_bytes: u64,
}

/// A stored manifest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ManifestRecord {
    pub digest: Digest,
    pub media_type: String,
    pub content: Vec<u8>,
}

/// A manifest whose `subject` is some digest, as the referrers API lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Referrer {
    pub digest: Digest,
    pub media_type: String,
    pub size: u64,
    pub artifact_type: Option<String>,
    /// JSON object of the manifest's annotations, if it had any.
    pub annotations: Option<String>,
}

/// Everything `put_manifest` needs to store one manifest.
#[derive(Debug, Clone)]
pub struct NewManifest<'a> {
    pub repo: &'a str,
    pub digest: &'a Digest,
    pub media_type: &'a str,
    pub artifact_type: Option<&'a str>,
    pub subject: Option<&'a Digest>,
    pub annotations: Option<String>,
    pub content: &'a [u8],
    pub tag: Option<&'a str>,
    /// Only if the tag's current digest meets this (an HTTP conditional request).
    pub tag_condition: Option<&'a TagCondition>,
    /// Blobs that must already be linked to the repository.
    pub blobs: Vec<&'a Digest>,
    /// Manifests that must already be in the repository.
    pub children: Vec<&'a Digest>,
}

/// The conditions of an HTTP conditional request (`If-Match`, `If-None-Match`; RFC 9110
/// §13.1) on a tag, whose entity tag is the digest it points at. Each is a list of digests,
/// or `*` for any: `If-Match` holds when the tag exists and points at one of them,
/// `If-None-Match` when it does not.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TagCondition {
    pub if_match: Option<Vec<String>>,
    pub if_none_match: Option<Vec<String>>,
}

impl TagCondition {
    /// Whether a tag now pointing at `current` (or absent) meets the condition.
    pub fn holds(&self, current: Option<&str>) -> bool {
        let matches =
            |list: &Vec<String>| current.is_some_and(|c| list.iter().any(|e| e == "*" || e == c));
        self.if_match.as_ref().is_none_or(matches)
            && !self.if_none_match.as_ref().is_some_and(matches)
    }

    /// The condition as the client wrote it, for messages.
    pub fn describe(&self) -> String {
        let mut parts = Vec::new();
        if let Some(l) = &self.if_match {
            parts.push(format!("If-Match: {}", l.join(", ")));
        }
        if let Some(l) = &self.if_none_match {
            parts.push(format!("If-None-Match: {}", l.join(", ")));
        }
        parts.join("; ")
    }
}

/// What `put_manifest` changed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PutOutcome {
    pub manifest_created: bool,
    pub tag_changed: bool,
    /// What the tag pointed at before this put moved it (read in the same transaction).
    pub replaced: Option<String>,
    /// The newest event in the log once this put committed (its own, or the one before it
    /// when it changed nothing): every earlier event for the tag is superseded by this put.
    pub log_position: i64,
}

/// One entry of the event log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    pub seq: i64,
    pub at_ms: i64,
    pub repo: String,
    pub kind: String,
    pub tag: Option<String>,
    pub digest: Option<String>,
    pub media_type: Option<String>,
    /// `None` for a client's change, `Some("sync")` for one applied from a parent.
    pub origin: Option<String>,
}

pub const EVENT_MANIFEST_PUT: &str = "manifest_put";
pub const EVENT_MANIFEST_DELETED: &str = "manifest_deleted";
pub const EVENT_TAG_SET: &str = "tag_set";
pub const EVENT_TAG_REMOVED: &str = "tag_removed";
pub const EVENT_REPOSITORY_DELETED: &str = "repository_deleted";

pub(crate) fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// `$1,$2,…,$n`: the placeholders of an `IN (…)` list of `n` values.
fn placeholders(n: usize) -> String {
    (1..=n)
        .map(|i| format!("${i}"))
        .collect::<Vec<_>>()
        .join(",")
}

/// An insert of `columns` (a comma-separated list whose first column is the key) into
/// `table` that replaces every other column of a row with the same key.
pub(crate) fn upsert(table: &str, columns: &str) -> String {
    let names: Vec<&str> = columns.split(',').map(str::trim).collect();
    let values = placeholders(names.len());
    let set: Vec<String> = names[1..]
        .iter()
        .map(|c| format!("{c} = excluded.{c}"))
        .collect();
    format!(
        "INSERT INTO {table} ({columns}) VALUES ({values}) ON CONFLICT ({}) DO UPDATE SET {}",
        names[0],
        set.join(", ")
    )
}

fn parse_digest(s: &str) -> Result<Digest> {
    s.parse()
        .map_err(|e| MetaError::Corrupt(format!("digest {s:?}: {e}")))
}

/// Which database holds the metadata.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// `meta.db` in the data directory: one process owns it.
    Sqlite,
    /// A PostgreSQL database, which several replicas of one registry may share.
    Postgres,
}

/// Creates the database `name` (letters, digits and `_` only) on the PostgreSQL server that
/// `server_url` reaches, and returns the URL of the new database. For tests and first setup.
pub async fn create_postgres_database(server_url: &str, name: &str) -> Result<String> {
    use sqlx::Connection;
    sqlx::any::install_default_drivers();
    if name.is_empty() || !name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_') {
        return Err(MetaError::Config(format!(
            "{name:?} is not a plain database name"
        )));
    }
    let mut url = url::Url::parse(server_url)
        .map_err(|e| MetaError::Config(format!("{}: {e}", redact_url(server_url))))?;
    let mut conn = sqlx::AnyConnection::connect(server_url).await?;
    conn.execute(format!("CREATE DATABASE {name}").as_str())
        .await?;
    conn.close().await?;
    url.set_path(&format!("/{name}"));
    Ok(url.to_string())
}

/// The metadata store.
#[derive(Clone)]
pub struct Meta {
    pub(crate) read: AnyPool,
    pub(crate) write: AnyPool,
    /// PostgreSQL only: connections that hold the cluster blob gate, apart from `write` so a
    /// hold waiting for a write connection can never starve the writes it waits for.
    gates: Option<LockPool>,
    /// PostgreSQL only: connections that hold a [`ClusterLock`] (apart from the gate's, so a
    /// long garbage collection never keeps an administrator waiting).
    locks: Option<LockPool>,
    backend: Backend,
    /// Recorded with every event this handle writes: `None` for changes made by clients,
    /// `Some("sync")` for changes applied from a parent (which a ReadWrite site must not send
    /// back up).
    origin: Option<&'static str>,
}

type Tx<'c> = sqlx::Transaction<'c, sqlx::Any>;

/// The key of the PostgreSQL advisory lock that every writing transaction takes first, so
/// writes from all replicas commit one at a time, in the order their events are numbered
/// (a reader of the event log never sees event `n + 1` before event `n`). The value is
/// arbitrary: "outpost" in ASCII.
const PG_WRITE_LOCK: i64 = 0x006f_7574_706f_7374;

/// How long a PostgreSQL connection may take, and how long a request waits for a free one
/// before it is answered 503 (the database is down or overloaded).
const PG_CONNECT: Duration = Duration::from_secs(5);

/// The advisory lock behind [`Meta::cluster_blob_gate`] ("blobgate" in ASCII).
const PG_BLOB_GATE: i64 = 0x626c_6f62_6761_7465;

/// Locks that replicas sharing a PostgreSQL database take around work only one of them may
/// do at a time. The values are arbitrary, distinct advisory-lock keys.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(i64)]
pub enum ClusterLock {
    /// Control-plane changes that read rows, plan and write them back (token limits, a
    /// connected registry with its tokens and scope maps).
    Control = 0x6f75_7470_0001,
    /// Delivering notifications to the webhook: one replica per batch, in order.
    Webhook = 0x6f75_7470_0002,
    /// A garbage collection: one replica at a time (each lists the whole store).
    Gc = 0x6f75_7470_0003,
}

/// A hold on the cluster-wide blob gate ([`Meta::cluster_blob_gate`]): a transaction on a
/// connection of its own that holds an advisory lock until it is dropped (rolled back).
pub struct ClusterGate {
    _tx: Tx<'static>,
    _turn: tokio::sync::OwnedSemaphorePermit,
}

/// A pool of connections that hold advisory locks, with a queue in front of it: a caller
/// waits for its turn in the queue for as long as it takes (a lock may be held for minutes),
/// and then for a connection only as long as opening one takes, so a database that is down
/// is a 503 within seconds rather than a wait without end.
#[derive(Clone)]
struct LockPool {
    pool: AnyPool,
    queue: Arc<tokio::sync::Semaphore>,
}

impl LockPool {
    fn new(pool: AnyPool, size: u32) -> LockPool {
        LockPool {
            pool,
            queue: Arc::new(tokio::sync::Semaphore::new(size as usize)),
        }
    }

    async fn begin(&self) -> Result<(Tx<'static>, tokio::sync::OwnedSemaphorePermit)> {
        let turn = self
            .queue
            .clone()
            .acquire_owned()
            .await
            .map_err(|_| MetaError::Db(sqlx::Error::PoolClosed))?;
        Ok((self.pool.begin().await?, turn))
    }
}

/// Whether `url` names a PostgreSQL database (`postgres://` or `postgresql://`).
pub fn is_postgres_url(url: &str) -> bool {
    let lower = url.get(..13).unwrap_or(url).to_ascii_lowercase();
    lower.starts_with("postgres://") || lower.starts_with("postgresql://")
}

/// `url` with any password replaced by `***`, for messages and logs.
///
/// Works on the text, not on a parsed URL: a password with an unescaped `/` or `@` would
/// make a parser read part of it as the host or the path, and show it.
pub fn redact_url(url: &str) -> String {
    let Some(i) = url.find("://") else {
        return "(not a URL)".to_string();
    };
    let (scheme, rest) = (&url[..i + 3], &url[i + 3..]);
    // Everything up to the last `@` is user information (a `@` in the query hides more than
    // needed, never less).
    let (user, host) = match rest.rfind('@') {
        Some(at) => {
            let info = &rest[..at];
            let user = info.split([':', '/', '?']).next().unwrap_or_default();
            // Anything beyond a plain user name (a password, or a query with an `@` in it)
            // is hidden.
            let masked = if info.len() > user.len() {
                format!("{user}:***@")
            } else {
                format!("{user}@")
            };
            (masked, &rest[at + 1..])
        }
        None => (String::new(), rest),
    };
    // Query parameters may carry a password too (`?password=`).
    let host = match host.find('?') {
        Some(q) => format!("{}?***", &host[..q]),
        None => host.to_string(),
    };
    format!("{scheme}{user}{host}")
}

/// Pool options shared by every pool. A wait for a connection is normal under a burst of
/// pulls (thousands at once share a few readers): sqlx's warning for each one that waited
/// over 2 s flooded the log, so it is logged at debug level.
fn pool_options() -> AnyPoolOptions {
    AnyPoolOptions::new().acquire_slow_level(log::LevelFilter::Debug)
}

/// The `sqlite://` URL of the file at `path`, every byte that is not plainly safe escaped.
fn sqlite_url(path: &Path, mode: &str) -> Result<String> {
    let abs = std::path::absolute(path)
        .map_err(|e| MetaError::Config(format!("{}: {e}", path.display())))?;
    let text = abs.to_str().ok_or_else(|| {
        MetaError::Config(format!(
            "the data directory path {} is not valid UTF-8",
            abs.display()
        ))
    })?;
    const SAFE: &percent_encoding::AsciiSet = &percent_encoding::NON_ALPHANUMERIC
        .remove(b'/')
        .remove(b'-')
        .remove(b'_')
        .remove(b'.');
    Ok(format!(
        "sqlite://{}?mode={mode}",
        percent_encoding::utf8_percent_encode(text, SAFE)
    ))
}

/// The settings each SQLite connection starts with.
const SQLITE_PRAGMAS: &str =
    // WAL + NORMAL: a process crash loses nothing and nothing is ever corrupted; an OS crash or
    // power cut may lose the last transactions (clients re-push). FULL would cost an fsync per
    // blob link, which halves small-layer push throughput.
    // The WAL file is cut back to 16 MiB after a checkpoint: a large transaction would
    // otherwise leave it at its peak until the process stops.
    "PRAGMA busy_timeout = 30000; PRAGMA foreign_keys = ON; PRAGMA synchronous = NORMAL; \
     PRAGMA temp_store = MEMORY; PRAGMA cache_size = -16000; \
     PRAGMA journal_size_limit = 16777216;";

impl Meta {
    /// Whether the database answers a query (for the readiness endpoint).
    pub async fn check(&self) -> Result<()> {
        sqlx::query_scalar::<_, i64>("SELECT count(*) FROM repositories")
            .fetch_one(&self.read)
            .await?;
        Ok(())
    }

    /// Gives the SQLite write-ahead log's space back to the disk: a checkpoint that truncates
    /// it to nothing. A transaction that failed on a full disk (and was rolled back) leaves the
    /// log at the size it grew to, up to `journal_size_limit`, holding the space the disk
    /// lacks; nothing else would give it back before the next checkpoint. PostgreSQL: nothing
    /// to do.
    pub async fn truncate_wal(&self) -> Result<()> {
        if self.backend == Backend::Sqlite {
            sqlx::query("PRAGMA wal_checkpoint(TRUNCATE)")
                .execute(&self.write)
                .await?;
        }
        Ok(())
    }

    /// Which database this is.
    pub fn backend(&self) -> Backend {
        self.backend
    }

    /// Opens (creating and migrating if needed) the SQLite database at `path`.
    pub async fn open(path: &Path) -> Result<Meta> {
        sqlx::any::install_default_drivers();
        // A damaged file fails every connection a pool opens, and the pool retries until its
        // acquire timeout and then reports only that it timed out: one connection first says
        // what is wrong, at once.
        {
            use sqlx::Connection as _;
            let damaged = |e: sqlx::Error| match e.as_database_error() {
                Some(d)
                    if matches!(d.code().as_deref(), Some("11" | "26"))
                        || d.message().contains("malformed")
                        || d.message().contains("not a database") =>
                {
                    MetaError::Damaged {
                        path: path.display().to_string(),
                        cause: d.message().to_string(),
                    }
                }
                _ => MetaError::Db(e),
            };
            let mut probe = sqlx::AnyConnection::connect(&sqlite_url(path, "rwc")?)
                .await
                .map_err(damaged)?;
            probe
                .execute("PRAGMA journal_mode = WAL")
                .await
                .map_err(damaged)?;
            probe
                .execute("SELECT count(*) FROM sqlite_master")
                .await
                .map_err(damaged)?;
            let _ = probe.close().await;
        }
        let write = pool_options()
            .max_connections(1)
            .after_connect(|conn, _| {
                Box::pin(async move {
                    conn.execute("PRAGMA journal_mode = WAL").await?;
                    conn.execute(SQLITE_PRAGMAS).await?;
                    Ok(())
                })
            })
            // A transaction whose COMMIT failed (SQLITE_FULL: the disk filled up) is rolled
            // back when dropped. When that ROLLBACK fails as well, sqlx still counts the
            // connection as inside a transaction and runs every later one as a savepoint
            // within it: each acknowledged, none ever committed. So a connection that comes
            // back still counting one is closed, and the pool opens a fresh one. (The ping
            // runs after the queued rollback, on the connection's own worker.)
            .after_release(|conn, _| {
                Box::pin(async move {
                    conn.ping().await?;
                    Ok(
                        <sqlx::Any as sqlx::Database>::TransactionManager::get_transaction_depth(
                            conn,
                        ) == 0,
                    )
                })
            })
            .connect(&sqlite_url(path, "rwc")?)
            .await?;
        Self::migrate(&write, Backend::Sqlite).await?;
        let read = pool_options()
            .max_connections(4)
            .min_connections(1)
            .after_connect(|conn, _| {
                Box::pin(async move {
                    conn.execute(SQLITE_PRAGMAS).await?;
                    Ok(())
                })
            })
            .connect(&sqlite_url(path, "ro")?)
            .await?;
        Ok(Meta {
            read,
            write,
            gates: None,
            locks: None,
            backend: Backend::Sqlite,
            origin: None,
        })
    }

    /// Connects to (and creates or migrates the schema in) the PostgreSQL database at `url`
    /// (`postgres://user:password@host:port/database?sslmode=…`). Several processes may share
    /// it: their writes are serialized by an advisory lock.
    pub async fn connect(url: &str, max_connections: u32) -> Result<Meta> {
        sqlx::any::install_default_drivers();
        if !is_postgres_url(url) {
            return Err(MetaError::Config(format!(
                "{} is not a PostgreSQL URL (postgres://user:password@host:port/database)",
                redact_url(url)
            )));
        }
        // One connection first: a wrong password, an unknown database or a refused port is
        // reported as such at once, not as a pool that timed out.
        {
            use sqlx::Connection;
            let conn = tokio::time::timeout(PG_CONNECT, sqlx::AnyConnection::connect(url))
                .await
                .map_err(|_| {
                    MetaError::Config(format!(
                        "{} did not answer within {} s",
                        redact_url(url),
                        PG_CONNECT.as_secs()
                    ))
                })??;
            conn.close().await?;
        }
        // Writers wait for the write lock holding a connection of `write`; readers have
        // their own, so a long write (or a held lock) never keeps a pull waiting.
        let pool = |max: u32, idle_in_tx: &'static str, wait: Duration| {
            pool_options()
                .max_connections(max)
                .min_connections(0)
                .acquire_timeout(wait)
                .after_connect(move |conn, _| {
                    Box::pin(async move {
                        conn.execute(idle_in_tx).await?;
                        Ok(())
                    })
                })
                .connect_lazy(url)
        };
        // A replica that stalls inside a transaction (paused, swapping, cut off) would hold
        // the write lock, and with it every replica's writes, until TCP noticed: the server
        // ends such a session after 15 s. These transactions take milliseconds.
        const SHORT: &str = "SET idle_in_transaction_session_timeout = '15s'";
        let write = pool(max_connections.clamp(2, 8), SHORT, PG_CONNECT)?;
        Self::migrate(&write, Backend::Postgres).await?;
        let read = pool(max_connections.max(2), SHORT, PG_CONNECT)?;
        // A gate or a lock is held while blob files are checked or deleted in the object
        // store, or a collection runs, which may take minutes; whoever waits for one (holding
        // a connection, or for a connection) waits as long.
        // The gate is held across a batch of deletes in the object store; a lock (a whole
        // collection, say) may be held for hours, so only a session gone quiet that long ends.
        let gates = pool(
            8,
            "SET idle_in_transaction_session_timeout = '30min'",
            PG_CONNECT,
        )?;
        let locks = pool(
            4,
            "SET idle_in_transaction_session_timeout = '6h'",
            PG_CONNECT,
        )?;
        Ok(Meta {
            read,
            write,
            gates: Some(LockPool::new(gates, 8)),
            locks: Some(LockPool::new(locks, 4)),
            backend: Backend::Postgres,
            origin: None,
        })
    }

    async fn migrate(pool: &AnyPool, backend: Backend) -> Result<()> {
        let (migrations, read_version, set_version) = match backend {
            Backend::Sqlite => (
                schema::MIGRATIONS,
                "PRAGMA user_version",
                "PRAGMA user_version = {}",
            ),
            Backend::Postgres => (
                schema::PG_MIGRATIONS,
                "SELECT coalesce(max(version), 0) FROM outpost_schema",
                "INSERT INTO outpost_schema (version) VALUES ({})",
            ),
        };
        let mut tx = pool.begin().await?;
        if backend == Backend::Postgres {
            // Replicas starting together migrate one at a time.
            sqlx::query("SELECT pg_advisory_xact_lock($1)")
                .bind(PG_WRITE_LOCK)
                .execute(&mut *tx)
                .await?;
            sqlx::raw_sql("CREATE TABLE IF NOT EXISTS outpost_schema (version BIGINT NOT NULL)")
                .execute(&mut *tx)
                .await?;
        }
        let version: i64 = sqlx::query_scalar(read_version).fetch_one(&mut *tx).await?;
        if version > migrations.len() as i64 {
            return Err(MetaError::Config(format!(
                "the metadata database has schema version {version}, newer than this build of \
                 Outpost knows ({}); run the newer version",
                migrations.len()
            )));
        }
        for (i, sql) in migrations.iter().enumerate().skip(version.max(0) as usize) {
            sqlx::raw_sql(sql).execute(&mut *tx).await?;
            sqlx::raw_sql(&set_version.replace("{}", &(i + 1).to_string()))
                .execute(&mut *tx)
                .await?;
            tracing::info!(migration = i + 1, ?backend, "applied metadata migration");
        }
        tx.commit().await?;
        Ok(())
    }

    /// Begins a transaction that writes. On PostgreSQL it first takes the write lock
    /// ([`PG_WRITE_LOCK`]), held until it commits or rolls back.
    pub(crate) async fn begin_write(&self) -> Result<Tx<'static>> {
        let mut tx = self.write.begin().await?;
        if self.backend == Backend::Postgres {
            sqlx::query("SELECT pg_advisory_xact_lock($1)")
                .bind(PG_WRITE_LOCK)
                .execute(&mut *tx)
                .await?;
        }
        Ok(tx)
    }

    /// A handle whose events are marked with `origin`.
    pub fn with_origin(&self, origin: &'static str) -> Meta {
        Meta {
            origin: Some(origin),
            ..self.clone()
        }
    }

    pub async fn close(&self) {
        self.read.close().await;
        self.write.close().await;
        for p in [&self.gates, &self.locks].into_iter().flatten() {
            p.queue.close();
            p.pool.close().await;
        }
    }

    async fn repo_id(tx: &mut Tx<'_>, repo: &str) -> Result<Option<i64>> {
        Ok(
            sqlx::query_scalar("SELECT id FROM repositories WHERE name = $1")
                .bind(repo)
                .fetch_optional(&mut **tx)
                .await?,
        )
    }

    async fn ensure_repo(tx: &mut Tx<'_>, repo: &str) -> Result<i64> {
        if let Some(id) = Self::repo_id(tx, repo).await? {
            return Ok(id);
        }
        Ok(sqlx::query_scalar(
            "INSERT INTO repositories (name, created_at) VALUES ($1, $2) RETURNING id",
        )
        .bind(repo)
        .bind(now_ms())
        .fetch_one(&mut **tx)
        .await?)
    }

    async fn event(
        &self,
        tx: &mut Tx<'_>,
        repo: &str,
        kind: &str,
        tag: Option<&str>,
        digest: Option<&str>,
        media_type: Option<&str>,
    ) -> Result<()> {
        sqlx::query("INSERT INTO events (at, repo, kind, tag, digest, media_type, origin) VALUES ($1, $2, $3, $4, $5, $6, $7)")
            .bind(now_ms())
            .bind(repo)
            .bind(kind)
            .bind(tag)
            .bind(digest)
            .bind(media_type)
            .bind(self.origin)
            .execute(&mut **tx)
            .await?;
        Ok(())
    }

    // ---- repositories -------------------------------------------------------------------

    pub async fn repo_exists(&self, repo: &str) -> Result<bool> {
        Ok(
            sqlx::query_scalar::<_, i64>("SELECT 1 FROM repositories WHERE name = $1")
                .bind(repo)
                .fetch_optional(&self.read)
                .await?
                .is_some(),
        )
    }

    /// Repository names in lexical order, after `last`, at most `n`.
    pub async fn catalog(&self, n: Option<u32>, last: Option<&str>) -> Result<Vec<String>> {
        Ok(sqlx::query_scalar(
            "SELECT name FROM repositories WHERE name > $1 ORDER BY name LIMIT $2",
        )
        .bind(last.unwrap_or(""))
        .bind(n.map(i64::from).unwrap_or(i64::MAX))
        .fetch_all(&self.read)
        .await?)
    }

    /// Digests of the manifests `repo` holds, tagged or not, in byte order after `last`, at
    /// most `n` (none for a repository that does not exist): what a child compares its copy
    /// with in a full reconciliation.
    pub async fn manifest_digests(&self, repo: &str, n: u32, last: &str) -> Result<Vec<String>> {
        Ok(sqlx::query_scalar(
            "SELECT m.digest FROM manifests m JOIN repositories r ON r.id = m.repo_id \
             WHERE r.name = $1 AND m.digest > $2 ORDER BY m.digest LIMIT $3",
        )
        .bind(repo)
        .bind(last)
        .bind(i64::from(n))
        .fetch_all(&self.read)
        .await?)
    }

    // ---- blobs ---------------------------------------------------------------------------

    /// Size of `digest` if `repo` may serve it.
    pub async fn linked_blob(&self, repo: &str, digest: &Digest) -> Result<Option<u64>> {
        let size: Option<i64> = sqlx::query_scalar(
            "SELECT b.size FROM repo_blobs l JOIN repositories r ON r.id = l.repo_id \
             JOIN blobs b ON b.digest = l.digest WHERE r.name = $1 AND l.digest = $2",
        )
        .bind(repo)
        .bind(digest.to_string())
        .fetch_optional(&self.read)
        .await?;
        Ok(size.map(|s| s as u64))
    }

    /// Records that `digest` (of `size` bytes, already in the blob store) belongs to `repo`.
    pub async fn link_blob(&self, repo: &str, digest: &Digest, size: u64) -> Result<()> {
        let mut tx = self.begin_write().await?;
        let id = Self::ensure_repo(&mut tx, repo).await?;
        sqlx::query(
            // `created_at` is when the blob was last stored or linked: garbage collection
            // spares blobs linked recently, which a manifest push may be about to reference.
            "INSERT INTO blobs (digest, size, created_at) VALUES ($1, $2, $3) \
             ON CONFLICT (digest) DO UPDATE SET created_at = excluded.created_at",
        )
        .bind(digest.to_string())
        .bind(size as i64)
        .bind(now_ms())
        .execute(&mut *tx)
        .await?;
        sqlx::query(
            "INSERT INTO repo_blobs (repo_id, digest) VALUES ($1, $2) ON CONFLICT DO NOTHING",
        )
        .bind(id)
        .bind(digest.to_string())
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(())
    }

    /// Garbage collection in the database: the blobs that no manifest in any repository
    /// references, that were last stored or linked before `cutoff_ms` and that `keep` does not
    /// name (blobs a sync in progress holds for a manifest it has yet to store). Unless `dry_run`,
    /// their rows and every repository's link to them are deleted, 500 blobs per transaction,
    /// each batch checked again inside its transaction: a manifest push that commits first
    /// keeps its blobs, one that commits after is refused for the missing blob, and pushes
    /// go on between batches (one transaction for 38,000 blobs held every write for ~16 s).
    /// Returns the digests and sizes removed (or, with `dry_run`, that would be).
    pub async fn collect_unreferenced_blobs(
        &self,
        cutoff_ms: i64,
        dry_run: bool,
        keep: &std::collections::HashSet<String>,
    ) -> Result<Vec<(String, u64)>> {
        // SQLite plans `NOT IN` with one temporary index of the children; PostgreSQL turns it
        // into a scan per blob once the children outgrow `work_mem`, and wants `NOT EXISTS`
        // on its index instead.
        let sql = match self.backend {
            Backend::Sqlite => {
                "SELECT digest, size FROM blobs WHERE created_at <= $1 \
                 AND digest NOT IN (SELECT child FROM manifest_refs) ORDER BY digest"
            }
            Backend::Postgres => {
                "SELECT b.digest, b.size FROM blobs b WHERE b.created_at <= $1 \
                 AND NOT EXISTS (SELECT 1 FROM manifest_refs r WHERE r.child = b.digest) \
                 ORDER BY b.digest"
            }
        };
        let rows: Vec<(String, i64)> = sqlx::query_as(sql)
            .bind(cutoff_ms)
            .fetch_all(&self.read)
            .await?;
        let candidates: Vec<(String, u64)> = rows
            .into_iter()
            .filter(|(d, _)| !keep.contains(d))
            .map(|(d, s)| (d, s as u64))
            .collect();
        if dry_run {
            return Ok(candidates);
        }
        let mut removed = Vec::with_capacity(candidates.len());
        for chunk in candidates.chunks(500) {
            let mut tx = self.begin_write().await?;
            // Still unreferenced and old? A manifest stored, or a blob linked again, since
            // the selection keeps its blobs.
            let marks = placeholders(chunk.len());
            let sql = format!(
                "SELECT digest FROM blobs WHERE digest IN ({marks}) AND created_at <= ${} \
                 AND NOT EXISTS (SELECT 1 FROM manifest_refs r WHERE r.child = blobs.digest)",
                chunk.len() + 1
            );
            let mut q = sqlx::query_scalar::<_, String>(&sql);
            for (d, _) in chunk {
                q = q.bind(d);
            }
            let still: std::collections::HashSet<String> = q
                .bind(cutoff_ms)
                .fetch_all(&mut *tx)
                .await?
                .into_iter()
                .collect();
            let doomed: Vec<&(String, u64)> =
                chunk.iter().filter(|(d, _)| still.contains(d)).collect();
            if doomed.is_empty() {
                continue;
            }
            let marks = placeholders(doomed.len());
            for table in ["repo_blobs", "blobs"] {
                let sql = format!("DELETE FROM {table} WHERE digest IN ({marks})");
                let mut q = sqlx::query(&sql);
                for (d, _) in &doomed {
                    q = q.bind(d);
                }
                q.execute(&mut *tx).await?;
            }
            tx.commit().await?;
            removed.extend(doomed.into_iter().cloned());
        }
        Ok(removed)
    }

    /// Repositories, tags, manifests, blobs and the blobs' total size, for the status page.
    pub async fn summary(&self) -> Result<Summary> {
        let (repositories, tags, manifests, blobs, bytes): (i64, i64, i64, i64, i64) =
            sqlx::query_as(
                "SELECT (SELECT count(*) FROM repositories), (SELECT count(*) FROM tags), \
                 (SELECT count(*) FROM manifests), (SELECT count(*) FROM blobs), \
                 (SELECT CAST(coalesce(sum(size), 0) AS BIGINT) FROM blobs)",
            )
            .fetch_one(&self.read)
            .await?;
        Ok(Summary {
            repositories: repositories as u64,
            tags: tags as u64,
            manifests: manifests as u64,
            blobs: blobs as u64,
            blob_bytes: bytes as u64,
        })
    }

    /// Which of `digests` have a blob row (for garbage collection of files without one).
    pub async fn known_blobs(
        &self,
        digests: &[String],
    ) -> Result<std::collections::HashSet<String>> {
        let mut known = std::collections::HashSet::new();
        for chunk in digests.chunks(500) {
            let marks = placeholders(chunk.len());
            let sql = format!("SELECT digest FROM blobs WHERE digest IN ({marks})");
            let mut q = sqlx::query_scalar::<_, String>(&sql);
            for d in chunk {
                q = q.bind(d);
            }
            known.extend(q.fetch_all(&self.read).await?);
        }
        Ok(known)
    }

    /// Removes `repo`'s link to a blob. Returns whether it was linked.
    pub async fn unlink_blob(&self, repo: &str, digest: &Digest) -> Result<bool> {
        let mut tx = self.begin_write().await?;
        let res = sqlx::query(
            "DELETE FROM repo_blobs WHERE digest = $1 AND repo_id = (SELECT id FROM repositories WHERE name = $2)",
        )
        .bind(digest.to_string())
        .bind(repo)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(res.rows_affected() > 0)
    }

    // ---- manifests and tags --------------------------------------------------------------

    /// Stores a manifest (and optionally points a tag at it) after checking, in the same
    /// transaction, that everything it references is present.
    pub async fn put_manifest(&self, m: NewManifest<'_>) -> Result<PutOutcome> {
        let mut tx = self.begin_write().await?;
        let id = Self::ensure_repo(&mut tx, m.repo).await?;
        for b in &m.blobs {
            let linked: Option<i64> =
                sqlx::query_scalar("SELECT 1 FROM repo_blobs WHERE repo_id = $1 AND digest = $2")
                    .bind(id)
                    .bind(b.to_string())
                    .fetch_optional(&mut *tx)
                    .await?;
            if linked.is_none() {
                return Err(MetaError::MissingBlob((*b).clone()));
            }
        }
        for c in &m.children {
            let present: Option<i64> =
                sqlx::query_scalar("SELECT 1 FROM manifests WHERE repo_id = $1 AND digest = $2")
                    .bind(id)
                    .bind(c.to_string())
                    .fetch_optional(&mut *tx)
                    .await?;
            if present.is_none() {
                return Err(MetaError::MissingManifest((*c).clone()));
            }
        }
        let digest = m.digest.to_string();
        let created = sqlx::query(
            "INSERT INTO manifests (repo_id, digest, media_type, artifact_type, subject, annotations, content, created_at) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8) ON CONFLICT DO NOTHING",
        )
        .bind(id)
        .bind(&digest)
        .bind(m.media_type)
        .bind(m.artifact_type)
        .bind(m.subject.map(|s| s.to_string()))
        .bind(&m.annotations)
        .bind(m.content)
        .bind(now_ms())
        .execute(&mut *tx)
        .await?
        .rows_affected()
            > 0;
        if created {
            for child in m.blobs.iter().chain(m.children.iter()) {
                sqlx::query("INSERT INTO manifest_refs (repo_id, manifest, child) VALUES ($1, $2, $3) ON CONFLICT DO NOTHING")
                    .bind(id)
                    .bind(&digest)
                    .bind(child.to_string())
                    .execute(&mut *tx)
                    .await?;
            }
            self.event(
                &mut tx,
                m.repo,
                EVENT_MANIFEST_PUT,
                None,
                Some(&digest),
                Some(m.media_type),
            )
            .await?;
        }
        let mut tag_changed = false;
        let mut replaced = None;
        if let Some(tag) = m.tag {
            let old: Option<String> =
                sqlx::query_scalar("SELECT digest FROM tags WHERE repo_id = $1 AND name = $2")
                    .bind(id)
                    .bind(tag)
                    .fetch_optional(&mut *tx)
                    .await?;
            // Checked in the transaction that writes the tag: no other write comes between.
            if let Some(c) = m.tag_condition
                && !c.holds(old.as_deref())
            {
                return Err(MetaError::TagCondition {
                    tag: tag.to_string(),
                    found: match &old {
                        Some(d) => format!("points at {d}"),
                        None => "does not exist".into(),
                    },
                    wanted: c.describe(),
                });
            }
            if old.as_deref() != Some(digest.as_str()) {
                sqlx::query(
                    "INSERT INTO tags (repo_id, name, digest, updated_at) VALUES ($1, $2, $3, $4) \
                     ON CONFLICT (repo_id, name) DO UPDATE SET digest = excluded.digest, updated_at = excluded.updated_at",
                )
                .bind(id)
                .bind(tag)
                .bind(&digest)
                .bind(now_ms())
                .execute(&mut *tx)
                .await?;
                self.event(
                    &mut tx,
                    m.repo,
                    EVENT_TAG_SET,
                    Some(tag),
                    Some(&digest),
                    Some(m.media_type),
                )
                .await?;
                tag_changed = true;
                replaced = old;
            }
        }
        // Writers are serialized (one SQLite writer; an advisory lock on PostgreSQL), so
        // this is exactly where the put stands in the log.
        let log_position: Option<i64> = sqlx::query_scalar("SELECT max(seq) FROM events")
            .fetch_one(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(PutOutcome {
            manifest_created: created,
            tag_changed,
            replaced,
            log_position: log_position.unwrap_or(0),
        })
    }

    fn record(row: sqlx::any::AnyRow) -> Result<ManifestRecord> {
        let digest: String = row.try_get(0)?;
        Ok(ManifestRecord {
            digest: parse_digest(&digest)?,
            media_type: row.try_get(1)?,
            content: row.try_get(2)?,
        })
    }

    pub async fn manifest_by_tag(&self, repo: &str, tag: &str) -> Result<Option<ManifestRecord>> {
        sqlx::query(
            "SELECT m.digest, m.media_type, m.content FROM tags t \
             JOIN repositories r ON r.id = t.repo_id \
             JOIN manifests m ON m.repo_id = t.repo_id AND m.digest = t.digest \
             WHERE r.name = $1 AND t.name = $2",
        )
        .bind(repo)
        .bind(tag)
        .fetch_optional(&self.read)
        .await?
        .map(Self::record)
        .transpose()
    }

    pub async fn manifest_by_digest(
        &self,
        repo: &str,
        digest: &Digest,
    ) -> Result<Option<ManifestRecord>> {
        sqlx::query(
            "SELECT m.digest, m.media_type, m.content FROM manifests m \
             JOIN repositories r ON r.id = m.repo_id WHERE r.name = $1 AND m.digest = $2",
        )
        .bind(repo)
        .bind(digest.to_string())
        .fetch_optional(&self.read)
        .await?
        .map(Self::record)
        .transpose()
    }

    /// Deletes a manifest and every tag pointing at it. Returns the removed tags, or `None` if
    /// the manifest was not there. With `unless_listed`, a manifest that an index (or manifest
    /// list) of the repository lists is kept and [`MetaError::ManifestListed`] returned: a
    /// client's delete must not leave an index whose platforms cannot be pulled. Sync follows
    /// its parent's deletions without it (the parent's log deletes the index too).
    pub async fn delete_manifest(
        &self,
        repo: &str,
        digest: &Digest,
        unless_listed: bool,
    ) -> Result<Option<Vec<String>>> {
        let mut tx = self.begin_write().await?;
        let Some(id) = Self::repo_id(&mut tx, repo).await? else {
            return Ok(None);
        };
        let d = digest.to_string();
        if unless_listed {
            let index: Option<String> = sqlx::query_scalar(
                "SELECT r.manifest FROM manifest_refs r JOIN manifests m \
                 ON m.repo_id = r.repo_id AND m.digest = r.manifest \
                 WHERE r.repo_id = $1 AND r.child = $2 AND r.manifest <> $2 \
                 AND m.media_type IN ($3, $4) ORDER BY r.manifest LIMIT 1",
            )
            .bind(id)
            .bind(&d)
            .bind(outpost_oci::manifest::OCI_INDEX)
            .bind(outpost_oci::manifest::DOCKER_MANIFEST_LIST)
            .fetch_optional(&mut *tx)
            .await?;
            if let Some(index) = index {
                let tags: Vec<String> = sqlx::query_scalar(
                    "SELECT name FROM tags WHERE repo_id = $1 AND digest = $2 ORDER BY name LIMIT 5",
                )
                .bind(id)
                .bind(&index)
                .fetch_all(&mut *tx)
                .await?;
                return Err(MetaError::ManifestListed {
                    digest: digest.clone(),
                    index,
                    tags,
                });
            }
        }
        let deleted = sqlx::query("DELETE FROM manifests WHERE repo_id = $1 AND digest = $2")
            .bind(id)
            .bind(&d)
            .execute(&mut *tx)
            .await?
            .rows_affected();
        if deleted == 0 {
            return Ok(None);
        }
        let tags: Vec<String> = sqlx::query_scalar(
            "DELETE FROM tags WHERE repo_id = $1 AND digest = $2 RETURNING name",
        )
        .bind(id)
        .bind(&d)
        .fetch_all(&mut *tx)
        .await?;
        sqlx::query("DELETE FROM manifest_refs WHERE repo_id = $1 AND manifest = $2")
            .bind(id)
            .bind(&d)
            .execute(&mut *tx)
            .await?;
        for t in &tags {
            self.event(&mut tx, repo, EVENT_TAG_REMOVED, Some(t), Some(&d), None)
                .await?;
        }
        self.event(&mut tx, repo, EVENT_MANIFEST_DELETED, None, Some(&d), None)
            .await?;
        tx.commit().await?;
        Ok(Some(tags))
    }

    /// Deletes a repository: its tags, manifests and blob links (the blob bytes stay for other
    /// repositories and garbage collection). Returns whether it existed.
    pub async fn delete_repository(&self, repo: &str) -> Result<bool> {
        let mut tx = self.begin_write().await?;
        let Some(id) = Self::repo_id(&mut tx, repo).await? else {
            return Ok(false);
        };
        for table in ["tags", "manifest_refs", "manifests", "repo_blobs"] {
            sqlx::query(&format!("DELETE FROM {table} WHERE repo_id = $1"))
                .bind(id)
                .execute(&mut *tx)
                .await?;
        }
        sqlx::query("DELETE FROM repositories WHERE id = $1")
            .bind(id)
            .execute(&mut *tx)
            .await?;
        self.event(&mut tx, repo, EVENT_REPOSITORY_DELETED, None, None, None)
            .await?;
        tx.commit().await?;
        Ok(true)
    }

    /// Removes a tag (the manifest stays, reachable by digest). Returns where the removal
    /// stands in the event log (the newest event once it committed, as
    /// [`PutOutcome::log_position`]), or `None` if there was no such tag.
    pub async fn delete_tag(&self, repo: &str, tag: &str) -> Result<Option<i64>> {
        let mut tx = self.begin_write().await?;
        let Some(id) = Self::repo_id(&mut tx, repo).await? else {
            return Ok(None);
        };
        let old: Option<String> = sqlx::query_scalar(
            "DELETE FROM tags WHERE repo_id = $1 AND name = $2 RETURNING digest",
        )
        .bind(id)
        .bind(tag)
        .fetch_optional(&mut *tx)
        .await?;
        let Some(d) = &old else {
            return Ok(None);
        };
        self.event(&mut tx, repo, EVENT_TAG_REMOVED, Some(tag), Some(d), None)
            .await?;
        let log_position: Option<i64> = sqlx::query_scalar("SELECT max(seq) FROM events")
            .fetch_one(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(Some(log_position.unwrap_or(0)))
    }

    /// Tags of `repo` in lexical order after `last`, at most `n`; `None` if the repository
    /// does not exist.
    pub async fn tags(
        &self,
        repo: &str,
        n: Option<u32>,
        last: Option<&str>,
    ) -> Result<Option<Vec<String>>> {
        // One row with the page as a JSON array: far cheaper than streaming 10,000 rows. The
        // order is the spec's "case-insensitive alphanumeric order", with byte order between
        // tags that differ only in case, from the `tags_in_list_order` index (the first
        // condition on `lower(name)` lets the search start at `last` instead of scanning up
        // to it).
        let sql = match self.backend {
            Backend::Sqlite => {
                "SELECT r.id, (SELECT json_group_array(name) FROM \
                     (SELECT name FROM tags WHERE repo_id = r.id AND lower(name) >= lower($2) \
                      AND (lower(name), name) > (lower($2), $2) \
                      ORDER BY lower(name), name LIMIT $3)) \
                 FROM (SELECT 1) LEFT JOIN repositories r ON r.name = $1"
            }
            Backend::Postgres => {
                "SELECT r.id, (SELECT coalesce(json_agg(p.name ORDER BY lower(p.name), p.name), '[]')::text FROM \
                     (SELECT name FROM tags WHERE repo_id = r.id AND lower(name) >= lower($2) \
                      AND (lower(name), name) > (lower($2), $2) \
                      ORDER BY lower(name), name LIMIT $3) p) \
                 FROM (SELECT 1) one LEFT JOIN repositories r ON r.name = $1"
            }
        };
        let (id, tags): (Option<i64>, Option<String>) = sqlx::query_as(sql)
            .bind(repo)
            .bind(last.unwrap_or(""))
            .bind(n.map(i64::from).unwrap_or(i64::MAX))
            .fetch_one(&self.read)
            .await?;
        let (Some(_), Some(tags)) = (id, tags) else {
            return Ok(None);
        };
        serde_json::from_str(&tags)
            .map(Some)
            .map_err(|e| MetaError::Corrupt(format!("tag list: {e}")))
    }

    /// Manifests in `repo` whose subject is `subject`, optionally of one artifact type.
    pub async fn referrers(
        &self,
        repo: &str,
        subject: &Digest,
        artifact_type: Option<&str>,
    ) -> Result<Vec<Referrer>> {
        let rows = sqlx::query(
            "SELECT m.digest, m.media_type, CAST(octet_length(m.content) AS BIGINT), m.artifact_type, m.annotations FROM manifests m \
             JOIN repositories r ON r.id = m.repo_id \
             WHERE r.name = $1 AND m.subject = $2 AND ($3 IS NULL OR m.artifact_type = $4) ORDER BY m.created_at, m.digest",
        )
        .bind(repo)
        .bind(subject.to_string())
        .bind(artifact_type)
        .bind(artifact_type)
        .fetch_all(&self.read)
        .await?;
        rows.into_iter()
            .map(|row| {
                let digest: String = row.try_get(0)?;
                let size: i64 = row.try_get(2)?;
                Ok(Referrer {
                    digest: parse_digest(&digest)?,
                    media_type: row.try_get(1)?,
                    size: size as u64,
                    artifact_type: row.try_get(3)?,
                    annotations: row.try_get(4)?,
                })
            })
            .collect()
    }

    // ---- shared secrets ------------------------------------------------------------------

    /// The secret named `name`, stored as `fresh` if there was none: every process sharing
    /// this database gets the same value, whichever stored it first.
    pub async fn shared_secret(&self, name: &str, fresh: &[u8]) -> Result<Vec<u8>> {
        sqlx::query(
            "INSERT INTO shared_secrets (name, value) VALUES ($1, $2) ON CONFLICT DO NOTHING",
        )
        .bind(name)
        .bind(fresh)
        .execute(&self.write)
        .await?;
        Ok(
            sqlx::query_scalar("SELECT value FROM shared_secrets WHERE name = $1")
                .bind(name)
                .fetch_one(&self.write)
                .await?,
        )
    }

    // ---- replicas sharing one database ---------------------------------------------------

    /// Tells the other replicas sharing this PostgreSQL database, in the transaction of the
    /// change itself, that tokens, scope maps or connected registries changed, so they drop
    /// what they cached of them (a no-op on SQLite, which one process owns). Every access
    /// write but a connected registry's own status (`put_connected_registry`) does this.
    pub(crate) async fn note_access_change(&self, tx: &mut Tx<'_>) -> Result<()> {
        if self.backend == Backend::Postgres {
            sqlx::query(
                "INSERT INTO log_state (name, value) VALUES ('access_generation', 1) \
                 ON CONFLICT (name) DO UPDATE SET value = log_state.value + 1",
            )
            .execute(&mut **tx)
            .await?;
        }
        Ok(())
    }

    /// The newest event's number and how many access changes were noted (by every access
    /// write in its own transaction): what a replica polls to see others' writes.
    pub async fn shared_positions(&self) -> Result<(i64, i64)> {
        let (seq, access): (Option<i64>, Option<i64>) = sqlx::query_as(
            "SELECT (SELECT max(seq) FROM events), \
             (SELECT value FROM log_state WHERE name = 'access_generation')",
        )
        .fetch_one(&self.read)
        .await?;
        Ok((seq.unwrap_or(0), access.unwrap_or(0)))
    }

    /// Records that the replica reached at `replica` holds upload session `id` (PostgreSQL
    /// only; a no-op on SQLite).
    pub async fn record_upload_replica(&self, id: &str, replica: &str) -> Result<()> {
        if self.backend == Backend::Postgres {
            sqlx::query(
                "INSERT INTO upload_replicas (id, replica, created_at) VALUES ($1, $2, $3) \
                 ON CONFLICT (id) DO UPDATE SET replica = excluded.replica",
            )
            .bind(id)
            .bind(replica)
            .bind(now_ms())
            // Needs no write lock: on the pool whose connections never wait for it.
            .execute(&self.read)
            .await?;
        }
        Ok(())
    }

    /// The replica that holds upload session `id`, if one recorded it.
    pub async fn upload_replica(&self, id: &str) -> Result<Option<String>> {
        if self.backend != Backend::Postgres {
            return Ok(None);
        }
        Ok(
            sqlx::query_scalar("SELECT replica FROM upload_replicas WHERE id = $1")
                .bind(id)
                .fetch_optional(&self.read)
                .await?,
        )
    }

    /// The upload sessions recorded as held by `replica`.
    pub async fn uploads_of_replica(&self, replica: &str) -> Result<Vec<String>> {
        if self.backend != Backend::Postgres {
            return Ok(Vec::new());
        }
        Ok(
            sqlx::query_scalar("SELECT id FROM upload_replicas WHERE replica = $1")
                .bind(replica)
                .fetch_all(&self.read)
                .await?,
        )
    }

    /// Forgets which replica held the upload sessions `ids`, and every record from before
    /// `before_ms` (sessions of replicas that are gone for good).
    pub async fn forget_upload_replicas(&self, ids: &[String], before_ms: i64) -> Result<u64> {
        if self.backend != Backend::Postgres {
            return Ok(0);
        }
        let mut n = sqlx::query("DELETE FROM upload_replicas WHERE created_at < $1")
            .bind(before_ms)
            .execute(&self.read)
            .await?
            .rows_affected();
        for chunk in ids.chunks(500) {
            let sql = format!(
                "DELETE FROM upload_replicas WHERE id IN ({})",
                placeholders(chunk.len())
            );
            let mut q = sqlx::query(&sql);
            for id in chunk {
                q = q.bind(id);
            }
            n += q.execute(&self.read).await?.rows_affected();
        }
        Ok(n)
    }

    /// A hold on the blob gate that every replica sharing this PostgreSQL database honours:
    /// shared while a blob is linked, `exclusive` while garbage collection deletes blob files
    /// (see `outpost-registry`). `None` on SQLite, where the process's own lock is enough.
    /// The hold ends when the returned value is dropped.
    pub async fn cluster_blob_gate(&self, exclusive: bool) -> Result<Option<ClusterGate>> {
        let Some(pool) = &self.gates else {
            return Ok(None);
        };
        let (mut tx, turn) = pool.begin().await?;
        let sql = if exclusive {
            "SELECT pg_advisory_xact_lock($1)"
        } else {
            "SELECT pg_advisory_xact_lock_shared($1)"
        };
        sqlx::query(sql)
            .bind(PG_BLOB_GATE)
            .execute(&mut *tx)
            .await?;
        Ok(Some(ClusterGate {
            _tx: tx,
            _turn: turn,
        }))
    }

    /// A hold, across every replica sharing this PostgreSQL database, on the lock named by
    /// `key` (see [`ClusterLock`]), waiting for it. `None` on SQLite.
    pub async fn cluster_lock(&self, key: ClusterLock) -> Result<Option<ClusterGate>> {
        let Some(pool) = &self.locks else {
            return Ok(None);
        };
        let (mut tx, turn) = pool.begin().await?;
        sqlx::query("SELECT pg_advisory_xact_lock($1)")
            .bind(key as i64)
            .execute(&mut *tx)
            .await?;
        Ok(Some(ClusterGate {
            _tx: tx,
            _turn: turn,
        }))
    }

    /// Like [`Self::cluster_lock`] without waiting: `Ok(None)` when another replica holds
    /// it. On SQLite the process is alone: `Ok(Some(None))`.
    pub async fn try_cluster_lock(&self, key: ClusterLock) -> Result<Option<Option<ClusterGate>>> {
        let Some(pool) = &self.locks else {
            return Ok(Some(None));
        };
        let (mut tx, turn) = pool.begin().await?;
        let got: bool = sqlx::query_scalar("SELECT pg_try_advisory_xact_lock($1)")
            .bind(key as i64)
            .fetch_one(&mut *tx)
            .await?;
        Ok(got.then_some(Some(ClusterGate {
            _tx: tx,
            _turn: turn,
        })))
    }

    // ---- event log -----------------------------------------------------------------------

    /// Events after `seq` that clients made (not applied from a parent): a ReadWrite site's
    /// outbox depth.
    pub async fn client_events_after(&self, seq: i64) -> Result<i64> {
        Ok(
            sqlx::query_scalar("SELECT count(*) FROM events WHERE seq > $1 AND origin IS NULL")
                .bind(seq)
                .fetch_one(&self.read)
                .await?,
        )
    }

    /// Up to `limit` repositories other than `except` that hold blob `digest`.
    pub async fn repos_with_blob(
        &self,
        digest: &Digest,
        except: &str,
        limit: u32,
    ) -> Result<Vec<String>> {
        Ok(sqlx::query_scalar(
            "SELECT r.name FROM repo_blobs l JOIN repositories r ON r.id = l.repo_id \
             WHERE l.digest = $1 AND r.name != $2 ORDER BY r.name LIMIT $3",
        )
        .bind(digest.to_string())
        .bind(except)
        .bind(i64::from(limit))
        .fetch_all(&self.read)
        .await?)
    }

    /// Whether this node's clients changed `repo:tag` (set or removed it) after event `seq`:
    /// on a ReadWrite site, a change its outbox has yet to send up when `seq` is the outbox's
    /// cursor.
    pub async fn client_changed_tag_after(&self, repo: &str, tag: &str, seq: i64) -> Result<bool> {
        let n: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM (SELECT 1 FROM events WHERE repo = $1 AND tag = $2 \
             AND seq > $3 AND origin IS NULL LIMIT 1) c",
        )
        .bind(repo)
        .bind(tag)
        .bind(seq)
        .fetch_one(&self.read)
        .await?;
        Ok(n > 0)
    }

    /// Whether this node's clients, after event `seq`, pushed or tagged manifest `digest` in
    /// `repo`, or a manifest there that references it (an index over it).
    pub async fn client_used_manifest_after(
        &self,
        repo: &str,
        digest: &str,
        seq: i64,
    ) -> Result<bool> {
        let n: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM (SELECT 1 FROM events e WHERE e.repo = $1 AND e.seq > $3 \
             AND e.origin IS NULL AND e.kind IN ($4, $5) AND (e.digest = $2 OR EXISTS (\
               SELECT 1 FROM manifest_refs r JOIN repositories p ON p.id = r.repo_id \
               WHERE p.name = $1 AND r.manifest = e.digest AND r.child = $2)) LIMIT 1) c",
        )
        .bind(repo)
        .bind(digest)
        .bind(seq)
        .bind(EVENT_MANIFEST_PUT)
        .bind(EVENT_TAG_SET)
        .fetch_one(&self.read)
        .await?;
        Ok(n > 0)
    }

    /// What `repo:tag` pointed at just before event `seq`: the digest of the latest tag event
    /// for it with a smaller sequence number, or `None` if there is none, it was a removal, or
    /// the repository was deleted after it.
    /// Whether `repo:tag` pointed at `digest` at some point before event `seq` (by an
    /// event still in the log).
    pub async fn tag_was(&self, repo: &str, tag: &str, digest: &str, seq: i64) -> Result<bool> {
        Ok(sqlx::query_scalar::<_, i64>(
            "SELECT 1 FROM events WHERE repo = $1 AND tag = $2 AND digest = $3 AND seq < $4 \
             AND kind = 'tag_set' LIMIT 1",
        )
        .bind(repo)
        .bind(tag)
        .bind(digest)
        .bind(seq)
        .fetch_optional(&self.read)
        .await?
        .is_some())
    }

    pub async fn tag_before(&self, repo: &str, tag: &str, seq: i64) -> Result<Option<String>> {
        let row: Option<(i64, String, Option<String>)> = sqlx::query_as(
            "SELECT seq, kind, digest FROM events WHERE repo = $1 AND tag = $2 AND seq < $3 \
             AND kind IN ('tag_set', 'tag_removed') ORDER BY seq DESC LIMIT 1",
        )
        .bind(repo)
        .bind(tag)
        .bind(seq)
        .fetch_optional(&self.read)
        .await?;
        let Some((at, kind, digest)) = row else {
            return Ok(None);
        };
        let deleted_since: Option<i64> = sqlx::query_scalar(
            "SELECT seq FROM events WHERE repo = $1 AND kind = 'repository_deleted' \
             AND seq > $2 AND seq < $3 LIMIT 1",
        )
        .bind(repo)
        .bind(at)
        .bind(seq)
        .fetch_optional(&self.read)
        .await?;
        Ok((kind == EVENT_TAG_SET && deleted_since.is_none())
            .then_some(digest)
            .flatten())
    }

    /// The newest event's sequence number (0 when the log is empty).
    pub async fn latest_event(&self) -> Result<i64> {
        let seq: Option<i64> = sqlx::query_scalar("SELECT max(seq) FROM events")
            .fetch_one(&self.read)
            .await?;
        Ok(seq.unwrap_or(0))
    }

    /// The oldest sequence number of an event recorded at or after `at_ms`, not counting what
    /// pruning kept below [`Self::events_pruned_below`] (`None` if there is none).
    pub async fn first_event_since(&self, at_ms: i64) -> Result<Option<i64>> {
        let from = self.events_pruned_below().await?;
        Ok(
            // Sequence numbers grow with time: scanning up from the first event not pruned
            // stops at the answer (`min(seq)` would read the whole log).
            sqlx::query_scalar(
                "SELECT seq FROM events WHERE seq >= $1 AND at >= $2 ORDER BY seq LIMIT 1",
            )
            .bind(from)
            .bind(at_ms)
            .fetch_optional(&self.read)
            .await?,
        )
    }

    /// A named position kept in `log_state` (`None` if never set).
    pub async fn log_state(&self, name: &str) -> Result<Option<i64>> {
        Ok(
            sqlx::query_scalar::<_, i64>("SELECT value FROM log_state WHERE name = $1")
                .bind(name)
                .fetch_optional(&self.read)
                .await?,
        )
    }

    /// Sets a named position in `log_state`.
    pub async fn set_log_state(&self, name: &str, value: i64) -> Result<()> {
        sqlx::query(
            "INSERT INTO log_state (name, value) VALUES ($1, $2) \
             ON CONFLICT (name) DO UPDATE SET value = excluded.value",
        )
        .bind(name)
        .bind(value)
        .execute(&self.write)
        .await?;
        Ok(())
    }

    /// Below this sequence number the log may have been pruned (0: never pruned): a cursor
    /// older than it cannot be continued.
    pub async fn events_pruned_below(&self) -> Result<i64> {
        Ok(sqlx::query_scalar::<_, i64>(
            "SELECT value FROM log_state WHERE name = 'events_pruned_below'",
        )
        .fetch_optional(&self.read)
        .await?
        .unwrap_or(0))
    }

    /// Deletes up to `batch` events numbered after `from` that no reader needs any more: those
    /// below `below`, except the newest event (children compare their cursors with it) and each
    /// tag's latest `tag_set` below `below` unless its repository was deleted after it (what
    /// [`Self::tag_before`] answers from, so its answers do not change). Records `below` as
    /// [`Self::events_pruned_below`] in the same transaction. Returns how many were deleted and
    /// the highest number deleted: call again from there until fewer than `batch` go.
    pub async fn prune_events(&self, below: i64, from: i64, batch: u32) -> Result<(u64, i64)> {
        let mut tx = self.begin_write().await?;
        let deleted: Vec<i64> = sqlx::query_scalar(
            "DELETE FROM events WHERE seq IN (\
               SELECT e.seq FROM events e \
               WHERE e.seq > $1 AND e.seq < $2 AND e.seq < (SELECT max(seq) FROM events) \
               AND NOT (e.kind = 'tag_set' AND e.tag IS NOT NULL \
                 AND NOT EXISTS (SELECT 1 FROM events n WHERE n.repo = e.repo AND n.tag = e.tag \
                   AND n.seq > e.seq AND n.seq < $2 AND n.kind IN ('tag_set', 'tag_removed')) \
                 AND NOT EXISTS (SELECT 1 FROM events n WHERE n.repo = e.repo \
                   AND n.kind = 'repository_deleted' AND n.seq > e.seq AND n.seq < $2)) \
               ORDER BY e.seq LIMIT $3) \
             RETURNING seq",
        )
        .bind(from)
        .bind(below)
        .bind(i64::from(batch))
        .fetch_all(&mut *tx)
        .await?;
        if !deleted.is_empty() {
            sqlx::query(
                "INSERT INTO log_state (name, value) VALUES ('events_pruned_below', $1) \
                 ON CONFLICT (name) DO UPDATE SET value = \
                 CASE WHEN excluded.value > log_state.value THEN excluded.value ELSE log_state.value END",
            )
            .bind(below)
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        Ok((
            deleted.len() as u64,
            deleted.iter().copied().max().unwrap_or(from),
        ))
    }

    /// Events after `seq`, oldest first, at most `limit`.
    pub async fn events_after(&self, seq: i64, limit: u32) -> Result<Vec<Event>> {
        let rows = sqlx::query(
            "SELECT seq, at, repo, kind, tag, digest, media_type, origin FROM events WHERE seq > $1 ORDER BY seq LIMIT $2",
        )
        .bind(seq)
        .bind(i64::from(limit))
        .fetch_all(&self.read)
        .await?;
        rows.into_iter()
            .map(|r| {
                Ok(Event {
                    seq: r.try_get(0)?,
                    at_ms: r.try_get(1)?,
                    repo: r.try_get(2)?,
                    kind: r.try_get(3)?,
                    tag: r.try_get(4)?,
                    digest: r.try_get(5)?,
                    media_type: r.try_get(6)?,
                    origin: r.try_get(7)?,
                })
            })
            .collect()
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::{Meta, sqlite_code_means_full};

    /// A fresh store on each database the tests run against: SQLite, and PostgreSQL at
    /// `TEST_POSTGRES_URL` (a server `tests/postgres.sh` starts; `./test.sh` sets it). Without
    /// that variable the tests fail, unless `SKIP_POSTGRES_TESTS=1` opts out.
    pub(crate) async fn stores() -> Vec<(Meta, tempfile::TempDir)> {
        let dir = tempfile::tempdir().expect("tempdir");
        let sqlite = Meta::open(&dir.path().join("meta.db")).await.expect("open");
        let mut stores = vec![(sqlite, dir)];
        match std::env::var("TEST_POSTGRES_URL") {
            Ok(server) => {
                static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
                let name = format!(
                    "meta_{}_{}",
                    std::process::id(),
                    N.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
                );
                let url = super::create_postgres_database(&server, &name)
                    .await
                    .expect("create a test database");
                let pg = Meta::connect(&url, 4).await.expect("connect");
                stores.push((pg, tempfile::tempdir().expect("tempdir")));
            }
            Err(_) if std::env::var("SKIP_POSTGRES_TESTS").as_deref() == Ok("1") => {}
            Err(_) => panic!(
                "TEST_POSTGRES_URL is not set: run ./test.sh, or start a server with \
                 tests/postgres.sh start DIR and export the URL it prints \
                 (SKIP_POSTGRES_TESTS=1 runs these tests on SQLite only)"
            ),
        }
        stores
    }

    /// The sequence numbers of the events in the log.
    async fn seqs(meta: &Meta) -> Vec<i64> {
        let events = meta.events_after(0, 100).await.expect("read");
        events.iter().map(|e| e.seq).collect()
    }

    /// Creates repository `app` by hand; returns its id.
    async fn app_repository(meta: &Meta) -> i64 {
        sqlx::query("INSERT INTO repositories (name, created_at) VALUES ('app', 0)")
            .execute(&meta.write)
            .await
            .expect("insert");
        sqlx::query_scalar("SELECT id FROM repositories WHERE name = 'app'")
            .fetch_one(&meta.write)
            .await
            .expect("id")
    }

    /// The write-ahead log's space goes back to the disk on request, and the data stays.
    #[tokio::test]
    async fn truncating_the_write_ahead_log_gives_its_space_back() {
        let dir = tempfile::tempdir().expect("tempdir");
        let meta = Meta::open(&dir.path().join("meta.db")).await.expect("open");
        app_repository(&meta).await;
        let wal = dir.path().join("meta.db-wal");
        let len = || std::fs::metadata(&wal).expect("wal").len();
        assert!(len() > 0, "the insert went into the log");
        meta.truncate_wal().await.expect("truncate");
        assert_eq!(len(), 0);
        let n: i64 = sqlx::query_scalar("SELECT count(*) FROM repositories")
            .fetch_one(&meta.read)
            .await
            .expect("count");
        assert_eq!(n, 1);
    }

    /// Collection in batches removes every old unreferenced blob, across batch boundaries,
    /// and nothing referenced, recent or kept; a dry run removes nothing.
    #[tokio::test]
    async fn collection_in_batches_takes_exactly_the_unreferenced_blobs() {
        for (meta, _dir) in stores().await {
            let id = app_repository(&meta).await;
            // 1,203 blobs: every tenth referenced, blob 7 too new, blob 11 kept by a sync.
            for i in 0..1203 {
                let d = format!("sha256:{i:064}");
                let at = if i == 7 { 5_000 } else { 0 };
                sqlx::query("INSERT INTO blobs (digest, size, created_at) VALUES ($1, $2, $3)")
                    .bind(&d)
                    .bind(i as i64)
                    .bind(at)
                    .execute(&meta.write)
                    .await
                    .expect("insert");
                sqlx::query("INSERT INTO repo_blobs (repo_id, digest) VALUES ($1, $2)")
                    .bind(id)
                    .bind(&d)
                    .execute(&meta.write)
                    .await
                    .expect("insert");
                if i % 10 == 0 {
                    sqlx::query(
                        "INSERT INTO manifest_refs (repo_id, manifest, child) VALUES ($1, 'm', $2)",
                    )
                    .bind(id)
                    .bind(&d)
                    .execute(&meta.write)
                    .await
                    .expect("insert");
                }
            }
            let keep: std::collections::HashSet<String> =
                [format!("sha256:{:064}", 11)].into_iter().collect();
            let expected: Vec<String> = (0..1203)
                .filter(|i| i % 10 != 0 && *i != 7 && *i != 11)
                .map(|i| format!("sha256:{i:064}"))
                .collect();
            let digests = |rows: Vec<(String, u64)>| -> Vec<String> {
                rows.into_iter().map(|(d, _)| d).collect()
            };
            let dry = meta
                .collect_unreferenced_blobs(1_000, true, &keep)
                .await
                .expect("dry run");
            assert_eq!(digests(dry), expected);
            let removed = meta
                .collect_unreferenced_blobs(1_000, false, &keep)
                .await
                .expect("collect");
            assert_eq!(digests(removed), expected);
            let left: i64 = sqlx::query_scalar("SELECT count(*) FROM blobs")
                .fetch_one(&meta.write)
                .await
                .expect("count");
            assert_eq!(left, 1203 - expected.len() as i64);
            let links: i64 = sqlx::query_scalar("SELECT count(*) FROM repo_blobs")
                .fetch_one(&meta.write)
                .await
                .expect("count");
            assert_eq!(links, left, "every removed blob's links went with it");
        }
    }

    /// A ReadWrite site keeps a manifest its parent deleted while its own clients' push of
    /// it, or of an index over it, waits to go up: the question it asks the log.
    #[tokio::test]
    async fn client_use_of_a_manifest_after_a_point_in_the_log() {
        for (meta, _dir) in stores().await {
            let id = app_repository(&meta).await;
            sqlx::query(
                "INSERT INTO manifest_refs (repo_id, manifest, child) VALUES ($1, 'idx', 'm1')",
            )
            .bind(id)
            .execute(&meta.write)
            .await
            .expect("insert");
            // seq: what, and who made it
            let log: &[(&str, Option<&str>, &str, Option<&str>)] = &[
                ("tag_set", Some("v1"), "m1", Some("parent")), // 1: came from sync
                ("manifest_put", None, "idx", None),           // 2: a client's index over m1
                ("tag_set", Some("v2"), "m2", None),           // 3: a client's tag
                ("tag_set", Some("v3"), "m3", Some("parent")), // 4: came from sync
                ("tag_removed", Some("v4"), "m4", None),       // 5: a client's removal
            ];
            for (kind, tag, digest, origin) in log {
                sqlx::query(
                    "INSERT INTO events (at, repo, kind, tag, digest, origin) \
                     VALUES (0, 'app', $1, $2, $3, $4)",
                )
                .bind(kind)
                .bind(tag)
                .bind(digest)
                .bind(origin)
                .execute(&meta.write)
                .await
                .expect("insert");
            }
            let used = |digest: &'static str, after: i64| {
                let meta = meta.clone();
                async move {
                    meta.client_used_manifest_after("app", digest, after)
                        .await
                        .expect("query")
                }
            };
            assert!(used("m1", 0).await, "an index over it was pushed");
            assert!(!used("m1", 2).await, "that push went up");
            assert!(used("m2", 2).await);
            assert!(!used("m2", 3).await);
            assert!(!used("m3", 0).await, "only synced");
            assert!(!used("m4", 0).await, "a removal does not need it");
            assert!(
                !meta
                    .client_used_manifest_after("other", "m2", 0)
                    .await
                    .expect("query")
            );
        }
    }

    /// Pruning below a floor keeps what readers still ask for: every event from the floor on,
    /// the newest event, and each tag's latest `tag_set` (so `tag_before` answers as before).
    #[tokio::test]
    async fn prune_events_keeps_what_readers_need() {
        for (meta, _dir) in stores().await {
            prune_events_on(&meta).await;
        }
    }

    async fn prune_events_on(meta: &Meta) {
        let meta = meta.clone();
        // seq: what
        let log: &[(&str, &str, Option<&str>, Option<&str>)] = &[
            ("app", "tag_set", Some("v1"), Some("d1")), // 1: superseded by 3
            ("app", "manifest_put", None, Some("d1")),  // 2
            ("app", "tag_set", Some("v1"), Some("d2")), // 3: v1's latest below 8
            ("app", "tag_set", Some("gone"), Some("d2")), // 4: removed at 5
            ("app", "tag_removed", Some("gone"), Some("d2")), // 5
            ("db", "tag_set", Some("v1"), Some("d3")),  // 6: db:v1's latest
            ("app", "manifest_deleted", None, Some("d1")), // 7
            ("app", "tag_set", Some("v1"), Some("d4")), // 8: the floor
            ("app", "manifest_put", None, Some("d4")),  // 9
        ];
        for (repo, kind, tag, digest) in log {
            sqlx::query(
                "INSERT INTO events (at, repo, kind, tag, digest) VALUES (0, $1, $2, $3, $4)",
            )
            .bind(repo)
            .bind(kind)
            .bind(tag)
            .bind(digest)
            .execute(&meta.write)
            .await
            .expect("insert");
        }
        let before_8 = meta.tag_before("app", "v1", 8).await.expect("read");
        let before_9 = meta.tag_before("app", "v1", 9).await.expect("read");
        let db = meta.tag_before("db", "v1", 9).await.expect("read");
        assert_eq!(before_8.as_deref(), Some("d2"));

        assert_eq!(meta.events_pruned_below().await.expect("read"), 0);
        // In batches of two, each going on from the last, until a batch is not full.
        let (mut deleted, mut from) = (0, 0);
        loop {
            let (n, last) = meta.prune_events(8, from, 2).await.expect("prune");
            assert!(n <= 2, "one batch deletes at most its size");
            assert!(last >= from);
            deleted += n;
            from = last;
            if n < 2 {
                break;
            }
        }
        assert_eq!(meta.events_pruned_below().await.expect("read"), 8);
        let left = seqs(&meta).await;
        assert_eq!(left, [3, 6, 8, 9], "{deleted} deleted");
        assert_eq!(
            meta.tag_before("app", "v1", 8).await.expect("read"),
            before_8
        );
        assert_eq!(
            meta.tag_before("app", "v1", 9).await.expect("read"),
            before_9
        );
        assert_eq!(meta.tag_before("db", "v1", 9).await.expect("read"), db);
        assert_eq!(meta.tag_before("app", "gone", 9).await.expect("read"), None);

        // A floor past the end keeps the newest event, so cursors can still be compared.
        meta.prune_events(i64::MAX, 0, 100).await.expect("prune");
        let left = seqs(&meta).await;
        assert_eq!(
            left,
            [6, 8, 9],
            "tag v1 of app keeps 8; db keeps 6; 9 is the newest"
        );
        assert_eq!(meta.latest_event().await.expect("read"), 9);
        // Sequence numbers are never reused after a delete.
        sqlx::query("INSERT INTO events (at, repo, kind) VALUES (0, 'app', 'manifest_put')")
            .execute(&meta.write)
            .await
            .expect("insert");
        assert_eq!(meta.latest_event().await.expect("read"), 10);

        // A repository deleted after a tag was set ends the tag: `tag_before` says so, and
        // pruning no longer keeps the tag's event.
        for (repo, kind, tag) in [
            ("db", "repository_deleted", None::<&str>), // 11
            ("app", "manifest_put", None),              // 12
        ] {
            sqlx::query("INSERT INTO events (at, repo, kind, tag) VALUES (0, $1, $2, $3)")
                .bind(repo)
                .bind(kind)
                .bind(tag)
                .execute(&meta.write)
                .await
                .expect("insert");
        }
        assert_eq!(meta.tag_before("db", "v1", 11).await.expect("read"), db);
        assert_eq!(meta.tag_before("db", "v1", 12).await.expect("read"), None);
        meta.prune_events(12, 0, 100).await.expect("prune");
        let left = seqs(&meta).await;
        assert_eq!(left, [8, 12], "db's tag and deletion went; app:v1 stays");
    }

    #[test]
    fn urls_are_shown_without_passwords() {
        for (url, shown) in [
            (
                "postgres://outpost:s3cret@db:5432/reg",
                "postgres://outpost:***@db:5432/reg",
            ),
            // Unescaped `/` and `@` in the password: a URL parser would show part of it.
            (
                "postgres://outp:8812/Kq9zR+w@db/reg",
                "postgres://outp:***@db/reg",
            ),
            ("postgres://u:a@b@db/reg", "postgres://u:***@db/reg"),
            (
                "postgres://db/reg?user=u&password=p",
                "postgres://db/reg?***",
            ),
            ("postgres://u@db/reg", "postgres://u@db/reg"),
            ("postgres://db/reg?password=p@ss", "postgres://db:***@ss"),
            ("db:5432", "(not a URL)"),
        ] {
            assert_eq!(super::redact_url(url), shown, "{url}");
        }
    }

    #[test]
    fn full_disk_result_codes() {
        // SQLITE_FULL and an extended form of it; the WAL index that cannot grow.
        for c in [13, 13 | (1 << 8), 4874] {
            assert!(sqlite_code_means_full(c), "{c}");
        }
        // Other I/O errors (SQLITE_IOERR_WRITE, _FSYNC), busy, corrupt: not a full disk.
        for c in [10, 778, 1034, 5, 11] {
            assert!(!sqlite_code_means_full(c), "{c}");
        }
    }
}
