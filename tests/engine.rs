//! The dedup engine alone, without a network: the reference store, an in-process upstream
//! that counts executions, and paused tokio time, so leases and a 24-hour retention are
//! tested in milliseconds.

use bytes::Bytes;
use idemproxy::engine::{
    Answer, Call, CallPolicy, Engine, Limits, Reply, SystemClock, Tokens, Upstream,
};
use idemproxy::key::Key;
use idemproxy::record::{Response, State};
use idemproxy::status::Reason;
use idemproxy::store::memory::MemoryStore;
use prost::Message;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// Answers OK after `delay`, counting executions; `status` sets the gRPC status.
struct Counting {
    executions: AtomicU64,
    delay: Duration,
    status: u32,
}

impl Upstream for Counting {
    type Request = ();
    type Stream = ();

    async fn call(&self, _request: (), body: Bytes) -> Reply<()> {
        tokio::time::sleep(self.delay).await;
        let n = self.executions.fetch_add(1, Ordering::SeqCst) + 1;
        Reply::Complete(Response {
            http_status: 200,
            body: Bytes::from(format!("{n}:{}", body.len())),
            grpc_status: self.status,
            trailers_only: self.status != 0,
            ..Response::default()
        })
    }
}

type TestEngine = Engine<MemoryStore, Counting, SystemClock>;

fn engine(delay: Duration, status: u32, limits: Limits) -> Arc<TestEngine> {
    engine_over(MemoryStore::new(1 << 30), delay, status, limits)
}

fn engine_over(
    store: MemoryStore,
    delay: Duration,
    status: u32,
    limits: Limits,
) -> Arc<TestEngine> {
    let upstream = Counting {
        executions: AtomicU64::new(0),
        delay,
        status,
    };
    engine_of(store, upstream, limits)
}

/// An engine of this process (tokens of incarnation 7) over `store` and `upstream`.
fn engine_of<U: idemproxy::engine::Upstream>(
    store: MemoryStore,
    upstream: U,
    limits: Limits,
) -> Arc<Engine<MemoryStore, U, SystemClock>> {
    Arc::new(Engine::new(
        Arc::new(store),
        Arc::new(upstream),
        SystemClock::new(),
        Tokens::new([7; 8]),
        limits,
    ))
}

fn call(serial: &str, timeout: Option<Duration>) -> Call<()> {
    Call {
        method: "/pkg.Svc/Do".into(),
        caller: "tester".into(),
        serial: Bytes::copy_from_slice(serial.as_bytes()),
        body: Bytes::from_static(b"\0\0\0\0\x01x"),
        timeout,
        fingerprint: None,
        policy: None,
        request: (),
        origin: None,
    }
}

/// Starts a call that runs on while the test goes on.
fn in_background(engine: &Arc<TestEngine>, call: Call<()>) -> tokio::task::JoinHandle<Answer<()>> {
    let engine = engine.clone();
    tokio::spawn(async move { engine.handle(call).await })
}

fn reason(answer: &Answer<()>) -> Option<Reason> {
    match answer {
        Answer::Refused(refusal) => Some(refusal.reason),
        _ => None,
    }
}

#[tokio::test(start_paused = true)]
async fn the_default_retention_keeps_an_outcome_for_24_hours() {
    let engine = engine(Duration::ZERO, 0, Limits::default());
    assert!(matches!(
        engine.handle(call("k", None)).await,
        Answer::Fresh(_)
    ));
    tokio::time::advance(Duration::from_secs(24 * 3600 - 1)).await;
    assert!(matches!(
        engine.handle(call("k", None)).await,
        Answer::Replay(_)
    ));
    tokio::time::advance(Duration::from_secs(1)).await;
    assert!(
        matches!(engine.handle(call("k", None)).await, Answer::Fresh(_)),
        "expired: runs again"
    );
}

