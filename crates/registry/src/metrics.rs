//! Prometheus metrics of one node. Every part records into the [`Metrics`] its [`Registry`]
//! carries: the server the requests it answers, garbage collection its runs, sync (on a
//! connected registry) its connection, lag and outbox; the server renders them, with the
//! health of the connected registries below this node, at `/metrics` in the OpenMetrics text
//! format.
//!
//! `prometheus-client` rather than the `metrics` facade: an explicit registry passed where it
//! is needed, typed label sets with no allocation per request, and no recorder to install or
//! upkeep task to run. Labels never carry repository or token names (unbounded, and not for
//! an unauthenticated endpoint); connected-registry names appear only in the fleet gauges.
//!
//! [`Registry`]: crate::Registry

use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use std::time::Duration;

/// What kind of request an HTTP request was, by its path (a bounded set).
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq, EncodeLabelValue)]
#[allow(non_camel_case_types)] // label values as Prometheus users write them
pub enum Route {
    base,
    manifest,
    blob,
    upload,
    tags,
    catalog,
    referrers,
    token,
    api,
    gateway,
    probe,
    metrics,
    other,
}

impl Route {
    /// Classifies a request path.
    pub fn of(path: &str) -> Route {
        if let Some(rest) = path.strip_prefix("/v2/") {
            if rest.is_empty() {
                Route::base
            } else if rest == "_catalog" {
                Route::catalog
            } else if rest.contains("/blobs/uploads") {
                Route::upload
            } else if rest.contains("/blobs/") {
                Route::blob
            } else if rest.contains("/manifests/") {
                Route::manifest
            } else if rest.ends_with("/tags/list") {
                Route::tags
            } else if rest.contains("/referrers/") {
                Route::referrers
            } else {
                Route::other
            }
        } else if path == "/v2" {
            Route::base
        } else if path.starts_with("/api/") {
            Route::api
        } else if path.starts_with("/gateway/") {
            Route::gateway
        } else if path.starts_with("/token") || path.starts_with("/oauth2/") {
            Route::token
        } else if path == "/healthz" || path == "/readyz" {
            Route::probe
        } else if path == "/metrics" {
            Route::metrics
        } else {
            Route::other
        }
    }
}

#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq, EncodeLabelValue)]
pub enum Method {
    GET,
    HEAD,
    PUT,
    POST,
    PATCH,
    DELETE,
    OTHER,
}

