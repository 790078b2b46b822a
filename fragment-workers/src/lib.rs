//! Tessera's fragment workers: they take build requests off the broker, render the
//! fragment (by default by calling the upstream application), store it, and tell every
//! gateway. Run them as `tessera-worker` processes (distributed mode), or inside the
//! gateway (embedded mode) — the same code either way.
//!
//! # Layout
//! - [`worker`]: the build loop and the store → release → announce → acknowledge contract.
//! - [`builder`]: the [`FragmentBuilder`] trait, its errors, and the default [`HttpBuilder`].
//! - [`limits`]: routes' render limits over the deployment (`max_renders`,
//!   `renders_per_second`), kept in the store.
//! - [`retry`]: exponential backoff with jitter.
//! - [`metrics`]: build outcomes and durations, for Prometheus.
//! - [`admin`]: a worker process's metrics and health listener.

pub mod admin;
pub mod builder;
pub mod limits;
pub mod metrics;
pub mod retry;
pub mod worker;

pub use builder::{BuildError, FragmentBuilder, HttpBuilder, Rendered};
pub use metrics::WorkerMetrics;
pub use worker::{WorkerError, run, run_live};
