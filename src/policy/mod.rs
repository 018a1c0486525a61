//! Per-method policy (design §4): the service's descriptors and their `idemproxy.v1`
//! annotations, resolved once at start into one table the proxy consults per call.
//!
//! Resolution is pure: descriptors and defaults in, a `PolicyTable` or a list of every error
//! out (`idemproxy check` prints both; `run` refuses to start on errors). Nothing here does
//! I/O but `descriptors.rs`, and nothing here runs per call but `message.rs` and `get`.

pub mod descriptors;
pub mod message;
pub mod probe;
pub mod reflection;
pub mod rules;

use crate::engine::CallPolicy;
use crate::pb::idemproxy::v1::{
    method_policy::{InDoubt, InFlight, Mode},
    MethodPolicy, ServicePolicy,
};
use prost_reflect::{DescriptorPool, FieldDescriptor, Kind, MessageDescriptor, MethodDescriptor};
use std::collections::HashMap;
use std::fmt::Write as _;
use std::sync::Arc;
use std::time::Duration;

/// The extension names of the annotation API (`proto/idemproxy/v1/annotations.proto`).
pub const METHOD_EXTENSION: &str = "idemproxy.v1.method";
/// See [`METHOD_EXTENSION`].
pub const FIELD_EXTENSION: &str = "idemproxy.v1.field";
/// See [`METHOD_EXTENSION`].
pub const SERVICE_EXTENSION: &str = "idemproxy.v1.service";

/// Whether calls of a method are deduplicated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dedup {
    /// Every call passes through untouched.
    Off,
    /// A call is deduplicated when it carries a key (header, or the key field).
    WhenKeyed,
    /// A bidirectional stream: a keyed call is refused at once (its answer may depend on a
    /// conversation, and its client may wait for answers before it ends its input, so it can
    /// neither be read whole nor replayed); a call without a key passes through.
    Unsupported,
}

/// True for the well-known services that never change state (server reflection, health):
/// they always pass through, key header or not, as tools such as grpcurl put the key on
/// their reflection stream too.
pub fn never_changes_state(path: &str) -> bool {
    path.starts_with("/grpc.reflection.") || path.starts_with("/grpc.health.v1.")
}

/// The config file's per-method rules, by `/package.Service/Method`.
pub type Overrides = std::collections::BTreeMap<String, MethodPolicy>;

/// The path of a field inside the request message, outermost first.
pub type FieldPath = Vec<FieldDescriptor>;

/// How one method is handled: the resolved policy.
#[derive(Debug, Clone)]
pub struct MethodRule {
    /// `/package.Service/Method`.
    pub path: String,
    /// Whether calls are deduplicated.
    pub dedup: Dedup,
    /// What the engine does with a keyed call.
    pub call: CallPolicy,
    /// A call without a key is refused instead of passing through.
    pub require_key: bool,
    /// A keyed call without `idempotency-first-sent` is refused.
    pub require_first_sent: bool,
    /// The request fields that hold the serial, in field-number order: none, one, or several
    /// (a composite key: order id and step, say).
    pub key_fields: Vec<FieldPath>,
    /// Fields left out of the fingerprint.
    pub ignored: Vec<FieldPath>,
    /// The request message type, when the request is inspected (key field or ignored fields).
    pub input: Option<MessageDescriptor>,
    /// The client sends a stream of messages (a client-streaming method): the key field is
    /// read from the first, and the fingerprint covers them all.
    pub client_streaming: bool,
    /// Where the rule came from, for `check`.
    pub origin: &'static str,
    /// How an unknown outcome is looked up in the service, when the method declares it.
    pub probe: Option<probe::ProbeRule>,
}

impl MethodRule {
    /// Whether the request must be decoded (to find the key or mask fields).
    pub fn inspects_request(&self) -> bool {
        self.input.is_some()
    }
}

/// Every method's rule, by gRPC path; methods not in it follow the defaults.
#[derive(Debug, Clone)]
pub struct PolicyTable {
    rules: HashMap<String, Arc<MethodRule>>,
    default_rule: Arc<MethodRule>,
}

/// A policy that cannot be used, naming the method or field.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{subject}: {problem}")]
pub struct PolicyError {
    /// The method, field or file concerned.
    pub subject: String,
    /// What is wrong, and what to do.
    pub problem: String,
}

fn error(subject: impl Into<String>, problem: impl Into<String>) -> PolicyError {
    PolicyError {
        subject: subject.into(),
        problem: problem.into(),
    }
}

