//! A plain HTTP/2 client (hyper, not tonic) that shows a response exactly as it came: head,
//! body bytes, trailers, and whether it was trailers-only.

use bytes::Bytes;
use http::{HeaderMap, Request};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::{TokioExecutor, TokioIo};
use prost::Message;
use std::net::SocketAddr;
use tokio::net::TcpStream;

/// A response as received.
#[derive(Debug, Clone, PartialEq)]
pub struct RawResponse {
    pub status: u16,
    pub headers: HeaderMap,
    pub body: Bytes,
    pub trailers: Option<HeaderMap>,
}

impl RawResponse {
    /// The grpc-status, from the trailers or a trailers-only head.
    pub fn grpc_status(&self) -> Option<u32> {
        let from = |map: &HeaderMap| map.get("grpc-status")?.to_str().ok()?.parse().ok();
        self.trailers
            .as_ref()
            .and_then(from)
            .or_else(|| from(&self.headers))
    }

    /// True when the whole answer was one HEADERS frame.
    pub fn is_trailers_only(&self) -> bool {
        self.body.is_empty() && self.trailers.is_none() && self.headers.contains_key("grpc-status")
    }

    /// The head without the replay marker, to compare a replay with the original.
    pub fn headers_without_replay_marker(&self) -> HeaderMap {
        let mut headers = self.headers.clone();
        headers.remove("idempotency-replayed");
        headers
    }
}

/// Frames one message as gRPC does: flag, big-endian length, bytes.
pub fn frame(message: &impl Message) -> Bytes {
    let payload = message.encode_to_vec();
    let mut out = Vec::with_capacity(payload.len() + 5);
    out.push(0);
    out.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    out.extend_from_slice(&payload);
    out.into()
}

/// Sends one POST over a fresh HTTP/2 connection and reads the whole answer.
pub async fn call(
    addr: SocketAddr,
    path: &str,
    headers: &[(&str, &str)],
    body: Bytes,
) -> RawResponse {
    let stream = TcpStream::connect(addr).await.expect("connects");
    let (mut sender, connection) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
            .await
            .expect("HTTP/2 handshake");
    tokio::spawn(connection);
    let mut request = Request::post(format!("http://{addr}{path}"))
        .header("content-type", "application/grpc")
        .header("te", "trailers");
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    let request = request.body(Full::new(body)).expect("a valid request");
    let response = sender.send_request(request).await.expect("an answer");
    let (head, body) = response.into_parts();
    let collected = body.collect().await.expect("a whole body");
    let trailers = collected.trailers().cloned();
    RawResponse {
        status: head.status.as_u16(),
        headers: head.headers,
        body: collected.to_bytes(),
        trailers,
    }
}
