//! Properties of what crosses a process boundary, on generated input: key derivation,
//! envelope and message decoding, and config parsing never panic on anything a client,
//! another program or an operator can hand them; what is encoded decodes to itself; and a
//! store key never carries raw client bytes.

use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, HeaderValue};
use proptest::prelude::*;
use tessera_protocol::config::{ConfigError, VarySource};
use tessera_protocol::envelope::Status;
use tessera_protocol::key::encode;
use tessera_protocol::message::Purge;
use tessera_protocol::{
    BuildRequest, Config, Envelope, Event, FragmentRoute, Identity, Keyspace, StoreKey,
};

const CASES: u32 = 256;

// ---------------------------------------------------------------- keys

fn route() -> FragmentRoute {
    let mut r = FragmentRoute::new("recs", "/_render/recs");
    r.params = vec!["user_id".into(), "limit".into(), "q".into()];
    r.vary = vec![
        VarySource::Cookie("sid".into()),
        VarySource::Header("accept-language".into()),
    ];
    r
}

/// Characters a hostile client likes: separators of keys, lines and protocols.
const NASTY: &str = " \r\n\t:;&=%+?#/\\\"'<>\u{0}\u{7f}\u{e9}\u{2028}";

/// A client value: printable text with some of [`NASTY`] mixed in.
fn client_value() -> impl Strategy<Value = String> {
    let nasty: Vec<char> = NASTY.chars().collect();
    proptest::collection::vec(
        prop_oneof![
            3 => proptest::char::range(' ', '~'),
            1 => proptest::sample::select(nasty),
            1 => any::<char>(),
        ],
        0..40,
    )
    .prop_map(|cs| cs.into_iter().collect())
}

/// A query string as a client may send it: allow-listed and other names, values raw or
/// percent-encoded, separators anywhere.
fn query() -> impl Strategy<Value = String> {
    let name = prop_oneof![
        Just("user_id".to_string()),
        Just("limit".to_string()),
        Just("q".to_string()),
        "[a-z_%0-9]{0,8}",
    ];
    let value = prop_oneof![client_value(), client_value().prop_map(|v| encode(&v))];
    proptest::collection::vec((name, value), 0..8).prop_map(|pairs| {
        pairs
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
            .join("&")
    })
}

fn headers(cookie: &[u8], language: &[u8]) -> HeaderMap {
    let mut h = HeaderMap::new();
    // A header value cannot hold CR, LF or NUL on the wire: those are refused here as
    // hyper refuses them, the rest reaches the gateway as sent.
    if let Ok(v) = HeaderValue::from_bytes(cookie) {
        h.insert(http::header::COOKIE, v);
    }
    if let Ok(v) = HeaderValue::from_bytes(language) {
        h.insert(http::header::ACCEPT_LANGUAGE, v);
    }
    h
}

