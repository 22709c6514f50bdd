//! Jittered exponential backoff. After an etcd outage every worker's retry loop wakes at once; the
//! jitter spreads their reconnects (and re-registrations) so that etcd coming back is not met by a
//! synchronised storm.

use std::time::Duration;

use rand::Rng;

/// Delays of `initial · 2^n`, capped at `max`, each drawn uniformly from its upper half.
#[derive(Clone, Debug)]
pub(crate) struct Backoff {
    initial: Duration,
    max: Duration,
    attempt: u32,
}

impl Backoff {
    pub(crate) fn new(initial: Duration, max: Duration) -> Self {
        Self {
            initial,
            max: max.max(initial),
            attempt: 0,
        }
    }

    /// The delay before the next retry; each call doubles the ceiling.
    pub(crate) fn next_delay(&mut self) -> Duration {
        // 2^20 · initial exceeds any sensible cap, and bounding the exponent avoids overflow.
        let factor = 1u32 << self.attempt.min(20);
        self.attempt = self.attempt.saturating_add(1);
        let ceiling = self.initial.saturating_mul(factor).min(self.max);
        let half = ceiling / 2;
        // Upper-half jitter keeps a guaranteed minimum wait (no hot loop) while still de-correlating
        // peers that failed at the same instant.
        let extra_nanos =
            rand::rng().random_range(0..=ceiling.saturating_sub(half).as_nanos() as u64);
        half + Duration::from_nanos(extra_nanos)
    }

    /// Back to the initial delay, after a success.
    pub(crate) fn reset(&mut self) {
        self.attempt = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grows_to_the_cap_and_stays_in_the_upper_half() {
        let initial = Duration::from_millis(100);
        let max = Duration::from_millis(1000);
        let mut b = Backoff::new(initial, max);
        let ceilings = [100, 200, 400, 800, 1000, 1000, 1000];
        for c in ceilings {
            let c = Duration::from_millis(c);
            let d = b.next_delay();
            assert!(d >= c / 2 && d <= c, "{d:?} outside [{:?}, {c:?}]", c / 2);
        }
        b.reset();
        assert!(b.next_delay() <= initial);
    }

    #[test]
    fn many_attempts_do_not_overflow() {
        let mut b = Backoff::new(Duration::from_secs(1), Duration::from_secs(30));
        for _ in 0..200 {
            assert!(b.next_delay() <= Duration::from_secs(30));
        }
    }

    #[test]
    fn delays_are_jittered() {
        let mut seen = std::collections::BTreeSet::new();
        for _ in 0..20 {
            let mut b = Backoff::new(Duration::from_secs(1), Duration::from_secs(1));
            seen.insert(b.next_delay());
        }
        assert!(seen.len() > 1, "20 fresh backoffs all chose {seen:?}");
    }
}
