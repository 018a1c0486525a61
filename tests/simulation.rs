//! Seeded simulation of the dedup engine (issue 10, first slice). One seed drives everything:
//! callers that send duplicates, hedged copies (up to five at once), another payload under a
//! used key, and another caller with the same serial; an upstream that delays, answers, fails,
//! refuses before acting, or acts and then loses its reply; and process restarts (the store
//! turns the old process's claims IN_DOUBT; a new engine with a new incarnation takes over).
//! The store has failpoints: updates that fail before they land or land and lose their
//! acknowledgement, and writes that take a while to become durable, lost when a restart comes
//! first. The wall clock the engine reads jumps forward and back by up to 5 s.
//! Time is tokio's paused clock, so a seed replays exactly. After each seed a checker asserts:
//!
//! - I1: at most one execution per key (retention is longer than any run);
//! - I2: every OK answer a caller saw is replayed byte for byte to a later retry;
//! - I3: no caller ever receives an answer made for another caller;
//! - I4: no call waits longer than its bounds (max wait, lease, margin).
//!
//! Odd seeds run the method with an in-doubt probe (issue 34): the real prober (its walk of
//! the store, and the probes duplicates ask for) over a model of the service's lookup, which
//! keeps the contract README gives the service: found when the call acted (with the answer it
//! gave), else NOT_FOUND, and from then on the calls of that serial still running in the
//! service will not act (they are abandoned, as DTM's `QueryPrepared` does). Its lookups fail
//! one time in four. The four invariants hold there too, and probes resolve outcomes.
//!
//! `SIM_SEEDS=N` runs more seeds; a failing seed is printed and `SIM_SEED=S` replays it alone.

#![allow(clippy::unwrap_used)] // Test code: a failed unwrap is a failed test.

use bytes::Bytes;
use idemproxy::engine::{
    Answer, Call, CallPolicy, Clock, Engine, InDoubtProber, Limits, Reply, SystemClock, Tokens,
    Upstream,
};
use idemproxy::policy::probe::ProbeRule;
use idemproxy::policy::PolicyTable;
use idemproxy::probe::{Lookup, Prober};
use idemproxy::record::probe::ProbeAnswer;
use idemproxy::record::Response;
use idemproxy::status::Reason;
use idemproxy::store::memory::{Faults, MemoryStore};
use idemproxy::telemetry::metrics::Metrics;
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Seeds run in CI by default.
const DEFAULT_SEEDS: u64 = 10_000;
/// Calls per seed.
const CALLS: usize = 24;

/// SplitMix64: a tiny, fully deterministic generator, so a seed means the same everywhere.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// The engine's wall clock: tokio's (paused) clock plus a jump the seed sets.
#[derive(Clone)]
struct JumpingClock {
    base: SystemClock,
    jump_ms: Arc<AtomicI64>,
}

impl Clock for JumpingClock {
    fn now_ms(&self) -> u64 {
        let now = self.base.now_ms() as i64 + self.jump_ms.load(Ordering::Relaxed);
        now.max(0) as u64
    }
}

/// The logical request a call is about.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct Logical {
    caller: String,
    serial: String,
}

/// The method every call goes to: the example payments service's Charge, whose policy
/// declares the probe `GetCharge`.
const METHOD: &str = "/idemproxy.example.v1.Payments/Charge";

/// The simulated service: what it did, and its own dice.
struct Service {
    rng: Mutex<Rng>,
    executions: Mutex<HashMap<Logical, u32>>,
    /// The answer each request's last execution gave (what its lookup returns).
    answers: Mutex<HashMap<Logical, Bytes>>,
    /// The calls of each request still running in the service: set, the call will not act
    /// (a lookup answered NOT_FOUND for it).
    running: Mutex<HashMap<Logical, Vec<Arc<AtomicBool>>>>,
}

impl Service {
    fn new(seed: u64) -> Service {
        Service {
            rng: Mutex::new(Rng(seed ^ 0x5eed)),
            executions: Mutex::new(HashMap::new()),
            answers: Mutex::new(HashMap::new()),
            running: Mutex::new(HashMap::new()),
        }
    }

