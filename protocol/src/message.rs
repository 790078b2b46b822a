//! Messages on the broker: build requests and events.
//!
//! Both are JSON with a `v` field so that other programs can publish them — a Rails app
//! warming its cache can publish a `BuildRequest` with any AMQP client — and so that a
//! future format can be told apart. Decoding checks the version; anything that does not
//! decode is dead-lettered by the consumer, never retried in a loop.
//!
//! Decoding also checks every field as strictly as the gateway makes it, since whatever
//! another program wrote ends up in log lines, headers of render requests and store
//! keys: ids are short tokens ([`is_id`]), keys are key characters ([`is_key_text`]),
//! routes, params and vary values are what a request could have produced (see
//! [`crate::key`]), ETags and errors are single lines. A message that fails says which
//! field and which rule ([`MessageError::Invalid`]), never echoing the value.

use std::collections::HashSet;

use serde::{Deserialize, Serialize};

use crate::config::{VarySource, is_param_name, is_route_name};
use crate::key::{Identity, is_param_value, is_vary_value};
use crate::tags::{MAX_TAGS, Tag};

/// Current message format version.
pub const VERSION: u32 = 1;

/// A message could not be decoded.
#[derive(Debug, thiserror::Error)]
pub enum MessageError {
    /// Not JSON, or not the expected shape.
    #[error("malformed message: {0}")]
    Malformed(#[from] serde_json::Error),
    /// A `v` this build does not read.
    #[error("message version {0} is not supported (this build reads {VERSION})")]
    Version(u32),
    /// A field holds what the gateway would never write there.
    #[error("field `{field}` {rule}")]
    Invalid {
        /// The field, e.g. `params[1].value`.
        field: String,
        /// The rule it breaks.
        rule: &'static str,
    },
}

/// Longest id or trace id (the gateway's are 16 and 32 characters).
pub const MAX_ID: usize = 64;
/// Longest key: memcached's limit.
pub const MAX_KEY: usize = 250;
/// Longest ETag (the gateway's are 34 characters).
pub const MAX_ETAG: usize = 128;
/// Longest error of a `failed` event.
pub const MAX_ERROR: usize = 4096;

const ID_RULE: &str = "must be 1 to 64 letters, digits, `-` or `_`";
const TRACE_RULE: &str = "must be empty or 1 to 64 letters, digits, `-` or `_`";
const KEY_RULE: &str = "must be 1 to 250 letters, digits, `.`, `_`, `:` or `-`";

/// Whether `s` is an id as the gateway makes them (request ids, trace ids): 1 to
/// [`MAX_ID`] letters, digits, `-` or `_`. Safe in a log line, a header and a key.
pub fn is_id(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= MAX_ID
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

/// Whether `s` is a W3C `traceparent` of version 00: `00-{trace id}-{span id}-{flags}`,
/// 32, 16 and 2 lower-case hex digits, the ids not all zero.
pub fn is_traceparent(s: &str) -> bool {
    let hex = |p: &str, n: usize| {
        p.len() == n && p.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
    };
    let parts: Vec<&str> = s.split('-').collect();
    matches!(parts.as_slice(), ["00", trace, span, flags]
        if hex(trace, 32) && hex(span, 16) && hex(flags, 2)
            && trace.bytes().any(|b| b != b'0') && span.bytes().any(|b| b != b'0'))
}

/// Whether `s` can be a store key as the keyspace builds them: 1 to [`MAX_KEY`] letters,
/// digits, `.`, `_`, `:` or `-` (namespace, kind, route, generation, digest). Whether it
/// is the right key is for its user to check against what it derives.
pub fn is_key_text(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= MAX_KEY
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b".:_-".contains(&b))
}

/// Whether `s` can be an ETag: 1 to [`MAX_ETAG`] visible ASCII characters.
pub fn is_etag(s: &str) -> bool {
    !s.is_empty() && s.len() <= MAX_ETAG && s.bytes().all(|b| b.is_ascii_graphic())
}

/// Whether `s` can be a build's error: at most [`MAX_ERROR`] bytes on one line, without
/// control characters.
pub fn is_error_text(s: &str) -> bool {
    s.len() <= MAX_ERROR && !s.chars().any(char::is_control)
}

/// `s` made a valid build error ([`is_error_text`]): control characters become spaces,
/// and past [`MAX_ERROR`] bytes it is cut (at a character boundary) with `…`. What the
/// workers announce, so that no gateway refuses their own event.
pub fn error_text(s: &str) -> String {
    let mut out: String = s
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    if out.len() > MAX_ERROR {
        let mut cut = MAX_ERROR - '…'.len_utf8();
        while !out.is_char_boundary(cut) {
            cut -= 1;
        }
        out.truncate(cut);
        out.push('…');
    }
    out
}

fn check(ok: bool, field: impl Into<String>, rule: &'static str) -> Result<(), MessageError> {
    if ok {
        Ok(())
    } else {
        Err(MessageError::Invalid {
            field: field.into(),
            rule,
        })
    }
}

/// `route`, `params` and `vary` of a message, as a request could have produced them.
fn check_identity(identity: &Identity) -> Result<(), MessageError> {
    check(
        is_route_name(&identity.route),
        "route",
        "must be 1 to 64 lower-case letters, digits, `-` or `_`",
    )?;
    for (i, (name, value)) in identity.params.iter().enumerate() {
        check(
            is_param_name(name),
            format!("params[{i}].name"),
            "must be 1 to 64 letters, digits, `-`, `_`, `.`, `[` or `]`",
        )?;
        check(
            is_param_value(value),
            format!("params[{i}].value"),
            "must be at most 1024 bytes of text without control characters",
        )?;
    }
    let mut seen = HashSet::new();
    for (i, (spec, value)) in identity.vary.iter().enumerate() {
        let source = spec
            .parse::<VarySource>()
            .ok()
            .filter(|s| s.spec() == *spec);
        let Some(source) = source else {
            return check(
                false,
                format!("vary[{i}].source"),
                "must be `cookie:NAME` or `header:name` (lower-case), as the route lists it",
            );
        };
        check(
            seen.insert(spec.as_str()),
            format!("vary[{i}].source"),
            "must not be listed twice",
        )?;
        check(
            is_vary_value(&source, value),
            format!("vary[{i}].value"),
            "must be at most 1024 bytes of printable ASCII (a cookie's without `;` or \
             surrounding spaces)",
        )?;
    }
    Ok(())
}

/// Ask the workers to build one fragment.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BuildRequest {
    /// Format version, [`VERSION`].
    pub v: u32,
    /// Unique id of this request (kept across retries), for logs.
    pub id: String,
    /// Envelope key the result goes to; workers check it against `identity`.
    pub key: String,
    /// Route, allow-listed params and vary values to render with.
    #[serde(flatten)]
    pub identity: Identity,
    /// Route generation the key belongs to; a build for an older generation is dropped.
    pub generation: u64,
    /// 1 for the first attempt, incremented on each retry.
    pub attempt: u32,
    /// When the first attempt was requested (Unix ms).
    pub requested_at: u64,
    /// When the pending lease expires (Unix ms); after it another build may be queued.
    pub lease_deadline: u64,
    /// Trace id of the request that caused the build, carried into worker logs.
    pub trace_id: String,
    /// W3C `traceparent` of the span that published the request, when traces are on:
    /// the worker's spans join that trace ([`is_traceparent`]). Also sent as the AMQP
    /// message's `traceparent` header.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub traceparent: Option<String>,
}

