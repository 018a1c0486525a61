//! The per-caller cap (`--max-records-per-caller`): one caller cannot fill the store and
//! push out the others' outcomes.

// A failed unwrap is a failed test.
#![allow(clippy::unwrap_used)]

mod support;

use std::time::Duration;
use support::{add, apply, client, ledger, reason, start_sidecar};

#[tokio::test]
async fn the_per_caller_cap_refuses_only_that_callers_new_keys() {
    let upstream = ledger::start().await;
    let sidecar = start_sidecar(upstream.addr, |args| {
        args.max_records_per_caller = Some(3);
        args.retention = Duration::from_secs(2);
    })
    .await;
    let mut client = client(sidecar.addr).await;
    // A released outcome (PERMISSION_DENIED: the service did not act) leaves no record.
    let denied = idemproxy::pb::idemproxy::testing::v1::ApplyRequest {
        fail_code: 7,
        ..add("a", 1)
    };
    let released = apply(&mut client, denied, Some("denied"), Some("alice")).await;
    assert_eq!(released.unwrap_err().code(), tonic::Code::PermissionDenied);
    for n in 0..3 {
        apply(
            &mut client,
            add("a", 1),
            Some(&format!("k{n}")),
            Some("alice"),
        )
        .await
        .unwrap();
    }
    let refused = apply(&mut client, add("a", 1), Some("k3"), Some("alice"))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), tonic::Code::ResourceExhausted);
    assert_eq!(reason(&refused), "IDEMPOTENCY_CALLER_QUOTA");
    // Its recorded keys still replay, and another caller is unaffected.
    let replay = apply(&mut client, add("a", 1), Some("k0"), Some("alice"))
        .await
        .unwrap();
    assert!(support::was_replayed(&replay));
    apply(&mut client, add("b", 1), Some("k3"), Some("bob"))
        .await
        .unwrap();
    assert_eq!(
        upstream.state.executions(),
        5,
        "denied, k0..k2 of alice, k3 of bob"
    );
    // Once its records expire, the caller may record new keys again.
    support::eventually(Duration::from_secs(10), "alice's records to expire", || {
        let mut client = client.clone();
        async move {
            apply(&mut client, add("a", 1), Some("k3"), Some("alice"))
                .await
                .is_ok()
        }
    })
    .await;
    assert_eq!(upstream.state.executions(), 6);
}
