//! Handlers for the OCI distribution API. One dispatcher matches the parsed [`Route`] and the
//! method; each arm parses headers and query, calls the registry, and renders headers and body
//! the way Docker, containerd, podman, skopeo and oras expect.

use crate::error::ApiError;
use crate::{App, auth};
use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderName, HeaderValue, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use outpost_control::{Principal, RepoAction};
use outpost_oci::manifest::OCI_INDEX;
use outpost_oci::range::{parse_content_range, parse_range};
use outpost_oci::{Digest, ErrorCode, Reference, RepoName, Route};
use outpost_registry::{BlobBody, Registry};

const DIGEST_HEADER: &str = "docker-content-digest";
const UPLOAD_UUID: &str = "docker-upload-uuid";

type Result<T> = std::result::Result<T, ApiError>;

pub(crate) async fn dispatch(State(app): State<App>, req: Request) -> Response {
    let is_head = req.method() == Method::HEAD;
    let uri = app.sync_scope.as_ref().map(|_| req.uri().clone());
    let e = match handle(&app, req).await {
        Ok(r) => return r,
        Err(e) => e,
    };
    let e = match (&uri, &app.sync_scope) {
        (Some(uri), Some(scope)) if e.code == ErrorCode::NameUnknown.as_str() => {
            not_synced(e, uri, scope)
        }
        _ => e,
    };
    let mut r = e.into_response();
    if is_head {
        // HEAD responses carry no body; keep status and headers.
        *r.body_mut() = Body::empty();
    }
    r
}

/// At a connected registry, `NAME_UNKNOWN` for a repository it does not sync says so and how
/// to change it, instead of suggesting that the repository does not exist anywhere.
fn not_synced(
    e: ApiError,
    uri: &axum::http::Uri,
    scope: &tokio::sync::watch::Receiver<outpost_control::connected::SyncScope>,
) -> ApiError {
    let Ok(route) = Route::parse(uri.path()) else {
        return e;
    };
    let Some(name) = route_name(&route) else {
        return e;
    };
    let scope = scope.borrow();
    if scope.covers(name.as_str()) {
        return e;
    }
    ApiError {
        message: format!(
            "repository {name} is not synced by this connected registry: pull it from the \
             parent, or {}",
            add_repository_hint(&scope.name, name.as_str())
        ),
        ..e
    }
}

/// How an operator adds `repo` to the repositories connected registry `site` syncs.
fn add_repository_hint(site: &str, repo: &str) -> String {
    format!(
        "add it to this registry's repositories at the root (`outpost connected-registry \
         permissions update -n {site} --add {repo}`)"
    )
}

#[derive(Default)]
struct Query {
    n: Option<String>,
    last: Option<String>,
    digest: Option<String>,
    mount: Option<String>,
    from: Option<String>,
    artifact_type: Option<String>,
}

fn bad_request(code: ErrorCode, msg: impl Into<String>) -> ApiError {
    ApiError::new(StatusCode::BAD_REQUEST, code, msg)
}

/// `405`, with the `Allow` header RFC 9110 asks for: the methods the endpoint takes.
fn unsupported(method: &Method, allow: &str) -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        ErrorCode::Unsupported,
        format!("method {method} is not supported on this endpoint, which takes {allow}"),
    )
    .with_header(axum::http::header::ALLOW, allow)
}

fn parse_n(q: &Query) -> Result<Option<u32>> {
    q.n.as_deref()
        .filter(|n| !n.is_empty())
        .map(|n| {
            n.parse::<u32>().map_err(|_| {
                bad_request(
                    ErrorCode::Unsupported,
                    format!("n={n:?} is not a valid page size; use a non-negative integer"),
                )
            })
        })
        .transpose()
}

fn query_digest(q: &Query) -> Result<Option<Digest>> {
    q.digest
        .as_deref()
        .map(|d| {
            d.parse::<Digest>()
                .map_err(|e| bad_request(ErrorCode::DigestInvalid, e.to_string()))
        })
        .transpose()
}

fn header_str(h: &HeaderMap, name: impl header::AsHeaderName) -> Option<&str> {
    h.get(name).and_then(|v| v.to_str().ok())
}

