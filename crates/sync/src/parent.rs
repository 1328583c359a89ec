//! The client for a parent: its gateway API (activation, configuration, messages, status)
//! and the content it serves on `/v2/` (tags, manifests, blobs with `Range`), all with the
//! sync token's credentials.

use crate::SyncError;
use bytes::Bytes;
use futures_util::Stream;
use outpost_control::ConnectionString;
use outpost_control::connected::{MessagePage, StatusReport, SyncConfig};
use reqwest::{Method, StatusCode};
use serde_json::Value;
use std::time::Duration;

pub const MANIFEST_ACCEPT: &str = "application/vnd.oci.image.index.v1+json, application/vnd.oci.image.manifest.v1+json, \
     application/vnd.docker.distribution.manifest.list.v2+json, application/vnd.docker.distribution.manifest.v2+json";

#[derive(Clone)]
pub struct Parent {
    base: String,
    name: String,
    user: String,
    password: Option<String>,
    http: reqwest::Client,
    /// For long-polls of the message feed, which wait in silence by design: no read timeout,
    /// only a bound on the whole request.
    poll_http: reqwest::Client,
    /// Bearer tokens from a registry's token service (Docker token authentication), by the
    /// repository scope they were issued for: a plain parent such as Harbor, or one behind a
    /// token service, answers 401 with a `Bearer` challenge instead of accepting Basic.
    bearer: std::sync::Arc<std::sync::Mutex<std::collections::HashMap<String, String>>>,
    /// Whether a `Bearer` challenge is followed: only for a plain registry. An Outpost parent
    /// takes the sync token as Basic credentials, and its password must not be sent to a
    /// token service a challenge names.
    follow_bearer: bool,
    /// The extra CA file trusted for the parent, named in certificate errors.
    ca_file: Option<std::path::PathBuf>,
    /// When the parent last showed it has no referrers API.
    no_referrers_api: std::sync::Arc<std::sync::Mutex<Option<std::time::Instant>>>,
    /// Until when the parent asked not to be called again (a `429` or `503` with
    /// `Retry-After`).
    not_before: std::sync::Arc<std::sync::Mutex<Option<std::time::Instant>>>,
    /// Repositories a plain upstream said it does not have (each warned about once).
    missing_repos: std::sync::Arc<std::sync::Mutex<std::collections::HashSet<String>>>,
}

/// The most a JSON answer of the parent (configuration, message feed, listings, a token) may
/// hold. The largest real ones (a page of 500 messages, 1000 tags, a configuration with its
/// client tokens) are well under 1 MiB: anything near this is a broken or hostile parent, and
/// must not be read into memory whole.
const MAX_JSON: usize = 32 << 20;
/// The most of an error answer's body read for its message.
const MAX_ERROR_BODY: usize = 64 << 10;
/// The most a manifest from the parent may hold: `max_manifest_bytes` refuses larger ones when
/// they are stored anyway, and this bounds what is read before that.
pub const MAX_MANIFEST: usize = 64 << 20;
/// The most referrers of one manifest fetched: a listing that names more (or one digest over
/// and over) is cut here, and said so.
const MAX_REFERRERS: usize = 10_000;

/// The longest `Retry-After` honoured: a parent asking for more is tried again after this.
const RETRY_AFTER_MAX: Duration = Duration::from_secs(3600);

/// How long a `Retry-After` header asks to wait: delta-seconds or an HTTP date (RFC 9110
/// §10.2.3), capped at [`RETRY_AFTER_MAX`].
fn retry_after(value: &str, now: jiff::Timestamp) -> Option<Duration> {
    let value = value.trim();
    let wait = match value.parse::<u64>() {
        Ok(secs) => Duration::from_secs(secs),
        Err(_) => {
            let at = jiff::fmt::rfc2822::DateTimeParser::new()
                .parse_timestamp(value)
                .ok()?;
            Duration::try_from(at.duration_since(now)).unwrap_or_default()
        }
    };
    Some(wait.min(RETRY_AFTER_MAX))
}

/// Where a tag's put or removal stands in an Outpost parent's event log (its
/// `Outpost-Log-Position` answer; a plain registry sends none).
fn log_position(resp: &reqwest::Response) -> Option<i64> {
    resp.headers()
        .get("outpost-log-position")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
}

/// The answer to a cross-repository mount request.
pub enum Mount {
    /// The parent linked the blob it already had.
    Mounted,
    /// It did not; an upload was started at this location instead.
    Upload(String),
}

/// What an Outpost parent says about a manifest put by tag (a plain registry says neither).
pub struct PutAnswer {
    /// What the tag pointed at before (`Some(None)`: nothing).
    pub replaced: Option<Option<String>>,
    /// The newest event in the parent's log once the put committed.
    pub log_position: Option<i64>,
}

/// The answer to a message-feed request.
pub enum Feed {
    Page(MessagePage),
    /// The cursor expired (or is unknown to the parent): reconcile, then continue from `latest`.
    Expired {
        latest: i64,
    },
}

/// CA certificates trusted for the parent besides the system's (`parent_ca_file`), for a root
/// whose certificate a private CA signed.
#[derive(Clone)]
pub struct ParentCa {
    certs: Vec<reqwest::Certificate>,
    path: std::path::PathBuf,
}

impl std::fmt::Debug for ParentCa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ParentCa")
            .field("path", &self.path)
            .field("certificates", &self.certs.len())
            .finish()
    }
}

impl ParentCa {
    /// Reads a PEM bundle; it must hold at least one certificate.
    pub fn load(path: &std::path::Path) -> Result<ParentCa, SyncError> {
        let pem = std::fs::read(path).map_err(|e| {
            SyncError::Client(format!("reading parent CA file {}: {e}", path.display()))
        })?;
        let certs = reqwest::Certificate::from_pem_bundle(&pem)
            .ok()
            .filter(|c| !c.is_empty())
            .ok_or_else(|| {
                SyncError::Client(format!(
                    "parent CA file {}: no PEM certificate found (expected \"-----BEGIN CERTIFICATE-----\")",
                    path.display()
                ))
            })?;
        Ok(ParentCa {
            certs,
            path: path.to_path_buf(),
        })
    }
}

