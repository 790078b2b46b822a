//! A counter and a latency histogram counted per thread, for the hit path.
//!
//! prometheus-client's `Counter` is one atomic and its `Histogram` one mutex: every thread
//! counting a route's hits took the same lock and wrote the same cache lines, which then
//! moved between cores on every hit. Here each thread counts in a shard of its own, and a
//! scrape adds the shards up. They encode as the crate's own counter and histogram do.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering::Relaxed};

use crossbeam_utils::CachePadded;
use prometheus_client::encoding::{EncodeMetric, MetricEncoder, NoLabelSet};
use prometheus_client::metrics::{MetricType, TypedMetric};

/// Shards of each metric. Threads take them in turn: past this many counting threads,
/// two share one (still correct, only slower).
const SHARDS: usize = 16;

/// The shard of the calling thread.
fn shard() -> usize {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    thread_local! {
        static SHARD: usize = NEXT.fetch_add(1, Relaxed) % SHARDS;
    }
    SHARD.with(|s| *s)
}

/// A monotonic counter (Prometheus type counter).
#[derive(Debug, Clone, Default)]
pub(crate) struct Counter(Arc<[CachePadded<AtomicU64>; SHARDS]>);

impl Counter {
    pub(crate) fn inc(&self) {
        self.0[shard()].fetch_add(1, Relaxed);
    }

    /// The count over every thread.
    pub(crate) fn get(&self) -> u64 {
        self.0.iter().map(|s| s.load(Relaxed)).sum()
    }
}

impl TypedMetric for Counter {
    const TYPE: MetricType = MetricType::Counter;
}

impl EncodeMetric for Counter {
    fn encode(&self, mut encoder: MetricEncoder) -> Result<(), std::fmt::Error> {
        encoder.encode_counter::<NoLabelSet, _, u64>(&self.get(), None)
    }

    fn metric_type(&self) -> MetricType {
        Self::TYPE
    }
}

/// Upper bounds of the latency buckets, in seconds: 0.5 ms doubling 17 times (to about
/// 33 s: long-polls included), then +Inf.
const BOUNDS: usize = 17;

fn bound(i: usize) -> f64 {
    if i < BOUNDS {
        0.0005 * f64::from(1u32 << i)
    } else {
        f64::INFINITY
    }
}

/// One thread's observations: a count per bucket (not cumulative) and their sum.
#[derive(Debug, Default)]
struct Observed {
    buckets: [AtomicU64; BOUNDS + 1],
    sum_nanos: AtomicU64,
}

/// A latency histogram with the buckets of [`super::latency_buckets`] (Prometheus type
/// histogram).
#[derive(Debug, Clone, Default)]
pub(crate) struct Latency(Arc<[CachePadded<Observed>; SHARDS]>);

impl Latency {
    pub(crate) fn observe(&self, seconds: f64) {
        let bucket = (0..BOUNDS).find(|&i| seconds <= bound(i)).unwrap_or(BOUNDS);
        let shard = &self.0[shard()];
        shard.buckets[bucket].fetch_add(1, Relaxed);
        // Saturating: a negative or NaN duration counts as 0.
        shard.sum_nanos.fetch_add((seconds * 1e9) as u64, Relaxed);
    }

    /// Sum (seconds), count and per-bucket counts over every thread.
    fn totals(&self) -> (f64, u64, Vec<(f64, u64)>) {
        let mut buckets: Vec<(f64, u64)> = (0..=BOUNDS).map(|i| (bound(i), 0)).collect();
        let mut nanos = 0u64;
        for shard in self.0.iter() {
            for (total, count) in buckets.iter_mut().zip(&shard.buckets) {
                total.1 += count.load(Relaxed);
            }
            nanos = nanos.wrapping_add(shard.sum_nanos.load(Relaxed));
        }
        let count = buckets.iter().map(|b| b.1).sum();
        (nanos as f64 / 1e9, count, buckets)
    }
}

impl TypedMetric for Latency {
    const TYPE: MetricType = MetricType::Histogram;
}

impl EncodeMetric for Latency {
    fn encode(&self, mut encoder: MetricEncoder) -> Result<(), std::fmt::Error> {
        let (sum, count, buckets) = self.totals();
        encoder.encode_histogram::<NoLabelSet>(sum, count, &buckets, None)
    }

    fn metric_type(&self) -> MetricType {
        Self::TYPE
    }
}

#[cfg(test)]
mod tests {
    use prometheus_client::encoding::text::encode;
    use prometheus_client::registry::{Metric, Registry};

    use super::*;

    /// What the crate's own histogram with the same buckets encodes, for the same
    /// observations from several threads.
    #[test]
    fn encodes_as_the_crates_own_metrics_over_all_threads() {
        let (ours, theirs) = (Latency::default(), super::super::latency_histogram());
        let (count, reference) = (
            Counter::default(),
            prometheus_client::metrics::counter::Counter::<u64>::default(),
        );
        let seconds = [0.0001, 0.0005, 0.0007, 0.003, 0.25, 1.5, 40.0, 100_000.0];
        std::thread::scope(|s| {
            for chunk in seconds.chunks(2) {
                let (ours, count) = (&ours, &count);
                s.spawn(move || {
                    for &v in chunk {
                        ours.observe(v);
                        count.inc();
                    }
                });
            }
        });
        for v in seconds {
            theirs.observe(v);
            reference.inc();
        }
        fn text(latency: impl Metric, counter: impl Metric) -> String {
            let mut registry = Registry::default();
            registry.register("latency", "", latency);
            registry.register("hits", "", counter);
            let mut out = String::new();
            encode(&mut out, &registry).unwrap();
            out
        }
        // Sums are kept in nanoseconds here: compare all but the sum line.
        let without_sum = |t: String| -> String {
            t.lines()
                .filter(|l| !l.starts_with("latency_sum"))
                .collect::<Vec<_>>()
                .join("\n")
        };
        assert_eq!(
            without_sum(text(ours.clone(), count.clone())),
            without_sum(text(theirs, reference))
        );
        assert_eq!(count.get(), 8);
        let (sum, n, _) = ours.totals();
        assert_eq!(n, 8);
        assert!((sum - seconds.iter().sum::<f64>()).abs() < 1e-6, "{sum}");
    }
}
