//! The management API under `/api/v1` (admin only, JSON): scope maps and tokens, with the same
//! operations and rules as `az acr scope-map` and `az acr token`. Documented in `docs/api.md`.
//! Handlers parse, check that the caller is the administrator, call `outpost-control`, and
//! render; every error comes back as `{"errors":[{"code","message"}]}`.

use crate::error::{ApiBody, ApiError, ApiPath};
use crate::{App, auth};
use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
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
        .route("/connected-registries", get(list_crs).post(create_cr))
        .route(
            "/connected-registries/{name}",
            get(show_cr).patch(update_cr).delete(delete_cr),
        )
        .route(
            "/connected-registries/{name}/deactivate",
            post(deactivate_cr),
        )
        .route("/connected-registries/{name}/resync", post(resync_cr))
        .route(
            "/connected-registries/{name}/notifications",
            get(notifications_cr),
        )
        .route(
            "/connected-registries/{name}/get-settings",
            post(settings_cr),
        )
        .route(
            "/connected-registries/{name}/client-tokens",
            get(client_tokens_cr),
        )
        .route(
            "/connected-registries/{name}/permissions",
            get(permissions_cr).patch(update_permissions_cr),
        )
        .route("/gc", post(run_gc))
        .route("/readiness", get(readiness))
        .fallback(
            |uri: axum::http::Uri| async move { crate::error::no_such_route("/api/v1", &uri) },
        )
        .method_not_allowed_fallback(|m: axum::http::Method, uri: axum::http::Uri| async move {
            crate::error::no_such_method("/api/v1", &m, &uri)
        })
}

#[derive(serde::Serialize)]
#[serde(rename_all = "camelCase")]
struct ReadinessView {
    repository: String,
    reference: String,
    digest: String,
    ready: bool,
    platforms: Vec<String>,
    manifests: u64,
    blobs: u64,
    bytes: u64,
    missing: Vec<MissingView>,
}

#[derive(serde::Serialize)]
struct MissingView {
    kind: &'static str,
    digest: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    platform: Option<String>,
}

