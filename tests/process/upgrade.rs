//! Upgrades: data directories written by an older release, opened by this one. Each fixture
//! in `tests/fixtures/` is a root, a ReadWrite site and a ReadOnly line that an older binary
//! ran and stopped (`tests/fixtures/make_upgrade_fixture.py` made them). The current binary
//! must serve everything they held, accept their passwords, send up the push the site still had
//! in its outbox, and go on syncing down the hierarchy, with no step by hand.

use crate::support::{Outpost, client_as, eventually, push_image, tag_digest};
use crate::sync::via;
use serde_json::Value;
use sha2::Digest as _;
use std::path::Path;

const OCI_ACCEPT: &str =
    "application/vnd.oci.image.manifest.v1+json,application/vnd.oci.image.index.v1+json";

fn unpack(name: &str, into: &Path) -> Value {
    let tarball = Path::new(env!("CARGO_MANIFEST_DIR")).join(format!("tests/fixtures/{name}"));
    let out = std::process::Command::new("tar")
        .arg("-xzf")
        .arg(&tarball)
        .arg("-C")
        .arg(into)
        .output()
        .expect("run tar");
    assert!(
        out.status.success(),
        "unpacking {}: {}",
        tarball.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&std::fs::read(into.join("fixture.json")).expect("fixture.json"))
        .expect("fixture.json is JSON")
}

fn text<'a>(v: &'a Value, path: &[&str]) -> &'a str {
    path.iter()
        .fold(v, |v, k| &v[*k])
        .as_str()
        .unwrap_or_else(|| panic!("fixture.json has no string at {path:?}"))
}

/// Fetches `repo@digest` (a manifest) and every blob it and its children reference, checking
/// each body against its digest.
async fn check_content(c: &reqwest::Client, base: &str, repo: &str, digest: &str) {
    let r = c
        .get(format!("{base}/v2/{repo}/manifests/{digest}"))
        .header("accept", OCI_ACCEPT)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "{repo}@{digest} at {base}");
    let body = r.bytes().await.unwrap();
    assert_eq!(crate::sha256(&body), digest, "{repo}@{digest} body");
    let doc: Value = serde_json::from_slice(&body).unwrap();
    if let Some(children) = doc["manifests"].as_array() {
        for child in children {
            let d = child["digest"].as_str().unwrap();
            Box::pin(check_content(c, base, repo, d)).await;
        }
        return;
    }
    let layers = doc["layers"].as_array().cloned().unwrap_or_default();
    for blob in std::iter::once(&doc["config"]).chain(layers.iter()) {
        check_blob(c, base, repo, blob["digest"].as_str().unwrap()).await;
    }
}

async fn check_blob(c: &reqwest::Client, base: &str, repo: &str, digest: &str) {
    let r = c
        .get(format!("{base}/v2/{repo}/blobs/{digest}"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "blob {repo}@{digest} at {base}");
    let body = r.bytes().await.unwrap();
    let actual = match digest.split_once(':') {
        Some(("sha512", _)) => format!("sha512:{}", hex::encode(sha2::Sha512::digest(&body))),
        _ => crate::sha256(&body),
    };
    assert_eq!(actual, digest, "blob {repo}@{digest} at {base}: body");
}

/// Every tag `expect` lists for a node, with the digest it lists, and all of its content.
async fn check_tags(c: &reqwest::Client, base: &str, expect: &Value) {
    for (repo, tags) in expect.as_object().unwrap() {
        for (tag, digest) in tags.as_object().unwrap() {
            let r = c
                .head(format!("{base}/v2/{repo}/manifests/{tag}"))
                .header("accept", OCI_ACCEPT)
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), 200, "{repo}:{tag} at {base}");
            assert_eq!(
                r.headers()["docker-content-digest"].to_str().unwrap(),
                digest.as_str().unwrap(),
                "{repo}:{tag} at {base}"
            );
            check_content(c, base, repo, digest.as_str().unwrap()).await;
        }
    }
}

