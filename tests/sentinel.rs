//! Redis under Sentinel (`--store redis-sentinel`, issue 42): a real master, its replica and
//! three real sentinels (quorum 2, a master silent for 1 s is down), sidecars that ask the
//! sentinels for the master and follow it.
//!
//! - A failover under load (`support::failover`: two sidecars, 120 keys with retries and
//!   hedged copies): the replica fed nothing for 2.5 s (its replication stream cut at a
//!   relay, so it falls behind as a slow network would make it), the master SIGKILLed, the
//!   replica promoted by the sentinels. The sidecars must follow it and serve again within a bound. With Redis'
//!   asynchronous replication the answers the master gave while the replica was behind are
//!   lost, and the test only records how many (RELIABILITY.md); with every write confirmed by
//!   the replica (`--redis-wait-replicas 1`, and `min-replicas-to-write 1` on the nodes),
//!   nothing may be lost or executed twice. `IDEMPROXY_FAILOVERS` rounds of each (default 1).
//! - A master that turns replica behind the sentinels' back gets no write: the call fails
//!   closed, and nothing reaches the service; once the sentinels promote another node, the
//!   sidecar follows it, and its readiness names it.
//! - A failover the sentinels make while the old master still runs is followed at their
//!   announcement (`+switch-master`), before the old master is made a replica.
//! - With `--redis-wait-replicas 1`, an answer that another sidecar recorded but no replica
//!   confirmed is not replayed.

// A failed unwrap is a failed test.
#![allow(clippy::unwrap_used)]

mod support;

use idemproxy::config::{RunSettings, StoreKind};
use std::sync::atomic::Ordering;
use std::time::Duration;
use support::failover::{relay, under_load, Freezes, Verdict, ACKNOWLEDGED_BEFORE_FAILOVER};
use support::redis::{command, RedisSentinels, RedisServer, SentinelTiming, MASTER_NAME};
use support::{add, apply, client, eventually, ledger, reason, start_sidecar};

/// How long the replica is stopped (receiving nothing) before the master dies: longer than
/// twice the sidecars' `--store-timeout` (1 s), so that writes waiting for it time out.
const REPLICA_BEHIND: Duration = Duration::from_millis(2_500);

/// Longest time without an answer to a fresh key from the cut on: the cut itself (with
/// `WAIT` nothing is confirmed meanwhile), detection (`down-after-milliseconds` 1 s), the
/// sentinels' vote and promotion (a few seconds, twice the 3 s `failover-timeout` when a
/// vote fails), the sidecars asking again.
const SERVED_AGAIN_WITHIN: Duration = Duration::from_secs(30);

/// The sidecars' settings on the sentinels of `redis`.
fn on_sentinels(redis: &RedisSentinels, wait_replicas: u64) -> impl Fn(&mut RunSettings) + Clone {
    let sentinels = redis.addresses();
    move |args: &mut RunSettings| {
        args.store = StoreKind::RedisSentinel;
        args.redis_sentinels = Some(sentinels.clone());
        args.redis_master_name = Some(MASTER_NAME.to_owned());
        args.redis_wait_replicas = wait_replicas;
        args.store_timeout = Duration::from_secs(1);
    }
}

