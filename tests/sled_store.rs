//! The sled store on a real directory: retention, the size bound and its eviction order,
//! refusal when nothing may be evicted, and recovery of a previous process's claims.

mod support;

use idemproxy::key::Key;
use idemproxy::record::{self, ClaimRequest, Claimed, Response, State};
use idemproxy::store::sled::{SledOptions, SledStore};
use idemproxy::store::{Operation, Store, StoreError};
use std::time::Duration;
use support::{add, apply, client, ledger, reason, start_sidecar, was_replayed};

fn options(dir: &std::path::Path, bytes_max: u64) -> SledOptions {
    SledOptions {
        dir: dir.to_owned(),
        cache_bytes: 4 << 20,
        bytes_max,
        evict_when_full: false,
        flush_per_write: false,
        flush_timeout: Duration::from_secs(5),
        pack_records: 65_536,
    }
}

/// A claim by process `process` (its incarnation: eight bytes of that value), claim number
/// `n` of that process.
fn token(process: u8, n: u8) -> [u8; 16] {
    let mut token = [process; 16];
    token[8..].fill(n);
    token
}

/// Claim number `n` of process `process`, at `now_ms`.
fn claim_request(process: u8, n: u8, now_ms: u64) -> ClaimRequest<'static> {
    ClaimRequest {
        fingerprint: &[1; 32],
        method: "/s.S/M",
        caller: "-",
        token: token(process, n),
        now_ms,
        lease_until_ms: now_ms + 60_000,
        expires_ms: now_ms + 3_600_000 + u64::from(n),
        sole_owner: Some([process; 8]),
        retry_in_doubt: false,
        origin: None,
        at_quota: false,
        serial: None,
    }
}

async fn claim(
    store: &SledStore,
    serial: &str,
    process: u8,
    n: u8,
    now_ms: u64,
) -> Result<Claimed, StoreError> {
    let key = Key::derive("/s.S/M", "-", serial.as_bytes());
    let request = claim_request(process, n, now_ms);
    store
        .update(Operation::Claim, &key, |current| {
            record::claim(current, &request)
        })
        .await
}

async fn complete(store: &SledStore, serial: &str, process: u8, n: u8, body_bytes: usize) {
    let key = Key::derive("/s.S/M", "-", serial.as_bytes());
    let response = Response {
        http_status: 200,
        body: vec![0; body_bytes].into(),
        ..Response::default()
    };
    let done = store
        .update(Operation::Complete, &key, |current| {
            record::complete(
                current,
                &token(process, n),
                Some(response.clone()),
                1,
                3_600_000 + u64::from(n),
            )
        })
        .await
        .expect("the store writes");
    assert_eq!(done, record::Fenced::Applied);
}

#[tokio::test]
async fn records_expire_after_the_retention_and_the_key_runs_again() {
    let upstream = ledger::start().await;
    let sidecar = start_sidecar(upstream.addr, |args| {
        args.retention = Duration::from_millis(300)
    })
    .await;
    let mut client = client(sidecar.addr).await;
    apply(&mut client, add("r", 1), Some("r"), None)
        .await
        .unwrap();
    let replay = apply(&mut client, add("r", 1), Some("r"), None)
        .await
        .unwrap();
    assert!(was_replayed(&replay));
    sidecar.wait_for_records(0).await;
    let again = apply(&mut client, add("r", 1), Some("r"), None)
        .await
        .unwrap();
    assert!(
        !was_replayed(&again),
        "after the retention the key is new again"
    );
    assert_eq!(upstream.state.executions(), 2);
}

/// A duplicate of a durable record is answered from it without waiting for a flush (the
/// claim it would have been, tried first, wrote nothing).
#[tokio::test]
async fn a_duplicate_of_a_durable_record_waits_for_no_flush() {
    let dir = tempfile::tempdir().unwrap();
    let store = SledStore::open(&options(dir.path(), u64::MAX)).unwrap();
    store.reconcile(&[9; 8]).unwrap();
    claim(&store, "done", 1, 1, 0).await.unwrap();
    complete(&store, "done", 1, 1, 10).await;
    let counts = store.group_commit_counts();
    let flushes = counts.flushes.load(std::sync::atomic::Ordering::Relaxed);
    for n in 2..5 {
        let answer = claim(&store, "done", 2, n, 0).await.unwrap();
        assert!(matches!(answer, Claimed::Replay(_)), "{answer:?}");
    }
    let after = counts.flushes.load(std::sync::atomic::Ordering::Relaxed);
    assert_eq!(after, flushes, "duplicates waited for flushes");
}

