//! Packed slices of the sled store: where COMPLETED records go once the `records` tree holds
//! many, so that sled keeps a few keys per thousand records instead of one per record.
//!
//! A slice is a sled tree of chunks, each one sled value of consecutive records in key order
//! (an encoded `SliceChunk`, about `CHUNK_BYTES`), keyed by its first record's key, plus one
//! catalog entry (`SliceMeta`) with a binary fuse filter over the slice's keys. The sweeper
//! builds a slice while it walks `records` (`Packer`), makes it durable, writes its catalog
//! entry, makes that durable, and only then deletes the packed records from `records`
//! (compare-and-swap against the bytes it packed). A slice is never written again; it is
//! dropped whole when its last record expires, or first when the store is over its bound.
//!
//! A record is looked up in `records` first; only when absent there, in the slices whose
//! filter says they may hold it, newest first, unless `purged` holds the key: the marker that
//! an operator purged a packed record (or that it changed while being packed), kept until the
//! packed copy expires.

use super::StoreError;
use crate::key::Key;
use crate::pb::idemproxy::v1::{SliceChunk, SliceEntry, SliceMeta};
use prost::Message;
use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use xorf::{BinaryFuse8, BinaryFuse8Ref, DmaSerializable, Filter, FilterRef};

/// About how many bytes of records one chunk (one sled value) holds.
const CHUNK_BYTES: usize = 16 * 1024;

/// At most this many records go into one slice; the rest wait for the next walk.
pub const SLICE_RECORDS_MAX: u64 = 1 << 20;

/// The catalog tree: slice id (8 bytes, big-endian) → `SliceMeta`.
const CATALOG_TREE: &[u8] = b"slices";
/// Keys of purged packed records → when the packed copy expires (8 bytes, big-endian).
const PURGED_TREE: &[u8] = b"purged";
/// A slice's own tree is this prefix and its id.
const SLICE_TREE_PREFIX: &[u8] = b"slice/";

fn tree_name(id: u64) -> Vec<u8> {
    let mut name = SLICE_TREE_PREFIX.to_vec();
    name.extend_from_slice(&id.to_be_bytes());
    name
}

/// The filter's hash of a key: keys are SHA-256 digests, so their first 8 bytes are uniform.
fn filter_hash(key: &[u8; 32]) -> u64 {
    u64::from_le_bytes(key[..8].try_into().expect("8 bytes"))
}

pub(super) fn sled_error(error: sled::Error) -> StoreError {
    match error {
        sled::Error::Corruption { .. } => StoreError::Corrupt(error.to_string()),
        other => StoreError::Io(other.to_string()),
    }
}

fn corrupt(what: &str, error: impl std::fmt::Display) -> StoreError {
    StoreError::Corrupt(format!("{what}: {error}"))
}

/// One finished slice.
pub(super) struct Slice {
    pub id: u64,
    tree: sled::Tree,
    pub meta: SliceMeta,
}

impl Slice {
    fn may_contain(&self, hash: u64) -> bool {
        BinaryFuse8Ref::from_dma(&self.meta.filter_descriptor, &self.meta.filter_fingerprints)
            .contains(&hash)
    }

    /// The encoded record of `key`, if this slice holds it.
    fn get(&self, key: &[u8; 32]) -> Result<Option<Vec<u8>>, StoreError> {
        let chunk = match self.tree.range(..=&key[..]).next_back() {
            None => return Ok(None),
            Some(Ok((_, chunk))) => chunk,
            // Dropped under us: every record in it had expired or was evicted.
            Some(Err(sled::Error::CollectionNotFound(_))) => return Ok(None),
            Some(Err(error)) => return Err(sled_error(error)),
        };
        let chunk = SliceChunk::decode(&chunk[..]).map_err(|e| corrupt("a slice chunk", e))?;
        Ok(chunk
            .entries
            .into_iter()
            .find(|entry| entry.key == key[..])
            .map(|entry| entry.record))
    }