impl PolicyTable {
    /// No descriptors: any call carrying the key header is deduplicated as a unary call,
    /// by the config file's rule for its method if it has one.
    pub fn header_only(
        defaults: CallPolicy,
        overrides: &Overrides,
    ) -> Result<PolicyTable, Vec<PolicyError>> {
        let mut table = PolicyTable {
            rules: HashMap::new(),
            default_rule: Arc::new(default_rule(defaults.clone())),
        };
        let mut errors = Vec::new();
        for (path, rule) in overrides {
            if rule.in_doubt_probe.is_some() {
                errors.push(error(
                    path,
                    "in-doubt-probe needs the service's descriptors (--descriptor-set, --proto or --reflection) to build the probe's request",
                ));
                continue;
            }
            let built = build_rule(
                path.clone(),
                rule,
                false,
                Vec::new(),
                Vec::new(),
                None,
                defaults.clone(),
            );
            match built {
                Ok(mut rule) => {
                    rule.origin = "config file";
                    table.rules.insert(path.clone(), Arc::new(rule));
                }
                Err(mut problems) => errors.append(&mut problems),
            }
        }
        if errors.is_empty() {
            Ok(table)
        } else {
            Err(errors)
        }
    }

    /// Resolves every method of every service in `pool` over `defaults`, the config file's
    /// rules (`overrides`, by method path) winning over annotations.
    pub fn resolve(
        pool: &DescriptorPool,
        defaults: CallPolicy,
        overrides: &Overrides,
    ) -> Result<PolicyTable, Vec<PolicyError>> {
        let mut table = PolicyTable::header_only(defaults.clone(), &Overrides::new())?;
        let mut errors = Vec::new();
        for service in pool.services() {
            let service_policy = service_policy(pool, &service.options(), service.full_name());
            let service_defaults = match service_policy {
                Ok(policy) => policy.and_then(|policy| policy.defaults),
                Err(problem) => {
                    errors.push(problem);
                    None
                }
            };
            for method in service.methods() {
                match resolve_method(
                    pool,
                    &method,
                    service_defaults.as_ref(),
                    overrides,
                    defaults.clone(),
                ) {
                    Ok(rule) => {
                        table.rules.insert(rule.path.clone(), Arc::new(rule));
                    }
                    Err(mut problems) => errors.append(&mut problems),
                }
            }
        }
        for path in overrides.keys() {
            if !table.rules.contains_key(path) {
                errors.push(error(
                    path,
                    "the config file has a rule for a method the descriptors do not have (write it as /package.Service/Method)",
                ));
            }
        }
        if errors.is_empty() {
            Ok(table)
        } else {
            Err(errors)
        }
    }

    /// The rule of the method at `path`.
    pub fn get(&self, path: &str) -> &Arc<MethodRule> {
        self.rules.get(path).unwrap_or(&self.default_rule)
    }

    /// The methods with a rule of their own, sorted by path.
    pub fn methods(&self) -> Vec<&Arc<MethodRule>> {
        let mut rules: Vec<_> = self.rules.values().collect();
        rules.sort_by(|a, b| a.path.cmp(&b.path));
        rules
    }

    /// The table as `idemproxy check` prints it.
    pub fn render(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(
            out,
            "{:<44} {:<8} {:<34} {:<10} {:<10} {:<8} from",
            "method", "mode", "key", "retention", "in-flight", "in-doubt"
        );
        let rules = self.methods();
        let default_row = [&self.default_rule];
        for rule in rules.iter().copied().chain(default_row) {
            let _ = writeln!(out, "{}", render_row(rule));
        }
        for rule in &rules {
            if let Some(probe) = &rule.probe {
                let _ = writeln!(out, "probe of {}: {}", rule.path, probe.describe());
            }
        }
        out
    }
}

