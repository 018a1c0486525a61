//! Every metric idemproxy exports, by name, with its attributes: the one place to look for
//! what a dashboard can query (Prometheus turns `.` into `_`, adds the unit, and `_total` to
//! counters: `idemproxy.requests` is `idemproxy_requests_total`).
//!
//! Attribute values are bounded: decisions, operations and status codes are closed sets, and
//! methods are those the policy table names plus at most `METHOD_LABELS_MAX` others, then
//! `_OTHER` (a client can send any path). No key, serial or caller is ever an attribute.

use crate::store::Operation;
use opentelemetry::metrics::{Counter, Histogram, Meter};
use opentelemetry::{KeyValue, StringValue};
use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::Duration;

/// Calls answered, by `rpc.method`, `idemproxy.decision`, `rpc.grpc.status_code`.
pub const REQUESTS: &str = "idemproxy.requests";
/// The OTel RPC semantic conventions' server call duration, seconds.
pub const CALL_DURATION: &str = "rpc.server.call.duration";
/// How long the service took to answer a forwarded call, seconds, by `rpc.method`, `outcome`.
pub const UPSTREAM_DURATION: &str = "idemproxy.upstream.duration";
/// One store operation, seconds, by `operation` and `idemproxy.store.backend`.
pub const STORE_DURATION: &str = "idemproxy.store.operation.duration";
/// Store operations that failed, by `operation` and `idemproxy.store.backend`.
pub const STORE_ERRORS: &str = "idemproxy.store.errors";
/// Outcomes recorded (COMPLETED records written).
pub const RECORDS_STORED: &str = "idemproxy.records.stored";
/// In-doubt probes sent, by what the service answered (`answer`: found, not_found,
/// failed), and probing given up (`gave_up`).
pub const PROBES: &str = "idemproxy.probes";
/// Records the sweeper deleted at the end of their retention.
pub const RECORDS_EXPIRED: &str = "idemproxy.records.expired";
/// COMPLETED records evicted to keep the store within `--max-store-bytes`.
pub const RECORDS_EVICTED: &str = "idemproxy.records.evicted";
/// Duplicates that waited for an in-flight first attempt.
pub const IN_FLIGHT_WAITS: &str = "idemproxy.in_flight.waits";
/// Records in the store now (sled; Redis reports 0: its `INFO` is the place to look).
pub const STORE_RECORDS: &str = "idemproxy.store.records";
/// Logical bytes of those records (the bound `--max-store-bytes` applies to).
pub const STORE_BYTES: &str = "idemproxy.store.size";
/// Group-commit flushes of the sled store (the rate of writes over this is the batch size).
pub const GROUP_COMMIT_FLUSHES: &str = "idemproxy.group_commit.flushes";
/// Writes made durable by group-commit flushes.
pub const GROUP_COMMIT_WRITES: &str = "idemproxy.group_commit.writes";
/// Synchronous standbys of the PostgreSQL primary at the last readiness check (0: a failover
/// can lose acknowledged records).
pub const POSTGRES_SYNC_STANDBYS: &str = "idemproxy.postgres.sync_standbys";

/// Later attempts of observe-mode methods, by `rpc.method` and what enforcing would have
/// done (`decision`: replay, key_reused, in_flight, in_doubt), and first attempts (`fresh`).
pub const OBSERVE_DECISIONS: &str = "idemproxy.observe.decisions";
/// Calls forwarded without deduplication because the store failed (fail_open), by
/// `rpc.method`.
pub const FAIL_OPEN_FORWARDED: &str = "idemproxy.fail_open.forwarded";
/// Answers given in the service's place, by `reason` (the ErrorInfo reason).
pub const REFUSALS: &str = "idemproxy.refusals";
/// Records in the store by `state` (in_flight, completed, in_doubt), as the store's own
/// transitions count them.
pub const RECORDS_BY_STATE: &str = "idemproxy.records";
/// IN_DOUBT records that nothing but an operator will settle (no probe, or probing gave up).
pub const IN_DOUBT_WAITING_FOR_OPERATOR: &str = "idemproxy.in_doubt.waiting_for_operator";
/// Age of the oldest IN_DOUBT record, seconds (0 when there is none).
pub const IN_DOUBT_OLDEST_AGE: &str = "idemproxy.in_doubt.oldest_age";
/// 1 while the sidecar is ready (store writable, not draining), else 0.
pub const READY: &str = "idemproxy.ready";
/// 1 once the store failed for good (liveness fails until a restart), else 0.
pub const STORE_FAILED_FOR_GOOD: &str = "idemproxy.store.failed_for_good";

