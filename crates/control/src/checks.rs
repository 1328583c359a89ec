//! The password-check threads: every Argon2 hash and verification runs here, one thread per
//! core, each keeping one working memory (~19 MiB) from call to call while checks are queued
//! and unmapping it when none is. A flood of wrong passwords queues here: it costs these
//! threads time, and the process no memory beyond theirs. (On the blocking pool, every thread
//! that ever ran a check kept its own copy, and glibc kept the freed ones: 600 wrong logins
//! left the process at ~2.6 GB.) Blob reads and uploads, on the blocking pool, never wait
//! behind password checks.
//!
//! The queue is fair between clients: each client address has its own line, and the threads
//! take one check from each line in turn. A client sending a hundred wrong logins at once
//! makes others wait for one of its checks, not for all of them. The server names the client
//! of each request with [`as_client`]; checks made outside one (hashing a new password for
//! the management API, tests) share one line.

use crate::password;
use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Condvar, LazyLock, Mutex};

/// A password check (or hash) for an Argon2 thread, given that thread's working memory.
type Job = Box<dyn FnOnce(&mut password::Memory) + Send>;

/// Who a check is made for: the client's address, or `None` outside a request.
type Client = Option<IpAddr>;

tokio::task_local! {
    static CLIENT: Client;
}

/// Runs `f` (a request's handling) with its password checks queued in `client`'s line. An
/// IPv6 client's line is its /64 (one host commonly has the whole of it to pick addresses
/// from), an IPv4-mapped address is its IPv4 one.
pub async fn as_client<F: Future>(client: IpAddr, f: F) -> F::Output {
    CLIENT.scope(Some(line_of(client)), f).await
}

fn line_of(client: IpAddr) -> IpAddr {
    match client {
        IpAddr::V4(v4) => IpAddr::V4(v4),
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => IpAddr::V6((v6.to_bits() & !0xffff_ffff_ffff_ffffu128).into()),
        },
    }
}

/// Checks queued and not yet taken by a thread.
static QUEUED: AtomicU64 = AtomicU64::new(0);

/// Checks queued now, for the metrics.
pub(crate) fn queued() -> u64 {
    QUEUED.load(Ordering::Relaxed)
}

#[derive(Default)]
struct Lines {
    /// Each client's checks, oldest first; a client with none has no entry.
    by_client: HashMap<Client, VecDeque<Job>>,
    /// Clients with checks queued, in the order they get their next turn.
    turns: VecDeque<Client>,
}

impl Lines {
    fn push(&mut self, client: Client, job: Job) {
        let line = self.by_client.entry(client).or_default();
        if line.is_empty() {
            self.turns.push_back(client);
        }
        line.push_back(job);
    }

    /// The next client's oldest check; that client goes to the back of the turns.
    fn pop(&mut self) -> Option<Job> {
        let client = self.turns.pop_front()?;
        let line = self.by_client.get_mut(&client)?;
        let job = line.pop_front();
        if line.is_empty() {
            self.by_client.remove(&client);
        } else {
            self.turns.push_back(client);
        }
        job
    }
}

struct Pool {
    lines: Mutex<Lines>,
    ready: Condvar,
}

static POOL: LazyLock<Option<&'static Pool>> = LazyLock::new(|| {
    let wanted = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(2);
    let pool: &'static Pool = Box::leak(Box::new(Pool {
        lines: Mutex::default(),
        ready: Condvar::new(),
    }));
    let mut started = 0;
    for i in 0..wanted {
        let spawned = std::thread::Builder::new()
            .name(format!("argon2-{i}"))
            .spawn(move || work(pool));
        match spawned {
            Ok(_) => started += 1,
            Err(e) => tracing::error!(error = %e, "starting a password-check thread"),
        }
    }
    (started > 0).then_some(pool)
});

fn work(pool: &Pool) {
    let mut memory = password::Memory::new();
    loop {
        let job = {
            let mut lines = pool.lines.lock().unwrap_or_else(|p| p.into_inner());
            loop {
                if let Some(job) = lines.pop() {
                    QUEUED.fetch_sub(1, Ordering::AcqRel);
                    break job;
                }
                // Nothing queued: give the memory back while idle.
                memory.release();
                lines = pool.ready.wait(lines).unwrap_or_else(|p| p.into_inner());
            }
        };
        // A panic loses that one answer (its caller sees an error), not the thread.
        let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| job(&mut memory)));
    }
}

