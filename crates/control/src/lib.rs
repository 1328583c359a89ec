//! `outpost-control` holds access control as ACR models it: scope maps (rules granting
//! repository and gateway actions), tokens (status, one scope map, two passwords with optional
//! expiries), authentication of Basic credentials, short-lived signed access tokens for the
//! Docker/OCI token flow, and the authorization decision for every request. The connected-
//! registry control plane will live here too.
//!
//! Invariants: passwords exist only as Argon2id hashes (a new password is returned once, to the
//! caller that created it); every limit is enforced here with an error that names it; every
//! write bumps a generation counter so cached identities are read again, and a password verified
//! earlier counts only while its slot still holds the hash it matched; that is what makes
//! disabling a token or deleting a password take effect immediately.

mod checks;
pub mod clock;
pub mod connected;
pub mod connstr;
pub mod jwt;
pub mod notify;
pub mod password;
pub mod scope;
pub mod watch;

pub use checks::as_client;
pub use connected::{
    ConnectedLimits, ConnectedRegistryView, CreateConnectedRegistry, Mode, UpdateConnectedRegistry,
};
pub use connstr::ConnectionString;

pub use scope::{GatewayAction, Permissions, RepoAction, RepoPattern, Rule, ScopeError};

use outpost_meta::{Meta, MetaError, PasswordRow, ScopeMapRow, TokenRow};
use serde::Serialize;
use sha2::Digest as _;
use std::collections::{BTreeSet, HashMap};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// The name of the administrator token created on first start.
pub const ADMIN_TOKEN: &str = "admin";

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ControlError {
    #[error("{kind} {name:?} does not exist")]
    NotFound { kind: &'static str, name: String },
    #[error("{kind} {name:?} already exists")]
    AlreadyExists { kind: &'static str, name: String },
    /// A name already in use, with what to do about it.
    #[error("{0}")]
    Taken(String),
    #[error("{0}")]
    Invalid(String),
    /// A connected-registry change asked of a connected registry: the resources come from the
    /// root, and a local change would cut off the children until the next sync.
    #[error(
        "this registry is the connected registry {0:?}: connected registries are created and changed at the root (the cloud registry), e.g. `outpost connected-registry ... --registry <root>`"
    )]
    ManagedAtRoot(String),
    /// A change, at a connected registry, of a token or scope map its parent installed: it
    /// would be undone at the next sync, or cut off a child until then.
    #[error(
        "{kind} {name:?} comes from this connected registry's parent: change it at the root (`outpost {kind} ... --registry <root>`), and this registry applies the change at its next sync"
    )]
    FromParent { kind: &'static str, name: String },
    /// A status report from an instance that is not (or no longer) the active one: the
    /// resource was deactivated.
    #[error("{0}")]
    NotActive(String),
    #[error(transparent)]
    Scope(#[from] ScopeError),
    #[error(
        "limit reached: {what} (the limit is {limit}; raise it in the configuration if you need more)"
    )]
    Limit { what: String, limit: u64 },
    #[error("incorrect username or password")]
    BadCredentials,
    #[error("token {0:?} is disabled")]
    Disabled(String),
    #[error(
        "the password of token {name:?} expired at {}; generate a new one with `outpost token credential generate`",
        rfc3339(*at)
    )]
    PasswordExpired { name: String, at: i64 },
    #[error(transparent)]
    Jwt(#[from] jwt::JwtError),
    #[error(transparent)]
    Meta(#[from] MetaError),
    /// The cause is part of the text, not a `source()` (it would be printed twice).
    #[error("access-control I/O error on {path}: {cause}")]
    Io { path: String, cause: std::io::Error },
    #[error(
        "Failed to activate the connected registry {0:?} as it is already activated by another instance. Only one instance is supported at any time. Deactivate it first with `outpost connected-registry deactivate -n {0}`."
    )]
    AlreadyActivated(String),
    #[error(
        "messages of connected registry {name:?} after {after} have expired (message TTL {ttl}) or are unknown here; reconcile fully, then continue from {latest}"
    )]
    CursorExpired {
        name: String,
        after: i64,
        ttl: String,
        latest: i64,
    },
    /// Something this node must pass to its own parent, which cannot be reached now: the
    /// caller keeps it and tries again.
    #[error("{0}")]
    Unavailable(String),
    #[error("internal error: {0}")]
    Internal(String),
}

pub type Result<T, E = ControlError> = std::result::Result<T, E>;

/// Configurable limits (ACR's values by default).
#[derive(Debug, Clone)]
pub struct Limits {
    pub max_tokens: u64,
    pub max_scope_maps: u64,
    pub max_repository_rules: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_tokens: 20_000,
            max_scope_maps: 20_000,
            max_repository_rules: 500,
        }
    }
}

#[derive(Debug, Clone)]
pub struct ControlConfig {
    pub limits: Limits,
    /// Lifetime of issued access tokens.
    pub access_token_ttl: Duration,
    /// How long a successful password verification is trusted before Argon2 runs again.
    pub verified_ttl: Duration,
    /// Limits of the connected-registry control plane.
    pub connected: ConnectedLimits,
    /// `Some(name)` on a connected registry: the connected-registry resources it holds (its
    /// descendants) come from the root, so the API refuses to change them here.
    pub managed_at_root: Option<String>,
}

