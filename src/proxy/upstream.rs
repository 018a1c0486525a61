//! The HTTP/2 client to the service, and the `Upstream` the engine forwards through.
//!
//! One multiplexed HTTP/2 connection serves passthrough and deduplicated calls alike, driven
//! with h2 directly: a request whose body is in hand goes out as HEADERS and DATA in the same
//! write, where a generic client would give the body its own task and write. A body still
//! arriving is pumped after the HEADERS with h2's flow control, so nothing is buffered. The
//! module decides what a transport failure means for a record: only a failure that proves the
//! service never saw the request (no connection, a request h2 refused to send, REFUSED_STREAM)
//! lets the key be released; anything else is an unknown outcome.

use super::body::ProxyBody;
use super::grpc;
use crate::engine::{Reply, Upstream};
use crate::telemetry::trace;
use bytes::{Bytes, BytesMut};
use h2::client::SendRequest;
use h2::{RecvStream, SendStream};
use http::request::Parts;
use http::uri::{Authority, PathAndQuery, Scheme};
use http::{Request, Response, Uri};
use http_body_util::BodyExt;
use hyper::body::{Body, Frame, Incoming};
use std::future::{poll_fn, Future};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};
use tracing::Instrument as _;

/// The service's address and the connection that reaches it.
#[derive(Clone)]
pub struct HttpUpstream {
    connection: Arc<UpstreamConnection>,
    scheme: Scheme,
    authority: Authority,
    response_bytes_max: usize,
}

/// Why an upstream URL was refused.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamUrlError {
    /// Not a URL at all.
    #[error("--upstream {url:?} is not a URL: {reason}")]
    Invalid {
        /// What was given.
        url: String,
        /// Why it does not parse.
        reason: String,
    },
    /// Not `http://host:port`.
    #[error(
        "--upstream {0:?} must be http://host:port (plaintext HTTP/2 to the service beside us)"
    )]
    Unsupported(String),
}

/// Why a call to the service failed.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    /// No connection to the service: it never saw the request.
    #[error("cannot connect to {authority}: {reason}")]
    Connect {
        /// Where we tried.
        authority: Authority,
        /// Why it failed.
        reason: String,
    },
    /// h2 refused to send the request (the connection closed before it went out): the
    /// service never saw it.
    #[error("the request could not be sent: {0}")]
    NotSent(h2::Error),
    /// The stream failed after the request was sent.
    #[error("{0}")]
    Stream(h2::Error),
    /// The caller's request body broke off before the request was sent.
    #[error("the request body could not be read: {0}")]
    RequestBody(hyper::Error),
}

impl UpstreamError {
    /// True when the failure proves the service never saw the request.
    pub fn never_reached_service(&self) -> bool {
        match self {
            UpstreamError::Connect { .. } | UpstreamError::NotSent(_) => true,
            // REFUSED_STREAM, or a GOAWAY whose last stream is below ours (h2 fails a stream
            // with the peer's GOAWAY only then): RFC 9113 §8.7 and §6.8, not processed.
            UpstreamError::Stream(error) => {
                error.reason() == Some(h2::Reason::REFUSED_STREAM)
                    || error.is_go_away() && error.is_remote()
            }
            UpstreamError::RequestBody(_) => false,
        }
    }
}

/// The HTTP/2 settings hyper's client uses by default: windows sized for a service on the
/// same host, answers up to the response limit without a stall.
const STREAM_WINDOW: u32 = 2 * 1024 * 1024;
const CONNECTION_WINDOW: u32 = 5 * 1024 * 1024;
const MAX_HEADER_LIST: u32 = 16 * 1024;
const MAX_SEND_BUFFER: usize = 1024 * 1024;
/// Streams opened before the service's SETTINGS say how many it takes.
const INITIAL_MAX_SEND_STREAMS: usize = 100;

/// The one HTTP/2 connection to the service, made when first needed and again after it
/// closes.
struct UpstreamConnection {
    address: String,
    authority: Authority,
    /// The open connection's handle, cloned per request, and its generation.
    current: Mutex<Option<(u64, SendRequest<Bytes>)>>,
    /// Held while connecting, so concurrent calls share one new connection.
    connecting: tokio::sync::Mutex<u64>,
}

