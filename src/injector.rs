//! `idemproxy injector`: the mutating admission webhook that adds the sidecar to new pods.
//!
//! It owns the webhook's HTTPS server and the AdmissionReview v1 exchange; the mutation
//! itself is `inject::inject_template`, the same one `idemproxy inject` runs, and the patch
//! is the JSON difference between the pod before and after it. Which pods reach it is the
//! MutatingWebhookConfiguration's business (namespace label `idemproxy.io/injection: enabled`
//! or pod label `idemproxy.io/inject: "true"`). It must never crash on a request: a body
//! that is not an AdmissionReview gets an AdmissionReview error, and a pod it cannot inject
//! is denied with the reason, so that no pod meant to be protected runs without the sidecar.

use crate::inject::{self, InjectSettings, Outcome};
use base64::Engine as _;
use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use kube_core::admission::{AdmissionRequest, AdmissionResponse, AdmissionReview, Operation};
use kube_core::DynamicObject;
use serde_json::Value;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;

/// The largest AdmissionReview accepted: the API server's own request limit is 3 MiB.
pub const REVIEW_BYTES_MAX: usize = 3 * 1024 * 1024;

/// How long one connection may take to send its TLS handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// The command line of `idemproxy injector`.
#[derive(Debug, clap::Args)]
pub struct InjectorArgs {
    /// Address to serve the webhook on (HTTPS).
    #[arg(
        long,
        env = "IDEMPROXY_INJECTOR_LISTEN",
        default_value = "0.0.0.0:8443"
    )]
    pub listen: SocketAddr,
    /// The server certificate chain (PEM), as named in the webhook's caBundle.
    #[arg(long, env = "IDEMPROXY_TLS_CERT")]
    pub tls_cert: PathBuf,
    /// The server certificate's private key (PEM).
    #[arg(long, env = "IDEMPROXY_TLS_KEY")]
    pub tls_key: PathBuf,
    /// The sidecar image injected pods run [default: idemproxy:<this version>].
    #[arg(long, env = "IDEMPROXY_SIDECAR_IMAGE")]
    pub image: Option<String>,
    /// Inject a regular container with a preStop pause instead of a native sidecar (for
    /// clusters before Kubernetes 1.29).
    #[arg(long, env = "IDEMPROXY_NO_NATIVE_SIDECAR")]
    pub no_native_sidecar: bool,
}

/// Why the injector cannot start.
#[derive(Debug, thiserror::Error)]
pub enum InjectorError {
    /// A certificate or key file that cannot be used.
    #[error(transparent)]
    Tls(#[from] crate::tls::TlsError),
    /// The listen address cannot be bound.
    #[error("--listen {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// The OS error.
        source: std::io::Error,
    },
}

/// Answers one AdmissionReview body: the HTTP status and the AdmissionReview to send back.
pub fn review(body: &[u8], settings: &InjectSettings) -> (StatusCode, Vec<u8>) {
    let review: AdmissionReview<DynamicObject> = match serde_json::from_slice(body) {
        Ok(review) => review,
        Err(error) => {
            return refusal(format!("the body is not an AdmissionReview v1: {error}"));
        }
    };
    let request: AdmissionRequest<DynamicObject> = match review.try_into() {
        Ok(request) => request,
        Err(_) => return refusal("the AdmissionReview carries no request".into()),
    };
    let response = mutate(&request, settings);
    let mut review = serde_json::to_value(response.into_review()).expect("a review serialises");
    // The API defines `patch` as bytes, which JSON carries as base64 (Go's []byte); kube-core
    // writes an array of numbers, which not every decoder takes.
    if let Some(patch) = review.pointer_mut("/response/patch") {
        if let Some(bytes) = patch.as_array() {
            let bytes: Vec<u8> = bytes
                .iter()
                .filter_map(|b| b.as_u64().and_then(|b| u8::try_from(b).ok()))
                .collect();
            *patch = Value::String(base64::engine::general_purpose::STANDARD.encode(bytes));
        }
    }
    (
        StatusCode::OK,
        serde_json::to_vec(&review).expect("a review serialises"),
    )
}

fn refusal(reason: String) -> (StatusCode, Vec<u8>) {
    tracing::warn!(%reason, "bad admission request");
    let review = AdmissionResponse::invalid(reason).into_review();
    let encoded = serde_json::to_vec(&review).expect("a review serialises");
    (StatusCode::BAD_REQUEST, encoded)
}

