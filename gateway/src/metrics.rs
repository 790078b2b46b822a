//! The gateway's Prometheus metrics.
//!
//! Each gateway owns its registry (no process-global state), so several gateways in one
//! process — tests, or embedded workers beside a gateway — keep their own figures.
//! Histograms have explicit buckets so they can be aggregated across gateways.

use std::sync::{Arc, Mutex, PoisonError};

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{
    DescriptorEncoder, EncodeLabelSet, EncodeLabelValue, EncodeMetric,
};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::{ConstGauge, Gauge};
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use tessera_protocol::{Backends, QueueStats};
use tessera_runtime::web::{BackendMetrics, ConnectionGauges};
pub(crate) use tessera_workers::metrics::RouteLabels;
use tessera_workers::metrics::WorkerMetrics;

mod sharded;

/// How a fragment lookup was answered: a request at the fragment endpoint, or an ESI
/// include of a composed page.
#[derive(Debug, Clone, Copy, Hash, PartialEq, Eq, EncodeLabelValue)]
#[allow(non_camel_case_types)]
pub(crate) enum CacheStatus {
    /// Fresh (200 or 304), found without waiting.
    hit,
    /// Stale, or a failed build's last good copy.
    stale,
    /// Served once the build it waited for (`Prefer: wait`) was done: the client waited
    /// for a render, so this is no hit.
    waited,
    /// 202 placeholder.
    pending,
    /// 4xx/5xx, or an include the store could not be asked about.
    error,
}

impl CacheStatus {
    /// How an answer counts when the request waited for a build first: served content
    /// (fresh or stale) counts as [`CacheStatus::waited`]; anything else as it is.
    #[must_use]
    pub(crate) fn after_waiting(self, waited: bool) -> Self {
        match self {
            CacheStatus::hit | CacheStatus::stale if waited => CacheStatus::waited,
            other => other,
        }
    }
}

/// Labels of per-route request counters.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct RequestLabels {
    /// Route name (only configured routes; unknown names count as `""`).
    pub route: String,
    /// How it was answered.
    pub cache: CacheStatus,
}

/// Latency buckets in seconds: 0.5 ms to ~33 s (long-polls included).
pub(crate) fn latency_buckets() -> impl Iterator<Item = f64> {
    prometheus_client::metrics::histogram::exponential_buckets(0.0005, 2.0, 17)
}

fn latency_histogram() -> Histogram {
    Histogram::new(latency_buckets())
}

/// One route's request and build counters, created once so the hot path neither
/// allocates label strings nor looks labels up.
#[derive(Debug, Clone)]
pub(crate) struct RouteMetrics {
    hit: sharded::Counter,
    stale: sharded::Counter,
    waited: sharded::Counter,
    pending: sharded::Counter,
    error: sharded::Counter,
    latency: sharded::Latency,
    /// Builds this gateway queued for the route.
    pub published: Counter,
    /// Build requests for the route that found one already queued.
    pub coalesced: Counter,
}

impl RouteMetrics {
    /// The handles of `route` in the gateway's families.
    fn new(
        route: &str,
        requests: &Family<RequestLabels, sharded::Counter>,
        latency: &Family<RouteLabels, sharded::Latency>,
        published: &Family<RouteLabels, Counter>,
        coalesced: &Family<RouteLabels, Counter>,
    ) -> Self {
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
        Self {
            hit: by(CacheStatus::hit),
            stale: by(CacheStatus::stale),
            waited: by(CacheStatus::waited),
            pending: by(CacheStatus::pending),
            error: by(CacheStatus::error),
            latency: latency.get_or_create(&labels).clone(),
            published: published.get_or_create(&labels).clone(),
            coalesced: coalesced.get_or_create(&labels).clone(),
        }
    }

    /// Counts one answered fragment lookup, which took `seconds`.
    pub(crate) fn request(&self, cache: CacheStatus, seconds: f64) {
        match cache {
            CacheStatus::hit => &self.hit,
            CacheStatus::stale => &self.stale,
            CacheStatus::waited => &self.waited,
            CacheStatus::pending => &self.pending,
            CacheStatus::error => &self.error,
        }
        .inc();
        self.latency.observe(seconds);
    }
}

/// Depth and consumers of every build queue, as last read from the broker:
/// `tessera_queue_messages{queue}` and `tessera_queue_consumers{queue}`.
///
/// The broker is read asynchronously and collectors are not, so the admin endpoint reads
/// every queue first, [`QueueGauges::set`]s the figures, then encodes. Each reading
/// replaces the last one whole, so concurrent scrapes never mix two readings.
#[derive(Debug, Clone, Default)]
pub(crate) struct QueueGauges {
    last: Arc<Mutex<Vec<(String, QueueStats)>>>,
}

