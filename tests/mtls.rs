//! Callers named by their client certificates (mTLS with a real rustls client), and the
//! proxy's certificate rotated under load without dropping a call.

// A failed unwrap is a failed test.
#![allow(clippy::unwrap_used)]

mod support;

const ALICE: &str = "spiffe://cluster.local/ns/billing/sa/alice";
const BOB: &str = "spiffe://cluster.local/ns/billing/sa/bob";

use idemproxy::caller::CallerSource;
use idemproxy::pb::idemproxy::testing::v1::ledger_client::LedgerClient;
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;
use support::{call_with, client, ledger, reason, start_sidecar};
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Identity};

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
