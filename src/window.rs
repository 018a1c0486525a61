//! A key's window (design §3, §4): how long its record protects it, said to the caller as
//! `idempotency-expires`, and the check of a retry's `idempotency-first-sent` against it.
//!
//! Pure: times in, a verdict out. A retry whose first attempt is older than the retention
//! may find its record gone, and would run again as a new call: it is refused instead,
//! whether or not the record is still there, so the verdict never depends on the sweeper's
//! timing.

use std::time::Duration;

/// The longest `idempotency-first-sent` value accepted, in digits (seconds since the Unix
/// epoch fit in 11 digits until the year 5138).
const FIRST_SENT_DIGITS_MAX: usize = 12;

/// Why a retry's first-sent time is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FirstSentError {
    /// Not whole seconds since the Unix epoch.
    #[error("idempotency-first-sent must be whole seconds since the Unix epoch (at most 12 digits), not {0:?}")]
    Malformed(String),
    /// Later than now by more than the clock skew allowed.
    #[error("idempotency-first-sent is {ahead_s} s in the future, more than the {skew_s} s of clock skew allowed (--max-clock-skew): check the caller's clock")]
    InTheFuture {
        /// How far ahead of this sidecar's clock.
        ahead_s: u64,
        /// The skew allowed.
        skew_s: u64,
    },
    /// The first attempt is older than the key's window.
    #[error("the first attempt of this key was sent {age_s} s ago, longer than the {window_s} s its record is sure to protect it (the method's retention less --max-clock-skew): its outcome may be gone, so this retry is refused rather than run again; send the call under a new key if it is meant to run")]
    Expired {
        /// How long ago the first attempt was sent.
        age_s: u64,
        /// The retention less the skew.
        window_s: u64,
    },
}

/// Reads an `idempotency-first-sent` value: whole seconds since the Unix epoch.
pub fn parse_first_sent(value: &[u8]) -> Result<u64, FirstSentError> {
    let malformed = || FirstSentError::Malformed(String::from_utf8_lossy(value).into_owned());
    if value.is_empty()
        || value.len() > FIRST_SENT_DIGITS_MAX
        || !value.iter().all(u8::is_ascii_digit)
    {
        return Err(malformed());
    }
    // At most 12 ASCII digits: always a u64.
    std::str::from_utf8(value)
        .ok()
        .and_then(|digits| digits.parse().ok())
        .ok_or_else(malformed)
}

/// Whether a retry whose first attempt was sent at `first_sent_s` may still be answered from
/// its key's record at `now_ms`, under `retention` and with clocks apart by up to `skew`.
///
/// The record was written when the first attempt reached this sidecar, which is no earlier
/// than the caller sent it by the caller's clock less the skew; so the record is sure to be
/// there only while the first attempt, by the caller's clock, is younger than the retention
/// less the skew. Past that the retry is refused.
pub fn check_first_sent(
    first_sent_s: u64,
    now_ms: u64,
    retention: Duration,
    skew: Duration,
) -> Result<(), FirstSentError> {
    let first_sent_ms = first_sent_s.saturating_mul(1000);
    let skew_ms = skew.as_millis() as u64;
    if first_sent_ms > now_ms.saturating_add(skew_ms) {
        return Err(FirstSentError::InTheFuture {
            ahead_s: (first_sent_ms - now_ms) / 1000,
            skew_s: skew.as_secs(),
        });
    }
    let age_ms = now_ms.saturating_sub(first_sent_ms);
    let window_ms = (retention.as_millis() as u64).saturating_sub(skew_ms);
    if age_ms > window_ms {
        return Err(FirstSentError::Expired {
            age_s: age_ms / 1000,
            window_s: window_ms / 1000,
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINUTE: Duration = Duration::from_secs(60);

    #[test]
    fn a_first_sent_time_is_whole_seconds() {
        assert_eq!(parse_first_sent(b"1796650000"), Ok(1_796_650_000));
        for bad in [&b""[..], b"-1", b"1.5", b" 1", b"1e9", b"1234567890123"] {
            assert!(parse_first_sent(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn a_retry_is_answered_within_the_retention_less_the_skew() {
        let now_ms = 1_000_000_000;
        let retention = Duration::from_secs(600);
        let check = |first_sent_s| check_first_sent(first_sent_s, now_ms, retention, MINUTE);
        let now_s = now_ms / 1000;
        assert_eq!(check(now_s), Ok(()));
        assert_eq!(check(now_s - 540), Ok(()), "the edge of the window");
        assert!(matches!(
            check(now_s - 541),
            Err(FirstSentError::Expired { window_s: 540, .. })
        ));
        assert_eq!(check(now_s + 60), Ok(()), "a clock ahead within the skew");
        assert!(matches!(
            check(now_s + 61),
            Err(FirstSentError::InTheFuture { ahead_s: 61, .. })
        ));
        // A retention shorter than the skew leaves no window but the present second.
        let short = check_first_sent(now_s - 1, now_ms, Duration::from_secs(30), MINUTE);
        assert!(short.is_err());
    }
}
