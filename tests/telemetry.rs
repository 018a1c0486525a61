//! OpenTelemetry through the real binary: an in-process OTLP collector (the trace and metrics
//! collector services over tonic) receives what the sidecar exports for a miss, a hit, a
//! mismatch and a bypass; the hit's span links to the miss's; the service sees the trace
//! context; `/metrics` counts every decision; a dead collector neither fails nor holds up
//! calls.

// Helpers of tests: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used)]

mod support;

use idemproxy::pb::idemproxy::testing::v1::ApplyRequest;
use opentelemetry_proto::tonic::collector::metrics::v1::metrics_service_server::{
    MetricsService, MetricsServiceServer,
};
use opentelemetry_proto::tonic::collector::metrics::v1::{
    ExportMetricsServiceRequest, ExportMetricsServiceResponse,
};
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::any_value::Value as AnyValue;
use opentelemetry_proto::tonic::trace::v1::Span;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use support::http::{free_addr, get};
use support::{add, binary, client, eventually, ledger, reason};

const SPAN_KIND_SERVER: i32 = 2;
const SPAN_KIND_CLIENT: i32 = 3;
const APPLY: &str = "idemproxy.testing.v1.Ledger/Apply";

/// What the collector received.
#[derive(Default, Clone)]
struct Received {
    spans: Arc<Mutex<Vec<Span>>>,
    metric_names: Arc<Mutex<Vec<String>>>,
}

#[tonic::async_trait]
impl TraceService for Received {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let mut spans = self.spans.lock().unwrap();
        for resource in request.into_inner().resource_spans {
            for scope in resource.scope_spans {
                spans.extend(scope.spans);
            }
        }
        Ok(tonic::Response::new(ExportTraceServiceResponse::default()))
    }
}

#[tonic::async_trait]
impl MetricsService for Received {
    async fn export(
        &self,
        request: tonic::Request<ExportMetricsServiceRequest>,
    ) -> Result<tonic::Response<ExportMetricsServiceResponse>, tonic::Status> {
        let mut names = self.metric_names.lock().unwrap();
        for resource in request.into_inner().resource_metrics {
            for scope in resource.scope_metrics {
                names.extend(scope.metrics.into_iter().map(|metric| metric.name));
            }
        }
        Ok(tonic::Response::new(ExportMetricsServiceResponse::default()))
    }
}

async fn start_collector() -> (SocketAddr, Received, tokio::task::JoinHandle<()>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let received = Received::default();
    let service = received.clone();
    let task = tokio::spawn(async move {
        let _ = tonic::transport::Server::builder()
            .add_service(TraceServiceServer::new(service.clone()))
            .add_service(MetricsServiceServer::new(service))
            .serve_with_incoming(tonic::transport::server::TcpIncoming::from(listener))
            .await;
    });
    (addr, received, task)
}

fn attribute(span: &Span, key: &str) -> Option<String> {
    let value = span.attributes.iter().find(|kv| kv.key == key)?;
    match value.value.as_ref()?.value.as_ref()? {
        AnyValue::StringValue(text) => Some(text.clone()),
        AnyValue::IntValue(n) => Some(n.to_string()),
        AnyValue::BoolValue(b) => Some(b.to_string()),
        other => Some(format!("{other:?}")),
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

async fn sidecar(
    upstream: SocketAddr,
    dir: &std::path::Path,
    ops: SocketAddr,
    admin: SocketAddr,
    collector: SocketAddr,
) -> binary::BinarySidecar {
    let ops = ops.to_string();
    let admin = admin.to_string();
    let args = binary::run_args(
        upstream,
        dir,
        &["--ops-listen", &ops, "--admin-listen", &admin],
    );
    let env = [
        ("OTEL_EXPORTER_OTLP_ENDPOINT", format!("http://{collector}")),
        ("OTEL_EXPORTER_OTLP_TIMEOUT", "1000".to_owned()),
        ("OTEL_BSP_SCHEDULE_DELAY", "50".to_owned()),
        ("OTEL_METRIC_EXPORT_INTERVAL", "200".to_owned()),
        ("OTEL_SERVICE_NAME", "ledger-sidecar".to_owned()),
    ];
    binary::start_with_env(&args, &env).await
}

/// One Apply with an optional key and `traceparent`.
async fn apply_traced(
    client: &mut idemproxy::pb::idemproxy::testing::v1::ledger_client::LedgerClient<
        tonic::transport::Channel,
    >,
    request: ApplyRequest,
    key: Option<&str>,
    traceparent: Option<&str>,
) -> Result<tonic::Response<idemproxy::pb::idemproxy::testing::v1::ApplyReply>, tonic::Status> {
    let mut request = tonic::Request::new(request);
    request.set_timeout(Duration::from_secs(5));
    if let Some(key) = key {
        request
            .metadata_mut()
            .insert("idempotency-key", key.parse().unwrap());
    }
    if let Some(traceparent) = traceparent {
        request
            .metadata_mut()
            .insert("traceparent", traceparent.parse().unwrap());
    }
    client.apply(request).await
}

fn server_span<'a>(spans: &'a [Span], decision: &str) -> &'a Span {
    spans
        .iter()
        .find(|s| {
            s.kind == SPAN_KIND_SERVER
                && attribute(s, "idemproxy.decision").as_deref() == Some(decision)
        })
        .unwrap_or_else(|| panic!("no SERVER span with decision {decision}"))
}

