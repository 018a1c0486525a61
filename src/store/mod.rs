//! The `Store` trait: where records live (design §5).
//!
//! A store applies the transitions that `record.rs` decides, atomically (one compare-and-swap)
//! and durably (the change is on disk before `update` returns). It never decides a state
//! itself and never reads-then-writes. Backends: `sled` (embedded default) and `memory` (the
//! reference model the other backends are tested against), `postgres` (the store of record
//! shared by replicas), `redis` (shared by replicas, when a lost second is acceptable), and
//! `AnyStore`, the one the server runs on, chosen by the settings.

pub mod census;
pub mod durable;
pub mod flusher;
pub mod memory;
pub mod pace;
pub mod postgres;
pub mod redis;
pub mod sentinel;
pub mod sled;
pub mod waiters;
pub mod witness;

use crate::key::Key;
use crate::record::{Change, Record};
use std::future::Future;

/// Why a store could not do what was asked. Expected outcomes (a key already claimed) are
/// values of the transition, never errors.
#[derive(Debug, Clone, thiserror::Error)]
pub enum StoreError {
    /// Reading or writing the disk failed; nothing acknowledged rests on it.
    #[error("store I/O failed: {0}")]
    Io(String),
    /// The store's data is corrupt: it is never served from and never silently wiped.
    #[error("store data is corrupt: {0}")]
    Corrupt(String),
    /// A stored record could not be decoded.
    #[error("record {key} could not be decoded: {reason}")]
    Undecodable {
        /// The record's key.
        key: Key,
        /// The decoder's complaint.
        reason: String,
    },
    /// The store is at its size bound and holds nothing it may evict.
    #[error("store is full: {bytes} bytes stored, bound {bytes_max}, nothing evictable")]
    Full {
        /// Bytes stored now.
        bytes: u64,
        /// The configured bound.
        bytes_max: u64,
    },
}

/// Compare-and-swap rounds one transition may lose to other writers before it gives up.
/// Each lost round means another writer changed the record in between, so this bounds a
/// pathological hot key, not normal contention (a claim race settles in one round).
pub(crate) const CAS_ROUNDS_MAX: usize = 64;

/// What one maintenance round did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Maintenance {
    /// Records deleted because their retention ended.
    pub expired: u64,
    /// COMPLETED records deleted to keep the store under its size bound.
    pub evicted: u64,
}

/// Counts of what a store holds, for readiness, tests and operators.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Usage {
    /// Records stored.
    pub records: u64,
    /// Bytes of keys and values stored (the bound applies to this).
    pub bytes: u64,
}

/// One page of records, in the store's own order.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Page {
    /// The records of this page.
    pub records: Vec<(Key, Record)>,
    /// Where the next page starts; `None` at the end.
    pub next: Option<Vec<u8>>,
}

/// Records one `scan` page holds at most, whatever is asked.
pub const PAGE_RECORDS_MAX: usize = 1_000;

/// What a transition is for. The layers over a store count and trace by it, and only a claim
/// (the one transition that creates a record where none is) may be tried against "absent"
/// without reading the record first: any other transition of an absent record changes
/// nothing, so trying it unread would decide it twice.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Operation {
    /// Claim a key (or read it as a duplicate).
    Claim,
    /// Record an outcome.
    Complete,
    /// Release a claim (the service did not act).
    Release,
    /// Mark a claim IN_DOUBT.
    MarkInDoubt,
    /// An operator reads a record.
    Read,
    /// An operator resolves, completes or deletes a record.
    Operator,
    /// An in-doubt probe takes or settles a record.
    Probe,
}

impl Operation {
    /// The name metrics and traces show (`operation`).
    pub fn as_str(self) -> &'static str {
        match self {
            Operation::Claim => "claim",
            Operation::Complete => "complete",
            Operation::Release => "release",
            Operation::MarkInDoubt => "mark_in_doubt",
            Operation::Read => "read",
            Operation::Operator => "operator",
            Operation::Probe => "probe",
        }
    }

    /// Whether the store may first try the transition against "absent", without a read.
    pub fn tries_absent_first(self) -> bool {
        self == Operation::Claim
    }
}

