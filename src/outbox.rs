//! A connection's bounded queue of encoded frames, filled by the hub and drained by the
//! connection's one writer.
//!
//! The hub pushes with [`Outbox::push`], which never waits: a full queue means the peer reads
//! too slowly, so the queue is dropped and the connection is closed with
//! [`close_code::SLOW_CONSUMER`]; everyone else goes on at full speed. The writer takes what
//! is queued, up to a vectored write's worth at once ([`Outbox::take_up_to`]), and writes it
//! in one vectored write. The lock is held only to push or to take, never across an await.
//!
//! The queue is bounded in frames and in bytes. The bytes count what is queued plus the batch
//! the writer took last, until it comes back for more (it takes only once that batch is
//! written), so a connection never holds more than `max_bytes` of frames in the server.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, MutexGuard};
use std::task::{Context, Poll, Waker};

use bytes::Bytes;
use futures_util::task::AtomicWaker;

use crate::protocol::ws::{self, close_code};

/// Why a push was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    /// The queue was full (in frames or bytes): the connection is now closing as a slow
    /// consumer.
    Full,
    /// The connection is already closing.
    Closed,
}

/// What the writer should do next.
#[derive(Debug)]
pub enum Next {
    /// Frames were moved into the writer's batch: write them.
    Frames,
    /// Nothing queued, nothing to close: wait for [`Outbox::wait`].
    Empty,
    /// Send this close frame, then end the connection.
    Close(Bytes),
}

/// A bounded queue of frames for one connection.
///
/// One task at a time waits on it (the connection's writer, or a Socket.IO long-poll): the
/// waiter's waker is kept here rather than in the waiting future, so that an idle connection's
/// task holds no wait state of its own. Another may wait for room ([`Outbox::wait_room`]).
#[derive(Debug)]
pub struct Outbox {
    state: Mutex<State>,
    waker: AtomicWaker,
    /// Set by a wake not yet seen by the waiter.
    signalled: AtomicBool,
    max_frames: usize,
    /// `u32`, like the byte counts, so that an outbox and its `Arc` counts take 128 bytes,
    /// a size class of the allocator, in every connection.
    max_bytes: u32,
}

#[derive(Debug)]
struct State {
    /// The frames to write, then, once the connection is closing, the close frame (queued
    /// behind them rather than kept aside: a field of its own would take 32 bytes of every
    /// connection).
    frames: VecDeque<Bytes>,
    /// Bytes of `frames` (the close frame aside) plus `in_flight`; at most `max_bytes`.
    bytes: u32,
    /// Bytes of the batch the writer took last: written once it takes again.
    in_flight: u32,
    /// Closing: nothing more is queued, and the last of `frames`, if any, is the close frame
    /// (it leaves last).
    closed: bool,
    /// Who waits for the queue to drain to half its bounds ([`Outbox::wait_room`]).
    room_waiter: Option<Waker>,
}

/// Slots reserved up front, so that delivering to a connection allocates nothing until a
/// burst outgrows them (the writer takes frames out and leaves the slots). Four slots are 128
/// bytes of every idle connection; a longer burst between two writer rounds grows the queue
/// once, and the writer gives it back its four slots when it has drained it.
const INITIAL_SLOTS: usize = 4;

