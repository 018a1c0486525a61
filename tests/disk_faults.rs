//! I/O errors injected into the real binary with libfiu (Debian's fiu-utils): once the
//! sidecar is serving, 3 % of its `pwrite`s and `fsync`/`fdatasync`s fail while callers send
//! fresh keys and retries. Expected: no panic; every refusal is UNAVAILABLE /
//! IDEMPOTENCY_STORE_UNAVAILABLE, UNKNOWN / IDEMPOTENCY_OUTCOME_NOT_RECORDED (the call ran, its
//! outcome's write failed), or a key left IN_DOUBT / still IN_FLIGHT; nothing forwarded twice; and after a restart without faults, every answer a caller received is replayed.

#![allow(clippy::unwrap_used)] // Test code: a failed unwrap is a failed test.

mod support;

use idemproxy::pb::idemproxy::testing::v1::ApplyReply;
use std::collections::HashMap;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use support::{add, apply, client, ledger, reason, was_replayed};

const FAILPOINTS: [&str; 3] = [
    "posix/io/rw/pwrite",
    "posix/io/sync/fsync",
    "posix/io/sync/fdatasync",
];
/// Keys answered before the faults start; every caller retries them under the faults.
const WARM_KEYS: usize = 10;

fn fiu_ctrl(pid: u32, command: &str) {
    let status = std::process::Command::new("fiu-ctrl")
        .args(["-c", command, &pid.to_string()])
        .status()
        .expect("fiu-ctrl runs (scripts/test installs fiu-utils)");
    assert!(status.success(), "fiu-ctrl -c {command:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn injected_write_and_fsync_errors_fail_closed_and_lose_no_answer() {
    let upstream = ledger::start().await;
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let log_path = dir.path().join("stderr.log");
    let addr = support::http::free_addr();
    let ops = support::http::free_addr();
    let run = |program: &str, prefix: &[&str]| {
        let mut command = tokio::process::Command::new(program);
        command
            .args(prefix)
            .arg(support::binary::path())
            .args(["run", "--listen", &addr.to_string(), "--upstream"])
            .arg(format!("http://{}", upstream.addr))
            .arg("--data-dir")
            .arg(&data)
            .args(["--store-timeout", "1s"])
            .env("IDEMPROXY_ADMIN_LISTEN", "127.0.0.1:0")
            .env("IDEMPROXY_OPS_LISTEN", ops.to_string())
            .stdout(Stdio::null())
            .kill_on_drop(true);
        command
    };
    let mut faulty = run("fiu-run", &["-x"])
        .stderr(std::fs::File::create(&log_path).unwrap())
        .spawn()
        .unwrap();
    let pid = faulty.id().unwrap();
    support::binary::wait_listening(addr).await;

    // Answers given before the faults: the first failed flush stops all acknowledgements, and
    // at 3 % a call it can come before the first answer, so these are what is sure to be
    // replayed (under the faults and after the restart).
    let answers = Arc::new(Mutex::new(HashMap::<String, ApplyReply>::new()));
    let mut before = client(addr).await;
    for n in 0..WARM_KEYS {
        let key = format!("before-{n}");
        let reply = apply(&mut before, add(&key, 1), Some(&key), None).await;
        answers
            .lock()
            .unwrap()
            .insert(key, reply.unwrap().into_inner());
    }
    for name in FAILPOINTS {
        fiu_ctrl(pid, &format!("enable_random name={name},probability=0.03"));
    }

    let refusals = Arc::new(Mutex::new(HashMap::<String, usize>::new()));
    let callers: Vec<_> = (0..8)
        .map(|caller| {
            let (answers, refusals) = (answers.clone(), refusals.clone());
            tokio::spawn(async move {
                let mut client = client(addr).await;
                let mut sent: Vec<String> = (0..WARM_KEYS).map(|n| format!("before-{n}")).collect();
                for n in 0..60 {
                    // Every third call retries an earlier key of this caller.
                    let key = if n % 3 == 2 {
                        sent[n / 2 % sent.len()].clone()
                    } else {
                        format!("k-{caller}-{n}")
                    };
                    sent.push(key.clone());
                    match apply(&mut client, add(&key, 1), Some(&key), None).await {
                        Ok(reply) => {
                            let reply = reply.into_inner();
                            let mut answers = answers.lock().unwrap();
                            if let Some(earlier) = answers.get(&key) {
                                assert_eq!(earlier, &reply, "{key}: another answer than before");
                            }
                            answers.insert(key, reply);
                        }
                        Err(status) => {
                            let why = reason(&status);
                            assert!(
                                [
                                    "IDEMPOTENCY_STORE_UNAVAILABLE",
                                    // The call ran; its outcome's write failed.
                                    "IDEMPOTENCY_OUTCOME_NOT_RECORDED",
                                    "IDEMPOTENCY_OUTCOME_UNKNOWN",
                                    "IDEMPOTENCY_IN_PROGRESS",
                                ]
                                .contains(&why.as_str()),
                                "{key}: {status:?}"
                            );
                            *refusals.lock().unwrap().entry(why).or_insert(0) += 1;
                        }
                    }
                }
                sent
            })
        })
        .collect();
    let mut sent: Vec<String> = Vec::new();
    for caller in callers {
        sent.extend(caller.await.unwrap());
    }
    sent.sort();
    sent.dedup();
    assert!(
        faulty.try_wait().unwrap().is_none(),
        "the sidecar is still running under I/O errors"
    );
    // One flush surely fails (every fdatasync does, for one call): the store takes no more
    // writes until a restart, so liveness fails and the kubelet restarts the container
    // (issue 31, item 2: /livez stayed 200 and the pod refused every new key for good).
    fiu_ctrl(pid, "enable name=posix/io/sync/fdatasync");
    let mut doomed = client(addr).await;
    let failed = apply(&mut doomed, add("doomed", 1), Some("doomed"), None).await;
    assert!(
        failed.is_err(),
        "a call whose flush failed is not acknowledged"
    );
    support::eventually(Duration::from_secs(10), "/livez to fail", || async move {
        support::http::get(ops, "/livez").await.0 == 503
    })
    .await;
    let (_, why) = support::http::get(ops, "/livez").await;
    assert!(why.contains("restart"), "/livez says why: {why}");
    // The faults stop: does the store take writes again without a restart?
    for name in FAILPOINTS {
        fiu_ctrl(pid, &format!("disable name={name}"));
    }
    let mut after = client(addr).await;
    let mut recovered = 0;
    for n in 0..20 {
        let key = format!("after-{n}");
        match apply(&mut after, add(&key, 1), Some(&key), None).await {
            Ok(reply) => {
                recovered += 1;
                answers
                    .lock()
                    .unwrap()
                    .insert(key.clone(), reply.into_inner());
            }
            Err(status) => assert_eq!(reason(&status), "IDEMPOTENCY_STORE_UNAVAILABLE"),
        }
        sent.push(key);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Deliberate: after a failed flush nothing is acknowledged until a restart.
    eprintln!("disk faults: after the faults stopped, {recovered} of 20 fresh keys were recorded without a restart");
    let _ = faulty.kill().await;
    let logs = std::fs::read_to_string(&log_path).unwrap();
    assert!(
        !logs.contains("panicked"),
        "no panic under I/O errors:\n{logs}"
    );
    assert!(
        upstream.state.executed_twice().is_empty(),
        "a key ran twice"
    );

    // Restarted without faults: every answer given is replayed; the rest are settled.
    let mut clean = run("env", &[]).stderr(Stdio::null()).spawn().unwrap();
    support::binary::wait_listening(addr).await;
    let mut client = client(addr).await;
    let (mut replayed, mut in_doubt, mut fresh) = (0, 0, 0);
    for key in &sent {
        let seen = answers.lock().unwrap().get(key).cloned();
        match (apply(&mut client, add(key, 1), Some(key), None).await, seen) {
            (Ok(reply), Some(seen)) => {
                assert!(was_replayed(&reply), "{key}: answered before, so replayed");
                assert_eq!(reply.get_ref(), &seen, "{key}: the replay differs");
                replayed += 1;
            }
            (Ok(_), None) => fresh += 1,
            (Err(status), None) => {
                assert_eq!(reason(&status), "IDEMPOTENCY_OUTCOME_UNKNOWN", "{key}");
                in_doubt += 1;
            }
            (Err(status), Some(_)) => panic!("{key}: an answer was lost: {status:?}"),
        }
    }
    let _ = clean.kill().await;
    assert!(
        upstream.state.executed_twice().is_empty(),
        "a key ran twice"
    );
    let refusals = refusals.lock().unwrap().clone();
    eprintln!(
        "disk faults: {} keys; {} answered ({WARM_KEYS} before the faults), refused under faults {refusals:?}; after the restart {replayed} replayed, {in_doubt} IN_DOUBT, {fresh} run for the first time",
        sent.len(),
        answers.lock().unwrap().len(),
    );
    assert!(
        replayed >= WARM_KEYS,
        "every answer given before the faults is replayed"
    );
    assert!(
        refusals.contains_key("IDEMPOTENCY_STORE_UNAVAILABLE"),
        "the failpoints fired: {refusals:?}"
    );
}
