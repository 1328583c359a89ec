//! Test support for process-level tests: [`Outpost`] runs the real binary on `127.0.0.1:0` in
//! a temporary data directory, reads the bound address from its log, and on drop (or failure)
//! prints the log so a CI failure explains itself.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The administrator password every test instance is started with.
pub const ADMIN_PASSWORD: &str = "process-test-admin";

/// `Authorization` header value for the administrator.
pub fn admin_auth() -> String {
    // base64 of "admin:process-test-admin"
    format!(
        "Basic {}",
        base64_encode(format!("admin:{ADMIN_PASSWORD}").as_bytes())
    )
}

pub fn base64_encode(data: &[u8]) -> String {
    const T: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for c in data.chunks(3) {
        let b = [c[0], *c.get(1).unwrap_or(&0), *c.get(2).unwrap_or(&0)];
        let n = (b[0] as u32) << 16 | (b[1] as u32) << 8 | b[2] as u32;
        for i in 0..4 {
            if i <= c.len() {
                out.push(T[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

pub struct Outpost {
    pub child: Child,
    pub addr: String,
    log: Arc<Mutex<Vec<String>>>,
}

impl Outpost {
    /// Starts `outpost serve` on an ephemeral port with `data_dir`.
    pub fn start(data_dir: &Path, extra: &[&str]) -> Outpost {
        Self::spawn(data_dir, extra, &[])
    }

    /// Like [`Outpost::start`], with extra environment variables.
    pub fn start_env(data_dir: &Path, env: &[(&str, &str)]) -> Outpost {
        Self::spawn(data_dir, &[], env)
    }

    /// Like [`Outpost::start_env`], with `data_dir` on a fresh tmpfs of `size` (e.g. "16m")
    /// mounted in a private mount namespace of the server alone: a small disk that fills up,
    /// and disappears with the process. Needs root (CAP_SYS_ADMIN) and `unshare`.
    pub fn start_on_small_disk(data_dir: &Path, size: &str, env: &[(&str, &str)]) -> Outpost {
        let mut cmd = Command::new("unshare");
        cmd.args(["--mount", "--propagation", "private", "--", "sh", "-c"])
            .arg(r#"mount -t tmpfs -o "size=$1" outpost-test "$2" && shift 2 && exec "$@""#)
            .args(["sh", size])
            .arg(data_dir)
            .arg(env!("CARGO_BIN_EXE_outpost"));
        Self::spawn_cmd(cmd, data_dir, &[], env)
    }

    /// Like [`Outpost::start`], under an open-files limit of `soft:hard` (`prlimit`'s form).
    pub fn start_with_open_files(data_dir: &Path, limit: &str) -> Outpost {
        let mut cmd = Command::new("prlimit");
        cmd.arg(format!("--nofile={limit}"))
            .arg("--")
            .arg(env!("CARGO_BIN_EXE_outpost"));
        Self::spawn_cmd(cmd, data_dir, &[], &[])
    }

    /// Like [`Outpost::start_env`], with the system clock it sees moved by `offset`
    /// (libfaketime's form: `-3d`, `+2h`): a ship whose clock is wrong. The monotonic clock
    /// stays true, as a real one does whatever the wall clock says.
    pub fn start_with_clock(data_dir: &Path, offset: &str, env: &[(&str, &str)]) -> Outpost {
        // The library itself, not the `faketime` command: that one forks, and killing it
        // would leave the server running.
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_outpost"));
        cmd.env("LD_PRELOAD", libfaketime())
            .env("FAKETIME", offset)
            .env("DONT_FAKE_MONOTONIC", "1");
        Self::spawn_cmd(cmd, data_dir, &[], env)
    }

    /// Like [`Outpost::start_env`], with a system clock moved by what `file` says, read
    /// afresh at every look (libfaketime's `FAKETIME_TIMESTAMP_FILE`: `+0`, `-1d`): a clock
    /// set wrong, or right, while the server runs.
    pub fn start_with_clock_file(data_dir: &Path, file: &Path, env: &[(&str, &str)]) -> Outpost {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_outpost"));
        cmd.env("LD_PRELOAD", libfaketime())
            .env("FAKETIME_TIMESTAMP_FILE", file)
            .env("FAKETIME_NO_CACHE", "1")
            .env("DONT_FAKE_MONOTONIC", "1");
        Self::spawn_cmd(cmd, data_dir, &[], env)
    }

    /// Like [`Outpost::start_env`], listening on `listen` (an address other processes must
    /// know before it starts).
    pub fn start_listen(data_dir: &Path, listen: &str, env: &[(&str, &str)]) -> Outpost {
        Self::spawn_cmd_on(
            Command::new(env!("CARGO_BIN_EXE_outpost")),
            data_dir,
            listen,
            &[],
            env,
        )
    }

    fn spawn(data_dir: &Path, extra: &[&str], env: &[(&str, &str)]) -> Outpost {
        Self::spawn_cmd(
            Command::new(env!("CARGO_BIN_EXE_outpost")),
            data_dir,
            extra,
            env,
        )
    }

    fn spawn_cmd(cmd: Command, data_dir: &Path, extra: &[&str], env: &[(&str, &str)]) -> Outpost {
        Self::spawn_cmd_on(cmd, data_dir, "127.0.0.1:0", extra, env)
    }

    fn spawn_cmd_on(
        mut cmd: Command,
        data_dir: &Path,
        listen: &str,
        extra: &[&str],
        env: &[(&str, &str)],
    ) -> Outpost {
        let mut child = cmd
            .args(["serve", "--listen", listen, "--data-dir"])
            .arg(data_dir)
            .args(extra)
            .env("OUTPOST_ADMIN_PASSWORD", ADMIN_PASSWORD)
            .envs(env.iter().copied())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn outpost");
        let stderr = child.stderr.take().expect("stderr");
        let log = Arc::new(Mutex::new(Vec::new()));
        let (tx, rx) = std::sync::mpsc::channel();
        let log2 = log.clone();
        std::thread::spawn(move || {
            let mut tx = Some(tx);
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if let Some(pos) = line.find("addr=")
                    && let Some(t) = tx.take()
                {
                    let addr = line[pos + 5..]
                        .split_whitespace()
                        .next()
                        .unwrap_or("")
                        .to_string();
                    let _ = t.send(addr);
                }
                log2.lock().unwrap().push(line);
            }
        });
        let addr = rx
            .recv_timeout(Duration::from_secs(20))
            .unwrap_or_else(|_| {
                panic!(
                    "outpost did not report its address; log:\n{}",
                    log.lock().unwrap().join("\n")
                )
            });
        Outpost { child, addr, log }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    /// The base URL, `http://host:port` with no trailing slash.
    pub fn base(&self) -> String {
        self.url("")
    }

    pub fn log(&self) -> String {
        self.log.lock().unwrap().join("\n")
    }

    /// Sends SIGKILL and waits for the process to be gone.
    pub fn kill9(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        std::mem::forget(self);
    }

    /// Sends SIGTERM and waits (up to 20 s) for a clean exit; returns the exit status.
    pub fn terminate(mut self) -> std::process::ExitStatus {
        let pid = self.child.id().to_string();
        let _ = Command::new("kill").args(["-TERM", &pid]).status();
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(status) = self.child.try_wait().expect("wait") {
                std::thread::sleep(Duration::from_millis(50));
                let out = self.log();
                std::mem::forget(self);
                println!("{out}");
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "outpost did not stop on SIGTERM:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Outpost {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!("---- outpost log ----\n{}", self.log());
        }
    }
}

/// A reqwest client that authenticates as `user`.
/// libfaketime's library for threaded programs (Debian package `faketime`).
fn libfaketime() -> std::path::PathBuf {
    std::fs::read_dir("/usr/lib")
        .expect("/usr/lib")
        .filter_map(Result::ok)
        .map(|d| d.path().join("faketime/libfaketimeMT.so.1"))
        .find(|p| p.exists())
        .expect("libfaketime is not installed: run tests/deps.sh (Debian package faketime)")
}

pub fn client_as(user: &str, pass: &str) -> reqwest::Client {
    let mut h = reqwest::header::HeaderMap::new();
    let auth = format!(
        "Basic {}",
        base64_encode(format!("{user}:{pass}").as_bytes())
    );
    h.insert("authorization", auth.parse().expect("header"));
    reqwest::Client::builder()
        .timeout(Duration::from_secs(60))
        .default_headers(h)
        .build()
        .expect("client")
}

pub fn sha256_hex(data: &[u8]) -> String {
    use sha2::Digest as _;
    format!("sha256:{}", hex::encode(sha2::Sha256::digest(data)))
}

/// Pushes a blob with POST then PUT (the two-step upload every registry supports).
pub async fn push_blob(c: &reqwest::Client, base: &str, repo: &str, blob: &[u8]) {
    let d = sha256_hex(blob);
    let r = c
        .post(format!("{base}/v2/{repo}/blobs/uploads/"))
        .send()
        .await
        .expect("start upload");
    assert_eq!(r.status(), 202, "upload start at {base}");
    let loc = r.headers()["location"]
        .to_str()
        .expect("location")
        .to_string();
    let loc = if loc.starts_with("http") {
        loc
    } else {
        format!("{base}{loc}")
    };
    let sep = if loc.contains('?') { '&' } else { '?' };
    let r = c
        .put(format!("{loc}{sep}digest={d}"))
        .body(blob.to_vec())
        .send()
        .await
        .expect("finish upload");
    assert_eq!(r.status(), 201, "blob push to {base}");
}

/// The layer [`push_image`] makes from `seed`.
pub fn seed_layer(seed: &str) -> Vec<u8> {
    seed.bytes().cycle().take(300_000).collect()
}

/// Where the data directory `data_dir` keeps the file of blob `digest` (`sha256:…`), on
/// local disk (docs/storage-layout.md).
pub fn blob_file(data_dir: &Path, digest: &str) -> std::path::PathBuf {
    let hex = digest.trim_start_matches("sha256:");
    data_dir.join("blobs/sha256").join(&hex[..2]).join(hex)
}

/// Pushes a one-layer image (contents derived from `seed`) as `repo:tag`; returns its digest.
pub async fn push_image(
    c: &reqwest::Client,
    base: &str,
    repo: &str,
    tag: &str,
    seed: &str,
) -> String {
    let config = format!("{{\"seed\":\"{seed}\"}}").into_bytes();
    let layer = seed_layer(seed);
    for blob in [&config, &layer] {
        push_blob(c, base, repo, blob).await;
    }
    let manifest = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": sha256_hex(&config), "size": config.len()},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": sha256_hex(&layer), "size": layer.len()}]
    });
    let bytes = serde_json::to_vec(&manifest).expect("json");
    let r = c
        .put(format!("{base}/v2/{repo}/manifests/{tag}"))
        .header("content-type", "application/vnd.oci.image.manifest.v1+json")
        .body(bytes.clone())
        .send()
        .await
        .expect("push manifest");
    assert_eq!(r.status(), 201, "manifest push to {base}");
    sha256_hex(&bytes)
}

/// The digest `repo:tag` has at `base`, if any.
pub async fn tag_digest(c: &reqwest::Client, base: &str, repo: &str, tag: &str) -> Option<String> {
    let r = c
        .head(format!("{base}/v2/{repo}/manifests/{tag}"))
        .header("accept", "application/vnd.oci.image.manifest.v1+json")
        .send()
        .await
        .ok()?;
    if !r.status().is_success() {
        return None;
    }
    r.headers()
        .get("docker-content-digest")
        .and_then(|v| v.to_str().ok())
        .map(String::from)
}

/// Waits (up to 30 s) until `check` holds; panics with `what` otherwise. A liveness bound for
/// asynchronous sync, not a performance assertion.
pub async fn eventually<F, Fut>(what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        if check().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("timed out waiting until {what}");
}

/// A TCP proxy between a child and its parent that counts the bytes it carries downstream,
/// can throttle them, and can cut every open connection once a byte budget is spent — how a
/// test reproduces a link that drops mid-blob.
pub struct FaultProxy {
    pub addr: String,
    /// Bytes forwarded from the parent to the child so far.
    pub downstream: Arc<std::sync::atomic::AtomicU64>,
    /// Cut all connections when `downstream` passes this (u64::MAX: never).
    pub cut_at: Arc<std::sync::atomic::AtomicU64>,
    /// Downstream bytes per second per connection (0: unlimited).
    pub rate: Arc<std::sync::atomic::AtomicU64>,
    /// While true, the link is down: new connections are dropped at once.
    pub blocked: Arc<std::sync::atomic::AtomicBool>,
    /// Flip the bits of the downstream byte at this position (counted like `downstream`),
    /// once (u64::MAX: never) — a parent or a link that corrupts data.
    pub corrupt_at: Arc<std::sync::atomic::AtomicU64>,
    /// Bytes forwarded from the child to the parent so far.
    pub upstream: Arc<std::sync::atomic::AtomicU64>,
    /// Cut all connections when `upstream` passes this (u64::MAX: never), once.
    pub up_cut_at: Arc<std::sync::atomic::AtomicU64>,
    /// Once `downstream` passes this, the connection carrying that byte stops forwarding but
    /// stays open, forever (u64::MAX: never); later connections are normal — a link that
    /// drops packets instead of resetting.
    pub stall_at: Arc<std::sync::atomic::AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl FaultProxy {
    pub async fn start(target: &str) -> FaultProxy {
        use std::sync::atomic::{AtomicU64, Ordering};
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind proxy");
        let addr = listener.local_addr().expect("addr").to_string();
        let downstream = Arc::new(AtomicU64::new(0));
        let cut_at = Arc::new(AtomicU64::new(u64::MAX));
        let rate = Arc::new(AtomicU64::new(0));
        let blocked = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let corrupt_at = Arc::new(AtomicU64::new(u64::MAX));
        let stall_at = Arc::new(AtomicU64::new(u64::MAX));
        let upstream = Arc::new(AtomicU64::new(0));
        let up_cut_at = Arc::new(AtomicU64::new(u64::MAX));
        let (up, up_cut) = (upstream.clone(), up_cut_at.clone());
        let target = target.to_string();
        let (d, c, r, b, x, st) = (
            downstream.clone(),
            cut_at.clone(),
            rate.clone(),
            blocked.clone(),
            corrupt_at.clone(),
            stall_at.clone(),
        );
        let task = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                if b.load(Ordering::Relaxed) {
                    drop(client);
                    continue;
                }
                let Ok(upstream) = tokio::net::TcpStream::connect(&target).await else {
                    continue;
                };
                let (mut cr, mut cw) = client.into_split();
                let (mut ur, mut uw) = upstream.into_split();
                let (up, up_cut, down) = (up.clone(), up_cut.clone(), b.clone());
                tokio::spawn(async move {
                    let mut buf = vec![0u8; 64 * 1024];
                    loop {
                        let n = match cr.read(&mut buf).await {
                            Ok(0) | Err(_) => break,
                            Ok(n) => n,
                        };
                        if down.load(Ordering::Relaxed) {
                            break; // the link is down: nothing reaches the parent either
                        }
                        let total = up.fetch_add(n as u64, Ordering::Relaxed) + n as u64;
                        if total > up_cut.load(Ordering::Relaxed) {
                            up_cut.store(u64::MAX, Ordering::Relaxed);
                            break; // the link drops mid-upload
                        }
                        if uw.write_all(&buf[..n]).await.is_err() {
                            break;
                        }
                    }
                    let _ = uw.shutdown().await;
                });
                let (d, c, r, b, x, st) = (
                    d.clone(),
                    c.clone(),
                    r.clone(),
                    b.clone(),
                    x.clone(),
                    st.clone(),
                );
                tokio::spawn(async move {
                    let mut buf = vec![0u8; 64 * 1024];
                    loop {
                        let rate = r.load(Ordering::Relaxed);
                        let want = if rate > 0 {
                            buf.len().min((rate / 20).max(1) as usize)
                        } else {
                            buf.len()
                        };
                        let n = match ur.read(&mut buf[..want]).await {
                            Ok(0) | Err(_) => break,
                            Ok(n) => n,
                        };
                        if b.load(Ordering::Relaxed) {
                            break; // the link went down: open connections die too
                        }
                        let total = d.fetch_add(n as u64, Ordering::Relaxed) + n as u64;
                        let at = x.load(Ordering::Relaxed);
                        if at < total && at >= total - n as u64 {
                            buf[(at - (total - n as u64)) as usize] ^= 0xff;
                            x.store(u64::MAX, Ordering::Relaxed);
                        }
                        if total > st.load(Ordering::Relaxed) {
                            st.store(u64::MAX, Ordering::Relaxed);
                            let _hold_open = (cw, ur);
                            std::future::pending::<()>().await;
                            unreachable!();
                        }
                        if total > c.load(Ordering::Relaxed) {
                            // Deliver up to the budget, then drop the connection mid-stream.
                            c.store(u64::MAX, Ordering::Relaxed);
                            break;
                        }
                        if cw.write_all(&buf[..n]).await.is_err() {
                            break;
                        }
                        if rate > 0 {
                            tokio::time::sleep(Duration::from_secs_f64(n as f64 / rate as f64))
                                .await;
                        }
                    }
                    let _ = cw.shutdown().await;
                });
            }
        });
        FaultProxy {
            addr,
            downstream,
            cut_at,
            rate,
            blocked,
            corrupt_at,
            stall_at,
            upstream,
            up_cut_at,
            task,
        }
    }

    pub fn bytes(&self) -> u64 {
        self.downstream.load(std::sync::atomic::Ordering::Relaxed)
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Pushes one `size`-byte blob plus a manifest for it as `repo:tag`; returns the blob digest.
pub async fn push_big_image(
    c: &reqwest::Client,
    base: &str,
    repo: &str,
    tag: &str,
    size: usize,
) -> String {
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    let layer: Vec<u8> = (0..size)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect();
    let config = b"{\"big\":true}".to_vec();
    for blob in [&config, &layer] {
        push_blob(c, base, repo, blob).await;
    }
    let manifest = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": sha256_hex(&config), "size": config.len()},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": sha256_hex(&layer), "size": layer.len()}]
    });
    let r = c
        .put(format!("{base}/v2/{repo}/manifests/{tag}"))
        .header("content-type", "application/vnd.oci.image.manifest.v1+json")
        .body(serde_json::to_vec(&manifest).expect("json"))
        .send()
        .await
        .expect("manifest");
    assert_eq!(r.status(), 201);
    sha256_hex(&layer)
}