/// Runs `f` on a password-check thread with its working memory, in the line of the client
/// the current request comes from; `None` if it could not run.
pub(crate) async fn run<T: Send + 'static>(
    f: impl FnOnce(&mut password::Memory) -> T + Send + 'static,
) -> Option<T> {
    let client = CLIENT.try_with(|c| *c).ok().flatten();
    run_for(client, f).await
}

async fn run_for<T: Send + 'static>(
    client: Client,
    f: impl FnOnce(&mut password::Memory) -> T + Send + 'static,
) -> Option<T> {
    let pool = (*POOL)?;
    let (tx, rx) = tokio::sync::oneshot::channel();
    let job: Job = Box::new(move |memory| {
        // A caller that gave up (its client disconnected while queued) is not computed for.
        if !tx.is_closed() {
            let _ = tx.send(f(memory));
        }
    });
    QUEUED.fetch_add(1, Ordering::AcqRel);
    pool.lines
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .push(client, job);
    pool.ready.notify_one();
    rx.await.ok()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use std::sync::Arc;

    #[test]
    fn lines_are_per_ipv4_address_and_per_ipv6_64() {
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        assert_eq!(line_of(ip("192.0.2.7")), ip("192.0.2.7"));
        assert_eq!(line_of(ip("::ffff:192.0.2.7")), ip("192.0.2.7"));
        assert_eq!(line_of(ip("2001:db8:1:2:aaaa::1")), ip("2001:db8:1:2::"));
        assert_eq!(
            line_of(ip("2001:db8:1:2:ffff:ffff:ffff:ffff")),
            line_of(ip("2001:db8:1:2::1"))
        );
        assert_ne!(
            line_of(ip("2001:db8:1:3::1")),
            line_of(ip("2001:db8:1:2::1"))
        );
    }

    /// While every thread is busy, one client queues twenty checks and then another client
    /// one: the second client's check is among the next few run, not behind all twenty.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_client_waits_for_one_turn_of_another_not_its_whole_line() {
        assert!(POOL.is_some());
        let threads = std::thread::available_parallelism().unwrap().get();
        // Hold every thread until all the checks below are queued.
        let (started_tx, started_rx) = std::sync::mpsc::channel();
        let gate = Arc::new((Mutex::new(false), Condvar::new()));
        let mut holders = Vec::new();
        for _ in 0..threads {
            let (started_tx, gate) = (started_tx.clone(), gate.clone());
            holders.push(tokio::spawn(run_for(None, move |_| {
                started_tx.send(()).unwrap();
                let mut open = gate.0.lock().unwrap();
                while !*open {
                    open = gate.1.wait(open).unwrap();
                }
            })));
        }
        for _ in 0..threads {
            started_rx.recv().unwrap();
        }
        let order = Arc::new(Mutex::new(Vec::new()));
        let flooder: IpAddr = "192.0.2.1".parse().unwrap();
        let other: IpAddr = "192.0.2.2".parse().unwrap();
        let mut checks = Vec::new();
        for i in 0..20 {
            let order = order.clone();
            checks.push(tokio::spawn(run_for(Some(flooder), move |_| {
                order.lock().unwrap().push(format!("flood-{i}"))
            })));
        }
        // Spawned tasks queue when first polled: wait until all twenty are in line.
        while queued() < 20 {
            tokio::task::yield_now().await;
        }
        let o = order.clone();
        checks.push(tokio::spawn(run_for(Some(other), move |_| {
            o.lock().unwrap().push("other".to_string())
        })));
        while queued() < 21 {
            tokio::task::yield_now().await;
        }
        *gate.0.lock().unwrap() = true;
        gate.1.notify_all();
        for c in holders.into_iter().chain(checks) {
            c.await.unwrap().unwrap();
        }
        let order = order.lock().unwrap();
        assert_eq!(order.len(), 21);
        let at = order.iter().position(|c| c == "other").unwrap();
        // Taken second; threads running side by side may finish one or two others first.
        assert!(at <= threads, "the other client ran {at}th: {order:?}");
    }
}
