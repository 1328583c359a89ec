//! Serving connections: HTTP/1.1 through hyper, with the limits a server facing untrusted
//! clients needs and `axum::serve` does not set. A connection must send a request's head
//! within [`HEAD_TIMEOUT`] (which also closes a keep-alive connection idle that long), and a
//! request body that stops arriving for [`BODY_IDLE_TIMEOUT`] is cut off (an upload's chunk
//! is then rolled back). An answer the client stops reading — no byte of it taken for
//! [`WRITE_STALL_TIMEOUT`] — is cut off too. Without them a client that connects and sends
//! nothing, trickles a byte now and then, or starts a pull and then never reads, holds a file
//! descriptor (and, for a pull, a mapped blob) forever, and enough of them lock everyone
//! out. A slow link is not affected: only silence counts. Each request is handled as coming
//! from its connection's address, which decides where its password checks queue.

use axum::Router;
use axum::body::{Body, Bytes, HttpBody};
use axum::http::Request;
use hyper_util::rt::{TokioIo, TokioTimer};
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, ready};
use std::time::Duration;
use tokio::time::Instant;

/// How long a client may take to send a request's head, and how long a connection may sit
/// idle between requests.
pub const HEAD_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a request body may go without a single byte arriving.
pub const BODY_IDLE_TIMEOUT: Duration = Duration::from_secs(120);
/// How long an answer may wait to be written because the client takes none of it.
pub const WRITE_STALL_TIMEOUT: Duration = Duration::from_secs(120);

/// Serves `router` on every connection `listener` yields until `shutdown` completes, then
/// stops accepting and waits for the requests in flight to finish.
pub async fn serve<L>(
    listener: L,
    router: Router,
    shutdown: impl Future<Output = ()> + Send,
) -> std::io::Result<()>
where
    L: axum::serve::Listener<Addr = std::net::SocketAddr>,
{
    serve_with_stall(listener, router, shutdown, WRITE_STALL_TIMEOUT).await
}

/// [`serve`] with another write stall timeout (tests use a short one).
async fn serve_with_stall<L>(
    mut listener: L,
    router: Router,
    shutdown: impl Future<Output = ()> + Send,
    stall: Duration,
) -> std::io::Result<()>
where
    L: axum::serve::Listener<Addr = std::net::SocketAddr>,
{
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        // `Listener::accept` waits out failures (out of file descriptors) by itself.
        let (io, peer) = tokio::select! {
            accepted = listener.accept() => accepted,
            () = &mut shutdown => break,
        };
        // Password checks wait in one line per client address (see `outpost_control::checks`).
        let client = peer.ip();
        let router = hyper_util::service::TowerToHyperService::new(router.clone());
        let service = hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
            outpost_control::as_client(client, hyper::service::Service::call(&router, req))
        });
        let mut http = hyper::server::conn::http1::Builder::new();
        http.timer(TokioTimer::new())
            .header_read_timeout(HEAD_TIMEOUT);
        let conn = graceful
            .watch(http.serve_connection(TokioIo::new(StallGuard::new(io, stall)), service));
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, "connection ended with an error");
            }
        });
    }
    drop(listener);
    graceful.shutdown().await;
    Ok(())
}

/// A connection whose writes fail once the peer has taken no byte for `stall`. Reads pass
/// through untouched (their silences are bounded by the head and body timeouts), and so does
/// an idle keep-alive connection: only a write that is waiting counts.
struct StallGuard<T> {
    io: T,
    stall: Duration,
    /// Since when a write has been waiting for room (`None` while none is).
    waiting_since: Option<Instant>,
    /// Armed only while a write waits, and moved on lazily when it fires.
    timer: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl<T> StallGuard<T> {
    fn new(io: T, stall: Duration) -> StallGuard<T> {
        StallGuard {
            io,
            stall,
            waiting_since: None,
            timer: None,
        }
    }

    /// After a write returned `Pending`: an error once the wait has lasted `stall`, else
    /// `Pending` with the timer armed to wake this task at the deadline.
    fn check_stall(&mut self, cx: &mut Context<'_>) -> Poll<std::io::Error> {
        let since = *self.waiting_since.get_or_insert_with(Instant::now);
        let deadline = since + self.stall;
        let timer = self
            .timer
            .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
        loop {
            ready!(timer.as_mut().poll(cx));
            if Instant::now() >= deadline {
                return Poll::Ready(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    format!("the client took no byte of the answer for {:?}", self.stall),
                ));
            }
            timer.as_mut().reset(deadline);
        }
    }

