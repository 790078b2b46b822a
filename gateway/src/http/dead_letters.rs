//! The dead-letter workflow of the admin API, as Sidekiq's retry set: list the letters,
//! retry or discard one, retry or discard all of a route.
//!
//! | request | answer |
//! | --- | --- |
//! | `GET /dead-letters` | the oldest 100: `id`, `route`, `fragment`, `attempts`, `error`, `time`, `queue`, `body` |
//! | `POST /dead-letters/{id}/retry` | puts that letter back on its queue: `{"retried": 1}`, 404 when no letter has the id |
//! | `DELETE /dead-letters/{id}` | discards that letter: `{"discarded": 1}`, or 404 |
//! | `POST /dead-letters/retry?route=R` | puts every letter of route `R` back: `{"retried": N}` |
//! | `DELETE /dead-letters?route=R` | discards every letter of route `R`: `{"discarded": N}` |
//! | `POST /dead-letters/requeue?limit=N` | puts the oldest N (default 100) back, whatever their route |
//!
//! A letter's id is [`DeadLetter::id`], stable across listings. Actions look through the
//! oldest [`SCAN`] letters. Nothing shown carries a `vary` value: the `fragment` is the
//! route and its params, and the `body` has every `vary` value redacted
//! ([`tessera_protocol::message::redacted`]).

use http::{Method, StatusCode};
use tessera_protocol::{Bus, DeadAction, DeadLetter};
use tessera_runtime::web::{Body, json, problem};

use super::error::GatewayError;
use http::Response;

/// Letters listed at most.
pub(crate) const PAGE: usize = 100;
/// Letters an action looks through at most.
const SCAN: usize = 10_000;

/// Which letters an action takes.
type Pick<'a> = Box<dyn Fn(&DeadLetter) -> bool + Send + Sync + 'a>;

/// Answers a request under `/dead-letters`; `None` when it names no endpoint here.
pub(crate) async fn serve(
    bus: &dyn Bus,
    method: &Method,
    path: &str,
    query: Option<&str>,
) -> Option<Response<Body>> {
    let rest = path.strip_prefix("/dead-letters")?;
    let route = query_param(query, "route");
    let (pick, action): (Pick<'_>, _) = match (method, rest) {
        (&Method::GET, "") => return Some(list(bus).await),
        (&Method::POST, "/requeue") => {
            let limit = query_param(query, "limit")
                .and_then(|l| l.parse().ok())
                .unwrap_or(PAGE);
            return Some(answer(
                bus.requeue_dead_letters(limit).await,
                "requeued",
                None,
            ));
        }
        (&Method::POST, "/retry") | (&Method::DELETE, "") => {
            let Some(route) = route else {
                return Some(problem(
                    StatusCode::BAD_REQUEST,
                    "route_required",
                    "name the route: ?route=NAME",
                ));
            };
            (
                Box::new(move |d: &DeadLetter| route_of(d) == route),
                action_of(method),
            )
        }
        (&Method::POST, one) if one.ends_with("/retry") => {
            let id = one
                .trim_start_matches('/')
                .trim_end_matches("/retry")
                .to_string();
            (
                Box::new(move |d: &DeadLetter| d.id() == id),
                DeadAction::Retry,
            )
        }
        (&Method::DELETE, one) if one.starts_with('/') => {
            let id = one[1..].to_string();
            (
                Box::new(move |d: &DeadLetter| d.id() == id),
                DeadAction::Discard,
            )
        }
        _ => return None,
    };
    let one = !matches!(rest, "" | "/retry");
    let done = bus.settle_dead_letters(pick.as_ref(), action, SCAN).await;
    let key = match action {
        DeadAction::Retry => "retried",
        DeadAction::Discard => "discarded",
    };
    Some(answer(done, key, one.then_some(rest)))
}

fn action_of(method: &Method) -> DeadAction {
    if method == Method::DELETE {
        DeadAction::Discard
    } else {
        DeadAction::Retry
    }
}

