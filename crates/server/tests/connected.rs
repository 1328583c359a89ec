//! The connected-registry control plane through the API: every rule and its error message,
//! the sync token and scope maps up and down a three-level hierarchy, activation,
//! status-derived connection state, get-settings rotation, deletion and concurrency.

#![allow(clippy::unwrap_used)] // tests fail loudly by design

mod common;

use axum::body::Body;
use axum::http::{Method, StatusCode};
use common::*;
use outpost_control::ConnectionString;
use serde_json::{Value, json};

async fn post(t: &T, path: &str, body: Value) -> Resp {
    t.req(
        Method::POST,
        path,
        &[("content-type", "application/json")],
        body.to_string(),
    )
    .await
}

async fn create(t: &T, body: Value) -> Resp {
    post(t, "/api/v1/connected-registries", body).await
}

fn msg(r: &Resp) -> String {
    r.json()["errors"][0]["message"]
        .as_str()
        .unwrap_or("")
        .to_string()
}

async fn scope_actions(t: &T, name: &str) -> Vec<String> {
    let r = t.get(&format!("/api/v1/scope-maps/{name}")).await;
    assert_eq!(r.status, StatusCode::OK, "{name}: {:?}", r.body);
    r.json()["actions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap().to_string())
        .collect()
}

async fn readonly_token(t: &T, name: &str) {
    post(
        t,
        "/api/v1/scope-maps",
        json!({"name": format!("{name}-map"), "actions": ["repositories/app/content/read"]}),
    )
    .await;
    let r = post(
        t,
        "/api/v1/tokens",
        json!({"name": name, "scopeMap": format!("{name}-map"), "noPasswords": true}),
    )
    .await;
    assert_eq!(r.status, StatusCode::CREATED);
}

#[tokio::test]
async fn create_makes_sync_token_and_scope_map_with_defaults() {
    let t = setup().await;
    let r = create(
        &t,
        json!({"name": "site-one", "repositories": ["app", "team/*"]}),
    )
    .await;
    assert_eq!(r.status, StatusCode::CREATED, "{:?}", r.body);
    let v = r.json();
    assert_eq!(v["mode"], "ReadOnly");
    assert_eq!(v["syncSchedule"], "* * * * *");
    assert_eq!(v["syncMessageTtl"], "P2D");
    assert_eq!(v["logLevel"], "Information");
    assert_eq!(
        v["garbageCollection"],
        json!({"enabled": true, "schedule": "0 0 * * *"})
    );
    assert_eq!(v["activationStatus"], "Inactive");
    assert_eq!(v["connectionState"], "Offline");
    assert_eq!(v["syncToken"], "site-one");
    assert_eq!(v["repositories"], json!(["app", "team/*"]));
    let actions = scope_actions(&t, "site-one").await;
    for a in [
        "repositories/app/content/read",
        "repositories/app/metadata/read",
        "repositories/team/*/content/read",
        "gateway/site-one/config/read",
        "gateway/site-one/config/write",
        "gateway/site-one/message/read",
        "gateway/site-one/message/write",
    ] {
        assert!(
            actions.contains(&a.to_string()),
            "missing {a} in {actions:?}"
        );
    }
    assert!(
        !actions.iter().any(|a| a.ends_with("content/write")),
        "ReadOnly must not write"
    );
    let r = create(
        &t,
        json!({"name": "site-rw01", "mode": "ReadWrite", "repositories": ["app"]}),
    )
    .await;
    assert_eq!(r.status, StatusCode::CREATED);
    assert_eq!(
        scope_actions(&t, "site-rw01")
            .await
            .iter()
            .filter(|a| a.starts_with("repositories/app/"))
            .count(),
        5
    );
}

#[tokio::test]
async fn every_rule_is_enforced_with_a_message_that_names_it() {
    let t = setup().await;
    assert_eq!(
        create(&t, json!({"name": "parent-ro", "repositories": ["app"]}))
            .await
            .status,
        StatusCode::CREATED
    );
    readonly_token(&t, "reader-01").await;
    post(
        &t,
        "/api/v1/scope-maps",
        json!({"name": "writer-map", "actions": ["repositories/app/content/write"]}),
    )
    .await;
    post(
        &t,
        "/api/v1/tokens",
        json!({"name": "writer-01", "scopeMap": "writer-map", "noPasswords": true}),
    )
    .await;

    let cases: Vec<(Value, StatusCode, &str)> = vec![
        (
            json!({"name": "Site1", "repositories": ["app"]}),
            StatusCode::BAD_REQUEST,
            "lowercase",
        ),
        (
            json!({"name": "abcd", "repositories": ["app"]}),
            StatusCode::BAD_REQUEST,
            "5 to 50",
        ),
        (
            json!({"name": "1site", "repositories": ["app"]}),
            StatusCode::BAD_REQUEST,
            "starting with a letter",
        ),
        (
            json!({"name": "parent-ro", "repositories": ["app"]}),
            StatusCode::CONFLICT,
            "already exists",
        ),
        (
            json!({"name": "reader-01", "repositories": ["app"]}),
            StatusCode::CONFLICT,
            "token \"reader-01\" already exists: creating connected registry \"reader-01\" makes a sync token and a scope map of that name; give this registry another name, or use the existing token as its sync token with --sync-token reader-01",
        ),
        (
            json!({"name": "mode-bad", "mode": "Mirror2", "repositories": ["app"]}),
            StatusCode::BAD_REQUEST,
            "--mode supports only",
        ),
        (
            json!({"name": "neither1"}),
            StatusCode::BAD_REQUEST,
            "either --sync-token or --repository",
        ),
        (
            json!({"name": "both-one", "repositories": ["app"], "syncToken": "reader-01"}),
            StatusCode::BAD_REQUEST,
            "but not both",
        ),
        (
            json!({"name": "orphan-1", "parent": "nowhere", "repositories": ["app"]}),
            StatusCode::BAD_REQUEST,
            "could not be found",
        ),
        (
            json!({"name": "rw-under-ro", "parent": "parent-ro", "mode": "ReadWrite", "repositories": ["app"]}),
            StatusCode::BAD_REQUEST,
            "ReadOnly parent can only have ReadOnly children",
        ),
        (
            json!({"name": "cron-bad", "repositories": ["app"], "syncSchedule": "every day"}),
            StatusCode::BAD_REQUEST,
            "five-field cron",
        ),
        (
            json!({"name": "no-window", "repositories": ["app"], "syncSchedule": "0 12 * * *"}),
            StatusCode::BAD_REQUEST,
            "sync window is required",
        ),
        (
            json!({"name": "short-win", "repositories": ["app"], "syncSchedule": "0 12 * * *", "syncWindow": "PT30M"}),
            StatusCode::BAD_REQUEST,
            "between 1 hour (PT1H) and 7 days (P7D)",
        ),
        (
            json!({"name": "long-win1", "repositories": ["app"], "syncSchedule": "0 12 * * *", "syncWindow": "P8D"}),
            StatusCode::BAD_REQUEST,
            "between 1 hour",
        ),
        (
            json!({"name": "ttl-short", "repositories": ["app"], "syncMessageTtl": "PT12H"}),
            StatusCode::BAD_REQUEST,
            "between 1 day (P1D) and 90 days (P90D)",
        ),
        (
            json!({"name": "ttl-long1", "repositories": ["app"], "syncMessageTtl": "P91D"}),
            StatusCode::BAD_REQUEST,
            "between 1 day",
        ),
        (
            json!({"name": "ttl-words", "repositories": ["app"], "syncMessageTtl": "two days"}),
            StatusCode::BAD_REQUEST,
            "ISO 8601",
        ),
        (
            json!({"name": "log-bad01", "repositories": ["app"], "logLevel": "Verbose"}),
            StatusCode::BAD_REQUEST,
            "Debug, Information, Warning, Error, and None",
        ),
        (
            json!({"name": "ghost-tok", "repositories": ["app"], "clientTokens": ["nobody-1"]}),
            StatusCode::NOT_FOUND,
            "does not exist",
        ),
        (
            json!({"name": "ro-writer", "repositories": ["app"], "clientTokens": ["writer-01"]}),
            StatusCode::BAD_REQUEST,
            "may only read",
        ),
        (
            json!({"name": "rw-admin1", "mode": "ReadWrite", "repositories": ["app"], "clientTokens": ["admin"]}),
            StatusCode::BAD_REQUEST,
            "administrator token",
        ),
        (
            json!({"name": "rw-sync01", "mode": "ReadWrite", "repositories": ["app"], "clientTokens": ["parent-ro"]}),
            StatusCode::BAD_REQUEST,
            "is the sync token of connected registry",
        ),
        (
            json!({"name": "bad-repo1", "repositories": ["../etc"]}),
            StatusCode::BAD_REQUEST,
            "invalid repository",
        ),
    ];
    for (body, status, needle) in cases {
        let r = create(&t, body.clone()).await;
        assert_eq!(r.status, status, "{body}: {:?}", r.body);
        assert!(
            msg(&r).contains(needle),
            "{body}: {:?} lacks {needle:?}",
            msg(&r)
        );
    }
    // A scheduled registry with a window in range, and a ReadOnly registry with a read token.
    let r = create(&t, json!({"name": "ship-0001", "repositories": ["app"], "syncSchedule": "0 12 * * *", "syncWindow": "PT4H", "clientTokens": ["reader-01"]})).await;
    assert_eq!(r.status, StatusCode::CREATED, "{:?}", r.body);
    // A client token of a registry cannot become another registry's sync token: deleting
    // that registry with --cleanup would delete a token the first one still lists.
    let r = create(&t, json!({"name": "ship-0002", "syncToken": "reader-01"})).await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST, "{:?}", r.body);
    assert!(
        msg(&r).contains("client token of connected registry \"ship-0001\""),
        "{}",
        msg(&r)
    );
    // Mode cannot change: update has no mode field.
    let r = t
        .req(
            Method::PATCH,
            "/api/v1/connected-registries/ship-0001",
            &[],
            json!({"mode": "ReadWrite"}).to_string(),
        )
        .await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    // update rules
    let r = t
        .req(
            Method::PATCH,
            "/api/v1/connected-registries/ship-0001",
            &[],
            json!({"addClientTokens": ["writer-01"]}).to_string(),
        )
        .await;
    assert!(msg(&r).contains("may only read"), "{}", msg(&r));
    let r = t
        .req(
            Method::PATCH,
            "/api/v1/connected-registries/ship-0001",
            &[],
            json!({"addClientTokens": ["reader-01"], "removeClientTokens": ["reader-01"]})
                .to_string(),
        )
        .await;
    assert!(msg(&r).starts_with("Update ambiguity"), "{}", msg(&r));
    // A token that is not one of its client tokens (a typo) is an error, not a silent no-op
    // that leaves the token meant still working.
    let r = t
        .req(
            Method::PATCH,
            "/api/v1/connected-registries/ship-0001",
            &[],
            json!({"removeClientTokens": ["reader-1"]}).to_string(),
        )
        .await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    assert!(
        msg(&r).contains("\"reader-1\" is not a client token"),
        "{}",
        msg(&r)
    );
    let r = t.req(Method::PATCH, "/api/v1/connected-registries/ship-0001", &[], json!({"syncSchedule": "0 6 * * *", "syncWindow": "PT2H", "syncMessageTtl": "P7D", "logLevel": "debug", "addNotifications": ["app:*:push"], "gcEnabled": false}).to_string()).await;
    assert_eq!(r.status, StatusCode::OK, "{:?}", r.body);
    let v = r.json();
    assert_eq!(
        (
            v["syncSchedule"].as_str(),
            v["syncWindow"].as_str(),
            v["logLevel"].as_str()
        ),
        (Some("0 6 * * *"), Some("PT2H"), Some("Debug"))
    );
    assert_eq!(v["notifications"], json!(["app:*:push"]));
    assert_eq!(v["garbageCollection"]["enabled"], false);
    // Made continuous, it keeps no window from the old schedule.
    let r = t
        .req(
            Method::PATCH,
            "/api/v1/connected-registries/ship-0001",
            &[],
            json!({"syncSchedule": "* * * * *"}).to_string(),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{:?}", r.body);
    assert_eq!(r.json()["syncWindow"], Value::Null, "{:?}", r.body);
}

#[tokio::test]
async fn client_token_limit_is_enforced() {
    let t = setup().await;
    let mut names = Vec::new();
    for i in 0..21 {
        let n = format!("client-{i:02}");
        readonly_token(&t, &n).await;
        names.push(n);
    }
    let r = create(
        &t,
        json!({"name": "crowded1", "repositories": ["app"], "clientTokens": names}),
    )
    .await;
    assert_eq!(
        (r.status, r.code().as_str()),
        (StatusCode::CONFLICT, "LIMIT_EXCEEDED")
    );
    assert!(
        msg(&r).contains("21 client tokens") && msg(&r).contains("limit is 20"),
        "{}",
        msg(&r)
    );
    let r = create(
        &t,
        json!({"name": "crowded1", "repositories": ["app"], "clientTokens": names[..20]}),
    )
    .await;
    assert_eq!(r.status, StatusCode::CREATED);
}

#[tokio::test]
async fn three_level_hierarchy_propagates_scope_maps_up_and_down() {
    let t = setup().await;
    assert_eq!(
        create(
            &t,
            json!({"name": "site-a", "mode": "ReadWrite", "repositories": ["base"]})
        )
        .await
        .status,
        StatusCode::CREATED
    );
    let r = create(
        &t,
        json!({"name": "line-a", "parent": "site-a", "repositories": ["app/x"]}),
    )
    .await;
    assert_eq!(r.status, StatusCode::CREATED, "{:?}", r.body);
    // The parent's sync scope map gained the child's gateway and repository actions.
    let site = scope_actions(&t, "site-a").await;
    for a in [
        "gateway/line-a/config/read",
        "gateway/line-a/message/write",
        "repositories/app/x/content/read",
        "repositories/app/x/metadata/read",
    ] {
        assert!(site.contains(&a.to_string()), "site lacks {a}");
    }
    let r = create(
        &t,
        json!({"name": "cell-a1", "parent": "line-a", "repositories": ["app/x"]}),
    )
    .await;
    assert_eq!(r.status, StatusCode::CREATED);
    for anc in ["site-a", "line-a"] {
        assert!(
            scope_actions(&t, anc)
                .await
                .contains(&"gateway/cell-a1/config/read".to_string()),
            "{anc}"
        );
    }
    // Adding a repository to the leaf adds it up the chain.
    let r = t
        .req(
            Method::PATCH,
            "/api/v1/connected-registries/cell-a1/permissions",
            &[],
            json!({"add": ["tools"]}).to_string(),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{:?}", r.body);
    for n in ["site-a", "line-a", "cell-a1"] {
        assert!(
            scope_actions(&t, n)
                .await
                .contains(&"repositories/tools/content/read".to_string()),
            "{n}"
        );
    }
    // Removing from the middle removes down the chain, not up.
    let r = t
        .req(
            Method::PATCH,
            "/api/v1/connected-registries/line-a/permissions",
            &[],
            json!({"remove": ["tools"]}).to_string(),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK);
    assert!(
        scope_actions(&t, "site-a")
            .await
            .contains(&"repositories/tools/content/read".to_string())
    );
    for n in ["line-a", "cell-a1"] {
        assert!(
            !scope_actions(&t, n)
                .await
                .iter()
                .any(|a| a.starts_with("repositories/tools/")),
            "{n}"
        );
    }
    let r = t
        .req(
            Method::PATCH,
            "/api/v1/connected-registries/line-a/permissions",
            &[],
            json!({}).to_string(),
        )
        .await;
    assert_eq!(msg(&r), "No repository permissions to update.");

    // A parent syncing a wildcard: a child's repository under it is not added to the parent
    // again, and removing the child's repository from the parent keeps it at the child while
    // the wildcard covers it.
    let patch = |name: &str, body: serde_json::Value| {
        let path = format!("/api/v1/connected-registries/{name}/permissions");
        let t = &t;
        async move { t.req(Method::PATCH, &path, &[], body.to_string()).await }
    };
    assert_eq!(
        patch("site-a", json!({"add": ["fleet/*"]})).await.status,
        StatusCode::OK
    );
    let r = create(
        &t,
        json!({"name": "line-b", "parent": "site-a", "repositories": ["fleet/g1/app", "base"]}),
    )
    .await;
    assert_eq!(r.status, StatusCode::CREATED, "{:?}", r.body);
    let site = scope_actions(&t, "site-a").await;
    assert!(
        !site.iter().any(|a| a.starts_with("repositories/fleet/g1/")),
        "a repository the wildcard covers is not added again: {site:?}"
    );
    // The parent never named it, so it cannot be removed there by name, and is told how...
    let r = patch("site-a", json!({"remove": ["fleet/g1/app"]})).await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST, "{:?}", r.body);
    assert!(
        msg(&r).contains("through the pattern fleet/*, which cannot leave one repository out"),
        "{}",
        msg(&r)
    );
    // ...and removing something else leaves the child's covered repository alone.
    assert_eq!(
        patch("site-a", json!({"remove": ["tools"]})).await.status,
        StatusCode::OK
    );
    assert!(
        scope_actions(&t, "line-b")
            .await
            .contains(&"repositories/fleet/g1/app/content/read".to_string())
    );
    // Removing the wildcard takes the child's repository under it away, down the line.
    assert_eq!(
        patch("site-a", json!({"remove": ["fleet/*"]})).await.status,
        StatusCode::OK
    );
    let line = scope_actions(&t, "line-b").await;
    assert!(
        !line.iter().any(|a| a.starts_with("repositories/fleet/")),
        "{line:?}"
    );
    assert!(line.contains(&"repositories/base/content/read".to_string()));
    // A removal that would leave a registry with nothing to sync is refused, whole.
    let r = patch("site-a", json!({"remove": ["base"]})).await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    assert!(
        msg(&r).contains("would leave connected registry"),
        "{}",
        msg(&r)
    );
    assert!(
        scope_actions(&t, "site-a")
            .await
            .contains(&"repositories/base/content/read".to_string()),
        "nothing changed"
    );
    let r = t
        .req(
            Method::DELETE,
            "/api/v1/connected-registries/line-b",
            &[],
            Body::empty(),
        )
        .await;
    assert!(r.status.is_success(), "{:?}", r.body);

    // list: tree order and filters
    let names = |r: Resp| {
        r.json()
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v["name"].as_str().unwrap().to_string())
            .collect::<Vec<_>>()
    };
    assert_eq!(
        create(&t, json!({"name": "site-b", "repositories": ["base"]}))
            .await
            .status,
        StatusCode::CREATED
    );
    assert_eq!(
        names(t.get("/api/v1/connected-registries").await),
        ["site-a", "line-a", "cell-a1", "site-b"]
    );
    assert_eq!(
        names(t.get("/api/v1/connected-registries?noChildren=true").await),
        ["site-a", "site-b"]
    );
    assert_eq!(
        names(t.get("/api/v1/connected-registries?parent=site-a").await),
        ["line-a", "cell-a1"]
    );
    assert_eq!(
        names(
            t.get("/api/v1/connected-registries?parent=site-a&noChildren=true")
                .await
        ),
        ["line-a"]
    );
    assert!(
        msg(&t.get("/api/v1/connected-registries?parent=zzzzz").await).contains("doesn't exist")
    );

    // Deleting: not with children; the sync token is protected; --cleanup tidies ancestors.
    let r = t
        .req(
            Method::DELETE,
            "/api/v1/connected-registries/line-a",
            &[],
            Body::empty(),
        )
        .await;
    assert!(msg(&r).contains("has children (cell-a1)"), "{}", msg(&r));
    let r = t
        .req(Method::DELETE, "/api/v1/tokens/cell-a1", &[], Body::empty())
        .await;
    assert!(
        msg(&r).contains("sync token of connected registry"),
        "{}",
        msg(&r)
    );
    let r = t
        .req(
            Method::DELETE,
            "/api/v1/connected-registries/cell-a1?cleanup=true",
            &[],
            Body::empty(),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{:?}", r.body);
    for anc in ["site-a", "line-a"] {
        assert!(
            !scope_actions(&t, anc)
                .await
                .iter()
                .any(|a| a.starts_with("gateway/cell-a1/")),
            "{anc}"
        );
    }
    assert_eq!(
        t.get("/api/v1/tokens/cell-a1").await.status,
        StatusCode::NOT_FOUND
    );
    assert_eq!(
        t.get("/api/v1/scope-maps/cell-a1").await.status,
        StatusCode::NOT_FOUND
    );
    // Without cleanup the leftovers are listed.
    let r = t
        .req(
            Method::DELETE,
            "/api/v1/connected-registries/line-a",
            &[],
            Body::empty(),
        )
        .await;
    let steps = r.json()["remainingSteps"].as_array().unwrap().clone();
    assert!(
        steps
            .iter()
            .any(|s| s.as_str().unwrap().contains("--remove-gateway line-a")),
        "{steps:?}"
    );
    assert_eq!(t.get("/api/v1/tokens/line-a").await.status, StatusCode::OK);
    // A new registry of that name (with its own sync token) is refused while the old
    // ancestors' scope maps still grant gateway rights for the name.
    let r = t
        .req(
            Method::POST,
            "/api/v1/scope-maps",
            &[],
            json!({"name": "other-sync", "actions": ["repositories/app/content/read"]}).to_string(),
        )
        .await;
    assert_eq!(r.status, StatusCode::CREATED);
    let r = t
        .req(
            Method::POST,
            "/api/v1/tokens",
            &[],
            json!({"name": "other-sync", "scopeMap": "other-sync", "noPasswords": true})
                .to_string(),
        )
        .await;
    assert_eq!(r.status, StatusCode::CREATED);
    let r = create(&t, json!({"name": "line-a", "syncToken": "other-sync"})).await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    assert!(
        msg(&r).contains("deleted without --cleanup and left gateway rights in scope map(s)")
            && msg(&r).contains("--remove-gateway line-a"),
        "{}",
        msg(&r)
    );
    // Created again as before (its own sync token): one answer names everything in the way,
    // with the commands in the order they work, not one leftover per attempt.
    let r = create(&t, json!({"name": "line-a", "repositories": ["app"]})).await;
    assert_eq!(r.status, StatusCode::CONFLICT);
    let m = msg(&r);
    let at = |needle: &str| {
        m.find(needle)
            .unwrap_or_else(|| panic!("{needle} not in {m}"))
    };
    assert!(
        at("--remove-gateway line-a") < at("outpost token delete -n line-a")
            && at("outpost token delete -n line-a") < at("outpost scope-map delete -n line-a"),
        "{m}"
    );
    // Those are the steps carried out below (the delete's remaining steps are the same).
    let listed: Vec<Value> = m
        .split("in this order: ")
        .nth(1)
        .and_then(|rest| rest.split(" (or give").next())
        .unwrap_or_else(|| panic!("{m}"))
        .split("; ")
        .map(|s| json!(s))
        .collect();
    assert_eq!(listed.len(), steps.len(), "{m} vs {steps:?}");
    let steps = listed;
    // A sync token whose scope map another token also uses is refused: the gateway rights
    // added to that scope map would reach the other token too.
    let r = t
        .req(
            Method::POST,
            "/api/v1/tokens",
            &[],
            json!({"name": "other-user", "scopeMap": "other-sync", "noPasswords": true})
                .to_string(),
        )
        .await;
    assert_eq!(r.status, StatusCode::CREATED);
    let r = create(&t, json!({"name": "fresh-one", "syncToken": "other-sync"})).await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    assert!(msg(&r).contains("also used by other-user"), "{}", msg(&r));

    // The remaining steps, carried out as listed (their API equivalents), all succeed, and
    // then the name is free again.
    for step in &steps {
        let words: Vec<&str> = step.as_str().unwrap().split_whitespace().collect();
        let r = match &words[1..4] {
            ["scope-map", "update", "-n"] => {
                let gw = words[6];
                let remove: Vec<String> = words[7..]
                    .iter()
                    .map(|a| format!("gateway/{gw}/{a}"))
                    .collect();
                t.req(
                    Method::PATCH,
                    &format!("/api/v1/scope-maps/{}", words[4]),
                    &[],
                    json!({"remove": remove}).to_string(),
                )
                .await
            }
            ["token", "delete", "-n"] => {
                t.req(
                    Method::DELETE,
                    &format!("/api/v1/tokens/{}", words[4]),
                    &[],
                    Body::empty(),
                )
                .await
            }
            ["scope-map", "delete", "-n"] => {
                t.req(
                    Method::DELETE,
                    &format!("/api/v1/scope-maps/{}", words[4]),
                    &[],
                    Body::empty(),
                )
                .await
            }
            other => panic!("unexpected step {other:?}"),
        };
        assert!(r.status.is_success(), "{step}: {}", msg(&r));
    }
    let r = create(
        &t,
        json!({"name": "line-a", "parent": "site-a", "repositories": ["app"]}),
    )
    .await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", msg(&r));
}

#[tokio::test]
async fn activation_status_and_settings_rotation() {
    let t = setup().await;
    assert_eq!(
        create(&t, json!({"name": "edge-one", "repositories": ["app"]}))
            .await
            .status,
        StatusCode::CREATED
    );
    let settings = |n: Option<u8>| {
        let t = &t;
        async move {
            let mut body = json!({"parentProtocol": "http"});
            if let Some(n) = n {
                body["generatePassword"] = json!(n);
            }
            post(
                t,
                "/api/v1/connected-registries/edge-one/get-settings",
                body,
            )
            .await
        }
    };
    let r = settings(None).await;
    assert!(
        r.json()["ACR_REGISTRY_CONNECTION_STRING"]
            .as_str()
            .unwrap()
            .contains("<use --generate-password")
    );
    let r = settings(Some(1)).await;
    let cs = ConnectionString::parse(r.json()["ACR_REGISTRY_CONNECTION_STRING"].as_str().unwrap())
        .unwrap();
    assert_eq!(cs.connected_registry_name, "edge-one");
    assert_eq!(cs.sync_token_name, "edge-one");
    assert_eq!(cs.parent_gateway_endpoint, "registry.test:5000");
    let p1 = cs.sync_token_password.clone();
    let p2 = ConnectionString::parse(
        settings(Some(2)).await.json()["ACR_REGISTRY_CONNECTION_STRING"]
            .as_str()
            .unwrap(),
    )
    .unwrap()
    .sync_token_password;
    assert_eq!(
        msg(&post(
            &t,
            "/api/v1/connected-registries/edge-one/get-settings",
            json!({"parentProtocol": "ftp"})
        )
        .await),
        "--parent-protocol must be http or https, not \"ftp\""
    );

    // Activation with the sync token; a second instance is refused until deactivate.
    let sync = basic("edge-one", &p1);
    let activate = |auth: String, id: &'static str| {
        let t = &t;
        async move {
            t.req_as(
                Some(&auth),
                Method::POST,
                "/gateway/v1/edge-one/activate",
                &[],
                json!({"instanceId": id}).to_string(),
            )
            .await
        }
    };
    let r = activate(sync.clone(), "instance-a").await;
    assert_eq!(r.status, StatusCode::OK, "{:?}", r.body);
    assert_eq!(r.json()["activationStatus"], "Active");
    assert_eq!(
        activate(sync.clone(), "instance-a").await.status,
        StatusCode::OK,
        "the same instance may re-activate"
    );
    let r = activate(sync.clone(), "instance-b").await;
    assert_eq!(
        (r.status, r.code().as_str()),
        (StatusCode::CONFLICT, "ALREADY_ACTIVATED")
    );
    assert!(msg(&r).contains("deactivate"), "{}", msg(&r));
    // Another registry's token, or a client token, cannot act for it.
    assert_eq!(
        create(&t, json!({"name": "edge-two", "repositories": ["app"]}))
            .await
            .status,
        StatusCode::CREATED
    );
    let other = ConnectionString::parse(
        post(
            &t,
            "/api/v1/connected-registries/edge-two/get-settings",
            json!({"parentProtocol": "http", "generatePassword": 1}),
        )
        .await
        .json()["ACR_REGISTRY_CONNECTION_STRING"]
            .as_str()
            .unwrap(),
    )
    .unwrap();
    assert_eq!(
        activate(basic("edge-two", &other.sync_token_password), "x")
            .await
            .status,
        StatusCode::FORBIDDEN
    );

    // Status reports drive the connection state.
    let report = |auth: String, body: Value| {
        let t = &t;
        async move {
            t.req_as(
                Some(&auth),
                Method::PUT,
                "/gateway/v1/edge-one/status",
                &[],
                body.to_string(),
            )
            .await
        }
    };
    let r = report(sync.clone(), json!({"instanceId": "instance-a", "state": "Online", "lastSyncTime": "2026-11-28T01:00:00Z", "lastSyncResult": "Succeeded", "version": "0.1.0", "loginServer": "10.0.0.5:5000"})).await;
    assert_eq!(r.status, StatusCode::OK, "{:?}", r.body);
    let v = r.json();
    assert_eq!(
        (
            v["connectionState"].as_str(),
            v["lastSyncResult"].as_str(),
            v["loginServer"].as_str()
        ),
        (Some("Online"), Some("Succeeded"), Some("10.0.0.5:5000"))
    );
    // A version is a short label: a huge one is refused, not stored and listed.
    for version in [json!("v".repeat(100_000)), json!("0.1\n0")] {
        let r = report(
            sync.clone(),
            json!({"instanceId": "instance-a", "version": version}),
        )
        .await;
        assert_eq!(r.status, StatusCode::BAD_REQUEST, "{:?}", r.body);
    }
    let r = report(sync.clone(), json!({"instanceId": "instance-a", "statusDetails": [{"type": "Disk", "code": "DiskError", "description": "No space left on device."}]})).await;
    assert_eq!(r.json()["connectionState"], "Unhealthy");
    assert_eq!(r.json()["statusDetails"][0]["code"], "DiskError");
    // Another instance while this one is active: a second process, told which is active.
    let r = report(sync.clone(), json!({"instanceId": "instance-b"})).await;
    assert_eq!(
        (r.status, r.code().as_str()),
        (StatusCode::BAD_REQUEST, "NOT_ACTIVE")
    );
    assert!(
        msg(&r).contains("instance \"instance-a\" activated it since")
            && !msg(&r).contains("was deactivated"),
        "{}",
        msg(&r)
    );

    // Password rotation: regenerate 1, the old one stops working, password2 keeps working.
    settings(Some(1)).await;
    assert_eq!(
        activate(basic("edge-one", &p1), "instance-a").await.status,
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(
        activate(basic("edge-one", &p2), "instance-a").await.status,
        StatusCode::OK
    );

    // Deactivate frees the slot; an active registry cannot be deleted without force.
    let r = t
        .req(
            Method::DELETE,
            "/api/v1/connected-registries/edge-one",
            &[],
            Body::empty(),
        )
        .await;
    assert!(msg(&r).contains("is active"), "{}", msg(&r));
    let r = post(
        &t,
        "/api/v1/connected-registries/edge-one/deactivate",
        json!({}),
    )
    .await;
    assert_eq!(r.json()["activationStatus"], "Inactive");
    assert_eq!(r.json()["connectionState"], "Offline");
    assert!(
        r.json()["statusDetails"]
            .to_string()
            .contains("Deactivated"),
        "{}",
        r.json()
    );
    let r = report(basic("edge-one", &p2), json!({"instanceId": "instance-a"})).await;
    assert!(msg(&r).contains("was deactivated"), "{}", msg(&r));
    assert_eq!(
        activate(basic("edge-one", &p2), "instance-b").await.status,
        StatusCode::OK
    );
    let r = post(
        &t,
        "/api/v1/connected-registries/edge-one/resync",
        json!({}),
    )
    .await;
    assert_eq!(r.json()["syncState"], "Pending");
}

#[tokio::test]
async fn concurrent_admins_cannot_break_a_rule() {
    let t = std::sync::Arc::new(setup().await);
    assert_eq!(
        create(
            &t,
            json!({"name": "parent-1", "mode": "ReadWrite", "repositories": ["app"]})
        )
        .await
        .status,
        StatusCode::CREATED
    );
    let mut tasks = Vec::new();
    for i in 0..8 {
        let t = t.clone();
        tasks.push(tokio::spawn(async move {
            // Everyone races to create the same child, and a distinct one.
            let same = create(&t, json!({"name": "child-same", "parent": "parent-1", "repositories": ["app"]})).await.status;
            let own = create(&t, json!({"name": format!("child-{i:03}"), "parent": "parent-1", "repositories": [format!("r{i}")]})).await.status;
            (same, own)
        }));
    }
    let mut created_same = 0;
    for task in tasks {
        let (same, own) = task.await.unwrap();
        if same == StatusCode::CREATED {
            created_same += 1;
        } else {
            assert_eq!(same, StatusCode::CONFLICT);
        }
        assert_eq!(own, StatusCode::CREATED);
    }
    assert_eq!(created_same, 1);
    // Every child's gateway and repository actions made it into the parent: no lost update.
    let parent = scope_actions(&t, "parent-1").await;
    for i in 0..8 {
        assert!(
            parent.contains(&format!("gateway/child-{i:03}/config/read")),
            "child {i}"
        );
        assert!(
            parent.contains(&format!("repositories/r{i}/content/read")),
            "repo {i}"
        );
    }
}

/// Creates `name` (ReadOnly, syncing `repos`) and returns Basic credentials of its sync token.
async fn registry_with_sync_password(t: &T, name: &str, repos: Value, extra: Value) -> String {
    let mut body = json!({"name": name, "repositories": repos});
    for (k, v) in extra.as_object().unwrap() {
        body[k] = v.clone();
    }
    let r = create(t, body).await;
    assert_eq!(r.status, StatusCode::CREATED, "{:?}", r.body);
    let r = post(
        t,
        &format!("/api/v1/connected-registries/{name}/get-settings"),
        json!({"parentProtocol": "http", "generatePassword": 1}),
    )
    .await;
    let cs = ConnectionString::parse(r.json()["ACR_REGISTRY_CONNECTION_STRING"].as_str().unwrap())
        .unwrap();
    basic(name, &cs.sync_token_password)
}

#[tokio::test]
async fn gateway_config_carries_client_tokens_children_and_an_etag() {
    let t = setup().await;
    post(
        &t,
        "/api/v1/scope-maps",
        json!({"name": "readers", "actions": ["repositories/app/content/read"]}),
    )
    .await;
    let r = post(
        &t,
        "/api/v1/tokens",
        json!({"name": "line-reader", "scopeMap": "readers"}),
    )
    .await;
    assert_eq!(r.status, StatusCode::CREATED);
    let sync = registry_with_sync_password(
        &t,
        "site-one",
        json!(["app"]),
        json!({"mode": "ReadWrite", "clientTokens": ["line-reader"]}),
    )
    .await;
    assert_eq!(
        create(
            &t,
            json!({"name": "line-one", "parent": "site-one", "repositories": ["app"]})
        )
        .await
        .status,
        StatusCode::CREATED
    );

    let r = t
        .req_as(
            Some(&sync),
            Method::GET,
            "/gateway/v1/site-one/config",
            &[],
            Body::empty(),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{:?}", r.body);
    let v = r.json();
    assert_eq!(v["mode"], "ReadWrite");
    assert_eq!(v["repositories"], json!(["app"]));
    let tok = &v["clientTokens"][0];
    assert_eq!(
        (tok["name"].as_str(), tok["status"].as_str()),
        (Some("line-reader"), Some("enabled"))
    );
    assert!(
        tok["passwords"][0]["hash"]
            .as_str()
            .unwrap()
            .starts_with("$argon2id$")
    );
    assert_eq!(tok["actions"], json!(["repositories/app/content/read"]));
    assert_eq!(v["children"][0]["name"], "line-one");
    // Conditional fetch.
    let etag = r.header("etag").to_string();
    let r = t
        .req_as(
            Some(&sync),
            Method::GET,
            "/gateway/v1/site-one/config",
            &[("if-none-match", &etag)],
            Body::empty(),
        )
        .await;
    assert_eq!(r.status, StatusCode::NOT_MODIFIED);
    // A change to the resource changes the ETag.
    t.req(
        Method::PATCH,
        "/api/v1/connected-registries/site-one",
        &[],
        json!({"logLevel": "Debug"}).to_string(),
    )
    .await;
    let r = t
        .req_as(
            Some(&sync),
            Method::GET,
            "/gateway/v1/site-one/config",
            &[("if-none-match", &etag)],
            Body::empty(),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.json()["logLevel"], "Debug");
    // Only the registry's sync token (or an ancestor's) may read it.
    let r = post(
        &t,
        "/api/v1/connected-registries/site-one/get-settings",
        json!({"parentProtocol": "http"}),
    )
    .await;
    assert!(r.status.is_success());
    let client = t
        .req(
            Method::POST,
            "/api/v1/tokens/line-reader/credentials/generate",
            &[],
            json!({"passwords": ["password1"]}).to_string(),
        )
        .await;
    let pw = client.json()["passwords"][0]["value"]
        .as_str()
        .unwrap()
        .to_string();
    let r = t
        .req_as(
            Some(&basic("line-reader", &pw)),
            Method::GET,
            "/gateway/v1/site-one/config",
            &[],
            Body::empty(),
        )
        .await;
    assert_eq!(r.status, StatusCode::FORBIDDEN);
    // The site's sync token may read its child's config (it relays for it).
    let r = t
        .req_as(
            Some(&sync),
            Method::GET,
            "/gateway/v1/line-one/config",
            &[],
            Body::empty(),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK);
}

/// The listing a full reconciliation compares with: every manifest of a repository in the
/// registry's scope, tagged or not, paged; anything else refused with a message.
#[tokio::test]
async fn the_gateway_lists_every_manifest_of_a_repository_in_scope() {
    let t = setup().await;
    let sync =
        registry_with_sync_password(&t, "edge-list", json!(["app", "team/*"]), json!({})).await;
    let (_, a) = t.push_image("app", "v1", "a").await;
    let (_, b) = t.push_image("app", "v2", "b").await;
    t.push_image("other", "v1", "o").await;
    // Untagged, the manifest is still listed.
    let r = t
        .req(Method::DELETE, "/v2/app/manifests/v2", &[], Body::empty())
        .await;
    assert_eq!(r.status, StatusCode::ACCEPTED);
    let list = |q: &'static str| {
        let (t, sync) = (&t, sync.clone());
        async move {
            t.req_as(
                Some(&sync),
                Method::GET,
                &format!("/gateway/v1/edge-list/manifests?{q}"),
                &[],
                Body::empty(),
            )
            .await
        }
    };
    let digests = |r: &Resp| -> Vec<String> {
        r.json()["manifests"]
            .as_array()
            .unwrap()
            .iter()
            .map(|d| d.as_str().unwrap().to_string())
            .collect()
    };
    let r = list("repository=app").await;
    assert_eq!(r.status, StatusCode::OK, "{:?}", r.body);
    let mut want = vec![a.to_string(), b.to_string()];
    want.sort();
    assert_eq!(digests(&r), want);
    let r = list("repository=app&n=1").await;
    assert_eq!(digests(&r), want[..1]);
    let after = format!(
        "/gateway/v1/edge-list/manifests?repository=app&n=1&last={}",
        want[0]
    );
    let r = t
        .req_as(Some(&sync), Method::GET, &after, &[], Body::empty())
        .await;
    assert_eq!(digests(&r), want[1..]);
    let r = list("repository=team/none").await;
    assert_eq!(r.status, StatusCode::OK);
    assert!(digests(&r).is_empty());
    // Outside the scope, malformed, or without the sync token.
    let r = list("repository=other").await;
    assert_eq!(r.status, StatusCode::FORBIDDEN);
    assert!(
        msg(&r).contains("may not read repository other"),
        "{}",
        msg(&r)
    );
    for bad in [
        "repository=App",
        "repository=../x",
        "",
        "repository=app&n=0",
        "repository=app&n=x",
    ] {
        let r = t
            .req_as(
                Some(&sync),
                Method::GET,
                &format!("/gateway/v1/edge-list/manifests?{bad}"),
                &[],
                Body::empty(),
            )
            .await;
        assert_eq!(r.status, StatusCode::BAD_REQUEST, "{bad}: {:?}", r.body);
    }
    let r = t
        .req_as(
            None,
            Method::GET,
            "/gateway/v1/edge-list/manifests?repository=app",
            &[],
            Body::empty(),
        )
        .await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);
}

