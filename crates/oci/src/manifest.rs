//! Manifest parsing and validation. Outpost stores and serves the exact bytes a client pushed
//! (the digest is over those bytes); this module only reads them to learn the media type, the
//! blobs and child manifests that must already exist, the `subject` (for the referrers API) and
//! the artifact type. Unknown fields are ignored, as the image spec requires.
//!
//! We parse with our own small serde structs rather than `oci-spec`'s types because one parser
//! must accept both the Docker schema 2 and OCI shapes (including fields either adds later) and
//! we only ever need the descriptors, never a re-serialised document.

use crate::digest::Digest;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
pub const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
pub const DOCKER_MANIFEST_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
pub const DOCKER_SCHEMA1: &str = "application/vnd.docker.distribution.manifest.v1+json";
pub const DOCKER_SCHEMA1_SIGNED: &str = "application/vnd.docker.distribution.manifest.v1+prettyjws";
pub const OCI_EMPTY_CONFIG: &str = "application/vnd.oci.empty.v1+json";

/// Every manifest media type Outpost accepts, in the order offered to clients.
pub const SUPPORTED: [&str; 4] = [
    OCI_MANIFEST,
    OCI_INDEX,
    DOCKER_MANIFEST,
    DOCKER_MANIFEST_LIST,
];

/// Whether a media type names a manifest (rather than a blob).
pub fn is_manifest_type(media_type: &str) -> bool {
    SUPPORTED.contains(&media_type)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ManifestKind {
    /// An image manifest (OCI or Docker schema 2), possibly an artifact.
    Image,
    /// An index / manifest list pointing at other manifests.
    Index,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Descriptor {
    pub media_type: String,
    pub digest: Digest,
    pub size: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub urls: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub artifact_type: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub annotations: Option<BTreeMap<String, String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub platform: Option<serde_json::Value>,
}

impl Descriptor {
    /// Layers a registry need not hold: Docker foreign layers and OCI non-distributable layers
    /// that name external `urls`.
    pub fn is_external(&self) -> bool {
        let foreign =
            self.media_type.contains(".foreign.") || self.media_type.contains(".nondistributable.");
        foreign && self.urls.as_ref().is_some_and(|u| !u.is_empty())
    }
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Raw {
    schema_version: Option<i64>,
    media_type: Option<String>,
    artifact_type: Option<String>,
    config: Option<Descriptor>,
    layers: Option<Vec<Descriptor>>,
    manifests: Option<Vec<Descriptor>>,
    subject: Option<Descriptor>,
    annotations: Option<BTreeMap<String, String>>,
}

/// What a stored manifest says about itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Manifest {
    pub kind: ManifestKind,
    pub media_type: String,
    pub artifact_type: Option<String>,
    pub config: Option<Descriptor>,
    pub layers: Vec<Descriptor>,
    pub manifests: Vec<Descriptor>,
    pub subject: Option<Descriptor>,
    pub annotations: Option<BTreeMap<String, String>>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ManifestError {
    #[error("manifest is not valid JSON: {0}")]
    Json(String),
    /// Valid JSON of the wrong form: a field of the wrong type, a digest that is not one.
    #[error("manifest is valid JSON but not a valid manifest: {0}")]
    Shape(String),
    #[error(
        "manifest has no mediaType field and both an index's `manifests` and an image \
         manifest's `config`/`layers`: say which it is with a mediaType field"
    )]
    Ambiguous,
    #[error("manifest schemaVersion must be 2, got {0:?}")]
    SchemaVersion(Option<i64>),
    #[error(
        "Docker schema 1 manifests are not supported; push with a current client (schema 2 or OCI)"
    )]
    Schema1,
    #[error("manifest media type {0:?} is not supported; use one of {SUPPORTED:?}")]
    UnsupportedMediaType(String),
    #[error("Content-Type {content_type:?} does not match the manifest's mediaType {media_type:?}")]
    ContentTypeMismatch {
        content_type: String,
        media_type: String,
    },
    #[error(
        "manifest has no mediaType field, which with Content-Type {0:?} it needs (only OCI \
         image manifests and indexes may leave it out)"
    )]
    UnknownMediaType(String),
    #[error("image manifest has no config descriptor")]
    MissingConfig,
    #[error("index has no manifests array")]
    MissingManifests,
}

