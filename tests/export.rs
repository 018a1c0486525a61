//! Reconciliation export (issue 40): the real `idemproxy keys export` against a sidecar's
//! admin listener, after real traffic through a counting upstream, on the store
//! `IDEMPROXY_TEST_STORE` names (`scripts/test` runs this file on each). The export lists every
//! key once, a page at a time whatever the page size; its COMPLETED records with status 0 are
//! the service's executions of OK calls; CSV (read by Python's csv module) and JSON lines say
//! the same; `--state` and `--since` filter; serials only with `--with-serial`, and never a
//! response's bytes, with records sealed at rest.

// Helpers of tests: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used)]

mod support;

use idemproxy::key::Key;
use idemproxy::pb::idemproxy::example::v1::payments_client::PaymentsClient;
use idemproxy::store::Store;
use serde_json::Value;
use std::collections::{HashMap, HashSet};
use std::io::Write;
use std::time::Duration;
use support::{add, apply, client, ledger, payments, start_sidecar, Sidecar};

const APPLY: &str = "/idemproxy.testing.v1.Ledger/Apply";

/// Keys of the run, and how many requests the sidecar serves at once.
const KEYS: usize = 3_000;
const IN_PARALLEL: usize = 16;

/// Records sled keeps one key each before the sweeper packs them into slices: low, so that
/// the export reads `records` and slices both (other stores ignore it).
const PACK_RECORDS: u64 = 1_000;

/// What key `i` of the run is answered with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Answer {
    Ok,
    /// FAILED_PRECONDITION: a deterministic answer, recorded and replayed.
    Refused,
    /// INTERNAL after acting: IN_DOUBT, nothing recorded.
    Broken,
}

fn answer(i: usize) -> Answer {
    match i % 30 {
        29 => Answer::Broken,
        n if n % 10 == 7 => Answer::Refused,
        _ => Answer::Ok,
    }
}

/// The caller of key `i`: one with a comma and quotes (which CSV must quote), one named by
/// its header, and the anonymous caller.
fn caller(i: usize) -> Option<&'static str> {
    [Some("billing"), Some("shop, \"eu\""), None][i % 3]
}

/// How often key `i` is sent: some twice, some three times.
fn sends(i: usize) -> usize {
    1 + usize::from(i % 4 == 1) + usize::from(i % 7 == 3)
}

fn serial(i: usize) -> String {
    format!("order-{i}")
}

/// The key hash the sidecar derives for key `i`.
fn key_hash(i: usize) -> String {
    let caller = caller(i).unwrap_or(idemproxy::key::ANONYMOUS_CALLER);
    Key::derive(APPLY, caller, serial(i).as_bytes()).hex()
}

/// Sends every key of the run, `sends(i)` times each, `IN_PARALLEL` at a time.
async fn run_traffic(sidecar: &Sidecar) {
    let mut workers = Vec::new();
    for worker in 0..IN_PARALLEL {
        let addr = sidecar.addr;
        workers.push(tokio::spawn(async move {
            let mut client = client(addr).await;
            for i in (worker..KEYS).step_by(IN_PARALLEL) {
                let mut request = add(&serial(i), 1);
                request.fail_code = match answer(i) {
                    Answer::Ok => 0,
                    Answer::Refused => 9,
                    Answer::Broken => 13,
                };
                for _ in 0..sends(i) {
                    let _ = apply(&mut client, request.clone(), Some(&serial(i)), caller(i)).await;
                }
            }
        }));
    }
    for worker in workers {
        worker.await.unwrap();
    }
}

