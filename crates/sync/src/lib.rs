//! `outpost-sync` is the child side of the sync protocol (`docs/sync-protocol.md`): a
//! connected registry started with a connection string activates itself at its parent,
//! fetches its configuration (mode, repositories, client tokens with password hashes), and
//! from then on follows the parent's ordered message feed — long-polling, so a push at the
//! parent arrives within a round trip — falling back to a full reconciliation of every
//! repository in scope when its cursor has expired or an operator asked for a resync.
//!
//! Invariants: content is fetched only when it is not already stored locally (blobs are linked
//! across repositories first); blobs land through ordinary upload sessions, so they become
//! visible only after their digest is verified; a manifest is stored only after everything it
//! references, and a tag only after its manifest; the cursor moves only after a message's
//! content is stored. Blob transfers are appended in 1 MiB pieces whose upload id is kept on
//! disk, so a cut transfer resumes with `Range` from the last stored piece — after a reconnect
//! or a restart. While the parent is unreachable nothing changes for local clients.
//!
//! It can also follow a plain OCI registry ([`start_mirror`]): no gateway, no activation, the
//! listed repositories reconciled on an interval.
//!
//! A ReadWrite site also sends its clients' changes up (`flush_outbox`), in order, from a
//! durable cursor over its event log; what came from the parent is marked and never echoed.
//! Every connected registry sends notifications for its events that match its patterns
//! (`flush_notifications`), from another durable cursor over the same log.
//!
//! An intermediate node installs its descendants from the configuration and relays their
//! activation, status and notifications to its own parent
//! ([`outpost_control::connected::Upstream`]).

mod parent;

pub use parent::Parent;

use bytes::Bytes;
use futures_util::StreamExt;
use outpost_control::connected::{
    ClientTokenConfig, GarbageCollection, Message, NOTICE, StatusDetail, StatusReport, SyncConfig,
};
use outpost_control::{ConnectionString, Control, RepoPattern};
use outpost_oci::{Digest, Manifest, Reference, RepoName, Tag};
use outpost_registry::{Registry, RegistryError};
use parent::Feed;
pub use parent::ParentCa;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Mutex};
use std::time::Duration;

#[derive(Debug, thiserror::Error)]
pub enum SyncError {
    #[error(
        "cannot reach the parent at {parent}: {reason}; {}",
        unreachable_hint(reason)
    )]
    Unreachable { parent: String, reason: String },
    /// A transfer from a parent that answered broke off (the link dropped, or stayed silent
    /// for `sync_read_timeout_secs`): handled like an unreachable parent, and resumed.
    #[error(
        "the transfer with the parent at {parent} broke off ({reason}); it resumes from there \
         (a link that stays silent is given up after sync_read_timeout_secs)"
    )]
    Interrupted { parent: String, reason: String },
    #[error("{}", bad_credentials(token, name, message))]
    BadCredentials {
        token: String,
        name: String,
        message: String,
    },
    #[error("the parent denied the request: {message}")]
    Denied { message: String },
    #[error("{0}")]
    AlreadyActivated(String),
    #[error(
        "connected registry {0:?} does not exist at the parent; create it there with `outpost connected-registry create`"
    )]
    UnknownRegistry(String),
    #[error("the parent answered {status}{}: {message}", code_suffix(.code))]
    Parent {
        status: u16,
        code: String,
        message: String,
    },
    #[error("unexpected answer from the parent: {0}")]
    Protocol(String),
    #[error(
        "connected registry {0:?} was deactivated at the parent, so this instance stopped syncing and serves what it has; restart it to activate again"
    )]
    Deactivated(String),
    #[error("HTTP client: {0}")]
    Client(String),
    #[error(transparent)]
    Registry(#[from] RegistryError),
    #[error("the sync window closed; the transfer resumes in the next window")]
    WindowClosed,
    /// The parent lists a manifest but cannot serve something it references.
    #[error("the parent cannot serve {0}")]
    MissingAtParent(String),
    /// The cause is part of the text, not a `source()`: reports that print an error with its
    /// causes would otherwise say it twice.
    #[error("sync state in {path}: {cause}")]
    State {
        path: PathBuf,
        cause: std::io::Error,
    },
}

/// What to check when the parent cannot be reached: the connection string and the network,
/// unless the cause is local (this process is out of file descriptors).
fn unreachable_hint(reason: &str) -> &'static str {
    if reason.contains("invalid peer certificate") {
        "the parent answered, but its TLS certificate was refused (see above)"
    } else if reason.contains("Too many open files") || reason.contains("os error 24") {
        "this connected registry is out of file descriptors (too many connections at once): \
         it retries; if this persists, raise its open-files limit (ulimit -n, LimitNOFILE= in \
         a systemd unit, --ulimit nofile= for docker)"
    } else {
        "check the network, and the parent's address (ParentGatewayEndpoint and \
         ParentEndpointProtocol in the connection string, or upstream_url for a mirror)"
    }
}

impl SyncError {
    /// Whether the parent answered but will not sync with this registry as it stands (a
    /// refused password, a deactivated or unknown registry, a denied request): the link
    /// works, the exchange does not.
    fn is_refusal(&self) -> bool {
        matches!(
            self,
            SyncError::BadCredentials { .. }
                | SyncError::Deactivated(_)
                | SyncError::UnknownRegistry(_)
                | SyncError::Denied { .. }
        )
    }

    /// The status detail code the parent shows for this failure.
    fn status_code(&self) -> &'static str {
        match self {
            SyncError::Unreachable { .. } => "ParentUnreachable",
            SyncError::Interrupted { .. } => "TransferInterrupted",
            SyncError::Deactivated(_) => "Deactivated",
            SyncError::BadCredentials { .. } => "SyncTokenRejected",
            SyncError::Registry(e) if e.is_disk_full() => "DiskError",
            SyncError::State { cause, .. } if outpost_registry::is_disk_full(cause) => "DiskError",
            SyncError::Registry(_) | SyncError::State { .. } => "LocalStorageError",
            _ => "SyncError",
        }
    }

    /// What the parent shows next to the code: the error, and for a full disk what to do.
    fn status_description(&self) -> String {
        match self.status_code() {
            "DiskError" => format!(
                "{self}; free space in this connected registry's data directory: the transfer \
                 resumes where it stopped"
            ),
            _ => self.to_string(),
        }
    }
}

type Result<T, E = SyncError> = std::result::Result<T, E>;

/// A failure as a mirror says it: its parent is the upstream registry, configured by
/// `upstream_url` (the errors' own words are a connected registry's).
fn as_mirror(e: &SyncError) -> String {
    e.to_string()
        .replace(
            " (ParentGatewayEndpoint and ParentEndpointProtocol in the connection string, or upstream_url for a mirror)",
            " (upstream_url)",
        )
        .replace("the parent", "the upstream")
}

/// What makes a failure "the same again" for logging: its status code (a link down is one
/// failure whatever the socket error of each attempt), or its text when it has no code of
/// its own.
fn repeat_key(e: &SyncError) -> String {
    match e.status_code() {
        "SyncError" => e.to_string(),
        code => code.to_string(),
    }
}

/// Up to half a second from the clock's sub-second noise: added to a retry's wait, it keeps
/// a fleet from retrying in step.
fn jitter() -> Duration {
    Duration::from_millis(
        u64::from(
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.subsec_millis())
                .unwrap_or(0),
        ) % 500,
    )
}

/// Longest wait before the sync tries again after a failure.
const RETRY_MAX: Duration = Duration::from_secs(60);
/// Longest wait when the failure was the link to the parent (down, cut off).
const LINK_RETRY_MAX: Duration = Duration::from_secs(15);
/// How long the same sync failure, repeating, is logged at debug level after its warning.
const REPEAT_QUIET: Duration = Duration::from_secs(600);

/// Repositories reconciled at the same time.
const RECONCILE_CONCURRENCY: usize = 8;

/// How to run the child.
#[derive(Clone)]
pub struct ChildOptions {
    pub connection_string: ConnectionString,
    pub data_dir: PathBuf,
    /// The address local clients use (reported to the parent as the login server).
    pub login_server: String,
    /// How long one long-poll of the message feed may wait.
    pub poll_wait: Duration,
    /// Extra CA certificates trusted for an `https` parent.
    pub parent_ca: Option<ParentCa>,
    /// Longest silence while reading from the parent before the transfer is abandoned (and
    /// resumed on the next attempt).
    pub read_timeout: Duration,
    /// Applies the log level the parent configures (ACR's names: Debug, Information, Warning,
    /// Error, None); `None` when the operator fixed the level locally.
    pub log_level_hook: Option<LogLevelHook>,
}

/// Sets this process's log level; the error says why the level was not applied.
pub type LogLevelHook = Arc<dyn Fn(&str) -> Result<(), String> + Send + Sync>;

/// How to follow a plain OCI registry (no gateway API, no activation): poll the tags of a
/// fixed list of repositories and mirror them, read-only.
#[derive(Debug, Clone)]
pub struct MirrorOptions {
    pub url: String,
    pub repositories: Vec<String>,
    pub credentials: Option<(String, String)>,
    pub data_dir: PathBuf,
    pub interval: Duration,
    /// Extra CA certificates trusted for an `https` upstream.
    pub parent_ca: Option<ParentCa>,
    /// Longest silence while reading from the upstream.
    pub read_timeout: Duration,
}

/// A started connected registry.
pub struct Started {
    /// Whether local clients may only read.
    pub read_only: bool,
    /// What a connected registry syncs, as it changes: its clients may change nothing
    /// outside it (`None` for a mirror, which is read-only anyway).
    pub scope: Option<tokio::sync::watch::Receiver<outpost_control::connected::SyncScope>>,
    pub task: tokio::task::JoinHandle<()>,
    /// For a connected registry, the garbage-collection setting its parent configures, as it
    /// changes (`None` for a mirror of a plain registry, which follows its own configuration).
    pub gc: Option<tokio::sync::watch::Receiver<GarbageCollection>>,
}

/// Relays the activation and status of this node's descendants to its parent.
struct Relay(Parent);

impl outpost_control::connected::Upstream for Relay {
    fn activate<'a>(
        &'a self,
        name: &'a str,
        instance_id: &'a str,
    ) -> outpost_control::connected::BoxFuture<'a, outpost_control::Result<bool>> {
        Box::pin(async move {
            match self.0.activate_for(name, instance_id).await {
                Ok(()) => Ok(true),
                // Offline: let the descendant start; the root learns of it at the next report.
                Err(SyncError::Unreachable { .. }) => {
                    tracing::warn!(
                        registry = name,
                        "parent unreachable; activating a descendant locally"
                    );
                    Ok(false)
                }
                Err(SyncError::AlreadyActivated(_)) => Err(
                    outpost_control::ControlError::AlreadyActivated(name.to_string()),
                ),
                Err(e) => Err(outpost_control::ControlError::Invalid(format!(
                    "the parent refused to activate {name:?}: {e}"
                ))),
            }
        })
    }

    fn notify<'a>(
        &'a self,
        name: &'a str,
        batch: &'a outpost_control::notify::NotificationBatch,
    ) -> outpost_control::connected::BoxFuture<'a, outpost_control::Result<()>> {
        self.notify_up(name, batch)
    }

    fn report<'a>(
        &'a self,
        name: &'a str,
        report: &'a StatusReport,
    ) -> outpost_control::connected::BoxFuture<'a, outpost_control::Result<()>> {
        Box::pin(async move {
            self.0.report_for(name, report).await.map_err(|e| {
                if not_active(&e) {
                    // The root no longer takes this descendant's instance: deactivated there.
                    outpost_control::ControlError::NotActive(e.to_string())
                } else {
                    outpost_control::ControlError::Invalid(e.to_string())
                }
            })
        })
    }
}

impl Relay {
    fn notify_up<'a>(
        &'a self,
        name: &'a str,
        batch: &'a outpost_control::notify::NotificationBatch,
    ) -> outpost_control::connected::BoxFuture<'a, outpost_control::Result<()>> {
        Box::pin(async move {
            self.0.notify_for(name, batch).await.map_err(|e| {
                if not_active(&e) {
                    outpost_control::ControlError::NotActive(e.to_string())
                } else if notifications_refused(&e) {
                    // Refused for good above: the sender drops the batch instead of retrying.
                    outpost_control::ControlError::Invalid(format!(
                        "this node's parent refused the notifications of {name:?}: {e}"
                    ))
                } else {
                    // The sender keeps them and tries again.
                    outpost_control::ControlError::Unavailable(format!(
                        "could not pass the notifications of {name:?} to this node's parent: {e}"
                    ))
                }
            })
        })
    }
}

/// Whether the parent refused a batch of notifications in a way no retry changes: a 4xx other
/// than a rejected password (401), a deactivated instance, a timeout or a rate limit (408,
/// 425, 429) — a malformed batch, a token without `message/write` (403), a parent of a
/// version without the call. Such a batch is dropped with a notice, so it cannot hold the
/// cursor (and with it the pruning of the event log) forever.
fn notifications_refused(e: &SyncError) -> bool {
    match e {
        SyncError::Denied { .. } => true,
        SyncError::Parent { status, .. } => {
            (400..500).contains(status) && !matches!(status, 408 | 425 | 429) && !not_active(e)
        }
        _ => false,
    }
}

/// Every descendant's sync token, so this node can authenticate its children.
fn descendant_tokens(children: &[SyncConfig], out: &mut Vec<ClientTokenConfig>) {
    for c in children {
        if let Some(t) = &c.sync_token {
            out.push(t.clone());
        }
        descendant_tokens(&c.children, out);
    }
}

/// Whom the child follows.
enum Role {
    /// An Outpost parent: gateway API, activation, message feed.
    Gateway,
    /// A plain OCI registry, reconciled every `interval`.
    Plain { interval: Duration },
}

struct Child {
    role: Role,
    parent: Parent,
    registry: Registry,
    control: Arc<Control>,
    dir: PathBuf,
    instance_id: String,
    login_server: String,
    poll_wait: Duration,
    config: Mutex<SyncConfig>,
    etag: Mutex<Option<String>>,
    last_error: Mutex<Option<StatusDetail>>,
    /// When the current sync window closes (`None`: continuous sync).
    deadline: Mutex<Option<std::time::Instant>>,
    /// Tag conflicts and refused outbox entries, reported for a day, across restarts.
    notices: Notices,
    /// Manifests skipped because the parent cannot serve them, retried later.
    skipped: SkipList,
    /// Local changes the parent refused for good (a ReadWrite site's).
    refused: RefusedList,
    /// How many of the parent's messages were still to apply after the last page.
    lag: Mutex<Option<i64>>,
    /// Applies the parent's log level, and the level last applied.
    log_level_hook: Option<LogLevelHook>,
    log_level: Mutex<Option<String>>,
    /// Blobs being fetched right now, so two repositories that need the same new blob at
    /// the same time download it once (the second then links the stored copy).
    fetching: Mutex<std::collections::HashMap<Digest, Arc<tokio::sync::Mutex<()>>>>,
    /// Blobs and manifests that arrived damaged: what was wrong with them, and how many
    /// times in a row.
    damaged: Mutex<std::collections::HashMap<Digest, (String, u32)>>,
    /// The garbage-collection setting the parent configures, for the node's collector.
    gc: tokio::sync::watch::Sender<GarbageCollection>,
    /// The repositories synced, for refusing local writes outside them.
    scope: tokio::sync::watch::Sender<outpost_control::connected::SyncScope>,
    /// False while this process has not activated at the parent: it started without it
    /// (from saved state, or from an offline bundle) and activates on first contact.
    activated: std::sync::atomic::AtomicBool,
    /// Whether a ReadOnly site has deleted what left its scope since this process started:
    /// a scope that shrank while it was stopped arrives with its first configuration, not as
    /// a change.
    pruned: std::sync::atomic::AtomicBool,
    /// Whether the parent last heard `lastSyncResult: Failed` from this instance, or has
    /// heard no result from this process yet (a restarted site, or one whose resource was
    /// created again, would show none, or a stale one, until content changed), so that the
    /// next iteration that goes through reports `Succeeded`.
    failure_reported: std::sync::atomic::AtomicBool,
    /// Whether a transfer moved bytes (a piece stored or sent) since the last failed
    /// iteration: a link that carries data between cuts is retried at once, not after the
    /// backoff it would earn by failing without progress.
    progressed: std::sync::atomic::AtomicBool,
    /// The size of the next piece sent up ([`UP_PIECE_BYTES`] at most): halved when a piece
    /// is cut, so a slow link that drops often still gets whole pieces through, and doubled
    /// again with each piece that arrives.
    up_piece: std::sync::atomic::AtomicU64,
    /// Tags this site's outbox set at the parent, with where each write stands in the
    /// parent's log (`outpost-log-position`): the feed's older events for such a tag are
    /// superseded by the write, and applying them would put back, until the echo of the
    /// write arrives, what this site's clients replaced. Entries go once the feed has
    /// passed them.
    sent_tags: Mutex<std::collections::HashMap<(String, String), i64>>,
    /// Damaged blobs that could not be fetched again, until one is: shown as `StorageDamage`
    /// status details, and left alone until their `until` ([`REPAIR_QUIET`],
    /// [`REPAIR_RETRY`]), however often clients read them meanwhile.
    unrepaired: Mutex<std::collections::HashMap<Digest, Unrepaired>>,
}

/// What to do about a sync token the parent refused, from its answer.
/// The parent refused the credentials: which, and what to do. A mirror of a plain registry
/// (no connected registry name) has upstream credentials, not a sync token.
fn bad_credentials(token: &str, name: &str, message: &str) -> String {
    if name.is_empty() {
        return format!(
            "the upstream registry refused the credentials of {token:?} ({message}): check upstream_username and upstream_password"
        );
    }
    format!(
        "the parent refused the password of sync token {token:?} ({message}): {}",
        credentials_hint(token, name, message)
    )
}

fn credentials_hint(token: &str, name: &str, message: &str) -> String {
    if message.contains("is disabled") {
        return format!(
            "the token is disabled; enable it at the root with `outpost token update -n {token} --status enabled`"
        );
    }
    format!(
        "the password is wrong or was generated again since, or connected registry {name:?} was deleted (`outpost connected-registry show -n {name}` at the root says whether it exists); `outpost connected-registry get-settings -n {name} --parent-protocol http --generate-password 1` at the root makes a new connection string"
    )
}

/// Whether a status report went unrecorded because the parent failed to store it (a `5xx`:
/// its disk is full, its database is down). That stops nothing that only reads from the
/// parent, so it is logged, not an error; any other failure is.
fn recorded_nothing(sent: Result<()>) -> Result<bool> {
    match sent {
        Ok(()) => Ok(false),
        Err(e @ SyncError::Parent { status, .. }) if status >= 500 => {
            tracing::warn!(error = %e, "the parent could not record this instance's status; syncing on");
            Ok(true)
        }
        Err(e) => Err(e),
    }
}

/// What a status report says about the sync's result (`lastSyncResult`, `lastSyncTime`).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Outcome {
    /// Nothing: the parent keeps the last result (a report of progress or of a change).
    Progress,
    /// Content was applied: `Succeeded`, and now is the last sync time.
    Synced,
    /// An iteration went through after a failed one, with nothing to apply: `Succeeded`,
    /// the last sync time unchanged.
    Recovered,
    /// The iteration failed; the status details say why.
    Failed,
}

fn state_err(path: &Path) -> impl FnOnce(std::io::Error) -> SyncError + '_ {
    move |source| SyncError::State {
        path: path.to_path_buf(),
        cause: source,
    }
}

