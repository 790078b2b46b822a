//! Render limits over the whole deployment: a route's `max_renders` (renders at once) and
//! `renders_per_second` (renders started per second), held by every worker process and
//! every gateway's embedded workers together.
//!
//! The state lives in the store, so one code path serves memcached (distributed mode)
//! and the memory twin (embedded mode):
//!
//! - **Slots.** A route with `max_renders = N` has N slot keys,
//!   `{ns}:c:{route}:{0..N}`. A build takes one with `add` (atomic: of concurrent takers
//!   of a free slot exactly one wins), renders, and deletes it. Waiting builds read all N
//!   in one `get_many` and try the free ones. A slot expires `build_timeout` + 3 s after
//!   it was taken (the render is cut at `build_timeout` + 1 s), so a worker killed while
//!   holding one frees it within that time, with no one's help.
//! - **Rate.** A route with `renders_per_second = R` counts the renders started in each
//!   second (Unix seconds of the worker's clock) with `incr` on `{ns}:w:{route}:{second}`,
//!   made by `add` when absent and expiring after 5 s. The first R of a second render;
//!   the others wait for the next second. Fixed windows: any span of *t* seconds sees at
//!   most R × (*t* + 1) renders (more if the workers' clocks disagree by more than the
//!   span's slack).
//! - **Order.** A slot first, then the second's token, then the render at once: a token
//!   taken while waiting for a slot could be spent seconds later, beside tokens of that
//!   later second. A slot held while waiting for a token has its expiry renewed after
//!   each second waited.
//! - **Waiting.** Without a free slot a build polls again after 5 ms, doubling up to
//!   100 ms (with jitter), and at once when this process frees a slot of its own; so an
//!   idle waiter costs the store at most ten small reads a second. A worker consumes a
//!   limited route's queue in a loop of its own (see [`crate::worker`]), so its waiting
//!   builds hold no slot of the worker's `concurrency` and no delivery of another route.
//!
//! With several memcached servers, each slot key lives on one; while processes disagree
//! about which servers are up, a slot may be taken twice (the limit then holds again
//! once they agree, within `store.probe_interval`).

use std::pin::pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use prometheus_client::metrics::gauge::Gauge;
use rand::Rng;
use rand::seq::SliceRandom;
use tessera_protocol::time::now_ms;
use tessera_protocol::{
    Backends, FragmentRoute, Keyspace, StoreError, StoreKey, store::SharedStore,
};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::metrics::{RouteLabels, WorkerMetrics};

/// A slot outlives the longest render that can hold it: `build_timeout`, the worker's
/// 1 s margin before it cuts a builder off, and 2 s for the store calls around it.
pub const SLOT_SLACK: Duration = Duration::from_secs(3);
/// How long a second's count of renders is kept: long past its second, so that a worker
/// whose clock runs a little behind still finds it.
const WINDOW_TTL: Duration = Duration::from_secs(5);
/// First pause of a build waiting for a slot.
const FIRST_POLL: Duration = Duration::from_millis(5);
/// Longest pause of a build waiting for a slot.
const LAST_POLL: Duration = Duration::from_millis(100);

/// Why a build was not admitted.
#[derive(Debug, thiserror::Error)]
pub enum Refused {
    /// The worker is stopping: the build goes back to the queue.
    #[error("the worker is stopping")]
    Stopping,
    /// The store failed: the build is retried as in any store outage.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// The render limits of every route, as one process holds them. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Limits {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    store: SharedStore,
    keys: Keyspace,
    metrics: WorkerMetrics,
    /// Woken whenever this process frees a slot, so that its own waiters try at once.
    freed: Notify,
}

/// Leave to render one build; a slot it holds is freed when it is dropped (a task
/// aborted frees it too; a process killed leaves it to expire).
#[derive(Debug)]
pub struct Permit {
    held: Option<Held>,
}

#[derive(Debug)]
struct Held {
    limits: Limits,
    route: String,
    max_renders: u32,
    slot: StoreKey,
}

impl Limits {
    /// The limits kept in `backends`' store; waits and renders in flight are counted in
    /// `metrics`.
    pub fn new(backends: &Backends, metrics: WorkerMetrics) -> Limits {
        Limits {
            inner: Arc::new(Inner {
                store: backends.store.clone(),
                keys: backends.keys.clone(),
                metrics,
                freed: Notify::new(),
            }),
        }
    }

    /// Waits until a build of `route` may render: a free render slot, then a token of
    /// the current second (each when the route is limited so; at once otherwise). Ends
    /// early when `stopping` fires.
    pub async fn admit(
        &self,
        route: &FragmentRoute,
        stopping: &CancellationToken,
    ) -> Result<Permit, Refused> {
        if !route.limited() {
            return Ok(Permit { held: None });
        }
        let labels = RouteLabels {
            route: route.name.clone(),
        };
        let waiting = self
            .inner
            .metrics
            .limit_waiting
            .get_or_create(&labels)
            .clone();
        let _waiting = Counted::enter(waiting);
        let started = Instant::now();
        let permit = self.slot(route, stopping).await?;
        if route.renders_per_second > 0 {
            let slot = permit.held.as_ref().map(|h| &h.slot);
            self.token(route, slot, stopping).await?;
        }
        self.inner
            .metrics
            .limit_wait
            .get_or_create(&labels)
            .observe(started.elapsed().as_secs_f64());
        Ok(permit)
    }