async fn upgrade_from(fixture: &str) {
    let dir = tempfile::tempdir().unwrap();
    let fx = unpack(fixture, dir.path());
    let admin = |node: &str| text(&fx, &["admin_passwords", node]).to_string();

    // The root: its content, deletions, referrers, tokens and scope maps are as they were.
    let root = Outpost::start_env(
        &dir.path().join("root"),
        &[("OUTPOST_ADMIN_PASSWORD", &admin("root"))],
    );
    let rc = client_as("admin", &admin("root"));
    let expect = &fx["expect"]["root"];
    check_tags(&rc, &root.base(), &expect["tags"]).await;
    for (repo, tags) in expect["absent_tags"].as_object().unwrap() {
        for tag in tags.as_array().unwrap() {
            let tag = tag.as_str().unwrap();
            assert_eq!(
                tag_digest(&rc, &root.base(), repo, tag).await,
                None,
                "{repo}:{tag} was deleted before the upgrade"
            );
        }
    }
    for (repo, blobs) in expect["blobs"].as_object().unwrap() {
        for d in blobs.as_array().unwrap() {
            check_blob(&rc, &root.base(), repo, d.as_str().unwrap()).await;
        }
    }
    for (repo, subjects) in expect["referrers"].as_object().unwrap() {
        for (subject, referrers) in subjects.as_object().unwrap() {
            let r = rc
                .get(root.url(&format!("/v2/{repo}/referrers/{subject}")))
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), 200);
            let index: Value = r.json().await.unwrap();
            let found: Vec<&str> = index["manifests"]
                .as_array()
                .unwrap()
                .iter()
                .map(|m| m["digest"].as_str().unwrap())
                .collect();
            for want in referrers.as_array().unwrap() {
                assert!(
                    found.contains(&want.as_str().unwrap()),
                    "referrer {want} of {repo}@{subject}: {index}"
                );
            }
        }
    }
    let (v1, v2) = (
        text(expect, &["tags", "demo/app", "v1"]),
        text(expect, &["tags", "demo/app", "v2"]),
    );
    // A token with a scope map reads and may not write; one with its own rules writes.
    let puller = client_as("puller", text(&fx, &["tokens", "puller"]));
    assert_eq!(
        tag_digest(&puller, &root.base(), "demo/app", "v1")
            .await
            .as_deref(),
        Some(v1)
    );
    let r = puller
        .delete(root.url(&format!("/v2/demo/app/manifests/{v1}")))
        .send()
        .await
        .unwrap();
    assert!(
        matches!(r.status().as_u16(), 401 | 403),
        "puller deleted: {}",
        r.status()
    );
    let pusher = client_as("pusher", text(&fx, &["tokens", "pusher"]));
    let fresh = push_image(
        &pusher,
        &root.base(),
        "demo/app",
        "after-upgrade",
        "after-upgrade",
    )
    .await;

    // The site: it serves what it had, sends up the push its outbox still held, and takes
    // what the root got since.
    let site = Outpost::start_env(
        &dir.path().join("site"),
        &[
            ("OUTPOST_ADMIN_PASSWORD", &admin("site")),
            (
                "OUTPOST_CONNECTION_STRING",
                &via(text(&fx, &["connection_strings", "site"]), &root.addr),
            ),
        ],
    );
    let sc = client_as("admin", &admin("site"));
    check_tags(&sc, &site.base(), &fx["expect"]["site"]["tags"]).await;
    let pending = &fx["expect"]["site"]["pending"];
    let (repo, tag, digest) = (
        text(pending, &["repository"]),
        text(pending, &["tag"]),
        text(pending, &["digest"]),
    );
    eventually(
        "the push the site's outbox held reaches the root",
        || async { tag_digest(&rc, &root.base(), repo, tag).await.as_deref() == Some(digest) },
    )
    .await;
    check_content(&rc, &root.base(), repo, digest).await;
    eventually("the root's new push reaches the site", || async {
        tag_digest(&sc, &site.base(), "demo/app", "after-upgrade")
            .await
            .as_deref()
            == Some(fresh.as_str())
    })
    .await;

    // The line, under the site: what it had, then both new images, for its client token.
    let line = Outpost::start_env(
        &dir.path().join("line"),
        &[
            ("OUTPOST_ADMIN_PASSWORD", &admin("line")),
            (
                "OUTPOST_CONNECTION_STRING",
                &via(text(&fx, &["connection_strings", "line"]), &site.addr),
            ),
        ],
    );
    let lc = client_as("admin", &admin("line"));
    check_tags(&lc, &line.base(), &fx["expect"]["line"]["tags"]).await;
    for (tag, want) in [("after-upgrade", fresh.as_str()), (tag, digest)] {
        eventually(&format!("the line has demo/app:{tag}"), || async {
            tag_digest(&puller, &line.base(), "demo/app", tag)
                .await
                .as_deref()
                == Some(want)
        })
        .await;
    }
    check_content(&puller, &line.base(), "demo/app", &fresh).await;
    assert_eq!(
        tag_digest(&puller, &line.base(), "demo/app", "latest")
            .await
            .as_deref(),
        Some(v2)
    );
}

/// Data from 0b43eca (the connected registries as of 2026-11-28, before notifications, event-log
/// pruning, PostgreSQL and the later migrations).
#[tokio::test]
async fn data_from_0b43eca_upgrades() {
    upgrade_from("upgrade-0b43eca.tar.gz").await;
}
