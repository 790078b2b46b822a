//! The pending lease: the one owner of "exactly one build per key".
//!
//! A lease is a store key beside a fragment's envelope (see [`crate::key`]) whose value
//! is the id of the one `BuildRequest` allowed to build that fragment now:
//!
//! - a gateway that misses **acquires** it with the store's atomic `add`; of all callers
//!   in all gateways exactly one wins and publishes its request, the others answer
//!   "pending";
//! - a worker that picks a request up **claims** the lease for it before rendering
//!   (a request from a generation its route has left since is dropped first):
//!   - held by this request: extended for the render, build;
//!   - held by another request: this one was superseded (its lease expired while it
//!     waited in a backed-up queue, and a newer request took over): dropped;
//!   - held by nobody: the worker takes it as a gateway does (`add`, reading the
//!     envelope back); if the fragment is fresh (someone built it meanwhile, and no tag
//!     purge retired it since, see [`crate::tags`]) it gives the lease back and drops
//!     the request, otherwise it builds;
//! - a worker that schedules a retry **extends** it through the retry's delay, so no
//!   gateway queues a second build meanwhile;
//! - whoever finishes (the worker after storing the envelope, or a gateway whose publish
//!   failed, or that found the fragment just built) **releases** it. The worker
//!   [`finish`](Lease::finish)es: store, then release, in one ordered exchange.
//!
//! On memcached a lease lives on its envelope's server ([`crate::key::placed_as`]), so
//! "take the lease, then read the envelope" and "store the envelope, then release" are one
//! pipelined exchange each, executed in order. A miss costs two store exchanges (the
//! lookup, then the lease with the re-check) and one confirmed publish. memcached's
//! one-command lookup-or-lease (`mg` with `N`) could fold the lookup into the lease, for
//! a new key scheme; it is not adopted (what it would save, measured: `bench/README.md`,
//! "Lookup-or-lease in one command").
//!
//! On a store of several servers the lease is kept on two of them
//! ([`crate::store::copies`](mod@crate::store::copies)): the first two of its envelope's
//! placement order that the process believes up. It is taken on the first, then on the
//! second, and held only when both were won (the loser of the second gives the first
//! back); a claim reads both, and finding two requests on them
//! looks again briefly (one is being given back) before it steps aside; extending and
//! releasing write both; the envelope is stored on the first (on the new first copy when
//! the first fails as the envelope is stored and is judged out for it, so that a finished
//! render is not done again). While processes disagree about one server being out, their
//! copies still share a server, so two requests are never both held: a server lost, or
//! flushed on its return, takes one copy of a lease with it and never the lease. The two
//! adds cost a queued build one more exchange; a lookup and a hit cost nothing more.
//!
//! The bound on builds doubled while processes disagree about a server, measured by
//! `builds_are_not_doubled_while_processes_disagree_about_servers` (`tests/tests/failover.rs`:
//! two gateways and two workers, each judging servers for itself, under 20 cold misses a
//! second while one of three servers is killed and restarted empty and another hangs for
//! 1.5 s): none built twice at once, in 13 runs of 160 fragments (with the lease on one
//! server, 3–4 per run); 37–59 per run built again later, every one a fragment placed on
//! the killed or the emptied server, whose copies were lost, none on the server that lost
//! nothing. So a fragment is built again when its envelope was lost, and twice at once
//! only when its lease was: both copies gone at once (two servers lost), or its holder ran
//! past the lease's TTL, as without failover.
//!
//! However long a request waits in its queue, at most one request per key gets past its
//! claim: a lease that expired in the queue lets the next poll publish again, and the
//! older request then finds the newer one's id and steps aside. A build nobody waits for
//! any more may be dropped this way; it is never doubled. The lease names the request,
//! not its delivery: two copies of one request (a publish sent again after a lost
//! confirm, or one redelivered while its first worker still renders) picked up at once by
//! two workers are both built. A claim per delivery would stop that, but would make the
//! copy redelivered from a killed worker wait for the lease to run out.
//!
//! Its TTL is [`FragmentRoute::lease_ttl`] (the render deadline plus a margin), so a lease
//! whose holder died expires by itself and no key stays pending forever. This module is
//! the only code that reads or writes lease keys.

