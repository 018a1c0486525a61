//! gRPC status codes and idemproxy's refusals (design §3, "What a caller gets").
//!
//! Owns the one mapping from a refusal to the wire: `grpc-status`, a percent-encoded
//! `grpc-message`, and `grpc-status-details-bin` holding a `google.rpc.Status` with a
//! `google.rpc.ErrorInfo` (domain `idemproxy`) and, when a retry should wait, a
//! `google.rpc.RetryInfo` plus the `grpc-retry-pushback-ms` trailer. It never decides whether
//! to refuse: the engine does.

use crate::key::Key;
use crate::pb::google::rpc::{ErrorInfo, RetryInfo, Status};
use crate::record::State;
use base64::Engine as _;
use http::{HeaderMap, HeaderValue};
use prost::Message;
use std::time::Duration;

/// The ErrorInfo domain of every refusal.
pub const DOMAIN: &str = "idemproxy";

/// The metadata that tells a caller how long a key protects it: the record's expiry, whole
/// seconds since the Unix epoch (rounded down, so a caller never counts on a second the
/// record does not have). A retry sent after it may run again (or, with
/// `idempotency-first-sent`, is refused as `IDEMPOTENCY_KEY_EXPIRED`).
pub const EXPIRES_HEADER: &str = "idempotency-expires";

/// The metadata a caller may send with every attempt of a key: when it sent the first one,
/// whole seconds since the Unix epoch.
pub const FIRST_SENT_HEADER: &str = "idempotency-first-sent";

/// `idempotency-expires`' value for a record expiring at `expires_ms`.
pub fn expires_s(expires_ms: u64) -> u64 {
    expires_ms / 1000
}

/// gRPC status codes, as the protocol numbers them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u32)]
#[allow(missing_docs)]
pub enum Code {
    Ok = 0,
    Cancelled = 1,
    Unknown = 2,
    InvalidArgument = 3,
    DeadlineExceeded = 4,
    NotFound = 5,
    AlreadyExists = 6,
    PermissionDenied = 7,
    ResourceExhausted = 8,
    FailedPrecondition = 9,
    Aborted = 10,
    OutOfRange = 11,
    Unimplemented = 12,
    Internal = 13,
    Unavailable = 14,
    DataLoss = 15,
    Unauthenticated = 16,
}

/// The canonical names of the gRPC status codes, by number.
pub const CODE_NAMES: [&str; 17] = [
    "OK",
    "CANCELLED",
    "UNKNOWN",
    "INVALID_ARGUMENT",
    "DEADLINE_EXCEEDED",
    "NOT_FOUND",
    "ALREADY_EXISTS",
    "PERMISSION_DENIED",
    "RESOURCE_EXHAUSTED",
    "FAILED_PRECONDITION",
    "ABORTED",
    "OUT_OF_RANGE",
    "UNIMPLEMENTED",
    "INTERNAL",
    "UNAVAILABLE",
    "DATA_LOSS",
    "UNAUTHENTICATED",
];

/// The number of a status code written by its canonical name (`NOT_FOUND`).
pub fn code_by_name(name: &str) -> Option<u32> {
    CODE_NAMES
        .iter()
        .position(|known| *known == name)
        .map(|number| number as u32)
}

/// Where a refused key's record stands: `state` in the refusal's `ErrorInfo` (README: every
/// refusal about a key carries `key_hash` and `state`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyState {
    /// A first attempt holds the key.
    InFlight,
    /// The key's outcome is recorded.
    Completed,
    /// The key's call may have acted and its outcome is unknown.
    InDoubt,
    /// No record holds the key: it was released, or refused before the claim.
    Absent,
    /// The store could not say.
    Unknown,
}

