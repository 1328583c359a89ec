//! Process-level tests: the real `outpost` binary on loopback, restarted, killed with SIGKILL,
//! and spoken to over real sockets (including clients that disconnect mid-upload).

#![allow(clippy::unwrap_used)] // tests fail loudly by design

mod blobstore;
mod help;
mod replicas;
mod support;
mod sync;
mod tls;
mod upgrade;

use sha2::Digest as _;
use std::io::Write;
use std::net::TcpStream;
use std::time::Duration;
use support::{ADMIN_PASSWORD, Outpost, client_as, push_blob, push_image};

fn sha256(data: &[u8]) -> String {
    format!("sha256:{}", hex::encode(sha2::Sha256::digest(data)))
}

fn client() -> reqwest::Client {
    let mut h = reqwest::header::HeaderMap::new();
    h.insert("authorization", support::admin_auth().parse().unwrap());
    reqwest::Client::builder()
        .timeout(Duration::from_secs(60))
        .default_headers(h)
        .build()
        .unwrap()
}

async fn start_upload(c: &reqwest::Client, o: &Outpost, repo: &str) -> String {
    let r = c
        .post(o.url(&format!("/v2/{repo}/blobs/uploads/")))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    r.headers()["location"].to_str().unwrap().to_string()
}

async fn upload_range(c: &reqwest::Client, o: &Outpost, loc: &str) -> String {
    let r = c.get(o.url(loc)).send().await.unwrap();
    assert_eq!(r.status(), 204, "upload status of {loc}");
    r.headers()["range"].to_str().unwrap().to_string()
}

/// Writes a raw HTTP/1.1 request that announces `announced` body bytes but sends only `sent`,
/// then closes the connection.
fn send_truncated(addr: &str, path: &str, announced: usize, sent: &[u8]) {
    let mut s = TcpStream::connect(addr).unwrap();
    write!(s, "PATCH {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/octet-stream\r\nAuthorization: {}\r\nContent-Length: {announced}\r\n\r\n", support::admin_auth()).unwrap();
    s.write_all(sent).unwrap();
    s.flush().unwrap();
    std::thread::sleep(Duration::from_millis(200));
    drop(s);
}

#[tokio::test]
async fn kill9_mid_upload_then_resume_after_restart() {
    let dir = tempfile::tempdir().unwrap();
    let data: Vec<u8> = (0..3 * 1024 * 1024u32)
        .map(|i| (i.wrapping_mul(2654435761) >> 24) as u8)
        .collect();
    let digest = sha256(&data);
    let c = client();

    let o = Outpost::start(dir.path(), &[]);
    let loc = start_upload(&c, &o, "crash/test").await;
    let r = c
        .patch(o.url(&loc))
        .header("content-range", format!("0-{}", 1024 * 1024 - 1))
        .body(data[..1024 * 1024].to_vec())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    // Start the second chunk but die half-way through it.
    let addr = o.addr.clone();
    let partial = data[1024 * 1024..1024 * 1024 + 300_000].to_vec();
    let path = loc.clone();
    let writer = std::thread::spawn(move || {
        let mut s = TcpStream::connect(&addr).unwrap();
        write!(
            s,
            "PATCH {path} HTTP/1.1\r\nHost: x\r\nAuthorization: {}\r\nContent-Length: {}\r\n\r\n",
            support::admin_auth(),
            1024 * 1024
        )
        .unwrap();
        s.write_all(&partial).unwrap();
        s.flush().unwrap();
        std::thread::sleep(Duration::from_millis(500));
    });
    std::thread::sleep(Duration::from_millis(300));
    o.kill9();
    writer.join().unwrap();

    // Nothing partial is visible after the restart; the upload resumes from what is on disk.
    let o = Outpost::start(dir.path(), &[]);
    let r = c
        .head(o.url(&format!("/v2/crash/test/blobs/{digest}")))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404, "a partial blob must never be visible");
    let range = upload_range(&c, &o, &loc).await;
    let have: usize = range.trim_start_matches("0-").parse::<usize>().unwrap() + 1;
    assert!(
        (1024 * 1024..=1024 * 1024 + 300_000).contains(&have),
        "upload holds {have} bytes"
    );
    let r = c
        .put(o.url(&format!("{loc}?digest={digest}")))
        .body(data[have..].to_vec())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201, "{}", r.text().await.unwrap());
    let got = c
        .get(o.url(&format!("/v2/crash/test/blobs/{digest}")))
        .send()
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap();
    assert_eq!(sha256(&got), digest);
    assert_eq!(got.len(), data.len());
}

#[tokio::test]
async fn client_disconnect_mid_chunk_leaves_upload_resumable() {
    let dir = tempfile::tempdir().unwrap();
    let o = Outpost::start(dir.path(), &[]);
    let c = client();
    let loc = start_upload(&c, &o, "cut").await;
    let r = c
        .patch(o.url(&loc))
        .body(vec![1u8; 1000])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    send_truncated(&o.addr, &loc, 100_000, &[2u8; 40_000]);
    // The half-received chunk is rolled back, so the client resumes from its last good chunk.
    let mut range = String::new();
    for _ in 0..50 {
        range = upload_range(&c, &o, &loc).await;
        if range == "0-999" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(range, "0-999");
    let mut all = vec![1u8; 1000];
    all.extend_from_slice(&[3u8; 500]);
    let r = c
        .put(o.url(&format!("{loc}?digest={}", sha256(&all))))
        .body(vec![3u8; 500])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
}

#[tokio::test]
async fn truncated_single_request_upload_stores_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let o = Outpost::start(dir.path(), &[]);
    let data = vec![9u8; 50_000];
    let digest = sha256(&data);
    let mut s = TcpStream::connect(&o.addr).unwrap();
    write!(s, "POST /v2/t/blobs/uploads/?digest={digest} HTTP/1.1\r\nHost: x\r\nAuthorization: {}\r\nContent-Length: 50000\r\n\r\n", support::admin_auth()).unwrap();
    s.write_all(&data[..20_000]).unwrap();
    drop(s);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let c = client();
    let r = c
        .head(o.url(&format!("/v2/t/blobs/{digest}")))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
}

