//! Access control over the router: the Docker/OCI token flow, Basic auth, and the permission
//! matrix — every action × allowed/denied × repository pattern — plus expired, disabled,
//! rotated and forged credentials, the management API and its limits.

#![allow(clippy::unwrap_used)] // tests fail loudly by design

mod common;

use axum::body::Body;
use axum::http::{Method, StatusCode};
use base64::Engine as _;
use common::*;
use outpost_control::{ControlConfig, Limits};
use outpost_oci::Digest;
use outpost_server::AuthSettings;
use serde_json::{Value, json};

async fn setup_default() -> T {
    setup_auth(AuthSettings::default()).await
}

/// Creates scope map `<name>-map` with `actions` and token `name`; returns its password1.
async fn token(t: &T, name: &str, actions: &[&str]) -> String {
    let r = t
        .req(
            Method::POST,
            "/api/v1/scope-maps",
            &[("content-type", "application/json")],
            json!({"name": format!("{name}-map"), "actions": actions}).to_string(),
        )
        .await;
    assert_eq!(r.status, StatusCode::CREATED, "{:?}", r.body);
    let r = t
        .req(
            Method::POST,
            "/api/v1/tokens",
            &[],
            json!({"name": name, "scopeMap": format!("{name}-map")}).to_string(),
        )
        .await;
    assert_eq!(r.status, StatusCode::CREATED, "{:?}", r.body);
    r.json()["passwords"][0]["value"]
        .as_str()
        .unwrap()
        .to_string()
}

