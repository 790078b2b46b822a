//! `tessera-gateway purge …` (a fragment, a route or a tag) and
//! `tessera-gateway dead-letters …`: thin clients of a running gateway's admin API, so
//! they work in embedded mode too (where the store lives inside the gateway process) and
//! purges reach every gateway through the events exchange.

use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, StatusCode, header};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

/// How long one admin call may take (a purge may wait 10 s for acknowledgements).
const CALL_TIMEOUT: Duration = Duration::from_secs(15);

/// A failed admin call, with what to tell the operator.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    /// The admin URL or path is not valid.
    #[error("bad request: {0}")]
    Usage(String),
    /// The gateway could not be reached.
    #[error("cannot reach the gateway's admin listener at {url}: {reason}")]
    Unreachable {
        /// Where we tried.
        url: String,
        /// Why it failed.
        reason: String,
    },
    /// The gateway answered with an error.
    #[error("the gateway answered {status}: {body}")]
    Refused {
        /// Its status.
        status: StatusCode,
        /// Its problem document.
        body: String,
    },
}

/// Sends `method path` to the admin listener at `base` with `token`; returns the body.
pub async fn call(base: &str, token: &str, method: Method, path: &str) -> Result<String, CliError> {
    let url = format!("{}{path}", base.trim_end_matches('/'));
    let mut req = Request::builder().method(method).uri(&url);
    if !token.is_empty() {
        req = req.header(header::AUTHORIZATION, format!("Bearer {token}"));
    }
    let req = req
        .body(Full::new(Bytes::new()))
        .map_err(|e| CliError::Usage(format!("{url}: {e}")))?;
    let client = Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
    let unreachable = |reason: String| CliError::Unreachable {
        url: url.clone(),
        reason,
    };
    let response = tokio::time::timeout(CALL_TIMEOUT, client.request(req))
        .await
        .map_err(|_| unreachable(format!("no answer within {CALL_TIMEOUT:?}")))?
        .map_err(|e| unreachable(e.to_string()))?;
    let status = response.status();
    let body = tokio::time::timeout(CALL_TIMEOUT, response.into_body().collect())
        .await
        .map_err(|_| unreachable("the answer did not finish".into()))?
        .map_err(|e| unreachable(e.to_string()))?
        .to_bytes();
    let body = String::from_utf8_lossy(&body).into_owned();
    if !status.is_success() {
        return Err(CliError::Refused { status, body });
    }
    Ok(body)
}

/// The admin request that retries (`POST`) or discards (`DELETE`) the dead letter `id`,
/// or every dead letter of `route`.
pub fn dead_letter_path(method: Method, id: Option<&str>, route: Option<&str>) -> (Method, String) {
    let encode = |s: &str| {
        percent_encoding::utf8_percent_encode(s, percent_encoding::NON_ALPHANUMERIC).to_string()
    };
    let path = match (&method, id, route) {
        (&Method::POST, Some(id), _) => format!("/dead-letters/{}/retry", encode(id)),
        (&Method::POST, None, route) => {
            format!("/dead-letters/retry?route={}", encode(route.unwrap_or("")))
        }
        (_, Some(id), _) => format!("/dead-letters/{}", encode(id)),
        (_, None, route) => format!("/dead-letters?route={}", encode(route.unwrap_or(""))),
    };
    (method, path)
}

/// The admin API's dead-letter list (`GET /dead-letters`) as a table: id, route,
/// fragment, attempts, time (UTC) and error, one letter a line, oldest first.
pub fn dead_letter_table(json: &str) -> Result<String, CliError> {
    use std::fmt::Write;
    let letters: Vec<serde_json::Value> = serde_json::from_str(json)
        .map_err(|e| CliError::Usage(format!("the gateway's list is not JSON: {e}")))?;
    if letters.is_empty() {
        return Ok("no dead letters\n".into());
    }
    let text = |v: &serde_json::Value| match v {
        serde_json::Value::String(s) => s.clone(),
        serde_json::Value::Null => "-".into(),
        other => other.to_string(),
    };
    let rows: Vec<[String; 6]> = letters
        .iter()
        .map(|l| {
            let time = l["time"].as_u64().map_or("-".into(), utc);
            let mut error = text(&l["error"]).replace(['\n', '\r'], " ");
            if error.chars().count() > 80 {
                error = error.chars().take(79).collect::<String>() + "…";
            }
            let route = text(&l["route"]);
            let route = if route.is_empty() { "-".into() } else { route };
            [
                text(&l["id"]),
                route,
                text(&l["fragment"]),
                text(&l["attempts"]),
                time,
                error,
            ]
        })
        .collect();
    let head = ["ID", "ROUTE", "FRAGMENT", "ATTEMPTS", "TIME", "ERROR"];
    let width = |i: usize| {
        rows.iter()
            .map(|r| r[i].chars().count())
            .chain([head[i].len()])
            .max()
            .unwrap_or(0)
    };
    let widths: Vec<usize> = (0..5).map(width).collect();
    let mut out = String::new();
    for row in std::iter::once(head.map(String::from)).chain(rows) {
        for (i, cell) in row.iter().enumerate().take(5) {
            let _ = write!(out, "{cell:<w$}  ", w = widths[i]);
        }
        let _ = writeln!(out, "{}", row[5]);
    }
    Ok(out)
}

/// `ms` since the epoch as `YYYY-MM-DD HH:MM:SS`, UTC.
fn utc(ms: u64) -> String {
    let t = std::time::UNIX_EPOCH + Duration::from_millis(ms);
    let (y, mo, d, h, mi, s) = crate::http::access_log::civil(t);
    format!("{y:04}-{mo:02}-{d:02} {h:02}:{mi:02}:{s:02}")
}

