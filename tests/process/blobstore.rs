//! Blobs in an object store (`blob_store`): Outpost against moto (the S3 API) and azurite (the
//! Azure Blob Storage API), each started here on a loopback port. tests/deps.sh installs both
//! (moto into `.venv`, azurite under `.cache/azurite`); `MOTO_SERVER` and `AZURITE_BLOB` name
//! other copies. Without them these tests fail and say how to install them, unless
//! `SKIP_OBJECT_STORE_TESTS=1` deliberately opts out (CI never does).

use crate::support::{
    ADMIN_PASSWORD, Outpost, client_as, eventually, push_image, sha256_hex, tag_digest,
};
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Kind {
    S3,
    Azure,
}

pub const BUCKET: &str = "regtest";

/// A running emulator of one object store API.
pub struct Emulator {
    kind: Kind,
    port: u16,
    child: Option<Child>,
    /// azurite's data directory.
    dir: tempfile::TempDir,
}

fn repo_path(rel: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(rel)
}

pub(crate) fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().port()
}

impl Emulator {
    /// Starts the emulator with an empty bucket (container) [`BUCKET`]; `None` only when
    /// `SKIP_OBJECT_STORE_TESTS=1`.
    pub async fn start(kind: Kind) -> Option<Emulator> {
        if std::env::var("SKIP_OBJECT_STORE_TESTS").as_deref() == Ok("1") {
            eprintln!("SKIP_OBJECT_STORE_TESTS=1: not testing blob_store on {kind:?}");
            return None;
        }
        let mut e = Emulator {
            kind,
            port: free_port(),
            child: None,
            dir: tempfile::tempdir().unwrap(),
        };
        e.run().await;
        Some(e)
    }