impl BuildRequest {
    /// JSON bytes for the broker.
    pub fn encode(&self) -> Vec<u8> {
        // Serializing plain strings and integers to a Vec cannot fail.
        serde_json::to_vec(self).unwrap_or_default()
    }

    /// Parses JSON bytes from the broker, and checks every field ([`Self::validate`]).
    pub fn decode(bytes: &[u8]) -> Result<BuildRequest, MessageError> {
        let req: BuildRequest = serde_json::from_slice(bytes)?;
        if req.v != VERSION {
            return Err(MessageError::Version(req.v));
        }
        req.validate()?;
        Ok(req)
    }

    /// Checks every field as strictly as the gateway makes it: see the module doc.
    /// `key` may be empty (generation 0, "the current one"); `attempt` starts at 1.
    pub fn validate(&self) -> Result<(), MessageError> {
        check(is_id(&self.id), "id", ID_RULE)?;
        check(
            self.key.is_empty() || is_key_text(&self.key),
            "key",
            "must be empty or 1 to 250 letters, digits, `.`, `_`, `:` or `-`",
        )?;
        check_identity(&self.identity)?;
        check(self.attempt >= 1, "attempt", "must be at least 1")?;
        check(
            self.trace_id.is_empty() || is_id(&self.trace_id),
            "trace_id",
            TRACE_RULE,
        )?;
        check(
            self.traceparent.as_deref().is_none_or(is_traceparent),
            "traceparent",
            "must be a W3C traceparent: `00-` 32 and 16 lower-case hex digits (not all zero) `-` 2",
        )
    }
}