use std::time::Duration;

use bytes::Bytes;
use futures_util::future::join_all;

use crate::config::FragmentRoute;
use crate::envelope::Envelope;
use crate::key::{FragmentKeys, Keyspace, StoreKey};
use crate::store::{self, Store, StoreError};
use crate::tags;
use crate::time::{add_ms, now_ms};

/// What a worker's claim found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Claim {
    /// The request holds the lease (now extended for the render): build.
    Held,
    /// The route was purged since the request was made: drop it.
    Purged,
    /// Another request holds it: drop this one.
    Superseded,
    /// Nobody held it and the fragment is already fresh: drop this one.
    AlreadyBuilt,
}

/// What a gateway that took the lease holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Acquired {
    /// When the lease ends (Unix ms), for `BuildRequest::lease_deadline`.
    pub deadline: u64,
    /// The fragment's envelope as read just after the lease was taken.
    pub envelope: Option<Bytes>,
}

/// The lease of one fragment, on one store.
#[derive(Debug)]
pub struct Lease<'a> {
    store: &'a dyn Store,
    key: StoreKey,
    envelope: &'a StoreKey,
    keyspace: Keyspace,
    route: &'a str,
    ttl: Duration,
}

impl<'a> Lease<'a> {
    /// The lease of the fragment at `keys`, of `route`, kept in `store`.
    pub fn new(store: &'a dyn Store, keys: &'a FragmentKeys, route: &FragmentRoute) -> Self {
        Self {
            store,
            key: keys.lease(),
            envelope: &keys.envelope,
            keyspace: keys.keyspace(),
            route: keys.route(),
            ttl: route.lease_ttl(),
        }
    }

    /// The lease's key, for logs.
    pub fn key(&self) -> &StoreKey {
        &self.key
    }

