//! Against gRPC implementations other than tonic, on both sides of the sidecar: grpcio (gRPC's
//! C core, through Python) and grpc-js (Node.js's http2, which is nghttp2). A client gets one
//! execution per key, the recorded answer (message, status, details, trailers) on a duplicate,
//! the replay marker, idemproxy's own refusals it can decode, and every call shape streamed;
//! a server behind the sidecar executes a key once. The peers are `tests/peers/grpcio.py` and
//! `tests/peers/grpc-js.js`, with one command line; `scripts/test` installs both libraries.

#![allow(clippy::unwrap_used)] // Test helpers: a failed unwrap is a failed test.

mod support;

use idemproxy::key::hex;
use idemproxy::pb::idemproxy::testing::v1::{ApplyReply, ApplyRequest};
use prost::Message;
use serde_json::{json, Value};
use std::net::SocketAddr;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use support::{add, apply, client, ledger, start_sidecar, was_replayed};
use tokio::io::AsyncBufReadExt;

const APPLY: &str = "/idemproxy.testing.v1.Ledger/Apply";
const WATCH: &str = "/idemproxy.testing.v1.Ledger/Watch";
const COLLECT: &str = "/idemproxy.testing.v1.Ledger/Collect";

/// A gRPC implementation the tests run as client and as server.
#[derive(Clone, Copy, Debug)]
enum Peer {
    Grpcio,
    GrpcJs,
}

impl Peer {
    const ALL: [Peer; 2] = [Peer::Grpcio, Peer::GrpcJs];

    fn script(self) -> std::path::PathBuf {
        let name = match self {
            Peer::Grpcio => "grpcio.py",
            Peer::GrpcJs => "grpc-js.js",
        };
        std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/peers")
            .join(name)
    }

    fn command(self) -> tokio::process::Command {
        let program = match self {
            Peer::Grpcio => "python3",
            Peer::GrpcJs => "node",
        };
        let mut command = tokio::process::Command::new(program);
        command.arg(self.script()).kill_on_drop(true);
        command
    }

    /// Whether its library is installed; in CI it must be (`scripts/test` installs it).
    fn present(self) -> bool {
        let present = match self {
            Peer::Grpcio => std::process::Command::new("python3")
                .args(["-c", "import grpc"])
                .status()
                .is_ok_and(|status| status.success()),
            Peer::GrpcJs => {
                let library = self.script().with_file_name("node_modules/@grpc/grpc-js");
                library.exists()
                    && std::process::Command::new("node")
                        .arg("--version")
                        .output()
                        .is_ok_and(|output| output.status.success())
            }
        };
        if std::env::var_os("CI").is_some() {
            assert!(present, "{self:?} is missing: scripts/test installs it");
        }
        if !present {
            eprintln!("{self:?} is not installed: scripts/test installs it; skipped");
        }
        present
    }
}

/// One call for a peer's client.
fn call(request: &ApplyRequest, metadata: &[(&str, &str)]) -> Value {
    json!({
        "method": APPLY,
        "request_hex": hex(&request.encode_to_vec()),
        "metadata": metadata,
    })
}

fn unhex(text: &str) -> Vec<u8> {
    idemproxy::key::unhex(text).expect("the peer prints hex")
}

/// Runs `peer`'s client against `target`; one JSON answer per call.
async fn peer_client(peer: Peer, target: SocketAddr, calls: Vec<Value>) -> Vec<Value> {
    let output = peer
        .command()
        .arg("client")
        .arg(target.to_string())
        .arg(Value::Array(calls).to_string())
        .output()
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{peer:?} client failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    stdout
        .lines()
        .map(|line| serde_json::from_str(line).unwrap())
        .collect()
}

fn reply_of(answer: &Value) -> ApplyReply {
    let body = unhex(answer["response_hex"].as_str().expect("a response"));
    ApplyReply::decode(&body[..]).unwrap()
}

/// The reason of idemproxy's `google.rpc.Status` in the trailers the peer handed over.
fn reason_of(answer: &Value) -> String {
    let details = unhex(
        answer["trailing"]["grpc-status-details-bin"]
            .as_str()
            .unwrap(),
    );
    support::error_info_of(&details)
        .expect("an ErrorInfo detail")
        .reason
}

