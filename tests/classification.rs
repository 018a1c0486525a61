//! Every row of design §3's outcome classification, through the real sidecar: which answers
//! are replayed, which free the key for a retry, and which leave it IN_DOUBT.

mod support;

use idemproxy::pb::idemproxy::testing::v1::ApplyRequest;
use support::{add, apply, client, ledger, reason, start_sidecar, was_replayed};

fn failing(account: &str, code: tonic::Code) -> ApplyRequest {
    ApplyRequest {
        fail_code: code as u32,
        fail_message: format!("failing with {code:?}"),
        ..add(account, 1)
    }
}

#[tokio::test]
async fn deterministic_answers_are_recorded_and_replayed() {
    let upstream = ledger::start().await;
    let sidecar = start_sidecar(upstream.addr, |_| {}).await;
    let mut client = client(sidecar.addr).await;
    use tonic::Code::*;
    for code in [
        InvalidArgument,
        NotFound,
        AlreadyExists,
        FailedPrecondition,
        OutOfRange,
        Unimplemented,
    ] {
        let account = format!("{code:?}");
        let first = apply(&mut client, failing(&account, code), Some(&account), None)
            .await
            .expect_err("the service refuses");
        let again = apply(&mut client, failing(&account, code), Some(&account), None)
            .await
            .expect_err("the replay refuses the same way");
        assert_eq!(first.code(), code);
        assert_eq!(again.code(), code);
        assert_eq!(again.message(), first.message());
        assert_eq!(
            again
                .metadata()
                .get("idempotency-replayed")
                .map(|v| v.to_str().unwrap()),
            Some("true")
        );
        assert_eq!(
            upstream.state.executions_of(&account),
            1,
            "{code:?} is replayed, not re-run"
        );
    }
}

#[tokio::test]
async fn answers_that_prove_nothing_was_done_free_the_key() {
    let upstream = ledger::start().await;
    let sidecar = start_sidecar(upstream.addr, |_| {}).await;
    let mut client = client(sidecar.addr).await;
    use tonic::Code::*;
    for code in [
        Unauthenticated,
        PermissionDenied,
        ResourceExhausted,
        Aborted,
        Unavailable,
    ] {
        let account = format!("{code:?}");
        let refused = apply(&mut client, failing(&account, code), Some(&account), None)
            .await
            .expect_err("the service refuses");
        assert_eq!(refused.code(), code);
        assert_eq!(reason(&refused), "", "the service's own answer, not ours");
        // The retry executes (the key was released), this time successfully.
        let retried = apply(&mut client, add(&account, 1), Some(&account), None)
            .await
            .expect("the retry executes");
        assert!(!was_replayed(&retried));
        assert_eq!(
            upstream.state.executions_of(&account),
            2,
            "{code:?} releases the key"
        );
    }
}

#[tokio::test]
async fn answers_that_leave_the_outcome_unknown_are_in_doubt() {
    let upstream = ledger::start().await;
    let sidecar = start_sidecar(upstream.addr, |_| {}).await;
    let mut client = client(sidecar.addr).await;
    use tonic::Code::*;
    for code in [DeadlineExceeded, Cancelled, Unknown, Internal, DataLoss] {
        let account = format!("{code:?}");
        let first = apply(&mut client, failing(&account, code), Some(&account), None)
            .await
            .expect_err("the service fails");
        assert_eq!(
            first.code(),
            code,
            "the caller sees the service's own answer"
        );
        let retry = apply(&mut client, failing(&account, code), Some(&account), None)
            .await
            .expect_err("the retry is refused");
        assert_eq!(retry.code(), FailedPrecondition);
        assert_eq!(reason(&retry), "IDEMPOTENCY_OUTCOME_UNKNOWN");
        assert_eq!(
            support::error_info(&retry).unwrap().metadata["state"],
            "IN_DOUBT"
        );
        assert_eq!(
            upstream.state.executions_of(&account),
            1,
            "{code:?} is never re-run"
        );
    }
}

#[tokio::test]
async fn unavailable_after_response_headers_is_in_doubt() {
    let upstream = ledger::start().await;
    let sidecar = start_sidecar(upstream.addr, |_| {}).await;
    // A keyed call is deduplicated as unary whatever its method: Watch answers one message,
    // then UNAVAILABLE in the trailers — after the service acted.
    let request = ApplyRequest {
        stream_messages: 1,
        ..failing("late-unavailable", tonic::Code::Unavailable)
    };
    let path = "/idemproxy.testing.v1.Ledger/Watch";
    let key = [("idempotency-key", "late-unavailable")];
    let first = support::raw::call(sidecar.addr, path, &key, support::raw::frame(&request)).await;
    assert_eq!(first.grpc_status(), Some(14));
    assert!(!first.is_trailers_only());
    let retry = support::raw::call(sidecar.addr, path, &key, support::raw::frame(&request)).await;
    assert_eq!(
        retry.grpc_status(),
        Some(9),
        "FAILED_PRECONDITION: outcome unknown"
    );
    assert_eq!(upstream.state.executions_of("late-unavailable"), 1);
}

#[tokio::test]
async fn a_stream_reset_after_the_service_acted_is_in_doubt() {
    let upstream = ledger::start().await;
    let sidecar = start_sidecar(upstream.addr, |_| {}).await;
    let mut client = client(sidecar.addr).await;
    let mut request = add("reset", 1);
    request.fail_code = ledger::RESET_AFTER_ACTING;
    let first = apply(&mut client, request.clone(), Some("reset"), None)
        .await
        .expect_err("the call broke off");
    assert_eq!(reason(&first), "IDEMPOTENCY_OUTCOME_UNKNOWN");
    let retry = apply(&mut client, request, Some("reset"), None)
        .await
        .expect_err("refused");
    assert_eq!(retry.code(), tonic::Code::FailedPrecondition);
    assert_eq!(reason(&retry), "IDEMPOTENCY_OUTCOME_UNKNOWN");
    assert_eq!(upstream.state.executions_of("reset"), 1);
}

#[tokio::test]
async fn an_unreachable_service_releases_the_key() {
    // Reserve a port with nothing listening on it yet.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    drop(listener);
    let sidecar = start_sidecar(addr, |_| {}).await;
    let mut client = client(sidecar.addr).await;
    let down = apply(&mut client, add("down", 1), Some("down"), None)
        .await
        .expect_err("nobody answers");
    assert_eq!(down.code(), tonic::Code::Unavailable);
    assert_eq!(reason(&down), "IDEMPOTENCY_UPSTREAM_UNAVAILABLE");
    let passthrough = apply(&mut client, add("down", 1), None, None)
        .await
        .expect_err("down");
    assert_eq!(passthrough.code(), tonic::Code::Unavailable);

    // The service comes up; the same key now executes, once.
    let upstream = ledger::start_on(tokio::net::TcpListener::bind(addr).await.unwrap()).await;
    let up = apply(&mut client, add("down", 1), Some("down"), None)
        .await
        .expect("executes");
    assert!(!was_replayed(&up));
    let again = apply(&mut client, add("down", 1), Some("down"), None)
        .await
        .expect("replayed");
    assert!(was_replayed(&again));
    assert_eq!(upstream.state.executions_of("down"), 1);
}
