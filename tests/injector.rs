//! The admission webhook: AdmissionReview requests in, JSON patches out (in process), and the
//! real `idemproxy injector` binary over HTTPS with a certificate it was given.

mod support;

use base64::Engine as _;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use idemproxy::inject::InjectSettings;
use idemproxy::injector::review;
use serde_json::{json, Value};
use std::sync::Arc;
use std::time::Duration;

fn pod(annotations: Value, containers: Value, init_containers: Option<Value>) -> Value {
    let mut spec = json!({ "containers": containers, "restartPolicy": "Always" });
    if let Some(init) = init_containers {
        spec["initContainers"] = init;
    }
    json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": { "generateName": "orders-7d9f-", "namespace": "shop", "annotations": annotations },
        "spec": spec,
    })
}

fn app_container() -> Value {
    json!([{ "name": "orders", "image": "orders:1", "ports": [{ "containerPort": 50051 }] }])
}

fn admission_review(kind: &str, operation: &str, object: Value) -> Vec<u8> {
    serde_json::to_vec(&json!({
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "request": {
            "uid": "705ab4f5-6393-11e8-b7cc-42010a800002",
            "kind": { "group": "", "version": "v1", "kind": kind },
            "resource": { "group": "", "version": "v1", "resource": "pods" },
            "namespace": "shop",
            "operation": operation,
            "userInfo": { "username": "system:serviceaccount:kube-system:replicaset-controller" },
            "object": object,
            "oldObject": null,
            "dryRun": false,
        }
    }))
    .expect("serialises")
}

/// The response part of the answer, with its HTTP status.
fn answer(body: &[u8]) -> (u16, Value) {
    let (status, encoded) = review(body, &InjectSettings::default());
    let review: Value = serde_json::from_slice(&encoded).expect("the answer is JSON");
    assert_eq!(review["apiVersion"], "admission.k8s.io/v1");
    assert_eq!(review["kind"], "AdmissionReview");
    (status.as_u16(), review["response"].clone())
}

fn patch_of(response: &Value) -> json_patch::Patch {
    assert_eq!(response["patchType"], "JSONPatch");
    let encoded = response["patch"]
        .as_str()
        .expect("the patch is base64 text");
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(encoded)
        .expect("valid base64");
    serde_json::from_slice(&bytes).expect("a JSON patch")
}

#[test]
fn a_pod_create_gets_a_patch_that_adds_the_sidecar_and_keeps_the_rest() {
    let original = pod(
        json!({}),
        app_container(),
        Some(json!([{ "name": "migrate", "image": "m:1" }])),
    );
    let (status, response) = answer(&admission_review("Pod", "CREATE", original.clone()));
    assert_eq!(status, 200);
    assert_eq!(response["uid"], "705ab4f5-6393-11e8-b7cc-42010a800002");
    assert_eq!(response["allowed"], true);
    let mut patched = original.clone();
    json_patch::patch(&mut patched, &patch_of(&response)).expect("the patch applies");
    let init = patched["spec"]["initContainers"]
        .as_array()
        .expect("init containers");
    assert_eq!(init[0]["name"], "idemproxy");
    assert_eq!(init[0]["restartPolicy"], "Always");
    assert_eq!(init[1]["name"], "migrate");
    assert_eq!(
        patched["spec"]["containers"],
        original["spec"]["containers"]
    );
    // The same mutation as `idemproxy inject`.
    let mut injected = original;
    idemproxy::inject::inject_template(&mut injected, &InjectSettings::default(), "Pod", &[])
        .expect("injects");
    assert_eq!(patched, injected);
}

#[test]
fn injected_opted_out_and_other_requests_are_allowed_unchanged() {
    let sidecar =
        json!([{ "name": "idemproxy", "image": "idemproxy:0", "restartPolicy": "Always" }]);
    let cases = [
        admission_review(
            "Pod",
            "CREATE",
            pod(json!({}), app_container(), Some(sidecar)),
        ),
        admission_review(
            "Pod",
            "CREATE",
            pod(
                json!({ "idemproxy.io/inject": "false" }),
                app_container(),
                None,
            ),
        ),
        admission_review("Pod", "UPDATE", pod(json!({}), app_container(), None)),
        admission_review(
            "Deployment",
            "CREATE",
            json!({ "apiVersion": "apps/v1", "kind": "Deployment", "metadata": { "name": "d" } }),
        ),
    ];
    for body in cases {
        let (status, response) = answer(&body);
        assert_eq!(status, 200);
        assert_eq!(response["allowed"], true, "{response}");
        assert!(response.get("patch").is_none(), "{response}");
    }
}

