//! Power-cut durability of the sled data dir: fsync what sled only `sync_file_range`s.
//!
//! sled 0.34 makes its log "durable" with `sync_file_range`, which reaches neither the
//! device's volatile write cache nor the file's metadata, writes its blob files (large pages)
//! with no sync at all, and never syncs a directory after creating, renaming or removing an
//! entry. After a power cut, a claim or an outcome acknowledged on sled's word alone can be
//! gone. `DataDirSync::sync` runs after each of sled's flushes, on the flusher thread (one call
//! per group commit): `fdatasync` of the log, `fdatasync` of each blob file not yet synced,
//! and an `fsync` of a directory whose entries changed since its last sync. Opening syncs
//! everything once, and the directory entries that lead to the data dir, so nothing written
//! before this process (an older release, a crash during a first start) is left unsynced.
//! It never writes a byte of its own into the data dir.

use super::flusher::Flusher;
use std::collections::BTreeMap;
use std::ffi::OsString;
use std::fs::File;
use std::io;
use std::path::{Path, PathBuf};

/// sled's log file inside the data dir.
const LOG_FILE: &str = "db";
/// sled's directory of blob files (pages too large for the log).
const BLOB_DIR: &str = "blobs";
/// The readiness probe's file (`SledStore::check`): created and removed every second, never
/// anything a record depends on, so it is not a reason to sync the directory.
pub const PROBE_FILE: &str = ".idemproxy-ready";

/// What of the data dir has been synced, and the open log to `fdatasync`.
pub struct DataDirSync {
    dir: PathBuf,
    log: File,
    /// Entries of the data dir at its last sync, with the size each file had then.
    dir_entries: Files,
    /// Entries of the blob dir at its last sync, with the size each file had then.
    blob_entries: Files,
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
        let mut sync = DataDirSync {
            dir: dir.to_owned(),
            log,
            dir_entries: Files::new(),
            blob_entries: Files::new(),
        };
        sync.sync()?;
        Ok(sync)
    }

    /// Makes everything sled wrote before this call durable: call right after `Db::flush`.
    pub fn sync(&mut self) -> io::Result<()> {
        self.log.sync_data()?;
        sync_entries(&self.dir.join(BLOB_DIR), &mut self.blob_entries)?;
        // Beside the log: sled's `conf` (written unsynced) and its snapshots.
        sync_entries(&self.dir, &mut self.dir_entries)
    }
}

/// The group-commit flusher of a sled database in `dir`: each flush is sled's (which ends in
/// `sync_file_range`), then `DataDirSync::sync`, so what it acknowledges survives a power cut.
/// Syncs everything already in `dir` first.
pub fn start_flusher(db: &sled::Db, dir: &Path) -> io::Result<Flusher> {
    let mut disk = DataDirSync::open(dir)?;
    let db = db.clone();
    Flusher::start(Box::new(move || {
        db.flush().map_err(|e| e.to_string())?;
        disk.sync()
            .map_err(|error| format!("cannot sync the data dir: {error}"))
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
        if name == PROBE_FILE {
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
