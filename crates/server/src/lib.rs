//! `outpost-server` is the only crate that knows HTTP. It builds the axum [`Router`]: `/v2/…`
//! goes to one dispatcher that parses the path with `outpost_oci::Route::parse`, authenticates
//! and authorizes the caller through `outpost-control`, calls the registry domain and renders
//! the result; `/oauth2/token` issues access tokens; `/api/v1` is the admin-only management
//! API; `/healthz` and `/readyz` answer probes. Handlers
//! parse, call one domain function, and render — no storage or SQL logic lives here.

mod api;
mod auth;
mod conn;
pub mod error;
mod gateway;
mod replicas;
mod status;
mod v2;

pub use auth::AuthSettings;

use axum::Router;
use axum::extract::Request;
use axum::http::{HeaderValue, header::HeaderName};
use axum::middleware::{self, Next};
use axum::response::Response;
use axum::routing::{any, get};
use outpost_control::Control;
use outpost_registry::Registry;
use std::sync::Arc;
use std::time::Instant;

pub use conn::serve;
pub use error::ApiError;
pub use replicas::verify_own_address;

/// What every handler can reach.
#[derive(Clone)]
pub struct AppState {
    pub registry: Registry,
    pub control: Arc<Control>,
    pub auth: AuthSettings,
    /// A ReadOnly connected registry: clients may not push, tag or delete.
    pub read_only: bool,
    /// At a connected registry, the repositories it syncs: client changes elsewhere are
    /// refused (they would never reach the parent).
    pub sync_scope: Option<tokio::sync::watch::Receiver<outpost_control::connected::SyncScope>>,
    /// Garbage collection run through the API spares blobs younger than this.
    pub gc_min_age: std::time::Duration,
    /// Whether `/metrics` answers.
    pub metrics_enabled: bool,
    /// At a mirror of a plain registry, that registry's URL (for messages and the status
    /// page).
    pub upstream: Option<String>,
}

pub type App = Arc<AppState>;

/// The whole HTTP application.
pub fn router(state: AppState) -> Router {
    let app: App = Arc::new(state);
    Router::new()
        .route("/v2", any(v2::dispatch))
        .route("/v2/", any(v2::dispatch))
        .route("/v2/{*rest}", any(v2::dispatch))
        .route(
            "/oauth2/token",
            get(auth::token_endpoint).post(auth::token_endpoint),
        )
        .nest("/api/v1", api::routes())
        .nest("/gateway/v1", gateway::routes())
        .route(
            "/healthz",
            get(|| async { ([(replicas::INSTANCE, replicas::instance_id())], "ok\n") }),
        )
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route("/status", get(status::page))
        .fallback(|uri: axum::http::Uri| async move { error::no_such_route("", &uri) })
        .method_not_allowed_fallback(|m: axum::http::Method, uri: axum::http::Uri| async move {
            error::no_such_method("", &m, &uri)
        })
        .layer(middleware::from_fn_with_state(app.clone(), common))
        .with_state(app)
}

/// Readiness: 200 when the database answers and the blob store can be read, else 503 with
/// the reason (`/healthz` only says the process answers).
async fn readyz(axum::extract::State(app): axum::extract::State<App>) -> Response {
    use axum::http::StatusCode;
    use axum::response::IntoResponse;
    match app.registry.ready().await {
        Ok(()) => "ok\n".into_response(),
        Err(why) => {
            tracing::warn!(reason = %why, "not ready");
            (
                StatusCode::SERVICE_UNAVAILABLE,
                format!("not ready: {why}\n"),
            )
                .into_response()
        }
    }
}

/// Prometheus metrics (OpenMetrics text), when enabled: no credentials, no repository or
/// token names; the connected registries below this node by name.
async fn metrics(axum::extract::State(app): axum::extract::State<App>) -> Response {
    use axum::http::{StatusCode, header};
    use axum::response::IntoResponse;
    if !app.metrics_enabled {
        return (
            StatusCode::NOT_FOUND,
            "metrics are disabled on this registry (metrics_enabled = false)\n",
        )
            .into_response();
    }
    let m = app.registry.metrics();
    let (checks, queued) = app.control.password_checks();
    m.set_password_checks(checks, queued);
    match app.control.fleet_health().await {
        Ok(fleet) => m.set_fleet(
            &fleet
                .into_iter()
                .map(|f| outpost_registry::metrics::FleetMember {
                    name: f.name,
                    up: f.up,
                    last_sync_unix: f.last_sync_unix,
                    cursor_lag: f.cursor_lag,
                    outbox_depth: f.outbox_depth,
                    last_activity_unix: f.last_activity_unix,
                })
                .collect::<Vec<_>>(),
        ),
        Err(e) => tracing::warn!(error = %e, "metrics: could not read the connected registries"),
    }
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        m.render(),
    )
        .into_response()
}

/// A response body that counts its bytes as they are sent: a download the client abandons
/// counts what it got, not the whole blob.
struct Counted {
    inner: axum::body::Body,
    sent: outpost_registry::metrics::SentBytes,
}

impl http_body::Body for Counted {
    type Data = bytes::Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<bytes::Bytes>, axum::Error>>> {
        let poll = std::pin::Pin::new(&mut self.inner).poll_frame(cx);
        if let std::task::Poll::Ready(Some(Ok(frame))) = &poll
            && let Some(data) = frame.data_ref()
        {
            self.sent.add(data.len());
        }
        poll
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

const API_VERSION: HeaderName = HeaderName::from_static("docker-distribution-api-version");

/// Adds `Docker-Distribution-API-Version` to every response, counts each request in the
/// metrics and logs it.
async fn common(
    axum::extract::State(app): axum::extract::State<App>,
    req: Request,
    next: Next,
) -> Response {
    use outpost_registry::metrics::{Method, Route};
    let method = req.method().clone();
    let route = Route::of(req.uri().path());
    let path = tracing::enabled!(tracing::Level::DEBUG).then(|| req.uri().path().to_owned());
    let request_bytes = req
        .headers()
        .get(axum::http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok()?.parse().ok());
    let start = Instant::now();
    let req = conn::with_idle_timeout(req, conn::BODY_IDLE_TIMEOUT);
    let mut resp = next.run(req).await;
    resp.headers_mut()
        .insert(API_VERSION, HeaderValue::from_static("registry/2.0"));
    let took = start.elapsed();
    app.registry.metrics().request(
        route,
        Method::of(method.as_str()),
        resp.status().as_u16(),
        took,
        request_bytes,
        None,
    );
    let sent = app.registry.metrics().response_body(route);
    let resp = resp.map(|inner| axum::body::Body::new(Counted { inner, sent }));
    if let Some(path) = path {
        tracing::debug!(%method, %path, status = resp.status().as_u16(), elapsed_ms = took.as_secs_f64() * 1e3, "request");
    }
    resp
}
