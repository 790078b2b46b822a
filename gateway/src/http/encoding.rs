//! Content codings: what the gateway compresses for its clients, and how it reads the
//! compressed ESI pages an upstream sends.
//!
//! - **Answers.** Fragments, composed pages and the client script are sent as `br` or
//!   `gzip` when the client's `Accept-Encoding` allows it, the type is compressible
//!   ([`compressible`](crate::compress::compressible)) and the body is at least
//!   [`MIN_SIZE`](crate::compress::MIN_SIZE) bytes. Such answers carry
//!   `Vary: Accept-Encoding`, and their `ETag` names the coding (`"…-br"`), so a
//!   revalidation matches only the representation the client holds. A cached fragment is
//!   compressed once per coding, on the first hit that asks for it ([`Encoded`]); a
//!   composed page is compressed per answer, as it is built per request.
//! - **Upstream pages.** An ESI page sent with `Content-Encoding` `gzip`, `x-gzip`,
//!   `deflate` or `br` is decoded ([`tessera_runtime::coding::decode`], up to the
//!   composition limit), composed, and encoded again for the client, as Varnish does
//!   with gzip.
//!
//! `Range` is not honoured on these answers: they are 200s with the whole selected
//! representation, which RFC 9110 allows.

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, header};

use crate::compress::{Coding, Encoded, eligible, variant};

/// The coding to answer a request carrying `headers` with: among `br` and `gzip`, the one
/// with the highest `q` (`*` stands for both), `br` on a tie; `None` for identity.
pub(crate) fn negotiate(headers: &HeaderMap) -> Option<Coding> {
    let mut q = [None::<u16>; 2];
    let mut star = None;
    for value in headers.get_all(header::ACCEPT_ENCODING) {
        let Ok(value) = value.to_str() else { continue };
        for item in value.split(',') {
            let mut parts = item.split(';');
            let token = parts.next().unwrap_or("").trim();
            let weight = parts
                .find_map(|p| {
                    let (k, v) = p.split_once('=')?;
                    k.trim().eq_ignore_ascii_case("q").then(|| qvalue(v.trim()))
                })
                .unwrap_or(Some(1000));
            let Some(weight) = weight else { continue };
            if token == "*" {
                star = Some(weight);
            } else if let Some(c) = Coding::ALL
                .into_iter()
                .find(|c| token.eq_ignore_ascii_case(c.token()))
            {
                q[c.index()] = Some(weight);
            } else if token.eq_ignore_ascii_case("x-gzip") {
                q[Coding::Gzip.index()].get_or_insert(weight);
            }
        }
    }
    Coding::ALL
        .into_iter()
        .filter_map(|c| Some((c, q[c.index()].or(star)?)))
        .filter(|&(_, weight)| weight > 0)
        // `max_by_key` keeps the last of equals: reversed, the first (preferred) wins.
        .rev()
        .max_by_key(|&(_, weight)| weight)
        .map(|(c, _)| c)
}

/// A `qvalue` in thousandths (RFC 9110 §12.4.2); `None` when malformed (the item is
/// then ignored).
fn qvalue(v: &str) -> Option<u16> {
    let (int, frac) = v.split_once('.').unwrap_or((v, ""));
    if frac.len() > 3 || !frac.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let frac: u16 = format!("{frac:0<3}").parse().ok()?;
    match int {
        "0" => Some(frac),
        "1" if frac == 0 => Some(1000),
        _ => None,
    }
}

/// Chooses the representation of a 200 answering a request with `request`'s headers:
/// `body` as it is, or compressed in the coding returned, with `headers` (the answer's,
/// `Content-Type` and `ETag` among them) updated to say so. `cache` holds the body's
/// compressed copies when the body is cached; `None` compresses it now. `enabled` is
/// `gateway.compress`.
pub(crate) fn represent(
    enabled: bool,
    request: &HeaderMap,
    headers: &mut HeaderMap,
    body: Bytes,
    cache: Option<&Encoded>,
) -> (Bytes, Option<Coding>) {
    if !enabled
        || headers.contains_key(header::CONTENT_ENCODING)
        || !headers
            .get(header::CONTENT_TYPE)
            .is_some_and(|ct| eligible(ct.as_bytes(), body.len()))
    {
        return (body, None);
    }
    add_vary(headers);
    choose(request, headers, body, cache)
}

/// [`represent`] for an answer already known to be [`eligible`], whose `headers` already
/// carry `Vary: accept-encoding` (the hot answers decide both once, not per hit).
pub(crate) fn choose(
    request: &HeaderMap,
    headers: &mut HeaderMap,
    body: Bytes,
    cache: Option<&Encoded>,
) -> (Bytes, Option<Coding>) {
    let Some(coding) = negotiate(request) else {
        return (body, None);
    };
    let etag = headers.get(header::ETAG);
    let Some((encoded, etag)) = (match cache {
        Some(cache) => cache.get(coding, &body, etag),
        None => variant(coding, &body, etag),
    }) else {
        return (body, None);
    };
    headers.insert(
        header::CONTENT_ENCODING,
        HeaderValue::from_static(coding.token()),
    );
    if let Some(etag) = etag {
        headers.insert(header::ETAG, etag);
    }
    (encoded, Some(coding))
}

