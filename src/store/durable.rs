//! Power-cut durability of the sled data dir: fsync what sled only `sync_file_range`s.
//!
//! sled 0.34 makes its log "durable" with `sync_file_range`, which reaches neither the
//! device's volatile write cache nor the file's metadata, writes its blob files (large pages)
//! with no sync at all, and never syncs a directory after creating, renaming or removing an
//! entry. After a power cut, a claim or an outcome acknowledged on sled's word alone can be
//! gone. `DataDirSync::sync` runs after each of sled's flushes, on the flusher thread (one call
//! per group commit): `fdatasync` of the log, `fdatasync` of each blob file not yet synced,
//! and an `fsync` of a directory whose entries changed since its last sync. Which files and
//! directories changed the kernel tells (inotify): a flush after which sled touched nothing
//! but its log lists no directory. Opening syncs
//! everything once, and the directory entries that lead to the data dir, so nothing written
//! before this process (an older release, a crash during a first start) is left unsynced.
//! It never writes a byte of its own into the data dir (the witness's ring, written and synced
//! by `witness.rs` on the same group commit, is not its concern).

use super::flusher::Flusher;
use std::collections::BTreeMap;
use std::ffi::OsString;
use std::fs::File;
use std::io;
use std::mem::MaybeUninit;
use std::os::fd::OwnedFd;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

/// sled's log file inside the data dir.
const LOG_FILE: &str = "db";
/// sled's directory of blob files (pages too large for the log).
const BLOB_DIR: &str = "blobs";
/// The readiness probe's file (`SledStore::check`): created and removed every second, never
/// anything a record depends on, so it is not a reason to sync the directory.
pub const PROBE_FILE: &str = ".idemproxy-ready";

/// The witness's ring (`witness.rs`), which syncs itself.
const WITNESS: &str = super::witness::FILE;

/// What of the data dir has been synced, and the open log to `fdatasync`.
pub struct DataDirSync {
    dir: PathBuf,
    log: File,
    /// Entries of the data dir at its last sync, with the size each file had then.
    dir_entries: Files,
    /// Entries of the blob dir at its last sync, with the size each file had then.
    blob_entries: Files,
    /// What changed in the data dir and the blob dir since the last sync.
    changes: Changes,
    /// A listing that failed: the next sync lists again, whatever the queue says.
    relist: bool,
}

/// An inotify watch of the data dir and its blob dir. An event is queued by the very call
/// that changes an entry or writes a file, so whatever a write to be acknowledged depends
/// on is in the queue before its flush begins.
struct Changes {
    inotify: OwnedFd,
    /// The blob dir's watch (the data dir has the other).
    blob_watch: i32,
    buffer: Box<[MaybeUninit<u8>]>,
}

/// What the queue said since it was last read.
#[derive(Debug, Default)]
struct Changed {
    /// A file other than the log or the probe was written, or an entry came or went (or the
    /// queue overflowed): list the directories and sync what is new or grew.
    any: bool,
    /// Files written, by directory (`true`: the blob dir): synced even when their size
    /// stayed the same.
    written: Vec<(bool, OsString)>,
}

impl Changes {
    fn watch(dir: &Path) -> io::Result<Changes> {
        use rustix::fs::inotify::{self, CreateFlags, WatchFlags};
        let inotify = inotify::init(CreateFlags::NONBLOCK | CreateFlags::CLOEXEC)?;
        let flags = WatchFlags::CREATE
            | WatchFlags::DELETE
            | WatchFlags::MOVED_FROM
            | WatchFlags::MOVED_TO
            | WatchFlags::MODIFY
            | WatchFlags::DELETE_SELF
            | WatchFlags::MOVE_SELF;
        inotify::add_watch(&inotify, dir, flags)?;
        let blob_watch = inotify::add_watch(&inotify, dir.join(BLOB_DIR), flags)?;
        Ok(Changes {
            inotify,
            blob_watch,
            buffer: vec![MaybeUninit::uninit(); 16 << 10].into_boxed_slice(),
        })
    }

    /// Empties the queue. A read that fails counts as "anything may have changed".
    fn read(&mut self) -> Changed {
        use rustix::fs::inotify::{ReadFlags, Reader};
        let mut changed = Changed::default();
        let mut reader = Reader::new(&self.inotify, &mut self.buffer);
        loop {
            let event = match reader.next() {
                Ok(event) => event,
                Err(rustix::io::Errno::AGAIN) => return changed,
                Err(_) => {
                    changed.any = true;
                    return changed;
                }
            };
            let in_blobs = event.wd() == self.blob_watch;
            let name = event
                .file_name()
                .map(|name| OsString::from(std::ffi::OsStr::from_bytes(name.to_bytes())));
            let ours = name.as_deref().is_some_and(|name| {
                !in_blobs && (name == LOG_FILE || name == PROBE_FILE || name == WITNESS)
            });
            if ours && !event.events().intersects(ReadFlags::QUEUE_OVERFLOW) {
                continue;
            }
            changed.any = true;
            if let (Some(name), true) = (name, event.events().contains(ReadFlags::MODIFY)) {
                changed.written.push((in_blobs, name));
            }
        }
    }
}

/// A directory's entries by name, each with its size when it was last synced: a file that
/// grew since (a blob still being written when it was listed) is synced again.
type Files = BTreeMap<OsString, u64>;