/// Generates password `slot` (`password1` or `password2`) of token `name`, expiring `in_ms`
/// from now; returns its value.
async fn password_expiring_in(t: &T, name: &str, slot: &str, in_ms: i64) -> String {
    let at = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
        + in_ms;
    let r = t
        .req(
            Method::POST,
            &format!("/api/v1/tokens/{name}/credentials/generate"),
            &[],
            json!({"passwords": [slot], "expiry": outpost_control::format_rfc3339(at)}).to_string(),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{:?}", r.body);
    let i = if slot == "password1" { 0 } else { 1 };
    r.json()["passwords"][i]["value"]
        .as_str()
        .unwrap()
        .to_string()
}

/// Gets an access token from the token endpoint with Basic credentials.
async fn bearer(t: &T, user: &str, pass: &str, scopes: &[&str]) -> String {
    let q: Vec<String> = scopes
        .iter()
        .map(|s| format!("scope={}", s.replace(',', "%2C")))
        .collect();
    let r = t
        .req_as(
            Some(&basic(user, pass)),
            Method::GET,
            &format!("/oauth2/token?service=outpost&{}", q.join("&")),
            &[],
            Body::empty(),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{:?}", r.body);
    let v = r.json();
    assert_eq!(v["token"], v["access_token"]);
    assert!(v["expires_in"].as_u64().unwrap() > 0);
    format!("Bearer {}", v["token"].as_str().unwrap())
}

/// Seeds repositories `app`, `team/one`, `team/two/deep` and `other` with an image `v1` each.
async fn seed(t: &T) -> Digest {
    let mut d = None;
    for repo in ["app", "team/one", "team/two/deep", "other"] {
        d = Some(t.push_image(repo, "v1", "seed").await.1);
    }
    d.unwrap()
}

#[derive(Clone, Copy, Debug)]
enum Op {
    Pull,
    Push,
    Delete,
    TagsList,
    Referrers,
}

/// Performs `op` on `repo` as `auth`; returns the status.
async fn attempt(t: &T, auth: &str, op: Op, repo: &str, digest: &Digest) -> StatusCode {
    let a = Some(auth);
    match op {
        Op::Pull => {
            t.req_as(
                a,
                Method::GET,
                &format!("/v2/{repo}/manifests/v1"),
                &[],
                Body::empty(),
            )
            .await
            .status
        }
        Op::Push => {
            t.req_as(
                a,
                Method::POST,
                &format!("/v2/{repo}/blobs/uploads/"),
                &[],
                Body::empty(),
            )
            .await
            .status
        }
        Op::Delete => {
            t.req_as(
                a,
                Method::DELETE,
                &format!("/v2/{repo}/manifests/v1"),
                &[],
                Body::empty(),
            )
            .await
            .status
        }
        Op::TagsList => {
            t.req_as(
                a,
                Method::GET,
                &format!("/v2/{repo}/tags/list"),
                &[],
                Body::empty(),
            )
            .await
            .status
        }
        Op::Referrers => {
            t.req_as(
                a,
                Method::GET,
                &format!("/v2/{repo}/referrers/{digest}"),
                &[],
                Body::empty(),
            )
            .await
            .status
        }
    }
}

fn success(op: Op) -> StatusCode {
    match op {
        Op::Pull | Op::TagsList | Op::Referrers => StatusCode::OK,
        Op::Push | Op::Delete => StatusCode::ACCEPTED,
    }
}

#[tokio::test]
async fn permission_matrix_for_basic_and_bearer() {
    let t = setup_default().await;
    let digest = seed(&t).await;
    // (pattern, action, op)
    let cases: &[(&str, &str, Op)] = &[
        ("app", "content/read", Op::Pull),
        ("app", "content/write", Op::Push),
        ("app", "content/delete", Op::Delete),
        ("app", "metadata/read", Op::TagsList),
        ("app", "metadata/read", Op::Referrers),
        ("team/*", "content/read", Op::Pull),
        ("team/*", "content/write", Op::Push),
        ("team/*", "content/delete", Op::Delete),
        ("team/*", "metadata/read", Op::TagsList),
        ("*", "content/read", Op::Pull),
        ("*", "content/write", Op::Push),
        ("*", "metadata/read", Op::Referrers),
    ];
    for (i, (pattern, action, op)) in cases.iter().enumerate() {
        let name = format!("matrix{i:02}");
        let pw = token(&t, &name, &[&format!("repositories/{pattern}/{action}")]).await;
        let basic_auth = basic(&name, &pw);
        let inside: &[&str] = match *pattern {
            "app" => &["app"],
            "team/*" => &["team/one", "team/two/deep"],
            _ => &["app", "team/one", "other"],
        };
        let outside: &[&str] = match *pattern {
            "app" => &["other", "team/one"],
            "team/*" => &["app", "other"],
            _ => &[],
        };
        for repo in inside {
            // Delete last, so the manifest is still there for the other checks.
            let got = attempt(&t, &basic_auth, *op, repo, &digest).await;
            assert_eq!(
                got,
                success(*op),
                "{name}: {pattern} {action} {op:?} on {repo} (basic)"
            );
            if matches!(op, Op::Delete) {
                t.push_image(repo, "v1", "seed").await;
            }
            let verb = match op {
                Op::Push => "pull,push",
                Op::Delete => "delete",
                _ => "pull",
            };
            let b = bearer(&t, &name, &pw, &[&format!("repository:{repo}:{verb}")]).await;
            assert_eq!(
                attempt(&t, &b, *op, repo, &digest).await,
                success(*op),
                "{name}: {op:?} on {repo} (bearer)"
            );
            if matches!(op, Op::Delete) {
                t.push_image(repo, "v1", "seed").await;
            }
        }
        for repo in outside {
            let got = attempt(&t, &basic_auth, *op, repo, &digest).await;
            assert_eq!(
                got,
                StatusCode::FORBIDDEN,
                "{name}: {pattern} {action} {op:?} on {repo} must be denied"
            );
        }
        // The action alone does not grant the others.
        let other_op = match op {
            Op::Pull | Op::TagsList | Op::Referrers => Op::Push,
            Op::Push | Op::Delete => Op::Pull,
        };
        if !(matches!(other_op, Op::Pull) && *action == "content/read") {
            assert_eq!(
                attempt(&t, &basic_auth, other_op, inside[0], &digest).await,
                StatusCode::FORBIDDEN,
                "{name}: {other_op:?}"
            );
        }
    }
}

#[tokio::test]
async fn challenge_and_token_flow() {
    let t = setup_default().await;
    t.push_image("app", "v1", "x").await;
    // No credentials: 401 with a Bearer challenge naming the realm, service and scope.
    let r = t
        .req_as(
            None,
            Method::GET,
            "/v2/app/manifests/v1",
            &[],
            Body::empty(),
        )
        .await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);
    assert_eq!(r.code(), "UNAUTHORIZED");
    assert_eq!(
        r.header("www-authenticate"),
        "Bearer realm=\"http://registry.test:5000/oauth2/token\",service=\"outpost\",scope=\"repository:app:pull\""
    );
    let r = t
        .req_as(None, Method::GET, "/v2/", &[], Body::empty())
        .await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);
    assert!(r.header("www-authenticate").starts_with("Bearer realm="));
    // Behind a reverse proxy the realm is where the client addressed it, as the proxy says:
    // the first of a list, or RFC 7239's header.
    for (headers, realm) in [
        (
            vec![
                ("x-forwarded-proto", "https, http"),
                ("x-forwarded-host", "reg.example.com, inner:5000"),
            ],
            "https://reg.example.com/oauth2/token",
        ),
        (
            vec![(
                "forwarded",
                "for=10.0.0.9;proto=https;host=\"reg.example.com:8443\"",
            )],
            "https://reg.example.com:8443/oauth2/token",
        ),
        (
            vec![("x-forwarded-host", "bad host/../x")],
            "http://registry.test:5000/oauth2/token",
        ),
    ] {
        let r = t
            .req_as(None, Method::GET, "/v2/", &headers, Body::empty())
            .await;
        assert!(
            r.header("www-authenticate")
                .starts_with(&format!("Bearer realm=\"{realm}\"")),
            "{headers:?}: {}",
            r.header("www-authenticate")
        );
    }
    let r = t
        .req_as(
            None,
            Method::POST,
            "/v2/app/blobs/uploads/",
            &[],
            Body::empty(),
        )
        .await;
    assert!(
        r.header("www-authenticate")
            .ends_with("scope=\"repository:app:pull,push\"")
    );

    // Token endpoint: GET with Basic, POST form (containerd), several scopes at once.
    let pw = token(
        &t,
        "reader",
        &[
            "repositories/app/content/read",
            "repositories/app/metadata/read",
        ],
    )
    .await;
    let b = bearer(
        &t,
        "reader",
        &pw,
        &["repository:app:pull,push", "repository:other:pull"],
    )
    .await;
    assert_eq!(
        t.req_as(
            Some(&b),
            Method::GET,
            "/v2/app/manifests/v1",
            &[],
            Body::empty()
        )
        .await
        .status,
        StatusCode::OK
    );
    // The push part of the request was not granted (scope escalation is cut down to the map).
    let r = t
        .req_as(
            Some(&b),
            Method::POST,
            "/v2/app/blobs/uploads/",
            &[],
            Body::empty(),
        )
        .await;
    assert_eq!(r.status, StatusCode::FORBIDDEN);
    assert_eq!(r.code(), "DENIED");
    assert!(
        r.json()["errors"][0]["message"]
            .as_str()
            .unwrap()
            .contains("insufficient scopes")
    );
    let form = format!(
        "grant_type=password&username=reader&password={pw}&scope=repository%3Aapp%3Apull&service=outpost&client_id=containerd"
    );
    let r = t
        .req_as(
            None,
            Method::POST,
            "/oauth2/token",
            &[("content-type", "application/x-www-form-urlencoded")],
            form,
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{:?}", r.body);
    let tok = format!("Bearer {}", r.json()["access_token"].as_str().unwrap());
    assert_eq!(
        t.req_as(
            Some(&tok),
            Method::GET,
            "/v2/app/manifests/v1",
            &[],
            Body::empty()
        )
        .await
        .status,
        StatusCode::OK
    );
    // A token scoped to pull only, used by a token that could push: 401 asking for the scope.
    let admin_pull = bearer(&t, "admin", ADMIN_PASSWORD, &["repository:app:pull"]).await;
    let r = t
        .req_as(
            Some(&admin_pull),
            Method::POST,
            "/v2/app/blobs/uploads/",
            &[],
            Body::empty(),
        )
        .await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);
    assert!(
        r.header("www-authenticate")
            .ends_with("scope=\"repository:app:pull,push\",error=\"insufficient_scope\""),
        "{}",
        r.header("www-authenticate")
    );
    assert!(
        r.json()["errors"][0]["message"]
            .as_str()
            .unwrap()
            .contains("does not grant"),
        "{:?}",
        r.body
    );
    // Nor does it open the management or gateway API, though issued to admin: it carries
    // repository scopes only. The same token's Basic credentials do.
    for path in ["/api/v1/tokens", "/gateway/v1/nosuch-registry/config"] {
        let r = t
            .req_as(Some(&admin_pull), Method::GET, path, &[], Body::empty())
            .await;
        assert_eq!(r.status, StatusCode::UNAUTHORIZED, "{path}");
        assert!(
            r.json()["errors"][0]["message"]
                .as_str()
                .unwrap()
                .contains("not an access token"),
            "{path}: {:?}",
            r.body
        );
        let r = t
            .req_as(
                Some(&basic("admin", ADMIN_PASSWORD)),
                Method::GET,
                path,
                &[],
                Body::empty(),
            )
            .await;
        assert_ne!(r.status, StatusCode::UNAUTHORIZED, "{path}");
    }
    // Every 401 of these APIs asks for Basic credentials: an access token, a wrong password,
    // an unknown token, a malformed header and none at all (a Bearer challenge would send
    // the client to the token service, which cannot help). With a body too.
    for (auth, method, path) in [
        (Some(admin_pull.clone()), Method::GET, "/api/v1/tokens"),
        (Some(basic("admin", "wrong")), Method::GET, "/api/v1/tokens"),
        (
            Some(basic("admin", "wrong")),
            Method::POST,
            "/api/v1/scope-maps",
        ),
        (
            Some(basic("nosuch", "x")),
            Method::GET,
            "/gateway/v1/r1/config",
        ),
        (Some("Basic %%%".to_string()), Method::GET, "/api/v1/tokens"),
        (
            Some("Digest x".to_string()),
            Method::GET,
            "/gateway/v1/r1/config",
        ),
        (None, Method::GET, "/api/v1/tokens"),
        (None, Method::POST, "/api/v1/scope-maps"),
    ] {
        let r = t
            .req_as(auth.as_deref(), method.clone(), path, &[], Body::from("{}"))
            .await;
        assert_eq!(r.status, StatusCode::UNAUTHORIZED, "{auth:?} {path}");
        assert_eq!(
            r.header("www-authenticate"),
            "Basic realm=\"outpost\"",
            "{auth:?} {method} {path}"
        );
        if auth.as_deref() == Some("Basic %%%") {
            assert!(
                r.message().contains("malformed Basic credentials"),
                "{}",
                r.message()
            );
        }
    }

    // Wrong password at the token endpoint and on /v2/.
    let r = t
        .req_as(
            Some(&basic("reader", "nope")),
            Method::GET,
            "/oauth2/token?scope=repository:app:pull",
            &[],
            Body::empty(),
        )
        .await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);
    assert_eq!(
        r.json()["errors"][0]["message"],
        "incorrect username or password"
    );
    let r = t
        .req_as(
            Some(&basic("nobody", "x")),
            Method::GET,
            "/v2/",
            &[],
            Body::empty(),
        )
        .await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);
    let r = t
        .req_as(None, Method::GET, "/oauth2/token", &[], Body::empty())
        .await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);
    let r = t
        .req_as(
            None,
            Method::POST,
            "/oauth2/token",
            &[],
            "grant_type=refresh_token&refresh_token=x",
        )
        .await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
}