    /// The records of this slice after `after` (from the first when `None`), in key order,
    /// `limit` at most.
    fn records_after(
        &self,
        after: Option<&[u8]>,
        limit: usize,
    ) -> Result<Vec<SliceEntry>, StoreError> {
        let from = match after {
            None => Vec::new(),
            Some(after) => match self.tree.range(..=after).next_back() {
                Some(entry) => entry.map_err(sled_error)?.0.to_vec(),
                None => Vec::new(),
            },
        };
        let mut found = Vec::new();
        for chunk in self.tree.range(from..) {
            let (_, chunk) = chunk.map_err(sled_error)?;
            let chunk = SliceChunk::decode(&chunk[..]).map_err(|e| corrupt("a slice chunk", e))?;
            for entry in chunk.entries {
                if after.is_some_and(|after| entry.key[..] <= *after) {
                    continue;
                }
                found.push(entry);
                if found.len() == limit {
                    return Ok(found);
                }
            }
        }
        Ok(found)
    }
}

/// The slices of one store.
pub(super) struct Slices {
    db: sled::Db,
    catalog: sled::Tree,
    purged: sled::Tree,
    /// Ascending by id (oldest first).
    sealed: RwLock<Vec<Arc<Slice>>>,
    next_id: std::sync::atomic::AtomicU64,
}

/// Totals over slices, for the store's counts.
#[derive(Default)]
pub(super) struct Totals {
    pub records: u64,
    pub bytes: u64,
    pub callers: HashMap<String, u64>,
}

impl Totals {
    fn add(&mut self, meta: &SliceMeta) {
        self.records += meta.records;
        self.bytes += meta.bytes;
        for (caller, count) in &meta.callers {
            *self.callers.entry(caller.clone()).or_insert(0) += count;
        }
    }
}

impl Slices {
    /// Loads the catalog; drops slice trees that have no catalog entry (builds a crash or a
    /// failed flush interrupted).
    pub fn open(db: &sled::Db) -> Result<Slices, StoreError> {
        let catalog = db.open_tree(CATALOG_TREE).map_err(sled_error)?;
        let purged = db.open_tree(PURGED_TREE).map_err(sled_error)?;
        let mut sealed = Vec::new();
        let mut next_id = 1;
        for entry in catalog.iter() {
            let (id, meta) = entry.map_err(sled_error)?;
            let id = <[u8; 8]>::try_from(&id[..])
                .map(u64::from_be_bytes)
                .map_err(|_| StoreError::Corrupt("a slice id is not 8 bytes".into()))?;
            let meta = SliceMeta::decode(&meta[..]).map_err(|e| corrupt("a slice's catalog entry", e))?;
            if meta.version != 1 {
                return Err(StoreError::Corrupt(format!(
                    "slice {id} is format version {}, which this release does not read",
                    meta.version
                )));
            }
            let tree = db.open_tree(tree_name(id)).map_err(sled_error)?;
            next_id = next_id.max(id + 1);
            sealed.push(Arc::new(Slice { id, tree, meta }));
        }
        for name in db.tree_names() {
            let Some(id) = name.strip_prefix(SLICE_TREE_PREFIX) else {
                continue;
            };
            let Ok(id) = <[u8; 8]>::try_from(id).map(u64::from_be_bytes) else {
                continue;
            };
            next_id = next_id.max(id + 1);
            if !sealed.iter().any(|slice| slice.id == id) {
                db.drop_tree(&name).map_err(sled_error)?;
            }
        }
        Ok(Slices {
            db: db.clone(),
            catalog,
            purged,
            sealed: RwLock::new(sealed),
            next_id: next_id.into(),
        })
    }

