//! In-process tests of the whole `/v2/` API over the axum router (no sockets): every endpoint,
//! the spec's error codes and statuses, and hostile input that must leave the store intact.

#![allow(clippy::unwrap_used)] // tests fail loudly by design

mod common;

use axum::body::Body;
use axum::http::{Method, Request, StatusCode};
use bytes::Bytes;
use common::*;
use outpost_oci::{Algorithm, Digest};
use outpost_registry::RegistryConfig;
use serde_json::{Value, json};
use tower::ServiceExt;

#[tokio::test]
async fn base_endpoint_and_api_version_header() {
    let t = setup().await;
    let r = t.get("/v2/").await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.header("docker-distribution-api-version"), "registry/2.0");
    assert_eq!(t.get("/v2").await.status, StatusCode::OK);
    let r = t.get("/v2/nothing-here").await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);
    assert_eq!(r.header("docker-distribution-api-version"), "registry/2.0");
}

/// Outside `/v2/` too, every error has the registry's error shape: an unknown path, a method
/// a route does not take, an oversized token request, a body sent without credentials.
#[tokio::test]
async fn errors_outside_v2_have_the_error_shape() {
    let t = setup().await;
    let code = |r: &Resp| {
        r.json()["errors"][0]["code"]
            .as_str()
            .unwrap_or("")
            .to_string()
    };
    let text = |r: &Resp| {
        r.json()["errors"][0]["message"]
            .as_str()
            .unwrap_or("")
            .to_string()
    };
    for (m, path, status, want) in [
        (
            Method::GET,
            "/api/v1/nonexistent",
            StatusCode::NOT_FOUND,
            "/api/v1/nonexistent is not a path",
        ),
        (
            Method::GET,
            "/gateway/v1/x/nothing",
            StatusCode::NOT_FOUND,
            "/gateway/v1/x/nothing is not a path",
        ),
        (
            Method::GET,
            "/elsewhere",
            StatusCode::NOT_FOUND,
            "/elsewhere is not a path",
        ),
        (
            Method::DELETE,
            "/gateway/v1/x/config",
            StatusCode::METHOD_NOT_ALLOWED,
            "/gateway/v1/x/config does not take DELETE",
        ),
        (
            Method::GET,
            "/api/v1/gc",
            StatusCode::METHOD_NOT_ALLOWED,
            "/api/v1/gc does not take GET",
        ),
        (
            Method::DELETE,
            "/healthz",
            StatusCode::METHOD_NOT_ALLOWED,
            "/healthz does not take DELETE",
        ),
        (
            Method::GET,
            "/api/v1/tokens/%FF",
            StatusCode::BAD_REQUEST,
            "the request path is invalid",
        ),
        (
            Method::GET,
            "/gateway/v1/%FF%FE/config",
            StatusCode::BAD_REQUEST,
            "the request path is invalid",
        ),
    ] {
        let r = t.req(m.clone(), path, &[], Body::empty()).await;
        assert_eq!(r.status, status, "{m} {path}");
        assert!(text(&r).contains(want), "{m} {path}: {:?}", r.body);
        assert!(!code(&r).is_empty(), "{m} {path}");
    }
    let r = t
        .req_as(
            None,
            Method::POST,
            "/oauth2/token",
            &[
                ("content-length", "200000"),
                ("content-type", "application/x-www-form-urlencoded"),
            ],
            vec![b'a'; 200_000],
        )
        .await;
    assert_eq!(r.status, StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(code(&r), "SIZE_INVALID");
    for (m, path) in [
        (Method::POST, "/api/v1/tokens"),
        (Method::PUT, "/gateway/v1/ship-0001/status"),
    ] {
        let r = t.req_as(None, m, path, &[], vec![b'{'; 100_000]).await;
        assert_eq!(r.status, StatusCode::UNAUTHORIZED, "{path}");
        assert_eq!(code(&r), "UNAUTHORIZED", "{path}");
    }
}

/// `/healthz` says the process answers; `/readyz` also that it can serve: the database
/// answers and the blob store can be read, else 503 with the reason.
#[tokio::test]
async fn readiness_checks_the_database_and_the_blob_store() {
    let t = setup().await;
    assert_eq!(t.get("/healthz").await.status, StatusCode::OK);
    let r = t.get("/readyz").await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(&r.body[..], b"ok\n");
    let blobs = t.dir.path().join("blobs");
    let moved = t.dir.path().join("blobs-away");
    std::fs::rename(&blobs, &moved).unwrap();
    let r = t.get("/readyz").await;
    assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE);
    let text = String::from_utf8_lossy(&r.body).to_string();
    assert!(
        text.contains("blob store") && text.contains("blobs"),
        "{text}"
    );
    assert_eq!(t.get("/healthz").await.status, StatusCode::OK);
    std::fs::rename(&moved, &blobs).unwrap();
    assert_eq!(t.get("/readyz").await.status, StatusCode::OK);
}

#[tokio::test]
async fn monolithic_upload_then_pull_with_ranges() {
    let t = setup().await;
    let data: Vec<u8> = (0..10_000u32).map(|i| (i % 251) as u8).collect();
    let d = t.push_blob("lib/app", &data).await;

    let r = t
        .req(
            Method::HEAD,
            &format!("/v2/lib/app/blobs/{d}"),
            &[],
            Body::empty(),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.header("content-length"), "10000");
    assert_eq!(r.header("docker-content-digest"), d.to_string());
    assert!(r.body.is_empty());

    let r = t.get(&format!("/v2/lib/app/blobs/{d}")).await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(&r.body[..], &data[..]);

    let r = t
        .req(
            Method::GET,
            &format!("/v2/lib/app/blobs/{d}"),
            &[("range", "bytes=100-199")],
            Body::empty(),
        )
        .await;
    assert_eq!(r.status, StatusCode::PARTIAL_CONTENT);
    assert_eq!(r.header("content-range"), "bytes 100-199/10000");
    assert_eq!(&r.body[..], &data[100..200]);

    let r = t
        .req(
            Method::GET,
            &format!("/v2/lib/app/blobs/{d}"),
            &[("range", "bytes=-10")],
            Body::empty(),
        )
        .await;
    assert_eq!(&r.body[..], &data[9990..]);

    let r = t
        .req(
            Method::GET,
            &format!("/v2/lib/app/blobs/{d}"),
            &[("range", "bytes=10000-")],
            Body::empty(),
        )
        .await;
    assert_eq!(r.status, StatusCode::RANGE_NOT_SATISFIABLE);
    assert_eq!(r.header("content-range"), "bytes */10000");
    // Ranges that are not single byte ranges are ignored (RFC 9110 §14.2): the whole blob.
    for ignored in ["items=0-1", "bytes=5-1", "bytes=a-b", "bytes=0-1,5-6"] {
        let r = t
            .req(
                Method::GET,
                &format!("/v2/lib/app/blobs/{d}"),
                &[("range", ignored)],
                Body::empty(),
            )
            .await;
        assert_eq!(r.status, StatusCode::OK, "Range: {ignored}");
        assert_eq!(r.body.len(), 10000, "Range: {ignored}");
    }

    // Another repository cannot read it without a mount.
    let r = t.get(&format!("/v2/other/blobs/{d}")).await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);
    assert_eq!(r.code(), "BLOB_UNKNOWN");
}

