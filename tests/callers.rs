//! Who calls: under each caller source (a header, XFCC from the pod's own proxy, none), two
//! callers with the same serial never see each other's responses; a caller that cannot be
//! trusted, or is named twice, is refused, never guessed.

// A failed unwrap is a failed test.
#![allow(clippy::unwrap_used)]

mod support;

use std::net::SocketAddr;

use idemproxy::caller::CallerSource;
use std::net::IpAddr;
use support::{add, apply, call_with, client, ledger, reason, start_sidecar};

const ALICE: &str = "spiffe://cluster.local/ns/billing/sa/alice";
const BOB: &str = "spiffe://cluster.local/ns/billing/sa/bob";

#[tokio::test]
async fn under_the_caller_header_two_callers_with_one_serial_stay_apart() {
    let upstream = ledger::start().await;
    let sidecar = start_sidecar(upstream.addr, |args| args.require_caller = true).await;
    let mut client = client(sidecar.addr).await;
    let alice = apply(&mut client, add("a", 1), Some("same"), Some("alice"))
        .await
        .unwrap();
    let bob = apply(&mut client, add("b", 1), Some("same"), Some("bob"))
        .await
        .unwrap();
    assert_eq!(upstream.state.executions(), 2, "one execution per caller");
    for _ in 0..2 {
        let again = apply(&mut client, add("a", 1), Some("same"), Some("alice"))
            .await
            .unwrap();
        assert_eq!(again.get_ref(), alice.get_ref());
        let again = apply(&mut client, add("b", 1), Some("same"), Some("bob"))
            .await
            .unwrap();
        assert_eq!(again.get_ref(), bob.get_ref());
    }
    let missing = apply(&mut client, add("c", 1), Some("same"), None)
        .await
        .unwrap_err();
    assert_eq!(missing.code(), tonic::Code::Unauthenticated);
    assert_eq!(reason(&missing), "IDEMPOTENCY_CALLER_MISSING");
    assert_eq!(upstream.state.executions(), 2);
}

#[tokio::test]
async fn under_xfcc_the_nearest_uri_names_the_caller_and_the_caller_header_is_ignored() {
    let upstream = ledger::start().await;
    let sidecar = start_sidecar(upstream.addr, |args| {
        args.caller_source = Some(CallerSource::parse("xfcc").unwrap());
        args.require_caller = true;
    })
    .await;
    let mut client = client(sidecar.addr).await;
    let xfcc_of =
        |uri: &str| format!("By=spiffe://cluster.local/ns/pay/sa/api;Hash=0a1b;URI={uri}");
    let alice_xfcc = xfcc_of(ALICE);
    let bob_xfcc = xfcc_of(BOB);
    let alice = [("x-forwarded-client-cert", alice_xfcc.as_str())];
    // Bob claims to be Alice in the caller header: ignored under xfcc.
    let bob = [
        ("x-forwarded-client-cert", bob_xfcc.as_str()),
        ("x-caller-id", ALICE),
    ];
    let first = call_with(&mut client, "a", "same", &alice).await.unwrap();
    let second = call_with(&mut client, "b", "same", &bob).await.unwrap();
    assert_eq!(upstream.state.executions(), 2);
    assert_ne!(first.get_ref(), second.get_ref());
    let replay = call_with(&mut client, "a", "same", &alice).await.unwrap();
    assert_eq!(replay.get_ref(), first.get_ref());
    // A proxy in front appended its own element: the nearest (last) one is the caller.
    let chained = format!("URI=spiffe://edge/gateway,{alice_xfcc}");
    let replay = call_with(
        &mut client,
        "a",
        "same",
        &[("x-forwarded-client-cert", &chained)],
    )
    .await
    .unwrap();
    assert_eq!(replay.get_ref(), first.get_ref());
    for malformed in [
        format!("URI={ALICE};URI={BOB}"),
        format!("Subject=\"unterminated;URI={ALICE}"),
        format!("URI={ALICE},"),
    ] {
        let refused = call_with(
            &mut client,
            "a",
            "same",
            &[("x-forwarded-client-cert", &malformed)],
        )
        .await
        .unwrap_err();
        assert_eq!(refused.code(), tonic::Code::Unauthenticated, "{malformed}");
        assert_eq!(reason(&refused), "IDEMPOTENCY_CALLER_INVALID");
    }
    assert_eq!(upstream.state.executions(), 2);
}