#[test]
fn a_pod_that_cannot_be_injected_is_denied_with_the_reason() {
    let no_port = json!([{ "name": "orders", "image": "orders:1" }]);
    let (status, response) = answer(&admission_review(
        "Pod",
        "CREATE",
        pod(json!({}), no_port, None),
    ));
    assert_eq!(status, 200);
    assert_eq!(response["allowed"], false);
    let message = response["status"]["message"].as_str().expect("a message");
    assert!(message.contains("idemproxy.io/app-port"), "{message}");
    assert!(message.contains("shop/orders-7d9f-"), "{message}");
}

#[test]
fn bad_bodies_get_an_admission_review_error_not_a_crash() {
    let cases: [(&[u8], &str); 4] = [
        (b"", "not an AdmissionReview"),
        (b"{\"apiVersion\": 3", "not an AdmissionReview"),
        (
            b"{\"apiVersion\":\"admission.k8s.io/v1\",\"kind\":\"AdmissionReview\"}",
            "no request",
        ),
        (&[0xff, 0xfe, 0x00], "not an AdmissionReview"),
    ];
    for (body, expected) in cases {
        let (status, response) = answer(body);
        assert_eq!(status, 400);
        assert_eq!(response["allowed"], false);
        let message = response["status"]["message"].as_str().expect("a message");
        assert!(message.contains(expected), "{message}");
    }
}

struct Certificate {
    dir: tempfile::TempDir,
    der: Vec<u8>,
}

fn certificate() -> Certificate {
    let key = rcgen::KeyPair::generate().expect("a key");
    let cert = rcgen::CertificateParams::new(vec!["127.0.0.1".to_owned()])
        .expect("params")
        .self_signed(&key)
        .expect("a certificate");
    let dir = tempfile::tempdir().expect("a temp dir");
    std::fs::write(dir.path().join("tls.crt"), cert.pem()).expect("writes");
    std::fs::write(dir.path().join("tls.key"), key.serialize_pem()).expect("writes");
    Certificate {
        dir,
        der: cert.der().to_vec(),
    }
}

/// A TLS connection to `addr` that trusts only `der`; `Err` when the handshake fails.
async fn connect_tls(
    addr: std::net::SocketAddr,
    der: &[u8],
) -> std::io::Result<tokio_rustls::client::TlsStream<tokio::net::TcpStream>> {
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(der.to_vec().into())
        .expect("the test CA is valid");
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("TLS versions")
    .with_root_certificates(roots)
    .with_no_client_auth();
    let tcp = tokio::net::TcpStream::connect(addr).await?;
    let name = rustls::pki_types::ServerName::try_from("127.0.0.1").expect("a name");
    tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(name, tcp)
        .await
}

async fn post_over_tls(
    addr: std::net::SocketAddr,
    der: &[u8],
    method: &str,
    path: &str,
    body: Vec<u8>,
) -> (u16, Bytes) {
    let tls = connect_tls(addr, der)
        .await
        .expect("the TLS handshake succeeds");
    let (mut sender, connection) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tls))
            .await
            .expect("HTTP/1.1 handshake");
    tokio::spawn(connection);
    let request = http::Request::builder()
        .method(method)
        .uri(path)
        .header("host", "idemproxy-injector.idemproxy-system.svc")
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body)))
        .expect("a request");
    let response = sender.send_request(request).await.expect("an answer");
    let status = response.status().as_u16();
    let body = response
        .into_body()
        .collect()
        .await
        .expect("a body")
        .to_bytes();
    (status, body)
}

