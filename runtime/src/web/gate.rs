//! The admin gate every admin listener passes a request through before routing it: the
//! token check, the `Host` check of a listener without a token (DNS rebinding), the
//! refusal of cross-site requests that change state, and the hardening headers every
//! admin answer carries.

use std::net::{IpAddr, SocketAddr};

use http::{HeaderMap, HeaderValue, Request, Response, StatusCode, header};

use super::body::{Body, problem};
use super::ready::alive;

/// Whether `headers` carry the admin `token`: `Authorization: Bearer {token}`, or HTTP
/// Basic with the token as password (how a browser logs in to a dashboard). The scheme
/// is matched in any case (RFC 9110 §11.1). An empty token admits everyone.
pub fn authorized(headers: &HeaderMap, token: &str) -> bool {
    let token = token.as_bytes();
    if token.is_empty() {
        return true;
    }
    let Some(auth) = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
    else {
        return false;
    };
    let (scheme, credentials) = auth.trim().split_once(' ').unwrap_or((auth, ""));
    let credentials = credentials.trim();
    let given = if scheme.eq_ignore_ascii_case("bearer") {
        credentials.as_bytes().to_vec()
    } else if scheme.eq_ignore_ascii_case("basic") {
        use base64::Engine;
        let decoded = base64::engine::general_purpose::STANDARD
            .decode(credentials)
            .unwrap_or_default();
        // `user:password`; the user name is not checked.
        match decoded.iter().position(|b| *b == b':') {
            Some(colon) => decoded[colon + 1..].to_vec(),
            None => return false,
        }
    } else {
        return false;
    };
    constant_time_eq(&given, token)
}

