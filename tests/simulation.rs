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
//! `SIM_SEEDS=N` runs more seeds; a failing seed is printed and `SIM_SEED=S` replays it alone.

#![allow(clippy::unwrap_used)] // Test code: a failed unwrap is a failed test.

use bytes::Bytes;
use idemproxy::engine::{
    Answer, Call, Clock, Engine, Limits, Reply, SystemClock, Tokens, Upstream,
};
use idemproxy::record::Response;
use idemproxy::status::Reason;
use idemproxy::store::memory::{Faults, MemoryStore};
use std::collections::HashMap;
use std::sync::atomic::{AtomicI64, Ordering};
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

/// The simulated service: what it did, and its own dice.
struct Service {
    rng: Mutex<Rng>,
    executions: Mutex<HashMap<Logical, u32>>,
}

impl Upstream for Service {
    type Request = (Logical, u8);
    type Stream = ();

    async fn call(&self, (logical, payload): (Logical, u8), _body: Bytes) -> Reply<()> {
        let (delay_ms, fate) = {
            let mut rng = self.rng.lock().unwrap();
            (rng.below(400), rng.below(10))
        };
        tokio::time::sleep(Duration::from_millis(delay_ms)).await;
        let act = |this: &Self| {
            let mut executions = this.executions.lock().unwrap();
            let n = executions.entry(logical.clone()).or_insert(0);
            *n += 1;
            *n
        };
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
            3 => {
                act(self);
                Reply::Unknown("the reply was lost".into())
            }
            // Acted, and failed in a way that hides whether it took effect.
            4 => {
                act(self);
                Reply::Complete(answer(13, true, String::new()))
            }
            // Acted and answered: the body names the request it answers and which execution.
            _ => {
                let n = act(self);
                let body = format!("{}|{}|{payload}|{n}", logical.caller, logical.serial);
                Reply::Complete(answer(0, false, body))
            }
        }
    }
}

/// What one call saw.
#[derive(Debug)]
struct Seen {
    logical: Logical,
    payload: u8,
    ok_body: Option<Bytes>,
    refused: Option<Reason>,
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

fn engine(
    store: &Arc<MemoryStore>,
    service: &Arc<Service>,
    clock: &JumpingClock,
    incarnation: u8,
) -> Arc<Engine<MemoryStore, Service, JumpingClock>> {
    Arc::new(Engine::new(
        store.clone(),
        service.clone(),
        clock.clone(),
        Tokens::new([incarnation; 8]),
        limits(),
    ))
}

fn call(logical: &Logical, payload: u8) -> Call<(Logical, u8)> {
    Call {
        method: "/sim.Svc/Do".into(),
        caller: logical.caller.clone(),
        serial: Bytes::from(logical.serial.clone()),
        body: Bytes::from(vec![0, 0, 0, 0, 1, payload]),
        timeout: None,
        fingerprint: None,
        policy: None,
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
    let service = Arc::new(Service {
        rng: Mutex::new(Rng(seed ^ 0x5eed)),
        executions: Mutex::new(HashMap::new()),
    });
    let current = Arc::new(Mutex::new(engine(&store, &service, &clock, 1)));
    let seen = Arc::new(Mutex::new(Vec::<Seen>::new()));
    let mut tasks = Vec::new();
    let mut incarnation = 1;
    for _ in 0..CALLS {
        tokio::time::advance(Duration::from_millis(rng.below(300))).await;
        if rng.below(12) == 0 {
            // A restart: the old process's claims become IN_DOUBT, a new process serves.
            incarnation += 1;
            store.restart();
            *current.lock().unwrap() = engine(&store, &service, &clock, incarnation);
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
                let answer = engine.handle(call(&logical, payload)).await;
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
    check(seed, &service, &engine, &seen).await;
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
    }
}

async fn check(
    seed: u64,
    service: &Arc<Service>,
    engine: &Arc<Engine<MemoryStore, Service, JumpingClock>>,
    seen: &[Seen],
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
        match engine.handle(self::call(&call.logical, call.payload)).await {
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
            }
            Err(panic) => {
                eprintln!("simulation failed at seed {seed}; replay it with SIM_SEED={seed}");
                std::panic::resume_unwind(panic);
            }
        }
    }
    eprintln!("simulation: {count} seeds, {total:?}; 0 violations of I1-I4");
}
