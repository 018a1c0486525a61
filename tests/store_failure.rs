//! A store that cannot write fails closed: the data dir sits on a small tmpfs that is then
//! filled to ENOSPC, and a new key gets UNAVAILABLE / IDEMPOTENCY_STORE_UNAVAILABLE without
//! ever reaching the service. Mounting needs root, as on CI and the developers' machines.

#![allow(clippy::unwrap_used)] // Test helpers: a failed unwrap is a failed test.

mod support;

use std::time::Duration;
use support::tmpfs::Tmpfs;
use support::{add, apply, client, ledger, reason, was_replayed};

/// A sidecar whose data dir is on a fresh tmpfs of `size`, with a small cache and a short
/// store timeout, so a full disk shows at once.
async fn on_a_tmpfs(size: &str) -> (Tmpfs, ledger::LedgerHandle, support::Sidecar) {
    let tmpfs = Tmpfs::mount(size);
    let upstream = ledger::start().await;
    let data_dir = tmpfs.path.join("data");
    let sidecar = support::start_sidecar(upstream.addr, |args| {
        args.data_dir = data_dir.clone();
        args.sled_cache_bytes = 1 << 20;
        args.store_timeout = Duration::from_millis(500);
    })
    .await;
    (tmpfs, upstream, sidecar)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_fails_closed_and_forwards_nothing() {
    let (tmpfs, upstream, sidecar) = on_a_tmpfs("16m").await;
    let mut client = client(sidecar.addr).await;
    let first = apply(&mut client, add("before", 1), Some("before"), None)
        .await
        .expect("disk has room");
    tmpfs.fill();

    let mut refused = Vec::new();
    for n in 0..20 {
        // Big answers, so sled's buffers must reach the disk.
        let key = format!("after-{n}");
        let mut request = add(&key, 1);
        request.reply_padding_bytes = 200_000;
        match apply(&mut client, request, Some(&key), None).await {
            Err(status) if reason(&status) == "IDEMPOTENCY_STORE_UNAVAILABLE" => {
                assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
                refused.push(key);
            }
            // A claim that still fitted: the call ran, its outcome could not be stored.
            Err(status) => assert_eq!(reason(&status), "IDEMPOTENCY_OUTCOME_NOT_RECORDED"),
            Ok(_) => {}
        }
    }
    assert!(
        refused.len() >= 18,
        "a full disk refuses new keys: {} refused",
        refused.len()
    );
    // Nothing ran twice, and nothing refused as STORE_UNAVAILABLE was forwarded.
    assert!(upstream.state.executed_twice().is_empty());
    let forwarded: Vec<_> = refused
        .iter()
        .filter(|key| upstream.state.executions_of(key) > 0)
        .collect();
    assert!(
        forwarded.is_empty(),
        "forwarded without a durable claim: {forwarded:?}"
    );
    // An outcome recorded before the disk filled is still replayed: reads need no flush.
    let replay = apply(&mut client, add("before", 1), Some("before"), None)
        .await
        .expect("replayed");
    assert!(was_replayed(&replay));
    assert_eq!(replay.get_ref(), first.get_ref());
    assert_eq!(upstream.state.executions_of("before"), 1);
}

/// Regression (issue 19): the service acted, then its outcome could not be written. The caller
/// must not be told UNAVAILABLE / STORE_UNAVAILABLE, which every retry policy reads as "never
/// forwarded, safe to retry": it is told the outcome is unknown, and a retry does not run it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_outcome_that_cannot_be_stored_is_answered_as_unknown_not_unavailable() {
    let (tmpfs, upstream, sidecar) = on_a_tmpfs("24m").await;
    let mut client = client(sidecar.addr).await;
    apply(&mut client, add("before", 1), Some("before"), None)
        .await
        .expect("disk has room");
    // Room for a claim, not for a 2 MB answer.
    tmpfs.fill_leaving(256 << 10);

    let mut not_recorded = Vec::new();
    for n in 0..10 {
        let key = format!("after-{n}");
        let mut request = add(&key, 1);
        request.reply_padding_bytes = 2_000_000;
        let Err(status) = apply(&mut client, request, Some(&key), None).await else {
            continue;
        };
        let executed = upstream.state.executions_of(&key) > 0;
        match reason(&status).as_str() {
            "IDEMPOTENCY_STORE_UNAVAILABLE" => {
                assert!(!executed, "{key}: UNAVAILABLE said of a call that ran");
            }
            "IDEMPOTENCY_OUTCOME_NOT_RECORDED" => {
                assert!(executed, "{key}: {status:?}");
                assert_eq!(status.code(), tonic::Code::Unknown, "{status:?}");
                not_recorded.push(key);
            }
            other => panic!("{key}: unexpected refusal {other}: {status:?}"),
        }
    }
    assert!(
        !not_recorded.is_empty(),
        "some call ran and could not record its outcome"
    );
    for key in &not_recorded {
        let retried = apply(&mut client, add(key, 1), Some(key), None).await;
        assert!(retried.is_err(), "{key}: a retry must not run it again");
        assert_eq!(upstream.state.executions_of(key), 1, "{key}");
    }
}
