//! The dedup engine: claim → forward → record → answer (design §3, §6).
//!
//! It knows no HTTP: it is handed a `Store`, an `Upstream` and a `Clock`, so it runs the same
//! against sled and a real service as against the reference store and a simulated service.
//! It never forwards a call without a durable claim, never answers a first attempt before its
//! outcome is durable, and never lets a client's cancel stop a call that was forwarded.

use crate::key::{self, Key};
use crate::record::{self, ClaimRequest, Claimed, Disposition, Fenced, Response, Token};
use crate::status::{Reason, Refusal};
use crate::store::{Store, StoreError};
use crate::telemetry::metrics::{Decision, Metrics, StoreOperation};
use crate::telemetry::trace;
use bytes::Bytes;
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio::time::Instant;
use tracing::Instrument as _;

/// Wall-clock time for records, which outlive the process.
pub trait Clock: Send + Sync + 'static {
    /// Milliseconds since the Unix epoch.
    fn now_ms(&self) -> u64;
}

/// The wall clock read once at start, then advanced by the monotonic (tokio) clock, so leases
/// do not jump with the system time during a run and paused-time tests move it.
#[derive(Debug, Clone)]
pub struct SystemClock {
    base_ms: u64,
    start: Instant,
}

impl SystemClock {
    /// Reads the wall clock now.
    pub fn new() -> SystemClock {
        let base_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|elapsed| elapsed.as_millis() as u64)
            .unwrap_or(0);
        SystemClock {
            base_ms,
            start: Instant::now(),
        }
    }
}

impl Default for SystemClock {
    fn default() -> Self {
        SystemClock::new()
    }
}

impl Clock for SystemClock {
    fn now_ms(&self) -> u64 {
        self.base_ms + self.start.elapsed().as_millis() as u64
    }
}

/// What the upstream did with a forwarded call.
#[derive(Debug)]
pub enum Reply<S> {
    /// A complete answer, buffered within the response limit.
    Complete(Response),
    /// An answer larger than may be kept: it is streamed on to the caller unrecorded.
    Oversized(S),
    /// The service did not process the request (connect failure, refused stream).
    NotProcessed(String),
    /// The request may have reached the service, and no complete answer came back.
    Unknown(String),
}

/// The service behind the sidecar.
pub trait Upstream: Send + Sync + 'static {
    /// Everything of the call but its body (for HTTP: the request head).
    type Request: Send + 'static;
    /// An oversized answer still being received.
    type Stream: Send + 'static;

    /// Forwards one call and collects its answer.
    fn call(
        &self,
        request: Self::Request,
        body: Bytes,
    ) -> impl Future<Output = Reply<Self::Stream>> + Send;
}

/// One deduplicated call.
#[derive(Debug)]
pub struct Call<R> {
    /// `/package.Service/Method`.
    pub method: String,
    /// Who calls, or [`key::ANONYMOUS_CALLER`].
    pub caller: String,
    /// The request serial number (the key header's value).
    pub serial: Bytes,
    /// The whole request body: its gRPC message frames.
    pub body: Bytes,
    /// The call's own deadline (`grpc-timeout`), if it sent one.
    pub timeout: Option<Duration>,
    /// The request's fingerprint when the proxy computed it (canonical, with ignored fields
    /// masked); `None`: SHA-256 over the body's frames.
    pub fingerprint: Option<[u8; 32]>,
    /// The method's policy; `None`: the engine's defaults.
    pub policy: Option<CallPolicy>,
    /// What the upstream needs besides the body.
    pub request: R,
    /// The trace and span id of this call's span (`telemetry::trace::origin_of`), kept with
    /// its outcome so that a replay's span can link to it.
    pub origin: Option<[u8; 24]>,
}

/// What the caller gets.
#[derive(Debug)]
pub enum Answer<S> {
    /// The service's own answer to this first attempt.
    Fresh(Response),
    /// The recorded answer of an earlier attempt.
    Replay(Response),
    /// The service's answer, too large to keep, streamed on.
    Stream(S),
    /// idemproxy answers in the service's place.
    Refused(Refusal),
}

