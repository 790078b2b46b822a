//! Page composition: upstream HTML that carries `Surrogate-Control: content="ESI/1.0"`
//! has its `<esi:include>`s filled from the cache.
//!
//! All includes of one page level are looked up together: L1 first, then one `get_many`
//! for the rest; misses become placeholders and build requests through the same lease as
//! the fragment endpoint, so nothing is queued twice. A `src` is resolved against the
//! page's request ([`esi::reference`]: relative paths, and absolute URLs of the page's own
//! host); only one naming a configured route is honoured — anything else, and a malformed
//! `<esi:include>`, is replaced by an HTML comment and never fetched. Fragments resolve
//! their includes against their own path, as Varnish resolves them against the URL of the
//! include that fetched them.
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
use std::net::SocketAddr;
use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use http::{HeaderMap, HeaderValue, Request, Response, header};
use http_body_util::{BodyExt, BodyStream, StreamBody};
use tessera_protocol::{Config, FragmentRoute, Identity, StoreKey};

use super::Front;
use super::encoding;
use super::error::GatewayError;
use super::headers::Trace;
use crate::cache::{CacheService, Found, Fragment, TraceId};
use crate::esi::{self, Segment};
use crate::metrics::{CacheStatus, Metrics};
use tessera_runtime::web::{Body, BoxError, full};

/// Largest page composed; bigger ones pass through as they are.
pub const MAX_PAGE: usize = 4 * 1024 * 1024;
/// Most includes resolved in one page (all levels together).
pub(crate) const MAX_INCLUDES: usize = 100;
/// Deepest include nesting (the page is level 0).
pub(crate) const MAX_DEPTH: usize = 3;

/// Path of the client script.
pub(crate) const CLIENT_JS_PATH: &str = "/_tessera/client.js";

/// The result of composing a page.
#[derive(Debug, Default)]
pub(crate) struct Composed {
    /// The page with includes filled.
    pub body: Vec<u8>,
    /// Includes left as placeholders (the client script fills them).
    pub placeholders: usize,
    /// Includes whose `src` named no configured route, or that were malformed.
    pub refused: usize,
    /// Some included route varies per user (cookies or headers).
    pub per_user: bool,
}

/// An include whose `src` named a configured route.
#[derive(Debug)]
struct Include<'c> {
    /// The canonical `src`, as the client script polls it.
    src: String,
    fragment: Fragment<'c>,
}

/// What one `<esi:include>` of a level resolved to, before anything is looked up.
// Plans live for one level, at most `MAX_INCLUDES` of them: their size does not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Debug)]
enum Plan<'c> {
    /// Past the depth or include-count limit: left out, with a comment saying which.
    Limit(&'static str),
    /// Looked up; `None` where the `src` (or `alt`) names no configured route.
    Resolved {
        primary: Option<Include<'c>>,
        alt: Option<Include<'c>>,
        continue_on_error: bool,
    },
}

impl<'c> Plan<'c> {
    fn fragments(&self) -> impl Iterator<Item = &Fragment<'c>> {
        let (primary, alt) = match self {
            Plan::Resolved { primary, alt, .. } => (primary.as_ref(), alt.as_ref()),
            Plan::Limit(_) => (None, None),
        };
        primary.into_iter().chain(alt).map(|i| &i.fragment)
    }
}

/// The request a page (or fragment) answers, as far as its includes are concerned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct PageBase {
    /// The authority it was asked of (`Host`, or the URI's for HTTP/2).
    pub host: Option<String>,
    /// Its path and query: what a relative `src` is resolved against.
    pub path: String,
}

impl PageBase {
    /// The base of a request for `uri` with `headers`.
    pub(crate) fn of(uri: &http::Uri, headers: &HeaderMap) -> Self {
        let host = headers
            .get(header::HOST)
            .and_then(|h| h.to_str().ok())
            .map(str::to_string)
            .or_else(|| uri.authority().map(|a| a.as_str().to_string()));
        let path = uri
            .path_and_query()
            .map_or_else(|| "/".to_string(), |p| p.as_str().to_string());
        PageBase { host, path }
    }
}

