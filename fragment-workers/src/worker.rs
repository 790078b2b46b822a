//! The build loop: take a request off the broker, render, store, announce, acknowledge.
//!
//! The order of the steps is the contract that makes the worker pattern safe:
//!
//! 0. the request claims the fragment's lease (a request superseded by a newer one, or
//!    whose fragment is already fresh, is acknowledged and dropped; see
//!    [`tessera_protocol::lease`]),
//! 1. the envelope is stored,
//! 2. the lease is deleted (1 and 2 are one ordered exchange on memcached, see
//!    [`Lease::finish`]),
//! 3. only then is the message acknowledged, while `built` is published beside it (an
//!    event is advice: its confirm is not waited for).
//!
//! A worker that dies anywhere before 3 leaves the message unacknowledged, so the broker
//! hands it to another worker; builds are idempotent (same key, same result), so doing
//! one twice is harmless. The lease expires on its own, so no key stays pending forever.
//!
//! A route with render limits (`max_renders`, `renders_per_second`) waits for them
//! ([`crate::limits`]) before step 0, in a consumer of its own: its builds waiting hold
//! no delivery or build slot of another route's.
//!
//! Failures are decided from the error's type: upstream 5xx, timeouts, unreachable
//! upstreams and store outages are retried through the broker's retry queue with
//! exponential backoff and jitter (the lease is extended first); 4xx, redirects,
//! oversize fragments, refused tags (`Surrogate-Key` over a limit) and panics are final.
//! A final failure stores a `failed` envelope (which keeps the last good copy for
//! stale-if-error) for the route's `failed_ttl`.
//! Requests that exhausted their attempts, could not be decoded, or do not fit the
//! configuration are dead-lettered — never requeued in a loop.

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use prometheus_client::metrics::gauge::Gauge;
use tessera_protocol::config::background_queue;
use tessera_protocol::time::now_ms;
use tessera_protocol::{
    Backends, BuildRequest, BusError, Claim, Config, Consumer, Delivery, Envelope, Event,
    FragmentKeys, FragmentRoute, Lease, StoreError, store,
};
use tessera_runtime::otel;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use tessera_runtime::reload::LiveConfig;

use crate::builder::{BuildError, FragmentBuilder, Rendered};
use crate::limits::{Limits, Refused};
use crate::metrics::WorkerMetrics;
use crate::retry::backoff;

/// Why the build loop could not run.
#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    /// Consuming from the broker failed.
    #[error("cannot consume build requests: {0}")]
    Bus(#[from] BusError),
}

/// Margin on top of `build_timeout` before the worker gives up on a builder that
/// ignores its own deadline.
const RENDER_MARGIN: Duration = Duration::from_secs(1);
/// Pause before requeueing a request that could not be settled (store and broker both
/// in trouble), so an outage does not turn into a hot loop.
const REQUEUE_PAUSE: Duration = Duration::from_secs(1);
/// Bytes an item takes in memcached beyond its value and key (item header, flags, CAS).
const ITEM_OVERHEAD: usize = 512;

/// Runs `concurrency` concurrent builds from every configured queue until `shutdown`,
/// then finishes in-flight builds (bounded by the longest `build_timeout` + 5 s) and
/// releases any left to other workers. Outcomes are counted in `metrics`.
pub async fn run(
    backends: Backends,
    config: Arc<Config>,
    builder: Arc<dyn FragmentBuilder>,
    concurrency: usize,
    metrics: WorkerMetrics,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), WorkerError> {
    let live = LiveConfig::shared(config);
    run_live(backends, live, builder, concurrency, metrics, shutdown).await
}