/// Only a claim is tried against "absent" before the record is read: a completion, a release
/// and an in-doubt mark are decided once, on the record as it is (issue 30: each was decided
/// twice, and the engine cloned the response for the discarded try).
#[tokio::test]
async fn only_a_claim_is_tried_unread() {
    let dir = tempfile::tempdir().unwrap();
    let store = SledStore::open(&options(dir.path(), u64::MAX)).unwrap();
    store.reconcile(&[9; 8]).unwrap();
    let key = Key::derive("/s.S/M", "-", b"decided-once");
    let request = claim_request(1, 1, 0);
    let mut claim_runs = 0;
    store
        .update(Operation::Claim, &key, |current| {
            claim_runs += 1;
            record::claim(current, &request)
        })
        .await
        .unwrap();
    assert_eq!(claim_runs, 1, "a fresh claim lands on its unread try");
    let mut runs = Vec::new();
    for operation in [Operation::MarkInDoubt, Operation::Complete] {
        let mut seen = Vec::new();
        store
            .update(operation, &key, |current| {
                seen.push(current.is_some());
                let change = match operation {
                    Operation::MarkInDoubt => record::mark_in_doubt(current, &token(1, 1), "test"),
                    _ => record::complete(current, &token(1, 1), None, 1, 3_600_000),
                };
                (change.0, ())
            })
            .await
            .unwrap();
        runs.push(seen);
    }
    assert_eq!(
        runs,
        vec![vec![true], vec![true]],
        "each transition ran once, on the record as read"
    );
}

/// The sweeper skips its walk while no record in `records` can have expired: a record written
/// after a walk, expiring before everything that walk saw, still expires on time.
#[tokio::test]
async fn a_record_written_after_a_walk_still_expires_on_time() {
    let dir = tempfile::tempdir().unwrap();
    let store = SledStore::open(&options(dir.path(), u64::MAX)).unwrap();
    store.reconcile(&[9; 8]).unwrap();
    // An empty store: the walk finds nothing, so nothing in it can expire.
    assert_eq!(store.maintain(0).unwrap().expired, 0);
    // Completed, it expires at 3,600,001 ms; the next walk sees it.
    claim(&store, "late", 1, 1, 0).await.unwrap();
    complete(&store, "late", 1, 1, 10).await;
    assert_eq!(store.maintain(1).unwrap().expired, 0);
    // Claimed after that walk, expiring at 3,600,000 ms (its lease ends at 60,000 ms).
    claim(&store, "early", 1, 0, 0).await.unwrap();
    assert_eq!(store.maintain(2).unwrap().expired, 0);
    let expired = store.maintain(3_600_000).unwrap().expired;
    assert_eq!(
        expired, 1,
        "the record written after the walk went at its time"
    );
    assert_eq!(store.maintain(3_600_001).unwrap().expired, 1);
    assert_eq!(store.usage().records, 0);
}

#[tokio::test]
async fn with_eviction_chosen_the_size_bound_evicts_completed_records_closest_to_expiry_first() {
    let dir = tempfile::tempdir().unwrap();
    let evicting = SledOptions {
        evict_when_full: true,
        ..options(dir.path(), 16 << 10)
    };
    let store = SledStore::open(&evicting).expect("opens");
    // An unknown outcome and a live claim come first: the oldest, yet never evicted.
    assert_eq!(
        claim(&store, "doubt", 1, 1, 0).await.unwrap(),
        Claimed::Owned
    );
    let key = Key::derive("/s.S/M", "-", b"doubt");
    store
        .update(Operation::MarkInDoubt, &key, |current| {
            record::mark_in_doubt(current, &token(1, 1), "test")
        })
        .await
        .unwrap();
    assert_eq!(
        claim(&store, "flight", 1, 2, 0).await.unwrap(),
        Claimed::Owned
    );
    for n in 3..40u8 {
        let serial = format!("done-{n}");
        assert_eq!(
            claim(&store, &serial, 1, n, 0).await.unwrap(),
            Claimed::Owned
        );
        complete(&store, &serial, 1, n, 1000).await;
    }
    assert!(store.usage().bytes > 16 << 10);
    let done = store.maintain(0).expect("maintenance runs");
    assert!(done.evicted > 0, "records were evicted");
    assert!(store.usage().bytes <= 16 << 10, "back under the bound");
    let state = |serial: &str| {
        store
            .get(&Key::derive("/s.S/M", "-", serial.as_bytes()))
            .unwrap()
            .map(|r| r.state())
    };
    assert_eq!(state("doubt"), Some(State::InDoubt));
    assert_eq!(state("flight"), Some(State::InFlight));
    assert_eq!(state("done-3"), None, "closest to expiry went first");
    assert_eq!(state("done-39"), Some(State::Completed), "the newest stays");
}