    /// Acts on `logical` unless a lookup abandoned this call: which execution it was.
    fn act(&self, logical: &Logical, abandoned: &AtomicBool, payload: u8) -> Option<u32> {
        let mut executions = self.executions.lock().unwrap();
        if abandoned.load(Ordering::SeqCst) {
            return None;
        }
        let n = executions.entry(logical.clone()).or_insert(0);
        *n += 1;
        let body = format!("{}|{}|{payload}|{n}", logical.caller, logical.serial);
        self.answers
            .lock()
            .unwrap()
            .insert(logical.clone(), Bytes::from(body));
        Some(*n)
    }

    /// The lookup, as README's contract says: found with the answer the call gave, or
    /// NOT_FOUND, after which no running call of that request acts.
    fn look_up(&self, logical: &Logical) -> Option<Bytes> {
        let _executions = self.executions.lock().unwrap();
        if let Some(body) = self.answers.lock().unwrap().get(logical) {
            return Some(body.clone());
        }
        for call in self
            .running
            .lock()
            .unwrap()
            .get(logical)
            .into_iter()
            .flatten()
        {
            call.store(true, Ordering::SeqCst);
        }
        None
    }
}

impl Upstream for Service {
    type Request = (Logical, u8);
    type Stream = ();

    async fn call(&self, (logical, payload): (Logical, u8), _body: Bytes) -> Reply<()> {
        let (delay_ms, fate) = {
            let mut rng = self.rng.lock().unwrap();
            (rng.below(400), rng.below(10))
        };
        let abandoned = Arc::new(AtomicBool::new(false));
        self.running
            .lock()
            .unwrap()
            .entry(logical.clone())
            .or_default()
            .push(abandoned.clone());
        tokio::time::sleep(Duration::from_millis(delay_ms)).await;
        if let Some(calls) = self.running.lock().unwrap().get_mut(&logical) {
            calls.retain(|call| !Arc::ptr_eq(call, &abandoned));
        }
        let act = |this: &Self| this.act(&logical, &abandoned, payload);
        let answer = |status: u32, trailers_only: bool, body: String| Response {
            http_status: 200,
            grpc_status: status,
            trailers_only,
            body: Bytes::from(body),
            ..Response::default()
        };
        match fate {
            // Refused before acting: the key must be released.
            0 => Reply::NotProcessed("refused".into()),
            1 => Reply::Complete(answer(14, true, String::new())),
            2 => Reply::Complete(answer(7, true, String::new())),
            // Acted, and the reply was lost: IN_DOUBT.
            3 => match act(self) {
                Some(_) => Reply::Unknown("the reply was lost".into()),
                None => Reply::NotProcessed("abandoned".into()),
            },
            // Acted, and failed in a way that hides whether it took effect.
            4 => match act(self) {
                Some(_) => Reply::Complete(answer(13, true, String::new())),
                None => Reply::NotProcessed("abandoned".into()),
            },
            // Acted and answered: the body names the request it answers and which execution.
            _ => match act(self) {
                Some(n) => {
                    let body = format!("{}|{}|{payload}|{n}", logical.caller, logical.serial);
                    Reply::Complete(answer(0, false, body))
                }
                None => Reply::NotProcessed("abandoned".into()),
            },
        }
    }
}

/// The service's lookup (Charge's probe `GetCharge`), with its own dice: it takes a while,
/// and fails one time in four.
struct Lookups {
    service: Arc<Service>,
    rng: Mutex<Rng>,
    found: AtomicUsize,
    not_found: AtomicUsize,
}