/// The engine's limits; every wait and record has one.
#[derive(Debug, Clone)]
pub struct Limits {
    /// How long a record protects its key.
    pub retention: Duration,
    /// The lease of a call that sent no `grpc-timeout`.
    pub lease_default: Duration,
    /// Added to a call's deadline to form its lease.
    pub lease_margin: Duration,
    /// How long a duplicate waits for an in-flight first attempt.
    pub in_flight_wait_max: Duration,
    /// Live records one caller may hold; `None`: no cap.
    pub records_per_caller_max: Option<u64>,
}

/// What one method's policy asks of the engine (design §4), resolved per method at start.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CallPolicy {
    /// How long a record protects its key.
    pub retention: Duration,
    /// How long a duplicate waits for an in-flight first attempt.
    pub in_flight_wait_max: Duration,
    /// A duplicate of a running first attempt is answered IN_PROGRESS at once.
    pub reject_in_flight: bool,
    /// A duplicate gets ALREADY_EXISTS / IDEMPOTENCY_DUPLICATE instead of the replay.
    pub reject_duplicates: bool,
    /// An unknown outcome is run again by the next attempt.
    pub retry_in_doubt: bool,
    /// Status codes recorded whatever the default says (bit `1 << code`).
    pub record_codes: u32,
    /// Status codes released whatever the default says (bit `1 << code`).
    pub release_codes: u32,
    /// The store failing, the call is forwarded without deduplication instead of refused.
    pub fail_open: bool,
}

impl CallPolicy {
    /// The policy of a method nobody configured: the command line's limits.
    pub fn from_limits(limits: &Limits) -> CallPolicy {
        CallPolicy {
            retention: limits.retention,
            in_flight_wait_max: limits.in_flight_wait_max,
            reject_in_flight: false,
            reject_duplicates: false,
            retry_in_doubt: false,
            record_codes: 0,
            release_codes: 0,
            fail_open: false,
        }
    }
}

/// Claim tokens unique to this process: an incarnation id and a counter.
#[derive(Debug)]
pub struct Tokens {
    incarnation: [u8; 8],
    next: AtomicU64,
}

impl Tokens {
    /// Tokens prefixed with `incarnation`, which must differ between processes.
    pub fn new(incarnation: [u8; 8]) -> Tokens {
        Tokens {
            incarnation,
            next: AtomicU64::new(1),
        }
    }

    /// An incarnation id from the process id and the time, for production.
    pub fn for_this_process() -> Tokens {
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|elapsed| elapsed.as_nanos())
            .unwrap_or(0);
        let seed = format!("{}:{nanos}", std::process::id());
        let digest = key::fingerprint(seed.as_bytes());
        Tokens::new(digest[..8].try_into().expect("a digest has 32 bytes"))
    }

    /// This process's incarnation: the first 8 bytes of every token it issues.
    pub fn incarnation(&self) -> [u8; 8] {
        self.incarnation
    }

    fn next(&self) -> Token {
        let mut token = [0u8; 16];
        token[..8].copy_from_slice(&self.incarnation);
        token[8..].copy_from_slice(&self.next.fetch_add(1, Ordering::Relaxed).to_be_bytes());
        token
    }
}

/// Counts one call as running (claiming, forwarded, or recording) until dropped, however its
/// task ends.
struct Running(Arc<tokio::sync::watch::Sender<usize>>);

impl Running {
    fn start(counter: &Arc<tokio::sync::watch::Sender<usize>>) -> Running {
        counter.send_modify(|calls| *calls += 1);
        Running(counter.clone())
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        self.0.send_modify(|calls| *calls -= 1);
    }
}

/// What a claim needs of its call.
#[derive(Clone, Copy)]
struct Asked<'a> {
    method: &'a str,
    caller: &'a str,
    timeout: Option<Duration>,
    origin: Option<&'a [u8; 24]>,
}

/// Why a call is not ours to forward.
enum Unclaimed<S> {
    /// A duplicate, answered from (or refused by) the record.
    Answered(Answer<S>),
    /// The store failed: refused, unless the method is fail-open.
    StoreFailed(Refusal),
}

