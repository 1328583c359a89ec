//! Notifications, ACR's `notificationsList`: a connected registry's patterns
//! `<repository>[:<tag>][@<digest>]:<push|delete|*>` (`*` matches anything within its part),
//! the notifications a connected registry makes from its own event log when an event matches,
//! and what a parent does with them: an intermediate node passes them up, the root keeps them
//! (for [`KEEP`]) and lists them per registry. The sync crate does the matching and sending;
//! this module owns the patterns, the wire types and the parent's side.

use crate::{Control, ControlError, Result, now_ms, rfc3339};
use outpost_meta::{
    EVENT_MANIFEST_DELETED, EVENT_MANIFEST_PUT, EVENT_REPOSITORY_DELETED, EVENT_TAG_REMOVED,
    EVENT_TAG_SET, Event, NotificationRow,
};
use serde::{Deserialize, Serialize};
use std::time::Duration;

/// How long the root keeps a notification it received.
pub const KEEP: Duration = Duration::from_secs(30 * 86_400);

/// The most notifications one call may carry.
pub const MAX_BATCH: usize = 500;

/// One notification, as a connected registry sends it up.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Notification {
    /// Unique per sender: `<instance id>:<event number>`. A resent one is stored once.
    pub id: String,
    /// When it happened at the connected registry (RFC 3339).
    pub time: String,
    /// `push` or `delete`.
    pub action: String,
    pub repository: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tag: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub digest: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub media_type: Option<String>,
}

/// The body of `POST /gateway/v1/<name>/notifications`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct NotificationBatch {
    /// The sending instance; only the active instance's notifications are taken.
    pub instance_id: String,
    pub notifications: Vec<Notification>,
}

/// A notification kept at the root, as `GET /api/v1/connected-registries/<name>/notifications`
/// lists it.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct NotificationView {
    /// Position in this registry's list: ask for `after=<seq>` to read on.
    pub seq: i64,
    pub connected_registry: String,
    pub received_time: String,
    #[serde(flatten)]
    pub notification: Notification,
}

/// A parsed notification pattern.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NotificationPattern {
    repository: String,
    tag: Option<String>,
    digest: Option<String>,
    action: String,
}

impl NotificationPattern {
    pub fn parse(s: &str) -> Result<NotificationPattern> {
        let bad = |why: &str| {
            ControlError::Invalid(format!(
                "notification {s:?} is not of the form <repository>[:<tag>][@<digest>]:<push|delete|*>{why}"
            ))
        };
        let (artifact, action) = s.rsplit_once(':').ok_or_else(|| bad(""))?;
        if !matches!(action, "push" | "delete" | "*") {
            return Err(bad(" (the action is push, delete or *)"));
        }
        let (name_tag, digest) = match artifact.split_once('@') {
            Some((a, d)) => (a, Some(d)),
            None => (artifact, None),
        };
        let (repository, tag) = match name_tag.split_once(':') {
            Some((r, t)) => (r, Some(t)),
            None => (name_tag, None),
        };
        let part_ok = |p: &str, extra: &str| {
            !p.is_empty()
                && p.len() <= 256
                && p.chars()
                    .all(|c| c.is_ascii_alphanumeric() || "*._-".contains(c) || extra.contains(c))
        };
        if !part_ok(repository, "/") || repository.chars().any(|c| c.is_ascii_uppercase()) {
            return Err(bad(
                " (the repository part is a lowercase name, `*` allowed)",
            ));
        }
        if tag.is_some_and(|t| !part_ok(t, "")) {
            return Err(bad(" (the tag part has a tag's characters, `*` allowed)"));
        }
        if digest.is_some_and(|d| !part_ok(d, ":+=")) {
            return Err(bad(
                " (the digest part looks like sha256:<hex>, `*` allowed)",
            ));
        }
        Ok(NotificationPattern {
            repository: repository.into(),
            tag: tag.map(String::from),
            digest: digest.map(String::from),
            action: action.into(),
        })
    }

    /// Whether `n` matches: the action, the repository, and the tag and digest parts if the
    /// pattern has them (a tag part matches only notifications about a tag).
    pub fn matches(&self, n: &Notification) -> bool {
        let part = |p: &Option<String>, v: &Option<String>| match (p, v) {
            (None, _) => true,
            (Some(p), Some(v)) => glob(p, v),
            (Some(_), None) => false,
        };
        (self.action == "*" || self.action == n.action)
            && glob(&self.repository, &n.repository)
            && part(&self.tag, &n.tag)
            && part(&self.digest, &n.digest)
    }
}

