//! The probes: liveness (`/healthz`, the process answers) and readiness (`/readyz`, the
//! store and the bus answer, each within [`READY_TIMEOUT`]).

use std::time::Duration;

use http::{Response, StatusCode};

use tessera_protocol::Backends;

use super::body::{Body, json, text};

/// Deadline for each readiness check.
pub const READY_TIMEOUT: Duration = Duration::from_secs(2);

/// `("ok" | why, "ok" | why)` for the store and the bus, each bounded by
/// [`READY_TIMEOUT`].
pub async fn readiness(backends: &Backends) -> (String, String) {
    let (store, bus) = tokio::join!(
        tokio::time::timeout(READY_TIMEOUT, backends.store.ping()),
        tokio::time::timeout(READY_TIMEOUT, backends.bus.ping()),
    );
    let verdict = |r: Result<Result<(), String>, tokio::time::error::Elapsed>| match r {
        Ok(Ok(())) => "ok".to_string(),
        Ok(Err(e)) => e,
        Err(_) => format!("no answer within {READY_TIMEOUT:?}"),
    };
    (
        verdict(store.map(|r| r.map_err(|e| e.to_string()))),
        verdict(bus.map(|r| r.map_err(|e| e.to_string()))),
    )
}

/// `/readyz`: 200 when the store and the bus answer, else 503 naming which does not.
pub async fn ready(backends: &Backends) -> Response<Body> {
    let (store, bus) = readiness(backends).await;
    let status = if store == "ok" && bus == "ok" {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    json(status, &serde_json::json!({ "store": store, "bus": bus }))
}

/// `/healthz`: the process answers.
pub fn alive() -> Response<Body> {
    text(StatusCode::OK, "text/plain; charset=utf-8", "ok\n")
}
