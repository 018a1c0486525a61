//! Records at rest: the recorded response sealed with AES-256-GCM (ring), so a copy of the
//! data dir or of Redis does not give away payment details or personal data.
//!
//! Only the response (headers, messages, trailers) and the serial a probed method keeps are
//! secret; the rest of a record is what the engine and operators must read without a key
//! (state, fingerprint hash, times). The
//! associated data binds a sealed response to its key hash, fingerprint, method, caller,
//! creation time and key id, so it opens under no other record. A record that cannot be
//! opened (its key removed from the file, or its bytes altered) is never treated as absent:
//! its key answers IN_DOUBT (`record::claim`), so the call is not run again.

use crate::key::Key;
use crate::pb::idemproxy::v1::{Record, Sealed as SealedResponse};
use crate::record::Change;
use crate::store::{Operation, Page, Store, StoreError};
use base64::Engine as _;
use prost::Message;
use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM, NONCE_LEN};
use ring::rand::{SecureRandom, SystemRandom};
use std::borrow::Cow;
use std::path::Path;
use std::sync::Arc;

/// The longest key id.
const KEY_ID_MAX: usize = 64;

/// A key file that cannot be used.
#[derive(Debug, thiserror::Error)]
#[error("--encryption-key-file {path}: {reason}")]
pub struct KeyFileError {
    /// The file.
    pub path: String,
    /// What is wrong with it, by line.
    pub reason: String,
}

/// The keys of a key file: the first seals, every one opens.
pub struct Sealer {
    keys: Vec<(String, LessSafeKey)>,
    random: SystemRandom,
}

impl std::fmt::Debug for Sealer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let ids: Vec<&str> = self.keys.iter().map(|(id, _)| id.as_str()).collect();
        f.debug_struct("Sealer").field("key_ids", &ids).finish()
    }
}

impl Sealer {
    /// Reads a key file: one `<id> <base64 of 32 bytes>` per line; `#` starts a comment.
    pub fn from_file(path: &Path) -> Result<Sealer, KeyFileError> {
        let fail = |reason: String| KeyFileError {
            path: path.display().to_string(),
            reason,
        };
        let text = crate::files::read_text(path, crate::files::SECRET_BYTES_MAX)
            .map_err(|e| fail(e.to_string()))?;
        Sealer::parse(&text).map_err(fail)
    }

    /// Parses a key file's text.
    pub fn parse(text: &str) -> Result<Sealer, String> {
        let mut keys: Vec<(String, LessSafeKey)> = Vec::new();
        for (number, line) in text.lines().enumerate() {
            let line = line.split('#').next().unwrap_or("").trim();
            if line.is_empty() {
                continue;
            }
            let at = |why: &str| format!("line {}: {why}", number + 1);
            let mut fields = line.split_whitespace();
            let (Some(id), Some(secret), None) = (fields.next(), fields.next(), fields.next())
            else {
                return Err(at("write `<key id> <base64 of 32 random bytes>`"));
            };
            let id_ok = id.len() <= KEY_ID_MAX
                && id
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'));
            if !id_ok {
                return Err(at("a key id is 1 to 64 letters, digits, `-`, `_` or `.`"));
            }
            if keys.iter().any(|(known, _)| known == id) {
                return Err(at(&format!("the key id `{id}` is given twice")));
            }
            let bytes = base64::engine::general_purpose::STANDARD
                .decode(secret)
                .map_err(|_| at("the key is not base64"))?;
            let unbound = UnboundKey::new(&AES_256_GCM, &bytes)
                .map_err(|_| at(&format!("a key is 32 bytes, this one is {}", bytes.len())))?;
            keys.push((id.to_owned(), LessSafeKey::new(unbound)));
        }
        if keys.is_empty() {
            return Err("holds no key".into());
        }
        Ok(Sealer {
            keys,
            random: SystemRandom::new(),
        })
    }

    /// The id of the key that seals new records.
    pub fn sealing_key_id(&self) -> &str {
        &self.keys[0].0
    }

