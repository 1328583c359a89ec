//! `outpost-bench`: a small load client that speaks the OCI distribution API to any registry
//! and prints one JSON object per measurement. `bench/run.sh` runs it against Outpost and
//! Debian's `docker-registry` on the same data and prints the ratios. It exists because general
//! clients (skopeo) are themselves the bottleneck near 150 MB/s.

use anyhow::{Context, Result, bail};
use bytes::Bytes;
use clap::{Parser, Subcommand};
use sha2::Digest as _;
use std::sync::Arc;
use std::time::{Duration, Instant};

#[derive(Parser)]
struct Cli {
    /// Registry base URL, e.g. http://127.0.0.1:5000
    #[arg(long, global = true, default_value = "http://127.0.0.1:5000")]
    registry: String,
    /// `Authorization` header value sent with every request (e.g. "Basic ...", "Bearer ...")
    #[arg(long, global = true)]
    auth: Option<String>,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Push one blob of SIZE bytes in a single streamed PUT; prints MB/s.
    PushBlob {
        #[arg(long)]
        repo: String,
        #[arg(long)]
        size: u64,
        #[arg(long, default_value_t = 1)]
        seed: u64,
    },
    /// Pull a blob on one connection, REPEAT times one after another; prints the median MB/s
    /// and every run's figure (one 1 GiB transfer lasts ~0.3 s here, so single runs vary ±10%).
    PullBlob {
        #[arg(long)]
        repo: String,
        #[arg(long)]
        digest: String,
        #[arg(long, default_value_t = 1)]
        repeat: usize,
    },
    /// Push an image of LAYERS layers of LAYER_SIZE bytes with CONCURRENCY uploads in flight.
    PushImage {
        #[arg(long)]
        repo: String,
        #[arg(long)]
        tag: String,
        #[arg(long)]
        layers: usize,
        #[arg(long)]
        layer_size: usize,
        #[arg(long, default_value_t = 1)]
        concurrency: usize,
        #[arg(long, default_value_t = 7)]
        seed: u64,
        /// After the push, poll this registry (one keep-alive connection, 1 ms apart) until it
        /// serves REPO:TAG with the pushed manifest's digest; prints `visible_secs`, counted
        /// from the start of the push (propagation through connected registries).
        #[arg(long)]
        await_registry: Option<String>,
        /// `Authorization` header for --await-registry.
        #[arg(long)]
        await_auth: Option<String>,
    },
    /// Wait until a registry serves what is asked (one keep-alive connection, polled 1 ms
    /// apart); prints the seconds since SINCE (a Unix time taken by the caller).
    Wait {
        /// Unix time, in seconds with a fraction, that the printed duration counts from.
        #[arg(long)]
        since: f64,
        /// Wait until each of these repositories lists at least --tags tags.
        #[arg(long, num_args = 1..)]
        repos: Vec<String>,
        #[arg(long, default_value_t = 1)]
        tags: usize,
        /// Wait until `REPO@DIGEST` is present as a blob.
        #[arg(long)]
        blob: Option<String>,
    },
    /// Pull an image (manifest, config, layers) with CONCURRENCY downloads in flight.
    PullImage {
        #[arg(long)]
        repo: String,
        #[arg(long)]
        tag: String,
        #[arg(long, default_value_t = 1)]
        concurrency: usize,
    },
    /// CLIENTS concurrent clients each GET the blob ROUNDS times; prints MB/s and latency.
    PullConcurrent {
        #[arg(long)]
        repo: String,
        #[arg(long)]
        digest: String,
        #[arg(long)]
        clients: usize,
        #[arg(long, default_value_t = 1)]
        rounds: usize,
    },
    /// Create COUNT tags pointing at TAG's manifest.
    SeedTags {
        #[arg(long)]
        repo: String,
        #[arg(long)]
        tag: String,
        #[arg(long)]
        count: usize,
        #[arg(long, default_value_t = 16)]
        concurrency: usize,
    },
    /// Hash SIZE bytes in memory with SHA-256 on one core; prints MB/s (the ceiling of any
    /// copy that verifies a digest).
    Hash {
        #[arg(long)]
        size: usize,
    },
    /// GET the tags list ROUNDS times; prints latency.
    TagsList {
        #[arg(long)]
        repo: String,
        #[arg(long, default_value_t = 20)]
        rounds: usize,
    },
}

