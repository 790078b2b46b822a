//! OpenTelemetry: one trace from the browser's request to the fragment arriving, across
//! the broker, exported over OTLP/HTTP to a receiver that decodes the protobuf as a
//! collector does. Real memcached and RabbitMQ; the gateway and a worker run in this
//! process, each with backends of its own, so the only link between them is the broker.
//!
//! One test in this file: traces are turned on once per process.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::any_value::Value;
use opentelemetry_proto::tonic::trace::v1::Span;
use opentelemetry_proto::tonic::trace::v1::span::SpanKind;
use prost::Message;
use tessera_protocol::config::OtelConfig;
use tessera_tests::eventually;
use tessera_tests::harness::{self, Backend, TestGateway, client};
use tessera_tests::upstream::{FakeUpstream, Script};

const WITHIN: Duration = Duration::from_secs(15);

/// Spans received, with the `service.name` of the batch each came in.
type Received = Arc<Mutex<Vec<(String, Span)>>>;

/// An OTLP/HTTP receiver on 127.0.0.1: decodes every `POST /v1/traces` body.
async fn receiver() -> (SocketAddr, Received) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let received: Received = Arc::default();
    let spans = received.clone();
    tokio::spawn(async move {
        loop {
            let (socket, _) = listener.accept().await.unwrap();
            let spans = spans.clone();
            tokio::spawn(async move {
                let service = service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                    let spans = spans.clone();
                    async move {
                        assert_eq!(req.uri().path(), "/v1/traces");
                        assert_eq!(
                            req.headers()["content-type"],
                            "application/x-protobuf",
                            "OTLP/HTTP protobuf"
                        );
                        let body = req.into_body().collect().await.unwrap().to_bytes();
                        let export = ExportTraceServiceRequest::decode(body).unwrap();
                        for resource in export.resource_spans {
                            let service = resource
                                .resource
                                .iter()
                                .flat_map(|r| &r.attributes)
                                .find(|a| a.key == "service.name")
                                .and_then(|a| a.value.as_ref()?.value.clone());
                            let service = match service {
                                Some(Value::StringValue(s)) => s,
                                _ => String::new(),
                            };
                            for scope in resource.scope_spans {
                                for span in scope.spans {
                                    spans.lock().unwrap().push((service.clone(), span));
                                }
                            }
                        }
                        Ok::<_, std::convert::Infallible>(hyper::Response::new(Full::new(
                            Bytes::new(),
                        )))
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(socket), service)
                    .await;
            });
        }
    });
    (addr, received)
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn attribute(span: &Span, key: &str) -> Option<Value> {
    span.attributes
        .iter()
        .find(|a| a.key == key)
        .and_then(|a| a.value.as_ref()?.value.clone())
}

/// A gateway and a worker process's loop on real servers, each with backends of its own.
async fn gateway_and_worker(
    up: &FakeUpstream,
) -> (
    TestGateway,
    tessera_protocol::Config,
    tokio_util::sync::CancellationToken,
    tokio::task::JoinHandle<()>,
) {
    let mut c = harness::config(&up.url(), vec![harness::route("traced")]);
    c.workers.embedded = 0;
    let backends = harness::backends(Backend::Real, &mut c).await;
    let gateway = TestGateway::start(c.clone(), backends).await;
    let stop = tokio_util::sync::CancellationToken::new();
    let worker = {
        let backends = tessera_backends::connect(&c).await.unwrap();
        let builder = Arc::new(tessera_workers::HttpBuilder::new(&c).unwrap());
        let (config, stop) = (Arc::new(c.clone()), stop.clone());
        tokio::spawn(async move {
            tessera_workers::run(
                backends,
                config,
                builder,
                4,
                tessera_workers::WorkerMetrics::default(),
                stop.cancelled_owned(),
            )
            .await
            .unwrap();
        })
    };

    (gateway, c, stop, worker)
}

