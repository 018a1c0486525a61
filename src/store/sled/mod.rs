//! The embedded store on sled 0.34 (design §5): one process owns the data dir.
//!
//! Recent records live in the `records` tree, one protobuf `Record` per 32-byte key, changed
//! only by compare-and-swap. Once it holds `pack_records`, the sweeper's walk packs the
//! COMPLETED ones into a slice file written once (`slices.rs`), so sled holds the recent
//! records only. No expiry index: the sweeper walks `records` in key order,
//! `MAINTENANCE_RECORDS_MAX` a round, deleting those whose retention ended and, over the size
//! bound, the COMPLETED ones closest to expiry among those it looks at (after whole slices). A
//! record past its retention is already treated as absent by every transition
//! (`record::is_expired`), so a walk that reaches it later only frees its space later; it
//! never changes an answer. Opening does not scan: one process owns the data dir, so a claim
//! that meets an IN_FLIGHT record of another process incarnation knows it is orphaned
//! (`record::claim`). `reconcile` then walks `records` in the background: counts, marks
//! orphaned claims IN_DOUBT for operators, and finishes a move into a slice that a stop
//! interrupted. Every acknowledged change is flushed by the group-commit flusher, and fsynced
//! (`durable.rs`), before `update` returns, and so is any record a reader sees while its
//! writer still waits for that flush.

mod apply;
mod maintain;
mod scan;
mod slices;

use crate::key::Key;
use crate::pb::idemproxy::v1::RecordHead;
use crate::record::{self, Change, Record};
use crate::store::durable::{self, DataDirSync, PROBE_FILE};
use crate::store::flusher::Flusher;
use crate::store::witness::{self, Witness};
use crate::store::{Maintenance, Operation, Store, StoreError, Usage};
use prost::Message;
use slices::{entry_bytes, sled_error as store_error, Packer, Slices};
use std::collections::HashMap;
use std::future::Future;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;

/// Lock shards of the set of keys whose writes are not yet flushed.
const PENDING_SHARDS: usize = 16;

/// The expiry index that data dirs written by 0.1.0 hold, one sled key per record: dropped
/// by the first `reconcile` (the sweeper's walk needs none).
const LEGACY_EXPIRY_TREE: &[u8] = b"expiry";

/// How to open the sled store.
#[derive(Debug, Clone)]
pub struct SledOptions {
    /// The data directory; created when missing.
    pub dir: PathBuf,
    /// sled's page cache; its memory use is a multiple of this.
    pub cache_bytes: u64,
    /// The store's size bound: past it new keys are refused (`StoreError::Full`), or, with
    /// `evict_when_full`, COMPLETED records are evicted.
    pub bytes_max: u64,
    /// Whether a store over its bound evicts COMPLETED records inside their retention (their
    /// retries then run again): an operator's explicit choice, never the default.
    pub evict_when_full: bool,
    /// Group commit off (benchmark baseline only): one write at a time, each waiting for a
    /// flush of its own before the next write starts.
    pub flush_per_write: bool,
    /// Longest wait for the disk to confirm a flush.
    pub flush_timeout: std::time::Duration,
    /// Once `records` holds this many records, the sweeper's next walk packs its COMPLETED
    /// ones into a slice (`slices.rs`).
    pub pack_records: u64,
}

/// Where the sweeper's walk is, and the slice it is packing.
#[derive(Default)]
struct Walk {
    /// It goes on after this key (`None`: from the first).
    from: Option<sled::IVec>,
    /// The slice this walk fills, when it packs.
    packer: Option<Packer>,
}