    /// Passes a write's outcome on, watching for a stall while it is `Pending`.
    fn watch<R>(
        &mut self,
        cx: &mut Context<'_>,
        polled: Poll<std::io::Result<R>>,
    ) -> Poll<std::io::Result<R>> {
        match polled {
            Poll::Ready(r) => {
                self.waiting_since = None;
                Poll::Ready(r)
            }
            Poll::Pending => self.check_stall(cx).map(Err),
        }
    }
}

impl<T: tokio::io::AsyncRead + Unpin> tokio::io::AsyncRead for StallGuard<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl<T: tokio::io::AsyncWrite + Unpin> tokio::io::AsyncWrite for StallGuard<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let polled = Pin::new(&mut self.io).poll_write(cx, buf);
        self.watch(cx, polled)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let polled = Pin::new(&mut self.io).poll_write_vectored(cx, bufs);
        self.watch(cx, polled)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let polled = Pin::new(&mut self.io).poll_flush(cx);
        self.watch(cx, polled)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let polled = Pin::new(&mut self.io).poll_shutdown(cx);
        self.watch(cx, polled)
    }
}

/// Wraps a request body so that it fails once no data has arrived for `idle`. A request
/// without a body (most of them: every pull) is left as it is, at no cost.
pub(crate) fn with_idle_timeout(req: Request<Body>, idle: Duration) -> Request<Body> {
    if req.body().is_end_stream() {
        return req;
    }
    req.map(|body| {
        Body::new(IdleBody {
            inner: body,
            idle,
            waiting_since: None,
            timer: None,
        })
    })
}

