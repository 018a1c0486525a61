//! In-doubt probes (issue 34): an unknown outcome resolved by the service itself. For a
//! method that declares `in_doubt_probe`, an IN_DOUBT record whose call has ended is looked
//! up with the probe method (its request's key field filled with the call's serial, the
//! original caller's identity, `idempotency-probe: true`, a deadline): OK records the
//! probe's answer as the outcome, NOT_FOUND releases the key, anything else is asked again
//! with backoff until the rule gives up. A probe takes the record with its own token and
//! lease (`record::probe`), so one key is probed by one sidecar at a time. Probes go when a
//! duplicate meets the unknown outcome (`Prober::probe_now`) and from a background walk of
//! the store (`Prober::run`), which also finds what a crash left IN_DOUBT. It never decides a
//! state itself and never forwards a caller's call.

use crate::engine::{Clock, InDoubtProber, Reply, SystemClock, Tokens, Upstream};
use crate::key::{self, Key};
use crate::policy::probe::ProbeRule;
use crate::policy::PolicyTable;
use crate::proxy::upstream::HttpUpstream;
use crate::record::probe::{
    settle_probe, take_probe, waiting_for, ProbeAnswer, ProbeTake, ProbeTiming, Waiting,
};
use crate::store::{Operation, Store, StoreError};
use crate::telemetry::metrics::Metrics;
use crate::telemetry::trace;
use bytes::{BufMut, Bytes, BytesMut};
use http::{HeaderName, HeaderValue};
use prost::Message;
use prost_reflect::{DynamicMessage, Kind, Value};
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;
use tracing::Instrument;

/// The header that tells the service a call is idemproxy's probe.
pub const PROBE_HEADER: &str = "idempotency-probe";

/// A probe's own deadline.
pub const PROBE_DEADLINE: Duration = Duration::from_secs(10);

/// How long a prober holds a record: its deadline and a margin, so that a prober that dies
/// leaves the record to the next one soon after.
const PROBE_LEASE: Duration = Duration::from_secs(15);

/// Records the background walk reads in one round, so a round stays short.
const WALK_RECORDS_MAX: usize = 1_000;

/// Probes sent in one round of the walk at most.
const WALK_PROBES_MAX: usize = 64;

/// Where a probe's question goes: the service itself (`ServiceLookup`), or a model of it in
/// the simulation.
pub trait Lookup: Send + Sync + 'static {
    /// Asks about the call of `serial` made by `caller` with the probe of `rule`.
    fn ask(
        &self,
        rule: &ProbeRule,
        serial: &[u8],
        caller: &str,
    ) -> impl Future<Output = ProbeAnswer> + Send;
}

/// The service's probe method, called through the sidecar's upstream connection.
pub struct ServiceLookup {
    upstream: HttpUpstream,
    /// The caller header, when the caller source is one: the probe carries the original's.
    caller_header: Option<HeaderName>,
}

impl ServiceLookup {
    /// Lookups sent on `upstream`, carrying the caller in `caller_header` when there is one.
    pub fn new(upstream: HttpUpstream, caller_header: Option<HeaderName>) -> ServiceLookup {
        ServiceLookup {
            upstream,
            caller_header,
        }
    }
}

/// Sends the probes of one sidecar.
pub struct Prober<S, L = ServiceLookup, C = SystemClock> {
    store: Arc<S>,
    lookup: L,
    policy: Arc<PolicyTable>,
    tokens: Tokens,
    clock: C,
    metrics: Metrics,
}

impl<S: Store, L: Lookup, C: Clock> Prober<S, L, C> {
    /// A prober over the sidecar's store stack, asking `lookup` and reading `clock`; `None`
    /// when no method declares a probe.
    pub fn new(
        store: Arc<S>,
        lookup: L,
        policy: Arc<PolicyTable>,
        clock: C,
        metrics: Metrics,
    ) -> Option<Prober<S, L, C>> {
        if policy.methods().iter().all(|rule| rule.probe.is_none()) {
            return None;
        }
        Some(Prober {
            store,
            lookup,
            policy,
            tokens: Tokens::for_this_process(),
            clock,
            metrics,
        })
    }

    /// Where its probes' questions go.
    pub fn lookup(&self) -> &L {
        &self.lookup
    }