/// The value of the `idemproxy_requests_total` series with this decision, 0 when absent.
fn requests_with(metrics: &str, decision: &str) -> u64 {
    metrics
        .lines()
        .filter(|line| line.starts_with("idemproxy_requests_total{"))
        .filter(|line| line.contains(&format!("idemproxy_decision=\"{decision}\"")))
        .filter_map(|line| line.rsplit(' ').next()?.parse::<u64>().ok())
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_decision_is_exported_and_a_replay_links_to_its_original_execution() {
    let ledger = ledger::start().await;
    let (collector, received, _collector_task) = start_collector().await;
    let dir = tempfile::tempdir().unwrap();
    let (ops, admin) = (free_addr(), free_addr());
    let sidecar = sidecar(ledger.addr, dir.path(), ops, admin, collector).await;
    let mut client = client(sidecar.addr).await;

    let caller_trace = "4bf92f3577b34da6a3ce929d0e0e4736";
    let traceparent = format!("00-{caller_trace}-00f067aa0ba902b7-01");
    let miss = apply_traced(&mut client, add("acct", 5), Some("k-1"), Some(&traceparent)).await;
    miss.unwrap();
    let hit = apply_traced(&mut client, add("acct", 5), Some("k-1"), None).await;
    assert!(support::was_replayed(&hit.unwrap()));
    let mismatch = apply_traced(&mut client, add("acct", 6), Some("k-1"), None).await;
    assert_eq!(reason(&mismatch.unwrap_err()), "IDEMPOTENCY_KEY_REUSED");
    apply_traced(&mut client, add("other", 1), None, None)
        .await
        .unwrap();
    assert_eq!(ledger.state.executions(), 2, "no key executed twice");

    eventually(Duration::from_secs(20), "four SERVER spans", || {
        let spans = received.spans.clone();
        async move {
            spans
                .lock()
                .unwrap()
                .iter()
                .filter(|s| s.kind == SPAN_KIND_SERVER)
                .count()
                >= 4
        }
    })
    .await;
    let spans = received.spans.lock().unwrap().clone();
    let miss = server_span(&spans, "miss");
    let hit = server_span(&spans, "hit");
    let mismatch = server_span(&spans, "mismatch");
    let bypass = server_span(&spans, "bypass");
    for span in [miss, hit, mismatch, bypass] {
        assert_eq!(span.name, APPLY);
        assert_eq!(attribute(span, "rpc.system").as_deref(), Some("grpc"));
        assert_eq!(
            attribute(span, "rpc.service").as_deref(),
            Some("idemproxy.testing.v1.Ledger")
        );
        assert_eq!(attribute(span, "rpc.method").as_deref(), Some("Apply"));
        assert_eq!(
            attribute(span, "idemproxy.store.backend").as_deref(),
            Some("sled")
        );
        let address = |name| attribute(span, name);
        assert_eq!(address("server.address").as_deref(), Some("127.0.0.1"));
        assert_eq!(address("client.address").as_deref(), Some("127.0.0.1"));
    }
    // The caller's trace continues through the sidecar.
    assert_eq!(hex(&miss.trace_id), caller_trace);
    assert_eq!(hex(&miss.parent_span_id), "00f067aa0ba902b7");
    // The key's hash, never the serial.
    let key_hash = attribute(miss, "idemproxy.key.hash").expect("the miss names its key hash");
    assert_eq!(key_hash.len(), 64);
    assert!(!key_hash.contains("k-1"));
    assert_eq!(attribute(hit, "idemproxy.key.hash"), Some(key_hash));
    assert!(attribute(bypass, "idemproxy.key.hash").is_none());
    // A FAILED_PRECONDITION is the caller's problem: not a span error.
    assert_eq!(
        attribute(mismatch, "rpc.grpc.status_code").as_deref(),
        Some("9")
    );
    assert_ne!(
        mismatch.status.as_ref().map(|s| s.code),
        Some(2),
        "not an error span"
    );
    // The replay links to the execution that produced its answer.
    let link = hit
        .links
        .first()
        .expect("the hit links to the original execution");
    assert_eq!(hex(&link.trace_id), caller_trace);
    assert_eq!(link.span_id, miss.span_id);
    // The call to the service is a CLIENT child of the miss, and the service saw its context.
    let upstream = spans
        .iter()
        .find(|s| s.kind == SPAN_KIND_CLIENT && s.trace_id == miss.trace_id)
        .expect("a CLIENT span for the forwarded call");
    assert_eq!(upstream.parent_span_id, miss.span_id);
    let seen = ledger.state.traceparents();
    assert_eq!(
        seen.len(),
        2,
        "both executions carried a traceparent: {seen:?}"
    );
    assert_eq!(
        seen[0],
        format!("00-{caller_trace}-{}-01", hex(&upstream.span_id))
    );
    assert!(spans.iter().any(|s| s.name == "idemproxy.store.claim"));

    // An operator finds the trace of the attempt that claimed the key.
    let output = std::process::Command::new(binary::path())
        .args(["keys", "--admin", &admin.to_string(), "get"])
        .args([
            "--method",
            "/idemproxy.testing.v1.Ledger/Apply",
            "--serial",
            "k-1",
            "--json",
        ])
        .output()
        .unwrap();
    let record: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(record["trace_id"], caller_trace, "{record}");

    let (status, metrics) = get(ops, "/metrics").await;
    assert_eq!(status, 200);
    for decision in ["miss", "hit", "mismatch", "bypass"] {
        assert_eq!(
            requests_with(&metrics, decision),
            1,
            "{decision} in:\n{metrics}"
        );
    }
    assert!(
        metrics.contains("rpc_server_call_duration_seconds_bucket{"),
        "{metrics}"
    );
    assert!(
        metrics.contains("idemproxy_store_operation_duration_seconds_count{"),
        "{metrics}"
    );
    assert!(
        metrics.contains("idemproxy_records_stored_total 1"),
        "{metrics}"
    );
    assert!(!metrics.contains("k-1"), "no serial in the metrics");
    eventually(Duration::from_secs(20), "metrics over OTLP", || {
        let names = received.metric_names.clone();
        async move {
            let names = names.lock().unwrap();
            names.iter().any(|n| n == "idemproxy.requests")
                && names.iter().any(|n| n == "rpc.server.call.duration")
        }
    })
    .await;
    sidecar.kill().await;
}

/// An in-doubt probe (issue 34) has a span of its own, linked to the span of the call whose
/// outcome it asks about; the lookup sent to the service is its CLIENT child.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_probe_span_links_to_the_call_whose_outcome_it_asks_about() {
    use idemproxy::pb::idemproxy::example::v1::payments_client::PaymentsClient;
    let service = support::payments::start().await;
    let (collector, received, _collector_task) = start_collector().await;
    let dir = tempfile::tempdir().unwrap();
    let set = dir.path().join("payments.binpb");
    std::fs::write(&set, idemproxy::pb::EXAMPLE_DESCRIPTOR_SET).unwrap();
    let extra = [
        "--descriptor-set",
        set.to_str().unwrap(),
        "--default-lease",
        "200ms",
        "--lease-margin",
        "50ms",
    ];
    let args = binary::run_args(service.addr, &dir.path().join("data"), &extra);
    let env = [
        ("OTEL_EXPORTER_OTLP_ENDPOINT", format!("http://{collector}")),
        ("OTEL_BSP_SCHEDULE_DELAY", "50".to_owned()),
        ("OTEL_SERVICE_NAME", "payments-sidecar".to_owned()),
    ];
    let sidecar = binary::start_with_env(&args, &env).await;
    let mut client = PaymentsClient::connect(format!("http://{}", sidecar.addr))
        .await
        .unwrap();
    let charge = |behaviour: &str, traceparent: Option<&str>| {
        let mut request = support::payments::charge("pay-t1", "alice", behaviour);
        if let Some(traceparent) = traceparent {
            let value = traceparent.parse().unwrap();
            request.metadata_mut().insert("traceparent", value);
        }
        request
    };
    let caller_trace = "5bf92f3577b34da6a3ce929d0e0e4737";
    let traceparent = format!("00-{caller_trace}-00f067aa0ba902b8-01");
    let broken = client
        .charge(charge("fail-after-charge", Some(&traceparent)))
        .await;
    assert_eq!(broken.unwrap_err().code(), tonic::Code::Internal);
    tokio::time::sleep(Duration::from_millis(600)).await;
    let retry = client.charge(charge("ok", None)).await.unwrap();
    assert_eq!(
        retry.metadata().get("idempotency-resolved-by").unwrap(),
        "probe"
    );
    eventually(Duration::from_secs(20), "the probe's span", || {
        let spans = received.spans.clone();
        async move {
            let spans = spans.lock().unwrap();
            spans.iter().any(|s| s.name == "idemproxy.probe")
                && spans.iter().any(|s| s.name.ends_with("Payments/GetCharge"))
        }
    })
    .await;
    let spans = received.spans.lock().unwrap().clone();
    let original = spans
        .iter()
        .find(|s| s.kind == SPAN_KIND_SERVER && hex(&s.trace_id) == caller_trace)
        .expect("the original call's SERVER span");
    let probe = spans.iter().find(|s| s.name == "idemproxy.probe").unwrap();
    let link = probe
        .links
        .first()
        .expect("the probe links to the original");
    assert_eq!(hex(&link.trace_id), caller_trace);
    assert_eq!(link.span_id, original.span_id);
    assert_eq!(
        attribute(probe, "idemproxy.probe.answer").as_deref(),
        Some("found")
    );
    assert_eq!(
        attribute(probe, "idemproxy.probe.of").as_deref(),
        Some("/idemproxy.example.v1.Payments/Charge")
    );
    let lookup = spans
        .iter()
        .find(|s| s.kind == SPAN_KIND_CLIENT && s.name.ends_with("Payments/GetCharge"))
        .unwrap();
    assert_eq!(
        lookup.parent_span_id, probe.span_id,
        "the lookup is its child"
    );
    assert_eq!(service.executions.charges(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_collector_neither_fails_nor_holds_up_calls() {
    let ledger = ledger::start().await;
    let dir = tempfile::tempdir().unwrap();
    let ops = free_addr();
    let sidecar = sidecar(ledger.addr, dir.path(), ops, free_addr(), free_addr()).await;
    let mut client = client(sidecar.addr).await;
    for n in 0..40 {
        let key = format!("dead-{n}");
        let answer = apply_traced(&mut client, add(&key, 1), Some(&key), None).await;
        answer.unwrap_or_else(|status| panic!("call {n} failed: {status}"));
    }
    assert_eq!(ledger.state.executions(), 40);
    let (_, metrics) = get(ops, "/metrics").await;
    assert_eq!(requests_with(&metrics, "miss"), 40);
    // The exit flushes spans to nobody: bounded by the exporter's timeout, still exit 0.
    sidecar.terminate();
    let code = tokio::time::timeout(Duration::from_secs(30), sidecar.wait()).await;
    assert_eq!(code.expect("exits within 30 s"), Some(0));
}

/// OTLP over HTTP with protobuf bodies (`OTEL_EXPORTER_OTLP_PROTOCOL=http/protobuf`, the
/// specification's default for SDKs), received by a receiver that is not ours: Python's
/// http.server decoding with the OpenTelemetry project's own protobuf bindings
/// (`tests/peers/otlp_http_receiver.py`; `scripts/test` installs opentelemetry-proto).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spans_and_metrics_reach_an_otlp_http_receiver() {
    use tokio::io::AsyncBufReadExt;
    let mut receiver = tokio::process::Command::new("python3")
        .arg(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/peers/otlp_http_receiver.py"
        ))
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("python3 runs (scripts/test installs it)");
    let mut lines = tokio::io::BufReader::new(receiver.stdout.take().expect("piped")).lines();
    let first = lines
        .next_line()
        .await
        .unwrap()
        .expect("the receiver starts (scripts/test installs opentelemetry-proto for python3)");
    let port = serde_json::from_str::<serde_json::Value>(&first).unwrap()["listening"]
        .as_u64()
        .expect("the receiver's port");
    let exports = Arc::new(Mutex::new(Vec::<serde_json::Value>::new()));
    let collected = exports.clone();
    tokio::spawn(async move {
        while let Ok(Some(line)) = lines.next_line().await {
            let export = serde_json::from_str(&line).expect("the receiver prints JSON");
            collected.lock().unwrap().push(export);
        }
    });

    let ledger = ledger::start().await;
    let dir = tempfile::tempdir().unwrap();
    let args = binary::run_args(ledger.addr, dir.path(), &[]);
    let env = [
        (
            "OTEL_EXPORTER_OTLP_ENDPOINT",
            format!("http://127.0.0.1:{port}"),
        ),
        ("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf".to_owned()),
        ("OTEL_EXPORTER_OTLP_TIMEOUT", "1000".to_owned()),
        ("OTEL_BSP_SCHEDULE_DELAY", "50".to_owned()),
        ("OTEL_METRIC_EXPORT_INTERVAL", "200".to_owned()),
    ];
    let sidecar = binary::start_with_env(&args, &env).await;
    let mut client = client(sidecar.addr).await;
    for _ in 0..2 {
        let answer = apply_traced(&mut client, add("http-1", 1), Some("http-1"), None).await;
        answer.expect("the call and its replay are answered");
    }
    let names = |field: &str| -> Vec<String> {
        let exports = exports.lock().unwrap();
        exports
            .iter()
            .filter_map(|export| export[field].as_array())
            .flatten()
            .filter_map(|name| name.as_str().map(str::to_owned))
            .collect()
    };
    eventually(Duration::from_secs(20), "spans and metrics over OTLP/HTTP", || {
        let (spans, metrics) = (names("spans"), names("metrics"));
        async move {
            !spans.is_empty() && metrics.iter().any(|name| name == "idemproxy.requests")
        }
    })
    .await;
    let exports = exports.lock().unwrap().clone();
    for export in &exports {
        assert!(
            export.get("error").is_none(),
            "undecodable export: {export}"
        );
        assert_eq!(
            export["content_type"], "application/x-protobuf",
            "OTLP/HTTP's protobuf content type: {export}"
        );
    }
    let paths: std::collections::BTreeSet<_> =
        exports.iter().filter_map(|e| e["path"].as_str()).collect();
    assert_eq!(
        paths,
        ["/v1/metrics", "/v1/traces"].into(),
        "the signals' paths under the endpoint"
    );
    sidecar.terminate();
    assert_eq!(sidecar.wait().await, Some(0));
    receiver.kill().await.unwrap();
}

// Multi-threaded: dropping the exporters blocks this thread on a last export that the
// runtime's other thread carries.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn otlp_settings_are_read_from_the_standard_variables() {
    use idemproxy::telemetry::Telemetry;
    // A live collector, so that dropping the exporters (a last export each) is quick.
    let (collector, _received, _task) = start_collector().await;
    let endpoint = format!("http://{collector}");
    let env_of = |pairs: Vec<(&'static str, String)>| {
        move |name: &str| {
            let found = pairs.iter().find(|(key, _)| *key == name);
            found.map(|(_, value)| value.clone())
        }
    };
    let none = Telemetry::from_env(&env_of(vec![]), "sled").unwrap();
    assert!(!none.traces_enabled(), "no endpoint, no exporter");
    let on = env_of(vec![("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint.clone())]);
    assert!(Telemetry::from_env(&on, "sled").unwrap().traces_enabled());
    let traces_off = env_of(vec![
        ("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint.clone()),
        ("OTEL_TRACES_EXPORTER", "none".into()),
    ]);
    assert!(!Telemetry::from_env(&traces_off, "sled")
        .unwrap()
        .traces_enabled());
    let http = env_of(vec![
        ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", endpoint.clone()),
        ("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf".into()),
    ]);
    assert!(Telemetry::from_env(&http, "sled").unwrap().traces_enabled());
    let json = env_of(vec![
        ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", endpoint),
        ("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "http/json".into()),
    ]);
    let error = Telemetry::from_env(&json, "sled").err().expect("refused");
    let message = error.to_string();
    assert!(
        message.contains("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL=http/json"),
        "{message}"
    );
}