/// Distinct methods not in the policy table that get their own label value.
pub const METHOD_LABELS_MAX: usize = 64;
/// The label of every further method.
pub const METHOD_OTHER: &str = "_OTHER";

/// What idemproxy decided for one call (`idemproxy.decision`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// First attempt: claimed and forwarded.
    Miss,
    /// A duplicate answered from the record.
    Hit,
    /// A duplicate that waited for the first attempt, then got its answer.
    Wait,
    /// A duplicate refused while (or after) the first attempt ran: IN_PROGRESS, REJECT mode.
    Conflict,
    /// The same key with another request: refused.
    Mismatch,
    /// The outcome of an earlier attempt is unknown: refused.
    InDoubt,
    /// Not deduplicated: passed through.
    Bypass,
    /// Refused before any claim: bad or missing key, too large, malformed.
    Invalid,
    /// The store failed: refused (fail closed) or forwarded unprotected (fail open).
    StoreError,
    /// A later attempt of an observe-mode method: forwarded anyway (what enforcing would have
    /// done is in `idemproxy.observe.decisions`).
    Observed,
}

/// What enforcing would have done with an attempt of an observe-mode method.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Observed {
    /// A first attempt: claimed, forwarded and recorded, as enforcing does.
    Fresh,
    /// A duplicate of a recorded outcome: it would have been replayed (or, in REJECT mode,
    /// refused), not run again.
    Replay,
    /// The same key with another request: it would have been refused.
    KeyReused,
    /// A duplicate while the first attempt ran: it would have waited for its outcome.
    InFlight,
    /// A duplicate of an unknown outcome: it would have been refused until it is known.
    InDoubt,
}

impl Observed {
    /// The attribute value (`decision`).
    pub fn as_str(self) -> &'static str {
        match self {
            Observed::Fresh => "fresh",
            Observed::Replay => "replay",
            Observed::KeyReused => "key_reused",
            Observed::InFlight => "in_flight",
            Observed::InDoubt => "in_doubt",
        }
    }
}

impl Decision {
    /// What a refusal in the service's place says about the call.
    pub fn of_refusal(reason: crate::status::Reason) -> Decision {
        use crate::status::Reason;
        match reason {
            Reason::KeyReused => Decision::Mismatch,
            Reason::OutcomeUnknown => Decision::InDoubt,
            Reason::InProgress | Reason::Duplicate | Reason::ResponseNotKept => Decision::Conflict,
            Reason::StoreUnavailable | Reason::OutcomeNotRecorded | Reason::StoreFull => {
                Decision::StoreError
            }
            Reason::KeyInvalid
            | Reason::KeyMissing
            | Reason::RequestTooLarge
            | Reason::MalformedRequest
            | Reason::UpstreamUnavailable
            | Reason::CallerMissing
            | Reason::CallerInvalid
            | Reason::CallShapeUnsupported
            | Reason::BuffersExhausted
            | Reason::KeyExpired => Decision::Invalid,
            Reason::CallerQuota => Decision::Conflict,
        }
    }

    /// The attribute value.
    pub fn as_str(self) -> &'static str {
        match self {
            Decision::Miss => "miss",
            Decision::Hit => "hit",
            Decision::Wait => "wait",
            Decision::Conflict => "conflict",
            Decision::Mismatch => "mismatch",
            Decision::InDoubt => "in_doubt",
            Decision::Bypass => "bypass",
            Decision::Invalid => "invalid",
            Decision::StoreError => "store_error",
            Decision::Observed => "observed",
        }
    }
}

