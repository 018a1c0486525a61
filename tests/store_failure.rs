//! A store that cannot write fails closed: the data dir sits on a small tmpfs that is then
//! filled to ENOSPC, and a new key gets UNAVAILABLE / IDEMPOTENCY_STORE_UNAVAILABLE without
//! ever reaching the service. Mounting needs root, as on CI and the developers' machines.

#![allow(clippy::unwrap_used)] // Test helpers: a failed unwrap is a failed test.

mod support;

use support::tmpfs::Tmpfs;
use support::{add, apply, client, ledger, reason, was_replayed};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_fails_closed_and_forwards_nothing() {
    let tmpfs = Tmpfs::mount("16m");
    let upstream = ledger::start().await;
    let data_dir = tmpfs.path.join("data");
    let sidecar = support::start_sidecar(upstream.addr, |args| {
        args.data_dir = Some(data_dir.clone());
        args.sled_cache_bytes = Some("1MiB".into());
        args.store_timeout = Some("500ms".into());
    })
    .await;
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
        if let Err(status) = apply(&mut client, request, Some(&key), None).await {
            assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
            assert_eq!(reason(&status), "IDEMPOTENCY_STORE_UNAVAILABLE");
            refused.push(key);
        }
    }
    assert!(
        refused.len() >= 19,
        "a full disk refuses new keys: {} refused",
        refused.len()
    );
    // Nothing ran twice. At most the first refused call ran: its claim reached the disk and
    // only its outcome did not, so the caller was told the store failed (a retry gets
    // IDEMPOTENCY_OUTCOME_UNKNOWN). Every later one was refused before it was forwarded.
    assert!(upstream.state.executed_twice().is_empty());
    let forwarded: Vec<_> = refused
        .iter()
        .filter(|key| upstream.state.executions_of(key) > 0)
        .collect();
    assert!(
        forwarded.len() <= 1,
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