impl KeyState {
    /// The value `ErrorInfo.metadata["state"]` carries.
    pub fn as_str(self) -> &'static str {
        match self {
            KeyState::InFlight => "IN_FLIGHT",
            KeyState::Completed => "COMPLETED",
            KeyState::InDoubt => "IN_DOUBT",
            KeyState::Absent => "ABSENT",
            KeyState::Unknown => "UNKNOWN",
        }
    }

    /// Whether a record holds the key in this state.
    pub fn is_recorded(self) -> bool {
        matches!(
            self,
            KeyState::InFlight | KeyState::Completed | KeyState::InDoubt
        )
    }

    /// A record's state as a refusal shows it.
    pub fn of(state: State) -> KeyState {
        match state {
            State::InFlight => KeyState::InFlight,
            State::Completed => KeyState::Completed,
            State::InDoubt => KeyState::InDoubt,
            State::Unspecified => KeyState::Unknown,
        }
    }
}

/// Why idemproxy answered instead of the service: the `ErrorInfo.reason` values.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    /// Same key, another payload.
    KeyReused,
    /// A duplicate waited as long as it may for the first attempt.
    InProgress,
    /// The key's outcome is unknown (IN_DOUBT).
    OutcomeUnknown,
    /// The key header is malformed.
    KeyInvalid,
    /// A key is required and none came.
    KeyMissing,
    /// A duplicate of a method in REJECT mode: refused, not replayed.
    Duplicate,
    /// The request is larger than may be deduplicated.
    RequestTooLarge,
    /// The call ran once but its response was too large to keep.
    ResponseNotKept,
    /// The store cannot durably claim: nothing is forwarded.
    StoreUnavailable,
    /// The service acted, but its outcome could not be stored: the sidecar does not know it,
    /// and a retry is not forwarded.
    OutcomeNotRecorded,
    /// The service could not be reached; the key was released, so a retry executes.
    UpstreamUnavailable,
    /// The request is not a well-formed gRPC call.
    MalformedRequest,
    /// A caller identity is required and the call has none.
    CallerMissing,
    /// The caller source gave something that cannot be trusted as an identity.
    CallerInvalid,
    /// The caller holds as many live records as it may.
    CallerQuota,
    /// A keyed call of a shape that cannot be deduplicated (a bidirectional stream, or a
    /// request body that did not end in time): refused at once rather than held.
    CallShapeUnsupported,
    /// The store is at its size bound and, keeping every outcome for its retention, takes no
    /// new key.
    StoreFull,
    /// Keyed calls together buffer all the bytes `--max-buffered-bytes` allows: a new one is
    /// refused at once, never queued.
    BuffersExhausted,
    /// The caller's first attempt of this key (`idempotency-first-sent`) is older than the
    /// method's retention: its record may be gone, so the retry is refused, never re-run.
    KeyExpired,
}

impl Reason {
    /// Every reason, for tests and documentation checks that must cover them all.
    pub const ALL: [Reason; 19] = [
        Reason::KeyReused,
        Reason::InProgress,
        Reason::OutcomeUnknown,
        Reason::KeyInvalid,
        Reason::KeyMissing,
        Reason::Duplicate,
        Reason::RequestTooLarge,
        Reason::ResponseNotKept,
        Reason::StoreUnavailable,
        Reason::OutcomeNotRecorded,
        Reason::UpstreamUnavailable,
        Reason::MalformedRequest,
        Reason::CallerMissing,
        Reason::CallerInvalid,
        Reason::CallerQuota,
        Reason::CallShapeUnsupported,
        Reason::StoreFull,
        Reason::BuffersExhausted,
        Reason::KeyExpired,
    ];

