//! The cache core: what is known about a fragment, and the one build it may call for.
//! It knows nothing of HTTP; the front ([`crate::http`]) turns what it finds into answers.
//!
//! A lookup goes L1, then the store; a missing fragment has its build requested through
//! the [`Lease`], so of all callers in all gateways exactly one queues it. Inside one
//! gateway, L1 coalesces identical concurrent misses into one store lookup first.
//!
//! Every envelope found (in L1 or the store) that carries tags is checked against the tag
//! purges ([`tessera_protocol::tags`]) before it is judged: against what L1 knows
//! ([`tags`]) when it read the tags within `cache.ttl`, otherwise by reading the
//! tags' keys in one `get_many`. An envelope a purge retired is dropped from L1 and
//! treated as missing: its rebuild is requested as for a cold miss, and nothing of it is
//! served, not even stale.
//!
//! # Layout
//! - this file: [`CacheService`], the one entry point: lookups ([`CacheService::lookup`],
//!   [`CacheService::lookup_many`]), build requests, purges, and what the admin listener
//!   reads; [`Fragment`], [`Found`] and [`CacheError`].
//! - [`l1`]: L1, the in-process cache, with coalescing and an invalidation log.
//! - [`hot`]: the last fresh answer per request target, for the hit path.
//! - [`tags`]: what this gateway knows of tag purges, for the hit path.
//! - [`events`]: follows built/failed/purged events from every worker and gateway.
//! - [`acks`]: heartbeats, and who acknowledged a purge.
//! - [`waiters`]: long-poll wake-ups for `Prefer: wait`.

pub(crate) mod acks;
pub(crate) mod events;
pub(crate) mod hot;
pub(crate) mod l1;
pub(crate) mod tags;
pub(crate) mod waiters;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::future::join_all;
use tessera_protocol::config::background_queue;
use tessera_protocol::envelope::Freshness;
use tessera_protocol::message::VERSION;
use tessera_protocol::tags::{self as tag_keys, Tag, Verdict};
use tessera_protocol::time::{now_ms, remaining};
use tessera_protocol::{
    Backends, BuildRequest, BusError, Config, Envelope, Event, FragmentKeys, FragmentRoute,
    Identity, Lease, Purge, StoreError, StoreKey, store,
};
use tessera_runtime::otel::{self, KeyValue};
use tessera_runtime::reload::LiveConfig;

use crate::metrics::{CacheStatus, Metrics};
use acks::Acks;
use events::{Failure, Failures};
use hot::{Hot, HotAnswers, LastHeaders};
use l1::{Entry, L1, Loaded, Read, Slot, SlotState};
use waiters::{Waiter, Waiters};

/// Why the cache could not answer: a backend failed.
#[derive(Debug, Clone, thiserror::Error)]
pub(crate) enum CacheError {
    /// The shared store could not be reached.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The broker could not take a build request.
    #[error(transparent)]
    Bus(#[from] BusError),
}

/// The trace a lookup belongs to. Its id goes with the builds the lookup requests, and is
/// worked out only then: a hit never pays for it.
pub(crate) trait TraceId: Sync + std::fmt::Debug {
    /// The id (W3C trace id, or a request id).
    fn trace_id(&self) -> &str;
}

/// An id known already (work carried on after its request ended).
impl TraceId for String {
    fn trace_id(&self) -> &str {
        self
    }
}

/// One fragment as a request names it: its route, identity, generation and keys, and the
/// trace of the request that asked.
#[derive(Debug, Clone)]
pub(crate) struct Fragment<'c> {
    /// The configured route.
    pub route: &'c FragmentRoute,
    /// Who and what the fragment is for.
    pub identity: Identity,
    /// The route's generation when the request was made.
    pub generation: u64,
    /// Where the fragment lives in that generation.
    pub keys: FragmentKeys,
    /// The route's last soft purge (Unix ms; 0 for none), read with its generation:
    /// what rendered before it is stale.
    pub soft_at: u64,
    /// When that generation was read from the store.
    pub generation_read_at: Instant,
    /// The request's trace, passed on to the build.
    pub trace: &'c dyn TraceId,
}

/// What a lookup found, as far as the answer is concerned.
#[derive(Debug)]
pub(crate) enum Found {
    /// Serve this envelope's body; `stale` when past fresh (rebuild already requested).
    Serve {
        /// The envelope, with what serving it needs.
        slot: Arc<Slot>,
        /// Past its fresh time, or served because the store could not answer.
        stale: bool,
        /// The store could not answer: this is L1's last copy (stale-if-error).
        fallback: bool,
        /// Fresh, but a soft purge made it stale: served while its one rebuild runs.
        soft_purged: bool,
    },
    /// A build is queued or running.
    Pending,
    /// The last build failed and nothing can be served.
    Failed {
        /// The worker's error.
        error: String,
        /// Until the next build may be tried.
        retry_after: Duration,
    },
}

/// How what a lookup found counts, at the endpoint or as an ESI include (before any
/// waiting, see [`CacheStatus::after_waiting`]).
impl From<&Found> for CacheStatus {
    fn from(found: &Found) -> Self {
        match found {
            Found::Serve { stale: true, .. } => CacheStatus::stale,
            Found::Serve { stale: false, .. } => CacheStatus::hit,
            Found::Pending => CacheStatus::pending,
            Found::Failed { .. } => CacheStatus::error,
        }
    }
}

