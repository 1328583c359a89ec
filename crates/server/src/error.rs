//! The one place where failures become HTTP: every [`RegistryError`] and request-parsing error
//! maps to a status code and an OCI error body `{"errors":[{"code","message","detail"}]}`.
//! Internal causes (I/O, database) are logged with their source and reported to the client only
//! as a generic message, never with paths or SQL.

use axum::http::{HeaderName, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use outpost_control::ControlError;
use outpost_oci::{ErrorCode, RouteError};
use outpost_registry::{RegistryError, StorageError};
use serde_json::json;

/// A request body read whole (up to axum's default limit of 2 MiB), for the JSON endpoints
/// (`/api/v1`, `/gateway/v1`). A body that is too large or cannot be read is answered like every
/// other error, `{"errors":[…]}`, rather than with axum's plain-text rejection.
pub struct ApiBody(pub axum::body::Bytes);

impl axum::extract::FromRequest<crate::App> for ApiBody {
    type Rejection = ApiError;

    async fn from_request(
        req: axum::extract::Request,
        state: &crate::App,
    ) -> Result<Self, ApiError> {
        use axum::extract::rejection::BytesRejection;
        // Credentials first: nobody may make the server hold a body without them.
        let p = crate::auth::basic_principal(state, req.headers(), "this endpoint").await?;
        if !p.is_authenticated() {
            return Err(crate::auth::basic_unauthorized(
                state,
                "this endpoint needs a token's name and password (Basic authentication)",
            ));
        }
        match axum::body::Bytes::from_request(req, state).await {
            Ok(b) => Ok(ApiBody(b)),
            Err(e) if e.status() == StatusCode::PAYLOAD_TOO_LARGE => Err(ApiError::custom(
                StatusCode::PAYLOAD_TOO_LARGE,
                "SIZE_INVALID",
                "request body is larger than the 2 MiB this endpoint accepts",
            )),
            Err(e @ BytesRejection::FailedToBufferBody(_)) => Err(ApiError::custom(
                StatusCode::BAD_REQUEST,
                "INVALID_REQUEST",
                format!("request body could not be read: {}", e.body_text()),
            )),
            Err(e) => Err(ApiError::custom(
                e.status(),
                "INVALID_REQUEST",
                e.body_text(),
            )),
        }
    }
}

/// `axum::extract::Path` whose rejection (a segment that percent-decodes to bytes that are not
/// UTF-8, say) has the registry's error shape instead of axum's plain text.
pub struct ApiPath<T>(pub T);

impl<T, S> axum::extract::FromRequestParts<S> for ApiPath<T>
where
    T: serde::de::DeserializeOwned + Send,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        state: &S,
    ) -> Result<Self, ApiError> {
        match axum::extract::Path::<T>::from_request_parts(parts, state).await {
            Ok(axum::extract::Path(v)) => Ok(ApiPath(v)),
            Err(e) => Err(ApiError::custom(
                StatusCode::BAD_REQUEST,
                "INVALID_REQUEST",
                format!("the request path is invalid: {}", e.body_text()),
            )),
        }
    }
}

#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: &'static str,
    pub message: String,
    pub detail: Option<serde_json::Value>,
    pub headers: Vec<(HeaderName, HeaderValue)>,
}

impl ApiError {
    pub fn new(status: StatusCode, code: ErrorCode, message: impl Into<String>) -> ApiError {
        ApiError::custom(status, code.as_str(), message)
    }

    /// An error with a code outside the OCI list (the management API's).
    pub fn custom(status: StatusCode, code: &'static str, message: impl Into<String>) -> ApiError {
        ApiError {
            status,
            code,
            message: message.into(),
            detail: None,
            headers: Vec::new(),
        }
    }

    pub fn with_detail(mut self, detail: serde_json::Value) -> ApiError {
        self.detail = Some(detail);
        self
    }

    pub fn with_header(mut self, name: HeaderName, value: &str) -> ApiError {
        if let Ok(v) = HeaderValue::from_str(value) {
            self.headers.push((name, v));
        }
        self
    }

    fn internal(cause: &dyn std::error::Error) -> ApiError {
        tracing::error!(error = %cause, "internal error");
        ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            ErrorCode::Unknown,
            "internal registry error; the operator can find the cause in the server log",
        )
    }
}

