//! The parent side of the sync protocol (`docs/sync-protocol.md`): a connected registry
//! activates itself, fetches its configuration (conditional on an ETag), reads its ordered
//! message feed (long-polling with `wait`), and reports its status — all with its sync token,
//! authorized by the token's `gateway/<name>/…` actions. Content itself moves over `/v2/`.

use crate::api::json;
use crate::error::{ApiBody, ApiError, ApiPath};
use crate::{App, auth};
use axum::Router;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use outpost_control::connected::StatusReport;
use outpost_control::notify::NotificationBatch;
use outpost_control::{GatewayAction, RepoAction};
use outpost_oci::ErrorCode;
use serde::Deserialize;

pub(crate) fn routes() -> Router<App> {
    Router::new()
        .route("/{name}/activate", post(activate))
        .route("/{name}/status", put(status))
        .route("/{name}/config", get(config))
        .route("/{name}/messages", get(messages))
        .route("/{name}/manifests", get(manifests))
        .route("/{name}/notifications", post(notifications))
        .fallback(
            |uri: axum::http::Uri| async move { crate::error::no_such_route("/gateway/v1", &uri) },
        )
        .method_not_allowed_fallback(|m: axum::http::Method, uri: axum::http::Uri| async move {
            crate::error::no_such_method("/gateway/v1", &m, &uri)
        })
        // Every answer says what time it is at the root (as this node knows it): a child with
        // a wrong clock goes by it (`outpost_control::clock`).
        .layer(axum::middleware::map_response(
            |mut resp: Response| async move {
                if let Ok(v) =
                    header::HeaderValue::from_str(&outpost_control::clock::now_ms().to_string())
                {
                    resp.headers_mut().insert(outpost_control::clock::HEADER, v);
                }
                resp
            },
        ))
}

/// `POST /{name}/notifications`: notifications the connected registry made from its event log
/// (kept at the root, passed up by an intermediate node).
async fn notifications(
    State(app): State<App>,
    h: HeaderMap,
    ApiPath(name): ApiPath<String>,
    ApiBody(body): ApiBody,
) -> Result<Response, ApiError> {
    authorize(&app, &h, &name, GatewayAction::MessageWrite).await?;
    let req: NotificationBatch = serde_json::from_slice(&body).map_err(|e| {
        ApiError::custom(
            StatusCode::BAD_REQUEST,
            "INVALID_REQUEST",
            format!("notifications body: {e}"),
        )
    })?;
    let received = app.control.receive_notifications(&name, req).await?;
    app.registry.metrics().notifications_received(received);
    Ok(json(
        StatusCode::OK,
        &serde_json::json!({ "received": received }),
    ))
}

async fn authorize(
    app: &App,
    h: &HeaderMap,
    name: &str,
    action: GatewayAction,
) -> Result<(), ApiError> {
    let p = auth::basic_principal(app, h, "the gateway API").await?;
    if !p.is_authenticated() {
        return Err(auth::basic_unauthorized(
            app,
            "the gateway API needs the connected registry's sync token",
        ));
    }
    if !p.allows_gateway(name, action) {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            ErrorCode::Denied,
            format!(
                "token {:?} does not have gateway/{name}/{} (it is not this connected registry's sync token)",
                p.name(),
                action.as_str()
            ),
        ));
    }
    Ok(())
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Activate {
    instance_id: String,
}

async fn activate(
    State(app): State<App>,
    h: HeaderMap,
    ApiPath(name): ApiPath<String>,
    ApiBody(body): ApiBody,
) -> Result<Response, ApiError> {
    authorize(&app, &h, &name, GatewayAction::ConfigWrite).await?;
    let req: Activate = serde_json::from_slice(&body).map_err(|e| {
        ApiError::custom(
            StatusCode::BAD_REQUEST,
            "INVALID_REQUEST",
            format!("activation body: {e}"),
        )
    })?;
    let v = app
        .control
        .activate_connected_registry(&name, &req.instance_id)
        .await?;
    Ok(json(StatusCode::OK, &v))
}

async fn status(
    State(app): State<App>,
    h: HeaderMap,
    ApiPath(name): ApiPath<String>,
    ApiBody(body): ApiBody,
) -> Result<Response, ApiError> {
    authorize(&app, &h, &name, GatewayAction::ConfigWrite).await?;
    let req: StatusReport = serde_json::from_slice(&body).map_err(|e| {
        ApiError::custom(
            StatusCode::BAD_REQUEST,
            "INVALID_REQUEST",
            format!("status body: {e}"),
        )
    })?;
    let v = app.control.report_status(&name, req).await?;
    Ok(json(StatusCode::OK, &v))
}