#[tokio::test]
async fn single_request_post_with_digest() {
    let t = setup().await;
    let data = b"single request upload";
    let d = Digest::sha256_of(data);
    let r = t
        .req(
            Method::POST,
            &format!("/v2/a/blobs/uploads/?digest={d}"),
            &[],
            data.to_vec(),
        )
        .await;
    assert_eq!(r.status, StatusCode::CREATED);
    assert_eq!(r.header("location"), format!("/v2/a/blobs/{d}"));
    assert_eq!(&t.get(&format!("/v2/a/blobs/{d}")).await.body[..], data);
}

#[tokio::test]
async fn sha512_blobs() {
    let t = setup().await;
    let data = b"hashed with sha512";
    let d = Digest::of(Algorithm::Sha512, data);
    let r = t
        .req(
            Method::POST,
            &format!("/v2/a/blobs/uploads/?digest={d}"),
            &[],
            data.to_vec(),
        )
        .await;
    assert_eq!(r.status, StatusCode::CREATED, "{:?}", r.body);
    assert_eq!(&t.get(&format!("/v2/a/blobs/{d}")).await.body[..], data);
}

#[tokio::test]
async fn chunked_upload_with_status_and_out_of_order_chunk() {
    let t = setup().await;
    let data: Vec<u8> = (0..3000u32).map(|i| (i * 7 % 256) as u8).collect();
    let d = Digest::sha256_of(&data);
    let r = t
        .req(Method::POST, "/v2/c/blobs/uploads/", &[], Body::empty())
        .await;
    let loc = r.header("location").to_string();
    assert!(!r.header("docker-upload-uuid").is_empty());

    let r = t
        .req(
            Method::PATCH,
            &loc,
            &[("content-range", "0-999"), ("content-length", "1000")],
            data[..1000].to_vec(),
        )
        .await;
    assert_eq!(r.status, StatusCode::ACCEPTED);
    assert_eq!(r.header("range"), "0-999");

    // A chunk that does not start at the current offset: 416 with the current range.
    let r = t
        .req(
            Method::PATCH,
            &loc,
            &[("content-range", "2000-2999"), ("content-length", "1000")],
            data[2000..].to_vec(),
        )
        .await;
    assert_eq!(r.status, StatusCode::RANGE_NOT_SATISFIABLE);
    assert_eq!(r.header("range"), "0-999");
    assert_eq!(r.code(), "BLOB_UPLOAD_INVALID");
    assert_eq!(r.header("location"), loc);
    assert!(!r.header("docker-upload-uuid").is_empty());
    // A malformed Content-Range is a 416 too, and also says where the upload is.
    for bad in ["9-5", "bytes=a-b", "1000-"] {
        let r = t
            .req(
                Method::PATCH,
                &loc,
                &[("content-range", bad), ("content-length", "3")],
                b"abc".to_vec(),
            )
            .await;
        assert_eq!(r.status, StatusCode::RANGE_NOT_SATISFIABLE, "{bad}");
        assert_eq!(r.header("range"), "0-999", "{bad}");
        assert_eq!(r.header("location"), loc, "{bad}");
        assert!(!r.header("docker-upload-uuid").is_empty(), "{bad}");
        assert!(
            r.message().contains("Content-Range"),
            "{bad}: {}",
            r.message()
        );
    }

    // Content-Length disagreeing with Content-Range.
    let r = t
        .req(
            Method::PATCH,
            &loc,
            &[("content-range", "1000-1999"), ("content-length", "5")],
            vec![0u8; 5],
        )
        .await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);

    let r = t.get(&loc).await;
    assert_eq!(r.status, StatusCode::NO_CONTENT);
    assert_eq!(r.header("range"), "0-999");

    // A streamed PATCH (no Content-Range) appends.
    let r = t
        .req(Method::PATCH, &loc, &[], data[1000..2000].to_vec())
        .await;
    assert_eq!(r.header("range"), "0-1999");

    // Sent without a Content-Length (chunked transfer encoding), a chunk is held to its
    // Content-Range as it arrives: shorter or longer, refused, and the upload keeps what it had.
    for body in [vec![1u8; 5], vec![1u8; 150]] {
        let r = t
            .req(
                Method::PATCH,
                &loc,
                &[("content-range", "2000-2099")],
                body.clone(),
            )
            .await;
        assert_eq!(
            r.status,
            StatusCode::BAD_REQUEST,
            "{} bytes: {:?}",
            body.len(),
            r.body
        );
        assert!(
            r.message().contains("Content-Range says"),
            "{}",
            r.message()
        );
        assert_eq!(t.get(&loc).await.header("range"), "0-1999");
    }

    // The closing PUT's last chunk is checked as a PATCH's is: out of order, a 416 that keeps
    // the upload; a length that disagrees with its range, a 400 that keeps it too.
    let r = t
        .req(
            Method::PUT,
            &format!("{loc}?digest={d}"),
            &[("content-range", "2500-2999"), ("content-length", "500")],
            data[2500..].to_vec(),
        )
        .await;
    assert_eq!(r.status, StatusCode::RANGE_NOT_SATISFIABLE, "{:?}", r.body);
    assert_eq!(r.header("range"), "0-1999");
    assert_eq!(r.header("location"), loc);
    let r = t
        .req(
            Method::PUT,
            &format!("{loc}?digest={d}"),
            &[("content-range", "2000-2499"), ("content-length", "1000")],
            data[2000..].to_vec(),
        )
        .await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST, "{:?}", r.body);
    assert_eq!(r.code(), "SIZE_INVALID");
    assert_eq!(t.get(&loc).await.header("range"), "0-1999");

    let r = t
        .req(
            Method::PUT,
            &format!("{loc}?digest={d}"),
            &[("content-range", "2000-2999"), ("content-length", "1000")],
            data[2000..].to_vec(),
        )
        .await;
    assert_eq!(r.status, StatusCode::CREATED, "{:?}", r.body);
    assert_eq!(
        &t.get(&format!("/v2/c/blobs/{d}")).await.body[..],
        &data[..]
    );
    // The session is gone after completion.
    assert_eq!(t.get(&loc).await.code(), "BLOB_UPLOAD_UNKNOWN");
}

#[tokio::test]
async fn cancelled_upload_is_gone() {
    let t = setup().await;
    let r = t
        .req(Method::POST, "/v2/c/blobs/uploads/", &[], Body::empty())
        .await;
    let loc = r.header("location").to_string();
    t.req(Method::PATCH, &loc, &[], b"abc".to_vec()).await;
    let r = t.req(Method::DELETE, &loc, &[], Body::empty()).await;
    assert_eq!(r.status, StatusCode::NO_CONTENT);
    let r = t.get(&loc).await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);
    assert_eq!(r.code(), "BLOB_UPLOAD_UNKNOWN");
    // An upload id from another repository is not visible here.
    let r = t
        .req(Method::POST, "/v2/c/blobs/uploads/", &[], Body::empty())
        .await;
    let other = r.header("location").replace("/v2/c/", "/v2/d/");
    assert_eq!(t.get(&other).await.code(), "BLOB_UPLOAD_UNKNOWN");
    // Unknown and hostile ids.
    assert_eq!(
        t.get("/v2/c/blobs/uploads/00000000-0000-0000-0000-000000000000")
            .await
            .status,
        StatusCode::NOT_FOUND
    );
    let r = t.get("/v2/c/blobs/uploads/..%2F..%2Fmeta.db").await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);
    assert_eq!(
        r.code(),
        "BLOB_UPLOAD_UNKNOWN",
        "a hostile id is just an unknown upload"
    );
    let r = t
        .req(
            Method::PATCH,
            "/v2/c/blobs/uploads/not_an_id!",
            &[],
            b"abc".to_vec(),
        )
        .await;
    assert_eq!(r.code(), "BLOB_UPLOAD_UNKNOWN");
}

