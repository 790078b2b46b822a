//! Render limits over the whole deployment (`max_renders`, `renders_per_second`): what the
//! upstream sees from several workers sharing one store and broker, a slot left by a
//! worker that died, and a gateway's embedded workers. Limits are kept in the store, so
//! every scenario that makes sense there runs on both backends.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::time::Duration;

use tessera_protocol::message::VERSION;
use tessera_protocol::{Backends, BuildRequest, Config, FragmentRoute, Identity};
use tessera_tests::harness::{Backend, TestGateway, backends, client, config, text};
use tessera_tests::upstream::FakeUpstream;
use tessera_tests::{eventually, metric};
use tessera_workers::limits::{Limits, SLOT_SLACK};
use tessera_workers::{HttpBuilder, WorkerMetrics};
use tokio_util::sync::CancellationToken;

/// A route of the fake upstream, one fragment per `id`, rendering in `ms`.
fn fragment_route(up: &FakeUpstream, name: &str, ms: u64) -> FragmentRoute {
    let mut r = up.render(name, ms, &format!("<p>{name}</p>"));
    r.params = vec!["id".into()];
    r
}

/// A limited route, on a queue of its own as a loaded file would give it.
fn limited(up: &FakeUpstream, name: &str, ms: u64) -> FragmentRoute {
    let mut r = fragment_route(up, name, ms);
    r.queue = format!("tessera.build.{name}");
    r
}

/// A build request for fragment `id` of `route`, as another program would publish it.
fn request(route: &str, id: usize) -> BuildRequest {
    BuildRequest {
        v: VERSION,
        id: format!("{route}-{id}"),
        key: String::new(),
        identity: Identity {
            route: route.into(),
            params: vec![("id".into(), id.to_string())],
            vary: vec![],
        },
        generation: 0,
        attempt: 1,
        requested_at: 0,
        lease_deadline: 0,
        trace_id: String::new(),
        traceparent: None,
    }
}

/// Publishes builds `ids` of `route` on its queue.
async fn publish(b: &Backends, config: &Config, route: &str, ids: std::ops::Range<usize>) {
    let queue = &config.route(route).unwrap().queue;
    for id in ids {
        b.bus
            .publish_build(queue, &request(route, id))
            .await
            .unwrap();
    }
}

/// `workers` worker pools of `concurrency` builds, each with store and broker
/// connections of its own on real backends (as separate processes have), sharing
/// `metrics`. They stop when `stop` fires.
async fn workers(
    kind: Backend,
    b: &Backends,
    config: &Config,
    workers: usize,
    concurrency: usize,
    metrics: &WorkerMetrics,
    stop: &CancellationToken,
) -> Vec<tokio::task::JoinHandle<()>> {
    let mut tasks = Vec::new();
    for _ in 0..workers {
        let own = match kind {
            Backend::Memory => b.clone(),
            Backend::Real => tessera_backends::connect(config).await.unwrap(),
        };
        let builder = Arc::new(HttpBuilder::new(config).unwrap());
        let (config, metrics, stop) = (Arc::new(config.clone()), metrics.clone(), stop.clone());
        tasks.push(tokio::spawn(async move {
            tessera_workers::run(own, config, builder, concurrency, metrics, async move {
                stop.cancelled().await;
            })
            .await
            .unwrap();
        }));
    }
    tasks
}

fn built(metrics: &WorkerMetrics, route: &str) -> u64 {
    metrics
        .succeeded
        .get_or_create(&tessera_workers::metrics::RouteLabels {
            route: route.into(),
        })
        .get()
}