async fn a_client_gets_one_execution_and_the_recorded_answer_with(peer: Peer) {
    let upstream = ledger::start().await;
    let sidecar = start_sidecar(upstream.addr, |_| {}).await;
    let paid = add("peer-paid", 5);
    let refused = ApplyRequest {
        fail_code: tonic::Code::FailedPrecondition as u32,
        fail_message: "account frozen".into(),
        with_details: true,
        ..add("peer-refused", 7)
    };
    let long_key = "k".repeat(idemproxy::key::SERIAL_BYTES_MAX + 1);
    let caller = ("x-caller-id", "peer-client");
    let answers = peer_client(
        peer,
        sidecar.addr,
        vec![
            call(&paid, &[("idempotency-key", "peer-1"), caller]),
            call(&paid, &[("idempotency-key", "peer-1"), caller]),
            call(&refused, &[("idempotency-key", "peer-2"), caller]),
            call(&refused, &[("idempotency-key", "peer-2"), caller]),
            call(
                &add("peer-bad-key", 1),
                &[("idempotency-key", &long_key), caller],
            ),
            call(
                &add("peer-paid", 1),
                &[("idempotency-key", "peer-1"), caller],
            ),
            call(&add("peer-no-key", 1), &[caller]),
        ],
    )
    .await;
    assert_eq!(answers.len(), 7, "{answers:?}");

    // A duplicate gets the first answer, marked as replayed; the service ran once.
    let (first, second) = (&answers[0], &answers[1]);
    assert_eq!(first["code"], "OK", "{first}");
    assert_eq!(second["code"], "OK", "{second}");
    assert_eq!(first["response_hex"], second["response_hex"]);
    assert_eq!(reply_of(first).balance, 5);
    assert!(
        first["initial"].get("idempotency-replayed").is_none(),
        "{first}"
    );
    assert_eq!(
        second["initial"]["idempotency-replayed"], "true",
        "{second}"
    );
    assert_eq!(upstream.state.executions_of("peer-paid"), 1);

    // A recorded error comes back whole: code, message, details and the service's trailer.
    let (failed, again) = (&answers[2], &answers[3]);
    for answer in [failed, again] {
        assert_eq!(answer["code"], "FAILED_PRECONDITION", "{answer}");
        assert_eq!(answer["details"], "account frozen", "{answer}");
        assert_eq!(answer["trailing"]["x-ledger-trailer"], "kept", "{answer}");
    }
    assert_eq!(
        failed["trailing"]["grpc-status-details-bin"],
        again["trailing"]["grpc-status-details-bin"]
    );
    assert_eq!(upstream.state.executions_of("peer-refused"), 1);

    // idemproxy's own refusals, decoded by C core: a key too long, a key reused.
    assert_eq!(answers[4]["code"], "INVALID_ARGUMENT", "{}", answers[4]);
    assert_eq!(reason_of(&answers[4]), "IDEMPOTENCY_KEY_INVALID");
    assert_eq!(answers[5]["code"], "FAILED_PRECONDITION", "{}", answers[5]);
    assert_eq!(reason_of(&answers[5]), "IDEMPOTENCY_KEY_REUSED");
    assert_eq!(upstream.state.executions_of("peer-bad-key"), 0);
    assert_eq!(upstream.state.executions_of("peer-paid"), 1);

    // No key: passed through to the service.
    assert_eq!(answers[6]["code"], "OK", "{}", answers[6]);
    assert_eq!(upstream.state.executions_of("peer-no-key"), 1);
}