#[tokio::test]
async fn forged_expired_and_foreign_access_tokens() {
    let t = setup_default().await;
    t.push_image("app", "v1", "x").await;
    let pw = token(&t, "reader", &["repositories/app/content/read"]).await;
    let good = bearer(&t, "reader", &pw, &["repository:app:pull"]).await;
    let jwt = good.trim_start_matches("Bearer ");
    let parts: Vec<&str> = jwt.split('.').collect();
    let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let mut claims: Value = serde_json::from_slice(&b64.decode(parts[1]).unwrap()).unwrap();

    // Tampered: grant ourselves push on another repository, keep the signature.
    claims["access"] = json!([{"type": "repository", "name": "other", "actions": ["push", "content/write", "content/read"]}]);
    let tampered = format!(
        "Bearer {}.{}.{}",
        parts[0],
        b64.encode(claims.to_string()),
        parts[2]
    );
    // alg: none
    let none = format!(
        "Bearer {}.{}.",
        b64.encode(r#"{"alg":"none","typ":"JWT"}"#),
        b64.encode(claims.to_string())
    );
    // Signed with another registry's key.
    let other = setup_default().await;
    let other_pw = token(&other, "reader", &["repositories/app/content/read"]).await;
    let foreign = bearer(&other, "reader", &other_pw, &["repository:app:pull"]).await;
    for (what, tok) in [
        ("tampered", &tampered),
        ("alg none", &none),
        ("foreign", &foreign),
        ("garbage", &"Bearer abc".to_string()),
    ] {
        let r = t
            .req_as(
                Some(tok),
                Method::GET,
                "/v2/app/manifests/v1",
                &[],
                Body::empty(),
            )
            .await;
        assert_eq!(r.status, StatusCode::UNAUTHORIZED, "{what}");
        assert!(
            r.header("www-authenticate").starts_with("Bearer realm="),
            "{what}"
        );
    }
    // Expired: a registry whose access tokens live 0 seconds.
    let short = setup_full(Default::default(), AuthSettings::default()).await;
    let c = outpost_control::Control::open(
        short.registry.meta().clone(),
        tempfile::tempdir().unwrap().path(),
        ControlConfig {
            access_token_ttl: std::time::Duration::ZERO,
            ..Default::default()
        },
    )
    .await
    .unwrap();
    c.bootstrap_admin(Some(ADMIN_PASSWORD)).await.unwrap();
    let id = c.authenticate("admin", ADMIN_PASSWORD).await.unwrap();
    let expired = c.issue(&id, &["repository:app:pull".into()], "outpost");
    assert!(matches!(
        c.verify_bearer(&expired.token, "outpost").await,
        Err(outpost_control::ControlError::Jwt(
            outpost_control::jwt::JwtError::Expired
        ))
    ));
}

#[tokio::test]
async fn disabled_tokens_expired_and_rotated_passwords() {
    let t = setup_default().await;
    t.push_image("app", "v1", "x").await;
    let r = t
        .req(
            Method::POST,
            "/api/v1/scope-maps",
            &[],
            json!({"name": "readers", "actions": ["repositories/app/content/read"]}).to_string(),
        )
        .await;
    assert_eq!(r.status, StatusCode::CREATED);
    let r = t
        .req(
            Method::POST,
            "/api/v1/tokens",
            &[],
            json!({"name": "rotator", "scopeMap": "readers"}).to_string(),
        )
        .await;
    let v = r.json();
    let (p1, p2) = (
        v["passwords"][0]["value"].as_str().unwrap().to_string(),
        v["passwords"][1]["value"].as_str().unwrap().to_string(),
    );
    let pull = |auth: String| {
        let t = &t;
        async move {
            t.req_as(
                Some(&auth),
                Method::GET,
                "/v2/app/manifests/v1",
                &[],
                Body::empty(),
            )
            .await
            .status
        }
    };
    assert_eq!(pull(basic("rotator", &p1)).await, StatusCode::OK);
    assert_eq!(pull(basic("rotator", &p2)).await, StatusCode::OK);
    let b = bearer(&t, "rotator", &p1, &["repository:app:pull"]).await;
    let b2 = bearer(&t, "rotator", &p2, &["repository:app:pull"]).await;

    // Rotate password1: the old value stops working at once, password2 keeps working.
    let r = t
        .req(
            Method::POST,
            "/api/v1/tokens/rotator/credentials/generate",
            &[],
            json!({"passwords": ["password1"]}).to_string(),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK);
    let new1 = r.json()["passwords"][0]["value"]
        .as_str()
        .unwrap()
        .to_string();
    assert_eq!(pull(basic("rotator", &p1)).await, StatusCode::UNAUTHORIZED);
    assert_eq!(pull(basic("rotator", &p2)).await, StatusCode::OK);
    assert_eq!(pull(basic("rotator", &new1)).await, StatusCode::OK);
    // An access token issued before the rotation stops working with it, not at its expiry.
    let r = t
        .req_as(
            Some(&b),
            Method::GET,
            "/v2/app/manifests/v1",
            &[],
            Body::empty(),
        )
        .await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);
    let why = r.json()["errors"][0]["message"].to_string();
    assert!(
        why.contains("a password of the token that was generated again or deleted"),
        "{why}"
    );
    // One bought with password2 keeps working: nodes that log in with it pull on while
    // password1 is rotated.
    let r = t
        .req_as(
            Some(&b2),
            Method::GET,
            "/v2/app/manifests/v1",
            &[],
            Body::empty(),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK);
    let b = bearer(&t, "rotator", &new1, &["repository:app:pull"]).await;
    // A slot named twice is generated once: the value shown is the value stored.
    let r = t
        .req(
            Method::POST,
            "/api/v1/tokens/rotator/credentials/generate",
            &[],
            json!({"passwords": ["password1", "password1"]}).to_string(),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK);
    let twice = r.json()["passwords"][0]["value"]
        .as_str()
        .unwrap()
        .to_string();
    assert_eq!(pull(basic("rotator", &twice)).await, StatusCode::OK);
    assert_eq!(
        pull(basic("rotator", &new1)).await,
        StatusCode::UNAUTHORIZED
    );
    let new1 = twice;
    // Two creates of one token name at once: one gets it, the other is told it exists; the
    // passwords the winner was given work.
    let create = || {
        t.req(
            Method::POST,
            "/api/v1/tokens",
            &[],
            json!({"name": "racer", "scopeMap": "readers"}).to_string(),
        )
    };
    let (first, second) = tokio::join!(create(), create());
    let mut statuses = [first.status.as_u16(), second.status.as_u16()];
    statuses.sort();
    assert_eq!(statuses, [201, 409]);
    let winner = if first.status == StatusCode::CREATED {
        &first
    } else {
        &second
    };
    let pw = winner.json()["passwords"][0]["value"]
        .as_str()
        .unwrap()
        .to_string();
    assert_eq!(pull(basic("racer", &pw)).await, StatusCode::OK);
    // Passwords are never shown again.
    let r = t
        .req(Method::GET, "/api/v1/tokens/rotator", &[], Body::empty())
        .await;
    assert!(r.json()["passwords"][0].get("value").is_none());
    assert!(!String::from_utf8_lossy(&r.body).contains(&new1));

    // An expiration already past is refused (the password would never work); password2 is
    // left as it was.
    let r = t
        .req(
            Method::POST,
            "/api/v1/tokens/rotator/credentials/generate",
            &[],
            json!({"passwords": ["password2"], "expiry": "2001-01-01T00:00:00Z"}).to_string(),
        )
        .await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    assert!(
        r.json()["errors"][0]["message"]
            .as_str()
            .unwrap()
            .contains("2001-01-01T00:00:00Z is in the past"),
        "{:?}",
        r.body
    );
    // A number of days is counted here, by the registry's clock; out of range, or with a
    // date as well, it is refused.
    let r = t
        .req(
            Method::POST,
            "/api/v1/tokens/rotator/credentials/generate",
            &[],
            json!({"passwords": ["password2"], "expiryInDays": 30}).to_string(),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{:?}", r.body);
    let p2 = &r.json()["passwords"][1];
    let days = (outpost_control::parse_rfc3339(p2["expiry"].as_str().unwrap()).unwrap()
        - outpost_control::parse_rfc3339(p2["creationTime"].as_str().unwrap()).unwrap())
        as f64
        / 86_400_000.0;
    assert!((days - 30.0).abs() < 0.01, "{p2}");
    for bad in [
        json!({"passwords": ["password2"], "expiryInDays": 0}),
        json!({"passwords": ["password2"], "expiryInDays": 36_501}),
        json!({"passwords": ["password2"], "expiryInDays": 3, "expiry": "2099-01-01T00:00:00Z"}),
    ] {
        let r = t
            .req(
                Method::POST,
                "/api/v1/tokens/rotator/credentials/generate",
                &[],
                bad.to_string(),
            )
            .await;
        assert_eq!(r.status, StatusCode::BAD_REQUEST, "{bad}");
        assert!(
            r.json()["errors"][0]["message"]
                .as_str()
                .unwrap()
                .contains("expiryInDays"),
            "{bad}: {:?}",
            r.body
        );
    }
    // An expired password is refused with a message that says so: one that expires in two
    // seconds, used after it did.
    let old2 = password_expiring_in(&t, "rotator", "password2", 2_000).await;
    // An access token bought with it ends when the password does, not 5 minutes later.
    let r = t
        .req_as(
            Some(&basic("rotator", &old2)),
            Method::GET,
            "/oauth2/token?service=outpost&scope=repository:app:pull",
            &[],
            Body::empty(),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{:?}", r.body);
    assert!(
        r.json()["expires_in"].as_u64().unwrap() <= 2,
        "{:?}",
        r.body
    );
    let short = format!("Bearer {}", r.json()["token"].as_str().unwrap());
    assert_eq!(pull(short.clone()).await, StatusCode::OK);
    tokio::time::sleep(std::time::Duration::from_millis(2_100)).await;
    assert_eq!(pull(short).await, StatusCode::UNAUTHORIZED);
    let r = t
        .req_as(
            Some(&basic("rotator", &old2)),
            Method::GET,
            "/v2/app/manifests/v1",
            &[],
            Body::empty(),
        )
        .await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);
    let m = r.json()["errors"][0]["message"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(m.contains("expired at 20"), "it says when: {m}");

    // Disabling the token refuses Basic and already-issued access tokens alike.
    let r = t
        .req(
            Method::PATCH,
            "/api/v1/tokens/rotator",
            &[],
            json!({"status": "disabled"}).to_string(),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK);
    let r = t
        .req_as(
            Some(&basic("rotator", &new1)),
            Method::GET,
            "/v2/app/manifests/v1",
            &[],
            Body::empty(),
        )
        .await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);
    assert!(
        r.json()["errors"][0]["message"]
            .as_str()
            .unwrap()
            .contains("disabled")
    );
    assert_eq!(pull(b).await, StatusCode::UNAUTHORIZED);
    let r = t
        .req_as(
            Some(&basic("rotator", &new1)),
            Method::GET,
            "/oauth2/token?scope=repository:app:pull",
            &[],
            Body::empty(),
        )
        .await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);
}

