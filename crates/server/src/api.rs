//! The management API under `/api/v1` (admin only, JSON): scope maps and tokens, with the same
//! operations and rules as `az acr scope-map` and `az acr token`. Documented in `docs/api.md`.
//! Handlers parse, check that the caller is the administrator, call `outpost-control`, and
//! render; every error comes back as `{"errors":[{"code","message"}]}`.

use crate::error::ApiError;
use crate::{App, auth};
use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use outpost_oci::ErrorCode;
use serde::Deserialize;
use serde::de::DeserializeOwned;

type Result<T> = std::result::Result<T, ApiError>;

pub(crate) fn routes() -> Router<App> {
    Router::new()
        .route("/scope-maps", get(list_scope_maps).post(create_scope_map))
        .route(
            "/scope-maps/{name}",
            get(show_scope_map)
                .patch(update_scope_map)
                .delete(delete_scope_map),
        )
        .route("/tokens", get(list_tokens).post(create_token))
        .route(
            "/tokens/{name}",
            get(show_token).patch(update_token).delete(delete_token),
        )
        .route(
            "/tokens/{name}/credentials/generate",
            post(generate_credentials),
        )
        .route(
            "/tokens/{name}/credentials/delete",
            post(delete_credentials),
        )
}

async fn admin(app: &App, headers: &HeaderMap) -> Result<()> {
    let p = auth::principal(app, headers).await?;
    if !p.is_authenticated() {
        return Err(ApiError::new(
            StatusCode::UNAUTHORIZED,
            ErrorCode::Unauthorized,
            "the management API needs the administrator's credentials (token admin)",
        )
        .with_header(
            header::WWW_AUTHENTICATE,
            &format!("Basic realm=\"{}\"", app.auth.service),
        ));
    }
    if !p.is_admin() {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            ErrorCode::Denied,
            format!(
                "token {:?} is not the administrator; the management API needs token admin",
                p.name()
            ),
        ));
    }
    Ok(())
}

fn parse<T: DeserializeOwned>(body: &Bytes) -> Result<T> {
    serde_json::from_slice(body).map_err(|e| {
        ApiError::custom(
            StatusCode::BAD_REQUEST,
            "INVALID_REQUEST",
            format!("request body is not valid: {e}"),
        )
    })
}

fn json<T: serde::Serialize>(status: StatusCode, v: &T) -> Response {
    (
        status,
        [(header::CONTENT_TYPE, "application/json")],
        serde_json::to_vec(v).unwrap_or_default(),
    )
        .into_response()
}

fn expiry(e: &Option<String>) -> Result<Option<i64>> {
    e.as_deref()
        .map(outpost_control::parse_rfc3339)
        .transpose()
        .map_err(ApiError::from)
}

