//! The subscriber's backlog bound. The redis crate reads a Pub/Sub connection as fast as the
//! socket delivers into a queue of its own without a bound, so Redis's
//! `client-output-buffer-limit pubsub` never applies to a node that handles its messages
//! more slowly than they come (CPU-starved, overloaded): the backlog would grow in the
//! node's memory. So the node measures the backlog's age with its own clock: every
//! interval it publishes a probe carrying its local send instant on a channel only it
//! subscribes to, on the same connection as its rooms. Pub/Sub delivers in order on a
//! connection, so the time the probe takes to reach the subscriber loop is how old the
//! messages waiting ahead of it are. Past `redis.subscriber_lag_max_ms` (a probe that comes
//! back that late, or one that has not come back within it) the subscriber drops its
//! connection, which frees the backlog, and reconnects; every room is then healed from the
//! history, as after any reconnect.

use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use redis::RedisError;
use tokio::time::{Instant, Interval, MissedTickBehavior};

use super::RedisTransport;

/// Probes in flight, at most: past it the oldest is overdue anyway.
const IN_FLIGHT_MAX: usize = 64;
/// The longest interval between probes.
const INTERVAL_MAX: Duration = Duration::from_secs(1);

/// One subscriber connection's probes.
struct Probe {
    /// The origin of the instants the probes carry.
    origin: Instant,
    lag_max: Duration,
    /// Send instants (microseconds since `origin`) of the probes not back yet, oldest first.
    in_flight: VecDeque<u64>,
}

/// What a probe found.
enum Verdict {
    /// The subscriber keeps up.
    Fine,
    /// The subscriber is this far behind, more than the bound.
    Behind(Duration),
}

impl Probe {
    fn new(lag_max: Duration) -> Self {
        Self {
            origin: Instant::now(),
            lag_max,
            in_flight: VecDeque::new(),
        }
    }

    /// How often a probe goes out: half the bound, so one overdue probe is noticed by about
    /// 1.5 times the bound; at least once a second (one small `PUBLISH` per node).
    fn interval(lag_max: Duration) -> Duration {
        (lag_max / 2).clamp(Duration::from_millis(1), INTERVAL_MAX)
    }

    /// How long the oldest probe in flight has been out, when that is over the bound (or
    /// when too many are in flight).
    fn overdue(&self, now: Instant) -> Option<Duration> {
        let &oldest = self.in_flight.front()?;
        let out_for = now
            .duration_since(self.origin)
            .saturating_sub(Duration::from_micros(oldest));
        (out_for > self.lag_max || self.in_flight.len() >= IN_FLIGHT_MAX).then_some(out_for)
    }

    /// The payload of a probe sent at `now`: its instant, in microseconds since `origin`.
    fn send(&mut self, now: Instant) -> String {
        let sent = now.duration_since(self.origin).as_micros() as u64;
        self.in_flight.push_back(sent);
        sent.to_string()
    }

    /// A probe whose `PUBLISH` failed is not waited for: it says nothing of the subscriber
    /// (the publisher connection reports its own failures).
    fn not_sent(&mut self, payload: &str) {
        if let Ok(sent) = payload.parse::<u64>() {
            self.in_flight.retain(|&s| s != sent);
        }
    }

    /// A probe came back on the subscriber connection at `now`. One this connection did not
    /// send (an earlier connection's, or a process reusing this node's name) is ignored.
    fn arrived(&mut self, payload: &[u8], now: Instant) -> Verdict {
        let Some(sent) = std::str::from_utf8(payload)
            .ok()
            .and_then(|p| p.parse::<u64>().ok())
        else {
            return Verdict::Fine;
        };
        let Some(position) = self.in_flight.iter().position(|&s| s == sent) else {
            return Verdict::Fine;
        };
        // In order on the connection: the earlier ones are not coming any more.
        self.in_flight.drain(..=position);
        let lag = now
            .duration_since(self.origin)
            .saturating_sub(Duration::from_micros(sent));
        if lag > self.lag_max {
            Verdict::Behind(lag)
        } else {
            Verdict::Fine
        }
    }
}

/// Why the subscriber dropped its connection: it fell `lag` behind, over `lag_max`.
fn lag_error(lag: Duration, lag_max: Duration) -> RedisError {
    RedisError::from(std::io::Error::new(
        std::io::ErrorKind::TimedOut,
        format!(
            "the subscriber fell {} ms behind its redis channels (redis.subscriber_lag_max_ms \
             = {}); dropped its connection and its backlog, reconnecting to heal from the history",
            lag.as_millis(),
            lag_max.as_millis()
        ),
    ))
}

/// A probe's `PUBLISH` on the publisher connection: its payload, and whether Redis took it.
type ProbePublish<'a> = Pin<Box<dyn Future<Output = (String, bool)> + Send + 'a>>;

