//! Small request-header parsers: `Prefer: wait`, `If-None-Match`, trace ids.

use std::time::Duration;

use http::HeaderMap;
use http::header::{ACCEPT, IF_NONE_MATCH};

/// The `wait` preference (RFC 7240) in seconds, if any. `Prefer: respond-async, wait=10`.
/// A number too large for any clock saturates (the caller caps it at `max_wait`);
/// anything but digits is no preference.
pub(crate) fn prefer_wait(headers: &HeaderMap) -> Option<Duration> {
    headers
        .get_all("prefer")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|pref| {
            let first = pref.split(';').next()?.trim();
            let (name, value) = first.split_once('=')?;
            name.trim()
                .eq_ignore_ascii_case("wait")
                .then(|| delta_seconds(value.trim().trim_matches('"')))
                .flatten()
        })
        .next()
        .map(Duration::from_secs)
}

/// A count of seconds written as digits (RFC 9110 `delta-seconds`), saturating at
/// `u64::MAX` as RFC 9111 §1.2.2 has caches do, rather than failing.
fn delta_seconds(text: &str) -> Option<u64> {
    if text.is_empty() || !text.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    Some(text.parse().unwrap_or(u64::MAX))
}

/// Whether `If-None-Match` matches `etag` (weak comparison, RFC 9110 §13.1.2).
pub(crate) fn if_none_match(headers: &HeaderMap, etag: &str) -> bool {
    fn opaque(t: &str) -> &str {
        let t = t.trim();
        t.strip_prefix("W/").unwrap_or(t).trim()
    }
    if !headers.contains_key(IF_NONE_MATCH) {
        return false;
    }
    let ours = opaque(etag);
    headers
        .get_all(IF_NONE_MATCH)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim() == "*" || opaque(t) == ours)
}

/// Whether the client prefers JSON over HTML.
pub(crate) fn wants_json(headers: &HeaderMap) -> bool {
    headers
        .get_all(ACCEPT)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .any(|v| {
            let v = v.to_ascii_lowercase();
            (v.contains("application/json") || v.contains("+json")) && !v.contains("text/html")
        })
}

/// A request's trace id, worked out only when something needs it (a build request):
/// the hit path never pays for it.
#[derive(Debug)]
pub(crate) struct Trace<'a> {
    headers: &'a HeaderMap,
    id: std::sync::OnceLock<String>,
}

impl<'a> Trace<'a> {
    /// The trace of a request with `headers`.
    pub(crate) fn new(headers: &'a HeaderMap) -> Self {
        Self {
            headers,
            id: std::sync::OnceLock::new(),
        }
    }

    /// The id, see [`trace_id`].
    pub(crate) fn id(&self) -> &str {
        self.id.get_or_init(|| trace_id(self.headers))
    }
}

impl crate::cache::TraceId for Trace<'_> {
    fn trace_id(&self) -> &str {
        self.id()
    }
}

/// The trace id of a request: the W3C `traceparent` trace id, else `X-Request-Id` when
/// it is a safe token (the rule build requests are held to: [`is_id`](tessera_protocol::message::is_id)), else a new random
/// one. Never logs raw client bytes.
pub(crate) fn trace_id(headers: &HeaderMap) -> String {
    given_trace_id(headers).unwrap_or_else(new_trace_id)
}

/// The trace id the request brought: its `traceparent`'s, else a safe `X-Request-Id`.
pub(crate) fn given_trace_id(headers: &HeaderMap) -> Option<String> {
    let safe = tessera_protocol::message::is_id;
    if let Some(tp) = headers.get("traceparent").and_then(|v| v.to_str().ok()) {
        let mut parts = tp.trim().split('-');
        if let (Some(_version), Some(id)) = (parts.next(), parts.next())
            && id.len() == 32
            && id.bytes().all(|b| b.is_ascii_hexdigit())
        {
            return Some(id.to_ascii_lowercase());
        }
    }
    if let Some(id) = headers.get("x-request-id").and_then(|v| v.to_str().ok())
        && safe(id.trim())
    {
        return Some(id.trim().to_string());
    }
    None
}

