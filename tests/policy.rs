//! Per-method policy from the example payments API's annotations, through the real sidecar
//! in front of a real tonic service that counts executions: field keys (nested), the key
//! header winning, ignored fields, canonical fingerprints, REJECT mode, require_key,
//! NO_SIDE_EFFECTS passthrough, gzip requests, and the same table from a descriptor set and
//! from .proto sources; with the test upstream's descriptors, a rule on a client stream and
//! the refusal of a keyed bidirectional call.

// Helpers of tests: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used)]

mod support;

use bytes::Bytes;
use idemproxy::pb::idemproxy::example::v1::payments_client::PaymentsClient;
use idemproxy::pb::idemproxy::example::v1::{
    BalanceRequest, ChargeReply, ChargeRequest, Payment, RefundRequest,
};
use prost::Message;
use std::net::SocketAddr;
use support::{payments, raw, reason, start_sidecar, start_sidecar_with, Sidecar};
use tonic::transport::Channel;

const CHARGE: &str = "/idemproxy.example.v1.Payments/Charge";

fn descriptor_set(dir: &std::path::Path) -> std::path::PathBuf {
    let path = dir.join("payments.binpb");
    std::fs::write(&path, idemproxy::pb::EXAMPLE_DESCRIPTOR_SET).unwrap();
    path
}

async fn sidecar_for(upstream: SocketAddr, files: &tempfile::TempDir) -> Sidecar {
    let set = descriptor_set(files.path());
    start_sidecar(upstream, |args| args.descriptor_set = vec![set]).await
}

async fn payments_client(addr: SocketAddr) -> PaymentsClient<Channel> {
    let channel = Channel::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    PaymentsClient::new(channel)
}

fn charge(serial: &str, amount_cents: i64, timestamp: &str) -> ChargeRequest {
    ChargeRequest {
        payment: Some(Payment {
            serial: serial.into(),
            card: "4242".into(),
        }),
        amount_cents,
        client_timestamp: timestamp.into(),
        trace_id: format!("trace-{timestamp}"),
        labels: [("shop".to_owned(), "berlin".to_owned())].into(),
    }
}

fn with_header<T>(message: T, key: &str) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    request
        .metadata_mut()
        .insert("idempotency-key", key.parse().unwrap());
    request
}

fn replayed<T>(response: &tonic::Response<T>) -> bool {
    support::was_replayed(response)
}

#[tokio::test]
async fn a_nested_key_field_deduplicates_calls_that_send_no_header() {
    let service = payments::start().await;
    let files = tempfile::tempdir().unwrap();
    let sidecar = sidecar_for(service.addr, &files).await;
    let mut client = payments_client(sidecar.addr).await;
    let first = client.charge(charge("pay-1", 500, "t1")).await.unwrap();
    let again = client.charge(charge("pay-1", 500, "t1")).await.unwrap();
    assert!(!replayed(&first));
    assert!(replayed(&again), "the field key made it a duplicate");
    assert_eq!(again.get_ref(), first.get_ref());
    client.charge(charge("pay-2", 500, "t1")).await.unwrap();
    assert_eq!(service.executions.charges(), 2);
}

#[tokio::test]
async fn the_key_header_wins_over_the_key_field() {
    let service = payments::start().await;
    let files = tempfile::tempdir().unwrap();
    let sidecar = sidecar_for(service.addr, &files).await;
    let mut client = payments_client(sidecar.addr).await;
    client
        .charge(with_header(charge("pay-1", 500, "t1"), "from-header"))
        .await
        .unwrap();
    // Same field serial, no header: another key, so it executes.
    let by_field = client.charge(charge("pay-1", 500, "t1")).await.unwrap();
    assert!(!replayed(&by_field));
    let by_header = client
        .charge(with_header(charge("pay-1", 500, "t1"), "from-header"))
        .await
        .unwrap();
    assert!(replayed(&by_header));
    assert_eq!(service.executions.charges(), 2);
}

