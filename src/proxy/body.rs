//! The one body type the proxy sends, both ways: streamed through untouched, or written from
//! a buffer (a recorded response, a request read for deduplication).

use bytes::Bytes;
use http::HeaderMap;
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use std::pin::Pin;
use std::task::{Context, Poll};

/// A request or response body.
#[derive(Debug)]
pub enum ProxyBody {
    /// Streamed from the other side as it arrives: never buffered.
    Streaming(Incoming),
    /// Written from memory: one data frame (if any bytes), then the trailers (if any).
    Buffered {
        /// The data not yet written.
        data: Option<Bytes>,
        /// The trailers not yet written.
        trailers: Option<HeaderMap>,
    },
    /// A prefix already read from `rest`, then the rest streamed.
    Prefixed {
        /// The bytes read before the decision to stream.
        prefix: Option<Bytes>,
        /// The remainder of the body.
        rest: Incoming,
    },
}

impl ProxyBody {
    /// No body at all: with a response, the HEADERS frame ends the stream (trailers-only).
    pub fn empty() -> ProxyBody {
        ProxyBody::Buffered {
            data: None,
            trailers: None,
        }
    }

    /// A buffered body of `data` then `trailers`.
    pub fn buffered(data: Bytes, trailers: Option<HeaderMap>) -> ProxyBody {
        ProxyBody::Buffered {
            data: (!data.is_empty()).then_some(data),
            trailers,
        }
    }
}

impl Body for ProxyBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        match self.get_mut() {
            ProxyBody::Streaming(incoming) => Pin::new(incoming).poll_frame(cx),
            ProxyBody::Buffered { data, trailers } => {
                if let Some(data) = data.take() {
                    return Poll::Ready(Some(Ok(Frame::data(data))));
                }
                Poll::Ready(trailers.take().map(|t| Ok(Frame::trailers(t))))
            }
            ProxyBody::Prefixed { prefix, rest } => {
                if let Some(prefix) = prefix.take() {
                    return Poll::Ready(Some(Ok(Frame::data(prefix))));
                }
                Pin::new(rest).poll_frame(cx)
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            ProxyBody::Streaming(incoming) => incoming.is_end_stream(),
            ProxyBody::Buffered { data, trailers } => data.is_none() && trailers.is_none(),
            ProxyBody::Prefixed { prefix, rest } => prefix.is_none() && rest.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            ProxyBody::Streaming(incoming) => incoming.size_hint(),
            ProxyBody::Buffered { data, .. } => {
                SizeHint::with_exact(data.as_ref().map_or(0, |d| d.len() as u64))
            }
            ProxyBody::Prefixed { prefix, rest } => {
                let mut hint = rest.size_hint();
                let extra = prefix.as_ref().map_or(0, |p| p.len() as u64);
                hint.set_lower(hint.lower() + extra);
                if let Some(upper) = hint.upper() {
                    hint.set_upper(upper + extra);
                }
                hint
            }
        }
    }
}