fn mutate(
    request: &AdmissionRequest<DynamicObject>,
    settings: &InjectSettings,
) -> AdmissionResponse {
    let allowed = AdmissionResponse::from(request);
    if request.kind.kind != "Pod" || request.operation != Operation::Create {
        return allowed;
    }
    let Some(object) = &request.object else {
        return allowed.deny("a Pod CREATE without its object");
    };
    let before = serde_json::to_value(object).expect("a DynamicObject serialises");
    let mut after = before.clone();
    let name = object
        .metadata
        .name
        .clone()
        .or_else(|| object.metadata.generate_name.clone())
        .unwrap_or_default();
    let what = format!("Pod {}/{name}", request.namespace.as_deref().unwrap_or(""));
    match inject::inject_template(&mut after, settings, &what, &[]) {
        Ok(Outcome::Injected) => {
            tracing::info!(pod = %what, "sidecar injected");
            let patch = json_patch::diff(&before, &after);
            allowed
                .with_patch(patch)
                .unwrap_or_else(|error| AdmissionResponse::from(request).deny(error))
        }
        Ok(Outcome::AlreadyInjected | Outcome::OptedOut) => allowed,
        Err(error) => {
            tracing::warn!(pod = %what, %error, "sidecar not injected: pod denied");
            allowed.deny(error)
        }
    }
}

async fn answer(
    settings: Arc<InjectSettings>,
    request: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, std::convert::Infallible> {
    let respond = |status: StatusCode, content_type: &'static str, body: Vec<u8>| {
        let mut response = Response::new(Full::new(Bytes::from(body)));
        *response.status_mut() = status;
        response.headers_mut().insert(
            http::header::CONTENT_TYPE,
            http::HeaderValue::from_static(content_type),
        );
        response
    };
    match (request.method(), request.uri().path()) {
        (&Method::GET, "/livez" | "/readyz") => {
            Ok(respond(StatusCode::OK, "text/plain", b"ok\n".to_vec()))
        }
        (&Method::POST, "/mutate") => {
            let body = match Limited::new(request.into_body(), REVIEW_BYTES_MAX)
                .collect()
                .await
            {
                Ok(collected) => collected.to_bytes(),
                Err(error) => {
                    let (status, body) = refusal(format!(
                        "the body could not be read within {REVIEW_BYTES_MAX} bytes: {error}"
                    ));
                    return Ok(respond(status, "application/json", body));
                }
            };
            let (status, body) = review(&body, &settings);
            Ok(respond(status, "application/json", body))
        }
        _ => Ok(respond(
            StatusCode::NOT_FOUND,
            "text/plain",
            b"not found: POST /mutate, GET /livez, /readyz\n".to_vec(),
        )),
    }
}

/// Runs the webhook until SIGTERM or SIGINT.
pub async fn run(args: InjectorArgs) -> Result<(), InjectorError> {
    let files = crate::tls::Files {
        cert: args.tls_cert.clone(),
        key: args.tls_key.clone(),
        client_ca: None,
        alpn: vec![b"h2".to_vec(), b"http/1.1".to_vec()],
        settings: crate::tls::FileSettings::PROXY,
    };
    let tls = crate::tls::Reloading::start(files, crate::tls::RELOAD_POLL)?;
    let settings = Arc::new(InjectSettings {
        image: args
            .image
            .clone()
            .unwrap_or_else(|| InjectSettings::default().image),
        native: !args.no_native_sidecar,
    });
    // Before it logs that it listens: see `shutdown_signal`.
    let shutdown = crate::server::shutdown_signal();
    tokio::pin!(shutdown);
    let listener = TcpListener::bind(args.listen)
        .await
        .map_err(|source| InjectorError::Bind {
            addr: args.listen,
            source,
        })?;
    let addr = listener
        .local_addr()
        .map_err(|source| InjectorError::Bind {
            addr: args.listen,
            source,
        })?;
    tracing::info!(image = %settings.image, native = settings.native, "injector listening on {addr}");
    let builder = crate::ops::http_server();
    loop {
        let stream = tokio::select! {
            () = &mut shutdown => return Ok(()),
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(error) => {
                    tracing::warn!(%error, "injector accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let (acceptor, builder, settings) = (tls.acceptor(), builder.clone(), settings.clone());
        tokio::spawn(async move {
            let tls = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
                Ok(Ok(tls)) => tls,
                Ok(Err(error)) => return tracing::debug!(%error, "TLS handshake failed"),
                Err(_) => return tracing::debug!("TLS handshake timed out"),
            };
            let service =
                hyper::service::service_fn(move |request| answer(settings.clone(), request));
            let _ = builder
                .serve_connection(TokioIo::new(crate::ops::Accepted::new(tls)), service)
                .await;
        });
    }
}
