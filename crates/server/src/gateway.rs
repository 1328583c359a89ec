//! The parent side of the sync protocol, as far as it exists yet: a starting connected
//! registry activates itself (`POST /gateway/v1/{name}/activate`) and reports its status
//! (`PUT /gateway/v1/{name}/status`), authenticated with its sync token and authorized by the
//! token's `gateway/<name>/config/write` action. See `docs/sync-protocol.md`.

use crate::error::ApiError;
use crate::{App, auth};
use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{post, put};
use outpost_control::GatewayAction;
use outpost_control::connected::StatusReport;
use outpost_oci::ErrorCode;
use serde::Deserialize;

pub(crate) fn routes() -> Router<App> {
    Router::new()
        .route("/{name}/activate", post(activate))
        .route("/{name}/status", put(status))
}

async fn authorize(
    app: &App,
    h: &HeaderMap,
    name: &str,
    action: GatewayAction,
) -> Result<(), ApiError> {
    let p = auth::principal(app, h).await?;
    if !p.is_authenticated() {
        return Err(ApiError::new(
            StatusCode::UNAUTHORIZED,
            ErrorCode::Unauthorized,
            "the gateway API needs the connected registry's sync token",
        )
        .with_header(
            header::WWW_AUTHENTICATE,
            &format!("Basic realm=\"{}\"", app.auth.service),
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

fn json<T: serde::Serialize>(status: StatusCode, v: &T) -> Response {
    (
        status,
        [(header::CONTENT_TYPE, "application/json")],
        serde_json::to_vec(v).unwrap_or_default(),
    )
        .into_response()
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Activate {
    instance_id: String,
}

async fn activate(
    State(app): State<App>,
    h: HeaderMap,
    Path(name): Path<String>,
    body: Bytes,
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
    Path(name): Path<String>,
    body: Bytes,
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