async fn handle(app: &App, req: Request) -> Result<Response> {
    let (parts, body) = req.into_parts();
    let route = Route::parse(parts.uri.path())?;
    let query: Query = match parts.uri.query() {
        Some(q) => serde_urlencoded_lite(q),
        None => Query::default(),
    };
    let m = &parts.method;
    let h = &parts.headers;
    let mut reg = &app.registry;
    let local_only: Registry;
    let principal = auth::principal(app, h).await?;
    match required(&route, m) {
        Need::Nothing => {}
        Need::Login => {
            // The base endpoint challenges a client that sent no credentials even where
            // anonymous pulls are allowed: that challenge is how clients learn to log in (or
            // to fetch the anonymous token) before they push. Without it they push without
            // credentials and give up at the 401.
            let base_without_credentials =
                matches!(route, Route::Base) && !h.contains_key(axum::http::header::AUTHORIZATION);
            if !principal.is_authenticated()
                && (!app.auth.anonymous_pull || base_without_credentials)
            {
                return Err(auth::unauthorized(app, h, None));
            }
        }
        Need::Repo(action) => {
            let name = route_name(&route).map(RepoName::as_str).unwrap_or_default();
            let write = !matches!(action, RepoAction::ContentRead | RepoAction::MetadataRead);
            // At a ReadOnly registry a logged-in client's write is refused for that reason,
            // whatever its token may do: no scope could make it succeed here.
            if !(app.read_only && write && principal.is_authenticated()) {
                auth::authorize(app, h, &principal, name, action)?;
            }
            if app.read_only && write {
                return Err(ApiError::new(
                    StatusCode::FORBIDDEN,
                    ErrorCode::Denied,
                    match &app.upstream {
                        Some(upstream) => format!(
                            "this registry is a read-only mirror of {upstream}: push, tag and delete there; changes reach this mirror at its next poll"
                        ),
                        None => "this connected registry is read-only: push, tag and delete at its parent; changes reach this site at the next sync".into(),
                    },
                ));
            }
            if let Some(scope) = &app.sync_scope
                && write
            {
                let scope = scope.borrow();
                if !scope.covers(name) && action == RepoAction::ContentDelete {
                    // What a ReadWrite site kept of a repository that left its scope can be
                    // cleaned up here. The delete stays on this site: its parent no longer
                    // syncs the repository, so the outbox does not send it.
                    local_only = app.registry.for_local();
                    reg = &local_only;
                } else if !scope.covers(name) {
                    return Err(ApiError::new(
                        StatusCode::FORBIDDEN,
                        ErrorCode::Denied,
                        format!(
                            "repository {name} is not synced by this connected registry, so a \
                             change here would never reach its parent: push it at the parent, \
                             or {}",
                            add_repository_hint(&scope.name, name)
                        ),
                    ));
                } else if !scope.sends(name, action) {
                    return Err(ApiError::new(
                        StatusCode::FORBIDDEN,
                        ErrorCode::Denied,
                        format!(
                            "repository {name} is synced read-only to this connected registry \
                             (its sync token may not {} it at the parent, as when it was added \
                             for a ReadOnly child), so a change here would never reach its \
                             parent: push it at the parent, or {}",
                            action.as_str(),
                            add_repository_hint(&scope.name, name)
                        ),
                    ));
                }
            }
        }
    }
    // An upload another replica holds is answered there.
    if let Route::Upload { id, .. } = &route
        && !h.contains_key(crate::replicas::FORWARDED)
        && let Some(replica) = reg.upload_elsewhere(id).await?
    {
        return crate::replicas::forward(&replica, id, m, &parts.uri, h, body).await;
    }
    match route {
        Route::Base => match *m {
            Method::GET | Method::HEAD => Ok(json_response(StatusCode::OK, b"{}".to_vec())),
            _ => Err(unsupported(m, "GET, HEAD")),
        },
        Route::Catalog => {
            if *m != Method::GET {
                return Err(unsupported(m, "GET"));
            }
            let n = parse_n(&query)?;
            // Only what the caller may read (metadata/read), as ACR does. The page is filled
            // from visible names only, and the `Link` continues after the last visible one,
            // so neither the body nor the header names a repository the caller may not see.
            let want = n.map(|n| n as usize);
            let mut repos: Vec<String> = Vec::new();
            let mut after = query.last.clone();
            let mut more = false;
            while want != Some(0) {
                let batch = n.map(|n| n.max(CATALOG_SCAN));
                let page = reg.catalog(batch, after.as_deref()).await?;
                let exhausted = batch.is_none_or(|b| page.len() < b as usize);
                after = page.last().cloned();
                let mut rest = page.into_iter();
                for r in rest.by_ref() {
                    if principal.identity_allows(&r, RepoAction::MetadataRead) {
                        repos.push(r);
                        if want.is_some_and(|w| repos.len() >= w) {
                            break;
                        }
                    }
                }
                if want.is_some_and(|w| repos.len() >= w) {
                    more = rest.any(|r| principal.identity_allows(&r, RepoAction::MetadataRead))
                        || !exhausted;
                    break;
                }
                if exhausted {
                    break;
                }
            }
            let link = if more {
                next_link("/v2/_catalog", n, &repos)
            } else {
                None
            };
            let body = serde_json::json!({ "repositories": repos });
            Ok(with_link(
                json_response(StatusCode::OK, body.to_string().into_bytes()),
                link,
            ))
        }
        Route::Tags { name } => {
            if *m != Method::GET {
                return Err(unsupported(m, "GET"));
            }
            let n = parse_n(&query)?;
            // One more than asked for says whether there is a next page: no `Link` to an
            // empty one when exactly `n` tags remain.
            let mut tags = reg
                .tags(&name, n.map(|n| n.saturating_add(1)), query.last.as_deref())
                .await?;
            let more = n.is_some_and(|n| tags.len() > n as usize);
            if let Some(n) = n {
                tags.truncate(n as usize);
            }
            let link = more
                .then(|| next_link(&format!("/v2/{name}/tags/list"), n, &tags))
                .flatten();
            let body = serde_json::json!({ "name": name.as_str(), "tags": tags });
            Ok(with_link(
                json_response(StatusCode::OK, body.to_string().into_bytes()),
                link,
            ))
        }
        Route::Manifest { name, reference } => match *m {
            Method::GET | Method::HEAD => {
                let mf = reg.get_manifest(&name, &reference).await?;
                let len = mf.content.len();
                let body = if *m == Method::HEAD {
                    Body::empty()
                } else {
                    Body::from(mf.content)
                };
                let digest = mf.digest.to_string();
                if let Some(r) = not_modified(h, &digest) {
                    return Ok(r);
                }
                Ok(Response::builder()
                    .status(StatusCode::OK)
                    .header(header::CONTENT_TYPE, mf.media_type)
                    .header(header::CONTENT_LENGTH, len)
                    .header(DIGEST_HEADER, &digest)
                    .header(header::ETAG, format!("\"{digest}\""))
                    .body(body)
                    .unwrap_or_default())
            }
            Method::PUT => put_manifest(app, &name, &reference, h, body).await,
            Method::DELETE => {
                let at = reg.delete_manifest(&name, &reference).await?;
                let mut resp = StatusCode::ACCEPTED.into_response();
                // A tag's removal says where it stands in the event log, as a put by tag
                // does: a ReadWrite site skips the older events for the tag that its feed
                // still brings.
                if let Some(at) = at {
                    resp.headers_mut()
                        .insert(LOG_POSITION_HEADER, HeaderValue::from(at));
                }
                Ok(resp)
            }
            _ => Err(unsupported(m, "GET, HEAD, PUT, DELETE")),
        },
        Route::Blob { name, digest } => match *m {
            Method::GET | Method::HEAD => {
                get_blob(app, &name, &digest, h, *m == Method::HEAD).await
            }
            Method::DELETE => {
                reg.delete_blob(&name, &digest).await?;
                Ok(StatusCode::ACCEPTED.into_response())
            }
            _ => Err(unsupported(m, "GET, HEAD, DELETE")),
        },
        Route::UploadStart { name } => {
            if *m != Method::POST {
                return Err(unsupported(m, "POST"));
            }
            start_upload(app, &principal, &name, &query, body).await
        }
        Route::Upload { name, id } => match *m {
            Method::GET => {
                let size = reg.upload_status(&name, &id).await?;
                Ok(upload_response(StatusCode::NO_CONTENT, &name, &id, size))
            }
            Method::PATCH => {
                let start = match chunk_start(reg, &name, &id, h).await {
                    Ok(s) => s,
                    Err(e) => {
                        drain(body).await;
                        return Err(e);
                    }
                };
                let (start, count) = start.map_or((None, None), |c| (Some(c.start), c.count));
                let size = reg
                    .append_upload(&name, &id, start, chunk_body(body, count))
                    .await
                    .map_err(|e| at_upload(ApiError::from(e), &name, &id))?;
                Ok(upload_response(StatusCode::ACCEPTED, &name, &id, size))
            }
            Method::PUT => {
                let digest = query_digest(&query).and_then(|d| {
                    d.ok_or_else(|| {
                        bad_request(
                            ErrorCode::DigestInvalid,
                            "completing an upload needs ?digest=<algorithm:hex>",
                        )
                    })
                });
                // The closing PUT may carry the last chunk, with its Content-Range checked as
                // a PATCH's is: out of order, it is refused and the upload kept.
                let checked = match digest {
                    Ok(d) => chunk_start(reg, &name, &id, h).await.map(|s| (d, s)),
                    Err(e) => Err(e),
                };
                let (digest, start) = match checked {
                    Ok(v) => v,
                    Err(e) => {
                        drain(body).await;
                        return Err(e);
                    }
                };
                let (start, count) = start.map_or((None, None), |c| (Some(c.start), c.count));
                reg.finish_upload(&name, &id, &digest, start, Some(chunk_body(body, count)))
                    .await
                    .map_err(|e| at_upload(ApiError::from(e), &name, &id))?;
                Ok(blob_created(&name, &digest))
            }
            Method::DELETE => {
                reg.cancel_upload(&name, &id).await?;
                Ok(StatusCode::NO_CONTENT.into_response())
            }
            _ => Err(unsupported(m, "GET, PATCH, PUT, DELETE")),
        },
        Route::Referrers { name, digest } => {
            if *m != Method::GET {
                return Err(unsupported(m, "GET"));
            }
            let filter = query.artifact_type.as_deref().filter(|a| !a.is_empty());
            let body = reg.referrers(&name, &digest, filter).await?;
            let mut resp = Response::builder()
                .status(StatusCode::OK)
                .header(header::CONTENT_TYPE, OCI_INDEX)
                .body(Body::from(body))
                .unwrap_or_default();
            if filter.is_some() {
                resp.headers_mut().insert(
                    "oci-filters-applied",
                    HeaderValue::from_static("artifactType"),
                );
            }
            Ok(resp)
        }
    }
}