impl Default for ControlConfig {
    fn default() -> Self {
        ControlConfig {
            limits: Limits::default(),
            access_token_ttl: Duration::from_secs(300),
            verified_ttl: Duration::from_secs(300),
            connected: ConnectedLimits::default(),
            managed_at_root: None,
        }
    }
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// Token and scope-map names: 5 to 50 characters of letters, digits, `-` and `_`, as ACR allows.
pub fn validate_name(kind: &str, name: &str) -> Result<()> {
    let ok = (5..=50).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        && name.as_bytes()[0].is_ascii_alphanumeric();
    if ok {
        Ok(())
    } else {
        Err(ControlError::Invalid(format!(
            "{kind} name {name:?} is invalid: use 5 to 50 letters, digits, '-' or '_', starting with a letter or digit"
        )))
    }
}

/// A token as it authenticates: its current permissions and password slots.
#[derive(Debug, Clone)]
pub struct Identity {
    pub name: String,
    pub enabled: bool,
    pub perms: Permissions,
    passwords: [PasswordRow; 2],
    /// Changes whenever a password of the token is generated or deleted. Access tokens of
    /// earlier versions carry it (and [`Control::issue`] still does): any rotation ends them.
    credential_version: String,
    /// One per password slot, changing when that password is generated or deleted: an access
    /// token carries the one of the password it was bought with, so it stops working at once
    /// when that password changes, instead of at its expiry, and keeps working while the
    /// other one is rotated (the rotation ACR's two passwords exist for).
    password_versions: [String; 2],
}

/// A short digest of a token's password hashes (see [`Identity::credential_version`]).
fn credential_version(passwords: &[PasswordRow; 2]) -> String {
    let mut h = sha2::Sha256::new();
    for p in passwords {
        h.update(p.hash.as_deref().unwrap_or("-").as_bytes());
        h.update([0u8]);
    }
    short_hex(&h.finalize())
}

/// A short digest of password slot `slot`'s hash (see [`Identity::password_versions`]).
fn password_version(slot: usize, password: &PasswordRow) -> String {
    let mut h = sha2::Sha256::new();
    h.update([b'1' + slot as u8, 0]);
    h.update(password.hash.as_deref().unwrap_or("-").as_bytes());
    short_hex(&h.finalize())
}

fn short_hex(digest: &[u8]) -> String {
    digest[..8].iter().map(|b| format!("{b:02x}")).collect()
}

/// A login [`Control::authenticate_until`] verified: which password matched, and when it
/// expires.
#[derive(Debug, Clone, Copy)]
pub struct Login {
    /// When the password expires (Unix milliseconds; `None`: never), which bounds an access
    /// token issued for it.
    pub until: Option<i64>,
    slot: usize,
}

/// Who is making a request.
#[derive(Debug, Clone)]
pub enum Principal {
    /// No credentials; `pull` says whether the operator allows anonymous pulls.
    Anonymous { pull: bool },
    /// Basic credentials, verified.
    Basic(Arc<Identity>),
    /// A bearer access token issued here, verified, for a token that is still enabled.
    Bearer {
        identity: Arc<Identity>,
        claims: Arc<jwt::Claims>,
    },
}

impl Principal {
    /// Whether the token behind this principal holds `action` on `repo`, regardless of what an
    /// access token was scoped to.
    pub fn identity_allows(&self, repo: &str, action: RepoAction) -> bool {
        match self {
            Principal::Anonymous { pull } => {
                *pull && matches!(action, RepoAction::ContentRead | RepoAction::MetadataRead)
            }
            Principal::Basic(i) | Principal::Bearer { identity: i, .. } => {
                i.perms.allows(repo, action)
            }
        }
    }

    /// Whether this request may do `action` on `repo`.
    /// Whether this principal holds a gateway action (sync tokens of connected registries).
    pub fn allows_gateway(&self, name: &str, action: GatewayAction) -> bool {
        match self {
            Principal::Basic(i) | Principal::Bearer { identity: i, .. } => {
                i.perms.allows_gateway(name, action)
            }
            Principal::Anonymous { .. } => false,
        }
    }

    pub fn allows(&self, repo: &str, action: RepoAction) -> bool {
        if !self.identity_allows(repo, action) {
            return false;
        }
        match self {
            Principal::Bearer { claims, .. } => claims.access.iter().any(|a| {
                a.kind == "repository"
                    && a.name == repo
                    && a.actions.iter().any(|x| x == action.as_str())
            }),
            _ => true,
        }
    }

    pub fn is_admin(&self) -> bool {
        match self {
            Principal::Basic(i) | Principal::Bearer { identity: i, .. } => i.perms.is_admin(),
            Principal::Anonymous { .. } => false,
        }
    }

    pub fn is_authenticated(&self) -> bool {
        !matches!(self, Principal::Anonymous { .. })
    }

    pub fn name(&self) -> &str {
        match self {
            Principal::Basic(i) | Principal::Bearer { identity: i, .. } => &i.name,
            Principal::Anonymous { .. } => "anonymous",
        }
    }
}

/// An issued access token, as the token endpoint returns it.
#[derive(Debug, Clone, Serialize)]
pub struct AccessToken {
    pub token: String,
    pub access_token: String,
    pub expires_in: u64,
    pub issued_at: String,
}

/// A scope map as the management API shows it.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct ScopeMapView {
    pub name: String,
    pub description: String,
    pub actions: Vec<String>,
    pub creation_date: String,
}

#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct PasswordView {
    pub name: String,
    pub creation_time: Option<String>,
    pub expiry: Option<String>,
    /// Present only in the response that generated it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub value: Option<String>,
}

/// A token as the management API shows it (never with password hashes).
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct TokenView {
    pub name: String,
    pub scope_map: Option<String>,
    pub status: String,
    pub creation_date: String,
    pub passwords: Vec<PasswordView>,
}

/// Formats Unix milliseconds as `YYYY-MM-DDTHH:MM:SSZ`.
pub fn format_rfc3339(ms: i64) -> String {
    rfc3339(ms)
}