/// Files under uploads/ (sessions and their owner files).
fn upload_files(t: &T) -> usize {
    std::fs::read_dir(t.dir.path().join("uploads"))
        .map(|d| d.count())
        .unwrap_or(0)
}

#[tokio::test]
async fn a_failed_single_request_upload_leaves_no_session_behind() {
    let t = setup().await;
    let before = upload_files(&t);
    // A digest that does not parse: refused before any session exists.
    let r = t
        .req(
            Method::POST,
            "/v2/a/blobs/uploads/?digest=sha256:XYZ",
            &[],
            b"bytes".to_vec(),
        )
        .await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    assert_eq!(r.code(), "DIGEST_INVALID");
    // A digest the bytes do not match: the session it opened is cancelled.
    let claimed = Digest::sha256_of(b"claimed");
    let r = t
        .req(
            Method::POST,
            &format!("/v2/a/blobs/uploads/?digest={claimed}"),
            &[],
            b"other".to_vec(),
        )
        .await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    assert_eq!(upload_files(&t), before, "no session or owner file left");
}

#[tokio::test]
async fn two_requests_completing_one_upload_get_201_and_404_never_500() {
    let t = setup().await;
    let data = vec![5u8; 3 << 20];
    let d = Digest::sha256_of(&data);
    let r = t
        .req(Method::POST, "/v2/a/blobs/uploads/", &[], Body::empty())
        .await;
    let loc = r.header("location").to_string();
    let r = t.req(Method::PATCH, &loc, &[], data.clone()).await;
    assert_eq!(r.status, StatusCode::ACCEPTED);
    let sep = if loc.contains('?') { '&' } else { '?' };
    let put = format!("{loc}{sep}digest={d}");
    let (a, b) = tokio::join!(
        t.req(Method::PUT, &put, &[], Body::empty()),
        t.req(Method::PUT, &put, &[], Body::empty())
    );
    let mut statuses = [a.status.as_u16(), b.status.as_u16()];
    statuses.sort();
    assert_eq!(statuses, [201, 404], "{} / {}", a.code(), b.code());
    assert_eq!(
        t.get(&format!("/v2/a/blobs/{d}")).await.body.len(),
        data.len()
    );
}

#[tokio::test]
async fn digest_mismatch_never_becomes_visible() {
    let t = setup().await;
    let claimed = Digest::sha256_of(b"what the client claims");
    let r = t
        .req(
            Method::POST,
            &format!("/v2/a/blobs/uploads/?digest={claimed}"),
            &[],
            b"other bytes".to_vec(),
        )
        .await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    assert_eq!(r.code(), "DIGEST_INVALID");
    assert_eq!(
        t.get(&format!("/v2/a/blobs/{claimed}")).await.status,
        StatusCode::NOT_FOUND
    );
    let actual = Digest::sha256_of(b"other bytes");
    assert_eq!(
        t.get(&format!("/v2/a/blobs/{actual}")).await.status,
        StatusCode::NOT_FOUND
    );

    // Missing and malformed digests on PUT.
    let r = t
        .req(Method::POST, "/v2/a/blobs/uploads/", &[], Body::empty())
        .await;
    let loc = r.header("location").to_string();
    assert_eq!(
        t.req(Method::PUT, &loc, &[], b"x".to_vec()).await.code(),
        "DIGEST_INVALID"
    );
    let r = t
        .req(
            Method::PUT,
            &format!("{loc}?digest=md5:abc"),
            &[],
            b"x".to_vec(),
        )
        .await;
    assert_eq!(r.code(), "DIGEST_INVALID");
    assert!(
        r.json()["errors"][0]["message"]
            .as_str()
            .unwrap()
            .contains("sha256")
    );
}

#[tokio::test]
async fn truncated_body_rolls_back_the_chunk() {
    let t = setup().await;
    let r = t
        .req(Method::POST, "/v2/a/blobs/uploads/", &[], Body::empty())
        .await;
    let loc = r.header("location").to_string();
    t.req(Method::PATCH, &loc, &[], b"0123456789".to_vec())
        .await;
    // A body that fails half-way, as a client disconnecting mid-chunk does.
    let chunks: Vec<Result<Bytes, std::io::Error>> = vec![
        Ok(Bytes::from_static(b"abcdef")),
        Err(std::io::Error::new(
            std::io::ErrorKind::ConnectionReset,
            "client went away",
        )),
    ];
    let body = Body::from_stream(futures_util::stream::iter(chunks));
    let r = t.req(Method::PATCH, &loc, &[], body).await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    assert_eq!(r.code(), "BLOB_UPLOAD_INVALID");
    let r = t.get(&loc).await;
    assert_eq!(
        r.header("range"),
        "0-9",
        "the partial chunk must be rolled back"
    );
    // The upload still completes correctly.
    let d = Digest::sha256_of(b"0123456789abcdef");
    let r = t
        .req(
            Method::PUT,
            &format!("{loc}?digest={d}"),
            &[],
            b"abcdef".to_vec(),
        )
        .await;
    assert_eq!(r.status, StatusCode::CREATED);
}

