//! The connected-registry control plane held by the root: resources, the rules ACR enforces
//! on them (names, modes, hierarchy, client tokens, schedule, window, TTL), the sync token and
//! scope map created for each registry and propagated to its ancestors, activation, status,
//! derived connection state, and `get-settings`.
//!
//! Every mutation runs under `Control::writes`, so two administrators creating children under
//! the same parent at once are serialized and cannot break a rule between check and write.

use crate::connstr::ConnectionString;
use crate::{
    Control, ControlError, GatewayAction, RepoAction, RepoPattern, Result, Rule, now_ms, rfc3339,
};
use outpost_meta::{AccessWrite, ConnectedRegistryRow, PasswordRow, TokenRow};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeSet, HashMap};
use std::time::Duration;

/// How long a status report relayed upward may take before it is given up (it goes up whole
/// with the next one).
const RELAY_WAIT: std::time::Duration = std::time::Duration::from_secs(10);

/// How long status reports are not relayed upward after a relay failed.
const RELAY_BACKOFF: std::time::Duration = std::time::Duration::from_secs(15);

/// The way up from an intermediate connected registry to its parent, for relaying its
/// descendants' activation and status (implemented by `outpost-sync`).
pub trait Upstream: Send + Sync {
    /// `Ok(true)`: the root granted the slot; `Ok(false)`: the parent is unreachable, decide
    /// locally.
    fn activate<'a>(&'a self, name: &'a str, instance_id: &'a str) -> BoxFuture<'a, Result<bool>>;
    fn report<'a>(&'a self, name: &'a str, report: &'a StatusReport) -> BoxFuture<'a, Result<()>>;
    /// Passes a descendant's notifications up; [`ControlError::Unavailable`] while the parent
    /// cannot be reached.
    fn notify<'a>(
        &'a self,
        name: &'a str,
        batch: &'a crate::notify::NotificationBatch,
    ) -> BoxFuture<'a, Result<()>>;
}

pub type BoxFuture<'a, T> = std::pin::Pin<Box<dyn std::future::Future<Output = T> + Send + 'a>>;

/// The default schedule: always connected, syncing continuously.
pub const CONTINUOUS: &str = "* * * * *";

/// Whether a schedule is the continuous one (however it is spaced).
pub fn is_continuous(schedule: &str) -> bool {
    schedule
        .split_whitespace()
        .eq(CONTINUOUS.split_whitespace())
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Mode {
    ReadOnly,
    ReadWrite,
}

impl Mode {
    pub fn parse(s: &str) -> Result<Mode> {
        match s.to_ascii_lowercase().as_str() {
            "readonly" => Ok(Mode::ReadOnly),
            "readwrite" => Ok(Mode::ReadWrite),
            _ => Err(ControlError::Invalid(
                "--mode supports only 'ReadWrite' and 'ReadOnly' values.".into(),
            )),
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Mode::ReadOnly => "ReadOnly",
            Mode::ReadWrite => "ReadWrite",
        }
    }

    /// The repository actions a sync token of this mode holds.
    pub fn repo_actions(self) -> &'static [RepoAction] {
        match self {
            Mode::ReadOnly => &[RepoAction::ContentRead, RepoAction::MetadataRead],
            Mode::ReadWrite => &RepoAction::ALL,
        }
    }
}

/// Limits of the control plane (ACR's by default; configurable so tests and small sites can
/// shorten windows and TTLs through the same configuration an operator uses).
#[derive(Debug, Clone)]
pub struct ConnectedLimits {
    /// Connected registries in the whole hierarchy under this root (ACR: 50).
    pub max_connected_registries: usize,
    pub max_client_tokens: usize,
    pub min_sync_window: Duration,
    pub max_sync_window: Duration,
    pub min_message_ttl: Duration,
    pub max_message_ttl: Duration,
    /// A continuously syncing registry silent for longer than this is `Offline`.
    pub offline_after: Duration,
}

impl Default for ConnectedLimits {
    fn default() -> Self {
        ConnectedLimits {
            max_connected_registries: 50,
            max_client_tokens: 20,
            min_sync_window: Duration::from_secs(3600),
            max_sync_window: Duration::from_secs(7 * 86_400),
            min_message_ttl: Duration::from_secs(86_400),
            max_message_ttl: Duration::from_secs(90 * 86_400),
            offline_after: Duration::from_secs(300),
        }
    }
}

/// `create` parameters (the `az acr connected-registry create` flags).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct CreateConnectedRegistry {
    pub name: String,
    pub mode: Option<String>,
    pub parent: Option<String>,
    #[serde(default)]
    pub repositories: Vec<String>,
    pub sync_token: Option<String>,
    #[serde(default)]
    pub client_tokens: Vec<String>,
    pub sync_schedule: Option<String>,
    pub sync_window: Option<String>,
    pub sync_message_ttl: Option<String>,
    pub log_level: Option<String>,
    #[serde(default)]
    pub notifications: Vec<String>,
    pub gc_enabled: Option<bool>,
    pub gc_schedule: Option<String>,
}

/// `update` parameters.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct UpdateConnectedRegistry {
    #[serde(default)]
    pub add_client_tokens: Vec<String>,
    #[serde(default)]
    pub remove_client_tokens: Vec<String>,
    pub sync_schedule: Option<String>,
    pub sync_window: Option<String>,
    pub sync_message_ttl: Option<String>,
    pub log_level: Option<String>,
    #[serde(default)]
    pub add_notifications: Vec<String>,
    #[serde(default)]
    pub remove_notifications: Vec<String>,
    pub gc_enabled: Option<bool>,
    pub gc_schedule: Option<String>,
}

/// What a running instance reports about itself.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct StatusReport {
    pub instance_id: String,
    /// `Online` or `Syncing`.
    pub state: Option<String>,
    pub last_sync_time: Option<String>,
    pub last_sync_result: Option<String>,
    /// Replaces the reported details when present; a report without them (a keep-alive)
    /// leaves the last ones in place.
    #[serde(default)]
    pub status_details: Option<Vec<StatusDetail>>,
    pub version: Option<String>,
    pub login_server: Option<String>,
    /// Messages of the parent's feed not yet applied.
    #[serde(default)]
    pub cursor_lag: Option<i64>,
    /// Local changes not yet sent up (ReadWrite).
    #[serde(default)]
    pub outbox_depth: Option<i64>,
}

/// The `type` of a status detail that reports something already handled (a tag written on
/// both sides, resolved by the conflict rule): shown, but not counted as the node being
/// unhealthy. Details that leave something for an operator to do (a local change the parent
/// refused, an image the parent cannot supply) and failures keep their own type and do.
pub const NOTICE: &str = "Notice";

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct StatusDetail {
    #[serde(rename = "type")]
    pub kind: String,
    pub code: String,
    pub description: String,
    pub timestamp: Option<String>,
    pub correlation_id: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct GarbageCollection {
    pub enabled: bool,
    pub schedule: String,
}

/// One connected registry's health, for the metrics ([`Control::fleet_health`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FleetHealth {
    pub name: String,
    /// Online or syncing.
    pub up: bool,
    /// Its last reported completed sync and its last status report, Unix seconds.
    pub last_sync_unix: Option<i64>,
    pub last_activity_unix: Option<i64>,
    pub cursor_lag: Option<i64>,
    pub outbox_depth: Option<i64>,
}

/// A connected registry as the API and CLI show it.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct ConnectedRegistryView {
    pub name: String,
    pub mode: String,
    pub parent: Option<String>,
    pub repositories: Vec<String>,
    pub sync_token: String,
    pub client_tokens: Vec<String>,
    pub sync_schedule: String,
    pub sync_window: Option<String>,
    pub sync_message_ttl: String,
    pub log_level: String,
    pub notifications: Vec<String>,
    pub garbage_collection: GarbageCollection,
    pub activation_status: String,
    pub connection_state: String,
    pub status_details: Vec<StatusDetail>,
    pub last_activity_time: Option<String>,
    pub last_sync_time: Option<String>,
    pub last_sync_result: Option<String>,
    pub sync_state: String,
    pub version: Option<String>,
    pub login_server: Option<String>,
    pub cursor_lag: Option<i64>,
    pub outbox_depth: Option<i64>,
    pub creation_date: String,
}

/// What `get-settings` returns.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Settings {
    #[serde(rename = "SYNC_TOKEN_USER")]
    pub sync_token_user: String,
    #[serde(rename = "SYNC_TOKEN_PASSWORD")]
    pub sync_token_password: String,
    #[serde(rename = "ACR_REGISTRY_CONNECTION_STRING")]
    pub connection_string: String,
    #[serde(rename = "OUTPOST_CONNECTION_STRING")]
    pub outpost_connection_string: String,
    #[serde(rename = "ACR_REGISTRY_LOGIN_SERVER")]
    pub login_server: String,
}

/// What `delete` did, and what is left for the operator without `--cleanup`.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct DeleteOutcome {
    pub deleted: String,
    pub cleaned_up: bool,
    /// Commands that remove what was left behind (empty with cleanup).
    pub remaining_steps: Vec<String>,
}

/// What a connected registry needs to run: its settings, its client tokens (with password
/// hashes, so it authenticates clients while offline) and the same for its descendants, so it
/// can serve them in turn.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct SyncConfig {
    pub name: String,
    pub mode: String,
    pub repositories: Vec<String>,
    pub sync_schedule: String,
    pub sync_window: Option<String>,
    pub sync_message_ttl: String,
    pub log_level: String,
    pub notifications: Vec<String>,
    pub garbage_collection: GarbageCollection,
    pub resync_requested: bool,
    pub client_tokens: Vec<ClientTokenConfig>,
    /// This registry's sync token (hashes and rules), so that its parent — when the parent
    /// is itself a connected registry — can authenticate it while offline.
    #[serde(default)]
    pub sync_token: Option<ClientTokenConfig>,
    pub children: Vec<SyncConfig>,
    /// When the resource was created at the root (Unix milliseconds): a registry deleted and
    /// created again under the same name is another resource, whose status an intermediate
    /// node must not carry over. Absent from a parent of an earlier version.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub created_ms: Option<i64>,
    /// The resource's activation status as the sender knows it (`Active`, `Inactive`): an
    /// intermediate node learns this way that the root deactivated a descendant below it,
    /// and ends that descendant's long-poll, instead of waiting for its next report.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub activation_status: Option<String>,
}

/// `report` completed with what `row` (this node's record of the descendant) already holds.
fn with_known_state(report: &StatusReport, row: &ConnectedRegistryRow) -> StatusReport {
    let mut full = report.clone();
    full.state = full.state.or_else(|| row.reported_state.clone());
    full.last_sync_time = full
        .last_sync_time
        .or_else(|| row.last_sync_ms.map(rfc3339));
    full.last_sync_result = full.last_sync_result.or_else(|| row.sync_result.clone());
    full.status_details = full
        .status_details
        .or_else(|| serde_json::from_str(&row.status_details).ok());
    full.version = full.version.or_else(|| row.version.clone());
    // A stored address an older version accepted, no longer valid, is not passed on: the
    // parent would refuse the whole report.
    full.login_server = full.login_server.or_else(|| {
        row.login_server
            .clone()
            .filter(|l| crate::connstr::check_endpoint(l).is_ok())
    });
    full.cursor_lag = full.cursor_lag.or(row.cursor_lag);
    full.outbox_depth = full.outbox_depth.or(row.outbox_depth);
    full
}

/// Status details kept from one report, and the longest text kept of each field (longer
/// ones are cut): what `show` and the status page print stays readable whatever an instance
/// sends.
const MAX_STATUS_DETAILS: usize = 100;
const MAX_DETAIL_TEXT: usize = 2048;
/// The longest version label a status report may carry.
const MAX_VERSION_TEXT: usize = 128;

/// An instance id as activation and status reports carry it: 1 to 128 printable characters.
fn check_instance_id(id: &str) -> Result<()> {
    if id.is_empty() || id.len() > 128 || id.chars().any(|c| c.is_control() || c.is_whitespace()) {
        return Err(ControlError::Invalid(format!(
            "instanceId must be 1 to 128 printable characters without spaces, not {:?}",
            id.chars().take(40).collect::<String>()
        )));
    }
    Ok(())
}

/// The repositories a connected registry syncs, as its clients' writes are checked against:
/// a change outside them would never reach the parent.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SyncScope {
    /// The connected registry's name.
    pub name: String,
    pub patterns: Vec<RepoPattern>,
    /// What the registry's sync token may do at the parent (`None`: not known, from a parent
    /// that does not say). A repository added to a ReadOnly child is synced to its ReadWrite
    /// ancestors with read actions only: a change made there would be refused going up.
    pub sync_token: Option<crate::scope::Permissions>,
}

impl SyncScope {
    pub fn of(cfg: &SyncConfig) -> SyncScope {
        SyncScope {
            name: cfg.name.clone(),
            patterns: cfg
                .repositories
                .iter()
                .filter_map(|r| RepoPattern::parse(r).ok())
                .collect(),
            sync_token: cfg.sync_token.as_ref().map(|t| {
                crate::scope::Permissions::new(
                    t.actions
                        .iter()
                        .filter_map(|a| crate::scope::Rule::parse(a).ok()),
                )
            }),
        }
    }