/// [`run`] on a configuration that reloads may replace: each build takes the routes
/// as they are when its request arrives. A request for a route a reload removed is
/// acknowledged and counted as dropped (`reason="route_removed"`), not dead-lettered.
/// The queues consumed are those of the configuration at start: the routes without
/// render limits share one consumer of `concurrency` builds; each route with limits
/// (`max_renders`, `renders_per_second`) has a consumer of its own, of at most
/// `min(max_renders, concurrency)` builds, so that its builds waiting for the limit
/// hold up no other route's.
pub async fn run_live(
    backends: Backends,
    live: Arc<LiveConfig>,
    builder: Arc<dyn FragmentBuilder>,
    concurrency: usize,
    metrics: WorkerMetrics,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), WorkerError> {
    let config = live.load();
    let stopping = CancellationToken::new();
    let worker = Arc::new(Worker {
        limits: Limits::new(&backends, metrics.clone()),
        backends,
        config: live.clone(),
        builder,
        metrics,
        stopping: stopping.clone(),
    });
    let mut loops = Vec::new();
    for lane in lanes(&config, concurrency.max(1)) {
        let prefetch = u16::try_from(lane.builds).unwrap_or(u16::MAX);
        let consumer = worker
            .backends
            .bus
            .consume(&lane.queues, &lane.background, prefetch)
            .await?;
        tracing::info!(queues = ?lane.queues, background = ?lane.background, concurrency = lane.builds, "worker consuming");
        loops.push(consume(worker.clone(), consumer, lane.builds));
    }
    let all = futures_util::future::join_all(loops);
    tokio::pin!(all, shutdown);
    tokio::select! {
        _ = &mut all => return Ok(()),
        () = &mut shutdown => stopping.cancel(),
    }
    all.await;
    Ok(())
}

/// One consumer of the worker: the queues it reads and how many builds it runs at once.
#[derive(Debug, PartialEq, Eq)]
struct Lane {
    queues: Vec<String>,
    background: Vec<String>,
    builds: usize,
}

/// The consumers a worker of `concurrency` builds runs for `config`: one for every
/// queue of routes without limits (if any), then one per limited route's queue.
fn lanes(config: &Config, concurrency: usize) -> Vec<Lane> {
    let limited = config.limited_queues();
    let shared: Vec<String> = config
        .queues()
        .into_iter()
        .filter(|q| !limited.contains(q))
        .collect();
    let mut lanes = Vec::new();
    if !shared.is_empty() {
        lanes.push(Lane {
            background: shared.iter().map(|q| background_queue(q)).collect(),
            queues: shared,
            builds: concurrency,
        });
    }
    for route in config.fragments.iter().filter(|r| r.limited()) {
        let most = match route.max_renders {
            0 => concurrency,
            n => concurrency.min(usize::try_from(n).unwrap_or(usize::MAX)),
        };
        lanes.push(Lane {
            queues: vec![route.queue.clone()],
            background: vec![background_queue(&route.queue)],
            builds: most,
        });
    }
    lanes
}

/// Runs up to `builds` builds at once from `consumer` until the worker stops, then
/// finishes those in hand (bounded by the longest `build_timeout` + 5 s) and releases
/// any left to other workers.
async fn consume(worker: Arc<Worker>, mut consumer: Box<dyn Consumer>, builds: usize) {
    let slots = Arc::new(Semaphore::new(builds));
    let mut running = JoinSet::new();
    let stopping = worker.stopping.clone();
    loop {
        while let Some(done) = running.try_join_next() {
            if let Err(e) = done {
                tracing::error!(error = %e, "build task failed");
            }
        }
        let slot = tokio::select! {
            () = stopping.cancelled() => break,
            slot = slots.clone().acquire_owned() => match slot {
                Ok(slot) => slot,
                Err(_) => break,
            },
        };
        let delivery = tokio::select! {
            () = stopping.cancelled() => break,
            d = consumer.next() => match d {
                Some(d) => d,
                None => break,
            },
        };
        let worker = worker.clone();
        running.spawn(async move {
            let _slot = slot;
            // Counted down even when the task is aborted at shutdown.
            let _in_flight = InFlight::enter(&worker.metrics.in_flight);
            worker.handle(delivery).await;
        });
    }
    // The consumer stays open until the builds in hand are settled: dropping it closes
    // the channel, and the broker would hand their messages to another worker while they
    // are still rendering here (the same request passes the lease's claim: a second
    // render). Deliveries it holds that no build took wait until then, and go back to
    // the queue when it is dropped.
    let longest = worker
        .config
        .load()
        .fragments
        .iter()
        .map(|r| r.build_timeout)
        .max()
        .unwrap_or_default();
    let drain = longest + Duration::from_secs(5);
    tracing::info!(
        in_flight = running.len(),
        "worker stopping; finishing in-flight builds"
    );
    if tokio::time::timeout(drain, async {
        while running.join_next().await.is_some() {}
    })
    .await
    .is_err()
    {
        tracing::warn!(
            left = running.len(),
            "builds still running after {drain:?}; releasing them to other workers"
        );
        // Dropping their deliveries requeues them (the bus contract).
        running.abort_all();
        while running.join_next().await.is_some() {}
    }
    drop(consumer);
}

