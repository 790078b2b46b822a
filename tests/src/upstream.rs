//! A fake upstream web application.
//!
//! Any path answers, by default, `200` with a body that echoes the path, the query and
//! the `Cookie` header, so tests can see exactly what was forwarded (fragment renders live
//! under `/_render/{name}`). Per-path scripts set delays, statuses, headers and bodies.
//! Every request is counted and its headers recorded. Special paths for the proxy tests:
//! - `/echo`: JSON with the method, headers and body length it received;
//! - `/download?bytes=N`: N bytes in 64 KiB chunks, the rest only after
//!   [`FakeUpstream::release_download`] (proves the proxy streams);
//! - `/big?bytes=N`: N bytes in 64 KiB chunks, as fast as they are taken;
//! - `/upload`: counts the body as it arrives ([`FakeUpstream::uploaded`]);
//! - `/ws` with `Upgrade: echo`: 101, then echoes bytes back.

use std::collections::{HashMap, VecDeque};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{HeaderMap, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, StreamBody, combinators::BoxBody};
use hyper::body::Frame;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// Response headers made from a request's query.
pub type HeadersForQuery = fn(&str) -> Vec<(String, String)>;

/// How one render path behaves.
#[derive(Debug, Clone, Default)]
pub struct Script {
    /// Delay before answering, for every call.
    pub delay: Duration,
    /// Delay for the first call only (a build that hangs once).
    pub first_delay: Option<Duration>,
    /// Statuses for the next calls, in order; `200` once used up.
    pub statuses: VecDeque<u16>,
    /// Status once `statuses` is used up (default 200).
    pub then: Option<u16>,
    /// Body bytes to answer with instead of the echo.
    pub body: Option<Bytes>,
    /// Extra response headers.
    pub headers: Vec<(String, String)>,
    /// More response headers, made from each request's query (`""` when it has none).
    pub headers_for_query: Option<HeadersForQuery>,
    /// The echo body ends with ` #N`: the Nth render of this path and query, so a test
    /// can tell a rebuilt fragment from the copy it replaced.
    pub numbered: bool,
}

#[derive(Debug, Default)]
struct State {
    scripts: HashMap<String, Script>,
    renders: HashMap<String, usize>,
    requests: Vec<(String, Option<String>, HeaderMap)>,
    uploaded: u64,
    /// Connections open now.
    open: usize,
    /// Renders being answered now, by path and query.
    rendering: HashMap<(String, Option<String>), usize>,
    /// Renders that started while another of the same path and query was being
    /// answered, by path.
    overlapping: HashMap<String, usize>,
    /// Requests being answered now, by path (any query).
    answering: HashMap<String, usize>,
    /// The most requests answered at once, by path (any query).
    peak: HashMap<String, usize>,
    /// When each request arrived, by path.
    arrivals: HashMap<String, Vec<Instant>>,
}

/// Shared between the server tasks and the test.
#[derive(Debug, Default)]
struct Shared {
    state: Mutex<State>,
    release: tokio::sync::Notify,
}

/// A running fake upstream; stops when dropped.
#[derive(Debug)]
pub struct FakeUpstream {
    /// Where it listens.
    pub addr: SocketAddr,
    shared: Arc<Shared>,
    stop: CancellationToken,
}

impl FakeUpstream {
    /// Starts one on a free port.
    pub async fn start() -> FakeUpstream {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let shared = Arc::new(Shared::default());
        let stop = CancellationToken::new();
        let (s, st) = (shared.clone(), stop.clone());
        tokio::spawn(async move {
            loop {
                let stream = tokio::select! {
                    () = st.cancelled() => return,
                    a = listener.accept() => match a { Ok((stream, _)) => stream, Err(_) => continue },
                };
                let s = s.clone();
                s.state.lock().unwrap().open += 1;
                tokio::spawn(async move {
                    let shared = s.clone();
                    let service = service_fn(move |req| answer(s.clone(), req));
                    let mut builder = auto::Builder::new(TokioExecutor::new());
                    builder.http1().timer(TokioTimer::new());
                    let _ = builder
                        .serve_connection_with_upgrades(TokioIo::new(stream), service)
                        .await;
                    shared.state.lock().unwrap().open -= 1;
                });
            }
        });
        FakeUpstream { addr, shared, stop }
    }

    /// Base URL, for `upstream.url`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// A test route `name` (see [`crate::harness::route`]) whose render answers `html`
    /// after `ms` milliseconds.
    pub fn render(&self, name: &str, ms: u64, html: &str) -> tessera_protocol::FragmentRoute {
        self.script(
            &format!("/_render/{name}"),
            Script {
                delay: Duration::from_millis(ms),
                body: Some(html.to_string().into()),
                ..Script::default()
            },
        );
        crate::harness::route(name)
    }

