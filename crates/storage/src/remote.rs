//! Blobs kept in an object store instead of on local disk: Amazon S3 or any store that speaks
//! its API (`s3://<bucket>/<prefix>`), or Azure Blob Storage (`az://<container>/<prefix>`).
//! This module owns the mapping from a digest to an object key, the transfer of a verified
//! upload into the store, and ranged reads back out. Credentials and endpoints come from the
//! environment variables the providers' own tools read (`AWS_*`, `AZURE_STORAGE_*`), through
//! `object_store`.
//!
//! Invariant: an object is written under `<prefix>/blobs/<alg>/<2 hex>/<hex>` only with bytes
//! already hashed to exactly that digest (upload sessions stay on local disk, since an object
//! store has no append), in one request or one multipart upload that the store makes visible
//! only when it completes. So a key in the store always holds the bytes its name says, and a
//! crash mid-transfer leaves no object at all.
//!
//! Reads are served in ranged requests of [`SEGMENT`] bytes, each fetched by a task of its own
//! and read whole before it is sent on: a client that reads slowly never holds a request to the
//! store open, so the store's per-request timeout applies to the store, not to the client's link.
//!
//! One store prefix belongs to one data directory: `<prefix>/outpost-owner` holds the id the
//! data directory recorded when it claimed it (`Storage::claim`). Two registries sharing a
//! prefix would each collect the other's blobs as orphans, so the second is refused.

use crate::{Result, StorageError};
use bytes::{Bytes, BytesMut};
use futures_util::stream::{self, BoxStream, StreamExt};
use object_store::path::Path as Key;
use object_store::{
    ClientConfigKey, ObjectStore, ObjectStoreExt, PutMode, PutOptions, PutPayload, RetryConfig,
    WriteMultipart,
};
use outpost_oci::Digest;
use std::io;
use std::sync::Arc;
use std::time::{Duration, SystemTime};
use tokio::io::AsyncReadExt;

/// Blobs up to this size are written with one request; larger ones in parts of this size
/// (S3 needs at least 5 MiB per part, all but the last).
const PART: usize = 8 << 20;
/// Parts of one blob being sent at once.
const PARTS_IN_FLIGHT: usize = 2;
/// Bytes of a blob fetched per read request while serving it. With one segment read ahead,
/// a download holds at most twice this in memory.
pub(crate) const SEGMENT: u64 = 4 << 20;

/// An object store holding the blob store, and where in it.
pub(crate) struct Remote {
    store: Arc<dyn ObjectStore>,
    prefix: Key,
    /// The URL in canonical form (`s3://` or `az://`, no trailing `/`); it never holds
    /// credentials.
    url: String,
    /// The id of the data directory that owns the prefix, once claimed.
    owner: std::sync::OnceLock<String>,
}

/// What the owner marker says, if anything.
pub(crate) enum Marker {
    Absent,
    Owner(String),
}

/// A recorded `blob_store` in the form [`Remote::url`] gives (so `s3a://b/p/` matches
/// `s3://b/p`); anything else (`local`) unchanged.
pub(crate) fn canonical(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_string();
    };
    let scheme = match scheme {
        "s3a" => "s3",
        "azure" => "az",
        other => other,
    };
    let rest: Vec<&str> = rest.split('/').filter(|p| !p.is_empty()).collect();
    format!("{scheme}://{}", rest.join("/"))
}

/// `url` with anything that could be a secret hidden: user information, a port-like suffix
/// of the authority, a query (Azure SAS tokens) and a fragment.
fn redacted(url: &str) -> String {
    let url = url.split(['?', '#']).next().unwrap_or_default();
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_string();
    };
    let (authority, path) = rest.split_once('/').unwrap_or((rest, ""));
    let host = authority.rsplit('@').next().unwrap_or_default();
    let host = host.split(':').next().unwrap_or_default();
    let hidden = if host.len() != authority.len() {
        "<hidden>@"
    } else {
        ""
    };
    format!("{scheme}://{hidden}{host}/{path}")
        .trim_end_matches('/')
        .to_string()
}

