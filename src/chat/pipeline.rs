//! A connection's requests in flight: `send`s read from the client and not answered yet, and
//! the replies queued behind them. A client need not wait for each ack before its next
//! `send`: the connection reads on while its earlier sends are published, until
//! `limits.publishes_in_flight` answers are owed or they hold `limits.publish_bytes_in_flight`
//! bytes, and then reads nothing more until one goes out (its socket's buffers fill, and TCP
//! slows the client down).
//!
//! Order. Sends are published in the order they were read: consecutive sends to one room go
//! to the transport together, as one batch (on Redis one atomic script call, so their ids
//! follow the order sent), and the next batch goes only once the transport has answered the
//! one before, so that no reconnect, retry or redirect beneath can reorder them. Each send's
//! answer (its ack or its error) is queued for the client in the order the sends were read,
//! and so is every reply the session queues meanwhile ([`Pipeline::reply`]): a client's
//! frames are answered in the order it sent them. Requests that do more than reply (a join
//! queues history, a leave stops messages) wait until the sends before them are answered
//! ([`Pipeline::drained`]).
//!
//! The batches run in a task of their own, spawned on the node's session tracker (which
//! shutdown waits for) when a batch cannot be published at once; on the embedded transport
//! every publish completes at once and no task is spawned. The task ends when nothing is
//! left. It does not depend on the connection: sends of a connection that closed are
//! published and answered all the same, and answers to a closed connection go nowhere.

use std::collections::VecDeque;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::{Context, Poll, Waker};

use bytes::Bytes;
use futures_util::task::AtomicWaker;
use tokio::sync::Notify;

use super::{Protocol, Sent};
use crate::node::Node;
use crate::outbox::{Outbox, Refused};
use crate::protocol::{ErrorCode, ProtocolError, RoomName};
use crate::transport::{Envelope, Published};

/// One connection's sends in flight and the replies behind them; clones share them.
pub(crate) struct Pipeline<P: Protocol>(Arc<Shared<P>>);

impl<P: Protocol> Clone for Pipeline<P> {
    fn clone(&self) -> Self {
        Self(self.0.clone())
    }
}

struct Shared<P: Protocol> {
    node: Arc<Node>,
    outbox: Arc<Outbox>,
    /// `limits.publishes_in_flight` and `limits.publish_bytes_in_flight` when the
    /// connection's first send was made (see [`Chat::pipeline`](super::Chat::pipeline)).
    max_owed: usize,
    max_bytes: usize,
    state: Mutex<State<P>>,
    /// The reader polling for room ([`Pipeline::poll_room`]).
    reader: AtomicWaker,
    /// Wakes those waiting in [`Pipeline::room`]: a Socket.IO session may have two readers
    /// at once, its polling requests and the WebSocket it upgrades to.
    room: Notify,
    /// Wakes [`Pipeline::drained`].
    idle: Notify,
}

struct State<P: Protocol> {
    /// Sends not yet published and replies not yet queued for the client, in the order read.
    queue: VecDeque<Entry<P>>,
    /// Answers owed to the client: sends in `queue` or being published, replies in `queue`.
    owed: usize,
    /// The bytes they hold.
    bytes: usize,
    /// A batch is being published (or the task is taking the next one): replies wait in
    /// `queue` behind it. Never `false` while `queue` holds anything.
    busy: bool,
}

enum Entry<P: Protocol> {
    Send { envelope: Envelope, answer: Owed<P> },
    Reply(Bytes),
}

/// What answering one send takes: the protocol's tag for it, and the bytes it holds.
struct Owed<P: Protocol> {
    tag: P::SendTag,
    bytes: usize,
}

type Publishing = Pin<Box<dyn Future<Output = Result<Vec<Published>, ProtocolError>> + Send>>;

/// Consecutive sends to one room, being published together.
struct Batch<P: Protocol> {
    publishing: Publishing,
    room: RoomName,
    owed: Vec<Owed<P>>,
}