/// An address of this machine that is not loopback, so a connection to it comes from a
/// non-loopback peer.
fn outside_address() -> IpAddr {
    for target in ["192.0.2.1:9", "10.0.0.1:9", "192.168.0.1:9", "8.8.8.8:53"] {
        let socket = std::net::UdpSocket::bind("0.0.0.0:0").unwrap();
        if socket.connect(target).is_ok() {
            let ip = socket.local_addr().unwrap().ip();
            if !ip.is_loopback() && !ip.is_unspecified() {
                return ip;
            }
        }
    }
    panic!("this machine has no non-loopback address to test a forged header from")
}

#[tokio::test]
async fn xfcc_from_a_peer_outside_the_pod_is_refused_however_well_formed() {
    let upstream = ledger::start().await;
    let sidecar = start_sidecar(upstream.addr, |args| {
        args.caller_source = Some(CallerSource::parse("xfcc").unwrap());
        args.listen = "0.0.0.0:0".parse().unwrap();
    })
    .await;
    let outside = SocketAddr::new(outside_address(), sidecar.addr.port());
    let mut forger = client(outside).await;
    let forged = format!("URI={ALICE}");
    for xfcc in [forged.as_str(), "URI=a,URI=b", "garbage"] {
        let refused = call_with(&mut forger, "a", "k", &[("x-forwarded-client-cert", xfcc)])
            .await
            .unwrap_err();
        assert_eq!(refused.code(), tonic::Code::Unauthenticated);
        assert_eq!(reason(&refused), "IDEMPOTENCY_CALLER_INVALID");
        assert!(
            refused.message().contains("loopback"),
            "{}",
            refused.message()
        );
    }
    assert_eq!(
        upstream.state.executions(),
        0,
        "nothing forged reached the service"
    );
    // The same header from the pod's own proxy (loopback) is taken.
    let loopback = SocketAddr::new([127, 0, 0, 1].into(), sidecar.addr.port());
    let mut mesh = client(loopback).await;
    call_with(&mut mesh, "a", "k", &[("x-forwarded-client-cert", &forged)])
        .await
        .unwrap();
    assert_eq!(upstream.state.executions(), 1);
}

#[tokio::test]
async fn caller_source_none_files_every_call_under_one_caller() {
    let upstream = ledger::start().await;
    let sidecar = start_sidecar(upstream.addr, |args| {
        args.caller_source = Some(CallerSource::parse("none").unwrap())
    })
    .await;
    let mut client = client(sidecar.addr).await;
    let first = apply(&mut client, add("a", 1), Some("one"), Some("alice"))
        .await
        .unwrap();
    let second = apply(&mut client, add("a", 1), Some("one"), Some("bob"))
        .await
        .unwrap();
    assert!(
        support::was_replayed(&second),
        "one tenant: the header names nobody"
    );
    assert_eq!(first.get_ref(), second.get_ref());
    assert_eq!(upstream.state.executions(), 1);
}

/// Issue 31, item 4: `x-caller-id: alice` sent by the client and `x-caller-id: mallory`
/// appended by a gateway were keyed as alice, so mallory could be answered with alice's
/// recorded outcome. Two caller headers, or two key headers, are refused; nothing runs.
#[tokio::test]
async fn a_second_caller_or_key_header_is_refused_not_one_picked() {
    let upstream = ledger::start().await;
    let sidecar = start_sidecar(upstream.addr, |_| {}).await;
    let mut client = client(sidecar.addr).await;
    apply(&mut client, add("alice", 5), Some("pay-1"), Some("alice"))
        .await
        .unwrap();
    let mut twice = tonic::Request::new(add("alice", 5));
    let metadata = twice.metadata_mut();
    metadata.insert("idempotency-key", "pay-1".parse().unwrap());
    metadata.append("x-caller-id", "alice".parse().unwrap());
    metadata.append("x-caller-id", "mallory".parse().unwrap());
    let refused = client.apply(twice).await.unwrap_err();
    assert_eq!(refused.code(), tonic::Code::Unauthenticated);
    assert_eq!(reason(&refused), "IDEMPOTENCY_CALLER_INVALID");
    let mut two_keys = tonic::Request::new(add("alice", 5));
    let metadata = two_keys.metadata_mut();
    metadata.append("idempotency-key", "pay-1".parse().unwrap());
    metadata.append("idempotency-key", "pay-2".parse().unwrap());
    metadata.insert("x-caller-id", "alice".parse().unwrap());
    let refused = client.apply(two_keys).await.unwrap_err();
    assert_eq!(refused.code(), tonic::Code::InvalidArgument);
    assert_eq!(reason(&refused), "IDEMPOTENCY_KEY_INVALID");
    assert_eq!(upstream.state.executions(), 1, "only the first call ran");
}