/// `GET /api/v1/readiness?repository=&reference=`: is everything the image needs here?
async fn readiness(State(app): State<App>, h: HeaderMap, uri: axum::http::Uri) -> Result<Response> {
    admin(&app, &h).await?;
    let q = query(&uri);
    let get = |k: &str| {
        q.iter()
            .find(|(a, _)| a == k)
            .map(|(_, v)| v.clone())
            .ok_or_else(|| {
                ApiError::custom(
                    StatusCode::BAD_REQUEST,
                    "INVALID_REQUEST",
                    format!("readiness needs ?repository=<name>&reference=<tag or digest>; {k} is missing"),
                )
            })
    };
    let (repository, reference) = (get("repository")?, get("reference")?);
    let bad = |what: &str, e: String| {
        ApiError::custom(
            StatusCode::BAD_REQUEST,
            "INVALID_REQUEST",
            format!("{what}: {e}"),
        )
    };
    let repo: outpost_oci::RepoName = repository
        .parse()
        .map_err(|e: outpost_oci::NameError| bad("repository", e.to_string()))?;
    let r: outpost_oci::Reference = reference
        .parse()
        .map_err(|e: outpost_oci::NameError| bad("reference", e.to_string()))?;
    let v = app.registry.readiness(&repo, &r).await?;
    Ok(json(
        StatusCode::OK,
        &ReadinessView {
            repository,
            reference,
            digest: v.digest.to_string(),
            ready: v.missing.is_empty(),
            platforms: v.platforms,
            manifests: v.manifests,
            blobs: v.blobs,
            bytes: v.bytes,
            missing: v
                .missing
                .into_iter()
                .map(|m| MissingView {
                    kind: m.kind,
                    digest: m.digest.to_string(),
                    platform: m.platform,
                })
                .collect(),
        },
    ))
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RunGc {
    #[serde(default)]
    dry_run: bool,
    /// Spare blobs stored or linked more recently than this (default: `gc_min_age_secs`).
    min_age_secs: Option<u64>,
}

#[derive(serde::Serialize)]
#[serde(rename_all = "camelCase")]
struct GcView {
    dry_run: bool,
    blobs_removed: u64,
    bytes_freed: u64,
    orphan_files_removed: u64,
    files_left: u64,
}

/// Runs garbage collection now: unreferenced blobs and orphaned files go.
async fn run_gc(State(app): State<App>, h: HeaderMap, ApiBody(body): ApiBody) -> Result<Response> {
    admin(&app, &h).await?;
    let req: RunGc = if body.is_empty() {
        RunGc::default()
    } else {
        parse(&body)?
    };
    let min_age = req
        .min_age_secs
        .map(std::time::Duration::from_secs)
        .unwrap_or(app.gc_min_age);
    let r = app.registry.collect_garbage(min_age, req.dry_run).await?;
    Ok(json(
        StatusCode::OK,
        &GcView {
            dry_run: r.dry_run,
            blobs_removed: r.blobs_removed,
            bytes_freed: r.bytes_freed,
            orphan_files_removed: r.orphan_files_removed,
            files_left: r.files_left,
        },
    ))
}

async fn admin(app: &App, headers: &HeaderMap) -> Result<()> {
    let p = auth::basic_principal(app, headers, "the management API").await?;
    if !p.is_authenticated() {
        return Err(auth::basic_unauthorized(
            app,
            "the management API needs the administrator's credentials (token admin)",
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

/// A JSON answer (the management API's and the gateway's).
pub(crate) fn json<T: serde::Serialize>(status: StatusCode, v: &T) -> Response {
    (
        status,
        [(header::CONTENT_TYPE, "application/json")],
        serde_json::to_vec(v).unwrap_or_default(),
    )
        .into_response()
}

/// A password expiry: a date (`expiry`), or a number of days (`expiryInDays`) counted here,
/// by this registry's clock rather than by the machine the command ran on.
fn expiry(e: &Option<String>, days: Option<i64>) -> Result<Option<i64>> {
    let invalid = |m: String| ApiError::custom(StatusCode::BAD_REQUEST, "INVALID_REQUEST", m);
    match (e, days) {
        (Some(_), Some(_)) => Err(invalid("give expiry or expiryInDays, not both".into())),
        (None, Some(d)) if !(1..=MAX_EXPIRY_DAYS).contains(&d) => Err(invalid(format!(
            "expiryInDays must be 1 to {MAX_EXPIRY_DAYS} (100 years), not {d}; leave it out for \
             passwords that do not expire"
        ))),
        (None, Some(d)) => Ok(Some(outpost_control::clock::now_ms() + d * 86_400_000)),
        (e, None) => e
            .as_deref()
            .map(outpost_control::parse_rfc3339)
            .transpose()
            .map_err(ApiError::from),
    }
}

/// Longest `expiryInDays`: 100 years.
const MAX_EXPIRY_DAYS: i64 = 36_500;

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
    expiry_in_days: Option<i64>,
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
    expiry_in_days: Option<i64>,
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

async fn create_scope_map(
    State(app): State<App>,
    h: HeaderMap,
    ApiBody(body): ApiBody,
) -> Result<Response> {
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
    ApiPath(name): ApiPath<String>,
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
    ApiPath(name): ApiPath<String>,
    ApiBody(body): ApiBody,
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
    ApiPath(name): ApiPath<String>,
) -> Result<Response> {
    admin(&app, &h).await?;
    app.control.delete_scope_map(&name).await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

async fn list_tokens(State(app): State<App>, h: HeaderMap) -> Result<Response> {
    admin(&app, &h).await?;
    Ok(json(StatusCode::OK, &app.control.list_tokens().await?))
}

async fn create_token(
    State(app): State<App>,
    h: HeaderMap,
    ApiBody(body): ApiBody,
) -> Result<Response> {
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
            expiry(&req.expiry, req.expiry_in_days)?,
        )
        .await?;
    Ok(json(StatusCode::CREATED, &v))
}

async fn show_token(
    State(app): State<App>,
    h: HeaderMap,
    ApiPath(name): ApiPath<String>,
) -> Result<Response> {
    admin(&app, &h).await?;
    Ok(json(StatusCode::OK, &app.control.show_token(&name).await?))
}

async fn update_token(
    State(app): State<App>,
    h: HeaderMap,
    ApiPath(name): ApiPath<String>,
    ApiBody(body): ApiBody,
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
    ApiPath(name): ApiPath<String>,
) -> Result<Response> {
    admin(&app, &h).await?;
    app.control.delete_token(&name).await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

async fn generate_credentials(
    State(app): State<App>,
    h: HeaderMap,
    ApiPath(name): ApiPath<String>,
    ApiBody(body): ApiBody,
) -> Result<Response> {
    admin(&app, &h).await?;
    let req: Credentials = parse(&body)?;
    let v = app
        .control
        .generate_credentials(
            &name,
            &slots(&req.passwords)?,
            expiry(&req.expiry, req.expiry_in_days)?,
        )
        .await?;
    Ok(json(StatusCode::OK, &v))
}

async fn delete_credentials(
    State(app): State<App>,
    h: HeaderMap,
    ApiPath(name): ApiPath<String>,
    ApiBody(body): ApiBody,
) -> Result<Response> {
    admin(&app, &h).await?;
    let req: Credentials = parse(&body)?;
    if req.expiry.is_some() || req.expiry_in_days.is_some() {
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

// ---- connected registries -----------------------------------------------------------------

fn query(uri: &axum::http::Uri) -> Vec<(String, String)> {
    auth::pairs(uri.query().unwrap_or(""))
}

fn flag(q: &[(String, String)], k: &str) -> Result<bool> {
    match q.iter().find(|(a, _)| a == k).map(|(_, v)| v.as_str()) {
        None | Some("false") => Ok(false),
        Some("true") | Some("") => Ok(true),
        Some(other) => Err(ApiError::custom(
            StatusCode::BAD_REQUEST,
            "INVALID_REQUEST",
            format!("{k}={other:?} is not true or false"),
        )),
    }
}

/// The whole number query parameter `k` (`default` when absent), refused with 400 outside
/// `range`.
pub(crate) fn number(
    q: &[(String, String)],
    k: &str,
    default: i64,
    range: std::ops::RangeInclusive<i64>,
) -> Result<i64> {
    let Some((_, v)) = q.iter().find(|(a, _)| a == k) else {
        return Ok(default);
    };
    v.parse::<i64>()
        .ok()
        .filter(|n| range.contains(n))
        .ok_or_else(|| {
            let bounds = match *range.end() {
                i64::MAX => format!("of at least {}", range.start()),
                end => format!("from {} to {end}", range.start()),
            };
            ApiError::custom(
                StatusCode::BAD_REQUEST,
                "INVALID_REQUEST",
                format!("{k}={v:?} is not a whole number {bounds}"),
            )
        })
}

async fn list_crs(State(app): State<App>, h: HeaderMap, uri: axum::http::Uri) -> Result<Response> {
    admin(&app, &h).await?;
    let q = query(&uri);
    let parent = q
        .iter()
        .find(|(k, _)| k == "parent")
        .map(|(_, v)| v.as_str());
    let v = app
        .control
        .list_connected_registries(parent, flag(&q, "noChildren")?)
        .await?;
    Ok(json(StatusCode::OK, &v))
}

async fn create_cr(
    State(app): State<App>,
    h: HeaderMap,
    ApiBody(body): ApiBody,
) -> Result<Response> {
    admin(&app, &h).await?;
    let req: outpost_control::CreateConnectedRegistry = parse(&body)?;
    Ok(json(
        StatusCode::CREATED,
        &app.control.create_connected_registry(req).await?,
    ))
}

async fn show_cr(
    State(app): State<App>,
    h: HeaderMap,
    ApiPath(name): ApiPath<String>,
) -> Result<Response> {
    admin(&app, &h).await?;
    Ok(json(
        StatusCode::OK,
        &app.control.show_connected_registry(&name).await?,
    ))
}

async fn update_cr(
    State(app): State<App>,
    h: HeaderMap,
    ApiPath(name): ApiPath<String>,
    ApiBody(body): ApiBody,
) -> Result<Response> {
    admin(&app, &h).await?;
    let req: outpost_control::UpdateConnectedRegistry = parse(&body)?;
    Ok(json(
        StatusCode::OK,
        &app.control.update_connected_registry(&name, req).await?,
    ))
}

async fn delete_cr(
    State(app): State<App>,
    h: HeaderMap,
    ApiPath(name): ApiPath<String>,
    uri: axum::http::Uri,
) -> Result<Response> {
    admin(&app, &h).await?;
    let q = query(&uri);
    let out = app
        .control
        .delete_connected_registry(&name, flag(&q, "cleanup")?, flag(&q, "force")?)
        .await?;
    Ok(json(StatusCode::OK, &out))
}

async fn deactivate_cr(
    State(app): State<App>,
    h: HeaderMap,
    ApiPath(name): ApiPath<String>,
) -> Result<Response> {
    admin(&app, &h).await?;
    Ok(json(
        StatusCode::OK,
        &app.control.deactivate_connected_registry(&name).await?,
    ))
}

async fn resync_cr(
    State(app): State<App>,
    h: HeaderMap,
    ApiPath(name): ApiPath<String>,
) -> Result<Response> {
    admin(&app, &h).await?;
    Ok(json(
        StatusCode::OK,
        &app.control.resync_connected_registry(&name).await?,
    ))
}

/// `GET /api/v1/connected-registries/{name}/notifications?after=&n=`: the notifications the
/// root keeps for `name`, oldest first, after position `after` (default 0), at most `n`
/// (default 100, at most 1000).
async fn notifications_cr(
    State(app): State<App>,
    h: HeaderMap,
    ApiPath(name): ApiPath<String>,
    uri: axum::http::Uri,
) -> Result<Response> {
    admin(&app, &h).await?;
    let q = query(&uri);
    let after = number(&q, "after", 0, 0..=i64::MAX)?;
    let n = number(&q, "n", 100, 1..=1000)?;
    Ok(json(
        StatusCode::OK,
        &app.control.notifications(&name, after, n as u32).await?,
    ))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct SettingsRequest {
    parent_protocol: String,
    generate_password: Option<u8>,
    /// How the instance reaches its parent (`host[:port]`). Default: for a registry under
    /// this root, the request's Host; for one under another connected registry, the address
    /// that registry reports.
    parent_endpoint: Option<String>,
}

async fn settings_cr(
    State(app): State<App>,
    h: HeaderMap,
    ApiPath(name): ApiPath<String>,
    ApiBody(body): ApiBody,
) -> Result<Response> {
    admin(&app, &h).await?;
    let req: SettingsRequest = parse(&body)?;
    let host = h
        .get(header::HOST)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("<parent gateway endpoint>")
        .to_string();
    let v = app
        .control
        .connected_registry_settings(
            &name,
            &req.parent_protocol,
            req.generate_password,
            &host,
            req.parent_endpoint.as_deref(),
        )
        .await?;
    Ok(json(StatusCode::OK, &v))
}

async fn client_tokens_cr(
    State(app): State<App>,
    h: HeaderMap,
    ApiPath(name): ApiPath<String>,
) -> Result<Response> {
    admin(&app, &h).await?;
    Ok(json(
        StatusCode::OK,
        &app.control.connected_registry_client_tokens(&name).await?,
    ))
}

async fn permissions_cr(
    State(app): State<App>,
    h: HeaderMap,
    ApiPath(name): ApiPath<String>,
) -> Result<Response> {
    admin(&app, &h).await?;
    Ok(json(
        StatusCode::OK,
        &app.control.connected_registry_permissions(&name).await?,
    ))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct PermissionsUpdate {
    #[serde(default)]
    add: Vec<String>,
    #[serde(default)]
    remove: Vec<String>,
}

async fn update_permissions_cr(
    State(app): State<App>,
    h: HeaderMap,
    ApiPath(name): ApiPath<String>,
    ApiBody(body): ApiBody,
) -> Result<Response> {
    admin(&app, &h).await?;
    let req: PermissionsUpdate = parse(&body)?;
    let v = app
        .control
        .update_connected_registry_permissions(&name, &req.add, &req.remove)
        .await?;
    Ok(json(StatusCode::OK, &v))
}