    /// Walks the store every `interval` until `stop`, probing the IN_DOUBT records that are
    /// due, up to `WALK_RECORDS_MAX` records and `WALK_PROBES_MAX` probes a round.
    pub async fn run(self: Arc<Self>, interval: Duration, stop: impl Future<Output = ()>) {
        tokio::pin!(stop);
        let mut cursor = None;
        loop {
            tokio::select! {
                () = &mut stop => return,
                () = tokio::time::sleep(interval) => {}
            }
            cursor = match self.walk_round(cursor).await {
                Ok(next) => next,
                Err(error) => {
                    tracing::warn!(%error, "the in-doubt probes' walk could not read the store");
                    None
                }
            };
        }
    }

    /// One round of the walk from `cursor`; where the next starts.
    async fn walk_round(&self, cursor: Option<Vec<u8>>) -> Result<Option<Vec<u8>>, StoreError> {
        let page = self.store.scan(cursor, WALK_RECORDS_MAX).await?;
        let now_ms = self.clock.now_ms();
        let mut sent = 0;
        for (key, found) in &page.records {
            if sent == WALK_PROBES_MAX {
                // The rest next round: start again from here.
                return Ok(Some(key.as_bytes().to_vec()));
            }
            let waits_for_probe = waiting_for(found, now_ms) == Some(Waiting::Probe);
            if waits_for_probe && found.next_probe_ms <= now_ms {
                if let Some(rule) = &self.policy.get(&found.method).probe {
                    sent += usize::from(self.probe(*key, &found.method, rule, false).await);
                }
            }
        }
        Ok(page.next)
    }

    /// Probes the record of `key` (a call of `method`) if it may be; `true` when a probe was
    /// sent.
    async fn probe(&self, key: Key, method: &str, rule: &ProbeRule, at_once: bool) -> bool {
        let token = self.tokens.next_token();
        let timing = ProbeTiming {
            now_ms: self.clock.now_ms(),
            lease_ms: PROBE_LEASE.as_millis() as u64,
            after_ms: rule.after.as_millis() as u64,
            give_up_after_ms: rule.give_up_after.as_millis() as u64,
            at_once,
        };
        let taken = self
            .store
            .update(Operation::Probe, &key, |current| {
                take_probe(current, &token, &timing)
            })
            .await;
        let (serial, caller, origin) = match taken {
            Ok(ProbeTake::Taken {
                serial,
                caller,
                origin,
            }) => (serial, caller, origin),
            Ok(ProbeTake::GaveUp) => {
                tracing::warn!(key = %key.short(), %method, "in-doubt probes gave up: the outcome stays unknown until an operator resolves it (idemproxy keys resolve)");
                self.metrics.probe("gave_up");
                return false;
            }
            Ok(_) => return false,
            Err(error) => {
                tracing::warn!(key = %key.short(), %error, "could not take a record to probe it");
                return false;
            }
        };
        let span = trace::probe_span(method, &rule.path, &origin);
        let answer = self
            .lookup
            .ask(rule, &serial, &caller)
            .instrument(span.clone())
            .await;
        let label = match &answer {
            ProbeAnswer::Found(_) => "found",
            ProbeAnswer::NotFound => "not_found",
            ProbeAnswer::Failed => "failed",
        };
        span.record("idemproxy.probe.answer", label);
        self.metrics.probe(label);
        let now_ms = self.clock.now_ms();
        let retention = self.policy.get(method).call.retention;
        let expires_ms = now_ms + retention.as_millis() as u64;
        let settled = self
            .store
            .update(Operation::Probe, &key, |current| {
                settle_probe(current, &token, answer.clone(), now_ms, expires_ms)
            })
            .await;
        match settled {
            Ok(true) => {
                tracing::info!(key = %key.short(), %method, answer = label, "in-doubt probe answered")
            }
            Ok(false) => {
                tracing::info!(key = %key.short(), %method, "the probed record changed meanwhile (the original's late outcome, or an operator)")
            }
            Err(error) => {
                tracing::warn!(key = %key.short(), %error, "could not settle a probed record; it stays IN_DOUBT and is probed again")
            }
        }
        true
    }
}

