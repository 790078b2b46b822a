//! `tessera-gateway --demo`: a small bundled upstream with deliberately slow fragments
//! and a page that includes them, so the worker pattern can be seen without an app.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode, header};
use http_body_util::Full;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tessera_protocol::config::Config;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// `(route, render time)` of the demo fragments.
const FRAGMENTS: [(&str, u64); 4] = [
    ("weather", 300),
    ("greeting", 700),
    ("recommendations", 1200),
    ("news", 2000),
];

/// The demo's fragment routes, as TOML (also what `deploy/local/cluster.sh` configures).
pub const ROUTES_TOML: &str = include_str!("../assets/demo.toml");

/// Rewrites `config` for the demo: fragment routes served by the upstream at `upstream`.
pub fn configure(config: &mut Config, upstream: SocketAddr) {
    // A socket address always makes a valid `http://host:port`.
    if let Ok(url) = format!("http://{upstream}").parse() {
        config.upstream.url = url;
    }
    // A test (`demo_routes_parse`) proves the bundled file is valid.
    config.fragments = Config::from_toml(ROUTES_TOML)
        .map(|demo| demo.fragments)
        .unwrap_or_default();
}

/// Serves the demo upstream on `listener` until `stop` is cancelled.
pub fn start(listener: TcpListener, stop: CancellationToken) -> std::io::Result<SocketAddr> {
    let addr = listener.local_addr()?;
    tokio::spawn(async move {
        loop {
            let (stream, _) = tokio::select! {
                () = stop.cancelled() => return,
                accepted = listener.accept() => match accepted {
                    Ok(a) => a,
                    Err(_) => continue,
                },
            };
            tokio::spawn(async move {
                let mut builder = auto::Builder::new(TokioExecutor::new());
                builder.http1().timer(TokioTimer::new());
                let _ = builder
                    .serve_connection(TokioIo::new(stream), service_fn(answer))
                    .await;
            });
        }
    });
    Ok(addr)
}

async fn answer(req: Request<hyper::body::Incoming>) -> Result<Response<Full<Bytes>>, Infallible> {
    let path = req.uri().path();
    if path == "/" {
        let mut page = html(StatusCode::OK, PAGE.to_string());
        // Ask the gateway to compose the page from cached fragments.
        page.headers_mut().insert(
            "surrogate-control",
            http::HeaderValue::from_static("content=\"ESI/1.0\""),
        );
        return Ok(page);
    }
    let Some((name, delay)) = path
        .strip_prefix("/_render/")
        .and_then(|n| FRAGMENTS.iter().find(|(f, _)| *f == n))
    else {
        return Ok(html(StatusCode::NOT_FOUND, "<h1>Not found</h1>".into()));
    };
    tokio::time::sleep(Duration::from_millis(*delay)).await;
    let query = req.uri().query().unwrap_or("");
    let who =
        tessera_protocol::key::cookie(req.headers(), "name").unwrap_or_else(|| "stranger".into());
    let body = fragment(name, *delay, query, &who, tessera_protocol::time::now_ms());
    Ok(html(StatusCode::OK, body))
}

/// The HTML of the fragment `name`, rendered in `delay` ms and finished at `now_ms`.
fn fragment(name: &str, delay: u64, query: &str, who: &str, now_ms: u64) -> String {
    let body = match name {
        "weather" => "<p>☀️ 21 °C, light breeze.</p>".to_string(),
        "greeting" => format!("<p>Hello, {}!</p>", escape(who)),
        "recommendations" => format!(
            "<ul><li>Rust in Action</li><li>Designing Data-Intensive Applications</li></ul><small>for {}</small>",
            escape(query)
        ),
        _ => "<ol><li>Fragment caches are back</li><li>Workers scale out</li></ol>".to_string(),
    };
    format!(
        "{body}<small> rendered in {delay} ms, built at {}</small>",
        clock(now_ms)
    )
}

/// A Unix time in ms as a time of day, `19:04:05 UTC`.
fn clock(unix_ms: u64) -> String {
    let day_secs = unix_ms / 1000 % 86_400;
    format!(
        "{:02}:{:02}:{:02} UTC",
        day_secs / 3600,
        day_secs / 60 % 60,
        day_secs % 60
    )
}