#[tokio::test]
async fn catalog_lists_only_readable_repositories_and_mount_never_leaks() {
    let t = setup_default().await;
    seed(&t).await;
    let pw = token(
        &t,
        "teamer",
        &[
            "repositories/team/*/metadata/read",
            "repositories/team/*/content/read",
            "repositories/team/*/content/write",
        ],
    )
    .await;
    let r = t
        .req_as(
            Some(&basic("teamer", &pw)),
            Method::GET,
            "/v2/_catalog",
            &[],
            Body::empty(),
        )
        .await;
    assert_eq!(
        r.json()["repositories"],
        json!(["team/one", "team/two/deep"])
    );
    // Paging one name at a time shows the same two, and no page or Link names a repository
    // the token may not read.
    let mut path = "/v2/_catalog?n=1".to_string();
    let mut seen = Vec::new();
    for _ in 0..5 {
        let r = t
            .req_as(
                Some(&basic("teamer", &pw)),
                Method::GET,
                &path,
                &[],
                Body::empty(),
            )
            .await;
        assert_eq!(r.status, StatusCode::OK);
        for v in r.json()["repositories"].as_array().unwrap() {
            seen.push(v.as_str().unwrap().to_string());
        }
        let link = r
            .headers
            .get("link")
            .map(|v| v.to_str().unwrap().to_string());
        let Some(link) = link else { break };
        assert!(
            link.contains("team/"),
            "the Link names a hidden repository: {link}"
        );
        path = link
            .trim_start_matches('<')
            .split('>')
            .next()
            .unwrap()
            .to_string();
    }
    assert_eq!(seen, ["team/one", "team/two/deep"]);
    let r = t.get("/v2/_catalog").await;
    assert_eq!(
        r.json()["repositories"].as_array().unwrap().len(),
        4,
        "admin sees everything"
    );

    // A blob only in `other` cannot be mounted into team/one by a token that cannot read `other`.
    let secret = t.push_blob("other", b"secret layer").await;
    let r = t
        .req_as(
            Some(&basic("teamer", &pw)),
            Method::POST,
            &format!("/v2/team/one/blobs/uploads/?mount={secret}&from=other"),
            &[],
            Body::empty(),
        )
        .await;
    assert_eq!(r.status, StatusCode::ACCEPTED, "falls back to an upload");
    let r = t
        .req_as(
            Some(&basic("teamer", &pw)),
            Method::HEAD,
            &format!("/v2/team/one/blobs/{secret}"),
            &[],
            Body::empty(),
        )
        .await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);
    // From a readable source it mounts.
    let shared = t.push_blob("team/two/deep", b"shared layer").await;
    let r = t
        .req_as(
            Some(&basic("teamer", &pw)),
            Method::POST,
            &format!("/v2/team/one/blobs/uploads/?mount={shared}&from=team/two/deep"),
            &[],
            Body::empty(),
        )
        .await;
    assert_eq!(r.status, StatusCode::CREATED);
}