fn read_state(path: &Path) -> Result<Option<String>> {
    match std::fs::read_to_string(path) {
        Ok(s) => Ok(Some(s.trim().to_string())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(state_err(path)(e)),
    }
}

/// Writes a state file atomically (temp, fsync, rename, directory fsync). Also what an
/// offline bundle's import writes a site's configuration with.
pub fn write_state(path: &Path, data: impl AsRef<[u8]>) -> Result<()> {
    use std::io::Write;
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::File::create(&tmp).map_err(state_err(&tmp))?;
    f.write_all(data.as_ref()).map_err(state_err(&tmp))?;
    f.sync_all().map_err(state_err(&tmp))?;
    std::fs::rename(&tmp, path).map_err(state_err(path))?;
    // The rename itself survives a power cut only once the directory is synced.
    if let Some(dir) = path.parent() {
        std::fs::File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(state_err(dir))?;
    }
    Ok(())
}

/// Reads the outbox cursor: `None` if this site never sent anything up. A file that exists
/// but does not hold an event number is an error naming it: reading it as 0 would send every
/// local change ever made up again, undoing newer decisions at the parent.
fn read_outbox_cursor(path: &Path) -> Result<Option<i64>> {
    match read_state(path)? {
        None => Ok(None),
        Some(s) => s.trim().parse().map(Some).map_err(|_| SyncError::State {
            path: path.to_path_buf(),
            cause: std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!(
                    "{s:?} is not an event number; restore the file from a backup, or write the sequence number of the last local change the parent has (0 sends every local change still in the event log up again)"
                ),
            ),
        }),
    }
}

/// Whose data directory `data_dir` is, as its saved sync configuration says: a connected
/// registry's name, or `mirror` for a mirror of a plain registry. Read even from a damaged
/// file; `None` for a root's (or a new) directory.
pub fn saved_owner(data_dir: &Path) -> Option<String> {
    std::fs::read(data_dir.join("sync").join("config.json"))
        .ok()
        .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
        .and_then(|v| v["name"].as_str().map(String::from))
}

/// The last event of this connected registry (under `data_dir`) after which events are still
/// to be sent up: a ReadWrite site's outbox cursor (0 before the first change went up), and
/// the notification cursor. `None` when nothing waits (also for a data directory that is not a
/// connected registry's). Events after it must stay in the event log.
pub fn unsent_after(data_dir: &Path, read_write: bool) -> Result<Option<i64>> {
    let dir = data_dir.join("sync");
    let outbox = match read_write {
        true => Some(read_outbox_cursor(&dir.join("outbox-cursor"))?.unwrap_or(0)),
        false => None,
    };
    // The notification cursor holds events only while there are patterns to send them for
    // (an unreadable saved configuration counts as having some).
    let patterns = read_state(&dir.join("config.json"))
        .ok()
        .flatten()
        .and_then(|c| serde_json::from_str::<SyncConfig>(&c).ok())
        .is_none_or(|c| !c.notifications.is_empty());
    let notify = match patterns {
        true => read_outbox_cursor(&dir.join("notify-cursor"))?,
        false => None,
    };
    Ok(outbox.into_iter().chain(notify).min())
}

/// The largest piece of a blob sent up to the parent: what a cut link costs at most.
const UP_PIECE_BYTES: u64 = 4 << 20;
/// The smallest: about a second at 2 Mbit/s.
const UP_PIECE_MIN: u64 = 256 << 10;

/// How long a partial download of a connected registry is kept for resuming, counted from
/// when the transfer started: past it, the upload reaper may remove it (and a later fetch
/// starts over). Longer than any outage or schedule should make a transfer wait.
pub const PARTIAL_DOWNLOAD_KEEP: Duration = Duration::from_secs(30 * 24 * 3600);

/// Upload ids of the partial blob downloads this connected registry will resume
/// (`sync/partial/*` under `data_dir`), so the upload reaper leaves them alone however long
/// the parent is unreachable. Empty when `data_dir` is not a connected registry's.
pub fn resumable_uploads(data_dir: &Path) -> std::collections::HashSet<String> {
    let Ok(entries) = std::fs::read_dir(data_dir.join("sync").join("partial")) else {
        return Default::default();
    };
    entries
        .filter_map(|e| e.ok())
        .filter(|e| {
            e.metadata()
                .and_then(|m| m.modified())
                .ok()
                .and_then(|t| t.elapsed().ok())
                .is_some_and(|age| age < PARTIAL_DOWNLOAD_KEEP)
        })
        .filter_map(|e| std::fs::read_to_string(e.path()).ok())
        .filter_map(|s| s.trim().split_once(' ').map(|(_, id)| id.to_string()))
        .collect()
}

/// Whether the parent answered that the reporting instance is not (or no longer) the active
/// one: `NOT_ACTIVE`, or, from a parent of the previous version, a 400 saying so in words.
fn not_active(e: &SyncError) -> bool {
    match e {
        SyncError::Parent {
            status: 400,
            code,
            message,
        } => code == "NOT_ACTIVE" || message.contains("is not the active instance"),
        _ => false,
    }
}

/// Records in `sync/backfill.json` the repository patterns `new` has and `old` had not: their
/// existing content must be fetched, since the feed only carries later changes.
fn add_backfill(dir: &Path, old: &SyncConfig, new: &SyncConfig) -> Result<()> {
    let before = backfill(dir)?;
    // Patterns removed again before they were fetched are dropped: the sync token can no
    // longer read them, and trying would fail every iteration.
    let mut pending: Vec<String> = before
        .iter()
        .filter(|r| new.repositories.contains(r))
        .cloned()
        .collect();
    for r in &new.repositories {
        if !old.repositories.contains(r) && !pending.contains(r) {
            pending.push(r.clone());
        }
    }
    if pending == before {
        return Ok(());
    }
    if pending.is_empty() {
        return clear_backfill(dir);
    }
    write_state(
        &dir.join("backfill.json"),
        serde_json::to_string(&pending).unwrap_or_default(),
    )
}

/// Repository patterns added to the scope whose content is still to fetch.
fn backfill(dir: &Path) -> Result<Vec<String>> {
    let path = dir.join("backfill.json");
    match read_state(&path)? {
        None => Ok(Vec::new()),
        Some(s) => match serde_json::from_str(&s) {
            Ok(v) => Ok(v),
            Err(e) => {
                // What it listed is lost: reconciling everything in scope fetches it too.
                tracing::warn!(path = %path.display(), error = %e, "the list of repositories to backfill is unreadable; reconciling every repository in scope instead");
                forget_cursor(dir)?;
                clear_backfill(dir)?;
                Ok(Vec::new())
            }
        },
    }
}

/// Drops the message cursor, so the next iteration reconciles every repository in scope.
fn forget_cursor(dir: &Path) -> Result<()> {
    let path = dir.join("cursor");
    match std::fs::remove_file(&path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(state_err(&path)(e)),
        _ => Ok(()),
    }
}

/// [`write_state`] unless the file already holds `data`: a restart on a full disk must not
/// fail for rewriting what is there.
fn write_state_if_changed(path: &Path, data: &str) -> Result<()> {
    if read_state(path).ok().flatten().as_deref() == Some(data) {
        return Ok(());
    }
    write_state(path, data)
}

fn clear_backfill(dir: &Path) -> Result<()> {
    match std::fs::remove_file(dir.join("backfill.json")) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(state_err(dir)(e)),
        _ => Ok(()),
    }
}

/// Whether sending a local change failed in a way no retry will fix: the parent denied it
/// (403), or refused its content with a registry error code that says the content itself is
/// unacceptable (an invalid name, tag or manifest, a size over its limit, an unsupported
/// kind, the deletion of a manifest an index there lists), or the change can no longer be
/// read here (deleted meanwhile, unparsable).
/// Everything else — a cut upload (`BLOB_UPLOAD_INVALID`), a blob the parent lacks for now,
/// a 4xx without a registry code (a proxy's answer), an odd reply — is retried.
fn refused_for_good(e: &SyncError) -> bool {
    match e {
        SyncError::Denied { .. } => true,
        SyncError::Parent { status, code, .. } => {
            (400..500).contains(status)
                && matches!(
                    code.as_str(),
                    "NAME_INVALID"
                        | "TAG_INVALID"
                        | "MANIFEST_INVALID"
                        | "SIZE_INVALID"
                        | "UNSUPPORTED"
                        | "DIGEST_INVALID"
                        | "DENIED"
                        | "MANIFEST_REFERENCED"
                )
        }
        SyncError::Registry(
            RegistryError::BlobUnknown(_)
            | RegistryError::ManifestUnknown(_)
            | RegistryError::NameUnknown(_)
            | RegistryError::ManifestInvalid(_),
        ) => true,
        _ => false,
    }
}

/// Whether the parent refused a manifest because it lacks a blob or child manifest the
/// manifest references.
fn parent_misses_references(e: &SyncError) -> bool {
    matches!(e, SyncError::Parent { status: 400, code, .. } if code == "MANIFEST_BLOB_UNKNOWN" || code == "MANIFEST_UNKNOWN")
}

/// Whether `e` says the parent lacks content it references (its blob or a child manifest
/// answers 404 with the registry's `BLOB_UNKNOWN` / `MANIFEST_UNKNOWN`, or a child manifest
/// is gone): waiting will not bring it, so the manifest is skipped, not retried in a loop that
/// holds up everything after it. A 404 without a registry code (a proxy's) is retried as usual.
fn parent_lacks_content(e: &SyncError) -> bool {
    match e {
        SyncError::Parent {
            status: 404, code, ..
        } => matches!(code.as_str(), "BLOB_UNKNOWN" | "MANIFEST_UNKNOWN"),
        SyncError::MissingAtParent(_) => true,
        _ => false,
    }
}

/// A manifest the parent lists but cannot serve whole (a tag's, or a referrer's with no tag).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
struct Skipped {
    repository: String,
    tag: Option<String>,
    digest: String,
    reason: String,
    since: String,
}

/// What to do at the parent about a manifest skipped for `reason`.
fn repair_advice(reason: &str) -> &'static str {
    if reason.contains(", which ") && reason.ends_with(" lists") {
        // An index whose child was deleted by digest at the parent (which a registry may
        // allow): nothing is damaged, and pushing the child again might undo a withdrawal.
        "The parent's index lists a manifest the parent no longer holds (deleted there by digest): delete the index there too, or push that manifest again if its deletion was a mistake"
    } else {
        "Push the image to the parent again to repair it there"
    }
}

impl Skipped {
    fn same(&self, other: &Skipped) -> bool {
        self.repository == other.repository && self.tag == other.tag && self.digest == other.digest
    }
}

/// A local change the parent refused for good: a tag this site's client set (`tag`), or a
/// manifest it pushed.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, serde::Serialize, serde::Deserialize)]
struct RefusedChange {
    repository: String,
    tag: Option<String>,
    digest: String,
}

/// The local changes the parent refused for good, kept in `sync/refused.json`. The parent never
/// had what they put here, so a full reconciliation must not take it for something deleted
/// there: it keeps those tags and manifests, and offers the tags to the parent again (the
/// repository may have been added to the sync token's scope since, which is what reconciles
/// it). An entry goes when the parent takes it (or holds the manifest by then); one that went
/// stale here (the tag moved on, the manifest deleted) protects nothing and just stays.
struct RefusedList {
    path: PathBuf,
    items: Mutex<std::collections::BTreeSet<RefusedChange>>,
}

impl RefusedList {
    /// The most entries kept: past it, entries go in name order (a bound on the file, not a
    /// policy; what they protected was reported as `OutboxEntryRefused`).
    const MAX: usize = 10_000;

    /// An unreadable list stops the sync, like an unreadable outbox cursor: starting a new
    /// one would let the next full reconciliation delete the changes it protected, which
    /// exist nowhere else.
    fn load(dir: &Path) -> Result<RefusedList> {
        let path = dir.join("refused.json");
        let items = match read_state(&path)? {
            None => Default::default(),
            Some(s) => serde_json::from_str(&s).map_err(|e| SyncError::State {
                path: path.clone(),
                cause: std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    format!(
                        "{e}: it lists this site's pushes its parent refused, which exist only here and which a full reconciliation would otherwise delete as gone from the parent; restore it from a backup, or remove it to let the parent's content win"
                    ),
                ),
            })?,
        };
        Ok(RefusedList {
            path,
            items: Mutex::new(items),
        })
    }

    fn update(&self, f: impl FnOnce(&mut std::collections::BTreeSet<RefusedChange>)) -> Result<()> {
        let json = {
            let mut items = self.items.lock().unwrap_or_else(|p| p.into_inner());
            let before = items.len();
            f(&mut items);
            if items.len() == before {
                return Ok(());
            }
            serde_json::to_string(&*items).unwrap_or_default()
        };
        write_state(&self.path, &json)
    }

    fn add(&self, change: RefusedChange) -> Result<()> {
        self.update(|items| {
            if items.insert(change) && items.len() > Self::MAX {
                items.pop_first();
            }
        })
    }

    fn remove(&self, change: &RefusedChange) -> Result<()> {
        self.update(|items| {
            items.remove(change);
        })
    }

    /// Forgets the untagged entries of `repo` whose manifest `held(digest)` says the parent
    /// holds now.
    fn forget_held(&self, repo: &str, held: impl Fn(&str) -> bool) {
        let result = self.update(|items| {
            items.retain(|c| !(c.repository == repo && c.tag.is_none() && held(&c.digest)));
        });
        if let Err(e) = result {
            tracing::warn!(error = %e, "could not update the list of refused local changes");
        }
    }

    /// Whether the parent refused this site's `repo:tag` → `digest`.
    fn has_tag(&self, repo: &str, tag: &str, digest: &str) -> bool {
        let items = self.items.lock().unwrap_or_else(|p| p.into_inner());
        items.contains(&RefusedChange {
            repository: repo.to_string(),
            tag: Some(tag.to_string()),
            digest: digest.to_string(),
        })
    }

    /// Whether the parent refused a change of this site's that put `repo@digest` here.
    fn has_manifest(&self, repo: &str, digest: &str) -> bool {
        let items = self.items.lock().unwrap_or_else(|p| p.into_inner());
        items
            .iter()
            .any(|c| c.repository == repo && c.digest == digest)
    }
}

/// What was skipped because the parent could not serve it, kept in `sync/skipped.json` across
/// restarts, retried at every poll interval, and reported as `ParentContentMissing` until it
/// arrives or the parent no longer points at it. This is what keeps one broken image at the
/// parent (a layer file lost there) from stopping the sync of everything else. Nothing is ever
/// dropped unretried: when the list is full, nothing more is skipped (the sync stops at the
/// next one, as it did before skipping existed).
struct SkipList {
    path: PathBuf,
    items: Mutex<Vec<Skipped>>,
    last_retry: Mutex<Option<std::time::Instant>>,
}

impl SkipList {
    /// The most entries kept.
    const MAX: usize = 10_000;
    /// How many are tried in one round (the tried ones go to the back of the list).
    const PER_ROUND: usize = 20;
    /// How many are shown as status details one by one (the rest as one summary).
    const SHOWN: usize = 10;

    /// Loads the list. One that cannot be read is replaced by an empty one and the cursor is
    /// forgotten: the full reconcile that follows finds what is still missing.
    fn load(dir: &Path) -> SkipList {
        let path = dir.join("skipped.json");
        let items = match read_state(&path).map_err(|e| e.to_string()).and_then(|s| {
            s.map(|s| serde_json::from_str(&s).map_err(|e| e.to_string()))
                .transpose()
        }) {
            Ok(items) => items.unwrap_or_default(),
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "the list of skipped manifests is unreadable; reconciling every repository in scope to find them again");
                if let Err(e) = forget_cursor(dir) {
                    tracing::warn!(error = %e, "could not forget the cursor; run `outpost connected-registry resync` at the parent");
                }
                // Replaced, so the next start does not reconcile again for the same damage.
                if let Err(e) = write_state(&path, "[]") {
                    tracing::warn!(error = %e, "could not replace the list of skipped manifests");
                }
                Vec::new()
            }
        };
        SkipList {
            path,
            items: Mutex::new(items),
            last_retry: Mutex::new(None),
        }
    }

    fn list(&self) -> Vec<Skipped> {
        self.items.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Changes the list with `f` and saves it if it changed.
    fn update(&self, f: impl FnOnce(&mut Vec<Skipped>)) -> Result<()> {
        let json = {
            let mut items = self.items.lock().unwrap_or_else(|p| p.into_inner());
            let before = items.clone();
            f(&mut items);
            if *items == before {
                return Ok(());
            }
            serde_json::to_string(&*items).unwrap_or_default()
        };
        write_state(&self.path, &json)
    }

    /// Records `entry` (keeping the first `since` of one already there). `false` when the list
    /// is full and it was not recorded.
    fn add(&self, entry: Skipped) -> Result<bool> {
        let mut added = true;
        self.update(|items| {
            // One manifest is one entry: a tag's entry covers the same manifest by digest.
            let covered = |s: &Skipped| {
                s.repository == entry.repository && s.digest == entry.digest && s.tag.is_some()
            };
            if items.iter().any(|s| s.same(&entry))
                || (entry.tag.is_none() && items.iter().any(covered))
            {
                return;
            }
            if entry.tag.is_some() {
                items.retain(|s| {
                    !(s.repository == entry.repository
                        && s.digest == entry.digest
                        && s.tag.is_none())
                });
            }
            if items.len() >= Self::MAX {
                added = false;
                return;
            }
            items.push(entry);
        })?;
        Ok(added)
    }

    /// Whether `entry`'s manifest is on the list already.
    fn has(&self, entry: &Skipped) -> bool {
        self.items
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .any(|s| s.same(entry))
    }

    /// `digest` arrived in `repo` (under `tag`, if given): entries it settles leave the list.
    /// Entries for the same manifest under another tag stay; their retry sets their tag.
    fn arrived(&self, repo: &str, tag: Option<&str>, digest: &str) -> Result<()> {
        let settled = |s: &Skipped| {
            s.repository == repo
                && s.digest == digest
                && (s.tag.is_none() || s.tag.as_deref() == tag)
        };
        if !self
            .items
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .any(settled)
        {
            return Ok(());
        }
        self.update(|items| items.retain(|s| !settled(s)))
    }

    /// The next entries to retry; they move to the back of the list (in memory: the order
    /// is not worth a write), so every entry gets its turn however many there are.
    fn next_round(&self) -> Vec<Skipped> {
        let mut items = self.items.lock().unwrap_or_else(|p| p.into_inner());
        let n = items.len().min(Self::PER_ROUND);
        let round: Vec<Skipped> = items.drain(..n).collect();
        items.extend(round.iter().cloned());
        round
    }

    fn details(&self) -> Vec<StatusDetail> {
        let items = self.list();
        let mut details: Vec<StatusDetail> = items
            .iter()
            .take(Self::SHOWN)
            .map(|s| StatusDetail {
                kind: "Sync".into(),
                code: "ParentContentMissing".into(),
                description: format!(
                    "{}{} ({}) is skipped: {}; it is retried at every sync. {}",
                    s.repository,
                    s.tag
                        .as_deref()
                        .map(|t| format!(":{t}"))
                        .unwrap_or_default(),
                    s.digest,
                    s.reason,
                    repair_advice(&s.reason)
                ),
                timestamp: Some(s.since.clone()),
                correlation_id: None,
            })
            .collect();
        if items.len() > Self::SHOWN {
            details.push(StatusDetail {
                kind: "Sync".into(),
                code: "ParentContentMissing".into(),
                description: format!(
                    "{} more manifests are skipped because the parent cannot serve them (listed in sync/skipped.json at the site)",
                    items.len() - Self::SHOWN
                ),
                timestamp: None,
                correlation_id: None,
            });
        }
        details
    }
}

