//! Connected registries as real processes: a root and a site on loopback, the site started
//! with the connection string the root's CLI prints.

use crate::support::{
    self, ADMIN_PASSWORD, Outpost, client_as, eventually, push_blob, push_image, sha256_hex,
    tag_digest,
};
use std::time::Duration;

pub(crate) const SITE_PASSWORD: &str = "site-admin-password";

pub(crate) fn cli_ok(o: &Outpost, args: &[&str]) -> String {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_outpost"))
        .args(args)
        .args([
            "--registry",
            &o.url(""),
            "--username",
            "admin",
            "--password",
            ADMIN_PASSWORD,
        ])
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "outpost {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Creates connected registry `name` at `root` and returns a fresh connection string.
pub(crate) fn connected(root: &Outpost, name: &str, extra: &[&str]) -> String {
    let mut args = vec!["connected-registry", "create", "-n", name];
    args.extend_from_slice(extra);
    cli_ok(root, &args);
    connected_settings(root, name)
}

/// A fresh connection string of the existing connected registry `name` (a new password 1).
fn connected_settings(root: &Outpost, name: &str) -> String {
    cli_ok(
        root,
        &[
            "connected-registry",
            "get-settings",
            "-n",
            name,
            "--parent-protocol",
            "http",
            "--generate-password",
            "1",
            "--yes",
            "-o",
            "tsv",
        ],
    )
    .trim()
    .to_string()
}

/// Whether the root shows connected registry `name` with a status detail of `code` whose
/// description contains `text`.
fn shows_detail(root: &Outpost, name: &str, code: &str, text: &str) -> bool {
    let v: serde_json::Value = serde_json::from_str(&cli_ok(
        root,
        &["connected-registry", "show", "-n", name, "-o", "json"],
    ))
    .unwrap();
    v["statusDetails"]
        .as_array()
        .unwrap()
        .iter()
        .any(|d| d["code"] == code && d["description"].as_str().unwrap().contains(text))
}

fn start_site(dir: &std::path::Path, cs: &str) -> Outpost {
    start_site_polling(dir, cs, "5")
}

/// A site whose long-polls of its parent's feed last up to `poll_secs`.
fn start_site_polling(dir: &std::path::Path, cs: &str, poll_secs: &str) -> Outpost {
    Outpost::start_env(
        dir,
        &[
            ("OUTPOST_CONNECTION_STRING", cs),
            ("OUTPOST_SYNC_POLL_SECS", poll_secs),
            ("OUTPOST_ADMIN_PASSWORD", SITE_PASSWORD),
        ],
    )
}

/// A fresh connection string for `name`, a child of the running `site` (`site_name` at
/// `root`), once it can be used: the root knows the site's address (the line's parent
/// endpoint) and the site has learned the new password at a configuration fetch.
async fn child_of_site(root: &Outpost, site: &Outpost, site_name: &str, name: &str) -> String {
    eventually("the root knows the site's address", || async {
        cli_ok(
            root,
            &["connected-registry", "show", "-n", site_name, "-o", "json"],
        )
        .contains(&site.addr)
    })
    .await;
    let cs = connected_settings(root, name);
    assert!(
        cs.contains(&format!("ParentGatewayEndpoint={}", site.addr)),
        "{cs}"
    );
    let password = cs
        .split(';')
        .find_map(|kv| kv.strip_prefix("SyncTokenPassword="))
        .unwrap()
        .to_string();
    eventually("the site knows the child's new password", || async {
        reqwest::Client::new()
            .get(format!("http://{}/gateway/v1/{name}/config", site.addr))
            .basic_auth(name, Some(&password))
            .send()
            .await
            .is_ok_and(|r| r.status() == 200)
    })
    .await;
    cs
}

/// Runs `outpost serve` as a connected registry expecting it to fail; returns stderr.
fn failing_site(cs: &str) -> String {
    failing_site_in(tempfile::tempdir().unwrap().path(), cs)
}

/// Starts a site in `dir` that must fail at start; returns its stderr.
/// Every file under `dir` with its contents, but for the lock file (it holds the pid of the
/// last process to start there).
fn files_of(dir: &std::path::Path) -> std::collections::BTreeMap<std::path::PathBuf, Vec<u8>> {
    let mut files = std::collections::BTreeMap::new();
    let mut dirs = vec![dir.to_path_buf()];
    while let Some(d) = dirs.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                dirs.push(p);
            } else if p.file_name() != Some(std::ffi::OsStr::new("outpost.lock")) {
                files.insert(p.clone(), std::fs::read(&p).unwrap());
            }
        }
    }
    files
}