/// What a request must be allowed to do before it is served.
enum Need {
    Nothing,
    /// Any valid credentials (or anonymous pull turned on).
    Login,
    /// An action on the route's repository.
    Repo(RepoAction),
}

fn required(route: &Route, m: &Method) -> Need {
    use RepoAction::*;
    let read = matches!(*m, Method::GET | Method::HEAD);
    match route {
        Route::Base | Route::Catalog => Need::Login,
        Route::Tags { .. } | Route::Referrers { .. } if read => Need::Repo(MetadataRead),
        Route::Manifest { .. } | Route::Blob { .. } if read => Need::Repo(ContentRead),
        Route::Manifest { .. } if *m == Method::PUT => Need::Repo(ContentWrite),
        Route::Manifest { .. } | Route::Blob { .. } if *m == Method::DELETE => {
            Need::Repo(ContentDelete)
        }
        Route::UploadStart { .. } | Route::Upload { .. } => Need::Repo(ContentWrite),
        _ => Need::Nothing, // the dispatcher answers 405
    }
}

fn route_name(route: &Route) -> Option<&RepoName> {
    match route {
        Route::Base | Route::Catalog => None,
        Route::Tags { name }
        | Route::Manifest { name, .. }
        | Route::Blob { name, .. }
        | Route::UploadStart { name }
        | Route::Upload { name, .. }
        | Route::Referrers { name, .. } => Some(name),
    }
}

