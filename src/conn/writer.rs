//! The one writer of a WebSocket connection: it owns the socket's write half, drains the
//! connection's [`Outbox`] in batches (one vectored write for everything queued), sends pings,
//! and sends the close frame. Nothing else writes to the socket. When the peer was last heard
//! from, and when to ping it, is kept in [`liveness`].

use std::cell::Cell;
use std::io::{self, IoSlice};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use bytes::{Buf, Bytes};
use tokio::io::AsyncWrite;
use tokio::time::Instant;

use crate::config::LimitsConfig;
use crate::node::Node;
use crate::outbox::{Next, Outbox};
use crate::protocol::ws::{self, close_code};

mod liveness;

pub(crate) use liveness::Liveness;
use liveness::{Ping, Pinger};

/// Most frames handed to one `writev` call.
const MAX_IOV: usize = 64;

/// How the writer ended.
#[derive(Debug)]
pub(crate) enum WriteEnd {
    /// The close frame was sent; `await_peer` when the peer may still answer it.
    Closed {
        /// Whether to wait for the peer's close frame.
        await_peer: bool,
    },
    /// The socket failed or stalled; nothing more can be sent.
    Failed(io::Error),
}

/// Runs the writer until the close frame is sent or the socket fails; see [`Writer`].
pub(crate) async fn run<W: AsyncWrite + Unpin>(
    socket: &mut W,
    outbox: &Arc<Outbox>,
    liveness: &Liveness,
    node: &Node,
) -> WriteEnd {
    let mut writer = Writer::new(outbox.clone(), &node.live().limits);
    std::future::poll_fn(|cx| writer.poll(socket, liveness, node, cx)).await
}

/// The writer of one connection, as a state machine polled by the connection's task.
///
/// It keeps no timer of its own: it asks the node's [`Ticker`](crate::node::ticker::Ticker) to wake
/// it (through the outbox, the one thing it waits on besides the socket) at its next ping
/// deadline, or when a blocked write would count as stalled. While idle it holds no frames,
/// no timer and no waiter.
#[derive(Debug)]
pub(crate) struct Writer {
    outbox: Arc<Outbox>,
    /// Also the stall limit: a write that makes no progress for the ping timeout fails, the
    /// peer has stopped reading.
    pinger: Pinger,
    /// Frames the socket did not take at once, a ping or the close frame; empty, without
    /// storage, while the socket keeps up (frames taken from the outbox are written from the
    /// stack).
    batch: Vec<Bytes>,
    /// The batch ends with the close frame.
    closing: bool,
    /// The ping went unanswered: the peer will not answer the close either.
    peer_gone: bool,
    /// The deadline the ticker will wake this writer at, or [`NEVER`] (times are on the
    /// connection's [`Liveness`] clock).
    wake_at: u64,
    /// Since when the socket has refused the batch, or [`NEVER`].
    blocked_since: u64,
}

/// No time: no wake asked of the ticker, or a socket not refusing the batch.
const NEVER: u64 = u64::MAX;

impl Writer {
    /// A writer draining `outbox`, with the ping and stall limits of `limits`.
    pub(crate) fn new(outbox: Arc<Outbox>, limits: &LimitsConfig) -> Self {
        Self {
            outbox,
            pinger: Pinger::new(
                Duration::from_secs(limits.ping_interval_secs),
                Duration::from_secs(limits.ping_timeout_secs),
            ),
            batch: Vec::new(),
            closing: false,
            peer_gone: false,
            wake_at: NEVER,
            blocked_since: NEVER,
        }
    }

    /// The outbox this writer drains.
    pub(crate) fn outbox(&self) -> &Arc<Outbox> {
        &self.outbox
    }

