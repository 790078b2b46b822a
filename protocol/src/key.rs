//! Fragment identity and store keys.
//!
//! A request for `/fragments/{route}?{query}` identifies a fragment by the route, the
//! route's allow-listed params (sorted, percent-encoded), the route's `vary` values and
//! the route's generation. Everything else in the request is ignored, so random query
//! strings cannot flood the cache or the workers.
//!
//! Store keys never contain client bytes: the canonical identity is hashed (BLAKE3,
//! 128 bits, hex), and the other parts (namespace, route, generation) are validated at
//! config load. Every key is therefore short (well under memcached's 250 bytes), has no
//! spaces or control characters, and has a fixed length per route.
//!
//! | key | holds |
//! | --- | --- |
//! | `{ns}:f:{route}:{gen}:{digest}` | the envelope |
//! | `{ns}:p:{route}:{gen}:{digest}` | the pending lease: the id of the one request allowed to build |
//! | `{ns}:g:{route}` | the route's generation |
//! | `{ns}:t:{tag}` | when the tag was last purged (Unix ms; see [`crate::tags`]) |
//! | `{ns}:c:{route}:{slot}` | one of a limited route's `max_renders` render slots, held by a render in flight (expires after its `build_timeout` + 3 s) |
//! | `{ns}:w:{route}:{second}` | renders of a limited route started in one second (Unix s), against its `renders_per_second` (expires after 5 s) |
//! | `{ns}:s:{route}` | the route's last soft purge (Unix ms): what rendered before it is stale |
//! | `{ns}:j:{tag}` | the tag's purge record: purges of several tags at once (all of them) recorded under it (JSON; see [`crate::tags`]) |
//! | `{ns}:m:{server}` | how often writes went elsewhere in place of a memcached server (`server`: a hash of its `host:port`) |
//! | `{ns}:i` | on each memcached server: the count of `:m:` it was last emptied for |
//!
//! A lease is placed on the memcached server of its envelope ([`placed_as`]), so the two
//! can be written in one ordered exchange (see [`crate::store::Store::add_then_get`]).

use std::fmt::{self, Write as _};

use http::HeaderMap;
use percent_encoding::{AsciiSet, NON_ALPHANUMERIC, percent_decode_str, utf8_percent_encode};

use crate::config::{FragmentRoute, VarySource};
use crate::tags::Tag;

/// Longest query string accepted on a fragment request.
pub const MAX_QUERY: usize = 4096;
/// Longest single param or vary value, after decoding.
pub const MAX_VALUE: usize = 1024;
/// Most values one allow-listed param may repeat.
pub const MAX_REPEATS: usize = 16;

/// RFC 3986 unreserved characters stay as they are; everything else is encoded.
const COMPONENT: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'_')
    .remove(b'.')
    .remove(b'~');

/// Percent-encodes a query component the canonical way.
pub fn encode(s: &str) -> String {
    utf8_percent_encode(s, COMPONENT).to_string()
}

/// A key for the store. Only this module makes them, so every key that reaches memcached
/// was built from validated or hashed parts.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct StoreKey(String);

impl StoreKey {
    /// The key as sent to the store.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for StoreKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// The keys of one fragment.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct FragmentKeys {
    /// Where the envelope lives.
    pub envelope: StoreKey,
    /// Where `:f:` starts in `envelope`, to derive the lease key from it.
    kind_at: usize,
}

impl FragmentKeys {
    /// The pending lease: present while exactly one build is queued or running. Built on
    /// demand: the hit path never needs it. Only [`crate::lease`] uses it.
    pub(crate) fn lease(&self) -> StoreKey {
        let mut key = self.envelope.0.clone();
        key.replace_range(self.kind_at..self.kind_at + 3, ":p:");
        StoreKey(key)
    }

    /// The keyspace the keys belong to (for the keys of the envelope's tags).
    pub(crate) fn keyspace(&self) -> Keyspace {
        Keyspace::new(&self.envelope.0[..self.kind_at])
    }

    /// The route the fragment belongs to.
    pub fn route(&self) -> &str {
        let rest = &self.envelope.0[self.kind_at + 3..];
        rest.split_once(':').map_or(rest, |(route, _)| route)
    }
}

/// The key whose memcached server `key` shares: a lease's envelope (`:p:` read as `:f:`),
/// every other key itself. Returned as the parts around the kind, for hashing without
/// an allocation. The namespace holds no `:`, so the first `:` starts the kind.
pub fn placed_as(key: &[u8]) -> [&[u8]; 3] {
    match key.iter().position(|&b| b == b':') {
        Some(at) if key[at..].starts_with(b":p:") => [&key[..at], b":f:", &key[at + 3..]],
        _ => [key, b"", b""],
    }
}