/// `{"key": n}`; a 404 when `one` letter was asked for and none was found.
fn answer(
    done: Result<usize, tessera_protocol::BusError>,
    key: &str,
    one: Option<&str>,
) -> Response<Body> {
    match done {
        Ok(0) if one.is_some() => problem(
            StatusCode::NOT_FOUND,
            "no_dead_letter",
            "no dead letter has this id (it may have been retried or discarded already)",
        ),
        Ok(n) => json(StatusCode::OK, &serde_json::json!({ key: n })),
        Err(e) => GatewayError::Bus(e).into_response(),
    }
}

async fn list(bus: &dyn Bus) -> Response<Body> {
    match bus.dead_letters(PAGE).await {
        Ok(letters) => json(
            StatusCode::OK,
            &serde_json::Value::Array(letters.iter().map(letter_json).collect()),
        ),
        Err(e) => GatewayError::Bus(e).into_response(),
    }
}

/// The route a letter's build request names, `""` when its body is no build request.
fn route_of(d: &DeadLetter) -> String {
    d.request().map(|r| r.identity.route).unwrap_or_default()
}

/// A dead letter as the admin API, the CLI and the dashboard show it: its id, route,
/// fragment (route and params, never `vary` values), attempts, error and time, and its
/// build request with every `vary` value redacted.
pub(crate) fn letter_json(d: &DeadLetter) -> serde_json::Value {
    let request = d.request();
    let fragment = request.as_ref().map(|r| {
        let query = r.identity.query_string();
        if query.is_empty() {
            r.identity.route.clone()
        } else {
            format!("{}?{query}", r.identity.route)
        }
    });
    serde_json::json!({
        "id": d.id(),
        "route": request.as_ref().map(|r| r.identity.route.as_str()).unwrap_or(""),
        "fragment": fragment,
        "attempts": request.as_ref().map(|r| r.attempt),
        "error": d.reason,
        "time": (d.at_ms > 0).then_some(d.at_ms),
        "queue": d.queue,
        "reason": d.reason,
        "body": tessera_protocol::message::redacted(&d.body),
    })
}

/// The value of the first `name=` in `query`, as it is (not decoded).
pub(super) fn query_param<'q>(query: Option<&'q str>, name: &str) -> Option<&'q str> {
    query?
        .split('&')
        .filter_map(|p| p.split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v)
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use tessera_protocol::{BuildRequest, Identity};

    fn letter(route: &str, secret: &str) -> DeadLetter {
        let req = BuildRequest {
            v: tessera_protocol::message::VERSION,
            id: "r1".into(),
            key: String::new(),
            identity: Identity {
                route: route.into(),
                params: vec![("user_id".into(), "7".into())],
                vary: vec![("cookie:session".into(), secret.into())],
            },
            generation: 0,
            attempt: 4,
            requested_at: 0,
            lease_deadline: 0,
            trace_id: String::new(),
            traceparent: None,
        };
        DeadLetter {
            queue: "tessera.build".into(),
            body: Bytes::from(req.encode()),
            reason: "upstream 503".into(),
            at_ms: 1_796_670_036_000,
        }
    }

    #[test]
    fn a_letter_shows_its_route_fragment_attempts_and_no_vary_value() {
        let d = letter("recs", "s3cr3t");
        let j = letter_json(&d);
        assert_eq!(j["id"], d.id());
        assert_eq!(j["route"], "recs");
        assert_eq!(j["fragment"], "recs?user_id=7");
        assert_eq!(j["attempts"], 4);
        assert_eq!(j["error"], "upstream 503");
        assert_eq!(j["time"], 1_796_670_036_000_u64);
        assert!(!j.to_string().contains("s3cr3t"), "{j}");
    }

    #[test]
    fn ids_are_stable_and_tell_letters_apart() {
        assert_eq!(letter("a", "x").id(), letter("a", "x").id());
        assert_ne!(letter("a", "x").id(), letter("b", "x").id());
        assert_eq!(letter("a", "x").id().len(), 16);
    }

    #[test]
    fn an_undecodable_letter_has_no_route() {
        let d = DeadLetter {
            queue: "q".into(),
            body: Bytes::from_static(b"junk"),
            reason: "undecodable".into(),
            at_ms: 0,
        };
        let j = letter_json(&d);
        assert_eq!(j["route"], "");
        assert!(j["fragment"].is_null() && j["attempts"].is_null() && j["time"].is_null());
    }
}
