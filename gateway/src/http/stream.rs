//! The push stream: one connection per page for all its placeholders.
//!
//! `GET /_tessera/stream?src=/fragments/a%3Fid%3D1&src=/fragments/b` answers
//! `text/event-stream` (Server-Sent Events). Every fragment named is looked up at once,
//! through the fragment endpoint itself (same lease, same waiting, same `vary` on this
//! request's cookies and headers, counted the same way), so the builds of all of them are
//! queued at once; each is sent the moment it is ready, in the order they become ready:
//!
//! ```text
//! retry: 2000
//!
//! id: 1
//! event: fragment
//! data: {"src":"/fragments/b","status":200,"html":"<p>…</p>"}
//!
//! id: 0
//! event: fragment
//! data: {"src":"/fragments/a?id=1","status":502,"html":""}
//!
//! event: end
//! data: {"pending":[]}
//! ```
//!
//! - `status` is what the fragment endpoint answered: 200 with the fragment, or an error
//!   (4xx, 502) that the client turns into its fallback. `id` is the `src`'s index.
//! - The stream ends after `gateway.max_wait` (or at shutdown) with `end`, listing the
//!   sources still pending; the client asks again for those, on a new stream. A dropped
//!   stream is reopened the same way, for what it has not received: nothing is sent
//!   twice, and nothing is lost.
//! - At most [`MAX_SOURCES`] sources per stream (400 past it: the client splits), and
//!   `gateway.max_streams` streams open at once (503 past it: the client falls back to
//!   long-polls). Open streams are `tessera_streams` in `/metrics`.
//! - Sources that name the same fragment (the same route and allow-listed params, whatever
//!   else their query carries) are looked up once, and their events share its bytes.
//!
//! What a stream holds is bounded, however slowly its client reads: events are made one
//! at a time, as the connection takes them (a channel of one), and a fragment's HTML is
//! escaped into the event's JSON once for every stream sending it (a fragment of more
//! than [`CHUNK`] bytes: [`escaped`]) and handed on in slices of that copy, so what
//! hyper queues for a client that reads nothing (up to `http.max_header_bytes`, its
//! buffer limit) holds no bytes of its own. A client that takes nothing is cut off after
//! `http.send_timeout`.

use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;
use tessera_runtime::otel;

use bytes::Bytes;
use futures_util::StreamExt;
use futures_util::stream::FuturesUnordered;
use http::{HeaderMap, HeaderValue, Method, Request, Response, StatusCode, header};
use http_body_util::BodyExt;
use tokio::sync::mpsc;

use tessera_protocol::Identity;

use super::Front;
use super::error::GatewayError;
use super::fragment;
use tessera_runtime::web::{Body, problem};

/// Path of the push stream.
pub(crate) const STREAM_PATH: &str = "/_tessera/stream";
/// Most fragments one stream carries.
pub(crate) const MAX_SOURCES: usize = 32;
/// Pause before asking again for a fragment the store could not be asked about (503).
const UNAVAILABLE_PAUSE: Duration = Duration::from_secs(1);
/// Most bytes of escaped HTML in one frame of an event.
pub(crate) const CHUNK: usize = 16 * 1024;

/// Serves one push stream.
pub(crate) fn serve<B>(front: &Arc<Front>, req: &Request<B>) -> Response<Body> {
    if req.method() != Method::GET {
        return GatewayError::MethodNotAllowed {
            method: req.method().clone(),
            allow: "GET",
        }
        .into_response();
    }
    let sources = match sources(req.uri().query().unwrap_or("")) {
        Ok(sources) => sources,
        Err(detail) => return problem(StatusCode::BAD_REQUEST, "bad_request", &detail),
    };
    let streams = &front.metrics.streams;
    let open = streams.inc();
    if usize::try_from(open).unwrap_or(usize::MAX) >= front.config.gateway.max_streams {
        streams.dec();
        let mut r = problem(
            StatusCode::SERVICE_UNAVAILABLE,
            "too_many_streams",
            "too many push streams open; poll the fragments instead",
        );
        r.headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from(1));
        return r;
    }
    // One event waits while the connection takes the one before: a stream runs ahead of
    // its client by one event at most.
    let (tx, rx) = mpsc::channel(1);
    let front = front.clone();
    let headers = req.headers().clone();
    let task = async move {
        feed(&front, sources, headers, &tx).await;
        front.metrics.streams.dec();
    };
    if otel::on() {
        // The stream's deliveries join the request's trace.
        tokio::spawn(otel::FutureExt::with_context(
            task,
            otel::Context::current(),
        ));
    } else {
        tokio::spawn(task);
    }
    let mut r = Response::new(tessera_runtime::web::stream(Events { rx, html: None }));
    let h = r.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream; charset=utf-8"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    // Proxies in front (nginx) must pass events on as they come.
    h.insert("x-accel-buffering", HeaderValue::from_static("no"));
    r
}