/// Builds keys under one namespace.
#[derive(Debug, Clone)]
pub struct Keyspace {
    ns: String,
}

impl Keyspace {
    /// `namespace` must already be validated by the config loader.
    pub fn new(namespace: &str) -> Self {
        Self {
            ns: namespace.to_string(),
        }
    }

    /// The keys of a fragment in `generation` of its route.
    pub fn fragment(&self, identity: &Identity, generation: u64) -> FragmentKeys {
        // Built in place: it is made on every request, and `format!` growing the string
        // piece by piece cost more than the rest of the key's making.
        let mut key = String::with_capacity(
            self.ns.len() + identity.route.len() + ":f:::".len() + 20 + DIGEST_HEX,
        );
        key.push_str(&self.ns);
        key.push_str(":f:");
        key.push_str(&identity.route);
        key.push(':');
        let _ = write!(key, "{generation}");
        key.push(':');
        identity.push_digest(&mut key);
        FragmentKeys {
            envelope: StoreKey(key),
            kind_at: self.ns.len(),
        }
    }

    /// Where the generation of `route` is kept. `route` must be a configured route name.
    pub fn generation(&self, route: &str) -> StoreKey {
        StoreKey(format!("{}:g:{route}", self.ns))
    }

    /// Where the last purge of `tag` is kept. A [`Tag`] holds only token characters
    /// (no `:`, space or control character) and is at most 128 bytes.
    pub fn tag(&self, tag: &Tag) -> StoreKey {
        StoreKey(format!("{}:t:{tag}", self.ns))
    }

    /// Render slot `slot` (from 0) of `route`, a configured route name: present while a
    /// render holds it (see `max_renders`).
    pub fn render_slot(&self, route: &str, slot: u32) -> StoreKey {
        StoreKey(format!("{}:c:{route}:{slot}", self.ns))
    }

    /// The count of renders of `route`, a configured route name, started in the Unix
    /// second `second` (see `renders_per_second`).
    pub fn render_window(&self, route: &str, second: u64) -> StoreKey {
        StoreKey(format!("{}:w:{route}:{second}", self.ns))
    }

    /// Where the count of writes a memcached server missed is kept, `server` naming it
    /// (a hash of its address). Only the memcached store uses it.
    pub fn missed_writes(&self, server: u64) -> StoreKey {
        StoreKey(format!("{}:m:{server:016x}", self.ns))
    }

    /// The key each memcached server holds for itself: the count of missed writes it was
    /// last emptied for. Only the memcached store uses it.
    pub fn emptied_for(&self) -> StoreKey {
        StoreKey(format!("{}:i", self.ns))
    }

    /// Recovers a fragment's keys from its envelope key's text, as carried in messages
    /// from other programs. `None` unless it has exactly the shape this keyspace builds.
    pub fn parse_envelope_key(&self, text: &str) -> Option<FragmentKeys> {
        let rest = text.strip_prefix(&self.ns)?.strip_prefix(":f:")?;
        let mut parts = rest.split(':');
        let (route, generation, digest) = (parts.next()?, parts.next()?, parts.next()?);
        let valid = parts.next().is_none()
            && crate::config::is_route_name(route)
            && generation.parse::<u64>().is_ok()
            && digest.len() == DIGEST_HEX
            && digest
                .bytes()
                .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase());
        valid.then(|| FragmentKeys {
            envelope: StoreKey(text.to_string()),
            kind_at: self.ns.len(),
        })
    }

    /// Where the purge record of `tag` is kept: purges of several tags at once recorded
    /// under it ([`crate::tags::Record`]).
    pub fn tag_record(&self, tag: &Tag) -> StoreKey {
        StoreKey(format!("{}:j:{tag}", self.ns))
    }

    /// Where the last soft purge of `route` is kept (Unix ms): what rendered before it
    /// is stale. `route` must be a configured route name.
    pub fn route_soft(&self, route: &str) -> StoreKey {
        StoreKey(format!("{}:s:{route}", self.ns))
    }
}

/// Hex characters of the identity digest (128 bits).
pub const DIGEST_HEX: usize = 32;

/// What identifies a fragment within a generation of its route.
#[derive(Debug, Clone, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub struct Identity {
    /// The route name.
    pub route: String,
    /// Allow-listed params, sorted by name; repeated values keep their request order.
    pub params: Vec<(String, String)>,
    /// `(spec, value)` for each of the route's vary sources that the request carried,
    /// in the route's order; e.g. `("cookie:session_id", "abc")`.
    pub vary: Vec<(String, String)>,
}

