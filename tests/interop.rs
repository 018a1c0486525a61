//! Against an upstream written on the bare `h2` crate rather than tonic: the request headers
//! the gRPC HTTP/2 spec requires reach the service unchanged on both paths, and a stream the
//! service refuses (RST_STREAM REFUSED_STREAM, or a GOAWAY below it) releases the key, and a
//! connection the service closes is remade.

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
    /// Connections accepted.
    connections: AtomicU64,
    /// Close each connection (GOAWAY, then the socket) once it has answered one call.
    one_call_per_connection: AtomicBool,
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
            state.connections.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(async move {
                let Ok(mut connection) = h2::server::handshake(socket).await else {
                    return;
                };
                while let Some(Ok((request, mut respond))) = connection.accept().await {
                    if state.one_call_per_connection.load(Ordering::SeqCst) {
                        connection.graceful_shutdown();
                    }
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

// Regression (issue 33): hyper's server added `date` to every answer and `content-length` to
// keyed ones, and a replay carried a fresh `date`.
#[tokio::test]
async fn answers_carry_only_what_the_service_sent_on_both_paths() {
    let (upstream, seen) = bare_upstream().await;
    let sidecar = support::start_sidecar(upstream, |_| {}).await;
    let direct = support::raw::call(upstream, "/pkg.Svc/Echo", &[], message()).await;
    assert_eq!(
        direct.headers.len(),
        1,
        "the service sends content-type only"
    );
    let passthrough = support::raw::call(sidecar.addr, "/pkg.Svc/Echo", &[], message()).await;
    let key = [("idempotency-key", "exact-1")];
    let first = support::raw::call(sidecar.addr, "/pkg.Svc/Echo", &key, message()).await;
    let replay = support::raw::call(sidecar.addr, "/pkg.Svc/Echo", &key, message()).await;
    // A keyed answer adds only its key's window (issue 41), the same on the replay.
    let window = first
        .headers
        .get("idempotency-expires")
        .expect("a keyed answer says its key's window")
        .clone();
    let mut keyed_head = direct.headers.clone();
    keyed_head.insert("idempotency-expires", window);
    for (path, answer, head) in [
        ("passthrough", &passthrough, &direct.headers),
        ("first keyed", &first, &keyed_head),
    ] {
        assert_eq!(&answer.headers, head, "{path}: head");
        assert_eq!(answer.body, direct.body, "{path}: messages");
        assert_eq!(answer.trailers, direct.trailers, "{path}: trailers");
    }
    let mut expected = keyed_head.clone();
    expected.insert("idempotency-replayed", "true".parse().unwrap());
    assert_eq!(
        replay.headers, expected,
        "the recorded head plus the marker and the window"
    );
    assert_eq!(replay.body, direct.body);
    assert_eq!(replay.trailers, direct.trailers);
    assert_eq!(
        seen.processed.load(Ordering::SeqCst),
        3,
        "direct, passthrough, first"
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

#[tokio::test]
async fn a_connection_the_service_closes_is_remade() {
    let (upstream, seen) = bare_upstream().await;
    seen.one_call_per_connection.store(true, Ordering::SeqCst);
    let sidecar = support::start_sidecar(upstream, |_| {}).await;
    for n in 1..=3 {
        let passthrough = support::raw::call(sidecar.addr, "/pkg.Svc/Echo", &[], message()).await;
        assert_eq!(passthrough.grpc_status(), Some(0), "passthrough call {n}");
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        let key = format!("remade-{n}");
        let keyed = [("idempotency-key", key.as_str())];
        let dedup = support::raw::call(sidecar.addr, "/pkg.Svc/Echo", &keyed, message()).await;
        assert_eq!(dedup.grpc_status(), Some(0), "keyed call {n}");
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert_eq!(seen.processed.load(Ordering::SeqCst), 6);
    assert_eq!(
        seen.connections.load(Ordering::SeqCst),
        6,
        "one connection per call"
    );
}

/// A service that answers every call's HEADERS with GOAWAY(last stream 0): per RFC 9113
/// §6.8, no stream above the last one was processed. Written frame by frame, as no library
/// sends a GOAWAY below a stream it has already read.
async fn goaway_upstream() -> SocketAddr {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut socket, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut read = Vec::new();
                let mut buffer = [0u8; 4096];
                // The client preface (24 bytes), then frames until a HEADERS one.
                'headers: loop {
                    let Ok(n) = socket.read(&mut buffer).await else {
                        return;
                    };
                    if n == 0 {
                        return;
                    }
                    read.extend_from_slice(&buffer[..n]);
                    let mut at = 24;
                    while read.len() >= at + 9 {
                        let length = u32::from_be_bytes([0, read[at], read[at + 1], read[at + 2]]);
                        if read[at + 3] == 1 {
                            break 'headers;
                        }
                        at += 9 + length as usize;
                    }
                }
                let settings = [0u8, 0, 0, 4, 0, 0, 0, 0, 0];
                let goaway = [0u8, 0, 8, 7, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0];
                let _ = socket.write_all(&settings).await;
                let _ = socket.write_all(&goaway).await;
                tokio::time::sleep(std::time::Duration::from_millis(500)).await;
            });
        }
    });
    addr
}