impl<P: Protocol> Pipeline<P> {
    /// The pipeline of a connection whose frames go to `outbox`, bounded by the node's limits
    /// as they are now.
    pub(crate) fn new(node: Arc<Node>, outbox: Arc<Outbox>) -> Self {
        let live = node.live();
        Self(Arc::new(Shared {
            max_owed: live.limits.publishes_in_flight,
            max_bytes: live.limits.publish_bytes_in_flight,
            node,
            outbox,
            state: Mutex::new(State {
                queue: VecDeque::new(),
                owed: 0,
                bytes: 0,
                busy: false,
            }),
            reader: AtomicWaker::new(),
            room: Notify::new(),
            idle: Notify::new(),
        }))
    }

    /// Publishes `envelope` after the sends before it, and answers it (`tag` says how) after
    /// everything queued before it. The caller checked that there was room.
    pub(crate) fn send(&self, envelope: Envelope, tag: P::SendTag) {
        let shared = &self.0;
        let bytes = envelope.draft.size();
        shared.node.metrics.publishes_in_flight.inc();
        let mut state = shared.lock();
        state.owed += 1;
        state.bytes += bytes;
        let answer = Owed { tag, bytes };
        if state.busy {
            state.queue.push_back(Entry::Send { envelope, answer });
            return;
        }
        state.busy = true;
        drop(state);
        let room = envelope.draft.room.clone();
        let batch = shared.batch(room, vec![envelope], vec![answer]);
        shared.clone().start(batch);
    }

    /// Answers a send refused before publishing with `err`, in its turn.
    pub(crate) fn refuse(&self, tag: P::SendTag, err: ProtocolError) {
        self.0.node.metrics.error(err.code);
        if let Some(frame) = P::sent(tag, Err(err)) {
            self.reply(frame);
        }
    }

    /// Queues `frame` for the client after the answers of the sends before it.
    pub(crate) fn reply(&self, frame: Bytes) {
        let shared = &self.0;
        let mut state = shared.lock();
        if state.busy {
            state.owed += 1;
            state.bytes += frame.len();
            state.queue.push_back(Entry::Reply(frame));
        } else {
            shared.push(frame);
        }
    }

    /// Ready while the connection may read another request: fewer answers owed than the
    /// bound, and fewer bytes. Otherwise wakes `cx` once an answer went out.
    pub(crate) fn poll_room(&self, cx: &mut Context<'_>) -> Poll<()> {
        if self.0.has_room() {
            return Poll::Ready(());
        }
        self.0.reader.register(cx.waker());
        // Checked again: an answer may have gone out before the waker was in place.
        if self.0.has_room() {
            Poll::Ready(())
        } else {
            Poll::Pending
        }
    }

    /// Resolves once the connection may read another request (see [`Pipeline::poll_room`]).
    pub(crate) async fn room(&self) {
        loop {
            let room = self.0.room.notified();
            tokio::pin!(room);
            // Registered before the check, so that an answer going out in between wakes it.
            room.as_mut().enable();
            if self.0.has_room() {
                return;
            }
            room.await;
        }
    }

    /// Resolves once every send so far is answered and every reply queued for the client.
    pub(crate) async fn drained(&self) {
        loop {
            let idle = self.0.idle.notified();
            tokio::pin!(idle);
            // Registered before the check, so that the task going idle in between wakes it.
            idle.as_mut().enable();
            if !self.0.lock().busy {
                return;
            }
            idle.await;
        }
    }
}

