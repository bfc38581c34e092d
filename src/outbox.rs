//! A connection's bounded queue of encoded frames, filled by the hub and drained by the
//! connection's one writer.
//!
//! The hub pushes with [`Outbox::push`], which never waits: a full queue means the peer reads
//! too slowly, so the queue is dropped and the connection is closed with
//! [`close_code::SLOW_CONSUMER`]; everyone else goes on at full speed. The writer takes what
//! is queued, up to a vectored write's worth at once ([`Outbox::take_up_to`]), and writes it
//! in one vectored write. The lock is held only to push or to take, never across an await.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, MutexGuard};
use std::task::{Context, Poll};

use bytes::Bytes;
use futures_util::task::AtomicWaker;

use crate::protocol::ws::{self, close_code};

/// Why a push was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    /// The queue was full: the connection is now closing as a slow consumer.
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
    Idle,
    /// Send this close frame, then end the connection.
    Close(Bytes),
}

/// A bounded queue of frames for one connection.
///
/// One task at a time waits on it (the connection's writer, or a Socket.IO long-poll): the
/// waiter's waker is kept here rather than in the waiting future, so that an idle connection's
/// task holds no wait state of its own.
#[derive(Debug)]
pub struct Outbox {
    state: Mutex<State>,
    waker: AtomicWaker,
    /// Set by a wake not yet seen by the waiter.
    signalled: AtomicBool,
    max_frames: usize,
}

#[derive(Debug)]
struct State {
    frames: VecDeque<Bytes>,
    close: Option<Bytes>,
    closed: bool,
}

/// Slots reserved up front, so that delivering to a connection allocates nothing until a
/// burst outgrows them (the writer takes frames out and leaves the slots). Four slots are 128
/// bytes of every idle connection; a longer burst between two writer rounds grows the queue
/// once, and the writer gives it back its four slots when it has drained it.
const INITIAL_SLOTS: usize = 4;