/// `peer`'s server: its address, the requests it executed (hex), and the child.
async fn peer_server(peer: Peer) -> (SocketAddr, Arc<Mutex<Vec<String>>>, tokio::process::Child) {
    let mut child = peer
        .command()
        .arg("server")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = tokio::io::BufReader::new(child.stdout.take().unwrap()).lines();
    let first = tokio::time::timeout(Duration::from_secs(30), lines.next_line())
        .await
        .expect("the peer's server starts within 30 s")
        .unwrap()
        .expect("the peer's server prints its port");
    let port: u16 = first.strip_prefix("listening ").unwrap().parse().unwrap();
    let executed = Arc::new(Mutex::new(Vec::new()));
    let seen = executed.clone();
    tokio::spawn(async move {
        while let Ok(Some(line)) = lines.next_line().await {
            if let Some(request) = line.strip_prefix("executed ") {
                seen.lock().unwrap().push(request.to_owned());
            } else if line.starts_with("collected ") {
                seen.lock().unwrap().push(line);
            }
        }
    });
    (SocketAddr::from(([127, 0, 0, 1], port)), executed, child)
}

async fn a_server_behind_the_sidecar_executes_a_key_once_with(peer: Peer) {
    let (addr, executed, _child) = peer_server(peer).await;
    let sidecar = start_sidecar(addr, |_| {}).await;
    let mut client = client(sidecar.addr).await;

    let first = apply(&mut client, add("peer", 1), Some("peer-1"), Some("rust"))
        .await
        .unwrap();
    let second = apply(&mut client, add("peer", 1), Some("peer-1"), Some("rust"))
        .await
        .unwrap();
    assert!(!was_replayed(&first) && was_replayed(&second));
    assert_eq!(first.get_ref().execution, 1);
    assert_eq!(second.get_ref(), first.get_ref());

    for _ in 0..2 {
        let status = apply(&mut client, add("fail", 1), Some("peer-2"), Some("rust"))
            .await
            .unwrap_err();
        assert_eq!(status.code(), tonic::Code::FailedPrecondition, "{status:?}");
        assert_eq!(status.message(), "the peer refused");
        assert_eq!(status.metadata().get("x-peer-trailer").unwrap(), "kept");
    }

    let no_key = apply(&mut client, add("peer", 1), None, Some("rust"))
        .await
        .unwrap();
    assert_eq!(no_key.get_ref().execution, 3);

    // Every answer above arrived after its execution line was printed.
    support::eventually(Duration::from_secs(5), "three executions seen", || {
        let executed = executed.clone();
        async move { executed.lock().unwrap().len() == 3 }
    })
    .await;
    let executed = executed.lock().unwrap().clone();
    let keyed = hex(&add("peer", 1).encode_to_vec());
    assert_eq!(
        executed.iter().filter(|request| **request == keyed).count(),
        2,
        "peer-1 once, and the call without a key: {executed:?}"
    );
}

/// Issue 33, item 1: the sidecar forwarded a keyed empty request as HEADERS with END_STREAM,
/// and a server that ends a call's input only on a DATA frame's END_STREAM never saw its end.
async fn a_keyed_empty_client_stream_ends_at_the_server_with(peer: Peer) {
    let (addr, executed, _child) = peer_server(peer).await;
    let sidecar = start_sidecar(addr, |_| {}).await;
    let mut client = client(sidecar.addr).await;
    let empty = || {
        let mut request = tonic::Request::new(tokio_stream::iter(Vec::<ApplyRequest>::new()));
        request
            .metadata_mut()
            .insert("idempotency-key", "empty-1".parse().unwrap());
        request.set_timeout(Duration::from_secs(10));
        request
    };
    // Bounded: a server that never sees the end of its input answers only at the deadline.
    let bound = Duration::from_secs(20);
    let first = tokio::time::timeout(bound, client.collect(empty()))
        .await
        .expect("the keyed empty stream is answered")
        .unwrap_or_else(|status| panic!("{peer:?}: {status:?}"));
    let again = tokio::time::timeout(bound, client.collect(empty()))
        .await
        .expect("the duplicate is answered")
        .unwrap();
    assert!(!was_replayed(&first) && was_replayed(&again));
    assert_eq!(first.get_ref(), again.get_ref());
    assert_eq!(first.get_ref().execution, 1);
    let executed = executed.lock().unwrap().clone();
    assert_eq!(
        executed,
        vec!["collected 0"],
        "{peer:?}: the input ended, once"
    );
}

