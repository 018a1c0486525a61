//! The load and the check of the failover tests (`tests/failover.rs`, `tests/patroni.rs`),
//! written once: callers that send every key until it is answered, through two sidecars,
//! its first try as two hedged copies (one to each); then every answer a caller got asked
//! for again through both sidecars. Also a prober per sidecar that sends a fresh key after
//! another, to measure how long the sidecars did not serve.

use super::{add, apply, client, reason, was_replayed};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::time::Instant;

/// How long one key is sent again before the test gives up on it.
const ANSWER_WAIT: Duration = Duration::from_secs(120);

/// Calls a check asks again at once.
const CHECKS_IN_FLIGHT: usize = 16;

/// How long one probe waits for its answer.
const PROBE_WAIT: Duration = Duration::from_secs(2);

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
                let again = apply(client, add(&account, 1), Some(&key), None).await;
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