/// Every store key: short, printable ASCII, no spaces, and exactly the parts the keyspace
/// puts in (namespace, kind, route, generation, hex digest): no client byte in between.
fn assert_safe_key(key: &StoreKey, generation: u64) -> Result<(), TestCaseError> {
    let k = key.as_str();
    prop_assert!(k.len() <= 250, "{k:?} is longer than memcached allows");
    prop_assert!(k.bytes().all(|b| b.is_ascii_graphic()), "{k:?}");
    let parts: Vec<&str> = k.split(':').collect();
    prop_assert_eq!(parts.len(), 5, "{:?}", k);
    prop_assert_eq!(
        &parts[..4],
        &["tessera", "f", "recs", &generation.to_string()]
    );
    prop_assert_eq!(parts[4].len(), 32);
    prop_assert!(
        parts[4]
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    );
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(CASES))]

    #[test]
    fn any_request_gives_a_safe_key_or_a_client_error(
        q in prop_oneof![query(), any::<String>()],
        cookie in proptest::collection::vec(any::<u8>(), 0..64),
        language in proptest::collection::vec(any::<u8>(), 0..64),
        generation in any::<u64>(),
    ) {
        let r = route();
        let h = headers(&cookie, &language);
        let ks = Keyspace::new("tessera");
        if let Ok(id) = Identity::from_request(&r, Some(&q), &h) {
            let key = ks.fragment(&id, generation).envelope;
            assert_safe_key(&key, generation)?;
            // The same request, derived again: the same key.
            let again = Identity::from_request(&r, Some(&q), &h).unwrap();
            prop_assert_eq!(&ks.fragment(&again, generation).envelope, &key);
            // Another program's message naming this key maps to the same fragment.
            let parsed = ks.parse_envelope_key(key.as_str()).unwrap();
            prop_assert_eq!(parsed.envelope, key);
            prop_assert!(id.check(&r).is_ok());
        }
    }

    #[test]
    fn client_separators_never_reach_the_key(
        user in client_value(),
        cookie in "[ -~]{0,30}",
        language in "[ -~]{0,30}",
    ) {
        let r = route();
        let q = format!("user_id={}&limit={}", encode(&user), encode(&format!("{user} :\r\n")));
        let h = headers(format!("sid={cookie}").as_bytes(), language.as_bytes());
        if let Ok(id) = Identity::from_request(&r, Some(&q), &h) {
            let key = Keyspace::new("tessera").fragment(&id, 1).envelope;
            assert_safe_key(&key, 1)?;
            prop_assert!(!key.as_str().contains([' ', '\r', '\n', '\t', ';', '=']));
        }
    }

    #[test]
    fn param_order_does_not_change_the_key(a in client_value(), b in client_value()) {
        let r = route();
        let h = HeaderMap::new();
        let one = format!("user_id={}&limit={}", encode(&a), encode(&b));
        let two = format!("limit={}&user_id={}&other=1", encode(&b), encode(&a));
        let ks = Keyspace::new("tessera");
        match (Identity::from_request(&r, Some(&one), &h), Identity::from_request(&r, Some(&two), &h)) {
            (Ok(x), Ok(y)) => prop_assert_eq!(ks.fragment(&x, 0), ks.fragment(&y, 0)),
            // Which bad value is reported first follows the query's order.
            (Err(_), Err(_)) => {}
            (x, y) => prop_assert!(false, "{:?} vs {:?}", x, y),
        }
    }

    /// A push stream looks each fragment up once, by its canonical source: the route
    /// and `Identity::query_string`. That form must name the same fragment as every
    /// source it stands for (re-read, it is itself), and junk params a client adds, in
    /// any place, must not make another one.
    #[test]
    fn a_canonical_source_names_the_same_fragment_whatever_junk_is_added(
        q in query(),
        junk in proptest::collection::vec(("[a-z_]{1,8}", client_value()), 0..6),
        at in any::<prop::sample::Index>(),
    ) {
        let r = route();
        let h = HeaderMap::new();
        let ks = Keyspace::new("tessera");
        let Ok(id) = Identity::from_request(&r, Some(&q), &h) else {
            return Ok(());
        };
        let canonical = id.query_string();
        let again = Identity::from_request(&r, Some(&canonical), &h);
        prop_assert!(again.is_ok(), "{:?} from {:?}", canonical, q);
        let again = again.unwrap();
        prop_assert_eq!(ks.fragment(&again, 0), ks.fragment(&id, 0));
        prop_assert_eq!(again.query_string(), canonical.clone());

        let mut pairs: Vec<String> = q.split('&').filter(|p| !p.is_empty()).map(String::from).collect();
        for (name, value) in junk {
            if r.params.contains(&name) {
                continue;
            }
            let place = at.index(pairs.len() + 1);
            pairs.insert(place, format!("{name}={}", encode(&value)));
        }
        let noisy = pairs.join("&");
        let id = Identity::from_request(&r, Some(&noisy), &h);
        prop_assert!(id.is_ok(), "{:?}", noisy);
        prop_assert_eq!(id.unwrap().query_string(), canonical);
    }

    #[test]
    fn different_allow_listed_values_give_different_keys(
        a in client_value(),
        b in client_value(),
        c in "[!-~&&[^;]]{1,20}",
        d in "[!-~&&[^;]]{1,20}",
        la in "[ -~]{1,20}",
        lb in "[ -~]{1,20}",
    ) {
        let r = route();
        let ks = Keyspace::new("tessera");
        let key = |user: &str, cookie: &str, lang: &str| {
            let q = format!("user_id={}", encode(user));
            let h = headers(format!("sid={cookie}").as_bytes(), lang.as_bytes());
            Identity::from_request(&r, Some(&q), &h).map(|id| ks.fragment(&id, 3).envelope)
        };
        if let (Ok(x), Ok(y)) = (key(&a, &c, &la), key(&b, &c, &la)) {
            prop_assert_eq!(a == b, x == y, "params {:?} / {:?}", a, b);
        }
        if let (Ok(x), Ok(y)) = (key(&a, &c, &la), key(&a, &d, &la)) {
            prop_assert_eq!(c == d, x == y, "cookies {:?} / {:?}", c, d);
        }
        if let (Ok(x), Ok(y)) = (key(&a, &c, &la), key(&a, &c, &lb)) {
            prop_assert_eq!(la == lb, x == y, "headers {:?} / {:?}", la, lb);
        }
    }
}

