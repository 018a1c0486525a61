//! The shared store of record on PostgreSQL (design §5, issue 32): one dedup state for every
//! replica of a service, which a failover with a synchronous standby does not lose.
//!
//! One row per record (key, the record's protobuf bytes as the other stores keep them, its
//! expiry, its caller) in a table the sidecar creates and versions itself (`schema`). A
//! transition reads the record (a claim first tries "absent" unread, and the claim's owner
//! its next transition against the record its claim wrote: `written`), lets `record.rs`
//! decide, then applies the change as a compare-and-swap against the SHA-256 of what was
//! read, in one statement: `INSERT … ON CONFLICT DO NOTHING` from "absent", `UPDATE … WHERE
//! sha256(value) = …` or `DELETE …` from a record (`batch`, which puts every swap waiting at
//! that moment into one statement: group commit). A refused swap hands back the record as
//! it is, for the next round. A statement whose connection broke before PostgreSQL answered
//! is neither applied nor refused until `settle` has waited its session out and read the
//! record again. Waiting duplicates are woken by LISTEN/NOTIFY (`notify`), polling as the
//! fallback. This module never decides a state, never writes without comparing, and never
//! answers a write it cannot confirm as done.

mod batch;
mod notify;
mod options;
mod pace;
pub mod schema;
mod settle;
mod tls;
mod upkeep;
mod watch;
mod written;

use super::{
    Maintenance, Operation, Page, Store, StoreError, Usage, CAS_ROUNDS_MAX, PAGE_RECORDS_MAX,
};
use crate::key::Key;
use crate::record::{Change, Record};
use batch::{Outcome, Pending, Swap};
use prost::Message;
use sha2::{Digest, Sha256};
use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{mpsc, oneshot, Semaphore};
use tokio_postgres::{Client, Statement};

pub use batch::{BATCH_SWAPS_MAX, QUEUE_SWAPS_MAX};
pub use options::PostgresOptions;
pub use tls::Verify;

/// Records one maintenance round deletes in one statement at most (a short transaction).
pub const EXPIRE_BATCH_RECORDS: i64 = 1_000;

/// Statements of expired records one maintenance round runs at most.
pub const EXPIRE_BATCHES_MAX: usize = 10;

/// Times one batch is sent again after PostgreSQL rolled it back for a conflict with another
/// replica's (a deadlock).
pub const CONFLICT_RETRIES_MAX: usize = 3;

/// How often a waiting duplicate reads its record again when no notification came.
pub const POLL_INTERVAL: Duration = Duration::from_millis(100);

/// The session a statement ran on, to wait out when its outcome is unknown.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Backend {
    pid: i32,
    started: String,
}

/// One open connection with its prepared statements.
struct Connected {
    client: Client,
    read: Statement,
    swap: Statement,
    backend: Backend,
}

/// What the store and its batching task share.
pub struct Shared {
    config: tokio_postgres::Config,
    tls: tls::MakeRustls,
    table: schema::Table,
    timeout: Duration,
    connected: Mutex<Option<Arc<Connected>>>,
    /// One connection attempt at a time: the others wait for its outcome.
    connecting: Semaphore,
    schema_ready: AtomicBool,
    notifier: Arc<super::waiters::Waiters>,
    /// Statements of swaps committed (or tried), and the swaps they carried.
    commits: AtomicU64,
    swaps: AtomicU64,
}

fn unavailable(what: &str, error: impl std::fmt::Display) -> StoreError {
    StoreError::Io(format!("PostgreSQL {what}: {error}"))
}

/// What PostgreSQL said, with its SQLSTATE, or what broke (tokio-postgres' own text for a
/// server's error is only "db error").
pub fn describe(error: &tokio_postgres::Error) -> String {
    match error.as_db_error() {
        Some(db) => format!("{} ({}: {})", db.message(), db.severity(), db.code().code()),
        None => match std::error::Error::source(error) {
            Some(cause) => format!("{error}: {cause}"),
            None => error.to_string(),
        },
    }
}

/// Whether a failed statement may have committed: the session broke (no answer, or
/// PostgreSQL ending it, class 57 or 08) instead of PostgreSQL refusing the statement.
fn outcome_unknown(error: &tokio_postgres::Error) -> bool {
    match error.code() {
        None => true,
        Some(code) => code.code().starts_with("57") || code.code().starts_with("08"),
    }
}