impl QueueGauges {
    /// Replaces the figures with `stats`; queues without figures (the broker did not
    /// answer for them) are left out until it does.
    pub(crate) fn set(&self, stats: impl IntoIterator<Item = (String, Option<QueueStats>)>) {
        let reading = stats
            .into_iter()
            .filter_map(|(queue, stats)| Some((queue, stats?)))
            .collect();
        *self.last.lock().unwrap_or_else(PoisonError::into_inner) = reading;
    }
}

impl Collector for QueueGauges {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let last = self.last.lock().unwrap_or_else(PoisonError::into_inner);
        let by_queue = |value: fn(&QueueStats) -> u64| {
            last.iter()
                .map(move |(queue, stats)| (queue.as_str(), value(stats)))
        };
        encode_queue_gauge(
            &mut encoder,
            "queue_messages",
            "Build requests waiting in the queue.",
            by_queue(|s| s.messages),
        )?;
        encode_queue_gauge(
            &mut encoder,
            "queue_consumers",
            "Consumers (worker pools) attached to the queue.",
            by_queue(|s| s.consumers),
        )
    }
}

/// One gauge family labelled by queue.
fn encode_queue_gauge<'q>(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    values: impl Iterator<Item = (&'q str, u64)>,
) -> Result<(), std::fmt::Error> {
    let mut family = encoder.encode_descriptor(name, help, None, MetricType::Gauge)?;
    for (queue, value) in values {
        ConstGauge::new(value).encode(family.encode_family(&[("queue", queue)])?)?;
    }
    Ok(())
}

