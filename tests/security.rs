//! Who calls (issue: security): under each caller source, two callers with the same serial
//! never see each other's responses; a caller that cannot be trusted is refused, never
//! guessed; mTLS with a real rustls client, and certificates rotated under load.

// A failed unwrap is a failed test.
#![allow(clippy::unwrap_used)]

mod support;

use idemproxy::caller::CallerSource;
use idemproxy::pb::idemproxy::testing::v1::ledger_client::LedgerClient;
use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::time::Duration;
use support::{add, apply, client, ledger, reason, start_sidecar};
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Identity};

/// One call with the key `serial` and extra metadata.
async fn call_with(
    client: &mut LedgerClient<Channel>,
    account: &str,
    serial: &str,
    metadata: &[(&'static str, &str)],
) -> Result<tonic::Response<idemproxy::pb::idemproxy::testing::v1::ApplyReply>, tonic::Status> {
    let mut request = tonic::Request::new(add(account, 1));
    request
        .metadata_mut()
        .insert("idempotency-key", serial.parse().unwrap());
    for (name, value) in metadata {
        request.metadata_mut().insert(*name, value.parse().unwrap());
    }
    client.apply(request).await
}

const ALICE: &str = "spiffe://cluster.local/ns/billing/sa/alice";
const BOB: &str = "spiffe://cluster.local/ns/billing/sa/bob";

#[tokio::test]
async fn under_the_caller_header_two_callers_with_one_serial_stay_apart() {
    let upstream = ledger::start().await;
    let sidecar = start_sidecar(upstream.addr, |args| args.require_caller = true).await;
    let mut client = client(sidecar.addr).await;
    let alice = apply(&mut client, add("a", 1), Some("same"), Some("alice"))
        .await
        .unwrap();
    let bob = apply(&mut client, add("b", 1), Some("same"), Some("bob"))
        .await
        .unwrap();
    assert_eq!(upstream.state.executions(), 2, "one execution per caller");
    for _ in 0..2 {
        let again = apply(&mut client, add("a", 1), Some("same"), Some("alice"))
            .await
            .unwrap();
        assert_eq!(again.get_ref(), alice.get_ref());
        let again = apply(&mut client, add("b", 1), Some("same"), Some("bob"))
            .await
            .unwrap();
        assert_eq!(again.get_ref(), bob.get_ref());
    }
    let missing = apply(&mut client, add("c", 1), Some("same"), None)
        .await
        .unwrap_err();
    assert_eq!(missing.code(), tonic::Code::Unauthenticated);
    assert_eq!(reason(&missing), "IDEMPOTENCY_CALLER_MISSING");
    assert_eq!(upstream.state.executions(), 2);
}

#[tokio::test]
async fn under_xfcc_the_nearest_uri_names_the_caller_and_the_caller_header_is_ignored() {
    let upstream = ledger::start().await;
    let sidecar = start_sidecar(upstream.addr, |args| {
        args.caller_source = Some(CallerSource::parse("xfcc").unwrap());
        args.require_caller = true;
    })
    .await;
    let mut client = client(sidecar.addr).await;
    let xfcc_of =
        |uri: &str| format!("By=spiffe://cluster.local/ns/pay/sa/api;Hash=0a1b;URI={uri}");
    let alice_xfcc = xfcc_of(ALICE);
    let bob_xfcc = xfcc_of(BOB);
    let alice = [("x-forwarded-client-cert", alice_xfcc.as_str())];
    // Bob claims to be Alice in the caller header: ignored under xfcc.
    let bob = [
        ("x-forwarded-client-cert", bob_xfcc.as_str()),
        ("x-caller-id", ALICE),
    ];
    let first = call_with(&mut client, "a", "same", &alice).await.unwrap();
    let second = call_with(&mut client, "b", "same", &bob).await.unwrap();
    assert_eq!(upstream.state.executions(), 2);
    assert_ne!(first.get_ref(), second.get_ref());
    let replay = call_with(&mut client, "a", "same", &alice).await.unwrap();
    assert_eq!(replay.get_ref(), first.get_ref());
    // A proxy in front appended its own element: the nearest (last) one is the caller.
    let chained = format!("URI=spiffe://edge/gateway,{alice_xfcc}");
    let replay = call_with(
        &mut client,
        "a",
        "same",
        &[("x-forwarded-client-cert", &chained)],
    )
    .await
    .unwrap();
    assert_eq!(replay.get_ref(), first.get_ref());
    for malformed in [
        format!("URI={ALICE};URI={BOB}"),
        format!("Subject=\"unterminated;URI={ALICE}"),
        format!("URI={ALICE},"),
    ] {
        let refused = call_with(
            &mut client,
            "a",
            "same",
            &[("x-forwarded-client-cert", &malformed)],
        )
        .await
        .unwrap_err();
        assert_eq!(refused.code(), tonic::Code::Unauthenticated, "{malformed}");
        assert_eq!(reason(&refused), "IDEMPOTENCY_CALLER_INVALID");
    }
    assert_eq!(upstream.state.executions(), 2);
}

/// An address of this machine that is not loopback, so a connection to it comes from a
/// non-loopback peer.
fn outside_address() -> IpAddr {
    for target in ["192.0.2.1:9", "10.0.0.1:9", "192.168.0.1:9", "8.8.8.8:53"] {
        let socket = std::net::UdpSocket::bind("0.0.0.0:0").unwrap();
        if socket.connect(target).is_ok() {
            let ip = socket.local_addr().unwrap().ip();
            if !ip.is_loopback() && !ip.is_unspecified() {
                return ip;
            }
        }
    }
    panic!("this machine has no non-loopback address to test a forged header from")
}

#[tokio::test]
async fn xfcc_from_a_peer_outside_the_pod_is_refused_however_well_formed() {
    let upstream = ledger::start().await;
    let sidecar = start_sidecar(upstream.addr, |args| {
        args.caller_source = Some(CallerSource::parse("xfcc").unwrap());
        args.listen = "0.0.0.0:0".parse().unwrap();
    })
    .await;
    let outside = SocketAddr::new(outside_address(), sidecar.addr.port());
    let mut forger = client(outside).await;
    let forged = format!("URI={ALICE}");
    for xfcc in [forged.as_str(), "URI=a,URI=b", "garbage"] {
        let refused = call_with(&mut forger, "a", "k", &[("x-forwarded-client-cert", xfcc)])
            .await
            .unwrap_err();
        assert_eq!(refused.code(), tonic::Code::Unauthenticated);
        assert_eq!(reason(&refused), "IDEMPOTENCY_CALLER_INVALID");
        assert!(
            refused.message().contains("loopback"),
            "{}",
            refused.message()
        );
    }
    assert_eq!(
        upstream.state.executions(),
        0,
        "nothing forged reached the service"
    );
    // The same header from the pod's own proxy (loopback) is taken.
    let loopback = SocketAddr::new([127, 0, 0, 1].into(), sidecar.addr.port());
    let mut mesh = client(loopback).await;
    call_with(&mut mesh, "a", "k", &[("x-forwarded-client-cert", &forged)])
        .await
        .unwrap();
    assert_eq!(upstream.state.executions(), 1);
}

#[tokio::test]
async fn caller_source_none_files_every_call_under_one_caller() {
    let upstream = ledger::start().await;
    let sidecar = start_sidecar(upstream.addr, |args| {
        args.caller_source = Some(CallerSource::parse("none").unwrap())
    })
    .await;
    let mut client = client(sidecar.addr).await;
    let first = apply(&mut client, add("a", 1), Some("one"), Some("alice"))
        .await
        .unwrap();
    let second = apply(&mut client, add("a", 1), Some("one"), Some("bob"))
        .await
        .unwrap();
    assert!(
        support::was_replayed(&second),
        "one tenant: the header names nobody"
    );
    assert_eq!(first.get_ref(), second.get_ref());
    assert_eq!(upstream.state.executions(), 1);
}

/// A private CA and the certificates it signs.
struct Pki {
    dir: tempfile::TempDir,
    ca: rcgen::CertifiedIssuer<'static, rcgen::KeyPair>,
}

impl Pki {
    fn new(name: &str) -> Pki {
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, format!("{name} test CA"));
        let ca = rcgen::CertifiedIssuer::self_signed(params, rcgen::KeyPair::generate().unwrap())
            .unwrap();
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("ca.pem"), ca.pem()).unwrap();
        Pki { dir, ca }
    }

    fn ca_path(&self) -> std::path::PathBuf {
        self.dir.path().join("ca.pem")
    }

    fn ca_pem(&self) -> String {
        self.ca.pem()
    }

    /// A certificate for `dns` names and `uris`, as (cert PEM, key PEM).
    fn issue(&self, dns: &[&str], uris: &[&str], cn: Option<&str>) -> (String, String) {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params =
            rcgen::CertificateParams::new(dns.iter().map(|d| d.to_string()).collect::<Vec<_>>())
                .unwrap();
        for uri in uris {
            params
                .subject_alt_names
                .push(rcgen::SanType::URI((*uri).try_into().unwrap()));
        }
        if let Some(cn) = cn {
            params
                .distinguished_name
                .push(rcgen::DnType::CommonName, cn);
        }
        let cert = params.signed_by(&key, &self.ca).unwrap();
        (cert.pem(), key.serialize_pem())
    }

    /// Writes a server certificate for localhost to `dir`.
    fn write_server(&self, dir: &Path) {
        let (cert, key) = self.issue(&["localhost"], &[], None);
        std::fs::write(dir.join("tls.crt.new"), cert).unwrap();
        std::fs::write(dir.join("tls.key"), key).unwrap();
        // The certificate lands whole, in one rename, after its key.
        std::fs::rename(dir.join("tls.crt.new"), dir.join("tls.crt")).unwrap();
    }
}