/// Whether a hit with `left` of freshness starts the early rebuild of a route with
/// `refresh_ahead` (probabilistic early expiration, as in XFetch): never before the
/// stretch, then with probability e^(-4·left/refresh_ahead): 2 % as it opens, 14 %
/// halfway, certain at the end. Many hits start it early; a lone hit may not, and the
/// fragment is then refreshed stale-while-revalidate as without the setting.
fn refresh_early(left: std::time::Duration, refresh_ahead: std::time::Duration) -> bool {
    if refresh_ahead.is_zero() || left >= refresh_ahead {
        return false;
    }
    let p = (-4.0 * left.as_secs_f64() / refresh_ahead.as_secs_f64()).exp();
    rand::random::<f64>() < p
}

/// Whether someone waits for a build: waited builds go ahead of background ones (see
/// [`tessera_protocol::bus::Turns`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Priority {
    /// A placeholder was answered, a long-poll or page waits: the route's queue.
    Waited,
    /// A stale copy was served: a refresh on the route's background queue.
    Background,
}

/// What a purge of tags retires.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum TagPurge {
    /// Every fragment carrying any of the tags.
    Each,
    /// Every fragment carrying all of the tags.
    AllOf,
    /// Every fragment carrying any of the tags is made stale: served while one rebuild
    /// runs.
    Soft,
}

/// The outcome of asking for a build.
#[derive(Debug)]
pub(crate) enum Requested {
    /// We won the lease and queued the build.
    Queued,
    /// Someone else holds the lease: a build is already queued or running.
    AlreadyPending,
    /// A build finished just before we asked: here is its result, nothing was queued.
    JustBuilt(Envelope),
}

/// L1 in front of the store, the build requests its misses call for, and what this
/// gateway keeps beside it (hot answers, long-poll waiters, recent failures).
#[derive(Debug)]
pub(crate) struct CacheService {
    /// Read only for what outlives a request (events); a request brings its own snapshot.
    config: Arc<LiveConfig>,
    backends: Backends,
    l1: L1,
    hot: HotAnswers,
    waiters: Waiters,
    failures: Failures,
    /// Heartbeats heard, and the purges whose acknowledgements someone waits for.
    pub(crate) acks: Acks,
    metrics: Arc<Metrics>,
}

impl CacheService {
    /// The cache of a gateway running `config` on `backends`, counting in `metrics`.
    pub(crate) fn new(config: Arc<LiveConfig>, backends: Backends, metrics: Arc<Metrics>) -> Self {
        // `[cache]` changes only with a restart.
        let cache = config.load().cache.clone();
        Self {
            l1: L1::new(cache.capacity.as_u64(), cache.ttl),
            // A quarter of L1's budget: what hot answers may keep alive beyond it.
            hot: HotAnswers::new(cache.capacity.as_u64() / 4),
            waiters: Waiters::default(),
            failures: Failures::default(),
            acks: Acks::new(acks::gateway_id()),
            config,
            backends,
            metrics,
        }
    }

