//! What is PostgreSQL's own in the PostgreSQL store (issue 32), on a real PostgreSQL: the
//! schema made once by replicas starting together and refused when newer, group commit
//! (many claims, few transactions), a statement whose connection breaks (committed or not),
//! expiry in short batches, and readiness without a synchronous standby. The dedup suite
//! runs on this store too (`IDEMPROXY_TEST_STORE=postgres`, `scripts/test`).

// A failed unwrap is a failed test.
#![allow(clippy::unwrap_used)]

mod support;

use idemproxy::key::Key;
use idemproxy::record::{Change, Record, State};
use idemproxy::store::postgres::{
    PostgresOptions, PostgresStore, EXPECTED_BYTES_MAX, EXPIRE_BATCH_RECORDS,
};
use idemproxy::store::{Operation, Store};
use prost::Message;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;
use support::postgres::{fresh_table, shared, PostgresServer};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn store_at(url: &str, table: &str, require_sync_replica: bool) -> PostgresStore {
    let options = PostgresOptions::new(
        url,
        None,
        None,
        table,
        Duration::from_secs(5),
        require_sync_replica,
    )
    .unwrap();
    PostgresStore::new(&options).unwrap()
}

fn key(n: u64) -> Key {
    Key::derive("/test.Svc/Call", "caller", n.to_string().as_bytes())
}

/// An IN_FLIGHT record that lives long after the test.
fn claim_record(token: u8) -> Record {
    Record {
        version: 1,
        state: State::InFlight as i32,
        caller: "caller".into(),
        token: vec![token; 16],
        expires_ms: u64::MAX / 4,
        lease_until_ms: u64::MAX / 4,
        ..Record::default()
    }
}

/// Claims `key` if it is free: true when this call wrote the record.
async fn claim(store: &PostgresStore, key: &Key, token: u8) -> bool {
    store
        .update(Operation::Claim, key, |current| match current {
            None => (Change::Put(claim_record(token)), true),
            Some(_) => (Change::Keep, false),
        })
        .await
        .unwrap()
}