    /// The stable reason string.
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::KeyReused => "IDEMPOTENCY_KEY_REUSED",
            Reason::InProgress => "IDEMPOTENCY_IN_PROGRESS",
            Reason::OutcomeUnknown => "IDEMPOTENCY_OUTCOME_UNKNOWN",
            Reason::KeyInvalid => "IDEMPOTENCY_KEY_INVALID",
            Reason::KeyMissing => "IDEMPOTENCY_KEY_MISSING",
            Reason::Duplicate => "IDEMPOTENCY_DUPLICATE",
            Reason::RequestTooLarge => "IDEMPOTENCY_REQUEST_TOO_LARGE",
            Reason::ResponseNotKept => "IDEMPOTENCY_RESPONSE_NOT_KEPT",
            Reason::StoreUnavailable => "IDEMPOTENCY_STORE_UNAVAILABLE",
            Reason::OutcomeNotRecorded => "IDEMPOTENCY_OUTCOME_NOT_RECORDED",
            Reason::UpstreamUnavailable => "IDEMPOTENCY_UPSTREAM_UNAVAILABLE",
            Reason::MalformedRequest => "IDEMPOTENCY_MALFORMED_REQUEST",
            Reason::CallerMissing => "IDEMPOTENCY_CALLER_MISSING",
            Reason::CallerInvalid => "IDEMPOTENCY_CALLER_INVALID",
            Reason::CallerQuota => "IDEMPOTENCY_CALLER_QUOTA",
            Reason::CallShapeUnsupported => "IDEMPOTENCY_CALL_SHAPE_UNSUPPORTED",
            Reason::StoreFull => "IDEMPOTENCY_STORE_FULL",
            Reason::BuffersExhausted => "IDEMPOTENCY_BUFFERS_EXHAUSTED",
            Reason::KeyExpired => "IDEMPOTENCY_KEY_EXPIRED",
        }
    }

    /// The status code this reason is answered with.
    pub fn code(self) -> Code {
        match self {
            Reason::KeyReused
            | Reason::OutcomeUnknown
            | Reason::ResponseNotKept
            | Reason::CallShapeUnsupported
            | Reason::KeyExpired => Code::FailedPrecondition,
            Reason::InProgress => Code::Aborted,
            Reason::Duplicate => Code::AlreadyExists,
            Reason::KeyInvalid | Reason::KeyMissing => Code::InvalidArgument,
            Reason::RequestTooLarge
            | Reason::CallerQuota
            | Reason::StoreFull
            | Reason::BuffersExhausted => Code::ResourceExhausted,
            Reason::CallerMissing | Reason::CallerInvalid => Code::Unauthenticated,
            Reason::StoreUnavailable | Reason::UpstreamUnavailable => Code::Unavailable,
            Reason::MalformedRequest => Code::Internal,
            // Not UNAVAILABLE: retry policies read that as "never processed".
            Reason::OutcomeNotRecorded => Code::Unknown,
        }
    }
}

/// An answer idemproxy gives in the service's place.
#[derive(Debug, Clone, PartialEq)]
pub struct Refusal {
    /// Why.
    pub reason: Reason,
    /// A human sentence for `grpc-message`.
    pub message: String,
    /// The key concerned, shown as its hash.
    pub key: Option<Key>,
    /// Where the key's record stands.
    pub state: Option<KeyState>,
    /// How long a retry should wait.
    pub retry_after: Option<Duration>,
    /// When the key's record stops protecting it (Unix ms), when a record holds the key: sent
    /// as `idempotency-expires`.
    pub expires_ms: Option<u64>,
}

impl Refusal {
    /// A refusal with a reason and message and nothing else.
    pub fn new(reason: Reason, message: impl Into<String>) -> Refusal {
        Refusal {
            reason,
            message: message.into(),
            key: None,
            state: None,
            retry_after: None,
            expires_ms: None,
        }
    }

    /// Says when the key's record expires (`None`: no record holds it).
    pub fn expiring(mut self, expires_ms: Option<u64>) -> Refusal {
        self.expires_ms = expires_ms;
        self
    }

    /// Names the key concerned and where its record stands. One call for both, so that no
    /// refusal about a key lacks its `state`.
    pub fn about(mut self, key: Key, state: KeyState) -> Refusal {
        self.key = Some(key);
        self.state = Some(state);
        self
    }

    /// An earlier attempt with `key` still runs (`why` says what gave up waiting for it); a
    /// retry may come back after `retry_after`.
    pub fn in_progress(key: Key, why: &str, retry_after: Option<Duration>) -> Refusal {
        let refusal = Refusal::new(Reason::InProgress, why).about(key, KeyState::InFlight);
        Refusal {
            retry_after,
            ..refusal
        }
    }

