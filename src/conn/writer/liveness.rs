//! Whether the peer of a connection is still there: [`Liveness`], when it was last heard
//! from (the reader records every frame), and the writer's ping schedule: a ping every
//! interval, and the peer counted gone when no frame answers one within the timeout.
//!
//! Times are kept as milliseconds since the connection's [`Liveness`] started, in 8 bytes
//! each rather than an `Instant`'s 16: every connection holds them for its whole life.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::time::Instant;

/// When the peer was last heard from, shared by the reader (which records every frame) and
/// the writer (which pings and times out); also the clock of the writer's times.
#[derive(Debug)]
pub(crate) struct Liveness {
    start: Instant,
    last_seen_ms: AtomicU64,
}

impl Liveness {
    /// Starts the clock now.
    pub(crate) fn new() -> Self {
        Self {
            start: Instant::now(),
            last_seen_ms: AtomicU64::new(0),
        }
    }

    /// `at` in milliseconds since the clock started.
    pub(super) fn ms(&self, at: Instant) -> u64 {
        at.saturating_duration_since(self.start).as_millis() as u64
    }

    /// The instant `ms` milliseconds after the clock started.
    pub(super) fn instant(&self, ms: u64) -> Instant {
        self.start + Duration::from_millis(ms)
    }

    /// Records that a frame arrived.
    pub(crate) fn touch(&self) {
        self.last_seen_ms
            .store(self.ms(Instant::now()), Ordering::Relaxed);
    }

    /// Whether a frame arrived at or after `at`.
    pub(crate) fn heard_since(&self, at: Instant) -> bool {
        self.heard_since_ms(self.ms(at))
    }

    fn heard_since_ms(&self, ms: u64) -> bool {
        self.last_seen_ms.load(Ordering::Relaxed) >= ms
    }
}

/// What [`Pinger::poll`] asks of the writer.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Ping {
    Send,
    TimedOut,
    Wait,
}

/// No ping awaits an answer.
const NOT_SENT: u64 = u64::MAX;

/// Ping schedule, in milliseconds of the connection's [`Liveness`] clock: a ping every
/// `interval`; a ping not answered by any frame within `timeout` means the peer is gone.
#[derive(Debug)]
pub(super) struct Pinger {
    interval_ms: u32,
    /// Also the writer's stall limit.
    timeout_ms: u32,
    next_ping: u64,
    /// When the unanswered ping was sent, or [`NOT_SENT`].
    sent: u64,
}

impl Pinger {
    /// The first ping is due `interval` after the clock started. Both are kept to the
    /// millisecond, at most about 49 days.
    pub(super) fn new(interval: Duration, timeout: Duration) -> Self {
        let ms = |d: Duration| u32::try_from(d.as_millis()).unwrap_or(u32::MAX);
        Self {
            interval_ms: ms(interval),
            timeout_ms: ms(timeout),
            next_ping: u64::from(ms(interval)),
            sent: NOT_SENT,
        }
    }

    /// The ping timeout, which is also the writer's stall limit, in milliseconds.
    pub(super) fn timeout_ms(&self) -> u64 {
        u64::from(self.timeout_ms)
    }

    /// When the writer must look again: the next ping, or the unanswered one's timeout.
    pub(super) fn deadline(&self) -> u64 {
        if self.sent == NOT_SENT {
            self.next_ping
        } else {
            self.sent + self.timeout_ms()
        }
    }

    pub(super) fn poll(&mut self, now: u64, liveness: &Liveness) -> Ping {
        if self.sent != NOT_SENT {
            if liveness.heard_since_ms(self.sent) {
                self.sent = NOT_SENT;
            } else if now >= self.sent + self.timeout_ms() {
                return Ping::TimedOut;
            } else {
                return Ping::Wait;
            }
        }
        if now >= self.next_ping {
            self.sent = now;
            self.next_ping = now + u64::from(self.interval_ms);
            return Ping::Send;
        }
        Ping::Wait
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn pinger_pings_then_times_out_without_an_answer() {
        let liveness = Liveness::new();
        let mut p = Pinger::new(Duration::from_secs(20), Duration::from_secs(10));
        let now = |l: &Liveness| l.ms(Instant::now());
        assert_eq!(p.poll(now(&liveness), &liveness), Ping::Wait);
        assert_eq!(p.deadline(), 20_000);
        tokio::time::advance(Duration::from_secs(20)).await;
        assert_eq!(p.poll(now(&liveness), &liveness), Ping::Send);
        assert_eq!(p.deadline(), 30_000);
        tokio::time::advance(Duration::from_secs(10)).await;
        assert_eq!(p.poll(now(&liveness), &liveness), Ping::TimedOut);
    }

    #[tokio::test(start_paused = true)]
    async fn pinger_is_satisfied_by_any_frame() {
        let liveness = Liveness::new();
        let start = Instant::now();
        let mut p = Pinger::new(Duration::from_secs(20), Duration::from_secs(10));
        let now = |l: &Liveness| l.ms(Instant::now());
        tokio::time::advance(Duration::from_secs(20)).await;
        assert_eq!(p.poll(now(&liveness), &liveness), Ping::Send);
        tokio::time::advance(Duration::from_secs(3)).await;
        liveness.touch();
        tokio::time::advance(Duration::from_secs(7)).await;
        assert_eq!(p.poll(now(&liveness), &liveness), Ping::Wait);
        assert_eq!(p.deadline(), 40_000);
        assert_eq!(
            liveness.instant(p.deadline()),
            start + Duration::from_secs(40)
        );
    }
}