/// The sled-backed store.
pub struct SledStore {
    db: sled::Db,
    /// The data directory, probed for writability by `check`.
    dir: PathBuf,
    records: sled::Tree,
    /// Where the sweeper's walk is.
    walk: Mutex<Walk>,
    /// COMPLETED records packed many to a sled value, out of `records`.
    slices: Slices,
    /// Records in `slices` (by their catalog entries).
    packed_records: AtomicU64,
    pack_records: u64,
    flusher: Flusher,
    /// The last writes made durable, kept outside sled (`witness.rs`): checked at open.
    witness: std::sync::Arc<Witness>,
    /// Keys written but not yet flushed, with how many writers are waiting on each.
    pending: [Mutex<HashMap<Key, u32>>; PENDING_SHARDS],
    records_count: AtomicU64,
    /// Keys whose last write was visible but never acknowledged (its flush failed): read as
    /// failures until a restart.
    suspect: Mutex<std::collections::HashSet<Key>>,
    /// Records per caller, kept as records are created and deleted, rebuilt by `reconcile`.
    callers: Mutex<HashMap<String, u64>>,
    bytes: AtomicU64,
    bytes_max: u64,
    evict_when_full: bool,
    flush_timeout: std::time::Duration,
    /// With group commit off: held by a write from before it lands until its flush ends, so no
    /// flush ever covers a second write (a flush finding nothing new to write is free in sled,
    /// which made "a flush per write" group-commit anyway).
    one_at_a_time: Option<tokio::sync::Mutex<()>>,
    /// Set when the last maintenance round left the store over its bound (nothing to evict,
    /// or eviction not chosen): new claims are refused until it clears.
    full: AtomicBool,
    /// No record in `records` expires before this (0 until a walk has seen them all): while
    /// it is ahead of the clock and nothing is to be packed or evicted, the sweeper has no
    /// reason to walk. Set at the end of each whole walk from `pass_floor`.
    expires_floor: AtomicU64,
    /// The earliest expiry the walk in progress left in `records`, and of every record
    /// written since the last whole walk ended.
    pass_floor: AtomicU64,
}

/// What reconciling a store found.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Recovery {
    /// Records found.
    pub records: u64,
    /// IN_FLIGHT records of an earlier process, now IN_DOUBT.
    pub in_doubt: u64,
}

fn decode(key: &Key, bytes: &[u8]) -> Result<Record, StoreError> {
    Record::decode(bytes).map_err(|error| StoreError::Undecodable {
        key: *key,
        reason: error.to_string(),
    })
}

/// The state, caller and expiry of a stored record, read without copying the rest (its
/// response above all): what the sweeper's walk decides on.
fn decode_head(key: &Key, bytes: &[u8]) -> Result<RecordHead, StoreError> {
    RecordHead::decode(bytes).map_err(|error| StoreError::Undecodable {
        key: *key,
        reason: error.to_string(),
    })
}

/// Milliseconds since the Unix epoch, by the wall clock (records' expiries are on it).
fn wall_clock_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |since| since.as_millis() as u64)
}

/// What to tell an operator whose store lost `lost` of the `checked` records it witnessed.
fn lost_message(lost: usize, checked: usize, dir: &std::path::Path) -> String {
    format!(
        "{lost} of the {checked} most recently acknowledged records that have not expired are \
         missing or unreadable in {dir} (a damaged, truncated or half-restored data dir): it is \
         not served from, as their retries would run again. Restore the volume from a copy, or \
         accept the loss with `idemproxy accept-loss --data-dir {dir}` and start again",
        dir = dir.display()
    )
}

/// Refuses a data dir whose sled trees are empty although the witness saw records that have
/// not expired: `db` deleted or replaced, with whatever else is left in the dir untouched.
fn refuse_if_emptied(
    db: &sled::Db,
    records: &sled::Tree,
    witnessed: &witness::Newest,
    dir: &std::path::Path,
) -> Result<(), StoreError> {
    let catalog_empty = db.open_tree("slices").map_err(store_error)?.is_empty();
    if !(records.is_empty() && catalog_empty) {
        return Ok(());
    }
    let (checked, lost) = witness::lost(witnessed, wall_clock_ms(), |_| false);
    if lost.is_empty() {
        return Ok(());
    }
    tracing::error!(lost = lost.len(), dir = %dir.display(), "the store lost every record");
    Err(StoreError::Corrupt(lost_message(lost.len(), checked, dir)))
}

/// Why a store whose flush failed takes no more writes.
const SUSPECT: &str = "a write to the data dir failed or timed out earlier; nothing more is acknowledged until the sidecar restarts";

