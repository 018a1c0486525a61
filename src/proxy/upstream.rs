//! The pooled HTTP/2 client to the service, and the `Upstream` the engine forwards through.
//!
//! One multiplexed HTTP/2 connection set (hyper-util's pool) serves passthrough and
//! deduplicated calls alike. It decides what a transport failure means for a record: only a
//! failure that proves the service never saw the request (connect error, REFUSED_STREAM) lets
//! the key be released; anything else is an unknown outcome.

use super::body::ProxyBody;
use super::grpc;
use crate::engine::{Reply, Upstream};
use crate::telemetry::trace;
use bytes::{Bytes, BytesMut};
use http::request::Parts;
use http::uri::{Authority, PathAndQuery, Scheme};
use http::{Request, Response, Uri};
use http_body_util::BodyExt;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use std::error::Error as _;
use tracing::Instrument as _;

/// The service's address and the client that reaches it.
#[derive(Clone)]
pub struct HttpUpstream {
    client: Client<HttpConnector, ProxyBody>,
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
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        let client = Client::builder(TokioExecutor::new())
            .http2_only(true)
            .build(connector);
        Ok(HttpUpstream {
            client,
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

    /// Forwards a call as it streams, both ways. `None` when the service cannot be reached.
    pub async fn stream(
        &self,
        mut request: Request<ProxyBody>,
    ) -> Result<Response<ProxyBody>, hyper_util::client::legacy::Error> {
        let span = if trace::enabled() {
            let uri = request.uri().clone();
            trace::client_span(uri.path(), self.authority.as_str(), request.headers_mut())
        } else {
            tracing::Span::none()
        };
        *request.uri_mut() = self.target(request.uri());
        let response = self.client.request(request).instrument(span.clone()).await;
        let response = response?;
        if !span.is_none() {
            let status = response.headers().get("grpc-status");
            let status = status.and_then(|value| value.to_str().ok()?.parse().ok());
            trace::record_status(&span, status);
        }
        Ok(response.map(ProxyBody::Streaming))
    }
}

/// True when the failure proves the service never saw the request.
fn never_reached_service(error: &hyper_util::client::legacy::Error) -> bool {
    if error.is_connect() {
        return true;
    }
    let mut source = error.source();
    while let Some(cause) = source {
        if let Some(h2) = cause.downcast_ref::<h2::Error>() {
            return h2.reason() == Some(h2::Reason::REFUSED_STREAM);
        }
        source = cause.source();
    }
    false
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
        let span = trace::client_span(
            parts.uri.path(),
            self.authority.as_str(),
            &mut parts.headers,
        );
        let reply = self.collect(parts, body).instrument(span.clone()).await;
        if let Reply::Complete(response) = &reply {
            trace::record_status(&span, Some(response.grpc_status));
        }
        reply
    }
}

impl HttpUpstream {
    /// Sends a buffered call and collects its answer up to the response limit.
    async fn collect(&self, mut parts: Parts, body: Bytes) -> Reply<Response<ProxyBody>> {
        parts.uri = self.target(&parts.uri);
        let request = Request::from_parts(parts, ProxyBody::buffered(body, None));
        let response = match self.client.request(request).await {
            Ok(response) => response,
            Err(error) if never_reached_service(&error) => {
                return Reply::NotProcessed(describe(&error))
            }
            Err(error) => return Reply::Unknown(describe(&error)),
        };
        let (head, mut incoming) = response.into_parts();
        let mut data = BytesMut::new();
        let mut trailers = None;
        while let Some(frame) = incoming.frame().await {
            let frame = match frame {
                Ok(frame) => frame,
                Err(error) => {
                    return Reply::Unknown(format!(
                        "the response broke off after its headers: {}",
                        describe(&error)
                    ))
                }
            };
            match frame.into_data() {
                Ok(chunk) => {
                    if data.len() + chunk.len() > self.response_bytes_max {
                        data.extend_from_slice(&chunk);
                        let body = ProxyBody::Prefixed {
                            prefix: Some(data.freeze()),
                            rest: incoming,
                        };
                        return Reply::Oversized(Response::from_parts(head, body));
                    }
                    data.extend_from_slice(&chunk);
                }
                Err(frame) => trailers = frame.into_trailers().ok(),
            }
        }
        Reply::Complete(grpc::to_response(
            head.status.as_u16(),
            &head.headers,
            data.freeze(),
            trailers.as_ref(),
        ))
    }
}