impl Manifest {
    /// Parses and validates `bytes` pushed with `content_type` (the request's `Content-Type`,
    /// if any).
    pub fn parse(bytes: &[u8], content_type: Option<&str>) -> Result<Manifest, ManifestError> {
        let content_type = content_type
            .map(|c| c.split(';').next().unwrap_or(c).trim())
            .filter(|c| !c.is_empty());
        if matches!(content_type, Some(DOCKER_SCHEMA1 | DOCKER_SCHEMA1_SIGNED)) {
            return Err(ManifestError::Schema1);
        }
        let raw: Raw = serde_json::from_slice(bytes).map_err(|e| match e.classify() {
            serde_json::error::Category::Data => ManifestError::Shape(e.to_string()),
            _ => ManifestError::Json(e.to_string()),
        })?;
        if raw.schema_version == Some(1) {
            return Err(ManifestError::Schema1);
        }
        if raw.schema_version != Some(2) {
            return Err(ManifestError::SchemaVersion(raw.schema_version));
        }
        // Without a mediaType, a document of both shapes could be stored as one and served
        // as the other.
        if raw.media_type.is_none()
            && raw.manifests.is_some()
            && (raw.config.is_some() || raw.layers.is_some())
        {
            return Err(ManifestError::Ambiguous);
        }
        let media_type = match (&raw.media_type, content_type) {
            (Some(mt), Some(ct)) if is_manifest_type(ct) && ct != mt => {
                return Err(ManifestError::ContentTypeMismatch {
                    content_type: ct.to_string(),
                    media_type: mt.clone(),
                });
            }
            (Some(mt), _) => mt.clone(),
            (None, Some(ct)) if ct == OCI_MANIFEST || ct == OCI_INDEX => ct.to_string(),
            (None, ct) => {
                // The OCI spec lets mediaType be absent; fall back on the document's shape when
                // the client sent no usable Content-Type either.
                if ct.is_some_and(|c| c != "application/json") {
                    return Err(ManifestError::UnknownMediaType(
                        ct.unwrap_or_default().to_string(),
                    ));
                }
                if raw.manifests.is_some() {
                    OCI_INDEX.to_string()
                } else {
                    OCI_MANIFEST.to_string()
                }
            }
        };
        let kind = match media_type.as_str() {
            OCI_MANIFEST | DOCKER_MANIFEST => ManifestKind::Image,
            OCI_INDEX | DOCKER_MANIFEST_LIST => ManifestKind::Index,
            DOCKER_SCHEMA1 | DOCKER_SCHEMA1_SIGNED => return Err(ManifestError::Schema1),
            other => return Err(ManifestError::UnsupportedMediaType(other.to_string())),
        };
        let m = Manifest {
            kind,
            media_type,
            artifact_type: raw.artifact_type,
            config: raw.config,
            layers: raw.layers.unwrap_or_default(),
            manifests: raw.manifests.clone().unwrap_or_default(),
            subject: raw.subject,
            annotations: raw.annotations,
        };
        match kind {
            ManifestKind::Image if m.config.is_none() => return Err(ManifestError::MissingConfig),
            ManifestKind::Index if raw.manifests.is_none() => {
                return Err(ManifestError::MissingManifests);
            }
            // Entries of a media type this registry does not know are kept and ignored, as the
            // image spec requires ("MUST NOT error on encountering a mediaType that is unknown").
            ManifestKind::Index | ManifestKind::Image => {}
        }
        Ok(m)
    }

