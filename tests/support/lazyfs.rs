//! A power-cut filesystem for tests, after Jepsen's LazyFS: a FUSE mount that keeps what a
//! program writes in memory, as a kernel's page cache would, and passes it through to a
//! backing directory only when the program syncs it. `fsync`/`fdatasync` of a file writes its
//! dirty pages to the backing copy of that file; `fsync` of a directory writes that
//! directory's entries. A power cut (`LazyFs::cut`) unmounts and drops everything else: every
//! byte not yet synced, every creation, rename or removal whose directory was not synced. The
//! filesystem is then mounted again from the backing directory alone, so nothing the program
//! did not sync can survive. `sync_file_range` never reaches a FUSE filesystem (it only
//! starts the kernel's writeback, and files here are opened for direct I/O, with no page
//! cache): it saves nothing, as on a disk with a volatile cache that a cut empties.
//!
//! Backing layout: `files/<inode>` holds a file's synced bytes, `dirs/<inode>` a directory's
//! synced entries, one `<inode> <d|f> <name as hex>` line each; the root is inode 1.

#![allow(clippy::unwrap_used)] // A test helper: a poisoned lock is a failed test.

use fuser::{
    BackgroundSession, Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation,
    INodeNo, OpenFlags, RenameFlags, ReplyAttr, ReplyCreate, ReplyData, ReplyDirectory, ReplyEmpty,
    ReplyEntry, ReplyOpen, ReplyStatfs, ReplyWrite, Request, TimeOrNow, WriteFlags,
};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::ffi::{OsStr, OsString};
use std::io::Write;
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

/// The unit in which unsynced writes are tracked and written back, as a page cache's pages.
const PAGE_BYTES: u64 = 4096;
/// The kernel asks again for every attribute and name: sizes change under it with direct I/O.
const TTL: Duration = Duration::ZERO;

enum Kind {
    File {
        data: Vec<u8>,
        /// Pages written since the last sync.
        dirty: BTreeSet<u64>,
        /// The smallest size the file was cut to since the last sync, if it shrank.
        shrunk_to: Option<u64>,
    },
    Dir {
        entries: BTreeMap<OsString, u64>,
    },
}

struct Inode {
    kind: Kind,
    perm: u16,
    mtime: SystemTime,
}

/// What a cut dropped and what the syncs kept, for the test's report.
#[derive(Debug, Default, Clone, Copy)]
pub struct Counts {
    /// `fsync`/`fdatasync` calls on files.
    pub file_syncs: u64,
    /// `fsync` calls on directories.
    pub dir_syncs: u64,
    /// Dirty pages dropped by cuts.
    pub pages_lost: u64,
}

struct State {
    backing: PathBuf,
    inodes: HashMap<u64, Inode>,
    next_inode: u64,
    counts: Counts,
}

/// The filesystem the FUSE session serves; the test keeps a handle on its state.
struct LazyFsServer(Arc<Mutex<State>>);

/// A mounted power-cut filesystem.
pub struct LazyFs {
    state: Arc<Mutex<State>>,
    session: Option<BackgroundSession>,
    mountpoint: PathBuf,
}

impl LazyFs {
    /// Mounts at `mountpoint` what `backing` holds (nothing, the first time). Needs root
    /// (or `fusermount3`) and /dev/fuse.
    pub fn mount(backing: &Path, mountpoint: &Path) -> std::io::Result<LazyFs> {
        std::fs::create_dir_all(backing.join("files"))?;
        std::fs::create_dir_all(backing.join("dirs"))?;
        let state = Arc::new(Mutex::new(State::load(backing)?));
        let mut config = fuser::Config::default();
        config.mount_options = vec![
            fuser::MountOption::FSName("idemproxy-lazyfs".into()),
            fuser::MountOption::DefaultPermissions,
        ];
        let session = fuser::spawn_mount(LazyFsServer(state.clone()), mountpoint, &config)?;
        Ok(LazyFs {
            state,
            session: Some(session),
            mountpoint: mountpoint.to_owned(),
        })
    }