/// One page being composed: the request it answers, and what is left of its budget.
struct Composer<'c> {
    config: &'c Config,
    cache: &'c Arc<CacheService>,
    metrics: &'c Metrics,
    headers: &'c HeaderMap,
    /// The page's `Host`: an absolute `src` naming it is this gateway.
    host: Option<&'c str>,
    trace: &'c dyn TraceId,
    /// Includes that may still be resolved (all levels together).
    budget: usize,
    out: Composed,
}

/// A page: `req` from `peer` proxied to the upstream, and composed when its answer asks
/// for ESI. A HEAD answers what GET would, composed headers included (length, caching),
/// without the body: asked upstream as GET, as Varnish does.
pub(crate) async fn page(
    front: Arc<Front>,
    mut req: Request<hyper::body::Incoming>,
    peer: SocketAddr,
) -> Response<Body> {
    // Composition needs the page request's cookies and headers for `vary`, and its host
    // and path to resolve include `src`s against.
    let headers = req.headers().clone();
    let base = PageBase::of(req.uri(), &headers);
    let head = req.method() == http::Method::HEAD;
    if head {
        *req.method_mut() = http::Method::GET;
    }
    let response = front.upstream.forward(req, peer).await;
    let response = response_for(&front, response, &base, &headers).await;
    if head {
        let (parts, _) = response.into_parts();
        return Response::from_parts(parts, tessera_runtime::web::empty());
    }
    response
}

/// Composes `page`, requested at `base` with `headers` (whose cookies and headers feed the
/// includes' `vary` values).
async fn compose(
    front: &Front,
    page: &[u8],
    base: &PageBase,
    headers: &HeaderMap,
    trace: &dyn TraceId,
) -> Composed {
    let mut out = compose_at(front, page, base, headers, trace, 0).await;
    if out.placeholders > 0 {
        inject_client(&mut out.body);
    }
    out
}

/// Composes `markup` as level `depth` of a page: a page is level 0, a fragment answered at
/// its endpoint level 1 (the client script puts it into a page).
pub(crate) async fn compose_at(
    front: &Front,
    markup: &[u8],
    base: &PageBase,
    headers: &HeaderMap,
    trace: &dyn TraceId,
    depth: usize,
) -> Composed {
    let mut composer = Composer {
        config: &front.config,
        cache: &front.cache,
        metrics: &front.metrics,
        headers,
        host: base.host.as_deref(),
        trace,
        budget: MAX_INCLUDES,
        out: Composed::default(),
    };
    composer.level(markup, &base.path, depth).await;
    composer.out
}

/// Composes an upstream response to a request at `base` when it asks for ESI; passes it
/// through otherwise. A compressed page is decoded first, and the composed page encoded
/// for the client ([`encoding`]). `Surrogate-Control` and `Surrogate-Key` are for
/// surrogates like us and are never sent on to the client.
async fn response_for(
    front: &Front,
    response: Response<Body>,
    base: &PageBase,
    request_headers: &HeaderMap,
) -> Response<Body> {
    let (mut parts, body) = response.into_parts();
    let esi = tessera_protocol::surrogate::asks_for_esi(&parts.headers);
    parts.headers.remove(tessera_protocol::surrogate::HEADER);
    parts.headers.remove(tessera_protocol::tags::HEADER);
    let html = parts
        .headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|ct| ct.to_ascii_lowercase().starts_with("text/html"));
    if !esi || !html {
        return Response::from_parts(parts, body);
    }
    let page = match read_page(&mut parts, body).await {
        Ok(page) => page,
        Err(response) => return response,
    };
    let trace = Trace::new(request_headers);
    let composed = compose(front, &page, base, request_headers, &trace).await;
    front
        .metrics
        .includes_refused
        .inc_by(composed.refused as u64);
    parts.headers.remove(header::ETAG);
    if composed.per_user {
        parts.headers.insert(
            header::CACHE_CONTROL,
            HeaderValue::from_static("private, no-cache"),
        );
    }
    let (body, _) = encoding::represent(
        front.config.gateway.compress,
        request_headers,
        &mut parts.headers,
        Bytes::from(composed.body),
        None,
    );
    parts
        .headers
        .insert(header::CONTENT_LENGTH, HeaderValue::from(body.len()));
    Response::from_parts(parts, full(body))
}