impl Shared {
    fn current(&self) -> Option<Arc<Connected>> {
        let connected = self.connected.lock().expect("no panic holds this lock");
        connected
            .as_ref()
            .filter(|connected| !connected.client.is_closed())
            .cloned()
    }

    /// Forgets `broken`, so the next statement connects again.
    fn discard(&self, broken: &Arc<Connected>) {
        let mut connected = self.connected.lock().expect("no panic holds this lock");
        if connected
            .as_ref()
            .is_some_and(|now| Arc::ptr_eq(now, broken))
        {
            *connected = None;
        }
    }

    /// The open connection, or a new one within the timeout.
    async fn connection(&self) -> Result<Arc<Connected>, StoreError> {
        if let Some(connected) = self.current() {
            return Ok(connected);
        }
        let no_answer = || {
            unavailable(
                "did not answer",
                format!("no connection within {:?}", self.timeout),
            )
        };
        let _permit = tokio::time::timeout(self.timeout, self.connecting.acquire())
            .await
            .map_err(|_| no_answer())?
            .map_err(|_| unavailable("store", "is closed"))?;
        if let Some(connected) = self.current() {
            return Ok(connected);
        }
        let connected = Arc::new(
            tokio::time::timeout(self.timeout, self.connect())
                .await
                .map_err(|_| no_answer())??,
        );
        *self.connected.lock().expect("no panic holds this lock") = Some(connected.clone());
        Ok(connected)
    }

    async fn connect(&self) -> Result<Connected, StoreError> {
        let (mut client, connection) = self
            .config
            .connect(self.tls.clone())
            .await
            .map_err(|error| unavailable("is unreachable", describe(&error)))?;
        tokio::spawn(async move {
            if let Err(error) = connection.await {
                tracing::warn!(%error, "PostgreSQL connection ended");
            }
        });
        if !self.schema_ready.load(Ordering::Acquire) {
            let found = schema::ensure(&mut client, &self.table)
                .await
                .map_err(|error| unavailable("schema", error))?;
            if found < schema::SCHEMA_VERSION {
                tracing::info!(
                    table = %self.table.name,
                    from = found,
                    to = schema::SCHEMA_VERSION,
                    "PostgreSQL records table created or migrated"
                );
            }
            self.schema_ready.store(true, Ordering::Release);
        }
        let prepare_failed = |error| unavailable("refused a statement", describe(&error));
        // An acknowledgement rests on a commit that is on disk (and on the synchronous
        // standby, when there is one): a server default of `off` or `local` is raised to
        // `on` for this session; a stricter one (`remote_apply`) is kept.
        //
        // Every statement of the store finds its records by key (or through an index of
        // its own), so a sequential scan of the table is never the plan it wants. The
        // planner picks one while the table is small (new, or not analysed yet), and the
        // prepared swap keeps that generic plan as the table grows, until autovacuum next
        // analyses it. Measured on a new table, fresh keys at 32 in flight: 551 µs of
        // PostgreSQL's CPU a call with the scans, 73 µs without (BENCHMARKS.md).
        //
        // The plan is the same for every batch, so each statement is planned once: left to
        // choose, PostgreSQL planned the swap anew for every batch (its generic plan's
        // estimate was higher), which took 69 % of its CPU on duplicate hits.
        client
            .batch_execute(
                "SELECT set_config('synchronous_commit', CASE \
                   WHEN current_setting('synchronous_commit') IN ('off', 'local') THEN 'on' \
                   ELSE current_setting('synchronous_commit') END, false); \
                 SET enable_seqscan = off; \
                 SET plan_cache_mode = force_generic_plan",
            )
            .await
            .map_err(prepare_failed)?;
        let read = client
            .prepare(&self.table.read())
            .await
            .map_err(prepare_failed)?;
        let swap = client
            .prepare(&self.table.swap())
            .await
            .map_err(prepare_failed)?;
        let row = client
            .query_one(
                "SELECT pid, backend_start::text FROM pg_stat_activity WHERE pid = pg_backend_pid()",
                &[],
            )
            .await
            .map_err(prepare_failed)?;
        let backend = Backend {
            pid: row.try_get(0).map_err(prepare_failed)?,
            started: row.try_get(1).map_err(prepare_failed)?,
        };
        Ok(Connected {
            client,
            read,
            swap,
            backend,
        })
    }

