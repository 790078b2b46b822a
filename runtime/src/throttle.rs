//! Repeated warnings, counted instead of written one by one.
//!
//! During an outage every request fails the same way: a broker that is down made each
//! 503 write its own WARN line, a thousand in twenty seconds, burying everything else.
//! A warning written through [`warn_throttled!`](crate::warn_throttled) is written once
//! per kind per [`INTERVAL`]; the ones that follow within it are counted, and when the
//! interval ends one line says how many of that kind were suppressed:
//!
//! ```text
//! WARN request failed error=… status=503
//! WARN similar warnings suppressed site="tessera_gateway::http::error:133" kind="unavailable" suppressed=1066 interval_s=10
//! ```
//!
//! A kind is a call site and, where one site logs several things, a name it gives
//! (`GatewayError` logs each error code as a kind of its own). The count is written by a
//! task on the current Tokio runtime when the interval ends; without a runtime (or if it
//! stops first) it is written with the next warning of that kind, or as the task is
//! dropped. Every suppressed warning is counted in exactly one such line.

use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use tokio::time::Instant;

/// How long a kind of warning stays quiet after one was written.
pub const INTERVAL: Duration = Duration::from_secs(10);

/// Warnings of one call site: when each kind may be written again, and how many were
/// suppressed meanwhile. Lives in a `static` (see [`warn_throttled!`](crate::warn_throttled)).
#[derive(Debug)]
pub struct Throttle {
    /// The call site, `module:line`, named in the count lines.
    site: &'static str,
    interval: Duration,
    kinds: Mutex<Vec<Kind>>,
}

#[derive(Debug)]
struct Kind {
    name: &'static str,
    /// Until when warnings of this kind are counted, not written.
    quiet_until: Instant,
    /// Counted and not reported yet.
    suppressed: u64,
    /// A task will report `suppressed` when the interval ends.
    report_due: bool,
}

impl Throttle {
    /// A throttle for the call site `site` writing each kind once per `interval`.
    pub const fn new(site: &'static str, interval: Duration) -> Self {
        Self {
            site,
            interval,
            kinds: Mutex::new(Vec::new()),
        }
    }

    /// Whether a warning of `kind` is to be written now. If not, it is counted, and a
    /// line saying how many were will follow.
    pub fn admit(&'static self, kind: &'static str) -> bool {
        let now = Instant::now();
        let mut kinds = self.kinds.lock().unwrap_or_else(PoisonError::into_inner);
        let Some(k) = kinds.iter_mut().find(|k| k.name == kind) else {
            kinds.push(Kind {
                name: kind,
                quiet_until: now + self.interval,
                suppressed: 0,
                report_due: false,
            });
            return true;
        };
        if now >= k.quiet_until {
            k.quiet_until = now + self.interval;
            // Counted while no task could report them (no runtime): reported now.
            if !k.report_due && k.suppressed > 0 {
                self.report(kind, std::mem::take(&mut k.suppressed));
            }
            return true;
        }
        k.suppressed += 1;
        if !k.report_due
            && let Ok(runtime) = tokio::runtime::Handle::try_current()
        {
            k.report_due = true;
            let at = k.quiet_until;
            let due = Due {
                throttle: self,
                kind,
            };
            runtime.spawn(async move {
                tokio::time::sleep_until(at).await;
                drop(due);
            });
        }
        false
    }

    /// Reports what `kind` has counted, and lets a later suppression schedule the next
    /// report.
    fn report_due(&self, kind: &'static str) {
        let mut kinds = self.kinds.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(k) = kinds.iter_mut().find(|k| k.name == kind) {
            k.report_due = false;
            let n = std::mem::take(&mut k.suppressed);
            if n > 0 {
                self.report(kind, n);
            }
        }
    }

    fn report(&self, kind: &str, suppressed: u64) {
        tracing::warn!(
            site = self.site,
            kind,
            suppressed,
            interval_s = self.interval.as_secs(),
            "similar warnings suppressed"
        );
    }
}

/// A report to write when the interval ends; written when dropped, so a runtime that
/// stops first still has it written.
struct Due {
    throttle: &'static Throttle,
    kind: &'static str,
}