impl Lookup for ServiceLookup {
    /// Sends the probe for `serial` as `caller`, and reads what its answer means.
    async fn ask(&self, rule: &ProbeRule, serial: &[u8], caller: &str) -> ProbeAnswer {
        let body = match probe_body(rule, serial) {
            Ok(body) => body,
            Err(why) => {
                tracing::warn!(probe = %rule.path, "cannot build the probe's request: {why}");
                return ProbeAnswer::Failed;
            }
        };
        let mut request = http::Request::new(());
        *request.method_mut() = http::Method::POST;
        match rule.path.parse() {
            Ok(uri) => *request.uri_mut() = uri,
            Err(_) => return ProbeAnswer::Failed,
        }
        let headers = request.headers_mut();
        let deadline = format!("{}m", PROBE_DEADLINE.as_millis());
        headers.insert("content-type", HeaderValue::from_static("application/grpc"));
        headers.insert("te", HeaderValue::from_static("trailers"));
        headers.insert(PROBE_HEADER, HeaderValue::from_static("true"));
        if let Ok(value) = HeaderValue::from_str(&deadline) {
            headers.insert("grpc-timeout", value);
        }
        if let (Some(name), false) = (&self.caller_header, caller == key::ANONYMOUS_CALLER) {
            if let Ok(value) = HeaderValue::from_str(caller) {
                headers.insert(name.clone(), value);
            }
        }
        let (parts, ()) = request.into_parts();
        let reply = tokio::time::timeout(PROBE_DEADLINE, self.upstream.call(parts, body)).await;
        match reply {
            Ok(Reply::Complete(response)) if response.grpc_status == 0 => {
                ProbeAnswer::Found(response)
            }
            Ok(Reply::Complete(response)) if response.grpc_status == 5 => ProbeAnswer::NotFound,
            _ => ProbeAnswer::Failed,
        }
    }
}

impl<S: Store, L: Lookup, C: Clock> InDoubtProber for Prober<S, L, C> {
    fn probe_now<'a>(
        &'a self,
        key: Key,
        method: &'a str,
    ) -> Pin<Box<dyn Future<Output = ()> + Send + 'a>> {
        // The duplicate knows its method (the key is derived from it): no read to learn it.
        Box::pin(async move {
            if let Some(rule) = &self.policy.get(method).probe {
                self.probe(key, method, rule, true).await;
            }
        })
    }
}

/// The probe's request as one gRPC message frame: its key field holds `serial`.
fn probe_body(rule: &ProbeRule, serial: &[u8]) -> Result<Bytes, String> {
    let mut message = DynamicMessage::new(rule.input.clone());
    let (last, outer) = rule.key_field.split_last().ok_or("no key field")?;
    let mut at = &mut message;
    for field in outer {
        at = at
            .get_field_mut(field)
            .as_message_mut()
            .ok_or_else(|| format!("{} is not a message", field.name()))?;
    }
    let text = || String::from_utf8(serial.to_vec()).map_err(|_| "the serial is not UTF-8");
    let number = || -> Result<i128, String> {
        text()?
            .parse::<i128>()
            .map_err(|_| "the serial is not a number".into())
    };
    let value = match last.kind() {
        Kind::String => Value::String(text()?),
        Kind::Bytes => Value::Bytes(Bytes::copy_from_slice(serial)),
        Kind::Int32 | Kind::Sint32 | Kind::Sfixed32 => {
            Value::I32(i32::try_from(number()?).map_err(|e| e.to_string())?)
        }
        Kind::Int64 | Kind::Sint64 | Kind::Sfixed64 => {
            Value::I64(i64::try_from(number()?).map_err(|e| e.to_string())?)
        }
        Kind::Uint32 | Kind::Fixed32 => {
            Value::U32(u32::try_from(number()?).map_err(|e| e.to_string())?)
        }
        Kind::Uint64 | Kind::Fixed64 => {
            Value::U64(u64::try_from(number()?).map_err(|e| e.to_string())?)
        }
        _ => return Err(format!("{} cannot hold a serial", last.name())),
    };
    at.try_set_field(last, value).map_err(|e| e.to_string())?;
    let encoded = message.encode_to_vec();
    let mut frame = BytesMut::with_capacity(5 + encoded.len());
    frame.put_u8(0);
    frame.put_u32(u32::try_from(encoded.len()).map_err(|e| e.to_string())?);
    frame.put_slice(&encoded);
    Ok(frame.freeze())
}
