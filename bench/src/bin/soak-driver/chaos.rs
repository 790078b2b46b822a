//! `soak-driver chaos GATEWAYS ADMIN UPSTREAM MARKS STOP` (`bench/chaos.sh`): the soak's
//! load at lower rates ([`CHAOS_RATES`]) on every gateway of GATEWAYS (comma-separated)
//! in turn, plus reads of the purged fragments that do not wait, until the file STOP
//! exists (at most an hour). Once the hit set is built it appends `phase:baseline` to
//! MARKS, where `bench/chaos.sh` then writes, one line each, `KIND UNIX_MS`:
//! `phase:NAME` where a phase begins (with its fault) and `restore:NAME` where the fault
//! is undone. After the load it waits for the builds to drain, asks once more (a
//! long-poll, as client.js would) for every accepted fragment never rendered, and prints
//! one table row per phase, every figure taken from requests sent within the phase:
//! - 503s: of misses (cold, long-polls, ESI placeholders), of hits, of the rest (pages,
//!   purges, reads of purged fragments); refused: requests with no HTTP answer; hits
//!   answered 202: fragments of the hit set no longer found (their copy was lost);
//! - lost: accepted (200 or 202) and never rendered, not even when asked again after the
//!   load; re-asked: rendered only when asked again (the first request was dropped);
//! - doubled: renders of one fragment beyond its first (the purge route left out, as a
//!   purge asks for a rebuild), split into a render less than [`AT_ONCE_MS`] after the
//!   previous one (built twice at once) and later ones (rebuilt after its copy was lost),
//!   with how many of those were of the hit set;
//! - recovered: seconds from the fault to the end of the last second with a miss not
//!   answered normally before the fault was undone (a 503, no answer, a cold miss slower
//!   than [`SLOW_MS`], a long-poll not built within its wait); then such misses after it
//!   was undone;
//! - hits: 200 answers to hits a second from 2 s after the fault (after detection) until
//!   it was undone, against the baseline phase's rate; and their p99;
//! - stale: reads sent after the fault was undone of a fragment purged while it lasted,
//!   answered with a copy rendered before the fault (out of all such reads).
//!
//! Every answer is also written to MARKS.answers.csv (`kind,status,sent,took,rendered,id`).

use std::collections::{HashMap, HashSet};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use futures_util::StreamExt;

use super::{Accepted, Answer, Load, Rates, drain, lock, now_ms, read_faults, renders, warm_up};

/// About 500 hits, 25 cold misses, 20 long-polls, 5 pages, 2 purges and 20 reads of
/// purged fragments a second: a few hundred requests a second, which two shared cores
/// serve beside three RabbitMQ nodes.
const CHAOS_RATES: Rates = Rates {
    hit: Duration::from_millis(4),
    cold: Duration::from_millis(40),
    poll: Duration::from_millis(100),
    esi: Duration::from_millis(200),
    purge: Duration::from_millis(500),
    purged_read: Some(Duration::from_millis(50)),
};

/// A render this soon after the previous one of the same fragment was built twice at
/// once (a render takes 20 ms).
const AT_ONCE_MS: u64 = 1_000;

/// A cold miss (no wait) slower than this was not answered normally.
const SLOW_MS: u64 = 1_000;

/// Hits in the first this long of a fault are left out of its hit rate (detection).
const DETECTION_MS: u64 = 2_000;

