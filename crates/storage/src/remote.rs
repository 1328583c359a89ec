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
//! Reads are served in ranged requests of [`SEGMENT`] bytes, each read whole before it is
//! sent on: a client that reads slowly never holds a request to the store open, so the
//! store's per-request timeout applies to the store, not to the client's link.

use crate::{Result, StorageError};
use bytes::{Bytes, BytesMut};
use futures_util::stream::{self, BoxStream, StreamExt, TryStreamExt};
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
    /// The URL it was opened from (it never holds credentials), for messages.
    url: String,
}

impl Remote {
    /// Opens the store a `s3://` or `az://` URL names. Nothing is requested yet: see
    /// [`Remote::check`].
    pub(crate) fn open(url: &str) -> Result<Remote> {
        // Never echo what could be a secret someone put in the URL.
        let shown = match url.split_once('@') {
            Some((_, host)) => format!("<scheme>://<hidden>@{host}"),
            None => url.to_string(),
        };
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
        // A store that does not answer fails a request within about a minute, rather than
        // holding a client for the library's default of three.
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
        let store: Arc<dyn ObjectStore> = match scheme {
            "s3" | "s3a" => Arc::new(
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
            "az" | "azure" => Arc::new(
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
            other => {
                return Err(bad(&format!(
                    "unsupported scheme {other:?}; use s3:// (Amazon S3 and compatible stores) \
                     or az:// (Azure Blob Storage)"
                )));
            }
        };
        Ok(Remote {
            store,
            prefix,
            url: url.to_string(),
        })
    }

    pub(crate) fn url(&self) -> &str {
        &self.url
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
            source,
        }
    }

    /// Whether the store answers for this prefix (for the readiness endpoint).
    pub(crate) async fn check(&self) -> Result<()> {
        self.store
            .list_with_delimiter(Some(&self.prefix))
            .await
            .map(drop)
            .map_err(|e| self.err(&self.prefix, e))
    }

    pub(crate) async fn size(&self, d: &Digest) -> Result<Option<u64>> {
        let key = self.key(d);
        match self.store.head(&key).await {
            Ok(m) => Ok(Some(m.size)),
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(self.err(&key, e)),
        }
    }

    /// Bytes `start..end` of a blob (all of it without a range), as a stream of segments.
    pub(crate) async fn read(
        &self,
        d: &Digest,
        range: Option<(u64, u64)>,
    ) -> Result<BoxStream<'static, io::Result<Bytes>>> {
        // Asked first so that a missing object is an error now, not a cut-off body later.
        let size = self
            .size(d)
            .await?
            .ok_or_else(|| StorageError::BlobUnknown(d.clone()))?;
        let (start, end) = range.unwrap_or((0, size));
        let end = end.min(size);
        let (store, key) = (self.store.clone(), self.key(d));
        let segments = (start..end)
            .step_by(SEGMENT as usize)
            .map(move |s| s..(s + SEGMENT).min(end));
        Ok(stream::iter(segments)
            .map(move |r| {
                let (store, key) = (store.clone(), key.clone());
                async move { store.get_range(&key, r).await.map_err(io::Error::other) }
            })
            .buffered(2)
            .boxed())
    }

    /// Stores a blob held in memory, already verified.
    pub(crate) async fn put_bytes(&self, d: &Digest, bytes: Bytes) -> Result<()> {
        let key = self.key(d);
        let opts = PutOptions {
            mode: PutMode::Create,
            ..PutOptions::default()
        };
        match self
            .store
            .put_opts(&key, PutPayload::from(bytes.clone()), opts)
            .await
        {
            // Content-addressed: what is there already holds these bytes.
            Ok(_)
            | Err(object_store::Error::AlreadyExists { .. })
            | Err(object_store::Error::Precondition { .. }) => Ok(()),
            // Stores without conditional writes: a plain write of the same bytes is as good.
            Err(object_store::Error::NotImplemented { .. }) => self
                .store
                .put(&key, PutPayload::from(bytes))
                .await
                .map(drop)
                .map_err(|e| self.err(&key, e)),
            Err(e) => Err(self.err(&key, e)),
        }
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
            source: e,
        };
        if size <= PART as u64 {
            let bytes = tokio::fs::read(path).await.map_err(io)?;
            return self.put_bytes(d, Bytes::from(bytes)).await;
        }
        if self.size(d).await?.is_some() {
            return Ok(());
        }
        let key = self.key(d);
        let upload = self
            .store
            .put_multipart(&key)
            .await
            .map_err(|e| self.err(&key, e))?;
        let mut writer = WriteMultipart::new_with_chunk_size(upload, PART);
        let mut file = tokio::fs::File::open(path).await.map_err(io)?;
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
            Ok(()) => writer
                .finish()
                .await
                .map(drop)
                .map_err(|e| self.err(&key, e)),
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
        let listed: Vec<object_store::ObjectMeta> = self
            .store
            .list(Some(&blobs))
            .try_collect()
            .await
            .map_err(|e| self.err(&blobs, e))?;
        let mut out = Vec::new();
        for m in listed {
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
