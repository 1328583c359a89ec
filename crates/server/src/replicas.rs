//! Forwarding between replicas of one registry. Replicas that share a PostgreSQL database and
//! an object store serve the same content, but an upload session lives on the disk of the
//! replica that started it. A load balancer may send the session's next request (a chunk, the
//! final `PUT`) to another replica, which finds the session's replica in the database
//! (`upload_replicas`) and forwards the request there, streaming the body both ways. A
//! forwarded request is marked, and is never forwarded again. At start a replica checks that
//! its own `replica_url` leads back to itself (`verify_own_address`): an address that reaches
//! the load balancer or another replica would send forwarded requests astray.

use crate::error::ApiError;
use axum::body::Body;
use axum::http::{HeaderMap, HeaderName, Method, StatusCode, Uri};
use axum::response::Response;
use futures_util::TryStreamExt;
use outpost_oci::ErrorCode;
use std::sync::OnceLock;
use std::time::Duration;

/// Set on a forwarded request.
pub(crate) const FORWARDED: HeaderName = HeaderName::from_static("x-outpost-forwarded");

/// Names this process in `/healthz` answers (a random id, new at each start), so a replica can
/// tell whether its `replica_url` reaches itself.
pub(crate) const INSTANCE: HeaderName = HeaderName::from_static("x-outpost-instance");

/// This process's id, as sent in [`INSTANCE`].
pub(crate) fn instance_id() -> &'static str {
    static ID: OnceLock<String> = OnceLock::new();
    ID.get_or_init(|| {
        use std::hash::{BuildHasher, Hasher};
        // Seeded at random for each process; an id, not a secret.
        let mut h = std::collections::hash_map::RandomState::new().build_hasher();
        h.write_u32(std::process::id());
        format!("{:016x}", h.finish())
    })
}

/// How many answers from its `replica_url`, each on a new connection, a replica wants to see
/// before it trusts the address: behind a balancer that spreads connections over two
/// replicas, all eight reach this one by chance once in 256 starts.
const ADDRESS_ANSWERS: usize = 8;

/// Asks `replica_url`'s `/healthz` until [`ADDRESS_ANSWERS`] answers came, each on a new
/// connection, and returns an error naming the problem as soon as one comes from anything
/// but this process. An address that cannot be reached yet (a name not yet in DNS, say) is
/// asked again with backoff, with a warning, for as long as it takes.
pub async fn verify_own_address(replica_url: &str) -> Result<(), String> {
    let url = format!("{}/healthz", replica_url.trim_end_matches('/'));
    // No pooled connections: each check may be balanced anew.
    let client = reqwest::Client::builder()
        .connect_timeout(Duration::from_secs(5))
        .timeout(Duration::from_secs(10))
        .pool_max_idle_per_host(0)
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .map_err(|e| format!("cannot make an HTTP client to check replica_url: {e}"))?;
    let mut answers = 0;
    let mut wait = Duration::from_secs(1);
    let mut failures = 0u32;
    while answers < ADDRESS_ANSWERS {
        match client.get(&url).header(FORWARDED, "1").send().await {
            Ok(r) => {
                let theirs = r.headers().get(INSTANCE).and_then(|v| v.to_str().ok());
                if theirs == Some(instance_id()) {
                    answers += 1;
                    continue;
                }
                let who = match theirs {
                    Some(_) => "another Outpost process".to_string(),
                    None => format!(
                        "something that is not this Outpost (it answered {})",
                        r.status()
                    ),
                };
                return Err(format!(
                    "replica_url {replica_url} reaches {who}, not this replica: other replicas \
                     forward upload requests to it. Set it to an address that reaches this \
                     replica alone (not the load balancer's, not another replica's)"
                ));
            }
            Err(e) => {
                failures += 1;
                if failures == 1 || failures.is_multiple_of(10) {
                    tracing::warn!(%replica_url, error = %outpost_oci::error::error_chain(&e), "cannot reach this replica at its replica_url yet; other replicas cannot forward upload requests here until it answers");
                }
                tokio::time::sleep(wait).await;
                wait = (wait * 2).min(Duration::from_secs(30));
            }
        }
    }
    if failures > 0 {
        tracing::info!(%replica_url, "replica_url reaches this replica");
    }
    Ok(())
}

/// Headers that describe one hop, not the request: never copied to the next.
fn hop_by_hop(name: &HeaderName) -> bool {
    matches!(
        name.as_str(),
        "connection"
            | "keep-alive"
            | "proxy-authenticate"
            | "proxy-authorization"
            | "te"
            | "trailer"
            | "transfer-encoding"
            | "upgrade"
    )
}

