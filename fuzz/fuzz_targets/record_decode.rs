//! Stored record bytes (a damaged data dir, a foreign Redis value): decoding, every claim
//! against the decoded record, opening a sealed response, and writing a replay back.
#![no_main]

use idemproxy::key::Key;
use idemproxy::record::{self, ClaimRequest, Record};
use libfuzzer_sys::fuzz_target;
use prost::Message;

fuzz_target!(|data: &[u8]| {
    let Ok(stored) = Record::decode(data) else {
        return;
    };
    let key = Key::derive("/p.S/M", "caller", b"serial");
    let sealer = idemproxy::seal::Sealer::parse("k AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=")
        .expect("a valid key file");
    let opened = sealer.open(&key, &stored);
    let fingerprint = [7u8; 32];
    for (sole_owner, retry_in_doubt, at_quota) in [
        (None, false, false),
        (Some([1u8; 8]), true, false),
        (None, false, true),
    ] {
        let request = ClaimRequest {
            fingerprint: &fingerprint,
            method: "/p.S/M",
            caller: "caller",
            token: [2; 16],
            now_ms: stored.created_ms.wrapping_add(1),
            lease_until_ms: 10,
            expires_ms: 20,
            sole_owner,
            retry_in_doubt,
            origin: None,
            at_quota,
            serial: None,
        };
        if let (_, record::Claimed::Replay(response)) = record::claim(Some(&opened), &request) {
            let _ = idemproxy::proxy::recorded_response(response, true, None);
        }
    }
    let _ = record::recover(Some(&stored), Some(&[1; 8]));
    let _ = record::evict(Some(&stored));
});
