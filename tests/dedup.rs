//! Header-keyed dedup of unary calls through the real sidecar, on a real sled directory, in
//! front of a real tonic upstream that counts executions.

mod support;

use support::failover::copying_relay;
use support::{add, apply, client, ledger, reason, start_sidecar, was_replayed};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_key_executes_once_however_often_it_arrives() {
    let upstream = ledger::start().await;
    let sidecar = start_sidecar(upstream.addr, |_| {}).await;
    let keys = 50;
    let mut tasks = Vec::new();
    for n in 0..keys {
        let mut client = client(sidecar.addr).await;
        tasks.push(tokio::spawn(async move {
            let key = format!("order-{n}");
            let account = format!("acct-{n}");
            // Three copies at once (a hedged call), then a late redelivery.
            let concurrent = (0..3).map(|_| {
                let (mut c, key, account) = (client.clone(), key.clone(), account.clone());
                tokio::spawn(async move { apply(&mut c, add(&account, 5), Some(&key), None).await })
            });
            let mut replies = Vec::new();
            for copy in concurrent.collect::<Vec<_>>() {
                replies.push(copy.await.unwrap().expect("every copy gets the answer"));
            }
            let late = apply(&mut client, add(&account, 5), Some(&key), None)
                .await
                .expect("the late copy gets the answer");
            assert!(was_replayed(&late), "the late copy is a replay");
            replies.push(late);
            let first = replies[0].get_ref().clone();
            for reply in &replies {
                assert_eq!(reply.get_ref(), &first, "every copy sees the one execution");
            }
            assert_eq!(replies.iter().filter(|r| !was_replayed(r)).count(), 1);
        }));
    }
    for task in tasks {
        task.await.expect("no copy failed");
    }
    assert_eq!(upstream.state.executions(), keys);
    assert!(upstream.state.executed_twice().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hundred_concurrent_identical_calls_execute_once() {
    let upstream = ledger::start().await;
    let sidecar = start_sidecar(upstream.addr, |_| {}).await;
    let client = client(sidecar.addr).await;
    let copies: Vec<_> = (0..200)
        .map(|_| {
            let mut client = client.clone();
            tokio::spawn(async move {
                let mut slow = add("hot", 1);
                slow.delay_ms = 100;
                apply(&mut client, slow, Some("the-one-key"), None).await
            })
        })
        .collect();
    let mut executions = std::collections::HashSet::new();
    for copy in copies {
        let reply = copy.await.unwrap().expect("every copy is answered");
        executions.insert(reply.get_ref().execution);
    }
    assert_eq!(upstream.state.executions(), 1);
    assert_eq!(executions.len(), 1, "all 200 saw the same execution");
}

#[tokio::test]
async fn another_payload_under_the_same_key_is_refused() {
    let upstream = ledger::start().await;
    let sidecar = start_sidecar(upstream.addr, |_| {}).await;
    let mut client = client(sidecar.addr).await;
    apply(&mut client, add("a", 10), Some("k1"), None)
        .await
        .expect("first");
    let reused = apply(&mut client, add("a", 999), Some("k1"), None)
        .await
        .expect_err("another payload is refused");
    assert_eq!(reused.code(), tonic::Code::FailedPrecondition);
    assert_eq!(reason(&reused), "IDEMPOTENCY_KEY_REUSED");
    let info = support::error_info(&reused).expect("ErrorInfo");
    assert_eq!(info.domain, "idemproxy");
    assert_eq!(info.metadata["key_hash"].len(), 64);
    assert_eq!(upstream.state.executions(), 1);
}

#[tokio::test]
async fn callers_never_share_a_record() {
    let upstream = ledger::start().await;
    let sidecar = start_sidecar(upstream.addr, |_| {}).await;
    let mut client = client(sidecar.addr).await;
    let alice = apply(
        &mut client,
        add("shared", 1),
        Some("serial-1"),
        Some("alice"),
    )
    .await
    .unwrap();
    let bob = apply(&mut client, add("shared", 1), Some("serial-1"), Some("bob"))
        .await
        .unwrap();
    assert!(!was_replayed(&bob), "bob must never get alice's response");
    assert_ne!(alice.get_ref().execution, bob.get_ref().execution);
    let anonymous = apply(&mut client, add("shared", 1), Some("serial-1"), None)
        .await
        .unwrap();
    assert!(!was_replayed(&anonymous));
    assert_eq!(upstream.state.executions(), 3);
    let alice_again = apply(
        &mut client,
        add("shared", 1),
        Some("serial-1"),
        Some("alice"),
    )
    .await
    .unwrap();
    assert!(was_replayed(&alice_again));
    assert_eq!(alice_again.get_ref(), alice.get_ref());
}

#[tokio::test]
async fn calls_without_a_key_pass_through_every_time() {
    let upstream = ledger::start().await;
    let sidecar = start_sidecar(upstream.addr, |_| {}).await;
    let mut client = client(sidecar.addr).await;
    for _ in 0..3 {
        let reply = apply(&mut client, add("free", 1), None, None)
            .await
            .unwrap();
        assert!(!was_replayed(&reply));
    }
    assert_eq!(upstream.state.executions(), 3);
}

#[tokio::test]
async fn malformed_keys_are_refused_before_anything_runs() {
    let upstream = ledger::start().await;
    let sidecar = start_sidecar(upstream.addr, |_| {}).await;
    let long = "k".repeat(256);
    for bad in ["", long.as_str(), "has space", "tab\there"] {
        let response = support::raw::call(
            sidecar.addr,
            "/idemproxy.testing.v1.Ledger/Apply",
            &[("idempotency-key", bad)],
            support::raw::frame(&add("x", 1)),
        )
        .await;
        assert_eq!(
            response.grpc_status(),
            Some(3),
            "key {bad:?} is INVALID_ARGUMENT"
        );
        assert!(response.is_trailers_only());
    }
    let mut client = client(sidecar.addr).await;
    let max = "k".repeat(255);
    apply(&mut client, add("x", 1), Some(&max), None)
        .await
        .expect("255 bytes is allowed");
    assert_eq!(upstream.state.executions(), 1);
}

#[tokio::test]
async fn a_request_over_the_limit_is_refused_and_never_forwarded() {
    let upstream = ledger::start().await;
    let sidecar = start_sidecar(upstream.addr, |args| args.max_request_bytes = 1 << 10).await;
    let mut client = client(sidecar.addr).await;
    let big = add(&"x".repeat(2000), 1);
    let refused = apply(&mut client, big, Some("big"), None)
        .await
        .expect_err("too large");
    assert_eq!(refused.code(), tonic::Code::ResourceExhausted);
    assert_eq!(reason(&refused), "IDEMPOTENCY_REQUEST_TOO_LARGE");
    // Just under the limit passes.
    let fits = add(&"x".repeat(900), 1);
    apply(&mut client, fits, Some("fits"), None)
        .await
        .expect("fits");
    assert_eq!(upstream.state.executions(), 1);
}

#[tokio::test]
async fn malformed_framing_is_refused_and_never_forwarded() {
    let upstream = ledger::start().await;
    let sidecar = start_sidecar(upstream.addr, |_| {}).await;
    let bodies: [&[u8]; 4] = [
        b"\0\0\0\0\x09abc",
        b"\x07\0\0\0\0",
        b"\x01\0\0\0\0",
        b"\0\0",
    ];
    for body in bodies {
        let response = support::raw::call(
            sidecar.addr,
            "/idemproxy.testing.v1.Ledger/Apply",
            &[("idempotency-key", "framing")],
            bytes::Bytes::from_static(body),
        )
        .await;
        assert_eq!(
            response.grpc_status(),
            Some(13),
            "body {body:?} is INTERNAL"
        );
    }
    assert_eq!(upstream.state.executions(), 0);
}

#[tokio::test]
async fn a_response_too_large_to_keep_reaches_the_caller_and_is_never_rerun() {
    let upstream = ledger::start().await;
    let sidecar = start_sidecar(upstream.addr, |args| args.max_response_bytes = 4 << 10).await;
    let mut client = client(sidecar.addr).await;
    let mut big = add("big-answer", 1);
    big.reply_padding_bytes = 64 << 10;
    let first = apply(&mut client, big.clone(), Some("big-answer"), None)
        .await
        .expect("streamed whole");
    assert_eq!(
        first.get_ref().padding.len(),
        64 << 10,
        "the first caller gets every byte"
    );
    let duplicate = apply(&mut client, big, Some("big-answer"), None)
        .await
        .expect_err("not kept");
    assert_eq!(duplicate.code(), tonic::Code::FailedPrecondition);
    assert_eq!(reason(&duplicate), "IDEMPOTENCY_RESPONSE_NOT_KEPT");
    assert_eq!(upstream.state.executions(), 1);
    // A response just under the limit is kept and replayed.
    let mut small = add("small-answer", 1);
    small.reply_padding_bytes = 3 << 10;
    apply(&mut client, small.clone(), Some("small-answer"), None)
        .await
        .unwrap();
    assert!(was_replayed(
        &apply(&mut client, small, Some("small-answer"), None)
            .await
            .unwrap()
    ));
}

/// The HPACK blocks of the HEADERS frames in a client connection's bytes (RFC 9113 §6.2).
fn header_blocks(sent: &[u8]) -> Vec<Vec<u8>> {
    const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
    assert!(sent.starts_with(PREFACE), "an HTTP/2 client connection");
    let (mut at, mut blocks) = (PREFACE.len(), Vec::new());
    while at + 9 <= sent.len() {
        let len = u32::from_be_bytes([0, sent[at], sent[at + 1], sent[at + 2]]) as usize;
        let (kind, flags) = (sent[at + 3], sent[at + 4]);
        let payload = &sent[at + 9..at + 9 + len];
        assert_ne!(kind, 0x9, "no CONTINUATION: each block fits one frame");
        if kind == 0x1 {
            assert_ne!(flags & 0x4, 0, "END_HEADERS");
            let padding = if flags & 0x8 != 0 {
                payload[0] as usize
            } else {
                0
            };
            let start = usize::from(flags & 0x8 != 0) + if flags & 0x20 != 0 { 5 } else { 0 };
            blocks.push(payload[start..payload.len() - padding].to_vec());
        }
        at += 9 + len;
    }
    blocks
}

/// An HPACK integer with an `prefix`-bit prefix (RFC 7541 §5.1).
fn hpack_int(block: &[u8], at: &mut usize, prefix: u32) -> usize {
    let mask = (1usize << prefix) - 1;
    let mut value = usize::from(block[*at]) & mask;
    *at += 1;
    if value < mask {
        return value;
    }
    let mut shift = 0;
    loop {
        let byte = block[*at];
        *at += 1;
        value += usize::from(byte & 0x7f) << shift;
        shift += 7;
        if byte & 0x80 == 0 {
            return value;
        }
    }
}

/// How many fields of an HPACK block are literals with incremental indexing (they enter the
/// table), and how many are never-indexed literals (RFC 7541 §6).
fn literals(block: &[u8]) -> (usize, usize) {
    let (mut at, mut indexing, mut never) = (0, 0, 0);
    let skip_string = |at: &mut usize| {
        let len = hpack_int(block, at, 7);
        *at += len;
    };
    while at < block.len() {
        let first = block[at];
        let prefix = if first & 0x80 != 0 {
            hpack_int(block, &mut at, 7);
            continue;
        } else if first & 0xc0 == 0x40 {
            indexing += 1;
            6
        } else if first & 0xe0 == 0x20 {
            hpack_int(block, &mut at, 5);
            continue;
        } else {
            if first & 0xf0 == 0x10 {
                never += 1;
            }
            4
        };
        if hpack_int(block, &mut at, prefix) == 0 {
            skip_string(&mut at);
        }
        skip_string(&mut at);
    }
    (indexing, never)
}

#[tokio::test]
async fn a_key_goes_to_the_service_as_a_never_indexed_literal() {
    // Every call's key is new: entered in the connection's HPACK table, each one would evict
    // an entry worth keeping and be compared against by every later call. Sent never
    // indexed (RFC 7541 §6.2.3), the table holds what repeats, so a call after the first
    // adds nothing to it.
    let upstream = ledger::start().await;
    let relay = copying_relay(upstream.addr.port());
    let sidecar = start_sidecar(([127, 0, 0, 1], relay.port).into(), |_| {}).await;
    let mut client = client(sidecar.addr).await;
    let calls = 60;
    for n in 0..calls {
        let key = format!("order-{n:04}-{}", "k".repeat(40));
        apply(&mut client, add(&format!("acct-{n}"), 1), Some(&key), None)
            .await
            .expect("answered");
    }
    assert_eq!(upstream.state.executions(), calls);
    let sent = relay.sent.expect("a copying relay keeps what is sent");
    let blocks = header_blocks(&sent.lock().unwrap());
    assert_eq!(blocks.len() as u64, calls, "one request head a call");
    for (n, block) in blocks.iter().enumerate().skip(1) {
        let (indexing, never) = literals(block);
        assert_eq!(indexing, 0, "call {n} added to the HPACK table");
        assert_eq!(never, 1, "call {n}'s key is the one never-indexed literal");
    }
}
