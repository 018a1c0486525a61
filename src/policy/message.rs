//! Request messages seen through their descriptors: where the annotated key and ignored fields
//! are (at start), and per call the serial from the key fields (one, or a composite of
//! several) plus a canonical fingerprint.
//!
//! The fingerprint hashes a canonical form — fields in number order, map entries in key
//! order, packed and unpacked lists alike, ignored fields left out — so a client library that
//! orders fields differently, or a retry with a new timestamp in an ignored field, is still
//! the same request. Unknown fields are hashed as received: a payload this descriptor cannot
//! read is never assumed equal to another.

use super::{is_key_kind, path_name, FieldPath, FIELD_EXTENSION};
use crate::pb::idemproxy::v1::FieldPolicy;
use bytes::Bytes;
use prost_reflect::{
    DescriptorPool, DynamicMessage, FieldDescriptor, Kind, MapKey, MessageDescriptor, Value,
};
use sha2::{Digest, Sha256};

/// Nesting followed when looking for annotated fields; deeper messages are not searched.
const FIELD_DEPTH_MAX: usize = 8;

/// What a request message yields.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Inspected {
    /// The key field's value, when it is set and not empty.
    pub serial: Option<Bytes>,
    /// The canonical fingerprint.
    pub fingerprint: [u8; 32],
}

/// Finds the key field and the ignored fields of `input`, nested messages included.
pub fn annotated_fields(
    pool: &DescriptorPool,
    input: &MessageDescriptor,
) -> Result<(Vec<FieldPath>, Vec<FieldPath>), String> {
    let Some(extension) = pool.get_extension_by_name(FIELD_EXTENSION) else {
        return Ok((Vec::new(), Vec::new()));
    };
    let mut keys = Vec::new();
    let mut ignored = Vec::new();
    let mut stack: Vec<(MessageDescriptor, FieldPath)> = vec![(input.clone(), Vec::new())];
    while let Some((message, prefix)) = stack.pop() {
        for field in message.fields() {
            let mut path = prefix.clone();
            path.push(field.clone());
            let options = field.options();
            if options.has_extension(&extension) {
                let policy = options
                    .get_extension(&extension)
                    .as_message()
                    .and_then(|message| message.transcode_to::<FieldPolicy>().ok())
                    .ok_or_else(|| {
                        format!(
                            "field {} has an unreadable ({FIELD_EXTENSION})",
                            path_name(&path)
                        )
                    })?;
                if policy.key {
                    keys.push(path.clone());
                }
                if policy.ignore_in_fingerprint {
                    ignored.push(path.clone());
                }
            }
            let nested = !field.is_list() && !field.is_map();
            if let (Kind::Message(inner), true) = (field.kind(), nested) {
                if path.len() < FIELD_DEPTH_MAX && !prefix.iter().any(|f| f.kind() == field.kind())
                {
                    stack.push((inner, path));
                }
            }
        }
    }
    for path in &keys {
        let field = path.last().expect("a path has a field");
        if !is_key_kind(field) {
            return Err(format!(
                "key field {} must be a single string, bytes or integer field",
                path_name(path)
            ));
        }
    }
    // A composite key's parts in field-number order, a nested field by its path's numbers.
    keys.sort_by_key(|path| path.iter().map(FieldDescriptor::number).collect::<Vec<_>>());
    Ok((keys, ignored))
}

/// Decodes one unary request message and reads its key and fingerprint.
pub fn inspect(
    input: &MessageDescriptor,
    message: &[u8],
    key_fields: &[FieldPath],
    ignored: &[FieldPath],
) -> Result<Inspected, String> {
    let (serial, decoded) = decode_masked(input, message, key_fields, ignored)?;
    // Unchanged since 0.1.0: records already kept must still match their retries.
    let mut hasher = Sha256::new();
    hasher.update(b"idemproxy/v1/canonical");
    hash_message(&mut hasher, &decoded);
    Ok(Inspected {
        serial,
        fingerprint: hasher.finalize().into(),
    })
}

/// Decodes every message of a client stream: the serial is the first message's key field
/// (later messages' key fields are only part of the fingerprint: an upload names its key
/// once, in its opening message), and the fingerprint covers every message in order, each
/// canonicalised as a unary request is, so two streams differing in any message differ.
pub fn inspect_stream(
    input: &MessageDescriptor,
    messages: &[Bytes],
    key_fields: &[FieldPath],
    ignored: &[FieldPath],
) -> Result<Inspected, String> {
    let mut hasher = Sha256::new();
    hasher.update(b"idemproxy/v1/canonical-stream");
    hasher.update((messages.len() as u64).to_be_bytes());
    let mut serial = None;
    for (index, message) in messages.iter().enumerate() {
        let (found, decoded) = decode_masked(input, message, key_fields, ignored)
            .map_err(|error| format!("message {} of the stream: {error}", index + 1))?;
        if index == 0 {
            serial = found;
        }
        // Each message's digest is 32 bytes: fed in order, no two streams run together.
        let mut digest = Sha256::new();
        hash_message(&mut digest, &decoded);
        hasher.update(digest.finalize());
    }
    Ok(Inspected {
        serial,
        fingerprint: hasher.finalize().into(),
    })
}

