//! The reverse proxy: everything that is not a fragment goes to the upstream, streamed.
//!
//! Hop-by-hop headers are removed in both directions (hyper strips none by itself);
//! `X-Forwarded-For/Proto/Host` and `Via` are added. The client's `Host` is passed through
//! so the application sees the name it is served under. Inbound HTTP/2 is sent upstream as
//! HTTP/1.1. An upstream that cannot be reached gives a 502 problem, one that does not
//! start answering within `upstream.timeout` a 504 — never a hang.

use std::net::SocketAddr;
use std::time::Duration;

use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Request, Response, Uri, Version};
use hyper::body::Incoming;
use hyper_util::client::legacy::{Client, connect::HttpConnector};
use hyper_util::rt::TokioIo;

use crate::error::GatewayError;
use tessera_protocol::Cause;
use tessera_protocol::config::UpstreamUrl;
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

/// A pooled HTTP/1.1 client for the upstream.
#[derive(Debug, Clone)]
pub struct Upstream {
    client: Client<HttpConnector, Body>,
    base: Uri,
    timeout: Duration,
}

impl Upstream {
    /// A client for `base` (`upstream.url`, parsed at load: `http://host[:port]`).
    pub fn new(base: &UpstreamUrl, timeout: Duration) -> Self {
        Self {
            client: tessera_runtime::upstream::client(timeout),
            base: base.uri().clone(),
            timeout,
        }
    }

    /// Forwards `req` from `peer` and streams the answer back.
    pub async fn forward(&self, req: Request<Incoming>, peer: SocketAddr) -> Response<Body> {
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
        let outbound = Request::from_parts(parts, tessera_runtime::web::stream(body));

        let response = tokio::time::timeout(self.timeout, self.client.request(outbound))
            .await
            .map_err(|_| GatewayError::UpstreamTimeout(self.timeout))?
            .map_err(|e| GatewayError::Upstream(Cause::new(e)))?;
        if response.status() == http::StatusCode::SWITCHING_PROTOCOLS
            && let Some(client_side) = client_side
        {
            return Ok(splice(response, client_side));
        }
        let (mut parts, body) = response.into_parts();
        strip_hop_by_hop(&mut parts.headers);
        append(&mut parts.headers, header::VIA, VIA);
        Ok(Response::from_parts(
            parts,
            tessera_runtime::web::stream(body),
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
        add_forwarded(&mut parts.headers, peer, host.as_ref());
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
            "surrogate-capability",
            HeaderValue::from_static("tessera=\"ESI/1.0\""),
        );
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
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
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

fn add_forwarded(headers: &mut HeaderMap, peer: SocketAddr, host: Option<&HeaderValue>) {
    let ip = peer.ip().to_string();
    let xff = match headers.get("x-forwarded-for").and_then(|v| v.to_str().ok()) {
        Some(prior) => format!("{prior}, {ip}"),
        None => ip,
    };
    if let Ok(v) = HeaderValue::from_str(&xff) {
        headers.insert("x-forwarded-for", v);
    }
    headers.insert("x-forwarded-proto", HeaderValue::from_static("http"));
    if let Some(host) = host {
        headers.insert("x-forwarded-host", host.clone());
    }
    append(headers, header::VIA, VIA);
}

fn append(headers: &mut HeaderMap, name: HeaderName, value: &str) {
    let joined = match headers.get(&name).and_then(|v| v.to_str().ok()) {
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

    #[test]
    fn forwarded_headers_append() {
        let mut h = HeaderMap::new();
        h.insert("x-forwarded-for", HeaderValue::from_static("203.0.113.9"));
        h.insert(header::VIA, HeaderValue::from_static("1.1 cdn"));
        let host = HeaderValue::from_static("shop.example");
        add_forwarded(&mut h, "127.0.0.1:5000".parse().unwrap(), Some(&host));
        assert_eq!(h["x-forwarded-for"], "203.0.113.9, 127.0.0.1");
        assert_eq!(h["x-forwarded-proto"], "http");
        assert_eq!(h["x-forwarded-host"], "shop.example");
        assert_eq!(h[header::VIA], "1.1 cdn, 1.1 tessera");
    }
}