/// A configured public address is the realm whatever the request says.
#[tokio::test]
async fn the_public_url_names_the_realm() {
    let t = setup_auth(AuthSettings {
        public_url: Some("https://registry.example.com".into()),
        ..Default::default()
    })
    .await;
    let r = t
        .req_as(
            None,
            Method::GET,
            "/v2/",
            &[("x-forwarded-host", "elsewhere.example")],
            Body::empty(),
        )
        .await;
    assert_eq!(
        r.header("www-authenticate"),
        "Bearer realm=\"https://registry.example.com/oauth2/token\",service=\"outpost\""
    );
}

#[tokio::test]
async fn anonymous_pull_when_enabled() {
    let t = setup_auth(AuthSettings {
        anonymous_pull: true,
        ..Default::default()
    })
    .await;
    t.push_image("app", "v1", "x").await;
    // The base endpoint still challenges, so clients log in (or fetch the anonymous token)
    // before they push.
    let r = t
        .req_as(None, Method::GET, "/v2/", &[], Body::empty())
        .await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);
    assert!(r.header("www-authenticate").starts_with("Bearer realm="));
    let r = t
        .req_as(
            None,
            Method::GET,
            "/oauth2/token?service=outpost&scope=repository:app:pull",
            &[],
            Body::empty(),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "an anonymous token");
    let anon = format!("Bearer {}", r.json()["token"].as_str().unwrap());
    for path in ["/v2/", "/v2/app/manifests/v1", "/v2/app/tags/list"] {
        let r = t
            .req_as(Some(&anon), Method::GET, path, &[], Body::empty())
            .await;
        assert_eq!(r.status, StatusCode::OK, "{path} with the anonymous token");
    }
    let r = t
        .req_as(
            Some(&anon),
            Method::POST,
            "/v2/app/blobs/uploads/",
            &[],
            Body::empty(),
        )
        .await;
    assert_eq!(
        r.status,
        StatusCode::UNAUTHORIZED,
        "the anonymous token pushes nothing"
    );
    assert_eq!(
        t.req_as(
            None,
            Method::GET,
            "/v2/app/manifests/v1",
            &[],
            Body::empty()
        )
        .await
        .status,
        StatusCode::OK
    );
    assert_eq!(
        t.req_as(None, Method::GET, "/v2/app/tags/list", &[], Body::empty())
            .await
            .status,
        StatusCode::OK
    );
    let r = t
        .req_as(
            None,
            Method::POST,
            "/v2/app/blobs/uploads/",
            &[],
            Body::empty(),
        )
        .await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);
    let r = t
        .req_as(
            None,
            Method::DELETE,
            "/v2/app/manifests/v1",
            &[],
            Body::empty(),
        )
        .await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);
}

#[tokio::test]
async fn management_api_rules_and_limits() {
    let t = setup_full(Default::default(), AuthSettings::default()).await;
    // Only the administrator may use it.
    let r = t
        .req_as(None, Method::GET, "/api/v1/tokens", &[], Body::empty())
        .await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);
    let pw = token(&t, "notadmin", &["repositories/*/content/read"]).await;
    let r = t
        .req_as(
            Some(&basic("notadmin", &pw)),
            Method::GET,
            "/api/v1/tokens",
            &[],
            Body::empty(),
        )
        .await;
    assert_eq!(r.status, StatusCode::FORBIDDEN);

    let post = |path: &'static str, body: Value| {
        let t = &t;
        async move { t.req(Method::POST, path, &[], body.to_string()).await }
    };
    let r = post(
        "/api/v1/scope-maps",
        json!({"name": "badaction", "actions": ["repositories/app/content/pull"]}),
    )
    .await;
    assert_eq!(
        (r.status, r.code().as_str()),
        (StatusCode::BAD_REQUEST, "INVALID_REQUEST")
    );
    assert!(
        r.json()["errors"][0]["message"]
            .as_str()
            .unwrap()
            .contains("content/pull")
    );
    let r = post(
        "/api/v1/scope-maps",
        json!({"name": "ab", "actions": ["repositories/app/content/read"]}),
    )
    .await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    let r = post(
        "/api/v1/scope-maps",
        json!({"name": "dupe1", "actions": ["repositories/app/content/read"]}),
    )
    .await;
    assert_eq!(r.status, StatusCode::CREATED);
    let r = post(
        "/api/v1/scope-maps",
        json!({"name": "dupe1", "actions": ["repositories/app/content/read"]}),
    )
    .await;
    assert_eq!(
        (r.status, r.code().as_str()),
        (StatusCode::CONFLICT, "ALREADY_EXISTS")
    );
    let r = post("/api/v1/scope-maps", json!({"name": "x", "nonsense": 1})).await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    // A body over the 2 MiB limit is refused in the API's own error format, not as plain text,
    // on the management API and on the gateway.
    for path in ["/api/v1/scope-maps", "/gateway/v1/somesite/notifications"] {
        let big = format!("{{\"name\":\"{}\"}}", "a".repeat(3 << 20));
        let r = t.req(Method::POST, path, &[], big).await;
        assert_eq!(
            (r.status, r.code().as_str()),
            (StatusCode::PAYLOAD_TOO_LARGE, "SIZE_INVALID"),
            "{path}"
        );
    }
    let r = post(
        "/api/v1/tokens",
        json!({"name": "orphan", "scopeMap": "missing-map"}),
    )
    .await;
    assert_eq!(
        (r.status, r.code().as_str()),
        (StatusCode::NOT_FOUND, "NOT_FOUND")
    );

    // 500 repository rules per scope map.
    let many: Vec<String> = (0..501)
        .map(|i| format!("repositories/r{i}/content/read"))
        .collect();
    let r = post(
        "/api/v1/scope-maps",
        json!({"name": "toomany", "actions": many}),
    )
    .await;
    assert_eq!(
        (r.status, r.code().as_str()),
        (StatusCode::CONFLICT, "LIMIT_EXCEEDED")
    );
    assert!(
        r.json()["errors"][0]["message"]
            .as_str()
            .unwrap()
            .contains("500")
    );
    let ok: Vec<String> = (0..500)
        .map(|i| format!("repositories/r{i}/content/read"))
        .collect();
    assert_eq!(
        post(
            "/api/v1/scope-maps",
            json!({"name": "justright", "actions": ok})
        )
        .await
        .status,
        StatusCode::CREATED
    );

    // update: add/remove, ambiguity, nothing to do
    let r = t.req(Method::PATCH, "/api/v1/scope-maps/dupe1", &[], json!({"add": ["repositories/b/content/read"], "remove": ["repositories/b/content/read"]}).to_string()).await;
    assert!(
        r.json()["errors"][0]["message"]
            .as_str()
            .unwrap()
            .starts_with("Update ambiguity")
    );
    let r = t
        .req(
            Method::PATCH,
            "/api/v1/scope-maps/dupe1",
            &[],
            json!({}).to_string(),
        )
        .await;
    assert_eq!(
        r.json()["errors"][0]["message"],
        "No scope map properties to update."
    );
    let r = t.req(Method::PATCH, "/api/v1/scope-maps/dupe1", &[], json!({"add": ["repositories/b/content/write"], "remove": ["repositories/app/content/read"]}).to_string()).await;
    assert_eq!(r.json()["actions"], json!(["repositories/b/content/write"]));

    // The administrator token cannot be deleted or disabled.
    assert_eq!(
        t.req(Method::DELETE, "/api/v1/tokens/admin", &[], Body::empty())
            .await
            .status,
        StatusCode::BAD_REQUEST
    );
    assert_eq!(
        t.req(
            Method::PATCH,
            "/api/v1/tokens/admin",
            &[],
            json!({"status": "disabled"}).to_string()
        )
        .await
        .status,
        StatusCode::BAD_REQUEST
    );
}