fn failing_site_in(dir: &std::path::Path, cs: &str) -> String {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_outpost"))
        .args(["serve", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(dir)
        .env("OUTPOST_CONNECTION_STRING", cs)
        .env("OUTPOST_ADMIN_PASSWORD", SITE_PASSWORD)
        .output()
        .unwrap();
    assert!(!out.status.success(), "expected a failure for {cs}");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[tokio::test]
async fn a_site_follows_its_root_and_keeps_serving_when_it_is_gone() {
    let root_dir = tempfile::tempdir().unwrap();
    let site_dir = tempfile::tempdir().unwrap();
    let root = Outpost::start(root_dir.path(), &[]);
    let admin = client_as("admin", ADMIN_PASSWORD);
    let r = &root.base();
    let v1 = push_image(&admin, r, "app", "v1", "one").await;
    push_image(&admin, r, "other", "v1", "not-in-scope").await;

    // A client token the site will accept while offline.
    let reader_pw = read_token(&root, "site-reader", "app");
    let cs = connected(
        &root,
        "site-one",
        &["--repository", "app", "--client-tokens", "site-reader"],
    );

    let site = start_site(site_dir.path(), &cs);
    let s = site.base();
    let site_admin = client_as("admin", SITE_PASSWORD);
    let reader = client_as("site-reader", &reader_pw);
    eventually("the site has app:v1", || async {
        tag_digest(&reader, &s, "app", "v1").await.as_deref() == Some(v1.as_str())
    })
    .await;
    assert_eq!(
        tag_digest(&site_admin, &s, "other", "v1").await,
        None,
        "only repositories in scope are synced"
    );
    // The blob is there and intact.
    let layer = reader
        .get(format!("{s}/v2/app/manifests/v1"))
        .header("accept", "application/vnd.oci.image.manifest.v1+json")
        .send()
        .await
        .unwrap();
    let m: serde_json::Value = layer.json().await.unwrap();
    let blob = reader
        .get(format!(
            "{s}/v2/app/blobs/{}",
            m["layers"][0]["digest"].as_str().unwrap()
        ))
        .send()
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap();
    assert_eq!(blob.len(), 300_000);
    // Counted as received, like a push (small blobs are fetched in one request, not through
    // an upload session).
    let received = support::metric(
        &support::metrics(&s).await,
        "outpost_upload_received_bytes_total",
    );
    assert!(received >= Some(300_000), "{received:?}");

    // New tags, moved tags and removed tags propagate.
    let v2 = push_image(&admin, r, "app", "v2", "two").await;
    eventually("app:v2 arrives", || async {
        tag_digest(&reader, &s, "app", "v2").await.as_deref() == Some(v2.as_str())
    })
    .await;
    let moved = push_image(&admin, r, "app", "v1", "moved").await;
    eventually("app:v1 moves", || async {
        tag_digest(&reader, &s, "app", "v1").await.as_deref() == Some(moved.as_str())
    })
    .await;
    let del = admin
        .delete(format!("{r}/v2/app/manifests/v2"))
        .send()
        .await
        .unwrap();
    assert_eq!(del.status(), 202);
    eventually("app:v2 is removed", || async {
        tag_digest(&reader, &s, "app", "v2").await.is_none()
    })
    .await;

    // A ReadOnly site refuses writes from its clients, saying why.
    let denied = site_admin
        .post(format!("{s}/v2/app/blobs/uploads/"))
        .send()
        .await
        .unwrap();
    assert_eq!(denied.status(), 403);
    assert!(denied.text().await.unwrap().contains("read-only"));
    let bad = client_as("site-reader", "wrong")
        .get(format!("{s}/v2/app/tags/list"))
        .send()
        .await
        .unwrap();
    assert_eq!(bad.status(), 401);

    // The root sees the site's health.
    let shown = cli_ok(
        &root,
        &["connected-registry", "show", "-n", "site-one", "-o", "json"],
    );
    let v: serde_json::Value = serde_json::from_str(&shown).unwrap();
    assert_eq!(v["activationStatus"], "Active");
    assert_eq!(v["connectionState"], "Online");
    assert_eq!(v["lastSyncResult"], "Succeeded");
    assert_eq!(v["loginServer"], site.addr);
    assert_eq!(v["cursorLag"], 0, "caught up with the feed");
    assert_eq!(
        v["outboxDepth"], 0,
        "a ReadOnly site has nothing to send up"
    );
    // And so do Prometheus metrics, at the root (the fleet) and at the site (its sync).
    let at_root = support::metrics(&root.base()).await;
    for line in [
        "outpost_connected_registry_up{name=\"site-one\"} 1",
        "outpost_connected_registry_cursor_lag_messages{name=\"site-one\"} 0",
    ] {
        assert!(at_root.lines().any(|l| l == line), "{line} in\n{at_root}");
    }
    assert!(
        at_root.contains("outpost_http_requests_total{route=\"gateway\""),
        "{at_root}"
    );
    let at_site = support::metrics(&site.base()).await;
    assert_eq!(
        support::metric(&at_site, "outpost_sync_parent_connected"),
        Some(1),
        "{at_site}"
    );
    let last = support::metric(&at_site, "outpost_sync_last_success_timestamp_seconds");
    assert!(last.unwrap_or(0) > 1_700_000_000, "{at_site}");
    let page = reqwest::get(format!("{}/status", site.base()))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        page.contains("Role: <b>connected registry</b> (ReadOnly")
            && page.contains("<tr><th>Last exchange with the parent</th><td>succeeded</td></tr>")
            && page.contains("<tr><th>Problems</th><td>none</td></tr>"),
        "{page}"
    );

    // The root goes away: the site keeps serving and authenticating, also after a restart.
    drop(root);
    for _ in 0..2 {
        assert_eq!(
            tag_digest(&reader, &s, "app", "v1").await.as_deref(),
            Some(moved.as_str())
        );
        let tags = reader
            .get(format!("{s}/v2/app/tags/list"))
            .send()
            .await
            .unwrap();
        assert_eq!(tags.status(), 200);
    }
    drop(site);
    let site = start_site(site_dir.path(), &cs);
    let s = &site.base();
    assert_eq!(
        tag_digest(&reader, s, "app", "v1").await.as_deref(),
        Some(moved.as_str()),
        "served after a restart without the parent"
    );
}

#[tokio::test]
async fn connection_problems_are_one_clear_line() {
    let dir = tempfile::tempdir().unwrap();
    let root = Outpost::start(dir.path(), &[]);
    let cs = connected(&root, "site-err", &["--repository", "app"]);
    assert!(failing_site("garbage").contains("not Key=Value"));
    // Refused before anything is written: no administrator password was created (and shown
    // once) for a start that never happened, and the directory stays empty.
    let empty = tempfile::tempdir().unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_outpost"))
        .args(["serve", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(empty.path().join("site"))
        .env(
            "OUTPOST_CONNECTION_STRING",
            "ConnectedRegistryName=a;Nope=1",
        )
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("connection string has an unknown key \"Nope\""),
        "{err}"
    );
    assert!(!err.contains("password:"), "{err}");
    assert!(!empty.path().join("site").exists(), "{err}");
    assert!(failing_site("ConnectedRegistryName=a;Nope=1").contains("unknown key \"Nope\""));
    let missing = cs
        .split(';')
        .filter(|kv| !kv.starts_with("SyncTokenPassword="))
        .collect::<Vec<_>>()
        .join(";");
    assert!(failing_site(&missing).contains("missing SyncTokenPassword"));
    let wrong = cs
        .split(';')
        .map(|kv| {
            if kv.starts_with("SyncTokenPassword=") {
                "SyncTokenPassword=wrong".to_string()
            } else {
                kv.to_string()
            }
        })
        .collect::<Vec<_>>()
        .join(";");
    let err = failing_site(&wrong);
    assert!(
        err.contains("refused the password") && err.contains("get-settings"),
        "{err}"
    );
    // The instance cannot report why it is not heard from; the root says it for it.
    assert!(shows_detail(
        &root,
        "site-err",
        "SyncTokenRejected",
        "--generate-password 1"
    ));
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .to_string();
    let unreachable = cs
        .split(';')
        .map(|kv| {
            if kv.starts_with("ParentGatewayEndpoint=") {
                format!("ParentGatewayEndpoint={closed}")
            } else {
                kv.to_string()
            }
        })
        .collect::<Vec<_>>()
        .join(";");
    assert!(failing_site(&unreachable).contains("cannot reach the parent"));
    let unknown = cs.replace(
        "ConnectedRegistryName=site-err",
        "ConnectedRegistryName=site-nope",
    );
    let err = failing_site(&unknown);
    assert!(
        err.contains("denied") || err.contains("does not exist"),
        "{err}"
    );
    // Only one active instance: a second one is told to deactivate first.
    let first_dir = tempfile::tempdir().unwrap();
    let first = start_site(first_dir.path(), &cs);
    let err = failing_site(&cs);
    assert!(
        err.contains("already activated") && err.contains("deactivate"),
        "{err}"
    );

    // A site's data directory started without its connection string (forgotten in a unit
    // file, say) is refused rather than run as a root its parent never hears of; and an
    // offline bundle is not imported into a root's data directory.
    drop(first);
    let err = crate::blobstore::failing_start(first_dir.path(), &[]);
    assert!(
        err.contains("belongs to connected registry \"site-err\"")
            && err.contains("start it with its connection string"),
        "{err}"
    );
    // `outpost config`, which refuses what `serve` would, says the same.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_outpost"))
        .args(["config", "--data-dir"])
        .arg(first_dir.path())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("belongs to connected registry \"site-err\""),
        "{err}"
    );
    // Started with another registry's connection string (and another administrator
    // password), it is refused before anything in it changes: the password is not reset.
    let before = files_of(first_dir.path());
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_outpost"))
        .args(["serve", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(first_dir.path())
        .env("OUTPOST_CONNECTION_STRING", &unknown)
        .env("OUTPOST_ADMIN_PASSWORD", "another-password")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("belongs to connected registry \"site-err\"")
            && err.contains("names \"site-nope\""),
        "{err}"
    );
    let after = files_of(first_dir.path());
    let changed: Vec<_> = before
        .keys()
        .chain(after.keys())
        .filter(|p| before.get(*p) != after.get(*p))
        .collect();
    assert!(changed.is_empty(), "the refused start changed {changed:?}");
    let bundle = tempfile::tempdir().unwrap();
    cli_ok(
        &root,
        &[
            "connected-registry",
            "export",
            "-n",
            "site-err",
            "--dir",
            bundle.path().to_str().unwrap(),
        ],
    );
    // Deleted at the root (its sync token kept): the site is told the registry is gone.
    let gone = connected(&root, "site-gone", &["--repository", "app"]);
    cli_ok(
        &root,
        &["connected-registry", "delete", "-n", "site-gone", "--yes"],
    );
    let err = failing_site(&gone);
    assert!(
        err.contains("connected registry \"site-gone\" does not exist at the parent"),
        "{err}"
    );
    drop(root);
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_outpost"))
        .args(["import", "--data-dir"])
        .arg(dir.path())
        .arg("--dir")
        .arg(bundle.path())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("not a connected registry"), "{err}");
}

/// A control-plane change at the root reaches the sites below it at once, not at the end of
/// their long-poll of the message feed (here 60 s, longer than any wait below): a client
/// token added, then disabled; a new line's password, which its site must know before the
/// line can start.
#[tokio::test]
async fn control_plane_changes_reach_sites_without_waiting_for_the_long_poll() {
    let root_dir = tempfile::tempdir().unwrap();
    let site_dir = tempfile::tempdir().unwrap();
    let line_dir = tempfile::tempdir().unwrap();
    let root = Outpost::start(root_dir.path(), &[]);
    let admin = client_as("admin", ADMIN_PASSWORD);
    let r = root.base();
    let v1 = push_image(&admin, &r, "app", "v1", "first").await;
    let slow = |dir: &std::path::Path, cs: &str| start_site_polling(dir, cs, "60");
    let cs = connected(&root, "site-quick", &["--repository", "app"]);
    let site = slow(site_dir.path(), &cs);
    let s = site.base();
    eventually("the site has app:v1", || async {
        tag_digest(&client_as("admin", SITE_PASSWORD), &s, "app", "v1")
            .await
            .as_deref()
            == Some(v1.as_str())
    })
    .await;

    let password = read_token(&root, "quick-reader", "app");
    let reader = client_as("quick-reader", &password);
    cli_ok(
        &root,
        &[
            "connected-registry",
            "update",
            "-n",
            "site-quick",
            "--add-client-tokens",
            "quick-reader",
        ],
    );
    eventually("the new client token works at the site", || async {
        tag_digest(&reader, &s, "app", "v1").await.is_some()
    })
    .await;
    cli_ok(
        &root,
        &[
            "token",
            "update",
            "-n",
            "quick-reader",
            "--status",
            "disabled",
        ],
    );
    eventually(
        "the disabled client token stops working at the site",
        || async { tag_digest(&reader, &s, "app", "v1").await.is_none() },
    )
    .await;

    // A line under the site, started right after its connection string is made.
    cli_ok(
        &root,
        &[
            "connected-registry",
            "create",
            "-n",
            "line-quick",
            "-p",
            "site-quick",
            "--repository",
            "app",
        ],
    );
    eventually("the root knows the site's address", || async {
        cli_ok(
            &root,
            &[
                "connected-registry",
                "show",
                "-n",
                "site-quick",
                "-o",
                "json",
            ],
        )
        .contains(&site.addr)
    })
    .await;
    let line = slow(line_dir.path(), &connected_settings(&root, "line-quick"));
    let l = line.base();
    eventually("the line has app:v1", || async {
        tag_digest(&client_as("admin", SITE_PASSWORD), &l, "app", "v1")
            .await
            .as_deref()
            == Some(v1.as_str())
    })
    .await;

    // A stop does not wait out the children's long-polls (60 s here; `terminate` allows 20).
    assert!(site.terminate().success());
    assert!(root.terminate().success());
    drop(line);
}

#[tokio::test]
async fn a_site_offline_longer_than_its_ttl_reconciles_fully() {
    // A ReadWrite site follows the parent's deletions too (it kept tags removed there).
    for mode in ["ReadOnly", "ReadWrite"] {
        offline_longer_than_ttl(mode).await;
    }
}

async fn offline_longer_than_ttl(mode: &str) {
    let root_dir = tempfile::tempdir().unwrap();
    let site_dir = tempfile::tempdir().unwrap();
    // The TTL bound shortened through ordinary configuration, as an operator would.
    let root = Outpost::start_env(root_dir.path(), &[("OUTPOST_MIN_MESSAGE_TTL", "PT1S")]);
    let admin = client_as("admin", ADMIN_PASSWORD);
    let r = root.base();
    let v1 = push_image(&admin, &r, "app", "v1", "first").await;
    let kept = push_image(&admin, &r, "app", "kept", "unchanged while away").await;
    let cs = connected(
        &root,
        "ship-one",
        &[
            "-m",
            mode,
            "--repository",
            "app",
            "--sync-message-ttl",
            "PT2S",
        ],
    );
    let site = start_site(site_dir.path(), &cs);
    let s = site.base();
    let site_admin = client_as("admin", SITE_PASSWORD);
    eventually("v1 arrives", || async {
        tag_digest(&site_admin, &s, "app", "v1").await.as_deref() == Some(v1.as_str())
    })
    .await;
    eventually("kept arrives", || async {
        tag_digest(&site_admin, &s, "app", "kept").await.as_deref() == Some(kept.as_str())
    })
    .await;
    // The first reconciliation is over (its cursor saved) once it is reported: stopped before,
    // the site would start over without a cursor, not with an expired one.
    eventually("the site reports its first sync", || async {
        serde_json::from_str::<serde_json::Value>(&cli_ok(
            &root,
            &["connected-registry", "show", "-n", "ship-one", "-o", "json"],
        ))
        .unwrap()["lastSyncTime"]
            .is_string()
    })
    .await;
    drop(site);

    // While the ship is away: a new tag, a removed tag, a signature for a tag that does not
    // move, then longer than the TTL passes.
    let v2 = push_image(&admin, &r, "app", "v2", "second").await;
    push_signature(&admin, &r, "app", &kept).await;
    assert_eq!(
        admin
            .delete(format!("{r}/v2/app/manifests/v1"))
            .send()
            .await
            .unwrap()
            .status(),
        202
    );
    tokio::time::sleep(Duration::from_millis(2500)).await;

    let site = start_site(site_dir.path(), &cs);
    let s = site.base();
    eventually("v2 arrives by reconciliation", || async {
        tag_digest(&site_admin, &s, "app", "v2").await.as_deref() == Some(v2.as_str())
    })
    .await;
    eventually(&format!("v1 is gone ({mode})"), || async {
        tag_digest(&site_admin, &s, "app", "v1").await.is_none()
    })
    .await;
    eventually("the signature of the unchanged tag arrives", || async {
        has_signature(&site_admin, &s, "app", &kept).await
    })
    .await;
    assert!(
        site.log().contains("reconciling fully"),
        "the expired cursor should be noticed:\n{}",
        site.log()
    );
}

/// A root restored from a backup writes its new events under the numbers of those it lost.
/// A site whose cursor is still within the restored log (it was offline while the root wrote
/// as many events as it lost) must notice that its cursor names another history, and
/// reconcile, instead of continuing past what the restored root wrote.
#[tokio::test]
async fn a_site_reconciles_after_its_root_is_restored_from_a_backup() {
    let dirs = tempfile::tempdir().unwrap();
    let (data, backup) = (dirs.path().join("root"), dirs.path().join("backup"));
    let site_dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(&data).unwrap();
    let root_addr = format!("127.0.0.1:{}", crate::blobstore::free_port());
    let root = Outpost::start_listen(&data, &root_addr, &[]);
    let admin = client_as("admin", ADMIN_PASSWORD);
    let r = root.base();
    let v1 = push_image(&admin, &r, "app", "v1", "before the backup").await;
    let cs = connected(&root, "ship-restored", &["--repository", "app", "more/*"]);
    root.terminate();
    let copy = |from: &std::path::Path, to: &std::path::Path| {
        let ok = std::process::Command::new("cp")
            .arg("-a")
            .arg(from)
            .arg(to)
            .status()
            .unwrap();
        assert!(ok.success());
    };
    copy(&data, &backup);

    // After the backup: three images the site fetches, then the root's disk is lost. (A new
    // client each time the root restarts: a pooled connection to the last one is dead.)
    let root = Outpost::start_listen(&data, &root_addr, &[]);
    let admin = client_as("admin", ADMIN_PASSWORD);
    let site = start_site(site_dir.path(), &cs);
    let s = site.base();
    let site_admin = client_as("admin", SITE_PASSWORD);
    let mut lost = Vec::new();
    for i in 0..3 {
        let tag = format!("lost{i}");
        let d = push_image(&admin, &r, "app", &tag, &tag).await;
        eventually(&format!("{tag} arrives"), || async {
            tag_digest(&site_admin, &s, "app", &tag).await.as_deref() == Some(d.as_str())
        })
        .await;
        lost.push(tag);
    }
    // A whole repository under a wildcard, which the restored root will not have at all.
    let gone = push_image(&admin, &r, "more/gone", "v1", "gone").await;
    eventually("more/gone:v1 arrives", || async {
        tag_digest(&site_admin, &s, "more/gone", "v1")
            .await
            .as_deref()
            == Some(gone.as_str())
    })
    .await;
    drop(site);
    root.terminate();
    std::fs::remove_dir_all(&data).unwrap();
    copy(&backup, &data);

    // The restored root writes more events than it lost while the site is away.
    let _root = Outpost::start_listen(&data, &root_addr, &[]);
    let admin = client_as("admin", ADMIN_PASSWORD);
    let mut after = Vec::new();
    for i in 0..4 {
        let tag = format!("after{i}");
        let d = push_image(&admin, &r, "app", &tag, &tag).await;
        after.push((tag, d));
    }
    let site = start_site(site_dir.path(), &cs);
    let s = site.base();
    for (tag, d) in &after {
        eventually(&format!("{tag} arrives"), || async {
            tag_digest(&site_admin, &s, "app", tag).await.as_deref() == Some(d.as_str())
        })
        .await;
    }
    for tag in &lost {
        eventually(&format!("{tag}, gone at the root, goes"), || async {
            tag_digest(&site_admin, &s, "app", tag).await.is_none()
        })
        .await;
    }
    eventually(
        "more/gone:v1, whose repository the root lost, goes",
        || async {
            tag_digest(&site_admin, &s, "more/gone", "v1")
                .await
                .is_none()
        },
    )
    .await;
    assert_eq!(
        tag_digest(&site_admin, &s, "app", "v1").await.as_deref(),
        Some(v1.as_str())
    );
    assert!(
        site.log().contains("reconciling fully"),
        "the foreign cursor should be noticed:\n{}",
        site.log()
    );
}

/// The connection string `cs` with its parent endpoint replaced by `endpoint` (a proxy, or
/// the new address of a parent that moved).
pub(crate) fn via(cs: &str, endpoint: &str) -> String {
    cs.split(';')
        .map(|kv| {
            if kv.starts_with("ParentGatewayEndpoint=") {
                format!("ParentGatewayEndpoint={endpoint}")
            } else {
                kv.to_string()
            }
        })
        .collect::<Vec<_>>()
        .join(";")
}

async fn blob_len(c: &reqwest::Client, base: &str, repo: &str, digest: &str) -> Option<usize> {
    let r = c
        .get(format!("{base}/v2/{repo}/blobs/{digest}"))
        .send()
        .await
        .ok()?;
    if !r.status().is_success() {
        return None;
    }
    Some(r.bytes().await.ok()?.len())
}

/// Waits until `site` serves blob `digest` of `repo` whole (`size` bytes), then checks that
/// the transfer resumed rather than restarted: the site logged it, and `proxy` carried less
/// than 10% more than the blob.
async fn arrives_resumed(
    site: &Outpost,
    proxy: &support::FaultProxy,
    repo: &str,
    digest: &str,
    size: usize,
) {
    let s = site.base();
    let site_admin = client_as("admin", SITE_PASSWORD);
    eventually("the blob arrives whole", || async {
        blob_len(&site_admin, &s, repo, digest).await == Some(size)
    })
    .await;
    assert!(
        site.log().contains("resuming blob transfer"),
        "{}",
        site.log()
    );
    let extra = proxy.bytes() as f64 / size as f64 - 1.0;
    assert!(
        extra < 0.10,
        "resumed with {:.1}% extra bytes",
        extra * 100.0
    );
}

/// Creates a token at `root` that may read `repo` and returns its first password.
pub(crate) fn read_token(root: &Outpost, name: &str, repo: &str) -> String {
    let out = cli_ok(
        root,
        &[
            "token",
            "create",
            "-n",
            name,
            "--repository",
            repo,
            "content/read",
            "metadata/read",
            "-o",
            "json",
        ],
    );
    serde_json::from_str::<serde_json::Value>(&out).unwrap()["passwords"][0]["value"]
        .as_str()
        .unwrap()
        .to_string()
}

#[tokio::test]
async fn a_transfer_cut_mid_blob_resumes_where_it_stopped() {
    const SIZE: usize = 40 << 20;
    let root_dir = tempfile::tempdir().unwrap();
    let site_dir = tempfile::tempdir().unwrap();
    let root = Outpost::start(root_dir.path(), &[]);
    let admin = client_as("admin", ADMIN_PASSWORD);
    let r = root.base();
    let digest = support::push_big_image(&admin, &r, "big", "v1", SIZE).await;
    let cs = connected(&root, "site-cut", &["--repository", "big"]);
    let proxy = support::FaultProxy::start(&root.addr).await;
    // The link drops once 15 MiB have come down.
    proxy
        .cut_at
        .store(15 << 20, std::sync::atomic::Ordering::Relaxed);
    let site = start_site(site_dir.path(), &via(&cs, &proxy.addr));
    arrives_resumed(&site, &proxy, "big", &digest, SIZE).await;
    // Said as what happened: the parent answered, and the transfer broke off.
    let log = site.log();
    assert!(
        log.contains("the transfer with the parent") && log.contains("broke off"),
        "{log}"
    );
    assert!(!log.contains("cannot reach the parent"), "{log}");
}

/// A transfer cut mid-blob whose image is then deleted at the root: the partial download is
/// not needed any more, and once the site has caught up it is dropped rather than kept
/// (out of the reaper's and garbage collection's reach) for a month.
#[tokio::test]
async fn a_partial_download_no_longer_needed_is_dropped() {
    const SIZE: usize = 24 << 20;
    let root_dir = tempfile::tempdir().unwrap();
    let site_dir = tempfile::tempdir().unwrap();
    let root = Outpost::start(root_dir.path(), &[]);
    let admin = client_as("admin", ADMIN_PASSWORD);
    let r = root.base();
    support::push_big_image(&admin, &r, "big", "v1", SIZE).await;
    let manifest = tag_digest(&admin, &r, "big", "v1").await.unwrap();
    let cs = connected(&root, "site-drop", &["--repository", "big"]);
    let proxy = support::FaultProxy::start(&root.addr).await;
    proxy
        .cut_at
        .store(9 << 20, std::sync::atomic::Ordering::Relaxed);
    let site = start_site_polling(site_dir.path(), &via(&cs, &proxy.addr), "1");
    let partial = site_dir.path().join("sync/partial");
    let uploads = site_dir.path().join("uploads");
    let held = || {
        std::fs::read_dir(&uploads)
            .map(|d| {
                d.filter_map(|e| e.ok()?.metadata().ok())
                    .map(|m| m.len())
                    .sum::<u64>()
            })
            .unwrap_or(0)
    };
    eventually("the transfer is cut part-way", || async {
        proxy.bytes() >= 9 << 20
    })
    .await;
    // The link stays down while the image is deleted at the root.
    proxy
        .blocked
        .store(true, std::sync::atomic::Ordering::Relaxed);
    assert!(
        std::fs::read_dir(&partial).is_ok_and(|mut d| d.next().is_some()),
        "a partial download is recorded"
    );
    assert!(held() > 1 << 20, "part of the blob is on disk");
    let resp = admin
        .delete(format!("{r}/v2/big/manifests/{manifest}"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 202);
    proxy
        .cut_at
        .store(u64::MAX, std::sync::atomic::Ordering::Relaxed);
    proxy
        .blocked
        .store(false, std::sync::atomic::Ordering::Relaxed);
    let marker = push_image(&admin, &r, "big", "small", "after").await;
    let site_admin = client_as("admin", SITE_PASSWORD);
    let s = site.base();
    eventually("the site catches up", || async {
        tag_digest(&site_admin, &s, "big", "small").await.as_deref() == Some(marker.as_str())
    })
    .await;
    eventually("the partial download is dropped", || async {
        std::fs::read_dir(&partial).is_ok_and(|mut d| d.next().is_none()) && held() < 1 << 20
    })
    .await;
}

#[tokio::test]
async fn a_link_that_stalls_mid_blob_times_out_and_resumes() {
    const SIZE: usize = 24 << 20;
    let root_dir = tempfile::tempdir().unwrap();
    let site_dir = tempfile::tempdir().unwrap();
    let root = Outpost::start(root_dir.path(), &[]);
    let admin = client_as("admin", ADMIN_PASSWORD);
    let r = root.base();
    let digest = support::push_big_image(&admin, &r, "big", "v1", SIZE).await;
    let cs = connected(&root, "site-stall", &["--repository", "big"]);
    let proxy = support::FaultProxy::start(&root.addr).await;
    // After 9 MiB the connection goes silent without closing, as a link that drops packets.
    proxy
        .stall_at
        .store(9 << 20, std::sync::atomic::Ordering::Relaxed);
    // The read timeout shortened through ordinary configuration, as an operator would.
    let site = Outpost::start_env(
        site_dir.path(),
        &[
            ("OUTPOST_CONNECTION_STRING", &via(&cs, &proxy.addr)),
            ("OUTPOST_SYNC_POLL_SECS", "5"),
            ("OUTPOST_SYNC_READ_TIMEOUT_SECS", "2"),
            ("OUTPOST_ADMIN_PASSWORD", SITE_PASSWORD),
        ],
    );
    arrives_resumed(&site, &proxy, "big", &digest, SIZE).await;
}

/// A restarted site tells the root where it serves and how its sync stands at its first
/// contact, not at the next change: the root's view (and the connection strings of the
/// site's own children, built from its login server) must not stay stale on a quiet fleet.
#[tokio::test]
async fn a_restarted_site_reports_its_status_at_once() {
    let root_dir = tempfile::tempdir().unwrap();
    let site_dir = tempfile::tempdir().unwrap();
    let root = Outpost::start(root_dir.path(), &[]);
    let admin = client_as("admin", ADMIN_PASSWORD);
    let v1 = push_image(&admin, &root.base(), "app", "v1", "one").await;
    let cs = connected(&root, "site-again", &["--repository", "app"]);
    let show = || {
        serde_json::from_str::<serde_json::Value>(&cli_ok(
            &root,
            &[
                "connected-registry",
                "show",
                "-n",
                "site-again",
                "-o",
                "json",
            ],
        ))
        .unwrap()
    };
    let site = start_site(site_dir.path(), &cs);
    let site_admin = client_as("admin", SITE_PASSWORD);
    eventually("app:v1 arrives", || async {
        tag_digest(&site_admin, &site.base(), "app", "v1")
            .await
            .as_deref()
            == Some(v1.as_str())
    })
    .await;
    let first = site.addr.clone();
    eventually("the root knows the site's address", || async {
        show()["loginServer"] == serde_json::json!(first)
    })
    .await;
    site.terminate();
    // Restarted with its parent out of reach, it still knows when it last synced.
    let away = start_site(site_dir.path(), &via(&cs, "127.0.0.1:9"));
    let synced = support::metric(
        &support::metrics(&away.base()).await,
        "outpost_sync_last_success_timestamp_seconds",
    );
    assert!(synced.is_some_and(|t| t > 0), "{synced:?}");
    away.terminate();
    // The resource is made again at the root (a new password), as after a mistaken delete;
    // the site keeps its data and comes back on another port.
    cli_ok(
        &root,
        &[
            "connected-registry",
            "delete",
            "-n",
            "site-again",
            "--force",
            "--cleanup",
            "--yes",
        ],
    );
    let cs = connected(&root, "site-again", &["--repository", "app"]);
    assert_eq!(show()["lastSyncResult"], serde_json::Value::Null);
    let site = start_site(site_dir.path(), &cs);
    eventually("the root shows the new address and a result", || async {
        let s = show();
        s["loginServer"] == serde_json::json!(site.addr)
            && s["lastSyncResult"] == "Succeeded"
            && s["version"].is_string()
    })
    .await;
    assert_ne!(site.addr, first);
    // The version tells builds of one release apart: it names the commit built.
    let built = std::process::Command::new(env!("CARGO_BIN_EXE_outpost"))
        .arg("--version")
        .output()
        .unwrap();
    let built = String::from_utf8(built.stdout).unwrap();
    assert_eq!(
        Some(format!("outpost {}", show()["version"].as_str().unwrap()).as_str()),
        built.lines().next()
    );
    let head = std::process::Command::new("git")
        .args(["rev-parse", "--short=12", "HEAD"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .expect("git, to know the commit built");
    assert!(head.status.success(), "the tests run from a git checkout");
    let head = String::from_utf8(head.stdout).unwrap();
    assert!(
        built.contains(&format!("+{}", head.trim())),
        "{built} does not name commit {head}"
    );
}

/// A site restarted while its link is stalled (the parent's address takes connections and
/// never answers) serves its clients at once from what it has, instead of holding every
/// request until its first request to the parent times out.
#[tokio::test]
async fn a_site_restarted_on_a_stalled_link_serves_at_once() {
    let root_dir = tempfile::tempdir().unwrap();
    let site_dir = tempfile::tempdir().unwrap();
    let root = Outpost::start(root_dir.path(), &[]);
    let admin = client_as("admin", ADMIN_PASSWORD);
    let v1 = push_image(&admin, &root.base(), "app", "v1", "one").await;
    let cs = connected(&root, "site-silent", &["--repository", "app"]);
    let site = start_site(site_dir.path(), &cs);
    let site_admin = client_as("admin", SITE_PASSWORD);
    eventually("app:v1 arrives", || async {
        tag_digest(&site_admin, &site.base(), "app", "v1")
            .await
            .as_deref()
            == Some(v1.as_str())
    })
    .await;
    site.terminate();

    // A black hole where the parent was: connections are taken and never answered.
    let hole = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let hole_addr = hole.local_addr().unwrap().to_string();
    let held = tokio::spawn(async move {
        let mut open = Vec::new();
        while let Ok((c, _)) = hole.accept().await {
            open.push(c);
        }
    });
    // A read timeout far longer than the test waits: the site must not wait for it.
    let site = Outpost::start_env(
        site_dir.path(),
        &[
            ("OUTPOST_CONNECTION_STRING", &via(&cs, &hole_addr)),
            ("OUTPOST_SYNC_READ_TIMEOUT_SECS", "600"),
            ("OUTPOST_ADMIN_PASSWORD", SITE_PASSWORD),
        ],
    );
    let site_admin = client_as("admin", SITE_PASSWORD);
    eventually("the site serves app:v1 with its parent silent", || async {
        tag_digest(&site_admin, &site.base(), "app", "v1")
            .await
            .as_deref()
            == Some(v1.as_str())
    })
    .await;
    held.abort();
}

#[tokio::test]
async fn a_partial_download_outlives_the_upload_reaper_while_the_parent_is_away() {
    const SIZE: usize = 24 << 20;
    let root_dir = tempfile::tempdir().unwrap();
    let site_dir = tempfile::tempdir().unwrap();
    let root = Outpost::start(root_dir.path(), &[]);
    let admin = client_as("admin", ADMIN_PASSWORD);
    let r = root.base();
    let digest = support::push_big_image(&admin, &r, "big", "v1", SIZE).await;
    let cs = connected(&root, "site-reap", &["--repository", "big"]);
    let proxy = support::FaultProxy::start(&root.addr).await;
    proxy
        .cut_at
        .store(9 << 20, std::sync::atomic::Ordering::Relaxed);
    // Idle uploads are reaped after a second here, far sooner than the link comes back.
    let site = Outpost::start_env(
        site_dir.path(),
        &[
            ("OUTPOST_CONNECTION_STRING", &via(&cs, &proxy.addr)),
            ("OUTPOST_SYNC_POLL_SECS", "5"),
            ("OUTPOST_UPLOAD_MAX_AGE_SECS", "1"),
            ("OUTPOST_ADMIN_PASSWORD", SITE_PASSWORD),
        ],
    );
    // The link drops at 9 MiB and stays down.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while proxy.bytes() < 9 << 20 {
        assert!(
            std::time::Instant::now() < deadline,
            "the transfer never started"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    proxy
        .blocked
        .store(true, std::sync::atomic::Ordering::Relaxed);
    tokio::time::sleep(Duration::from_secs(4)).await;
    proxy
        .blocked
        .store(false, std::sync::atomic::Ordering::Relaxed);
    // A reaped partial download would start over: over 30% extra.
    arrives_resumed(&site, &proxy, "big", &digest, SIZE).await;
}

#[tokio::test]
async fn a_kill_9_mid_sync_resumes_after_restart() {
    const SIZE: usize = 40 << 20;
    let root_dir = tempfile::tempdir().unwrap();
    let site_dir = tempfile::tempdir().unwrap();
    let root = Outpost::start(root_dir.path(), &[]);
    let admin = client_as("admin", ADMIN_PASSWORD);
    let r = root.base();
    let digest = support::push_big_image(&admin, &r, "big", "v1", SIZE).await;
    let cs = via(
        &connected(&root, "site-kill", &["--repository", "big"]),
        "PLACEHOLDER",
    );
    let proxy = support::FaultProxy::start(&root.addr).await;
    let cs = cs.replace("PLACEHOLDER", &proxy.addr);
    // A slow link, so the process dies mid-transfer.
    proxy
        .rate
        .store(10 << 20, std::sync::atomic::Ordering::Relaxed);
    let site = start_site(site_dir.path(), &cs);
    eventually("a good part of the blob is down", || async {
        proxy.bytes() > (12 << 20) as u64
    })
    .await;
    site.kill9();
    let before = proxy.bytes();
    assert!(before < SIZE as u64, "killed before the transfer finished");
    proxy.rate.store(0, std::sync::atomic::Ordering::Relaxed);
    let site = start_site(site_dir.path(), &cs);
    let s = site.base();
    let site_admin = client_as("admin", SITE_PASSWORD);
    eventually("the blob completes after the restart", || async {
        blob_len(&site_admin, &s, "big", &digest).await == Some(SIZE)
    })
    .await;
    assert!(
        site.log().contains("resuming blob transfer"),
        "{}",
        site.log()
    );
    let extra = proxy.bytes() as f64 / SIZE as f64 - 1.0;
    assert!(
        extra < 0.10,
        "resumed with {:.1}% extra bytes ({} before the kill)",
        extra * 100.0,
        before
    );
}

#[tokio::test]
async fn a_transfer_that_outlasts_its_window_stops_and_resumes_in_the_next() {
    const SIZE: usize = 40 << 20;
    let root_dir = tempfile::tempdir().unwrap();
    let site_dir = tempfile::tempdir().unwrap();
    // Windows of a few seconds, allowed through ordinary configuration.
    let root = Outpost::start_env(root_dir.path(), &[("OUTPOST_MIN_SYNC_WINDOW", "PT1S")]);
    let admin = client_as("admin", ADMIN_PASSWORD);
    let r = root.base();
    let digest = support::push_big_image(&admin, &r, "big", "v1", SIZE).await;
    // Every minute, for 4 seconds.
    let cs = connected(
        &root,
        "ship-win",
        &["--repository", "big", "-s", "0-59 * * * *", "-w", "PT4S"],
    );
    let proxy = support::FaultProxy::start(&root.addr).await;
    // At 6 MB/s the 40 MiB blob needs about 7 s: more than one window.
    proxy
        .rate
        .store(6 << 20, std::sync::atomic::Ordering::Relaxed);
    let site = start_site(site_dir.path(), &via(&cs, &proxy.addr));
    let s = site.base();
    let site_admin = client_as("admin", SITE_PASSWORD);
    // While the window is closed mid-transfer, the root does not show the site as syncing.
    // (The first window may open up to a minute after the start.)
    let deadline = std::time::Instant::now() + Duration::from_secs(150);
    while !site.log().contains("sync window closed") {
        assert!(
            std::time::Instant::now() < deadline,
            "no window closed mid-transfer:\n{}",
            site.log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    eventually("the root shows the site online, not syncing", || async {
        let v: serde_json::Value = serde_json::from_str(&cli_ok(
            &root,
            &["connected-registry", "show", "-n", "ship-win", "-o", "json"],
        ))
        .unwrap();
        v["connectionState"] == "Online"
    })
    .await;
    assert_ne!(blob_len(&site_admin, &s, "big", &digest).await, Some(SIZE));
    let deadline = std::time::Instant::now() + Duration::from_secs(200);
    loop {
        if blob_len(&site_admin, &s, "big", &digest).await == Some(SIZE) {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the blob never completed:\n{}",
            site.log()
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let log = site.log();
    assert!(log.contains("sync window closed"), "{log}");
    assert!(log.contains("resuming blob transfer"), "{log}");
    let extra = proxy.bytes() as f64 / SIZE as f64 - 1.0;
    assert!(extra < 0.10, "{:.1}% extra bytes", extra * 100.0);
}

#[tokio::test]
async fn a_plain_docker_registry_can_be_the_parent() {
    // Debian's docker-registry (distribution 2.8); tests/deps.sh installs it.
    let which = std::process::Command::new("sh")
        .args(["-c", "command -v docker-registry"])
        .output()
        .unwrap();
    assert!(
        which.status.success(),
        "docker-registry is not installed: run tests/deps.sh (CI's .ci/run does)"
    );
    let reg_dir = tempfile::tempdir().unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let cfg = reg_dir.path().join("config.yml");
    std::fs::write(
        &cfg,
        format!(
            "version: 0.1\nlog:\n  level: error\nstorage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\nhttp:\n  addr: 127.0.0.1:{port}\n",
            reg_dir.path().join("data").display()
        ),
    )
    .unwrap();
    let registry = std::process::Command::new("docker-registry")
        .args(["serve"])
        .arg(&cfg)
        .env_remove("REGISTRY_AUTH_FILE")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    struct Kill(std::process::Child);
    impl Drop for Kill {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let _registry_guard = Kill(registry);
    let upstream = format!("http://127.0.0.1:{port}");
    let plain = reqwest::Client::new();
    eventually("docker-registry answers", || async {
        plain
            .get(format!("{upstream}/v2/"))
            .send()
            .await
            .is_ok_and(|r| r.status().is_success())
    })
    .await;
    let v1 = push_image(&plain, &upstream, "mirror/app", "v1", "plain-one").await;
    push_image(&plain, &upstream, "mirror/other", "v1", "not-listed").await;

    let site_dir = tempfile::tempdir().unwrap();
    let conf = site_dir.path().join("outpost.toml");
    std::fs::write(&conf, format!("upstream_url = \"{upstream}\"\nupstream_repositories = [\"mirror/app\", \"mirror/apq\"]\nupstream_poll_secs = 1\n")).unwrap();
    let site = Outpost::start_env(
        site_dir.path(),
        &[
            ("OUTPOST_CONFIG", conf.to_str().unwrap()),
            ("OUTPOST_ADMIN_PASSWORD", SITE_PASSWORD),
        ],
    );
    let s = site.base();
    let site_admin = client_as("admin", SITE_PASSWORD);
    eventually("mirror/app:v1 is mirrored", || async {
        tag_digest(&site_admin, &s, "mirror/app", "v1")
            .await
            .as_deref()
            == Some(v1.as_str())
    })
    .await;
    assert_eq!(
        tag_digest(&site_admin, &s, "mirror/other", "v1").await,
        None,
        "only listed repositories"
    );
    // A listed repository the upstream does not have (a typo) is said once.
    eventually(
        "the mirror names the repository the upstream lacks",
        || async { site.log().contains("the upstream has no such repository") },
    )
    .await;
    assert!(site.log().contains("mirror/apq"), "{}", site.log());
    let v2 = push_image(&plain, &upstream, "mirror/app", "v2", "plain-two").await;
    eventually("a new tag is picked up by polling", || async {
        tag_digest(&site_admin, &s, "mirror/app", "v2")
            .await
            .as_deref()
            == Some(v2.as_str())
    })
    .await;
    assert_eq!(
        site.log()
            .matches("the upstream has no such repository")
            .count(),
        1,
        "said more than once:\n{}",
        site.log()
    );
    let denied = site_admin
        .post(format!("{s}/v2/mirror/app/blobs/uploads/"))
        .send()
        .await
        .unwrap();
    assert_eq!(denied.status(), 403, "a mirror is read-only");
    let text = denied.text().await.unwrap();
    assert!(
        text.contains(&format!(
            "a read-only mirror of {upstream}: push, tag and delete there"
        )),
        "{text}"
    );
    // Its status page says what it mirrors, and that the polls work.
    let page = site_admin
        .get(format!("{s}/status"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        page.contains(&format!("mirror of {upstream}"))
            && page.contains("<tr><th>Last exchange with the upstream</th><td>succeeded</td></tr>"),
        "{page}"
    );
}

#[tokio::test]
async fn a_plain_parent_that_wants_bearer_tokens_is_mirrored() {
    let root_dir = tempfile::tempdir().unwrap();
    let root = Outpost::start(root_dir.path(), &[]);
    let admin = client_as("admin", ADMIN_PASSWORD);
    let r = root.base();
    let v1 = push_image(&admin, &r, "mirror/app", "v1", "behind-a-token-service").await;
    // Basic credentials alone get nowhere: only a token from the gate's token service does.
    let gate = support::BearerGate::start(&r, "mirror-bot", "gate-secret").await;
    let basic = client_as("mirror-bot", "gate-secret");
    let refused = basic
        .get(format!("http://{}/v2/mirror/app/tags/list", gate.addr))
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status(), 401);
    assert!(
        refused.headers()["www-authenticate"]
            .to_str()
            .unwrap()
            .starts_with("Bearer realm=")
    );

    let site_dir = tempfile::tempdir().unwrap();
    let conf = site_dir.path().join("outpost.toml");
    std::fs::write(
        &conf,
        format!(
            "upstream_url = \"http://{}\"\nupstream_repositories = [\"mirror/app\"]\n\
             upstream_username = \"mirror-bot\"\nupstream_password = \"gate-secret\"\n\
             upstream_poll_secs = 1\n",
            gate.addr
        ),
    )
    .unwrap();
    let site = Outpost::start_env(
        site_dir.path(),
        &[
            ("OUTPOST_CONFIG", conf.to_str().unwrap()),
            ("OUTPOST_ADMIN_PASSWORD", SITE_PASSWORD),
        ],
    );
    let s = site.base();
    let site_admin = client_as("admin", SITE_PASSWORD);
    eventually(
        "mirror/app:v1 is mirrored through the token service",
        || async {
            tag_digest(&site_admin, &s, "mirror/app", "v1")
                .await
                .as_deref()
                == Some(v1.as_str())
        },
    )
    .await;
    let issued = gate.issued.load(std::sync::atomic::Ordering::Relaxed);
    assert!(issued >= 1, "the site never asked the token service");
    // Tokens are reused: a second poll round does not ask for new ones each request.
    let v2 = push_image(&admin, &r, "mirror/app", "v2", "second-behind-the-gate").await;
    eventually("mirror/app:v2 follows", || async {
        tag_digest(&site_admin, &s, "mirror/app", "v2")
            .await
            .as_deref()
            == Some(v2.as_str())
    })
    .await;
    let issued = gate.issued.load(std::sync::atomic::Ordering::Relaxed);
    assert!(
        issued <= 3,
        "{issued} tokens for one repository: they are not reused"
    );

    // A proxy in front of the registry answers 404 for the tags list, without the registry's
    // NAME_UNKNOWN: that says nothing about the repository, and the site keeps its tags.
    *gate.canned.lock().unwrap() = Some(("/tags/list".into(), 404, "404 page not found".into()));
    eventually("the site logs the proxy's answer", || async {
        site.log()
            .contains("mirror/app/tags/list, without a registry error in the answer")
    })
    .await;
    assert_eq!(
        tag_digest(&site_admin, &s, "mirror/app", "v1")
            .await
            .as_deref(),
        Some(v1.as_str()),
        "a proxy's 404 emptied the repository:\n{}",
        site.log()
    );
    // The registry's own word that the repository is gone (Harbor's code): its tags go, and
    // come back with it.
    *gate.canned.lock().unwrap() = Some((
        "/tags/list".into(),
        404,
        r#"{"errors":[{"code":"NOT_FOUND","message":"repository mirror/app not found"}]}"#.into(),
    ));
    eventually("the tags of a repository gone upstream go", || async {
        tag_digest(&site_admin, &s, "mirror/app", "v1")
            .await
            .is_none()
    })
    .await;
    *gate.canned.lock().unwrap() = None;
    eventually("they come back with it", || async {
        tag_digest(&site_admin, &s, "mirror/app", "v1")
            .await
            .as_deref()
            == Some(v1.as_str())
    })
    .await;

    // A rate limit (Docker Hub's answer): the mirror waits as long as the upstream asks,
    // instead of calling again every poll interval (1 s here) and prolonging the limit.
    *gate.retry_after.lock().unwrap() = Some("3600".into());
    *gate.canned.lock().unwrap() = Some((
        "/tags/list".into(),
        429,
        r#"{"errors":[{"code":"TOOMANYREQUESTS","message":"pull rate limit reached"}]}"#.into(),
    ));
    eventually(
        "the mirror says how long the upstream asks it to wait",
        || async { site.log().contains("(it asks to wait 3600 s)") },
    )
    .await;
    // In a mirror's words: the other registry is its upstream, not a parent.
    assert!(
        site.log()
            .contains("the upstream answered 429 TOOMANYREQUESTS"),
        "{}",
        site.log()
    );
    let hits = gate.canned_hits.load(std::sync::atomic::Ordering::Relaxed);
    tokio::time::sleep(std::time::Duration::from_secs(4)).await;
    assert_eq!(
        gate.canned_hits.load(std::sync::atomic::Ordering::Relaxed),
        hits,
        "the mirror called again while the upstream asked it to wait:\n{}",
        site.log()
    );
    assert_eq!(
        tag_digest(&site_admin, &s, "mirror/app", "v1")
            .await
            .as_deref(),
        Some(v1.as_str()),
        "a rate limit took the mirror's tags"
    );
    *gate.canned.lock().unwrap() = None;
    *gate.retry_after.lock().unwrap() = None;

    // A mirror first started while the upstream is down for maintenance (503) starts, and
    // mirrors once the upstream is back.
    *gate.canned.lock().unwrap() = Some((
        "/v2/".into(),
        503,
        r#"{"errors":[{"code":"UNAVAILABLE","message":"down for maintenance"}]}"#.into(),
    ));
    let fresh_dir = tempfile::tempdir().unwrap();
    let fresh = Outpost::start_env(
        fresh_dir.path(),
        &[
            ("OUTPOST_CONFIG", conf.to_str().unwrap()),
            ("OUTPOST_ADMIN_PASSWORD", SITE_PASSWORD),
        ],
    );
    eventually("the new mirror says the upstream cannot answer", || async {
        fresh.log().contains("the upstream cannot answer for now")
    })
    .await;
    *gate.canned.lock().unwrap() = None;
    let f = fresh.base();
    eventually(
        "the new mirror mirrors once the upstream is back",
        || async {
            tag_digest(&site_admin, &f, "mirror/app", "v1")
                .await
                .as_deref()
                == Some(v1.as_str())
        },
    )
    .await;
    drop(fresh);

    // The upstream's password changed and the mirror restarts: it serves what it has, and
    // says why it cannot sync.
    site.terminate();
    let site = Outpost::start_env(
        site_dir.path(),
        &[
            ("OUTPOST_CONFIG", conf.to_str().unwrap()),
            ("OUTPOST_ADMIN_PASSWORD", SITE_PASSWORD),
            ("OUTPOST_UPSTREAM_PASSWORD", "changed-upstream"),
        ],
    );
    let s = site.base();
    assert_eq!(
        tag_digest(&site_admin, &s, "mirror/app", "v1")
            .await
            .as_deref(),
        Some(v1.as_str())
    );
    assert!(
        site.log().contains("serving what is here and retrying"),
        "{}",
        site.log()
    );
    // A first start with nothing to serve stops, so the mistake is seen at once.
    // (Waited for off the runtime's thread, which the gate needs.)
    let empty = tempfile::tempdir().unwrap();
    let mut first = std::process::Command::new(env!("CARGO_BIN_EXE_outpost"));
    first
        .args(["serve", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(empty.path())
        .env("OUTPOST_CONFIG", &conf)
        .env("OUTPOST_ADMIN_PASSWORD", SITE_PASSWORD)
        .env("OUTPOST_UPSTREAM_PASSWORD", "changed-upstream");
    let out = tokio::task::spawn_blocking(move || first.output().unwrap())
        .await
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(err.contains("mirror-bot"), "{err}");
}

#[tokio::test]
async fn a_readwrite_site_sends_its_pushes_up_and_the_last_write_wins() {
    let root_dir = tempfile::tempdir().unwrap();
    let site_dir = tempfile::tempdir().unwrap();
    let sibling_dir = tempfile::tempdir().unwrap();
    let root = Outpost::start(root_dir.path(), &[]);
    let admin = client_as("admin", ADMIN_PASSWORD);
    let r = root.base();
    push_image(&admin, &r, "app", "base", "base").await;
    let site_cs = connected(
        &root,
        "site-rw",
        &["-m", "ReadWrite", "--repository", "app"],
    );
    let sibling_cs = connected(&root, "site-ro", &["--repository", "app"]);
    let proxy = support::FaultProxy::start(&root.addr).await;
    let site = start_site(site_dir.path(), &via(&site_cs, &proxy.addr));
    let sibling = start_site(sibling_dir.path(), &sibling_cs);
    let s = site.base();
    let sib = sibling.base();
    let site_admin = client_as("admin", SITE_PASSWORD);
    eventually("the site has app:base", || async {
        tag_digest(&site_admin, &s, "app", "base").await.is_some()
    })
    .await;

    // A push at the site reaches the root, and from there the sibling.
    let local = push_image(&site_admin, &s, "app", "from-site", "site-push").await;
    eventually("the root has the site's push", || async {
        tag_digest(&admin, &r, "app", "from-site").await.as_deref() == Some(local.as_str())
    })
    .await;
    eventually("the sibling has it too", || async {
        tag_digest(&site_admin, &sib, "app", "from-site")
            .await
            .as_deref()
            == Some(local.as_str())
    })
    .await;

    // A delete at the site goes up as well.
    assert_eq!(
        site_admin
            .delete(format!("{s}/v2/app/manifests/from-site"))
            .send()
            .await
            .unwrap()
            .status(),
        202
    );
    eventually("the root drops the tag", || async {
        tag_digest(&admin, &r, "app", "from-site").await.is_none()
    })
    .await;

    // The link goes down; the same tag is written on both sides; the site's write reaches the
    // root last and wins, the root's manifest is kept by digest, and the conflict is reported.
    proxy
        .blocked
        .store(true, std::sync::atomic::Ordering::Relaxed);
    let ours = push_image(&site_admin, &s, "app", "shared", "written-at-site").await;
    // While the parent cannot hear about it, the site's own gauge shows what waits to go up.
    eventually("the site's metrics count the pending push", || async {
        support::metric(&support::metrics(&s).await, "outpost_sync_outbox_depth")
            .is_some_and(|d| d >= 1)
    })
    .await;
    let theirs = push_image(&admin, &r, "app", "shared", "written-at-root").await;
    proxy
        .blocked
        .store(false, std::sync::atomic::Ordering::Relaxed);
    eventually("the site's write wins at the root", || async {
        tag_digest(&admin, &r, "app", "shared").await.as_deref() == Some(ours.as_str())
    })
    .await;
    assert_eq!(
        tag_digest(&admin, &r, "app", &theirs).await.as_deref(),
        Some(theirs.as_str()),
        "the other manifest is kept by digest"
    );
    eventually("the site and the sibling agree", || async {
        tag_digest(&site_admin, &s, "app", "shared")
            .await
            .as_deref()
            == Some(ours.as_str())
            && tag_digest(&site_admin, &sib, "app", "shared")
                .await
                .as_deref()
                == Some(ours.as_str())
    })
    .await;
    eventually(
        "the outbox is reported empty once everything went up",
        || async {
            let v: serde_json::Value = serde_json::from_str(&cli_ok(
                &root,
                &["connected-registry", "show", "-n", "site-rw", "-o", "json"],
            ))
            .unwrap();
            v["outboxDepth"] == 0
        },
    )
    .await;
    eventually("the conflict is reported at the root", || async {
        let shown = cli_ok(
            &root,
            &["connected-registry", "show", "-n", "site-rw", "-o", "json"],
        );
        shown.contains("TagConflict")
    })
    .await;
    // Resolved by the conflict rule: a notice, which does not count the site unhealthy
    // (once the failures of the cut link are cleared by the next successful sync).
    eventually(
        "the conflict is a notice and the site is online",
        || async {
            let v: serde_json::Value = serde_json::from_str(&cli_ok(
                &root,
                &["connected-registry", "show", "-n", "site-rw", "-o", "json"],
            ))
            .unwrap();
            v["connectionState"] == "Online"
                && v["statusDetails"].as_array().is_some_and(|d| {
                    d.iter()
                        .any(|x| x["code"] == "TagConflict" && x["type"] == "Notice")
                })
        },
    )
    .await;

    // A manifest deleted by digest at the site while the root tagged it: the site's own tag
    // goes, the root's tag and the manifest stay (and come back to the site), reported.
    let keep = push_image(&admin, &r, "app", "keep", "tagged at the root meanwhile").await;
    eventually("the site has app:keep", || async {
        tag_digest(&site_admin, &s, "app", "keep").await.as_deref() == Some(keep.as_str())
    })
    .await;
    let manifest = admin
        .get(format!("{r}/v2/app/manifests/{keep}"))
        .header("accept", "application/vnd.oci.image.manifest.v1+json")
        .send()
        .await
        .unwrap();
    let media_type = manifest.headers()["content-type"]
        .to_str()
        .unwrap()
        .to_string();
    let bytes = manifest.bytes().await.unwrap();
    proxy
        .blocked
        .store(true, std::sync::atomic::Ordering::Relaxed);
    let put = admin
        .put(format!("{r}/v2/app/manifests/release"))
        .header("content-type", media_type)
        .body(bytes)
        .send()
        .await
        .unwrap();
    assert_eq!(put.status(), 201);
    let del = site_admin
        .delete(format!("{s}/v2/app/manifests/{keep}"))
        .send()
        .await
        .unwrap();
    assert_eq!(del.status(), 202);
    proxy
        .blocked
        .store(false, std::sync::atomic::Ordering::Relaxed);
    eventually("the site's tag goes at the root", || async {
        tag_digest(&admin, &r, "app", "keep").await.is_none()
    })
    .await;
    eventually(
        "the manifest comes back to the site with the root's tag",
        || async {
            tag_digest(&site_admin, &s, "app", "release")
                .await
                .as_deref()
                == Some(keep.as_str())
        },
    )
    .await;
    assert_eq!(
        tag_digest(&admin, &r, "app", "release").await.as_deref(),
        Some(keep.as_str())
    );
    eventually("the kept manifest is reported", || async {
        cli_ok(
            &root,
            &["connected-registry", "show", "-n", "site-rw", "-o", "json"],
        )
        .contains("the parent's tags release point at it")
    })
    .await;
}

/// A ReadWrite site's outbox is durable: changes made while the parent is away survive two
/// `kill -9`s and reach the root in order once the link is back. The site keeps
/// authenticating its clients offline, and a client token disabled at the root stops working
/// at the site at its next sync.
#[tokio::test]
async fn the_outbox_survives_kill_9_and_token_changes_reach_the_site() {
    let root_dir = tempfile::tempdir().unwrap();
    let site_dir = tempfile::tempdir().unwrap();
    let root = Outpost::start(root_dir.path(), &[]);
    let admin = client_as("admin", ADMIN_PASSWORD);
    let r = root.base();
    push_image(&admin, &r, "app", "base", "outbox-base").await;
    let reader_pw = read_token(&root, "outbox-reader", "app");
    let cs = connected(
        &root,
        "site-outbox",
        &[
            "-m",
            "ReadWrite",
            "--repository",
            "app",
            "--client-tokens",
            "outbox-reader",
        ],
    );
    let proxy = support::FaultProxy::start(&root.addr).await;
    let cs = via(&cs, &proxy.addr);
    let site = start_site(site_dir.path(), &cs);
    let site_admin = client_as("admin", SITE_PASSWORD);
    let reader = client_as("outbox-reader", &reader_pw);
    let s = site.base();
    eventually("the site has app:base", || async {
        tag_digest(&reader, &s, "app", "base").await.is_some()
    })
    .await;

    // The link goes down and the site is killed: from here on it starts with no parent.
    proxy
        .blocked
        .store(true, std::sync::atomic::Ordering::Relaxed);
    site.kill9();
    let site = start_site(site_dir.path(), &cs);
    let s = site.base();
    let first = push_image(&site_admin, &s, "app", "moved", "outbox-first").await;
    let second = push_image(&site_admin, &s, "app", "moved", "outbox-second").await;
    let kept = push_image(&site_admin, &s, "app", "kept", "outbox-kept").await;
    assert_eq!(
        site_admin
            .delete(format!("{s}/v2/app/manifests/base"))
            .send()
            .await
            .unwrap()
            .status(),
        202
    );
    eventually("the site counts its pending changes", || async {
        support::metric(&support::metrics(&s).await, "outpost_sync_outbox_depth")
            .is_some_and(|d| d >= 7)
    })
    .await;
    site.kill9();

    // Restarted, still offline: it serves its own pushes and authenticates its clients.
    let site = start_site(site_dir.path(), &cs);
    let s = site.base();
    assert_eq!(
        tag_digest(&reader, &s, "app", "moved").await.as_deref(),
        Some(second.as_str())
    );
    assert!(
        tag_digest(&admin, &r, "app", "moved").await.is_none(),
        "nothing went up yet"
    );

    // The link is back: everything reaches the root, the tag at its last value.
    proxy
        .blocked
        .store(false, std::sync::atomic::Ordering::Relaxed);
    eventually("the root has the site's changes", || async {
        tag_digest(&admin, &r, "app", "kept").await.as_deref() == Some(kept.as_str())
            && tag_digest(&admin, &r, "app", "base").await.is_none()
    })
    .await;
    assert_eq!(
        tag_digest(&admin, &r, "app", "moved").await.as_deref(),
        Some(second.as_str()),
        "the changes were replayed in order"
    );
    assert_eq!(
        tag_digest(&admin, &r, "app", &first).await.as_deref(),
        Some(first.as_str()),
        "the first push is at the root too"
    );

    // A client token disabled at the root is refused at the site after its next sync.
    cli_ok(
        &root,
        &[
            "token",
            "update",
            "-n",
            "outbox-reader",
            "--status",
            // As az users type it.
            "Disabled",
        ],
    );
    eventually("the site refuses the disabled token", || async {
        reader
            .get(format!("{s}/v2/app/tags/list"))
            .send()
            .await
            .unwrap()
            .status()
            == 401
    })
    .await;
}

#[tokio::test]
async fn a_push_at_a_readwrite_site_goes_up_without_waiting_for_the_long_poll() {
    let root_dir = tempfile::tempdir().unwrap();
    let site_dir = tempfile::tempdir().unwrap();
    let root = Outpost::start(root_dir.path(), &[]);
    let admin = client_as("admin", ADMIN_PASSWORD);
    let r = root.base();
    let base = push_image(&admin, &r, "app", "base", "base-quick").await;
    let cs = connected(
        &root,
        "site-quick",
        &["-m", "ReadWrite", "--repository", "app"],
    );
    // Each long-poll of the parent may wait two minutes, far longer than `eventually` waits.
    let site = Outpost::start_env(
        site_dir.path(),
        &[
            ("OUTPOST_CONNECTION_STRING", &cs),
            ("OUTPOST_SYNC_POLL_SECS", "120"),
            ("OUTPOST_ADMIN_PASSWORD", SITE_PASSWORD),
        ],
    );
    let s = site.base();
    let site_admin = client_as("admin", SITE_PASSWORD);
    eventually("the site has app:base", || async {
        tag_digest(&site_admin, &s, "app", "base").await.as_deref() == Some(base.as_str())
    })
    .await;
    // Let the site settle into its long-poll before pushing.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let local = push_image(&site_admin, &s, "app", "local", "pushed-at-the-site").await;
    eventually("the root has the site's push", || async {
        tag_digest(&admin, &r, "app", "local").await.as_deref() == Some(local.as_str())
    })
    .await;
}

/// A root, and ReadWrite site `name` syncing `repositories` that reaches it through a
/// [`support::FaultProxy`], once the site has activated. Returns the two data directories,
/// the root, the proxy and the site.
async fn readwrite_site_behind_proxy(
    name: &str,
    repositories: &[&str],
) -> (
    tempfile::TempDir,
    tempfile::TempDir,
    Outpost,
    support::FaultProxy,
    Outpost,
) {
    let root_dir = tempfile::tempdir().unwrap();
    let site_dir = tempfile::tempdir().unwrap();
    let root = Outpost::start(root_dir.path(), &[]);
    let mut args = vec!["-m", "ReadWrite", "--repository"];
    args.extend_from_slice(repositories);
    let cs = connected(&root, name, &args);
    let proxy = support::FaultProxy::start(&root.addr).await;
    let site = start_site(site_dir.path(), &via(&cs, &proxy.addr));
    eventually("the site is activated", || async {
        site.log().contains("activated at the parent")
    })
    .await;
    (root_dir, site_dir, root, proxy, site)
}

/// A site whose window is closed still hears of a changed schedule (a wrong one set by
/// mistake, say) without waiting for the window: it checks its configuration now and then.
#[tokio::test]
async fn a_schedule_changed_while_the_window_is_closed_reaches_the_site() {
    let root_dir = tempfile::tempdir().unwrap();
    let site_dir = tempfile::tempdir().unwrap();
    let root = Outpost::start(root_dir.path(), &[]);
    let admin = client_as("admin", ADMIN_PASSWORD);
    let r = root.base();
    // A window twelve hours away, whenever the test runs.
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap();
    let hour = (now.as_secs() / 3600 + 12) % 24;
    let schedule = format!("0 {hour} * * *");
    let cs = connected(
        &root,
        "site-closed",
        &["--repository", "app", "-s", &schedule, "-w", "PT1H"],
    );
    let site = start_site_polling(site_dir.path(), &cs, "1");
    eventually("the site waits for its window", || async {
        site.log().contains("outside the sync window")
    })
    .await;
    let v1 = push_image(&admin, &r, "app", "v1", "closed-window").await;
    cli_ok(
        &root,
        &[
            "connected-registry",
            "update",
            "-n",
            "site-closed",
            "-s",
            "* * * * *",
        ],
    );
    let s = site.base();
    let local = client_as("admin", SITE_PASSWORD);
    eventually("the site syncs continuously now", || async {
        tag_digest(&local, &s, "app", "v1").await.as_deref() == Some(v1.as_str())
    })
    .await;
}

/// A ReadWrite site's pushes the parent refuses (the repository left the site's scope while
/// the site was offline) stay at the site, and go up once the repository is back in scope:
/// the full reconciliation of the re-added repository must not take them for tags the parent
/// deleted.
#[tokio::test]
async fn pushes_the_parent_refused_are_kept_and_go_up_when_allowed() {
    use std::sync::atomic::Ordering::Relaxed;
    let (_root_dir, site_dir, root, proxy, site) =
        readwrite_site_behind_proxy("site-refused", &["app", "shared"]).await;
    let admin = client_as("admin", ADMIN_PASSWORD);
    let r = root.base();
    let s = site.base();
    let site_admin = client_as("admin", SITE_PASSWORD);
    proxy.blocked.store(true, Relaxed);
    let pushed = push_image(&site_admin, &s, "shared", "offline", "refused-then-taken").await;
    let scope = |op: &str| {
        cli_ok(
            &root,
            &[
                "connected-registry",
                "permissions",
                "update",
                "-n",
                "site-refused",
                op,
                "shared",
            ],
        );
    };
    scope("--remove");
    proxy.blocked.store(false, Relaxed);
    eventually("the parent refuses the push", || async {
        site.log().contains("the parent refused a local change")
    })
    .await;
    assert_eq!(tag_digest(&admin, &r, "shared", "offline").await, None);
    assert_eq!(
        tag_digest(&site_admin, &s, "shared", "offline")
            .await
            .as_deref(),
        Some(pushed.as_str())
    );

    scope("--add");
    eventually("the refused push reaches the root", || async {
        tag_digest(&admin, &r, "shared", "offline").await.as_deref() == Some(pushed.as_str())
    })
    .await;
    assert_eq!(
        tag_digest(&site_admin, &s, "shared", "offline")
            .await
            .as_deref(),
        Some(pushed.as_str()),
        "the site lost its push:\n{}",
        site.log()
    );
    // Taken after all: no longer reported as refused.
    eventually("the root no longer shows the push refused", || async {
        let v: serde_json::Value = serde_json::from_str(&cli_ok(
            &root,
            &[
                "connected-registry",
                "show",
                "-n",
                "site-refused",
                "-o",
                "json",
            ],
        ))
        .unwrap();
        !v["statusDetails"]
            .as_array()
            .unwrap()
            .iter()
            .any(|d| d["code"] == "OutboxEntryRefused")
    })
    .await;

    // And no longer kept against the parent's deletes (which a full reconciliation would
    // otherwise ignore for it).
    let refused = site_dir.path().join("sync").join("refused.json");
    eventually("the push leaves the list of refused changes", || async {
        !std::fs::read_to_string(&refused)
            .unwrap_or_default()
            .contains(&pushed)
    })
    .await;
}

#[tokio::test]
async fn blobs_go_up_in_resumable_pieces_and_shared_ones_are_mounted_not_resent() {
    const SIZE: usize = 24 << 20;
    let (_root_dir, _site_dir, root, proxy, site) =
        readwrite_site_behind_proxy("site-up", &["app", "app2"]).await;
    let admin = client_as("admin", ADMIN_PASSWORD);
    let r = root.base();
    let s = site.base();
    let site_admin = client_as("admin", SITE_PASSWORD);

    // The link drops once 9 MiB of the 24 MiB layer have gone up; the rest follows on the
    // next attempt without sending the first part again.
    let sent_before = proxy.upstream.load(std::sync::atomic::Ordering::Relaxed);
    proxy.up_cut_at.store(
        sent_before + (9 << 20),
        std::sync::atomic::Ordering::Relaxed,
    );
    let layer = support::push_big_image(&site_admin, &s, "app", "v1", SIZE).await;
    eventually("app:v1 reaches the root", || async {
        tag_digest(&admin, &r, "app", "v1").await.is_some()
    })
    .await;
    assert_eq!(blob_len(&admin, &r, "app", &layer).await, Some(SIZE));
    assert!(
        site.log()
            .contains("resuming the upload of a blob to the parent"),
        "{}",
        site.log()
    );
    let sent = proxy.upstream.load(std::sync::atomic::Ordering::Relaxed) - sent_before;
    let extra = sent as f64 / SIZE as f64 - 1.0;
    assert!(
        extra < 0.10,
        "sent {:.1}% more than the layer",
        extra * 100.0
    );

    // The same layer in another repository: the parent mounts it from app.
    let before = proxy.upstream.load(std::sync::atomic::Ordering::Relaxed);
    support::push_big_image(&site_admin, &s, "app2", "v1", SIZE).await;
    eventually("app2:v1 reaches the root", || async {
        tag_digest(&admin, &r, "app2", "v1").await.is_some()
    })
    .await;
    assert_eq!(blob_len(&admin, &r, "app2", &layer).await, Some(SIZE));
    let sent = proxy.upstream.load(std::sync::atomic::Ordering::Relaxed) - before;
    assert!(
        sent < 1 << 20,
        "{sent} bytes went up for a layer the parent already had in another repository"
    );
}

/// A ReadWrite site's client moves a tag twice while the link is down. When the link is
/// back the outbox sends both writes, and the feed then brings both back as the parent's
/// changes: the first of them is older than the site's own last write and must not move the
/// tag back, even for a moment (a pull in between would get the replaced image, and for as
/// long as the link then stays down).
#[tokio::test]
async fn a_readwrite_site_does_not_move_its_tag_back_to_its_own_older_write() {
    let (root_dir, site_dir, root, proxy, site) =
        readwrite_site_behind_proxy("site-echo", &["app"]).await;
    let admin = client_as("admin", ADMIN_PASSWORD);
    let r = root.base();
    let s = site.base();
    let site_admin = client_as("admin", SITE_PASSWORD);
    proxy
        .blocked
        .store(true, std::sync::atomic::Ordering::Relaxed);
    let _a = push_image(&site_admin, &s, "app", "t", "first").await;
    let b = push_image(&site_admin, &s, "app", "t", "second").await;
    proxy
        .blocked
        .store(false, std::sync::atomic::Ordering::Relaxed);
    eventually("app:t reaches the root as the second push", || async {
        tag_digest(&admin, &r, "app", "t").await.as_deref() == Some(b.as_str())
    })
    .await;
    // Until the feed has brought both writes back.
    feed_caught_up(root_dir.path(), site_dir.path()).await;
    assert_eq!(
        synced_tag_events(site_dir.path(), "t", 0).await,
        0,
        "the feed moved the site's tag (back to its own first push, then on)"
    );
    assert_eq!(
        tag_digest(&site_admin, &s, "app", "t").await.as_deref(),
        Some(b.as_str())
    );

    // Offline again: a tag set twice, then its second manifest deleted. Neither the second
    // write nor that manifest goes up, and the parent's tag still has the site's first
    // value when the removal arrives: that is no conflict.
    proxy
        .blocked
        .store(true, std::sync::atomic::Ordering::Relaxed);
    push_image(&site_admin, &s, "app", "u", "u-first").await;
    let second = push_image(&site_admin, &s, "app", "u", "u-second").await;
    let gone = site_admin
        .delete(format!("{s}/v2/app/manifests/{second}"))
        .send()
        .await
        .unwrap();
    assert_eq!(gone.status(), 202);
    proxy
        .blocked
        .store(false, std::sync::atomic::Ordering::Relaxed);
    push_image(&site_admin, &s, "app", "marker", "after").await;
    eventually("the marker reaches the root", || async {
        tag_digest(&admin, &r, "app", "marker").await.is_some()
    })
    .await;
    assert_eq!(tag_digest(&admin, &r, "app", "u").await, None);
    assert!(
        !site.log().contains("tag moved at the parent"),
        "a false conflict:\n{}",
        site.log()
    );

    // A tag the site has from the parent is moved there while the link is down, and removed
    // at the site meanwhile. The removal goes up first and wins (a conflict, reported); the
    // feed's older move must not set the tag at the site again, even for a moment.
    let x = push_image(&admin, &r, "app", "w", "w-root").await;
    eventually("app:w reaches the site", || async {
        tag_digest(&site_admin, &s, "app", "w").await.as_deref() == Some(x.as_str())
    })
    .await;
    let before = site_latest_event(site_dir.path()).await;
    proxy
        .blocked
        .store(true, std::sync::atomic::Ordering::Relaxed);
    push_image(&admin, &r, "app", "w", "w-moved").await;
    let gone = site_admin
        .delete(format!("{s}/v2/app/manifests/w"))
        .send()
        .await
        .unwrap();
    assert_eq!(gone.status(), 202);
    proxy
        .blocked
        .store(false, std::sync::atomic::Ordering::Relaxed);
    eventually("the removal reaches the root", || async {
        tag_digest(&admin, &r, "app", "w").await.is_none()
    })
    .await;
    feed_caught_up(root_dir.path(), site_dir.path()).await;
    assert_eq!(tag_digest(&site_admin, &s, "app", "w").await, None);
    assert_eq!(
        synced_tag_events(site_dir.path(), "w", before).await,
        0,
        "the feed set the tag the site had removed"
    );
    assert!(
        site.log()
            .contains("tag moved at the parent and removed at this site")
    );
}

/// A ReadWrite site's client removes a tag while the site is still applying a page of the
/// feed that moves the tag at the parent (an older change, made there before the removal). The
/// move must not set the tag again: the removal is on its way up and wins at the parent, whose
/// own record of it the site then skips as the echo of its write — the tag came back for good.
#[tokio::test]
async fn a_tag_removed_at_a_readwrite_site_while_the_feed_moves_it_stays_removed() {
    use std::sync::atomic::Ordering::Relaxed;
    let (root_dir, site_dir, root, proxy, site) =
        readwrite_site_behind_proxy("site-removal", &["app"]).await;
    let admin = client_as("admin", ADMIN_PASSWORD);
    let r = root.base();
    let s = site.base();
    let site_admin = client_as("admin", SITE_PASSWORD);
    pushed_to_site(&admin, &r, &site_admin, &s, "t", "removal-first").await;
    // While the link is down the root adds a large image, then moves the tag: one page of the
    // feed, whose first entry takes seconds over the slow link once it is back.
    proxy.blocked.store(true, Relaxed);
    support::push_big_image(&admin, &r, "app", "big", 4 << 20).await;
    push_image(&admin, &r, "app", "t", "removal-moved").await;
    proxy.rate.store(1 << 20, Relaxed);
    let before = proxy.downstream.load(Relaxed);
    proxy.blocked.store(false, Relaxed);
    eventually("the site is fetching the large image", || async {
        proxy.downstream.load(Relaxed) > before + (512 << 10)
    })
    .await;
    let gone = site_admin
        .delete(format!("{s}/v2/app/manifests/t"))
        .send()
        .await
        .unwrap();
    assert_eq!(gone.status(), 202);
    proxy.rate.store(0, Relaxed);
    eventually("the removal reaches the root", || async {
        tag_digest(&admin, &r, "app", "t").await.is_none()
    })
    .await;
    feed_caught_up(root_dir.path(), site_dir.path()).await;
    assert_eq!(
        tag_digest(&site_admin, &s, "app", "t").await,
        None,
        "the parent's older move set the removed tag again:\n{}",
        site.log()
    );
}

/// A ReadWrite site that tags a manifest the root deleted while the link was down keeps its
/// tag: the tag goes up and brings the manifest back at the root, and the root's deletion,
/// older than that write, must not take it from the site afterwards.
#[tokio::test]
async fn a_tag_set_at_a_readwrite_site_on_a_manifest_the_root_deleted_stays_at_the_site() {
    use std::sync::atomic::Ordering::Relaxed;
    let (root_dir, site_dir, root, proxy, site) =
        readwrite_site_behind_proxy("site-retag", &["app"]).await;
    let admin = client_as("admin", ADMIN_PASSWORD);
    let r = root.base();
    let s = site.base();
    let site_admin = client_as("admin", SITE_PASSWORD);
    let x = pushed_to_site(&admin, &r, &site_admin, &s, "a", "deleted-then-retagged").await;
    proxy.blocked.store(true, Relaxed);
    let gone = admin
        .delete(format!("{r}/v2/app/manifests/{x}"))
        .send()
        .await
        .unwrap();
    assert_eq!(gone.status(), 202);
    let oci = "application/vnd.oci.image.manifest.v1+json";
    let body = site_admin
        .get(format!("{s}/v2/app/manifests/a"))
        .header("accept", oci)
        .send()
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap();
    let put = site_admin
        .put(format!("{s}/v2/app/manifests/b"))
        .header("content-type", oci)
        .body(body)
        .send()
        .await
        .unwrap();
    assert_eq!(put.status(), 201);
    proxy.blocked.store(false, Relaxed);
    eventually("app:b reaches the root", || async {
        tag_digest(&admin, &r, "app", "b").await.as_deref() == Some(x.as_str())
    })
    .await;
    feed_caught_up(root_dir.path(), site_dir.path()).await;
    assert_eq!(
        tag_digest(&site_admin, &s, "app", "b").await.as_deref(),
        Some(x.as_str()),
        "the root's older deletion took the site's own tag:\n{}",
        site.log()
    );
    assert_eq!(tag_digest(&site_admin, &s, "app", "a").await, None);
}

/// A tag removed at the root while a ReadWrite site moved it offline: the site's write
/// reaches the root last and wins, and the removal it undid is reported, not lost silently.
#[tokio::test]
async fn a_removal_at_the_root_undone_by_a_sites_offline_move_is_reported() {
    use std::sync::atomic::Ordering::Relaxed;
    let (_root_dir, _site_dir, root, proxy, site) =
        readwrite_site_behind_proxy("site-undo", &["app"]).await;
    let admin = client_as("admin", ADMIN_PASSWORD);
    let r = root.base();
    let s = site.base();
    let site_admin = client_as("admin", SITE_PASSWORD);
    pushed_to_site(&admin, &r, &site_admin, &s, "t", "removed-at-root").await;
    proxy.blocked.store(true, Relaxed);
    let v2 = push_image(&site_admin, &s, "app", "t", "moved-at-site").await;
    let gone = admin
        .delete(format!("{r}/v2/app/manifests/t"))
        .send()
        .await
        .unwrap();
    assert_eq!(gone.status(), 202);
    proxy.blocked.store(false, Relaxed);
    eventually("the site's move reaches the root", || async {
        tag_digest(&admin, &r, "app", "t").await.as_deref() == Some(v2.as_str())
    })
    .await;
    eventually(
        "the root shows the removal the site's write undid",
        || async {
            let v: serde_json::Value = serde_json::from_str(&cli_ok(
                &root,
                &[
                    "connected-registry",
                    "show",
                    "-n",
                    "site-undo",
                    "-o",
                    "json",
                ],
            ))
            .unwrap();
            v["statusDetails"].as_array().unwrap().iter().any(|d| {
                d["code"] == "TagConflict"
                    && d["description"]
                        .as_str()
                        .unwrap()
                        .contains("app:t was removed at the parent")
            })
        },
    )
    .await;
}

/// A failure the site reported while it recovered (the link came back and a push of its was
/// refused in the same pass) does not stay at the root once the site syncs again.
#[tokio::test]
async fn a_recovered_link_failure_does_not_stay_at_the_root() {
    use std::sync::atomic::Ordering::Relaxed;
    let (_root_dir, _site_dir, root, proxy, site) =
        readwrite_site_behind_proxy("site-stale", &["app", "other"]).await;
    let s = site.base();
    let site_admin = client_as("admin", SITE_PASSWORD);
    eventually("the site takes pushes to other", || async {
        site_admin
            .post(format!("{s}/v2/other/blobs/uploads/"))
            .send()
            .await
            .unwrap()
            .status()
            == 202
    })
    .await;
    proxy.blocked.store(true, Relaxed);
    eventually("the site sees the parent unreachable", || async {
        site.log().contains("cannot reach the parent")
    })
    .await;
    // While the link is down, the root takes `other` out of the site's scope and the site's
    // client pushes there: the push is refused when it goes up.
    cli_ok(
        &root,
        &[
            "connected-registry",
            "permissions",
            "update",
            "-n",
            "site-stale",
            "--remove",
            "other",
        ],
    );
    push_image(&site_admin, &s, "other", "v1", "refused later").await;
    proxy.blocked.store(false, Relaxed);
    let details = || async {
        let v: serde_json::Value = serde_json::from_str(&cli_ok(
            &root,
            &[
                "connected-registry",
                "show",
                "-n",
                "site-stale",
                "-o",
                "json",
            ],
        ))
        .unwrap();
        v["statusDetails"]
            .as_array()
            .unwrap()
            .iter()
            .map(|d| d["code"].as_str().unwrap().to_string())
            .collect::<Vec<_>>()
    };
    eventually("the root shows the refused push", || async {
        details().await.iter().any(|c| c == "OutboxEntryRefused")
    })
    .await;
    eventually("the root no longer shows the link failure", || async {
        !details().await.iter().any(|c| c == "ParentUnreachable")
    })
    .await;
}

/// Pushes `app:<tag>` at the root (`r`) and waits until the site (`s`) serves it; returns its
/// digest.
async fn pushed_to_site(
    admin: &reqwest::Client,
    r: &str,
    site_admin: &reqwest::Client,
    s: &str,
    tag: &str,
    seed: &str,
) -> String {
    let digest = push_image(admin, r, "app", tag, seed).await;
    eventually(&format!("app:{tag} reaches the site"), || async {
        tag_digest(site_admin, s, "app", tag).await.as_deref() == Some(digest.as_str())
    })
    .await;
    digest
}

/// Waits until a site's feed cursor reaches the root's newest event.
async fn feed_caught_up(root_dir: &std::path::Path, site_dir: &std::path::Path) {
    let root_db = sqlx::SqlitePool::connect(&format!(
        "sqlite://{}?mode=ro",
        root_dir.join("meta.db").display()
    ))
    .await
    .unwrap();
    let root_latest: i64 = sqlx::query_scalar("SELECT max(seq) FROM events")
        .fetch_one(&root_db)
        .await
        .unwrap();
    root_db.close().await;
    let cursor = site_dir.join("sync").join("cursor");
    eventually("the site's feed has caught up", || async {
        std::fs::read_to_string(&cursor)
            .ok()
            .and_then(|c| c.split_whitespace().next()?.parse::<i64>().ok())
            .is_some_and(|c| c >= root_latest)
    })
    .await;
}

/// The newest event in a site's own log.
async fn site_latest_event(site_dir: &std::path::Path) -> i64 {
    let db = sqlx::SqlitePool::connect(&format!(
        "sqlite://{}?mode=ro",
        site_dir.join("meta.db").display()
    ))
    .await
    .unwrap();
    let latest: Option<i64> = sqlx::query_scalar("SELECT max(seq) FROM events")
        .fetch_one(&db)
        .await
        .unwrap();
    db.close().await;
    latest.unwrap_or(0)
}

/// How many changes sync made to `app:tag` at a site after event `after` of its log.
async fn synced_tag_events(site_dir: &std::path::Path, tag: &str, after: i64) -> i64 {
    let db = sqlx::SqlitePool::connect(&format!(
        "sqlite://{}?mode=ro",
        site_dir.join("meta.db").display()
    ))
    .await
    .unwrap();
    let n: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM events WHERE repo = 'app' AND tag = $1 AND origin = 'sync' \
         AND seq > $2",
    )
    .bind(tag)
    .bind(after)
    .fetch_one(&db)
    .await
    .unwrap();
    db.close().await;
    n
}

/// A link that drops after every 3 MiB sent: a piece as large as the first (4 MiB) never
/// gets through whole, and the parent keeps nothing of a cut piece. The site sends smaller
/// pieces after a cut, so the layer still arrives.
#[tokio::test]
async fn a_push_goes_up_over_a_link_that_drops_every_few_mib() {
    use std::sync::atomic::Ordering::Relaxed;
    const SIZE: usize = 8 << 20;
    let (_root_dir, _site_dir, root, proxy, site) =
        readwrite_site_behind_proxy("site-drops", &["app"]).await;
    let admin = client_as("admin", ADMIN_PASSWORD);
    let r = root.base();
    let site_admin = client_as("admin", SITE_PASSWORD);
    let layer = support::push_big_image(&site_admin, &site.base(), "app", "v1", SIZE).await;
    // From now on the link drops after every 3 MiB that goes up.
    let (up, cut) = (proxy.upstream.clone(), proxy.up_cut_at.clone());
    let dropper = tokio::spawn(async move {
        loop {
            if cut.load(Relaxed) == u64::MAX {
                cut.store(up.load(Relaxed) + (3 << 20), Relaxed);
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    });
    eventually("app:v1 reaches the root", || async {
        tag_digest(&admin, &r, "app", "v1").await.is_some()
    })
    .await;
    dropper.abort();
    assert_eq!(blob_len(&admin, &r, "app", &layer).await, Some(SIZE));
}

#[tokio::test]
async fn a_change_the_parent_refuses_is_reported_and_does_not_hold_up_the_rest() {
    let root_dir = tempfile::tempdir().unwrap();
    let site_dir = tempfile::tempdir().unwrap();
    // The root takes manifests of up to 4 KiB; the site, with the default, takes larger ones.
    let root = Outpost::start_env(root_dir.path(), &[("OUTPOST_MAX_MANIFEST_BYTES", "4096")]);
    let admin = client_as("admin", ADMIN_PASSWORD);
    let r = root.base();
    push_image(&admin, &r, "app", "base", "base").await;
    let cs = connected(
        &root,
        "site-skip",
        &["-m", "ReadWrite", "--repository", "app"],
    );
    let site = start_site(site_dir.path(), &cs);
    let s = site.base();
    let site_admin = client_as("admin", SITE_PASSWORD);
    eventually("the site has app:base", || async {
        tag_digest(&site_admin, &s, "app", "base").await.is_some()
    })
    .await;

    // A repository the site does not sync is refused at the site, at once and saying why:
    // taken, it would never reach the root.
    let resp = site_admin
        .post(format!("{s}/v2/other/blobs/uploads/"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 403);
    let text = resp.text().await.unwrap();
    assert!(
        text.contains("repository other is not synced by this connected registry")
            && text.contains("permissions update -n site-skip --add other"),
        "{text}"
    );

    // A push the parent will never take (a manifest over its size limit), then pushes it
    // will: the later ones must not wait behind the refused one.
    let config = br#"{"seed":"too-big"}"#.to_vec();
    let layer = b"a layer of the oversized image".to_vec();
    for blob in [&config, &layer] {
        push_blob(&site_admin, &s, "app", blob).await;
    }
    let big = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": sha256_hex(&config), "size": config.len()},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": sha256_hex(&layer), "size": layer.len()}],
        "annotations": {"padding": "x".repeat(6000)}
    });
    let resp = site_admin
        .put(format!("{s}/v2/app/manifests/too-big"))
        .header("content-type", "application/vnd.oci.image.manifest.v1+json")
        .body(serde_json::to_vec(&big).unwrap())
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 201);
    let first = push_image(&site_admin, &s, "app", "v2", "after-the-refused-one").await;
    eventually("app:v2 reaches the root", || async {
        tag_digest(&admin, &r, "app", "v2").await.as_deref() == Some(first.as_str())
    })
    .await;
    // The site moving its own tag again is not a conflict.
    let second = push_image(&site_admin, &s, "app", "v2", "moved-by-the-site").await;
    eventually("the moved app:v2 reaches the root", || async {
        tag_digest(&admin, &r, "app", "v2").await.as_deref() == Some(second.as_str())
    })
    .await;
    let show = || async {
        serde_json::from_str::<serde_json::Value>(&cli_ok(
            &root,
            &[
                "connected-registry",
                "show",
                "-n",
                "site-skip",
                "-o",
                "json",
            ],
        ))
        .unwrap()
    };
    eventually("the refusal is reported at the root", || async {
        let v = show().await;
        v["statusDetails"].as_array().is_some_and(|d| {
            d.iter().any(|x| {
                x["code"] == "OutboxEntryRefused"
                    && x["description"]
                        .as_str()
                        .is_some_and(|t| t.contains("app:too-big"))
            })
        }) && v["outboxDepth"] == 0
    })
    .await;
    let v = show().await;
    assert!(
        !v["statusDetails"].to_string().contains("TagConflict"),
        "a site moving its own tag is not a conflict: {v}"
    );
    assert_eq!(v["connectionState"], "Unhealthy", "{v}");
    // The root says so in its log, without anyone asking.
    eventually("the root logs that the site is unhealthy", || async {
        root.log()
            .contains("connected registry site-skip is Unhealthy: OutboxEntryRefused")
    })
    .await;

    // A refused change with nothing after it is reported too, without waiting for some
    // unrelated change to trigger a report.
    let mut big = big;
    big["annotations"]["padding"] = serde_json::json!("y".repeat(6000));
    let resp = site_admin
        .put(format!("{s}/v2/app/manifests/too-big-again"))
        .header("content-type", "application/vnd.oci.image.manifest.v1+json")
        .body(serde_json::to_vec(&big).unwrap())
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 201);
    eventually("the last refusal is reported at the root", || async {
        show().await["statusDetails"].as_array().is_some_and(|d| {
            d.iter().any(|x| {
                x["description"]
                    .as_str()
                    .is_some_and(|t| t.contains("app:too-big-again"))
            })
        })
    })
    .await;

    // A repository that leaves a ReadWrite site's scope is kept there, and what was kept can
    // be deleted at the site: the delete stays local (the root no longer syncs it with this
    // site, and would refuse it).
    let perms = |flag: &str| {
        cli_ok(
            &root,
            &[
                "connected-registry",
                "permissions",
                "update",
                "-n",
                "site-skip",
                flag,
                "kept",
            ],
        )
    };
    perms("--add");
    eventually("the site takes pushes to kept", || async {
        let resp = site_admin
            .post(format!("{s}/v2/kept/blobs/uploads/"))
            .send()
            .await
            .unwrap();
        resp.status() == 202
    })
    .await;
    let d = push_image(&site_admin, &s, "kept", "v1", "kept at the site").await;
    eventually("kept:v1 reaches the root", || async {
        tag_digest(&admin, &r, "kept", "v1").await.as_deref() == Some(d.as_str())
    })
    .await;
    perms("--remove");
    eventually("the site refuses pushes to kept again", || async {
        let resp = site_admin
            .post(format!("{s}/v2/kept/blobs/uploads/"))
            .send()
            .await
            .unwrap();
        resp.status() == 403
    })
    .await;
    assert_eq!(
        tag_digest(&site_admin, &s, "kept", "v1").await.as_deref(),
        Some(d.as_str()),
        "a ReadWrite site keeps a repository that left its scope"
    );
    assert!(
        site.log().contains("repositories left this site's scope"),
        "the site does not say a repository left its scope:\n{}",
        site.log()
    );
    let resp = site_admin
        .delete(format!("{s}/v2/kept/manifests/{d}"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 202, "{}", resp.text().await.unwrap());
    assert_eq!(tag_digest(&site_admin, &s, "kept", "v1").await, None);
    // A change after it goes up as usual, and the delete was not sent nor refused.
    let after = push_image(&site_admin, &s, "app", "v3", "after the local delete").await;
    eventually("app:v3 reaches the root", || async {
        tag_digest(&admin, &r, "app", "v3").await.as_deref() == Some(after.as_str())
    })
    .await;
    assert_eq!(
        tag_digest(&admin, &r, "kept", "v1").await.as_deref(),
        Some(d.as_str())
    );
    eventually("the site reports an empty outbox", || async {
        show().await["outboxDepth"] == 0
    })
    .await;
    let v = show().await;
    assert!(!v["statusDetails"].to_string().contains("kept"), "{v}");
}

#[tokio::test]
async fn repositories_added_to_the_scope_arrive_with_what_they_already_hold() {
    let root_dir = tempfile::tempdir().unwrap();
    let site_dir = tempfile::tempdir().unwrap();
    let root = Outpost::start(root_dir.path(), &[]);
    let admin = client_as("admin", ADMIN_PASSWORD);
    let r = root.base();
    let app = push_image(&admin, &r, "app", "v1", "app").await;
    let extra = push_image(&admin, &r, "extra", "v1", "pushed long before").await;
    let later = push_image(&admin, &r, "later", "v1", "added while stopped").await;
    let cs = connected(&root, "site-grow", &["--repository", "app"]);
    let site = start_site(site_dir.path(), &cs);
    let s = site.base();
    let site_admin = client_as("admin", SITE_PASSWORD);
    eventually("the site has app:v1", || async {
        tag_digest(&site_admin, &s, "app", "v1").await.as_deref() == Some(app.as_str())
    })
    .await;
    assert_eq!(tag_digest(&site_admin, &s, "extra", "v1").await, None);

    // Added while the site runs: it fetches what the repository already holds, though no
    // message about it will ever come.
    cli_ok(
        &root,
        &[
            "connected-registry",
            "permissions",
            "update",
            "-n",
            "site-grow",
            "--add",
            "extra",
        ],
    );
    eventually("extra:v1 arrives", || async {
        tag_digest(&site_admin, &s, "extra", "v1").await.as_deref() == Some(extra.as_str())
    })
    .await;

    // Stops the site, changes its repositories at the root (`--add` or `--remove` one),
    // writes `damage` (path, contents) into its data directory, and starts it again.
    let rescoped_while_stopped =
        |site: Outpost, damage: &[(&str, &str)], change: &str, repo: &str| {
            site.terminate();
            cli_ok(
                &root,
                &[
                    "connected-registry",
                    "permissions",
                    "update",
                    "-n",
                    "site-grow",
                    change,
                    repo,
                ],
            );
            for (path, contents) in damage {
                std::fs::write(site_dir.path().join(path), contents).unwrap();
            }
            start_site(site_dir.path(), &cs)
        };
    // Added while the site is stopped: fetched after the restart.
    let site = rescoped_while_stopped(site, &[], "--add", "later");
    let s = site.base();
    eventually("later:v1 arrives after the restart", || async {
        tag_digest(&site_admin, &s, "later", "v1").await.as_deref() == Some(later.as_str())
    })
    .await;

    // Added while stopped, with the saved configuration damaged (it is what the restart
    // compares with): the site reconciles everything in scope instead of missing it.
    let last = push_image(&admin, &r, "last", "v1", "added to a damaged site").await;
    let damage = [("sync/config.json", "{\"name\": tru")];
    let site = rescoped_while_stopped(site, &damage, "--add", "last");
    let s = site.base();
    eventually("last:v1 arrives despite the damaged state", || async {
        tag_digest(&site_admin, &s, "last", "v1").await.as_deref() == Some(last.as_str())
    })
    .await;
    // Removed while stopped: this ReadOnly site deletes it once started (the smaller scope
    // arrives as its first configuration, not as a change to one).
    let site = rescoped_while_stopped(site, &[], "--remove", "later");
    let s = site.base();
    eventually("later is deleted after the restart", || async {
        tag_digest(&site_admin, &s, "later", "v1").await.is_none()
    })
    .await;
    assert_eq!(
        tag_digest(&site_admin, &s, "last", "v1").await.as_deref(),
        Some(last.as_str())
    );
    site.terminate();
    // With the parent gone as well, the start fails naming the file, not the parent alone.
    std::fs::write(site_dir.path().join("sync/config.json"), "").unwrap();
    drop(root);
    let err = failing_site_in(site_dir.path(), &cs);
    assert!(
        err.contains("config.json") && err.contains("unreadable"),
        "{err}"
    );
}

#[tokio::test]
async fn a_site_follows_the_log_level_set_at_its_parent() {
    let root_dir = tempfile::tempdir().unwrap();
    let site_dir = tempfile::tempdir().unwrap();
    let root = Outpost::start(root_dir.path(), &[]);
    let admin = client_as("admin", ADMIN_PASSWORD);
    let r = root.base();
    let v1 = push_image(&admin, &r, "app", "v1", "logs-one").await;
    let cs = connected(
        &root,
        "site-logs",
        &["--repository", "app", "--log-level", "Debug"],
    );
    // Started without a local log level: the parent's applies.
    let site = start_site(site_dir.path(), &cs);
    let s = site.base();
    let site_admin = client_as("admin", SITE_PASSWORD);
    eventually("app:v1 arrives", || async {
        tag_digest(&site_admin, &s, "app", "v1").await.as_deref() == Some(v1.as_str())
    })
    .await;
    eventually("the site logs at Debug", || async {
        site.log().contains(" DEBUG ")
    })
    .await;

    cli_ok(
        &root,
        &[
            "connected-registry",
            "update",
            "-n",
            "site-logs",
            "--log-level",
            "Warning",
        ],
    );
    eventually("the site applies Warning", || async {
        site.log()
            .contains("applying the log level set at the parent level=Warning")
    })
    .await;
    let mark = site.log().lines().count();
    let v2 = push_image(&admin, &r, "app", "v2", "logs-two").await;
    eventually("app:v2 arrives", || async {
        tag_digest(&site_admin, &s, "app", "v2").await.as_deref() == Some(v2.as_str())
    })
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let log = site.log();
    let after: Vec<&str> = log.lines().skip(mark).collect();
    assert!(
        after
            .iter()
            .all(|l| !l.contains(" DEBUG ") && !l.contains(" INFO ")),
        "nothing below Warning after the change:\n{}",
        after.join("\n")
    );
}

#[tokio::test]
async fn a_deactivated_site_stops_syncing_until_it_restarts() {
    let root_dir = tempfile::tempdir().unwrap();
    let site_dir = tempfile::tempdir().unwrap();
    let root = Outpost::start(root_dir.path(), &[]);
    let admin = client_as("admin", ADMIN_PASSWORD);
    let r = root.base();
    let v1 = push_image(&admin, &r, "app", "v1", "before").await;
    let cs = connected(&root, "site-deact", &["--repository", "app"]);
    // Long-polls of a minute: the deactivation ends the one under way, it is not noticed
    // only when the poll ends by itself.
    let site = start_site_polling(site_dir.path(), &cs, "60");
    let s = site.base();
    let site_admin = client_as("admin", SITE_PASSWORD);
    eventually("the site has app:v1", || async {
        tag_digest(&site_admin, &s, "app", "v1").await.as_deref() == Some(v1.as_str())
    })
    .await;

    cli_ok(
        &root,
        &[
            "connected-registry",
            "deactivate",
            "-n",
            "site-deact",
            "--yes",
        ],
    );
    eventually("the site notices", || async {
        site.log().contains("was deactivated at the parent")
    })
    .await;
    let v2 = push_image(&admin, &r, "app", "v2", "after").await;
    // Two poll periods later: nothing synced, and the site did not activate itself again.
    tokio::time::sleep(Duration::from_secs(11)).await;
    assert_eq!(tag_digest(&site_admin, &s, "app", "v2").await, None);
    assert_eq!(
        tag_digest(&site_admin, &s, "app", "v1").await.as_deref(),
        Some(v1.as_str()),
        "it keeps serving what it has"
    );
    let v: serde_json::Value = serde_json::from_str(&cli_ok(
        &root,
        &[
            "connected-registry",
            "show",
            "-n",
            "site-deact",
            "-o",
            "json",
        ],
    ))
    .unwrap();
    assert_ne!(v["activationStatus"], "Active", "{v}");
    // The site's own status page says so too.
    let page = reqwest::get(format!("{s}/status"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        page.contains("<tr><th>Problems</th><td>Deactivated</td></tr>"),
        "{page}"
    );
    // The table says what is wrong too, in full, below the row.
    let table = cli_ok(&root, &["connected-registry", "show", "-n", "site-deact"]);
    assert!(
        table.contains("LAST HEARD (UTC)")
            && table.contains("\nDeactivated: the resource was deactivated"),
        "{table}"
    );

    // A restart activates again and catches up.
    site.terminate();
    let site = start_site(site_dir.path(), &cs);
    let s = site.base();
    eventually("app:v2 arrives after the restart", || async {
        tag_digest(&site_admin, &s, "app", "v2").await.as_deref() == Some(v2.as_str())
    })
    .await;
    let connected =
        || async { support::metric(&support::metrics(&s).await, "outpost_sync_parent_connected") };
    assert_eq!(connected().await, Some(1));
    // Its password generated again at the root: the parent answers, but refuses every
    // request, and the site's metric says the exchange fails (as for an unreachable parent).
    cli_ok(
        &root,
        &[
            "connected-registry",
            "get-settings",
            "-n",
            "site-deact",
            "--parent-protocol",
            "http",
            "--generate-password",
            "1",
            "--yes",
        ],
    );
    eventually("the site hears its password refused", || async {
        site.log().contains("refused the password")
    })
    .await;
    eventually("the site's parent_connected metric drops to 0", || async {
        connected().await == Some(0)
    })
    .await;
}

#[tokio::test]
async fn referrers_travel_with_their_subject() {
    let root_dir = tempfile::tempdir().unwrap();
    let site_dir = tempfile::tempdir().unwrap();
    let root = Outpost::start(root_dir.path(), &[]);
    let admin = client_as("admin", ADMIN_PASSWORD);
    let r = root.base();
    let subject = push_image(&admin, &r, "app", "v1", "signed").await;
    push_signature(&admin, &r, "app", &subject).await;
    let cs = connected(&root, "site-ref", &["--repository", "app"]);
    let site = start_site(site_dir.path(), &cs);
    let s = site.base();
    let site_admin = client_as("admin", SITE_PASSWORD);
    eventually("the referrer is at the site", || async {
        has_signature(&site_admin, &s, "app", &subject).await
    })
    .await;
}

/// A full reconciliation (a new site, `resync`, an expired cursor) brings what no tag reaches
/// and takes away what was deleted by digest: a site that reconciled holds what one that
/// followed the feed holds.
#[tokio::test]
async fn a_full_reconciliation_covers_untagged_manifests() {
    let root_dir = tempfile::tempdir().unwrap();
    let site_dir = tempfile::tempdir().unwrap();
    let root = Outpost::start(root_dir.path(), &[]);
    let admin = client_as("admin", ADMIN_PASSWORD);
    let r = root.base();
    let subject = push_image(&admin, &r, "app", "v1", "reconciled").await;
    let signature = push_signature(&admin, &r, "app", &subject).await;
    // Pushed by digest only: a signature whose subject is not (yet) there.
    let absent = format!("sha256:{}", "ab".repeat(32));
    let orphan = push_signature(&admin, &r, "app", &absent).await;
    let cs = connected(&root, "site-untagged", &["--repository", "app"]);
    let site = start_site(site_dir.path(), &cs);
    let s = site.base();
    let local = client_as("admin", SITE_PASSWORD);
    eventually("the site has app:v1 and its signature", || async {
        has_signature(&local, &s, "app", &subject).await
    })
    .await;
    eventually(
        "the site has the untagged signature of an absent subject",
        || async { has_signature(&local, &s, "app", &absent).await },
    )
    .await;
    let cursor = site_dir.path().join("sync").join("cursor");
    eventually("the site saved its cursor", || async { cursor.exists() }).await;
    site.terminate();

    // While the site is away: the signature is withdrawn, and a resync is asked for (which
    // reconciles instead of reading the feed that carries the deletion).
    let gone = admin
        .delete(format!("{r}/v2/app/manifests/{signature}"))
        .send()
        .await
        .unwrap();
    assert_eq!(gone.status(), 202);
    cli_ok(
        &root,
        &["connected-registry", "resync", "-n", "site-untagged"],
    );
    let site = start_site(site_dir.path(), &cs);
    let s = site.base();
    eventually("the withdrawn signature is gone from the site", || async {
        !has_signature(&local, &s, "app", &subject).await
    })
    .await;
    let get = |d: String| {
        let (local, s) = (local.clone(), s.clone());
        async move {
            local
                .get(format!("{s}/v2/app/manifests/{d}"))
                .header("accept", "application/vnd.oci.image.manifest.v1+json")
                .send()
                .await
                .unwrap()
                .status()
        }
    };
    assert_eq!(get(signature).await, 404);
    assert_eq!(get(orphan).await, 200);
    assert_eq!(
        tag_digest(&local, &s, "app", "v1").await.as_deref(),
        Some(subject.as_str())
    );
}

/// Pushes an untagged signature-like artifact whose subject is `repo@subject`; returns its
/// digest.
async fn push_signature(admin: &reqwest::Client, r: &str, repo: &str, subject: &str) -> String {
    let empty = b"{}".to_vec();
    support::push_blob(admin, r, repo, &empty).await;
    let sig = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "artifactType": "application/vnd.example.signature",
        "config": {"mediaType": "application/vnd.oci.empty.v1+json", "digest": "sha256:44136fa355b3678a1146ad16f7e8649e94fb4fc21fe77e8310c060f61caaff8a", "size": 2},
        "layers": [],
        "subject": {"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": subject, "size": 1}
    });
    let bytes = serde_json::to_vec(&sig).unwrap();
    let put = admin
        .put(format!(
            "{r}/v2/{repo}/manifests/sha256:{}",
            hex::encode(<sha2::Sha256 as sha2::Digest>::digest(&bytes))
        ))
        .header("content-type", "application/vnd.oci.image.manifest.v1+json")
        .body(bytes.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(put.status(), 201);
    format!(
        "sha256:{}",
        hex::encode(<sha2::Sha256 as sha2::Digest>::digest(&bytes))
    )
}

/// Whether the referrers API at `base` lists a signature for `repo@subject`.
async fn has_signature(c: &reqwest::Client, base: &str, repo: &str, subject: &str) -> bool {
    let r = c
        .get(format!("{base}/v2/{repo}/referrers/{subject}"))
        .send()
        .await
        .unwrap();
    r.status() == 200
        && r.text()
            .await
            .unwrap()
            .contains("application/vnd.example.signature")
}

/// A repository added for a ReadOnly child reaches its ReadWrite parent with read actions
/// only. That site syncs it, but refuses its clients' changes to it: its own parent would
/// refuse them going up, and they would be dropped after the client was told they were taken.
#[tokio::test]
async fn a_readwrite_site_refuses_changes_to_a_repository_it_syncs_read_only() {
    let root_dir = tempfile::tempdir().unwrap();
    let site_dir = tempfile::tempdir().unwrap();
    let root = Outpost::start(root_dir.path(), &[]);
    let admin = client_as("admin", ADMIN_PASSWORD);
    let r = root.base();
    let v1 = push_image(&admin, &r, "other", "v1", "read-only-here").await;
    let site_cs = connected(
        &root,
        "site-rw",
        &["-m", "ReadWrite", "--repository", "app"],
    );
    cli_ok(
        &root,
        &[
            "connected-registry",
            "create",
            "-n",
            "line-ro",
            "-p",
            "site-rw",
            "--repository",
            "app",
        ],
    );
    cli_ok(
        &root,
        &[
            "connected-registry",
            "permissions",
            "update",
            "-n",
            "line-ro",
            "--add",
            "other",
        ],
    );
    let site = start_site(site_dir.path(), &site_cs);
    let s = site.base();
    let site_admin = client_as("admin", SITE_PASSWORD);
    eventually("the site syncs other:v1 for its child", || async {
        tag_digest(&site_admin, &s, "other", "v1").await.as_deref() == Some(v1.as_str())
    })
    .await;
    let start_upload = || async {
        site_admin
            .post(format!("{s}/v2/other/blobs/uploads/"))
            .send()
            .await
            .unwrap()
    };
    let refused = start_upload().await;
    assert_eq!(refused.status(), 403);
    let text = refused.text().await.unwrap();
    assert!(
        text.contains("synced read-only") && text.contains("--add other"),
        "{text}"
    );
    let removal = site_admin
        .delete(format!("{s}/v2/other/manifests/v1"))
        .send()
        .await
        .unwrap();
    assert_eq!(removal.status(), 403);
    assert_eq!(
        tag_digest(&site_admin, &s, "other", "v1").await.as_deref(),
        Some(v1.as_str())
    );

    // What the message advises gives the site write access, and its push goes up.
    cli_ok(
        &root,
        &[
            "connected-registry",
            "permissions",
            "update",
            "-n",
            "site-rw",
            "--add",
            "other",
        ],
    );
    eventually("the site takes pushes to other", || async {
        start_upload().await.status() == 202
    })
    .await;
    let v2 = push_image(&site_admin, &s, "other", "v2", "written-at-the-site").await;
    eventually("the site's push reaches the root", || async {
        tag_digest(&admin, &r, "other", "v2").await.as_deref() == Some(v2.as_str())
    })
    .await;
}

#[tokio::test]
async fn a_three_level_hierarchy_root_site_line() {
    let root_dir = tempfile::tempdir().unwrap();
    let site_dir = tempfile::tempdir().unwrap();
    let line_dir = tempfile::tempdir().unwrap();
    let root = Outpost::start(root_dir.path(), &[]);
    let admin = client_as("admin", ADMIN_PASSWORD);
    let r = root.base();
    let v1 = push_image(&admin, &r, "app", "v1", "deep-one").await;
    let site_cs = connected(
        &root,
        "site-mid",
        &["-m", "ReadWrite", "--repository", "app"],
    );
    // A client token of the line: it must authenticate at the line, two levels down.
    let line_reader_pw = read_token(&root, "line-reader", "app");
    cli_ok(
        &root,
        &[
            "connected-registry",
            "create",
            "-n",
            "line-leaf",
            "-p",
            "site-mid",
            "--repository",
            "app",
            "--client-tokens",
            "line-reader",
        ],
    );
    let site = start_site(site_dir.path(), &site_cs);
    // The line's parent endpoint is the site's login server, known once the site reported it.
    let line_cs = child_of_site(&root, &site, "site-mid", "line-leaf").await;
    let site_admin = client_as("admin", SITE_PASSWORD);
    let line = start_site(line_dir.path(), line_cs.trim());
    let l = line.base();
    eventually("the leaf has app:v1 through the site", || async {
        tag_digest(&site_admin, &l, "app", "v1").await.as_deref() == Some(v1.as_str())
    })
    .await;
    let line_reader = client_as("line-reader", &line_reader_pw);
    eventually("the line's own client token works at the line", || async {
        tag_digest(&line_reader, &l, "app", "v1").await.as_deref() == Some(v1.as_str())
    })
    .await;
    assert_eq!(
        tag_digest(&line_reader, &site.base(), "app", "v1").await,
        None,
        "the line's client token does not open the site it is relayed through"
    );
    // A push at the root travels root → site → line.
    let v2 = push_image(&admin, &r, "app", "v2", "deep-two").await;
    eventually("app:v2 reaches the leaf", || async {
        tag_digest(&site_admin, &l, "app", "v2").await.as_deref() == Some(v2.as_str())
    })
    .await;
    // A push at the (ReadWrite) site reaches the root, and the leaf.
    let site_url = site.base();
    let v3 = push_image(&site_admin, &site_url, "app", "v3", "from-the-site").await;
    eventually("the site's push reaches root and leaf", || async {
        tag_digest(&admin, &r, "app", "v3").await.as_deref() == Some(v3.as_str())
            && tag_digest(&site_admin, &l, "app", "v3").await.as_deref() == Some(v3.as_str())
    })
    .await;
    // The root sees the whole tree's health, the leaf included (relayed by the site).
    eventually("the root sees the leaf online", || async {
        let v: serde_json::Value = serde_json::from_str(&cli_ok(
            &root,
            &[
                "connected-registry",
                "show",
                "-n",
                "line-leaf",
                "-o",
                "json",
            ],
        ))
        .unwrap();
        v["activationStatus"] == "Active"
            && v["connectionState"] == "Online"
            && v["loginServer"] == line.addr.as_str()
    })
    .await;
    let denied = site_admin
        .post(format!("{l}/v2/app/blobs/uploads/"))
        .send()
        .await
        .unwrap();
    assert_eq!(denied.status(), 403);

    // The root away while the line syncs: what the line reported meanwhile (a newer last sync
    // time) reaches the root with the next report the site relays once it is back.
    let show_line = |root: &Outpost| {
        serde_json::from_str::<serde_json::Value>(&cli_ok(
            root,
            &[
                "connected-registry",
                "show",
                "-n",
                "line-leaf",
                "-o",
                "json",
            ],
        ))
        .unwrap()["lastSyncTime"]
            .as_str()
            .unwrap_or_default()
            .to_string()
    };
    // The root hangs (it takes connections and never answers): the site relays the line's
    // status reports upward only so long, and goes on serving the line from its own state.
    let signal = |sig: &str| {
        let ok = std::process::Command::new("kill")
            .args([sig, &root.child.id().to_string()])
            .status()
            .unwrap()
            .success();
        assert!(ok, "kill {sig}");
    };
    signal("-STOP");
    let v5 = push_image(&site_admin, &site_url, "app", "v5", "root-hangs-1").await;
    eventually("app:v5 reaches the leaf while the root hangs", || async {
        tag_digest(&site_admin, &l, "app", "v5").await.as_deref() == Some(v5.as_str())
    })
    .await;
    // The line's next round starts with a status report, which the site relays.
    let v6 = push_image(&site_admin, &site_url, "app", "v6", "root-hangs-2").await;
    eventually("app:v6 reaches the leaf while the root hangs", || async {
        tag_digest(&site_admin, &l, "app", "v6").await.as_deref() == Some(v6.as_str())
    })
    .await;
    signal("-CONT");

    let known = show_line(&root);
    let root_addr = root.addr.clone();
    drop(root);
    // Sync times have whole seconds: the next one is later than what the root knows.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let v4 = push_image(
        &site_admin,
        &site_url,
        "app",
        "v4",
        "while-the-root-is-away",
    )
    .await;
    eventually("app:v4 reaches the leaf", || async {
        tag_digest(&site_admin, &l, "app", "v4").await.as_deref() == Some(v4.as_str())
    })
    .await;
    let line_at_site = || async {
        site_admin
            .get(format!("{site_url}/api/v1/connected-registries/line-leaf"))
            .send()
            .await
            .unwrap()
            .json::<serde_json::Value>()
            .await
            .unwrap()["lastSyncTime"]
            .as_str()
            .unwrap_or_default()
            .to_string()
    };
    eventually("the site has the line's sync of app:v4", || async {
        line_at_site().await > known
    })
    .await;
    let synced = line_at_site().await;
    let root = Outpost::start_listen(root_dir.path(), &root_addr, &[]);
    eventually("the root has the line's newer sync time", || async {
        show_line(&root) >= synced
    })
    .await;

    // Deactivated at the root, two levels up: the site passes it on and the line stops.
    cli_ok(
        &root,
        &[
            "connected-registry",
            "deactivate",
            "-n",
            "line-leaf",
            "--yes",
        ],
    );
    eventually("the line learns it was deactivated", || async {
        line.log().contains("was deactivated at the parent")
    })
    .await;
}

/// ReadWrite under ReadWrite: a push at the line goes up through the site to the root, and a
/// push at the root comes down both levels.
#[tokio::test]
async fn a_readwrite_line_under_a_readwrite_site_sends_pushes_to_the_root() {
    let root_dir = tempfile::tempdir().unwrap();
    let site_dir = tempfile::tempdir().unwrap();
    let line_dir = tempfile::tempdir().unwrap();
    let root = Outpost::start(root_dir.path(), &[]);
    let admin = client_as("admin", ADMIN_PASSWORD);
    let r = root.base();
    let site_cs = connected(
        &root,
        "rw-mid",
        &[
            "-m",
            "ReadWrite",
            "--repository",
            "app",
            "--notifications",
            "app:from-root:*",
        ],
    );
    cli_ok(
        &root,
        &[
            "connected-registry",
            "create",
            "-n",
            "rw-line",
            "-p",
            "rw-mid",
            "-m",
            "ReadWrite",
            "--repository",
            "app",
            "--notifications",
            "app:*:push",
        ],
    );
    let site = start_site(site_dir.path(), &site_cs);
    let line_cs = child_of_site(&root, &site, "rw-mid", "rw-line").await;
    let line = start_site(line_dir.path(), line_cs.trim());
    let (s, l) = (site.base(), line.base());
    let local = client_as("admin", SITE_PASSWORD);

    let from_line = push_image(&local, &l, "app", "from-line", "pushed-at-the-line").await;
    eventually("the line's push reaches the site and the root", || async {
        tag_digest(&local, &s, "app", "from-line").await.as_deref() == Some(from_line.as_str())
            && tag_digest(&admin, &r, "app", "from-line").await.as_deref()
                == Some(from_line.as_str())
    })
    .await;
    let from_root = push_image(&admin, &r, "app", "from-root", "pushed-at-the-root").await;
    eventually("the root's push reaches the line", || async {
        tag_digest(&local, &l, "app", "from-root").await.as_deref() == Some(from_root.as_str())
    })
    .await;
    // A tag removed at the line is removed up the chain.
    assert_eq!(
        local
            .delete(format!("{l}/v2/app/manifests/from-line"))
            .send()
            .await
            .unwrap()
            .status(),
        202
    );
    eventually("the removal reaches the root", || async {
        tag_digest(&admin, &r, "app", "from-line").await.is_none()
    })
    .await;

    // Notifications: the line's pushes (its own and those synced to it) reach the root through
    // the site; its tag removal does not match its pattern. The site notifies only its pattern's tag.
    let notes = |name: &'static str| {
        let v: serde_json::Value = serde_json::from_str(&cli_ok(
            &root,
            &[
                "connected-registry",
                "list-notifications",
                "-n",
                name,
                "-o",
                "json",
            ],
        ))
        .unwrap();
        v.as_array()
            .unwrap()
            .iter()
            .map(|n| {
                format!(
                    "{} {}:{}@{}",
                    n["action"].as_str().unwrap(),
                    n["repository"].as_str().unwrap(),
                    n["tag"].as_str().unwrap_or(""),
                    n["digest"].as_str().unwrap_or("")
                )
            })
            .collect::<Vec<String>>()
    };
    let pushed_line = format!("push app:from-line@{from_line}");
    let pushed_root = format!("push app:from-root@{from_root}");
    eventually("the line's notifications reach the root", || async {
        let n = notes("rw-line");
        n.contains(&pushed_line) && n.contains(&pushed_root)
    })
    .await;
    eventually("the site's notification reaches the root", || async {
        notes("rw-mid") == [pushed_root.clone()]
    })
    .await;
    // Notifications go up in order: once a later push's has arrived, a (wrong) one for the
    // earlier tag removal would have too.
    let fence = push_image(&local, &l, "app", "fence", "after-the-removal").await;
    let pushed_fence = format!("push app:fence@{fence}");
    eventually("the fence's notification reaches the root", || async {
        notes("rw-line").contains(&pushed_fence)
    })
    .await;
    assert!(
        notes("rw-line").iter().all(|n| n.starts_with("push ")),
        "{:?}",
        notes("rw-line")
    );
    let table = cli_ok(
        &root,
        &["connected-registry", "list-notifications", "-n", "rw-mid"],
    );
    assert!(
        table.contains("SEQ") && table.contains("app:from-root"),
        "{table}"
    );
}

/// `resync` repairs a site whose local state lost something the feed will not send again (here
/// a tag removed from its database by hand, as a restore from an old backup would).
#[tokio::test]
async fn resync_repairs_what_the_feed_will_not_resend() {
    let root_dir = tempfile::tempdir().unwrap();
    let site_dir = tempfile::tempdir().unwrap();
    let root = Outpost::start(root_dir.path(), &[]);
    let admin = client_as("admin", ADMIN_PASSWORD);
    let r = root.base();
    let v1 = push_image(&admin, &r, "app", "v1", "resync-one").await;
    let cs = connected(&root, "site-resync", &["--repository", "app"]);
    let site = start_site(site_dir.path(), &cs);
    let local = client_as("admin", SITE_PASSWORD);
    let s = site.base();
    eventually("the site has app:v1", || async {
        tag_digest(&local, &s, "app", "v1").await.is_some()
    })
    .await;
    // Killed only once the first sync saved its cursor (else the restart reconciles anyway).
    let cursor = site_dir.path().join("sync").join("cursor");
    eventually("the site saved its cursor", || async { cursor.exists() }).await;
    site.kill9();
    let url = format!("sqlite://{}", site_dir.path().join("meta.db").display());
    let db = sqlx::SqlitePool::connect(&url).await.unwrap();
    sqlx::query("DELETE FROM tags WHERE name = 'v1'")
        .execute(&db)
        .await
        .unwrap();
    db.close().await;

    // The feed carries only what changes: v2 arrives, the lost v1 does not. (A minute's
    // long-poll: the resync below must end it, not wait for it.)
    let site = start_site_polling(site_dir.path(), &cs, "60");
    let s = site.base();
    let v2 = push_image(&admin, &r, "app", "v2", "resync-two").await;
    eventually("app:v2 arrives", || async {
        tag_digest(&local, &s, "app", "v2").await.as_deref() == Some(v2.as_str())
    })
    .await;
    assert_eq!(tag_digest(&local, &s, "app", "v1").await, None);

    cli_ok(
        &root,
        &["connected-registry", "resync", "-n", "site-resync"],
    );
    eventually("the resync brings app:v1 back", || async {
        tag_digest(&local, &s, "app", "v1").await.as_deref() == Some(v1.as_str())
    })
    .await;
    assert!(
        site.log().contains("the parent asked for a resync"),
        "the site does not say why it reconciles:\n{}",
        site.log()
    );
    eventually("the root no longer shows the resync pending", || async {
        let v: serde_json::Value = serde_json::from_str(&cli_ok(
            &root,
            &[
                "connected-registry",
                "show",
                "-n",
                "site-resync",
                "-o",
                "json",
            ],
        ))
        .unwrap();
        v["syncState"].is_string()
            && v["syncState"] != "Pending"
            && v["connectionState"] == "Online"
    })
    .await;
}

/// An image the parent lists but cannot serve (a layer file lost there) is skipped and
/// reported, instead of being retried in a loop that holds up everything after it — in the
/// first full sync and in the feed — and arrives once the parent is repaired.
#[tokio::test]
async fn an_image_the_parent_cannot_serve_is_skipped_and_arrives_once_repaired() {
    let root_dir = tempfile::tempdir().unwrap();
    let site_dir = tempfile::tempdir().unwrap();
    let root = Outpost::start(root_dir.path(), &[]);
    let admin = client_as("admin", ADMIN_PASSWORD);
    let r = root.base();
    // The layer `push_image` makes from a seed, and losing its file at the root.
    let layer = support::seed_layer;
    let lose = |seed: &str| {
        let path = support::blob_file(root_dir.path(), &support::sha256_hex(&layer(seed)));
        std::fs::remove_file(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    };
    let good = push_image(&admin, &r, "app", "good", "skip-good").await;
    let broken = push_image(&admin, &r, "app", "broken", "skip-broken").await;
    lose("skip-broken");
    // A HEAD answers for the file too, so a client pushing the image again uploads the layer.
    let lost = support::sha256_hex(&layer("skip-broken"));
    let head = admin
        .head(format!("{r}/v2/app/blobs/{lost}"))
        .send()
        .await
        .unwrap();
    assert_eq!(head.status(), 404);
    eventually("the root logs the damage", || async {
        root.log()
            .contains("a linked blob has no file in the store")
    })
    .await;
    let cs = connected(&root, "site-skip", &["--repository", "app"]);
    let site = start_site(site_dir.path(), &cs);
    let local = client_as("admin", SITE_PASSWORD);
    let s = site.base();
    eventually("the good image arrives", || async {
        tag_digest(&local, &s, "app", "good").await.as_deref() == Some(good.as_str())
    })
    .await;
    // The first sync finished and the feed is followed: a later push arrives.
    let later = push_image(&admin, &r, "app", "later", "skip-later").await;
    eventually("a later push arrives", || async {
        tag_digest(&local, &s, "app", "later").await.as_deref() == Some(later.as_str())
    })
    .await;
    assert_eq!(tag_digest(&local, &s, "app", "broken").await, None);
    let skipped_at_root = || {
        let v: serde_json::Value = serde_json::from_str(&cli_ok(
            &root,
            &[
                "connected-registry",
                "show",
                "-n",
                "site-skip",
                "-o",
                "json",
            ],
        ))
        .unwrap();
        v["statusDetails"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|d| d["code"] == "ParentContentMissing")
            .map(|d| d["description"].as_str().unwrap().to_string())
            .collect::<Vec<_>>()
    };
    eventually("the root shows what was skipped", || async {
        skipped_at_root()
            .iter()
            .any(|d| d.contains("app:broken") && d.contains("Push the image to the parent again"))
    })
    .await;
    let m = support::metrics(&s).await;
    assert_eq!(
        support::metric(&m, "outpost_sync_skipped_manifests"),
        Some(1),
        "{m}"
    );

    // The same in the feed: a broken image between two good ones holds nothing up, also
    // across a restart.
    site.kill9();
    let broken2 = push_image(&admin, &r, "app", "broken2", "skip-broken-two").await;
    lose("skip-broken-two");
    let after = push_image(&admin, &r, "app", "after", "skip-after").await;
    let site = start_site(site_dir.path(), &cs);
    let s = site.base();
    eventually("the push after the broken one arrives", || async {
        tag_digest(&local, &s, "app", "after").await.as_deref() == Some(after.as_str())
    })
    .await;
    assert_eq!(tag_digest(&local, &s, "app", "broken2").await, None);

    // Repaired at the root (the lost layers uploaded again): both arrive, the details go,
    // and the root's last sync time moves (uploading blobs writes nothing to the feed: only
    // the retry of what was skipped applies content).
    let last_sync = || async {
        let v: serde_json::Value = serde_json::from_str(&cli_ok(
            &root,
            &[
                "connected-registry",
                "show",
                "-n",
                "site-skip",
                "-o",
                "json",
            ],
        ))
        .unwrap();
        v["lastSyncTime"].as_str().unwrap_or_default().to_string()
    };
    let before = last_sync().await;
    tokio::time::sleep(Duration::from_millis(1100)).await;
    for seed in ["skip-broken", "skip-broken-two"] {
        support::push_blob(&admin, &r, "app", &layer(seed)).await;
    }
    eventually("the repaired images arrive", || async {
        tag_digest(&local, &s, "app", "broken").await.as_deref() == Some(broken.as_str())
            && tag_digest(&local, &s, "app", "broken2").await.as_deref() == Some(broken2.as_str())
    })
    .await;
    eventually("the root no longer shows them skipped", || async {
        skipped_at_root().is_empty()
    })
    .await;
    eventually("the root's last sync time moves", || async {
        last_sync().await > before
    })
    .await;
    assert_eq!(
        support::metric(
            &support::metrics(&s).await,
            "outpost_sync_skipped_manifests"
        ),
        Some(0)
    );
}

/// A layer whose file at the parent was damaged on disk (same size, other bytes) arrives
/// hashing to the same wrong digest every time: its image is skipped and reported, instead
/// of fetched again in a loop that holds up everything after it.
#[tokio::test]
async fn an_image_whose_layer_is_damaged_at_the_parent_is_skipped() {
    let root_dir = tempfile::tempdir().unwrap();
    let site_dir = tempfile::tempdir().unwrap();
    let root = Outpost::start(root_dir.path(), &[]);
    let admin = client_as("admin", ADMIN_PASSWORD);
    let r = root.base();
    push_image(&admin, &r, "app", "a-damaged", "damaged-at-the-root").await;
    let layer = support::seed_layer("damaged-at-the-root");
    let path = support::blob_file(root_dir.path(), &support::sha256_hex(&layer));
    let mut bytes = std::fs::read(&path).unwrap();
    bytes[1000] ^= 0xff;
    std::fs::write(&path, bytes).unwrap();
    let good = push_image(&admin, &r, "app", "b-good", "after-the-damage").await;

    let cs = connected(&root, "site-damaged", &["--repository", "app"]);
    let site = start_site(site_dir.path(), &cs);
    let local = client_as("admin", SITE_PASSWORD);
    let s = site.base();
    eventually("the image after the damaged one arrives", || async {
        tag_digest(&local, &s, "app", "b-good").await.as_deref() == Some(good.as_str())
    })
    .await;
    assert_eq!(tag_digest(&local, &s, "app", "a-damaged").await, None);
    eventually("the root shows the damaged image skipped", || async {
        shows_detail(
            &root,
            "site-damaged",
            "ParentContentMissing",
            "the parent's copy is damaged",
        )
    })
    .await;
}

/// Pushes `repo:tag`, whose one layer is non-distributable (it names `urls` where it may be
/// found), with that layer's blob pushed too; returns the layer's digest.
async fn push_non_distributable(c: &reqwest::Client, base: &str, repo: &str, tag: &str) -> String {
    let config = format!("{{\"seed\":\"{tag}\"}}").into_bytes();
    let layer: Vec<u8> = tag.bytes().cycle().take(3000).collect();
    for blob in [&config, &layer] {
        support::push_blob(c, base, repo, blob).await;
    }
    let manifest = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": support::sha256_hex(&config), "size": config.len()},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip", "digest": support::sha256_hex(&layer), "size": layer.len(), "urls": ["https://example.invalid/layer"]}]
    });
    let put = c
        .put(format!("{base}/v2/{repo}/manifests/{tag}"))
        .header("content-type", "application/vnd.oci.image.manifest.v1+json")
        .body(serde_json::to_vec(&manifest).unwrap())
        .send()
        .await
        .unwrap();
    assert_eq!(put.status(), 201);
    support::sha256_hex(&layer)
}

/// A non-distributable layer need not be held by a registry, but one that is held travels
/// with its image, both ways: a site that is offline cannot fetch it from its `urls` either.
#[tokio::test]
async fn a_non_distributable_layer_that_is_held_travels_with_its_image() {
    let (_root_dir, _site_dir, root, _proxy, site) =
        readwrite_site_behind_proxy("site-nondist", &["app"]).await;
    let admin = client_as("admin", ADMIN_PASSWORD);
    let r = root.base();
    let s = site.base();
    let site_admin = client_as("admin", SITE_PASSWORD);
    let down = push_non_distributable(&admin, &r, "app", "from-root").await;
    let up = push_non_distributable(&site_admin, &s, "app", "from-site").await;
    eventually("both images are at both ends", || async {
        tag_digest(&site_admin, &s, "app", "from-root")
            .await
            .is_some()
            && tag_digest(&admin, &r, "app", "from-site").await.is_some()
    })
    .await;
    assert_eq!(blob_len(&site_admin, &s, "app", &down).await, Some(3000));
    assert_eq!(blob_len(&admin, &r, "app", &up).await, Some(3000));
}

/// A site collects garbage on the schedule its parent sets, and follows a change of that
/// setting at its next sync, without a restart.
#[tokio::test]
async fn a_site_collects_garbage_as_its_parent_configures() {
    let root_dir = tempfile::tempdir().unwrap();
    let site_dir = tempfile::tempdir().unwrap();
    let root = Outpost::start(root_dir.path(), &[]);
    let admin = client_as("admin", ADMIN_PASSWORD);
    let r = root.base();
    let digest = push_image(&admin, &r, "app", "v1", "gc-at-the-site").await;
    let layer = support::seed_layer("gc-at-the-site");
    let layer = support::sha256_hex(&layer);
    let cs = connected(
        &root,
        "site-gc",
        &["--repository", "app", "--gc-enabled", "false"],
    );
    let site = Outpost::start_env(
        site_dir.path(),
        &[
            ("OUTPOST_CONNECTION_STRING", &cs),
            ("OUTPOST_SYNC_POLL_SECS", "5"),
            ("OUTPOST_ADMIN_PASSWORD", SITE_PASSWORD),
            ("OUTPOST_GC_MIN_AGE_SECS", "0"),
        ],
    );
    let local = client_as("admin", SITE_PASSWORD);
    let s = site.base();
    eventually("the site has app:v1", || async {
        tag_digest(&local, &s, "app", "v1").await.as_deref() == Some(digest.as_str())
    })
    .await;
    let blob_status = || {
        let (local, s, layer) = (&local, &s, &layer);
        async move {
            local
                .head(format!("{s}/v2/app/blobs/{layer}"))
                .send()
                .await
                .unwrap()
                .status()
        }
    };
    // Deleted at the root: the site drops the manifest; its layer is now garbage there.
    let del = admin
        .delete(format!("{r}/v2/app/manifests/{digest}"))
        .send()
        .await
        .unwrap();
    assert_eq!(del.status(), 202);
    eventually("the site drops the manifest", || async {
        local
            .head(format!("{s}/v2/app/manifests/{digest}"))
            .header("accept", "application/vnd.oci.image.manifest.v1+json")
            .send()
            .await
            .unwrap()
            .status()
            == 404
    })
    .await;
    assert_eq!(
        blob_status().await,
        200,
        "garbage collection is off at the site"
    );

    // The parent turns it on, every minute: the site follows at its next sync.
    cli_ok(
        &root,
        &[
            "connected-registry",
            "update",
            "-n",
            "site-gc",
            "--gc-enabled",
            "true",
            "--gc-schedule",
            "* * * * *",
        ],
    );
    let deadline = std::time::Instant::now() + Duration::from_secs(100);
    while blob_status().await != 404 {
        assert!(
            std::time::Instant::now() < deadline,
            "the site did not collect the layer within a minute of the new schedule:\n{}",
            site.log()
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// The root delivers the notifications its sites send to the operator's webhook, with the
/// configured `Authorization`, in order, retrying while the receiver fails.
#[tokio::test]
async fn the_root_delivers_notifications_to_a_webhook() {
    use std::sync::atomic::{AtomicUsize, Ordering};
    type Seen = Arc<std::sync::Mutex<Vec<(String, serde_json::Value)>>>;
    use std::sync::Arc;
    // A receiver that fails its first two deliveries, then records what it is sent.
    let seen: Seen = Arc::default();
    let failures = Arc::new(AtomicUsize::new(2));
    let hook = {
        let (seen, failures) = (seen.clone(), failures.clone());
        axum::Router::new().route(
            "/hook",
            axum::routing::post(
                move |h: axum::http::HeaderMap, axum::Json(body): axum::Json<serde_json::Value>| {
                    let (seen, failures) = (seen.clone(), failures.clone());
                    async move {
                        if failures
                            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
                            .is_ok()
                        {
                            return axum::http::StatusCode::SERVICE_UNAVAILABLE;
                        }
                        let auth = h
                            .get("authorization")
                            .and_then(|v| v.to_str().ok())
                            .unwrap_or("")
                            .to_string();
                        seen.lock().unwrap().push((auth, body));
                        axum::http::StatusCode::NO_CONTENT
                    }
                },
            ),
        )
    };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let hook_url = format!("http://{}/hook", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, hook).await });

    let root_dir = tempfile::tempdir().unwrap();
    let site_dir = tempfile::tempdir().unwrap();
    let root = Outpost::start_env(
        root_dir.path(),
        &[
            ("OUTPOST_NOTIFICATION_URL", &hook_url),
            ("OUTPOST_NOTIFICATION_AUTHORIZATION", "Bearer hook-secret"),
        ],
    );
    let admin = client_as("admin", ADMIN_PASSWORD);
    let r = root.base();
    let cs = connected(
        &root,
        "site-hook",
        &["--repository", "app", "--notifications", "app:*:*"],
    );
    let _site = start_site(site_dir.path(), &cs);
    let one = push_image(&admin, &r, "app", "one", "hook-one").await;
    let two = push_image(&admin, &r, "app", "two", "hook-two").await;
    let delivered = || {
        seen.lock()
            .unwrap()
            .iter()
            .flat_map(|(_, body)| {
                body["notifications"]
                    .as_array()
                    .cloned()
                    .unwrap_or_default()
            })
            .map(|n| {
                format!(
                    "{} {} {}:{}@{}",
                    n["connectedRegistry"].as_str().unwrap_or(""),
                    n["action"].as_str().unwrap_or(""),
                    n["repository"].as_str().unwrap_or(""),
                    n["tag"].as_str().unwrap_or(""),
                    n["digest"].as_str().unwrap_or("")
                )
            })
            .collect::<Vec<_>>()
    };
    let want = vec![
        format!("site-hook push app:one@{one}"),
        format!("site-hook push app:two@{two}"),
    ];
    eventually("the webhook has both pushes, in order", || async {
        delivered() == want
    })
    .await;
    assert_eq!(
        failures.load(Ordering::SeqCst),
        0,
        "the failed deliveries were retried"
    );
    assert!(
        seen.lock()
            .unwrap()
            .iter()
            .all(|(auth, _)| auth == "Bearer hook-secret"),
        "every delivery carries the configured Authorization"
    );
    // Counted once the receiver's answer is back (after it recorded the body).
    eventually("the delivery metrics count them", || async {
        let m = support::metrics(&r).await;
        support::metric(&m, "outpost_notifications_delivered_total").is_some_and(|n| n >= 2)
            && support::metric(&m, "outpost_notification_delivery_failures_total")
                .is_some_and(|n| n >= 2)
    })
    .await;
}

#[tokio::test]
async fn a_repository_removed_from_a_readonly_scope_is_deleted_at_the_site() {
    let root_dir = tempfile::tempdir().unwrap();
    let site_dir = tempfile::tempdir().unwrap();
    let root = Outpost::start(root_dir.path(), &[]);
    let admin = client_as("admin", ADMIN_PASSWORD);
    let r = root.base();
    push_image(&admin, &r, "app", "v1", "kept").await;
    push_image(&admin, &r, "tools", "v1", "dropped").await;
    let cs = connected(&root, "site-scope", &["--repository", "app", "tools"]);
    let site = start_site(site_dir.path(), &cs);
    let s = site.base();
    let site_admin = client_as("admin", SITE_PASSWORD);
    eventually("both repositories arrive", || async {
        tag_digest(&site_admin, &s, "app", "v1").await.is_some()
            && tag_digest(&site_admin, &s, "tools", "v1").await.is_some()
    })
    .await;
    cli_ok(
        &root,
        &[
            "connected-registry",
            "permissions",
            "update",
            "-n",
            "site-scope",
            "--remove",
            "tools",
        ],
    );
    eventually("the local copy of tools is deleted", || async {
        let catalog: serde_json::Value = site_admin
            .get(format!("{s}/v2/_catalog"))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        catalog["repositories"] == serde_json::json!(["app"])
    })
    .await;
    assert!(
        tag_digest(&site_admin, &s, "app", "v1").await.is_some(),
        "repositories still in scope stay"
    );
}

#[tokio::test]
async fn two_repositories_needing_the_same_new_blob_download_it_once() {
    const SIZE: usize = 24 << 20;
    let root_dir = tempfile::tempdir().unwrap();
    let site_dir = tempfile::tempdir().unwrap();
    let root = Outpost::start(root_dir.path(), &[]);
    let admin = client_as("admin", ADMIN_PASSWORD);
    let r = root.base();
    // The same layer (same digest) in two repositories.
    let digest = support::push_big_image(&admin, &r, "twin-a", "v1", SIZE).await;
    assert_eq!(
        support::push_big_image(&admin, &r, "twin-b", "v1", SIZE).await,
        digest
    );
    let cs = connected(&root, "site-twins", &["--repository", "twin-a", "twin-b"]);
    let proxy = support::FaultProxy::start(&root.addr).await;
    // Slow enough that both repositories are reconciled while the blob is still coming.
    proxy
        .rate
        .store(24 << 20, std::sync::atomic::Ordering::Relaxed);
    let site = start_site(site_dir.path(), &via(&cs, &proxy.addr));
    let s = site.base();
    let site_admin = client_as("admin", SITE_PASSWORD);
    for repo in ["twin-a", "twin-b"] {
        eventually(&format!("{repo} serves the layer"), || async {
            blob_len(&site_admin, &s, repo, &digest).await == Some(SIZE)
        })
        .await;
    }
    let ratio = proxy.bytes() as f64 / SIZE as f64;
    assert!(ratio < 1.5, "the shared layer came down {ratio:.2} times");
}

/// Whether this process may mount a tmpfs in a private namespace (it runs as root). Without
/// root the disk-full test fails, unless TESTS_WITHOUT_ROOT=1 says to leave it out on purpose.
pub(crate) fn may_mount() -> bool {
    let root = std::process::Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| o.stdout.starts_with(b"0\n"));
    if !root {
        assert!(
            std::env::var_os("TESTS_WITHOUT_ROOT").is_some(),
            "this test mounts a small tmpfs and must run as root (CI does); \
             set TESTS_WITHOUT_ROOT=1 to leave it out deliberately"
        );
    }
    root
}

#[tokio::test]
async fn a_full_disk_at_a_site_shows_as_disk_error_at_the_root() {
    if !may_mount() {
        return;
    }
    let root_dir = tempfile::tempdir().unwrap();
    let site_dir = tempfile::tempdir().unwrap();
    let root = Outpost::start(root_dir.path(), &[]);
    let admin = client_as("admin", ADMIN_PASSWORD);
    let r = root.base();
    let small = push_image(&admin, &r, "app", "v1", "fits").await;
    support::push_big_image(&admin, &r, "big", "v1", 40 << 20).await;
    let cs = connected(
        &root,
        "site-full",
        &["--repository", "app", "big", "-m", "ReadWrite"],
    );
    // The site's whole data directory is a 16 MiB disk: the 40 MiB layer cannot fit.
    let site = Outpost::start_on_small_disk(
        site_dir.path(),
        "16m",
        &[
            ("OUTPOST_CONNECTION_STRING", &cs),
            ("OUTPOST_SYNC_POLL_SECS", "5"),
            ("OUTPOST_ADMIN_PASSWORD", SITE_PASSWORD),
        ],
    );
    let s = site.base();
    let site_admin = client_as("admin", SITE_PASSWORD);
    eventually("the small image arrives", || async {
        tag_digest(&site_admin, &s, "app", "v1").await.as_deref() == Some(small.as_str())
    })
    .await;
    let show = || {
        let out = cli_ok(
            &root,
            &[
                "connected-registry",
                "show",
                "-n",
                "site-full",
                "-o",
                "json",
            ],
        );
        serde_json::from_str::<serde_json::Value>(&out).unwrap()
    };
    let disk_error = |v: &serde_json::Value| {
        v["statusDetails"].as_array().is_some_and(|d| {
            d.iter().any(|x| {
                x["code"] == "DiskError"
                    && x["description"].as_str().is_some_and(|t| {
                        t.contains("No space left on device")
                            && t.contains("free space in this connected registry's data directory")
                    })
            })
        })
    };
    // The sync is failing, and the root says so, not only in the details.
    eventually(
        "the root shows DiskError and a failed sync for the site",
        || async {
            let v = show();
            disk_error(&v) && v["lastSyncResult"] == "Failed" && v["syncState"] == "Failed"
        },
    )
    .await;
    // A client push that does not fit gets a clear 507, and what the site holds stays intact.
    // The sync's retries fill the disk to the last byte at moments, and then the upload
    // session itself cannot be created: the same 507 comes at the POST.
    let blob = vec![7u8; 20 << 20];
    let loc = site_admin
        .post(format!("{s}/v2/app/blobs/uploads/"))
        .send()
        .await
        .unwrap();
    let refused = if loc.status() == 507 {
        loc
    } else {
        assert_eq!(loc.status(), 202);
        let loc = loc.headers()["location"].to_str().unwrap().to_string();
        let loc = if loc.starts_with("http") {
            loc
        } else {
            format!("{s}{loc}")
        };
        let sep = if loc.contains('?') { '&' } else { '?' };
        site_admin
            .put(format!("{loc}{sep}digest={}", support::sha256_hex(&blob)))
            .body(blob)
            .send()
            .await
            .unwrap()
    };
    assert_eq!(refused.status(), 507);
    let body = refused.text().await.unwrap();
    assert!(body.contains("storage is full"), "{body}");
    assert_eq!(
        tag_digest(&site_admin, &s, "app", "v1").await.as_deref(),
        Some(small.as_str())
    );
    let pulled = site_admin
        .get(format!("{s}/v2/app/manifests/v1"))
        .header("accept", "application/vnd.oci.image.manifest.v1+json")
        .send()
        .await
        .unwrap();
    assert_eq!(pulled.status(), 200);

    // The image that cannot fit is deleted at the root: the site gets past it, and the root
    // shows it syncing again, with the disk error gone.
    let big = tag_digest(&admin, &r, "big", "v1").await.unwrap();
    let resp = admin
        .delete(format!("{r}/v2/big/manifests/{big}"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 202);
    eventually("the root shows the site recovered", || async {
        let v = show();
        !disk_error(&v) && v["lastSyncResult"] == "Succeeded" && v["connectionState"] == "Online"
    })
    .await;
}

/// How many upload sessions the node at `base` has cancelled (`DELETE` answered 204).
async fn uploads_cancelled(base: &str) -> u64 {
    support::metrics(base)
        .await
        .lines()
        .filter(|l| {
            l.starts_with("outpost_http_requests_total{")
                && l.contains(r#"route="upload""#)
                && l.contains(r#"method="DELETE""#)
                && l.contains(r#"code="204""#)
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .sum()
}

/// A ReadWrite site whose parent's disk is full: each retry of the outbox gives up the
/// parent's upload session it started before, instead of leaving one more behind every time,
/// and the push goes up once the parent has room.
#[tokio::test]
async fn a_site_retrying_a_push_to_a_full_parent_leaves_no_sessions_behind() {
    if !may_mount() {
        return;
    }
    let root_dir = tempfile::tempdir().unwrap();
    let site_dir = tempfile::tempdir().unwrap();
    let root = Outpost::start_on_small_disk(root_dir.path(), "24m", &[]);
    let admin = client_as("admin", ADMIN_PASSWORD);
    let r = root.base();
    let cs = connected(
        &root,
        "site-up-full",
        &["--repository", "app", "-m", "ReadWrite"],
    );
    let site = start_site(site_dir.path(), &cs);
    let s = site.base();
    let site_admin = client_as("admin", SITE_PASSWORD);
    eventually("the site is active", || async {
        let out = cli_ok(
            &root,
            &[
                "connected-registry",
                "show",
                "-n",
                "site-up-full",
                "-o",
                "json",
            ],
        );
        serde_json::from_str::<serde_json::Value>(&out).unwrap()["activationStatus"] == "Active"
    })
    .await;
    // Room for new sessions (a few KiB each), none for the pushed layer.
    let filler = support::fill_disk_with_an_upload(&admin, &r, "filler", 64 << 10).await;
    let cancelled = uploads_cancelled(&r).await;
    let pushed = support::push_big_image(&site_admin, &s, "app", "v1", 1 << 20).await;
    eventually(
        "the site gives up its failed sessions at the root",
        || async { uploads_cancelled(&r).await >= cancelled + 2 },
    )
    .await;
    // The root gets room back: the push goes up.
    let resp = admin.delete(format!("{r}{filler}")).send().await.unwrap();
    assert_eq!(resp.status(), 204);
    eventually("the push reaches the root", || async {
        admin
            .head(format!("{r}/v2/app/blobs/{pushed}"))
            .send()
            .await
            .is_ok_and(|x| x.status() == 200)
    })
    .await;
}

#[tokio::test]
async fn a_blob_corrupted_on_the_way_is_refused_and_fetched_again() {
    const SIZE: usize = 4 << 20;
    let root_dir = tempfile::tempdir().unwrap();
    let site_dir = tempfile::tempdir().unwrap();
    let root = Outpost::start(root_dir.path(), &[]);
    let admin = client_as("admin", ADMIN_PASSWORD);
    let r = root.base();
    let digest = support::push_big_image(&admin, &r, "big", "v1", SIZE).await;
    let cs = connected(&root, "site-corrupt", &["--repository", "big"]);
    let proxy = support::FaultProxy::start(&root.addr).await;
    // One flipped byte in the middle of the layer (the JSON before it is a few KiB).
    proxy
        .corrupt_at
        .store(2 << 20, std::sync::atomic::Ordering::Relaxed);
    let site = start_site(site_dir.path(), &via(&cs, &proxy.addr));
    let s = site.base();
    let site_admin = client_as("admin", SITE_PASSWORD);
    eventually("the layer arrives intact on the second try", || async {
        blob_len(&site_admin, &s, "big", &digest).await == Some(SIZE)
    })
    .await;
    let body = site_admin
        .get(format!("{s}/v2/big/blobs/{digest}"))
        .send()
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap();
    assert_eq!(
        support::sha256_hex(&body),
        digest,
        "only the intact copy is served"
    );
    assert!(
        site.log().contains("from the parent hashes to"),
        "{}",
        site.log()
    );
    assert!(
        proxy.bytes() >= 2 * SIZE as u64,
        "the corrupt copy was discarded and the blob fetched again"
    );
}

#[tokio::test]
async fn an_upload_complete_but_not_committed_is_committed_without_downloading_again() {
    const SIZE: usize = 8 << 20;
    let root_dir = tempfile::tempdir().unwrap();
    let site_dir = tempfile::tempdir().unwrap();
    let root = Outpost::start(root_dir.path(), &[]);
    let admin = client_as("admin", ADMIN_PASSWORD);
    let r = root.base();
    let digest = support::push_big_image(&admin, &r, "big", "v1", SIZE).await;
    let layer = admin
        .get(format!("{r}/v2/big/blobs/{digest}"))
        .send()
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap();
    // The state a site is left in when it dies (or its window closes, or its disk fills)
    // after the last piece of a blob and before the commit: the whole blob in its upload
    // session, and the resume marker naming it (layouts: docs/storage-layout.md, sync state).
    let id = "0b7c9d1e-0000-4000-8000-00000000c0de";
    let d = site_dir.path();
    std::fs::create_dir_all(d.join("uploads")).unwrap();
    std::fs::create_dir_all(d.join("sync/partial")).unwrap();
    std::fs::write(d.join("uploads").join(id), &layer).unwrap();
    std::fs::write(d.join("uploads").join(format!("{id}.owner")), "big").unwrap();
    let hex = digest.trim_start_matches("sha256:");
    std::fs::write(
        d.join("sync/partial").join(format!("sha256-{hex}")),
        format!("big {id}"),
    )
    .unwrap();

    let cs = connected(&root, "site-complete", &["--repository", "big"]);
    let proxy = support::FaultProxy::start(&root.addr).await;
    let site = start_site(d, &via(&cs, &proxy.addr));
    let s = site.base();
    let site_admin = client_as("admin", SITE_PASSWORD);
    eventually("the blob is committed from the finished upload", || async {
        blob_len(&site_admin, &s, "big", &digest).await == Some(SIZE)
    })
    .await;
    assert!(
        proxy.bytes() < (SIZE / 10) as u64,
        "downloaded {} bytes for a blob that was already complete",
        proxy.bytes()
    );
    assert!(
        !d.join("sync/partial")
            .join(format!("sha256-{hex}"))
            .exists(),
        "the resume marker is gone once the blob is stored"
    );
}

fn outpost_cmd(args: &[&str]) -> std::process::Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_outpost"))
        .args(args)
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap()
}

#[tokio::test]
async fn a_site_with_no_link_at_all_starts_from_an_offline_bundle() {
    let root_dir = tempfile::tempdir().unwrap();
    let site_dir = tempfile::tempdir().unwrap();
    let bundle = tempfile::tempdir().unwrap();
    let root = Outpost::start(root_dir.path(), &[]);
    let admin = client_as("admin", ADMIN_PASSWORD);
    let r = root.base();
    let v1 = push_image(&admin, &r, "app", "v1", "one").await;
    let v2 = push_image(&admin, &r, "app", "v2", "two").await;
    push_image(&admin, &r, "other", "v1", "not in scope").await;
    // An index whose child is addressed by sha512.
    let child = admin
        .get(format!("{r}/v2/app/manifests/v2"))
        .header("accept", "application/vnd.oci.image.manifest.v1+json")
        .send()
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap();
    let child512 = format!(
        "sha512:{}",
        hex::encode(<sha2::Sha512 as sha2::Digest>::digest(&child))
    );
    let put = |reference: String, media_type: &'static str, body: Vec<u8>| {
        let admin = admin.clone();
        let r = r.clone();
        async move {
            let resp = admin
                .put(format!("{r}/v2/app/manifests/{reference}"))
                .header("content-type", media_type)
                .body(body)
                .send()
                .await
                .unwrap();
            assert_eq!(resp.status(), 201, "{}", resp.text().await.unwrap());
        }
    };
    put(
        child512.clone(),
        "application/vnd.oci.image.manifest.v1+json",
        child.to_vec(),
    )
    .await;
    let index = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [{"mediaType": "application/vnd.oci.image.manifest.v1+json",
            "digest": child512, "size": child.len(),
            "platform": {"os": "linux", "architecture": "arm64"}}],
    }))
    .unwrap();
    let multi = format!(
        "sha256:{}",
        hex::encode(<sha2::Sha256 as sha2::Digest>::digest(&index))
    );
    put(
        "multi".into(),
        "application/vnd.oci.image.index.v1+json",
        index,
    )
    .await;
    let reader_pw = read_token(&root, "far-reader", "app");
    let cs = connected(
        &root,
        "site-far",
        &["--repository", "app", "--client-tokens", "far-reader"],
    );

    // Exports site-far's bundle (with `extra` arguments); returns stdout and stderr.
    let export_with = |extra: &[&str]| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_outpost"))
            .args(["connected-registry", "export", "-n", "site-far", "--dir"])
            .arg(bundle.path())
            .args(extra)
            .args([
                "--registry",
                &root.url(""),
                "-u",
                "admin",
                "--password",
                ADMIN_PASSWORD,
            ])
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(out.status.success(), "{err}");
        (out.stdout, err)
    };
    let export = || export_with(&[]).1;
    let first = export();
    assert!(first.contains("1 repositories, 3 tags"), "{first}");
    let index: serde_json::Value =
        serde_json::from_slice(&std::fs::read(bundle.path().join("index.json")).unwrap()).unwrap();
    let tagged: Vec<(String, String)> = index["manifests"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| {
            (
                m["annotations"]["io.outpost.repository"]
                    .as_str()
                    .unwrap()
                    .to_string(),
                m["annotations"]["org.opencontainers.image.ref.name"]
                    .as_str()
                    .unwrap()
                    .to_string(),
            )
        })
        .collect();
    assert_eq!(
        tagged,
        [
            ("app".into(), "multi".into()),
            ("app".into(), "v1".into()),
            ("app".into(), "v2".into())
        ]
    );
    // Again into the same directory: nothing is downloaded twice, and a damaged file is
    // downloaded again.
    let again = export();
    assert!(again.contains(": 0 blobs downloaded"), "{again}");
    let largest = || {
        std::fs::read_dir(bundle.path().join("blobs/sha256"))
            .unwrap()
            .map(|e| e.unwrap().path())
            .max_by_key(|p| std::fs::metadata(p).unwrap().len())
            .unwrap()
    };
    let corrupt = |path: std::path::PathBuf| {
        let mut bytes = std::fs::read(&path).unwrap();
        bytes[1000] ^= 0xff;
        std::fs::write(&path, bytes).unwrap();
    };
    corrupt(largest());
    let repaired = export();
    assert!(repaired.contains(": 1 blobs downloaded"), "{repaired}");
    // For scripts: the same counts as JSON on stdout.
    let (stdout, _) = export_with(&["-o", "json"]);
    let v: serde_json::Value = serde_json::from_slice(&stdout).unwrap();
    assert_eq!(
        (
            v["repositories"].clone(),
            v["tags"].clone(),
            v["blobsDownloaded"].clone()
        ),
        (1.into(), 3.into(), 0.into()),
        "{v}"
    );

    // After the export the parent moves v1 and adds v3.
    let moved = push_image(&admin, &r, "app", "v1", "moved after the export").await;
    let v3 = push_image(&admin, &r, "app", "v3", "three").await;

    // The site has never reached its parent: the link is down.
    let link = support::FaultProxy::start(&root.addr).await;
    link.blocked
        .store(true, std::sync::atomic::Ordering::Relaxed);
    let cs = via(&cs, &link.addr);
    let import = |dir: &std::path::Path| {
        outpost_cmd(&[
            "import",
            "--data-dir",
            dir.to_str().unwrap(),
            "--dir",
            bundle.path().to_str().unwrap(),
        ])
    };
    let out = import(site_dir.path());
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        String::from_utf8_lossy(&out.stderr)
            .contains("installed the connected registry's configuration")
    );
    let site = start_site(site_dir.path(), &cs);
    let s = site.base();
    let reader = client_as("far-reader", &reader_pw);
    assert_eq!(
        tag_digest(&reader, &s, "app", "v1").await.as_deref(),
        Some(v1.as_str())
    );
    assert_eq!(
        tag_digest(&reader, &s, "app", "v2").await.as_deref(),
        Some(v2.as_str())
    );
    assert_eq!(
        tag_digest(&reader, &s, "app", "multi").await.as_deref(),
        Some(multi.as_str()),
        "an index with a sha512-addressed child"
    );
    let site_admin = client_as("admin", SITE_PASSWORD);
    assert_eq!(tag_digest(&site_admin, &s, "other", "v1").await, None);

    // Not while the site runs: one process per data directory.
    let out = import(site_dir.path());
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("another Outpost process"), "{err}");

    // The link comes up: the site activates and catches up, the moved tag included.
    link.blocked
        .store(false, std::sync::atomic::Ordering::Relaxed);
    eventually("app:v3 arrives and app:v1 moves", || async {
        tag_digest(&reader, &s, "app", "v3").await.as_deref() == Some(v3.as_str())
            && tag_digest(&reader, &s, "app", "v1").await.as_deref() == Some(moved.as_str())
    })
    .await;
    let shown = cli_ok(
        &root,
        &["connected-registry", "show", "-n", "site-far", "-o", "json"],
    );
    let v: serde_json::Value = serde_json::from_str(&shown).unwrap();
    assert_eq!(v["activationStatus"], "Active", "{shown}");
    drop(site);

    // Another registry's data directory refuses the bundle.
    let foreign = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(foreign.path().join("sync")).unwrap();
    std::fs::write(
        foreign.path().join("sync/config.json"),
        r#"{"name":"someone-else"}"#,
    )
    .unwrap();
    let out = import(foreign.path());
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("belongs to \"someone-else\""), "{err}");
    // And a site will not start on it with this registry's connection string.
    let err = failing_site_in(foreign.path(), &cs);
    assert!(
        err.contains("belongs to connected registry \"someone-else\""),
        "{err}"
    );
    assert!(
        !foreign.path().join("meta.db").exists(),
        "refused before a database was created"
    );

    // A damaged blob is refused, not stored; the data directory the import made is gone
    // again, so nothing takes it for a site.
    let other_site = tempfile::tempdir().unwrap();
    let new_dir = other_site.path().join("new-site");
    corrupt(largest());
    let out = import(&new_dir);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("hashes to"), "{err}");
    assert!(!new_dir.exists(), "the failed import left {new_dir:?}");

    // An altered bundle is refused: a configuration for
    // another registry, a repository outside the scope, a blob that is a link to a device.
    let index = bundle.path().join("outpost-bundle.json");
    let original = std::fs::read(&index).unwrap();
    let altered = |change: &dyn Fn(&mut serde_json::Value)| {
        let mut v: serde_json::Value = serde_json::from_slice(&original).unwrap();
        change(&mut v);
        std::fs::write(&index, serde_json::to_vec(&v).unwrap()).unwrap();
        let out = import(tempfile::tempdir().unwrap().path());
        assert!(!out.status.success());
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    let err = altered(&|v| v["config"]["name"] = "someone-else".into());
    assert!(
        err.contains("carries the configuration of \"someone-else\""),
        "{err}"
    );
    let err = altered(&|v| {
        let mut planted = v["manifests"][0].clone();
        planted["repository"] = "secret/planted".into();
        v["manifests"].as_array_mut().unwrap().insert(0, planted);
    });
    assert!(err.contains("holds repository secret/planted"), "{err}");
    std::fs::write(&index, &original).unwrap();
    let big = largest();
    std::fs::remove_file(&big).unwrap();
    std::os::unix::fs::symlink("/dev/zero", &big).unwrap();
    let out = import(tempfile::tempdir().unwrap().path());
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("is not a regular file of"), "{err}");
}

/// A ReadWrite site that keeps its blobs in an object store (S3, here moto): what it syncs
/// down (a small image, and a layer large enough for a multipart upload) lands in the store,
/// not on its disk, and a push at the site goes up to the root from there.
#[tokio::test]
async fn a_site_keeps_its_blobs_in_an_object_store() {
    use crate::blobstore::{Emulator, Kind, key};
    let Some(store) = Emulator::start(Kind::S3).await else {
        return;
    };
    let root_dir = tempfile::tempdir().unwrap();
    let site_dir = tempfile::tempdir().unwrap();
    let root = Outpost::start(root_dir.path(), &[]);
    let admin = client_as("admin", ADMIN_PASSWORD);
    let r = root.base();
    let small = push_image(&admin, &r, "app", "small", "small").await;
    let big_layer = support::push_big_image(&admin, &r, "app", "big", 10 << 20).await;
    let cs = connected(
        &root,
        "site-s3",
        &["-m", "ReadWrite", "--repository", "app"],
    );
    let mut env: Vec<(String, String)> = store.env("site");
    env.extend([
        ("OUTPOST_CONNECTION_STRING".to_string(), cs),
        ("OUTPOST_SYNC_POLL_SECS".to_string(), "5".to_string()),
        (
            "OUTPOST_ADMIN_PASSWORD".to_string(),
            SITE_PASSWORD.to_string(),
        ),
    ]);
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let site = Outpost::start_env(site_dir.path(), &env);
    let s = site.base();
    let site_admin = client_as("admin", SITE_PASSWORD);
    eventually("the site has both images", || async {
        tag_digest(&site_admin, &s, "app", "small").await.as_deref() == Some(small.as_str())
            && tag_digest(&site_admin, &s, "app", "big").await.is_some()
    })
    .await;
    assert_eq!(
        blob_len(&site_admin, &s, "app", &big_layer).await,
        Some(10 << 20)
    );
    let keys = store.keys("site").await;
    assert!(keys.contains(&key("site", &big_layer)), "{keys:?}");
    assert_eq!(keys.len(), 4, "two configs and two layers: {keys:?}");
    let on_disk = std::fs::read_dir(site_dir.path().join("blobs"))
        .unwrap()
        .count();
    assert_eq!(on_disk, 0, "the site keeps no blob on its disk");

    // A push at the site is read back from the store by the outbox and reaches the root.
    let local = push_image(&site_admin, &s, "app", "from-site", "site-push").await;
    eventually("the root has the site's push", || async {
        tag_digest(&admin, &r, "app", "from-site").await.as_deref() == Some(local.as_str())
    })
    .await;
    assert_eq!(store.keys("site").await.len(), 6);
}

/// An offline bundle imported into a site that keeps its blobs in an object store (its
/// server never started yet): the blobs go to the store, and the site, started with the same
/// store, serves the image from there.
#[tokio::test]
async fn an_offline_bundle_lands_in_the_sites_object_store() {
    use crate::blobstore::{Emulator, Kind, key};
    let Some(store) = Emulator::start(Kind::S3).await else {
        return;
    };
    let root_dir = tempfile::tempdir().unwrap();
    let site_dir = tempfile::tempdir().unwrap();
    let bundle = tempfile::tempdir().unwrap();
    let root = Outpost::start(root_dir.path(), &[]);
    let admin = client_as("admin", ADMIN_PASSWORD);
    let v1 = push_image(&admin, &root.base(), "app", "v1", "bundled").await;
    let cs = connected(&root, "site-bundled", &["--repository", "app"]);
    cli_ok(
        &root,
        &[
            "connected-registry",
            "export",
            "-n",
            "site-bundled",
            "--dir",
            bundle.path().to_str().unwrap(),
        ],
    );

    let env = store.env("bundled-site");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_outpost"))
        .args(["import", "--data-dir"])
        .arg(site_dir.path())
        .arg("--dir")
        .arg(bundle.path())
        .envs(env.iter().map(|(k, v)| (k, v)))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let layer = support::seed_layer("bundled");
    let keys = store.keys("bundled-site").await;
    assert!(
        keys.contains(&key("bundled-site", &support::sha256_hex(&layer))),
        "{keys:?}"
    );
    let on_disk = std::fs::read_dir(site_dir.path().join("blobs"))
        .unwrap()
        .count();
    assert_eq!(on_disk, 0, "the import put no blob on the site's disk");

    // The site's server, with the same store (its parent unreachable), serves the image.
    let mut env = env;
    env.extend([
        (
            "OUTPOST_CONNECTION_STRING".to_string(),
            via(&cs, "127.0.0.1:9"),
        ),
        (
            "OUTPOST_ADMIN_PASSWORD".to_string(),
            SITE_PASSWORD.to_string(),
        ),
    ]);
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let site = Outpost::start_env(site_dir.path(), &env);
    let site_admin = client_as("admin", SITE_PASSWORD);
    assert_eq!(
        tag_digest(&site_admin, &site.base(), "app", "v1")
            .await
            .as_deref(),
        Some(v1.as_str())
    );
    assert_eq!(
        blob_len(
            &site_admin,
            &site.base(),
            "app",
            &support::sha256_hex(&layer)
        )
        .await,
        Some(layer.len())
    );
}

/// A line started while its site cannot reach the root is activated at the site; once the
/// link returns, the site asks the root for the line's slot instead of taking the root's
/// "not the active instance" for a deactivation (which stopped the line until a restart).
#[tokio::test]
async fn a_line_activated_while_its_site_is_cut_off_stays_active_when_the_link_returns() {
    let (root_dir, site_dir, line_dir) = (
        tempfile::tempdir().unwrap(),
        tempfile::tempdir().unwrap(),
        tempfile::tempdir().unwrap(),
    );
    let root = Outpost::start(root_dir.path(), &[]);
    let admin = client_as("admin", ADMIN_PASSWORD);
    let r = root.base();
    let v1 = push_image(&admin, &r, "app", "v1", "before the outage").await;
    let proxy = support::FaultProxy::start(&root.addr).await;
    let cs = connected(
        &root,
        "site-cut",
        &["-m", "ReadWrite", "--repository", "app"],
    );
    let site = start_site(site_dir.path(), &via(&cs, &proxy.addr));
    cli_ok(
        &root,
        &[
            "connected-registry",
            "create",
            "-n",
            "line-cut",
            "-p",
            "site-cut",
            "--repository",
            "app",
        ],
    );
    let line_cs = child_of_site(&root, &site, "site-cut", "line-cut").await;

    proxy
        .blocked
        .store(true, std::sync::atomic::Ordering::Relaxed);
    let line = start_site(line_dir.path(), &line_cs);
    let reader = client_as("admin", SITE_PASSWORD);
    let l = line.base();
    eventually("the line syncs app:v1 from the cut-off site", || async {
        tag_digest(&reader, &l, "app", "v1").await.as_deref() == Some(v1.as_str())
    })
    .await;

    proxy
        .blocked
        .store(false, std::sync::atomic::Ordering::Relaxed);
    let show = || async {
        serde_json::from_str::<serde_json::Value>(&cli_ok(
            &root,
            &["connected-registry", "show", "-n", "line-cut", "-o", "json"],
        ))
        .unwrap()
    };
    eventually("the root shows the line active and online", || async {
        let v = show().await;
        v["activationStatus"] == "Active" && v["connectionState"] == "Online"
    })
    .await;
    let v2 = push_image(&admin, &r, "app", "v2", "after the outage").await;
    eventually("app:v2 reaches the line", || async {
        tag_digest(&reader, &l, "app", "v2").await.as_deref() == Some(v2.as_str())
    })
    .await;
    assert!(!line.log().contains("was deactivated"), "{}", line.log());

    // A real deactivation at the root still stops it.
    cli_ok(
        &root,
        &[
            "connected-registry",
            "deactivate",
            "-n",
            "line-cut",
            "--yes",
        ],
    );
    eventually("the deactivation reaches the line", || async {
        line.log().contains("was deactivated")
    })
    .await;
    assert_ne!(show().await["activationStatus"], "Active");
}

/// A tag moved at the root to a manifest that is deleted before the site applies the move:
/// the site cannot fetch the new manifest, and the tag's removal names a digest the site
/// never had. The tag must still go, or the site serves the old image under it forever while
/// reporting itself healthy.
#[tokio::test]
async fn a_tag_moved_to_a_manifest_deleted_before_the_site_saw_it_goes_there_too() {
    let root_dir = tempfile::tempdir().unwrap();
    let site_dir = tempfile::tempdir().unwrap();
    let root = Outpost::start(root_dir.path(), &[]);
    let admin = client_as("admin", ADMIN_PASSWORD);
    let r = &root.base();
    let old = push_image(&admin, r, "app", "stale", "old").await;
    let cs = connected(&root, "site-stale", &["--repository", "app"]);
    let site = start_site(site_dir.path(), &cs);
    let site_admin = client_as("admin", SITE_PASSWORD);
    let s = site.base();
    eventually("the site has app:stale", || async {
        tag_digest(&site_admin, &s, "app", "stale").await.as_deref() == Some(old.as_str())
    })
    .await;
    site.terminate();

    let moved = push_image(&admin, r, "app", "stale", "new").await;
    let resp = admin
        .delete(format!("{r}/v2/app/manifests/{moved}"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 202);
    assert_eq!(tag_digest(&admin, r, "app", "stale").await, None);
    let marker = push_image(&admin, r, "app", "marker", "marker").await;

    let site = start_site(site_dir.path(), &cs);
    let s = site.base();
    eventually("the site applied the feed up to app:marker", || async {
        tag_digest(&site_admin, &s, "app", "marker")
            .await
            .as_deref()
            == Some(marker.as_str())
    })
    .await;
    assert_eq!(
        tag_digest(&site_admin, &s, "app", "stale").await,
        None,
        "app:stale is gone at the root"
    );
}

/// The bytes and media type of a manifest.
async fn manifest_of(
    c: &reqwest::Client,
    base: &str,
    repo: &str,
    reference: &str,
) -> (Vec<u8>, String) {
    let r = c
        .get(format!("{base}/v2/{repo}/manifests/{reference}"))
        .header(
            "accept",
            "application/vnd.oci.image.manifest.v1+json, application/vnd.oci.image.index.v1+json",
        )
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "{repo}:{reference}");
    let media_type = r.headers()["content-type"].to_str().unwrap().to_string();
    (r.bytes().await.unwrap().to_vec(), media_type)
}

/// A ReadWrite site's push that references what the root deleted (and collected) while the
/// site was cut off: an index over a manifest that came from the root, and a tag on an image
/// whose blobs the root's garbage collection removed. The site holds all of it, so its
/// outbox sends what the root lacks with the push instead of retrying a refusal for ever
/// (which held up everything after it, both ways).
#[tokio::test]
async fn a_site_push_over_content_the_root_deleted_brings_that_content_back() {
    let root_dir = tempfile::tempdir().unwrap();
    let site_dir = tempfile::tempdir().unwrap();
    let root = Outpost::start(root_dir.path(), &[]);
    let root_addr = root.addr.clone();
    let admin = client_as("admin", ADMIN_PASSWORD);
    let r = root.base();
    let child = push_image(&admin, &r, "app", "p1", "child").await;
    let old = push_image(&admin, &r, "app", "gk", "old-image").await;
    let cs = connected(
        &root,
        "site-back",
        &["-m", "ReadWrite", "--repository", "app"],
    );
    let site = start_site(site_dir.path(), &cs);
    let site_admin = client_as("admin", SITE_PASSWORD);
    let s = site.base();
    eventually("the site has app:p1 and app:gk", || async {
        tag_digest(&site_admin, &s, "app", "p1").await.as_deref() == Some(child.as_str())
            && tag_digest(&site_admin, &s, "app", "gk").await.as_deref() == Some(old.as_str())
    })
    .await;

    // The root goes away; the site's clients push an index over app:p1 and tag app:gk again.
    root.terminate();
    let (child_bytes, child_type) = manifest_of(&site_admin, &s, "app", &child).await;
    let index = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [{
            "mediaType": child_type,
            "digest": child,
            "size": child_bytes.len(),
            "platform": {"architecture": "amd64", "os": "linux"},
        }],
    })
    .to_string();
    let resp = site_admin
        .put(format!("{s}/v2/app/manifests/p1i"))
        .header("content-type", "application/vnd.oci.image.index.v1+json")
        .body(index.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 201);
    let index_digest = resp.headers()["docker-content-digest"]
        .to_str()
        .unwrap()
        .to_string();
    let (old_bytes, old_type) = manifest_of(&site_admin, &s, "app", &old).await;
    let resp = site_admin
        .put(format!("{s}/v2/app/manifests/gkb"))
        .header("content-type", old_type)
        .body(old_bytes)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 201);

    // Meanwhile, at the root: both manifests deleted, their blobs collected.
    let elsewhere = Outpost::start(root_dir.path(), &[]);
    for d in [&child, &old] {
        let resp = admin
            .delete(format!("{}/v2/app/manifests/{d}", elsewhere.base()))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 202);
    }
    cli_ok(&elsewhere, &["gc", "--min-age-secs", "0"]);
    elsewhere.terminate();

    // The root is back where the site looks for it.
    let root = Outpost::start_listen(root_dir.path(), &root_addr, &[]);
    let marker = push_image(&admin, &r, "app", "after", "after").await;
    eventually("the site's index and tag reach the root", || async {
        tag_digest(&admin, &r, "app", "gkb").await.as_deref() == Some(old.as_str())
            && admin
                .head(format!("{r}/v2/app/manifests/p1i"))
                .header("accept", "application/vnd.oci.image.index.v1+json")
                .send()
                .await
                .is_ok_and(|resp| {
                    resp.headers()
                        .get("docker-content-digest")
                        .is_some_and(|d| d.to_str().ok() == Some(index_digest.as_str()))
                })
    })
    .await;
    // Everything they reference came with them.
    for (reference, what) in [(&child, "the index's child"), (&old, "app:gkb")] {
        let (bytes, media_type) = manifest_of(&admin, &r, "app", reference).await;
        let m: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
        assert!(media_type.contains("manifest"), "{what}: {media_type}");
        let blobs = m["layers"]
            .as_array()
            .unwrap()
            .iter()
            .chain([&m["config"]])
            .map(|d| d["digest"].as_str().unwrap().to_string());
        for b in blobs {
            let resp = admin
                .get(format!("{r}/v2/app/blobs/{b}"))
                .send()
                .await
                .unwrap();
            assert_eq!(resp.status(), 200, "{what}: blob {b}");
        }
    }
    // And the site goes on syncing both ways.
    eventually("the root's later push reaches the site", || async {
        tag_digest(&site_admin, &s, "app", "after").await.as_deref() == Some(marker.as_str())
    })
    .await;
    drop(root);
}

