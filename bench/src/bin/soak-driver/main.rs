//! The load of the soak and memory benchmarks (`bench/soak.sh`, `bench/memory.sh`).
//!
//! `soak-driver soak GATEWAY ADMIN UPSTREAM SECONDS FAULTS`: for SECONDS, at bounded
//! rates, hits on 50 warm fragments, cold misses (a new key each), long-polls
//! (`Prefer: wait=10`), ESI pages (each including a new fragment and a warm one) and
//! purges (admin API) followed by a read. Then it waits for the builds to drain and
//! compares what was asked with what the upstream (`soak-upstream`) rendered:
//! - lost builds: keys the gateway accepted (202 or 200; for an ESI page, the long-poll
//!   of its placeholder that follows, as in client.js) that were never rendered;
//!   A key accepted around a memcached restart (from a lease's life before it went down
//!   to `cache.ttl` after it came back) may be dropped as obsolete: the restart started
//!   a new route generation, as a purge does. Such a key is polled once more after the
//!   drain, as client.js would, and counts as lost only if that does not build it.
//!   Each lost key is printed with when its request was sent and when the gateway
//!   answered that it queued it (Unix ms), beside the faults: `lost esi?id=N: sent
//!   S, accepted (202) A; memcached-down +MS …`.
//! - doubled builds: keys rendered more than once, except re-renders a fault in FAULTS
//!   explains (a worker killed while the key was building, a memcached restart between
//!   the renders). The purge route is left out: a purge asks for a rebuild.
//!
//! `soak-driver burst GATEWAY KEYS CONCURRENCY [FIRST]`: builds KEYS distinct fragments
//! (`/fragments/burst?id=N`, N from FIRST, default 0, long-polled) with CONCURRENCY
//! requests in flight.
//!
//! FAULTS has one line per fault: `KIND UNIX_MS` (`worker-killed`, `memcached-down`,
//! `memcached-up`, …).
//!
//! `soak-driver chaos …`: the same load on several gateways, in phases, for
//! `bench/chaos.sh` (see [`chaos`]).

mod chaos;

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use tokio::time::MissedTickBehavior;

