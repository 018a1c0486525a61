//! The operators' tools end to end: the real binary serving the admin API, the real
//! `idemproxy keys` command against it, records made by real traffic through a counting
//! upstream (COMPLETED, and IN_DOUBT from a service that answers INTERNAL after acting).

// Helpers of tests: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used)]

mod support;

use std::net::{SocketAddr, TcpListener};
use std::process::Command;
use support::binary::{json, keys};
use support::{add, apply, binary, client, ledger, was_replayed};

const APPLY: &str = "/idemproxy.testing.v1.Ledger/Apply";

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A request the service acts on, then answers INTERNAL: its key becomes IN_DOUBT.
fn acts_then_fails(account: &str) -> idemproxy::pb::idemproxy::testing::v1::ApplyRequest {
    let mut request = add(account, 1);
    request.fail_code = 13;
    request
}

async fn sidecar(
    upstream: SocketAddr,
    dir: &std::path::Path,
    extra: &[&str],
) -> (binary::BinarySidecar, String) {
    let admin = format!("127.0.0.1:{}", free_port());
    let mut with_admin = vec!["--admin-listen", admin.as_str()];
    with_admin.extend_from_slice(extra);
    let args = binary::run_args(upstream, dir, &with_admin);
    (binary::start(&args).await, admin)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_operator_finds_resolves_and_purges_records() {
    let upstream = ledger::start().await;
    let dir = tempfile::tempdir().unwrap();
    let (sidecar, admin) = sidecar(upstream.addr, dir.path(), &[]).await;
    let mut client = client(sidecar.addr).await;
    apply(&mut client, add("ok", 1), Some("k-ok"), Some("billing"))
        .await
        .unwrap();
    for serial in ["k-doubt-1", "k-doubt-2"] {
        let _ = apply(
            &mut client,
            acts_then_fails(serial),
            Some(serial),
            Some("billing"),
        )
        .await;
    }
    assert_eq!(upstream.state.executions(), 3);

    // Find them.
    let (code, out, err) = keys(&admin, &["ls", "--state", "IN_DOUBT", "--json"]);
    assert_eq!(code, 0, "{err}");
    let listed = json(&out);
    let in_doubt = listed["records"].as_array().unwrap();
    assert_eq!(in_doubt.len(), 2, "{out}");
    assert!(in_doubt
        .iter()
        .all(|r| r["method"] == APPLY && r["caller"] == "billing"));
    // Regression (issue 33): lower case read as a state nobody is in, a typo as well.
    let (code, out, err) = keys(&admin, &["ls", "--state", "in_doubt", "--json"]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(json(&out)["records"].as_array().unwrap().len(), 2, "{out}");
    let (code, _, err) = keys(&admin, &["ls", "--state", "BOGUS"]);
    assert_eq!(code, 2, "INVALID_ARGUMENT: {err}");
    assert!(
        err.contains("BOGUS") && err.contains("IN_FLIGHT, COMPLETED, IN_DOUBT"),
        "{err}"
    );
    let (code, out, _) = keys(&admin, &["ls", "--caller", "nobody", "--json"]);
    assert_eq!(
        (code, json(&out)["records"].as_array().unwrap().len()),
        (0, 0)
    );
    let (code, out, err) = keys(
        &admin,
        &[
            "get",
            "--method",
            APPLY,
            "--caller",
            "billing",
            "--serial",
            "k-doubt-1",
        ],
    );
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("IN_DOUBT") && out.contains("serial       k-doubt-1"),
        "{out}"
    );
    let (code, out, _) = keys(&admin, &["stats", "--json"]);
    let stats = json(&out);
    assert_eq!(code, 0);
    assert_eq!(
        (stats["records"].as_u64(), stats["in_doubt"].as_u64()),
        (Some(3), Some(2))
    );

    // Forget one: the retry executes again.
    let (code, out, err) = keys(
        &admin,
        &[
            "resolve",
            "--method",
            APPLY,
            "--caller",
            "billing",
            "--serial",
            "k-doubt-1",
            "--forget",
            "--operator",
            "ops@example",
            "--reason",
            "ledger shows no entry",
        ],
    );
    assert_eq!(code, 0, "{out}{err}");
    let again = acts_then_fails("k-doubt-1");
    let forgotten = apply(&mut client, again, Some("k-doubt-1"), Some("billing")).await;
    assert_eq!(
        forgotten.unwrap_err().code(),
        tonic::Code::Internal,
        "it ran again"
    );
    assert_eq!(upstream.state.executions(), 4);

    // Complete the other with the known outcome: the retry gets it, not the service.
    let (_, out, _) = keys(
        &admin,
        &[
            "get",
            "--method",
            APPLY,
            "--caller",
            "billing",
            "--serial",
            "k-doubt-2",
            "--json",
        ],
    );
    let hash = json(&out)["key_hash"].as_str().unwrap().to_owned();
    assert!(
        in_doubt.iter().any(|r| r["key_hash"] == hash.as_str()),
        "ls showed it"
    );
    let (code, out, err) = keys(
        &admin,
        &[
            "resolve",
            "--key-hash",
            &hash,
            "--complete",
            "6",
            "--message",
            "already charged",
            "--operator",
            "ops@example",
        ],
    );
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("COMPLETED"), "{out}");
    let failing = acts_then_fails("k-doubt-2");
    let answered = apply(&mut client, failing, Some("k-doubt-2"), Some("billing"))
        .await
        .unwrap_err();
    assert_eq!(answered.code(), tonic::Code::AlreadyExists);
    assert_eq!(answered.message(), "already charged");
    assert!(answered.metadata().get("idempotency-replayed").is_some());
    assert_eq!(upstream.state.executions(), 4, "the service did not see it");

    // A COMPLETED record is not resolved; unknown and malformed keys are clear errors.
    let (code, _, err) = keys(
        &admin,
        &[
            "resolve",
            "--key-hash",
            &hash,
            "--forget",
            "--operator",
            "ops",
        ],
    );
    assert_eq!(code, 4, "{err}");
    assert!(err.contains("only IN_DOUBT"), "{err}");
    let (code, _, err) = keys(&admin, &["get", "--key-hash", &"0".repeat(64)]);
    assert_eq!(code, 1, "{err}");
    let (code, _, err) = keys(&admin, &["get", "--key-hash", "xyz"]);
    assert_eq!(code, 2, "{err}");
    let (code, _, err) = keys(&admin, &["ls", "--page-token", "zz"]);
    assert_eq!(code, 2, "{err}");

    // Purge the COMPLETED one: its key is free again.
    let (code, out, err) = keys(
        &admin,
        &[
            "purge",
            "--method",
            APPLY,
            "--caller",
            "billing",
            "--serial",
            "k-ok",
            "--operator",
            "ops",
        ],
    );
    assert_eq!(code, 0, "{out}{err}");
    let rerun = apply(&mut client, add("ok", 1), Some("k-ok"), Some("billing"))
        .await
        .unwrap();
    assert!(!was_replayed(&rerun));
    assert_eq!(upstream.state.executions(), 5);
    let (code, out, _) = keys(&admin, &["purge", "--all-expired", "--json"]);
    assert_eq!((code, json(&out)["purged"].as_u64()), (0, Some(0)));
    sidecar.kill().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admin_api_wants_its_token_and_refuses_an_open_bind_without_one() {
    let upstream = ledger::start().await;
    let dir = tempfile::tempdir().unwrap();
    let token_file = dir.path().join("token");
    std::fs::write(&token_file, "s3cret-admin\n").unwrap();
    let token_path = token_file.display().to_string();
    let (sidecar, admin) = sidecar(
        upstream.addr,
        &dir.path().join("data"),
        &["--admin-token-file", &token_path],
    )
    .await;
    let (code, _, err) = keys(&admin, &["stats"]);
    assert_eq!(code, 5, "{err}");
    assert!(err.contains("token"), "{err}");
    let (code, out, err) = keys(&admin, &["stats", "--token-file", &token_path]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("backend      sled"), "{out}");
    sidecar.kill().await;

    // Not on loopback and no token: refused before anything starts.
    let output = Command::new(binary::path())
        .args(["run", "--upstream", &format!("http://{}", upstream.addr)])
        .args(["--admin-listen", "0.0.0.0:0", "--listen", "127.0.0.1:0"])
        .arg("--data-dir")
        .arg(dir.path().join("other"))
        .env_remove("IDEMPROXY_ADMIN_TOKEN")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_ne!(output.status.code(), Some(0));
    assert!(
        stderr.contains("--admin-listen") && stderr.contains("token"),
        "{stderr}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpcurl_style_tools_find_health_and_reflection_on_the_admin_port() {
    use tonic_health::pb::health_client::HealthClient;
    use tonic_health::pb::HealthCheckRequest;
    let upstream = ledger::start().await;
    let dir = tempfile::tempdir().unwrap();
    let (sidecar, admin) = sidecar(upstream.addr, dir.path(), &[]).await;
    let channel = tonic::transport::Channel::from_shared(format!("http://{admin}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let health = HealthClient::new(channel.clone())
        .check(HealthCheckRequest {
            service: "idemproxy.v1.Admin".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(health.status, 1, "SERVING");
    let reflected = idemproxy::policy::reflection::fetch(
        &format!("http://{admin}"),
        std::time::Duration::from_secs(5),
    )
    .await
    .unwrap();
    let pool = prost_reflect::DescriptorPool::decode(&reflected[..]).unwrap();
    assert!(pool.get_service_by_name("idemproxy.v1.Admin").is_some());
    // Both reflection versions list the admin service (issue 21: v1alpha was UNIMPLEMENTED).
    macro_rules! listed_services {
        ($version:ident) => {{
            use tonic_reflection::pb::$version as pb;
            let request = pb::ServerReflectionRequest {
                host: String::new(),
                message_request: Some(pb::server_reflection_request::MessageRequest::ListServices(
                    String::new(),
                )),
            };
            let mut answers =
                pb::server_reflection_client::ServerReflectionClient::new(channel.clone())
                    .server_reflection_info(tokio_stream::iter([request]))
                    .await
                    .unwrap_or_else(|status| panic!("{}: {status:?}", stringify!($version)))
                    .into_inner();
            let answer = answers.message().await.unwrap().unwrap();
            match answer.message_response {
                Some(pb::server_reflection_response::MessageResponse::ListServicesResponse(
                    list,
                )) => list
                    .service
                    .into_iter()
                    .map(|service| service.name)
                    .collect::<Vec<_>>(),
                other => panic!("{}: {other:?}", stringify!($version)),
            }
        }};
    }
    assert!(listed_services!(v1).contains(&"idemproxy.v1.Admin".to_owned()));
    assert!(listed_services!(v1alpha).contains(&"idemproxy.v1.Admin".to_owned()));
    sidecar.kill().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ls_pages_through_every_record_once() {
    let upstream = ledger::start().await;
    let dir = tempfile::tempdir().unwrap();
    let (sidecar, admin) = sidecar(upstream.addr, dir.path(), &[]).await;
    let mut client = client(sidecar.addr).await;
    for n in 0..7 {
        let serial = format!("page-{n}");
        apply(&mut client, add(&serial, 1), Some(&serial), None)
            .await
            .unwrap();
    }
    let mut seen = std::collections::BTreeSet::new();
    let mut token = String::new();
    for _ in 0..10 {
        let mut args = vec!["ls", "--limit", "3", "--json"];
        if !token.is_empty() {
            args.extend(["--page-token", &token]);
        }
        let (code, out, err) = keys(&admin, &args);
        assert_eq!(code, 0, "{err}");
        let page = json(&out);
        let records = page["records"].as_array().unwrap();
        assert!(records.len() <= 3, "a page holds at most --limit records");
        for record in records {
            assert!(
                seen.insert(record["key_hash"].as_str().unwrap().to_owned()),
                "listed twice"
            );
        }
        token = page["next_page_token"].as_str().unwrap().to_owned();
        if token.is_empty() {
            break;
        }
    }
    assert_eq!(seen.len(), 7, "every record, once");
    sidecar.kill().await;
}

/// Issue 31, item 6: the admin API (it can purge and resolve records) took a bearer token
/// over plaintext HTTP/2 on any address. Off loopback it now needs TLS, and `keys` verifies
/// the certificate against `--ca-file`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn off_loopback_the_admin_api_speaks_tls_and_keys_verifies_it() {
    let upstream = ledger::start().await;
    let dir = tempfile::tempdir().unwrap();
    let (ca, cert, key) = support::tls::ca_and_server(dir.path());
    let token_file = dir.path().join("token");
    std::fs::write(&token_file, "s3cret-admin\n").unwrap();
    let token_path = token_file.display().to_string();
    let port = free_port();
    let listen = format!("0.0.0.0:{port}");
    let cert = cert.display().to_string();
    let key = key.display().to_string();
    let data = dir.path().join("data");
    let plain = tokio::process::Command::new(binary::path())
        .arg("run")
        .args(binary::run_args(upstream.addr, &data, &[]))
        .args(["--admin-listen", &listen, "--admin-token-file", &token_path])
        .kill_on_drop(true)
        .output();
    let plain = tokio::time::timeout(std::time::Duration::from_secs(20), plain)
        .await
        .expect("refused at start, not served in the clear")
        .unwrap();
    let stderr = String::from_utf8_lossy(&plain.stderr);
    assert_ne!(
        plain.status.code(),
        Some(0),
        "a token in the clear: {stderr}"
    );
    assert!(
        stderr.contains("--admin-listen") && stderr.contains("TLS"),
        "{stderr}"
    );
    let extra = [
        "--admin-listen",
        &listen,
        "--admin-token-file",
        &token_path,
        "--admin-tls-cert",
        &cert,
        "--admin-tls-key",
        &key,
    ];
    let sidecar = binary::start(&binary::run_args(upstream.addr, &data, &extra)).await;
    let https = format!("https://127.0.0.1:{port}");
    let ca = ca.display().to_string();
    let (code, out, err) = keys(
        &https,
        &["stats", "--token-file", &token_path, "--ca-file", &ca],
    );
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("backend      sled"), "{out}");
    let (code, _, err) = keys(&https, &["stats", "--token-file", &token_path]);
    assert_ne!(code, 0);
    assert!(err.contains("--ca-file"), "{err}");
    let (code, _, _) = keys(
        &format!("127.0.0.1:{port}"),
        &["stats", "--token-file", &token_path],
    );
    assert_ne!(code, 0, "plaintext gets nothing from a TLS admin port");
    sidecar.kill().await;
}