/// A ship whose clock is three days behind: it goes by the root's time for password expiries
/// and for the times it reports, and says its clock is wrong.
#[tokio::test]
async fn a_site_whose_clock_is_days_behind_goes_by_the_roots_time() {
    let root_dir = tempfile::tempdir().unwrap();
    let site_dir = tempfile::tempdir().unwrap();
    let root = Outpost::start(root_dir.path(), &[]);
    let admin = client_as("admin", ADMIN_PASSWORD);
    let r = root.base();
    let v1 = push_image(&admin, &r, "app", "v1", "clock").await;
    // A client token whose password expires in a few seconds, by the root's clock.
    let expires = outpost_control::format_rfc3339(outpost_control::clock::system_ms() + 6_000);
    let out = cli_ok(
        &root,
        &[
            "token",
            "create",
            "-n",
            "clock-reader",
            "--repository",
            "app",
            "content/read",
            "metadata/read",
            "--expiration",
            &expires,
            "-o",
            "json",
        ],
    );
    let pw = serde_json::from_str::<serde_json::Value>(&out).unwrap()["passwords"][0]["value"]
        .as_str()
        .unwrap()
        .to_string();
    let cs = connected(
        &root,
        "site-clock",
        &["--repository", "app", "--client-tokens", "clock-reader"],
    );
    let site = Outpost::start_with_clock(
        site_dir.path(),
        "-3d",
        &[
            ("OUTPOST_CONNECTION_STRING", cs.as_str()),
            ("OUTPOST_SYNC_POLL_SECS", "5"),
            ("OUTPOST_ADMIN_PASSWORD", SITE_PASSWORD),
        ],
    );
    let s = site.base();
    let reader = client_as("clock-reader", &pw);
    eventually("the site has app:v1 for the reader", || async {
        tag_digest(&reader, &s, "app", "v1").await.as_deref() == Some(v1.as_str())
    })
    .await;
    // Past the expiry by the root's clock (three days before it by the site's own).
    eventually("the expired password is refused at the site", || async {
        let resp = reader
            .get(format!("{s}/v2/app/tags/list"))
            .send()
            .await
            .unwrap();
        resp.status() == 401 && resp.text().await.unwrap().contains("expired at")
    })
    .await;
    // The root shows the site's last sync in its own time, and why it had to correct it.
    let show = || async {
        serde_json::from_str::<serde_json::Value>(&cli_ok(
            &root,
            &[
                "connected-registry",
                "show",
                "-n",
                "site-clock",
                "-o",
                "json",
            ],
        ))
        .unwrap()
    };
    eventually("the root hears of the skew", || async {
        show().await["statusDetails"]
            .to_string()
            .contains("ClockSkew")
    })
    .await;
    let v = show().await;
    let synced = outpost_control::parse_rfc3339(v["lastSyncTime"].as_str().unwrap()).unwrap();
    let behind = outpost_control::clock::system_ms() - synced;
    assert!(
        (0..3_600_000).contains(&behind),
        "last sync {} is not in the last hour: {v}",
        v["lastSyncTime"]
    );
    let skew = v["statusDetails"]
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["code"] == "ClockSkew")
        .unwrap()
        .clone();
    assert!(
        skew["description"]
            .as_str()
            .unwrap()
            .contains("3d 0h 0m behind its parent's"),
        "{skew}"
    );
    // A notice: the site is not shown as unhealthy for it.
    assert_eq!(v["connectionState"], "Online", "{v}");
    assert!(
        site.log().contains("clock is 3d 0h 0m behind"),
        "{}",
        site.log()
    );
}