async fn config(
    State(app): State<App>,
    h: HeaderMap,
    ApiPath(name): ApiPath<String>,
) -> Result<Response, ApiError> {
    authorize(&app, &h, &name, GatewayAction::ConfigRead).await?;
    let (body, etag) = config_and_etag(&app, &name).await?;
    if h.get(header::IF_NONE_MATCH).and_then(|v| v.to_str().ok()) == Some(etag.as_str()) {
        return Ok((StatusCode::NOT_MODIFIED, [(header::ETAG, etag)]).into_response());
    }
    Ok((
        StatusCode::OK,
        [
            (header::CONTENT_TYPE, "application/json".to_string()),
            (header::ETAG, etag),
        ],
        body,
    )
        .into_response())
}

/// `name`'s configuration as sent, and its ETag (quoted).
async fn config_and_etag(app: &App, name: &str) -> Result<(Vec<u8>, String), ApiError> {
    let cfg = app.control.sync_config(name).await?;
    let body = serde_json::to_vec(&cfg).unwrap_or_default();
    let etag = format!("\"{}\"", outpost_oci::Digest::sha256_of(&body).hex());
    Ok((body, etag))
}

/// `GET /{name}/manifests?repository=R[&last=D][&n=N]`: the digests of every manifest
/// repository `R` holds here, tagged or not, in byte order after `last`, at most `n` (default
/// and limit 1000). A full reconciliation compares them with the child's copy: tags alone miss
/// what was pushed by digest (referrers of absent subjects among them) and what was deleted by
/// digest while the child was away. A repository that does not exist has none.
async fn manifests(
    State(app): State<App>,
    h: HeaderMap,
    ApiPath(name): ApiPath<String>,
    uri: axum::http::Uri,
) -> Result<Response, ApiError> {
    authorize(&app, &h, &name, GatewayAction::MessageRead).await?;
    let q = auth::pairs(uri.query().unwrap_or(""));
    let n = crate::api::number(&q, "n", 1000, 1..=1000)? as u32;
    let get = |k: &str| q.iter().find(|(a, _)| a == k).map(|(_, v)| v.as_str());
    let repo: outpost_oci::RepoName =
        get("repository").unwrap_or_default().parse().map_err(|e| {
            ApiError::custom(
                StatusCode::BAD_REQUEST,
                "INVALID_REQUEST",
                format!("repository: {e}"),
            )
        })?;
    // The sync token reads only the connected registry's repositories.
    let p = auth::basic_principal(&app, &h, "the gateway API").await?;
    if !p.allows(repo.as_str(), RepoAction::ContentRead) {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            ErrorCode::Denied,
            format!("token {:?} may not read repository {repo}", p.name()),
        ));
    }
    let digests = app
        .registry
        .manifest_digests(&repo, n, get("last").unwrap_or_default())
        .await?;
    Ok(json(
        StatusCode::OK,
        &serde_json::json!({ "repository": repo.as_str(), "manifests": digests }),
    ))
}

async fn messages(
    State(app): State<App>,
    h: HeaderMap,
    ApiPath(name): ApiPath<String>,
    uri: axum::http::Uri,
) -> Result<Response, ApiError> {
    authorize(&app, &h, &name, GatewayAction::MessageRead).await?;
    let q = auth::pairs(uri.query().unwrap_or(""));
    let num = |k: &str, default: i64| crate::api::number(&q, k, default, 0..=i64::MAX);
    let after = num("after", 0)?;
    // When the child's cursor event was written here, as this log told it (see
    // `MessagePage::next_mark`); absent from a child of an earlier version.
    let mark = match q.iter().any(|(k, _)| k == "mark") {
        true => Some(num("mark", 0)?),
        false => None,
    };
    let limit = num("limit", 100)?.min(1000) as u32;
    let wait = std::time::Duration::from_secs(num("wait", 0)?.min(60) as u64);
    // Subscribe before reading, so a change between the read and the wait is not missed.
    let mut changes = app.registry.subscribe();
    // A control-plane change ends the wait too (with an empty page), so the child fetches its
    // configuration at once instead of after the long-poll.
    let mut access = app.control.subscribe();
    let mut page = app.control.messages(&name, after, mark, limit).await?;
    // The child names the configuration it has (`config`, its ETag): one changed since
    // (before this request subscribed) is answered at once, so it is fetched now.
    let stale = match q.iter().find(|(k, _)| k == "config") {
        Some((_, have)) if !wait.is_zero() => {
            let bare = |e: &str| e.trim_start_matches("W/").trim_matches('"').to_string();
            bare(&config_and_etag(&app, &name).await?.1) != bare(have)
        }
        _ => false,
    };
    if page.messages.is_empty() && !page.resync && !wait.is_zero() && !stale {
        let _ = tokio::time::timeout(wait, async {
            tokio::select! {
                _ = changes.changed() => {}
                _ = access.changed() => {}
            }
        })
        .await;
        page = app.control.messages(&name, after, mark, limit).await?;
    }
    Ok(json(StatusCode::OK, &page))
}
