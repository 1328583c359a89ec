//! HTTPS end to end: a root serving the operator's certificate (signed by a private CA made
//! here with rcgen), the management CLI and a connected registry reaching it over
//! `ParentEndpointProtocol=https`, and the one-line errors when the certificate, key or CA is
//! missing or wrong.

use crate::support::{ADMIN_PASSWORD, Outpost, eventually, push_image, tag_digest};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// A private CA and a server certificate for `localhost` and `127.0.0.1`, as PEM files.
struct Pki {
    _dir: tempfile::TempDir,
    ca: PathBuf,
    cert: PathBuf,
    key: PathBuf,
    ca_pem: String,
}

fn pki() -> Pki {
    let dir = tempfile::tempdir().unwrap();
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "Outpost test CA");
    let ca = ca_params.self_signed(&ca_key).unwrap();
    let key = rcgen::KeyPair::generate().unwrap();
    let params =
        rcgen::CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()])
            .unwrap();
    let cert = params.signed_by(&key, &ca, &ca_key).unwrap();
    let write = |name: &str, pem: &str| {
        let p = dir.path().join(name);
        std::fs::write(&p, pem).unwrap();
        p
    };
    Pki {
        ca: write("ca.pem", &ca.pem()),
        cert: write("cert.pem", &cert.pem()),
        key: write("key.pem", &key.serialize_pem()),
        ca_pem: ca.pem(),
        _dir: dir,
    }
}

fn https(o: &Outpost) -> String {
    format!("https://{}", o.addr)
}

/// A client trusting only `ca_pem` (plus the system roots), authenticating as `user`.
fn tls_client(ca_pem: &str, user: &str, pass: &str) -> reqwest::Client {
    let mut h = reqwest::header::HeaderMap::new();
    let auth = format!(
        "Basic {}",
        crate::support::base64_encode(format!("{user}:{pass}").as_bytes())
    );
    h.insert("authorization", auth.parse().unwrap());
    reqwest::Client::builder()
        .add_root_certificate(reqwest::Certificate::from_pem(ca_pem.as_bytes()).unwrap())
        .timeout(Duration::from_secs(60))
        .default_headers(h)
        .build()
        .unwrap()
}

/// Runs the management CLI against `url`, trusting `ca` through `SSL_CERT_FILE` as any
/// rustls-native-certs program does.
fn cli(url: &str, ca: &Path, args: &[&str]) -> std::process::Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_outpost"))
        .args(args)
        .args(["--registry", url, "--username", "admin", "--password"])
        .arg(ADMIN_PASSWORD)
        .env("SSL_CERT_FILE", ca)
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap()
}