impl From<RouteError> for ApiError {
    fn from(e: RouteError) -> ApiError {
        let (status, code) = match &e {
            RouteError::NotFound(_) => (StatusCode::NOT_FOUND, ErrorCode::Unsupported),
            RouteError::UploadUnknown(_) => (StatusCode::NOT_FOUND, ErrorCode::BlobUploadUnknown),
            RouteError::Name(_) | RouteError::Encoding(_) => {
                (StatusCode::BAD_REQUEST, ErrorCode::NameInvalid)
            }
            RouteError::Digest(_) => (StatusCode::BAD_REQUEST, ErrorCode::DigestInvalid),
            RouteError::Tag(_) => (StatusCode::BAD_REQUEST, ErrorCode::TagInvalid),
        };
        ApiError::new(status, code, e.to_string())
    }
}

impl From<RegistryError> for ApiError {
    fn from(e: RegistryError) -> ApiError {
        use RegistryError as R;
        let msg = e.to_string();
        if e.is_disk_full() {
            return storage_full(&msg);
        }
        if e.is_out_of_files() {
            tracing::error!(error = %msg, "out of file descriptors");
            return ApiError::custom(
                StatusCode::SERVICE_UNAVAILABLE,
                "UNAVAILABLE",
                "the registry is out of file descriptors for the moment (too many connections \
                 at once); retry shortly",
            )
            .with_header(header::RETRY_AFTER, "1");
        }
        match e {
            R::NameUnknown(n) => ApiError::new(StatusCode::NOT_FOUND, ErrorCode::NameUnknown, msg)
                .with_detail(json!({ "name": n.as_str() })),
            R::ManifestUnknown(r) => {
                ApiError::new(StatusCode::NOT_FOUND, ErrorCode::ManifestUnknown, msg)
                    .with_detail(json!({ "reference": r }))
            }
            R::BlobUnknown(d) => ApiError::new(StatusCode::NOT_FOUND, ErrorCode::BlobUnknown, msg)
                .with_detail(json!({ "digest": d.to_string() })),
            R::UploadUnknown(_) => {
                ApiError::new(StatusCode::NOT_FOUND, ErrorCode::BlobUploadUnknown, msg)
            }
            R::DigestMismatch { expected, actual } => {
                ApiError::new(StatusCode::BAD_REQUEST, ErrorCode::DigestInvalid, msg).with_detail(
                    json!({ "expected": expected.to_string(), "actual": actual.to_string() }),
                )
            }
            R::ManifestInvalid(_) => {
                ApiError::new(StatusCode::BAD_REQUEST, ErrorCode::ManifestInvalid, msg)
            }
            R::ManifestTooLarge { size, limit } => {
                ApiError::new(StatusCode::PAYLOAD_TOO_LARGE, ErrorCode::SizeInvalid, msg)
                    .with_detail(json!({ "size": size, "limit": limit }))
            }
            R::ManifestBlobUnknown(d) | R::ManifestChildUnknown(d) => {
                ApiError::new(StatusCode::BAD_REQUEST, ErrorCode::ManifestBlobUnknown, msg)
                    .with_detail(json!({ "digest": d.to_string() }))
            }
            // As GitLab's registry answers; zot refuses such a delete too.
            R::ManifestReferenced { digest, index, .. } => {
                ApiError::custom(StatusCode::CONFLICT, "MANIFEST_REFERENCED", msg)
                    .with_detail(json!({ "digest": digest.to_string(), "index": index }))
            }
            // The entity tag of a tag is its digest (the manifest's ETag): a conditional push
            // (RFC 9110 §13.1.1, §13.1.2) that does not hold changes nothing.
            R::TagCondition(_) => {
                ApiError::custom(StatusCode::PRECONDITION_FAILED, "PRECONDITION_FAILED", msg)
            }
            R::Storage(s) => match s {
                StorageError::OutOfOrder { offset, .. } => {
                    let range = format!("0-{}", offset.saturating_sub(1));
                    ApiError::new(
                        StatusCode::RANGE_NOT_SATISFIABLE,
                        ErrorCode::BlobUploadInvalid,
                        msg,
                    )
                    .with_header(header::RANGE, &range)
                }
                StorageError::Interrupted { .. } => {
                    ApiError::new(StatusCode::BAD_REQUEST, ErrorCode::BlobUploadInvalid, msg)
                }
                StorageError::TooLarge { .. } => {
                    ApiError::new(StatusCode::PAYLOAD_TOO_LARGE, ErrorCode::SizeInvalid, msg)
                }
                // The object store holding the blobs failed or did not answer (after retries):
                // worth trying again, and nothing for the client to fix. The store's answer
                // (bucket, key, provider message) goes to the log, not to the client.
                e @ StorageError::Remote { .. } => {
                    tracing::error!(error = %e, "blob store request failed");
                    ApiError::custom(
                        StatusCode::SERVICE_UNAVAILABLE,
                        "UNAVAILABLE",
                        "the registry's blob store failed or did not answer; try again later \
                         (the operator can find the cause in the server log)",
                    )
                    .with_header(header::RETRY_AFTER, "5")
                }
                other => ApiError::internal(&other),
            },
            R::Meta(m) => meta_error(&m),
            other => ApiError::internal(&other),
        }
    }
}