/// Problems found while sending this site's changes up that the parent should show until they
/// age out: tag conflicts and outbox entries the parent refused for good. Kept in
/// `sync/notices.json` so a restart does not erase them.
struct Notices {
    path: PathBuf,
    items: Mutex<Vec<(i64, StatusDetail)>>,
}

impl Notices {
    const KEEP_MS: i64 = 24 * 3600 * 1000;
    const MAX: usize = 20;

    fn load(dir: &Path) -> Notices {
        let path = dir.join("notices.json");
        let items = read_state(&path)
            .ok()
            .flatten()
            .and_then(|s| serde_json::from_str(&s).ok())
            .unwrap_or_default();
        Notices {
            path,
            items: Mutex::new(items),
        }
    }

    /// Adds `detail` (the newest `MAX` within `KEEP_MS` are kept) and saves the list.
    fn push(&self, detail: StatusDetail) -> Result<()> {
        let now = now_ms();
        let json = {
            let mut items = self.items.lock().unwrap_or_else(|p| p.into_inner());
            items.retain(|(at, _)| now - at < Self::KEEP_MS);
            items.push((now, detail));
            let excess = items.len().saturating_sub(Self::MAX);
            items.drain(..excess);
            serde_json::to_string(&*items).unwrap_or_default()
        };
        write_state(&self.path, &json)
    }

    /// Drops the `OutboxEntryRefused` notices about `what` (`tag_set of repo:tag`,
    /// `manifest_put of repo@digest`): the parent took it after all.
    fn settle(&self, what: &str) {
        let about = format!("this site's {what} and it will not be retried");
        let json = {
            let mut items = self.items.lock().unwrap_or_else(|p| p.into_inner());
            let before = items.len();
            items.retain(|(_, d)| {
                !(d.code == "OutboxEntryRefused" && d.description.contains(&about))
            });
            if items.len() == before {
                return;
            }
            serde_json::to_string(&*items).unwrap_or_default()
        };
        if let Err(e) = write_state(&self.path, &json) {
            tracing::warn!(error = %e, "could not update the notices");
        }
    }

    fn current(&self) -> Vec<StatusDetail> {
        let now = now_ms();
        self.items
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .filter(|(at, _)| now - at < Self::KEEP_MS)
            .map(|(_, d)| d.clone())
            .collect()
    }
}

/// The root's time, as far as this node knows it: what it reports goes by it.
fn now_ms() -> i64 {
    outpost_control::clock::now_ms()
}

fn now_rfc3339() -> String {
    outpost_control::format_rfc3339(now_ms())
}

/// Activates at the parent (or, if it is unreachable and this instance activated before,
/// continues from its saved configuration), applies the configuration and starts syncing.
/// How long a restart with a saved configuration waits for each of its first requests to
/// the parent before it serves what it has (see [`start`]).
const FIRST_CONTACT: Duration = Duration::from_secs(5);

pub async fn start(
    opts: ChildOptions,
    registry: Registry,
    control: Arc<Control>,
) -> Result<Started> {
    let dir = opts.data_dir.join("sync");
    std::fs::create_dir_all(dir.join("partial")).map_err(state_err(&dir))?;
    let id_path = dir.join("instance-id");
    let instance_id = match read_state(&id_path)? {
        Some(id) if id.trim().is_empty() => {
            return Err(SyncError::State {
                path: id_path.clone(),
                cause: std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    "the instance id is empty; delete the file to start as a new instance (then deactivate the old one at the parent with `outpost connected-registry deactivate`)",
                ),
            });
        }
        Some(id) => id,
        None => {
            let id = uuid::Uuid::new_v4().to_string();
            write_state(&id_path, &id)?;
            id
        }
    };
    let parent = Parent::new(
        &opts.connection_string,
        opts.parent_ca.as_ref(),
        opts.read_timeout,
    )?;
    let config_path = dir.join("config.json");
    let mut damaged = None;
    let saved_text = read_state(&config_path)?;
    // Another registry's content and client tokens must not be served under this name.
    if let Some(owner) = saved_owner(&opts.data_dir)
        && owner != opts.connection_string.connected_registry_name
    {
        return Err(SyncError::State {
            path: config_path,
            cause: std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!(
                    "this data directory belongs to connected registry {owner:?}, but the connection string names {:?}; use that registry's data directory",
                    opts.connection_string.connected_registry_name
                ),
            ),
        });
    }
    let saved: Option<SyncConfig> = match saved_text {
        None => None,
        Some(s) => match serde_json::from_str::<SyncConfig>(&s) {
            Ok(c) => Some(c),
            Err(e) => {
                // Without it, scope added while this instance was stopped cannot be told
                // apart: reconcile everything in scope instead.
                tracing::warn!(path = %config_path.display(), error = %e, "the saved configuration is unreadable; reconciling every repository in scope with the parent");
                forget_cursor(&dir)?;
                damaged = Some(e.to_string());
                None
            }
        },
    };
    let mut activated = true;
    // With a saved configuration this instance can serve at once: its clients wait for a
    // parent that answers slowly or not at all (a stalled link) at most FIRST_CONTACT per
    // request, not the whole read timeout, before it serves what it has and goes on trying
    // in the background.
    let bound = match saved {
        Some(_) => FIRST_CONTACT,
        None => opts.read_timeout,
    };
    let unanswered = || SyncError::Unreachable {
        parent: parent.base().to_string(),
        reason: format!("no answer within {} s", bound.as_secs()),
    };
    let activate = || async {
        tokio::time::timeout(bound, parent.activate(&instance_id))
            .await
            .unwrap_or_else(|_| Err(unanswered()))
    };
    let mut first = activate().await;
    // A password generated a moment ago reaches a parent that is itself a connected registry
    // at its next sync (within a second or so when it is online): ask again before giving up.
    for wait in [1, 2, 4] {
        if !matches!(first, Err(SyncError::BadCredentials { .. })) {
            break;
        }
        tracing::warn!(
            retry_in_secs = wait,
            "the parent refused this sync token's password; asking again in case it has not learnt a new password yet"
        );
        tokio::time::sleep(Duration::from_secs(wait)).await;
        first = activate().await;
    }
    let first = match first {
        Ok(()) => tokio::time::timeout(bound, parent.config(None))
            .await
            .unwrap_or_else(|_| Err(unanswered())),
        Err(e) => Err(e),
    };
    let config = match first {
        Ok(got) => {
            let (cfg, etag) = got.ok_or_else(|| {
                SyncError::Protocol("the parent answered 304 to an unconditional request".into())
            })?;
            // Scope added while this instance was stopped (a first start reconciles anyway).
            if let Some(saved) = &saved
                && let Err(e) = add_backfill(&dir, saved, &cfg)
            {
                tracing::warn!(error = %e, "cannot record the repositories added to the scope; reconciling every repository in scope instead");
                forget_cursor(&dir)?;
            }
            // Unchanged files are not rewritten, and a failure (a full disk) does not keep
            // the site from serving: the run loop retries and reports it to the parent.
            let keep = write_state_if_changed(
                &config_path,
                &serde_json::to_string(&cfg).unwrap_or_default(),
            )
            .and_then(|()| match &etag {
                Some(e) => write_state_if_changed(&dir.join("etag"), e),
                None => Ok(()),
            });
            if let Err(e) = keep {
                tracing::warn!(error = %e, "cannot save the parent's configuration; serving with it and retrying");
            }
            tracing::info!(parent = parent.base(), name = %cfg.name, mode = %cfg.mode, "activated at the parent");
            cfg
        }
        Err(e @ (SyncError::Unreachable { .. } | SyncError::Interrupted { .. })) => {
            match (saved, damaged) {
                (Some(cfg), _) => {
                    tracing::warn!(error = %e, "parent unreachable; serving what is here and retrying in the background");
                    activated = false;
                    cfg
                }
                (None, Some(why)) => {
                    return Err(SyncError::State {
                        path: config_path,
                        cause: std::io::Error::new(
                            std::io::ErrorKind::InvalidData,
                            format!(
                                "the saved configuration is unreadable ({why}) and the parent cannot be reached to fetch it again ({e}); restore the file or start once the parent is reachable"
                            ),
                        ),
                    });
                }
                (None, None) => return Err(e),
            }
        }
        Err(e) => return Err(e),
    };
    // Notifications are made for what happens from the first start on: a new site's first
    // sync, but not the history of a data directory that ran before notifications existed.
    // Not being able to write it (a full disk) must not stop the start.
    let notify_cursor = dir.join("notify-cursor");
    if read_outbox_cursor(&notify_cursor)?.is_none() {
        let latest = registry
            .meta()
            .latest_event()
            .await
            .map_err(|e| SyncError::Registry(e.into()))?;
        if let Err(e) = write_state(&notify_cursor, latest.to_string()) {
            tracing::warn!(error = %e, "could not record where notifications start; they start from the first sync that can");
        }
    }
    let notices = Notices::load(&dir);
    let skipped = SkipList::load(&dir);
    let refused = RefusedList::load(&dir)?;
    let child = Arc::new(Child {
        role: Role::Gateway,
        parent,
        registry: registry.for_sync(),
        control,
        etag: Mutex::new(read_state(&dir.join("etag"))?),
        dir,
        instance_id,
        login_server: opts.login_server,
        poll_wait: opts.poll_wait,
        config: Mutex::new(config.clone()),
        last_error: Mutex::new(None),
        deadline: Mutex::new(None),
        notices,
        skipped,
        refused,
        log_level_hook: opts.log_level_hook.clone(),
        log_level: Mutex::new(None),
        fetching: Mutex::default(),
        damaged: Mutex::default(),
        lag: Mutex::new(None),
        gc: tokio::sync::watch::Sender::new(config.garbage_collection.clone()),
        scope: tokio::sync::watch::Sender::new(outpost_control::connected::SyncScope::of(&config)),
        activated: std::sync::atomic::AtomicBool::new(activated),
        pruned: std::sync::atomic::AtomicBool::new(false),
        failure_reported: std::sync::atomic::AtomicBool::new(true),
        progressed: std::sync::atomic::AtomicBool::new(false),
        up_piece: std::sync::atomic::AtomicU64::new(UP_PIECE_BYTES),
        sent_tags: Mutex::default(),
        unrepaired: Mutex::default(),
    });
    let gc = child.gc.subscribe();
    let scope = child.scope.subscribe();
    child.registry.metrics().sync_started();
    child.registry.repair_from_parent();
    child.apply_config(&config).await?;
    child
        .control
        .set_upstream(Arc::new(Relay(child.parent.clone())));
    let read_only = config.mode == "ReadOnly";
    let task = tokio::spawn(child.run());
    Ok(Started {
        read_only,
        scope: Some(scope),
        task,
        gc: Some(gc),
    })
}

/// Starts mirroring a plain OCI registry: the repositories are reconciled at start and then
/// every `interval`; local clients may only read.
pub async fn start_mirror(
    opts: MirrorOptions,
    registry: Registry,
    control: Arc<Control>,
) -> Result<Started> {
    if opts.repositories.is_empty() {
        return Err(SyncError::Protocol(
            "upstream_repositories is empty: name the repositories to mirror".into(),
        ));
    }
    for r in &opts.repositories {
        r.parse::<RepoName>()
            .map_err(|e| SyncError::Protocol(format!("upstream_repositories: {e}")))?;
    }
    let dir = opts.data_dir.join("sync");
    std::fs::create_dir_all(dir.join("partial")).map_err(state_err(&dir))?;
    let parent = Parent::plain(
        &opts.url,
        opts.credentials.clone(),
        opts.parent_ca.as_ref(),
        opts.read_timeout,
    )?;
    match parent.probe().await {
        Ok(()) => {
            tracing::info!(upstream = parent.base(), repositories = ?opts.repositories, "mirroring a plain registry")
        }
        Err(e @ SyncError::Unreachable { .. }) => {
            tracing::warn!(error = %as_mirror(&e), "upstream unreachable; serving what is here and retrying")
        }
        // Busy, rate-limited or failing for the moment: no mistake of this mirror's.
        Err(e @ SyncError::Parent { status, .. }) if status == 429 || status >= 500 => {
            tracing::warn!(error = %as_mirror(&e), "the upstream cannot answer for now; serving what is here and retrying")
        }
        // A mirror that holds content serves it whatever the upstream says (a password
        // changed there, a proxy's error page) and keeps trying; only a first start, with
        // nothing to serve, stops at once on a refusal, so that the mistake is seen.
        Err(e) if !registry.catalog(Some(1), None).await?.is_empty() => {
            tracing::warn!(error = %as_mirror(&e), "the upstream refuses this mirror; serving what is here and retrying")
        }
        Err(e) => return Err(e),
    }
    let config = SyncConfig {
        name: "mirror".into(),
        mode: "ReadOnly".into(),
        repositories: opts.repositories.clone(),
        sync_schedule: outpost_control::connected::CONTINUOUS.into(),
        sync_window: None,
        sync_message_ttl: "P2D".into(),
        log_level: "Information".into(),
        notifications: Vec::new(),
        garbage_collection: outpost_control::connected::GarbageCollection {
            enabled: true,
            schedule: "0 0 * * *".into(),
        },
        resync_requested: false,
        client_tokens: Vec::new(),
        sync_token: None,
        children: Vec::new(),
        created_ms: None,
        activation_status: None,
    };
    let config_gc = config.garbage_collection.clone();
    let notices = Notices::load(&dir);
    let skipped = SkipList::load(&dir);
    let refused = RefusedList::load(&dir)?;
    let child = Arc::new(Child {
        role: Role::Plain {
            interval: opts.interval,
        },
        parent,
        registry,
        control,
        etag: Mutex::new(None),
        dir,
        instance_id: String::new(),
        login_server: String::new(),
        poll_wait: opts.interval,
        config: Mutex::new(config),
        last_error: Mutex::new(None),
        deadline: Mutex::new(None),
        notices,
        skipped,
        refused,
        log_level_hook: None,
        log_level: Mutex::new(None),
        fetching: Mutex::default(),
        damaged: Mutex::default(),
        lag: Mutex::new(None),
        gc: tokio::sync::watch::Sender::new(config_gc),
        scope: tokio::sync::watch::Sender::default(),
        activated: std::sync::atomic::AtomicBool::new(true),
        pruned: std::sync::atomic::AtomicBool::new(true),
        failure_reported: std::sync::atomic::AtomicBool::new(false),
        progressed: std::sync::atomic::AtomicBool::new(false),
        up_piece: std::sync::atomic::AtomicU64::new(UP_PIECE_BYTES),
        sent_tags: Mutex::default(),
        unrepaired: Mutex::default(),
    });
    child.registry.metrics().sync_started();
    child.registry.repair_from_parent();
    let task = tokio::spawn(child.run());
    Ok(Started {
        read_only: true,
        scope: None,
        task,
        gc: None,
    })
}