struct IdleBody {
    inner: Body,
    idle: Duration,
    /// Since when the reader has been waiting for the client (`None` while it is not): only
    /// that time counts, never time the reader spent elsewhere (a lock, a slow disk) before
    /// asking again.
    waiting_since: Option<Instant>,
    /// Armed only while the body is waiting, and moved on lazily when it fires.
    timer: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl HttpBody for IdleBody {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, Self::Error>>> {
        let this = &mut *self;
        if let Poll::Ready(frame) = Pin::new(&mut this.inner).poll_frame(cx) {
            this.waiting_since = None;
            return Poll::Ready(frame);
        }
        let since = *this.waiting_since.get_or_insert_with(Instant::now);
        let deadline = since + this.idle;
        // The timer is not moved on for every wait: when it fires early (it was set for an
        // earlier wait), it is set again for this one.
        let timer = this
            .timer
            .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
        loop {
            ready!(timer.as_mut().poll(cx));
            if Instant::now() >= deadline {
                return Poll::Ready(Some(Err(axum::Error::new(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    format!("no bytes of the request body arrived for {:?}", this.idle),
                )))));
            }
            timer.as_mut().reset(deadline);
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;

    #[tokio::test]
    async fn a_body_that_goes_silent_fails_and_a_slow_one_does_not() {
        let (tx, rx) = tokio::sync::mpsc::channel::<Result<Bytes, std::io::Error>>(4);
        let body = Body::from_stream(stream_of(rx));
        let idle = Duration::from_millis(400);
        let mut body = with_idle_timeout(Request::new(body), idle).into_body();
        let sender = tokio::spawn(async move {
            // Slow but steady: a byte every 300 ms, five times.
            for _ in 0..5 {
                tokio::time::sleep(Duration::from_millis(300)).await;
                tx.send(Ok(Bytes::from_static(b"x"))).await.unwrap();
            }
            // Then silence, with the sender still connected.
            tokio::time::sleep(Duration::from_secs(3600)).await;
            drop(tx);
        });
        let started = Instant::now();
        let mut got = 0;
        let err = loop {
            match body.frame().await {
                Some(Ok(f)) => got += f.into_data().map_or(0, |d| d.len()),
                Some(Err(e)) => break e,
                None => panic!("the body ended instead of timing out"),
            }
        };
        assert_eq!(got, 5, "every byte of the slow body arrived");
        assert!(started.elapsed() >= Duration::from_millis(1900));
        assert!(
            err.to_string()
                .contains("no bytes of the request body arrived for 400ms"),
            "{err}"
        );
        sender.abort();
    }

    /// Time the reader spends elsewhere before it asks (waiting for an upload's lock, say)
    /// is not the client's silence.
    #[tokio::test]
    async fn only_waiting_for_the_client_counts() {
        let (tx, rx) = tokio::sync::mpsc::channel::<Result<Bytes, std::io::Error>>(4);
        let body = Body::from_stream(stream_of(rx));
        let mut body =
            with_idle_timeout(Request::new(body), Duration::from_millis(400)).into_body();
        tokio::time::sleep(Duration::from_millis(600)).await;
        let sender = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(100)).await;
            tx.send(Ok(Bytes::from_static(b"late"))).await.unwrap();
        });
        let frame = body
            .frame()
            .await
            .expect("a frame")
            .expect("data, not a timeout");
        assert_eq!(frame.into_data().unwrap(), Bytes::from_static(b"late"));
        sender.await.unwrap();
    }

    /// Through the real server: a client that sends a head and one byte of a 100-byte body,
    /// then nothing, gets an answer once the body has been silent for the idle time.
    #[tokio::test]
    async fn a_silent_body_is_cut_off_by_the_real_server() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let app = Router::new()
            .route(
                "/echo",
                axum::routing::post(|body: Bytes| async move { body.len().to_string() }),
            )
            .layer(axum::middleware::from_fn(
                |req: axum::extract::Request, next: axum::middleware::Next| async move {
                    next.run(with_idle_timeout(req, Duration::from_millis(300)))
                        .await
                },
            ));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(serve(listener, app, std::future::pending()));
        let mut c = tokio::net::TcpStream::connect(addr).await.unwrap();
        c.write_all(b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{")
            .await
            .unwrap();
        let mut buf = vec![0u8; 1024];
        let n = tokio::time::timeout(Duration::from_secs(5), c.read(&mut buf))
            .await
            .expect("an answer within 5 s")
            .unwrap();
        let answer = String::from_utf8_lossy(&buf[..n]).to_string();
        assert!(answer.starts_with("HTTP/1.1 4"), "{answer}");
    }

    /// A server answering `GET /big` with `size` bytes, whose writes stall out after `stall`.
    async fn big_answer_server(size: usize, stall: Duration) -> std::net::SocketAddr {
        let body = Bytes::from(vec![7u8; size]);
        let app = Router::new().route("/big", axum::routing::get(move || async move { body }));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(serve_with_stall(
            listener,
            app,
            std::future::pending(),
            stall,
        ));
        addr
    }

    /// Reads the rest of the connection, `chunk` bytes at a time with `pause` between reads,
    /// and returns how many bytes came before it ended.
    async fn read_to_end(c: &mut tokio::net::TcpStream, chunk: usize, pause: Duration) -> usize {
        use tokio::io::AsyncReadExt;
        let mut buf = vec![0u8; chunk];
        let mut total = 0;
        loop {
            match c.read(&mut buf).await {
                Ok(0) | Err(_) => return total,
                Ok(n) => total += n,
            }
            tokio::time::sleep(pause).await;
        }
    }

    /// A client that asks for a large answer and then reads none of it loses the connection
    /// once the stall time has passed; the answer is not delivered to it later.
    #[tokio::test]
    async fn an_answer_nobody_reads_is_cut_off() {
        use tokio::io::AsyncWriteExt;
        let size = 128 << 20;
        let addr = big_answer_server(size, Duration::from_millis(300)).await;
        let mut c = tokio::net::TcpStream::connect(addr).await.unwrap();
        c.write_all(b"GET /big HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_secs(2)).await;
        let got = tokio::time::timeout(
            Duration::from_secs(10),
            read_to_end(&mut c, 1 << 20, Duration::ZERO),
        )
        .await
        .expect("the server closed the stalled connection");
        assert!(
            got < size,
            "only what the socket buffers held arrived: {got}"
        );
    }

    /// A client that reads slowly but never stops gets the whole answer.
    #[tokio::test]
    async fn a_slow_reader_gets_the_whole_answer() {
        use tokio::io::AsyncWriteExt;
        let size = 24 << 20;
        let addr = big_answer_server(size, Duration::from_millis(300)).await;
        let mut c = tokio::net::TcpStream::connect(addr).await.unwrap();
        c.write_all(b"GET /big HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .await
            .unwrap();
        // 1 MiB every 100 ms: about 2.5 s in all, far longer than the stall time.
        let got = read_to_end(&mut c, 1 << 20, Duration::from_millis(100)).await;
        assert!(got > size, "head and all {size} body bytes arrived: {got}");
    }

    /// A stream of the channel's items.
    fn stream_of(
        mut rx: tokio::sync::mpsc::Receiver<Result<Bytes, std::io::Error>>,
    ) -> impl futures_util::Stream<Item = Result<Bytes, std::io::Error>> {
        futures_util::stream::poll_fn(move |cx| rx.poll_recv(cx))
    }
}