/// Query strings here are simple `k=v&k=v` pairs; values are percent-decoded.
fn serde_urlencoded_lite(q: &str) -> Query {
    let mut out = Query::default();
    for pair in q.split('&') {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        let v = percent_decode(v);
        match k {
            "n" => out.n = Some(v),
            "last" => out.last = Some(v),
            "digest" => out.digest = Some(v),
            "mount" => out.mount = Some(v),
            "from" => out.from = Some(v),
            "artifactType" => out.artifact_type = Some(v),
            _ => {}
        }
    }
    out
}

pub(crate) fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'%' if i + 2 < b.len() => {
                let hex = std::str::from_utf8(&b[i + 1..i + 3])
                    .ok()
                    .and_then(|h| u8::from_str_radix(h, 16).ok());
                match hex {
                    Some(v) => {
                        out.push(v);
                        i += 3;
                    }
                    None => {
                        out.push(b'%');
                        i += 1;
                    }
                }
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            c => {
                out.push(c);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Where a chunk (a PATCH's body, or a closing PUT's) says it starts: its `Content-Range`,
/// checked against its `Content-Length`. A malformed range is a 416 that tells the client
/// where the upload is.
async fn chunk_start(
    reg: &outpost_registry::Registry,
    name: &RepoName,
    id: &str,
    h: &HeaderMap,
) -> Result<Option<Chunk>> {
    let Some(cr) = header_str(h, header::CONTENT_RANGE) else {
        return Ok(None);
    };
    let Ok(r) = parse_content_range(cr) else {
        let size = reg.upload_status(name, id).await?;
        let e = ApiError::new(
            StatusCode::RANGE_NOT_SATISFIABLE,
            ErrorCode::BlobUploadInvalid,
            format!(
                "Content-Range {:?} is not <start>-<end> (the chunk's first and last byte \
                 offsets, as in 0-1048575)",
                cr.chars().take(100).collect::<String>()
            ),
        )
        .with_header(header::RANGE, &format!("0-{}", size.saturating_sub(1)));
        return Err(at_upload(e, name, id));
    };
    let length = content_length(h)?;
    if let Some(len) = length
        && len != r.len()
    {
        return Err(bad_request(
            ErrorCode::SizeInvalid,
            format!(
                "Content-Length {len} does not match Content-Range {cr} ({} bytes)",
                r.len()
            ),
        ));
    }
    Ok(Some(Chunk {
        start: r.start,
        // With a Content-Length the server holds the body to it; without (chunked transfer
        // encoding), the bytes are counted as they come.
        count: length.is_none().then_some(r.len()),
    }))
}

/// Where a chunk starts, and how many bytes it must hold when nothing else checks that.
struct Chunk {
    start: u64,
    count: Option<u64>,
}

/// A request body as an upload takes it: when the chunk's length is only known from its
/// Content-Range, a body longer or shorter than that fails (the upload keeps what it had
/// before the chunk).
fn chunk_body(
    body: Body,
    count: Option<u64>,
) -> impl futures_util::Stream<Item = std::result::Result<bytes::Bytes, String>> + Send + Unpin {
    use futures_util::{StreamExt, TryStreamExt};
    let stream = body.into_data_stream().map_err(|e| e.to_string());
    match count {
        None => futures_util::future::Either::Left(stream),
        Some(expected) => {
            futures_util::future::Either::Right(Box::pin(futures_util::stream::unfold(
                (stream, 0u64, false),
                move |(mut inner, seen, done)| async move {
                    if done {
                        return None;
                    }
                    match inner.next().await {
                        Some(Ok(b)) if seen + b.len() as u64 > expected => Some((
                            Err(format!(
                                "the chunk is longer than the {expected} bytes its Content-Range says"
                            )),
                            (inner, seen, true),
                        )),
                        Some(Ok(b)) => {
                            let seen = seen + b.len() as u64;
                            Some((Ok(b), (inner, seen, false)))
                        }
                        Some(Err(e)) => Some((Err(e), (inner, seen, true))),
                        None if seen < expected => Some((
                            Err(format!(
                                "the chunk ended after {seen} of the {expected} bytes its \
                             Content-Range says"
                            )),
                            (inner, seen, true),
                        )),
                        None => None,
                    }
                },
            )))
        }
    }
}

/// A 416 tells the client where the upload is: its `Range` (set by the caller), `Location`
/// and id.
fn at_upload(api: ApiError, name: &RepoName, id: &str) -> ApiError {
    if api.status == StatusCode::RANGE_NOT_SATISFIABLE {
        api.with_header(header::LOCATION, &format!("/v2/{name}/blobs/uploads/{id}"))
            .with_header(HeaderName::from_static(UPLOAD_UUID), id)
    } else {
        api
    }
}

/// A push's `If-Match`/`If-None-Match` (RFC 9110 §13.1.1-2) on a tag, whose entity tag is
/// the quoted digest it points at (the ETag a manifest GET answers with). `If-Match` compares
/// strongly, so a weak tag (`W/"…"`) never matches it; `If-None-Match` weakly.
fn tag_condition(h: &HeaderMap) -> Option<outpost_registry::TagCondition> {
    let list = |name: HeaderName, weak: bool| -> Option<Vec<String>> {
        let mut out = Vec::new();
        let mut seen = false;
        for v in h.get_all(name) {
            seen = true;
            for e in String::from_utf8_lossy(v.as_bytes()).split(',') {
                let e = e.trim();
                // A weak tag stays marked as one (`W/sha256:…`), so it never equals a digest.
                let (mark, tag) = match e.strip_prefix("W/") {
                    Some(t) if !weak => ("W/", t),
                    Some(t) => ("", t),
                    None => ("", e),
                };
                if !tag.is_empty() {
                    out.push(format!("{mark}{}", tag.trim_matches('"')));
                }
            }
        }
        seen.then_some(out)
    };
    let c = outpost_registry::TagCondition {
        if_match: list(header::IF_MATCH, false),
        if_none_match: list(header::IF_NONE_MATCH, true),
    };
    (c != outpost_registry::TagCondition::default()).then_some(c)
}

fn content_length(h: &HeaderMap) -> Result<Option<u64>> {
    header_str(h, header::CONTENT_LENGTH)
        .map(|v| {
            v.trim().parse::<u64>().map_err(|_| {
                bad_request(
                    ErrorCode::SizeInvalid,
                    format!("Content-Length {v:?} is not a number"),
                )
            })
        })
        .transpose()
}

fn json_response(status: StatusCode, body: Vec<u8>) -> Response {
    (status, [(header::CONTENT_TYPE, "application/json")], body).into_response()
}

/// Reads and drops what is left of a request body (up to 64 MiB) before an error answer goes
/// out. Answering with unread request bytes makes the connection close with a reset, which can
/// destroy the answer on its way: the client would see "connection reset" instead of, say, the
/// 416 and `Range` it needs to resume.
async fn drain(body: Body) {
    use futures_util::StreamExt;
    const LIMIT: usize = 64 << 20;
    let mut stream = body.into_data_stream();
    let mut drained = 0;
    while drained < LIMIT {
        match stream.next().await {
            Some(Ok(chunk)) => drained += chunk.len(),
            _ => break,
        }
    }
}

/// How many names one catalog query reads when filling a page for a caller who may see only
/// some repositories.
const CATALOG_SCAN: u32 = 1000;

fn next_link(path: &str, n: Option<u32>, items: &[String]) -> Option<String> {
    let n = n?;
    if n == 0 || items.len() < n as usize {
        return None;
    }
    let last = items.last()?;
    Some(format!("<{path}?n={n}&last={last}>; rel=\"next\""))
}

fn with_link(mut resp: Response, link: Option<String>) -> Response {
    if let Some(l) = link
        && let Ok(v) = HeaderValue::from_str(&l)
    {
        resp.headers_mut().insert(header::LINK, v);
    }
    resp
}

fn upload_response(status: StatusCode, name: &RepoName, id: &str, size: u64) -> Response {
    Response::builder()
        .status(status)
        .header(header::LOCATION, format!("/v2/{name}/blobs/uploads/{id}"))
        .header(header::RANGE, format!("0-{}", size.saturating_sub(1)))
        .header(UPLOAD_UUID, id)
        .header(header::CONTENT_LENGTH, 0)
        .body(Body::empty())
        .unwrap_or_default()
}

/// `304 Not Modified` when the request's `If-None-Match` names the content's ETag (its
/// digest, quoted) or is `*`: a client that already holds a manifest or blob is not sent it
/// again (RFC 9110 §13.1.2; weak tags compare like strong ones for a GET).
fn not_modified(h: &HeaderMap, digest: &str) -> Option<Response> {
    let inm = header_str(h, header::IF_NONE_MATCH)?;
    let hit = inm
        .split(',')
        .map(str::trim)
        .any(|t| t == "*" || t.strip_prefix("W/").unwrap_or(t).trim_matches('"') == digest);
    hit.then(|| {
        Response::builder()
            .status(StatusCode::NOT_MODIFIED)
            .header(DIGEST_HEADER, digest)
            .header(header::ETAG, format!("\"{digest}\""))
            .body(Body::empty())
            .unwrap_or_default()
    })
}

fn blob_created(name: &RepoName, digest: &Digest) -> Response {
    Response::builder()
        .status(StatusCode::CREATED)
        .header(header::LOCATION, format!("/v2/{name}/blobs/{digest}"))
        .header(DIGEST_HEADER, digest.to_string())
        .header(header::CONTENT_LENGTH, 0)
        .body(Body::empty())
        .unwrap_or_default()
}

async fn start_upload(
    app: &App,
    principal: &Principal,
    name: &RepoName,
    q: &Query,
    body: Body,
) -> Result<Response> {
    let reg = &app.registry;
    if let (Some(mount), Some(from)) = (&q.mount, &q.from) {
        // A source the caller may not read, or an invalid digest or source, falls back to a
        // normal upload, as the spec requires: a mount must never reveal what the caller
        // cannot pull.
        if let Ok(digest) = mount.parse::<Digest>()
            && let Ok(from) = from.parse::<RepoName>()
            && principal.allows(from.as_str(), RepoAction::ContentRead)
            && reg.mount_blob(name, &digest, &from).await?.is_some()
        {
            return Ok(blob_created(name, &digest));
        }
    }
    // The digest is checked before a session exists, and a failed single-request upload is
    // cancelled: the client never learns its location, so nothing else would clean it up.
    let digest = match query_digest(q) {
        Ok(d) => d,
        Err(e) => {
            drain(body).await;
            return Err(e);
        }
    };
    let id = reg.start_upload(name).await?;
    if let Some(digest) = digest {
        if let Err(e) = reg
            .finish_upload(name, &id, &digest, None, Some(body.into_data_stream()))
            .await
        {
            let _ = reg.cancel_upload(name, &id).await;
            return Err(e.into());
        }
        return Ok(blob_created(name, &digest));
    }
    Ok(upload_response(StatusCode::ACCEPTED, name, &id, 0))
}

async fn put_manifest(
    app: &App,
    name: &RepoName,
    reference: &Reference,
    h: &HeaderMap,
    body: Body,
) -> Result<Response> {
    let limit = app.registry.config().max_manifest_bytes;
    let too_large = |size: String| {
        ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            ErrorCode::SizeInvalid,
            format!("manifest is {size} bytes, larger than this registry's {limit} byte limit"),
        )
    };
    if let Some(len) = content_length(h)?
        && len > limit as u64
    {
        // A client that waits for `100 Continue` is answered without it, and sends nothing;
        // any other is heard out (up to a bound), so it reads the answer instead of a reset.
        let waits = h
            .get(header::EXPECT)
            .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"100-continue"));
        if !waits {
            drain(body).await;
        }
        return Err(too_large(len.to_string()));
    }
    let bytes =
        axum::body::to_bytes(body, limit).await.map_err(|e| {
            match std::error::Error::source(&e) {
                Some(s) if s.to_string().contains("length limit") => {
                    too_large(format!("{} or more", limit + 1))
                }
                _ => bad_request(
                    ErrorCode::ManifestInvalid,
                    format!("could not read the manifest body: {e}"),
                ),
            }
        })?;
    let condition = match reference {
        Reference::Tag(_) => tag_condition(h),
        // A digest names one immutable manifest: there is nothing to compare.
        Reference::Digest(_) => None,
    };
    let pushed = app
        .registry
        .put_manifest_if(
            name,
            reference,
            header_str(h, header::CONTENT_TYPE),
            &bytes,
            condition.as_ref(),
        )
        .await?;
    let mut resp = Response::builder()
        .status(StatusCode::CREATED)
        .header(
            header::LOCATION,
            format!("/v2/{name}/manifests/{}", pushed.digest),
        )
        .header(DIGEST_HEADER, pushed.digest.to_string())
        .header(header::CONTENT_LENGTH, 0)
        .body(Body::empty())
        .unwrap_or_default();
    if let Some(s) = pushed.subject
        && let Ok(v) = HeaderValue::from_str(&s.to_string())
    {
        resp.headers_mut().insert("oci-subject", v);
    }
    // A put by tag says what it replaced, for a ReadWrite site's conflict report.
    if matches!(reference, Reference::Tag(_))
        && let Ok(v) = HeaderValue::from_str(pushed.replaced.as_deref().unwrap_or("none"))
    {
        resp.headers_mut().insert(REPLACED_HEADER, v);
        // And where it stands in the event log, so that the site can tell the older events
        // for the tag that its feed still brings from the echo of this write.
        resp.headers_mut()
            .insert(LOG_POSITION_HEADER, HeaderValue::from(pushed.log_position));
    }
    Ok(resp)
}

