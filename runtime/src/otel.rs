//! OpenTelemetry traces: one trace from the browser's request, through the queue, to the
//! fragment arriving.
//!
//! Off unless `otel.endpoint` (or `OTEL_EXPORTER_OTLP_ENDPOINT`) is set. Off, every
//! function here answers at once from one check of a static ([`on`]): no span, no
//! context, nothing on the hit path. On, spans are exported over OTLP/HTTP (protobuf) to
//! `{endpoint}/v1/traces` in batches, from the SDK's own thread, through a plain HTTP/1.1
//! client that runs on the process's Tokio runtime ([`Client`]). Sampling is parent-based:
//! a request that comes with a W3C `traceparent` follows its sampled flag, a new trace is
//! sampled at `otel.sample_ratio`.
//!
//! Context travels as W3C trace context: read from a request's `traceparent`
//! ([`extract`]), written into the upstream requests made on a span's behalf ([`inject`]),
//! and carried across the broker as the build request's `traceparent`
//! ([`Span::traceparent`], [`from_traceparent`]). Within a task, the current span is OpenTelemetry's current
//! [`Context`], which a future carries across its awaits with
//! [`opentelemetry::trace::FutureExt::with_context`].
//!
//! Attribute names follow the semantic conventions: `http.request.method`,
//! `http.response.status_code`, `url.path`, `server.address`, `messaging.system`,
//! `messaging.destination.name`, `messaging.operation.type`, `db.system.name`.

use std::borrow::Cow;
use std::sync::OnceLock;
use std::time::Duration;

use bytes::Bytes;
use http::HeaderMap;
use http_body_util::{BodyExt, Full, Limited};
use hyper_util::client::legacy::Client as HyperClient;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use opentelemetry::propagation::TextMapPropagator;
use opentelemetry::trace::{SpanKind, TraceContextExt, Tracer, TracerProvider as _};
use opentelemetry_http::{HeaderExtractor, HeaderInjector, HttpClient, HttpError};
use opentelemetry_otlp::{WithExportConfig, WithHttpConfig};
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{Sampler, SdkTracer, SdkTracerProvider};
use tessera_protocol::config::{Backend, OtelConfig};

pub use opentelemetry::trace::{FutureExt, SpanKind as Kind, Status};
pub use opentelemetry::{Context, KeyValue};
/// The tracer, once traces are on.
static TRACER: OnceLock<SdkTracer> = OnceLock::new();

/// Its provider, for [`flush`].
static PROVIDER: OnceLock<SdkTracerProvider> = OnceLock::new();

/// How long one export may take.
const EXPORT_TIMEOUT: Duration = Duration::from_secs(10);

/// Most bytes of a collector's answer read (it is not used).
const MAX_ANSWER: usize = 64 * 1024;

/// `db.system.name` of the store `backend` runs.
pub fn store_system(backend: &Backend) -> &'static str {
    match backend.memcached() {
        Some(_) => "memcached",
        None => "tessera.memory",
    }
}

/// `messaging.system` of the bus `backend` runs.
pub fn bus_system(backend: &Backend) -> &'static str {
    match backend.amqp() {
        Some(_) => "rabbitmq",
        None => "tessera.memory",
    }
}

/// Whether traces are on in this process.
#[inline]
pub fn on() -> bool {
    TRACER.get().is_some()
}

/// Turns traces on when `config` names an endpoint, naming spans' service `service` when
/// `otel.service_name` is empty. Call once, from within the Tokio runtime the exports
/// are to run on; keep the guard for as long as spans are made: dropping it exports what
/// is left. `None` when traces are off.
pub fn init(config: &OtelConfig, service: &str) -> Result<Option<Guard>, String> {
    if config.endpoint.is_empty() {
        return Ok(None);
    }
    let endpoint = format!("{}/v1/traces", config.endpoint.trim_end_matches('/'));
    let runtime = tokio::runtime::Handle::try_current()
        .map_err(|_| "OpenTelemetry: not called from within a Tokio runtime".to_string())?;
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .with_http_client(Client::new(runtime))
        .with_endpoint(endpoint.clone())
        .with_timeout(EXPORT_TIMEOUT)
        .build()
        .map_err(|e| format!("OpenTelemetry exporter to {endpoint}: {e}"))?;
    let name = if config.service_name.is_empty() {
        service.to_string()
    } else {
        config.service_name.clone()
    };
    let sampler = Sampler::ParentBased(Box::new(Sampler::TraceIdRatioBased(config.sample_ratio)));
    let provider = SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_sampler(sampler)
        .with_resource(Resource::builder().with_service_name(name.clone()).build())
        .build();
    let tracer = provider.tracer("tessera");
    if TRACER.set(tracer).is_err() || PROVIDER.set(provider.clone()).is_err() {
        return Err("OpenTelemetry: traces were turned on twice".to_string());
    }
    tracing::info!(%endpoint, service = %name, ratio = config.sample_ratio, "OpenTelemetry traces on");
    Ok(Some(Guard(provider)))
}

/// Exports what is left when dropped.
#[derive(Debug)]
pub struct Guard(SdkTracerProvider);

impl Drop for Guard {
    fn drop(&mut self) {
        if let Err(e) = self.0.shutdown() {
            tracing::warn!(error = %e, "OpenTelemetry: spans left unexported at exit");
        }
    }
}

/// Exports every ended span now (tests, and before a process waits on something long).
pub fn flush() {
    if let Some(provider) = PROVIDER.get() {
        let _ = provider.force_flush();
    }
}

/// A span, ended when dropped (or by [`Span::end`]); one that does nothing when traces
/// are off.
#[derive(Debug, Default)]
pub struct Span(Option<Context>);

