//! Shared helpers for the in-process API tests: a router over a temporary data directory with
//! an administrator token, and small request/response conveniences.
#![allow(dead_code, clippy::unwrap_used)]

use axum::Router;
use axum::body::Body;
use axum::http::{Method, Request, StatusCode};
use base64::Engine as _;
use bytes::Bytes;
use http_body_util::BodyExt;
use outpost_control::{Control, ControlConfig};
use outpost_oci::Digest;
use outpost_registry::{Registry, RegistryConfig};
use outpost_server::AuthSettings;
use serde_json::{Value, json};
use std::sync::Arc;
use tower::ServiceExt;

pub const ADMIN_PASSWORD: &str = "admin-password-for-tests";

pub fn basic(user: &str, pass: &str) -> String {
    format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(format!("{user}:{pass}"))
    )
}

pub struct T {
    pub app: Router,
    pub registry: Registry,
    pub control: Arc<Control>,
    pub dir: tempfile::TempDir,
    /// The PostgreSQL database the registry keeps its metadata in, when the suite runs
    /// against PostgreSQL (`TEST_METADATA=postgres`).
    pub database_url: Option<String>,
}

/// With `TEST_METADATA=postgres`, a fresh database on the server at `TEST_POSTGRES_URL` for
/// one test registry (`./test.sh` runs this suite once that way, after the SQLite run).
pub async fn test_database() -> Option<String> {
    match std::env::var("TEST_METADATA").as_deref() {
        Ok("postgres") => {}
        Ok("sqlite") | Err(_) => return None,
        Ok(other) => panic!("TEST_METADATA={other:?}: use sqlite or postgres"),
    }
    let server = std::env::var("TEST_POSTGRES_URL")
        .expect("TEST_METADATA=postgres needs TEST_POSTGRES_URL (tests/postgres.sh start DIR)");
    static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let name = format!(
        "server_{}_{}",
        std::process::id(),
        N.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    );
    Some(
        outpost_meta::create_postgres_database(&server, &name)
            .await
            .expect("create a test database"),
    )
}

pub struct Resp {
    pub status: StatusCode,
    pub headers: axum::http::HeaderMap,
    pub body: Bytes,
}

impl Resp {
    pub fn header(&self, name: &str) -> &str {
        self.headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
    }
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {:?}", self.body))
    }
    pub fn message(&self) -> String {
        self.json()["errors"][0]["message"]
            .as_str()
            .unwrap_or("")
            .to_string()
    }
    pub fn code(&self) -> String {
        self.json()["errors"][0]["code"]
            .as_str()
            .unwrap_or("")
            .to_string()
    }
}

pub async fn setup_with(config: RegistryConfig) -> T {
    setup_full(config, AuthSettings::default()).await
}

pub async fn setup_auth(auth: AuthSettings) -> T {
    setup_full(
        RegistryConfig {
            fsync: false,
            ..Default::default()
        },
        auth,
    )
    .await
}

pub async fn setup_full(config: RegistryConfig, auth: AuthSettings) -> T {
    setup_control(config, auth, ControlConfig::default()).await
}

pub async fn setup_control(
    config: RegistryConfig,
    auth: AuthSettings,
    control: ControlConfig,
) -> T {
    setup_node(config, auth, control, None, false).await
}

/// A node serving as ReadWrite connected registry `name` that syncs the repositories
/// `patterns` (its connected-registry resources and parent's tokens managed at the root).
pub async fn setup_site(name: &str, patterns: &[&str]) -> T {
    setup_site_mode(name, patterns, false).await
}

/// Like [`setup_site`], ReadOnly.
pub async fn setup_read_only_site(name: &str, patterns: &[&str]) -> T {
    setup_site_mode(name, patterns, true).await
}

async fn setup_site_mode(name: &str, patterns: &[&str], read_only: bool) -> T {
    let scope = outpost_control::connected::SyncScope {
        name: name.to_string(),
        patterns: patterns
            .iter()
            .map(|p| outpost_control::RepoPattern::parse(p).unwrap())
            .collect(),
        sync_token: None,
    };
    setup_node(
        RegistryConfig {
            fsync: false,
            ..Default::default()
        },
        AuthSettings::default(),
        ControlConfig {
            managed_at_root: Some(name.to_string()),
            ..Default::default()
        },
        Some(tokio::sync::watch::channel(scope).1),
        read_only,
    )
    .await
}