// ---------------------------------------------------------------- envelope

fn envelope() -> impl Strategy<Value = Envelope> {
    (
        (any::<bool>(), any::<bool>()),
        proptest::collection::vec(any::<u8>(), 0..512),
        (any::<String>(), any::<String>()),
        (any::<u64>(), any::<u64>(), any::<u64>()),
        (any::<u32>(), any::<u32>()),
        proptest::option::of(any::<String>()),
        (
            proptest::collection::vec("[a-z0-9-]{1,16}", 0..4),
            any::<u64>(),
        ),
    )
        .prop_map(
            |(
                (ready, esi),
                body,
                (content_type, etag),
                (built_at, fresh_until, stale_until),
                (build_ms, attempts),
                error,
                (tags, render_started),
            )| {
                let e = Envelope {
                    status: if ready { Status::Ready } else { Status::Failed },
                    body: Bytes::from(body),
                    content_type,
                    etag,
                    built_at,
                    fresh_until,
                    stale_until,
                    build_ms,
                    attempts,
                    error,
                    esi,
                    tags: Vec::new(),
                    render_started: built_at,
                };
                e.with_tags(tags, render_started)
            },
        )
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(CASES))]

    #[test]
    fn envelope_round_trips(e in envelope()) {
        prop_assert_eq!(Envelope::decode(&e.encode().into()), Ok(e));
    }

    #[test]
    fn any_bytes_decode_to_an_envelope_or_an_error(
        bytes in prop_oneof![
            proptest::collection::vec(any::<u8>(), 0..256),
            // Past the header, where postcard reads lengths and variants.
            proptest::collection::vec(any::<u8>(), 0..256).prop_map(|b| [&[b'T', 1][..], &b].concat()),
            proptest::collection::vec(any::<u8>(), 0..256).prop_map(|b| [&[b'T', 3][..], &b].concat()),
        ]
    ) {
        if let Ok(e) = Envelope::decode(&bytes.clone().into()) {
            prop_assert_eq!(Envelope::decode(&e.encode().into()), Ok(e));
        }
    }

    #[test]
    fn a_cut_envelope_is_an_error_not_a_panic(e in envelope(), cut in any::<prop::sample::Index>()) {
        let bytes = e.encode();
        let at = cut.index(bytes.len());
        let _ = Envelope::decode(&Bytes::copy_from_slice(&bytes[..at]));
    }
}

// ---------------------------------------------------------------- messages

/// An id as the gateway makes them (request ids, trace ids).
const ID: &str = "[A-Za-z0-9_-]{1,64}";
/// A W3C `traceparent` (ids not all zero: one non-zero digit leads).
const TRACEPARENT: &str = "00-[1-9a-f][0-9a-f]{31}-[1-9a-f][0-9a-f]{15}-0[01]";
/// Text without control characters (a decoded param value, an error).
const TEXT: &str = "\\PC{0,40}";

/// Vary values as a request produces them: any printable ASCII for a header, no `;` and
/// no surrounding space for a cookie.
fn vary() -> impl Strategy<Value = Vec<(String, String)>> {
    (
        proptest::option::of("[ -~]{0,40}"),
        proptest::option::of("([!-:<-~][ -:<-~]{0,38})?[!-:<-~]"),
    )
        .prop_map(|(language, sid)| {
            let language = language.map(|v| ("header:accept-language".to_string(), v));
            let sid = sid.map(|v| ("cookie:sid".to_string(), v));
            language.into_iter().chain(sid).collect()
        })
}

