//! gRPC-over-HTTP/2 details the proxy needs (the gRPC "PROTOCOL-HTTP2" spec): `grpc-timeout`,
//! message framing, and turning a response into a record and back.
//!
//! Parsing here is strict and total: any input yields a value or an error, never a panic.

use crate::record::{Header, Response};
use crate::status::{code_of_http_status, Code};
use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue};
use std::time::Duration;

/// Header fields that never cross a proxy (RFC 9110 §7.6.1); HTTP/2 forbids most of them.
const HOP_BY_HOP: [&str; 6] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "transfer-encoding",
    "upgrade",
    "te",
];

/// Parses `grpc-timeout`: 1–8 ASCII digits then a unit (H M S m u n). `None` if malformed.
pub fn parse_timeout(value: &[u8]) -> Option<Duration> {
    let (digits, unit) = value.split_at(value.len().checked_sub(1)?);
    if digits.is_empty() || digits.len() > 8 || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    let amount: u64 = std::str::from_utf8(digits).ok()?.parse().ok()?;
    Some(match unit[0] {
        b'H' => Duration::from_secs(amount * 3600),
        b'M' => Duration::from_secs(amount * 60),
        b'S' => Duration::from_secs(amount),
        b'm' => Duration::from_millis(amount),
        b'u' => Duration::from_micros(amount),
        b'n' => Duration::from_nanos(amount),
        _ => return None,
    })
}

/// Why a request body is not a sequence of gRPC messages.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FramingError {
    /// The body ends inside a message prefix or message.
    #[error("the request body ends inside a gRPC message ({0} bytes left over)")]
    Truncated(usize),
    /// The compressed-flag byte is neither 0 nor 1.
    #[error("a gRPC message has compressed-flag {0}, not 0 or 1")]
    BadFlag(u8),
    /// A message is compressed but the call names no `grpc-encoding`.
    #[error("a gRPC message is compressed but the call names no grpc-encoding")]
    CompressedWithoutEncoding,
}

/// Checks that `body` is whole length-prefixed messages; returns how many.
pub fn check_framing(body: &[u8], has_encoding: bool) -> Result<usize, FramingError> {
    let mut rest = body;
    let mut messages = 0;
    while !rest.is_empty() {
        if rest.len() < 5 {
            return Err(FramingError::Truncated(rest.len()));
        }
        match rest[0] {
            0 => {}
            1 if has_encoding => {}
            1 => return Err(FramingError::CompressedWithoutEncoding),
            flag => return Err(FramingError::BadFlag(flag)),
        }
        let len = u32::from_be_bytes([rest[1], rest[2], rest[3], rest[4]]) as usize;
        if rest.len() - 5 < len {
            return Err(FramingError::Truncated(rest.len()));
        }
        rest = &rest[5 + len..];
        messages += 1;
    }
    Ok(messages)
}

/// Why one unary request message cannot be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MessageError {
    /// A unary method got zero or several messages.
    #[error("a unary call carries exactly one message, this one {0}")]
    NotOne(usize),
    /// The message is compressed with an encoding this proxy cannot read.
    #[error("grpc-encoding {0:?} cannot be read here (identity and gzip can)")]
    Encoding(String),
    /// The gzip stream is corrupt.
    #[error("the gzip-compressed message cannot be decompressed: {0}")]
    Corrupt(String),
    /// Decompressed, the message is larger than may be deduplicated.
    #[error("decompressed, the message is larger than {0} bytes")]
    TooLarge(usize),
    /// The body is not whole length-prefixed messages.
    #[error("the request body is not whole gRPC messages")]
    Unframed,
}

/// The one message of a unary request `body`, whose framing `check_framing` has checked and
/// found `messages` in, decompressed when its flag says so, at most `bytes_max` bytes.
pub fn unary_message(
    body: &Bytes,
    messages: usize,
    encoding: Option<&str>,
    bytes_max: usize,
) -> Result<Bytes, MessageError> {
    if messages != 1 {
        return Err(MessageError::NotOne(messages));
    }
    decompressed(body[0], body.slice(5..), encoding, bytes_max)
}

