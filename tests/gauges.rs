//! The gauges of records by state, on every store (`IDEMPROXY_TEST_STORE`): a census of the
//! store counts COMPLETED and IN_DOUBT records, the IN_DOUBT ones no probe will settle, and
//! the oldest one's age; readiness is a gauge too. Real sidecar, real counting upstream.

// A failed unwrap is a failed test.
#![allow(clippy::unwrap_used)]

mod support;

use std::time::Duration;
use support::http::{get, metric};
use support::{add, apply, client, eventually, ledger, start_sidecar};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_outcome_waiting_for_an_operator_is_counted_and_aged() {
    let upstream = ledger::start().await;
    let sidecar = start_sidecar(upstream.addr, |_| {}).await;
    let mut ledger_client = client(sidecar.addr).await;
    for n in 0..3 {
        let key = format!("paid-{n}");
        apply(&mut ledger_client, add("acct", 1), Some(&key), None)
            .await
            .expect("OK");
    }
    // INTERNAL after acting: the outcome is unknown, and with no probe only an operator
    // settles it.
    let mut failing = add("acct", 1);
    failing.fail_code = 13;
    let refused = apply(&mut ledger_client, failing, Some("lost-1"), None).await;
    assert!(refused.is_err(), "the service's INTERNAL");
    let ops = sidecar.running.ops_addr;
    let counted = |metrics: &str, name: &str, labels: &[(&str, &str)]| {
        metric(metrics, name, labels).unwrap_or(-1.0)
    };
    eventually(
        Duration::from_secs(20),
        "the census counts the records",
        || async move {
            let (_, metrics) = get(ops, "/metrics").await;
            counted(&metrics, "idemproxy_records", &[("state", "completed")]) == 3.0
                && counted(&metrics, "idemproxy_records", &[("state", "in_doubt")]) == 1.0
                && counted(&metrics, "idemproxy_records", &[("state", "in_flight")]) == 0.0
                && counted(&metrics, "idemproxy_in_doubt_waiting_for_operator", &[]) == 1.0
        },
    )
    .await;
    eventually(
        Duration::from_secs(20),
        "the oldest outcome ages",
        || async move {
            let (_, metrics) = get(ops, "/metrics").await;
            counted(&metrics, "idemproxy_in_doubt_oldest_age_seconds", &[]) > 0.0
                && counted(&metrics, "idemproxy_ready", &[]) == 1.0
                && counted(&metrics, "idemproxy_store_failed_for_good", &[]) == 0.0
        },
    )
    .await;

    // An operator resolves it: nothing waits any more.
    let admin = sidecar.running.admin_addr.to_string();
    let resolved = std::process::Command::new(env!("CARGO_BIN_EXE_idemproxy"))
        .args(["keys", "--admin", &admin, "resolve", "--method"])
        .args(["/idemproxy.testing.v1.Ledger/Apply", "--serial", "lost-1"])
        .args(["--forget", "--operator", "test"])
        .output()
        .unwrap();
    assert!(resolved.status.success(), "{resolved:?}");
    eventually(
        Duration::from_secs(20),
        "the census sees it resolved",
        || async move {
            let (_, metrics) = get(ops, "/metrics").await;
            counted(&metrics, "idemproxy_in_doubt_waiting_for_operator", &[]) == 0.0
                && counted(&metrics, "idemproxy_in_doubt_oldest_age_seconds", &[]) == 0.0
                && counted(&metrics, "idemproxy_records", &[("state", "in_doubt")]) == 0.0
        },
    )
    .await;
    sidecar.running.stop().await;
}