struct Worker {
    backends: Backends,
    config: Arc<LiveConfig>,
    builder: Arc<dyn FragmentBuilder>,
    metrics: WorkerMetrics,
    limits: Limits,
    /// Fired when the worker stops: builds waiting for a route's limits give up.
    stopping: CancellationToken,
}

/// Holds one unit of a gauge while alive.
struct InFlight<'a>(&'a Gauge);

impl<'a> InFlight<'a> {
    fn enter(gauge: &'a Gauge) -> Self {
        gauge.inc();
        Self(gauge)
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// The `reason` label and log field of a claim that drops its request.
fn drop_reason(claim: Claim) -> &'static str {
    match claim {
        Claim::Purged => "purged",
        Claim::Superseded => "superseded",
        Claim::AlreadyBuilt => "already_built",
        Claim::Held => "held",
    }
}

/// How a build attempt ended, before the message is settled.
enum Outcome {
    /// Stored, after this long.
    Stored(Duration),
    Retry(BuildError),
    Fail(BuildError),
    /// Not built: the worker stopped while it waited for the route's limits. The
    /// delivery goes back to the queue.
    Release,
}

impl Worker {
    /// A request for a route the configuration lacks: acknowledged and counted when a
    /// reload removed the route, dead-lettered otherwise (a file that differs between
    /// processes).
    async fn unrouted(&self, delivery: Delivery, route: &str) {
        if self.config.retired(route) {
            tracing::info!(route, "build request for a route a reload removed: dropped");
            self.metrics.dropped(route, "route_removed");
            return self.settle(delivery.ack().await);
        }
        let reason = format!("unknown route {route:?}");
        self.reject(delivery, "", &reason).await;
    }

    async fn handle(&self, delivery: Delivery) {
        let mut req = match BuildRequest::decode(&delivery.body) {
            Ok(r) => r,
            Err(e) => {
                return self
                    .reject(delivery, "", &format!("undecodable build request: {e}"))
                    .await;
            }
        };
        let config = self.config.load();
        let Some(route) = config.route(&req.identity.route) else {
            return self.unrouted(delivery, &req.identity.route).await;
        };
        if let Err(e) = req.identity.check(route) {
            return self
                .reject(
                    delivery,
                    &route.name,
                    &format!("request does not fit route {:?}: {e}", route.name),
                )
                .await;
        }
        req.identity.canonicalize(route);
        if req.generation == 0 {
            // Generation 0 asks for "the current one" (other programs warming the cache
            // need not read generations); the key is then derived, not given.
            let key = self.backends.keys.generation(&route.name);
            match store::generation(self.backends.store.as_ref(), &key).await {
                Ok(current) => req.generation = current,
                Err(e) => {
                    self.metrics.store_errors.inc();
                    tessera_runtime::warn_throttled!("store", error = %e, "store unavailable; requeueing");
                    tokio::time::sleep(REQUEUE_PAUSE).await;
                    return self.settle(delivery.requeue().await);
                }
            }
            if !req.key.is_empty() {
                return self
                    .reject(
                        delivery,
                        &route.name,
                        "a request for generation 0 must leave `key` empty",
                    )
                    .await;
            }
        }
        let keys = self.backends.keys.fragment(&req.identity, req.generation);
        if !req.key.is_empty() && req.key != keys.envelope.as_str() {
            return self
                .reject(
                    delivery,
                    &route.name,
                    "key does not match the request's route, params and generation",
                )
                .await;
        }
        let span = tracing::info_span!(
            "build",
            route = %route.name,
            key = %keys.envelope,
            request = %req.id,
            trace_id = %req.trace_id,
            attempt = req.attempt,
        );
        let process = self.process_span(route, &req);
        let work = async {
            match self.attempt(route, &req, &keys).await {
                None => self.settle(delivery.ack().await),
                Some(Outcome::Stored(took)) => {
                    tracing::info!("built");
                    self.metrics.stored(&route.name, took);
                    self.settle(delivery.ack().await);
                }
                Some(Outcome::Retry(e)) => self.retry(delivery, route, &req, &keys, e).await,
                Some(Outcome::Fail(e)) => self.fail(delivery, route, &req, &keys, e).await,
                // Dropped undecided: requeued (the bus contract).
                Some(Outcome::Release) => drop(delivery),
            }
        }
        .instrument(span);
        otel::FutureExt::with_context(work, process.context()).await;
    }

