//! The crash loop's callers, shared by the SIGKILL loop (`restart.rs`) and the power-cut loop
//! (`power_cut.rs`): callers that send fresh keys, duplicates and hedged copies until the
//! sidecar dies, and the retry of every key afterwards that checks I1 and I2.

use super::binary::{self, BinarySidecar};
use super::{add, apply, client, ledger, reason, was_replayed};
use idemproxy::pb::idemproxy::testing::v1::ApplyReply;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Callers sending at once.
const CALLERS: usize = 64;

/// The request of a key: always the same payload for the same key, as a real retry sends.
pub fn payload(key: &str) -> idemproxy::pb::idemproxy::testing::v1::ApplyRequest {
    let mut request = add(key, 1);
    request.delay_ms = key.bytes().map(u32::from).sum::<u32>() % 7;
    request
}

/// Runs callers until stopped: fresh keys, with about one call in five a duplicate of an
/// earlier key and one in seven sent as two hedged copies at once. Returns every answer
/// received, by key.
pub async fn load(
    addr: std::net::SocketAddr,
    cycle: usize,
    answers: Arc<Mutex<HashMap<String, ApplyReply>>>,
    stop: tokio::sync::watch::Receiver<bool>,
) -> Vec<String> {
    let client = client(addr).await;
    let callers: Vec<_> = (0..CALLERS)
        .map(|caller| {
            let (mut client, answers, stop) = (client.clone(), answers.clone(), stop.clone());
            tokio::spawn(async move {
                let mut sent = Vec::new();
                for n in 0.. {
                    if *stop.borrow() {
                        break;
                    }
                    let key = if n % 5 == 4 {
                        format!("c{cycle}-{caller}-{}", n / 2)
                    } else {
                        format!("c{cycle}-{caller}-{n}")
                    };
                    sent.push(key.clone());
                    let mut hedge = client.clone();
                    let (first, second) = if n % 7 == 3 {
                        tokio::join!(
                            apply(&mut client, payload(&key), Some(&key), None),
                            apply(&mut hedge, payload(&key), Some(&key), None)
                        )
                    } else {
                        let first = apply(&mut client, payload(&key), Some(&key), None).await;
                        (first, Err(tonic::Status::cancelled("no hedge")))
                    };
                    if let (Ok(first), Ok(second)) = (&first, &second) {
                        assert_eq!(first.get_ref(), second.get_ref(), "{key}: hedged copies");
                    }
                    for reply in [first, second].into_iter().flatten() {
                        answers
                            .lock()
                            .expect("answers lock")
                            .insert(key.clone(), reply.into_inner());
                    }
                }
                sent
            })
        })
        .collect();
    let mut sent = Vec::new();
    for caller in callers {
        // A caller whose connection died with the sidecar ends with an error: keep what it sent.
        if let Ok(keys) = caller.await {
            sent.extend(keys);
        }
    }
    sent
}

/// What retrying a key after a restart found.
#[derive(Debug, PartialEq)]
pub enum Retried {
    /// Replayed, or run now for a key that had no answer.
    Answered,
    /// Refused as IN_DOUBT (its first attempt may have acted).
    InDoubt,
}

/// Retries `keys` through `addr` (16 at a time) and checks I1–I2: an answered key is replayed
/// byte for byte; an unanswered one runs now or is IN_DOUBT, never anything else.
pub async fn retry_all(
    addr: std::net::SocketAddr,
    keys: Vec<String>,
    answers: Arc<Mutex<HashMap<String, ApplyReply>>>,
) -> usize {
    let client = client(addr).await;
    let shares: Vec<Vec<String>> = (0..16)
        .map(|share| keys.iter().skip(share).step_by(16).cloned().collect())
        .collect();
    let tasks: Vec<_> = shares
        .into_iter()
        .map(|share| {
            let (mut client, answers) = (client.clone(), answers.clone());
            tokio::spawn(async move {
                let mut in_doubt = 0;
                for key in share {
                    if retry(&mut client, &key, &answers).await == Retried::InDoubt {
                        in_doubt += 1;
                    }
                }
                in_doubt
            })
        })
        .collect();
    let mut in_doubt = 0;
    for task in tasks {
        in_doubt += task.await.expect("no retry failed its checks");
    }
    in_doubt
}

