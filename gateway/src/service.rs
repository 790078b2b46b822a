//! The fragment cache as a service: what is known about a fragment, and the one build it
//! may call for. It knows nothing of HTTP; [`crate::fragment`] and [`crate::compose`] turn
//! what it finds into answers.
//!
//! A lookup goes L1, then the store; a missing fragment has its build requested through
//! the [`Lease`], so of all callers in all gateways exactly one queues it. Inside one
//! gateway, L1 coalesces identical concurrent misses into one store lookup first.
//!
//! Every envelope found (in L1 or the store) that carries tags is checked against the tag
//! purges ([`tessera_protocol::tags`]) before it is judged: against what L1 knows
//! ([`crate::tags`]) when it read the tags within `cache.ttl`, otherwise by reading the
//! tags' keys in one `get_many`. An envelope a purge retired is dropped from L1 and
//! treated as missing: its rebuild is requested as for a cold miss, and nothing of it is
//! served, not even stale.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::future::join_all;
use tessera_protocol::config::background_queue;
use tessera_protocol::envelope::Freshness;
use tessera_protocol::message::VERSION;
use tessera_protocol::tags::{self, Tag};
use tessera_protocol::time::{now_ms, remaining};
use tessera_protocol::{
    Backends, BuildRequest, BusError, Config, Envelope, Event, FragmentKeys, FragmentRoute,
    Identity, Lease, StoreError, StoreKey, store,
};

use crate::cache::{L1, Loaded, Slot, SlotState};
use crate::headers::Trace;
use crate::metrics::Metrics;

/// Why the cache could not answer: a backend failed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum CacheError {
    /// The shared store could not be reached.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The broker could not take a build request.
    #[error(transparent)]
    Bus(#[from] BusError),
}

/// One fragment as a request names it: its route, identity, generation and keys, and the
/// trace of the request that asked.
#[derive(Debug, Clone)]
pub struct Target<'c> {
    /// The configured route.
    pub route: &'c FragmentRoute,
    /// Who and what the fragment is for.
    pub identity: Identity,
    /// The route's generation when the request was made.
    pub generation: u64,
    /// Where the fragment lives in that generation.
    pub keys: FragmentKeys,
    /// When that generation was read from the store.
    pub generation_read_at: Instant,
    /// The request's trace, passed on to the build.
    pub trace: &'c Trace<'c>,
}

/// What a lookup found, as far as the answer is concerned.
#[derive(Debug)]
pub enum Found {
    /// Serve this envelope's body; `stale` when past fresh (rebuild already requested).
    Serve {
        /// The slot holding the envelope.
        slot: Arc<Slot>,
        /// Past its fresh time, or served because the store could not answer.
        stale: bool,
        /// The store could not answer: this is L1's last copy (stale-if-error).
        fallback: bool,
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
pub enum Priority {
    /// A placeholder was answered, a long-poll or page waits: the route's queue.
    Waited,
    /// A stale copy was served: a refresh on the route's background queue.
    Background,
}

/// The outcome of asking for a build.
#[derive(Debug)]
pub enum Requested {
    /// We won the lease and queued the build.
    Queued,
    /// Someone else holds the lease: a build is already queued or running.
    AlreadyPending,
    /// A build finished just before we asked: here is its result, nothing was queued.
    JustBuilt(Envelope),
}

/// L1 in front of the store, and the build requests its misses call for.
#[derive(Debug)]
pub struct CacheService {
    /// The configuration the gateway runs with.
    pub config: Arc<Config>,
    /// The store and bus.
    pub backends: Backends,
    /// The in-process cache.
    pub l1: L1,
    /// The gateway's metrics.
    pub metrics: Arc<Metrics>,
}

impl CacheService {
    /// The target `identity` of `route` names now: reads the route's generation (L1,
    /// then the store) and derives the keys.
    pub async fn target<'c>(
        &self,
        route: &'c FragmentRoute,
        identity: Identity,
        trace: &'c Trace<'c>,
    ) -> Result<Target<'c>, CacheError> {
        let (generation, generation_read_at) = self
            .l1
            .generation(&route.name, || async {
                let key = self.backends.keys.generation(&route.name);
                Ok(store::generation(self.backends.store.as_ref(), &key).await?)
            })
            .await?;
        Ok(Target {
            keys: self.backends.keys.fragment(&identity, generation),
            route,
            identity,
            generation,
            generation_read_at,
            trace,
        })
    }

