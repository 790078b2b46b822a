//! When to try a failed build again: exponential backoff with jitter.

use std::time::Duration;

use rand::Rng;

/// Delay before the second attempt (before jitter).
pub const BASE: Duration = Duration::from_millis(500);
/// Longest delay between attempts.
pub const CAP: Duration = Duration::from_secs(30);

/// The delay before attempt `attempt + 1`, after attempt `attempt` (1-based) failed:
/// `BASE × 2^(attempt-1)`, capped at [`CAP`], of which the upper half is random ("equal
/// jitter"), so retries of a burst of builds that failed together spread out.
pub fn backoff(attempt: u32, rng: &mut impl Rng) -> Duration {
    let exp = BASE.saturating_mul(1u32 << attempt.saturating_sub(1).min(16));
    let full = exp.min(CAP);
    let half = full / 2;
    half + half.mul_f64(rng.random::<f64>())
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    #[test]
    fn grows_then_caps_and_stays_within_bounds() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        for attempt in 1..=20 {
            let full = BASE.saturating_mul(1 << (attempt - 1).min(16)).min(CAP);
            for _ in 0..100 {
                let d = backoff(attempt, &mut rng);
                assert!(
                    d >= full / 2 && d <= full,
                    "attempt {attempt}: {d:?} outside [{:?}, {full:?}]",
                    full / 2
                );
            }
        }
        assert!(backoff(1, &mut rng) <= Duration::from_millis(500));
        assert!(backoff(20, &mut rng) >= Duration::from_secs(15));
    }

    #[test]
    fn jitter_spreads_delays() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(1);
        let delays: std::collections::HashSet<_> = (0..20).map(|_| backoff(3, &mut rng)).collect();
        assert!(delays.len() > 10, "delays are not spread: {delays:?}");
    }
}