/// Identities as a request (or a program following the rules) names them.
fn identity() -> impl Strategy<Value = Identity> {
    (
        "[a-z0-9_-]{1,64}",
        proptest::collection::vec(("[A-Za-z0-9_.\\[\\]-]{1,64}", TEXT), 0..4),
        vary(),
    )
        .prop_map(|(route, params, vary)| Identity {
            route,
            params,
            vary,
        })
}

fn build_request() -> impl Strategy<Value = BuildRequest> {
    (
        (
            ID,
            prop_oneof![Just(String::new()), "[A-Za-z0-9._:-]{1,250}"],
            prop_oneof![Just(String::new()), ID.prop_map(String::from)],
            proptest::option::of(TRACEPARENT),
        ),
        identity(),
        (any::<u64>(), 1..=u32::MAX, any::<u64>(), any::<u64>()),
    )
        .prop_map(
            |(
                (id, key, trace_id, traceparent),
                identity,
                (generation, attempt, requested_at, lease_deadline),
            )| {
                BuildRequest {
                    v: tessera_protocol::message::VERSION,
                    id,
                    key,
                    identity,
                    generation,
                    attempt,
                    requested_at,
                    lease_deadline,
                    trace_id,
                    traceparent,
                }
            },
        )
}

/// A key as the keyspace builds them.
const KEY: &str = "[A-Za-z0-9._:-]{1,250}";

fn event() -> impl Strategy<Value = Event> {
    prop_oneof![
        (KEY, "[!-~]{1,128}", proptest::option::of(any::<u64>())).prop_map(
            |(key, etag, build_ms)| Event::Built {
                key,
                etag,
                build_ms
            }
        ),
        (KEY, TEXT).prop_map(|(key, error)| Event::Failed { key, error }),
        ("[a-z0-9_-]{1,64}", any::<u64>(), any::<bool>()).prop_map(|(route, generation, soft)| {
            Event::Purged {
                purge: Purge::Route {
                    route,
                    generation,
                    soft,
                },
                id: None,
            }
        }),
        (
            "[A-Za-z0-9!#$%&'*+.^_`|~-]{1,128}",
            any::<u64>(),
            any::<bool>()
        )
            .prop_map(|(tag, purged_at, soft)| Event::Purged {
                purge: Purge::Tag {
                    tag,
                    purged_at,
                    soft
                },
                id: None,
            }),
        (KEY, proptest::option::of("[A-Za-z0-9_-]{1,64}")).prop_map(|(key, id)| Event::Purged {
            purge: Purge::Key { key },
            id
        }),
        (
            proptest::collection::btree_set("[A-Za-z0-9!#$%&'*+.^_`|~-]{1,128}", 2..32),
            any::<u64>()
        )
            .prop_map(|(tags, purged_at)| Event::Purged {
                purge: Purge::AllOf {
                    all_of: tags.into_iter().collect(),
                    purged_at
                },
                id: None
            }),
        ("[A-Za-z0-9_-]{1,64}", "[A-Za-z0-9_-]{1,64}")
            .prop_map(|(purge_id, gateway)| Event::PurgeApplied { purge_id, gateway }),
        "[A-Za-z0-9_-]{1,64}".prop_map(|gateway| Event::Heartbeat { gateway }),
    ]
}

/// Which field of a build request a hostile value goes in.
#[derive(Debug, Clone, Copy)]
enum Field {
    Traceparent,
    Id,
    Key,
    Route,
    ParamName,
    ParamValue,
    VaryValue,
    TraceId,
}

/// `value` with one character a log line, a header or a key must never carry (a line
/// break, NUL, a space, `;`) put in at `at`.
fn hostile(value: &str, at: prop::sample::Index, bad: char) -> String {
    let mut chars: Vec<char> = value.chars().collect();
    chars.insert(at.index(chars.len() + 1), bad);
    chars.into_iter().collect()
}

/// Any JSON value, a few levels deep.
fn json() -> impl Strategy<Value = serde_json::Value> {
    use serde_json::Value;
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        any::<f64>().prop_map(Value::from),
        any::<String>().prop_map(Value::String),
        proptest::sample::select(FIELDS).prop_map(|s| Value::String(s.to_string())),
    ];
    leaf.prop_recursive(3, 24, 6, |inner| {
        prop_oneof![
            proptest::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
            proptest::collection::vec((any::<String>(), inner), 0..6)
                .prop_map(|kv| Value::Object(kv.into_iter().collect())),
        ]
    })
}