/// A connection's handle, ready for one request.
struct Ready {
    generation: u64,
    handle: SendRequest<Bytes>,
}

impl Ready {
    /// Opens the request's stream; a connection that refuses is discarded.
    fn send_request(
        &mut self,
        connection: &UpstreamConnection,
        head: Request<()>,
        end_of_stream: bool,
    ) -> Result<(h2::client::ResponseFuture, SendStream<Bytes>), UpstreamError> {
        self.handle
            .send_request(head, end_of_stream)
            .map_err(|error| {
                connection.discard(self.generation);
                UpstreamError::NotSent(error)
            })
    }
}

impl UpstreamConnection {
    /// A handle ready to send one request on: the open connection, or a new one when it
    /// has closed.
    async fn ready(&self) -> Result<Ready, UpstreamError> {
        let mut failed = None;
        loop {
            let cached = self.current.lock().expect("not poisoned").clone();
            if let Some((generation, handle)) = cached {
                if failed != Some(generation) {
                    match handle.ready().await {
                        Ok(handle) => return Ok(Ready { generation, handle }),
                        Err(_) => failed = Some(generation),
                    }
                }
            }
            // The connection closed (or never opened): one caller reconnects.
            let mut generations = self.connecting.lock().await;
            let current = self.current.lock().expect("not poisoned").clone();
            if let Some((generation, _)) = current {
                if failed != Some(generation) {
                    continue; // another call reconnected meanwhile
                }
            }
            let handle = self.connect().await?;
            *generations += 1;
            let generation = *generations;
            *self.current.lock().expect("not poisoned") = Some((generation, handle.clone()));
            match handle.ready().await {
                Ok(handle) => return Ok(Ready { generation, handle }),
                Err(error) => {
                    return Err(UpstreamError::Connect {
                        authority: self.authority.clone(),
                        reason: error.to_string(),
                    })
                }
            }
        }
    }

    /// Forgets a connection that refused to send a request, so the next call makes a new one.
    fn discard(&self, generation: u64) {
        let mut current = self.current.lock().expect("not poisoned");
        if current
            .as_ref()
            .is_some_and(|(open, _)| *open == generation)
        {
            *current = None;
        }
    }

    async fn connect(&self) -> Result<SendRequest<Bytes>, UpstreamError> {
        let failed = |reason: String| UpstreamError::Connect {
            authority: self.authority.clone(),
            reason,
        };
        let tcp = tokio::net::TcpStream::connect(&self.address)
            .await
            .map_err(|error| failed(error.to_string()))?;
        let _ = tcp.set_nodelay(true);
        let (handle, connection) = h2::client::Builder::new()
            .initial_window_size(STREAM_WINDOW)
            .initial_connection_window_size(CONNECTION_WINDOW)
            .max_header_list_size(MAX_HEADER_LIST)
            .max_send_buffer_size(MAX_SEND_BUFFER)
            .initial_max_send_streams(INITIAL_MAX_SEND_STREAMS)
            .enable_push(false)
            .handshake::<_, Bytes>(tcp)
            .await
            .map_err(|error| failed(error.to_string()))?;
        let authority = self.authority.clone();
        tokio::spawn(async move {
            if let Err(error) = super::gather::Gathered::new(connection).await {
                tracing::debug!(%authority, %error, "the connection to the service ended");
            }
        });
        Ok(handle)
    }

    /// Sends a request whose body is in hand and waits for the answer's head.
    async fn send(
        &self,
        head: Request<()>,
        body: Bytes,
    ) -> Result<Response<RecvStream>, UpstreamError> {
        let mut ready = self.ready().await?;
        // The body always ends on a DATA frame, an empty one for an empty body: that is what
        // gRPC clients send, and grpc-go's server ends a call's input only on a DATA frame's
        // END_STREAM, never on the HEADERS'. Buffered by h2 until the stream opens, then
        // written with its HEADERS.
        let (response, mut stream) = ready.send_request(self, head, false)?;
        send_data(&mut stream, body, true)?;
        response.await.map_err(UpstreamError::Stream)
    }
}