impl Remote {
    /// Opens the store a `s3://` or `az://` URL names. Nothing is requested yet: see
    /// [`Remote::check`].
    pub(crate) fn open(url: &str) -> Result<Remote> {
        // Never echo what could be a secret someone put in the URL.
        let shown = redacted(url);
        let bad = |why: &str| StorageError::Config(format!("blob_store {shown:?}: {why}"));
        let (scheme, rest) = url.split_once("://").ok_or_else(|| {
            bad("expected s3://<bucket>[/<prefix>] or az://<container>[/<prefix>]")
        })?;
        let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
        if bucket.is_empty() {
            return Err(bad("the bucket (or container) name is missing"));
        }
        if bucket.contains(['@', ':', '?', '#']) || prefix.contains(['?', '#']) {
            return Err(bad(
                "put no credentials, port or query in the URL; credentials and endpoints come \
                 from AWS_* or AZURE_STORAGE_* environment variables",
            ));
        }
        let prefix = Key::parse(prefix.trim_matches('/')).map_err(|e| bad(&e.to_string()))?;
        // A store that does not answer fails a request within one to two minutes (a timed-out
        // request, then its retries or a multipart abort), rather than the library's default
        // of up to three minutes of retries.
        let retry = RetryConfig {
            max_retries: 3,
            retry_timeout: Duration::from_secs(30),
            ..RetryConfig::default()
        };
        // Set key by key: replacing the client options would drop those the environment set
        // (AWS_ALLOW_HTTP, say).
        let timeouts = [
            (ClientConfigKey::Timeout, "60s"),
            (ClientConfigKey::ConnectTimeout, "5s"),
        ];
        let (store, scheme): (Arc<dyn ObjectStore>, &str) = match scheme {
            "s3" | "s3a" => (
                Arc::new(
                    timeouts
                        .into_iter()
                        .fold(
                            object_store::aws::AmazonS3Builder::from_env(),
                            |b, (k, v)| {
                                b.with_config(object_store::aws::AmazonS3ConfigKey::Client(k), v)
                            },
                        )
                        .with_bucket_name(bucket)
                        .with_retry(retry)
                        .build()
                        .map_err(|e| bad(&e.to_string()))?,
                ),
                "s3",
            ),
            "az" | "azure" => (
                Arc::new(
                    timeouts
                        .into_iter()
                        .fold(
                            object_store::azure::MicrosoftAzureBuilder::from_env(),
                            |b, (k, v)| {
                                b.with_config(object_store::azure::AzureConfigKey::Client(k), v)
                            },
                        )
                        .with_container_name(bucket)
                        .with_retry(retry)
                        .build()
                        .map_err(|e| bad(&e.to_string()))?,
                ),
                "az",
            ),
            other => {
                return Err(bad(&format!(
                    "unsupported scheme {other:?}; use s3:// (Amazon S3 and compatible stores) \
                     or az:// (Azure Blob Storage)"
                )));
            }
        };
        let url = format!("{scheme}://{bucket}/{prefix}")
            .trim_end_matches('/')
            .to_string();
        Ok(Remote {
            store,
            prefix,
            url,
            owner: std::sync::OnceLock::new(),
        })
    }

    pub(crate) fn url(&self) -> &str {
        &self.url
    }

    fn marker(&self) -> Key {
        self.prefix.clone().join("outpost-owner")
    }

    /// Reads the owner marker.
    pub(crate) async fn marker_owner(&self) -> Result<Marker> {
        let key = self.marker();
        match self.store.get(&key).await {
            Ok(r) => {
                let bytes = r.bytes().await.map_err(|e| self.err(&key, e))?;
                Ok(Marker::Owner(
                    String::from_utf8_lossy(&bytes).trim().to_string(),
                ))
            }
            Err(object_store::Error::NotFound { .. }) => Ok(Marker::Absent),
            Err(e) => Err(self.err(&key, e)),
        }
    }

    /// Writes the owner marker unless one is there; returns the owner it then holds.
    pub(crate) async fn mark_owner(&self, id: &str) -> Result<String> {
        let key = self.marker();
        let opts = PutOptions {
            mode: PutMode::Create,
            ..PutOptions::default()
        };
        let payload = PutPayload::from(Bytes::from(format!("{id}\n")));
        match self.store.put_opts(&key, payload, opts).await {
            Ok(_) => Ok(id.to_string()),
            Err(object_store::Error::AlreadyExists { .. })
            | Err(object_store::Error::Precondition { .. }) => match self.marker_owner().await? {
                Marker::Owner(o) => Ok(o),
                Marker::Absent => Ok(id.to_string()),
            },
            Err(object_store::Error::NotImplemented { .. }) => self
                .store
                .put(&key, PutPayload::from(Bytes::from(format!("{id}\n"))))
                .await
                .map(|_| id.to_string())
                .map_err(|e| self.err(&key, e)),
            Err(e) => Err(self.err(&key, e)),
        }
    }

