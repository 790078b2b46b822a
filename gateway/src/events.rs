//! Follows the events fanout: evicts L1 entries and wakes long-polls the moment a worker
//! (in this process or any other) built, failed or purged something. A tag purge is
//! recorded in L1's tag table, so every envelope carrying the tag is retired on its next
//! use, in L1 too.

use std::sync::Arc;

use tessera_protocol::{Event, Notice, Subscription};
use tokio_util::sync::CancellationToken;

use crate::admin::Failures;
use crate::metrics::RouteLabels;
use crate::service::CacheService;
use crate::waiters::Waiters;

/// What events act on.
#[derive(Debug)]
pub struct Followers {
    /// L1 to evict from, and the metrics that count builds.
    pub cache: Arc<CacheService>,
    /// Long-polls to wake.
    pub waiters: Arc<Waiters>,
    /// The dashboard's list of recent failures.
    pub failures: Arc<Failures>,
}

/// Applies events until the bus closes or `stopping` is cancelled.
pub async fn follow(to: Followers, mut events: Box<dyn Subscription>, stopping: CancellationToken) {
    loop {
        let notice = tokio::select! {
            () = stopping.cancelled() => return,
            notice = events.next() => notice,
        };
        match notice {
            Some(Notice::Event(event)) => to.apply(&event).await,
            Some(Notice::Lagged) => {
                tracing::info!("events may have been missed; dropping L1");
                to.cache.metrics.events_lagged.inc();
                to.cache.l1.invalidate_all();
                to.waiters.wake_all();
            }
            None => {
                tracing::warn!("event subscription closed");
                return;
            }
        }
    }
}

impl Followers {
    async fn apply(&self, event: &Event) {
        let cache = &self.cache;
        let keys = event
            .key()
            .and_then(|text| cache.backends.keys.parse_envelope_key(text));
        if event.key().is_some() && keys.is_none() {
            tracing::debug!("event for a key outside this namespace ignored");
        }
        // Only configured routes become label values.
        let route = keys
            .as_ref()
            .map(|k| k.route())
            .filter(|r| cache.config.route(r).is_some());
        let labels = route.map(|r| RouteLabels {
            route: r.to_string(),
        });
        if let Event::Failed { error, .. } = event {
            self.failures.record(route.unwrap_or(""), error);
        }
        if let Event::Purged {
            route: Some(route), ..
        } = event
        {
            cache.l1.invalidate_route(route).await;
        }
        if let Event::Purged {
            tag: Some(tag),
            purged_at,
            ..
        } = event
        {
            cache.l1.invalidate_tag(tag, *purged_at);
            cache.metrics.tag_purges_heard.inc();
        }
        if let Some(keys) = &keys {
            // Evict first, then wake: a woken request must not find the old entry.
            cache.l1.invalidate_key(&keys.envelope).await;
            self.waiters.wake(keys.envelope.as_str());
        }
        // Counted once applied: whoever reads a count finds L1 already without the old entry.
        match (event, labels) {
            (Event::Failed { .. }, Some(labels)) => {
                cache.metrics.builds_failed.get_or_create(&labels).inc();
            }
            (Event::Built { build_ms, .. }, Some(labels)) => {
                if let Some(ms) = build_ms {
                    cache
                        .metrics
                        .observe_build(&labels.route, *ms as f64 / 1000.0);
                }
                cache.metrics.builds_succeeded.get_or_create(&labels).inc();
            }
            _ => {}
        }
    }
}
