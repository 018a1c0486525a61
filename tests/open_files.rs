//! Client sockets never starve the store of file descriptors (issue 31, item 2). With the
//! common soft limit of 1,024 open files, 1,100 idle TCP connections made the store's next
//! file open fail with EMFILE, and a failed store write refuses every new key until a
//! restart. Now the soft limit is raised to the hard one, and the proxy holds at most
//! `--max-connections` (by default what the limit leaves after 256 descriptors kept for the
//! store and the other listeners).

// A failed unwrap is a failed test.
#![allow(clippy::unwrap_used)]

mod support;

use std::time::Duration;
use support::{add, apply, binary, client, ledger, was_replayed};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_idle_connections_leaves_the_store_its_files() {
    let upstream = ledger::start().await;
    let dir = tempfile::tempdir().unwrap();
    let args = binary::run_args(upstream.addr, dir.path(), &[]);
    // The soft limit many hosts start processes with, under a higher hard one.
    let sidecar = binary::start_under(&["prlimit", "--nofile=1024:4096"], &args, &[]).await;
    let mut caller = client(sidecar.addr).await;
    apply(&mut caller, add("before", 1), Some("before"), None)
        .await
        .expect("served before the flood");
    // More idle connections than the soft limit, as the attack did.
    let mut flood = Vec::new();
    for _ in 0..1_100 {
        let connect = tokio::net::TcpStream::connect(sidecar.addr);
        match tokio::time::timeout(Duration::from_secs(5), connect).await {
            Ok(Ok(stream)) => flood.push(stream),
            Ok(Err(_)) | Err(_) => break,
        }
    }
    assert!(
        flood.len() > 1_024,
        "{} connections: not a flood",
        flood.len()
    );
    // An answer large enough for a blob file of its own: the store opens a new file.
    let mut large = add("large", 1);
    large.reply_padding_bytes = 600 << 10;
    apply(&mut caller, large.clone(), Some("large"), None)
        .await
        .expect("a keyed call is recorded during the flood");
    drop(flood);
    // After the flood, new connections and new keys are served, and what was recorded
    // during it is replayed.
    let mut after = client(sidecar.addr).await;
    let replay = apply(&mut after, large, Some("large"), None)
        .await
        .expect("replayed after the flood");
    assert!(was_replayed(&replay));
    apply(&mut after, add("after", 1), Some("after"), None)
        .await
        .expect("a new key is recorded after the flood");
    assert_eq!(upstream.state.executions(), 3, "each key ran once");
    assert!(upstream.state.executed_twice().is_empty());
}

#[tokio::test]
async fn connections_that_would_not_leave_the_store_its_files_stop_the_start() {
    let dir = tempfile::tempdir().unwrap();
    let output = std::process::Command::new("prlimit")
        .arg("--nofile=1024:1024")
        .arg(binary::path())
        .arg("run")
        .args(binary::run_args(
            "127.0.0.1:1".parse().unwrap(),
            dir.path(),
            &["--max-connections", "900"],
        ))
        .env("IDEMPROXY_ADMIN_LISTEN", "127.0.0.1:0")
        .env("IDEMPROXY_OPS_LISTEN", "127.0.0.1:0")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_ne!(output.status.code(), Some(0), "{stderr}");
    assert!(stderr.contains("--max-connections 900"), "{stderr}");
}
