//! The ops listener (design §7, `--ops-listen`): `grpc.health.v1` (overall, `liveness`,
//! `readiness`), HTTP `GET /livez` and `/readyz`, and `GET /metrics` (Prometheus text), on
//! one port that speaks HTTP/1.1 and HTTP/2. Read-only: nothing here can change a record.
//!
//! Ready means the proxy is bound, the policy loaded (both true once `server::start`
//! returned), the store can take writes (`Store::check`, every `READINESS_INTERVAL`; only
//! `FAILED_CHECKS_MAX` failures in a row make it not ready, so a slow check never flaps it),
//! and the sidecar is not draining. Live means the process answers.

use crate::store::Store;
use crate::telemetry::Telemetry;
use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use std::convert::Infallible;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tonic_health::server::HealthReporter;
use tonic_health::ServingStatus;

/// How often readiness re-checks the store.
pub const READINESS_INTERVAL: Duration = Duration::from_secs(1);

/// Longest wait for one store check; past it the check counts as failed. Long, because a
/// check that queues behind a group commit on a busy machine is slow, not failing.
const CHECK_TIMEOUT: Duration = Duration::from_secs(10);

/// Failed checks in a row that make the sidecar not ready. One failure is not enough: a pod
/// whose readiness flaps drops out of its Service and back, and only a store that is really
/// failing should take it out.
pub const FAILED_CHECKS_MAX: u32 = 3;

/// Whether the sidecar should get traffic.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Readiness {
    /// Serving.
    Ready,
    /// Not serving, and why.
    NotReady(String),
    /// Shutting down: finishing the calls it has.
    Draining,
}

/// The health the ops listener reports; the server updates it.
#[derive(Clone)]
pub struct Health {
    readiness: watch::Sender<Readiness>,
    /// What the last store check said of the store besides "ready" (the Redis master).
    store_note: watch::Sender<Option<String>>,
    /// What failed for good (`Store::failed_for_good`): liveness fails from then on.
    failed: watch::Sender<Option<String>>,
    reporter: HealthReporter,
    grpc: tonic_health::pb::health_server::HealthServer<tonic_health::server::HealthService>,
}

impl Health {
    /// Starts not ready; `set` or `watch_store` makes it ready.
    pub fn new() -> Health {
        let reporter = HealthReporter::new();
        let grpc = tonic_health::pb::health_server::HealthServer::new(
            tonic_health::server::HealthService::from_health_reporter(reporter.clone()),
        );
        Health {
            readiness: watch::Sender::new(Readiness::NotReady("starting".into())),
            store_note: watch::Sender::new(None),
            failed: watch::Sender::new(None),
            reporter,
            grpc,
        }
    }

    /// Reports `readiness` on every channel: HTTP and the gRPC services "", "readiness".
    pub async fn set(&self, readiness: Readiness) {
        let changed = self.readiness.send_if_modified(|current| {
            // Draining is final: a store check must not make a draining sidecar ready.
            if *current == readiness || *current == Readiness::Draining {
                return false;
            }
            *current = readiness.clone();
            true
        });
        if changed {
            match &*self.readiness.borrow() {
                Readiness::NotReady(why) => tracing::warn!(why, "not ready"),
                Readiness::Draining => tracing::info!("draining: not ready"),
                Readiness::Ready => tracing::info!("ready"),
            }
        }
        // What is reported is what is stored, which a drain may have kept from changing.
        let status = if *self.readiness.borrow() == Readiness::Ready {
            ServingStatus::Serving
        } else {
            ServingStatus::NotServing
        };
        self.reporter.set_service_status("", status).await;
        self.reporter.set_service_status("readiness", status).await;
        let live = if self.failed.borrow().is_none() {
            ServingStatus::Serving
        } else {
            ServingStatus::NotServing
        };
        self.reporter.set_service_status("liveness", live).await;
    }

    /// Fails liveness for good: only a restart clears what `why` says.
    pub async fn fail_liveness(&self, why: String) {
        if self.failed.borrow().is_none() {
            tracing::error!(
                why,
                "not alive: the store takes no more writes until a restart"
            );
            self.failed.send_replace(Some(why));
        }
        self.reporter
            .set_service_status("liveness", ServingStatus::NotServing)
            .await;
    }

