//! The probes: liveness (`/healthz`, the process answers) and readiness (`/readyz`, the
//! store and the bus answer, each within [`READY_TIMEOUT`]).
//!
//! Readiness is a [`Readiness`]: one [`Check`] per backend, keeping the backend's error.
//! It is shown as `{"store": "ok" | why, "bus": "ok" | why}`, both by `/readyz` and by
//! the gateway dashboard's `/api/status` (whose script compares each with `"ok"`).

use std::fmt;
use std::time::Duration;

use http::{Response, StatusCode};
use tokio::time::error::Elapsed;

use tessera_protocol::{Backends, BusError, StoreError};

use super::body::{Body, json, text};

/// Deadline for each readiness check.
pub const READY_TIMEOUT: Duration = Duration::from_secs(2);

/// How one backend answered its readiness check. Shown (`Display`) as `ok`, the error,
/// or `no answer within 2s`.
#[derive(Debug, Clone)]
pub enum Check<E> {
    /// It answered.
    Ready,
    /// It answered with an error.
    Failed(E),
    /// It did not answer within [`READY_TIMEOUT`].
    NoAnswer,
}

impl<E> Check<E> {
    /// Whether the backend answered.
    pub fn is_ready(&self) -> bool {
        matches!(self, Check::Ready)
    }

    /// The check of a ping bounded by [`READY_TIMEOUT`].
    fn of(ping: Result<Result<(), E>, Elapsed>) -> Self {
        match ping {
            Ok(Ok(())) => Check::Ready,
            Ok(Err(e)) => Check::Failed(e),
            Err(_) => Check::NoAnswer,
        }
    }
}

impl<E: fmt::Display> fmt::Display for Check<E> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Check::Ready => f.write_str("ok"),
            Check::Failed(e) => e.fmt(f),
            Check::NoAnswer => write!(f, "no answer within {READY_TIMEOUT:?}"),
        }
    }
}

/// Whether the store and the bus answer.
#[derive(Debug, Clone)]
pub struct Readiness {
    /// The store's check.
    pub store: Check<StoreError>,
    /// The bus's check.
    pub bus: Check<BusError>,
}

impl Readiness {
    /// Whether both answered.
    pub fn is_ready(&self) -> bool {
        self.store.is_ready() && self.bus.is_ready()
    }

    /// `{"store": "ok" | why, "bus": "ok" | why}`, as `/readyz` and the dashboard show it.
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({ "store": self.store.to_string(), "bus": self.bus.to_string() })
    }
}

/// Checks the store and the bus at once, each bounded by [`READY_TIMEOUT`].
pub async fn readiness(backends: &Backends) -> Readiness {
    let (store, bus) = tokio::join!(
        tokio::time::timeout(READY_TIMEOUT, backends.store.ping()),
        tokio::time::timeout(READY_TIMEOUT, backends.bus.ping()),
    );
    Readiness {
        store: Check::of(store),
        bus: Check::of(bus),
    }
}

/// `/readyz`: 200 when the store and the bus answer, else 503 naming which does not.
pub async fn ready(backends: &Backends) -> Response<Body> {
    let readiness = readiness(backends).await;
    let status = if readiness.is_ready() {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    json(status, &readiness.to_json())
}

/// `/healthz`: the process answers.
pub fn alive() -> Response<Body> {
    text(StatusCode::OK, "text/plain; charset=utf-8", "ok\n")
}

#[cfg(test)]
mod tests {
    use http_body_util::BodyExt;
    use tessera_protocol::Cause;

    use super::*;

    /// A `/readyz` answer's status and body.
    async fn answer(response: Response<Body>) -> (StatusCode, String) {
        let status = response.status();
        let body = response.into_body().collect().await.unwrap().to_bytes();
        (status, String::from_utf8(body.to_vec()).unwrap())
    }

    #[tokio::test]
    async fn ready_backends_are_shown_as_ok() {
        let backends = Backends::memory(&tessera_protocol::Config::default());
        let readiness = readiness(&backends).await;
        assert!(readiness.is_ready(), "{readiness:?}");
        assert_eq!(
            readiness.to_json().to_string(),
            r#"{"bus":"ok","store":"ok"}"#
        );
        let (status, body) = answer(ready(&backends).await).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(body, r#"{"bus":"ok","store":"ok"}"#);
    }

    #[test]
    fn a_failed_check_is_shown_as_its_reason() {
        let failed = Readiness {
            store: Check::Failed(StoreError::Unavailable(Cause::new("connection refused"))),
            bus: Check::NoAnswer,
        };
        assert!(!failed.is_ready());
        assert_eq!(
            failed.to_json().to_string(),
            r#"{"bus":"no answer within 2s","store":"store unavailable: connection refused"}"#
        );
        let half = Readiness {
            store: Check::Ready,
            bus: Check::Failed(BusError::Unavailable("not connected".into())),
        };
        assert!(!half.is_ready());
        assert_eq!(
            half.to_json().to_string(),
            r#"{"bus":"bus unavailable: not connected","store":"ok"}"#
        );
    }
}
