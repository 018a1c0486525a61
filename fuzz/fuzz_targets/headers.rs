//! What callers put in headers: the serial, the caller source setting, and Envoy's
//! x-forwarded-client-cert.
#![no_main]

use idemproxy::caller::{xfcc_caller, CallerSource};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = idemproxy::key::validate_serial(data);
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = CallerSource::parse(text);
        if let Ok(Some(uri)) = xfcc_caller(text) {
            assert!(!uri.is_empty(), "an XFCC caller is never empty");
        }
    }
});
