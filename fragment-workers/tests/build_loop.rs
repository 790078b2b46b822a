//! The build loop on the in-memory backends with scripted builders: what a worker does
//! when a builder panics, fails, or the gateway's route was purged meanwhile.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use tessera_protocol::bus::MemoryBus;
use tessera_protocol::envelope::Status;
use tessera_protocol::message::VERSION;
use tessera_protocol::{
    Backends, BuildRequest, Bus, Config, Envelope, FragmentRoute, Identity, store,
};
use tessera_runtime::reload::LiveConfig;
use tessera_workers::metrics::DropLabels;
use tessera_workers::{BuildError, FragmentBuilder, Rendered, WorkerMetrics};
use tokio_util::sync::CancellationToken;

/// Scripted by the `id` param: `panics`, `teapot` (418), `down` (503), `huge` (a body
/// just under `store.max_item_size`, too big with its key and envelope), `overtagged`
/// (one tag over the limit), `tagged` (two tags), `tagged-then-gone` (two tags, then 410
/// once anything was built); renders the rest.
#[derive(Debug, Default)]
struct Scripted {
    calls: AtomicUsize,
}

#[async_trait]
impl FragmentBuilder for Scripted {
    async fn build(&self, _: &FragmentRoute, req: &BuildRequest) -> Result<Rendered, BuildError> {
        let earlier = self.calls.fetch_add(1, Ordering::SeqCst);
        match req.identity.params[0].1.as_str() {
            "tagged-then-gone" if earlier > 0 => {
                Err(BuildError::UpstreamClient(http::StatusCode::GONE))
            }
            "panics" => panic!("a bug in a builder"),
            "teapot" => Err(BuildError::UpstreamClient(http::StatusCode::IM_A_TEAPOT)),
            "down" => Err(BuildError::UpstreamServer(
                http::StatusCode::SERVICE_UNAVAILABLE,
            )),
            "huge" => Ok(Rendered {
                body: Bytes::from(vec![b'x'; HUGE]),
                content_type: "text/html".into(),
                esi: false,
                tags: vec![],
            }),
            id => Ok(Rendered {
                body: Bytes::from(format!("<p>{id}</p>")),
                content_type: "text/html".into(),
                esi: false,
                tags: match id {
                    "overtagged" => (0..=tessera_protocol::tags::MAX_TAGS)
                        .map(|i| format!("t{i}"))
                        .collect(),
                    "tagged" | "tagged-then-gone" => {
                        vec!["product-42".into(), "shelf-7".into()]
                    }
                    _ => vec![],
                },
            }),
        }
    }
}

/// A body 100 bytes under the default `store.max_item_size`.
const HUGE: usize = 1023 * 1024 - 100;

struct Setup {
    backends: Backends,
    bus: MemoryBus,
    builder: Arc<Scripted>,
    stop: CancellationToken,
    worker: tokio::task::JoinHandle<()>,
    route: FragmentRoute,
    /// The worker's configuration, which a test may reload.
    live: Arc<LiveConfig>,
    metrics: WorkerMetrics,
}

async fn setup() -> Setup {
    let mut route = FragmentRoute::new("r", "/r");
    route.params = vec!["id".into()];
    route.max_attempts = 2;
    let config = Config {
        fragments: vec![route.clone()],
        ..Config::default()
    };
    let bus = MemoryBus::new();
    let mut backends = Backends::memory(&config);
    backends.bus = Arc::new(bus.clone());
    let builder = Arc::new(Scripted::default());
    let stop = CancellationToken::new();
    let metrics = WorkerMetrics::default();
    let (b, s, f, m) = (
        backends.clone(),
        stop.clone(),
        builder.clone(),
        metrics.clone(),
    );
    let live = LiveConfig::new(config);
    let l = live.clone();
    let worker = tokio::spawn(async move {
        tessera_workers::run_live(b, l, f, 4, m, async move { s.cancelled().await })
            .await
            .unwrap();
    });
    Setup {
        backends,
        bus,
        builder,
        stop,
        worker,
        route,
        live,
        metrics,
    }
}

async fn request(s: &Setup, id: &str, generation: u64) -> tessera_protocol::FragmentKeys {
    let identity = Identity {
        route: "r".into(),
        params: vec![("id".into(), id.into())],
        vary: vec![],
    };
    let keys = s.backends.keys.fragment(&identity, generation);
    let lease = tessera_protocol::Lease::new(s.backends.store.as_ref(), &keys, &s.route);
    assert!(lease.acquire(id).await.unwrap().is_some());
    let req = BuildRequest {
        v: VERSION,
        id: id.into(),
        key: keys.envelope.to_string(),
        identity,
        generation,
        attempt: 1,
        requested_at: 0,
        lease_deadline: 0,
        trace_id: String::new(),
        traceparent: None,
    };
    s.bus.publish_build(&s.route.queue, &req).await.unwrap();
    keys
}

