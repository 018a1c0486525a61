//! In-doubt probes (issue 34): an unknown outcome looked up in the service itself, through
//! the real sidecar in front of the example payments service, whose Charge declares
//! `in_doubt_probe { method: "GetCharge" }` and whose GetCharge looks a charge up by serial.
//! The service acts and then breaks its answer, or breaks before acting, or its lookup is
//! down; a retry gets the real outcome, and the service charges once.

// Helpers of tests: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used)]

mod support;

use idemproxy::pb::idemproxy::example::v1::payments_client::PaymentsClient;
use idemproxy::pb::idemproxy::example::v1::ChargeRequest;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::time::Duration;
use support::{payments, reason, start_sidecar, Sidecar};
use tonic::transport::Channel;

/// The lease of a call that sends no deadline, and its margin: short, so that a probe (which
/// waits for the original call's lease to end) goes soon.
const LEASE: Duration = Duration::from_millis(300);

async fn sidecar_for(upstream: SocketAddr, files: &tempfile::TempDir) -> Sidecar {
    let set = files.path().join("payments.binpb");
    std::fs::write(&set, idemproxy::pb::EXAMPLE_DESCRIPTOR_SET).unwrap();
    start_sidecar(upstream, |args| {
        args.descriptor_set = vec![set];
        args.default_lease = LEASE;
        args.lease_margin = Duration::from_millis(50);
    })
    .await
}

async fn client(addr: SocketAddr) -> PaymentsClient<Channel> {
    let channel = Channel::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    PaymentsClient::new(channel)
}

/// A charge of `serial` as `alice` (`payments::charge`).
fn charge(serial: &str, behaviour: &str) -> tonic::Request<ChargeRequest> {
    payments::charge(serial, "alice", behaviour)
}

fn header<T>(response: &tonic::Response<T>, name: &str) -> Option<String> {
    let value = response.metadata().get(name)?;
    Some(value.to_str().unwrap().to_owned())
}

#[tokio::test]
async fn a_charge_whose_answer_broke_is_found_by_the_probe_and_replayed() {
    let service = payments::start().await;
    let files = tempfile::tempdir().unwrap();
    let sidecar = sidecar_for(service.addr, &files).await;
    let mut client = client(sidecar.addr).await;
    let broken = client.charge(charge("pay-p1", "fail-after-charge")).await;
    assert_eq!(broken.unwrap_err().code(), tonic::Code::Internal);
    tokio::time::sleep(LEASE * 2).await;
    let retry = client
        .charge(charge("pay-p1", "ok"))
        .await
        .expect("the retry gets the charge the probe found");
    assert_eq!(retry.get_ref().charge_id, "ch-pay-p1-1");
    assert_eq!(
        header(&retry, "idempotency-replayed").as_deref(),
        Some("true")
    );
    assert_eq!(
        header(&retry, "idempotency-resolved-by").as_deref(),
        Some("probe")
    );
    let again = client.charge(charge("pay-p1", "ok")).await.unwrap();
    assert_eq!(again.get_ref(), retry.get_ref(), "recorded, replayed alike");
    assert_eq!(service.executions.charges(), 1, "charged once");
    let callers = service.executions.probe_callers.lock().unwrap().clone();
    assert_eq!(
        callers,
        vec!["alice".to_owned()],
        "one probe, as the caller"
    );
    // Operators see which outcome a probe recorded.
    let admin = sidecar.running.admin_addr.to_string();
    // Off the runtime: the sidecar answering it runs on this test's one thread.
    let (code, out, err) = tokio::task::spawn_blocking(move || {
        support::binary::keys(
            &admin,
            &[
                "get",
                "--method",
                "/idemproxy.example.v1.Payments/Charge",
                "--caller",
                "alice",
                "--serial",
                "pay-p1",
                "--json",
            ],
        )
    })
    .await
    .unwrap();
    assert_eq!(code, 0, "{out}{err}");
    let view = support::binary::json(&out);
    assert_eq!(view["state"], "COMPLETED");
    assert_eq!(view["resolved_by"], "probe");
    assert_eq!(view["probes"], 1);
}