/// Write transactions PostgreSQL has started so far (each takes a transaction id; this
/// query takes one too).
async fn transactions(client: &tokio_postgres::Client) -> i64 {
    client
        .query_one("SELECT pg_current_xact_id()::text::int8", &[])
        .await
        .unwrap()
        .get(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_of_two_services_starting_together_create_the_schema_once() {
    let server = shared();
    // A schema of its own, so that its version table is made by this test's stores; two
    // services (two tables) share it, as several services may share one database.
    let schema = fresh_table();
    let client = server.connect().await;
    client
        .batch_execute(&format!("CREATE SCHEMA {schema}"))
        .await
        .unwrap();
    let tables = [format!("{schema}.first"), format!("{schema}.second")];
    let stores: Vec<_> = (0..8)
        .map(|n| Arc::new(store_at(&server.url(), &tables[n % 2], false)))
        .collect();
    // Each store's first write connects and makes the schema ready, all at once.
    let claims: Vec<_> = stores
        .iter()
        .enumerate()
        .map(|(n, store)| {
            let store = store.clone();
            tokio::spawn(async move { claim(&store, &key(n as u64), 1).await })
        })
        .collect();
    for claimed in claims {
        assert!(claimed.await.unwrap(), "every replica starts and claims");
    }
    for table in &tables {
        let version: i32 = client
            .query_one(
                &format!("SELECT version FROM {schema}.idemproxy_schema WHERE table_name = $1"),
                &[table],
            )
            .await
            .unwrap()
            .get(0);
        assert_eq!(version, idemproxy::store::postgres::schema::SCHEMA_VERSION);
        let records: i64 = client
            .query_one(&format!("SELECT count(*) FROM {table}"), &[])
            .await
            .unwrap()
            .get(0);
        assert_eq!(records, 4);
    }
}

#[tokio::test]
async fn a_table_written_by_a_newer_release_is_refused() {
    let server = shared();
    let table = fresh_table();
    assert!(claim(&store_at(&server.url(), &table, false), &key(1), 1).await);
    let client = server.connect().await;
    client
        .execute(
            "UPDATE idemproxy_schema SET version = 99 WHERE table_name = $1",
            &[&table],
        )
        .await
        .unwrap();
    let newer = store_at(&server.url(), &table, false)
        .update(Operation::Read, &key(2), |_| (Change::Keep, ()))
        .await
        .unwrap_err()
        .to_string();
    assert!(newer.contains("schema version 99"), "{newer}");
    assert!(newer.contains("newer than this release"), "{newer}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn claims_waiting_together_share_one_commit() {
    // A server of its own: every transaction on it is this test's.
    let server = PostgresServer::start(&[]);
    let store = Arc::new(store_at(&server.url(), "records", false));
    assert!(claim(&store, &key(0), 1).await, "the schema is ready");
    let client = server.connect().await;
    let calls = 200;
    let before = transactions(&client).await;
    let claims: Vec<_> = (1..=calls)
        .map(|n| {
            let store = store.clone();
            tokio::spawn(async move { claim(&store, &key(n), 1).await })
        })
        .collect();
    for claimed in claims {
        assert!(claimed.await.unwrap());
    }
    let commits = transactions(&client).await - before - 1;
    let (statements, swaps) = store.commits();
    println!(
        "{calls} claims: {commits} transactions on PostgreSQL; the store sent {swaps} swaps in {statements} statements"
    );
    assert!(
        commits > 0 && commits <= calls as i64 / 4,
        "{calls} concurrent claims took {commits} commits: group commit is not grouping"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn callers_going_again_together_are_gathered_into_one_statement() {
    // Callers that each claim a key, complete it and go on to the next, as the calls of a
    // busy service do: a statement's answers set them all going again at once. Sent as soon
    // as the first of them is queued, the next statement would leave the others behind, and
    // the callers would split into groups taking turns, each statement carrying about half
    // of them (`store/postgres/pace.rs`).
    let server = shared();
    let store = Arc::new(store_at(&server.url(), &fresh_table(), false));
    assert!(claim(&store, &key(0), 1).await, "the schema is ready");
    let (callers, rounds) = (16_u64, 40_u64);
    let before = store.commits();
    let tasks: Vec<_> = (0..callers)
        .map(|caller| {
            let store = store.clone();
            tokio::spawn(async move {
                for round in 0..rounds {
                    let key = key(1_000 + caller * rounds + round);
                    assert!(claim(&store, &key, 1).await);
                    let done = completed_record(1, u64::MAX / 4, 16);
                    store
                        .update(Operation::Complete, &key, |_| {
                            (Change::Put(done.clone()), ())
                        })
                        .await
                        .unwrap();
                }
            })
        })
        .collect();
    for task in tasks {
        task.await.unwrap();
    }
    let (statements, swaps) = store.commits();
    let (statements, swaps) = (statements - before.0, swaps - before.1);
    let per_statement = swaps as f64 / statements as f64;
    println!(
        "{callers} callers: {swaps} swaps in {statements} statements, {per_statement:.1} each"
    );
    assert_eq!(swaps, 2 * callers * rounds);
    assert!(
        per_statement >= 0.75 * callers as f64,
        "{per_statement:.1} swaps a statement for {callers} callers: they were not gathered"
    );
}

/// A TCP relay to PostgreSQL that, once armed, passes on the next bytes the client sends and
/// then cuts both connections: the statement reaches the server, its answer never comes back.
struct Cutter {
    port: u16,
    armed: Arc<AtomicBool>,
}

async fn cutter(server_port: u16) -> Cutter {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let armed = Arc::new(AtomicBool::new(false));
    let relay_armed = armed.clone();
    tokio::spawn(async move {
        while let Ok((client, _)) = listener.accept().await {
            let server = tokio::net::TcpStream::connect(("127.0.0.1", server_port))
                .await
                .unwrap();
            let armed = relay_armed.clone();
            tokio::spawn(async move {
                let (mut from_client, mut to_client) = client.into_split();
                let (mut from_server, mut to_server) = server.into_split();
                let up = async {
                    let mut buffer = vec![0; 64 * 1024];
                    loop {
                        let n = from_client.read(&mut buffer).await.unwrap_or(0);
                        if n == 0 || to_server.write_all(&buffer[..n]).await.is_err() {
                            return;
                        }
                        if armed.swap(false, Ordering::SeqCst) {
                            return; // Cut: both connections close as the halves drop.
                        }
                    }
                };
                let down = tokio::io::copy(&mut from_server, &mut to_client);
                tokio::select! {
                    () = up => {}
                    _ = down => {}
                }
            });
        }
    });
    Cutter { port, armed }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_swap_committed_without_an_answer_counts_as_applied_once() {
    let server = shared();
    let relay = cutter(server.port).await;
    let url = format!(
        "host=127.0.0.1 port={} user={} dbname=postgres",
        relay.port,
        support::postgres::USER
    );
    let store = store_at(&url, &fresh_table(), false);
    assert!(claim(&store, &key(0), 1).await, "the schema is ready");
    // The cut statement commits, or is ended by the settling before it does (then the claim
    // is decided again and made anew): try keys until the committed case has been seen.
    for n in 1..=20 {
        let runs = AtomicUsize::new(0);
        let owned = store
            .update(Operation::Claim, &key(n), |current| {
                runs.fetch_add(1, Ordering::SeqCst);
                // The swap this run decides is the next thing sent: cut the connection after it.
                relay.armed.store(true, Ordering::SeqCst);
                match current {
                    None => (Change::Put(claim_record(7)), true),
                    Some(_) => (Change::Keep, false),
                }
            })
            .await
            .expect("the outcome is settled by reading the record again");
        // Had the broken swap been taken as refused, the next run would have found the claim
        // it committed and called it another's.
        assert!(owned, "the claim that landed is this call's");
        let stored = store
            .update(Operation::Read, &key(n), |current| {
                (Change::Keep, current.cloned())
            })
            .await;
        assert_eq!(stored.unwrap(), Some(claim_record(7)));
        if runs.load(Ordering::SeqCst) == 1 {
            return; // Committed without an answer, and counted as applied once.
        }
    }
    panic!("in 20 cut statements none committed before it was settled");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_killed_before_its_commit_is_settled_and_decided_again() {
    let server = shared();
    let table = fresh_table();
    let store = Arc::new(store_at(&server.url(), &table, false));
    assert!(claim(&store, &key(0), 1).await, "the schema is ready");
    // Writes to the table wait behind this lock; reads do not.
    let mut blocker = server.connect().await;
    let lock = blocker.transaction().await.unwrap();
    lock.batch_execute(&format!("LOCK TABLE {table} IN SHARE ROW EXCLUSIVE MODE"))
        .await
        .unwrap();
    let runs = Arc::new(AtomicUsize::new(0));
    let claiming = {
        let (store, runs) = (store.clone(), runs.clone());
        tokio::spawn(async move {
            store
                .update(Operation::Claim, &key(1), |current| {
                    runs.fetch_add(1, Ordering::SeqCst);
                    match current {
                        None => (Change::Put(claim_record(9)), true),
                        Some(_) => (Change::Keep, false),
                    }
                })
                .await
        })
    };
    let killer = server.connect().await;
    let waiting = "SELECT pid FROM pg_stat_activity WHERE application_name = 'idemproxy' \
                   AND wait_event_type = 'Lock'";
    let mut pid: Option<i32> = None;
    for _ in 0..200 {
        pid = killer
            .query_opt(waiting, &[])
            .await
            .unwrap()
            .map(|row| row.get(0));
        if pid.is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let pid = pid.expect("the swap waits for the lock");
    killer
        .execute("SELECT pg_terminate_backend($1)", &[&pid])
        .await
        .unwrap();
    lock.rollback().await.unwrap();
    let owned = claiming.await.unwrap().expect("settled, not failed");
    assert!(owned, "the key was free: the claim is made again and lands");
    assert_eq!(
        runs.load(Ordering::SeqCst),
        2,
        "decided again on the record read after"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expired_records_leave_in_short_batches() {
    let server = PostgresServer::start(&[]);
    let store = Arc::new(store_at(&server.url(), "records", false));
    assert!(
        claim(&store, &key(0), 1).await,
        "the schema is ready (one live record)"
    );
    let client = server.connect().await;
    let expired = 2 * EXPIRE_BATCH_RECORDS + EXPIRE_BATCH_RECORDS / 2;
    client
        .execute(
            "INSERT INTO records (key, value, expires_ms, caller) \
             SELECT sha256(g::text::bytea), '', 1000, 'c' FROM generate_series(1, $1::int8) AS g",
            &[&expired],
        )
        .await
        .unwrap();
    let before = transactions(&client).await;
    let maintaining = store.clone();
    let done = tokio::task::spawn_blocking(move || maintaining.maintain(2000))
        .await
        .unwrap()
        .unwrap();
    let statements = transactions(&client).await - before - 1;
    assert_eq!(done.expired, expired as u64);
    assert_eq!(
        statements, 3,
        "2,500 expired records in batches of 1,000: three short transactions"
    );
    assert_eq!(store.usage().records, 1, "the live record stays");
}

#[tokio::test]
async fn without_a_synchronous_standby_the_store_is_not_ready_when_one_is_required() {
    let server = shared();
    let table = fresh_table();
    let lenient = store_at(&server.url(), &table, false);
    lenient
        .check()
        .await
        .expect("ready: no standby is required");
    assert_eq!(lenient.sync_standbys(), Some(0));
    let strict = store_at(&server.url(), &table, true);
    let refused = strict.check().await.unwrap_err().to_string();
    assert!(refused.contains("no synchronous standby"), "{refused}");
    assert!(
        refused.contains("--postgres-require-sync-replica"),
        "{refused}"
    );
}

#[tokio::test]
async fn a_table_of_schema_version_1_is_migrated_in_place() {
    let server = shared();
    let schema = fresh_table();
    let table = format!("{schema}.records");
    let client = server.connect().await;
    // What the first release made: its table, a record in it, its version row.
    client
        .batch_execute(&format!(
            "CREATE SCHEMA {schema}; \
             CREATE TABLE {table} (key bytea PRIMARY KEY, value bytea NOT NULL, \
               expires_ms bigint NOT NULL, caller text NOT NULL); \
             CREATE INDEX records_expires ON {table} (expires_ms); \
             CREATE INDEX records_caller ON {table} (caller, expires_ms); \
             CREATE TABLE {schema}.idemproxy_schema \
               (table_name text PRIMARY KEY, version integer NOT NULL); \
             INSERT INTO {schema}.idemproxy_schema VALUES ('{table}', 1)"
        ))
        .await
        .unwrap();
    let kept = claim_record(7).encode_to_vec();
    client
        .execute(
            &format!("INSERT INTO {table} VALUES ($1, $2, 1000000000000000, 'caller')"),
            &[&&key(1).as_bytes()[..], &kept],
        )
        .await
        .unwrap();
    let store = store_at(&server.url(), &table, false);
    assert!(
        !claim(&store, &key(1), 8).await,
        "the first release's record is read"
    );
    assert!(claim(&store, &key(2), 8).await);
    let row = client
        .query_one(
            &format!(
                "SELECT (SELECT version FROM {schema}.idemproxy_schema), \
                        (SELECT reloptions::text FROM pg_class WHERE oid = '{table}'::regclass), \
                        (SELECT bool_or(watched) FROM {table})"
            ),
            &[],
        )
        .await
        .unwrap();
    let (version, options, watched): (i32, String, bool) = (row.get(0), row.get(1), row.get(2));
    assert_eq!(version, idemproxy::store::postgres::schema::SCHEMA_VERSION);
    assert_eq!(
        options,
        format!(
            "{{fillfactor={}}}",
            idemproxy::store::postgres::schema::FILLFACTOR
        )
    );
    assert!(!watched, "nobody waits on either record");
}

/// A record as an attempt completes it: the claim's, with an answer of `body_bytes`.
fn completed_record(token: u8, expires_ms: u64, body_bytes: usize) -> Record {
    Record {
        state: State::Completed as i32,
        expires_ms,
        response: Some(idemproxy::record::Response {
            body: vec![7; body_bytes].into(),
            ..Default::default()
        }),
        ..claim_record(token)
    }
}

#[tokio::test]
async fn a_completion_writes_no_index_entry() {
    let server = shared();
    let table = fresh_table();
    let store = store_at(&server.url(), &table, false);
    // Another session's snapshot, as a concurrent test or a long report holds one: the
    // claims' old row versions stay on their pages, and a completion is heap-only only if
    // it fits beside them (a small one always does, under FILLFACTOR; a 100-byte body did
    // for 310 of 400).
    let reader = server.connect().await;
    reader
        .batch_execute("BEGIN ISOLATION LEVEL REPEATABLE READ; SELECT count(*) FROM pg_class")
        .await
        .unwrap();
    // A claim and its completion within one second: their expiries differ, the rows'
    // expiry column does not.
    let claimed_until = 4_000_000_000_001;
    let records = 400_u64;
    for n in 0..records {
        let put = Record {
            expires_ms: claimed_until,
            lease_until_ms: claimed_until,
            ..claim_record(1)
        };
        store
            .update(Operation::Claim, &key(n), |_| {
                (Change::Put(put.clone()), ())
            })
            .await
            .unwrap();
    }
    for n in 0..records {
        let done = completed_record(1, claimed_until + 900, 16);
        store
            .update(Operation::Complete, &key(n), |_| {
                (Change::Put(done.clone()), ())
            })
            .await
            .unwrap();
    }
    // The store's sessions end, and with them PostgreSQL's counts of their updates are in.
    drop(store);
    let client = server.connect().await;
    let counts = || async {
        let row = client
            .query_one(
                "SELECT n_tup_upd, n_tup_hot_upd FROM pg_stat_user_tables \
                 WHERE relid = $1::text::regclass",
                &[&table],
            )
            .await
            .unwrap();
        (row.get::<_, i64>(0), row.get::<_, i64>(1))
    };
    support::eventually(Duration::from_secs(30), "the updates counted", || async {
        counts().await.0 >= records as i64
    })
    .await;
    let (updates, heap_only) = counts().await;
    assert_eq!(
        (updates, heap_only),
        (records as i64, records as i64),
        "completions that wrote index entries: not heap-only updates"
    );
}

/// Replaces the record of `key` in `table` behind the store's back, from a thread of its own
/// (the store's transition closures cannot wait), as another replica's swap would.
fn replace_behind(url: &str, table: &str, key: &Key, record: &Record) {
    let (url, table) = (url.to_owned(), table.to_owned());
    let (key, value) = (key.as_bytes().to_vec(), record.encode_to_vec());
    std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(async {
            let (client, connection) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
                .await
                .unwrap();
            tokio::spawn(connection);
            let update = format!("UPDATE {table} SET value = $1 WHERE key = $2");
            assert_eq!(client.execute(&update, &[&value, &key]).await.unwrap(), 1);
        });
    })
    .join()
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_swap_applies_only_to_the_record_it_was_decided_on_small_or_large() {
    let server = shared();
    let table = fresh_table();
    let store = store_at(&server.url(), &table, false);
    // A swap names a small record whole and a large one by its SHA-256
    // (`EXPECTED_BYTES_MAX`): both are refused once the record changed, and applied after.
    for (n, body_bytes) in [(1_u64, 16_usize), (2, 4 * EXPECTED_BYTES_MAX)] {
        assert!(claim(&store, &key(n), 1).await);
        let done = completed_record(1, u64::MAX / 4, body_bytes);
        store
            .update(Operation::Complete, &key(n), |_| {
                (Change::Put(done.clone()), ())
            })
            .await
            .unwrap();
        let other = completed_record(2, u64::MAX / 4, body_bytes);
        let mut seen = Vec::new();
        store
            .update(Operation::Operator, &key(n), |current| {
                let current = current.expect("the record is there");
                if seen.is_empty() {
                    replace_behind(&server.url(), &table, &key(n), &other);
                }
                seen.push(current.token.clone());
                (Change::Delete, ())
            })
            .await
            .unwrap();
        assert_eq!(
            seen,
            vec![vec![1; 16], vec![2; 16]],
            "{body_bytes}-byte body: the deletion decided on the replaced record was refused, \
             and applied when decided again on the record there now"
        );
        let absent = store
            .update(Operation::Read, &key(n), |current| {
                (Change::Keep, current.is_none())
            })
            .await
            .unwrap();
        assert!(absent, "{body_bytes}-byte body: the record is deleted");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_a_change_somebody_waits_for_is_announced() {
    let server = shared();
    let table = fresh_table();
    let store = store_at(&server.url(), &table, false);
    assert!(claim(&store, &key(1), 1).await);
    assert!(claim(&store, &key(2), 1).await);
    // A listener of the table's channel, as every replica's is.
    let (listener, mut connection) = tokio_postgres::connect(&server.url(), tokio_postgres::NoTls)
        .await
        .unwrap();
    let (heard, mut announced) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        let mut messages = futures_util::stream::poll_fn(move |cx| connection.poll_message(cx));
        while let Some(Ok(message)) = futures_util::StreamExt::next(&mut messages).await {
            if let tokio_postgres::AsyncMessage::Notification(notification) = message {
                let _ = heard.send(notification.payload().to_owned());
            }
        }
    });
    listener
        .batch_execute(&format!("LISTEN \"{table}\""))
        .await
        .unwrap();
    let complete = |n: u64| {
        let store = &store;
        async move {
            store
                .update(Operation::Complete, &key(n), |_| {
                    (Change::Put(completed_record(1, u64::MAX / 4, 10)), ())
                })
                .await
                .unwrap()
        }
    };
    complete(1).await;
    // A duplicate waits on the second record (the mark is its own statement: the wait may
    // end at once, when the mark finds it unmarked).
    let waiting = store.changed(&key(2));
    tokio::time::timeout(Duration::from_secs(10), waiting)
        .await
        .unwrap();
    complete(2).await;
    let first = tokio::time::timeout(Duration::from_secs(10), announced.recv())
        .await
        .expect("the change of the record waited on is announced")
        .unwrap();
    assert_eq!(
        first,
        key(2).hex(),
        "only the record waited on is announced"
    );
}

#[tokio::test]
async fn records_keep_the_bytes_the_other_stores_keep() {
    let server = shared();
    let table = fresh_table();
    let store = store_at(&server.url(), &table, false);
    assert!(claim(&store, &key(3), 4).await);
    let page = store.scan(None, 10).await.unwrap();
    assert_eq!(page.records, vec![(key(3), claim_record(4))]);
    assert_eq!(page.next, None);
    let client = server.connect().await;
    let value: Vec<u8> = client
        .query_one(
            &format!("SELECT value FROM {table} WHERE key = $1"),
            &[&&key(3).as_bytes()[..]],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(value, claim_record(4).encode_to_vec());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_change_on_one_replica_wakes_a_duplicate_waiting_on_another() {
    let server = shared();
    let mut options = PostgresOptions::new(
        &server.url(),
        None,
        None,
        &fresh_table(),
        Duration::from_secs(5),
        false,
    )
    .unwrap();
    // Polling so slow that only a notification can wake the waiter within the test.
    options.poll_interval = Duration::from_secs(600);
    let first = PostgresStore::new(&options).unwrap();
    let second = PostgresStore::new(&options).unwrap();
    assert!(claim(&first, &key(1), 1).await);
    assert!(
        !claim(&second, &key(1), 2).await,
        "a duplicate on the other replica"
    );
    // Both listeners are up: a listener that connects later wakes everyone, which would
    // hide a missing notification.
    let client = server.connect().await;
    support::eventually(Duration::from_secs(10), "both listeners", || {
        let client = &client;
        async move {
            let listening: i64 = client
                .query_one(
                    "SELECT count(*) FROM pg_stat_activity \
                     WHERE application_name = 'idemproxy' AND query LIKE 'LISTEN%'",
                    &[],
                )
                .await
                .unwrap()
                .get(0);
            listening >= 2
        }
    })
    .await;
    let waiting = second.changed(&key(1));
    first
        .update(Operation::Operator, &key(1), |_| {
            (Change::Put(claim_record(3)), ())
        })
        .await
        .unwrap();
    tokio::time::timeout(Duration::from_secs(10), waiting)
        .await
        .expect("the waiter on the other replica is woken by the change's notification");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_synchronous_standby_a_required_one_keeps_new_keys_out() {
    let upstream = support::ledger::start().await;
    let sidecar = support::start_sidecar(upstream.addr, |args| {
        args.store = idemproxy::config::StoreKind::Postgres;
        args.postgres_url = Some(shared().url());
        args.postgres_table = fresh_table();
        args.postgres_require_sync_replica = true;
    })
    .await;
    let ops = sidecar.running.ops_addr;
    support::eventually(Duration::from_secs(10), "not ready", || async move {
        support::http::get(ops, "/readyz").await.0 == 503
    })
    .await;
    let mut client = support::client(sidecar.addr).await;
    let refused = support::apply(&mut client, support::add("a", 1), Some("k"), None)
        .await
        .unwrap_err();
    assert_eq!(refused.code(), tonic::Code::Unavailable);
    assert_eq!(support::reason(&refused), "IDEMPOTENCY_STORE_UNAVAILABLE");
    assert_eq!(upstream.state.executions(), 0, "nothing forwarded");
    // Shown once the first readiness check has read the standbys.
    support::eventually(
        Duration::from_secs(10),
        "the standbys on /metrics",
        || async move {
            let (_, metrics) = support::http::get(ops, "/metrics").await;
            metrics.contains("idemproxy_postgres_sync_standbys 0")
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readiness_follows_the_synchronous_standby() {
    let primary = PostgresServer::start(&[
        "wal_level=replica",
        "max_wal_senders=4",
        "fsync=off",
        "synchronous_standby_names=*",
    ]);
    let standby = primary.start_standby(&["fsync=off"]);
    let store = store_at(&primary.url(), "records", true);
    let ready = |want: bool| {
        let store = &store;
        async move { store.check().await.is_ok() == want }
    };
    support::eventually(Duration::from_secs(30), "ready with a standby", || {
        ready(true)
    })
    .await;
    assert_eq!(store.sync_standbys(), Some(1));
    assert!(claim(&store, &key(1), 1).await, "a new key is taken");

    let standby_dir = tokio::task::spawn_blocking(move || standby.stop_keeping_files())
        .await
        .unwrap();
    support::eventually(Duration::from_secs(30), "not ready without it", || {
        ready(false)
    })
    .await;
    let refused = store
        .update(Operation::Claim, &key(2), |_| {
            (Change::Put(claim_record(2)), ())
        })
        .await
        .unwrap_err()
        .to_string();
    assert!(refused.contains("no synchronous standby"), "{refused}");

    let _standby = tokio::task::spawn_blocking(move || {
        PostgresServer::start_in(standby_dir, support::postgres::free_port(), &["fsync=off"])
    })
    .await
    .unwrap();
    support::eventually(Duration::from_secs(30), "ready once it is back", || {
        ready(true)
    })
    .await;
    assert!(claim(&store, &key(2), 2).await, "new keys are taken again");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sslmode_is_honoured_as_libpq_reads_it() {
    use std::os::unix::fs::PermissionsExt;
    // Certificates PostgreSQL (as the postgres user) can read; the key its own, 0600.
    let certs = tempfile::tempdir().unwrap();
    std::fs::set_permissions(certs.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let (ca, cert, private_key) = support::tls::ca_and_server(certs.path());
    std::fs::set_permissions(&private_key, std::fs::Permissions::from_mode(0o600)).unwrap();
    if let Some((uid, gid)) = support::postgres::run_as() {
        for file in [&cert, &private_key] {
            std::os::unix::fs::chown(file, Some(uid), Some(gid)).unwrap();
        }
    }
    let cert_setting = format!("ssl_cert_file={}", cert.display());
    let key_setting = format!("ssl_key_file={}", private_key.display());
    let server = PostgresServer::start(&["ssl=on", &cert_setting, &key_setting]);
    let url = |mode: &str| {
        format!(
            "postgres://{}@127.0.0.1:{}/postgres?sslmode={mode}",
            support::postgres::USER,
            server.port
        )
    };
    let ca_pem = std::fs::read(&ca).unwrap();
    let store_with = |mode: &str, ca: Option<Vec<u8>>| {
        let options = PostgresOptions::new(
            &url(mode),
            None,
            ca,
            "records",
            Duration::from_secs(5),
            false,
        )
        .unwrap();
        PostgresStore::new(&options).unwrap()
    };
    // verify-full against the server's CA: connects, encrypted.
    let verified = store_with("verify-full", Some(ca_pem.clone()));
    assert!(claim(&verified, &key(1), 1).await);
    let client = server.connect().await;
    let encrypted: i64 = client
        .query_one(
            "SELECT count(*) FROM pg_stat_ssl JOIN pg_stat_activity USING (pid) \
             WHERE application_name = 'idemproxy' AND ssl",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert!(encrypted >= 1, "the sidecar's sessions are encrypted");
    // verify-full against the system's roots, which never signed the server: refused.
    let unverified = store_with("verify-full", None)
        .update(Operation::Read, &key(1), |_| (Change::Keep, ()))
        .await
        .unwrap_err()
        .to_string();
    assert!(unverified.contains("unreachable"), "{unverified}");
    // require: encrypted, the certificate not checked (libpq's meaning).
    assert!(claim(&store_with("require", None), &key(2), 2).await);
    // verify-ca against the right CA, connecting by a name the certificate does not carry.
    let by_name = PostgresOptions::new(
        &format!(
            "host=localhost hostaddr=127.0.0.1 port={} user={} dbname=postgres sslmode=verify-ca",
            server.port,
            support::postgres::USER
        ),
        None,
        Some(ca_pem),
        "records",
        Duration::from_secs(5),
        false,
    )
    .unwrap();
    assert!(claim(&PostgresStore::new(&by_name).unwrap(), &key(3), 3).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_table_stays_near_its_live_bytes_over_fill_and_expire_rounds() {
    // Autovacuum looks every second here (a minute by default), so that rounds are short.
    let server = PostgresServer::start(&["autovacuum_naptime=1", "fsync=off"]);
    let store = Arc::new(store_at(&server.url(), "records", false));
    assert!(claim(&store, &key(0), 1).await, "the schema is ready");
    let client = server.connect().await;
    let (records, value_bytes) = (5_000_i64, 400_i32);
    let mut sizes = Vec::new();
    for round in 0..5_i64 {
        // A round's records, all expiring at once, then expired by the sweeper's batches.
        client
            .execute(
                "INSERT INTO records (key, value, expires_ms, caller) \
                 SELECT sha256((g + $1::int8 * 1000000)::text::bytea), \
                        decode(repeat('ab', $2), 'hex'), 1000, 'c' \
                 FROM generate_series(1, $3::int8) AS g",
                &[&round, &value_bytes, &records],
            )
            .await
            .unwrap();
        let filled: i64 = client
            .query_one("SELECT pg_total_relation_size('records')", &[])
            .await
            .unwrap()
            .get(0);
        let vacuums = || async {
            let count: i64 = client
                .query_one(
                    "SELECT autovacuum_count FROM pg_stat_user_tables WHERE relname = 'records'",
                    &[],
                )
                .await
                .unwrap()
                .get(0);
            count
        };
        let before = vacuums().await;
        let maintaining = store.clone();
        let done = tokio::task::spawn_blocking(move || maintaining.maintain(2_000))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(done.expired, records as u64);
        // PostgreSQL's own vacuum (not one the sidecar runs) makes the space free again.
        support::eventually(Duration::from_secs(60), "autovacuum", || async {
            vacuums().await > before
        })
        .await;
        sizes.push(filled);
    }
    println!("table with indexes, full, per round (bytes): {sizes:?}");
    // Each round's records take the space the last round's freed.
    assert!(
        sizes[4] <= sizes[0] * 3 / 2,
        "the table grows round after round: {sizes:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_claiming_the_same_keys_at_once_never_fail_each_other() {
    // Hedged copies of the same calls reach two replicas at once: their batches hold the
    // same keys, each in its own order.
    let server = shared();
    let table = fresh_table();
    let stores = [
        Arc::new(store_at(&server.url(), &table, false)),
        Arc::new(store_at(&server.url(), &table, false)),
    ];
    assert!(claim(&stores[0], &key(0), 1).await, "the schema is ready");
    for round in 0..10_u64 {
        let mut claims = Vec::new();
        for n in 1..=60_u64 {
            for (replica, store) in stores.iter().enumerate() {
                // Each replica sees the keys in another order.
                let n = if replica == 0 { n } else { 61 - n };
                let store = store.clone();
                let key = key(round * 1_000 + n);
                claims.push(tokio::spawn(async move {
                    store
                        .update(Operation::Claim, &key, |current| match current {
                            None => (Change::Put(claim_record(replica as u8)), true),
                            Some(_) => (Change::Keep, false),
                        })
                        .await
                }));
            }
        }
        let mut owners = 0;
        for claimed in claims {
            owners += usize::from(claimed.await.unwrap().expect("no claim fails another's"));
        }
        assert_eq!(owners, 60, "each key has one owner");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn while_postgres_is_down_calls_fail_closed_and_resume_by_themselves() {
    let server = PostgresServer::start(&["fsync=off"]);
    let (url, port) = (server.url(), server.port);
    let upstream = support::ledger::start().await;
    let sidecar = support::start_sidecar(upstream.addr, move |args| {
        args.store = idemproxy::config::StoreKind::Postgres;
        args.postgres_url = Some(url);
        args.postgres_table = "records".into();
        args.store_timeout = Duration::from_secs(1);
    })
    .await;
    let mut client = support::client(sidecar.addr).await;
    support::apply(&mut client, support::add("a", 1), Some("before"), None)
        .await
        .expect("served while PostgreSQL is up");
    let dir = tokio::task::spawn_blocking(move || server.stop_keeping_files())
        .await
        .unwrap();
    let refused = support::apply(&mut client, support::add("b", 1), Some("during"), None)
        .await
        .unwrap_err();
    assert_eq!(refused.code(), tonic::Code::Unavailable);
    assert_eq!(support::reason(&refused), "IDEMPOTENCY_STORE_UNAVAILABLE");
    assert_eq!(
        upstream.state.executions(),
        1,
        "nothing forwarded without a claim"
    );
    let _server =
        tokio::task::spawn_blocking(move || PostgresServer::start_in(dir, port, &["fsync=off"]))
            .await
            .unwrap();
    support::eventually(Duration::from_secs(30), "calls served again", || {
        let mut client = client.clone();
        async move {
            support::apply(&mut client, support::add("b", 1), Some("after"), None)
                .await
                .is_ok()
        }
    })
    .await;
    let replay = support::apply(&mut client, support::add("a", 1), Some("before"), None)
        .await
        .expect("the answer from before is still there");
    assert!(support::was_replayed(&replay));
    assert_eq!(upstream.state.executions(), 2);
}