/// A metadata error: `503 UNAVAILABLE` when the database cannot be reached (a PostgreSQL
/// server that is down or out of connections: worth trying again), `500` otherwise.
/// `507`: the disk (of the blob store or the metadata database) is full.
fn storage_full(cause: &str) -> ApiError {
    tracing::error!(error = %cause, "storage is full");
    ApiError::new(
        StatusCode::INSUFFICIENT_STORAGE,
        ErrorCode::Unknown,
        "the registry's storage is full (no space or no inodes left on its disk); the request \
         changed nothing: retry after the operator frees room (deleting images and `outpost gc` \
         work while it is full)",
    )
}

fn meta_error(m: &outpost_registry::MetaError) -> ApiError {
    if m.is_disk_full() {
        return storage_full(&m.to_string());
    }
    if m.is_unavailable() {
        match m.unavailable_hint() {
            Some(hint) => {
                tracing::error!(error = %m, hint, "the metadata database does not answer")
            }
            None => tracing::error!(error = %m, "the metadata database does not answer"),
        }
        return ApiError::custom(
            StatusCode::SERVICE_UNAVAILABLE,
            "UNAVAILABLE",
            "the registry's metadata database did not answer; try again later (the operator \
             can find the cause in the server log)",
        );
    }
    if m.is_invalid_text() {
        return ApiError::custom(
            StatusCode::BAD_REQUEST,
            "INVALID_REQUEST",
            "the request holds a NUL character, which this registry cannot store or look up",
        );
    }
    ApiError::internal(m)
}

impl From<ControlError> for ApiError {
    fn from(e: ControlError) -> ApiError {
        use ControlError as C;
        let msg = e.to_string();
        match e {
            C::NotFound { .. } => ApiError::custom(StatusCode::NOT_FOUND, "NOT_FOUND", msg),
            C::AlreadyExists { .. } | C::Taken(_) => {
                ApiError::custom(StatusCode::CONFLICT, "ALREADY_EXISTS", msg)
            }
            C::Invalid(_) | C::Scope(_) => {
                ApiError::custom(StatusCode::BAD_REQUEST, "INVALID_REQUEST", msg)
            }
            C::NotActive(_) => ApiError::custom(StatusCode::BAD_REQUEST, "NOT_ACTIVE", msg),
            C::Unavailable(_) => {
                ApiError::custom(StatusCode::SERVICE_UNAVAILABLE, "UNAVAILABLE", msg)
            }
            C::ManagedAtRoot(_) | C::FromParent { .. } => {
                ApiError::new(StatusCode::FORBIDDEN, ErrorCode::Denied, msg)
            }
            C::Limit { .. } => ApiError::custom(StatusCode::CONFLICT, "LIMIT_EXCEEDED", msg),
            C::CursorExpired { latest, .. } => {
                ApiError::custom(StatusCode::GONE, "CURSOR_EXPIRED", msg)
                    .with_detail(json!({ "latest": latest }))
            }
            C::AlreadyActivated(_) => {
                ApiError::custom(StatusCode::CONFLICT, "ALREADY_ACTIVATED", msg).with_detail(json!(
                    "Deactivate the connected registry before deploying it again."
                ))
            }
            C::BadCredentials | C::Disabled(_) | C::PasswordExpired { .. } | C::Jwt(_) => {
                ApiError::new(StatusCode::UNAUTHORIZED, ErrorCode::Unauthorized, msg)
            }
            C::Meta(m) => meta_error(&m),
            other => ApiError::internal(&other),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut error = json!({ "code": self.code, "message": self.message });
        if let Some(d) = self.detail {
            error["detail"] = d;
        }
        let body = json!({ "errors": [error] }).to_string();
        let mut resp = (
            self.status,
            [(header::CONTENT_TYPE, "application/json")],
            body,
        )
            .into_response();
        for (k, v) in self.headers {
            resp.headers_mut().insert(k, v);
        }
        resp
    }
}

/// The answer to a path no route has (outside `/v2/`, whose dispatcher answers for itself);
/// `prefix` is where the router answering is nested (it sees the path without it).
pub(crate) fn no_such_route(prefix: &str, uri: &axum::http::Uri) -> ApiError {
    ApiError::custom(
        StatusCode::NOT_FOUND,
        "NOT_FOUND",
        format!(
            "{prefix}{} is not a path of this registry (docs/api.md and docs/sync-protocol.md \
             list them)",
            uri.path()
        ),
    )
}

/// The answer to a method a route does not take.
pub(crate) fn no_such_method(
    prefix: &str,
    method: &axum::http::Method,
    uri: &axum::http::Uri,
) -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        ErrorCode::Unsupported,
        format!("{prefix}{} does not take {method}", uri.path()),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use outpost_oci::Digest;