/// Sends an event for each source as it becomes ready, then `end`; stops early when the
/// client goes away (the channel closes).
async fn feed(front: &Front, sources: Vec<String>, headers: HeaderMap, tx: &mpsc::Sender<Event>) {
    let deadline = tokio::time::Instant::now() + front.config.gateway.max_wait;
    if tx
        .send(Event::Text(Bytes::from_static(b"retry: 2000\n\n")))
        .await
        .is_err()
    {
        return;
    }
    let (wanted, mut answered) = plan(front, &sources, &headers);
    let mut pending: FuturesUnordered<_> = wanted
        .iter()
        .map(|w| {
            let headers = &headers;
            async move {
                let span = otel::Span::child("stream delivery", otel::Kind::Internal, || {
                    vec![otel::KeyValue::new("tessera.src", w.src.clone())]
                });
                let ready = until_ready(front, w, headers, deadline);
                let ready = otel::FutureExt::with_context(ready, span.context()).await;
                span.set(|| otel::KeyValue::new("tessera.delivered", ready.is_some()));
                (w, ready)
            }
        })
        .collect();
    let mut sent = vec![false; sources.len()];
    loop {
        let (indexes, answer) = match answered.pop() {
            Some((i, status)) => (vec![i], Some((status, Bytes::new()))),
            None => tokio::select! {
                () = tx.closed() => return,
                next = pending.next() => match next {
                    Some((w, answer)) => (w.indexes.clone(), answer),
                    None => break,
                },
            },
        };
        // Still pending at the deadline: listed in `end`.
        let Some((status, html)) = answer else {
            continue;
        };
        for i in indexes {
            if tx
                .send(Event::fragment(i, &sources[i], status, html.clone()))
                .await
                .is_err()
            {
                return;
            }
            sent[i] = true;
        }
    }
    let left: Vec<&String> = sources
        .iter()
        .zip(&sent)
        .filter_map(|(src, sent)| (!sent).then_some(src))
        .collect();
    let end = serde_json::json!({ "pending": left });
    let text = Bytes::from(format!("event: end\ndata: {end}\n\n"));
    let _ = tx.send(Event::Text(text)).await;
}

/// One fragment a stream looks up, for every source that names it.
#[derive(Debug)]
struct Wanted {
    /// The fragment's route.
    name: String,
    /// Its canonical `src`: the route's path and allow-listed params.
    src: String,
    /// The sources (indexes into the stream's) that name it.
    indexes: Vec<usize>,
}

/// The fragments `sources` name, each once, and the sources answered without a lookup
/// (404: no fragment route; 400: params the route refuses), with their status.
fn plan(
    front: &Front,
    sources: &[String],
    headers: &HeaderMap,
) -> (Vec<Wanted>, Vec<(usize, u16)>) {
    let prefix = front.config.gateway.fragment_prefix.as_str();
    let mut wanted: Vec<Wanted> = Vec::new();
    let mut answered = Vec::new();
    for (i, src) in sources.iter().enumerate() {
        let (path, query) = src
            .split_once('?')
            .map_or((src.as_str(), None), |(p, q)| (p, Some(q)));
        let Some(route) = path
            .strip_prefix(prefix)
            .and_then(|name| front.config.route(name))
        else {
            answered.push((i, StatusCode::NOT_FOUND.as_u16()));
            continue;
        };
        let Ok(identity) = Identity::from_request(route, query, headers) else {
            answered.push((i, StatusCode::BAD_REQUEST.as_u16()));
            continue;
        };
        let canonical = identity.query_string();
        let src = if canonical.is_empty() {
            format!("{prefix}{}", route.name)
        } else {
            format!("{prefix}{}?{canonical}", route.name)
        };
        match wanted.iter_mut().find(|w| w.src == src) {
            Some(w) => w.indexes.push(i),
            None => wanted.push(Wanted {
                name: route.name.clone(),
                src,
                indexes: vec![i],
            }),
        }
    }
    // Answered in source order (popped from the end).
    answered.reverse();
    (wanted, answered)
}

