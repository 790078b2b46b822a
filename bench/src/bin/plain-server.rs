//! The baseline for the hit-path benchmark: the least a hyper 1 server can do to answer
//! with a fixed body (same runtime, same connection builder as the gateway). It also
//! serves as the upstream the gateway renders the benchmark fragment from.
//!
//! `plain-server ADDR [BODY_BYTES]` (default 2048 bytes).

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
    let body = Bytes::from("x".repeat(size));
    let listener = TcpListener::bind(&addr).await?;
    eprintln!("plain-server on {addr}, {size}-byte body");
    loop {
        let (stream, _) = listener.accept().await?;
        let _ = stream.set_nodelay(true);
        let body = body.clone();
        tokio::spawn(async move {
            let service = service_fn(move |_req| {
                let body = body.clone();
                async move {
                    let mut r = Response::new(Full::new(body));
                    r.headers_mut().insert(
                        header::CONTENT_TYPE,
                        http::HeaderValue::from_static("text/html; charset=utf-8"),
                    );
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