impl Outbox {
    /// An empty outbox holding at most `max_frames` frames and `max_bytes` bytes (at most
    /// `u32::MAX`).
    pub fn new(max_frames: usize, max_bytes: usize) -> Self {
        Self {
            state: Mutex::new(State {
                frames: VecDeque::with_capacity(INITIAL_SLOTS),
                bytes: 0,
                in_flight: 0,
                closed: false,
                room_waiter: None,
            }),
            waker: AtomicWaker::new(),
            signalled: AtomicBool::new(false),
            max_frames,
            max_bytes: u32::try_from(max_bytes).unwrap_or(u32::MAX),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // The lock guards plain data and no code under it can panic midway; a poisoned lock
        // still holds a consistent queue.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Queues `frame`. Never waits. On overflow (frames or bytes) the queue is dropped and
    /// the connection is set to close with [`close_code::SLOW_CONSUMER`].
    pub fn push(&self, frame: Bytes) -> Result<(), Refused> {
        let mut state = self.lock();
        if state.closed {
            return Err(Refused::Closed);
        }
        // A frame over 4 GiB counts as 4 GiB: over any bound.
        let len = u32::try_from(frame.len()).unwrap_or(u32::MAX);
        if state.frames.len() >= self.max_frames || state.bytes.saturating_add(len) > self.max_bytes
        {
            state.frames.clear();
            state.bytes = state.in_flight;
            state
                .frames
                .push_back(ws::close(close_code::SLOW_CONSUMER, "slow consumer"));
            state.closed = true;
            let waiter = state.room_waiter.take();
            drop(state);
            self.wake();
            wake_room_waiter(waiter);
            return Err(Refused::Full);
        }
        let was_empty = state.frames.is_empty();
        state.bytes += len;
        state.frames.push_back(frame);
        drop(state);
        // A writer with frames in hand re-checks the queue before it waits, so only the
        // empty-to-non-empty transition needs a wake-up.
        if was_empty {
            self.wake();
        }
        Ok(())
    }

    /// Closes the connection with `code` after the frames already queued (`flush`), or at
    /// once, dropping them. Later pushes are refused. The first close wins.
    pub fn close(&self, code: u16, reason: &str, flush: bool) {
        let mut state = self.lock();
        if state.closed {
            return;
        }
        if !flush {
            state.frames.clear();
            state.bytes = state.in_flight;
        }
        state.frames.push_back(ws::close(code, reason));
        state.closed = true;
        let waiter = state.room_waiter.take();
        drop(state);
        self.wake();
        wake_room_waiter(waiter);
    }

    /// Whether the connection is closing.
    pub(crate) fn is_closed(&self) -> bool {
        self.lock().closed
    }

    /// For the writer: moves all queued frames into `batch` (which must be empty: the last
    /// batch is written), or hands over the close frame once the queue is drained.
    pub fn take(&self, batch: &mut VecDeque<Bytes>) -> Next {
        let mut state = self.lock();
        // The last batch is written: its bytes are free; what is taken now is in flight.
        state.bytes -= state.in_flight;
        state.in_flight = state.bytes;
        let waiter = state.room_waiter.take();
        let close = if state.closed {
            state.frames.pop_back()
        } else {
            None
        };
        let next = if !state.frames.is_empty() {
            std::mem::swap(&mut state.frames, batch);
            if state.frames.capacity() < INITIAL_SLOTS {
                // The writer's first batch came without slots: give the queue its own, here on
                // the writer's side, so that deliveries never allocate.
                state.frames.reserve(INITIAL_SLOTS);
            }
            // The close frame stays queued, behind the batch.
            state.frames.extend(close);
            Next::Frames
        } else if let Some(close) = close {
            Next::Close(close)
        } else {
            Next::Empty
        };
        drop(state);
        wake_room_waiter(waiter);
        next
    }

    /// Resolves once the queue holds at most half its bounds (frames and bytes, the batch
    /// being written included), or the connection is closing: for a task that queues many
    /// frames, or a large one, and lets the writer drain them first. For one waiter at a time;
    /// woken by the writer's next [`Outbox::take_up_to`] (or a poll's [`Outbox::take`]).
    pub(crate) async fn wait_room(&self) {
        std::future::poll_fn(|cx| {
            let mut state = self.lock();
            let roomy =
                state.frames.len() < self.max_frames / 2 && state.bytes <= self.max_bytes / 2;
            if roomy || state.closed {
                state.room_waiter = None;
                return Poll::Ready(());
            }
            // Registered under the lock the writer takes to drain: no wake-up is lost.
            match &mut state.room_waiter {
                Some(waker) => waker.clone_from(cx.waker()),
                slot => *slot = Some(cx.waker().clone()),
            }
            Poll::Pending
        })
        .await
    }

    /// For the writer: moves up to `max` queued frames, oldest first, to `put`, or hands over
    /// the close frame once the queue is drained. Unlike [`Outbox::take`] the queue keeps its
    /// slots, so a writer that writes what it took before it takes again allocates nothing;
    /// once drained, a queue that a burst grew goes back to its initial slots.
    pub(crate) fn take_up_to(&self, max: usize, mut put: impl FnMut(Bytes)) -> Next {
        let mut state = self.lock();
        // The last batch is written: its bytes are free; what is taken now is in flight.
        state.bytes -= state.in_flight;
        state.in_flight = 0;
        let waiter = state.room_waiter.take();
        // Closing, the last frame is the close frame: it goes once the others have.
        let frames = state.frames.len() - usize::from(state.closed && !state.frames.is_empty());
        let next = if frames > 0 {
            let n = max.min(frames);
            let mut taken = 0;
            state.frames.drain(..n).for_each(|frame| {
                taken += frame.len() as u32;
                put(frame);
            });
            state.in_flight = taken;
            Next::Frames
        } else if let Some(close) = state.frames.pop_front() {
            Next::Close(close) // the queue is closed and holds nothing else
        } else {
            if state.frames.capacity() > INITIAL_SLOTS {
                state.frames = VecDeque::with_capacity(INITIAL_SLOTS);
            }
            Next::Empty
        };
        drop(state);
        wake_room_waiter(waiter);
        next
    }

    /// Resolves when something was queued, a close was requested or [`Outbox::wake`] was
    /// called since the waiter last returned. For one waiter at a time.
    pub(crate) async fn wait(&self) {
        std::future::poll_fn(|cx| self.poll_wait(cx)).await
    }

    /// [`Outbox::wait`] as a poll: `Ready` once per wake.
    pub(crate) fn poll_wait(&self, cx: &mut Context<'_>) -> Poll<()> {
        if self.signalled.swap(false, Ordering::AcqRel) {
            return Poll::Ready(());
        }
        self.waker.register(cx.waker());
        // A wake between the check above and the registration found no waker to call.
        if self.signalled.swap(false, Ordering::AcqRel) {
            Poll::Ready(())
        } else {
            Poll::Pending
        }
    }

    /// Wakes the waiter: something changed (frames, a close), or a deadline it asked the
    /// ticker for has come.
    pub(crate) fn wake(&self) {
        self.signalled.store(true, Ordering::Release);
        self.waker.wake();
    }

    /// Frames queued now (the close frame aside).
    pub fn len(&self) -> usize {
        let state = self.lock();
        state.frames.len() - usize::from(state.closed && !state.frames.is_empty())
    }

    /// The most frames this outbox holds before the connection counts as a slow consumer.
    pub(crate) fn capacity(&self) -> usize {
        self.max_frames
    }

    /// The most bytes this outbox holds (queued and being written) before the connection
    /// counts as a slow consumer.
    pub(crate) fn max_bytes(&self) -> usize {
        self.max_bytes as usize
    }

    /// Whether no frame is queued.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Wakes `waiter`, if any, once the lock is released.
fn wake_room_waiter(waiter: Option<Waker>) {
    if let Some(waker) = waiter {
        waker.wake();
    }
}

#[cfg(test)]
mod tests;