    pub fn covers(&self, repo: &str) -> bool {
        self.patterns.iter().any(|p| p.matches(repo))
    }

    /// Whether a change of kind `action` to `repo` made here can go up: the sync token may
    /// make it at the parent.
    pub fn sends(&self, repo: &str, action: RepoAction) -> bool {
        self.sync_token
            .as_ref()
            .is_none_or(|p| p.allows(repo, action))
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct ClientTokenConfig {
    pub name: String,
    pub status: String,
    /// Scope-map rules of the token.
    pub actions: Vec<String>,
    pub passwords: Vec<PasswordHash>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct PasswordHash {
    pub name: String,
    /// Argon2id PHC string.
    pub hash: String,
    pub expiry: Option<String>,
}

/// One sync message: a change to a repository in the child's scope, from the event log.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct Message {
    pub seq: i64,
    pub at: String,
    pub repository: String,
    /// `manifest_put`, `manifest_deleted`, `tag_set` or `tag_removed`.
    pub kind: String,
    pub tag: Option<String>,
    pub digest: Option<String>,
    pub media_type: Option<String>,
    /// When the event was written (ms since the epoch): the cursor's mark once this message
    /// is applied (see [`MessagePage::next_mark`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mark: Option<i64>,
}

/// A page of a child's message feed.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct MessagePage {
    pub messages: Vec<Message>,
    /// The cursor to ask from next (past out-of-scope events too).
    pub next: i64,
    /// The newest event in the parent's log.
    pub latest: i64,
    /// An operator asked for a full reconciliation (`resync`).
    pub resync: bool,
    /// When event `next` was written (ms since the epoch). The child sends it back with its
    /// cursor (`mark`), which tells a cursor from this log apart from the same number in
    /// another history: a parent restored from a backup reuses the numbers after its restore
    /// point for other events. `None` from a parent of an earlier version, and when `next` is
    /// 0.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_mark: Option<i64>,
}

const NO_PASSWORD: &str = "<use --generate-password to generate a new password>";
const NO_ENDPOINT: &str = "<parent gateway endpoint>";

pub fn validate_name(name: &str) -> Result<()> {
    let b = name.as_bytes();
    let ok = (5..=50).contains(&b.len())
        && b[0].is_ascii_lowercase()
        && b.iter()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-' || *c == b'_');
    if ok {
        Ok(())
    } else {
        Err(ControlError::Invalid(format!(
            "connected registry name {name:?} is invalid: use 5 to 50 lowercase letters, digits, '-' or '_', starting with a letter"
        )))
    }
}

/// An ISO 8601 duration in seconds (days count as 24 hours; years and months are refused).
pub fn parse_duration(what: &str, s: &str) -> Result<Duration> {
    let bad = |why: &str| {
        ControlError::Invalid(format!(
            "{what} {s:?} is not an ISO 8601 duration such as PT4H or P2D{why}"
        ))
    };
    // jiff also reads its "friendly" format ("4 hours"); the ACR flags are ISO 8601 only.
    if !s.trim_start_matches(['+', '-']).starts_with(['P', 'p']) {
        return Err(bad(""));
    }
    let span: jiff::Span = s.parse().map_err(|_| bad(""))?;
    if span.get_years() != 0 || span.get_months() != 0 {
        return Err(bad(" (years and months have no fixed length; use days)"));
    }
    if span.is_negative() {
        return Err(bad(" (it must be positive)"));
    }
    let secs = span
        .total((
            jiff::Unit::Second,
            jiff::SpanRelativeTo::days_are_24_hours(),
        ))
        .map_err(|_| bad(""))?;
    Ok(Duration::from_secs_f64(secs))
}

fn human(d: Duration) -> String {
    let s = d.as_secs();
    if s.is_multiple_of(86_400) {
        format!(
            "{} day{} (P{}D)",
            s / 86_400,
            if s / 86_400 == 1 { "" } else { "s" },
            s / 86_400
        )
    } else if s.is_multiple_of(3600) {
        format!(
            "{} hour{} (PT{}H)",
            s / 3600,
            if s / 3600 == 1 { "" } else { "s" },
            s / 3600
        )
    } else {
        format!("{s} seconds (PT{s}S)")
    }
}

/// A five-field cron expression (minute hour day-of-month month day-of-week, UTC).
pub fn parse_schedule(what: &str, s: &str) -> Result<croner::Cron> {
    let bad = |why: String| {
        ControlError::Invalid(format!(
            "{what} {s:?} is not a valid five-field cron expression (minute hour day-of-month month day-of-week, UTC){why}"
        ))
    };
    if s.split_whitespace().count() != 5 {
        return Err(bad(String::new()));
    }
    // Numbers out of a field's range named here (the parser's own words are "Number out of
    // bounds", without saying which).
    const FIELDS: [(&str, u32, u32); 5] = [
        ("minute", 0, 59),
        ("hour", 0, 23),
        ("day of month", 1, 31),
        ("month", 1, 12),
        ("day of week", 0, 7),
    ];
    for (field, (name, lo, hi)) in s.split_whitespace().zip(FIELDS) {
        let (values, step) = match field.split_once('/') {
            Some((v, step)) => (v, Some(step)),
            None => (field, None),
        };
        for n in values
            .split([',', '-'])
            .filter_map(|p| p.parse::<u32>().ok())
        {
            if n < lo || n > hi {
                return Err(bad(format!(": the {name} {n} is out of range ({lo}-{hi})")));
            }
        }
        if let Some(n) = step.and_then(|p| p.parse::<u32>().ok())
            && (n == 0 || n > hi)
        {
            return Err(bad(format!(
                ": the {name} step /{n} is out of range (1-{hi})"
            )));
        }
    }
    let cron = s
        .parse::<croner::Cron>()
        .map_err(|e| bad(format!(": {e}")))?;
    // "0 0 31 2 *" parses, and never comes: a schedule that would silently never sync.
    let now = jiff::Timestamp::now().to_zoned(jiff::tz::TimeZone::UTC);
    if cron.find_next_occurrence(&now, false).is_err() {
        return Err(bad(": it never occurs (no such date)".into()));
    }
    Ok(cron)
}

/// How long until the next occurrence of a five-field cron `schedule` (UTC), or `None` if it
/// is invalid or never occurs again.
pub fn time_until_next(schedule: &str) -> Option<Duration> {
    let cron = parse_schedule("schedule", schedule).ok()?;
    let now = jiff::Timestamp::now();
    let next = cron
        .find_next_occurrence(&now.to_zoned(jiff::tz::TimeZone::UTC), false)
        .ok()?;
    let secs = next.timestamp().as_millisecond() - now.as_millisecond();
    Some(Duration::from_millis(secs.max(0) as u64))
}

/// Where a moment stands in a sync schedule.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Window {
    /// The default schedule: sync all the time.
    Continuous,
    /// Inside a window that closes at this time.
    Open { until: jiff::Timestamp },
    /// Outside any window; the next one opens at this time.
    Closed { opens: jiff::Timestamp },
}

/// The sync window that `now` falls in, for a schedule and window length. Pure, so it is
/// tested with fixed clocks.
pub fn window_at(schedule: &str, window: Option<&str>, now: jiff::Timestamp) -> Result<Window> {
    if is_continuous(schedule) {
        return Ok(Window::Continuous);
    }
    let cron = parse_schedule("sync schedule", schedule)?;
    let len = match window {
        Some(w) => parse_duration("sync window", w)?,
        None => return Ok(Window::Continuous),
    };
    let zoned = now.to_zoned(jiff::tz::TimeZone::UTC);
    let err = |e: croner::errors::CronError| {
        ControlError::Invalid(format!("sync schedule {schedule:?}: {e}"))
    };
    let signed =
        jiff::SignedDuration::try_from(len).map_err(|e| ControlError::Invalid(e.to_string()))?;
    if let Ok(prev) = cron.find_previous_occurrence(&zoned, true) {
        let until = prev
            .timestamp()
            .checked_add(signed)
            .map_err(|e| ControlError::Invalid(e.to_string()))?;
        if now < until {
            return Ok(Window::Open { until });
        }
    }
    let next = cron.find_next_occurrence(&zoned, false).map_err(err)?;
    Ok(Window::Closed {
        opens: next.timestamp(),
    })
}

fn normalize_log_level(s: &str) -> Result<String> {
    for l in ["Debug", "Information", "Warning", "Error", "None"] {
        if l.eq_ignore_ascii_case(s) {
            return Ok(l.to_string());
        }
    }
    Err(ControlError::Invalid(format!(
        "log level {s:?} is not accepted; accepted log levels are Debug, Information, Warning, Error, and None"
    )))
}

fn check_notification(p: &str) -> Result<String> {
    crate::notify::NotificationPattern::parse(p)?;
    Ok(p.to_string())
}

/// Notification patterns one connected registry may have: each event is matched against all
/// of them at the site.
const MAX_NOTIFICATION_PATTERNS: usize = 100;

fn check_notification_count(n: usize) -> Result<()> {
    if n > MAX_NOTIFICATION_PATTERNS {
        return Err(ControlError::Invalid(format!(
            "{n} notification patterns; a connected registry takes at most {MAX_NOTIFICATION_PATTERNS} (use * wildcards to cover more with one)"
        )));
    }
    Ok(())
}

/// The rules of `rules` that grant more than reading a repository.
fn write_rules(rules: &[String]) -> Vec<&str> {
    rules
        .iter()
        .filter(|a| matches!(Rule::parse(a), Ok(Rule::Repository(_, act)) if !matches!(act, RepoAction::ContentRead | RepoAction::MetadataRead)))
        .map(|s| s.as_str())
        .collect()
}

/// A cleanup step of a connected-registry deletion, planned: `None` (logged) when it cannot be
/// planned and is left to the operator, an error when the database failed.
fn plannable<T>(name: &str, what: &str, r: Result<T>) -> Result<Option<T>> {
    match r {
        Ok(v) => Ok(Some(v)),
        Err(e @ ControlError::Meta(_)) => Err(e),
        Err(e) => {
            tracing::warn!(error = %e, step = what, connected_registry = name, "a cleanup step of a connected-registry deletion is left to do");
            Ok(None)
        }
    }
}

fn gateway_rules(name: &str) -> Vec<String> {
    GatewayAction::ALL
        .iter()
        .map(|a| Rule::Gateway(name.to_string(), *a).to_string())
        .collect()
}

/// Whether `rule`, a repository rule, is granted by `set` already: by the same rule, or by the
/// same action on a pattern that covers its repository (`fleet/*` covers `fleet/a/app`).
/// Gateway rules and rules that do not parse count as not covered.
fn rule_covered(set: &BTreeSet<String>, rule: &str) -> bool {
    let Ok(crate::scope::Rule::Repository(want, action)) = crate::scope::Rule::parse(rule) else {
        return false;
    };
    set.contains(rule)
        || set.iter().any(|have| {
            matches!(
                crate::scope::Rule::parse(have),
                Ok(crate::scope::Rule::Repository(p, a)) if a == action && p.covers(&want)
            )
        })
}

/// Adds `rules` to `set`, leaving out those it grants already: an ancestor that syncs
/// `fleet/*` does not gain a `fleet/a/app` of its own for each child (each would count
/// towards its repository limit, and outlive a removal of the wildcard).
fn extend_uncovered(set: &mut BTreeSet<String>, rules: impl IntoIterator<Item = String>) {
    for r in rules {
        if !rule_covered(set, &r) {
            set.insert(r);
        }
    }
}

fn repo_rules(repo: &RepoPattern, mode: Mode) -> Vec<String> {
    mode.repo_actions()
        .iter()
        .map(|a| Rule::Repository(repo.clone(), *a).to_string())
        .collect()
}

impl Control {
    /// Refuses a change of connected-registry resources on a connected registry.
    fn changed_at_root_only(&self) -> Result<()> {
        match &self.config.managed_at_root {
            Some(name) => Err(ControlError::ManagedAtRoot(name.clone())),
            None => Ok(()),
        }
    }

    fn limits_cr(&self) -> &ConnectedLimits {
        &self.config.connected
    }

    async fn all_registries(&self) -> Result<HashMap<String, ConnectedRegistryRow>> {
        Ok(self
            .meta
            .connected_registries()
            .await?
            .into_iter()
            .map(|r| (r.name.clone(), r))
            .collect())
    }

    pub(crate) async fn registry_row(&self, name: &str) -> Result<ConnectedRegistryRow> {
        self.meta
            .connected_registry(name)
            .await?
            .ok_or_else(|| ControlError::NotFound {
                kind: "connected registry",
                name: name.into(),
            })
    }