/// A site's clock set wrong, then right, while it runs and nothing is synced: the root hears
/// of each at the site's next contact, not at the next change it applies.
#[tokio::test]
async fn a_clock_set_wrong_and_right_while_running_is_reported_at_once() {
    let root_dir = tempfile::tempdir().unwrap();
    let site_dir = tempfile::tempdir().unwrap();
    let clock = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(clock.path(), "+0\n").unwrap();
    let root = Outpost::start(root_dir.path(), &[]);
    let admin = client_as("admin", ADMIN_PASSWORD);
    let v1 = push_image(&admin, &root.base(), "app", "v1", "clock-file").await;
    let cs = connected(&root, "site-clock2", &["--repository", "app"]);
    let site = Outpost::start_with_clock_file(
        site_dir.path(),
        clock.path(),
        &[
            ("OUTPOST_CONNECTION_STRING", cs.as_str()),
            ("OUTPOST_SYNC_POLL_SECS", "2"),
            ("OUTPOST_ADMIN_PASSWORD", SITE_PASSWORD),
        ],
    );
    let site_admin = client_as("admin", SITE_PASSWORD);
    let s = site.base();
    eventually("the site has app:v1", || async {
        tag_digest(&site_admin, &s, "app", "v1").await.as_deref() == Some(v1.as_str())
    })
    .await;
    let skew_shown = || async {
        cli_ok(
            &root,
            &[
                "connected-registry",
                "show",
                "-n",
                "site-clock2",
                "-o",
                "json",
            ],
        )
        .contains("ClockSkew")
    };
    assert!(!skew_shown().await);
    std::fs::write(clock.path(), "-1d\n").unwrap();
    eventually("the root shows the skew", skew_shown).await;
    std::fs::write(clock.path(), "+0\n").unwrap();
    eventually("the root no longer shows it", || async {
        !skew_shown().await
    })
    .await;
    assert!(
        site.log().contains("agrees with its parent's again"),
        "{}",
        site.log()
    );
}