/// What `--demo` prints once the gateway listens on `page`, its admin listener on `admin`:
/// the page to open and the dashboard.
pub fn banner(page: SocketAddr, admin: SocketAddr) -> String {
    let dashboard = if admin.port() == 0 {
        "the admin address in the `gateway listening` log line".to_string()
    } else {
        format!("http://{}/", reachable(admin))
    };
    format!(
        "Tessera demo\n  page:      http://{}/\n  dashboard: {dashboard}\n",
        reachable(page)
    )
}

/// `addr` as a browser on this machine reaches it: a wildcard address as loopback.
fn reachable(mut addr: SocketAddr) -> SocketAddr {
    if addr.ip().is_unspecified() {
        addr.set_ip(match addr {
            SocketAddr::V4(_) => std::net::Ipv4Addr::LOCALHOST.into(),
            SocketAddr::V6(_) => std::net::Ipv6Addr::LOCALHOST.into(),
        });
    }
    addr
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

fn html(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        http::HeaderValue::from_static("text/html; charset=utf-8"),
    );
    r
}

const PAGE: &str = r#"<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>Tessera demo</title>
<style>body{font:16px/1.5 system-ui,sans-serif;max-width:44rem;margin:2rem auto}
section{border:1px solid #ccc;border-radius:6px;padding:.5rem 1rem;margin:1rem 0}
.tessera-loading{color:#888}</style></head>
<body><h1>Tessera demo</h1>
<p>This page came back at once. Each box below is a fragment that takes 0.3–2 s to render:
the gateway composed the page from its cache, left a placeholder for every fragment not
built yet, queued one build for each, and the client script fills them in the moment they
are built. Reload: the page arrives whole, straight from the cache.</p>
<esi:remove><p><strong>Not composed:</strong> open this page through the Tessera gateway.</p></esi:remove>
<section><h2>Weather</h2><esi:include src="/fragments/weather"/></section>
<section><h2>Greeting</h2><esi:include src="/fragments/greeting" onerror="continue"/></section>
<section><h2>Recommendations</h2><esi:include src="/fragments/recommendations?user=42"/></section>
<section><h2>News</h2><esi:include src="/fragments/news"/></section>
<script>if (!document.cookie.includes("name=")) document.cookie = "name=demo visitor; path=/";</script>
</body></html>
"#;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn demo_routes_parse_and_match_the_upstream() {
        let mut config = Config::default();
        configure(&mut config, "127.0.0.1:3000".parse().unwrap());
        let names: Vec<&str> = config.fragments.iter().map(|r| r.name.as_str()).collect();
        let served: Vec<&str> = FRAGMENTS.iter().map(|(n, _)| *n).collect();
        assert_eq!(names, served);
        for route in &config.fragments {
            assert_eq!(route.render, format!("/_render/{}", route.name));
        }
        assert_eq!(config.upstream.url.as_str(), "http://127.0.0.1:3000");
    }

    #[test]
    fn fragments_say_when_they_were_built_as_a_time_of_day() {
        // 2026-12-07 19:04:05.678 UTC
        let at = 1_796_670_245_678;
        assert_eq!(clock(at), "19:04:05 UTC");
        assert_eq!(clock(0), "00:00:00 UTC");
        assert_eq!(clock(86_399_999), "23:59:59 UTC");
        let html = fragment("weather", 300, "", "x", at);
        assert!(
            html.ends_with("<small> rendered in 300 ms, built at 19:04:05 UTC</small>"),
            "{html}"
        );
        let html = fragment("greeting", 700, "", "<b>", at);
        assert!(html.contains("Hello, &lt;b&gt;!"), "{html}");
    }

    #[test]
    fn the_banner_names_the_page_and_the_dashboard() {
        let text = banner(
            "127.0.0.1:8080".parse().unwrap(),
            "127.0.0.1:9090".parse().unwrap(),
        );
        assert_eq!(
            text,
            "Tessera demo\n  page:      http://127.0.0.1:8080/\n  dashboard: http://127.0.0.1:9090/\n"
        );
        let text = banner(
            "0.0.0.0:8080".parse().unwrap(),
            "[::]:9090".parse().unwrap(),
        );
        assert!(text.contains("http://127.0.0.1:8080/"), "{text}");
        assert!(text.contains("http://[::1]:9090/"), "{text}");
        let text = banner(
            "127.0.0.1:8080".parse().unwrap(),
            "127.0.0.1:0".parse().unwrap(),
        );
        assert!(text.contains("log line"), "{text}");
    }
}