    fn sealed(&self) -> std::sync::RwLockReadGuard<'_, Vec<Arc<Slice>>> {
        self.sealed.read().expect("slices lock is never poisoned")
    }

    /// What every slice holds, by their catalog entries.
    pub fn totals(&self) -> Totals {
        let mut totals = Totals::default();
        for slice in self.sealed().iter() {
            totals.add(&slice.meta);
        }
        totals
    }

    /// The packed record of `key` (encoded) and the id of the slice it is in, unless a purge
    /// hid it.
    pub fn get(&self, key: &Key) -> Result<Option<(u64, Vec<u8>)>, StoreError> {
        let hash = filter_hash(key.as_bytes());
        let candidates: Vec<Arc<Slice>> = {
            let sealed = self.sealed();
            sealed
                .iter()
                .rev()
                .filter(|slice| slice.may_contain(hash))
                .cloned()
                .collect()
        };
        for slice in candidates {
            if let Some(record) = slice.get(key.as_bytes())? {
                if self.hidden_up_to(key)? >= slice.id {
                    return Ok(None);
                }
                return Ok(Some((slice.id, record)));
            }
        }
        Ok(None)
    }

    /// The newest slice whose copy of `key` a purge hid (0: none).
    fn hidden_up_to(&self, key: &Key) -> Result<u64, StoreError> {
        let marker = self.purged.get(key.as_bytes()).map_err(sled_error)?;
        Ok(marker
            .and_then(|marker| <[u8; 16]>::try_from(&marker[..]).ok())
            .map_or(0, |marker| {
                u64::from_be_bytes(marker[8..].try_into().expect("8 bytes"))
            }))
    }

    /// Hides the packed copies of `key` in slice `slice_id` and older ones (the newest of
    /// which expires at `expires_ms`) from every lookup; newer slices are not hidden.
    pub fn purge(&self, key: &Key, expires_ms: u64, slice_id: u64) -> Result<(), StoreError> {
        let mut marker = expires_ms.to_be_bytes().to_vec();
        marker.extend_from_slice(&slice_id.to_be_bytes());
        self.purged
            .insert(key.as_bytes(), marker)
            .map_err(sled_error)?;
        Ok(())
    }

    /// Drops purge markers whose packed copy has expired.
    pub fn forget_purged(&self, now_ms: u64, limit: usize) -> Result<(), StoreError> {
        for entry in self.purged.iter().take(limit) {
            let (key, marker) = entry.map_err(sled_error)?;
            let expires = marker
                .get(..8)
                .and_then(|expires| <[u8; 8]>::try_from(expires).ok())
                .map_or(0, u64::from_be_bytes);
            if expires <= now_ms {
                // Another marker for the same key written since wins.
                let _ = self
                    .purged
                    .compare_and_swap(&key, Some(marker), None as Option<&[u8]>)
                    .map_err(sled_error)?;
            }
        }
        Ok(())
    }

    /// Removes the slice from lookups and from the catalog, then drops its tree. Returns
    /// what it held.
    pub fn drop_slice(&self, id: u64) -> Result<Option<SliceMeta>, StoreError> {
        let removed = {
            let mut sealed = self.sealed.write().expect("slices lock is never poisoned");
            let Some(at) = sealed.iter().position(|slice| slice.id == id) else {
                return Ok(None);
            };
            sealed.remove(at)
        };
        self.catalog
            .remove(id.to_be_bytes())
            .map_err(sled_error)?;
        self.db.drop_tree(tree_name(id)).map_err(sled_error)?;
        Ok(Some(removed.meta.clone()))
    }

    /// Ids and catalog entries of the slices whose every record has expired at `now_ms`.
    pub fn expired(&self, now_ms: u64) -> Vec<u64> {
        self.sealed()
            .iter()
            .filter(|slice| slice.meta.expires_max_ms <= now_ms)
            .map(|slice| slice.id)
            .collect()
    }

    /// The slice whose last record expires first, for eviction.
    pub fn first_to_expire(&self) -> Option<u64> {
        self.sealed()
            .iter()
            .min_by_key(|slice| (slice.meta.expires_max_ms, slice.id))
            .map(|slice| slice.id)
    }

    /// Every slice, oldest first (for scans).
    pub fn all(&self) -> Vec<Arc<Slice>> {
        self.sealed().clone()
    }

    /// Starts a new slice.
    pub fn packer(&self) -> Result<Packer, StoreError> {
        let id = self
            .next_id
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let tree = self.db.open_tree(tree_name(id)).map_err(sled_error)?;
        Ok(Packer {
            id,
            tree,
            chunk: SliceChunk::default(),
            chunk_bytes: 0,
            hashes: Vec::new(),
            meta: SliceMeta {
                version: 1,
                ..SliceMeta::default()
            },
        })
    }

    /// Abandons a build: its tree goes, nothing else knew of it.
    pub fn abandon(&self, packer: Packer) -> Result<(), StoreError> {
        self.db
            .drop_tree(tree_name(packer.id))
            .map_err(sled_error)?;
        Ok(())
    }

    /// The second step of finishing a slice, once its chunks are durable: its catalog entry
    /// (make it durable before relying on it), and lookups see it from now on.
    pub fn install(&self, packed: Packed) -> Result<Arc<Slice>, StoreError> {
        self.catalog
            .insert(packed.id.to_be_bytes(), packed.meta.encode_to_vec())
            .map_err(sled_error)?;
        let slice = Arc::new(Slice {
            id: packed.id,
            tree: packed.tree,
            meta: packed.meta,
        });
        let mut sealed = self.sealed.write().expect("slices lock is never poisoned");
        sealed.push(slice.clone());
        sealed.sort_by_key(|slice| slice.id);
        Ok(slice)
    }
}

