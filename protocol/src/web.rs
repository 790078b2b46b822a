//! The HTTP pieces the gateway and `tessera-worker` share: the accept loop, the response
//! body type, problem responses, and the admin surface both expose (token check,
//! readiness, backend metrics).
//!
//! The accept loop serves HTTP/1.1 and h2c on one port, bounded, with a header-read
//! timeout and graceful shutdown under a deadline.

use std::convert::Infallible;
use std::fmt::Write;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Empty, Full, combinators::BoxBody};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;

use crate::Backends;

/// Errors a body stream can end with.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The body of every response: bytes in hand (fragments, problems, placeholders) or a
/// stream (proxied responses).
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

/// Most connections served at once; further clients wait in the listen backlog.
pub const MAX_CONNECTIONS: usize = 10_000;
/// A client must send its request headers within this (slow-loris guard).
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// How long shutdown waits for in-flight requests before closing their connections.
pub const DRAIN_DEADLINE: Duration = Duration::from_secs(10);
/// Deadline for each readiness check.
pub const READY_TIMEOUT: Duration = Duration::from_secs(2);

/// Serves `listener` with `handler` until `shutdown` resolves, then drains (bounded by
/// [`DRAIN_DEADLINE`]).
pub async fn serve<H, F>(listener: TcpListener, handler: H, shutdown: impl Future<Output = ()>)
where
    H: Fn(Request<Incoming>, SocketAddr) -> F + Clone + Send + Sync + 'static,
    F: Future<Output = Response<Body>> + Send + 'static,
{
    let graceful = GracefulShutdown::new();
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    tokio::pin!(shutdown);
    loop {
        let accepted = tokio::select! {
            () = &mut shutdown => break,
            accepted = accept(&listener, &slots) => accepted,
        };
        let Some((stream, peer, slot)) = accepted else {
            continue;
        };
        let watcher = graceful.watcher();
        let handler = handler.clone();
        tokio::spawn(async move {
            let _slot = slot;
            let service = service_fn(move |req| {
                let answer = handler(req, peer);
                async move { Ok::<_, Infallible>(answer.await) }
            });
            let mut builder = auto::Builder::new(TokioExecutor::new());
            builder
                .http1()
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_READ_TIMEOUT);
            builder.http2().timer(TokioTimer::new());
            let connection = builder.serve_connection_with_upgrades(TokioIo::new(stream), service);
            if let Err(e) = watcher.watch(connection.into_owned()).await {
                tracing::debug!(%peer, error = %e, "connection ended with an error");
            }
        });
    }
    drop(listener);
    if tokio::time::timeout(DRAIN_DEADLINE, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!("connections still open after {DRAIN_DEADLINE:?}; closing them");
    }
}

