//! Authentication on the HTTP side: turning `Authorization` headers into a [`Principal`],
//! answering unauthenticated requests with the Docker/OCI `Bearer` challenge, and the token
//! endpoint (`/oauth2/token`, GET with Basic credentials and the POST form containerd uses)
//! that exchanges credentials for a short-lived access token. The decisions themselves are
//! made by `outpost-control`.

use crate::App;
use crate::error::ApiError;
use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use base64::Engine as _;
use outpost_control::{Principal, RepoAction};
use outpost_oci::ErrorCode;

/// How this node authenticates clients.
#[derive(Debug, Clone)]
pub struct AuthSettings {
    /// Let requests without credentials pull (content/read and metadata/read everywhere).
    pub anonymous_pull: bool,
    /// The `service` named in challenges and the audience of issued access tokens.
    pub service: String,
    /// Served over HTTPS: challenges name an `https` token realm, so clients never send
    /// credentials to it in clear text.
    pub tls: bool,
    /// The address clients use, `http(s)://host[:port]` (behind a reverse proxy): challenges
    /// name the token realm there, whatever the request's headers say.
    pub public_url: Option<String>,
}

impl Default for AuthSettings {
    fn default() -> Self {
        AuthSettings {
            anonymous_pull: false,
            service: "outpost".into(),
            tls: false,
            public_url: None,
        }
    }
}

/// `user:password` from a `Basic` header value.
fn basic(value: &str) -> Option<(String, String)> {
    let encoded = value
        .strip_prefix("Basic ")
        .or_else(|| value.strip_prefix("basic "))?;
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(encoded.trim())
        .ok()?;
    let s = String::from_utf8(decoded).ok()?;
    let (u, p) = s.split_once(':')?;
    Some((u.to_string(), p.to_string()))
}

/// The access token of clients without credentials where anonymous pulls are allowed.
pub(crate) const ANONYMOUS_TOKEN: &str = "anonymous";

/// Who is calling, from the `Authorization` header. Bad credentials are a 401 with a message
/// that says why (wrong password, disabled token, expired password or access token).
pub(crate) async fn principal(app: &App, headers: &HeaderMap) -> Result<Principal, ApiError> {
    let Some(value) = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
    else {
        return Ok(Principal::Anonymous {
            pull: app.auth.anonymous_pull,
        });
    };
    if let Some(token) = value
        .strip_prefix("Bearer ")
        .or_else(|| value.strip_prefix("bearer "))
    {
        // The token the token endpoint hands to clients without credentials when anonymous
        // pulls are allowed: it grants what no credentials grant, nothing more.
        if token.trim() == ANONYMOUS_TOKEN {
            return Ok(Principal::Anonymous {
                pull: app.auth.anonymous_pull,
            });
        }
        return app
            .control
            .verify_bearer(token.trim(), &app.auth.service)
            .await
            .map_err(|e| challenge(app, headers, None, ApiError::from(e)));
    }
    let (user, pass) = basic(value).ok_or_else(|| {
        let message = if value
            .get(..6)
            .is_some_and(|s| s.eq_ignore_ascii_case("basic "))
        {
            "malformed Basic credentials: expected base64 of <token name>:<password>"
        } else {
            "Authorization header is neither Basic nor Bearer"
        };
        challenge(
            app,
            headers,
            None,
            ApiError::new(StatusCode::UNAUTHORIZED, ErrorCode::Unauthorized, message),
        )
    })?;
    match app.control.authenticate(&user, &pass).await {
        Ok(identity) => Ok(Principal::Basic(identity)),
        Err(e) => Err(challenge(app, headers, None, login_error(app, e).await)),
    }
}

