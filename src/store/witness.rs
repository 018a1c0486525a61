//! What the sled store acknowledged, kept outside sled so that a store that lost it can tell.
//!
//! sled recovers whatever its log still holds: a flipped byte in the middle of `db`, a file
//! cut short, or `db` deleted while `blobs/` and `slices/` remain all open without complaint,
//! with the most recent records (the log's tail) or all of them gone, and the keys they
//! protected would run again. The witness is a ring of the last `SLOTS` writes the store made
//! durable, in a file of its own (`acknowledged` in the data dir): each slot a key, the expiry
//! of its record, and whether the write left a record or deleted one. At open, every key whose
//! newest slot says "present" and whose record has not expired must be in the store; when one
//! is not, the store is refused (`StoreError::Corrupt`), never served from.
//!
//! Order is what keeps it free of false alarms. A record's "present" slot is written only
//! after the flush that made the record durable, and synced within `PRESENT_SYNC_INTERVAL`; a
//! deletion inside the retention writes its "absent" slot before the delete is applied, and
//! the next group commit syncs the ring before it flushes sled. Slots carry the sequence number
//! taken when the write was applied, so a later deletion always outranks an earlier record's
//! lagging "present". Expiry writes nothing: a slot past its expiry is not checked. This
//! module never decides a record's state and never reads sled.

use crate::key::Key;
use std::collections::HashMap;
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt as _;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;

/// The witness file's name in the data dir.
pub const FILE: &str = "acknowledged";

/// Writes the ring remembers: a truncated or damaged log loses its most recent writes first,
/// and those are the ones kept. 1 MiB of file.
pub const SLOTS: u64 = 16_384;

const SLOT_BYTES: usize = 64;
const PRESENT: u8 = 1;
const ABSENT: u8 = 2;

/// One slot: a write the store applied.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Entry {
    /// Order among all writes: the newest slot of a key says where it stands.
    pub seq: u64,
    /// The record's key.
    pub key: Key,
    /// When the record stops counting (0 for a deletion).
    pub expires_ms: u64,
    /// Whether the write left a record.
    pub present: bool,
}

impl Entry {
    fn encode(&self) -> [u8; SLOT_BYTES] {
        let mut slot = [0u8; SLOT_BYTES];
        slot[..8].copy_from_slice(&self.seq.to_le_bytes());
        slot[8..40].copy_from_slice(self.key.as_bytes());
        slot[40..48].copy_from_slice(&self.expires_ms.to_le_bytes());
        slot[48] = if self.present { PRESENT } else { ABSENT };
        let crc = crc32fast::hash(&slot[..60]);
        slot[60..].copy_from_slice(&crc.to_le_bytes());
        slot
    }

    /// The slot's entry, or `None` for an empty or damaged slot.
    fn decode(slot: &[u8]) -> Option<Entry> {
        let crc = u32::from_le_bytes(slot[60..64].try_into().ok()?);
        if crc != crc32fast::hash(&slot[..60]) {
            return None;
        }
        let seq = u64::from_le_bytes(slot[..8].try_into().ok()?);
        let present = match slot[48] {
            PRESENT => true,
            ABSENT => false,
            _ => return None,
        };
        let entry = Entry {
            seq,
            key: Key::from_slice(&slot[8..40])?,
            expires_ms: u64::from_le_bytes(slot[40..48].try_into().ok()?),
            present,
        };
        // Sequence numbers start at 1: a zeroed slot was never written.
        (entry.seq != 0).then_some(entry)
    }
}

/// The ring, open for writing.
pub struct Witness {
    file: File,
    next_seq: AtomicU64,
    /// Records applied but not yet made durable by a group commit: written once one has.
    queued: Mutex<Vec<Entry>>,
    /// Slots written since the last sync.
    dirty: AtomicBool,
    /// An "absent" slot written since the last sync: the next group commit must sync the ring
    /// before it flushes sled.
    absent_unsynced: AtomicBool,
    /// When the ring was last synced.
    synced_at: Mutex<std::time::Instant>,
}

