//! Reading the sled store for operators and tests: one record, a page of `scan` (records
//! first, then each slice's records that nothing shadows or hides), counts by state. It
//! reads only.

use super::{decode, store_error, SledStore};
use crate::key::Key;
use crate::record::{Record, State};
use crate::store::{Page, StoreError, PAGE_RECORDS_MAX};
use std::collections::HashMap;
use std::sync::atomic::Ordering;

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
            let page = self.scan_page(cursor, PAGE_RECORDS_MAX)?;
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
    pub(super) fn scan_page(
        &self,
        cursor: Option<Vec<u8>>,
        limit: usize,
    ) -> Result<Page, StoreError> {
        use std::ops::Bound;
        let limit = limit.clamp(1, PAGE_RECORDS_MAX);
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
                return Ok(Page {
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
                    return Ok(Page {
                        records,
                        next: Some(next),
                    });
                }
                if exhausted {
                    break;
                }
            }
        }
        Ok(Page {
            records,
            next: None,
        })
    }
}