#[tokio::test]
async fn a_full_store_with_nothing_to_evict_refuses_new_claims() {
    let dir = tempfile::tempdir().unwrap();
    let store = SledStore::open(&options(dir.path(), 1 << 10)).expect("opens");
    for n in 0..20u8 {
        claim(&store, &format!("flight-{n}"), 1, n, 0)
            .await
            .unwrap();
    }
    store.maintain(0).unwrap();
    let refused = claim(&store, "one-more", 1, 99, 0).await.expect_err("full");
    assert!(matches!(refused, StoreError::Full { .. }), "{refused:?}");
    // A duplicate of a stored record is still answered.
    assert!(matches!(
        claim(&store, "flight-1", 1, 98, 0).await.unwrap(),
        Claimed::InProgress { .. }
    ));
}

#[tokio::test]
async fn a_restart_turns_the_previous_process_claims_into_in_doubt() {
    let dir = tempfile::tempdir().unwrap();
    {
        let store = SledStore::open(&options(dir.path(), 1 << 30)).unwrap();
        claim(&store, "running", 1, 1, 0).await.unwrap();
        claim(&store, "finished", 1, 2, 0).await.unwrap();
        complete(&store, "finished", 1, 2, 10).await;
    }
    let store = SledStore::open(&options(dir.path(), 1 << 30)).unwrap();
    // Before any walk of the store, a claim by the new process (incarnation 3) already sees
    // the old claim as orphaned: never in progress, never re-run.
    assert!(matches!(
        claim(&store, "running", 3, 1, 1).await.unwrap(),
        Claimed::InDoubt { .. }
    ));
    assert!(matches!(
        claim(&store, "finished", 3, 2, 1).await.unwrap(),
        Claimed::Replay(_)
    ));
    // A claim of the new process itself is not touched by the walk.
    assert_eq!(
        claim(&store, "fresh", 3, 3, 1).await.unwrap(),
        Claimed::Owned
    );
    let found = store.reconcile(&[3; 8]).unwrap();
    assert_eq!(found.records, 3);
    assert_eq!(found.in_doubt, 0, "already settled by the claim above");
    let state = |serial: &str| {
        store
            .get(&Key::derive("/s.S/M", "-", serial.as_bytes()))
            .unwrap()
            .map(|r| r.state())
    };
    assert_eq!(state("fresh"), Some(State::InFlight));
    assert_eq!(state("running"), Some(State::InDoubt));
    // The sweeper finds every record when it expires (by then the new claim's lease is long
    // over too).
    let swept = store.maintain(u64::MAX / 2).unwrap();
    assert_eq!(swept.expired, 3);
    assert_eq!(store.usage().records, 0);
}

/// The sweeper keeps no index: it walks the records, 10,000 a round, going on where the last
/// round stopped, so a store larger than one round is swept whole in a few rounds, and a
/// round that finds nothing due walks on regardless.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sweeper_walks_a_store_larger_than_one_round_in_turn() {
    let dir = tempfile::tempdir().unwrap();
    let store = std::sync::Arc::new(SledStore::open(&options(dir.path(), 1 << 30)).unwrap());
    const RECORDS: u32 = 25_000;
    let writers: Vec<_> = (0..32u32)
        .map(|writer| {
            let store = store.clone();
            tokio::spawn(async move {
                for n in (writer..RECORDS).step_by(32) {
                    let key = Key::derive("/s.S/M", "-", &n.to_be_bytes());
                    let mut request = claim_request(1, 0, 0);
                    // Every other record is due at 1 s, the rest in 30 years.
                    request.expires_ms = if n % 2 == 0 { 1_000 } else { 1 << 40 };
                    request.lease_until_ms = 500;
                    let claimed = store.update(Operation::Claim, &key, |current| {
                        record::claim(current, &request)
                    });
                    assert_eq!(claimed.await.unwrap(), Claimed::Owned);
                }
            })
        })
        .collect();
    for writer in writers {
        writer.await.unwrap();
    }
    let rounds: Vec<u64> = (0..4)
        .map(|_| store.maintain(2_000).unwrap().expired)
        .collect();
    assert_eq!(
        rounds.iter().sum::<u64>(),
        u64::from(RECORDS / 2),
        "{rounds:?}"
    );
    assert_eq!(rounds[3], 0, "three rounds walk 25,000 records: {rounds:?}");
    assert!(
        rounds[0] <= 5_500,
        "a round looks at 10,000 records: {rounds:?}"
    );
    assert_eq!(store.usage().records, u64::from(RECORDS / 2));
}