#[tokio::test]
async fn data_survives_graceful_restart_and_sigterm_exits_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    let o = Outpost::start(dir.path(), &[]);
    let c = client();
    let blob = b"persisted".to_vec();
    let d = sha256(&blob);
    let r = c
        .post(o.url(&format!("/v2/p/blobs/uploads/?digest={d}")))
        .body(blob.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    let status = o.terminate();
    assert!(status.success(), "SIGTERM should exit 0, got {status}");

    let o = Outpost::start(dir.path(), &[]);
    let got = c
        .get(o.url(&format!("/v2/p/blobs/{d}")))
        .send()
        .await
        .unwrap();
    assert_eq!(got.status(), 200);
    assert_eq!(got.bytes().await.unwrap().to_vec(), blob);

    // Its metadata database lost (cut to nothing, or deleted) beside the blobs: a start is
    // refused rather than serving an empty registry, and nothing in the directory changes.
    drop(o);
    let meta = dir.path().join("meta.db");
    // Cut in half (a disk that lost its end): said at once, not after a pool's time-out.
    let len = std::fs::metadata(&meta).unwrap().len();
    std::fs::File::options()
        .write(true)
        .open(&meta)
        .unwrap()
        .set_len(len / 2)
        .unwrap();
    let err = crate::blobstore::failing_start(dir.path(), &[]);
    assert!(
        err.contains("meta.db is damaged") && err.contains("restore it from a backup"),
        "{err}"
    );
    for lose in ["empty", "missing"] {
        match lose {
            "empty" => std::fs::File::create(&meta).map(drop).unwrap(),
            _ => std::fs::remove_file(&meta).unwrap(),
        }
        let err = crate::blobstore::failing_start(dir.path(), &[]);
        assert!(
            err.contains(&format!(
                "is {lose}: starting would serve an empty registry"
            )) && err.contains("Restore meta.db from a backup"),
            "{err}"
        );
        assert_eq!(meta.exists(), lose == "empty");
    }
}

#[tokio::test]
async fn stale_uploads_are_reaped() {
    let dir = tempfile::tempdir().unwrap();
    let o = Outpost::start(dir.path(), &[]);
    let c = client();
    let loc = start_upload(&c, &o, "stale").await;
    c.patch(o.url(&loc))
        .body(vec![0u8; 10])
        .send()
        .await
        .unwrap();
    drop(o);
    // Restart with a 1-second maximum upload age: the reaper removes the session.
    std::thread::sleep(Duration::from_millis(1100));
    let o = Outpost::start_env(dir.path(), &[("OUTPOST_UPLOAD_MAX_AGE_SECS", "1")]);
    let mut status = 0;
    for _ in 0..60 {
        status = c.get(o.url(&loc)).send().await.unwrap().status().as_u16();
        if status == 404 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(status, 404, "stale upload should be reaped");
    assert_eq!(
        std::fs::read_dir(dir.path().join("uploads"))
            .unwrap()
            .count(),
        0
    );
}

#[test]
fn bad_configuration_is_reported_clearly() {
    let dir = tempfile::tempdir().unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_outpost"))
        .args(["serve", "--config"])
        .arg(dir.path().join("missing.toml"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("missing.toml") && err.contains("does not exist"),
        "{err}"
    );

    let out = std::process::Command::new(env!("CARGO_BIN_EXE_outpost"))
        .args(["serve", "--data-dir"])
        .arg(dir.path())
        .env("OUTPOST_LOG_LEVEL", "loud")
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("loud"));
}

#[test]
fn port_in_use_is_reported() {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap().to_string();
    let dir = tempfile::tempdir().unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_outpost"))
        .args(["serve", "--listen", &addr, "--data-dir"])
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains(&addr), "{err}");
}

/// A soft open-files limit of 64 (as a shell or a container may set) does not cap the server
/// at ~60 clients: it raises the limit to the hard one, and hundreds of clients holding
/// connections open are all answered. With the hard limit low too, it says so at start.
#[tokio::test]
async fn many_clients_are_served_under_a_low_soft_open_files_limit() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let dir = tempfile::tempdir().unwrap();
    let o = Outpost::start_with_open_files(dir.path(), "64:8192");
    let mut conns = Vec::new();
    for _ in 0..300 {
        conns.push(tokio::net::TcpStream::connect(&o.addr).await.unwrap());
    }
    let answered = tokio::time::timeout(Duration::from_secs(30), async {
        let mut n = 0;
        for c in &mut conns {
            c.write_all(b"GET /v2/ HTTP/1.1\r\nHost: x\r\n\r\n")
                .await
                .unwrap();
            let mut buf = [0u8; 12];
            c.read_exact(&mut buf).await.unwrap();
            assert_eq!(&buf[..9], b"HTTP/1.1 ", "{}", String::from_utf8_lossy(&buf));
            n += 1;
        }
        n
    })
    .await;
    assert_eq!(
        answered.ok(),
        Some(300),
        "connections kept open were not all answered; log:\n{}",
        o.log()
    );
    assert!(!o.log().contains("open-files limit is low"), "{}", o.log());
    drop(conns);
    drop(o);

    let dir = tempfile::tempdir().unwrap();
    let o = Outpost::start_with_open_files(dir.path(), "256:256");
    let c = reqwest::Client::new();
    assert_eq!(c.get(o.url("/v2/")).send().await.unwrap().status(), 401);
    let log = o.log();
    assert!(
        log.contains("the open-files limit is low") && log.contains("open_files=256"),
        "{log}"
    );

    // Past the hard limit, new clients wait, and the log says why; once connections close,
    // the server answers again.
    let mut conns = Vec::new();
    for _ in 0..300 {
        conns.push(tokio::net::TcpStream::connect(&o.addr).await.unwrap());
    }
    support::eventually(
        "the log says the server is out of file descriptors",
        || async {
            o.log()
                .contains("cannot accept connections: out of file descriptors")
        },
    )
    .await;
    assert!(o.log().contains("open_files_limit=256"), "{}", o.log());
    drop(conns);
    support::eventually("the server answers again", || async {
        c.get(o.url("/v2/"))
            .timeout(Duration::from_secs(2))
            .send()
            .await
            .is_ok_and(|r| r.status() == 401)
    })
    .await;
}