/// 500 builds of a route limited to 3 renders at once, on 4 workers of 16 builds each:
/// the upstream never renders more than 3 of them at once, and another route's builds,
/// queued behind them, are all done while the limited route is still draining.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_renders_holds_over_every_worker_and_other_routes_go_on() {
    let up = FakeUpstream::start().await;
    let mut slow = limited(&up, "slow", 20);
    slow.max_renders = 3;
    let other = fragment_route(&up, "other", 0);
    let mut config = config(&up.url(), vec![slow, other]);
    let b = backends(Backend::Real, &mut config).await;
    let (metrics, stop) = (WorkerMetrics::default(), CancellationToken::new());
    let pools = workers(Backend::Real, &b, &config, 4, 16, &metrics, &stop).await;
    publish(&b, &config, "slow", 0..500).await;
    publish(&b, &config, "other", 0..20).await;
    eventually("the other route's 20 builds", WITHIN, || async {
        built(&metrics, "other") == 20
    })
    .await;
    let slow_built = built(&metrics, "slow");
    assert!(
        slow_built < 500,
        "the other route waited for the limited one ({slow_built} of 500 built first)"
    );
    eventually(
        "the limited route's 500 builds",
        Duration::from_secs(120),
        || async { built(&metrics, "slow") == 500 },
    )
    .await;
    assert_eq!(up.renders("/_render/slow"), 500, "each built once");
    let peak = up.peak("/_render/slow");
    assert!(
        peak <= 3,
        "{peak} renders of the route at once; max_renders = 3"
    );
    assert!(peak >= 2, "the limit was used, not serialised: peak {peak}");
    stop.cancel();
    for pool in pools {
        pool.await.unwrap();
    }
}

const WITHIN: Duration = Duration::from_secs(30);

/// A worker killed while it renders leaves its slot taken; the slot frees itself within
/// the route's build timeout (and the slack), and the next build renders then.
async fn a_dead_worker_s_slot_frees_itself(kind: Backend) {
    let up = FakeUpstream::start().await;
    let mut route = limited(&up, "one", 0);
    route.max_renders = 1;
    route.build_timeout = Duration::from_secs(1);
    let mut config = config(&up.url(), vec![route]);
    let b = backends(kind, &mut config).await;
    let route = config.route("one").unwrap().clone();
    // What a process killed mid-render leaves: a slot nobody frees.
    let dead = Limits::new(&b, WorkerMetrics::default());
    let permit = dead.admit(&route, &CancellationToken::new()).await.unwrap();
    std::mem::forget(permit);
    let (metrics, stop) = (WorkerMetrics::default(), CancellationToken::new());
    let pools = workers(kind, &b, &config, 1, 4, &metrics, &stop).await;
    publish(&b, &config, "one", 0..1).await;
    let labels = tessera_workers::metrics::RouteLabels {
        route: "one".into(),
    };
    eventually("the build waits for the slot", WITHIN, || async {
        metrics.limit_waiting.get_or_create(&labels).get() == 1
    })
    .await;
    assert_eq!(up.renders("/_render/one"), 0, "the taken slot was honoured");
    let expiry = route.build_timeout + SLOT_SLACK;
    eventually(
        "the build, once the dead worker's slot expired",
        expiry + Duration::from_secs(2),
        || async { built(&metrics, "one") == 1 },
    )
    .await;
    stop.cancel();
    for pool in pools {
        pool.await.unwrap();
    }
}

/// A worker whose task is aborted mid-render (its runtime goes on) frees its slot at
/// once, long before the slot would expire.
async fn an_aborted_worker_frees_its_slot_at_once(kind: Backend) {
    let up = FakeUpstream::start().await;
    let mut route = limited(&up, "hangs", 60_000);
    route.max_renders = 1;
    route.build_timeout = Duration::from_secs(30);
    let mut config = config(&up.url(), vec![route]);
    let b = backends(kind, &mut config).await;
    let (metrics, stop) = (WorkerMetrics::default(), CancellationToken::new());
    let mut pools = workers(kind, &b, &config, 1, 4, &metrics, &stop).await;
    publish(&b, &config, "hangs", 0..1).await;
    eventually("the render started", WITHIN, || async {
        up.renders("/_render/hangs") == 1
    })
    .await;
    let slot = b.keys.render_slot("hangs", 0);
    assert!(
        b.store.get(&slot).await.unwrap().is_some(),
        "held while rendering"
    );
    pools.pop().unwrap().abort();
    // The slot would expire after 33 s.
    eventually("the slot freed", Duration::from_secs(5), || async {
        b.store.get(&slot).await.unwrap().is_none()
    })
    .await;
    stop.cancel();
}

