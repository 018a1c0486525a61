//! The config file's per-method rules (`[methods."/pkg.Svc/Method"]`), for the protos that
//! cannot change: parsed and checked here into the same `MethodPolicy` an annotation gives,
//! so one resolver (`policy`) decides every method's rule. It reads no file and knows no
//! other setting.

use super::Overrides;
use std::collections::BTreeMap;
use std::time::Duration;

/// The longest retention a record may have, from a setting or a rule: a year and a day.
pub const RETENTION_MAX: Duration = Duration::from_secs(366 * 24 * 3600);

/// One method's rule in the config file; it wins over the method's annotations.
#[derive(Debug, Default, Clone, serde::Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct MethodSettings {
    enabled: Option<bool>,
    mode: Option<String>,
    retention: Option<String>,
    in_flight: Option<String>,
    max_wait: Option<String>,
    in_doubt: Option<String>,
    require_key: Option<bool>,
    require_first_sent: Option<bool>,
    replay_drop_metadata: Option<Vec<String>>,
    record_codes: Option<Vec<String>>,
    release_codes: Option<Vec<String>>,
    fail_open: Option<bool>,
    in_doubt_probe: Option<String>,
    in_doubt_probe_key: Option<String>,
    in_doubt_probe_after: Option<String>,
    in_doubt_probe_give_up_after: Option<String>,
}

/// A per-method rule of the config file that cannot be used.
#[derive(Debug, thiserror::Error)]
#[error("config file: {rule} = {value:?}: {reason}")]
pub struct MethodRuleError {
    /// `methods."/pkg.Svc/Method".setting`.
    pub rule: String,
    /// What was given.
    pub value: String,
    /// Why it is refused.
    pub reason: String,
}

/// The config file's per-method rules as the annotations they win over; the error names the
/// rule and what is wrong with it.
pub fn method_rules(
    methods: BTreeMap<String, MethodSettings>,
) -> Result<Overrides, MethodRuleError> {
    use crate::pb::idemproxy::v1::method_policy::{InDoubt, InFlight, Mode};
    let mut rules = Overrides::new();
    for (path, settings) in methods {
        let bad = |what: &str, value: &str, reason: &str| MethodRuleError {
            rule: format!(
                "methods.\"{path}\"{}{what}",
                if what.is_empty() { "" } else { "." }
            ),
            value: value.to_owned(),
            reason: reason.to_owned(),
        };
        if !path.starts_with('/') || path[1..].split('/').count() != 2 {
            return Err(bad(
                "",
                &path,
                "a method is written /package.Service/Method",
            ));
        }
        let choice = |what: &str, value: &Option<String>, options: &[(&str, i32)]| match value {
            None => Ok(0),
            Some(text) => options
                .iter()
                .find(|(name, _)| name == text)
                .map(|(_, number)| *number)
                .ok_or_else(|| {
                    let names: Vec<&str> = options.iter().map(|(name, _)| *name).collect();
                    bad(what, text, &format!("must be one of {}", names.join(", ")))
                }),
        };
        let span = |what: &str,
                    value: &Option<String>|
         -> Result<Option<prost_types::Duration>, MethodRuleError> {
            let Some(text) = value else { return Ok(None) };
            let parsed = humantime::parse_duration(text)
                .map_err(|error| bad(what, text, &error.to_string()))?;
            if parsed.is_zero() || parsed > RETENTION_MAX {
                return Err(bad(what, text, "must be more than zero and at most a year"));
            }
            Ok(Some(prost_types::Duration {
                seconds: parsed.as_secs() as i64,
                nanos: parsed.subsec_nanos() as i32,
            }))
        };
        for (what, names) in [
            ("record-codes", &settings.record_codes),
            ("release-codes", &settings.release_codes),
        ] {
            for name in names.iter().flatten() {
                if crate::status::code_by_name(name).is_none() {
                    return Err(bad(
                        what,
                        name,
                        "not a gRPC status code name (write e.g. NOT_FOUND)",
                    ));
                }
            }
        }
        let in_doubt_probe = probe_of(&settings, &span)?;
        let policy = crate::pb::idemproxy::v1::MethodPolicy {
            enabled: settings.enabled,
            mode: choice(
                "mode",
                &settings.mode,
                &[
                    ("replay", Mode::Replay as i32),
                    ("reject", Mode::Reject as i32),
                    ("observe", Mode::Observe as i32),
                ],
            )?,
            retention: span("retention", &settings.retention)?,
            in_flight: choice(
                "in-flight",
                &settings.in_flight,
                &[
                    ("wait", InFlight::Wait as i32),
                    ("reject", InFlight::Reject as i32),
                ],
            )?,
            max_wait: span("max-wait", &settings.max_wait)?,
            in_doubt: choice(
                "in-doubt",
                &settings.in_doubt,
                &[
                    ("reject", InDoubt::Reject as i32),
                    ("retry", InDoubt::Retry as i32),
                ],
            )?,
            require_key: settings.require_key,
            require_first_sent: settings.require_first_sent,
            replay_drop_metadata: settings.replay_drop_metadata.unwrap_or_default(),
            record_codes: settings.record_codes.unwrap_or_default(),
            release_codes: settings.release_codes.unwrap_or_default(),
            fail_open: settings.fail_open,
            in_doubt_probe,
        };
        rules.insert(path, policy);
    }
    Ok(rules)
}

/// Reads a duration key of a rule (`None`: not given).
type SpanReader<'a> =
    dyn Fn(&str, &Option<String>) -> Result<Option<prost_types::Duration>, MethodRuleError> + 'a;

/// The rule's `in-doubt-probe*` keys as the annotation's `InDoubtProbe`; `span` reads a
/// duration key.
fn probe_of(
    settings: &MethodSettings,
    span: &SpanReader<'_>,
) -> Result<Option<crate::pb::idemproxy::v1::InDoubtProbe>, MethodRuleError> {
    let Some(method) = &settings.in_doubt_probe else {
        return Ok(None);
    };
    Ok(Some(crate::pb::idemproxy::v1::InDoubtProbe {
        method: method.clone(),
        after: span("in-doubt-probe-after", &settings.in_doubt_probe_after)?,
        give_up_after: span(
            "in-doubt-probe-give-up-after",
            &settings.in_doubt_probe_give_up_after,
        )?,
        key_field: settings.in_doubt_probe_key.clone().unwrap_or_default(),
    }))
}