fn render_row(rule: &MethodRule) -> String {
    let (mode, key, retention, in_flight, in_doubt) = match rule.dedup {
        Dedup::Off => ("pass", "-".to_owned(), "-".to_owned(), "-".to_owned(), "-"),
        Dedup::Unsupported => (
            "refuse-keyed",
            "-".to_owned(),
            "-".to_owned(),
            "-".to_owned(),
            "-",
        ),
        Dedup::WhenKeyed => {
            let key = if rule.key_fields.is_empty() {
                "header".to_owned()
            } else {
                let parts: Vec<String> = rule.key_fields.iter().map(|p| path_name(p)).collect();
                format!("header|{}", parts.join("+"))
            };
            let key = if rule.require_key {
                format!("{key} (required)")
            } else {
                key
            };
            let in_flight = if rule.call.reject_in_flight || rule.call.rejects_duplicates() {
                "reject".to_owned()
            } else {
                format!(
                    "wait {}",
                    humantime::format_duration(rule.call.in_flight_wait_max)
                )
            };
            (
                rule.call.mode.as_str(),
                key,
                humantime::format_duration(rule.call.retention).to_string(),
                in_flight,
                if rule.call.retry_in_doubt {
                    "retry"
                } else if rule.probe.is_some() {
                    "probe"
                } else {
                    "reject"
                },
            )
        }
    };
    let path = if rule.path.is_empty() {
        "(any other method)"
    } else {
        &rule.path
    };
    format!(
        "{path:<44} {mode:<8} {key:<34} {retention:<10} {in_flight:<10} {in_doubt:<8} {}",
        rule.origin
    )
}

/// A field path as `payment.serial`.
pub fn path_name(path: &[FieldDescriptor]) -> String {
    let names: Vec<&str> = path.iter().map(|field| field.name()).collect();
    names.join(".")
}

fn default_rule(defaults: CallPolicy) -> MethodRule {
    MethodRule {
        path: String::new(),
        dedup: Dedup::WhenKeyed,
        call: defaults,
        require_key: false,
        require_first_sent: false,
        key_fields: Vec::new(),
        ignored: Vec::new(),
        input: None,
        client_streaming: false,
        origin: "defaults",
        probe: None,
    }
}

fn service_policy(
    pool: &DescriptorPool,
    options: &prost_reflect::DynamicMessage,
    subject: &str,
) -> Result<Option<ServicePolicy>, PolicyError> {
    extension(pool, options, SERVICE_EXTENSION, subject)
}

/// Reads one of our extensions from an options message, when the pool knows it and it is set.
fn extension<T: prost::Message + Default>(
    pool: &DescriptorPool,
    options: &prost_reflect::DynamicMessage,
    name: &str,
    subject: &str,
) -> Result<Option<T>, PolicyError> {
    let Some(descriptor) = pool.get_extension_by_name(name) else {
        return Ok(None);
    };
    if !options.has_extension(&descriptor) {
        return Ok(None);
    }
    match options.get_extension(&descriptor).as_message() {
        Some(message) => message
            .transcode_to::<T>()
            .map(Some)
            .map_err(|decode| error(subject, format!("({name}) cannot be read: {decode}"))),
        None => Err(error(subject, format!("({name}) is not a message"))),
    }
}

/// `google.protobuf.MethodOptions.idempotency_level`: 1 NO_SIDE_EFFECTS, 2 IDEMPOTENT.
fn is_safe_to_repeat(method: &MethodDescriptor) -> bool {
    let options = method.options();
    let level = options
        .get_field_by_name("idempotency_level")
        .and_then(|value| value.as_enum_number());
    matches!(level, Some(1 | 2))
}

/// One method's annotation laid over its service's over the defaults.
fn merged(service: Option<&MethodPolicy>, method: Option<&MethodPolicy>) -> MethodPolicy {
    let mut out = service.cloned().unwrap_or_default();
    let Some(method) = method else { return out };
    if method.enabled.is_some() {
        out.enabled = method.enabled;
    }
    if method.mode != Mode::Unspecified as i32 {
        out.mode = method.mode;
    }
    if method.retention.is_some() {
        out.retention = method.retention;
    }
    if method.in_flight != InFlight::Unspecified as i32 {
        out.in_flight = method.in_flight;
    }
    if method.max_wait.is_some() {
        out.max_wait = method.max_wait;
    }
    if method.in_doubt != InDoubt::Unspecified as i32 {
        out.in_doubt = method.in_doubt;
    }
    if !method.record_codes.is_empty() {
        out.record_codes.clone_from(&method.record_codes);
    }
    if !method.release_codes.is_empty() {
        out.release_codes.clone_from(&method.release_codes);
    }
    if method.require_key.is_some() {
        out.require_key = method.require_key;
    }
    if method.require_first_sent.is_some() {
        out.require_first_sent = method.require_first_sent;
    }
    if !method.replay_drop_metadata.is_empty() {
        out.replay_drop_metadata
            .clone_from(&method.replay_drop_metadata);
    }
    if method.fail_open.is_some() {
        out.fail_open = method.fail_open;
    }
    if method.in_doubt_probe.is_some() {
        out.in_doubt_probe.clone_from(&method.in_doubt_probe);
    }
    out
}