#[tokio::test]
async fn oversized_blob_is_refused() {
    let t = setup_with(RegistryConfig {
        fsync: false,
        max_blob_bytes: Some(100),
        ..Default::default()
    })
    .await;
    let data = vec![7u8; 101];
    let d = Digest::sha256_of(&data);
    let r = t
        .req(
            Method::POST,
            &format!("/v2/a/blobs/uploads/?digest={d}"),
            &[],
            data,
        )
        .await;
    assert_eq!(r.status, StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(r.code(), "SIZE_INVALID");
    assert_eq!(
        t.get(&format!("/v2/a/blobs/{d}")).await.status,
        StatusCode::NOT_FOUND
    );
}

#[tokio::test]
async fn concurrent_uploads_of_the_same_blob() {
    let t = setup().await;
    let data: Vec<u8> = (0..200_000u32).map(|i| (i % 13) as u8).collect();
    let d = Digest::sha256_of(&data);
    let mut tasks = Vec::new();
    for i in 0..8 {
        let app = t.app.clone();
        let data = data.clone();
        let d = d.clone();
        tasks.push(tokio::spawn(async move {
            let repo = format!("r{}", i % 2);
            let req = Request::post(format!("/v2/{repo}/blobs/uploads/?digest={d}"))
                .header("authorization", basic("admin", ADMIN_PASSWORD))
                .body(Body::from(data))
                .unwrap();
            app.oneshot(req).await.unwrap().status()
        }));
    }
    for task in tasks {
        assert_eq!(task.await.unwrap(), StatusCode::CREATED);
    }
    for repo in ["r0", "r1"] {
        assert_eq!(
            &t.get(&format!("/v2/{repo}/blobs/{d}")).await.body[..],
            &data[..]
        );
    }
}

#[tokio::test]
async fn cross_repository_mount_and_fallback() {
    let t = setup().await;
    let d = t.push_blob("src", b"shared layer").await;
    let r = t
        .req(
            Method::POST,
            &format!("/v2/dst/blobs/uploads/?mount={d}&from=src"),
            &[],
            Body::empty(),
        )
        .await;
    assert_eq!(r.status, StatusCode::CREATED);
    assert_eq!(r.header("location"), format!("/v2/dst/blobs/{d}"));
    assert_eq!(
        &t.get(&format!("/v2/dst/blobs/{d}")).await.body[..],
        b"shared layer"
    );

    // Source without the blob, or an invalid source name: a normal upload starts instead.
    let missing = Digest::sha256_of(b"nowhere");
    for from in ["src", "nope", "..%2Fsrc"] {
        let r = t
            .req(
                Method::POST,
                &format!("/v2/dst/blobs/uploads/?mount={missing}&from={from}"),
                &[],
                Body::empty(),
            )
            .await;
        assert_eq!(r.status, StatusCode::ACCEPTED, "from={from}");
        assert!(r.header("location").starts_with("/v2/dst/blobs/uploads/"));
    }
    // So does an invalid digest to mount (the spec: "invalid repository or digest").
    for mount in ["sha256:zz", "nonsense", ""] {
        let r = t
            .req(
                Method::POST,
                &format!("/v2/dst/blobs/uploads/?mount={mount}&from=src"),
                &[],
                Body::empty(),
            )
            .await;
        assert_eq!(r.status, StatusCode::ACCEPTED, "mount={mount}");
        assert!(r.header("location").starts_with("/v2/dst/blobs/uploads/"));
    }
}

/// A client that holds a manifest or blob already (`If-None-Match` with its ETag) gets a
/// `304` and no body; another ETag, or none, gets the content.
#[tokio::test]
async fn if_none_match_answers_not_modified() {
    let t = setup().await;
    let d = t.push_blob("a", b"cached layer").await;
    let (_, md) = t.push_image("a", "v1", "one").await;
    for (path, digest) in [
        (format!("/v2/a/blobs/{d}"), d.to_string()),
        ("/v2/a/manifests/v1".to_string(), md.to_string()),
        (format!("/v2/a/manifests/{md}"), md.to_string()),
    ] {
        for inm in [
            format!("\"{digest}\""),
            format!("W/\"{digest}\""),
            format!("\"sha256:00\", \"{digest}\""),
            "*".to_string(),
        ] {
            for m in [Method::GET, Method::HEAD] {
                let r = t
                    .req(m.clone(), &path, &[("if-none-match", &inm)], Body::empty())
                    .await;
                assert_eq!(r.status, StatusCode::NOT_MODIFIED, "{m} {path} {inm}");
                assert!(r.body.is_empty());
                assert_eq!(r.header("etag"), format!("\"{digest}\""));
                assert_eq!(r.header("docker-content-digest"), digest);
            }
        }
        let r = t
            .req(
                Method::GET,
                &path,
                &[("if-none-match", "\"sha256:0000\"")],
                Body::empty(),
            )
            .await;
        assert_eq!(r.status, StatusCode::OK, "{path}");
        assert!(!r.body.is_empty());
    }
}

#[tokio::test]
async fn blob_delete() {
    let t = setup().await;
    let d = t.push_blob("a", b"to delete").await;
    t.req(
        Method::POST,
        &format!("/v2/b/blobs/uploads/?mount={d}&from=a"),
        &[],
        Body::empty(),
    )
    .await;
    let r = t
        .req(
            Method::DELETE,
            &format!("/v2/a/blobs/{d}"),
            &[],
            Body::empty(),
        )
        .await;
    assert_eq!(r.status, StatusCode::ACCEPTED);
    assert_eq!(
        t.get(&format!("/v2/a/blobs/{d}")).await.status,
        StatusCode::NOT_FOUND
    );
    assert_eq!(
        t.req(
            Method::DELETE,
            &format!("/v2/a/blobs/{d}"),
            &[],
            Body::empty()
        )
        .await
        .code(),
        "BLOB_UNKNOWN"
    );
    // Still readable where it is still linked.
    assert_eq!(
        &t.get(&format!("/v2/b/blobs/{d}")).await.body[..],
        b"to delete"
    );
}

#[tokio::test]
async fn manifests_by_tag_and_digest() {
    let t = setup().await;
    let (bytes, digest) = t.push_image("app", "v1", "one").await;
    for reference in ["v1".to_string(), digest.to_string()] {
        let r = t.get(&format!("/v2/app/manifests/{reference}")).await;
        assert_eq!(r.status, StatusCode::OK);
        assert_eq!(&r.body[..], &bytes[..], "exact bytes are served");
        assert_eq!(r.header("content-type"), OCI_MANIFEST);
        assert_eq!(r.header("docker-content-digest"), digest.to_string());
        let r = t
            .req(
                Method::HEAD,
                &format!("/v2/app/manifests/{reference}"),
                &[],
                Body::empty(),
            )
            .await;
        assert_eq!(r.status, StatusCode::OK);
        assert_eq!(r.header("content-length"), bytes.len().to_string());
        assert!(r.body.is_empty());
    }
    // Push by digest.
    let r = t
        .push_manifest("app", &digest.to_string(), OCI_MANIFEST, &bytes)
        .await;
    assert_eq!(r.status, StatusCode::CREATED);
    assert_eq!(r.header("location"), format!("/v2/app/manifests/{digest}"));

    let r = t.get("/v2/app/manifests/v2").await;
    assert_eq!(
        (r.status, r.code().as_str()),
        (StatusCode::NOT_FOUND, "MANIFEST_UNKNOWN")
    );
    let r = t.get("/v2/ghost/manifests/v1").await;
    assert_eq!(
        (r.status, r.code().as_str()),
        (StatusCode::NOT_FOUND, "NAME_UNKNOWN")
    );
    // A DELETE says the same as a GET.
    let r = t
        .req(
            Method::DELETE,
            &format!("/v2/ghost/manifests/{digest}"),
            &[],
            Body::empty(),
        )
        .await;
    assert_eq!(
        (r.status, r.code().as_str()),
        (StatusCode::NOT_FOUND, "NAME_UNKNOWN")
    );
    // And for a blob: the repository is what is unknown; in a known one, the blob.
    let blob = format!("sha256:{}", "0".repeat(64));
    for (repo, code) in [("ghost", "NAME_UNKNOWN"), ("app", "BLOB_UNKNOWN")] {
        let r = t
            .req(
                Method::DELETE,
                &format!("/v2/{repo}/blobs/{blob}"),
                &[],
                Body::empty(),
            )
            .await;
        assert_eq!((r.status, r.code().as_str()), (StatusCode::NOT_FOUND, code));
    }
    let r = t
        .req(Method::HEAD, "/v2/app/manifests/v2", &[], Body::empty())
        .await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);
    assert!(r.body.is_empty());
}

