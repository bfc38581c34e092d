//! The one writer of a WebSocket connection: it owns the socket's write half, drains the
//! connection's [`Outbox`] in batches (one vectored write for everything queued), sends pings,
//! and sends the close frame. Nothing else writes to the socket.

use std::collections::VecDeque;
use std::io::{self, IoSlice};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::{Buf, Bytes};
use tokio::io::AsyncWrite;
use tokio::time::Instant;

use super::Node;
use crate::config::LimitsConfig;
use crate::metrics::Metrics;
use crate::outbox::{Next, Outbox};
use crate::protocol::ws::{self, close_code};

/// Most frames handed to one `writev` call.
const MAX_IOV: usize = 64;

/// When the peer was last heard from, shared by the reader (which records every frame) and
/// the writer (which pings and times out).
#[derive(Debug)]
pub struct Liveness {
    start: Instant,
    last_seen_ms: AtomicU64,
}

impl Liveness {
    /// Starts the clock now.
    pub fn new() -> Self {
        Self {
            start: Instant::now(),
            last_seen_ms: AtomicU64::new(0),
        }
    }

    fn ms(&self, at: Instant) -> u64 {
        at.saturating_duration_since(self.start).as_millis() as u64
    }

    /// Records that a frame arrived.
    pub fn touch(&self) {
        self.last_seen_ms
            .store(self.ms(Instant::now()), Ordering::Relaxed);
    }

    /// Whether a frame arrived at or after `at`.
    pub fn heard_since(&self, at: Instant) -> bool {
        self.last_seen_ms.load(Ordering::Relaxed) >= self.ms(at)
    }
}

/// How the writer ended.
#[derive(Debug)]
pub enum WriteEnd {
    /// The close frame was sent; `await_peer` when the peer may still answer it.
    Closed {
        /// Whether to wait for the peer's close frame.
        await_peer: bool,
    },
    /// The socket failed or stalled; nothing more can be sent.
    Failed(io::Error),
}

/// Runs the writer until the close frame is sent or the socket fails. `node` gives the limits,
/// the shutdown token and the metrics.
pub async fn run<W: AsyncWrite + Unpin>(
    socket: &mut W,
    outbox: &Outbox,
    liveness: &Liveness,
    node: &Node,
) -> WriteEnd {
    let live = node.live();
    let (limits, shutdown, metrics) = (&live.limits, &node.shutdown, &*node.metrics);
    let mut pinger = Pinger::new(
        Duration::from_secs(limits.ping_interval_secs),
        Duration::from_secs(limits.ping_timeout_secs),
        Instant::now(),
    );
    let mut peer_gone = false;
    // Empty between rounds: `Outbox::take` swaps it with the queue.
    let mut batch = VecDeque::new();
    loop {
        if shutdown.is_cancelled() {
            outbox.close(close_code::GOING_AWAY, "server shutting down", true);
        }
        match pinger.poll(Instant::now(), liveness) {
            Ping::Send => {
                let mut ping = VecDeque::from([ws::ping(b"")]);
                if let Err(e) = write_batch(socket, &mut ping, limits, metrics).await {
                    return WriteEnd::Failed(e);
                }
            }
            Ping::TimedOut => {
                peer_gone = true;
                outbox.close(close_code::PING_TIMEOUT, "ping timeout", false);
            }
            Ping::Wait => {}
        }
        // Decided before any await, so that `Next` is not held in the idle state.
        let close = match outbox.take(&mut batch) {
            Next::Frames => Some(false),
            Next::Close(frame) => {
                // A close frame from `ws::close`: two header bytes, then the code.
                if let Some(code) = frame.get(2..4) {
                    metrics.close_code(u16::from_be_bytes([code[0], code[1]]));
                }
                batch.push_back(frame);
                Some(true)
            }
            Next::Idle => None,
        };
        let Some(close) = close else {
            // An idle connection keeps no batch storage; the queue keeps its slots, so
            // deliveries still never allocate (the next `take` gives it slots again).
            batch = VecDeque::new();
            tokio::select! {
                _ = outbox.wait() => {}
                _ = shutdown.cancelled() => {}
                _ = tokio::time::sleep_until(pinger.deadline()) => {}
            }
            continue;
        };
        if let Err(e) = write_batch(socket, &mut batch, limits, metrics).await {
            return WriteEnd::Failed(e);
        }
        if close {
            return WriteEnd::Closed {
                await_peer: !peer_gone,
            };
        }
    }
}

/// Writes every frame of `batch`, as few `writev` calls as the socket allows. A write that
/// makes no progress for `ping_timeout_secs` fails: the peer has stopped reading.
async fn write_batch<W: AsyncWrite + Unpin>(
    socket: &mut W,
    batch: &mut VecDeque<Bytes>,
    limits: &LimitsConfig,
    metrics: &Metrics,
) -> io::Result<()> {
    let stall = Duration::from_secs(limits.ping_timeout_secs);
    while !batch.is_empty() {
        let written = tokio::select! {
            biased;
            r = write_vectored(socket, batch) => r?,
            _ = tokio::time::sleep(stall) => {
                return Err(io::Error::new(io::ErrorKind::TimedOut, "peer stopped reading"));
            }
        };
        if written == 0 {
            return Err(io::ErrorKind::WriteZero.into());
        }
        metrics.bytes_out_total.add(written as u64);
        consume(batch, written);
    }
    Ok(())
}

/// One `writev` of up to [`MAX_IOV`] frames from the front of `batch`. The slice list is built
/// on each poll, so it is not part of the connection's idle state.
fn write_vectored<'a, W: AsyncWrite + Unpin>(
    socket: &'a mut W,
    batch: &'a VecDeque<Bytes>,
) -> impl Future<Output = io::Result<usize>> + 'a {
    std::future::poll_fn(move |cx| {
        let mut iov = [IoSlice::new(&[]); MAX_IOV];
        let mut n = 0;
        for (slot, frame) in iov.iter_mut().zip(batch.iter()) {
            *slot = IoSlice::new(frame);
            n += 1;
        }
        Pin::new(&mut *socket).poll_write_vectored(cx, &iov[..n])
    })
}

/// Drops the first `n` written bytes from the front of `batch`.
fn consume(batch: &mut VecDeque<Bytes>, mut n: usize) {
    while n > 0 {
        let Some(front) = batch.front_mut() else {
            return;
        };
        if front.len() <= n {
            n -= front.len();
            batch.pop_front();
        } else {
            front.advance(n);
            n = 0;
        }
    }
}

#[derive(Debug, PartialEq, Eq)]
enum Ping {
    Send,
    TimedOut,
    Wait,
}

/// Ping schedule: a ping every `interval`; a ping not answered by any frame within `timeout`
/// means the peer is gone.
#[derive(Debug)]
struct Pinger {
    interval: Duration,
    timeout: Duration,
    next_ping: Instant,
    sent: Option<Instant>,
}

impl Pinger {
    fn new(interval: Duration, timeout: Duration, now: Instant) -> Self {
        Self {
            interval,
            timeout,
            next_ping: now + interval,
            sent: None,
        }
    }

    fn deadline(&self) -> Instant {
        self.sent.map_or(self.next_ping, |sent| sent + self.timeout)
    }

    fn poll(&mut self, now: Instant, liveness: &Liveness) -> Ping {
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

    #[test]
    fn consume_advances_across_frames() {
        let mut batch = VecDeque::from([Bytes::from_static(b"abc"), Bytes::from_static(b"defg")]);
        consume(&mut batch, 5);
        assert_eq!(batch, [&b"fg"[..]]);
        consume(&mut batch, 2);
        assert!(batch.is_empty());
    }

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
