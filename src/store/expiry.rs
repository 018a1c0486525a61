//! The sled store's expiry index, packed: many `(expires_ms, key)` entries to one sled value.
//!
//! One sled key per record in an index tree would double the keys sled holds, and with them
//! its memory (it keeps page state for every key), its disk and its per-call work. Instead the
//! sweeper writes the entries buffered since its last round as chunks: a chunk holds up to
//! `CHUNK_ENTRIES_MAX` entries whose expiry falls in one `BUCKET_MS` bucket, under the key
//! (bucket start, unique id), so the chunks come out of the tree in expiry order. A round
//! reads the chunks whose bucket has begun, settles each entry against its record, and writes
//! back the entries still indexed (or removes the chunk). An entry whose record was re-dated
//! or deleted since is stale and simply dropped.
//!
//! The entries buffered since the last round are lost in a crash. The watermark says which
//! records the chunks on disk cover: every record written (claimed, completed, resolved)
//! before it. `reconcile` re-indexes the records written after it, less a margin for writes
//! whose time was taken before they landed.

use super::StoreError;
use sled::IVec;

/// One entry: the record's `expires_ms`, big-endian, then its key.
pub type Entry = [u8; ENTRY_BYTES];

/// Bytes of one entry.
pub const ENTRY_BYTES: usize = 40;

/// Width of an expiry bucket. A round rewrites the chunks of the bucket in progress.
const BUCKET_MS: u64 = 1_000;

/// Entries one chunk holds at most (40 KiB).
const CHUNK_ENTRIES_MAX: usize = 1_024;

/// Key of the watermark in the database's default tree.
const WATERMARK_KEY: &[u8] = b"expiry-watermark";

/// How long before the watermark a record's write time may be and still need re-indexing:
/// the time a write takes from reading the clock to landing, with room to spare.
pub const WATERMARK_MARGIN_MS: u64 = 10 * 60 * 1_000;

/// The entry of a record of `key` expiring at `expires_ms`.
pub fn entry(expires_ms: u64, key: &[u8; 32]) -> Entry {
    let mut out = [0u8; ENTRY_BYTES];
    out[..8].copy_from_slice(&expires_ms.to_be_bytes());
    out[8..].copy_from_slice(key);
    out
}

/// The expiry of an entry.
pub fn expires_ms(entry: &[u8]) -> u64 {
    u64::from_be_bytes(entry[..8].try_into().expect("entries are 40 bytes"))
}

/// The packed index in its sled tree.
pub struct ExpiryIndex {
    db: sled::Db,
    chunks: sled::Tree,
}

/// A chunk as read: its key and its entries, packed.
pub struct Chunk {
    /// Where it is stored.
    pub key: IVec,
    /// Its entries, `ENTRY_BYTES` each.
    pub entries: IVec,
}

impl Chunk {
    /// The chunk's entries.
    pub fn entries(&self) -> impl Iterator<Item = &[u8]> {
        self.entries.chunks_exact(ENTRY_BYTES)
    }
}

fn store_error(error: sled::Error) -> StoreError {
    super::sled::store_error(error)
}

fn chunk_key(bucket_start_ms: u64, id: u64) -> [u8; 16] {
    let mut key = [0u8; 16];
    key[..8].copy_from_slice(&bucket_start_ms.to_be_bytes());
    key[8..].copy_from_slice(&id.to_be_bytes());
    key
}

impl ExpiryIndex {
    /// Opens the index tree of `db`.
    pub fn open(db: &sled::Db) -> Result<ExpiryIndex, StoreError> {
        Ok(ExpiryIndex {
            db: db.clone(),
            chunks: db.open_tree("expiry-chunks").map_err(store_error)?,
        })
    }

    /// Writes `entries` (in any order) as chunks. Not a batch: sled's batches take a
    /// database-wide lock, and on a full disk one never returns.
    pub fn write(&self, mut entries: Vec<Entry>) -> Result<(), StoreError> {
        entries.sort_unstable();
        entries.dedup();
        let mut rest = entries.as_slice();
        while let Some(first) = rest.first() {
            let bucket = expires_ms(first) / BUCKET_MS;
            let in_bucket = rest
                .iter()
                .take(CHUNK_ENTRIES_MAX)
                .take_while(|entry| expires_ms(&entry[..]) / BUCKET_MS == bucket)
                .count();
            let (chunk, after) = rest.split_at(in_bucket);
            let id = self.db.generate_id().map_err(store_error)?;
            self.chunks
                .insert(chunk_key(bucket * BUCKET_MS, id), chunk.concat())
                .map_err(store_error)?;
            rest = after;
        }
        Ok(())
    }

    /// The chunks whose bucket has begun at `now_ms`, soonest first (`None`: every chunk).
    pub fn chunks(&self, now_ms: Option<u64>) -> impl Iterator<Item = Result<Chunk, StoreError>> {
        let end = now_ms.map_or([0xff; 16], |now| {
            chunk_key((now / BUCKET_MS).saturating_add(1) * BUCKET_MS, 0)
        });
        self.chunks.range(..end).map(|item| {
            let (key, entries) = item.map_err(store_error)?;
            Ok(Chunk { key, entries })
        })
    }

    /// Keeps the entries `kept` of `chunk` (in its order): removes the chunk
    /// when none is left, rewrites it when some went.
    pub fn keep(&self, chunk: &Chunk, kept: &[&[u8]]) -> Result<(), StoreError> {
        if kept.is_empty() {
            self.chunks.remove(&chunk.key).map_err(store_error)?;
        } else if kept.len() * ENTRY_BYTES != chunk.entries.len() {
            self.chunks
                .insert(&chunk.key, kept.concat())
                .map_err(store_error)?;
        }
        Ok(())
    }

    /// Records written before this instant are covered by the chunks on disk; `None` when no
    /// round has said so yet.
    pub fn watermark(&self) -> Result<Option<u64>, StoreError> {
        let value = self.db.get(WATERMARK_KEY).map_err(store_error)?;
        Ok(value.and_then(|bytes| Some(u64::from_be_bytes(bytes.as_ref().try_into().ok()?))))
    }

    /// Says that records written before `now_ms` are covered. It becomes durable with the
    /// next flush; until then an older watermark only makes a restart re-index more.
    pub fn set_watermark(&self, now_ms: u64) -> Result<(), StoreError> {
        self.db
            .insert(WATERMARK_KEY, &now_ms.to_be_bytes())
            .map_err(store_error)?;
        Ok(())
    }

    /// Entries in the index, for tests and benchmarks. Blocking: reads every chunk.
    pub fn len(&self) -> Result<usize, StoreError> {
        let mut entries = 0;
        for chunk in self.chunks(None) {
            entries += chunk?.entries.len() / ENTRY_BYTES;
        }
        Ok(entries)
    }

    /// True when no entry is indexed.
    pub fn is_empty(&self) -> Result<bool, StoreError> {
        Ok(self.chunks.is_empty())
    }
}