#[tokio::test]
async fn ignored_fields_do_not_make_a_retry_look_like_key_reuse() {
    let service = payments::start().await;
    let files = tempfile::tempdir().unwrap();
    let sidecar = sidecar_for(service.addr, &files).await;
    let mut client = payments_client(sidecar.addr).await;
    let first = client
        .charge(charge("pay-1", 500, "10:00:00"))
        .await
        .unwrap();
    // A retry stamps a new client time and trace id: still the same request.
    let retry = client
        .charge(charge("pay-1", 500, "10:00:07"))
        .await
        .unwrap();
    assert!(replayed(&retry));
    assert_eq!(retry.get_ref(), first.get_ref());
    // Another amount under the same serial is key reuse.
    let reused = client
        .charge(charge("pay-1", 900, "10:00:09"))
        .await
        .expect_err("another payload");
    assert_eq!(reused.code(), tonic::Code::FailedPrecondition);
    assert_eq!(reason(&reused), "IDEMPOTENCY_KEY_REUSED");
    assert_eq!(service.executions.charges(), 1);
}

fn framed(message: &[u8], compressed: bool) -> Bytes {
    let mut out = vec![u8::from(compressed)];
    out.extend_from_slice(&(message.len() as u32).to_be_bytes());
    out.extend_from_slice(message);
    out.into()
}

#[tokio::test]
async fn fields_in_another_wire_order_are_the_same_request() {
    let service = payments::start().await;
    let files = tempfile::tempdir().unwrap();
    let sidecar = sidecar_for(service.addr, &files).await;
    let label = |k: &str| ChargeRequest {
        labels: [(k.to_owned(), "x".to_owned())].into(),
        ..ChargeRequest::default()
    };
    let payment = ChargeRequest {
        payment: charge("pay-9", 0, "").payment,
        ..ChargeRequest::default()
    };
    let amount = ChargeRequest {
        amount_cents: 700,
        ..ChargeRequest::default()
    };
    // Protobuf merges concatenated messages: the same request, two wire orders.
    let in_order = [&payment, &amount, &label("a"), &label("b")];
    let reordered = [&label("b"), &amount, &label("a"), &payment];
    let bytes = |parts: &[&ChargeRequest]| -> Vec<u8> {
        parts.iter().flat_map(|part| part.encode_to_vec()).collect()
    };
    let first = raw::call(sidecar.addr, CHARGE, &[], framed(&bytes(&in_order), false)).await;
    assert_eq!(first.grpc_status(), Some(0));
    let second = raw::call(sidecar.addr, CHARGE, &[], framed(&bytes(&reordered), false)).await;
    assert_eq!(second.grpc_status(), Some(0), "not refused as key reuse");
    assert!(second.headers.contains_key("idempotency-replayed"));
    assert_eq!(second.body, first.body);
    assert_eq!(service.executions.charges(), 1);
}

#[tokio::test]
async fn a_gzip_request_is_keyed_and_fingerprinted_on_its_message() {
    let service = payments::start().await;
    let files = tempfile::tempdir().unwrap();
    let sidecar = sidecar_for(service.addr, &files).await;
    let message = charge("pay-gz", 300, "t").encode_to_vec();
    let mut gzip = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    std::io::Write::write_all(&mut gzip, &message).unwrap();
    let compressed = gzip.finish().unwrap();
    let headers = [("grpc-encoding", "gzip")];
    let first = raw::call(sidecar.addr, CHARGE, &headers, framed(&compressed, true)).await;
    assert_eq!(first.grpc_status(), Some(0));
    let plain = raw::call(sidecar.addr, CHARGE, &[], framed(&message, false)).await;
    assert!(plain.headers.contains_key("idempotency-replayed"));
    assert_eq!(
        ChargeReply::decode(&plain.body[5..]).unwrap().charge_id,
        "ch-pay-gz-1"
    );
    assert_eq!(service.executions.charges(), 1);
}

#[tokio::test]
async fn reject_mode_refuses_a_duplicate_instead_of_replaying() {
    let service = payments::start().await;
    let files = tempfile::tempdir().unwrap();
    let sidecar = sidecar_for(service.addr, &files).await;
    let mut client = payments_client(sidecar.addr).await;
    let refund = || RefundRequest {
        refund_id: "rf-1".into(),
        charge_id: "ch-1".into(),
    };
    client
        .refund(refund())
        .await
        .expect("the first refund runs");
    let duplicate = client.refund(refund()).await.expect_err("refused");
    assert_eq!(duplicate.code(), tonic::Code::AlreadyExists);
    assert_eq!(reason(&duplicate), "IDEMPOTENCY_DUPLICATE");
    assert_eq!(service.executions.refunds(), 1);
}