#[tokio::test]
async fn moving_a_tag_is_seen_immediately() {
    let t = setup().await;
    let (_, first) = t.push_image("mv", "latest", "one").await;
    // Read twice so the answer is cached.
    for _ in 0..2 {
        assert_eq!(
            t.get("/v2/mv/manifests/latest")
                .await
                .header("docker-content-digest"),
            first.to_string()
        );
    }
    let (_, second) = t.push_image("mv", "latest", "two").await;
    assert_ne!(first, second);
    assert_eq!(
        t.get("/v2/mv/manifests/latest")
            .await
            .header("docker-content-digest"),
        second.to_string()
    );
    t.req(
        Method::DELETE,
        "/v2/mv/manifests/latest",
        &[],
        Body::empty(),
    )
    .await;
    assert_eq!(
        t.get("/v2/mv/manifests/latest").await.status,
        StatusCode::NOT_FOUND
    );
    assert_eq!(
        t.get(&format!("/v2/mv/manifests/{first}")).await.status,
        StatusCode::OK
    );
}

#[tokio::test]
async fn docker_schema2_and_manifest_list() {
    let t = setup().await;
    let config = t.push_blob("d", b"{}").await;
    let layer = t.push_blob("d", b"layer").await;
    let m = json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.docker.distribution.manifest.v2+json",
        "config": {"mediaType": "application/vnd.docker.container.image.v1+json", "digest": config.to_string(), "size": 2},
        "layers": [{"mediaType": "application/vnd.docker.image.rootfs.diff.tar.gzip", "digest": layer.to_string(), "size": 5}]
    });
    let mb = serde_json::to_vec(&m).unwrap();
    let md = Digest::sha256_of(&mb);
    let r = t
        .push_manifest(
            "d",
            "amd64",
            "application/vnd.docker.distribution.manifest.v2+json",
            &mb,
        )
        .await;
    assert_eq!(r.status, StatusCode::CREATED, "{:?}", r.body);
    let list = json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.docker.distribution.manifest.list.v2+json",
        "manifests": [{"mediaType": "application/vnd.docker.distribution.manifest.v2+json", "digest": md.to_string(), "size": mb.len(), "platform": {"architecture": "amd64", "os": "linux"}}]
    });
    let lb = serde_json::to_vec(&list).unwrap();
    let r = t
        .push_manifest(
            "d",
            "latest",
            "application/vnd.docker.distribution.manifest.list.v2+json",
            &lb,
        )
        .await;
    assert_eq!(r.status, StatusCode::CREATED, "{:?}", r.body);
    let r = t.get("/v2/d/manifests/latest").await;
    assert_eq!(
        r.header("content-type"),
        "application/vnd.docker.distribution.manifest.list.v2+json"
    );
    assert_eq!(&r.body[..], &lb[..]);
}

#[tokio::test]
async fn manifest_validation_errors() {
    let t = setup().await;
    let config = t.push_blob("v", b"cfg").await;
    let missing = Digest::sha256_of(b"never pushed");

    // A layer that was never pushed.
    let m = image_manifest(&config, &missing, None);
    let r = t.push_manifest("v", "t", OCI_MANIFEST, &m).await;
    assert_eq!(
        (r.status, r.code().as_str()),
        (StatusCode::BAD_REQUEST, "MANIFEST_BLOB_UNKNOWN")
    );
    assert_eq!(
        r.json()["errors"][0]["detail"]["digest"],
        missing.to_string()
    );

    // An index whose child manifest is missing.
    let idx = serde_json::to_vec(&json!({"schemaVersion": 2, "mediaType": OCI_INDEX,
        "manifests": [{"mediaType": OCI_MANIFEST, "digest": missing.to_string(), "size": 3}]}))
    .unwrap();
    let r = t.push_manifest("v", "t", OCI_INDEX, &idx).await;
    assert_eq!(r.code(), "MANIFEST_BLOB_UNKNOWN");

    // Invalid JSON, wrong schemaVersion, a Content-Type that contradicts the body.
    assert_eq!(
        t.push_manifest("v", "t", OCI_MANIFEST, b"{not json")
            .await
            .code(),
        "MANIFEST_INVALID"
    );
    assert_eq!(
        t.push_manifest("v", "t", OCI_MANIFEST, b"{\"schemaVersion\":1}")
            .await
            .code(),
        "MANIFEST_INVALID"
    );
    let layer = t.push_blob("v", b"l").await;
    let good = image_manifest(&config, &layer, None);
    let r = t
        .push_manifest(
            "v",
            "t",
            "application/vnd.docker.distribution.manifest.v2+json",
            &good,
        )
        .await;
    assert_eq!(r.code(), "MANIFEST_INVALID");
    assert!(
        r.json()["errors"][0]["message"]
            .as_str()
            .unwrap()
            .contains("does not match")
    );

    // Pushed by a digest that is not the digest of the body.
    let r = t
        .push_manifest("v", &missing.to_string(), OCI_MANIFEST, &good)
        .await;
    assert_eq!(r.code(), "DIGEST_INVALID");

    // Bad tag and bad name.
    assert_eq!(
        t.push_manifest("v", "-bad", OCI_MANIFEST, &good)
            .await
            .code(),
        "TAG_INVALID"
    );
    assert_eq!(
        t.push_manifest("V", "t", OCI_MANIFEST, &good).await.code(),
        "NAME_INVALID"
    );

    // None of that stored anything.
    assert_eq!(t.get("/v2/v/tags/list").await.json()["tags"], json!([]));
    assert!(
        t.registry
            .meta()
            .events_after(0, 100)
            .await
            .unwrap()
            .is_empty()
    );
}