fn rfc3339(ms: i64) -> String {
    // Civil-from-days (Howard Hinnant's algorithm) keeps us free of a date-time dependency here.
    let secs = ms.div_euclid(1000);
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = if m <= 2 { y + 1 } else { y };
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// Parses `YYYY-MM-DDTHH:MM:SSZ` (the `--expiration` format) into Unix milliseconds.
pub fn parse_rfc3339(s: &str) -> Result<i64> {
    let bad = || {
        ControlError::Invalid(format!(
            "date {s:?} is not a real date and time of the form YYYY-MM-DDTHH:MM:SSZ (UTC)"
        ))
    };
    let b = s.as_bytes();
    let digits = [0..4, 5..7, 8..10, 11..13, 14..16, 17..19];
    if b.len() != 20
        || b[4] != b'-'
        || b[7] != b'-'
        || b[10] != b'T'
        || b[13] != b':'
        || b[16] != b':'
        || b[19] != b'Z'
        || !digits
            .iter()
            .all(|r| b[r.clone()].iter().all(u8::is_ascii_digit))
    {
        return Err(bad());
    }
    let n = |r: std::ops::Range<usize>| s[r].parse::<i64>().map_err(|_| bad());
    let (y, mo, d, h, mi, se) = (
        n(0..4)?,
        n(5..7)?,
        n(8..10)?,
        n(11..13)?,
        n(14..16)?,
        n(17..19)?,
    );
    let leap = (y % 4 == 0 && y % 100 != 0) || y % 400 == 0;
    let month_days = match mo {
        2 if leap => 29,
        2 => 28,
        4 | 6 | 9 | 11 => 30,
        _ => 31,
    };
    if !(1..=12).contains(&mo) || !(1..=month_days).contains(&d) || h > 23 || mi > 59 || se > 59 {
        return Err(bad());
    }
    let y2 = if mo <= 2 { y - 1 } else { y };
    let era = y2.div_euclid(400);
    let yoe = y2 - era * 400;
    let mp = (mo + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    Ok((days * 86_400 + h * 3600 + mi * 60 + se) * 1000)
}

/// An identity (or its absence) as of one generation of the access-control tables.
type CachedIdentity = (u64, Option<Arc<Identity>>);

/// A password found to match: which slot, and the stored hash it matched. The entry holds
/// while that slot still holds that hash, so changes to other tokens, scope maps or connected
/// registries do not send every client back through Argon2.
struct Verified {
    hash: String,
    slot: usize,
    at_ms: i64,
}

/// The access-control service of one node.
pub struct Control {
    meta: Meta,
    signer: jwt::Signer,
    config: ControlConfig,
    generation: AtomicU64,
    identities: RwLock<HashMap<String, CachedIdentity>>,
    verified: Mutex<HashMap<[u8; 32], Verified>>,
    /// When each token name last came with a wrong password (Unix ms): a connected
    /// registry's instance refused this way cannot report it, so the root shows it for it.
    refused_passwords: Mutex<HashMap<String, i64>>,
    /// Argon2 checks run for logins (decoys included): a password flood shows here.
    password_checks: AtomicU64,
    /// Access tokens already verified, by their exact text.
    bearers: RwLock<HashMap<String, Arc<jwt::Claims>>>,
    /// Serializes control-plane writes that check rules across several rows.
    writes: tokio::sync::Mutex<()>,
    /// Set on an intermediate connected registry: where to relay activation and status.
    upstream: RwLock<Option<Arc<dyn connected::Upstream>>>,
    /// When relaying a status report upward last failed (not answered in time, or not at
    /// all): reports are not relayed for a while after, so children do not wait on a parent
    /// that is away, nor dial it at every report.
    relay_failed: Mutex<Option<std::time::Instant>>,
    /// Counts access-control changes, for those who wait on them ([`Control::subscribe`]).
    changes: tokio::sync::watch::Sender<u64>,
    /// A login was refused: at a connected registry, its copy of the tokens may be older than
    /// the parent's ([`Control::logins_refused`]).
    refused: tokio::sync::Notify,
    /// When `refused` was last notified: at most every [`REFUSED_NOTICE`].
    refused_noticed: Mutex<Option<std::time::Instant>>,
}

/// The least time between two [`Control::logins_refused`] wake-ups: a client that keeps
/// sending a wrong password makes a connected registry ask its parent for its configuration
/// at most this often.
const REFUSED_NOTICE: std::time::Duration = std::time::Duration::from_secs(10);

/// `token a, b and c`, or for a long list `1234 tokens (a, b, c, d, e, …)`: an error message
/// stays readable however many there are.
fn name_some(kind: &str, names: &[String]) -> String {
    const SHOWN: usize = 5;
    match names.len() {
        1 => format!("{kind} {}", names[0]),
        n if n <= SHOWN => format!("{kind}s {}", names.join(", ")),
        n => format!("{n} {kind}s ({}, …)", names[..SHOWN].join(", ")),
    }
}

impl Control {
    /// Opens access control over `meta`, loading (or creating) the signing key in `data_dir/keys`.
    /// On a registry whose replicas share a PostgreSQL database, the key is kept in the
    /// database instead, so an access token one replica issued is valid at every other.
    pub async fn open(meta: Meta, data_dir: &Path, config: ControlConfig) -> Result<Control> {
        if meta.backend() == outpost_meta::Backend::Postgres {
            let key = meta
                .shared_secret("access-token-key", &password::random_key())
                .await?;
            return Ok(Self::with_key(meta, key, config));
        }
        let dir = data_dir.join("keys");
        let path = dir.join("access-token.key");
        let io = |source| ControlError::Io {
            path: path.display().to_string(),
            cause: source,
        };
        let key = match tokio::fs::read(&path).await {
            Ok(k) if k.len() >= 32 => k,
            Ok(_) => {
                return Err(ControlError::Internal(format!(
                    "signing key {} is too short",
                    path.display()
                )));
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                tokio::fs::create_dir_all(&dir).await.map_err(io)?;
                let k = password::random_key();
                write_private(&path, &k).await.map_err(io)?;
                k
            }
            Err(e) => return Err(io(e)),
        };
        Ok(Self::with_key(meta, key, config))
    }

    fn with_key(meta: Meta, key: Vec<u8>, config: ControlConfig) -> Control {
        Control {
            meta,
            signer: jwt::Signer::new(key),
            config,
            generation: AtomicU64::new(1),
            identities: RwLock::default(),
            verified: Mutex::default(),
            refused_passwords: Mutex::default(),
            password_checks: AtomicU64::new(0),
            bearers: RwLock::default(),
            writes: tokio::sync::Mutex::new(()),
            upstream: RwLock::new(None),
            relay_failed: Mutex::default(),
            changes: tokio::sync::watch::Sender::new(0),
            refused: tokio::sync::Notify::new(),
            refused_noticed: Mutex::default(),
        }
    }

    /// Notified at every change to tokens, scope maps or connected registries (not at status
    /// reports): a child's long-poll of the message feed ends early, so it fetches its new
    /// configuration (a new password, client token or scope) within moments.
    pub fn subscribe(&self) -> tokio::sync::watch::Receiver<u64> {
        self.changes.subscribe()
    }

    /// Makes this node relay its descendants' activation and status to its parent.
    pub fn set_upstream(&self, up: Arc<dyn connected::Upstream>) {
        *self.upstream.write().unwrap_or_else(|p| p.into_inner()) = Some(up);
    }

    /// After a write to tokens, scope maps or connected registries: cached identities are
    /// read again (and with them the hashes that verified passwords are checked against). (The other replicas sharing the database learn of
    /// it from the write itself, which counted it in the same transaction.)
    fn changed(&self) {
        self.reload();
    }

    /// Held around a control-plane change that reads rows, plans and writes them back: the
    /// process's own lock and, on a database that replicas share, theirs.
    pub(crate) async fn write_lock(
        &self,
    ) -> Result<(
        tokio::sync::MutexGuard<'_, ()>,
        Option<outpost_meta::ClusterGate>,
    )> {
        let local = self.writes.lock().await;
        let cluster = self
            .meta
            .cluster_lock(outpost_meta::ClusterLock::Control)
            .await?;
        Ok((local, cluster))
    }

    /// Drops what was cached of tokens, scope maps and connected registries: another replica
    /// sharing the database changed them.
    pub fn reload(&self) {
        self.generation.fetch_add(1, Ordering::AcqRel);
        self.changes.send_modify(|n| *n += 1);
    }

    fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    /// How many Argon2 password checks logins have cost this node so far (an unknown name
    /// or a wrong password costs two, a cached login none), and how many checks (of any node
    /// in this process) wait for a thread now.
    pub fn password_checks(&self) -> (u64, u64) {
        (
            self.password_checks.load(Ordering::Relaxed),
            checks::queued(),
        )
    }

    /// Creates the administrator token on first start. With `password` set, password1 is made
    /// to match it (so an operator can reset a lost password by restarting with it). Returns
    /// the generated password when one was made.
    pub async fn bootstrap_admin(&self, password: Option<&str>) -> Result<Option<String>> {
        // Replicas starting together on an empty database: one creates the token, the
        // others find it.
        let _w = self.write_lock().await?;
        let existing = self.meta.token(ADMIN_TOKEN).await?;
        if let Some(mut t) = existing {
            if let Some(p) = password {
                let matches = match &t.passwords[0].hash {
                    Some(h) => verify_blocking(p.to_string(), h.clone()).await,
                    None => false,
                };
                if !matches {
                    t.passwords[0] = new_password_row(p, None).await?;
                    t.is_admin = true;
                    t.status = "enabled".into();
                    self.meta.put_token(&t).await?;
                    self.changed();
                    tracing::info!("administrator password reset from configuration");
                }
            }
            return Ok(None);
        }
        let (pw, generated) = match password {
            Some(p) => (p.to_string(), None),
            None => {
                let p = password::generate();
                (p.clone(), Some(p))
            }
        };
        let row = TokenRow {
            name: ADMIN_TOKEN.into(),
            scope_map: None,
            status: "enabled".into(),
            is_admin: true,
            created_ms: now_ms(),
            updated_ms: now_ms(),
            passwords: [new_password_row(&pw, None).await?, PasswordRow::default()],
        };
        self.meta.put_token(&row).await?;
        self.changed();
        Ok(generated)
    }

    async fn identity(&self, name: &str) -> Result<Option<Arc<Identity>>> {
        let generation = self.generation();
        if let Some((g, id)) = self
            .identities
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(name)
            && *g == generation
        {
            return Ok(id.clone());
        }
        let id = match self.meta.token(name).await? {
            None => None,
            Some(t) => {
                let perms = if t.is_admin {
                    Permissions::admin()
                } else {
                    match &t.scope_map {
                        Some(sm) => match self.meta.scope_map(sm).await? {
                            Some(row) => Permissions::new(
                                row.actions.iter().filter_map(|a| Rule::parse(a).ok()),
                            ),
                            None => Permissions::default(),
                        },
                        None => Permissions::default(),
                    }
                };
                Some(Arc::new(Identity {
                    name: t.name,
                    enabled: t.status == "enabled",
                    perms,
                    credential_version: credential_version(&t.passwords),
                    password_versions: [
                        password_version(0, &t.passwords[0]),
                        password_version(1, &t.passwords[1]),
                    ],
                    passwords: t.passwords,
                }))
            }
        };
        let mut map = self.identities.write().unwrap_or_else(|p| p.into_inner());
        if map.len() > 100_000 {
            map.clear();
        }
        map.insert(name.to_string(), (generation, id.clone()));
        Ok(id)
    }

    /// Verifies Basic credentials. Successful verifications are remembered (keyed by a hash
    /// of the credentials) so that pulls do not pay for Argon2 on every request.
    pub async fn authenticate(&self, user: &str, pass: &str) -> Result<Arc<Identity>> {
        self.authenticate_until(user, pass).await.map(|(id, _)| id)
    }

    /// [`Control::authenticate`], also returning when the password that matched expires (Unix
    /// milliseconds; `None`: never), which bounds an access token issued for it.
    pub async fn authenticate_until(
        &self,
        user: &str,
        pass: &str,
    ) -> Result<(Arc<Identity>, Login)> {
        let Some(id) = self.identity(user).await? else {
            check_slots(pass, [None, None], &self.password_checks).await;
            self.login_refused();
            return Err(ControlError::BadCredentials);
        };
        let now = now_ms();
        let key: [u8; 32] = sha2::Sha256::new()
            .chain_update(user.as_bytes())
            .chain_update([0u8])
            .chain_update(pass.as_bytes())
            .finalize()
            .into();
        let cached = {
            let v = self.verified.lock().unwrap_or_else(|p| p.into_inner());
            // Checked against the identity just read: a password changed since (in this
            // slot, or the token deleted and made again) no longer matches what was verified.
            v.get(&key)
                .filter(|v| {
                    id.passwords[v.slot].hash.as_deref() == Some(v.hash.as_str())
                        && now - v.at_ms < self.config.verified_ttl.as_millis() as i64
                })
                .map(|v| v.slot)
        };
        let slot = match cached {
            Some(s) => s,
            None => {
                let hashes = [id.passwords[0].hash.as_ref(), id.passwords[1].hash.as_ref()];
                let Some(s) = check_slots(pass, hashes, &self.password_checks).await else {
                    let mut refused = self
                        .refused_passwords
                        .lock()
                        .unwrap_or_else(|p| p.into_inner());
                    if refused.len() >= 10_000 {
                        refused.clear();
                    }
                    refused.insert(user.to_string(), now);
                    drop(refused);
                    self.login_refused();
                    return Err(ControlError::BadCredentials);
                };
                let Some(hash) = hashes[s] else {
                    return Err(ControlError::BadCredentials);
                };
                let mut v = self.verified.lock().unwrap_or_else(|p| p.into_inner());
                if v.len() > 100_000 {
                    v.clear();
                }
                v.insert(
                    key,
                    Verified {
                        hash: hash.clone(),
                        slot: s,
                        at_ms: now,
                    },
                );
                s
            }
        };
        if !id.enabled {
            return Err(ControlError::Disabled(id.name.clone()));
        }
        let expiry = id.passwords[slot].expiry_ms;
        // By the root's clock: expiries are set there, and a site's clock may be far off.
        if let Some(at) = expiry.filter(|e| *e <= clock::now_ms()) {
            return Err(ControlError::PasswordExpired {
                name: id.name.clone(),
                at,
            });
        }
        Ok((
            id,
            Login {
                until: expiry,
                slot,
            },
        ))
    }

    fn login_refused(&self) {
        let mut last = self
            .refused_noticed
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if last.is_none_or(|t| t.elapsed() >= REFUSED_NOTICE) {
            *last = Some(std::time::Instant::now());
            self.refused.notify_one();
        }
    }

    /// Returns once a login was refused here (an unknown token, or a wrong password), at most
    /// once per 10 s. A connected registry's sync then asks its parent for the configuration
    /// at once: the token or password may have been made at the root a moment ago, and a
    /// parent of an earlier version does not end the long-poll for it.
    pub async fn logins_refused(&self) {
        self.refused.notified().await;
    }

    /// When `token` last came with a wrong password (Unix ms), since this process started.
    pub fn password_refused_at(&self, token: &str) -> Option<i64> {
        self.refused_passwords
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(token)
            .copied()
    }

    /// Verifies a bearer access token and that its token is still enabled.
    pub async fn verify_bearer(&self, token: &str, service: &str) -> Result<Principal> {
        let now = now_ms() / 1000;
        // A token verified before is not verified again (HMAC, base64 and JSON on every pull
        // cost about a sixth of the manifest request rate); its expiry still is.
        let cached = self
            .bearers
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(token)
            .filter(|c| c.aud == service)
            .cloned();
        let claims = match cached {
            Some(c) if now < c.exp => c,
            Some(_) => return Err(ControlError::Jwt(jwt::JwtError::Expired)),
            None => {
                let c = Arc::new(self.signer.verify(token, service, now)?);
                let mut map = self.bearers.write().unwrap_or_else(|p| p.into_inner());
                if map.len() >= 10_000 {
                    map.retain(|_, c| now < c.exp);
                    if map.len() >= 10_000 {
                        map.clear();
                    }
                }
                map.insert(token.to_string(), c.clone());
                c
            }
        };
        let identity = self
            .identity(&claims.sub)
            .await?
            .ok_or_else(|| ControlError::Jwt(jwt::JwtError::TokenDeleted(claims.sub.clone())))?;
        if !identity.enabled {
            return Err(ControlError::Disabled(identity.name.clone()));
        }
        if claims.cv.as_ref().is_some_and(|cv| {
            *cv != identity.credential_version && !identity.password_versions.contains(cv)
        }) {
            return Err(ControlError::Jwt(jwt::JwtError::CredentialsChanged));
        }
        Ok(Principal::Bearer { identity, claims })
    }

    /// Issues an access token for `identity` covering the requested scopes
    /// (`repository:<name>:pull,push,delete`, `registry:catalog:*`), each reduced to what the
    /// token's scope map allows.
    /// It stops working when any of the token's passwords changes.
    pub fn issue(&self, identity: &Identity, scopes: &[String], service: &str) -> AccessToken {
        self.issue_token(identity, scopes, service, None)
    }

    /// [`Control::issue`] for a login [`Control::authenticate_until`] verified: the access
    /// token expires with the password at the latest (an expired password is not extended by
    /// the access token it bought), and stops working when that password is generated again
    /// or deleted, not when the other one is.
    pub fn issue_for(
        &self,
        identity: &Identity,
        login: &Login,
        scopes: &[String],
        service: &str,
    ) -> AccessToken {
        self.issue_token(identity, scopes, service, Some(login))
    }

    fn issue_token(
        &self,
        identity: &Identity,
        scopes: &[String],
        service: &str,
        login: Option<&Login>,
    ) -> AccessToken {
        let until = login.and_then(|l| l.until);
        let mut access = Vec::new();
        for scope in scopes.iter().flat_map(|s| s.split(' ')) {
            let Some((kind, rest)) = scope.split_once(':') else {
                continue;
            };
            let Some((name, actions)) = rest.rsplit_once(':') else {
                continue;
            };
            match kind {
                "repository" => {
                    let mut granted: BTreeSet<&str> = BTreeSet::new();
                    for a in actions.split(',') {
                        let wanted: &[RepoAction] = match a {
                            "pull" => &[RepoAction::ContentRead, RepoAction::MetadataRead],
                            "push" => &[RepoAction::ContentWrite, RepoAction::MetadataWrite],
                            "delete" => &[RepoAction::ContentDelete],
                            "*" => &RepoAction::ALL,
                            _ => &[],
                        };
                        for w in wanted {
                            if identity.perms.allows(name, *w) {
                                granted.insert(w.as_str());
                            }
                        }
                    }
                    let mut actions: Vec<String> = Vec::new();
                    for (std_name, a) in [
                        ("pull", RepoAction::ContentRead),
                        ("push", RepoAction::ContentWrite),
                        ("delete", RepoAction::ContentDelete),
                    ] {
                        if granted.contains(a.as_str()) {
                            actions.push(std_name.into());
                        }
                    }
                    actions.extend(granted.iter().map(|s| s.to_string()));
                    access.push(jwt::Access {
                        kind: "repository".into(),
                        name: name.into(),
                        actions,
                    });
                }
                "registry" if name == "catalog" => {
                    access.push(jwt::Access {
                        kind: "registry".into(),
                        name: "catalog".into(),
                        actions: vec!["*".into()],
                    });
                }
                _ => {}
            }
        }
        let now = now_ms() / 1000;
        // The password's expiry is the root's time: what is left of it is counted by the
        // root's time too (this node's clock may be off), then the token runs on this clock.
        let left = |u: i64| ((u - clock::now_ms()) / 1000).max(1);
        let ttl = (self.config.access_token_ttl.as_secs() as i64).min(until.map_or(i64::MAX, left));
        let claims = jwt::Claims {
            iss: service.into(),
            sub: identity.name.clone(),
            aud: service.into(),
            exp: now + ttl,
            nbf: now,
            iat: now,
            jti: hex_id(),
            access,
            cv: Some(match login {
                Some(l) => identity.password_versions[l.slot].clone(),
                None => identity.credential_version.clone(),
            }),
        };
        let token = self.signer.sign(&claims);
        AccessToken {
            token: token.clone(),
            access_token: token,
            expires_in: ttl as u64,
            issued_at: rfc3339(now * 1000),
        }
    }

    // ---- scope maps ---------------------------------------------------------------------

    fn parse_rules(&self, name: &str, actions: &[String]) -> Result<Vec<String>> {
        let rules: BTreeSet<Rule> = actions
            .iter()
            .map(|a| Rule::parse(a))
            .collect::<Result<_, _>>()?;
        let repos: BTreeSet<&RepoPattern> = rules
            .iter()
            .filter_map(|r| match r {
                Rule::Repository(p, _) => Some(p),
                Rule::Gateway(..) => None,
            })
            .collect();
        let limit = self.config.limits.max_repository_rules;
        if repos.len() as u64 > limit {
            return Err(ControlError::Limit {
                what: format!("scope map {name:?} would name {} repositories", repos.len()),
                limit,
            });
        }
        Ok(rules.iter().map(Rule::to_string).collect())
    }

    fn scope_map_view(row: ScopeMapRow) -> ScopeMapView {
        ScopeMapView {
            name: row.name,
            description: row.description,
            actions: row.actions,
            creation_date: rfc3339(row.created_ms),
        }
    }

    /// On a connected registry, refuses changes to the scope maps its parent installed
    /// (`synced-<token>`, see [`Control::apply_synced_tokens`]) and the use of such a name.
    fn check_local_scope_map(&self, name: &str) -> Result<()> {
        if self.config.managed_at_root.is_some() && name.starts_with("synced-") {
            return Err(ControlError::FromParent {
                kind: "scope-map",
                name: name.into(),
            });
        }
        Ok(())
    }

    /// Token `name`, for a change: on a connected registry, not one its parent installed.
    async fn local_token_row(&self, name: &str) -> Result<TokenRow> {
        let t = self.token_row(name).await?;
        if self.config.managed_at_root.is_some()
            && t.scope_map.as_deref() == Some(format!("synced-{name}").as_str())
        {
            return Err(ControlError::FromParent {
                kind: "token",
                name: name.into(),
            });
        }
        Ok(t)
    }

    pub async fn create_scope_map(
        &self,
        name: &str,
        description: &str,
        actions: &[String],
    ) -> Result<ScopeMapView> {
        validate_name("scope map", name)?;
        self.check_local_scope_map(name)?;
        if description.len() > 256 {
            return Err(ControlError::Invalid(
                "a scope map description is at most 256 characters".into(),
            ));
        }
        if actions.is_empty() {
            return Err(ControlError::Invalid(
                "a scope map needs at least one rule: --repository REPO ACTION... or --gateway NAME ACTION...".into(),
            ));
        }
        let rules = self.parse_rules(name, actions)?;
        let limit = self.config.limits.max_scope_maps;
        let _w = self.write_lock().await?; // count and insert together
        if self.meta.count_scope_maps().await? >= limit {
            return Err(ControlError::Limit {
                what: "the registry has the maximum number of scope maps".into(),
                limit,
            });
        }
        if !self
            .meta
            .insert_scope_map(name, description, &rules)
            .await?
        {
            return Err(ControlError::AlreadyExists {
                kind: "scope map",
                name: name.into(),
            });
        }
        self.changed();
        self.show_scope_map(name).await
    }

    pub async fn show_scope_map(&self, name: &str) -> Result<ScopeMapView> {
        self.meta
            .scope_map(name)
            .await?
            .map(Self::scope_map_view)
            .ok_or_else(|| ControlError::NotFound {
                kind: "scope map",
                name: name.into(),
            })
    }

    pub async fn list_scope_maps(&self) -> Result<Vec<ScopeMapView>> {
        Ok(self
            .meta
            .scope_maps()
            .await?
            .into_iter()
            .map(Self::scope_map_view)
            .collect())
    }

    /// Adds and removes rules (and optionally replaces the description).
    pub async fn update_scope_map(
        &self,
        name: &str,
        add: &[String],
        remove: &[String],
        description: Option<&str>,
    ) -> Result<ScopeMapView> {
        self.check_local_scope_map(name)?;
        let _w = self.write_lock().await?;
        let row = self
            .meta
            .scope_map(name)
            .await?
            .ok_or_else(|| ControlError::NotFound {
                kind: "scope map",
                name: name.into(),
            })?;
        let add: BTreeSet<String> = add
            .iter()
            .map(|a| Rule::parse(a).map(|r| r.to_string()))
            .collect::<Result<_, _>>()?;
        let remove: BTreeSet<String> = remove
            .iter()
            .map(|a| Rule::parse(a).map(|r| r.to_string()))
            .collect::<Result<_, _>>()?;
        if add.is_empty() && remove.is_empty() && description.is_none() {
            return Err(ControlError::Invalid(
                "No scope map properties to update.".into(),
            ));
        }
        if add.intersection(&remove).next().is_some() {
            return Err(ControlError::Invalid(
                "Update ambiguity. Duplicate actions were provided with --add and --remove arguments.".into(),
            ));
        }
        let mut actions: BTreeSet<String> = row.actions.iter().cloned().collect();
        actions.extend(add);
        actions.retain(|a| !remove.contains(a));
        let actions: Vec<String> = actions.into_iter().collect();
        let rules = self.parse_rules(name, &actions)?;
        if rules != row.actions {
            self.check_scope_map_use(name, &row.actions, Some(&rules))
                .await?;
        }
        let description = description.unwrap_or(&row.description);
        if description.len() > 256 {
            return Err(ControlError::Invalid(
                "a scope map description is at most 256 characters".into(),
            ));
        }
        self.meta
            .update_scope_map(name, description, &rules)
            .await?;
        self.changed();
        self.show_scope_map(name).await
    }

    pub async fn delete_scope_map(&self, name: &str) -> Result<()> {
        self.check_local_scope_map(name)?;
        let _w = self.write_lock().await?;
        self.check_scope_map_use(name, &[], None).await?;
        let users = self.meta.tokens_using(name).await?;
        if !users.is_empty() {
            return Err(ControlError::Invalid(format!(
                "scope map {name:?} is used by {}; delete them or point them at another scope map first",
                name_some("token", &users)
            )));
        }
        if !self.meta.delete_scope_map(name).await? {
            return Err(ControlError::NotFound {
                kind: "scope map",
                name: name.into(),
            });
        }
        self.changed();
        Ok(())
    }

    // ---- tokens -------------------------------------------------------------------------

    fn token_view(t: &TokenRow, fresh: &[(usize, String)]) -> TokenView {
        TokenView {
            name: t.name.clone(),
            scope_map: if t.is_admin {
                Some("(administrator)".into())
            } else {
                t.scope_map.clone()
            },
            status: t.status.clone(),
            creation_date: rfc3339(t.created_ms),
            passwords: t
                .passwords
                .iter()
                .enumerate()
                .filter(|(_, p)| p.hash.is_some())
                .map(|(i, p)| PasswordView {
                    name: format!("password{}", i + 1),
                    creation_time: p.created_ms.map(rfc3339),
                    expiry: p.expiry_ms.map(rfc3339),
                    value: fresh.iter().find(|(s, _)| *s == i).map(|(_, v)| v.clone()),
                })
                .collect(),
        }
    }

    async fn token_row(&self, name: &str) -> Result<TokenRow> {
        self.meta
            .token(name)
            .await?
            .ok_or_else(|| ControlError::NotFound {
                kind: "token",
                name: name.into(),
            })
    }

    /// Creates a token. Unless `no_passwords`, password1 and password2 are generated and
    /// returned (once) in the view.
    pub async fn create_token(
        &self,
        name: &str,
        scope_map: &str,
        enabled: bool,
        no_passwords: bool,
        expiry_ms: Option<i64>,
    ) -> Result<TokenView> {
        validate_name("token", name)?;
        check_future_expiry(expiry_ms)?;
        if no_passwords && expiry_ms.is_some() {
            return Err(ControlError::Invalid(
                "--no-passwords cannot be combined with an expiration".into(),
            ));
        }
        self.check_local_scope_map(scope_map)?;
        self.show_scope_map(scope_map).await?;
        if self.meta.token(name).await?.is_some() {
            return Err(ControlError::AlreadyExists {
                kind: "token",
                name: name.into(),
            });
        }
        // Hashing is slow: done before taking the write lock, checked again under it.
        let mut fresh = Vec::new();
        let mut passwords = [PasswordRow::default(), PasswordRow::default()];
        if !no_passwords {
            for (i, slot) in passwords.iter_mut().enumerate() {
                let pw = password::generate();
                *slot = new_password_row(&pw, expiry_ms).await?;
                fresh.push((i, pw));
            }
        }
        // Two creates of one name must not both succeed (the second would silently replace
        // the first, whose passwords the caller was just given), nor pass the limit together.
        let _w = self.write_lock().await?;
        if self.meta.token(name).await?.is_some() {
            return Err(ControlError::AlreadyExists {
                kind: "token",
                name: name.into(),
            });
        }
        let limit = self.config.limits.max_tokens;
        if self.meta.count_tokens().await? >= limit {
            return Err(ControlError::Limit {
                what: "the registry has the maximum number of tokens".into(),
                limit,
            });
        }
        let row = TokenRow {
            name: name.into(),
            scope_map: Some(scope_map.into()),
            status: if enabled { "enabled" } else { "disabled" }.into(),
            is_admin: false,
            created_ms: now_ms(),
            updated_ms: now_ms(),
            passwords,
        };
        self.meta.put_token(&row).await?;
        self.changed();
        Ok(Self::token_view(&row, &fresh))
    }

    pub async fn show_token(&self, name: &str) -> Result<TokenView> {
        Ok(Self::token_view(&self.token_row(name).await?, &[]))
    }

    pub async fn list_tokens(&self) -> Result<Vec<TokenView>> {
        Ok(self
            .meta
            .tokens()
            .await?
            .iter()
            .map(|t| Self::token_view(t, &[]))
            .collect())
    }

    /// Changes a token's scope map and/or status.
    pub async fn update_token(
        &self,
        name: &str,
        scope_map: Option<&str>,
        enabled: Option<bool>,
    ) -> Result<TokenView> {
        let _w = self.write_lock().await?;
        let mut t = self.local_token_row(name).await?;
        if t.is_admin {
            return Err(ControlError::Invalid(
                "the administrator token's scope and status cannot be changed; rotate its password instead".into(),
            ));
        }
        if let Some(sm) = scope_map
            && t.scope_map.as_deref() != Some(sm)
        {
            self.check_local_scope_map(sm)?;
            self.show_scope_map(sm).await?;
            self.check_token_scope_change(name, sm).await?;
            t.scope_map = Some(sm.into());
        }
        if let Some(e) = enabled {
            t.status = if e { "enabled" } else { "disabled" }.into();
        }
        self.meta.put_token(&t).await?;
        self.changed();
        Ok(Self::token_view(&t, &[]))
    }

    /// Generates new values for the chosen password slots (0 = password1, 1 = password2).
    pub async fn generate_credentials(
        &self,
        name: &str,
        slots: &[usize],
        expiry_ms: Option<i64>,
    ) -> Result<TokenView> {
        check_future_expiry(expiry_ms)?;
        self.local_token_row(name).await?;
        // Each slot once: `password1 password1` would hash twice, show the first value and
        // store the second.
        let mut slots = slots.to_vec();
        slots.sort_unstable();
        slots.dedup();
        let mut fresh = Vec::new();
        let mut rows = Vec::new();
        for &s in &slots {
            let pw = password::generate();
            rows.push((s, new_password_row(&pw, expiry_ms).await?));
            fresh.push((s, pw));
        }
        // Read, change and write under the lock, so concurrent changes to the other slot or
        // the token's status are not overwritten with the state read before hashing.
        let _w = self.write_lock().await?;
        let mut t = self.local_token_row(name).await?;
        for (s, row) in rows {
            t.passwords[s] = row;
        }
        self.meta.put_token(&t).await?;
        self.changed();
        Ok(Self::token_view(&t, &fresh))
    }

    pub async fn delete_credentials(&self, name: &str, slots: &[usize]) -> Result<TokenView> {
        let _w = self.write_lock().await?;
        let mut t = self.local_token_row(name).await?;
        if t.is_admin && slots.contains(&0) {
            return Err(ControlError::Invalid(
                "password1 of the administrator token cannot be deleted; generate a new one instead".into(),
            ));
        }
        for &s in slots {
            t.passwords[s] = PasswordRow::default();
        }
        self.meta.put_token(&t).await?;
        self.changed();
        Ok(Self::token_view(&t, &[]))
    }

    pub async fn delete_token(&self, name: &str) -> Result<()> {
        let _w = self.write_lock().await?;
        let t = self.local_token_row(name).await?;
        if t.is_admin {
            return Err(ControlError::Invalid(
                "the administrator token cannot be deleted".into(),
            ));
        }
        if let Some(cr) = self.registry_of_sync_token(name).await? {
            return Err(ControlError::Invalid(format!(
                "token {name:?} is the sync token of connected registry {cr:?} and cannot be deleted while it exists; delete the connected registry first (with --cleanup to remove this token too)"
            )));
        }
        let users = self.registries_with_client_token(name).await?;
        if let Some(r) = users.first() {
            return Err(ControlError::Invalid(format!(
                "token {name:?} is a client token of connected registry {:?}; remove it first with `outpost connected-registry update -n {} --remove-client-tokens {name}`",
                r.name, r.name
            )));
        }
        self.meta.delete_token(name).await?;
        self.changed();
        Ok(())
    }
}

async fn verify_blocking(password: String, hash: String) -> bool {
    checks::run(move |memory| password::verify(&password, &hash, memory))
        .await
        .unwrap_or(false)
}

/// A hash to verify against in place of a password a token does not have, so that a wrong
/// login costs the same whether the name exists and however many passwords it has, and does
/// not tell which names exist.
static DECOY_HASH: std::sync::LazyLock<Option<String>> = std::sync::LazyLock::new(|| {
    password::hash(
        "decoy password for unknown token names",
        &mut password::Memory::new(),
    )
    .ok()
});

/// Checks `pass` against each of a token's two password slots in turn (`hashes`: `None` for an
/// unknown name or an empty slot), stopping at the first match. A miss always costs two
/// Argon2 checks: empty slots are checked against [`DECOY_HASH`] instead. `counter` counts
/// the checks run.
async fn check_slots(
    pass: &str,
    hashes: [Option<&String>; 2],
    counter: &AtomicU64,
) -> Option<usize> {
    for (i, hash) in hashes.into_iter().enumerate() {
        counter.fetch_add(1, Ordering::Relaxed);
        let (hash, real) = match hash {
            Some(h) => (h.clone(), true),
            None => match checks::run(|_| DECOY_HASH.clone()).await.flatten() {
                Some(h) => (h, false),
                None => continue,
            },
        };
        if verify_blocking(pass.to_string(), hash).await && real {
            return Some(i);
        }
    }
    None
}

/// Refuses an expiration that has already passed: the new password would never work, and
/// the one it replaces would be gone.
fn check_future_expiry(expiry_ms: Option<i64>) -> Result<()> {
    match expiry_ms {
        Some(e) if e <= clock::now_ms() => Err(ControlError::Invalid(format!(
            "the expiration {} is in the past; give a later date or time (YYYY-MM-DDTHH:MM:SSZ)",
            rfc3339(e)
        ))),
        _ => Ok(()),
    }
}

async fn new_password_row(pw: &str, expiry_ms: Option<i64>) -> Result<PasswordRow> {
    let pw = pw.to_string();
    let hash = checks::run(move |memory| password::hash(&pw, memory))
        .await
        .ok_or_else(|| ControlError::Internal("hashing a password: the task failed".into()))?
        .map_err(|e| ControlError::Internal(format!("hashing a password: {e}")))?;
    Ok(PasswordRow {
        hash: Some(hash),
        created_ms: Some(now_ms()),
        expiry_ms,
    })
}

fn hex_id() -> String {
    password::random_key()[..16]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

async fn write_private(path: &Path, data: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    let path = path.to_path_buf();
    let data = data.to_vec();
    tokio::task::spawn_blocking(move || {
        // Written aside and renamed into place: a full disk or a crash half-way leaves no short
        // key behind to refuse every later start.
        let tmp = path.with_extension("tmp");
        let _ = std::fs::remove_file(&tmp);
        let mut o = std::fs::OpenOptions::new();
        o.write(true).create_new(true);
        #[cfg(unix)]
        std::os::unix::fs::OpenOptionsExt::mode(&mut o, 0o600);
        let written = o.open(&tmp).and_then(|mut f| {
            f.write_all(&data)?;
            f.sync_all()
        });
        if let Err(e) = written {
            let _ = std::fs::remove_file(&tmp);
            return Err(e);
        }
        std::fs::rename(&tmp, &path)?;
        if let Some(dir) = path.parent() {
            std::fs::File::open(dir)?.sync_all()?;
        }
        Ok(())
    })
    .await
    .map_err(std::io::Error::other)?
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_long_list_of_names_is_counted_not_spelled_out() {
        let names = |n: usize| (0..n).map(|i| format!("t{i}")).collect::<Vec<_>>();
        assert_eq!(name_some("token", &names(1)), "token t0");
        assert_eq!(name_some("token", &names(3)), "tokens t0, t1, t2");
        assert_eq!(
            name_some("token", &names(20000)),
            "20000 tokens (t0, t1, t2, t3, t4, …)"
        );
    }

    #[test]
    fn dates_round_trip() {
        for s in [
            "1970-01-01T00:00:00Z",
            "2026-11-28T02:00:21Z",
            "9999-12-31T23:59:59Z",
            "2024-02-29T12:00:00Z",
        ] {
            assert_eq!(rfc3339(parse_rfc3339(s).unwrap()), s);
        }
        for bad in [
            "2026-13-01T00:00:00Z",
            "yesterday",
            "2026-+1-+1T00:00:00Z",
            "2026-02-30T00:00:00Z",
            "2025-02-29T00:00:00Z",
            "2026-04-31T00:00:00Z",
            "9999-12-31T23:59:60Z",
            "2026-1a-01T00:00:00Z",
        ] {
            let e = parse_rfc3339(bad).unwrap_err().to_string();
            assert!(e.contains("YYYY-MM-DDTHH:MM:SSZ"), "{bad}: {e}");
        }
    }

    #[test]
    fn names() {
        assert!(validate_name("token", "admin").is_ok());
        assert!(validate_name("token", "ci-reader_01").is_ok());
        assert!(validate_name("token", "abcd").is_err());
        assert!(validate_name("token", &"a".repeat(51)).is_err());
        assert!(validate_name("token", "-abcde").is_err());
        assert!(validate_name("token", "abc de").is_err());
    }
}