/// A retry that comes at once, while the broken call's lease still runs (the service may yet
/// act on it), waits for the lease to end within its own wait, then asks: it gets the charge,
/// not IDEMPOTENCY_OUTCOME_UNKNOWN.
#[tokio::test]
async fn a_retry_before_the_lease_ends_waits_for_it_and_gets_the_probe_answer() {
    let service = payments::start().await;
    let files = tempfile::tempdir().unwrap();
    let sidecar = sidecar_for(service.addr, &files).await;
    let mut client = client(sidecar.addr).await;
    let broken = client.charge(charge("pay-p5", "fail-after-charge")).await;
    assert_eq!(broken.unwrap_err().code(), tonic::Code::Internal);
    let started = std::time::Instant::now();
    let retry = client
        .charge(charge("pay-p5", "ok"))
        .await
        .expect("the retry waits for the lease and gets the charge the probe found");
    assert_eq!(retry.get_ref().charge_id, "ch-pay-p5-1");
    assert_eq!(
        header(&retry, "idempotency-resolved-by").as_deref(),
        Some("probe")
    );
    assert!(started.elapsed() < LEASE * 4, "{:?}", started.elapsed());
    assert_eq!(service.executions.charges(), 1, "charged once");
    assert_eq!(service.executions.lookups(), 1, "asked once");
    // A retry whose own deadline ends before the lease does is answered at once.
    let mut again = charge("pay-p6", "fail-after-charge");
    again.set_timeout(Duration::from_secs(5));
    let _ = client.charge(again).await;
    let mut hurried = charge("pay-p6", "ok");
    hurried.set_timeout(LEASE / 10);
    let refused = client.charge(hurried).await.unwrap_err();
    assert_eq!(reason(&refused), "IDEMPOTENCY_OUTCOME_UNKNOWN");
}

#[tokio::test]
async fn a_charge_never_made_is_not_found_released_and_runs_once_on_retry() {
    let service = payments::start().await;
    let files = tempfile::tempdir().unwrap();
    let sidecar = sidecar_for(service.addr, &files).await;
    let mut client = client(sidecar.addr).await;
    let broken = client.charge(charge("pay-p2", "fail-before-charge")).await;
    assert_eq!(broken.unwrap_err().code(), tonic::Code::Internal);
    assert_eq!(service.executions.charges(), 0);
    tokio::time::sleep(LEASE * 2).await;
    let retry = client
        .charge(charge("pay-p2", "ok"))
        .await
        .expect("the key was released and the retry ran");
    assert_eq!(header(&retry, "idempotency-replayed"), None);
    assert_eq!(service.executions.charges(), 1, "executed once");
}

/// A charge made, its answer broken, while the lookup is down: returns the first probe's
/// `Failed`.
async fn broken_while_lookups_fail(
    service: &payments::PaymentsHandle,
    client: &mut PaymentsClient<Channel>,
    serial: &str,
) {
    service
        .executions
        .lookups_unavailable
        .store(true, Ordering::SeqCst);
    let broken = client.charge(charge(serial, "fail-after-charge")).await;
    assert_eq!(broken.unwrap_err().code(), tonic::Code::Internal);
    tokio::time::sleep(LEASE * 2).await;
    let unknown = client.charge(charge(serial, "ok")).await.unwrap_err();
    assert_eq!(reason(&unknown), "IDEMPOTENCY_OUTCOME_UNKNOWN");
    assert_eq!(service.executions.lookups(), 1, "the duplicate asked once");
    service
        .executions
        .lookups_unavailable
        .store(false, Ordering::SeqCst);
}

