//! The reverse proxy: everything that is not a fragment goes to the upstream, streamed.
//!
//! Hop-by-hop headers are removed in both directions (hyper strips none by itself);
//! `Forwarded`, `X-Forwarded-For/Proto/Host`, `X-Real-IP` and `Via` are added. Forwarding
//! headers a client sent are dropped first, since it could claim any address, unless the
//! peer is one of `gateway.trusted_proxies`: then its chain is kept and extended, and
//! `X-Real-IP` is the right-most address in it that is not a trusted proxy (as nginx's
//! `real_ip_recursive`). The client's `Host` is passed through
//! so the application sees the name it is served under. Inbound HTTP/2 is sent upstream as
//! HTTP/1.1. An upstream that cannot be reached gives a 502 problem, one that does not
//! start answering within `upstream.timeout` a 504 — never a hang. A client's
//! `Tessera-Render-Token` is never passed on: only the workers' render requests carry
//! one, so the application can trust it.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Request, Response, Uri, Version};
use hyper::body::Incoming;
use hyper_util::client::legacy::{Client, connect::HttpConnector};
use hyper_util::rt::TokioIo;

use super::error::GatewayError;
use tessera_protocol::config::{IpNet, RENDER_TOKEN_HEADER, UpstreamUrl};
use tessera_protocol::{Cause, surrogate};
use tessera_runtime::otel;
use tessera_runtime::web::Body;

const HOP_BY_HOP: [HeaderName; 8] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
];

/// `Via` value this gateway adds.
const VIA: &str = "1.1 tessera";

/// Headers that say who the client is and how it reached us: only a trusted proxy's are
/// believed.
const FORWARDING: [&str; 5] = [
    "forwarded",
    "x-forwarded-for",
    "x-forwarded-host",
    "x-forwarded-proto",
    "x-real-ip",
];

/// A pooled HTTP/1.1 client for the upstream.
#[derive(Debug, Clone)]
pub(crate) struct Upstream {
    client: Client<HttpConnector, Body>,
    base: Uri,
    timeout: Duration,
    trusted: Arc<[IpNet]>,
    /// Leave the upstream's time on each response, for the access log.
    timed: bool,
}

impl Upstream {
    /// A client for `base` (`upstream.url`, parsed at load: `http://host[:port]`),
    /// believing the forwarding headers of peers in `trusted` (`gateway.trusted_proxies`).
    pub(crate) fn new(base: &UpstreamUrl, timeout: Duration, trusted: &[IpNet]) -> Self {
        Self {
            client: tessera_runtime::upstream::client(timeout),
            base: base.uri().clone(),
            timeout,
            trusted: trusted.into(),
            timed: false,
        }
    }

    /// Leaves the upstream's time to its answer's head on each response
    /// ([`UpstreamTime`](super::access_log::UpstreamTime)).
    pub(crate) fn timed(self) -> Self {
        Self {
            timed: true,
            ..self
        }
    }

    /// Forwards `req` from `peer` and streams the answer back.
    pub(crate) async fn forward(&self, req: Request<Incoming>, peer: SocketAddr) -> Response<Body> {
        match self.forward_inner(req, peer).await {
            Ok(r) => r,
            Err(e) => e.into_response(),
        }
    }

    async fn forward_inner(
        &self,
        mut req: Request<Incoming>,
        peer: SocketAddr,
    ) -> Result<Response<Body>, GatewayError> {
        // An upgrade (WebSocket) keeps its `Upgrade` header and, once the upstream agrees
        // with a 101, both connections are spliced together.
        let upgrade = req
            .headers()
            .get(header::UPGRADE)
            .cloned()
            .filter(|_| connection_has(req.headers(), "upgrade"));
        let client_side = upgrade.as_ref().map(|_| hyper::upgrade::on(&mut req));
        let (mut parts, body) = req.into_parts();
        self.prepare(&mut parts, peer, upgrade)?;
        // The upstream call's client span; the app's own tracing joins through it.
        let span = otel::Span::child(parts.method.to_string(), otel::Kind::Client, || {
            vec![
                otel::KeyValue::new("http.request.method", parts.method.to_string()),
                otel::KeyValue::new("url.full", parts.uri.to_string()),
            ]
        });
        if span.recording() {
            otel::inject(&span.context(), &mut parts.headers);
        }
        let outbound = Request::from_parts(parts, tessera_runtime::web::stream(body));

        let started = self.timed.then(std::time::Instant::now);
        let response = tokio::time::timeout(self.timeout, self.client.request(outbound))
            .await
            .map_err(|_| GatewayError::UpstreamTimeout(self.timeout))
            .and_then(|r| r.map_err(|e| GatewayError::Upstream(Cause::new(e))))
            .inspect_err(|e| span.fail(e))?;
        let status = response.status().as_u16();
        span.set(|| otel::KeyValue::new("http.response.status_code", i64::from(status)));
        drop(span);
        if response.status() == http::StatusCode::SWITCHING_PROTOCOLS
            && let Some(client_side) = client_side
        {
            return Ok(splice(response, client_side));
        }
        let (mut parts, body) = response.into_parts();
        if let Some(started) = started {
            parts
                .extensions
                .insert(super::access_log::UpstreamTime(started.elapsed()));
        }
        strip_hop_by_hop(&mut parts.headers);
        append(&mut parts.headers, header::VIA, VIA);
        Ok(Response::from_parts(
            parts,
            tessera_runtime::web::stream(Sliced { body, rest: None }),
        ))
    }