    /// Sets how `path` behaves.
    pub fn script(&self, path: &str, script: Script) {
        self.shared
            .state
            .lock()
            .unwrap()
            .scripts
            .insert(path.to_string(), script);
    }

    /// Renders of `path` so far (requests that reached it, whatever they answered).
    pub fn renders(&self, path: &str) -> usize {
        self.shared
            .state
            .lock()
            .unwrap()
            .renders
            .get(path)
            .copied()
            .unwrap_or(0)
    }

    /// Renders of `path` that started while another of the same path and query was
    /// being answered: one fragment built twice at once.
    pub fn overlapping(&self, path: &str) -> usize {
        self.shared
            .state
            .lock()
            .unwrap()
            .overlapping
            .get(path)
            .copied()
            .unwrap_or(0)
    }

    /// The most requests to `path` (with any query) that were answered at once.
    pub fn peak(&self, path: &str) -> usize {
        let state = self.shared.state.lock().unwrap();
        state.peak.get(path).copied().unwrap_or(0)
    }

    /// When each request to `path` arrived, in order.
    pub fn arrivals(&self, path: &str) -> Vec<Instant> {
        let state = self.shared.state.lock().unwrap();
        state.arrivals.get(path).cloned().unwrap_or_default()
    }

    /// Lets a `/download` send the rest of its body.
    pub fn release_download(&self) {
        self.shared.release.notify_waiters();
    }

    /// Connections open to it now (the gateway's pooled and busy ones).
    pub fn open_connections(&self) -> usize {
        self.shared.state.lock().unwrap().open
    }

    /// Body bytes `/upload` has received so far.
    pub fn uploaded(&self) -> u64 {
        self.shared.state.lock().unwrap().uploaded
    }

    /// The path of every request that reached the application's pages and render paths
    /// (not the proxy test paths), in order.
    pub fn paths(&self) -> Vec<String> {
        let state = self.shared.state.lock().unwrap();
        state.requests.iter().map(|(p, _, _)| p.clone()).collect()
    }

    /// Every request to `path`: its query and headers.
    pub fn requests(&self, path: &str) -> Vec<(Option<String>, HeaderMap)> {
        self.shared
            .state
            .lock()
            .unwrap()
            .requests
            .iter()
            .filter(|(p, _, _)| p == path)
            .map(|(_, q, h)| (q.clone(), h.clone()))
            .collect()
    }
}