#[tokio::test]
async fn token_and_scope_map_count_limits() {
    let t = setup_default().await;
    let c = outpost_control::Control::open(
        t.registry.meta().clone(),
        tempfile::tempdir().unwrap().path(),
        ControlConfig {
            limits: Limits {
                max_tokens: 3,
                max_scope_maps: 2,
                max_repository_rules: 500,
            },
            ..Default::default()
        },
    )
    .await
    .unwrap();
    // The administrator token (ACR's admin user) does not count.
    c.create_scope_map("mapone", "", &["repositories/a/content/read".into()])
        .await
        .unwrap();
    c.create_scope_map("maptwo", "", &["repositories/a/content/read".into()])
        .await
        .unwrap();
    let e = c
        .create_scope_map("mapthree", "", &["repositories/a/content/read".into()])
        .await
        .unwrap_err();
    assert!(e.to_string().contains("limit is 2"), "{e}");
    c.create_token("tokone", "mapone", true, true, None)
        .await
        .unwrap();
    c.create_token("toktwo", "mapone", true, true, None)
        .await
        .unwrap();
    c.create_token("tokthree", "mapone", true, true, None)
        .await
        .unwrap();
    let e = c
        .create_token("tokfour", "mapone", true, true, None)
        .await
        .unwrap_err();
    assert!(e.to_string().contains("limit is 3"), "{e}");
}

/// At a connected registry a refused login says what can be done about it: tokens and their
/// passwords are managed at the root.
#[tokio::test]
async fn a_site_says_where_refused_credentials_are_fixed() {
    let t = common::setup_site("site-x", &["app"]).await;
    let r = t
        .req(
            Method::POST,
            "/api/v1/scope-maps",
            &[],
            json!({"name": "site-readers", "actions": ["repositories/app/content/read"]})
                .to_string(),
        )
        .await;
    assert_eq!(r.status, StatusCode::CREATED, "{:?}", r.body);
    let r = t
        .req(
            Method::POST,
            "/api/v1/tokens",
            &[],
            json!({"name": "site-reader", "scopeMap": "site-readers"}).to_string(),
        )
        .await;
    assert_eq!(r.status, StatusCode::CREATED, "{:?}", r.body);
    // 3 s: time enough for the request on a loaded machine.
    let pw = password_expiring_in(&t, "site-reader", "password1", 3_000).await;
    tokio::time::sleep(std::time::Duration::from_millis(3_100)).await;
    // Each refusal reads the same at `/v2/` and at the token endpoint, where Docker, podman,
    // skopeo and containerd log in.
    let refusals = |user: &'static str, pass: String| {
        let t = &t;
        async move {
            let mut answers = Vec::new();
            for path in [
                "/v2/app/tags/list",
                "/oauth2/token?service=outpost&scope=repository:app:pull",
            ] {
                let r = t
                    .req_as(
                        Some(&basic(user, &pass)),
                        Method::GET,
                        path,
                        &[],
                        Body::empty(),
                    )
                    .await;
                assert_eq!(r.status, StatusCode::UNAUTHORIZED, "{path}");
                answers.push(r.message());
            }
            answers
        }
    };
    for m in refusals("site-reader", pw).await {
        assert!(
            m.contains("expired at 20") && m.contains("at the root"),
            "{m}"
        );
    }
    for m in refusals("site-reader", "wrong".into()).await {
        assert!(m.contains("only its client tokens"), "{m}");
    }
    // A child's sync token, installed by the parent as every token from there is.
    install_from_parent(&t, "line-x", "its real password").await;
    // A child registry's sync token with a password this node does not know (generated
    // again at the root) is told what to do, in the words an unknown name gets: a refusal
    // does not tell which names exist.
    let child = refusals("line-x", "an old password".into()).await;
    assert!(
        child[0].contains("restarted with its new connection string"),
        "{}",
        child[0]
    );
    assert_eq!(child, refusals("no-such-token", "a password".into()).await);
}