async fn tls_client(
    addr: SocketAddr,
    server_ca: &str,
    identity: Option<&(String, String)>,
) -> Result<LedgerClient<Channel>, tonic::transport::Error> {
    let mut tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(server_ca))
        .domain_name("localhost");
    if let Some((cert, key)) = identity {
        tls = tls.identity(Identity::from_pem(cert, key));
    }
    let channel = Channel::from_shared(format!("https://{addr}"))
        .unwrap()
        .tls_config(tls)?
        .connect()
        .await?;
    Ok(LedgerClient::new(channel))
}

/// A sidecar terminating TLS with `server` PKI's certificate and asking for certificates
/// of `clients`' CA.
async fn mtls_sidecar(
    upstream: SocketAddr,
    server: &Pki,
    clients: &Pki,
    tls_dir: &Path,
    fallback: bool,
) -> support::Sidecar {
    server.write_server(tls_dir);
    let (cert, key, ca) = (
        tls_dir.join("tls.crt"),
        tls_dir.join("tls.key"),
        clients.ca_path(),
    );
    start_sidecar(upstream, move |args| {
        args.caller_source = Some(CallerSource::parse("mtls").unwrap());
        args.tls_cert = Some(cert);
        args.tls_key = Some(key);
        args.client_ca = Some(ca);
        args.caller_subject_fallback = fallback;
        args.require_caller = true;
    })
    .await
}

