//! The store model test: random sequences of claim, complete, release, mark-in-doubt, time
//! passing, maintenance and restart, applied to the sled store (a real directory, reopened at
//! each restart) and to the in-memory reference store; after every step both must have
//! answered alike and hold the same records. A restart of sled is a real reopen, so a change
//! that was acknowledged but not durable shows up as a difference.

#![allow(clippy::unwrap_used)] // Test code: a failed unwrap is a failed test.

use idemproxy::key::Key;
use idemproxy::record::{self, ClaimRequest, Response, Token};
use idemproxy::store::memory::MemoryStore;
use idemproxy::store::sled::{SledOptions, SledStore};
use idemproxy::store::Store;
use proptest::prelude::*;
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
        2 => (1..3_000u64).prop_map(|ms| Op::Advance { ms }),
        1 => Just(Op::Maintain),
        1 => Just(Op::Restart),
    ]
}

fn key(n: u8) -> Key {
    Key::derive("/model.Svc/Do", "-", &[b'k', b'0' + n])
}

fn options(dir: &std::path::Path) -> SledOptions {
    SledOptions {
        dir: dir.to_owned(),
        cache_bytes: 1 << 20,
        bytes_max: 1 << 30,
        flush_per_write: false,
        flush_timeout: Duration::from_secs(10),
    }
}

/// Both stores, and what the simulated processes have done.
struct Model {
    dir: tempfile::TempDir,
    sled: Option<SledStore>,
    memory: MemoryStore,
    process: u8,
    issued: Vec<Token>,
    now_ms: u64,
}

impl Model {
    fn new() -> Model {
        let dir = tempfile::tempdir().unwrap();
        let sled = SledStore::open(&options(dir.path())).unwrap();
        Model {
            dir,
            sled: Some(sled),
            memory: MemoryStore::new(1 << 30),
            process: 1,
            issued: Vec::new(),
            now_ms: 1_000,
        }
    }

    fn sled(&self) -> &SledStore {
        self.sled.as_ref().unwrap()
    }

    fn token(&self, nth: usize) -> Token {
        self.issued.get(nth).copied().unwrap_or([0xee; 16])
    }

    /// Applies one transition to both stores; both must answer alike.
    async fn both<T, F>(&self, key: &Key, transition: F) -> T
    where
        T: Send + PartialEq + std::fmt::Debug,
        F: FnMut(Option<&record::Record>) -> (record::Change, T) + Send + Clone,
    {
        let from_sled = self.sled().update(key, transition.clone()).await.unwrap();
        let from_memory = self.memory.update(key, transition).await.unwrap();
        assert_eq!(
            from_sled, from_memory,
            "sled and the reference answered differently"
        );
        from_sled
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
                    sole_owner: Some([self.process; 8]),
                    retry_in_doubt: false,
                    origin: None,
                    at_quota: false,
                };
                self.both(&key(n), |current| record::claim(current, &request))
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
                self.both(&key(n), move |current| {
                    record::complete(current, &token, response.clone(), now, expires)
                })
                .await;
            }
            Op::Release { key: n, nth } => {
                let token = self.token(nth);
                self.both(&key(n), move |current| record::release(current, &token))
                    .await;
            }
            Op::MarkInDoubt { key: n, nth } => {
                let token = self.token(nth);
                self.both(&key(n), move |current| {
                    record::mark_in_doubt(current, &token, "model")
                })
                .await;
            }
            Op::Advance { ms } => self.now_ms += ms,
            Op::Maintain => {
                let from_sled = self.sled().maintain(self.now_ms).unwrap();
                let from_memory = self.memory.maintain(self.now_ms).unwrap();
                assert_eq!(
                    from_sled.expired, from_memory.expired,
                    "maintenance expired differently"
                );
            }
            Op::Restart => {
                drop(self.sled.take());
                self.process += 1;
                let reopened = SledStore::open(&options(self.dir.path())).unwrap();
                let found = reopened.reconcile(&[self.process; 8]).unwrap();
                let doubted = self.memory.restart();
                assert_eq!(found.in_doubt, doubted, "restart settled different claims");
                self.sled = Some(reopened);
            }
        }
    }

    fn assert_same_records(&self, after: &Op) {
        for n in 0..KEYS {
            let sled = self.sled().get(&key(n)).unwrap();
            let memory = self.memory.get(&key(n));
            assert_eq!(sled, memory, "key {n} differs after {after:?}");
        }
        assert_eq!(self.sled().usage().records, self.memory.usage().records);
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    #[test]
    fn sled_behaves_as_the_reference_store(ops in proptest::collection::vec(op(), 1..60)) {
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        runtime.block_on(async {
            let mut model = Model::new();
            for op in &ops {
                model.step(op).await;
                model.assert_same_records(op);
            }
        });
    }
}