/// The HTTP client for a parent: system roots plus `ca`, a bounded connect time and, if given,
/// a bound on the silence between two reads.
fn client(
    ca: Option<&ParentCa>,
    read_timeout: Option<Duration>,
) -> Result<reqwest::Client, SyncError> {
    // Idle connections are given up before the parent closes them (after 60 s), so a
    // request is not sent on a connection the parent is just closing.
    // Named, so the parent's operator can tell whose requests these are.
    let mut b = reqwest::Client::builder()
        .user_agent(format!("outpost/{} (sync)", outpost_registry::version()))
        .connect_timeout(Duration::from_secs(10))
        .pool_idle_timeout(Duration::from_secs(30));
    if let Some(t) = read_timeout {
        b = b.read_timeout(t);
    }
    if let Some(ca) = ca {
        for c in &ca.certs {
            b = b.add_root_certificate(c.clone());
        }
        tracing::debug!(file = %ca.path.display(), n = ca.certs.len(), "trusting extra CA certificates for the parent");
    }
    b.build().map_err(|e| SyncError::Client(e.to_string()))
}

/// A `WWW-Authenticate: Bearer realm="…",service="…",scope="…"` challenge.
#[derive(Debug, PartialEq, Eq)]
struct Challenge {
    realm: String,
    service: Option<String>,
    scope: Option<String>,
}

