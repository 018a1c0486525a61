//! The shared Redis store: retries that land on another replica, concurrent duplicates split
//! across replicas, fencing of a stale owner, and Redis going away mid-run. Real
//! redis-server processes (one server, or a three-master cluster), the real binary as the
//! replicas, a real tonic upstream that counts executions.

// Helpers of tests: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used)]

mod support;

use idemproxy::config::StoreKind;
use idemproxy::key::Key;
use idemproxy::record::{self, ClaimRequest, Claimed, Fenced, Record, State};
use idemproxy::store::redis::{RedisOptions, RedisStore};
use idemproxy::store::{Operation, Store};
use prost::Message;
use std::net::SocketAddr;
use std::time::Duration;
use support::redis::{RedisCluster, RedisServer};
use support::{
    add, apply, binary, client, ledger, reason, start_sidecar, start_sidecar_with, was_replayed,
};

fn replica_args(upstream: SocketAddr, store: &str, redis_url: &str) -> Vec<String> {
    let dir = std::env::temp_dir().join("idemproxy-redis-replica-unused");
    binary::run_args(
        upstream,
        &dir,
        &["--store", store, "--redis-url", redis_url],
    )
}

/// Every key's attempts alternate between two replicas: the first lands on one, each retry
/// on the other, as round-robin load balancing sends them.
async fn retries_alternate_between_two_replicas(store: &str, redis_url: &str) {
    let upstream = ledger::start().await;
    let a = binary::start(&replica_args(upstream.addr, store, redis_url)).await;
    let b = binary::start(&replica_args(upstream.addr, store, redis_url)).await;
    let replicas = [client(a.addr).await, client(b.addr).await];
    let keys = 40;
    for n in 0..keys {
        let key = format!("charge-{n}");
        let account = format!("card-{n}");
        let mut answers = Vec::new();
        for attempt in 0..4 {
            let mut replica = replicas[(n + attempt) % 2].clone();
            let answer = apply(&mut replica, add(&account, 25), Some(&key), Some("orders"))
                .await
                .expect("every attempt is answered");
            answers.push(answer);
        }
        assert!(!was_replayed(&answers[0]), "the first attempt executes");
        for retry in &answers[1..] {
            assert!(was_replayed(retry), "a retry on either replica is a replay");
            assert_eq!(retry.get_ref(), answers[0].get_ref());
        }
    }
    assert_eq!(upstream.state.executions(), keys as u64);
    assert!(upstream.state.executed_twice().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retries_landing_on_another_replica_execute_once() {
    let redis = RedisServer::start();
    retries_alternate_between_two_replicas("redis", &redis.url()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retries_landing_on_another_replica_execute_once_on_a_cluster() {
    let cluster = RedisCluster::start();
    retries_alternate_between_two_replicas("redis-cluster", &cluster.urls()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_duplicates_split_across_replicas_execute_once() {
    let redis = RedisServer::start();
    let upstream = ledger::start().await;
    let a = binary::start(&replica_args(upstream.addr, "redis", &redis.url())).await;
    let b = binary::start(&replica_args(upstream.addr, "redis", &redis.url())).await;
    let replicas = [client(a.addr).await, client(b.addr).await];
    // Ten hedged copies of one slow call, half to each replica, all at once.
    let copies: Vec<_> = (0..10)
        .map(|n| {
            let mut replica = replicas[n % 2].clone();
            tokio::spawn(async move {
                let mut slow = add("hedged", 7);
                slow.delay_ms = 300;
                apply(&mut replica, slow, Some("hedged-call"), None).await
            })
        })
        .collect();
    let mut answers = Vec::new();
    for copy in copies {
        answers.push(
            copy.await
                .unwrap()
                .expect("every copy waits for the one answer"),
        );
    }
    assert_eq!(upstream.state.executions(), 1);
    assert_eq!(answers.iter().filter(|a| !was_replayed(a)).count(), 1);
    for answer in &answers {
        assert_eq!(answer.get_ref(), answers[0].get_ref());
    }
}

/// Settings of an in-process sidecar on the Redis at `url`, failing closed after `timeout`.
fn on_redis(url: String, timeout: Duration) -> impl FnOnce(&mut idemproxy::config::RunSettings) {
    move |args| {
        args.store = StoreKind::Redis;
        args.redis_url = Some(url);
        args.store_timeout = timeout;
    }
}

fn options(url: String) -> RedisOptions {
    RedisOptions {
        urls: vec![url],
        cluster: false,
        password: None,
        ca_pem: None,
        key_prefix: "fencing-test".into(),
        command_timeout: Duration::from_secs(2),
        poll_interval: Duration::from_millis(100),
        track_callers: true,
        master_name: None,
        wait_replicas: 0,
    }
}

fn claim_request(token: u8, now_ms: u64) -> ClaimRequest<'static> {
    ClaimRequest {
        fingerprint: &[7; 32],
        method: "/test.Payments/Charge",
        caller: "orders",
        token: [token; 16],
        now_ms,
        lease_until_ms: now_ms + 1_000,
        expires_ms: now_ms + 2_000,
        sole_owner: None,
        retry_in_doubt: false,
        origin: None,
        at_quota: false,
        serial: None,
    }
}

#[tokio::test]
async fn a_stale_owners_completion_cannot_overwrite_a_newer_claim() {
    let redis = RedisServer::start();
    let store = RedisStore::new(&options(redis.url())).expect("valid options");
    let key = Key::derive("/test.Payments/Charge", "orders", b"pay-1");
    let now_ms = 1_900_000_000_000;
    let claimed = store
        .update(Operation::Claim, &key, |current| {
            record::claim(current, &claim_request(1, now_ms))
        })
        .await
        .expect("Redis answers");
    assert_eq!(claimed, Claimed::Owned);

    // Between the stale owner's read and its write, the record expires and a new attempt
    // claims the key (written here behind the store's back, at exactly that moment).
    let newer = match record::claim(None, &claim_request(2, now_ms + 5_000)).0 {
        record::Change::Put(record) => record,
        other => panic!("a fresh claim writes a record, not {other:?}"),
    };
    let name = store.record_key(&key);
    let mut rounds = 0;
    let fenced = store
        .update(Operation::Complete, &key, |current| {
            rounds += 1;
            if rounds == 1 {
                set_bytes(redis.port, &name, &newer.encode_to_vec());
            }
            record::complete(current, &[1; 16], None, now_ms + 5_001, now_ms + 9_000)
        })
        .await
        .expect("Redis answers");
    assert_eq!(rounds, 2, "the compare failed and the transition ran again");
    assert_eq!(fenced, Fenced::NotOwner);
    let stored: Vec<u8> = get_bytes(redis.port, &name).expect("the newer claim is kept");
    let stored = Record::decode(&stored[..]).unwrap();
    assert_eq!(stored.state(), State::InFlight);
    assert_eq!(stored.token, vec![2; 16], "the newer claim is untouched");
}

fn connect(port: u16) -> redis::Connection {
    support::redis::connect(port).expect("the test's Redis answers")
}

fn set_bytes(port: u16, name: &str, value: &[u8]) {
    let _: () = redis::cmd("SET")
        .arg(name)
        .arg(value)
        .query(&mut connect(port))
        .expect("SET works");
}

fn get_bytes(port: u16, name: &str) -> Option<Vec<u8>> {
    redis::cmd("GET")
        .arg(name)
        .query(&mut connect(port))
        .expect("GET works")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn while_redis_is_down_nothing_is_forwarded_and_calls_resume_when_it_returns() {
    let upstream = ledger::start().await;
    let mut redis = RedisServer::start();
    let url = redis.url();
    let sidecar = start_sidecar(upstream.addr, on_redis(url, Duration::from_secs(1))).await;
    let mut client = client(sidecar.addr).await;
    let first = apply(&mut client, add("before", 1), Some("before"), None)
        .await
        .expect("Redis is up");

    redis.kill();
    for key in ["before", "during"] {
        let refused = apply(&mut client, add(key, 1), Some(key), None)
            .await
            .expect_err("no durable claim, no forward");
        assert_eq!(refused.code(), tonic::Code::Unavailable);
        assert_eq!(reason(&refused), "IDEMPOTENCY_STORE_UNAVAILABLE");
    }
    assert_eq!(
        upstream.state.executions(),
        1,
        "nothing forwarded without a claim"
    );

    // Back, with its append-only file: the recorded outcome is still there.
    redis.restart();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    let replay = loop {
        match apply(&mut client, add("before", 1), Some("before"), None).await {
            Ok(replay) => break replay,
            Err(error) => assert!(
                tokio::time::Instant::now() < deadline,
                "the store did not reconnect: {error:?}"
            ),
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(was_replayed(&replay));
    assert_eq!(replay.get_ref(), first.get_ref());
    apply(&mut client, add("during", 1), Some("during"), None)
        .await
        .expect("a refused call runs when retried");
    assert_eq!(upstream.state.executions(), 2);
    assert!(upstream.state.executed_twice().is_empty());
}

/// A duplicate on another replica waits for the first attempt (0.5 s): with polling and
/// waits slowed to 10 s, only the change message can bring it the answer within 5 s.
async fn a_waiting_duplicate_is_woken_by_the_change_message(store: StoreKind, redis_url: String) {
    let upstream = ledger::start().await;
    let replica = |url: String| {
        move |args: &mut idemproxy::config::RunSettings| {
            args.store = store;
            args.redis_url = Some(url);
            args.redis_poll_interval = Duration::from_secs(10);
            args.max_in_flight_wait = Duration::from_secs(10);
        }
    };
    let a = start_sidecar(upstream.addr, replica(redis_url.clone())).await;
    let b = start_sidecar(upstream.addr, replica(redis_url)).await;
    let mut first_client = client(a.addr).await;
    let first = tokio::spawn(async move {
        let mut slow = add("woken", 3);
        slow.delay_ms = 500;
        apply(&mut first_client, slow, Some("woken"), None).await
    });
    // The first attempt's claim is in Redis: the duplicate will find it IN_FLIGHT.
    a.wait_for_records(1).await;
    let mut second_client = client(b.addr).await;
    let mut slow = add("woken", 3);
    slow.delay_ms = 500;
    let waited = std::time::Instant::now();
    let second = apply(&mut second_client, slow, Some("woken"), None)
        .await
        .expect("the duplicate gets the answer");
    assert!(
        waited.elapsed() < Duration::from_secs(5),
        "the duplicate was not woken by the change message"
    );
    let first = first.await.unwrap().expect("the first attempt's answer");
    assert!(was_replayed(&second));
    assert_eq!(second.get_ref(), first.get_ref());
    assert_eq!(upstream.state.executions(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_waiting_duplicate_is_woken_by_the_change_message_on_redis() {
    let redis = RedisServer::start();
    a_waiting_duplicate_is_woken_by_the_change_message(StoreKind::Redis, redis.url()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_waiting_duplicate_is_woken_by_the_change_message_on_a_cluster() {
    let cluster = RedisCluster::start();
    a_waiting_duplicate_is_woken_by_the_change_message(StoreKind::RedisCluster, cluster.urls())
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rediss_with_a_private_ca_and_a_password_from_a_file() {
    let files = tempfile::tempdir().unwrap();
    let (ca, cert, key) = support::tls::ca_and_server(files.path());
    let redis = RedisServer::start_with(|port, _| {
        let mut settings = vec!["--port".to_owned(), "0".to_owned(), "--tls-port".to_owned()];
        settings.push(port.to_string());
        for (flag, path) in [
            ("--tls-cert-file", &cert),
            ("--tls-key-file", &key),
            ("--tls-ca-cert-file", &ca),
        ] {
            settings.push(flag.to_owned());
            settings.push(path.display().to_string());
        }
        settings.extend(["--tls-auth-clients", "no", "--requirepass", "s3cret"].map(str::to_owned));
        settings
    });
    let password_file = files.path().join("password");
    std::fs::write(&password_file, "s3cret\n").unwrap();
    let upstream = ledger::start().await;
    let url = format!("rediss://127.0.0.1:{}", redis.port);
    let secure = |password_file: std::path::PathBuf| {
        let (url, ca) = (url.clone(), ca.clone());
        move |args: &mut idemproxy::config::RunSettings| {
            on_redis(url, Duration::from_secs(1))(args);
            args.redis_ca_file = Some(ca);
            args.redis_password_file = Some(password_file);
        }
    };
    let sidecar = start_sidecar(upstream.addr, secure(password_file)).await;
    let mut client = client(sidecar.addr).await;
    let first = apply(&mut client, add("tls", 1), Some("over-tls"), None)
        .await
        .expect("claims and outcomes go over TLS");
    let again = apply(&mut client, add("tls", 1), Some("over-tls"), None)
        .await
        .expect("replayed");
    assert!(was_replayed(&again));
    assert_eq!(again.get_ref(), first.get_ref());

    // The wrong password fails closed: nothing is forwarded.
    let wrong_file = files.path().join("wrong");
    std::fs::write(&wrong_file, "guess").unwrap();
    let wrong = start_sidecar(upstream.addr, secure(wrong_file)).await;
    let mut wrong_client = support::client(wrong.addr).await;
    let refused = apply(&mut wrong_client, add("tls", 1), Some("other"), None)
        .await
        .expect_err("not authenticated, not forwarded");
    assert_eq!(refused.code(), tonic::Code::Unavailable);
    assert_eq!(reason(&refused), "IDEMPOTENCY_STORE_UNAVAILABLE");
    assert_eq!(upstream.state.executions(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fail_open_method_is_forwarded_unprotected_while_redis_is_down() {
    let upstream = ledger::start().await;
    let mut redis = RedisServer::start();
    let url = redis.url();
    let files = tempfile::tempdir().unwrap();
    let config = files.path().join("config.toml");
    std::fs::write(
        &config,
        "[methods.\"/idemproxy.testing.v1.Ledger/Apply\"]\nfail-open = true\n",
    )
    .unwrap();
    let sidecar = start_sidecar_with(
        upstream.addr,
        &["--config".as_ref(), config.as_ref()],
        on_redis(url, Duration::from_secs(1)),
    )
    .await;
    let mut client = client(sidecar.addr).await;
    redis.kill();
    let answer = apply(&mut client, add("open", 1), Some("open-1"), None)
        .await
        .expect("forwarded although the store is down");
    assert!(!was_replayed(&answer));
    assert_eq!(
        upstream.state.executions(),
        1,
        "the method chose availability"
    );
}

/// How many times Redis ran `command` (its own count, scripts' calls included).
fn command_calls(port: u16, command: &str) -> u64 {
    let info = support::redis::command(port, &["INFO", "commandstats"]).expect("INFO answers");
    let info: String = redis::from_redis_value(info).expect("INFO is text");
    let prefix = format!("cmdstat_{command}:calls=");
    info.lines()
        .find_map(|line| line.strip_prefix(&prefix))
        .map_or(0, |rest| {
            rest.split(',')
                .next()
                .unwrap_or_default()
                .parse()
                .expect("a count")
        })
}

/// `GET`s sent by the sidecar itself: every compare-and-swap script runs one `GET` of its own.
fn direct_gets(port: u16) -> u64 {
    command_calls(port, "get") - command_calls(port, "evalsha")
}

/// A fresh key is claimed in one round trip (the swap from "absent", no `GET` first), and a
/// duplicate is answered from what the refused swap hands back: one `GET` a fresh call (its
/// completion's) where there were two, none a duplicate.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fresh_key_is_claimed_and_a_duplicate_answered_without_a_get() {
    let upstream = ledger::start().await;
    let redis = RedisServer::start();
    let sidecar = start_sidecar(upstream.addr, on_redis(redis.url(), Duration::from_secs(1))).await;
    let mut client = client(sidecar.addr).await;
    // The script is loaded by the first call.
    apply(&mut client, add("warm", 1), Some("warm"), None)
        .await
        .expect("answered");
    const CALLS: u64 = 20;
    let before = direct_gets(redis.port);
    for n in 0..CALLS {
        let key = format!("fresh-{n}");
        apply(&mut client, add(&key, 1), Some(&key), None)
            .await
            .expect("answered");
    }
    assert_eq!(
        direct_gets(redis.port) - before,
        CALLS,
        "one GET a fresh call"
    );
    let before = direct_gets(redis.port);
    for n in 0..CALLS {
        let key = format!("fresh-{n}");
        let replay = apply(&mut client, add(&key, 1), Some(&key), None)
            .await
            .expect("answered");
        assert!(was_replayed(&replay));
    }
    assert_eq!(direct_gets(redis.port) - before, 0, "no GET a duplicate");
    assert_eq!(upstream.state.executions(), CALLS + 1);
}

/// `keys ls` pages through every record (on a cluster, every master's), `keys stats` counts
/// them, and `purge` removes one.
async fn operators_list_and_purge_records(store: &str, redis_url: &str) {
    let upstream = ledger::start().await;
    let admin = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.local_addr().unwrap().to_string()
    };
    let mut args = replica_args(upstream.addr, store, redis_url);
    args.extend(["--admin-listen".to_owned(), admin.clone()]);
    let sidecar = binary::start(&args).await;
    let mut client = client(sidecar.addr).await;
    let serials: Vec<String> = (0..12).map(|n| format!("r-{n}")).collect();
    for serial in &serials {
        apply(&mut client, add(serial, 1), Some(serial), None)
            .await
            .unwrap();
    }
    let admin_at = admin.clone();
    let keys = move |args: Vec<String>| {
        let admin = admin_at.clone();
        async move {
            // Off the runtime's threads: the command blocks.
            tokio::task::spawn_blocking(move || {
                let output = std::process::Command::new(binary::path())
                    .args(["keys", "--admin", &admin, "--json"])
                    .args(&args)
                    .output()
                    .unwrap();
                assert!(output.status.success(), "{output:?}");
                serde_json::from_slice::<serde_json::Value>(&output.stdout).unwrap()
            })
            .await
            .unwrap()
        }
    };
    let words = |words: &[&str]| words.iter().map(|w| (*w).to_owned()).collect::<Vec<_>>();
    // Pages of 5: the walk goes on across pages (and, on a cluster, across masters).
    let mut listed = Vec::new();
    let mut token = String::new();
    loop {
        let mut args = words(&["ls", "--limit", "5"]);
        if !token.is_empty() {
            args.extend(words(&["--page-token", &token]));
        }
        let page = keys(args).await;
        listed.extend(page["records"].as_array().unwrap().iter().cloned());
        token = page["next_page_token"].as_str().unwrap().to_owned();
        if token.is_empty() {
            break;
        }
    }
    let mut hashes: Vec<String> = listed
        .iter()
        .map(|r| r["key_hash"].as_str().unwrap().to_owned())
        .collect();
    hashes.sort_unstable();
    hashes.dedup();
    assert_eq!(hashes.len(), serials.len(), "every record once: {listed:?}");
    let stats = keys(words(&["stats"])).await;
    assert_eq!(stats["backend"], "redis");
    assert_eq!(stats["records"], 12, "{stats}");
    let purged = keys(words(&[
        "purge",
        "--key-hash",
        &hashes[0],
        "--operator",
        "ops",
    ]))
    .await;
    assert_eq!(purged["purged"], 1);
    assert_eq!(keys(words(&["stats"])).await["records"], 11);
    sidecar.kill().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operators_list_and_purge_records_on_redis() {
    let redis = RedisServer::start();
    operators_list_and_purge_records("redis", &redis.url()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operators_list_and_purge_records_on_a_cluster() {
    let cluster = RedisCluster::start();
    operators_list_and_purge_records("redis-cluster", &cluster.urls()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readiness_follows_redis() {
    let upstream = ledger::start().await;
    let mut redis = RedisServer::start();
    let url = redis.url();
    let sidecar = start_sidecar(upstream.addr, on_redis(url, Duration::from_millis(500))).await;
    let health = sidecar.running.health.clone();
    let ready = |want: bool| {
        let health = health.clone();
        move || {
            let health = health.clone();
            async move { (health.readiness() == idemproxy::ops::Readiness::Ready) == want }
        }
    };
    support::eventually(Duration::from_secs(10), "ready on Redis", ready(true)).await;
    redis.kill();
    support::eventually(
        Duration::from_secs(10),
        "not ready without Redis",
        ready(false),
    )
    .await;
    redis.restart();
    support::eventually(Duration::from_secs(20), "ready again", ready(true)).await;
}

/// Redis killed -9 under load and restarted from its append-only file (`appendfsync
/// always`, as the test servers run): no key executes twice, every answer is replayed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_killed_under_load_loses_no_acknowledged_claim() {
    redis_killed_under_load("always").await;
}

/// The same with `appendfsync everysec`, Redis' default. A killed process loses nothing
/// either: Redis hands every write to the kernel before it replies, and only the fsync waits
/// for the next second. Its gap is a crash of the machine (the page cache lost), which a kill
/// cannot show; RELIABILITY.md says so.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_everysec_killed_under_load_loses_no_acknowledged_claim() {
    redis_killed_under_load("everysec").await;
}

async fn redis_killed_under_load(appendfsync: &str) {
    use std::collections::HashMap;
    use std::sync::{Arc, Mutex};
    let upstream = ledger::start().await;
    let fsync = appendfsync.to_owned();
    let mut redis = RedisServer::start_with(|_, _| vec!["--appendfsync".into(), fsync]);
    let sidecar = start_sidecar(upstream.addr, |args| {
        on_redis(redis.url(), Duration::from_secs(1))(args);
        // Claims stranded by the crash settle quickly as IN_DOUBT.
        args.default_lease = Duration::from_secs(1);
        args.lease_margin = Duration::from_secs(0);
        args.max_in_flight_wait = Duration::from_secs(0);
    })
    .await;
    let answers = Arc::new(Mutex::new(HashMap::new()));
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let callers: Vec<_> = (0..16)
        .map(|caller| {
            let (answers, stopped) = (answers.clone(), stopped.clone());
            let addr = sidecar.addr;
            tokio::spawn(async move {
                let mut client = client(addr).await;
                let mut sent = Vec::new();
                for n in 0.. {
                    if *stopped.borrow() {
                        break;
                    }
                    let key = format!("k-{caller}-{n}");
                    sent.push(key.clone());
                    if let Ok(reply) = apply(&mut client, add(&key, 1), Some(&key), None).await {
                        answers.lock().unwrap().insert(key, reply.into_inner());
                    }
                }
                sent
            })
        })
        .collect();
    support::eventually(Duration::from_secs(10), "load", || {
        let state = upstream.state.clone();
        async move { state.executions() >= 300 }
    })
    .await;
    redis.kill();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let _ = stop.send(true);
    let mut sent = Vec::new();
    for caller in callers {
        sent.extend(caller.await.unwrap());
    }
    redis.restart();
    tokio::time::sleep(Duration::from_millis(1_100)).await; // Stranded leases run out.
    let mut client = client(sidecar.addr).await;
    let (mut replayed, mut in_doubt) = (0, 0);
    for key in &sent {
        let seen = answers.lock().unwrap().get(key).cloned();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        let outcome = loop {
            match apply(&mut client, add(key, 1), Some(key), None).await {
                Err(status) if reason(&status) == "IDEMPOTENCY_STORE_UNAVAILABLE" => {
                    assert!(
                        tokio::time::Instant::now() < deadline,
                        "Redis did not come back"
                    );
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                outcome => break outcome,
            }
        };
        match (outcome, seen) {
            (Ok(reply), Some(seen)) => {
                assert!(was_replayed(&reply), "{key}: answered, so replayed");
                assert_eq!(reply.get_ref(), &seen);
                replayed += 1;
            }
            (Ok(_), None) => {}
            (Err(status), None) => {
                assert_eq!(reason(&status), "IDEMPOTENCY_OUTCOME_UNKNOWN", "{key}");
                in_doubt += 1;
            }
            (Err(status), Some(_)) => panic!("{key}: an answer was lost: {status:?}"),
        }
    }
    eprintln!(
        "appendfsync {appendfsync}: {} keys, {replayed} replayed, {in_doubt} IN_DOUBT after the Redis crash, {} executed twice",
        sent.len(),
        upstream.state.executed_twice().len()
    );
    assert!(replayed > 0, "answers from before the crash were replayed");
    assert!(upstream.state.executed_twice().is_empty());
}

/// Issue 31, item 5: with `maxmemory-policy allkeys-lru` Redis evicted a recorded outcome
/// inside its retention and its retry ran again. Any policy but `noeviction` keeps the
/// sidecar not ready, and it is ready again once the policy is fixed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_evicting_redis_keeps_the_sidecar_not_ready() {
    let upstream = ledger::start().await;
    let redis = RedisServer::start();
    let port = redis.port;
    support::redis::command(port, &["CONFIG", "SET", "maxmemory-policy", "allkeys-lru"])
        .expect("CONFIG SET");
    let sidecar = start_sidecar(
        upstream.addr,
        on_redis(redis.url(), Duration::from_millis(500)),
    )
    .await;
    let health = sidecar.running.health.clone();
    let readiness = move || health.readiness();
    let not_ready = readiness.clone();
    support::eventually(Duration::from_secs(10), "not ready on allkeys-lru", || {
        let readiness = not_ready.clone();
        async move {
            matches!(readiness(), idemproxy::ops::Readiness::NotReady(why) if why.contains("allkeys-lru"))
        }
    })
    .await;
    support::redis::command(port, &["CONFIG", "SET", "maxmemory-policy", "noeviction"])
        .expect("CONFIG SET");
    support::eventually(Duration::from_secs(10), "ready on noeviction", || {
        let readiness = readiness.clone();
        async move { readiness() == idemproxy::ops::Readiness::Ready }
    })
    .await;
}

/// On a cluster every node answers `INFO memory`: the sidecar is ready when all say
/// `noeviction`, and not ready when one does not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readiness_reads_the_eviction_policy_of_every_cluster_node() {
    let upstream = ledger::start().await;
    let cluster = RedisCluster::start();
    let sidecar = start_sidecar(upstream.addr, |args| {
        args.store = idemproxy::config::StoreKind::RedisCluster;
        args.redis_url = Some(cluster.urls());
    })
    .await;
    let health = sidecar.running.health.clone();
    let is = move |ready: bool| {
        let health = health.clone();
        move || {
            let health = health.clone();
            async move { (health.readiness() == idemproxy::ops::Readiness::Ready) == ready }
        }
    };
    support::eventually(Duration::from_secs(10), "ready on the cluster", is(true)).await;
    let port = cluster.nodes[2].port;
    support::redis::command(port, &["CONFIG", "SET", "maxmemory-policy", "volatile-lru"])
        .expect("CONFIG SET");
    support::eventually(Duration::from_secs(10), "not ready", is(false)).await;
}