impl Child {
    /// Where a client change this site sends up was made, for conflict reports: at a site
    /// with connected registries below it, the change may be theirs (their pushes reach it
    /// as a client's).
    fn here(&self) -> &'static str {
        if self.config().children.is_empty() {
            "this site"
        } else {
            "this site (or a connected registry below it)"
        }
    }

    fn config(&self) -> SyncConfig {
        self.config
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// The message cursor: the parent's last event handled, and its mark (when the parent
    /// wrote it, see `MessagePage::next_mark`) when known. The file holds `seq` or
    /// `seq mark`.
    fn cursor(&self) -> Result<Option<(i64, Option<i64>)>> {
        Ok(read_state(&self.dir.join("cursor"))?.and_then(|s| {
            let mut words = s.split_whitespace();
            let seq = words.next()?.parse().ok()?;
            Some((seq, words.next().and_then(|m| m.parse().ok())))
        }))
    }

    fn set_cursor(&self, c: Option<(i64, Option<i64>)>) -> Result<()> {
        let path = self.dir.join("cursor");
        match c {
            Some((seq, None)) => write_state(&path, seq.to_string()),
            Some((seq, Some(mark))) => write_state(&path, format!("{seq} {mark}")),
            None => match std::fs::remove_file(&path) {
                Ok(()) => Ok(()),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
                Err(e) => Err(state_err(&path)(e)),
            },
        }
    }

    /// Installs the client tokens and the descendants (their resources and sync tokens), so
    /// this node authenticates its clients and serves its children, also offline.
    async fn apply_config(&self, cfg: &SyncConfig) -> Result<()> {
        let unreadable: Vec<&str> = cfg
            .repositories
            .iter()
            .filter(|r| RepoPattern::parse(r).is_err())
            .map(String::as_str)
            .take(10)
            .collect();
        if !unreadable.is_empty() {
            tracing::warn!(entries = ?unreadable, "the parent's scope has repositories or patterns this build cannot read (a parent of a later version?); they are not synced");
        }
        let scope = outpost_control::connected::SyncScope::of(cfg);
        self.scope.send_if_modified(|s| {
            let changed = *s != scope;
            *s = scope;
            changed
        });
        self.gc.send_if_modified(|g| {
            let changed = *g != cfg.garbage_collection;
            if changed {
                tracing::info!(enabled = cfg.garbage_collection.enabled, schedule = %cfg.garbage_collection.schedule, "applying the garbage-collection setting of the parent");
                *g = cfg.garbage_collection.clone();
            }
            changed
        });
        if let Some(hook) = &self.log_level_hook {
            let mut applied = self.log_level.lock().unwrap_or_else(|p| p.into_inner());
            if applied.as_deref() != Some(cfg.log_level.as_str()) {
                tracing::info!(level = %cfg.log_level, "applying the log level set at the parent");
                match hook(&cfg.log_level) {
                    Ok(()) => *applied = Some(cfg.log_level.clone()),
                    Err(e) => {
                        tracing::warn!(level = %cfg.log_level, error = %e, "cannot apply the parent's log level")
                    }
                }
            }
        }
        let mut tokens = cfg.client_tokens.clone();
        descendant_tokens(&cfg.children, &mut tokens);
        self.apply_tokens(&tokens).await?;
        self.control
            .apply_descendants(&cfg.children)
            .await
            .map_err(|e| SyncError::Protocol(format!("applying descendants: {e}")))
    }

    async fn apply_tokens(&self, tokens: &[ClientTokenConfig]) -> Result<()> {
        let path = self.dir.join("client-tokens.json");
        let mut previous: Vec<String> = match read_state(&path)? {
            None => Vec::new(),
            Some(s) => serde_json::from_str(&s).unwrap_or_else(|e| {
                tracing::warn!(path = %path.display(), error = %e, "the list of installed client tokens is unreadable; using the tokens in the database");
                Vec::new()
            }),
        };
        let installed =
            self.control.synced_token_names().await.map_err(|e| {
                SyncError::Protocol(format!("listing installed client tokens: {e}"))
            })?;
        previous.extend(installed);
        previous.sort();
        previous.dedup();
        self.control
            .apply_synced_tokens(tokens, &previous)
            .await
            .map_err(|e| SyncError::Protocol(format!("applying client tokens: {e}")))?;
        let names: Vec<&str> = tokens.iter().map(|t| t.name.as_str()).collect();
        write_state(&path, serde_json::to_string(&names).unwrap_or_default())
    }

    /// Stops work at piece boundaries once the sync window has closed.
    fn check_window(&self) -> Result<()> {
        match *self.deadline.lock().unwrap_or_else(|p| p.into_inner()) {
            Some(d) if std::time::Instant::now() >= d => Err(SyncError::WindowClosed),
            _ => Ok(()),
        }
    }

    /// How long a long-poll may wait: the configured wait, cut short by the window's end.
    fn poll_wait(&self) -> Duration {
        match *self.deadline.lock().unwrap_or_else(|p| p.into_inner()) {
            Some(d) => self
                .poll_wait
                .min(d.saturating_duration_since(std::time::Instant::now())),
            None => self.poll_wait,
        }
    }

    async fn run(self: Arc<Self>) {
        use outpost_control::connected::{Window, window_at};
        if let Role::Plain { interval } = self.role {
            let mut warned: Option<(String, std::time::Instant)> = None;
            loop {
                let cfg = self.config();
                if let Err(e) = self.retry_skipped(&cfg).await {
                    tracing::warn!(error = %e, "retrying skipped manifests failed; retrying later");
                }
                let mirrored = match self.repair_damaged().await {
                    Ok(()) => self.reconcile(&cfg).await,
                    Err(e) => Err(e),
                };
                // No parent hears a mirror's report: the metric is where skips show.
                self.registry
                    .metrics()
                    .sync_skipped(self.skipped.list().len());
                match mirrored {
                    Ok(()) => {
                        tracing::debug!("mirrored the upstream registry");
                        if warned.take().is_some() {
                            tracing::info!("mirroring the upstream registry works again");
                        }
                        *self.last_error.lock().unwrap_or_else(|p| p.into_inner()) = None;
                        self.current_details();
                        self.registry.sync_succeeded().await;
                    }
                    Err(e) => {
                        let link = matches!(
                            e,
                            SyncError::Unreachable { .. } | SyncError::Interrupted { .. }
                        );
                        // A transfer cut after it moved data goes on at once (from where it
                        // stopped), not a whole interval later; an upstream that asked to be
                        // left alone for longer than the interval is.
                        let retry_in = if link && self.progressed.swap(false, Relaxed) {
                            Duration::from_secs(1) + jitter()
                        } else {
                            interval.max(self.parent.asked_to_wait().unwrap_or_default())
                        };
                        self.record_failure(&e);
                        let key = repeat_key(&e);
                        match &warned {
                            Some((last, at)) if *last == key && at.elapsed() < REPEAT_QUIET => {
                                tracing::debug!(error = %as_mirror(&e), ?retry_in, "mirroring the upstream registry failed again");
                            }
                            _ => {
                                tracing::warn!(error = %as_mirror(&e), ?retry_in, "mirroring the upstream registry failed; retrying");
                                warned = Some((key, std::time::Instant::now()));
                            }
                        }
                        self.registry
                            .metrics()
                            .sync_failed(!link && !e.is_refusal());
                        tokio::time::sleep(retry_in).await;
                        continue;
                    }
                }
                self.progressed.store(false, Relaxed);
                let next = tokio::time::sleep(interval);
                tokio::pin!(next);
                loop {
                    tokio::select! {
                        () = &mut next => break,
                        // Fetched again at once, not an interval later.
                        () = self.registry.damage_found() => {
                            if let Err(e) = self.repair_damaged().await {
                                tracing::debug!(error = %as_mirror(&e), "fetching a damaged blob again failed; it is tried at its next read");
                            }
                        }
                    }
                }
            }
        }
        let mut backoff = Duration::from_secs(1);
        // The failure last logged as a warning, and when: the same one again is logged at
        // debug level for REPEAT_QUIET (a site whose parent is away for a day would
        // otherwise log a warning every 15 s), and the end of a failure once, at info level.
        let mut warned: Option<(String, std::time::Instant)> = None;
        // While the window is closed: the opening last announced, and the last contact.
        let mut announced: Option<jiff::Timestamp> = None;
        let mut contacted: Option<std::time::Instant> = None;
        loop {
            let cfg = self.config();
            // Windows are the root's schedule: by its time, not by a clock that may be off.
            let now = jiff::Timestamp::from_millisecond(now_ms())
                .unwrap_or_else(|_| jiff::Timestamp::now());
            let deadline = match window_at(&cfg.sync_schedule, cfg.sync_window.as_deref(), now) {
                Ok(Window::Open { until }) => {
                    // A window that closes again is announced again, even with the same
                    // next opening (a clock set back into it, then forward).
                    announced = None;
                    let left = Duration::try_from(until.duration_since(now)).unwrap_or_default();
                    Some(std::time::Instant::now() + left)
                }
                Ok(Window::Closed { opens }) => {
                    if announced != Some(opens) {
                        tracing::info!(opens = %opens, "outside the sync window; syncing resumes when it opens");
                        announced = Some(opens);
                    }
                    // A cheap contact now and then (nothing is synced): the root hears from
                    // the site, and a changed schedule reaches it before the next window.
                    let every = self.poll_wait * CLOSED_WINDOW_CONTACT;
                    if contacted.is_none_or(|t| t.elapsed() >= every) {
                        contacted = Some(std::time::Instant::now());
                        if let Err(e) = self.contact().await {
                            tracing::debug!(error = %e, "no contact with the parent outside the sync window");
                        }
                        continue;
                    }
                    let next_contact =
                        contacted.map_or(Duration::ZERO, |t| every.saturating_sub(t.elapsed()));
                    let wait = Duration::try_from(opens.duration_since(now)).unwrap_or_default();
                    tokio::time::sleep(wait.min(next_contact).min(Duration::from_secs(60))).await;
                    continue;
                }
                Ok(Window::Continuous) | Err(_) => None,
            };
            *self.deadline.lock().unwrap_or_else(|p| p.into_inner()) = deadline;
            match self.iteration().await {
                Ok(()) => {
                    backoff = Duration::from_secs(1);
                    if let Some((failure, _)) = warned.take() {
                        tracing::info!(after = %failure, "sync with the parent works again");
                    }
                    self.progressed.store(false, Relaxed);
                    self.registry.sync_succeeded().await;
                    // A whole iteration went through: whatever failed before is over.
                    *self.last_error.lock().unwrap_or_else(|p| p.into_inner()) = None;
                    self.current_details();
                    // The root still shows the failure when the iteration that recovered
                    // applied nothing (and so reported nothing): say so now.
                    if self.failure_reported.load(Relaxed)
                        && let Err(e) = self.report("Online", Outcome::Recovered).await
                    {
                        tracing::debug!(error = %e, "could not report the recovery to the parent");
                    }
                }
                Err(SyncError::WindowClosed) => {
                    tracing::info!(
                        "sync window closed; stopping here and resuming at the next window"
                    );
                    // No longer syncing, with what is still to apply: the root shows that
                    // until the next window rather than "Syncing".
                    if let Err(e) = self.report("Online", Outcome::Progress).await {
                        tracing::debug!(error = %e, "could not report the closed window to the parent");
                    }
                }
                Err(e) => {
                    let link = matches!(
                        e,
                        SyncError::Unreachable { .. } | SyncError::Interrupted { .. }
                    );
                    // A parent that is down (restarting, a link that drops) is tried again at
                    // least every 15 s, so a site is back in step soon after it is: a connect
                    // attempt costs the parent nothing. What it answered wrongly waits longer.
                    let cap = if link { LINK_RETRY_MAX } else { RETRY_MAX };
                    // A link that carried data since the last failure is used again at once:
                    // on one cut every 20 s, waiting out the backoff would leave no time to
                    // move anything.
                    if self.progressed.swap(false, Relaxed) {
                        backoff = Duration::from_secs(1);
                    }
                    backoff = backoff.min(cap);
                    // A parent that answered 429/503 with `Retry-After` is left alone that long.
                    let retry_in = backoff.max(self.parent.asked_to_wait().unwrap_or_default());
                    let text = repeat_key(&e);
                    match &warned {
                        Some((last, at)) if *last == text && at.elapsed() < REPEAT_QUIET => {
                            tracing::debug!(error = %e, ?retry_in, "sync iteration failed again");
                        }
                        _ => {
                            tracing::warn!(error = %e, ?retry_in, "sync iteration failed");
                            warned = Some((text, std::time::Instant::now()));
                        }
                    }
                    self.registry
                        .metrics()
                        .sync_failed(!link && !e.is_refusal());
                    // The outbox grows while the parent is away: that is when it is watched.
                    if let Some(depth) = self.outbox_depth().await {
                        self.registry.metrics().sync_outbox_depth(depth);
                    }
                    self.record_failure(&e);
                    // Tell the parent now if it can hear us: an error that recurs before the
                    // next successful report would otherwise never reach the root.
                    if let Err(report) = self.report("Online", Outcome::Failed).await {
                        tracing::debug!(error = %report, "could not report the failure to the parent");
                    }
                    tokio::time::sleep(retry_in + jitter()).await;
                    backoff = (backoff * 2).min(RETRY_MAX);
                }
            }
        }
    }

    /// Keeps `e` as the last failure, reported (and shown on the status page) until an
    /// iteration goes through.
    fn record_failure(&self, e: &SyncError) {
        *self.last_error.lock().unwrap_or_else(|p| p.into_inner()) = Some(StatusDetail {
            kind: "Sync".into(),
            code: e.status_code().into(),
            description: e.status_description(),
            timestamp: Some(now_rfc3339()),
            correlation_id: None,
        });
        self.current_details();
    }

    /// This registry's status details as it reports them: the last failure, notices and
    /// skipped manifests. Their codes are also kept for the status page.
    fn current_details(&self) -> Vec<StatusDetail> {
        let mut details: Vec<StatusDetail> = self
            .last_error
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .cloned()
            .collect();
        details.extend(self.notices.current());
        details.extend(self.skipped.details());
        details.extend(self.damage_details());
        let offset = outpost_control::clock::offset_ms();
        if offset.abs() >= outpost_control::clock::SKEW_WORTH_SAYING_MS {
            // Handled (this node goes by the parent's time), but the operator should know.
            details.push(StatusDetail {
                kind: NOTICE.into(),
                code: "ClockSkew".into(),
                description: outpost_control::clock::describe_skew(offset),
                timestamp: Some(now_rfc3339()),
                correlation_id: None,
            });
        }
        self.registry
            .metrics()
            .set_sync_problems(details.iter().map(|d| d.code.clone()).collect());
        details
    }

    async fn report(&self, state: &str, outcome: Outcome) -> Result<()> {
        let synced = outcome == Outcome::Synced;
        // A report under way carries the last failure until the iteration completes; once
        // it does, the recovery must be reported too, or the parent shows that failure on.
        let carries_failure = self
            .last_error
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .is_some();
        let lag = *self.lag.lock().unwrap_or_else(|p| p.into_inner());
        let outbox_depth = self.outbox_depth().await;
        let details = self.current_details();
        self.registry
            .metrics()
            .sync_skipped(self.skipped.list().len());
        let sent = self
            .parent
            .report(&StatusReport {
                instance_id: self.instance_id.clone(),
                state: Some(state.into()),
                last_sync_time: synced.then(now_rfc3339),
                last_sync_result: match outcome {
                    // Still the last attempt's failure (its detail goes with this report),
                    // even if the report that said so was lost with the link.
                    Outcome::Progress if carries_failure => Some("Failed".into()),
                    Outcome::Progress => None,
                    Outcome::Synced | Outcome::Recovered => Some("Succeeded".into()),
                    Outcome::Failed => Some("Failed".into()),
                },
                status_details: Some(details),
                version: Some(outpost_registry::version().into()),
                login_server: (!self.login_server.is_empty()).then(|| self.login_server.clone()),
                cursor_lag: lag,
                outbox_depth,
            })
            .await;
        if recorded_nothing(sent)? {
            return Ok(());
        }
        self.registry.sync_reported(synced, lag, outbox_depth).await;
        match outcome {
            Outcome::Progress if carries_failure => self.failure_reported.store(true, Relaxed),
            Outcome::Progress => {}
            Outcome::Failed => self.failure_reported.store(true, Relaxed),
            Outcome::Synced | Outcome::Recovered => self.failure_reported.store(false, Relaxed),
        }
        Ok(())
    }

    /// The parent refusing to serve this registry's feed because the resource is no longer
    /// active means the same as a refused status report: deactivated.
    fn deactivated_if_refused(&self, e: SyncError) -> SyncError {
        if not_active(&e) {
            SyncError::Deactivated(self.config().name.clone())
        } else {
            e
        }
    }

    /// The contact that opens each sync attempt, and that a scheduled site also makes every
    /// few minutes while its window is closed: activation if it is still due, a status report
    /// (version, address, outbox depth), and the configuration if it changed. So the root
    /// sees the site between windows, and a schedule set by mistake can be corrected without
    /// waiting for the next window.
    async fn contact(&self) -> Result<()> {
        if !self.activated.load(std::sync::atomic::Ordering::Relaxed) {
            // What a start with the parent reachable does first; a restart activates again.
            self.parent.activate(&self.instance_id).await?;
            self.activated
                .store(true, std::sync::atomic::Ordering::Relaxed);
            tracing::info!(parent = self.parent.base(), "activated at the parent");
        }
        // The parent answers 400 when this is no longer the active instance: the resource was
        // deactivated. Deactivation is meant to stop this instance (it keeps serving what it
        // has); re-activating here would undo it. A restart activates again.
        let skew_changed = outpost_control::clock::take_changed();
        let sent = self
            .parent
            .report(&StatusReport {
                instance_id: self.instance_id.clone(),
                // What this process is and where it serves, and what waits to go up, at
                // every contact: after a restart or a long outage the root shows it at once,
                // not at the next change.
                version: Some(outpost_registry::version().into()),
                login_server: (!self.login_server.is_empty()).then(|| self.login_server.clone()),
                outbox_depth: self.outbox_depth().await,
                // The clock found off, or set right, since the last report: the details
                // (the ClockSkew notice) go now, not at the next change applied.
                status_details: skew_changed.then(|| self.current_details()),
                ..Default::default()
            })
            .await;
        if skew_changed && sent.is_err() {
            outpost_control::clock::mark_changed();
        }
        if let Err(e) = &sent
            && not_active(e)
        {
            return Err(SyncError::Deactivated(self.config().name.clone()));
        }
        recorded_nothing(sent)?;
        self.registry.sync_reported(false, None, None).await;
        let etag = self.etag.lock().unwrap_or_else(|p| p.into_inner()).clone();
        if let Some((cfg, etag)) = self.parent.config(etag.as_deref()).await? {
            // Recorded before the new configuration is saved, so a crash in between cannot
            // lose the repositories still to fetch.
            let old = self.config();
            add_backfill(&self.dir, &old, &cfg)?;
            // Applied before the ETag is kept: if applying fails, the next iteration fetches
            // the configuration again instead of hearing 304 and never retrying.
            self.apply_config(&cfg).await?;
            if cfg.mode == "ReadOnly" {
                self.prune_out_of_scope(&cfg).await?;
            } else {
                // A ReadWrite site keeps what it holds of them (its clients' pushes may be
                // there), but no longer syncs them or takes pushes there.
                let left: Vec<&String> = old
                    .repositories
                    .iter()
                    .filter(|r| !cfg.repositories.contains(r))
                    .collect();
                if !left.is_empty() && !old.name.is_empty() {
                    tracing::info!(repositories = ?left, "repositories left this site's scope: what is here of them is kept, no longer synced, and refuses pushes (clients may still pull and delete it)");
                }
            }
            write_state(
                &self.dir.join("config.json"),
                serde_json::to_string(&cfg).unwrap_or_default(),
            )?;
            if let Some(e) = &etag {
                write_state(&self.dir.join("etag"), e)?;
            }
            *self.etag.lock().unwrap_or_else(|p| p.into_inner()) = etag;
            *self.config.lock().unwrap_or_else(|p| p.into_inner()) = cfg;
        }
        Ok(())
    }

    async fn iteration(&self) -> Result<()> {
        self.contact().await?;
        let cfg = self.config();
        if cfg.mode == "ReadOnly" && !self.pruned.load(std::sync::atomic::Ordering::Relaxed) {
            self.prune_out_of_scope(&cfg).await?;
            self.pruned
                .store(true, std::sync::atomic::Ordering::Relaxed);
        }
        // Watching from before the outbox is read: a change made while it is being sent still
        // ends the wait below, and is sent by the next iteration.
        let mut local = self.registry.subscribe();
        if cfg.mode == "ReadWrite" && self.flush_outbox().await? > 0 {
            self.report("Online", Outcome::Progress).await?;
        }
        // Before any reconcile: when the list of skipped manifests is full, a reconcile stops
        // at the next one, and only retries can make room.
        self.retry_skipped(&cfg).await?;
        self.repair_damaged().await?;
        let (cursor, mark) = match self.cursor()? {
            Some(c) if !cfg.resync_requested => {
                // Repositories added to the scope: the feed only carries what changes from
                // now on, so fetch what they already hold.
                let added: Vec<String> = backfill(&self.dir)?
                    .into_iter()
                    .filter(|r| cfg.repositories.contains(r))
                    .collect();
                if !added.is_empty() {
                    tracing::info!(repositories = ?added, "repositories added to this site's scope; fetching their content");
                    self.report("Syncing", Outcome::Progress).await?;
                    let scope = SyncConfig {
                        repositories: added,
                        ..cfg.clone()
                    };
                    self.reconcile_scope(&scope).await?;
                    clear_backfill(&self.dir)?;
                    self.report("Online", Outcome::Synced).await?;
                }
                c
            }
            no_cursor => {
                match no_cursor {
                    Some(_) => tracing::info!(
                        "the parent asked for a resync: reconciling every repository in scope"
                    ),
                    None => tracing::info!("reconciling every repository in scope with the parent"),
                }
                // Everything after `latest` will also come through the feed; applying twice is harmless.
                let latest = match self
                    .parent
                    .messages(i64::MAX / 2, None, 0, None)
                    .await
                    .map_err(|e| self.deactivated_if_refused(e))?
                {
                    Feed::Expired { latest } => latest,
                    Feed::Page(p) => p.latest,
                };
                self.report("Syncing", Outcome::Progress).await?;
                self.reconcile(&cfg).await?;
                clear_backfill(&self.dir)?;
                self.set_cursor(Some((latest, None)))?;
                *self.lag.lock().unwrap_or_else(|p| p.into_inner()) = Some(0);
                *self.last_error.lock().unwrap_or_else(|p| p.into_inner()) = None;
                self.report("Online", Outcome::Synced).await?;
                (latest, None)
            }
        };
        self.check_window()?;
        // What was applied or pushed here so far, before waiting for more.
        if let Err(e) = self.flush_notifications(&cfg).await {
            tracing::warn!(error = %e, "could not send notifications to the parent; they are sent later");
        }
        let have = self.etag.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let poll = async {
            self.parent
                .messages(cursor, mark, self.poll_wait().as_secs(), have.as_deref())
                .await
                .map_err(|e| self.deactivated_if_refused(e))
        };
        tokio::pin!(poll);
        let read_write = cfg.mode == "ReadWrite";
        let feed = loop {
            tokio::select! {
                feed = &mut poll => break feed?,
                // A local client's change ends the wait: it goes up at once instead of after
                // the long-poll (up to sync_poll_secs).
                Ok(()) = local.changed(), if read_write => {
                    tracing::debug!("a local change interrupts the wait for the parent's messages");
                    return Ok(());
                }
                // A damaged blob a client's pull found is fetched again at once, not after
                // the long-poll.
                () = self.registry.damage_found() => self.repair_damaged().await?,
                // A login refused here (a child's sync token, a client token) may use a
                // password or token made at the root a moment ago: the next iteration asks
                // for the configuration at once.
                () = self.control.logins_refused() => {
                    tracing::debug!("a login was refused; asking the parent for the configuration");
                    return Ok(());
                }
            }
        };
        match feed {
            Feed::Expired { latest } => {
                tracing::info!(cursor, latest, "message cursor expired; reconciling fully");
                self.set_cursor(None)?;
                // Positions in a log this site no longer follows (a parent restored from a
                // backup numbers its events anew).
                self.sent_tags
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .clear();
            }
            Feed::Page(page) => {
                let busy = !page.messages.is_empty();
                // The lag counts down as messages are applied, so a report made while this
                // page is under way (or when a window closes in its middle) is true.
                let lag_after = |seq: i64| {
                    *self.lag.lock().unwrap_or_else(|p| p.into_inner()) =
                        Some((page.latest - seq).max(0));
                };
                if busy {
                    lag_after(cursor);
                    self.report("Syncing", Outcome::Progress).await?;
                }
                let scope = outpost_control::connected::SyncScope::of(&cfg);
                for m in &page.messages {
                    self.check_window()?;
                    // The parent's feed names only what is in this site's scope; anything
                    // else (a broken or hostile parent) is not brought in.
                    if scope.covers(&m.repository) {
                        self.apply(m, cfg.mode == "ReadOnly").await?;
                    } else {
                        // Also when the scope just grew and its configuration has not
                        // arrived yet: the repository is then fetched whole with it.
                        tracing::info!(repository = %m.repository, seq = m.seq, "the parent's feed names a repository outside this site's configured scope; not applied (if the scope just grew, the repository is fetched with the new configuration)");
                    }
                    self.set_cursor(Some((m.seq, m.mark)))?;
                    lag_after(m.seq);
                }
                self.set_cursor(Some((page.next, page.next_mark)))?;
                self.sent_tags
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .retain(|_, at| *at > page.next);
                *self.lag.lock().unwrap_or_else(|p| p.into_inner()) =
                    Some((page.latest - page.next).max(0));
                if page.resync {
                    tracing::info!(
                        "the parent asked for a resync: every repository in scope is reconciled next"
                    );
                    self.set_cursor(None)?;
                }
                *self.last_error.lock().unwrap_or_else(|p| p.into_inner()) = None;
                if page.next >= page.latest {
                    self.drop_stale_partials().await;
                }
                if busy {
                    self.report("Online", Outcome::Synced).await?;
                }
            }
        }
        Ok(())
    }

    /// Once nothing is left to fetch (the feed caught up, nothing skipped, no transfer under
    /// way), partial downloads still on disk belong to transfers that were cut and then no
    /// longer needed (the image deleted or moved at the parent meanwhile): they are dropped,
    /// or each would hold its bytes for [`PARTIAL_DOWNLOAD_KEEP`], out of the reaper's and
    /// garbage collection's reach.
    async fn drop_stale_partials(&self) {
        if !self
            .fetching
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .is_empty()
            || !self.skipped.list().is_empty()
        {
            return;
        }
        let Ok(entries) = std::fs::read_dir(self.dir.join("partial")) else {
            return;
        };
        for path in entries.filter_map(|e| e.ok()).map(|e| e.path()) {
            if let Ok(Some(saved)) = read_state(&path)
                && let Some((repo, id)) = saved.trim().split_once(' ')
                && let Ok(repo) = repo.parse::<RepoName>()
            {
                if let Err(e) = self.registry.cancel_upload(&repo, id).await {
                    tracing::debug!(upload = id, error = %e, "removing a partial download");
                }
                tracing::info!(repository = %repo, upload = id, "dropped a partial download no longer needed");
            }
            if let Err(e) = std::fs::remove_file(&path) {
                tracing::warn!(path = %path.display(), error = %e, "could not remove a partial download's marker");
            }
        }
    }

    /// Local client changes not yet sent up (0 on a ReadOnly site, which takes none).
    async fn outbox_depth(&self) -> Option<i64> {
        let cursor = read_outbox_cursor(&self.dir.join("outbox-cursor")).ok()?;
        self.registry
            .meta()
            .client_events_after(cursor.unwrap_or(0))
            .await
            .ok()
    }

    /// Sends this site's own changes — its clients' pushes, tag moves and deletes, never what
    /// came from the parent — up in order, from a durable cursor over the local event log, so
    /// they survive restarts and outages. When the parent's tag had moved meanwhile, the site's
    /// write (the last to reach it) wins; the parent keeps the other manifest by digest, and
    /// the conflict is reported in the status details.
    /// Returns how many changes it handled (sent, or refused by the parent and reported):
    /// either way the parent is told at once, with the refusal in the status details.
    async fn flush_outbox(&self) -> Result<usize> {
        let path = self.dir.join("outbox-cursor");
        let mut cursor: i64 = read_outbox_cursor(&path)?.unwrap_or(0);
        let mut handled = 0;
        loop {
            let events = self
                .registry
                .meta()
                .events_after(cursor, 200)
                .await
                .map_err(|e| SyncError::Registry(e.into()))?;
            if events.is_empty() {
                return Ok(handled);
            }
            for e in events {
                if e.origin.is_none() {
                    self.check_window()?;
                    match self.send_up(&e).await {
                        Ok(()) => handled += 1,
                        // One change the parent will never take must not hold up every later
                        // one: report it and go on. Anything that may pass later stops here
                        // and is retried.
                        Err(err) if refused_for_good(&err) => {
                            let what = match &e.tag {
                                Some(tag) => format!("{} of {}:{tag}", e.kind, e.repo),
                                None => format!(
                                    "{} of {}@{}",
                                    e.kind,
                                    e.repo,
                                    e.digest.as_deref().unwrap_or("?")
                                ),
                            };
                            tracing::warn!(change = %what, error = %err, "the parent refused a local change; it is skipped");
                            if let (Some(digest), "tag_set" | "manifest_put") =
                                (&e.digest, e.kind.as_str())
                            {
                                self.refused.add(RefusedChange {
                                    repository: e.repo.clone(),
                                    tag: e.tag.clone(),
                                    digest: digest.clone(),
                                })?;
                            }
                            self.notices.push(StatusDetail {
                                kind: "Sync".into(),
                                code: "OutboxEntryRefused".into(),
                                description: format!(
                                    "the parent refused this site's {what} and it will not be retried: {err}{}",
                                    match e.kind.as_str() {
                                        // Kept in refused.json and offered at a reconcile.
                                        "tag_set" | "manifest_put" => format!(
                                            " (once the cause is fixed, `outpost connected-registry resync -n {}` at the root offers it again)",
                                            self.config().name
                                        ),
                                        _ => String::new(),
                                    }
                                ),
                                timestamp: Some(now_rfc3339()),
                                correlation_id: None,
                            })?;
                            handled += 1;
                        }
                        Err(err) => return Err(err),
                    }
                }
                cursor = e.seq;
                write_state(&path, cursor.to_string())?;
            }
        }
    }

    /// Sends a notification for each event of this registry that matches its notification
    /// patterns, in order, from a durable cursor (`notify-cursor`): each is sent at least once,
    /// and the root keeps one copy per id. A manifest pushed with a tag is one notification.
    /// With no patterns the cursor follows the log, so patterns added later start from then.
    async fn flush_notifications(&self, cfg: &SyncConfig) -> Result<()> {
        use outpost_control::notify::{self, NotificationBatch, NotificationPattern};
        const PAGE: u32 = 200;
        let path = self.dir.join("notify-cursor");
        let meta = self.registry.meta();
        let db = |e: outpost_registry::MetaError| SyncError::Registry(e.into());
        let patterns: Vec<NotificationPattern> = cfg
            .notifications
            .iter()
            .filter_map(|p| NotificationPattern::parse(p).ok())
            .collect();
        if patterns.is_empty() {
            let latest = meta.latest_event().await.map_err(db)?;
            if read_outbox_cursor(&path)? != Some(latest) {
                write_state(&path, latest.to_string())?;
            }
            return Ok(());
        }
        // No cursor (it could not be written at start, say on a full disk): from now on.
        let mut cursor = match read_outbox_cursor(&path)? {
            Some(c) => c,
            None => meta.latest_event().await.map_err(db)?,
        };
        loop {
            let events = meta.events_after(cursor, PAGE).await.map_err(db)?;
            let Some(last) = events.last() else {
                return Ok(());
            };
            // A full page ending in a manifest put leaves it for the next page, where the tag
            // event that may follow it is seen too.
            let take = if events.len() == PAGE as usize
                && last.kind == outpost_registry::EVENT_MANIFEST_PUT
            {
                events.len() - 1
            } else {
                events.len()
            };
            let mut batch = Vec::new();
            for (i, e) in events[..take].iter().enumerate() {
                if events
                    .get(i + 1)
                    .is_some_and(|next| notify::tagged_next(e, next))
                {
                    continue;
                }
                if let Some(n) = notify::from_event(e, &self.instance_id)
                    && patterns.iter().any(|p| p.matches(&n))
                {
                    batch.push(n);
                }
            }
            for chunk in batch.chunks(notify::MAX_BATCH) {
                let sent = self
                    .parent
                    .notify_for(
                        &cfg.name,
                        &NotificationBatch {
                            instance_id: self.instance_id.clone(),
                            notifications: chunk.to_vec(),
                        },
                    )
                    .await;
                match sent {
                    Err(e) if notifications_refused(&e) => {
                        tracing::warn!(count = chunk.len(), error = %e, "the parent refused notifications; they are dropped");
                        self.notices.push(StatusDetail {
                            kind: "Sync".into(),
                            code: "NotificationsRefused".into(),
                            description: format!(
                                "the parent refused {} notifications of this registry, which are dropped: {e}",
                                chunk.len()
                            ),
                            timestamp: Some(now_rfc3339()),
                            correlation_id: None,
                        })?;
                    }
                    other => other?,
                }
            }
            cursor = events[take - 1].seq;
            write_state(&path, cursor.to_string())?;
        }
    }

    async fn send_up(&self, e: &outpost_registry::Event) -> Result<()> {
        let Ok(repo) = e.repo.parse::<RepoName>() else {
            return Ok(());
        };
        let digest = e.digest.clone().unwrap_or_default();
        let local = |d: &str| {
            let d = d.parse::<Digest>().ok();
            let repo = repo.clone();
            async move {
                match d {
                    Some(d) => self
                        .registry
                        .get_manifest(&repo, &Reference::Digest(d))
                        .await
                        .ok(),
                    None => None,
                }
            }
        };
        match e.kind.as_str() {
            "manifest_put" => {
                // Deleted again since? Then there is nothing to send.
                let Some(m) = local(&digest).await else {
                    return Ok(());
                };
                self.send_references(&repo, &m.content, &m.media_type, 0)
                    .await?;
                self.parent
                    .put_manifest(repo.as_str(), &digest, &m.media_type, m.content.clone())
                    .await?;
            }
            "tag_set" => {
                let (Some(tag), Some(m)) = (e.tag.as_deref(), local(&digest).await) else {
                    return Ok(());
                };
                // What the parent's tag points at now: what this write replaces, unless
                // another write lands in between. A parent that says what the write replaced
                // (read in the same transaction) is believed over this look.
                let looked = self.parent.manifest_digest(repo.as_str(), tag).await?;
                let put = self
                    .parent
                    .put_manifest(repo.as_str(), tag, &m.media_type, m.content.clone())
                    .await;
                let answer = match put {
                    // The parent lost what the manifest references since this site had it
                    // (deleted there, then collected): send it up, then the tag again.
                    Err(err) if parent_misses_references(&err) => {
                        self.send_references(&repo, &m.content, &m.media_type, 0)
                            .await?;
                        self.parent
                            .put_manifest(repo.as_str(), tag, &m.media_type, m.content.clone())
                            .await?
                    }
                    other => other?,
                };
                if let Some(at) = answer.log_position {
                    self.sent_tags
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .insert((repo.to_string(), tag.to_string()), at);
                }
                let replaced = match answer.replaced {
                    Some(said) => said,
                    None => looked,
                };
                // A conflict only if the parent's tag had moved away from what this site last
                // knew (from its own push or from sync); not when the site moves its own tag
                // again.
                let conflict = match replaced {
                    Some(theirs) if theirs != digest && !self.knew(e, tag, &theirs).await? => {
                        Some(format!(
                            "{repo}:{tag} was {theirs} at the parent and is now {digest} from {} (the last write to reach the parent wins; {theirs} is kept by digest)",
                            self.here()
                        ))
                    }
                    // The parent had no such tag, but this site had one before its client's
                    // write (from sync, or its own earlier write that went up): the parent
                    // removed it meanwhile, and the site's write sets it again.
                    None => match self.tag_before(e, tag).await? {
                        Some(before) if before != digest => Some(format!(
                            "{repo}:{tag} was removed at the parent (it was {before}) and is now {digest} again from {} (the last write to reach the parent wins)",
                            self.here()
                        )),
                        _ => None,
                    },
                    _ => None,
                };
                // Reported once the write went through, so a retried send reports it once.
                if let Some(what) = conflict {
                    tracing::warn!(repository = %repo, tag, site = %digest, "tag changed on both sides; this site's write wins");
                    self.tag_conflict(what)?;
                }
            }
            "tag_removed" => {
                if let Some(tag) = e.tag.as_deref() {
                    let theirs = self.parent.manifest_digest(repo.as_str(), tag).await?;
                    let Some(theirs) = theirs else {
                        return Ok(()); // already gone at the parent
                    };
                    let moved = !self.knew(e, tag, &theirs).await?;
                    // As for a put by tag: the feed's older events for the tag (the echo of
                    // this site's earlier write among them) must not bring it back.
                    if let Some(at) = self.parent.delete_manifest(repo.as_str(), tag).await? {
                        self.sent_tags
                            .lock()
                            .unwrap_or_else(|p| p.into_inner())
                            .insert((repo.to_string(), tag.to_string()), at);
                    }
                    if moved {
                        tracing::warn!(repository = %repo, tag, parent = %theirs, "tag moved at the parent and removed at this site; the removal wins");
                        self.tag_conflict(format!(
                                "{repo}:{tag} was moved to {theirs} at the parent and removed at {} (the last write to reach the parent wins; {theirs} is kept by digest)",
                                self.here()
                            ))?;
                    }
                }
            }
            "manifest_deleted" => {
                // The site's own tags on it went up before this, as removals. A tag the parent
                // still has on it was set there while this site was away, and would go with
                // it: then the manifest stays, the conflict is reported, and the manifest
                // comes back here with that tag through the feed.
                let theirs = self.parent_tags_on(repo.as_str(), &digest).await?;
                if theirs.is_empty() {
                    self.parent.delete_manifest(repo.as_str(), &digest).await?;
                } else {
                    tracing::warn!(repository = %repo, digest, tags = ?theirs, "manifest deleted at this site is tagged at the parent; it is kept");
                    self.tag_conflict(format!(
                            "{repo}@{digest} was deleted at {}, but the parent's tags {} point at it (set there while this site was away): it is kept, with those tags",
                            self.here(),
                            theirs.join(", ")
                        ))?;
                }
            }
            _ => {}
        }
        Ok(())
    }

    /// Makes sure the parent holds, in `repo`, everything a manifest references: blobs it
    /// lacks are sent (mounted or uploaded), and so are child manifests it lacks, with what
    /// they reference, whether this site's clients pushed them or they came from the parent
    /// (which may have deleted them since). What this site lacks too is refused for good.
    async fn send_references(
        &self,
        repo: &RepoName,
        content: &[u8],
        media_type: &str,
        depth: u8,
    ) -> Result<()> {
        let parsed = Manifest::parse(content, Some(media_type))
            .map_err(|err| SyncError::Registry(RegistryError::ManifestInvalid(err)))?;
        for b in parsed.required_blobs() {
            if !self
                .parent
                .has_blob(repo.as_str(), &b.digest.to_string())
                .await?
            {
                self.push_blob_up(repo, &b.digest).await?;
            }
        }
        // An external layer (see `ensure_manifest`) goes up too if this site holds it.
        for b in parsed.layers.iter().filter(|b| b.is_external()) {
            if self
                .registry
                .blob_size_checked(repo, &b.digest)
                .await
                .is_ok()
                && !self
                    .parent
                    .has_blob(repo.as_str(), &b.digest.to_string())
                    .await?
            {
                self.push_blob_up(repo, &b.digest).await?;
            }
        }
        for child in parsed.required_manifests() {
            let d = child.digest.to_string();
            if self
                .parent
                .manifest_digest(repo.as_str(), &d)
                .await?
                .is_some()
            {
                continue;
            }
            // An index of indexes nests a level or two; deeper is not a real image.
            if depth >= 4 {
                return Err(SyncError::Registry(RegistryError::ManifestUnknown(
                    child.digest.to_string(),
                )));
            }
            let m = self
                .registry
                .get_manifest(repo, &Reference::Digest(child.digest.clone()))
                .await?;
            Box::pin(self.send_references(repo, &m.content, &m.media_type, depth + 1)).await?;
            self.parent
                .put_manifest(repo.as_str(), &d, &m.media_type, m.content.clone())
                .await?;
        }
        Ok(())
    }

    /// Sends blob `digest` of `repo` to the parent, which lacks it there. First, if other
    /// local repositories hold it, the parent is asked to mount it from them (it may have it
    /// there, from this site or from sync): nothing is sent then. Otherwise it is uploaded in
    /// pieces; the upload's location is kept in `sync/outbox-partial/`, so a cut link, a closed
    /// window or a restart resumes from what the parent already holds.
    async fn push_blob_up(&self, repo: &RepoName, digest: &Digest) -> Result<()> {
        let marker = self.dir.join("outbox-partial").join(format!(
            "{}-{}",
            digest.algorithm(),
            digest.hex()
        ));
        let size = self.registry.blob_size(repo, digest).await?;
        let d = digest.to_string();
        let mut resumed = None;
        if let Some(saved) = read_state(&marker)?
            && let Some((saved_repo, loc)) = saved.split_once(' ')
        {
            if !loc.starts_with('/') {
                // Saved by an earlier version from a Location on another host: unusable.
                tracing::warn!(%digest, location = loc, "dropping a saved upload location that is not on the parent; the blob is sent again from the start");
                let _ = std::fs::remove_file(&marker);
                return Box::pin(self.push_blob_up(repo, digest)).await;
            }
            match self.parent.upload_offset(loc).await? {
                Some(offset) if offset <= size && saved_repo == repo.as_str() => {
                    tracing::info!(%digest, offset, "resuming the upload of a blob to the parent");
                    resumed = Some((loc.to_string(), offset));
                }
                // Not worth resuming (empty, or its size unknown): cancelled, or every retry
                // against a parent that keeps failing (a full disk) would leave one more
                // session there until its reaper runs.
                _ => self.parent.cancel_upload(loc).await,
            }
        }
        let (mut loc, mut offset) = match resumed {
            Some(r) => r,
            None => {
                // Repositories here that hold the blob and that the parent may have too: those
                // in this site's scope (others never went up).
                let scope: Vec<RepoPattern> = self
                    .config()
                    .repositories
                    .iter()
                    .filter_map(|r| RepoPattern::parse(r).ok())
                    .collect();
                let sources: Vec<String> = self
                    .registry
                    .meta()
                    .repos_with_blob(digest, repo.as_str(), 50)
                    .await
                    .map_err(|e| SyncError::Registry(e.into()))?
                    .into_iter()
                    .filter(|r| scope.iter().any(|p| p.matches(r)))
                    .take(3)
                    .collect();
                let mut started: Option<String> = None;
                for from in sources {
                    match self.parent.mount_blob(repo.as_str(), &d, &from).await {
                        Ok(parent::Mount::Mounted) => {
                            tracing::debug!(%digest, %from, "the parent mounted the blob; nothing sent");
                            if let Some(loc) = started {
                                self.parent.cancel_upload(&loc).await;
                            }
                            return Ok(());
                        }
                        // Not there: the parent opened an upload instead. Keep the first for
                        // the fallback, cancel the others, and try the next source.
                        Ok(parent::Mount::Upload(loc)) => match &started {
                            None => started = Some(loc),
                            Some(_) => self.parent.cancel_upload(&loc).await,
                        },
                        // Not allowed to read `from` at the parent, say: try the next.
                        Err(e) if refused_for_good(&e) => continue,
                        Err(e) => return Err(e),
                    }
                }
                let loc = match started {
                    Some(loc) => loc,
                    None => self.parent.start_upload(repo.as_str()).await?,
                };
                std::fs::create_dir_all(self.dir.join("outbox-partial"))
                    .map_err(state_err(&self.dir))?;
                write_state(&marker, format!("{repo} {loc}"))?;
                (loc, 0)
            }
        };
        while offset < size {
            self.check_window()?;
            let piece_bytes = self.up_piece.load(Relaxed);
            let end = (offset + piece_bytes).min(size) - 1;
            let piece = self
                .registry
                .read_blob(
                    repo,
                    digest,
                    Some(outpost_oci::ByteRange { start: offset, end }),
                )
                .await?
                .into_bytes()
                .await
                .map_err(outpost_registry::RegistryError::from)?;
            loc = match self.parent.upload_chunk(&loc, offset, piece).await {
                Ok(next) => {
                    self.progressed.store(true, Relaxed);
                    self.up_piece
                        .store((piece_bytes * 2).min(UP_PIECE_BYTES), Relaxed);
                    next
                }
                Err(e) => {
                    // The parent keeps nothing of a piece cut short (the cut shows as a
                    // broken connection, or as the parent's answer that the body was cut
                    // off): the next try sends a smaller one, which a link that drops often
                    // can still carry whole.
                    self.up_piece
                        .store((piece_bytes / 2).max(UP_PIECE_MIN), Relaxed);
                    // The parent's upload is not where this site thinks (416), or is gone:
                    // the next attempt starts a new one instead of repeating this forever.
                    if matches!(
                        e,
                        SyncError::Parent {
                            status: 404 | 416,
                            ..
                        }
                    ) {
                        let _ = std::fs::remove_file(&marker);
                    }
                    return Err(e);
                }
            };
            offset = end + 1;
            write_state(&marker, format!("{repo} {loc}"))?;
        }
        let finished = match self.parent.finish_upload(&loc, &d).await {
            // The bytes were verified when they arrived here, so a mismatch means the parent's
            // copy went wrong (a bad resume point, a corrupting link): send it again, whole,
            // next time. Unless this site's copy went bad since (damage that kept its size):
            // sending that again would fail for ever and hold up every change behind it. It
            // is removed, and the change is refused like one whose blob is missing here.
            Err(SyncError::Parent { code, .. })
                if code == "DIGEST_INVALID" || code == "BLOB_UPLOAD_INVALID" =>
            {
                let _ = std::fs::remove_file(&marker);
                self.parent.cancel_upload(&loc).await;
                if !self.registry.verify_stored_blob(repo, digest).await? {
                    return Err(SyncError::Registry(RegistryError::BlobUnknown(
                        digest.clone(),
                    )));
                }
                Err(SyncError::Protocol(format!(
                    "the parent's copy of blob {digest} did not verify ({code}); it is sent again"
                )))
            }
            // The parent lost the upload (reaped, or a parent whose upload status and commit
            // disagree): start a new one next time instead of resuming this one for ever.
            Err(SyncError::Parent {
                status: 404, code, ..
            }) if code == "BLOB_UPLOAD_UNKNOWN" => Err(SyncError::Protocol(format!(
                "the parent no longer has the upload of blob {digest}; it is sent again"
            ))),
            other => other,
        };
        if finished.is_ok()
            || finished
                .as_ref()
                .is_err_and(|e| refused_for_good(e) || matches!(e, SyncError::Protocol(_)))
        {
            let _ = std::fs::remove_file(&marker);
        }
        finished
    }

    /// What `tag` pointed at here just before local event `e`.
    /// Records a `TagConflict` notice: a change made on both sides, resolved by the conflict
    /// rule and reported to the root.
    fn tag_conflict(&self, description: String) -> Result<()> {
        self.notices.push(StatusDetail {
            kind: NOTICE.into(),
            code: "TagConflict".into(),
            description,
            timestamp: Some(now_rfc3339()),
            correlation_id: None,
        })
    }

    /// The parent's tags in `repo` that point at `digest` (a tags list, then a `HEAD` per tag,
    /// a few at a time: only deletes by digest ask, and they are rare).
    async fn parent_tags_on(&self, repo: &str, digest: &str) -> Result<Vec<String>> {
        let tags = self.parent.tags(repo).await?;
        let found: Vec<Result<Option<String>>> = futures_util::stream::iter(tags)
            .map(|tag| async move {
                let d = self.parent.manifest_digest(repo, &tag).await?;
                Ok((d.as_deref() == Some(digest)).then_some(tag))
            })
            .buffer_unordered(8)
            .collect()
            .await;
        let mut out = found
            .into_iter()
            .filter_map(Result::transpose)
            .collect::<Result<Vec<_>>>()?;
        out.sort();
        Ok(out)
    }

    async fn tag_before(&self, e: &outpost_registry::Event, tag: &str) -> Result<Option<String>> {
        self.registry
            .meta()
            .tag_before(&e.repo, tag, e.seq)
            .await
            .map_err(|err| SyncError::Registry(err.into()))
    }

    /// Whether the parent's `theirs` for `tag` is something this site knew for it before
    /// change `e`: what the tag pointed at just before, or any value it had here earlier (a
    /// site that moves its own tag twice and deletes the second manifest sends neither the
    /// move nor the manifest, and the parent still has the first: no conflict).
    async fn knew(&self, e: &outpost_registry::Event, tag: &str, theirs: &str) -> Result<bool> {
        if self.tag_before(e, tag).await?.as_deref() == Some(theirs) {
            return Ok(true);
        }
        self.registry
            .meta()
            .tag_was(&e.repo, tag, theirs, e.seq)
            .await
            .map_err(|err| SyncError::Registry(err.into()))
    }

    /// Repositories in scope: named ones, and those the parent lists under `prefix/*` or `*`.
    async fn repositories(&self, cfg: &SyncConfig) -> Result<Vec<String>> {
        let patterns: Vec<RepoPattern> = cfg
            .repositories
            .iter()
            .filter_map(|r| RepoPattern::parse(r).ok())
            .collect();
        let mut out: Vec<String> = patterns
            .iter()
            .filter_map(|p| match p {
                RepoPattern::Exact(r) => Some(r.clone()),
                _ => None,
            })
            .collect();
        if patterns.iter().any(|p| !matches!(p, RepoPattern::Exact(_))) {
            // The parent's repositories, and this site's own: one the parent no longer has
            // (deleted there, or lost with a restore from a backup) must be visited too, so
            // that its tags go as the parent's did.
            let local = self.registry.catalog(None, None).await?;
            for r in self.parent.catalog().await?.into_iter().chain(local) {
                if patterns.iter().any(|p| p.matches(&r)) && !out.contains(&r) {
                    out.push(r);
                }
            }
        }
        Ok(out)
    }

    /// Full reconciliation: every tag of every repository in scope matches the parent.
    async fn reconcile(&self, cfg: &SyncConfig) -> Result<()> {
        if cfg.mode == "ReadOnly" {
            self.prune_out_of_scope(cfg).await?;
        }
        self.reconcile_scope(cfg).await
    }

    /// Brings every repository `cfg` names (or whose pattern the parent's catalog matches) up
    /// to the parent's state, without pruning anything outside it.
    async fn reconcile_scope(&self, cfg: &SyncConfig) -> Result<()> {
        let read_only = cfg.mode == "ReadOnly";
        let repos = self.repositories(cfg).await?;
        // Repositories are independent: a few at a time hide the round trips of each.
        let results: Vec<Result<()>> = futures_util::stream::iter(repos)
            .map(|repo| self.reconcile_repo(repo, read_only))
            .buffer_unordered(RECONCILE_CONCURRENCY)
            .collect()
            .await;
        results.into_iter().collect()
    }

    /// A ReadOnly site is a strict mirror: repositories no longer in its scope are deleted
    /// (a ReadWrite site keeps them: they may hold its own pushes).
    async fn prune_out_of_scope(&self, cfg: &SyncConfig) -> Result<()> {
        let Ok(patterns) = cfg
            .repositories
            .iter()
            .map(|r| RepoPattern::parse(r))
            .collect::<std::result::Result<Vec<_>, _>>()
        else {
            // A scope this build cannot read whole (a parent of a later version with a new
            // kind of pattern, say): what it does not understand may cover what is here.
            tracing::warn!(
                "the parent's scope has entries this build cannot read; no repository is deleted as out of scope"
            );
            return Ok(());
        };
        for repo in self.registry.catalog(None, None).await? {
            if !patterns.iter().any(|p| p.matches(&repo))
                && let Ok(name) = repo.parse::<RepoName>()
            {
                tracing::info!(repository = %repo, "repository left this site's scope; deleting the local copy");
                self.registry.delete_repository(&name).await?;
            }
        }
        Ok(())
    }

    async fn reconcile_repo(&self, repo: String, read_only: bool) -> Result<()> {
        let Ok(name) = repo.parse::<RepoName>() else {
            return Ok(());
        };
        let tags = self.parent.tags(&repo).await?;
        // Many tags on one manifest: its referrers are asked for once.
        let mut asked = std::collections::HashSet::new();
        for tag in &tags {
            self.check_window()?;
            let Some(digest) = self.parent.manifest_digest(&repo, tag).await? else {
                continue;
            };
            let Ok(t) = tag.parse::<Tag>() else { continue };
            let local = self
                .registry
                .get_manifest(&name, &Reference::Tag(t.clone()))
                .await
                .ok();
            if local.is_some_and(|m| m.digest.to_string() == digest) {
                // The tag has not moved, but signatures, SBOMs and attestations may have been
                // added to it since (and the feed that announced them may have expired).
                if !asked.insert(digest.clone()) {
                    continue;
                }
                for r in self.parent.referrers(&repo, &digest).await? {
                    self.ensure_or_skip(&name, None, &r).await?;
                }
                continue;
            }
            if self.ensure_or_skip(&name, Some(&t), &digest).await? {
                self.tag(&name, &t, &digest).await?;
            }
        }
        // Tags the parent no longer has go: a ReadOnly site mirrors exactly, and a ReadWrite
        // one follows deletions made at the parent while it was away longer than the feed
        // keeps them, except for tags its own clients changed since its outbox last sent
        // (those are on their way up).
        let mut dropped = Vec::new();
        for local in self
            .registry
            .tags(&name, None, None)
            .await
            .unwrap_or_default()
        {
            if tags.contains(&local) {
                continue;
            }
            if !read_only && self.offer_refused_tag(&name, &local).await? {
                continue;
            }
            if !self.client_change_pending(&repo, &local, read_only).await?
                && let Ok(t) = local.parse::<Tag>()
                && self
                    .registry
                    .follow_deletion(&name, &Reference::Tag(t))
                    .await
                    .is_ok()
            {
                dropped.push(local);
            }
        }
        if !dropped.is_empty() {
            let shown = dropped
                .iter()
                .take(10)
                .cloned()
                .collect::<Vec<_>>()
                .join(", ");
            tracing::info!(repository = %repo, count = dropped.len(), tags = %shown, "removed tags the parent no longer has");
        }
        self.reconcile_untagged(&name, read_only).await
    }

    /// A tag of this site's the parent does not have: if it is one the parent refused (see
    /// [`RefusedList`]), it is kept, and offered to the parent again. Returns whether it was.
    async fn offer_refused_tag(&self, name: &RepoName, tag: &str) -> Result<bool> {
        let Ok(t) = tag.parse::<Tag>() else {
            return Ok(false);
        };
        let Ok(local) = self.registry.get_manifest(name, &Reference::Tag(t)).await else {
            return Ok(false);
        };
        let digest = local.digest.to_string();
        if !self.refused.has_tag(name.as_str(), tag, &digest) {
            return Ok(false);
        }
        let change = client_change(name, "tag_set", Some(tag), &digest);
        match self.send_up(&change).await {
            Ok(()) => {
                tracing::info!(repository = %name, tag, %digest, "the parent took a tag it refused before");
                self.refused.forget_held(name.as_str(), |d| d == digest);
                self.notices.settle(&format!("tag_set of {name}:{tag}"));
                self.notices
                    .settle(&format!("manifest_put of {name}@{digest}"));
                self.refused.remove(&RefusedChange {
                    repository: name.to_string(),
                    tag: Some(tag.to_string()),
                    digest,
                })?;
            }
            Err(e) if refused_for_good(&e) => {
                tracing::debug!(repository = %name, tag, error = %e, "the parent still refuses this site's tag; it stays here only");
            }
            Err(e) => return Err(e),
        }
        Ok(true)
    }

    /// A manifest of this site's the parent refused (see [`RefusedList`]): offered again; it
    /// leaves the list once the parent takes it.
    async fn offer_refused_manifest(&self, name: &RepoName, digest: &str) -> Result<()> {
        let change = client_change(name, "manifest_put", None, digest);
        match self.send_up(&change).await {
            Ok(()) => {
                tracing::info!(repository = %name, digest, "the parent took a manifest it refused before");
                self.refused.forget_held(name.as_str(), |d| d == digest);
                self.notices
                    .settle(&format!("manifest_put of {name}@{digest}"));
                Ok(())
            }
            Err(e) if refused_for_good(&e) => {
                tracing::debug!(repository = %name, digest, error = %e, "the parent still refuses this site's manifest; it stays here only");
                Ok(())
            }
            Err(e) => Err(e),
        }
    }

    /// The part of a full reconciliation that tags do not reach, from an Outpost parent's
    /// listing of every manifest it holds: what was pushed there by digest (referrers whose
    /// subject is absent, index children pushed alone) is fetched, and what was deleted there
    /// by digest while this site was away (a withdrawn signature) is deleted here, unless this
    /// site's own clients pushed it since its outbox last sent (it is on its way up).
    async fn reconcile_untagged(&self, name: &RepoName, read_only: bool) -> Result<()> {
        let Some(theirs) = self.parent.manifest_digests(name.as_str()).await? else {
            return Ok(()); // a plain registry: tags are all there is to compare
        };
        let mut ours = std::collections::HashSet::new();
        let mut last = String::new();
        loop {
            let page = self.registry.manifest_digests(name, 1000, &last).await?;
            let full = page.len() == 1000;
            last = page.last().cloned().unwrap_or_default();
            ours.extend(page);
            if !full {
                break;
            }
        }
        for d in &theirs {
            if !ours.contains(d) {
                self.check_window()?;
                self.ensure_or_skip(name, None, d).await?;
            }
        }
        let theirs: std::collections::HashSet<&String> = theirs.iter().collect();
        // Refused pushes the parent holds now (they went up once allowed) are no longer kept
        // against its deletes.
        self.refused
            .forget_held(name.as_str(), |d| theirs.contains(&d.to_string()));
        for d in ours.iter().filter(|d| !theirs.contains(d)) {
            // The parent never had it: this site's push was refused (it is offered again), or
            // is on its way up.
            if !read_only && self.refused.has_manifest(name.as_str(), d) {
                self.offer_refused_manifest(name, d).await?;
                continue;
            }
            if self
                .client_used_manifest_pending(name.as_str(), d, read_only)
                .await?
            {
                continue;
            }
            if let Ok(digest) = d.parse::<Digest>() {
                tracing::info!(repository = %name, digest = %d, "deleting a manifest the parent no longer has");
                ignore_unknown(
                    self.registry
                        .follow_deletion(name, &Reference::Digest(digest))
                        .await,
                )?;
            }
        }
        Ok(())
    }

    /// Where this site's outbox has sent its clients' changes up to; `None` on a ReadOnly
    /// site, whose clients change nothing.
    fn outbox_sent(&self, read_only: bool) -> Result<Option<i64>> {
        if read_only {
            return Ok(None);
        }
        Ok(Some(
            read_outbox_cursor(&self.dir.join("outbox-cursor"))?.unwrap_or(0),
        ))
    }

    /// Whether this site's own clients changed `repo:tag` after its outbox last sent: the
    /// change is on its way up, and the parent's older state must not undo it.
    async fn client_change_pending(&self, repo: &str, tag: &str, read_only: bool) -> Result<bool> {
        let Some(sent) = self.outbox_sent(read_only)? else {
            return Ok(false);
        };
        let meta = self.registry.meta();
        let pending = meta.client_changed_tag_after(repo, tag, sent).await;
        pending.map_err(|e| SyncError::Registry(e.into()))
    }

    /// Whether this site's own clients pushed or tagged manifest `digest` of `repo` (or an
    /// index over it) after its outbox last sent.
    async fn client_used_manifest_pending(
        &self,
        repo: &str,
        digest: &str,
        read_only: bool,
    ) -> Result<bool> {
        let Some(sent) = self.outbox_sent(read_only)? else {
            return Ok(false);
        };
        let meta = self.registry.meta();
        let pending = meta.client_used_manifest_after(repo, digest, sent).await;
        pending.map_err(|e| SyncError::Registry(e.into()))
    }

    async fn apply(&self, m: &Message, read_only: bool) -> Result<()> {
        let Ok(name) = m.repository.parse::<RepoName>() else {
            tracing::warn!(repository = %m.repository, seq = m.seq, "the parent's feed names an invalid repository; ignored");
            return Ok(());
        };
        if let Some(tag) = &m.tag
            && let Some(&at) = self
                .sent_tags
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .get(&(m.repository.clone(), tag.clone()))
            && m.seq <= at
        {
            tracing::debug!(repository = %m.repository, tag, seq = m.seq, "skipping a change to a tag that this site's own later write replaced at the parent");
            return Ok(());
        }
        let digest = m.digest.clone().unwrap_or_default();
        match m.kind.as_str() {
            "manifest_put" => {
                self.ensure_or_skip(&name, None, &digest).await?;
            }
            "tag_set" => {
                // Not over a change this site's clients made to the tag since the outbox last
                // sent (a move, or a removal): that change is on its way up, reaches the
                // parent after this one and wins there, and its own event follows in the feed.
                if let Some(Ok(tag)) = m.tag.as_deref().map(str::parse::<Tag>)
                    && !self
                        .client_change_pending(&m.repository, tag.as_str(), read_only)
                        .await?
                    && self.ensure_or_skip(&name, Some(&tag), &digest).await?
                {
                    self.tag(&name, &tag, &digest).await?;
                }
            }
            "tag_removed" => {
                if let Some(Ok(tag)) = m.tag.as_deref().map(str::parse::<Tag>) {
                    let local = self
                        .registry
                        .get_manifest(&name, &Reference::Tag(tag.clone()))
                        .await
                        .ok();
                    // The tag goes when it points at what the parent removed, and also when
                    // it points elsewhere only because this site never applied the parent's
                    // last move (its manifest was deleted at the parent before this site
                    // fetched it). It stays if this site's clients set it since the outbox
                    // last sent: that change is on its way up.
                    let Some(local) = local else {
                        return Ok(());
                    };
                    let theirs = local.digest.to_string() == digest;
                    if theirs
                        || !self
                            .client_change_pending(&m.repository, tag.as_str(), read_only)
                            .await?
                    {
                        ignore_unknown(
                            self.registry
                                .follow_deletion(&name, &Reference::Tag(tag))
                                .await,
                        )?;
                    }
                }
            }
            "manifest_deleted" => {
                // Kept if this site's clients pushed or tagged it (or an index over it) since
                // the outbox last sent: that push is on its way up and will bring it back at
                // the parent, which it reaches last. Kept too if such a write already went up
                // and the parent logged it after this deletion (its own event is then skipped
                // here as an echo, so the deletion must not take the site's tag).
                let later_write = {
                    let newer: Vec<String> = self
                        .sent_tags
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .iter()
                        .filter(|((repo, _), at)| *repo == m.repository && **at > m.seq)
                        .map(|((_, tag), _)| tag.clone())
                        .collect();
                    let mut found = false;
                    for tag in newer.iter().filter_map(|t| t.parse::<Tag>().ok()) {
                        if self
                            .registry
                            .get_manifest(&name, &Reference::Tag(tag))
                            .await
                            .is_ok_and(|local| local.digest.to_string() == digest)
                        {
                            found = true;
                            break;
                        }
                    }
                    found
                };
                if later_write {
                    tracing::info!(repository = %m.repository, %digest, "keeping a manifest the parent deleted: this site's clients tagged it since, and the parent took that tag after the deletion");
                    return Ok(());
                }
                if self
                    .client_used_manifest_pending(&m.repository, &digest, read_only)
                    .await?
                {
                    tracing::info!(repository = %m.repository, %digest, "keeping a manifest the parent deleted: this site's clients pushed it since the outbox last sent");
                    return Ok(());
                }
                if let Ok(d) = digest.parse::<Digest>() {
                    ignore_unknown(
                        self.registry
                            .follow_deletion(&name, &Reference::Digest(d))
                            .await,
                    )?;
                }
            }
            "repository_deleted" => {
                self.registry.delete_repository(&name).await?;
            }
            other => tracing::debug!(kind = other, "ignoring an unknown message kind"),
        }
        Ok(())
    }

    async fn tag(&self, repo: &RepoName, tag: &Tag, digest: &str) -> Result<()> {
        let Ok(d) = digest.parse::<Digest>() else {
            return Ok(());
        };
        let m = self
            .registry
            .get_manifest(repo, &Reference::Digest(d))
            .await?;
        let before = self
            .registry
            .get_manifest(repo, &Reference::Tag(tag.clone()))
            .await
            .ok()
            .map(|b| b.digest);
        self.registry
            .put_manifest(
                repo,
                &Reference::Tag(tag.clone()),
                Some(&m.media_type),
                &m.content,
            )
            .await?;
        // What an operator watching a site wants to see: content arriving.
        if before.as_ref() != Some(&m.digest) {
            match before {
                Some(was) => {
                    tracing::info!(repository = %repo, %tag, digest = %m.digest, %was, "a tag moved at the parent arrived")
                }
                None => {
                    tracing::info!(repository = %repo, %tag, digest = %m.digest, "a tag arrived from the parent")
                }
            }
        }
        Ok(())
    }

    /// Makes manifest `digest` (and everything it references) present locally. Returns false
    /// if the parent no longer has it (a later message will say what happened to it).
    async fn ensure_manifest(&self, repo: &RepoName, digest: &str) -> Result<bool> {
        // Each level of an index (or of a referrer's referrer) is polled inside the one above
        // it, on one stack: a chain of hundreds, which any pusher at the parent can make,
        // would overflow it and abort the process at every start.
        let depth = NESTING.try_with(|d| *d).unwrap_or(0);
        if depth >= MAX_NESTING {
            return Err(SyncError::MissingAtParent(format!(
                "manifest {digest} is nested more than {MAX_NESTING} levels deep (indexes \
                 listing indexes, or referrers of referrers); this registry follows no deeper"
            )));
        }
        NESTING
            .scope(depth + 1, self.ensure_manifest_here(repo, digest))
            .await
    }

    async fn ensure_manifest_here(&self, repo: &RepoName, digest: &str) -> Result<bool> {
        let d: Digest = digest
            .parse()
            .map_err(|e| SyncError::Protocol(format!("digest {digest:?}: {e}")))?;
        if self
            .registry
            .get_manifest(repo, &Reference::Digest(d.clone()))
            .await
            .is_ok()
        {
            return Ok(true);
        }
        let Some((bytes, media_type)) = self.parent.manifest(repo.as_str(), digest).await? else {
            return Ok(false);
        };
        let actual = Digest::of(d.algorithm(), &bytes);
        if actual != d {
            return Err(self.damaged_copy("manifest", &d, format!("hashes to {actual}")));
        }
        let manifest = Manifest::parse(&bytes, Some(&media_type))
            .map_err(|e| SyncError::Protocol(format!("manifest {digest}: {e}")))?;
        // Until the manifest is stored nothing references its blobs; keep garbage collection
        // off the ones already fetched.
        let _pins = self
            .registry
            .pin_blobs(manifest.required_blobs().map(|b| b.digest.clone()));
        for b in manifest.required_blobs() {
            self.ensure_blob(repo, &b.digest, b.size).await?;
        }
        // A layer a registry need not hold (foreign, or non-distributable with `urls`) comes
        // along when the parent does hold it: an offline site cannot reach the URLs either.
        for b in manifest.layers.iter().filter(|b| b.is_external()) {
            if self
                .registry
                .blob_size_checked(repo, &b.digest)
                .await
                .is_err()
                && self
                    .parent
                    .has_blob(repo.as_str(), &b.digest.to_string())
                    .await?
            {
                self.ensure_blob(repo, &b.digest, b.size).await?;
            }
        }
        for child in manifest.required_manifests() {
            if !Box::pin(self.ensure_manifest(repo, &child.digest.to_string())).await? {
                return Err(SyncError::MissingAtParent(format!(
                    "manifest {}, which {digest} lists",
                    child.digest
                )));
            }
        }
        self.registry
            .put_manifest(repo, &Reference::Digest(d), Some(&media_type), &bytes)
            .await?;
        // Referrers (signatures, SBOMs, attestations) travel with what they describe; one the
        // parent cannot serve is skipped without holding up its subject.
        for r in self.parent.referrers(repo.as_str(), digest).await? {
            Box::pin(self.ensure_or_skip(repo, None, &r)).await?;
        }
        Ok(true)
    }

    /// [`Self::ensure_manifest`], except that a manifest the parent cannot serve whole is
    /// skipped (recorded for a later retry, reported) and `Ok(false)` returned, so it does not
    /// hold up what comes after it.
    async fn ensure_or_skip(
        &self,
        repo: &RepoName,
        tag: Option<&Tag>,
        digest: &str,
    ) -> Result<bool> {
        let found = match (self.ensure_manifest(repo, digest).await, tag) {
            // An Outpost parent's feed says next what happened to a manifest that is gone;
            // a plain upstream has no feed: a tag it lists whose manifest answers 404 is
            // content it cannot serve.
            (Ok(false), Some(t)) if self.parent.is_plain() => Err(SyncError::MissingAtParent(
                format!("manifest {digest} (tag {t}): it answers 404 MANIFEST_UNKNOWN"),
            )),
            (other, _) => other,
        };
        match found {
            Ok(present) => {
                if present {
                    self.skipped
                        .arrived(repo.as_str(), tag.map(|t| t.as_str()), digest)?;
                }
                Ok(present)
            }
            Err(e) if parent_lacks_content(&e) => {
                let what = match tag {
                    Some(t) => format!("{repo}:{t}"),
                    None => format!("{repo}@{digest}"),
                };
                let entry = Skipped {
                    repository: repo.to_string(),
                    tag: tag.map(|t| t.to_string()),
                    digest: digest.to_string(),
                    reason: e.to_string(),
                    since: now_rfc3339(),
                };
                let known = self.skipped.has(&entry);
                if !self.skipped.add(entry)? {
                    return Err(e);
                }
                // Said once; a retry that fails again (every pass, for a mirror) is not news.
                if known {
                    tracing::debug!(manifest = %what, %digest, error = %e, "still skipped: the parent cannot serve everything this manifest needs");
                } else {
                    tracing::warn!(manifest = %what, %digest, error = %e, "the parent cannot serve everything this manifest needs; skipping it for now");
                }
                Ok(false)
            }
            Err(e) => Err(e),
        }
    }

    /// Tries skipped manifests again (a round at most once per poll interval): those that
    /// arrive, those the parent no longer points at, those no longer in scope and those the
    /// parent refuses for good (403, an invalid name or manifest) leave the list. Only a lost
    /// link or a closed window ends the round early.
    async fn retry_skipped(&self, cfg: &SyncConfig) -> Result<()> {
        {
            let mut last = self
                .skipped
                .last_retry
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            if last.is_some_and(|t| t.elapsed() < self.poll_wait) {
                return Ok(());
            }
            *last = Some(std::time::Instant::now());
        }
        let scope: Vec<RepoPattern> = cfg
            .repositories
            .iter()
            .filter_map(|r| RepoPattern::parse(r).ok())
            .collect();
        let mut done = Vec::new();
        let mut arrived = false;
        let mut ended = Ok(());
        for s in self.skipped.next_round() {
            if let Err(e) = self.check_window() {
                ended = Err(e);
                break;
            }
            let repo = match s.repository.parse::<RepoName>() {
                Ok(r) if scope.iter().any(|p| p.matches(r.as_str())) => r,
                _ => {
                    done.push(s);
                    continue;
                }
            };
            let tag = s.tag.as_deref().and_then(|t| t.parse::<Tag>().ok());
            let attempt = async {
                if let Some(t) = &tag
                    && self
                        .parent
                        .manifest_digest(repo.as_str(), t.as_str())
                        .await?
                        .as_deref()
                        != Some(s.digest.as_str())
                {
                    // Moved or removed at the parent: the feed (or a reconcile) brings what
                    // it is now.
                    return Ok(false);
                }
                if !self.ensure_manifest(&repo, &s.digest).await? {
                    // A plain upstream still naming it under the tag has lost it: it stays.
                    if let Some(t) = &tag
                        && self.parent.is_plain()
                    {
                        return Err(SyncError::MissingAtParent(format!(
                            "manifest {} (tag {t}): it answers 404 MANIFEST_UNKNOWN",
                            s.digest
                        )));
                    }
                    return Ok(false); // gone at the parent
                }
                if let Some(t) = &tag {
                    self.tag(&repo, t, &s.digest).await?;
                }
                tracing::info!(repository = %s.repository, digest = %s.digest, "a skipped manifest arrived");
                Ok(true)
            };
            match attempt.await {
                Ok(stored) => {
                    arrived |= stored;
                    done.push(s);
                }
                Err(e) if parent_lacks_content(&e) => {}
                Err(
                    e @ (SyncError::Unreachable { .. }
                    | SyncError::Interrupted { .. }
                    | SyncError::WindowClosed),
                ) => {
                    ended = Err(e);
                    break;
                }
                // Refused by the parent for good; a local error (say a blob collected while
                // fetching) is retried.
                Err(e) if refused_for_good(&e) && !matches!(e, SyncError::Registry(_)) => {
                    tracing::warn!(repository = %s.repository, digest = %s.digest, error = %e, "the parent refuses a skipped manifest for good; it leaves the list");
                    done.push(s);
                }
                Err(e) => {
                    tracing::warn!(repository = %s.repository, digest = %s.digest, error = %e, "retrying a skipped manifest failed; it is tried again later");
                }
            }
        }
        if !done.is_empty() {
            self.skipped
                .update(|items| items.retain(|x| !done.iter().any(|d| d.same(x))))?;
            if matches!(self.role, Role::Gateway) {
                // The parent shows the shorter list at once, not at the next change, and
                // content that arrived moves the last sync time.
                let outcome = match arrived {
                    true => Outcome::Synced,
                    false => Outcome::Progress,
                };
                self.report("Online", outcome).await?;
            }
        }
        ended
    }

    /// Fetches again from the parent the blobs the registry found missing or cut short in the
    /// local store (a client's pull of them was answered `BLOB_UNKNOWN`): nothing is pushed
    /// to a ReadOnly site, so without this a damaged blob would stay unknown here for good.
    /// One the parent cannot serve is left alone for [`REPAIR_QUIET`], one that failed here
    /// (a full disk, say) for [`REPAIR_RETRY`]; one a broken link cut off is found again at
    /// its next read and tried then.
    async fn repair_damaged(&self) -> Result<()> {
        for (repo, digest, size) in self.registry.take_damaged() {
            let now = std::time::Instant::now();
            let quiet = self
                .unrepaired
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .get(&digest)
                .is_some_and(|u| now < u.until);
            // Mended already: a pull that found it damaged again while it was being fetched.
            if quiet || self.registry.holds_blob(&digest, size).await? {
                continue;
            }
            match self.fetch_blob_once(&repo, &digest, size).await {
                Ok(()) => {
                    tracing::info!(repository = %repo, %digest, size, "a damaged blob was fetched again from the parent");
                    self.registry.metrics().blob_repaired();
                    let shown = self
                        .unrepaired
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .remove(&digest)
                        .is_some();
                    if shown {
                        self.damage_changed().await;
                    }
                }
                Err(
                    e @ (SyncError::Unreachable { .. }
                    | SyncError::Interrupted { .. }
                    | SyncError::WindowClosed),
                ) => return Err(e),
                Err(e) => {
                    let wait = match parent_lacks_content(&e) {
                        true => {
                            tracing::warn!(repository = %repo, %digest, error = %e, "the parent cannot serve a damaged blob either; it stays unknown here, and is asked for again at a read a minute from now");
                            REPAIR_QUIET
                        }
                        false => {
                            tracing::warn!(repository = %repo, %digest, error = %e, "a damaged blob could not be fetched again; it is tried again at a read 10 s from now");
                            REPAIR_RETRY
                        }
                    };
                    let new = {
                        let mut unrepaired =
                            self.unrepaired.lock().unwrap_or_else(|p| p.into_inner());
                        let since = unrepaired
                            .get(&digest)
                            .map_or_else(now_rfc3339, |u| u.since.clone());
                        let new = !unrepaired.contains_key(&digest);
                        if !new || unrepaired.len() < DAMAGE_KEPT_HERE {
                            unrepaired.insert(
                                digest,
                                Unrepaired {
                                    repo,
                                    reason: e.to_string(),
                                    since,
                                    until: now + wait,
                                },
                            );
                        }
                        new
                    };
                    if new {
                        self.damage_changed().await;
                    }
                }
            }
        }
        Ok(())
    }

    /// The parent shows the damage this node could not mend at once, and stops showing it once
    /// mended, not at the next change.
    async fn damage_changed(&self) {
        if matches!(self.role, Role::Gateway)
            && let Err(e) = self.report("Online", Outcome::Progress).await
        {
            tracing::debug!(error = %e, "could not report storage damage to the parent");
        }
        self.current_details();
    }

    /// `StorageDamage` details: blobs damaged here that could not be fetched again.
    fn damage_details(&self) -> Vec<StatusDetail> {
        let unrepaired = self.unrepaired.lock().unwrap_or_else(|p| p.into_inner());
        let mut shown: Vec<(&Digest, &Unrepaired)> = unrepaired.iter().collect();
        shown.sort_by(|a, b| a.1.since.cmp(&b.1.since).then(a.0.cmp(b.0)));
        let mut details: Vec<StatusDetail> = shown
            .iter()
            .take(DAMAGE_SHOWN)
            .map(|(digest, u)| StatusDetail {
                kind: "Sync".into(),
                code: "StorageDamage".into(),
                description: format!(
                    "blob {digest} of {} is damaged in this registry's store and could not be fetched again ({}); its clients get BLOB_UNKNOWN for it. It is tried again when read",
                    u.repo, u.reason
                ),
                timestamp: Some(u.since.clone()),
                correlation_id: None,
            })
            .collect();
        if shown.len() > DAMAGE_SHOWN {
            details.push(StatusDetail {
                kind: "Sync".into(),
                code: "StorageDamage".into(),
                description: format!(
                    "{} more damaged blobs could not be fetched again (see the registry's log)",
                    shown.len() - DAMAGE_SHOWN
                ),
                timestamp: None,
                correlation_id: None,
            });
        }
        details
    }

    /// Makes blob `digest` (of `size` bytes, as its descriptor says) present in `repo`: linked
    /// if stored already, else downloaded. Small blobs come in one request and are stored in
    /// one step; larger ones go in pieces into an upload whose id survives restarts, resuming
    /// with `Range`.
    async fn ensure_blob(&self, repo: &RepoName, digest: &Digest, size: u64) -> Result<()> {
        // Linked again, which marks it recently used: until its manifest is stored it is
        // referenced by nothing, and garbage collection spares only recent blobs. An image
        // that takes several sync windows keeps what earlier windows fetched as long as the
        // windows come more often than gc_min_age_secs.
        if self
            .registry
            .blob_size_checked(repo, digest)
            .await
            .is_ok_and(|n| n == size)
            && self
                .registry
                .link_existing_blob(repo, digest, size)
                .await?
                .is_some()
        {
            return Ok(());
        }
        self.fetch_blob_once(repo, digest, size).await
    }

    /// [`Self::fetch_blob`], one task at a time per digest: another that needs the same blob
    /// waits, then finds it stored.
    async fn fetch_blob_once(&self, repo: &RepoName, digest: &Digest, size: u64) -> Result<()> {
        let gate = self
            .fetching
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(digest.clone())
            .or_default()
            .clone();
        let fetched = {
            let _one_at_a_time = gate.lock().await;
            self.fetch_blob(repo, digest, size).await
        };
        let mut map = self.fetching.lock().unwrap_or_else(|p| p.into_inner());
        // Two references: the map's and ours; no other task waits for this digest.
        if Arc::strong_count(&gate) <= 2 {
            map.remove(digest);
        }
        fetched
    }

    async fn fetch_blob(&self, repo: &RepoName, digest: &Digest, size: u64) -> Result<()> {
        let marker =
            self.dir
                .join("partial")
                .join(format!("{}-{}", digest.algorithm(), digest.hex()));
        if self
            .registry
            .link_existing_blob(repo, digest, size)
            .await?
            .is_some()
        {
            // Stored by an earlier attempt that failed after the commit (say, a full database).
            let _ = std::fs::remove_file(&marker);
            return Ok(());
        }
        if size <= SMALL_BLOB {
            return self.fetch_small_blob(repo, digest, size).await;
        }
        let mut upload = None;
        if let Some(saved) = read_state(&marker)?
            && let Some((saved_repo, id)) = saved.split_once(' ')
            && saved_repo == repo.as_str()
            && let Ok(size) = self.registry.upload_status(repo, id).await
        {
            upload = Some((id.to_string(), size));
        }
        let (id, mut offset) = match upload {
            Some(u) => u,
            None => {
                let id = self.registry.start_upload(repo).await?;
                write_state(&marker, format!("{repo} {id}"))?;
                (id, 0)
            }
        };
        if offset > 0 {
            tracing::info!(%digest, offset, "resuming blob transfer");
        }
        // All bytes may be here already: a window closed, the process died or the disk was
        // full between the last piece and the commit. Then there is nothing to download (a
        // Range starting at the blob's end would be refused).
        let cut = if offset < size {
            let mut stream = Box::pin(
                self.parent
                    .blob(repo.as_str(), &digest.to_string(), offset)
                    .await?,
            );
            // The download and the appends overlap: one side reads the next pieces from the
            // network while the other hashes and writes the last one. Each append is a point the
            // transfer can resume from.
            let (pieces, mut queued) = tokio::sync::mpsc::channel::<Vec<Bytes>>(PIECES_IN_FLIGHT);
            /// How the download ended.
            enum Ending {
                Whole,
                Cut(String),
                /// More bytes than the descriptor's size: a parent that sends without end
                /// would fill the disk.
                TooLong,
            }
            let mut room = size - offset;
            let download = async move {
                let mut piece: Vec<Bytes> = Vec::new();
                let mut piece_len = 0usize;
                loop {
                    let (done, cut) = match stream.next().await {
                        Some(Ok(chunk)) if chunk.len() as u64 > room => {
                            return Ok(Ending::TooLong);
                        }
                        Some(Ok(chunk)) => {
                            room -= chunk.len() as u64;
                            piece_len += chunk.len();
                            piece.push(chunk);
                            (false, Ending::Whole)
                        }
                        Some(Err(e)) => (true, Ending::Cut(e.to_string())),
                        None => (true, Ending::Whole),
                    };
                    if piece_len >= PIECE_BYTES || (done && piece_len > 0) {
                        piece_len = 0;
                        if pieces.send(std::mem::take(&mut piece)).await.is_err() {
                            return Ok(Ending::Whole); // the appends stopped; their error is the answer
                        }
                    }
                    if done {
                        return Ok::<_, SyncError>(cut);
                    }
                }
            };
            let store = async {
                while let Some(piece) = queued.recv().await {
                    let body = futures_util::stream::iter(
                        piece.into_iter().map(Ok::<Bytes, std::io::Error>),
                    );
                    offset = self
                        .registry
                        .append_upload(repo, &id, Some(offset), body)
                        .await?;
                    self.progressed.store(true, Relaxed);
                    if offset < size {
                        self.check_window()?;
                    }
                }
                Ok::<_, SyncError>(())
            };
            match tokio::try_join!(download, store)? {
                (Ending::Whole, ()) => None,
                (Ending::Cut(reason), ()) => Some(reason),
                (Ending::TooLong, ()) => {
                    // What was stored of it is not worth resuming from.
                    let _ = self.registry.cancel_upload(repo, &id).await;
                    let _ = std::fs::remove_file(&marker);
                    return Err(self.damaged_copy(
                        "blob",
                        digest,
                        format!("is longer than the {size} bytes its descriptor says"),
                    ));
                }
            }
        } else {
            None
        };
        if let Some(reason) = cut {
            return Err(SyncError::Interrupted {
                parent: self.parent.base().to_string(),
                reason: format!("blob {digest} cut at byte {offset}: {reason}"),
            });
        }
        let finished = self
            .registry
            .finish_upload(
                repo,
                &id,
                digest,
                None,
                None::<futures_util::stream::Empty<Result<Bytes, std::io::Error>>>,
            )
            .await;
        match finished {
            Ok(_) => {
                let _ = std::fs::remove_file(&marker);
                Ok(())
            }
            Err(RegistryError::DigestMismatch { actual, .. }) => {
                // The upload was discarded; the next attempt starts over.
                let _ = std::fs::remove_file(&marker);
                Err(self.corrupt_blob(digest, &actual))
            }
            // Anything else (a full disk at commit) keeps the upload to resume from.
            Err(e) => Err(e.into()),
        }
    }

    async fn fetch_small_blob(&self, repo: &RepoName, digest: &Digest, size: u64) -> Result<()> {
        let mut stream = Box::pin(
            self.parent
                .blob(repo.as_str(), &digest.to_string(), 0)
                .await?,
        );
        let mut body = bytes::BytesMut::with_capacity(size as usize);
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.map_err(|e| SyncError::Interrupted {
                parent: self.parent.base().to_string(),
                reason: format!("blob {digest} cut at byte {}: {e}", body.len()),
            })?;
            if (body.len() + chunk.len()) as u64 > size {
                return Err(self.damaged_copy(
                    "blob",
                    digest,
                    format!("is longer than the {size} bytes its descriptor says"),
                ));
            }
            body.extend_from_slice(&chunk);
        }
        match self.registry.put_blob(repo, digest, body.freeze()).await {
            Err(RegistryError::DigestMismatch { actual, .. }) => {
                Err(self.corrupt_blob(digest, &actual))
            }
            other => other.map(drop).map_err(Into::into),
        }
    }
}