impl Outbox {
    /// An empty outbox holding at most `max_frames` frames.
    pub fn new(max_frames: usize) -> Self {
        Self {
            state: Mutex::new(State {
                frames: VecDeque::with_capacity(INITIAL_SLOTS),
                close: None,
                closed: false,
            }),
            waker: AtomicWaker::new(),
            signalled: AtomicBool::new(false),
            max_frames,
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // The lock guards plain data and no code under it can panic midway; a poisoned lock
        // still holds a consistent queue.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Queues `frame`. Never waits. On overflow the queue is dropped and the connection is
    /// set to close with [`close_code::SLOW_CONSUMER`].
    pub fn push(&self, frame: Bytes) -> Result<(), Refused> {
        let mut state = self.lock();
        if state.closed {
            return Err(Refused::Closed);
        }
        if state.frames.len() >= self.max_frames {
            state.frames.clear();
            state.close = Some(ws::close(close_code::SLOW_CONSUMER, "slow consumer"));
            state.closed = true;
            drop(state);
            self.poke();
            return Err(Refused::Full);
        }
        let was_empty = state.frames.is_empty();
        state.frames.push_back(frame);
        drop(state);
        // A writer with frames in hand re-checks the queue before it waits, so only the
        // empty-to-non-empty transition needs a wake-up.
        if was_empty {
            self.poke();
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
        }
        state.close = Some(ws::close(code, reason));
        state.closed = true;
        drop(state);
        self.poke();
    }

    /// Whether the connection is closing.
    pub fn is_closed(&self) -> bool {
        self.lock().closed
    }

    /// For the writer: moves all queued frames into `batch` (which must be empty), or hands
    /// over the close frame once the queue is drained.
    pub fn take(&self, batch: &mut VecDeque<Bytes>) -> Next {
        let mut state = self.lock();
        if !state.frames.is_empty() {
            std::mem::swap(&mut state.frames, batch);
            if state.frames.capacity() < INITIAL_SLOTS {
                // The writer's first batch came without slots: give the queue its own, here on
                // the writer's side, so that deliveries never allocate.
                state.frames.reserve(INITIAL_SLOTS);
            }
            Next::Frames
        } else if let Some(close) = state.close.take() {
            Next::Close(close)
        } else {
            Next::Idle
        }
    }

    /// For the writer: moves up to `max` queued frames, oldest first, to `put`, or hands over
    /// the close frame once the queue is drained. Unlike [`Outbox::take`] the queue keeps its
    /// slots, so a writer that writes what it took before it takes again allocates nothing;
    /// once drained, a queue that a burst grew goes back to its initial slots.
    pub fn take_up_to(&self, max: usize, put: impl FnMut(Bytes)) -> Next {
        let mut state = self.lock();
        if !state.frames.is_empty() {
            let n = max.min(state.frames.len());
            state.frames.drain(..n).for_each(put);
            Next::Frames
        } else if let Some(close) = state.close.take() {
            Next::Close(close)
        } else {
            if state.frames.capacity() > INITIAL_SLOTS {
                state.frames = VecDeque::with_capacity(INITIAL_SLOTS);
            }
            Next::Idle
        }
    }

    /// Resolves when something was queued, a close was requested or [`Outbox::poke`] was
    /// called since the waiter last returned. For one waiter at a time.
    pub async fn wait(&self) {
        std::future::poll_fn(|cx| self.poll_wait(cx)).await
    }

    /// [`Outbox::wait`] as a poll: `Ready` once per wake.
    pub fn poll_wait(&self, cx: &mut Context<'_>) -> Poll<()> {
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
    pub fn poke(&self) {
        self.signalled.store(true, Ordering::Release);
        self.waker.wake();
    }

    /// Frames queued now.
    pub fn len(&self) -> usize {
        self.lock().frames.len()
    }

    /// The most frames this outbox holds before the connection counts as a slow consumer.
    pub fn capacity(&self) -> usize {
        self.max_frames
    }

    /// Whether no frame is queued.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn take_moves_everything_queued() {
        let outbox = Outbox::new(8);
        outbox.push(Bytes::from_static(b"a")).unwrap();
        outbox.push(Bytes::from_static(b"b")).unwrap();
        let mut batch = VecDeque::new();
        assert!(matches!(outbox.take(&mut batch), Next::Frames));
        assert_eq!(batch, [&b"a"[..], &b"b"[..]]);
        batch.clear();
        assert!(matches!(outbox.take(&mut batch), Next::Idle));
    }

    #[test]
    fn overflow_drops_the_queue_and_closes_as_slow() {
        let outbox = Outbox::new(8);
        for _ in 0..8 {
            outbox.push(Bytes::from_static(b"x")).unwrap();
        }
        assert_eq!(outbox.push(Bytes::from_static(b"x")), Err(Refused::Full));
        assert_eq!(outbox.push(Bytes::from_static(b"x")), Err(Refused::Closed));
        let mut batch = VecDeque::new();
        let Next::Close(frame) = outbox.take(&mut batch) else {
            panic!("expected a close");
        };
        assert!(batch.is_empty());
        assert_eq!(&frame[2..4], &close_code::SLOW_CONSUMER.to_be_bytes());
    }

    #[test]
    fn flushing_close_comes_after_queued_frames() {
        let outbox = Outbox::new(8);
        outbox.push(Bytes::from_static(b"a")).unwrap();
        outbox.close(close_code::GOING_AWAY, "bye", true);
        outbox.close(close_code::NORMAL, "ignored", true);
        let mut batch = VecDeque::new();
        assert!(matches!(outbox.take(&mut batch), Next::Frames));
        batch.clear();
        let Next::Close(frame) = outbox.take(&mut batch) else {
            panic!("expected a close");
        };
        assert_eq!(&frame[2..4], &close_code::GOING_AWAY.to_be_bytes());
    }

    #[tokio::test]
    async fn push_to_an_empty_queue_wakes_the_writer() {
        let outbox = std::sync::Arc::new(Outbox::new(8));
        let waiter = tokio::spawn({
            let outbox = outbox.clone();
            async move { outbox.wait().await }
        });
        tokio::task::yield_now().await;
        outbox.push(Bytes::from_static(b"a")).unwrap();
        waiter.await.unwrap();
    }
}
