//! Offline bundles (SPEC §6), for sites with no link at all.
//!
//! `outpost connected-registry export` runs against the parent. It writes a directory in the
//! OCI image-layout format holding everything a connected registry's scope holds there:
//! - every tag of every repository in scope, with the child manifests of each index, the
//!   referrers and every blob;
//! - the registry's configuration as its instances fetch it, including client tokens.
//!
//! Running it again into the same directory downloads only what is not there yet. Carry the
//! directory to the site (or `tar` it). With the site stopped, `outpost import` verifies every
//! blob against its digest and stores the content in the site's data directory as if it had
//! synced. On a first start, with no saved configuration yet, it also installs the
//! configuration, so the site starts and authenticates its clients without ever reaching its
//! parent.
//!
//! Tags only arrive: a tag the parent deleted goes when the link returns.
//!
//! A directory rather than a tar file: export can resume, and other OCI tools read it.
//! Blobs stream to and from disk, never whole into memory.

use crate::client::{Client, Connection, query_escape};
use anyhow::{Context, bail};
use outpost_oci::manifest::OCI_INDEX;
use outpost_oci::{Digest, Digester, Manifest, Reference, RepoName};
use reqwest::Method;
use serde_json::{Value, json};
use std::collections::HashSet;
use std::path::{Path, PathBuf};

const ACCEPT: &str = "application/vnd.oci.image.index.v1+json, \
    application/vnd.oci.image.manifest.v1+json, \
    application/vnd.docker.distribution.manifest.list.v2+json, \
    application/vnd.docker.distribution.manifest.v2+json";
/// Names the repository of an `index.json` entry (the layout itself has one namespace).
const REPO_ANNOTATION: &str = "io.outpost.repository";
const REF_ANNOTATION: &str = "org.opencontainers.image.ref.name";
const BUNDLE_FILE: &str = "outpost-bundle.json";

fn blob_path(dir: &Path, d: &Digest) -> PathBuf {
    dir.join("blobs").join(d.algorithm().as_str()).join(d.hex())
}

/// Reads a regular file of at most `max` bytes (a bundle may come from anywhere).
fn read_bounded(path: &Path, max: u64) -> anyhow::Result<Vec<u8>> {
    let meta = std::fs::symlink_metadata(path)
        .with_context(|| format!("cannot read {}", path.display()))?;
    if !meta.is_file() {
        bail!("{} is not a regular file", path.display());
    }
    if meta.len() > max {
        bail!(
            "{} is {} bytes, more than the {max} allowed",
            path.display(),
            meta.len()
        );
    }
    std::fs::read(path).with_context(|| format!("reading {}", path.display()))
}

/// Writes `data` to `path` durably: temporary file, fsync, rename, directory fsync.
fn write_atomic(path: &Path, data: &[u8]) -> anyhow::Result<()> {
    Ok(outpost_sync::write_state(path, data)?)
}

struct Exporter<'a> {
    client: &'a Client,
    dir: &'a Path,
    /// (repository, digest) of manifests written, so each is walked once per repository.
    done: HashSet<(String, Digest)>,
    /// Every manifest with its repository, children before the manifests that list them.
    manifests: Vec<Value>,
    blobs_fetched: u64,
    blobs_present: u64,
    bytes_fetched: u64,
    /// Every blob and manifest this export holds (the rest of an older export is removed).
    kept: HashSet<Digest>,
}

async fn hash_file(path: &Path, algorithm: outpost_oci::Algorithm) -> anyhow::Result<Digest> {
    use tokio::io::AsyncReadExt;
    let mut f = tokio::fs::File::open(path).await?;
    let mut h = Digester::new(algorithm);
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf).await?;
        if n == 0 {
            return Ok(h.finish());
        }
        h.update(&buf[..n]);
    }
}