    /// The fragment `identity` of `route` names now: reads the route's generation (L1,
    /// then the store) and derives the keys.
    pub(crate) async fn fragment<'c>(
        &self,
        route: &'c FragmentRoute,
        identity: Identity,
        trace: &'c dyn TraceId,
    ) -> Result<Fragment<'c>, CacheError> {
        let (generation, soft_at, generation_read_at) = self
            .l1
            .generation(&route.name, || async {
                let store = self.backends.store.as_ref();
                let key = self.backends.keys.generation(&route.name);
                let soft_key = self.backends.keys.route_soft(&route.name);
                let soft = store::Register::of(store, &soft_key);
                let (generation, soft_at) =
                    tokio::join!(store::generation(store, &key), soft.read());
                Ok((generation?, soft_at?.unwrap_or(0)))
            })
            .await?;
        Ok(Fragment {
            keys: self.backends.keys.fragment(&identity, generation),
            route,
            identity,
            generation,
            soft_at,
            generation_read_at,
            trace,
        })
    }

    /// Looks a fragment up (L1, then the store), requesting a build when it is missing,
    /// stale or failed long enough ago.
    pub(crate) async fn lookup(self: &Arc<Self>, t: &Fragment<'_>) -> Result<Found, CacheError> {
        let read = self
            .l1
            .read(&t.keys.envelope, || async {
                let span = self.store_span("get", 1);
                let got = self.backends.store.get(&t.keys.envelope).await;
                span.set(|| KeyValue::new("tessera.found", matches!(got, Ok(Some(_)))));
                drop(span);
                if let Some(bytes) = got?
                    && let Some(envelope) = self.decode(&t.keys.envelope, &bytes)
                {
                    return Ok(SlotState::Found(envelope).into());
                }
                Ok(self
                    .request_build(t, Priority::Waited, 0)
                    .await?
                    .into_loaded())
            })
            .await?;
        match read {
            Read::Current(entry) => {
                let (entry, soft) = self.screen(t, entry).await?;
                Ok(self.judge(t, entry, soft))
            }
            Read::Fallback(slot) => {
                tracing::debug!(key = %t.keys.envelope, "store unavailable; serving L1's last copy");
                Ok(Found::Serve {
                    slot,
                    stale: true,
                    fallback: true,
                    soft_purged: false,
                })
            }
        }
    }

    /// `entry`, unless a tag purge retired its envelope: then the envelope is dropped from
    /// L1, its build requested as for a miss, and what that leaves (pending, or a build
    /// that just finished) cached and returned instead. Whether a soft purge made the
    /// envelope stale comes with it.
    async fn screen(&self, t: &Fragment<'_>, entry: Entry) -> Result<(Entry, bool), CacheError> {
        let Entry::Found(slot) = &entry else {
            return Ok((entry, false));
        };
        // A soft purge of the route makes stale what rendered before it.
        let route_soft = slot.envelope.retired_at(t.soft_at);
        match self.verdict(&slot.envelope).await? {
            Verdict::Usable => return Ok((entry, route_soft)),
            Verdict::Stale => return Ok((entry, true)),
            Verdict::Retired => {}
        }
        self.metrics.tag_retired.inc();
        tracing::debug!(key = %t.keys.envelope, "retired by a tag purge; rebuilding");
        self.l1.invalidate_key(&t.keys.envelope).await;
        // After the invalidation, so what is cached now counts as loaded after it.
        let started = Instant::now();
        let loaded = self
            .request_build(t, Priority::Waited, 0)
            .await?
            .into_loaded();
        Ok((
            self.l1.insert(&t.keys.envelope, loaded, started).await,
            false,
        ))
    }

    /// What the purges of its tags make of `envelope`: its tags are looked up in L1's tag
    /// table, and those it does not know (within `cache.ttl`) read from the store at once.
    /// When the store cannot answer, what L1 last knew of every tag decides; a tag it
    /// never knew makes it a store error.
    async fn verdict(&self, envelope: &Envelope) -> Result<Verdict, CacheError> {
        if envelope.tags.is_empty() {
            return Ok(Verdict::Usable);
        }
        let known = &self.l1.tags;
        let now = Instant::now();
        let mut unknown: Vec<&str> = Vec::new();
        let mut worst = Verdict::Usable;
        for tag in &envelope.tags {
            match known.current(tag, now) {
                Some(purges) => worst = worst.max(purges.verdict(envelope)),
                None => unknown.push(tag),
            }
        }
        if unknown.is_empty() || worst == Verdict::Retired {
            return Ok(worst);
        }
        let read = tag_keys::read(self.backends.store.as_ref(), &self.backends.keys, &unknown);
        match read.await {
            Ok(found) => {
                for (tag, purges) in &found {
                    known.learn(tag, purges, now);
                }
            }
            Err(e) if unknown.iter().all(|t| known.last_known(t).is_some()) => {
                tracing::debug!(error = %e, "store unavailable; tags checked against what L1 knew");
            }
            Err(e) => return Err(e.into()),
        }
        Ok(known.verdict_as_last_known(envelope))
    }

    /// Looks every target up at once: L1, then one multi-get for the rest, then one
    /// build request per miss. Fragments the store could not be asked about are left out.
    pub(crate) async fn lookup_many(
        self: &Arc<Self>,
        targets: &[&Fragment<'_>],
    ) -> HashMap<StoreKey, Found> {
        let mut entries: HashMap<StoreKey, Entry> = HashMap::new();
        let mut missing: Vec<&Fragment<'_>> = Vec::new();
        for t in targets {
            if entries.contains_key(&t.keys.envelope) || missing.iter().any(|m| m.keys == t.keys) {
                continue;
            }
            match self.l1.peek(&t.keys.envelope).await {
                Some(entry) => {
                    entries.insert(t.keys.envelope.clone(), entry);
                }
                None => missing.push(t),
            }
        }
        let mut kept: HashMap<StoreKey, Arc<Slot>> = HashMap::new();
        if !missing.is_empty() {
            match self.load_many(&missing).await {
                Ok(loaded) => entries.extend(loaded),
                Err(e) => {
                    tessera_runtime::warn_throttled!("store", error = %e, "store unavailable while composing; serving what L1 kept, placeholders for the rest");
                    for t in &missing {
                        if let Some(slot) = self.l1.kept(&t.keys.envelope).await {
                            kept.insert(t.keys.envelope.clone(), slot);
                        }
                    }
                }
            }
        }
        let mut found: HashMap<StoreKey, Found> = kept
            .into_iter()
            .map(|(key, slot)| {
                let serve = Found::Serve {
                    slot,
                    stale: true,
                    fallback: true,
                    soft_purged: false,
                };
                (key, serve)
            })
            .collect();
        for t in targets {
            if found.contains_key(&t.keys.envelope) {
                continue;
            }
            if let Some(entry) = entries.get(&t.keys.envelope) {
                match self.screen(t, entry.clone()).await {
                    Ok((entry, soft)) => {
                        found.insert(t.keys.envelope.clone(), self.judge(t, entry, soft));
                    }
                    Err(e) => {
                        tessera_runtime::warn_throttled!("store", route = %t.route.name, error = %e, "include left out: its tags could not be checked");
                    }
                }
            }
        }
        found
    }

    /// Reads `missing` from the store in one multi-get, requests builds of what is not
    /// there, and caches every answer in L1.
    async fn load_many(
        &self,
        missing: &[&Fragment<'_>],
    ) -> Result<Vec<(StoreKey, Entry)>, CacheError> {
        let started = Instant::now();
        let keys: Vec<StoreKey> = missing.iter().map(|t| t.keys.envelope.clone()).collect();
        let span = self.store_span("get_many", keys.len());
        let mut values = self.backends.store.get_many(&keys).await?;
        drop(span);
        let mut slots = Vec::with_capacity(missing.len());
        let mut absent = Vec::new();
        for t in missing {
            let key = &t.keys.envelope;
            match values.remove(key).and_then(|b| self.decode(key, &b)) {
                Some(e) => {
                    let entry = self.l1.insert(key, SlotState::Found(e), started).await;
                    slots.push((key.clone(), entry));
                }
                None => absent.push(*t),
            }
        }
        let requested = join_all(
            absent
                .iter()
                .map(|t| self.request_build(t, Priority::Waited, 0)),
        )
        .await;
        for (t, outcome) in absent.iter().zip(requested) {
            match outcome {
                Ok(requested) => {
                    let key = &t.keys.envelope;
                    let entry = self.l1.insert(key, requested.into_loaded(), started).await;
                    slots.push((key.clone(), entry));
                }
                Err(e) => {
                    tessera_runtime::warn_throttled!("build request", route = %t.route.name, error = %e, "include left pending: build not requested");
                }
            }
        }
        Ok(slots)
    }

    /// The envelope in `bytes`, or `None` (counted and logged: treated as a miss).
    fn decode(&self, key: &StoreKey, bytes: &bytes::Bytes) -> Option<Envelope> {
        match Envelope::decode(bytes) {
            Ok(envelope) => Some(envelope),
            Err(e) => {
                self.metrics.undecodable.inc();
                tracing::warn!(%key, error = %e, "undecodable envelope, treated as a miss");
                None
            }
        }
    }

    /// What to answer for a slot at this instant; requests the one rebuild a stale or
    /// expired-failure slot calls for (in the background: the answer never waits). A
    /// `soft`-purged envelope is stale, however fresh.
    fn judge(self: &Arc<Self>, t: &Fragment<'_>, entry: Entry, soft: bool) -> Found {
        let now = now_ms();
        let Entry::Found(slot) = entry else {
            return Found::Pending;
        };
        let envelope = &slot.envelope;
        let mut freshness = envelope.freshness(now);
        let soft_purged = soft && freshness == Freshness::Fresh;
        if soft_purged {
            freshness = Freshness::Stale;
        }
        let servable = envelope.servable(now);
        if freshness == Freshness::Fresh
            && refresh_early(remaining(now, envelope.fresh_until), t.route.refresh_ahead)
            && slot.claim_rebuild()
        {
            self.rebuild_in_background(t, Priority::Background, envelope.fresh_until);
        }
        if matches!(freshness, Freshness::Stale | Freshness::FailedExpired) && slot.claim_rebuild()
        {
            // Served stale meanwhile, nobody waits for it; past its stale window, the
            // caller gets a placeholder and waits.
            let priority = if servable {
                Priority::Background
            } else {
                Priority::Waited
            };
            self.rebuild_in_background(t, priority, envelope.fresh_until);
        }
        match freshness {
            Freshness::Fresh => Found::Serve {
                slot: slot.clone(),
                stale: false,
                fallback: false,
                soft_purged: false,
            },
            Freshness::Stale | Freshness::Failed | Freshness::FailedExpired if servable => {
                Found::Serve {
                    slot: slot.clone(),
                    stale: true,
                    fallback: false,
                    soft_purged,
                }
            }
            Freshness::Failed => Found::Failed {
                error: envelope.error.clone().unwrap_or_default(),
                retry_after: remaining(now, envelope.fresh_until),
            },
            Freshness::Stale | Freshness::FailedExpired => Found::Pending,
        }
    }

    /// Requests a rebuild of `t`, whose copy fresh until `replaces` (Unix ms) is served
    /// meanwhile, without waiting for it.
    fn rebuild_in_background(
        self: &Arc<Self>,
        t: &Fragment<'_>,
        priority: Priority,
        replaces: u64,
    ) {
        let this = self.clone();
        let (route, identity, generation, keys, generation_read_at) = (
            t.route.clone(),
            t.identity.clone(),
            t.generation,
            t.keys.clone(),
            t.generation_read_at,
        );
        let soft_at = t.soft_at;
        let trace = t.trace.trace_id().to_string();
        tokio::spawn(async move {
            let target = Fragment {
                route: &route,
                identity,
                generation,
                keys,
                soft_at,
                generation_read_at,
                trace: &trace,
            };
            if let Err(e) = this.request_build(&target, priority, replaces).await {
                tessera_runtime::warn_throttled!("build request", route = %route.name, error = %e, "could not request a rebuild");
            }
        });
    }

    /// Queues one build of `t` unless one is already queued anywhere: acquires the lease
    /// (atomic across gateways) and, if it won, publishes the request, on the route's
    /// queue or, for a build nobody waits for, its background queue. `replaces` is when
    /// the copy being rebuilt stops being fresh (Unix ms; 0 when there is none): a copy
    /// in the store fresher than both it and now was built meanwhile, and is not built
    /// again. When a request waits for the fragment, an event for it heard while the
    /// publish awaits its confirm answers `Queued` at once (the message reached a
    /// worker); the confirm is then awaited in the background, and a refusal gives the
    /// lease back as before.
    async fn request_build(
        &self,
        t: &Fragment<'_>,
        priority: Priority,
        replaces: u64,
    ) -> Result<Requested, CacheError> {
        let store = self.backends.store.as_ref();
        let lease = Lease::new(store, &t.keys, t.route);
        let metrics = self.metrics.route(&t.route.name);
        let id = format!("{:016x}", rand::random::<u64>());
        let span = otel::Span::child("lease", otel::Kind::Internal, || {
            vec![KeyValue::new("tessera.route", t.route.name.clone())]
        });
        let won = lease.acquire(&id).await?;
        span.set(|| KeyValue::new("tessera.lease.won", won.is_some()));
        drop(span);
        let Some(won) = won else {
            metrics.coalesced.inc();
            return Ok(Requested::AlreadyPending);
        };
        // Between our read and our acquire, a worker may have stored a result and
        // released its lease. Building again then would be a second build: the envelope
        // read just after the lease was taken says.
        let now = now_ms();
        if let Some(bytes) = won.envelope
            && let Ok(envelope) = Envelope::decode(&bytes)
            && now.max(replaces) < envelope.fresh_until
            && self.verdict(&envelope).await? == Verdict::Usable
        {
            lease.release().await?;
            return Ok(Requested::JustBuilt(envelope));
        }
        let queue = match priority {
            Priority::Waited => t.route.queue.clone(),
            Priority::Background => background_queue(&t.route.queue),
        };
        let span = otel::Span::child(format!("send {queue}"), otel::Kind::Producer, || {
            vec![
                KeyValue::new("messaging.system", self.bus_system()),
                KeyValue::new("messaging.operation.type", "send"),
                KeyValue::new("messaging.destination.name", queue.clone()),
                KeyValue::new("tessera.route", t.route.name.clone()),
            ]
        });
        let request = BuildRequest {
            v: VERSION,
            id,
            key: t.keys.envelope.as_str().to_string(),
            identity: t.identity.clone(),
            generation: t.generation,
            attempt: 1,
            requested_at: now,
            lease_deadline: won.deadline,
            trace_id: t.trace.trace_id().to_string(),
            traceparent: span.traceparent(),
        };
        span.set(|| KeyValue::new("messaging.message.id", request.id.clone()));
        let request_id = request.id.clone();
        let requested = self.send(t, queue, request, span, &lease).await?;
        tracing::debug!(route = %t.route.name, key = %t.keys.envelope, request = %request_id, ?priority, trace_id = %t.trace.trace_id(), "build queued");
        Ok(requested)
    }

    /// Publishes `request` on `queue` for `t`, whose `lease` this gateway holds; gives
    /// the lease back when the broker refuses it. See [`CacheService::request_build`]
    /// for a confirm that comes after the fragment's event.
    async fn send(
        &self,
        t: &Fragment<'_>,
        queue: String,
        request: BuildRequest,
        span: otel::Span,
        lease: &Lease<'_>,
    ) -> Result<Requested, CacheError> {
        let metrics = self.metrics.route(&t.route.name);
        // A persistent message is confirmed once a worker acknowledged it (or the broker
        // wrote it to disk): often after the worker's `built` event is here. When a
        // request waits for the fragment (`Prefer: wait`), an event for it heard while
        // the confirm is awaited says the message reached a worker; the build is then
        // answered as queued at once, and the confirm awaited beside it.
        let published = match self.waiters.join(t.keys.envelope.as_str()) {
            // Nobody waits: the confirm is awaited here, with nothing to box or clone.
            None => self.backends.bus.publish_build(&queue, &request).await,
            Some(mut heard) => {
                let bus = self.backends.bus.clone();
                let mut publish =
                    Box::pin(async move { bus.publish_build(&queue, &request).await });
                tokio::select! {
                    biased;
                    published = &mut publish => published,
                    () = heard.woken() => {
                        tracing::debug!(key = %t.keys.envelope, "fragment heard of before its build request's confirm");
                        let confirm = Confirm {
                            store: self.backends.store.clone(),
                            keys: t.keys.clone(),
                            route: t.route.clone(),
                            published: metrics.published.clone(),
                        };
                        tokio::spawn(confirm.settle(publish, span));
                        return Ok(Requested::Queued);
                    }
                }
            }
        };
        if let Err(e) = published {
            span.fail(&e);
            // Nothing was queued: give the lease back so the next request can try again
            // instead of waiting for it to expire.
            if let Err(se) = lease.release().await {
                tessera_runtime::warn_throttled!("store", key = %lease.key(), error = %se, "could not release the lease");
            }
            return Err(e.into());
        }
        metrics.published.inc();
        Ok(Requested::Queued)
    }
}

/// A build request whose confirm is still awaited after its caller was answered (see
/// [`CacheService::request_build`]), with what settling it needs.
struct Confirm {
    store: tessera_protocol::store::SharedStore,
    keys: FragmentKeys,
    route: FragmentRoute,
    published: prometheus_client::metrics::counter::Counter,
}

impl Confirm {
    /// Awaits `publish`; a refused one gives the lease back, as when the caller awaits it.
    async fn settle(
        self,
        publish: impl std::future::Future<Output = Result<(), BusError>>,
        span: otel::Span,
    ) {
        let Err(e) = publish.await else {
            self.published.inc();
            return;
        };
        span.fail(&e);
        tessera_runtime::warn_throttled!("bus", key = %self.keys.envelope, error = %e, "build request refused after its fragment was heard of; lease given back");
        let lease = Lease::new(self.store.as_ref(), &self.keys, &self.route);
        if let Err(se) = lease.release().await {
            tessera_runtime::warn_throttled!("store", key = %lease.key(), error = %se, "could not release the lease");
        }
    }
}

impl CacheService {
    /// A span of a store call `operation` on `keys` keys (nothing when traces are off).
    fn store_span(&self, operation: &'static str, keys: usize) -> otel::Span {
        otel::Span::child(operation, otel::Kind::Client, || {
            vec![
                KeyValue::new(
                    "db.system.name",
                    otel::store_system(&self.config.load().backend),
                ),
                KeyValue::new("db.operation.name", operation),
                KeyValue::new("db.operation.batch.size", keys as i64),
            ]
        })
    }

    /// `messaging.system` of this gateway's bus.
    fn bus_system(&self) -> &'static str {
        otel::bus_system(&self.config.load().backend)
    }
}

