//! Follows the events fanout: evicts L1 entries and wakes long-polls the moment a worker
//! (in this process or any other) built, failed or purged something.

use std::sync::Arc;

use tessera_protocol::{Event, Notice, Subscription};

use crate::Gateway;

/// Applies events until the bus closes or the gateway stops.
pub async fn follow(gateway: Arc<Gateway>, mut events: Box<dyn Subscription>) {
    loop {
        let notice = tokio::select! {
            () = gateway.stopping.cancelled() => return,
            notice = events.next() => notice,
        };
        match notice {
            Some(Notice::Event(event)) => apply(&gateway, &event).await,
            Some(Notice::Lagged) => {
                tracing::info!("events may have been missed; dropping L1");
                gateway.metrics.events_lagged.inc();
                gateway.l1.invalidate_all();
                gateway.waiters.wake_all();
            }
            None => {
                tracing::warn!("event subscription closed");
                return;
            }
        }
    }
}

async fn apply(gateway: &Gateway, event: &Event) {
    // Only configured routes become label values.
    let route = event
        .key()
        .and_then(|k| k.split(':').nth(2))
        .filter(|r| gateway.config.route(r).is_some())
        .map(|r| crate::metrics::RouteLabels {
            route: r.to_string(),
        });
    match (event, route) {
        (Event::Failed { key, error }, route) => {
            gateway.record_failure(key, error);
            if let Some(route) = route {
                gateway.metrics.builds_failed.get_or_create(&route).inc();
            }
        }
        (Event::Built { build_ms, .. }, Some(route)) => {
            if let Some(ms) = build_ms {
                gateway
                    .metrics
                    .observe_build(&route.route, *ms as f64 / 1000.0);
            }
            gateway.metrics.builds_succeeded.get_or_create(&route).inc();
        }
        _ => {}
    }
    if let Event::Purged {
        route: Some(route), ..
    } = event
    {
        gateway.l1.invalidate_route(route).await;
    }
    if let Some(text) = event.key() {
        match gateway.backends.keys.parse_envelope_key(text) {
            Some(key) => {
                // Evict first, then wake: a woken request must not find the old entry.
                gateway.l1.invalidate_key(&key).await;
                gateway.waiters.wake(key.as_str());
            }
            None => tracing::debug!("event for a key outside this namespace ignored"),
        }
    }
}