/// How often a scheduled site outside its window reports and checks its configuration, in
/// poll intervals (`sync_poll_secs`): every 5 minutes by default.
const CLOSED_WINDOW_CONTACT: u32 = 12;

tokio::task_local! {
    /// How many manifests deep [`Child::ensure_manifest`] is: indexes and referrers are
    /// followed by recursion.
    static NESTING: usize;
}

/// A damaged blob that could not be fetched again: [`Child::repair_damaged`].
struct Unrepaired {
    repo: RepoName,
    reason: String,
    since: String,
    until: std::time::Instant,
}

/// The most damaged blobs shown one by one in the status; more are counted.
const DAMAGE_SHOWN: usize = 10;
/// The most damaged blobs remembered as not fetched again.
const DAMAGE_KEPT_HERE: usize = 1000;

/// How long a damaged blob the parent could not serve is left alone before it is asked for
/// again: [`Child::repair_damaged`]. Short, since a parent may be mending its own copy (an
/// intermediate node that found the same damage).
const REPAIR_QUIET: Duration = Duration::from_secs(60);
/// The same for a fetch that failed here (a full disk, a path that is not a file).
const REPAIR_RETRY: Duration = Duration::from_secs(10);

/// The deepest chain of manifests followed (real ones are 2 or 3 deep).
const MAX_NESTING: usize = 64;

