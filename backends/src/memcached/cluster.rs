//! The servers of one store and every call's way to them: placement, the deadline of each
//! exchange, what a failure says about its server, and the bookkeeping of writes sent
//! elsewhere in place of a server judged down (see the store's module docs, "Failover").

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use memcache::exp::{Error as McError, MetaCommand};
use tessera_protocol::key::StoreKey;
use tessera_protocol::store::{Register, Store, StoreError};
use tessera_protocol::time::now_ms;
use tessera_protocol::{Cause, Keyspace};

use super::Pinned;
use super::commands::classify;
use super::health::{Failure, Health};
use super::pipeline::{Answers, Reply, Server};
use super::placement::{first, first_two, fnv1a64, key_hash, ranked_before};

/// Each command's own answer.
pub(super) type Replies = Vec<Result<Reply, McError>>;

/// Where a call's keys go.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Place {
    /// Each key to its home: the first server of its order that is up.
    Home,
    /// Every key to this server: a copy of a key kept twice.
    Copy(usize),
    /// Every key to this server, for the store's own bookkeeping (never journaled).
    Own(usize),
}

/// The servers of one store, as one process sees them.
pub(super) struct Cluster {
    servers: Vec<Server>,
    /// FNV-1a of each server's `host:port`: its identity in placement.
    hashes: Vec<u64>,
    pub(super) health: Health,
    timeout: Duration,
    pub(super) max_item_size: usize,
    pub(super) flush_on_return: bool,
    /// Calls that failed on their connection (each failed it; the next call dials anew).
    resets: AtomicU64,
    /// Each server's count of writes it missed (kept on other servers).
    missed: Vec<StoreKey>,
    /// What a server holds for itself: the count it was last emptied for.
    pub(super) emptied_for: StoreKey,
}

impl std::fmt::Debug for Cluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cluster")
            .field("servers", &self.health.states())
            .finish_non_exhaustive()
    }
}

impl Cluster {
    /// `servers` (`host`, `port`), not dialed yet.
    pub(super) fn new(
        servers: Vec<(String, u16)>,
        timeout: Duration,
        max_item_size: usize,
        failover: &super::Failover,
    ) -> Self {
        let names: Vec<String> = servers.iter().map(|(h, p)| format!("{h}:{p}")).collect();
        let hashes: Vec<u64> = names.iter().map(|n| fnv1a64(n.as_bytes())).collect();
        let keys = Keyspace::new(&failover.namespace);
        Self {
            missed: hashes.iter().map(|&h| keys.missed_writes(h)).collect(),
            emptied_for: keys.emptied_for(),
            health: Health::new(&names, failover.eject_after, failover.probe_interval),
            servers: servers
                .into_iter()
                .map(|(host, port)| Server::new(host, port, timeout))
                .collect(),
            hashes,
            timeout,
            max_item_size,
            flush_on_return: failover.flush_on_return,
            resets: AtomicU64::new(0),
        }
    }

    pub(super) fn len(&self) -> usize {
        self.servers.len()
    }

    pub(super) fn resets(&self) -> u64 {
        self.resets.load(Ordering::Relaxed)
    }

    /// The home of `key`: the first server of its order that is up.
    fn home(&self, key: &StoreKey) -> Result<usize, StoreError> {
        if self.servers.len() == 1 {
            return Ok(0);
        }
        let hash = key_hash(key.as_str().as_bytes());
        let found = if self.health.any_down() {
            first(hash, &self.hashes, |s| !self.health.is_down(s))
        } else {
            first(hash, &self.hashes, |_| true)
        };
        found.ok_or_else(|| self.all_down())
    }

    /// Whether `a` and `b` have one home now.
    pub(super) fn same_home(&self, a: &StoreKey, b: &StoreKey) -> bool {
        self.servers.len() == 1 || self.home(a).ok() == self.home(b).ok()
    }

    /// The servers holding `key`'s two copies now, first copy first; the servers of its
    /// first two that are down are journaled (whatever is done with the copies may be a
    /// write they miss). `None` for one server.
    pub(super) fn copies(&self, key: &StoreKey) -> Option<Vec<usize>> {
        if self.servers.len() == 1 {
            return None;
        }
        let hash = key_hash(key.as_str().as_bytes());
        if !self.health.any_down() {
            return Some(
                first_two(hash, &self.hashes, |_| true)
                    .into_iter()
                    .flatten()
                    .collect(),
            );
        }
        for server in first_two(hash, &self.hashes, |_| true)
            .into_iter()
            .flatten()
        {
            if self.health.is_down(server) {
                self.health.journal(server, key, false);
            }
        }
        let up = first_two(hash, &self.hashes, |s| !self.health.is_down(s));
        Some(up.into_iter().flatten().collect())
    }

