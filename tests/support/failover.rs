//! The load and the check of the failover tests (`tests/failover.rs`, `tests/patroni.rs`,
//! `tests/sentinel.rs`), written once: callers that send every key until it is answered,
//! through two sidecars, its first try as two hedged copies (one to each); then every answer
//! a caller got asked for again through both sidecars. Also a prober per sidecar that sends a
//! fresh key after another, to measure how long the sidecars did not serve; `under_load`, the
//! whole run on two in-process sidecars; and a relay that can cut what a server sends.

use super::{add, apply, client, ledger, reason, start_sidecar, was_replayed};
use idemproxy::config::RunSettings;
use idemproxy::pb::idemproxy::testing::v1::ledger_client::LedgerClient;
use idemproxy::pb::idemproxy::testing::v1::ApplyReply;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU16, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::time::Instant;
use tonic::transport::Channel;

/// How long one key is sent again before the test gives up on it.
const ANSWER_WAIT: Duration = Duration::from_secs(120);

/// Calls a check asks again at once.
const CHECKS_IN_FLIGHT: usize = 16;

/// How long one probe waits for its answer.
const PROBE_WAIT: Duration = Duration::from_secs(2);

/// Keys `under_load` sends.
pub const KEYS: usize = 120;

/// Keys `under_load` has in flight at once.
const IN_FLIGHT: usize = 16;

/// Keys `under_load` has answered before the failure.
pub const ACKNOWLEDGED_BEFORE_FAILOVER: usize = 40;

/// What one run saw.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Verdict {
    pub acknowledged: usize,
    pub in_doubt: usize,
    pub executed_twice: usize,
    pub lost: usize,
}

/// How one key ended: an answer (its execution number), or IN_DOUBT.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ended {
    Answered(u64),
    InDoubt,
}

/// The serial and the account of key `n` of the run named `run`.
fn key_and_account(run: &str, n: usize) -> (String, String) {
    (format!("{run}key-{n}"), format!("{run}account-{n}"))
}