    /// The messaging conventions' "process" span of `req`: a child of the gateway's
    /// "send" span that published it.
    fn process_span(&self, route: &FragmentRoute, req: &BuildRequest) -> otel::Span {
        if !otel::on() {
            return otel::Span::default();
        }
        otel::Span::start(
            format!("process {}", route.queue),
            otel::Kind::Consumer,
            &otel::from_traceparent(req.traceparent.as_deref()),
            || {
                vec![
                    otel::KeyValue::new("messaging.system", self.bus_system()),
                    otel::KeyValue::new("messaging.operation.type", "process"),
                    otel::KeyValue::new("messaging.destination.name", route.queue.clone()),
                    otel::KeyValue::new("messaging.message.id", req.id.clone()),
                    otel::KeyValue::new("tessera.attempt", i64::from(req.attempt)),
                ]
            },
        )
    }

    /// `messaging.system` of this worker's bus.
    fn bus_system(&self) -> &'static str {
        otel::bus_system(&self.config.load().backend)
    }

    /// One render-and-store; `None` when the request is obsolete: its route was purged
    /// since, or its lease says another request builds the fragment (see
    /// [`tessera_protocol::lease`]).
    async fn attempt(
        &self,
        route: &FragmentRoute,
        req: &BuildRequest,
        keys: &FragmentKeys,
    ) -> Option<Outcome> {
        // Before the claim: a request superseded while it waited is then dropped.
        let permit = match self.limits.admit(route, &self.stopping).await {
            Ok(permit) => permit,
            Err(Refused::Stopping) => return Some(Outcome::Release),
            Err(Refused::Store(e)) => return Some(self.store_failed(route, req, e)),
        };
        let store = self.backends.store.as_ref();
        match Lease::new(store, keys, route)
            .claim(&req.id, req.generation)
            .await
        {
            Ok(Claim::Held) => {}
            Ok(claim) => {
                let reason = drop_reason(claim);
                // At info, with when the gateway queued it: a build a client was promised
                // and that never came is traced to this line (the span names the key and
                // the request).
                tracing::info!(
                    reason,
                    generation = req.generation,
                    queued_ms_ago = now_ms().saturating_sub(req.requested_at),
                    "build request dropped"
                );
                self.metrics.dropped(&route.name, reason);
                return None;
            }
            Err(e) => return Some(self.store_failed(route, req, e)),
        }
        let started = Instant::now();
        // Taken before the render: a tag purged from this instant on retires the result.
        let render_started = now_ms();
        let rendered = self.render(route, req).await;
        // The render is over: its slot is free for the next one.
        drop(permit);
        let rendered = match rendered {
            Ok(r) => r,
            Err(e) => return Some(self.classify(route, req, e)),
        };
        let took = started.elapsed();
        Some(
            match self
                .store_ready(route, req, keys, rendered, render_started, took)
                .await
            {
                Ok(()) => Outcome::Stored(started.elapsed()),
                Err(e) => self.classify(route, req, e),
            },
        )
    }

