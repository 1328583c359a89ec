//! The readiness question through the management API: is every platform and every blob of
//! an image here?

#![allow(clippy::unwrap_used)] // tests fail loudly by design

mod common;

use axum::body::Body;
use axum::http::{Method, StatusCode};
use common::*;
use outpost_oci::Digest;
use serde_json::{Value, json};

async fn readiness(t: &T, repo: &str, reference: &str) -> (StatusCode, Value) {
    let r = t
        .get(&format!(
            "/api/v1/readiness?repository={repo}&reference={reference}"
        ))
        .await;
    let v = serde_json::from_slice(&r.body).unwrap_or(Value::Null);
    (r.status, v)
}

#[tokio::test]
async fn readiness_names_what_each_platform_lacks() {
    let t = setup().await;
    let mut children = Vec::new();
    let mut layers = Vec::new();
    for arch in ["amd64", "arm64"] {
        let config = t
            .push_blob("team/app", format!("{{\"arch\":\"{arch}\"}}").as_bytes())
            .await;
        let layer = t
            .push_blob("team/app", format!("layer for {arch}").as_bytes())
            .await;
        let m = image_manifest(&config, &layer, None);
        let d = Digest::sha256_of(&m);
        let r = t
            .push_manifest("team/app", &d.to_string(), OCI_MANIFEST, &m)
            .await;
        assert_eq!(r.status, StatusCode::CREATED);
        children.push(
            json!({"mediaType": OCI_MANIFEST, "digest": d.to_string(), "size": m.len(),
            "platform": {"os": "linux", "architecture": arch}}),
        );
        layers.push(layer);
    }
    let index = serde_json::to_vec(
        &json!({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": children}),
    )
    .unwrap();
    let r = t.push_manifest("team/app", "1.4", OCI_INDEX, &index).await;
    assert_eq!(r.status, StatusCode::CREATED);

    let (s, v) = readiness(&t, "team/app", "1.4").await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(v["ready"], true, "{v}");
    assert_eq!(v["digest"], Digest::sha256_of(&index).to_string());
    assert_eq!(v["platforms"], json!(["linux/amd64", "linux/arm64"]));
    assert_eq!(v["manifests"], 3);
    assert_eq!(v["blobs"], 4);

    // A layer file lost from disk, and one platform's manifest gone.
    let hex = layers[0].hex();
    std::fs::remove_file(t.dir.path().join("blobs/sha256").join(&hex[..2]).join(hex)).unwrap();
    // (A client cannot delete a manifest an index lists; a site following a parent that let
    // it, or a store from before that rule, can hold such an index.)
    let arm = children[1]["digest"].as_str().unwrap().to_string();
    t.registry
        .follow_deletion(
            &"team/app".parse().unwrap(),
            &outpost_oci::Reference::Digest(arm.parse().unwrap()),
        )
        .await
        .unwrap();
    let (_, v) = readiness(&t, "team/app", "1.4").await;
    assert_eq!(v["ready"], false, "{v}");
    let missing = v["missing"].as_array().unwrap();
    assert!(
        missing.contains(
            &json!({"kind": "blob", "digest": layers[0].to_string(), "platform": "linux/amd64"})
        ),
        "{v}"
    );
    assert!(
        missing.contains(&json!({"kind": "manifest", "digest": arm, "platform": "linux/arm64"})),
        "{v}"
    );
    assert_eq!(missing.len(), 2, "{v}");
}

#[tokio::test]
async fn readiness_of_what_is_not_here_or_not_a_name() {
    let t = setup().await;
    t.push_image("app", "v1", "one").await;
    let (s, v) = readiness(&t, "app", "v1").await;
    assert_eq!((s, v["ready"].clone()), (StatusCode::OK, json!(true)));
    let (s, v) = readiness(&t, "app", "v2").await;
    assert_eq!(s, StatusCode::NOT_FOUND, "{v}");
    assert_eq!(v["errors"][0]["code"], "MANIFEST_UNKNOWN");
    let (s, _) = readiness(&t, "nothing-here", "v1").await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    let (s, v) = readiness(&t, "Bad..Name", "v1").await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{v}");
    let r = t.get("/api/v1/readiness?repository=app").await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    let r = t
        .req_as(
            None,
            Method::GET,
            "/api/v1/readiness?repository=app&reference=v1",
            &[],
            Body::empty(),
        )
        .await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);
}