/// Opens sled in `dir` as the store uses it (the benchmark's sled-alone baseline too).
pub fn open_db(dir: &std::path::Path, cache_bytes: u64) -> sled::Result<sled::Db> {
    sled::Config::new()
        .path(dir)
        .cache_capacity(cache_bytes)
        // Our flusher makes every acknowledged write durable; sled's timer adds nothing.
        .flush_every_ms(None)
        .open()
}

impl SledStore {
    /// Group commit's flush and write counts (for the telemetry's batch-size counters).
    pub fn group_commit_counts(&self) -> std::sync::Arc<crate::store::flusher::GroupCommitCounts> {
        self.flusher.counts()
    }

    /// Opens (or creates) the store, without scanning it: call `reconcile` next, off the
    /// serving path. Blocking.
    pub fn open(options: &SledOptions) -> Result<SledStore, StoreError> {
        DataDirSync::create_dir(&options.dir).map_err(|error| {
            StoreError::Io(format!(
                "cannot create data dir {}: {error}",
                options.dir.display()
            ))
        })?;
        let db = open_db(&options.dir, options.cache_bytes).map_err(store_error)?;
        let records = db.open_tree("records").map_err(store_error)?;
        let (witness, witnessed) = Witness::open(&options.dir).map_err(|error| {
            StoreError::Io(format!(
                "cannot open {} in {}: {error}",
                witness::FILE,
                options.dir.display()
            ))
        })?;
        let witness = std::sync::Arc::new(witness);
        // Before the slices are opened, which remove slice files without a catalog entry: a
        // data dir whose `db` is gone lost that catalog too, and its slice files are all that
        // is left of the records.
        refuse_if_emptied(&db, &records, &witnessed, &options.dir)?;
        let slices = Slices::open(&db, &options.dir)?;
        let totals = slices.totals();
        let flusher =
            durable::start_flusher(&db, &options.dir, Some(witness.clone())).map_err(|error| {
                StoreError::Io(format!(
                    "cannot sync data dir {} or start its flusher: {error}",
                    options.dir.display()
                ))
            })?;
        let store = SledStore {
            db,
            dir: options.dir.clone(),
            records,
            walk: Mutex::new(Walk::default()),
            slices,
            packed_records: AtomicU64::new(totals.records),
            pack_records: options.pack_records.max(1),
            flusher,
            witness,
            pending: Default::default(),
            // The packed records until `reconcile` has counted the others.
            records_count: AtomicU64::new(totals.records),
            callers: Mutex::new(totals.callers),
            suspect: Mutex::new(std::collections::HashSet::new()),
            bytes: AtomicU64::new(totals.bytes),
            bytes_max: options.bytes_max,
            evict_when_full: options.evict_when_full,
            flush_timeout: options.flush_timeout,
            one_at_a_time: options.flush_per_write.then(|| tokio::sync::Mutex::new(())),
            full: AtomicBool::new(false),
            expires_floor: AtomicU64::new(0),
            pass_floor: AtomicU64::new(u64::MAX),
        };
        store.check_witnessed(&witnessed)?;
        Ok(store)
    }

    /// Every record the witness saw made durable and not yet expired is still here, or the
    /// store is refused: sled opens a damaged, truncated or half-restored data dir without
    /// complaint, and the keys it lost would run again.
    fn check_witnessed(&self, witnessed: &witness::Newest) -> Result<(), StoreError> {
        let (checked, lost) = witness::lost(witnessed, wall_clock_ms(), |key| {
            matches!(self.get(key), Ok(Some(_)))
        });
        if lost.is_empty() {
            return Ok(());
        }
        let first = lost[0].to_string();
        tracing::error!(
            lost = lost.len(),
            checked,
            first = &first[..16],
            dir = %self.dir.display(),
            "the store lost records it had acknowledged"
        );
        Err(StoreError::Corrupt(lost_message(
            lost.len(),
            checked,
            &self.dir,
        )))
    }