    /// A call with `key` was made already, and the method answers duplicates with this.
    pub fn duplicate(key: Key, state: KeyState) -> Refusal {
        Refusal::new(
            Reason::Duplicate,
            "a call with this idempotency key was already made",
        )
        .about(key, state)
    }

    /// `key` was used with another request payload; its record is in `state`.
    pub fn key_reused(key: Key, state: State) -> Refusal {
        Refusal::new(
            Reason::KeyReused,
            "this idempotency key was already used with another request",
        )
        .about(key, KeyState::of(state))
    }

    /// A call with `key` may have acted and its outcome is unknown: `why`.
    pub fn outcome_unknown(key: Key, why: impl std::fmt::Display) -> Refusal {
        Refusal::new(
            Reason::OutcomeUnknown,
            format!("the call may have taken effect and its outcome is unknown: {why}"),
        )
        .about(key, KeyState::InDoubt)
    }

    /// The record of `key` is IN_DOUBT: an earlier attempt may have acted.
    pub fn earlier_outcome_unknown(key: Key) -> Refusal {
        Refusal::new(
            Reason::OutcomeUnknown,
            "an earlier attempt with this key may have taken effect and its outcome is unknown",
        )
        .about(key, KeyState::InDoubt)
    }

    /// The recorded outcome of `key` cannot be opened: answered as unknown, never run again.
    pub fn unreadable(key: Key) -> Refusal {
        Refusal::new(
            Reason::OutcomeUnknown,
            "an earlier attempt with this key completed, but its recorded outcome cannot be decrypted (its key is no longer in the key file, or the record was altered)",
        )
        .about(key, KeyState::InDoubt)
    }

    /// The call of `key` completed, but its response was too large to keep.
    pub fn response_not_kept(key: Key) -> Refusal {
        Refusal::new(
            Reason::ResponseNotKept,
            "an earlier attempt with this key completed, but its response was too large to keep",
        )
        .about(key, KeyState::Completed)
    }

    /// The caller of `key` holds as many live records as it may.
    pub fn caller_quota(key: Key) -> Refusal {
        Refusal::new(
            Reason::CallerQuota,
            "this caller holds as many recorded keys as it may; retry once some expire",
        )
        .about(key, KeyState::Absent)
    }

    /// The service acted on `key`'s call, but its outcome could not be stored (`error`).
    pub fn outcome_not_recorded(key: Key, error: impl std::fmt::Display) -> Refusal {
        Refusal::new(
            Reason::OutcomeNotRecorded,
            format!("the service acted, but its outcome could not be stored, so it is unknown here: {error}"),
        )
        .about(key, KeyState::InFlight)
    }

    /// The service did not take `key`'s call (`why`); its record stands in `state`.
    pub fn upstream_unavailable(key: Key, why: impl std::fmt::Display, state: KeyState) -> Refusal {
        Refusal::new(
            Reason::UpstreamUnavailable,
            format!("the service is unavailable: {why}"),
        )
        .about(key, state)
    }

    /// Tells the client when to retry.
    pub fn with_retry_after(mut self, delay: Duration) -> Refusal {
        self.retry_after = Some(delay);
        self
    }

    /// The `google.rpc.Status` carried in `grpc-status-details-bin`.
    pub fn to_status_proto(&self) -> Status {
        let mut metadata = std::collections::HashMap::new();
        if let Some(key) = &self.key {
            metadata.insert("key_hash".to_string(), key.hex());
        }
        if let Some(state) = self.state {
            metadata.insert("state".to_string(), state.as_str().to_string());
        }
        let info = ErrorInfo {
            reason: self.reason.as_str().to_string(),
            domain: DOMAIN.to_string(),
            metadata,
        };
        let mut details = vec![any("google.rpc.ErrorInfo", &info)];
        if let Some(delay) = self.retry_after {
            let retry = RetryInfo {
                retry_delay: Some(prost_types::Duration {
                    seconds: i64::try_from(delay.as_secs()).unwrap_or(i64::MAX),
                    nanos: i32::try_from(delay.subsec_nanos()).unwrap_or(0),
                }),
            };
            details.push(any("google.rpc.RetryInfo", &retry));
        }
        Status {
            code: self.reason.code() as i32,
            message: self.message.clone(),
            details,
        }
    }

