//! Records at rest (issue: security): with a key file, no plaintext of a recorded response
//! reaches the data dir; an altered record answers IN_DOUBT, never garbage and never a
//! re-run; rotation keeps old records readable; removing a key makes its records IN_DOUBT.
//! The real binary, its real sled directory, stopped and restarted.

// A failed unwrap is a failed test.
#![allow(clippy::unwrap_used)]

mod support;

use base64::Engine as _;
use idemproxy::pb::idemproxy::testing::v1::ledger_client::LedgerClient;
use idemproxy::pb::idemproxy::testing::v1::ApplyRequest;
use idemproxy::record::Record;
use prost::Message;
use std::path::Path;
use support::binary::{self, BinarySidecar};
use support::{apply, client, ledger, reason};
use tonic::transport::Channel;

/// A recorded answer whose text is known: NOT_FOUND is recorded, its message kept.
const MARKER: &str = "card-4111-1111-1111-1111-of-alice";

fn known_answer() -> ApplyRequest {
    ApplyRequest {
        account: "a".into(),
        amount: 1,
        fail_code: 5,
        fail_message: MARKER.into(),
        ..ApplyRequest::default()
    }
}

fn write_keys(path: &Path, keys: &[(&str, u8)]) {
    let text: String = keys
        .iter()
        .map(|(id, byte)| {
            let secret = base64::engine::general_purpose::STANDARD.encode([*byte; 32]);
            format!("{id} {secret}\n")
        })
        .collect();
    std::fs::write(path, text).unwrap();
}

async fn sidecar(upstream: std::net::SocketAddr, dir: &Path, keys: Option<&Path>) -> BinarySidecar {
    let keys = keys.map(|path| path.display().to_string());
    let mut extra = vec![];
    if let Some(keys) = &keys {
        extra.extend(["--encryption-key-file", keys.as_str()]);
    }
    binary::start(&binary::run_args(upstream, &dir.join("data"), &extra)).await
}

async fn stop(sidecar: BinarySidecar) {
    sidecar.terminate();
    assert_eq!(sidecar.wait().await, Some(0));
}

/// The recorded answer to `serial`: its grpc-message.
async fn answer(client: &mut LedgerClient<Channel>, serial: &str) -> tonic::Status {
    apply(client, known_answer(), Some(serial), Some("alice"))
        .await
        .unwrap_err()
}

fn data_dir_contains(dir: &Path, needle: &[u8]) -> bool {
    let mut found = false;
    let mut pending = vec![dir.to_owned()];
    while let Some(path) = pending.pop() {
        if path.is_dir() {
            pending.extend(std::fs::read_dir(&path).unwrap().map(|e| e.unwrap().path()));
        } else {
            let bytes = std::fs::read(&path).unwrap();
            found |= bytes.windows(needle.len()).any(|window| window == needle);
        }
    }
    found
}

#[tokio::test]
async fn with_a_key_file_no_recorded_plaintext_reaches_the_data_dir() {
    let upstream = ledger::start().await;
    for sealed in [false, true] {
        let dir = tempfile::tempdir().unwrap();
        let keys = dir.path().join("keys");
        write_keys(&keys, &[("k1", 7)]);
        let sidecar = sidecar(upstream.addr, dir.path(), sealed.then_some(keys.as_path())).await;
        let mut client = client(sidecar.addr).await;
        let first = answer(&mut client, "known").await;
        assert_eq!(first.message(), MARKER);
        let replay = answer(&mut client, "known").await;
        assert_eq!(
            replay.message(),
            MARKER,
            "the replay is the recorded answer"
        );
        assert_eq!(
            replay.metadata().get("idempotency-replayed").unwrap(),
            "true"
        );
        stop(sidecar).await;
        let visible = data_dir_contains(&dir.path().join("data"), MARKER.as_bytes());
        // The control run shows the search finds a plaintext record when there is one.
        assert_eq!(visible, !sealed, "sealed: {sealed}");
    }
    assert_eq!(upstream.state.executions(), 2);
}

