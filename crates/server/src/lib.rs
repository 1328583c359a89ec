//! `outpost-server` is the only crate that knows HTTP. It builds the axum [`Router`]: `/v2/…`
//! goes to one dispatcher that parses the path with `outpost_oci::Route::parse`, calls the
//! registry domain and renders the result; `/healthz` and `/readyz` answer probes. Handlers
//! parse, call one domain function, and render — no storage or SQL logic lives here.

pub mod error;
mod v2;

use axum::Router;
use axum::extract::Request;
use axum::http::{HeaderValue, header::HeaderName};
use axum::middleware::{self, Next};
use axum::response::Response;
use axum::routing::{any, get};
use outpost_registry::Registry;
use std::sync::Arc;
use std::time::Instant;

pub use error::ApiError;

/// What every handler can reach.
#[derive(Clone)]
pub struct AppState {
    pub registry: Registry,
}

pub type App = Arc<AppState>;

/// The whole HTTP application.
pub fn router(state: AppState) -> Router {
    let app: App = Arc::new(state);
    Router::new()
        .route("/v2", any(v2::dispatch))
        .route("/v2/", any(v2::dispatch))
        .route("/v2/{*rest}", any(v2::dispatch))
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
