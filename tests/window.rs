//! A key's window, on every store (`IDEMPROXY_TEST_STORE`): every answer to a keyed call says
//! when its record expires (`idempotency-expires`), a retry whose `idempotency-first-sent`
//! is older than the retention is refused rather than run again, and metadata a method names
//! (`replay_drop_metadata`) reaches the first caller only. Real sidecar, real counting
//! upstream.

// A failed unwrap is a failed test.
#![allow(clippy::unwrap_used)]

mod support;

use idemproxy::pb::idemproxy::testing::v1::ledger_client::LedgerClient;
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use support::{add, apply, client, ledger, reason, start_sidecar, was_replayed};
use tonic::metadata::MetadataMap;

fn now_s() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

fn expires(metadata: &MetadataMap) -> u64 {
    metadata
        .get("idempotency-expires")
        .expect("the answer says its key's window")
        .to_str()
        .unwrap()
        .parse()
        .unwrap()
}

/// An Apply call with the key, and `first_sent` as `idempotency-first-sent` when given.
async fn apply_sent(
    client: &mut LedgerClient<tonic::transport::Channel>,
    amount: i64,
    key: &str,
    first_sent: Option<u64>,
) -> Result<tonic::Response<idemproxy::pb::idemproxy::testing::v1::ApplyReply>, tonic::Status> {
    let mut request = tonic::Request::new(add("acct", amount));
    let metadata = request.metadata_mut();
    metadata.insert("idempotency-key", key.parse().unwrap());
    if let Some(first_sent) = first_sent {
        metadata.insert("idempotency-first-sent", first_sent.into());
    }
    client.apply(request).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_answer_to_a_keyed_call_says_when_its_key_expires() {
    let upstream = ledger::start().await;
    let sidecar = start_sidecar(upstream.addr, |args| {
        args.retention = Duration::from_secs(3600);
    })
    .await;
    let mut ledger_client = client(sidecar.addr).await;
    let before = now_s();
    let first = apply(&mut ledger_client, add("acct", 5), Some("k-1"), None)
        .await
        .unwrap();
    let window = expires(first.metadata());
    assert!(
        (before + 3599..=now_s() + 3600).contains(&window),
        "an hour from the call: {window}, called at {before}"
    );
    let replay = apply(&mut ledger_client, add("acct", 5), Some("k-1"), None)
        .await
        .unwrap();
    assert!(was_replayed(&replay));
    assert_eq!(
        expires(replay.metadata()),
        window,
        "the same record, the same window"
    );
    let reused = apply(&mut ledger_client, add("acct", 6), Some("k-1"), None)
        .await
        .unwrap_err();
    assert_eq!(reason(&reused), "IDEMPOTENCY_KEY_REUSED");
    assert_eq!(
        expires(reused.metadata()),
        window,
        "a refusal about the key says it too"
    );
    // A call the service refuses before acting is released: no record, no window.
    let mut unauthenticated = add("acct", 1);
    unauthenticated.fail_code = 16;
    let released = apply(&mut ledger_client, unauthenticated, Some("k-2"), None)
        .await
        .unwrap_err();
    assert!(released.metadata().get("idempotency-expires").is_none());
    assert_eq!(upstream.state.executions_of("acct"), 2);
    sidecar.running.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_later_than_the_retention_is_refused_and_never_runs_again() {
    let upstream = ledger::start().await;
    let sidecar = start_sidecar(upstream.addr, |args| {
        args.retention = Duration::from_secs(2);
        args.max_clock_skew = Duration::from_secs(1);
    })
    .await;
    let mut ledger_client = client(sidecar.addr).await;
    let first_sent = now_s();
    apply_sent(&mut ledger_client, 10, "late-1", Some(first_sent))
        .await
        .expect("the first attempt runs");
    // A caller whose clock is ahead by up to the skew is still served.
    apply_sent(&mut ledger_client, 10, "ahead-1", Some(now_s() + 1))
        .await
        .expect("a clock ahead within --max-clock-skew is accepted");
    let far_ahead = apply_sent(&mut ledger_client, 10, "ahead-2", Some(now_s() + 30))
        .await
        .unwrap_err();
    assert_eq!(reason(&far_ahead), "IDEMPOTENCY_KEY_INVALID");
    let without = apply_sent(&mut ledger_client, 10, "plain-1", None).await;
    assert!(without.is_ok(), "without the header, as before");
    assert_eq!(upstream.state.executions_of("acct"), 3);

    // Past the retention the record may be gone: the retry is refused, not run again.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let late = apply_sent(&mut ledger_client, 10, "late-1", Some(first_sent))
        .await
        .unwrap_err();
    assert_eq!(late.code(), tonic::Code::FailedPrecondition);
    assert_eq!(reason(&late), "IDEMPOTENCY_KEY_EXPIRED");
    assert_eq!(upstream.state.executions_of("acct"), 3, "never forwarded");
    // The same retry without its first-sent time runs again, as the README says it does.
    apply_sent(&mut ledger_client, 10, "late-1", None)
        .await
        .expect("runs as a new call");
    assert_eq!(upstream.state.executions_of("acct"), 4);
    sidecar.running.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_method_may_require_the_first_sent_time() {
    let upstream = ledger::start().await;
    let sidecar =
        support::start_sidecar_with_apply_rule(upstream.addr, "require-first-sent = true").await;
    let mut ledger_client = client(sidecar.addr).await;
    let missing = apply_sent(&mut ledger_client, 1, "k-1", None)
        .await
        .unwrap_err();
    assert_eq!(reason(&missing), "IDEMPOTENCY_KEY_MISSING");
    apply_sent(&mut ledger_client, 1, "k-1", Some(now_s()))
        .await
        .expect("with it, served");
    assert_eq!(upstream.state.executions_of("acct"), 1);
    sidecar.running.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metadata_a_method_drops_from_replays_reaches_only_the_first_caller() {
    let upstream = ledger::start().await;
    let sidecar = support::start_sidecar_with_apply_rule(
        upstream.addr,
        "replay-drop-metadata = [\"X-Ledger-Execution\"]",
    )
    .await;
    let mut ledger_client = client(sidecar.addr).await;
    let first = apply(&mut ledger_client, add("acct", 3), Some("k-1"), None)
        .await
        .unwrap();
    assert_eq!(first.metadata().get("x-ledger-execution").unwrap(), "1");
    let replay = apply(&mut ledger_client, add("acct", 3), Some("k-1"), None)
        .await
        .unwrap();
    assert!(was_replayed(&replay));
    assert!(
        replay.metadata().get("x-ledger-execution").is_none(),
        "dropped from the record"
    );
    assert_eq!(replay.get_ref(), first.get_ref(), "the same message");
    let others = |metadata: &MetadataMap| {
        let mut headers: Vec<String> = metadata
            .clone()
            .into_headers()
            .iter()
            .filter(|(name, _)| {
                !["x-ledger-execution", "idempotency-replayed"].contains(&name.as_str())
            })
            .map(|(name, value)| format!("{name}: {value:?}"))
            .collect();
        headers.sort();
        headers
    };
    assert_eq!(others(replay.metadata()), others(first.metadata()));
    assert_eq!(upstream.state.executions_of("acct"), 1);
    sidecar.running.stop().await;
}
