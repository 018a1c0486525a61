//! A method's in-doubt probe (`in_doubt_probe`, issue 34): the unary method of the same
//! service that looks a call up by its serial, checked once at start against the
//! descriptors. It never sends anything: the prober (src/probe.rs) does.

use super::{error, message, path_name, FieldPath, PolicyError};
use crate::pb::idemproxy::v1::InDoubtProbe;
use prost_reflect::{DescriptorPool, MessageDescriptor, MethodDescriptor};
use std::time::Duration;

/// When the first probe goes after the original call's lease, unless the rule says.
pub const PROBE_AFTER_DEFAULT: Duration = Duration::from_secs(30);

/// How long after the original call's lease probing goes on, unless the rule says.
pub const PROBE_GIVE_UP_DEFAULT: Duration = Duration::from_secs(3600);

/// A checked probe.
#[derive(Debug, Clone)]
pub struct ProbeRule {
    /// `/package.Service/Method` of the probe.
    pub path: String,
    /// Its request message type.
    pub input: MessageDescriptor,
    /// The request's field that takes the serial.
    pub key_field: FieldPath,
    /// When the first probe goes after the original call's lease.
    pub after: Duration,
    /// When probing stops after the original call's lease.
    pub give_up_after: Duration,
}

impl ProbeRule {
    /// How `check` shows it.
    pub fn describe(&self) -> String {
        format!(
            "{} (serial in {}), after {}, gives up after {}",
            self.path,
            path_name(&self.key_field),
            humantime::format_duration(self.after),
            humantime::format_duration(self.give_up_after)
        )
    }
}

/// The probe `spec` names for `method` (at `path`), checked: a unary method of the pool
/// answering the method's response type, with a field for the serial.
pub fn resolve(
    pool: &DescriptorPool,
    method: &MethodDescriptor,
    path: &str,
    spec: &InDoubtProbe,
) -> Result<ProbeRule, PolicyError> {
    let bad = |problem: String| error(path, format!("in_doubt_probe: {problem}"));
    let service = method.parent_service();
    let probe = match spec.method.strip_prefix('/') {
        Some(full) => full.split_once('/').and_then(|(service, name)| {
            pool.get_service_by_name(service)?
                .methods()
                .find(|m| m.name() == name)
        }),
        None => service.methods().find(|m| m.name() == spec.method),
    }
    .ok_or_else(|| {
        bad(format!(
            "{:?} is not a method of {} (name a method of the service, or /package.Service/Method)",
            spec.method,
            service.full_name()
        ))
    })?;
    let probe_path = format!("/{}/{}", probe.parent_service().full_name(), probe.name());
    if probe.is_client_streaming() || probe.is_server_streaming() {
        return Err(bad(format!(
            "{probe_path} streams: a probe is a unary method"
        )));
    }
    if probe.output().full_name() != method.output().full_name() {
        return Err(bad(format!(
            "{probe_path} answers {}, not {}: a probe answers the original's response type, so its answer can be recorded as the call's",
            probe.output().full_name(),
            method.output().full_name()
        )));
    }
    let key_field = key_field(pool, &probe.input(), &spec.key_field)
        .map_err(|problem| bad(format!("{probe_path}: {problem}")))?;
    let span = |value: Option<&prost_types::Duration>, what: &str, default: Duration| {
        super::duration(value, path, what).map(|parsed| parsed.unwrap_or(default))
    };
    let after = span(
        spec.after.as_ref(),
        "in_doubt_probe.after",
        PROBE_AFTER_DEFAULT,
    )?;
    let give_up_after = span(
        spec.give_up_after.as_ref(),
        "in_doubt_probe.give_up_after",
        PROBE_GIVE_UP_DEFAULT,
    )?;
    if give_up_after <= after {
        return Err(bad("give_up_after must be longer than after".into()));
    }
    Ok(ProbeRule {
        path: probe_path,
        input: probe.input(),
        key_field,
        after,
        give_up_after,
    })
}

/// The probe request's field for the serial: `named` (a dotted path), else its one field
/// marked `key`.
fn key_field(
    pool: &DescriptorPool,
    input: &MessageDescriptor,
    named: &str,
) -> Result<FieldPath, String> {
    let field = if named.is_empty() {
        let (mut keys, _) = message::annotated_fields(pool, input)?;
        if keys.len() > 1 {
            return Err(format!(
                "its request {} has more than one field marked key: name the one to fill with key_field",
                input.full_name()
            ));
        }
        keys.pop().ok_or_else(|| {
            format!(
                "its request {} has no field marked key (mark one, or name it with key_field)",
                input.full_name()
            )
        })?
    } else {
        let mut path = Vec::new();
        let mut message = Some(input.clone());
        for name in named.split('.') {
            let found = message
                .as_ref()
                .and_then(|message| message.get_field_by_name(name))
                .ok_or_else(|| format!("its request has no field {named:?}"))?;
            message = found.kind().as_message().cloned();
            path.push(found);
        }
        path
    };
    match field.last() {
        Some(last) if super::is_key_kind(last) => Ok(field),
        _ => Err(format!(
            "field {} cannot hold a serial (a string, bytes or integer field)",
            path_name(&field)
        )),
    }
}
