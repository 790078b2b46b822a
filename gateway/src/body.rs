//! The response body type shared by every handler: either bytes we have in hand
//! (fragments, problems, placeholders) or a stream (proxied responses).

use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Full, combinators::BoxBody};

/// Errors a body stream can end with.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The body of every gateway response.
pub type Body = BoxBody<Bytes, BoxError>;

/// A body of bytes in hand.
pub fn full(bytes: impl Into<Bytes>) -> Body {
    Full::new(bytes.into())
        .map_err(|never| match never {})
        .boxed()
}

/// An empty body (304, HEAD).
pub fn empty() -> Body {
    Empty::new().map_err(|never| match never {}).boxed()
}