    /// Runs `commands` at `place`: one pipelined exchange per server, each server's
    /// commands in their order, each exchange bounded by the timeout. Each command's own
    /// answer, or the error that failed them all. A `write` made while a server is down
    /// is first noted in that server's journal (and its mark raised).
    pub(super) async fn run(
        self: &Arc<Self>,
        place: Place,
        commands: Vec<(&StoreKey, MetaCommand)>,
        write: bool,
    ) -> Result<Replies, StoreError> {
        let all = || commands.iter().map(|(_, c)| c);
        match place {
            Place::Own(server) => self.exchange_on(server, all()).await,
            Place::Copy(server) => {
                if write && self.health.any_down() {
                    for (key, _) in &commands {
                        self.note_copy_write(server, key).await?;
                    }
                }
                self.exchange_on(server, all()).await
            }
            Place::Home if self.servers.len() == 1 => self.exchange_on(0, all()).await,
            Place::Home => {
                let epoch = self.health.epoch();
                match self.run_home(&commands, write).await {
                    // The failure judged a server down: its keys have a new home now,
                    // where the call goes once more (a write the failed server may
                    // still apply is wiped from it before it is used again).
                    Err(StoreError::Unavailable(_)) if self.health.epoch() != epoch => {
                        self.run_home(&commands, write).await
                    }
                    other => other,
                }
            }
        }
    }

    /// [`run`](Self::run) with each key at its home.
    async fn run_home(
        self: &Arc<Self>,
        commands: &[(&StoreKey, MetaCommand)],
        write: bool,
    ) -> Result<Replies, StoreError> {
        let placed = if write && self.health.any_down() {
            self.place_writes(commands).await?
        } else {
            commands
                .iter()
                .map(|(k, _)| self.home(k))
                .collect::<Result<Vec<_>, _>>()?
        };
        let first = placed.first().copied().unwrap_or(0);
        if placed.iter().all(|&s| s == first) {
            // All on one server (a pair, a single key): one exchange, answers in order.
            return self
                .exchange_on(first, commands.iter().map(|(_, c)| c))
                .await;
        }
        let mut groups: Vec<Vec<usize>> = vec![Vec::new(); self.servers.len()];
        for (n, &server) in placed.iter().enumerate() {
            groups[server].push(n);
        }
        let exchanges = groups
            .iter()
            .enumerate()
            .filter(|(_, group)| !group.is_empty())
            .map(|(server, group)| async move {
                let answers = self
                    .exchange_on(server, group.iter().map(|&n| &commands[n].1))
                    .await?;
                Ok::<_, StoreError>(group.iter().copied().zip(answers))
            });
        let mut answers: Vec<Option<Result<Reply, McError>>> =
            commands.iter().map(|_| None).collect();
        for exchanged in futures_util::future::join_all(exchanges).await {
            for (n, answer) in exchanged? {
                answers[n] = Some(answer);
            }
        }
        answers
            .into_iter()
            .map(|a| {
                a.ok_or_else(|| StoreError::Protocol("memcached: an answer is missing".into()))
            })
            .collect()
    }

    /// The homes of written keys while a server is down, each server skipped for a key
    /// (so missing the write) journaled first. Placed again when a server changed state
    /// meanwhile.
    async fn place_writes(
        self: &Arc<Self>,
        commands: &[(&StoreKey, MetaCommand)],
    ) -> Result<Vec<usize>, StoreError> {
        for _ in 0..3 {
            let epoch = self.health.epoch();
            let placed = commands
                .iter()
                .map(|(k, _)| self.home(k))
                .collect::<Result<Vec<_>, _>>()?;
            let mut settled = true;
            for ((key, _), &home) in commands.iter().zip(&placed) {
                let hash = key_hash(key.as_str().as_bytes());
                for skipped in ranked_before(hash, &self.hashes, home) {
                    settled &= self.note_missed(skipped, key).await?;
                }
            }
            if settled && self.health.epoch() == epoch {
                return Ok(placed);
            }
        }
        Err(StoreError::Unavailable(Cause::new(
            "memcached servers keep changing state",
        )))
    }

    /// A write of `key` to its copy on `server`: the servers of its first two that are
    /// down miss it.
    async fn note_copy_write(
        self: &Arc<Self>,
        server: usize,
        key: &StoreKey,
    ) -> Result<(), StoreError> {
        let hash = key_hash(key.as_str().as_bytes());
        for other in first_two(hash, &self.hashes, |_| true)
            .into_iter()
            .flatten()
        {
            if other != server && self.health.is_down(other) {
                self.note_missed(other, key).await?;
            }
        }
        Ok(())
    }

    /// A write of `key` goes elsewhere in place of `server`: its count of missed writes
    /// is raised once per episode (before the first such write, so that a process that
    /// dies after it still leaves the mark), and the key journaled. False when `server`
    /// is up again.
    async fn note_missed(
        self: &Arc<Self>,
        server: usize,
        key: &StoreKey,
    ) -> Result<bool, StoreError> {
        if self.health.needs_mark(server) {
            let _turn = self.health.marking(server).lock().await;
            if self.health.needs_mark(server) {
                self.mark_missed(server).await?;
                self.health.marked(server);
            }
        }
        Ok(self.health.journal(server, key, true))
    }

