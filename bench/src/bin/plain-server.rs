//! The baseline for the hit-path benchmark: the least a hyper 1 server can do to answer
//! with a fixed body (same runtime, same connection builder as the gateway). It also
//! serves as the upstream the gateway renders the benchmark fragment from.
//!
//! `plain-server ADDR [BODY_BYTES] [TAGS]` (default 2048 bytes, no tags). With TAGS > 0,
//! answers to the gateway's workers (`User-Agent: tessera-worker/…`) carry a
//! `Surrogate-Key` of that many tags, so the benchmark fragment is tagged; answers to
//! anyone else (the baseline's wrk) stay as they are.

use std::convert::Infallible;

use bytes::Bytes;
use http::{Response, header};
use http_body_util::Full;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::net::TcpListener;

#[tokio::main]
async fn main() -> std::io::Result<()> {
    let mut args = std::env::args().skip(1);
    let addr = args.next().unwrap_or_else(|| "127.0.0.1:18081".into());
    let size: usize = args.next().and_then(|s| s.parse().ok()).unwrap_or(2048);
    let tags: usize = args.next().and_then(|s| s.parse().ok()).unwrap_or(0);
    let body = Bytes::from("x".repeat(size));
    let surrogate_key = (tags > 0).then(|| {
        let names: Vec<String> = (0..tags).map(|i| format!("bench-tag-{i}")).collect();
        http::HeaderValue::from_str(&names.join(" ")).unwrap_or(http::HeaderValue::from_static(""))
    });
    let listener = TcpListener::bind(&addr).await?;
    eprintln!("plain-server on {addr}, {size}-byte body, {tags} tags for the worker");
    loop {
        let (stream, _) = listener.accept().await?;
        let _ = stream.set_nodelay(true);
        let (body, surrogate_key) = (body.clone(), surrogate_key.clone());
        tokio::spawn(async move {
            let service = service_fn(move |req: http::Request<hyper::body::Incoming>| {
                let body = body.clone();
                let to_worker = req
                    .headers()
                    .get(header::USER_AGENT)
                    .is_some_and(|ua| ua.as_bytes().starts_with(b"tessera-worker"));
                let tags = surrogate_key.clone().filter(|_| to_worker);
                async move {
                    let mut r = Response::new(Full::new(body));
                    r.headers_mut().insert(
                        header::CONTENT_TYPE,
                        http::HeaderValue::from_static("text/html; charset=utf-8"),
                    );
                    if let Some(tags) = tags {
                        r.headers_mut().insert("surrogate-key", tags);
                    }
                    Ok::<_, Infallible>(r)
                }
            });
            let mut builder = auto::Builder::new(TokioExecutor::new());
            builder.http1().timer(TokioTimer::new());
            let _ = builder
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}
