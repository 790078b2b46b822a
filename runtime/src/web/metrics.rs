//! `/metrics` and the collectors both binaries register: the exposition in the format the
//! scraper asks for (Prometheus text 0.0.4 or OpenMetrics 1.0.0), the open connections per
//! listener ([`ConnectionGauges`]), and the backends' reconnect counters and memcached
//! servers' states read at scrape time ([`BackendMetrics`]).

use http::{HeaderMap, Response, StatusCode, header};
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::{ConstGauge, Gauge};
use prometheus_client::registry::Registry;

use tessera_protocol::Backends;
use tessera_protocol::store::ServerState;

use super::body::{Body, text};

/// `tessera_http_connections{listener}`: connections open on each listener.
#[derive(Debug, Clone, Default)]
pub struct ConnectionGauges(Family<ListenerLabels, Gauge>);

/// Labels of [`ConnectionGauges`].
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ListenerLabels {
    listener: &'static str,
}

impl ConnectionGauges {
    /// Registers the family in `registry` (prefixed `tessera`).
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "http_connections",
            "Open HTTP connections by listener",
            self.0.clone(),
        );
    }

    /// The gauge of the listener called `name` (`public`, `admin`).
    pub fn listener(&self, name: &'static str) -> Gauge {
        self.0
            .get_or_create(&ListenerLabels { listener: name })
            .clone()
    }
}

/// Content type of `/metrics` in OpenMetrics, served to scrapers that ask for it.
const OPENMETRICS_CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// `/metrics`: everything `registry` holds, collectors included, in the format the
/// request's `Accept` asks for (see [`wants_openmetrics`]): the Prometheus text format
/// 0.0.4 by default, which `promtool check metrics` and older scrapers read, or
/// OpenMetrics 1.0.0.
pub fn metrics(registry: &Registry, request: &HeaderMap) -> Response<Body> {
    use prometheus_client::encoding::{prometheus_text, text};
    let openmetrics = wants_openmetrics(request);
    let mut out = String::new();
    let encoded = if openmetrics {
        text::encode(&mut out, registry)
    } else {
        prometheus_text::encode(&mut out, registry)
    };
    if let Err(e) = encoded {
        // Writing to a `String` cannot fail; only a collector could report an error.
        tracing::warn!(error = %e, "metrics did not encode");
        out.clear();
        if openmetrics {
            out.push_str("# EOF\n");
        }
    }
    let content_type = if openmetrics {
        OPENMETRICS_CONTENT_TYPE
    } else {
        prometheus_text::CONTENT_TYPE
    };
    text(StatusCode::OK, content_type, out)
}

/// Whether `Accept` asks for OpenMetrics: `application/openmetrics-text` with a quality
/// above zero and at least that of the Prometheus text format (`text/plain`, `text/*`
/// or `*/*`). Prometheus itself sends both, OpenMetrics first; a request without
/// `Accept`, or one naming only `text/plain`, gets the Prometheus text format.
pub fn wants_openmetrics(request: &HeaderMap) -> bool {
    let (mut openmetrics, mut plain) = (0.0_f32, 0.0_f32);
    let ranges = request
        .get_all(header::ACCEPT)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','));
    for range in ranges {
        let mut parts = range.split(';').map(str::trim);
        let media = parts.next().unwrap_or("").to_ascii_lowercase();
        let quality = parts
            .filter_map(|p| p.split_once('='))
            .find(|(k, _)| k.trim().eq_ignore_ascii_case("q"))
            .map_or(1.0, |(_, q)| q.trim().parse().unwrap_or(0.0));
        match media.as_str() {
            "application/openmetrics-text" => openmetrics = openmetrics.max(quality),
            "text/plain" | "text/*" | "*/*" => plain = plain.max(quality),
            _ => {}
        }
    }
    openmetrics > 0.0 && openmetrics >= plain
}

/// The backends' reconnect counters, read at each scrape: `{prefix}_store_reconnects` and
/// `{prefix}_bus_reconnects`; and, for a store of servers, each server's state as this
/// process sees it: `{prefix}_store_server_up{server}` (1 up, 0 judged down),
/// `{prefix}_store_server_ejections_total{server}`,
/// `{prefix}_store_server_readmissions_total{server}` and
/// `{prefix}_store_server_flushes_total{server}`. Register it in a registry prefixed
/// `tessera`.
#[derive(Debug, Clone)]
pub struct BackendMetrics {
    backends: Backends,
}

impl BackendMetrics {
    /// Reads the counters of `backends`.
    pub fn new(backends: Backends) -> Self {
        Self { backends }
    }
}

