//! The `/v2/` route parser. axum's router cannot put a wildcard in the middle of a path and OCI
//! repository names contain slashes, so the server sends every `/v2/…` request here and this
//! pure function decides which resource it addresses, validating the name, digest or tag on the
//! way. The path is split on its literal `/` first and each segment is percent-decoded after
//! (`v%31` is the tag `v1`, as RFC 3986 and `docker-registry` have it), so an encoded `/`
//! never separates segments: within a name it meets the name's own checks, and within a
//! digest, tag or upload id it makes that invalid.

use crate::digest::{Digest, DigestError};
use crate::name::{NameError, Reference, RepoName};

/// A resource of the distribution API. The HTTP method is matched by the server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Route {
    /// `/v2/`
    Base,
    /// `/v2/_catalog`
    Catalog,
    /// `/v2/<name>/tags/list`
    Tags { name: RepoName },
    /// `/v2/<name>/manifests/<reference>`
    Manifest {
        name: RepoName,
        reference: Reference,
    },
    /// `/v2/<name>/blobs/<digest>`
    Blob { name: RepoName, digest: Digest },
    /// `/v2/<name>/blobs/uploads/`
    UploadStart { name: RepoName },
    /// `/v2/<name>/blobs/uploads/<id>`
    Upload { name: RepoName, id: String },
    /// `/v2/<name>/referrers/<digest>`
    Referrers { name: RepoName, digest: Digest },
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RouteError {
    #[error("no such endpoint: {0}")]
    NotFound(String),
    #[error(
        "upload {0:?} does not exist (an upload id is letters, digits and '-'); start a new upload with POST"
    )]
    UploadUnknown(String),
    #[error("the path {0:?} holds percent-encoded bytes that are not UTF-8")]
    Encoding(String),
    #[error(transparent)]
    Name(NameError),
    #[error(transparent)]
    Digest(DigestError),
    #[error(transparent)]
    Tag(NameError),
}

fn name(segs: &[&str]) -> Result<RepoName, RouteError> {
    if segs.is_empty() {
        return Err(RouteError::NotFound("missing repository name".into()));
    }
    segs.join("/").parse().map_err(RouteError::Name)
}

fn digest(s: &str) -> Result<Digest, RouteError> {
    s.parse().map_err(RouteError::Digest)
}

/// Longest upload id accepted in a URL (ours are UUIDs; anything longer is not ours).
const MAX_UPLOAD_ID: usize = 64;

