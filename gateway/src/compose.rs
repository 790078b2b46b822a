//! Page composition: upstream HTML that carries `Surrogate-Control: content="ESI/1.0"`
//! has its `<esi:include>`s filled from the cache.
//!
//! All includes of one page level are looked up together: L1 first, then one `get_many`
//! for the rest; misses become placeholders and build requests through the same lease as
//! the fragment endpoint, so nothing is queued twice. Only a `src` naming a configured
//! route is honoured — anything else is replaced by an HTML comment and never fetched.
//!
//! Limits, and what happens past them:
//! - a page over [`MAX_PAGE`] bytes is passed through uncomposed (markup and all);
//! - includes past [`MAX_INCLUDES`] in one page become comments;
//! - fragments may include fragments, [`MAX_DEPTH`] levels deep; deeper includes become
//!   comments.
//!
//! Departure from ESI 1.0: a failed include without `alt` or `onerror="continue"` does not
//! fail the whole page; it stays a placeholder that the client script retries.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

use bytes::{Bytes, BytesMut};
use futures_util::future::join_all;
use http::{HeaderMap, HeaderValue, Response, header};
use http_body_util::{BodyExt, BodyStream, StreamBody};
use tessera_protocol::{Envelope, FragmentKeys, FragmentRoute, Identity, StoreKey};

use crate::Gateway;
use crate::cache::{Slot, SlotState};
use crate::error::GatewayError;
use crate::esi::{self, Segment};
use crate::fragment::{Found, Requested};
use crate::headers::Trace;
use tessera_runtime::web::{Body, BoxError, full};

/// Largest page composed; bigger ones pass through as they are.
pub const MAX_PAGE: usize = 4 * 1024 * 1024;
/// Most includes resolved in one page (all levels together).
pub const MAX_INCLUDES: usize = 100;
/// Deepest include nesting (the page is level 0).
pub const MAX_DEPTH: usize = 3;

/// Path of the client script.
pub const CLIENT_JS_PATH: &str = "/_tessera/client.js";

/// The result of composing a page.
#[derive(Debug, Default)]
pub struct Composed {
    /// The page with includes filled.
    pub body: Vec<u8>,
    /// Includes left as placeholders (the client script fills them).
    pub placeholders: usize,
    /// Includes whose `src` named no configured route.
    pub refused: usize,
    /// Some included route varies per user (cookies or headers).
    pub per_user: bool,
}

/// An include whose `src` named a configured route.
#[derive(Debug, Clone)]
struct Target<'c> {
    src: String,
    route: &'c FragmentRoute,
    identity: Identity,
    generation: u64,
    keys: FragmentKeys,
}

impl Gateway {
    /// Composes `page`, requested with `headers` (whose cookies and headers feed the
    /// includes' `vary` values).
    pub(crate) async fn compose(
        self: &Arc<Self>,
        page: &[u8],
        headers: &HeaderMap,
        trace: &Trace<'_>,
    ) -> Composed {
        let mut out = Composed::default();
        let mut budget = MAX_INCLUDES;
        self.compose_level(page, headers, trace, 0, &mut budget, &mut out)
            .await;
        if out.placeholders > 0 {
            inject_client(&mut out.body);
        }
        out
    }

