//! Accepting TCP connections for `outpost serve`, for the plain HTTP listener and the TLS one
//! alike: a failure to accept (out of file descriptors, most often) is waited out instead of
//! retried in a spin, and said in the log — at once, then at most every 10 s with a count —
//! instead of leaving clients hanging with nothing in the log to say why.

use std::net::SocketAddr;
use std::time::{Duration, Instant};
use tokio::net::{TcpListener, TcpStream};

/// How often a persisting accept failure is logged again.
const LOG_EVERY: Duration = Duration::from_secs(10);
/// How long to wait after a failed accept before trying again.
const RETRY_AFTER: Duration = Duration::from_millis(100);

/// Accept failures since the last one logged.
#[derive(Default)]
pub struct AcceptErrors {
    logged: Option<Instant>,
    unlogged: u64,
}

impl AcceptErrors {
    fn record(&mut self, e: &std::io::Error) {
        if self.logged.is_some_and(|t| t.elapsed() < LOG_EVERY) {
            self.unlogged += 1;
            return;
        }
        let more = std::mem::take(&mut self.unlogged);
        self.logged = Some(Instant::now());
        // EMFILE (this process's limit) or ENFILE (the system's).
        if matches!(e.raw_os_error(), Some(24 | 23)) {
            let limit = rlimit::getrlimit(rlimit::Resource::NOFILE)
                .map(|(soft, _)| soft.to_string())
                .unwrap_or_else(|_| "unknown".into());
            tracing::warn!(
                error = %e,
                open_files_limit = %limit,
                failed_since_last_report = more,
                "cannot accept connections: out of file descriptors; new clients wait until \
                 some connections close (raise the limit: ulimit -n, LimitNOFILE= in a systemd \
                 unit, --ulimit nofile= for docker)"
            );
        } else {
            tracing::warn!(error = %e, failed_since_last_report = more, "accepting a connection failed");
        }
    }
}

/// The next connection on `tcp`, with `TCP_NODELAY` set (small answers, manifests and gateway
/// calls, must not wait for delayed ACKs). Failures are waited out and logged through
/// `errors`.
pub async fn accept(tcp: &TcpListener, errors: &mut AcceptErrors) -> (TcpStream, SocketAddr) {
    loop {
        match tcp.accept().await {
            Ok((stream, peer)) => {
                if let Err(e) = stream.set_nodelay(true) {
                    tracing::debug!(error = %e, "could not set TCP_NODELAY");
                }
                return (stream, peer);
            }
            // The client gave up before we took the connection: nothing to wait for.
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::ConnectionAborted | std::io::ErrorKind::ConnectionReset
                ) => {}
            Err(e) => {
                errors.record(&e);
                tokio::time::sleep(RETRY_AFTER).await;
            }
        }
    }
}

/// The plain HTTP listener.
pub struct PlainListener {
    tcp: TcpListener,
    errors: AcceptErrors,
}

impl PlainListener {
    pub fn new(tcp: TcpListener) -> PlainListener {
        PlainListener {
            tcp,
            errors: AcceptErrors::default(),
        }
    }
}

impl axum::serve::Listener for PlainListener {
    type Io = TcpStream;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        accept(&self.tcp, &mut self.errors).await
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        self.tcp.local_addr()
    }
}