/// `renders_per_second = 10` over two workers: however the 40 builds fall into seconds,
/// no span of the renders holds more than 10 per second it touches. With
/// `max_renders = 2` beside it, builds holding a slot wait for their second's token, and
/// the slot limit holds too.
async fn renders_per_second_holds(kind: Backend) {
    let up = FakeUpstream::start().await;
    let mut paced = limited(&up, "paced", 20);
    paced.renders_per_second = 10;
    paced.max_renders = 2;
    let mut config = config(&up.url(), vec![paced]);
    let b = backends(kind, &mut config).await;
    let (metrics, stop) = (WorkerMetrics::default(), CancellationToken::new());
    let pools = workers(kind, &b, &config, 2, 16, &metrics, &stop).await;
    publish(&b, &config, "paced", 0..40).await;
    eventually("the 40 builds", WITHIN, || async {
        built(&metrics, "paced") == 40
    })
    .await;
    let arrivals = up.arrivals("/_render/paced");
    assert_eq!(arrivals.len(), 40);
    let span = *arrivals.last().unwrap() - arrivals[0];
    // Fixed windows of one second: a span of t seconds touches at most ⌊t⌋ + 2 of
    // them; 50 ms for the time between a token and its request's arrival.
    let windows = (span + Duration::from_millis(50)).as_secs() + 2;
    assert!(
        40 <= 10 * windows,
        "40 renders within {span:?}: more than 10 per second"
    );
    let peak = up.peak("/_render/paced");
    assert!(peak <= 2, "{peak} renders at once; max_renders = 2");
    stop.cancel();
    for pool in pools {
        pool.await.unwrap();
    }
}

/// Two gateways' embedded workers sharing one store hold the limit together (each alone
/// would render 3 at once), the dashboard shows it, and the waits are on /metrics.
async fn embedded_workers_hold_max_renders(kind: Backend) {
    let up = FakeUpstream::start().await;
    let mut slow = limited(&up, "slow", 30);
    slow.max_renders = 3;
    let mut config = config(&up.url(), vec![slow]);
    config.workers.embedded = 4;
    let b = backends(kind, &mut config).await;
    let one = TestGateway::start(config.clone(), b.clone()).await;
    let two = TestGateway::start(config, b).await;
    // All at once, half through each gateway.
    let asked = (0..40).map(|id| {
        let gw = if id % 2 == 0 { &one } else { &two };
        client()
            .get(gw.at(&format!("/fragments/slow?id={id}")))
            .send()
    });
    for r in futures_util::future::join_all(asked).await {
        assert_eq!(r.unwrap().status(), 202);
    }
    eventually("40 renders", WITHIN, || async {
        up.renders("/_render/slow") == 40
    })
    .await;
    let peak = up.peak("/_render/slow");
    assert!(peak <= 3, "{peak} renders at once; max_renders = 3");
    let status: serde_json::Value =
        serde_json::from_str(&text(format!("{}/api/status", one.admin)).await).unwrap();
    assert_eq!(status["limits"][0]["route"], "slow");
    assert_eq!(status["limits"][0]["max_renders"], 3);
    let waits = |text: &str| {
        metric(
            text,
            "tessera_worker_limit_wait_seconds_count{route=\"slow\"}",
        )
    };
    let (m1, m2) = (
        text(format!("{}/metrics", one.admin)).await,
        text(format!("{}/metrics", two.admin)).await,
    );
    assert!(waits(&m1) + waits(&m2) >= 40.0, "{m1}\n{m2}");
    one.stop().await;
    two.stop().await;
}

tessera_tests::on_both_backends!(
    a_dead_worker_s_slot_frees_itself,
    an_aborted_worker_frees_its_slot_at_once,
    renders_per_second_holds,
    embedded_workers_hold_max_renders,
);