#[tokio::test]
async fn under_mtls_the_certificate_names_the_caller_and_nothing_else_does() {
    let upstream = ledger::start().await;
    let (server, clients) = (Pki::new("server"), Pki::new("clients"));
    let tls_dir = tempfile::tempdir().unwrap();
    let sidecar = mtls_sidecar(upstream.addr, &server, &clients, tls_dir.path(), false).await;
    let alice_id = clients.issue(&[], &[ALICE], Some("alice"));
    let bob_id = clients.issue(&[], &[BOB], Some("bob"));
    let mut alice = tls_client(sidecar.addr, &server.ca_pem(), Some(&alice_id))
        .await
        .unwrap();
    let mut bob = tls_client(sidecar.addr, &server.ca_pem(), Some(&bob_id))
        .await
        .unwrap();
    let first = call_with(&mut alice, "a", "same", &[]).await.unwrap();
    // Bob names Alice in every header a weaker source would read: ignored.
    let xfcc = format!("URI={ALICE}");
    let spoof = [
        ("x-caller-id", ALICE),
        ("x-forwarded-client-cert", xfcc.as_str()),
    ];
    let second = call_with(&mut bob, "b", "same", &spoof).await.unwrap();
    assert_eq!(upstream.state.executions(), 2);
    assert_ne!(first.get_ref(), second.get_ref());
    let replay = call_with(&mut alice, "a", "same", &[]).await.unwrap();
    assert!(support::was_replayed(&replay));
    assert_eq!(replay.get_ref(), first.get_ref());

    // Two URI SANs: connected, but no caller identity, so refused.
    let two = clients.issue(&[], &[ALICE, BOB], None);
    let mut ambiguous = tls_client(sidecar.addr, &server.ca_pem(), Some(&two))
        .await
        .unwrap();
    let refused = call_with(&mut ambiguous, "a", "same", &[])
        .await
        .unwrap_err();
    assert_eq!(refused.code(), tonic::Code::Unauthenticated);
    assert_eq!(reason(&refused), "IDEMPOTENCY_CALLER_INVALID");
    assert!(
        refused.message().contains("2 URI SANs"),
        "{}",
        refused.message()
    );
    // No URI SAN and no subject fallback: refused too.
    let cn_only = clients.issue(&[], &[], Some("legacy-client"));
    let mut legacy = tls_client(sidecar.addr, &server.ca_pem(), Some(&cn_only))
        .await
        .unwrap();
    let refused = call_with(&mut legacy, "a", "same", &[]).await.unwrap_err();
    assert_eq!(reason(&refused), "IDEMPOTENCY_CALLER_INVALID");

    // No certificate, or one from another CA: the handshake fails, nothing is called.
    let stranger = Pki::new("stranger").issue(&[], &[ALICE], None);
    for identity in [None, Some(&stranger)] {
        let refused = match tls_client(sidecar.addr, &server.ca_pem(), identity).await {
            Err(_) => true,
            Ok(mut client) => call_with(&mut client, "a", "other", &[]).await.is_err(),
        };
        assert!(refused, "a client without a trusted certificate is refused");
    }
    // A plaintext client is not served either.
    assert!(
        call_with(&mut client(sidecar.addr).await, "a", "plain", &[])
            .await
            .is_err()
    );
    assert_eq!(upstream.state.executions(), 2);
}