#[tokio::test]
async fn a_call_without_the_required_key_is_refused_and_never_runs() {
    let service = payments::start().await;
    let files = tempfile::tempdir().unwrap();
    let sidecar = sidecar_for(service.addr, &files).await;
    let mut client = payments_client(sidecar.addr).await;
    let refused = client
        .charge(charge("", 500, "t"))
        .await
        .expect_err("no serial, no header");
    assert_eq!(refused.code(), tonic::Code::InvalidArgument);
    assert_eq!(reason(&refused), "IDEMPOTENCY_KEY_MISSING");
    assert_eq!(service.executions.charges(), 0);
}

#[tokio::test]
async fn a_no_side_effects_method_passes_through_even_with_a_key() {
    let service = payments::start().await;
    let files = tempfile::tempdir().unwrap();
    let sidecar = sidecar_for(service.addr, &files).await;
    let mut client = payments_client(sidecar.addr).await;
    for _ in 0..2 {
        let read = BalanceRequest {
            account: "a".into(),
        };
        let answer = client.get_balance(with_header(read, "k")).await.unwrap();
        assert!(!replayed(&answer));
    }
    assert_eq!(service.executions.balances(), 2);
}

#[test]
fn a_descriptor_set_and_proto_sources_give_the_same_policy() {
    use idemproxy::config::{self, RunSettings};
    let files = tempfile::tempdir().unwrap();
    let base = RunSettings {
        upstream: Some("http://127.0.0.1:1".into()),
        ..RunSettings::default()
    };
    let from_set = config::resolve(RunSettings {
        descriptor_set: vec![descriptor_set(files.path())],
        ..base.clone()
    })
    .unwrap();
    let proto_dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("proto");
    let from_sources = config::resolve(RunSettings {
        proto: vec![proto_dir.join("idemproxy/example/v1/payments.proto")],
        proto_path: vec![proto_dir],
        ..base
    })
    .unwrap();
    let table = |config| {
        idemproxy::server::load_policy(&config, None)
            .unwrap()
            .render()
    };
    let from_set = table(from_set);
    assert!(from_set.contains("header|payment.serial (required)"));
    assert_eq!(from_set, table(from_sources));
}

#[tokio::test]
async fn a_server_stream_is_recorded_and_replayed_in_order() {
    use idemproxy::pb::idemproxy::example::v1::PayoutRequest;
    use tokio_stream::StreamExt;
    let service = payments::start().await;
    let files = tempfile::tempdir().unwrap();
    let sidecar = sidecar_for(service.addr, &files).await;
    let mut client = payments_client(sidecar.addr).await;
    let request = || PayoutRequest {
        payout_id: "po-1".into(),
        amount_cents: 10_000,
        steps: 4,
    };
    let mut streams = Vec::new();
    for _ in 0..2 {
        let response = client.payout(request()).await.unwrap();
        let replay = replayed(&response);
        let events: Vec<_> = response
            .into_inner()
            .collect::<Result<_, _>>()
            .await
            .unwrap();
        streams.push((replay, events));
    }
    assert!(!streams[0].0 && streams[1].0, "the second call is a replay");
    let steps: Vec<u32> = streams[1].1.iter().map(|event| event.step).collect();
    assert_eq!(steps, [1, 2, 3, 4], "every message, in order");
    assert_eq!(streams[0].1, streams[1].1);
    assert_eq!(service.executions.payouts(), 1);
}

fn config_file(dir: &std::path::Path, text: &str) -> std::path::PathBuf {
    let path = dir.join("config.toml");
    std::fs::write(&path, text).unwrap();
    path
}