/// What a failed login is told, at `/v2/` and at the token endpoint alike (where Docker,
/// podman, skopeo and containerd log in). At a connected registry the usual causes are a
/// token of the parent that is not one of its client tokens, a child's sync token rotated at
/// the root, and a password that expired: say how each is fixed, at the root, where tokens
/// are managed. A wrong password reads the same for every name, so that it does not tell
/// which tokens exist here.
async fn login_error(app: &App, e: outpost_control::ControlError) -> ApiError {
    use outpost_control::ControlError;
    let Some(scope) = &app.sync_scope else {
        return ApiError::from(e);
    };
    match e {
        ControlError::BadCredentials => ApiError::new(
            StatusCode::UNAUTHORIZED,
            ErrorCode::Unauthorized,
            format!(
                "incorrect username or password; at this connected registry only its client \
                 tokens, its children's sync tokens and its own admin token log in. A token \
                 of the parent is added with `outpost connected-registry update -n {} \
                 --add-client-tokens <token>` at the root; a child whose sync token's \
                 password was generated again at the root is restarted with its new \
                 connection string",
                scope.borrow().name
            ),
        ),
        ControlError::PasswordExpired { name, at } => ApiError::new(
            StatusCode::UNAUTHORIZED,
            ErrorCode::Unauthorized,
            format!(
                "the password of token {name:?} expired at {} (by the root's clock); generate \
                 a new one at the root (`outpost token credential generate -n {name} \
                 --registry <root>`): this connected registry learns it at its next sync",
                outpost_control::format_rfc3339(at)
            ),
        ),
        e => ApiError::from(e),
    }
}

/// The scope string a client should request for `action` on `repo`.
pub(crate) fn scope_for(repo: &str, action: RepoAction) -> String {
    let verbs = match action {
        RepoAction::ContentRead | RepoAction::MetadataRead => "pull",
        RepoAction::ContentWrite | RepoAction::MetadataWrite => "pull,push",
        RepoAction::ContentDelete => "delete",
    };
    format!("repository:{repo}:{verbs}")
}

/// Adds the `WWW-Authenticate: Bearer realm=…,service=…[,scope=…]` challenge to a 401.
pub(crate) fn challenge(
    app: &App,
    headers: &HeaderMap,
    scope: Option<&str>,
    err: ApiError,
) -> ApiError {
    err.with_header(
        header::WWW_AUTHENTICATE,
        &bearer_challenge(app, headers, scope),
    )
}

/// The first value of a header that proxies append to (`a, b`: `a` was set by the proxy
/// nearest the client).
fn first_value<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    let v = headers.get(name)?.to_str().ok()?;
    Some(v.split(',').next().unwrap_or(v).trim()).filter(|v| !v.is_empty())
}

/// A parameter (`proto`, `host`) of the first element of an RFC 7239 `Forwarded` header.
fn forwarded<'a>(headers: &'a HeaderMap, key: &str) -> Option<&'a str> {
    first_value(headers, "forwarded")?
        .split(';')
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(k, _)| k.eq_ignore_ascii_case(key))
        .map(|(_, v)| v.trim_matches('"'))
}

/// The scheme and host clients address this registry by: `public_url` when configured; else
/// the request's, as a reverse proxy passes them on (`X-Forwarded-Proto`/`-Host`, or
/// `Forwarded`), else its `Host` header and whether this server speaks TLS.
fn public_base(app: &App, headers: &HeaderMap) -> String {
    if let Some(url) = &app.auth.public_url {
        return url.clone();
    }
    let plausible = |h: &&str| {
        !h.is_empty()
            && h.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-.:[]".contains(&b))
    };
    let host = first_value(headers, "x-forwarded-host")
        .or_else(|| forwarded(headers, "host"))
        .filter(plausible)
        .or_else(|| {
            headers
                .get(header::HOST)
                .and_then(|v| v.to_str().ok())
                .filter(plausible)
        })
        .unwrap_or("localhost");
    let https = app.auth.tls
        || first_value(headers, "x-forwarded-proto")
            .or_else(|| forwarded(headers, "proto"))
            .is_some_and(|p| p.eq_ignore_ascii_case("https"));
    let scheme = if https { "https" } else { "http" };
    format!("{scheme}://{host}")
}