/// A durable home for records.
pub trait Store: Send + Sync + 'static {
    /// Applies `transition` to the record of `key` atomically: the closure sees the current
    /// record and returns the change plus a value. It may run more than once when another
    /// writer races; only the run whose change lands counts. When `update` returns, the
    /// change — and the record the closure saw, if it kept it — is durable. `operation`
    /// says what the transition is for (see [`Operation::tries_absent_first`]).
    fn update<T, F>(
        &self,
        operation: Operation,
        key: &Key,
        transition: F,
    ) -> impl Future<Output = Result<T, StoreError>> + Send
    where
        T: Send,
        F: FnMut(Option<&Record>) -> (Change, T) + Send;

    /// Resolves when the record of `key` may have changed after this call. Arm it before
    /// reading the record, so no change is missed between the read and the wait.
    fn changed(&self, key: &Key) -> impl Future<Output = ()> + Send + 'static;

    /// One maintenance round at `now_ms`: expire records, and evict the COMPLETED records
    /// closest to expiry while the store is over its size bound. Blocking: run it off the
    /// async runtime's threads.
    fn maintain(&self, now_ms: u64) -> Result<Maintenance, StoreError>;

    /// What the store holds now.
    fn usage(&self) -> Usage;

    /// Whether the store can take writes now (readiness): `Err` names what is wrong; `Some`
    /// says what readiness should show of the store besides "ready" (the Redis master in use).
    fn check(&self) -> impl Future<Output = Result<Option<String>, StoreError>> + Send;

    /// What failed, when the store can take no more writes until the process restarts (a
    /// failed flush on sled): liveness fails, so the kubelet restarts the container instead
    /// of leaving a pod that refuses every new key.
    fn failed_for_good(&self) -> Option<String> {
        None
    }

    /// Up to `limit` (at most `PAGE_RECORDS_MAX`) records after `cursor` (a page's `next`;
    /// `None` from the start), for operators. Reads only.
    fn scan(
        &self,
        cursor: Option<Vec<u8>>,
        limit: usize,
    ) -> impl Future<Output = Result<Page, StoreError>> + Send;

    /// How many live records `caller` holds at `now_ms`, for the per-caller cap. It may lag
    /// concurrent writes by a little, and after a restart until `reconcile` has walked the
    /// store (sled); a cap checked against it can be passed by the caller's concurrent first
    /// attempts.
    fn caller_records(
        &self,
        caller: &str,
        now_ms: u64,
    ) -> impl Future<Output = Result<u64, StoreError>> + Send;

    /// True when one process is the store's only writer, so an IN_FLIGHT record of another
    /// process incarnation is known to be orphaned (sled: one process owns the data dir).
    fn is_sole_owner(&self) -> bool;
}

/// The store a running sidecar uses, as the settings chose it.
// One per process, behind an `Arc`: the size difference costs nothing.
#[allow(clippy::large_enum_variant)]
pub enum AnyStore {
    /// The embedded store.
    Sled(sled::SledStore),
    /// The shared store on Redis.
    Redis(redis::RedisStore),
    /// The shared store of record on PostgreSQL.
    Postgres(postgres::PostgresStore),
}

impl AnyStore {
    /// The backend's name, for logs.
    pub fn backend(&self) -> &'static str {
        match self {
            AnyStore::Sled(_) => "sled",
            AnyStore::Redis(_) => "redis",
            AnyStore::Postgres(_) => "postgres",
        }
    }
}

impl Store for AnyStore {
    async fn update<T, F>(
        &self,
        operation: Operation,
        key: &Key,
        transition: F,
    ) -> Result<T, StoreError>
    where
        T: Send,
        F: FnMut(Option<&Record>) -> (Change, T) + Send,
    {
        match self {
            AnyStore::Sled(store) => store.update(operation, key, transition).await,
            // Boxed: a Redis round trip's future is five times a sled one's, and every
            // call's future would carry its size.
            AnyStore::Redis(store) => Box::pin(store.update(operation, key, transition)).await,
            AnyStore::Postgres(store) => Box::pin(store.update(operation, key, transition)).await,
        }
    }

