//! Coarse, shared timers for connections: ping deadlines, stalled writes and shutdown.
//!
//! A tokio timer lives in the future that waits on it, so a `sleep` per connection would be
//! part of every idle connection's task. Connections instead ask the node's one [`Ticker`] to
//! wake their writer at a deadline (through the [`Outbox`] the writer waits on); the writer
//! then looks at the clock and decides what is due. An entry is a weak pointer, a closed
//! connection's entries simply find nothing to wake. Deadlines are kept to [`RESOLUTION`]: a
//! wake comes at the deadline or up to that much after it, never before.
//!
//! On shutdown the ticker wakes every connection waiting on it, and from then on wakes at
//! once whoever asks; the writer sees the shutdown and closes.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError, Weak};
use std::time::Duration;

use tokio::time::{Instant, MissedTickBehavior};
use tokio_util::sync::CancellationToken;

use crate::outbox::Outbox;

/// How precisely deadlines are kept.
pub(crate) const RESOLUTION: Duration = Duration::from_millis(100);

/// Wakes connections' writers at their deadlines.
#[derive(Debug)]
pub(crate) struct Ticker {
    start: Instant,
    /// Outboxes to wake, by the tick at or after their deadline.
    due: Mutex<BTreeMap<u64, Vec<Weak<Outbox>>>>,
    stopped: AtomicBool,
}

impl Default for Ticker {
    fn default() -> Self {
        Self {
            start: Instant::now(),
            due: Mutex::new(BTreeMap::new()),
            stopped: AtomicBool::new(false),
        }
    }
}

impl Ticker {
    /// Wakes the writer of `outbox` at `at` (or up to [`RESOLUTION`] later); at once after
    /// the shutdown.
    pub(crate) fn wake_at(&self, at: Instant, outbox: &Arc<Outbox>) {
        if !self.stopped.load(Ordering::Acquire) {
            let since = at.saturating_duration_since(self.start);
            let tick = since.as_nanos().div_ceil(RESOLUTION.as_nanos()) as u64;
            self.lock()
                .entry(tick)
                .or_default()
                .push(Arc::downgrade(outbox));
            // Stopped meanwhile: the shutdown may have woken everyone before this entry.
            if !self.stopped.load(Ordering::Acquire) {
                return;
            }
        }
        outbox.wake();
    }

    /// Whether the node is shutting down: set before the ticker wakes every connection
    /// for the shutdown, so a writer woken by it sees it.
    pub(crate) fn stopped(&self) -> bool {
        self.stopped.load(Ordering::Acquire)
    }

    /// Entries waiting now (stale ones included, until their tick passes).
    #[cfg(test)]
    fn pending(&self) -> usize {
        self.lock().values().map(Vec::len).sum()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<u64, Vec<Weak<Outbox>>>> {
        self.due.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Runs the ticks until `shutdown`, then wakes everyone.
    pub(crate) async fn run(self: Arc<Self>, shutdown: CancellationToken) {
        let mut ticks = tokio::time::interval(RESOLUTION);
        ticks.set_missed_tick_behavior(MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = ticks.tick() => {}
                _ = shutdown.cancelled() => break,
            }
            let now = Instant::now().saturating_duration_since(self.start);
            let tick = (now.as_nanos() / RESOLUTION.as_nanos()) as u64;
            let due = {
                let mut due = self.lock();
                let later = due.split_off(&(tick + 1));
                std::mem::replace(&mut *due, later)
            };
            wake(due);
        }
        self.stopped.store(true, Ordering::Release);
        let all = std::mem::take(&mut *self.lock());
        wake(all);
    }
}

fn wake(due: BTreeMap<u64, Vec<Weak<Outbox>>>) {
    for outbox in due.into_values().flatten() {
        if let Some(outbox) = outbox.upgrade() {
            outbox.wake();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn wakes_at_the_deadline_not_before() {
        let ticker = Arc::new(Ticker::default());
        let shutdown = CancellationToken::new();
        tokio::spawn(ticker.clone().run(shutdown.clone()));
        let outbox = Arc::new(Outbox::new(4, 1 << 20));
        let start = Instant::now();
        ticker.wake_at(start + Duration::from_millis(1_050), &outbox);
        outbox.wait().await;
        let waited = start.elapsed();
        assert!(waited >= Duration::from_millis(1_050), "{waited:?}");
        assert!(
            waited <= Duration::from_millis(1_050) + 2 * RESOLUTION,
            "{waited:?}"
        );
        assert_eq!(ticker.pending(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn shutdown_wakes_everyone_and_then_at_once() {
        let ticker = Arc::new(Ticker::default());
        let shutdown = CancellationToken::new();
        let running = tokio::spawn(ticker.clone().run(shutdown.clone()));
        let outbox = Arc::new(Outbox::new(4, 1 << 20));
        ticker.wake_at(Instant::now() + Duration::from_secs(3600), &outbox);
        let gone = Arc::new(Outbox::new(4, 1 << 20));
        ticker.wake_at(Instant::now() + Duration::from_secs(3600), &gone);
        drop(gone);
        shutdown.cancel();
        running.await.unwrap();
        tokio::time::timeout(Duration::from_millis(1), outbox.wait())
            .await
            .expect("woken by the shutdown");
        ticker.wake_at(Instant::now() + Duration::from_secs(3600), &outbox);
        tokio::time::timeout(Duration::from_millis(1), outbox.wait())
            .await
            .expect("woken at once after the shutdown");
        assert_eq!(ticker.pending(), 0);
    }
}
