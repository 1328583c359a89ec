//! Garbage collection through the management API: what goes (blobs no manifest references,
//! files with no record), what stays (referenced, young, unknown files), dry runs, and pushes
//! racing a collection.

#![allow(clippy::unwrap_used)] // tests fail loudly by design

mod common;

use axum::body::Body;
use axum::http::{Method, StatusCode};
use common::*;
use outpost_oci::Digest;
use serde_json::{Value, json};

async fn gc(t: &T, body: Value) -> Value {
    let r = t
        .req(
            Method::POST,
            "/api/v1/gc",
            &[("content-type", "application/json")],
            body.to_string(),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{:?}", r.body);
    r.json()
}

async fn blob_status(t: &T, repo: &str, d: &Digest) -> StatusCode {
    t.get(&format!("/v2/{repo}/blobs/{d}")).await.status
}

fn blob_file(t: &T, d: &Digest) -> std::path::PathBuf {
    let hex = d.hex();
    t.dir.path().join("blobs/sha256").join(&hex[..2]).join(hex)
}

#[tokio::test]
async fn gc_removes_what_no_manifest_references_and_nothing_else() {
    let t = setup().await;
    // repo one: config c1 + layers shared and only-one; repo two: config c2 + shared.
    let shared = t.push_blob("one", b"shared layer").await;
    let only_one = t.push_blob("one", b"layer only in one").await;
    let c1 = t.push_blob("one", b"{\"config\":1}").await;
    let m1 = image_manifest(&c1, &only_one, None);
    let mut m1v: Value = serde_json::from_slice(&m1).unwrap();
    m1v["layers"]
        .as_array_mut()
        .unwrap()
        .push(json!({"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": shared.to_string(), "size": 12}));
    let m1 = serde_json::to_vec(&m1v).unwrap();
    let m1d = Digest::sha256_of(&m1);
    assert_eq!(
        t.push_manifest("one", "v1", OCI_MANIFEST, &m1).await.status,
        StatusCode::CREATED
    );
    let shared2 = t.push_blob("two", b"shared layer").await;
    assert_eq!(shared, shared2);
    let c2 = t.push_blob("two", b"{\"config\":2}").await;
    let m2 = image_manifest(&c2, &shared, None);
    assert_eq!(
        t.push_manifest("two", "v1", OCI_MANIFEST, &m2).await.status,
        StatusCode::CREATED
    );
    let stray = t.push_blob("one", b"pushed, never used").await;

    // A dry run reports the stray blob and deletes nothing.
    let r = gc(&t, json!({"dryRun": true, "minAgeSecs": 0})).await;
    assert_eq!(r["dryRun"], true);
    assert_eq!(r["blobsRemoved"], 1, "{r}");
    assert_eq!(blob_status(&t, "one", &stray).await, StatusCode::OK);

    // Young blobs are spared by the default age (the test server's is 0, so ask for an hour).
    let r = gc(&t, json!({"minAgeSecs": 3600})).await;
    assert_eq!(r["blobsRemoved"], 0, "{r}");
    assert_eq!(blob_status(&t, "one", &stray).await, StatusCode::OK);

    // Deleting v1 of one leaves its config and its own layer unreferenced; the shared layer
    // is still used by two.
    let r = t
        .req(
            Method::DELETE,
            &format!("/v2/one/manifests/{m1d}"),
            &[],
            Body::empty(),
        )
        .await;
    assert_eq!(r.status, StatusCode::ACCEPTED);
    let r = gc(&t, json!({"minAgeSecs": 0})).await;
    assert_eq!(r["blobsRemoved"], 3, "{r}");
    let freed = b"pushed, never used".len() + b"layer only in one".len() + b"{\"config\":1}".len();
    assert_eq!(r["bytesFreed"], freed as u64, "{r}");
    for d in [&stray, &only_one, &c1] {
        assert_eq!(blob_status(&t, "one", d).await, StatusCode::NOT_FOUND);
        assert!(!blob_file(&t, d).exists(), "{d} is still on disk");
    }
    for d in [&shared, &c2] {
        assert_eq!(blob_status(&t, "two", d).await, StatusCode::OK);
        assert!(blob_file(&t, d).exists());
    }
    assert_eq!(blob_status(&t, "one", &shared).await, StatusCode::OK);
    assert_eq!(
        t.get("/v2/two/manifests/v1").await.status,
        StatusCode::OK,
        "manifests are never collected"
    );
    // A manifest referencing a collected blob is refused until the blob is pushed again.
    let r = t.push_manifest("one", "v1", OCI_MANIFEST, &m1).await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    assert_eq!(r.code(), "MANIFEST_BLOB_UNKNOWN");
    t.push_blob("one", b"layer only in one").await;
    t.push_blob("one", b"{\"config\":1}").await;
    assert_eq!(
        t.push_manifest("one", "v1", OCI_MANIFEST, &m1).await.status,
        StatusCode::CREATED
    );
    assert_eq!(blob_status(&t, "one", &only_one).await, StatusCode::OK);

    // A second run finds nothing.
    let r = gc(&t, json!({"minAgeSecs": 0})).await;
    assert_eq!(r["blobsRemoved"], 0, "{r}");
    assert_eq!(r["orphanFilesRemoved"], 0, "{r}");
}

#[tokio::test]
async fn gc_removes_old_files_without_a_record_and_leaves_unknown_files() {
    let t = setup().await;
    let orphan = Digest::sha256_of(b"left by a crash");
    let path = blob_file(&t, &orphan);
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(&path, b"left by a crash").unwrap();
    let f = std::fs::File::options().write(true).open(&path).unwrap();
    f.set_modified(std::time::SystemTime::now() - std::time::Duration::from_secs(7200))
        .unwrap();
    drop(f);
    let stranger = t.dir.path().join("blobs/sha256/zz-not-a-blob");
    std::fs::write(&stranger, b"operator's notes").unwrap();

    // Younger than the age asked for: kept.
    let r = gc(&t, json!({"minAgeSecs": 3 * 3600})).await;
    assert_eq!(r["orphanFilesRemoved"], 0, "{r}");
    assert!(path.exists());
    let r = gc(&t, json!({"dryRun": true, "minAgeSecs": 3600})).await;
    assert_eq!(r["orphanFilesRemoved"], 1, "{r}");
    assert!(path.exists(), "a dry run deletes nothing");
    let r = gc(&t, json!({"minAgeSecs": 3600})).await;
    assert_eq!(r["orphanFilesRemoved"], 1, "{r}");
    assert_eq!(r["bytesFreed"], b"left by a crash".len() as u64, "{r}");
    assert!(!path.exists());
    assert!(
        stranger.exists(),
        "files that are not blobs are never touched"
    );
}

#[tokio::test]
async fn gc_needs_the_administrator_and_a_valid_body() {
    let t = setup().await;
    let r = t
        .req_as(None, Method::POST, "/api/v1/gc", &[], Body::empty())
        .await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);
    let r = t
        .req(
            Method::POST,
            "/api/v1/gc",
            &[("content-type", "application/json")],
            "{\"dryRun\": \"yes\"}",
        )
        .await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    let r = t
        .req(
            Method::POST,
            "/api/v1/gc",
            &[("content-type", "application/json")],
            "{\"everything\": true}",
        )
        .await;
    assert_eq!(
        r.status,
        StatusCode::BAD_REQUEST,
        "unknown fields are refused"
    );
}

