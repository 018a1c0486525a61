//! A damaged data dir is never served as if nothing happened (issue 31, item 1). sled opens a
//! `db` with a flipped byte, cut short or deleted (`blobs/` and `slices/` left as they were)
//! without complaint and serves what it recovered: the keys it lost ran again (100 of 205
//! recorded charges in one trial; 4 of 5 large answers after a flipped byte in a blob file).
//! Each kind of damage here is done to a data dir the real binary wrote and was killed on; the
//! next start must refuse it, naming what to do, and run nothing again. Then the operator
//! accepts the loss (`idemproxy accept-loss`) and the sidecar starts.

// A failed unwrap is a failed test.
#![allow(clippy::unwrap_used)]

mod support;

use std::path::Path;
use support::{add, apply, binary, client, ledger};

/// Keys recorded before the damage, one small answer each.
const KEYS: usize = 200;

/// Records `KEYS` keys (and, with `large`, five answers big enough for blob files) through
/// the binary on `dir`, then kills it: the data dir as a crash leaves it.
async fn record(upstream: &ledger::LedgerHandle, dir: &Path, large: bool) {
    let sidecar = binary::start(&binary::run_args(upstream.addr, dir, &[])).await;
    let mut caller = client(sidecar.addr).await;
    for n in 0..KEYS {
        let key = format!("charge-{n}");
        apply(&mut caller, add(&key, 1), Some(&key), None)
            .await
            .expect("recorded");
    }
    if large {
        for n in 0..5 {
            let key = format!("large-{n}");
            let mut request = add(&key, 1);
            request.reply_padding_bytes = 600 << 10;
            apply(&mut caller, request, Some(&key), None)
                .await
                .expect("recorded");
        }
    }
    sidecar.kill().await;
}

/// `idemproxy run` on `dir`: its exit code and standard error when it stops by itself within
/// a few seconds, `None` when it starts serving.
async fn start_refused(upstream: &ledger::LedgerHandle, dir: &Path) -> Option<(i32, String)> {
    let output = tokio::process::Command::new(binary::path())
        .arg("run")
        .args(binary::run_args(upstream.addr, dir, &[]))
        .env("IDEMPROXY_ADMIN_LISTEN", "127.0.0.1:0")
        .env("IDEMPROXY_OPS_LISTEN", "127.0.0.1:0")
        .kill_on_drop(true)
        .output();
    match tokio::time::timeout(std::time::Duration::from_secs(20), output).await {
        Ok(output) => {
            let output = output.expect("the binary runs");
            Some((
                output.status.code().unwrap_or(-1),
                String::from_utf8_lossy(&output.stderr).into_owned(),
            ))
        }
        Err(_) => None,
    }
}

/// Damages `dir` with `damage`, checks that the start is refused and that nothing ran again,
/// then accepts the loss and checks that the sidecar starts.
async fn refused_after(what: &str, large: bool, damage: impl FnOnce(&Path)) {
    let upstream = ledger::start().await;
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    record(&upstream, &data, large).await;
    let executed = upstream.state.executions();
    damage(&data);
    let (code, stderr) = start_refused(&upstream, &data)
        .await
        .unwrap_or_else(|| panic!("{what}: the damaged store was served"));
    assert_ne!(code, 0, "{what}: {stderr}");
    assert!(
        stderr.contains("accept-loss"),
        "{what}: says what to do: {stderr}"
    );
    assert_eq!(
        upstream.state.executions(),
        executed,
        "{what}: nothing ran again"
    );
    let accepted = std::process::Command::new(binary::path())
        .args(["accept-loss", "--data-dir"])
        .arg(&data)
        .output()
        .unwrap();
    assert!(accepted.status.success(), "{what}: accept-loss");
    let sidecar = binary::start(&binary::run_args(upstream.addr, &data, &[])).await;
    sidecar.kill().await;
}

fn flip_byte(path: &Path, at: u64) {
    use std::os::unix::fs::FileExt;
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .unwrap();
    let mut byte = [0u8];
    file.read_exact_at(&mut byte, at).unwrap();
    file.write_all_at(&[byte[0] ^ 0x55], at).unwrap();
    file.sync_all().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_log_with_a_flipped_byte_is_refused() {
    refused_after("a flipped byte in db", false, |data| {
        let log = data.join("db");
        let size = std::fs::metadata(&log).unwrap().len();
        flip_byte(&log, size / 2);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_log_cut_short_is_refused() {
    refused_after("db cut short", false, |data| {
        let log = data.join("db");
        let size = std::fs::metadata(&log).unwrap().len();
        let file = std::fs::OpenOptions::new().write(true).open(&log).unwrap();
        file.set_len(size / 2).unwrap();
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deleted_log_beside_the_rest_of_the_dir_is_refused() {
    refused_after("db deleted", true, |data| {
        std::fs::remove_file(data.join("db")).unwrap();
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_blob_with_a_flipped_byte_is_refused() {
    refused_after("a flipped byte in a blob", true, |data| {
        let mut blobs: Vec<_> = std::fs::read_dir(data.join("blobs"))
            .unwrap()
            .map(|entry| entry.unwrap().path())
            .collect();
        assert!(!blobs.is_empty(), "the large answers went to blob files");
        blobs.sort();
        for blob in blobs {
            let size = std::fs::metadata(&blob).unwrap().len();
            flip_byte(&blob, size / 2);
        }
    })
    .await;
}
