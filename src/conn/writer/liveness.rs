//! Whether the peer of a connection is still there: [`Liveness`], when it was last heard
//! from (the reader records every frame), and the writer's ping schedule: a ping every
//! interval, and the peer counted gone when no frame answers one within the timeout.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::time::Instant;

/// When the peer was last heard from, shared by the reader (which records every frame) and
/// the writer (which pings and times out).
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

    fn ms(&self, at: Instant) -> u64 {
        at.saturating_duration_since(self.start).as_millis() as u64
    }

    /// Records that a frame arrived.
    pub(crate) fn touch(&self) {
        self.last_seen_ms
            .store(self.ms(Instant::now()), Ordering::Relaxed);
    }

    /// Whether a frame arrived at or after `at`.
    pub(crate) fn heard_since(&self, at: Instant) -> bool {
        self.last_seen_ms.load(Ordering::Relaxed) >= self.ms(at)
    }
}

/// What [`Pinger::poll`] asks of the writer.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Ping {
    Send,
    TimedOut,
    Wait,
}

/// Ping schedule: a ping every `interval`; a ping not answered by any frame within `timeout`
/// means the peer is gone.
#[derive(Debug)]
pub(super) struct Pinger {
    interval: Duration,
    /// Also the writer's stall limit.
    pub(super) timeout: Duration,
    next_ping: Instant,
    sent: Option<Instant>,
}

impl Pinger {
    pub(super) fn new(interval: Duration, timeout: Duration, now: Instant) -> Self {
        Self {
            interval,
            timeout,
            next_ping: now + interval,
            sent: None,
        }
    }

    pub(super) fn deadline(&self) -> Instant {
        self.sent.map_or(self.next_ping, |sent| sent + self.timeout)
    }

    pub(super) fn poll(&mut self, now: Instant, liveness: &Liveness) -> Ping {
        if let Some(sent) = self.sent {
            if liveness.heard_since(sent) {
                self.sent = None;
            } else if now >= sent + self.timeout {
                return Ping::TimedOut;
            } else {
                return Ping::Wait;
            }
        }
        if now >= self.next_ping {
            self.sent = Some(now);
            self.next_ping = now + self.interval;
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
        let start = Instant::now();
        let mut p = Pinger::new(Duration::from_secs(20), Duration::from_secs(10), start);
        assert_eq!(p.poll(start, &liveness), Ping::Wait);
        assert_eq!(p.deadline(), start + Duration::from_secs(20));
        tokio::time::advance(Duration::from_secs(20)).await;
        assert_eq!(p.poll(Instant::now(), &liveness), Ping::Send);
        assert_eq!(p.deadline(), start + Duration::from_secs(30));
        tokio::time::advance(Duration::from_secs(10)).await;
        assert_eq!(p.poll(Instant::now(), &liveness), Ping::TimedOut);
    }

    #[tokio::test(start_paused = true)]
    async fn pinger_is_satisfied_by_any_frame() {
        let liveness = Liveness::new();
        let start = Instant::now();
        let mut p = Pinger::new(Duration::from_secs(20), Duration::from_secs(10), start);
        tokio::time::advance(Duration::from_secs(20)).await;
        assert_eq!(p.poll(Instant::now(), &liveness), Ping::Send);
        tokio::time::advance(Duration::from_secs(3)).await;
        liveness.touch();
        tokio::time::advance(Duration::from_secs(7)).await;
        assert_eq!(p.poll(Instant::now(), &liveness), Ping::Wait);
        assert_eq!(p.deadline(), start + Duration::from_secs(40));
    }
}