impl Lookup for Lookups {
    async fn ask(&self, _rule: &ProbeRule, serial: &[u8], caller: &str) -> ProbeAnswer {
        let (delay_ms, fate) = {
            let mut rng = self.rng.lock().unwrap();
            (rng.below(200), rng.below(4))
        };
        tokio::time::sleep(Duration::from_millis(delay_ms)).await;
        if fate == 0 {
            return ProbeAnswer::Failed;
        }
        let logical = Logical {
            caller: caller.to_owned(),
            serial: String::from_utf8_lossy(serial).into_owned(),
        };
        match self.service.look_up(&logical) {
            Some(body) => {
                self.found.fetch_add(1, Ordering::Relaxed);
                ProbeAnswer::Found(Response {
                    http_status: 200,
                    grpc_status: 0,
                    body,
                    ..Response::default()
                })
            }
            None => {
                self.not_found.fetch_add(1, Ordering::Relaxed);
                ProbeAnswer::NotFound
            }
        }
    }
}

type SimProber = Prober<MemoryStore, Lookups, JumpingClock>;

/// The prober of a probing seed: Charge's rule from the example's descriptors.
fn prober(
    store: &Arc<MemoryStore>,
    service: &Arc<Service>,
    clock: &JumpingClock,
    seed: u64,
) -> Arc<SimProber> {
    let pool =
        prost_reflect::DescriptorPool::decode(idemproxy::pb::EXAMPLE_DESCRIPTOR_SET).unwrap();
    let defaults = CallPolicy::from_limits(&limits());
    let policy = PolicyTable::resolve(&pool, defaults, &Default::default()).unwrap();
    let lookups = Lookups {
        service: service.clone(),
        rng: Mutex::new(Rng(seed ^ 0x100c)),
        found: AtomicUsize::new(0),
        not_found: AtomicUsize::new(0),
    };
    let prober = Prober::new(
        store.clone(),
        lookups,
        Arc::new(policy),
        clock.clone(),
        Metrics::disabled(),
    );
    Arc::new(prober.expect("Charge declares a probe"))
}

/// What one call saw.
#[derive(Debug)]
struct Seen {
    logical: Logical,
    payload: u8,
    ok_body: Option<Bytes>,
    refused: Option<Reason>,
    /// Replayed from an outcome a probe recorded.
    probed: bool,
    waited: Duration,
}

fn limits() -> Limits {
    Limits {
        retention: Duration::from_secs(24 * 3600),
        lease_default: Duration::from_secs(2),
        lease_margin: Duration::from_millis(500),
        in_flight_wait_max: Duration::from_secs(1),
        records_per_caller_max: None,
    }
}

type SimEngine = Engine<MemoryStore, Service, JumpingClock>;

fn engine(
    store: &Arc<MemoryStore>,
    service: &Arc<Service>,
    clock: &JumpingClock,
    incarnation: u8,
    prober: Option<&Arc<SimProber>>,
) -> Arc<SimEngine> {
    let prober = prober.map(|prober| prober.clone() as Arc<dyn InDoubtProber>);
    Arc::new(
        Engine::new(
            store.clone(),
            service.clone(),
            clock.clone(),
            Tokens::new([incarnation; 8]),
            limits(),
        )
        .with_prober(prober),
    )
}

fn call(logical: &Logical, payload: u8, probing: bool) -> Call<(Logical, u8)> {
    Call {
        method: METHOD.into(),
        caller: logical.caller.clone(),
        serial: Bytes::from(logical.serial.clone()),
        body: Bytes::from(vec![0, 0, 0, 0, 1, payload]),
        timeout: None,
        fingerprint: None,
        policy: probing.then(|| CallPolicy {
            probe: true,
            ..CallPolicy::from_limits(&limits())
        }),
        request: (logical.clone(), payload),
        origin: None,
    }
}

/// What the calls of the seeds run so far were answered.
#[derive(Debug, Default)]
struct Tally {
    calls: usize,
    ok: usize,
    store_unavailable: usize,
    outcome_unknown: usize,
    executions: u64,
    /// Lookups that found the call, and that did not (the key released).
    probes_found: usize,
    probes_not_found: usize,
    /// Answers replayed from an outcome a probe recorded.
    resolved_by_probe: usize,
}