/// `Bearer realm=…,service=…[,scope=…]`, the realm where the client addressed this registry.
fn bearer_challenge(app: &App, headers: &HeaderMap, scope: Option<&str>) -> String {
    let mut value = format!(
        "Bearer realm=\"{}/oauth2/token\",service=\"{}\"",
        public_base(app, headers),
        app.auth.service
    );
    if let Some(s) = scope {
        value.push_str(&format!(",scope=\"{s}\""));
    }
    value
}

pub(crate) fn unauthorized(app: &App, headers: &HeaderMap, scope: Option<&str>) -> ApiError {
    challenge(
        app,
        headers,
        scope,
        ApiError::new(
            StatusCode::UNAUTHORIZED,
            ErrorCode::Unauthorized,
            "authentication required: log in with a token name and password (docker login <registry> -u <token>)",
        ),
    )
}

/// Checks that `principal` may do `action` on `repo`: 401 with a challenge when it should
/// (re)authenticate, 403 `DENIED` when its token simply lacks the permission.
pub(crate) fn authorize(
    app: &App,
    headers: &HeaderMap,
    p: &Principal,
    repo: &str,
    action: RepoAction,
) -> Result<(), ApiError> {
    if p.allows(repo, action) {
        return Ok(());
    }
    let scope = scope_for(repo, action);
    if !p.is_authenticated() {
        return Err(unauthorized(app, headers, Some(&scope)));
    }
    if p.identity_allows(repo, action) {
        // An access token scoped too narrowly for a token that could do this: ask the client
        // to fetch one with the right scope (RFC 6750's `insufficient_scope`).
        let err = ApiError::new(
            StatusCode::UNAUTHORIZED,
            ErrorCode::Unauthorized,
            format!(
                "the access token does not grant {action} on repository {repo:?}; request one \
                 with scope {scope:?} from the token service"
            ),
        );
        let value = bearer_challenge(app, headers, Some(&scope));
        return Err(err.with_header(
            header::WWW_AUTHENTICATE,
            &format!("{value},error=\"insufficient_scope\""),
        ));
    }
    Err(ApiError::new(
        StatusCode::FORBIDDEN,
        ErrorCode::Denied,
        format!(
            "requested access to the resource is denied: token {:?} does not have {} on repository {repo:?} (insufficient scopes)",
            p.name(),
            action
        ),
    ))
}

/// All `key=value` pairs of a query string or form body, percent-decoded.
pub(crate) fn pairs(s: &str) -> Vec<(String, String)> {
    s.split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            (crate::v2::percent_decode(k), crate::v2::percent_decode(v))
        })
        .collect()
}

/// `GET|POST /oauth2/token`.
pub(crate) async fn token_endpoint(State(app): State<App>, req: Request) -> Response {
    match token(&app, req).await {
        Ok(r) => r,
        Err(e) => e.into_response(),
    }
}