/// Waits until the sled store packed records into slices and moved them out of `records`
/// (on the other stores at once): an export then crosses from `records` into slices, and no
/// move runs under it.
async fn settle(sidecar: &Sidecar) {
    let store = sidecar.running.store.clone();
    if let idemproxy::store::AnyStore::Sled(sled) = &*store {
        support::eventually(Duration::from_secs(30), "records packed", || {
            let packed = sled.packed_records();
            let unpacked = sled.usage().records.saturating_sub(packed);
            async move { packed > 0 && unpacked < PACK_RECORDS }
        })
        .await;
    }
    // A round of our own waits for the sweeper's (it holds the walk, its moves included),
    // and starts no packing with fewer than PACK_RECORDS records unpacked.
    tokio::task::spawn_blocking(move || store.maintain(now_ms()).unwrap())
        .await
        .unwrap();
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

/// `idemproxy keys export ARGS` against `admin`, off the runtime (the sidecar answering it
/// runs on this test's threads): its exit code, standard output and standard error.
async fn export(admin: &str, args: &[&str]) -> (i32, String, String) {
    let admin = admin.to_owned();
    let mut argv = vec!["export".to_owned()];
    argv.extend(args.iter().map(|arg| (*arg).to_owned()));
    tokio::task::spawn_blocking(move || {
        let argv: Vec<&str> = argv.iter().map(String::as_str).collect();
        support::binary::keys(&admin, &argv)
    })
    .await
    .unwrap()
}

/// An export's JSON lines, each parsed.
fn lines(out: &str) -> Vec<Value> {
    out.lines().map(support::binary::json).collect()
}

/// CSV read by Python's csv module (a reader that is not ours): each row as a JSON object
/// keyed by the header row.
fn csv_rows(out: &str) -> Vec<Value> {
    let mut python = std::process::Command::new("python3")
        .args([
            "-c",
            "import csv, json, sys\nfor row in csv.DictReader(sys.stdin): print(json.dumps(row))",
        ])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("python3 runs (scripts/test installs it)");
    // Written from a thread of its own, so neither side waits on the other's full pipe.
    let mut stdin = python.stdin.take().unwrap();
    let text = out.to_owned();
    let writer = std::thread::spawn(move || stdin.write_all(text.as_bytes()).unwrap());
    let read = python.wait_with_output().unwrap();
    writer.join().unwrap();
    assert!(read.status.success(), "python's csv module read the export");
    lines(&String::from_utf8(read.stdout).unwrap())
}

/// The key hashes of an export, each asserted to be listed once.
fn listed_once(records: &[Value]) -> HashSet<String> {
    let mut seen = HashSet::new();
    for record in records {
        let hash = record["key_hash"].as_str().unwrap().to_owned();
        assert!(seen.insert(hash.clone()), "{hash} listed twice");
    }
    seen
}

/// Asserts that an export listed exactly the keys `expected`, naming a few it missed or
/// added.
fn assert_keys(listed: HashSet<String>, expected: &HashSet<String>, what: &str) {
    let missed: Vec<_> = expected.difference(&listed).take(3).collect();
    let added: Vec<_> = listed.difference(expected).take(3).collect();
    assert!(
        missed.is_empty() && added.is_empty(),
        "{what}: {} listed, {} expected; missed {missed:?}…, added {added:?}…",
        listed.len(),
        expected.len()
    );
}

fn field<'a>(record: &'a Value, name: &str) -> &'a str {
    record[name].as_str().unwrap_or("")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_export_lists_every_key_once_and_agrees_with_the_service() {
    let upstream = ledger::start().await;
    let sidecar = start_sidecar(upstream.addr, |args| {
        args.sled_pack_records = PACK_RECORDS;
    })
    .await;
    run_traffic(&sidecar).await;
    assert!(
        upstream.state.executed_twice().is_empty(),
        "no key executed twice"
    );
    settle(&sidecar).await;
    let admin = sidecar.running.admin_addr.to_string();

    let (code, out, err) = export(&admin, &[]).await;
    assert_eq!(code, 0, "{err}");
    let all = lines(&out);
    let expected: HashSet<String> = (0..KEYS).map(key_hash).collect();
    assert_keys(listed_once(&all), &expected, "every key, once");
    let ok_executions: u64 = (0..KEYS)
        .filter(|&i| answer(i) == Answer::Ok)
        .map(|i| upstream.state.executions_of(&serial(i)))
        .sum();
    let completed_ok = all
        .iter()
        .filter(|r| r["state"] == "COMPLETED" && r["status"] == 0)
        .count() as u64;
    assert_eq!(
        completed_ok, ok_executions,
        "COMPLETED with 0 = OK executions"
    );
    let by_hash: HashMap<String, &Value> = all
        .iter()
        .map(|r| (field(r, "key_hash").to_owned(), r))
        .collect();
    for i in 0..KEYS {
        let record = by_hash[&key_hash(i)];
        let (state, status) = match answer(i) {
            Answer::Ok => ("COMPLETED", Value::from(0)),
            Answer::Refused => ("COMPLETED", Value::from(9)),
            Answer::Broken => ("IN_DOUBT", Value::Null),
        };
        assert_eq!(
            (&record["state"], &record["status"]),
            (&state.into(), &status)
        );
        assert_eq!(record["method"], APPLY);
        let caller = caller(i).unwrap_or("-");
        assert_eq!(record["caller"], caller);
        assert!(record.get("serial").is_none(), "no serial unless asked");
        let created = field(record, "created");
        assert!(created.ends_with('Z') && created.len() == 24, "{created}");
        assert!(field(record, "expires") > created, "{record}");
    }

    // CSV, a page of 100 at a time: the same records, quoted so the commas of a caller do
    // not split it.
    let (code, out, err) = export(&admin, &["--format", "csv", "--page-size", "100"]).await;
    assert_eq!(code, 0, "{err}");
    assert!(out.starts_with("key_hash,method,caller,state,status,created,completed,expires\n"));
    let rows = csv_rows(&out);
    assert_keys(listed_once(&rows), &expected, "every key in CSV");
    for row in &rows {
        let line = by_hash[field(row, "key_hash")];
        assert_eq!(field(row, "caller"), field(line, "caller"));
        assert_eq!(field(row, "completed"), field(line, "completed"));
        let status = line["status"].as_u64().map(|code| code.to_string());
        assert_eq!(field(row, "status"), status.unwrap_or_default());
    }

    // --state, with pages so small that most hold no match and still go on.
    let (code, out, err) = export(&admin, &["--state", "in_doubt", "--page-size", "7"]).await;
    assert_eq!(code, 0, "{err}");
    let broken: HashSet<String> = (0..KEYS)
        .filter(|&i| answer(i) == Answer::Broken)
        .map(key_hash)
        .collect();
    assert_keys(listed_once(&lines(&out)), &broken, "--state IN_DOUBT");
    let (code, out, err) = export(&admin, &["--state", "COMPLETED"]).await;
    assert_eq!(code, 0, "{err}");
    assert_eq!(lines(&out).len(), KEYS - broken.len());
    let (code, _, err) = export(&admin, &["--state", "DONE"]).await;
    assert_eq!(code, 2, "INVALID_ARGUMENT: {err}");

    // --since: an RFC 3339 time taken from the records themselves, and a duration ago.
    let mut created: Vec<&str> = all.iter().map(|r| field(r, "created")).collect();
    created.sort_unstable();
    let since = created[created.len() / 2];
    let (code, out, err) = export(&admin, &["--since", since, "--page-size", "250"]).await;
    assert_eq!(code, 0, "{err}");
    let recent: HashSet<String> = all
        .iter()
        .filter(|r| field(r, "created") >= since)
        .map(|r| field(r, "key_hash").to_owned())
        .collect();
    assert!(recent.len() < KEYS, "the time splits the run");
    assert_keys(listed_once(&lines(&out)), &recent, "--since");
    let (code, out, err) = export(&admin, &["--since", "1h"]).await;
    assert_eq!((code, lines(&out).len()), (0, KEYS), "{err}");
    let (code, _, err) = export(&admin, &["--since", "last tuesday"]).await;
    assert_eq!(code, 2, "{err}");
}

