//! Helpers shared by Tessera's end-to-end tests: a fake upstream that counts renders, a
//! gateway harness on `127.0.0.1:0`, backends of either kind, and `eventually`.
//!
//! # Layout
//! - [`upstream`]: the fake web application (scriptable statuses and delays, counts).
//! - [`browser`]: headless Chromium through chromedriver, for tests as a person sees it.
//! - [`cluster`]: real gateway and worker processes on memcached and RabbitMQ; memcached
//!   processes of a test's own.
//! - [`conformance`]: the `Store` and `Bus` conformance suites, run on every backend.
//! - [`counting`]: a `Store` wrapper that counts round trips.
//! - [`harness`]: start and stop gateways; choose memory or real backends.
//! - [`servers`]: several memcached servers of a test's own, to kill, stop and resume.
//! - [`eventually`]: wait for a condition with a bounded deadline; [`metric`]: read a sample.
//! - [`on_both_backends!`]: run a file's scenarios as tests on memory and real backends.

#![allow(clippy::unwrap_used, clippy::expect_used)]

pub mod browser;
pub mod cluster;
pub mod conformance;
pub mod counting;
pub mod harness;
pub mod servers;
pub mod upstream;

use std::future::Future;
use std::time::Duration;

/// Waits until `check` returns true, polling every 20 ms; panics naming `what` when it is
/// still false after `within`.
pub async fn eventually<F, Fut>(what: &str, within: Duration, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + within;
    loop {
        if check().await {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out after {within:?} waiting for: {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The value of the first Prometheus sample line starting with `line_start` (name and
/// labels), or 0 when there is none.
pub fn metric(text: &str, line_start: &str) -> f64 {
    text.lines()
        .find(|l| l.starts_with(line_start))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}

/// Runs scenarios (`async fn name(kind: Backend)` in the calling file) as tests on both
/// backends: `mod memory` on the in-process store and bus, `mod real` on memcached and
/// RabbitMQ, so both are held to the same behaviour.
#[macro_export]
macro_rules! on_both_backends {
    ($($name:ident),+ $(,)?) => {
        mod memory {
            $crate::on_backend!($crate::harness::Backend::Memory, $($name),+);
        }
        /// The same scenarios on memcached and RabbitMQ.
        mod real {
            $crate::on_backend!($crate::harness::Backend::Real, $($name),+);
        }
    };
}

/// One test per scenario of the parent module, on backend `$kind` (see
/// [`on_both_backends!`]).
#[macro_export]
macro_rules! on_backend {
    ($kind:expr, $($name:ident),+ $(,)?) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $name() {
                super::$name($kind).await;
            }
        )+
    };
}