impl HttpUpstream {
    /// A client for `url` (`http://host:port`) keeping responses up to `response_bytes_max`.
    pub fn new(url: &str, response_bytes_max: usize) -> Result<HttpUpstream, UpstreamUrlError> {
        let uri: Uri =
            url.parse()
                .map_err(|error: http::uri::InvalidUri| UpstreamUrlError::Invalid {
                    url: url.to_owned(),
                    reason: error.to_string(),
                })?;
        let (Some(scheme), Some(authority)) = (uri.scheme().cloned(), uri.authority().cloned())
        else {
            return Err(UpstreamUrlError::Unsupported(url.to_owned()));
        };
        if scheme != Scheme::HTTP || uri.path() != "/" && !uri.path().is_empty() {
            return Err(UpstreamUrlError::Unsupported(url.to_owned()));
        }
        let port = upstream_port(&authority).ok_or_else(|| UpstreamUrlError::Invalid {
            url: url.to_owned(),
            reason: "the port must be a number from 1 to 65535".to_owned(),
        })?;
        let host = authority.host();
        let address = format!(
            "{}:{port}",
            host.trim_start_matches('[').trim_end_matches(']')
        );
        let connection = Arc::new(UpstreamConnection {
            address,
            authority: authority.clone(),
            current: Mutex::new(None),
            connecting: tokio::sync::Mutex::new(0),
        });
        Ok(HttpUpstream {
            connection,
            scheme,
            authority,
            response_bytes_max,
        })
    }

    /// Points a request's URI at the service, keeping its path.
    pub fn target(&self, uri: &Uri) -> Uri {
        let path = uri
            .path_and_query()
            .cloned()
            .unwrap_or_else(|| PathAndQuery::from_static("/"));
        Uri::from_parts({
            let mut parts = http::uri::Parts::default();
            parts.scheme = Some(self.scheme.clone());
            parts.authority = Some(self.authority.clone());
            parts.path_and_query = Some(path);
            parts
        })
        .expect("scheme, authority and path make a valid URI")
    }

    fn head(&self, mut parts: Parts) -> Request<()> {
        parts.uri = self.target(&parts.uri);
        Request::from_parts(parts, ())
    }

    /// Forwards a call as it streams, both ways.
    pub async fn stream(
        &self,
        request: Request<Incoming>,
    ) -> Result<Response<ProxyBody>, UpstreamError> {
        let (parts, body) = request.into_parts();
        self.traced(parts, |head| self.send_streaming(head, body))
            .await
    }

    /// Forwards a call whose body was read whole (to look for a key field), streaming the
    /// answer back.
    pub async fn forward(
        &self,
        parts: Parts,
        body: Bytes,
    ) -> Result<Response<ProxyBody>, UpstreamError> {
        self.traced(parts, |head| self.connection.send(head, body))
            .await
    }

    /// The CLIENT span of one call to the service, its context put in the call's headers;
    /// every exit to the service (`stream`, `forward`, `call`) opens it here.
    fn client_span(&self, parts: &mut Parts) -> tracing::Span {
        if !trace::enabled() {
            return tracing::Span::none();
        }
        trace::client_span(
            parts.uri.path(),
            self.authority.as_str(),
            &mut parts.headers,
        )
    }

    /// Sends a passthrough call in its CLIENT span (when traces are exported).
    async fn traced<F, R>(
        &self,
        mut parts: Parts,
        send: F,
    ) -> Result<Response<ProxyBody>, UpstreamError>
    where
        F: FnOnce(Request<()>) -> R,
        R: Future<Output = Result<Response<RecvStream>, UpstreamError>>,
    {
        let span = self.client_span(&mut parts);
        let response = send(self.head(parts)).instrument(span.clone()).await?;
        if !span.is_none() {
            let status = response.headers().get("grpc-status");
            let status = status.and_then(|value| value.to_str().ok()?.parse().ok());
            trace::record_status(&span, status);
        }
        Ok(response.map(|body| ProxyBody::upstream(None, body)))
    }