/// The instruments, made once per process from one meter.
#[derive(Clone)]
pub struct Metrics {
    requests: Counter<u64>,
    call_duration: Histogram<f64>,
    upstream_duration: Histogram<f64>,
    store_duration: Histogram<f64>,
    store_errors: Counter<u64>,
    records_stored: Counter<u64>,
    probes: Counter<u64>,
    records_expired: Counter<u64>,
    records_evicted: Counter<u64>,
    in_flight_waits: Counter<u64>,
    observe_decisions: Counter<u64>,
    fail_open_forwarded: Counter<u64>,
    refusals: Counter<u64>,
    backend: &'static str,
    methods: Arc<MethodLabels>,
}

/// Bucket bounds for durations, seconds: 100 µs to 10 s.
const DURATION_BOUNDS_S: [f64; 16] = [
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0,
];

impl Metrics {
    /// Instruments on `meter`, for a store of kind `backend` (`sled`, `redis`, `memory`).
    pub fn new(meter: &Meter, backend: &'static str) -> Metrics {
        let seconds = |name: &'static str, description: &'static str| {
            meter
                .f64_histogram(name)
                .with_unit("s")
                .with_description(description)
                .with_boundaries(DURATION_BOUNDS_S.to_vec())
                .build()
        };
        let counter = |name: &'static str, description: &'static str| {
            meter
                .u64_counter(name)
                .with_description(description)
                .build()
        };
        let metrics = Metrics {
            requests: counter(REQUESTS, "Calls answered, by method, decision and status"),
            call_duration: seconds(CALL_DURATION, "Duration of gRPC calls through the sidecar"),
            upstream_duration: seconds(UPSTREAM_DURATION, "Duration of forwarded calls"),
            store_duration: seconds(STORE_DURATION, "Duration of store operations"),
            store_errors: counter(STORE_ERRORS, "Store operations that failed"),
            records_stored: counter(RECORDS_STORED, "Outcomes recorded"),
            probes: counter(PROBES, "In-doubt probes, by the service's answer"),
            records_expired: counter(RECORDS_EXPIRED, "Records deleted at retention"),
            records_evicted: counter(RECORDS_EVICTED, "Completed records evicted for space"),
            in_flight_waits: counter(
                IN_FLIGHT_WAITS,
                "Duplicates that waited for a first attempt",
            ),
            observe_decisions: counter(
                OBSERVE_DECISIONS,
                "Observe mode: attempts by what enforcing would have done",
            ),
            fail_open_forwarded: counter(
                FAIL_OPEN_FORWARDED,
                "Calls forwarded unprotected because the store failed (fail_open)",
            ),
            refusals: counter(REFUSALS, "Answers given in the service's place, by reason"),
            backend,
            methods: Arc::new(MethodLabels::default()),
        };
        // Rare events exist at 0 from the start, so a dashboard shows 0 rather than no data.
        for rare in [
            &metrics.records_stored,
            &metrics.records_expired,
            &metrics.records_evicted,
            &metrics.in_flight_waits,
        ] {
            rare.add(0, &[]);
        }
        for operation in [Operation::Claim, Operation::Complete] {
            let attributes = [
                KeyValue::new("operation", operation.as_str()),
                KeyValue::new("idemproxy.store.backend", backend),
            ];
            metrics.store_errors.add(0, &attributes);
        }
        metrics
    }