/// Sends key `n` until it is answered, alternating sidecars; its first try is two hedged
/// copies, one to each.
async fn until_answered(sidecars: [SocketAddr; 2], run: &str, n: usize) -> Ended {
    let (key, account) = key_and_account(run, n);
    let deadline = Instant::now() + ANSWER_WAIT;
    let mut clients = [client(sidecars[0]).await, client(sidecars[1]).await];
    for attempt in 0.. {
        assert!(
            Instant::now() < deadline,
            "{key} unanswered after {ANSWER_WAIT:?}"
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

/// Callers sending keys `0..keys_max` through two sidecars, `in_flight` at once, each key
/// until it is answered (or IN_DOUBT), until the keys run out or `stop` is called.
pub struct Load {
    sidecars: [SocketAddr; 2],
    run: String,
    answered: Arc<AtomicUsize>,
    stopped: Arc<AtomicBool>,
    ended: Arc<Mutex<HashMap<usize, Ended>>>,
    callers: Vec<tokio::task::JoinHandle<()>>,
}

impl Load {
    /// Starts the callers; keys are named for `run`, so that runs on one store and one
    /// upstream do not meet. Each caller waits `pause` between its keys.
    pub fn start(
        sidecars: [SocketAddr; 2],
        run: &str,
        keys_max: usize,
        in_flight: usize,
        pause: Duration,
    ) -> Load {
        let next = Arc::new(AtomicUsize::new(0));
        let answered = Arc::new(AtomicUsize::new(0));
        let stopped = Arc::new(AtomicBool::new(false));
        let ended = Arc::new(Mutex::new(HashMap::new()));
        let callers = (0..in_flight)
            .map(|_| {
                let (next, answered) = (next.clone(), answered.clone());
                let (stopped, ended, run) = (stopped.clone(), ended.clone(), run.to_owned());
                tokio::spawn(async move {
                    while !stopped.load(Ordering::SeqCst) {
                        let n = next.fetch_add(1, Ordering::SeqCst);
                        if n >= keys_max {
                            return;
                        }
                        let end = until_answered(sidecars, &run, n).await;
                        ended.lock().unwrap().insert(n, end);
                        answered.fetch_add(1, Ordering::SeqCst);
                        if !pause.is_zero() {
                            tokio::time::sleep(pause).await;
                        }
                    }
                })
            })
            .collect();
        Load {
            sidecars,
            run: run.to_owned(),
            answered,
            stopped,
            ended,
            callers,
        }
    }

    /// Keys that have ended so far (answered or IN_DOUBT).
    pub fn ended_so_far(&self) -> usize {
        self.answered.load(Ordering::SeqCst)
    }

    /// Waits until `keys` keys have ended (60 s at most).
    pub async fn wait_for(&self, keys: usize, what: &str) {
        let answered = self.answered.clone();
        super::eventually(Duration::from_secs(60), what, || {
            let answered = answered.clone();
            async move { answered.load(Ordering::SeqCst) >= keys }
        })
        .await;
    }

    /// From now on no caller takes a new key.
    pub fn stop(&self) {
        self.stopped.store(true, Ordering::SeqCst);
    }

    /// Waits until every key has ended (all of them, or those taken before `stop`); then
    /// asks for every answer again through both sidecars.
    pub async fn finish(self, ledger: &super::ledger::LedgerState) -> Verdict {
        for caller in self.callers {
            caller.await.unwrap();
        }
        let ended = self.ended.lock().unwrap().clone();
        check(self.sidecars, &self.run, &ended, ledger).await
    }
}

/// Asks again for every answer a caller got, through both sidecars; counts the keys of `run`
/// that the upstream executed more than once.
async fn check(
    sidecars: [SocketAddr; 2],
    run: &str,
    ended: &HashMap<usize, Ended>,
    ledger: &super::ledger::LedgerState,
) -> Verdict {
    let clients = [client(sidecars[0]).await, client(sidecars[1]).await];
    let slots = Arc::new(tokio::sync::Semaphore::new(CHECKS_IN_FLIGHT));
    let mut asked = Vec::new();
    let mut verdict = Verdict::default();
    for (&n, &end) in ended {
        let Ended::Answered(execution) = end else {
            verdict.in_doubt += 1;
            continue;
        };
        verdict.acknowledged += 1;
        let (mut clients, slots) = (clients.clone(), slots.clone());
        let (key, account) = key_and_account(run, n);
        asked.push(tokio::spawn(async move {
            let _slot = slots.acquire().await.unwrap();
            for client in &mut clients {
                let again = ask_again(client, &account, &key).await;
                let kept = again.is_ok_and(|reply| {
                    was_replayed(&reply) && reply.get_ref().execution == execution
                });
                if !kept {
                    return false;
                }
            }
            true
        }));
    }
    for kept in asked {
        if !kept.await.unwrap() {
            verdict.lost += 1;
        }
    }
    // After the answers were asked for again: a lost record makes its key run again.
    verdict.executed_twice = ledger
        .executed_twice()
        .iter()
        .filter(|(account, _)| account.starts_with(run))
        .count();
    verdict
}

/// Asks for a key again; while the store is unavailable (the call refused, nothing forwarded:
/// no answer, so neither a kept nor a lost one), again, for `ANSWER_WAIT` at most.
async fn ask_again(
    client: &mut LedgerClient<Channel>,
    account: &str,
    key: &str,
) -> Result<tonic::Response<ApplyReply>, tonic::Status> {
    let deadline = Instant::now() + ANSWER_WAIT;
    loop {
        let again = apply(client, add(account, 1), Some(key), None).await;
        match again {
            Err(status)
                if reason(&status) == "IDEMPOTENCY_STORE_UNAVAILABLE"
                    && Instant::now() < deadline =>
            {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            again => return again,
        }
    }
}

/// Fresh keys sent through one sidecar one after another, each once (so none can run
/// twice), to see when it serves.
pub struct Prober {
    stopped: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<Vec<Instant>>,
}

impl Prober {
    /// Starts probing `sidecar` with keys named for `run` (`{run}probe-…`).
    pub fn start(sidecar: SocketAddr, run: &str) -> Prober {
        let stopped = Arc::new(AtomicBool::new(false));
        let (stop, run) = (stopped.clone(), run.to_owned());
        let task = tokio::spawn(async move {
            let mut answers = Vec::new();
            let mut probe = client(sidecar).await;
            for n in 0.. {
                if stop.load(Ordering::SeqCst) {
                    break;
                }
                let (key, account) = (format!("{run}probe-{n}"), format!("{run}probe-{n}"));
                let answer = tokio::time::timeout(
                    PROBE_WAIT,
                    apply(&mut probe, add(&account, 1), Some(&key), None),
                )
                .await;
                match answer {
                    Ok(Ok(_)) => answers.push(Instant::now()),
                    Ok(Err(_)) => tokio::time::sleep(Duration::from_millis(20)).await,
                    // A call that hung: its connection may be what hangs.
                    Err(_) => probe = client(sidecar).await,
                }
            }
            answers
        });
        Prober { stopped, task }
    }

    /// Stops probing; the longest time from `since` on during which the sidecar answered no
    /// probe.
    pub async fn longest_silence_since(self, since: Instant) -> Duration {
        self.stopped.store(true, Ordering::SeqCst);
        let answers = self.task.await.unwrap();
        let end = Instant::now();
        let mut last = since;
        let mut longest = Duration::ZERO;
        for answer in answers.into_iter().filter(|answer| *answer >= since) {
            longest = longest.max(answer - last);
            last = answer;
        }
        longest.max(end - last)
    }
}

/// Two in-process sidecars set up by `store` (a 1 s store timeout, 2 s leases), `KEYS` keys
/// sent through both; once `ACKNOWLEDGED_BEFORE_FAILOVER` are answered `fail_over` runs (its
/// result, the servers, kept until the answers have been asked for again). The verdict, and
/// the longest time from the start of `fail_over` on during which the first sidecar answered
/// no fresh key.
pub async fn under_load<T: Send + 'static>(
    store: impl Fn(&mut RunSettings) + Clone + Send + 'static,
    fail_over: impl FnOnce() -> T + Send + 'static,
) -> (Verdict, Duration) {
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
    let load = Load::start(addrs, "", KEYS, IN_FLIGHT, Duration::ZERO);
    load.wait_for(ACKNOWLEDGED_BEFORE_FAILOVER, "answers before the failover")
        .await;
    let prober = Prober::start(addrs[0], "");
    let failing = Instant::now();
    let _servers = tokio::task::spawn_blocking(fail_over).await.unwrap();
    // The answers are asked for again once both sidecars serve: a call refused meanwhile
    // would count as a lost answer.
    for sidecar in addrs {
        serves_again(sidecar).await;
    }
    let unserved = prober.longest_silence_since(failing).await;
    (load.finish(&upstream.state).await, unserved)
}

/// Sends fresh keys through `sidecar` until one is answered (within `ANSWER_WAIT`).
async fn serves_again(sidecar: SocketAddr) {
    let deadline = Instant::now() + ANSWER_WAIT;
    let mut probe = client(sidecar).await;
    for n in 0.. {
        let (key, account) = (
            format!("again-{sidecar}-{n}"),
            format!("again-{sidecar}-{n}"),
        );
        let answer = tokio::time::timeout(
            PROBE_WAIT,
            apply(&mut probe, add(&account, 1), Some(&key), None),
        )
        .await;
        match answer {
            Ok(Ok(_)) => return,
            Ok(Err(_)) => tokio::time::sleep(Duration::from_millis(20)).await,
            Err(_) => probe = client(sidecar).await,
        }
        assert!(
            Instant::now() < deadline,
            "{sidecar} answered no fresh key within {ANSWER_WAIT:?} of the failure"
        );
    }
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
    /// Every byte its clients sent, in order, when made by `copying_relay`.
    pub sent: Option<Arc<Mutex<Vec<u8>>>>,
}

/// A relay to `target` on a free loopback port, served on the current tokio runtime.
pub fn relay(target: u16, freezes: Freezes) -> Relay {
    relay_keeping(target, freezes, None)
}

/// A relay that also keeps a copy of what its clients send (`Relay::sent`): for a test that
/// reads the bytes a client wrote. Never frozen unless asked.
pub fn copying_relay(target: u16) -> Relay {
    relay_keeping(target, Freezes::Everything, Some(Arc::default()))
}

fn relay_keeping(target: u16, freezes: Freezes, sent: Option<Arc<Mutex<Vec<u8>>>>) -> Relay {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.set_nonblocking(true).unwrap();
    let port = listener.local_addr().unwrap().port();
    let target = Arc::new(AtomicU16::new(target));
    let frozen = Arc::new(AtomicBool::new(false));
    let (to, freeze, copy) = (target.clone(), frozen.clone(), sent.clone());
    tokio::spawn(async move {
        let listener = tokio::net::TcpListener::from_std(listener).unwrap();
        while let Ok((client, _)) = listener.accept().await {
            let port = to.load(Ordering::SeqCst);
            let Ok(server) = tokio::net::TcpStream::connect(("127.0.0.1", port)).await else {
                continue; // The client sees its connection closed, and connects again.
            };
            tokio::spawn(relay_connection(
                client,
                server,
                freeze.clone(),
                freezes,
                copy.clone(),
            ));
        }
    });
    Relay {
        port,
        target,
        frozen,
        sent,
    }
}

async fn relay_connection(
    client: tokio::net::TcpStream,
    server: tokio::net::TcpStream,
    freeze: Arc<AtomicBool>,
    freezes: Freezes,
    copy: Option<Arc<Mutex<Vec<u8>>>>,
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
            if let Some(copy) = &copy {
                copy.lock()
                    .expect("never poisoned")
                    .extend_from_slice(&buffer[..n]);
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