    /// Blobs the registry must hold before accepting this manifest.
    pub fn required_blobs(&self) -> impl Iterator<Item = &Descriptor> {
        self.config
            .iter()
            .chain(self.layers.iter().filter(|d| !d.is_external()))
    }

    /// Child manifests the registry must hold before accepting this index.
    pub fn required_manifests(&self) -> impl Iterator<Item = &Descriptor> {
        // Only children this registry knows to be manifests must be present; others are
        // stored as given and ignored.
        self.manifests
            .iter()
            .filter(|d| is_manifest_type(&d.media_type))
    }

    /// The artifact type reported by the referrers API: `artifactType`, else (also when it
    /// is empty, as the distribution spec says) the config's media type for image manifests
    /// and none for indexes.
    pub fn effective_artifact_type(&self) -> Option<String> {
        let given = self.artifact_type.clone().filter(|t| !t.is_empty());
        given.or_else(|| match self.kind {
            ManifestKind::Image => self.config.as_ref().map(|c| c.media_type.clone()),
            ManifestKind::Index => None,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const D1: &str = "sha256:1111111111111111111111111111111111111111111111111111111111111111";
    const D2: &str = "sha256:2222222222222222222222222222222222222222222222222222222222222222";

    fn image(media_type: &str) -> String {
        format!(
            r#"{{"schemaVersion":2,"mediaType":"{media_type}","config":{{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"{D1}","size":2}},"layers":[{{"mediaType":"application/vnd.oci.image.layer.v1.tar+gzip","digest":"{D2}","size":10}}],"futureField":1}}"#
        )
    }

    #[test]
    fn parses_oci_and_docker_images() {
        for mt in [OCI_MANIFEST, DOCKER_MANIFEST] {
            let m = Manifest::parse(image(mt).as_bytes(), Some(mt)).unwrap();
            assert_eq!(m.kind, ManifestKind::Image);
            assert_eq!(m.required_blobs().count(), 2);
            assert_eq!(
                m.effective_artifact_type().as_deref(),
                Some("application/vnd.oci.image.config.v1+json")
            );
        }
    }

    #[test]
    fn content_type_must_agree() {
        let e = Manifest::parse(image(OCI_MANIFEST).as_bytes(), Some(DOCKER_MANIFEST)).unwrap_err();
        assert!(matches!(e, ManifestError::ContentTypeMismatch { .. }));
        // A generic content type defers to the body.
        assert!(Manifest::parse(image(OCI_MANIFEST).as_bytes(), Some("application/json")).is_ok());
        assert!(Manifest::parse(image(OCI_MANIFEST).as_bytes(), None).is_ok());
    }

    #[test]
    fn missing_media_type_uses_content_type_or_shape() {
        let body = format!(
            r#"{{"schemaVersion":2,"manifests":[{{"mediaType":"{OCI_MANIFEST}","digest":"{D1}","size":3}}]}}"#
        );
        let m = Manifest::parse(body.as_bytes(), None).unwrap();
        assert_eq!(m.kind, ManifestKind::Index);
        assert_eq!(m.media_type, OCI_INDEX);
        assert!(Manifest::parse(body.as_bytes(), Some("text/plain")).is_err());
    }

    #[test]
    fn rejects_invalid() {
        assert!(matches!(
            Manifest::parse(b"{", None),
            Err(ManifestError::Json(_))
        ));
        // Valid JSON of the wrong form is told apart from text that is not JSON.
        assert!(matches!(
            Manifest::parse(b"[]", None),
            Err(ManifestError::Shape(_))
        ));
        assert!(matches!(
            Manifest::parse(br#"{"schemaVersion":1}"#, None),
            Err(ManifestError::Schema1)
        ));
        assert!(matches!(
            Manifest::parse(br#"{"schemaVersion":3,"mediaType":"x"}"#, None),
            Err(ManifestError::SchemaVersion(Some(3)))
        ));
        let no_config =
            format!(r#"{{"schemaVersion":2,"mediaType":"{OCI_MANIFEST}","layers":[]}}"#);
        assert_eq!(
            Manifest::parse(no_config.as_bytes(), None),
            Err(ManifestError::MissingConfig)
        );
        let bad_digest = image(OCI_MANIFEST).replace(D2, "sha256:zz");
        assert!(matches!(
            Manifest::parse(bad_digest.as_bytes(), None),
            Err(ManifestError::Shape(_))
        ));
        // Both shapes and no mediaType: which one it is cannot be told.
        let both = format!(
            r#"{{"schemaVersion":2,"config":{{"mediaType":"c","digest":"{D1}","size":2}},"layers":[],"manifests":[{{"mediaType":"{OCI_MANIFEST}","digest":"{D2}","size":3}}]}}"#
        );
        for ct in [None, Some(OCI_MANIFEST), Some(OCI_INDEX)] {
            assert_eq!(
                Manifest::parse(both.as_bytes(), ct),
                Err(ManifestError::Ambiguous)
            );
        }
        let index_of_blob = format!(
            r#"{{"schemaVersion":2,"mediaType":"{OCI_INDEX}","manifests":[{{"mediaType":"application/octet-stream","digest":"{D1}","size":3}}]}}"#
        );
        // An entry of an unknown media type is not an error; it is not a required child.
        let parsed = Manifest::parse(index_of_blob.as_bytes(), None).unwrap();
        assert_eq!(parsed.required_manifests().count(), 0);
        let unknown = r#"{"schemaVersion":2,"mediaType":"application/x-thing"}"#;
        assert!(matches!(
            Manifest::parse(unknown.as_bytes(), None),
            Err(ManifestError::UnsupportedMediaType(_))
        ));
    }

    #[test]
    fn foreign_layers_are_not_required() {
        let body = format!(
            r#"{{"schemaVersion":2,"mediaType":"{DOCKER_MANIFEST}","config":{{"mediaType":"c","digest":"{D1}","size":2}},"layers":[{{"mediaType":"application/vnd.docker.image.rootfs.foreign.diff.tar.gzip","digest":"{D2}","size":10,"urls":["https://example.invalid/l"]}}]}}"#
        );
        let m = Manifest::parse(body.as_bytes(), None).unwrap();
        assert_eq!(m.required_blobs().count(), 1);
    }

    #[test]
    fn artifacts_with_subject() {
        let body = format!(
            r#"{{"schemaVersion":2,"mediaType":"{OCI_MANIFEST}","artifactType":"application/vnd.example.sbom","config":{{"mediaType":"{OCI_EMPTY_CONFIG}","digest":"{D1}","size":2}},"layers":[],"subject":{{"mediaType":"{OCI_MANIFEST}","digest":"{D2}","size":5}}}}"#
        );
        let m = Manifest::parse(body.as_bytes(), None).unwrap();
        assert_eq!(m.subject.unwrap().digest.to_string(), D2);
        assert_eq!(
            m.artifact_type.as_deref(),
            Some("application/vnd.example.sbom")
        );
        // An empty artifactType is as good as none: the config's media type for an image
        // manifest, nothing for an index.
        let empty = body.replace("application/vnd.example.sbom", "");
        let m = Manifest::parse(empty.as_bytes(), None).unwrap();
        assert_eq!(
            m.effective_artifact_type().as_deref(),
            Some(OCI_EMPTY_CONFIG)
        );
        let index = format!(
            r#"{{"schemaVersion":2,"mediaType":"{OCI_INDEX}","artifactType":"","manifests":[]}}"#
        );
        let m = Manifest::parse(index.as_bytes(), None).unwrap();
        assert_eq!(m.effective_artifact_type(), None);
    }

    proptest! {
        #[test]
        fn never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..512), ct in proptest::option::of("[a-z/.+]{0,40}")) {
            let _ = Manifest::parse(&bytes, ct.as_deref());
        }
    }
}