    /// Where the lease is kept: its copies, first copy first (see the module docs).
    fn copies(&self) -> Vec<&'a dyn Store> {
        store::copies(self.store, &self.key)
    }

    /// Takes the lease for the request `holder` unless someone holds it. `Some` when this
    /// caller won: it must then queue the request or [`release`](Self::release) the lease.
    /// `None` when a build is already queued or running.
    ///
    /// The envelope is read back after the lease is taken, in the same exchange on
    /// memcached (the two share a server): a worker that stored a result and released its
    /// lease between the caller's lookup and this call is seen, and not built twice.
    /// With two copies, the first is taken before the second, and both must be won.
    pub async fn acquire(&self, holder: &str) -> Result<Option<Acquired>, StoreError> {
        let deadline = self.deadline_after(Duration::ZERO);
        let copies = self.copies();
        let Some((first, others)) = copies.split_first() else {
            return Err(no_copy());
        };
        let take = |copy: &'a dyn Store| {
            copy.add_then_get(&self.key, holder.as_bytes(), self.ttl, self.envelope)
        };
        let Some(mut envelope) = take(*first).await? else {
            return Ok(None);
        };
        for copy in others {
            match take(*copy).await {
                // A copy that does not answer is the server out of service: the first
                // copy, which every view shares with this one, decides.
                Err(_) => {}
                Ok(Some(read)) => envelope = envelope.or(read),
                Ok(None) => {
                    // Another request holds it there (taken under another view of which
                    // server is out): it wins, give the first copy back.
                    let _ = first.delete(&self.key).await;
                    return Ok(None);
                }
            }
        }
        Ok(Some(Acquired { deadline, envelope }))
    }

    /// A worker picked the request `holder`, made in `generation` of the route, up: may
    /// it build? See the module docs. The route's generation and the lease are read at
    /// once.
    pub async fn claim(&self, holder: &str, generation: u64) -> Result<Claim, StoreError> {
        let generation_key = self.keyspace.generation(self.route);
        let (route_generation, mut holders) = tokio::join!(
            store::generation(self.store, &generation_key),
            self.holders(),
        );
        if generation < route_generation? {
            return Ok(Claim::Purged);
        }
        for _ in 0..CONFLICT_READS {
            match holders? {
                Holders::Conflict => {}
                Holders::Of(Some(current)) if current == holder.as_bytes() => {
                    self.extend(holder, Duration::ZERO).await?;
                    return Ok(Claim::Held);
                }
                Holders::Of(Some(_)) => return Ok(Claim::Superseded),
                Holders::Of(None) => return self.claim_unheld(holder).await,
            }
            // Two requests on two copies: one is giving its copy back (it lost the other
            // one). Look again shortly.
            tokio::time::sleep(CONFLICT_PAUSE).await;
            holders = self.holders().await;
        }
        Ok(Claim::Superseded)
    }

    /// Nobody held the lease: the worker takes it as a gateway does, reading the
    /// envelope back in the same exchange.
    async fn claim_unheld(&self, holder: &str) -> Result<Claim, StoreError> {
        let Some(won) = self.acquire(holder).await? else {
            return Ok(Claim::Superseded);
        };
        let fresh = match won.envelope.and_then(|bytes| Envelope::decode(&bytes).ok()) {
            // A fresh envelope a tag purge retired (or softly purged) is as good as none.
            Some(e) if now_ms() < e.fresh_until => {
                tags::judge(self.store, &self.keyspace, &e).await? == tags::Verdict::Usable
            }
            _ => false,
        };
        if !fresh {
            return Ok(Claim::Held);
        }
        // Nothing to build: give it back. One that cannot be given back expires by
        // itself, and the fragment is fresh meanwhile.
        let _ = self.release().await;
        Ok(Claim::AlreadyBuilt)
    }

    /// Who holds the lease, read from every copy: one request (or nobody) where the
    /// copies that answered agree, a conflict where two requests hold one copy each.
    async fn holders(&self) -> Result<Holders, StoreError> {
        let read = join_all(self.copies().iter().map(|c| c.get(&self.key))).await;
        let mut answered = false;
        let mut held: Option<Bytes> = None;
        let mut failure = None;
        for copy in read {
            match copy {
                Err(e) => {
                    failure.get_or_insert(e);
                }
                Ok(found) => {
                    answered = true;
                    match (&held, found) {
                        (Some(a), Some(b)) if *a != b => return Ok(Holders::Conflict),
                        (None, Some(b)) => held = Some(b),
                        _ => {}
                    }
                }
            }
        }
        if !answered {
            return Err(failure.unwrap_or_else(no_copy));
        }
        Ok(Holders::Of(held))
    }

    /// Holds the lease for the request `holder` `wait` more than its usual TTL, from
    /// now: through a retry's delay and the retried render. Returns the new deadline
    /// (Unix ms), the same as [`deadline_after`](Self::deadline_after) gives. Written on
    /// every copy (a copy that came back empty is filled again).
    pub async fn extend(&self, holder: &str, wait: Duration) -> Result<u64, StoreError> {
        let deadline = self.deadline_after(wait);
        let copies = self.copies();
        let set = join_all(
            copies
                .iter()
                .map(|c| c.set(&self.key, holder.as_bytes(), wait + self.ttl)),
        )
        .await;
        any_answered(set)?;
        Ok(deadline)
    }

    /// When a lease held `wait` more than its usual TTL from now ends (Unix ms).
    pub fn deadline_after(&self, wait: Duration) -> u64 {
        add_ms(now_ms(), wait + self.ttl)
    }

    /// Gives the lease back: the next request may queue a build at once instead of
    /// waiting for the lease to expire.
    pub async fn release(&self) -> Result<(), StoreError> {
        let copies = self.copies();
        any_answered(join_all(copies.iter().map(|c| c.delete(&self.key))).await)
    }

    /// Stores the envelope `bytes` for `ttl`, then gives the lease back, in that order
    /// (one exchange on memcached, on the first copy, where the envelope lives; the other
    /// copy is given back beside it). The outer result is the store's; the inner one the
    /// release's, which only delays the next build when it fails (the lease expires).
    pub async fn finish(
        &self,
        bytes: &[u8],
        ttl: Duration,
    ) -> Result<Result<(), StoreError>, StoreError> {
        let copies = self.copies();
        let Some((first, others)) = copies.split_first() else {
            return Err(no_copy());
        };
        let (stored, others) = tokio::join!(
            first.set_then_delete(self.envelope, bytes, ttl, &self.key),
            join_all(others.iter().map(|c| c.delete(&self.key))),
        );
        let released = match stored {
            Err(e) if e.is_retryable() => self.finish_elsewhere(*first, bytes, ttl, e).await?,
            stored => stored?,
        };
        // The release counts where any copy was given back.
        Ok(any_answered([released].into_iter().chain(others).collect()))
    }

    /// The first copy failed as the envelope was stored: when the store now puts it on
    /// another server (the failure judged the first one out), the envelope is stored
    /// there, so that a render is not lost with the server it was going to. `failed`
    /// otherwise.
    async fn finish_elsewhere(
        &self,
        tried: &dyn Store,
        bytes: &[u8],
        ttl: Duration,
        failed: StoreError,
    ) -> Result<Result<bool, StoreError>, StoreError> {
        match self.copies().first() {
            Some(now) if !store::copies::same(*now, tried) => {
                now.set_then_delete(self.envelope, bytes, ttl, &self.key)
                    .await
            }
            _ => Err(failed),
        }
    }

    /// The id of the request holding the lease now, if any.
    pub async fn holder(&self) -> Result<Option<String>, StoreError> {
        let held = match self.holders().await? {
            Holders::Of(held) => held,
            Holders::Conflict => None,
        };
        Ok(held.map(|v| String::from_utf8_lossy(&v).into_owned()))
    }
}

