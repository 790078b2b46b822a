//! Messages on the broker: build requests and events.
//!
//! Both are JSON with a `v` field so that other programs can publish them — a Rails app
//! warming its cache can publish a `BuildRequest` with any AMQP client — and so that a
//! future format can be told apart. Decoding checks the version; anything that does not
//! decode is dead-lettered by the consumer, never retried in a loop.

use serde::{Deserialize, Serialize};

use crate::key::Identity;

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
}

impl BuildRequest {
    /// JSON bytes for the broker.
    pub fn encode(&self) -> Vec<u8> {
        // Serializing plain strings and integers to a Vec cannot fail.
        serde_json::to_vec(self).unwrap_or_default()
    }

    /// Parses JSON bytes from the broker.
    pub fn decode(bytes: &[u8]) -> Result<BuildRequest, MessageError> {
        let req: BuildRequest = serde_json::from_slice(bytes)?;
        if req.v != VERSION {
            return Err(MessageError::Version(req.v));
        }
        Ok(req)
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
    },
}

/// What a purge retired. On the wire its fields sit beside the event's `type`, as they
/// always have: `{"type":"purged","route":"recs","generation":4}`,
/// `{"type":"purged","key":"…"}`, `{"type":"purged","tag":"p-1","purged_at":1700000000000}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Purge {
    /// A whole route: its generation was bumped.
    Route {
        /// The route.
        route: String,
        /// Its new generation.
        generation: u64,
    },
    /// Every fragment carrying a tag (see [`crate::tags`]).
    Tag {
        /// The tag.
        tag: String,
        /// When it was purged (Unix ms), as written to its store key.
        purged_at: u64,
    },
    /// One fragment: its envelope key was deleted.
    Key {
        /// The envelope key.
        key: String,
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

    /// Parses JSON bytes from the broker.
    pub fn decode(bytes: &[u8]) -> Result<Event, MessageError> {
        let wire: EventWire = serde_json::from_slice(bytes)?;
        if wire.v != VERSION {
            return Err(MessageError::Version(wire.v));
        }
        Ok(wire.event)
    }

    /// The envelope key the event is about, when it is about one.
    pub fn key(&self) -> Option<&str> {
        match self {
            Event::Built { key, .. } | Event::Failed { key, .. } => Some(key),
            Event::Purged {
                purge: Purge::Key { key },
            } => Some(key),
            Event::Purged { .. } => None,
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
        };
        assert_eq!(purged_key.key(), Some("t:f:recs:1:cc"));
        // A whole-route purge is about a generation, not one key.
        let purged_route = Event::Purged {
            purge: Purge::Route {
                route: "recs".into(),
                generation: 2,
            },
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
                },
            ),
        ];
        for (bytes, purge) in wire {
            let event = Event::Purged { purge };
            assert_eq!(Event::decode(bytes).unwrap(), event);
            assert_eq!(event.encode(), bytes, "{}", String::from_utf8_lossy(bytes));
        }
        // A purge that names nothing it can act on is refused, not taken for another kind.
        for bad in [
            &br#"{"v":1,"type":"purged"}"#[..],
            br#"{"v":1,"type":"purged","route":"recs"}"#,
            br#"{"v":1,"type":"purged","tag":"p-1"}"#,
        ] {
            assert!(
                Event::decode(bad).is_err(),
                "{}",
                String::from_utf8_lossy(bad)
            );
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
                },
            },
            Event::Purged {
                purge: Purge::Key { key: "k".into() },
            },
            Event::Purged {
                purge: Purge::Tag {
                    tag: "product-42".into(),
                    purged_at: 1_700_000_000_000,
                },
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
