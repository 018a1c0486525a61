//! In-doubt probes (issue 34): an unknown outcome looked up in the service itself, through
//! the real sidecar in front of the example payments service, whose Charge declares
//! `in_doubt_probe { method: "GetCharge" }` and whose GetCharge looks a charge up by serial.
//! The service acts and then breaks its answer, or breaks before acting, or its lookup is
//! down; a retry gets the real outcome, and the service charges once.

// Helpers of tests: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used)]

mod support;

use idemproxy::pb::idemproxy::example::v1::payments_client::PaymentsClient;
use idemproxy::pb::idemproxy::example::v1::{ChargeRequest, Payment};
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

/// A charge of `serial` as `alice`; `behaviour` is the service's trace id
/// (`fail-after-charge`, `fail-before-charge`, or anything: charge and answer), which the
/// fingerprint leaves out, so a retry may carry another.
fn charge(serial: &str, behaviour: &str) -> tonic::Request<ChargeRequest> {
    let mut request = tonic::Request::new(ChargeRequest {
        payment: Some(Payment {
            serial: serial.into(),
            card: "4242".into(),
        }),
        amount_cents: 500,
        client_timestamp: String::new(),
        trace_id: behaviour.into(),
        labels: Default::default(),
    });
    request
        .metadata_mut()
        .insert("x-caller-id", "alice".parse().unwrap());
    request
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

#[tokio::test]
async fn a_lookup_that_fails_leaves_the_outcome_unknown_and_is_asked_again() {
    let service = payments::start().await;
    let files = tempfile::tempdir().unwrap();
    let sidecar = sidecar_for(service.addr, &files).await;
    let mut client = client(sidecar.addr).await;
    service
        .executions
        .lookups_unavailable
        .store(true, Ordering::SeqCst);
    let broken = client.charge(charge("pay-p3", "fail-after-charge")).await;
    assert_eq!(broken.unwrap_err().code(), tonic::Code::Internal);
    tokio::time::sleep(LEASE * 2).await;
    let unknown = client.charge(charge("pay-p3", "ok")).await.unwrap_err();
    assert_eq!(reason(&unknown), "IDEMPOTENCY_OUTCOME_UNKNOWN");
    assert!(service.executions.lookups() >= 1, "the duplicate asked");
    service
        .executions
        .lookups_unavailable
        .store(false, Ordering::SeqCst);
    // The background walk asks again after the backoff, without a retry to ask it.
    support::eventually(Duration::from_secs(10), "a probe found the charge", || {
        let executions = service.executions.clone();
        async move { executions.probe_callers.lock().unwrap().len() >= 2 }
    })
    .await;
    let mut answered = None;
    for _ in 0..100 {
        match client.charge(charge("pay-p3", "ok")).await {
            Ok(response) => {
                answered = Some(response);
                break;
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
    let answered = answered.expect("the walk's probe recorded the outcome");
    assert_eq!(answered.get_ref().charge_id, "ch-pay-p3-1");
    assert_eq!(service.executions.charges(), 1, "charged once");
}