#[tokio::test]
async fn reconciling_marks_every_orphaned_claim_in_doubt() {
    let dir = tempfile::tempdir().unwrap();
    {
        let store = SledStore::open(&options(dir.path(), 1 << 30)).unwrap();
        for n in 0..50u8 {
            claim(&store, &format!("orphan-{n}"), 1, n, 0)
                .await
                .unwrap();
        }
    }
    let store = SledStore::open(&options(dir.path(), 1 << 30)).unwrap();
    let found = store.reconcile(&[9; 8]).unwrap();
    assert_eq!((found.records, found.in_doubt), (50, 50));
    assert_eq!(store.count_states().unwrap()[&State::InDoubt], 50);
    assert!(store.usage().bytes > 0);
}

#[tokio::test]
async fn the_sidecar_refuses_when_its_store_is_full() {
    let upstream = ledger::start().await;
    let sidecar = start_sidecar(upstream.addr, |args| {
        args.max_store_bytes = 1 << 10;
        args.max_in_flight_wait = Duration::from_secs(0);
    })
    .await;
    let mut client = client(sidecar.addr).await;
    // Unknown outcomes can never be evicted: fill the store with them.
    let mut n = 0;
    let refused = loop {
        let mut request = add(&format!("f{n}"), 1);
        request.fail_code = tonic::Code::Internal as u32;
        match apply(&mut client, request, Some(&format!("f{n}")), None).await {
            Err(status) if reason(&status) == "IDEMPOTENCY_STORE_FULL" => break status,
            _ => {}
        }
        n += 1;
        assert!(n < 500, "the store never reported full");
        if n % 5 == 0 {
            tokio::time::sleep(Duration::from_millis(60)).await; // let a sweeper round run
        }
    };
    assert_eq!(refused.code(), tonic::Code::ResourceExhausted);
    assert_eq!(
        upstream.state.executions(),
        n,
        "the refused call was never forwarded"
    );
}

/// Issue 31, item 5: a full store evicted the oldest COMPLETED records, inside their
/// retention, and their retries ran again (any caller could push out other callers'
/// outcomes). By default it now refuses new keys and keeps every outcome.
#[tokio::test]
async fn a_full_store_keeps_every_outcome_and_refuses_new_keys() {
    let upstream = ledger::start().await;
    let sidecar = start_sidecar(upstream.addr, |args| args.max_store_bytes = 4 << 10).await;
    let mut client = client(sidecar.addr).await;
    let mut recorded = 0;
    let refused = loop {
        let key = format!("paid-{recorded}");
        match apply(&mut client, add(&key, 1), Some(&key), None).await {
            Ok(_) => recorded += 1,
            Err(status) => break status,
        }
        assert!(recorded < 500, "the store never said it was full");
        if recorded % 5 == 0 {
            tokio::time::sleep(Duration::from_millis(60)).await; // let a sweeper round run
        }
    };
    assert_eq!(reason(&refused), "IDEMPOTENCY_STORE_FULL", "{refused:?}");
    assert_eq!(refused.code(), tonic::Code::ResourceExhausted);
    // Sweeper rounds come and go; every outcome stays inside its retention.
    tokio::time::sleep(Duration::from_millis(200)).await;
    for n in 0..recorded {
        let key = format!("paid-{n}");
        let reply = apply(&mut client, add(&key, 1), Some(&key), None)
            .await
            .unwrap_or_else(|status| panic!("{key}: {status:?}"));
        assert!(was_replayed(&reply), "{key}: replayed, not run again");
    }
    assert_eq!(upstream.state.executions(), recorded, "each key ran once");
    assert!(upstream.state.executed_twice().is_empty());
}