fn duration(
    value: Option<&prost_types::Duration>,
    subject: &str,
    what: &str,
) -> Result<Option<Duration>, PolicyError> {
    match value {
        None => Ok(None),
        Some(duration) if duration.seconds >= 0 && (0..1_000_000_000).contains(&duration.nanos) => {
            let value = Duration::new(duration.seconds as u64, duration.nanos as u32);
            if value.is_zero() {
                Err(error(subject, format!("{what} must be more than zero")))
            } else {
                Ok(Some(value))
            }
        }
        Some(_) => Err(error(
            subject,
            format!("{what} must be a positive duration"),
        )),
    }
}

fn resolve_method(
    pool: &DescriptorPool,
    method: &MethodDescriptor,
    service_defaults: Option<&MethodPolicy>,
    overrides: &Overrides,
    defaults: CallPolicy,
) -> Result<MethodRule, Vec<PolicyError>> {
    let path = format!("/{}/{}", method.parent_service().full_name(), method.name());
    let annotation: Option<MethodPolicy> =
        extension(pool, &method.options(), METHOD_EXTENSION, &path).map_err(|e| vec![e])?;
    let configured = overrides.get(&path);
    let policy = merged(
        Some(&merged(service_defaults, annotation.as_ref())),
        configured,
    );
    let mut errors = Vec::new();
    let (key_fields, ignored) = match message::annotated_fields(pool, &method.input()) {
        Ok(found) => found,
        Err(problem) => {
            errors.push(error(&path, problem));
            (Vec::new(), Vec::new())
        }
    };
    let has_policy = annotation.is_some() || configured.is_some();
    let safe = is_safe_to_repeat(method);
    if safe && has_policy && policy.enabled.is_none() {
        errors.push(error(
            &path,
            "has a policy but is NO_SIDE_EFFECTS or IDEMPOTENT: set `enabled: true` to deduplicate it anyway, or drop the policy",
        ));
    }
    let annotated = has_policy || service_defaults.is_some();
    // A server-streaming call has one request message, and its whole answer is recorded and
    // replayed in order like a unary one. A client stream is read whole before it is
    // forwarded, so it can be keyed too. A bidirectional one cannot: its client may wait for
    // answers before it ends its input.
    let wants_dedup = policy.enabled != Some(false) && !(safe && policy.enabled != Some(true));
    let bidirectional = method.is_client_streaming() && method.is_server_streaming();
    if wants_dedup && bidirectional && (annotated || !key_fields.is_empty()) {
        errors.push(error(
            &path,
            "bidirectional methods cannot carry a policy (remove the annotation, or set `enabled: false`): a keyed call is refused, a call without a key passes through",
        ));
    }
    let built = build_rule(
        path,
        &policy,
        safe,
        key_fields,
        ignored,
        Some(method.input()),
        defaults,
    );
    let mut rule = match built {
        Ok(mut rule) if errors.is_empty() => {
            rule.client_streaming = method.is_client_streaming();
            if bidirectional && rule.dedup != Dedup::Off {
                rule.dedup = Dedup::Unsupported;
                rule.input = None;
            }
            rule
        }
        Ok(_) => return Err(errors),
        Err(mut problems) => {
            errors.append(&mut problems);
            return Err(errors);
        }
    };
    if let Some(spec) = &policy.in_doubt_probe {
        if rule.dedup != Dedup::WhenKeyed || rule.call.retry_in_doubt {
            return Err(vec![error(
                &rule.path,
                "in_doubt_probe on a method that is not deduplicated, or that runs an unknown outcome again (IN_DOUBT_RETRY): remove one",
            )]);
        }
        if rule.key_fields.len() > 1 {
            return Err(vec![error(
                &rule.path,
                "in_doubt_probe on a method with a composite key: the probe's request has one key field to fill, so mark one key field, or remove the probe",
            )]);
        }
        let found = probe::resolve(pool, method, &rule.path, spec).map_err(|e| vec![e])?;
        rule.probe = Some(found);
        rule.call.probe = true;
    }
    rule.origin = match (configured, annotation, service_defaults, safe) {
        (Some(_), _, _, _) => "config file",
        (None, _, _, true) if rule.dedup == Dedup::Off => "idempotency_level",
        (None, Some(_), _, _) => "method annotation",
        (None, None, Some(_), _) => "service annotation",
        (None, None, None, _) => "defaults",
    };
    Ok(rule)
}

