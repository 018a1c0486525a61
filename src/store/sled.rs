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

use super::durable::{self, DataDirSync, PROBE_FILE};
use super::flusher::Flusher;
use super::slices::{self, entry_bytes, sled_error as store_error, Packer, Slices};
use super::witness::{self, Witness};
use super::{Maintenance, Operation, Store, StoreError, Usage};
use crate::key::Key;
use crate::record::{self, Change, Record, State};
use prost::Message;
use std::collections::HashMap;
use std::future::Future;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;

/// How many records one maintenance round looks at, so a round stays short. At the default
/// sweep interval of 1 s, a walk over 1 M records takes 100 s.
const MAINTENANCE_RECORDS_MAX: usize = 10_000;

/// How many records a round looks at while it packs: packing writes one file in order and
/// costs little per record, and a walk that falls behind a busy sidecar lets `records` (and
/// sled's log) grow.
const PACKING_RECORDS_MAX: usize = 4 * MAINTENANCE_RECORDS_MAX;

/// Eviction stops when the store is this fraction of its bound, so it does not run again at
/// the very next write.
const EVICTION_LOW_WATER_PERCENT: u64 = 90;

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

/// What `SledStore::claim_unread` did.
enum Unread<T> {
    /// The new record is in `records`.
    Claimed(T),
    /// `records` holds this; decide on it.
    Found(Option<sled::IVec>),
    /// Nothing written: read `records` and decide.
    Read,
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
    pub fn group_commit_counts(&self) -> std::sync::Arc<super::flusher::GroupCommitCounts> {
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

    /// One compare-and-swap attempt loop; returns the value and whether a write landed.
    fn apply<T>(
        &self,
        key: &Key,
        transition: &mut impl FnMut(Option<&Record>) -> (Change, T),
        marked: &mut bool,
        absent_first: bool,
    ) -> Result<T, StoreError> {
        // A fresh key is claimed without reading `records` first (`absent_first`, a claim's):
        // when no slice holds the key and the transition would write a record where none is,
        // the compare-and-swap from "absent" is tried at once, and on failure it hands back
        // what `records` holds.
        let mut seen: Option<Option<sled::IVec>> = None;
        for _ in 0..super::CAS_ROUNDS_MAX {
            let old = match seen.take() {
                Some(old) => old,
                None if absent_first => match self.claim_unread(key, transition, marked)? {
                    Unread::Claimed(value) => return Ok(value),
                    Unread::Found(old) => old,
                    Unread::Read => self.records.get(key.as_bytes()).map_err(store_error)?,
                },
                None => self.records.get(key.as_bytes()).map_err(store_error)?,
            };
            // Only a record absent from `records` is looked for in the slices.
            let packed = match old {
                Some(_) => None,
                None => self.slices.get(key)?,
            };
            let stored = old
                .as_deref()
                .or(packed.as_ref().map(|(_, bytes)| &bytes[..]));
            let current = stored.map(|bytes| decode(key, bytes)).transpose()?;
            let (change, value) = transition(current.as_ref());
            let new = match &change {
                Change::Keep => return Ok(value),
                Change::Put(record) => {
                    if current.is_none() && self.full.load(Ordering::Acquire) {
                        let bytes = self.bytes.load(Ordering::Relaxed);
                        return Err(StoreError::Full {
                            bytes,
                            bytes_max: self.bytes_max,
                        });
                    }
                    Some(record.encode_to_vec())
                }
                Change::Delete => None,
            };
            if !self.flusher.is_healthy() {
                // Fail fast and closed: nothing written now could be acknowledged. Reads of
                // durable records (the `Keep` above) are still answered.
                return Err(StoreError::Io(SUSPECT.into()));
            }
            if !*marked {
                // Before the write is visible, so any reader of it knows to wait for a flush.
                self.mark_pending(key);
                *marked = true;
            }
            let new_len = new.as_ref().map(Vec::len);
            if let (Some((slice_id, _)), Some(record), None) = (&packed, &current, &new) {
                // A packed record is deleted by hiding it; `records` must still hold none.
                self.slices.purge(key, record.expires_ms, *slice_id)?;
            }
            if let (Some(_), None) = (&old, &new) {
                // A copy a slice may hold too (a move a crash interrupted) must not come back.
                if let Some((slice_id, bytes)) = self.slices.get(key)? {
                    let expires_ms = decode(key, &bytes)?.expires_ms;
                    self.slices.purge(key, expires_ms, slice_id)?;
                }
            }
            self.witness_delete(key, current.as_ref(), &change)?;
            let swapped = self
                .records
                .compare_and_swap(key.as_bytes(), old.as_ref(), new)
                .map_err(store_error)?;
            if let Err(lost) = swapped {
                seen = Some(lost.current);
                continue;
            }
            if let Change::Put(record) = &change {
                self.witness.applied(key, record.expires_ms);
            }
            // The counts follow `records`; a slice's records count from its install to its
            // drop, including those a purge hid or a record in `records` shadows.
            let live = if old.is_some() {
                current.as_ref()
            } else {
                None
            };
            self.landed(old.as_deref().map(<[u8]>::len), live, &change, new_len);
            return Ok(value);
        }
        Err(StoreError::Io(format!(
            "record {key} changed under {} compare-and-swap rounds in a row",
            super::CAS_ROUNDS_MAX
        )))
    }

    /// Tells the witness of a live record's delete before the delete can reach the disk, so
    /// the witness never outlives it with a "present" that no record answers.
    fn witness_delete(
        &self,
        key: &Key,
        current: Option<&Record>,
        change: &Change,
    ) -> Result<(), StoreError> {
        match (current, change) {
            (Some(record), Change::Delete) if record.expires_ms > wall_clock_ms() => {
                self.witness.deleting(key).map_err(|error| {
                    StoreError::Io(format!("cannot write {}: {error}", witness::FILE))
                })
            }
            _ => Ok(()),
        }
    }

    /// Counts a change that landed in `records`: bytes, the caller's records (`live`: the
    /// record `records` held before, decoded) and the expiry bound.
    fn landed(
        &self,
        old_len: Option<usize>,
        live: Option<&Record>,
        change: &Change,
        new_len: Option<usize>,
    ) {
        self.account(old_len, new_len);
        match (live, change) {
            (None, Change::Put(record)) => self.count_caller(&record.caller, 1),
            (Some(record), Change::Delete) => self.count_caller(&record.caller, -1),
            _ => {}
        }
        if let Change::Put(record) = change {
            self.lower_floor(record.expires_ms);
        }
    }

    /// The first step of `apply` for a key no slice holds: the transition is asked what to
    /// write where no record is, and when that is a record, it is swapped in for "absent"
    /// without reading `records` first. Anything else, or a full store, is decided on what
    /// `records` holds (`Unread::Read`).
    fn claim_unread<T>(
        &self,
        key: &Key,
        transition: &mut impl FnMut(Option<&Record>) -> (Change, T),
        marked: &mut bool,
    ) -> Result<Unread<T>, StoreError> {
        if self.full.load(Ordering::Acquire) || !self.flusher.is_healthy() {
            return Ok(Unread::Read);
        }
        let tried = self.slices.unless_held(key, || {
            let (change, value) = transition(None);
            let Change::Put(record) = &change else {
                return Ok(Unread::Read);
            };
            let new = record.encode_to_vec();
            // The first write of this update: nothing is marked yet.
            self.mark_pending(key);
            *marked = true;
            let new_len = new.len();
            match self
                .records
                .compare_and_swap(key.as_bytes(), None as Option<&[u8]>, Some(new))
                .map_err(store_error)?
            {
                Ok(()) => {
                    self.landed(None, None, &change, Some(new_len));
                    self.witness.applied(key, record.expires_ms);
                    Ok(Unread::Claimed(value))
                }
                Err(lost) => {
                    // Nothing written: a reader need not wait for a flush on this key's account.
                    self.unmark_pending(key);
                    *marked = false;
                    Ok(Unread::Found(lost.current))
                }
            }
        });
        tried.unwrap_or(Ok(Unread::Read))
    }

    /// Counts a record written to `records` that expires at `expires_ms` in both floors: the
    /// walk's first, so that a walk ending meanwhile cannot set a floor above it.
    fn lower_floor(&self, expires_ms: u64) {
        self.pass_floor.fetch_min(expires_ms, Ordering::AcqRel);
        self.expires_floor.fetch_min(expires_ms, Ordering::AcqRel);
    }

    /// Adds `change` to the records `caller` holds (a caller at 0 is forgotten).
    fn count_caller(&self, caller: &str, change: i64) {
        let mut callers = self.callers.lock().expect("callers lock is never poisoned");
        match callers.get_mut(caller) {
            Some(held) => {
                *held = held.saturating_add_signed(change);
                if *held == 0 {
                    callers.remove(caller);
                }
            }
            None if change > 0 => {
                callers.insert(caller.to_owned(), change.unsigned_abs());
            }
            None => {}
        }
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

    fn account(&self, old_len: Option<usize>, new_len: Option<usize>) {
        match (old_len, new_len) {
            (None, Some(new)) => {
                self.records_count.fetch_add(1, Ordering::Relaxed);
                self.bytes.fetch_add(entry_bytes(new), Ordering::Relaxed);
            }
            (Some(old), None) => {
                self.records_count.fetch_sub(1, Ordering::Relaxed);
                self.bytes.fetch_sub(entry_bytes(old), Ordering::Relaxed);
            }
            (Some(old), Some(new)) => {
                self.bytes.fetch_add(entry_bytes(new), Ordering::Relaxed);
                self.bytes.fetch_sub(entry_bytes(old), Ordering::Relaxed);
            }
            (None, None) => {}
        }
    }

    /// Applies `decide` to the record of `key` if it still expires at `expires_ms` (the
    /// sweeper read it so); returns whether the record was deleted.
    fn maintain_record(
        &self,
        key: &Key,
        expires_ms: u64,
        decide: impl Fn(Option<&Record>) -> Change,
    ) -> Result<bool, StoreError> {
        let mut marked = false;
        let result = self.apply(
            key,
            &mut |current| match current {
                Some(record) if record.expires_ms == expires_ms => {
                    let change = decide(current);
                    let deleted = change == Change::Delete;
                    (change, deleted)
                }
                _ => (Change::Keep, false),
            },
            &mut marked,
            false,
        );
        if marked {
            self.unmark_pending(key);
        }
        result
    }

    /// Records in `records` (the others are packed).
    fn live_records(&self) -> u64 {
        self.records_count
            .load(Ordering::Relaxed)
            .saturating_sub(self.packed_records.load(Ordering::Relaxed))
    }

    /// Finishes a slice and moves its records out of `records`: the chunks are made durable,
    /// then the catalog entry, and only then are the records deleted from `records`, each by
    /// compare-and-swap against the bytes packed. A record that changed or went meanwhile (an
    /// operator's purge, eviction; no other move runs meanwhile, `reconcile` holds the walk)
    /// keeps its packed copy hidden (`Slices::purge`). A crash at
    /// any step loses nothing: an unfinished slice is dropped at open, and a record in both
    /// places is read from `records`.
    fn install_slice(&self, packer: Packer) -> Result<(), StoreError> {
        if !self.flusher.is_healthy() {
            // What it packed may rest on writes that were never acknowledged.
            return Err(StoreError::Io(SUSPECT.into()));
        }
        let Some(slice) = self.slices.install(packer)? else {
            return Ok(());
        };
        // The catalog entry durable before any record leaves `records`. A flush that ends
        // after another one failed vouches for nothing: the file is then removed at the next
        // open, or read from its catalog entry if that reached the disk after all.
        self.flush_blocking()?;
        // The packed records count twice now (in `records` and in the slice) until they
        // leave `records` just below.
        let meta = &slice.meta;
        self.packed_records
            .fetch_add(meta.records, Ordering::Relaxed);
        self.records_count
            .fetch_add(meta.records, Ordering::Relaxed);
        self.bytes.fetch_add(meta.bytes, Ordering::Relaxed);
        // Per caller, a moved record counts once already (from `records` to the slice); only
        // one that stays in `records` as well counts twice.
        for chunk in slice.entries() {
            for entry in chunk? {
                let moved = self
                    .records
                    .compare_and_swap(&entry.key, Some(&entry.record[..]), None as Option<&[u8]>)
                    .map_err(store_error)?;
                if moved.is_ok() {
                    self.account(Some(entry.record.len()), None);
                    continue;
                }
                let key = Key::from_slice(&entry.key)
                    .ok_or_else(|| StoreError::Corrupt("a packed key is not 32 bytes".into()))?;
                let record = decode(&key, &entry.record)?;
                self.slices.purge(&key, record.expires_ms, slice.id)?;
                self.count_caller(&record.caller, 1);
            }
        }
        tracing::info!(
            slice = slice.id,
            records = slice.meta.records,
            filter_bytes = slice.meta.filter_fingerprints.len(),
            "store packed a slice"
        );
        Ok(())
    }

    /// Drops a slice whole; returns how many records it held. Its catalog entry goes first,
    /// made durable, and then its file: never a catalog entry without its file.
    fn drop_slice(&self, id: u64) -> Result<u64, StoreError> {
        let Some(slice) = self.slices.remove(id)? else {
            return Ok(0);
        };
        let meta = &slice.meta;
        self.packed_records
            .fetch_sub(meta.records, Ordering::Relaxed);
        let _ = self
            .records_count
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| {
                Some(n.saturating_sub(meta.records))
            });
        let _ = self
            .bytes
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| {
                Some(n.saturating_sub(meta.bytes))
            });
        for (caller, count) in &meta.callers {
            self.count_caller(caller, -(*count as i64));
        }
        // Not durable: the file stays, and the next open reads the slice again.
        self.flush_blocking()?;
        self.slices.unlink(&slice)?;
        Ok(meta.records)
    }

