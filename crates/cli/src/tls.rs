//! HTTPS for `outpost serve`: loads the operator's certificate chain and private key (PEM), and
//! turns the TCP listener into a TLS listener that `outpost_server::serve` drives like a plain one.
//!
//! Handshakes run in their own tasks, each bounded by a timeout, and only finished connections
//! reach the server. A client that connects and stays silent (or speaks plain HTTP to the TLS
//! port) therefore never holds up anyone else's accept.

use anyhow::{Context, bail};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::Duration;
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsAcceptor;
use tokio_rustls::rustls::{self, pki_types, sign::CertifiedKey};

/// How long a client may take to complete the TLS handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Finished handshakes waiting for the server to pick them up.
const READY_QUEUE: usize = 256;

/// The server's certificate and key, read again from their files on `SIGHUP` (a renewed
/// certificate is served without a restart). A reload that fails keeps the pair in use.
#[derive(Debug)]
pub struct Certificate {
    cert: PathBuf,
    key: PathBuf,
    current: RwLock<Arc<CertifiedKey>>,
}

impl Certificate {
    /// Reads `cert` (the server certificate followed by any intermediates) and `key` (PKCS#8,
    /// PKCS#1 or SEC1), and checks that they belong together.
    pub fn load(cert: &Path, key: &Path) -> anyhow::Result<Arc<Certificate>> {
        Ok(Arc::new(Certificate {
            cert: cert.to_path_buf(),
            key: key.to_path_buf(),
            current: RwLock::new(read_pair(cert, key)?),
        }))
    }

    /// Reads the files again; from now on new connections get what they hold.
    pub fn reload(&self) -> anyhow::Result<()> {
        let pair = read_pair(&self.cert, &self.key)?;
        *self.current.write().unwrap_or_else(|p| p.into_inner()) = pair;
        Ok(())
    }

    /// The files it is read from.
    pub fn paths(&self) -> (&Path, &Path) {
        (&self.cert, &self.key)
    }
}

impl rustls::server::ResolvesServerCert for Certificate {
    fn resolve(&self, _hello: rustls::server::ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(
            self.current
                .read()
                .unwrap_or_else(|p| p.into_inner())
                .clone(),
        )
    }
}

fn read_pair(cert: &Path, key: &Path) -> anyhow::Result<Arc<CertifiedKey>> {
    use pki_types::pem::PemObject;
    for (what, path) in [("certificate", cert), ("private key", key)] {
        std::fs::metadata(path)
            .with_context(|| format!("reading TLS {what} {}", path.display()))?;
    }
    let chain = pki_types::CertificateDer::pem_file_iter(cert)
        .with_context(|| format!("reading TLS certificate {}", cert.display()))?
        .collect::<Result<Vec<_>, _>>()
        .with_context(|| format!("reading TLS certificate {}", cert.display()))?;
    if chain.is_empty() {
        bail!(
            "TLS certificate {}: no PEM certificate found (expected \"-----BEGIN CERTIFICATE-----\")",
            cert.display()
        );
    }
    let private = pki_types::PrivateKeyDer::from_pem_file(key).with_context(|| {
        format!(
            "reading TLS private key {}: expected a PEM private key",
            key.display()
        )
    })?;
    let pair = CertifiedKey::from_der(chain, private, &rustls::crypto::ring::default_provider())
        .with_context(|| {
            format!(
                "TLS certificate {} and key {} do not form a usable pair",
                cert.display(),
                key.display()
            )
        })?;
    Ok(Arc::new(pair))
}

/// The TLS settings serving `certificate`.
pub fn server_config(certificate: Arc<Certificate>) -> anyhow::Result<Arc<rustls::ServerConfig>> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .context("TLS protocol versions")?
        .with_no_client_auth()
        .with_cert_resolver(certificate);
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// A listener yielding connections whose TLS handshake has completed.
pub struct TlsListener {
    ready: tokio::sync::mpsc::Receiver<(tokio_rustls::server::TlsStream<TcpStream>, SocketAddr)>,
    local: SocketAddr,
}

impl TlsListener {
    /// Accepts on `tcp` and performs handshakes with `config` in the background.
    pub fn new(
        tcp: TcpListener,
        config: Arc<rustls::ServerConfig>,
    ) -> std::io::Result<TlsListener> {
        let local = tcp.local_addr()?;
        let (tx, ready) = tokio::sync::mpsc::channel(READY_QUEUE);
        let acceptor = TlsAcceptor::from(config);
        tokio::spawn(async move {
            let mut errors = crate::listen::AcceptErrors::default();
            loop {
                // Once the server is gone (graceful shutdown dropped the listener), stop
                // accepting instead of completing handshakes nobody will serve.
                let (stream, peer) = tokio::select! {
                    a = crate::listen::accept(&tcp, &mut errors) => a,
                    () = tx.closed() => return,
                };
                let (acceptor, ready) = (acceptor.clone(), tx.clone());
                tokio::spawn(async move {
                    let handshake = async {
                        if speaks_plain_http(&stream).await {
                            answer_plain_http(stream).await;
                            return None;
                        }
                        Some(acceptor.accept(stream).await)
                    };
                    match tokio::time::timeout(HANDSHAKE_TIMEOUT, handshake).await {
                        Ok(Some(Ok(tls))) => {
                            let _ = ready.send((tls, peer)).await;
                        }
                        Ok(Some(Err(e))) => {
                            tracing::debug!(%peer, error = %e, "TLS handshake failed")
                        }
                        Ok(None) => tracing::debug!(%peer, "plain HTTP on the HTTPS port"),
                        Err(_) => tracing::debug!(%peer, "TLS handshake timed out"),
                    }
                });
            }
        });
        Ok(TlsListener { ready, local })
    }
}

/// Whether the client's first byte is a letter, as a plain HTTP request begins (a TLS
/// handshake begins with the byte 22).
async fn speaks_plain_http(stream: &TcpStream) -> bool {
    let mut first = [0u8; 1];
    matches!(stream.peek(&mut first).await, Ok(1) if first[0].is_ascii_uppercase())
}

/// Tells a plain HTTP client, in plain HTTP, that this port speaks HTTPS (as Go's servers do),
/// instead of a TLS alert its HTTP parser cannot read.
async fn answer_plain_http(mut stream: TcpStream) {
    use tokio::io::AsyncWriteExt;
    const BODY: &str = "this port serves HTTPS: use https://\n";
    let answer = format!(
        "HTTP/1.1 400 Bad Request\r\ncontent-type: text/plain\r\ncontent-length: {}\r\n\
         connection: close\r\n\r\n{BODY}",
        BODY.len()
    );
    let _ = stream.write_all(answer.as_bytes()).await;
    let _ = stream.shutdown().await;
}

impl axum::serve::Listener for TlsListener {
    type Io = tokio_rustls::server::TlsStream<TcpStream>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        match self.ready.recv().await {
            Some(conn) => conn,
            // The accept task only ends when this listener is gone; nothing more will come.
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        Ok(self.local)
    }
}