/// Field names and tags of both messages: objects made of these reach the deep paths.
const FIELDS: &[&str] = &[
    "v",
    "id",
    "key",
    "route",
    "params",
    "vary",
    "generation",
    "attempt",
    "requested_at",
    "lease_deadline",
    "trace_id",
    "type",
    "built",
    "failed",
    "purged",
    "etag",
    "build_ms",
    "error",
];

/// Objects with the messages' field names and arbitrary values (`v` mostly right).
fn message_like() -> impl Strategy<Value = serde_json::Value> {
    (
        prop_oneof![3 => Just(serde_json::json!(1)), 1 => json()],
        proptest::collection::vec((proptest::sample::select(FIELDS), json()), 0..12),
    )
        .prop_map(|(v, fields)| {
            let mut map = serde_json::Map::new();
            map.insert("v".into(), v);
            for (k, value) in fields {
                map.insert(k.to_string(), value);
            }
            serde_json::Value::Object(map)
        })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(CASES))]

    #[test]
    fn build_request_round_trips(req in build_request()) {
        prop_assert_eq!(BuildRequest::decode(&req.encode()).unwrap(), req);
    }

    #[test]
    fn event_round_trips(e in event()) {
        prop_assert_eq!(Event::decode(&e.encode()).unwrap(), e);
    }

    #[test]
    fn any_bytes_decode_to_a_message_or_an_error(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
        let _ = BuildRequest::decode(&bytes);
        let _ = Event::decode(&bytes);
    }

    /// What the gateway derives from any request passes the decoder's checks: it never
    /// refuses the gateway's own build requests.
    #[test]
    fn the_gateway_s_own_identities_pass(
        q in prop_oneof![query(), any::<String>()],
        cookie in proptest::collection::vec(any::<u8>(), 0..64),
        language in proptest::collection::vec(any::<u8>(), 0..64),
        trace in ID,
    ) {
        let h = headers(&cookie, &language);
        if let Ok(identity) = Identity::from_request(&route(), Some(&q), &h) {
            let key = Keyspace::new("tessera").fragment(&identity, 1).envelope;
            let req = BuildRequest {
                v: tessera_protocol::message::VERSION,
                id: format!("{:016x}", 7u64),
                key: key.as_str().to_string(),
                identity,
                generation: 1,
                attempt: 1,
                requested_at: 0,
                lease_deadline: 0,
                trace_id: trace,
                traceparent: None,
            };
            prop_assert!(req.validate().is_ok(), "{:?}: {:?}", req, req.validate());
            prop_assert_eq!(BuildRequest::decode(&req.encode()).unwrap(), req);
        }
    }

    /// A control character, space or `;` in a field that must not hold one is refused,
    /// naming the field and never echoing the value.
    #[test]
    fn hostile_fields_are_refused_without_echoing_them(
        req in build_request(),
        field in prop::sample::select(vec![
            Field::Id, Field::Key, Field::Route, Field::ParamName, Field::ParamValue,
            Field::VaryValue, Field::TraceId, Field::Traceparent,
        ]),
        bad in prop::sample::select(vec!['\n', '\r', '\u{0}', '\u{1b}', '\u{85}']),
        at in any::<prop::sample::Index>(),
    ) {
        let mut req = req;
        let name = match field {
            Field::Id => { req.id = hostile(&req.id, at, bad); "id" }
            Field::Key => { req.key = hostile(&req.key, at, bad); "key" }
            Field::Route => { req.identity.route = hostile(&req.identity.route, at, bad); "route" }
            Field::ParamName | Field::ParamValue => {
                req.identity.params.push(("limit".into(), "1".into()));
                let last = req.identity.params.len() - 1;
                let (n, v) = &mut req.identity.params[last];
                if matches!(field, Field::ParamName) { *n = hostile(n, at, bad); "name" }
                else { *v = hostile(v, at, bad); "value" }
            }
            Field::VaryValue => {
                req.identity.vary = vec![("cookie:sid".into(), hostile("abc", at, bad))];
                "vary[0].value"
            }
            Field::TraceId => { req.trace_id = hostile(&req.trace_id, at, bad); "trace_id" }
            Field::Traceparent => {
                let valid = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
                req.traceparent = Some(hostile(valid, at, bad));
                "traceparent"
            }
        };
        let bytes = req.encode();
        let e = BuildRequest::decode(&bytes).unwrap_err().to_string();
        prop_assert!(e.contains(name), "{}: {}", name, e);
        prop_assert!(!e.contains(bad), "{:?}", e);
        // The same for events, whose fields reach every gateway.
        let failed = Event::Failed { key: "k".into(), error: hostile("upstream said 500", at, bad) };
        let e = Event::decode(&failed.encode()).unwrap_err().to_string();
        prop_assert!(e.contains("`error`") && !e.contains(bad), "{:?}", e);
    }

    /// The cookie separator in a cookie's vary value would add a cookie to the render
    /// request: refused; a header's may hold it.
    #[test]
    fn a_cookie_value_cannot_carry_another_cookie(value in "[!-:<-~]{1,20}") {
        let mut req = BuildRequest::decode(&build_request_json()).unwrap();
        req.identity.vary = vec![("cookie:sid".into(), format!("{value}; admin=1"))];
        prop_assert!(BuildRequest::decode(&req.encode()).is_err());
        req.identity.vary = vec![("header:accept-language".into(), format!("{value}; q=1"))];
        prop_assert!(BuildRequest::decode(&req.encode()).is_ok());
    }

    #[test]
    fn any_json_decodes_to_a_message_or_an_error(value in prop_oneof![json(), message_like()]) {
        let bytes = serde_json::to_vec(&value).unwrap();
        if let Ok(req) = BuildRequest::decode(&bytes) {
            prop_assert_eq!(BuildRequest::decode(&req.encode()).unwrap(), req);
        }
        if let Ok(e) = Event::decode(&bytes) {
            prop_assert_eq!(Event::decode(&e.encode()).unwrap(), e);
        }
    }
}

