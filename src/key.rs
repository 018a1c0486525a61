//! Key and fingerprint derivation (design §2).
//!
//! Owns the one definition of what makes two calls "the same": the key (method, caller,
//! serial) and the request fingerprint. It must never let a raw serial or caller escape into
//! a log line: everything printable here is a hash.

use sha2::{Digest, Sha256};
use std::fmt;

/// The longest serial (idempotency key value) accepted, in bytes.
pub const SERIAL_BYTES_MAX: usize = 255;

/// The caller recorded when the request names none.
pub const ANONYMOUS_CALLER: &str = "-";

/// Domain separator hashed before every key, so a key can never collide with a hash of
/// anything else and a later format can change it.
const KEY_DOMAIN: &[u8] = b"idemproxy/v1";

/// The 32-byte idempotency key: SHA-256 over method, caller and serial.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Key([u8; 32]);

impl Key {
    /// Derives the key of one logical request. Each part is length-prefixed so that
    /// `("ab", "c")` and `("a", "bc")` never meet.
    pub fn derive(method: &str, caller: &str, serial: &[u8]) -> Key {
        let mut hasher = Sha256::new();
        hasher.update(KEY_DOMAIN);
        for part in [method.as_bytes(), caller.as_bytes(), serial] {
            let len = u32::try_from(part.len()).expect("key parts are bounded far below 4 GiB");
            hasher.update(len.to_be_bytes());
            hasher.update(part);
        }
        Key(hasher.finalize().into())
    }

    /// Wraps stored key bytes; `None` unless exactly 32 bytes.
    pub fn from_slice(bytes: &[u8]) -> Option<Key> {
        bytes.try_into().ok().map(Key)
    }

    /// A key from its 64 lowercase or uppercase hex digits, as operators and logs show it.
    pub fn from_hex(hex: &str) -> Option<Key> {
        Key::from_slice(&unhex(hex)?)
    }

    /// The raw 32 bytes, as stores index them.
    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// The full lowercase hex form, for APIs and error details.
    pub fn hex(&self) -> String {
        hex(&self.0)
    }

    /// The first 16 hex digits: the most a log line may show.
    pub fn short(&self) -> String {
        hex(&self.0[..8])
    }
}

impl fmt::Debug for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Key({})", self.short())
    }
}

impl fmt::Display for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.short())
    }
}

/// Lowercase hex of any bytes.
pub fn hex(bytes: &[u8]) -> String {
    use fmt::Write;
    let mut out = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        write!(out, "{b:02x}").expect("writing to a String cannot fail");
    }
    out
}

/// Why a serial was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SerialError {
    /// The header was present with an empty value.
    #[error("the idempotency key is empty")]
    Empty,
    /// More than [`SERIAL_BYTES_MAX`] bytes.
    #[error("the idempotency key is {0} bytes long, more than the {SERIAL_BYTES_MAX} allowed")]
    TooLong(usize),
    /// A byte outside visible ASCII (0x21..=0x7e).
    #[error("the idempotency key holds a byte that is not visible ASCII at position {0}")]
    NotVisibleAscii(usize),
}

/// Bytes from hex digits (either case); `None` for anything else.
pub fn unhex(hex: &str) -> Option<Vec<u8>> {
    if !hex.len().is_multiple_of(2) || !hex.is_ascii() {
        return None;
    }
    (0..hex.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).ok())
        .collect()
}

/// Checks a serial: 1–255 bytes of visible ASCII (design §2).
pub fn validate_serial(serial: &[u8]) -> Result<(), SerialError> {
    if serial.is_empty() {
        return Err(SerialError::Empty);
    }
    if serial.len() > SERIAL_BYTES_MAX {
        return Err(SerialError::TooLong(serial.len()));
    }
    match serial.iter().position(|b| !b.is_ascii_graphic()) {
        Some(at) => Err(SerialError::NotVisibleAscii(at)),
        None => Ok(()),
    }
}

/// SHA-256 over the request body: the length-prefixed gRPC message frames as the caller sent
/// them. Same key with another fingerprint is key reuse.
pub fn fingerprint(body: &[u8]) -> [u8; 32] {
    Sha256::digest(body).into()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn length_prefixes_separate_parts() {
        let a = Key::derive("/s.S/M", "ab", b"c");
        let b = Key::derive("/s.S/M", "a", b"bc");
        assert_ne!(a, b);
    }

    #[test]
    fn key_is_stable_across_releases() {
        // A stored record is found again only if this never changes: pin one value.
        let key = Key::derive("/pkg.Svc/Do", "-", b"order-1");
        let mut hasher = Sha256::new();
        hasher.update(b"idemproxy/v1");
        for part in [&b"/pkg.Svc/Do"[..], b"-", b"order-1"] {
            hasher.update((part.len() as u32).to_be_bytes());
            hasher.update(part);
        }
        let expected: [u8; 32] = hasher.finalize().into();
        assert_eq!(key.as_bytes(), &expected);
        assert_eq!(key.short().len(), 16);
        assert_eq!(key.hex().len(), 64);
    }

    #[test]
    fn callers_scope_keys() {
        assert_ne!(
            Key::derive("/s.S/M", "alice", b"1"),
            Key::derive("/s.S/M", "bob", b"1")
        );
    }

    #[test]
    fn serial_edges() {
        assert_eq!(validate_serial(b""), Err(SerialError::Empty));
        assert!(validate_serial(&[b'a'; 255]).is_ok());
        assert_eq!(
            validate_serial(&[b'a'; 256]),
            Err(SerialError::TooLong(256))
        );
        assert_eq!(
            validate_serial(b"a b"),
            Err(SerialError::NotVisibleAscii(1))
        );
        assert_eq!(
            validate_serial("é".as_bytes()),
            Err(SerialError::NotVisibleAscii(0))
        );
        assert!(validate_serial(b"!~").is_ok());
    }
}