#[tokio::test]
async fn first_start_prints_a_generated_admin_password_once() {
    let dir = tempfile::tempdir().unwrap();
    let start = || {
        let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_outpost"))
            .args(["serve", "--listen", "127.0.0.1:0", "--data-dir"])
            .arg(dir.path())
            .env_remove("OUTPOST_ADMIN_PASSWORD")
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let stderr = child.stderr.take().unwrap();
        let mut lines = std::io::BufRead::lines(std::io::BufReader::new(stderr));
        let mut seen = Vec::new();
        let mut addr = String::new();
        for line in lines.by_ref() {
            let line = line.unwrap();
            if let Some(p) = line.find("addr=") {
                addr = line[p + 5..].split_whitespace().next().unwrap().to_string();
                break;
            }
            seen.push(line);
        }
        (child, seen.join("\n"), addr)
    };
    let (mut child, out, addr) = start();
    let password = out
        .lines()
        .find_map(|l| l.trim().strip_prefix("password: "))
        .unwrap_or_else(|| panic!("no generated password in:\n{out}"))
        .to_string();
    assert_eq!(password.len(), 40);
    let r = reqwest::Client::new()
        .get(format!("http://{addr}/v2/_catalog"))
        .basic_auth("admin", Some(&password))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    child.kill().unwrap();
    child.wait().unwrap();
    let (mut child, out, _) = start();
    assert!(
        !out.contains("password:"),
        "the password must be shown only once:\n{out}"
    );
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(
        !std::fs::read_to_string(dir.path().join("meta.db"))
            .unwrap_or_default()
            .contains(&password)
    );
}

/// Runs `outpost <args>` against `o` as `user`; returns (success, stdout, stderr).
fn cli(o: &Outpost, user: &str, pass: &str, args: &[&str]) -> (bool, String, String) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_outpost"))
        .args(args)
        .args([
            "--registry",
            &o.url(""),
            "--username",
            user,
            "--password",
            pass,
        ])
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// A client that sends an upload's final `PUT` and goes away before the answer (a client
/// timeout, a dropped link): once begun, the commit is completed all the same, and never left
/// half-done (its file moved into the store but not recorded: the upload then claimed its
/// bytes, its `PUT` answered 404, and the blob could not be served).
#[tokio::test]
async fn an_upload_whose_client_leaves_during_the_final_put_is_completed() {
    let dir = tempfile::tempdir().unwrap();
    let o = Outpost::start(dir.path(), &[]);
    let c = client();
    for round in 0..3u8 {
        let loc = start_upload(&c, &o, "app").await;
        // Large enough that its commit (the fsync above all) takes a while.
        let data: Vec<u8> = (0..48u32 << 20)
            .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8 ^ round)
            .collect();
        let digest = sha256(&data);
        let r = c
            .patch(o.url(&loc))
            .header("content-type", "application/octet-stream")
            .body(data)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 202);
        let sep = if loc.contains('?') { '&' } else { '?' };
        let mut s = TcpStream::connect(&o.addr).unwrap();
        write!(
            s,
            "PUT {loc}{sep}digest={digest} HTTP/1.1\r\nHost: {}\r\nAuthorization: {}\r\nContent-Length: 0\r\n\r\n",
            o.addr,
            support::admin_auth()
        )
        .unwrap();
        s.flush().unwrap();
        std::thread::sleep(Duration::from_millis(3));
        drop(s);
        let served = || async {
            c.head(o.url(&format!("/v2/app/blobs/{digest}")))
                .send()
                .await
                .unwrap()
                .status()
                == 200
        };
        let mut done = false;
        for _ in 0..30 {
            if served().await {
                done = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        if !done {
            // Left before the server began the commit (a loaded machine): the upload is as
            // it was, and the client's next try completes it.
            let r = c
                .put(o.url(&format!("{loc}{sep}digest={digest}")))
                .send()
                .await
                .unwrap();
            let status = r.status();
            let body = r.text().await.unwrap();
            assert!(
                status == 201 || (status == 404 && served().await),
                "round {round}: the upload was left half-done: {status} {body}"
            );
        }
        assert!(served().await, "round {round}: the blob is not served");
    }
}

/// A command whose output goes to a pipe nobody reads any more (`| head -1`) ends quietly,
/// killed by SIGPIPE as `ls` would be: no panic, no "failed printing to stdout".
#[tokio::test]
async fn a_command_printing_into_a_closed_pipe_ends_quietly() {
    use std::os::unix::process::ExitStatusExt;
    let dir = tempfile::tempdir().unwrap();
    let o = Outpost::start(dir.path(), &[]);
    for args in [
        &["token", "list", "-o", "json"][..],
        &["token", "list"][..],
        &["config"][..],
    ] {
        let (reader, writer) = std::io::pipe().unwrap();
        drop(reader);
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_outpost"))
            .args(args)
            .args(["--registry", &o.url("")])
            .env("OUTPOST_USERNAME", "admin")
            .env("OUTPOST_PASSWORD", support::ADMIN_PASSWORD)
            .env("OUTPOST_DATA_DIR", dir.path())
            .stdin(std::process::Stdio::null())
            .stdout(writer)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.is_empty(), "{args:?}: {err}");
        assert_eq!(out.status.signal(), Some(13), "{args:?}: {:?}", out.status);
    }
}

