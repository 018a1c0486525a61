//! The dedup engine: claim → forward → record → answer (design §3, §6).
//!
//! It knows no HTTP: it is handed a `Store`, an `Upstream` and a `Clock`, so it runs the same
//! against sled and a real service as against the reference store and a simulated service.
//! It never forwards a call without a durable claim, never answers a first attempt before its
//! outcome is durable, and never lets a client's cancel stop a call that was forwarded.

mod attempt;
mod observe;
mod wait;

use crate::key::{self, Key};
use crate::record::{Response, Token};
use crate::status::{KeyState, Reason, Refusal};
use crate::store::Store;
use crate::telemetry::metrics::{Decision, Metrics};
use crate::telemetry::trace;
use attempt::{Attempt, Unclaimed};
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
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CallPolicy {
    /// How long a record protects its key.
    pub retention: Duration,
    /// How long a duplicate waits for an in-flight first attempt.
    pub in_flight_wait_max: Duration,
    /// A duplicate of a running first attempt is answered IN_PROGRESS at once.
    pub reject_in_flight: bool,
    /// What a duplicate gets: the replay, a refusal, or (observe mode) the service itself.
    pub mode: Mode,
    /// An unknown outcome is run again by the next attempt.
    pub retry_in_doubt: bool,
    /// Status codes recorded whatever the default says (bit `1 << code`).
    pub record_codes: u32,
    /// Status codes released whatever the default says (bit `1 << code`).
    pub release_codes: u32,
    /// The store failing, the call is forwarded without deduplication instead of refused.
    pub fail_open: bool,
    /// An unknown outcome is looked up in the service (an in-doubt probe): the record keeps
    /// the serial, and a duplicate of an IN_DOUBT record waits for a probe.
    pub probe: bool,
    /// Response headers and trailers (lowercase names) kept out of the record, so out of
    /// every replay; `None`: all are kept.
    pub replay_drop_metadata: Option<Arc<[String]>>,
}

impl CallPolicy {
    /// A duplicate is refused ALREADY_EXISTS instead of replayed (REJECT mode).
    pub fn rejects_duplicates(&self) -> bool {
        self.mode == Mode::Reject
    }

    /// The policy of a method nobody configured: the command line's limits.
    pub fn from_limits(limits: &Limits) -> CallPolicy {
        CallPolicy {
            retention: limits.retention,
            in_flight_wait_max: limits.in_flight_wait_max,
            reject_in_flight: false,
            mode: Mode::Replay,
            retry_in_doubt: false,
            record_codes: 0,
            release_codes: 0,
            fail_open: false,
            probe: false,
            replay_drop_metadata: None,
        }
    }
}

/// What a method's duplicates get (design §4).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Mode {
    /// The recorded answer, byte for byte (the default).
    #[default]
    Replay,
    /// ALREADY_EXISTS / IDEMPOTENCY_DUPLICATE: anti-duplicate, no replay.
    Reject,
    /// The rollout mode: every call is forwarded and answered as if the sidecar were not
    /// there; the first attempt of a key is claimed and recorded as in REPLAY, and what
    /// enforcing would have done to each later attempt is only counted. A switch to REPLAY
    /// keeps the records.
    Observe,
}

impl Mode {
    /// The name settings and `check` use.
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Replay => "replay",
            Mode::Reject => "reject",
            Mode::Observe => "observe",
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

    /// A token no other claim of this process has.
    pub fn next_token(&self) -> Token {
        let mut token = [0u8; 16];
        token[..8].copy_from_slice(&self.incarnation);
        token[8..].copy_from_slice(&self.next.fetch_add(1, Ordering::Relaxed).to_be_bytes());
        token
    }
}

/// Counts one call as running (claiming, forwarded, or recording) until dropped, however its
/// task ends.
struct RunningCall(Arc<tokio::sync::watch::Sender<usize>>);

impl RunningCall {
    fn start(counter: &Arc<tokio::sync::watch::Sender<usize>>) -> RunningCall {
        counter.send_modify(|calls| *calls += 1);
        RunningCall(counter.clone())
    }
}

impl Drop for RunningCall {
    fn drop(&mut self) {
        self.0.send_modify(|calls| *calls -= 1);
    }
}