    fn changed(&self, key: &Key) -> impl Future<Output = ()> + Send + 'static {
        let changed: std::pin::Pin<Box<dyn Future<Output = ()> + Send>> = match self {
            AnyStore::Sled(store) => Box::pin(store.changed(key)),
            AnyStore::Redis(store) => Box::pin(store.changed(key)),
            AnyStore::Postgres(store) => Box::pin(store.changed(key)),
        };
        changed
    }

    fn maintain(&self, now_ms: u64) -> Result<Maintenance, StoreError> {
        match self {
            AnyStore::Sled(store) => store.maintain(now_ms),
            AnyStore::Redis(store) => store.maintain(now_ms),
            AnyStore::Postgres(store) => store.maintain(now_ms),
        }
    }

    fn usage(&self) -> Usage {
        match self {
            AnyStore::Sled(store) => store.usage(),
            AnyStore::Redis(store) => store.usage(),
            AnyStore::Postgres(store) => store.usage(),
        }
    }

    fn is_sole_owner(&self) -> bool {
        match self {
            AnyStore::Sled(store) => store.is_sole_owner(),
            AnyStore::Redis(store) => store.is_sole_owner(),
            AnyStore::Postgres(store) => store.is_sole_owner(),
        }
    }

    async fn check(&self) -> Result<Option<String>, StoreError> {
        match self {
            AnyStore::Sled(store) => store.check().await,
            AnyStore::Redis(store) => store.check().await,
            AnyStore::Postgres(store) => store.check().await,
        }
    }

    fn failed_for_good(&self) -> Option<String> {
        match self {
            AnyStore::Sled(store) => store.failed_for_good(),
            AnyStore::Redis(store) => store.failed_for_good(),
            AnyStore::Postgres(store) => store.failed_for_good(),
        }
    }

    async fn scan(&self, cursor: Option<Vec<u8>>, limit: usize) -> Result<Page, StoreError> {
        match self {
            AnyStore::Sled(store) => store.scan(cursor, limit).await,
            AnyStore::Redis(store) => store.scan(cursor, limit).await,
            AnyStore::Postgres(store) => store.scan(cursor, limit).await,
        }
    }

    async fn caller_records(&self, caller: &str, now_ms: u64) -> Result<u64, StoreError> {
        match self {
            AnyStore::Sled(store) => store.caller_records(caller, now_ms).await,
            AnyStore::Redis(store) => store.caller_records(caller, now_ms).await,
            AnyStore::Postgres(store) => store.caller_records(caller, now_ms).await,
        }
    }
}

/// The methods of `Store` a layer passes to the store it wraps unchanged (all but `update`
/// and `scan`), written once: `$inner` is the method that gives the wrapped store.
#[macro_export]
macro_rules! delegate_store {
    ($inner:ident) => {
        fn changed(
            &self,
            key: &$crate::key::Key,
        ) -> impl std::future::Future<Output = ()> + Send + 'static {
            self.$inner().changed(key)
        }

        fn maintain(
            &self,
            now_ms: u64,
        ) -> Result<$crate::store::Maintenance, $crate::store::StoreError> {
            self.$inner().maintain(now_ms)
        }

        fn usage(&self) -> $crate::store::Usage {
            self.$inner().usage()
        }

        fn check(
            &self,
        ) -> impl std::future::Future<
            Output = Result<Option<String>, $crate::store::StoreError>,
        > + Send {
            self.$inner().check()
        }

        fn failed_for_good(&self) -> Option<String> {
            self.$inner().failed_for_good()
        }

        fn caller_records(
            &self,
            caller: &str,
            now_ms: u64,
        ) -> impl std::future::Future<Output = Result<u64, $crate::store::StoreError>> + Send {
            self.$inner().caller_records(caller, now_ms)
        }

        fn is_sole_owner(&self) -> bool {
            self.$inner().is_sole_owner()
        }
    };
}

/// A shared store is a store: the layers hold their inner store by value, and the server
/// keeps the bare store for what only it does (reconciling, gauges).
impl<S: Store> Store for std::sync::Arc<S> {
    fn update<T, F>(
        &self,
        operation: Operation,
        key: &Key,
        transition: F,
    ) -> impl Future<Output = Result<T, StoreError>> + Send
    where
        T: Send,
        F: FnMut(Option<&Record>) -> (Change, T) + Send,
    {
        (**self).update(operation, key, transition)
    }

    fn scan(
        &self,
        cursor: Option<Vec<u8>>,
        limit: usize,
    ) -> impl Future<Output = Result<Page, StoreError>> + Send {
        (**self).scan(cursor, limit)
    }

    delegate_store!(as_ref);
}