async fn envelope(s: &Setup, keys: &tessera_protocol::FragmentKeys) -> Envelope {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        if let Some(bytes) = s.backends.store.get(&keys.envelope).await.unwrap() {
            return Envelope::decode(&bytes).unwrap();
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no envelope for {}",
            keys.envelope
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Waits (bounded) until `n` requests are dead-lettered.
async fn dead_letters(s: &Setup, n: usize) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while s.bus.dead_letters().len() < n {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{:?}",
            s.bus.dead_letters()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

async fn current_generation(s: &Setup) -> u64 {
    store::generation(s.backends.store.as_ref(), &s.backends.keys.generation("r"))
        .await
        .unwrap()
}

#[tokio::test]
async fn a_panicking_builder_fails_that_build_and_nothing_else() {
    let s = setup().await;
    let generation = current_generation(&s).await;
    let bad = request(&s, "panics", generation).await;
    let e = envelope(&s, &bad).await;
    assert_eq!(e.status, Status::Failed);
    assert!(e.error.unwrap().contains("panicked"));
    assert!(
        tessera_protocol::Lease::new(s.backends.store.as_ref(), &bad, &s.route)
            .holder()
            .await
            .unwrap()
            .is_none(),
        "lease released"
    );
    // The loop survived: the next request is built.
    let good = request(&s, "fine", generation).await;
    assert_eq!(
        envelope(&s, &good).await.body,
        Bytes::from_static(b"<p>fine</p>")
    );
    assert!(
        s.bus.dead_letters().is_empty(),
        "a panic is final, not dead-lettered"
    );
    s.stop.cancel();
    s.worker.await.unwrap();
}

#[tokio::test]
async fn a_client_error_is_not_retried() {
    let s = setup().await;
    let keys = request(&s, "teapot", current_generation(&s).await).await;
    let e = envelope(&s, &keys).await;
    assert_eq!(e.status, Status::Failed);
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(s.builder.calls.load(Ordering::SeqCst), 1);
    s.stop.cancel();
    s.worker.await.unwrap();
}

#[tokio::test]
async fn a_build_for_a_purged_generation_is_dropped() {
    let s = setup().await;
    let old = current_generation(&s).await;
    store::bump_generation(s.backends.store.as_ref(), &s.backends.keys.generation("r"))
        .await
        .unwrap();
    let keys = request(&s, "stale", old).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        s.backends
            .store
            .get(&keys.envelope)
            .await
            .unwrap()
            .is_none(),
        "never written"
    );
    assert_eq!(
        s.builder.calls.load(Ordering::SeqCst),
        0,
        "not even rendered"
    );
    assert_eq!(
        s.bus.depth(&s.route.queue),
        0,
        "acknowledged, not left on the queue"
    );
    s.stop.cancel();
    s.worker.await.unwrap();
}

/// Issue 32: a reload removed the route; the build requests already queued for it are
/// acknowledged and counted as dropped, neither rendered nor dead-lettered.
#[tokio::test]
async fn a_build_for_a_route_a_reload_removed_is_dropped_and_counted() {
    let s = setup().await;
    let generation = current_generation(&s).await;
    let reloaded = s.live.replace(Config::default());
    assert_eq!(reloaded.removed, ["r"]);
    request(&s, "gone", generation).await;
    let dropped = s.metrics.dropped.get_or_create(&DropLabels {
        route: "r".into(),
        reason: "route_removed",
    });
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while dropped.get() == 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "not dropped; dead letters: {:?}",
            s.bus.dead_letters()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(s.builder.calls.load(Ordering::SeqCst), 0, "not rendered");
    assert!(s.bus.dead_letters().is_empty(), "not dead-lettered");
    assert_eq!(s.bus.depth(&s.route.queue), 0, "acknowledged");
    s.stop.cancel();
    s.worker.await.unwrap();
}

#[tokio::test]
async fn a_request_that_does_not_fit_its_route_is_dead_lettered() {
    let s = setup().await;
    s.bus
        .publish_raw(&s.route.queue, Bytes::from_static(b"not json"))
        .unwrap();
    let forged = br#"{"v":1,"id":"f","key":"","route":"r","params":[["admin","1"]],"vary":[],
        "generation":0,"attempt":1,"requested_at":0,"lease_deadline":0,"trace_id":""}"#;
    s.bus
        .publish_raw(&s.route.queue, Bytes::from_static(forged))
        .unwrap();
    dead_letters(&s, 2).await;
    let reasons: Vec<String> = s.bus.dead_letters().into_iter().map(|d| d.reason).collect();
    assert!(reasons[0].contains("undecodable"), "{reasons:?}");
    assert!(reasons[1].contains("allow-list"), "{reasons:?}");
    assert_eq!(s.builder.calls.load(Ordering::SeqCst), 0);
    s.stop.cancel();
    s.worker.await.unwrap();
}

/// A field the gateway would never write so (here a trace id with a newline, which would
/// forge a worker log line and fail the render request) is dead-lettered naming the field,
/// before anything is rendered.
#[tokio::test]
async fn a_request_with_a_hostile_field_is_dead_lettered_naming_it() {
    let s = setup().await;
    let cases = [
        (
            &br#"{"v":1,"id":"f1","key":"","route":"r","params":[["id","1"]],"vary":[],
        "generation":0,"attempt":1,"requested_at":0,"lease_deadline":0,
        "trace_id":"t\n2026-01-01T00:00:00Z  INFO built route=admin"}"#[..],
            "`trace_id`",
        ),
        (
            br#"{"v":1,"id":"f2\r\n","key":"","route":"r","params":[["id","1"]],"vary":[],
        "generation":0,"attempt":1,"requested_at":0,"lease_deadline":0,"trace_id":""}"#,
            "`id`",
        ),
        (
            br#"{"v":1,"id":"f3","key":"a b","route":"r","params":[["id","1"]],"vary":[],
        "generation":0,"attempt":1,"requested_at":0,"lease_deadline":0,"trace_id":""}"#,
            "`key`",
        ),
    ];
    for (forged, _) in cases {
        s.bus
            .publish_raw(&s.route.queue, Bytes::copy_from_slice(forged))
            .unwrap();
    }
    dead_letters(&s, 3).await;
    let reasons: Vec<String> = s.bus.dead_letters().into_iter().map(|d| d.reason).collect();
    for (_, field) in cases {
        assert!(
            reasons.iter().any(|r| r.contains(field)),
            "{field}: {reasons:?}"
        );
    }
    for reason in &reasons {
        assert!(
            !reason.contains('\n') && !reason.contains("INFO"),
            "{reason:?}"
        );
    }
    assert_eq!(
        s.builder.calls.load(Ordering::SeqCst),
        0,
        "nothing rendered"
    );
    s.stop.cancel();
    s.worker.await.unwrap();
}