#[tokio::test]
async fn message_feed_is_ordered_scoped_and_long_polls() {
    let t = std::sync::Arc::new(setup().await);
    let sync =
        registry_with_sync_password(&t, "edge-feed", json!(["app", "team/*"]), json!({})).await;
    t.push_image("app", "v1", "a").await;
    t.push_image("other", "v1", "o").await; // out of scope
    t.push_image("team/x", "v1", "x").await;
    t.req(Method::DELETE, "/v2/app/manifests/v1", &[], Body::empty())
        .await;

    let feed = |after: i64, extra: &'static str| {
        let t = t.clone();
        let sync = sync.clone();
        async move {
            t.req_as(
                Some(&sync),
                Method::GET,
                &format!("/gateway/v1/edge-feed/messages?after={after}{extra}"),
                &[],
                Body::empty(),
            )
            .await
        }
    };
    let r = feed(0, "").await;
    assert_eq!(r.status, StatusCode::OK, "{:?}", r.body);
    let v = r.json();
    let got: Vec<(String, String)> = v["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| {
            (
                m["repository"].as_str().unwrap().to_string(),
                m["kind"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    let s = |r: &str, k: &str| (r.to_string(), k.to_string());
    assert_eq!(
        got,
        vec![
            s("app", "manifest_put"),
            s("app", "tag_set"),
            s("team/x", "manifest_put"),
            s("team/x", "tag_set"),
            s("app", "tag_removed"),
        ]
    );
    let seqs: Vec<i64> = v["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["seq"].as_i64().unwrap())
        .collect();
    assert!(seqs.windows(2).all(|w| w[0] < w[1]), "in order: {seqs:?}");
    assert_eq!(v["next"], v["latest"]);
    // Paging with limit, and a cursor at the end.
    let r = feed(0, "&limit=2").await;
    assert_eq!(r.json()["messages"].as_array().unwrap().len(), 2);
    let next = r.json()["next"].as_i64().unwrap();
    assert_eq!(
        feed(next, "").await.json()["messages"][0]["repository"],
        "team/x"
    );
    let latest = v["latest"].as_i64().unwrap();
    assert_eq!(feed(latest, "").await.json()["messages"], json!([]));
    assert_eq!(feed(0, "&limit=x").await.status, StatusCode::BAD_REQUEST);

    // Long poll: the call waits, and a push at the parent wakes it with the new message.
    let waiting = tokio::spawn(feed(latest, "&wait=30"));
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    assert!(
        !waiting.is_finished(),
        "nothing to report yet: the call must wait"
    );
    t.push_image("team/y", "v2", "y").await;
    let r = tokio::time::timeout(std::time::Duration::from_secs(20), waiting)
        .await
        .expect("woken by the push")
        .unwrap();
    assert_eq!(r.json()["messages"][0]["repository"], "team/y");

    // Resync is signalled in the feed.
    post(
        &t,
        "/api/v1/connected-registries/edge-feed/resync",
        json!({}),
    )
    .await;
    assert_eq!(feed(latest, "").await.json()["resync"], true);
    // Other registries' sync tokens cannot read this feed.
    let other = registry_with_sync_password(&t, "edge-other", json!(["app"]), json!({})).await;
    let r = t
        .req_as(
            Some(&other),
            Method::GET,
            "/gateway/v1/edge-feed/messages?after=0",
            &[],
            Body::empty(),
        )
        .await;
    assert_eq!(r.status, StatusCode::FORBIDDEN);
}

#[tokio::test]
async fn expired_or_foreign_cursors_get_410() {
    let control = outpost_control::ControlConfig {
        connected: outpost_control::ConnectedLimits {
            min_message_ttl: std::time::Duration::from_secs(1),
            ..Default::default()
        },
        ..Default::default()
    };
    let t = setup_control(Default::default(), Default::default(), control).await;
    let sync = registry_with_sync_password(
        &t,
        "ship-ttl",
        json!(["app"]),
        json!({"syncMessageTtl": "PT1S"}),
    )
    .await;
    t.push_image("app", "v1", "old").await; // two events, soon older than the TTL
    tokio::time::sleep(std::time::Duration::from_millis(1500)).await;
    t.push_image("app", "v2", "new").await;
    let get = |after: i64| {
        let t = &t;
        let sync = sync.clone();
        async move {
            t.req_as(
                Some(&sync),
                Method::GET,
                &format!("/gateway/v1/ship-ttl/messages?after={after}"),
                &[],
                Body::empty(),
            )
            .await
        }
    };
    // A cursor from before the expired messages: 410, with where to continue after reconciling.
    let r = get(0).await;
    assert_eq!(
        (r.status, r.code().as_str()),
        (StatusCode::GONE, "CURSOR_EXPIRED")
    );
    let latest = r.json()["errors"][0]["detail"]["latest"].as_i64().unwrap();
    assert!(msg(&r).contains("reconcile fully"), "{}", msg(&r));
    // A cursor past the expired messages still works.
    let r = get(2).await;
    assert_eq!(r.status, StatusCode::OK, "{:?}", r.body);
    assert_eq!(r.json()["messages"][0]["tag"], json!(null));
    // A cursor ahead of this parent's log (it was restored from a backup) also needs a reconcile.
    assert_eq!(get(latest + 10).await.status, StatusCode::GONE);
    assert_eq!(get(latest).await.status, StatusCode::OK);
    // So does one whose number this log has, written at another time: a parent restored from
    // a backup that has written as many events since as it lost. Each message, and the page,
    // carries the mark (the time its event was written) the child keeps with its cursor.
    let r = get(2).await;
    let mark = r.json()["messages"][0]["mark"].as_i64().expect("a mark");
    assert_eq!(r.json()["messages"][0]["seq"], json!(3));
    assert_eq!(r.json()["nextMark"], r.json()["messages"][1]["mark"]);
    let with_mark = |mark: i64| {
        let t = &t;
        let sync = sync.clone();
        async move {
            t.req_as(
                Some(&sync),
                Method::GET,
                &format!("/gateway/v1/ship-ttl/messages?after=3&mark={mark}"),
                &[],
                Body::empty(),
            )
            .await
        }
    };
    let r = with_mark(mark).await;
    assert_eq!(r.status, StatusCode::OK, "{:?}", r.body);
    assert_eq!(r.json()["messages"][0]["seq"], json!(4));
    let r = with_mark(mark + 1).await;
    assert_eq!(
        (r.status, r.code().as_str()),
        (StatusCode::GONE, "CURSOR_EXPIRED"),
        "{:?}",
        r.body
    );
    assert_eq!(r.json()["errors"][0]["detail"]["latest"], json!(latest));

    // Pruning the log removes what is older than every TTL and changes no answer: the same
    // feed page, the same refusal of the old cursor.
    let page = get(2).await.body;
    let before: Vec<i64> = t
        .registry
        .meta()
        .events_after(0, 100)
        .await
        .unwrap()
        .iter()
        .map(|e| e.seq)
        .collect();
    assert_eq!(before, [1, 2, 3, 4]);
    // A ReadWrite site keeps its clients' changes after its outbox cursor.
    assert_eq!(t.control.prune_event_log(Some(0)).await.unwrap(), 0);
    assert_eq!(t.control.prune_event_log(None).await.unwrap(), 1);
    let after: Vec<i64> = t
        .registry
        .meta()
        .events_after(0, 100)
        .await
        .unwrap()
        .iter()
        .map(|e| e.seq)
        .collect();
    assert_eq!(
        after,
        [2, 3, 4],
        "v1's tag event stays: it is the tag's history"
    );
    assert_eq!(get(2).await.body, page);
    // A TTL raised after pruning does not make a cursor below the pruned part continuable.
    let r = patch(
        &t,
        "/api/v1/connected-registries/ship-ttl",
        json!({"syncMessageTtl": "PT1H"}),
    )
    .await;
    assert_eq!(r.status, StatusCode::OK, "{:?}", r.body);
    assert_eq!(get(1).await.status, StatusCode::GONE);
    assert_eq!(
        get(2).await.body,
        page,
        "from the pruning mark on, nothing changed"
    );
    let r = get(0).await;
    assert_eq!(
        (r.status, r.code().as_str()),
        (StatusCode::GONE, "CURSOR_EXPIRED")
    );
}

#[tokio::test]
async fn a_revoked_sync_token_shows_up_as_a_status_detail() {
    let t = setup().await;
    assert_eq!(
        create(&t, json!({"name": "edge-rev", "repositories": ["app"]}))
            .await
            .status,
        StatusCode::CREATED
    );
    let shown = t.get("/api/v1/connected-registries/edge-rev").await.json();
    assert_eq!(shown["statusDetails"], json!([]));
    let r = t
        .req(
            Method::PATCH,
            "/api/v1/tokens/edge-rev",
            &[],
            json!({"status": "disabled"}).to_string(),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK);
    let shown = t.get("/api/v1/connected-registries/edge-rev").await.json();
    assert_eq!(shown["statusDetails"][0]["code"], "SyncTokenDisabled");
    assert!(
        shown["statusDetails"][0]["description"]
            .as_str()
            .unwrap()
            .contains("--status enabled")
    );

    // An instance that last reported Online is Unhealthy once its token is disabled: it is
    // refused at its next contact, which it cannot report.
    let sync = registry_with_sync_password(&t, "edge-live", json!(["app"]), json!({})).await;
    for (method, path, body) in [
        (
            Method::POST,
            "/gateway/v1/edge-live/activate",
            json!({"instanceId": "edge-a"}),
        ),
        (
            Method::PUT,
            "/gateway/v1/edge-live/status",
            json!({"instanceId": "edge-a", "state": "Online", "lastSyncResult": "Succeeded"}),
        ),
    ] {
        let r = t
            .req_as(Some(&sync), method, path, &[], body.to_string())
            .await;
        assert_eq!(r.status, StatusCode::OK, "{}", msg(&r));
    }
    let state = || async {
        t.get("/api/v1/connected-registries/edge-live").await.json()["connectionState"].clone()
    };
    assert_eq!(state().await, "Online");
    let r = t
        .req(
            Method::PATCH,
            "/api/v1/tokens/edge-live",
            &[],
            json!({"status": "disabled"}).to_string(),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(state().await, "Unhealthy");
}

/// On a connected registry, the connected-registry resources (its descendants, relayed from
/// the root) are not changed through the local API: that would cut the children off until the
/// next sync. Reading them, and get-settings without a new password, still work.
#[tokio::test]
async fn a_connected_registry_refuses_connected_registry_changes() {
    let t = setup_control(
        Default::default(),
        Default::default(),
        outpost_control::ControlConfig {
            managed_at_root: Some("site-0001".into()),
            ..Default::default()
        },
    )
    .await;
    let denied = |r: &Resp| {
        assert_eq!(r.status, StatusCode::FORBIDDEN, "{:?}", r.body);
        assert_eq!(r.json()["errors"][0]["code"], "DENIED", "{:?}", r.body);
        assert!(
            msg(r).contains("\"site-0001\"") && msg(r).contains("at the root"),
            "{}",
            msg(r)
        );
    };
    denied(&create(&t, json!({"name": "line-0001", "repositories": ["app"]})).await);
    let path = "/api/v1/connected-registries/line-0001";
    for (method, p, body) in [
        (
            Method::PATCH,
            path.to_string(),
            json!({"syncSchedule": "* * * * *"}),
        ),
        (Method::DELETE, format!("{path}?cleanup=true"), json!(null)),
        (Method::POST, format!("{path}/deactivate"), json!({})),
        (Method::POST, format!("{path}/resync"), json!({})),
        (
            Method::PATCH,
            format!("{path}/permissions"),
            json!({"add": ["x"]}),
        ),
        (
            Method::POST,
            format!("{path}/get-settings"),
            json!({"parentProtocol": "http", "generatePassword": 1}),
        ),
    ] {
        denied(&t.req(method, &p, &[], body.to_string()).await);
    }
    // Reading goes on as before.
    assert_eq!(
        t.get("/api/v1/connected-registries").await.status,
        StatusCode::OK
    );
    let r = post(
        &t,
        &format!("{path}/get-settings"),
        json!({"parentProtocol": "http"}),
    )
    .await;
    assert_eq!(r.status, StatusCode::NOT_FOUND, "{:?}", r.body);
}

/// Makes every `event` (`INSERT`, `DELETE`…) on `table` of the test registry's database fail,
/// through a trigger named `name`, as an operator's SQL client could.
async fn db_fail(t: &T, name: &str, event: &str, table: &str) {
    let sql = match &t.database_url {
        None => format!(
            "CREATE TRIGGER {name} BEFORE {event} ON {table} \
             BEGIN SELECT RAISE(ABORT, 'injected failure'); END;"
        ),
        Some(_) => format!(
            "CREATE OR REPLACE FUNCTION injected_failure() RETURNS trigger LANGUAGE plpgsql \
             AS $$ BEGIN RAISE EXCEPTION 'injected failure'; END $$; \
             CREATE TRIGGER {name} BEFORE {event} ON {table} \
             FOR EACH ROW EXECUTE FUNCTION injected_failure();"
        ),
    };
    db_exec(t, &sql).await;
}

/// Removes the trigger `name` on `table` that [`db_fail`] made.
async fn db_unfail(t: &T, name: &str, table: &str) {
    let sql = match &t.database_url {
        None => format!("DROP TRIGGER {name};"),
        Some(_) => format!("DROP TRIGGER {name} ON {table};"),
    };
    db_exec(t, &sql).await;
}

async fn db_exec(t: &T, sql: &str) {
    sqlx::any::install_default_drivers();
    let url = match &t.database_url {
        Some(url) => url.clone(),
        None => format!("sqlite://{}", t.dir.path().join("meta.db").display()),
    };
    let pool = sqlx::AnyPool::connect(&url).await.unwrap();
    sqlx::raw_sql(sql).execute(&pool).await.unwrap();
    pool.close().await;
}

/// A connected-registry create or delete whose last database write fails writes nothing:
/// every row of it goes in one transaction (a crash half-way is the same case).
#[tokio::test]
async fn a_create_or_delete_failing_in_the_database_writes_nothing() {
    let t = setup().await;
    let r = create(
        &t,
        json!({"name": "hub-0001", "mode": "ReadWrite", "repositories": ["r1"]}),
    )
    .await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", msg(&r));
    let hub_rules = scope_actions(&t, "hub-0001").await;

    db_fail(&t, "fail_cr", "INSERT", "connected_registries").await;
    let r = create(
        &t,
        json!({"name": "leaf-0001", "parent": "hub-0001", "repositories": ["r1"]}),
    )
    .await;
    assert_eq!(r.status, StatusCode::INTERNAL_SERVER_ERROR, "{}", msg(&r));
    assert_eq!(
        t.get("/api/v1/tokens/leaf-0001").await.status,
        StatusCode::NOT_FOUND
    );
    assert_eq!(
        t.get("/api/v1/scope-maps/leaf-0001").await.status,
        StatusCode::NOT_FOUND
    );
    assert_eq!(
        scope_actions(&t, "hub-0001").await,
        hub_rules,
        "the hub's rules are as they were"
    );
    db_unfail(&t, "fail_cr", "connected_registries").await;
    let r = create(
        &t,
        json!({"name": "leaf-0001", "parent": "hub-0001", "repositories": ["r1"]}),
    )
    .await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", msg(&r));
    let with_leaf = scope_actions(&t, "hub-0001").await;
    assert!(
        with_leaf.iter().any(|a| a.contains("leaf-0001")),
        "{with_leaf:?}"
    );

    // Deleting the sync token, the second-to-last write of the delete, fails: the registry,
    // its token, its scope map and the hub's rights over it all stay.
    db_fail(&t, "fail_tok", "DELETE", "tokens").await;
    const DELETE_LEAF: &str = "/api/v1/connected-registries/leaf-0001?cleanup=true";
    let r = t.req(Method::DELETE, DELETE_LEAF, &[], Body::empty()).await;
    assert_eq!(r.status, StatusCode::INTERNAL_SERVER_ERROR, "{}", msg(&r));
    assert_eq!(
        t.get("/api/v1/connected-registries/leaf-0001").await.status,
        StatusCode::OK
    );
    assert_eq!(
        t.get("/api/v1/tokens/leaf-0001").await.status,
        StatusCode::OK
    );
    assert_eq!(
        t.get("/api/v1/scope-maps/leaf-0001").await.status,
        StatusCode::OK
    );
    assert_eq!(scope_actions(&t, "hub-0001").await, with_leaf);
    db_unfail(&t, "fail_tok", "tokens").await;
    let r = t.req(Method::DELETE, DELETE_LEAF, &[], Body::empty()).await;
    assert_eq!(r.status, StatusCode::OK, "{}", msg(&r));
    assert_eq!(r.json()["cleanedUp"], json!(true), "{}", r.json());
    assert_eq!(
        t.get("/api/v1/tokens/leaf-0001").await.status,
        StatusCode::NOT_FOUND
    );
    assert_eq!(scope_actions(&t, "hub-0001").await, hub_rules);
}

/// A create refused half-way (the parent's scope map would name more repositories than the
/// limit allows) leaves nothing behind: no sync token, no scope map, the parent's rules as
/// they were; the same name can be created right after.
#[tokio::test]
async fn a_create_refused_half_way_leaves_nothing_behind() {
    let t = setup_control(
        Default::default(),
        Default::default(),
        outpost_control::ControlConfig {
            limits: outpost_control::Limits {
                max_repository_rules: 2,
                ..Default::default()
            },
            ..Default::default()
        },
    )
    .await;
    let r = create(
        &t,
        json!({"name": "hub-0001", "mode": "ReadWrite", "repositories": ["r1", "r2"]}),
    )
    .await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", msg(&r));
    let hub_rules = t.get("/api/v1/scope-maps/hub-0001").await.json()["actions"].clone();
    // r3 would be added up the chain: the hub's scope map would name 3 repositories.
    let r = create(
        &t,
        json!({"name": "leaf-0001", "parent": "hub-0001", "repositories": ["r3"]}),
    )
    .await;
    assert_eq!(r.status, StatusCode::CONFLICT, "{}", msg(&r));
    assert!(msg(&r).contains("limit"), "{}", msg(&r));
    assert_eq!(
        t.get("/api/v1/tokens/leaf-0001").await.status,
        StatusCode::NOT_FOUND
    );
    assert_eq!(
        t.get("/api/v1/scope-maps/leaf-0001").await.status,
        StatusCode::NOT_FOUND
    );
    assert_eq!(
        t.get("/api/v1/scope-maps/hub-0001").await.json()["actions"],
        hub_rules,
        "the hub's rules are as they were"
    );
    let r = create(
        &t,
        json!({"name": "leaf-0001", "parent": "hub-0001", "repositories": ["r1"]}),
    )
    .await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", msg(&r));

    // The same limit met by `permissions update`: the hub would name 3 repositories, so
    // neither the leaf nor the hub changes.
    let leaf_rules = t.get("/api/v1/scope-maps/leaf-0001").await.json()["actions"].clone();
    let hub_rules = t.get("/api/v1/scope-maps/hub-0001").await.json()["actions"].clone();
    let r = t
        .req(
            Method::PATCH,
            "/api/v1/connected-registries/leaf-0001/permissions",
            &[],
            json!({"add": ["r3"], "remove": ["r1"]}).to_string(),
        )
        .await;
    assert_eq!(r.status, StatusCode::CONFLICT, "{}", msg(&r));
    assert!(msg(&r).contains("hub-0001"), "{}", msg(&r));
    assert_eq!(
        t.get("/api/v1/scope-maps/leaf-0001").await.json()["actions"],
        leaf_rules,
        "the leaf's rules are as they were"
    );
    assert_eq!(
        t.get("/api/v1/scope-maps/hub-0001").await.json()["actions"],
        hub_rules
    );
    // Within the limit, both directions apply in one update.
    let r = t
        .req(
            Method::PATCH,
            "/api/v1/connected-registries/leaf-0001/permissions",
            &[],
            json!({"add": ["r2"], "remove": ["r1"]}).to_string(),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", msg(&r));
    let leaf: Vec<String> = serde_json::from_value(
        t.get("/api/v1/scope-maps/leaf-0001").await.json()["actions"].clone(),
    )
    .unwrap();
    assert!(
        leaf.contains(&"repositories/r2/content/read".to_string()),
        "{leaf:?}"
    );
    assert!(
        !leaf.iter().any(|a| a.starts_with("repositories/r1/")),
        "{leaf:?}"
    );
}

async fn patch(t: &T, path: &str, body: Value) -> Resp {
    t.req(
        Method::PATCH,
        path,
        &[("content-type", "application/json")],
        body.to_string(),
    )
    .await
}

async fn delete(t: &T, path: &str) -> Resp {
    t.req(Method::DELETE, path, &[], Body::empty()).await
}

#[tokio::test]
async fn plain_token_and_scope_map_commands_keep_connected_registry_rules() {
    let t = setup().await;
    readonly_token(&t, "reader-01").await;
    let r = create(
        &t,
        json!({"name": "site-one", "repositories": ["app"], "clientTokens": ["reader-01"]}),
    )
    .await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", msg(&r));

    // The sync scope map changes only through `permissions update`, and goes with its registry.
    let r = patch(
        &t,
        "/api/v1/scope-maps/site-one",
        json!({"add": ["repositories/other/content/read"]}),
    )
    .await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST, "{}", msg(&r));
    assert!(
        msg(&r).contains("permissions update -n site-one"),
        "{}",
        msg(&r)
    );
    let r = patch(
        &t,
        "/api/v1/scope-maps/site-one",
        json!({"description": "the sync map of site-one"}),
    )
    .await;
    assert_eq!(r.status, StatusCode::OK, "a description is free to change");
    let r = delete(&t, "/api/v1/scope-maps/site-one").await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    assert!(msg(&r).contains("--cleanup"), "{}", msg(&r));
    // The sync token keeps its scope map.
    let r = patch(
        &t,
        "/api/v1/tokens/site-one",
        json!({"scopeMap": "reader-01-map"}),
    )
    .await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    assert!(msg(&r).contains("sync token"), "{}", msg(&r));

    // A ReadOnly registry's client token cannot gain writes, by either road.
    let r = patch(
        &t,
        "/api/v1/scope-maps/reader-01-map",
        json!({"add": ["repositories/app/content/write"]}),
    )
    .await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    assert!(msg(&r).contains("ReadOnly"), "{}", msg(&r));
    post(
        &t,
        "/api/v1/scope-maps",
        json!({"name": "writer-map", "actions": ["repositories/app/content/write"]}),
    )
    .await;
    let r = patch(
        &t,
        "/api/v1/tokens/reader-01",
        json!({"scopeMap": "writer-map"}),
    )
    .await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    assert!(msg(&r).contains("ReadOnly"), "{}", msg(&r));
    // Reading more is fine.
    let r = patch(
        &t,
        "/api/v1/scope-maps/reader-01-map",
        json!({"add": ["repositories/docs/content/read"]}),
    )
    .await;
    assert_eq!(r.status, StatusCode::OK, "{}", msg(&r));

    // A scope map in use, and a client token in use, are not deleted from under their users.
    let r = delete(&t, "/api/v1/scope-maps/reader-01-map").await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    assert!(msg(&r).contains("reader-01"), "{}", msg(&r));
    let r = delete(&t, "/api/v1/tokens/reader-01").await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    assert!(
        msg(&r).contains("--remove-client-tokens reader-01"),
        "{}",
        msg(&r)
    );
    let r = patch(
        &t,
        "/api/v1/connected-registries/site-one",
        json!({"removeClientTokens": ["reader-01"]}),
    )
    .await;
    assert_eq!(r.status, StatusCode::OK, "{}", msg(&r));
    assert_eq!(
        delete(&t, "/api/v1/tokens/reader-01").await.status,
        StatusCode::NO_CONTENT
    );
    assert_eq!(
        delete(&t, "/api/v1/scope-maps/reader-01-map").await.status,
        StatusCode::NO_CONTENT
    );

    // Removing a repository the registry does not sync says so.
    let r = patch(
        &t,
        "/api/v1/connected-registries/site-one/permissions",
        json!({"remove": ["never-synced"]}),
    )
    .await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    assert!(msg(&r).contains("syncs: app"), "{}", msg(&r));
}

#[tokio::test]
async fn concurrent_scope_map_updates_all_land() {
    let t = setup().await;
    let r = post(
        &t,
        "/api/v1/scope-maps",
        json!({"name": "shared-map", "actions": ["repositories/base/content/read"]}),
    )
    .await;
    assert_eq!(r.status, StatusCode::CREATED);
    let updates = (0..12).map(|i| {
        let t = &t;
        async move {
            patch(
                t,
                "/api/v1/scope-maps/shared-map",
                json!({"add": [format!("repositories/r{i}/content/read")]}),
            )
            .await
            .status
        }
    });
    for s in futures_util::future::join_all(updates).await {
        assert_eq!(s, StatusCode::OK);
    }
    let actions = scope_actions(&t, "shared-map").await;
    for i in 0..12 {
        assert!(
            actions.contains(&format!("repositories/r{i}/content/read")),
            "r{i} lost: {actions:?}"
        );
    }
}

#[tokio::test]
async fn the_number_of_connected_registries_is_limited() {
    let t = setup_control(
        Default::default(),
        Default::default(),
        outpost_control::ControlConfig {
            connected: outpost_control::ConnectedLimits {
                max_connected_registries: 2,
                ..Default::default()
            },
            ..Default::default()
        },
    )
    .await;
    for n in ["site-0001", "site-0002"] {
        let r = create(&t, json!({"name": n, "repositories": ["app"]})).await;
        assert_eq!(r.status, StatusCode::CREATED, "{}", msg(&r));
    }
    let r = create(&t, json!({"name": "site-0003", "repositories": ["app"]})).await;
    assert_eq!(r.status, StatusCode::CONFLICT, "{}", msg(&r));
    assert!(msg(&r).contains("2 connected registries"), "{}", msg(&r));
    assert_eq!(
        t.get("/api/v1/tokens/site-0003").await.status,
        StatusCode::NOT_FOUND,
        "nothing of it was made"
    );
}

#[tokio::test]
async fn get_settings_uses_the_parents_reported_address_unless_told_otherwise() {
    let t = setup().await;
    let hub = registry_with_sync_password(&t, "hub-0001", json!(["app"]), json!({})).await;
    let r = create(
        &t,
        json!({"name": "leaf-0001", "parent": "hub-0001", "repositories": ["app"]}),
    )
    .await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", msg(&r));
    let endpoint = |body: Value| {
        let t = &t;
        async move {
            let r = post(
                t,
                "/api/v1/connected-registries/leaf-0001/get-settings",
                body,
            )
            .await;
            assert_eq!(r.status, StatusCode::OK, "{}", msg(&r));
            // Without a generated password the string holds a placeholder; read the field.
            r.json()["ACR_REGISTRY_CONNECTION_STRING"]
                .as_str()
                .unwrap()
                .split(';')
                .find_map(|kv| kv.strip_prefix("ParentGatewayEndpoint="))
                .unwrap()
                .to_string()
        }
    };
    // The hub has not reported where it listens: a placeholder, not this root's address.
    assert_eq!(
        endpoint(json!({"parentProtocol": "http"})).await,
        "<parent gateway endpoint>"
    );
    // An explicit endpoint wins, for a registry under another one too.
    assert_eq!(
        endpoint(json!({"parentProtocol": "http", "parentEndpoint": "hub.ship.example:5000"}))
            .await,
        "hub.ship.example:5000"
    );
    // Once the hub reports its address, that is the default.
    let r = t
        .req_as(
            Some(&hub),
            Method::POST,
            "/gateway/v1/hub-0001/activate",
            &[],
            json!({"instanceId": "hub-a"}).to_string(),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", msg(&r));
    let r = t
        .req_as(
            Some(&hub),
            Method::PUT,
            "/gateway/v1/hub-0001/status",
            &[],
            json!({"instanceId": "hub-a", "state": "Online", "loginServer": "10.0.0.5:5000"})
                .to_string(),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", msg(&r));
    assert_eq!(
        endpoint(json!({"parentProtocol": "http"})).await,
        "10.0.0.5:5000"
    );

    // Addresses are host[:port] and nothing else: they go into connection strings as they
    // are, so a reported or given value holding `;` or a line break could add keys to a
    // child's string or rows to an operator's table.
    for bad in [
        "evil.example:1;ParentEndpointProtocol=https;SyncTokenName=admin",
        "host\nfake  ReadWrite  Online",
        "http://cloud:5000",
    ] {
        let r = t
            .req_as(
                Some(&hub),
                Method::PUT,
                "/gateway/v1/hub-0001/status",
                &[],
                json!({"instanceId": "hub-a", "state": "Online", "loginServer": bad}).to_string(),
            )
            .await;
        assert_eq!(r.status, StatusCode::BAD_REQUEST, "{bad}: {}", msg(&r));
        assert!(
            msg(&r).contains("loginServer") && msg(&r).contains("host[:port]"),
            "{}",
            msg(&r)
        );
        let r = post(
            &t,
            "/api/v1/connected-registries/leaf-0001/get-settings",
            json!({"parentProtocol": "http", "parentEndpoint": bad}),
        )
        .await;
        assert_eq!(r.status, StatusCode::BAD_REQUEST, "{bad}: {}", msg(&r));
        assert!(msg(&r).contains("--parent-endpoint"), "{}", msg(&r));
    }
    assert_eq!(
        endpoint(json!({"parentProtocol": "http"})).await,
        "10.0.0.5:5000",
        "the refused reports changed nothing"
    );
}

#[tokio::test]
async fn the_status_page_shows_the_store_and_the_fleet() {
    let t = setup().await;
    t.push_image("app", "v1", "one").await;
    let r = create(&t, json!({"name": "ship-0001", "repositories": ["app"]})).await;
    assert_eq!(r.status, StatusCode::CREATED);
    let r = t
        .req_as(None, Method::GET, "/status", &[], Body::empty())
        .await;
    assert_eq!(r.status, StatusCode::OK, "no credentials needed");
    assert!(r.header("content-type").starts_with("text/html"));
    let page = String::from_utf8(r.body.to_vec()).unwrap();
    for needle in [
        "<h1>Outpost ",
        "<tr><th>Repositories</th><td>1</td></tr>",
        "<tr><th>Tags</th><td>1</td></tr>",
        "Connected registries below this one",
        "<td>ship-0001</td><td>(this registry)</td><td>ReadOnly</td><td>Offline</td>",
    ] {
        assert!(page.contains(needle), "{needle} missing from {page}");
    }
    assert!(
        !page.contains("Sync with the parent"),
        "a root has no parent"
    );

    // Problems are shown by code and count: their text names repositories and tokens, and
    // this page needs no credentials.
    let sync = registry_with_sync_password(&t, "ship-0002", json!(["app"]), json!({})).await;
    let r = t
        .req_as(
            Some(&sync),
            Method::POST,
            "/gateway/v1/ship-0002/activate",
            &[],
            json!({"instanceId": "ship-a"}).to_string(),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", msg(&r));
    let refused = |tag: &str| {
        json!({"type": "Sync", "code": "OutboxEntryRefused",
               "description": format!("the parent refused secret-proj:{tag}: token \"ci-secret\" may not push")})
    };
    let r = t
        .req_as(
            Some(&sync),
            Method::PUT,
            "/gateway/v1/ship-0002/status",
            &[],
            json!({"instanceId": "ship-a", "state": "Online",
                   "statusDetails": [refused("launch-q3"), refused("launch-q4")]})
            .to_string(),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", msg(&r));
    let r = t
        .req_as(None, Method::GET, "/status", &[], Body::empty())
        .await;
    let page = String::from_utf8(r.body.to_vec()).unwrap();
    assert!(page.contains("<td>OutboxEntryRefused (x2)</td>"), "{page}");
    for secret in ["secret-proj", "launch-q3", "ci-secret"] {
        assert!(
            !page.contains(secret),
            "{secret} is on the open page: {page}"
        );
    }

    // What an instance reports is bounded: counters are not negative, ids are short and
    // printable, and the details kept (and printed) are capped in number and length.
    let report = |body: Value| {
        let (t, sync) = (&t, &sync);
        async move {
            t.req_as(
                Some(sync),
                Method::PUT,
                "/gateway/v1/ship-0002/status",
                &[],
                body.to_string(),
            )
            .await
        }
    };
    let r = report(json!({"instanceId": "ship-a", "cursorLag": -5})).await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST, "{}", msg(&r));
    assert!(
        msg(&r).contains("cursorLag must not be negative"),
        "{}",
        msg(&r)
    );
    for id in ["", "has space", &"x".repeat(200)] {
        let r = t
            .req_as(
                Some(&sync),
                Method::POST,
                "/gateway/v1/ship-0002/activate",
                &[],
                json!({"instanceId": id}).to_string(),
            )
            .await;
        assert_eq!(r.status, StatusCode::BAD_REQUEST, "{id:?}: {}", msg(&r));
        assert!(msg(&r).contains("instanceId must be"), "{}", msg(&r));
    }
    let many: Vec<Value> = (0..150)
        .map(|i| json!({"type": "Sync", "code": "X", "description": format!("{i}{}", "d".repeat(5000))}))
        .collect();
    let r = report(json!({"instanceId": "ship-a", "statusDetails": many})).await;
    assert_eq!(r.status, StatusCode::OK, "{}", msg(&r));
    let r = t
        .req(
            Method::GET,
            "/api/v1/connected-registries/ship-0002",
            &[],
            Body::empty(),
        )
        .await;
    let details = r.json()["statusDetails"].as_array().unwrap().clone();
    assert_eq!(details.len(), 100);
    assert!(details[0]["description"].as_str().unwrap().len() <= 2048 + 3);
}

/// Notifications a connected registry sends are kept at the root once per id, listed in order,
/// and taken only from its active instance, in the documented shape.
#[tokio::test]
async fn notifications_are_kept_once_and_listed_in_order() {
    let t = setup().await;
    let sync = registry_with_sync_password(
        &t,
        "ship-notes",
        json!(["app"]),
        json!({"notifications": ["app:*:push"]}),
    )
    .await;
    let other = registry_with_sync_password(&t, "ship-other", json!(["app"]), json!({})).await;
    let send = |auth: Option<String>, body: Value| {
        let t = &t;
        async move {
            t.req_as(
                auth.as_deref(),
                Method::POST,
                "/gateway/v1/ship-notes/notifications",
                &[],
                body.to_string(),
            )
            .await
        }
    };
    let note = |id: &str, tag: &str| {
        json!({"id": id, "time": "2026-11-28T10:00:00Z", "action": "push", "repository": "app",
               "tag": tag, "digest": "sha256:aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa"})
    };
    let batch = json!({"instanceId": "inst-1", "notifications": [note("inst-1:1", "v1"), note("inst-1:2", "v2")]});

    // Not activated yet: refused, nothing kept.
    let r = send(Some(sync.clone()), batch.clone()).await;
    assert_eq!(
        (r.status, r.code().as_str()),
        (StatusCode::BAD_REQUEST, "NOT_ACTIVE")
    );
    let r = t
        .req_as(
            Some(&sync),
            Method::POST,
            "/gateway/v1/ship-notes/activate",
            &[],
            json!({"instanceId": "inst-1"}).to_string(),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{:?}", r.body);

    // Who may send: the registry's own sync token only.
    assert_eq!(
        send(None, batch.clone()).await.status,
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(
        send(Some(other), batch.clone()).await.status,
        StatusCode::FORBIDDEN
    );

    let r = send(Some(sync.clone()), batch.clone()).await;
    assert_eq!(r.status, StatusCode::OK, "{:?}", r.body);
    assert_eq!(r.json()["received"], 2);
    // Sent again (the sender crashed before noting it was sent): kept once.
    let r = send(Some(sync.clone()), batch.clone()).await;
    assert_eq!(r.json()["received"], 0);
    let r = send(
        Some(sync.clone()),
        json!({"instanceId": "inst-1", "notifications": [note("inst-1:3", "v3")]}),
    )
    .await;
    assert_eq!(r.json()["received"], 1);
    // About a repository this registry does not sync: not kept (a compromised site cannot
    // plant events about other repositories), the rest of the batch is.
    let mut foreign = note("inst-1:8", "v8");
    foreign["repository"] = json!("secret/app");
    let r = send(
        Some(sync.clone()),
        json!({"instanceId": "inst-1", "notifications": [foreign, note("inst-1:9", "v9")]}),
    )
    .await;
    assert_eq!(r.status, StatusCode::OK, "{:?}", r.body);
    assert_eq!(r.json()["received"], 1);

    // Malformed, oversized or from another instance: refused whole, nothing kept.
    let mut bad = note("inst-1:4", "v4");
    bad["action"] = json!("pull");
    let with = |field: &str, value: Value| {
        let mut n = note("inst-1:7", "v7");
        n[field] = value;
        json!({"instanceId": "inst-1", "notifications": [n]})
    };
    let too_many: Vec<Value> = (0..501).map(|i| note(&format!("x:{i}"), "v")).collect();
    for (body, code) in [
        (
            json!({"instanceId": "inst-1", "notifications": [note("inst-1:5", "v5"), bad]}),
            "INVALID_REQUEST",
        ),
        (
            json!({"instanceId": "inst-1", "notifications": too_many}),
            "INVALID_REQUEST",
        ),
        (
            json!({"instanceId": "inst-1", "notifications": [{"id": "inst-1:6"}]}),
            "INVALID_REQUEST",
        ),
        (
            json!({"instanceId": "inst-2", "notifications": [note("inst-2:1", "v")]}),
            "NOT_ACTIVE",
        ),
        // Every field is what a registry's events hold: nothing else reaches the log or webhook.
        (
            with("repository", json!("app\nforged log line")),
            "INVALID_REQUEST",
        ),
        (with("repository", json!("App/UPPER")), "INVALID_REQUEST"),
        (with("time", json!("yesterday")), "INVALID_REQUEST"),
        (with("tag", json!("bad tag!")), "INVALID_REQUEST"),
        (with("digest", json!("sha256:zz")), "INVALID_REQUEST"),
        (with("id", json!("x\u{1b}[31m")), "INVALID_REQUEST"),
        (with("id", json!("x".repeat(100_000))), "INVALID_REQUEST"),
    ] {
        let r = send(Some(sync.clone()), body).await;
        assert_eq!(
            (r.status, r.code().as_str()),
            (StatusCode::BAD_REQUEST, code),
            "{:?}",
            r.body
        );
        assert!(r.body.len() < 1000, "the answer does not echo a huge value");
    }
    let r = t
        .req_as(
            Some(&sync),
            Method::POST,
            "/gateway/v1/ship-notes/notifications",
            &[],
            "{\"instanceId\": \"inst-1\", \"notif",
        )
        .await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);

    // Counted once each in the metrics.
    let m = t.req(Method::GET, "/metrics", &[], Body::empty()).await;
    let text = String::from_utf8_lossy(&m.body).to_string();
    assert!(
        text.lines()
            .any(|l| l == "outpost_notifications_received_total 4"),
        "{text}"
    );

    // Listed at the root, oldest first, readable on from a position.
    let list = |q: &'static str| {
        let t = &t;
        async move {
            t.req(
                Method::GET,
                &format!("/api/v1/connected-registries/ship-notes/notifications{q}"),
                &[],
                Body::empty(),
            )
            .await
        }
    };
    let r = list("").await;
    assert_eq!(r.status, StatusCode::OK, "{:?}", r.body);
    let all = r.json();
    let tags: Vec<&str> = all
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n["tag"].as_str().unwrap())
        .collect();
    assert_eq!(tags, ["v1", "v2", "v3", "v9"]);
    assert_eq!(all[0]["connectedRegistry"], "ship-notes");
    assert_eq!(all[0]["action"], "push");
    assert_eq!(
        all[0]["digest"],
        "sha256:aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa"
    );
    assert_eq!(all[0]["time"], "2026-11-28T10:00:00Z");
    assert!(all[0]["receivedTime"].as_str().unwrap().ends_with('Z'));
    let first = all[0]["seq"].as_i64().unwrap();
    let r = t
        .req(
            Method::GET,
            &format!("/api/v1/connected-registries/ship-notes/notifications?after={first}&n=1"),
            &[],
            Body::empty(),
        )
        .await;
    assert_eq!(r.json().as_array().unwrap().len(), 1);
    assert_eq!(r.json()[0]["tag"], "v2");
    for q in ["?n=0", "?n=1001", "?after=-1", "?after=x"] {
        assert_eq!(list(q).await.status, StatusCode::BAD_REQUEST, "{q}");
    }
    let r = t
        .req(
            Method::GET,
            "/api/v1/connected-registries/no-such/notifications",
            &[],
            Body::empty(),
        )
        .await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);
    // The management API is for the administrator only.
    let r = t
        .req_as(
            Some(&sync),
            Method::GET,
            "/api/v1/connected-registries/ship-notes/notifications",
            &[],
            Body::empty(),
        )
        .await;
    assert!(
        matches!(r.status, StatusCode::FORBIDDEN | StatusCode::UNAUTHORIZED),
        "{}",
        r.status
    );
}

/// A scheduled site that reported `Syncing` and then went quiet when its window closed (the
/// link often closes with the window, so the report saying it stopped never arrives) is
/// shown `Online` outside its window, not syncing.
#[tokio::test]
async fn a_site_last_heard_syncing_shows_online_outside_its_window() {
    let t = setup().await;
    let now = jiff::Timestamp::now().to_zoned(jiff::tz::TimeZone::UTC);
    // A one-hour window opening twelve hours from now: closed now.
    let opens = (now.hour() + 12) % 24;
    let sync = registry_with_sync_password(
        &t,
        "ship-sched",
        json!(["app"]),
        json!({"syncSchedule": format!("0 {opens} * * *"), "syncWindow": "PT1H"}),
    )
    .await;
    let send = |method: Method, path: &'static str, body: Value| {
        let t = &t;
        let sync = sync.clone();
        async move {
            t.req_as(Some(&sync), method, path, &[], body.to_string())
                .await
        }
    };
    let r = send(
        Method::POST,
        "/gateway/v1/ship-sched/activate",
        json!({"instanceId": "ship-a"}),
    )
    .await;
    assert_eq!(r.status, StatusCode::OK, "{}", msg(&r));
    let r = send(
        Method::PUT,
        "/gateway/v1/ship-sched/status",
        json!({"instanceId": "ship-a", "state": "Syncing"}),
    )
    .await;
    assert_eq!(r.status, StatusCode::OK, "{}", msg(&r));
    let r = t
        .req(
            Method::GET,
            "/api/v1/connected-registries/ship-sched",
            &[],
            Body::empty(),
        )
        .await;
    assert_eq!(r.json()["connectionState"], "Online", "{:?}", r.body);
}

/// An intermediate node keeps what its descendants reported across configuration fetches,
/// but not onto another resource of the same name (deleted and created again at the root).
#[tokio::test]
async fn a_recreated_descendant_does_not_inherit_the_old_ones_status() {
    let root = setup().await;
    assert_eq!(
        create(&root, json!({"name": "line-re", "repositories": ["app"]}))
            .await
            .status,
        StatusCode::CREATED
    );
    let cfg = root.control.sync_config("line-re").await.unwrap();
    assert!(cfg.created_ms.is_some(), "{cfg:?}");
    // The intermediate node: its descendant as the root configured it, then reporting.
    let site = setup().await;
    site.control
        .apply_descendants(std::slice::from_ref(&cfg))
        .await
        .unwrap();
    site.control
        .activate_connected_registry("line-re", "line-instance")
        .await
        .unwrap();
    let report = outpost_control::connected::StatusReport {
        instance_id: "line-instance".into(),
        state: Some("Online".into()),
        last_sync_time: Some("2026-11-29T03:00:00Z".into()),
        last_sync_result: Some("Failed".into()),
        status_details: Some(vec![outpost_control::connected::StatusDetail {
            kind: "Storage".into(),
            code: "DiskError".into(),
            description: "the disk is full".into(),
            timestamp: None,
            correlation_id: None,
        }]),
        ..Default::default()
    };
    site.control.report_status("line-re", report).await.unwrap();
    let shown = || async {
        site.get("/api/v1/connected-registries/line-re")
            .await
            .json()
    };
    // The same resource configured again: its status stays.
    site.control
        .apply_descendants(std::slice::from_ref(&cfg))
        .await
        .unwrap();
    let v = shown().await;
    assert_eq!(v["statusDetails"][0]["code"], "DiskError", "{v}");
    // Another resource under the same name: a clean slate.
    let recreated = outpost_control::connected::SyncConfig {
        created_ms: cfg.created_ms.map(|c| c + 1),
        ..cfg.clone()
    };
    site.control
        .apply_descendants(std::slice::from_ref(&recreated))
        .await
        .unwrap();
    let v = shown().await;
    // (Its sync token is installed by the sync, not here: that detail is this node's own.)
    assert!(!v["statusDetails"].to_string().contains("DiskError"), "{v}");
    assert_eq!(v["lastSyncTime"], Value::Null, "{v}");
    assert_eq!(v["lastSyncResult"], Value::Null, "{v}");
    assert_eq!(v["lastActivityTime"], Value::Null, "{v}");
    assert_ne!(v["connectionState"], "Online", "{v}");
}

/// The root deactivating a registry below an intermediate node: the node's configuration
/// changes, which ends the descendant's long-poll there at once (its next report is then
/// refused by the root); the record itself is left for the root to judge.
#[tokio::test]
async fn a_descendant_deactivated_at_the_root_is_woken_at_the_intermediate_node() {
    let root = setup().await;
    assert_eq!(
        create(&root, json!({"name": "line-de", "repositories": ["app"]}))
            .await
            .status,
        StatusCode::CREATED
    );
    let site = setup().await;
    let mut cfg = root.control.sync_config("line-de").await.unwrap();
    site.control
        .apply_descendants(std::slice::from_ref(&cfg))
        .await
        .unwrap();
    site.control
        .activate_connected_registry("line-de", "line-instance")
        .await
        .unwrap();
    // The root's view, active, changes nothing.
    cfg.activation_status = Some("Active".into());
    site.control
        .apply_descendants(std::slice::from_ref(&cfg))
        .await
        .unwrap();
    let show = || async {
        site.get("/api/v1/connected-registries/line-de")
            .await
            .json()
    };
    assert_eq!(show().await["activationStatus"], "Active");
    // Deactivated at the root.
    cfg.activation_status = Some("Inactive".into());
    let mut changes = site.control.subscribe();
    changes.borrow_and_update();
    site.control
        .apply_descendants(std::slice::from_ref(&cfg))
        .await
        .unwrap();
    assert!(changes.has_changed().unwrap(), "long-polls here are woken");
    // Not undone here from a configuration that may predate an activation relayed through
    // this node: the root refuses the instance's next report, and that marks it.
    assert_eq!(show().await["activationStatus"], "Active");
    // The configuration carries the root's activation, so the intermediate's copy changes
    // (its conditional fetch gets the new one, which wakes the descendant) when that does.
    root.control
        .activate_connected_registry("line-de", "line-instance")
        .await
        .unwrap();
    let at_root = || async { root.control.sync_config("line-de").await.unwrap() };
    let active = at_root().await;
    assert_eq!(active.activation_status.as_deref(), Some("Active"));
    root.control
        .deactivate_connected_registry("line-de")
        .await
        .unwrap();
    let inactive = at_root().await;
    assert_eq!(inactive.activation_status.as_deref(), Some("Inactive"));
    assert_ne!(active, inactive, "the configuration (and its ETag) changes");
}