    /// Writes what there is to write; `Ready` once the close frame is sent or the socket
    /// failed or stalled. `node` gives the ticker (and the shutdown through it) and the metrics.
    pub(crate) fn poll<W: AsyncWrite + Unpin>(
        &mut self,
        socket: &mut W,
        liveness: &Liveness,
        node: &Node,
        cx: &mut Context<'_>,
    ) -> Poll<WriteEnd> {
        // The shutdown and the ping schedule are looked at once per wake, not once per batch
        // written: a busy writer drains several batches per wake, and whatever a deadline or
        // the shutdown asks for comes with a wake of its own (the ticker's).
        let mut looked = false;
        loop {
            if self.batch.is_empty() {
                if self.closing {
                    return Poll::Ready(WriteEnd::Closed {
                        await_peer: !self.peer_gone,
                    });
                }
                if !looked {
                    looked = true;
                    if node.ticker.stopped() {
                        self.outbox
                            .close(close_code::GOING_AWAY, "server shutting down", true);
                    }
                    match self.pinger.poll(liveness.ms(Instant::now()), liveness) {
                        Ping::Send => self.batch.push(ws::ping(b"")),
                        Ping::TimedOut => {
                            self.peer_gone = true;
                            self.outbox
                                .close(close_code::PING_TIMEOUT, "ping timeout", false);
                        }
                        Ping::Wait => {}
                    }
                }
                if self.batch.is_empty() {
                    match self.take_and_write(socket, node, cx) {
                        Taken::Written => continue,
                        Taken::Close(frame) => {
                            // A close frame from `ws::close`: two header bytes, then the code.
                            if let Some(code) = frame.get(2..4) {
                                node.metrics
                                    .close_code(u16::from_be_bytes([code[0], code[1]]));
                            }
                            self.batch.push(frame);
                            self.closing = true;
                        }
                        Taken::Empty => {
                            // Idle: no batch storage; the queue keeps its slots, so deliveries
                            // never allocate, and neither does the next round.
                            self.batch = Vec::new();
                            let deadline = self.pinger.deadline();
                            if self.wake_at != deadline {
                                let at = liveness.instant(deadline);
                                node.ticker.wake_at(at, &self.outbox);
                                self.wake_at = deadline;
                            }
                            ready!(self.outbox.poll_wait(cx));
                            looked = false; // a wake, maybe the ticker's: look again
                            continue;
                        }
                        Taken::Failed(e) => return Poll::Ready(WriteEnd::Failed(e)),
                    }
                }
            }
            match write_vectored(socket, self.batch.iter(), cx) {
                Poll::Ready(Ok(0)) => {
                    return Poll::Ready(WriteEnd::Failed(io::ErrorKind::WriteZero.into()));
                }
                Poll::Ready(Ok(written)) => {
                    self.blocked_since = NEVER;
                    node.metrics.bytes_out_total.add(written as u64);
                    consume(&mut self.batch, written);
                }
                Poll::Ready(Err(e)) => return Poll::Ready(WriteEnd::Failed(e)),
                Poll::Pending => {
                    let now = liveness.ms(Instant::now());
                    let timeout = self.pinger.timeout_ms();
                    if self.blocked_since == NEVER {
                        self.blocked_since = now;
                        let at = liveness.instant(now + timeout);
                        node.ticker.wake_at(at, &self.outbox);
                    }
                    if now.saturating_sub(self.blocked_since) >= timeout {
                        let stalled =
                            io::Error::new(io::ErrorKind::TimedOut, "peer stopped reading");
                        return Poll::Ready(WriteEnd::Failed(stalled));
                    }
                    // Registers for the ticker's wake. A wake for queued frames is spent here,
                    // which loses nothing: the queue is taken whole once the batch is out.
                    if self.outbox.poll_wait(cx).is_ready() {
                        looked = false;
                        continue; // the stall deadline may have come: look again
                    }
                    return Poll::Pending;
                }
            }
        }
    }