/// At a ReadOnly registry every logged-in write is refused as read-only, whatever the token:
/// a token with write rules, the admin, or one that may only read (whose scope error would
/// point at a change the root refuses for a ReadOnly registry's client tokens). Without
/// credentials the client is still asked to log in.
#[tokio::test]
async fn a_read_only_site_refuses_writes_as_read_only() {
    let t = common::setup_read_only_site("site-ro", &["app"]).await;
    let reader = token(
        &t,
        "reader",
        &[
            "repositories/app/content/read",
            "repositories/app/metadata/read",
        ],
    )
    .await;
    let digest = format!("sha256:{}", "a".repeat(64));
    let bearer = bearer(&t, "reader", &reader, &["repository:app:pull,push,delete"]).await;
    let admin = basic("admin", ADMIN_PASSWORD);
    for auth in [basic("reader", &reader), bearer, admin] {
        for (method, path) in [
            (Method::POST, "/v2/app/blobs/uploads/".to_string()),
            (Method::PUT, "/v2/app/manifests/v1".to_string()),
            (Method::DELETE, format!("/v2/app/manifests/{digest}")),
            (Method::DELETE, format!("/v2/app/blobs/{digest}")),
        ] {
            let r = t
                .req_as(Some(&auth), method.clone(), &path, &[], Body::empty())
                .await;
            assert_eq!(r.status, StatusCode::FORBIDDEN, "{method} {path}");
            assert_eq!(r.code(), "DENIED");
            assert!(
                r.message().contains("this connected registry is read-only"),
                "{method} {path}: {}",
                r.message()
            );
        }
    }
    let r = t
        .req_as(
            None,
            Method::POST,
            "/v2/app/blobs/uploads/",
            &[],
            Body::empty(),
        )
        .await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);
    assert!(r.headers.contains_key("www-authenticate"));
}

/// At a connected registry, a repository it does not sync is unknown with a reason and the
/// command that changes it; one it syncs but does not hold yet is simply unknown.
#[tokio::test]
async fn a_site_says_which_repositories_it_does_not_sync() {
    let t = common::setup_read_only_site("site-ro", &["app", "team/*"]).await;
    let admin = basic("admin", ADMIN_PASSWORD);
    for path in [
        "/v2/other/tags/list",
        "/v2/other/manifests/v1",
        "/v2/teams/one/manifests/v1",
    ] {
        let r = t
            .req_as(Some(&admin), Method::GET, path, &[], Body::empty())
            .await;
        assert_eq!(r.status, StatusCode::NOT_FOUND, "{path}");
        assert_eq!(r.code(), "NAME_UNKNOWN", "{path}");
        let m = r.message();
        assert!(
            m.contains("is not synced by this connected registry")
                && m.contains("connected-registry permissions update -n site-ro --add"),
            "{path}: {m}"
        );
    }
    for path in ["/v2/app/tags/list", "/v2/team/one/manifests/v1"] {
        let r = t
            .req_as(Some(&admin), Method::GET, path, &[], Body::empty())
            .await;
        assert_eq!(r.status, StatusCode::NOT_FOUND, "{path}");
        assert!(
            !r.message().contains("not synced"),
            "{path}: {}",
            r.message()
        );
    }
    let r = t
        .req_as(
            Some(&admin),
            Method::HEAD,
            "/v2/other/manifests/v1",
            &[],
            Body::empty(),
        )
        .await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);
    assert!(r.body.is_empty());
}

/// Installs token `name` with `password` as a connected registry's parent does (through its
/// configuration), with read access to `app`.
async fn install_from_parent(t: &T, name: &str, password: &str) {
    let hash =
        outpost_control::password::hash(password, &mut outpost_control::password::Memory::new())
            .unwrap();
    t.control
        .apply_synced_tokens(
            &[outpost_control::connected::ClientTokenConfig {
                name: name.into(),
                status: "enabled".into(),
                actions: vec!["repositories/app/content/read".into()],
                passwords: vec![outpost_control::connected::PasswordHash {
                    name: "password1".into(),
                    hash,
                    expiry: None,
                }],
            }],
            &[],
        )
        .await
        .unwrap();
}

/// At a connected registry, the tokens its parent installed (client tokens, children's sync
/// tokens) and their scope maps are changed at the root only: a local change would be undone
/// at the next sync, or lock a child out until then. Local tokens are still the site's own.
#[tokio::test]
async fn a_site_refuses_changes_to_what_its_parent_installed() {
    let t = common::setup_site("site-x", &["app"]).await;
    install_from_parent(&t, "from-root", "pw-from-root").await;
    let changes = [
        (
            Method::PATCH,
            "/api/v1/tokens/from-root",
            json!({"status": "disabled"}),
        ),
        (
            Method::POST,
            "/api/v1/tokens/from-root/credentials/generate",
            json!({"passwords": ["password1"]}),
        ),
        (
            Method::POST,
            "/api/v1/tokens/from-root/credentials/delete",
            json!({"passwords": ["password1"]}),
        ),
        (Method::DELETE, "/api/v1/tokens/from-root", json!({})),
        (
            Method::PATCH,
            "/api/v1/scope-maps/synced-from-root",
            json!({"add": ["repositories/*/content/write"]}),
        ),
        (
            Method::DELETE,
            "/api/v1/scope-maps/synced-from-root",
            json!({}),
        ),
        (
            Method::POST,
            "/api/v1/scope-maps",
            json!({"name": "synced-later", "actions": ["repositories/app/content/read"]}),
        ),
        (
            Method::POST,
            "/api/v1/tokens",
            json!({"name": "borrower", "scopeMap": "synced-from-root"}),
        ),
    ];
    for (method, path, body) in changes {
        let r = t.req(method.clone(), path, &[], body.to_string()).await;
        assert_eq!(
            r.status,
            StatusCode::FORBIDDEN,
            "{method} {path}: {:?}",
            r.body
        );
        assert!(
            r.message()
                .contains("comes from this connected registry's parent"),
            "{method} {path}: {}",
            r.message()
        );
    }
    // Untouched: the token still logs in with the password the parent gave it.
    let r = t
        .req_as(
            Some(&basic("from-root", "pw-from-root")),
            Method::GET,
            "/v2/app/tags/list",
            &[],
            Body::empty(),
        )
        .await;
    assert_ne!(r.status, StatusCode::UNAUTHORIZED, "{:?}", r.body);
    // The site's own tokens and scope maps are still managed here.
    let own = token(&t, "local-one", &["repositories/app/content/read"]).await;
    assert!(!own.is_empty());
    let r = t
        .req(
            Method::PATCH,
            "/api/v1/tokens/local-one",
            &[],
            json!({"status": "disabled"}).to_string(),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{:?}", r.body);
}

/// An access token of a token that was deleted says so (it said "incorrect username or
/// password", which the client never sent), and a token created again under the same name
/// does not bring it back.
#[tokio::test]
async fn an_access_token_of_a_deleted_token_says_so() {
    let t = setup_default().await;
    t.push_image("app", "v1", "seed").await;
    let pw = token(&t, "short-lived", &["repositories/app/content/read"]).await;
    let access = bearer(&t, "short-lived", &pw, &["repository:app:pull"]).await;
    let pull = |auth: String| {
        let t = &t;
        async move {
            t.req_as(
                Some(&auth),
                Method::GET,
                "/v2/app/manifests/v1",
                &[],
                Body::empty(),
            )
            .await
        }
    };
    assert_eq!(pull(access.clone()).await.status, StatusCode::OK);
    let r = t
        .req(
            Method::DELETE,
            "/api/v1/tokens/short-lived",
            &[],
            Body::empty(),
        )
        .await;
    assert_eq!(r.status, StatusCode::NO_CONTENT, "{:?}", r.body);
    let r = pull(access.clone()).await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);
    assert!(r.message().contains("no longer exists"), "{}", r.message());
    let r = t
        .req(
            Method::POST,
            "/api/v1/tokens",
            &[],
            json!({"name": "short-lived", "scopeMap": "short-lived-map"}).to_string(),
        )
        .await;
    assert_eq!(r.status, StatusCode::CREATED, "{:?}", r.body);
    assert_eq!(pull(access).await.status, StatusCode::UNAUTHORIZED);
}