impl CacheService {
    /// Deletes one fragment everywhere (from both servers that may hold it, on a store of
    /// several) and tells every gateway, naming the purge `id`; whether it was there.
    /// A `soft` purge keeps the envelope, made stale ([`Envelope::soft_purged`]): it is
    /// served stale while one rebuild runs.
    pub(crate) async fn purge_fragment(
        &self,
        t: &Fragment<'_>,
        soft: bool,
        id: &str,
    ) -> Result<bool, CacheError> {
        let key = &t.keys.envelope;
        let store = self.backends.store.as_ref();
        let deleted = if soft {
            self.metrics.soft_purges.inc();
            let soften = |held: Option<&[u8]>| Envelope::soft_purged(held, now_ms());
            store::copies::update_everywhere(store, key, &soften).await?
        } else {
            store::copies::delete_everywhere(store, key).await?
        };
        // Evict here first, so this gateway is right even if the broker is down.
        self.l1.invalidate_key(key).await;
        let event = Event::Purged {
            purge: Purge::Key {
                key: key.to_string(),
            },
            id: Some(id.to_string()),
        };
        self.backends.bus.publish_event(&event).await?;
        tracing::info!(route = %t.route.name, %key, deleted, soft, "fragment purged");
        Ok(deleted)
    }

    /// Purges `tags` everywhere: each of them, or (`all_of`) the fragments carrying all
    /// of them. Records the instant in the store (each tag's key, or the record of the
    /// smallest tag, see [`tessera_protocol::tags`]), so every fragment rendered before it
    /// is retired in every gateway, then tells every gateway (whose L1 and hot answers
    /// forget it at once); the last event names the purge `id`. Returns the instant (Unix
    /// ms).
    pub(crate) async fn purge_tags(
        &self,
        tags: &[Tag],
        how: TagPurge,
        id: &str,
    ) -> Result<u64, CacheError> {
        let (store, keys) = (self.backends.store.as_ref(), &self.backends.keys);
        let mut names: Vec<String> = tags.iter().map(ToString::to_string).collect();
        names.sort();
        names.dedup();
        // Here first (L1), so this gateway is right even if the broker is down.
        let (purged_at, mut events): (u64, Vec<Event>) =
            if how == TagPurge::AllOf && names.len() > 1 {
                let purged_at = tag_keys::purge_all_of(store, keys, tags).await?;
                self.l1.invalidate_all_of(&names, purged_at);
                let purge = Purge::AllOf {
                    all_of: names.clone(),
                    purged_at,
                };
                (purged_at, vec![Event::Purged { purge, id: None }])
            } else {
                let soft = how == TagPurge::Soft;
                let purged_at = if soft {
                    self.metrics.soft_purges.inc_by(names.len() as u64);
                    tag_keys::soft_purge(store, keys, tags).await?
                } else {
                    tag_keys::purge_each(store, keys, tags).await?
                };
                let events = names
                    .iter()
                    .map(|tag| {
                        self.l1.invalidate_tag(tag, purged_at, soft);
                        let purge = Purge::Tag {
                            tag: tag.clone(),
                            purged_at,
                            soft,
                        };
                        Event::Purged { purge, id: None }
                    })
                    .collect();
                (purged_at, events)
            };
        // One per event: each is heard once by every gateway (`tag_purges_heard`).
        self.metrics.tag_purges.inc_by(events.len() as u64);
        if let Some(Event::Purged { id: last, .. }) = events.last_mut() {
            *last = Some(id.to_string());
        }
        for event in &events {
            self.backends.bus.publish_event(event).await?;
        }
        tracing::info!(tags = %names.join(" "), ?how, purged_at, "tags purged");
        Ok(purged_at)
    }

