//! What callers put in headers: the serial, the caller source setting, Envoy's
//! x-forwarded-client-cert, and a key's window (`idempotency-first-sent` checked against a
//! retention and a clock skew that the input picks too; `idempotency-expires` written back).
#![no_main]

use idemproxy::caller::{xfcc_caller, CallerSource};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = idemproxy::key::validate_serial(data);
    if let Ok(first_sent_s) = idemproxy::window::parse_first_sent(data) {
        let pick = |at: usize| u64::from(data.get(at).copied().unwrap_or(0));
        let now_ms = first_sent_s.wrapping_mul(1000).wrapping_add(pick(0) << 20);
        let retention = std::time::Duration::from_secs(pick(1) << 16);
        let skew = std::time::Duration::from_secs(pick(2));
        let _ = idemproxy::window::check_first_sent(first_sent_s, now_ms, retention, skew);
        let _ = http::HeaderValue::from(idemproxy::status::expires_s(now_ms));
    }
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = CallerSource::parse(text);
        if let Ok(Some(uri)) = xfcc_caller(text) {
            assert!(!uri.is_empty(), "an XFCC caller is never empty");
        }
    }
});
