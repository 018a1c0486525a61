//! Packed slices of the sled store: where COMPLETED records go once the `records` tree holds
//! many, so that sled keeps the recent records only, and memory, disk and the time to open
//! stop growing with the records kept.
//!
//! A slice is a file in the data dir's `slices/`, written once, in key order, by the sweeper's
//! walk (`Packer`): chunks of about `CHUNK_BYTES` of consecutive records (an encoded
//! `SliceChunk` each, with its CRC-32), then never written again. Its catalog entry (sled tree
//! `slices`: `SliceMeta`) holds where each chunk starts and a binary fuse filter over the
//! slice's keys; both stay in memory. Finishing a slice: the file is fdatasynced and its
//! directory fsynced, then the catalog entry is written and flushed, and only then does the
//! store delete the packed records from `records` (compare-and-swap against the bytes
//! packed). A slice goes whole: its catalog entry is removed and flushed, then its file is
//! unlinked, when its last record expires, or first when the store is over its bound.
//!
//! A record is looked up in `records` first; only when absent there, in the slices whose
//! filter says they may hold it, newest first, unless `purged` hides that slice's copy: the
//! marker that an operator purged a packed record (or that it changed while being packed),
//! naming the newest slice it hides, kept until the packed copy expires.

use crate::key::Key;
use crate::pb::idemproxy::v1::{ChunkRef, SliceChunk, SliceEntry, SliceMeta};
use crate::store::durable;
use crate::store::StoreError;
use prost::Message;
use std::collections::HashMap;
use std::fs::File;
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use xorf::{BinaryFuse8, BinaryFuse8Ref, DmaSerializable, Filter, FilterRef};

/// About how many bytes of records one chunk holds (a lookup in a slice reads one chunk).
const CHUNK_BYTES: usize = 16 * 1024;

/// At most this many records go into one slice; the rest wait for the next walk.
pub const SLICE_RECORDS_MAX: u64 = 1 << 20;

/// The catalog tree: slice id (8 bytes, big-endian) → `SliceMeta`.
const CATALOG_TREE: &[u8] = b"slices";
/// Keys of purged packed records → when the packed copy expires and the newest slice hidden
/// (8 + 8 bytes, big-endian).
const PURGED_TREE: &[u8] = b"purged";
/// The directory of slice files, in the data dir.
const SLICE_DIR: &str = "slices";

fn file_name(id: u64) -> String {
    format!("{id:016x}.slice")
}

/// The filter's hash of a key: keys are SHA-256 digests, so their first 8 bytes are uniform.
fn filter_hash(key: &[u8; 32]) -> u64 {
    u64::from_le_bytes(key[..8].try_into().expect("8 bytes"))
}

/// The bytes a record of `value_len` encoded bytes counts for against the size bound: its
/// value and its 32-byte key (in `records` or packed in a slice alike).
pub(super) fn entry_bytes(value_len: usize) -> u64 {
    (32 + value_len) as u64
}

pub(super) fn sled_error(error: sled::Error) -> StoreError {
    match error {
        sled::Error::Corruption { .. } => StoreError::Corrupt(error.to_string()),
        other => StoreError::Io(other.to_string()),
    }
}

fn io_error(what: &str, path: &Path, error: std::io::Error) -> StoreError {
    StoreError::Io(format!("{what} {}: {error}", path.display()))
}

/// One finished slice: its file and, in memory, its catalog entry less the chunk list, which
/// is kept packed (`first_keys`, `chunks`).
pub(super) struct Slice {
    pub id: u64,
    file: File,
    path: PathBuf,
    pub meta: SliceMeta,
    /// The first key of each chunk, in order.
    first_keys: Vec<[u8; 32]>,
    /// Offset, length and CRC-32 of each chunk.
    chunks: Vec<(u64, u32, u32)>,
}