    /// Moves a route to a new generation (or, `soft`, records a soft purge of it, which
    /// makes stale what rendered before it) and tells every gateway, naming the purge
    /// `id`; the generation.
    pub(crate) async fn purge_route(
        &self,
        route: &FragmentRoute,
        soft: bool,
        id: &str,
    ) -> Result<u64, CacheError> {
        let store = self.backends.store.as_ref();
        let key = self.backends.keys.generation(&route.name);
        let generation = if soft {
            // Beside the generation, which stays: what rendered before it is stale.
            self.metrics.soft_purges.inc();
            let soft_key = self.backends.keys.route_soft(&route.name);
            store::Register::of(store, &soft_key)
                .raise(now_ms())
                .await?;
            store::generation(store, &key).await?
        } else {
            store::bump_generation(store, &key).await?
        };
        self.l1.invalidate_route(&route.name).await;
        let event = Event::Purged {
            purge: Purge::Route {
                route: route.name.clone(),
                generation,
                soft,
            },
            id: Some(id.to_string()),
        };
        self.backends.bus.publish_event(&event).await?;
        tracing::info!(route = %route.name, generation, soft, "route purged");
        Ok(generation)
    }
}

/// What events from every worker and gateway do to this gateway ([`events::follow`]).
impl CacheService {
    /// Applies one event: a fragment built, failed or purged is evicted from L1 (and so
    /// from the hot answers) and whoever waits for it is woken; a route purge forgets the
    /// route's generation; a tag purge is recorded, which retires every envelope carrying
    /// the tag on its next use.
    async fn apply(&self, event: &Event) {
        let keys = event
            .key()
            .and_then(|text| self.backends.keys.parse_envelope_key(text));
        if event.key().is_some() && keys.is_none() {
            tracing::debug!("event for a key outside this namespace ignored");
        }
        // Only configured routes become label values.
        let route = keys
            .as_ref()
            .map(|k| k.route())
            .filter(|r| self.config.load().route(r).is_some());
        match event {
            Event::Failed { error, .. } => self.failures.record(route.unwrap_or(""), error),
            Event::Purged { purge, .. } => self.apply_purge(purge).await,
            Event::Heartbeat { gateway } => self.acks.heartbeat(gateway, Instant::now()),
            Event::PurgeApplied { purge_id, gateway } => {
                self.acks.applied(purge_id, gateway, Instant::now());
            }
            Event::Built { .. } => {}
        }
        if let Some(keys) = &keys {
            // Evict first, then wake: a woken request must not find the old entry.
            self.l1.invalidate_key(&keys.envelope).await;
            self.waiters.wake(keys.envelope.as_str());
        }
        if let Event::Purged { id: Some(id), .. } = event {
            self.acknowledge(id);
        }
        // Counted once applied: whoever reads a count finds L1 already without the old entry.
        let Some(route) = route else { return };
        match event {
            Event::Failed { .. } => self.metrics.build_failed(route),
            Event::Built { build_ms, .. } => self.metrics.build_succeeded(route, *build_ms),
            Event::Purged { .. } | Event::Heartbeat { .. } | Event::PurgeApplied { .. } => {}
        }
    }