#[tokio::test]
async fn a_config_file_rule_lets_an_unknown_outcome_run_again() {
    use support::{add, apply, client, ledger};
    let upstream = ledger::start().await;
    let files = tempfile::tempdir().unwrap();
    let config = config_file(
        files.path(),
        "[methods.\"/idemproxy.testing.v1.Ledger/Apply\"]\nin-doubt = \"retry\"\n",
    );
    let sidecar = start_sidecar_with(
        upstream.addr,
        &["--config".as_ref(), config.as_ref()],
        |_| {},
    )
    .await;
    let mut client = client(sidecar.addr).await;
    let mut failing = add("retry-me", 1);
    failing.fail_code = 13; // INTERNAL after acting: the outcome is unknown.
    let first = apply(&mut client, failing.clone(), Some("k"), None).await;
    assert_eq!(first.expect_err("INTERNAL").code(), tonic::Code::Internal);
    // The method's rule says it is safe to re-run: the retry executes instead of being told
    // IDEMPOTENCY_OUTCOME_UNKNOWN.
    let second = apply(&mut client, failing, Some("k"), None).await;
    assert_eq!(
        second.expect_err("INTERNAL again").code(),
        tonic::Code::Internal
    );
    assert_eq!(upstream.state.executions(), 2);
}

#[tokio::test]
async fn without_the_rule_an_unknown_outcome_is_never_run_again() {
    use support::{add, apply, client, ledger};
    let upstream = ledger::start().await;
    let sidecar = start_sidecar(upstream.addr, |_| {}).await;
    let mut client = client(sidecar.addr).await;
    let mut failing = add("keep-me", 1);
    failing.fail_code = 13;
    let _ = apply(&mut client, failing.clone(), Some("k"), None).await;
    let second = apply(&mut client, failing, Some("k"), None)
        .await
        .expect_err("refused");
    assert_eq!(reason(&second), "IDEMPOTENCY_OUTCOME_UNKNOWN");
    assert_eq!(upstream.state.executions(), 1);
}

#[tokio::test]
async fn a_config_file_rule_overrides_an_annotation() {
    let service = payments::start().await;
    let files = tempfile::tempdir().unwrap();
    let set = descriptor_set(files.path());
    // Refund is annotated REJECT; the operator wants replays.
    let config = config_file(
        files.path(),
        "[methods.\"/idemproxy.example.v1.Payments/Refund\"]\nmode = \"replay\"\n",
    );
    let sidecar = start_sidecar_with(
        service.addr,
        &["--config".as_ref(), config.as_ref()],
        |args| {
            args.descriptor_set = vec![set];
        },
    )
    .await;
    let mut client = payments_client(sidecar.addr).await;
    let refund = || RefundRequest {
        refund_id: "rf-2".into(),
        charge_id: "ch-2".into(),
    };
    client.refund(refund()).await.unwrap();
    let again = client
        .refund(refund())
        .await
        .expect("replayed, not refused");
    assert!(replayed(&again));
    assert_eq!(service.executions.refunds(), 1);
}

#[test]
fn broken_policies_are_named_and_stop_the_start() {
    use idemproxy::config;
    let files = tempfile::tempdir().unwrap();
    std::fs::write(
        files.path().join("broken.proto"),
        r#"syntax = "proto3";
package broken.v1;
import "idemproxy/v1/annotations.proto";
service Broken {
  rpc Read(Req) returns (Req) {
    option idempotency_level = NO_SIDE_EFFECTS;
    option (idemproxy.v1.method) = { require_key: true };
  }
  rpc Upload(stream Req) returns (Req) { option (idemproxy.v1.method) = { mode: MODE_REJECT }; }
  rpc Talk(stream Req) returns (stream Req) { option (idemproxy.v1.method) = { mode: MODE_REJECT }; }
  rpc TwoKeys(Two) returns (Two) {
    option (idemproxy.v1.method) = { in_doubt_probe: { method: "TwoKeys" } };
  }
  rpc NotScalar(Wrapped) returns (Req);
}
message Req { string id = 1 [(idemproxy.v1.field).key = true]; }
message Two { string a = 1 [(idemproxy.v1.field).key = true]; string b = 2 [(idemproxy.v1.field).key = true]; }
message Wrapped { repeated string ids = 1 [(idemproxy.v1.field).key = true]; }
"#,
    )
    .unwrap();
    let config = config_file(
        files.path(),
        "[methods.\"/broken.v1.Broken/Missing\"]\nenabled = true\n",
    );
    let proto = files.path().join("broken.proto");
    let resolved = config::load([
        "--upstream".as_ref(),
        "http://127.0.0.1:1".as_ref(),
        "--config".as_ref(),
        config.as_os_str(),
        "--proto".as_ref(),
        proto.as_os_str(),
        "--proto-path".as_ref(),
        files.path().as_os_str(),
    ] as [&std::ffi::OsStr; 8])
    .unwrap();
    let error = idemproxy::server::load_policy(&resolved, None)
        .expect_err("the policy is broken")
        .to_string();
    for expected in [
        "/broken.v1.Broken/Read: has a policy but is NO_SIDE_EFFECTS",
        "/broken.v1.Broken/Talk: bidirectional methods cannot carry a policy",
        "/broken.v1.Broken/TwoKeys: in_doubt_probe on a method with a composite key",
        "/broken.v1.Broken/NotScalar: key field ids must be a single",
        "/broken.v1.Broken/Missing: the config file has a rule for a method the descriptors do not have",
    ] {
        assert!(error.contains(expected), "missing {expected:?} in:\n{error}");
    }
    // A client stream is read whole before it is forwarded: it may carry a policy.
    assert!(!error.contains("Upload"), "{error}");
}