    /// The power cut: unmounts, drops everything not synced, and mounts again from what was.
    /// Stop every process using the mount first (a cut stops them all at once).
    pub fn cut(self) -> std::io::Result<LazyFs> {
        let backing = self.backing();
        let counts = self.counts();
        let mountpoint = self.mountpoint.clone();
        drop(self);
        let remounted = LazyFs::mount(&backing, &mountpoint)?;
        remounted.state.lock().unwrap().counts = counts;
        Ok(remounted)
    }

    /// What the syncs and cuts have done so far, counting the pages the next cut drops.
    pub fn counts(&self) -> Counts {
        let state = self.state.lock().unwrap();
        let mut counts = state.counts;
        counts.pages_lost += state
            .inodes
            .values()
            .map(|inode| match &inode.kind {
                Kind::File { dirty, .. } => dirty.len() as u64,
                Kind::Dir { .. } => 0,
            })
            .sum::<u64>();
        counts
    }

    fn backing(&self) -> PathBuf {
        self.state.lock().unwrap().backing.clone()
    }
}

impl Drop for LazyFs {
    fn drop(&mut self) {
        if let Some(session) = self.session.take() {
            let _ = session.umount_and_join();
        }
    }
}

fn now() -> SystemTime {
    SystemTime::now()
}

impl State {
    /// The synced tree in `backing`, reachable from the root; backing files of inodes that
    /// are no longer reachable are removed, so their numbers can be reused.
    fn load(backing: &Path) -> std::io::Result<State> {
        let mut inodes = HashMap::new();
        let mut pending = vec![(1u64, true)];
        while let Some((number, is_dir)) = pending.pop() {
            let kind = if is_dir {
                let mut entries = BTreeMap::new();
                let listing = read_or_empty(&backing.join("dirs").join(number.to_string()))?;
                for line in String::from_utf8_lossy(&listing).lines() {
                    let mut parts = line.split(' ');
                    let (Some(child), Some(kind), Some(name)) =
                        (parts.next(), parts.next(), parts.next())
                    else {
                        continue;
                    };
                    let child: u64 = child.parse().expect("inode numbers are written whole");
                    entries.insert(OsString::from_vec(unhex(name)), child);
                    pending.push((child, kind == "d"));
                }
                Kind::Dir { entries }
            } else {
                Kind::File {
                    data: read_or_empty(&backing.join("files").join(number.to_string()))?,
                    dirty: BTreeSet::new(),
                    shrunk_to: None,
                }
            };
            let perm = if is_dir { 0o755 } else { 0o644 };
            inodes.insert(
                number,
                Inode {
                    kind,
                    perm,
                    mtime: now(),
                },
            );
        }
        for area in ["files", "dirs"] {
            for entry in std::fs::read_dir(backing.join(area))? {
                let entry = entry?;
                let number = entry.file_name().to_string_lossy().parse::<u64>().ok();
                if !number.is_some_and(|n| inodes.contains_key(&n)) {
                    std::fs::remove_file(entry.path())?;
                }
            }
        }
        let next_inode = inodes.keys().max().copied().unwrap_or(1) + 1;
        Ok(State {
            backing: backing.to_owned(),
            inodes,
            next_inode,
            counts: Counts::default(),
        })
    }

    fn attr(&self, number: u64) -> Option<FileAttr> {
        let inode = self.inodes.get(&number)?;
        let (kind, size, nlink) = match &inode.kind {
            Kind::File { data, .. } => (FileType::RegularFile, data.len() as u64, 1),
            Kind::Dir { .. } => (FileType::Directory, 0, 2),
        };
        Some(FileAttr {
            ino: INodeNo(number),
            size,
            blocks: size.div_ceil(512),
            atime: inode.mtime,
            mtime: inode.mtime,
            ctime: inode.mtime,
            crtime: inode.mtime,
            kind,
            perm: inode.perm,
            nlink,
            uid: 0,
            gid: 0,
            rdev: 0,
            blksize: PAGE_BYTES as u32,
            flags: 0,
        })
    }

