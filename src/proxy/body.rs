//! The one body the proxy answers with: the service's answer streamed through untouched, or
//! written from a buffer (a recorded response, a refusal).

use bytes::Bytes;
use h2::RecvStream;
use http::HeaderMap;
use http_body::{Body, Frame, SizeHint};
use std::pin::Pin;
use std::task::{ready, Context, Poll};

/// A response body.
#[derive(Debug)]
pub enum ProxyBody {
    /// Written from memory: one data frame (if any bytes), then the trailers (if any).
    Buffered {
        /// The data not yet written.
        data: Option<Bytes>,
        /// The trailers not yet written.
        trailers: Option<HeaderMap>,
    },
    /// The service's answer as it arrives, after any prefix already read from it; its window
    /// is given back as each frame is passed on, so a slow caller slows the service.
    Upstream {
        /// The bytes read before the decision to stream.
        prefix: Option<Bytes>,
        /// The rest of the service's answer.
        rest: RecvStream,
        /// Its data has ended: the trailers come next.
        data_done: bool,
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

    /// The service's answer streamed on, after `prefix`.
    pub fn upstream(prefix: Option<Bytes>, rest: RecvStream) -> ProxyBody {
        ProxyBody::Upstream {
            prefix: prefix.filter(|prefix| !prefix.is_empty()),
            rest,
            data_done: false,
        }
    }
}

impl Body for ProxyBody {
    type Data = Bytes;
    type Error = h2::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, h2::Error>>> {
        match self.get_mut() {
            ProxyBody::Buffered { data, trailers } => {
                if let Some(data) = data.take() {
                    return Poll::Ready(Some(Ok(Frame::data(data))));
                }
                Poll::Ready(trailers.take().map(|t| Ok(Frame::trailers(t))))
            }
            ProxyBody::Upstream {
                prefix,
                rest,
                data_done,
            } => {
                if let Some(prefix) = prefix.take() {
                    return Poll::Ready(Some(Ok(Frame::data(prefix))));
                }
                if !*data_done {
                    match ready!(rest.poll_data(cx)) {
                        Some(Ok(data)) => {
                            let _ = rest.flow_control().release_capacity(data.len());
                            return Poll::Ready(Some(Ok(Frame::data(data))));
                        }
                        Some(Err(error)) => return Poll::Ready(Some(Err(error))),
                        None => *data_done = true,
                    }
                }
                match ready!(rest.poll_trailers(cx)) {
                    Ok(Some(trailers)) => Poll::Ready(Some(Ok(Frame::trailers(trailers)))),
                    Ok(None) => Poll::Ready(None),
                    Err(error) => Poll::Ready(Some(Err(error))),
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            ProxyBody::Buffered { data, trailers } => data.is_none() && trailers.is_none(),
            ProxyBody::Upstream { prefix, rest, .. } => prefix.is_none() && rest.is_end_stream(),
        }
    }

    /// Never exact: hyper writes an exact size as a `content-length` header the service did
    /// not send, so only the lower bound is told (design §3, replay fidelity).
    fn size_hint(&self) -> SizeHint {
        let known = match self {
            ProxyBody::Buffered { data, .. } => data.as_ref().map_or(0, Bytes::len),
            ProxyBody::Upstream { prefix, .. } => prefix.as_ref().map_or(0, Bytes::len),
        };
        let mut hint = SizeHint::new();
        hint.set_lower(known as u64);
        hint
    }
}