    #[test]
    fn mapping() {
        let d = Digest::sha256_of(b"x");
        let cases: Vec<(RegistryError, StatusCode, ErrorCode)> = vec![
            (
                RegistryError::BlobUnknown(d.clone()),
                StatusCode::NOT_FOUND,
                ErrorCode::BlobUnknown,
            ),
            (
                RegistryError::ManifestBlobUnknown(d.clone()),
                StatusCode::BAD_REQUEST,
                ErrorCode::ManifestBlobUnknown,
            ),
            (
                RegistryError::ManifestChildUnknown(d.clone()),
                StatusCode::BAD_REQUEST,
                ErrorCode::ManifestBlobUnknown,
            ),
            (
                RegistryError::UploadUnknown("x".into()),
                StatusCode::NOT_FOUND,
                ErrorCode::BlobUploadUnknown,
            ),
            (
                RegistryError::DigestMismatch {
                    expected: d.clone(),
                    actual: d.clone(),
                },
                StatusCode::BAD_REQUEST,
                ErrorCode::DigestInvalid,
            ),
            (
                RegistryError::ManifestTooLarge { size: 5, limit: 4 },
                StatusCode::PAYLOAD_TOO_LARGE,
                ErrorCode::SizeInvalid,
            ),
            (
                RegistryError::Storage(StorageError::OutOfOrder { offset: 10, got: 3 }),
                StatusCode::RANGE_NOT_SATISFIABLE,
                ErrorCode::BlobUploadInvalid,
            ),
        ];
        for (e, status, code) in cases {
            let a = ApiError::from(e);
            assert_eq!((a.status, a.code), (status, code.as_str()));
        }
    }

    /// Out of file descriptors is a passing condition: 503 with a time to retry, not a 500.
    #[test]
    fn out_of_file_descriptors_is_unavailable_for_a_moment() {
        let io = |errno| {
            RegistryError::Storage(StorageError::Io {
                path: "blobs/x".into(),
                cause: std::io::Error::from_raw_os_error(errno),
            })
        };
        for errno in [24, 23] {
            let a = ApiError::from(io(errno));
            assert_eq!(
                (a.status, a.code),
                (StatusCode::SERVICE_UNAVAILABLE, "UNAVAILABLE")
            );
            assert!(
                a.headers
                    .iter()
                    .any(|(n, v)| n == header::RETRY_AFTER && v == "1")
            );
        }
        // ENOSPC stays 507, EIO stays 500.
        assert_eq!(
            ApiError::from(io(28)).status,
            StatusCode::INSUFFICIENT_STORAGE
        );
        assert_eq!(
            ApiError::from(io(5)).status,
            StatusCode::INTERNAL_SERVER_ERROR
        );
    }
}
