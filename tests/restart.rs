//! The real binary killed with SIGKILL under load and restarted on the same data dir: no key
//! executes twice, every answer a client received is replayed byte for byte, and an unknown
//! outcome is only ever IN_DOUBT.

mod support;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use support::crash::{load, retry_all, splitmix};
use support::{binary, ledger};

/// Cycles of load → SIGKILL → restart in one test run (`CRASH_CYCLES=N` for a soak; a run
/// prints its `CRASH_SEED`, which replays its kill times).
const CYCLES: usize = 30;
fn args(upstream: std::net::SocketAddr, dir: &std::path::Path) -> Vec<String> {
    binary::run_args(upstream, dir, &[])
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