pub(super) async fn run(args: &[String]) -> anyhow::Result<()> {
    let [gateways, admin, upstream, marks, stop] = args else {
        anyhow::bail!("usage: soak-driver chaos GATEWAYS ADMIN UPSTREAM MARKS STOP");
    };
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .pool_max_idle_per_host(32)
        .build()?;
    let gateways = gateways.split(',').map(String::from).collect();
    let until = Instant::now() + Duration::from_secs(3_600);
    let mut load = Load::new(client.clone(), gateways, admin.clone(), until);
    load.rates = CHAOS_RATES;
    warm_up(&load).await;
    std::fs::write(marks, format!("phase:baseline {}\n", now_ms()))?;
    let watch = {
        let (stop, flag) = (std::path::PathBuf::from(stop), load.stop.clone());
        tokio::spawn(async move {
            while !stop.exists() {
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            flag.store(true, Ordering::Relaxed);
        })
    };
    let started = now_ms();
    super::run_load(&load).await;
    watch.abort();
    let ended = now_ms();
    println!("load: {} s from {started}", (ended - started) / 1000);
    for ((kind, status), n) in lock(&load.counts).iter() {
        println!("{kind:>16} {status:>3}: {n}");
    }
    drain(&client, upstream).await;
    let (lost, reasked) = ask_again(&load, upstream).await;
    let renders = renders(&client, upstream).await;
    let phases = phases(&read_faults(marks), ended);
    let answers = lock(&load.answers).clone();
    let seen = Seen {
        answers: &answers,
        lost: &lost,
        reasked: &reasked,
        renders: &renders,
    };
    table(&phases, &seen);
    let csv: String = answers
        .iter()
        .map(|a| {
            let rendered = a.rendered.map_or(String::new(), |r| r.to_string());
            format!(
                "{},{},{},{},{rendered},{}\n",
                a.kind, a.status, a.sent, a.took, a.id
            )
        })
        .collect();
    std::fs::write(format!("{marks}.answers.csv"), csv)?;
    for a in lost.iter().take(10) {
        println!(
            "lost {}: sent {}, accepted ({}) {}",
            a.key, a.sent, a.status, a.at
        );
    }
    Ok(())
}

/// Asks once more for every accepted fragment never rendered: (lost, re-asked).
async fn ask_again(load: &Load, upstream: &str) -> (Vec<Accepted>, Vec<Accepted>) {
    let rendered = renders(&load.client, upstream).await;
    let unbuilt: Vec<Accepted> = lock(&load.accepted)
        .iter()
        .filter(|a| !rendered.contains_key(&a.key))
        .cloned()
        .collect();
    futures_util::stream::iter(unbuilt.iter().map(|a| {
        let path = format!("/fragments/{}", a.key);
        async move { load.get("re-poll", &path, Some(10)).await }
    }))
    .buffer_unordered(32)
    .for_each(|_| async {})
    .await;
    let rendered = drain(&load.client, upstream).await;
    unbuilt
        .into_iter()
        .partition(|a| !rendered.contains_key(&a.key))
}

/// A phase of the run: from its fault (or the start) to the next phase.
#[derive(Debug)]
struct Phase {
    name: String,
    start: u64,
    /// When its fault was undone.
    restore: Option<u64>,
    end: u64,
}

fn phases(marks: &[(String, u64)], ended: u64) -> Vec<Phase> {
    let starts: Vec<(&str, u64)> = marks
        .iter()
        .filter_map(|(kind, at)| Some((kind.strip_prefix("phase:")?, *at)))
        .collect();
    starts
        .iter()
        .enumerate()
        .map(|(i, (name, start))| Phase {
            name: (*name).to_string(),
            start: *start,
            restore: marks
                .iter()
                .find(|(kind, at)| kind.strip_prefix("restore:") == Some(name) && at >= start)
                .map(|(_, at)| *at),
            end: starts.get(i + 1).map_or(ended, |(_, at)| *at),
        })
        .collect()
}

/// What the run saw, to be cut into phases.
#[derive(Debug)]
struct Seen<'a> {
    answers: &'a [Answer],
    lost: &'a [Accepted],
    reasked: &'a [Accepted],
    renders: &'a HashMap<String, Vec<u64>>,
}

fn is_miss(kind: &str) -> bool {
    matches!(kind, "cold" | "long-poll" | "esi-fill")
}

/// Whether a miss was answered normally: built or queued at once, or built within its
/// long-poll.
fn normal(a: &Answer) -> bool {
    match a.kind {
        "cold" => matches!(a.status, 200 | 202) && a.took <= SLOW_MS,
        _ => a.status == 200,
    }
}

/// 200 answers to hits a second, sent in `from..to`.
fn hit_rate(answers: &[Answer], from: u64, to: u64) -> f64 {
    let n = answers
        .iter()
        .filter(|a| a.kind == "hit" && a.status == 200 && (from..to).contains(&a.sent))
        .count();
    n as f64 * 1000.0 / (to.saturating_sub(from).max(1)) as f64
}

/// (built twice at once, rebuilt later, of them hit fragments): renders beyond a
/// fragment's first in the phase.
fn doubled(renders: &HashMap<String, Vec<u64>>, p: &Phase) -> (usize, usize, usize) {
    let (mut at_once, mut later, mut hot) = (0, 0, 0);
    for (key, times) in renders.iter().filter(|(k, _)| !k.starts_with("purge?")) {
        let mut times = times.clone();
        times.sort_unstable();
        for pair in times
            .windows(2)
            .filter(|w| (p.start..p.end).contains(&w[1]))
        {
            if pair[1] - pair[0] < AT_ONCE_MS {
                at_once += 1;
            } else {
                later += 1;
                hot += usize::from(key.starts_with("hot?"));
            }
        }
    }
    (at_once, later, hot)
}