/// How long "present" slots may wait in the page cache for a sync. They only ever lag the
/// records they witness (a process kill keeps them; a power cut loses at most this much of
/// the witness, never a record), so most group commits need no second `fdatasync`: one per
/// group commit cost 6 % of fresh keys' throughput at 32 in flight and 14 % at 1.
pub const PRESENT_SYNC_INTERVAL: std::time::Duration = std::time::Duration::from_millis(100);

/// What the ring held at open: the newest entry of each key.
pub type Newest = HashMap<Key, Entry>;

impl Witness {
    /// Opens (or creates) the ring in `dir`; the newest entry of each key it holds.
    pub fn open(dir: &Path) -> io::Result<(Witness, Newest)> {
        let path = dir.join(FILE);
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)?;
        let size = SLOTS * SLOT_BYTES as u64;
        let held = crate::files::read(&path, size)?;
        if (held.len() as u64) < size {
            // Allocated whole once, so a slot write never changes the file's size.
            file.set_len(size)?;
            file.sync_all()?;
        }
        let mut newest = Newest::new();
        let mut last_seq = 0;
        for entry in held.chunks_exact(SLOT_BYTES).filter_map(Entry::decode) {
            last_seq = last_seq.max(entry.seq);
            let kept = newest.entry(entry.key).or_insert(entry);
            if entry.seq > kept.seq {
                *kept = entry;
            }
        }
        let witness = Witness {
            file,
            next_seq: AtomicU64::new(last_seq + 1),
            queued: Mutex::new(Vec::new()),
            dirty: AtomicBool::new(false),
            absent_unsynced: AtomicBool::new(false),
            synced_at: Mutex::new(std::time::Instant::now()),
        };
        Ok((witness, newest))
    }

    /// Notes a record just applied: its "present" slot is written once a group commit has
    /// made it durable (`take_queued`, then `write`).
    pub fn applied(&self, key: &Key, expires_ms: u64) {
        let entry = Entry {
            seq: self.next_seq.fetch_add(1, Ordering::Relaxed),
            key: *key,
            expires_ms,
            present: true,
        };
        self.queued.lock().expect("never poisoned").push(entry);
    }

    /// Writes a deletion's "absent" slot now, before the delete is applied: a page-cache write
    /// (no sync here; the next group commit syncs the ring before it flushes sled).
    pub fn deleting(&self, key: &Key) -> io::Result<()> {
        let entry = Entry {
            seq: self.next_seq.fetch_add(1, Ordering::Relaxed),
            key: *key,
            expires_ms: 0,
            present: false,
        };
        self.write(&[entry])?;
        self.absent_unsynced.store(true, Ordering::Release);
        Ok(())
    }

    /// The records applied so far: the group commit about to flush takes them.
    pub fn take_queued(&self) -> Vec<Entry> {
        std::mem::take(&mut *self.queued.lock().expect("never poisoned"))
    }

    /// Writes `entries` into their slots (page cache; `sync` makes them durable): one write a
    /// run of consecutive slots, and a group commit's records mostly are one run.
    pub fn write(&self, entries: &[Entry]) -> io::Result<()> {
        let mut run: Vec<u8> = Vec::with_capacity(entries.len() * SLOT_BYTES);
        let mut run_start = 0;
        for (n, entry) in entries.iter().enumerate() {
            let slot = entry.seq % SLOTS;
            let follows = n > 0 && slot == run_start + (run.len() / SLOT_BYTES) as u64;
            if !follows && !run.is_empty() {
                self.file
                    .write_all_at(&run, run_start * SLOT_BYTES as u64)?;
                run.clear();
            }
            if run.is_empty() {
                run_start = slot;
            }
            run.extend_from_slice(&entry.encode());
        }
        if !run.is_empty() {
            self.file
                .write_all_at(&run, run_start * SLOT_BYTES as u64)?;
        }
        if !entries.is_empty() {
            self.dirty.store(true, Ordering::Release);
        }
        Ok(())
    }

    /// Makes every slot written so far durable (a no-op when none was).
    pub fn sync(&self) -> io::Result<()> {
        let absent = self.absent_unsynced.swap(false, Ordering::AcqRel);
        if self.dirty.swap(false, Ordering::AcqRel) {
            if let Err(error) = self.file.sync_data() {
                self.dirty.store(true, Ordering::Release);
                self.absent_unsynced.fetch_or(absent, Ordering::AcqRel);
                return Err(error);
            }
            *self.synced_at.lock().expect("never poisoned") = std::time::Instant::now();
        }
        Ok(())
    }

    /// `sync` when it is due before a group commit flushes sled: always when an "absent" slot
    /// waits (it must be durable before its deletion is), else once `PRESENT_SYNC_INTERVAL`
    /// has passed since the last sync.
    pub fn sync_before_flush(&self) -> io::Result<()> {
        let due = self.absent_unsynced.load(Ordering::Acquire)
            || self.synced_at.lock().expect("never poisoned").elapsed() >= PRESENT_SYNC_INTERVAL;
        if due {
            self.sync()?;
        }
        Ok(())
    }
}