/// One failover under load; `min_replicas`: `min-replicas-to-write 1` on the nodes;
/// `wait_replicas`: the sidecars' `--redis-wait-replicas`. With either, the old master comes
/// back as a replica of the new one, without which the new master takes no write. The master is
/// reached through a relay that can cut the replication stream alone: a replica stopped
/// instead (SIGSTOP) still reads, once continued, what its kernel had buffered, and missed
/// nothing.
async fn fail_over(min_replicas: bool, wait_replicas: u64) -> (Verdict, Duration) {
    let confirmed = min_replicas || wait_replicas > 0;
    let data: &[&str] = if min_replicas {
        // Redis' default lag bound (10 s): a replica's heartbeat comes once a second, and a
        // bound of 1 s could refuse writes for a moment when one comes late.
        &["--min-replicas-to-write", "1"]
    } else {
        &[]
    };
    let mut replication = None;
    let redis = RedisSentinels::start_through(data, SentinelTiming::default(), |port| {
        let relay = relay(port, Freezes::Replication);
        let seen_at = relay.port;
        replication = Some(relay);
        seen_at
    });
    let replication = replication.expect("the relay is made");
    redis.wait_until_failover_ready();
    let promoted = redis.replica.port;
    let store = on_sentinels(&redis, wait_replicas);
    under_load(store, move || {
        let mut redis = redis;
        replication.frozen.store(true, Ordering::SeqCst);
        std::thread::sleep(REPLICA_BEHIND);
        redis.master.kill();
        // What the relay dropped is gone; from now on it passes everything, so that a node
        // the sentinels later make a replica of the old master's address can sync (a second
        // failover, when the new master looked down to them for a moment, did that).
        replication.frozen.store(false, Ordering::SeqCst);
        let killed = std::time::Instant::now();
        let deadline = killed + SERVED_AGAIN_WITHIN;
        while redis.agreed_master_port() != Some(promoted) {
            assert!(
                std::time::Instant::now() < deadline,
                "the sentinels promoted nothing within {SERVED_AGAIN_WITHIN:?}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        println!(
            "the sentinels agreed on the new master {:?} after the kill",
            killed.elapsed()
        );
        if confirmed {
            redis.master.restart_as_replica_of(promoted);
        }
        (redis, replication)
    })
    .await
}

/// Rounds of each failover test: 1, or `IDEMPROXY_FAILOVERS` (RELIABILITY.md runs 10).
fn rounds() -> usize {
    std::env::var("IDEMPROXY_FAILOVERS")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(1)
}

fn assert_followed(verdict: &Verdict, unserved: Duration) {
    assert!(
        verdict.acknowledged >= ACKNOWLEDGED_BEFORE_FAILOVER,
        "{verdict:?}"
    );
    assert!(
        unserved < SERVED_AGAIN_WITHIN,
        "a sidecar answered no fresh key for {unserved:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failover_is_followed_and_what_asynchronous_replication_lost_is_counted() {
    for round in 1..=rounds() {
        let (verdict, unserved) = fail_over(false, 0).await;
        println!("Redis Sentinel, asynchronous replication, failover {round}: {verdict:?}, no answer for {unserved:?}");
        assert_followed(&verdict, unserved);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_every_write_confirmed_by_the_replica_a_failover_loses_nothing() {
    for round in 1..=rounds() {
        let (verdict, unserved) = fail_over(true, 1).await;
        println!("Redis Sentinel, --redis-wait-replicas 1, failover {round}: {verdict:?}, no answer for {unserved:?}");
        assert_followed(&verdict, unserved);
        assert_eq!(verdict.executed_twice, 0, "failover {round}: {verdict:?}");
        assert_eq!(verdict.lost, 0, "failover {round}: {verdict:?}");
    }
}

/// The readiness text of `sidecar` names the node on `port` within 5 s (less than the
/// sentinels take to turn a master they replaced into a replica).
async fn readiness_names(sidecar: &support::Sidecar, port: u16) {
    let health = sidecar.running.health.clone();
    let named = format!("127.0.0.1:{port}");
    eventually(
        Duration::from_secs(5),
        "readiness to name the master",
        || {
            let (health, named) = (health.clone(), named.clone());
            async move {
                health.readiness() == idemproxy::ops::Readiness::Ready
                    && health
                        .store_note()
                        .is_some_and(|note| note.contains(&named))
            }
        },
    )
    .await;
    let (status, text) = support::http::get(sidecar.running.ops_addr, "/readyz").await;
    assert_eq!(status, 200, "{text}");
    assert!(
        text.starts_with("ready: ") && text.contains(&named),
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_master_turned_replica_gets_no_write_and_the_promoted_one_is_followed() {
    let redis = RedisSentinels::start(&[], SentinelTiming::default());
    let elsewhere = RedisServer::start();
    let upstream = ledger::start().await;
    let sidecar = start_sidecar(upstream.addr, on_sentinels(&redis, 0)).await;
    let mut client = client(sidecar.addr).await;
    apply(&mut client, add("before", 1), Some("before"), None)
        .await
        .expect("served by the master the sentinels name");
    readiness_names(&sidecar, redis.master.port).await;

    // Behind the sentinels' back the master becomes a replica: it answers writes READONLY,
    // and the sentinels still name it.
    let port = elsewhere.port.to_string();
    command(redis.master.port, &["REPLICAOF", "127.0.0.1", &port]).unwrap();
    eventually(
        Duration::from_secs(10),
        "the master to say it is a replica",
        || {
            let port = redis.master.port;
            async move { support::redis::replication_info(port).contains("role:slave") }
        },
    )
    .await;
    for attempt in 0..3 {
        let refused = apply(
            &mut client,
            add("while-replica", 1),
            Some("while-replica"),
            None,
        )
        .await
        .expect_err("no claim can be written to a replica");
        assert_eq!(
            refused.code(),
            tonic::Code::Unavailable,
            "attempt {attempt}"
        );
        assert_eq!(
            reason(&refused),
            "IDEMPOTENCY_STORE_UNAVAILABLE",
            "{refused:?}"
        );
    }
    assert_eq!(
        upstream.state.executions_of("while-replica"),
        0,
        "nothing forwarded"
    );

    // The sentinels promote the replica; the sidecar follows.
    let sentinel = redis.sentinels[0].port;
    command(sentinel, &["SENTINEL", "FAILOVER", MASTER_NAME]).expect("a failover starts");
    let promoted = redis.replica.port;
    eventually(Duration::from_secs(30), "the sentinels to agree", || {
        let agreed = redis.agreed_master_port();
        async move { agreed == Some(promoted) }
    })
    .await;
    eventually(Duration::from_secs(30), "a call served again", || {
        let mut client = client.clone();
        async move {
            apply(&mut client, add("after", 1), Some("after"), None)
                .await
                .is_ok()
        }
    })
    .await;
    assert_eq!(upstream.state.executions_of("after"), 1);
    assert_eq!(upstream.state.executions_of("while-replica"), 0);
    readiness_names(&sidecar, redis.replica.port).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_answer_the_replica_has_not_confirmed_is_not_replayed() {
    let mut replication = None;
    let redis = RedisSentinels::start_through(&[], SentinelTiming::default(), |port| {
        let relay = relay(port, Freezes::Replication);
        let seen_at = relay.port;
        replication = Some(relay);
        seen_at
    });
    let replication = replication.expect("the relay is made");
    let upstream = ledger::start().await;
    let first = start_sidecar(upstream.addr, on_sentinels(&redis, 1)).await;
    let second = start_sidecar(upstream.addr, on_sentinels(&redis, 1)).await;
    // A call that runs for a while: its claim reaches the replica, then the replication
    // stream is cut, so its outcome is on the master alone.
    let mut slow = client(first.addr).await;
    let slow_call = || {
        let mut request = add("slow", 1);
        request.delay_ms = 1_500;
        request
    };
    let call = tokio::spawn(async move { apply(&mut slow, slow_call(), Some("slow"), None).await });
    // The sidecar forwards only once WAIT counted the replica's acknowledgement of the claim,
    // so the call at the service means the claim is confirmed; the outcome is not yet written.
    let state = upstream.state.clone();
    eventually(Duration::from_secs(10), "the call at the service", || {
        let state = state.clone();
        async move { state.arrivals() == 1 }
    })
    .await;
    replication.frozen.store(true, Ordering::SeqCst);
    let answered = call.await.unwrap();
    assert!(
        answered.is_err(),
        "no replica confirmed the outcome: {answered:?}"
    );
    assert_eq!(upstream.state.executions_of("slow"), 1);
    // The other sidecar finds the outcome on the master; the replica does not have it, so
    // replaying it would give an answer a failover loses.
    let mut other = client(second.addr).await;
    let again = apply(&mut other, slow_call(), Some("slow"), None).await;
    let refused = again.expect_err("an answer no replica confirmed is not given");
    assert_eq!(
        reason(&refused),
        "IDEMPOTENCY_STORE_UNAVAILABLE",
        "{refused:?}"
    );
    assert_eq!(upstream.state.executions_of("slow"), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_switch_the_sentinels_announce_is_followed_before_the_old_master_steps_down() {
    let redis = RedisSentinels::start(&[], SentinelTiming::default());
    redis.wait_until_failover_ready();
    let upstream = ledger::start().await;
    let sidecar = start_sidecar(upstream.addr, on_sentinels(&redis, 0)).await;
    let mut client = client(sidecar.addr).await;
    apply(&mut client, add("before", 1), Some("before"), None)
        .await
        .unwrap();
    readiness_names(&sidecar, redis.master.port).await;
    // A failover the sentinels choose while the master still runs: the old master stays a
    // writable master for seconds, until the sentinels make it a replica; its ROLE says
    // master and it refuses no write, so only their announcement says to leave it.
    command(
        redis.sentinels[0].port,
        &["SENTINEL", "FAILOVER", MASTER_NAME],
    )
    .unwrap();
    readiness_names(&sidecar, redis.replica.port).await;
    apply(&mut client, add("after", 1), Some("after"), None)
        .await
        .unwrap();
    let written = |port| match command(port, &["KEYS", "idemproxy:{*}"]) {
        Some(redis::Value::Array(keys)) => keys.len(),
        _ => 0,
    };
    assert_eq!(
        written(redis.replica.port),
        2,
        "the new master has both records"
    );
}