    /// A directory or, for anything else (a file, or an inode a cut forgot), a regular file.
    fn file_type(&self, number: u64) -> FileType {
        match self.inodes.get(&number).map(|inode| &inode.kind) {
            Some(Kind::Dir { .. }) => FileType::Directory,
            _ => FileType::RegularFile,
        }
    }

    fn entries_mut(&mut self, dir: u64) -> Result<&mut BTreeMap<OsString, u64>, Errno> {
        match self.inodes.get_mut(&dir).map(|inode| &mut inode.kind) {
            Some(Kind::Dir { entries }) => Ok(entries),
            Some(Kind::File { .. }) => Err(Errno::ENOTDIR),
            None => Err(Errno::ENOENT),
        }
    }

    fn child(&mut self, dir: u64, name: &OsStr) -> Result<u64, Errno> {
        self.entries_mut(dir)?
            .get(name)
            .copied()
            .ok_or(Errno::ENOENT)
    }

    /// A new inode named `name` in `dir`; its backing file, if an old one is left, goes.
    fn create(&mut self, dir: u64, name: &OsStr, kind: Kind, mode: u32) -> Result<u64, Errno> {
        if self.entries_mut(dir)?.contains_key(name) {
            return Err(Errno::EEXIST);
        }
        let number = self.next_inode;
        self.next_inode += 1;
        for area in ["files", "dirs"] {
            let _ = std::fs::remove_file(self.backing.join(area).join(number.to_string()));
        }
        self.inodes.insert(
            number,
            Inode {
                kind,
                perm: (mode & 0o7777) as u16,
                mtime: now(),
            },
        );
        self.entries_mut(dir)?.insert(name.to_owned(), number);
        self.touch(dir);
        Ok(number)
    }

    fn touch(&mut self, number: u64) {
        if let Some(inode) = self.inodes.get_mut(&number) {
            inode.mtime = now();
        }
    }

    /// `fsync` of a file: its dirty pages and its size reach the backing copy.
    fn sync_file(&mut self, number: u64) -> std::io::Result<()> {
        let path = self.backing.join("files").join(number.to_string());
        let Some(Inode {
            kind:
                Kind::File {
                    data,
                    dirty,
                    shrunk_to,
                },
            ..
        }) = self.inodes.get_mut(&number)
        else {
            return Ok(());
        };
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(path)?;
        if let Some(size) = shrunk_to.take() {
            file.set_len(size)?;
        }
        let size = data.len() as u64;
        for page in std::mem::take(dirty) {
            let start = page * PAGE_BYTES;
            if start < size {
                let end = (start + PAGE_BYTES).min(size);
                file.write_all_at(&data[start as usize..end as usize], start)?;
            }
        }
        file.set_len(size)?;
        self.counts.file_syncs += 1;
        Ok(())
    }

    /// `fsync` of a directory: its entries, as they are now, reach the backing copy.
    fn sync_dir(&mut self, number: u64) -> std::io::Result<()> {
        let Some(Inode {
            kind: Kind::Dir { entries },
            ..
        }) = self.inodes.get(&number)
        else {
            return Ok(());
        };
        let mut listing = Vec::new();
        for (name, child) in entries {
            let kind = match self.file_type(*child) {
                FileType::Directory => "d",
                _ => "f",
            };
            writeln!(listing, "{child} {kind} {}", hex(name.as_bytes()))?;
        }
        let path = self.backing.join("dirs").join(number.to_string());
        let staged = path.with_extension("new");
        std::fs::write(&staged, listing)?;
        std::fs::rename(staged, path)?;
        self.counts.dir_syncs += 1;
        Ok(())
    }

