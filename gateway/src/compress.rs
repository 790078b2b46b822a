//! br and gzip: the codings the gateway answers with, and the compressed copies a cached
//! fragment keeps.
//!
//! A cached fragment is compressed once per coding, on the first hit that asks for it
//! ([`Encoded`], kept in its L1 slot); a composed page is compressed per answer, as it is
//! built per request. Which coding an answer gets is the HTTP front's business
//! (`http::encoding`).

use std::io::Write;
use std::sync::OnceLock;

use bytes::Bytes;
use http::HeaderValue;

/// Smallest body worth compressing: below this, the coding's framing eats the gain.
pub(crate) const MIN_SIZE: usize = 1024;
/// gzip level: zlib's default, as Varnish uses.
const GZIP_LEVEL: u32 = 6;
/// Brotli quality: 4, the usual choice for content compressed per response (at 5 and
/// above the pure-Rust encoder costs more than gzip 6 for a few percent; 11 costs tens of
/// times the CPU). Figures: `bench/README.md`.
const BROTLI_QUALITY: u32 = 4;
/// Brotli window: 4 MiB, the largest page composed.
const BROTLI_WINDOW: u32 = 22;

/// A coding the gateway answers with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Coding {
    /// Brotli (RFC 7932).
    Br,
    /// gzip (RFC 1952).
    Gzip,
}

impl Coding {
    /// Every coding, most preferred first (smaller at equal cost).
    pub(crate) const ALL: [Coding; 2] = [Coding::Br, Coding::Gzip];

    /// Its `Content-Encoding` token.
    pub(crate) fn token(self) -> &'static str {
        match self {
            Coding::Br => "br",
            Coding::Gzip => "gzip",
        }
    }

    pub(crate) fn index(self) -> usize {
        self as usize
    }

    /// `body` in this coding.
    pub(crate) fn encode(self, body: &[u8]) -> Bytes {
        // Writing into a `Vec` cannot fail: the `expect`s below are unreachable.
        let mut out = Vec::with_capacity(body.len() / 3 + 64);
        match self {
            Coding::Br => {
                let mut w =
                    brotli::CompressorWriter::new(&mut out, 4096, BROTLI_QUALITY, BROTLI_WINDOW);
                #[allow(clippy::expect_used)]
                w.write_all(body).expect("writing into a Vec");
            }
            Coding::Gzip => {
                let mut w =
                    flate2::write::GzEncoder::new(&mut out, flate2::Compression::new(GZIP_LEVEL));
                #[allow(clippy::expect_used)]
                w.write_all(body)
                    .and_then(|()| w.try_finish())
                    .expect("writing into a Vec");
            }
        }
        Bytes::from(out)
    }
}

/// Whether a body of `content_type` gains from compression: text, JSON, JavaScript, XML
/// and SVG. Images, video, archives and fonts are compressed already.
pub(crate) fn compressible(content_type: &[u8]) -> bool {
    // On the hit path: compared in place, without lower-casing a copy.
    let t = content_type
        .split(|&b| b == b';')
        .next()
        .unwrap_or_default()
        .trim_ascii();
    let starts = |p: &[u8]| t.len() >= p.len() && t[..p.len()].eq_ignore_ascii_case(p);
    let ends = |s: &[u8]| t.len() >= s.len() && t[t.len() - s.len()..].eq_ignore_ascii_case(s);
    starts(b"text/")
        || ends(b"+json")
        || ends(b"+xml")
        || [
            &b"application/json"[..],
            b"application/javascript",
            b"application/xml",
        ]
        .iter()
        .any(|name| t.eq_ignore_ascii_case(name))
}

/// `body` in `coding`, with `etag` renamed for it; `None` when the coding does not make
/// the body smaller (it is then served as it is).
pub(crate) type Variant = Option<(Bytes, Option<HeaderValue>)>;

pub(crate) fn variant(coding: Coding, body: &[u8], etag: Option<&HeaderValue>) -> Variant {
    let encoded = coding.encode(body);
    if encoded.len() >= body.len() {
        return None;
    }
    let etag = etag
        .and_then(|v| v.to_str().ok())
        .and_then(|e| HeaderValue::from_str(&variant_etag(e, coding)).ok());
    Some((encoded, etag))
}

/// A cached body's compressed copies and their ETags, made on first use: at most one
/// compression per coding for as long as the body is cached, and nothing allocated per
/// hit.
#[derive(Debug, Default)]
pub(crate) struct Encoded([OnceLock<Variant>; 2]);

impl Encoded {
    /// No copies yet.
    pub(crate) const fn new() -> Self {
        Self([OnceLock::new(), OnceLock::new()])
    }

    /// `body` (whose ETag is `etag`) in `coding`, compressed now if this is the first ask.
    pub(crate) fn get(&self, coding: Coding, body: &[u8], etag: Option<&HeaderValue>) -> Variant {
        self.0[coding.index()]
            .get_or_init(|| variant(coding, body, etag))
            .clone()
    }
}

/// `etag` naming `coding`: `"abc"` becomes `"abc-br"` (and `W/"abc"` `W/"abc-br"`).
fn variant_etag(etag: &str, coding: Coding) -> String {
    match etag.strip_suffix('"') {
        Some(open) => format!("{open}-{}\"", coding.token()),
        None => format!("{etag}-{}", coding.token()),
    }
}

/// Whether a body of `len` bytes of `content_type` is compressed for clients that ask
/// (a [`compressible`] type, at least [`MIN_SIZE`] bytes).
pub(crate) fn eligible(content_type: &[u8], len: usize) -> bool {
    len >= MIN_SIZE && compressible(content_type)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use tessera_runtime::coding::decode;

    #[test]
    fn only_compressible_types_are_compressed() {
        for t in [
            "text/html; charset=utf-8",
            "TEXT/CSS",
            "application/json",
            "application/ld+json",
            "image/svg+xml",
            "text/javascript; charset=utf-8",
        ] {
            assert!(compressible(t.as_bytes()), "{t}");
        }
        for t in ["image/png", "application/octet-stream", "font/woff2", ""] {
            assert!(!compressible(t.as_bytes()), "{t}");
        }
    }

    #[test]
    fn codings_compress_text_and_decode_back() {
        let body = "<p>a fragment</p>".repeat(500);
        for c in Coding::ALL {
            let encoded = c.encode(body.as_bytes());
            assert!(encoded.len() < body.len() / 4, "{c:?} compresses text");
            assert_eq!(
                decode(c.token(), &encoded, body.len()).unwrap(),
                body.as_bytes()
            );
        }
    }

    #[test]
    fn a_copy_that_is_no_smaller_is_not_used() {
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
        let text = "<p>a fragment</p>".repeat(100);
        assert!(cache.get(Coding::Br, text.as_bytes(), None).is_some());
    }
}