/// With `--with-serial`, the serials a probed method keeps (sealed at rest, opened with the
/// sidecar's key); without it, none. Never the recorded response: only its status code. The
/// admin token guards it like every admin call.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serials_only_when_asked_and_never_a_response() {
    let service = payments::start().await;
    let files = tempfile::tempdir().unwrap();
    let set = files.path().join("payments.binpb");
    std::fs::write(&set, idemproxy::pb::EXAMPLE_DESCRIPTOR_SET).unwrap();
    let keys = files.path().join("keys");
    std::fs::write(&keys, "k1 AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=\n").unwrap();
    let token = files.path().join("token");
    std::fs::write(&token, "s3cret-admin-token\n").unwrap();
    let sidecar = start_sidecar(service.addr, |args| {
        args.descriptor_set = vec![set];
        args.encryption_key_file = Some(keys);
        args.admin_token_file = Some(token.clone());
    })
    .await;
    let channel = tonic::transport::Channel::from_shared(format!("http://{}", sidecar.addr))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut client = PaymentsClient::new(channel);
    let serials = ["pay-e1", "pay-e2", "pay-e3"];
    for serial in serials {
        let reply = client
            .charge(payments::charge(serial, "checkout", "ok"))
            .await
            .unwrap();
        assert!(reply
            .get_ref()
            .charge_id
            .starts_with(&format!("ch-{serial}-")));
    }
    let admin = sidecar.running.admin_addr.to_string();
    let token = token.display().to_string();

    let (code, _, err) = export(&admin, &[]).await;
    assert_eq!(code, 5, "refused without the token: {err}");
    let (code, out, err) = export(&admin, &["--token-file", &token]).await;
    assert_eq!(code, 0, "{err}");
    assert_eq!(lines(&out).len(), 3);
    assert!(!out.contains("pay-e") && !out.contains("serial"), "{out}");
    let (code, csv, err) = export(&admin, &["--token-file", &token, "--format", "csv"]).await;
    assert_eq!(code, 0, "{err}");
    assert!(!csv.contains("pay-e") && !csv.contains("serial"), "{csv}");

    let (code, out, err) = export(&admin, &["--token-file", &token, "--with-serial"]).await;
    assert_eq!(code, 0, "{err}");
    let mut shown: Vec<String> = lines(&out)
        .iter()
        .map(|r| field(r, "serial").to_owned())
        .collect();
    shown.sort();
    assert_eq!(shown, serials, "each record's serial, opened");
    let (code, csv, err) = export(
        &admin,
        &["--token-file", &token, "--format", "csv", "--with-serial"],
    )
    .await;
    assert_eq!(code, 0, "{err}");
    let rows = csv_rows(&csv);
    assert!(rows.iter().all(|row| field(row, "status") == "0"));
    let mut shown: Vec<&str> = rows.iter().map(|row| field(row, "serial")).collect();
    shown.sort_unstable();
    assert_eq!(shown, serials);
    // The charge ids are in the recorded responses only: none is printed, with the key held.
    for output in [&out, &csv] {
        assert!(!output.contains("ch-pay-e"), "{output}");
    }
    assert_eq!(service.executions.charges(), 3);
}