    /// The record as the engine reads it: its response and serial opened. A record whose
    /// response cannot be opened keeps `sealed` set and no response (`record::claim` answers
    /// it IN_DOUBT); one whose serial cannot be opened has none (no probe can ask about it:
    /// it waits for an operator).
    pub fn open<'a>(&self, key: &Key, record: &'a Record) -> Cow<'a, Record> {
        if record.sealed.is_none() && record.sealed_serial.is_none() {
            return Cow::Borrowed(record);
        }
        let mut opened = record.clone();
        if let Some(sealed) = &record.sealed {
            let response = self
                .open_part(key, record, sealed, Part::Response)
                .and_then(|plain| {
                    crate::record::Response::decode(&plain[..])
                        .map_err(|_| "its plaintext does not decode")
                });
            match response {
                Ok(response) => {
                    opened.sealed = None;
                    opened.response = Some(response);
                }
                Err(why) => {
                    tracing::warn!(key = %key, key_id = %sealed.key_id, "a recorded response cannot be opened: {why}; its key answers IN_DOUBT");
                }
            }
        }
        if let Some(sealed) = &record.sealed_serial {
            match self.open_part(key, record, sealed, Part::Serial) {
                Ok(serial) => {
                    opened.sealed_serial = None;
                    opened.serial = serial;
                }
                Err(why) => {
                    tracing::warn!(key = %key, key_id = %sealed.key_id, "a probed call's serial cannot be opened: {why}; no probe can ask about it");
                }
            }
        }
        Cow::Owned(opened)
    }

    fn open_part(
        &self,
        key: &Key,
        record: &Record,
        sealed: &SealedResponse,
        part: Part,
    ) -> Result<Vec<u8>, &'static str> {
        let (_, cipher) = self
            .keys
            .iter()
            .find(|(id, _)| *id == sealed.key_id)
            .ok_or("its key is not in the key file")?;
        let nonce = Nonce::try_assume_unique_for_key(&sealed.nonce).map_err(|_| "a bad nonce")?;
        let mut buffer = sealed.ciphertext.clone();
        let aad = associated_data(key, record, &sealed.key_id, part);
        let plain = cipher
            .open_in_place(nonce, Aad::from(&aad), &mut buffer)
            .map_err(|_| "it was altered, or moved from another record")?;
        Ok(plain.to_vec())
    }

    /// `transition` as a store applies it: it sees the current record opened, and its change
    /// is sealed. The engine and the admin API both write through this.
    pub fn around<'a, T>(
        &'a self,
        key: &'a Key,
        mut transition: impl FnMut(Option<&Record>) -> (Change, T) + Send + 'a,
    ) -> impl FnMut(Option<&Record>) -> (Change, T) + Send + 'a {
        move |current| {
            let opened = current.map(|record| self.open(key, record));
            let (change, value) = transition(opened.as_deref());
            (self.seal(key, change), value)
        }
    }

    /// The change as the store writes it: a record's response and serial sealed under the
    /// first key.
    pub fn seal(&self, key: &Key, change: Change) -> Change {
        let Change::Put(mut record) = change else {
            return change;
        };
        if let Some(response) = record.response.take() {
            match self.seal_part(key, &record, Part::Response, response.encode_to_vec()) {
                Some(sealed) => record.sealed = Some(sealed),
                None => {
                    // The system's random source failed: keep the outcome rather than lose
                    // it, and say so.
                    tracing::error!(key = %key, "could not seal a response; it is kept unsealed");
                    record.response = Some(response);
                }
            }
        }
        if !record.serial.is_empty() {
            let serial = std::mem::take(&mut record.serial);
            match self.seal_part(key, &record, Part::Serial, serial.clone()) {
                Some(sealed) => record.sealed_serial = Some(sealed),
                None => {
                    tracing::error!(key = %key, "could not seal a serial; it is kept unsealed");
                    record.serial = serial;
                }
            }
        }
        Change::Put(record)
    }

    /// `plain` sealed as `part` of `record` under the first key; `None` when the random
    /// source failed.
    fn seal_part(
        &self,
        key: &Key,
        record: &Record,
        part: Part,
        mut plain: Vec<u8>,
    ) -> Option<SealedResponse> {
        let (id, cipher) = &self.keys[0];
        let mut nonce = [0u8; NONCE_LEN];
        self.random.fill(&mut nonce).ok()?;
        let aad = associated_data(key, record, id, part);
        cipher
            .seal_in_place_append_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(&aad),
                &mut plain,
            )
            .ok()?;
        Some(SealedResponse {
            key_id: id.clone(),
            nonce: nonce.to_vec(),
            ciphertext: plain,
        })
    }
}

