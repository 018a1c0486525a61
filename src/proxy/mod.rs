//! The gRPC proxy: an HTTP/2 server in front of the service (design §6).
//!
//! Each call is classified once, by its method's rule in the policy table: a call carrying a
//! key (the key header, or the method's key field) is deduplicated by the engine (read whole,
//! bounded, then claimed, forwarded and recorded); every other call streams through both
//! ways, never buffered — except that a method with a key field must be read to learn that
//! it has none. This module speaks HTTP; the engine does not.

pub mod body;
pub mod grpc;
pub mod upstream;

use crate::engine::{Answer, Call, Clock, Engine};
use crate::key::ANONYMOUS_CALLER;
use crate::policy::{message, Dedup, MethodRule, PolicyTable};
use crate::record::Response;
use crate::status::{Reason, Refusal};
use crate::store::Store;
use crate::telemetry::metrics::{Decision, Metrics};
use crate::telemetry::trace;
use body::ProxyBody;
use bytes::Bytes;
use http::{HeaderName, HeaderValue, Request};
use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;
use hyper::server::conn::http2;
use hyper_util::rt::{TokioExecutor, TokioIo};
use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use tokio::net::TcpListener;
use tokio::time::Instant;
use tracing::Instrument as _;
use upstream::HttpUpstream;

/// The metadata a replayed answer carries.
pub const REPLAYED_HEADER: &str = "idempotency-replayed";

/// What the proxy reads from each call.
#[derive(Debug, Clone)]
pub struct ProxySettings {
    /// The header holding the request serial number.
    pub key_header: HeaderName,
    /// The header naming the caller (set by a trusted mesh or gateway).
    pub caller_header: HeaderName,
    /// The largest request body that is deduplicated.
    pub request_bytes_max: usize,
}

/// The proxy: settings, the engine, and the upstream for passthrough.
pub struct Proxy<S, C> {
    settings: ProxySettings,
    engine: Arc<Engine<S, HttpUpstream, C>>,
    upstream: HttpUpstream,
    policy: Arc<PolicyTable>,
    metrics: Metrics,
}

type HttpResponse = http::Response<ProxyBody>;

/// One call's answer and what telemetry says of it.
struct Routed {
    response: HttpResponse,
    decision: Decision,
    /// `None`: the status comes later, in the streamed trailers.
    grpc_status: Option<u32>,
}

impl Routed {
    fn refused(refusal: &Refusal) -> Routed {
        Routed {
            response: refusal_response(refusal),
            decision: Decision::of_refusal(refusal.reason),
            grpc_status: Some(refusal.reason.code() as u32),
        }
    }

    /// A response as it came from the service (passthrough, oversized): its status is known
    /// now only when it is trailers-only.
    fn streamed(response: HttpResponse, decision: Decision) -> Routed {
        let grpc_status = response
            .headers()
            .get("grpc-status")
            .and_then(|value| value.to_str().ok()?.parse().ok());
        Routed {
            response,
            decision,
            grpc_status,
        }
    }
}

/// A trailers-only answer in the service's place.
pub fn refusal_response(refusal: &Refusal) -> HttpResponse {
    let mut response = http::Response::new(ProxyBody::empty());
    *response.headers_mut() = refusal.to_headers();
    response
}

/// Writes a recorded (or fresh) response back as it was received.
pub fn recorded_response(recorded: Response, replayed: bool) -> HttpResponse {
    let mut headers = grpc::from_headers(&recorded.headers, 1);
    if replayed {
        headers.insert(REPLAYED_HEADER, HeaderValue::from_static("true"));
    }
    let body = if recorded.trailers_only {
        ProxyBody::empty()
    } else {
        ProxyBody::buffered(
            recorded.body,
            Some(grpc::from_headers(&recorded.trailers, 0)),
        )
    };
    let mut response = http::Response::new(body);
    *response.status_mut() =
        http::StatusCode::from_u16(recorded.http_status as u16).unwrap_or(http::StatusCode::OK);
    *response.headers_mut() = headers;
    response
}

impl<S: Store, C: Clock> Proxy<S, C> {
    /// A proxy over an engine and the upstream it forwards to.
    pub fn new(
        settings: ProxySettings,
        engine: Arc<Engine<S, HttpUpstream, C>>,
        upstream: HttpUpstream,
        policy: Arc<PolicyTable>,
    ) -> Proxy<S, C> {
        Proxy {
            settings,
            engine,
            upstream,
            policy,
            metrics: Metrics::disabled(),
        }
    }