    /// The status fields, as a trailers-only response's headers carry them.
    pub fn to_headers(&self) -> HeaderMap {
        let mut headers = HeaderMap::with_capacity(5);
        headers.insert(
            http::header::CONTENT_TYPE,
            HeaderValue::from_static("application/grpc"),
        );
        headers.insert("grpc-status", HeaderValue::from(self.reason.code() as u32));
        let message = percent_encode(&self.message);
        if let Ok(value) = HeaderValue::from_str(&message) {
            headers.insert("grpc-message", value);
        }
        let details = base64::engine::general_purpose::STANDARD_NO_PAD
            .encode(self.to_status_proto().encode_to_vec());
        headers.insert(
            "grpc-status-details-bin",
            HeaderValue::from_str(&details).expect("base64 is a valid header value"),
        );
        if let Some(delay) = self.retry_after {
            let millis = u64::try_from(delay.as_millis()).unwrap_or(u64::MAX);
            headers.insert("grpc-retry-pushback-ms", HeaderValue::from(millis));
        }
        if let Some(expires_ms) = self.expires_ms {
            headers.insert(EXPIRES_HEADER, HeaderValue::from(expires_s(expires_ms)));
        }
        headers
    }
}

fn any(name: &str, message: &impl Message) -> prost_types::Any {
    prost_types::Any {
        type_url: format!("type.googleapis.com/{name}"),
        value: message.encode_to_vec(),
    }
}

/// Percent-encodes a `grpc-message` as the gRPC HTTP/2 spec asks: every byte outside
/// 0x20..=0x7e, and `%` itself.
pub fn percent_encode(message: &str) -> String {
    use std::fmt::Write;
    let mut out = String::with_capacity(message.len());
    for byte in message.bytes() {
        if (0x20..=0x7e).contains(&byte) && byte != b'%' {
            out.push(byte as char);
        } else {
            write!(out, "%{byte:02X}").expect("writing to a String cannot fail");
        }
    }
    out
}

/// Maps an HTTP status of a non-gRPC answer to a gRPC code, as the gRPC spec's
/// "HTTP to gRPC Status Code Mapping" does.
pub fn code_of_http_status(status: u16) -> Code {
    match status {
        400 => Code::Internal,
        401 => Code::Unauthenticated,
        403 => Code::PermissionDenied,
        404 => Code::Unimplemented,
        429 | 502 | 503 | 504 => Code::Unavailable,
        _ => Code::Unknown,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percent_encoding_follows_the_spec() {
        assert_eq!(percent_encode("plain text"), "plain text");
        assert_eq!(percent_encode("100%"), "100%25");
        assert_eq!(percent_encode("é\n"), "%C3%A9%0A");
    }

    #[test]
    fn refusal_headers_carry_error_info_and_pushback() {
        let key = Key::derive("/s.S/M", "-", b"k");
        let refusal = Refusal::new(Reason::InProgress, "wait")
            .about(key, KeyState::InFlight)
            .with_retry_after(Duration::from_millis(250));
        let headers = refusal.to_headers();
        assert_eq!(headers["grpc-status"], "10");
        assert_eq!(headers["grpc-retry-pushback-ms"], "250");
        let raw = base64::engine::general_purpose::STANDARD_NO_PAD
            .decode(headers["grpc-status-details-bin"].as_bytes())
            .expect("details are base64");
        let status = Status::decode(&raw[..]).expect("details are a google.rpc.Status");
        assert_eq!(status.code, 10);
        let info = ErrorInfo::decode(&status.details[0].value[..]).expect("ErrorInfo");
        assert_eq!(info.reason, "IDEMPOTENCY_IN_PROGRESS");
        assert_eq!(info.domain, "idemproxy");
        assert_eq!(info.metadata["key_hash"], key.hex());
        assert_eq!(info.metadata["state"], "IN_FLIGHT");
        assert_eq!(
            status.details[1].type_url,
            "type.googleapis.com/google.rpc.RetryInfo"
        );
    }
}
