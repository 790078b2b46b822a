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

use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use futures_util::StreamExt;
use futures_util::stream::FuturesUnordered;
use http::{HeaderMap, HeaderValue, Method, Request, Response, StatusCode, header};
use http_body_util::BodyExt;
use tokio::sync::mpsc;

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
    let (tx, rx) = mpsc::channel(MAX_SOURCES + 2);
    let front = front.clone();
    let headers = req.headers().clone();
    tokio::spawn(async move {
        feed(&front, sources, headers, &tx).await;
        front.metrics.streams.dec();
    });
    let mut r = Response::new(tessera_runtime::web::stream(Events(rx)));
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

/// Sends an event for each source as it becomes ready, then `end`; stops early when
/// the client goes away (the channel closes).
async fn feed(front: &Front, sources: Vec<String>, headers: HeaderMap, tx: &mpsc::Sender<Bytes>) {
    let deadline = tokio::time::Instant::now() + front.config.gateway.max_wait;
    if tx
        .send(Bytes::from_static(b"retry: 2000\n\n"))
        .await
        .is_err()
    {
        return;
    }
    let mut pending: FuturesUnordered<_> = sources
        .iter()
        .enumerate()
        .map(|(i, src)| {
            let headers = &headers;
            async move { (i, until_ready(front, src, headers, deadline).await) }
        })
        .collect();
    let mut sent = vec![false; sources.len()];
    loop {
        let (i, answer) = tokio::select! {
            () = tx.closed() => return,
            next = pending.next() => match next {
                Some(done) => done,
                None => break,
            },
        };
        let Some((status, html)) = answer else {
            continue; // still pending at the deadline: listed in `end`
        };
        let data = serde_json::json!({ "src": sources[i], "status": status, "html": html });
        if tx
            .send(Bytes::from(format!(
                "id: {i}\nevent: fragment\ndata: {data}\n\n"
            )))
            .await
            .is_err()
        {
            return;
        }
        sent[i] = true;
    }
    let left: Vec<&String> = sources
        .iter()
        .zip(&sent)
        .filter_map(|(src, sent)| (!sent).then_some(src))
        .collect();
    let end = serde_json::json!({ "pending": left });
    let _ = tx
        .send(Bytes::from(format!("event: end\ndata: {end}\n\n")))
        .await;
}

/// Asks the fragment endpoint for `src` with this stream's headers, waiting as a
/// long-poll does, until it answers anything but "pending" or `deadline` passes
/// (`None`).
async fn until_ready(
    front: &Front,
    src: &str,
    headers: &HeaderMap,
    deadline: tokio::time::Instant,
) -> Option<(u16, String)> {
    let prefix = front.config.gateway.fragment_prefix.as_str();
    let Some(name) = src
        .split('?')
        .next()
        .and_then(|path| path.strip_prefix(prefix))
    else {
        return Some((StatusCode::NOT_FOUND.as_u16(), String::new()));
    };
    loop {
        let now = tokio::time::Instant::now();
        if now >= deadline || front.stopping.is_cancelled() {
            return None;
        }
        let wait = (deadline - now).as_secs().max(1);
        let Ok(req) = fragment_request(src, headers, wait) else {
            return Some((StatusCode::BAD_REQUEST.as_u16(), String::new()));
        };
        let response = Box::pin(fragment::serve(front, &req, name)).await;
        let status = response.status();
        if status == StatusCode::OK {
            let body = response.into_body().collect().await.ok()?.to_bytes();
            return Some((status.as_u16(), String::from_utf8_lossy(&body).into_owned()));
        }
        if status == StatusCode::SERVICE_UNAVAILABLE {
            tokio::time::sleep(UNAVAILABLE_PAUSE.min(deadline - now)).await;
        } else if status != StatusCode::ACCEPTED {
            return Some((status.as_u16(), String::new()));
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

/// The stream's body: events as the feeding task sends them; ends when it is done.
#[derive(Debug)]
struct Events(mpsc::Receiver<Bytes>);

impl hyper::body::Body for Events {
    type Data = Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<hyper::body::Frame<Bytes>, Self::Error>>> {
        self.0
            .poll_recv(cx)
            .map(|event| event.map(|bytes| Ok(hyper::body::Frame::data(bytes))))
    }
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
}