fn cli_ok(url: &str, ca: &Path, args: &[&str]) -> String {
    let out = cli(url, ca, args);
    assert!(
        out.status.success(),
        "outpost {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `outpost serve` expected to fail at once; returns its stderr.
fn serve_fails(args: &[&str], env: &[(&str, &Path)]) -> String {
    let dir = tempfile::tempdir().unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_outpost"))
        .args(["serve", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(dir.path())
        .args(args)
        .envs(env.iter().map(|(k, v)| (k, v.as_os_str())))
        .env("OUTPOST_ADMIN_PASSWORD", ADMIN_PASSWORD)
        .output()
        .unwrap();
    assert!(!out.status.success(), "expected serve {args:?} to fail");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[tokio::test]
async fn a_site_follows_an_https_root_signed_by_a_private_ca() {
    let pki = pki();
    let root_dir = tempfile::tempdir().unwrap();
    let site_dir = tempfile::tempdir().unwrap();
    let (cert, key) = (pki.cert.to_str().unwrap(), pki.key.to_str().unwrap());
    let root = Outpost::start(root_dir.path(), &["--tls-cert", cert, "--tls-key", key]);
    let r = https(&root);
    let admin = tls_client(&pki.ca_pem, "admin", ADMIN_PASSWORD);
    let v1 = push_image(&admin, &r, "app", "v1", "over tls").await;

    // Plain HTTP to the TLS port fails for that client only; a client that stalls in the
    // handshake holds up nobody.
    let silent = tokio::net::TcpStream::connect(&root.addr).await.unwrap();
    let plain = reqwest::Client::new()
        .get(format!("http://{}/v2/", root.addr))
        .timeout(Duration::from_secs(10))
        .send()
        .await;
    // It is told so in HTTP, not with a TLS alert its parser cannot read.
    let plain = plain.expect("an HTTP answer");
    assert_eq!(plain.status(), 400);
    assert!(plain.text().await.unwrap().contains("use https://"));
    let ok = admin.get(format!("{r}/v2/")).send().await.unwrap();
    assert_eq!(ok.status(), 200);
    drop(silent);

    // The token realm a 401 names is the HTTPS one: clients following it never send
    // credentials in clear text. The token flow works through it.
    let anonymous = reqwest::Client::builder()
        .add_root_certificate(reqwest::Certificate::from_pem(pki.ca_pem.as_bytes()).unwrap())
        .build()
        .unwrap();
    let challenge = anonymous
        .get(format!("{r}/v2/app/manifests/v1"))
        .send()
        .await
        .unwrap();
    assert_eq!(challenge.status(), 401);
    let header = challenge.headers()["www-authenticate"].to_str().unwrap();
    let realm = format!("https://{}/oauth2/token", root.addr);
    assert!(
        header.starts_with(&format!("Bearer realm=\"{realm}\"")),
        "{header}"
    );
    let token: serde_json::Value = anonymous
        .get(format!("{realm}?service=outpost&scope=repository:app:pull"))
        .basic_auth("admin", Some(ADMIN_PASSWORD))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let pulled = anonymous
        .get(format!("{r}/v2/app/manifests/v1"))
        .bearer_auth(token["token"].as_str().unwrap())
        .header("accept", "application/vnd.oci.image.manifest.v1+json")
        .send()
        .await
        .unwrap();
    assert_eq!(pulled.status(), 200);

    // A client that does not trust the private CA is refused by its own TLS stack.
    let untrusting = reqwest::Client::new().get(format!("{r}/v2/")).send().await;
    assert!(
        untrusting.is_err(),
        "the server certificate must not verify without the CA"
    );

    // The CLI manages the root over HTTPS, and get-settings hands out an https connection
    // string.
    cli_ok(
        &r,
        &pki.ca,
        &[
            "connected-registry",
            "create",
            "-n",
            "vessel",
            "--repository",
            "app",
        ],
    );
    let cs = cli_ok(
        &r,
        &pki.ca,
        &[
            "connected-registry",
            "get-settings",
            "-n",
            "vessel",
            "--parent-protocol",
            "https",
            "--generate-password",
            "1",
            "--yes",
            "-o",
            "tsv",
        ],
    )
    .trim()
    .to_string();
    assert!(cs.contains("ParentEndpointProtocol=https"), "{cs}");

    // Without the CA the site cannot start, and says what to pass.
    let err = serve_fails(&["--connection-string", &cs], &[]);
    assert!(
        err.contains("certificate") && err.contains("--parent-ca-file"),
        "the error must name the certificate problem and the fix:\n{err}"
    );
    // With another CA, it names the file given.
    let other = self::pki();
    let err = serve_fails(
        &["--connection-string", &cs],
        &[("OUTPOST_PARENT_CA_FILE", other.ca.as_path())],
    );
    assert!(
        err.contains(&format!("neither by the CA in {}", other.ca.display())),
        "{err}"
    );

    // With it, the site follows the root.
    let site = Outpost::start_env(
        site_dir.path(),
        &[
            ("OUTPOST_CONNECTION_STRING", cs.as_str()),
            ("OUTPOST_PARENT_CA_FILE", pki.ca.to_str().unwrap()),
            ("OUTPOST_SYNC_POLL_SECS", "5"),
        ],
    );
    let s = site.base();
    let site_admin = crate::support::client_as("admin", ADMIN_PASSWORD);
    eventually("the site has app:v1 from the https root", || async {
        tag_digest(&site_admin, &s, "app", "v1").await.as_deref() == Some(v1.as_str())
    })
    .await;
    let v2 = push_image(&admin, &r, "app", "v2", "second over tls").await;
    eventually("app:v2 follows", || async {
        tag_digest(&site_admin, &s, "app", "v2").await.as_deref() == Some(v2.as_str())
    })
    .await;
}

#[test]
fn tls_settings_that_cannot_work_are_refused_with_one_clear_line() {
    let pki = pki();
    let (cert, key) = (pki.cert.to_str().unwrap(), pki.key.to_str().unwrap());

    let err = serve_fails(&["--tls-cert", cert], &[]);
    assert!(
        err.contains("tls_key") && err.contains("--tls-key"),
        "a certificate without a key:\n{err}"
    );
    let err = serve_fails(&[], &[("OUTPOST_TLS_KEY", &pki.key)]);
    assert!(
        err.contains("only tls_key is set"),
        "a key without a certificate:\n{err}"
    );

    // The key given as the certificate, and the certificate given as the key.
    let err = serve_fails(&["--tls-cert", key, "--tls-key", key], &[]);
    assert!(err.contains("no PEM certificate found"), "{err}");
    let err = serve_fails(&["--tls-cert", cert, "--tls-key", cert], &[]);
    assert!(err.contains("private key"), "{err}");

    // A key that is not the certificate's.
    let other = rcgen::KeyPair::generate().unwrap();
    let other_key = pki._dir.path().join("other-key.pem");
    std::fs::write(&other_key, other.serialize_pem()).unwrap();
    let err = serve_fails(
        &["--tls-cert", cert, "--tls-key", other_key.to_str().unwrap()],
        &[],
    );
    assert!(err.contains("do not form a usable pair"), "{err}");

    // A CA file with no certificate in it.
    let err = serve_fails(&["--parent-ca-file", key], &[]);
    assert!(
        err.contains("parent CA file") && err.contains("no PEM certificate"),
        "{err}"
    );
    let missing = pki._dir.path().join("missing.pem");
    let err = serve_fails(
        &["--tls-cert", missing.to_str().unwrap(), "--tls-key", key],
        &[],
    );
    assert!(
        err.contains("missing.pem"),
        "names the file it could not read:\n{err}"
    );
}

/// A renewed certificate is served after `SIGHUP`, without a restart; a renewal that cannot
/// be read leaves the previous certificate in service.
#[tokio::test]
async fn sighup_serves_a_renewed_certificate() {
    let (old, new) = (pki(), pki());
    let files = tempfile::tempdir().unwrap();
    let (cert, key) = (files.path().join("cert.pem"), files.path().join("key.pem"));
    std::fs::copy(&old.cert, &cert).unwrap();
    std::fs::copy(&old.key, &key).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let root = Outpost::start(
        dir.path(),
        &[
            "--tls-cert",
            cert.to_str().unwrap(),
            "--tls-key",
            key.to_str().unwrap(),
        ],
    );
    let r = https(&root);
    // A fresh client each time: a pooled connection would keep the old handshake.
    let answers = |ca: &str| {
        let ca = ca.to_string();
        let url = format!("{r}/v2/");
        async move {
            tls_client(&ca, "admin", ADMIN_PASSWORD)
                .get(url)
                .send()
                .await
                .is_ok_and(|x| x.status() == 200)
        }
    };
    assert!(answers(&old.ca_pem).await);
    assert!(!answers(&new.ca_pem).await);
    let hangup = || {
        let status = std::process::Command::new("kill")
            .args(["-HUP", &root.child.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
    };
    std::fs::copy(&new.cert, &cert).unwrap();
    std::fs::copy(&new.key, &key).unwrap();
    hangup();
    eventually("the renewed certificate is served", || async {
        answers(&new.ca_pem).await
    })
    .await;
    assert!(!answers(&old.ca_pem).await);
    assert!(root.log().contains("SIGHUP: reloaded the TLS certificate"));

    std::fs::write(&cert, "not a certificate").unwrap();
    hangup();
    eventually("the failed reload is logged", || async {
        root.log().contains("reloading the TLS certificate failed")
    })
    .await;
    assert!(answers(&new.ca_pem).await, "still serving the renewed one");

    // A key that is gone is named as gone.
    std::fs::copy(&new.cert, &cert).unwrap();
    std::fs::remove_file(&key).unwrap();
    hangup();
    let gone = format!(
        "reading TLS private key {}: No such file or directory",
        key.display()
    );
    eventually("the missing key is logged", || async {
        root.log().contains(&gone)
    })
    .await;
    assert!(answers(&new.ca_pem).await);
}
