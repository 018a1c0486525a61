//! Memory has one bound (issue 31, item 3): keyed requests are read whole and answers kept
//! whole, and one connection with 70 unfinished 4 MB keyed requests took the sidecar from
//! 15 MiB to 286 MiB (the example pod's limit is 256 MiB: OOM-killed). Now every buffered byte
//! counts against `--max-buffered-bytes`, one connection may hold a quarter of it, and a body
//! that stalls is cut.

// A failed unwrap is a failed test.
#![allow(clippy::unwrap_used)]

mod support;

use bytes::Bytes;
use std::time::Duration;
use support::{add, apply, binary, client, ledger};

/// The sidecar's resident memory, from `/proc`.
fn rss_bytes(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kib: u64 = status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|value| value.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap();
    kib * 1024
}

/// Opens one HTTP/2 connection and starts `requests` keyed calls on it, each sending
/// `body_bytes` of body and never ending it.
async fn unfinished_requests(
    addr: std::net::SocketAddr,
    requests: usize,
    body_bytes: usize,
) -> Vec<h2::SendStream<Bytes>> {
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (mut sender, connection) = h2::client::handshake(tcp).await.unwrap();
    tokio::spawn(async move {
        let _ = connection.await;
    });
    let mut streams = Vec::new();
    for n in 0..requests {
        let request =
            http::Request::post(format!("http://{addr}/idemproxy.testing.v1.Ledger/Apply"))
                .header("content-type", "application/grpc")
                .header("te", "trailers")
                .header("idempotency-key", format!("greedy-{n}"))
                .body(())
                .unwrap();
        sender = sender.ready().await.unwrap();
        let (_response, mut stream) = sender.send_request(request, false).unwrap();
        stream
            .send_data(Bytes::from(vec![0u8; body_bytes]), false)
            .unwrap();
        streams.push(stream);
    }
    streams
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unfinished_keyed_requests_stay_within_the_buffers_budget() {
    let upstream = ledger::start().await;
    let dir = tempfile::tempdir().unwrap();
    let budget_bytes = 16u64 << 20;
    let args = binary::run_args(
        upstream.addr,
        dir.path(),
        &["--max-buffered-bytes", "16MiB"],
    );
    let sidecar = binary::start(&args).await;
    let mut polite = client(sidecar.addr).await;
    apply(&mut polite, add("warm", 1), Some("warm"), None)
        .await
        .unwrap();
    let before = rss_bytes(sidecar.pid());
    let attack = unfinished_requests(sidecar.addr, 70, 4_000_000).await;
    // While the attack's bodies arrive and are held (until they are cut for not ending),
    // memory stays under the budget plus a fixed overhead, and a well-behaved caller on its
    // own connection is served.
    let mut peak = before;
    let deadline = tokio::time::Instant::now() + Duration::from_millis(2_500);
    let mut served = false;
    while tokio::time::Instant::now() < deadline {
        peak = peak.max(rss_bytes(sidecar.pid()));
        if !served {
            apply(&mut polite, add("polite", 1), Some("polite"), None)
                .await
                .expect("a well-behaved caller is served during the attack");
            served = true;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    eprintln!(
        "memory: RSS {} MiB before, {} MiB at the peak",
        before >> 20,
        peak >> 20
    );
    drop(attack);
    let grown = peak.saturating_sub(before);
    assert!(
        grown < budget_bytes + (32 << 20),
        "RSS grew by {} MiB under a {} MiB budget",
        grown >> 20,
        budget_bytes >> 20
    );
    assert_eq!(upstream.state.executions(), 2, "nothing of the attack ran");
}