#[tokio::test(start_paused = true)]
async fn a_lease_follows_the_call_deadline_plus_the_margin() {
    let limits = Limits {
        lease_margin: Duration::from_secs(5),
        in_flight_wait_max: Duration::ZERO,
        ..Limits::default()
    };
    // The service hangs far past any deadline.
    let engine = engine(Duration::from_secs(3600), 0, limits);
    let first = in_background(&engine, call("slow", Some(Duration::from_secs(2))));
    tokio::time::advance(Duration::from_millis(6_900)).await;
    let during = engine
        .handle(call("slow", Some(Duration::from_secs(2))))
        .await;
    assert_eq!(
        reason(&during),
        Some(Reason::InProgress),
        "still within 2 s + 5 s"
    );
    tokio::time::advance(Duration::from_millis(200)).await;
    let first = first.await.unwrap();
    assert_eq!(
        reason(&first),
        Some(Reason::OutcomeUnknown),
        "the lease ended the wait"
    );
    let after = engine
        .handle(call("slow", Some(Duration::from_secs(2))))
        .await;
    assert_eq!(reason(&after), Some(Reason::OutcomeUnknown));
    let key = Key::derive("/pkg.Svc/Do", "tester", b"slow");
    assert_eq!(engine.store().get(&key).unwrap().state(), State::InDoubt);
}

#[tokio::test(start_paused = true)]
async fn a_call_without_a_deadline_gets_the_default_lease() {
    let limits = Limits {
        lease_default: Duration::from_secs(30),
        lease_margin: Duration::from_secs(5),
        in_flight_wait_max: Duration::ZERO,
        ..Limits::default()
    };
    let engine = engine(Duration::from_secs(3600), 0, limits);
    let first = in_background(&engine, call("nodeadline", None));
    tokio::time::advance(Duration::from_secs(34)).await;
    assert_eq!(
        reason(&engine.handle(call("nodeadline", None)).await),
        Some(Reason::InProgress)
    );
    tokio::time::advance(Duration::from_secs(2)).await;
    assert_eq!(reason(&first.await.unwrap()), Some(Reason::OutcomeUnknown));
}

#[tokio::test(start_paused = true)]
async fn waiting_duplicates_are_bounded_by_the_max_wait() {
    let limits = Limits {
        in_flight_wait_max: Duration::from_secs(3),
        ..Limits::default()
    };
    let engine = engine(Duration::from_secs(10), 0, limits);
    let first = in_background(&engine, call("w", None));
    tokio::task::yield_now().await;
    let started = tokio::time::Instant::now();
    let second = engine.handle(call("w", None)).await;
    assert_eq!(reason(&second), Some(Reason::InProgress));
    assert_eq!(started.elapsed(), Duration::from_secs(3));
    match second {
        Answer::Refused(refusal) => assert!(refusal.retry_after.is_some()),
        _ => unreachable!(),
    }
    assert!(matches!(first.await.unwrap(), Answer::Fresh(_)));
    assert!(matches!(
        engine.handle(call("w", None)).await,
        Answer::Replay(_)
    ));
}

#[tokio::test(start_paused = true)]
async fn a_caller_cancelled_while_its_claim_is_being_written_still_gets_the_call_forwarded() {
    // The claim is visible at once and durable 200 ms later; the caller gives up at 50 ms.
    let store = MemoryStore::new(1 << 30).with_write_delay(Duration::from_millis(200));
    let engine = engine_over(store, Duration::from_millis(10), 0, Limits::default());
    let gave_up = tokio::time::timeout(Duration::from_millis(50), engine.handle(call("c", None)));
    assert!(
        gave_up.await.is_err(),
        "the caller gave up during the claim"
    );
    tokio::time::sleep(Duration::from_secs(1)).await;
    let key = Key::derive("/pkg.Svc/Do", "tester", b"c");
    let record = engine.store().get(&key).expect("the claim landed");
    assert_eq!(record.state(), State::Completed, "forwarded and recorded");
    assert_eq!(engine.upstream().executions.load(Ordering::SeqCst), 1);
    assert!(matches!(
        engine.handle(call("c", None)).await,
        Answer::Replay(_)
    ));
    assert_eq!(engine.running(), 0);
}

