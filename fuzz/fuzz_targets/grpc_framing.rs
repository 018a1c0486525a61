//! A request body and a response head and trailers as a peer may send them: framing checks,
//! the unary message (gzip included), `grpc-timeout`, and the trailers → record mapping.
#![no_main]

use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue};
use idemproxy::proxy::grpc;
use libfuzzer_sys::fuzz_target;

fn header_map(data: &[u8]) -> HeaderMap {
    let mut map = HeaderMap::new();
    for line in data.split(|b| *b == b'\n') {
        let mut parts = line.splitn(2, |b| *b == b':');
        let (Some(name), Some(value)) = (parts.next(), parts.next()) else {
            continue;
        };
        if let (Ok(name), Ok(value)) =
            (HeaderName::from_bytes(name), HeaderValue::from_bytes(value))
        {
            map.append(name, value);
        }
    }
    map
}

fuzz_target!(|data: &[u8]| {
    let Some((&selector, rest)) = data.split_first() else {
        return;
    };
    let _ = grpc::parse_timeout(rest);
    let body = Bytes::copy_from_slice(rest);
    let encoding = match selector % 3 {
        0 => None,
        1 => Some("gzip"),
        _ => Some("deflate"),
    };
    if let Ok(messages) = grpc::check_framing(&body, encoding.is_some()) {
        let _ = grpc::unary_message(&body, messages, encoding, 1 << 16);
    }
    // Total on any body, framed or not.
    let _ = grpc::stream_messages(&body, encoding, 1 << 16);
    // Head and trailers split where a NUL falls.
    let mut halves = rest.splitn(2, |b| *b == 0);
    let head = header_map(halves.next().unwrap_or_default());
    let trailers = halves.next().map(header_map);
    let status = [200, 404, 503, 100, 999][usize::from(selector) % 5];
    let response = grpc::to_response(status, &head, body.clone(), trailers.as_ref());
    let expires_ms = Some(u64::from(selector) << 20);
    let _ = idemproxy::proxy::recorded_response(response, selector & 1 == 1, expires_ms);
});