    /// A store call before the render failed: counted, and retried like any outage.
    fn store_failed(&self, route: &FragmentRoute, req: &BuildRequest, e: StoreError) -> Outcome {
        self.metrics.store_errors.inc();
        self.classify(
            route,
            req,
            BuildError::Store(tessera_protocol::Cause::new(e)),
        )
    }

    fn classify(&self, route: &FragmentRoute, req: &BuildRequest, e: BuildError) -> Outcome {
        if e.is_retryable() && req.attempt < route.max_attempts {
            Outcome::Retry(e)
        } else {
            Outcome::Fail(e)
        }
    }

    /// Runs the builder in its own task, so a panic is caught and a builder that ignores
    /// its deadline is cut off.
    async fn render(
        &self,
        route: &FragmentRoute,
        req: &BuildRequest,
    ) -> Result<Rendered, BuildError> {
        let (builder, r, q) = (self.builder.clone(), route.clone(), req.clone());
        let span = otel::Span::child(format!("render {}", route.name), otel::Kind::Client, || {
            vec![otel::KeyValue::new("tessera.route", route.name.clone())]
        });
        let build = async move { builder.build(&r, &q).await };
        let task = tokio::spawn(otel::FutureExt::with_context(build, span.context()));
        let abort = task.abort_handle();
        match tokio::time::timeout(route.build_timeout + RENDER_MARGIN, task).await {
            Ok(Ok(result)) => {
                if let Err(e) = &result {
                    span.fail(e);
                }
                result
            }
            Ok(Err(join)) if join.is_panic() => Err(BuildError::Panicked),
            Ok(Err(join)) => Err(BuildError::Connect(tessera_protocol::Cause::context(
                "build task ended",
                join,
            ))),
            Err(_) => {
                abort.abort();
                Err(BuildError::Timeout(route.build_timeout))
            }
        }
    }

    /// Steps 1–3 of the contract: store, release the lease, announce.
    async fn store_ready(
        &self,
        route: &FragmentRoute,
        req: &BuildRequest,
        keys: &FragmentKeys,
        rendered: Rendered,
        render_started: u64,
        took: Duration,
    ) -> Result<(), BuildError> {
        // Builders other than the HTTP one are held to the same limits.
        tessera_protocol::tags::check(&rendered.tags)?;
        let build_ms = u64::try_from(took.as_millis()).unwrap_or(u64::MAX);
        let envelope = Envelope::ready(
            rendered.body,
            rendered.content_type,
            route.fresh,
            route.stale,
            u32::try_from(build_ms).unwrap_or(u32::MAX),
            req.attempt,
        )
        .with_esi(rendered.esi)
        .with_tags(rendered.tags, render_started);
        let bytes = envelope.encode();
        let max = tessera_protocol::backends::item_limit(&self.config.load());
        let size = bytes.len() + keys.envelope.as_str().len() + ITEM_OVERHEAD;
        if size > max {
            return Err(BuildError::TooLarge { size, max });
        }
        self.finish(route, keys, &bytes, envelope.store_ttl(now_ms()))
            .await
            .map_err(|e| match e {
                StoreError::TooLarge { size, max } => BuildError::TooLarge { size, max },
                other => {
                    self.metrics.store_errors.inc();
                    BuildError::Store(tessera_protocol::Cause::new(other))
                }
            })?;
        self.announce(Event::Built {
            key: keys.envelope.to_string(),
            etag: envelope.etag.clone(),
            build_ms: Some(build_ms),
        });
        Ok(())
    }

