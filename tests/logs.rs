//! What the logs may say: key hashes, never a serial, a caller identity or a body.

// A failed unwrap is a failed test.
#![allow(clippy::unwrap_used)]

mod support;

use support::{add, apply, client, ledger, reason};

#[tokio::test]
async fn logs_carry_no_serial_caller_or_body() {
    let upstream = ledger::start().await;
    let dir = tempfile::tempdir().unwrap();
    let log_path = dir.path().join("stderr.log");
    let addr = support::http::free_addr();
    let mut child = tokio::process::Command::new(support::binary::path())
        .arg("run")
        .args(["--listen", &addr.to_string(), "--upstream"])
        .arg(format!("http://{}", upstream.addr))
        .arg("--data-dir")
        .arg(dir.path().join("data"))
        .env("RUST_LOG", "info,idemproxy=trace")
        .env("IDEMPROXY_LOG_FORMAT", "json")
        .env("IDEMPROXY_ADMIN_LISTEN", "127.0.0.1:0")
        .env("IDEMPROXY_OPS_LISTEN", "127.0.0.1:0")
        .stderr(std::fs::File::create(&log_path).unwrap())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    support::binary::wait_listening(addr).await;
    let mut client = client(addr).await;
    let (serial, caller) = ("serial-secret-7731", "caller-secret-8842");
    let secret_request = idemproxy::pb::idemproxy::testing::v1::ApplyRequest {
        account: "body-secret-9953".into(),
        fail_code: 5,
        fail_message: "response-secret-6614".into(),
        ..add("x", 1)
    };
    for _ in 0..2 {
        let refused = apply(
            &mut client,
            secret_request.clone(),
            Some(serial),
            Some(caller),
        )
        .await;
        assert_eq!(refused.unwrap_err().message(), "response-secret-6614");
    }
    let reused = apply(&mut client, add("other", 2), Some(serial), Some(caller)).await;
    assert_eq!(reason(&reused.unwrap_err()), "IDEMPOTENCY_KEY_REUSED");
    // An outcome left unknown is logged, by its key hash only.
    let doubtful = idemproxy::pb::idemproxy::testing::v1::ApplyRequest {
        fail_code: ledger::RESET_AFTER_ACTING,
        ..secret_request.clone()
    };
    let doubt_serial = "serial-secret-doubt-5521";
    let unknown = apply(&mut client, doubtful, Some(doubt_serial), Some(caller)).await;
    assert_eq!(reason(&unknown.unwrap_err()), "IDEMPOTENCY_OUTCOME_UNKNOWN");
    let pid = child.id().unwrap().to_string();
    std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap();
    child.wait().await.unwrap();
    let logs = std::fs::read_to_string(&log_path).unwrap();
    let key = idemproxy::key::Key::derive(
        "/idemproxy.testing.v1.Ledger/Apply",
        caller,
        doubt_serial.as_bytes(),
    );
    assert!(
        logs.contains(&key.short()),
        "the key hash is logged (the log is not empty of what happened):\n{logs}"
    );
    for secret in [
        serial,
        doubt_serial,
        caller,
        "body-secret-9953",
        "response-secret-6614",
    ] {
        assert!(!logs.contains(secret), "{secret} is in the logs:\n{logs}");
    }
}