/// What a sealed part of a record is: named in the associated data, so a sealed serial never
/// opens as a response, nor a response as a serial.
#[derive(Clone, Copy)]
enum Part {
    Response,
    Serial,
}

impl Part {
    fn label(self) -> &'static [u8] {
        match self {
            Part::Response => b"idemproxy/v1 sealed response",
            Part::Serial => b"idemproxy/v1 sealed serial",
        }
    }
}

/// What a sealed part is bound to: length-prefixed, so no two records' data coincide.
fn associated_data(key: &Key, record: &Record, key_id: &str, what: Part) -> Vec<u8> {
    let mut aad = Vec::with_capacity(128);
    let created = record.created_ms.to_be_bytes();
    for part in [
        what.label(),
        key.as_bytes(),
        &record.fingerprint,
        record.method.as_bytes(),
        record.caller.as_bytes(),
        &created,
        key_id.as_bytes(),
    ] {
        aad.extend_from_slice(&(part.len() as u32).to_be_bytes());
        aad.extend_from_slice(part);
    }
    aad
}

/// The store layer that seals what is written and opens what is read: every transition sees
/// records opened, every record written is sealed under the first key, and a scan shows
/// records opened. With no sealer it passes everything through, so the engine and the admin
/// API write records the same way whether or not encryption at rest is on.
pub struct Sealed<S> {
    inner: S,
    sealer: Option<Arc<Sealer>>,
}

impl<S: Store> Sealed<S> {
    /// `inner`, sealed with `sealer` when there is one.
    pub fn new(inner: S, sealer: Option<Arc<Sealer>>) -> Sealed<S> {
        Sealed { inner, sealer }
    }
}

impl<S: Store> Sealed<S> {
    /// The store this layer wraps.
    fn inner_store(&self) -> &S {
        &self.inner
    }
}

impl<S: Store> Store for Sealed<S> {
    async fn update<T, F>(
        &self,
        operation: Operation,
        key: &Key,
        transition: F,
    ) -> Result<T, StoreError>
    where
        T: Send,
        F: FnMut(Option<&Record>) -> (Change, T) + Send,
    {
        match &self.sealer {
            None => self.inner.update(operation, key, transition).await,
            Some(sealer) => {
                let sealed = sealer.around(key, transition);
                self.inner.update(operation, key, sealed).await
            }
        }
    }

    async fn scan(&self, cursor: Option<Vec<u8>>, limit: usize) -> Result<Page, StoreError> {
        let mut page = self.inner.scan(cursor, limit).await?;
        if let Some(sealer) = &self.sealer {
            for (key, record) in &mut page.records {
                if let Cow::Owned(opened) = sealer.open(key, record) {
                    *record = opened;
                }
            }
        }
        Ok(page)
    }

    crate::delegate_store!(inner_store);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::record::Response;
    use bytes::Bytes;

    fn keyfile(ids: &[(&str, u8)]) -> String {
        ids.iter()
            .map(|(id, byte)| {
                let secret = base64::engine::general_purpose::STANDARD.encode([*byte; 32]);
                format!("{id} {secret}\n")
            })
            .collect()
    }

    fn completed(body: &'static [u8]) -> Record {
        Record {
            fingerprint: vec![1; 32],
            method: "/p.S/M".into(),
            caller: "alice".into(),
            created_ms: 42,
            response: Some(Response {
                body: Bytes::from_static(body),
                ..Response::default()
            }),
            ..Record::default()
        }
    }

    fn sealed(sealer: &Sealer, key: &Key, record: Record) -> Record {
        match sealer.seal(key, Change::Put(record)) {
            Change::Put(record) => record,
            _ => unreachable!(),
        }
    }