/// A method with an in-doubt probe keeps the call's serial to ask the service about it: with
/// a key file the serial is sealed too, and the probe still finds the charge.
#[tokio::test]
async fn a_probed_calls_serial_is_sealed_and_still_probed() {
    use idemproxy::pb::idemproxy::example::v1::payments_client::PaymentsClient;
    const SERIAL: &str = "order-7f3a-payment-of-alice";
    let service = support::payments::start().await;
    for sealed in [false, true] {
        let dir = tempfile::tempdir().unwrap();
        let keys = dir.path().join("keys");
        write_keys(&keys, &[("k1", 7)]);
        let set = dir.path().join("payments.binpb");
        std::fs::write(&set, idemproxy::pb::EXAMPLE_DESCRIPTOR_SET).unwrap();
        let mut extra = vec![
            "--descriptor-set".to_owned(),
            set.display().to_string(),
            "--default-lease".to_owned(),
            "200ms".to_owned(),
            "--lease-margin".to_owned(),
            "50ms".to_owned(),
        ];
        if sealed {
            extra.extend([
                "--encryption-key-file".to_owned(),
                keys.display().to_string(),
            ]);
        }
        let extra: Vec<&str> = extra.iter().map(String::as_str).collect();
        let data = dir.path().join("data");
        let sidecar = binary::start(&binary::run_args(service.addr, &data, &extra)).await;
        let mut client = PaymentsClient::connect(format!("http://{}", sidecar.addr))
            .await
            .unwrap();
        let caller = format!("alice-{sealed}");
        let charge = |behaviour: &str| support::payments::charge(SERIAL, &caller, behaviour);
        let broken = client.charge(charge("fail-after-charge")).await;
        assert_eq!(broken.unwrap_err().code(), tonic::Code::Internal);
        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
        let retry = client.charge(charge("ok")).await.unwrap();
        assert_eq!(
            retry.metadata().get("idempotency-resolved-by").unwrap(),
            "probe"
        );
        stop(sidecar).await;
        // The control run shows the search finds a serial kept in the clear.
        let visible = data_dir_contains(&data, SERIAL.as_bytes());
        assert_eq!(visible, !sealed, "sealed: {sealed}");
    }
    assert_eq!(service.executions.charges(), 2, "one charge per caller");
}

#[tokio::test]
async fn an_altered_record_answers_in_doubt_and_is_never_run_again() {
    let upstream = ledger::start().await;
    let dir = tempfile::tempdir().unwrap();
    let keys = dir.path().join("keys");
    write_keys(&keys, &[("k1", 7)]);
    let first = sidecar(upstream.addr, dir.path(), Some(&keys)).await;
    answer(&mut client(first.addr).await, "altered").await;
    stop(first).await;
    {
        let db = sled::open(dir.path().join("data")).unwrap();
        let records = db.open_tree("records").unwrap();
        let mut altered = 0;
        for entry in records.iter() {
            let (key, value) = entry.unwrap();
            let mut record = Record::decode(&value[..]).unwrap();
            let sealed = record.sealed.as_mut().expect("the record is sealed");
            sealed.ciphertext[10] ^= 0x20;
            records.insert(key, record.encode_to_vec()).unwrap();
            altered += 1;
        }
        assert_eq!(altered, 1);
        db.flush().unwrap();
    }
    let second = sidecar(upstream.addr, dir.path(), Some(&keys)).await;
    let mut client = client(second.addr).await;
    let refused = answer(&mut client, "altered").await;
    assert_eq!(refused.code(), tonic::Code::FailedPrecondition);
    assert_eq!(reason(&refused), "IDEMPOTENCY_OUTCOME_UNKNOWN");
    assert!(
        refused.message().contains("decrypted"),
        "{}",
        refused.message()
    );
    assert_eq!(upstream.state.executions(), 1, "never run again");
    stop(second).await;
}

#[tokio::test]
async fn a_rotation_keeps_old_records_and_removing_a_key_leaves_them_in_doubt() {
    let upstream = ledger::start().await;
    let dir = tempfile::tempdir().unwrap();
    let keys = dir.path().join("keys");
    write_keys(&keys, &[("2026-11", 1)]);
    let old = sidecar(upstream.addr, dir.path(), Some(&keys)).await;
    answer(&mut client(old.addr).await, "before").await;
    stop(old).await;

    // Rotation: the new key first, the old one kept to open old records.
    write_keys(&keys, &[("2026-12", 2), ("2026-11", 1)]);
    let rotated = sidecar(upstream.addr, dir.path(), Some(&keys)).await;
    let mut client_rotated = client(rotated.addr).await;
    let replay = answer(&mut client_rotated, "before").await;
    assert_eq!(replay.message(), MARKER);
    assert_eq!(
        replay.metadata().get("idempotency-replayed").unwrap(),
        "true"
    );
    answer(&mut client_rotated, "after").await;
    stop(rotated).await;

    // The old key removed: its records answer IN_DOUBT; the new key's still replay.
    write_keys(&keys, &[("2026-12", 2)]);
    let trimmed = sidecar(upstream.addr, dir.path(), Some(&keys)).await;
    let mut client_trimmed = client(trimmed.addr).await;
    let refused = answer(&mut client_trimmed, "before").await;
    assert_eq!(reason(&refused), "IDEMPOTENCY_OUTCOME_UNKNOWN");
    let replay = answer(&mut client_trimmed, "after").await;
    assert_eq!(replay.message(), MARKER);
    assert_eq!(upstream.state.executions(), 2);
    stop(trimmed).await;
}