/// Blobs up to this size are fetched in one request and stored in one step (no upload
/// session, no resume marker): a cut transfer costs less to repeat than to track.
const SMALL_BLOB: u64 = 1 << 20;
/// Larger blobs are appended to their upload session in pieces of about this size; a cut
/// transfer resumes from the last piece stored.
const PIECE_BYTES: usize = 1 << 20;
/// Pieces downloaded ahead of the one being stored. A `kill -9` loses these (at most
/// `(PIECES_IN_FLIGHT + 1) * PIECE_BYTES` to download again), so keep it small.
const PIECES_IN_FLIGHT: usize = 2;

impl Child {
    /// Blob `digest` arrived hashing to `actual`; nothing of it was stored. Damage on the way
    /// differs from one attempt to the next and is fetched again; the same wrong content
    /// twice in a row is the parent's copy that is damaged, which no retry mends: the
    /// manifest that needs it is then skipped like one whose blob the parent lacks, so it
    /// does not hold up everything after it (and is retried with the other skipped ones).
    fn corrupt_blob(&self, digest: &Digest, actual: &Digest) -> SyncError {
        self.damaged_copy("blob", digest, format!("hashes to {actual}"))
    }

    /// Content `digest` arrived `wrong` (another digest, more bytes than its descriptor
    /// says); nothing of it was stored. Fetched again, unless it arrived wrong the same way
    /// last time too: see [`Self::corrupt_blob`].
    fn damaged_copy(&self, kind: &str, digest: &Digest, wrong: String) -> SyncError {
        let times = {
            let mut damaged = self.damaged.lock().unwrap_or_else(|p| p.into_inner());
            let seen = damaged
                .entry(digest.clone())
                .or_insert_with(|| (wrong.clone(), 0));
            if seen.0 != wrong {
                *seen = (wrong.clone(), 0);
            }
            seen.1 += 1;
            seen.1
        };
        if times >= 2 {
            return SyncError::MissingAtParent(format!(
                "{kind} {digest}: the parent's copy is damaged (it {wrong}, {times} times in a row)"
            ));
        }
        SyncError::Protocol(format!(
            "{kind} {digest} from the parent {wrong}; nothing was stored, it is fetched again"
        ))
    }
}