/// One subscriber connection's probing: the probes, when the next goes out, and the
/// `PUBLISH` in flight.
pub(super) struct Prober<'a> {
    transport: &'a RedisTransport,
    probe: Probe,
    tick: Interval,
    publishing: Option<ProbePublish<'a>>,
}

impl<'a> Prober<'a> {
    pub(super) fn new(transport: &'a RedisTransport) -> Self {
        let mut tick = tokio::time::interval(Probe::interval(transport.lag_max));
        tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
        Self {
            transport,
            probe: Probe::new(transport.lag_max),
            tick,
            publishing: None,
        }
    }

    /// Sends a probe every interval, one `PUBLISH` at a time, raced in the subscriber loop
    /// rather than awaited in it so that the loop goes on receiving meanwhile; ends with
    /// the reason to drop the connection once a probe is overdue. Cancel-safe: the
    /// `PUBLISH` in flight is kept across calls.
    pub(super) async fn run(&mut self) -> RedisError {
        loop {
            tokio::select! {
                _ = self.tick.tick() => {
                    if let Some(out_for) = self.probe.overdue(Instant::now()) {
                        return self.transport.fell_behind(out_for);
                    }
                    if self.publishing.is_none() {
                        let payload = self.probe.send(Instant::now());
                        self.publishing = Some(Box::pin(self.transport.publish_probe(payload)));
                    }
                }
                (payload, taken) = published(&mut self.publishing) => {
                    self.publishing = None;
                    if !taken {
                        self.probe.not_sent(&payload);
                    }
                }
            }
        }
    }

    /// A probe came back: the reason to drop the connection when it came too late.
    pub(super) fn arrived(&mut self, payload: &[u8]) -> Option<RedisError> {
        match self.probe.arrived(payload, Instant::now()) {
            Verdict::Behind(lag) => Some(self.transport.fell_behind(lag)),
            Verdict::Fine => None,
        }
    }
}

/// The end of the `PUBLISH` in flight; never, while none is.
async fn published(publishing: &mut Option<ProbePublish<'_>>) -> (String, bool) {
    match publishing {
        Some(publish) => publish.await,
        None => std::future::pending().await,
    }
}

impl RedisTransport {
    /// Publishes a probe with `payload` on this node's probe channel; whether Redis took it.
    async fn publish_probe(&self, payload: String) -> (String, bool) {
        let mut publish = redis::cmd("PUBLISH");
        publish.arg(&self.probe_channel).arg(&payload);
        let taken = self.scripts.query::<i64>(&publish).await.is_ok();
        (payload, taken)
    }

    /// The subscriber fell `lag` behind: counted here, logged (at warn, once) by the
    /// subscriber loop as the reason its connection is dropped.
    fn fell_behind(&self, lag: Duration) -> RedisError {
        self.metrics.backplane_lag_cuts_total.inc();
        lag_error(lag, self.lag_max)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_late_or_missing_probe_is_over_the_bound() {
        let bound = Duration::from_millis(100);
        let mut probe = Probe::new(bound);
        let first = probe.send(Instant::now());
        tokio::time::advance(Duration::from_millis(40)).await;
        assert!(matches!(
            probe.arrived(first.as_bytes(), Instant::now()),
            Verdict::Fine
        ));
        // Another connection's probe, or garbage, is ignored.
        assert!(matches!(
            probe.arrived(b"12", Instant::now()),
            Verdict::Fine
        ));
        let late = probe.send(Instant::now());
        tokio::time::advance(Duration::from_millis(150)).await;
        match probe.arrived(late.as_bytes(), Instant::now()) {
            Verdict::Behind(lag) => assert_eq!(lag, Duration::from_millis(150)),
            Verdict::Fine => panic!("150 ms is over the bound"),
        }
        // One that does not come back is overdue once out for longer than the bound.
        assert_eq!(probe.overdue(Instant::now()), None);
        probe.send(Instant::now());
        tokio::time::advance(Duration::from_millis(60)).await;
        probe.send(Instant::now());
        tokio::time::advance(Duration::from_millis(40)).await;
        assert_eq!(probe.overdue(Instant::now()), None);
        tokio::time::advance(Duration::from_millis(20)).await;
        assert_eq!(
            probe.overdue(Instant::now()),
            Some(Duration::from_millis(120))
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_failed_publish_is_not_waited_for() {
        let mut probe = Probe::new(Duration::from_millis(100));
        let lost = probe.send(Instant::now());
        probe.not_sent(&lost);
        tokio::time::advance(Duration::from_millis(500)).await;
        assert_eq!(probe.overdue(Instant::now()), None);
    }
}
