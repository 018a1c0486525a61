//! The real binary killed with SIGKILL under load and restarted on the same data dir: no key
//! executes twice, every answer a client received is replayed byte for byte, and an unknown
//! outcome is only ever IN_DOUBT.

mod support;

use idemproxy::pb::idemproxy::testing::v1::ApplyReply;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use support::{add, apply, binary, client, ledger, reason, was_replayed};

/// Cycles of load → SIGKILL → restart in one test run.
const CYCLES: usize = 3;
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_under_load_never_executes_a_key_twice_nor_loses_an_answer() {
    let upstream = ledger::start().await;
    let dir = tempfile::tempdir().unwrap();
    let answers = Arc::new(Mutex::new(HashMap::new()));
    let mut all_sent = Vec::new();
    let mut in_doubt = std::collections::HashSet::new();
    for cycle in 0..CYCLES {
        let sidecar = binary::start(&args(upstream.addr, dir.path())).await;
        let (stop, stopped) = tokio::sync::watch::channel(false);
        let load = tokio::spawn(load(sidecar.addr, cycle, answers.clone(), stopped));
        // Kill once a good share of calls have landed, at a point that differs per cycle.
        let executions_before = upstream.state.executions();
        let target = executions_before + 200 + 150 * cycle as u64;
        support::eventually(Duration::from_secs(30), "load to reach the service", || {
            let state = upstream.state.clone();
            async move { state.executions() >= target }
        })
        .await;
        sidecar.kill().await;
        let _ = stop.send(true);
        all_sent.extend(load.await.unwrap());

        // Restart on the same data dir and retry every key ever sent.
        let sidecar = binary::start(&args(upstream.addr, dir.path())).await;
        let mut client = client(sidecar.addr).await;
        all_sent.sort();
        all_sent.dedup();
        for key in &all_sent {
            let seen = answers.lock().unwrap().get(key).cloned();
            match apply(&mut client, payload(key), Some(key), None).await {
                Ok(reply) => {
                    if let Some(seen) = seen {
                        assert!(
                            was_replayed(&reply),
                            "{key}: an answered key must be replayed"
                        );
                        assert_eq!(
                            reply.get_ref(),
                            &seen,
                            "{key}: the replay is the answer seen"
                        );
                    } else {
                        answers
                            .lock()
                            .unwrap()
                            .insert(key.clone(), reply.into_inner());
                    }
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
                    in_doubt.insert(key.clone());
                }
            }
        }
        sidecar.kill().await;
        assert_eq!(
            upstream.state.executed_twice(),
            vec![],
            "cycle {cycle}: a key ran twice"
        );
    }
    eprintln!(
        "{CYCLES} kill cycles, {} keys, {} executions, {} answered as IN_DOUBT",
        all_sent.len(),
        upstream.state.executions(),
        in_doubt.len()
    );
}