async fn a_client_streams_through_in_every_call_shape_with(peer: Peer) {
    let upstream = ledger::start().await;
    let sidecar = start_sidecar(upstream.addr, |_| {}).await;
    let watch = ApplyRequest {
        stream_messages: 3,
        reply_padding_bytes: 300_000,
        ..add("peer-watch", 2)
    };
    let parts: Vec<String> = (1..=4)
        .map(|n| hex(&add("peer-collect", n).encode_to_vec()))
        .collect();
    let chat: Vec<String> = (1..=3)
        .map(|n| hex(&add("peer-chat", n).encode_to_vec()))
        .collect();
    let keyed = [
        ("idempotency-key", "peer-watch-1"),
        ("x-caller-id", "peer-client"),
    ];
    let mut keyed_watch = call(&watch, &keyed);
    keyed_watch["shape"] = json!("server_stream");
    keyed_watch["method"] = json!(WATCH);
    let mut open_watch = call(
        &ApplyRequest {
            reply_padding_bytes: 0,
            ..watch.clone()
        },
        &[],
    );
    open_watch["shape"] = json!("server_stream");
    open_watch["method"] = json!(WATCH);
    let answers = peer_client(
        peer,
        sidecar.addr,
        vec![
            keyed_watch.clone(),
            keyed_watch,
            open_watch,
            json!({"method": "/idemproxy.testing.v1.Ledger/Collect", "shape": "client_stream",
                   "requests_hex": parts, "metadata": []}),
            json!({"method": "/idemproxy.testing.v1.Ledger/Chat", "shape": "bidi",
                   "requests_hex": chat, "metadata": []}),
        ],
    )
    .await;
    assert_eq!(answers.len(), 5, "{answers:?}");
    for answer in &answers {
        assert_eq!(answer["code"], "OK", "{answer}");
    }

    // A keyed server stream is recorded whole (900 kB here) and replayed in order.
    let (first, replay) = (&answers[0], &answers[1]);
    let messages = first["response_hex"].as_array().unwrap();
    assert_eq!(messages.len(), 3);
    assert_eq!(first["response_hex"], replay["response_hex"]);
    assert_eq!(
        replay["initial"]["idempotency-replayed"], "true",
        "{replay}"
    );
    assert_eq!(
        upstream.state.executions_of("peer-watch"),
        2,
        "once keyed, once open"
    );
    let third = ApplyReply::decode(&unhex(messages[2].as_str().unwrap())[..]).unwrap();
    assert_eq!((third.balance, third.padding.len()), (2, 300_000));

    // Without a key every shape streams through.
    assert_eq!(answers[2]["response_hex"].as_array().unwrap().len(), 3);
    let collected = reply_of(&answers[3]);
    assert_eq!(collected.balance, 1 + 2 + 3 + 4);
    assert_eq!(upstream.state.executions_of("peer-collect"), 4);
    let chatted: Vec<i64> = answers[4]["response_hex"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| {
            ApplyReply::decode(&unhex(m.as_str().unwrap())[..])
                .unwrap()
                .balance
        })
        .collect();
    assert_eq!(chatted, vec![1, 3, 6]);
}

/// The test upstream's Collect as a service that keys an upload by its first message would
/// declare it: the key field is `account`, and a key is required. Wire-compatible with
/// `ledger.proto` (its other fields are unknown fields here, fingerprinted as received).
const KEYED_COLLECT_PROTO: &str = r#"syntax = "proto3";
package idemproxy.testing.v1;
import "idemproxy/v1/annotations.proto";
service Ledger {
  rpc Collect(stream ApplyRequest) returns (ApplyReply) {
    option (idemproxy.v1.method) = { require_key: true };
  }
}
message ApplyRequest { string account = 1 [(idemproxy.v1.field).key = true]; int64 amount = 2; }
message ApplyReply { int64 balance = 1; uint64 execution = 2; bytes padding = 3; }
"#;

/// A client stream for a peer's client to send to Collect.
fn collect(requests: &[ApplyRequest], metadata: &[(&str, &str)]) -> Value {
    let requests: Vec<String> = requests.iter().map(|r| hex(&r.encode_to_vec())).collect();
    json!({"method": COLLECT, "shape": "client_stream", "requests_hex": requests,
           "metadata": metadata})
}