    /// Turns the client's request head into the upstream's: absolute URI on the
    /// upstream, HTTP/1.1, hop-by-hop headers out, forwarding headers in.
    fn prepare(
        &self,
        parts: &mut http::request::Parts,
        peer: SocketAddr,
        upgrade: Option<HeaderValue>,
    ) -> Result<(), GatewayError> {
        let path = parts.uri.path_and_query().map_or("/", |p| p.as_str());
        let uri = format!(
            "{}://{}{}",
            self.base.scheme_str().unwrap_or("http"),
            self.base.authority().map_or("", |a| a.as_str()),
            path
        );
        parts.uri = uri
            .parse()
            .map_err(|e| GatewayError::Upstream(Cause::context("cannot build upstream URI", e)))?;
        let host = parts.headers.get(header::HOST).cloned().or_else(|| {
            parts
                .uri
                .authority()
                .and_then(|a| HeaderValue::from_str(a.as_str()).ok())
        });
        strip_hop_by_hop(&mut parts.headers);
        add_forwarded(&mut parts.headers, peer.ip(), host.as_ref(), &self.trusted);
        if let Some(host) = host {
            parts.headers.insert(header::HOST, host);
        }
        parts.version = Version::HTTP_11;
        if let Some(protocol) = upgrade {
            parts
                .headers
                .insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
            parts.headers.insert(header::UPGRADE, protocol);
        }
        // Tell the application it may answer with ESI markup (Edge Architecture spec).
        parts.headers.insert(
            surrogate::CAPABILITY_HEADER,
            HeaderValue::from_static(surrogate::CAPABILITY),
        );
        // Only workers send it: the application may trust the one it gets.
        parts.headers.remove(RENDER_TOKEN_HEADER);
        Ok(())
    }
}

/// The upstream agreed to an upgrade: splices both upgraded connections together in the
/// background and hands the client the 101.
fn splice(
    mut response: Response<Incoming>,
    client_side: hyper::upgrade::OnUpgrade,
) -> Response<Body> {
    let upstream_side = hyper::upgrade::on(&mut response);
    tokio::spawn(async move {
        match tokio::try_join!(client_side, upstream_side) {
            Ok((client, upstream)) => {
                let (mut c, mut u) = (TokioIo::new(client), TokioIo::new(upstream));
                if let Err(e) = tokio::io::copy_bidirectional(&mut c, &mut u).await {
                    tracing::debug!(error = %e, "upgraded connection ended");
                }
            }
            Err(e) => tracing::debug!(error = %e, "upgrade failed"),
        }
    });
    let (mut parts, _) = response.into_parts();
    let protocol = parts.headers.get(header::UPGRADE).cloned();
    strip_hop_by_hop(&mut parts.headers);
    if let Some(protocol) = protocol {
        parts
            .headers
            .insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        parts.headers.insert(header::UPGRADE, protocol);
    }
    append(&mut parts.headers, header::VIA, VIA);
    Response::from_parts(parts, tessera_runtime::web::empty())
}

fn connection_has(headers: &HeaderMap, token: &str) -> bool {
    headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case(token))
}

/// Removes the headers named in `Connection` and the fixed hop-by-hop list.
pub(crate) fn strip_hop_by_hop(headers: &mut HeaderMap) {
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|n| HeaderName::from_bytes(n.trim().as_bytes()).ok())
        .collect();
    for name in named.iter().chain(HOP_BY_HOP.iter()) {
        headers.remove(name);
    }
    headers.remove(header::UPGRADE);
}

/// Sets the forwarding headers for a request from `peer`: see the module doc.
fn add_forwarded(
    headers: &mut HeaderMap,
    peer: IpAddr,
    host: Option<&HeaderValue>,
    trusted: &[IpNet],
) {
    // A v4 client of a dual-stack listener shows as `::ffff:a.b.c.d`.
    let peer = peer.to_canonical();
    if !is_trusted(peer, trusted) {
        for name in FORWARDING {
            headers.remove(name);
        }
    }
    let client = real_ip(joined(headers, "x-forwarded-for").as_deref(), peer, trusted);
    append(
        headers,
        HeaderName::from_static("x-forwarded-for"),
        &peer.to_string(),
    );
    append(headers, header::FORWARDED, &forwarded_element(peer, host));
    if !headers.contains_key("x-forwarded-proto") {
        headers.insert("x-forwarded-proto", HeaderValue::from_static("http"));
    }
    if let Some(host) = host
        && !headers.contains_key("x-forwarded-host")
    {
        headers.insert("x-forwarded-host", host.clone());
    }
    if let Ok(v) = HeaderValue::from_str(&client.to_string()) {
        headers.insert("x-real-ip", v);
    }
    append(headers, header::VIA, VIA);
}