    /// What failed for good, if anything.
    pub fn failed_for_good(&self) -> Option<String> {
        self.failed.borrow().clone()
    }

    /// What readiness is now.
    pub fn readiness(&self) -> Readiness {
        self.readiness.borrow().clone()
    }

    /// What the last successful store check said of the store (the Redis master in use).
    pub fn store_note(&self) -> Option<String> {
        self.store_note.borrow().clone()
    }

    /// Checks `store` every `READINESS_INTERVAL` until `stopped`, reporting what it finds.
    /// A store that takes no more writes until a restart fails liveness at once.
    pub async fn watch_store<S: Store>(self, store: Arc<S>, stopped: impl Future<Output = ()>) {
        let health = self.clone();
        let check = || {
            let (store, health) = (store.clone(), health.clone());
            async move {
                if let Some(why) = store.failed_for_good() {
                    health.fail_liveness(why).await;
                }
                let note = store.check().await?;
                health.store_note.send_replace(note);
                Ok::<_, crate::store::StoreError>(())
            }
        };
        self.watch_checks(check, stopped).await;
    }

    /// Runs `check` every `READINESS_INTERVAL` until `stopped`: one that answers, however
    /// slowly within `CHECK_TIMEOUT`, makes the sidecar ready; `FAILED_CHECKS_MAX` failures
    /// in a row (an error, or no answer within `CHECK_TIMEOUT`) make it not ready.
    pub async fn watch_checks<F, E>(
        self,
        mut check: impl FnMut() -> F,
        stopped: impl Future<Output = ()>,
    ) where
        F: Future<Output = Result<(), E>>,
        E: std::fmt::Display,
    {
        tokio::pin!(stopped);
        let mut failed_in_a_row = 0;
        loop {
            let failure = match tokio::time::timeout(CHECK_TIMEOUT, check()).await {
                Ok(Ok(())) => None,
                Ok(Err(error)) => Some(error.to_string()),
                Err(_) => Some(format!(
                    "the store did not answer its check within {CHECK_TIMEOUT:?}"
                )),
            };
            match failure {
                None => {
                    failed_in_a_row = 0;
                    self.set(Readiness::Ready).await;
                }
                Some(why) => {
                    failed_in_a_row += 1;
                    tracing::debug!(why, failed_in_a_row, "a store check failed");
                    if failed_in_a_row >= FAILED_CHECKS_MAX {
                        self.set(Readiness::NotReady(why)).await;
                    }
                }
            }
            tokio::select! {
                () = &mut stopped => return,
                () = tokio::time::sleep(READINESS_INTERVAL) => {}
            }
        }
    }
}

impl Default for Health {
    fn default() -> Self {
        Health::new()
    }
}

type OpsBody = tonic::body::Body;

fn text(status: StatusCode, body: String) -> Response<OpsBody> {
    let mut response = Response::new(OpsBody::new(Full::new(Bytes::from(body))));
    *response.status_mut() = status;
    response.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}

async fn answer(
    health: Health,
    telemetry: Arc<Telemetry>,
    request: Request<Incoming>,
) -> Result<Response<OpsBody>, Infallible> {
    use tower::Service;
    let path = request.uri().path();
    if request.method() == http::Method::GET && path == "/metrics" {
        let mut response = text(StatusCode::OK, telemetry.render_prometheus());
        response.headers_mut().insert(
            http::header::CONTENT_TYPE,
            http::HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
        );
        return Ok(response);
    }
    if request.method() == http::Method::GET && (path == "/livez" || path == "/readyz") {
        if path == "/livez" {
            return Ok(match health.failed_for_good() {
                None => text(StatusCode::OK, "alive\n".into()),
                Some(why) => text(
                    StatusCode::SERVICE_UNAVAILABLE,
                    format!("not alive: {why}\n"),
                ),
            });
        }
        return Ok(match health.readiness() {
            Readiness::Ready => match health.store_note() {
                None => text(StatusCode::OK, "ready\n".into()),
                Some(note) => text(StatusCode::OK, format!("ready: {note}\n")),
            },
            Readiness::Draining => text(StatusCode::SERVICE_UNAVAILABLE, "draining\n".into()),
            Readiness::NotReady(why) => text(
                StatusCode::SERVICE_UNAVAILABLE,
                format!("not ready: {why}\n"),
            ),
        });
    }
    if path.starts_with("/grpc.health.v1.Health/") {
        let mut grpc = health.grpc.clone();
        return grpc.call(request.map(OpsBody::new)).await;
    }
    Ok(text(
        StatusCode::NOT_FOUND,
        "not found: try /livez, /readyz, /metrics or grpc.health.v1\n".into(),
    ))
}