    async fn send_streaming(
        &self,
        head: Request<()>,
        mut body: Incoming,
    ) -> Result<Response<RecvStream>, UpstreamError> {
        let mut ready = self.connection.ready().await?;
        // A unary call's body has usually arrived with its headers: take it now, so the
        // request goes out in one write. Never wait for it: a streaming caller may send
        // nothing until it hears from the service.
        let first = poll_fn(|cx| Poll::Ready(Pin::new(&mut body).poll_frame(cx))).await;
        if let Poll::Ready(Some(Err(error))) = first {
            return Err(UpstreamError::RequestBody(error));
        }
        let ended = matches!(first, Poll::Ready(None));
        let (response, stream) = ready.send_request(&self.connection, head, ended)?;
        match first {
            Poll::Ready(Some(Ok(frame))) => send_ready_frames(frame, body, stream)?,
            Poll::Pending => drop(tokio::spawn(pump(body, stream, None))),
            Poll::Ready(_) => {}
        }
        response.await.map_err(UpstreamError::Stream)
    }
}

/// Frames of a request body already received, sent before the stream opens.
const EAGER_FRAMES: usize = 4;

/// Sends `first` and what has already arrived after it, holding each DATA back one step so
/// that the END_STREAM flag rides on it: a unary call goes out as HEADERS and one DATA, in
/// one write. A body that has not ended is pumped on in its own task.
/// The authority's port (80 when it names none), or `None` when the port it names is not one
/// of 1-65535: the `http` crate reads `:70000` as no port at all, which would quietly have sent
/// every call to port 80.
fn upstream_port(authority: &http::uri::Authority) -> Option<u16> {
    // Past an IPv6 literal's `]`, a `:` can only start the port.
    let text = authority.as_str();
    let after_host = text.rsplit_once(']').map_or(text, |(_, rest)| rest);
    if !after_host.contains(':') {
        return Some(80);
    }
    authority.port_u16().filter(|port| *port != 0)
}

fn send_ready_frames(
    first: Frame<Bytes>,
    mut body: Incoming,
    mut stream: SendStream<Bytes>,
) -> Result<(), UpstreamError> {
    let mut context = Context::from_waker(Waker::noop());
    let mut frame = first;
    let mut held = None;
    let mut eager = 0;
    loop {
        match frame.into_data() {
            // An empty DATA frame (a client's bare END_STREAM) carries nothing to hold.
            Ok(data) if data.is_empty() && held.is_some() => {}
            Ok(data) => {
                if let Some(earlier) = held.replace(data) {
                    send_data(&mut stream, earlier, false)?;
                }
            }
            Err(frame) => {
                if let Some(earlier) = held {
                    send_data(&mut stream, earlier, false)?;
                }
                if let Ok(trailers) = frame.into_trailers() {
                    stream
                        .send_trailers(trailers)
                        .map_err(UpstreamError::Stream)?;
                }
                return Ok(());
            }
        }
        if body.is_end_stream() {
            return send_data(&mut stream, held.unwrap_or_default(), true);
        }
        frame = match Pin::new(&mut body).poll_frame(&mut context) {
            Poll::Ready(Some(Ok(next))) => next,
            Poll::Ready(None) => return send_data(&mut stream, held.unwrap_or_default(), true),
            Poll::Ready(Some(Err(error))) => {
                stream.send_reset(h2::Reason::CANCEL);
                return Err(UpstreamError::RequestBody(error));
            }
            Poll::Pending => {
                if let Some(earlier) = held {
                    send_data(&mut stream, earlier, false)?;
                }
                tokio::spawn(pump(body, stream, None));
                return Ok(());
            }
        };
        eager += 1;
        if eager == EAGER_FRAMES {
            if let Some(earlier) = held {
                send_data(&mut stream, earlier, false)?;
            }
            tokio::spawn(pump(body, stream, Some(frame)));
            return Ok(());
        }
    }
}