impl Slice {
    fn open(dir: &Path, id: u64, mut meta: SliceMeta) -> Result<Slice, StoreError> {
        let path = dir.join(file_name(id));
        let file = File::open(&path).map_err(|error| {
            StoreError::Corrupt(format!(
                "slice file {} of the catalog cannot be opened ({error}): its records would be lost, so the store is not served; restore the file or the data dir",
                path.display()
            ))
        })?;
        let len = file
            .metadata()
            .map_err(|error| io_error("cannot read", &path, error))?
            .len();
        if len != meta.file_bytes {
            return Err(StoreError::Corrupt(format!(
                "slice file {} is {len} bytes, its catalog entry says {}",
                path.display(),
                meta.file_bytes
            )));
        }
        let refs = std::mem::take(&mut meta.chunks);
        let mut first_keys = Vec::with_capacity(refs.len());
        let mut chunks = Vec::with_capacity(refs.len());
        for chunk in refs {
            let first_key = <[u8; 32]>::try_from(&chunk.first_key[..]).map_err(|_| {
                StoreError::Corrupt(format!("a chunk key of {} is not 32 bytes", path.display()))
            })?;
            first_keys.push(first_key);
            chunks.push((chunk.offset, chunk.len, chunk.crc32));
        }
        Ok(Slice {
            id,
            file,
            path,
            meta,
            first_keys,
            chunks,
        })
    }

    fn may_contain(&self, hash: u64) -> bool {
        BinaryFuse8Ref::from_dma(&self.meta.filter_descriptor, &self.meta.filter_fingerprints)
            .contains(&hash)
    }

    /// Chunk `index`, read and checked.
    fn chunk(&self, index: usize) -> Result<Vec<SliceEntry>, StoreError> {
        let (offset, len, crc32) = self.chunks[index];
        let mut bytes = vec![0; len as usize];
        self.file
            .read_exact_at(&mut bytes, offset)
            .map_err(|error| io_error("cannot read", &self.path, error))?;
        if crc32fast::hash(&bytes) != crc32 {
            return Err(StoreError::Corrupt(format!(
                "chunk at {offset} of {} fails its checksum",
                self.path.display()
            )));
        }
        SliceChunk::decode(&bytes[..])
            .map(|chunk| chunk.entries)
            .map_err(|error| {
                StoreError::Corrupt(format!(
                    "chunk at {offset} of {}: {error}",
                    self.path.display()
                ))
            })
    }

    /// The chunk that would hold `key`, if any.
    fn chunk_for(&self, key: &[u8]) -> Option<usize> {
        self.first_keys
            .partition_point(|first| first[..] <= *key)
            .checked_sub(1)
    }

    /// The encoded record of `key`, if this slice holds it.
    fn get(&self, key: &[u8; 32]) -> Result<Option<Vec<u8>>, StoreError> {
        let Some(index) = self.chunk_for(key) else {
            return Ok(None);
        };
        Ok(self
            .chunk(index)?
            .into_iter()
            .find(|entry| entry.key == key[..])
            .map(|entry| entry.record))
    }

