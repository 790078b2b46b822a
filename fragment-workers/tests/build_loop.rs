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
use tessera_workers::{BuildError, FragmentBuilder, Rendered};
use tokio_util::sync::CancellationToken;

/// Panics on its first call for id 1, renders everything else.
#[derive(Debug, Default)]
struct Scripted {
    calls: AtomicUsize,
}

#[async_trait]
impl FragmentBuilder for Scripted {
    async fn build(&self, _: &FragmentRoute, req: &BuildRequest) -> Result<Rendered, BuildError> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        match req.identity.params[0].1.as_str() {
            "panics" => panic!("a bug in a builder"),
            "teapot" => Err(BuildError::UpstreamClient(http::StatusCode::IM_A_TEAPOT)),
            id => Ok(Rendered {
                body: Bytes::from(format!("<p>{id}</p>")),
                content_type: "text/html".into(),
            }),
        }
    }
}

struct Setup {
    backends: Backends,
    bus: MemoryBus,
    builder: Arc<Scripted>,
    stop: CancellationToken,
    worker: tokio::task::JoinHandle<()>,
    route: FragmentRoute,
}

async fn setup() -> Setup {
    let mut route = FragmentRoute::new("r", "/r");
    route.params = vec!["id".into()];
    let config = Config {
        fragments: vec![route.clone()],
        ..Config::default()
    };
    let bus = MemoryBus::new();
    let mut backends = Backends::memory(&config);
    backends.bus = Arc::new(bus.clone());
    let builder = Arc::new(Scripted::default());
    let stop = CancellationToken::new();
    let (b, s, f) = (backends.clone(), stop.clone(), builder.clone());
    let worker = tokio::spawn(async move {
        tessera_workers::run(
            b,
            Arc::new(config),
            f,
            4,
            async move { s.cancelled().await },
        )
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
    }
}

async fn request(s: &Setup, id: &str, generation: u64) -> tessera_protocol::FragmentKeys {
    let identity = Identity {
        route: "r".into(),
        params: vec![("id".into(), id.into())],
        vary: vec![],
    };
    let keys = s.backends.keys.fragment(&identity, generation);
    assert!(
        s.backends
            .store
            .add(&keys.lease(), b"", s.route.lease_ttl())
            .await
            .unwrap()
    );
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
        s.backends.store.get(&bad.lease()).await.unwrap().is_none(),
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
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while s.bus.dead_letters().len() < 2 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{:?}",
            s.bus.dead_letters()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let reasons: Vec<String> = s.bus.dead_letters().into_iter().map(|d| d.reason).collect();
    assert!(reasons[0].contains("undecodable"), "{reasons:?}");
    assert!(reasons[1].contains("allow-list"), "{reasons:?}");
    assert_eq!(s.builder.calls.load(Ordering::SeqCst), 0);
    s.stop.cancel();
    s.worker.await.unwrap();
}
