//! Files an operator names in the settings (config, encryption keys, tokens, passwords,
//! certificates, descriptor sets), read with a bound on their size.
//!
//! A setting pointed at the wrong path (`/dev/zero`, a log, a disk image) must stop the start
//! with a message naming the file, never read until memory runs out. This module never
//! decides what a file means: it only reads it, bounded.

use std::io::Read as _;
use std::path::Path;

/// The largest small file: a token, a password, an encryption key file.
pub const SECRET_BYTES_MAX: u64 = 64 * 1024;

/// The largest config file, certificate or CA bundle.
pub const TEXT_BYTES_MAX: u64 = 4 * 1024 * 1024;

/// The largest descriptor set.
pub const DESCRIPTORS_BYTES_MAX: u64 = 64 * 1024 * 1024;

/// The bytes of `path`, or an error when it holds more than `bytes_max`.
pub fn read(path: &Path, bytes_max: u64) -> std::io::Result<Vec<u8>> {
    let file = std::fs::File::open(path)?;
    let mut bytes = Vec::new();
    // One byte past the bound tells a file at the bound from one over it.
    file.take(bytes_max + 1).read_to_end(&mut bytes)?;
    if bytes.len() as u64 > bytes_max {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("holds more than {bytes_max} bytes: is it the file meant?"),
        ));
    }
    Ok(bytes)
}

/// The text of `path` (UTF-8), bounded as `read`.
pub fn read_text(path: &Path, bytes_max: u64) -> std::io::Result<String> {
    String::from_utf8(read(path, bytes_max)?)
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::InvalidData, "is not UTF-8 text"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_file_at_the_bound_is_read_and_one_past_it_is_refused() {
        let dir = tempfile::tempdir().expect("a temp dir");
        let path = dir.path().join("token");
        std::fs::write(&path, [b'a'; 16]).expect("written");
        assert_eq!(read(&path, 16).expect("at the bound").len(), 16);
        let refused = read(&path, 15).expect_err("past the bound");
        assert!(
            refused.to_string().contains("more than 15 bytes"),
            "{refused}"
        );
    }

    #[test]
    fn an_endless_device_is_refused_not_read_forever() {
        let refused = read(Path::new("/dev/zero"), SECRET_BYTES_MAX).expect_err("refused");
        assert_eq!(refused.kind(), std::io::ErrorKind::InvalidData);
    }
}
