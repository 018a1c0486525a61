//! Observe mode (`--mode observe`, `MODE_OBSERVE`, a rule's `mode = "observe"`): every call
//! is forwarded and answered by the service as without the sidecar, the first attempt of a
//! key is recorded, what enforcing would have done is counted, and a switch to replay keeps
//! the records. Real sidecar, real store (`IDEMPROXY_TEST_STORE`), real counting upstream.

// A failed unwrap is a failed test.
#![allow(clippy::unwrap_used)]

mod support;

use idemproxy::config::{self, ModeSetting, StoreKind};
use support::http::{get, metric};
use support::{add, apply, client, ledger, was_replayed};

/// Later attempts of `/idemproxy.testing.v1.Ledger/Apply` counted as `decision`.
async fn observed(ops: std::net::SocketAddr, decision: &str) -> f64 {
    let (_, metrics) = get(ops, "/metrics").await;
    metric(
        &metrics,
        "idemproxy_observe_decisions_total",
        &[
            ("rpc_method", "/idemproxy.testing.v1.Ledger/Apply"),
            ("decision", decision),
        ],
    )
    .unwrap_or(0.0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn observe_mode_runs_every_delivery_counts_what_it_would_stop_and_a_switch_keeps_the_records()
{
    let upstream = ledger::start().await;
    let dir = tempfile::tempdir().unwrap();
    let mut args = support::test_args(upstream.addr, dir.path());
    let _redis = support::use_test_store(&mut args);
    let mut observing = args.clone();
    observing.mode = ModeSetting::Observe;
    let sidecar = idemproxy::server::start(&config::resolve(observing).unwrap())
        .await
        .unwrap();
    let mut ledger_client = client(sidecar.proxy_addr).await;

    // A queue redelivers "add 10" five times: all five run, as without the sidecar.
    let mut first_balance = None;
    for delivery in 1..=5 {
        let reply = apply(&mut ledger_client, add("acct", 10), Some("sub-1"), None)
            .await
            .expect("observe mode answers as the service does");
        assert!(!was_replayed(&reply), "observe mode never replays");
        assert!(
            reply.metadata().get("idempotency-replayed").is_none(),
            "observe mode adds no metadata"
        );
        assert_eq!(reply.get_ref().execution, delivery);
        first_balance.get_or_insert(reply.get_ref().balance);
    }
    assert_eq!(upstream.state.executions_of("acct"), 5);
    assert_eq!(observed(sidecar.ops_addr, "fresh").await, 1.0);
    assert_eq!(observed(sidecar.ops_addr, "replay").await, 4.0);

    // The same key with another request runs too, and is counted as key reuse.
    apply(&mut ledger_client, add("acct", 99), Some("sub-1"), None)
        .await
        .expect("key reuse is not refused in observe mode");
    assert_eq!(upstream.state.executions_of("acct"), 6);
    assert_eq!(observed(sidecar.ops_addr, "key_reused").await, 1.0);
    sidecar.stop().await;

    // Switched to replay on the same store: the first delivery's record answers the next.
    let mut replaying = args;
    replaying.mode = ModeSetting::Replay;
    let replaying = config::resolve(replaying).unwrap();
    // sled gives its lock back once its threads have ended, a moment after the stop.
    let mut started = idemproxy::server::start(&replaying).await;
    for _ in 0..100 {
        match &started {
            Err(error) if error.to_string().contains("could not acquire lock") => {
                tokio::time::sleep(std::time::Duration::from_millis(20)).await;
                started = idemproxy::server::start(&replaying).await;
            }
            _ => break,
        }
    }
    let sidecar = started.unwrap();
    let mut ledger_client = client(sidecar.proxy_addr).await;
    let sixth = apply(&mut ledger_client, add("acct", 10), Some("sub-1"), None)
        .await
        .expect("the recorded outcome");
    assert!(
        was_replayed(&sixth),
        "after the switch a delivery is a replay"
    );
    assert_eq!(sixth.get_ref().execution, 1, "the first delivery's answer");
    assert_eq!(Some(sixth.get_ref().balance), first_balance);
    assert_eq!(upstream.state.executions_of("acct"), 6, "not run again");
    sidecar.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rule_can_observe_one_method_and_its_refusals_become_plain_calls() {
    let upstream = ledger::start().await;
    let sidecar = support::start_sidecar_with_apply_rule(
        upstream.addr,
        "mode = \"observe\"\nrequire-key = true",
    )
    .await;
    let mut ledger_client = client(sidecar.addr).await;
    // A key the sidecar would refuse as malformed, and a call without the key the rule
    // requires: both reach the service unchanged.
    apply(&mut ledger_client, add("bad", 1), Some("bad key"), None)
        .await
        .expect("an invalid key is not refused in observe mode");
    apply(&mut ledger_client, add("none", 1), None, None)
        .await
        .expect("a missing key is not refused in observe mode");
    assert_eq!(upstream.state.executions(), 2);
    sidecar.running.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_the_store_down_observed_calls_still_pass() {
    let upstream = ledger::start().await;
    let mut redis = support::redis::RedisServer::start();
    let url = redis.url();
    let sidecar = support::start_sidecar(upstream.addr, |args| {
        args.store = StoreKind::Redis;
        args.redis_url = Some(url);
        args.mode = ModeSetting::Observe;
        args.store_timeout = std::time::Duration::from_millis(500);
    })
    .await;
    let mut ledger_client = client(sidecar.addr).await;
    apply(&mut ledger_client, add("acct", 1), Some("k-1"), None)
        .await
        .expect("served while the store is up");
    redis.kill();
    for n in 2..=4 {
        let key = format!("k-{n}");
        let reply = apply(&mut ledger_client, add("acct", 1), Some(&key), None)
            .await
            .expect("a failing store never changes an answer in observe mode");
        assert_eq!(reply.get_ref().execution, n);
    }
    apply(&mut ledger_client, add("acct", 1), Some("k-1"), None)
        .await
        .expect("a duplicate passes too");
    assert_eq!(upstream.state.executions_of("acct"), 5);
    let (_, metrics) = get(sidecar.running.ops_addr, "/metrics").await;
    assert!(
        metric(
            &metrics,
            "idemproxy_requests_total",
            &[("idemproxy_decision", "store_error")]
        )
        .unwrap_or(0.0)
            >= 4.0,
        "the store's failures are counted:\n{metrics}"
    );
    sidecar.running.stop().await;
}