impl Exporter<'_> {
    async fn json(&self, path: &str) -> anyhow::Result<Value> {
        let r = self.client.get(path, None).await?;
        r.json().await.with_context(|| format!("{path}: not JSON"))
    }

    /// Every repository name at the parent, following the catalog's pages.
    async fn catalog(&self) -> anyhow::Result<Vec<String>> {
        let mut all: Vec<String> = Vec::new();
        loop {
            let mut path = "/v2/_catalog?n=1000".to_string();
            if let Some(last) = all.last() {
                path.push_str(&format!("&last={}", query_escape(last)));
            }
            let v = self.json(&path).await?;
            let page: Vec<String> = serde_json::from_value(v["repositories"].clone())
                .context("the catalog's repositories")?;
            let n = page.len();
            all.extend(page);
            if n < 1000 {
                return Ok(all);
            }
        }
    }

    async fn tags(&self, repo: &str) -> anyhow::Result<Vec<String>> {
        let mut all: Vec<String> = Vec::new();
        loop {
            let mut path = format!("/v2/{repo}/tags/list?n=1000");
            if let Some(last) = all.last() {
                path.push_str(&format!("&last={}", query_escape(last)));
            }
            let v = self.json(&path).await?;
            let page: Vec<String> = serde_json::from_value(v["tags"].clone()).unwrap_or_default();
            let n = page.len();
            all.extend(page);
            if n < 1000 {
                return Ok(all);
            }
        }
    }

    /// A manifest's bytes, media type and digest (checked against what was asked for).
    async fn manifest(
        &self,
        repo: &str,
        reference: &str,
    ) -> anyhow::Result<(Vec<u8>, String, Digest)> {
        let r = self
            .client
            .get(&format!("/v2/{repo}/manifests/{reference}"), Some(ACCEPT))
            .await?;
        let media_type = r
            .headers()
            .get(reqwest::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_string();
        let bytes = r.bytes().await?.to_vec();
        let digest = match reference.parse::<Digest>() {
            Ok(asked) => {
                let got = Digest::of(asked.algorithm(), &bytes);
                if got != asked {
                    bail!("{repo}@{reference}: the parent sent content that hashes to {got}");
                }
                got
            }
            Err(_) => Digest::sha256_of(&bytes),
        };
        Ok((bytes, media_type, digest))
    }

    /// Downloads a blob unless the bundle has it, verifying its digest on the way.
    async fn blob(&mut self, repo: &str, d: &Digest) -> anyhow::Result<()> {
        let path = blob_path(self.dir, d);
        self.kept.insert(d.clone());
        if path.is_file() {
            // Reused only if intact: an export interrupted or damaged before is repaired.
            if hash_file(&path, d.algorithm()).await.ok().as_ref() == Some(d) {
                self.blobs_present += 1;
                return Ok(());
            }
            std::fs::remove_file(&path).with_context(|| format!("removing {}", path.display()))?;
        }
        let tmp = path.with_extension("part");
        let mut r = self
            .client
            .get(&format!("/v2/{repo}/blobs/{d}"), None)
            .await?;
        let mut file = tokio::fs::File::create(&tmp)
            .await
            .with_context(|| format!("creating {}", tmp.display()))?;
        let mut h = Digester::new(d.algorithm());
        while let Some(chunk) = r
            .chunk()
            .await
            .with_context(|| format!("downloading {d}"))?
        {
            h.update(&chunk);
            self.bytes_fetched += chunk.len() as u64;
            tokio::io::AsyncWriteExt::write_all(&mut file, &chunk)
                .await
                .with_context(|| format!("writing {}", tmp.display()))?;
        }
        tokio::io::AsyncWriteExt::flush(&mut file).await?;
        file.sync_all().await?;
        let got = h.finish();
        if &got != d {
            let _ = std::fs::remove_file(&tmp);
            bail!("blob {d} of {repo} arrived as {got}; run the export again");
        }
        std::fs::rename(&tmp, &path).with_context(|| format!("writing {}", path.display()))?;
        self.blobs_fetched += 1;
        Ok(())
    }

    /// Writes a manifest and, first, what it needs: child manifests and blobs; then its
    /// referrers.
    async fn walk(
        &mut self,
        repo: &str,
        bytes: Vec<u8>,
        media_type: String,
        digest: Digest,
    ) -> anyhow::Result<()> {
        if !self.done.insert((repo.to_string(), digest.clone())) {
            return Ok(());
        }
        let m = Manifest::parse(&bytes, Some(&media_type))
            .with_context(|| format!("{repo}@{digest}"))?;
        for child in m.required_manifests() {
            let (b, mt, d) = self.manifest(repo, &child.digest.to_string()).await?;
            Box::pin(self.walk(repo, b, mt, d)).await?;
        }
        for blob in m.required_blobs() {
            self.blob(repo, &blob.digest).await?;
        }
        write_atomic(&blob_path(self.dir, &digest), &bytes)?;
        self.kept.insert(digest.clone());
        self.manifests.push(json!({
            "repository": repo,
            "digest": digest.to_string(),
            "mediaType": media_type,
        }));
        let referrers = self.json(&format!("/v2/{repo}/referrers/{digest}")).await?;
        for r in referrers["manifests"].as_array().into_iter().flatten() {
            if let Some(d) = r["digest"].as_str() {
                let (b, mt, d) = self.manifest(repo, d).await?;
                Box::pin(self.walk(repo, b, mt, d)).await?;
            }
        }
        Ok(())
    }
}