/// The keys the ring says are held, whose records have not expired at `now_ms`, that `held`
/// does not find (or cannot read): what the store lost.
pub fn lost(newest: &Newest, now_ms: u64, mut held: impl FnMut(&Key) -> bool) -> (usize, Vec<Key>) {
    let mut checked = 0;
    let mut lost = Vec::new();
    for entry in newest.values() {
        if !entry.present || entry.expires_ms <= now_ms {
            continue;
        }
        checked += 1;
        if !held(&entry.key) {
            lost.push(entry.key);
        }
    }
    (checked, lost)
}

/// Removes the ring from `dir`: the operator's acceptance that what it witnessed is lost
/// (`idemproxy accept-loss`). The next start begins a new one.
pub fn forget(dir: &Path) -> io::Result<bool> {
    match std::fs::remove_file(dir.join(FILE)) {
        Ok(()) => {
            let directory = File::open(dir)?;
            directory.sync_all()?;
            Ok(true)
        }
        Err(error) if error.kind() == io::ErrorKind::NotFound => Ok(false),
        Err(error) => Err(error),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(n: u8) -> Key {
        Key::derive("/s.S/M", "-", &[n])
    }

    #[test]
    fn the_newest_slot_of_a_key_decides_and_a_damaged_slot_is_skipped() {
        let dir = tempfile::tempdir().expect("a temp dir");
        {
            let (witness, newest) = Witness::open(dir.path()).expect("opens");
            assert!(newest.is_empty());
            witness.applied(&key(1), 100);
            witness.applied(&key(2), 100);
            let present = witness.take_queued();
            // A deletion applied after key 2's record: it outranks that record's slot, even
            // though the record's slot is written after it.
            witness.deleting(&key(2)).expect("written");
            witness.write(&present).expect("written");
            witness.sync().expect("synced");
        }
        let (witness, newest) = Witness::open(dir.path()).expect("reopens");
        assert!(newest[&key(1)].present);
        assert!(!newest[&key(2)].present);
        let (checked, lost) = lost(&newest, 50, |k| *k != key(1));
        assert_eq!((checked, lost), (1, vec![key(1)]));
        assert_eq!(
            super::lost(&newest, 100, |_| false).0,
            0,
            "expired: not checked"
        );
        // Sequence numbers go on from the newest slot.
        witness.applied(&key(3), 100);
        assert_eq!(witness.take_queued()[0].seq, 4);
        let mut slot = Entry {
            seq: 9,
            key: key(4),
            expires_ms: 1,
            present: true,
        }
        .encode();
        slot[20] ^= 1;
        assert_eq!(Entry::decode(&slot), None);
    }
}