fn client() -> &'static reqwest::Client {
    static CLIENT: OnceLock<reqwest::Client> = OnceLock::new();
    CLIENT.get_or_init(|| {
        // No timeout on the request as a whole: a layer may take hours to arrive, and the
        // replica holding it may take minutes to store it. A replica that vanishes is noticed
        // by TCP keepalive.
        reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(5))
            .tcp_keepalive(Duration::from_secs(30))
            // Given up before the other replica closes it (after 60 s idle): a request sent
            // on a connection being closed could not be retried.
            .pool_idle_timeout(Duration::from_secs(30))
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .unwrap_or_default()
    })
}

/// Sends the request for upload `id` to the replica at `replica` and returns its answer.
pub(crate) async fn forward(
    replica: &str,
    id: &str,
    method: &Method,
    uri: &Uri,
    headers: &HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let path = uri.path_and_query().map_or("/", |p| p.as_str());
    let url = format!("{}{path}", replica.trim_end_matches('/'));
    let mut req = client().request(method.clone(), &url);
    // `Host` goes along: the replica answering names this registry as the client knows it
    // (in a token challenge's realm, say), not by its internal address.
    for (name, value) in headers {
        if !hop_by_hop(name) && *name != FORWARDED {
            req = req.header(name, value);
        }
    }
    let req = req
        .header(FORWARDED, "1")
        .body(reqwest::Body::wrap_stream(body.into_data_stream()));
    let resp = req.send().await.map_err(|e| {
        tracing::warn!(%replica, upload = %id, error = %outpost_oci::error::error_chain(&e), "forwarding an upload request to the replica holding it failed");
        if e.is_connect() {
            // Gone, with the session: the client starts over.
            ApiError::new(
                StatusCode::NOT_FOUND,
                ErrorCode::BlobUploadUnknown,
                format!(
                    "upload {id} is held by another replica of this registry, which does not \
                     answer; start a new upload with POST"
                ),
            )
        } else {
            // Cut off mid-request: the session may well be there; the client may ask
            // where it stands (GET) and resume.
            ApiError::custom(
                StatusCode::SERVICE_UNAVAILABLE,
                "UNAVAILABLE",
                format!(
                    "upload {id} is held by another replica of this registry, and the request \
                     to it broke off; ask for its status and resume, or try again"
                ),
            )
        }
    })?;
    let mut out = Response::builder().status(resp.status());
    for (name, value) in resp.headers() {
        if !hop_by_hop(name) {
            out = out.header(name, value);
        }
    }
    let stream = resp.bytes_stream().map_err(std::io::Error::other);
    Ok(out.body(Body::from_stream(stream)).unwrap_or_else(|_| {
        let mut r = Response::new(Body::empty());
        *r.status_mut() = StatusCode::BAD_GATEWAY;
        r
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::header;

    /// Serves `/healthz` on a free loopback port, naming `instance` (or no one); returns the
    /// base URL.
    async fn healthz_server(instance: Option<&'static str>) -> String {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let app = axum::Router::new().route(
            "/healthz",
            axum::routing::get(move || async move {
                let mut r = axum::response::Response::new(Body::from("ok"));
                if let Some(id) = instance {
                    r.headers_mut()
                        .insert(INSTANCE, axum::http::HeaderValue::from_static(id));
                }
                r
            }),
        );
        tokio::spawn(async move { axum::serve(listener, app).await });
        format!("http://{addr}")
    }

    #[tokio::test]
    async fn a_replica_url_must_lead_back_to_this_process() {
        let me: &'static str = instance_id();
        assert!(
            verify_own_address(&healthz_server(Some(me)).await)
                .await
                .is_ok()
        );
        let err = verify_own_address(&healthz_server(Some("0123456789abcdef")).await)
            .await
            .unwrap_err();
        assert!(err.contains("reaches another Outpost process"), "{err}");
        let err = verify_own_address(&healthz_server(None).await)
            .await
            .unwrap_err();
        assert!(
            err.contains("reaches something that is not this Outpost (it answered 200 OK)"),
            "{err}"
        );
    }

    #[test]
    fn per_hop_headers_stay_behind() {
        for h in [
            header::CONNECTION,
            header::TRANSFER_ENCODING,
            header::UPGRADE,
        ] {
            assert!(hop_by_hop(&h), "{h}");
        }
        for h in [
            header::HOST,
            header::AUTHORIZATION,
            header::CONTENT_RANGE,
            header::CONTENT_LENGTH,
            header::CONTENT_TYPE,
            header::LOCATION,
        ] {
            assert!(!hop_by_hop(&h), "{h}");
        }
    }
}