fn data(seed: u64, size: usize) -> Vec<u8> {
    // xorshift: incompressible enough, fast, deterministic.
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut v = Vec::with_capacity(size + 8);
    while v.len() < size {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        v.extend_from_slice(&x.to_le_bytes());
    }
    v.truncate(size);
    v
}

fn digest(d: &[u8]) -> String {
    format!("sha256:{}", hex::encode(sha2::Sha256::digest(d)))
}

fn mbps(bytes: u64, d: Duration) -> f64 {
    bytes as f64 / d.as_secs_f64() / 1e6
}

fn pct(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i]
}

struct Reg {
    base: String,
    http: reqwest::Client,
    auth: Option<String>,
}

fn http_client(auth: &Option<String>, pool: usize) -> Result<reqwest::Client> {
    let mut h = reqwest::header::HeaderMap::new();
    if let Some(a) = auth {
        h.insert("authorization", a.parse()?);
    }
    Ok(reqwest::Client::builder()
        .pool_max_idle_per_host(pool)
        .timeout(Duration::from_secs(600))
        .default_headers(h)
        .build()?)
}

impl Reg {
    fn url(&self, loc: &str) -> String {
        if loc.starts_with("http") {
            loc.to_string()
        } else {
            format!("{}{}", self.base, loc)
        }
    }

    /// Pushes `body`, whose digest `d` the caller computed beforehand (client-side hashing is
    /// not server time).
    async fn push_blob(&self, repo: &str, body: Bytes, d: String) -> Result<String> {
        let r = self
            .http
            .head(self.url(&format!("/v2/{repo}/blobs/{d}")))
            .send()
            .await?;
        if r.status().is_success() {
            return Ok(d);
        }
        let r = self
            .http
            .post(self.url(&format!("/v2/{repo}/blobs/uploads/")))
            .send()
            .await?;
        if r.status() != 202 {
            bail!("POST upload: {}", r.status());
        }
        let loc = r.headers()["location"].to_str()?.to_string();
        let sep = if loc.contains('?') { '&' } else { '?' };
        // Stream the body in 1 MiB pieces, as a real client does with a file.
        let chunks: Vec<Result<Bytes, std::io::Error>> = (0..body.len())
            .step_by(1 << 20)
            .map(|i| Ok(body.slice(i..(i + (1 << 20)).min(body.len()))))
            .collect();
        let r = self
            .http
            .put(format!("{}{sep}digest={d}", self.url(&loc)))
            .header("content-type", "application/octet-stream")
            .header("content-length", body.len())
            .body(reqwest::Body::wrap_stream(futures_util::stream::iter(
                chunks,
            )))
            .send()
            .await?;
        if r.status() != 201 {
            bail!(
                "PUT upload: {} {}",
                r.status(),
                r.text().await.unwrap_or_default()
            );
        }
        Ok(d)
    }

    async fn get_bytes(&self, path: &str) -> Result<u64> {
        let mut r = self.http.get(self.url(path)).send().await?;
        if !r.status().is_success() {
            bail!("GET {path}: {}", r.status());
        }
        let mut n = 0u64;
        while let Some(c) = r.chunk().await? {
            n += c.len() as u64;
        }
        Ok(n)
    }

    async fn put_manifest(&self, repo: &str, reference: &str, body: Vec<u8>) -> Result<()> {
        let r = self
            .http
            .put(self.url(&format!("/v2/{repo}/manifests/{reference}")))
            .header("content-type", "application/vnd.oci.image.manifest.v1+json")
            .body(body)
            .send()
            .await?;
        if r.status() != 201 {
            bail!(
                "PUT manifest: {} {}",
                r.status(),
                r.text().await.unwrap_or_default()
            );
        }
        Ok(())
    }
}

