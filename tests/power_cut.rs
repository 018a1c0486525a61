//! The real binary on a filesystem that forgets what was not synced (`support/lazyfs.rs`, after
//! Jepsen's LazyFS), cut off from its unsynced writes under load, again and again: after each
//! power cut the sidecar restarts on what was synced, every key is retried, and no key executes
//! twice, every answer a client received is replayed byte for byte, and an unknown outcome is
//! only ever IN_DOUBT (I1, I2). Needs root and /dev/fuse (`scripts/test` installs fuse3).

mod support;
// Only this test mounts it: kept out of `support`'s module list so the other tests do not
// build it.
#[path = "support/lazyfs.rs"]
mod lazyfs;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use support::crash::{load, retry_all, splitmix};
use support::{binary, ledger};

/// Power cuts in one test run (`POWER_CUTS=N` for a soak; a run prints its `POWER_CUT_SEED`,
/// which replays its cut times).
const CUTS: usize = 20;

fn env_number(name: &str) -> Option<u64> {
    std::env::var(name).ok().and_then(|text| text.parse().ok())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_power_cut_under_load_never_executes_a_key_twice_nor_loses_an_answer() {
    let cuts = env_number("POWER_CUTS").map_or(CUTS, |n| n as usize);
    let seed = env_number("POWER_CUT_SEED").unwrap_or_else(|| std::process::id().into());
    eprintln!("power-cut loop: {cuts} cuts, POWER_CUT_SEED={seed}");
    let mut random = seed;
    let upstream = ledger::start().await;
    let backing = tempfile::tempdir().unwrap();
    let mountpoint = tempfile::tempdir().unwrap();
    let mut disk = lazyfs::LazyFs::mount(backing.path(), mountpoint.path())
        .expect("mounts the power-cut filesystem (run as root, with /dev/fuse)");
    // The sidecar creates its data dir itself: that directory entry must survive a cut too.
    let dir = mountpoint.path().join("data");
    let args = binary::run_args(upstream.addr, &dir, &[]);
    let answers = Arc::new(Mutex::new(HashMap::new()));
    let mut all_sent = Vec::new();
    let mut in_doubt = 0;
    let mut ready_times = Vec::new();
    for cut in 0..cuts {
        let sidecar = binary::start(&args).await;
        let (stop, stopped) = tokio::sync::watch::channel(false);
        let load = tokio::spawn(load(sidecar.addr, cut, answers.clone(), stopped));
        // The cut lands 0-500 ms into the load: anywhere in a call's life.
        random = splitmix(random);
        tokio::time::sleep(Duration::from_millis(random % 501)).await;
        // The power goes: the process stops, and with it everything not synced.
        sidecar.kill().await;
        disk = disk.cut().expect("mounts again after the cut");
        let _ = stop.send(true);
        let mut sent = load.await.unwrap();
        sent.sort();
        sent.dedup();

        let restarted = std::time::Instant::now();
        let sidecar = binary::start(&args).await;
        ready_times.push(restarted.elapsed());
        in_doubt += retry_all(sidecar.addr, sent.clone(), answers.clone()).await;
        sidecar.kill().await;
        assert_eq!(
            upstream.state.executed_twice(),
            vec![],
            "cut {cut} (POWER_CUT_SEED={seed}): a key ran twice"
        );
        all_sent.extend(sent);
    }
    // Every answer of every cycle is still replayed after all those cuts.
    let sidecar = binary::start(&args).await;
    let final_in_doubt = retry_all(sidecar.addr, all_sent.clone(), answers.clone()).await;
    sidecar.kill().await;
    assert_eq!(
        upstream.state.executed_twice(),
        vec![],
        "POWER_CUT_SEED={seed}"
    );
    let counts = disk.counts();
    ready_times.sort();
    eprintln!(
        "{cuts} power cuts, {} keys, {} executions, {in_doubt} answered as IN_DOUBT ({final_in_doubt} still at the end); {} file syncs, {} directory syncs, {} unsynced pages dropped; restart to listening: p50 {:?}, max {:?}",
        all_sent.len(),
        upstream.state.executions(),
        counts.file_syncs,
        counts.dir_syncs,
        counts.pages_lost,
        ready_times[ready_times.len() / 2],
        ready_times[ready_times.len() - 1],
    );
}
