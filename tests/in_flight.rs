//! Calls whose first attempt is still running: duplicates wait for it (bounded), a client's
//! cancel does not stop it, and a lease that runs out leaves the key IN_DOUBT, never re-run.

mod support;

use std::time::Duration;
use support::{add, apply, client, ledger, reason, start_sidecar, was_replayed};

fn slow(account: &str, delay_ms: u32) -> idemproxy::pb::idemproxy::testing::v1::ApplyRequest {
    let mut request = add(account, 1);
    request.delay_ms = delay_ms;
    request
}

#[tokio::test]
async fn a_duplicate_waits_for_the_first_attempt_and_gets_its_answer() {
    let upstream = ledger::start().await;
    let sidecar = start_sidecar(upstream.addr, |_| {}).await;
    let mut first_client = client(sidecar.addr).await;
    let first =
        tokio::spawn(
            async move { apply(&mut first_client, slow("w", 300), Some("w"), None).await },
        );
    let state = upstream.state.clone();
    // The duplicate is sent while the first is surely in flight: the service has not acted.
    sidecar.wait_for_records(1).await;
    assert_eq!(state.executions(), 0);
    let mut second_client = client(sidecar.addr).await;
    let second = apply(&mut second_client, slow("w", 300), Some("w"), None)
        .await
        .expect("waits, then replay");
    let first = first.await.unwrap().expect("first answer");
    assert!(was_replayed(&second));
    assert_eq!(second.get_ref(), first.get_ref());
    assert_eq!(upstream.state.executions(), 1);
}

#[tokio::test]
async fn a_duplicate_that_waits_too_long_is_told_to_retry_later() {
    let upstream = ledger::start().await;
    let sidecar = start_sidecar(upstream.addr, |args| {
        args.max_in_flight_wait = Duration::from_millis(100)
    })
    .await;
    let mut first_client = client(sidecar.addr).await;
    let first = tokio::spawn(async move {
        apply(&mut first_client, slow("long", 1500), Some("long"), None).await
    });
    sidecar.wait_for_records(1).await;
    let mut other = client(sidecar.addr).await;
    let busy = apply(&mut other, slow("long", 1500), Some("long"), None)
        .await
        .expect_err("still running");
    assert_eq!(busy.code(), tonic::Code::Aborted);
    assert_eq!(reason(&busy), "IDEMPOTENCY_IN_PROGRESS");
    let pushback: u64 = busy
        .metadata()
        .get("grpc-retry-pushback-ms")
        .expect("pushback")
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(pushback > 0);
    let details = support::error_info(&busy).unwrap();
    assert_eq!(details.metadata["state"], "IN_FLIGHT");
    first.await.unwrap().expect("the first attempt completes");
    let after = apply(&mut other, slow("long", 1500), Some("long"), None)
        .await
        .expect("replay");
    assert!(was_replayed(&after));
    assert_eq!(upstream.state.executions(), 1);
}

#[tokio::test]
async fn a_duplicate_waits_no_longer_than_its_own_deadline() {
    let upstream = ledger::start().await;
    let sidecar = start_sidecar(upstream.addr, |_| {}).await;
    let mut first_client = client(sidecar.addr).await;
    let first =
        tokio::spawn(
            async move { apply(&mut first_client, slow("dl", 1000), Some("dl"), None).await },
        );
    sidecar.wait_for_records(1).await;
    let mut other = client(sidecar.addr).await;
    let mut request = tonic::Request::new(slow("dl", 1000));
    request
        .metadata_mut()
        .insert("idempotency-key", "dl".parse().unwrap());
    request.set_timeout(Duration::from_millis(300));
    let started = tokio::time::Instant::now();
    let refused = other
        .apply(request)
        .await
        .expect_err("the deadline passes first");
    assert!(
        started.elapsed() < Duration::from_millis(900),
        "did not wait for the first attempt"
    );
    // The sidecar answers just before the caller's deadline, so the caller hears why.
    assert_eq!(refused.code(), tonic::Code::Aborted);
    assert_eq!(reason(&refused), "IDEMPOTENCY_IN_PROGRESS");
    first.await.unwrap().expect("first completes");
    assert_eq!(upstream.state.executions(), 1);
}

#[tokio::test]
async fn a_cancelled_client_does_not_cancel_the_call_and_its_retry_gets_the_outcome() {
    let upstream = ledger::start().await;
    let sidecar = start_sidecar(upstream.addr, |_| {}).await;
    let mut impatient = client(sidecar.addr).await;
    let mut request = tonic::Request::new(slow("cancel", 400));
    request
        .metadata_mut()
        .insert("idempotency-key", "cancel".parse().unwrap());
    // The client gives up after 100 ms: tonic resets the stream.
    let gave_up = tokio::time::timeout(Duration::from_millis(100), impatient.apply(request)).await;
    assert!(gave_up.is_err(), "the client gave up before the answer");
    let state = upstream.state.clone();
    support::eventually(
        Duration::from_secs(5),
        "the service to finish the call",
        || {
            let state = state.clone();
            async move { state.executions() == 1 }
        },
    )
    .await;
    let retry = apply(&mut impatient, slow("cancel", 400), Some("cancel"), None)
        .await
        .expect("the outcome");
    assert!(was_replayed(&retry), "the retry gets the recorded outcome");
    assert_eq!(upstream.state.executions(), 1);
}

#[tokio::test]
async fn a_lease_that_runs_out_leaves_the_key_in_doubt() {
    let upstream = ledger::start().await;
    let sidecar = start_sidecar(upstream.addr, |args| {
        args.default_lease = Duration::from_millis(200);
        args.lease_margin = Duration::from_secs(0);
        args.max_in_flight_wait = Duration::from_millis(50);
    })
    .await;
    let mut first_client = client(sidecar.addr).await;
    // The service takes longer than the lease; the sidecar stops waiting at the lease.
    let first = apply(&mut first_client, slow("lease", 600), Some("lease"), None)
        .await
        .expect_err("no answer within the lease");
    assert_eq!(reason(&first), "IDEMPOTENCY_OUTCOME_UNKNOWN");
    let retry = apply(&mut first_client, slow("lease", 600), Some("lease"), None)
        .await
        .expect_err("never re-run");
    assert_eq!(retry.code(), tonic::Code::FailedPrecondition);
    assert_eq!(reason(&retry), "IDEMPOTENCY_OUTCOME_UNKNOWN");
    // At the lease the sidecar reset the upstream stream, so tonic dropped the handler
    // before it acted; a real service might have acted, which is why the key stays IN_DOUBT.
    assert!(upstream.state.executions() <= 1);
    let third = apply(&mut first_client, add("lease", 1), Some("lease"), None)
        .await
        .expect_err("still in doubt");
    assert_eq!(
        reason(&third),
        "IDEMPOTENCY_KEY_REUSED",
        "another payload is key reuse even in doubt"
    );
}
