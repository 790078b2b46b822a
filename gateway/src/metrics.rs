//! The gateway's Prometheus metrics.
//!
//! Each gateway owns its registry (no process-global state), so several gateways in one
//! process — tests, or embedded workers beside a gateway — keep their own figures.
//! Histograms have explicit buckets so they can be aggregated across gateways.

use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
pub use tessera_workers::metrics::RouteLabels;
use tessera_workers::metrics::WorkerMetrics;

/// How a fragment request was answered.
#[derive(Debug, Clone, Copy, Hash, PartialEq, Eq, EncodeLabelValue)]
#[allow(non_camel_case_types)]
pub enum CacheStatus {
    /// Fresh (200 or 304).
    hit,
    /// Stale, or a failed build's last good copy.
    stale,
    /// 202 placeholder.
    pending,
    /// 4xx/5xx.
    error,
}

/// Labels of per-route request counters.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    /// Route name (only configured routes; unknown names count as `""`).
    pub route: String,
    /// How it was answered.
    pub cache: CacheStatus,
}

/// Latency buckets in seconds: 0.5 ms to ~33 s (long-polls included).
pub fn latency_buckets() -> impl Iterator<Item = f64> {
    prometheus_client::metrics::histogram::exponential_buckets(0.0005, 2.0, 17)
}

fn latency_histogram() -> Histogram {
    Histogram::new(latency_buckets())
}

/// One route's request and build counters, created once so the hot path neither
/// allocates label strings nor looks labels up.
#[derive(Debug, Clone)]
pub struct RouteMetrics {
    hit: Counter,
    stale: Counter,
    pending: Counter,
    error: Counter,
    latency: Histogram,
    /// Builds this gateway queued for the route.
    pub published: Counter,
    /// Build requests for the route that found one already queued.
    pub coalesced: Counter,
}

impl RouteMetrics {
    /// Counts one answered fragment request.
    pub fn request(&self, cache: CacheStatus, seconds: f64) {
        match cache {
            CacheStatus::hit => &self.hit,
            CacheStatus::stale => &self.stale,
            CacheStatus::pending => &self.pending,
            CacheStatus::error => &self.error,
        }
        .inc();
        self.latency.observe(seconds);
    }
}

/// Every metric the gateway exports.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    /// Fragment requests by route and cache status.
    pub requests: Family<RequestLabels, Counter>,
    /// Fragment request latency by route.
    pub latency: Family<RouteLabels, Histogram, fn() -> Histogram>,
    /// Builds this gateway queued (it won the lease).
    pub builds_published: Family<RouteLabels, Counter>,
    /// Build requests that found one already queued (lost the lease).
    pub builds_coalesced: Family<RouteLabels, Counter>,
    /// Store call failures seen while answering.
    pub store_errors: Counter,
    /// Bus publish failures seen while answering.
    pub bus_errors: Counter,
    /// Envelopes in the store that did not decode (treated as misses).
    pub undecodable: Counter,
    /// ESI includes refused because their `src` named no route.
    pub includes_refused: Counter,
    /// Times the event subscription said events may have been missed.
    pub events_lagged: Counter,
    /// L1 entries (set at scrape).
    pub l1_entries: Gauge,
    /// L1 bytes (set at scrape).
    pub l1_bytes: Gauge,
    /// Requests holding a `Prefer: wait` (set at scrape).
    pub long_polls: Gauge,
    /// Build durations reported in `built` events, by route.
    pub build_duration: Family<RouteLabels, Histogram, fn() -> Histogram>,
    /// Builds any worker reported done (`built` events), by route.
    pub builds_succeeded: Family<RouteLabels, Counter>,
    /// Builds any worker reported failed for good (`failed` events), by route.
    pub builds_failed: Family<RouteLabels, Counter>,
    /// The embedded workers' metrics (`tessera_worker_*`).
    pub worker: WorkerMetrics,
    routes: std::collections::HashMap<String, RouteMetrics, foldhash::fast::RandomState>,
    /// Requests for names that are no route (label `""`).
    unknown: RouteMetrics,
}