    /// Raises `server`'s count of missed writes (kept on the first two other servers
    /// up); the new count.
    pub(super) async fn mark_missed(self: &Arc<Self>, server: usize) -> Result<u64, StoreError> {
        let copies = self.missed_copies(server);
        let copies: Vec<&dyn Store> = copies.iter().map(|c| c as &dyn Store).collect();
        Register::on(copies, &self.missed[server])
            .bump(now_ms)
            .await
    }

    /// `server`'s count of missed writes, 0 when none was ever marked.
    pub(super) async fn missed_count(self: &Arc<Self>, server: usize) -> Result<u64, StoreError> {
        let copies = self.missed_copies(server);
        let copies: Vec<&dyn Store> = copies.iter().map(|c| c as &dyn Store).collect();
        Ok(Register::on(copies, &self.missed[server])
            .read()
            .await?
            .unwrap_or(0))
    }

    /// Where `server`'s count of missed writes is kept: the first two other servers up
    /// in its key's order.
    fn missed_copies(self: &Arc<Self>, server: usize) -> Vec<Pinned> {
        let hash = key_hash(self.missed[server].as_str().as_bytes());
        first_two(hash, &self.hashes, |s| {
            s != server && !self.health.is_down(s)
        })
        .into_iter()
        .flatten()
        .map(|s| Pinned::new(self.clone(), Place::Own(s)))
        .collect()
    }

    /// `commands` as one exchange on `server`, unless it is down (then at once
    /// `Unavailable`: no call waits on a server judged down).
    async fn exchange_on<'c>(
        &self,
        server: usize,
        commands: impl ExactSizeIterator<Item = &'c MetaCommand>,
    ) -> Result<Replies, StoreError> {
        if self.health.is_down(server) {
            return Err(StoreError::Unavailable(Cause::new(format!(
                "memcached {} is judged down (retried in the background)",
                self.health.name(server)
            ))));
        }
        self.attempt(server, commands).await
    }

    /// `commands` as one exchange on `server`, down or not, bounded by the timeout; what
    /// the outcome says about the server is recorded.
    pub(super) async fn attempt<'c>(
        &self,
        server: usize,
        commands: impl ExactSizeIterator<Item = &'c MetaCommand>,
    ) -> Result<Replies, StoreError> {
        let count = commands.len();
        // Room for the usual command (a key and a few flags) without growing; a set's
        // value grows it once.
        let mut payload = Vec::with_capacity(count * 128);
        for command in commands {
            command.encode_into(&mut payload).map_err(classify)?;
        }
        self.send(server, payload, count).await
    }

    /// An encoded exchange of `count` commands on `server`, down or not, bounded by the
    /// timeout.
    pub(super) async fn send(
        &self,
        server: usize,
        payload: Vec<u8>,
        count: usize,
    ) -> Result<Replies, StoreError> {
        let exchange = self.servers[server].exchange(payload, count);
        match tokio::time::timeout(self.timeout, exchange).await {
            Err(_) => {
                let why = format!(
                    "memcached {} did not answer within {:?}",
                    self.health.name(server),
                    self.timeout
                );
                self.failed(server, Failure::Hard, &why);
                Err(StoreError::Unavailable(why.into()))
            }
            Ok(answers) => self.judge(server, answers),
        }
    }

    /// What an exchange's outcome says about `server`.
    fn judge(&self, server: usize, answers: Answers) -> Result<Replies, StoreError> {
        match answers {
            Ok(answers) => {
                self.health.answered(server);
                Ok(answers)
            }
            Err(McError::Io(e)) => {
                let failure = match e.kind() {
                    std::io::ErrorKind::TimedOut | std::io::ErrorKind::ConnectionRefused => {
                        Failure::Hard
                    }
                    _ => Failure::Counted,
                };
                self.failed(server, failure, &e.to_string());
                Err(StoreError::Unavailable(Cause::context(
                    format!("memcached {}", self.health.name(server)),
                    e,
                )))
            }
            Err(other) => Err(classify(other)),
        }
    }

    fn failed(&self, server: usize, failure: Failure, why: &str) {
        self.resets.fetch_add(1, Ordering::Relaxed);
        self.health.failed(server, failure, why);
    }

    /// No server is up.
    fn all_down(&self) -> StoreError {
        StoreError::Unavailable(Cause::new(
            "every memcached server is judged down (retried in the background)",
        ))
    }

    /// A `mn` to every server that is up, at once: fine when one is and all answered.
    pub(super) async fn ping(&self) -> Result<(), StoreError> {
        let noop = memcache::exp::build_noop();
        let up: Vec<usize> = (0..self.servers.len())
            .filter(|&s| !self.health.is_down(s))
            .collect();
        if up.is_empty() {
            return Err(self.all_down());
        }
        let pings = up
            .iter()
            .map(|&s| self.exchange_on(s, std::iter::once(&noop)));
        for answers in futures_util::future::join_all(pings).await {
            match answers?.pop() {
                Some(Ok(r)) if r.rc == memcache::exp::ReturnCode::Mn => {}
                Some(Ok(r)) => return Err(super::commands::unexpected(&r)),
                Some(Err(e)) => return Err(classify(e)),
                None => return Err(StoreError::Protocol("memcached: no answer to mn".into())),
            }
        }
        Ok(())
    }
}