    /// Walks every record once, after start and beside live traffic: marks claims of earlier
    /// processes (any incarnation but `live`) IN_DOUBT, and counts records and bytes for the
    /// size bound; then drops the expiry index of a data dir written by 0.1.0. Writes that
    /// land during the walk make the counts approximate, which the bound tolerates. Blocking:
    /// run it off the async runtime's threads.
    pub fn reconcile(&self, live: &[u8; 8]) -> Result<Recovery, StoreError> {
        // No packing meanwhile: a move finished here and one of the sweeper's on the same
        // record would each see the other's delete as a purge (`install_slice`).
        let _walk = self.walk.lock().expect("walk lock is never poisoned");
        let mut recovery = Recovery::default();
        let mut bytes = 0;
        let mut callers: HashMap<String, u64> = HashMap::new();
        for entry in self.records.iter() {
            let (raw_key, value) = entry.map_err(store_error)?;
            let key = Key::from_slice(&raw_key).ok_or_else(|| {
                StoreError::Corrupt(format!("a record key is {} bytes, not 32", raw_key.len()))
            })?;
            if self.finish_move(&key, &value)? {
                continue;
            }
            let mut marked = false;
            let mut seen = None;
            let result = self.apply(
                &key,
                &mut |current| {
                    let change = record::recover(current, Some(live));
                    let kept = match &change {
                        Change::Put(next) => Some(next),
                        _ => current,
                    };
                    seen = kept.map(|r| (r.encoded_len(), r.caller.clone()));
                    let doubted = matches!(change, Change::Put(_));
                    (change, doubted)
                },
                &mut marked,
                false,
            );
            if marked {
                self.unmark_pending(&key);
            }
            recovery.in_doubt += u64::from(result?);
            let Some((len, caller)) = seen else {
                continue;
            };
            *callers.entry(caller).or_insert(0) += 1;
            recovery.records += 1;
            bytes += entry_bytes(len);
        }
        let packed = self.slices.totals();
        recovery.records += packed.records;
        bytes += packed.bytes;
        for (caller, count) in packed.callers {
            *callers.entry(caller).or_insert(0) += count;
        }
        self.records_count
            .store(recovery.records, Ordering::Relaxed);
        self.bytes.store(bytes, Ordering::Relaxed);
        *self.callers.lock().expect("callers lock is never poisoned") = callers;
        // `drop_tree` of a tree that is not there is no error.
        self.db.drop_tree(LEGACY_EXPIRY_TREE).map_err(store_error)?;
        self.db.flush().map_err(store_error)?;
        Ok(recovery)
    }

    /// Deletes `value`, the record of `key` in `records`, when a slice holds the very same
    /// bytes: a move that a stop or a crash interrupted after the slice was installed.
    fn finish_move(&self, key: &Key, value: &[u8]) -> Result<bool, StoreError> {
        match self.slices.get(key)? {
            Some((_, packed)) if packed == value => Ok(self
                .records
                .compare_and_swap(key.as_bytes(), Some(value), None as Option<&[u8]>)
                .map_err(store_error)?
                .is_ok()),
            _ => Ok(false),
        }
    }

    fn shard(&self, key: &Key) -> &Mutex<HashMap<Key, u32>> {
        &self.pending[key.as_bytes()[0] as usize % PENDING_SHARDS]
    }

    fn mark_pending(&self, key: &Key) {
        let mut shard = self
            .shard(key)
            .lock()
            .expect("pending lock is never poisoned");
        *shard.entry(*key).or_insert(0) += 1;
    }

    fn unmark_pending(&self, key: &Key) {
        let mut shard = self
            .shard(key)
            .lock()
            .expect("pending lock is never poisoned");
        if let Some(count) = shard.get_mut(key) {
            *count -= 1;
            if *count == 0 {
                shard.remove(key);
            }
        }
    }

    fn is_suspect(&self, key: &Key) -> bool {
        !self.flusher.is_healthy()
            && self
                .suspect
                .lock()
                .expect("suspect lock is never poisoned")
                .contains(key)
    }

    fn is_pending(&self, key: &Key) -> bool {
        let shard = self
            .shard(key)
            .lock()
            .expect("pending lock is never poisoned");
        shard.contains_key(key)
    }