#[tokio::test]
async fn with_the_subject_fallback_a_certificate_without_uri_is_named_by_its_cn() {
    let upstream = ledger::start().await;
    let (server, clients) = (Pki::new("server"), Pki::new("clients"));
    let tls_dir = tempfile::tempdir().unwrap();
    let sidecar = mtls_sidecar(upstream.addr, &server, &clients, tls_dir.path(), true).await;
    let one = clients.issue(&[], &[], Some("legacy-one"));
    let two = clients.issue(&[], &[], Some("legacy-two"));
    let mut one = tls_client(sidecar.addr, &server.ca_pem(), Some(&one))
        .await
        .unwrap();
    let mut two = tls_client(sidecar.addr, &server.ca_pem(), Some(&two))
        .await
        .unwrap();
    call_with(&mut one, "a", "same", &[]).await.unwrap();
    let other = call_with(&mut two, "a", "same", &[]).await.unwrap();
    assert!(!support::was_replayed(&other));
    assert_eq!(upstream.state.executions(), 2);
}

#[tokio::test]
async fn a_rotated_server_certificate_is_served_without_dropping_a_call() {
    let upstream = ledger::start().await;
    let (old_ca, new_ca, clients) = (Pki::new("old"), Pki::new("new"), Pki::new("clients"));
    let tls_dir = tempfile::tempdir().unwrap();
    let sidecar = mtls_sidecar(upstream.addr, &old_ca, &clients, tls_dir.path(), false).await;
    let alice_id = clients.issue(&[], &[ALICE], None);
    let mut steady = tls_client(sidecar.addr, &old_ca.ca_pem(), Some(&alice_id))
        .await
        .unwrap();
    assert!(
        tls_client(sidecar.addr, &new_ca.ca_pem(), Some(&alice_id))
            .await
            .is_err(),
        "before the rotation the new CA's clients do not trust the listener"
    );
    // Calls go on over one connection while the certificate is replaced.
    let calling = tokio::spawn(async move {
        for n in 0..60 {
            call_with(&mut steady, "a", &format!("steady-{n}"), &[])
                .await
                .expect("no call dropped during the rotation");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    new_ca.write_server(tls_dir.path());
    support::eventually(
        Duration::from_secs(10),
        "the listener to serve the new certificate",
        || {
            let ca = new_ca.ca_pem();
            let id = alice_id.clone();
            async move { tls_client(sidecar.addr, &ca, Some(&id)).await.is_ok() }
        },
    )
    .await;
    calling.await.unwrap();
    let mut fresh = tls_client(sidecar.addr, &new_ca.ca_pem(), Some(&alice_id))
        .await
        .unwrap();
    call_with(&mut fresh, "a", "after", &[]).await.unwrap();
    assert_eq!(upstream.state.executions(), 61);
}

#[tokio::test]
async fn the_listener_enforces_its_http2_limits() {
    let upstream = ledger::start().await;
    let sidecar = start_sidecar(upstream.addr, |args| {
        args.http2_max_concurrent_streams = 7;
        args.http2_max_header_list_size = 4 << 10;
        args.http2_idle_timeout = Duration::from_millis(300);
    })
    .await;
    // The stream limit is what the server's SETTINGS say.
    let tcp = tokio::net::TcpStream::connect(sidecar.addr).await.unwrap();
    let (_send, mut connection) = h2::client::handshake(tcp).await.unwrap();
    let settled = tokio::time::timeout(Duration::from_millis(200), &mut connection).await;
    assert!(
        settled.is_err(),
        "the connection stays open while it is young"
    );
    assert_eq!(connection.max_concurrent_send_streams(), 7);
    // Idle for the idle timeout: closed gracefully.
    let closed = tokio::time::timeout(Duration::from_secs(5), connection).await;
    assert!(
        matches!(closed, Ok(Ok(()))),
        "an idle connection is closed with GOAWAY: {closed:?}"
    );
    // A header list over the limit is refused; one under it is served.
    let mut client = client(sidecar.addr).await;
    let big = "x".repeat(5000);
    let refused = call_with(&mut client, "a", "big", &[("x-big", big.as_str())]).await;
    assert!(refused.is_err(), "a 5 KB header list is over 4 KiB");
    call_with(&mut client, "a", "small", &[("x-small", "y")])
        .await
        .unwrap();
    assert_eq!(upstream.state.executions(), 1);
}

#[tokio::test]
async fn the_per_caller_cap_refuses_only_that_callers_new_keys() {
    let upstream = ledger::start().await;
    let sidecar = start_sidecar(upstream.addr, |args| {
        args.max_records_per_caller = Some(3);
        args.retention = Duration::from_secs(2);
    })
    .await;
    let mut client = client(sidecar.addr).await;
    // A released outcome (PERMISSION_DENIED: the service did not act) leaves no record.
    let denied = idemproxy::pb::idemproxy::testing::v1::ApplyRequest {
        fail_code: 7,
        ..add("a", 1)
    };
    let released = apply(&mut client, denied, Some("denied"), Some("alice")).await;
    assert_eq!(released.unwrap_err().code(), tonic::Code::PermissionDenied);
    for n in 0..3 {
        apply(
            &mut client,
            add("a", 1),
            Some(&format!("k{n}")),
            Some("alice"),
        )
        .await
        .unwrap();
    }
    let refused = apply(&mut client, add("a", 1), Some("k3"), Some("alice"))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), tonic::Code::ResourceExhausted);
    assert_eq!(reason(&refused), "IDEMPOTENCY_CALLER_QUOTA");
    // Its recorded keys still replay, and another caller is unaffected.
    let replay = apply(&mut client, add("a", 1), Some("k0"), Some("alice"))
        .await
        .unwrap();
    assert!(support::was_replayed(&replay));
    apply(&mut client, add("b", 1), Some("k3"), Some("bob"))
        .await
        .unwrap();
    assert_eq!(
        upstream.state.executions(),
        5,
        "denied, k0..k2 of alice, k3 of bob"
    );
    // Once its records expire, the caller may record new keys again.
    support::eventually(Duration::from_secs(10), "alice's records to expire", || {
        let mut client = client.clone();
        async move {
            apply(&mut client, add("a", 1), Some("k3"), Some("alice"))
                .await
                .is_ok()
        }
    })
    .await;
    assert_eq!(upstream.state.executions(), 6);
}

#[tokio::test]
async fn logs_carry_no_serial_caller_or_body() {
    let upstream = ledger::start().await;
    let dir = tempfile::tempdir().unwrap();
    let log_path = dir.path().join("stderr.log");
    let addr = support::http::free_addr();
    let mut child = tokio::process::Command::new(support::binary::path())
        .arg("run")
        .args(["--listen", &addr.to_string(), "--upstream"])
        .arg(format!("http://{}", upstream.addr))
        .arg("--data-dir")
        .arg(dir.path().join("data"))
        .env("RUST_LOG", "info,idemproxy=trace")
        .env("IDEMPROXY_LOG_FORMAT", "json")
        .env("IDEMPROXY_ADMIN_LISTEN", "127.0.0.1:0")
        .env("IDEMPROXY_OPS_LISTEN", "127.0.0.1:0")
        .stderr(std::fs::File::create(&log_path).unwrap())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    support::binary::wait_listening(addr).await;
    let mut client = client(addr).await;
    let (serial, caller) = ("serial-secret-7731", "caller-secret-8842");
    let secret_request = idemproxy::pb::idemproxy::testing::v1::ApplyRequest {
        account: "body-secret-9953".into(),
        fail_code: 5,
        fail_message: "response-secret-6614".into(),
        ..add("x", 1)
    };
    for _ in 0..2 {
        let refused = apply(
            &mut client,
            secret_request.clone(),
            Some(serial),
            Some(caller),
        )
        .await;
        assert_eq!(refused.unwrap_err().message(), "response-secret-6614");
    }
    let reused = apply(&mut client, add("other", 2), Some(serial), Some(caller)).await;
    assert_eq!(reason(&reused.unwrap_err()), "IDEMPOTENCY_KEY_REUSED");
    // An outcome left unknown is logged, by its key hash only.
    let doubtful = idemproxy::pb::idemproxy::testing::v1::ApplyRequest {
        fail_code: ledger::RESET_AFTER_ACTING,
        ..secret_request.clone()
    };
    let doubt_serial = "serial-secret-doubt-5521";
    let unknown = apply(&mut client, doubtful, Some(doubt_serial), Some(caller)).await;
    assert_eq!(reason(&unknown.unwrap_err()), "IDEMPOTENCY_OUTCOME_UNKNOWN");
    let pid = child.id().unwrap().to_string();
    std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap();
    child.wait().await.unwrap();
    let logs = std::fs::read_to_string(&log_path).unwrap();
    let key = idemproxy::key::Key::derive(
        "/idemproxy.testing.v1.Ledger/Apply",
        caller,
        doubt_serial.as_bytes(),
    );
    assert!(
        logs.contains(&key.short()),
        "the key hash is logged (the log is not empty of what happened):\n{logs}"
    );
    for secret in [
        serial,
        doubt_serial,
        caller,
        "body-secret-9953",
        "response-secret-6614",
    ] {
        assert!(!logs.contains(secret), "{secret} is in the logs:\n{logs}");
    }
}

/// Issue 31, item 4: `x-caller-id: alice` sent by the client and `x-caller-id: mallory`
/// appended by a gateway were keyed as alice, so mallory could be answered with alice's
/// recorded outcome. Two caller headers, or two key headers, are refused; nothing runs.
#[tokio::test]
async fn a_second_caller_or_key_header_is_refused_not_one_picked() {
    let upstream = ledger::start().await;
    let sidecar = start_sidecar(upstream.addr, |_| {}).await;
    let mut client = client(sidecar.addr).await;
    apply(&mut client, add("alice", 5), Some("pay-1"), Some("alice"))
        .await
        .unwrap();
    let mut twice = tonic::Request::new(add("alice", 5));
    let metadata = twice.metadata_mut();
    metadata.insert("idempotency-key", "pay-1".parse().unwrap());
    metadata.append("x-caller-id", "alice".parse().unwrap());
    metadata.append("x-caller-id", "mallory".parse().unwrap());
    let refused = client.apply(twice).await.unwrap_err();
    assert_eq!(refused.code(), tonic::Code::Unauthenticated);
    assert_eq!(reason(&refused), "IDEMPOTENCY_CALLER_INVALID");
    let mut two_keys = tonic::Request::new(add("alice", 5));
    let metadata = two_keys.metadata_mut();
    metadata.append("idempotency-key", "pay-1".parse().unwrap());
    metadata.append("idempotency-key", "pay-2".parse().unwrap());
    metadata.insert("x-caller-id", "alice".parse().unwrap());
    let refused = client.apply(two_keys).await.unwrap_err();
    assert_eq!(refused.code(), tonic::Code::InvalidArgument);
    assert_eq!(reason(&refused), "IDEMPOTENCY_KEY_INVALID");
    assert_eq!(upstream.state.executions(), 1, "only the first call ran");
}