/// With group commit off (`--flush per-write`, the benchmark's baseline) no flush covers two
/// writes: each write lands only once every earlier write has had its own flush. (Before, the
/// writes of concurrent calls landed together and one real flush covered them all, so the
/// baseline was group commit under another name.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_group_commit_off_each_write_waits_for_the_flush_of_the_one_before() {
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::Arc;
    let dir = tempfile::tempdir().unwrap();
    let mut settings = options(dir.path(), u64::MAX);
    settings.flush_per_write = true;
    let store = Arc::new(SledStore::open(&settings).unwrap());
    let flushes = store.group_commit_counts();
    let landed = Arc::new(AtomicU64::new(0));
    let unflushed_seen = Arc::new(AtomicU64::new(0));
    let writers: Vec<_> = (0..16u8)
        .map(|n| {
            let (store, flushes) = (store.clone(), flushes.clone());
            let (landed, unflushed_seen) = (landed.clone(), unflushed_seen.clone());
            tokio::spawn(async move {
                let key = Key::derive("/s.S/M", "-", format!("serial-{n}").as_bytes());
                let request = claim_request(1, n, 1);
                store
                    .update(Operation::Claim, &key, |current| {
                        let before = landed.fetch_add(1, Ordering::SeqCst);
                        if flushes.flushes.load(Ordering::SeqCst) < before {
                            unflushed_seen.fetch_add(1, Ordering::SeqCst);
                        }
                        record::claim(current, &request)
                    })
                    .await
                    .unwrap()
            })
        })
        .collect();
    for writer in writers {
        assert_eq!(writer.await.unwrap(), Claimed::Owned);
    }
    assert_eq!(landed.load(Ordering::SeqCst), 16);
    assert_eq!(
        unflushed_seen.load(Ordering::SeqCst),
        0,
        "a write landed beside one not yet flushed"
    );
}

/// Opens `dir` packing COMPLETED records once `records` holds `pack_records`.
fn packing(dir: &std::path::Path, pack_records: u64, bytes_max: u64) -> SledStore {
    let options = SledOptions {
        pack_records,
        ..options(dir, bytes_max)
    };
    support::retry_sled_lock(dir, || SledStore::open(&options)).expect("sled reopens")
}

/// sled itself on `dir`.
fn raw_sled(dir: &std::path::Path) -> sled::Db {
    support::retry_sled_lock(dir, || idemproxy::store::sled::open_db(dir, 1 << 20))
        .expect("sled opens")
}

/// Claims and completes `count` keys `done-N` (process 1), answered with 100-byte bodies.
async fn fill(store: &SledStore, count: u8) {
    for n in 0..count {
        let serial = format!("done-{n}");
        assert_eq!(
            claim(store, &serial, 1, n, 0)
                .await
                .expect("the store writes"),
            Claimed::Owned
        );
        complete(store, &serial, 1, n, 100).await;
    }
}

/// How a duplicate of `serial` is answered now, by process 9.
async fn duplicate(store: &SledStore, serial: &str) -> Claimed {
    claim(store, serial, 9, 200, 10)
        .await
        .expect("the store answers")
}

#[tokio::test]
async fn completed_records_are_packed_and_duplicates_are_still_answered_after_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    {
        let store = packing(dir.path(), 10, 1 << 30);
        fill(&store, 250).await;
        // One claim still running: never packed.
        claim(&store, "flight", 1, 251, 0).await.unwrap();
        store.maintain(0).unwrap();
        assert_eq!(
            store.packed_records(),
            250,
            "every COMPLETED record is packed"
        );
        assert_eq!(store.usage().records, 251, "and counted once");
        assert!(matches!(
            duplicate(&store, "done-7").await,
            Claimed::Replay(_)
        ));
        assert!(matches!(
            claim(&store, "flight", 1, 252, 10).await.unwrap(),
            Claimed::InProgress { .. }
        ));
        assert_eq!(store.count_states().unwrap()[&State::Completed], 250);
    }
    let store = packing(dir.path(), 10, 1 << 30);
    assert_eq!(store.packed_records(), 250, "the slice is found at open");
    let found = store.reconcile(&[2; 8]).unwrap();
    assert_eq!(found.records, 251);
    for n in [0, 99, 249] {
        let answer = duplicate(&store, &format!("done-{n}")).await;
        assert!(matches!(answer, Claimed::Replay(_)), "done-{n}: {answer:?}");
    }
    assert_eq!(duplicate(&store, "never-seen").await, Claimed::Owned);
}

