//! The in-memory reference store: the model every durable backend is tested against.
//!
//! It applies the same `record.rs` transitions under one lock, with the same size bound and
//! eviction order, and nothing durable: a restart is modelled by `restart`, which keeps every
//! record (all writes here count as flushed) and turns IN_FLIGHT records into IN_DOUBT.

use super::{Maintenance, Operation, Store, StoreError, Usage};
use crate::key::Key;
use crate::record::{self, Change, Record};
use prost::Message;
use std::collections::BTreeMap;
use std::future::Future;
use std::sync::Mutex;
use tokio::sync::watch;

/// The records and their size, under one lock.
#[derive(Default)]
struct Records {
    by_key: BTreeMap<Key, Record>,
    /// Keys plus encoded records, kept as records change (as sled counts them).
    bytes: u64,
}

fn entry_bytes(record: &Record) -> u64 {
    32 + record.encoded_len() as u64
}

impl Records {
    fn get(&self, key: &Key) -> Option<&Record> {
        self.by_key.get(key)
    }

    fn put(&mut self, key: Key, record: Record) {
        self.bytes += entry_bytes(&record);
        if let Some(old) = self.by_key.insert(key, record) {
            self.bytes -= entry_bytes(&old);
        }
    }

    fn remove(&mut self, key: &Key) -> bool {
        match self.by_key.remove(key) {
            Some(old) => {
                self.bytes -= entry_bytes(&old);
                true
            }
            None => false,
        }
    }
}

/// The reference store.
pub struct MemoryStore {
    records: Mutex<Records>,
    bytes_max: u64,
    /// Whether a store over its bound evicts COMPLETED records (sled's `evict_when_full`).
    evict_when_full: bool,
    /// Bumped on every change; waiters re-read when it moves.
    version: watch::Sender<u64>,
    /// How long a change takes to become durable, after it is visible (a flush).
    write_delay: std::time::Duration,
    /// Seeded failpoints, for the simulation.
    faults: Option<Mutex<Faults>>,
    /// Changes visible but not yet durable, oldest first: (write id, key, record before).
    /// A restart loses them; an acknowledged write makes it and every earlier one durable.
    unsynced: Mutex<Unsynced>,
}

#[derive(Default)]
struct Unsynced {
    next_id: u64,
    writes: Vec<(u64, Key, Option<Record>)>,
    /// Writes a restart took back, whose updates have not returned yet.
    lost: std::collections::HashSet<u64>,
    /// Restarts so far.
    restarts: u64,
}

/// Failpoints of the reference store, driven by one seed (per mille of updates).
#[derive(Debug, Clone)]
pub struct Faults {
    /// The generator's state (SplitMix64), so a seed replays exactly.
    pub seed: u64,
    /// An update fails before it touches anything (an I/O error).
    pub fail_before: u64,
    /// An update lands and becomes durable, but reports a failure (a lost acknowledgement).
    pub fail_after: u64,
    /// Each write takes up to this long to become durable; a restart meanwhile loses it.
    pub flush_max: std::time::Duration,
    /// Failpoints are armed.
    pub armed: bool,
}

impl Faults {
    fn below(&mut self, n: u64) -> u64 {
        self.seed = self.seed.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.seed;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        (z ^ (z >> 31)) % n.max(1)
    }
}

enum Fault {
    None,
    Before,
    After,
}

impl MemoryStore {
    /// An empty store bounded at `bytes_max`.
    pub fn new(bytes_max: u64) -> MemoryStore {
        MemoryStore {
            records: Mutex::new(Records::default()),
            bytes_max,
            evict_when_full: false,
            version: watch::channel(0).0,
            write_delay: std::time::Duration::ZERO,
            faults: None,
            unsynced: Mutex::new(Unsynced::default()),
        }
    }

    /// The store evicting COMPLETED records past its bound, as sled with `evict_when_full`.
    pub fn evicting(mut self) -> MemoryStore {
        self.evict_when_full = true;
        self
    }