/// (stale, checked): reads after the fault was undone of fragments purged during it.
fn stale(answers: &[Answer], p: &Phase) -> (usize, usize) {
    let Some(restore) = p.restore else {
        return (0, 0);
    };
    let purged: HashSet<u64> = answers
        .iter()
        .filter(|a| a.kind == "purge" && (200..300).contains(&a.status))
        .filter(|a| (p.start..restore).contains(&a.sent))
        .map(|a| a.id)
        .collect();
    let reads: Vec<&Answer> = answers
        .iter()
        .filter(|a| matches!(a.kind, "purged-read" | "read-after-purge") && a.status == 200)
        .filter(|a| (restore..p.end).contains(&a.sent) && purged.contains(&a.id))
        .collect();
    let old = reads
        .iter()
        .filter(|a| a.rendered.is_some_and(|r| r < p.start))
        .count();
    (old, reads.len())
}

/// (seconds to recover before the fault was undone, abnormal misses after).
fn recovery(answers: &[Answer], p: &Phase) -> (u64, usize) {
    let undone = p.restore.unwrap_or(p.end);
    let abnormal = |a: &&Answer| is_miss(a.kind) && !normal(a);
    let last = answers
        .iter()
        .filter(|a| (p.start..undone).contains(&a.sent))
        .filter(abnormal)
        .map(|a| a.sent)
        .max();
    let after = answers
        .iter()
        .filter(|a| (undone..p.end).contains(&a.sent))
        .filter(abnormal)
        .count();
    (last.map_or(0, |at| (at - p.start) / 1000 + 1), after)
}

fn p99(mut took: Vec<u64>) -> u64 {
    took.sort_unstable();
    took.get(took.len().saturating_sub(1) * 99 / 100)
        .copied()
        .unwrap_or(0)
}

/// One row of the table.
fn row(p: &Phase, seen: &Seen<'_>, baseline: f64) -> String {
    let answers: Vec<Answer> = seen
        .answers
        .iter()
        .filter(|a| (p.start..p.end).contains(&a.sent))
        .copied()
        .collect();
    let count = |f: &dyn Fn(&Answer) -> bool| answers.iter().filter(|a| f(a)).count();
    let e503 = |kinds: fn(&str) -> bool| count(&|a| a.status == 503 && kinds(a.kind));
    let in_phase = |v: &[Accepted]| {
        v.iter()
            .filter(|a| (p.start..p.end).contains(&a.at))
            .count()
    };
    let (at_once, later, hot) = doubled(seen.renders, p);
    let (recovered, after) = recovery(&answers, p);
    let undone = p.restore.unwrap_or(p.end);
    let from = if p.restore.is_some() {
        p.start + DETECTION_MS
    } else {
        p.start
    };
    let rate = hit_rate(&answers, from, undone);
    let hits = answers.iter().filter(|a| a.kind == "hit").map(|a| a.took);
    let (old, checked) = stale(&answers, p);
    format!(
        "| {} | {} s | {} / {} / {} | {} | {} | {} | {} | {} / {} ({hot}) | {} s | {} | {:.0} ({:.2}×) | {} ms | {old} of {checked} |",
        p.name,
        (p.end - p.start) / 1000,
        e503(is_miss),
        e503(|k| k == "hit"),
        e503(|k| !is_miss(k) && k != "hit"),
        count(&|a| a.status == 0),
        count(&|a| a.kind == "hit" && a.status == 202),
        in_phase(seen.lost),
        in_phase(seen.reasked),
        at_once,
        later,
        recovered,
        after,
        rate,
        rate / baseline.max(f64::MIN_POSITIVE),
        p99(hits.collect()),
    )
}

fn table(phases: &[Phase], seen: &Seen<'_>) {
    let baseline = phases
        .first()
        .map_or(0.0, |p| hit_rate(seen.answers, p.start, p.end));
    println!(
        "| phase | length | 503s: misses / hits / other | refused | hits answered 202 | lost | re-asked | doubled: at once / later (hit set) | recovered | abnormal misses after return | hits/s after detection | hit p99 | stale after return |"
    );
    println!("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |");
    for p in phases {
        println!("{}", row(p, seen, baseline));
    }
}
