//! A tmpfs mounted for one test (needs root, as on CI), unmounted when dropped.

use std::io::Write;
use std::path::PathBuf;
use std::process::Command;

/// A tmpfs mounted for one test, unmounted when dropped.
pub struct Tmpfs {
    pub path: PathBuf,
    _parent: tempfile::TempDir,
}

impl Tmpfs {
    pub fn mount(size: &str) -> Tmpfs {
        let parent = tempfile::tempdir().unwrap();
        let path = parent.path().join("fs");
        std::fs::create_dir(&path).unwrap();
        let status = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(&path)
            .status()
            .expect("runs mount");
        assert!(
            status.success(),
            "mounting a tmpfs needs root (this test fills a real disk)"
        );
        Tmpfs {
            path,
            _parent: parent,
        }
    }
}

impl Tmpfs {
    /// Writes a file until the file system is full; returns its path.
    pub fn fill(&self) -> PathBuf {
        let path = self.path.join("filler");
        let mut file = std::fs::File::create(&path).unwrap();
        let chunk = vec![0u8; 64 << 10];
        loop {
            if let Err(error) = file.write_all(&chunk).and_then(|()| file.sync_all()) {
                assert_eq!(
                    error.raw_os_error(),
                    Some(28),
                    "filled until ENOSPC: {error}"
                );
                break;
            }
        }
        // Small writes until not even a byte fits.
        while file.write_all(&[0]).and_then(|()| file.sync_all()).is_ok() {}
        path
    }

    /// Fills the file system, then frees `free_bytes` of it again.
    pub fn fill_leaving(&self, free_bytes: u64) {
        let path = self.fill();
        let file = std::fs::OpenOptions::new().write(true).open(path).unwrap();
        let len = file.metadata().unwrap().len();
        file.set_len(len.saturating_sub(free_bytes)).unwrap();
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.path).status();
    }
}