/// What happened to a fragment or route, fanned out to every gateway.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum Event {
    /// A fragment was built and stored.
    Built {
        /// Envelope key.
        key: String,
        /// ETag of the new body.
        etag: String,
        /// How long the render took, for build-latency figures.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        build_ms: Option<u64>,
    },
    /// A build failed for good; a `failed` envelope was stored.
    Failed {
        /// Envelope key.
        key: String,
        /// Why.
        error: String,
    },
    /// Content was purged: one key, a whole route by generation, or every fragment
    /// carrying a tag.
    Purged {
        /// What was purged.
        #[serde(flatten)]
        purge: Purge,
        /// The purge's id: every gateway that applied the event answers with a
        /// [`Event::PurgeApplied`] naming it. A purge of several events (a list of tags)
        /// gives it to its last one only: events from one publisher arrive in order.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        id: Option<String>,
    },
    /// A gateway applied the purge `purge_id` (to its L1, hot answers and tag table).
    #[serde(rename = "purge_applied")]
    PurgeApplied {
        /// The id of the `purged` event applied.
        purge_id: String,
        /// The gateway's id.
        gateway: String,
    },
    /// A gateway is running: sent every few seconds, so that gateways know who should
    /// acknowledge a purge.
    Heartbeat {
        /// The gateway's id.
        gateway: String,
    },
}

/// What a purge retired. On the wire its fields sit beside the event's `type`, as they
/// always have: `{"type":"purged","route":"recs","generation":4}`,
/// `{"type":"purged","key":"…"}`, `{"type":"purged","tag":"p-1","purged_at":1700000000000}`;
/// a purge of several tags at once (which gateways before it ignore, as undecodable),
/// `{"type":"purged","all_of":["a","b"],"purged_at":1700000000000}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Purge {
    /// A whole route: its generation was bumped.
    Route {
        /// The route.
        route: String,
        /// Its new generation (its generation, for a soft purge).
        generation: u64,
        /// A soft purge: the generation stays, and what rendered before the purge is
        /// stale. Left out when false; a gateway of an earlier release reads it as a route
        /// purge and reads the (same) generation again.
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        soft: bool,
    },
    /// Every fragment carrying a tag (see [`crate::tags`]).
    Tag {
        /// The tag.
        tag: String,
        /// When it was purged (Unix ms), as written to its store key.
        purged_at: u64,
        /// A soft purge: what rendered before it is stale, not retired (recorded in the
        /// tag's purge record). Left out when false; a gateway of an earlier release
        /// reads a soft purge as a hard one (over-purging, which is safe).
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        soft: bool,
    },
    /// One fragment: its envelope key was deleted.
    Key {
        /// The envelope key.
        key: String,
    },
    /// Every fragment carrying all of several tags (see [`crate::tags::purge_all_of`]).
    AllOf {
        /// The tags, sorted and distinct, at least two.
        all_of: Vec<String>,
        /// When they were purged (Unix ms), as recorded under the first tag.
        purged_at: u64,
    },
}

#[derive(Serialize, Deserialize)]
struct EventWire {
    v: u32,
    #[serde(flatten)]
    event: Event,
}

impl Event {
    /// JSON bytes for the broker.
    pub fn encode(&self) -> Vec<u8> {
        serde_json::to_vec(&EventWire {
            v: VERSION,
            event: self.clone(),
        })
        .unwrap_or_default()
    }