impl Metrics {
    /// A fresh registry with every metric registered, for the given route names.
    pub fn new<'a>(route_names: impl IntoIterator<Item = &'a str>) -> Self {
        let mut registry = Registry::with_prefix("tessera");
        let requests: Family<RequestLabels, Counter> = Family::default();
        let latency = Family::new_with_constructor(latency_histogram as fn() -> Histogram);
        let builds_published: Family<RouteLabels, Counter> = Family::default();
        let builds_coalesced: Family<RouteLabels, Counter> = Family::default();
        let (store_errors, bus_errors, undecodable, includes_refused, events_lagged) =
            Default::default();
        let (l1_entries, l1_bytes, long_polls) = Default::default();
        let build_duration = Family::new_with_constructor(latency_histogram as fn() -> Histogram);
        let builds_succeeded: Family<RouteLabels, Counter> = Family::default();
        let builds_failed: Family<RouteLabels, Counter> = Family::default();
        registry.register(
            "requests",
            "Fragment requests by route and cache status",
            Family::clone(&requests),
        );
        registry.register(
            "request_duration_seconds",
            "Fragment request latency",
            Family::clone(&latency),
        );
        registry.register(
            "builds_published",
            "Builds queued by this gateway",
            Family::clone(&builds_published),
        );
        registry.register(
            "builds_coalesced",
            "Build requests that found one already queued",
            Family::clone(&builds_coalesced),
        );
        registry.register(
            "store_errors",
            "Store failures while answering",
            Counter::clone(&store_errors),
        );
        registry.register(
            "bus_errors",
            "Bus failures while answering",
            Counter::clone(&bus_errors),
        );
        registry.register(
            "envelopes_undecodable",
            "Stored envelopes that did not decode",
            Counter::clone(&undecodable),
        );
        registry.register(
            "esi_includes_refused",
            "ESI includes whose src named no fragment route",
            Counter::clone(&includes_refused),
        );
        registry.register(
            "events_lagged",
            "Times events may have been missed and L1 was dropped",
            Counter::clone(&events_lagged),
        );
        registry.register(
            "builds_succeeded",
            "Builds reported done by any worker",
            Family::clone(&builds_succeeded),
        );
        registry.register(
            "builds_failed",
            "Builds reported failed for good by any worker",
            Family::clone(&builds_failed),
        );
        registry.register(
            "build_duration_seconds",
            "Build durations reported by workers",
            Family::clone(&build_duration),
        );
        registry.register("l1_entries", "Entries in L1", Gauge::clone(&l1_entries));
        registry.register("l1_bytes", "Bytes held by L1", Gauge::clone(&l1_bytes));
        registry.register(
            "long_polls",
            "Fragments with requests waiting on them (Prefer: wait)",
            Gauge::clone(&long_polls),
        );
        let handles = |route: &str| {
            let by = |cache| {
                requests
                    .get_or_create(&RequestLabels {
                        route: route.to_string(),
                        cache,
                    })
                    .clone()
            };
            let labels = RouteLabels {
                route: route.to_string(),
            };
            RouteMetrics {
                hit: by(CacheStatus::hit),
                stale: by(CacheStatus::stale),
                pending: by(CacheStatus::pending),
                error: by(CacheStatus::error),
                latency: latency.get_or_create(&labels).clone(),
                published: builds_published.get_or_create(&labels).clone(),
                coalesced: builds_coalesced.get_or_create(&labels).clone(),
            }
        };
        let worker = WorkerMetrics::default();
        worker.register(registry.sub_registry_with_prefix("worker"));
        let routes = route_names
            .into_iter()
            .map(|r| (r.to_string(), handles(r)))
            .collect();
        let unknown = handles("");
        Self {
            worker,
            routes,
            unknown,
            registry,
            requests,
            latency,
            builds_published,
            builds_coalesced,
            store_errors,
            bus_errors,
            undecodable,
            includes_refused,
            events_lagged,
            l1_entries,
            l1_bytes,
            long_polls,
            build_duration,
            builds_succeeded,
            builds_failed,
        }
    }

    /// Build durations by route, as reported in `built` events by any worker.
    pub fn observe_build(&self, route: &str, seconds: f64) {
        self.build_duration
            .get_or_create(&RouteLabels {
                route: route.to_string(),
            })
            .observe(seconds);
    }

    /// The counters of `route`; names that are no configured route share one set (label
    /// `""`), so arbitrary paths cannot grow the metric set.
    pub fn route(&self, route: &str) -> &RouteMetrics {
        self.routes.get(route).unwrap_or(&self.unknown)
    }

    /// Every registered metric.
    pub fn registry(&self) -> &Registry {
        &self.registry
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_counters_and_real_histogram_buckets() {
        let m = Metrics::new(["recs"]);
        m.route("recs").request(CacheStatus::hit, 0.002);
        m.route("recs").request(CacheStatus::pending, 0.001);
        m.route("recs").published.inc();
        m.route("no-such-route").request(CacheStatus::error, 0.001);
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, m.registry()).unwrap();
        assert!(
            text.contains(r#"tessera_requests_total{route="recs",cache="hit"} 1"#),
            "{text}"
        );
        assert!(
            text.contains(r#"tessera_builds_published_total{route="recs"} 1"#),
            "{text}"
        );
        assert!(
            text.contains("tessera_request_duration_seconds_bucket{le=\"0.001\",route=\"recs\"} 1"),
            "{text}"
        );
        assert!(
            text.contains(r#"tessera_requests_total{route="",cache="error"} 1"#),
            "{text}"
        );
        assert!(text.trim_end().ends_with("# EOF"));
    }
}