fn slots(names: &[String]) -> Result<Vec<usize>> {
    if names.is_empty() {
        return Err(ApiError::custom(
            StatusCode::BAD_REQUEST,
            "INVALID_REQUEST",
            "name password1, password2 or both",
        ));
    }
    names
        .iter()
        .map(|n| match n.as_str() {
            "password1" => Ok(0),
            "password2" => Ok(1),
            other => Err(ApiError::custom(
                StatusCode::BAD_REQUEST,
                "INVALID_REQUEST",
                format!("unknown password {other:?}; use password1 or password2"),
            )),
        })
        .collect()
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct CreateScopeMap {
    name: String,
    #[serde(default)]
    description: String,
    actions: Vec<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct UpdateScopeMap {
    #[serde(default)]
    add: Vec<String>,
    #[serde(default)]
    remove: Vec<String>,
    description: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct CreateToken {
    name: String,
    scope_map: String,
    status: Option<String>,
    #[serde(default)]
    no_passwords: bool,
    expiry: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct UpdateToken {
    scope_map: Option<String>,
    status: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct Credentials {
    passwords: Vec<String>,
    expiry: Option<String>,
}

fn status(s: &Option<String>) -> Result<Option<bool>> {
    match s.as_deref() {
        None => Ok(None),
        Some("enabled") => Ok(Some(true)),
        Some("disabled") => Ok(Some(false)),
        Some(other) => Err(ApiError::custom(
            StatusCode::BAD_REQUEST,
            "INVALID_REQUEST",
            format!("status {other:?} is not enabled or disabled"),
        )),
    }
}

async fn list_scope_maps(State(app): State<App>, h: HeaderMap) -> Result<Response> {
    admin(&app, &h).await?;
    Ok(json(StatusCode::OK, &app.control.list_scope_maps().await?))
}

async fn create_scope_map(State(app): State<App>, h: HeaderMap, body: Bytes) -> Result<Response> {
    admin(&app, &h).await?;
    let req: CreateScopeMap = parse(&body)?;
    let v = app
        .control
        .create_scope_map(&req.name, &req.description, &req.actions)
        .await?;
    Ok(json(StatusCode::CREATED, &v))
}

async fn show_scope_map(
    State(app): State<App>,
    h: HeaderMap,
    Path(name): Path<String>,
) -> Result<Response> {
    admin(&app, &h).await?;
    Ok(json(
        StatusCode::OK,
        &app.control.show_scope_map(&name).await?,
    ))
}

async fn update_scope_map(
    State(app): State<App>,
    h: HeaderMap,
    Path(name): Path<String>,
    body: Bytes,
) -> Result<Response> {
    admin(&app, &h).await?;
    let req: UpdateScopeMap = parse(&body)?;
    let v = app
        .control
        .update_scope_map(&name, &req.add, &req.remove, req.description.as_deref())
        .await?;
    Ok(json(StatusCode::OK, &v))
}

async fn delete_scope_map(
    State(app): State<App>,
    h: HeaderMap,
    Path(name): Path<String>,
) -> Result<Response> {
    admin(&app, &h).await?;
    app.control.delete_scope_map(&name).await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

async fn list_tokens(State(app): State<App>, h: HeaderMap) -> Result<Response> {
    admin(&app, &h).await?;
    Ok(json(StatusCode::OK, &app.control.list_tokens().await?))
}

async fn create_token(State(app): State<App>, h: HeaderMap, body: Bytes) -> Result<Response> {
    admin(&app, &h).await?;
    let req: CreateToken = parse(&body)?;
    let enabled = status(&req.status)?.unwrap_or(true);
    let v = app
        .control
        .create_token(
            &req.name,
            &req.scope_map,
            enabled,
            req.no_passwords,
            expiry(&req.expiry)?,
        )
        .await?;
    Ok(json(StatusCode::CREATED, &v))
}

async fn show_token(
    State(app): State<App>,
    h: HeaderMap,
    Path(name): Path<String>,
) -> Result<Response> {
    admin(&app, &h).await?;
    Ok(json(StatusCode::OK, &app.control.show_token(&name).await?))
}

async fn update_token(
    State(app): State<App>,
    h: HeaderMap,
    Path(name): Path<String>,
    body: Bytes,
) -> Result<Response> {
    admin(&app, &h).await?;
    let req: UpdateToken = parse(&body)?;
    let v = app
        .control
        .update_token(&name, req.scope_map.as_deref(), status(&req.status)?)
        .await?;
    Ok(json(StatusCode::OK, &v))
}

async fn delete_token(
    State(app): State<App>,
    h: HeaderMap,
    Path(name): Path<String>,
) -> Result<Response> {
    admin(&app, &h).await?;
    app.control.delete_token(&name).await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

async fn generate_credentials(
    State(app): State<App>,
    h: HeaderMap,
    Path(name): Path<String>,
    body: Bytes,
) -> Result<Response> {
    admin(&app, &h).await?;
    let req: Credentials = parse(&body)?;
    let v = app
        .control
        .generate_credentials(&name, &slots(&req.passwords)?, expiry(&req.expiry)?)
        .await?;
    Ok(json(StatusCode::OK, &v))
}

async fn delete_credentials(
    State(app): State<App>,
    h: HeaderMap,
    Path(name): Path<String>,
    body: Bytes,
) -> Result<Response> {
    admin(&app, &h).await?;
    let req: Credentials = parse(&body)?;
    if req.expiry.is_some() {
        return Err(ApiError::custom(
            StatusCode::BAD_REQUEST,
            "INVALID_REQUEST",
            "expiry does not apply to deleting passwords",
        ));
    }
    let v = app
        .control
        .delete_credentials(&name, &slots(&req.passwords)?)
        .await?;
    Ok(json(StatusCode::OK, &v))
}