/// Issue 33, item 3: a config-file rule on a client-streaming method (the test upstream's
/// Collect, from its descriptor set) is taken, and a keyed stream runs once.
#[tokio::test]
async fn a_config_file_rule_on_a_client_stream_is_kept() {
    use support::{add, client, ledger};
    let upstream = ledger::start().await;
    let files = tempfile::tempdir().unwrap();
    let set = files.path().join("ledger.binpb");
    std::fs::write(&set, idemproxy::pb::TESTING_DESCRIPTOR_SET).unwrap();
    let config = config_file(
        files.path(),
        "[methods.\"/idemproxy.testing.v1.Ledger/Collect\"]\nrequire-key = true\n",
    );
    let sidecar = start_sidecar_with(
        upstream.addr,
        &["--config".as_ref(), config.as_ref()],
        |args| args.descriptor_set = vec![set],
    )
    .await;
    let mut client = client(sidecar.addr).await;
    let upload = || tokio_stream::iter([add("upload", 1), add("upload", 2)]);
    let keyed = |key: &'static str| {
        let mut request = tonic::Request::new(upload());
        request
            .metadata_mut()
            .insert("idempotency-key", key.parse().unwrap());
        request
    };
    let missing = client.collect(upload()).await.unwrap_err();
    assert_eq!(reason(&missing), "IDEMPOTENCY_KEY_MISSING", "{missing:?}");
    let first = client.collect(keyed("u-1")).await.unwrap();
    let second = client.collect(keyed("u-1")).await.unwrap();
    assert_eq!(first.get_ref(), second.get_ref());
    assert!(!replayed(&first) && replayed(&second));
    assert_eq!(first.get_ref().balance, 3);
    assert_eq!(
        upstream.state.executions_of("upload"),
        2,
        "one stream, once"
    );
}

#[test]
fn bad_config_file_rules_are_named() {
    use idemproxy::config;
    let files = tempfile::tempdir().unwrap();
    for (rule, named) in [
        (
            "[methods.\"/a.B/C\"]\nmode = \"maybe\"\n",
            "methods.\"/a.B/C\".mode",
        ),
        (
            "[methods.\"/a.B/C\"]\nretention = \"0s\"\n",
            "methods.\"/a.B/C\".retention",
        ),
        ("[methods.\"a.B.C\"]\nenabled = true\n", "methods.\"a.B.C\""),
        ("[methods.\"/a.B/C\"]\nretension = \"1h\"\n", "retension"),
        ("[methods.\"/a.B/C\"]\nrecord-codes = [\"NOPE\"]\n", "NOPE"),
    ] {
        let path = config_file(files.path(), rule);
        let error = config::load([
            "--upstream".as_ref(),
            "http://127.0.0.1:1".as_ref(),
            "--config".as_ref(),
            path.as_os_str(),
        ] as [&std::ffi::OsStr; 4])
        .expect_err("refused")
        .to_string();
        assert!(error.contains(named), "{rule}: {error}");
    }
}