/// The trace's spans (by name) link as one trace from the browser's span `browser`.
fn check_trace(
    got: &HashMap<String, Span>,
    names: &[String],
    trace: &str,
    browser: &str,
    up: &FakeUpstream,
) {
    let span = |name: &str| &got[name];
    let id = |name: &str| hex(&span(name).span_id);
    let parent = |name: &str| hex(&span(name).parent_span_id);

    // The gateway's request is the browser's child; its lookup, lease, publish and wait
    // are the request's.
    let server = "GET /fragments/traced";
    assert_eq!(parent(server), browser);
    assert_eq!(span(server).kind, SpanKind::Server as i32);
    assert_eq!(
        attribute(span(server), "http.response.status_code"),
        Some(Value::IntValue(200))
    );
    for child in ["get", "lease", "wait for build", &names[3]] {
        assert_eq!(parent(child), id(server), "{child} is the request's");
    }
    assert_eq!(span(&names[3]).kind, SpanKind::Producer as i32);
    assert_eq!(
        attribute(span(&names[3]), "messaging.system"),
        Some(Value::StringValue("rabbitmq".into()))
    );
    assert_eq!(
        attribute(span("get"), "db.system.name"),
        Some(Value::StringValue("memcached".into()))
    );
    // Across the broker: the worker's process span is the publish's child.
    assert_eq!(parent(&names[4]), id(&names[3]), "process follows send");
    assert_eq!(span(&names[4]).kind, SpanKind::Consumer as i32);
    for child in ["render traced", "store", "publish built"] {
        assert_eq!(parent(child), id(&names[4]), "{child} is the build's");
    }
    assert_eq!(span("render traced").kind, SpanKind::Client as i32);
    // The upstream was told: its render request carries the render span.
    let renders = up.requests("/_render/traced");
    let sent = renders[0].1["traceparent"].to_str().unwrap().to_string();
    assert_eq!(sent, format!("00-{trace}-{}-01", id("render traced")));
    // And the fragment arrived after it was built: the wait ends after the build's store.
    assert!(span("wait for build").end_time_unix_nano >= span("store").end_time_unix_nano);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_trace_runs_from_the_request_through_the_broker_to_the_fragment_arriving() {
    let (collector, received) = receiver().await;
    let traces = OtelConfig {
        endpoint: format!("http://{collector}"),
        service_name: "tessera-test".into(),
        sample_ratio: 1.0,
    };
    let _traces = tessera_runtime::otel::init(&traces, "unused")
        .unwrap()
        .expect("traces are on");

    let up = FakeUpstream::start().await;
    up.script(
        "/_render/traced",
        Script {
            delay: Duration::from_millis(100),
            ..Script::default()
        },
    );
    let (gateway, c, stop, worker) = gateway_and_worker(&up).await;

    // The browser's own span, as a page's instrumentation would send it.
    let trace = "4bf92f3577b34da6a3ce929d0e0e4736";
    let browser = "00f067aa0ba902b7";
    let answer = client()
        .get(gateway.at("/fragments/traced"))
        .header("traceparent", format!("00-{trace}-{browser}-01"))
        .header("prefer", "wait=10")
        .send()
        .await
        .unwrap();
    assert_eq!(
        answer.status(),
        200,
        "the fragment arrives in the long-poll"
    );

    let names = [
        "GET /fragments/traced",
        "get",
        "lease",
        &format!("send {}", c.fragments[0].queue),
        &format!("process {}", c.fragments[0].queue),
        "render traced",
        "store",
        "publish built",
        "wait for build",
    ]
    .map(String::from);
    let spans = || -> HashMap<String, Span> {
        received
            .lock()
            .unwrap()
            .iter()
            .filter(|(_, s)| hex(&s.trace_id) == trace)
            .map(|(service, s)| {
                assert_eq!(service, "tessera-test", "otel.service_name names the spans");
                (s.name.clone(), s.clone())
            })
            .collect()
    };
    eventually("every span of the trace is exported", WITHIN, || async {
        // Blocks until the export is answered, which runs on this runtime.
        tokio::task::spawn_blocking(tessera_runtime::otel::flush)
            .await
            .unwrap();
        let got = spans();
        names.iter().all(|n| got.contains_key(n))
    })
    .await;
    check_trace(&spans(), &names, trace, browser, &up);

    stop.cancel();
    let _ = tokio::time::timeout(WITHIN, worker).await;
    gateway.stop().await;
}