/// What is wrong with one notification a connected registry sent, if anything: every field is
/// what the registry's own events hold (a repository name, a tag, a digest, an RFC 3339 time),
/// so nothing else reaches the root's list, log or webhook. Values are quoted shortened.
fn check_notification(n: &Notification) -> std::result::Result<(), String> {
    let printable = |what: &str, v: &str, max: usize| {
        if v.is_empty() || v.len() > max || v.chars().any(char::is_control) {
            Err(format!(
                "{what} {:?} must be 1 to {max} bytes with no control characters",
                shorten(v)
            ))
        } else {
            Ok(())
        }
    };
    printable("id", &n.id, 256)?;
    if !matches!(n.action.as_str(), "push" | "delete") {
        return Err(format!(
            "action {:?} is not push or delete",
            shorten(&n.action)
        ));
    }
    crate::parse_rfc3339(&n.time)
        .map_err(|_| format!("time {:?} is not an RFC 3339 time", shorten(&n.time)))?;
    n.repository
        .parse::<outpost_oci::RepoName>()
        .map_err(|e| format!("repository {:?}: {e}", shorten(&n.repository)))?;
    if let Some(t) = &n.tag {
        t.parse::<outpost_oci::Tag>()
            .map_err(|e| format!("tag {:?}: {e}", shorten(t)))?;
    }
    if let Some(d) = &n.digest {
        d.parse::<outpost_oci::Digest>()
            .map_err(|e| format!("digest {:?}: {e}", shorten(d)))?;
    }
    if let Some(m) = &n.media_type {
        printable("mediaType", m, 255)?;
    }
    Ok(())
}

/// At most 64 characters of `v`, for messages that quote what a client sent.
fn shorten(v: &str) -> String {
    match v.char_indices().nth(64) {
        Some((i, _)) => format!("{}…", &v[..i]),
        None => v.to_string(),
    }
}

/// `*` matches any run of characters (also `/`); everything else matches itself. Written here
/// because patterns have nothing else (no classes, no escapes) and the inputs are short.
fn glob(pattern: &str, text: &str) -> bool {
    let mut parts = pattern.split('*');
    let first = parts.next().unwrap_or("");
    let Some(mut rest) = text.strip_prefix(first) else {
        return false;
    };
    let parts: Vec<&str> = parts.collect();
    let Some((last, middle)) = parts.split_last() else {
        return rest.is_empty(); // no `*`: an exact match
    };
    for p in middle {
        match rest.find(p) {
            Some(i) => rest = &rest[i + p.len()..],
            None => return false,
        }
    }
    rest.len() >= last.len() && rest.ends_with(last)
}

/// The notification event `e` of this registry makes, if it is one (`instance` makes the id
/// unique). A manifest put together with a tag is one push: the caller skips the
/// `manifest_put` that `tagged_next` says the next event tags.
pub fn from_event(e: &Event, instance: &str) -> Option<Notification> {
    let action = match e.kind.as_str() {
        EVENT_MANIFEST_PUT | EVENT_TAG_SET => "push",
        EVENT_MANIFEST_DELETED | EVENT_TAG_REMOVED | EVENT_REPOSITORY_DELETED => "delete",
        _ => return None,
    };
    Some(Notification {
        id: format!("{instance}:{}", e.seq),
        time: rfc3339(e.at_ms),
        action: action.into(),
        repository: e.repo.clone(),
        tag: e.tag.clone(),
        digest: e.digest.clone(),
        media_type: e.media_type.clone(),
    })
}

/// Whether `next` tags the manifest `e` put (both written by one push with a tag).
pub fn tagged_next(e: &Event, next: &Event) -> bool {
    e.kind == EVENT_MANIFEST_PUT
        && next.kind == EVENT_TAG_SET
        && next.repo == e.repo
        && next.digest == e.digest
        && next.seq == e.seq + 1
}