/// The decoded page an ESI answer with head `parts` carries, or the response to send
/// instead: the page passed through uncomposed (too large, or in a coding not decoded),
/// or a 502 (unreadable, or corrupt in its coding).
async fn read_page(parts: &mut http::response::Parts, body: Body) -> Result<Bytes, Response<Body>> {
    let page = match read_up_to(body, MAX_PAGE).await {
        Ok(Page::Whole(page)) => page,
        Ok(Page::TooBig(prefix, rest)) => {
            tracing::warn!(
                limit = MAX_PAGE,
                "ESI page too large; passed through uncomposed"
            );
            let head =
                futures_util::stream::once(async move { Ok(hyper::body::Frame::data(prefix)) });
            let body = StreamBody::new(futures_util::StreamExt::chain(head, BodyStream::new(rest)));
            return Err(Response::from_parts(
                parts.clone(),
                tessera_runtime::web::stream(body),
            ));
        }
        Err(e) => {
            return Err(GatewayError::Upstream(tessera_protocol::Cause::context(
                "reading an ESI page",
                e,
            ))
            .into_response());
        }
    };
    let Some(coding) = parts.headers.get(header::CONTENT_ENCODING) else {
        return Ok(page);
    };
    let coding = String::from_utf8_lossy(coding.as_bytes());
    match tessera_runtime::coding::decode(&coding, &page, MAX_PAGE) {
        Ok(decoded) => {
            parts.headers.remove(header::CONTENT_ENCODING);
            Ok(Bytes::from(decoded))
        }
        Err(e @ tessera_runtime::coding::DecodeError::Corrupt { .. }) => {
            Err(GatewayError::UpstreamCoding(tessera_protocol::Cause::new(e)).into_response())
        }
        Err(e) => {
            tracing::warn!(error = %e, "ESI page passed through uncomposed");
            Err(Response::from_parts(parts.clone(), full(page)))
        }
    }
}