    /// Applies what a purge event says beyond its key: a route's generation forgotten,
    /// a tag purge recorded.
    async fn apply_purge(&self, purge: &Purge) {
        match purge {
            Purge::Route { route, .. } => self.l1.invalidate_route(route).await,
            Purge::Tag {
                tag,
                purged_at,
                soft,
            } => {
                self.l1.invalidate_tag(tag, *purged_at, *soft);
                self.metrics.tag_purges_heard.inc();
            }
            Purge::AllOf { all_of, purged_at } => {
                self.l1.invalidate_all_of(all_of, *purged_at);
                self.metrics.tag_purges_heard.inc();
            }
            Purge::Key { .. } => {}
        }
    }

    /// Tells the purging gateway that this one applied the purge `id` (sent beside the
    /// event loop, which does not wait for the broker's confirm).
    fn acknowledge(&self, id: &str) {
        let bus = self.backends.bus.clone();
        let event = Event::PurgeApplied {
            purge_id: id.to_string(),
            gateway: self.acks.me().to_string(),
        };
        self.metrics.purge_acks.inc();
        tokio::spawn(async move {
            if let Err(e) = bus.publish_event(&event).await {
                tessera_runtime::warn_throttled!("bus", error = %e, "could not acknowledge a purge");
            }
        });
    }