    /// The record of `key` as stored now.
    async fn read(&self, key: &Key) -> Result<Option<Vec<u8>>, StoreError> {
        let connected = self.connection().await?;
        let key_bytes: &[u8] = &key.as_bytes()[..];
        let params: [&(dyn tokio_postgres::types::ToSql + Sync); 1] = [&key_bytes];
        let reading = connected.client.query_opt(&connected.read, &params);
        match tokio::time::timeout(self.timeout, reading).await {
            Ok(Ok(row)) => match row {
                Some(row) => row
                    .try_get(0)
                    .map(Some)
                    .map_err(|error| unavailable("read", describe(&error))),
                None => Ok(None),
            },
            Ok(Err(error)) => {
                if outcome_unknown(&error) {
                    self.discard(&connected);
                }
                Err(unavailable("read failed", describe(&error)))
            }
            Err(_) => {
                self.discard(&connected);
                Err(unavailable(
                    "read failed",
                    format!("no answer within {:?}", self.timeout),
                ))
            }
        }
    }

    /// Runs one batch of swaps (at most one per key) as one statement.
    async fn swap_all(&self, swaps: &[&Swap]) -> Result<Vec<Outcome>, StoreError> {
        let connected = self.connection().await?;
        let arrays = Arrays::of(swaps);
        let params: [&(dyn tokio_postgres::types::ToSql + Sync); 7] = [
            &arrays.positions,
            &arrays.keys,
            &arrays.expected,
            &arrays.values,
            &arrays.expiries,
            &arrays.callers,
            &self.table.name,
        ];
        let mut conflicts = 0;
        let rows = loop {
            let running = connected.client.query(&connected.swap, &params);
            match tokio::time::timeout(self.timeout, running).await {
                Ok(Ok(rows)) => break rows,
                // Rolled back whole, so nothing of it landed: sent again.
                Ok(Err(error)) if lost_a_conflict(&error) && conflicts < CONFLICT_RETRIES_MAX => {
                    conflicts += 1;
                }
                Ok(Err(error)) if !outcome_unknown(&error) => {
                    return Err(unavailable("refused a compare-and-swap", describe(&error)));
                }
                Ok(Err(_)) | Err(_) => {
                    self.discard(&connected);
                    return Ok(vec![
                        Outcome::Unknown(connected.backend.clone());
                        swaps.len()
                    ]);
                }
            }
        };
        // A row missing from the answer leaves its swap refused, to be read again.
        let mut outcomes = vec![Outcome::Refused(None); swaps.len()];
        for row in rows {
            let field = |error| unavailable("compare-and-swap answer", describe(&error));
            let position: i32 = row.try_get(0).map_err(field)?;
            let applied: bool = row.try_get(1).map_err(field)?;
            let now: Option<Vec<u8>> = row.try_get(2).map_err(field)?;
            let Some(swap) = usize::try_from(position).ok().and_then(|n| swaps.get(n)) else {
                continue;
            };
            outcomes[position as usize] = if applied {
                Outcome::Applied
            } else {
                refused(swap, now)
            };
        }
        Ok(outcomes)
    }
}

/// A batch as the statement's arrays, in key order: every replica then locks the records of
/// its batch in the same order, so two batches holding the same keys (hedged copies on two
/// replicas) seldom deadlock; `positions` says where each swap was in the batch.
struct Arrays<'a> {
    positions: Vec<i32>,
    keys: Vec<&'a [u8]>,
    expected: Vec<Option<&'a [u8]>>,
    values: Vec<Option<&'a [u8]>>,
    expiries: Vec<i64>,
    callers: Vec<&'a str>,
}