/// One rule from a merged policy. `safe`: the method's idempotency_level says it may repeat.
fn build_rule(
    path: String,
    policy: &MethodPolicy,
    safe: bool,
    key_fields: Vec<FieldPath>,
    ignored: Vec<FieldPath>,
    input: Option<MessageDescriptor>,
    defaults: CallPolicy,
) -> Result<MethodRule, Vec<PolicyError>> {
    let mut errors = Vec::new();
    let forced_off = policy.enabled == Some(false);
    let off = forced_off || (safe && policy.enabled != Some(true));
    let dedup = if off { Dedup::Off } else { Dedup::WhenKeyed };
    let record_codes = code_mask(&policy.record_codes, &path, "record_codes", &mut errors);
    let release_codes = code_mask(&policy.release_codes, &path, "release_codes", &mut errors);
    if record_codes & release_codes != 0 {
        errors.push(error(
            &path,
            "a status code is in both record_codes and release_codes",
        ));
    }
    if release_codes & 1 != 0 {
        errors.push(error(
            &path,
            "OK is always recorded: remove it from release_codes",
        ));
    }
    let retention = duration(policy.retention.as_ref(), &path, "retention").unwrap_or_else(|e| {
        errors.push(e);
        None
    });
    let max_wait = duration(policy.max_wait.as_ref(), &path, "max_wait").unwrap_or_else(|e| {
        errors.push(e);
        None
    });
    let mode = match Mode::try_from(policy.mode) {
        Ok(Mode::Replay) => crate::engine::Mode::Replay,
        Ok(Mode::Reject) => crate::engine::Mode::Reject,
        Ok(Mode::Observe) => crate::engine::Mode::Observe,
        // Unset here: the command line's default mode.
        Ok(Mode::Unspecified) => defaults.mode,
        Err(_) => {
            errors.push(error(
                &path,
                format!(
                    "mode {} is not a mode this release knows (MODE_REPLAY, MODE_REJECT or MODE_OBSERVE)",
                    policy.mode
                ),
            ));
            defaults.mode
        }
    };
    let replay_drop_metadata = dropped_metadata(&policy.replay_drop_metadata, &path, &mut errors);
    if !errors.is_empty() {
        return Err(errors);
    }
    let call = CallPolicy {
        retention: retention.unwrap_or(defaults.retention),
        in_flight_wait_max: max_wait.unwrap_or(defaults.in_flight_wait_max),
        reject_in_flight: policy.in_flight == InFlight::Reject as i32,
        mode,
        retry_in_doubt: policy.in_doubt == InDoubt::Retry as i32,
        record_codes,
        release_codes,
        fail_open: policy.fail_open == Some(true),
        probe: false,
        replay_drop_metadata,
    };
    let inspects = dedup == Dedup::WhenKeyed && (!key_fields.is_empty() || !ignored.is_empty());
    Ok(MethodRule {
        path,
        dedup,
        call,
        require_key: policy.require_key == Some(true) && dedup == Dedup::WhenKeyed,
        require_first_sent: policy.require_first_sent == Some(true) && dedup == Dedup::WhenKeyed,
        input: if inspects { input } else { None },
        key_fields,
        ignored,
        client_streaming: false,
        origin: "defaults",
        probe: None,
    })
}

/// The `replay_drop_metadata` names, lowercased; gRPC's own and HTTP/2's pseudo-headers
/// cannot be dropped (a replay needs them), and a name that is not a header name is an error.
fn dropped_metadata(
    names: &[String],
    path: &str,
    errors: &mut Vec<PolicyError>,
) -> Option<Arc<[String]>> {
    let mut dropped = Vec::new();
    for name in names {
        let lower = name.to_ascii_lowercase();
        if http::HeaderName::from_bytes(lower.as_bytes()).is_err() {
            errors.push(error(
                path,
                format!("replay_drop_metadata: {name:?} is not a header name"),
            ));
        } else if lower.starts_with("grpc-") || lower == "content-type" {
            errors.push(error(
                path,
                format!("replay_drop_metadata: {name:?} is gRPC's own and every replay needs it"),
            ));
        } else {
            dropped.push(lower);
        }
    }
    (!dropped.is_empty()).then(|| dropped.into())
}