/// The Bearer challenge of a 401, if it has one with an `http(s)` realm.
fn bearer_challenge(resp: &reqwest::Response) -> Option<Challenge> {
    resp.headers()
        .get_all(reqwest::header::WWW_AUTHENTICATE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .find_map(parse_challenge)
}

fn parse_challenge(header: &str) -> Option<Challenge> {
    let (scheme, params) = header.trim().split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("bearer") {
        return None;
    }
    let mut realm = None;
    let mut service = None;
    let mut scope = None;
    // key="value" pairs separated by commas; values may themselves hold commas (scopes do).
    let mut rest = params.trim();
    while !rest.is_empty() {
        let (key, after) = rest.split_once('=')?;
        let after = after.trim_start();
        let (value, next) = match after.strip_prefix('"') {
            Some(quoted) => {
                let end = quoted.find('"')?;
                (&quoted[..end], &quoted[end + 1..])
            }
            None => match after.find(',') {
                Some(i) => (&after[..i], &after[i..]),
                None => (after, ""),
            },
        };
        match key.trim().to_ascii_lowercase().as_str() {
            "realm" => realm = Some(value.to_string()),
            "service" => service = Some(value.to_string()),
            "scope" => scope = Some(value.to_string()),
            _ => {}
        }
        rest = next.trim_start().trim_start_matches(',').trim_start();
    }
    let realm = realm.filter(|r| r.starts_with("http://") || r.starts_with("https://"))?;
    Some(Challenge {
        realm,
        service,
        scope,
    })
}

/// The key a token is kept under: the repository a `/v2/<repo>/…` path names (tokens are
/// issued per repository scope), or "" for registry-wide paths.
fn scope_key(path: &str) -> String {
    let Some(rest) = path.strip_prefix("/v2/") else {
        return String::new();
    };
    for marker in ["/manifests/", "/blobs/", "/tags/", "/referrers/"] {
        if let Some(i) = rest.find(marker) {
            return rest[..i].to_string();
        }
    }
    String::new()
}

fn set_bearer(req: &mut reqwest::Request, token: &str) {
    if let Ok(v) = reqwest::header::HeaderValue::from_str(&format!("Bearer {token}")) {
        req.headers_mut().insert(reqwest::header::AUTHORIZATION, v);
    }
}

/// A transport error with its causes (reqwest's own message omits them: "error sending
/// request" hides "invalid peer certificate: UnknownIssuer"), plus what to do about an
/// untrusted certificate.
fn reason(e: &reqwest::Error, ca_file: Option<&std::path::Path>) -> String {
    let mut out = outpost_oci::error::error_chain(e);
    let given = ca_file.map(|p| p.display().to_string());
    if let Some(hint) = outpost_oci::error::certificate_hint(
        &out,
        "pass that CA with --parent-ca-file or OUTPOST_PARENT_CA_FILE",
        given.as_deref(),
    ) {
        out.push_str(&format!(" ({hint})"));
    }
    out
}

impl Parent {
    /// An answer's body, refused once it passes `limit` bytes (by its `Content-Length` at
    /// once, else as it arrives): a parent that sends without end must not fill the memory.
    async fn body(
        &self,
        mut resp: reqwest::Response,
        limit: usize,
        what: &str,
    ) -> Result<Bytes, SyncError> {
        let too_big = |size: String| {
            SyncError::Protocol(format!(
                "the parent's answer ({what}) is {size}, more than the {} MiB this registry \
                 reads from it: the parent (or a proxy before it) is broken",
                limit >> 20
            ))
        };
        if let Some(n) = resp.content_length()
            && n > limit as u64
        {
            return Err(too_big(format!("{n} bytes")));
        }
        let mut out = bytes::BytesMut::new();
        loop {
            let chunk = resp.chunk().await.map_err(|e| SyncError::Unreachable {
                parent: self.base.clone(),
                reason: format!("reading the {what}: {e}"),
            })?;
            let Some(chunk) = chunk else {
                return Ok(out.freeze());
            };
            if out.len() + chunk.len() > limit {
                return Err(too_big(format!(
                    "over {} bytes",
                    out.len() + chunk.len() - 1
                )));
            }
            out.extend_from_slice(&chunk);
        }
    }

    /// A JSON answer, read with [`MAX_JSON`] as its bound.
    async fn json<T: serde::de::DeserializeOwned>(
        &self,
        resp: reqwest::Response,
        what: &str,
    ) -> Result<T, SyncError> {
        let bytes = self.body(resp, MAX_JSON, what).await?;
        serde_json::from_slice(&bytes).map_err(|e| SyncError::Protocol(format!("{what}: {e}")))
    }

    /// A JSON error body for its code and message; anything else (or too long) is `Null`.
    async fn error_json(&self, resp: reqwest::Response) -> Value {
        match self.body(resp, MAX_ERROR_BODY, "error answer").await {
            Ok(b) => serde_json::from_slice(&b).unwrap_or(Value::Null),
            Err(_) => Value::Null,
        }
    }

    /// Whether this is a plain OCI registry (a mirror's upstream), not an Outpost gateway.
    pub fn is_plain(&self) -> bool {
        self.follow_bearer
    }

    /// A gateway parent. `read_timeout` bounds how long any read may wait for the next byte:
    /// a link that stalls without closing (packets dropped, not reset) fails the transfer
    /// after that long, and it resumes from where it stopped.
    pub fn new(
        cs: &ConnectionString,
        ca: Option<&ParentCa>,
        read_timeout: Duration,
    ) -> Result<Parent, SyncError> {
        Ok(Parent {
            base: cs.parent_url(),
            name: cs.connected_registry_name.clone(),
            user: cs.sync_token_name.clone(),
            password: Some(cs.sync_token_password.clone()),
            http: client(ca, Some(read_timeout))?,
            poll_http: client(ca, None)?,
            bearer: Default::default(),
            follow_bearer: false,
            ca_file: ca.map(|c| c.path.clone()),
            no_referrers_api: Default::default(),
            not_before: Default::default(),
            missing_repos: Default::default(),
        })
    }

    /// A plain OCI registry as parent: no gateway, optional Basic credentials.
    pub fn plain(
        url: &str,
        credentials: Option<(String, String)>,
        ca: Option<&ParentCa>,
        read_timeout: Duration,
    ) -> Result<Parent, SyncError> {
        let http = client(ca, Some(read_timeout))?;
        let (user, password) = match credentials {
            Some((u, p)) => (u, Some(p)),
            None => (String::new(), None),
        };
        Ok(Parent {
            base: url.trim_end_matches('/').to_string(),
            name: String::new(),
            user,
            password,
            poll_http: http.clone(),
            http,
            bearer: Default::default(),
            follow_bearer: true,
            ca_file: ca.map(|c| c.path.clone()),
            no_referrers_api: Default::default(),
            not_before: Default::default(),
            missing_repos: Default::default(),
        })
    }

    /// How much longer the parent asked not to be called (its last `Retry-After`), if at all.
    pub fn asked_to_wait(&self) -> Option<Duration> {
        let until = (*self.not_before.lock().unwrap_or_else(|p| p.into_inner()))?;
        until.checked_duration_since(std::time::Instant::now())
    }

    /// Checks that a plain registry answers `/v2/` with these credentials.
    pub async fn probe(&self) -> Result<(), SyncError> {
        let resp = self.send(self.request(Method::GET, "/v2/")).await?;
        if resp.status() == StatusCode::UNAUTHORIZED {
            return Err(SyncError::Denied {
                message: match self.password {
                    Some(_) => format!(
                        "the registry at {} refused the credentials of {:?}: check upstream_username and upstream_password",
                        self.base, self.user
                    ),
                    None => format!(
                        "the registry at {} wants credentials: set upstream_username and upstream_password",
                        self.base
                    ),
                },
            });
        }
        self.check(resp).await?;
        Ok(())
    }

    pub fn base(&self) -> &str {
        &self.base
    }

    fn request(&self, method: Method, path: &str) -> reqwest::RequestBuilder {
        self.request_with(&self.http, method, path)
    }

    fn request_with(
        &self,
        http: &reqwest::Client,
        method: Method,
        path: &str,
    ) -> reqwest::RequestBuilder {
        let req = http.request(method, format!("{}{path}", self.base));
        match &self.password {
            Some(p) => req.basic_auth(&self.user, Some(p)),
            None => req,
        }
    }

    /// Sends a request. A token already issued for its repository goes instead of Basic
    /// credentials; a 401 with a `Bearer` challenge fetches one (with the Basic credentials, if
    /// any) and retries once. Any other answer is returned as it is.
    async fn send(&self, req: reqwest::RequestBuilder) -> Result<reqwest::Response, SyncError> {
        let unreachable = |e: reqwest::Error| SyncError::Unreachable {
            parent: self.base.clone(),
            reason: reason(&e, self.ca_file.as_deref()),
        };
        let (client, req) = req.build_split();
        let mut req = req.map_err(unreachable)?;
        let key = scope_key(req.url().path());
        let cached = self
            .bearer
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&key)
            .cloned();
        if let Some(token) = &cached {
            set_bearer(&mut req, token);
        }
        let retry = req.try_clone();
        let resp = client.execute(req).await.map_err(unreachable)?;
        heard_time(&resp);
        if resp.status() != StatusCode::UNAUTHORIZED || !self.follow_bearer {
            return Ok(resp);
        }
        let (Some(challenge), Some(mut retry)) = (bearer_challenge(&resp), retry) else {
            return Ok(resp);
        };
        let token = match self.fetch_token(&challenge).await {
            Ok(Some(t)) => t,
            // No token for these credentials: the 401 stands, and says what to fix.
            Ok(None) => return Ok(resp),
            Err(e) => return Err(e),
        };
        if cached.as_ref() == Some(&token) {
            return Ok(resp);
        }
        self.bearer
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(key, token.clone());
        set_bearer(&mut retry, &token);
        client.execute(retry).await.map_err(unreachable)
    }

    /// Asks the token service a `Bearer` challenge names for a token (Docker token
    /// authentication), with this parent's Basic credentials if it has any. `None` when the
    /// service refuses them.
    async fn fetch_token(&self, challenge: &Challenge) -> Result<Option<String>, SyncError> {
        if self.base.starts_with("https://") && !challenge.realm.starts_with("https://") {
            return Err(SyncError::Protocol(format!(
                "the registry at {} names a token service without TLS ({}); credentials are not sent there",
                self.base, challenge.realm
            )));
        }
        let mut query: Vec<(&str, &str)> = Vec::new();
        if let Some(s) = &challenge.service {
            query.push(("service", s));
        }
        if let Some(s) = &challenge.scope {
            query.push(("scope", s));
        }
        let mut req = self.http.get(&challenge.realm).query(&query);
        if let Some(p) = &self.password {
            req = req.basic_auth(&self.user, Some(p));
        }
        let resp = req.send().await.map_err(|e| SyncError::Unreachable {
            parent: challenge.realm.clone(),
            reason: reason(&e, self.ca_file.as_deref()),
        })?;
        if matches!(
            resp.status(),
            StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN
        ) {
            return Ok(None);
        }
        if !resp.status().is_success() {
            return Err(SyncError::Protocol(format!(
                "the token service at {} answered {}",
                challenge.realm,
                resp.status()
            )));
        }
        let v: Value = self
            .json(
                resp,
                &format!("answer of the token service {}", challenge.realm),
            )
            .await?;
        Ok(v["token"]
            .as_str()
            .or_else(|| v["access_token"].as_str())
            .filter(|t| !t.is_empty())
            .map(String::from))
    }

    /// Turns a non-success answer into an error that says what to do.
    async fn check(&self, resp: reqwest::Response) -> Result<reqwest::Response, SyncError> {
        let status = resp.status();
        if status.is_success() || status == StatusCode::NOT_MODIFIED {
            return Ok(resp);
        }
        let path = resp.url().path().to_string();
        let resp_url = resp.url().clone();
        // A parent under load (or rate-limiting this registry) that says when to come back.
        let asked = match status {
            StatusCode::TOO_MANY_REQUESTS | StatusCode::SERVICE_UNAVAILABLE => resp
                .headers()
                .get(reqwest::header::RETRY_AFTER)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| retry_after(v, jiff::Timestamp::now())),
            _ => None,
        };
        if let Some(wait) = asked {
            *self.not_before.lock().unwrap_or_else(|p| p.into_inner()) =
                Some(std::time::Instant::now() + wait);
        }
        let body: Value = self.error_json(resp).await;
        let code = body["errors"][0]["code"].as_str().unwrap_or("").to_string();
        let mut message = body["errors"][0]["message"]
            .as_str()
            .unwrap_or("")
            .to_string();
        if message.is_empty() && status == StatusCode::FORBIDDEN {
            // A HEAD answer has no body to say why.
            message = format!(
                "{path} is forbidden to sync token {:?} (no reason given; most likely it has no \
                 right to that repository)",
                self.user
            );
        } else if code.is_empty() {
            // Not a registry's error (a proxy's, a load balancer's, a wrong URL): say where.
            message = match message.is_empty() {
                true => format!("{path}, without a registry error in the answer"),
                false => format!("{path}: {message}"),
            };
        }
        if let Some(wait) = asked {
            message = format!("{message} (it asks to wait {} s)", wait.as_secs());
        }
        // An answer from another host than the parent's (a redirect was followed, without
        // the sync token's credentials) says nothing about them.
        let elsewhere =
            reqwest::Url::parse(&self.base).is_ok_and(|base| base.origin() != resp_url.origin());
        if elsewhere && matches!(status, StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN) {
            return Err(SyncError::Parent {
                status: status.as_u16(),
                code,
                message: format!(
                    "{} (the parent redirected this request to {}, which refused it; the sync \
                     token's credentials are not sent to another host)",
                    message,
                    resp_url.origin().ascii_serialization()
                ),
            });
        }
        Err(match status {
            StatusCode::UNAUTHORIZED => SyncError::BadCredentials {
                token: self.user.clone(),
                name: self.name.clone(),
                message,
            },
            StatusCode::FORBIDDEN => SyncError::Denied { message },
            StatusCode::CONFLICT if code == "ALREADY_ACTIVATED" => {
                SyncError::AlreadyActivated(message)
            }
            // Only the gateway's own 404 names a connected registry it does not know; a
            // registry may answer `NOT_FOUND` for a missing repository (Harbor does).
            StatusCode::NOT_FOUND if code == "NOT_FOUND" && path.contains("/gateway/v1/") => {
                SyncError::UnknownRegistry(self.name.clone())
            }
            _ => SyncError::Parent {
                status: status.as_u16(),
                code,
                message,
            },
        })
    }

    pub async fn activate(&self, instance_id: &str) -> Result<(), SyncError> {
        self.activate_for(&self.name, instance_id).await
    }

    /// Activates `name`: this registry or, relayed, one of its descendants.
    pub async fn activate_for(&self, name: &str, instance_id: &str) -> Result<(), SyncError> {
        let resp = self
            .send(
                self.request(Method::POST, &format!("/gateway/v1/{name}/activate"))
                    .json(&serde_json::json!({"instanceId": instance_id})),
            )
            .await?;
        self.check(resp).await?;
        Ok(())
    }

    /// The configuration, unless it still has ETag `etag` (`None` then).
    pub async fn config(
        &self,
        etag: Option<&str>,
    ) -> Result<Option<(SyncConfig, Option<String>)>, SyncError> {
        let mut req = self.request(Method::GET, &format!("/gateway/v1/{}/config", self.name));
        if let Some(e) = etag {
            req = req.header("if-none-match", e);
        }
        let resp = self.check(self.send(req).await?).await?;
        if resp.status() == StatusCode::NOT_MODIFIED {
            return Ok(None);
        }
        let etag = resp
            .headers()
            .get("etag")
            .and_then(|v| v.to_str().ok())
            .map(String::from);
        let cfg = self.json(resp, "configuration").await?;
        Ok(Some((cfg, etag)))
    }

    /// One page of the message feed after `after`, waiting up to `wait_secs` for one. With
    /// `config` (the ETag of the configuration this registry has), the wait also ends when
    /// its configuration changes.
    pub async fn messages(
        &self,
        after: i64,
        mark: Option<i64>,
        wait_secs: u64,
        config: Option<&str>,
    ) -> Result<Feed, SyncError> {
        let mut config = config
            .map(|e| format!("&config={}", e.trim_start_matches("W/").trim_matches('"')))
            .unwrap_or_default();
        if let Some(m) = mark {
            config.push_str(&format!("&mark={m}"));
        }
        let req = self
            .request_with(
                &self.poll_http,
                Method::GET,
                &format!(
                    "/gateway/v1/{}/messages?after={after}&limit=500&wait={wait_secs}{config}",
                    self.name
                ),
            )
            .timeout(Duration::from_secs(wait_secs + 30));
        // Asked right after this iteration's status report and configuration went through: a
        // failure now is a link cut under a waiting request, not a wrong address.
        let resp = self.send(req).await.map_err(|e| match e {
            SyncError::Unreachable { parent, reason } => SyncError::Interrupted {
                parent,
                reason: format!("the wait for the parent's messages was cut: {reason}"),
            },
            other => other,
        })?;
        if resp.status() == StatusCode::GONE {
            let body: Value = self.error_json(resp).await;
            let latest = body["errors"][0]["detail"]["latest"].as_i64().unwrap_or(0);
            return Ok(Feed::Expired { latest });
        }
        let resp = self.check(resp).await?;
        Ok(Feed::Page(self.json(resp, "messages").await?))
    }

    pub async fn report(&self, report: &StatusReport) -> Result<(), SyncError> {
        self.report_for(&self.name, report).await
    }

    /// Reports the status of `name`: this registry or, relayed, one of its descendants.
    pub async fn report_for(&self, name: &str, report: &StatusReport) -> Result<(), SyncError> {
        let resp = self
            .send(
                self.request(Method::PUT, &format!("/gateway/v1/{name}/status"))
                    .json(report),
            )
            .await?;
        self.check(resp).await?;
        Ok(())
    }

    /// Sends notifications of `name`: this registry or, relayed, one of its descendants.
    pub async fn notify_for(
        &self,
        name: &str,
        batch: &outpost_control::notify::NotificationBatch,
    ) -> Result<(), SyncError> {
        let resp = self
            .send(
                self.request(Method::POST, &format!("/gateway/v1/{name}/notifications"))
                    .json(batch),
            )
            .await?;
        self.check(resp).await?;
        Ok(())
    }

    /// Every tag of `repo` at the parent (following `Link` pagination); empty if the
    /// repository does not exist there.
    pub async fn tags(&self, repo: &str) -> Result<Vec<String>, SyncError> {
        let mut out = Vec::new();
        let mut path = format!("/v2/{repo}/tags/list?n=1000");
        let mut pages = std::collections::HashSet::new();
        loop {
            let resp = self.send(self.request(Method::GET, &path)).await?;
            // Only the registry's own word that the repository is unknown (`NAME_UNKNOWN`;
            // Harbor says `NOT_FOUND`) means it has no tags: a 404 without it (a proxy's, a
            // load balancer's) would empty the site.
            let resp = match self.check(resp).await {
                Err(SyncError::Parent {
                    status: 404, code, ..
                }) if code == "NAME_UNKNOWN" || code == "NOT_FOUND" => {
                    // A mirror's list names repositories by hand: one the upstream does not
                    // have is most likely misspelt. Said once per repository and start.
                    if self.follow_bearer
                        && self
                            .missing_repos
                            .lock()
                            .unwrap_or_else(|p| p.into_inner())
                            .insert(repo.to_string())
                    {
                        tracing::warn!(repository = repo, upstream = %self.base, "the upstream has no such repository (404 {code}): check its name in upstream_repositories; it is mirrored once it exists");
                    }
                    return Ok(out);
                }
                other => other?,
            };
            let link = resp
                .headers()
                .get("link")
                .and_then(|v| v.to_str().ok())
                .and_then(|l| l.strip_prefix('<'))
                .and_then(|l| l.split('>').next())
                .map(String::from);
            let v: Value = self.json(resp, "tags list").await?;
            out.extend(
                v["tags"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter_map(|t| t.as_str().map(String::from)),
            );
            match link {
                // A page that links to one already read would be followed forever.
                Some(l) if !pages.insert(l.clone()) => {
                    return Err(SyncError::Protocol(format!(
                        "the tags list of {repo} links back to a page already read ({l})"
                    )));
                }
                Some(l) => path = l,
                None => return Ok(out),
            }
        }
    }

    /// Repository names at the parent (the sync token sees only what it may read).
    pub async fn catalog(&self) -> Result<Vec<String>, SyncError> {
        let resp = self
            .check(
                self.send(self.request(Method::GET, "/v2/_catalog?n=100000"))
                    .await?,
            )
            .await?;
        let v: Value = self.json(resp, "catalog").await?;
        Ok(v["repositories"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|t| t.as_str().map(String::from))
            .collect())
    }

    /// Digests of every manifest `repo` holds at the parent, tagged or not (the gateway's
    /// `manifests` listing); `None` from a plain registry, or from an Outpost parent too old
    /// to offer it.
    pub async fn manifest_digests(&self, repo: &str) -> Result<Option<Vec<String>>, SyncError> {
        const PAGE: usize = 1000;
        if self.follow_bearer {
            return Ok(None);
        }
        let mut out: Vec<String> = Vec::new();
        loop {
            let last = out.last().map(String::as_str).unwrap_or_default();
            let path = format!(
                "/gateway/v1/{}/manifests?repository={repo}&n={PAGE}&last={last}",
                self.name
            );
            let resp = self.send(self.request(Method::GET, &path)).await?;
            if resp.status() == StatusCode::NOT_FOUND {
                return Ok(None);
            }
            let resp = self.check(resp).await?;
            let v: Value = self.json(resp, "manifest listing").await?;
            let before = out.len();
            out.extend(
                v["manifests"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter_map(|d| d.as_str().map(String::from)),
            );
            if out.len() - before < PAGE {
                return Ok(Some(out));
            }
        }
    }

    /// The digest a tag points at, from a `HEAD`; `None` if the tag is gone.
    pub async fn manifest_digest(
        &self,
        repo: &str,
        reference: &str,
    ) -> Result<Option<String>, SyncError> {
        let resp = self
            .send(
                self.request(Method::HEAD, &format!("/v2/{repo}/manifests/{reference}"))
                    .header("accept", MANIFEST_ACCEPT),
            )
            .await?;
        if resp.status() == StatusCode::NOT_FOUND {
            return Ok(None);
        }
        let resp = self.check(resp).await?;
        Ok(resp
            .headers()
            .get("docker-content-digest")
            .and_then(|v| v.to_str().ok())
            .map(String::from))
    }

    /// A manifest's exact bytes and media type; `None` if it is gone.
    pub async fn manifest(
        &self,
        repo: &str,
        reference: &str,
    ) -> Result<Option<(Bytes, String)>, SyncError> {
        let resp = self
            .send(
                self.request(Method::GET, &format!("/v2/{repo}/manifests/{reference}"))
                    .header("accept", MANIFEST_ACCEPT),
            )
            .await?;
        if resp.status() == StatusCode::NOT_FOUND {
            return Ok(None);
        }
        let resp = self.check(resp).await?;
        let media_type = resp
            .headers()
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_string();
        let bytes = self
            .body(
                resp,
                MAX_MANIFEST,
                &format!("manifest {reference} of {repo}"),
            )
            .await?;
        Ok(Some((bytes, media_type)))
    }

    /// Digests of the manifests that refer to `digest` (signatures, SBOMs…); empty when the
    /// parent has none or does not offer the referrers API.
    pub async fn referrers(&self, repo: &str, digest: &str) -> Result<Vec<String>, SyncError> {
        const ASK_AGAIN: Duration = Duration::from_secs(3600);
        let asked = *self
            .no_referrers_api
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if asked.is_some_and(|at| at.elapsed() < ASK_AGAIN) {
            return Ok(Vec::new());
        }
        let resp = self
            .send(self.request(Method::GET, &format!("/v2/{repo}/referrers/{digest}")))
            .await?;
        if !resp.status().is_success() {
            // A registry without the API (distribution 2.8 answers a bare 404) is not asked
            // again for an hour: the tag schema (`sha256-<digest>` tags) brings its
            // referrers as tags.
            if resp.status() == StatusCode::NOT_FOUND
                && !resp
                    .headers()
                    .get("content-type")
                    .and_then(|v| v.to_str().ok())
                    .is_some_and(|t| t.contains("json"))
            {
                *self
                    .no_referrers_api
                    .lock()
                    .unwrap_or_else(|p| p.into_inner()) = Some(std::time::Instant::now());
            }
            return Ok(Vec::new());
        }
        let v: Value = self
            .json(resp, &format!("referrers of {digest} in {repo}"))
            .await
            .unwrap_or(Value::Null);
        let mut seen = std::collections::HashSet::new();
        let all: Vec<String> = v["manifests"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|m| m["digest"].as_str().map(String::from))
            .filter(|d| seen.insert(d.clone()))
            .collect();
        if all.len() > MAX_REFERRERS {
            tracing::warn!(repository = repo, %digest, referrers = all.len(), "the parent lists more referrers of this manifest than this registry fetches; only the first {MAX_REFERRERS} are synced");
        }
        Ok(all.into_iter().take(MAX_REFERRERS).collect())
    }

    /// Whether the parent holds blob `digest` in `repo`.
    pub async fn has_blob(&self, repo: &str, digest: &str) -> Result<bool, SyncError> {
        let resp = self
            .send(self.request(Method::HEAD, &format!("/v2/{repo}/blobs/{digest}")))
            .await?;
        if resp.status() == StatusCode::NOT_FOUND {
            return Ok(false);
        }
        self.check(resp).await?;
        Ok(true)
    }

    /// Asks the parent to mount blob `digest` into `repo` from its repository `from`. On
    /// refusal the parent starts an ordinary upload instead, whose location is returned.
    pub async fn mount_blob(
        &self,
        repo: &str,
        digest: &str,
        from: &str,
    ) -> Result<Mount, SyncError> {
        let resp = self
            .send(self.request(
                Method::POST,
                &format!("/v2/{repo}/blobs/uploads/?mount={digest}&from={from}"),
            ))
            .await?;
        let resp = self.check(resp).await?;
        if resp.status() == StatusCode::CREATED {
            return Ok(Mount::Mounted);
        }
        Ok(Mount::Upload(self.location(&resp)?))
    }

    /// Starts an upload of a blob into `repo`; returns its location (a path on the parent).
    pub async fn start_upload(&self, repo: &str) -> Result<String, SyncError> {
        let resp = self
            .send(self.request(Method::POST, &format!("/v2/{repo}/blobs/uploads/")))
            .await?;
        let resp = self.check(resp).await?;
        self.location(&resp)
    }

    /// Bytes an upload at `location` holds, or `None` if that cannot be known: the parent no
    /// longer has it, or its `Range` (`0-<last byte>`) is missing or `0-0`, which registries
    /// also say for an empty upload. Then the caller starts a new upload, losing at most one
    /// byte of progress; guessing could only earn a 416 on every retry.
    pub async fn upload_offset(&self, location: &str) -> Result<Option<u64>, SyncError> {
        let resp = self.send(self.request(Method::GET, location)).await?;
        if resp.status() == StatusCode::NOT_FOUND {
            return Ok(None);
        }
        let resp = self.check(resp).await?;
        let last = resp
            .headers()
            .get("range")
            .and_then(|v| v.to_str().ok())
            .and_then(|r| r.rsplit_once('-'))
            .and_then(|(_, end)| end.trim().parse::<u64>().ok());
        Ok(match last {
            Some(0) | None => None,
            Some(end) => Some(end + 1),
        })
    }

    /// Cancels the upload at `location` (best effort: the parent reaps it anyway).
    pub async fn cancel_upload(&self, location: &str) {
        if let Ok(resp) = self.send(self.request(Method::DELETE, location)).await {
            tracing::debug!(location, status = %resp.status(), "cancelled an upload at the parent");
        }
    }

    /// Appends `body` at byte `offset` of the upload at `location` (PATCH with
    /// `Content-Range`); returns the upload's next location.
    pub async fn upload_chunk(
        &self,
        location: &str,
        offset: u64,
        body: Bytes,
    ) -> Result<String, SyncError> {
        let end = offset + body.len() as u64 - 1;
        // Not through the client with the read timeout: reqwest counts it from the start of
        // the request to the answer, which includes sending the piece, however slow the link.
        // A whole-request bound instead: pieces shrink after a cut (down to 256 KiB, which
        // fits at ~2 KB/s), so a slow link is not given up on, and a silent one is after 2
        // minutes.
        let resp = self
            .send(
                self.request_with(&self.poll_http, Method::PATCH, location)
                    .timeout(Duration::from_secs(120))
                    .header("content-type", "application/octet-stream")
                    .header("content-range", format!("{offset}-{end}"))
                    .body(body),
            )
            .await
            // The parent answered this iteration's first requests a moment ago: a piece that
            // fails now was cut on its way, which is not a wrong address or protocol.
            .map_err(|e| match e {
                SyncError::Unreachable { parent, reason } => SyncError::Interrupted {
                    parent,
                    reason: format!("piece {offset}-{end} of an upload cut: {reason}"),
                },
                other => other,
            })?;
        let resp = self.check(resp).await?;
        self.location(&resp)
    }

    /// Completes the upload at `location` as blob `digest`.
    pub async fn finish_upload(&self, location: &str, digest: &str) -> Result<(), SyncError> {
        let sep = if location.contains('?') { '&' } else { '?' };
        let resp = self
            .send(self.request(Method::PUT, &format!("{location}{sep}digest={digest}")))
            .await?;
        self.check(resp).await?;
        Ok(())
    }

    /// The `Location` of an upload answer, as a path on the parent.
    fn location(&self, resp: &reqwest::Response) -> Result<String, SyncError> {
        let loc = resp
            .headers()
            .get("location")
            .and_then(|v| v.to_str().ok())
            .ok_or_else(|| SyncError::Protocol("upload answer without a Location".into()))?;
        let path = loc.strip_prefix(self.base.as_str()).unwrap_or(loc);
        // Anything else (another host, another scheme) is not followed: the sync token's
        // password goes to the parent only, and a location saved to resume from must be one
        // the next attempt can use.
        // `//host/…` is another host too (a network-path reference, RFC 3986 §4.2).
        if !path.starts_with('/') || path.starts_with("//") {
            return Err(SyncError::Protocol(format!(
                "the parent's upload answer gives Location {loc:?}, which is not on the parent ({}); not followed",
                self.base
            )));
        }
        Ok(path.to_string())
    }

    /// Puts a manifest; for a put by tag, returns what the parent says the tag pointed at
    /// before (`Some(None)`: nothing, or this same manifest; `None`: a parent too old to say).
    pub async fn put_manifest(
        &self,
        repo: &str,
        reference: &str,
        media_type: &str,
        body: Bytes,
    ) -> Result<PutAnswer, SyncError> {
        let resp = self
            .send(
                self.request(Method::PUT, &format!("/v2/{repo}/manifests/{reference}"))
                    .header("content-type", media_type)
                    .body(body),
            )
            .await?;
        let resp = self.check(resp).await?;
        let header = |name: &str| {
            resp.headers()
                .get(name)
                .and_then(|v| v.to_str().ok())
                .map(String::from)
        };
        Ok(PutAnswer {
            replaced: header("outpost-replaced-digest").map(|v| (v != "none").then_some(v)),
            log_position: log_position(&resp),
        })
    }

    /// Deletes a tag or manifest at the parent; one already gone is fine. For a tag, returns
    /// where the removal stands in the parent's event log, if the parent says (an Outpost
    /// parent does).
    pub async fn delete_manifest(
        &self,
        repo: &str,
        reference: &str,
    ) -> Result<Option<i64>, SyncError> {
        let resp = self
            .send(self.request(Method::DELETE, &format!("/v2/{repo}/manifests/{reference}")))
            .await?;
        if resp.status() == StatusCode::NOT_FOUND {
            return Ok(None);
        }
        Ok(log_position(&self.check(resp).await?))
    }

    /// A blob from byte `offset` on, as a stream.
    pub async fn blob(
        &self,
        repo: &str,
        digest: &str,
        offset: u64,
    ) -> Result<impl Stream<Item = Result<Bytes, reqwest::Error>> + use<>, SyncError> {
        let mut req = self.request(Method::GET, &format!("/v2/{repo}/blobs/{digest}"));
        if offset > 0 {
            req = req.header("range", format!("bytes={offset}-"));
        }
        let resp = self.check(self.send(req).await?).await?;
        if offset > 0 && resp.status() != StatusCode::PARTIAL_CONTENT {
            return Err(SyncError::Protocol(format!(
                "the parent ignored Range for {digest}; cannot resume at byte {offset}"
            )));
        }
        Ok(resp.bytes_stream())
    }
}

/// Learns the root's time from a gateway answer (`Outpost-Time`), and says so when this
/// system's clock turns out to be off, or is set right.
fn heard_time(resp: &reqwest::Response) {
    use outpost_control::clock;
    let Some(parent_ms) = resp
        .headers()
        .get(clock::HEADER)
        .and_then(|v| clock::parse_header(v.as_bytes()))
    else {
        return;
    };
    if let Some((_, offset)) = clock::learn(parent_ms) {
        if offset.abs() >= clock::SKEW_WORTH_SAYING_MS {
            tracing::warn!(
                parent_time = %outpost_control::format_rfc3339(parent_ms),
                "{}",
                clock::describe_skew(offset)
            );
        } else {
            tracing::info!("this registry's clock agrees with its parent's again");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bearer_challenges() {
        assert_eq!(
            parse_challenge(
                r#"Bearer realm="https://auth.example/token",service="registry.example",scope="repository:a/b:pull,push""#
            ),
            Some(Challenge {
                realm: "https://auth.example/token".into(),
                service: Some("registry.example".into()),
                scope: Some("repository:a/b:pull,push".into()),
            })
        );
        assert_eq!(
            parse_challenge(r#"bearer realm="http://127.0.0.1:1/t""#).map(|c| c.realm),
            Some("http://127.0.0.1:1/t".into())
        );
        assert_eq!(parse_challenge(r#"Basic realm="x""#), None);
        assert_eq!(parse_challenge(r#"Bearer service="no-realm""#), None);
        assert_eq!(
            parse_challenge(r#"Bearer realm="file:///etc/passwd""#),
            None
        );
        assert_eq!(
            parse_challenge(r#"Bearer realm="http://x/t",scope="unterminated"#),
            None
        );
    }

    #[test]
    fn retry_after_in_seconds_or_as_a_date() {
        let now: jiff::Timestamp = "2026-11-29T12:00:00Z".parse().unwrap();
        assert_eq!(retry_after("120", now), Some(Duration::from_secs(120)));
        assert_eq!(retry_after(" 0 ", now), Some(Duration::ZERO));
        assert_eq!(
            retry_after("Sun, 29 Nov 2026 12:02:30 GMT", now),
            Some(Duration::from_secs(150))
        );
        // A date already past: no wait. Capped at an hour. Nonsense: ignored.
        assert_eq!(
            retry_after("Sun, 29 Nov 2026 11:00:00 GMT", now),
            Some(Duration::ZERO)
        );
        assert_eq!(retry_after("86400", now), Some(RETRY_AFTER_MAX));
        assert_eq!(retry_after("soon", now), None);
        assert_eq!(retry_after("-5", now), None);
    }

    /// A parent on loopback that answers every request with `answer(path)`: the head and a
    /// body of `body_len` bytes of `fill` (streamed, without end for `u64::MAX`).
    async fn fake_parent(answer: fn(&str) -> (String, u64, u8)) -> String {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((mut c, _)) = l.accept().await {
                tokio::spawn(async move {
                    let mut buf = vec![0u8; 8192];
                    let n = c.read(&mut buf).await.unwrap_or(0);
                    let req = String::from_utf8_lossy(&buf[..n]).to_string();
                    let path = req.split(' ').nth(1).unwrap_or("").to_string();
                    let (head, mut left, fill) = answer(&path);
                    if c.write_all(head.as_bytes()).await.is_err() {
                        return;
                    }
                    let chunk = vec![fill; 64 << 10];
                    while left > 0 {
                        let n = left.min(chunk.len() as u64) as usize;
                        if c.write_all(&chunk[..n]).await.is_err() {
                            return;
                        }
                        left -= n as u64;
                    }
                });
            }
        });
        format!("http://{addr}")
    }

    /// A parent that sends without end, or says it will send 100 GB, is refused once past
    /// the bound, without the answer being read into memory; a tags list whose pages link
    /// in a circle is not followed for ever.
    #[tokio::test]
    async fn answers_without_end_are_refused() {
        let url = fake_parent(|path| {
            if path.starts_with("/v2/endless/tags/list") {
                // A JSON string that never closes, with no Content-Length.
                let head = "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\nconnection: close\r\n\r\n{\"tags\":[\"";
                (head.into(), u64::MAX, b'a')
            } else if path.starts_with("/v2/circle/tags/list") {
                let body = r#"{"tags":["v1"]}"#;
                let head = format!(
                    "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\nlink: </v2/circle/tags/list?n=1000&last=v1>; rel=\"next\"\r\n\r\n{body}",
                    body.len()
                );
                (head, 0, 0)
            } else {
                // A manifest that claims 100 GB.
                let head = "HTTP/1.1 200 OK\r\ncontent-type: application/vnd.oci.image.manifest.v1+json\r\ncontent-length: 100000000000\r\n\r\n";
                (head.into(), u64::MAX, b'{')
            }
        })
        .await;
        let parent = Parent::plain(&url, None, None, Duration::from_secs(10)).unwrap();
        let e = parent.tags("endless").await.unwrap_err().to_string();
        assert!(e.contains("more than the 32 MiB"), "{e}");
        let e = parent.manifest("app", "v1").await.unwrap_err().to_string();
        assert!(e.contains("is 100000000000 bytes"), "{e}");
        let e = parent.tags("circle").await.unwrap_err().to_string();
        assert!(e.contains("links back to a page already read"), "{e}");
    }

    /// An upload `Location` on another host is refused, not kept to resume from.
    #[tokio::test]
    async fn an_upload_location_on_another_host_is_not_followed() {
        let url = fake_parent(|path| {
            let loc = if path.contains("/other/") {
                "//127.0.0.1:1/v2/rw/blobs/uploads/evil"
            } else {
                "/v2/rw/blobs/uploads/fine"
            };
            let head =
                format!("HTTP/1.1 202 Accepted\r\nlocation: {loc}\r\ncontent-length: 0\r\n\r\n");
            (head, 0, 0)
        })
        .await;
        let parent = Parent::plain(&url, None, None, Duration::from_secs(10)).unwrap();
        let e = parent
            .start_upload("other/rw")
            .await
            .unwrap_err()
            .to_string();
        assert!(e.contains("which is not on the parent"), "{e}");
        assert_eq!(
            parent.start_upload("rw").await.unwrap(),
            "/v2/rw/blobs/uploads/fine"
        );
    }

    /// A 401 from a host the parent redirected to is not the parent refusing the sync
    /// token's password (which would send the operator to make a new one for nothing).
    #[tokio::test]
    async fn a_refusal_after_a_redirect_names_the_other_host() {
        static OTHER: std::sync::OnceLock<String> = std::sync::OnceLock::new();
        let other = fake_parent(|_| {
            let head = "HTTP/1.1 401 Unauthorized\r\ncontent-length: 0\r\n\r\n";
            (head.into(), 0, 0)
        })
        .await;
        OTHER.set(other.clone()).unwrap();
        let url = fake_parent(|path| {
            let head = format!(
                "HTTP/1.1 307 Temporary Redirect\r\nlocation: {}{path}\r\ncontent-length: 0\r\n\r\n",
                OTHER.get().unwrap()
            );
            (head, 0, 0)
        })
        .await;
        let parent = Parent::plain(
            &url,
            Some(("sync".into(), "pw".into())),
            None,
            Duration::from_secs(10),
        )
        .unwrap();
        let e = parent.manifest("app", "v1").await.unwrap_err();
        assert!(
            !matches!(e, SyncError::BadCredentials { .. }),
            "{e:?} is not about the sync token"
        );
        assert!(e.to_string().contains(&other), "{e}");
    }

    #[test]
    fn tokens_are_kept_per_repository() {
        assert_eq!(scope_key("/v2/a/b/manifests/v1"), "a/b");
        assert_eq!(scope_key("/v2/a/blobs/sha256:00"), "a");
        assert_eq!(scope_key("/v2/a/tags/list"), "a");
        assert_eq!(scope_key("/v2/"), "");
        assert_eq!(scope_key("/v2/_catalog"), "");
        assert_eq!(scope_key("/gateway/v1/x/config"), "");
    }
}