    /// Parses JSON bytes from the broker, and checks every field ([`Self::validate`]).
    pub fn decode(bytes: &[u8]) -> Result<Event, MessageError> {
        let wire: EventWire = serde_json::from_slice(bytes)?;
        if wire.v != VERSION {
            return Err(MessageError::Version(wire.v));
        }
        wire.event.validate()?;
        Ok(wire.event)
    }

    /// Checks every field as strictly as the gateway and the workers make it: see the
    /// module doc.
    pub fn validate(&self) -> Result<(), MessageError> {
        match self {
            Event::Built { key, etag, .. } => {
                check(is_key_text(key), "key", KEY_RULE)?;
                check(
                    is_etag(etag),
                    "etag",
                    "must be 1 to 128 visible ASCII characters",
                )
            }
            Event::Failed { key, error } => {
                check(is_key_text(key), "key", KEY_RULE)?;
                check(
                    is_error_text(error),
                    "error",
                    "must be at most 4096 bytes on one line, without control characters",
                )
            }
            Event::PurgeApplied { purge_id, gateway } => {
                check(is_id(purge_id), "purge_id", ID_RULE)?;
                check(is_id(gateway), "gateway", ID_RULE)
            }
            Event::Heartbeat { gateway } => check(is_id(gateway), "gateway", ID_RULE),
            Event::Purged { purge, id } => {
                check(id.as_deref().is_none_or(is_id), "id", ID_RULE)?;
                Self::validate_purge(purge)
            }
        }
    }

    fn validate_purge(purge: &Purge) -> Result<(), MessageError> {
        match purge {
            Purge::Route { route, .. } => check(
                is_route_name(route),
                "route",
                "must be 1 to 64 lower-case letters, digits, `-` or `_`",
            ),
            Purge::Tag { tag, .. } => check(
                Tag::new(tag).is_ok(),
                "tag",
                "must be 1 to 128 token characters",
            ),
            Purge::Key { key } => check(is_key_text(key), "key", KEY_RULE),
            Purge::AllOf { all_of, .. } => check(
                (2..=MAX_TAGS).contains(&all_of.len())
                    && all_of.iter().all(|t| Tag::new(t).is_ok())
                    && all_of.windows(2).all(|w| w[0] < w[1]),
                "all_of",
                "must be 2 to 32 distinct tags of 1 to 128 token characters, sorted",
            ),
        }
    }

    /// The envelope key the event is about, when it is about one.
    pub fn key(&self) -> Option<&str> {
        match self {
            Event::Built { key, .. } | Event::Failed { key, .. } => Some(key),
            Event::Purged {
                purge: Purge::Key { key },
                ..
            } => Some(key),
            Event::Purged { .. } | Event::PurgeApplied { .. } | Event::Heartbeat { .. } => None,
        }
    }
}

/// A dead-lettered message's body as operators are shown it (the admin API, the
/// dashboard, the CLI). A build request's `vary` values are a user's cookies and headers
/// (a session, a bearer token): each is replaced by `redacted:` and the first 12 hex digits
/// of its BLAKE3 hash, which tells two users apart without showing either. A body that is
/// not a JSON object (so not a build request, and possibly one cut short, secrets and
/// all) is not shown, only its size.
pub fn redacted(body: &[u8]) -> String {
    let Ok(serde_json::Value::Object(mut message)) = serde_json::from_slice(body) else {
        return format!("({} bytes, not a JSON object; not shown)", body.len());
    };
    if let Some(vary) = message.get_mut("vary") {
        redact_vary(vary);
    }
    serde_json::Value::Object(message).to_string()
}

