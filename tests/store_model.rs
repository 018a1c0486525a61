//! The store model test: random sequences of claim, complete, release, mark-in-doubt, time
//! passing, maintenance and restart, applied to a durable store and to the in-memory
//! reference store; after every step both must have answered alike and hold the same records.
//! On sled (a real directory) a restart is a real reopen, so a change that was acknowledged
//! but not durable shows up as a difference. On Redis (a real redis-server) a restart is a new
//! store and connection; Redis expires by its own clock, so records are compared as of the
//! model's time (an expired record counts as absent) and claims name no sole owner.

#![allow(clippy::unwrap_used)] // Test code: a failed unwrap is a failed test.

mod support;

use idemproxy::key::Key;
use idemproxy::record::{self, ClaimRequest, Response, Token};
use idemproxy::store::memory::MemoryStore;
use idemproxy::store::postgres::{PostgresOptions, PostgresStore, EXPIRY_STEP_MS};
use idemproxy::store::redis::{RedisOptions, RedisStore};
use idemproxy::store::sled::{SledOptions, SledStore};
use idemproxy::store::{Operation, Store};
use proptest::prelude::*;
use std::sync::Arc;
use std::time::Duration;

/// Keys in play: few, so operations collide.
const KEYS: u8 = 4;

#[derive(Debug, Clone)]
enum Op {
    /// A claim of key `key` with payload `payload` (0 or 1).
    Claim { key: u8, payload: u8 },
    /// The owner of the `nth` token issued so far records an outcome.
    Complete { key: u8, nth: usize, kept: bool },
    /// The owner of the `nth` token releases.
    Release { key: u8, nth: usize },
    /// The owner of the `nth` token marks its call in doubt.
    MarkInDoubt { key: u8, nth: usize },
    /// Time passes.
    Advance { ms: u64 },
    /// An operator purges the record.
    Purge { key: u8 },
    /// A sweeper round.
    Maintain,
    /// The process ends and a new one opens the store.
    Restart,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (0..KEYS, 0..2u8).prop_map(|(key, payload)| Op::Claim { key, payload }),
        3 => (0..KEYS, 0..8usize, any::<bool>()).prop_map(|(key, nth, kept)| Op::Complete { key, nth, kept }),
        1 => (0..KEYS, 0..8usize).prop_map(|(key, nth)| Op::Release { key, nth }),
        1 => (0..KEYS, 0..8usize).prop_map(|(key, nth)| Op::MarkInDoubt { key, nth }),
        1 => (0..KEYS).prop_map(|key| Op::Purge { key }),
        2 => (1..3_000u64).prop_map(|ms| Op::Advance { ms }),
        1 => Just(Op::Maintain),
        1 => Just(Op::Restart),
    ]
}

fn key(n: u8) -> Key {
    Key::derive("/model.Svc/Do", "-", &[b'k', b'0' + n])
}

fn options(dir: &std::path::Path, pack_records: u64) -> SledOptions {
    SledOptions {
        dir: dir.to_owned(),
        cache_bytes: 1 << 20,
        bytes_max: 1 << 30,
        evict_when_full: false,
        flush_per_write: false,
        flush_timeout: Duration::from_secs(10),
        pack_records,
    }
}

/// Opens sled again on `dir`.
fn reopen(dir: &std::path::Path, pack_records: u64) -> SledStore {
    support::retry_sled_lock(dir, || SledStore::open(&options(dir, pack_records)))
        .expect("sled reopens")
}

/// The durable store under test (one per case: the size difference costs nothing).
#[allow(clippy::large_enum_variant)]
enum Durable {
    /// With how many records in `records` the sweeper packs (1: at every round).
    Sled(tempfile::TempDir, Option<SledStore>, u64),
    Redis(RedisOptions, Option<RedisStore>),
    Postgres(PostgresOptions, Option<Arc<PostgresStore>>),
}

fn redis_options(url: String) -> RedisOptions {
    RedisOptions {
        urls: vec![url],
        cluster: false,
        password: None,
        ca_pem: None,
        key_prefix: "model".into(),
        command_timeout: Duration::from_secs(5),
        poll_interval: Duration::from_millis(100),
        track_callers: false,
        master_name: None,
        wait_replicas: 0,
    }
}

/// Both stores, and what the simulated processes have done.
struct Model {
    durable: Durable,
    memory: MemoryStore,
    process: u8,
    issued: Vec<Token>,
    now_ms: u64,
}

impl Model {
    fn sled(pack_records: u64) -> Model {
        let dir = tempfile::tempdir().unwrap();
        let sled = SledStore::open(&options(dir.path(), pack_records)).unwrap();
        Model::over(Durable::Sled(dir, Some(sled), pack_records), 1_000)
    }

    fn redis(options: RedisOptions) -> Model {
        let store = RedisStore::new(&options).unwrap();
        // Redis expires records by the wall clock: the model's time starts at it.
        let now_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis() as u64;
        Model::over(Durable::Redis(options, Some(store)), now_ms)
    }