/// Looks IN_DOUBT records up in the service (`probe.rs`); the engine asks it when a duplicate
/// meets an unknown outcome.
pub trait InDoubtProber: Send + Sync + 'static {
    /// Probes the IN_DOUBT record of `key` (a call of `method`) now, if its call has ended
    /// and no other probe holds it; resolves once the probe has settled the record (or could
    /// not be sent).
    fn probe_now<'a>(
        &'a self,
        key: Key,
        method: &'a str,
    ) -> std::pin::Pin<Box<dyn Future<Output = ()> + Send + 'a>>;
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
    /// Looks up unknown outcomes for the methods that declare a probe; `None`: none do.
    prober: Option<Arc<dyn InDoubtProber>>,
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
            prober: None,
        }
    }

    /// Records into `metrics` (store operations, waits, upstream durations).
    pub fn with_metrics(mut self, metrics: Metrics) -> Self {
        self.metrics = metrics;
        self
    }

    /// Asks `prober` when a duplicate of a probed method meets an unknown outcome.
    pub fn with_prober(mut self, prober: Option<Arc<dyn InDoubtProber>>) -> Self {
        self.prober = prober;
        self
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

    /// Now, by the engine's clock (Unix ms).
    pub fn now_ms(&self) -> u64 {
        self.clock.now_ms()
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
        self.handle_observed(call).await.answer
    }

    /// `handle`, what was decided for the call (telemetry's `idemproxy.decision`), and how
    /// long its key's record protects it.
    pub async fn handle_observed(self: &Arc<Self>, call: Call<U::Request>) -> Handled<U::Stream> {
        if let Err(error) = key::validate_serial(&call.serial) {
            let refusal = Refusal::new(Reason::KeyInvalid, error.to_string());
            return Handled::new(Answer::Refused(refusal), Decision::Invalid, None);
        }
        let key = Key::derive(&call.method, &call.caller, &call.serial);
        trace::record_key(&key);
        let (mut answered, answer) = tokio::sync::oneshot::channel();
        let engine = self.clone();
        let running = RunningCall::start(&self.running);
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
                let refusal = Refusal::outcome_unknown(key, "the call's task ended");
                Handled::new(Answer::Refused(refusal), Decision::Miss, None)
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
        answered: &mut tokio::sync::oneshot::Sender<Handled<U::Stream>>,
    ) -> Handled<U::Stream> {
        let (attempt, request, body) = Attempt::of(self, key, call);
        if attempt.policy.mode == Mode::Observe {
            // Observe mode adds nothing to an answer: not even the key's window.
            let (answer, decision) = self.observe(&attempt, request, body).await;
            return Handled::new(answer, decision, None);
        }
        let (answer, decision) = self.enforce(&attempt, request, body, answered).await;
        let expires_ms = attempt.expires_ms();
        let answer = match answer {
            // A refusal about a key a record holds says when that record expires too.
            Answer::Refused(refusal) if refusal.state.is_some_and(KeyState::is_recorded) => {
                Answer::Refused(refusal.expiring(expires_ms))
            }
            answer => answer,
        };
        Handled::new(answer, decision, expires_ms)
    }

    /// Claims the attempt's key, waiting on a running first attempt as the policy says, and
    /// forwards the call if the key is ours.
    async fn enforce(
        &self,
        attempt: &Attempt<'_, S, U, C>,
        request: U::Request,
        body: Bytes,
        answered: &mut tokio::sync::oneshot::Sender<Handled<U::Stream>>,
    ) -> (Answer<U::Stream>, Decision) {
        let key = attempt.key;
        match attempt.claim(answered).await {
            Ok(lease_until_ms) => (
                attempt.forward(request, body, lease_until_ms).await,
                Decision::Miss,
            ),
            Err(Unclaimed::Answered { answer, waited }) => {
                let decision = decision_of(&answer, waited);
                (answer, decision)
            }
            Err(Unclaimed::StoreFailed(_)) if attempt.policy.fail_open => {
                tracing::warn!(key = %key, method = %attempt.method, "store unavailable; forwarding without deduplication (fail_open)");
                self.metrics.fail_open_forwarded(&attempt.method);
                let answer = self
                    .forward_unprotected(key, attempt.lease, request, body)
                    .await;
                (answer, Decision::StoreError)
            }
            Err(Unclaimed::StoreFailed(refusal)) => {
                (Answer::Refused(refusal), Decision::StoreError)
            }
        }
    }

    /// Calls the service, bounded by the call's lease: past it, the outcome is unknown (the
    /// call may still act), never "not processed".
    async fn call_within(
        &self,
        lease: Duration,
        request: U::Request,
        body: Bytes,
    ) -> Reply<U::Stream> {
        tokio::time::timeout(lease, self.upstream.call(request, body))
            .await
            .unwrap_or_else(|_| Reply::Unknown("no answer within the call's lease".into()))
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
        let reply = self.call_within(lease, request, body).await;
        match reply {
            Reply::Complete(response) => Answer::Fresh(response),
            Reply::Oversized(stream) => Answer::Stream(stream),
            // The store failed before the claim: what it holds for the key is unknown.
            Reply::NotProcessed(why) => {
                Answer::Refused(Refusal::upstream_unavailable(key, why, KeyState::Unknown))
            }
            Reply::Unknown(why) => {
                Answer::Refused(Refusal::outcome_unknown(key, why).about(key, KeyState::Unknown))
            }
        }
    }
}

/// What the engine did with one call.
#[derive(Debug)]
pub struct Handled<S> {
    /// What the caller gets.
    pub answer: Answer<S>,
    /// What was decided (telemetry's `idemproxy.decision`).
    pub decision: Decision,
    /// When the key's record stops protecting it (Unix ms), when a record holds the key and
    /// the answer may say so (`idempotency-expires`); never in observe mode.
    pub expires_ms: Option<u64>,
}

impl<S> Handled<S> {
    fn new(answer: Answer<S>, decision: Decision, expires_ms: Option<u64>) -> Handled<S> {
        Handled {
            answer,
            decision,
            expires_ms,
        }
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