    /// Remembers which data directory this process serves the prefix for.
    pub(crate) fn set_owner(&self, id: &str) {
        let _ = self.owner.set(id.to_string());
    }

    fn gone(&self, why: &str) -> StorageError {
        let key = self.marker();
        self.err(
            &key,
            object_store::Error::Generic {
                store: "blob_store",
                source: why.to_string().into(),
            },
        )
    }

    fn blobs(&self) -> Key {
        self.prefix.clone().join("blobs")
    }

    fn key(&self, d: &Digest) -> Key {
        let hex = d.hex();
        self.blobs()
            .join(d.algorithm().as_str())
            .join(&hex[..2])
            .join(hex)
    }

    fn err(&self, key: &Key, source: object_store::Error) -> StorageError {
        StorageError::Remote {
            key: format!(
                "{}/{key}",
                self.url.split('/').take(3).collect::<Vec<_>>().join("/")
            ),
            cause: source,
        }
    }

    /// Whether the store answers and the prefix is still this data directory's (for the
    /// readiness endpoint).
    pub(crate) async fn check(&self) -> Result<()> {
        let Some(mine) = self.owner.get() else {
            return Ok(());
        };
        match self.marker_owner().await? {
            Marker::Owner(o) if &o == mine => Ok(()),
            Marker::Owner(o) => Err(self.gone(&format!(
                "the prefix now belongs to another data directory ({o}, not {mine})"
            ))),
            Marker::Absent => {
                Err(self
                    .gone("the owner marker is gone: was the bucket, container or prefix deleted?"))
            }
        }
    }

    pub(crate) async fn size(&self, d: &Digest) -> Result<Option<u64>> {
        let key = self.key(d);
        match self.store.head(&key).await {
            Ok(m) => Ok(Some(m.size)),
            // A missing bucket answers like a missing key: a blob is only missing if the
            // prefix is still there, or clients would be told to push everything again.
            Err(object_store::Error::NotFound { .. }) => match self.owner.get() {
                Some(_) => match self.marker_owner().await? {
                    Marker::Owner(_) => Ok(None),
                    Marker::Absent => Err(self.gone(
                        "the owner marker is gone: was the bucket, container or prefix deleted?",
                    )),
                },
                None => Ok(None),
            },
            Err(e) => Err(self.err(&key, e)),
        }
    }

    /// Bytes `start..end` of a blob (all of it without a range), as a stream of segments,
    /// and the size of its object.
    pub(crate) async fn read(
        &self,
        d: &Digest,
        range: Option<(u64, u64)>,
    ) -> Result<(BoxStream<'static, io::Result<Bytes>>, u64)> {
        // Asked first so that a missing object is an error now, not a cut-off body later.
        let size = self
            .size(d)
            .await?
            .ok_or_else(|| StorageError::BlobUnknown(d.clone()))?;
        let (start, end) = range.unwrap_or((0, size));
        let end = end.min(size);
        let key = self.key(d);
        let url = self.url.clone();
        // Each segment is fetched by a task of its own, so it completes (or fails and is
        // retried) whatever pace the client reads at; at most one is fetched ahead.
        let fetch = {
            let (store, key) = (self.store.clone(), key.clone());
            move |r: std::ops::Range<u64>| {
                let (store, key, url) = (store.clone(), key.clone(), url.clone());
                async move {
                    let got = tokio::spawn(async move { get_segment(&*store, &key, r).await })
                        .await
                        .map_err(io::Error::other)?;
                    got.map_err(|e| {
                        tracing::error!(store = %url, error = %e, "reading a blob from the blob store failed mid-download");
                        io::Error::other(e)
                    })
                }
            }
        };
        let mut segments = (start..end)
            .step_by(SEGMENT as usize)
            .map(move |s| s..(s + SEGMENT).min(end));
        // The first segment is fetched before the response starts, so a store that fails is
        // a 503 rather than a body cut off after its headers.
        // (Fetched here rather than by `fetch`: an object deleted since the HEAD is unknown.)
        let first = match segments.next() {
            Some(r) => match get_segment(&*self.store, &key, r).await {
                Ok(b) => Some(b),
                Err(object_store::Error::NotFound { .. }) => {
                    return Err(StorageError::BlobUnknown(d.clone()));
                }
                Err(e) => return Err(self.err(&key, e)),
            },
            None => None,
        };
        let stream = stream::iter(first.map(Ok))
            .chain(stream::iter(segments).map(fetch).buffered(2))
            .boxed();
        Ok((stream, size))
    }