#[tokio::test]
async fn a_purged_packed_record_runs_again_and_stays_purged_across_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    {
        let store = packing(dir.path(), 1, 1 << 30);
        fill(&store, 20).await;
        store.maintain(0).unwrap();
        assert_eq!(store.packed_records(), 20);
        let key = Key::derive("/s.S/M", "-", b"done-3");
        let purged = store
            .update(Operation::Operator, &key, |current| {
                record::purge(current, 10)
            })
            .await
            .unwrap();
        assert!(matches!(purged, record::Resolved::Applied(_)));
        assert_eq!(store.get(&key).unwrap(), None);
    }
    let store = packing(dir.path(), 1, 1 << 30);
    store.reconcile(&[2; 8]).unwrap();
    assert_eq!(
        duplicate(&store, "done-3").await,
        Claimed::Owned,
        "runs again"
    );
    assert!(matches!(
        duplicate(&store, "done-4").await,
        Claimed::Replay(_)
    ));
    // Its new outcome is packed into a newer slice, which the purge does not hide.
    let key = Key::derive("/s.S/M", "-", b"done-3");
    let response = Response {
        http_status: 200,
        ..Response::default()
    };
    store
        .update(Operation::Complete, &key, |current| {
            record::complete(
                current,
                &token(9, 200),
                Some(response.clone()),
                20,
                3_600_000,
            )
        })
        .await
        .unwrap();
    store.maintain(30).unwrap();
    assert_eq!(store.packed_records(), 21);
    assert!(matches!(
        duplicate(&store, "done-3").await,
        Claimed::Replay(_)
    ));
}

#[tokio::test]
async fn a_slice_is_dropped_whole_once_its_last_record_expires() {
    let dir = tempfile::tempdir().unwrap();
    let store = packing(dir.path(), 1, 1 << 30);
    fill(&store, 50).await;
    store.maintain(0).unwrap();
    assert_eq!(store.packed_records(), 50);
    // done-N expires at 3,600,000 + N: the slice lasts until its last record expires.
    let kept = store.maintain(3_600_010).unwrap();
    assert_eq!(kept.expired, 0);
    assert_eq!(store.packed_records(), 50);
    let now = 3_600_050;
    let dropped = store.maintain(now).unwrap();
    assert_eq!(dropped.expired, 50);
    assert_eq!(store.packed_records(), 0);
    assert_eq!(store.usage().records, 0);
    assert_eq!(store.usage().bytes, 0);
    assert_eq!(
        store.get(&Key::derive("/s.S/M", "-", b"done-9")).unwrap(),
        None
    );
}

#[tokio::test]
async fn with_eviction_chosen_over_the_size_bound_whole_slices_go_first() {
    let dir = tempfile::tempdir().unwrap();
    let store = packing(dir.path(), 1, 1 << 30);
    fill(&store, 40).await;
    store.maintain(0).unwrap();
    drop(store);
    let evicting = SledOptions {
        evict_when_full: true,
        ..options(dir.path(), 8 << 10)
    };
    let store = support::retry_sled_lock(dir.path(), || SledStore::open(&evicting)).unwrap();
    store.reconcile(&[2; 8]).unwrap();
    assert!(store.usage().bytes > 8 << 10);
    let done = store.maintain(0).unwrap();
    assert_eq!(done.evicted, 40, "the slice went whole");
    assert_eq!(store.usage().records, 0);
    assert_eq!(duplicate(&store, "done-1").await, Claimed::Owned);
}