    /// Records every call into `metrics`.
    pub fn with_metrics(mut self, metrics: Metrics) -> Self {
        self.metrics = metrics;
        self
    }

    /// Answers one call from `peer`. Never fails: every problem becomes a gRPC status. The
    /// call's span (when traces are exported) and its metrics are made here, once.
    pub async fn serve(
        self: Arc<Self>,
        request: Request<Incoming>,
        peer: Option<SocketAddr>,
    ) -> Result<HttpResponse, Infallible> {
        let started = Instant::now();
        let path = request.uri().path();
        let span = trace::server_span(
            path,
            request.uri().authority(),
            request.headers(),
            peer,
            self.metrics.backend(),
        );
        let method = self.metrics.method_label(path);
        let routed = self.route(request, &span).instrument(span.clone()).await;
        if !span.is_none() {
            span.record("idemproxy.decision", routed.decision.as_str());
            trace::record_status(&span, routed.grpc_status);
        }
        self.metrics.call(
            method,
            routed.decision,
            routed.grpc_status,
            started.elapsed(),
        );
        Ok(routed.response)
    }

    async fn route(&self, request: Request<Incoming>, span: &tracing::Span) -> Routed {
        let rule = self.policy.get(request.uri().path());
        if rule.dedup == Dedup::Off {
            return self.pass_through(request.map(ProxyBody::Streaming)).await;
        }
        let keyed = request.headers().contains_key(&self.settings.key_header);
        if keyed || rule.inspects_request() {
            return self.deduplicate(request, rule, span).await;
        }
        if rule.require_key {
            return Routed::refused(&key_missing(&self.settings));
        }
        self.pass_through(request.map(ProxyBody::Streaming)).await
    }

    async fn pass_through(&self, request: Request<ProxyBody>) -> Routed {
        match self.upstream.stream(request).await {
            Ok(response) => Routed::streamed(response, Decision::Bypass),
            Err(error) => {
                let mut routed = Routed::refused(&Refusal::new(
                    Reason::UpstreamUnavailable,
                    format!("the service is unavailable: {error}"),
                ));
                routed.decision = Decision::Bypass;
                routed
            }
        }
    }

    async fn deduplicate(
        &self,
        request: Request<Incoming>,
        rule: &MethodRule,
        span: &tracing::Span,
    ) -> Routed {
        let (parts, incoming) = request.into_parts();
        let header_serial = parts
            .headers
            .get(&self.settings.key_header)
            .map(|value| Bytes::copy_from_slice(value.as_bytes()));
        let caller = match parts.headers.get(&self.settings.caller_header) {
            None => ANONYMOUS_CALLER.to_owned(),
            Some(value) => match value.to_str() {
                Ok(caller) if !caller.is_empty() => caller.to_owned(),
                _ => {
                    return Routed::refused(&Refusal::new(
                        Reason::KeyInvalid,
                        format!(
                            "the {} header is not visible ASCII",
                            self.settings.caller_header
                        ),
                    ))
                }
            },
        };
        let body = match Limited::new(incoming, self.settings.request_bytes_max)
            .collect()
            .await
        {
            Ok(collected) => collected.to_bytes(),
            Err(error) if error.is::<http_body_util::LengthLimitError>() => {
                return Routed::refused(&Refusal::new(
                    Reason::RequestTooLarge,
                    format!(
                        "the request is larger than the {} bytes that can be deduplicated",
                        self.settings.request_bytes_max
                    ),
                ))
            }
            Err(error) => {
                return Routed::refused(&Refusal::new(
                    Reason::MalformedRequest,
                    format!("the request body could not be read: {error}"),
                ))
            }
        };
        let encoding = parts
            .headers
            .get("grpc-encoding")
            .map(|value| value.to_str().unwrap_or("(not ASCII)"));
        let messages = match grpc::check_framing(&body, encoding.is_some()) {
            Ok(messages) => messages,
            Err(error) => {
                return Routed::refused(&Refusal::new(Reason::MalformedRequest, error.to_string()))
            }
        };
        let inspected = self.inspect(rule, &body, messages, encoding, header_serial);
        let (serial, fingerprint) = match inspected {
            Ok(found) => found,
            Err(refusal) => return Routed::refused(&refusal),
        };
        let Some(serial) = serial else {
            if rule.require_key {
                return Routed::refused(&key_missing(&self.settings));
            }
            // Read to look for a key field and found none: forward what was read.
            let request = Request::from_parts(parts, ProxyBody::buffered(body, None));
            return self.pass_through(request).await;
        };
        let timeout = parts
            .headers
            .get("grpc-timeout")
            .and_then(|value| grpc::parse_timeout(value.as_bytes()));
        let call = Call {
            method: parts.uri.path().to_owned(),
            caller,
            serial,
            body,
            timeout,
            fingerprint,
            policy: Some(rule.call),
            request: parts,
            origin: trace::origin_of(span),
        };
        let (answer, decision) = self.engine.handle_observed(call).await;
        let (response, grpc_status) = match answer {
            Answer::Fresh(response) => {
                let status = response.grpc_status;
                (recorded_response(response, false), Some(status))
            }
            Answer::Replay(response) => {
                trace::link_to_origin(span, &response.origin_trace);
                let status = response.grpc_status;
                (recorded_response(response, true), Some(status))
            }
            Answer::Stream(response) => return Routed::streamed(response, decision),
            Answer::Refused(refusal) => {
                let status = refusal.reason.code() as u32;
                (refusal_response(&refusal), Some(status))
            }
        };
        Routed {
            response,
            decision,
            grpc_status,
        }
    }
}