/// `idemproxy keys ARGS --json --admin ADMIN`, which must succeed, parsed.
fn keys_json(admin: &str, args: &[&str]) -> serde_json::Value {
    let (code, out, err) = binary::keys(admin, &[args, &["--json"]].concat());
    assert_eq!(code, 0, "{out}{err}");
    binary::json(&out)
}

/// With a key file, operators see a sealed record's answer (its status), and the
/// answer an operator records for an IN_DOUBT key is sealed like the service's. (Before, the
/// admin API showed sealed records without a status and wrote operators' answers in the
/// clear.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operators_see_sealed_answers_and_their_own_answers_are_sealed() {
    const OPERATOR_ANSWER: &str = "refunded-by-ops-ticket-7731";
    let upstream = ledger::start().await;
    let dir = tempfile::tempdir().unwrap();
    let keys = dir.path().join("keys");
    write_keys(&keys, &[("k1", 7)]);
    let admin = support::http::free_addr().to_string();
    let key_file = keys.display().to_string();
    let extra = [
        "--encryption-key-file",
        key_file.as_str(),
        "--admin-listen",
        admin.as_str(),
    ];
    let args = binary::run_args(upstream.addr, &dir.path().join("data"), &extra);
    let sidecar = binary::start(&args).await;
    let mut client = client(sidecar.addr).await;
    answer(&mut client, "kept").await;
    let mut doubtful = known_answer();
    doubtful.fail_code = 13; // INTERNAL after acting: the key is IN_DOUBT.
    let _ = apply(&mut client, doubtful, Some("doubt"), Some("alice")).await;

    let method = "/idemproxy.testing.v1.Ledger/Apply";
    let select =
        |serial: &'static str| ["--method", method, "--caller", "alice", "--serial", serial];
    let kept = keys_json(&admin, &[&["get"][..], &select("kept")].concat());
    assert_eq!(kept["state"], "COMPLETED", "{kept}");
    assert_eq!(kept["grpc_status"], 5, "{kept}");

    let resolve = [
        &["resolve"][..],
        &select("doubt"),
        &[
            "--complete",
            "6",
            "--message",
            OPERATOR_ANSWER,
            "--operator",
            "ops@example",
        ],
    ]
    .concat();
    let resolved = keys_json(&admin, &resolve);
    assert_eq!(resolved["state"], "COMPLETED", "{resolved}");
    let mut retry = known_answer();
    retry.fail_code = 13;
    let replay = apply(&mut client, retry, Some("doubt"), Some("alice"))
        .await
        .unwrap_err();
    assert_eq!(
        replay.message(),
        OPERATOR_ANSWER,
        "the operator's answer is replayed"
    );
    stop(sidecar).await;
    assert!(
        !data_dir_contains(&dir.path().join("data"), OPERATOR_ANSWER.as_bytes()),
        "the operator's answer reached the disk in the clear"
    );
    assert_eq!(upstream.state.executions(), 2);
}

#[tokio::test]
async fn a_bad_key_file_stops_the_start_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    let keys = dir.path().join("keys");
    std::fs::write(&keys, "k1 c2hvcnQ=\n").unwrap();
    let output = std::process::Command::new(binary::path())
        .arg("run")
        .args(binary::run_args(
            "127.0.0.1:9".parse().unwrap(),
            &dir.path().join("data"),
            &["--encryption-key-file", &keys.display().to_string()],
        ))
        .env("IDEMPROXY_ADMIN_LISTEN", "127.0.0.1:0")
        .env("IDEMPROXY_OPS_LISTEN", "127.0.0.1:0")
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(2), "a start error exits 2");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("--encryption-key-file"), "{stderr}");
    assert!(
        stderr.contains("line 1: a key is 32 bytes, this one is 5"),
        "{stderr}"
    );
}