impl<P: Protocol> Shared<P> {
    fn lock(&self) -> MutexGuard<'_, State<P>> {
        // Every critical section leaves the state consistent: a poisoned one still is.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn has_room(&self) -> bool {
        let state = self.lock();
        state.owed < self.max_owed && state.bytes < self.max_bytes
    }

    /// Wakes whoever waits for room: an answer went out.
    fn room_freed(&self) {
        self.reader.wake();
        self.room.notify_waiters();
    }

    /// Queues `frame` in the outbox. A refused push means the connection is closing (nobody
    /// reads it) or just overflowed (counted as the slow consumer it is).
    fn push(&self, frame: Bytes) {
        if let Err(Refused::Full) = self.outbox.push(frame) {
            self.node.metrics.slow_consumer_disconnects_total.inc();
        }
    }

    fn batch(&self, room: RoomName, envelopes: Vec<Envelope>, owed: Vec<Owed<P>>) -> Batch<P> {
        let node = self.node.clone();
        Batch {
            publishing: Box::pin(async move { node.publish_batch(envelopes).await }),
            room,
            owed,
        }
    }

    /// Publishes `batch` and those after it: at once while each completes on its first
    /// poll (the embedded transport's always do), then in a task of their own.
    fn start(self: Arc<Self>, mut batch: Batch<P>) {
        let mut cx = Context::from_waker(Waker::noop());
        loop {
            // Polled again, with the task's waker, if it is not done.
            let Poll::Ready(published) = batch.publishing.as_mut().poll(&mut cx) else {
                let sessions = self.node.sessions.clone();
                sessions.spawn(self.run(batch));
                return;
            };
            self.answer(batch.room, batch.owed, published);
            match self.next() {
                Some(next) => batch = next,
                None => return,
            }
        }
    }

    /// The task: publishes the batches one after the other until none is left.
    async fn run(self: Arc<Self>, mut batch: Batch<P>) {
        loop {
            let Batch {
                publishing,
                room,
                owed,
            } = batch;
            let published = publishing.await;
            self.answer(room, owed, published);
            match self.next() {
                Some(next) => batch = next,
                None => return,
            }
        }
    }

    /// Queues the answers of a batch for the client, in order.
    fn answer(
        &self,
        room: RoomName,
        owed: Vec<Owed<P>>,
        published: Result<Vec<Published>, ProtocolError>,
    ) {
        let metrics = &self.node.metrics;
        let mut state = self.lock();
        for (at, send) in owed.into_iter().enumerate() {
            let answer = match &published {
                Ok(ids) => ids
                    .get(at)
                    .map(|published| Sent {
                        room: room.clone(),
                        published: *published,
                    })
                    .ok_or_else(|| {
                        ProtocolError::new(
                            ErrorCode::Unavailable,
                            "the transport gave no id; not delivered",
                        )
                    }),
                Err(e) => Err(e.clone()),
            };
            if let Err(e) = &answer {
                metrics.error(e.code);
            }
            // Pushed under the lock, so that no reply overtakes it.
            if let Some(frame) = P::sent(send.tag, answer) {
                self.push(frame);
            }
            state.owed -= 1;
            state.bytes -= send.bytes;
            metrics.publishes_in_flight.dec();
        }
        drop(state);
        self.room_freed();
    }

    /// The next batch: the replies at the head of the queue go to the client, then the
    /// sends after them to one room (up to a reply or a send to another room) make the
    /// batch. `None`, and no longer busy, when nothing is left.
    fn next(&self) -> Option<Batch<P>> {
        let mut state = self.lock();
        loop {
            match state.queue.pop_front() {
                None => {
                    state.busy = false;
                    drop(state);
                    self.idle.notify_waiters();
                    self.room_freed();
                    return None;
                }
                Some(Entry::Reply(frame)) => {
                    state.owed -= 1;
                    state.bytes -= frame.len();
                    self.push(frame);
                }
                Some(Entry::Send { envelope, answer }) => {
                    let room = envelope.draft.room.clone();
                    let (mut envelopes, mut owed) = (vec![envelope], vec![answer]);
                    while let Some(Entry::Send { envelope, .. }) = state.queue.front()
                        && envelope.draft.room == room
                        && let Some(Entry::Send { envelope, answer }) = state.queue.pop_front()
                    {
                        envelopes.push(envelope);
                        owed.push(answer);
                    }
                    drop(state);
                    self.room_freed();
                    return Some(self.batch(room, envelopes, owed));
                }
            }
        }
    }
}