    /// Reports what the store holds (`usage`) and, on sled, what group commit has done: read
    /// when metrics are collected, nothing per call.
    pub fn observe_store(meter: &Meter, store: Arc<crate::store::AnyStore>) {
        use crate::store::Store as _;
        let records = store.clone();
        let _ = meter
            .u64_observable_gauge(STORE_RECORDS)
            .with_description("Records in the store")
            .with_callback(move |observer| observer.observe(records.usage().records, &[]))
            .build();
        let bytes = store.clone();
        let _ = meter
            .u64_observable_gauge(STORE_BYTES)
            .with_unit("By")
            .with_description("Logical bytes of the records in the store")
            .with_callback(move |observer| observer.observe(bytes.usage().bytes, &[]))
            .build();
        match &*store {
            crate::store::AnyStore::Sled(_) => Metrics::observe_sled_group_commit(meter, &store),
            crate::store::AnyStore::Postgres(_) => Metrics::observe_postgres(meter, store),
            crate::store::AnyStore::Redis(_) => {}
        }
    }

    /// The census's counts of records by state and of the IN_DOUBT records waiting for an
    /// operator, read at each collection (the census walks the store on its own task).
    pub fn observe_census(meter: &Meter, census: Arc<crate::store::census::Census>) {
        let by_state = census.clone();
        let _ = meter
            .u64_observable_gauge(RECORDS_BY_STATE)
            .with_description("Records in the store by state (the last whole census pass)")
            .with_callback(move |observer| {
                let counts = by_state.counts();
                for (state, count) in [
                    ("in_flight", counts.in_flight),
                    ("completed", counts.completed),
                    ("in_doubt", counts.in_doubt),
                ] {
                    observer.observe(count, &[KeyValue::new("state", state)]);
                }
            })
            .build();
        let waiting = census.clone();
        let _ = meter
            .u64_observable_gauge(IN_DOUBT_WAITING_FOR_OPERATOR)
            .with_description(
                "IN_DOUBT records that only an operator will settle (idemproxy keys resolve)",
            )
            .with_callback(move |observer| {
                observer.observe(waiting.counts().waiting_for_operator, &[])
            })
            .build();
        let _ = meter
            .f64_observable_gauge(IN_DOUBT_OLDEST_AGE)
            .with_unit("s")
            .with_description("Age of the oldest IN_DOUBT record (0 when there is none)")
            .with_callback(move |observer| {
                let age_s = census
                    .counts()
                    .oldest_in_doubt_ms
                    .map_or(0.0, |created_ms| {
                        let now_ms = std::time::SystemTime::now()
                            .duration_since(std::time::UNIX_EPOCH)
                            .map_or(0, |elapsed| elapsed.as_millis() as u64);
                        now_ms.saturating_sub(created_ms) as f64 / 1000.0
                    });
                observer.observe(age_s, &[])
            })
            .build();
    }

    /// Readiness and a store failed for good, as 1 or 0, read at each collection from
    /// `health`: (ready, failed for good).
    pub fn observe_health(
        meter: &Meter,
        health: impl Fn() -> (bool, bool) + Send + Sync + 'static,
    ) {
        let health = Arc::new(health);
        let ready = health.clone();
        let _ = meter
            .u64_observable_gauge(READY)
            .with_description("1 while the sidecar is ready (its store takes writes, not draining)")
            .with_callback(move |observer| observer.observe(u64::from(ready().0), &[]))
            .build();
        let _ = meter
            .u64_observable_gauge(STORE_FAILED_FOR_GOOD)
            .with_description("1 once the store failed for good: liveness fails until a restart")
            .with_callback(move |observer| observer.observe(u64::from(health().1), &[]))
            .build();
    }