    fn compose_level<'a>(
        self: &'a Arc<Self>,
        page: &'a [u8],
        headers: &'a HeaderMap,
        trace: &'a Trace<'a>,
        depth: usize,
        budget: &'a mut usize,
        out: &'a mut Composed,
    ) -> std::pin::Pin<Box<dyn Future<Output = ()> + Send + 'a>> {
        Box::pin(async move {
            let segments = esi::parse(page);
            // Resolve every include of this level before looking any up, so one batch
            // covers them all.
            let mut plans = Vec::new();
            for seg in &segments {
                if let Segment::Include(inc) = seg {
                    if depth >= MAX_DEPTH || *budget == 0 {
                        plans.push(None);
                        continue;
                    }
                    *budget -= 1;
                    let primary = self.target(&inc.src, headers).await;
                    let alt = match &inc.alt {
                        Some(alt) => self.target(alt, headers).await,
                        None => None,
                    };
                    plans.push(Some((primary, alt, inc.continue_on_error)));
                }
            }
            let wanted: Vec<&Target<'_>> = plans
                .iter()
                .flatten()
                .flat_map(|(p, a, _)| p.iter().chain(a.iter()))
                .collect();
            let found = self.batch(&wanted, trace).await;

            let mut plans = plans.into_iter();
            for seg in segments {
                let inc = match seg {
                    Segment::Text(t) => {
                        out.body.extend_from_slice(t);
                        continue;
                    }
                    Segment::Include(inc) => inc,
                };
                let Some(Some((primary, alt, continue_on_error))) = plans.next() else {
                    let why = if depth >= MAX_DEPTH {
                        "depth"
                    } else {
                        "include count"
                    };
                    out.body.extend_from_slice(
                        format!("<!-- tessera: {why} limit reached -->").as_bytes(),
                    );
                    continue;
                };
                if primary.is_none() {
                    out.refused += 1;
                    tracing::debug!(src = %inc.src, "include of a path that is no fragment route refused");
                }
                let serve = |t: &Option<Target<'_>>| {
                    t.as_ref().and_then(|t| match found.get(&t.keys.envelope) {
                        Some(Found::Serve { slot, .. }) => match &slot.state {
                            SlotState::Found(e) => Some(e.body.clone()),
                            SlotState::Pending => None,
                        },
                        _ => None,
                    })
                };
                if primary
                    .iter()
                    .chain(alt.iter())
                    .any(|t| !t.route.vary.is_empty())
                {
                    out.per_user = true;
                }
                if let Some(body) = serve(&primary).or_else(|| serve(&alt)) {
                    if esi::has_markup(&body) {
                        self.compose_level(&body, headers, trace, depth + 1, budget, out)
                            .await;
                    } else {
                        out.body.extend_from_slice(&body);
                    }
                    continue;
                }
                match &primary {
                    None if continue_on_error => {}
                    None => out.body.extend_from_slice(
                        format!(
                            "<!-- tessera: include of {} refused: not a fragment route -->",
                            comment_safe(&inc.src)
                        )
                        .as_bytes(),
                    ),
                    Some(t) => {
                        let failed =
                            matches!(found.get(&t.keys.envelope), Some(Found::Failed { .. }));
                        if failed && continue_on_error {
                            continue;
                        }
                        out.placeholders += 1;
                        out.body.extend_from_slice(placeholder(t).as_bytes());
                    }
                }
            }
        })
    }

    /// Composes an upstream response when it asks for ESI; passes it through otherwise.
    /// `Surrogate-Control` is for surrogates like us and is never sent on to the client.
    pub(crate) async fn compose_response(
        self: &Arc<Self>,
        response: Response<Body>,
        request_headers: &HeaderMap,
    ) -> Response<Body> {
        let trace = Trace::new(request_headers);
        let trace = &trace;
        let (mut parts, body) = response.into_parts();
        let esi = parts
            .headers
            .get_all("surrogate-control")
            .iter()
            .filter_map(|v| v.to_str().ok())
            .any(|v| {
                v.to_ascii_lowercase()
                    .replace(' ', "")
                    .contains("content=\"esi/1.0\"")
            });
        parts.headers.remove("surrogate-control");
        let html = parts
            .headers
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|ct| ct.to_ascii_lowercase().starts_with("text/html"));
        if !esi || !html || parts.headers.contains_key(header::CONTENT_ENCODING) {
            if esi && html {
                tracing::warn!(
                    "ESI page with Content-Encoding passed through uncomposed; serve ESI pages uncompressed"
                );
            }
            return Response::from_parts(parts, body);
        }
        let page = match read_up_to(body, MAX_PAGE).await {
            Ok(Page::Whole(page)) => page,
            Ok(Page::TooBig(prefix, rest)) => {
                tracing::warn!(
                    limit = MAX_PAGE,
                    "ESI page too large; passed through uncomposed"
                );
                let head =
                    futures_util::stream::once(async move { Ok(hyper::body::Frame::data(prefix)) });
                let body =
                    StreamBody::new(futures_util::StreamExt::chain(head, BodyStream::new(rest)));
                return Response::from_parts(parts, tessera_runtime::web::stream(body));
            }
            Err(e) => {
                return GatewayError::Upstream(tessera_protocol::Cause::context(
                    "reading an ESI page",
                    e,
                ))
                .into_response();
            }
        };
        let composed = self.compose(&page, request_headers, trace).await;
        self.metrics
            .includes_refused
            .inc_by(composed.refused as u64);
        parts.headers.remove(header::ETAG);
        parts.headers.insert(
            header::CONTENT_LENGTH,
            HeaderValue::from(composed.body.len()),
        );
        if composed.per_user {
            parts.headers.insert(
                header::CACHE_CONTROL,
                HeaderValue::from_static("private, no-cache"),
            );
        }
        Response::from_parts(parts, full(composed.body))
    }

    /// Maps an include `src` to a configured route, or `None`: never a fetch.
    async fn target<'c>(self: &'c Arc<Self>, src: &str, headers: &HeaderMap) -> Option<Target<'c>> {
        let (path, query) = src
            .split_once('?')
            .map_or((src, None), |(p, q)| (p, Some(q)));
        let name = path.strip_prefix(self.config.gateway.fragment_prefix.as_str())?;
        let route = self.config.route(name)?;
        let identity = Identity::from_request(route, query, headers).ok()?;
        let (generation, keys, _) = self.keys(route, &identity).await.ok()?;
        Some(Target {
            src: canonical_src(&self.config.gateway.fragment_prefix, route, &identity),
            route,
            identity,
            generation,
            keys,
        })
    }

    /// Looks every target up: L1, then one multi-get, then one build request per miss.
    async fn batch(
        self: &Arc<Self>,
        targets: &[&Target<'_>],
        trace: &Trace<'_>,
    ) -> HashMap<StoreKey, Found> {
        let mut slots: HashMap<StoreKey, Arc<Slot>> = HashMap::new();
        let mut missing: Vec<&Target<'_>> = Vec::new();
        for t in targets {
            if slots.contains_key(&t.keys.envelope) || missing.iter().any(|m| m.keys == t.keys) {
                continue;
            }
            match self.l1.peek(&t.keys.envelope).await {
                Some(slot) => {
                    slots.insert(t.keys.envelope.clone(), slot);
                }
                None => missing.push(t),
            }
        }
        if !missing.is_empty() {
            let started = Instant::now();
            let keys: Vec<StoreKey> = missing.iter().map(|t| t.keys.envelope.clone()).collect();
            match self.backends.store.get_many(&keys).await {
                Ok(mut values) => {
                    let mut absent = Vec::new();
                    for t in &missing {
                        let decoded = values
                            .remove(&t.keys.envelope)
                            .and_then(|b| Envelope::decode(&b).ok());
                        match decoded {
                            Some(e) => {
                                let slot = self
                                    .l1
                                    .insert(&t.keys.envelope, SlotState::Found(e), started)
                                    .await;
                                slots.insert(t.keys.envelope.clone(), slot);
                            }
                            None => absent.push(*t),
                        }
                    }
                    let requested = join_all(absent.iter().map(|t| {
                        self.request_build(t.route, &t.identity, t.generation, &t.keys, trace.id())
                    }))
                    .await;
                    for (t, outcome) in absent.iter().zip(requested) {
                        let state = match outcome {
                            Ok(Requested::JustBuilt(e)) => SlotState::Found(e),
                            Ok(Requested::Queued | Requested::AlreadyPending) => SlotState::Pending,
                            Err(e) => {
                                tracing::warn!(route = %t.route.name, error = %e, "include left pending: build not requested");
                                continue;
                            }
                        };
                        let slot = self.l1.insert(&t.keys.envelope, state, started).await;
                        slots.insert(t.keys.envelope.clone(), slot);
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e, "store unavailable while composing; includes left as placeholders")
                }
            }
        }
        targets
            .iter()
            .filter_map(|t| {
                let slot = slots.get(&t.keys.envelope)?.clone();
                let found = self.judge(t.route, &t.identity, t.generation, &t.keys, trace, slot);
                Some((t.keys.envelope.clone(), found))
            })
            .collect()
    }
}

