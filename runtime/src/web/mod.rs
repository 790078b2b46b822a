//! The HTTP pieces the gateway and `tessera-worker` share: the accept loop, the response
//! body type, problem responses, and the admin surface both expose (token check,
//! readiness, `/metrics` and the backends' reconnect counters).
//!
//! The accept loop serves HTTP/1.1 and h2c on one port with the `[http]` limits: a bound
//! on open connections (counted in a gauge), on the request head (431 past it), and on
//! the time a connection may stay silent or idle (see `idle`); and graceful shutdown
//! under a deadline.
//!
//! # Layout
//! - `serve`: the accept loop and each connection, with the `[http]` limits.
//! - `drain`: closing connections gracefully, at shutdown or when idle.
//! - `idle`: the watchdog that finds connections silent or idle past their deadline.
//! - `threads`: one listener served by several threads, each with a runtime of its own.
//! - `body`: the response body type, and problem, text and JSON answers.
//! - `gate`: the admin gate: token check, cross-site refusal, hardening headers.
//! - `ready`: the liveness and readiness probes.
//! - `metrics`: `/metrics` exposition and the collectors both binaries register.

mod body;
mod drain;
mod gate;
mod idle;
mod metrics;
mod ready;
mod serve;
mod threads;

pub use body::{Body, BoxError, empty, full, json, problem, stream, text};
pub use gate::{admin_gate, authorized, cross_site, harden, unauthorized};
pub use metrics::{BackendMetrics, ConnectionGauges, metrics, wants_openmetrics};
pub use ready::{Check, READY_TIMEOUT, Readiness, alive, readiness, ready};
pub use serve::{DRAIN_DEADLINE, ServeOptions, serve};
pub use threads::Threads;