/// A new random trace id, for a request that brought none.
pub(crate) fn new_trace_id() -> String {
    format!("{:032x}", rand::random::<u128>())
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    fn h(name: &'static str, v: &'static str) -> HeaderMap {
        let mut m = HeaderMap::new();
        m.insert(name, HeaderValue::from_static(v));
        m
    }

    #[test]
    fn prefer_wait_forms() {
        assert_eq!(
            prefer_wait(&h("prefer", "wait=5")),
            Some(Duration::from_secs(5))
        );
        assert_eq!(
            prefer_wait(&h("prefer", "respond-async, wait=10")),
            Some(Duration::from_secs(10))
        );
        assert_eq!(
            prefer_wait(&h("prefer", "WAIT = \"3\"")),
            Some(Duration::from_secs(3))
        );
        assert_eq!(prefer_wait(&h("prefer", "wait=soon")), None);
        assert_eq!(
            prefer_wait(&h("prefer", "wait=99999999999999999999")),
            Some(Duration::from_secs(u64::MAX)),
            "out of range saturates, for the caller to cap"
        );
        assert_eq!(prefer_wait(&h("prefer", "wait=-1")), None);
        assert_eq!(prefer_wait(&h("prefer", "wait=+5")), None);
        assert_eq!(prefer_wait(&h("prefer", "wait=")), None);
        assert_eq!(prefer_wait(&h("prefer", "return=minimal")), None);
        assert_eq!(prefer_wait(&HeaderMap::new()), None);
    }

    #[test]
    fn etag_matching() {
        assert!(if_none_match(&h("if-none-match", "\"a\""), "\"a\""));
        assert!(if_none_match(
            &h("if-none-match", "\"x\", W/\"a\""),
            "\"a\""
        ));
        assert!(if_none_match(&h("if-none-match", "*"), "\"a\""));
        assert!(!if_none_match(&h("if-none-match", "\"b\""), "\"a\""));
        assert!(!if_none_match(&HeaderMap::new(), "\"a\""));
    }

    #[test]
    fn json_is_chosen_only_when_asked() {
        assert!(wants_json(&h("accept", "application/json")));
        assert!(!wants_json(&h("accept", "text/html,application/xhtml+xml")));
        assert!(!wants_json(&HeaderMap::new()));
    }

    #[test]
    fn prefer_wait_reads_the_first_wait_of_any_header() {
        let mut m = HeaderMap::new();
        m.append("prefer", HeaderValue::from_static("return=minimal"));
        m.append(
            "prefer",
            HeaderValue::from_static("wait=7; foo=bar, wait=9"),
        );
        assert_eq!(prefer_wait(&m), Some(Duration::from_secs(7)));
        assert_eq!(prefer_wait(&h("prefer", "wait=-1")), None);
        assert_eq!(prefer_wait(&h("prefer", "wait")), None);
        assert_eq!(prefer_wait(&h("prefer", "waiting=3")), None);
    }

    #[test]
    fn etag_matching_is_weak_on_both_sides() {
        assert!(if_none_match(&h("if-none-match", "\"a\""), "W/\"a\""));
        assert!(if_none_match(&h("if-none-match", " W/\"a\" "), "\"a\""));
        assert!(if_none_match(&h("if-none-match", "\"b\", *"), "\"a\""));
        let mut m = h("if-none-match", "\"b\"");
        m.append("if-none-match", HeaderValue::from_static("\"a\""));
        assert!(if_none_match(&m, "\"a\""), "any of several headers");
        assert!(!if_none_match(&h("if-none-match", "\"ab\""), "\"a\""));
        assert!(!if_none_match(&h("if-match", "\"a\""), "\"a\""));
    }

    #[test]
    fn json_is_not_chosen_for_wildcards_or_html() {
        assert!(!wants_json(&h("accept", "*/*")));
        assert!(!wants_json(&h("accept", "text/*")));
        assert!(!wants_json(&h("accept", "text/html, application/json")));
        assert!(!wants_json(&h(
            "accept",
            "application/json, TEXT/HTML;q=0.9"
        )));
        assert!(wants_json(&h("accept", "application/problem+json")));
        assert!(wants_json(&h("accept", "Application/JSON; q=1")));
        let mut m = h("accept", "text/html");
        m.append("accept", HeaderValue::from_static("application/json"));
        assert!(wants_json(&m), "judged per header line");
    }

    #[test]
    fn request_ids_must_be_short_safe_tokens() {
        let id64 = "a".repeat(64);
        let mut m = HeaderMap::new();
        m.insert("x-request-id", HeaderValue::from_str(&id64).unwrap());
        assert_eq!(trace_id(&m), id64, "64 bytes is the limit");
        let id65 = "b".repeat(65);
        m.insert("x-request-id", HeaderValue::from_str(&id65).unwrap());
        let fresh = trace_id(&m);
        assert_ne!(fresh, id65);
        assert_eq!(fresh.len(), 32);
        assert_eq!(trace_id(&h("x-request-id", " a_B-9 ")), "a_B-9");
        assert_ne!(trace_id(&h("x-request-id", "")), "");
        assert_ne!(trace_id(&h("x-request-id", "a.b")), "a.b");
        assert_ne!(trace_id(&h("x-request-id", "a/b")), "a/b");
    }

    #[test]
    fn a_bad_traceparent_falls_back_to_the_request_id() {
        let mut m = h("x-request-id", "req-7");
        for tp in [
            "00-4bf92f3577b34da6a3ce929d0e0e473-00f067aa0ba902b7-01", // 31 digits
            "00-4bf92f3577b34da6a3ce929d0e0e4736a-00f067aa0ba902b7-01", // 33 digits
            "00-4bf92f3577b34da6a3ce929d0e0e473g-00f067aa0ba902b7-01", // not hex
            "00",
        ] {
            m.insert("traceparent", HeaderValue::from_static(tp));
            assert_eq!(trace_id(&m), "req-7", "{tp}");
        }
        m.insert(
            "traceparent",
            HeaderValue::from_static("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"),
        );
        assert_eq!(trace_id(&m), "0af7651916cd43dd8448eb211c80319c");
    }

    #[test]
    fn a_trace_works_its_id_out_once() {
        let m = h("x-request-id", "req-1");
        let t = Trace::new(&m);
        assert_eq!(t.id(), "req-1");
        let none = HeaderMap::new();
        let t = Trace::new(&none);
        let first = t.id().to_string();
        assert_eq!(first.len(), 32);
        assert_eq!(t.id(), first, "a random id is drawn once");
        use crate::cache::TraceId;
        assert_eq!(t.trace_id(), first, "as the cache reads it");
        assert_eq!("t-9".to_string().trace_id(), "t-9", "an id known already");
    }

    #[test]
    fn trace_ids() {
        let tp = h(
            "traceparent",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
        );
        assert_eq!(trace_id(&tp), "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(trace_id(&h("x-request-id", "req-42")), "req-42");
        let hostile = trace_id(&h("x-request-id", "a\"b c"));
        assert_eq!(hostile.len(), 32);
        assert_ne!(trace_id(&HeaderMap::new()), trace_id(&HeaderMap::new()));
    }
}
