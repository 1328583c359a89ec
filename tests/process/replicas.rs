//! Several replicas of one root registry: metadata in one PostgreSQL database (the server
//! `./test.sh` starts, at `TEST_POSTGRES_URL`), blobs in one object store (moto's S3), each
//! replica with a data directory of its own, as behind a load balancer that sends each
//! request anywhere.

use crate::blobstore::{Emulator, Kind, failing_start, free_port};
use crate::support::{
    ADMIN_PASSWORD, Outpost, client_as, eventually, push_image, sha256_hex, tag_digest,
};
use crate::sync::{SITE_PASSWORD, cli_ok, connected, read_token};
use std::time::Duration;

/// A fresh database on the test PostgreSQL server; `None` only with `SKIP_POSTGRES_TESTS=1`.
async fn database(name: &str) -> Option<String> {
    let server = match std::env::var("TEST_POSTGRES_URL") {
        Ok(url) => url,
        Err(_) if std::env::var("SKIP_POSTGRES_TESTS").as_deref() == Ok("1") => {
            eprintln!("SKIP_POSTGRES_TESTS=1: not testing replicas on PostgreSQL");
            return None;
        }
        Err(_) => panic!(
            "TEST_POSTGRES_URL is not set: run ./test.sh, or start a server with \
             tests/postgres.sh start DIR and export the URL it prints \
             (SKIP_POSTGRES_TESTS=1 leaves PostgreSQL untested)"
        ),
    };
    let name = format!("{name}_{}", std::process::id());
    Some(
        outpost_meta::create_postgres_database(&server, &name)
            .await
            .expect("create a test database"),
    )
}

/// What two replicas share (a fresh database, moto's S3) and the data directory of each.
struct Fleet {
    db: String,
    s3: Emulator,
    dirs: [tempfile::TempDir; 2],
    extra: Vec<(String, String)>,
}

impl Fleet {
    /// `None` only when `SKIP_POSTGRES_TESTS=1` or `SKIP_OBJECT_STORE_TESTS=1`.
    async fn new(name: &str, extra: &[(&str, &str)]) -> Option<Fleet> {
        Some(Fleet {
            db: database(name).await?,
            s3: Emulator::start(Kind::S3).await?,
            dirs: [tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap()],
            extra: extra
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        })
    }

    /// Starts (or starts again) replica `i` on its own data directory and a fresh port.
    fn replica(&self, i: usize) -> Outpost {
        self.replica_with(i, &[])
    }

    /// [`Fleet::replica`] with settings of its own (`OUTPOST_REPLICA_URL` empty: none).
    fn replica_with(&self, i: usize, own: &[(&str, &str)]) -> Outpost {
        let listen = format!("127.0.0.1:{}", free_port());
        let mut env = self.s3.env("fleet");
        env.push(("OUTPOST_DATABASE_URL".into(), self.db.clone()));
        if !own.contains(&("OUTPOST_REPLICA_URL", "")) {
            env.push(("OUTPOST_REPLICA_URL".into(), format!("http://{listen}")));
        }
        env.extend(self.extra.iter().cloned());
        env.extend(
            own.iter()
                .filter(|(_, v)| !v.is_empty())
                .map(|(k, v)| (k.to_string(), v.to_string())),
        );
        let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        Outpost::start_listen(self.dirs[i].path(), &listen, &env)
    }
}