    /// A store with failpoints: updates that fail before or after they land, and writes that
    /// take a while to become durable and are lost by a restart meanwhile.
    pub fn with_faults(mut self, faults: Faults) -> MemoryStore {
        self.faults = Some(Mutex::new(faults));
        self
    }

    /// Arms or disarms the failpoints (a checker's reads run without them).
    pub fn arm_faults(&self, armed: bool) {
        if let Some(faults) = &self.faults {
            faults.lock().expect("never poisoned").armed = armed;
        }
    }

    /// What this update meets, and how long its write takes to become durable.
    fn roll(&self) -> (Fault, std::time::Duration) {
        let Some(faults) = &self.faults else {
            return (Fault::None, self.write_delay);
        };
        let mut faults = faults.lock().expect("never poisoned");
        if !faults.armed {
            return (Fault::None, self.write_delay);
        }
        let dice = faults.below(1000);
        let fault = if dice < faults.fail_before {
            Fault::Before
        } else if dice < faults.fail_before + faults.fail_after {
            Fault::After
        } else {
            Fault::None
        };
        let max_ms = faults.flush_max.as_millis() as u64;
        let delay = std::time::Duration::from_millis(faults.below(max_ms + 1));
        (fault, delay.max(self.write_delay))
    }

    /// A store whose every change is visible at once but returns only after `delay`, as a
    /// durable store's flush does: a caller cancelled meanwhile has changed the record anyway.
    pub fn with_write_delay(mut self, delay: std::time::Duration) -> MemoryStore {
        self.write_delay = delay;
        self
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Records> {
        self.records
            .lock()
            .expect("memory store lock is never poisoned")
    }

    /// A copy of one record.
    pub fn get(&self, key: &Key) -> Option<Record> {
        self.lock().get(key).cloned()
    }

    /// Waits until no write of `key` is pending; an error if a restart lost what was read.
    async fn wait_durable(&self, key: &Key) -> Result<(), StoreError> {
        let restarts = self.unsynced.lock().expect("never poisoned").restarts;
        loop {
            {
                let unsynced = self.unsynced.lock().expect("never poisoned");
                if unsynced.restarts != restarts {
                    return Err(StoreError::Io(
                        "injected: the process ended before what was read became durable".into(),
                    ));
                }
                if !unsynced.writes.iter().any(|(_, pending, _)| pending == key) {
                    return Ok(());
                }
            }
            tokio::time::sleep(std::time::Duration::from_millis(1)).await;
        }
    }

    /// A process restart: writes not yet durable are lost, then the records of the dead
    /// process's claims become IN_DOUBT.
    pub fn restart(&self) -> u64 {
        let mut records = self.lock();
        let mut unsynced = self.unsynced.lock().expect("never poisoned");
        let lost = std::mem::take(&mut unsynced.writes);
        unsynced.lost.extend(lost.iter().map(|(id, _, _)| *id));
        unsynced.restarts += 1;
        drop(unsynced);
        for (_, key, before) in lost.into_iter().rev() {
            match before {
                Some(record) => records.put(key, record),
                None => {
                    records.remove(&key);
                }
            }
        }
        let mut doubted = 0;
        let keys: Vec<Key> = records.by_key.keys().copied().collect();
        for key in keys {
            if let Change::Put(next) = record::recover(records.get(&key), None) {
                records.put(key, next);
                doubted += 1;
            }
        }
        self.version.send_modify(|v| *v += 1);
        doubted
    }

    fn apply(records: &mut Records, key: &Key, change: Change) -> bool {
        match change {
            Change::Keep => false,
            Change::Put(record) => {
                records.put(*key, record);
                true
            }
            Change::Delete => records.remove(key),
        }
    }
}

impl Store for MemoryStore {
    async fn check(&self) -> Result<Option<String>, StoreError> {
        Ok(None)
    }