async fn setup_node(
    config: RegistryConfig,
    auth: AuthSettings,
    control: ControlConfig,
    sync_scope: Option<tokio::sync::watch::Receiver<outpost_control::connected::SyncScope>>,
    read_only: bool,
) -> T {
    let dir = tempfile::tempdir().unwrap();
    let database_url = test_database().await;
    let config = RegistryConfig {
        database_url: database_url.clone(),
        ..config
    };
    let registry = Registry::open(dir.path(), config).await.unwrap();
    let control = Arc::new(
        Control::open(registry.meta().clone(), dir.path(), control)
            .await
            .unwrap(),
    );
    control.bootstrap_admin(Some(ADMIN_PASSWORD)).await.unwrap();
    let app = outpost_server::router(outpost_server::AppState {
        registry: registry.clone(),
        control: control.clone(),
        auth,
        read_only,
        sync_scope,
        gc_min_age: std::time::Duration::ZERO,
        metrics_enabled: true,
        upstream: None,
    });
    T {
        app,
        registry,
        control,
        dir,
        database_url,
    }
}

pub async fn setup() -> T {
    setup_with(RegistryConfig {
        fsync: false,
        ..Default::default()
    })
    .await
}

impl T {
    pub async fn send(&self, req: Request<Body>) -> Resp {
        let resp = self.app.clone().oneshot(req).await.unwrap();
        let status = resp.status();
        let headers = resp.headers().clone();
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        Resp {
            status,
            headers,
            body,
        }
    }

    /// A request as the administrator.
    pub async fn req(
        &self,
        method: Method,
        uri: &str,
        headers: &[(&str, &str)],
        body: impl Into<Body>,
    ) -> Resp {
        self.req_as(
            Some(&basic("admin", ADMIN_PASSWORD)),
            method,
            uri,
            headers,
            body,
        )
        .await
    }

    /// A request with the given `Authorization` header (or none).
    pub async fn req_as(
        &self,
        authorization: Option<&str>,
        method: Method,
        uri: &str,
        headers: &[(&str, &str)],
        body: impl Into<Body>,
    ) -> Resp {
        let mut b = Request::builder()
            .method(method)
            .uri(uri)
            .header("host", "registry.test:5000");
        if let Some(a) = authorization {
            b = b.header("authorization", a);
        }
        for (k, v) in headers {
            b = b.header(*k, *v);
        }
        self.send(b.body(body.into()).unwrap()).await
    }

    pub async fn get(&self, uri: &str) -> Resp {
        self.req(Method::GET, uri, &[], Body::empty()).await
    }

    /// Monolithic POST + PUT upload; returns the digest.
    pub async fn push_blob(&self, repo: &str, data: &[u8]) -> Digest {
        let d = Digest::sha256_of(data);
        let r = self
            .req(
                Method::POST,
                &format!("/v2/{repo}/blobs/uploads/"),
                &[],
                Body::empty(),
            )
            .await;
        assert_eq!(r.status, StatusCode::ACCEPTED);
        let loc = r.header("location").to_string();
        let r = self
            .req(
                Method::PUT,
                &format!("{loc}?digest={d}"),
                &[],
                data.to_vec(),
            )
            .await;
        assert_eq!(r.status, StatusCode::CREATED, "{:?}", r.body);
        d
    }

    pub async fn push_manifest(
        &self,
        repo: &str,
        reference: &str,
        media_type: &str,
        body: &[u8],
    ) -> Resp {
        self.req(
            Method::PUT,
            &format!("/v2/{repo}/manifests/{reference}"),
            &[("content-type", media_type)],
            body.to_vec(),
        )
        .await
    }

    /// Pushes a config and one layer, then an image manifest tagged `tag`; returns its bytes.
    pub async fn push_image(&self, repo: &str, tag: &str, seed: &str) -> (Vec<u8>, Digest) {
        let config = self
            .push_blob(repo, format!("{{\"seed\":\"{seed}\"}}").as_bytes())
            .await;
        let layer = self
            .push_blob(repo, format!("layer-{seed}").as_bytes())
            .await;
        let m = image_manifest(&config, &layer, None);
        let r = self.push_manifest(repo, tag, OCI_MANIFEST, &m).await;
        assert_eq!(r.status, StatusCode::CREATED, "{:?}", r.body);
        (m.clone(), Digest::sha256_of(&m))
    }
}

pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";

pub fn image_manifest(config: &Digest, layer: &Digest, extra: Option<(&str, &Digest)>) -> Vec<u8> {
    let mut m = json!({
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": config.to_string(), "size": 10},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": layer.to_string(), "size": 7}],
    });
    if let Some((artifact_type, subject)) = extra {
        m["artifactType"] = json!(artifact_type);
        m["subject"] =
            json!({"mediaType": OCI_MANIFEST, "digest": subject.to_string(), "size": 100});
        m["annotations"] = json!({"org.example.kind": artifact_type});
    }
    serde_json::to_vec_pretty(&m).unwrap()
}