/// Replaces every value in `vary` (`[[source, value], …]`, or anything else a
/// malformed message put there) by its redaction, keeping the source names.
fn redact_vary(vary: &mut serde_json::Value) {
    use serde_json::Value;
    let hide = |v: &Value| {
        let text = v.as_str().map_or_else(|| v.to_string(), str::to_string);
        Value::from(format!(
            "redacted:{}",
            &blake3::hash(text.as_bytes()).to_hex()[..12]
        ))
    };
    match vary {
        Value::Array(pairs) => {
            for pair in pairs {
                match pair {
                    Value::Array(parts) if parts.len() == 2 => parts[1] = hide(&parts[1]),
                    other => *other = hide(other),
                }
            }
        }
        other => *other = hide(other),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn traceparents() {
        assert!(is_traceparent(
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
        ));
        for bad in [
            "",
            "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-x",
            "00-4bf92f3577b34da6a3ce929d0e0e473-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-1",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01\n",
        ] {
            assert!(!is_traceparent(bad), "{bad}");
        }
        let mut req = request();
        req.traceparent = Some("00-x".into());
        let e = BuildRequest::decode(&req.encode()).unwrap_err().to_string();
        assert!(e.contains("traceparent"), "{e}");
        req.traceparent = Some("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01".into());
        assert_eq!(BuildRequest::decode(&req.encode()).unwrap(), req);
    }

    fn request() -> BuildRequest {
        BuildRequest {
            v: VERSION,
            id: "b1".into(),
            key: "tessera:f:recs:1:00".into(),
            identity: Identity {
                route: "recs".into(),
                params: vec![("user_id".into(), "7".into())],
                vary: vec![("cookie:session_id".into(), "abc".into())],
            },
            generation: 1,
            attempt: 1,
            requested_at: 1,
            lease_deadline: 2,
            trace_id: "t".into(),
            traceparent: None,
        }
    }

    #[test]
    fn build_request_round_trips_as_json() {
        let r = request();
        let json: serde_json::Value = serde_json::from_slice(&r.encode()).unwrap();
        assert_eq!(json["v"], 1);
        assert_eq!(json["route"], "recs");
        assert_eq!(json["params"][0][0], "user_id");
        assert_eq!(BuildRequest::decode(&r.encode()).unwrap(), r);
    }

    #[test]
    fn other_programs_can_write_one() {
        let text = br#"{"v":1,"id":"warm-1","key":"tessera:f:recs:0:x","route":"recs",
            "params":[["user_id","7"]],"vary":[],"generation":0,"attempt":1,
            "requested_at":0,"lease_deadline":0,"trace_id":""}"#;
        let r = BuildRequest::decode(text).unwrap();
        assert_eq!(
            r.identity.params,
            vec![("user_id".to_string(), "7".to_string())]
        );
    }

    #[test]
    fn bad_messages_are_errors() {
        assert!(matches!(
            BuildRequest::decode(b"\xff\x00"),
            Err(MessageError::Malformed(_))
        ));
        assert!(matches!(
            BuildRequest::decode(b"{}"),
            Err(MessageError::Malformed(_))
        ));
        let mut r = request();
        r.v = 2;
        assert!(matches!(
            BuildRequest::decode(&r.encode()),
            Err(MessageError::Version(2))
        ));
    }

    /// Every field another program can get wrong is refused by name, without its value;
    /// what the gateway itself writes passes.
    #[test]
    fn every_field_is_checked_as_strictly_as_the_gateway_makes_it() {
        type Change = fn(&mut BuildRequest);
        let cases: &[(Change, &str)] = &[
            (|r| r.id = String::new(), "`id`"),
            (|r| r.id = "a\nb".into(), "`id`"),
            (|r| r.id = "x".repeat(65), "`id`"),
            (|r| r.id = "a.b".into(), "`id`"),
            (|r| r.key = "a b".into(), "`key`"),
            (|r| r.key = "k\r\nset x 0 0 1".into(), "`key`"),
            (|r| r.key = "k".repeat(251), "`key`"),
            (|r| r.identity.route = "Recs".into(), "`route`"),
            (|r| r.identity.route = "recs\n".into(), "`route`"),
            (
                |r| r.identity.params = vec![("user id".into(), "7".into())],
                "`params[0].name`",
            ),
            (
                |r| r.identity.params.push(("limit".into(), "1\u{0}".into())),
                "`params[1].value`",
            ),
            (
                |r| r.identity.params = vec![("q".into(), "v".repeat(1025))],
                "`params[0].value`",
            ),
            (
                |r| r.identity.vary = vec![("cookie:session_id".into(), "a; admin=1".into())],
                "`vary[0].value`",
            ),
            (
                |r| r.identity.vary = vec![("cookie:session_id".into(), " a".into())],
                "`vary[0].value`",
            ),
            (
                |r| r.identity.vary = vec![("header:x-a".into(), "caf\u{e9}".into())],
                "`vary[0].value`",
            ),
            (
                |r| r.identity.vary = vec![("header:X-A".into(), "1".into())],
                "`vary[0].source`",
            ),
            (
                |r| r.identity.vary = vec![("query:a".into(), "1".into())],
                "`vary[0].source`",
            ),
            (
                |r| {
                    r.identity.vary = vec![
                        ("header:x-a".into(), "1".into()),
                        ("header:x-a".into(), "2".into()),
                    ];
                },
                "`vary[1].source`",
            ),
            (|r| r.attempt = 0, "`attempt`"),
            (
                |r| r.trace_id = "t\n2026-01-01 INFO forged".into(),
                "`trace_id`",
            ),
            (|r| r.trace_id = "t".repeat(65), "`trace_id`"),
        ];
        for (change, field) in cases {
            let mut r = request();
            change(&mut r);
            let e = BuildRequest::decode(&r.encode()).unwrap_err();
            assert!(matches!(e, MessageError::Invalid { .. }), "{e}");
            let shown = e.to_string();
            assert!(shown.contains(field), "{field}: {shown}");
            assert!(!shown.contains(['\n', '\r', '\u{0}']), "{shown:?}");
        }
        // What the gateway writes, and the README's warm-up example, pass.
        let mut r = request();
        r.id = format!("{:016x}", u64::MAX);
        r.trace_id = "4bf92f3577b34da6a3ce929d0e0e4736".into();
        r.identity.vary = vec![
            ("cookie:session_id".into(), String::new()),
            ("header:accept-language".into(), "de-CH, en;q=0.5".into()),
        ];
        r.identity.params = vec![("user_id".into(), "caf\u{e9} & \"co\"".into())];
        assert_eq!(BuildRequest::decode(&r.encode()).unwrap(), r);
        r.trace_id.clear();
        r.key.clear();
        assert!(BuildRequest::decode(&r.encode()).is_ok());
    }

    #[test]
    fn errors_are_made_single_lines_that_pass() {
        assert_eq!(error_text("upstream answered 500"), "upstream answered 500");
        assert_eq!(error_text("a\nb\u{0}c"), "a b c");
        let long = error_text(&"é".repeat(MAX_ERROR));
        assert!(
            long.len() <= MAX_ERROR && long.ends_with('…'),
            "{}",
            long.len()
        );
        assert!(is_error_text(&long));
        let exact = "e".repeat(MAX_ERROR);
        assert_eq!(error_text(&exact), exact);
        assert_eq!(error_text(&format!("{exact}e")).len(), MAX_ERROR);
    }

    #[test]
    fn event_fields_are_checked_too() {
        for (bad, field) in [
            (
                &br#"{"v":1,"type":"built","key":"a b","etag":"e"}"#[..],
                "`key`",
            ),
            (
                br#"{"v":1,"type":"built","key":"k","etag":"a b"}"#,
                "`etag`",
            ),
            (br#"{"v":1,"type":"built","key":"k","etag":""}"#, "`etag`"),
            (
                br#"{"v":1,"type":"failed","key":"k","error":"x\ny"}"#,
                "`error`",
            ),
            (
                br#"{"v":1,"type":"purged","route":"R","generation":1}"#,
                "`route`",
            ),
            (
                br#"{"v":1,"type":"purged","tag":"a b","purged_at":1}"#,
                "`tag`",
            ),
            (br#"{"v":1,"type":"purged","key":""}"#, "`key`"),
        ] {
            let e = Event::decode(bad).unwrap_err().to_string();
            assert!(e.contains(field), "{}: {e}", String::from_utf8_lossy(bad));
        }
        let long = format!(
            r#"{{"v":1,"type":"failed","key":"k","error":"{}"}}"#,
            "e".repeat(4097)
        );
        assert!(Event::decode(long.as_bytes()).is_err());
        let built = Event::Built {
            key: "tessera:f:recs:1:0123456789abcdef0123456789abcdef".into(),
            etag: crate::envelope::etag_of(b"x"),
            build_ms: Some(3),
        };
        assert_eq!(Event::decode(&built.encode()).unwrap(), built);
    }

    #[test]
    fn events_name_the_key_the_gateways_evict() {
        let built = Event::Built {
            key: "t:f:recs:1:aa".into(),
            etag: "\"e\"".into(),
            build_ms: None,
        };
        assert_eq!(built.key(), Some("t:f:recs:1:aa"));
        let failed = Event::Failed {
            key: "t:f:recs:1:bb".into(),
            error: "upstream 500".into(),
        };
        assert_eq!(failed.key(), Some("t:f:recs:1:bb"));
        let purged_key = Event::Purged {
            purge: Purge::Key {
                key: "t:f:recs:1:cc".into(),
            },
            id: None,
        };
        assert_eq!(purged_key.key(), Some("t:f:recs:1:cc"));
        // A whole-route purge is about a generation, not one key.
        let purged_route = Event::Purged {
            purge: Purge::Route {
                route: "recs".into(),
                generation: 2,
                soft: false,
            },
            id: None,
        };
        assert_eq!(purged_route.key(), None);
    }

    #[test]
    fn events_of_another_version_are_refused() {
        let e = Event::decode(br#"{"v":2,"type":"failed","key":"k","error":"x"}"#).unwrap_err();
        assert!(matches!(e, MessageError::Version(2)), "{e}");
        let e = Event::decode(br#"{"v":1,"type":"exploded","key":"k"}"#).unwrap_err();
        assert!(matches!(e, MessageError::Malformed(_)), "{e}");
        assert_eq!(
            Event::decode(br#"{"v":1,"type":"failed","key":"k","error":"x"}"#).unwrap(),
            Event::Failed {
                key: "k".into(),
                error: "x".into()
            }
        );
    }

    #[test]
    fn purge_events_keep_their_bytes_on_the_wire() {
        // What this release's gateways send and read, as the release before it wrote them.
        let wire = [
            (
                &br#"{"v":1,"type":"purged","route":"recs","generation":4}"#[..],
                Purge::Route {
                    route: "recs".into(),
                    generation: 4,
                    soft: false,
                },
            ),
            (
                br#"{"v":1,"type":"purged","key":"t:f:recs:1:cc"}"#,
                Purge::Key {
                    key: "t:f:recs:1:cc".into(),
                },
            ),
            (
                br#"{"v":1,"type":"purged","tag":"p-1","purged_at":1700000000000}"#,
                Purge::Tag {
                    tag: "p-1".into(),
                    purged_at: 1_700_000_000_000,
                    soft: false,
                },
            ),
            (
                br#"{"v":1,"type":"purged","all_of":["a","b"],"purged_at":1700000000000}"#,
                Purge::AllOf {
                    all_of: vec!["a".into(), "b".into()],
                    purged_at: 1_700_000_000_000,
                },
            ),
        ];
        for (bytes, purge) in wire {
            let event = Event::Purged { purge, id: None };
            assert_eq!(Event::decode(bytes).unwrap(), event);
            assert_eq!(event.encode(), bytes, "{}", String::from_utf8_lossy(bytes));
        }
        // A purge that names nothing it can act on is refused, not taken for another kind.
        for bad in [
            &br#"{"v":1,"type":"purged"}"#[..],
            br#"{"v":1,"type":"purged","route":"recs"}"#,
            br#"{"v":1,"type":"purged","tag":"p-1"}"#,
            br#"{"v":1,"type":"purged","all_of":["a"],"purged_at":1}"#,
            br#"{"v":1,"type":"purged","all_of":["b","a"],"purged_at":1}"#,
            br#"{"v":1,"type":"purged","all_of":["a","a b"],"purged_at":1}"#,
            br#"{"v":1,"type":"purged","key":"k","id":"a b"}"#,
            br#"{"v":1,"type":"heartbeat","gateway":""}"#,
            br#"{"v":1,"type":"purge_applied","purge_id":"x"}"#,
        ] {
            assert!(
                Event::decode(bad).is_err(),
                "{}",
                String::from_utf8_lossy(bad)
            );
        }
    }

    #[test]
    fn soft_purges_and_acknowledgements_have_bytes_of_their_own() {
        // A soft purge says so; a hard one is written as before.
        let soft = Event::Purged {
            purge: Purge::Tag {
                tag: "p-1".into(),
                purged_at: 1,
                soft: true,
            },
            id: None,
        };
        let bytes = br#"{"v":1,"type":"purged","tag":"p-1","purged_at":1,"soft":true}"#;
        assert_eq!(soft.encode(), bytes);
        assert_eq!(Event::decode(bytes).unwrap(), soft);
        // Acknowledgements: the purge's id beside its fields, the answer, the heartbeat.
        let acked = [
            (
                &br#"{"v":1,"type":"purged","tag":"p-1","purged_at":1,"id":"0123abcd"}"#[..],
                Event::Purged {
                    purge: Purge::Tag {
                        tag: "p-1".into(),
                        purged_at: 1,
                        soft: false,
                    },
                    id: Some("0123abcd".into()),
                },
            ),
            (
                br#"{"v":1,"type":"purge_applied","purge_id":"0123abcd","gateway":"web-1-ff"}"#,
                Event::PurgeApplied {
                    purge_id: "0123abcd".into(),
                    gateway: "web-1-ff".into(),
                },
            ),
            (
                br#"{"v":1,"type":"heartbeat","gateway":"web-1-ff"}"#,
                Event::Heartbeat {
                    gateway: "web-1-ff".into(),
                },
            ),
        ];
        for (bytes, event) in acked {
            assert_eq!(Event::decode(bytes).unwrap(), event);
            assert_eq!(event.encode(), bytes, "{}", String::from_utf8_lossy(bytes));
        }
    }

    #[test]
    fn dead_letters_show_no_vary_value() {
        let mut r = request();
        r.identity.vary = vec![
            ("cookie:session".into(), "s3cret-session".into()),
            ("header:authorization".into(), "Bearer t0ken".into()),
        ];
        let shown = redacted(&r.encode());
        assert!(
            !shown.contains("s3cret-session") && !shown.contains("t0ken"),
            "{shown}"
        );
        assert!(
            shown.contains("cookie:session") && shown.contains("redacted:"),
            "{shown}"
        );
        let again = redacted(&r.encode());
        assert_eq!(shown, again, "the same value hashes the same");
        r.identity.vary[0].1 = "another-session".into();
        assert_ne!(redacted(&r.encode()), shown, "two users are told apart");
        // Anything that is not a well-formed request hides its values too.
        for odd in [
            &br#"{"vary":"s3cret"}"#[..],
            br#"{"vary":[["cookie:s","s3cret","x"]]}"#,
            br#"{"vary":[{"v":"s3cret"}]}"#,
            br#"{"v":1,"vary":[["cookie:s","s3cret"]"#,
            b"[\"s3cret\"]",
            b"\xff s3cret",
        ] {
            let shown = redacted(odd);
            assert!(!shown.contains("s3cret"), "{shown}");
        }
    }

    #[test]
    fn events_round_trip() {
        for e in [
            Event::Built {
                key: "k".into(),
                etag: "\"e\"".into(),
                build_ms: Some(12),
            },
            Event::Failed {
                key: "k".into(),
                error: "x".into(),
            },
            Event::Purged {
                purge: Purge::Route {
                    route: "recs".into(),
                    generation: 3,
                    soft: false,
                },
                id: None,
            },
            Event::Purged {
                purge: Purge::Key { key: "k".into() },
                id: None,
            },
            Event::Purged {
                purge: Purge::Tag {
                    tag: "product-42".into(),
                    purged_at: 1_700_000_000_000,
                    soft: false,
                },
                id: None,
            },
        ] {
            assert_eq!(Event::decode(&e.encode()).unwrap(), e);
        }
        let json: serde_json::Value = serde_json::from_slice(
            &Event::Built {
                key: "k".into(),
                etag: "e".into(),
                build_ms: None,
            }
            .encode(),
        )
        .unwrap();
        assert_eq!(json["type"], "built");
        assert_eq!(json["v"], 1);
        assert!(Event::decode(br#"{"v":9,"type":"built","key":"k","etag":"e"}"#).is_err());
    }
}