    /// Stores a blob held in memory, already verified.
    ///
    /// A conditional create: an object already at the key holds these bytes, unless the
    /// store damaged it (another size), in which case it is overwritten: a push is how a
    /// damaged blob is repaired. A write whose connection broke is sent again, at most
    /// twice: `object_store` does not retry a PUT that may have been sent, but a repeated
    /// create of the same bytes is harmless (it finds the first one's object).
    pub(crate) async fn put_bytes(&self, d: &Digest, bytes: Bytes) -> Result<()> {
        let key = self.key(d);
        let mut retries = 0;
        loop {
            let opts = PutOptions {
                mode: PutMode::Create,
                ..PutOptions::default()
            };
            match self
                .store
                .put_opts(&key, PutPayload::from(bytes.clone()), opts)
                .await
            {
                Ok(_) => return Ok(()),
                Err(
                    object_store::Error::AlreadyExists { .. }
                    | object_store::Error::Precondition { .. },
                ) => {
                    if self.holds(d, bytes.len() as u64).await? {
                        return Ok(());
                    }
                    return self.overwrite(&key, bytes).await;
                }
                // Stores without conditional writes: a plain write of the same bytes is as
                // good.
                Err(object_store::Error::NotImplemented { .. }) => {
                    return self.overwrite(&key, bytes).await;
                }
                Err(e) if retries < 2 && broken_connection(&e) => {
                    retries += 1;
                    tracing::info!(store = %self.url, error = %e, retry = retries, "a blob write lost its connection; sending it again");
                    tokio::time::sleep(Duration::from_millis(200 * retries)).await;
                }
                Err(e) => return Err(self.err(&key, e)),
            }
        }
    }

    /// Whether the object of `d` is there with `size` bytes. One of another size was
    /// damaged in the store (its bytes cannot be right): logged, and `false`.
    async fn holds(&self, d: &Digest, size: u64) -> Result<bool> {
        match self.size(d).await? {
            Some(n) if n == size => Ok(true),
            Some(n) => {
                tracing::error!(store = %self.url, digest = %d, in_store = n, size, "the blob store held this blob with the wrong size (damaged); writing the verified bytes over it");
                Ok(false)
            }
            None => Ok(false),
        }
    }

    async fn overwrite(&self, key: &Key, bytes: Bytes) -> Result<()> {
        self.store
            .put(key, PutPayload::from(bytes))
            .await
            .map(drop)
            .map_err(|e| self.err(key, e))
    }

    /// Stores the file of a verified upload of `size` bytes: in one request if it is small,
    /// else as a multipart upload, which the store makes visible only once complete.
    pub(crate) async fn put_file(
        &self,
        path: &std::path::Path,
        d: &Digest,
        size: u64,
    ) -> Result<()> {
        let io = |e: io::Error| StorageError::Io {
            path: path.to_path_buf(),
            cause: e,
        };
        if size <= PART as u64 {
            let bytes = tokio::fs::read(path).await.map_err(io)?;
            return self.put_bytes(d, Bytes::from(bytes)).await;
        }
        if self.holds(d, size).await? {
            return Ok(());
        }
        let key = self.key(d);
        let upload = self
            .store
            .put_multipart(&key)
            .await
            .map_err(|e| self.err(&key, e))?;
        let mut writer = WriteMultipart::new_with_chunk_size(upload, PART);
        // Exactly the verified bytes, whatever else the file might hold.
        let mut file = tokio::fs::File::open(path).await.map_err(io)?.take(size);
        let sent: Result<()> = async {
            loop {
                let mut buf = BytesMut::with_capacity(PART);
                while buf.len() < PART {
                    if file.read_buf(&mut buf).await.map_err(io)? == 0 {
                        break;
                    }
                }
                if buf.is_empty() {
                    return Ok(());
                }
                writer
                    .wait_for_capacity(PARTS_IN_FLIGHT)
                    .await
                    .map_err(|e| self.err(&key, e))?;
                writer.put(buf.freeze());
            }
        }
        .await;
        match sent {
            Ok(()) => match writer.finish().await {
                Ok(_) => Ok(()),
                // Another push of the same blob may have completed first: Azure then refuses
                // this one's block list (its uncommitted blocks were dropped). The object
                // being there, whole, is all that was wanted.
                Err(e) => match self.size(d).await {
                    Ok(Some(n)) if n == size => {
                        tracing::debug!(store = %self.url, error = %e, "a concurrent push stored this blob first");
                        Ok(())
                    }
                    _ => Err(self.err(&key, e)),
                },
            },
            Err(e) => {
                // Parts already sent are discarded by the store (and by its lifecycle rules
                // for incomplete uploads, should the abort itself fail).
                let _ = writer.abort().await;
                Err(e)
            }
        }
    }