#[tokio::test]
async fn oversized_manifest_is_refused() {
    let t = setup_with(RegistryConfig {
        fsync: false,
        max_manifest_bytes: 1024,
        ..Default::default()
    })
    .await;
    let config = t.push_blob("v", b"cfg").await;
    let layer = t.push_blob("v", b"l").await;
    let mut m: Value = serde_json::from_slice(&image_manifest(&config, &layer, None)).unwrap();
    m["annotations"] = json!({"padding": "x".repeat(2000)});
    let r = t
        .push_manifest("v", "big", OCI_MANIFEST, &serde_json::to_vec(&m).unwrap())
        .await;
    assert_eq!(
        (r.status, r.code().as_str()),
        (StatusCode::PAYLOAD_TOO_LARGE, "SIZE_INVALID")
    );
    // Also when the client does not announce the length (chunked body).
    let body = Body::from_stream(futures_util::stream::iter(vec![Ok::<_, std::io::Error>(
        Bytes::from(vec![b' '; 2000]),
    )]));
    let r = t
        .req(
            Method::PUT,
            "/v2/v/manifests/big",
            &[("content-type", OCI_MANIFEST)],
            body,
        )
        .await;
    assert_eq!(r.status, StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(
        t.get("/v2/v/manifests/big").await.status,
        StatusCode::NOT_FOUND
    );
}

#[tokio::test]
async fn delete_tag_and_manifest() {
    let t = setup().await;
    let (_, digest) = t.push_image("del", "v1", "a").await;
    let r = t
        .push_manifest(
            "del",
            "v2",
            OCI_MANIFEST,
            &t.get(&format!("/v2/del/manifests/{digest}")).await.body,
        )
        .await;
    assert_eq!(r.status, StatusCode::CREATED);

    // Deleting a tag leaves the manifest and the other tag.
    let r = t
        .req(Method::DELETE, "/v2/del/manifests/v1", &[], Body::empty())
        .await;
    assert_eq!(r.status, StatusCode::ACCEPTED);
    assert_eq!(
        t.get("/v2/del/manifests/v1").await.status,
        StatusCode::NOT_FOUND
    );
    assert_eq!(t.get("/v2/del/manifests/v2").await.status, StatusCode::OK);

    // Deleting by digest removes the manifest and every tag.
    let r = t
        .req(
            Method::DELETE,
            &format!("/v2/del/manifests/{digest}"),
            &[],
            Body::empty(),
        )
        .await;
    assert_eq!(r.status, StatusCode::ACCEPTED);
    assert_eq!(
        t.get(&format!("/v2/del/manifests/{digest}")).await.code(),
        "MANIFEST_UNKNOWN"
    );
    assert_eq!(t.get("/v2/del/tags/list").await.json()["tags"], json!([]));
    let r = t
        .req(
            Method::DELETE,
            &format!("/v2/del/manifests/{digest}"),
            &[],
            Body::empty(),
        )
        .await;
    assert_eq!(r.code(), "MANIFEST_UNKNOWN");

    // The event log recorded every change in order.
    let kinds: Vec<(String, Option<String>)> = t
        .registry
        .meta()
        .events_after(0, 100)
        .await
        .unwrap()
        .into_iter()
        .map(|e| (e.kind, e.tag))
        .collect();
    let s = |k: &str, tag: Option<&str>| (k.to_string(), tag.map(String::from));
    assert_eq!(
        kinds,
        vec![
            s("manifest_put", None),
            s("tag_set", Some("v1")),
            s("tag_set", Some("v2")),
            s("tag_removed", Some("v1")),
            s("tag_removed", Some("v2")),
            s("manifest_deleted", None),
        ]
    );
}

#[tokio::test]
async fn a_manifest_an_index_lists_is_not_deleted_before_the_index() {
    let t = setup().await;
    let (bytes, child) = t.push_image("plat", "amd64", "a").await;
    let entry =
        json!({"mediaType": OCI_MANIFEST, "digest": child.to_string(), "size": bytes.len()});
    let idx = serde_json::to_vec(&json!({"schemaVersion": 2, "mediaType": OCI_INDEX,
        "manifests": [entry]}))
    .unwrap();
    let r = t.push_manifest("plat", "1.0", OCI_INDEX, &idx).await;
    assert_eq!(r.status, StatusCode::CREATED);
    let index = Digest::sha256_of(&idx);
    let t = &t;
    let delete = |d: String| async move {
        t.req(
            Method::DELETE,
            &format!("/v2/plat/manifests/{d}"),
            &[],
            Body::empty(),
        )
        .await
    };

    // The child: refused, naming the index and its tag; nothing changes.
    let r = delete(child.to_string()).await;
    assert_eq!(
        (r.status, r.code().as_str()),
        (StatusCode::CONFLICT, "MANIFEST_REFERENCED")
    );
    let msg = r.json()["errors"][0]["message"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(
        msg.contains(&index.to_string())
            && msg.contains("tag 1.0")
            && msg.contains("delete the index first"),
        "{msg}"
    );
    assert_eq!(r.json()["errors"][0]["detail"]["index"], index.to_string());
    assert_eq!(
        t.get(&format!("/v2/plat/manifests/{child}")).await.status,
        StatusCode::OK
    );
    assert_eq!(
        t.get("/v2/plat/manifests/amd64").await.status,
        StatusCode::OK
    );
    // Untagging it is fine: the index still holds it.
    let r = t
        .req(
            Method::DELETE,
            "/v2/plat/manifests/amd64",
            &[],
            Body::empty(),
        )
        .await;
    assert_eq!(r.status, StatusCode::ACCEPTED);
    assert_eq!(
        t.get(&format!("/v2/plat/manifests/{child}")).await.status,
        StatusCode::OK
    );

    // Once the index is gone, the child goes too.
    assert_eq!(delete(index.to_string()).await.status, StatusCode::ACCEPTED);
    assert_eq!(delete(child.to_string()).await.status, StatusCode::ACCEPTED);
    assert_eq!(
        t.get(&format!("/v2/plat/manifests/{child}")).await.code(),
        "MANIFEST_UNKNOWN"
    );
}

#[tokio::test]
async fn tags_list_and_catalog_pagination() {
    let t = setup().await;
    let (bytes, _) = t.push_image("pag", "t00", "p").await;
    for i in 1..25 {
        let r = t
            .push_manifest("pag", &format!("t{i:02}"), OCI_MANIFEST, &bytes)
            .await;
        assert_eq!(r.status, StatusCode::CREATED);
    }
    let r = t.get("/v2/pag/tags/list").await;
    assert_eq!(r.json()["tags"].as_array().unwrap().len(), 25);
    assert_eq!(r.json()["name"], "pag");

    let mut seen = Vec::new();
    let mut uri = "/v2/pag/tags/list?n=10".to_string();
    loop {
        let r = t.get(&uri).await;
        assert_eq!(r.status, StatusCode::OK);
        seen.extend(
            r.json()["tags"]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_str().unwrap().to_string()),
        );
        let link = r.header("link");
        if link.is_empty() {
            break;
        }
        assert!(link.ends_with("; rel=\"next\""), "{link}");
        uri = link
            .trim_start_matches('<')
            .split('>')
            .next()
            .unwrap()
            .to_string();
    }
    let expected: Vec<String> = (0..25).map(|i| format!("t{i:02}")).collect();
    assert_eq!(seen, expected);

    let r = t.get("/v2/pag/tags/list?n=5&last=t22").await;
    assert_eq!(r.json()["tags"], json!(["t23", "t24"]));
    // Exactly n left: no Link to an empty page. One more: a Link.
    let r = t.get("/v2/pag/tags/list?n=5&last=t19").await;
    assert_eq!(r.json()["tags"].as_array().unwrap().len(), 5);
    assert_eq!(r.header("link"), "");
    let r = t.get("/v2/pag/tags/list?n=5&last=t18").await;
    assert_eq!(
        r.header("link"),
        "</v2/pag/tags/list?n=5&last=t23>; rel=\"next\""
    );
    // An empty n is no n (as docker-registry has it).
    let r = t.get("/v2/pag/tags/list?n=").await;
    assert_eq!(r.json()["tags"].as_array().unwrap().len(), 25);
    assert_eq!(
        t.get("/v2/pag/tags/list?n=abc").await.status,
        StatusCode::BAD_REQUEST
    );
    let r = t.get("/v2/nope/tags/list").await;
    assert_eq!(
        (r.status, r.code().as_str()),
        (StatusCode::NOT_FOUND, "NAME_UNKNOWN")
    );

    for repo in ["b/one", "a/two", "c"] {
        t.push_blob(repo, b"x").await;
    }
    let r = t.get("/v2/_catalog?n=2").await;
    assert_eq!(r.json()["repositories"], json!(["a/two", "b/one"]));
    assert_eq!(
        r.header("link"),
        "</v2/_catalog?n=2&last=b/one>; rel=\"next\""
    );
    let r = t.get("/v2/_catalog?n=2&last=b/one").await;
    assert_eq!(r.json()["repositories"], json!(["c", "pag"]));
    let r = t.get("/v2/_catalog").await;
    assert_eq!(r.json()["repositories"].as_array().unwrap().len(), 4);
}

/// Tags come in the spec's "lexical order (i.e. case-insensitive alphanumeric order)", tags
/// that differ only in case in byte order, and pages continue from `last` in that order.
#[tokio::test]
async fn tags_are_listed_case_insensitively() {
    let t = setup().await;
    let (bytes, _) = t.push_image("ci", "b", "c").await;
    for tag in ["0", "A", "B", "_x", "a", "V1", "v1", "v10", "V2"] {
        let r = t.push_manifest("ci", tag, OCI_MANIFEST, &bytes).await;
        assert_eq!(r.status, StatusCode::CREATED);
    }
    let all = ["0", "_x", "A", "a", "B", "b", "V1", "v1", "v10", "V2"];
    assert_eq!(t.get("/v2/ci/tags/list").await.json()["tags"], json!(all));
    let mut seen = Vec::new();
    let mut uri = "/v2/ci/tags/list?n=3".to_string();
    loop {
        let r = t.get(&uri).await;
        for v in r.json()["tags"].as_array().unwrap() {
            seen.push(v.as_str().unwrap().to_string());
        }
        let link = r.header("link");
        if link.is_empty() {
            break;
        }
        uri = link[1..link.find('>').unwrap()].to_string();
    }
    assert_eq!(seen, all);
    let r = t.get("/v2/ci/tags/list?last=A&n=2").await;
    assert_eq!(r.json()["tags"], json!(["a", "B"]));
    // A `last` that is not a tag continues where it would sort.
    let r = t.get("/v2/ci/tags/list?last=u").await;
    assert_eq!(r.json()["tags"], json!(["V1", "v1", "v10", "V2"]));
}

#[tokio::test]
async fn referrers_api() {
    let t = setup().await;
    let (_, subject) = t.push_image("ref", "v1", "s").await;
    let empty = t.get(&format!("/v2/ref/referrers/{subject}")).await;
    assert_eq!(empty.status, StatusCode::OK);
    assert_eq!(empty.header("content-type"), OCI_INDEX);
    assert_eq!(empty.json()["manifests"], json!([]));

    let config = t.push_blob("ref", b"{}").await;
    let mut pushed = Vec::new();
    for (i, at) in [
        "application/vnd.example.sbom",
        "application/vnd.example.sig",
    ]
    .iter()
    .enumerate()
    {
        let layer = t.push_blob("ref", format!("payload{i}").as_bytes()).await;
        let m = image_manifest(&config, &layer, Some((at, &subject)));
        let d = Digest::sha256_of(&m);
        let r = t
            .push_manifest("ref", &d.to_string(), OCI_MANIFEST, &m)
            .await;
        assert_eq!(r.status, StatusCode::CREATED, "{:?}", r.body);
        assert_eq!(r.header("oci-subject"), subject.to_string());
        pushed.push((d, m.len()));
    }
    let r = t.get(&format!("/v2/ref/referrers/{subject}")).await;
    let list = r.json()["manifests"].as_array().unwrap().clone();
    assert_eq!(list.len(), 2);
    assert_eq!(list[0]["digest"], pushed[0].0.to_string());
    assert_eq!(list[0]["size"], pushed[0].1);
    assert_eq!(list[0]["artifactType"], "application/vnd.example.sbom");
    assert_eq!(
        list[0]["annotations"]["org.example.kind"],
        "application/vnd.example.sbom"
    );
    assert!(r.header("oci-filters-applied").is_empty());

    let r = t
        .get(&format!(
            "/v2/ref/referrers/{subject}?artifactType=application/vnd.example.sig"
        ))
        .await;
    assert_eq!(r.header("oci-filters-applied"), "artifactType");
    let list = r.json()["manifests"].as_array().unwrap().clone();
    assert_eq!(list.len(), 1);
    assert_eq!(list[0]["digest"], pushed[1].0.to_string());

    // A subject that does not exist yet is allowed (the referrer may arrive first).
    let ghost = Digest::sha256_of(b"ghost subject");
    let layer = t.push_blob("ref", b"p").await;
    let m = image_manifest(
        &config,
        &layer,
        Some(("application/vnd.example.early", &ghost)),
    );
    assert_eq!(
        t.push_manifest("ref", "early", OCI_MANIFEST, &m)
            .await
            .status,
        StatusCode::CREATED
    );
    assert_eq!(
        t.get(&format!("/v2/ref/referrers/{ghost}")).await.json()["manifests"]
            .as_array()
            .unwrap()
            .len(),
        1
    );
    assert_eq!(
        t.get("/v2/ref/referrers/sha256:bad").await.code(),
        "DIGEST_INVALID"
    );

    // An empty artifactType is listed, and found, under the config's media type.
    let m = json!({
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "artifactType": "",
        "config": {"mediaType": "application/vnd.oci.empty.v1+json", "digest": config.to_string(), "size": 2},
        "layers": [],
        "subject": {"mediaType": OCI_MANIFEST, "digest": subject.to_string(), "size": 1}
    })
    .to_string()
    .into_bytes();
    let d = Digest::sha256_of(&m);
    let r = t
        .push_manifest("ref", &d.to_string(), OCI_MANIFEST, &m)
        .await;
    assert_eq!(r.status, StatusCode::CREATED, "{:?}", r.body);
    let r = t
        .get(&format!(
            "/v2/ref/referrers/{subject}?artifactType=application/vnd.oci.empty.v1%2Bjson"
        ))
        .await;
    let list = r.json()["manifests"].as_array().unwrap().clone();
    assert_eq!(list.len(), 1, "{list:?}");
    assert_eq!(list[0]["digest"], d.to_string());
    assert_eq!(list[0]["artifactType"], "application/vnd.oci.empty.v1+json");
}

#[tokio::test]
async fn hostile_names_and_methods() {
    let t = setup().await;
    for uri in [
        "/v2/../../etc/passwd/manifests/latest",
        "/v2/a/..%2F..%2Fx/manifests/latest",
        "/v2/UPPER/tags/list",
        "/v2/a//b/tags/list",
    ] {
        let r = t.get(uri).await;
        assert_eq!(
            (r.status, r.code().as_str()),
            (StatusCode::BAD_REQUEST, "NAME_INVALID"),
            "{uri}"
        );
    }
    let r = t.get("/v2/a/blobs/sha256:..%2F..%2Fmeta.db").await;
    assert_eq!(r.code(), "DIGEST_INVALID");
    let r = t.get("/v2/a/blobs/blake3:0000").await;
    assert_eq!(r.code(), "DIGEST_INVALID");
    let r = t
        .req(Method::POST, "/v2/a/tags/list", &[], Body::empty())
        .await;
    assert_eq!(
        (r.status, r.code().as_str()),
        (StatusCode::METHOD_NOT_ALLOWED, "UNSUPPORTED")
    );
    // Every 405 says what the endpoint takes (RFC 9110 §15.5.6).
    assert_eq!(r.header("allow"), "GET");
    let r = t
        .req(Method::PATCH, "/v2/a/manifests/x", &[], Body::empty())
        .await;
    assert_eq!(r.status, StatusCode::METHOD_NOT_ALLOWED);
    assert_eq!(r.header("allow"), "GET, HEAD, PUT, DELETE");
    let r = t
        .req(Method::HEAD, "/v2/_catalog", &[], Body::empty())
        .await;
    assert_eq!(
        (r.status, r.header("allow")),
        (StatusCode::METHOD_NOT_ALLOWED, "GET")
    );
}

/// A NUL character, which PostgreSQL text cannot hold, in a login, a page cursor, a lookup or
/// a stored value: a clear answer on either database, never a 500.
#[tokio::test]
async fn nul_characters_get_a_clear_answer() {
    let t = setup().await;
    t.push_image("app", "v1", "nul").await;
    let r = t
        .req_as(
            Some(&basic("ad\0min", ADMIN_PASSWORD)),
            Method::GET,
            "/v2/",
            &[],
            Body::empty(),
        )
        .await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);
    for uri in [
        "/v2/app/tags/list?last=%00",
        "/v2/_catalog?last=a%00b",
        "/api/v1/tokens/ab%00cd",
        "/api/v1/scope-maps/ab%00cd",
    ] {
        let r = t.get(uri).await;
        assert!(
            matches!(r.status.as_u16(), 200 | 400 | 404),
            "{uri}: {} {:?}",
            r.status,
            r.body
        );
    }
    let r = t
        .req(
            Method::POST,
            "/api/v1/scope-maps",
            &[("content-type", "application/json")],
            serde_json::json!({
                "name": "nul-map",
                "description": "a\u{0}b",
                "actions": ["repositories/app/content/read"]
            })
            .to_string(),
        )
        .await;
    assert!(
        matches!(r.status.as_u16(), 201 | 400),
        "{} {:?}",
        r.status,
        r.body
    );
    // Nothing else was disturbed.
    assert_eq!(t.get("/v2/app/tags/list").await.status, StatusCode::OK);
}

