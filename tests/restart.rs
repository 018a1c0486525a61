//! The real binary killed with SIGKILL under load and restarted on the same data dir: no key
//! executes twice, every answer a client received is replayed byte for byte, and an unknown
//! outcome is only ever IN_DOUBT.

mod support;

use idemproxy::pb::idemproxy::testing::v1::ApplyReply;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use support::{add, apply, binary, client, ledger, reason, was_replayed};

/// Cycles of load → SIGKILL → restart in one test run (`CRASH_CYCLES=N` for a soak; a run
/// prints its `CRASH_SEED`, which replays its kill times).
const CYCLES: usize = 30;
/// Callers sending at once.
const CALLERS: usize = 64;

fn args(upstream: std::net::SocketAddr, dir: &std::path::Path) -> Vec<String> {
    vec![
        "--listen".into(),
        "127.0.0.1:0".into(),
        "--upstream".into(),
        format!("http://{upstream}"),
        "--data-dir".into(),
        dir.display().to_string(),
    ]
}

/// The request of a key: always the same payload for the same key, as a real retry sends.
fn payload(key: &str) -> idemproxy::pb::idemproxy::testing::v1::ApplyRequest {
    let mut request = add(key, 1);
    request.delay_ms = key.bytes().map(u32::from).sum::<u32>() % 7;
    request
}

/// Runs callers until stopped: fresh keys, with about one call in five a duplicate of an
/// earlier key. Returns every answer received, by key.
async fn load(
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
                    if let Ok(reply) = apply(&mut client, payload(&key), Some(&key), None).await {
                        answers
                            .lock()
                            .expect("answers lock")
                            .insert(key, reply.into_inner());
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
enum Retried {
    /// Replayed, or run now for a key that had no answer.
    Answered,
    /// Refused as IN_DOUBT (its first attempt may have acted).
    InDoubt,
}

/// Retries `keys` through `addr` (16 at a time) and checks I1–I2: an answered key is replayed
/// byte for byte; an unanswered one runs now or is IN_DOUBT, never anything else.
async fn retry_all(
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_under_load_never_executes_a_key_twice_nor_loses_an_answer() {
    let cycles: usize = std::env::var("CRASH_CYCLES")
        .ok()
        .and_then(|text| text.parse().ok())
        .unwrap_or(CYCLES);
    let seed: u64 = std::env::var("CRASH_SEED")
        .ok()
        .and_then(|text| text.parse().ok())
        .unwrap_or_else(|| std::process::id().into());
    eprintln!("crash loop: {cycles} cycles, CRASH_SEED={seed}");
    let mut random = seed;
    let upstream = ledger::start().await;
    let dir = tempfile::tempdir().unwrap();
    let answers = Arc::new(Mutex::new(HashMap::new()));
    let mut all_sent = Vec::new();
    let mut in_doubt = 0;
    let mut ready_times = Vec::new();
    for cycle in 0..cycles {
        let sidecar = binary::start(&args(upstream.addr, dir.path())).await;
        let (stop, stopped) = tokio::sync::watch::channel(false);
        let load = tokio::spawn(load(sidecar.addr, cycle, answers.clone(), stopped));
        // The kill lands 0-500 ms into the load: anywhere in a call's life.
        random = splitmix(random);
        tokio::time::sleep(Duration::from_millis(random % 501)).await;
        sidecar.kill().await;
        let _ = stop.send(true);
        let mut sent = load.await.unwrap();
        sent.sort();
        sent.dedup();

        // Restart on the same data dir and retry every key of this cycle.
        let restarted = std::time::Instant::now();
        let sidecar = binary::start(&args(upstream.addr, dir.path())).await;
        ready_times.push(restarted.elapsed());
        in_doubt += retry_all(sidecar.addr, sent.clone(), answers.clone()).await;
        sidecar.kill().await;
        assert_eq!(
            upstream.state.executed_twice(),
            vec![],
            "cycle {cycle} (CRASH_SEED={seed}): a key ran twice"
        );
        all_sent.extend(sent);
    }
    // Every answer of every cycle is still replayed after all those kills.
    let sidecar = binary::start(&args(upstream.addr, dir.path())).await;
    let final_in_doubt = retry_all(sidecar.addr, all_sent.clone(), answers.clone()).await;
    sidecar.kill().await;
    assert_eq!(upstream.state.executed_twice(), vec![], "CRASH_SEED={seed}");
    ready_times.sort();
    let ready_p50 = ready_times[ready_times.len() / 2];
    let ready_max = ready_times[ready_times.len() - 1];
    eprintln!(
        "{cycles} kill cycles, {} keys, {} executions, {in_doubt} answered as IN_DOUBT ({final_in_doubt} still at the end); restart to listening: p50 {ready_p50:?}, max {ready_max:?}",
        all_sent.len(),
        upstream.state.executions(),
    );
}

fn splitmix(state: u64) -> u64 {
    let mut z = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}
