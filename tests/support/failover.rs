//! A store failover under load, written once for every shared store (`tests/failover.rs`:
//! PostgreSQL and Redis by hand; `tests/sentinel.rs`: Redis under Sentinel): two sidecars on
//! the store in front of one counting upstream (two replicas of one service), callers with
//! retries and hedged copies spread over both; once enough keys are answered the test's
//! failure runs; every key is retried until it is answered; then every answer a caller got
//! is asked for again, through both sidecars.

use super::{add, apply, client, ledger, reason, start_sidecar, was_replayed};
use idemproxy::config::RunSettings;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU16, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Keys each run sends.
pub const KEYS: usize = 120;

/// Keys in flight at once.
const IN_FLIGHT: usize = 16;

/// Acknowledged keys before the failure.
pub const ACKNOWLEDGED_BEFORE_FAILOVER: usize = 40;

/// What one run saw.
#[derive(Debug, Default)]
pub struct Verdict {
    /// Keys answered.
    pub acknowledged: usize,
    /// Keys that ended IN_DOUBT (`IDEMPOTENCY_OUTCOME_UNKNOWN`).
    pub in_doubt: usize,
    /// Keys the service executed more than once.
    pub executed_twice: usize,
    /// Answered keys that, asked again, ran again or were answered otherwise.
    pub lost: usize,
    /// From the end of the failure to the first fresh key answered after it.
    pub served_again_after: Duration,
}

/// How one key ended: an answer (its execution number), or IN_DOUBT.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Ended {
    Answered(u64),
    InDoubt,
}

/// Sends `key` until it is answered, alternating sidecars; its first try is two hedged
/// copies, one to each.
async fn until_answered(sidecars: [SocketAddr; 2], n: usize) -> Ended {
    let (key, account) = (format!("key-{n}"), format!("account-{n}"));
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    let mut clients = [client(sidecars[0]).await, client(sidecars[1]).await];
    for attempt in 0.. {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{key} unanswered after 120 s"
        );
        let tries: Vec<_> = (0..if attempt == 0 { 2 } else { 1 })
            .map(|copy| {
                let mut client = clients[(n + attempt + copy) % 2].clone();
                let (key, account) = (key.clone(), account.clone());
                tokio::spawn(
                    async move { apply(&mut client, add(&account, 1), Some(&key), None).await },
                )
            })
            .collect();
        for tried in tries {
            match tried.await.unwrap() {
                Ok(reply) => return Ended::Answered(reply.get_ref().execution),
                Err(status) if reason(&status) == "IDEMPOTENCY_OUTCOME_UNKNOWN" => {
                    return Ended::InDoubt;
                }
                Err(_) => {}
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        // A connection the failover broke is made again.
        if attempt % 10 == 9 {
            clients = [client(sidecars[0]).await, client(sidecars[1]).await];
        }
    }
    unreachable!()
}

/// How long after now a fresh key is first answered through `sidecar` (within 120 s).
async fn served_again(sidecar: SocketAddr) -> Duration {
    let started = tokio::time::Instant::now();
    let mut client = client(sidecar).await;
    for n in 0.. {
        let (key, account) = (format!("probe-key-{n}"), format!("probe-{n}"));
        if apply(&mut client, add(&account, 1), Some(&key), None)
            .await
            .is_ok()
        {
            return started.elapsed();
        }
        assert!(
            started.elapsed() < Duration::from_secs(120),
            "no fresh key answered within 120 s of the failover"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
        if n % 10 == 9 {
            client = super::client(sidecar).await;
        }
    }
    unreachable!()
}

/// Two sidecars set up by `store`, callers on both; `fail_over` runs once enough keys are
/// answered (its result is kept until the end, so the servers it hands back outlive the
/// check); then every answer is asked for again.
pub async fn under_load<T: Send + 'static>(
    store: impl Fn(&mut RunSettings) + Clone + Send + 'static,
    fail_over: impl FnOnce() -> T + Send + 'static,
) -> Verdict {
    let upstream = ledger::start().await;
    let mut sidecars = Vec::new();
    for _ in 0..2 {
        let store = store.clone();
        sidecars.push(
            start_sidecar(upstream.addr, move |args| {
                store(args);
                args.store_timeout = Duration::from_secs(1);
                args.default_lease = Duration::from_secs(2);
                args.lease_margin = Duration::ZERO;
                args.max_in_flight_wait = Duration::from_secs(1);
            })
            .await,
        );
    }
    let addrs = [sidecars[0].addr, sidecars[1].addr];
    let answered = Arc::new(AtomicUsize::new(0));
    let ended = Arc::new(Mutex::new(HashMap::new()));
    let slots = Arc::new(tokio::sync::Semaphore::new(IN_FLIGHT));
    let callers: Vec<_> = (0..KEYS)
        .map(|n| {
            let (answered, ended, slots) = (answered.clone(), ended.clone(), slots.clone());
            tokio::spawn(async move {
                let _slot = slots.acquire().await.unwrap();
                let end = until_answered(addrs, n).await;
                ended.lock().unwrap().insert(n, end);
                answered.fetch_add(1, Ordering::SeqCst);
            })
        })
        .collect();
    super::eventually(
        Duration::from_secs(60),
        "answers before the failover",
        || {
            let answered = answered.clone();
            async move { answered.load(Ordering::SeqCst) >= ACKNOWLEDGED_BEFORE_FAILOVER }
        },
    )
    .await;
    let _servers = tokio::task::spawn_blocking(fail_over).await.unwrap();
    let served_again_after = served_again(addrs[0]).await;
    for caller in callers {
        caller.await.unwrap();
    }
    let ended = ended.lock().unwrap().clone();
    let mut verdict = check(addrs, &ended, &upstream.state).await;
    verdict.served_again_after = served_again_after;
    verdict
}

/// Asks again for every answer a caller got, through both sidecars.
async fn check(
    sidecars: [SocketAddr; 2],
    ended: &HashMap<usize, Ended>,
    ledger: &ledger::LedgerState,
) -> Verdict {
    let mut verdict = Verdict::default();
    let mut clients = [client(sidecars[0]).await, client(sidecars[1]).await];
    for (n, end) in ended {
        let Ended::Answered(execution) = *end else {
            verdict.in_doubt += 1;
            continue;
        };
        verdict.acknowledged += 1;
        for client in &mut clients {
            let again = apply(
                client,
                add(&format!("account-{n}"), 1),
                Some(&format!("key-{n}")),
                None,
            )
            .await;
            let kept = again
                .is_ok_and(|reply| was_replayed(&reply) && reply.get_ref().execution == execution);
            if !kept {
                verdict.lost += 1;
                break;
            }
        }
    }
    // After the answers were asked for again: a lost record makes its key run again.
    verdict.executed_twice = ledger.executed_twice().len();
    verdict
}

/// Which connections of a relay a freeze cuts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Freezes {
    /// Every connection.
    Everything,
    /// Only a Redis replica's replication stream (a connection whose client sent `REPLCONF`),
    /// so the master's other clients (sentinels, sidecars) still reach it.
    Replication,
}

