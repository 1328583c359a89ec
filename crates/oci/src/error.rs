//! The error codes of the distribution spec (plus distribution's `TAG_INVALID` and ACR's
//! `ALREADY_ACTIVATED`, which clients of those registries already understand). Only the code
//! strings live here; which HTTP status goes with which failure is decided by `outpost-server`.
//! Also [`error_chain`], the one way every crate writes an error with its causes.

use serde::Serialize;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum ErrorCode {
    BlobUnknown,
    BlobUploadInvalid,
    BlobUploadUnknown,
    DigestInvalid,
    ManifestBlobUnknown,
    ManifestInvalid,
    ManifestUnknown,
    NameInvalid,
    NameUnknown,
    SizeInvalid,
    TagInvalid,
    Unauthorized,
    Denied,
    Unsupported,
    #[serde(rename = "TOOMANYREQUESTS")]
    TooManyRequests,
    RangeInvalid,
    Unknown,
}

impl ErrorCode {
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::BlobUnknown => "BLOB_UNKNOWN",
            ErrorCode::BlobUploadInvalid => "BLOB_UPLOAD_INVALID",
            ErrorCode::BlobUploadUnknown => "BLOB_UPLOAD_UNKNOWN",
            ErrorCode::DigestInvalid => "DIGEST_INVALID",
            ErrorCode::ManifestBlobUnknown => "MANIFEST_BLOB_UNKNOWN",
            ErrorCode::ManifestInvalid => "MANIFEST_INVALID",
            ErrorCode::ManifestUnknown => "MANIFEST_UNKNOWN",
            ErrorCode::NameInvalid => "NAME_INVALID",
            ErrorCode::NameUnknown => "NAME_UNKNOWN",
            ErrorCode::SizeInvalid => "SIZE_INVALID",
            ErrorCode::TagInvalid => "TAG_INVALID",
            ErrorCode::Unauthorized => "UNAUTHORIZED",
            ErrorCode::Denied => "DENIED",
            ErrorCode::Unsupported => "UNSUPPORTED",
            ErrorCode::TooManyRequests => "TOOMANYREQUESTS",
            ErrorCode::RangeInvalid => "RANGE_INVALID",
            ErrorCode::Unknown => "UNKNOWN",
        }
    }
}

/// An error and its causes, `: `-separated. HTTP clients' own text leaves the cause out
/// ("error sending request" hides "Connection refused" or "invalid peer certificate").
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        out.push_str(": ");
        out.push_str(&c.to_string());
        cause = c.source();
    }
    out
}

/// What to do about a TLS certificate that a client refused, from the text of the error chain
/// (`None` when it is no certificate error). `trust` says how this client is given a private
/// CA; `given` is the CA file it was given, if any.
pub fn certificate_hint(chain: &str, trust: &str, given: Option<&str>) -> Option<String> {
    if !chain.contains("certificate") {
        return None;
    }
    Some(if chain.contains("expired") {
        "the server's certificate has expired: renew it (an Outpost server reads it again on \
         SIGHUP)"
            .into()
    } else if chain.contains("not valid for name") {
        "the server's certificate was issued for other names: reach the server by one of them, \
         or issue a certificate for this name"
            .into()
    } else if chain.contains("CaUsedAsEndEntity") {
        "the server presents a CA certificate: give it a leaf certificate (basicConstraints \
         CA:FALSE) that CA signs"
            .into()
    } else if let (true, Some(file)) = (
        chain.contains("UnknownIssuer") || chain.contains("BadSignature"),
        given,
    ) {
        format!(
            "the certificate is signed neither by the CA in {file} nor by one the system trusts"
        )
    } else {
        format!("if a private CA signed the server's certificate, {trust}")
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn certificate_hints_name_the_actual_problem() {
        let hint = |chain: &str, given| certificate_hint(chain, "set SSL_CERT_FILE", given);
        assert_eq!(hint("connection refused", None), None);
        let expired = hint("invalid peer certificate: certificate expired: verification time 1, but certificate is not valid after 0", Some("ca.pem")).unwrap();
        assert!(expired.contains("has expired"), "{expired}");
        let name = hint(
            "invalid peer certificate: certificate not valid for name \"localhost\"",
            None,
        )
        .unwrap();
        assert!(name.contains("issued for other names"), "{name}");
        let unknown = hint(
            "invalid peer certificate: UnknownIssuer",
            Some("/etc/ca.pem"),
        )
        .unwrap();
        assert!(
            unknown.contains("neither by the CA in /etc/ca.pem"),
            "{unknown}"
        );
        let unknown = hint("invalid peer certificate: UnknownIssuer", None).unwrap();
        assert!(unknown.contains("set SSL_CERT_FILE"), "{unknown}");
    }

    #[test]
    fn serde_matches_as_str() {
        for c in [
            ErrorCode::BlobUnknown,
            ErrorCode::TooManyRequests,
            ErrorCode::ManifestBlobUnknown,
        ] {
            assert_eq!(
                serde_json::to_value(c).unwrap(),
                serde_json::Value::String(c.as_str().into())
            );
        }
    }
}
