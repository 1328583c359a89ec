//! `outpost-server` is the only crate that knows HTTP. It builds the axum [`Router`]: `/v2/…`
//! goes to one dispatcher that parses the path with `outpost_oci::Route::parse`, authenticates
//! and authorizes the caller through `outpost-control`, calls the registry domain and renders
//! the result; `/oauth2/token` issues access tokens; `/api/v1` is the admin-only management
//! API; `/healthz` and `/readyz` answer probes. Handlers
//! parse, call one domain function, and render — no storage or SQL logic lives here.

mod api;
mod auth;
pub mod error;
mod gateway;
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

pub use error::ApiError;

/// What every handler can reach.
#[derive(Clone)]
pub struct AppState {
    pub registry: Registry,
    pub control: Arc<Control>,
    pub auth: AuthSettings,
    /// A ReadOnly connected registry: clients may not push, tag or delete.
    pub read_only: bool,
    /// Garbage collection run through the API spares blobs younger than this.
    pub gc_min_age: std::time::Duration,
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
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(|| async { "ok" }))
        .layer(middleware::from_fn(common))
        .with_state(app)
}

const API_VERSION: HeaderName = HeaderName::from_static("docker-distribution-api-version");

/// Adds `Docker-Distribution-API-Version` to every response and logs each request.
async fn common(req: Request, next: Next) -> Response {
    let method = req.method().clone();
    let path = req.uri().path().to_owned();
    let start = Instant::now();
    let mut resp = next.run(req).await;
    resp.headers_mut()
        .insert(API_VERSION, HeaderValue::from_static("registry/2.0"));
    tracing::debug!(%method, %path, status = resp.status().as_u16(), elapsed_ms = start.elapsed().as_secs_f64() * 1e3, "request");
    resp
}