#[tokio::test]
async fn an_unfinished_slice_is_removed_at_open_and_a_missing_one_refuses_the_store() {
    let dir = tempfile::tempdir().unwrap();
    {
        let store = packing(dir.path(), 1, 1 << 30);
        fill(&store, 5).await;
    }
    // What a crash during a build leaves: a slice file with no catalog entry.
    let unfinished = dir.path().join("slices").join(format!("{:016x}.slice", 7));
    std::fs::write(&unfinished, b"half a chunk").unwrap();
    let store = packing(dir.path(), 1, 1 << 30);
    assert!(!unfinished.exists(), "removed at open");
    store.reconcile(&[2; 8]).unwrap();
    assert_eq!(store.packed_records(), 0);
    store.maintain(0).unwrap();
    assert_eq!(store.packed_records(), 5);
    assert!(matches!(
        duplicate(&store, "done-2").await,
        Claimed::Replay(_)
    ));
    drop(store);
    let files: Vec<_> = std::fs::read_dir(dir.path().join("slices"))
        .unwrap()
        .map(|entry| entry.unwrap().path())
        .collect();
    assert_eq!(files.len(), 1, "the finished slice: {files:?}");
    // Its records are nowhere else: without the file the store is not served.
    std::fs::remove_file(&files[0]).unwrap();
    let options = SledOptions {
        pack_records: 1,
        ..options(dir.path(), 1 << 30)
    };
    let refused = support::retry_sled_lock(dir.path(), || SledStore::open(&options))
        .err()
        .expect("not opened without the records of its slice");
    assert!(matches!(refused, StoreError::Corrupt(_)), "{refused:?}");
    assert!(
        refused.to_string().contains("cannot be opened"),
        "{refused}"
    );
}

#[tokio::test]
async fn a_move_into_a_slice_that_a_stop_interrupted_is_finished_at_reconcile() {
    let dir = tempfile::tempdir().unwrap();
    let key = Key::derive("/s.S/M", "-", b"done-4");
    let packed = {
        let store = packing(dir.path(), 1, 1 << 30);
        fill(&store, 20).await;
        store.maintain(0).unwrap();
        store.get(&key).unwrap().expect("packed")
    };
    {
        // The record still in `records` too, as a stop before the move's deletes leaves it.
        use prost::Message;
        let db = raw_sled(dir.path());
        let records = db.open_tree("records").unwrap();
        assert!(records.is_empty(), "moved");
        records
            .insert(key.as_bytes(), packed.encode_to_vec())
            .unwrap();
        db.flush().unwrap();
    }
    {
        let store = packing(dir.path(), 1 << 16, 1 << 30);
        let found = store.reconcile(&[2; 8]).unwrap();
        assert_eq!(found.records, 20, "counted once");
        assert!(matches!(
            duplicate(&store, "done-4").await,
            Claimed::Replay(_)
        ));
    }
    let db = raw_sled(dir.path());
    assert!(
        db.open_tree("records").unwrap().is_empty(),
        "the move was finished"
    );
}

#[tokio::test]
async fn a_scan_pages_through_records_and_every_slice_once() {
    let dir = tempfile::tempdir().unwrap();
    let store = packing(dir.path(), 1, 1 << 30);
    fill(&store, 30).await;
    store.maintain(0).unwrap();
    // A second slice, then records left in `records`: one new, one purged from a slice.
    for n in 30..45u8 {
        let serial = format!("done-{n}");
        claim(&store, &serial, 1, n, 0).await.unwrap();
        complete(&store, &serial, 1, n, 100).await;
    }
    store.maintain(0).unwrap();
    assert_eq!(store.packed_records(), 45);
    claim(&store, "flight", 1, 99, 0).await.unwrap();
    let purged = Key::derive("/s.S/M", "-", b"done-3");
    store
        .update(Operation::Operator, &purged, |current| {
            record::purge(current, 10)
        })
        .await
        .unwrap();
    let mut seen = Vec::new();
    let mut cursor = None;
    for _ in 0..20 {
        let page = store.scan(cursor, 7).await.unwrap();
        seen.extend(page.records.into_iter().map(|(key, _)| key));
        cursor = page.next;
        if cursor.is_none() {
            break;
        }
    }
    assert!(cursor.is_none(), "46 records take 7 pages of 7, not 20");
    let mut expected: Vec<Key> = (0..45u8)
        .filter(|n| *n != 3)
        .map(|n| Key::derive("/s.S/M", "-", format!("done-{n}").as_bytes()))
        .chain([Key::derive("/s.S/M", "-", b"flight")])
        .collect();
    assert_eq!(
        seen.len(),
        expected.len(),
        "each record once, the purged one not"
    );
    seen.sort();
    expected.sort();
    assert_eq!(seen, expected);
}