/// Asks the fragment endpoint for `wanted` with this stream's headers, waiting as a
/// long-poll does, until it answers anything but "pending" or `deadline` passes
/// (`None`). The fragment comes back as the endpoint's body (L1's own bytes for a cached
/// fragment), as UTF-8.
async fn until_ready(
    front: &Front,
    wanted: &Wanted,
    headers: &HeaderMap,
    deadline: tokio::time::Instant,
) -> Option<(u16, Bytes)> {
    loop {
        let now = tokio::time::Instant::now();
        if now >= deadline || front.stopping.is_cancelled() {
            return None;
        }
        let wait = (deadline - now).as_secs().max(1);
        let Ok(req) = fragment_request(&wanted.src, headers, wait) else {
            return Some((StatusCode::BAD_REQUEST.as_u16(), Bytes::new()));
        };
        let response = Box::pin(fragment::serve(front, &req, &wanted.name)).await;
        let status = response.status();
        if status == StatusCode::OK {
            let body = response.into_body().collect().await.ok()?.to_bytes();
            let html = match std::str::from_utf8(&body) {
                Ok(_) => body,
                Err(_) => Bytes::from(String::from_utf8_lossy(&body).into_owned()),
            };
            return Some((status.as_u16(), html));
        }
        if status == StatusCode::SERVICE_UNAVAILABLE {
            tokio::time::sleep(UNAVAILABLE_PAUSE.min(deadline - now)).await;
        } else if status != StatusCode::ACCEPTED {
            return Some((status.as_u16(), Bytes::new()));
        }
    }
}

/// The fragment request a stream makes for `src`: the stream's own headers (its cookies
/// and headers feed `vary`), asking for the plain HTML with a long-poll of `wait` s.
fn fragment_request(src: &str, stream: &HeaderMap, wait: u64) -> Result<Request<()>, http::Error> {
    let mut req = Request::get(src).body(())?;
    let h = req.headers_mut();
    *h = stream.clone();
    for name in [
        header::ACCEPT_ENCODING,
        header::IF_NONE_MATCH,
        header::RANGE,
        header::IF_RANGE,
    ] {
        h.remove(name);
    }
    h.insert(header::ACCEPT, HeaderValue::from_static("text/html"));
    h.insert("prefer", HeaderValue::try_from(format!("wait={wait}"))?);
    Ok(req)
}

/// The `src` values of a stream's query: at least one, at most [`MAX_SOURCES`], each a
/// path (`/…`), repeated ones once.
fn sources(query: &str) -> Result<Vec<String>, String> {
    let mut out: Vec<String> = Vec::new();
    for pair in query.split('&') {
        let Some(value) = pair.strip_prefix("src=") else {
            continue;
        };
        let src = percent_encoding::percent_decode_str(value)
            .decode_utf8()
            .map_err(|_| "a src is not UTF-8".to_string())?;
        if !src.starts_with('/') || src.starts_with("//") {
            return Err(format!("src {src:?} is not a path on this gateway"));
        }
        if !out.iter().any(|s| *s == src) {
            out.push(src.into_owned());
        }
        if out.len() > MAX_SOURCES {
            return Err(format!(
                "a stream carries at most {MAX_SOURCES} fragments; open another for the rest"
            ));
        }
    }
    if out.is_empty() {
        return Err("name the fragments: ?src=/fragments/…&src=…".into());
    }
    Ok(out)
}