    /// Deletes COMPLETED records of `candidates` (expiry, key), closest to expiry first,
    /// until the store is back under its bound (with room to spare).
    fn evict(
        &self,
        mut candidates: Vec<(u64, Key)>,
        outcome: &mut Maintenance,
    ) -> Result<(), StoreError> {
        let low_water = self.bytes_max / 100 * EVICTION_LOW_WATER_PERCENT;
        candidates.sort_unstable();
        for (expires_ms, key) in candidates {
            if self.bytes.load(Ordering::Relaxed) <= low_water {
                break;
            }
            if self.maintain_record(&key, expires_ms, record::evict)? {
                outcome.evicted += 1;
            }
        }
        Ok(())
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

    async fn check(&self) -> Result<(), StoreError> {
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
        })
    }

    async fn scan(&self, cursor: Option<Vec<u8>>, limit: usize) -> Result<super::Page, StoreError> {
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
        use std::ops::Bound;
        let mut outcome = Maintenance::default();
        for id in self.slices.expired(now_ms) {
            outcome.expired += self.drop_slice(id)?;
        }
        self.slices.forget_purged(now_ms, MAINTENANCE_RECORDS_MAX)?;
        let mut walk = self.walk.lock().expect("walk lock is never poisoned");
        if walk.from.is_none()
            && walk.packer.is_none()
            && self.flusher.is_healthy()
            && self.live_records() >= self.pack_records
        {
            walk.packer = Some(self.slices.packer()?);
        }
        let over_bound = self.bytes.load(Ordering::Relaxed) > self.bytes_max;
        let idle = walk.from.is_none()
            && walk.packer.is_none()
            && !over_bound
            && now_ms < self.expires_floor.load(Ordering::Acquire);
        let start = walk.from.take().map_or(Bound::Unbounded, Bound::Excluded);
        let round = if idle {
            0
        } else if walk.packer.is_some() {
            PACKING_RECORDS_MAX
        } else {
            MAINTENANCE_RECORDS_MAX
        };
        let mut evictable = Vec::new();
        let mut looked_at = 0;
        for entry in self
            .records
            .range::<sled::IVec, _>((start, Bound::Unbounded))
            .take(round)
        {
            let (raw_key, value) = entry.map_err(store_error)?;
            looked_at += 1;
            walk.from = Some(raw_key.clone());
            let key = Key::from_slice(&raw_key)
                .ok_or_else(|| StoreError::Corrupt("a record key is not 32 bytes".into()))?;
            let record = decode(&key, &value)?;
            if record.expires_ms <= now_ms {
                let sweep = |current: Option<&Record>| record::sweep(current, now_ms);
                if self.maintain_record(&key, record.expires_ms, sweep)? {
                    outcome.expired += 1;
                    continue;
                }
            }
            self.pass_floor
                .fetch_min(record.expires_ms, Ordering::AcqRel);
            if record.state() != State::Completed {
                continue;
            }
            if over_bound && self.evict_when_full {
                evictable.push((record.expires_ms, key));
            }
            // Only what is durable: a record still waiting for its flush stays.
            if let Some(packer) = walk.packer.as_mut().filter(|_| !self.is_pending(&key)) {
                packer.add(&key, &value, record.expires_ms, &record.caller)?;
                if packer.records() >= slices::SLICE_RECORDS_MAX {
                    let full = walk.packer.take().expect("packing");
                    self.install_slice(full)?;
                }
            }
        }
        if looked_at < round {
            // The walk reached the end: the next round starts again from the first key.
            walk.from = None;
            let floor = self.pass_floor.swap(u64::MAX, Ordering::AcqRel);
            self.expires_floor.store(floor, Ordering::Release);
            if let Some(packer) = walk.packer.take() {
                self.install_slice(packer)?;
            }
        }
        drop(walk);
        if over_bound && self.evict_when_full {
            // Whole slices first (COMPLETED records, the first to expire), then records.
            let low_water = self.bytes_max / 100 * EVICTION_LOW_WATER_PERCENT;
            while self.bytes.load(Ordering::Relaxed) > low_water {
                let Some(id) = self.slices.first_to_expire() else {
                    break;
                };
                outcome.evicted += self.drop_slice(id)?;
            }
        }
        self.evict(evictable, &mut outcome)?;
        let still_over = self.bytes.load(Ordering::Relaxed) > self.bytes_max;
        self.full.store(still_over, Ordering::Release);
        Ok(outcome)
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

impl SledStore {
    /// Reads one record as stored (from `records`, else from a slice), for tests and operator
    /// tools.
    pub fn get(&self, key: &Key) -> Result<Option<Record>, StoreError> {
        let value = match self.records.get(key.as_bytes()).map_err(store_error)? {
            Some(value) => Some(value.to_vec()),
            None => self.slices.get(key)?.map(|(_, bytes)| bytes),
        };
        value.map(|bytes| decode(key, &bytes)).transpose()
    }

    /// How many records are in each state, for tests and operator tools. Blocking: scans.
    pub fn count_states(&self) -> Result<HashMap<State, u64>, StoreError> {
        let mut counts = HashMap::new();
        let mut cursor = None;
        loop {
            let page = self.scan_page(cursor, super::PAGE_RECORDS_MAX)?;
            for (_, record) in &page.records {
                *counts.entry(record.state()).or_insert(0) += 1;
            }
            match page.next {
                Some(next) => cursor = Some(next),
                None => return Ok(counts),
            }
        }
    }

    /// Records packed into slices, now (for tests and the benchmark).
    pub fn packed_records(&self) -> u64 {
        self.packed_records.load(Ordering::Relaxed)
    }

    /// One page of `scan`: the records of `records` in key order, then those of each slice
    /// (oldest first) in key order that `records` does not shadow and no purge hid. A cursor
    /// is the last key given (32 bytes) or, within the slices, the slice's id and that key
    /// (40 bytes).
    fn scan_page(&self, cursor: Option<Vec<u8>>, limit: usize) -> Result<super::Page, StoreError> {
        use std::ops::Bound;
        let limit = limit.clamp(1, super::PAGE_RECORDS_MAX);
        let mut records = Vec::with_capacity(limit);
        let slice_cursor = cursor
            .as_deref()
            .filter(|cursor| cursor.len() == 40)
            .map(|cursor| {
                let id = u64::from_be_bytes(cursor[..8].try_into().expect("8 bytes"));
                (id, cursor[8..].to_vec())
            });
        if slice_cursor.is_none() {
            let start = cursor.map_or(Bound::Unbounded, Bound::Excluded);
            for entry in self
                .records
                .range::<Vec<u8>, _>((start, Bound::Unbounded))
                .take(limit)
            {
                let (raw_key, value) = entry.map_err(store_error)?;
                let key = Key::from_slice(&raw_key)
                    .ok_or_else(|| StoreError::Corrupt("a record key is not 32 bytes".into()))?;
                records.push((key, decode(&key, &value)?));
            }
            if records.len() == limit {
                let next = records[limit - 1].0.as_bytes().to_vec();
                return Ok(super::Page {
                    records,
                    next: Some(next),
                });
            }
        }
        let (first_id, mut after) = match slice_cursor {
            Some((id, key)) => (id, Some(key)),
            None => (0, None),
        };
        for slice in self.slices.all() {
            if slice.id < first_id {
                continue;
            }
            if slice.id > first_id {
                after = None;
            }
            loop {
                let want = limit - records.len();
                let batch = slice.records_after(after.as_deref(), want)?;
                let exhausted = batch.len() < want;
                for entry in batch {
                    after = Some(entry.key.clone());
                    let key = Key::from_slice(&entry.key).ok_or_else(|| {
                        StoreError::Corrupt("a packed key is not 32 bytes".into())
                    })?;
                    if self.records.contains_key(&entry.key).map_err(store_error)?
                        || !self.slices.shows(&key, slice.id)?
                    {
                        // Shadowed by `records`, purged, or an older copy of a newer slice's.
                        continue;
                    }
                    records.push((key, decode(&key, &entry.record)?));
                }
                if records.len() == limit {
                    let mut next = slice.id.to_be_bytes().to_vec();
                    next.extend_from_slice(records[limit - 1].0.as_bytes());
                    return Ok(super::Page {
                        records,
                        next: Some(next),
                    });
                }
                if exhausted {
                    break;
                }
            }
        }
        Ok(super::Page {
            records,
            next: None,
        })
    }
}