    /// Stores an envelope (encoded: `bytes`) for `ttl` and gives the lease back, in that
    /// order (one exchange on memcached). Fails when the envelope could not be stored; a
    /// lease that could not be given back expires by itself, and a new request waits for
    /// that at worst.
    async fn finish(
        &self,
        route: &FragmentRoute,
        keys: &FragmentKeys,
        bytes: &[u8],
        ttl: Duration,
    ) -> Result<(), StoreError> {
        let lease = Lease::new(self.backends.store.as_ref(), keys, route);
        let span = otel::Span::child("store", otel::Kind::Client, || {
            vec![
                otel::KeyValue::new(
                    "db.system.name",
                    otel::store_system(&self.config.load().backend),
                ),
                otel::KeyValue::new("db.operation.name", "set"),
                otel::KeyValue::new("tessera.bytes", bytes.len() as i64),
            ]
        });
        let released = lease
            .finish(bytes, ttl)
            .await
            .inspect_err(|e| span.fail(e))?;
        drop(span);
        if let Err(e) = released {
            self.metrics.store_errors.inc();
            tessera_runtime::warn_throttled!("store", error = %e, "could not release the lease");
        }
        Ok(())
    }

    /// Publishes `event` without waiting for the broker's confirm: the delivery is
    /// settled meanwhile. An event is advice; a gateway that misses one still sees the
    /// result once its L1 entry expires (`cache.ttl`).
    fn announce(&self, event: Event) {
        let (bus, metrics) = (self.backends.bus.clone(), self.metrics.clone());
        let span = otel::Span::child("publish built", otel::Kind::Producer, || {
            vec![
                otel::KeyValue::new("messaging.system", self.bus_system()),
                otel::KeyValue::new("messaging.operation.type", "send"),
                otel::KeyValue::new("messaging.destination.name", "events"),
            ]
        });
        tokio::spawn(async move {
            let published = bus.publish_event(&event).await;
            drop(span);
            if let Err(e) = published {
                metrics.bus_errors.inc();
                tessera_runtime::warn_throttled!("bus", error = %e, "could not announce a build's outcome");
            }
        });
    }

    /// Schedules the next attempt through the broker's retry queue, then acknowledges.
    async fn retry(
        &self,
        delivery: Delivery,
        route: &FragmentRoute,
        req: &BuildRequest,
        keys: &FragmentKeys,
        error: BuildError,
    ) {
        let delay = backoff(req.attempt, &mut rand::rng());
        let mut next = req.clone();
        next.attempt += 1;
        // Hold the lease through the wait, so no gateway queues a second build meanwhile.
        let lease = Lease::new(self.backends.store.as_ref(), keys, route);
        next.lease_deadline = lease.deadline_after(delay);
        if let Err(e) = lease.extend(&req.id, delay).await {
            self.metrics.store_errors.inc();
            tessera_runtime::warn_throttled!("store", error = %e, "could not extend the lease");
        }
        tracing::info!(%error, ?delay, "build failed; retrying");
        match self
            .backends
            .bus
            .publish_retry(&route.queue, &next, delay)
            .await
        {
            Ok(()) => {
                WorkerMetrics::count(&self.metrics.retried, &route.name);
                self.settle(delivery.ack().await);
            }
            Err(e) => {
                self.metrics.bus_errors.inc();
                tessera_runtime::warn_throttled!("bus", error = %e, "could not schedule the retry; requeueing");
                tokio::time::sleep(REQUEUE_PAUSE).await;
                self.settle(delivery.requeue().await);
            }
        }
    }