async fn run_seed(seed: u64) -> Tally {
    let mut rng = Rng(seed);
    let store = Arc::new(MemoryStore::new(u64::MAX).with_faults(Faults {
        seed: seed ^ 0xfa17,
        fail_before: 20,
        fail_after: 20,
        flush_max: Duration::from_millis(50),
        armed: true,
    }));
    let clock = JumpingClock {
        base: SystemClock::new(),
        jump_ms: Arc::new(AtomicI64::new(0)),
    };
    let service = Arc::new(Service::new(seed));
    let probing = seed % 2 == 1;
    let prober = probing.then(|| prober(&store, &service, &clock, seed));
    let (stop_walk, walk) = match &prober {
        Some(prober) => {
            let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
            let walk = prober.clone().run(Duration::from_millis(250), async {
                let _ = stopped.await;
            });
            (Some(stop), Some(tokio::spawn(walk)))
        }
        None => (None, None),
    };
    let current = Arc::new(Mutex::new(engine(
        &store,
        &service,
        &clock,
        1,
        prober.as_ref(),
    )));
    let seen = Arc::new(Mutex::new(Vec::<Seen>::new()));
    let mut tasks = Vec::new();
    let mut incarnation = 1;
    for _ in 0..CALLS {
        tokio::time::advance(Duration::from_millis(rng.below(300))).await;
        if rng.below(12) == 0 {
            // A restart: the old process's claims become IN_DOUBT, a new process serves.
            incarnation += 1;
            store.restart();
            *current.lock().unwrap() =
                engine(&store, &service, &clock, incarnation, prober.as_ref());
        }
        if rng.below(8) == 0 {
            // The wall clock jumps (NTP, a VM resumed): forward or back, up to 5 s.
            let jump = rng.below(10_001) as i64 - 5_000;
            clock.jump_ms.fetch_add(jump, Ordering::Relaxed);
        }
        let logical = Logical {
            caller: ["alice", "bob"][rng.below(2) as usize].into(),
            serial: format!("s{}", rng.below(4)),
        };
        // Mostly the same payload; sometimes another one under the same key (key reuse).
        let payload = u8::from(rng.below(16) == 0);
        let copies = 1 + rng.below(5);
        for _ in 0..copies {
            let engine = current.lock().unwrap().clone();
            let (seen, logical) = (seen.clone(), logical.clone());
            tasks.push(tokio::spawn(async move {
                let started = tokio::time::Instant::now();
                let answer = engine.handle(call(&logical, payload, probing)).await;
                let probed = matches!(&answer, Answer::Replay(r) if r.resolved_by_probe);
                let (ok_body, refused) = match answer {
                    Answer::Fresh(r) | Answer::Replay(r) if r.grpc_status == 0 => {
                        (Some(r.body), None)
                    }
                    Answer::Fresh(_) | Answer::Replay(_) | Answer::Stream(()) => (None, None),
                    Answer::Refused(refusal) => (None, Some(refusal.reason)),
                };
                seen.lock().unwrap().push(Seen {
                    logical,
                    payload,
                    ok_body,
                    refused,
                    probed,
                    waited: started.elapsed(),
                });
            }));
        }
    }
    for task in tasks {
        task.await.unwrap();
    }
    let engine = current.lock().unwrap().clone();
    let seen = std::mem::take(&mut *seen.lock().unwrap());
    // The checker's retries read a store that no longer fails.
    store.arm_faults(false);
    check(seed, &service, &engine, &seen, probing).await;
    if let (Some(stop), Some(walk)) = (stop_walk, walk) {
        let _ = stop.send(());
        walk.await.unwrap();
    }
    let executions: u64 = service
        .executions
        .lock()
        .unwrap()
        .values()
        .map(|n| u64::from(*n))
        .sum();
    let refused = |reason| seen.iter().filter(|c| c.refused == Some(reason)).count();
    Tally {
        calls: seen.len(),
        ok: seen.iter().filter(|c| c.ok_body.is_some()).count(),
        store_unavailable: refused(Reason::StoreUnavailable),
        outcome_unknown: refused(Reason::OutcomeUnknown),
        executions,
        probes_found: prober
            .as_ref()
            .map_or(0, |p| p.lookup().found.load(Ordering::Relaxed)),
        probes_not_found: prober
            .as_ref()
            .map_or(0, |p| p.lookup().not_found.load(Ordering::Relaxed)),
        resolved_by_probe: seen.iter().filter(|c| c.probed).count(),
    }
}