/// Adds `accept-encoding` to `Vary` unless it is there already (or `Vary: *`).
pub(crate) fn add_vary(headers: &mut HeaderMap) {
    const TOKEN: &str = "accept-encoding";
    let Some(old) = headers.get(header::VARY) else {
        // The usual case, on the hit path: nothing to read or format.
        headers.insert(header::VARY, HeaderValue::from_static(TOKEN));
        return;
    };
    let present = headers.get_all(header::VARY).iter().any(|v| {
        v.to_str().is_ok_and(|v| {
            v.split(',')
                .map(str::trim)
                .any(|t| t == "*" || t.eq_ignore_ascii_case(TOKEN))
        })
    });
    if present {
        return;
    }
    let value = match old.to_str() {
        Ok(old) if !old.trim().is_empty() => format!("{old}, {TOKEN}"),
        _ => TOKEN.to_string(),
    };
    if let Ok(v) = HeaderValue::from_str(&value) {
        headers.insert(header::VARY, v);
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use tessera_runtime::coding::decode;

    fn accept(v: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(header::ACCEPT_ENCODING, HeaderValue::from_str(v).unwrap());
        h
    }

    #[test]
    fn negotiation_follows_q_values_and_prefers_br_on_ties() {
        let cases = [
            ("gzip, deflate, br, zstd", Some(Coding::Br)),
            ("gzip, deflate", Some(Coding::Gzip)),
            ("br;q=0.5, gzip", Some(Coding::Gzip)),
            ("br;q=1.0, gzip;q=0.999", Some(Coding::Br)),
            ("BR", Some(Coding::Br)),
            ("x-gzip", Some(Coding::Gzip)),
            ("*", Some(Coding::Br)),
            ("*;q=0.1, br;q=0", Some(Coding::Gzip)),
            ("gzip;q=0, br;q=0", None),
            ("identity", None),
            ("deflate", None),
            ("", None),
            // Malformed q-values drop their item, not the header.
            ("br;q=2, gzip", Some(Coding::Gzip)),
            ("br;q=0.5x, gzip;q=0.1", Some(Coding::Gzip)),
        ];
        for (header, want) in cases {
            assert_eq!(negotiate(&accept(header)), want, "{header:?}");
        }
        assert_eq!(negotiate(&HeaderMap::new()), None, "no header: identity");
    }

    #[test]
    fn represent_compresses_once_and_names_the_coding() {
        let body = Bytes::from("<li>item</li>".repeat(200));
        let mut headers = HeaderMap::new();
        headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/html"));
        headers.insert(header::ETAG, HeaderValue::from_static("W/\"abc\""));
        headers.insert(header::VARY, HeaderValue::from_static("cookie"));
        let cache = Encoded::default();
        let (out, coding) = represent(
            true,
            &accept("gzip"),
            &mut headers,
            body.clone(),
            Some(&cache),
        );
        assert_eq!(coding, Some(Coding::Gzip));
        assert_eq!(decode("gzip", &out, body.len()).unwrap(), body);
        assert_eq!(headers[header::CONTENT_ENCODING], "gzip");
        assert_eq!(headers[header::ETAG], "W/\"abc-gzip\"");
        assert_eq!(headers[header::VARY], "cookie, accept-encoding");
        let mut fresh = HeaderMap::new();
        fresh.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/html"));
        let (again, _) = represent(
            true,
            &accept("gzip"),
            &mut fresh,
            body.clone(),
            Some(&cache),
        );
        assert_eq!(again.as_ptr(), out.as_ptr(), "the cached copy is served");

        // Identity: the body as it is, but still `Vary`, as the answer depends on it.
        let mut plain = HeaderMap::new();
        plain.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/html"));
        let (out, coding) = represent(true, &HeaderMap::new(), &mut plain, body.clone(), None);
        assert_eq!((out, coding), (body.clone(), None));
        assert!(!plain.contains_key(header::CONTENT_ENCODING));
        assert_eq!(plain[header::VARY], "accept-encoding");

        // Off, small, or not compressible: untouched, no `Vary`.
        for (enabled, ct, body) in [
            (false, "text/html", body.clone()),
            (true, "text/html", Bytes::from_static(b"<p>small</p>")),
            (true, "image/png", body.clone()),
        ] {
            let mut h = HeaderMap::new();
            h.insert(header::CONTENT_TYPE, HeaderValue::from_static(ct));
            let (out, coding) = represent(enabled, &accept("br"), &mut h, body.clone(), None);
            assert_eq!((out, coding), (body, None));
            assert!(!h.contains_key(header::CONTENT_ENCODING), "{enabled} {ct}");
            assert!(!h.contains_key(header::VARY), "{enabled} {ct}");
        }
    }

    #[test]
    fn incompressible_bodies_are_served_as_they_are() {
        // xorshift64: bytes no coding can shrink.
        let mut x = 0x9E37_79B9_7F4A_7C15_u64;
        let noise: Vec<u8> = (0..4096)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect();
        let cache = Encoded::default();
        assert_eq!(cache.get(Coding::Gzip, &noise, None), None);
        let mut h = HeaderMap::new();
        h.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
        let (out, coding) = represent(
            true,
            &accept("gzip"),
            &mut h,
            Bytes::from(noise.clone()),
            Some(&cache),
        );
        assert_eq!((out, coding), (Bytes::from(noise), None));
        assert!(!h.contains_key(header::CONTENT_ENCODING));
    }
}