    /// Stores a `failed` envelope, releases the lease, announces, settles.
    async fn fail(
        &self,
        delivery: Delivery,
        route: &FragmentRoute,
        req: &BuildRequest,
        keys: &FragmentKeys,
        error: BuildError,
    ) {
        let store = &self.backends.store;
        let previous = match store.get(&keys.envelope).await {
            Ok(bytes) => bytes.and_then(|b| Envelope::decode(&b).ok()),
            Err(_) => None,
        };
        // A copy a tag purge retired must not be served, so it is not kept for
        // stale-if-error (when the tags cannot be read, it is dropped to be safe): the
        // failure then stands for `failed_ttl` instead of every request asking again.
        let previous = match previous {
            Some(p) => {
                match tessera_protocol::tags::retired(store.as_ref(), &self.backends.keys, &p).await
                {
                    Ok(false) => Some(p),
                    Ok(true) | Err(_) => None,
                }
            }
            None => None,
        };
        let envelope = Envelope::failed(
            error.to_string(),
            route.failed_ttl,
            req.attempt,
            previous.as_ref(),
        );
        let stored = self
            .finish(
                route,
                keys,
                &envelope.encode(),
                envelope.store_ttl(now_ms()),
            )
            .await;
        if let Err(e) = stored {
            // Nowhere to record the failure: keep the request rather than lose it.
            self.metrics.store_errors.inc();
            tessera_runtime::warn_throttled!("store", %error, store_error = %e, "build failed and the store is unavailable; requeueing");
            tokio::time::sleep(REQUEUE_PAUSE).await;
            self.settle(delivery.requeue().await);
            return;
        }
        WorkerMetrics::count(&self.metrics.failed, &route.name);
        self.announce(Event::Failed {
            key: keys.envelope.to_string(),
            error: tessera_protocol::message::error_text(&error.to_string()),
        });
        if error.is_retryable() {
            tracing::warn!(%error, attempts = req.attempt, "build failed for good; dead-lettered");
            WorkerMetrics::count(&self.metrics.dead_lettered, &route.name);
            self.settle(
                delivery
                    .dead_letter(&format!("{error} (after {} attempts)", req.attempt))
                    .await,
            );
        } else {
            tracing::warn!(%error, "build failed; not retried");
            self.settle(delivery.ack().await);
        }
    }

    /// Dead-letters a request that cannot be built as it is (`route` is `""` when the
    /// request names no configured route).
    async fn reject(&self, delivery: Delivery, route: &str, reason: &str) {
        tracing::warn!(queue = %delivery.queue, reason, "build request dead-lettered");
        WorkerMetrics::count(&self.metrics.dead_lettered, route);
        self.settle(delivery.dead_letter(reason).await);
    }

    /// A settle that fails (the channel died) needs no action: the broker redelivers the
    /// message to another consumer.
    fn settle(&self, result: Result<(), BusError>) {
        if let Err(e) = result {
            self.metrics.bus_errors.inc();
            tessera_runtime::warn_throttled!("bus", error = %e, "could not settle a delivery; the broker will redeliver it");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_limited_route_has_a_consumer_of_its_own() {
        let config = Config::from_toml(
            "[[fragment]]\nname = \"a\"\nrender = \"/a\"\n\
             [[fragment]]\nname = \"slow\"\nrender = \"/s\"\nmax_renders = 3\n\
             [[fragment]]\nname = \"paced\"\nrender = \"/p\"\nrenders_per_second = 50\n\
             [[fragment]]\nname = \"wide\"\nrender = \"/w\"\nmax_renders = 100\n\
             [[fragment]]\nname = \"b\"\nrender = \"/b\"\nqueue = \"tessera.other\"\n",
        )
        .unwrap();
        let lane = |queue: &str, builds| Lane {
            queues: vec![queue.to_string()],
            background: vec![format!("{queue}.background")],
            builds,
        };
        assert_eq!(
            lanes(&config, 16),
            vec![
                Lane {
                    queues: vec!["tessera.build".into(), "tessera.other".into()],
                    background: vec![
                        "tessera.build.background".into(),
                        "tessera.other.background".into()
                    ],
                    builds: 16,
                },
                lane("tessera.build.slow", 3),
                lane("tessera.build.paced", 16),
                lane("tessera.build.wide", 16),
            ]
        );
        let only_limited =
            Config::from_toml("[[fragment]]\nname = \"s\"\nrender = \"/s\"\nmax_renders = 2\n")
                .unwrap();
        assert_eq!(lanes(&only_limited, 4), vec![lane("tessera.build.s", 2)]);
    }
}