    /// Announces this gateway to the others (sent beside the event loop).
    fn heartbeat(&self) {
        let bus = self.backends.bus.clone();
        let event = Event::Heartbeat {
            gateway: self.acks.me().to_string(),
        };
        tokio::spawn(async move {
            if let Err(e) = bus.publish_event(&event).await {
                tessera_runtime::warn_throttled!("bus", error = %e, "could not send a heartbeat");
            }
        });
    }

    /// Events may have been missed: everything L1 holds is forgotten, and every waiter
    /// looks again.
    fn events_lost(&self) {
        tracing::info!("events may have been missed; dropping L1");
        self.metrics.events_lagged.inc();
        self.l1.invalidate_all();
        self.waiters.wake_all();
    }
}

/// The hit path's shortcut: hot answers, remembered by the front.
impl CacheService {
    /// The hot answer for `request_target` (path and query) and its route, when it may be
    /// served at `now` without looking anything up: nothing was invalidated since it was
    /// checked, what it rests on is within `cache.ttl`, and it is fresh and not in its
    /// route's `refresh_ahead` stretch (there, hits take the full path, which may start
    /// the early rebuild); and it was found under `config`, the request's.
    pub(crate) fn hot<'c>(
        &self,
        request_target: &str,
        now: Instant,
        config: &'c Arc<Config>,
    ) -> Option<(Arc<Hot>, &'c FragmentRoute)> {
        let hot = self.hot.get(request_target)?;
        if !Arc::ptr_eq(&hot.config, config) {
            return None;
        }
        let route = config.fragments.get(hot.route)?;
        if !self.l1.unchanged_since(hot.checked_at, hot.loaded_at, now)
            || now + route.refresh_ahead >= hot.fresh_until
        {
            return None;
        }
        Some((hot, route))
    }

    /// Makes `slot`, found fresh for `t` (a route of `config`) by a lookup that started
    /// at `checked_at`, the hot answer for `request_target` (routes without `vary` only,
    /// and only while L1 caches slots).
    pub(crate) fn remember(
        &self,
        config: &Arc<Config>,
        request_target: &str,
        t: &Fragment<'_>,
        slot: &Arc<Slot>,
        checked_at: Instant,
    ) {
        let route = t.route;
        if !route.vary.is_empty() || !self.l1.enabled() {
            // Per user, or not cached.
            return;
        }
        let Some(index) = config.fragments.iter().position(|r| std::ptr::eq(r, route)) else {
            return;
        };
        self.hot.insert(Hot {
            target: request_target.into(),
            route: index,
            config: config.clone(),
            metrics: self.metrics.route(&route.name).clone(),
            slot: slot.clone(),
            checked_at,
            loaded_at: t.generation_read_at.min(slot.loaded_at()),
            fresh_until: Instant::now() + remaining(now_ms(), slot.envelope.fresh_until),
            headers: LastHeaders::default(),
        });
    }

    /// Starts waiting for news of `t` (built, failed, purged). Register before looking it
    /// up, so that news between the lookup and the wait still wakes the waiter.
    pub(crate) fn waiter(&self, t: &Fragment<'_>) -> Waiter<'_> {
        self.waiters.register(t.keys.envelope.as_str())
    }
}

