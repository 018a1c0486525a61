//! Against an upstream written on the bare `h2` crate rather than tonic: the request headers
//! the gRPC HTTP/2 spec requires reach the service unchanged on both paths, and a stream the
//! service refuses (RST_STREAM REFUSED_STREAM) releases the key.

#![allow(clippy::unwrap_used)] // Test helpers: a failed unwrap is a failed test.

mod support;

use bytes::Bytes;
use http::HeaderMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use tokio::net::TcpListener;

/// What the bare upstream saw.
#[derive(Default)]
struct Seen {
    headers: Mutex<Vec<HeaderMap>>,
    processed: AtomicU64,
    refuse_next: AtomicBool,
}

/// An upstream on `h2` itself: echoes the request body as its answer, or refuses the stream
/// unprocessed when told to.
async fn bare_upstream() -> (SocketAddr, Arc<Seen>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let seen = Arc::new(Seen::default());
    let state = seen.clone();
    tokio::spawn(async move {
        while let Ok((socket, _)) = listener.accept().await {
            let state = state.clone();
            tokio::spawn(async move {
                let Ok(mut connection) = h2::server::handshake(socket).await else {
                    return;
                };
                while let Some(Ok((request, mut respond))) = connection.accept().await {
                    let state = state.clone();
                    tokio::spawn(async move {
                        if state.refuse_next.swap(false, Ordering::SeqCst) {
                            respond.send_reset(h2::Reason::REFUSED_STREAM);
                            return;
                        }
                        let (head, mut body) = request.into_parts();
                        state.headers.lock().unwrap().push(head.headers);
                        let mut data = Vec::new();
                        while let Some(chunk) = body.data().await {
                            let chunk = chunk.unwrap();
                            let _ = body.flow_control().release_capacity(chunk.len());
                            data.extend_from_slice(&chunk);
                        }
                        state.processed.fetch_add(1, Ordering::SeqCst);
                        let response = http::Response::builder()
                            .header("content-type", "application/grpc")
                            .body(())
                            .unwrap();
                        let mut send = respond.send_response(response, false).unwrap();
                        send.send_data(Bytes::from(data), false).unwrap();
                        let mut trailers = HeaderMap::new();
                        trailers.insert("grpc-status", "0".parse().unwrap());
                        send.send_trailers(trailers).unwrap();
                    });
                }
            });
        }
    });
    (addr, seen)
}

fn message() -> Bytes {
    Bytes::from_static(b"\0\0\0\0\x03abc")
}

#[tokio::test]
async fn required_headers_reach_the_service_on_both_paths() {
    let (upstream, seen) = bare_upstream().await;
    let sidecar = support::start_sidecar(upstream, |_| {}).await;
    let common = [
        ("grpc-timeout", "5S"),
        ("x-custom-bin", "AAEC"),
        ("x-trace", "t1"),
    ];
    let passthrough = support::raw::call(sidecar.addr, "/pkg.Svc/Echo", &common, message()).await;
    let mut keyed = common.to_vec();
    keyed.push(("idempotency-key", "interop-1"));
    let dedup = support::raw::call(sidecar.addr, "/pkg.Svc/Echo", &keyed, message()).await;
    for response in [&passthrough, &dedup] {
        assert_eq!(response.grpc_status(), Some(0));
        assert_eq!(response.body, message());
    }
    let headers = seen.headers.lock().unwrap();
    assert_eq!(headers.len(), 2);
    for seen in headers.iter() {
        assert_eq!(
            seen["te"], "trailers",
            "gRPC servers may refuse a call without it"
        );
        assert_eq!(seen["content-type"], "application/grpc");
        assert_eq!(seen["grpc-timeout"], "5S");
        assert_eq!(seen["x-custom-bin"], "AAEC");
        assert_eq!(seen["x-trace"], "t1");
    }
    assert_eq!(
        headers[1]["idempotency-key"], "interop-1",
        "the service sees the key too"
    );
}

#[tokio::test]
async fn a_refused_stream_releases_the_key() {
    let (upstream, seen) = bare_upstream().await;
    let sidecar = support::start_sidecar(upstream, |_| {}).await;
    let key = [("idempotency-key", "refused-1")];
    seen.refuse_next.store(true, Ordering::SeqCst);
    let refused = support::raw::call(sidecar.addr, "/pkg.Svc/Echo", &key, message()).await;
    assert_eq!(
        refused.grpc_status(),
        Some(14),
        "UNAVAILABLE: nothing was processed"
    );
    assert_eq!(seen.processed.load(Ordering::SeqCst), 0);
    let retry = support::raw::call(sidecar.addr, "/pkg.Svc/Echo", &key, message()).await;
    assert_eq!(
        retry.grpc_status(),
        Some(0),
        "the key was released: the retry runs"
    );
    assert!(!retry.headers.contains_key("idempotency-replayed"));
    let replay = support::raw::call(sidecar.addr, "/pkg.Svc/Echo", &key, message()).await;
    assert_eq!(replay.headers["idempotency-replayed"], "true");
    assert_eq!(seen.processed.load(Ordering::SeqCst), 1);
}