/// Who holds a lease, by its copies.
enum Holders {
    /// The copies that answered name this request, or nobody.
    Of(Option<Bytes>),
    /// Two copies name two requests.
    Conflict,
}

/// How often a claim looks again at a lease two requests hold one copy each.
const CONFLICT_READS: usize = 3;
/// How long a claim waits before it looks again.
const CONFLICT_PAUSE: Duration = Duration::from_millis(20);

/// Ok when any of `results` succeeded (a copy that does not answer is out of service);
/// the first error when none did.
fn any_answered<T>(results: Vec<Result<T, StoreError>>) -> Result<(), StoreError> {
    let mut failure = None;
    for result in results {
        match result {
            Ok(_) => return Ok(()),
            Err(e) => {
                failure.get_or_insert(e);
            }
        }
    }
    Err(failure.unwrap_or_else(no_copy))
}

/// A store of several servers with none up.
fn no_copy() -> StoreError {
    StoreError::Unavailable(crate::Cause::new("no server is up to hold the lease"))
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};

    use async_trait::async_trait;

    use super::*;
    use crate::key::{Identity, Keyspace};
    use crate::store::MemoryStore;
    use crate::store::copies::fake::{self, View};

    /// A route in generation 1, and the keys of one of its fragments.
    async fn setup() -> (MemoryStore, FragmentKeys, FragmentRoute) {
        let route = FragmentRoute::new("recs", "/render/recs");
        let keyspace = Keyspace::new("t");
        let keys = keyspace.fragment(&identity(vec![]), 1);
        let store = MemoryStore::new(1 << 20, 1 << 20);
        store
            .set(&keyspace.generation("recs"), b"1", Duration::ZERO)
            .await
            .unwrap();
        (store, keys, route)
    }

    fn identity(params: Vec<(String, String)>) -> Identity {
        Identity {
            route: "recs".into(),
            params,
            vary: vec![],
        }
    }

    fn ms(d: Duration) -> u64 {
        u64::try_from(d.as_millis()).unwrap()
    }

    #[tokio::test]
    async fn one_caller_wins_until_released() {
        let (store, keys, route) = setup().await;
        let lease = Lease::new(&store, &keys, &route);
        let before = now_ms();
        let Acquired { deadline, envelope } = lease
            .acquire("a")
            .await
            .unwrap()
            .expect("the first caller wins");
        assert_eq!(envelope, None, "nothing built yet");
        let ttl = ms(route.lease_ttl());
        assert!(deadline >= before + ttl && deadline <= now_ms() + ttl);
        assert_eq!(lease.holder().await.unwrap().as_deref(), Some("a"));
        assert_eq!(
            lease.acquire("b").await.unwrap(),
            None,
            "held: nobody else wins"
        );
        assert_eq!(lease.holder().await.unwrap().as_deref(), Some("a"));
        lease.release().await.unwrap();
        assert_eq!(lease.holder().await.unwrap(), None);
        assert!(
            lease.acquire("b").await.unwrap().is_some(),
            "released: the next wins"
        );
    }

    #[tokio::test]
    async fn leases_are_per_fragment_and_apart_from_the_envelope() {
        let (store, keys, route) = setup().await;
        let lease = Lease::new(&store, &keys, &route);
        assert_ne!(lease.key(), &keys.envelope);
        let other_keys = Keyspace::new("t").fragment(&identity(vec![("id".into(), "2".into())]), 1);
        assert!(lease.acquire("a").await.unwrap().is_some());
        let other = Lease::new(&store, &other_keys, &route);
        assert!(other.acquire("b").await.unwrap().is_some());
        assert!(store.get(&keys.envelope).await.unwrap().is_none());
    }

    #[tokio::test]
    async fn extend_holds_the_lease_for_the_wait_and_a_render() {
        let (store, keys, route) = setup().await;
        let lease = Lease::new(&store, &keys, &route);
        let wait = Duration::from_secs(8);
        let before = now_ms();
        let deadline = lease.extend("a", wait).await.unwrap();
        let ttl = ms(wait + route.lease_ttl());
        assert!(deadline >= before + ttl && deadline <= now_ms() + ttl);
        assert_eq!(lease.holder().await.unwrap().as_deref(), Some("a"));
        assert_eq!(lease.acquire("b").await.unwrap(), None);
        assert_eq!(lease.claim("a", 1).await.unwrap(), Claim::Held);
    }

    #[tokio::test]
    async fn only_the_holder_gets_past_its_claim() {
        let (store, keys, route) = setup().await;
        let lease = Lease::new(&store, &keys, &route);
        lease.acquire("newer").await.unwrap();
        assert_eq!(lease.claim("older", 1).await.unwrap(), Claim::Superseded);
        assert_eq!(lease.claim("newer", 1).await.unwrap(), Claim::Held);
        assert_eq!(lease.holder().await.unwrap().as_deref(), Some("newer"));
    }

    #[tokio::test]
    async fn an_unheld_lease_is_retaken_unless_the_fragment_is_fresh() {
        let (store, keys, route) = setup().await;
        let lease = Lease::new(&store, &keys, &route);
        // Nobody holds it and nothing is built (a warming request, or a lease that
        // expired with nobody asking again): the request takes it.
        assert_eq!(lease.claim("warm", 1).await.unwrap(), Claim::Held);
        assert_eq!(lease.holder().await.unwrap().as_deref(), Some("warm"));
        lease.release().await.unwrap();
        // A stale copy does not stop a build…
        let stale = Envelope::ready(
            bytes::Bytes::from_static(b"x"),
            "text/html".into(),
            Duration::ZERO,
            Duration::from_secs(60),
            1,
            1,
        );
        store
            .set(&keys.envelope, &stale.encode(), Duration::from_secs(60))
            .await
            .unwrap();
        assert_eq!(lease.claim("refresh", 1).await.unwrap(), Claim::Held);
        lease.release().await.unwrap();
        // …a fresh one does: someone built it while the request waited.
        let fresh = Envelope::ready(
            bytes::Bytes::from_static(b"x"),
            "text/html".into(),
            Duration::from_secs(60),
            Duration::from_secs(60),
            1,
            1,
        );
        store
            .set(&keys.envelope, &fresh.encode(), Duration::from_secs(60))
            .await
            .unwrap();
        assert_eq!(lease.claim("late", 1).await.unwrap(), Claim::AlreadyBuilt);
        assert_eq!(lease.holder().await.unwrap(), None, "nothing taken");
    }

    #[tokio::test]
    async fn a_fresh_fragment_retired_by_a_tag_purge_is_built_again() {
        let (store, keys, route) = setup().await;
        let lease = Lease::new(&store, &keys, &route);
        let fresh = Envelope::ready(
            bytes::Bytes::from_static(b"x"),
            "text/html".into(),
            Duration::from_secs(60),
            Duration::from_secs(60),
            1,
            1,
        )
        .with_tags(vec!["p-1".into()], now_ms() - 1);
        store
            .set(&keys.envelope, &fresh.encode(), Duration::from_secs(60))
            .await
            .unwrap();
        assert_eq!(lease.claim("late", 1).await.unwrap(), Claim::AlreadyBuilt);
        let tag = crate::tags::Tag::new("p-1").unwrap();
        crate::tags::purge(&store, &keys.keyspace(), &tag)
            .await
            .unwrap();
        assert_eq!(lease.claim("after-purge", 1).await.unwrap(), Claim::Held);
    }

    #[tokio::test]
    async fn the_winner_sees_an_envelope_stored_before_its_lease() {
        let (store, keys, route) = setup().await;
        let lease = Lease::new(&store, &keys, &route);
        // A worker stored its result and released its lease after this caller's lookup.
        lease.acquire("worker").await.unwrap().unwrap();
        lease
            .finish(b"built", Duration::from_secs(60))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(lease.holder().await.unwrap(), None, "finish releases");
        let won = lease.acquire("late").await.unwrap().expect("free again");
        assert_eq!(won.envelope.as_deref(), Some(&b"built"[..]));
    }

    #[tokio::test]
    async fn a_request_of_a_generation_since_purged_is_dropped() {
        let (store, keys, route) = setup().await;
        let lease = Lease::new(&store, &keys, &route);
        lease.acquire("old").await.unwrap().unwrap();
        crate::store::bump_generation(&store, &Keyspace::new("t").generation("recs"))
            .await
            .unwrap();
        assert_eq!(lease.claim("old", 1).await.unwrap(), Claim::Purged);
        assert_eq!(lease.claim("old", 2).await.unwrap(), Claim::Held);
        // A generation the store lost starts over at the current time: older than it.
        store
            .delete(&Keyspace::new("t").generation("recs"))
            .await
            .unwrap();
        assert_eq!(lease.claim("old", 2).await.unwrap(), Claim::Purged);
    }

    /// Three servers, and the keys of one fragment of route `recs` in generation 1.
    async fn servers() -> (Vec<std::sync::Arc<dyn Store>>, FragmentKeys, FragmentRoute) {
        let servers = vec![fake::server(), fake::server(), fake::server()];
        let keyspace = Keyspace::new("t");
        let all = View::new(&servers, &[]);
        crate::store::Register::of(&all, &keyspace.generation("recs"))
            .raise(1)
            .await
            .unwrap();
        let keys = keyspace.fragment(&identity(vec![]), 1);
        (servers, keys, FragmentRoute::new("recs", "/render/recs"))
    }

    #[tokio::test]
    async fn a_lease_has_one_holder_while_views_disagree_about_a_server() {
        let (servers, keys, route) = servers().await;
        let all = View::new(&servers, &[]);
        let without_first = View::new(&servers, &[0]);
        let lease = |view| Lease::new(view, &keys, &route);
        assert!(lease(&all).acquire("r").await.unwrap().is_some());
        // A process that judged the first server out takes the second and third copies:
        // the second is held.
        assert_eq!(lease(&without_first).acquire("q").await.unwrap(), None);
        // Its worker may build the request that holds the lease; the copy it found
        // empty is filled.
        assert_eq!(
            lease(&without_first).claim("r", 1).await.unwrap(),
            Claim::Held
        );
        assert_eq!(
            lease(&without_first).claim("q", 1).await.unwrap(),
            Claim::Superseded
        );
        assert!(servers[2].get(&lease(&all).key).await.unwrap().is_some());
        // The first server comes back empty (flushed): the lease is still held.
        let back = vec![fake::server(), servers[1].clone(), servers[2].clone()];
        let after = View::new(&back, &[]);
        assert_eq!(lease(&after).acquire("p").await.unwrap(), None);
        assert_eq!(lease(&after).holder().await.unwrap().as_deref(), Some("r"));
        assert_eq!(
            back[0].get(&lease(&all).key).await.unwrap(),
            None,
            "given back"
        );
        // Storing releases every copy, wherever the view put them.
        lease(&without_first)
            .finish(b"built", Duration::from_secs(60))
            .await
            .unwrap()
            .unwrap();
        for server in &back {
            assert_eq!(server.get(&lease(&all).key).await.unwrap(), None);
        }
        assert_eq!(
            back[1].get(&keys.envelope).await.unwrap().as_deref(),
            Some(&b"built"[..]),
            "the envelope lives on that view's first copy"
        );
        // Whoever takes the lease next reads it back from either copy.
        let won = lease(&after).acquire("next").await.unwrap().unwrap();
        assert_eq!(won.envelope.as_deref(), Some(&b"built"[..]));
    }

    #[tokio::test]
    async fn a_take_split_over_two_copies_is_given_back() {
        let (servers, keys, route) = servers().await;
        let all = View::new(&servers, &[]);
        let lease = Lease::new(&all, &keys, &route);
        // Another view's request holds the second copy only.
        servers[1]
            .set(&lease.key, b"q", Duration::from_secs(30))
            .await
            .unwrap();
        assert_eq!(lease.acquire("r").await.unwrap(), None);
        assert_eq!(
            servers[0].get(&lease.key).await.unwrap(),
            None,
            "the first copy was given back"
        );
    }

    #[tokio::test]
    async fn two_requests_on_two_copies_both_step_aside() {
        tokio::time::pause();
        let (servers, keys, route) = servers().await;
        let all = View::new(&servers, &[]);
        let lease = Lease::new(&all, &keys, &route);
        servers[0]
            .set(&lease.key, b"r", Duration::from_secs(30))
            .await
            .unwrap();
        servers[1]
            .set(&lease.key, b"q", Duration::from_secs(30))
            .await
            .unwrap();
        assert_eq!(lease.claim("r", 1).await.unwrap(), Claim::Superseded);
        assert_eq!(lease.claim("q", 1).await.unwrap(), Claim::Superseded);
        assert_eq!(lease.holder().await.unwrap(), None);
        // One copy given back meanwhile (the loser of a split take): the other builds.
        servers[0].delete(&lease.key).await.unwrap();
        assert_eq!(lease.claim("q", 1).await.unwrap(), Claim::Held);
    }

    /// A server that fails every call, and is judged out at its first failure.
    #[derive(Debug)]
    struct Failing(Arc<AtomicBool>);

    impl Failing {
        fn fail<T>(&self) -> Result<T, StoreError> {
            self.0.store(true, Ordering::SeqCst);
            Err(StoreError::Unavailable(crate::Cause::new("no answer")))
        }
    }

    #[async_trait]
    impl Store for Failing {
        async fn get(&self, _: &StoreKey) -> Result<Option<Bytes>, StoreError> {
            self.fail()
        }
        async fn get_many(&self, _: &[StoreKey]) -> Result<HashMap<StoreKey, Bytes>, StoreError> {
            self.fail()
        }
        async fn add(&self, _: &StoreKey, _: &[u8], _: Duration) -> Result<bool, StoreError> {
            self.fail()
        }
        async fn set(&self, _: &StoreKey, _: &[u8], _: Duration) -> Result<(), StoreError> {
            self.fail()
        }
        async fn delete(&self, _: &StoreKey) -> Result<bool, StoreError> {
            self.fail()
        }
        async fn incr(&self, _: &StoreKey, _: u64) -> Result<Option<u64>, StoreError> {
            self.fail()
        }
        async fn ping(&self) -> Result<(), StoreError> {
            self.fail()
        }
    }

    /// A view of three servers that leaves the first out once it is judged out.
    #[derive(Debug)]
    struct Judging {
        all: View,
        without_first: View,
        out: Arc<AtomicBool>,
    }

    impl Judging {
        fn now(&self) -> &View {
            if self.out.load(Ordering::SeqCst) {
                &self.without_first
            } else {
                &self.all
            }
        }
    }

    #[async_trait]
    impl Store for Judging {
        async fn get(&self, key: &StoreKey) -> Result<Option<Bytes>, StoreError> {
            self.now().get(key).await
        }
        async fn get_many(&self, k: &[StoreKey]) -> Result<HashMap<StoreKey, Bytes>, StoreError> {
            self.now().get_many(k).await
        }
        async fn add(&self, key: &StoreKey, v: &[u8], ttl: Duration) -> Result<bool, StoreError> {
            self.now().add(key, v, ttl).await
        }
        async fn set(&self, key: &StoreKey, v: &[u8], ttl: Duration) -> Result<(), StoreError> {
            self.now().set(key, v, ttl).await
        }
        async fn delete(&self, key: &StoreKey) -> Result<bool, StoreError> {
            self.now().delete(key).await
        }
        async fn incr(&self, key: &StoreKey, delta: u64) -> Result<Option<u64>, StoreError> {
            self.now().incr(key, delta).await
        }
        async fn ping(&self) -> Result<(), StoreError> {
            self.now().ping().await
        }
        fn copies(&self, key: &StoreKey) -> Option<Vec<&dyn Store>> {
            self.now().copies(key)
        }
    }

    #[tokio::test]
    async fn a_build_whose_first_copy_fails_as_it_is_stored_is_stored_on_the_next() {
        let (servers, keys, route) = servers().await;
        let out = Arc::new(AtomicBool::new(false));
        let servers = vec![
            Arc::new(Failing(out.clone())) as Arc<dyn Store>,
            servers[1].clone(),
            servers[2].clone(),
        ];
        let view = Judging {
            all: View::new(&servers, &[]),
            without_first: View::new(&servers, &[0]),
            out,
        };
        let lease = Lease::new(&view, &keys, &route);
        // Taken while the first server answered; it stops answering during the render.
        servers[1]
            .set(&lease.key, b"r", Duration::from_secs(30))
            .await
            .unwrap();
        lease
            .finish(b"built", Duration::from_secs(60))
            .await
            .expect("stored on the server that is first now")
            .unwrap();
        assert_eq!(
            servers[1].get(&keys.envelope).await.unwrap().as_deref(),
            Some(&b"built"[..])
        );
        assert_eq!(lease.holder().await.unwrap(), None, "given back");
    }

    #[tokio::test]
    async fn a_copy_that_does_not_answer_neither_blocks_nor_doubles_a_lease() {
        let (servers, keys, route) = servers().await;
        let hung: std::sync::Arc<dyn Store> = std::sync::Arc::new(fake::Unreachable);
        // The second server hangs, and this view has not judged it out yet.
        let unaware = View::new(&[servers[0].clone(), hung, servers[2].clone()], &[]);
        let aware = View::new(&servers, &[1]);
        assert!(
            Lease::new(&unaware, &keys, &route)
                .acquire("r")
                .await
                .unwrap()
                .is_some()
        );
        assert_eq!(
            Lease::new(&aware, &keys, &route)
                .acquire("q")
                .await
                .unwrap(),
            None,
            "the first server, shared by both views, decides"
        );
        assert_eq!(
            Lease::new(&unaware, &keys, &route)
                .claim("r", 1)
                .await
                .unwrap(),
            Claim::Held
        );
    }
}