/// What the admin listener reads and does.
impl CacheService {
    /// L1's entries and bytes, counted up to date, and the long-polls waiting.
    pub(crate) async fn sizes(&self) -> Sizes {
        self.l1.settle_counts().await;
        Sizes {
            l1_entries: self.l1.entry_count(),
            l1_bytes: self.l1.weighted_size(),
            long_polls: self.waiters.len(),
        }
    }

    /// The latest build failures any worker reported, newest first.
    pub(crate) fn recent_failures(&self) -> Vec<Failure> {
        self.failures.recent()
    }
}

/// What this gateway's cache holds, as `/metrics` shows it.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Sizes {
    /// Entries in L1.
    pub l1_entries: u64,
    /// Bytes L1 holds, by its weigher.
    pub l1_bytes: u64,
    /// Keys long-polls wait on.
    pub long_polls: usize,
}

impl Requested {
    /// What L1 answers after this request, and whether it keeps it. A build queued by
    /// this very request is answered pending but not kept: in a storm of keys asked once
    /// (a crawler walking ids, a purged busy route) every such entry would only wait to
    /// expire, and L1's upkeep of them (insert, expiry, its map's growth) cost a fifth of
    /// a miss's CPU and doubled its latency tail (`bench/README.md`). A key asked again
    /// while its build runs costs one more lookup and lease attempt, which finds the
    /// lease held: that answer is kept, so a polled fragment is read from L1 after all.
    fn into_loaded(self) -> Loaded {
        match self {
            Requested::JustBuilt(envelope) => SlotState::Found(envelope).into(),
            Requested::AlreadyPending => SlotState::Pending.into(),
            Requested::Queued => Loaded::once(SlotState::Pending),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::refresh_early;

    #[test]
    fn early_refresh_grows_likelier_as_fresh_ends() {
        let window = Duration::from_secs(10);
        let rate = |left: Duration| {
            (0..20_000).filter(|_| refresh_early(left, window)).count() as f64 / 20_000.0
        };
        assert_eq!(rate(Duration::from_secs(10)), 0.0, "not before the stretch");
        assert_eq!(rate(Duration::from_secs(60)), 0.0);
        assert!(
            !refresh_early(Duration::ZERO, Duration::ZERO),
            "off by default"
        );
        assert_eq!(rate(Duration::ZERO), 1.0, "certain at the end");
        let (opening, halfway) = (
            rate(Duration::from_millis(9_990)),
            rate(Duration::from_secs(5)),
        );
        assert!((0.01..0.03).contains(&opening), "{opening}");
        assert!((0.11..0.16).contains(&halfway), "{halfway}");
    }
}