/// Why a fragment request cannot be mapped to an identity. Always the client's fault.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdentityError {
    /// The query string is longer than [`MAX_QUERY`].
    #[error("query string is {0} bytes; at most {MAX_QUERY} are accepted")]
    QueryTooLong(usize),
    /// A value is longer than [`MAX_VALUE`].
    #[error("value of {0:?} is longer than {MAX_VALUE} bytes")]
    ValueTooLong(String),
    /// A param repeats more than [`MAX_REPEATS`] times.
    #[error("parameter {0:?} is repeated more than {MAX_REPEATS} times")]
    TooManyValues(String),
    /// A param or vary source the route does not list (in a message).
    #[error("{0:?} is not on the route's allow-list")]
    NotAllowed(String),
    /// Percent-decoding produced invalid UTF-8 or a control character.
    #[error(
        "value of {0:?} is not valid text (bad percent-encoding, invalid UTF-8 or control characters)"
    )]
    BadValue(String),
}

impl Identity {
    /// The identity of a request for `route` with `query` and `headers`.
    ///
    /// Params not on the route's allow-list are dropped; vary values are read from the
    /// named headers and cookies. Nothing from the request is trusted beyond that.
    pub fn from_request(
        route: &FragmentRoute,
        query: Option<&str>,
        headers: &HeaderMap,
    ) -> Result<Identity, IdentityError> {
        Ok(Identity {
            route: route.name.clone(),
            params: allowed_params(route, query.unwrap_or(""))?,
            vary: vary_values(route, headers)?,
        })
    }

    /// Checks an identity that arrived in a message (possibly from another program)
    /// against its route: only allow-listed params and the route's vary sources, with
    /// values a request could have produced.
    pub fn check(&self, route: &FragmentRoute) -> Result<(), IdentityError> {
        for (name, value) in &self.params {
            if !route.params.contains(name) {
                return Err(IdentityError::NotAllowed(name.clone()));
            }
            check_value(name, value)?;
            if self.params.iter().filter(|(n, _)| n == name).count() > MAX_REPEATS {
                return Err(IdentityError::TooManyValues(name.clone()));
            }
        }
        for (spec, value) in &self.vary {
            if !route.vary.iter().any(|v| v.spec() == *spec) {
                return Err(IdentityError::NotAllowed(spec.clone()));
            }
            check_value(spec, value)?;
        }
        Ok(())
    }

    /// Puts params and vary values in the order the gateway derives them in (params by
    /// name, repeated values in their order; vary values in the route's order), so a
    /// request from another program maps to the same key.
    pub fn canonicalize(&mut self, route: &FragmentRoute) {
        self.params.sort_by(|a, b| a.0.cmp(&b.0));
        self.vary
            .sort_by_key(|(spec, _)| route.vary.iter().position(|v| v.spec() == *spec));
    }

    /// The canonical text form: equal identities, equal text; different, different.
    /// Each part is percent-encoded, so the separators cannot occur inside a part.
    pub fn canonical(&self) -> String {
        let mut out = String::new();
        // Writing to a String cannot fail.
        let _ = self.write_canonical(&mut out);
        out
    }

    /// Writes the canonical form without building it in memory first.
    fn write_canonical(&self, w: &mut impl std::fmt::Write) -> std::fmt::Result {
        fn component(s: &str) -> percent_encoding::PercentEncode<'_> {
            utf8_percent_encode(s, COMPONENT)
        }
        writeln!(w, "{}", component(&self.route))?;
        for (i, (k, v)) in self.params.iter().enumerate() {
            let amp = if i == 0 { "" } else { "&" };
            write!(w, "{amp}{}={}", component(k), component(v))?;
        }
        w.write_char('\n')?;
        for (i, (k, v)) in self.vary.iter().enumerate() {
            let amp = if i == 0 { "" } else { "&" };
            write!(w, "{amp}{}={}", component(k), component(v))?;
        }
        Ok(())
    }

    /// Fixed-length digest of the canonical form.
    pub fn digest(&self) -> String {
        let mut digest = String::with_capacity(DIGEST_HEX);
        self.push_digest(&mut digest);
        digest
    }

    /// Appends [`Identity::digest`] to `out`: the canonical form is written out whole and
    /// hashed in one call, which costs less than feeding the hasher piece by piece.
    fn push_digest(&self, out: &mut String) {
        const HEX: &[u8; 16] = b"0123456789abcdef";
        let mut canonical = String::with_capacity(128);
        let _ = self.write_canonical(&mut canonical);
        let hash = blake3::hash(canonical.as_bytes());
        for b in &hash.as_bytes()[..DIGEST_HEX / 2] {
            out.push(char::from(HEX[usize::from(b >> 4)]));
            out.push(char::from(HEX[usize::from(b & 0xf)]));
        }
    }

    /// The params as a query string for the upstream render (canonical order).
    pub fn query_string(&self) -> String {
        self.params
            .iter()
            .map(|(k, v)| format!("{}={}", encode(k), encode(v)))
            .collect::<Vec<_>>()
            .join("&")
    }
}