async fn token(app: &App, req: Request) -> Result<Response, ApiError> {
    let (parts, body) = req.into_parts();
    let mut kv = pairs(parts.uri.query().unwrap_or(""));
    let mut creds = parts
        .headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(basic);
    match parts.method {
        Method::GET => {}
        Method::POST => {
            const LIMIT: usize = 64 * 1024;
            let declared = parts
                .headers
                .get(header::CONTENT_LENGTH)
                .and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
            if declared.is_some_and(|n| n > LIMIT as u64) {
                return Err(ApiError::new(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    ErrorCode::SizeInvalid,
                    "a token request body holds a few form fields; this one is over 64 KiB",
                ));
            }
            let bytes = axum::body::to_bytes(body, LIMIT).await.map_err(|_| {
                ApiError::new(
                    StatusCode::BAD_REQUEST,
                    ErrorCode::Unsupported,
                    "token request body too large or unreadable",
                )
            })?;
            let form = pairs(&String::from_utf8_lossy(&bytes));
            let get = |k: &str| form.iter().find(|(a, _)| a == k).map(|(_, v)| v.clone());
            match get("grant_type").as_deref() {
                Some("password") | None => {
                    if let (Some(u), Some(p)) = (get("username"), get("password")) {
                        creds = Some((u, p));
                    }
                }
                Some(other) => {
                    return Err(ApiError::new(
                        StatusCode::BAD_REQUEST,
                        ErrorCode::Unsupported,
                        format!(
                            "grant_type {other:?} is not supported; use grant_type=password or GET with Basic credentials"
                        ),
                    ));
                }
            }
            for (k, v) in form {
                if k == "scope" {
                    kv.push((k, v));
                }
            }
        }
        _ => {
            return Err(ApiError::new(
                StatusCode::METHOD_NOT_ALLOWED,
                ErrorCode::Unsupported,
                "use GET or POST",
            ));
        }
    }
    let scopes: Vec<String> = kv
        .into_iter()
        .filter(|(k, _)| k == "scope")
        .map(|(_, v)| v)
        .collect();
    let Some((user, pass)) = creds else {
        if app.auth.anonymous_pull {
            // Docker, podman and skopeo ask for a token without credentials when they have
            // none; with anonymous pulls allowed they get one that pulls and does nothing else.
            let body = serde_json::to_vec(&serde_json::json!({
                "token": ANONYMOUS_TOKEN,
                "access_token": ANONYMOUS_TOKEN,
                "expires_in": 3600,
            }))
            .unwrap_or_default();
            return Ok(Response::builder()
                .status(StatusCode::OK)
                .header(header::CONTENT_TYPE, "application/json")
                .body(axum::body::Body::from(body))
                .unwrap_or_default());
        }
        return Err(basic_unauthorized(
            app,
            "authentication required: log in with a token name and password (docker login -u <token> -p <password>)",
        ));
    };
    let (identity, login) = match app.control.authenticate_until(&user, &pass).await {
        Ok(found) => found,
        Err(e) => return Err(login_error(app, e).await),
    };
    let issued = app
        .control
        .issue_for(&identity, &login, &scopes, &app.auth.service);
    let body = serde_json::to_vec(&issued).unwrap_or_default();
    Ok(Response::builder()
        .status(StatusCode::OK)
        .header(header::CONTENT_TYPE, "application/json")
        .header(header::CACHE_CONTROL, "no-store")
        .body(Body::from(body))
        .unwrap_or_default())
}

/// `401 UNAUTHORIZED` with `message`, asking for Basic credentials: what every endpoint that
/// takes only a token's name and password answers.
pub(crate) fn basic_unauthorized(app: &App, message: impl Into<String>) -> ApiError {
    ApiError::new(StatusCode::UNAUTHORIZED, ErrorCode::Unauthorized, message).with_header(
        header::WWW_AUTHENTICATE,
        &format!("Basic realm=\"{}\"", app.auth.service),
    )
}

/// Who sent a request to an endpoint that takes a token's own name and password only
/// (`what`: the management or gateway API). An access token is refused: it carries
/// repository scopes only, and one scoped to pulling `app` must not read a connected
/// registry's configuration or manage tokens. Every 401 here asks for Basic credentials,
/// wrong ones included (the registry's Bearer challenge would send clients to the token
/// service, which cannot help).
pub(crate) async fn basic_principal(
    app: &App,
    headers: &HeaderMap,
    what: &str,
) -> Result<Principal, ApiError> {
    let p = principal(app, headers).await.map_err(|e| {
        if e.status == StatusCode::UNAUTHORIZED {
            basic_unauthorized(app, e.message)
        } else {
            e
        }
    })?;
    if matches!(p, Principal::Bearer { .. }) {
        return Err(basic_unauthorized(
            app,
            format!(
                "{what} takes a token's name and password (Basic authentication), not an \
                 access token, which carries repository scopes only"
            ),
        ));
    }
    Ok(p)
}