/// Every metric the gateway exports.
#[derive(Debug)]
pub(crate) struct Metrics {
    registry: Registry,
    /// Fragment lookups (endpoint requests and ESI includes) by route and cache status.
    pub requests: Family<RequestLabels, sharded::Counter>,
    /// Fragment request latency by route.
    pub latency: Family<RouteLabels, sharded::Latency>,
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
    /// Tag purges made through this gateway's admin API.
    pub tag_purges: Counter,
    /// Tag purge events applied, from any gateway (this one's own included).
    pub tag_purges_heard: Counter,
    /// Envelopes found retired by a tag purge (each then rebuilt).
    pub tag_retired: Counter,
    /// Soft purges made through this gateway's admin API (per tag, fragment or route).
    pub soft_purges: Counter,
    /// Purges this gateway applied and acknowledged, from any gateway.
    pub purge_acks: Counter,
    /// Purge answers that waited for acknowledgements and found a gateway missing.
    pub purges_unacknowledged: Counter,
    /// L1 entries (set at scrape).
    pub l1_entries: Gauge,
    /// L1 bytes (set at scrape).
    pub l1_bytes: Gauge,
    /// Requests holding a `Prefer: wait` (set at scrape).
    pub long_polls: Gauge,
    /// Push streams open (`/_tessera/stream`).
    pub streams: Gauge,
    /// Depth and consumers of every build queue (set at scrape).
    pub queues: QueueGauges,
    /// Open connections on the public and admin listeners.
    pub connections: ConnectionGauges,
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
    pub(crate) fn new<'a>(route_names: impl IntoIterator<Item = &'a str>) -> Self {
        let (requests, latency) = Default::default();
        let (builds_published, builds_coalesced) = Default::default();
        let handles = |route: &str| {
            RouteMetrics::new(
                route,
                &requests,
                &latency,
                &builds_published,
                &builds_coalesced,
            )
        };
        let routes = route_names
            .into_iter()
            .map(|r| (r.to_string(), handles(r)))
            .collect();
        let unknown = handles("");
        let mut metrics = Self {
            registry: Registry::with_prefix("tessera"),
            requests,
            latency,
            builds_published,
            builds_coalesced,
            store_errors: Counter::default(),
            bus_errors: Counter::default(),
            undecodable: Counter::default(),
            includes_refused: Counter::default(),
            events_lagged: Counter::default(),
            tag_purges: Counter::default(),
            tag_purges_heard: Counter::default(),
            tag_retired: Counter::default(),
            soft_purges: Counter::default(),
            purge_acks: Counter::default(),
            purges_unacknowledged: Counter::default(),
            l1_entries: Gauge::default(),
            l1_bytes: Gauge::default(),
            long_polls: Gauge::default(),
            streams: Gauge::default(),
            queues: QueueGauges::default(),
            connections: ConnectionGauges::default(),
            build_duration: Family::new_with_constructor(latency_histogram as fn() -> Histogram),
            builds_succeeded: Family::default(),
            builds_failed: Family::default(),
            worker: WorkerMetrics::default(),
            routes,
            unknown,
        };
        metrics.register_requests();
        metrics.register_faults();
        metrics.register_reported_builds();
        metrics.register_tags();
        metrics.register_scraped();
        metrics
            .worker
            .register(metrics.registry.sub_registry_with_prefix("worker"));
        metrics
    }

    /// Also exports the reconnect counters of `backends` (`tessera_store_reconnects`,
    /// `tessera_bus_reconnects`), read at each scrape.
    pub(crate) fn with_backends(mut self, backends: Backends) -> Self {
        self.registry
            .register_collector(Box::new(BackendMetrics::new(backends)));
        self
    }

    /// What this gateway answered and queued.
    fn register_requests(&mut self) {
        let r = &mut self.registry;
        r.register(
            "requests",
            "Fragment lookups (endpoint requests and ESI includes) by route and cache status",
            self.requests.clone(),
        );
        r.register(
            "request_duration_seconds",
            "Fragment lookup latency (an ESI include: its page level's batch lookup)",
            self.latency.clone(),
        );
        r.register(
            "builds_published",
            "Builds queued by this gateway",
            self.builds_published.clone(),
        );
        r.register(
            "builds_coalesced",
            "Build requests that found one already queued",
            self.builds_coalesced.clone(),
        );
    }

    /// What went wrong while answering.
    fn register_faults(&mut self) {
        let r = &mut self.registry;
        r.register(
            "store_errors",
            "Store failures while answering",
            self.store_errors.clone(),
        );
        r.register(
            "bus_errors",
            "Bus failures while answering",
            self.bus_errors.clone(),
        );
        r.register(
            "envelopes_undecodable",
            "Stored envelopes that did not decode",
            self.undecodable.clone(),
        );
        r.register(
            "esi_includes_refused",
            "ESI includes whose src named no fragment route, or that were malformed",
            self.includes_refused.clone(),
        );
        r.register(
            "events_lagged",
            "Times events may have been missed and L1 was dropped",
            self.events_lagged.clone(),
        );
    }

    /// Tag purges and what they retired.
    fn register_tags(&mut self) {
        let r = &mut self.registry;
        r.register(
            "tag_purges",
            "Tag purges made through this gateway's admin API",
            self.tag_purges.clone(),
        );
        r.register(
            "tag_purges_heard",
            "Tag purge events this gateway applied, from any gateway (itself included)",
            self.tag_purges_heard.clone(),
        );
        r.register(
            "tag_retired",
            "Fragments this gateway found retired by a tag purge, each then rebuilt",
            self.tag_retired.clone(),
        );
        r.register(
            "soft_purges",
            "Soft purges made through this gateway's admin API (per tag, fragment or route)",
            self.soft_purges.clone(),
        );
        r.register(
            "purge_acks_sent",
            "Purges of any gateway this gateway applied and acknowledged",
            self.purge_acks.clone(),
        );
        r.register(
            "purges_unacknowledged",
            "Purge answers that waited for acknowledgements and found a known gateway missing",
            self.purges_unacknowledged.clone(),
        );
    }

    /// Builds as every worker reports them in events.
    fn register_reported_builds(&mut self) {
        let r = &mut self.registry;
        r.register(
            "builds_succeeded",
            "Builds reported done by any worker",
            self.builds_succeeded.clone(),
        );
        r.register(
            "builds_failed",
            "Builds reported failed for good by any worker",
            self.builds_failed.clone(),
        );
        r.register(
            "build_duration_seconds",
            "Build durations reported by workers",
            self.build_duration.clone(),
        );
    }

    /// Figures set at scrape time rather than counted as they happen.
    fn register_scraped(&mut self) {
        let r = &mut self.registry;
        r.register("l1_entries", "Entries in L1", self.l1_entries.clone());
        r.register("l1_bytes", "Bytes held by L1", self.l1_bytes.clone());
        r.register(
            "long_polls",
            "Fragments with requests waiting on them (Prefer: wait)",
            self.long_polls.clone(),
        );
        r.register(
            "streams",
            "Push streams open (/_tessera/stream)",
            self.streams.clone(),
        );
        r.register_collector(Box::new(self.queues.clone()));
        self.connections.register(r);
    }

    /// A build of `route` any worker reported done (a `built` event), with how long its
    /// render took when the event says.
    pub(crate) fn build_succeeded(&self, route: &str, build_ms: Option<u64>) {
        let labels = RouteLabels {
            route: route.to_string(),
        };
        if let Some(ms) = build_ms {
            self.build_duration
                .get_or_create(&labels)
                .observe(ms as f64 / 1000.0);
        }
        self.builds_succeeded.get_or_create(&labels).inc();
    }

    /// A build of `route` any worker reported failed for good (a `failed` event).
    pub(crate) fn build_failed(&self, route: &str) {
        let labels = RouteLabels {
            route: route.to_string(),
        };
        self.builds_failed.get_or_create(&labels).inc();
    }

    /// The counters of `route`; names that are no configured route share one set (label
    /// `""`), so arbitrary paths cannot grow the metric set.
    pub(crate) fn route(&self, route: &str) -> &RouteMetrics {
        self.routes.get(route).unwrap_or(&self.unknown)
    }

    /// Every registered metric.
    pub(crate) fn registry(&self) -> &Registry {
        &self.registry
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What `/metrics` would show of `m`, in OpenMetrics.
    fn exposition(m: &Metrics) -> String {
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, m.registry()).unwrap();
        text
    }

    #[test]
    fn renders_counters_and_real_histogram_buckets() {
        let m = Metrics::new(["recs"]);
        m.route("recs").request(CacheStatus::hit, 0.002);
        m.route("recs").request(CacheStatus::pending, 0.001);
        m.route("recs").published.inc();
        m.route("no-such-route").request(CacheStatus::error, 0.001);
        let text = exposition(&m);
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

    #[test]
    fn waiting_for_a_build_is_no_hit() {
        use CacheStatus::{error, hit, pending, stale, waited};
        assert_eq!(hit.after_waiting(true), waited);
        assert_eq!(stale.after_waiting(true), waited);
        assert_eq!(pending.after_waiting(true), pending);
        assert_eq!(error.after_waiting(true), error);
        assert_eq!(hit.after_waiting(false), hit);
        let m = Metrics::new(["recs"]);
        m.route("recs").request(hit.after_waiting(true), 0.3);
        let text = exposition(&m);
        assert!(
            text.contains(r#"tessera_requests_total{route="recs",cache="waited"} 1"#),
            "{text}"
        );
        assert!(
            text.contains(r#"tessera_requests_total{route="recs",cache="hit"} 0"#),
            "{text}"
        );
    }

    #[test]
    fn queue_gauges_show_the_last_reading() {
        let m = Metrics::new(["recs"]);
        // Before any reading: the families are described, with no samples.
        let text = exposition(&m);
        assert!(
            text.contains("# HELP tessera_queue_messages Build requests waiting in the queue.\n# TYPE tessera_queue_messages gauge\n# HELP"),
            "{text}"
        );
        let stats = |messages, consumers| QueueStats {
            messages,
            consumers,
        };
        m.queues.set([
            ("a".to_string(), Some(stats(3, 1))),
            ("b".to_string(), None),
        ]);
        let text = exposition(&m);
        assert!(
            text.contains("tessera_queue_messages{queue=\"a\"} 3\n"),
            "{text}"
        );
        assert!(
            text.contains("tessera_queue_consumers{queue=\"a\"} 1\n"),
            "{text}"
        );
        assert!(
            text.contains(
                "# HELP tessera_queue_consumers Consumers (worker pools) attached to the queue.\n"
            ),
            "{text}"
        );
        assert!(
            !text.contains("queue=\"b\""),
            "no figures, no sample: {text}"
        );
        // A new reading replaces the last one whole.
        m.queues.set([("b".to_string(), Some(stats(0, 2)))]);
        let text = exposition(&m);
        assert!(!text.contains("queue=\"a\""), "{text}");
        assert!(
            text.contains("tessera_queue_consumers{queue=\"b\"} 2\n"),
            "{text}"
        );
    }

    #[test]
    fn backend_reconnects_are_exported_with_the_backends() {
        let backends = Backends::memory(&tessera_protocol::Config::default());
        let m = Metrics::new(["recs"]).with_backends(backends);
        let text = exposition(&m);
        assert!(
            text.contains("\ntessera_store_reconnects_total 0\n"),
            "{text}"
        );
        assert!(
            text.contains("\ntessera_bus_reconnects_total 0\n"),
            "{text}"
        );
    }
}