    /// Every object under `blobs/` whose key names a digest, with when it was written.
    pub(crate) async fn list(&self) -> Result<Vec<(Digest, SystemTime)>> {
        let blobs = self.blobs();
        let mut listing = self.store.list(Some(&blobs));
        let mut out = Vec::new();
        while let Some(item) = listing.next().await {
            // A key this store cannot represent (an empty path segment, say) is not one of
            // ours: what cannot be listed is only ever left alone, never deleted.
            let m = match item {
                Ok(m) => m,
                Err(e @ object_store::Error::InvalidPath { .. }) => {
                    tracing::warn!(store = %self.url, error = %e, "a key in the blob store could not be listed; what is there is left alone");
                    continue;
                }
                // The listing itself failed: a collection must not go on as if it were whole.
                Err(e) => return Err(self.err(&blobs, e)),
            };
            let Some(parts) = m.location.prefix_match(&blobs) else {
                continue;
            };
            let parts: Vec<_> = parts.collect();
            let [alg, _, hex] = parts.as_slice() else {
                continue;
            };
            let Ok(digest) = format!("{}:{}", alg.as_ref(), hex.as_ref()).parse::<Digest>() else {
                continue;
            };
            if self.key(&digest) != m.location {
                continue;
            }
            let millis = u64::try_from(m.last_modified.timestamp_millis()).unwrap_or(0);
            out.push((
                digest,
                SystemTime::UNIX_EPOCH + Duration::from_millis(millis),
            ));
        }
        Ok(out)
    }

    /// Deletes a blob; `false` if it was not there.
    pub(crate) async fn delete(&self, d: &Digest) -> Result<bool> {
        if self.size(d).await?.is_none() {
            return Ok(false);
        }
        let key = self.key(d);
        match self.store.delete(&key).await {
            Ok(()) => Ok(true),
            Err(object_store::Error::NotFound { .. }) => Ok(false),
            Err(e) => Err(self.err(&key, e)),
        }
    }
}

/// Bytes `r` of `key`, refusing an answer of another length: a store (or a proxy) that cuts
/// a range short but says so in its Content-Length would otherwise have the next segment
/// sent at the wrong offset. A short answer is asked for again, at most twice.
async fn get_segment(
    store: &dyn ObjectStore,
    key: &Key,
    r: std::ops::Range<u64>,
) -> object_store::Result<Bytes> {
    let want = r.end - r.start;
    let mut tries = 0;
    loop {
        let got = store.get_range(key, r.clone()).await?;
        if got.len() as u64 == want {
            return Ok(got);
        }
        tries += 1;
        if tries == 3 {
            return Err(object_store::Error::Generic {
                store: "blob store",
                source: format!(
                    "asked for bytes {}..{} of {key}, got {} bytes, three times",
                    r.start,
                    r.end,
                    got.len()
                )
                .into(),
            });
        }
    }
}

/// Whether a request failed because its connection broke after it may have been sent (reset,
/// closed, an answer cut off): `object_store` retries only idempotent requests then.
fn broken_connection(e: &object_store::Error) -> bool {
    use object_store::client::{HttpError, HttpErrorKind};
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(s) = source {
        if let Some(h) = s.downcast_ref::<HttpError>() {
            return matches!(
                h.kind(),
                HttpErrorKind::Interrupted | HttpErrorKind::Unknown | HttpErrorKind::Decode
            );
        }
        source = s.source();
    }
    false
}