/// One message decoded, its key field read, then its ignored fields masked.
fn decode_masked(
    input: &MessageDescriptor,
    message: &[u8],
    key_fields: &[FieldPath],
    ignored: &[FieldPath],
) -> Result<(Option<Bytes>, DynamicMessage), String> {
    let mut decoded = DynamicMessage::decode(input.clone(), message)
        .map_err(|error| format!("the request is not a valid {}: {error}", input.full_name()))?;
    let serial = serial_of_all(&decoded, key_fields);
    for path in ignored {
        clear(&mut decoded, path);
    }
    Ok((serial, decoded))
}

/// The serial the key fields make: one field's value as it is; several fields' values each
/// as its length in decimal, a colon and the value, in field-number order, so that
/// ("ab", "c") and ("a", "bc") differ and the serial stays visible ASCII. An unset part of
/// a composite counts as empty (an integer as 0), unless every part is unset: then there is
/// no key.
fn serial_of_all(message: &DynamicMessage, key_fields: &[FieldPath]) -> Option<Bytes> {
    match key_fields {
        [] => None,
        [only] => serial_of(message, only),
        parts => {
            let values: Vec<Option<Bytes>> =
                parts.iter().map(|path| serial_of(message, path)).collect();
            if values.iter().all(Option::is_none) {
                return None;
            }
            let mut serial = Vec::new();
            for (path, value) in parts.iter().zip(values) {
                let value = value.unwrap_or_else(|| default_of(path));
                serial.extend_from_slice(value.len().to_string().as_bytes());
                serial.push(b':');
                serial.extend_from_slice(&value);
            }
            Some(Bytes::from(serial))
        }
    }
}

/// What an unset key field stands for in a composite: 0 for a number, empty otherwise.
fn default_of(path: &FieldPath) -> Bytes {
    match path.last().map(FieldDescriptor::kind) {
        Some(Kind::String | Kind::Bytes) | None => Bytes::new(),
        Some(_) => Bytes::from_static(b"0"),
    }
}

fn serial_of(message: &DynamicMessage, path: &FieldPath) -> Option<Bytes> {
    let (last, outer) = path.split_last()?;
    let mut current = message.clone();
    for field in outer {
        if !current.has_field(field) {
            return None;
        }
        current = current.get_field(field).as_message()?.clone();
    }
    if !current.has_field(last) {
        return None;
    }
    let serial = match &*current.get_field(last) {
        Value::String(text) => Bytes::copy_from_slice(text.as_bytes()),
        Value::Bytes(bytes) => bytes.clone(),
        Value::I32(n) => Bytes::from(n.to_string()),
        Value::I64(n) => Bytes::from(n.to_string()),
        Value::U32(n) => Bytes::from(n.to_string()),
        Value::U64(n) => Bytes::from(n.to_string()),
        _ => return None,
    };
    (!serial.is_empty()).then_some(serial)
}

fn clear(message: &mut DynamicMessage, path: &[prost_reflect::FieldDescriptor]) {
    match path {
        [] => {}
        [field] => message.clear_field(field),
        [outer, rest @ ..] => {
            // Only into a message that is set: reaching into an unset one would create it.
            if message.has_field(outer) {
                if let Some(inner) = message.get_field_mut(outer).as_message_mut() {
                    clear(inner, rest);
                }
            }
        }
    }
}

fn hash_message(hasher: &mut Sha256, message: &DynamicMessage) {
    // `fields()` yields the set fields in field-number order.
    for (field, value) in message.fields() {
        hasher.update(field.number().to_be_bytes());
        hash_value(hasher, value);
    }
    for unknown in message.unknown_fields() {
        let mut raw = Vec::with_capacity(unknown.encoded_len());
        unknown.encode(&mut raw);
        hasher.update(b"?");
        hasher.update(raw);
    }
    hasher.update(b"}");
}

fn hash_bytes(hasher: &mut Sha256, tag: u8, bytes: &[u8]) {
    hasher.update([tag]);
    hasher.update((bytes.len() as u64).to_be_bytes());
    hasher.update(bytes);
}

fn hash_value(hasher: &mut Sha256, value: &Value) {
    match value {
        Value::Bool(b) => hasher.update([b'b', u8::from(*b)]),
        Value::I32(n) | Value::EnumNumber(n) => {
            hash_bytes(hasher, b'i', &i64::from(*n).to_be_bytes())
        }
        Value::I64(n) => hash_bytes(hasher, b'i', &n.to_be_bytes()),
        Value::U32(n) => hash_bytes(hasher, b'u', &u64::from(*n).to_be_bytes()),
        Value::U64(n) => hash_bytes(hasher, b'u', &n.to_be_bytes()),
        Value::F32(x) => hash_bytes(hasher, b'f', &f64::from(*x).to_bits().to_be_bytes()),
        Value::F64(x) => hash_bytes(hasher, b'f', &x.to_bits().to_be_bytes()),
        Value::String(text) => hash_bytes(hasher, b's', text.as_bytes()),
        Value::Bytes(bytes) => hash_bytes(hasher, b'y', bytes),
        Value::Message(message) => {
            hasher.update(b"{");
            hash_message(hasher, message);
        }
        Value::List(values) => {
            hasher.update(b"[");
            hasher.update((values.len() as u64).to_be_bytes());
            for value in values {
                hash_value(hasher, value);
            }
        }
        Value::Map(entries) => {
            let mut sorted: Vec<(&MapKey, &Value)> = entries.iter().collect();
            sorted.sort_by(|a, b| a.0.cmp(b.0));
            hasher.update(b"<");
            hasher.update((sorted.len() as u64).to_be_bytes());
            for (key, value) in sorted {
                hash_value(hasher, &Value::from(key.clone()));
                hash_value(hasher, value);
            }
        }
    }
}
