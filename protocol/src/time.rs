//! Wall-clock time as Unix milliseconds.
//!
//! Envelopes and messages are read by other processes on other machines, so they carry
//! wall-clock instants rather than `Instant`s. Everything that only waits inside one
//! process uses tokio's clock instead, so tests can pause it.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Milliseconds since the Unix epoch. A clock set before 1970 reads as 0.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// `from + d` in Unix milliseconds, saturating.
pub fn add_ms(from: u64, d: Duration) -> u64 {
    from.saturating_add(u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// Time left from `now` until `until`, zero when past.
pub fn remaining(now: u64, until: u64) -> Duration {
    Duration::from_millis(until.saturating_sub(now))
}

/// Whole seconds for protocols that count in seconds (memcached TTL, `Retry-After`),
/// rounded up so that a positive duration never becomes "no expiry" or "now".
pub fn ceil_secs(d: Duration) -> u64 {
    let secs = d.as_secs();
    if d.subsec_nanos() > 0 { secs + 1 } else { secs }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ceil_secs_rounds_up_fractions_only() {
        assert_eq!(ceil_secs(Duration::ZERO), 0);
        assert_eq!(ceil_secs(Duration::from_millis(1)), 1);
        assert_eq!(ceil_secs(Duration::from_secs(2)), 2);
        assert_eq!(ceil_secs(Duration::from_millis(2001)), 3);
    }

    #[test]
    fn remaining_saturates() {
        assert_eq!(remaining(10, 5), Duration::ZERO);
        assert_eq!(remaining(5, 10), Duration::from_millis(5));
    }
}
