//! The proxy listener enforces its HTTP/2 limits: streams, header list size, keep-alive and
//! idle connections.

// A failed unwrap is a failed test.
#![allow(clippy::unwrap_used)]

mod support;

use std::time::Duration;
use support::{call_with, client, ledger, start_sidecar};

#[tokio::test]
async fn the_listener_enforces_its_http2_limits() {
    let upstream = ledger::start().await;
    let sidecar = start_sidecar(upstream.addr, |args| {
        args.http2_max_concurrent_streams = 7;
        args.http2_max_header_list_size = 4 << 10;
        args.http2_idle_timeout = Duration::from_millis(300);
    })
    .await;
    // The stream limit is what the server's SETTINGS say.
    let tcp = tokio::net::TcpStream::connect(sidecar.addr).await.unwrap();
    let (_send, mut connection) = h2::client::handshake(tcp).await.unwrap();
    let settled = tokio::time::timeout(Duration::from_millis(200), &mut connection).await;
    assert!(
        settled.is_err(),
        "the connection stays open while it is young"
    );
    assert_eq!(connection.max_concurrent_send_streams(), 7);
    // Idle for the idle timeout: closed gracefully.
    let closed = tokio::time::timeout(Duration::from_secs(5), connection).await;
    assert!(
        matches!(closed, Ok(Ok(()))),
        "an idle connection is closed with GOAWAY: {closed:?}"
    );
    // A header list over the limit is refused; one under it is served.
    let mut client = client(sidecar.addr).await;
    let big = "x".repeat(5000);
    let refused = call_with(&mut client, "a", "big", &[("x-big", big.as_str())]).await;
    assert!(refused.is_err(), "a 5 KB header list is over 4 KiB");
    call_with(&mut client, "a", "small", &[("x-small", "y")])
        .await
        .unwrap();
    assert_eq!(upstream.state.executions(), 1);
}