enum Page {
    Whole(Bytes),
    TooBig(Bytes, Body),
}

/// Reads `body` whole when it is at most `limit` bytes; otherwise hands back what was
/// read and the rest, so the page can still be streamed through unchanged.
async fn read_up_to(mut body: Body, limit: usize) -> Result<Page, BoxError> {
    let mut buf = BytesMut::new();
    while let Some(frame) = body.frame().await {
        if let Ok(data) = frame?.into_data() {
            buf.extend_from_slice(&data);
            if buf.len() > limit {
                return Ok(Page::TooBig(buf.freeze(), body));
            }
        }
    }
    Ok(Page::Whole(buf.freeze()))
}

/// `/fragments/{name}?{canonical params}`: what the client script polls.
fn canonical_src(prefix: &str, route: &FragmentRoute, identity: &Identity) -> String {
    let query = identity.query_string();
    if query.is_empty() {
        format!("{prefix}{}", route.name)
    } else {
        format!("{prefix}{}?{query}", route.name)
    }
}

fn placeholder(t: &Target<'_>) -> String {
    format!(
        r#"<div class="tessera-fragment" data-tessera-src="{}">{}<template class="tessera-fallback">{}</template></div>"#,
        html_attr(&t.src),
        t.route.placeholder,
        t.route.fallback
    )
}

fn html_attr(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('"', "&quot;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

/// Text safe inside an HTML comment.
fn comment_safe(s: &str) -> String {
    let cut: String = s.chars().take(200).collect();
    format!("{:?}", cut.replace("--", "- -").replace('>', "&gt;"))
}

/// Adds the client script once, before `</body>` when there is one.
fn inject_client(body: &mut Vec<u8>) {
    let tag = format!(r#"<script src="{CLIENT_JS_PATH}" defer></script>"#);
    if body
        .windows(CLIENT_JS_PATH.len())
        .any(|w| w == CLIENT_JS_PATH.as_bytes())
    {
        return;
    }
    let close = b"</body>";
    let at = body
        .windows(close.len())
        .rposition(|w| w.eq_ignore_ascii_case(close))
        .unwrap_or(body.len());
    body.splice(at..at, tag.into_bytes());
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn client_script_goes_before_body_end_once() {
        let mut page = b"<html><body><p>x</p></BODY></html>".to_vec();
        inject_client(&mut page);
        inject_client(&mut page);
        let s = String::from_utf8(page).unwrap();
        assert_eq!(s.matches("client.js").count(), 1);
        assert!(s.contains(r#"defer></script></BODY>"#), "{s}");
        let mut bare = b"<p>no body tag</p>".to_vec();
        inject_client(&mut bare);
        assert!(String::from_utf8(bare).unwrap().ends_with("</script>"));
    }

    #[test]
    fn comments_cannot_be_broken_out_of() {
        let s = comment_safe("--><script>alert(1)</script>");
        assert!(!s.contains("-->"), "{s}");
    }
}