    /// A table of its own on the test binary's PostgreSQL. PostgreSQL expires records by
    /// the time `maintain` is given, so the model's time is used as it is on sled.
    fn postgres() -> Model {
        let options = PostgresOptions::new(
            &support::postgres::shared().url(),
            None,
            None,
            &support::postgres::fresh_table(),
            Duration::from_secs(5),
            false,
        )
        .unwrap();
        let store = Arc::new(PostgresStore::new(&options).unwrap());
        Model::over(Durable::Postgres(options, Some(store)), 1_000)
    }

    fn over(durable: Durable, now_ms: u64) -> Model {
        Model {
            durable,
            memory: MemoryStore::new(1 << 30),
            process: 1,
            issued: Vec::new(),
            now_ms,
        }
    }

    fn is_sled(&self) -> bool {
        matches!(self.durable, Durable::Sled(..))
    }

    /// sled packing at every round: records expire a slice at a time, so the expired ones
    /// are compared as absent and counts are not compared.
    fn is_packing(&self) -> bool {
        matches!(self.durable, Durable::Sled(_, _, 1))
    }

    async fn durable_update<T, F>(&self, operation: Operation, key: &Key, transition: F) -> T
    where
        T: Send,
        F: FnMut(Option<&record::Record>) -> (record::Change, T) + Send,
    {
        match &self.durable {
            Durable::Sled(_, store, _) => {
                store
                    .as_ref()
                    .unwrap()
                    .update(operation, key, transition)
                    .await
            }
            Durable::Redis(_, store) => {
                store
                    .as_ref()
                    .unwrap()
                    .update(operation, key, transition)
                    .await
            }
            Durable::Postgres(_, store) => {
                store
                    .as_ref()
                    .unwrap()
                    .update(operation, key, transition)
                    .await
            }
        }
        .unwrap()
    }

    async fn durable_get(&self, key: &Key) -> Option<record::Record> {
        self.durable_update(Operation::Read, key, |current| {
            (record::Change::Keep, current.cloned())
        })
        .await
    }

    fn token(&self, nth: usize) -> Token {
        self.issued.get(nth).copied().unwrap_or([0xee; 16])
    }

    /// Applies one transition to both stores; both must answer alike.
    async fn both<T, F>(&self, operation: Operation, key: &Key, transition: F) -> T
    where
        T: Send + PartialEq + std::fmt::Debug,
        F: FnMut(Option<&record::Record>) -> (record::Change, T) + Send + Clone,
    {
        let from_durable = self
            .durable_update(operation, key, transition.clone())
            .await;
        let from_memory = self
            .memory
            .update(operation, key, transition)
            .await
            .unwrap();
        assert_eq!(
            from_durable, from_memory,
            "the durable store and the reference answered differently"
        );
        from_durable
    }