    /// Takes a render slot of `route`, waiting for one to free; a permit holding none
    /// when the route has no `max_renders`.
    async fn slot(
        &self,
        route: &FragmentRoute,
        stopping: &CancellationToken,
    ) -> Result<Permit, Refused> {
        if route.max_renders == 0 {
            return Ok(Permit { held: None });
        }
        let mut pause = FIRST_POLL;
        loop {
            // Listening before looking: a slot this process frees meanwhile wakes it.
            let mut freed = pin!(self.inner.freed.notified());
            freed.as_mut().enable();
            if let Some(slot) = self.try_slot(route).await? {
                return Ok(Permit {
                    held: Some(Held {
                        limits: self.clone(),
                        route: route.name.clone(),
                        max_renders: route.max_renders,
                        slot,
                    }),
                });
            }
            let jitter = rand::rng().random_range(Duration::ZERO..=pause / 2);
            tokio::select! {
                () = stopping.cancelled() => return Err(Refused::Stopping),
                () = freed => {}
                () = tokio::time::sleep(pause + jitter) => {}
            }
            pause = (pause * 2).min(LAST_POLL);
        }
    }

    /// One look at `route`'s slots: takes a free one if it can.
    async fn try_slot(&self, route: &FragmentRoute) -> Result<Option<StoreKey>, StoreError> {
        let keys = self.slot_keys(&route.name, route.max_renders);
        let held = self.inner.store.get_many(&keys).await?;
        let mut free: Vec<StoreKey> = keys.into_iter().filter(|k| !held.contains_key(k)).collect();
        // In a random order, so that waiters of several processes rarely race for one.
        free.shuffle(&mut rand::rng());
        let ttl = route.build_timeout.saturating_add(SLOT_SLACK);
        for slot in free {
            if self.inner.store.add(&slot, b"1", ttl).await? {
                self.in_flight(&route.name).set(gauge_value(held.len() + 1));
                return Ok(Some(slot));
            }
        }
        self.in_flight(&route.name).set(gauge_value(held.len()));
        Ok(None)
    }

    /// Takes a token of the current second for `route`, waiting for the next second while
    /// this one's are spent. The `slot` held meanwhile has its expiry renewed after each
    /// wait: it counts from the render's start, not from the wait's.
    async fn token(
        &self,
        route: &FragmentRoute,
        slot: Option<&StoreKey>,
        stopping: &CancellationToken,
    ) -> Result<(), Refused> {
        loop {
            let now = now_ms();
            let key = self.inner.keys.render_window(&route.name, now / 1000);
            if self.count(&key).await? <= u64::from(route.renders_per_second) {
                return Ok(());
            }
            // To the next second, spread a little so that waiters do not all ask at once.
            let next = Duration::from_millis(1000 - now % 1000 + rand::rng().random_range(0..20));
            tokio::select! {
                () = stopping.cancelled() => return Err(Refused::Stopping),
                () = tokio::time::sleep(next) => {}
            }
            if let Some(slot) = slot {
                let ttl = route.build_timeout.saturating_add(SLOT_SLACK);
                self.inner.store.set(slot, b"1", ttl).await?;
            }
        }
    }

    /// Counts one more render in the window `key`, making it when absent.
    async fn count(&self, key: &StoreKey) -> Result<u64, StoreError> {
        let store = &self.inner.store;
        if let Some(n) = store.incr(key, 1).await? {
            return Ok(n);
        }
        if store.add(key, b"1", WINDOW_TTL).await? {
            return Ok(1);
        }
        // Made by another worker meanwhile; gone again only if evicted at once, which is
        // read as "spent" (the next second starts afresh).
        Ok(store.incr(key, 1).await?.unwrap_or(u64::MAX))
    }

    fn slot_keys(&self, route: &str, max_renders: u32) -> Vec<StoreKey> {
        (0..max_renders)
            .map(|i| self.inner.keys.render_slot(route, i))
            .collect()
    }

    fn in_flight(&self, route: &str) -> Gauge {
        self.inner
            .metrics
            .limited_renders
            .get_or_create(&RouteLabels {
                route: route.to_string(),
            })
            .clone()
    }
}

impl Held {
    /// Frees the slot, wakes this process's waiters, and counts the slots still held.
    async fn release(self) {
        let inner = &self.limits.inner;
        if let Err(e) = inner.store.delete(&self.slot).await {
            inner.metrics.store_errors.inc();
            tessera_runtime::warn_throttled!("store", error = %e, "could not free a render slot; it expires by itself");
        }
        inner.freed.notify_waiters();
        let keys = self.limits.slot_keys(&self.route, self.max_renders);
        if let Ok(held) = inner.store.get_many(&keys).await {
            self.limits
                .in_flight(&self.route)
                .set(gauge_value(held.len()));
        }
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        let Some(held) = self.held.take() else {
            return;
        };
        // Without a runtime (the process is ending) the slot expires by itself.
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(held.release());
        }
    }
}

/// Holds one unit of a gauge while alive.
#[derive(Debug)]
struct Counted(Gauge);

impl Counted {
    fn enter(gauge: Gauge) -> Self {
        gauge.inc();
        Self(gauge)
    }
}

impl Drop for Counted {
    fn drop(&mut self) {
        self.0.dec();
    }
}

fn gauge_value(n: usize) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}