/// Starts the injector binary on `cert`'s files; returns it and its address.
async fn start_injector(cert: &Certificate) -> (tokio::process::Child, std::net::SocketAddr) {
    let path = |name: &str| cert.dir.path().join(name).display().to_string();
    let mut child = tokio::process::Command::new(support::binary::path())
        .args([
            "injector",
            "--listen",
            "127.0.0.1:0",
            "--image",
            "idemproxy:test",
        ])
        .args([
            "--tls-cert",
            &path("tls.crt"),
            "--tls-key",
            &path("tls.key"),
        ])
        .env("RUST_LOG", "info")
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("the binary starts");
    let stderr = child.stderr.take().expect("stderr is piped");
    let (addr, _) = support::binary::wait_for_address(stderr, "injector listening on ").await;
    (child, addr)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_injector_binary_serves_reviews_over_tls() {
    let cert = certificate();
    let (mut child, addr) = start_injector(&cert).await;
    let (status, body) = post_over_tls(addr, &cert.der, "GET", "/readyz", Vec::new()).await;
    assert_eq!((status, &body[..]), (200, &b"ok\n"[..]));
    let review_body = admission_review("Pod", "CREATE", pod(json!({}), app_container(), None));
    let (status, body) = post_over_tls(addr, &cert.der, "POST", "/mutate", review_body).await;
    assert_eq!(status, 200);
    let review: Value = serde_json::from_slice(&body).expect("JSON");
    let patch = patch_of(&review["response"]);
    let text = serde_json::to_string(&patch).expect("serialises");
    assert!(
        text.contains("idemproxy:test"),
        "the injector's --image is used: {text}"
    );
    let (status, _) = post_over_tls(addr, &cert.der, "POST", "/mutate", b"junk".to_vec()).await;
    assert_eq!(status, 400);
    child.kill().await.expect("stops");
}

/// cert-manager renews the injector's certificate in place: new connections get the new one
/// without a restart. A connection that sends nothing, or trickles its headers, is closed
/// after the header read timeout (10 s), as on the ops port.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_injector_serves_a_renewed_certificate_and_bounds_its_connections() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let first = certificate();
    let (mut child, addr) = start_injector(&first).await;
    let (status, _) = post_over_tls(addr, &first.der, "GET", "/readyz", Vec::new()).await;
    assert_eq!(status, 200);
    // The renewal, as a mounted Secret changes: new files replace the old ones.
    let renewed = certificate();
    for name in ["tls.key", "tls.crt"] {
        let staged = first.dir.path().join(format!("{name}.new"));
        std::fs::copy(renewed.dir.path().join(name), &staged).unwrap();
        std::fs::rename(&staged, first.dir.path().join(name)).unwrap();
    }
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    while connect_tls(addr, &renewed.der).await.is_err() {
        assert!(
            std::time::Instant::now() < deadline,
            "the renewed certificate was not served within 15 s"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let (status, _) = post_over_tls(addr, &renewed.der, "GET", "/readyz", Vec::new()).await;
    assert_eq!(status, 200, "served on the renewed certificate");

    let mut silent = connect_tls(addr, &renewed.der).await.unwrap();
    let mut trickling = connect_tls(addr, &renewed.der).await.unwrap();
    trickling
        .write_all(b"GET /readyz HTTP/1.1\r\nHost: injector\r\n")
        .await
        .unwrap();
    let started = std::time::Instant::now();
    for (what, stream) in [("silent", &mut silent), ("trickling", &mut trickling)] {
        let mut rest = Vec::new();
        let read = tokio::time::timeout(Duration::from_secs(30), stream.read_to_end(&mut rest));
        assert!(
            read.await.is_ok(),
            "the {what} connection was still open after 30 s"
        );
        assert!(
            !String::from_utf8_lossy(&rest).contains("ok"),
            "the {what} connection was answered: {rest:?}"
        );
    }
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_secs(9),
        "closed after {waited:?}, before the timeout"
    );
    child.kill().await.expect("stops");
}

#[tokio::test]
async fn the_injector_refuses_to_start_without_a_usable_certificate() {
    let dir = tempfile::tempdir().expect("a temp dir");
    let missing = dir.path().join("missing.crt");
    let empty = dir.path().join("empty.crt");
    std::fs::write(&empty, "").expect("writes");
    let cert = certificate();
    let key = cert.dir.path().join("tls.key");
    for (cert_path, expected) in [(&missing, "--tls-cert"), (&empty, "holds no certificate")] {
        let output = tokio::time::timeout(
            Duration::from_secs(30),
            tokio::process::Command::new(support::binary::path())
                .args(["injector", "--listen", "127.0.0.1:0"])
                .arg("--tls-cert")
                .arg(cert_path)
                .arg("--tls-key")
                .arg(&key)
                .output(),
        )
        .await
        .expect("exits at once")
        .expect("runs");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(!output.status.success());
        assert!(stderr.contains(expected), "{stderr}");
    }
}