/// The admin path that purges `fragment`, given as the public path
/// (`/fragments/recs?user_id=7`) or as `name?query`.
pub fn fragment_purge_path(fragment: &str, prefix: &str) -> String {
    let rest = fragment
        .strip_prefix(prefix)
        .unwrap_or(fragment.trim_start_matches('/'));
    format!("/fragments/{rest}")
}

/// The admin path that purges `tags` (each, or the fragments carrying all of them); a
/// name that cannot be a tag is refused here, before any call.
pub fn tag_purge_path(tags: &[String], all_of: bool) -> Result<String, CliError> {
    let mut segments = Vec::with_capacity(tags.len());
    for name in tags {
        let tag = tessera_protocol::tags::Tag::new(name)
            .map_err(|e| CliError::Usage(format!("{name:?}: {e}")))?;
        segments.push(tag.path_segment());
    }
    if segments.is_empty() {
        return Err(CliError::Usage("name at least one tag".into()));
    }
    let query = if all_of { "?all_of=1" } else { "" };
    Ok(format!("/tags/{}{query}", segments.join(",")))
}

/// `path` asking for a `soft` purge (`soft=1`) that waits up to `wait` for
/// acknowledgements (`wait=`), as asked.
pub fn with_options(path: &str, soft: bool, wait: Option<&str>) -> String {
    let mut path = path.to_string();
    let mut add = |option: String| {
        path.push(if path.contains('?') { '&' } else { '?' });
        path.push_str(&option);
    };
    if soft {
        add("soft=1".into());
    }
    if let Some(wait) = wait {
        let wait = percent_encoding::utf8_percent_encode(wait, percent_encoding::NON_ALPHANUMERIC);
        add(format!("wait={wait}"));
    }
    path
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dead_letter_actions_name_one_letter_or_a_route() {
        let p = |m, id, route| dead_letter_path(m, id, route).1;
        assert_eq!(
            p(Method::POST, Some("ab12"), None),
            "/dead-letters/ab12/retry"
        );
        assert_eq!(p(Method::DELETE, Some("ab12"), None), "/dead-letters/ab12");
        assert_eq!(
            p(Method::POST, None, Some("recs")),
            "/dead-letters/retry?route=recs"
        );
        assert_eq!(
            p(Method::DELETE, None, Some("recs")),
            "/dead-letters?route=recs"
        );
        assert_eq!(p(Method::DELETE, Some("a/b"), None), "/dead-letters/a%2Fb");
    }

    #[test]
    fn dead_letters_print_as_a_table() {
        let json = r#"[{"id":"0123456789abcdef","route":"recs","fragment":"recs?user_id=7",
            "attempts":4,"time":1796670036000,"error":"upstream answered 503\nagain"},
            {"id":"fedcba9876543210","route":"","fragment":null,"attempts":null,"time":null,
            "error":"undecodable"}]"#;
        let table = dead_letter_table(json).unwrap();
        let lines: Vec<&str> = table.lines().collect();
        assert_eq!(lines.len(), 3, "{table}");
        assert!(
            lines[0].starts_with("ID  ") && lines[0].ends_with("ERROR"),
            "{table}"
        );
        assert!(lines[1].contains("recs?user_id=7") && lines[1].contains("2026-12-07 19:00:36"));
        assert!(lines[1].ends_with("upstream answered 503 again"), "{table}");
        assert!(lines[2].starts_with("fedcba9876543210  -    "), "{table}");
        let error_at = lines[0].find("ERROR").unwrap();
        assert_eq!(
            lines[1].find("upstream").unwrap(),
            error_at,
            "columns line up"
        );
        assert_eq!(dead_letter_table("[]").unwrap(), "no dead letters\n");
    }

    #[test]
    fn tag_purge_paths() {
        let path = |names: &[&str], all_of| {
            let names: Vec<String> = names.iter().map(|n| n.to_string()).collect();
            tag_purge_path(&names, all_of)
        };
        assert_eq!(path(&["product-42"], false).unwrap(), "/tags/product-42");
        assert_eq!(path(&["a#b"], false).unwrap(), "/tags/a%23b");
        assert_eq!(path(&["a", "b"], false).unwrap(), "/tags/a,b");
        assert_eq!(path(&["a", "b"], true).unwrap(), "/tags/a,b?all_of=1");
        assert!(matches!(path(&["a/b"], false), Err(CliError::Usage(_))));
        assert!(matches!(path(&["a,b"], false), Err(CliError::Usage(_))));
        assert!(matches!(path(&[""], false), Err(CliError::Usage(_))));
        assert!(matches!(path(&[], false), Err(CliError::Usage(_))));
    }

    #[test]
    fn purges_wait_when_asked() {
        assert_eq!(
            with_options("/routes/r", false, Some("2s")),
            "/routes/r?wait=2s"
        );
        assert_eq!(
            with_options("/tags/a,b?all_of=1", false, Some("500ms")),
            "/tags/a,b?all_of=1&wait=500ms"
        );
        assert_eq!(
            with_options("/routes/r", false, Some("2 s")),
            "/routes/r?wait=2%20s"
        );
        assert_eq!(
            with_options("/tags/a", true, Some("1s")),
            "/tags/a?soft=1&wait=1s"
        );
        assert_eq!(with_options("/tags/a", false, None), "/tags/a");
    }

    #[test]
    fn purge_paths() {
        assert_eq!(
            fragment_purge_path("/fragments/recs?u=1", "/fragments/"),
            "/fragments/recs?u=1"
        );
        assert_eq!(
            fragment_purge_path("recs?u=1", "/fragments/"),
            "/fragments/recs?u=1"
        );
        assert_eq!(fragment_purge_path("/f/recs", "/f/"), "/fragments/recs");
    }
}