/// A build request as the README shows other programs writing one.
fn build_request_json() -> Vec<u8> {
    br#"{"v":1,"id":"warm-1","key":"","route":"recs","params":[["limit","5"]],
        "vary":[],"generation":0,"attempt":1,"requested_at":0,"lease_deadline":0,"trace_id":""}"#
        .to_vec()
}

// ---------------------------------------------------------------- config

/// Every key of the file, as `(table, key)`; `fragment` is the first `[[fragment]]`.
const KEYS: &[(&str, &str)] = &[
    ("gateway", "listen"),
    ("gateway", "admin_listen"),
    ("gateway", "admin_token"),
    ("gateway", "fragment_prefix"),
    ("gateway", "max_wait"),
    ("upstream", "url"),
    ("upstream", "timeout"),
    ("cache", "capacity"),
    ("cache", "ttl"),
    ("store", "memcached"),
    ("store", "namespace"),
    ("store", "timeout"),
    ("store", "max_item_size"),
    ("store", "memory_capacity"),
    ("bus", "amqp"),
    ("bus", "queue_expiry"),
    ("workers", "embedded"),
    ("workers", "concurrency"),
    ("workers", "admin_listen"),
    ("workers", "admin_token"),
    ("fragment", "name"),
    ("fragment", "render"),
    ("fragment", "params"),
    ("fragment", "vary"),
    ("fragment", "fresh"),
    ("fragment", "stale"),
    ("fragment", "failed_ttl"),
    ("fragment", "build_timeout"),
    ("fragment", "max_attempts"),
    ("fragment", "placeholder"),
    ("fragment", "fallback"),
    ("fragment", "queue"),
];

/// Values an operator could write, right or wrong: edge durations and sizes, other
/// types, odd strings. Written as TOML literals.
fn toml_value() -> impl Strategy<Value = String> {
    prop_oneof![
        3 => proptest::sample::select(&[
            "\"0s\"", "\"1ms\"", "\"10s\"", "\"30days\"", "\"18446744073709551615s\"",
            "\"584942417355years\"", "\"1ns\"", "\"0\"", "\"64MiB\"", "\"1 EiB\"", "\"16EiB\"",
            "\"4KiB\"", "\"-1\"", "\"127.0.0.1:0\"", "\"[::1]:9090\"", "\"0.0.0.0:80\"",
            "\"http://127.0.0.1:3000\"", "\"amqp://guest:guest@127.0.0.1:5672/%2f\"",
            "\"/fragments/\"", "\"/\"", "\"cookie:sid\"", "\"header:Accept\"", "\"header:cookie\"",
            "\"amq.x\"", "\"\"", "0", "1", "-1", "65536", "18446744073709551615",
            "9223372036854775807", "-9223372036854775808", "1.5", "nan", "inf", "true",
            "[]", "[\"127.0.0.1:11211\"]", "[\"cookie:sid\", \"cookie:sid\"]", "{}",
            "1979-05-27T07:32:00Z",
        ][..])
        .prop_map(str::to_string),
        1 => any::<String>().prop_map(|s| toml::Value::String(s).to_string()),
        1 => any::<i64>().prop_map(|n| n.to_string()),
        1 => proptest::collection::vec("[a-z0-9:./]{0,12}", 0..3)
            .prop_map(|v| toml::Value::from(v).to_string()),
    ]
}

