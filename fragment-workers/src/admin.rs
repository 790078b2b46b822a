//! A `tessera-worker`'s admin listener (`workers.admin_listen`, or `--admin-listen`).
//!
//! | request | answer |
//! | --- | --- |
//! | `GET /healthz` | 200 while the process serves; needs no token (probes) |
//! | `GET /readyz` | 200 when the store and the bus answer, else 503 naming which |
//! | `GET /metrics` | `tessera_worker_*`, backend reconnects, open connections: Prometheus text format 0.0.4, or OpenMetrics when `Accept` asks for it |
//!
//! When `workers.admin_token` is set, every request but `/healthz` must carry
//! `Authorization: Bearer {token}`; the worker refuses to start with the listener off
//! loopback and no token. Nothing here changes state, but the gate shared with the
//! gateway's admin would refuse a cross-site request that did.

use std::future::Future;
use std::sync::Arc;

use http::{Method, Request, Response, StatusCode};
use hyper::body::Incoming;
use prometheus_client::registry::Registry;
use tessera_protocol::Backends;
use tessera_protocol::config::HttpConfig;
use tessera_runtime::web::{self, Body};
use tokio::net::TcpListener;

use crate::metrics::WorkerMetrics;

struct Admin {
    registry: Registry,
    backends: Backends,
    token: String,
    /// Where the listener listens (what a request without a token must name).
    listen: std::net::SocketAddr,
}

/// Serves the admin endpoints on `listener`, with the connection limits of `http`, until
/// `shutdown`.
pub async fn serve(
    listener: TcpListener,
    metrics: WorkerMetrics,
    backends: Backends,
    token: String,
    http: HttpConfig,
    shutdown: impl Future<Output = ()>,
) {
    let mut registry = metrics.registry();
    registry.register_collector(Box::new(web::BackendMetrics::new(backends.clone())));
    let connections = web::ConnectionGauges::default();
    connections.register(&mut registry);
    let options = web::ServeOptions::new(&http).counted_by(connections.listener("admin"));
    let Ok(listen) = listener.local_addr() else {
        tracing::error!("the admin listener has no address; not serving it");
        return;
    };
    let admin = Arc::new(Admin {
        registry,
        backends,
        token,
        listen,
    });
    web::serve(
        listener,
        options,
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
        let mut response =
            match web::admin_gate(req, &self.token, "workers.admin_token", self.listen) {
                Some(refused) => refused,
                None => self.route(req).await,
            };
        web::harden(response.headers_mut());
        response
    }

    async fn route(&self, req: &Request<Incoming>) -> Response<Body> {
        match (req.method(), req.uri().path()) {
            (&Method::GET, "/healthz") => web::alive(),
            (&Method::GET, "/readyz") => web::ready(&self.backends).await,
            (&Method::GET, "/metrics") => web::metrics(&self.registry, req.headers()),
            (method, path) => web::problem(
                StatusCode::NOT_FOUND,
                "not_found",
                &format!("no worker admin endpoint {method} {path}"),
            ),
        }
    }
}