/// The 401 for a request without the admin token named by `key`.
pub fn unauthorized(key: &str) -> Response<Body> {
    let mut r = problem(
        StatusCode::UNAUTHORIZED,
        "unauthorized",
        &format!("this admin endpoint needs `Authorization: Bearer <{key}>`"),
    );
    r.headers_mut().insert(
        header::WWW_AUTHENTICATE,
        HeaderValue::from_static(r#"Bearer, Basic realm="tessera admin""#),
    );
    r
}

/// What every admin listener checks before routing, `None` meaning go on:
/// - `GET /healthz` answers to anyone: liveness probes carry no token, and it tells
///   nothing but that the process runs;
/// - every other request needs the token `key` names (see [`authorized`]);
/// - without a token, the request must be addressed to the listener, on `listen`, by a
///   loopback name (see [`loopback_host`]): a page on another origin whose name an
///   attacker re-points at 127.0.0.1 (DNS rebinding) reaches the listener with its own
///   name in `Host`, and would otherwise read and purge as it likes;
/// - a state-changing request must not come from another site (see [`cross_site`]): a
///   browser resends HTTP Basic credentials by itself, so a page elsewhere could
///   otherwise purge or requeue through a logged-in operator's browser.
pub fn admin_gate<B>(
    req: &Request<B>,
    token: &str,
    key: &str,
    listen: SocketAddr,
) -> Option<Response<Body>> {
    if req.method() == http::Method::GET && req.uri().path() == "/healthz" {
        return Some(alive());
    }
    if !authorized(req.headers(), token) {
        return Some(unauthorized(key));
    }
    let host = req
        .headers()
        .get(header::HOST)
        .and_then(|v| v.to_str().ok())
        .or_else(|| req.uri().authority().map(http::uri::Authority::as_str));
    if token.is_empty()
        && let Some(host) = host
        && !loopback_host(host, listen.ip())
    {
        return Some(problem(
            StatusCode::FORBIDDEN,
            "bad_host",
            &format!(
                "this admin listener has no {key}, so it answers only requests addressed to \
                 it by a loopback name (Host localhost, 127.0.0.1, [::1] or {}), not {host:?}; \
                 set {key} to reach it by another name",
                listen.ip()
            ),
        ));
    }
    let why = cross_site(req.method(), host, req.headers())?;
    Some(problem(
        StatusCode::FORBIDDEN,
        "cross_site",
        &format!(
            "cross-site request refused: {why}. Admin requests that change state must come \
             from the dashboard itself, or from a client that sends no Origin or Referer \
             (curl, scripts, `tessera-gateway purge`)"
        ),
    ))
}

/// Whether `host` (a `Host` header, `name[:port]`) names this machine's loopback or the
/// listener's own address `listen`: `localhost` (a trailing dot allowed), an address in
/// 127.0.0.0/8 or `[::1]`, or `listen` itself. Any port: what protects against DNS
/// rebinding is the name, which the attacker's page cannot choose (an SSH tunnel on
/// another port still works). Anything that is not a valid authority is refused.
pub(super) fn loopback_host(host: &str, listen: IpAddr) -> bool {
    // `Host` is `uri-host [":" port]` (RFC 9110): an authority's userinfo has no place.
    let Ok(authority) = host.trim().parse::<http::uri::Authority>() else {
        return false;
    };
    if authority.as_str().contains('@') {
        return false;
    }
    let name = authority.host();
    let bare = name.trim_start_matches('[').trim_end_matches(']');
    match bare.parse::<IpAddr>() {
        Ok(ip) => ip.is_loopback() || ip == listen || ip.to_canonical() == listen,
        Err(_) => {
            let name = name.strip_suffix('.').unwrap_or(name);
            name.eq_ignore_ascii_case("localhost")
        }
    }
}

/// Why a request that changes state (any method but GET, HEAD and OPTIONS) comes from
/// another site than `host` (the request's `Host`), if it does. It does when
/// `Sec-Fetch-Site` is anything but `same-origin` or `none` (typed by the user), or when
/// `Origin` or `Referer` names another `host:port`. A request without any of them (curl,
/// scripts, the CLI) is not cross-site: no browser sends a state-changing request
/// without `Origin`.
pub fn cross_site(
    method: &http::Method,
    host: Option<&str>,
    headers: &HeaderMap,
) -> Option<String> {
    use http::Method;
    if matches!(*method, Method::GET | Method::HEAD | Method::OPTIONS) {
        return None;
    }
    if let Some(site) = headers.get("sec-fetch-site") {
        let site = site.to_str().unwrap_or("").trim();
        if !(site.eq_ignore_ascii_case("same-origin") || site.eq_ignore_ascii_case("none")) {
            return Some("Sec-Fetch-Site is not same-origin".into());
        }
    }
    for name in [header::ORIGIN, header::REFERER] {
        if let Some(source) = headers.get(&name) {
            let same = source
                .to_str()
                .is_ok_and(|source| host.is_some_and(|host| same_origin(source, host)));
            if !same {
                return Some(format!(
                    "{name} is not this admin listener ({})",
                    host.unwrap_or("no Host")
                ));
            }
        }
    }
    None
}

/// Whether the URL `source` (an `Origin`, or a `Referer` with its path) is on `host`
/// (`host[:port]`), a port left out being the default of `source`'s scheme.
fn same_origin(source: &str, host: &str) -> bool {
    let Some((scheme, rest)) = source.split_once("://") else {
        return false; // `null`, or not a URL
    };
    let default_port = match scheme.to_ascii_lowercase().as_str() {
        "http" => 80,
        "https" => 443,
        _ => return false,
    };
    let authority = rest.split(['/', '?', '#']).next().unwrap_or("");
    let (Ok(theirs), Ok(ours)) = (
        authority.parse::<http::uri::Authority>(),
        host.parse::<http::uri::Authority>(),
    ) else {
        return false;
    };
    theirs.host().eq_ignore_ascii_case(ours.host())
        && theirs.port_u16().unwrap_or(default_port) == ours.port_u16().unwrap_or(default_port)
}

/// Adds what every admin answer carries: no MIME sniffing, never shown in a frame
/// (clickjacking a purge button), and a policy that loads nothing unless the answer set
/// its own (the dashboard does).
pub fn harden(headers: &mut HeaderMap) {
    headers.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    headers.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    headers
        .entry(header::CONTENT_SECURITY_POLICY)
        .or_insert(HeaderValue::from_static(
            "default-src 'none'; frame-ancestors 'none'",
        ));
}

/// Compares without leaking where the first difference is.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_loopback_names_reach_a_listener_without_a_token() {
        let lo = IpAddr::from([127, 0, 0, 1]);
        for good in [
            "127.0.0.1:9090",
            "localhost:9090",
            "LOCALHOST",
            "localhost.:9090",
            "127.0.0.2:1",
            "[::1]:9090",
            "localhost:8000",
        ] {
            assert!(loopback_host(good, lo), "{good}");
        }
        for bad in [
            "evil.example:9090",
            "evil.example",
            "localhost.evil.example:9090",
            "127.0.0.1.evil.example",
            "10.0.0.5:9090",
            "[::2]:9090",
            "",
            "localhost:9090/x",
            "user@localhost:9090",
            "local host",
        ] {
            assert!(!loopback_host(bad, lo), "{bad}");
        }
        // The listener's own address, when it is not loopback (a token is required off
        // loopback, so this is a listener with a token in practice; the rule still holds).
        let own = IpAddr::from([10, 0, 0, 5]);
        assert!(loopback_host("10.0.0.5:9090", own));
        assert!(!loopback_host("10.0.0.6:9090", own));
    }

    mod host_properties {
        use super::*;
        use proptest::prelude::*;

        /// A port as a `Host` may carry it: none, or any number.
        fn port() -> impl Strategy<Value = String> {
            prop_oneof![
                Just(String::new()),
                any::<u16>().prop_map(|p| format!(":{p}"))
            ]
        }

        /// A DNS name of one to four labels: what an attacker's page can be served from.
        fn dns_name() -> impl Strategy<Value = String> {
            proptest::collection::vec("[a-zA-Z0-9][a-zA-Z0-9-]{0,12}", 1..5)
                .prop_map(|labels| labels.join("."))
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(512))]

            #[test]
            fn any_text_is_judged_without_panicking(host in any::<String>()) {
                let _ = loopback_host(&host, IpAddr::from([127, 0, 0, 1]));
            }

            #[test]
            fn localhost_in_any_case_and_loopback_addresses_pass(
                upper in proptest::collection::vec(any::<bool>(), 9),
                dot in any::<bool>(),
                octets in any::<[u8; 3]>(),
                port in port(),
            ) {
                let lo = IpAddr::from([127, 0, 0, 1]);
                let name: String = "localhost".chars().zip(&upper)
                    .map(|(c, &up)| if up { c.to_ascii_uppercase() } else { c })
                    .collect();
                let dot = if dot { "." } else { "" };
                let [a, b, c] = octets;
                for host in [
                    format!("{name}{dot}{port}"),
                    format!("127.{a}.{b}.{c}{port}"),
                    format!("[::1]{port}"),
                ] {
                    prop_assert!(loopback_host(&host, lo), "{}", host);
                }
            }

            /// An attacker chooses the name it rebinds, and nothing it can choose passes:
            /// no other name, no name that starts or ends like a loopback one, no other
            /// address.
            #[test]
            fn no_other_name_or_address_passes(
                name in dns_name(),
                glue in prop_oneof![Just("."), Just("@"), Just("-"), Just("_"), Just("")],
                ip in any::<[u8; 4]>(),
                port in port(),
            ) {
                let lo = IpAddr::from([127, 0, 0, 1]);
                prop_assume!(!name.trim_end_matches('.').eq_ignore_ascii_case("localhost"));
                let mut hosts = vec![format!("{name}{port}")];
                for loopback in ["localhost", "127.0.0.1"] {
                    hosts.push(format!("{loopback}{glue}{name}{port}"));
                    hosts.push(format!("{name}{glue}{loopback}{port}"));
                }
                for host in hosts {
                    // Digits glued to 127.0.0.1 can make another loopback address.
                    let bare = host.rsplit_once(':').map_or(host.as_str(), |(h, _)| h);
                    let is_loopback_ip = bare.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback());
                    prop_assert_eq!(loopback_host(&host, lo), is_loopback_ip, "{}", host);
                }
                let ip = IpAddr::from(ip);
                prop_assume!(!ip.is_loopback());
                let host = format!("{ip}{port}");
                prop_assert!(!loopback_host(&host, lo), "{}", host);
                // The listener's own address passes, and only it.
                prop_assert!(loopback_host(&host, ip), "{}", host);
            }
        }
    }

    #[test]
    fn the_gate_refuses_other_hosts_without_a_token_only() {
        let listen = SocketAddr::from(([127, 0, 0, 1], 9090));
        let req = |host: &str| {
            Request::builder()
                .uri("/dead-letters")
                .header("host", host)
                .body(())
                .unwrap()
        };
        let refused = admin_gate(&req("evil.example:9090"), "", "gateway.admin_token", listen)
            .expect("refused");
        assert_eq!(refused.status(), StatusCode::FORBIDDEN);
        assert!(admin_gate(&req("localhost:9090"), "", "k", listen).is_none());
        // With a token the token is the protection: any name (a load balancer's).
        let mut with_token = req("admin.example.com");
        with_token
            .headers_mut()
            .insert(header::AUTHORIZATION, HeaderValue::from_static("Bearer t"));
        assert!(admin_gate(&with_token, "t", "k", listen).is_none());
        // Probes need no name either.
        let probe = Request::builder()
            .uri("/healthz")
            .header("host", "evil.example")
            .body(())
            .unwrap();
        assert_eq!(
            admin_gate(&probe, "", "k", listen).unwrap().status(),
            StatusCode::OK
        );
    }

    #[test]
    fn token_comparison() {
        assert!(constant_time_eq(b"secret", b"secret"));
        assert!(!constant_time_eq(b"secret", b"secreT"));
        assert!(!constant_time_eq(b"secret", b"secret2"));
        assert!(!constant_time_eq(b"", b"x"));
    }

    #[test]
    fn bearer_and_basic_tokens() {
        let with = |v: &str| {
            let mut h = HeaderMap::new();
            h.insert(header::AUTHORIZATION, HeaderValue::from_str(v).unwrap());
            h
        };
        assert!(authorized(&HeaderMap::new(), ""));
        assert!(!authorized(&HeaderMap::new(), "s3cret"));
        assert!(authorized(&with("Bearer s3cret"), "s3cret"));
        assert!(!authorized(&with("Bearer s3cre"), "s3cret"));
        // "admin:s3cret"
        assert!(authorized(&with("Basic YWRtaW46czNjcmV0"), "s3cret"));
        // "admin:nope"
        assert!(!authorized(&with("Basic YWRtaW46bm9wZQ=="), "s3cret"));
        assert!(!authorized(&with("Token s3cret"), "s3cret"));
        // The scheme in any case (RFC 9110 §11.1).
        assert!(authorized(&with("bearer s3cret"), "s3cret"));
        assert!(authorized(&with("BEARER  s3cret "), "s3cret"));
        assert!(authorized(&with("basic YWRtaW46czNjcmV0"), "s3cret"));
        assert!(!authorized(&with("bearers3cret"), "s3cret"));
    }

    #[test]
    fn cross_site_requests() {
        use http::Method;
        let with = |pairs: &[(&'static str, &'static str)]| {
            let mut h = HeaderMap::new();
            for (k, v) in pairs {
                h.insert(*k, HeaderValue::from_static(v));
            }
            h
        };
        let host = Some("127.0.0.1:9090");
        let refused = |method: Method, pairs| cross_site(&method, host, &with(pairs)).is_some();
        for hostile in [
            &[("origin", "http://evil.example")][..],
            &[("origin", "null")],
            &[("origin", "http://127.0.0.1:9091")],
            &[("origin", "http://127.0.0.1")],
            &[
                ("origin", "http://127.0.0.1:9090"),
                ("sec-fetch-site", "same-site"),
            ],
            &[("sec-fetch-site", "cross-site")],
            &[("referer", "http://evil.example/admin?x")],
            &[("referer", "http://127.0.0.1:9090.evil.example/")],
        ] {
            assert!(refused(Method::POST, hostile), "{hostile:?}");
            assert!(refused(Method::DELETE, hostile), "{hostile:?}");
            assert!(!refused(Method::GET, hostile), "reads are not refused");
        }
        for fine in [
            &[][..],
            &[("origin", "http://127.0.0.1:9090")],
            &[
                ("origin", "HTTP://127.0.0.1:9090"),
                ("sec-fetch-site", "same-origin"),
            ],
            &[("sec-fetch-site", "none")],
            &[("referer", "http://127.0.0.1:9090/?x=1")],
        ] {
            assert!(!refused(Method::POST, fine), "{fine:?}");
        }
        // Default ports count as written.
        let plain = with(&[("origin", "https://admin.example")]);
        assert!(cross_site(&Method::PUT, Some("admin.example:443"), &plain).is_none());
        assert!(cross_site(&Method::PUT, Some("admin.example"), &plain).is_none());
        assert!(cross_site(&Method::PUT, None, &plain).is_some());
    }
}