/// One event of a stream, as the feeding task hands it to the body.
#[derive(Debug)]
enum Event {
    /// Sent as it is.
    Text(Bytes),
    /// A fragment event: `head`, then `html` escaped as a JSON string's contents, then the
    /// event's end.
    Fragment {
        /// `id: …\nevent: fragment\ndata: {"src":…,"status":…,"html":"`.
        head: Bytes,
        /// The fragment (UTF-8), not yet escaped.
        html: Bytes,
    },
}

/// What closes a fragment event after its HTML.
const FRAGMENT_END: &[u8] = b"\"}\n\n";

impl Event {
    /// The event for source `i`, `src`, answered `status` with `html`.
    fn fragment(i: usize, src: &str, status: u16, html: Bytes) -> Self {
        let src = serde_json::Value::from(src);
        let head = format!(
            "id: {i}\nevent: fragment\ndata: {{\"src\":{src},\"status\":{status},\"html\":\""
        );
        Event::Fragment {
            head: Bytes::from(head),
            html,
        }
    }
}

/// The stream's body: events as the feeding task sends them, a fragment's escaped HTML a
/// [`CHUNK`] at a time as hyper asks for frames; ends when the task is done.
#[derive(Debug)]
struct Events {
    rx: mpsc::Receiver<Event>,
    /// The escaped HTML of the fragment event being sent, and how much of it was.
    html: Option<(Bytes, usize)>,
}

impl hyper::body::Body for Events {
    type Data = Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<hyper::body::Frame<Bytes>, Self::Error>>> {
        let frame = |bytes| Poll::Ready(Some(Ok(hyper::body::Frame::data(bytes))));
        if let Some((escaped, at)) = &mut self.html {
            // Slices of the one escaped copy all streams share: what hyper queues for a
            // client that reads nothing holds no bytes of its own.
            let end = (*at + CHUNK).min(escaped.len());
            let chunk = escaped.slice(*at..end);
            *at = end;
            if end == escaped.len() {
                self.html = None;
            }
            return frame(chunk);
        }
        match std::task::ready!(self.rx.poll_recv(cx)) {
            None => Poll::Ready(None),
            Some(Event::Text(text)) => frame(text),
            Some(Event::Fragment { head, html }) => {
                self.html = Some((escaped(&html), 0));
                frame(head)
            }
        }
    }
}

/// Most bytes of escaped fragments kept for the streams sending them.
const ESCAPED_CAPACITY: u64 = 64 * 1024 * 1024;

/// `html` escaped as a JSON string's contents, followed by what ends the event: one copy
/// per fragment body for every stream sending it at once (keyed by the body's address
/// and length, and keeping that body alive, so the address cannot be reused for other
/// bytes while the copy is kept).
fn escaped(html: &Bytes) -> Bytes {
    type Copies = moka::sync::Cache<(usize, usize), (Bytes, Bytes)>;
    static COPIES: std::sync::OnceLock<Copies> = std::sync::OnceLock::new();
    if html.len() <= CHUNK {
        let mut at = 0;
        return escape_chunk(html, &mut at, usize::MAX);
    }
    let copies = COPIES.get_or_init(|| {
        moka::sync::Cache::builder()
            .max_capacity(ESCAPED_CAPACITY)
            .weigher(|_, (html, escaped): &(Bytes, Bytes)| {
                u32::try_from(html.len() + escaped.len()).unwrap_or(u32::MAX)
            })
            .time_to_idle(std::time::Duration::from_secs(60))
            .build()
    });
    let key = (html.as_ptr() as usize, html.len());
    copies
        .get_with(key, || {
            let mut at = 0;
            (html.clone(), escape_chunk(html, &mut at, usize::MAX))
        })
        .1
}