/// The Argon2 checks logins have cost this server so far, as `/metrics` reports them.
async fn password_checks(t: &T) -> u64 {
    let m = t
        .req_as(None, Method::GET, "/metrics", &[], Body::empty())
        .await;
    assert_eq!(m.status, StatusCode::OK);
    let text = String::from_utf8(m.body.to_vec()).unwrap();
    text.lines()
        .find_map(|l| l.strip_prefix("outpost_password_checks_total "))
        .unwrap_or_else(|| panic!("no password-check counter in\n{text}"))
        .parse()
        .unwrap()
}

/// A login verified once is not verified again (Argon2 costs ~50 ms and 19 MiB a check)
/// until its password changes: changes to other tokens leave it alone, as they must while a
/// flood of wrong passwords keeps the password-check threads busy. Every check is counted in
/// `/metrics`.
#[tokio::test]
async fn a_verified_login_is_checked_again_only_when_its_password_changes() {
    let t = setup_default().await;
    t.push_image("app", "v1", "x").await;
    let p1 = token(&t, "reader", &["repositories/app/content/read"]).await;
    let pull = |user: &'static str, pass: String| {
        let t = &t;
        async move {
            t.req_as(
                Some(&basic(user, &pass)),
                Method::GET,
                "/v2/app/manifests/v1",
                &[],
                Body::empty(),
            )
            .await
            .status
        }
    };
    let before = password_checks(&t).await;
    assert_eq!(pull("reader", p1.clone()).await, StatusCode::OK);
    assert_eq!(
        password_checks(&t).await,
        before + 1,
        "password1 matched first"
    );
    assert_eq!(pull("reader", p1.clone()).await, StatusCode::OK);
    assert_eq!(password_checks(&t).await, before + 1, "verified already");

    // Another token created, a scope map changed: the login stays verified.
    token(&t, "someone", &["repositories/other/content/read"]).await;
    let r = t
        .req(
            Method::PATCH,
            "/api/v1/scope-maps/reader-map",
            &[],
            json!({"add": ["repositories/app2/content/read"]}).to_string(),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{:?}", r.body);
    assert_eq!(pull("reader", p1.clone()).await, StatusCode::OK);
    assert_eq!(
        password_checks(&t).await,
        before + 1,
        "other changes cost nothing"
    );

    // A wrong password and an unknown name cost two checks each.
    assert_eq!(
        pull("reader", "wrong".into()).await,
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(
        pull("nobody", "wrong".into()).await,
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(password_checks(&t).await, before + 5);

    // Its own password generated again: the old one is checked (and refused) at once.
    let new1 = password_expiring_in(&t, "reader", "password1", 3_600_000).await;
    assert_eq!(pull("reader", p1.clone()).await, StatusCode::UNAUTHORIZED);
    assert_eq!(password_checks(&t).await, before + 7);
    assert_eq!(pull("reader", new1.clone()).await, StatusCode::OK);
    assert_eq!(pull("reader", new1.clone()).await, StatusCode::OK);
    assert_eq!(password_checks(&t).await, before + 8);

    // The token deleted and made again under the same name: its old password, verified
    // before, is checked against the new hashes and refused.
    let r = t
        .req(Method::DELETE, "/api/v1/tokens/reader", &[], Body::empty())
        .await;
    assert!(r.status.is_success(), "{:?}", r.body);
    let r = t
        .req(
            Method::POST,
            "/api/v1/tokens",
            &[],
            json!({"name": "reader", "scopeMap": "reader-map"}).to_string(),
        )
        .await;
    assert_eq!(r.status, StatusCode::CREATED, "{:?}", r.body);
    let fresh = r.json()["passwords"][0]["value"]
        .as_str()
        .unwrap()
        .to_string();
    assert_eq!(pull("reader", new1).await, StatusCode::UNAUTHORIZED);
    assert_eq!(pull("reader", fresh).await, StatusCode::OK);
    assert_eq!(password_checks(&t).await, before + 11);
}

/// A node whose clock runs two days ahead of the root's (a connected registry that learned
/// so from its parent): a password that expires tomorrow, by the root's time, is good here,
/// and buys an access token of the usual length, not one cut to a second.
#[tokio::test]
async fn a_clock_ahead_of_the_roots_does_not_shorten_access_tokens() {
    let t = setup_default().await;
    let name = "ahead-reader";
    token(&t, name, &["repositories/app/content/read"]).await;
    // From here on, this node knows its clock is two days ahead of the root's.
    outpost_control::clock::learn(outpost_control::clock::system_ms() - 2 * 86_400_000);
    // Tomorrow by the root's time: yesterday by this node's clock.
    let pw = password_expiring_in(&t, name, "password1", -86_400_000).await;
    let r = t
        .req_as(
            Some(&basic(name, &pw)),
            Method::GET,
            "/oauth2/token?service=outpost&scope=repository:app:pull",
            &[],
            Body::empty(),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{:?}", r.body);
    assert_eq!(r.json()["expires_in"], 300, "{:?}", r.body);
}

/// A refused login wakes whoever waits for one (a connected registry's sync, which then asks
/// its parent for the configuration at once: the password may be a minute old), at most
/// once per 10 s however many follow.
#[tokio::test]
async fn a_refused_login_is_signalled_at_most_every_ten_seconds() {
    let t = setup_default().await;
    let pw = token(&t, "reader", &["repositories/app/content/read"]).await;
    let wait = |t: &T| {
        let control = t.control.clone();
        tokio::spawn(async move { control.logins_refused().await })
    };
    let mut waiter = wait(&t);
    let tags = |auth: String| {
        let t = &t;
        async move {
            t.req_as(
                Some(&auth),
                Method::GET,
                "/v2/app/tags/list",
                &[],
                Body::empty(),
            )
            .await
            .status
        }
    };
    assert_ne!(tags(basic("reader", &pw)).await, StatusCode::UNAUTHORIZED);
    let quiet = std::time::Duration::from_millis(300);
    assert!(
        tokio::time::timeout(quiet, &mut waiter).await.is_err(),
        "an accepted login is not a refusal"
    );
    assert_eq!(
        tags(basic("reader", "not-the-password")).await,
        StatusCode::UNAUTHORIZED
    );
    tokio::time::timeout(std::time::Duration::from_secs(10), waiter)
        .await
        .expect("a wrong password is signalled")
        .unwrap();
    // Right after: an unknown token is refused, and not signalled again yet.
    let waiter = wait(&t);
    assert_eq!(
        tags(basic("no-such-token", "x")).await,
        StatusCode::UNAUTHORIZED
    );
    assert!(tokio::time::timeout(quiet, waiter).await.is_err());
}