/// `outpost connected-registry export -n <name> --dir <dir>`.
pub async fn export(conn: &Connection, name: &str, dir: &Path) -> anyhow::Result<()> {
    let client = Client::new(conn)?;
    let cr = client
        .call(Method::GET, &format!("/connected-registries/{name}"), None)
        .await?
        .unwrap_or_default();
    let patterns: Vec<outpost_control::RepoPattern> = cr["repositories"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|p| p.as_str())
        .filter_map(|p| outpost_control::RepoPattern::parse(p).ok())
        .collect();
    let config: Value = client
        .get(&format!("/gateway/v1/{name}/config"), None)
        .await?
        .json()
        .await
        .context("the connected registry's configuration")?;
    for sub in ["blobs/sha256", "blobs/sha512"] {
        std::fs::create_dir_all(dir.join(sub))
            .with_context(|| format!("creating {}", dir.join(sub).display()))?;
    }
    write_atomic(
        &dir.join("oci-layout"),
        br#"{"imageLayoutVersion":"1.0.0"}"#,
    )?;
    let mut ex = Exporter {
        client: &client,
        dir,
        done: HashSet::new(),
        manifests: Vec::new(),
        blobs_fetched: 0,
        blobs_present: 0,
        bytes_fetched: 0,
        kept: HashSet::new(),
    };
    let repos: Vec<String> = ex
        .catalog()
        .await?
        .into_iter()
        .filter(|r| patterns.iter().any(|p| p.matches(r)))
        .collect();
    let mut refs = Vec::new();
    for repo in &repos {
        for tag in ex.tags(repo).await? {
            let (bytes, media_type, digest) = ex.manifest(repo, &tag).await?;
            let size = bytes.len();
            ex.walk(repo, bytes, media_type.clone(), digest.clone())
                .await?;
            refs.push(json!({
                "mediaType": media_type,
                "digest": digest.to_string(),
                "size": size,
                "annotations": {REF_ANNOTATION: tag, REPO_ANNOTATION: repo},
            }));
        }
    }
    let tags = refs.len();
    let index = json!({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": refs});
    write_atomic(&dir.join("index.json"), &serde_json::to_vec_pretty(&index)?)?;
    // Written last, and what import reads: an export cut short leaves the previous one whole.
    let bundle = json!({
        "connectedRegistry": name,
        "repositories": repos,
        "manifests": ex.manifests,
        "tags": index["manifests"],
        "config": config,
    });
    write_atomic(&dir.join(BUNDLE_FILE), &serde_json::to_vec_pretty(&bundle)?)?;
    // What an earlier export held and this one does not (deleted or moved tags) goes.
    let mut pruned = 0u64;
    for alg in ["sha256", "sha512"] {
        let sub = dir.join("blobs").join(alg);
        let entries =
            std::fs::read_dir(&sub).with_context(|| format!("reading {}", sub.display()))?;
        for entry in entries {
            let path = entry?.path();
            let name = path
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            let keep = format!("{alg}:{name}")
                .parse::<Digest>()
                .is_ok_and(|d| ex.kept.contains(&d));
            if !keep {
                std::fs::remove_file(&path)
                    .with_context(|| format!("removing {}", path.display()))?;
                pruned += 1;
            }
        }
    }
    let summary = serde_json::json!({
        "directory": dir.display().to_string(),
        "repositories": repos.len(),
        "tags": tags,
        "manifests": ex.manifests.len(),
        "blobsDownloaded": ex.blobs_fetched,
        "bytesDownloaded": ex.bytes_fetched,
        "blobsPresent": ex.blobs_present,
        "blobsRemoved": pruned,
    });
    if !conn.print_generic(&summary)? {
        eprintln!(
            "exported {} repositories, {tags} tags, {} manifests to {}: {} blobs downloaded ({} bytes), {} already there, {pruned} no longer needed removed.",
            repos.len(),
            ex.manifests.len(),
            dir.display(),
            ex.blobs_fetched,
            ex.bytes_fetched,
            ex.blobs_present
        );
    }
    eprintln!("The bundle holds client tokens' password hashes: carry it like a secret.");
    Ok(())
}

/// Holds `<data_dir>/outpost.lock` for as long as the returned file lives, so two processes
/// never write one data directory (a server and an import, or two servers).
pub fn lock_data_dir(data_dir: &Path) -> anyhow::Result<std::fs::File> {
    use std::io::Write;
    std::fs::create_dir_all(data_dir)
        .with_context(|| format!("creating {}", data_dir.display()))?;
    let path = data_dir.join("outpost.lock");
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .read(true)
        .open(&path)
        .with_context(|| format!("opening {}", path.display()))?;
    match f.try_lock() {
        Ok(()) => {}
        Err(std::fs::TryLockError::WouldBlock) => {
            let holder = std::fs::read_to_string(&path).unwrap_or_default();
            bail!(
                "another Outpost process (pid {}) is using {}; stop it first",
                holder.trim(),
                data_dir.display()
            );
        }
        Err(std::fs::TryLockError::Error(e)) => {
            return Err(e).with_context(|| format!("locking {}", path.display()));
        }
    }
    f.set_len(0)
        .and_then(|()| write!(f, "{}", std::process::id()))
        .with_context(|| format!("writing {}", path.display()))?;
    Ok(f)
}

/// `outpost import --data-dir <site data dir> --dir <bundle>`. A data directory the import
/// created is removed again when the import fails: a refused bundle leaves nothing behind
/// that a later start or import would take for a site.
pub async fn import(
    data_dir: &Path,
    dir: &Path,
    blob_store: Option<&str>,
    json: bool,
) -> anyhow::Result<()> {
    let new = !data_dir.exists();
    let result = import_into(data_dir, dir, blob_store, json).await;
    if result.is_err()
        && new
        && let Err(e) = std::fs::remove_dir_all(data_dir)
    {
        eprintln!(
            "warning: could not remove {} after the failed import: {e}",
            data_dir.display()
        );
    }
    result
}

async fn import_into(
    data_dir: &Path,
    dir: &Path,
    blob_store: Option<&str>,
    json: bool,
) -> anyhow::Result<()> {
    let _lock = lock_data_dir(data_dir)?;
    let bundle: Value = serde_json::from_slice(
        &read_bounded(&dir.join(BUNDLE_FILE), 256 << 20)
            .with_context(|| format!("{} is not an Outpost bundle", dir.display()))?,
    )
    .with_context(|| format!("{} is not valid JSON", dir.join(BUNDLE_FILE).display()))?;
    let name = bundle["connectedRegistry"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    // A bundle belongs to one connected registry: never mix another one's content or tokens
    // into a site.
    let sync_dir = data_dir.join("sync");
    let saved = sync_dir.join("config.json");
    match outpost_sync::saved_owner(data_dir) {
        Some(current) if current != name => bail!(
            "this bundle is for connected registry {name:?}, but {} belongs to {current:?}",
            data_dir.display()
        ),
        Some(_) => {}
        // A registry that was never a connected registry (a root): the bundle would roll its
        // tags back to the parent's.
        None if data_dir.join("meta.db").exists() => bail!(
            "{} holds a registry that is not a connected registry (it has no sync state); \
             import fills the data directory of connected registry {name:?}, new or stopped, \
             not a root's",
            data_dir.display()
        ),
        None => {}
    }
    // What the bundle says about itself must agree: its configuration is for the registry
    // it names, and it holds only repositories that registry syncs.
    let scope: Option<Vec<outpost_control::RepoPattern>> = match &bundle["config"] {
        Value::Null => None,
        config => {
            let config_name = config["name"].as_str().unwrap_or_default();
            if config_name != name {
                bail!(
                    "this bundle names connected registry {name:?} but carries the configuration \
                     of {config_name:?}: it is damaged or was altered; export it again at the parent"
                );
            }
            Some(
                config["repositories"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter_map(|p| outpost_control::RepoPattern::parse(p.as_str()?).ok())
                    .collect(),
            )
        }
    };
    let in_scope = |repo: &RepoName| -> anyhow::Result<()> {
        match &scope {
            Some(patterns) if !patterns.iter().any(|p| p.matches(repo.as_str())) => bail!(
                "the bundle holds repository {repo}, which connected registry {name:?} does not \
                 sync: it is damaged or was altered; export it again at the parent"
            ),
            _ => Ok(()),
        }
    };
    // The blobs go where the site's server keeps them: as given, or as its data directory
    // recorded (the record's first line; an owner id and a claim mark may follow).
    let blob_store = blob_store.map(String::from).or_else(|| {
        std::fs::read_to_string(data_dir.join("blob-store"))
            .ok()
            .and_then(|s| s.lines().next().map(|l| l.trim().to_string()))
            .filter(|s| !s.is_empty() && s != "local")
    });
    let config = outpost_registry::RegistryConfig {
        blob_store,
        ..outpost_registry::RegistryConfig::default()
    };
    let registry = outpost_registry::Registry::open(data_dir, config)
        .await
        .context("opening the data directory")?
        // Stored as if synced: a ReadWrite site does not send it back up.
        .for_sync();
    let (mut manifests, mut blobs_stored, mut tags) = (0u64, 0u64, 0u64);
    let max_manifest = outpost_registry::RegistryConfig::default().max_manifest_bytes as u64;
    let read_manifest = |d: &Digest| -> anyhow::Result<Vec<u8>> {
        let bytes = read_bounded(&blob_path(dir, d), max_manifest)
            .with_context(|| format!("manifest {d} of the bundle"))?;
        let got = Digest::of(d.algorithm(), &bytes);
        if &got != d {
            bail!("manifest {d} in the bundle is damaged (it hashes to {got})");
        }
        Ok(bytes)
    };
    for m in bundle["manifests"].as_array().into_iter().flatten() {
        let repo: RepoName = m["repository"]
            .as_str()
            .unwrap_or_default()
            .parse()
            .context("a manifest's repository in the bundle")?;
        in_scope(&repo)?;
        let d: Digest = m["digest"]
            .as_str()
            .unwrap_or_default()
            .parse()
            .context("a manifest's digest in the bundle")?;
        let media_type = m["mediaType"].as_str().unwrap_or_default();
        let bytes = read_manifest(&d)?;
        let parsed = Manifest::parse(&bytes, Some(media_type))?;
        for b in parsed.required_blobs() {
            if registry
                .link_existing_blob(&repo, &b.digest, b.size)
                .await?
                .is_some()
            {
                continue;
            }
            // A regular file of the size the manifest gives, read no further than that: a
            // link to a device or a file that keeps growing is refused, not copied in.
            let path = blob_path(dir, &b.digest);
            let meta = std::fs::symlink_metadata(&path)
                .with_context(|| format!("the bundle lacks blob {}", b.digest))?;
            if !meta.is_file() || meta.len() != b.size {
                bail!(
                    "blob {} in the bundle is not a regular file of {} bytes, as its manifest \
                     says: it is damaged or was altered; export it again at the parent",
                    b.digest,
                    b.size
                );
            }
            let file = tokio::io::AsyncReadExt::take(
                tokio::fs::File::open(&path)
                    .await
                    .with_context(|| format!("the bundle lacks blob {}", b.digest))?,
                b.size,
            );
            let id = registry.start_upload(&repo).await?;
            // finish_upload verifies the digest: a damaged blob is refused, not stored.
            registry
                .finish_upload(
                    &repo,
                    &id,
                    &b.digest,
                    None,
                    Some(tokio_util::io::ReaderStream::new(file)),
                )
                .await
                .with_context(|| format!("storing blob {} of {repo}", b.digest))?;
            blobs_stored += 1;
        }
        registry
            .put_manifest(
                &repo,
                &Reference::Digest(d.clone()),
                Some(media_type),
                &bytes,
            )
            .await
            .with_context(|| format!("storing manifest {repo}@{d}"))?;
        manifests += 1;
    }
    for r in bundle["tags"].as_array().into_iter().flatten() {
        let repo: RepoName = r["annotations"][REPO_ANNOTATION]
            .as_str()
            .unwrap_or_default()
            .parse()
            .context("a tag's repository in the bundle")?;
        in_scope(&repo)?;
        let tag: Reference = r["annotations"][REF_ANNOTATION]
            .as_str()
            .unwrap_or_default()
            .parse()
            .context("a tag in the bundle")?;
        let d: Digest = r["digest"].as_str().unwrap_or_default().parse()?;
        let bytes = read_manifest(&d)?;
        registry
            .put_manifest(&repo, &tag, r["mediaType"].as_str(), &bytes)
            .await
            .with_context(|| format!("tagging {repo}:{tag}"))?;
        tags += 1;
    }
    // The bundle's configuration (client tokens included) is what the site starts from
    // offline. The next time the link is up the site fetches its configuration again (no
    // ETag) and reconciles every repository (no cursor): a bundle older than what the site
    // had cannot leave tags or tokens behind the parent's.
    let mut installed_config = false;
    if !bundle["config"].is_null() {
        std::fs::create_dir_all(&sync_dir)?;
        write_atomic(&saved, &serde_json::to_vec(&bundle["config"])?)?;
        installed_config = true;
    }
    for stale in ["etag", "cursor"] {
        let path = sync_dir.join(stale);
        match std::fs::remove_file(&path) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                return Err(e).with_context(|| format!("removing {}", path.display()));
            }
            _ => {}
        }
    }
    registry.close().await;
    if json {
        let summary = serde_json::json!({
            "dataDir": data_dir.display().to_string(),
            "manifests": manifests,
            "tags": tags,
            "blobsStored": blobs_stored,
            "configurationInstalled": installed_config,
        });
        println!("{}", serde_json::to_string_pretty(&summary)?);
        return Ok(());
    }
    eprintln!(
        "imported {manifests} manifests, {tags} tags and {blobs_stored} new blobs into {}{}",
        data_dir.display(),
        if installed_config {
            "; installed the connected registry's configuration (it starts without its parent, and reconciles with it once reachable)"
        } else {
            ""
        }
    );
    Ok(())
}