impl Collector for BackendMetrics {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        for (name, help, value) in [
            (
                "store_reconnects",
                "Store calls that failed on their connection (dropped and dialed anew).",
                self.backends.store.reconnects(),
            ),
            (
                "bus_reconnects",
                "Broker connections re-established after a lost one.",
                self.backends.bus.reconnects(),
            ),
        ] {
            let counter = ConstCounter::new(value);
            let metric = encoder.encode_descriptor(name, help, None, counter.metric_type())?;
            counter.encode(metric)?;
        }
        encode_servers(&self.backends.store.servers(), &mut encoder)
    }
}

/// Labels of the per-server series.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ServerLabels {
    server: String,
}

/// Each server's state, one family per figure (nothing for a store without servers).
fn encode_servers(
    servers: &[ServerState],
    encoder: &mut DescriptorEncoder,
) -> Result<(), std::fmt::Error> {
    if servers.is_empty() {
        return Ok(());
    }
    let mut up = encoder.encode_descriptor(
        "store_server_up",
        "Whether this process uses the store server (1) or judged it down (0)",
        None,
        MetricType::Gauge,
    )?;
    for s in servers {
        let labels = ServerLabels {
            server: s.server.clone(),
        };
        ConstGauge::new(i64::from(s.up)).encode(up.encode_family(&labels)?)?;
    }
    type Count = fn(&ServerState) -> u64;
    for (name, help, count) in [
        (
            "store_server_ejections",
            "Times this process judged the store server down",
            (|s| s.ejections) as Count,
        ),
        (
            "store_server_readmissions",
            "Times this process took the store server back after it answered again",
            |s| s.readmissions,
        ),
        (
            "store_server_flushes",
            "Times this process emptied the store server (it missed writes while out)",
            |s| s.flushes,
        ),
    ] {
        let mut metric = encoder.encode_descriptor(name, help, None, MetricType::Counter)?;
        for s in servers {
            let labels = ServerLabels {
                server: s.server.clone(),
            };
            ConstCounter::new(count(s)).encode(metric.encode_family(&labels)?)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;
    use http_body_util::BodyExt;

    /// The `/metrics` answer to a request with `accept`: its content type and body.
    async fn scrape(registry: &Registry, accept: Option<&'static str>) -> (String, String) {
        let mut request = HeaderMap::new();
        if let Some(accept) = accept {
            request.insert(header::ACCEPT, HeaderValue::from_static(accept));
        }
        let response = metrics(registry, &request);
        let content_type = response.headers()[header::CONTENT_TYPE]
            .to_str()
            .unwrap()
            .to_string();
        let body = response.into_body().collect().await.unwrap().to_bytes();
        (content_type, String::from_utf8(body.to_vec()).unwrap())
    }

    #[tokio::test]
    async fn backend_reconnects_are_read_at_scrape() {
        let backends = Backends::memory(&tessera_protocol::Config::default());
        let mut registry = Registry::with_prefix("tessera");
        registry.register_collector(Box::new(BackendMetrics::new(backends)));
        let (content_type, text) = scrape(&registry, Some("application/openmetrics-text")).await;
        assert_eq!(content_type, OPENMETRICS_CONTENT_TYPE);
        for line in [
            "# HELP tessera_store_reconnects Store calls that failed on their connection (dropped and dialed anew).\n",
            "# TYPE tessera_store_reconnects counter\ntessera_store_reconnects_total 0\n",
            "# HELP tessera_bus_reconnects Broker connections re-established after a lost one.\n",
            "# TYPE tessera_bus_reconnects counter\ntessera_bus_reconnects_total 0\n",
        ] {
            assert!(text.contains(line), "missing {line:?} in\n{text}");
        }
        assert!(text.ends_with("# EOF\n"), "{text}");
    }

    /// A memory store that says it has two servers, the second judged down.
    #[derive(Debug)]
    struct TwoServers(tessera_protocol::store::MemoryStore);

    #[async_trait::async_trait]
    impl tessera_protocol::Store for TwoServers {
        async fn get(
            &self,
            k: &tessera_protocol::StoreKey,
        ) -> Result<Option<bytes::Bytes>, tessera_protocol::StoreError> {
            self.0.get(k).await
        }
        async fn get_many(
            &self,
            k: &[tessera_protocol::StoreKey],
        ) -> Result<
            std::collections::HashMap<tessera_protocol::StoreKey, bytes::Bytes>,
            tessera_protocol::StoreError,
        > {
            self.0.get_many(k).await
        }
        async fn add(
            &self,
            k: &tessera_protocol::StoreKey,
            v: &[u8],
            t: std::time::Duration,
        ) -> Result<bool, tessera_protocol::StoreError> {
            self.0.add(k, v, t).await
        }
        async fn set(
            &self,
            k: &tessera_protocol::StoreKey,
            v: &[u8],
            t: std::time::Duration,
        ) -> Result<(), tessera_protocol::StoreError> {
            self.0.set(k, v, t).await
        }
        async fn delete(
            &self,
            k: &tessera_protocol::StoreKey,
        ) -> Result<bool, tessera_protocol::StoreError> {
            self.0.delete(k).await
        }
        async fn incr(
            &self,
            k: &tessera_protocol::StoreKey,
            d: u64,
        ) -> Result<Option<u64>, tessera_protocol::StoreError> {
            self.0.incr(k, d).await
        }
        async fn ping(&self) -> Result<(), tessera_protocol::StoreError> {
            Ok(())
        }
        fn servers(&self) -> Vec<ServerState> {
            let server = |name: &str, up: bool, n: u64| ServerState {
                server: name.into(),
                up,
                ejections: n,
                readmissions: n.saturating_sub(1),
                flushes: 0,
            };
            vec![
                server("10.0.0.1:11211", true, 0),
                server("10.0.0.2:11211", false, 2),
            ]
        }
    }

    #[tokio::test]
    async fn each_store_server_has_its_state_and_counters() {
        let mut backends = Backends::memory(&tessera_protocol::Config::default());
        backends.store = std::sync::Arc::new(TwoServers(
            tessera_protocol::store::MemoryStore::new(1 << 20, 1024),
        ));
        let mut registry = Registry::with_prefix("tessera");
        registry.register_collector(Box::new(BackendMetrics::new(backends)));
        let (_, text) = scrape(&registry, None).await;
        for line in [
            "# TYPE tessera_store_server_up gauge\n",
            "tessera_store_server_up{server=\"10.0.0.1:11211\"} 1\n",
            "tessera_store_server_up{server=\"10.0.0.2:11211\"} 0\n",
            "# TYPE tessera_store_server_ejections_total counter\n",
            "tessera_store_server_ejections_total{server=\"10.0.0.2:11211\"} 2\n",
            "tessera_store_server_readmissions_total{server=\"10.0.0.2:11211\"} 1\n",
            "tessera_store_server_flushes_total{server=\"10.0.0.1:11211\"} 0\n",
        ] {
            assert!(text.contains(line), "missing {line:?} in\n{text}");
        }
        // A store without servers adds nothing.
        let (_, memory) = scrape(
            &{
                let mut r = Registry::with_prefix("tessera");
                r.register_collector(Box::new(BackendMetrics::new(Backends::memory(
                    &tessera_protocol::Config::default(),
                ))));
                r
            },
            None,
        )
        .await;
        assert!(!memory.contains("store_server"), "{memory}");
    }

    #[tokio::test]
    async fn metrics_are_prometheus_text_unless_openmetrics_is_asked_for() {
        let backends = Backends::memory(&tessera_protocol::Config::default());
        let mut registry = Registry::with_prefix("tessera");
        registry.register_collector(Box::new(BackendMetrics::new(backends)));
        for accept in [
            None,
            Some("text/plain"),
            Some("*/*"),
            Some("text/plain;version=0.0.4"),
        ] {
            let (content_type, text) = scrape(&registry, accept).await;
            assert_eq!(
                content_type, "text/plain; version=0.0.4; charset=utf-8",
                "{accept:?}"
            );
            // The 0.0.4 format describes a counter under its sample's name, and has no EOF.
            assert!(
                text.contains("# HELP tessera_store_reconnects_total Store calls that failed on their connection (dropped and dialed anew).\n# TYPE tessera_store_reconnects_total counter\ntessera_store_reconnects_total 0\n"),
                "{accept:?}: {text}"
            );
            assert!(!text.contains("# EOF"), "{accept:?}: {text}");
        }
        let (content_type, text) = scrape(&registry, Some("application/openmetrics-text")).await;
        assert!(content_type.starts_with("application/openmetrics-text"));
        assert!(text.ends_with("# EOF\n"), "{text}");
    }

    #[test]
    fn accept_negotiates_openmetrics_by_quality() {
        let asks = |accept: &'static str| {
            let mut h = HeaderMap::new();
            h.insert(header::ACCEPT, HeaderValue::from_static(accept));
            wants_openmetrics(&h)
        };
        // What Prometheus 2.x sends by default.
        assert!(asks(
            "application/openmetrics-text;version=1.0.0;q=0.5,application/openmetrics-text;version=0.0.1;q=0.4,text/plain;version=0.0.4;q=0.3,*/*;q=0.2"
        ));
        assert!(asks("Application/OpenMetrics-Text; version=1.0.0"));
        assert!(asks("text/plain;q=0.5, application/openmetrics-text"));
        assert!(!asks("text/plain, application/openmetrics-text;q=0.5"));
        assert!(!asks("application/openmetrics-text;q=0"));
        assert!(!asks("text/plain"));
        assert!(!asks("*/*"));
        assert!(!wants_openmetrics(&HeaderMap::new()));
    }
}