/// On a `PUT` of a manifest by tag: the digest the tag pointed at before, or `none`.
const REPLACED_HEADER: &str = "outpost-replaced-digest";
/// On a `PUT` of a manifest by tag, and a `DELETE` of a tag: the newest event in the log
/// once it committed.
const LOG_POSITION_HEADER: &str = "outpost-log-position";

async fn get_blob(
    app: &App,
    name: &RepoName,
    digest: &Digest,
    h: &HeaderMap,
    head: bool,
) -> Result<Response> {
    let reg = &app.registry;
    // A HEAD answers for the file too: clients skip pushing a blob HEAD calls present, so a
    // lost file would never be pushed again. (A GET finds out when it opens the file.)
    let size = match head {
        true => reg.blob_size_checked(name, digest).await?,
        false => reg.blob_size(name, digest).await?,
    };
    if let Some(r) = not_modified(h, &digest.to_string()) {
        return Ok(r);
    }
    // RFC 9110 §14.2: a range in a unit other than bytes, or one the server does not support
    // (several ranges) or cannot parse, is ignored and the whole blob is served; only a
    // well-formed range outside the blob is answered 416.
    let range = match header_str(h, header::RANGE).map(|r| parse_range(r, size)) {
        Some(Ok(r)) => Some(r),
        Some(Err(e @ outpost_oci::RangeError::Unsatisfiable { .. })) => {
            return Err(ApiError::new(
                StatusCode::RANGE_NOT_SATISFIABLE,
                ErrorCode::RangeInvalid,
                e.to_string(),
            )
            .with_header(header::CONTENT_RANGE, &format!("bytes */{size}")));
        }
        Some(Err(_)) | None => None,
    };
    let mut b = Response::builder()
        .header(header::CONTENT_TYPE, "application/octet-stream")
        .header(DIGEST_HEADER, digest.to_string())
        .header(header::ETAG, format!("\"{digest}\""))
        .header(header::ACCEPT_RANGES, "bytes");
    let len = match range {
        Some(r) => {
            b = b.status(StatusCode::PARTIAL_CONTENT).header(
                header::CONTENT_RANGE,
                format!("bytes {}-{}/{size}", r.start, r.end),
            );
            r.len()
        }
        None => {
            b = b.status(StatusCode::OK);
            size
        }
    };
    b = b.header(header::CONTENT_LENGTH, len);
    if head {
        return Ok(b.body(Body::empty()).unwrap_or_default());
    }
    // A memory-mapped blob goes to the socket without a copy through a user-space buffer.
    let body = match reg.read_blob(name, digest, range).await? {
        BlobBody::Mapped(bytes) => Body::new(Sliced(bytes)),
        BlobBody::Streamed { stream, .. } => Body::from_stream(stream),
    };
    Ok(b.body(body).unwrap_or_default())
}

/// A mapped blob handed to the connection a few MiB at a time (each piece still without a
/// copy): the connection asks for the next piece only once it has written the previous, so
/// what is counted as sent ([`crate::Counted`]) is what went out, give or take a piece,
/// also when the client hangs up half way.
struct Sliced(bytes::Bytes);

/// How much of a mapped blob is handed over at once.
const SLICE: usize = 4 << 20;

impl http_body::Body for Sliced {
    type Data = bytes::Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        _cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<std::result::Result<http_body::Frame<bytes::Bytes>, Self::Error>>>
    {
        if self.0.is_empty() {
            return std::task::Poll::Ready(None);
        }
        let n = self.0.len().min(SLICE);
        let piece = self.0.split_to(n);
        std::task::Poll::Ready(Some(Ok(http_body::Frame::data(piece))))
    }

    fn is_end_stream(&self) -> bool {
        self.0.is_empty()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        http_body::SizeHint::with_exact(self.0.len() as u64)
    }
}