/// An index chain hundreds deep (each index listing the one below), which the root accepts
/// from any pusher, is skipped and reported at the site: following it by recursion overflowed
/// the stack and aborted the site at every start.
#[tokio::test]
async fn an_index_chain_too_deep_to_follow_is_skipped_not_a_crash() {
    let root_dir = tempfile::tempdir().unwrap();
    let site_dir = tempfile::tempdir().unwrap();
    let root = Outpost::start(root_dir.path(), &[]);
    let admin = client_as("admin", ADMIN_PASSWORD);
    let r = root.base();
    let mut below = push_image(&admin, &r, "app", "base", "deep-base").await;
    let mut size = 0;
    let base_len = admin
        .get(format!("{r}/v2/app/manifests/base"))
        .header("accept", "application/vnd.oci.image.manifest.v1+json")
        .send()
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap()
        .len();
    let mut media = "application/vnd.oci.image.manifest.v1+json";
    for level in 0..600 {
        let len = if level == 0 { base_len } else { size };
        let index = serde_json::to_vec(&serde_json::json!({
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.index.v1+json",
            "manifests": [{"mediaType": media, "digest": below, "size": len}],
        }))
        .unwrap();
        let tag = if level == 599 { "deep" } else { "" };
        let reference = if tag.is_empty() {
            support::sha256_hex(&index)
        } else {
            tag.to_string()
        };
        let put = admin
            .put(format!("{r}/v2/app/manifests/{reference}"))
            .header("content-type", "application/vnd.oci.image.index.v1+json")
            .body(index.clone())
            .send()
            .await
            .unwrap();
        assert_eq!(put.status(), 201, "level {level}");
        below = support::sha256_hex(&index);
        size = index.len();
        media = "application/vnd.oci.image.index.v1+json";
    }
    let after = push_image(&admin, &r, "app", "after", "after-the-deep-one").await;

    let cs = connected(&root, "site-deep", &["--repository", "app"]);
    let site = start_site(site_dir.path(), &cs);
    let local = client_as("admin", SITE_PASSWORD);
    let s = site.base();
    eventually("the image after the deep chain arrives", || async {
        tag_digest(&local, &s, "app", "after").await.as_deref() == Some(after.as_str())
    })
    .await;
    eventually("the root shows the deep chain skipped", || async {
        shows_detail(
            &root,
            "site-deep",
            "ParentContentMissing",
            "nested more than 64 levels deep",
        )
    })
    .await;
    assert_eq!(tag_digest(&local, &s, "app", "deep").await, None);
    // Still serving, after all that.
    assert!(
        reqwest::get(site.url("/healthz"))
            .await
            .unwrap()
            .status()
            .is_success()
    );
}