    #[test]
    fn a_probed_calls_serial_is_sealed_and_opens_only_as_a_serial() {
        let sealer = Sealer::parse(&keyfile(&[("k1", 1)])).unwrap();
        let key = Key::derive("/p.S/M", "alice", b"order-7f3a-payment-1");
        let in_doubt = Record {
            serial: b"order-7f3a-payment-1".to_vec(),
            response: None,
            ..completed(b"")
        };
        let record = sealed(&sealer, &key, in_doubt);
        assert!(record.serial.is_empty() && record.sealed_serial.is_some());
        let stored = record.encode_to_vec();
        assert!(!stored.windows(10).any(|w| w == b"order-7f3a"));
        let opened = sealer.open(&key, &record);
        assert_eq!(opened.serial, b"order-7f3a-payment-1");
        assert!(opened.sealed_serial.is_none());
        // Put where a response goes, it does not open as one.
        let swapped = Record {
            sealed: record.sealed_serial.clone(),
            sealed_serial: None,
            ..record.clone()
        };
        assert!(sealer.open(&key, &swapped).response.is_none());
        // Altered: no serial, so no probe can ask about it.
        let mut altered = record.clone();
        altered.sealed_serial.as_mut().unwrap().ciphertext[0] ^= 1;
        assert!(sealer.open(&key, &altered).serial.is_empty());
    }

    #[test]
    fn a_sealed_response_opens_only_in_its_own_record() {
        let sealer = Sealer::parse(&keyfile(&[("k1", 1)])).unwrap();
        let key = Key::derive("/p.S/M", "alice", b"1");
        let record = sealed(&sealer, &key, completed(b"secret card number"));
        assert!(record.response.is_none());
        let stored = record.encode_to_vec();
        assert!(!stored.windows(6).any(|w| w == b"secret"));
        let opened = sealer.open(&key, &record);
        assert_eq!(
            opened.response.as_ref().unwrap().body,
            &b"secret card number"[..]
        );
        // Moved to another key, or another caller's record: it does not open.
        let other = Key::derive("/p.S/M", "bob", b"1");
        assert!(sealer.open(&other, &record).response.is_none());
        let mut moved = record.clone();
        moved.caller = "bob".into();
        assert!(sealer.open(&key, &moved).response.is_none());
        // One bit flipped in the ciphertext: detected.
        let mut altered = record.clone();
        altered.sealed.as_mut().unwrap().ciphertext[3] ^= 1;
        let opened = sealer.open(&key, &altered);
        assert!(opened.response.is_none() && opened.sealed.is_some());
    }

    #[test]
    fn rotation_opens_old_records_and_seals_with_the_first_key() {
        let key = Key::derive("/p.S/M", "alice", b"1");
        let old = Sealer::parse(&keyfile(&[("old", 1)])).unwrap();
        let record = sealed(&old, &key, completed(b"x"));
        let rotated = Sealer::parse(&keyfile(&[("new", 2), ("old", 1)])).unwrap();
        assert!(rotated.open(&key, &record).response.is_some());
        let resealed = sealed(&rotated, &key, completed(b"y"));
        assert_eq!(resealed.sealed.as_ref().unwrap().key_id, "new");
        let removed = Sealer::parse(&keyfile(&[("new", 2)])).unwrap();
        assert!(removed.open(&key, &record).response.is_none());
    }

    #[test]
    fn bad_key_files_are_named_by_line() {
        for (text, expected) in [
            ("", "no key"),
            ("k1\n", "line 1"),
            ("k1 notbase64!\n", "not base64"),
            ("k1 AAAA\n", "32 bytes"),
            ("bad/id AAAA\n", "key id"),
        ] {
            let error = Sealer::parse(text).unwrap_err();
            assert!(error.contains(expected), "{text:?}: {error}");
        }
        let twice = keyfile(&[("k", 1), ("k", 2)]);
        assert!(Sealer::parse(&twice).unwrap_err().contains("twice"));
        let commented = format!("# rotated 2026-12\n{}", keyfile(&[("k", 1)]));
        assert_eq!(Sealer::parse(&commented).unwrap().sealing_key_id(), "k");
    }
}