    async fn caller_records(&self, caller: &str, now_ms: u64) -> Result<u64, StoreError> {
        let records = self.lock();
        let live = records
            .by_key
            .values()
            .filter(|record| record.caller == caller && !record::is_expired(record, now_ms))
            .count();
        Ok(live as u64)
    }

    async fn scan(&self, cursor: Option<Vec<u8>>, limit: usize) -> Result<super::Page, StoreError> {
        use std::ops::Bound;
        let limit = limit.clamp(1, super::PAGE_RECORDS_MAX);
        let after = cursor.as_deref().and_then(Key::from_slice);
        let start = after.map_or(Bound::Unbounded, Bound::Excluded);
        let records = self.records.lock().expect("no panic holds this lock");
        let page: Vec<(Key, Record)> = records
            .by_key
            .range((start, Bound::Unbounded))
            .take(limit)
            .map(|(key, record)| (*key, record.clone()))
            .collect();
        let next = (page.len() == limit).then(|| page[limit - 1].0.as_bytes().to_vec());
        Ok(super::Page {
            records: page,
            next,
        })
    }

    async fn update<T, F>(
        &self,
        _operation: Operation,
        key: &Key,
        mut transition: F,
    ) -> Result<T, StoreError>
    where
        T: Send,
        F: FnMut(Option<&Record>) -> (Change, T) + Send,
    {
        let (fault, delay) = self.roll();
        if let Fault::Before = fault {
            return Err(StoreError::Io("injected: the write failed".into()));
        }
        let (written, value) = {
            let mut records = self.lock();
            let before = records.get(key).cloned();
            let (change, value) = transition(records.get(key));
            // Over the bound with nothing evictable, or eviction not chosen: new keys are
            // refused (sled decides this in its sweeper; the model decides at once).
            if matches!(change, Change::Put(_))
                && records.get(key).is_none()
                && records.bytes > self.bytes_max
                && !(self.evict_when_full
                    && records
                        .by_key
                        .values()
                        .any(|r| record::evict(Some(r)) == Change::Delete))
            {
                return Err(StoreError::Full {
                    bytes: records.bytes,
                    bytes_max: self.bytes_max,
                });
            }
            let written = Self::apply(&mut records, key, change).then(|| {
                self.version.send_modify(|v| *v += 1);
                let mut unsynced = self.unsynced.lock().expect("never poisoned");
                unsynced.next_id += 1;
                let id = unsynced.next_id;
                unsynced.writes.push((id, *key, before));
                id
            });
            (written, value)
        };
        if written.is_none() {
            // What the closure read must be durable before the caller acts on it (as sled
            // waits for the flush of a record it reads while it is pending).
            self.wait_durable(key).await?;
        }
        if let Some(id) = written {
            if !delay.is_zero() {
                tokio::time::sleep(delay).await;
            }
            // Durable now, with every earlier write (a flush covers all before it) — unless a
            // restart came first and lost it.
            let mut unsynced = self.unsynced.lock().expect("never poisoned");
            unsynced.writes.retain(|(pending, _, _)| *pending > id);
            if unsynced.lost.remove(&id) {
                return Err(StoreError::Io(
                    "injected: the process ended before the flush".into(),
                ));
            }
        }
        if let Fault::After = fault {
            return Err(StoreError::Io(
                "injected: the write landed, its acknowledgement did not".into(),
            ));
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
            .by_key
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
            .by_key
            .iter()
            .map(|(key, r)| (r.expires_ms, *key))
            .collect();
        by_expiry.sort();
        let low_water = self.bytes_max / 100 * 90;
        if self.evict_when_full && records.bytes > self.bytes_max {
            for (_, key) in by_expiry {
                if records.bytes <= low_water {
                    break;
                }
                if record::evict(records.get(&key)) == Change::Delete {
                    records.remove(&key);
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
            records: records.by_key.len() as u64,
            bytes: records.bytes,
        }
    }
}