    /// Parent, grandparent, … of `name`.
    fn ancestors<'a>(
        all: &'a HashMap<String, ConnectedRegistryRow>,
        name: &str,
    ) -> Vec<&'a ConnectedRegistryRow> {
        let mut out = Vec::new();
        let mut cur = all.get(name).and_then(|r| r.parent.clone());
        while let Some(p) = cur {
            let Some(row) = all.get(&p) else { break };
            if out
                .iter()
                .any(|r: &&ConnectedRegistryRow| r.name == row.name)
            {
                break; // never loop, even on corrupt data
            }
            out.push(row);
            cur = row.parent.clone();
        }
        out
    }

    /// Children, grandchildren, … of `name`.
    fn descendants<'a>(
        all: &'a HashMap<String, ConnectedRegistryRow>,
        name: &str,
    ) -> Vec<&'a ConnectedRegistryRow> {
        let mut out: Vec<&ConnectedRegistryRow> = Vec::new();
        let mut frontier = vec![name.to_string()];
        while let Some(n) = frontier.pop() {
            let mut kids: Vec<&ConnectedRegistryRow> = all
                .values()
                .filter(|r| r.parent.as_deref() == Some(n.as_str()))
                .collect();
            kids.sort_by(|a, b| a.name.cmp(&b.name));
            for k in kids {
                if !out.iter().any(|o| o.name == k.name) {
                    frontier.push(k.name.clone());
                    out.push(k);
                }
            }
        }
        out
    }

    /// The scope map behind a registry's sync token.
    async fn sync_scope_map(&self, row: &ConnectedRegistryRow) -> Result<String> {
        let token =
            self.meta
                .token(&row.sync_token)
                .await?
                .ok_or_else(|| ControlError::NotFound {
                    kind: "token",
                    name: row.sync_token.clone(),
                })?;
        token.scope_map.ok_or_else(|| {
            ControlError::Invalid(format!(
                "sync token {:?} of connected registry {:?} has no scope map",
                row.sync_token, row.name
            ))
        })
    }

    /// Plans `edit` of a scope map's rule set (limits checked), under the caller's lock: the
    /// write that [`Meta::apply`](outpost_meta::Meta::apply) makes of it. An earlier write of
    /// the same scope map in `planned` is the starting point, so two edits of one scope map in
    /// one change compose.
    async fn planned_rules(
        &self,
        planned: &[AccessWrite],
        scope_map: &str,
        edit: impl FnOnce(&mut BTreeSet<String>),
    ) -> Result<AccessWrite> {
        let row = self
            .meta
            .scope_map(scope_map)
            .await?
            .ok_or_else(|| ControlError::NotFound {
                kind: "scope map",
                name: scope_map.into(),
            })?;
        let earlier = planned.iter().rev().find_map(|w| match w {
            AccessWrite::UpdateScopeMap { name, actions, .. } if name == scope_map => {
                Some(actions.clone())
            }
            _ => None,
        });
        let mut set: BTreeSet<String> = earlier.unwrap_or(row.actions).into_iter().collect();
        edit(&mut set);
        let actions: Vec<String> = set.into_iter().collect();
        let rules = self.parse_rules(scope_map, &actions)?;
        Ok(AccessWrite::UpdateScopeMap {
            name: scope_map.into(),
            description: row.description,
            actions: rules,
        })
    }

    /// Repositories a registry syncs: those its sync scope map can read.
    pub(crate) async fn repositories_of(&self, row: &ConnectedRegistryRow) -> Result<Vec<String>> {
        let Some(sm) = self
            .meta
            .token(&row.sync_token)
            .await?
            .and_then(|t| t.scope_map)
        else {
            return Ok(Vec::new());
        };
        let Some(map) = self.meta.scope_map(&sm).await? else {
            return Ok(Vec::new());
        };
        let mut repos: Vec<String> = map
            .actions
            .iter()
            .filter_map(|a| match Rule::parse(a) {
                Ok(Rule::Repository(p, RepoAction::ContentRead)) => Some(p.to_string()),
                _ => None,
            })
            .collect();
        repos.sort();
        repos.dedup();
        Ok(repos)
    }

    async fn check_client_tokens(&self, name: &str, mode: Mode, tokens: &[String]) -> Result<()> {
        let max = self.limits_cr().max_client_tokens;
        if tokens.len() > max {
            return Err(ControlError::Limit {
                what: format!(
                    "connected registry {name:?} would have {} client tokens",
                    tokens.len()
                ),
                limit: max as u64,
            });
        }
        for t in tokens {
            let row = self
                .meta
                .token(t)
                .await?
                .ok_or_else(|| ControlError::NotFound {
                    kind: "token",
                    name: t.clone(),
                })?;
            // A client token's password hash travels to the connected registry and to every
            // node above it: never an administrator's, never another registry's sync token.
            if row.is_admin {
                return Err(ControlError::Invalid(format!(
                    "token {t:?} is an administrator token and cannot be a client token of connected registry {name:?}: its password hash would be copied to the site; create a scoped token instead"
                )));
            }
            if let Some(cr) = self.registry_of_sync_token(t).await? {
                return Err(ControlError::Invalid(format!(
                    "token {t:?} is the sync token of connected registry {cr:?} and cannot be a client token of {name:?}"
                )));
            }
            if mode == Mode::ReadOnly {
                let rules = match &row.scope_map {
                    Some(sm) => self
                        .meta
                        .scope_map(sm)
                        .await?
                        .map(|m| m.actions)
                        .unwrap_or_default(),
                    None => Vec::new(),
                };
                let writes = write_rules(&rules);
                if row.is_admin || !writes.is_empty() {
                    return Err(ControlError::Invalid(format!(
                        "client token {t:?} can write ({}), but connected registry {name:?} is ReadOnly: its client tokens may only read (content/read, metadata/read)",
                        if row.is_admin {
                            "administrator".to_string()
                        } else {
                            writes.join(", ")
                        }
                    )));
                }
            }
        }
        Ok(())
    }

    fn check_schedule_and_window(&self, schedule: &str, window: Option<&str>) -> Result<()> {
        parse_schedule("sync schedule", schedule)?;
        let l = self.limits_cr();
        match window {
            None if !is_continuous(schedule) => Err(ControlError::Invalid(format!(
                "a sync window is required with the sync schedule {schedule:?}: pass --sync-window with an ISO 8601 duration such as PT4H (between {} and {})",
                human(l.min_sync_window),
                human(l.max_sync_window)
            ))),
            None => Ok(()),
            Some(w) => {
                let d = parse_duration("sync window", w)?;
                if d < l.min_sync_window || d > l.max_sync_window {
                    return Err(ControlError::Invalid(format!(
                        "sync window {w} must be between {} and {}",
                        human(l.min_sync_window),
                        human(l.max_sync_window)
                    )));
                }
                Ok(())
            }
        }
    }

    fn check_ttl(&self, ttl: &str) -> Result<()> {
        let d = parse_duration("message TTL", ttl)?;
        let l = self.limits_cr();
        if d < l.min_message_ttl || d > l.max_message_ttl {
            return Err(ControlError::Invalid(format!(
                "message TTL {ttl} must be between {} and {}",
                human(l.min_message_ttl),
                human(l.max_message_ttl)
            )));
        }
        Ok(())
    }

    /// Derives the connection state from activation, reported state and time since last
    /// contact: a registry silent past its schedule's expected contact is `Offline`.
    fn connection_state(&self, row: &ConnectedRegistryRow, now_ms: i64) -> String {
        if row.activation != "Active" {
            return "Offline".into();
        }
        let Some(last) = row.last_activity_ms else {
            return "Offline".into();
        };
        let grace = self.limits_cr().offline_after.as_millis() as i64;
        let expected = if is_continuous(&row.schedule) {
            now_ms - grace
        } else {
            // The latest occurrence that should have produced contact by now.
            let now = jiff::Timestamp::from_millisecond(now_ms - grace)
                .unwrap_or(jiff::Timestamp::UNIX_EPOCH)
                .to_zoned(jiff::tz::TimeZone::UTC);
            match parse_schedule("sync schedule", &row.schedule).and_then(|c| {
                c.find_previous_occurrence(&now, true)
                    .map_err(|e| ControlError::Invalid(e.to_string()))
            }) {
                Ok(prev) => prev.timestamp().as_millisecond(),
                Err(_) => now_ms - grace,
            }
        };
        if last < expected {
            return "Offline".into();
        }
        let details: Vec<StatusDetail> =
            serde_json::from_str(&row.status_details).unwrap_or_default();
        if details.iter().any(|d| d.kind != NOTICE) {
            return "Unhealthy".into();
        }
        let state = row
            .reported_state
            .clone()
            .unwrap_or_else(|| "Online".into());
        // A site stops syncing when its window closes, but the report that says so often
        // does not arrive: the link tends to close with the window.
        if state == "Syncing"
            && let Ok(now) = jiff::Timestamp::from_millisecond(now_ms)
            && matches!(
                window_at(&row.schedule, row.sync_window.as_deref(), now),
                Ok(Window::Closed { .. })
            )
        {
            return "Online".into();
        }
        state
    }

    async fn view(&self, row: &ConnectedRegistryRow) -> Result<ConnectedRegistryView> {
        let repositories = self.repositories_of(row).await?;
        let mut status_details: Vec<StatusDetail> =
            serde_json::from_str(&row.status_details).unwrap_or_default();
        // Problems the instance cannot report itself, because they stop it from talking to us.
        let token = self.meta.token(&row.sync_token).await?;
        let token_refused = token.as_ref().is_none_or(|t| t.status != "enabled");
        if token_refused {
            status_details.push(StatusDetail {
                kind: "SyncToken".into(),
                code: "SyncTokenDisabled".into(),
                description: format!(
                    "sync token {:?} is disabled or deleted; the instance cannot sync until it is enabled (outpost token update -n {} --status enabled)",
                    row.sync_token, row.sync_token
                ),
                timestamp: None,
                correlation_id: None,
            });
        }
        // An instance whose password was refused since its last contact (the password was
        // generated again, or the connection string mistyped) is not heard from at all.
        let password_refused = self
            .password_refused_at(&row.sync_token)
            .filter(|at| row.last_activity_ms.is_none_or(|last| *at > last));
        if let Some(at) = password_refused
            && !token_refused
        {
            status_details.push(StatusDetail {
                kind: "SyncToken".into(),
                code: "SyncTokenRejected".into(),
                description: format!(
                    "a request at {} came with a password of sync token {:?} that is not valid (generated again since, or mistyped): an instance started with it cannot sync; restart it with the connection string from `outpost connected-registry get-settings -n {} --parent-protocol <http|https> --generate-password 1`",
                    rfc3339(at),
                    row.sync_token,
                    row.name
                ),
                timestamp: Some(rfc3339(at)),
                correlation_id: None,
            });
        }
        let token_refused = token_refused || password_refused.is_some();
        if row.activation != "Active" && row.last_activity_ms.is_some() {
            status_details.push(StatusDetail {
                kind: "Activation".into(),
                code: "Deactivated".into(),
                description: "the resource was deactivated; a running instance stops syncing until it is restarted and activates again".into(),
                timestamp: None,
                correlation_id: None,
            });
        }
        let sync_state = if row.activation != "Active" {
            "NotActivated".to_string()
        } else if row.resync_requested {
            "Pending".to_string()
        } else {
            row.sync_result.clone().unwrap_or_else(|| "Pending".into())
        };
        Ok(ConnectedRegistryView {
            name: row.name.clone(),
            mode: row.mode.clone(),
            parent: row.parent.clone(),
            repositories,
            sync_token: row.sync_token.clone(),
            client_tokens: row.client_tokens.clone(),
            sync_schedule: row.schedule.clone(),
            sync_window: row.sync_window.clone(),
            sync_message_ttl: row.message_ttl.clone(),
            log_level: row.log_level.clone(),
            notifications: row.notifications.clone(),
            garbage_collection: GarbageCollection {
                enabled: row.gc_enabled,
                schedule: row.gc_schedule.clone(),
            },
            activation_status: row.activation.clone(),
            connection_state: match self.connection_state(row, now_ms()) {
                // What it last reported no longer holds: it is refused at its next contact.
                s if token_refused && (s == "Online" || s == "Syncing") => "Unhealthy".into(),
                s => s,
            },
            status_details,
            last_activity_time: row.last_activity_ms.map(rfc3339),
            // Reported by the instance, by its clock: never later than when it was last heard
            // from (a clock running ahead; an instance of a version that does not correct it).
            last_sync_time: row
                .last_sync_ms
                .map(|t| row.last_activity_ms.map_or(t, |heard| t.min(heard)))
                .map(rfc3339),
            last_sync_result: row.sync_result.clone(),
            sync_state,
            version: row.version.clone(),
            login_server: row.login_server.clone(),
            cursor_lag: row.cursor_lag,
            outbox_depth: row.outbox_depth,
            creation_date: rfc3339(row.created_ms),
        })
    }

    // ---- operations ---------------------------------------------------------------------

    pub async fn create_connected_registry(
        &self,
        req: CreateConnectedRegistry,
    ) -> Result<ConnectedRegistryView> {
        self.changed_at_root_only()?;
        let _w = self.write_lock().await?;
        let name = req.name.as_str();
        validate_name(name)?;
        let mode = Mode::parse(req.mode.as_deref().unwrap_or("ReadOnly"))?;
        if req.repositories.is_empty() == req.sync_token.is_none() {
            return Err(ControlError::Invalid(
                "argument error: either --sync-token or --repository must be provided, but not both.".into(),
            ));
        }
        let all = self.all_registries().await?;
        if all.contains_key(name) {
            return Err(ControlError::AlreadyExists {
                kind: "connected registry",
                name: name.into(),
            });
        }
        let max = self.limits_cr().max_connected_registries;
        if all.len() >= max {
            return Err(ControlError::Limit {
                what: format!("the registry has {} connected registries", all.len()),
                limit: max as u64,
            });
        }
        if let Some(p) = &req.parent {
            let parent = all.get(p).ok_or_else(|| {
                ControlError::Invalid(format!(
                    "The parent connected registry '{p}' could not be found."
                ))
            })?;
            if parent.mode == Mode::ReadOnly.as_str() && mode == Mode::ReadWrite {
                return Err(ControlError::Invalid(format!(
                    "Can't create the registry '{name}' with mode '{}' when the connected registry parent '{p}' mode is '{}'. A ReadOnly parent can only have ReadOnly children.",
                    mode.as_str(),
                    parent.mode
                )));
            }
        }
        let schedule = req
            .sync_schedule
            .clone()
            .unwrap_or_else(|| CONTINUOUS.into());
        self.check_schedule_and_window(&schedule, req.sync_window.as_deref())?;
        let ttl = req.sync_message_ttl.clone().unwrap_or_else(|| "P2D".into());
        self.check_ttl(&ttl)?;
        let log_level = normalize_log_level(req.log_level.as_deref().unwrap_or("Information"))?;
        let gc_schedule = req
            .gc_schedule
            .clone()
            .unwrap_or_else(|| "0 0 * * *".into());
        parse_schedule("garbage-collection schedule", &gc_schedule)?;
        let mut notifications: Vec<String> = req
            .notifications
            .iter()
            .map(|n| check_notification(n))
            .collect::<Result<_>>()?;
        notifications.sort();
        notifications.dedup();
        check_notification_count(notifications.len())?;
        let mut client_tokens = req.client_tokens.clone();
        client_tokens.sort();
        client_tokens.dedup();
        self.check_client_tokens(name, mode, &client_tokens).await?;
        let repos: Vec<RepoPattern> = req
            .repositories
            .iter()
            .map(|r| RepoPattern::parse(r))
            .collect::<Result<_, _>>()?;

        // What a registry of the same name deleted without cleanup leaves: gateway rights for
        // this name in some scope map (they would let its old ancestors, or other holders of
        // that scope map, read the new registry's configuration and take its activation), and
        // its sync token and scope map, whose names the new one takes. All of it is named at
        // once, with the commands that remove it, in the order they work.
        let granted: BTreeSet<String> = gateway_rules(name).into_iter().collect();
        let own = req.sync_token.is_none();
        let token_taken = own && self.meta.token(name).await?.is_some();
        let map_taken = own && self.meta.scope_map(name).await?.is_some();
        let stale: Vec<String> = self
            .meta
            .scope_maps()
            .await?
            .into_iter()
            .filter(|m| m.actions.iter().any(|a| granted.contains(a)))
            .map(|m| m.name)
            .collect();
        let stale_rights = !stale.is_empty();
        let mut steps: Vec<String> = stale
            .iter()
            // The old sync scope map itself goes whole, below.
            .filter(|m| !(map_taken && *m == name))
            .map(|m| {
                format!(
                    "outpost scope-map update -n {m} --remove-gateway {name} config/read config/write message/read message/write"
                )
            })
            .collect();
        if stale_rights {
            // A leftover for sure: everything it left is named, with the commands in the
            // order they work (a token first, then the scope map it uses).
            let mut left = Vec::new();
            if !steps.is_empty() {
                left.push(format!(
                    "gateway rights in scope map(s) {}",
                    stale
                        .iter()
                        .filter(|m| !(map_taken && *m == name))
                        .cloned()
                        .collect::<Vec<_>>()
                        .join(", ")
                ));
            }
            if token_taken {
                left.push(format!("token {name:?}"));
                steps.push(format!("outpost token delete -n {name} --yes"));
            }
            if map_taken {
                left.push(format!("scope map {name:?}"));
                steps.push(format!("outpost scope-map delete -n {name} --yes"));
            }
            let message = format!(
                "a connected registry named {name:?} was deleted without --cleanup and left {}; \
                 remove {}: {} (or give this registry another name)",
                left.join(", "),
                if steps.len() == 1 {
                    "it"
                } else {
                    "them, in this order"
                },
                steps.join("; ")
            );
            return Err(if token_taken || map_taken {
                ControlError::Taken(message)
            } else {
                ControlError::Invalid(message)
            });
        }
        for (kind, taken) in [("token", token_taken), ("scope map", map_taken)] {
            if taken {
                return Err(ControlError::Taken(format!(
                    "{kind} {name:?} already exists: creating connected registry {name:?} makes a sync token and a scope map of that name; give this registry another name, or use the existing token as its sync token with --sync-token {name}"
                )));
            }
        }

        // Every row the create writes is planned first and written in one transaction, so
        // a limit met by an ancestor's scope map, a database error or a crash leaves nothing.
        let mut writes: Vec<AccessWrite> = Vec::new();
        // The sync token and its scope map.
        let (sync_token, repo_rules_for_ancestors) = match &req.sync_token {
            None => {
                let mut actions: Vec<String> =
                    repos.iter().flat_map(|r| repo_rules(r, mode)).collect();
                actions.extend(gateway_rules(name));
                let rules = self.parse_rules(name, &actions)?;
                if self.meta.count_scope_maps().await? >= self.config.limits.max_scope_maps {
                    return Err(ControlError::Limit {
                        what: "the registry has the maximum number of scope maps".into(),
                        limit: self.config.limits.max_scope_maps,
                    });
                }
                if self.meta.count_tokens().await? >= self.config.limits.max_tokens {
                    return Err(ControlError::Limit {
                        what: "the registry has the maximum number of tokens".into(),
                        limit: self.config.limits.max_tokens,
                    });
                }
                writes.push(AccessWrite::InsertScopeMap {
                    name: name.into(),
                    description: format!("Created by connected registry sync token: {name}"),
                    actions: rules,
                });
                writes.push(AccessWrite::PutToken(TokenRow {
                    name: name.into(),
                    scope_map: Some(name.into()),
                    status: "enabled".into(),
                    is_admin: false,
                    created_ms: now_ms(),
                    updated_ms: now_ms(),
                    passwords: [PasswordRow::default(), PasswordRow::default()],
                }));
                (
                    name.to_string(),
                    repos
                        .iter()
                        .flat_map(|r| repo_rules(r, mode))
                        .collect::<Vec<_>>(),
                )
            }
            Some(t) => {
                let token = self
                    .meta
                    .token(t)
                    .await?
                    .ok_or_else(|| ControlError::NotFound {
                        kind: "token",
                        name: t.clone(),
                    })?;
                if let Some(other) = all.values().find(|r| r.client_tokens.contains(t)) {
                    return Err(ControlError::Invalid(format!(
                        "token {t:?} is a client token of connected registry {:?}; a sync token must be a token of its own",
                        other.name
                    )));
                }
                if let Some(other) = all.values().find(|r| &r.sync_token == t) {
                    return Err(ControlError::Invalid(format!(
                        "token {t:?} is already the sync token of connected registry {:?}",
                        other.name
                    )));
                }
                let sm = token.scope_map.clone().ok_or_else(|| {
                    ControlError::Invalid(format!("sync token {t:?} has no scope map"))
                })?;
                // Gateway rights for this registry go into that scope map: every token using
                // it would get them (and read the registry's configuration, client-token
                // hashes included).
                let sharing: Vec<String> = self
                    .meta
                    .tokens_using(&sm)
                    .await?
                    .into_iter()
                    .filter(|other| other != t)
                    .collect();
                if !sharing.is_empty() {
                    return Err(ControlError::Invalid(format!(
                        "the scope map {sm:?} of sync token {t:?} is also used by {}; a sync token needs a scope map of its own, since the connected registry's gateway rights are added to it",
                        sharing.join(", ")
                    )));
                }
                let map =
                    self.meta
                        .scope_map(&sm)
                        .await?
                        .ok_or_else(|| ControlError::NotFound {
                            kind: "scope map",
                            name: sm.clone(),
                        })?;
                let rules: Vec<Rule> = map
                    .actions
                    .iter()
                    .filter_map(|a| Rule::parse(a).ok())
                    .collect();
                let patterns: BTreeSet<RepoPattern> = rules
                    .iter()
                    .filter_map(|r| match r {
                        Rule::Repository(p, _) => Some(p.clone()),
                        Rule::Gateway(..) => None,
                    })
                    .collect();
                if patterns.is_empty() {
                    return Err(ControlError::Invalid(format!(
                        "sync token {t:?} grants no repositories; its scope map {sm:?} needs repository actions"
                    )));
                }
                for p in &patterns {
                    for a in mode.repo_actions() {
                        if !rules.contains(&Rule::Repository(p.clone(), *a)) {
                            return Err(ControlError::Invalid(format!(
                                "sync token {t:?} lacks {} on {p}; a {} connected registry's sync token needs {} on each repository",
                                a,
                                mode.as_str(),
                                mode.repo_actions()
                                    .iter()
                                    .map(|a| a.as_str())
                                    .collect::<Vec<_>>()
                                    .join(", ")
                            )));
                        }
                    }
                }
                if rules
                    .iter()
                    .any(|r| matches!(r, Rule::Gateway(g, _) if g != name))
                {
                    return Err(ControlError::Invalid(format!(
                        "sync token {t:?} must have only repository permissions (and this registry's gateway actions)"
                    )));
                }
                writes.push(
                    self.planned_rules(&writes, &sm, |set| set.extend(gateway_rules(name)))
                        .await?,
                );
                (
                    t.clone(),
                    patterns.iter().flat_map(|p| repo_rules(p, mode)).collect(),
                )
            }
        };

        // Every ancestor's sync scope map gains the child's gateway and repository actions.
        let parent_row = req.parent.as_ref().and_then(|p| all.get(p)).cloned();
        if let Some(parent) = parent_row {
            let mut chain = vec![parent.clone()];
            chain.extend(Self::ancestors(&all, &parent.name).into_iter().cloned());
            for anc in chain {
                let sm = self.sync_scope_map(&anc).await?;
                let add: Vec<String> = gateway_rules(name)
                    .into_iter()
                    .chain(repo_rules_for_ancestors.iter().cloned())
                    .collect();
                let w = self
                    .planned_rules(&writes, &sm, |set| extend_uncovered(set, add))
                    .await?;
                writes.push(w);
            }
        }

        let row = ConnectedRegistryRow {
            name: name.into(),
            mode: mode.as_str().into(),
            parent: req.parent.clone(),
            sync_token,
            client_tokens,
            schedule,
            sync_window: req.sync_window.clone(),
            message_ttl: ttl,
            log_level,
            notifications,
            gc_enabled: req.gc_enabled.unwrap_or(true),
            gc_schedule,
            created_ms: now_ms(),
            updated_ms: now_ms(),
            activation: "Inactive".into(),
            status_details: "[]".into(),
            ..Default::default()
        };
        writes.push(AccessWrite::PutConnectedRegistry(Box::new(row.clone())));
        self.meta.apply(&writes).await?;
        self.changed();
        tracing::info!(connected_registry = name, mode = %row.mode, parent = row.parent.as_deref().unwrap_or("(this registry)"), "connected registry created");
        self.view(&row).await
    }

    pub async fn update_connected_registry(
        &self,
        name: &str,
        req: UpdateConnectedRegistry,
    ) -> Result<ConnectedRegistryView> {
        self.changed_at_root_only()?;
        let _w = self.write_lock().await?;
        let mut row = self.registry_row(name).await?;
        let dup = |a: &[String], b: &[String], what: &str| -> Result<()> {
            if a.iter().any(|x| b.contains(x)) {
                return Err(ControlError::Invalid(format!(
                    "Update ambiguity. Duplicate {what} were provided with --add-{what} and --remove-{what} arguments."
                )));
            }
            Ok(())
        };
        dup(
            &req.add_client_tokens,
            &req.remove_client_tokens,
            "client-tokens",
        )?;
        dup(
            &req.add_notifications,
            &req.remove_notifications,
            "notifications",
        )?;
        // A name that is not there (a typo) would leave the token meant working: say so.
        if let Some(t) = req
            .remove_client_tokens
            .iter()
            .find(|t| !row.client_tokens.contains(t))
        {
            return Err(ControlError::Invalid(format!(
                "token {t:?} is not a client token of connected registry {name:?} (its client tokens: {}); nothing was changed",
                match row.client_tokens.is_empty() {
                    true => "none".to_string(),
                    false => row.client_tokens.join(", "),
                }
            )));
        }
        let mode = Mode::parse(&row.mode)?;
        let mut tokens: BTreeSet<String> = row.client_tokens.iter().cloned().collect();
        tokens.extend(req.add_client_tokens.iter().cloned());
        tokens.retain(|t| !req.remove_client_tokens.contains(t));
        let tokens: Vec<String> = tokens.into_iter().collect();
        if tokens != row.client_tokens {
            self.check_client_tokens(name, mode, &tokens).await?;
            row.client_tokens = tokens;
        }
        let schedule = req
            .sync_schedule
            .clone()
            .unwrap_or_else(|| row.schedule.clone());
        let window = match &req.sync_window {
            Some(w) => Some(w.clone()),
            // Made continuous: the old schedule's window no longer means anything.
            None if req.sync_schedule.as_deref().is_some_and(is_continuous) => None,
            None => row.sync_window.clone(),
        };
        self.check_schedule_and_window(&schedule, window.as_deref())?;
        row.schedule = schedule;
        row.sync_window = window;
        if let Some(t) = &req.sync_message_ttl {
            self.check_ttl(t)?;
            row.message_ttl = t.clone();
        }
        if let Some(l) = &req.log_level {
            row.log_level = normalize_log_level(l)?;
        }
        let mut notes: BTreeSet<String> = row.notifications.iter().cloned().collect();
        for n in &req.add_notifications {
            notes.insert(check_notification(n)?);
        }
        notes.retain(|n| !req.remove_notifications.contains(n));
        check_notification_count(notes.len())?;
        row.notifications = notes.into_iter().collect();
        if let Some(g) = req.gc_enabled {
            row.gc_enabled = g;
        }
        if let Some(s) = &req.gc_schedule {
            parse_schedule("garbage-collection schedule", s)?;
            row.gc_schedule = s.clone();
        }
        // Through `apply`: a configuration change, which the other replicas must see.
        self.meta
            .apply(&[AccessWrite::PutConnectedRegistry(Box::new(row.clone()))])
            .await?;
        self.changed();
        self.view(&row).await
    }

    pub async fn show_connected_registry(&self, name: &str) -> Result<ConnectedRegistryView> {
        let row = self.registry_row(name).await?;
        self.view(&row).await
    }

    /// Health of every connected registry below this node, for the metrics: name, whether it
    /// is online or syncing, its last completed sync (Unix seconds), and the cursor lag and
    /// outbox depth it last reported.
    pub async fn fleet_health(&self) -> Result<Vec<FleetHealth>> {
        Ok(self
            .list_connected_registries(None, false)
            .await?
            .into_iter()
            .map(|v| {
                let up = matches!(v.connection_state.as_str(), "Online" | "Syncing");
                let unix = |t: Option<&str>| {
                    t.and_then(|t| crate::parse_rfc3339(t).ok())
                        .map(|ms| ms / 1000)
                };
                FleetHealth {
                    up,
                    last_sync_unix: unix(v.last_sync_time.as_deref()),
                    last_activity_unix: unix(v.last_activity_time.as_deref()),
                    cursor_lag: v.cursor_lag,
                    outbox_depth: v.outbox_depth,
                    name: v.name,
                }
            })
            .collect())
    }

    /// `list`: everything; `--no-children` alone: top level; `--parent P`: all descendants of
    /// P; both: P's direct children. Ordered as a depth-first walk of the tree.
    pub async fn list_connected_registries(
        &self,
        parent: Option<&str>,
        no_children: bool,
    ) -> Result<Vec<ConnectedRegistryView>> {
        let all = self.all_registries().await?;
        if let Some(p) = parent
            && !all.contains_key(p)
        {
            return Err(ControlError::Invalid(format!(
                "Parent connected registry '{p}' doesn't exist."
            )));
        }
        let mut ordered: Vec<&ConnectedRegistryRow> = Vec::new();
        fn walk<'a>(
            all: &'a HashMap<String, ConnectedRegistryRow>,
            parent: Option<&str>,
            depth_limit: Option<usize>,
            depth: usize,
            out: &mut Vec<&'a ConnectedRegistryRow>,
        ) {
            let mut kids: Vec<&ConnectedRegistryRow> = all
                .values()
                .filter(|r| r.parent.as_deref() == parent)
                .collect();
            kids.sort_by(|a, b| a.name.cmp(&b.name));
            for k in kids {
                out.push(k);
                if depth_limit.is_none_or(|l| depth + 1 < l) {
                    walk(all, Some(&k.name), depth_limit, depth + 1, out);
                }
            }
        }
        walk(&all, parent, no_children.then_some(1), 0, &mut ordered);
        let mut out = Vec::new();
        for r in ordered {
            out.push(self.view(r).await?);
        }
        Ok(out)
    }

    pub async fn delete_connected_registry(
        &self,
        name: &str,
        cleanup: bool,
        force: bool,
    ) -> Result<DeleteOutcome> {
        self.changed_at_root_only()?;
        let _w = self.write_lock().await?;
        let all = self.all_registries().await?;
        let row = all
            .get(name)
            .cloned()
            .ok_or_else(|| ControlError::NotFound {
                kind: "connected registry",
                name: name.into(),
            })?;
        let kids: Vec<String> = all
            .values()
            .filter(|r| r.parent.as_deref() == Some(name))
            .map(|r| r.name.clone())
            .collect();
        if !kids.is_empty() {
            return Err(ControlError::Invalid(format!(
                "connected registry {name:?} has children ({}); delete them first",
                kids.join(", ")
            )));
        }
        if row.activation == "Active" && !force {
            return Err(ControlError::Invalid(format!(
                "connected registry {name:?} is active; deactivate it first with `outpost connected-registry deactivate -n {name}` (or delete with --force)"
            )));
        }
        // With --cleanup, the registry and everything it owned go in one transaction, and a
        // database error anywhere refuses the whole delete. A step that cannot be planned for
        // another reason (an ancestor's scope map already removed by hand, say) is left out,
        // logged and reported as a remaining step; without --cleanup every step is.
        let sync_sm = plannable(name, "sync scope map", self.sync_scope_map(&row).await)?;
        let mut writes = vec![AccessWrite::DeleteConnectedRegistry(name.into())];
        let gateway: BTreeSet<String> = gateway_rules(name).into_iter().collect();
        let mut remaining = Vec::new();
        for anc in Self::ancestors(&all, name) {
            let Some(sm) = plannable(name, "ancestor's scope map", self.sync_scope_map(anc).await)?
            else {
                continue;
            };
            let planned = if cleanup {
                plannable(
                    name,
                    "ancestor's gateway rights",
                    self.planned_rules(&writes, &sm, |set| set.retain(|a| !gateway.contains(a)))
                        .await,
                )?
            } else {
                None
            };
            match planned {
                Some(w) => writes.push(w),
                None => remaining.push(format!(
                    "outpost scope-map update -n {sm} --remove-gateway {name} config/read config/write message/read message/write"
                )),
            }
        }
        if cleanup {
            writes.push(AccessWrite::DeleteToken(row.sync_token.clone()));
        } else {
            remaining.push(format!("outpost token delete -n {} --yes", row.sync_token));
        }
        if let Some(sm) = &sync_sm {
            // Once the sync token is gone, the scope map is deleted unless other tokens use it.
            if !cleanup {
                remaining.push(format!("outpost scope-map delete -n {sm} --yes"));
            } else if !self
                .meta
                .tokens_using(sm)
                .await?
                .iter()
                .any(|u| u != &row.sync_token)
            {
                writes.push(AccessWrite::DeleteScopeMap(sm.clone()));
            }
        }
        self.meta.apply(&writes).await?;
        self.changed();
        // A registry created later under the same name starts with no notifications.
        if let Err(e) = self.meta.delete_notifications(name).await {
            tracing::warn!(registry = name, error = %e, "could not delete the notifications of a deleted connected registry");
        }
        tracing::info!(
            connected_registry = name,
            was_active = row.activation == "Active",
            cleaned_up = remaining.is_empty(),
            "connected registry deleted"
        );
        Ok(DeleteOutcome {
            deleted: name.into(),
            cleaned_up: remaining.is_empty(),
            remaining_steps: remaining,
        })
    }

    pub async fn deactivate_connected_registry(&self, name: &str) -> Result<ConnectedRegistryView> {
        self.changed_at_root_only()?;
        let _w = self.write_lock().await?;
        let mut row = self.registry_row(name).await?;
        row.activation = "Inactive".into();
        row.instance_id = None;
        row.reported_state = None;
        self.meta.put_connected_registry(&row).await?;
        // Ends the instance's long-poll: its next contact is refused, and it stops now rather
        // than when the poll would have ended.
        self.changed();
        tracing::info!(
            connected_registry = name,
            "connected registry deactivated; its instance stops syncing"
        );
        self.view(&row).await
    }

    /// Called by a starting instance: claims the single active slot.
    pub async fn activate_connected_registry(
        &self,
        name: &str,
        instance_id: &str,
    ) -> Result<ConnectedRegistryView> {
        check_instance_id(instance_id)?;
        // On an intermediate node the slot is held at the root: ask upward first and follow
        // its answer; only while the parent is unreachable is the local record the judge.
        let upstream = self
            .upstream
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let relayed = upstream.is_some();
        let granted_above = match upstream {
            Some(up) => up.activate(name, instance_id).await?,
            None => false,
        };
        let _w = self.write_lock().await?;
        let mut row = self.registry_row(name).await?;
        if !granted_above
            && row.activation == "Active"
            && row.instance_id.as_deref() != Some(instance_id)
        {
            tracing::warn!(
                connected_registry = name,
                instance = instance_id,
                active_instance = row.instance_id.as_deref().unwrap_or(""),
                "refused to activate a second instance of a connected registry"
            );
            return Err(ControlError::AlreadyActivated(name.into()));
        }
        // Deactivation forgets the instance, so whether this is the same one as before is
        // not known: the log says what the resource was.
        let was = std::mem::replace(&mut row.activation, "Active".into());
        let first = row.last_activity_ms.is_none();
        row.instance_id = Some(instance_id.into());
        row.last_activity_ms = Some(now_ms());
        // Granted here without the root: it is asked when it answers again (see
        // `report_status`), or it would take the instance for a deactivated one.
        row.activated_offline = relayed && !granted_above;
        self.meta.put_connected_registry(&row).await?;
        tracing::info!(
            connected_registry = name,
            instance = instance_id,
            was = if first {
                "never activated"
            } else {
                was.as_str()
            },
            "connected registry activated"
        );
        self.view(&row).await
    }

    /// The root knows of `instance` as the active instance of `name` now: no longer one
    /// granted only here.
    async fn confirm_activation(&self, name: &str, instance: &str) -> Result<()> {
        let _w = self.write_lock().await?;
        let mut row = self.registry_row(name).await?;
        if row.activated_offline && row.instance_id.as_deref() == Some(instance) {
            row.activated_offline = false;
            self.meta.put_connected_registry(&row).await?;
        }
        Ok(())
    }

    /// Called by the active instance with its current status.
    pub async fn report_status(
        &self,
        name: &str,
        mut report: StatusReport,
    ) -> Result<ConnectedRegistryView> {
        check_instance_id(&report.instance_id)?;
        for (field, v) in [
            ("cursorLag", report.cursor_lag),
            ("outboxDepth", report.outbox_depth),
        ] {
            if v.is_some_and(|v| v < 0) {
                return Err(ControlError::Invalid(format!(
                    "{field} must not be negative"
                )));
            }
        }
        // A version is a short label (`0.1.0`, a commit): refused when it is not one, rather
        // than stored and shown in every list.
        if let Some(v) = &report.version
            && (v.len() > MAX_VERSION_TEXT || v.chars().any(char::is_control))
        {
            return Err(ControlError::Invalid(format!(
                "version must be at most {MAX_VERSION_TEXT} bytes with no control characters"
            )));
        }
        if let Some(details) = report.status_details.as_mut() {
            // What a person reads in `show` and the status page: bounded, whatever an
            // instance sends.
            details.truncate(MAX_STATUS_DETAILS);
            for d in details.iter_mut() {
                for text in [&mut d.kind, &mut d.code, &mut d.description] {
                    if text.chars().any(char::is_control) {
                        *text = text
                            .chars()
                            .map(|c| if c.is_control() { ' ' } else { c })
                            .collect();
                    }
                    if text.len() > MAX_DETAIL_TEXT {
                        let mut end = MAX_DETAIL_TEXT;
                        while !text.is_char_boundary(end) {
                            end -= 1;
                        }
                        text.truncate(end);
                        text.push('…');
                    }
                }
            }
        }
        // On an intermediate node the status also goes up, so the root sees the whole tree;
        // when the link is down the root hears about it at the next report.
        let upstream = self
            .upstream
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let mut deactivated_above = false;
        if let Some(up) = upstream {
            // What this node knows of the descendant goes up whole, not just what changed in
            // this report: a report the parent missed while it was away (a last sync time, a
            // new detail) then reaches it with the next one.
            let known = self.meta.connected_registry(name).await?;
            let full = match &known {
                Some(row) => with_known_state(&report, row),
                None => report.clone(),
            };
            let offline = known.is_some_and(|r| {
                r.activated_offline && r.instance_id.as_deref() == Some(report.instance_id.as_str())
            });
            // Bounded well below a child's own patience (its read timeout, a minute by
            // default): a parent that accepts and never answers must not make the child give
            // up on this node, which serves it from its own state.
            // After a failure, not again for RELAY_BACKOFF: the report goes up whole with a
            // later one.
            let failed_lately = self
                .relay_failed
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .is_some_and(|at| at.elapsed() < RELAY_BACKOFF);
            let relayed = if failed_lately {
                Err(ControlError::Unavailable(
                    "the parent did not answer lately; relayed with a later report".into(),
                ))
            } else {
                let r = match tokio::time::timeout(RELAY_WAIT, up.report(name, &full)).await {
                    Ok(r) => r,
                    Err(_) => Err(ControlError::Internal(format!(
                        "the parent did not answer within {RELAY_WAIT:?}"
                    ))),
                };
                *self.relay_failed.lock().unwrap_or_else(|p| p.into_inner()) = match &r {
                    Ok(()) | Err(ControlError::NotActive(_)) => None,
                    Err(_) => Some(std::time::Instant::now()),
                };
                r
            };
            match relayed {
                Ok(()) => {
                    if offline {
                        self.confirm_activation(name, &report.instance_id).await?;
                    }
                }
                // An instance this node activated while the root was unreachable is unknown
                // there, not deactivated: it asks the root for the slot now, as the instance
                // would have at its start, and sends the report again.
                Err(ControlError::NotActive(_)) if offline => {
                    match up.activate(name, &report.instance_id).await {
                        Ok(true) => {
                            tracing::info!(registry = name, instance = %report.instance_id, "the root took the activation granted here while it was unreachable");
                            self.confirm_activation(name, &report.instance_id).await?;
                            if let Err(ControlError::NotActive(_)) = up.report(name, &full).await {
                                deactivated_above = true;
                            }
                        }
                        Ok(false) => {} // unreachable again: asked at the next report
                        Err(ControlError::AlreadyActivated(_)) => {
                            tracing::warn!(registry = name, instance = %report.instance_id, "another instance of this descendant is active at the root; this one, activated here while the root was unreachable, is deactivated");
                            deactivated_above = true;
                        }
                        Err(e) => {
                            tracing::debug!(registry = name, error = %e, "could not pass an offline activation upward")
                        }
                    }
                }
                Err(ControlError::NotActive(e)) => {
                    tracing::debug!(registry = name, error = %e, "the root refused this descendant's report: not active there");
                    deactivated_above = true;
                }
                Err(e) => {
                    tracing::debug!(registry = name, error = %e, "could not relay a status report upward")
                }
            }
        }
        let _w = self.write_lock().await?;
        let mut row = self.registry_row(name).await?;
        // Only the instance the root refused: a report from a replaced instance must not
        // deactivate its successor.
        if deactivated_above
            && row.activation == "Active"
            && row.instance_id.as_deref() == Some(report.instance_id.as_str())
        {
            // Said once, when this node's record changes; the instance is refused each time
            // it tries again.
            tracing::info!(
                registry = name,
                "the root deactivated this descendant; passing that on"
            );
            row.activation = "Inactive".into();
            row.instance_id = None;
            self.meta.put_connected_registry(&row).await?;
        }
        if row.activation != "Active"
            || row.instance_id.as_deref() != Some(report.instance_id.as_str())
        {
            return Err(ControlError::NotActive(match &row.instance_id {
                Some(active) if row.activation == "Active" => format!(
                    "instance {:?} is not the active instance of connected registry {name:?}: \
                     instance {:?} activated it since (a second process with the same \
                     connection string, or a new data directory), and only one may run; stop \
                     this one, or deactivate the registry (`outpost connected-registry \
                     deactivate -n {name}`) and restart this one to make it the active one",
                    report.instance_id, active
                ),
                _ => format!(
                    "instance {:?} is not the active instance of connected registry {name:?}; \
                     it was deactivated — restart it to activate again",
                    report.instance_id
                ),
            }));
        }
        row.last_activity_ms = Some(now_ms());
        if let Some(s) = report.state {
            if !matches!(s.as_str(), "Online" | "Syncing") {
                return Err(ControlError::Invalid(format!(
                    "state {s:?} is not Online or Syncing"
                )));
            }
            row.reported_state = Some(s);
        }
        if let Some(t) = report.last_sync_time {
            // Only another sync answers a resync request: the same time relayed again (an
            // intermediate node passes on everything it knows) does not. Another, not a later
            // one: a child whose clock was corrected backwards must still be heard.
            let ms = crate::parse_rfc3339(&t)?;
            if row.last_sync_ms != Some(ms) {
                row.last_sync_ms = Some(ms);
                row.resync_requested = false;
            }
        }
        if report.last_sync_result.is_some() {
            row.sync_result = report.last_sync_result;
        }
        if let Some(details) = &report.status_details {
            row.status_details = serde_json::to_string(details).unwrap_or_else(|_| "[]".into());
        }
        if report.version.is_some() {
            row.version = report.version;
        }
        if report.cursor_lag.is_some() {
            row.cursor_lag = report.cursor_lag;
        }
        if report.outbox_depth.is_some() {
            row.outbox_depth = report.outbox_depth;
        }
        if let Some(l) = &report.login_server {
            crate::connstr::check_endpoint(l)
                .map_err(|why| ControlError::Invalid(format!("loginServer {why}")))?;
            row.login_server = report.login_server;
        }
        self.meta.put_connected_registry(&row).await?;
        self.view(&row).await
    }

    pub async fn resync_connected_registry(&self, name: &str) -> Result<ConnectedRegistryView> {
        self.changed_at_root_only()?;
        let _w = self.write_lock().await?;
        let mut row = self.registry_row(name).await?;
        row.resync_requested = true;
        self.meta.put_connected_registry(&row).await?;
        // Ends the child's long-poll, so the request reaches it now, not at its next poll.
        self.changed();
        self.view(&row).await
    }

    pub async fn connected_registry_client_tokens(
        &self,
        name: &str,
    ) -> Result<Vec<crate::TokenView>> {
        let row = self.registry_row(name).await?;
        let mut out = Vec::new();
        for t in &row.client_tokens {
            if let Ok(v) = self.show_token(t).await {
                out.push(v);
            }
        }
        Ok(out)
    }

    pub async fn connected_registry_permissions(&self, name: &str) -> Result<crate::ScopeMapView> {
        let row = self.registry_row(name).await?;
        let sm = self.sync_scope_map(&row).await?;
        self.show_scope_map(&sm).await
    }

    /// `permissions update`: `--add` adds to the registry and every ancestor, `--remove`
    /// removes from the registry and every descendant.
    pub async fn update_connected_registry_permissions(
        &self,
        name: &str,
        add: &[String],
        remove: &[String],
    ) -> Result<crate::ScopeMapView> {
        self.changed_at_root_only()?;
        let _w = self.write_lock().await?;
        if add.is_empty() && remove.is_empty() {
            return Err(ControlError::Invalid(
                "No repository permissions to update.".into(),
            ));
        }
        if add.iter().any(|a| remove.contains(a)) {
            return Err(ControlError::Invalid(
                "Update ambiguity. Duplicate repository names were provided with --add and --remove arguments.".into(),
            ));
        }
        let all = self.all_registries().await?;
        let row = all
            .get(name)
            .cloned()
            .ok_or_else(|| ControlError::NotFound {
                kind: "connected registry",
                name: name.into(),
            })?;
        let mode = Mode::parse(&row.mode)?;
        let add: Vec<RepoPattern> = add
            .iter()
            .map(|r| RepoPattern::parse(r))
            .collect::<Result<_, _>>()?;
        let remove: Vec<RepoPattern> = remove
            .iter()
            .map(|r| RepoPattern::parse(r))
            .collect::<Result<_, _>>()?;
        let add_rules: Vec<String> = add.iter().flat_map(|r| repo_rules(r, mode)).collect();
        let remove_rules: BTreeSet<String> = remove
            .iter()
            .flat_map(|r| repo_rules(r, Mode::ReadWrite))
            .collect();
        // Removing what the registry does not sync is a mistake worth saying (a wildcard rule,
        // say, is removed by its own pattern).
        let own = self
            .meta
            .scope_map(&self.sync_scope_map(&row).await?)
            .await?
            .map(|m| m.actions)
            .unwrap_or_default();
        for r in &remove {
            let prefix = format!("repositories/{r}/");
            if !own.iter().any(|a| a.starts_with(&prefix)) {
                let synced: BTreeSet<&str> = own
                    .iter()
                    .filter_map(|a| a.strip_prefix("repositories/"))
                    .filter_map(|a| a.rsplitn(3, '/').nth(2))
                    .collect();
                // Inside a wildcard the registry syncs: the wildcard cannot leave one out.
                let r_text = r.to_string();
                if let Some(wide) = synced.iter().find(|p| {
                    **p == "*"
                        || p.strip_suffix('*')
                            .is_some_and(|pre| r_text.starts_with(pre))
                }) {
                    return Err(ControlError::Invalid(format!(
                        "repository {r} is synced by connected registry {name:?} through the \
                         pattern {wide}, which cannot leave one repository out: remove {wide} \
                         (--remove '{wide}') and add the repositories to keep (--add)"
                    )));
                }
                return Err(ControlError::Invalid(format!(
                    "repository {r} is not in the sync scope of connected registry {name:?}, which syncs: {}",
                    synced.into_iter().collect::<Vec<_>>().join(", ")
                )));
            }
        }
        // Plan every scope map's new rules first, so a limit or a missing scope map anywhere
        // in the line refuses the whole update before anything is written.
        let mut planned: Vec<(outpost_meta::ScopeMapRow, BTreeSet<String>)> = Vec::new();
        let up = std::iter::once(&row).chain(Self::ancestors(&all, name));
        // Parents come before their children, so each child is checked against its parent's
        // new scope.
        let down = std::iter::once(&row).chain(Self::descendants(&all, name));
        for (t, adding) in up.map(|t| (t, true)).chain(down.map(|t| (t, false))) {
            let sm = self.sync_scope_map(t).await?;
            let i =
                match planned.iter().position(|(m, _)| m.name == sm) {
                    Some(i) => i,
                    None => {
                        let m = self.meta.scope_map(&sm).await?.ok_or_else(|| {
                            ControlError::NotFound {
                                kind: "scope map",
                                name: sm.clone(),
                            }
                        })?;
                        let set = m.actions.iter().cloned().collect();
                        planned.push((m, set));
                        planned.len() - 1
                    }
                };
            if adding {
                extend_uncovered(&mut planned[i].1, add_rules.iter().cloned());
                continue;
            }
            if t.name == row.name {
                let set = &mut planned[i].1;
                set.retain(|a| !remove_rules.contains(a));
                if !set.iter().any(|a| a.starts_with("repositories/")) {
                    return Err(ControlError::Invalid(format!(
                        "removing every repository connected registry {name:?} syncs would leave \
                         it with nothing to sync; keep one, or delete the connected registry"
                    )));
                }
                continue;
            }
            // A descendant keeps what its parent still syncs (through a wildcard, say), and
            // loses what the parent no longer does.
            let parent_sm = match &t.parent {
                Some(p) => match all.get(p) {
                    Some(parent) => self.sync_scope_map(parent).await?,
                    None => continue,
                },
                None => continue,
            };
            let parent_set = planned
                .iter()
                .find(|(m, _)| m.name == parent_sm)
                .map(|(_, set)| set.clone())
                .unwrap_or_default();
            let set = &mut planned[i].1;
            set.retain(|a| !a.starts_with("repositories/") || rule_covered(&parent_set, a));
            if !set.iter().any(|a| a.starts_with("repositories/")) {
                return Err(ControlError::Invalid(format!(
                    "removing {} would leave connected registry {:?} (below {name:?}) with no \
                     repository to sync; delete it first, or keep a repository it syncs",
                    remove
                        .iter()
                        .map(ToString::to_string)
                        .collect::<Vec<_>>()
                        .join(", "),
                    t.name
                )));
            }
        }
        let mut writes = Vec::new();
        for (m, set) in &planned {
            let actions: Vec<String> = set.iter().cloned().collect();
            let rules = self.parse_rules(&m.name, &actions)?;
            if rules != m.actions {
                writes.push(AccessWrite::UpdateScopeMap {
                    name: m.name.clone(),
                    description: m.description.clone(),
                    actions: rules,
                });
            }
        }
        self.meta.apply(&writes).await?;
        self.changed();
        let sm = self.sync_scope_map(&row).await?;
        self.show_scope_map(&sm).await
    }

    /// `get-settings`: the connection string and the settings an instance needs, optionally
    /// generating (rotating) sync-token password 1 or 2. `root_endpoint` is how this root is
    /// reached (`host[:port]`), used for top-level registries.
    pub async fn connected_registry_settings(
        &self,
        name: &str,
        protocol: &str,
        generate_password: Option<u8>,
        root_endpoint: &str,
        explicit_endpoint: Option<&str>,
    ) -> Result<Settings> {
        // Reading the settings is harmless anywhere; rotating a child's sync-token password
        // at a connected registry would lock the child out until the next sync.
        if generate_password.is_some() {
            self.changed_at_root_only()?;
        }
        if protocol != "http" && protocol != "https" {
            return Err(ControlError::Invalid(format!(
                "--parent-protocol must be http or https, not {protocol:?}"
            )));
        }
        let row = self.registry_row(name).await?;
        if let Some(e) = explicit_endpoint {
            crate::connstr::check_endpoint(e)
                .map_err(|why| ControlError::Invalid(format!("--parent-endpoint {why}")))?;
        }
        let endpoint = match (explicit_endpoint, &row.parent) {
            (Some(e), _) => e.to_string(),
            // The request's Host, unless it is no address (then the string says to fill it in).
            (None, None) if crate::connstr::check_endpoint(root_endpoint).is_ok() => {
                root_endpoint.to_string()
            }
            (None, None) => NO_ENDPOINT.into(),
            (None, Some(p)) => self
                .meta
                .connected_registry(p)
                .await?
                .and_then(|r| r.login_server)
                .unwrap_or_else(|| NO_ENDPOINT.into()),
        };
        let password = match generate_password {
            None => NO_PASSWORD.to_string(),
            Some(n @ (1 | 2)) => {
                let v = self
                    .generate_credentials(&row.sync_token, &[usize::from(n - 1)], None)
                    .await?;
                v.passwords
                    .into_iter()
                    .find_map(|p| p.value)
                    .ok_or_else(|| ControlError::Internal("generated password missing".into()))?
            }
            Some(other) => {
                return Err(ControlError::Invalid(format!(
                    "--generate-password takes 1 or 2, not {other}"
                )));
            }
        };
        let cs = ConnectionString {
            connected_registry_name: name.into(),
            sync_token_name: row.sync_token.clone(),
            sync_token_password: password.clone(),
            parent_gateway_endpoint: endpoint,
            parent_endpoint_protocol: protocol.into(),
        }
        .to_string();
        Ok(Settings {
            sync_token_user: row.sync_token,
            sync_token_password: password,
            connection_string: cs.clone(),
            outpost_connection_string: cs,
            login_server:
                "<Optional: the address local clients use to reach this connected registry>".into(),
        })
    }

    /// The configuration an instance of `name` fetches from its parent.
    pub async fn sync_config(&self, name: &str) -> Result<SyncConfig> {
        let all = self.all_registries().await?;
        let row = all.get(name).ok_or_else(|| ControlError::NotFound {
            kind: "connected registry",
            name: name.into(),
        })?;
        Box::pin(self.sync_config_of(&all, row)).await
    }

    async fn sync_config_of(
        &self,
        all: &HashMap<String, ConnectedRegistryRow>,
        row: &ConnectedRegistryRow,
    ) -> Result<SyncConfig> {
        let mut client_tokens = Vec::new();
        for t in &row.client_tokens {
            if let Some(c) = self.token_config(t).await? {
                client_tokens.push(c);
            }
        }
        let mut kids: Vec<&ConnectedRegistryRow> = all
            .values()
            .filter(|r| r.parent.as_deref() == Some(row.name.as_str()))
            .collect();
        kids.sort_by(|a, b| a.name.cmp(&b.name));
        let mut children = Vec::new();
        for k in kids {
            children.push(Box::pin(self.sync_config_of(all, k)).await?);
        }
        Ok(SyncConfig {
            name: row.name.clone(),
            mode: row.mode.clone(),
            repositories: self.repositories_of(row).await?,
            sync_schedule: row.schedule.clone(),
            sync_window: row.sync_window.clone(),
            sync_message_ttl: row.message_ttl.clone(),
            log_level: row.log_level.clone(),
            notifications: row.notifications.clone(),
            garbage_collection: GarbageCollection {
                enabled: row.gc_enabled,
                schedule: row.gc_schedule.clone(),
            },
            resync_requested: row.resync_requested,
            client_tokens,
            sync_token: self.token_config(&row.sync_token).await?,
            children,
            created_ms: Some(row.created_ms),
            activation_status: Some(row.activation.clone()),
        })
    }

    /// A token as it travels to a connected registry: name, status, rules, password hashes.
    async fn token_config(&self, name: &str) -> Result<Option<ClientTokenConfig>> {
        let Some(tok) = self.meta.token(name).await? else {
            // On an intermediate node: a descendant's client token, kept only to hand down.
            return Ok(self
                .meta
                .relayed_token(name)
                .await?
                .and_then(|json| serde_json::from_str(&json).ok()));
        };
        if tok.is_admin {
            // An administrator's password hash never leaves this node.
            return Ok(None);
        }
        let actions = match &tok.scope_map {
            Some(sm) => self
                .meta
                .scope_map(sm)
                .await?
                .map(|m| m.actions)
                .unwrap_or_default(),
            None => Vec::new(),
        };
        Ok(Some(ClientTokenConfig {
            name: tok.name.clone(),
            status: tok.status.clone(),
            actions,
            passwords: tok
                .passwords
                .iter()
                .enumerate()
                .filter_map(|(i, p)| {
                    p.hash.as_ref().map(|h| PasswordHash {
                        name: format!("password{}", i + 1),
                        hash: h.clone(),
                        expiry: p.expiry_ms.map(rfc3339),
                    })
                })
                .collect(),
        }))
    }

    /// On an intermediate connected registry: makes the local connected-registry resources
    /// match its descendants as its parent described them, so this node serves them the
    /// gateway API (configuration and message feed) from its own state, even offline. Their
    /// activation and status are kept, and relayed upward by the gateway.
    pub async fn apply_descendants(&self, children: &[SyncConfig]) -> Result<()> {
        let _w = self.write_lock().await?;
        fn flatten<'a>(
            nodes: &'a [SyncConfig],
            parent: Option<&'a str>,
            out: &mut Vec<(&'a SyncConfig, Option<&'a str>)>,
        ) {
            for n in nodes {
                out.push((n, parent));
                flatten(&n.children, Some(&n.name), out);
            }
        }
        let mut all = Vec::new();
        flatten(children, None, &mut all);
        // Their client tokens go into their configuration, not into this node's tokens: a
        // line's token must not open this site.
        let mut relayed: Vec<(String, String)> = Vec::new();
        for (cfg, _) in &all {
            for t in &cfg.client_tokens {
                if !relayed.iter().any(|(n, _)| n == &t.name) {
                    relayed.push((t.name.clone(), serde_json::to_string(t).unwrap_or_default()));
                }
            }
        }
        // All of it in one transaction: a crash half-way must not leave a descendant relayed
        // with another's tokens, nor a deleted one still listed.
        let mut writes = vec![AccessWrite::ReplaceRelayedTokens(relayed)];
        let existing = self.all_registries().await?;
        for (cfg, parent) in &all {
            let old = existing.get(&cfg.name);
            // The same name for another resource (deleted and created again at the root since
            // the last configuration): what the old one reported is not this one's status.
            // Its activation stays: the root judges that when the instance next reports.
            let reported = old.filter(|o| cfg.created_ms.is_none_or(|c| c == o.created_ms));
            // Deactivated at the root: the record here is left for the root to judge (a
            // configuration read just before the root granted an activation relayed through
            // here must not undo it). The changed configuration ends the descendant's
            // long-poll (`changed()` below); its next report is relayed, the root refuses it,
            // and `report_status` marks it inactive.
            if cfg.activation_status.as_deref() == Some("Inactive")
                && old.is_some_and(|o| o.activation == "Active")
            {
                tracing::debug!(registry = %cfg.name, "the root has this descendant inactive; waking it");
            }
            let row = ConnectedRegistryRow {
                name: cfg.name.clone(),
                mode: cfg.mode.clone(),
                parent: parent.map(String::from),
                sync_token: cfg
                    .sync_token
                    .as_ref()
                    .map(|t| t.name.clone())
                    .unwrap_or_else(|| cfg.name.clone()),
                client_tokens: cfg.client_tokens.iter().map(|t| t.name.clone()).collect(),
                schedule: cfg.sync_schedule.clone(),
                sync_window: cfg.sync_window.clone(),
                message_ttl: cfg.sync_message_ttl.clone(),
                log_level: cfg.log_level.clone(),
                notifications: cfg.notifications.clone(),
                gc_enabled: cfg.garbage_collection.enabled,
                gc_schedule: cfg.garbage_collection.schedule.clone(),
                created_ms: cfg
                    .created_ms
                    .or(old.map(|o| o.created_ms))
                    .unwrap_or_else(now_ms),
                updated_ms: now_ms(),
                activation: old
                    .map(|o| o.activation.clone())
                    .unwrap_or_else(|| "Inactive".into()),
                instance_id: old.and_then(|o| o.instance_id.clone()),
                // Of another resource under the same name: not when this one was heard from.
                last_activity_ms: reported.and_then(|o| o.last_activity_ms),
                last_sync_ms: reported.and_then(|o| o.last_sync_ms),
                sync_result: reported.and_then(|o| o.sync_result.clone()),
                reported_state: reported.and_then(|o| o.reported_state.clone()),
                status_details: reported
                    .map(|o| o.status_details.clone())
                    .unwrap_or_else(|| "[]".into()),
                version: reported.and_then(|o| o.version.clone()),
                login_server: reported.and_then(|o| o.login_server.clone()),
                resync_requested: cfg.resync_requested,
                cursor_lag: reported.and_then(|o| o.cursor_lag),
                outbox_depth: reported.and_then(|o| o.outbox_depth),
                activated_offline: old.is_some_and(|o| o.activated_offline),
            };
            writes.push(AccessWrite::PutConnectedRegistry(Box::new(row)));
        }
        for name in existing.keys() {
            if !all.iter().any(|(c, _)| &c.name == name) {
                writes.push(AccessWrite::DeleteConnectedRegistry(name.clone()));
            }
        }
        self.meta.apply(&writes).await?;
        self.changed();
        Ok(())
    }

    /// The lowest event number a child of this node may still ask for: the first event
    /// within the longest message TTL of the connected registries this node serves (and at
    /// least the shortest TTL allowed), or the newest event when none is that recent. Every
    /// feed answers the same after the events below it are pruned: a cursor that old is
    /// refused as expired either way.
    pub async fn event_log_floor(&self) -> Result<i64> {
        let mut keep = self.limits_cr().min_message_ttl;
        for row in self.meta.connected_registries().await? {
            if let Ok(ttl) = parse_duration("message TTL", &row.message_ttl) {
                keep = keep.max(ttl);
            }
        }
        let since = now_ms().saturating_sub(i64::try_from(keep.as_millis()).unwrap_or(i64::MAX));
        Ok(match self.meta.first_event_since(since).await? {
            Some(seq) => seq,
            None => self.meta.latest_event().await?,
        })
    }

    /// Prunes the event log below [`Self::event_log_floor`], but never past `unsent_after`:
    /// a ReadWrite site's outbox cursor, after which its clients' changes are still to be
    /// sent up (and the tag history they are compared with is still needed). Deletes in
    /// batches, so pushes wait for the database only briefly; returns how many went.
    pub async fn prune_event_log(&self, unsent_after: Option<i64>) -> Result<u64> {
        const BATCH: u32 = 5000;
        let mut below = self.event_log_floor().await?;
        if let Some(cursor) = unsent_after {
            below = below.min(cursor.saturating_add(1));
        }
        let (mut total, mut from) = (0, 0);
        loop {
            let (n, last) = self.meta.prune_events(below, from, BATCH).await?;
            total += n;
            from = last;
            if n < u64::from(BATCH) {
                return Ok(total);
            }
            tokio::task::yield_now().await;
        }
    }

    /// A page of `name`'s message feed after cursor `after`: the event-log entries of the
    /// repositories it syncs, in order. A cursor older than the message TTL, ahead of the log,
    /// or whose `mark` (see [`MessagePage::next_mark`]) is not the time event `after` was
    /// written here is refused with [`ControlError::CursorExpired`]; the child then reconciles
    /// fully.
    pub async fn messages(
        &self,
        name: &str,
        after: i64,
        mark: Option<i64>,
        limit: u32,
    ) -> Result<MessagePage> {
        let row = self.registry_row(name).await?;
        let ttl = parse_duration("message TTL", &row.message_ttl)?;
        let latest = self.meta.latest_event().await?;
        let oldest = self
            .meta
            .first_event_since(now_ms() - ttl.as_millis() as i64)
            .await?;
        // Below the pruning mark some events are gone: such a cursor cannot be continued even
        // if its TTL (raised since) would allow it.
        let pruned_below = self.meta.events_pruned_below().await?;
        let expired = after > latest
            || (after < latest
                && (after + 1 < pruned_below
                    || match oldest {
                        None => true,
                        Some(o) => after + 1 < o,
                    }));
        // The event the cursor names, as this log has it: another time means the child's
        // cursor comes from another history of the log (this node was restored from a backup
        // and has written other events under the same numbers since).
        let at_cursor = match after {
            0 => None,
            _ => self
                .meta
                .events_after(after - 1, 1)
                .await?
                .into_iter()
                .find(|e| e.seq == after)
                .map(|e| e.at_ms),
        };
        let elsewhere = matches!((mark, at_cursor), (Some(m), Some(at)) if m != at);
        if expired || elsewhere {
            // Not for the cursor far beyond any log a child sends to learn `latest` before
            // it reconciles.
            if !elsewhere && after < i64::MAX / 4 {
                tracing::info!(
                    connected_registry = name,
                    cursor = after,
                    latest,
                    "a child's message cursor has expired (or is ahead of this log); the child reconciles fully"
                );
            }
            if elsewhere {
                tracing::warn!(
                    connected_registry = name,
                    cursor = after,
                    "a child's message cursor names an event this log does not have (was this \
                     registry restored from a backup?); the child reconciles fully"
                );
            }
            return Err(ControlError::CursorExpired {
                name: name.into(),
                after,
                ttl: row.message_ttl.clone(),
                latest,
            });
        }
        let patterns: Vec<RepoPattern> = self
            .repositories_of(&row)
            .await?
            .iter()
            .filter_map(|r| RepoPattern::parse(r).ok())
            .collect();
        let limit = limit.clamp(1, 1000) as usize;
        let mut messages = Vec::new();
        let mut next = after;
        let mut next_mark = at_cursor;
        'scan: loop {
            let page = self.meta.events_after(next, 500).await?;
            if page.is_empty() {
                break;
            }
            for e in page {
                next = e.seq;
                next_mark = Some(e.at_ms);
                if patterns.iter().any(|p| p.matches(&e.repo)) {
                    messages.push(Message {
                        seq: e.seq,
                        at: rfc3339(e.at_ms),
                        repository: e.repo,
                        kind: e.kind,
                        tag: e.tag,
                        digest: e.digest,
                        media_type: e.media_type,
                        mark: Some(e.at_ms),
                    });
                    if messages.len() >= limit {
                        break 'scan;
                    }
                }
            }
        }
        // A prune that committed while the page was read may have cut into it: then the page
        // may have a gap, and the child must reconcile instead.
        if after + 1 < self.meta.events_pruned_below().await? {
            return Err(ControlError::CursorExpired {
                name: name.into(),
                after,
                ttl: row.message_ttl.clone(),
                latest,
            });
        }
        Ok(MessagePage {
            messages,
            next,
            latest,
            resync: row.resync_requested,
            next_mark,
        })
    }

    /// Client tokens installed from a parent: each has the `synced-<name>` scope map
    /// [`Self::apply_synced_tokens`] makes for it. Read from the database, so a lost or damaged
    /// state file cannot leave a token the parent revoked working here.
    pub async fn synced_token_names(&self) -> Result<Vec<String>> {
        Ok(self
            .meta
            .tokens()
            .await?
            .into_iter()
            .filter(|t| t.scope_map.as_deref() == Some(format!("synced-{}", t.name).as_str()))
            .map(|t| t.name)
            .collect())
    }

    /// On a connected registry: makes the local client tokens match those its parent sent
    /// (with the same password hashes, status, expiries and rules), so local clients
    /// authenticate while the link is down. `previous` names the tokens applied last time;
    /// those no longer sent are removed. The local `admin` token is never touched, and the
    /// API refuses local changes to these tokens and their `synced-<name>` scope maps.
    pub async fn apply_synced_tokens(
        &self,
        tokens: &[ClientTokenConfig],
        previous: &[String],
    ) -> Result<()> {
        let _w = self.write_lock().await?;
        // One transaction: a crash half-way must not leave a token with its new password and
        // its old rules, or a revoked token still in place.
        let mut writes = Vec::new();
        for t in tokens {
            if t.name == crate::ADMIN_TOKEN {
                tracing::warn!(
                    "the parent sent a client token named admin; the local administrator token is kept"
                );
                continue;
            }
            let scope_map = format!("synced-{}", t.name);
            let rules: Vec<String> = t
                .actions
                .iter()
                .filter_map(|a| Rule::parse(a).ok())
                .map(|r| r.to_string())
                .collect();
            writes.push(AccessWrite::PutScopeMap {
                name: scope_map.clone(),
                description: "Client token rules synced from the parent".into(),
                actions: rules,
            });
            let mut passwords = [PasswordRow::default(), PasswordRow::default()];
            for p in &t.passwords {
                let slot = match p.name.as_str() {
                    "password1" => 0,
                    "password2" => 1,
                    _ => continue,
                };
                passwords[slot] = PasswordRow {
                    hash: Some(p.hash.clone()),
                    created_ms: Some(now_ms()),
                    expiry_ms: p.expiry.as_deref().map(crate::parse_rfc3339).transpose()?,
                };
            }
            writes.push(AccessWrite::PutToken(TokenRow {
                name: t.name.clone(),
                scope_map: Some(scope_map),
                status: t.status.clone(),
                is_admin: false,
                created_ms: now_ms(),
                updated_ms: now_ms(),
                passwords,
            }));
        }
        for old in previous {
            if old != crate::ADMIN_TOKEN && !tokens.iter().any(|t| &t.name == old) {
                writes.push(AccessWrite::DeleteToken(old.clone()));
                writes.push(AccessWrite::DeleteScopeMap(format!("synced-{old}")));
            }
        }
        self.meta.apply(&writes).await?;
        self.changed();
        Ok(())
    }

    /// Names of connected registries whose sync token is `token`.
    /// Refuses an edit made through the plain scope-map commands (new `rules`, or `None` for
    /// a deletion) that would break a connected registry: a sync scope map changes only with
    /// `permissions update` (which keeps parents and children in step) and goes with its
    /// registry, and a ReadOnly registry's client tokens may only read.
    pub(crate) async fn check_scope_map_use(
        &self,
        scope_map: &str,
        old: &[String],
        rules: Option<&[String]>,
    ) -> Result<()> {
        let all = self.meta.connected_registries().await?;
        for r in &all {
            let uses = self
                .meta
                .token(&r.sync_token)
                .await?
                .is_some_and(|t| t.scope_map.as_deref() == Some(scope_map));
            // Removing gateway rights of registries that no longer exist (what a deletion
            // without --cleanup leaves, and its remaining steps remove) breaks nothing.
            let only_stale_gateway_removed = rules.is_some_and(|new| {
                new.iter().all(|a| old.contains(a))
                    && old.iter().filter(|a| !new.contains(a)).all(|a| {
                        matches!(Rule::parse(a), Ok(Rule::Gateway(g, _)) if !all.iter().any(|x| x.name == g))
                    })
            });
            if uses && !only_stale_gateway_removed {
                return Err(ControlError::Invalid(match rules {
                    None => format!(
                        "scope map {scope_map:?} is the sync scope map of connected registry {:?}; it is removed with the registry (`outpost connected-registry delete -n {} --cleanup`)",
                        r.name, r.name
                    ),
                    Some(_) => format!(
                        "scope map {scope_map:?} is the sync scope map of connected registry {:?}; change its repositories with `outpost connected-registry permissions update -n {}`, which keeps its parents and children in step",
                        r.name, r.name
                    ),
                }));
            }
        }
        let Some(rules) = rules else { return Ok(()) };
        let writes = write_rules(rules);
        if writes.is_empty() {
            return Ok(());
        }
        for r in all.iter().filter(|r| r.mode == Mode::ReadOnly.as_str()) {
            for t in &r.client_tokens {
                let uses = self
                    .meta
                    .token(t)
                    .await?
                    .is_some_and(|t| t.scope_map.as_deref() == Some(scope_map));
                if uses {
                    return Err(ControlError::Invalid(format!(
                        "scope map {scope_map:?} belongs to client token {t:?} of connected registry {:?}, which is ReadOnly: its client tokens may only read, so {} cannot be added",
                        r.name,
                        writes.join(", ")
                    )));
                }
            }
        }
        Ok(())
    }

    /// Refuses pointing `token` at `scope_map` when that would break a connected registry:
    /// a sync token keeps the scope map its registry manages, and a ReadOnly registry's client
    /// token may only read.
    pub(crate) async fn check_token_scope_change(
        &self,
        token: &str,
        scope_map: &str,
    ) -> Result<()> {
        if let Some(cr) = self.registry_of_sync_token(token).await? {
            return Err(ControlError::Invalid(format!(
                "token {token:?} is the sync token of connected registry {cr:?}; its scope map is managed by the registry (`outpost connected-registry permissions update -n {cr}`)"
            )));
        }
        let rules = self
            .meta
            .scope_map(scope_map)
            .await?
            .map(|m| m.actions)
            .unwrap_or_default();
        let writes = write_rules(&rules);
        if writes.is_empty() {
            return Ok(());
        }
        for r in self.registries_with_client_token(token).await? {
            if r.mode == Mode::ReadOnly.as_str() {
                return Err(ControlError::Invalid(format!(
                    "token {token:?} is a client token of connected registry {:?}, which is ReadOnly: its client tokens may only read, and scope map {scope_map:?} grants {}",
                    r.name,
                    writes.join(", ")
                )));
            }
        }
        Ok(())
    }

    /// Connected registries that list `token` among their client tokens.
    pub(crate) async fn registries_with_client_token(
        &self,
        token: &str,
    ) -> Result<Vec<ConnectedRegistryRow>> {
        Ok(self
            .meta
            .connected_registries()
            .await?
            .into_iter()
            .filter(|r| r.client_tokens.iter().any(|t| t == token))
            .collect())
    }

    pub(crate) async fn registry_of_sync_token(&self, token: &str) -> Result<Option<String>> {
        Ok(self
            .meta
            .connected_registries()
            .await?
            .into_iter()
            .find(|r| r.sync_token == token)
            .map(|r| r.name))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(
            parse_duration("w", "PT4H").unwrap(),
            Duration::from_secs(4 * 3600)
        );
        assert_eq!(
            parse_duration("w", "P2D").unwrap(),
            Duration::from_secs(2 * 86_400)
        );
        assert_eq!(
            parse_duration("w", "P1DT2H30M").unwrap(),
            Duration::from_secs(95_400)
        );
        assert_eq!(
            parse_duration("w", "P1W").unwrap(),
            Duration::from_secs(7 * 86_400)
        );
        assert!(parse_duration("w", "P1M").is_err());
        assert!(parse_duration("w", "4 hours").is_err());
        assert!(parse_duration("w", "-PT1H").is_err());
    }

    #[test]
    fn next_scheduled_run() {
        // Every minute: within a minute from now.
        let d = time_until_next("* * * * *").unwrap();
        assert!(d <= Duration::from_secs(60), "{d:?}");
        // Daily: within a day.
        let d = time_until_next("0 0 * * *").unwrap();
        assert!(d <= Duration::from_secs(86_400), "{d:?}");
        assert_eq!(time_until_next("not cron"), None);
        assert_eq!(
            time_until_next("0 0 30 2 *"),
            None,
            "February 30th never comes"
        );
    }

    #[test]
    fn windows_with_fixed_clocks() {
        let t = |s: &str| s.parse::<jiff::Timestamp>().unwrap();
        assert_eq!(
            window_at("* * * * *", None, t("2026-11-28T10:00:00Z")).unwrap(),
            Window::Continuous
        );
        // Daily at 12:00 for four hours.
        let w = |now: &str| window_at("0 12 * * *", Some("PT4H"), t(now)).unwrap();
        assert_eq!(
            w("2026-11-28T11:59:59Z"),
            Window::Closed {
                opens: t("2026-11-28T12:00:00Z")
            }
        );
        assert_eq!(
            w("2026-11-28T12:00:00Z"),
            Window::Open {
                until: t("2026-11-28T16:00:00Z")
            }
        );
        assert_eq!(
            w("2026-11-28T15:59:59Z"),
            Window::Open {
                until: t("2026-11-28T16:00:00Z")
            }
        );
        assert_eq!(
            w("2026-11-28T16:00:00Z"),
            Window::Closed {
                opens: t("2026-11-29T12:00:00Z")
            }
        );
        // A window longer than the gap between occurrences stays open across them.
        let every = |now: &str| window_at("0 * * * *", Some("PT2H"), t(now)).unwrap();
        assert_eq!(
            every("2026-11-28T10:30:00Z"),
            Window::Open {
                until: t("2026-11-28T12:00:00Z")
            }
        );
    }

    #[test]
    fn schedules() {
        assert!(parse_schedule("s", "* * * * *").is_ok());
        assert!(parse_schedule("s", "0 12 * * *").is_ok());
        assert!(parse_schedule("s", "*/15 2-4 * * MON-FRI").is_ok());
        assert!(parse_schedule("s", "0 12 * *").is_err());
        assert!(parse_schedule("s", "0 0 12 * * *").is_err(), "six fields");
        for (bad, why) in [
            ("61 * * * *", "the minute 61 is out of range (0-59)"),
            ("0 24 * * *", "the hour 24 is out of range (0-23)"),
            ("0 0 0 * *", "the day of month 0 is out of range (1-31)"),
            ("0 0 1 1-13 *", "the month 13 is out of range (1-12)"),
            ("0 0 * * 8", "the day of week 8 is out of range (0-7)"),
            ("*/90 * * * *", "the minute step /90 is out of range (1-59)"),
        ] {
            let e = parse_schedule("s", bad).unwrap_err().to_string();
            assert!(e.contains(why), "{bad}: {e}");
        }
        let e = parse_schedule("sync schedule", "nope")
            .unwrap_err()
            .to_string();
        assert!(e.contains("five-field cron"), "{e}");
        for never in ["0 0 31 2 *", "0 0 30 2 *"] {
            let e = parse_schedule("sync schedule", never)
                .unwrap_err()
                .to_string();
            assert!(e.contains("never occurs"), "{never}: {e}");
        }
        assert!(parse_schedule("s", "0 0 29 2 *").is_ok(), "leap days come");
    }

    #[test]
    fn names_and_levels() {
        assert!(validate_name("site-01").is_ok());
        assert!(validate_name("line_a").is_ok());
        assert!(validate_name("Site1").is_err());
        assert!(validate_name("1site").is_err());
        assert!(validate_name("abcd").is_err());
        assert!(validate_name(&"a".repeat(51)).is_err());
        assert_eq!(normalize_log_level("information").unwrap(), "Information");
        assert!(normalize_log_level("verbose").is_err());
        assert!(check_notification("hello-world:*:*").is_ok());
        assert!(check_notification("app@sha256:abc:push").is_ok());
        assert!(check_notification("app").is_err());
        assert!(check_notification_count(100).is_ok());
        let e = check_notification_count(101).unwrap_err().to_string();
        assert!(e.contains("at most 100"), "{e}");
    }
}