impl<'a> Arrays<'a> {
    fn of(swaps: &[&'a Swap]) -> Arrays<'a> {
        let mut order: Vec<usize> = (0..swaps.len()).collect();
        order.sort_by_key(|&n| swaps[n].key);
        let swaps: Vec<&'a Swap> = order.iter().map(|&n| swaps[n]).collect();
        Arrays {
            positions: order.iter().map(|&n| n as i32).collect(),
            keys: swaps.iter().map(|swap| &swap.key[..]).collect(),
            expected: swaps.iter().map(|swap| swap.expected.as_deref()).collect(),
            values: swaps
                .iter()
                .map(|swap| swap.put.as_ref().map(|put| &put.0[..]))
                .collect(),
            expiries: swaps
                .iter()
                .map(|swap| swap.put.as_ref().map_or(0, |put| put.1))
                .collect(),
            callers: swaps
                .iter()
                .map(|swap| swap.put.as_ref().map_or("", |put| put.2.as_str()))
                .collect(),
        }
    }
}

/// Whether PostgreSQL rolled the statement back for a conflict with another (a deadlock, a
/// serialization failure): nothing of it landed, and it may be sent again.
fn lost_a_conflict(error: &tokio_postgres::Error) -> bool {
    error
        .code()
        .is_some_and(|code| matches!(code.code(), "40P01" | "40001"))
}

/// A refused swap's outcome. The statement's snapshot may predate the change that refused
/// it: a record still as expected there is not the record now, so it is to be read.
fn refused(swap: &Swap, now: Option<Vec<u8>>) -> Outcome {
    if now.as_deref().map(expected) == swap.expected {
        Outcome::Refused(None)
    } else {
        Outcome::Refused(Some(now))
    }
}

/// Records up to this size are compared whole by a swap; larger ones by their SHA-256.
pub const EXPECTED_BYTES_MAX: usize = 1024;

/// What a swap sends to say which record it was decided on: the record itself when it has
/// at most `EXPECTED_BYTES_MAX` bytes (a claim's, which every completion replaces: comparing
/// it costs PostgreSQL less than hashing it, BENCHMARKS.md), its SHA-256 when larger (a
/// completed answer: a batch carries at most 32 bytes for it). The statement compares a
/// record of PostgreSQL's the same way, by its own size (`schema::Table::swap`): equal
/// records are always compared alike; unequal ones of different kinds match only if a
/// record's bytes are a SHA-256 of the other's.
fn expected(record: &[u8]) -> Vec<u8> {
    if record.len() <= EXPECTED_BYTES_MAX {
        record.to_vec()
    } else {
        Sha256::digest(record).to_vec()
    }
}

/// The PostgreSQL-backed store.
pub struct PostgresStore {
    shared: Arc<Shared>,
    queue: mpsc::Sender<Pending>,
    require_sync_replica: bool,
    records: AtomicU64,
    /// The records this process's claims wrote, for the next transition to try unread.
    written: written::Written,
    /// Synchronous standbys of the primary at the last check; -1 before the first.
    sync_standbys: AtomicI64,
}

impl PostgresStore {
    /// A store over `options`, connecting lazily: an unreachable PostgreSQL fails calls
    /// (closed), not the start, and is tried again on every call. The schema is made ready
    /// on the first connection. Must run inside a tokio runtime (it starts the batching and
    /// listening tasks). Errors only on settings that can never work.
    pub fn new(options: &PostgresOptions) -> Result<PostgresStore, StoreError> {
        let tls = tls::MakeRustls::new(options.verify, options.ca_pem.as_deref())
            .map_err(|error| StoreError::Io(format!("PostgreSQL TLS settings: {error}")))?;
        let table = schema::Table::new(&options.table);
        let (subscriptions, first_waiters) = mpsc::unbounded_channel();
        let notifier = notify::start(
            options.config.clone(),
            tls.clone(),
            table.name.clone(),
            options.poll_interval,
            subscriptions,
        );
        let shared = Arc::new(Shared {
            config: options.config.clone(),
            tls,
            table,
            timeout: options.command_timeout,
            connected: Mutex::new(None),
            connecting: Semaphore::new(1),
            schema_ready: AtomicBool::new(false),
            notifier,
            commits: AtomicU64::new(0),
            swaps: AtomicU64::new(0),
        });
        let (queue, batches) = mpsc::channel(QUEUE_SWAPS_MAX);
        tokio::spawn(batch::run(shared.clone(), batches));
        tokio::spawn(watch::run(Arc::downgrade(&shared), first_waiters));
        Ok(PostgresStore {
            shared,
            queue,
            require_sync_replica: options.require_sync_replica,
            records: AtomicU64::new(0),
            written: written::Written::default(),
            sync_standbys: AtomicI64::new(-1),
        })
    }

    /// Statements of swaps sent so far, and the swaps they carried (group commit's measure).
    pub fn commits(&self) -> (u64, u64) {
        (
            self.shared.commits.load(Ordering::Relaxed),
            self.shared.swaps.load(Ordering::Relaxed),
        )
    }

    /// Synchronous standbys the primary had at the last readiness check (`None` before it).
    pub fn sync_standbys(&self) -> Option<u64> {
        u64::try_from(self.sync_standbys.load(Ordering::Relaxed)).ok()
    }

    /// With `--postgres-require-sync-replica`, a new record is refused while the last
    /// readiness check saw no synchronous standby (or none has run yet): a claim that a
    /// failover could lose is never made. Records already there are still written (an
    /// outcome is better kept than not).
    fn refuse_without_standby(&self) -> Result<(), StoreError> {
        if self.require_sync_replica && self.sync_standbys.load(Ordering::Relaxed) <= 0 {
            return Err(StoreError::Io(
                "PostgreSQL has no synchronous standby and --postgres-require-sync-replica is \
                 set: new keys are refused until one is back"
                    .into(),
            ));
        }
        Ok(())
    }

    /// Hands `swap` to the batching task and waits for its outcome.
    async fn submit(&self, swap: Swap) -> Result<Outcome, StoreError> {
        let (reply, outcome) = oneshot::channel();
        let timeout = self.shared.timeout;
        tokio::time::timeout(timeout, self.queue.send(Pending { swap, reply }))
            .await
            .map_err(|_| unavailable("writes", format!("queue still full after {timeout:?}")))?
            .map_err(|_| unavailable("writes", "the batching task has ended"))?;
        outcome
            .await
            .map_err(|_| unavailable("writes", "the batching task has ended"))?
    }
}

fn decode(key: &Key, bytes: Option<&[u8]>) -> Result<Option<Record>, StoreError> {
    bytes
        .map(|bytes| {
            Record::decode(bytes).map_err(|error| StoreError::Undecodable {
                key: *key,
                reason: error.to_string(),
            })
        })
        .transpose()
}

/// Rows' expiry column is the record's expiry rounded up to this step.
pub const EXPIRY_STEP_MS: u64 = 1_000;

/// The expiry column for a record that stops counting at `expires_ms`: rounded up to the
/// next whole second, so that a completion within the same second as its claim's (every
/// call shorter than a second, but for the ones that cross a second's end) leaves the
/// column, and with it every indexed column, as the claim wrote it. PostgreSQL then writes
/// the completed row on its page with no index entry (a heap-only tuple, given the room
/// `schema::FILLFACTOR` keeps). The sweeper deletes a row at most a second after its record
/// stopped counting (the record itself says when: `record::is_expired`), and a caller's
/// count of live records may hold it that second longer.
fn expiry_column(expires_ms: u64) -> i64 {
    let rounded = expires_ms
        .div_ceil(EXPIRY_STEP_MS)
        .saturating_mul(EXPIRY_STEP_MS);
    i64::try_from(rounded).unwrap_or(i64::MAX)
}

/// The swap that applies `change` to the record read as `read`; `None` when there is
/// nothing to write (a kept record, a deletion of what is absent).
fn swap_for(key: &Key, read: Option<&[u8]>, change: &Change) -> Option<Swap> {
    let put = match change {
        Change::Keep => return None,
        Change::Delete if read.is_none() => return None,
        Change::Delete => None,
        Change::Put(record) => {
            // When the record stops counting (`record::is_expired`): an IN_FLIGHT record
            // outlives its lease at least; the others leave at the end of their retention.
            let in_flight = record.state() == crate::record::State::InFlight;
            let expires_ms = if in_flight {
                record.expires_ms.max(record.lease_until_ms)
            } else {
                record.expires_ms
            };
            Some((
                record.encode_to_vec(),
                expiry_column(expires_ms),
                record.caller.clone(),
            ))
        }
    };
    Some(Swap {
        key: *key.as_bytes(),
        expected: read.map(expected),
        put,
    })
}

impl Store for PostgresStore {
    async fn update<T, F>(
        &self,
        operation: Operation,
        key: &Key,
        mut transition: F,
    ) -> Result<T, StoreError>
    where
        T: Send,
        F: FnMut(Option<&Record>) -> (Change, T) + Send,
    {
        // The record as last seen; `None`: to be read. A claim is first tried against
        // "absent" without a read: a fresh key's claim is one statement, and a refused one
        // hands back the record that is there (a duplicate's claim is one statement too).
        // The claim's owner then tries its next transition against the record its claim
        // wrote (`written`): a fresh call is two statements, not three.
        let mut seen: Option<Option<Vec<u8>>> = match operation {
            _ if operation.tries_absent_first() => Some(None),
            Operation::Complete | Operation::Release | Operation::MarkInDoubt => {
                self.written.take(key.as_bytes()).map(Some)
            }
            _ => None,
        };
        let mut guessed = seen.is_some();
        for _ in 0..CAS_ROUNDS_MAX {
            let read = match seen.take() {
                Some(read) => read,
                None => self.shared.read(key).await?,
            };
            let current = decode(key, read.as_deref())?;
            let (change, value) = transition(current.as_ref());
            let unread = std::mem::take(&mut guessed);
            let Some(swap) = swap_for(key, read.as_deref(), &change) else {
                if unread {
                    // Decided on a guess, and it writes nothing: read, decide again.
                    continue;
                }
                return Ok(value);
            };
            if swap.expected.is_none() {
                self.refuse_without_standby()?;
            }
            let written = swap.put.as_ref().map(|put| put.0.clone());
            let claimed = operation == Operation::Claim;
            match self.submit(swap).await? {
                Outcome::Applied => {
                    if let (true, Some(written)) = (claimed, written) {
                        self.written.keep(*key.as_bytes(), written);
                    }
                    return Ok(value);
                }
                Outcome::Refused(now) => seen = now,
                Outcome::Unknown(backend) => {
                    let now = self.settle(key, &backend).await?;
                    if now == written {
                        return Ok(value);
                    }
                    seen = Some(now);
                }
            }
        }
        Err(StoreError::Io(format!(
            "record {key} changed under {CAS_ROUNDS_MAX} compare-and-swap rounds in a row"
        )))
    }

    fn changed(&self, key: &Key) -> impl Future<Output = ()> + Send + 'static {
        self.shared.notifier.watch(key.hex())
    }

    fn maintain(&self, now_ms: u64) -> Result<Maintenance, StoreError> {
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return Ok(Maintenance::default());
        };
        runtime.block_on(self.maintain_async(now_ms))
    }