#[tokio::test(start_paused = true)]
async fn a_duplicate_whose_caller_is_gone_stops_waiting() {
    let engine = engine(Duration::from_secs(5), 0, Limits::default());
    let first = in_background(&engine, call("g", None));
    tokio::task::yield_now().await;
    let gave_up = tokio::time::timeout(Duration::from_millis(100), engine.handle(call("g", None)));
    assert!(gave_up.await.is_err());
    tokio::time::sleep(Duration::from_millis(10)).await;
    assert_eq!(engine.running(), 1, "only the first attempt still runs");
    assert!(matches!(first.await.unwrap(), Answer::Fresh(_)));
    assert_eq!(engine.running(), 0);
}

#[tokio::test(start_paused = true)]
async fn a_released_answer_lets_the_retry_execute() {
    // PERMISSION_DENIED: the service did not act.
    let engine = engine(Duration::ZERO, 7, Limits::default());
    assert!(matches!(
        engine.handle(call("p", None)).await,
        Answer::Fresh(_)
    ));
    assert!(matches!(
        engine.handle(call("p", None)).await,
        Answer::Fresh(_)
    ));
    let key = Key::derive("/pkg.Svc/Do", "tester", b"p");
    assert!(engine.store().get(&key).is_none(), "released: no record");
}

#[tokio::test(start_paused = true)]
async fn a_restart_leaves_the_dead_process_claims_in_doubt() {
    let limits = Limits {
        in_flight_wait_max: Duration::ZERO,
        ..Limits::default()
    };
    let engine = engine(Duration::from_secs(60), 0, limits);
    let running = in_background(&engine, call("crash", None));
    tokio::task::yield_now().await;
    running.abort(); // The handling task dies; the forwarding task is the process's to lose.
    assert_eq!(engine.store().restart(), 1);
    assert_eq!(
        reason(&engine.handle(call("crash", None)).await),
        Some(Reason::OutcomeUnknown)
    );
}

/// Answers what `reply` makes, after `delay`.
struct Scripted {
    delay: Duration,
    reply: fn() -> Reply<()>,
}

impl Upstream for Scripted {
    type Request = ();
    type Stream = ();

    async fn call(&self, _request: (), _body: Bytes) -> Reply<()> {
        tokio::time::sleep(self.delay).await;
        (self.reply)()
    }
}

type ScriptedEngine = Engine<MemoryStore, Scripted, SystemClock>;

fn scripted(store: MemoryStore, delay: Duration, reply: fn() -> Reply<()>) -> Arc<ScriptedEngine> {
    let limits = Limits {
        in_flight_wait_max: Duration::ZERO,
        records_per_caller_max: Some(1),
        ..Limits::default()
    };
    engine_of(store, Scripted { delay, reply }, limits)
}

fn ok_reply() -> Reply<()> {
    Reply::Complete(Response {
        http_status: 200,
        body: Bytes::from_static(b"\0\0\0\0\0"),
        ..Response::default()
    })
}

fn failing_store(armed: bool) -> MemoryStore {
    MemoryStore::new(1 << 30).with_faults(idemproxy::store::memory::Faults {
        seed: 1,
        fail_before: 1000,
        fail_after: 0,
        flush_max: Duration::ZERO,
        armed,
    })
}