#[tokio::test]
async fn token_and_scope_map_cli_end_to_end() {
    let dir = tempfile::tempdir().unwrap();
    let o = Outpost::start(dir.path(), &[]);
    let admin = support::ADMIN_PASSWORD;
    let (ok, out, err) = cli(
        &o,
        "admin",
        admin,
        &[
            "scope-map",
            "create",
            "-n",
            "readers",
            "--repository",
            "app",
            "content/read",
            "metadata/read",
            "--repository",
            "team/*",
            "content/read",
            "--description",
            "read-only",
        ],
    );
    assert!(ok, "{err}");
    assert!(
        out.contains("repositories/app/metadata/read")
            && out.contains("repositories/team/*/content/read"),
        "{out}"
    );

    // --repository on token create makes <token>-scope-map; passwords are printed once.
    let (ok, out, err) = cli(
        &o,
        "admin",
        admin,
        &[
            "token",
            "create",
            "-n",
            "pusher",
            "--repository",
            "app",
            "content/write",
            "content/read",
            "-o",
            "json",
        ],
    );
    assert!(ok, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["scopeMap"], "pusher-scope-map");
    let p1 = v["passwords"][0]["value"].as_str().unwrap().to_string();
    let p2 = v["passwords"][1]["value"].as_str().unwrap().to_string();

    // The new token works on the registry; its passwords never show again.
    let c = reqwest::Client::new();
    let up = c
        .post(o.url("/v2/app/blobs/uploads/"))
        .basic_auth("pusher", Some(&p1))
        .send()
        .await
        .unwrap();
    assert_eq!(up.status(), 202);
    let (_, out, _) = cli(
        &o,
        "admin",
        admin,
        &["token", "show", "-n", "pusher", "-o", "json"],
    );
    assert!(!out.contains(&p1) && !out.contains(&p2));

    // Rotation: password1 regenerated, the old one stops working, password2 still works.
    let (ok, out, err) = cli(
        &o,
        "admin",
        admin,
        &[
            "token",
            "credential",
            "generate",
            "-n",
            "pusher",
            "--password1",
            "--yes",
            "-o",
            "tsv",
        ],
    );
    assert!(ok, "{err}");
    let new1 = out
        .lines()
        .find_map(|l| l.strip_prefix("password1\t"))
        .unwrap()
        .to_string();
    for (pw, want) in [(&p1, 401), (&p2, 202), (&new1, 202)] {
        let r = c
            .post(o.url("/v2/app/blobs/uploads/"))
            .basic_auth("pusher", Some(pw))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status().as_u16(), want);
    }

    // list in every format
    let (_, table, _) = cli(&o, "admin", admin, &["token", "list"]);
    assert!(
        table.starts_with("NAME") && table.contains("pusher") && table.contains("admin"),
        "{table}"
    );
    let (_, tsv, _) = cli(&o, "admin", admin, &["scope-map", "list", "-o", "tsv"]);
    assert_eq!(tsv.lines().count(), 2, "{tsv}");

    // Errors a user can act on; destructive commands want --yes when not interactive.
    let (ok, _, err) = cli(&o, "admin", admin, &["token", "delete", "-n", "pusher"]);
    assert!(!ok && err.contains("--yes"), "{err}");
    let (ok, _, err) = cli(
        &o,
        "admin",
        admin,
        &[
            "scope-map",
            "create",
            "-n",
            "badmap",
            "--repository",
            "app",
            "content/pull",
        ],
    );
    assert!(!ok && err.contains("content/pull"), "{err}");
    let (ok, _, err) = cli(&o, "pusher", &new1, &["token", "list"]);
    assert!(!ok && err.contains("not the administrator"), "{err}");
    let (ok, _, err) = cli(&o, "admin", "wrong", &["token", "list"]);
    assert!(
        !ok && err.contains("incorrect username or password"),
        "{err}"
    );
    let (ok, _, err) = cli(
        &o,
        "admin",
        admin,
        &[
            "token",
            "create",
            "-n",
            "abc",
            "--repository",
            "app",
            "content/read",
        ],
    );
    assert!(!ok && err.contains("invalid"), "{err}");
    let (_, out, _) = cli(&o, "admin", admin, &["scope-map", "list", "-o", "tsv"]);
    assert!(
        !out.contains("abc-scope-map"),
        "a failed token create leaves no scope map behind"
    );

    let (ok, _, err) = cli(
        &o,
        "admin",
        admin,
        &["token", "delete", "-n", "pusher", "--yes"],
    );
    assert!(ok, "{err}");
    let (ok, _, err) = cli(&o, "admin", admin, &["token", "show", "-n", "pusher"]);
    assert!(!ok && err.contains("does not exist"), "{err}");
}

#[test]
fn cli_uses_docker_login_credentials() {
    let dir = tempfile::tempdir().unwrap();
    let o = Outpost::start(dir.path(), &[]);
    let docker = tempfile::tempdir().unwrap();
    let host = o.addr.clone();
    let auth = support::admin_auth();
    let b64 = auth.trim_start_matches("Basic ");
    std::fs::write(
        docker.path().join("config.json"),
        format!(r#"{{"auths":{{"{host}":{{"auth":"{b64}"}}}}}}"#),
    )
    .unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_outpost"))
        .args(["token", "list", "-o", "tsv", "--registry", &o.url("")])
        .env("DOCKER_CONFIG", docker.path())
        .env_remove("OUTPOST_USERNAME")
        .env_remove("OUTPOST_PASSWORD")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("admin"));
}