/// A registry front that accepts only Bearer tokens from its own token service (Docker token
/// authentication, as Harbor, GHCR or Docker Hub do), in front of an Outpost it reads with the
/// admin's Basic credentials. `/token` issues a token for `user:password`; `/v2/…` without
/// that token answers 401 with a `Bearer` challenge. Read-only (GET and HEAD), one request per
/// connection.
pub struct BearerGate {
    pub addr: String,
    /// Tokens issued so far.
    pub issued: Arc<std::sync::atomic::AtomicU64>,
    /// While set, requests whose path contains the first string get the status and body that
    /// follow (JSON if it starts with `{`, else plain text), whatever their credentials: a
    /// proxy or load balancer in front of the registry answering for it, or the registry's own
    /// error.
    pub canned: Arc<std::sync::Mutex<Option<(String, u16, String)>>>,
    /// A `Retry-After` value sent with canned answers, while set.
    pub retry_after: Arc<std::sync::Mutex<Option<String>>>,
    /// Requests answered with the canned answer so far.
    pub canned_hits: Arc<std::sync::atomic::AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl BearerGate {
    pub const TOKEN: &'static str = "gate-token-7f3a";

    pub async fn start(upstream: &str, user: &str, password: &str) -> BearerGate {
        use std::sync::atomic::Ordering;
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind gate");
        let addr = listener.local_addr().expect("addr").to_string();
        let issued = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let basic = format!(
            "Basic {}",
            base64_encode(format!("{user}:{password}").as_bytes())
        );
        let admin = client_as("admin", ADMIN_PASSWORD);
        let canned: Arc<std::sync::Mutex<Option<(String, u16, String)>>> = Arc::default();
        let retry_after: Arc<std::sync::Mutex<Option<String>>> = Arc::default();
        let canned_hits = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let (upstream, me, count, answers, wait, hits) = (
            upstream.to_string(),
            addr.clone(),
            issued.clone(),
            canned.clone(),
            retry_after.clone(),
            canned_hits.clone(),
        );
        let task = tokio::spawn(async move {
            while let Ok((mut conn, _)) = listener.accept().await {
                let (upstream, me, count, basic, admin, answers, wait, hits) = (
                    upstream.clone(),
                    me.clone(),
                    count.clone(),
                    basic.clone(),
                    admin.clone(),
                    answers.clone(),
                    wait.clone(),
                    hits.clone(),
                );
                tokio::spawn(async move {
                    let mut head = Vec::new();
                    let mut buf = [0u8; 4096];
                    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                        match conn.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => head.extend_from_slice(&buf[..n]),
                        }
                    }
                    let text = String::from_utf8_lossy(&head).to_string();
                    let mut lines = text.split("\r\n");
                    let mut first = lines.next().unwrap_or("").split(' ');
                    let (method, target) = (first.next().unwrap_or(""), first.next().unwrap_or(""));
                    let header = |name: &str| {
                        text.split("\r\n").skip(1).find_map(|l| {
                            let (k, v) = l.split_once(':')?;
                            k.eq_ignore_ascii_case(name).then(|| v.trim().to_string())
                        })
                    };
                    let auth = header("authorization").unwrap_or_default();
                    let canned = answers
                        .lock()
                        .unwrap()
                        .clone()
                        .filter(|(path, ..)| target.contains(path.as_str()));
                    let (status, headers, body): (u16, Vec<(String, String)>, Vec<u8>) =
                        if let Some((_, status, text)) = canned {
                            hits.fetch_add(1, Ordering::Relaxed);
                            let kind = match text.starts_with('{') {
                                true => "application/json",
                                false => "text/plain",
                            };
                            let mut headers = vec![("content-type".into(), kind.into())];
                            if let Some(after) = wait.lock().unwrap().clone() {
                                headers.push(("retry-after".into(), after));
                            }
                            (status, headers, text.into_bytes())
                        } else if target.starts_with("/token") {
                            if auth == basic {
                                count.fetch_add(1, Ordering::Relaxed);
                                let body = format!("{{\"token\":\"{}\"}}", BearerGate::TOKEN);
                                (
                                    200,
                                    vec![("content-type".into(), "application/json".into())],
                                    body.into_bytes(),
                                )
                            } else {
                                (401, vec![], b"{}".to_vec())
                            }
                        } else if auth != format!("Bearer {}", BearerGate::TOKEN) {
                            let repo = target.strip_prefix("/v2/").and_then(|r| {
                                ["/manifests/", "/blobs/", "/tags/"]
                                    .iter()
                                    .find_map(|m| r.find(m).map(|i| r[..i].to_string()))
                            });
                            let scope = repo
                                .map(|r| format!(",scope=\"repository:{r}:pull\""))
                                .unwrap_or_default();
                            let challenge = format!(
                                "Bearer realm=\"http://{me}/token\",service=\"gate\"{scope}"
                            );
                            (
                            401,
                            vec![("www-authenticate".into(), challenge)],
                            br#"{"errors":[{"code":"UNAUTHORIZED","message":"token required"}]}"#
                                .to_vec(),
                        )
                        } else {
                            let m = reqwest::Method::from_bytes(method.as_bytes())
                                .unwrap_or(reqwest::Method::GET);
                            let mut req = admin.request(m, format!("{upstream}{target}"));
                            for h in ["accept", "range"] {
                                if let Some(v) = header(h) {
                                    req = req.header(h, v);
                                }
                            }
                            match req.send().await {
                                Ok(r) => {
                                    let status = r.status().as_u16();
                                    let keep: Vec<(String, String)> = r
                                        .headers()
                                        .iter()
                                        .filter(|(k, _)| {
                                            [
                                                "content-type",
                                                "docker-content-digest",
                                                "content-range",
                                                "content-length",
                                            ]
                                            .contains(&k.as_str())
                                        })
                                        .map(|(k, v)| {
                                            (k.to_string(), v.to_str().unwrap_or("").to_string())
                                        })
                                        .collect();
                                    let body = r.bytes().await.unwrap_or_default().to_vec();
                                    (status, keep, body)
                                }
                                Err(_) => (502, vec![], Vec::new()),
                            }
                        };
                    let mut out = format!("HTTP/1.1 {status} X\r\nconnection: close\r\n");
                    let mut has_len = false;
                    for (k, v) in &headers {
                        has_len |= k == "content-length";
                        out.push_str(&format!("{k}: {v}\r\n"));
                    }
                    if !has_len {
                        out.push_str(&format!("content-length: {}\r\n", body.len()));
                    }
                    out.push_str("\r\n");
                    let _ = conn.write_all(out.as_bytes()).await;
                    if method != "HEAD" {
                        let _ = conn.write_all(&body).await;
                    }
                    let _ = conn.shutdown().await;
                });
            }
        });
        BearerGate {
            addr,
            issued,
            canned,
            retry_after,
            canned_hits,
            task,
        }
    }
}