/// Status code names as a bit mask (`1 << code`); unknown names are errors.
fn code_mask(names: &[String], path: &str, what: &str, errors: &mut Vec<PolicyError>) -> u32 {
    let mut mask = 0;
    for name in names {
        match crate::status::code_by_name(name) {
            Some(code) => mask |= 1 << code,
            None => errors.push(error(
                path,
                format!("{what}: {name:?} is not a gRPC status code name (write e.g. NOT_FOUND)"),
            )),
        }
    }
    mask
}

/// True when a field kind can hold a serial number.
pub fn is_key_kind(field: &FieldDescriptor) -> bool {
    !field.is_list()
        && !field.is_map()
        && matches!(
            field.kind(),
            Kind::String
                | Kind::Bytes
                | Kind::Int32
                | Kind::Int64
                | Kind::Uint32
                | Kind::Uint64
                | Kind::Sint32
                | Kind::Sint64
                | Kind::Fixed32
                | Kind::Fixed64
                | Kind::Sfixed32
                | Kind::Sfixed64
        )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::Limits;

    fn example() -> PolicyTable {
        let pool =
            DescriptorPool::decode(crate::pb::EXAMPLE_DESCRIPTOR_SET).expect("the example loads");
        let defaults = CallPolicy::from_limits(&Limits::default());
        PolicyTable::resolve(&pool, defaults, &Overrides::new()).expect("the example is valid")
    }

    #[test]
    fn the_example_annotations_resolve() {
        let table = example();
        let rendered = table.render();
        assert!(
            rendered.contains("header|payment.serial (required)"),
            "{rendered}"
        );
        let charge = table.get("/idemproxy.example.v1.Payments/Charge");
        assert_eq!(charge.dedup, Dedup::WhenKeyed);
        assert!(charge.require_key);
        assert_eq!(
            path_name(charge.key_fields.first().expect("a key field")),
            "payment.serial"
        );
        assert_eq!(charge.ignored.len(), 2);
        assert_eq!(charge.call.in_flight_wait_max, Duration::from_secs(5));
        let refund = table.get("/idemproxy.example.v1.Payments/Refund");
        assert!(refund.call.rejects_duplicates());
        assert_eq!(refund.call.retention, Duration::from_secs(604_800));
        let balance = table.get("/idemproxy.example.v1.Payments/GetBalance");
        assert_eq!(balance.dedup, Dedup::Off);
    }

    #[test]
    fn observe_is_a_mode_of_the_command_line_of_a_rule_and_of_an_annotation() {
        let pool =
            DescriptorPool::decode(crate::pb::EXAMPLE_DESCRIPTOR_SET).expect("the example loads");
        let observing = CallPolicy {
            mode: crate::engine::Mode::Observe,
            ..CallPolicy::from_limits(&Limits::default())
        };
        let table = PolicyTable::resolve(&pool, observing, &Overrides::new())
            .expect("the example is valid");
        let charge = table.get("/idemproxy.example.v1.Payments/Charge");
        assert_eq!(
            charge.call.mode,
            crate::engine::Mode::Observe,
            "the default"
        );
        let refund = table.get("/idemproxy.example.v1.Payments/Refund");
        assert!(refund.call.rejects_duplicates(), "the annotation wins");
        assert!(table.render().contains(" observe "), "{}", table.render());

        let rules = rules::method_rules(
            toml::from_str::<std::collections::BTreeMap<String, rules::MethodSettings>>(
                "[\"/idemproxy.example.v1.Payments/Refund\"]\nmode = \"observe\"",
            )
            .expect("a rule"),
        )
        .expect("observe is a mode");
        let defaults = CallPolicy::from_limits(&Limits::default());
        let table = PolicyTable::resolve(&pool, defaults.clone(), &rules).expect("valid");
        let refund = table.get("/idemproxy.example.v1.Payments/Refund");
        assert_eq!(
            refund.call.mode,
            crate::engine::Mode::Observe,
            "the rule wins"
        );

        let rule_of = |mode: i32| {
            let policy = MethodPolicy {
                mode,
                ..MethodPolicy::default()
            };
            let (keys, ignored) = (Vec::new(), Vec::new());
            build_rule(
                "/a.B/C".into(),
                &policy,
                false,
                keys,
                ignored,
                None,
                defaults.clone(),
            )
        };
        assert!(rule_of(9).is_err(), "an unknown mode number is refused");
        let observed = rule_of(Mode::Observe as i32).expect("valid");
        assert_eq!(observed.call.mode, crate::engine::Mode::Observe);
    }
}