    /// Looks a fragment up (L1, then the store), requesting a build when it is missing,
    /// stale or failed long enough ago.
    pub async fn lookup(self: &Arc<Self>, t: &Target<'_>) -> Result<Found, CacheError> {
        let read = self
            .l1
            .slot(&t.keys.envelope, || async {
                if let Some(bytes) = self.backends.store.get(&t.keys.envelope).await?
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
        if read.fallback {
            tracing::debug!(key = %t.keys.envelope, "store unavailable; serving L1's last copy");
            return Ok(Found::Serve {
                slot: read.slot,
                stale: true,
                fallback: true,
            });
        }
        let slot = self.screen(t, read.slot).await?;
        Ok(self.judge(t, slot))
    }

    /// `slot`, unless a tag purge retired its envelope: then the envelope is dropped from
    /// L1, its build requested as for a miss, and what that leaves (pending, or a build
    /// that just finished) cached and returned instead.
    async fn screen(&self, t: &Target<'_>, slot: Arc<Slot>) -> Result<Arc<Slot>, CacheError> {
        let SlotState::Found(envelope) = &slot.state else {
            return Ok(slot);
        };
        if !self.retired(envelope).await? {
            return Ok(slot);
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
        Ok(self.l1.insert(&t.keys.envelope, loaded, started).await)
    }

    /// Whether a tag purge retired `envelope`: its tags are looked up in L1's tag table,
    /// and those it does not know (within `cache.ttl`) read from the store in one
    /// `get_many`. When the store cannot answer, what L1 last knew of every tag decides;
    /// a tag it never knew makes it a store error.
    pub async fn retired(&self, envelope: &Envelope) -> Result<bool, CacheError> {
        if envelope.tags.is_empty() {
            return Ok(false);
        }
        let known = &self.l1.tags;
        let now = Instant::now();
        let mut unknown: Vec<&str> = Vec::new();
        for tag in &envelope.tags {
            match known.current(tag, now) {
                Some(at) if envelope.retired_at(at) => return Ok(true),
                Some(_) => {}
                None => unknown.push(tag),
            }
        }
        if unknown.is_empty() {
            return Ok(false);
        }
        let read = tags::purged_at(self.backends.store.as_ref(), &self.backends.keys, &unknown);
        match read.await {
            Ok(found) => {
                for (tag, at) in &found {
                    known.learn(tag, *at, now);
                }
            }
            Err(e) if unknown.iter().all(|t| known.last_known(t).is_some()) => {
                tracing::debug!(error = %e, "store unavailable; tags checked against what L1 knew");
            }
            Err(e) => return Err(e.into()),
        }
        Ok(envelope.retired_by(|t| known.last_known(t)))
    }

    /// Looks every target up at once: L1, then one multi-get for the rest, then one
    /// build request per miss. Targets the store could not be asked about are left out.
    pub async fn lookup_many(
        self: &Arc<Self>,
        targets: &[&Target<'_>],
    ) -> HashMap<StoreKey, Found> {
        let mut slots: HashMap<StoreKey, Arc<Slot>> = HashMap::new();
        let mut missing: Vec<&Target<'_>> = Vec::new();
        for t in targets {
            if slots.contains_key(&t.keys.envelope) || missing.iter().any(|m| m.keys == t.keys) {
                continue;
            }
            match self.l1.peek(&t.keys.envelope).await {
                Some(slot) => {
                    slots.insert(t.keys.envelope.clone(), slot);
                }
                None => missing.push(t),
            }
        }
        let mut kept: HashMap<StoreKey, Arc<Slot>> = HashMap::new();
        if !missing.is_empty() {
            match self.load_many(&missing).await {
                Ok(loaded) => slots.extend(loaded),
                Err(e) => {
                    tracing::warn!(error = %e, "store unavailable while composing; serving what L1 kept, placeholders for the rest");
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
                };
                (key, serve)
            })
            .collect();
        for t in targets {
            if found.contains_key(&t.keys.envelope) {
                continue;
            }
            if let Some(slot) = slots.get(&t.keys.envelope) {
                match self.screen(t, slot.clone()).await {
                    Ok(slot) => {
                        found.insert(t.keys.envelope.clone(), self.judge(t, slot));
                    }
                    Err(e) => {
                        tracing::warn!(route = %t.route.name, error = %e, "include left out: its tags could not be checked");
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
        missing: &[&Target<'_>],
    ) -> Result<Vec<(StoreKey, Arc<Slot>)>, CacheError> {
        let started = Instant::now();
        let keys: Vec<StoreKey> = missing.iter().map(|t| t.keys.envelope.clone()).collect();
        let mut values = self.backends.store.get_many(&keys).await?;
        let mut slots = Vec::with_capacity(missing.len());
        let mut absent = Vec::new();
        for t in missing {
            let key = &t.keys.envelope;
            match values.remove(key).and_then(|b| self.decode(key, &b)) {
                Some(e) => {
                    let slot = self.l1.insert(key, SlotState::Found(e), started).await;
                    slots.push((key.clone(), slot));
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
                    let slot = self.l1.insert(key, requested.into_loaded(), started).await;
                    slots.push((key.clone(), slot));
                }
                Err(e) => {
                    tracing::warn!(route = %t.route.name, error = %e, "include left pending: build not requested");
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
    /// expired-failure slot calls for (in the background: the answer never waits).
    pub fn judge(self: &Arc<Self>, t: &Target<'_>, slot: Arc<Slot>) -> Found {
        let now = now_ms();
        let SlotState::Found(envelope) = &slot.state else {
            return Found::Pending;
        };
        let freshness = envelope.freshness(now);
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
            },
            Freshness::Stale | Freshness::Failed | Freshness::FailedExpired if servable => {
                Found::Serve {
                    slot: slot.clone(),
                    stale: true,
                    fallback: false,
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
    fn rebuild_in_background(self: &Arc<Self>, t: &Target<'_>, priority: Priority, replaces: u64) {
        let this = self.clone();
        let (route, identity, generation, keys, generation_read_at) = (
            t.route.clone(),
            t.identity.clone(),
            t.generation,
            t.keys.clone(),
            t.generation_read_at,
        );
        let trace = Trace::known(t.trace.id().to_string());
        tokio::spawn(async move {
            let target = Target {
                route: &route,
                identity,
                generation,
                keys,
                generation_read_at,
                trace: &trace,
            };
            if let Err(e) = this.request_build(&target, priority, replaces).await {
                tracing::warn!(route = %route.name, error = %e, "could not request a rebuild");
            }
        });
    }

    /// Queues one build of `t` unless one is already queued anywhere: acquires the lease
    /// (atomic across gateways) and, if it won, publishes the request, on the route's
    /// queue or, for a build nobody waits for, its background queue. `replaces` is when
    /// the copy being rebuilt stops being fresh (Unix ms; 0 when there is none): a copy
    /// in the store fresher than both it and now was built meanwhile, and is not built
    /// again.
    pub async fn request_build(
        &self,
        t: &Target<'_>,
        priority: Priority,
        replaces: u64,
    ) -> Result<Requested, CacheError> {
        let store = self.backends.store.as_ref();
        let lease = Lease::new(store, &t.keys, t.route);
        let metrics = self.metrics.route(&t.route.name);
        let id = format!("{:016x}", rand::random::<u64>());
        let Some(won) = lease.acquire(&id).await? else {
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
            && !self.retired(&envelope).await?
        {
            lease.release().await?;
            return Ok(Requested::JustBuilt(envelope));
        }
        let request = BuildRequest {
            v: VERSION,
            id,
            key: t.keys.envelope.as_str().to_string(),
            identity: t.identity.clone(),
            generation: t.generation,
            attempt: 1,
            requested_at: now,
            lease_deadline: won.deadline,
            trace_id: t.trace.id().to_string(),
        };
        let queue = match priority {
            Priority::Waited => t.route.queue.clone(),
            Priority::Background => background_queue(&t.route.queue),
        };
        if let Err(e) = self.backends.bus.publish_build(&queue, &request).await {
            // Nothing was queued: give the lease back so the next request can try again
            // instead of waiting for it to expire.
            if let Err(se) = lease.release().await {
                tracing::warn!(key = %lease.key(), error = %se, "could not release the lease");
            }
            return Err(e.into());
        }
        metrics.published.inc();
        tracing::debug!(route = %t.route.name, key = %t.keys.envelope, request = %request.id, ?priority, trace_id = %t.trace.id(), "build queued");
        Ok(Requested::Queued)
    }
}

impl CacheService {
    /// Deletes one fragment everywhere and tells every gateway; whether it was there.
    pub async fn purge_fragment(&self, t: &Target<'_>) -> Result<bool, CacheError> {
        let key = &t.keys.envelope;
        let deleted = self.backends.store.delete(key).await?;
        // Evict here first, so this gateway is right even if the broker is down.
        self.l1.invalidate_key(key).await;
        let event = Event::Purged {
            route: None,
            generation: None,
            key: Some(key.to_string()),
            tag: None,
            purged_at: None,
        };
        self.backends.bus.publish_event(&event).await?;
        tracing::info!(route = %t.route.name, %key, deleted, "fragment purged");
        Ok(deleted)
    }

    /// Purges `tag` everywhere: records the instant in the tag's store key, so every
    /// fragment rendered before it is retired in every gateway, then tells every gateway
    /// (whose L1 and hot answers forget it at once). Returns the instant (Unix ms).
    pub async fn purge_tag(&self, tag: &Tag) -> Result<u64, CacheError> {
        let purged_at = tags::purge(self.backends.store.as_ref(), &self.backends.keys, tag).await?;
        // Here first, so this gateway is right even if the broker is down.
        self.l1.invalidate_tag(tag.as_str(), Some(purged_at));
        self.metrics.tag_purges.inc();
        let event = Event::Purged {
            route: None,
            generation: None,
            key: None,
            tag: Some(tag.to_string()),
            purged_at: Some(purged_at),
        };
        self.backends.bus.publish_event(&event).await?;
        tracing::info!(%tag, purged_at, "tag purged");
        Ok(purged_at)
    }

    /// Moves a route to a new generation and tells every gateway; the new generation.
    pub async fn purge_route(&self, route: &FragmentRoute) -> Result<u64, CacheError> {
        let key = self.backends.keys.generation(&route.name);
        let generation = store::bump_generation(self.backends.store.as_ref(), &key).await?;
        self.l1.invalidate_route(&route.name).await;
        let event = Event::Purged {
            route: Some(route.name.clone()),
            generation: Some(generation),
            key: None,
            tag: None,
            purged_at: None,
        };
        self.backends.bus.publish_event(&event).await?;
        tracing::info!(route = %route.name, generation, "route purged");
        Ok(generation)
    }
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