/// A service that records the type and flags of every frame of stream 1 until one ends the
/// stream, then hangs up: the frames exactly as the sidecar wrote them. Read frame by frame,
/// as `h2` merges an empty END_STREAM DATA frame into the end of the stream it hands over.
async fn frame_recorder() -> (
    SocketAddr,
    tokio::sync::oneshot::Receiver<Vec<(u8, u8, u32)>>,
) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (sender, frames) = tokio::sync::oneshot::channel();
    tokio::spawn(async move {
        let (mut socket, _) = listener.accept().await.unwrap();
        let _ = socket.write_all(&[0u8, 0, 0, 4, 0, 0, 0, 0, 0]).await; // SETTINGS
        let mut preface = [0u8; 24];
        socket.read_exact(&mut preface).await.unwrap();
        let mut seen = Vec::new();
        loop {
            let mut head = [0u8; 9];
            socket.read_exact(&mut head).await.unwrap();
            let length = u32::from_be_bytes([0, head[0], head[1], head[2]]);
            let stream = u32::from_be_bytes([head[5], head[6], head[7], head[8]]) & 0x7fff_ffff;
            let mut payload = vec![0u8; length as usize];
            socket.read_exact(&mut payload).await.unwrap();
            if stream == 1 {
                seen.push((head[3], head[4], length));
                if head[4] & 0x1 != 0 {
                    let _ = sender.send(seen);
                    return;
                }
            }
        }
    });
    (addr, frames)
}

const HEADERS: u8 = 1;
const DATA: u8 = 0;
const END_STREAM: u8 = 0x1;

// Regression (issue 33): a keyed call with an empty body went out as HEADERS with END_STREAM;
// gRPC clients send HEADERS, then a DATA frame with END_STREAM, and grpc-go's server ends
// the input only on the latter, so the call hung for its whole lease.
#[tokio::test]
async fn a_keyed_empty_request_ends_with_an_empty_data_frame_as_grpc_clients_send() {
    let (upstream, frames) = frame_recorder().await;
    let sidecar = support::start_sidecar(upstream, |_| {}).await;
    const KEY: [(&str, &str); 1] = [("idempotency-key", "empty-1")];
    let call = support::raw::call(sidecar.addr, "/pkg.Svc/Count", &KEY, Bytes::new());
    let answer = tokio::spawn(call);
    let frames = frames.await.unwrap();
    assert_eq!(frames.len(), 2, "HEADERS then DATA: {frames:?}");
    let (kind, flags, _) = frames[0];
    assert_eq!(
        (kind, flags & END_STREAM),
        (HEADERS, 0),
        "HEADERS leave the stream open"
    );
    assert_eq!(
        frames[1],
        (DATA, END_STREAM, 0),
        "an empty DATA frame ends it"
    );
    answer.abort();
}