impl Drop for FakeUpstream {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

type Out = Response<BoxBody<Bytes, std::io::Error>>;

fn respond(status: u16, body: impl Into<Bytes>) -> Out {
    let mut r = Response::new(
        Full::new(body.into())
            .map_err(|never| match never {})
            .boxed(),
    );
    *r.status_mut() = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    r
}

// The fake application's whole routing table in one match: long by nature.
#[allow(clippy::too_many_lines)]
async fn answer(
    shared: Arc<Shared>,
    mut req: Request<hyper::body::Incoming>,
) -> Result<Out, Infallible> {
    let path = req.uri().path().to_string();
    let query = req.uri().query().map(String::from);
    match path.as_str() {
        "/echo" => {
            let method = req.method().to_string();
            let version = format!("{:?}", req.version());
            let headers: serde_json::Map<String, serde_json::Value> = req
                .headers()
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_str().unwrap_or("?").into()))
                .collect();
            let len = req
                .into_body()
                .collect()
                .await
                .map(|b| b.to_bytes().len())
                .unwrap_or(0);
            let json = serde_json::json!({ "method": method, "version": version, "headers": headers, "body_len": len });
            let mut r = respond(200, json.to_string());
            r.headers_mut()
                .insert("x-hop", http::HeaderValue::from_static("secret"));
            r.headers_mut()
                .insert("connection", http::HeaderValue::from_static("x-hop"));
            r.headers_mut()
                .insert("keep-alive", http::HeaderValue::from_static("timeout=5"));
            return Ok(r);
        }
        "/upload" => {
            let mut body = req.into_body();
            while let Some(Ok(frame)) = body.frame().await {
                if let Some(data) = frame.data_ref() {
                    shared.state.lock().unwrap().uploaded += data.len() as u64;
                }
            }
            let total = shared.state.lock().unwrap().uploaded;
            return Ok(respond(200, total.to_string()));
        }
        "/big" => {
            let bytes: usize = query
                .as_deref()
                .and_then(|q| q.strip_prefix("bytes="))
                .and_then(|n| n.parse().ok())
                .unwrap_or(0);
            let chunk = Bytes::from(vec![b'x'; 64 * 1024]);
            let chunks = (0..bytes.div_ceil(chunk.len())).map(move |i| {
                let n = chunk.len().min(bytes - i * chunk.len());
                Ok::<_, std::io::Error>(Frame::data(chunk.slice(..n)))
            });
            let body = StreamBody::new(futures_util::stream::iter(chunks));
            let mut r = Response::new(BodyExt::boxed(body));
            r.headers_mut().insert("content-length", bytes.into());
            return Ok(r);
        }
        "/download" => {
            let bytes: usize = query
                .as_deref()
                .and_then(|q| q.strip_prefix("bytes="))
                .and_then(|n| n.parse().ok())
                .unwrap_or(0);
            let (tx, rx) = tokio::sync::mpsc::channel::<Result<Frame<Bytes>, std::io::Error>>(4);
            let shared = shared.clone();
            tokio::spawn(async move {
                let chunk = Bytes::from(vec![b'x'; 64 * 1024]);
                let mut sent = 0;
                let released = shared.release.notified();
                tokio::pin!(released);
                released.as_mut().enable();
                while sent < bytes {
                    let n = chunk.len().min(bytes - sent);
                    if tx.send(Ok(Frame::data(chunk.slice(..n)))).await.is_err() {
                        return;
                    }
                    if sent == 0 {
                        // Hold the rest until the test saw the first bytes arrive.
                        released.as_mut().await;
                    }
                    sent += n;
                }
            });
            let body = StreamBody::new(tokio_stream_from(rx));
            let mut r = Response::new(BodyExt::boxed(body));
            r.headers_mut().insert("content-length", bytes.into());
            return Ok(r);
        }
        "/ws" => {
            if req.headers().get("upgrade").and_then(|v| v.to_str().ok()) != Some("echo") {
                return Ok(respond(400, "expected Upgrade: echo"));
            }
            let upgrade = hyper::upgrade::on(&mut req);
            tokio::spawn(async move {
                if let Ok(upgraded) = upgrade.await {
                    let (mut r, mut w) = tokio::io::split(TokioIo::new(upgraded));
                    let _ = tokio::io::copy(&mut r, &mut w).await;
                }
            });
            let mut r = respond(101, Bytes::new());
            r.headers_mut()
                .insert("upgrade", http::HeaderValue::from_static("echo"));
            r.headers_mut()
                .insert("connection", http::HeaderValue::from_static("upgrade"));
            return Ok(r);
        }
        _ => {}
    }
    let (delay, status, body, headers, numbered) = {
        let mut guard = shared.state.lock().unwrap();
        let st = &mut *guard;
        let n = st.renders.entry(path.clone()).or_default();
        *n += 1;
        let first = *n == 1;
        st.requests
            .push((path.clone(), query.clone(), req.headers().clone()));
        st.arrivals
            .entry(path.clone())
            .or_default()
            .push(Instant::now());
        let answering = st.answering.entry(path.clone()).or_default();
        *answering += 1;
        let now = *answering;
        let peak = st.peak.entry(path.clone()).or_default();
        *peak = (*peak).max(now);
        let rendering = st
            .rendering
            .entry((path.clone(), query.clone()))
            .or_default();
        *rendering += 1;
        if *rendering > 1 {
            *st.overlapping.entry(path.clone()).or_default() += 1;
        }
        let script = st.scripts.entry(path.clone()).or_default();
        let delay = match script.first_delay {
            Some(d) if first => d,
            _ => script.delay,
        };
        let status = script.statuses.pop_front().or(script.then).unwrap_or(200);
        let numbered = script.numbered.then(|| {
            st.requests
                .iter()
                .filter(|(p, q, _)| *p == path && *q == query)
                .count()
        });
        let mut headers = script.headers.clone();
        if let Some(more) = script.headers_for_query {
            headers.extend(more(query.as_deref().unwrap_or("")));
        }
        (delay, status, script.body.clone(), headers, numbered)
    };
    tokio::time::sleep(delay).await;
    {
        let mut state = shared.state.lock().unwrap();
        if let Some(n) = state.rendering.get_mut(&(path.clone(), query.clone())) {
            *n -= 1;
        }
        if let Some(n) = state.answering.get_mut(&path) {
            *n -= 1;
        }
    }
    let body = body.unwrap_or_else(|| {
        let cookie = req
            .headers()
            .get(http::header::COOKIE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("");
        let n = numbered.map(|n| format!(" #{n}")).unwrap_or_default();
        Bytes::from(format!(
            "<p>{path}?{} cookie=[{cookie}]</p>{n}",
            query.as_deref().unwrap_or("")
        ))
    });
    let mut r = respond(status, body);
    r.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("text/html; charset=utf-8"),
    );
    for (k, v) in headers {
        r.headers_mut().insert(
            http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
            http::HeaderValue::from_str(&v).unwrap(),
        );
    }
    Ok(r)
}

fn tokio_stream_from<T: Send + 'static>(
    mut rx: tokio::sync::mpsc::Receiver<T>,
) -> impl futures_util::Stream<Item = T> + Send + 'static {
    futures_util::stream::poll_fn(move |cx| rx.poll_recv(cx))
}