/// A client's change of this site's, as its outbox sends it up: for offering a refused change
/// to the parent again.
fn client_change(
    repo: &RepoName,
    kind: &str,
    tag: Option<&str>,
    digest: &str,
) -> outpost_registry::Event {
    outpost_registry::Event {
        seq: 0,
        at_ms: 0,
        repo: repo.to_string(),
        kind: kind.into(),
        tag: tag.map(String::from),
        digest: Some(digest.to_string()),
        media_type: None,
        origin: None,
    }
}

/// ` CODE` for a registry error code, nothing for an answer without one.
fn code_suffix(code: &str) -> String {
    match code {
        "" => String::new(),
        c => format!(" {c}"),
    }
}

fn ignore_unknown<T>(r: Result<T, RegistryError>) -> Result<()> {
    match r {
        Ok(_) | Err(RegistryError::ManifestUnknown(_)) | Err(RegistryError::NameUnknown(_)) => {
            Ok(())
        }
        Err(e) => Err(e.into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn skipped(tag: Option<&str>, digest: &str) -> Skipped {
        Skipped {
            repository: "app".into(),
            tag: tag.map(String::from),
            digest: digest.into(),
            reason: "blob sha256:x answers 404".into(),
            since: "2026-11-28T10:00:00Z".into(),
        }
    }

    /// A manifest arriving under one tag settles that tag's entry and digest-only ones, not
    /// another tag's (whose retry still has to set that tag); the list survives a restart and
    /// every entry gets its turn.
    #[test]
    fn skip_list_settles_only_what_arrived_and_rotates() {
        let dir = tempfile::tempdir().unwrap();
        let list = SkipList::load(dir.path());
        assert!(list.add(skipped(Some("v1"), "sha256:d")).unwrap());
        assert!(list.add(skipped(Some("stable"), "sha256:d")).unwrap());
        assert!(list.add(skipped(None, "sha256:d")).unwrap());
        let mut again = skipped(Some("v1"), "sha256:d");
        again.since = "2026-11-29T00:00:00Z".into();
        assert!(list.add(again).unwrap(), "already there counts as recorded");
        assert_eq!(
            list.list().len(),
            2,
            "a tag's entry covers its manifest by digest"
        );
        // An untagged entry first is replaced by the tag's.
        assert!(list.add(skipped(None, "sha256:e")).unwrap());
        assert!(list.add(skipped(Some("v2"), "sha256:e")).unwrap());
        assert_eq!(list.list()[2], skipped(Some("v2"), "sha256:e"));
        list.arrived("app", Some("v2"), "sha256:e").unwrap();
        assert_eq!(list.list().len(), 2);
        assert_eq!(
            list.list()[0].since,
            "2026-11-28T10:00:00Z",
            "the first time is kept"
        );

        list.arrived("app", Some("stable"), "sha256:d").unwrap();
        assert_eq!(list.list(), [skipped(Some("v1"), "sha256:d")]);
        let reloaded = SkipList::load(dir.path());
        assert_eq!(reloaded.list(), list.list(), "kept in sync/skipped.json");

        // More entries than one round: each round takes the front and moves it to the back.
        for i in 0..SkipList::PER_ROUND + 5 {
            list.add(skipped(None, &format!("sha256:{i}"))).unwrap();
        }
        let first = list.next_round();
        let second = list.next_round();
        assert_eq!(first.len(), SkipList::PER_ROUND);
        assert!(
            second[..6].iter().all(|s| !first.contains(s)),
            "the ones not tried yet come first"
        );
        assert!(second.contains(&skipped(None, &format!("sha256:{}", SkipList::PER_ROUND))));
        assert_eq!(
            list.list().len(),
            SkipList::PER_ROUND + 6,
            "nothing is dropped"
        );
        // At most SHOWN details one by one, then one summary.
        let details = list.details();
        assert_eq!(details.len(), SkipList::SHOWN + 1);
        assert!(
            details[SkipList::SHOWN].description.contains("16 more"),
            "{}",
            details[SkipList::SHOWN].description
        );

        // A corrupt file is replaced, and the cursor forgotten so a full reconcile finds what
        // is still missing; not a reason to stop.
        std::fs::write(dir.path().join("cursor"), "42").unwrap();
        std::fs::write(dir.path().join("skipped.json"), "{not json").unwrap();
        assert!(SkipList::load(dir.path()).list().is_empty());
        assert!(!dir.path().join("cursor").exists());
        std::fs::write(dir.path().join("cursor"), "43").unwrap();
        assert!(SkipList::load(dir.path()).list().is_empty());
        assert!(
            dir.path().join("cursor").exists(),
            "the replaced list does not force another reconcile"
        );
    }

    #[test]
    fn only_a_registrys_not_found_counts_as_missing_content() {
        let e = |status: u16, code: &str| SyncError::Parent {
            status,
            code: code.into(),
            message: String::new(),
        };
        assert!(parent_lacks_content(&e(404, "BLOB_UNKNOWN")));
        assert!(parent_lacks_content(&e(404, "MANIFEST_UNKNOWN")));
        assert!(parent_lacks_content(&SyncError::MissingAtParent(
            "x".into()
        )));
        assert!(
            !parent_lacks_content(&e(404, "")),
            "a proxy's 404 is retried"
        );
        assert!(!parent_lacks_content(&e(500, "BLOB_UNKNOWN")));
        assert!(notifications_refused(&e(400, "INVALID_REQUEST")));
        assert!(notifications_refused(&e(404, "")));
        assert!(notifications_refused(&SyncError::Denied {
            message: String::new()
        }));
        assert!(!notifications_refused(&e(503, "UNAVAILABLE")));
        assert!(!notifications_refused(&e(429, "TOOMANYREQUESTS")));
        assert!(!notifications_refused(&e(408, "")));
    }

    #[test]
    fn a_damaged_outbox_cursor_is_an_error_not_a_resend_of_everything() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("outbox-cursor");
        assert_eq!(
            read_outbox_cursor(&path).unwrap(),
            None,
            "never sent anything"
        );
        write_state(&path, "42").unwrap();
        assert_eq!(read_outbox_cursor(&path).unwrap(), Some(42));
        for bad in ["", "4x2", "-"] {
            std::fs::write(&path, bad).unwrap();
            let e = read_outbox_cursor(&path).unwrap_err().to_string();
            assert!(
                e.contains("outbox-cursor") && e.contains("not an event number"),
                "{e}"
            );
        }
    }

    #[test]
    fn a_damaged_list_of_refused_changes_is_an_error_not_a_new_list() {
        let dir = tempfile::tempdir().unwrap();
        let list = RefusedList::load(dir.path()).unwrap();
        assert!(!list.has_tag("local", "v7", "sha256:00"));
        list.add(RefusedChange {
            repository: "local".into(),
            tag: Some("v7".into()),
            digest: "sha256:00".into(),
        })
        .unwrap();
        let again = RefusedList::load(dir.path()).unwrap();
        assert!(again.has_tag("local", "v7", "sha256:00"));
        for bad in ["", "{{{", "\0\0\0\0"] {
            std::fs::write(dir.path().join("refused.json"), bad).unwrap();
            let e = RefusedList::load(dir.path()).err().unwrap().to_string();
            assert!(
                e.contains("refused.json") && e.contains("restore it from a backup"),
                "{e}"
            );
        }
    }

    fn parent(status: u16, code: &str, message: &str) -> SyncError {
        SyncError::Parent {
            status,
            code: code.into(),
            message: message.into(),
        }
    }

    #[test]
    fn only_a_not_active_answer_means_deactivated() {
        assert!(not_active(&parent(400, "NOT_ACTIVE", "")));
        // A parent of the previous version said it in words only.
        assert!(not_active(&parent(
            400,
            "INVALID_REQUEST",
            "instance \"x\" is not the active instance of connected registry \"y\""
        )));
        assert!(!not_active(&parent(
            400,
            "INVALID_REQUEST",
            "state \"Busy\" is not Online"
        )));
        assert!(!not_active(&parent(400, "", "Bad Request")));
    }

    /// A refused sync token's message points at the fix for what the parent said.
    #[test]
    fn a_refused_sync_token_says_what_to_do() {
        let refused = |message: &str| {
            SyncError::BadCredentials {
                token: "ship-one".into(),
                name: "ship-one".into(),
                message: message.into(),
            }
            .to_string()
        };
        let disabled = refused("token \"ship-one\" is disabled");
        assert!(
            disabled.contains("outpost token update -n ship-one --status enabled"),
            "{disabled}"
        );
        assert!(!disabled.contains("--generate-password"), "{disabled}");
        let wrong = refused("incorrect username or password");
        assert!(
            wrong.contains("get-settings -n ship-one --parent-protocol http --generate-password 1"),
            "{wrong}"
        );
    }

    /// A parent that cannot store a status report (its disk is full: 507; its database is
    /// down: 503) does not stop a sync that only reads from it; a refusal does.
    #[test]
    fn a_status_report_the_parent_could_not_store_does_not_stop_the_sync() {
        assert!(!recorded_nothing(Ok(())).unwrap());
        for status in [500, 503, 507] {
            assert!(
                recorded_nothing(Err(parent(status, "UNAVAILABLE", "disk full"))).unwrap(),
                "{status}"
            );
        }
        for status in [400, 401, 403, 404] {
            assert!(
                recorded_nothing(Err(parent(status, "DENIED", ""))).is_err(),
                "{status}"
            );
        }
        let cut = SyncError::Unreachable {
            parent: "http://p:5000".into(),
            reason: "connection reset".into(),
        };
        assert!(recorded_nothing(Err(cut)).is_err());
    }

    #[test]
    fn an_unreachable_parent_names_a_local_cause_as_local() {
        let e = |reason: &str| {
            SyncError::Unreachable {
                parent: "http://p:5000".into(),
                reason: reason.into(),
            }
            .to_string()
        };
        let far = e("tcp connect error: Connection refused (os error 111)");
        assert!(
            far.contains("ParentGatewayEndpoint") && far.contains("or upstream_url for a mirror"),
            "{far}"
        );
        let local = e("tcp open error: Too many open files (os error 24)");
        assert!(local.contains("out of file descriptors"), "{local}");
        assert!(!local.contains("ParentGatewayEndpoint"), "{local}");
    }

    #[test]
    fn repair_advice_fits_what_is_missing() {
        let child = SyncError::MissingAtParent("manifest sha256:aa, which sha256:bb lists".into());
        assert!(repair_advice(&child.to_string()).contains("delete the index there too"));
        let blob = SyncError::Parent {
            status: 404,
            code: "BLOB_UNKNOWN".into(),
            message: "blob unknown to registry".into(),
        };
        assert!(repair_advice(&blob.to_string()).starts_with("Push the image"));
    }

    #[test]
    fn what_is_refused_for_good() {
        assert!(refused_for_good(&SyncError::Denied {
            message: "no".into()
        }));
        assert!(refused_for_good(&parent(400, "MANIFEST_INVALID", "")));
        assert!(refused_for_good(&parent(413, "SIZE_INVALID", "")));
        // A deletion of a manifest an index at the parent lists.
        assert!(refused_for_good(&parent(409, "MANIFEST_REFERENCED", "")));
        // Retried: a cut upload, a proxy's answer without a registry code, a blob the parent
        // lacks for now, load, odd replies.
        assert!(!refused_for_good(&parent(400, "BLOB_UPLOAD_INVALID", "")));
        assert!(!refused_for_good(&parent(
            413,
            "",
            "Request Entity Too Large"
        )));
        assert!(!refused_for_good(&parent(400, "MANIFEST_BLOB_UNKNOWN", "")));
        assert!(!refused_for_good(&parent(429, "TOOMANYREQUESTS", "")));
        assert!(!refused_for_good(&parent(503, "UNAVAILABLE", "")));
        assert!(!refused_for_good(&SyncError::Protocol(
            "no Location".into()
        )));
    }
}