/// A plain upstream that lists a tag whose manifest it has lost (`HEAD` of the tag gives a
/// digest, `GET` of it `404 MANIFEST_UNKNOWN`): the mirror reports the tag as content the
/// upstream cannot serve, instead of passing over it without a trace.
#[tokio::test]
async fn a_mirror_reports_a_tag_whose_manifest_the_upstream_lost() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let script =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/process/fake_upstream.py");
    struct Kill(std::process::Child);
    impl Drop for Kill {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let _upstream = Kill(
        std::process::Command::new("python3")
            .arg(&script)
            .arg(port.to_string())
            .spawn()
            .unwrap(),
    );
    eventually("the fake upstream answers", || async {
        reqwest::get(format!("http://127.0.0.1:{port}/v2/"))
            .await
            .is_ok_and(|r| r.status() == 200)
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let url = format!("http://127.0.0.1:{port}");
    let mirror = Outpost::start_env(
        dir.path(),
        &[
            ("OUTPOST_UPSTREAM_URL", url.as_str()),
            ("OUTPOST_UPSTREAM_REPOSITORIES", "[\"mirror/app\"]"),
            ("OUTPOST_UPSTREAM_POLL_SECS", "1"),
        ],
    );
    eventually("the lost manifest is reported", || async {
        let status = reqwest::get(mirror.url("/status"))
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        status.contains("ParentContentMissing")
    })
    .await;
    assert!(
        mirror
            .log()
            .contains("(tag t9): it answers 404 MANIFEST_UNKNOWN"),
        "{}",
        mirror.log()
    );
    // Said once, not at every pass: wait for two more passes.
    let last_pass = || async {
        let m = reqwest::get(mirror.url("/metrics"))
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        m.lines()
            .find_map(|l| l.strip_prefix("outpost_sync_last_success_timestamp_seconds "))
            .and_then(|v| v.trim().parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    let first = last_pass().await;
    eventually("two more passes", || async {
        last_pass().await >= first + 2.0
    })
    .await;
    assert_eq!(
        mirror.log().matches("skipping it for now").count(),
        1,
        "{}",
        mirror.log()
    );
}

/// An unlabelled metric's value in `node`'s `/metrics` (0 when absent).
async fn metric(node: &Outpost, name: &str) -> i64 {
    support::metric(&support::metrics(&node.base()).await, name).unwrap_or(0)
}

#[tokio::test]
async fn a_blob_damaged_at_a_readonly_site_is_fetched_again_from_its_parent() {
    const SIZE: usize = 3 << 20;
    let root_dir = tempfile::tempdir().unwrap();
    let site_dir = tempfile::tempdir().unwrap();
    let root = Outpost::start(root_dir.path(), &[]);
    let admin = client_as("admin", ADMIN_PASSWORD);
    let r = root.base();
    // A layer fetched in pieces through an upload session, and one fetched in one request.
    let big = support::push_big_image(&admin, &r, "app", "big", SIZE).await;
    push_image(&admin, &r, "app", "small", "damaged-at-the-site").await;
    let small_layer = support::seed_layer("damaged-at-the-site");
    let small = support::sha256_hex(&small_layer);
    let cs = connected(
        &root,
        "site-rot",
        &["--repository", "app", "app2", "--mode", "ReadOnly"],
    );
    // Long-polls longer than `eventually` waits: the repair must not wait for the next one.
    let site = start_site_polling(site_dir.path(), &cs, "60");
    let local = client_as("admin", SITE_PASSWORD);
    let s = site.base();
    for (digest, size) in [(&big, SIZE), (&small, small_layer.len())] {
        eventually("the site serves the layer", || async {
            blob_len(&local, &s, "app", digest).await == Some(size)
        })
        .await;
    }
    let file = |digest: &str| support::blob_file(site_dir.path(), digest);
    // Storage damage at the site: one file cut short, one gone.
    std::fs::File::options()
        .write(true)
        .open(file(&big))
        .unwrap()
        .set_len(1000)
        .unwrap();
    std::fs::remove_file(file(&small)).unwrap();
    for digest in [&big, &small] {
        let answer = local
            .get(format!("{s}/v2/app/blobs/{digest}"))
            .send()
            .await
            .unwrap();
        assert_eq!(answer.status(), 404, "a damaged blob is not served");
    }
    // Nothing is pushed to a ReadOnly site: it mends them from its parent by itself.
    for (digest, layer_len) in [(&big, SIZE), (&small, small_layer.len())] {
        eventually("the site serves the layer whole again", || async {
            let answer = local
                .get(format!("{s}/v2/app/blobs/{digest}"))
                .send()
                .await
                .unwrap();
            answer.status() == 200
                && answer
                    .bytes()
                    .await
                    .is_ok_and(|b| b.len() == layer_len && support::sha256_hex(&b) == **digest)
        })
        .await;
    }
    assert_eq!(metric(&site, "outpost_sync_blobs_repaired_total").await, 2);
    assert!(metric(&site, "outpost_blobs_damaged_total").await >= 2);
    assert!(
        site.log()
            .contains("a damaged blob was fetched again from the parent"),
        "{}",
        site.log()
    );

    // Damaged again, unnoticed, when another image needs it: the sync fetches it for that
    // image instead of linking the damaged copy.
    std::fs::File::options()
        .write(true)
        .open(file(&small))
        .unwrap()
        .set_len(10)
        .unwrap();
    let image = push_image(&admin, &r, "app2", "v1", "damaged-at-the-site").await;
    eventually("the second image arrives", || async {
        tag_digest(&local, &s, "app2", "v1").await.as_deref() == Some(image.as_str())
    })
    .await;
    // Arrivals are logged, for an operator watching the site.
    let arrived = format!("a tag arrived from the parent repository=app2 tag=v1 digest={image}");
    assert!(site.log().contains(&arrived), "{}", site.log());
    let answer = local
        .get(format!("{s}/v2/app2/blobs/{small}"))
        .send()
        .await
        .unwrap();
    assert_eq!(answer.status(), 200);
    assert_eq!(support::sha256_hex(&answer.bytes().await.unwrap()), small);

    // Paths that are no readable file: a directory, a symbolic link loop (as an unreadable
    // sector would be, a read error rather than a missing file). Unknown, then mended.
    std::fs::remove_file(file(&big)).unwrap();
    std::fs::create_dir(file(&big)).unwrap();
    std::fs::remove_file(file(&small)).unwrap();
    std::os::unix::fs::symlink(file(&small), file(&small)).unwrap();
    for (digest, layer_len) in [(&big, SIZE), (&small, small_layer.len())] {
        let answer = local
            .get(format!("{s}/v2/app/blobs/{digest}"))
            .send()
            .await
            .unwrap();
        assert_eq!(answer.status(), 404, "an unreadable blob is unknown");
        eventually("the unreadable layer is mended", || async {
            blob_len(&local, &s, "app", digest).await == Some(layer_len)
        })
        .await;
    }

    // Lost at the parent too: the site cannot mend it, and the root shows that.
    std::fs::remove_file(support::blob_file(root_dir.path(), &small)).unwrap();
    std::fs::remove_file(file(&small)).unwrap();
    assert_eq!(blob_len(&local, &s, "app", &small).await, None);
    eventually("the root shows the damage the site cannot mend", || async {
        shows_detail(&root, "site-rot", "StorageDamage", &small)
    })
    .await;
}

/// A scope from a parent of a later version, with an entry this build cannot read (a new
/// kind of pattern): a ReadOnly site deletes nothing that entry might cover, and says why.
#[tokio::test]
async fn a_scope_entry_this_build_cannot_read_deletes_nothing() {
    let root_dir = tempfile::tempdir().unwrap();
    let site_dir = tempfile::tempdir().unwrap();
    let root = Outpost::start(root_dir.path(), &[]);
    let admin = client_as("admin", ADMIN_PASSWORD);
    let r = root.base();
    push_image(&admin, &r, "app", "v1", "in-scope").await;
    let other = push_image(&admin, &r, "other", "v1", "covered-by-a-new-pattern").await;
    let cs = connected(
        &root,
        "site-future",
        &["--repository", "app", "other", "--mode", "ReadOnly"],
    );
    let proxy = support::RewriteProxy::start(&root.addr).await;
    let cs = via(&cs, &proxy.addr);
    let local = client_as("admin", SITE_PASSWORD);
    let synced = {
        let site = start_site(site_dir.path(), &cs);
        let s = site.base();
        eventually("the site holds both repositories", || async {
            tag_digest(&local, &s, "other", "v1").await.as_deref() == Some(other.as_str())
        })
        .await;
        metric(&site, "outpost_sync_last_success_timestamp_seconds").await
    };
    // The parent now names `other` with a pattern this build does not know.
    proxy.rewrite(|path, body| {
        path.ends_with("/config").then(|| {
            String::from_utf8_lossy(body)
                .replace("\"other\"", "\"other/**\"")
                .into_bytes()
        })
    });
    let site = start_site(site_dir.path(), &cs);
    let s = site.base();
    // The first iteration after a start is the one that deletes what left the scope.
    eventually("a sync iteration passes", || async {
        metric(&site, "outpost_sync_last_success_timestamp_seconds").await > synced
    })
    .await;
    let log = site.log();
    assert!(log.contains("this build cannot read"), "{log}");
    assert!(
        log.contains("no repository is deleted as out of scope"),
        "{log}"
    );
    assert!(
        local
            .head(format!("{s}/v2/other/manifests/{other}"))
            .send()
            .await
            .is_ok_and(|a| a.status() != 404),
        "the site deleted `other`"
    );
}

/// A parent that sends more of a large blob than its descriptor says (a proxy that appends,
/// a parent that sends without end): the site stops reading at the descriptor's size, keeps
/// nothing of it, and after the same twice skips the image as damaged at the parent.
#[tokio::test]
async fn a_large_blob_longer_than_its_descriptor_is_cut_off_and_skipped() {
    const SIZE: usize = 3 << 20;
    let root_dir = tempfile::tempdir().unwrap();
    let site_dir = tempfile::tempdir().unwrap();
    let root = Outpost::start(root_dir.path(), &[]);
    let admin = client_as("admin", ADMIN_PASSWORD);
    let r = root.base();
    let layer = support::push_big_image(&admin, &r, "app", "long", SIZE).await;
    let proxy = support::RewriteProxy::start(&root.addr).await;
    let path = format!("/blobs/{layer}");
    proxy.rewrite(move |p, body| {
        p.ends_with(&path).then(|| {
            let mut longer = body.to_vec();
            longer.extend(std::iter::repeat_n(0u8, 2 << 20));
            longer
        })
    });
    let cs = connected(&root, "site-long", &["--repository", "app"]);
    let site = start_site(site_dir.path(), &via(&cs, &proxy.addr));
    eventually(
        "the root shows the image skipped as damaged at the parent",
        || async {
            shows_detail(
                &root,
                "site-long",
                "ParentContentMissing",
                &format!("is longer than the {SIZE} bytes its descriptor says"),
            )
        },
    )
    .await;
    let local = client_as("admin", SITE_PASSWORD);
    assert_eq!(blob_len(&local, &site.base(), "app", &layer).await, None);
    let held: u64 = std::fs::read_dir(site_dir.path().join("uploads"))
        .unwrap()
        .filter_map(|e| e.ok()?.metadata().ok())
        .map(|m| m.len())
        .sum();
    assert!(held <= SIZE as u64, "the site kept {held} bytes of uploads");
}

/// A layer a ReadWrite site's client pushed, damaged at the site before it went up in a way
/// that kept its size (zeroed sectors): the parent refuses it as not matching its digest.
/// The site checks its own copy, removes it (its clients no longer get the bad bytes), and
/// reports the change refused instead of sending the blob again for ever, so the changes
/// behind it go up.
#[tokio::test]
async fn a_local_push_damaged_before_it_went_up_is_refused_not_resent_for_ever() {
    let (_root_dir, site_dir, root, proxy, site) =
        readwrite_site_behind_proxy("site-rotten", &["app"]).await;
    let s = site.base();
    let site_admin = client_as("admin", SITE_PASSWORD);
    let admin = client_as("admin", ADMIN_PASSWORD);
    proxy
        .blocked
        .store(true, std::sync::atomic::Ordering::SeqCst);
    push_image(&site_admin, &s, "app", "rotten", "zeroed-at-the-site").await;
    let layer = support::seed_layer("zeroed-at-the-site");
    let digest = support::sha256_hex(&layer);
    let file = support::blob_file(site_dir.path(), &digest);
    std::fs::write(&file, vec![0u8; layer.len()]).unwrap();
    let good = push_image(&site_admin, &s, "app", "after", "pushed-after-the-damage").await;
    proxy
        .blocked
        .store(false, std::sync::atomic::Ordering::SeqCst);
    let r = root.base();
    eventually(
        "the push behind the damaged one reaches the root",
        || async { tag_digest(&admin, &r, "app", "after").await.as_deref() == Some(good.as_str()) },
    )
    .await;
    eventually("the root shows the damaged push refused", || async {
        shows_detail(&root, "site-rotten", "OutboxEntryRefused", "rotten")
    })
    .await;
    assert!(!file.exists(), "the damaged copy is still at the site");
    assert_eq!(blob_len(&site_admin, &s, "app", &digest).await, None);
    assert!(
        site.log()
            .contains("a stored blob does not hash to its digest"),
        "{}",
        site.log()
    );
}