type Counts = Arc<Mutex<BTreeMap<(&'static str, u16), u64>>>;

/// A build the gateway accepted: a 202 (queued, or pending) or a 200 (built) for `key`.
#[derive(Debug, Clone)]
struct Accepted {
    /// `route?id=N`.
    key: String,
    /// When the request was sent (Unix ms); for an ESI include, when its page was.
    sent: u64,
    /// When the gateway answered (Unix ms): after a long-poll, up to `max_wait` later.
    at: u64,
    status: u16,
}

/// One answer, as the chaos benchmark sorts them into phases.
#[derive(Debug, Clone, Copy)]
struct Answer {
    kind: &'static str,
    status: u16,
    /// When its request was sent (Unix ms).
    sent: u64,
    /// From sending to the answer's end (ms).
    took: u64,
    /// For a fragment answered 200: when the upstream rendered it (Unix ms).
    rendered: Option<u64>,
    /// The fragment's `id` parameter, or the purged id.
    id: u64,
}

/// Request periods, one loop each (two of hits and of long-polls).
#[derive(Debug, Clone, Copy)]
struct Rates {
    hit: Duration,
    cold: Duration,
    poll: Duration,
    esi: Duration,
    purge: Duration,
    /// Reads of the purged fragments without waiting (chaos only: stale answers).
    purged_read: Option<Duration>,
}

/// The soak's rates: about 1,000 hits, 50 cold misses, 40 long-polls, 10 pages and 2
/// purges a second.
const SOAK_RATES: Rates = Rates {
    hit: Duration::from_millis(2),
    cold: Duration::from_millis(20),
    poll: Duration::from_millis(50),
    esi: Duration::from_millis(100),
    purge: Duration::from_millis(500),
    purged_read: None,
};

/// What every load task shares.
#[derive(Debug, Clone)]
struct Load {
    client: reqwest::Client,
    /// Requests go to each in turn.
    gateways: Arc<[String]>,
    turn: Arc<AtomicU64>,
    admin: String,
    until: Instant,
    /// Set to end the load before `until`.
    stop: Arc<AtomicBool>,
    rates: Rates,
    /// Status answers by kind of request; 0 for a transport error.
    counts: Counts,
    /// Every answer, in order.
    answers: Arc<Mutex<Vec<Answer>>>,
    /// Builds the gateway accepted.
    accepted: Arc<Mutex<Vec<Accepted>>>,
    next_id: Arc<AtomicU64>,
}

impl Load {
    fn new(client: reqwest::Client, gateways: Vec<String>, admin: String, until: Instant) -> Self {
        Self {
            client,
            gateways: gateways.into(),
            turn: Arc::default(),
            admin,
            until,
            stop: Arc::default(),
            rates: SOAK_RATES,
            counts: Counts::default(),
            answers: Arc::default(),
            accepted: Arc::default(),
            next_id: Arc::default(),
        }
    }

    async fn get(&self, kind: &'static str, path: &str, wait: Option<u32>) -> u16 {
        self.read(kind, path, wait).await.0
    }

    /// GETs `path` from the next gateway: the status, and for a 200 when the upstream
    /// rendered it (from the body `soak-upstream` writes).
    async fn read(&self, kind: &'static str, path: &str, wait: Option<u32>) -> (u16, Option<u64>) {
        let n = self.turn.fetch_add(1, Ordering::Relaxed) as usize;
        let gateway = &self.gateways[n % self.gateways.len()];
        let mut req = self.client.get(format!("{gateway}{path}"));
        if let Some(w) = wait {
            req = req.header("prefer", format!("wait={w}"));
        }
        let sent = now_ms();
        let (status, rendered) = match req.send().await {
            Ok(r) => {
                let status = r.status().as_u16();
                match r.bytes().await {
                    Ok(body) if status == 200 => (status, rendered_at(&body)),
                    Ok(_) => (status, None),
                    Err(_) => (0, None),
                }
            }
            Err(_) => (0, None),
        };
        self.count(kind, status);
        let id = path.rsplit_once("id=").and_then(|(_, n)| n.parse().ok());
        self.answer(kind, status, sent, rendered, id.unwrap_or(0));
        (status, rendered)
    }

    fn answer(&self, kind: &'static str, status: u16, sent: u64, rendered: Option<u64>, id: u64) {
        let took = now_ms().saturating_sub(sent);
        lock(&self.answers).push(Answer {
            kind,
            status,
            sent,
            took,
            rendered,
            id,
        });
    }

    fn stopped(&self) -> bool {
        self.stop.load(Ordering::Relaxed) || Instant::now() >= self.until
    }

    fn count(&self, kind: &'static str, status: u16) {
        *lock(&self.counts).entry((kind, status)).or_default() += 1;
    }

    fn accept(&self, key: String, sent: u64, status: u16) {
        let at = now_ms();
        lock(&self.accepted).push(Accepted {
            key,
            sent,
            at,
            status,
        });
    }

    /// Runs `step` every `period` until the load ends.
    async fn every<F, Fut>(&self, period: Duration, mut step: F)
    where
        F: FnMut(u64) -> Fut,
        Fut: std::future::Future<Output = ()>,
    {
        let mut tick = tokio::time::interval(period);
        tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
        while !self.stopped() {
            tick.tick().await;
            step(self.next_id.fetch_add(1, Ordering::Relaxed)).await;
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// The render time `soak-upstream` writes into a fragment (`rendered MS`).
fn rendered_at(body: &[u8]) -> Option<u64> {
    let at = body.windows(9).position(|w| w == b"rendered ")? + 9;
    let digits = body[at..].iter().take_while(|b| b.is_ascii_digit()).count();
    std::str::from_utf8(&body[at..at + digits])
        .ok()?
        .parse()
        .ok()
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// Every kind of request, each in its own loop at its own rate.
async fn run_load(load: &Load) {
    let rates = load.rates;
    let hits = |offset: u64| {
        let load = load.clone();
        async move {
            load.every(rates.hit, |n| {
                let load = load.clone();
                async move {
                    let path = format!("/fragments/hot?id={}", (n + offset) % 50);
                    load.get("hit", &path, None).await;
                }
            })
            .await;
        }
    };
    let cold = load.every(rates.cold, |n| async move {
        let path = format!("/fragments/cold?id={n}");
        let sent = now_ms();
        let status = load.get("cold", &path, None).await;
        if matches!(status, 200 | 202) {
            load.accept(format!("cold?id={n}"), sent, status);
        }
    });
    let poll = |_: u64| {
        load.every(rates.poll, |n| async move {
            let path = format!("/fragments/poll?id={n}");
            let sent = now_ms();
            let status = load.get("long-poll", &path, Some(10)).await;
            if matches!(status, 200 | 202) {
                load.accept(format!("poll?id={n}"), sent, status);
            }
        })
    };
    let esi = load.every(rates.esi, |n| async move {
        // A page answers 200 even when its includes could not be queued (store down):
        // like client.js, long-poll the placeholder; either answer queues the build.
        let sent = now_ms();
        if load.get("esi-page", &format!("/page/{n}"), None).await == 200 {
            let path = format!("/fragments/esi?id={n}");
            let status = load.get("esi-fill", &path, Some(10)).await;
            if matches!(status, 200 | 202) {
                load.accept(format!("esi?id={n}"), sent, status);
            }
        }
    });
    tokio::join!(hits(0), hits(25), cold, poll(0), poll(1), esi, purges(load));
}

/// Purges of 20 fragments in turn (admin API), each followed by a read that waits for
/// the rebuild; in chaos runs, also reads of those fragments that do not wait.
async fn purges(load: &Load) {
    let purge = load.every(load.rates.purge, |n| async move {
        let url = format!("{}/fragments/purge?id={}", load.admin, n % 20);
        let sent = now_ms();
        let status = match load.client.delete(url).send().await {
            Ok(r) => r.status().as_u16(),
            Err(_) => 0,
        };
        load.count("purge", status);
        load.answer("purge", status, sent, None, n % 20);
        let path = format!("/fragments/purge?id={}", n % 20);
        load.get("read-after-purge", &path, Some(5)).await;
    });
    let reads = async {
        if let Some(period) = load.rates.purged_read {
            load.every(period, |n| async move {
                let path = format!("/fragments/purge?id={}", n % 20);
                load.get("purged-read", &path, None).await;
            })
            .await;
        }
    };
    tokio::join!(purge, reads);
}

/// Renders by key, as `soak-upstream` reports them.
async fn renders(client: &reqwest::Client, upstream: &str) -> HashMap<String, Vec<u64>> {
    let text = match client.get(format!("{upstream}/_renders")).send().await {
        Ok(r) => r.text().await.unwrap_or_default(),
        Err(_) => String::new(),
    };
    text.lines()
        .filter_map(|line| {
            let mut parts = line.split('\t');
            let key = parts.next()?.to_string();
            let times = parts.nth(1)?.split(',').filter_map(|t| t.parse().ok());
            Some((key, times.collect()))
        })
        .collect()
}

/// Waits until no render happened for 5 s (at most 90 s): the queue has drained.
async fn drain(client: &reqwest::Client, upstream: &str) -> HashMap<String, Vec<u64>> {
    let started = Instant::now();
    let mut last = (0, Instant::now());
    loop {
        let r = renders(client, upstream).await;
        let total: usize = r.values().map(Vec::len).sum();
        if total != last.0 {
            last = (total, Instant::now());
        }
        if last.1.elapsed() >= Duration::from_secs(5) || started.elapsed() > Duration::from_secs(90)
        {
            return r;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// Whether a fault explains rendering a key again at `next` after `prev`: a worker was
/// killed within 5 s after `prev` (the first render died with it), or memcached went
/// down or came back in between (the stored fragment, or the write of it, was lost).
fn explained(faults: &[(String, u64)], prev: u64, next: u64) -> bool {
    faults.iter().any(|(kind, at)| {
        // A worker fault is recorded just before the signal is sent, so a render that
        // began in between was still cut off by it.
        let killed = kind.starts_with("worker") && *at + SIGNAL_MS >= prev && *at <= prev + 5_000;
        let store = kind.starts_with("memcached") && *at >= prev && *at <= next;
        killed || store
    })
}

fn read_faults(path: &str) -> Vec<(String, u64)> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| {
            let (kind, at) = l.split_once(' ')?;
            Some((kind.to_string(), at.trim().parse().ok()?))
        })
        .collect()
}

/// Longest between a fault's record and its signal taking effect (soak.sh records the
/// fault, then runs `kill`).
const SIGNAL_MS: u64 = 500;

/// Longest a lease lives (`build_timeout` 5 s + 2 s), and `cache.ttl`, in the soak's
/// configuration: the window around a memcached restart in which a request may be
/// accepted under the generation the restart made obsolete.
const LEASE_MS: u64 = 7_000;
const CACHE_TTL_MS: u64 = 2_000;

/// Whether a key accepted `at` was accepted around a memcached restart.
fn around_a_restart(faults: &[(String, u64)], at: u64) -> bool {
    let down = faults.iter().filter(|(k, _)| k == "memcached-down");
    down.zip(faults.iter().filter(|(k, _)| k == "memcached-up"))
        .any(|((_, d), (_, u))| at + LEASE_MS >= *d && at <= u + CACHE_TTL_MS + 1_000)
}

/// Accepted keys that were never rendered, after polling once more (as client.js would)
/// those accepted around a memcached restart: (lost, built on that poll).
async fn missing(
    load: &Load,
    upstream: &str,
    faults: &[(String, u64)],
) -> (Vec<Accepted>, Vec<Accepted>) {
    let accepted = lock(&load.accepted).clone();
    let renders = renders(&load.client, upstream).await;
    let unbuilt: Vec<Accepted> = accepted
        .into_iter()
        .filter(|a| !renders.contains_key(&a.key))
        .collect();
    let mut repolled = Vec::new();
    for a in &unbuilt {
        if around_a_restart(faults, a.at) {
            let path = format!("/fragments/{}", a.key);
            load.get("re-poll", &path, Some(10)).await;
            repolled.push(a.key.clone());
        }
    }
    let renders = drain(&load.client, upstream).await;
    unbuilt
        .into_iter()
        .partition(|a| !(repolled.contains(&a.key) && renders.contains_key(&a.key)))
}

/// `a` with when it was sent and accepted, and how far from each fault (ms, signed).
fn timed(a: &Accepted, faults: &[(String, u64)]) -> String {
    let offsets: Vec<String> = faults
        .iter()
        .map(|(kind, at)| format!("{kind} {:+}", i128::from(a.at) - i128::from(*at)))
        .collect();
    format!(
        "{}: sent {}, accepted ({}) {}; {}",
        a.key,
        a.sent,
        a.status,
        a.at,
        offsets.join(", ")
    )
}

/// Lost and doubled builds, printed; the doubled ones listed.
fn verdict(
    accepted: usize,
    (lost, repolled): (Vec<Accepted>, Vec<Accepted>),
    renders: &HashMap<String, Vec<u64>>,
    faults: &[(String, u64)],
) {
    let (mut doubled, mut after_fault) = (Vec::new(), 0);
    for (key, times) in renders.iter().filter(|(k, _)| !k.starts_with("purge?")) {
        let mut times = times.clone();
        times.sort_unstable();
        for pair in times.windows(2) {
            if explained(faults, pair[0], pair[1]) {
                after_fault += 1;
                // Explained only by the margin: say so, to check the margin against.
                let signalled = faults
                    .iter()
                    .filter(|(kind, at)| {
                        kind.starts_with("worker") && *at < pair[0] && pair[0] <= *at + SIGNAL_MS
                    })
                    .map(|(_, at)| *at)
                    .max();
                if let Some(at) = signalled {
                    println!(
                        "re-render of {key}: its first render began {} ms after a worker fault's record",
                        pair[0] - at
                    );
                }
            } else {
                // When it was rendered, to set beside the faults and the workers' logs.
                doubled.push(format!("{key} rendered at {} and {}", pair[0], pair[1]));
            }
        }
    }
    println!("accepted builds: {accepted}");
    println!("keys rendered: {}", renders.len());
    let keys =
        |v: &[Accepted]| -> Vec<String> { v.iter().take(10).map(|a| a.key.clone()).collect() };
    println!("lost builds: {} {:?}", lost.len(), keys(&lost));
    for a in lost.iter().take(10) {
        println!("  lost {}", timed(a, faults));
    }
    println!(
        "obsolete after a memcached restart, built on the next poll: {} {:?}",
        repolled.len(),
        keys(&repolled)
    );
    for a in repolled.iter().take(10) {
        println!("  re-polled {}", timed(a, faults));
    }
    println!(
        "doubled builds: {} {:?}",
        doubled.len(),
        &doubled[..doubled.len().min(10)]
    );
    println!("re-renders explained by a fault: {after_fault}");
    println!("faults: {faults:?}");
}

/// Builds the hit set first, so hits are hits.
async fn warm_up(load: &Load) {
    for id in 0..50 {
        let path = format!("/fragments/hot?id={id}");
        let sent = now_ms();
        let status = load.get("warm-up", &path, Some(10)).await;
        if matches!(status, 200 | 202) {
            load.accept(format!("hot?id={id}"), sent, status);
        }
    }
}

async fn soak(args: &[String]) -> anyhow::Result<()> {
    let [gateway, admin, upstream, seconds, faults] = args else {
        anyhow::bail!("usage: soak-driver soak GATEWAY ADMIN UPSTREAM SECONDS FAULTS");
    };
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .pool_max_idle_per_host(32)
        .build()?;
    let until = Instant::now() + Duration::from_secs(seconds.parse()?);
    let load = Load::new(client.clone(), vec![gateway.clone()], admin.clone(), until);
    warm_up(&load).await;
    let started = now_ms();
    run_load(&load).await;
    println!("load: {} s from {started}", (now_ms() - started) / 1000);
    for ((kind, status), n) in lock(&load.counts).iter() {
        println!("{kind:>16} {status:>3}: {n}");
    }
    drain(&client, upstream).await;
    let faults = read_faults(faults);
    let missing = missing(&load, upstream, &faults).await;
    let renders = renders(&client, upstream).await;
    let accepted = lock(&load.accepted).len();
    verdict(accepted, missing, &renders, &faults);
    Ok(())
}

async fn burst(args: &[String]) -> anyhow::Result<()> {
    let (gateway, keys, concurrency, first) = match args {
        [g, k, c] => (g, k, c, "0"),
        [g, k, c, f] => (g, k, c, f.as_str()),
        _ => anyhow::bail!("usage: soak-driver burst GATEWAY KEYS CONCURRENCY [FIRST]"),
    };
    let first: u64 = first.parse()?;
    let keys: u64 = keys.parse()?;
    let concurrency: u64 = concurrency.parse()?;
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()?;
    let next = Arc::new(AtomicU64::new(first));
    let counts = Counts::default();
    let started = Instant::now();
    let keys = first + keys;
    let tasks: Vec<_> = (0..concurrency)
        .map(|_| {
            let (client, next, counts) = (client.clone(), next.clone(), counts.clone());
            let url = format!("{gateway}/fragments/burst?id=");
            tokio::spawn(async move {
                loop {
                    let n = next.fetch_add(1, Ordering::Relaxed);
                    if n >= keys {
                        break;
                    }
                    let req = client.get(format!("{url}{n}")).header("prefer", "wait=10");
                    let status = match req.send().await {
                        Ok(r) => {
                            let status = r.status().as_u16();
                            r.bytes().await.map_or(0, |_| status)
                        }
                        Err(_) => 0,
                    };
                    *lock(&counts).entry(("burst", status)).or_default() += 1;
                }
            })
        })
        .collect();
    for t in tasks {
        t.await?;
    }
    println!(
        "burst: {} keys in {:.1} s",
        keys - first,
        started.elapsed().as_secs_f64()
    );
    println!("{:?}", lock(&counts));
    Ok(())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("soak") => soak(&args[1..]).await,
        Some("burst") => burst(&args[1..]).await,
        Some("chaos") => chaos::run(&args[1..]).await,
        _ => anyhow::bail!("usage: soak-driver soak|burst|chaos …"),
    }
}