#[tokio::test]
async fn a_lookup_that_fails_leaves_the_outcome_unknown_and_a_later_retry_asks_again() {
    let service = payments::start().await;
    let files = tempfile::tempdir().unwrap();
    let sidecar = sidecar_for(service.addr, &files).await;
    let mut client = client(sidecar.addr).await;
    broken_while_lookups_fail(&service, &mut client, "pay-p3").await;
    // Within the backoff (1 s after one failed probe) a retry is refused without a probe;
    // after it, the retry's probe finds the charge.
    let mut answered = None;
    for _ in 0..60 {
        match client.charge(charge("pay-p3", "ok")).await {
            Ok(response) => {
                answered = Some(response);
                break;
            }
            Err(status) => {
                assert_eq!(reason(&status), "IDEMPOTENCY_OUTCOME_UNKNOWN");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
    let answered = answered.expect("a later probe recorded the outcome");
    assert_eq!(answered.get_ref().charge_id, "ch-pay-p3-1");
    assert_eq!(service.executions.charges(), 1, "charged once");
}

#[tokio::test]
async fn the_walk_asks_again_without_a_retry() {
    let service = payments::start().await;
    let files = tempfile::tempdir().unwrap();
    let sidecar = sidecar_for(service.addr, &files).await;
    let mut client = client(sidecar.addr).await;
    broken_while_lookups_fail(&service, &mut client, "pay-p4").await;
    support::eventually(Duration::from_secs(10), "the walk's probe", || {
        let executions = service.executions.clone();
        async move { executions.probe_callers.lock().unwrap().len() >= 2 }
    })
    .await;
    support::eventually(Duration::from_secs(5), "the recorded outcome", || {
        let mut client = client.clone();
        async move { client.charge(charge("pay-p4", "ok")).await.is_ok() }
    })
    .await;
    assert_eq!(service.executions.charges(), 1, "charged once");
    assert_eq!(service.executions.lookups(), 2, "the walk asked once more");
}

/// Probing that never gets an answer gives up at the rule's `give_up_after`, once: the
/// record then waits for an operator, `keys ls --waiting-for operator` lists it, and no
/// probe goes any more.
#[tokio::test]
async fn probing_gives_up_once_and_the_record_waits_for_an_operator() {
    let service = payments::start().await;
    let files = tempfile::tempdir().unwrap();
    let set = files.path().join("payments.binpb");
    std::fs::write(&set, idemproxy::pb::EXAMPLE_DESCRIPTOR_SET).unwrap();
    let rule = "[methods.\"/idemproxy.example.v1.Payments/Charge\"]\nin-doubt-probe = \"GetCharge\"\nin-doubt-probe-after = \"100ms\"\nin-doubt-probe-give-up-after = \"1500ms\"\n";
    let (_, methods) = idemproxy::config::parse_file(rule).unwrap();
    let sidecar = start_sidecar(service.addr, |args| {
        args.descriptor_set = vec![set];
        args.default_lease = LEASE;
        args.lease_margin = Duration::from_millis(50);
        args.sweep_interval = Duration::from_millis(50);
        args.methods = methods;
    })
    .await;
    let mut client = client(sidecar.addr).await;
    broken_while_lookups_fail(&service, &mut client, "pay-g1").await;
    service
        .executions
        .lookups_unavailable
        .store(true, Ordering::SeqCst);
    let admin = sidecar.running.admin_addr.to_string();
    let waiting = |what: &'static str| {
        let admin = admin.clone();
        async move {
            // Off the runtime: the sidecar answering it runs on this test's one thread.
            tokio::task::spawn_blocking(move || {
                support::binary::keys(&admin, &["ls", "--waiting-for", what, "--json"])
            })
            .await
            .unwrap()
        }
    };
    let (code, out, err) = waiting("probe").await;
    assert_eq!(code, 0, "{out}{err}");
    assert_eq!(
        support::binary::json(&out)["records"]
            .as_array()
            .unwrap()
            .len(),
        1
    );
    support::eventually(Duration::from_secs(10), "probing to give up", || {
        let waiting = waiting("operator");
        async move {
            let (_, out, _) = waiting.await;
            support::binary::json(&out)["records"]
                .as_array()
                .is_some_and(|records| records.len() == 1)
        }
    })
    .await;
    let asked = service.executions.lookups();
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    assert_eq!(
        service.executions.lookups(),
        asked,
        "no probe after giving up"
    );
    let refused = client.charge(charge("pay-g1", "ok")).await.unwrap_err();
    assert_eq!(reason(&refused), "IDEMPOTENCY_OUTCOME_UNKNOWN");
    assert_eq!(service.executions.lookups(), asked, "nor for a duplicate");
    let (code, out, err) = waiting("sometime").await;
    assert_ne!(code, 0, "a typo is refused, not an empty list: {out}");
    assert!(err.contains("probe, operator"), "{err}");
}

/// A sidecar SIGKILLed while a charge runs: at the restart the record is IN_DOUBT (its
/// process ended), and the walk's probe finds the charge, so the retry gets it.
#[tokio::test]
async fn a_call_cut_by_a_crash_is_resolved_by_a_probe_after_the_restart() {
    if support::test_store() != "sled" {
        return; // The binary runs on its own data dir; the shared stores run the tests above.
    }
    let service = payments::start().await;
    let dir = tempfile::tempdir().unwrap();
    let set = dir.path().join("payments.binpb");
    std::fs::write(&set, idemproxy::pb::EXAMPLE_DESCRIPTOR_SET).unwrap();
    let data = dir.path().join("data");
    let extra = [
        "--descriptor-set",
        set.to_str().unwrap(),
        "--default-lease",
        "1s",
        "--sweep-interval",
        "50ms",
        "--admin-listen",
        "127.0.0.1:0",
        "--ops-listen",
        "127.0.0.1:0",
    ];
    let args = support::binary::run_args(service.addr, &data, &extra);
    let sidecar = support::binary::start(&args).await;
    let mut first = client(sidecar.addr).await;
    let running =
        tokio::spawn(async move { first.charge(charge("pay-k1", "hang-after-charge")).await });
    support::eventually(Duration::from_secs(10), "the charge", || {
        let executions = service.executions.clone();
        async move { executions.charges() == 1 }
    })
    .await;
    sidecar.kill().await;
    assert!(
        running.await.unwrap().is_err(),
        "the caller lost its answer"
    );
    let restarted = support::binary::start(&args).await;
    let retry = client(restarted.addr).await;
    // Its lease (6 s) ends, then a retry or the walk asks. A probe whose duplicate stopped
    // waiting must still settle the record, not hold it for its own 15 s lease.
    support::eventually(Duration::from_secs(13), "the probe's answer", || {
        let mut retry = retry.clone();
        async move { retry.charge(charge("pay-k1", "ok")).await.is_ok() }
    })
    .await;
    let answer = retry.clone().charge(charge("pay-k1", "ok")).await.unwrap();
    assert_eq!(answer.get_ref().charge_id, "ch-pay-k1-1");
    assert_eq!(
        header(&answer, "idempotency-resolved-by").as_deref(),
        Some("probe")
    );
    assert_eq!(service.executions.charges(), 1, "charged once");
}

/// Two sidecars sharing one Redis (two replicas of the service): both walks find the unknown
/// outcome, one probe goes (a probe takes the record with its own token and lease).
#[tokio::test]
async fn two_sidecars_on_one_redis_send_one_probe() {
    if support::test_store() != "sled" {
        return; // Runs its own Redis once, whatever the suite's store.
    }
    let redis = support::redis::RedisServer::start();
    let service = payments::start().await;
    let files = tempfile::tempdir().unwrap();
    let set = files.path().join("payments.binpb");
    std::fs::write(&set, idemproxy::pb::EXAMPLE_DESCRIPTOR_SET).unwrap();
    let on_redis = |args: &mut idemproxy::config::RunSettings| {
        args.store = idemproxy::config::StoreKind::Redis;
        args.redis_url = Some(redis.url());
        args.descriptor_set = vec![set.clone()];
        args.default_lease = LEASE;
        args.lease_margin = Duration::from_millis(50);
    };
    let one = start_sidecar(service.addr, on_redis).await;
    let other = start_sidecar(service.addr, on_redis).await;
    let mut client_one = client(one.addr).await;
    let broken = client_one
        .charge(charge("pay-r1", "fail-after-charge"))
        .await;
    assert_eq!(broken.unwrap_err().code(), tonic::Code::Internal);
    // No retry: the walks of both find it (a second after the lease).
    support::eventually(Duration::from_secs(10), "a probe", || {
        let executions = service.executions.clone();
        async move { executions.lookups() >= 1 }
    })
    .await;
    let mut client_other = client(other.addr).await;
    support::eventually(Duration::from_secs(5), "the recorded outcome", || {
        let mut client = client_other.clone();
        async move { client.charge(charge("pay-r1", "ok")).await.is_ok() }
    })
    .await;
    let answer = client_other.charge(charge("pay-r1", "ok")).await.unwrap();
    assert_eq!(answer.get_ref().charge_id, "ch-pay-r1-1");
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        service.executions.lookups(),
        1,
        "one probe for two sidecars"
    );
    assert_eq!(service.executions.charges(), 1);
}

/// `check` refuses a probe it could not send: one that does not exist, streams, answers
/// another type, or has no field for the serial (each named with the method).
#[test]
fn a_probe_that_cannot_be_sent_is_refused_at_start() {
    use idemproxy::engine::{CallPolicy, Limits};
    use idemproxy::policy::PolicyTable;
    let pool =
        prost_reflect::DescriptorPool::decode(idemproxy::pb::EXAMPLE_DESCRIPTOR_SET).unwrap();
    let defaults = CallPolicy::from_limits(&Limits::default());
    let cases = [
        ("in-doubt-probe = \"Nope\"", "is not a method of"),
        ("in-doubt-probe = \"Payout\"", "streams"),
        (
            "in-doubt-probe = \"GetBalance\"",
            "answers idemproxy.example.v1.BalanceReply",
        ),
        (
            "in-doubt-probe = \"GetCharge\"\nin-doubt-probe-key = \"card\"",
            "has no field \"card\"",
        ),
        (
            "in-doubt-probe = \"Refund\"",
            "answers idemproxy.example.v1.RefundReply",
        ),
    ];
    for (rule, expected) in cases {
        let text = format!("[methods.\"/idemproxy.example.v1.Payments/Charge\"]\n{rule}\n");
        let (_, methods) = idemproxy::config::parse_file(&text).unwrap();
        let overrides = idemproxy::policy::rules::method_rules(methods).unwrap();
        let errors = PolicyTable::resolve(&pool, defaults.clone(), &overrides).unwrap_err();
        let said: Vec<String> = errors.iter().map(ToString::to_string).collect();
        assert!(
            said.iter().any(
                |e| e.contains("/idemproxy.example.v1.Payments/Charge") && e.contains(expected)
            ),
            "{rule}: {said:?}"
        );
    }
    // The example's own probe resolves, and check shows it.
    let table = PolicyTable::resolve(&pool, defaults, &Default::default()).unwrap();
    let shown = table.render();
    assert!(
        shown.contains("probe of /idemproxy.example.v1.Payments/Charge: /idemproxy.example.v1.Payments/GetCharge (serial in serial)"),
        "{shown}"
    );
}