async fn reflected_table(version: payments::Reflection) {
    let service = payments::start_with(Some(version)).await;
    let files = tempfile::tempdir().unwrap();
    let sidecar = start_sidecar(service.addr, |args| args.reflection = true).await;
    // Field-keyed dedup works from what reflection taught the sidecar.
    let mut client = payments_client(sidecar.addr).await;
    client.charge(charge("pay-r", 100, "t1")).await.unwrap();
    let again = client.charge(charge("pay-r", 100, "t2")).await.unwrap();
    assert!(replayed(&again));
    assert_eq!(service.executions.charges(), 1);
    // And the table is the one the descriptor set gives.
    let resolve = |args: idemproxy::config::RunSettings| {
        idemproxy::config::resolve(idemproxy::config::RunSettings {
            upstream: Some(format!("http://{}", service.addr)),
            ..args
        })
        .unwrap()
    };
    let from_reflection = resolve(idemproxy::config::RunSettings {
        reflection: true,
        ..Default::default()
    });
    let from_set = resolve(idemproxy::config::RunSettings {
        descriptor_set: vec![descriptor_set(files.path())],
        ..Default::default()
    });
    let reflected = idemproxy::server::resolve_policy(&from_reflection)
        .await
        .unwrap();
    let from_set = idemproxy::server::resolve_policy(&from_set).await.unwrap();
    assert_eq!(reflected.render(), from_set.render());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reflection_v1_gives_the_same_policy_as_the_descriptor_set() {
    reflected_table(payments::Reflection::V1).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reflection_falls_back_to_v1alpha() {
    reflected_table(payments::Reflection::V1Alpha).await;
}

#[tokio::test]
async fn a_service_without_reflection_stops_the_start_with_a_clear_error() {
    let service = payments::start().await;
    let config = idemproxy::config::resolve(idemproxy::config::RunSettings {
        upstream: Some(format!("http://{}", service.addr)),
        reflection: true,
        reflection_timeout: std::time::Duration::from_secs(1),
        ..Default::default()
    })
    .unwrap();
    let error = idemproxy::server::resolve_policy(&config)
        .await
        .expect_err("no reflection")
        .to_string();
    assert!(error.contains("--reflection"), "{error}");
    assert!(
        error.contains("neither reflection v1 nor v1alpha"),
        "{error}"
    );
}

/// Sends INTERNAL (after acting) twice under one key through a sidecar with `rule` for
/// Ledger/Apply; returns the executions and whether the second answer was a replay.
async fn internal_twice(rule: &str) -> (u64, bool) {
    use support::{add, apply, client, ledger};
    let upstream = ledger::start().await;
    let files = tempfile::tempdir().unwrap();
    let text = format!("[methods.\"/idemproxy.testing.v1.Ledger/Apply\"]\n{rule}\n");
    let config = config_file(files.path(), &text);
    let sidecar = start_sidecar_with(
        upstream.addr,
        &["--config".as_ref(), config.as_ref()],
        |_| {},
    )
    .await;
    let mut client = client(sidecar.addr).await;
    let mut failing = add("codes", 1);
    failing.fail_code = 13;
    let first = apply(&mut client, failing.clone(), Some("k"), None).await;
    assert_eq!(first.unwrap_err().code(), tonic::Code::Internal);
    let second = apply(&mut client, failing, Some("k"), None)
        .await
        .unwrap_err();
    assert_eq!(second.code(), tonic::Code::Internal, "{second:?}");
    let replayed = second.metadata().get("idempotency-replayed").is_some();
    (upstream.state.executions(), replayed)
}

#[tokio::test]
async fn record_codes_make_a_status_replayed() {
    assert_eq!(
        internal_twice("record-codes = [\"INTERNAL\"]").await,
        (1, true)
    );
}

#[tokio::test]
async fn release_codes_make_a_status_run_again() {
    assert_eq!(
        internal_twice("release-codes = [\"INTERNAL\"]").await,
        (2, false)
    );
}

#[test]
fn a_service_annotation_sets_defaults_that_a_method_annotation_overrides() {
    use idemproxy::config::{self, RunSettings};
    let files = tempfile::tempdir().unwrap();
    std::fs::write(
        files.path().join("orders.proto"),
        r#"syntax = "proto3";
package orders.v1;
import "idemproxy/v1/annotations.proto";
service Orders {
  option (idemproxy.v1.service) = { defaults: { mode: MODE_REJECT retention: { seconds: 3600 } } };
  rpc Place(Req) returns (Req);
  rpc Amend(Req) returns (Req) { option (idemproxy.v1.method) = { mode: MODE_REPLAY }; }
}
message Req { string id = 1; }
"#,
    )
    .unwrap();
    let resolved = config::resolve(RunSettings {
        upstream: Some("http://127.0.0.1:1".into()),
        proto: vec![files.path().join("orders.proto")],
        proto_path: vec![files.path().to_owned()],
        ..RunSettings::default()
    })
    .unwrap();
    let table = idemproxy::server::load_policy(&resolved, None).unwrap();
    let place = table.get("/orders.v1.Orders/Place");
    assert!(place.call.rejects_duplicates());
    assert_eq!(place.call.retention, std::time::Duration::from_secs(3600));
    assert_eq!(place.origin, "service annotation");
    let amend = table.get("/orders.v1.Orders/Amend");
    assert!(!amend.call.rejects_duplicates(), "the method wins");
    assert_eq!(
        amend.call.retention,
        std::time::Duration::from_secs(3600),
        "the rest is the service's"
    );
}

/// Issue 33, item 2, with descriptors: a keyed call of a bidirectional method (the test
/// upstream's Chat, from its descriptor set) is refused at once, by its shape, while its
/// client still holds its input open; nothing is forwarded or claimed. Without a key it
/// streams through.
#[tokio::test]
async fn a_keyed_bidirectional_call_is_refused_at_once_by_its_descriptor() {
    use support::{add, client, ledger};
    use tokio_stream::StreamExt as _;
    let upstream = ledger::start().await;
    let files = tempfile::tempdir().unwrap();
    let set = files.path().join("ledger.binpb");
    std::fs::write(&set, idemproxy::pb::TESTING_DESCRIPTOR_SET).unwrap();
    let sidecar = start_sidecar(upstream.addr, |args| args.descriptor_set = vec![set]).await;
    let mut client = client(sidecar.addr).await;

    // One message, then the client waits for an answer before it sends more or ends.
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    tx.send(add("chat", 1)).await.unwrap();
    let mut keyed = tonic::Request::new(tokio_stream::wrappers::ReceiverStream::new(rx));
    keyed
        .metadata_mut()
        .insert("idempotency-key", "chat-1".parse().unwrap());
    let refused = client.chat(keyed).await.unwrap_err();
    assert_eq!(
        refused.code(),
        tonic::Code::FailedPrecondition,
        "{refused:?}"
    );
    assert_eq!(reason(&refused), "IDEMPOTENCY_CALL_SHAPE_UNSUPPORTED");
    // Refused by the method's shape, not after waiting for the input to end.
    assert!(
        refused.message().contains("bidirectional stream"),
        "{refused:?}"
    );
    drop(tx);
    assert_eq!(upstream.state.executions(), 0, "nothing forwarded");
    use idemproxy::store::Store as _;
    assert_eq!(sidecar.running.store.usage().records, 0, "nothing claimed");

    let (tx, rx) = tokio::sync::mpsc::channel(4);
    let open = tokio_stream::wrappers::ReceiverStream::new(rx);
    let mut inbound = client.chat(open).await.unwrap().into_inner();
    tx.send(add("chat", 2)).await.unwrap();
    let reply = inbound.next().await.unwrap().unwrap();
    assert_eq!(reply.balance, 2, "without a key it streams through");
}

/// Issue 41, item 3: a key made of two request fields (order id and step), on a .proto the
/// project has not seen before, written here and compiled at start: the same order with
/// another step is a new key, the same pair a replay; `check` shows the composite; a key
/// header still wins.
#[tokio::test]
async fn a_composite_key_of_order_and_step_keys_each_step_once() {
    use support::{client, ledger};
    let upstream = ledger::start().await;
    let files = tempfile::tempdir().unwrap();
    // Wire-compatible with the test upstream's ApplyRequest (1: account, 2: amount).
    let proto = files.path().join("orders.proto");
    std::fs::write(
        &proto,
        r#"syntax = "proto3";
package idemproxy.testing.v1;
import "idemproxy/v1/annotations.proto";
service Ledger { rpc Apply(Step) returns (Step); }
message Step {
  int64 step = 2 [(idemproxy.v1.field).key = true];
  string order_id = 1 [(idemproxy.v1.field).key = true];
}
"#,
    )
    .unwrap();
    let (proto_for_sidecar, dir) = (proto.clone(), files.path().to_owned());
    let sidecar = start_sidecar(upstream.addr, move |args| {
        args.proto = vec![proto_for_sidecar];
        args.proto_path = vec![dir];
    })
    .await;
    let check = std::process::Command::new(env!("CARGO_BIN_EXE_idemproxy"))
        .arg("check")
        .args(["--upstream", "http://127.0.0.1:1", "--proto"])
        .arg(&proto)
        .arg("--proto-path")
        .arg(files.path())
        .output()
        .unwrap();
    let table = String::from_utf8_lossy(&check.stdout);
    assert!(
        table.contains("header|order_id+step"),
        "the composite in field-number order:\n{table}"
    );
    let mut ledger = client(sidecar.addr).await;
    let step = |order: &str, step: i64| support::add(order, step);
    let first = support::apply(&mut ledger, step("order-7", 1), None, None)
        .await
        .unwrap();
    let second = support::apply(&mut ledger, step("order-7", 2), None, None)
        .await
        .unwrap();
    assert!(!replayed(&second), "another step of the order is a new key");
    let again = support::apply(&mut ledger, step("order-7", 1), None, None)
        .await
        .unwrap();
    assert!(replayed(&again), "the same pair is a replay");
    assert_eq!(again.get_ref(), first.get_ref());
    let other = support::apply(&mut ledger, step("order-8", 1), None, None)
        .await
        .unwrap();
    assert!(
        !replayed(&other),
        "another order with the same step is a new key"
    );
    // A key header wins over the fields: a new key, so it runs.
    let headed = support::apply(&mut ledger, step("order-7", 1), Some("explicit"), None)
        .await
        .unwrap();
    assert!(!replayed(&headed));
    assert_eq!(upstream.state.executions_of("order-7"), 3);
    assert_eq!(upstream.state.executions_of("order-8"), 1);
    sidecar.running.stop().await;
}

/// The parts of a composite key are length-prefixed: ("ab", "c") and ("a", "bc") are two
/// keys, and neither is the key of one field "abc".
#[test]
fn a_composite_keys_parts_cannot_run_together() {
    use idemproxy::policy::message;
    let files = tempfile::tempdir().unwrap();
    std::fs::write(
        files.path().join("pair.proto"),
        r#"syntax = "proto3";
package pair.v1;
import "idemproxy/v1/annotations.proto";
message Pair {
  string a = 1 [(idemproxy.v1.field).key = true];
  string b = 2 [(idemproxy.v1.field).key = true];
}
"#,
    )
    .unwrap();
    let resolved = idemproxy::config::load([
        "--upstream".as_ref(),
        "http://127.0.0.1:1".as_ref(),
        "--proto".as_ref(),
        files.path().join("pair.proto").as_os_str(),
        "--proto-path".as_ref(),
        files.path().as_os_str(),
    ] as [&std::ffi::OsStr; 6])
    .unwrap();
    let pool = idemproxy::policy::descriptors::load(&resolved.descriptors, None).unwrap();
    let pair = pool.get_message_by_name("pair.v1.Pair").unwrap();
    let (keys, _) = message::annotated_fields(&pool, &pair).unwrap();
    let serial = |a: &str, b: &str| {
        let mut message = prost_reflect::DynamicMessage::new(pair.clone());
        message.set_field_by_name("a", prost_reflect::Value::String(a.into()));
        message.set_field_by_name("b", prost_reflect::Value::String(b.into()));
        let bytes = prost::Message::encode_to_vec(&message);
        message::inspect(&pair, &bytes, &keys, &[])
            .unwrap()
            .serial
            .unwrap()
    };
    assert_eq!(&serial("ab", "c")[..], b"2:ab1:c");
    assert_ne!(serial("ab", "c"), serial("a", "bc"));
    assert_eq!(
        &serial("", "abc")[..],
        b"0:3:abc",
        "an unset part counts as empty"
    );
}