    fn usage(&self) -> Usage {
        // Bytes are PostgreSQL's to bound (the table's disk), so they are not counted.
        Usage {
            records: self.records.load(Ordering::Relaxed),
            bytes: 0,
        }
    }

    fn is_sole_owner(&self) -> bool {
        false
    }

    async fn caller_records(&self, caller: &str, now_ms: u64) -> Result<u64, StoreError> {
        let now_ms = i64::try_from(now_ms).unwrap_or(i64::MAX);
        let sql = self.shared.table.caller_records();
        let count: i64 = self.shared.query_one(&sql, &[&caller, &now_ms]).await?;
        Ok(u64::try_from(count).unwrap_or(0))
    }

    async fn check(&self) -> Result<Option<String>, StoreError> {
        self.check_replication().await.map(|()| None)
    }

    async fn scan(&self, cursor: Option<Vec<u8>>, limit: usize) -> Result<Page, StoreError> {
        let limit = limit.clamp(1, PAGE_RECORDS_MAX);
        let after = cursor.unwrap_or_default();
        let rows = self
            .shared
            .query(&self.shared.table.scan(), &[&after, &(limit as i64)])
            .await?;
        let mut records = Vec::with_capacity(rows.len());
        let mut last = None;
        for row in &rows {
            let field = |error| unavailable("scan answer", describe(&error));
            let bytes: Vec<u8> = row.try_get(0).map_err(field)?;
            let value: Vec<u8> = row.try_get(1).map_err(field)?;
            let Some(key) = Key::from_slice(&bytes) else {
                continue; // Not a key of ours; nothing of ours writes one.
            };
            if let Some(record) = decode(&key, Some(&value))? {
                records.push((key, record));
            }
            last = Some(bytes);
        }
        let next = if rows.len() == limit { last } else { None };
        Ok(Page { records, next })
    }
}