    /// The records of this slice after `after` (from the first when `None`), in key order,
    /// `limit` at most.
    pub fn records_after(
        &self,
        after: Option<&[u8]>,
        limit: usize,
    ) -> Result<Vec<SliceEntry>, StoreError> {
        let first = after.and_then(|after| self.chunk_for(after)).unwrap_or(0);
        let mut found = Vec::new();
        for index in first..self.chunks.len() {
            for entry in self.chunk(index)? {
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

    /// Every record, a chunk at a time.
    pub fn entries(&self) -> impl Iterator<Item = Result<Vec<SliceEntry>, StoreError>> + '_ {
        (0..self.chunks.len()).map(|index| self.chunk(index))
    }
}

/// The slices of one store.
pub(super) struct Slices {
    dir: PathBuf,
    catalog: sled::Tree,
    purged: sled::Tree,
    /// Ascending by id (oldest first).
    installed: RwLock<Vec<Arc<Slice>>>,
    next_id: std::sync::atomic::AtomicU64,
}

/// Totals over slices, for the store's counts.
#[derive(Default)]
pub(super) struct Totals {
    pub records: u64,
    pub bytes: u64,
    pub callers: HashMap<String, u64>,
}

impl Slices {
    /// Loads the catalog and opens its files; removes slice files that have no catalog entry
    /// (builds that a crash or a failed flush interrupted). A catalog entry whose file is
    /// missing is corruption: its records would be lost.
    pub fn open(db: &sled::Db, data_dir: &Path) -> Result<Slices, StoreError> {
        let dir = data_dir.join(SLICE_DIR);
        if !dir.exists() {
            std::fs::create_dir(&dir).map_err(|error| io_error("cannot create", &dir, error))?;
            durable::sync_dir(data_dir)
                .map_err(|error| io_error("cannot sync", data_dir, error))?;
        }
        let catalog = db.open_tree(CATALOG_TREE).map_err(sled_error)?;
        let purged = db.open_tree(PURGED_TREE).map_err(sled_error)?;
        let mut installed = Vec::new();
        let mut next_id = 1;
        for entry in catalog.iter() {
            let (id, meta) = entry.map_err(sled_error)?;
            let id = <[u8; 8]>::try_from(&id[..])
                .map(u64::from_be_bytes)
                .map_err(|_| StoreError::Corrupt("a slice id is not 8 bytes".into()))?;
            let meta = SliceMeta::decode(&meta[..]).map_err(|error| {
                StoreError::Corrupt(format!("the catalog entry of slice {id}: {error}"))
            })?;
            if meta.version != 1 {
                return Err(StoreError::Corrupt(format!(
                    "slice {id} is format version {}, which this release does not read",
                    meta.version
                )));
            }
            next_id = next_id.max(id + 1);
            installed.push(Arc::new(Slice::open(&dir, id, meta)?));
        }
        let mut removed = false;
        for entry in
            std::fs::read_dir(&dir).map_err(|error| io_error("cannot list", &dir, error))?
        {
            let entry = entry.map_err(|error| io_error("cannot list", &dir, error))?;
            let name = entry.file_name();
            let id = name
                .to_str()
                .and_then(|name| name.strip_suffix(".slice"))
                .and_then(|id| u64::from_str_radix(id, 16).ok());
            if let Some(id) = id {
                next_id = next_id.max(id + 1);
                if installed.iter().any(|slice| slice.id == id) {
                    continue;
                }
            }
            let path = entry.path();
            std::fs::remove_file(&path).map_err(|error| io_error("cannot remove", &path, error))?;
            removed = true;
        }
        if removed {
            durable::sync_dir(&dir).map_err(|error| io_error("cannot sync", &dir, error))?;
        }
        Ok(Slices {
            dir,
            catalog,
            purged,
            installed: RwLock::new(installed),
            next_id: next_id.into(),
        })
    }

    fn installed(&self) -> std::sync::RwLockReadGuard<'_, Vec<Arc<Slice>>> {
        self.installed
            .read()
            .expect("slices lock is never poisoned")
    }

    /// What every slice holds, by their catalog entries.
    pub fn totals(&self) -> Totals {
        let mut totals = Totals::default();
        for slice in self.installed().iter() {
            totals.records += slice.meta.records;
            totals.bytes += slice.meta.bytes;
            for (caller, count) in &slice.meta.callers {
                *totals.callers.entry(caller.clone()).or_insert(0) += count;
            }
        }
        totals
    }

    /// Runs `write` unless a slice may hold `key` (its filter says so), with no slice
    /// installed meanwhile: a move that installs its slice after `write` finds what `write`
    /// left in `records`, and one installed before is seen here.
    pub fn unless_held<T>(&self, key: &Key, write: impl FnOnce() -> T) -> Option<T> {
        let hash = filter_hash(key.as_bytes());
        let installed = self.installed();
        if installed.iter().any(|slice| slice.may_contain(hash)) {
            return None;
        }
        let written = write();
        drop(installed);
        Some(written)
    }

    /// The packed record of `key` (encoded) and the id of the slice it is in, unless a purge
    /// hid it.
    pub fn get(&self, key: &Key) -> Result<Option<(u64, Vec<u8>)>, StoreError> {
        let hash = filter_hash(key.as_bytes());
        let candidates: Vec<Arc<Slice>> = {
            let installed = self.installed();
            installed
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

    /// Whether a lookup of `key` absent from `records` would find slice `slice_id`'s copy:
    /// no purge hides it and no newer slice holds the key (for scans, which read the copy
    /// already).
    pub fn shows(&self, key: &Key, slice_id: u64) -> Result<bool, StoreError> {
        if self.hidden_up_to(key)? >= slice_id {
            return Ok(false);
        }
        let hash = filter_hash(key.as_bytes());
        let newer: Vec<Arc<Slice>> = self
            .installed()
            .iter()
            .filter(|slice| slice.id > slice_id && slice.may_contain(hash))
            .cloned()
            .collect();
        for slice in newer {
            if slice.get(key.as_bytes())?.is_some() {
                return Ok(false);
            }
        }
        Ok(true)
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

    /// Removes the slice from lookups and from the catalog; its file stays until `unlink`,
    /// which may run only once the catalog's change is durable.
    pub fn remove(&self, id: u64) -> Result<Option<Arc<Slice>>, StoreError> {
        let removed = {
            let mut installed = self
                .installed
                .write()
                .expect("slices lock is never poisoned");
            let Some(at) = installed.iter().position(|slice| slice.id == id) else {
                return Ok(None);
            };
            installed.remove(at)
        };
        self.catalog.remove(id.to_be_bytes()).map_err(sled_error)?;
        Ok(Some(removed))
    }

    /// Deletes the file of a removed slice.
    pub fn unlink(&self, slice: &Slice) -> Result<(), StoreError> {
        match std::fs::remove_file(&slice.path) {
            Ok(()) => Ok(()),
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(error) => Err(io_error("cannot remove", &slice.path, error)),
        }
    }

    /// Ids of the slices whose every record has expired at `now_ms`.
    pub fn expired(&self, now_ms: u64) -> Vec<u64> {
        self.installed()
            .iter()
            .filter(|slice| slice.meta.expires_max_ms <= now_ms)
            .map(|slice| slice.id)
            .collect()
    }

    /// The slice whose last record expires first, for eviction.
    pub fn first_to_expire(&self) -> Option<u64> {
        self.installed()
            .iter()
            .min_by_key(|slice| (slice.meta.expires_max_ms, slice.id))
            .map(|slice| slice.id)
    }

    /// Every slice, oldest first (for scans).
    pub fn all(&self) -> Vec<Arc<Slice>> {
        self.installed().clone()
    }

    /// Starts a new slice file.
    pub fn packer(&self) -> Result<Packer, StoreError> {
        let id = self
            .next_id
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let path = self.dir.join(file_name(id));
        let file = File::options()
            .write(true)
            .create_new(true)
            .open(&path)
            .map_err(|error| io_error("cannot create", &path, error))?;
        Ok(Packer {
            id,
            path,
            out: std::io::BufWriter::with_capacity(CHUNK_BYTES * 2, file),
            written: 0,
            chunk: SliceChunk::default(),
            chunk_bytes: 0,
            hashes: Vec::new(),
            meta: SliceMeta {
                version: 1,
                ..SliceMeta::default()
            },
        })
    }

    /// Makes a finished slice durable and adds it to the catalog (flush the catalog before
    /// relying on it); lookups see it from now on.
    pub fn install(&self, packer: Packer) -> Result<Option<Arc<Slice>>, StoreError> {
        let Some((id, meta)) = packer.finish()? else {
            return Ok(None);
        };
        durable::sync_dir(&self.dir).map_err(|error| io_error("cannot sync", &self.dir, error))?;
        self.catalog
            .insert(id.to_be_bytes(), meta.encode_to_vec())
            .map_err(sled_error)?;
        let slice = Arc::new(Slice::open(&self.dir, id, meta)?);
        let mut installed = self
            .installed
            .write()
            .expect("slices lock is never poisoned");
        installed.push(slice.clone());
        installed.sort_by_key(|slice| slice.id);
        Ok(Some(slice))
    }
}

/// A slice file being written by the sweeper's walk, in key order.
pub(super) struct Packer {
    id: u64,
    path: PathBuf,
    out: std::io::BufWriter<File>,
    written: u64,
    chunk: SliceChunk,
    chunk_bytes: usize,
    hashes: Vec<u64>,
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
        self.meta.bytes += entry_bytes(encoded.len());
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
        let first_key = first.key.clone();
        let bytes = self.chunk.encode_to_vec();
        self.out
            .write_all(&bytes)
            .map_err(|error| io_error("cannot write", &self.path, error))?;
        self.meta.chunks.push(ChunkRef {
            first_key,
            offset: self.written,
            len: bytes.len() as u32,
            crc32: crc32fast::hash(&bytes),
        });
        self.written += bytes.len() as u64;
        self.chunk.entries.clear();
        self.chunk_bytes = 0;
        Ok(())
    }

    /// Writes the last chunk, fdatasyncs the file and builds the filter. `None` when nothing
    /// was packed (the file is removed).
    fn finish(mut self) -> Result<Option<(u64, SliceMeta)>, StoreError> {
        if self.meta.records == 0 {
            drop(self.out);
            std::fs::remove_file(&self.path)
                .map_err(|error| io_error("cannot remove", &self.path, error))?;
            return Ok(None);
        }
        self.write_chunk()?;
        let file = self
            .out
            .into_inner()
            .map_err(|error| io_error("cannot write", &self.path, error.into_error()))?;
        file.sync_data()
            .map_err(|error| io_error("cannot sync", &self.path, error))?;
        self.meta.file_bytes = self.written;
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
        Ok(Some((self.id, self.meta)))
    }
}