impl Drop for BearerGate {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Fills the disk of the registry at `base` with an upload to `repo`, appending ever smaller
/// chunks until one of `smallest` bytes (4 KiB or 64 KiB) is refused with 507; returns the
/// upload's location (relative), whose cancellation gives the room back.
pub async fn fill_disk_with_an_upload(
    c: &reqwest::Client,
    base: &str,
    repo: &str,
    smallest: usize,
) -> String {
    let r = c
        .post(format!("{base}/v2/{repo}/blobs/uploads/"))
        .send()
        .await
        .expect("start upload");
    assert_eq!(r.status(), 202);
    let mut loc = r.headers()["location"]
        .to_str()
        .expect("location")
        .to_string();
    for size in [1 << 20, 64 << 10, 4 << 10]
        .into_iter()
        .filter(|&n| n >= smallest)
    {
        let chunk = vec![size as u8 ^ 0x5a; size];
        loop {
            let r = c
                .patch(format!("{base}{loc}"))
                .header("content-type", "application/octet-stream")
                .body(chunk.clone())
                .send()
                .await
                .expect("patch");
            match r.status().as_u16() {
                202 => {
                    loc = r.headers()["location"]
                        .to_str()
                        .expect("location")
                        .to_string()
                }
                507 => break,
                other => panic!(
                    "PATCH answered {other}: {}",
                    r.text().await.unwrap_or_default()
                ),
            }
        }
    }
    loc
}

/// The Prometheus text a node serves at `/metrics`.
pub async fn metrics(base: &str) -> String {
    let r = reqwest::get(format!("{base}/metrics")).await.unwrap();
    assert_eq!(r.status(), 200);
    r.text().await.unwrap()
}

/// The value of an unlabelled metric line `name value` in Prometheus text.
pub fn metric(text: &str, name: &str) -> Option<i64> {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
        .and_then(|v| v.parse().ok())
}

/// What a [`RewriteProxy`] does to an answer: given the request's path and query and the
/// answer's body, a new body, or `None` to pass it on as it is.
pub type Rewrite = Arc<dyn Fn(&str, &[u8]) -> Option<Vec<u8>> + Send + Sync>;

/// An HTTP proxy in front of `target` that passes every request on and lets a test rewrite
/// the bodies of the answers: a parent that sends what no real one does. Bodies are held
/// whole, so keep what passes through small.
pub struct RewriteProxy {
    pub addr: String,
    rewrite: Arc<Mutex<Option<Rewrite>>>,
    server: tokio::task::JoinHandle<()>,
}

impl RewriteProxy {
    pub async fn start(target: &str) -> RewriteProxy {
        use axum::extract::{Request, State};
        use axum::response::Response;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind the rewriting proxy");
        let addr = listener.local_addr().expect("address").to_string();
        let rewrite: Arc<Mutex<Option<Rewrite>>> = Arc::default();
        let client = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .expect("client");
        let state = (client, format!("http://{target}"), rewrite.clone());
        type St = (reqwest::Client, String, Arc<Mutex<Option<Rewrite>>>);
        async fn pass(State((client, target, rewrite)): State<St>, req: Request) -> Response {
            let path = req
                .uri()
                .path_and_query()
                .map(|p| p.as_str().to_string())
                .unwrap_or_default();
            let method = req.method().clone();
            let mut headers = req.headers().clone();
            headers.remove(axum::http::header::HOST);
            let body = axum::body::to_bytes(req.into_body(), usize::MAX)
                .await
                .unwrap_or_default();
            let answer = client
                .request(method, format!("{target}{path}"))
                .headers(headers)
                .body(body)
                .send()
                .await;
            let Ok(answer) = answer else {
                return Response::builder()
                    .status(502)
                    .body(axum::body::Body::empty())
                    .expect("response");
            };
            let status = answer.status();
            let mut headers = answer.headers().clone();
            let body = answer.bytes().await.unwrap_or_default();
            let f = rewrite.lock().unwrap().clone();
            let body = match f.and_then(|f| f(&path, &body)) {
                Some(new) => new.into(),
                None => body,
            };
            for h in ["content-length", "transfer-encoding", "connection"] {
                headers.remove(h);
            }
            let mut r = Response::new(axum::body::Body::from(body));
            *r.status_mut() = status;
            *r.headers_mut() = headers;
            r
        }
        let app = axum::Router::new().fallback(pass).with_state(state);
        let server = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        RewriteProxy {
            addr,
            rewrite,
            server,
        }
    }

    /// Rewrites answers from now on (replacing any earlier rewrite).
    pub fn rewrite(&self, f: impl Fn(&str, &[u8]) -> Option<Vec<u8>> + Send + Sync + 'static) {
        *self.rewrite.lock().unwrap() = Some(Arc::new(f));
    }
}

impl Drop for RewriteProxy {
    fn drop(&mut self) {
        self.server.abort();
    }
}
