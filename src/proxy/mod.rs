//! The gRPC proxy: an HTTP/2 server in front of the service (design §6).
//!
//! Each call is classified once, by its method's rule in the policy table: a call carrying a
//! key (the key header, or the method's key field) is deduplicated by the engine (read whole,
//! bounded, then claimed, forwarded and recorded); every other call streams through both
//! ways, never buffered — except that a method with a key field must be read to learn that
//! it has none. This module speaks HTTP; the engine does not.

pub mod body;
pub mod budget;
mod gather;
pub mod grpc;
pub mod upstream;

use crate::caller::{Callers, Peer};
use crate::engine::{Answer, Call, Clock, Engine, Mode};
use crate::policy::{self, message, Dedup, MethodRule, PolicyTable};
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
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::time::Instant;
use tracing::Instrument as _;
use upstream::{HttpUpstream, UpstreamError};

/// The metadata a replayed answer carries.
pub const REPLAYED_HEADER: &str = "idempotency-replayed";

/// On a replay of an outcome an in-doubt probe recorded: `probe` (the service's lookup
/// answered, not the call itself).
pub const RESOLVED_BY_HEADER: &str = "idempotency-resolved-by";

/// What the proxy reads from each call.
#[derive(Debug, Clone)]
pub struct ProxySettings {
    /// The header holding the request serial number.
    pub key_header: HeaderName,
    /// Who calls, and whether a call must say.
    pub callers: Callers,
    /// The largest request body that is deduplicated.
    pub request_bytes_max: usize,
    /// The bytes all keyed calls together may buffer.
    pub budget: budget::Budget,
    /// How far a caller's clock may be from ours when it says when it first sent a key
    /// (`idempotency-first-sent`).
    pub clock_skew_max: Duration,
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
    /// Why the sidecar answered in the service's place, when it did.
    refusal: Option<Reason>,
}