/// A TCP relay to a server: a connection goes to `target` as it is when it connects; once
/// `frozen`, what the server sends on a connection the freeze cuts is read and dropped, so
/// the far side gets nothing more (what its own kernel had buffered it still reads).
pub struct Relay {
    pub port: u16,
    pub target: Arc<AtomicU16>,
    pub frozen: Arc<AtomicBool>,
}

/// A relay to `target` on a free loopback port, served on the current tokio runtime.
pub fn relay(target: u16, freezes: Freezes) -> Relay {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.set_nonblocking(true).unwrap();
    let port = listener.local_addr().unwrap().port();
    let target = Arc::new(AtomicU16::new(target));
    let frozen = Arc::new(AtomicBool::new(false));
    let (to, freeze) = (target.clone(), frozen.clone());
    tokio::spawn(async move {
        let listener = tokio::net::TcpListener::from_std(listener).unwrap();
        while let Ok((client, _)) = listener.accept().await {
            let port = to.load(Ordering::SeqCst);
            let Ok(server) = tokio::net::TcpStream::connect(("127.0.0.1", port)).await else {
                continue; // The client sees its connection closed, and connects again.
            };
            tokio::spawn(relay_connection(client, server, freeze.clone(), freezes));
        }
    });
    Relay {
        port,
        target,
        frozen,
    }
}

async fn relay_connection(
    client: tokio::net::TcpStream,
    server: tokio::net::TcpStream,
    freeze: Arc<AtomicBool>,
    freezes: Freezes,
) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let cut = AtomicBool::new(freezes == Freezes::Everything);
    let (mut from_client, mut to_client) = client.into_split();
    let (mut from_server, mut to_server) = server.into_split();
    let up = async {
        let mut buffer = vec![0; 64 * 1024];
        loop {
            let n = from_client.read(&mut buffer).await.unwrap_or(0);
            if n == 0 {
                return;
            }
            if buffer[..n].windows(8).any(|bytes| bytes == b"REPLCONF") {
                cut.store(true, Ordering::SeqCst);
            }
            if to_server.write_all(&buffer[..n]).await.is_err() {
                return;
            }
        }
    };
    let down = async {
        let mut buffer = vec![0; 64 * 1024];
        loop {
            let n = from_server.read(&mut buffer).await.unwrap_or(0);
            if n == 0 {
                return;
            }
            let dropped = freeze.load(Ordering::SeqCst) && cut.load(Ordering::SeqCst);
            if !dropped && to_client.write_all(&buffer[..n]).await.is_err() {
                return;
            }
        }
    };
    tokio::select! {
        () = up => {}
        () = down => {}
    }
}