/// The dedup engine over one store, one upstream and one clock.
pub struct Engine<S, U, C> {
    /// Calls still running (claimed or claiming, their outcome not yet recorded), for the
    /// drain.
    running: Arc<tokio::sync::watch::Sender<usize>>,
    store: Arc<S>,
    upstream: Arc<U>,
    clock: C,
    tokens: Tokens,
    limits: Limits,
    metrics: Metrics,
    /// Seals recorded responses at rest; `None`: records in the clear.
    sealer: Option<Arc<crate::seal::Sealer>>,
}

fn store_refusal(key: Key, error: &StoreError) -> Refusal {
    if let StoreError::Full { .. } = error {
        tracing::warn!(key = %key, %error, "store full; refusing a new key (fail closed)");
        return Refusal::new(
            Reason::StoreFull,
            format!(
                "the idempotency store is full and keeps every outcome for its retention, so it \
                 takes no new key until records expire; nothing was forwarded: {error}"
            ),
        )
        .about(key, crate::status::STATE_ABSENT);
    }
    tracing::warn!(key = %key, %error, "store failed; refusing the call (fail closed)");
    Refusal::new(
        Reason::StoreUnavailable,
        format!("the idempotency store is unavailable: {error}"),
    )
    .about(key, crate::status::STATE_UNKNOWN)
}

impl<S: Store, U: Upstream, C: Clock> Engine<S, U, C> {
    /// An engine over its parts.
    pub fn new(store: Arc<S>, upstream: Arc<U>, clock: C, tokens: Tokens, limits: Limits) -> Self {
        Engine {
            running: Arc::new(tokio::sync::watch::Sender::new(0)),
            store,
            upstream,
            clock,
            tokens,
            limits,
            metrics: Metrics::disabled(),
            sealer: None,
        }
    }

    /// Seals every recorded response with `sealer` (when there is one) and opens them on the
    /// way back.
    pub fn with_sealer(mut self, sealer: Option<Arc<crate::seal::Sealer>>) -> Self {
        self.sealer = sealer;
        self
    }

    /// Records into `metrics` (store operations, waits, upstream durations).
    pub fn with_metrics(mut self, metrics: Metrics) -> Self {
        self.metrics = metrics;
        self
    }

    /// One store transition, timed and counted under `operation`, inside a store span.
    async fn timed_update<T>(
        &self,
        operation: StoreOperation,
        key: &Key,
        transition: impl FnMut(Option<&record::Record>) -> (record::Change, T) + Send,
    ) -> Result<T, StoreError>
    where
        T: Send,
    {
        let span = trace::store_span(operation.as_str(), self.metrics.backend());
        let started = Instant::now();
        let update = match &self.sealer {
            None => self.store.update(key, transition).instrument(span).await,
            Some(sealer) => {
                let sealed = sealer.around(key, transition);
                self.store.update(key, sealed).instrument(span).await
            }
        };
        let result = update;
        self.metrics
            .store(operation, started.elapsed(), result.is_err());
        result
    }

