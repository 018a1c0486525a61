//! The real binary killed with SIGKILL under load and restarted on the same data dir: no key
//! executes twice, every answer a client received is replayed byte for byte, and an unknown
//! outcome is only ever IN_DOUBT.

mod support;

use support::crash::CrashLoop;
use support::{binary, ledger};

/// Cycles of load → SIGKILL → restart in one test run (`CRASH_CYCLES=N` for a soak; a run
/// prints its `CRASH_SEED`, which replays its kill times).
const CYCLES: usize = 30;

/// The sweeper packs COMPLETED records into slices every 100 ms once 16 are in `records`.
const PACKING: [&str; 4] = ["--sled-pack-records", "16", "--sweep-interval", "100ms"];

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
    let upstream = ledger::start().await;
    let dir = tempfile::tempdir().unwrap();
    // Packing often, so kills land in every step of moving records into slices.
    let args = binary::run_args(upstream.addr, dir.path(), &PACKING);
    let mut crashes = CrashLoop::new(upstream, args, "CRASH_SEED", seed);
    for cycle in 0..cycles {
        crashes
            .cycle(cycle, async |sidecar| sidecar.kill().await)
            .await;
    }
    eprintln!("{cycles} kill cycles, {}", crashes.finish().await);
}