impl Routed {
    /// A passthrough answer, or UNAVAILABLE when the service could not be reached.
    fn passed_through(forwarded: Result<HttpResponse, UpstreamError>) -> Routed {
        match forwarded {
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

    fn refused(refusal: &Refusal) -> Routed {
        Routed {
            response: refusal_response(refusal),
            decision: Decision::of_refusal(refusal.reason),
            grpc_status: Some(refusal.reason.code() as u32),
            refusal: Some(refusal.reason),
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
            refusal: None,
        }
    }
}

/// A trailers-only answer in the service's place.
pub fn refusal_response(refusal: &Refusal) -> HttpResponse {
    let mut response = http::Response::new(ProxyBody::empty());
    *response.headers_mut() = refusal.to_headers();
    response
}

/// Marks the value of `name` for HPACK's "never indexed" literal when it is forwarded. A key
/// is new with every call: in the upstream connection's compression table each one would
/// evict an entry worth keeping, and every later call would compare its key against all
/// those kept (85 comparisons a fresh call at 32 in flight, measured). Nor does a key belong
/// in a table shared by the connection's other calls.
pub fn never_indexed(headers: &mut http::HeaderMap, name: &http::HeaderName) {
    if let Some(value) = headers.get_mut(name) {
        value.set_sensitive(true);
    }
}

/// Writes a recorded (or fresh) response back as it was received; `expires_ms`, when the
/// key's record holds it, becomes `idempotency-expires`.
pub fn recorded_response(
    recorded: Response,
    replayed: bool,
    expires_ms: Option<u64>,
) -> HttpResponse {
    let mut headers = grpc::from_headers(&recorded.headers, 1);
    if let Some(expires_ms) = expires_ms {
        headers.insert(
            crate::status::EXPIRES_HEADER,
            HeaderValue::from(crate::status::expires_s(expires_ms)),
        );
    }
    if replayed {
        headers.insert(REPLAYED_HEADER, HeaderValue::from_static("true"));
        if recorded.resolved_by_probe {
            headers.insert(RESOLVED_BY_HEADER, HeaderValue::from_static("probe"));
        }
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
        peer: Arc<Peer>,
    ) -> Result<HttpResponse, Infallible> {
        let started = Instant::now();
        let path = request.uri().path();
        let span = trace::server_span(
            path,
            request.uri().authority(),
            request.headers(),
            peer.addr,
            self.metrics.backend(),
        );
        let method = self.metrics.method_label(path);
        let routed = self
            .route(request, &peer, &span)
            .instrument(span.clone())
            .await;
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
        if let Some(reason) = routed.refusal {
            self.metrics.refused(reason);
        }
        Ok(routed.response)
    }

    async fn route(
        &self,
        mut request: Request<Incoming>,
        peer: &Peer,
        span: &tracing::Span,
    ) -> Routed {
        never_indexed(request.headers_mut(), &self.settings.key_header);
        let path = request.uri().path();
        let rule = self.policy.get(path);
        if rule.dedup == Dedup::Off || policy::never_changes_state(path) {
            return self.pass_through(request).await;
        }
        let keyed = request.headers().contains_key(&self.settings.key_header);
        let observing = rule.call.mode == Mode::Observe;
        if rule.dedup == Dedup::Unsupported {
            if keyed && !observing {
                return Routed::refused(&shape_unsupported(
                    "the method is a bidirectional stream, which cannot be deduplicated: send it without the idempotency key",
                ));
            }
            return self.pass_through(request).await;
        }
        if keyed || rule.inspects_request() {
            return self.deduplicate(request, rule, peer, span).await;
        }
        if rule.require_key && !observing {
            return Routed::refused(&key_missing(&self.settings));
        }
        self.pass_through(request).await
    }

    async fn pass_through(&self, request: Request<Incoming>) -> Routed {
        Routed::passed_through(self.upstream.stream(request).await)
    }

    async fn deduplicate(
        &self,
        request: Request<Incoming>,
        rule: &MethodRule,
        peer: &Peer,
        span: &tracing::Span,
    ) -> Routed {
        let observing = rule.call.mode == Mode::Observe;
        let (parts, incoming) = request.into_parts();
        let identified = self.header_serial(&parts.headers).and_then(|serial| {
            let caller = self.settings.callers.caller_of(&parts.headers, peer)?;
            Ok((serial, caller))
        });
        let (header_serial, caller) = match identified {
            Ok(identified) => identified,
            // Observe mode refuses nothing: the call goes on as without the sidecar.
            Err(_) if observing => {
                return self
                    .pass_through(Request::from_parts(parts, incoming))
                    .await
            }
            Err(refusal) => return Routed::refused(&refusal),
        };
        // Without descriptors a body still open after a few seconds is taken for a stream
        // whose client waits for answers; with them the shape is known (unary or client
        // stream) and a slow upload gets longer, but a stalled one is still cut.
        let wait = if rule.input.is_some() {
            REQUEST_READ_MAX
        } else {
            REQUEST_END_WAIT
        };
        // Held until this call's answer is built; the upstream client adds the answer's
        // bytes to it while it collects them (it travels in the request's extensions).
        let held = match parts.extensions.get::<budget::Budget>() {
            Some(connection_share) => connection_share.hold(),
            None => self.settings.budget.hold(),
        };
        let bytes_max = self.settings.request_bytes_max;
        let body = match read_request(incoming, bytes_max, wait, &held).await {
            Ok(body) => body,
            Err(refusal) => return Routed::refused(&refusal),
        };
        let mut parts = parts;
        parts.extensions.insert(held.clone());
        let encoding = parts
            .headers
            .get("grpc-encoding")
            .map(|value| value.to_str().unwrap_or("(not ASCII)"));
        let inspected = grpc::check_framing(&body, encoding.is_some())
            .map_err(|error| Refusal::new(Reason::MalformedRequest, error.to_string()))
            .and_then(|messages| self.inspect(rule, &body, messages, encoding, header_serial));
        let (serial, fingerprint) = match inspected {
            Ok(found) => found,
            Err(_) if observing => {
                return Routed::passed_through(self.upstream.forward(parts, body).await)
            }
            Err(refusal) => return Routed::refused(&refusal),
        };
        let Some(serial) = serial else {
            if rule.require_key && !observing {
                return Routed::refused(&key_missing(&self.settings));
            }
            // Read to look for a key field and found none: forward what was read.
            let forwarded = self.upstream.forward(parts, body).await;
            return Routed::passed_through(forwarded);
        };
        if observing && crate::key::validate_serial(&serial).is_err() {
            // Observe mode refuses nothing, not even a malformed key: forwarded unrecorded.
            return Routed::passed_through(self.upstream.forward(parts, body).await);
        }
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
            policy: Some(rule.call.clone()),
            request: parts,
            origin: trace::origin_of(span),
        };
        if !observing {
            if let Some(refusal) = self.outside_window(&call, rule) {
                return Routed::refused(&refusal);
            }
        }
        let handled = self.engine.handle_observed(call).await;
        let (decision, expires_ms) = (handled.decision, handled.expires_ms);
        let mut refused = None;
        let (response, grpc_status) = match handled.answer {
            Answer::Fresh(response) => {
                let status = response.grpc_status;
                (recorded_response(response, false, expires_ms), Some(status))
            }
            Answer::Replay(response) => {
                trace::link_to_origin(span, &response.origin_trace);
                let status = response.grpc_status;
                (recorded_response(response, true, expires_ms), Some(status))
            }
            Answer::Stream(response) => return Routed::streamed(response, decision),
            Answer::Refused(refusal) => {
                let status = refusal.reason.code() as u32;
                refused = Some(refusal.reason);
                (refusal_response(&refusal), Some(status))
            }
        };
        Routed {
            response,
            decision,
            grpc_status,
            refusal: refused,
        }
    }
}

/// How long a keyed call's request body may take to end. The dedup path reads the whole
/// request before it claims; a body still open after this is a stream whose client waits for
/// answers, and is refused rather than held (design §3: a keyed call never hangs).
pub const REQUEST_END_WAIT: Duration = Duration::from_secs(3);

/// How long a keyed call of a method whose descriptors say it ends its input (unary, client
/// stream) may take to send it: a body that stalls is cut, so its buffered bytes are not held.
pub const REQUEST_READ_MAX: Duration = Duration::from_secs(30);

fn shape_unsupported(why: impl Into<String>) -> Refusal {
    Refusal::new(Reason::CallShapeUnsupported, why)
}

/// A keyed call's whole request body, bounded in bytes and in time.
async fn read_request(
    incoming: Incoming,
    bytes_max: usize,
    wait: Duration,
    held: &budget::Held,
) -> Result<Bytes, Refusal> {
    let read = collect_within(Limited::new(incoming, bytes_max), held);
    let Ok(read) = tokio::time::timeout(wait, read).await else {
        // Nothing is claimed yet: a client that waits for answers before it ends its input
        // (a bidirectional stream) would otherwise hold the call forever.
        return Err(shape_unsupported(format!(
            "the request did not end within {wait:?}; a call whose client streams while it waits for answers cannot be deduplicated: send it without the idempotency key"
        )));
    };
    match read {
        Ok(Some(collected)) => Ok(collected),
        Ok(None) => Err(Refusal::new(
            Reason::BuffersExhausted,
            "the sidecar buffers as many request and response bytes as --max-buffered-bytes allows: retry later",
        )),
        Err(error) if error.is::<http_body_util::LengthLimitError>() => Err(Refusal::new(
            Reason::RequestTooLarge,
            format!("the request is larger than the {bytes_max} bytes that can be deduplicated"),
        )),
        Err(error) => Err(Refusal::new(
            Reason::MalformedRequest,
            format!("the request body could not be read: {error}"),
        )),
    }
}

/// The body's bytes, each frame taken from `held`'s budget as it arrives; `None` as soon as
/// the budget has no room for one (its bytes are dropped with the body). A unary call's
/// body is one frame most of the time: it is kept as it came, copied only to join several.
async fn collect_within(
    mut body: Limited<Incoming>,
    held: &budget::Held,
) -> Result<Option<Bytes>, Box<dyn std::error::Error + Send + Sync>> {
    let mut frames: Vec<Bytes> = Vec::new();
    while let Some(frame) = body.frame().await {
        let Ok(data) = frame?.into_data() else {
            // Trailers: a gRPC request has none that matter here.
            continue;
        };
        if !held.grow(data.len()) {
            return Ok(None);
        }
        frames.push(data);
    }
    Ok(Some(match frames.len() {
        0 => Bytes::new(),
        1 => frames.swap_remove(0),
        _ => Bytes::from(frames.concat()),
    }))
}

impl<S: Store, C: Clock> Proxy<S, C> {
    /// The refusal of a keyed call whose `idempotency-first-sent` says it comes too late (or
    /// is malformed, or from a clock too far ahead), or that lacks one its method requires.
    fn outside_window(
        &self,
        call: &Call<http::request::Parts>,
        rule: &MethodRule,
    ) -> Option<Refusal> {
        use crate::status::FIRST_SENT_HEADER;
        let about = |refusal: Refusal| {
            let key = crate::key::Key::derive(&call.method, &call.caller, &call.serial);
            refusal.about(key, crate::status::KeyState::Unknown)
        };
        let value = match crate::caller::single_header(
            &call.request.headers,
            &HeaderName::from_static(FIRST_SENT_HEADER),
        ) {
            Ok(Some(value)) => value,
            Ok(None) if rule.require_first_sent => {
                return Some(about(Refusal::new(
                    Reason::KeyMissing,
                    format!("this method requires the {FIRST_SENT_HEADER} header on every keyed call: the time its first attempt was sent, whole seconds since the Unix epoch"),
                )))
            }
            Ok(None) => return None,
            Err(crate::caller::SentTwice) => {
                return Some(about(Refusal::new(
                    Reason::KeyInvalid,
                    format!("more than one {FIRST_SENT_HEADER} header: send one per call"),
                )))
            }
        };
        let checked = crate::window::parse_first_sent(value.as_bytes()).and_then(|first_sent_s| {
            crate::window::check_first_sent(
                first_sent_s,
                self.engine.now_ms(),
                rule.call.retention,
                self.settings.clock_skew_max,
            )
        });
        let error = checked.err()?;
        let reason = match error {
            crate::window::FirstSentError::Expired { .. } => Reason::KeyExpired,
            _ => Reason::KeyInvalid,
        };
        Some(about(Refusal::new(reason, error.to_string())))
    }
}

impl<S, C> Proxy<S, C> {
    /// The key header's one value. Two are refused, never one picked: which one a gateway or
    /// client library would have meant cannot be known, and two calls that differ only there
    /// must not share an outcome.
    fn header_serial(&self, headers: &http::HeaderMap) -> Result<Option<Bytes>, Refusal> {
        let name = &self.settings.key_header;
        let value =
            crate::caller::single_header(headers, name).map_err(|crate::caller::SentTwice| {
                Refusal::new(
                    Reason::KeyInvalid,
                    format!("more than one {name} header: send one key per call"),
                )
            })?;
        Ok(value.map(|value| Bytes::copy_from_slice(value.as_bytes())))
    }

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
        let bytes_max = self.settings.request_bytes_max;
        let (key_fields, ignored) = (&rule.key_fields[..], &rule.ignored);
        let inspected = if rule.client_streaming {
            let all = grpc::stream_messages(body, encoding, bytes_max)
                .map_err(|error| malformed(error.to_string()))?;
            message::inspect_stream(input, &all, key_fields, ignored)
        } else {
            let unary = grpc::unary_message(body, messages, encoding, bytes_max)
                .map_err(|error| malformed(error.to_string()))?;
            message::inspect(input, &unary, key_fields, ignored)
        }
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

/// What one client connection to the proxy may do (design: safe defaults, each a setting).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Http2Limits {
    /// Concurrent streams per connection.
    pub max_concurrent_streams: u32,
    /// Bytes of one header list.
    pub max_header_list_size: u32,
    /// Ping period of a connection; `None`: no pings.
    pub keepalive_interval: Option<Duration>,
    /// How long a ping may go unanswered.
    pub keepalive_timeout: Duration,
    /// A connection starting no call for this long is closed gracefully.
    pub idle_timeout: Duration,
    /// Client connections held at once; 0 until the open-files limit is known at start.
    pub connections_max: usize,
}

/// How the proxy listener takes connections.
#[derive(Clone)]
pub struct Listening {
    /// What each connection may do.
    pub http2: Http2Limits,
    /// TLS, when the listener terminates it; with a client CA, each connection's verified
    /// certificate names its caller.
    pub tls: Option<Arc<crate::tls::Reloading>>,
    /// A client certificate without a URI SAN is named by its subject CN.
    pub subject_fallback: bool,
}

/// How long a client has to finish its TLS handshake.
const HANDSHAKE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// Serves HTTP/2 (prior knowledge, as gRPC speaks it; over TLS with ALPN `h2` when
/// `listening.tls` is set) on `listener` until `shutdown` resolves, then drains: no new
/// connection is accepted, every open one gets GOAWAY and is served until its calls end;
/// returns when all have closed. Each connection runs in its own task.
pub async fn serve<S: Store, C: Clock>(
    listener: TcpListener,
    proxy: Arc<Proxy<S, C>>,
    listening: Listening,
    shutdown: impl Future<Output = ()>,
) {
    let limits = listening.http2;
    let mut builder = http2::Builder::new(TokioExecutor::new());
    builder
        .timer(hyper_util::rt::TokioTimer::new())
        // A proxy adds nothing the service did not send: hyper would stamp every answer with
        // its own `date`, and a replay with a fresh one (design §3, replay fidelity).
        .auto_date_header(false)
        .max_concurrent_streams(limits.max_concurrent_streams)
        .max_header_list_size(limits.max_header_list_size)
        .keep_alive_interval(limits.keepalive_interval)
        .keep_alive_timeout(limits.keepalive_timeout);
    let (draining, drain) = tokio::sync::watch::channel(false);
    let mut connections = tokio::task::JoinSet::new();
    // A slot per connection held: past `connections_max`, new connections wait in the
    // listen backlog, so client sockets never take the file descriptors the store needs.
    let slots = Arc::new(tokio::sync::Semaphore::new(limits.connections_max));
    let mut accept_backoff = ACCEPT_BACKOFF_MIN;
    tokio::pin!(shutdown);
    loop {
        let (stream, addr, slot) = tokio::select! {
            () = &mut shutdown => break,
            accepted = accept(&listener, &slots) => match accepted {
                Ok(accepted) => {
                    accept_backoff = ACCEPT_BACKOFF_MIN;
                    accepted
                }
                Err(error) => {
                    // Out of file descriptors and the like: keep serving the open connections,
                    // and try again later, waiting longer while it lasts.
                    tracing::warn!(%error, retry_ms = accept_backoff.as_millis() as u64, "accept failed");
                    tokio::time::sleep(accept_backoff).await;
                    accept_backoff = (accept_backoff * 2).min(ACCEPT_BACKOFF_MAX);
                    continue;
                }
            },
            // Reap finished connections so the set stays the size of the open ones.
            Some(_) = connections.join_next(), if !connections.is_empty() => continue,
        };
        let _ = stream.set_nodelay(true);
        let connection = ClientConnection {
            builder: builder.clone(),
            proxy: proxy.clone(),
            drain: drain.clone(),
            idle_timeout: limits.idle_timeout,
        };
        let tls = listening.tls.as_ref().map(|tls| tls.acceptor());
        let subject_fallback = listening.subject_fallback;
        connections.spawn(async move {
            // Given back when the connection ends, however it ends.
            let _slot = slot;
            let Some(acceptor) = tls else {
                let peer = Peer {
                    addr: Some(addr),
                    certificate: None,
                };
                return connection.run(TokioIo::new(stream), peer).await;
            };
            let stream =
                match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
                    Ok(Ok(stream)) => stream,
                    Ok(Err(error)) => return tracing::debug!(%addr, %error, "TLS handshake failed"),
                    Err(_) => return tracing::debug!(%addr, "TLS handshake timed out"),
                };
            let leaf = stream
                .get_ref()
                .1
                .peer_certificates()
                .and_then(<[_]>::first);
            let certificate = match leaf {
                Some(leaf) => crate::tls::caller_of_certificate(leaf, subject_fallback),
                None => Err("no client certificate".to_owned()),
            };
            let peer = Peer {
                addr: Some(addr),
                certificate: Some(certificate),
            };
            connection.run(TokioIo::new(stream), peer).await;
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

/// The first wait after a failed accept, doubled while accepts fail, up to the longest.
const ACCEPT_BACKOFF_MIN: std::time::Duration = std::time::Duration::from_millis(10);
const ACCEPT_BACKOFF_MAX: std::time::Duration = std::time::Duration::from_secs(1);

/// The next connection, once a slot for it is free.
async fn accept(
    listener: &TcpListener,
    slots: &Arc<tokio::sync::Semaphore>,
) -> std::io::Result<(
    tokio::net::TcpStream,
    std::net::SocketAddr,
    tokio::sync::OwnedSemaphorePermit,
)> {
    let slot = slots
        .clone()
        .acquire_owned()
        .await
        .expect("the connection slots are never closed");
    let (stream, addr) = listener.accept().await?;
    Ok((stream, addr, slot))
}

/// One client connection's share of the listener.
struct ClientConnection<S, C> {
    builder: http2::Builder<TokioExecutor>,
    proxy: Arc<Proxy<S, C>>,
    drain: tokio::sync::watch::Receiver<bool>,
    idle_timeout: std::time::Duration,
}

impl<S: Store, C: Clock> ClientConnection<S, C> {
    /// Serves the connection until it closes: gracefully (GOAWAY, open calls finish) when the
    /// listener drains or when no call started for the idle timeout.
    async fn run<I>(mut self, io: I, peer: Peer)
    where
        I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
    {
        let peer = Arc::new(peer);
        let addr = peer.addr;
        let started = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let counted = started.clone();
        let proxy = self.proxy.clone();
        // This connection's share of the buffers' budget: its keyed calls take from it first.
        let settings = &self.proxy.settings;
        let share = settings.budget.for_connection(budget::connection_share(
            settings.budget.bytes_max(),
            settings.request_bytes_max,
        ));
        let mut connection = gather::Gathered::new(self.builder.serve_connection(
            io,
            hyper::service::service_fn(move |mut request: Request<Incoming>| {
                counted.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                request.extensions_mut().insert(share.clone());
                // Boxed, as hyper moves the call's future (kilobytes) into a task of its own.
                Box::pin(proxy.clone().serve(request, peer.clone()))
            }),
        ));
        let tick = self.idle_timeout / 4;
        let mut seen = 0;
        let mut quiet_since = Instant::now();
        let result = loop {
            tokio::select! {
                result = &mut connection => break result,
                () = async { let _ = self.drain.wait_for(|draining| *draining).await; } => {
                    connection.inner().graceful_shutdown();
                    break (&mut connection).await;
                }
                () = tokio::time::sleep(tick) => {
                    let now = started.load(std::sync::atomic::Ordering::Relaxed);
                    if now != seen {
                        seen = now;
                        quiet_since = Instant::now();
                    } else if quiet_since.elapsed() >= self.idle_timeout {
                        tracing::debug!(?addr, "closing an idle connection");
                        connection.inner().graceful_shutdown();
                        break (&mut connection).await;
                    }
                }
            }
        };
        if let Err(error) = result {
            tracing::debug!(?addr, %error, "connection ended with an error");
        }
    }
}
