//! Applying one transition to the sled store: the compare-and-swap loop (bounded by
//! `store::CAS_ROUNDS_MAX`), a claim's unread try against "absent", and the counts that
//! follow each landed change (bytes, callers, the expiry floor). It never flushes: `update`
//! waits for the group commit after it.

use super::slices::entry_bytes;
use super::{decode, store_error, wall_clock_ms, SledStore, SUSPECT};
use crate::key::Key;
use crate::record::{Change, Record};
use crate::store::witness;
use crate::store::StoreError;
use prost::Message;
use std::sync::atomic::Ordering;

/// What `SledStore::claim_unread` did.
enum Unread<T> {
    /// The new record is in `records`.
    Claimed(T),
    /// `records` holds this; decide on it.
    Found(Option<sled::IVec>),
    /// Nothing written: read `records` and decide.
    Read,
}

impl SledStore {
    /// One compare-and-swap attempt loop; returns the value and whether a write landed.
    pub(super) fn apply<T>(
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
        for _ in 0..crate::store::CAS_ROUNDS_MAX {
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
            crate::store::CAS_ROUNDS_MAX
        )))
    }

    /// Tells the witness of a live record's delete before the delete can reach the disk, so
    /// the witness never outlives it with a "present" that no record answers.
    pub(super) fn witness_delete(
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
    pub(super) fn landed(
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
    pub(super) fn lower_floor(&self, expires_ms: u64) {
        self.pass_floor.fetch_min(expires_ms, Ordering::AcqRel);
        self.expires_floor.fetch_min(expires_ms, Ordering::AcqRel);
    }

    /// Adds `change` to the records `caller` holds (a caller at 0 is forgotten).
    pub(super) fn count_caller(&self, caller: &str, change: i64) {
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

    pub(super) fn account(&self, old_len: Option<usize>, new_len: Option<usize>) {
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
}