impl Drop for Due {
    fn drop(&mut self) {
        self.throttle.report_due(self.kind);
    }
}

/// `tracing::warn!` at most once per [`INTERVAL`] for each `kind` (a `&'static str`) at
/// this call site, the rest counted: see [`crate::throttle`].
///
/// ```ignore
/// tessera_runtime::warn_throttled!("request failed: unavailable", error = %e, "request failed");
/// ```
#[macro_export]
macro_rules! warn_throttled {
    ($kind:expr, $($arg:tt)+) => {{
        static THROTTLE: $crate::throttle::Throttle = $crate::throttle::Throttle::new(
            concat!(module_path!(), ":", line!()),
            $crate::throttle::INTERVAL,
        );
        if THROTTLE.admit($kind) {
            ::tracing::warn!($($arg)+);
        }
    }};
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use super::*;

    /// Everything written at `warn` while `f` runs, as text lines.
    async fn logged<F: std::future::Future<Output = ()>>(f: F) -> Vec<String> {
        let out = Arc::new(Mutex::new(Vec::<u8>::new()));
        let sink = out.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_ansi(false)
            .without_time()
            .with_writer(move || Sink(sink.clone()))
            .finish();
        let _guard = tracing::subscriber::set_default(subscriber);
        f.await;
        let bytes = out.lock().unwrap().clone();
        String::from_utf8(bytes)
            .unwrap()
            .lines()
            .map(String::from)
            .collect()
    }

    struct Sink(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Sink {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    fn fail(kind: &'static str, n: u32) {
        crate::warn_throttled!(kind, n, "request failed");
    }

    #[tokio::test(start_paused = true)]
    async fn an_outage_writes_one_line_per_kind_per_interval_and_a_count() {
        let lines = logged(async {
            for n in 0..1000 {
                fail("unavailable", n);
                if n % 100 == 0 {
                    fail("upstream_timeout", n);
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            // 20 s of failures, then quiet: the last interval's count still comes.
            tokio::time::sleep(INTERVAL * 2).await;
        })
        .await;
        let written: Vec<&String> = lines
            .iter()
            .filter(|l| l.contains("request failed"))
            .collect();
        let counts: Vec<&String> = lines.iter().filter(|l| l.contains("suppressed")).collect();
        // 1000 failures over 20 s of one kind, 10 of another: two lines each, and one
        // count line for every interval that suppressed any.
        assert_eq!(written.len(), 4, "{lines:#?}");
        assert!(
            written[0].contains("n=0") && written[0].contains("WARN"),
            "{lines:#?}"
        );
        let suppressed: u64 = counts
            .iter()
            .map(|l| {
                l.split("suppressed=")
                    .nth(1)
                    .unwrap()
                    .split(' ')
                    .next()
                    .unwrap()
                    .parse::<u64>()
                    .unwrap()
            })
            .sum();
        assert_eq!(suppressed, 1000 + 10 - 4, "{lines:#?}");
        assert!(
            counts.iter().all(|l| l.contains("interval_s=10")
                && l.contains("site=\"tessera_runtime::throttle::tests:")),
            "{counts:#?}"
        );
        assert!(
            counts.iter().any(|l| l.contains("kind=\"unavailable\""))
                && counts
                    .iter()
                    .any(|l| l.contains("kind=\"upstream_timeout\"")),
            "{counts:#?}"
        );
        assert!(counts.len() <= 4, "{counts:#?}");
    }

    #[test]
    fn without_a_runtime_the_count_comes_with_the_next_line() {
        static THROTTLE: Throttle = Throttle::new("t:1", Duration::ZERO);
        assert!(THROTTLE.admit("k"));
        // A zero interval never suppresses: every warning is written.
        assert!(THROTTLE.admit("k"));
        static SLOW: Throttle = Throttle::new("t:2", Duration::from_secs(3600));
        assert!(SLOW.admit("k"));
        assert!(!SLOW.admit("k"));
        assert!(!SLOW.admit("k"));
        assert!(SLOW.admit("other"), "kinds are apart");
        let kinds = SLOW.kinds.lock().unwrap();
        assert_eq!(kinds[0].suppressed, 2);
        assert!(!kinds[0].report_due, "no runtime, no task");
    }
}