/// The tables of [`KEYS`], in file order.
const TABLES: &[&str] = &[
    "gateway", "upstream", "cache", "store", "bus", "workers", "fragment",
];

/// A file setting a few known keys to generated values, tables in file order.
fn config_text() -> impl Strategy<Value = String> {
    proptest::collection::vec((proptest::sample::select(KEYS), toml_value()), 0..5).prop_map(
        |assignments| {
            let mut out = String::new();
            for table in TABLES {
                let mine: Vec<_> = assignments
                    .iter()
                    .filter(|((t, _), _)| t == table)
                    .collect();
                if *table == "fragment" {
                    out.push_str("[[fragment]]\n");
                    for (key, default) in [("name", "\"r\""), ("render", "\"/r\"")] {
                        if !mine.iter().any(|((_, k), _)| *k == key) {
                            out.push_str(&format!("{key} = {default}\n"));
                        }
                    }
                } else {
                    out.push_str(&format!("[{table}]\n"));
                }
                let mut written = Vec::new();
                for ((_, key), value) in mine {
                    // A key written twice is a TOML error of its own; keep the first.
                    if !written.contains(key) {
                        written.push(*key);
                        out.push_str(&format!("{key} = {value}\n"));
                    }
                }
            }
            out
        },
    )
}

/// A refused config names where: a dotted key under a known table, or toml's message,
/// which shows the offending line.
fn assert_names_a_key(e: &ConfigError) -> Result<(), TestCaseError> {
    match e {
        ConfigError::Invalid { key, problem } => {
            let table = key.split(['.', '[']).next().unwrap_or_default();
            prop_assert!(
                KEYS.iter().any(|(t, _)| *t == table) && key.contains(['.']),
                "key {key:?} ({problem})"
            );
        }
        ConfigError::Parse { message, .. } => prop_assert!(!message.is_empty()),
        ConfigError::Read { .. } => prop_assert!(false, "no file was read"),
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(CASES))]

    #[test]
    fn any_text_is_a_config_or_an_error(text in any::<String>()) {
        if let Err(e) = Config::from_toml(&text) {
            assert_names_a_key(&e)?;
        }
    }

    #[test]
    fn any_value_of_a_known_key_is_accepted_or_named(text in config_text()) {
        match Config::from_toml(&text) {
            Ok(config) => {
                // What the rest of the program computes from a loaded config must not
                // overflow either.
                for r in &config.fragments {
                    let _ = r.lease_ttl();
                }
            }
            Err(e) => {
                assert_names_a_key(&e)?;
                if let ConfigError::Parse { message, .. } = &e {
                    // toml names the table or key, or shows the line with it.
                    let named = KEYS.iter().any(|(t, k)| message.contains(t) || message.contains(k));
                    prop_assert!(named, "{message}\n---\n{text}");
                }
            }
        }
    }
}

#[test]
fn durations_at_the_limit_do_not_overflow() {
    let text = "[[fragment]]\nname = \"r\"\nrender = \"/r\"\nfresh = \"18446744073709551615s\"\n";
    assert!(Config::from_toml(text).is_err());
    let text =
        "[[fragment]]\nname = \"r\"\nrender = \"/r\"\nbuild_timeout = \"18446744073709551615s\"\n";
    let e = Config::from_toml(text).unwrap_err().to_string();
    assert!(e.contains("fragment[0].build_timeout"), "{e}");
    let mut r = FragmentRoute::new("r", "/r");
    r.build_timeout = Duration::MAX;
    assert_eq!(r.lease_ttl(), Duration::MAX);
}