    /// PostgreSQL's group commits (statements and the swaps they carried) and its
    /// synchronous standbys.
    fn observe_postgres(meter: &Meter, store: Arc<crate::store::AnyStore>) {
        let postgres = |store: &crate::store::AnyStore| match store {
            crate::store::AnyStore::Postgres(postgres) => Some(postgres.commits()),
            _ => None,
        };
        let flushes = store.clone();
        let _ = meter
            .u64_observable_counter(GROUP_COMMIT_FLUSHES)
            .with_description("Group-commit flushes (PostgreSQL: statements)")
            .with_callback(move |observer| {
                if let Some((statements, _)) = postgres(&flushes) {
                    observer.observe(statements, &[]);
                }
            })
            .build();
        let writes = store.clone();
        let _ = meter
            .u64_observable_counter(GROUP_COMMIT_WRITES)
            .with_description("Writes made durable by group-commit flushes")
            .with_callback(move |observer| {
                if let Some((_, swaps)) = postgres(&writes) {
                    observer.observe(swaps, &[]);
                }
            })
            .build();
        let _ = meter
            .u64_observable_gauge(POSTGRES_SYNC_STANDBYS)
            .with_description("Synchronous standbys of the PostgreSQL primary (0: a failover can lose acknowledged records)")
            .with_callback(move |observer| {
                if let crate::store::AnyStore::Postgres(postgres) = &*store {
                    if let Some(standbys) = postgres.sync_standbys() {
                        observer.observe(standbys, &[]);
                    }
                }
            })
            .build();
    }

    /// The sled store's group-commit flushes and the writes they made durable.
    fn observe_sled_group_commit(meter: &Meter, store: &crate::store::AnyStore) {
        use std::sync::atomic::Ordering;
        let crate::store::AnyStore::Sled(sled) = store else {
            return;
        };
        let counts = sled.group_commit_counts();
        let flushes = counts.clone();
        let _ = meter
            .u64_observable_counter(GROUP_COMMIT_FLUSHES)
            .with_description("Group-commit flushes")
            .with_callback(move |observer| {
                observer.observe(flushes.flushes.load(Ordering::Relaxed), &[])
            })
            .build();
        let _ = meter
            .u64_observable_counter(GROUP_COMMIT_WRITES)
            .with_description("Writes made durable by group-commit flushes")
            .with_callback(move |observer| {
                observer.observe(counts.writes.load(Ordering::Relaxed), &[])
            })
            .build();
    }

    /// Instruments that record nothing (tests, tools).
    pub fn disabled() -> Metrics {
        // The global provider, never set by idemproxy, is the no-op one.
        Metrics::new(&opentelemetry::global::meter("idemproxy-disabled"), "none")
    }

    /// Names the methods the policy table knows, so they are always their own label.
    pub fn know_methods<'a>(&self, methods: impl IntoIterator<Item = &'a str>) {
        for method in methods {
            self.methods.insert_known(method);
        }
    }

    /// The label value for `method`: itself when known or room is left, else `_OTHER`.
    /// Shared, so a call copies a reference, not the text.
    pub fn method_label(&self, method: &str) -> StringValue {
        self.methods.label(method)
    }

    /// One answered call; `method` is its label (`method_label`), `grpc_status` `None` when
    /// the status is still to come in the streamed trailers.
    pub fn call(
        &self,
        method: StringValue,
        decision: Decision,
        grpc_status: Option<u32>,
        elapsed: Duration,
    ) {
        let status = grpc_status.map_or("streamed", status_label);
        let attributes = [
            KeyValue::new("rpc.system", "grpc"),
            KeyValue::new("rpc.method", method),
            KeyValue::new("idemproxy.decision", decision.as_str()),
            KeyValue::new("rpc.grpc.status_code", status),
        ];
        self.requests.add(1, &attributes[1..]);
        self.call_duration
            .record(elapsed.as_secs_f64(), &attributes);
    }

    /// One forwarded call's answer (`outcome`: `complete`, `not_processed`, `unknown`).
    pub fn upstream(&self, method: &str, outcome: &'static str, elapsed: Duration) {
        self.upstream_duration.record(
            elapsed.as_secs_f64(),
            &[
                KeyValue::new("rpc.method", self.method_label(method)),
                KeyValue::new("outcome", outcome),
            ],
        );
    }

    /// One store operation, and whether it failed.
    pub fn store(&self, operation: Operation, elapsed: Duration, failed: bool) {
        let attributes = [
            KeyValue::new("operation", operation.as_str()),
            KeyValue::new("idemproxy.store.backend", self.backend),
        ];
        self.store_duration
            .record(elapsed.as_secs_f64(), &attributes);
        if failed {
            self.store_errors.add(1, &attributes);
        }
    }

    /// An outcome recorded.
    pub fn record_stored(&self) {
        self.records_stored.add(1, &[]);
    }

    /// One in-doubt probe and what came of it (`found`, `not_found`, `failed`, `gave_up`).
    pub fn probe(&self, answer: &'static str) {
        self.probes.add(1, &[KeyValue::new("answer", answer)]);
    }

    /// What one sweep deleted.
    pub fn swept(&self, expired: u64, evicted: u64) {
        self.records_expired.add(expired, &[]);
        self.records_evicted.add(evicted, &[]);
    }

    /// An attempt of an observe-mode method, by what enforcing would have done.
    pub fn observed(&self, method: &str, observed: Observed) {
        self.observe_decisions.add(
            1,
            &[
                KeyValue::new("rpc.method", self.method_label(method)),
                KeyValue::new("decision", observed.as_str()),
            ],
        );
    }

    /// A call forwarded unprotected because its store failed (a fail-open method).
    pub fn fail_open_forwarded(&self, method: &str) {
        self.fail_open_forwarded
            .add(1, &[KeyValue::new("rpc.method", self.method_label(method))]);
    }

    /// An answer given in the service's place.
    pub fn refused(&self, reason: crate::status::Reason) {
        self.refusals
            .add(1, &[KeyValue::new("reason", reason.as_str())]);
    }

    /// A duplicate started waiting for a first attempt.
    pub fn in_flight_wait(&self) {
        self.in_flight_waits.add(1, &[]);
    }

    /// The store backend these metrics name.
    pub fn backend(&self) -> &'static str {
        self.backend
    }
}