/// A blob file cut short on disk (by hand, or by a failing disk) is answered as unknown, like
/// a missing one, instead of with a body that stops before its Content-Length; pushing the
/// blob again repairs it.
#[tokio::test]
async fn a_blob_file_cut_short_is_unknown_until_pushed_again() {
    let t = setup().await;
    let data: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
    let d = t.push_blob("app", &data).await;
    let path = t
        .dir
        .path()
        .join("blobs/sha256")
        .join(&d.hex()[..2])
        .join(d.hex());
    std::fs::OpenOptions::new()
        .write(true)
        .open(&path)
        .unwrap()
        .set_len(50_000)
        .unwrap();
    let uri = format!("/v2/app/blobs/{d}");
    for (method, range) in [
        (Method::HEAD, None),
        (Method::GET, None),
        (Method::GET, Some("bytes=60000-60099")),
    ] {
        let headers: Vec<(&str, &str)> = range.map(|r| ("range", r)).into_iter().collect();
        let r = t.req(method.clone(), &uri, &headers, Body::empty()).await;
        assert_eq!(r.status, StatusCode::NOT_FOUND, "{method} {range:?}");
        if method == Method::GET {
            assert_eq!(r.code(), "BLOB_UNKNOWN", "{range:?}");
        }
    }
    t.push_blob("app", &data).await;
    let r = t.get(&uri).await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.body, data);
    assert_eq!(std::fs::metadata(&path).unwrap().len(), 100_000);
}