impl Control {
    /// Takes the notifications connected registry `name` sent (from its active instance only).
    /// The root keeps them; an intermediate node passes them up and fails with
    /// [`ControlError::Unavailable`] while its own parent is away, so the sender keeps them and
    /// tries again. Returns how many were new here (all of them, when passed up).
    pub async fn receive_notifications(
        &self,
        name: &str,
        mut batch: NotificationBatch,
    ) -> Result<u64> {
        if batch.notifications.len() > MAX_BATCH {
            return Err(ControlError::Invalid(format!(
                "{} notifications in one call; send at most {MAX_BATCH}",
                batch.notifications.len()
            )));
        }
        for (i, n) in batch.notifications.iter().enumerate() {
            check_notification(n).map_err(|why| {
                ControlError::Invalid(format!("notification {i} of the batch: {why}"))
            })?;
        }
        let row = self.registry_row(name).await?;
        if row.activation != "Active" || row.instance_id.as_deref() != Some(&batch.instance_id) {
            return Err(ControlError::NotActive(format!(
                "instance {:?} is not the active instance of connected registry {name:?}",
                shorten(&batch.instance_id)
            )));
        }
        // A registry's events are about what it syncs: notifications about any other
        // repository are neither kept nor passed up, whatever an instance sends.
        let scope: Vec<crate::RepoPattern> = self
            .repositories_of(&row)
            .await?
            .iter()
            .filter_map(|p| crate::RepoPattern::parse(p).ok())
            .collect();
        let sent = batch.notifications.len();
        batch
            .notifications
            .retain(|n| scope.iter().any(|p| p.matches(&n.repository)));
        if batch.notifications.len() < sent {
            tracing::warn!(
                connected_registry = name,
                dropped = sent - batch.notifications.len(),
                "dropped notifications about repositories this connected registry does not sync"
            );
        }
        let upstream = self
            .upstream
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        if let Some(up) = upstream {
            up.notify(name, &batch).await?;
            return Ok(batch.notifications.len() as u64);
        }
        let rows: Vec<NotificationRow> = batch
            .notifications
            .iter()
            .map(|n| NotificationRow {
                registry: name.into(),
                id: n.id.clone(),
                time: n.time.clone(),
                action: n.action.clone(),
                repository: n.repository.clone(),
                tag: n.tag.clone(),
                digest: n.digest.clone(),
                media_type: n.media_type.clone(),
                ..Default::default()
            })
            .collect();
        let inserted = self.meta.insert_notifications(&rows).await?;
        let new = inserted.iter().filter(|i| **i).count() as u64;
        for (n, _) in batch
            .notifications
            .iter()
            .zip(&inserted)
            .filter(|(_, inserted)| **inserted)
        {
            tracing::info!(
                target: "outpost::notifications",
                connected_registry = name,
                action = %n.action,
                repository = %n.repository,
                tag = n.tag.as_deref().unwrap_or(""),
                digest = n.digest.as_deref().unwrap_or(""),
                time = %n.time,
                "notification"
            );
        }
        Ok(new)
    }

    /// The notifications kept for `name` after position `after`, oldest first, at most `limit`
    /// (1–1000).
    pub async fn notifications(
        &self,
        name: &str,
        after: i64,
        limit: u32,
    ) -> Result<Vec<NotificationView>> {
        self.registry_row(name).await?;
        let rows = self
            .meta
            .notifications(name, after, limit.clamp(1, 1000))
            .await?;
        Ok(rows.into_iter().map(view).collect())
    }

    /// The notifications of every registry after position `after`, oldest first, at most
    /// `limit` (what a webhook delivers).
    pub async fn all_notifications(&self, after: i64, limit: u32) -> Result<Vec<NotificationView>> {
        let rows = self
            .meta
            .all_notifications(after, limit.clamp(1, 1000))
            .await?;
        Ok(rows.into_iter().map(view).collect())
    }

    /// Whether this replica may deliver a batch of notifications now: `Some(hold)` (keep it
    /// until the batch is delivered and its cursor recorded), or `None` while another replica
    /// sharing the database delivers. A lone node always may (`Some(None)`).
    pub async fn delivery_turn(&self) -> Result<Option<Option<outpost_meta::ClusterGate>>> {
        Ok(self
            .meta
            .try_cluster_lock(outpost_meta::ClusterLock::Webhook)
            .await?)
    }

    /// Whether replicas share this node's database (then the webhook cursor moves under other
    /// replicas too, and is read again at each turn).
    pub fn shares_database(&self) -> bool {
        self.meta.backend() == outpost_meta::Backend::Postgres
    }

    /// Where delivery to the webhook at `url` stands: the last position delivered. Set to the
    /// newest notification the first time it is asked for, so a new URL starts with what
    /// comes next, not with the 30 days kept.
    pub async fn webhook_cursor(&self, url: &str) -> Result<i64> {
        let name = webhook_cursor_name(url);
        if let Some(c) = self.meta.log_state(&name).await? {
            return Ok(c);
        }
        let latest = self.meta.latest_notification().await?;
        self.meta.set_log_state(&name, latest).await?;
        Ok(latest)
    }

