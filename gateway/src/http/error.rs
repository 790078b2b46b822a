//! The gateway's one error type, and how it becomes a response.
//!
//! Client mistakes become 4xx `application/problem+json` (RFC 9457) with a message that
//! helps fix the request. Internal faults (store, bus, upstream) become a generic 5xx with
//! `Retry-After`; their detail is logged, never shown to the client.

use std::time::Duration;

use http::{HeaderValue, Response, StatusCode, header};
use tessera_protocol::tags::TagError;
use tessera_protocol::{BusError, Cause, StoreError, key::IdentityError};

use tessera_runtime::web::Body;
pub(crate) use tessera_runtime::web::problem;

/// Everything that can go wrong while answering a request.
#[derive(Debug, thiserror::Error)]
pub(crate) enum GatewayError {
    /// No `[[fragment]]` route has this name.
    #[error("no fragment route is called {0:?}")]
    UnknownRoute(String),
    /// A public request for a route's render path (see [`super::render_paths`]).
    #[error("not found")]
    RenderPath,
    /// The request cannot be mapped to a fragment (query too long, bad bytes, …).
    #[error(transparent)]
    BadRequest(#[from] IdentityError),
    /// A purge named something that cannot be a tag.
    #[error("not a valid tag: {0}")]
    BadTag(#[from] TagError),
    /// A purge's option has a value it cannot take (`wait`, `all_of`, `soft`).
    #[error("{0}")]
    BadPurgeOption(String),
    /// The method is not served on this path.
    #[error("method {method} is not allowed here; use {allow}")]
    MethodNotAllowed {
        /// What was asked.
        method: http::Method,
        /// What is allowed, for the `Allow` header.
        allow: &'static str,
    },
    /// The shared store could not be reached and nothing usable is cached.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The broker could not take a build request.
    #[error(transparent)]
    Bus(#[from] BusError),
    /// The last build failed and no copy can be served.
    #[error("the fragment could not be built: {error}")]
    BuildFailed {
        /// What the worker reported (logged, not shown).
        error: String,
        /// When the next build may be attempted.
        retry_after: Duration,
    },
    /// The upstream could not be reached or failed (reverse proxy).
    #[error("upstream: {0}")]
    Upstream(#[source] Cause),
    /// The upstream sent a page in a `Content-Encoding` it does not hold to (corrupt
    /// data): its fault, and the page cannot be composed.
    #[error("upstream page: {0}")]
    UpstreamCoding(#[source] Cause),
    /// The upstream did not answer within `upstream.timeout`.
    #[error("upstream did not answer within {0:?}")]
    UpstreamTimeout(Duration),
}

impl From<crate::cache::CacheError> for GatewayError {
    fn from(e: crate::cache::CacheError) -> Self {
        match e {
            crate::cache::CacheError::Store(e) => GatewayError::Store(e),
            crate::cache::CacheError::Bus(e) => GatewayError::Bus(e),
        }
    }
}

impl GatewayError {
    /// Status, short code and the message shown to the client.
    fn parts(&self) -> (StatusCode, &'static str, String) {
        match self {
            GatewayError::UnknownRoute(_) => {
                (StatusCode::NOT_FOUND, "unknown_route", self.to_string())
            }
            GatewayError::RenderPath => (StatusCode::NOT_FOUND, "not_found", self.to_string()),
            GatewayError::BadRequest(_) => {
                (StatusCode::BAD_REQUEST, "bad_request", self.to_string())
            }
            GatewayError::BadTag(_) => (StatusCode::BAD_REQUEST, "bad_tag", self.to_string()),
            GatewayError::BadPurgeOption(_) => {
                (StatusCode::BAD_REQUEST, "bad_request", self.to_string())
            }
            GatewayError::MethodNotAllowed { .. } => (
                StatusCode::METHOD_NOT_ALLOWED,
                "method_not_allowed",
                self.to_string(),
            ),
            GatewayError::Store(_) | GatewayError::Bus(_) => (
                StatusCode::SERVICE_UNAVAILABLE,
                "unavailable",
                "the fragment cache is temporarily unavailable; retry shortly".into(),
            ),
            GatewayError::BuildFailed { .. } => (
                StatusCode::BAD_GATEWAY,
                "build_failed",
                "the fragment could not be built; retry later".into(),
            ),
            GatewayError::Upstream(_) => (
                StatusCode::BAD_GATEWAY,
                "upstream_unavailable",
                "the upstream application could not be reached".into(),
            ),
            GatewayError::UpstreamCoding(_) => (
                StatusCode::BAD_GATEWAY,
                "upstream_bad_encoding",
                "the upstream's page could not be decoded (its Content-Encoding does not match its bytes)".into(),
            ),
            GatewayError::UpstreamTimeout(_) => (
                StatusCode::GATEWAY_TIMEOUT,
                "upstream_timeout",
                "the upstream application did not answer in time".into(),
            ),
        }
    }

    fn retry_after(&self) -> Option<Duration> {
        match self {
            GatewayError::Store(_) | GatewayError::Bus(_) => Some(Duration::from_secs(2)),
            GatewayError::BuildFailed { retry_after, .. } => Some(*retry_after),
            _ => None,
        }
    }

    /// The problem response. Server-side faults are logged here, with their detail: the
    /// first of each kind (code) per interval, then how many followed (an outage fails
    /// every request the same way; see [`tessera_runtime::throttle`]).
    pub(crate) fn into_response(self) -> Response<Body> {
        let (status, code, detail) = self.parts();
        if status.is_server_error() {
            tessera_runtime::warn_throttled!(
                code,
                error = %self,
                status = status.as_u16(),
                "request failed"
            );
        }
        let mut response = problem(status, code, &detail);
        if let Some(after) = self.retry_after() {
            let secs = tessera_protocol::time::ceil_secs(after).max(1);
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        if let GatewayError::MethodNotAllowed { allow, .. } = self {
            response
                .headers_mut()
                .insert(header::ALLOW, HeaderValue::from_static(allow));
        }
        response
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;

    async fn json(r: Response<Body>) -> serde_json::Value {
        let bytes = r.into_body().collect().await.unwrap().to_bytes();
        serde_json::from_slice(&bytes).unwrap()
    }

    #[tokio::test]
    async fn client_errors_explain_themselves() {
        let r = GatewayError::UnknownRoute("nope".into()).into_response();
        assert_eq!(r.status(), StatusCode::NOT_FOUND);
        assert_eq!(
            r.headers()[header::CONTENT_TYPE],
            "application/problem+json"
        );
        let body = json(r).await;
        assert_eq!(body["status"], 404);
        assert!(body["detail"].as_str().unwrap().contains("nope"));
    }

    #[tokio::test]
    async fn internal_faults_hide_their_detail() {
        let r = GatewayError::Store(StoreError::Unavailable("10.0.0.7:11211 refused".into()))
            .into_response();
        assert_eq!(r.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(r.headers()[header::RETRY_AFTER], "2");
        let body = json(r).await;
        assert!(!body.to_string().contains("10.0.0.7"));
    }

    #[tokio::test]
    async fn failed_builds_say_when_to_retry() {
        let r = GatewayError::BuildFailed {
            error: "upstream 500".into(),
            retry_after: Duration::from_millis(4200),
        }
        .into_response();
        assert_eq!(r.status(), StatusCode::BAD_GATEWAY);
        assert_eq!(r.headers()[header::RETRY_AFTER], "5");
        assert!(!json(r).await.to_string().contains("upstream 500"));
    }
}