async fn a_keyed_client_stream_runs_once_and_is_replayed_with(peer: Peer) {
    let upstream = ledger::start().await;
    let protos = tempfile::tempdir().unwrap();
    let proto = protos.path().join("keyed_collect.proto");
    std::fs::write(&proto, KEYED_COLLECT_PROTO).unwrap();
    let sidecar = start_sidecar(upstream.addr, |args| {
        args.proto = vec![proto];
        args.proto_path = vec![protos.path().to_owned()];
    })
    .await;
    let caller = ("x-caller-id", "peer-client");
    let upload = [add("peer-upload", 1), add("peer-upload", 2)];
    let answers = peer_client(
        peer,
        sidecar.addr,
        vec![
            collect(&upload, &[caller]),
            collect(&upload, &[caller]),
            // The same first message, so the same key; another second message.
            collect(&[add("peer-upload", 1), add("peer-upload", 5)], &[caller]),
            // Keyed by its first message only: a fresh key, though its second names another.
            collect(&[add("peer-second", 1), add("peer-upload", 1)], &[caller]),
            // No first message, no header: no key, and this method requires one.
            collect(&[], &[caller]),
            // The header keys it.
            collect(&[], &[("idempotency-key", "peer-empty"), caller]),
        ],
    )
    .await;
    assert_eq!(answers.len(), 6, "{answers:?}");

    // The duplicate stream gets the first answer, replayed; the service ran it once.
    let (first, again) = (&answers[0], &answers[1]);
    assert_eq!(first["code"], "OK", "{first}");
    assert_eq!(again["code"], "OK", "{again}");
    assert_eq!(first["response_hex"], again["response_hex"]);
    assert_eq!(reply_of(first).balance, 1 + 2);
    assert!(first["initial"].get("idempotency-replayed").is_none());
    assert_eq!(again["initial"]["idempotency-replayed"], "true", "{again}");

    // Another stream under the same key is refused, and never reaches the service.
    assert_eq!(answers[2]["code"], "FAILED_PRECONDITION", "{}", answers[2]);
    assert_eq!(reason_of(&answers[2]), "IDEMPOTENCY_KEY_REUSED");

    assert_eq!(answers[3]["code"], "OK", "{}", answers[3]);
    assert!(answers[3]["initial"].get("idempotency-replayed").is_none());
    assert_eq!(
        upstream.state.executions_of("peer-upload"),
        2 + 1,
        "the first stream's two messages once, and the second message of the fresh key"
    );
    assert_eq!(upstream.state.executions_of("peer-second"), 1);

    assert_eq!(answers[4]["code"], "INVALID_ARGUMENT", "{}", answers[4]);
    assert_eq!(reason_of(&answers[4]), "IDEMPOTENCY_KEY_MISSING");
    assert_eq!(answers[5]["code"], "OK", "{}", answers[5]);
    assert_eq!(
        upstream.state.executions(),
        2 + 2,
        "{:?}",
        upstream.state.executed_twice()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_keyed_client_stream_runs_once_and_is_replayed() {
    for peer in Peer::ALL {
        if peer.present() {
            a_keyed_client_stream_runs_once_and_is_replayed_with(peer).await;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_gets_one_execution_and_the_recorded_answer() {
    for peer in Peer::ALL {
        if peer.present() {
            a_client_gets_one_execution_and_the_recorded_answer_with(peer).await;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_behind_the_sidecar_executes_a_key_once() {
    for peer in Peer::ALL {
        if peer.present() {
            a_server_behind_the_sidecar_executes_a_key_once_with(peer).await;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_keyed_empty_client_stream_ends_at_the_server() {
    for peer in Peer::ALL {
        if peer.present() {
            a_keyed_empty_client_stream_ends_at_the_server_with(peer).await;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_streams_through_in_every_call_shape() {
    for peer in Peer::ALL {
        if peer.present() {
            a_client_streams_through_in_every_call_shape_with(peer).await;
        }
    }
}