fn send_data(stream: &mut SendStream<Bytes>, data: Bytes, end: bool) -> Result<(), UpstreamError> {
    stream.send_data(data, end).map_err(UpstreamError::Stream)
}

/// Pumps the rest of a request body to the service as it arrives, within h2's flow control,
/// until it ends or either side gives up.
async fn pump(mut body: Incoming, mut stream: SendStream<Bytes>, mut next: Option<Frame<Bytes>>) {
    loop {
        let frame = match next.take() {
            Some(frame) => Some(Ok(frame)),
            None => tokio::select! {
                frame = body.frame() => frame,
                // The service reset the stream (or answered and closed it): stop reading.
                _ = poll_fn(|cx| stream.poll_reset(cx)) => return,
            },
        };
        let frame = match frame {
            None => {
                let _ = stream.send_data(Bytes::new(), true);
                return;
            }
            Some(Err(error)) => {
                tracing::debug!(%error, "the caller's request body broke off");
                stream.send_reset(h2::Reason::CANCEL);
                return;
            }
            Some(Ok(frame)) => frame,
        };
        match frame.into_data() {
            Ok(data) => {
                let end = body.is_end_stream();
                // As hyper does: wait for some window, then hand h2 the whole frame.
                stream.reserve_capacity(1);
                while stream.capacity() == 0 {
                    match poll_fn(|cx| stream.poll_capacity(cx)).await {
                        Some(Ok(_)) => {}
                        Some(Err(_)) | None => return,
                    }
                }
                if stream.send_data(data, end).is_err() || end {
                    return;
                }
            }
            Err(frame) => {
                if let Ok(trailers) = frame.into_trailers() {
                    let _ = stream.send_trailers(trailers);
                }
                return;
            }
        }
    }
}

fn describe(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

impl Upstream for HttpUpstream {
    type Request = Parts;
    type Stream = Response<ProxyBody>;

    async fn call(&self, mut parts: Parts, body: Bytes) -> Reply<Response<ProxyBody>> {
        let span = self.client_span(&mut parts);
        let reply = self.collect(parts, body).instrument(span.clone()).await;
        if let Reply::Complete(response) = &reply {
            trace::record_status(&span, Some(response.grpc_status));
        }
        reply
    }
}

impl HttpUpstream {
    /// Sends a buffered call and collects its answer up to the response limit.
    async fn collect(&self, parts: Parts, body: Bytes) -> Reply<Response<ProxyBody>> {
        let held = parts.extensions.get::<super::budget::Held>().cloned();
        let response = match self.connection.send(self.head(parts), body).await {
            Ok(response) => response,
            Err(error) if error.never_reached_service() => {
                return Reply::NotProcessed(describe(&error))
            }
            Err(error) => return Reply::Unknown(describe(&error)),
        };
        let broke_off = |error: h2::Error| {
            Reply::Unknown(format!(
                "the response broke off after its headers: {}",
                describe(&error)
            ))
        };
        let (head, mut incoming) = response.into_parts();
        let mut data = BytesMut::new();
        while let Some(chunk) = incoming.data().await {
            let chunk = match chunk {
                Ok(chunk) => chunk,
                Err(error) => return broke_off(error),
            };
            let _ = incoming.flow_control().release_capacity(chunk.len());
            // Past the buffers' budget the answer goes on as a stream, not kept: its call ran
            // once, and its duplicates get RESPONSE_NOT_KEPT rather than a second execution.
            let fits = held.as_ref().is_none_or(|held| held.grow(chunk.len()));
            data.extend_from_slice(&chunk);
            if !fits || data.len() > self.response_bytes_max {
                let body = ProxyBody::upstream(Some(data.freeze()), incoming);
                return Reply::Oversized(Response::from_parts(head, body));
            }
        }
        let trailers = match incoming.trailers().await {
            Ok(trailers) => trailers,
            Err(error) => return broke_off(error),
        };
        Reply::Complete(grpc::to_response(
            head.status.as_u16(),
            &head.headers,
            data.freeze(),
            trailers.as_ref(),
        ))
    }
}