async fn accept(
    listener: &TcpListener,
    slots: &Arc<Semaphore>,
) -> Option<(
    tokio::net::TcpStream,
    SocketAddr,
    tokio::sync::OwnedSemaphorePermit,
)> {
    // The semaphore is never closed, so acquiring only fails if it were.
    let slot = slots.clone().acquire_owned().await.ok()?;
    match listener.accept().await {
        Ok((stream, peer)) => {
            let _ = stream.set_nodelay(true);
            Some((stream, peer, slot))
        }
        Err(e) => {
            // Usually EMFILE: back off instead of spinning on the error.
            tracing::warn!(error = %e, "accept failed");
            tokio::time::sleep(Duration::from_millis(50)).await;
            None
        }
    }
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

/// Content type of `/metrics`.
const METRICS_CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Whether `headers` carry the admin `token`: `Authorization: Bearer {token}`, or HTTP
/// Basic with the token as password (how a browser logs in to a dashboard). An empty
/// token admits everyone.
pub fn authorized(headers: &HeaderMap, token: &str) -> bool {
    let token = token.as_bytes();
    if token.is_empty() {
        return true;
    }
    let Some(auth) = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
    else {
        return false;
    };
    let given = if let Some(bearer) = auth.strip_prefix("Bearer ") {
        bearer.trim().as_bytes().to_vec()
    } else if let Some(basic) = auth.strip_prefix("Basic ") {
        use base64::Engine;
        let decoded = base64::engine::general_purpose::STANDARD
            .decode(basic.trim())
            .unwrap_or_default();
        // `user:password`; the user name is not checked.
        match decoded.iter().position(|b| *b == b':') {
            Some(colon) => decoded[colon + 1..].to_vec(),
            None => return false,
        }
    } else {
        return false;
    };
    constant_time_eq(&given, token)
}

/// The 401 for a request without the admin token named by `key`.
pub fn unauthorized(key: &str) -> Response<Body> {
    let mut r = problem(
        StatusCode::UNAUTHORIZED,
        "unauthorized",
        &format!("this admin endpoint needs `Authorization: Bearer <{key}>`"),
    );
    r.headers_mut().insert(
        header::WWW_AUTHENTICATE,
        HeaderValue::from_static(r#"Bearer, Basic realm="tessera admin""#),
    );
    r
}

/// Compares without leaking where the first difference is.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// `("ok" | why, "ok" | why)` for the store and the bus, each bounded by
/// [`READY_TIMEOUT`].
pub async fn readiness(backends: &Backends) -> (String, String) {
    let (store, bus) = tokio::join!(
        tokio::time::timeout(READY_TIMEOUT, backends.store.ping()),
        tokio::time::timeout(READY_TIMEOUT, backends.bus.ping()),
    );
    let verdict = |r: Result<Result<(), String>, tokio::time::error::Elapsed>| match r {
        Ok(Ok(())) => "ok".to_string(),
        Ok(Err(e)) => e,
        Err(_) => format!("no answer within {READY_TIMEOUT:?}"),
    };
    (
        verdict(store.map(|r| r.map_err(|e| e.to_string()))),
        verdict(bus.map(|r| r.map_err(|e| e.to_string()))),
    )
}

/// `/readyz`: 200 when the store and the bus answer, else 503 naming which does not.
pub async fn ready(backends: &Backends) -> Response<Body> {
    let (store, bus) = readiness(backends).await;
    let status = if store == "ok" && bus == "ok" {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    json(status, &serde_json::json!({ "store": store, "bus": bus }))
}

/// `/healthz`: the process answers.
pub fn alive() -> Response<Body> {
    text(StatusCode::OK, "text/plain; charset=utf-8", "ok\n")
}

/// `/metrics`: `registry`, then `extra` (already in text format), then the backends'
/// reconnect counters.
pub fn metrics(registry: &Registry, extra: &str, backends: &Backends) -> Response<Body> {
    let mut out = String::new();
    if prometheus_client::encoding::text::encode_registry(&mut out, registry).is_err() {
        out.clear();
    }
    out.push_str(extra);
    out.push_str(&backend_metrics(backends));
    out.push_str("# EOF\n");
    text(StatusCode::OK, METRICS_CONTENT_TYPE, out)
}

/// Reconnect counters of the backends, in Prometheus text format.
fn backend_metrics(backends: &Backends) -> String {
    let mut out = String::new();
    for (name, help, value) in [
        (
            "tessera_store_reconnects",
            "Store connection resets after connection failures",
            backends.store.reconnects(),
        ),
        (
            "tessera_bus_reconnects",
            "Broker connections re-established after a lost one",
            backends.bus.reconnects(),
        ),
    ] {
        let _ = write!(
            out,
            "# HELP {name} {help}.\n# TYPE {name} counter\n{name}_total {value}\n"
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_comparison() {
        assert!(constant_time_eq(b"secret", b"secret"));
        assert!(!constant_time_eq(b"secret", b"secreT"));
        assert!(!constant_time_eq(b"secret", b"secret2"));
        assert!(!constant_time_eq(b"", b"x"));
    }

    #[test]
    fn bearer_and_basic_tokens() {
        let with = |v: &str| {
            let mut h = HeaderMap::new();
            h.insert(header::AUTHORIZATION, HeaderValue::from_str(v).unwrap());
            h
        };
        assert!(authorized(&HeaderMap::new(), ""));
        assert!(!authorized(&HeaderMap::new(), "s3cret"));
        assert!(authorized(&with("Bearer s3cret"), "s3cret"));
        assert!(!authorized(&with("Bearer s3cre"), "s3cret"));
        // "admin:s3cret"
        assert!(authorized(&with("Basic YWRtaW46czNjcmV0"), "s3cret"));
        // "admin:nope"
        assert!(!authorized(&with("Basic YWRtaW46bm9wZQ=="), "s3cret"));
        assert!(!authorized(&with("Token s3cret"), "s3cret"));
    }
}