    /// Records that notifications up to `seq` were delivered to `url`.
    pub async fn set_webhook_cursor(&self, url: &str, seq: i64) -> Result<()> {
        Ok(self
            .meta
            .set_log_state(&webhook_cursor_name(url), seq)
            .await?)
    }

    /// Deletes the notifications received more than [`KEEP`] ago; returns how many.
    pub async fn prune_notifications(&self) -> Result<u64> {
        let before = now_ms().saturating_sub(KEEP.as_millis() as i64);
        Ok(self.meta.prune_notifications(before).await?)
    }
}

/// The `log_state` entry of delivery to the webhook at `url` (named by a hash of the URL, which
/// may hold a token in its query).
fn webhook_cursor_name(url: &str) -> String {
    let hex = outpost_oci::Digest::sha256_of(url.as_bytes())
        .hex()
        .to_string();
    format!("webhook_delivered:{}", &hex[..16])
}

fn view(r: NotificationRow) -> NotificationView {
    NotificationView {
        seq: r.seq,
        connected_registry: r.registry,
        received_time: rfc3339(r.received_ms),
        notification: Notification {
            id: r.id,
            time: r.time,
            action: r.action,
            repository: r.repository,
            tag: r.tag,
            digest: r.digest,
            media_type: r.media_type,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn n(action: &str, repo: &str, tag: Option<&str>, digest: Option<&str>) -> Notification {
        Notification {
            id: "i:1".into(),
            time: "2026-11-28T00:00:00Z".into(),
            action: action.into(),
            repository: repo.into(),
            tag: tag.map(String::from),
            digest: digest.map(String::from),
            media_type: None,
        }
    }

    #[test]
    fn globs() {
        assert!(glob("*", ""));
        assert!(glob("*", "a/b"));
        assert!(glob("app", "app"));
        assert!(!glob("app", "apps"));
        assert!(glob("path/to/*", "path/to/repo"));
        assert!(!glob("path/to/*", "path/other"));
        assert!(glob("*-prod", "web-prod"));
        assert!(!glob("*-prod", "web-prod-2"));
        assert!(glob("a*b*c", "a-b-b-c"));
        assert!(!glob("ab*ba", "aba"), "the parts may not overlap");
        assert!(glob("sha256:*", "sha256:abc"));
    }

    #[test]
    fn acr_examples_parse_and_match() {
        let push_tag = n("push", "hello-world", Some("1.0"), Some("sha256:aa"));
        let push_digest = n("push", "hello-world", None, Some("sha256:aa"));
        let delete_tag = n("delete", "hello-world", Some("1.0"), Some("sha256:aa"));
        let repo_gone = n("delete", "hello-world", None, None);
        let other = n("push", "path/to/repo", Some("v1"), Some("sha256:bb"));
        let m = |p: &str, x: &Notification| NotificationPattern::parse(p).unwrap().matches(x);

        // Everything.
        for x in [&push_tag, &push_digest, &delete_tag, &repo_gone, &other] {
            assert!(m("*:*", x));
        }
        // All tags: only notifications about a tag.
        assert!(m("*:*:*", &push_tag) && m("*:*:*", &delete_tag));
        assert!(!m("*:*:*", &push_digest) && !m("*:*:*", &repo_gone));
        // All digests: everything that names a manifest.
        assert!(m("*@*:*", &push_digest) && m("*@*:*", &push_tag));
        assert!(!m("*@*:*", &repo_gone));
        // A repository, a tag, an action.
        assert!(m("hello-world:1.0:delete", &delete_tag));
        assert!(!m("hello-world:1.0:delete", &push_tag));
        assert!(m("hello-world@sha256:aa:push", &push_digest));
        assert!(!m("hello-world@sha256:bb:push", &push_digest));
        assert!(m(
            "path/to/repo/*:push",
            &n("push", "path/to/repo/x", None, None)
        ));
        assert!(
            !m("path/to/repo/*:push", &other),
            "the prefix needs the slash"
        );
        assert!(m("path/to/repo:*", &other));
        assert!(!m("hello-world:*", &other));
    }

    #[test]
    fn bad_patterns_are_refused_with_the_form() {
        for p in [
            "app",
            "app:pull",
            ":push",
            "App:push",
            "app::push",
            "app@:push",
            "app:v 1:push",
            "app;rm:push",
        ] {
            let e = NotificationPattern::parse(p).unwrap_err().to_string();
            assert!(e.contains("<repository>[:<tag>][@<digest>]"), "{p}: {e}");
        }
    }
}
