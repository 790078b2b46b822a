//! A `tessera-worker`'s admin listener (`workers.admin_listen`, or `--admin-listen`).
//!
//! | request | answer |
//! | --- | --- |
//! | `GET /healthz` | 200 while the process serves |
//! | `GET /readyz` | 200 when the store and the bus answer, else 503 naming which |
//! | `GET /metrics` | Prometheus text format: `tessera_worker_*`, backend reconnects |
//!
//! When `workers.admin_token` is set, every request must carry
//! `Authorization: Bearer {token}`; the worker refuses to start with the listener off
//! loopback and no token.

use std::future::Future;
use std::sync::Arc;

use http::{Method, Request, Response, StatusCode};
use hyper::body::Incoming;
use prometheus_client::registry::Registry;
use tessera_protocol::Backends;
use tessera_runtime::web::{self, Body};
use tokio::net::TcpListener;

use crate::metrics::WorkerMetrics;

struct Admin {
    registry: Registry,
    backends: Backends,
    token: String,
}

/// Serves the admin endpoints on `listener` until `shutdown`.
pub async fn serve(
    listener: TcpListener,
    metrics: WorkerMetrics,
    backends: Backends,
    token: String,
    shutdown: impl Future<Output = ()>,
) {
    let mut registry = metrics.registry();
    registry.register_collector(Box::new(web::BackendMetrics::new(backends.clone())));
    let admin = Arc::new(Admin {
        registry,
        backends,
        token,
    });
    web::serve(
        listener,
        move |req, _peer| {
            let admin = admin.clone();
            async move { admin.answer(&req).await }
        },
        shutdown,
    )
    .await;
}

impl Admin {
    async fn answer(&self, req: &Request<Incoming>) -> Response<Body> {
        if !web::authorized(req.headers(), &self.token) {
            return web::unauthorized("workers.admin_token");
        }
        match (req.method(), req.uri().path()) {
            (&Method::GET, "/healthz") => web::alive(),
            (&Method::GET, "/readyz") => web::ready(&self.backends).await,
            (&Method::GET, "/metrics") => web::metrics(&self.registry),
            (method, path) => web::problem(
                StatusCode::NOT_FOUND,
                "not_found",
                &format!("no worker admin endpoint {method} {path}"),
            ),
        }
    }
}
