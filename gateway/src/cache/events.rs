//! Follows the events fanout: the moment a worker (in this process or any other) built,
//! failed or purged something, this gateway's cache applies it
//! ([`CacheService`](super::CacheService): L1 evicts, long-polls wake, a tag purge is
//! recorded so every envelope carrying the tag is retired on its next use). Failures are
//! kept for the dashboard. It also sends this gateway's heartbeats ([`super::acks`]).

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, PoisonError};

use tessera_protocol::{Notice, Subscription};
use tokio_util::sync::CancellationToken;

use super::CacheService;

/// Applies events to `cache` until the bus closes or `stopping` is cancelled.
pub(crate) async fn follow(
    cache: Arc<CacheService>,
    mut events: Box<dyn Subscription>,
    stopping: CancellationToken,
) {
    let mut beat = tokio::time::interval(super::acks::HEARTBEAT);
    beat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let notice = tokio::select! {
            () = stopping.cancelled() => return,
            _ = beat.tick() => {
                cache.heartbeat();
                continue;
            }
            notice = events.next() => notice,
        };
        match notice {
            Some(Notice::Event(event)) => cache.apply(&event).await,
            Some(Notice::Lagged) => cache.events_lost(),
            None => {
                tracing::warn!("event subscription closed");
                return;
            }
        }
    }
}

/// A build failure reported by a worker, as the dashboard lists it.
#[derive(Debug, Clone, serde::Serialize)]
pub(crate) struct Failure {
    /// When this gateway heard of it (Unix ms).
    pub at: u64,
    /// The route, read from the key.
    pub route: String,
    /// The worker's error.
    pub error: String,
}

/// Recent failures kept for the dashboard.
const FAILURES_KEPT: usize = 50;

/// The latest build failures any worker reported, newest last, at most
/// [`FAILURES_KEPT`].
#[derive(Debug, Default)]
pub(crate) struct Failures(Mutex<VecDeque<Failure>>);

impl Failures {
    /// Remembers a failure of `route` (`""` when the key named no route of ours).
    pub(crate) fn record(&self, route: &str, error: &str) {
        let mut failures = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        if failures.len() >= FAILURES_KEPT {
            failures.pop_front();
        }
        failures.push_back(Failure {
            at: tessera_protocol::time::now_ms(),
            route: route.to_string(),
            error: error.to_string(),
        });
    }

    /// The failures kept, newest first.
    pub(crate) fn recent(&self) -> Vec<Failure> {
        let failures = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        failures.iter().rev().cloned().collect()
    }
}