impl Span {
    /// A span of kind `kind` named `name`, child of `parent`, with `attributes`, worked
    /// out only when the span records: a request the sampler leaves out costs no
    /// attribute.
    pub fn start(
        name: impl Into<Cow<'static, str>>,
        kind: SpanKind,
        parent: &Context,
        attributes: impl FnOnce() -> Vec<KeyValue>,
    ) -> Span {
        use opentelemetry::trace::Span as _;
        let Some(tracer) = TRACER.get() else {
            return Span(None);
        };
        let mut span = tracer
            .span_builder(name)
            .with_kind(kind)
            .start_with_context(tracer, parent);
        if span.is_recording() {
            span.set_attributes(attributes());
        }
        Span(Some(parent.with_span(span)))
    }

    /// [`Span::start`] as a child of the current span.
    pub fn child(
        name: impl Into<Cow<'static, str>>,
        kind: SpanKind,
        attributes: impl FnOnce() -> Vec<KeyValue>,
    ) -> Span {
        if !on() {
            return Span(None);
        }
        Span::start(name, kind, &Context::current(), attributes)
    }

    /// Names the span `name`, worked out only when the span records.
    pub fn rename(&self, name: impl FnOnce() -> String) {
        if let Some(cx) = self.0.as_ref().filter(|cx| cx.span().is_recording()) {
            cx.span().update_name(name());
        }
    }

    /// The context to run the span's work in (children, [`inject`]); the current one
    /// when the span does nothing.
    pub fn context(&self) -> Context {
        self.0.clone().unwrap_or_else(Context::current)
    }

    /// Whether the span records (traces on, and sampled).
    pub fn recording(&self) -> bool {
        self.0.as_ref().is_some_and(|cx| cx.span().is_recording())
    }

    /// Adds an attribute, worked out only when the span records.
    pub fn set(&self, attribute: impl FnOnce() -> KeyValue) {
        if let Some(cx) = self.0.as_ref().filter(|cx| cx.span().is_recording()) {
            cx.span().set_attribute(attribute());
        }
    }

    /// Marks the span failed with `error`.
    pub fn fail(&self, error: &dyn std::fmt::Display) {
        if let Some(cx) = &self.0 {
            cx.span().set_status(Status::error(error.to_string()));
        }
    }

    /// The span as a W3C `traceparent` value, for a build request; `None` when it does
    /// nothing.
    pub fn traceparent(&self) -> Option<String> {
        let cx = self.0.as_ref()?;
        let mut headers = HeaderMap::new();
        inject(cx, &mut headers);
        headers
            .get("traceparent")
            .and_then(|v| v.to_str().ok())
            .map(String::from)
    }

    /// Ends the span now.
    pub fn end(self) {}
}

impl Drop for Span {
    fn drop(&mut self) {
        if let Some(cx) = &self.0 {
            cx.span().end();
        }
    }
}

/// The context a request's `traceparent` names (an empty one when it names none, or
/// when traces are off).
pub fn extract(headers: &HeaderMap) -> Context {
    // Most requests come without one: looked up by a header name made once, not by the
    // propagator's text names, which are parsed at each lookup.
    static TRACEPARENT: http::HeaderName = http::HeaderName::from_static("traceparent");
    if !on() || !headers.contains_key(&TRACEPARENT) {
        return Context::new();
    }
    TraceContextPropagator::new().extract(&HeaderExtractor(headers))
}

/// Writes `cx`'s span into `headers` as `traceparent` (and `tracestate`), replacing what
/// was there, so that the next hop joins the trace. Nothing when `cx` has no span.
pub fn inject(cx: &Context, headers: &mut HeaderMap) {
    if cx.span().span_context().is_valid() {
        headers.remove("traceparent");
        headers.remove("tracestate");
        TraceContextPropagator::new().inject_context(cx, &mut HeaderInjector(headers));
    }
}

/// The context a build request's `traceparent` names (an empty one for `None`).
pub fn from_traceparent(traceparent: Option<&str>) -> Context {
    let mut headers = HeaderMap::new();
    if let Some(value) = traceparent.and_then(|t| http::HeaderValue::from_str(t).ok()) {
        headers.insert("traceparent", value);
    }
    extract(&headers)
}

/// The exporter's HTTP client: plain HTTP/1.1 (a collector is a sidecar or on the
/// private network), each request run on the process's runtime, since the SDK exports
/// from a thread of its own.
#[derive(Debug, Clone)]
struct Client {
    runtime: tokio::runtime::Handle,
    client: HyperClient<HttpConnector, Full<Bytes>>,
}

impl Client {
    fn new(runtime: tokio::runtime::Handle) -> Self {
        let client = {
            let _entered = runtime.enter();
            HyperClient::builder(TokioExecutor::new()).build_http()
        };
        Self { runtime, client }
    }
}

#[async_trait::async_trait]
impl HttpClient for Client {
    async fn send_bytes(
        &self,
        request: http::Request<Bytes>,
    ) -> Result<http::Response<Bytes>, HttpError> {
        let client = self.client.clone();
        let exchange = async move {
            let (head, body) = request.into_parts();
            let answer = client
                .request(http::Request::from_parts(head, Full::new(body)))
                .await?;
            let (head, body) = answer.into_parts();
            let body = Limited::new(body, MAX_ANSWER).collect().await?.to_bytes();
            Ok::<_, HttpError>(http::Response::from_parts(head, body))
        };
        let timed = async move {
            tokio::time::timeout(EXPORT_TIMEOUT, exchange)
                .await
                .map_err(|_| HttpError::from("the collector did not answer in time"))?
        };
        self.runtime.spawn(timed).await?
    }
}