impl DataDirSync {
    /// Creates the data dir when missing and makes the directory entries that lead to it
    /// durable. Call before sled opens the dir.
    pub fn create_dir(dir: &Path) -> io::Result<()> {
        let mut missing = Vec::new();
        let mut next = Some(dir);
        while let Some(path) = next {
            if path.as_os_str().is_empty() || path.exists() {
                break;
            }
            missing.push(path);
            next = path.parent();
        }
        std::fs::create_dir_all(dir)?;
        // Parents first, so each new entry is durable in a directory that is itself durable.
        for created in missing.iter().rev() {
            if let Some(parent) = created.parent().filter(|p| !p.as_os_str().is_empty()) {
                sync_dir(parent)?;
            }
        }
        Ok(())
    }

    /// Syncs every file and directory sled has in `dir` (after sled opened it), and keeps the
    /// log open for the syncs that follow each flush.
    pub fn open(dir: &Path) -> io::Result<DataDirSync> {
        let log = File::open(dir.join(LOG_FILE))?;
        // Watched before the first listing, so nothing changed after it goes unseen.
        let changes = Changes::watch(dir)?;
        let mut sync = DataDirSync {
            dir: dir.to_owned(),
            log,
            dir_entries: Files::new(),
            blob_entries: Files::new(),
            changes,
            relist: false,
        };
        sync.log.sync_data()?;
        sync.sync_listed()?;
        Ok(sync)
    }

    /// Makes everything sled wrote before this call durable: call right after `Db::flush`.
    pub fn sync(&mut self) -> io::Result<()> {
        self.log.sync_data()?;
        let changed = self.changes.read();
        if !changed.any && !self.relist {
            return Ok(());
        }
        for (in_blobs, name) in changed.written {
            let entries = if in_blobs {
                &mut self.blob_entries
            } else {
                &mut self.dir_entries
            };
            // Written since it was synced: its size no longer vouches for it.
            if let Some(size) = entries.get_mut(&name) {
                *size = u64::MAX;
            }
        }
        self.relist = true;
        self.sync_listed()?;
        self.relist = false;
        Ok(())
    }

    /// Syncs every file of the data dir and the blob dir that is new or grew, and each
    /// directory whose entries changed.
    fn sync_listed(&mut self) -> io::Result<()> {
        sync_entries(&self.dir.join(BLOB_DIR), &mut self.blob_entries)?;
        // Beside the log: sled's `conf` (written unsynced) and its snapshots.
        sync_entries(&self.dir, &mut self.dir_entries)
    }
}

/// The group-commit flusher of a sled database in `dir`: each flush is sled's (which ends in
/// `sync_file_range`), then `DataDirSync::sync`, so what it acknowledges survives a power cut.
/// Syncs everything already in `dir` first.
///
/// The witness (`witness.rs`; `None` for the benchmark's sled-alone baseline) rides on the
/// same group commit: the records applied before the
/// flush are taken first, the ring is synced before sled flushes when a deletion's "absent"
/// slot waits (or every `witness::PRESENT_SYNC_INTERVAL` for the rest), and the taken records'
/// "present" slots are written once the flush made them durable.
pub fn start_flusher(
    db: &sled::Db,
    dir: &Path,
    witness: Option<std::sync::Arc<super::witness::Witness>>,
) -> io::Result<Flusher> {
    let mut disk = DataDirSync::open(dir)?;
    let db = db.clone();
    let witnessing = |error: io::Error| format!("cannot write the witness: {error}");
    Flusher::start(Box::new(move || {
        let durable_now = witness.as_ref().map(|witness| witness.take_queued());
        if let Some(witness) = &witness {
            witness.sync_before_flush().map_err(witnessing)?;
        }
        db.flush().map_err(|e| e.to_string())?;
        disk.sync()
            .map_err(|error| format!("cannot sync the data dir: {error}"))?;
        match (&witness, durable_now) {
            (Some(witness), Some(durable_now)) => witness.write(&durable_now).map_err(witnessing),
            _ => Ok(()),
        }
    }))
}

/// Syncs each file of `dir` that is new or has grown since `synced` was taken (the log is
/// synced on its own), then the directory itself when its entries changed.
fn sync_entries(dir: &Path, synced: &mut Files) -> io::Result<()> {
    // Sizes are read before the syncs, so a file that grows meanwhile is synced again later.
    let now = entries(dir)?;
    for (name, size) in &now {
        if name != LOG_FILE && synced.get(name) != Some(size) {
            sync_file(&dir.join(name))?;
        }
    }
    let renamed = !now.keys().eq(synced.keys());
    if renamed {
        sync_dir(dir)?;
    }
    *synced = now;
    Ok(())
}

/// The regular files and directories in `dir` with their sizes (0 for a directory), less the
/// readiness probe.
fn entries(dir: &Path) -> io::Result<Files> {
    let mut files = Files::new();
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let name = entry.file_name();
        if name == PROBE_FILE || name == WITNESS {
            continue;
        }
        let size = match entry.metadata() {
            Ok(metadata) if metadata.is_file() => metadata.len(),
            Ok(_) => 0,
            // Removed since it was listed: it needs no sync.
            Err(error) if error.kind() == io::ErrorKind::NotFound => continue,
            Err(error) => return Err(error),
        };
        files.insert(name, size);
    }
    Ok(files)
}

/// `fdatasync` of a file that may have been removed since it was listed (sled removes old
/// snapshots and blobs): a file that is gone needs no sync.
pub(super) fn sync_file(path: &Path) -> io::Result<()> {
    match File::open(path) {
        Ok(file) => file.sync_data(),
        Err(error) if error.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(error) => Err(error),
    }
}

/// `fsync` of a directory: makes its entries (creations, renames, removals) durable.
pub(super) fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}