    async fn run(&mut self) {
        let (program, var, args): (PathBuf, &str, Vec<String>) = match self.kind {
            Kind::S3 => (
                repo_path(".venv/bin/moto_server"),
                "MOTO_SERVER",
                vec![
                    "-H".into(),
                    "127.0.0.1".into(),
                    "-p".into(),
                    self.port.to_string(),
                ],
            ),
            Kind::Azure => (
                repo_path(".cache/azurite/node_modules/.bin/azurite-blob"),
                "AZURITE_BLOB",
                vec![
                    "--blobHost".into(),
                    "127.0.0.1".into(),
                    "--blobPort".into(),
                    self.port.to_string(),
                    "--location".into(),
                    self.dir.path().display().to_string(),
                    "--skipApiVersionCheck".into(),
                    "--loose".into(),
                    "--disableTelemetry".into(),
                ],
            ),
        };
        let program = std::env::var_os(var).map(PathBuf::from).unwrap_or(program);
        let child = Command::new(&program)
            .args(&args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| {
                panic!(
                    "cannot start {} ({e}): run tests/deps.sh as root (it installs moto into \
                     .venv and azurite under .cache/azurite), set {var} to another copy, or \
                     set SKIP_OBJECT_STORE_TESTS=1 to leave object stores untested",
                    program.display()
                )
            });
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(30);
        while TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(
                Instant::now() < deadline,
                "{} did not listen on port {}",
                program.display(),
                self.port
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        match self.kind {
            // moto keeps everything in memory: after a restart the bucket is made again.
            Kind::S3 => {
                let r = reqwest::Client::new()
                    .put(format!("http://127.0.0.1:{}/{BUCKET}", self.port))
                    .send()
                    .await
                    .unwrap();
                assert!(r.status().is_success(), "creating the bucket: {r:?}");
            }
            // azurite saves its state now and then: after a kill the container may be gone.
            Kind::Azure => {
                azurite(&["create", &self.port.to_string(), BUCKET]);
            }
        }
    }

    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts it again on the same port (after [`Self::stop`]).
    pub async fn restart(&mut self) {
        self.stop();
        self.run().await;
    }

    /// `blob_store` for keys under `prefix`.
    pub fn url(&self, prefix: &str) -> String {
        match self.kind {
            Kind::S3 => format!("s3://{BUCKET}/{prefix}"),
            Kind::Azure => format!("az://{BUCKET}/{prefix}"),
        }
    }

    /// The environment `outpost serve` needs to reach it, as an operator would set it.
    pub fn env(&self, prefix: &str) -> Vec<(String, String)> {
        let mut env = vec![("OUTPOST_BLOB_STORE".to_string(), self.url(prefix))];
        let vars: &[(&str, String)] = match self.kind {
            Kind::S3 => &[
                ("AWS_ACCESS_KEY_ID", "test".into()),
                ("AWS_SECRET_ACCESS_KEY", "test".into()),
                ("AWS_REGION", "us-east-1".into()),
                ("AWS_ENDPOINT", format!("http://127.0.0.1:{}", self.port)),
                ("AWS_ALLOW_HTTP", "true".into()),
            ],
            Kind::Azure => &[
                ("AZURE_STORAGE_USE_EMULATOR", "true".into()),
                (
                    "AZURITE_BLOB_STORAGE_URL",
                    format!("http://127.0.0.1:{}", self.port),
                ),
            ],
        };
        env.extend(vars.iter().map(|(k, v)| (k.to_string(), v.clone())));
        env
    }

    /// Every blob key under `prefix` (`<prefix>/blobs/…`), as the store itself lists them.
    pub async fn keys(&self, prefix: &str) -> Vec<String> {
        self.all_keys(prefix)
            .await
            .into_iter()
            .filter(|k| k.starts_with(&format!("{prefix}/blobs/")))
            .collect()
    }

    /// Writes `text` at `key`, as another program with access to the store would.
    pub async fn put(&self, key: &str, text: &str) {
        match self.kind {
            Kind::S3 => {
                let r = reqwest::Client::new()
                    .put(format!("http://127.0.0.1:{}/{BUCKET}/{key}", self.port))
                    .body(text.to_string())
                    .send()
                    .await
                    .unwrap();
                if r.status() == 403 {
                    // moto lets an unsigned request create a key, not replace one the
                    // registry wrote: sign it, with boto3 from moto's own environment.
                    self.put_signed(key, text);
                } else {
                    assert!(r.status().is_success(), "{r:?}");
                }
            }
            Kind::Azure => {
                azurite(&["put", &self.port.to_string(), BUCKET, key, text]);
            }
        }
    }

    fn put_signed(&self, key: &str, text: &str) {
        let moto = std::env::var_os("MOTO_SERVER")
            .map(PathBuf::from)
            .unwrap_or_else(|| repo_path(".venv/bin/moto_server"));
        let python = moto.with_file_name("python");
        let script = "import boto3, sys\n\
            boto3.client('s3', endpoint_url=sys.argv[1], aws_access_key_id='test', \
            aws_secret_access_key='test', region_name='us-east-1')\
            .put_object(Bucket=sys.argv[2], Key=sys.argv[3], Body=sys.argv[4].encode())";
        let out = Command::new(&python)
            .args(["-c", script])
            .arg(format!("http://127.0.0.1:{}", self.port))
            .args([BUCKET, key, text])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{} (boto3 put): {}",
            python.display(),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// Every key under `prefix`.
    pub async fn all_keys(&self, prefix: &str) -> Vec<String> {
        match self.kind {
            Kind::S3 => {
                let body = reqwest::Client::new()
                    .get(format!(
                        "http://127.0.0.1:{}/{BUCKET}?list-type=2&prefix={prefix}/",
                        self.port
                    ))
                    .send()
                    .await
                    .unwrap()
                    .text()
                    .await
                    .unwrap();
                body.split("<Key>")
                    .skip(1)
                    .filter_map(|s| s.split("</Key>").next())
                    .map(String::from)
                    .collect()
            }
            Kind::Azure => azurite(&[
                "list",
                &self.port.to_string(),
                BUCKET,
                &format!("{prefix}/"),
            ])
            .lines()
            .map(String::from)
            .collect(),
        }
    }
}

impl Drop for Emulator {
    fn drop(&mut self) {
        self.stop();
    }
}

fn azurite(args: &[&str]) -> String {
    let out = Command::new("python3")
        .arg(repo_path("tests/process/azurite.py"))
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "azurite.py {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The key a blob has under `prefix`.
pub fn key(prefix: &str, digest: &str) -> String {
    let hex = digest.trim_start_matches("sha256:");
    format!("{prefix}/blobs/sha256/{}/{hex}", &hex[..2])
}

/// Files under `dir/blobs` (none while blobs live in an object store).
fn local_blob_files(dir: &std::path::Path) -> usize {
    fn walk(p: &std::path::Path) -> usize {
        std::fs::read_dir(p).map_or(0, |rd| {
            rd.flatten()
                .map(|e| {
                    if e.file_type().is_ok_and(|t| t.is_dir()) {
                        walk(&e.path())
                    } else {
                        1
                    }
                })
                .sum()
        })
    }
    walk(&dir.join("blobs"))
}

fn start(dir: &std::path::Path, env: &[(String, String)]) -> Outpost {
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    Outpost::start_env(dir, &env)
}

/// A blob pushed in two chunks (so, above the single-request size, as a multipart upload).
async fn push_chunked(c: &reqwest::Client, o: &Outpost, repo: &str, blob: &[u8]) -> String {
    let r = c
        .post(o.url(&format!("/v2/{repo}/blobs/uploads/")))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    let mut loc = r.headers()["location"].to_str().unwrap().to_string();
    let half = blob.len() / 2;
    for (start, part) in [(0, &blob[..half]), (half, &blob[half..])] {
        let r = c
            .patch(o.url(&loc))
            .header(
                "content-range",
                format!("{start}-{}", start + part.len() - 1),
            )
            .header("content-type", "application/octet-stream")
            .body(part.to_vec())
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 202, "{:?}", r.text().await);
        loc = r.headers()["location"].to_str().unwrap().to_string();
    }
    loc
}

async fn commit(c: &reqwest::Client, o: &Outpost, loc: &str, digest: &str) -> reqwest::Response {
    let sep = if loc.contains('?') { '&' } else { '?' };
    c.put(o.url(&format!("{loc}{sep}digest={digest}")))
        .send()
        .await
        .unwrap()
}

async fn get_bytes(
    c: &reqwest::Client,
    o: &Outpost,
    path: &str,
    range: Option<&str>,
) -> (u16, Vec<u8>) {
    let mut req = c.get(o.url(path));
    if let Some(r) = range {
        req = req.header("range", r);
    }
    let r = req.send().await.unwrap();
    (r.status().as_u16(), r.bytes().await.unwrap().to_vec())
}

/// Push, pull, ranged reads, garbage collection, a store outage and a restart with the wrong
/// store, all against one emulator.
async fn blobs_live_in_the_object_store(kind: Kind) {
    let Some(mut store) = Emulator::start(kind).await else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let prefix = "registry-1";
    let o = start(dir.path(), &store.env(prefix));
    let c = client_as("admin", ADMIN_PASSWORD);
    let base = o.base();

    // A whole image, and a 12 MiB blob in two chunks (a multipart upload at the store).
    let v1 = push_image(&c, &base, "app", "v1", "object-store").await;
    let big: Vec<u8> = (0..12u32 << 20).map(|i| (i % 251) as u8).collect();
    let big_digest = sha256_hex(&big);
    let loc = push_chunked(&c, &o, "app", &big).await;
    assert_eq!(commit(&c, &o, &loc, &big_digest).await.status(), 201);

    let keys = store.keys(prefix).await;
    assert!(keys.contains(&key(prefix, &big_digest)), "{keys:?}");
    assert_eq!(keys.len(), 3, "config, layer and the big blob: {keys:?}");
    let all = store.all_keys(prefix).await;
    assert!(all.contains(&format!("{prefix}/outpost-owner")), "{all:?}");
    assert_eq!(local_blob_files(dir.path()), 0, "no blob on local disk");
    let uploads = std::fs::read_dir(dir.path().join("uploads"))
        .unwrap()
        .count();
    assert_eq!(uploads, 0, "the staged upload is gone once stored");

    // Served whole (several segments) and in ranges, one across a segment boundary.
    let path = format!("/v2/app/blobs/{big_digest}");
    let (status, body) = get_bytes(&c, &o, &path, None).await;
    assert_eq!(status, 200);
    assert!(body == big, "the big blob came back different");
    let (status, body) = get_bytes(&c, &o, &path, Some("bytes=4194300-4194310")).await;
    assert_eq!(status, 206);
    assert_eq!(body, &big[4194300..=4194310]);
    let (status, body) = get_bytes(&c, &o, &path, Some("bytes=-5")).await;
    assert_eq!((status, body.as_slice()), (206, &big[big.len() - 5..]));
    let r = c.head(o.url(&path)).send().await.unwrap();
    assert_eq!(
        r.headers()["content-length"],
        big.len().to_string().as_str()
    );
    assert_eq!(
        tag_digest(&c, &base, "app", "v1").await.as_deref(),
        Some(v1.as_str())
    );

    // Garbage collection deletes the unreferenced blob from the store, and only it.
    let report = gc_now(&c, &o).await;
    assert_eq!(report["blobsRemoved"], 1, "{report}");
    let keys = store.keys(prefix).await;
    assert!(!keys.contains(&key(prefix, &big_digest)), "{keys:?}");
    assert_eq!(keys.len(), 2, "{keys:?}");
    let (status, _) = get_bytes(&c, &o, &path, None).await;
    assert_eq!(status, 404);

    // The store goes away: not ready, and a read or a commit is a 503 that keeps the upload.
    let small = b"pushed while the store was down".to_vec();
    let small_digest = sha256_hex(&small);
    let r = c
        .post(o.url("/v2/app/blobs/uploads/"))
        .send()
        .await
        .unwrap();
    let loc = r.headers()["location"].to_str().unwrap().to_string();
    let r = c
        .patch(o.url(&loc))
        .body(small.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    let loc = r.headers()["location"].to_str().unwrap().to_string();
    store.stop();
    let r = reqwest::get(o.url("/readyz")).await.unwrap();
    assert_eq!(r.status(), 503);
    let text = r.text().await.unwrap();
    assert!(text.contains(&store.url(prefix)), "{text}");
    let layer = crate::support::seed_layer("object-store");
    let (status, body) = get_bytes(
        &c,
        &o,
        &format!("/v2/app/blobs/{}", sha256_hex(&layer)),
        None,
    )
    .await;
    assert_eq!(status, 503, "{}", String::from_utf8_lossy(&body));
    assert!(String::from_utf8_lossy(&body).contains("UNAVAILABLE"));
    let r = commit(&c, &o, &loc, &small_digest).await;
    assert_eq!(r.status(), 503, "{:?}", r.text().await);
    assert!(o.log().contains("blob store request failed"), "{}", o.log());

    store.restart().await;
    if kind == Kind::S3 {
        // moto came back empty, as a store whose bucket was deleted and made again: that is
        // an outage (503), not a registry without blobs (404, which makes clients push
        // everything again).
        let r = reqwest::get(o.url("/readyz")).await.unwrap();
        assert_eq!(r.status(), 503);
        let text = r.text().await.unwrap();
        assert!(
            !text.contains("127.0.0.1"),
            "readiness shows no store internals: {text}"
        );
        let r = c
            .head(o.url(&format!("/v2/app/blobs/{}", sha256_hex(&layer))))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 503);
    }
    // An emulator may come back without what it held (moto keeps it in memory): put the
    // prefix's owner marker back, as a real store would have kept it.
    let record = std::fs::read_to_string(dir.path().join("blob-store")).unwrap();
    let owner = record.lines().nth(1).expect("the owner id is recorded");
    store.put(&format!("{prefix}/outpost-owner"), owner).await;
    eventually("the registry is ready again", || async {
        reqwest::get(o.url("/readyz"))
            .await
            .is_ok_and(|r| r.status() == 200)
    })
    .await;
    let r = commit(&c, &o, &loc, &small_digest).await;
    assert_eq!(r.status(), 201, "{:?}", r.text().await);
    let (status, body) = get_bytes(&c, &o, &format!("/v2/app/blobs/{small_digest}"), None).await;
    assert_eq!((status, body), (200, small));

    // The data directory remembers its store: started without it, it refuses and says why.
    drop(o);
    let err = failing_start(dir.path(), &[]);
    assert!(
        err.contains(&format!("keeps its blobs in \"{}\"", store.url(prefix))),
        "{err}"
    );

    if kind == Kind::S3 {
        // The store comes back empty (moto, restarted): the prefix is not this registry's
        // any more as far as anyone can tell, so it does not start and says how to claim it.
        store.restart().await;
        let err = failing_start(dir.path(), &store.env(prefix));
        assert!(err.contains("has lost its owner marker"), "{err}");
    }
}

#[tokio::test]
async fn blobs_live_in_s3() {
    blobs_live_in_the_object_store(Kind::S3).await;
}

#[tokio::test]
async fn blobs_live_in_azure_blob_storage() {
    blobs_live_in_the_object_store(Kind::Azure).await;
}

/// A malformed or unsupported `blob_store` stops the server at start with a message that says
/// what to write instead, and never echoes credentials put in the URL.
#[tokio::test]
async fn a_bad_blob_store_url_is_refused_at_start() {
    for (url, expect) in [
        ("gs://bucket", "unsupported scheme \"gs\""),
        ("s3://", "bucket (or container) name is missing"),
        ("bucket/prefix", "expected s3://<bucket>[/<prefix>]"),
        ("s3://key:secret@bucket/x", "put no credentials"),
        ("az://container/p?sv=2020&sig=secret", "put no credentials"),
        ("s3://bucket:secret/p", "put no credentials"),
        ("s3://bucket/a//b", "blob_store"),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let err = failing_start(
            dir.path(),
            &[("OUTPOST_BLOB_STORE".to_string(), url.to_string())],
        );
        assert!(err.contains(expect), "{url}: {err}");
        assert!(!err.contains("secret"), "{url}: {err}");
    }
}

/// What keeps a prefix one registry's: a data directory that already holds blobs on disk is
/// not switched to a store; a second data directory on the same prefix is refused (each would
/// delete the other's blobs as orphans); and a key the store cannot name does not stop garbage
/// collection.
#[tokio::test]
async fn a_store_prefix_belongs_to_one_registry() {
    let Some(store) = Emulator::start(Kind::S3).await else {
        return;
    };
    let env = store.env("shared");
    let c = client_as("admin", ADMIN_PASSWORD);

    // A data directory that has held blobs on local disk (its `blob-store` record removed, as
    // one made before the record existed) is not started against the store.
    let old = tempfile::tempdir().unwrap();
    let o = Outpost::start(old.path(), &[]);
    push_image(&c, &o.base(), "app", "v1", "on-disk").await;
    drop(o);
    std::fs::remove_file(old.path().join("blob-store")).unwrap();
    let err = failing_start(old.path(), &env);
    assert!(err.contains("keeps its blobs in \"local\""), "{err}");

    let first = tempfile::tempdir().unwrap();
    let o = start(first.path(), &env);
    push_image(&c, &o.base(), "app", "v1", "in-the-store").await;
    let second = tempfile::tempdir().unwrap();
    let err = failing_start(second.path(), &env);
    assert!(err.contains("belongs to another data directory"), "{err}");
    let err = failing_start(second.path(), &env);
    assert!(
        err.contains("belongs to another data directory"),
        "and again: {err}"
    );
    // Pointed at a prefix of its own instead, it starts.
    let own = start(second.path(), &store.env("own"));
    drop(own);

    // A key no blob has, with an empty path segment: collection goes on around it.
    store.put("shared/blobs/sha256/ab//odd", "not ours").await;
    gc_now(&c, &o).await;
    assert!(
        reqwest::get(o.url("/readyz"))
            .await
            .unwrap()
            .status()
            .is_success()
    );
}

/// Runs garbage collection now, sparing nothing for its age; returns its report.
async fn gc_now(c: &reqwest::Client, o: &Outpost) -> serde_json::Value {
    let r = c
        .post(o.url("/api/v1/gc"))
        .body(r#"{"minAgeSecs":0}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    r.json().await.unwrap()
}

/// Runs `outpost serve` in `dir` with `env`, expecting it to refuse to start; returns stderr.
pub(crate) fn failing_start(dir: &std::path::Path, env: &[(String, String)]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_outpost"))
        .args(["serve", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(dir)
        .env("OUTPOST_ADMIN_PASSWORD", ADMIN_PASSWORD)
        .envs(env.iter().map(|(k, v)| (k, v)))
        .output()
        .unwrap();
    assert!(!out.status.success(), "started in {}", dir.display());
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// A first start that stopped half-way (crashed, or could not write its record) starts again:
/// one that recorded its id but wrote no marker yet, and one whose marker already holds that
/// id, both find the prefix theirs, claim it and serve.
#[tokio::test]
async fn a_first_start_that_stopped_half_way_can_start_again() {
    let Some(store) = Emulator::start(Kind::S3).await else {
        return;
    };
    let c = client_as("admin", ADMIN_PASSWORD);
    for (prefix, marker_written) in [("halfway-a", false), ("halfway-b", true)] {
        let dir = tempfile::tempdir().unwrap();
        let id = format!("id-of-{prefix}");
        std::fs::write(
            dir.path().join("blob-store"),
            format!("{}\n{id}\n", store.url(prefix)),
        )
        .unwrap();
        if marker_written {
            store.put(&format!("{prefix}/outpost-owner"), &id).await;
        }
        let o = start(dir.path(), &store.env(prefix));
        push_image(&c, &o.base(), "app", "v1", prefix).await;
        let record = std::fs::read_to_string(dir.path().join("blob-store")).unwrap();
        assert_eq!(record, format!("{}\n{id}\nclaimed\n", store.url(prefix)));
        let all = store.all_keys(prefix).await;
        assert!(all.contains(&format!("{prefix}/outpost-owner")), "{all:?}");
    }
}

/// An object the store damaged (another size than its blob) is answered as unknown, by a GET
/// as by a HEAD, and the next push of the blob writes the verified bytes over it, small or
/// multipart. Several pushes of one multipart blob at once all succeed (on Azure the first
/// commit drops the others' uncommitted blocks).
async fn a_damaged_object_is_replaced_by_the_next_push(kind: Kind) {
    let Some(store) = Emulator::start(kind).await else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let prefix = "damage";
    let o = start(dir.path(), &store.env(prefix));
    let c = client_as("admin", ADMIN_PASSWORD);
    let base = o.base();
    push_image(&c, &base, "app", "v1", "damaged-layer").await;
    let layer = crate::support::seed_layer("damaged-layer");
    let layer_digest = sha256_hex(&layer);
    let big: Vec<u8> = (0..12u32 << 20).map(|i| (i % 241) as u8).collect();
    let big_digest = sha256_hex(&big);
    let loc = push_chunked(&c, &o, "app", &big).await;
    assert_eq!(commit(&c, &o, &loc, &big_digest).await.status(), 201);

    for d in [&layer_digest, &big_digest] {
        store.put(&key(prefix, d), "damaged").await;
        let path = format!("/v2/app/blobs/{d}");
        let r = c.head(o.url(&path)).send().await.unwrap();
        assert_eq!(r.status(), 404, "HEAD of a damaged {d}");
        for range in [None, Some("bytes=0-3")] {
            let (status, body) = get_bytes(&c, &o, &path, range).await;
            assert_eq!(
                status,
                404,
                "GET {range:?} of a damaged {d}: {}",
                String::from_utf8_lossy(&body)
            );
        }
    }
    assert!(o.log().contains("wrong size"), "{}", o.log());
    // Nor is it mounted into another repository: the client is told to upload it (202),
    // which repairs it, rather than given a link to bytes that cannot be served.
    let r = c
        .post(o.url(&format!(
            "/v2/other/blobs/uploads/?mount={layer_digest}&from=app"
        )))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202, "mount of a damaged blob");

    // Pushed again: stored over the damage, and served whole.
    crate::support::push_blob(&c, &base, "app", &layer).await;
    let loc = push_chunked(&c, &o, "app", &big).await;
    assert_eq!(commit(&c, &o, &loc, &big_digest).await.status(), 201);
    for (d, bytes) in [(&layer_digest, &layer), (&big_digest, &big)] {
        let (status, body) = get_bytes(&c, &o, &format!("/v2/app/blobs/{d}"), None).await;
        assert_eq!(status, 200, "{d} after it was pushed again");
        assert!(body == *bytes, "{d} came back different");
    }

    // Three pushes of one new multipart blob at once, to three repositories.
    let shared: Vec<u8> = (0..10u32 << 20).map(|i| (i % 239) as u8).collect();
    let shared_digest = sha256_hex(&shared);
    let mut locs = Vec::new();
    for repo in ["race1", "race2", "race3"] {
        locs.push(push_chunked(&c, &o, repo, &shared).await);
    }
    let (r1, r2, r3) = tokio::join!(
        commit(&c, &o, &locs[0], &shared_digest),
        commit(&c, &o, &locs[1], &shared_digest),
        commit(&c, &o, &locs[2], &shared_digest),
    );
    for (i, r) in [r1, r2, r3].into_iter().enumerate() {
        assert_eq!(r.status(), 201, "push {i}: {:?}", r.text().await);
    }
    for repo in ["race1", "race2", "race3"] {
        let (status, body) =
            get_bytes(&c, &o, &format!("/v2/{repo}/blobs/{shared_digest}"), None).await;
        assert!(status == 200 && body == shared, "{repo}: {status}");
    }
}

#[tokio::test]
async fn a_damaged_object_in_s3_is_replaced_by_the_next_push() {
    a_damaged_object_is_replaced_by_the_next_push(Kind::S3).await;
}

#[tokio::test]
async fn a_damaged_object_in_azure_blob_storage_is_replaced_by_the_next_push() {
    a_damaged_object_is_replaced_by_the_next_push(Kind::Azure).await;
}