/// Every refusal the engine gives about a key, each made to happen for real.
async fn refusals_about_a_key() -> Vec<idemproxy::status::Refusal> {
    let mut refusals = Vec::new();
    let mut keep = |answer: Answer<()>| match answer {
        Answer::Refused(refusal) => refusals.push(refusal),
        _ => panic!("expected a refusal"),
    };
    let engine = scripted(MemoryStore::new(1 << 30), Duration::from_secs(10), ok_reply);
    let running = in_background_scripted(&engine, call("a", None));
    tokio::task::yield_now().await;
    keep(engine.handle(call("a", None)).await); // IN_PROGRESS
    keep(
        engine
            .handle(Call {
                body: Bytes::from_static(b"\0\0\0\0\x01y"),
                ..call("a", None)
            })
            .await,
    ); // KEY_REUSED
    keep(
        engine
            .handle(Call {
                caller: "tester".into(),
                ..call("b", None)
            })
            .await,
    ); // CALLER_QUOTA
    let mut reject = CallPolicy::from_limits(&Limits::default());
    reject.mode = idemproxy::engine::Mode::Reject;
    keep(
        engine
            .handle(Call {
                policy: Some(reject),
                ..call("a", None)
            })
            .await,
    ); // DUPLICATE
    running.await.expect("the first attempt ran");
    let in_doubt = scripted(MemoryStore::new(1 << 30), Duration::ZERO, || {
        Reply::Unknown("lost".into())
    });
    keep(in_doubt.handle(call("d", None)).await); // OUTCOME_UNKNOWN
    let oversized = scripted(MemoryStore::new(1 << 30), Duration::ZERO, || {
        Reply::Oversized(())
    });
    assert!(matches!(
        oversized.handle(call("o", None)).await,
        Answer::Stream(())
    ));
    keep(oversized.handle(call("o", None)).await); // RESPONSE_NOT_KEPT
    let unreachable = scripted(MemoryStore::new(1 << 30), Duration::ZERO, || {
        Reply::NotProcessed("refused".into())
    });
    keep(unreachable.handle(call("u", None)).await); // UPSTREAM_UNAVAILABLE
    keep(
        scripted(failing_store(true), Duration::ZERO, ok_reply)
            .handle(call("s", None))
            .await,
    ); // STORE_UNAVAILABLE
       // The claim lands; the store fails before the outcome is recorded.
    let unrecorded = scripted(failing_store(false), Duration::from_secs(1), ok_reply);
    let running = in_background_scripted(&unrecorded, call("n", None));
    tokio::task::yield_now().await;
    unrecorded.store().arm_faults(true);
    keep(running.await.expect("the call ran")); // OUTCOME_NOT_RECORDED
    let full = scripted(MemoryStore::new(1), Duration::ZERO, ok_reply);
    assert!(matches!(
        full.handle(call("f", None)).await,
        Answer::Fresh(_)
    ));
    // Another caller: the scripted engine's per-caller cap would answer first.
    keep(
        full.handle(Call {
            caller: "another".into(),
            ..call("g", None)
        })
        .await,
    ); // STORE_FULL
    refusals
}

fn in_background_scripted(
    engine: &Arc<ScriptedEngine>,
    call: Call<()>,
) -> tokio::task::JoinHandle<Answer<()>> {
    let engine = engine.clone();
    tokio::spawn(async move { engine.handle(call).await })
}

/// README's table of refusals: each reason and whether it names `key_hash` and `state`.
fn readme_refusals() -> Vec<(String, bool)> {
    let readme = include_str!("../README.md");
    readme
        .lines()
        .filter(|line| line.starts_with("| ") && line.contains("`IDEMPOTENCY_"))
        .filter_map(|line| {
            let cells: Vec<&str> = line.split(" | ").collect();
            let reason = cells.get(2)?.trim().strip_prefix('`')?.strip_suffix('`')?;
            let keyed = cells.last()?.trim_end_matches(" |").trim() == "yes";
            Some((reason.to_owned(), keyed))
        })
        .collect()
}

// Regression (issue 33): IDEMPOTENCY_KEY_REUSED named the key but not its record's state.
#[tokio::test(start_paused = true)]
async fn every_refusal_about_a_key_names_its_hash_and_state_as_the_readme_says() {
    let documented = readme_refusals();
    for reason in Reason::ALL {
        assert!(
            documented.iter().any(|(name, _)| name == reason.as_str()),
            "README's table of refusals lacks {}",
            reason.as_str()
        );
    }
    let refusals = refusals_about_a_key().await;
    let seen: std::collections::HashSet<&str> =
        refusals.iter().map(|r| r.reason.as_str()).collect();
    for (name, keyed) in &documented {
        assert_eq!(
            *keyed,
            seen.contains(name.as_str()),
            "{name}: README's last column and the engine disagree"
        );
    }
    for refusal in refusals {
        let info = refusal.to_status_proto();
        let info =
            idemproxy::pb::google::rpc::ErrorInfo::decode(&info.details[0].value[..]).unwrap();
        assert!(
            info.metadata.contains_key("key_hash"),
            "{}: no key_hash",
            info.reason
        );
        assert!(
            info.metadata.contains_key("state"),
            "{}: no state",
            info.reason
        );
    }
}
