//! The sled store's maintenance: the sweeper's walk over `records` (expiry, packing into
//! slices, eviction past the bound) and the installing and dropping of whole slices. It
//! runs off the async runtime (`Store::maintain` is blocking) and changes records only
//! through `apply`.

use super::slices::{self, Packer};
use super::{decode, decode_head, store_error, SledStore, SUSPECT};
use crate::key::Key;
use crate::record::{self, Change, Record, State};
use crate::store::{Maintenance, StoreError};
use std::sync::atomic::Ordering;

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

impl SledStore {
    /// One maintenance round (`Store::maintain`): expired slices dropped, then a walk of up
    /// to `MAINTENANCE_RECORDS_MAX` records (more while packing) from where the last one
    /// stopped, deleting expired records, packing COMPLETED ones, and evicting while over
    /// the bound when asked to.
    pub(super) fn maintenance_round(&self, now_ms: u64) -> Result<Maintenance, StoreError> {
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
            let record = decode_head(&key, &value)?;
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

    /// Applies `decide` to the record of `key` if it still expires at `expires_ms` (the
    /// sweeper read it so); returns whether the record was deleted.
    pub(super) fn maintain_record(
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
    pub(super) fn live_records(&self) -> u64 {
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
    pub(super) fn install_slice(&self, packer: Packer) -> Result<(), StoreError> {
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
    pub(super) fn drop_slice(&self, id: u64) -> Result<u64, StoreError> {
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
    pub(super) fn evict(
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