impl<'c> Composer<'c> {
    /// Composes one level, requested at `base` (a path and query): plans every include,
    /// looks them all up in one batch, then writes the level out, descending into
    /// fragments that carry markup themselves.
    fn level<'a>(
        &'a mut self,
        page: &'a [u8],
        base: &'a str,
        depth: usize,
    ) -> std::pin::Pin<Box<dyn Future<Output = ()> + Send + 'a>> {
        Box::pin(async move {
            let segments = esi::parse(page);
            let mut plans = Vec::new();
            for seg in &segments {
                if let Segment::Include(inc) = seg {
                    plans.push(self.plan(inc, base, depth).await);
                }
            }
            let wanted: Vec<&Fragment<'_>> = plans.iter().flat_map(Plan::fragments).collect();
            let started = std::time::Instant::now();
            let found = self.cache.lookup_many(&wanted).await;
            self.count_lookups(&wanted, &found, started.elapsed().as_secs_f64());
            let mut plans = plans.into_iter();
            for seg in segments {
                match seg {
                    Segment::Text(t) => self.out.body.extend_from_slice(t),
                    Segment::Include(inc) => {
                        let plan = plans.next().unwrap_or(Plan::Limit("include count"));
                        self.include(&inc.src, plan, &found, depth).await;
                    }
                    Segment::Dropped(dropped) => self.dropped(dropped),
                }
            }
        })
    }

    /// ESI markup the parser removed as Varnish would: logged (with what was wrong), and
    /// a malformed include is said in a comment and counted, as a refused one is.
    fn dropped(&mut self, dropped: esi::Dropped) {
        tracing::debug!(at = dropped.at, why = dropped.why, "ESI markup removed");
        if dropped.include {
            self.out.refused += 1;
            self.out
                .body
                .extend_from_slice(b"<!-- tessera: malformed include removed -->");
        }
    }

    /// Counts every include looked up (its `src`, and its `alt`) as the fragment endpoint
    /// counts its requests, each with the level's lookup time: an include the store could
    /// not be asked about counts as an error.
    fn count_lookups(&self, wanted: &[&Fragment<'_>], found: &HashMap<StoreKey, Found>, took: f64) {
        for fragment in wanted {
            let cache = found
                .get(&fragment.keys.envelope)
                .map_or(CacheStatus::error, CacheStatus::from);
            self.metrics
                .route(&fragment.route.name)
                .request(cache, took);
        }
    }

    /// Resolves one include, in a level requested at `base`, against the limits and the
    /// configured routes.
    async fn plan(&mut self, inc: &esi::Include, base: &str, depth: usize) -> Plan<'c> {
        if depth >= MAX_DEPTH {
            return Plan::Limit("depth");
        }
        if self.budget == 0 {
            return Plan::Limit("include count");
        }
        self.budget -= 1;
        let primary = self.resolve(&inc.src, base).await;
        let alt = match &inc.alt {
            Some(alt) => self.resolve(alt, base).await,
            None => None,
        };
        Plan::Resolved {
            primary,
            alt,
            continue_on_error: inc.continue_on_error,
        }
    }

    /// Maps an include `src`, in a level requested at `base`, to a configured route, or
    /// `None`: never a fetch.
    async fn resolve(&self, src: &str, base: &str) -> Option<Include<'c>> {
        let resolved = esi::reference::resolve(src, self.host, base)?;
        let (path, query) = resolved
            .split_once('?')
            .map_or((resolved.as_str(), None), |(p, q)| (p, Some(q)));
        let prefix = self.config.gateway.fragment_prefix.as_str();
        let route = self.config.route(path.strip_prefix(prefix)?)?;
        let identity = Identity::from_request(route, query, self.headers).ok()?;
        let src = canonical_src(prefix, route, &identity);
        let fragment = self
            .cache
            .fragment(route, identity, self.trace)
            .await
            .ok()?;
        Some(Include { src, fragment })
    }

    /// Writes one include out: its fragment (composed in turn when it carries markup),
    /// a placeholder the client script fills, or a comment saying why it is absent.
    async fn include(
        &mut self,
        src: &str,
        plan: Plan<'c>,
        found: &HashMap<StoreKey, Found>,
        depth: usize,
    ) {
        let (primary, alt, continue_on_error) = match plan {
            Plan::Limit(why) => {
                let comment = format!("<!-- tessera: {why} limit reached -->");
                self.out.body.extend_from_slice(comment.as_bytes());
                return;
            }
            Plan::Resolved {
                primary,
                alt,
                continue_on_error,
            } => (primary, alt, continue_on_error),
        };
        if primary.is_none() {
            self.out.refused += 1;
            tracing::debug!(src = %src, "include of a path that is no fragment route refused");
        }
        if primary
            .iter()
            .chain(alt.iter())
            .any(|i| !i.fragment.route.vary.is_empty())
        {
            self.out.per_user = true;
        }
        let serve = |i: &Option<Include<'_>>| {
            let i = i.as_ref()?;
            match found.get(&i.fragment.keys.envelope)? {
                Found::Serve { slot, .. } => {
                    let e = &slot.envelope;
                    Some((e.body.clone(), e.esi, i.src.clone()))
                }
                _ => None,
            }
        };
        if let Some((body, asked_for_esi, src)) = serve(&primary).or_else(|| serve(&alt)) {
            // Only fragments whose render asked for ESI are composed: markup in any other
            // (user input reflected in it, say) is text. Its own includes resolve against
            // its `src`.
            if asked_for_esi && esi::has_markup(&body) {
                self.level(&body, &src, depth + 1).await;
            } else {
                self.out.body.extend_from_slice(&body);
            }
            return;
        }
        match &primary {
            None if continue_on_error => {}
            None => self.out.body.extend_from_slice(
                format!(
                    "<!-- tessera: include of {} refused: not a fragment route -->",
                    comment_safe(src)
                )
                .as_bytes(),
            ),
            Some(i) => {
                let failed = matches!(
                    found.get(&i.fragment.keys.envelope),
                    Some(Found::Failed { .. })
                );
                if !(failed && continue_on_error) {
                    self.out.placeholders += 1;
                    self.out.body.extend_from_slice(placeholder(i).as_bytes());
                }
            }
        }
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

fn placeholder(i: &Include<'_>) -> String {
    let route = i.fragment.route;
    format!(
        r#"<div class="tessera-fragment" data-tessera-src="{}">{}<template class="tessera-fallback">{}</template></div>"#,
        html_attr(&i.src),
        route.placeholder,
        route.fallback
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
