//! Forwarding between replicas of one registry. Replicas that share a PostgreSQL database and
//! an object store serve the same content, but an upload session lives on the disk of the
//! replica that started it. A load balancer may send the session's next request (a chunk, the
//! final `PUT`) to another replica, which finds the session's replica in the database
//! (`upload_replicas`) and forwards the request there, streaming the body both ways. A
//! forwarded request is marked, and is never forwarded again.

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
        tracing::warn!(%replica, upload = %id, error = %e, "forwarding an upload request to the replica holding it failed");
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