    fn write(&mut self, number: u64, offset: u64, bytes: &[u8]) -> Result<(), Errno> {
        let Some(Kind::File { data, dirty, .. }) =
            self.inodes.get_mut(&number).map(|inode| &mut inode.kind)
        else {
            return Err(Errno::EISDIR);
        };
        let end = offset as usize + bytes.len();
        if data.len() < end {
            data.resize(end, 0);
        }
        data[offset as usize..end].copy_from_slice(bytes);
        if !bytes.is_empty() {
            dirty.extend(offset / PAGE_BYTES..=(end as u64 - 1) / PAGE_BYTES);
        }
        self.touch(number);
        Ok(())
    }

    fn resize(&mut self, number: u64, size: u64) -> Result<(), Errno> {
        let Some(Kind::File {
            data, shrunk_to, ..
        }) = self.inodes.get_mut(&number).map(|inode| &mut inode.kind)
        else {
            return Err(Errno::EISDIR);
        };
        if size < data.len() as u64 {
            *shrunk_to = Some(shrunk_to.map_or(size, |before| before.min(size)));
        }
        data.resize(size as usize, 0);
        self.touch(number);
        Ok(())
    }
}

fn read_or_empty(path: &Path) -> std::io::Result<Vec<u8>> {
    match std::fs::read(path) {
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => Ok(Vec::new()),
        other => other,
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(text: &str) -> Vec<u8> {
    (0..text.len() / 2)
        .filter_map(|i| u8::from_str_radix(&text[2 * i..2 * i + 2], 16).ok())
        .collect()
}

fn io_errno(_: std::io::Error) -> Errno {
    Errno::EIO
}

impl LazyFsServer {
    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.0.lock().unwrap()
    }

    fn reply_entry(&self, state: &State, number: Result<u64, Errno>, reply: ReplyEntry) {
        match number.and_then(|n| state.attr(n).ok_or(Errno::ENOENT)) {
            Ok(attr) => reply.entry(&TTL, &attr, Generation(0)),
            Err(errno) => reply.error(errno),
        }
    }
}

impl Filesystem for LazyFsServer {
    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        let mut state = self.state();
        let child = state.child(parent.0, name);
        self.reply_entry(&state, child, reply);
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        match self.state().attr(ino.0) {
            Some(attr) => reply.attr(&TTL, &attr),
            None => reply.error(Errno::ENOENT),
        }
    }

    fn setattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        _uid: Option<u32>,
        _gid: Option<u32>,
        size: Option<u64>,
        _atime: Option<TimeOrNow>,
        _mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        _fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        let mut state = self.state();
        if let Some(size) = size {
            if let Err(errno) = state.resize(ino.0, size) {
                return reply.error(errno);
            }
        }
        if let (Some(mode), Some(inode)) = (mode, state.inodes.get_mut(&ino.0)) {
            inode.perm = (mode & 0o7777) as u16;
        }
        match state.attr(ino.0) {
            Some(attr) => reply.attr(&TTL, &attr),
            None => reply.error(Errno::ENOENT),
        }
    }

    fn mkdir(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        _umask: u32,
        reply: ReplyEntry,
    ) {
        let mut state = self.state();
        let dir = Kind::Dir {
            entries: BTreeMap::new(),
        };
        let created = state.create(parent.0, name, dir, mode);
        self.reply_entry(&state, created, reply);
    }

    fn create(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        _umask: u32,
        _flags: i32,
        reply: ReplyCreate,
    ) {
        let mut state = self.state();
        let file = Kind::File {
            data: Vec::new(),
            dirty: BTreeSet::new(),
            shrunk_to: None,
        };
        match state
            .create(parent.0, name, file, mode)
            .and_then(|n| state.attr(n).ok_or(Errno::ENOENT))
        {
            Ok(attr) => reply.created(
                &TTL,
                &attr,
                Generation(0),
                FileHandle(0),
                FopenFlags::FOPEN_DIRECT_IO,
            ),
            Err(errno) => reply.error(errno),
        }
    }

    fn unlink(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let mut state = self.state();
        // The inode stays while a process may still hold it open; a cut forgets it.
        match state
            .entries_mut(parent.0)
            .map(|entries| entries.remove(name))
        {
            Ok(Some(_)) => {
                state.touch(parent.0);
                reply.ok()
            }
            Ok(None) => reply.error(Errno::ENOENT),
            Err(errno) => reply.error(errno),
        }
    }

    fn rmdir(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let mut state = self.state();
        let removed = state.child(parent.0, name).and_then(|child| {
            match state.entries_mut(child) {
                Ok(entries) if !entries.is_empty() => return Err(Errno::ENOTEMPTY),
                Ok(_) => {}
                Err(errno) => return Err(errno),
            }
            state.entries_mut(parent.0)?.remove(name);
            Ok(())
        });
        match removed {
            Ok(()) => reply.ok(),
            Err(errno) => reply.error(errno),
        }
    }

    fn rename(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        newparent: INodeNo,
        newname: &OsStr,
        flags: RenameFlags,
        reply: ReplyEmpty,
    ) {
        let mut state = self.state();
        let renamed = state.child(parent.0, name).and_then(|child| {
            let taken = state.entries_mut(newparent.0)?.contains_key(newname);
            if flags.contains(RenameFlags::RENAME_NOREPLACE) && taken {
                return Err(Errno::EEXIST);
            }
            state.entries_mut(parent.0)?.remove(name);
            state
                .entries_mut(newparent.0)?
                .insert(newname.to_owned(), child);
            Ok(())
        });
        match renamed {
            Ok(()) => {
                state.touch(parent.0);
                state.touch(newparent.0);
                reply.ok()
            }
            Err(errno) => reply.error(errno),
        }
    }

    fn open(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        if self.state().inodes.contains_key(&ino.0) {
            // Direct I/O: no page cache in the kernel holds what a cut must drop.
            reply.opened(FileHandle(0), FopenFlags::FOPEN_DIRECT_IO);
        } else {
            reply.error(Errno::ENOENT);
        }
    }

    fn read(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<fuser::LockOwner>,
        reply: ReplyData,
    ) {
        let state = self.state();
        match state.inodes.get(&ino.0).map(|inode| &inode.kind) {
            Some(Kind::File { data, .. }) => {
                let start = (offset as usize).min(data.len());
                let end = (start + size as usize).min(data.len());
                reply.data(&data[start..end]);
            }
            Some(Kind::Dir { .. }) => reply.error(Errno::EISDIR),
            None => reply.error(Errno::ENOENT),
        }
    }

    fn write(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<fuser::LockOwner>,
        reply: ReplyWrite,
    ) {
        match self.state().write(ino.0, offset, data) {
            Ok(()) => reply.written(data.len() as u32),
            Err(errno) => reply.error(errno),
        }
    }

    fn flush(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _lock_owner: fuser::LockOwner,
        reply: ReplyEmpty,
    ) {
        // close(2) saves nothing: only a sync does.
        reply.ok();
    }

    fn fsync(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        // A directory's fsync arrives as `fsyncdir`.
        match self.state().sync_file(ino.0).map_err(io_errno) {
            Ok(()) => reply.ok(),
            Err(errno) => reply.error(errno),
        }
    }

    fn readdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        let mut state = self.state();
        let children = match state.entries_mut(ino.0) {
            Ok(entries) => entries.clone(),
            Err(errno) => return reply.error(errno),
        };
        let mut all = vec![
            (ino.0, FileType::Directory, OsString::from(".")),
            (ino.0, FileType::Directory, OsString::from("..")),
        ];
        all.extend(
            children
                .into_iter()
                .map(|(name, child)| (child, state.file_type(child), name)),
        );
        for (index, (child, kind, name)) in all.into_iter().enumerate().skip(offset as usize) {
            if reply.add(INodeNo(child), index as u64 + 1, kind, name) {
                break;
            }
        }
        reply.ok();
    }

    fn fsyncdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        match self.state().sync_dir(ino.0).map_err(io_errno) {
            Ok(()) => reply.ok(),
            Err(errno) => reply.error(errno),
        }
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        let blocks = 1 << 24;
        reply.statfs(blocks, blocks, blocks, 1 << 20, 1 << 20, 4096, 255, 4096);
    }
}