/// The label value of a gRPC status code, without formatting one per call.
fn status_label(code: u32) -> &'static str {
    const CODES: [&str; 17] = [
        "0", "1", "2", "3", "4", "5", "6", "7", "8", "9", "10", "11", "12", "13", "14", "15", "16",
    ];
    CODES.get(code as usize).copied().unwrap_or("other")
}

/// The bounded set of method label values.
#[derive(Default)]
struct MethodLabels {
    known: RwLock<HashMap<String, StringValue>>,
    others: RwLock<HashMap<String, StringValue>>,
}

impl MethodLabels {
    fn insert_known(&self, method: &str) {
        let mut known = self
            .known
            .write()
            .expect("the method set is never poisoned");
        known.insert(method.to_owned(), StringValue::from(method.to_owned()));
    }

    fn label(&self, method: &str) -> StringValue {
        let known = self.known.read().expect("the method set is never poisoned");
        if let Some(label) = known.get(method) {
            return label.clone();
        }
        drop(known);
        let others = self
            .others
            .read()
            .expect("the method set is never poisoned");
        if let Some(label) = others.get(method) {
            return label.clone();
        }
        drop(others);
        let mut others = self
            .others
            .write()
            .expect("the method set is never poisoned");
        if others.len() < METHOD_LABELS_MAX {
            let label = StringValue::from(std::sync::Arc::<str>::from(method));
            others.insert(method.to_owned(), label.clone());
            return label;
        }
        StringValue::from(METHOD_OTHER)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_methods_past_the_limit_share_one_label() {
        let labels = MethodLabels::default();
        labels.insert_known("/p.S/Known");
        let label = |method: &str| labels.label(method).as_str().to_owned();
        for n in 0..METHOD_LABELS_MAX {
            assert_eq!(label(&format!("/x.S/M{n}")), format!("/x.S/M{n}"));
        }
        assert_eq!(label("/x.S/OneTooMany"), METHOD_OTHER);
        assert_eq!(label("/x.S/M0"), "/x.S/M0");
        assert_eq!(label("/p.S/Known"), "/p.S/Known");
        assert_eq!(status_label(9), "9");
        assert_eq!(status_label(99), "other");
    }
}