async fn retry(
    client: &mut idemproxy::pb::idemproxy::testing::v1::ledger_client::LedgerClient<
        tonic::transport::Channel,
    >,
    key: &str,
    answers: &Mutex<HashMap<String, ApplyReply>>,
) -> Retried {
    let seen = answers.lock().expect("answers lock").get(key).cloned();
    match apply(client, payload(key), Some(key), None).await {
        Ok(reply) => {
            match seen {
                Some(seen) => {
                    assert!(
                        was_replayed(&reply),
                        "{key}: an answered key must be replayed"
                    );
                    assert_eq!(
                        reply.get_ref(),
                        &seen,
                        "{key}: the replay is the answer seen"
                    );
                }
                None => {
                    answers
                        .lock()
                        .expect("answers lock")
                        .insert(key.to_owned(), reply.into_inner());
                }
            }
            Retried::Answered
        }
        Err(status) => {
            assert!(
                seen.is_none(),
                "{key}: an answered key must be replayed, got {status:?}"
            );
            assert_eq!(
                reason(&status),
                "IDEMPOTENCY_OUTCOME_UNKNOWN",
                "{key}: {status:?}"
            );
            Retried::InDoubt
        }
    }
}

/// SplitMix64: the loops' seeded random numbers.
pub fn splitmix(state: u64) -> u64 {
    let mut z = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Crashes of the real binary under load, one cycle at a time: each starts the sidecar, loads
/// it, lets `crash` stop it 0–500 ms in (anywhere in a call's life), restarts it on what
/// survived, retries every key of the cycle and checks that none ran twice.
pub struct CrashLoop {
    upstream: ledger::LedgerHandle,
    args: Vec<String>,
    answers: Arc<Mutex<HashMap<String, ApplyReply>>>,
    random: u64,
    /// How to replay this run, for failure messages (`NAME=seed`).
    replay: String,
    sent: Vec<String>,
    in_doubt: usize,
    ready_times: Vec<Duration>,
}

impl CrashLoop {
    /// A loop over `upstream` of sidecars started with `args`; `seed` picks the crash times and
    /// `seed_name` is the variable that replays them.
    pub fn new(
        upstream: ledger::LedgerHandle,
        args: Vec<String>,
        seed_name: &str,
        seed: u64,
    ) -> Self {
        CrashLoop {
            upstream,
            args,
            answers: Arc::new(Mutex::new(HashMap::new())),
            random: seed,
            replay: format!("{seed_name}={seed}"),
            sent: Vec::new(),
            in_doubt: 0,
            ready_times: Vec::new(),
        }
    }

    /// One cycle, numbered `number` (it keeps the cycle's keys apart); `crash` must leave the
    /// sidecar stopped.
    pub async fn cycle(&mut self, number: usize, crash: impl AsyncFnOnce(BinarySidecar)) {
        let sidecar = binary::start(&self.args).await;
        let (stop, stopped) = tokio::sync::watch::channel(false);
        let load = tokio::spawn(load(sidecar.addr, number, self.answers.clone(), stopped));
        self.random = splitmix(self.random);
        tokio::time::sleep(Duration::from_millis(self.random % 501)).await;
        crash(sidecar).await;
        let _ = stop.send(true);
        let mut sent = load.await.unwrap();
        sent.sort();
        sent.dedup();

        let restarted = std::time::Instant::now();
        let sidecar = binary::start(&self.args).await;
        self.ready_times.push(restarted.elapsed());
        self.in_doubt += retry_all(sidecar.addr, sent.clone(), self.answers.clone()).await;
        sidecar.kill().await;
        assert_eq!(
            self.upstream.state.executed_twice(),
            vec![],
            "cycle {number} ({}): a key ran twice",
            self.replay
        );
        self.sent.extend(sent);
    }

    /// Retries every key of every cycle once more (every answer is still replayed after all
    /// the crashes) and says what the loop did.
    pub async fn finish(mut self) -> String {
        let sidecar = binary::start(&self.args).await;
        let keys = std::mem::take(&mut self.sent);
        let final_in_doubt = retry_all(sidecar.addr, keys.clone(), self.answers.clone()).await;
        sidecar.kill().await;
        assert_eq!(
            self.upstream.state.executed_twice(),
            vec![],
            "{}",
            self.replay
        );
        self.ready_times.sort();
        format!(
            "{} keys, {} executions, {} answered as IN_DOUBT ({final_in_doubt} still at the end); restart to listening: p50 {:?}, max {:?}",
            keys.len(),
            self.upstream.state.executions(),
            self.in_doubt,
            self.ready_times[self.ready_times.len() / 2],
            self.ready_times[self.ready_times.len() - 1],
        )
    }
}
