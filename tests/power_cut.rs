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

use support::crash::CrashLoop;
use support::{binary, ledger};

/// Power cuts in one test run (`POWER_CUTS=N` for a soak; a run prints its `POWER_CUT_SEED`,
/// which replays its cut times).
const CUTS: usize = 20;

/// The sweeper packs COMPLETED records into slices every 100 ms once 16 are in `records`.
const PACKING: [&str; 4] = ["--sled-pack-records", "16", "--sweep-interval", "100ms"];

fn env_number(name: &str) -> Option<u64> {
    std::env::var(name).ok().and_then(|text| text.parse().ok())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_power_cut_under_load_never_executes_a_key_twice_nor_loses_an_answer() {
    let cuts = env_number("POWER_CUTS").map_or(CUTS, |n| n as usize);
    let seed = env_number("POWER_CUT_SEED").unwrap_or_else(|| std::process::id().into());
    eprintln!("power-cut loop: {cuts} cuts, POWER_CUT_SEED={seed}");
    let upstream = ledger::start().await;
    let backing = tempfile::tempdir().unwrap();
    let mountpoint = tempfile::tempdir().unwrap();
    let mut disk = Some(
        lazyfs::LazyFs::mount(backing.path(), mountpoint.path())
            .expect("mounts the power-cut filesystem (run as root, with /dev/fuse)"),
    );
    // The sidecar creates its data dir itself: that directory entry must survive a cut too.
    // Packing often, so cuts land in every step of moving records into slices.
    let args = binary::run_args(upstream.addr, &mountpoint.path().join("data"), &PACKING);
    let mut cuts_loop = CrashLoop::new(upstream, args, "POWER_CUT_SEED", seed);
    for cut in 0..cuts {
        cuts_loop
            .cycle(cut, async |sidecar| {
                // The power goes: the process stops, and with it everything not synced.
                sidecar.kill().await;
                let mounted = disk.take().expect("mounted between cuts");
                disk = Some(mounted.cut().expect("mounts again after the cut"));
            })
            .await;
    }
    let summary = cuts_loop.finish().await;
    let counts = disk.as_ref().expect("mounted").counts();
    eprintln!(
        "{cuts} power cuts, {summary}; {} file syncs, {} directory syncs, {} unsynced pages dropped",
        counts.file_syncs, counts.dir_syncs, counts.pages_lost,
    );
}

/// An answer too large for sled's log goes to a blob file of its own (`blobs/` in the data
/// dir), which sled writes unsynced: the flush that acknowledges it must sync that file and
/// the directory entry, though nothing but the log changed at the flushes before.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_large_answer_kept_in_a_blob_file_survives_a_power_cut() {
    let upstream = ledger::start().await;
    let backing = tempfile::tempdir().unwrap();
    let mountpoint = tempfile::tempdir().unwrap();
    let disk = lazyfs::LazyFs::mount(backing.path(), mountpoint.path())
        .expect("mounts the power-cut filesystem (run as root, with /dev/fuse)");
    let args = binary::run_args(upstream.addr, &mountpoint.path().join("data"), &[]);
    let sidecar = binary::start(&args).await;
    let mut client = support::client(sidecar.addr).await;
    // Small answers first: flushes with nothing new beside the log.
    for n in 0..20 {
        let key = format!("small-{n}");
        support::apply(&mut client, support::add(&key, 1), Some(&key), None)
            .await
            .expect("answered");
    }
    let mut large = support::add("large", 1);
    large.reply_padding_bytes = 600 << 10;
    let answer = support::apply(&mut client, large.clone(), Some("large"), None)
        .await
        .expect("answered")
        .into_inner();
    drop(client);
    sidecar.kill().await;
    let disk = disk.cut().expect("mounts again after the cut");
    let blobs = std::fs::read_dir(mountpoint.path().join("data/blobs"))
        .expect("the blob dir survived")
        .count();
    assert!(
        blobs > 0,
        "no blob file survived: was the answer written to one?"
    );

    let sidecar = binary::start(&args).await;
    let mut client = support::client(sidecar.addr).await;
    let replayed = support::apply(&mut client, large, Some("large"), None)
        .await
        .expect("the large answer is replayed after the cut");
    assert!(support::was_replayed(&replayed), "executed again");
    assert_eq!(replayed.into_inner(), answer);
    assert_eq!(upstream.state.executions_of("large"), 1);
    sidecar.kill().await;
    drop(disk);
}