fn check_value(name: &str, value: &str) -> Result<(), IdentityError> {
    if value.len() > MAX_VALUE {
        return Err(IdentityError::ValueTooLong(name.to_string()));
    }
    if value.chars().any(char::is_control) {
        return Err(IdentityError::BadValue(name.to_string()));
    }
    Ok(())
}

/// Whether `value` is a param value a request could have produced: decoded text of at
/// most [`MAX_VALUE`] bytes without control characters.
pub fn is_param_value(value: &str) -> bool {
    check_value("", value).is_ok()
}

/// Whether `value` is a value of `source` a request could have produced: at most
/// [`MAX_VALUE`] bytes of printable ASCII (what a header value reads as text), and for a
/// cookie without `;`, which would end it, and without the spaces around it that the
/// cookie's parsing trims.
pub fn is_vary_value(source: &VarySource, value: &str) -> bool {
    let printable = value.len() <= MAX_VALUE && value.bytes().all(|b| (b' '..=b'~').contains(&b));
    match source {
        VarySource::Header(_) => printable,
        VarySource::Cookie(_) => printable && !value.contains(';') && value.trim() == value,
    }
}

fn decode(raw: &str, name_for_errors: &str) -> Result<String, IdentityError> {
    let spaced = raw.replace('+', " ");
    let text = percent_decode_str(&spaced)
        .decode_utf8()
        .map_err(|_| IdentityError::BadValue(name_for_errors.to_string()))?;
    if text.chars().any(char::is_control) {
        return Err(IdentityError::BadValue(name_for_errors.to_string()));
    }
    Ok(text.into_owned())
}

fn allowed_params(
    route: &FragmentRoute,
    query: &str,
) -> Result<Vec<(String, String)>, IdentityError> {
    if query.len() > MAX_QUERY {
        return Err(IdentityError::QueryTooLong(query.len()));
    }
    let mut out: Vec<(String, String)> = Vec::new();
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (raw_name, raw_value) = pair.split_once('=').unwrap_or((pair, ""));
        // Names on the allow-list are plain ASCII, so a name that fails to decode cannot
        // be one of them: drop it like any other unknown param.
        let Ok(name) = decode(raw_name, "?") else {
            continue;
        };
        let Some(allowed) = route.params.iter().find(|p| **p == name) else {
            continue;
        };
        let value = decode(raw_value, allowed)?;
        if value.len() > MAX_VALUE {
            return Err(IdentityError::ValueTooLong(allowed.clone()));
        }
        if out.iter().filter(|(n, _)| n == allowed).count() >= MAX_REPEATS {
            return Err(IdentityError::TooManyValues(allowed.clone()));
        }
        out.push((allowed.clone(), value));
    }
    // Stable: repeated values of one name keep their order (`tag=b&tag=a` differs from
    // `tag=a&tag=b`), while different names are put in canonical order.
    out.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(out)
}

fn vary_values(
    route: &FragmentRoute,
    headers: &HeaderMap,
) -> Result<Vec<(String, String)>, IdentityError> {
    let mut out = Vec::new();
    for source in &route.vary {
        let spec = source.spec();
        let value = match source {
            VarySource::Header(name) => {
                let values: Vec<&str> = headers
                    .get_all(name.as_str())
                    .iter()
                    .map(|v| {
                        v.to_str()
                            .map_err(|_| IdentityError::BadValue(spec.clone()))
                    })
                    .collect::<Result<_, _>>()?;
                (!values.is_empty()).then(|| values.join(", "))
            }
            VarySource::Cookie(name) => cookie(headers, name),
        };
        if let Some(value) = value {
            if value.len() > MAX_VALUE {
                return Err(IdentityError::ValueTooLong(spec));
            }
            if value.chars().any(char::is_control) {
                return Err(IdentityError::BadValue(spec));
            }
            out.push((spec, value));
        }
    }
    Ok(out)
}