/// Every message of a client stream's request `body`, whose framing `check_framing` has
/// checked, each decompressed when its flag says so; together at most `bytes_max` bytes, so
/// a stream of small compressed messages cannot grow past the bound the body was read under.
pub fn stream_messages(
    body: &Bytes,
    encoding: Option<&str>,
    bytes_max: usize,
) -> Result<Vec<Bytes>, MessageError> {
    let mut messages = Vec::new();
    let mut left_bytes = bytes_max;
    let mut at = 0;
    while at < body.len() {
        // `check_framing` vouched for every prefix and length; `get` keeps this total anyway.
        let prefix = body.get(at..at + 5).ok_or(MessageError::Unframed)?;
        let len = u32::from_be_bytes([prefix[1], prefix[2], prefix[3], prefix[4]]) as usize;
        let end = (at + 5)
            .checked_add(len)
            .filter(|end| *end <= body.len())
            .ok_or(MessageError::Unframed)?;
        let message = decompressed(prefix[0], body.slice(at + 5..end), encoding, left_bytes)
            .map_err(|error| match error {
                MessageError::TooLarge(_) => MessageError::TooLarge(bytes_max),
                other => other,
            })?;
        // A message sent as is counts too: after a large compressed one it may not fit.
        left_bytes = left_bytes
            .checked_sub(message.len())
            .ok_or(MessageError::TooLarge(bytes_max))?;
        messages.push(message);
        at = end;
    }
    Ok(messages)
}

/// One message as sent (`flag` 0) or gunzipped (`flag` 1), at most `bytes_max` bytes.
fn decompressed(
    flag: u8,
    message: Bytes,
    encoding: Option<&str>,
    bytes_max: usize,
) -> Result<Bytes, MessageError> {
    if flag == 0 {
        return Ok(message);
    }
    match encoding {
        Some("gzip") => {
            use std::io::Read;
            let mut out = Vec::new();
            flate2::read::GzDecoder::new(&message[..])
                .take(bytes_max as u64 + 1)
                .read_to_end(&mut out)
                .map_err(|error| MessageError::Corrupt(error.to_string()))?;
            if out.len() > bytes_max {
                return Err(MessageError::TooLarge(bytes_max));
            }
            Ok(Bytes::from(out))
        }
        other => Err(MessageError::Encoding(other.unwrap_or("").to_owned())),
    }
}

fn is_hop_by_hop(name: &HeaderName) -> bool {
    HOP_BY_HOP.contains(&name.as_str())
}

fn to_headers(map: &HeaderMap) -> Vec<Header> {
    map.iter()
        .filter(|(name, _)| !is_hop_by_hop(name))
        .map(|(name, value)| Header {
            name: name.as_str().to_owned(),
            value: Bytes::copy_from_slice(value.as_bytes()),
        })
        .collect()
}

/// Rebuilds a header map from recorded fields; fields that are no longer valid are skipped.
pub fn from_headers(headers: &[Header], extra: usize) -> HeaderMap {
    let mut map = HeaderMap::with_capacity(headers.len() + extra);
    for header in headers {
        let name = HeaderName::from_bytes(header.name.as_bytes());
        let value = HeaderValue::from_maybe_shared(header.value.clone());
        if let (Ok(name), Ok(value)) = (name, value) {
            map.append(name, value);
        }
    }
    map
}

fn grpc_status_of(map: &HeaderMap) -> Option<u32> {
    map.get("grpc-status")?.to_str().ok()?.parse().ok()
}