/// A slice being built by the sweeper's walk, in key order.
pub(super) struct Packer {
    id: u64,
    tree: sled::Tree,
    chunk: SliceChunk,
    chunk_bytes: usize,
    hashes: Vec<u64>,
    meta: SliceMeta,
}

/// A slice whose chunks are all written (not yet durable, not yet in the catalog).
pub(super) struct Packed {
    id: u64,
    tree: sled::Tree,
    meta: SliceMeta,
}

impl Packer {
    /// Records packed so far.
    pub fn records(&self) -> u64 {
        self.meta.records
    }

    /// Adds a record; keys must come in ascending order.
    pub fn add(
        &mut self,
        key: &Key,
        encoded: &[u8],
        expires_ms: u64,
        caller: &str,
    ) -> Result<(), StoreError> {
        self.chunk.entries.push(SliceEntry {
            key: key.as_bytes().to_vec(),
            record: encoded.to_vec(),
        });
        self.chunk_bytes += 32 + encoded.len();
        self.hashes.push(filter_hash(key.as_bytes()));
        self.meta.records += 1;
        self.meta.bytes += super::sled::entry_bytes(encoded.len());
        self.meta.expires_max_ms = self.meta.expires_max_ms.max(expires_ms);
        *self.meta.callers.entry(caller.to_owned()).or_insert(0) += 1;
        if self.chunk_bytes >= CHUNK_BYTES {
            self.write_chunk()?;
        }
        Ok(())
    }

    fn write_chunk(&mut self) -> Result<(), StoreError> {
        let Some(first) = self.chunk.entries.first() else {
            return Ok(());
        };
        let key = first.key.clone();
        self.tree
            .insert(key, self.chunk.encode_to_vec())
            .map_err(sled_error)?;
        self.chunk.entries.clear();
        self.chunk_bytes = 0;
        Ok(())
    }

    /// Writes the last chunk and the filter. `None` when nothing was packed (the tree is
    /// dropped).
    pub fn finish(mut self, slices: &Slices) -> Result<Option<Packed>, StoreError> {
        if self.meta.records == 0 {
            slices.abandon(self)?;
            return Ok(None);
        }
        self.write_chunk()?;
        let mut hashes = std::mem::take(&mut self.hashes);
        hashes.sort_unstable();
        hashes.dedup();
        let filter = BinaryFuse8::try_from(&hashes).map_err(|reason| {
            StoreError::Io(format!("cannot build the filter of a slice: {reason}"))
        })?;
        drop(hashes);
        let mut descriptor = vec![0; BinaryFuse8::DESCRIPTOR_LEN];
        filter.dma_copy_descriptor_to(&mut descriptor);
        self.meta.filter_descriptor = descriptor;
        self.meta.filter_fingerprints = filter.dma_fingerprints().to_vec();
        Ok(Some(Packed {
            id: self.id,
            tree: self.tree,
            meta: self.meta,
        }))
    }
}

impl Packed {
    /// Every packed record, in key order, a chunk at a time.
    pub fn entries(slice: &Slice) -> impl Iterator<Item = Result<Vec<SliceEntry>, StoreError>> + '_ {
        slice.tree.iter().map(|chunk| {
            let (_, chunk) = chunk.map_err(sled_error)?;
            SliceChunk::decode(&chunk[..])
                .map(|chunk| chunk.entries)
                .map_err(|e| corrupt("a slice chunk", e))
        })
    }
}

/// Where a scan goes on within the slices: after this key of this slice.
pub(super) fn slice_records_after(
    slice: &Slice,
    after: Option<&[u8]>,
    limit: usize,
) -> Result<Vec<SliceEntry>, StoreError> {
    slice.records_after(after, limit)
}
