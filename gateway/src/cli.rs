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

/// How long one admin call may take.
const CALL_TIMEOUT: Duration = Duration::from_secs(10);

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

/// The admin path that purges `fragment`, given as the public path
/// (`/fragments/recs?user_id=7`) or as `name?query`.
pub fn fragment_purge_path(fragment: &str, prefix: &str) -> String {
    let rest = fragment
        .strip_prefix(prefix)
        .unwrap_or(fragment.trim_start_matches('/'));
    format!("/fragments/{rest}")
}

/// The admin path that purges `tag`; a name that cannot be a tag is refused here, before
/// any call.
pub fn tag_purge_path(tag: &str) -> Result<String, CliError> {
    let tag = tessera_protocol::tags::Tag::new(tag)
        .map_err(|e| CliError::Usage(format!("{tag:?}: {e}")))?;
    Ok(format!("/tags/{}", tag.path_segment()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tag_purge_paths() {
        assert_eq!(tag_purge_path("product-42").unwrap(), "/tags/product-42");
        assert_eq!(tag_purge_path("a#b").unwrap(), "/tags/a%23b");
        assert!(matches!(tag_purge_path("a/b"), Err(CliError::Usage(_))));
        assert!(matches!(tag_purge_path(""), Err(CliError::Usage(_))));
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