    async fn step(&mut self, op: &Op) {
        match *op {
            Op::Claim { key: n, payload } => {
                let mut token = [self.process; 16];
                token[8..].copy_from_slice(&(self.issued.len() as u64).to_be_bytes());
                self.issued.push(token);
                let fingerprint = [payload; 32];
                let request = ClaimRequest {
                    fingerprint: &fingerprint,
                    method: "/model.Svc/Do",
                    caller: "-",
                    token,
                    now_ms: self.now_ms,
                    lease_until_ms: self.now_ms + 2_000,
                    expires_ms: self.now_ms + 10_000,
                    sole_owner: self.is_sled().then_some([self.process; 8]),
                    retry_in_doubt: false,
                    origin: None,
                    at_quota: false,
                    serial: None,
                };
                self.both(Operation::Claim, &key(n), |current| {
                    record::claim(current, &request)
                })
                .await;
            }
            Op::Complete { key: n, nth, kept } => {
                let token = self.token(nth);
                let response = kept.then(|| Response {
                    http_status: 200,
                    body: vec![n; 16].into(),
                    ..Response::default()
                });
                let (now, expires) = (self.now_ms, self.now_ms + 10_000);
                self.both(Operation::Complete, &key(n), move |current| {
                    record::complete(current, &token, response.clone(), now, expires)
                })
                .await;
            }
            Op::Release { key: n, nth } => {
                let token = self.token(nth);
                self.both(Operation::Release, &key(n), move |current| {
                    record::release(current, &token)
                })
                .await;
            }
            Op::MarkInDoubt { key: n, nth } => {
                let token = self.token(nth);
                self.both(Operation::MarkInDoubt, &key(n), move |current| {
                    record::mark_in_doubt(current, &token, "model")
                })
                .await;
            }
            Op::Purge { key: n } => {
                let now = self.now_ms;
                self.both(Operation::Operator, &key(n), move |current| {
                    record::purge(current, now)
                })
                .await;
            }
            Op::Advance { ms } => self.now_ms += ms,
            Op::Maintain => match &self.durable {
                Durable::Sled(_, store, _) => {
                    let from_sled = store.as_ref().unwrap().maintain(self.now_ms).unwrap();
                    let from_memory = self.memory.maintain(self.now_ms).unwrap();
                    if !self.is_packing() {
                        assert_eq!(
                            from_sled.expired, from_memory.expired,
                            "maintenance expired differently"
                        );
                    }
                }
                // Redis expires by the wall clock, which the model's time runs ahead of: no
                // record has expired for it yet, so the reference keeps them too.
                Durable::Redis(..) => {}
                Durable::Postgres(_, store) => {
                    // Blocking, as the sweeper runs it: off the runtime's thread.
                    let (store, now_ms) = (store.clone().unwrap(), self.now_ms);
                    let from_postgres = tokio::task::spawn_blocking(move || store.maintain(now_ms))
                        .await
                        .unwrap()
                        .unwrap();
                    // PostgreSQL's expiry column is rounded up to the second (EXPIRY_STEP_MS),
                    // so at `now_ms` it deletes what the reference deletes at the second's
                    // start: a row leaves at most a second after its record stopped counting.
                    let second = now_ms / EXPIRY_STEP_MS * EXPIRY_STEP_MS;
                    let from_memory = self.memory.maintain(second).unwrap();
                    assert_eq!(
                        from_postgres.expired, from_memory.expired,
                        "maintenance expired differently"
                    );
                }
            },
            Op::Restart => {
                self.process += 1;
                match &mut self.durable {
                    Durable::Sled(dir, store, pack_records) => {
                        drop(store.take());
                        let reopened = reopen(dir.path(), *pack_records);
                        let found = reopened.reconcile(&[self.process; 8]).unwrap();
                        let doubted = self.memory.restart();
                        assert_eq!(found.in_doubt, doubted, "restart settled different claims");
                        *store = Some(reopened);
                    }
                    // Shared by live processes: a restart settles nothing; leases do.
                    Durable::Redis(options, store) => {
                        drop(store.take());
                        *store = Some(RedisStore::new(options).unwrap());
                    }
                    Durable::Postgres(options, store) => {
                        drop(store.take());
                        *store = Some(Arc::new(PostgresStore::new(options).unwrap()));
                    }
                }
            }
        }
    }

    async fn assert_same_records(&self, after: &Op) {
        let now = self.now_ms;
        let live = |found: Option<record::Record>| found.filter(|r| !record::is_expired(r, now));
        for n in 0..KEYS {
            let durable = self.durable_get(&key(n)).await;
            let memory = self.memory.get(&key(n));
            if self.is_sled() && !self.is_packing() {
                assert_eq!(durable, memory, "key {n} differs after {after:?}");
            } else {
                assert_eq!(
                    live(durable),
                    live(memory),
                    "key {n} differs after {after:?}"
                );
            }
        }
        if let (Durable::Sled(_, store, _), false) = (&self.durable, self.is_packing()) {
            let records = store.as_ref().unwrap().usage().records;
            assert_eq!(records, self.memory.usage().records);
        }
    }
}

/// Runs `ops` on the model `model` makes (inside the runtime: the stores start tasks),
/// comparing the records after each.
fn run(model: impl FnOnce() -> Model, ops: &[Op]) {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let mut model = model();
        for op in ops {
            model.step(op).await;
            model.assert_same_records(op).await;
        }
    });
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    #[test]
    fn sled_behaves_as_the_reference_store(ops in proptest::collection::vec(op(), 1..60)) {
        run(|| Model::sled(1 << 16), &ops);
    }

    #[test]
    fn sled_packing_at_every_round_behaves_as_the_reference_store(ops in proptest::collection::vec(op(), 1..60)) {
        run(|| Model::sled(1), &ops);
    }

    #[test]
    fn postgres_behaves_as_the_reference_store(ops in proptest::collection::vec(op(), 1..60)) {
        run(Model::postgres, &ops);
    }

    #[test]
    fn redis_behaves_as_the_reference_store(ops in proptest::collection::vec(op(), 1..60)) {
        let server = support::redis::RedisServer::start();
        let options = redis_options(server.url());
        run(|| Model::redis(options), &ops);
    }
}

/// The case proptest found once the PostgreSQL store rounded its expiry column up to the
/// second: a claim at 307 ms swept at 10,307 ms, which the reference expires and PostgreSQL
/// keeps until 11,000 (its row leaves within the second after).
#[test]
fn postgres_expires_a_record_within_the_second_after_the_reference() {
    let ops = [
        Op::Advance { ms: 307 },
        Op::Claim { key: 0, payload: 0 },
        Op::Claim { key: 0, payload: 0 },
        Op::Advance { ms: 1657 },
        Op::Advance { ms: 2779 },
        Op::Advance { ms: 1705 },
        Op::Advance { ms: 2834 },
        Op::Advance { ms: 1025 },
        Op::Maintain,
        Op::Advance { ms: 693 },
        Op::Maintain,
    ];
    run(Model::postgres, &ops);
}
