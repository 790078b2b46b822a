//! What every answer is made of: the [`Body`] type (bytes in hand or a stream), its
//! constructors, and the plain uncacheable answers built on it (RFC 9457 problems, text,
//! JSON).

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::{HeaderValue, Response, StatusCode, header};
use http_body_util::{BodyExt, Full, combinators::BoxBody};
use hyper::body::{Frame, SizeHint};

/// Errors a body stream can end with.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The body of every response: bytes in hand (fragments, problems, placeholders), or a
/// stream (proxied responses). Bytes in hand are not boxed: a cached hit allocates none.
#[derive(Debug)]
pub enum Body {
    /// Bytes in hand.
    Full(Full<Bytes>),
    /// A stream.
    Stream(BoxBody<Bytes, BoxError>),
}

impl hyper::body::Body for Body {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match self.get_mut() {
            Body::Full(full) => Pin::new(full)
                .poll_frame(cx)
                .map_err(|never| match never {}),
            Body::Stream(stream) => Pin::new(stream).poll_frame(cx),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            Body::Full(full) => full.is_end_stream(),
            Body::Stream(stream) => stream.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            Body::Full(full) => full.size_hint(),
            Body::Stream(stream) => stream.size_hint(),
        }
    }
}

/// A body of bytes in hand.
pub fn full(bytes: impl Into<Bytes>) -> Body {
    Body::Full(Full::new(bytes.into()))
}

/// An empty body (304, HEAD).
pub fn empty() -> Body {
    full(Bytes::new())
}

/// A streamed body.
pub fn stream<B>(body: B) -> Body
where
    B: hyper::body::Body<Data = Bytes> + Send + Sync + 'static,
    B::Error: Into<BoxError>,
{
    Body::Stream(body.map_err(Into::into).boxed())
}

/// An RFC 9457 problem response. `code` is a stable machine-readable name.
pub fn problem(status: StatusCode, code: &str, detail: &str) -> Response<Body> {
    let body = serde_json::json!({
        "type": "about:blank",
        "title": status.canonical_reason().unwrap_or("Error"),
        "status": status.as_u16(),
        "detail": detail,
        "code": code,
    });
    text(status, "application/problem+json", body.to_string())
}

/// An uncacheable response of `content_type`.
pub fn text(
    status: StatusCode,
    content_type: &'static str,
    body: impl Into<Bytes>,
) -> Response<Body> {
    let mut r = Response::new(full(body));
    *r.status_mut() = status;
    r.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    r.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    r
}

/// An uncacheable JSON response.
pub fn json(status: StatusCode, value: &serde_json::Value) -> Response<Body> {
    text(status, "application/json", value.to_string())
}