/// The actions of a scope map, through the CLI.
fn scope_map_actions(o: &Outpost, name: &str) -> Vec<String> {
    let (ok, out, err) = cli(
        o,
        "admin",
        support::ADMIN_PASSWORD,
        &["scope-map", "show", "-n", name, "-o", "json"],
    );
    assert!(ok, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    v["actions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap().to_string())
        .collect()
}

#[tokio::test]
async fn connected_registry_hierarchy_with_the_cli() {
    let dir = tempfile::tempdir().unwrap();
    let o = Outpost::start(dir.path(), &[]);
    let pw = support::ADMIN_PASSWORD;
    let run = |args: &[&str]| {
        let (ok, out, err) = cli(&o, "admin", pw, args);
        assert!(ok, "outpost {args:?} failed:\n{err}");
        out
    };
    // root → ReadWrite site → ReadOnly line
    run(&[
        "connected-registry",
        "create",
        "-n",
        "site-one",
        "-m",
        "ReadWrite",
        "--repository",
        "app",
        "base",
    ]);
    run(&[
        "token",
        "create",
        "-n",
        "line-reader",
        "--repository",
        "app",
        "content/read",
        "metadata/read",
        "--no-passwords",
    ]);
    run(&[
        "connected-registry",
        "create",
        "-n",
        "line-one",
        "-p",
        "site-one",
        "--repository",
        "app",
        "--client-tokens",
        "line-reader",
        "-s",
        "0 6 * * *",
        "-w",
        "PT2H",
    ]);
    // Changing a sync token's passwords warns that its registry's instances stop syncing.
    for (token, warned) in [("line-one", true), ("line-reader", false)] {
        let (ok, _, err) = cli(
            &o,
            "admin",
            pw,
            &[
                "token",
                "credential",
                "generate",
                "-n",
                token,
                "--password2",
                "--yes",
            ],
        );
        assert!(ok, "{err}");
        assert_eq!(
            err.contains(
                "It is the sync token of connected registry line-one: instances configured with the old password will stop syncing"
            ),
            warned,
            "{token}: {err}"
        );
    }
    let site = scope_map_actions(&o, "site-one");
    assert!(
        site.contains(&"gateway/line-one/message/read".to_string()),
        "{site:?}"
    );
    assert!(site.contains(&"repositories/app/content/write".to_string()));

    // The tree, in JSON and as a table.
    let list = run(&["connected-registry", "list", "-o", "json"]);
    let v: serde_json::Value = serde_json::from_str(&list).unwrap();
    assert_eq!(v[1]["parent"], "site-one");
    assert_eq!(v[1]["syncWindow"], "PT2H");
    assert_eq!(v[1]["clientTokens"], serde_json::json!(["line-reader"]));
    let table = run(&["connected-registry", "list"]);
    assert!(table.contains("└── line-one"), "{table}");
    assert!(
        table.lines().next().unwrap().starts_with("NAME") && table.contains("CONNECTION STATE"),
        "{table}"
    );
    // A registry under this one says so, and every row says why it is unhealthy (none is).
    assert!(
        table.contains("(this registry)") && table.contains("PROBLEMS"),
        "{table}"
    );

    // Rules surface as CLI errors a user can act on.
    let (ok, _, err) = cli(
        &o,
        "admin",
        pw,
        &[
            "connected-registry",
            "create",
            "-n",
            "cell-bad",
            "-p",
            "line-one",
            "-m",
            "ReadWrite",
            "--repository",
            "app",
        ],
    );
    assert!(
        !ok && err.contains("ReadOnly parent can only have ReadOnly children"),
        "{err}"
    );
    let (ok, _, err) = cli(
        &o,
        "admin",
        pw,
        &[
            "connected-registry",
            "create",
            "-n",
            "cell-two",
            "-p",
            "line-one",
            "--repository",
            "app",
            "-s",
            "0 6 * * *",
        ],
    );
    assert!(!ok && err.contains("sync window is required"), "{err}");

    // Adding a repository at the line adds it at the site; removing at the site removes it below.
    run(&[
        "connected-registry",
        "permissions",
        "update",
        "-n",
        "line-one",
        "--add",
        "tools",
    ]);
    assert!(
        scope_map_actions(&o, "site-one").contains(&"repositories/tools/content/read".to_string())
    );
    run(&[
        "connected-registry",
        "permissions",
        "update",
        "-n",
        "site-one",
        "--remove",
        "tools",
    ]);
    assert!(
        !scope_map_actions(&o, "line-one")
            .iter()
            .any(|a| a.contains("/tools/"))
    );

    // get-settings rotates a sync-token password; the connection string activates the line.
    let cs = run(&[
        "connected-registry",
        "get-settings",
        "-n",
        "line-one",
        "--parent-protocol",
        "http",
        "--generate-password",
        "1",
        "--yes",
        "-o",
        "tsv",
    ]);
    let cs = outpost_control_cs(cs.trim());
    let c = reqwest::Client::new();
    let activate = |pw: String, id: &'static str| {
        let c = c.clone();
        let url = o.url("/gateway/v1/line-one/activate");
        async move {
            c.post(url)
                .basic_auth("line-one", Some(pw))
                .json(&serde_json::json!({"instanceId": id}))
                .send()
                .await
                .unwrap()
                .status()
                .as_u16()
        }
    };
    assert_eq!(activate(cs.clone(), "first").await, 200);
    assert_eq!(activate(cs.clone(), "second").await, 409);
    let (ok, _, err) = cli(
        &o,
        "admin",
        pw,
        &["connected-registry", "deactivate", "-n", "line-one"],
    );
    assert!(!ok && err.contains("--yes"), "{err}");
    run(&[
        "connected-registry",
        "deactivate",
        "-n",
        "line-one",
        "--yes",
    ]);
    assert_eq!(activate(cs.clone(), "second").await, 200);
    // ACR's documented form: --query picks the connection string out of the JSON answer.
    let cs2 = run(&[
        "connected-registry",
        "get-settings",
        "-n",
        "line-one",
        "--parent-protocol",
        "http",
        "--generate-password",
        "1",
        "--query",
        "ACR_REGISTRY_CONNECTION_STRING",
        "--output",
        "tsv",
        "--yes",
    ]);
    assert!(
        cs2.starts_with("ConnectedRegistryName=line-one;") && cs2.lines().count() == 1,
        "{cs2}"
    );
    // Queries over lists, in each output form.
    let names = run(&[
        "connected-registry",
        "list",
        "--query",
        "[].name",
        "-o",
        "tsv",
    ]);
    assert_eq!(
        names.lines().collect::<Vec<_>>(),
        ["site-one", "line-one"],
        "{names}"
    );
    let json = run(&[
        "connected-registry",
        "list",
        "--query",
        "[?mode=='ReadOnly'].{name: name, parent: parent}",
        "-o",
        "json",
    ]);
    assert_eq!(
        serde_json::from_str::<serde_json::Value>(&json).unwrap(),
        serde_json::json!([{"name": "line-one", "parent": "site-one"}]),
        "{json}"
    );
    let table = run(&[
        "connected-registry",
        "show",
        "-n",
        "line-one",
        "--query",
        "{n: name, m: mode}",
    ]);
    assert_eq!(
        table.lines().map(str::trim_end).collect::<Vec<_>>(),
        ["N         M", "--------  --------", "line-one  ReadOnly"],
        "{table}"
    );
    // az's `-o none`: nothing on stdout.
    assert_eq!(run(&["connected-registry", "list", "-o", "none"]), "");
    // A query that does not parse is refused before the command changes anything.
    let (ok, _, err) = cli(
        &o,
        "admin",
        pw,
        &[
            "connected-registry",
            "deactivate",
            "-n",
            "line-one",
            "--yes",
            "--query",
            "[?",
        ],
    );
    assert!(!ok && err.contains("invalid --query"), "{err}");
    // A query that selects nothing from an answer with a new password does not lose it.
    let (ok, out, err) = cli(
        &o,
        "admin",
        pw,
        &[
            "token",
            "create",
            "-n",
            "query-tok",
            "--repository",
            "tools",
            "content/read",
            "--query",
            "passwrods[0].value",
            "-o",
            "tsv",
        ],
    );
    assert!(ok && out.trim().is_empty(), "{out}{err}");
    assert!(
        err.contains("selected nothing") && err.contains("\"value\""),
        "{err}"
    );
    assert_eq!(
        activate(outpost_control_cs(cs2.trim()), "third").await,
        409,
        "still active: the deactivate did not run"
    );
    assert_eq!(
        activate(cs.clone(), "second").await,
        401,
        "the rotated password stops working"
    );
    assert_eq!(
        activate(outpost_control_cs(cs2.trim()), "second").await,
        200
    );

    // Tear down: the line first (the site has a child), with cleanup.
    let (ok, _, err) = cli(
        &o,
        "admin",
        pw,
        &[
            "connected-registry",
            "delete",
            "-n",
            "site-one",
            "--yes",
            "--force",
        ],
    );
    assert!(!ok && err.contains("has children"), "{err}");
    run(&[
        "connected-registry",
        "delete",
        "-n",
        "line-one",
        "--cleanup",
        "--force",
        "--yes",
    ]);
    assert!(
        !scope_map_actions(&o, "site-one")
            .iter()
            .any(|a| a.starts_with("gateway/line-one/"))
    );
    let (ok, _, _) = cli(&o, "admin", pw, &["token", "show", "-n", "line-one"]);
    assert!(!ok, "the sync token was cleaned up");
    run(&[
        "connected-registry",
        "delete",
        "-n",
        "site-one",
        "--cleanup",
        "--yes",
    ]);
    assert_eq!(
        run(&["connected-registry", "list", "-o", "json"]).trim(),
        "[]"
    );
}

/// The sync-token password inside a connection string.
fn outpost_control_cs(cs: &str) -> String {
    cs.split(';')
        .find_map(|kv| kv.strip_prefix("SyncTokenPassword="))
        .unwrap_or_else(|| panic!("no password in {cs}"))
        .to_string()
}

#[test]
fn connected_registry_limits_come_from_configuration() {
    let dir = tempfile::tempdir().unwrap();
    let create = |o: &Outpost, name: &str| {
        let args = [
            "connected-registry",
            "create",
            "-n",
            name,
            "--repository",
            "app",
            "-s",
            "*/5 * * * *",
            "-w",
            "PT2M",
            "--sync-message-ttl",
            "PT6H",
        ];
        cli(o, "admin", support::ADMIN_PASSWORD, &args)
    };
    // ACR's bounds by default: a 2-minute window is refused.
    let o = Outpost::start(dir.path(), &[]);
    let (ok, _, err) = create(&o, "short-one");
    assert!(!ok && err.contains("between 1 hour"), "{err}");
    drop(o);
    // An operator (or a test) shortens them through ordinary configuration.
    let o = Outpost::start_env(
        dir.path(),
        &[
            ("OUTPOST_MIN_SYNC_WINDOW", "PT1M"),
            ("OUTPOST_MIN_MESSAGE_TTL", "PT1H"),
        ],
    );
    let (ok, out, err) = create(&o, "short-two");
    assert!(ok, "{err}");
    assert!(out.contains("PT2M"), "{out}");
    drop(o);
    // A bad value is named.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_outpost"))
        .args(["serve", "--data-dir"])
        .arg(dir.path())
        .env("OUTPOST_MAX_MESSAGE_TTL", "forever")
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("max_message_ttl"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A chunk sent at the wrong offset is refused with 416 and the upload's `Range`, and the
/// client actually receives that answer: the server reads the chunk first. (Answering with
/// unread request bytes resets the connection, and the client would see "connection reset"
/// instead of the offset to resume from.)
#[tokio::test]
async fn a_chunk_at_the_wrong_offset_gets_its_416_not_a_reset() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let dir = tempfile::tempdir().unwrap();
    let o = Outpost::start(dir.path(), &[]);
    let admin = support::client_as("admin", support::ADMIN_PASSWORD);
    let r = admin
        .post(o.url("/v2/big/blobs/uploads/"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    let loc = r.headers()["location"].to_str().unwrap().to_string();
    let loc = loc.strip_prefix(&o.base()).unwrap_or(&loc).to_string();
    const LEN: usize = 32 << 20;
    let mut s = tokio::net::TcpStream::connect(&o.addr).await.unwrap();
    let head = format!(
        "PATCH {loc} HTTP/1.1\r\nHost: {}\r\nAuthorization: {}\r\nContent-Type: application/octet-stream\r\n\
         Content-Range: {LEN}-{}\r\nContent-Length: {LEN}\r\n\r\n",
        o.addr,
        support::admin_auth(),
        2 * LEN - 1
    );
    s.write_all(head.as_bytes()).await.unwrap();
    let (mut rd, mut wr) = s.into_split();
    // The whole chunk goes out before the answer is read, as a client streaming a file does.
    let chunk = vec![0u8; 1 << 20];
    for _ in 0..LEN >> 20 {
        if let Err(e) = wr.write_all(&chunk).await {
            panic!("the server stopped reading the chunk ({e}): its answer would be lost");
        }
    }
    let mut answer = Vec::new();
    let mut buf = [0u8; 4096];
    while !answer.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = rd
            .read(&mut buf)
            .await
            .expect("the connection was reset before the answer arrived");
        assert!(
            n > 0,
            "closed before an answer: {}",
            String::from_utf8_lossy(&answer)
        );
        answer.extend_from_slice(&buf[..n]);
    }
    let text = String::from_utf8_lossy(&answer).to_ascii_lowercase();
    assert!(text.starts_with("http/1.1 416"), "{text}");
    assert!(
        text.contains("\r\nrange: 0-0\r\n"),
        "the upload's Range: {text}"
    );
}

#[tokio::test]
async fn readiness_and_garbage_collection_from_the_cli() {
    let dir = tempfile::tempdir().unwrap();
    let o = Outpost::start(dir.path(), &[]);
    let admin = client_as("admin", ADMIN_PASSWORD);
    let base = o.base();
    let base = base.as_str();
    push_image(&admin, base, "team/app", "1.4", "ready").await;

    let (ok, out, err) = cli(&o, "admin", ADMIN_PASSWORD, &["readiness", "team/app:1.4"]);
    assert!(ok, "{out}{err}");
    assert!(
        out.lines().nth(2).unwrap().trim_end().ends_with("yes"),
        "{out}"
    );
    let (ok, _, err) = cli(&o, "admin", ADMIN_PASSWORD, &["readiness", "team/app:1.5"]);
    assert!(!ok);
    assert!(err.contains("1.5"), "{err}");
    // Not ready exits 1; not being able to ask (a wrong password here) exits 2, so that a
    // loop waiting for readiness does not wait for ever on a typo.
    let status = |pass: &str, image: &str| {
        std::process::Command::new(env!("CARGO_BIN_EXE_outpost"))
            .args(["readiness", image, "--registry", &o.url("")])
            .args(["--username", "admin", "--password", pass])
            .output()
            .unwrap()
            .status
            .code()
    };
    assert_eq!(status(ADMIN_PASSWORD, "team/app:1.5"), Some(1));
    assert_eq!(status("wrong", "team/app:1.4"), Some(2));
    assert_eq!(status(ADMIN_PASSWORD, "team/app:1.4"), Some(0));
    let (ok, _, err) = cli(&o, "admin", ADMIN_PASSWORD, &["readiness", "team/app"]);
    assert!(!ok && err.contains("no tag or digest"), "{err}");
    // --wait waits for an image that has not arrived yet.
    let waiter = std::process::Command::new(env!("CARGO_BIN_EXE_outpost"))
        .args([
            "readiness",
            "team/app:later",
            "--wait",
            "60",
            "--registry",
            &o.url(""),
        ])
        .args(["--username", "admin", "--password", ADMIN_PASSWORD])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    tokio::time::sleep(Duration::from_millis(2500)).await;
    push_image(
        &admin,
        base,
        "team/app",
        "later",
        "arrives while waited for",
    )
    .await;
    let out = waiter.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // A blob pushed and never used: a dry run reports it, a run with no age limit removes it.
    push_blob(&admin, base, "team/app", b"never referenced").await;
    let (ok, out, err) = cli(
        &o,
        "admin",
        ADMIN_PASSWORD,
        &["gc", "--dry-run", "--min-age-secs", "0", "-o", "json"],
    );
    assert!(ok, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(
        (v["dryRun"].clone(), v["blobsRemoved"].clone()),
        (true.into(), 1.into())
    );
    let (ok, out, err) = cli(&o, "admin", ADMIN_PASSWORD, &["gc", "--min-age-secs", "0"]);
    assert!(ok, "{err}");
    assert!(out.contains("BLOBS REMOVED"), "{out}");
    let (ok, out, _) = cli(
        &o,
        "admin",
        ADMIN_PASSWORD,
        &["readiness", "team/app:1.4", "-o", "json"],
    );
    assert!(ok, "the image's own blobs stay: {out}");
    let metrics = support::metrics(base).await;
    assert_eq!(
        support::metric(&metrics, "outpost_gc_blobs_removed_total"),
        Some(1),
        "{metrics}"
    );
    assert!(
        support::metric(&metrics, "outpost_upload_received_bytes_total").unwrap_or(0)
            >= 2 * 300_000,
        "two images' layers were pushed: {metrics}"
    );
    // When the last collection ran survives a restart (an alert on its age must not fire
    // because the server restarted).
    let ran = support::metric(&metrics, "outpost_gc_last_run_timestamp_seconds");
    assert!(ran.is_some_and(|t| t > 0), "{metrics}");
    o.terminate();
    let o = Outpost::start(dir.path(), &[]);
    let metrics = support::metrics(&o.base()).await;
    assert_eq!(
        support::metric(&metrics, "outpost_gc_last_run_timestamp_seconds"),
        ran,
        "{metrics}"
    );
}

#[test]
fn json_logs_are_one_object_per_line() {
    use std::io::BufRead;
    let dir = tempfile::tempdir().unwrap();
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_outpost"))
        .args(["serve", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(dir.path())
        .env("OUTPOST_LOG_FORMAT", "json")
        .env("OUTPOST_ADMIN_PASSWORD", ADMIN_PASSWORD)
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = std::io::BufReader::new(child.stderr.take().unwrap());
    let mut listening = None;
    for line in stderr.lines() {
        let line = line.unwrap();
        let v: serde_json::Value =
            serde_json::from_str(&line).unwrap_or_else(|e| panic!("{e}: not JSON: {line}"));
        assert!(
            v["timestamp"].is_string() && v["level"].is_string(),
            "{line}"
        );
        if v["fields"]["message"] == "outpost listening" {
            listening = Some(v);
            break;
        }
    }
    child.kill().unwrap();
    child.wait().unwrap();
    let v = listening.expect("the listening line");
    assert_eq!(v["level"], "INFO");
    assert!(
        v["fields"]["addr"]
            .as_str()
            .unwrap()
            .starts_with("127.0.0.1:"),
        "{v}"
    );
    // An unknown format is refused at start.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_outpost"))
        .args(["serve", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(dir.path())
        .env("OUTPOST_LOG_FORMAT", "xml")
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("not text or json"));
}

/// A disk filled to the last few KiB by the registry's own data: deleting and garbage
/// collection still work (they are how an operator makes room), and pushing works again once
/// they have freed room.
#[tokio::test]
async fn deleting_and_collecting_work_on_a_full_disk() {
    if !sync::may_mount() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let o = Outpost::start_on_small_disk(dir.path(), "24m", &[]);
    let c = client();
    let base = o.base();
    let keep = push_image(&c, &base, "keep", "v1", "kept").await;
    let junk = push_image(&c, &base, "junk", "v1", "junk").await;
    let big: Vec<u8> = (0..4u32 << 20).map(|i| (i % 251) as u8).collect();
    push_blob(&c, &base, "junk", &big).await;
    // Let the server take its reserve, then fill the disk with an upload, in ever smaller
    // chunks, until not even 4 KiB fit.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let loc = support::fill_disk_with_an_upload(&c, &base, "filler", 4 << 10).await;
    // A push is refused with a message that says what to do.
    let r = c
        .post(o.url("/v2/keep/blobs/uploads/"))
        .send()
        .await
        .unwrap();
    if r.status() == 202 {
        let next = r.headers()["location"].to_str().unwrap().to_string();
        let r = c
            .patch(o.url(&next))
            .body(vec![4u8; 64 << 10])
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 507);
    } else {
        assert_eq!(r.status(), 507);
        let body = r.text().await.unwrap();
        assert!(
            body.contains("`outpost gc` work while it is full"),
            "{body}"
        );
    }

    // Deleting an image goes through.
    let r = c
        .delete(o.url(&format!("/v2/junk/manifests/{junk}")))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202, "{}", r.text().await.unwrap());
    // So does garbage collection, which frees the 4 MiB blob nothing references.
    let (ok, out, err) = cli(
        &o,
        "admin",
        ADMIN_PASSWORD,
        &["gc", "--min-age-secs", "0", "-o", "json"],
    );
    assert!(ok, "gc failed: {err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert!(v["bytesFreed"].as_u64().unwrap() >= 4 << 20, "{v}");
    // The filler gives its room back too, and pushing works again.
    let r = c.delete(o.url(&loc)).send().await.unwrap();
    assert_eq!(r.status(), 204);
    push_image(&c, &base, "keep", "v2", "after").await;
    assert_eq!(
        support::tag_digest(&c, &base, "keep", "v1")
            .await
            .as_deref(),
        Some(keep.as_str()),
        "what was kept is intact"
    );
}

/// A manifest announced larger than the limit, by a client that waits for `100 Continue`:
/// the refusal comes at once, and no `100 Continue` invites the body.
#[test]
fn an_oversized_manifest_is_refused_before_its_body_is_sent() {
    use std::io::{BufRead, BufReader};
    let dir = tempfile::tempdir().unwrap();
    let o = Outpost::start(dir.path(), &[]);
    let mut s = TcpStream::connect(&o.addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(
        s,
        "PUT /v2/app/manifests/big HTTP/1.1\r\nHost: {}\r\nAuthorization: {}\r\n\
         Content-Type: application/vnd.oci.image.manifest.v1+json\r\n\
         Content-Length: 20000000\r\nExpect: 100-continue\r\n\r\n",
        o.addr,
        support::admin_auth()
    )
    .unwrap();
    let mut status = String::new();
    BufReader::new(&s).read_line(&mut status).unwrap();
    assert!(
        status.starts_with("HTTP/1.1 413"),
        "the first answer line: {status:?}"
    );
}

/// `outpost_http_response_body_bytes_total` counts what went out: a client that reads a few
/// bytes of a large blob and hangs up is not counted for the whole blob.
#[tokio::test]
async fn an_abandoned_download_counts_only_the_bytes_sent() {
    let dir = tempfile::tempdir().unwrap();
    let o = Outpost::start(dir.path(), &[]);
    let admin = client_as("admin", ADMIN_PASSWORD);
    let base = o.base();
    let blob = vec![7u8; 64 << 20];
    push_blob(&admin, &base, "big", &blob).await;
    let digest = support::sha256_hex(&blob);
    let sent = || async {
        let text = support::metrics(&base).await;
        support::metric(
            &text,
            "outpost_http_response_body_bytes_total{route=\"blob\"}",
        )
        .unwrap_or(0)
    };
    let before = sent().await;
    let mut resp = admin
        .get(format!("{base}/v2/big/blobs/{digest}"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let first = resp.chunk().await.unwrap().unwrap();
    assert!(!first.is_empty());
    drop(resp);
    // The server stops writing once the connection is gone; at most the socket buffers were
    // filled before.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let counted = sent().await - before;
    assert!(
        counted > 0 && counted < 32 << 20,
        "{counted} bytes counted for a download abandoned after {} bytes",
        first.len()
    );
}
