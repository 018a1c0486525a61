//! A data dir written by an earlier release keeps protecting its keys after an upgrade: the
//! new binary starts on it, replays every recorded answer without forwarding it, and keeps an
//! unknown outcome IN_DOUBT. Never ignored, never wiped: those records are what stops a
//! duplicate execution.
//!
//! `tests/fixtures/data-dir-0.1.0.tar.gz` was written by idemproxy 0.1.0 (`1b96a16`, the release
//! before the power-cut fsyncs): 20 keys `upgrade-0` … `upgrade-19` completed, each adding
//! `i + 1` to its own account, then `upgrade-in-doubt` (amount 7, `delay_ms` 10,000) claimed and
//! forwarded when the process was killed, on 2026-12-03 at about 05:00 UTC with the default
//! retention of 24 h. The sidecars here run with their wall clock set to a few hours after that
//! (`binary::clock_at`): the records are inside their retention, as on the day after an upgrade,
//! whatever today's date is (issue 29: the test failed for good once a day had passed).

mod support;

use support::{add, apply, binary, client, ledger, reason, was_replayed};

/// A few hours after the fixture was written: its records are inside their 24 h retention, and
/// the lease of the call the kill caught is long over.
const FIXTURE_DAY: &str = "2026-12-03 08:00:00";

/// `idemproxy run ARGS` on `dir` with its clock at `FIXTURE_DAY`.
async fn start_on_fixture_day(
    upstream: std::net::SocketAddr,
    dir: &std::path::Path,
) -> binary::BinarySidecar {
    binary::start_with_env(
        &binary::run_args(upstream, dir, &[]),
        &binary::clock_at(FIXTURE_DAY),
    )
    .await
}

fn unpack(fixture: &str, into: &std::path::Path) -> std::path::PathBuf {
    let archive = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(fixture);
    let status = std::process::Command::new("tar")
        .arg("-xzf")
        .arg(&archive)
        .arg("-C")
        .arg(into)
        .status()
        .expect("runs tar");
    assert!(status.success(), "unpacks {}", archive.display());
    into.join("data")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_data_dir_of_release_0_1_0_keeps_protecting_its_keys() {
    let upstream = ledger::start().await;
    let unpacked = tempfile::tempdir().unwrap();
    let dir = unpack("data-dir-0.1.0.tar.gz", unpacked.path());
    let sidecar = start_on_fixture_day(upstream.addr, &dir).await;
    let mut caller = client(sidecar.addr).await;
    for i in 0..20i64 {
        let key = format!("upgrade-{i}");
        let reply = apply(&mut caller, add(&key, i + 1), Some(&key), None)
            .await
            .unwrap_or_else(|status| panic!("{key}: {status:?}"));
        assert!(was_replayed(&reply), "{key}: replayed from the old record");
        assert_eq!(reply.get_ref().balance, i + 1, "{key}: the recorded answer");
        let reused = apply(&mut caller, add(&key, 1000), Some(&key), None).await;
        assert_eq!(
            reason(&reused.expect_err("another payload is refused")),
            "IDEMPOTENCY_KEY_REUSED"
        );
    }
    // The same payload as the call the kill caught (its slow reply is part of the request).
    let mut slow = add("upgrade-in-doubt", 7);
    slow.delay_ms = 10_000;
    let in_doubt = apply(&mut caller, slow, Some("upgrade-in-doubt"), None)
        .await
        .expect_err("an unknown outcome is not run again");
    assert_eq!(reason(&in_doubt), "IDEMPOTENCY_OUTCOME_UNKNOWN");
    assert_eq!(upstream.state.executions(), 0, "nothing forwarded again");
    // New keys are served on the old dir, and the dir survives a second start.
    apply(
        &mut caller,
        add("after-upgrade", 1),
        Some("after-upgrade"),
        None,
    )
    .await
    .expect("a new key runs");
    sidecar.kill().await;
    let sidecar = start_on_fixture_day(upstream.addr, &dir).await;
    let mut again = client(sidecar.addr).await;
    let reply = apply(&mut again, add("upgrade-3", 4), Some("upgrade-3"), None)
        .await
        .expect("still replayed");
    assert!(was_replayed(&reply));
    assert_eq!(upstream.state.executions(), 1);
}

/// 0.1.0 indexed its records for expiry one sled key each, in a tree this release no longer
/// keeps (its sweeper walks the records): the first walk drops that tree, and the records
/// still expire at their retention, not earlier and not never.
#[tokio::test]
async fn the_records_of_release_0_1_0_still_expire_and_their_old_index_goes() {
    use idemproxy::store::sled::{SledOptions, SledStore};
    use idemproxy::store::Store;
    let unpacked = tempfile::tempdir().unwrap();
    let dir = unpack("data-dir-0.1.0.tar.gz", unpacked.path());
    let options = SledOptions {
        dir: dir.clone(),
        cache_bytes: 1 << 20,
        bytes_max: 1 << 30,
        evict_when_full: false,
        flush_per_write: false,
        flush_timeout: std::time::Duration::from_secs(10),
        pack_records: 65_536,
    };
    let trees = |dir: &std::path::Path| {
        let db = sled::open(dir).unwrap();
        db.tree_names()
            .iter()
            .map(|name| String::from_utf8_lossy(name).into_owned())
            .collect::<Vec<_>>()
    };
    assert!(
        trees(&dir).contains(&"expiry".to_string()),
        "the fixture has the old index"
    );
    let store = SledStore::open(&options).unwrap();
    let found = store.reconcile(&[7; 8]).unwrap();
    assert_eq!(found.records, 21);
    // The fixture was written in 2026 with a 24 h retention: nothing is due a second before
    // its writing, everything is due a year later.
    let written_ms = 1_764_000_000_000;
    assert_eq!(store.maintain(written_ms).unwrap().expired, 0);
    let year_ms = 366 * 86_400_000;
    assert_eq!(
        store.maintain(written_ms + 2 * year_ms).unwrap().expired,
        21
    );
    assert_eq!(store.usage().records, 0);
    drop(store);
    std::thread::sleep(std::time::Duration::from_millis(200));
    assert!(
        !trees(&dir).contains(&"expiry".to_string()),
        "the old index is dropped"
    );
}
