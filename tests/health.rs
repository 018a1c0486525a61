//! Health and graceful drain: the ops listener's HTTP probes and grpc.health.v1 through real
//! clients, readiness following the store (a data dir on a disk that fills up), and SIGTERM to
//! the real binary while a call is running: the call finishes, its outcome is stored and
//! replayed after a restart, health says NOT_SERVING meanwhile, and the exit is 0.

// Helpers of tests: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used)]

mod support;

use std::net::SocketAddr;
use std::time::Duration;
use support::http::{free_addr, get};
use support::{add, apply, binary, client, ledger, start_sidecar, was_replayed};
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;

/// The gRPC health status of `service` (1 SERVING, 2 NOT_SERVING).
async fn grpc_health(addr: SocketAddr, service: &str) -> i32 {
    let channel = tonic::transport::Channel::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    HealthClient::new(channel)
        .check(HealthCheckRequest {
            service: service.into(),
        })
        .await
        .unwrap()
        .into_inner()
        .status
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn probes_report_live_and_ready_and_follow_the_store() {
    let upstream = ledger::start().await;
    let tmpfs = support::tmpfs::Tmpfs::mount("16m");
    let data = tmpfs.path.join("data");
    let sidecar = start_sidecar(upstream.addr, |args| args.data_dir = data).await;
    let ops = sidecar.running.ops_addr;
    support::eventually(Duration::from_secs(5), "readiness", || async move {
        get(ops, "/readyz").await.0 == 200
    })
    .await;
    assert_eq!(get(ops, "/livez").await, (200, "alive\n".into()));
    for service in ["", "liveness", "readiness"] {
        assert_eq!(grpc_health(ops, service).await, 1, "{service:?} is SERVING");
    }
    assert_eq!(get(ops, "/elsewhere").await.0, 404);

    // The disk fills up: not ready (and says why), still alive.
    let _filler = tmpfs.fill();
    support::eventually(Duration::from_secs(5), "not ready", || async move {
        get(ops, "/readyz").await.0 == 503
    })
    .await;
    let (_, why) = get(ops, "/readyz").await;
    assert!(why.contains("not ready"), "{why}");
    assert_eq!(grpc_health(ops, "readiness").await, 2, "NOT_SERVING");
    assert_eq!(get(ops, "/livez").await.0, 200);
}

/// Waits until the admin API counts exactly one IN_FLIGHT record.
async fn wait_for_one_in_flight(admin: SocketAddr) {
    support::eventually(
        Duration::from_secs(5),
        "the call to be in flight",
        || async move { in_flight(admin).await == 1 },
    )
    .await;
}

/// IN_FLIGHT records, as the admin API counts them.
async fn in_flight(admin: SocketAddr) -> u64 {
    use idemproxy::pb::idemproxy::v1::admin_client::AdminClient;
    use idemproxy::pb::idemproxy::v1::GetStatsRequest;
    let mut client = AdminClient::connect(format!("http://{admin}"))
        .await
        .unwrap();
    let stats = client.get_stats(GetStatsRequest {}).await.unwrap();
    stats.into_inner().in_flight
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_a_running_call_and_keeps_its_outcome() {
    let upstream = ledger::start().await;
    let dir = tempfile::tempdir().unwrap();
    let ops = free_addr();
    let admin = free_addr();
    let (ops_text, admin_text) = (ops.to_string(), admin.to_string());
    let extra = ["--ops-listen", &ops_text, "--admin-listen", &admin_text];
    let args = binary::run_args(upstream.addr, dir.path(), &extra);
    let sidecar = binary::start(&args).await;
    support::eventually(Duration::from_secs(5), "readiness", || async move {
        get(ops, "/readyz").await.0 == 200
    })
    .await;
    let mut caller = client(sidecar.addr).await;
    let running = tokio::spawn(async move {
        let mut slow = add("drain", 5);
        slow.delay_ms = 1_500;
        apply(&mut caller, slow, Some("in-flight-at-sigterm"), None).await
    });
    wait_for_one_in_flight(admin).await;
    sidecar.terminate();
    // Draining: health says so while the call is still running.
    support::eventually(Duration::from_secs(5), "readiness to drop", || async move {
        get(ops, "/readyz").await == (503, "draining\n".into())
    })
    .await;
    assert_eq!(grpc_health(ops, "readiness").await, 2, "NOT_SERVING");
    let answered = running.await.unwrap().expect("the running call finishes");
    assert!(!was_replayed(&answered));
    assert_eq!(sidecar.wait().await, Some(0), "a drain in time exits 0");

    // The outcome survived: a retry after the restart is a replay.
    let restarted = binary::start(&binary::run_args(upstream.addr, dir.path(), &[])).await;
    let mut caller = client(restarted.addr).await;
    let mut slow = add("drain", 5);
    slow.delay_ms = 1_500;
    let retry = apply(&mut caller, slow, Some("in-flight-at-sigterm"), None)
        .await
        .unwrap();
    assert!(was_replayed(&retry));
    assert_eq!(retry.get_ref(), answered.get_ref());
    assert_eq!(upstream.state.executions(), 1);
    restarted.kill().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drain_past_its_deadline_exits_non_zero_and_leaves_the_call_in_doubt() {
    let upstream = ledger::start().await;
    let dir = tempfile::tempdir().unwrap();
    let admin = free_addr();
    let admin_text = admin.to_string();
    let extra = ["--drain-timeout", "200ms", "--admin-listen", &admin_text];
    let args = binary::run_args(upstream.addr, dir.path(), &extra);
    let sidecar = binary::start(&args).await;
    let mut caller = client(sidecar.addr).await;
    tokio::spawn(async move {
        let mut slow = add("late", 1);
        slow.delay_ms = 3_000;
        let _ = apply(&mut caller, slow, Some("too-slow"), None).await;
    });
    wait_for_one_in_flight(admin).await;
    sidecar.terminate();
    assert_ne!(sidecar.wait().await, Some(0), "the deadline passed");

    // The record was left as it was; the next process treats it as IN_DOUBT, never re-runs it.
    let restarted = binary::start(&binary::run_args(upstream.addr, dir.path(), &[])).await;
    let mut caller = client(restarted.addr).await;
    let mut slow = add("late", 1);
    slow.delay_ms = 3_000;
    let refused = apply(&mut caller, slow, Some("too-slow"), None)
        .await
        .unwrap_err();
    assert_eq!(support::reason(&refused), "IDEMPOTENCY_OUTCOME_UNKNOWN");
    restarted.kill().await;
}

/// A SIGTERM sent the moment the sidecar says it listens drains it (exit 0) rather than
/// killing it: the handler is in place before the line is logged. (CI once saw the process
/// die of the signal: the handler was installed only after the start.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sigterm_right_after_the_listening_line_still_drains() {
    let upstream = ledger::start().await;
    for _ in 0..10 {
        let dir = tempfile::tempdir().unwrap();
        let sidecar = binary::start(&binary::run_args(upstream.addr, dir.path(), &[])).await;
        sidecar.terminate();
        assert_eq!(sidecar.wait().await, Some(0), "exit code, not a signal");
    }
}

/// A client that sends nothing, part of the HTTP/2 preface, or part of a request's headers,
/// and then nothing, is cut off after the header read timeout (10 s), not held open for as
/// long as it likes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_ops_port_closes_a_connection_that_never_finishes_its_headers() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let upstream = ledger::start().await;
    let sidecar = start_sidecar(upstream.addr, |_| {}).await;
    let ops = sidecar.running.ops_addr;
    let started = std::time::Instant::now();
    let clients = [
        ("silent", &b""[..]),
        ("part of the HTTP/2 preface", &b"PRI * HTTP/2.0\r\n"[..]),
        (
            "part of the headers",
            &b"GET /livez HTTP/1.1\r\nHost: ops\r\n"[..],
        ),
    ]
    .map(|(what, sent)| {
        tokio::spawn(async move {
            let mut stream = tokio::net::TcpStream::connect(ops).await.unwrap();
            stream.write_all(sent).await.unwrap();
            let mut rest = Vec::new();
            let read = tokio::time::timeout(Duration::from_secs(30), stream.read_to_end(&mut rest));
            assert!(read.await.is_ok(), "{what}: still open after 30 s");
            let waited = started.elapsed();
            assert!(
                waited >= Duration::from_secs(9),
                "{what}: closed after {waited:?}, before the timeout"
            );
            assert!(
                !String::from_utf8_lossy(&rest).contains("alive"),
                "{what}: an unfinished request was answered: {rest:?}"
            );
        })
    });
    for client in clients {
        client.await.expect("the client's checks hold");
    }
}

/// One scripted store check: how long it takes, and whether it answers well.
#[derive(Clone, Copy)]
enum Check {
    Ok,
    Slow(Duration),
    Fails,
}

// Regression (issue 33): one check that queued behind a group commit (2 s on a busy machine)
// made the sidecar not ready for a second; only failures in a row may.
#[tokio::test(start_paused = true)]
async fn readiness_survives_a_slow_or_failed_check_and_drops_on_failures_in_a_row() {
    use idemproxy::ops::{Health, Readiness, FAILED_CHECKS_MAX};
    let script = [
        Check::Ok,
        Check::Slow(Duration::from_secs(5)),
        Check::Ok,
        Check::Fails,
        Check::Ok,
    ]
    .into_iter()
    .chain(std::iter::repeat_n(
        Check::Fails,
        FAILED_CHECKS_MAX as usize,
    ))
    .chain([Check::Ok, Check::Ok]);
    let script = std::sync::Mutex::new(script.collect::<std::collections::VecDeque<_>>());
    let health = Health::new();
    // What readiness was as each check began: the verdict of the checks before it.
    let seen = std::sync::Mutex::new(Vec::new());
    let (done, finished) = tokio::sync::oneshot::channel::<()>();
    let done = std::sync::Mutex::new(Some(done));
    let watcher = health.clone();
    let watching = watcher.watch_checks(
        || {
            seen.lock()
                .unwrap()
                .push(health.readiness() == Readiness::Ready);
            let next = script.lock().unwrap().pop_front();
            if next.is_none() {
                let _ = done.lock().unwrap().take().map(|done| done.send(()));
            }
            async move {
                match next.unwrap_or(Check::Ok) {
                    Check::Ok => Ok(()),
                    Check::Slow(delay) => {
                        tokio::time::sleep(delay).await;
                        Ok(())
                    }
                    Check::Fails => Err("injected: the store failed its check"),
                }
            }
        },
        async {
            let _ = finished.await;
        },
    );
    watching.await;
    let ready_as_each_began = seen.into_inner().unwrap();
    let n = FAILED_CHECKS_MAX as usize;
    // Starting, then ready through a slow check and a single failure...
    let mut expected = vec![false, true, true, true, true, true];
    // ...still ready until the last of the failures in a row, not ready after it...
    expected.extend(std::iter::repeat_n(true, n - 1));
    expected.push(false);
    // ...and ready again once a check answers.
    expected.push(true);
    assert_eq!(ready_as_each_began[..expected.len()], expected[..]);
}