/// The value of cookie `name` in the request's `Cookie` headers (first occurrence).
pub fn cookie(headers: &HeaderMap, name: &str) -> Option<String> {
    headers
        .get_all(http::header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v.trim().to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    fn route() -> FragmentRoute {
        let mut r = FragmentRoute::new("recs", "/_render/recs");
        r.params = vec!["user_id".into(), "limit".into()];
        r
    }

    fn id(route: &FragmentRoute, q: &str) -> Identity {
        Identity::from_request(route, Some(q), &HeaderMap::new()).unwrap()
    }

    #[test]
    fn canonical_form_and_digest_are_stable() {
        // Changing either orphans every cached fragment of every deployment: only do it
        // together with a namespace change, on purpose.
        let id = Identity {
            route: "recs".into(),
            params: vec![("limit".into(), "5".into()), ("q".into(), "a b&c".into())],
            vary: vec![("cookie:sid".into(), "x y".into())],
        };
        assert_eq!(
            id.canonical(),
            "recs\nlimit=5&q=a%20b%26c\ncookie%3Asid=x%20y"
        );
        let expected = blake3::hash(id.canonical().as_bytes()).to_hex();
        assert_eq!(id.digest(), &expected[..DIGEST_HEX]);
        assert_eq!(id.digest(), "f0cfb3fa2aaf08d3ffc6a37bda83096e");
    }

    #[test]
    fn param_order_does_not_matter() {
        let r = route();
        assert_eq!(id(&r, "user_id=1&limit=5"), id(&r, "limit=5&user_id=1"));
        assert_eq!(
            id(&r, "limit=5&user_id=1").query_string(),
            "limit=5&user_id=1"
        );
    }

    #[test]
    fn only_allow_listed_params_count() {
        let r = route();
        let a = id(&r, "user_id=1&utm_source=x&_=1234");
        assert_eq!(a, id(&r, "user_id=1"));
        assert_eq!(a.params, vec![("user_id".to_string(), "1".to_string())]);
        assert_ne!(id(&r, "user_id=1"), id(&r, "user_id=2"));
    }

    #[test]
    fn encoding_variants_are_one_identity() {
        let r = route();
        assert_eq!(id(&r, "user_id=a+b"), id(&r, "user_id=a%20b"));
        assert_eq!(id(&r, "user_id=%C3%A9"), id(&r, "user_id=é"));
    }

    #[test]
    fn repeated_values_keep_their_order() {
        let r = route();
        assert_ne!(id(&r, "limit=1&limit=2"), id(&r, "limit=2&limit=1"));
    }

    #[test]
    fn separators_inside_values_cannot_collide() {
        let r = route();
        assert_ne!(
            id(&r, "user_id=1%26limit%3D2").digest(),
            id(&r, "user_id=1&limit=2").digest()
        );
    }

    #[test]
    fn hostile_bytes_are_refused() {
        let r = route();
        for q in [
            "user_id=%0d%0aset x",
            "user_id=%ff",
            "user_id=%00",
            "user_id=a%7fb",
        ] {
            let e = Identity::from_request(&r, Some(q), &HeaderMap::new()).unwrap_err();
            assert!(matches!(e, IdentityError::BadValue(_)), "{q}: {e}");
        }
        // Unknown params are ignored whatever they hold.
        assert!(Identity::from_request(&r, Some("junk=%ff"), &HeaderMap::new()).is_ok());
    }

    #[test]
    fn limits_are_enforced() {
        let r = route();
        let long = "x".repeat(MAX_QUERY + 1);
        assert_eq!(
            Identity::from_request(&r, Some(&long), &HeaderMap::new()),
            Err(IdentityError::QueryTooLong(MAX_QUERY + 1))
        );
        let big = format!("user_id={}", "a".repeat(MAX_VALUE + 1));
        assert!(matches!(
            Identity::from_request(&r, Some(&big), &HeaderMap::new()),
            Err(IdentityError::ValueTooLong(_))
        ));
        let many = vec!["limit=1"; MAX_REPEATS + 1].join("&");
        assert!(matches!(
            Identity::from_request(&r, Some(&many), &HeaderMap::new()),
            Err(IdentityError::TooManyValues(_))
        ));
    }

    #[test]
    fn keys_are_short_fixed_and_clean() {
        let ks = Keyspace::new("tessera");
        let long_name = "r".repeat(crate::config::MAX_ROUTE_NAME);
        let mut r = FragmentRoute::new(long_name, "/x");
        r.params = vec!["q".into()];
        let q = format!("q={}", "%E2%9C%93".repeat(300));
        let identity = Identity::from_request(&r, Some(&q), &HeaderMap::new()).unwrap();
        let keys = ks.fragment(&identity, u64::MAX);
        for k in [&keys.envelope, &keys.lease(), &ks.generation(&r.name)] {
            assert!(k.as_str().len() <= 250, "{k}");
            assert!(k.as_str().bytes().all(|b| b.is_ascii_graphic()), "{k}");
        }
        let other = ks.fragment(&id(&r, "q=1"), u64::MAX);
        assert_eq!(other.envelope.as_str().len(), keys.envelope.as_str().len());
        assert_eq!(
            ks.parse_envelope_key(keys.envelope.as_str()),
            Some(keys.clone())
        );
    }

    #[test]
    fn generation_changes_keys() {
        let ks = Keyspace::new("t");
        let i = id(&route(), "user_id=1");
        assert_ne!(ks.fragment(&i, 1).envelope, ks.fragment(&i, 2).envelope);
        assert!(
            ks.fragment(&i, 7)
                .envelope
                .as_str()
                .starts_with("t:f:recs:7:")
        );
        assert!(
            ks.fragment(&i, 7)
                .lease()
                .as_str()
                .starts_with("t:p:recs:7:")
        );
        assert_eq!(ks.generation("recs").as_str(), "t:g:recs");
        assert_eq!(ks.render_slot("recs", 2).as_str(), "t:c:recs:2");
        assert_eq!(
            ks.render_window("recs", 1_765_000_000).as_str(),
            "t:w:recs:1765000000"
        );
        assert_eq!(ks.fragment(&i, 7).route(), "recs");
        // A namespace may contain the separator; the route is still found.
        assert_eq!(Keyspace::new("a:b").fragment(&i, 7).route(), "recs");
    }

    #[test]
    fn parse_envelope_key_refuses_foreign_shapes() {
        let ks = Keyspace::new("t");
        let digest = "0".repeat(DIGEST_HEX);
        let parsed = ks
            .parse_envelope_key(&format!("t:f:recs:1:{digest}"))
            .unwrap();
        assert_eq!(parsed.route(), "recs");
        assert_eq!(parsed.lease().as_str(), format!("t:p:recs:1:{digest}"));
        for bad in [
            format!("u:f:recs:1:{digest}"),
            format!("t:p:recs:1:{digest}"),
            format!("t:f:recs:x:{digest}"),
            format!("t:f:recs:1:{digest}0"),
            format!("t:f:re cs:1:{digest}"),
            format!("t:f:recs:1:{digest}\r\nflush_all"),
        ] {
            assert!(ks.parse_envelope_key(&bad).is_none(), "{bad:?}");
        }
    }

    #[test]
    fn identities_from_messages_are_checked_against_the_route() {
        let mut r = route();
        r.vary = vec!["cookie:sid".parse().unwrap()];
        let ok = Identity {
            route: "recs".into(),
            params: vec![("limit".into(), "5".into())],
            vary: vec![("cookie:sid".into(), "abc".into())],
        };
        assert_eq!(ok.check(&r), Ok(()));
        let mut bad = ok.clone();
        bad.params.push(("admin".into(), "1".into()));
        assert_eq!(
            bad.check(&r),
            Err(IdentityError::NotAllowed("admin".into()))
        );
        let mut bad = ok.clone();
        bad.vary = vec![("header:authorization".into(), "x".into())];
        assert!(matches!(bad.check(&r), Err(IdentityError::NotAllowed(_))));
        let mut bad = ok.clone();
        bad.params[0].1 = "5\r\nX: y".into();
        assert!(matches!(bad.check(&r), Err(IdentityError::BadValue(_))));
        let mut bad = ok;
        bad.params = vec![("limit".into(), "1".into()); MAX_REPEATS + 1];
        assert!(matches!(
            bad.check(&r),
            Err(IdentityError::TooManyValues(_))
        ));
    }

    #[test]
    fn identities_from_other_programs_are_put_in_canonical_order() {
        let mut r = route();
        r.vary = vec![
            "header:accept-language".parse().unwrap(),
            "cookie:sid".parse().unwrap(),
        ];
        let mut h = HeaderMap::new();
        h.insert("cookie", HeaderValue::from_static("sid=abc"));
        h.insert("accept-language", HeaderValue::from_static("de"));
        let from_gateway = Identity::from_request(&r, Some("user_id=7&limit=5"), &h).unwrap();
        let mut from_elsewhere = Identity {
            route: "recs".into(),
            params: vec![("user_id".into(), "7".into()), ("limit".into(), "5".into())],
            vary: vec![
                ("cookie:sid".into(), "abc".into()),
                ("header:accept-language".into(), "de".into()),
            ],
        };
        from_elsewhere.canonicalize(&r);
        assert_eq!(from_elsewhere, from_gateway);
    }

    fn vary_route() -> FragmentRoute {
        let mut r = route();
        r.vary = vec![
            "cookie:sid".parse().unwrap(),
            "header:accept-language".parse().unwrap(),
        ];
        r
    }

    fn header(name: &'static str, value: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(name, HeaderValue::from_str(value).unwrap());
        h
    }

    #[test]
    fn request_limits_hold_exactly_at_the_limit() {
        let r = route();
        let q = format!("user_id={}", "a".repeat(MAX_QUERY - "user_id=".len()));
        assert_eq!(q.len(), MAX_QUERY);
        assert!(matches!(
            Identity::from_request(&r, Some(&q), &HeaderMap::new()),
            Err(IdentityError::ValueTooLong(_))
        ));
        let q = format!("junk={}", "a".repeat(MAX_QUERY - "junk=".len()));
        assert!(Identity::from_request(&r, Some(&q), &HeaderMap::new()).is_ok());

        let at = format!("user_id={}", "a".repeat(MAX_VALUE));
        assert_eq!(id(&r, &at).params[0].1.len(), MAX_VALUE);
        let past = format!("user_id={}", "a".repeat(MAX_VALUE + 1));
        assert_eq!(
            Identity::from_request(&r, Some(&past), &HeaderMap::new()),
            Err(IdentityError::ValueTooLong("user_id".into()))
        );

        let repeats = vec!["limit=1"; MAX_REPEATS].join("&");
        assert_eq!(id(&r, &repeats).params.len(), MAX_REPEATS);
        let too_many = vec!["limit=1"; MAX_REPEATS + 1].join("&");
        assert_eq!(
            Identity::from_request(&r, Some(&too_many), &HeaderMap::new()),
            Err(IdentityError::TooManyValues("limit".into()))
        );
        // Another param's values do not count towards the limit.
        let mixed = format!("{repeats}&user_id=1");
        assert_eq!(id(&r, &mixed).params.len(), MAX_REPEATS + 1);
    }

    #[test]
    fn vary_values_are_limited_like_params() {
        let r = vary_route();
        for (name, at, past) in [
            (
                "cookie",
                format!("sid={}", "v".repeat(MAX_VALUE)),
                format!("sid={}", "v".repeat(MAX_VALUE + 1)),
            ),
            (
                "accept-language",
                "v".repeat(MAX_VALUE),
                "v".repeat(MAX_VALUE + 1),
            ),
        ] {
            let ok = Identity::from_request(&r, None, &header(name, &at)).unwrap();
            assert_eq!(ok.vary[0].1.len(), MAX_VALUE, "{name}");
            let spec = if name == "cookie" {
                "cookie:sid"
            } else {
                "header:accept-language"
            };
            assert_eq!(
                Identity::from_request(&r, None, &header(name, &past)),
                Err(IdentityError::ValueTooLong(spec.into())),
                "{name}"
            );
        }
    }

    #[test]
    fn hostile_vary_values_are_refused() {
        let r = vary_route();
        assert_eq!(
            Identity::from_request(&r, None, &header("accept-language", "de\tfr")),
            Err(IdentityError::BadValue("header:accept-language".into()))
        );
        assert_eq!(
            Identity::from_request(&r, None, &header("cookie", "sid=a\tb")),
            Err(IdentityError::BadValue("cookie:sid".into()))
        );
        let mut h = HeaderMap::new();
        h.insert(
            "accept-language",
            HeaderValue::from_bytes(b"d\xffe").unwrap(),
        );
        assert_eq!(
            Identity::from_request(&r, None, &h),
            Err(IdentityError::BadValue("header:accept-language".into()))
        );
    }

    #[test]
    fn repeated_vary_headers_are_joined_in_order() {
        let r = vary_route();
        let mut h = HeaderMap::new();
        h.append("accept-language", HeaderValue::from_static("de"));
        h.append("accept-language", HeaderValue::from_static("fr"));
        let i = Identity::from_request(&r, None, &h).unwrap();
        assert_eq!(
            i.vary,
            vec![("header:accept-language".to_string(), "de, fr".to_string())]
        );
    }

    #[test]
    fn cookies_are_found_by_their_exact_name() {
        let mut h = HeaderMap::new();
        h.append("cookie", HeaderValue::from_static("xsid=1;sid_x=2"));
        h.append("cookie", HeaderValue::from_static("a=b;  sid= 3 ; sid=4"));
        assert_eq!(
            cookie(&h, "sid").as_deref(),
            Some("3"),
            "the first, trimmed"
        );
        assert_eq!(cookie(&h, "a").as_deref(), Some("b"));
        assert_eq!(cookie(&h, "xsid").as_deref(), Some("1"));
        assert_eq!(cookie(&h, "nope"), None);
        assert_eq!(cookie(&HeaderMap::new(), "sid"), None);
    }

    #[test]
    fn message_limits_hold_exactly_at_the_limit() {
        let r = vary_route();
        let with = |params: Vec<(String, String)>, vary: Vec<(String, String)>| Identity {
            route: "recs".into(),
            params,
            vary,
        };
        let value = |n: usize| "v".repeat(n);
        let p = |v: String| vec![("user_id".to_string(), v)];
        let v = |v: String| vec![("cookie:sid".to_string(), v)];
        assert_eq!(with(p(value(MAX_VALUE)), vec![]).check(&r), Ok(()));
        assert_eq!(
            with(p(value(MAX_VALUE + 1)), vec![]).check(&r),
            Err(IdentityError::ValueTooLong("user_id".into()))
        );
        assert_eq!(with(vec![], v(value(MAX_VALUE))).check(&r), Ok(()));
        assert_eq!(
            with(vec![], v(value(MAX_VALUE + 1))).check(&r),
            Err(IdentityError::ValueTooLong("cookie:sid".into()))
        );
        assert_eq!(
            with(vec![], v("a\nb".into())).check(&r),
            Err(IdentityError::BadValue("cookie:sid".into()))
        );
        let repeated = vec![("limit".to_string(), "1".to_string()); MAX_REPEATS];
        assert_eq!(with(repeated.clone(), vec![]).check(&r), Ok(()));
        let mut mixed = repeated;
        mixed.push(("user_id".into(), "1".into()));
        assert_eq!(with(mixed, vec![]).check(&r), Ok(()));
    }

    #[test]
    fn parse_envelope_key_refuses_what_the_keyspace_never_builds() {
        let ks = Keyspace::new("t");
        let digest = "0123456789abcdef0123456789abcdef";
        let key = |route: &str, generation: &str, digest: &str| {
            format!("t:f:{route}:{generation}:{digest}")
        };
        let max_route = "r".repeat(crate::config::MAX_ROUTE_NAME);
        for good in [
            key("recs", "0", digest),
            key(&max_route, "1", digest),
            key("a-b_9", &u64::MAX.to_string(), digest),
        ] {
            assert!(ks.parse_envelope_key(&good).is_some(), "{good:?}");
        }
        let long_route = "r".repeat(crate::config::MAX_ROUTE_NAME + 1);
        for bad in [
            key("recs", "1", &digest.to_uppercase()),
            key("recs", "1", &digest.replace('a', "g")),
            key("recs", "1", &digest[1..]),
            key("", "1", digest),
            key(&long_route, "1", digest),
            key("Recs", "1", digest),
            key("re.cs", "1", digest),
            key("recs", "18446744073709551616", digest),
            key("recs", "-1", digest),
            "t:f:recs:1".to_string(),
            format!("t:f:recs:1:{digest}:x"),
            "t:f:recs".to_string(),
            format!("tt:f:recs:1:{digest}"),
        ] {
            assert!(ks.parse_envelope_key(&bad).is_none(), "{bad:?}");
        }
    }

    #[test]
    fn upstream_query_is_percent_encoded() {
        let mut r = route();
        r.params = vec!["q".into(), "a.b".into()];
        let i = id(&r, "q=a+b%26c%3Dd%2F%C3%A9~-_.&a.b=1");
        assert_eq!(i.query_string(), "a.b=1&q=a%20b%26c%3Dd%2F%C3%A9~-_.");
        assert_eq!(encode("x y/z"), "x%20y%2Fz");
        assert_eq!(id(&route(), "").query_string(), "");
    }

    #[test]
    fn store_keys_display_as_sent() {
        let ks = Keyspace::new("t");
        let k = ks.generation("recs");
        assert_eq!(k.to_string(), "t:g:recs");
        assert_eq!(k.to_string(), k.as_str());
    }

    #[test]
    fn vary_reads_headers_and_single_cookies() {
        let mut r = route();
        r.vary = vec![
            "cookie:session_id".parse().unwrap(),
            "header:accept-language".parse().unwrap(),
        ];
        let mut h = HeaderMap::new();
        h.insert(
            "cookie",
            HeaderValue::from_static("theme=dark; session_id=abc"),
        );
        h.insert("accept-language", HeaderValue::from_static("de"));
        let a = Identity::from_request(&r, None, &h).unwrap();
        assert_eq!(
            a.vary,
            vec![
                ("cookie:session_id".to_string(), "abc".to_string()),
                ("header:accept-language".to_string(), "de".to_string())
            ]
        );
        h.insert(
            "cookie",
            HeaderValue::from_static("theme=light; session_id=abc"),
        );
        assert_eq!(
            Identity::from_request(&r, None, &h).unwrap(),
            a,
            "other cookies are ignored"
        );
        h.insert("cookie", HeaderValue::from_static("session_id=xyz"));
        assert_ne!(
            Identity::from_request(&r, None, &h).unwrap().digest(),
            a.digest()
        );
        // Absent and empty differ.
        let none = Identity::from_request(&r, None, &HeaderMap::new()).unwrap();
        h.insert("cookie", HeaderValue::from_static("session_id="));
        h.remove("accept-language");
        assert_ne!(Identity::from_request(&r, None, &h).unwrap(), none);
    }
}