    /// Resolves once no call is running (none may start meanwhile: the caller has stopped
    /// taking calls). A drain waits on it so every outcome is recorded.
    pub fn idle(&self) -> impl Future<Output = ()> + Send + 'static {
        let mut running = self.running.subscribe();
        async move {
            let _ = running.wait_for(|calls| *calls == 0).await;
        }
    }

    /// Calls still running.
    pub fn running(&self) -> usize {
        *self.running.borrow()
    }

    /// The store this engine records in.
    pub fn store(&self) -> &Arc<S> {
        &self.store
    }

    /// The service this engine forwards to.
    pub fn upstream(&self) -> &Arc<U> {
        &self.upstream
    }

    /// Serves one deduplicated call. The claim and the forwarded call run in their own task:
    /// dropping this future (the client cancelled) can never leave a claim landed and its call
    /// not forwarded; a forwarded call runs on and its outcome is recorded.
    pub async fn handle(self: &Arc<Self>, call: Call<U::Request>) -> Answer<U::Stream> {
        self.handle_observed(call).await.0
    }

    /// `handle`, and what was decided for the call (telemetry's `idemproxy.decision`).
    pub async fn handle_observed(
        self: &Arc<Self>,
        call: Call<U::Request>,
    ) -> (Answer<U::Stream>, Decision) {
        if let Err(error) = key::validate_serial(&call.serial) {
            let refusal = Refusal::new(Reason::KeyInvalid, error.to_string());
            return (Answer::Refused(refusal), Decision::Invalid);
        }
        let key = Key::derive(&call.method, &call.caller, &call.serial);
        trace::record_key(&key);
        let (mut answered, answer) = tokio::sync::oneshot::channel();
        let engine = self.clone();
        let running = Running::start(&self.running);
        // The task carries the call's span, so the store's and upstream's spans are children.
        // Boxed: the future is kilobytes, and spawning moves it several times; a box moves a
        // pointer (sidecar CPU per call -10 to -18 %, BENCHMARKS.md).
        tokio::spawn(Box::pin(
            async move {
                let _running = running;
                let outcome = engine.claim_and_forward(key, call, &mut answered).await;
                let _ = answered.send(outcome);
            }
            .instrument(trace::current()),
        ));
        match answer.await {
            Ok(outcome) => outcome,
            Err(_) => {
                tracing::error!(key = %key, "the call's task ended without an answer");
                let refusal = Refusal::new(Reason::OutcomeUnknown, "the call's outcome is unknown")
                    .about(key, "IN_DOUBT");
                (Answer::Refused(refusal), Decision::Miss)
            }
        }
    }

    /// Claims `key` and, if it is ours, forwards the call and records its outcome. Runs to the
    /// end whether or not anyone still waits for the answer, except that a duplicate stops
    /// waiting on an in-flight first attempt once its caller is gone (`answered` closed).
    async fn claim_and_forward(
        &self,
        key: Key,
        call: Call<U::Request>,
        answered: &mut tokio::sync::oneshot::Sender<(Answer<U::Stream>, Decision)>,
    ) -> (Answer<U::Stream>, Decision) {
        let fingerprint = call
            .fingerprint
            .unwrap_or_else(|| key::fingerprint(&call.body));
        let policy = call
            .policy
            .unwrap_or_else(|| CallPolicy::from_limits(&self.limits));
        let token = self.tokens.next();
        let lease = call.timeout.unwrap_or(self.limits.lease_default) + self.limits.lease_margin;
        let mut waited = false;
        let asked = Asked {
            method: &call.method,
            caller: &call.caller,
            timeout: call.timeout,
            origin: call.origin.as_ref(),
        };
        let claimed = self
            .claim(
                asked,
                &policy,
                key,
                &fingerprint,
                token,
                lease,
                &mut waited,
                answered,
            )
            .await;
        match claimed {
            Ok(()) => {}
            Err(Unclaimed::Answered(answer)) => {
                let decision = decision_of(&answer, waited);
                return (answer, decision);
            }
            Err(Unclaimed::StoreFailed(refusal)) if policy.fail_open => {
                tracing::warn!(key = %key, method = %call.method, "store unavailable; forwarding without deduplication (fail_open)");
                drop(refusal);
                let answer = self
                    .forward_unprotected(key, lease, call.request, call.body)
                    .await;
                return (answer, Decision::StoreError);
            }
            Err(Unclaimed::StoreFailed(refusal)) => {
                return (Answer::Refused(refusal), Decision::StoreError)
            }
        }
        let request = (call.request, call.body);
        let answer = self
            .forward(
                key,
                token,
                lease,
                policy,
                &call.method,
                call.origin,
                request,
            )
            .await;
        (answer, Decision::Miss)
    }

    /// Claims the key, waiting on an in-flight first attempt (`waited` says whether it did).
    /// `Ok` means ours to forward.
    #[allow(clippy::too_many_arguments)]
    async fn claim(
        &self,
        call: Asked<'_>,
        policy: &CallPolicy,
        key: Key,
        fingerprint: &[u8; 32],
        token: Token,
        lease: Duration,
        waited: &mut bool,
        answered: &mut tokio::sync::oneshot::Sender<(Answer<U::Stream>, Decision)>,
    ) -> Result<(), Unclaimed<U::Stream>> {
        // Stop a little before the caller's own deadline, so it hears ABORTED with a
        // pushback instead of timing out with nothing.
        let wait_max = if policy.reject_in_flight || policy.reject_duplicates {
            Duration::ZERO
        } else {
            policy.in_flight_wait_max
        };
        let wait = call.timeout.map_or(wait_max, |timeout| {
            let answer_time = (timeout / 10).min(Duration::from_millis(100));
            timeout.saturating_sub(answer_time).min(wait_max)
        });
        let wait_until = Instant::now() + wait;
        let at_quota = match self.limits.records_per_caller_max {
            None => false,
            Some(max) => match self
                .store
                .caller_records(call.caller, self.clock.now_ms())
                .await
            {
                Ok(live) => live >= max,
                Err(error) => return Err(Unclaimed::StoreFailed(store_refusal(key, &error))),
            },
        };
        let mut armed = None;
        loop {
            let now_ms = self.clock.now_ms();
            let request = ClaimRequest {
                fingerprint,
                method: call.method,
                caller: call.caller,
                token,
                now_ms,
                lease_until_ms: now_ms + lease.as_millis() as u64,
                expires_ms: now_ms + policy.retention.as_millis() as u64,
                sole_owner: self
                    .store
                    .is_sole_owner()
                    .then(|| self.tokens.incarnation()),
                retry_in_doubt: policy.retry_in_doubt,
                origin: call.origin,
                at_quota,
            };
            let claimed = self
                .timed_update(StoreOperation::Claim, &key, |current| {
                    record::claim(current, &request)
                })
                .await;
            let lease_until_ms = match claimed {
                Ok(Claimed::Owned) => return Ok(()),
                Ok(Claimed::InProgress { .. }) if policy.reject_duplicates => {
                    return Err(Unclaimed::Answered(Self::refuse_duplicate(
                        key,
                        "IN_FLIGHT",
                    )))
                }
                Ok(Claimed::Replay(_) | Claimed::ResponseNotKept) if policy.reject_duplicates => {
                    return Err(Unclaimed::Answered(Self::refuse_duplicate(
                        key,
                        "COMPLETED",
                    )))
                }
                Ok(Claimed::InProgress { lease_until_ms }) => lease_until_ms,
                Ok(other) => return Err(Unclaimed::Answered(Self::answer_duplicate(key, other))),
                Err(error) => {
                    // The claim may have landed in memory without reaching the disk: take it
                    // back if we can, so the key is not left blocked by a call never forwarded.
                    let _ = self
                        .timed_update(StoreOperation::Release, &key, |current| {
                            record::release(current, &token)
                        })
                        .await;
                    return Err(Unclaimed::StoreFailed(store_refusal(key, &error)));
                }
            };
            let Some(changed) = armed.take() else {
                // Arm the watch, then read again: a change between the two is never missed.
                armed = Some(self.store.changed(&key));
                if !*waited {
                    *waited = true;
                    self.metrics.in_flight_wait();
                }
                continue;
            };
            let now = Instant::now();
            if now >= wait_until {
                let retry_after = Duration::from_millis(lease_until_ms.saturating_sub(now_ms))
                    .min(self.limits.in_flight_wait_max)
                    .max(Duration::from_millis(1));
                return Err(Unclaimed::Answered(Answer::Refused(
                    Refusal::new(
                        Reason::InProgress,
                        "an earlier attempt with this key is still running",
                    )
                    .about(key, "IN_FLIGHT")
                    .with_retry_after(retry_after),
                )));
            }
            let lease_left = Duration::from_millis(lease_until_ms.saturating_sub(now_ms));
            let wake = wait_until.min(now + lease_left);
            tokio::select! {
                () = changed => {}
                () = tokio::time::sleep_until(wake) => {}
                // Nobody to answer: stop between two reads, never inside one.
                () = answered.closed() => {
                    return Err(Unclaimed::Answered(Answer::Refused(Refusal::new(
                        Reason::InProgress,
                        "the caller went away while an earlier attempt was running",
                    ).about(key, "IN_FLIGHT"))));
                }
            }
        }
    }

    fn refuse_duplicate(key: Key, state: &'static str) -> Answer<U::Stream> {
        Answer::Refused(
            Refusal::new(
                Reason::Duplicate,
                "a call with this idempotency key was already made",
            )
            .about(key, state),
        )
    }

    fn answer_duplicate(key: Key, claimed: Claimed) -> Answer<U::Stream> {
        let (reason, message, state) = match claimed {
            Claimed::Replay(response) => return Answer::Replay(response),
            Claimed::KeyReused { state } => (
                Reason::KeyReused,
                "this idempotency key was already used with another request",
                record::state_name(state),
            ),
            Claimed::InDoubt => (
                Reason::OutcomeUnknown,
                "an earlier attempt with this key may have taken effect and its outcome is unknown",
                "IN_DOUBT",
            ),
            Claimed::QuotaExceeded => (
                Reason::CallerQuota,
                "this caller holds as many recorded keys as it may; retry once some expire",
                crate::status::STATE_ABSENT,
            ),
            Claimed::Unreadable => (
                Reason::OutcomeUnknown,
                "an earlier attempt with this key completed, but its recorded outcome cannot be decrypted (its key is no longer in the key file, or the record was altered)",
                "IN_DOUBT",
            ),
            Claimed::ResponseNotKept => (
                Reason::ResponseNotKept,
                "an earlier attempt with this key completed, but its response was too large to keep",
                "COMPLETED",
            ),
            Claimed::Owned | Claimed::InProgress { .. } => {
                unreachable!("claim() handles Owned and InProgress itself")
            }
        };
        Answer::Refused(Refusal::new(reason, message).about(key, state))
    }

    /// Forwards a claimed call within its lease and records what happened.
    #[allow(clippy::too_many_arguments)]
    async fn forward(
        &self,
        key: Key,
        token: Token,
        lease: Duration,
        policy: CallPolicy,
        method: &str,
        origin: Option<[u8; 24]>,
        (request, body): (U::Request, Bytes),
    ) -> Answer<U::Stream> {
        let retention = policy.retention;
        let started = Instant::now();
        let reply = tokio::time::timeout(lease, self.upstream.call(request, body))
            .await
            .unwrap_or_else(|_| Reply::Unknown("no answer within the call's lease".into()));
        let outcome = match &reply {
            Reply::Complete(_) | Reply::Oversized(_) => "complete",
            Reply::NotProcessed(_) => "not_processed",
            Reply::Unknown(_) => "unknown",
        };
        self.metrics.upstream(method, outcome, started.elapsed());
        match reply {
            Reply::Complete(mut response) => {
                if let Some(origin) = origin {
                    response.origin_trace = origin.to_vec();
                }
                self.record(key, token, &policy, response).await
            }
            Reply::Oversized(stream) => {
                let expires_ms = self.expires_ms(retention);
                let now_ms = self.clock.now_ms();
                let kept = self
                    .timed_update(StoreOperation::Complete, &key, |current| {
                        record::complete(current, &token, None, now_ms, expires_ms)
                    })
                    .await;
                if let Err(error) = kept {
                    tracing::warn!(key = %key, %error, "could not record an oversized outcome");
                }
                Answer::Stream(stream)
            }
            Reply::NotProcessed(why) => {
                self.settle(key, StoreOperation::Release, |current| {
                    record::release(current, &token)
                })
                .await;
                Answer::Refused(
                    Refusal::new(
                        Reason::UpstreamUnavailable,
                        format!("the service is unavailable: {why}"),
                    )
                    // Released: no record holds the key, so a retry runs.
                    .about(key, crate::status::STATE_ABSENT),
                )
            }
            Reply::Unknown(why) => {
                tracing::warn!(key = %key, %method, "the call's outcome is unknown ({why}); its key stays IN_DOUBT until an operator resolves it or it expires");
                self.settle(key, StoreOperation::MarkInDoubt, |current| {
                    record::mark_in_doubt(current, &token, &why)
                })
                .await;
                Answer::Refused(
                    Refusal::new(
                        Reason::OutcomeUnknown,
                        format!("the call may have taken effect and its outcome is unknown: {why}"),
                    )
                    .about(key, "IN_DOUBT"),
                )
            }
        }
    }

    async fn record(
        &self,
        key: Key,
        token: Token,
        policy: &CallPolicy,
        response: Response,
    ) -> Answer<U::Stream> {
        let disposition =
            record::classify_with(&response, policy.record_codes, policy.release_codes);
        match disposition {
            Disposition::Record => {
                let now_ms = self.clock.now_ms();
                let expires_ms = self.expires_ms(policy.retention);
                // One copy per attempt: the record keeps it, the caller gets `response`.
                let result = self
                    .timed_update(StoreOperation::Complete, &key, |current| {
                        let kept = Some(response.clone());
                        record::complete(current, &token, kept, now_ms, expires_ms)
                    })
                    .await;
                match result {
                    Ok(Fenced::Applied) => {
                        self.metrics.record_stored();
                        Answer::Fresh(response)
                    }
                    Ok(Fenced::NotOwner) => {
                        tracing::warn!(key = %key, "the record changed hands before the outcome; answering unrecorded");
                        Answer::Fresh(response)
                    }
                    // The service acted, but no retry could learn it: say the outcome is
                    // unknown, never UNAVAILABLE (which means "not forwarded").
                    Err(error) => {
                        tracing::warn!(key = %key, %error, "the service acted but its outcome could not be stored");
                        Answer::Refused(
                            Refusal::new(
                                Reason::OutcomeNotRecorded,
                                format!("the service acted, but its outcome could not be stored, so it is unknown here: {error}"),
                            )
                            .about(key, "IN_FLIGHT"),
                        )
                    }
                }
            }
            Disposition::Release => {
                self.settle(key, StoreOperation::Release, |current| {
                    record::release(current, &token)
                })
                .await;
                Answer::Fresh(response)
            }
            Disposition::InDoubt => {
                let why = format!("the service answered grpc-status {}", response.grpc_status);
                self.settle(key, StoreOperation::MarkInDoubt, |current| {
                    record::mark_in_doubt(current, &token, &why)
                })
                .await;
                Answer::Fresh(response)
            }
        }
    }

    /// Forwards a call with no claim and records nothing: only for a fail-open method whose
    /// store is failing.
    async fn forward_unprotected(
        &self,
        key: Key,
        lease: Duration,
        request: U::Request,
        body: Bytes,
    ) -> Answer<U::Stream> {
        let reply = tokio::time::timeout(lease, self.upstream.call(request, body))
            .await
            .unwrap_or_else(|_| Reply::Unknown("no answer within the call's lease".into()));
        match reply {
            Reply::Complete(response) => Answer::Fresh(response),
            Reply::Oversized(stream) => Answer::Stream(stream),
            // The store failed before the claim: what it holds for the key is unknown.
            Reply::NotProcessed(why) => Answer::Refused(
                Refusal::new(
                    Reason::UpstreamUnavailable,
                    format!("the service is unavailable: {why}"),
                )
                .about(key, crate::status::STATE_UNKNOWN),
            ),
            Reply::Unknown(why) => Answer::Refused(
                Refusal::new(
                    Reason::OutcomeUnknown,
                    format!("the call may have taken effect and its outcome is unknown: {why}"),
                )
                .about(key, crate::status::STATE_UNKNOWN),
            ),
        }
    }

    /// Applies a release or in-doubt mark; on failure the record stays IN_FLIGHT and becomes
    /// IN_DOUBT when its lease runs out, which is safe, so the caller still gets its answer.
    async fn settle(
        &self,
        key: Key,
        operation: StoreOperation,
        transition: impl FnMut(Option<&record::Record>) -> (record::Change, Fenced) + Send,
    ) {
        if let Err(error) = self.timed_update(operation, &key, transition).await {
            tracing::warn!(key = %key, %error, "could not settle a record; it becomes IN_DOUBT at its lease");
        }
    }

    fn expires_ms(&self, retention: Duration) -> u64 {
        self.clock.now_ms() + retention.as_millis() as u64
    }
}

/// What an answer that was not forwarded says about the call.
fn decision_of<S>(answer: &Answer<S>, waited: bool) -> Decision {
    match answer {
        Answer::Replay(_) if waited => Decision::Wait,
        Answer::Replay(_) => Decision::Hit,
        Answer::Fresh(_) | Answer::Stream(_) => Decision::Miss,
        Answer::Refused(refusal) => Decision::of_refusal(refusal.reason),
    }
}