#[tokio::test]
async fn replicas_share_content_uploads_tokens_and_changes() {
    let Some(fleet) = Fleet::new("replicas", &[]).await else {
        return;
    };
    let (a, b) = (fleet.replica(0), fleet.replica(1));
    let db = &fleet.db;
    let admin = client_as("admin", ADMIN_PASSWORD);
    let (ra, rb) = (a.base(), b.base());

    // An upload started at A, its chunk sent to B and finished at B: B forwards both to A,
    // which holds the session; then the blob is served by either.
    let blob: Vec<u8> = (0..3_000_000u32).map(|i| (i % 251) as u8).collect();
    let digest = sha256_hex(&blob);
    let r = admin
        .post(format!("{ra}/v2/app/blobs/uploads/"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    let location = r.headers()["location"].to_str().unwrap().to_string();
    assert!(location.starts_with("/v2/app/blobs/uploads/"), "{location}");
    let half = blob.len() / 2;
    let r = admin
        .patch(format!("{rb}{location}"))
        .header("content-type", "application/octet-stream")
        .header("content-range", format!("0-{}", half - 1))
        .body(blob[..half].to_vec())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202, "{:?}", r.text().await);
    let r = admin.get(format!("{rb}{location}")).send().await.unwrap();
    assert_eq!(r.status(), 204);
    assert_eq!(r.headers()["range"], format!("0-{}", half - 1).as_str());
    let r = admin
        .put(format!("{rb}{location}?digest={digest}"))
        .header("content-range", format!("{half}-{}", blob.len() - 1))
        .body(blob[half..].to_vec())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201, "{:?}", r.text().await);
    for base in [&ra, &rb] {
        let r = admin
            .get(format!("{base}/v2/app/blobs/{digest}"))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "at {base}");
        assert!(r.bytes().await.unwrap() == blob, "the blob at {base}");
    }
    // The session is gone everywhere once finished.
    let r = admin.get(format!("{ra}{location}")).send().await.unwrap();
    assert_eq!(r.status(), 404);
    let r = admin.get(format!("{rb}{location}")).send().await.unwrap();
    assert_eq!(r.status(), 404);

    // A tag pushed at B is served by A; moved at A, B stops serving the old digest even
    // though it had it cached.
    let v1 = push_image(&admin, &rb, "app", "v1", "first").await;
    assert_eq!(tag_digest(&admin, &ra, "app", "v1").await, Some(v1.clone()));
    assert_eq!(tag_digest(&admin, &rb, "app", "v1").await, Some(v1.clone()));
    let v2 = push_image(&admin, &ra, "app", "v1", "second").await;
    eventually("B serves the tag as A moved it", || async {
        tag_digest(&admin, &rb, "app", "v1").await.as_deref() == Some(v2.as_str())
    })
    .await;
    let r = admin
        .get(format!("{rb}/v2/app/tags/list"))
        .send()
        .await
        .unwrap();
    assert_eq!(
        r.json::<serde_json::Value>().await.unwrap()["tags"],
        serde_json::json!(["v1"])
    );

    // An access token issued by A is good at B.
    let r = admin
        .get(format!(
            "{ra}/oauth2/token?service=outpost&scope=repository:app:pull"
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let token = r.json::<serde_json::Value>().await.unwrap()["access_token"]
        .as_str()
        .unwrap()
        .to_string();
    let r = reqwest::Client::new()
        .head(format!("{rb}/v2/app/manifests/v1"))
        .bearer_auth(&token)
        .header("accept", "application/vnd.oci.image.manifest.v1+json")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "A's access token at B");

    // A token made at A works at B; disabled at A, it stops working at B too.
    let password = read_token(&a, "reader", "app");
    let reader = client_as("reader", &password);
    assert_eq!(
        tag_digest(&reader, &rb, "app", "v1").await,
        Some(v2.clone())
    );
    cli_ok(
        &a,
        &["token", "update", "-n", "reader", "--status", "disabled"],
    );
    eventually("B refuses the token A disabled", || async {
        reader
            .get(format!("{rb}/v2/app/tags/list"))
            .send()
            .await
            .is_ok_and(|r| r.status() == 401)
    })
    .await;

    // Control-plane changes made at two replicas at once are not lost: each new password
    // works afterwards.
    cli_ok(
        &a,
        &[
            "token",
            "create",
            "-n",
            "twice",
            "--repository",
            "app",
            "content/read",
            "-o",
            "json",
        ],
    );
    for round in 0..8 {
        let generate = |base: String, slot: &'static str| {
            let admin = admin.clone();
            async move {
                let r = admin
                    .post(format!("{base}/api/v1/tokens/twice/credentials/generate"))
                    .json(&serde_json::json!({ "passwords": [slot] }))
                    .send()
                    .await
                    .unwrap();
                assert_eq!(r.status(), 200);
                let v: serde_json::Value = r.json().await.unwrap();
                v["passwords"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .find(|p| p["name"] == slot)
                    .and_then(|p| p["value"].as_str())
                    .unwrap()
                    .to_string()
            }
        };
        let (p1, p2) = tokio::join!(
            generate(ra.clone(), "password1"),
            generate(rb.clone(), "password2")
        );
        for (slot, p) in [("password1", p1), ("password2", p2)] {
            let c = client_as("twice", &p);
            assert_eq!(
                tag_digest(&c, &ra, "app", "v1").await,
                Some(v2.clone()),
                "round {round}: the new {slot} works"
            );
        }
    }

    // A replica restarted keeps its place.
    drop(b);
    let b = fleet.replica(1);
    let rb = b.base();
    assert_eq!(tag_digest(&admin, &rb, "app", "v1").await, Some(v2.clone()));

    // A replica whose replica_url leads to another replica (a copied configuration, or the
    // load balancer's address) stops, saying so: uploads started at it would be looked for
    // at the other one. The replica that does answer there is not disturbed.
    let dir_e = tempfile::tempdir().unwrap();
    let mut env = fleet.s3.env("fleet");
    env.push(("OUTPOST_DATABASE_URL".into(), db.clone()));
    env.push(("OUTPOST_REPLICA_URL".into(), ra.clone()));
    let err = failing_start(dir_e.path(), &env);
    assert!(
        err.contains(&format!("replica_url {ra} reaches another Outpost process")),
        "{err}"
    );
    assert_eq!(tag_digest(&admin, &ra, "app", "v1").await, Some(v2.clone()));

    // A server on the same database with its blobs on its own disk is refused: it would
    // list blobs it does not have.
    let dir_c = tempfile::tempdir().unwrap();
    let err = failing_start(dir_c.path(), &[("OUTPOST_DATABASE_URL".into(), db.clone())]);
    assert!(err.contains("must share one object store"), "{err}");
    drop((a, b));

    // A data directory that has been a registry on SQLite is not quietly started empty on
    // PostgreSQL (its blobs would then be collected as orphans).
    let dir_d = tempfile::tempdir().unwrap();
    drop(Outpost::start(dir_d.path(), &[]));
    let err = failing_start(dir_d.path(), &[("OUTPOST_DATABASE_URL".into(), db.clone())]);
    assert!(err.contains("already holds a registry"), "{err}");
}