/// The next chunk of `html` from `*at` (at most about `max` bytes once escaped) escaped as
/// the contents of a JSON string, and `*at` moved past it; once `*at` reaches the end,
/// the chunk also carries what ends the event ([`FRAGMENT_END`]). Quotes, backslashes and
/// control characters are escaped as JSON requires; everything else, UTF-8 included, is
/// copied (a chunk may end inside a character: the frames are one byte stream).
fn escape_chunk(html: &[u8], at: &mut usize, max: usize) -> Bytes {
    let mut out = Vec::with_capacity(max.min(html.len() - *at).saturating_add(8));
    while *at < html.len() && out.len() < max {
        let b = html[*at];
        match b {
            b'"' => out.extend_from_slice(b"\\\""),
            b'\\' => out.extend_from_slice(b"\\\\"),
            b'\n' => out.extend_from_slice(b"\\n"),
            b'\r' => out.extend_from_slice(b"\\r"),
            b'\t' => out.extend_from_slice(b"\\t"),
            0..0x20 => out.extend_from_slice(format!("\\u{b:04x}").as_bytes()),
            _ => out.push(b),
        }
        *at += 1;
    }
    if *at == html.len() {
        out.extend_from_slice(FRAGMENT_END);
    }
    Bytes::from(out)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn sources_are_decoded_deduplicated_and_bounded() {
        assert_eq!(
            sources("src=%2Ffragments%2Fa%3Fid%3D1&x=1&src=/fragments/b&src=/fragments/b").unwrap(),
            vec!["/fragments/a?id=1", "/fragments/b"]
        );
        for bad in [
            "",
            "x=1",
            "src=fragments/a",
            "src=//evil.example/fragments/a",
            "src=http://evil.example/x",
            "src=%FF",
        ] {
            assert!(sources(bad).is_err(), "{bad:?}");
        }
        let many: Vec<String> = (0..=MAX_SOURCES).map(|i| format!("src=/f/{i}")).collect();
        assert!(sources(&many.join("&")).unwrap_err().contains("at most"));
        let enough: Vec<String> = (0..MAX_SOURCES).map(|i| format!("src=/f/{i}")).collect();
        assert_eq!(sources(&enough.join("&")).unwrap().len(), MAX_SOURCES);
    }

    /// The whole event a fragment's chunks make, as a client reads it.
    fn event_of(html: &[u8], max: usize) -> (String, usize) {
        let mut at = 0;
        let mut out = b"{\"html\":\"".to_vec();
        let mut frames = 0;
        while at < html.len() || frames == 0 {
            out.extend_from_slice(&escape_chunk(html, &mut at, max));
            frames += 1;
        }
        (String::from_utf8(out).unwrap(), frames)
    }

    #[test]
    fn streams_sending_one_large_fragment_share_its_escaped_copy() {
        let html = Bytes::from("<p>\"x\"\u{1}</p>".repeat(10_000));
        let (one, two) = (escaped(&html), escaped(&html.clone()));
        assert_eq!(one.as_ptr(), two.as_ptr(), "one copy for both");
        let (event, _) = event_of(&html, usize::MAX);
        assert_eq!(&one[..], &event.as_bytes()[b"{\"html\":\"".len()..]);
        // Other bytes of the same length are another copy.
        let other = Bytes::from("<p>\"y\"\u{1}</p>".repeat(10_000));
        assert_ne!(escaped(&other), one);
    }

    #[test]
    fn html_is_escaped_as_json_a_chunk_at_a_time() {
        let html = "<p class=\"x\">a\\b\r\n\tc\u{1}\u{1f} é 😀</p>".repeat(50);
        for max in [1, 7, 64, 1 << 20] {
            let (event, frames) = event_of(html.as_bytes(), max);
            let event = event.strip_suffix("\n\n").expect("the event's end");
            let value: serde_json::Value = serde_json::from_str(event).unwrap();
            assert_eq!(value["html"], html, "max {max}");
            assert!(
                frames >= html.len().div_ceil(max.max(1) * 6).max(1),
                "max {max}"
            );
        }
        let (empty, frames) = event_of(b"", 16);
        assert_eq!((empty.as_str(), frames), ("{\"html\":\"\"}\n\n", 1));
    }

    #[test]
    fn a_chunk_stays_near_its_size_whatever_the_html() {
        // Control bytes are six times their size escaped: a chunk stops once it is full.
        let html = vec![1u8; 100_000];
        let mut at = 0;
        let chunk = escape_chunk(&html, &mut at, CHUNK);
        assert!(chunk.len() <= CHUNK + 6, "{}", chunk.len());
        assert_eq!(at, CHUNK.div_ceil(6));
    }
}