/// Turns a complete upstream answer into a record's response.
pub fn to_response(
    http_status: u16,
    headers: &HeaderMap,
    body: Bytes,
    trailers: Option<&HeaderMap>,
) -> Response {
    let status_in_headers = grpc_status_of(headers);
    let (grpc_status, trailers_only) = if http_status != 200 {
        // Not a gRPC answer (an intermediary's error page): the spec's HTTP mapping. Nothing
        // of the service's came back, so it counts as an answer before any response header.
        (code_of_http_status(http_status) as u32, true)
    } else if let Some(status) = trailers.and_then(grpc_status_of) {
        (status, false)
    } else if let (Some(status), true, None) = (status_in_headers, body.is_empty(), trailers) {
        (status, true)
    } else {
        // A response without a status is an error by the spec.
        (Code::Internal as u32, false)
    };
    Response {
        http_status: u32::from(http_status),
        headers: to_headers(headers),
        body,
        trailers: trailers.map(to_headers).unwrap_or_default(),
        trailers_only,
        grpc_status,
        origin_trace: Default::default(),
        resolved_by_probe: false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timeouts_parse_by_the_spec() {
        assert_eq!(parse_timeout(b"1S"), Some(Duration::from_secs(1)));
        assert_eq!(parse_timeout(b"250m"), Some(Duration::from_millis(250)));
        assert_eq!(parse_timeout(b"2H"), Some(Duration::from_secs(7200)));
        assert_eq!(
            parse_timeout(b"99999999n"),
            Some(Duration::from_nanos(99_999_999))
        );
        assert_eq!(parse_timeout(b"123456789S"), None);
        assert_eq!(parse_timeout(b"S"), None);
        assert_eq!(parse_timeout(b""), None);
        assert_eq!(parse_timeout(b"1x"), None);
        assert_eq!(parse_timeout(b"-1S"), None);
    }

    #[test]
    fn framing_is_checked_whole() {
        assert_eq!(check_framing(b"", false), Ok(0));
        assert_eq!(check_framing(b"\0\0\0\0\x02ab\0\0\0\0\0", false), Ok(2));
        assert_eq!(
            check_framing(b"\0\0\0\0\x03ab", false),
            Err(FramingError::Truncated(7))
        );
        assert_eq!(
            check_framing(b"\0\0\0", false),
            Err(FramingError::Truncated(3))
        );
        assert_eq!(
            check_framing(b"\x02\0\0\0\0", false),
            Err(FramingError::BadFlag(2))
        );
        assert_eq!(
            check_framing(b"\x01\0\0\0\0", false),
            Err(FramingError::CompressedWithoutEncoding)
        );
        assert_eq!(check_framing(b"\x01\0\0\0\0", true), Ok(1));
        assert_eq!(
            check_framing(b"\0\xff\xff\xff\xff", false),
            Err(FramingError::Truncated(5))
        );
    }

    fn gzip(bytes: &[u8]) -> Vec<u8> {
        use std::io::Write;
        let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        encoder.write_all(bytes).expect("writes to memory");
        encoder.finish().expect("writes to memory")
    }

    fn frame(flag: u8, message: &[u8]) -> Vec<u8> {
        let mut out = vec![flag];
        out.extend_from_slice(&(message.len() as u32).to_be_bytes());
        out.extend_from_slice(message);
        out
    }

    #[test]
    fn a_client_stream_yields_every_message_within_one_bound() {
        let empty = stream_messages(&Bytes::new(), None, 16);
        assert_eq!(empty, Ok(Vec::new()));
        let mut body = frame(1, &gzip(&[7; 10]));
        body.extend(frame(0, b"abc"));
        let body = Bytes::from(body);
        let messages = stream_messages(&body, Some("gzip"), 13).expect("13 bytes fit");
        assert_eq!(messages, vec![Bytes::from(vec![7; 10]), Bytes::from("abc")]);
        // The bound is for all messages together, those sent as is included.
        assert_eq!(
            stream_messages(&body, Some("gzip"), 12),
            Err(MessageError::TooLarge(12))
        );
        assert_eq!(
            stream_messages(&Bytes::from_static(b"\0\0\0\0\x05ab"), None, 16),
            Err(MessageError::Unframed)
        );
    }

    #[test]
    fn trailers_only_and_full_answers_are_told_apart() {
        let mut only = HeaderMap::new();
        only.insert("grpc-status", HeaderValue::from_static("14"));
        let response = to_response(200, &only, Bytes::new(), None);
        assert!(response.trailers_only);
        assert_eq!(response.grpc_status, 14);

        let mut trailers = HeaderMap::new();
        trailers.insert("grpc-status", HeaderValue::from_static("0"));
        let response = to_response(
            200,
            &HeaderMap::new(),
            Bytes::from_static(b"\0\0\0\0\0"),
            Some(&trailers),
        );
        assert!(!response.trailers_only);
        assert_eq!(response.grpc_status, 0);

        let response = to_response(200, &HeaderMap::new(), Bytes::new(), None);
        assert_eq!(response.grpc_status, 13);
        assert_eq!(
            to_response(503, &HeaderMap::new(), Bytes::new(), None).grpc_status,
            14
        );
    }
}