/// Runs `tests/postgres.sh cmd` (`start`, `stop`) on a PostgreSQL server of the test's own
/// under `dir`, one it may stop; returns what the script printed (at start, the URL).
fn private_postgres(dir: &std::path::Path, cmd: &str) -> String {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/postgres.sh");
    let out = std::process::Command::new(script)
        .args([cmd, &dir.join("pg").display().to_string()])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// The database going away: requests that need it are answered `503` within seconds (not
/// after a long hang, not `500`), readiness says so, pulls of cached manifests go on, and
/// everything works again when it is back. A wrong password at start is one clear line
/// without the password.
#[tokio::test]
async fn a_database_outage_is_503_until_it_returns() {
    if std::env::var("SKIP_POSTGRES_TESTS").as_deref() == Ok("1") {
        return;
    }
    let pg_dir = tempfile::tempdir().unwrap();
    let pg = |cmd: &str| private_postgres(pg_dir.path(), cmd);
    let server = pg("start");
    let db = outpost_meta::create_postgres_database(&server, "outage")
        .await
        .unwrap();

    let bad = db
        .replace("postgres@", "postgres:hunter2@")
        .replace("/outage", "/nowhere");
    let dir_bad = tempfile::tempdir().unwrap();
    let err = failing_start(
        dir_bad.path(),
        &[("OUTPOST_DATABASE_URL".into(), bad.clone())],
    );
    assert!(
        err.contains("nowhere") && err.contains("does not exist"),
        "{err}"
    );
    assert!(!err.contains("hunter2"), "{err}");

    let dir = tempfile::tempdir().unwrap();
    let o = Outpost::start_env(dir.path(), &[("OUTPOST_DATABASE_URL", &db)]);
    let admin = client_as("admin", ADMIN_PASSWORD);
    let r = o.base();
    let pushed = push_image(&admin, &r, "app", "v1", "outage").await;
    assert_eq!(
        tag_digest(&admin, &r, "app", "v1").await,
        Some(pushed.clone())
    );

    pg("stop");
    let started = std::time::Instant::now();
    let resp = admin
        .get(format!("{r}/v2/app/tags/list"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 503);
    let body: serde_json::Value = resp.json().await.unwrap();
    assert_eq!(body["errors"][0]["code"], "UNAVAILABLE", "{body}");
    // A bound on hanging, not a performance figure: the wait for a connection is 5 s.
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "{:?}",
        started.elapsed()
    );
    let ready = reqwest::get(format!("{r}/readyz")).await.unwrap();
    assert_eq!(ready.status(), 503);
    // The log says what the driver's "pool timed out" means.
    assert!(
        o.log().contains("it refuses connections")
            || o.log().contains("connection to the database failed"),
        "{}",
        o.log()
    );

    pg("start");
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let resp = admin
            .get(format!("{r}/v2/app/tags/list"))
            .send()
            .await
            .unwrap();
        if resp.status() == 200 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the registry still answers {} {:?} after its database came back; log:\n{}",
            resp.status(),
            resp.text().await,
            o.log()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    drop(o);
    pg("stop");
}

/// An upload whose final `PUT` meets a database outage (its bytes already in the object
/// store) is answered 503, as a retry is worth it, and the retry after the outage finishes
/// it: the upload is not lost with the link that could not be written.
#[tokio::test]
async fn a_final_put_during_a_database_outage_can_be_retried() {
    if std::env::var("SKIP_POSTGRES_TESTS").as_deref() == Ok("1") {
        return;
    }
    let Some(store) = Emulator::start(Kind::S3).await else {
        return;
    };
    let pg_dir = tempfile::tempdir().unwrap();
    let pg = |cmd: &str| private_postgres(pg_dir.path(), cmd);
    let server = pg("start");
    let db = outpost_meta::create_postgres_database(&server, "final_put")
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut env = store.env("finalput");
    env.push(("OUTPOST_DATABASE_URL".into(), db));
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let o = Outpost::start_env(dir.path(), &env);
    let admin = client_as("admin", ADMIN_PASSWORD);
    let r = o.base();
    let blob: Vec<u8> = (0..3_000_000u32).map(|i| (i % 251) as u8).collect();
    let digest = sha256_hex(&blob);
    let resp = admin
        .post(format!("{r}/v2/app/blobs/uploads/"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 202);
    let loc = resp.headers()["location"].to_str().unwrap().to_string();
    let resp = admin
        .patch(format!("{r}{loc}"))
        .header("content-type", "application/octet-stream")
        .body(blob.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 202);
    let put = || async {
        admin
            .put(format!("{r}{loc}?digest={digest}"))
            .send()
            .await
            .unwrap()
    };

    pg("stop");
    let resp = put().await;
    assert_eq!(resp.status(), 503, "{:?}", resp.text().await);
    pg("start");
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let resp = put().await;
        if resp.status() == 201 {
            break;
        }
        let status = resp.status();
        let text = resp.text().await.unwrap();
        assert!(
            status == 503 && std::time::Instant::now() < deadline,
            "the retried PUT answers {status} {text}; log:\n{}",
            o.log()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let got = admin
        .get(format!("{r}/v2/app/blobs/{digest}"))
        .send()
        .await
        .unwrap();
    assert_eq!(got.status(), 200);
    assert_eq!(got.bytes().await.unwrap().len(), blob.len());
    drop(o);
    pg("stop");
}

/// A replica started with another `service` than the others says so: tokens one issues
/// would be refused by the other, and logins through a balancer fail at random. A replica
/// started without a `replica_url` forwards the uploads the others hold all the same.
#[tokio::test]
async fn a_replica_with_another_service_warns_and_one_without_an_address_forwards() {
    let Some(fleet) = Fleet::new("replica_service", &[]).await else {
        return;
    };
    let a = fleet.replica(0);
    assert!(!a.log().contains("different `service`"), "{}", a.log());
    let b = fleet.replica_with(1, &[("OUTPOST_SERVICE", "elsewhere")]);
    eventually("the odd replica warns", || async {
        b.log().contains("started with a different `service`")
    })
    .await;
    drop(b);

    // A replica without a replica_url of its own still forwards to one that has it.
    let b = fleet.replica_with(1, &[("OUTPOST_REPLICA_URL", "")]);
    let admin = client_as("admin", ADMIN_PASSWORD);
    let blob = b"an upload started at the replica with an address".to_vec();
    let r = admin
        .post(format!("{}/v2/app/blobs/uploads/", a.base()))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    let location = r.headers()["location"].to_str().unwrap().to_string();
    let r = admin
        .put(format!(
            "{}{location}?digest={}",
            b.base(),
            sha256_hex(&blob)
        ))
        .body(blob.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201, "{:?}", r.text().await);
}

/// A connected registry following one replica gets what is pushed at another, as fast as
/// a long-poll answers (not at its next poll).
#[tokio::test]
async fn a_site_connected_to_one_replica_gets_pushes_made_at_another() {
    let Some(fleet) = Fleet::new("replica_sync", &[]).await else {
        return;
    };
    let site_dir = tempfile::tempdir().unwrap();
    let (a, b) = (fleet.replica(0), fleet.replica(1));
    let admin = client_as("admin", ADMIN_PASSWORD);
    let base = push_image(&admin, &b.base(), "app", "base", "replica-base").await;
    // Created through B, followed at A.
    let cs = connected(&b, "site-rep", &["--repository", "app"]);
    let cs = cs.replace(&b.addr, &a.addr);
    // Long-polls that outlast `eventually`: only a wake-up delivers in time.
    let site = Outpost::start_env(
        site_dir.path(),
        &[
            ("OUTPOST_CONNECTION_STRING", &cs),
            ("OUTPOST_SYNC_POLL_SECS", "120"),
            ("OUTPOST_ADMIN_PASSWORD", SITE_PASSWORD),
        ],
    );
    let site_admin = client_as("admin", SITE_PASSWORD);
    let s = site.base();
    eventually("the site has app:base", || async {
        tag_digest(&site_admin, &s, "app", "base").await.as_deref() == Some(base.as_str())
    })
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let next = push_image(&admin, &b.base(), "app", "next", "replica-next").await;
    eventually(
        "the site has the push made at the other replica",
        || async {
            tag_digest(&site_admin, &s, "app", "next").await.as_deref() == Some(next.as_str())
        },
    )
    .await;
}

/// An upload that keeps going longer than `upload_max_age_secs` (it is never idle that long)
/// can still be reached through another replica: the session's record lives as long as the
/// session does.
#[tokio::test]
async fn a_long_upload_stays_reachable_through_every_replica() {
    let Some(fleet) = Fleet::new("replica_long", &[("OUTPOST_UPLOAD_MAX_AGE_SECS", "3")]).await
    else {
        return;
    };
    let (a, b) = (fleet.replica(0), fleet.replica(1));
    let admin = client_as("admin", ADMIN_PASSWORD);
    let r = admin
        .post(format!("{}/v2/app/blobs/uploads/", a.base()))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    let location = r.headers()["location"].to_str().unwrap().to_string();
    let data: Vec<u8> = (0..10u8).cycle().take(8 * 1000).collect();
    // A chunk a second at A for three times the maximum age, then one through B.
    for (i, chunk) in data.chunks(1000).enumerate() {
        let base = if i == 7 { b.base() } else { a.base() };
        let start = i * 1000;
        let r = admin
            .patch(format!("{base}{location}"))
            .header(
                "content-range",
                format!("{start}-{}", start + chunk.len() - 1),
            )
            .body(chunk.to_vec())
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 202, "chunk {i} at {base}");
        if i < 7 {
            tokio::time::sleep(Duration::from_millis(1300)).await;
        }
    }
    let r = admin
        .put(format!(
            "{}{location}?digest={}",
            b.base(),
            sha256_hex(&data)
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
}

/// A data directory whose metadata is in PostgreSQL, started without `database_url` (a
/// configuration file written from `outpost config`, whose URL is a comment), is refused:
/// it would serve an empty registry on a new SQLite database beside the blobs, whose garbage
/// collection would take every blob for an orphan.
#[tokio::test]
async fn a_postgresql_data_directory_is_not_started_without_its_database() {
    let Some(fleet) = Fleet::new("marker", &[]).await else {
        return;
    };
    let a = fleet.replica(0);
    let admin = client_as("admin", ADMIN_PASSWORD);
    push_image(&admin, &a.base(), "app", "v1", "kept in postgres").await;
    a.terminate();
    let dir = fleet.dirs[0].path();
    let err = failing_start(dir, &fleet.s3.env("fleet"));
    assert!(
        err.contains("keeps its metadata in PostgreSQL") && err.contains("database_url"),
        "{err}"
    );
    assert!(!dir.join("meta.db").exists(), "a SQLite database was made");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_outpost"))
        .args(["config", "--data-dir"])
        .arg(dir)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("keeps its metadata in PostgreSQL"),
        "{err}"
    );
}
