//! A token bucket: the rate limit on what a client sends, whichever its protocol.

use tokio::time::Instant;

/// A rate limit's state: the tokens saved up. The rate and the burst are the caller's, given
/// to each [`TokenBucket::take`] (every connection holds two buckets, and their limits are
/// the node's), so a change of either applies from the next take.
#[derive(Debug)]
pub(crate) struct TokenBucket {
    tokens: f64,
    last: Instant,
}

impl TokenBucket {
    /// A full bucket of `burst` tokens.
    pub(crate) fn new(burst: u32) -> Self {
        Self {
            tokens: f64::from(burst),
            last: Instant::now(),
        }
    }

    /// Takes a token as of `now`, refilled at `rate` a second up to `burst`; `false` when
    /// none is left.
    pub(crate) fn take(&mut self, now: Instant, rate: f64, burst: u32) -> bool {
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.last = now;
        self.tokens = (self.tokens + elapsed * rate).min(f64::from(burst));
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test(start_paused = true)]
    async fn token_bucket_allows_a_burst_then_the_rate() {
        let mut bucket = TokenBucket::new(3);
        let now = Instant::now();
        assert!((0..3).all(|_| bucket.take(now, 2.0, 3)));
        assert!(!bucket.take(now, 2.0, 3));
        assert!(bucket.take(now + Duration::from_millis(500), 2.0, 3));
        assert!(!bucket.take(now + Duration::from_millis(600), 2.0, 3));
        assert!((0..3).all(|_| bucket.take(now + Duration::from_secs(60), 2.0, 3)));
        assert!(!bucket.take(now + Duration::from_secs(60), 2.0, 3));
    }
}
