//! The upstream of the soak and memory benchmarks: it renders fragments and ESI pages and
//! remembers every render, so a benchmark can tell a lost build (requested, never rendered)
//! from a doubled one (rendered twice).
//!
//! `soak-upstream ADDR [RENDER_MS] [BODY_BYTES]` (defaults 20 ms, 2048 bytes):
//! - `GET /_render/{route}?{query}`: waits RENDER_MS, answers a BODY_BYTES fragment
//!   (`<p>{route}?{query} rendered {MS}</p>` and padding) and records the render under
//!   `{route}?{query}` with the time it was asked for (Unix ms, the MS of the body);
//! - `GET /page/{n}`: an ESI page including `/fragments/esi?id={n}` and
//!   `/fragments/hot?id={n % 50}` (`Surrogate-Control: content="ESI/1.0"`);
//! - `GET /_renders`: one line per key, `KEY<TAB>COUNT<TAB>MS,MS,…` (Unix ms);
//! - `GET /_peak`: one line per route, `ROUTE<TAB>PEAK`, the most renders of it answered
//!   at once since the last `/_peak` (which starts the count afresh);
//! - anything else: a short 200.
//!
//! With `SOAK_TAGS=1` in its environment, each render is tagged with its route's name
//! (`Surrogate-Key: {route}`), for tag purges.

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http::{Request, Response, header};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::net::TcpListener;

/// Render times (Unix ms) by `{route}?{query}`.
type Renders = Arc<Mutex<HashMap<String, Vec<u64>>>>;

/// Renders answered now and the most at once, by route.
type Busy = Arc<Mutex<HashMap<String, (usize, usize)>>>;

#[derive(Debug, Clone)]
struct Upstream {
    render: Duration,
    size: usize,
    renders: Renders,
    busy: Busy,
    tags: bool,
}

/// One render being answered, counted in [`Busy`] until dropped (also when its client
/// leaves mid-render).
#[derive(Debug)]
struct Rendering(Busy, String);

impl Rendering {
    fn start(busy: &Busy, route: &str) -> Rendering {
        let mut all = busy
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let (now, peak) = all.entry(route.to_string()).or_default();
        *now += 1;
        *peak = (*peak).max(*now);
        Rendering(busy.clone(), route.to_string())
    }
}

impl Drop for Rendering {
    fn drop(&mut self) {
        let mut all = self
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some((now, _)) = all.get_mut(&self.1) {
            *now -= 1;
        }
    }
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

fn html(body: String) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        http::HeaderValue::from_static("text/html; charset=utf-8"),
    );
    r
}

impl Upstream {
    async fn answer(&self, req: Request<Incoming>) -> Response<Full<Bytes>> {
        let path = req.uri().path();
        if let Some(route) = path.strip_prefix("/_render/") {
            let key = format!("{route}?{}", req.uri().query().unwrap_or(""));
            let at = now_ms();
            self.renders
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .entry(key.clone())
                .or_default()
                .push(at);
            let rendering = Rendering::start(&self.busy, route);
            tokio::time::sleep(self.render).await;
            drop(rendering);
            let mut body = format!("<p>{key} rendered {at}</p>");
            body.extend(std::iter::repeat_n(
                'x',
                self.size.saturating_sub(body.len()),
            ));
            let mut r = html(body);
            if self.tags
                && let Ok(tag) = http::HeaderValue::from_str(route)
            {
                r.headers_mut().insert("surrogate-key", tag);
            }
            return r;
        }
        if let Some(n) = path.strip_prefix("/page/") {
            let n: u64 = n.parse().unwrap_or(0);
            let mut r = html(format!(
                "<html><body><h1>page {n}</h1>\
                 <esi:include src=\"/fragments/esi?id={n}\"/>\
                 <esi:include src=\"/fragments/hot?id={}\"/></body></html>",
                n % 50
            ));
            r.headers_mut().insert(
                "surrogate-control",
                http::HeaderValue::from_static("content=\"ESI/1.0\""),
            );
            return r;
        }
        if path == "/_renders" {
            return html(self.report());
        }
        if path == "/_peak" {
            let mut all = self
                .busy
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            let mut out = String::new();
            for (route, (now, peak)) in all.iter_mut() {
                out.push_str(&format!("{route}\t{peak}\n"));
                *peak = *now;
            }
            return html(out);
        }
        html("ok".into())
    }

    fn report(&self) -> String {
        let renders = self
            .renders
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let mut out = String::new();
        for (key, times) in renders.iter() {
            let times: Vec<String> = times.iter().map(u64::to_string).collect();
            out.push_str(&format!("{key}\t{}\t{}\n", times.len(), times.join(",")));
        }
        out
    }
}

#[tokio::main]
async fn main() -> std::io::Result<()> {
    let mut args = std::env::args().skip(1);
    let addr = args.next().unwrap_or_else(|| "127.0.0.1:18091".into());
    let render_ms: u64 = args.next().and_then(|s| s.parse().ok()).unwrap_or(20);
    let size: usize = args.next().and_then(|s| s.parse().ok()).unwrap_or(2048);
    let upstream = Upstream {
        render: Duration::from_millis(render_ms),
        size,
        renders: Renders::default(),
        busy: Busy::default(),
        tags: std::env::var("SOAK_TAGS").is_ok_and(|v| v == "1"),
    };
    let listener = TcpListener::bind(&addr).await?;
    eprintln!("soak-upstream on {addr}, {render_ms} ms renders of {size} bytes");
    loop {
        let (stream, _) = listener.accept().await?;
        let _ = stream.set_nodelay(true);
        let upstream = upstream.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req| {
                let upstream = upstream.clone();
                async move { Ok::<_, Infallible>(upstream.answer(req).await) }
            });
            let mut builder = auto::Builder::new(TokioExecutor::new());
            builder.http1().timer(TokioTimer::new());
            let _ = builder
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}
