//! A token bucket for bandwidth limits (replication and resync), on the engine's clock.

/// Bytes per second with a burst of `cap` bytes. A request larger than the burst passes
/// when the bucket is full and leaves it in debt, so large items neither starve nor
/// exceed the rate on average.
#[derive(Clone, Debug, Default)]
pub(crate) struct TokenBucket {
    rate: u64,
    cap: u64,
    budget: i128,
    at_ns: u64,
}

impl TokenBucket {
    /// A bucket for `rate` bytes per second (0: unlimited), starting empty at `now`.
    pub(crate) fn new(rate: u64, cap: u64, now: u64) -> TokenBucket {
        TokenBucket {
            rate,
            cap: cap.max(1),
            budget: 0,
            at_ns: now,
        }
    }

    /// Take `len` bytes at `now` if the budget allows; false: try again later.
    pub(crate) fn take(&mut self, now: u64, len: u64) -> bool {
        if self.rate == 0 {
            return true;
        }
        let elapsed = now.saturating_sub(self.at_ns);
        let earned = self.rate as u128 * elapsed as u128 / 1_000_000_000;
        if earned > 0 {
            self.budget = (self.budget + earned as i128).min(self.cap as i128);
            self.at_ns = now;
        }
        if self.budget < len.min(self.cap) as i128 {
            return false;
        }
        self.budget -= len as i128;
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn holds_the_rate_over_time_and_lets_big_requests_through() {
        let mut b = TokenBucket::new(1_000_000, 100_000, 0);
        let mut sent = 0u64;
        // Ten seconds of 1 ms steps, asking for 4 KiB whenever possible.
        for ms in 0..10_000u64 {
            while b.take(ms * 1_000_000, 4096) {
                sent += 4096;
            }
        }
        assert!((9_800_000..=10_100_000).contains(&sent), "{sent}");
        // A request larger than the burst passes once the bucket is full, then waits.
        let mut b = TokenBucket::new(1_000_000, 100_000, 0);
        assert!(!b.take(50_000_000, 1 << 20));
        assert!(b.take(100_000_000, 1 << 20));
        assert!(!b.take(200_000_000, 4096));
        assert!(b.take(1_100_000_000, 4096));
        // Unlimited.
        assert!(TokenBucket::new(0, 1, 0).take(0, u64::MAX));
    }
}