#[tokio::test]
async fn a_call_refused_by_goaway_releases_the_key() {
    let upstream = goaway_upstream().await;
    let sidecar = support::start_sidecar(upstream, |_| {}).await;
    let key = [("idempotency-key", "goaway-1")];
    for attempt in ["first", "retry"] {
        let refused = support::raw::call(sidecar.addr, "/pkg.Svc/Echo", &key, message()).await;
        assert_eq!(refused.grpc_status(), Some(14), "{attempt}: UNAVAILABLE");
        let reason = refused.headers.get("grpc-status-details-bin").is_some();
        assert!(reason, "{attempt}: a refusal with its reason");
        let message = refused.headers["grpc-message"].to_str().unwrap();
        assert!(
            message.starts_with("the%20service%20is%20unavailable")
                || message.starts_with("the service is unavailable"),
            "{attempt}: nothing was processed, so the key is free: {message}"
        );
    }
}

// Regression (issue 33): a keyed call whose client streams while it waits for answers (a
// bidirectional ping-pong) was read whole before anything else, so it hung forever.
#[tokio::test]
async fn a_keyed_request_that_does_not_end_is_refused_in_time_and_nothing_is_forwarded() {
    let (upstream, seen) = bare_upstream().await;
    let sidecar = support::start_sidecar(upstream, |_| {}).await;
    let socket = tokio::net::TcpStream::connect(sidecar.addr).await.unwrap();
    let (client, connection) = h2::client::handshake(socket).await.unwrap();
    tokio::spawn(connection);
    let request = http::Request::post(format!("http://{}/pkg.Svc/Chat", sidecar.addr))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .header("idempotency-key", "ping-pong-1")
        .body(())
        .unwrap();
    let (response, mut stream) = client
        .ready()
        .await
        .unwrap()
        .send_request(request, false)
        .unwrap();
    // One message, then the client waits for an answer before it sends more.
    stream.send_data(message(), false).unwrap();
    let bound = idemproxy::proxy::REQUEST_END_WAIT + std::time::Duration::from_secs(5);
    let response = tokio::time::timeout(bound, response)
        .await
        .expect("refused in time")
        .unwrap();
    let status = response.headers()["grpc-status"].to_str().unwrap();
    assert_eq!(status, "9", "FAILED_PRECONDITION");
    let details = response.headers()["grpc-status-details-bin"].as_bytes();
    use base64::Engine as _;
    let details = base64::engine::general_purpose::STANDARD_NO_PAD
        .decode(details)
        .unwrap();
    let info = support::error_info_of(&details).unwrap();
    assert_eq!(info.reason, "IDEMPOTENCY_CALL_SHAPE_UNSUPPORTED");
    assert!(seen.headers.lock().unwrap().is_empty(), "nothing forwarded");
}

// Regression (issue 33): grpcurl's -H puts the key on its reflection stream too, which hung.
#[tokio::test]
async fn keyed_calls_to_reflection_and_health_pass_through() {
    let (upstream, seen) = bare_upstream().await;
    let sidecar = support::start_sidecar(upstream, |_| {}).await;
    let key = [("idempotency-key", "tools-1")];
    for path in [
        "/grpc.health.v1.Health/Check",
        "/grpc.health.v1.Health/Check",
        "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
    ] {
        let answer = support::raw::call(sidecar.addr, path, &key, message()).await;
        assert_eq!(answer.grpc_status(), Some(0), "{path}");
        assert!(
            !answer.headers.contains_key("idempotency-replayed"),
            "{path}: not replayed"
        );
    }
    assert_eq!(
        seen.processed.load(Ordering::SeqCst),
        3,
        "each reached the service"
    );
}