/// How long a client of the ops or injector port may take to send a request's headers; a
/// connection that trickles them is closed, so slow clients cannot hold connections open.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);

/// The HTTP/1.1 and HTTP/2 server of the ops and injector ports. hyper applies its header
/// read timeout only when it has a timer, so it is given one.
pub(crate) fn http_server() -> hyper_util::server::conn::auto::Builder<TokioExecutor> {
    let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT);
    builder
}

/// The HTTP/2 connection preface (RFC 9113 §3.4): what hyper-util reads to choose HTTP/2.
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// A newly accepted connection of the ops or injector port, bounded until it shows which
/// HTTP it speaks. hyper-util's automatic server reads the first bytes to tell HTTP/1.1 from
/// HTTP/2 with no timer, and hyper's header read timeout starts only after that, so a client
/// that connects and sends nothing, or a part of the HTTP/2 preface, would hold its
/// connection open for ever. Reads fail with `TimedOut` unless, within
/// `HEADER_READ_TIMEOUT` of the accept, a byte rules the preface out (HTTP/1.1: hyper's
/// timeout takes over) or the whole preface arrives (HTTP/2, where an idle connection is
/// normal: a health `Watch` sends nothing for hours). After that reads pass through.
pub(crate) struct Accepted<I> {
    io: I,
    /// How many bytes of the preface have arrived, while the deadline runs.
    matched: usize,
    deadline: Option<std::pin::Pin<Box<tokio::time::Sleep>>>,
}

impl<I> Accepted<I> {
    pub(crate) fn new(io: I) -> Self {
        Self {
            io,
            matched: 0,
            deadline: Some(Box::pin(tokio::time::sleep(HEADER_READ_TIMEOUT))),
        }
    }

    /// Notes `bytes`, just read, and lifts the deadline once they decide the protocol.
    fn saw(&mut self, bytes: &[u8]) {
        let end = (self.matched + bytes.len()).min(H2_PREFACE.len());
        let expected = &H2_PREFACE[self.matched..end];
        if bytes.get(..expected.len()) != Some(expected) || end == H2_PREFACE.len() {
            self.deadline = None;
        } else {
            self.matched = end;
        }
    }
}

impl<I: tokio::io::AsyncRead + Unpin> tokio::io::AsyncRead for Accepted<I> {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        use std::task::Poll;
        let before = buf.filled().len();
        let this = &mut *self;
        match std::pin::Pin::new(&mut this.io).poll_read(cx, buf) {
            Poll::Ready(Ok(())) if this.deadline.is_some() => {
                this.saw(&buf.filled()[before..]);
                Poll::Ready(Ok(()))
            }
            Poll::Pending => {
                let expired = this
                    .deadline
                    .as_mut()
                    .is_some_and(|deadline| deadline.as_mut().poll(cx).is_ready());
                if expired {
                    return Poll::Ready(Err(std::io::Error::new(
                        std::io::ErrorKind::TimedOut,
                        "no request began within the header read timeout",
                    )));
                }
                Poll::Pending
            }
            ready => ready,
        }
    }
}

impl<I: tokio::io::AsyncWrite + Unpin> tokio::io::AsyncWrite for Accepted<I> {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

/// Serves health and metrics on `listener` until `shutdown`.
pub async fn serve(
    listener: TcpListener,
    health: Health,
    telemetry: Arc<Telemetry>,
    shutdown: impl Future<Output = ()>,
) {
    tokio::pin!(shutdown);
    let builder = http_server();
    loop {
        let stream = tokio::select! {
            () = &mut shutdown => return,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(error) => {
                    tracing::warn!(%error, "ops accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let (health, telemetry) = (health.clone(), telemetry.clone());
        let service = hyper::service::service_fn(move |request| {
            answer(health.clone(), telemetry.clone(), request)
        });
        let connection = builder
            .serve_connection(TokioIo::new(Accepted::new(stream)), service)
            .into_owned();
        tokio::spawn(async move {
            let _ = connection.await;
        });
    }
}