fn is_trusted(ip: IpAddr, trusted: &[IpNet]) -> bool {
    trusted.iter().any(|net| net.contains(&ip))
}

/// The client's address: walking `chain` (`X-Forwarded-For` as received) from the right,
/// starting at `peer`, the first address that is not a trusted proxy. An entry that is
/// not an address ends the walk: nothing left of it can be believed.
fn real_ip(chain: Option<&str>, peer: IpAddr, trusted: &[IpNet]) -> IpAddr {
    let mut client = peer;
    for hop in chain.unwrap_or("").rsplit(',').map(str::trim) {
        if !is_trusted(client, trusted) {
            break;
        }
        match hop.parse::<IpAddr>() {
            Ok(ip) => client = ip.to_canonical(),
            Err(_) => break,
        }
    }
    client
}

/// This hop's `Forwarded` element (RFC 7239): `for=…;host=…;proto=http`, an IPv6 address
/// and a host with a port quoted.
fn forwarded_element(peer: IpAddr, host: Option<&HeaderValue>) -> String {
    let mut element = match peer {
        IpAddr::V4(ip) => format!("for={ip}"),
        IpAddr::V6(ip) => format!("for=\"[{ip}]\""),
    };
    if let Some(host) = host.and_then(|h| h.to_str().ok()) {
        element.push_str(";host=");
        element.push_str(&token_or_quoted(host));
    }
    element.push_str(";proto=http");
    element
}

/// `value` as an RFC 9110 token when it is one, else as a quoted string.
fn token_or_quoted(value: &str) -> String {
    let tchar = |b: u8| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b);
    if !value.is_empty() && value.bytes().all(tchar) {
        return value.to_string();
    }
    let escaped = value.replace('\\', "\\\\").replace('"', "\\\"");
    format!("\"{escaped}\"")
}

/// Every value of `name`, joined with `, ` (a header may come in several lines).
fn joined(headers: &HeaderMap, name: &str) -> Option<String> {
    let values: Vec<&str> = headers
        .get_all(name)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .collect();
    (!values.is_empty()).then(|| values.join(", "))
}