impl<S, C> Proxy<S, C> {
    /// The serial (header first, then the key field) and, for a method with descriptors, the
    /// canonical fingerprint.
    fn inspect(
        &self,
        rule: &MethodRule,
        body: &Bytes,
        messages: usize,
        encoding: Option<&str>,
        header_serial: Option<Bytes>,
    ) -> Result<(Option<Bytes>, Option<[u8; 32]>), Refusal> {
        let Some(input) = &rule.input else {
            return Ok((header_serial, None));
        };
        let malformed = |why: String| Refusal::new(Reason::MalformedRequest, why);
        let unary = grpc::unary_message(body, messages, encoding, self.settings.request_bytes_max)
            .map_err(|error| malformed(error.to_string()))?;
        let inspected = message::inspect(input, &unary, rule.key_field.as_ref(), &rule.ignored)
            .map_err(malformed)?;
        Ok((
            header_serial.or(inspected.serial),
            Some(inspected.fingerprint),
        ))
    }
}

fn key_missing(settings: &ProxySettings) -> Refusal {
    Refusal::new(
        Reason::KeyMissing,
        format!(
            "this method requires an idempotency key: send the {} header or set the request's key field",
            settings.key_header
        ),
    )
}

/// Serves HTTP/2 (prior knowledge, as gRPC speaks it) on `listener` until `shutdown`
/// resolves, then drains: no new connection is accepted, every open one gets GOAWAY and is
/// served until its calls end; returns when all have closed. Each connection runs in its own
/// task.
pub async fn serve<S: Store, C: Clock>(
    listener: TcpListener,
    proxy: Arc<Proxy<S, C>>,
    shutdown: impl Future<Output = ()>,
) {
    let mut builder = http2::Builder::new(TokioExecutor::new());
    builder.timer(hyper_util::rt::TokioTimer::new());
    let (draining, drain) = tokio::sync::watch::channel(false);
    let mut connections = tokio::task::JoinSet::new();
    tokio::pin!(shutdown);
    loop {
        let (stream, peer) = tokio::select! {
            () = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(error) => {
                    // Out of file descriptors and the like: keep serving the open connections.
                    tracing::warn!(%error, "accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            },
            // Reap finished connections so the set stays the size of the open ones.
            Some(_) = connections.join_next(), if !connections.is_empty() => continue,
        };
        let _ = stream.set_nodelay(true);
        let proxy = proxy.clone();
        let connection = builder.serve_connection(
            TokioIo::new(stream),
            hyper::service::service_fn(move |request| proxy.clone().serve(request, Some(peer))),
        );
        let mut drain = drain.clone();
        connections.spawn(async move {
            tokio::pin!(connection);
            let result = tokio::select! {
                result = connection.as_mut() => result,
                () = async { let _ = drain.wait_for(|draining| *draining).await; } => {
                    connection.as_mut().graceful_shutdown();
                    connection.await
                }
            };
            if let Err(error) = result {
                tracing::debug!(%peer, %error, "connection ended with an error");
            }
        });
    }
    drop(listener);
    let _ = draining.send(true);
    tracing::info!(
        connections = connections.len(),
        "draining the open connections"
    );
    while connections.join_next().await.is_some() {}
}