    /// Takes up to [`MAX_IOV`] queued frames and writes them from the runtime thread's
    /// scratch list: the batch gets storage only for what the socket does not take at once,
    /// so writing to a connection that keeps up allocates nothing. (The list is the thread's
    /// rather than an array on the stack, which would be filled and dropped whole, all
    /// [`MAX_IOV`] frames of it, however few were taken.)
    fn take_and_write<W: AsyncWrite + Unpin>(
        &mut self,
        socket: &mut W,
        node: &Node,
        cx: &mut Context<'_>,
    ) -> Taken {
        let mut frames = SCRATCH.take();
        frames.reserve(MAX_IOV);
        let taken = self.outbox.take_up_to(MAX_IOV, |frame| frames.push(frame));
        let taken = match taken {
            Next::Frames => {
                let written = match write_vectored(socket, frames.iter(), cx) {
                    Poll::Ready(Ok(0)) => Err(io::ErrorKind::WriteZero.into()),
                    Poll::Ready(Ok(written)) => {
                        self.blocked_since = NEVER;
                        node.metrics.bytes_out_total.add(written as u64);
                        Ok(written)
                    }
                    Poll::Ready(Err(e)) => Err(e),
                    // The batch is written again at once and handles the wait.
                    Poll::Pending => Ok(0),
                };
                match written {
                    Ok(written) => {
                        let rest = unwritten(&mut frames, written);
                        if !rest.is_empty() {
                            self.batch.extend(rest.iter_mut().map(std::mem::take));
                        }
                        Taken::Written
                    }
                    Err(e) => Taken::Failed(e),
                }
            }
            Next::Close(frame) => Taken::Close(frame),
            Next::Empty => Taken::Empty,
        };
        frames.clear();
        SCRATCH.set(frames);
        taken
    }
}

thread_local! {
    /// Each runtime thread's list of the frames a writer took, written and then cleared
    /// within one poll.
    static SCRATCH: Cell<Vec<Bytes>> = const { Cell::new(Vec::new()) };
}

/// What [`Writer::take_and_write`] did.
enum Taken {
    /// Frames were written; those the socket did not take are in the batch.
    Written,
    /// The queue is drained and the connection closes with this frame.
    Close(Bytes),
    /// Nothing to write.
    Empty,
    /// The socket failed.
    Failed(io::Error),
}

/// One `writev` of up to [`MAX_IOV`] frames from the front of `batch`. The slice list is built
/// on each poll, so it is not part of the connection's idle state.
fn write_vectored<'a, W: AsyncWrite + Unpin>(
    socket: &mut W,
    batch: impl Iterator<Item = &'a Bytes>,
    cx: &mut Context<'_>,
) -> Poll<io::Result<usize>> {
    let mut iov = [IoSlice::new(&[]); MAX_IOV];
    let mut n = 0;
    for (slot, frame) in iov.iter_mut().zip(batch) {
        *slot = IoSlice::new(frame);
        n += 1;
    }
    Pin::new(&mut *socket).poll_write_vectored(cx, &iov[..n])
}

/// The frames of `frames` not written yet once its first `n` bytes are.
fn unwritten(frames: &mut [Bytes], mut n: usize) -> &mut [Bytes] {
    let mut at = 0;
    while at < frames.len() && frames[at].len() <= n {
        n -= frames[at].len();
        at += 1;
    }
    if let Some(front) = frames.get_mut(at) {
        front.advance(n);
    }
    &mut frames[at..]
}

/// Drops the first `n` written bytes from the front of `batch` (at most [`MAX_IOV`] frames:
/// what follows them moves up, a few pointers).
fn consume(batch: &mut Vec<Bytes>, n: usize) {
    let written = batch.len() - unwritten(batch, n).len();
    batch.drain(..written);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn consume_advances_across_frames() {
        let mut batch = vec![Bytes::from_static(b"abc"), Bytes::from_static(b"defg")];
        consume(&mut batch, 5);
        assert_eq!(batch, [&b"fg"[..]]);
        consume(&mut batch, 2);
        assert!(batch.is_empty());
    }

    #[test]
    fn unwritten_is_what_follows_the_written_bytes() {
        let mut frames = [Bytes::from_static(b"abc"), Bytes::from_static(b"defg")];
        assert_eq!(unwritten(&mut frames, 5), [&b"fg"[..]]);
        let mut frames = [Bytes::from_static(b"abc"), Bytes::from_static(b"defg")];
        assert_eq!(unwritten(&mut frames, 3), [&b"defg"[..]]);
        assert!(unwritten(&mut frames, 7).is_empty());
        let mut frames = [Bytes::from_static(b"abc")];
        assert_eq!(unwritten(&mut frames, 0), [&b"abc"[..]]);
    }
}
