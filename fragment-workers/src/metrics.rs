//! What a pool of workers counts: build outcomes and durations by route, requests dropped
//! without a build by route and reason, builds in flight, limited routes' renders in
//! flight and waits ([`crate::limits`]), store and bus errors.
//!
//! A `tessera-worker` serves them on its admin listener as `tessera_worker_*`; embedded
//! workers register them in their gateway's registry under the same names, so one
//! dashboard query covers both modes.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

/// Labels that are just the route (`""` for requests that name no configured route).
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RouteLabels {
    /// Route name.
    pub route: String,
}

/// Labels of a build request dropped without a build: its route and why.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DropLabels {
    /// Route name.
    pub route: String,
    /// Why: `purged` (its route moved to a newer generation since the request was
    /// made), `superseded` (the lease holds another request's id) or `already_built`
    /// (the lease was free and the fragment fresh), or `route_removed` (a configuration
    /// reload removed its route).
    pub reason: &'static str,
}

/// The metrics of one worker pool. Cheap to share: every field is a handle.
#[derive(Debug, Clone)]
pub struct WorkerMetrics {
    /// Builds stored.
    pub succeeded: Family<RouteLabels, Counter>,
    /// Builds that ended in a `failed` envelope (4xx, oversize, or out of attempts).
    pub failed: Family<RouteLabels, Counter>,
    /// Attempts scheduled again after a retryable error.
    pub retried: Family<RouteLabels, Counter>,
    /// Requests sent to the dead-letter queue (out of attempts, undecodable, misfit).
    pub dead_lettered: Family<RouteLabels, Counter>,
    /// Requests acknowledged without a build, by route and reason: superseded by a
    /// newer request for the same fragment, already built, or for a purged generation.
    pub dropped: Family<DropLabels, Counter>,
    /// Render-and-store time of stored builds.
    pub duration: Family<RouteLabels, Histogram, fn() -> Histogram>,
    /// Builds running now.
    pub in_flight: Gauge,
    /// Renders of a limited route (`max_renders`) in flight over the whole deployment,
    /// as this process last counted the route's slots.
    pub limited_renders: Family<RouteLabels, Gauge>,
    /// Builds of a limited route waiting for a render slot or a second's token now.
    pub limit_waiting: Family<RouteLabels, Gauge>,
    /// How long builds of a limited route waited for its limits.
    pub limit_wait: Family<RouteLabels, Histogram, fn() -> Histogram>,
    /// Store calls that failed.
    pub store_errors: Counter,
    /// Bus calls (publish, settle) that failed.
    pub bus_errors: Counter,
}

fn duration_histogram() -> Histogram {
    // 1 ms to ~65 s.
    Histogram::new(exponential_buckets(0.001, 2.0, 17))
}

impl Default for WorkerMetrics {
    fn default() -> Self {
        Self {
            succeeded: Family::default(),
            failed: Family::default(),
            retried: Family::default(),
            dead_lettered: Family::default(),
            dropped: Family::default(),
            duration: Family::new_with_constructor(duration_histogram as fn() -> Histogram),
            in_flight: Gauge::default(),
            limited_renders: Family::default(),
            limit_waiting: Family::default(),
            limit_wait: Family::new_with_constructor(duration_histogram as fn() -> Histogram),
            store_errors: Counter::default(),
            bus_errors: Counter::default(),
        }
    }
}

impl WorkerMetrics {
    /// Registers every metric in `registry` (names relative to its prefix).
    pub fn register(&self, registry: &mut Registry) {
        registry.register("builds_succeeded", "Builds stored", self.succeeded.clone());
        registry.register(
            "builds_failed",
            "Builds that ended in a failed envelope",
            self.failed.clone(),
        );
        registry.register(
            "builds_retried",
            "Attempts scheduled again after a retryable error",
            self.retried.clone(),
        );
        registry.register(
            "builds_dead_lettered",
            "Build requests sent to the dead-letter queue",
            self.dead_lettered.clone(),
        );
        registry.register(
            "builds_dropped",
            "Build requests acknowledged without a build, by reason (superseded, already_built, purged)",
            self.dropped.clone(),
        );
        registry.register(
            "build_duration_seconds",
            "Render-and-store time of stored builds",
            self.duration.clone(),
        );
        registry.register(
            "builds_in_flight",
            "Builds running now",
            self.in_flight.clone(),
        );
        registry.register(
            "limited_renders",
            "Renders of a route with max_renders in flight over the deployment, as last counted",
            self.limited_renders.clone(),
        );
        registry.register(
            "builds_waiting_for_limit",
            "Builds of a limited route waiting for a render slot or a second's token",
            self.limit_waiting.clone(),
        );
        registry.register(
            "limit_wait_seconds",
            "Time builds of a limited route waited for its limits",
            self.limit_wait.clone(),
        );
        registry.register(
            "store_errors",
            "Store calls that failed",
            self.store_errors.clone(),
        );
        registry.register(
            "bus_errors",
            "Bus calls that failed",
            self.bus_errors.clone(),
        );
    }

    /// A registry prefixed `tessera` holding these metrics as `tessera_worker_*`, so
    /// process-wide figures (backend reconnects) can sit beside them as `tessera_*`.
    pub fn registry(&self) -> Registry {
        let mut registry = Registry::with_prefix("tessera");
        self.register(registry.sub_registry_with_prefix("worker"));
        registry
    }

    /// A build of `route` stored after `took`.
    pub(crate) fn stored(&self, route: &str, took: std::time::Duration) {
        let labels = RouteLabels {
            route: route.to_string(),
        };
        self.succeeded.get_or_create(&labels).inc();
        self.duration
            .get_or_create(&labels)
            .observe(took.as_secs_f64());
    }

    /// A request of `route` dropped without a build, for `reason` (see [`DropLabels`]).
    pub(crate) fn dropped(&self, route: &str, reason: &'static str) {
        self.dropped
            .get_or_create(&DropLabels {
                route: route.to_string(),
                reason,
            })
            .inc();
    }

    /// One route's counter of `family`.
    pub(crate) fn count(family: &Family<RouteLabels, Counter>, route: &str) {
        family
            .get_or_create(&RouteLabels {
                route: route.to_string(),
            })
            .inc();
    }
}
