//! The in-memory reference store: the model every durable backend is tested against.
//!
//! It applies the same `record.rs` transitions under one lock, with the same size bound and
//! eviction order, and nothing durable: a restart is modelled by `restart`, which keeps every
//! record (all writes here count as flushed) and turns IN_FLIGHT records into IN_DOUBT.

use super::{Maintenance, Store, StoreError, Usage};
use crate::key::Key;
use crate::record::{self, Change, Record};
use prost::Message;
use std::collections::BTreeMap;
use std::future::Future;
use std::sync::Mutex;
use tokio::sync::watch;

/// The reference store.
pub struct MemoryStore {
    records: Mutex<BTreeMap<Key, Record>>,
    bytes_max: u64,
    /// Bumped on every change; waiters re-read when it moves.
    version: watch::Sender<u64>,
}

fn bytes_of(records: &BTreeMap<Key, Record>) -> u64 {
    records
        .values()
        .map(|record| 32 + record.encoded_len() as u64)
        .sum()
}

impl MemoryStore {
    /// An empty store bounded at `bytes_max`.
    pub fn new(bytes_max: u64) -> MemoryStore {
        MemoryStore {
            records: Mutex::new(BTreeMap::new()),
            bytes_max,
            version: watch::channel(0).0,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<Key, Record>> {
        self.records
            .lock()
            .expect("memory store lock is never poisoned")
    }

    /// A copy of one record.
    pub fn get(&self, key: &Key) -> Option<Record> {
        self.lock().get(key).cloned()
    }

    /// A process restart: records of the dead process's claims become IN_DOUBT.
    pub fn restart(&self) -> u64 {
        let mut records = self.lock();
        let mut doubted = 0;
        for record in records.values_mut() {
            if let Change::Put(next) = record::recover(Some(record), None) {
                *record = next;
                doubted += 1;
            }
        }
        self.version.send_modify(|v| *v += 1);
        doubted
    }

    fn apply(records: &mut BTreeMap<Key, Record>, key: &Key, change: Change) -> bool {
        match change {
            Change::Keep => false,
            Change::Put(record) => {
                records.insert(*key, record);
                true
            }
            Change::Delete => records.remove(key).is_some(),
        }
    }
}

impl Store for MemoryStore {
    async fn update<T, F>(&self, key: &Key, mut transition: F) -> Result<T, StoreError>
    where
        T: Send,
        F: FnMut(Option<&Record>) -> (Change, T) + Send,
    {
        let mut records = self.lock();
        let (change, value) = transition(records.get(key));
        if matches!(change, Change::Put(_)) && !records.contains_key(key) {
            let bytes = bytes_of(&records);
            if bytes > self.bytes_max
                && !records
                    .values()
                    .any(|r| record::evict(Some(r)) == Change::Delete)
            {
                return Err(StoreError::Full {
                    bytes,
                    bytes_max: self.bytes_max,
                });
            }
        }
        if Self::apply(&mut records, key, change) {
            self.version.send_modify(|v| *v += 1);
        }
        Ok(value)
    }

    fn changed(&self, _key: &Key) -> impl Future<Output = ()> + Send + 'static {
        let mut receiver = self.version.subscribe();
        async move {
            let _ = receiver.changed().await;
        }
    }

    fn maintain(&self, now_ms: u64) -> Result<Maintenance, StoreError> {
        let mut records = self.lock();
        let mut outcome = Maintenance::default();
        // Like sled's expiry index: only records whose retention has ended are looked at.
        let keys: Vec<Key> = records
            .iter()
            .filter(|(_, record)| record.expires_ms <= now_ms)
            .map(|(key, _)| *key)
            .collect();
        for key in &keys {
            let change = record::sweep(records.get(key), now_ms);
            if change == Change::Delete {
                outcome.expired += 1;
            }
            Self::apply(&mut records, key, change);
        }
        // Evict in the order sled does: closest to expiry first.
        let mut by_expiry: Vec<(u64, Key)> = records
            .iter()
            .map(|(key, r)| (r.expires_ms, *key))
            .collect();
        by_expiry.sort();
        let low_water = self.bytes_max / 100 * 90;
        let mut bytes = bytes_of(&records);
        if bytes > self.bytes_max {
            for (_, key) in by_expiry {
                if bytes <= low_water {
                    break;
                }
                if record::evict(records.get(&key)) == Change::Delete {
                    let removed = records.remove(&key).expect("the key was just listed");
                    bytes -= 32 + removed.encoded_len() as u64;
                    outcome.evicted += 1;
                }
            }
        }
        if outcome != Maintenance::default() {
            self.version.send_modify(|v| *v += 1);
        }
        Ok(outcome)
    }

    fn is_sole_owner(&self) -> bool {
        true
    }

    fn usage(&self) -> Usage {
        let records = self.lock();
        Usage {
            records: records.len() as u64,
            bytes: bytes_of(&records),
        }
    }
}