/// `GET http://{addr}{path}` with an optional bearer token: status and body.
async fn get(addr: std::net::SocketAddr, path: &str, token: Option<&str>) -> (u16, String) {
    use http_body_util::{BodyExt, Empty};
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http::<Empty<Bytes>>();
    let mut req = http::Request::get(format!("http://{addr}{path}"));
    if let Some(token) = token {
        req = req.header("authorization", format!("Bearer {token}"));
    }
    let response = client
        .request(req.body(Empty::new()).unwrap())
        .await
        .unwrap();
    let status = response.status().as_u16();
    let body = response.into_body().collect().await.unwrap().to_bytes();
    (status, String::from_utf8_lossy(&body).into_owned())
}

#[tokio::test]
async fn the_admin_listener_reports_outcomes_and_health() {
    let s = setup().await;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let stop = s.stop.clone();
    tokio::spawn(tessera_workers::admin::serve(
        listener,
        s.metrics.clone(),
        s.backends.clone(),
        "t0ken".into(),
        tessera_protocol::config::HttpConfig::default(),
        async move { stop.cancelled().await },
    ));

    let generation = current_generation(&s).await;
    let fine = request(&s, "fine", generation).await;
    let teapot = request(&s, "teapot", generation).await;
    let down = request(&s, "down", generation).await;
    s.bus
        .publish_raw(&s.route.queue, Bytes::from_static(b"not json"))
        .unwrap();
    for keys in [&fine, &teapot] {
        envelope(&s, keys).await;
    }
    // `down` fails, is retried once (max_attempts = 2), then fails for good.
    assert_eq!(envelope(&s, &down).await.status, Status::Failed);
    dead_letters(&s, 2).await;

    // Liveness is open to probes; everything else needs the token.
    assert_eq!(get(addr, "/healthz", None).await, (200, "ok\n".into()));
    for path in ["/metrics", "/readyz"] {
        assert_eq!(
            get(addr, path, None).await.0,
            401,
            "{path} without the token"
        );
        assert_eq!(
            get(addr, path, Some("wrong")).await.0,
            401,
            "{path} with a wrong token"
        );
    }
    let (status, text) = get(addr, "/metrics", Some("t0ken")).await;
    assert_eq!(status, 200);
    for line in [
        r#"tessera_worker_builds_succeeded_total{route="r"} 1"#,
        r#"tessera_worker_builds_failed_total{route="r"} 2"#,
        r#"tessera_worker_builds_retried_total{route="r"} 1"#,
        r#"tessera_worker_builds_dead_lettered_total{route="r"} 1"#,
        r#"tessera_worker_builds_dead_lettered_total{route=""} 1"#,
        r#"tessera_worker_build_duration_seconds_count{route="r"} 1"#,
        "tessera_worker_builds_in_flight 0",
        "tessera_bus_reconnects_total 0",
    ] {
        assert!(text.contains(line), "missing {line:?} in\n{text}");
    }
    // The Prometheus text format (a scraper asking for OpenMetrics gets that instead).
    assert!(
        text.contains("# TYPE tessera_worker_builds_succeeded_total counter\n"),
        "{text}"
    );
    assert!(!text.contains("# EOF"), "{text}");
    assert_eq!(
        get(addr, "/healthz", Some("t0ken")).await,
        (200, "ok\n".into())
    );
    let (status, ready) = get(addr, "/readyz", Some("t0ken")).await;
    assert_eq!(
        (status, ready.as_str()),
        (200, r#"{"bus":"ok","store":"ok"}"#)
    );
    assert_eq!(get(addr, "/nope", Some("t0ken")).await.0, 404);
    s.stop.cancel();
    s.worker.await.unwrap();
}

#[tokio::test]
async fn a_fragment_too_large_to_store_fails_saying_what_it_takes() {
    let s = setup().await;
    let generation = current_generation(&s).await;
    let keys = request(&s, "huge", generation).await;
    let e = envelope(&s, &keys).await;
    assert_eq!(e.status, Status::Failed);
    let error = e.error.unwrap();
    let max = 1023 * 1024;
    assert!(
        error.starts_with("fragment too large")
            && error.contains(&format!("store.max_item_size ({max} bytes)")),
        "{error}"
    );
    // The size it names is what the item would take, over the limit, not the body
    // alone (under it), so the message never reads "N exceeds M" with N < M.
    let size: usize = error
        .split_whitespace()
        .find_map(|w| w.parse().ok())
        .unwrap();
    assert!(size > max && size > HUGE, "{error}");
    assert_eq!(s.builder.calls.load(Ordering::SeqCst), 1, "not retried");
}

#[tokio::test]
async fn tags_are_stored_with_the_render_start_and_a_list_over_the_limit_fails() {
    let s = setup().await;
    let generation = current_generation(&s).await;
    let before = tessera_protocol::time::now_ms();
    let keys = request(&s, "tagged", generation).await;
    let e = envelope(&s, &keys).await;
    assert_eq!(e.status, Status::Ready);
    assert_eq!(e.tags, vec!["product-42", "shelf-7"]);
    assert!(
        (before..=e.built_at).contains(&e.render_started),
        "{before} {} {}",
        e.render_started,
        e.built_at
    );

    let keys = request(&s, "overtagged", generation).await;
    let e = envelope(&s, &keys).await;
    assert_eq!(e.status, Status::Failed);
    let error = e.error.unwrap();
    assert!(
        error.contains("Surrogate-Key") && error.contains("at most 32"),
        "{error}"
    );
    assert_eq!(s.builder.calls.load(Ordering::SeqCst), 2, "not retried");
}

#[tokio::test]
async fn a_failure_does_not_keep_a_copy_a_tag_purge_retired() {
    let s = setup().await;
    let generation = current_generation(&s).await;
    let keys = request(&s, "tagged-then-gone", generation).await;
    assert_eq!(envelope(&s, &keys).await.status, Status::Ready);
    let tag = tessera_protocol::tags::Tag::new("shelf-7").unwrap();
    tessera_protocol::tags::purge(s.backends.store.as_ref(), &s.backends.keys, &tag)
        .await
        .unwrap();
    request(&s, "tagged-then-gone", generation).await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    let failed = loop {
        let e = envelope(&s, &keys).await;
        if e.status == Status::Failed {
            break e;
        }
        assert!(tokio::time::Instant::now() < deadline, "never failed");
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    assert!(
        failed.body.is_empty() && failed.tags.is_empty(),
        "{failed:?}"
    );
    assert!(!failed.servable(tessera_protocol::time::now_ms()));
}