/// A manifest put by tag says what the tag pointed at before (`Outpost-Replaced-Digest`,
/// `none` for a new tag or one already there), read with the move itself: a ReadWrite site
/// racing another site for a tag learns exactly what its write replaced, and reports the
/// conflict when that was not what it last knew.
#[tokio::test]
async fn a_put_by_tag_says_what_it_replaced() {
    let t = setup().await;
    let (one, d1) = t.push_image("app", "seed1", "one").await;
    let (two, _) = t.push_image("app", "seed2", "two").await;
    let replaced = |bytes: Vec<u8>, reference: &'static str| {
        let t = &t;
        async move {
            let r = t
                .push_manifest("app", reference, OCI_MANIFEST, &bytes)
                .await;
            assert_eq!(r.status, StatusCode::CREATED);
            r.headers
                .get("outpost-replaced-digest")
                .map(|v| v.to_str().unwrap().to_string())
        }
    };
    assert_eq!(
        replaced(one.clone(), "x").await.as_deref(),
        Some("none"),
        "a new tag"
    );
    assert_eq!(
        replaced(two.clone(), "x").await,
        Some(d1.to_string()),
        "moved from one to two"
    );
    assert_eq!(
        replaced(two, "x").await.as_deref(),
        Some("none"),
        "already there"
    );
    let by_digest = d1.to_string();
    let r = t.push_manifest("app", &by_digest, OCI_MANIFEST, &one).await;
    assert_eq!(r.status, StatusCode::CREATED);
    assert!(
        r.headers.get("outpost-replaced-digest").is_none(),
        "a put by digest moves no tag"
    );
}

#[tokio::test]
async fn conditional_pushes_of_a_tag() {
    let t = setup().await;
    let (_, first) = t.push_image("cond", "v1", "one").await;
    let etag = t
        .get("/v2/cond/manifests/v1")
        .await
        .header("etag")
        .to_string();
    assert_eq!(etag, format!("\"{first}\""));
    let (bytes, second) = {
        let config = t.push_blob("cond", b"{\"seed\":\"two\"}").await;
        let layer = t.push_blob("cond", b"layer-two").await;
        let m = image_manifest(&config, &layer, None);
        let d = Digest::sha256_of(&m);
        (m, d)
    };
    let put = |tag: &'static str, cond: Vec<(&'static str, String)>| {
        let bytes = bytes.clone();
        let t = &t;
        async move {
            let headers: Vec<(&str, &str)> = std::iter::once(("content-type", OCI_MANIFEST))
                .chain(cond.iter().map(|(k, v)| (*k, v.as_str())))
                .collect();
            t.req(
                Method::PUT,
                &format!("/v2/cond/manifests/{tag}"),
                &headers,
                bytes,
            )
            .await
        }
    };
    // Create-only on a tag that exists, and a stale If-Match: refused, nothing stored.
    for cond in [
        vec![("if-none-match", "*".to_string())],
        vec![("if-none-match", etag.clone())],
        vec![("if-match", format!("\"{second}\""))],
        vec![("if-match", format!("W/{etag}"))],
    ] {
        let r = put("v1", cond.clone()).await;
        assert_eq!(r.status, StatusCode::PRECONDITION_FAILED, "{cond:?}");
        assert_eq!(r.code(), "PRECONDITION_FAILED", "{cond:?}");
        assert!(
            r.message().contains(&format!("tag v1 points at {first}")),
            "{}",
            r.message()
        );
        assert_eq!(
            t.get(&format!("/v2/cond/manifests/{second}")).await.status,
            StatusCode::NOT_FOUND,
            "{cond:?}: the refused push stored its manifest"
        );
        assert_eq!(t.get("/v2/cond/manifests/v1").await.header("etag"), etag);
    }
    // Replace-only-if-unchanged with the ETag a GET gave: moves the tag.
    let r = put("v1", vec![("if-match", format!("\"sha256:00\", {etag}"))]).await;
    assert_eq!(r.status, StatusCode::CREATED, "{:?}", r.body);
    assert_eq!(
        t.get("/v2/cond/manifests/v1").await.header("etag"),
        format!("\"{second}\"")
    );
    // A tag that does not exist: create-only works, If-Match: * does not.
    assert_eq!(
        put("v2", vec![("if-match", "*".into())]).await.status,
        StatusCode::PRECONDITION_FAILED
    );
    assert_eq!(
        put("v2", vec![("if-none-match", "*".into())]).await.status,
        StatusCode::CREATED
    );
}
