//! Calls without a key pass through unchanged and streamed, in all four call shapes, with
//! metadata, trailers, deadlines and errors intact.

mod support;

use idemproxy::pb::idemproxy::testing::v1::ApplyRequest;
use std::time::Duration;
use support::{add, client, ledger, start_sidecar};
use tokio_stream::StreamExt;

#[tokio::test]
async fn server_streaming_passes_through_with_its_trailers() {
    let upstream = ledger::start().await;
    let sidecar = start_sidecar(upstream.addr, |_| {}).await;
    let mut client = client(sidecar.addr).await;
    let request = ApplyRequest {
        stream_messages: 5,
        fail_code: tonic::Code::NotFound as u32,
        fail_message: "done".into(),
        ..add("s", 1)
    };
    let mut stream = client
        .watch(request)
        .await
        .expect("the stream opens")
        .into_inner();
    let mut messages = 0;
    let status = loop {
        match stream.next().await {
            Some(Ok(_)) => messages += 1,
            Some(Err(status)) => break status,
            None => panic!("the stream must end with the service's status"),
        }
    };
    assert_eq!(messages, 5);
    assert_eq!(status.code(), tonic::Code::NotFound);
    assert_eq!(status.metadata().get("x-ledger-trailer").unwrap(), "kept");
}

#[tokio::test]
async fn client_streaming_passes_through() {
    let upstream = ledger::start().await;
    let sidecar = start_sidecar(upstream.addr, |_| {}).await;
    let mut client = client(sidecar.addr).await;
    let requests = tokio_stream::iter((0..4).map(|_| add("c", 10)));
    let reply = client
        .collect(requests)
        .await
        .expect("answered")
        .into_inner();
    assert_eq!(reply.balance, 40);
    assert_eq!(upstream.state.executions(), 4);
}

#[tokio::test]
async fn bidi_streaming_is_not_buffered() {
    let upstream = ledger::start().await;
    let sidecar = start_sidecar(upstream.addr, |_| {}).await;
    let mut client = client(sidecar.addr).await;
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    let outbound = tokio_stream::wrappers::ReceiverStream::new(rx);
    let mut inbound = client.chat(outbound).await.expect("opens").into_inner();
    // Ping-pong: each answer must arrive before the next request is sent, which only works
    // if neither direction is buffered until the end of the stream.
    for n in 1..=3 {
        tx.send(add("b", 1)).await.unwrap();
        let reply = tokio::time::timeout(Duration::from_secs(5), inbound.next())
            .await
            .expect("an answer while the stream is open")
            .expect("a message")
            .expect("OK");
        assert_eq!(reply.balance, n);
    }
    drop(tx);
    assert!(inbound.next().await.is_none());
}

#[tokio::test]
async fn deadlines_reach_the_service() {
    let upstream = ledger::start().await;
    let sidecar = start_sidecar(upstream.addr, |_| {}).await;
    // A plain client with no deadline of its own: only the service can enforce it.
    let request = ApplyRequest {
        delay_ms: 3000,
        ..add("d", 1)
    };
    let started = tokio::time::Instant::now();
    let response = support::raw::call(
        sidecar.addr,
        "/idemproxy.testing.v1.Ledger/Apply",
        &[("grpc-timeout", "100m")],
        support::raw::frame(&request),
    )
    .await;
    assert!(
        started.elapsed() < Duration::from_millis(2500),
        "the service saw grpc-timeout"
    );
    assert_ne!(response.grpc_status(), Some(0));
    assert_eq!(upstream.state.executions(), 0);
}

#[tokio::test]
async fn bodies_larger_than_the_flow_control_windows_stream_both_ways() {
    // 12 MiB each way: past the 2 MiB stream and 5 MiB connection windows to the service, so
    // the request pump must wait for window and the answer must give window back as it goes.
    let upstream = ledger::start().await;
    let sidecar = start_sidecar(upstream.addr, |_| {}).await;
    let mut client = client(sidecar.addr).await;
    let big_account = "a".repeat(1 << 20);
    let requests = tokio_stream::iter((0..12).map(move |_| add(&big_account, 1)));
    let reply = tokio::time::timeout(Duration::from_secs(30), client.collect(requests))
        .await
        .expect("the upload does not stall")
        .expect("answered")
        .into_inner();
    assert_eq!(reply.balance, 12);
    assert_eq!(upstream.state.executions(), 12);

    let request = ApplyRequest {
        stream_messages: 12,
        reply_padding_bytes: 1 << 20,
        ..add("w", 1)
    };
    let mut stream = client.watch(request).await.expect("opens").into_inner();
    let mut bytes = 0;
    while let Some(reply) = tokio::time::timeout(Duration::from_secs(30), stream.next())
        .await
        .expect("the download does not stall")
    {
        bytes += reply.expect("a message").padding.len();
    }
    assert_eq!(bytes, 12 << 20);
}