impl Route {
    /// Parses the path of a request (including the leading `/v2`).
    pub fn parse(path: &str) -> Result<Route, RouteError> {
        let rest = path
            .strip_prefix("/v2")
            .ok_or_else(|| RouteError::NotFound(path.to_string()))?;
        if rest.is_empty() || rest == "/" {
            return Ok(Route::Base);
        }
        let rest = rest
            .strip_prefix('/')
            .ok_or_else(|| RouteError::NotFound(path.to_string()))?;
        let decoded = rest
            .split('/')
            .map(|seg| percent_encoding::percent_decode_str(seg).decode_utf8())
            .collect::<Result<Vec<_>, _>>()
            .map_err(|_| RouteError::Encoding(path.chars().take(200).collect()))?;
        let segs: Vec<&str> = decoded.iter().map(|s| s.as_ref()).collect();
        if segs == ["_catalog"] {
            return Ok(Route::Catalog);
        }
        let n = segs.len();
        let at = |i: usize| if i < n { segs[n - 1 - i] } else { "" };
        // /blobs/uploads/ (trailing slash leaves an empty last segment) or /blobs/uploads
        if n >= 3 && at(0).is_empty() && at(1) == "uploads" && at(2) == "blobs" {
            return Ok(Route::UploadStart {
                name: name(&segs[..n - 3])?,
            });
        }
        if n >= 3 && at(0) == "uploads" && at(1) == "blobs" {
            return Ok(Route::UploadStart {
                name: name(&segs[..n - 2])?,
            });
        }
        if n >= 4 && at(1) == "uploads" && at(2) == "blobs" {
            let id = at(0);
            if id.is_empty()
                || id.len() > MAX_UPLOAD_ID
                || !id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
            {
                return Err(RouteError::UploadUnknown(id.chars().take(80).collect()));
            }
            return Ok(Route::Upload {
                name: name(&segs[..n - 3])?,
                id: id.to_string(),
            });
        }
        if n >= 3 && at(0) == "list" && at(1) == "tags" {
            return Ok(Route::Tags {
                name: name(&segs[..n - 2])?,
            });
        }
        if n >= 3 && at(1) == "manifests" {
            let name = name(&segs[..n - 2])?;
            let r = at(0);
            let reference = if r.contains(':') {
                Reference::Digest(digest(r)?)
            } else {
                Reference::Tag(r.parse().map_err(RouteError::Tag)?)
            };
            return Ok(Route::Manifest { name, reference });
        }
        if n >= 3 && at(1) == "blobs" {
            let name = name(&segs[..n - 2])?;
            return Ok(Route::Blob {
                name,
                digest: digest(at(0))?,
            });
        }
        if n >= 3 && at(1) == "referrers" {
            let name = name(&segs[..n - 2])?;
            return Ok(Route::Referrers {
                name,
                digest: digest(at(0))?,
            });
        }
        Err(RouteError::NotFound(path.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const D: &str = "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";

    fn n(s: &str) -> RepoName {
        s.parse().unwrap()
    }

    #[test]
    fn spec_examples() {
        assert_eq!(Route::parse("/v2/").unwrap(), Route::Base);
        assert_eq!(Route::parse("/v2").unwrap(), Route::Base);
        assert_eq!(Route::parse("/v2/_catalog").unwrap(), Route::Catalog);
        assert_eq!(
            Route::parse("/v2/library/alpine/tags/list").unwrap(),
            Route::Tags {
                name: n("library/alpine")
            }
        );
        assert_eq!(
            Route::parse("/v2/a/b/manifests/latest").unwrap(),
            Route::Manifest {
                name: n("a/b"),
                reference: Reference::Tag("latest".parse().unwrap())
            }
        );
        assert_eq!(
            Route::parse(&format!("/v2/a/manifests/{D}")).unwrap(),
            Route::Manifest {
                name: n("a"),
                reference: Reference::Digest(D.parse().unwrap())
            }
        );
        assert_eq!(
            Route::parse(&format!("/v2/a/blobs/{D}")).unwrap(),
            Route::Blob {
                name: n("a"),
                digest: D.parse().unwrap()
            }
        );
        assert_eq!(
            Route::parse("/v2/a/b/blobs/uploads/").unwrap(),
            Route::UploadStart { name: n("a/b") }
        );
        assert_eq!(
            Route::parse("/v2/a/b/blobs/uploads").unwrap(),
            Route::UploadStart { name: n("a/b") }
        );
        assert_eq!(
            Route::parse("/v2/a/blobs/uploads/0f6e-11").unwrap(),
            Route::Upload {
                name: n("a"),
                id: "0f6e-11".into()
            }
        );
        assert_eq!(
            Route::parse(&format!("/v2/x/referrers/{D}")).unwrap(),
            Route::Referrers {
                name: n("x"),
                digest: D.parse().unwrap()
            }
        );
    }

    #[test]
    fn segments_are_percent_decoded() {
        assert_eq!(
            Route::parse("/v2/t%31/manifests/v%31").unwrap(),
            Route::Manifest {
                name: n("t1"),
                reference: Reference::Tag("v1".parse().unwrap())
            }
        );
        assert_eq!(
            Route::parse("/v2/a%2Fb/tags/list").unwrap(),
            Route::Tags { name: n("a/b") }
        );
        assert_eq!(
            Route::parse(&format!("/v2/a/blobs/{}", D.replace(':', "%3A"))).unwrap(),
            Route::Blob {
                name: n("a"),
                digest: D.parse().unwrap()
            }
        );
        assert_eq!(Route::parse("/v2/%5Fcatalog").unwrap(), Route::Catalog);
    }

    #[test]
    fn names_may_contain_keywords() {
        assert_eq!(
            Route::parse("/v2/blobs/manifests/tags/list").unwrap(),
            Route::Tags {
                name: n("blobs/manifests")
            }
        );
        assert_eq!(
            Route::parse("/v2/manifests/manifests/v1").unwrap(),
            Route::Manifest {
                name: n("manifests"),
                reference: Reference::Tag("v1".parse().unwrap())
            }
        );
    }

    #[test]
    fn hostile_paths() {
        assert!(matches!(
            Route::parse("/v2/../etc/manifests/x"),
            Err(RouteError::Name(_))
        ));
        assert!(matches!(
            Route::parse("/v2/a%2F..%2Fb/manifests/x"),
            Err(RouteError::Name(_))
        ));
        // An encoded slash does not separate segments: the digest or id it is in is invalid.
        assert!(matches!(
            Route::parse("/v2/a/blobs/uploads%2Fx"),
            Err(RouteError::Digest(_))
        ));
        assert!(matches!(
            Route::parse("/v2/a/blobs/uploads/..%2F..%2Fmeta.db"),
            Err(RouteError::UploadUnknown(_))
        ));
        assert!(matches!(
            Route::parse("/v2/a/manifests/v%FF"),
            Err(RouteError::Encoding(_))
        ));
        assert!(matches!(
            Route::parse("/v2/a/blobs/sha256:..%2f..%2fetc"),
            Err(RouteError::Digest(_))
        ));
        assert!(matches!(
            Route::parse("/v2/a/blobs/md5:abc"),
            Err(RouteError::Digest(_))
        ));
        assert!(matches!(
            Route::parse("/v2/a/manifests/bad tag"),
            Err(RouteError::Tag(_))
        ));
        assert!(matches!(
            Route::parse("/v2/a/blobs/uploads/../../x"),
            Err(RouteError::Name(_)) | Err(RouteError::NotFound(_))
        ));
        assert!(matches!(
            Route::parse("/v2/a/blobs/uploads/a.b"),
            Err(RouteError::UploadUnknown(_))
        ));
        assert!(matches!(
            Route::parse("/v2/a"),
            Err(RouteError::NotFound(_))
        ));
        assert!(matches!(
            Route::parse("/v2/manifests/x"),
            Err(RouteError::NotFound(_)) | Err(RouteError::Name(_))
        ));
        assert!(matches!(
            Route::parse("/v3/a/tags/list"),
            Err(RouteError::NotFound(_))
        ));
    }

    proptest! {
        #[test]
        fn never_panics(s in "/v2/[a-z0-9/._:%-]{0,80}") {
            let _ = Route::parse(&s);
        }

        #[test]
        fn parsed_names_are_valid(s in "/v2/[a-z./]{1,30}/manifests/[a-z]{1,5}") {
            if let Ok(Route::Manifest { name, .. }) = Route::parse(&s) {
                prop_assert!(name.as_str().parse::<RepoName>().is_ok());
            }
        }
    }
}