    /// `Flusher::flush_blocking` as the store reports it: a flush that ends after another one
    /// failed vouches for nothing.
    fn flush_blocking(&self) -> Result<(), StoreError> {
        match self.flusher.flush_blocking(self.flush_timeout) {
            Ok(()) if self.flusher.is_healthy() => Ok(()),
            Ok(()) => Err(StoreError::Io(SUSPECT.into())),
            Err(error) => Err(StoreError::Io(error)),
        }
    }
}

impl Store for SledStore {
    async fn caller_records(&self, caller: &str, _now_ms: u64) -> Result<u64, StoreError> {
        // Expired records count until the sweeper deletes them (within --sweep-interval).
        let callers = self.callers.lock().expect("callers lock is never poisoned");
        Ok(callers.get(caller).copied().unwrap_or(0))
    }

    fn failed_for_good(&self) -> Option<String> {
        (!self.flusher.is_healthy()).then(|| SUSPECT.to_owned())
    }

    async fn check(&self) -> Result<Option<String>, StoreError> {
        if !self.flusher.is_healthy() {
            return Err(StoreError::Io(SUSPECT.into()));
        }
        if self.full.load(Ordering::Relaxed) {
            return Err(StoreError::Io(
                "the store is at its size bound (--max-store-bytes) and refuses new keys".into(),
            ));
        }
        // The directory must take a new file: sled writes to files it holds open, so a
        // read-only or full filesystem would otherwise go unnoticed until the next flush.
        let probe = self.dir.join(PROBE_FILE);
        let written = tokio::fs::write(&probe, b"ok").await;
        let _ = tokio::fs::remove_file(&probe).await;
        written.map_err(|error| {
            StoreError::Io(format!(
                "the data dir {} is not writable: {error}",
                self.dir.display()
            ))
        })?;
        Ok(None)
    }

    async fn scan(
        &self,
        cursor: Option<Vec<u8>>,
        limit: usize,
    ) -> Result<crate::store::Page, StoreError> {
        // A page is at most PAGE_RECORDS_MAX reads of sled's cache (and of the chunks that
        // hold them): short enough to run here rather than on a blocking thread.
        self.scan_page(cursor, limit)
    }

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
        if self.is_suspect(key) {
            // Its last write was never acknowledged: what sled holds may not survive.
            return Err(StoreError::Io(SUSPECT.into()));
        }
        let _turn = match &self.one_at_a_time {
            Some(turn) => Some(turn.lock().await),
            None => None,
        };
        let mut marked = false;
        let applied = self.apply(
            key,
            &mut transition,
            &mut marked,
            operation.tries_absent_first(),
        );
        let needs_flush = marked || (applied.is_ok() && self.is_pending(key));
        let flushed = if needs_flush {
            match self.flusher.flush(self.flush_timeout).await {
                // A flush that ends after another one failed vouches for nothing.
                Ok(()) if !self.flusher.is_healthy() => Err(StoreError::Io(SUSPECT.into())),
                Ok(()) => Ok(()),
                Err(error) => Err(StoreError::Io(error)),
            }
        } else {
            Ok(())
        };
        if marked && flushed.is_err() {
            self.suspect
                .lock()
                .expect("suspect lock is never poisoned")
                .insert(*key);
        }
        if marked {
            self.unmark_pending(key);
        }
        let value = applied?;
        flushed?;
        Ok(value)
    }

    fn changed(&self, key: &Key) -> impl Future<Output = ()> + Send + 'static {
        let subscriber = self.records.watch_prefix(key.as_bytes());
        async move {
            let _ = subscriber.await;
        }
    }

    fn maintain(&self, now_ms: u64) -> Result<Maintenance, StoreError> {
        self.maintenance_round(now_ms)
    }

    fn is_sole_owner(&self) -> bool {
        true
    }

    fn usage(&self) -> Usage {
        Usage {
            records: self.records_count.load(Ordering::Relaxed),
            bytes: self.bytes.load(Ordering::Relaxed),
        }
    }
}
