//! Replay fidelity (design §3): a duplicate gets the recorded answer byte for byte — head,
//! every message frame, trailers, or the trailers-only form — plus `idempotency-replayed`.
//! Compared with a plain HTTP/2 client, not tonic, so nothing is normalised on the way.

mod support;

use idemproxy::pb::idemproxy::testing::v1::ApplyRequest;
use support::raw::{call, frame, RawResponse};
use support::{add, ledger, start_sidecar};

async fn first_and_replay(
    path: &str,
    request: &ApplyRequest,
    key: &str,
) -> (RawResponse, RawResponse, u64) {
    let upstream = ledger::start().await;
    let sidecar = start_sidecar(upstream.addr, |_| {}).await;
    let headers = [("idempotency-key", key), ("x-caller-id", "payments")];
    let first = call(sidecar.addr, path, &headers, frame(request)).await;
    let replay = call(sidecar.addr, path, &headers, frame(request)).await;
    (first, replay, upstream.state.executions())
}

fn assert_same_answer(first: &RawResponse, replay: &RawResponse) {
    assert_eq!(first.headers.get("idempotency-replayed"), None);
    assert_eq!(replay.headers["idempotency-replayed"], "true");
    assert_eq!(replay.status, first.status);
    assert_eq!(
        replay.headers_without_replay_marker(),
        first.headers_without_replay_marker()
    );
    assert_eq!(replay.body, first.body, "message frames byte for byte");
    assert_eq!(replay.trailers, first.trailers);
    assert_eq!(replay.is_trailers_only(), first.is_trailers_only());
}

#[tokio::test]
async fn an_ok_answer_replays_head_messages_and_trailers() {
    let request = ApplyRequest {
        reply_padding_bytes: 3000,
        ..add("ok", 7)
    };
    let (first, replay, executions) =
        first_and_replay("/idemproxy.testing.v1.Ledger/Apply", &request, "ok-1").await;
    assert_eq!(first.grpc_status(), Some(0));
    assert!(
        first.headers.contains_key("x-ledger-execution"),
        "custom response metadata"
    );
    assert!(first.body.len() > 3000);
    assert_same_answer(&first, &replay);
    assert_eq!(executions, 1);
}

#[tokio::test]
async fn a_trailers_only_error_with_details_replays_as_trailers_only() {
    let request = ApplyRequest {
        fail_code: tonic::Code::NotFound as u32,
        fail_message: "no such account: ünïcode".into(),
        with_details: true,
        ..add("missing", 1)
    };
    let (first, replay, executions) =
        first_and_replay("/idemproxy.testing.v1.Ledger/Apply", &request, "nf-1").await;
    assert!(
        first.is_trailers_only(),
        "tonic answers unary errors trailers-only"
    );
    assert_eq!(first.grpc_status(), Some(5));
    assert!(first.headers.contains_key("grpc-status-details-bin"));
    assert_eq!(first.headers["x-ledger-trailer"], "kept");
    assert_same_answer(&first, &replay);
    assert_eq!(executions, 1);
}

#[tokio::test]
async fn several_messages_then_an_error_in_trailers_replay_exactly() {
    let request = ApplyRequest {
        stream_messages: 3,
        fail_code: tonic::Code::FailedPrecondition as u32,
        fail_message: "stopped".into(),
        with_details: true,
        ..add("stream", 2)
    };
    let (first, replay, executions) =
        first_and_replay("/idemproxy.testing.v1.Ledger/Watch", &request, "st-1").await;
    assert!(!first.is_trailers_only());
    let trailers = first.trailers.as_ref().expect("trailers");
    assert_eq!(trailers["grpc-status"], "9");
    assert!(trailers.contains_key("grpc-status-details-bin"));
    assert_eq!(trailers["x-ledger-trailer"], "kept");
    assert_same_answer(&first, &replay);
    assert_eq!(executions, 1);
}