/// Pushes race collections that spare nothing by age: a manifest is either refused for a
/// missing blob (the client pushes the blob again) or accepted with every blob readable; an
/// accepted image never loses a blob.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gc_never_leaves_an_accepted_manifest_without_its_blobs() {
    let t = std::sync::Arc::new(setup().await);
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let collector = {
        let (t, stop) = (t.clone(), stop.clone());
        tokio::spawn(async move {
            let mut runs = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                gc(&t, json!({"minAgeSecs": 0})).await;
                runs += 1;
                tokio::task::yield_now().await;
            }
            runs
        })
    };
    let mut accepted = Vec::new();
    let mut refused = 0;
    for i in 0..30 {
        let config = t
            .push_blob("race", format!("{{\"n\":{i}}}").as_bytes())
            .await;
        let layer = t.push_blob("race", format!("layer {i}").as_bytes()).await;
        let m = image_manifest(&config, &layer, None);
        loop {
            let r = t
                .push_manifest("race", &format!("t{i}"), OCI_MANIFEST, &m)
                .await;
            if r.status == StatusCode::CREATED {
                accepted.push((config.clone(), layer.clone()));
                break;
            }
            assert_eq!(r.code(), "MANIFEST_BLOB_UNKNOWN", "{:?}", r.body);
            refused += 1;
            t.push_blob("race", format!("{{\"n\":{i}}}").as_bytes())
                .await;
            t.push_blob("race", format!("layer {i}").as_bytes()).await;
        }
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let runs = collector.await.unwrap();
    assert!(runs > 0);
    gc(&t, json!({"minAgeSecs": 0})).await;
    for (config, layer) in &accepted {
        for d in [config, layer] {
            assert_eq!(
                blob_status(&t, "race", d).await,
                StatusCode::OK,
                "{d} lost after {runs} collections ({refused} pushes refused and retried)"
            );
            assert!(blob_file(&t, d).exists());
        }
    }
}

#[tokio::test]
async fn blobs_a_sync_is_fetching_for_an_unstored_manifest_are_kept() {
    let t = setup().await;
    let layer = t.push_blob("one", b"fetched before its manifest").await;
    let pins = t.registry.pin_blobs([layer.clone()]);
    let r = gc(&t, json!({"minAgeSecs": 0})).await;
    assert_eq!(r["blobsRemoved"], 0, "{r}");
    assert_eq!(blob_status(&t, "one", &layer).await, StatusCode::OK);
    // Two holders: one letting go keeps it pinned.
    let second = t.registry.pin_blobs([layer.clone()]);
    drop(pins);
    assert_eq!(gc(&t, json!({"minAgeSecs": 0})).await["blobsRemoved"], 0);
    drop(second);
    assert_eq!(gc(&t, json!({"minAgeSecs": 0})).await["blobsRemoved"], 1);
    assert_eq!(blob_status(&t, "one", &layer).await, StatusCode::NOT_FOUND);
}

/// A blob file the collection cannot delete (here a directory stands where the file was) is
/// reported as left for the next run: its bytes are not counted as freed, and it is not
/// counted again as an orphan removed in the same run.
#[tokio::test]
async fn a_file_that_cannot_be_deleted_is_reported_as_left() {
    let t = setup().await;
    let stuck = t.push_blob("one", b"a blob whose file cannot go").await;
    let gone = t.push_blob("one", b"a blob whose file goes").await;
    let path = blob_file(&t, &stuck);
    std::fs::remove_file(&path).unwrap();
    std::fs::create_dir(&path).unwrap();
    std::fs::write(path.join("keep"), b"x").unwrap();
    let report = gc(&t, json!({"minAgeSecs": 0})).await;
    assert_eq!(report["blobsRemoved"], 2, "{report}");
    assert_eq!(report["filesLeft"], 1, "{report}");
    assert_eq!(
        report["bytesFreed"],
        b"a blob whose file goes".len(),
        "{report}"
    );
    assert_eq!(report["orphanFilesRemoved"], 0, "{report}");
    assert!(!blob_file(&t, &gone).exists());
}