/// Calls `check` 1 ms apart until it says yes; a failed request (the server still starting,
/// a connection reset) counts as a no. Gives up after 15 minutes.
async fn poll<F, Fut>(mut check: F) -> Result<()>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<bool>>,
{
    let deadline = Instant::now() + Duration::from_secs(900);
    loop {
        if let Ok(true) = check().await {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("timed out after 15 minutes");
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

/// A minimal HTTP/1.1 GET over a plain socket that discards the body through one large
/// buffer, like iperf3's receiver: the single-stream pull ceiling is then the server's, not
/// an HTTP client library's.
async fn raw_get(base: &str, path: &str, auth: Option<&str>) -> Result<u64> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let host = base.trim_start_matches("http://");
    let mut s = tokio::net::TcpStream::connect(host).await?;
    let auth = auth
        .map(|a| format!("Authorization: {a}\r\n"))
        .unwrap_or_default();
    s.write_all(
        format!("GET {path} HTTP/1.1\r\nHost: {host}\r\n{auth}Connection: close\r\n\r\n")
            .as_bytes(),
    )
    .await?;
    let mut buf = vec![0u8; 4 << 20];
    let mut head = Vec::new();
    let body_start;
    loop {
        let n = s.read(&mut buf).await?;
        if n == 0 {
            bail!("connection closed before the response headers");
        }
        head.extend_from_slice(&buf[..n]);
        if let Some(p) = head.windows(4).position(|w| w == b"\r\n\r\n") {
            body_start = p + 4;
            break;
        }
    }
    let text = String::from_utf8_lossy(&head[..body_start]).to_ascii_lowercase();
    if !text.starts_with("http/1.1 200") {
        bail!("GET {path}: {}", text.lines().next().unwrap_or(""));
    }
    let len: u64 = text
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .context("no content-length")?
        .trim()
        .parse()?;
    let mut got = (head.len() - body_start) as u64;
    while got < len {
        let n = s.read(&mut buf).await?;
        if n == 0 {
            bail!("body cut at {got} of {len} bytes");
        }
        got += n as u64;
    }
    Ok(got)
}

#[tokio::main]
async fn main() -> Result<()> {
    let cli = Cli::parse();
    let reg = Arc::new(Reg {
        base: cli.registry.trim_end_matches('/').to_string(),
        http: http_client(&cli.auth, 512)?,
        auth: cli.auth.clone(),
    });
    match cli.cmd {
        Cmd::PushBlob { repo, size, seed } => {
            let body = Bytes::from(data(seed, size as usize));
            let d = digest(&body);
            let t = Instant::now();
            let d = reg.push_blob(&repo, body, d).await?;
            let e = t.elapsed();
            println!(
                "{}",
                serde_json::json!({"op":"push-blob","digest":d,"bytes":size,"secs":e.as_secs_f64(),"mb_s":mbps(size,e)})
            );
        }
        Cmd::PullBlob {
            repo,
            digest,
            repeat,
        } => {
            let mut runs = Vec::new();
            let mut n = 0;
            for _ in 0..repeat.max(1) {
                let t = Instant::now();
                n = raw_get(
                    &reg.base,
                    &format!("/v2/{repo}/blobs/{digest}"),
                    reg.auth.as_deref(),
                )
                .await?;
                runs.push(mbps(n, t.elapsed()));
            }
            let mut sorted = runs.clone();
            sorted.sort_by(f64::total_cmp);
            let median = pct(&sorted, 0.5);
            println!(
                "{}",
                serde_json::json!({"op":"pull-blob","bytes":n,"runs_mb_s":runs,"mb_s":median})
            );
        }
        Cmd::PushImage {
            repo,
            tag,
            layers,
            layer_size,
            concurrency,
            seed,
            await_registry,
            await_auth,
        } => {
            let blobs: Vec<(Bytes, String)> = (0..layers)
                .map(|i| {
                    let b = Bytes::from(data(seed * 1_000_003 + i as u64, layer_size));
                    let d = digest(&b);
                    (b, d)
                })
                .collect();
            let config = Bytes::from(format!(
                "{{\"architecture\":\"amd64\",\"os\":\"linux\",\"seed\":{seed}}}"
            ));
            let t = Instant::now();
            let sem = Arc::new(tokio::sync::Semaphore::new(concurrency.max(1)));
            let mut tasks = Vec::new();
            for (b, d) in blobs.iter().cloned() {
                let (reg, repo, sem) = (reg.clone(), repo.clone(), sem.clone());
                tasks.push(tokio::spawn(async move {
                    let _p = sem.acquire().await?;
                    let len = b.len();
                    reg.push_blob(&repo, b, d).await.map(|d| (d, len))
                }));
            }
            let mut descs = Vec::new();
            for task in tasks {
                let (d, len) = task.await??;
                descs.push(serde_json::json!({"mediaType":"application/vnd.oci.image.layer.v1.tar","digest":d,"size":len}));
            }
            let cd = reg
                .push_blob(&repo, config.clone(), digest(&config))
                .await?;
            let m = serde_json::json!({"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json",
                "config":{"mediaType":"application/vnd.oci.image.config.v1+json","digest":cd,"size":config.len()},
                "layers":descs});
            let m = serde_json::to_vec(&m)?;
            let md = digest(&m);
            reg.put_manifest(&repo, &tag, m).await?;
            let e = t.elapsed();
            let total = (layers * layer_size) as u64;
            let mut out = serde_json::json!({"op":"push-image","layers":layers,"bytes":total,"concurrency":concurrency,
                "digest":md,"secs":e.as_secs_f64(),"mb_s":mbps(total,e)});
            if let Some(url) = await_registry {
                let at = Reg {
                    base: url.trim_end_matches('/').to_string(),
                    http: http_client(&await_auth, 1)?,
                    auth: await_auth,
                };
                let path = format!("/v2/{repo}/manifests/{tag}");
                poll(|| async {
                    let r = at
                        .http
                        .head(at.url(&path))
                        .header("accept", "application/vnd.oci.image.manifest.v1+json")
                        .send()
                        .await?;
                    Ok(r.headers()
                        .get("docker-content-digest")
                        .is_some_and(|v| v.as_bytes() == md.as_bytes()))
                })
                .await?;
                out["visible_secs"] = t.elapsed().as_secs_f64().into();
            }
            println!("{out}");
        }
        Cmd::PullImage {
            repo,
            tag,
            concurrency,
        } => {
            let t = Instant::now();
            let r = reg
                .http
                .get(reg.url(&format!("/v2/{repo}/manifests/{tag}")))
                .header("accept", "application/vnd.oci.image.manifest.v1+json")
                .send()
                .await?;
            let m: serde_json::Value = r.json().await?;
            let mut digests = vec![
                m["config"]["digest"]
                    .as_str()
                    .context("config")?
                    .to_string(),
            ];
            for l in m["layers"].as_array().context("layers")? {
                digests.push(l["digest"].as_str().context("digest")?.to_string());
            }
            let sem = Arc::new(tokio::sync::Semaphore::new(concurrency.max(1)));
            let mut tasks = Vec::new();
            for d in digests {
                let (reg, repo, sem) = (reg.clone(), repo.clone(), sem.clone());
                tasks.push(tokio::spawn(async move {
                    let _p = sem.acquire().await?;
                    reg.get_bytes(&format!("/v2/{repo}/blobs/{d}")).await
                }));
            }
            let mut total = 0;
            for task in tasks {
                total += task.await??;
            }
            let e = t.elapsed();
            println!(
                "{}",
                serde_json::json!({"op":"pull-image","bytes":total,"concurrency":concurrency,"secs":e.as_secs_f64(),"mb_s":mbps(total,e)})
            );
        }
        Cmd::PullConcurrent {
            repo,
            digest,
            clients,
            rounds,
        } => {
            let t = Instant::now();
            let mut tasks = Vec::new();
            for _ in 0..clients {
                let (repo, digest) = (repo.clone(), digest.clone());
                // One connection per client, as separate pulling hosts would have.
                let reg = Reg {
                    base: reg.base.clone(),
                    http: http_client(&reg.auth, 1)?,
                    auth: reg.auth.clone(),
                };
                tasks.push(tokio::spawn(async move {
                    let mut lat = Vec::new();
                    let mut bytes = 0;
                    for _ in 0..rounds {
                        let s = Instant::now();
                        bytes += reg.get_bytes(&format!("/v2/{repo}/blobs/{digest}")).await?;
                        lat.push(s.elapsed().as_secs_f64() * 1e3);
                    }
                    anyhow::Ok((bytes, lat))
                }));
            }
            let mut total = 0;
            let mut lat = Vec::new();
            for task in tasks {
                let (b, l) = task.await??;
                total += b;
                lat.extend(l);
            }
            let e = t.elapsed();
            lat.sort_by(f64::total_cmp);
            println!(
                "{}",
                serde_json::json!({"op":"pull-concurrent","clients":clients,"bytes":total,"secs":e.as_secs_f64(),
                "mb_s":mbps(total,e),"p50_ms":pct(&lat,0.5),"p99_ms":pct(&lat,0.99)})
            );
        }
        Cmd::SeedTags {
            repo,
            tag,
            count,
            concurrency,
        } => {
            let r = reg
                .http
                .get(reg.url(&format!("/v2/{repo}/manifests/{tag}")))
                .header("accept", "application/vnd.oci.image.manifest.v1+json")
                .send()
                .await?;
            let body = r.bytes().await?.to_vec();
            let sem = Arc::new(tokio::sync::Semaphore::new(concurrency));
            let t = Instant::now();
            let mut tasks = Vec::new();
            for i in 0..count {
                let (reg, repo, sem, body) = (reg.clone(), repo.clone(), sem.clone(), body.clone());
                tasks.push(tokio::spawn(async move {
                    let _p = sem.acquire().await?;
                    reg.put_manifest(&repo, &format!("t{i:05}"), body).await
                }));
            }
            for task in tasks {
                task.await??;
            }
            let e = t.elapsed();
            println!(
                "{}",
                serde_json::json!({"op":"seed-tags","count":count,"secs":e.as_secs_f64(),"per_s":count as f64/e.as_secs_f64()})
            );
        }
        Cmd::Wait {
            since,
            repos,
            tags,
            blob,
        } => {
            let reg = Reg {
                base: reg.base.clone(),
                http: http_client(&reg.auth, 1)?,
                auth: reg.auth.clone(),
            };
            for repo in &repos {
                let path = format!("/v2/{repo}/tags/list");
                poll(|| async {
                    let r = reg.http.get(reg.url(&path)).send().await?;
                    if !r.status().is_success() {
                        return Ok(false);
                    }
                    let v: serde_json::Value = r.json().await?;
                    Ok(v["tags"].as_array().is_some_and(|a| a.len() >= tags))
                })
                .await?;
            }
            if let Some(b) = blob {
                let (repo, d) = b.split_once('@').context("--blob takes REPO@DIGEST")?;
                let path = format!("/v2/{repo}/blobs/{d}");
                poll(|| async { Ok(reg.http.head(reg.url(&path)).send().await?.status() == 200) })
                    .await?;
            }
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)?
                .as_secs_f64();
            println!("{:.3}", now - since);
        }
        Cmd::Hash { size } => {
            let d = data(1, size);
            let t = Instant::now();
            let h = digest(&d);
            let e = t.elapsed();
            println!(
                "{}",
                serde_json::json!({"op":"hash","digest":h,"bytes":size,"secs":e.as_secs_f64(),"mb_s":mbps(size as u64,e)})
            );
        }
        Cmd::TagsList { repo, rounds } => {
            let mut lat = Vec::new();
            let mut n = 0;
            for _ in 0..rounds {
                let s = Instant::now();
                let r = reg
                    .http
                    .get(reg.url(&format!("/v2/{repo}/tags/list")))
                    .send()
                    .await?;
                let v: serde_json::Value = r.json().await?;
                n = v["tags"].as_array().map(|a| a.len()).unwrap_or(0);
                lat.push(s.elapsed().as_secs_f64() * 1e3);
            }
            lat.sort_by(f64::total_cmp);
            println!(
                "{}",
                serde_json::json!({"op":"tags-list","tags":n,"p50_ms":pct(&lat,0.5),"p99_ms":pct(&lat,0.99)})
            );
        }
    }
    Ok(())
}
