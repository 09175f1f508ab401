//! A per-connection token bucket: a client may send `burst` frames at once,
//! then `per_second` frames a second on average.
//!
//! One bucket per connection, owned by its reader thread: no lock, no
//! timer, just arithmetic on the time of each frame.

use std::time::Instant;

/// Each client's rate limit: a group of the server's options
/// (`crate::config`).
#[derive(Debug, Clone, Copy, PartialEq, clap::Args)]
#[command(next_help_heading = "What a client may send")]
pub struct RateLimit {
    /// Frames a client may send back to back (token bucket size).
    #[arg(
        long = "rate-burst",
        env = "RATE_BURST",
        value_name = "RATE_BURST",
        default_value_t = 20
    )]
    pub burst: u32,
    /// Frames a second a client may send on average (token refill rate).
    #[arg(
        long = "rate-per-sec",
        env = "RATE_PER_SEC",
        value_name = "RATE_PER_SEC",
        default_value_t = 10.0
    )]
    pub per_second: f64,
    /// Rate-limited frames in a row after which the client is closed (1008).
    #[arg(
        long = "rate-strikes",
        env = "RATE_STRIKES",
        value_name = "RATE_STRIKES",
        default_value_t = 20
    )]
    pub strikes: u32,
}

#[derive(Debug)]
pub struct TokenBucket {
    limit: RateLimit,
    tokens: f64,
    refilled_at: Instant,
    strikes: u32,
}

/// What to do with one frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Allow,
    /// Refuse it with `rate_limited`.
    Refuse,
    /// Refuse it and close the connection: the client keeps flooding.
    Disconnect,
}

impl TokenBucket {
    pub fn new(limit: RateLimit) -> Self {
        Self::new_at(limit, Instant::now())
    }

    fn new_at(limit: RateLimit, now: Instant) -> Self {
        TokenBucket {
            limit,
            tokens: f64::from(limit.burst),
            refilled_at: now,
            strikes: 0,
        }
    }

    /// Takes a token for a frame arriving now.
    pub fn check(&mut self) -> Verdict {
        self.check_at(Instant::now())
    }

    fn check_at(&mut self, now: Instant) -> Verdict {
        let elapsed = now
            .saturating_duration_since(self.refilled_at)
            .as_secs_f64();
        self.tokens =
            (self.tokens + elapsed * self.limit.per_second).min(f64::from(self.limit.burst));
        self.refilled_at = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            self.strikes = 0;
            Verdict::Allow
        } else {
            self.strikes += 1;
            if self.strikes >= self.limit.strikes {
                Verdict::Disconnect
            } else {
                Verdict::Refuse
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    const LIMIT: RateLimit = RateLimit {
        burst: 3,
        per_second: 2.0,
        strikes: 3,
    };

    #[test]
    fn a_burst_passes_then_frames_are_refused_until_tokens_refill() {
        let start = Instant::now();
        let mut bucket = TokenBucket::new_at(LIMIT, start);
        for _ in 0..3 {
            assert_eq!(bucket.check_at(start), Verdict::Allow);
        }
        assert_eq!(bucket.check_at(start), Verdict::Refuse);
        assert_eq!(
            bucket.check_at(start + Duration::from_millis(500)),
            Verdict::Allow
        );
        assert_eq!(
            bucket.check_at(start + Duration::from_millis(500)),
            Verdict::Refuse
        );
    }

    #[test]
    fn a_client_that_keeps_flooding_is_disconnected() {
        let start = Instant::now();
        let mut bucket = TokenBucket::new_at(LIMIT, start);
        let verdicts: Vec<_> = (0..6).map(|_| bucket.check_at(start)).collect();
        assert_eq!(
            verdicts[3..],
            [Verdict::Refuse, Verdict::Refuse, Verdict::Disconnect]
        );
    }
}