impl Method {
    pub fn of(m: &str) -> Method {
        match m {
            "GET" => Method::GET,
            "HEAD" => Method::HEAD,
            "PUT" => Method::PUT,
            "POST" => Method::POST,
            "PATCH" => Method::PATCH,
            "DELETE" => Method::DELETE,
            _ => Method::OTHER,
        }
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    route: Route,
    method: Method,
    code: u64,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RouteLabels {
    route: Route,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct FleetLabels {
    name: String,
}

/// One connected registry below this node, as the fleet gauges show it.
#[derive(Debug, Clone, Default)]
pub struct FleetMember {
    pub name: String,
    /// Online or syncing (not offline, unhealthy or inactive).
    pub up: bool,
    pub last_sync_unix: Option<i64>,
    pub cursor_lag: Option<i64>,
    pub outbox_depth: Option<i64>,
    /// When it was last heard from (any status report: every poll of a continuous sync).
    pub last_activity_unix: Option<i64>,
}

/// Counts the bytes of a response body as they go out ([`Metrics::response_body`]).
#[derive(Clone)]
pub struct SentBytes(Counter);

impl SentBytes {
    pub fn add(&self, n: usize) {
        self.0.inc_by(n as u64);
    }
}

/// A node's own state as its metrics hold it ([`Metrics::snapshot`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Snapshot {
    pub connected_registry: bool,
    pub parent_connected: bool,
    pub last_sync_success_unix: Option<i64>,
    pub cursor_lag: i64,
    pub outbox_depth: i64,
    pub sync_failures: u64,
    pub gc_last_run_unix: Option<i64>,
    pub gc_blobs_removed: u64,
    pub gc_bytes_freed: u64,
}

/// The node's metrics. Cheap to clone (every field is shared).
#[derive(Clone)]
pub struct Metrics {
    registry: std::sync::Arc<prometheus_client::registry::Registry>,
    /// The `sync_*` metrics, rendered only on a connected registry.
    sync_registry: std::sync::Arc<prometheus_client::registry::Registry>,
    is_connected_registry: std::sync::Arc<std::sync::atomic::AtomicBool>,
    requests: Family<RequestLabels, Counter>,
    duration: Family<RouteLabels, Histogram>,
    request_bytes: Family<RouteLabels, Counter>,
    response_bytes: Family<RouteLabels, Counter>,
    upload_bytes: Counter,
    blobs_damaged: Counter,
    blobs_repaired: Counter,
    gc_runs: Counter,
    gc_blobs: Counter,
    gc_bytes: Counter,
    gc_last: Gauge,
    sync_connected: Gauge,
    sync_last_success: Gauge,
    /// When the last successful sync was last written to the database (not rendered).
    sync_last_persisted: Gauge,
    sync_lag: Gauge,
    sync_outbox: Gauge,
    sync_failures: Counter,
    sync_skipped: Gauge,
    events_pruned: Counter,
    notifications: Counter,
    webhook_delivered: Counter,
    webhook_failures: Counter,
    password_checks: Counter,
    password_checks_queued: Gauge,
    /// Serializes [`Metrics::set_password_checks`], which moves a counter up to a total.
    password_checks_seen: std::sync::Arc<std::sync::Mutex<()>>,
    /// The codes of this connected registry's own current status details (what it reports
    /// to its parent), for its status page.
    sync_problems: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
    fleet_up: Family<FleetLabels, Gauge>,
    fleet_last_sync: Family<FleetLabels, Gauge>,
    fleet_lag: Family<FleetLabels, Gauge>,
    fleet_outbox: Family<FleetLabels, Gauge>,
    fleet_activity: Family<FleetLabels, Gauge>,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

impl Metrics {
    pub fn new() -> Metrics {
        let mut r = prometheus_client::registry::Registry::with_prefix("outpost");
        let mut sync = prometheus_client::registry::Registry::with_prefix("outpost");
        let m = Metrics {
            registry: std::sync::Arc::default(),
            sync_registry: std::sync::Arc::default(),
            is_connected_registry: std::sync::Arc::default(),
            requests: Family::default(),
            // 0.5 ms … ~131 s, ×4 a step.
            duration: Family::new_with_constructor(|| {
                Histogram::new(exponential_buckets(0.0005, 4.0, 10))
            }),
            request_bytes: Family::default(),
            response_bytes: Family::default(),
            upload_bytes: Counter::default(),
            blobs_damaged: Counter::default(),
            blobs_repaired: Counter::default(),
            gc_runs: Counter::default(),
            gc_blobs: Counter::default(),
            gc_bytes: Counter::default(),
            gc_last: Gauge::default(),
            sync_connected: Gauge::default(),
            sync_last_success: Gauge::default(),
            sync_last_persisted: Gauge::default(),
            sync_lag: Gauge::default(),
            sync_outbox: Gauge::default(),
            sync_failures: Counter::default(),
            sync_skipped: Gauge::default(),
            events_pruned: Counter::default(),
            notifications: Counter::default(),
            webhook_delivered: Counter::default(),
            webhook_failures: Counter::default(),
            password_checks: Counter::default(),
            password_checks_queued: Gauge::default(),
            password_checks_seen: std::sync::Arc::default(),
            sync_problems: Default::default(),
            fleet_up: Family::default(),
            fleet_last_sync: Family::default(),
            fleet_lag: Family::default(),
            fleet_outbox: Family::default(),
            fleet_activity: Family::default(),
        };
        r.register(
            "http_requests",
            "HTTP requests answered, by route, method and status code",
            m.requests.clone(),
        );
        r.register(
            "http_request_duration_seconds",
            "Time to the response headers, by route (a blob's body streams after)",
            m.duration.clone(),
        );
        r.register(
            "http_request_body_bytes",
            "Bytes of request bodies with a declared length, by route",
            m.request_bytes.clone(),
        );
        r.register(
            "http_response_body_bytes",
            "Bytes of response bodies sent, by route (what a client that stops reading never got is not counted)",
            m.response_bytes.clone(),
        );
        r.register(
            "upload_received_bytes",
            "Bytes received into upload sessions: client pushes, and blobs a connected registry fetches from its parent",
            m.upload_bytes.clone(),
        );
        r.register(
            "blobs_damaged",
            "Reads that found a linked blob missing from the store or of the wrong size (storage damage)",
            m.blobs_damaged.clone(),
        );
        r.register("gc_runs", "Garbage collections run", m.gc_runs.clone());
        r.register(
            "gc_blobs_removed",
            "Blobs removed by garbage collection (with orphaned files)",
            m.gc_blobs.clone(),
        );
        r.register(
            "gc_freed_bytes",
            "Bytes freed by garbage collection",
            m.gc_bytes.clone(),
        );
        r.register(
            "gc_last_run_timestamp_seconds",
            "When garbage collection last finished (Unix time)",
            m.gc_last.clone(),
        );
        sync.register(
            "sync_parent_connected",
            "1 while this connected registry's last exchange with its parent succeeded (0 while the parent is unreachable or refuses it: a rejected password, a deactivated registry)",
            m.sync_connected.clone(),
        );
        sync.register(
            "sync_last_success_timestamp_seconds",
            "When this connected registry last completed a sync (Unix time)",
            m.sync_last_success.clone(),
        );
        sync.register(
            "sync_cursor_lag_messages",
            "Messages of the parent's feed this connected registry has yet to apply",
            m.sync_lag.clone(),
        );
        sync.register(
            "sync_outbox_depth",
            "Local changes this ReadWrite connected registry has yet to send up (a manifest, a tag set or removed, a deletion: a push by tag is two)",
            m.sync_outbox.clone(),
        );
        sync.register(
            "sync_failures",
            "Sync iterations that failed",
            m.sync_failures.clone(),
        );
        sync.register(
            "sync_blobs_repaired",
            "Blobs found damaged in this connected registry's store and fetched again from its parent",
            m.blobs_repaired.clone(),
        );
        sync.register(
            "sync_skipped_manifests",
            "Manifests this connected registry skipped because its parent cannot serve them (retried)",
            m.sync_skipped.clone(),
        );
        r.register(
            "event_log_pruned_events",
            "Events deleted from the event log because no child can ask for them any more",
            m.events_pruned.clone(),
        );
        r.register(
            "notifications_received",
            "Notifications received from connected registries and kept (each one once)",
            m.notifications.clone(),
        );
        r.register(
            "notifications_delivered",
            "Notifications delivered to the configured webhook (notification_url)",
            m.webhook_delivered.clone(),
        );
        r.register(
            "notification_delivery_failures",
            "Webhook deliveries that failed (each is retried)",
            m.webhook_failures.clone(),
        );
        r.register(
            "password_checks",
            "Argon2 password checks that logins with Basic credentials cost (an unknown name or a wrong password costs two; a login verified in the last minutes none): a steep rise is a password flood",
            m.password_checks.clone(),
        );
        r.register(
            "password_checks_queued",
            "Password checks waiting for a thread (one thread per core runs them)",
            m.password_checks_queued.clone(),
        );
        r.register(
            "connected_registry_up",
            "1 if a connected registry below this node is online or syncing",
            m.fleet_up.clone(),
        );
        r.register(
            "connected_registry_last_sync_timestamp_seconds",
            "When a connected registry below this node last reported a completed sync (Unix time)",
            m.fleet_last_sync.clone(),
        );
        r.register(
            "connected_registry_cursor_lag_messages",
            "Messages a connected registry below this node had yet to apply, as it reported",
            m.fleet_lag.clone(),
        );
        r.register(
            "connected_registry_outbox_depth",
            "Local changes a connected registry below this node had yet to send up, as it reported (a push by tag is two: the manifest and the tag)",
            m.fleet_outbox.clone(),
        );
        r.register(
            "connected_registry_last_activity_timestamp_seconds",
            "When a connected registry below this node was last heard from (Unix time)",
            m.fleet_activity.clone(),
        );
        Metrics {
            registry: std::sync::Arc::new(r),
            sync_registry: std::sync::Arc::new(sync),
            ..m
        }
    }

    /// Records one answered request.
    pub fn request(
        &self,
        route: Route,
        method: Method,
        code: u16,
        took: Duration,
        request_bytes: Option<u64>,
        response_bytes: Option<u64>,
    ) {
        self.requests
            .get_or_create(&RequestLabels {
                route,
                method,
                code: u64::from(code),
            })
            .inc();
        let l = RouteLabels { route };
        self.duration.get_or_create(&l).observe(took.as_secs_f64());
        if let Some(n) = request_bytes.filter(|n| *n > 0) {
            self.request_bytes.get_or_create(&l).inc_by(n);
        }
        if let Some(n) = response_bytes.filter(|n| *n > 0) {
            self.response_bytes.get_or_create(&l).inc_by(n);
        }
    }

    /// Where the bytes of one response body to `route` are counted as they are sent.
    pub fn response_body(&self, route: Route) -> SentBytes {
        SentBytes(
            self.response_bytes
                .get_or_create(&RouteLabels { route })
                .clone(),
        )
    }

    pub(crate) fn upload_bytes(&self, n: usize) {
        self.upload_bytes.inc_by(n as u64);
    }

    /// Counts a collection; returns its time (Unix seconds).
    pub(crate) fn gc(&self, blobs: u64, bytes: u64) -> i64 {
        self.gc_runs.inc();
        self.gc_blobs.inc_by(blobs);
        self.gc_bytes.inc_by(bytes);
        let now = unix_now();
        self.gc_last.set(now);
        now
    }

    /// The times of the last collection and the last successful sync before a restart.
    pub(crate) fn restore_times(&self, gc_last: Option<i64>, sync_last: Option<i64>) {
        if let Some(t) = gc_last {
            self.gc_last.set(t);
        }
        if let Some(t) = sync_last {
            self.sync_last_success.set(t);
            self.sync_last_persisted.set(t);
        }
    }

    /// Marks this node as a connected registry: the `sync_*` metrics are rendered.
    pub fn sync_started(&self) {
        self.is_connected_registry
            .store(true, std::sync::atomic::Ordering::Relaxed);
    }

    /// A sync iteration that finished without error (applying something or not). Returns
    /// the time when it is due to be recorded (a minute after the time last recorded).
    pub(crate) fn sync_succeeded(&self) -> Option<i64> {
        self.sync_connected.set(1);
        let now = unix_now();
        self.sync_last_success.set(now);
        (now - self.sync_last_persisted.get() >= 60).then(|| {
            self.sync_last_persisted.set(now);
            now
        })
    }

    /// A connected registry's exchange with its parent: `synced` after a completed sync.
    /// Returns the time when it is due to be recorded (see [`Self::sync_succeeded`]).
    pub(crate) fn sync_reported(
        &self,
        synced: bool,
        lag: Option<i64>,
        outbox: Option<i64>,
    ) -> Option<i64> {
        self.sync_connected.set(1);
        let mut due = None;
        if synced {
            let now = unix_now();
            self.sync_last_success.set(now);
            if now - self.sync_last_persisted.get() >= 60 {
                self.sync_last_persisted.set(now);
                due = Some(now);
            }
        }
        if let Some(l) = lag {
            self.sync_lag.set(l);
        }
        if let Some(o) = outbox {
            self.sync_outbox.set(o);
        }
        due
    }

    /// Local changes still to send up, counted whether or not the parent can be told.
    pub fn sync_outbox_depth(&self, depth: i64) {
        self.sync_outbox.set(depth);
    }

    /// How many manifests the connected registry has skipped (its parent cannot serve them).
    pub fn sync_skipped(&self, n: usize) {
        self.sync_skipped.set(i64::try_from(n).unwrap_or(i64::MAX));
    }

    /// A linked blob found missing or damaged in the store.
    pub fn blob_damaged(&self) {
        self.blobs_damaged.inc();
    }

    /// A damaged blob fetched again from the parent.
    pub fn blob_repaired(&self) {
        self.blobs_repaired.inc();
    }

    /// Events pruned from the event log.
    pub fn events_pruned(&self, n: u64) {
        self.events_pruned.inc_by(n);
    }

    /// Notifications from connected registries newly kept here.
    pub fn notifications_received(&self, n: u64) {
        self.notifications.inc_by(n);
    }

    /// Notifications the webhook took.
    pub fn notifications_delivered(&self, n: u64) {
        self.webhook_delivered.inc_by(n);
    }

    /// A webhook delivery that failed (and is retried).
    pub fn notification_delivery_failed(&self) {
        self.webhook_failures.inc();
    }

    /// A failed sync iteration; `reached` says whether the parent answered and took this
    /// registry's requests (a failure of its own, a full disk say, leaves the link up).
    pub fn sync_failed(&self, reached: bool) {
        self.sync_failures.inc();
        if !reached {
            self.sync_connected.set(0);
        }
    }

    /// Replaces the fleet gauges with the connected registries below this node.
    /// Records the password checks run so far (a total that only grows) and those queued now.
    pub fn set_password_checks(&self, total: u64, queued: u64) {
        let _one_at_a_time = self
            .password_checks_seen
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        let seen = self.password_checks.get();
        self.password_checks.inc_by(total.saturating_sub(seen));
        self.password_checks_queued
            .set(i64::try_from(queued).unwrap_or(i64::MAX));
    }

    pub fn set_fleet(&self, members: &[FleetMember]) {
        for f in [
            &self.fleet_up,
            &self.fleet_last_sync,
            &self.fleet_lag,
            &self.fleet_outbox,
            &self.fleet_activity,
        ] {
            f.clear();
        }
        for m in members {
            let l = FleetLabels {
                name: m.name.clone(),
            };
            self.fleet_up.get_or_create(&l).set(i64::from(m.up));
            if let Some(t) = m.last_sync_unix {
                self.fleet_last_sync.get_or_create(&l).set(t);
            }
            if let Some(v) = m.cursor_lag {
                self.fleet_lag.get_or_create(&l).set(v);
            }
            if let Some(v) = m.outbox_depth {
                self.fleet_outbox.get_or_create(&l).set(v);
            }
            if let Some(t) = m.last_activity_unix {
                self.fleet_activity.get_or_create(&l).set(t);
            }
        }
    }

    /// Records the codes of this connected registry's current status details.
    pub fn set_sync_problems(&self, codes: Vec<String>) {
        *self.sync_problems.lock().unwrap_or_else(|p| p.into_inner()) = codes;
    }

    /// The codes [`Self::set_sync_problems`] recorded last.
    pub fn sync_problems(&self) -> Vec<String> {
        self.sync_problems
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// This node's own sync and garbage-collection state, for the status page.
    pub fn snapshot(&self) -> Snapshot {
        let when = |g: &Gauge| Some(g.get()).filter(|t| *t > 0);
        Snapshot {
            connected_registry: self
                .is_connected_registry
                .load(std::sync::atomic::Ordering::Relaxed),
            parent_connected: self.sync_connected.get() == 1,
            last_sync_success_unix: when(&self.sync_last_success),
            cursor_lag: self.sync_lag.get(),
            outbox_depth: self.sync_outbox.get(),
            sync_failures: self.sync_failures.get(),
            gc_last_run_unix: when(&self.gc_last),
            gc_blobs_removed: self.gc_blobs.get(),
            gc_bytes_freed: self.gc_bytes.get(),
        }
    }

    /// The OpenMetrics text exposition of everything recorded.
    pub fn render(&self) -> String {
        use prometheus_client::encoding::text::{encode_eof, encode_registry};
        let mut out = String::new();
        let sync = self
            .is_connected_registry
            .load(std::sync::atomic::Ordering::Relaxed);
        let encoded = encode_registry(&mut out, &self.registry)
            .and_then(|()| match sync {
                true => encode_registry(&mut out, &self.sync_registry),
                false => Ok(()),
            })
            .and_then(|()| encode_eof(&mut out));
        if let Err(e) = encoded {
            tracing::warn!(error = %e, "could not encode the metrics");
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes_are_classified_by_path() {
        for (p, r) in [
            ("/v2/", Route::base),
            ("/v2/_catalog", Route::catalog),
            ("/v2/a/b/blobs/uploads/", Route::upload),
            ("/v2/a/blobs/uploads/123-abc", Route::upload),
            ("/v2/a/blobs/sha256:00", Route::blob),
            ("/v2/a/manifests/latest", Route::manifest),
            ("/v2/team/app/tags/list", Route::tags),
            ("/v2/app/referrers/sha256:00", Route::referrers),
            ("/api/v1/tokens", Route::api),
            ("/gateway/v1/site/messages", Route::gateway),
            ("/token", Route::token),
            ("/healthz", Route::probe),
            ("/metrics", Route::metrics),
            ("/favicon.ico", Route::other),
        ] {
            assert_eq!(Route::of(p), r, "{p}");
        }
    }

    #[test]
    fn renders_what_was_recorded() {
        let m = Metrics::new();
        m.request(
            Route::manifest,
            Method::GET,
            200,
            Duration::from_millis(3),
            None,
            Some(512),
        );
        m.gc(2, 4096);
        m.set_password_checks(5, 2);
        m.set_password_checks(7, 0);
        m.set_fleet(&[FleetMember {
            name: "ship-01".into(),
            up: true,
            last_sync_unix: Some(1_800_000_000),
            cursor_lag: Some(3),
            outbox_depth: None,
            last_activity_unix: Some(1_800_000_100),
        }]);
        let text = m.render();
        for line in [
            "outpost_http_requests_total{route=\"manifest\",method=\"GET\",code=\"200\"} 1",
            "outpost_http_response_body_bytes_total{route=\"manifest\"} 512",
            "outpost_gc_freed_bytes_total 4096",
            "outpost_password_checks_total 7",
            "outpost_password_checks_queued 0",
            "outpost_connected_registry_up{name=\"ship-01\"} 1",
            "outpost_connected_registry_cursor_lag_messages{name=\"ship-01\"} 3",
        ] {
            assert!(
                text.lines().any(|l| l == line),
                "{line} missing from\n{text}"
            );
        }
        assert!(
            !text.contains("outpost_sync_"),
            "a node that is not a connected registry has no sync metrics"
        );
        m.sync_started();
        m.sync_succeeded();
        assert!(
            m.render()
                .lines()
                .any(|l| l == "outpost_sync_parent_connected 1")
        );
        assert_eq!(m.render().matches("# EOF").count(), 1);
        // A registry that left the fleet leaves the gauges.
        m.set_fleet(&[]);
        assert!(!m.render().contains("ship-01"));
    }
}
