//! A PostgreSQL failover under load (issue 32 item 9): a real primary and one standby (the
//! distribution's PostgreSQL, `pg_basebackup`, started and stopped here in directories of
//! their own), two sidecars on them through a multi-host URL in front of one counting
//! upstream (two replicas of one service), callers with retries and hedged copies spread
//! over both sidecars. Under load the primary stops sending WAL for a moment (the standby
//! falls behind, as a slow or cut network would make it), then the primary is SIGKILLed and the
//! standby promoted; the sidecars find it themselves; every key is retried until it is
//! answered. Then every answer a caller got is asked for again.
//!
//! With the standby synchronous: 0 keys executed twice, 0 acknowledged answers lost. With it
//! asynchronous the same run must find losses, which shows that the check can fail; and so
//! must the same failover on Redis (a replica promoted with `REPLICAOF NO ONE`), whose
//! replication is asynchronous: README's choice of store quotes what it loses.

// A failed unwrap is a failed test.
#![allow(clippy::unwrap_used)]

mod support;

use idemproxy::config::{RunSettings, StoreKind};
use std::sync::atomic::Ordering;
use std::time::Duration;
use support::failover::{relay, under_load, Freezes, Verdict, ACKNOWLEDGED_BEFORE_FAILOVER};
use support::postgres::{signal, PostgresServer, USER};

/// How long the standby receives nothing before the primary dies: longer than twice the
/// sidecars' `--store-timeout` (1 s), so that a claim and then a completion both time out
/// waiting for the standby and are settled while the primary still lives. Settling by
/// ending those sessions (which makes their commits visible without the standby) lost 2
/// answers and ran a key twice in 3 failovers; waiting for them instead loses nothing.
const STANDBY_BEHIND: Duration = Duration::from_millis(2_500);

/// The primary stops sending WAL (its WAL sender stopped: what it already sent the standby
/// still receives, from the socket's buffers), then dies; the standby takes over.
fn fail_over(primary: &PostgresServer, standby: &PostgresServer) {
    let senders = support::postgres::children_of(primary.postmaster_pid())
        .into_iter()
        .filter(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/cmdline"))
                .is_ok_and(|cmdline| cmdline.contains("walsender"))
        })
        .collect::<Vec<_>>();
    assert!(!senders.is_empty(), "the primary's WAL sender runs");
    signal("STOP", &senders);
    std::thread::sleep(STANDBY_BEHIND);
    primary.kill_hard();
    standby.promote();
}

async fn run(synchronous: bool) -> Verdict {
    let mut settings = vec!["wal_level=replica", "max_wal_senders=4", "fsync=off"];
    if synchronous {
        settings.push("synchronous_standby_names=*");
    }
    let primary = PostgresServer::start(&settings);
    let standby = primary.start_standby(&["fsync=off"]);
    let url = format!(
        "host=127.0.0.1,127.0.0.1 port={},{} user={USER} dbname=postgres \
         target_session_attrs=read-write sslmode=disable connect_timeout=1",
        primary.port, standby.port
    );
    let on_postgres = move |args: &mut RunSettings| {
        args.store = StoreKind::Postgres;
        args.postgres_url = Some(url.clone());
        args.postgres_table = "records".into();
    };
    under_load(on_postgres, move || {
        fail_over(&primary, &standby);
        (primary, standby)
    })
    .await
    .0
}

/// Failovers the synchronous test runs: 5, or `IDEMPROXY_FAILOVERS` (the soak in
/// RELIABILITY.md runs 50).
fn failovers() -> usize {
    std::env::var("IDEMPROXY_FAILOVERS")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(5)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failovers_to_a_synchronous_standby_lose_nothing_and_run_nothing_twice() {
    for round in 1..=failovers() {
        let verdict = run(true).await;
        println!("synchronous standby, failover {round}: {verdict:?}");
        assert!(verdict.acknowledged >= ACKNOWLEDGED_BEFORE_FAILOVER);
        assert_eq!(verdict.executed_twice, 0, "failover {round}: {verdict:?}");
        assert_eq!(verdict.lost, 0, "failover {round}: {verdict:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failover_to_an_asynchronous_standby_is_caught_losing_answers() {
    let verdict = run(false).await;
    println!("asynchronous standby: {verdict:?}");
    assert!(
        verdict.lost + verdict.executed_twice > 0,
        "the check found nothing lost with an asynchronous standby: it cannot fail ({verdict:?})"
    );
}

/// The same failover on Redis: a replica fed through a relay that freezes (it receives
/// nothing more), the primary SIGKILLed, the replica promoted (`REPLICAOF NO ONE`), the
/// sidecars' relay turned to it.
async fn run_on_redis() -> Verdict {
    use support::redis::{command, RedisServer};
    let mut primary = RedisServer::start();
    let replication = relay(primary.port, Freezes::Everything);
    let replica_of = replication.port.to_string();
    let replica = RedisServer::start_with(move |_, _| {
        vec!["--replicaof".into(), "127.0.0.1".into(), replica_of]
    });
    support::eventually(Duration::from_secs(30), "the replica in sync", || {
        let port = replica.port;
        async move {
            let info = command(port, &["INFO", "replication"]);
            format!("{info:?}").contains("master_link_status:up")
        }
    })
    .await;
    let clients = relay(primary.port, Freezes::Everything);
    let url = format!("redis://127.0.0.1:{}", clients.port);
    let on_redis = move |args: &mut RunSettings| {
        args.store = StoreKind::Redis;
        args.redis_url = Some(url.clone());
    };
    under_load(on_redis, move || {
        replication.frozen.store(true, Ordering::SeqCst);
        std::thread::sleep(STANDBY_BEHIND);
        primary.kill();
        command(replica.port, &["REPLICAOF", "NO", "ONE"]).expect("the replica is promoted");
        clients.target.store(replica.port, Ordering::SeqCst);
        (primary, replica, replication, clients)
    })
    .await
    .0
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_failover_loses_what_the_replica_had_not_received() {
    let verdict = run_on_redis().await;
    println!("Redis, replica promoted: {verdict:?}");
    assert!(
        verdict.lost + verdict.executed_twice > 0,
        "Redis' replication is asynchronous: a promoted replica misses what it had not received ({verdict:?})"
    );
}