async fn check(
    seed: u64,
    service: &Arc<Service>,
    engine: &Arc<SimEngine>,
    seen: &[Seen],
    probing: bool,
) {
    // I1: at most one execution per key.
    for (logical, n) in service.executions.lock().unwrap().iter() {
        assert!(*n <= 1, "seed {seed}: {logical:?} executed {n} times");
    }
    let bound = limits().in_flight_wait_max + limits().lease_default + limits().lease_margin;
    for call in seen {
        // I3: an answer names the caller it was made for, and the very request (payload).
        if let Some(body) = &call.ok_body {
            let text = String::from_utf8_lossy(body);
            let expected = format!(
                "{}|{}|{}|",
                call.logical.caller, call.logical.serial, call.payload
            );
            assert!(
                text.starts_with(&expected),
                "seed {seed}: {:?} received {text}",
                call.logical
            );
        }
        // I4: nobody waits past the bounds (a wait, then at most one lease of its own).
        assert!(
            call.waited <= bound + bound,
            "seed {seed}: a call waited {:?}",
            call.waited
        );
    }
    // I2: every OK answer a caller saw is what a retry gets now, byte for byte.
    for call in seen {
        let Some(body) = &call.ok_body else { continue };
        match engine
            .handle(self::call(&call.logical, call.payload, probing))
            .await
        {
            Answer::Replay(response) => {
                assert_eq!(&response.body, body, "seed {seed}: the replay differs")
            }
            other => {
                eprintln!("seed {seed}: every call of {:?}:", call.logical);
                for same in seen.iter().filter(|c| c.logical == call.logical) {
                    eprintln!("  {same:?}");
                }
                panic!(
                    "seed {seed}: {:?} saw an OK answer, and a retry got {other:?}",
                    call.logical
                )
            }
        }
    }
}

#[test]
fn seeded_simulation_keeps_every_invariant() {
    let seeds: Vec<u64> = match std::env::var("SIM_SEED") {
        Ok(one) => vec![one.parse().expect("SIM_SEED is a number")],
        Err(_) => {
            let count = std::env::var("SIM_SEEDS")
                .ok()
                .and_then(|n| n.parse().ok())
                .unwrap_or(DEFAULT_SEEDS);
            (0..count).collect()
        }
    };
    let mut total = Tally::default();
    let count = seeds.len();
    for seed in seeds {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .start_paused(true)
            .build()
            .unwrap();
        let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            runtime.block_on(run_seed(seed))
        }));
        match outcome {
            Ok(tally) => {
                total.calls += tally.calls;
                total.ok += tally.ok;
                total.store_unavailable += tally.store_unavailable;
                total.outcome_unknown += tally.outcome_unknown;
                total.executions += tally.executions;
                total.probes_found += tally.probes_found;
                total.probes_not_found += tally.probes_not_found;
                total.resolved_by_probe += tally.resolved_by_probe;
            }
            Err(panic) => {
                eprintln!("simulation failed at seed {seed}; replay it with SIM_SEED={seed}");
                std::panic::resume_unwind(panic);
            }
        }
    }
    eprintln!("simulation: {count} seeds, {total:?}; 0 violations of I1-I4");
    if count >= 100 {
        // The probing seeds did probe: lookups found calls, released others, and retries got
        // outcomes that only a probe could have recorded.
        assert!(
            total.probes_found > 0 && total.probes_not_found > 0,
            "{total:?}"
        );
        assert!(total.resolved_by_probe > 0, "{total:?}");
    }
}