/// Adds `value` to the list in `name`, in one line.
fn append(headers: &mut HeaderMap, name: HeaderName, value: &str) {
    let joined = match joined(headers, name.as_str()) {
        Some(prior) => format!("{prior}, {value}"),
        None => value.to_string(),
    };
    if let Ok(v) = HeaderValue::from_str(&joined) {
        headers.insert(name, v);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hop_by_hop_headers_go_including_those_named_in_connection() {
        let mut h = HeaderMap::new();
        h.insert(
            header::CONNECTION,
            HeaderValue::from_static("keep-alive, x-secret-hop"),
        );
        h.insert("x-secret-hop", HeaderValue::from_static("1"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert(
            header::TRANSFER_ENCODING,
            HeaderValue::from_static("chunked"),
        );
        h.insert(header::TE, HeaderValue::from_static("trailers"));
        h.insert("x-kept", HeaderValue::from_static("1"));
        strip_hop_by_hop(&mut h);
        assert_eq!(h.len(), 1, "{h:?}");
        assert!(h.contains_key("x-kept"));
    }

    fn forged() -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert("x-forwarded-for", HeaderValue::from_static("203.0.113.9"));
        h.append("x-forwarded-for", HeaderValue::from_static("10.0.0.2"));
        h.insert("forwarded", HeaderValue::from_static("for=203.0.113.9"));
        h.insert("x-real-ip", HeaderValue::from_static("203.0.113.9"));
        h.insert("x-forwarded-proto", HeaderValue::from_static("https"));
        h.insert("x-forwarded-host", HeaderValue::from_static("shop.example"));
        h.insert(header::VIA, HeaderValue::from_static("1.1 cdn"));
        h
    }

    #[test]
    fn an_untrusted_peer_gets_fresh_forwarding_headers() {
        let mut h = forged();
        let host = HeaderValue::from_static("gw.example:8080");
        let trusted: Vec<IpNet> = vec!["10.0.0.0/8".parse().unwrap()];
        add_forwarded(&mut h, "192.0.2.1".parse().unwrap(), Some(&host), &trusted);
        assert_eq!(h["x-forwarded-for"], "192.0.2.1");
        assert_eq!(h["x-real-ip"], "192.0.2.1");
        assert_eq!(
            h["forwarded"],
            "for=192.0.2.1;host=\"gw.example:8080\";proto=http"
        );
        assert_eq!(h["x-forwarded-proto"], "http");
        assert_eq!(h["x-forwarded-host"], "gw.example:8080");
        assert_eq!(h[header::VIA], "1.1 cdn, 1.1 tessera");
        for name in FORWARDING {
            assert_eq!(h.get_all(name).iter().count(), 1, "{name}");
        }
    }

    #[test]
    fn a_trusted_proxy_chain_is_extended() {
        let mut h = forged();
        let host = HeaderValue::from_static("shop.example");
        let trusted: Vec<IpNet> = vec!["10.0.0.0/8".parse().unwrap()];
        add_forwarded(&mut h, "10.0.0.1".parse().unwrap(), Some(&host), &trusted);
        assert_eq!(h["x-forwarded-for"], "203.0.113.9, 10.0.0.2, 10.0.0.1");
        assert_eq!(h["x-real-ip"], "203.0.113.9", "right-most untrusted");
        assert_eq!(
            h["forwarded"],
            "for=203.0.113.9, for=10.0.0.1;host=shop.example;proto=http"
        );
        assert_eq!(h["x-forwarded-proto"], "https", "the proxy terminated TLS");
        assert_eq!(h["x-forwarded-host"], "shop.example");
    }

    #[test]
    fn ipv6_and_mapped_peers() {
        let mut h = HeaderMap::new();
        add_forwarded(&mut h, "2001:db8::1".parse().unwrap(), None, &[]);
        assert_eq!(h["forwarded"], "for=\"[2001:db8::1]\";proto=http");
        assert_eq!(h["x-real-ip"], "2001:db8::1");
        let mut h = HeaderMap::new();
        add_forwarded(&mut h, "::ffff:192.0.2.1".parse().unwrap(), None, &[]);
        assert_eq!(h["x-forwarded-for"], "192.0.2.1");
        let trusted: Vec<IpNet> = vec!["::1/128".parse().unwrap()];
        let mut h = HeaderMap::new();
        h.insert(
            "x-forwarded-for",
            HeaderValue::from_static("garbage, 192.0.2.5"),
        );
        add_forwarded(&mut h, "::1".parse().unwrap(), None, &trusted);
        assert_eq!(h["x-real-ip"], "192.0.2.5");
    }

    #[test]
    fn quoting() {
        assert_eq!(token_or_quoted("shop.example"), "shop.example");
        assert_eq!(token_or_quoted("a:1"), "\"a:1\"");
        assert_eq!(token_or_quoted("a\"b\\"), "\"a\\\"b\\\\\"");
    }
}

/// Largest frame of a proxied answer handed to the client's connection. hyper queues up
/// to 16 frames, or `max_header_bytes`, unsent: in small slices (of the upstream's 4 KiB
/// reads, not copied) a client that reads nothing pins 16 KiB, not 64
/// (`bench/slow-readers.sh`).
const SLICE: usize = 1024;

/// A proxied answer's body, its frames cut into [`SLICE`]s.
#[derive(Debug)]
struct Sliced {
    body: Incoming,
    /// What is left of the frame being sliced.
    rest: Option<bytes::Bytes>,
}

impl hyper::body::Body for Sliced {
    type Data = bytes::Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<bytes::Bytes>, hyper::Error>>> {
        use std::task::Poll;
        let slice = |rest: &mut bytes::Bytes| rest.split_to(rest.len().min(SLICE));
        if let Some(rest) = &mut self.rest {
            let frame = slice(rest);
            if rest.is_empty() {
                self.rest = None;
            }
            return Poll::Ready(Some(Ok(hyper::body::Frame::data(frame))));
        }
        let frame = match std::task::ready!(std::pin::Pin::new(&mut self.body).poll_frame(cx)) {
            Some(Ok(frame)) => frame,
            other => return Poll::Ready(other),
        };
        match frame.into_data() {
            Ok(mut data) if data.len() > SLICE => {
                let first = slice(&mut data);
                self.rest = Some(data);
                Poll::Ready(Some(Ok(hyper::body::Frame::data(first))))
            }
            Ok(data) => Poll::Ready(Some(Ok(hyper::body::Frame::data(data)))),
            Err(frame) => Poll::Ready(Some(Ok(frame))),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.rest.is_none() && self.body.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        let body = self.body.size_hint();
        let rest = self.rest.as_ref().map_or(0, |r| r.len() as u64);
        let mut hint = hyper::body::SizeHint::new();
        if let Some(upper) = body.upper() {
            hint.set_upper(upper + rest);
        }
        hint.set_lower(body.lower() + rest);
        hint
    }
}
