//! The chat core: what a connected user can do, whatever protocol they speak. One [`Chat`]
//! per connection joins rooms (with the room limit and the staged catch-up of history), leaves
//! them, sends messages (length and rate checks, then publishing through its [`pipeline`],
//! which answers each with its ack or error in the order sent) and pages through history,
//! with the request and message rate limits and their reloads. The native session and the
//! Socket.IO client drive it the same way: they decode requests, call it, and encode what it
//! answers; the frames it queues itself (the `joined` reply, history, errors during a join,
//! the answers to sends) it asks of the protocol through [`Protocol`].
//!
//! Above the [`node`](crate::node) (hub, transport, limits), below the protocols.

mod join;
mod pipeline;
pub(crate) mod rate;
mod search;

use std::marker::PhantomData;
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};

use bytes::Bytes;
use tokio::time::Instant;

use self::rate::TokenBucket;
use crate::config::Reloadable;
use crate::hub::ConnId;
use crate::node::Node;
use crate::node::access::Grant;
use crate::outbox::{Outbox, Refused};
use crate::protocol::message::{Codec, Message};
use crate::protocol::native::check_message;
use crate::protocol::presence::{self, MAX_CURSOR_LEN, MAX_PAGE};
use crate::protocol::{ErrorCode, ProtocolError, RoomName};
use crate::transport::{Envelope, Published, TransportError};

pub(crate) use self::join::{Join, Joined};
pub(crate) use self::pipeline::Pipeline;

/// What the chat core needs of a protocol: its codec for chat messages and the frames it
/// queues on its own during a join.
pub(crate) trait Protocol: 'static {
    /// How its members read chat messages.
    const CODEC: Codec;

    /// What answering a `send` takes besides its outcome (its `ref`, the ack it asked for).
    type SendTag: Send + 'static;

    /// The answer to a `send`: its ack, or its error; `None` when the client wants none.
    fn sent(tag: Self::SendTag, answer: Result<Sent, ProtocolError>) -> Option<Bytes>;

    /// The frame that tells the client it is in a room, queued before any of the room's
    /// messages (history, then live).
    fn joined(joined: &Joined<'_>) -> Bytes;

    /// The answer to joining a room the client is already in, if the protocol sends one.
    fn already_joined(room: &RoomName, online: usize) -> Option<Bytes>;

    /// The frame for a refused request or a failure the client must hear of.
    fn error(err: &ProtocolError) -> Bytes;
}

/// A `send` the transport accepted.
#[derive(Debug)]
pub(crate) struct Sent {
    /// The room it went to.
    pub(crate) room: RoomName,
    /// Its id there, and whether its `ref` had been accepted before.
    pub(crate) published: Published,
}

/// A page of a room's older messages, cut to fit the connection's queue.
#[derive(Debug)]
pub(crate) struct HistoryPage {
    /// The room history's epoch.
    pub(crate) epoch: String,
    /// Oldest first.
    pub(crate) messages: Vec<Arc<Message>>,
    /// Whether older messages are left.
    pub(crate) more: bool,
}

/// One connection's chat state: who the user is, the rooms they are in, their rate limits.
pub(crate) struct Chat<P: Protocol> {
    node: Arc<Node>,
    conn: ConnId,
    outbox: Arc<Outbox>,
    /// Sends in flight, and the replies queued behind them: made on the first `send` (or
    /// when a protocol asks for it), so that a connection that only reads holds none.
    pipeline: OnceLock<Pipeline<P>>,
    /// Set once the user is known: the first room (the user is in `rooms`).
    first_room: Option<RoomName>,
    /// The rooms the user's token grants.
    grant: Grant,
    rooms: Memberships,
    /// `send`s.
    sends: TokenBucket,
    /// Joins, leaves and history pages.
    requests: TokenBucket,
    /// The reloadable settings as of `live_version`.
    live: Arc<Reloadable>,
    live_version: u64,
    protocol: PhantomData<fn() -> P>,
}

impl<P: Protocol> Chat<P> {
    /// The chat state of connection `conn`, whose frames go to `outbox`; no user yet.
    pub(crate) fn new(node: Arc<Node>, conn: ConnId, outbox: Arc<Outbox>) -> Self {
        let live_version = node.live_version();
        let live = node.live();
        let limits = &live.limits;
        let sends = TokenBucket::new(limits.message_burst);
        let requests = TokenBucket::new(limits.request_burst);
        Self {
            rooms: Memberships::default(),
            pipeline: OnceLock::new(),
            node,
            conn,
            outbox,
            first_room: None,
            grant: Grant::default(),
            sends,
            requests,
            live,
            live_version,
            protocol: PhantomData,
        }
    }

    /// The user is known: `user`, whose `send`s without a room go to `first_room`, and
    /// whose token grants `grant`.
    pub(crate) fn sign_in(&mut self, user: Arc<str>, first_room: RoomName, grant: Grant) {
        self.rooms.leave_all(&self.node, self.conn);
        self.rooms.user = Some(user);
        self.first_room = Some(first_room);
        self.grant = grant;
    }

    /// The user is gone (the connection stays): leaves every room. The rate limits stay.
    pub(crate) fn sign_out(&mut self) {
        self.rooms.leave_all(&self.node, self.conn);
        self.rooms.user = None;
        self.first_room = None;
    }

    /// Whether a user is signed in.
    pub(crate) fn is_signed_in(&self) -> bool {
        self.rooms.user.is_some()
    }

    /// The signed-in user and their first room.
    pub(crate) fn user(&self) -> Option<(&Arc<str>, &RoomName)> {
        self.rooms.user.as_ref().zip(self.first_room.as_ref())
    }

    /// The rooms the connection is in.
    pub(crate) fn rooms(&self) -> &[RoomName] {
        &self.rooms.rooms
    }

    /// The node this connection is on.
    pub(crate) fn node(&self) -> &Arc<Node> {
        &self.node
    }

    /// The connection's id.
    pub(crate) fn conn(&self) -> ConnId {
        self.conn
    }

    /// The connection's outbox.
    pub(crate) fn outbox(&self) -> &Arc<Outbox> {
        &self.outbox
    }

    /// The reloadable settings, taken again once a SIGHUP changed them: the rates apply from
    /// the next request on.
    pub(crate) fn live(&mut self) -> &Reloadable {
        let version = self.node.live_version();
        if version != self.live_version {
            self.live = self.node.live();
            self.live_version = version;
        }
        &self.live
    }

    /// Queues `frame` for the client, after the answers of the sends before it. A refused
    /// push means the connection is closing (nobody reads it) or just overflowed (counted as
    /// the slow consumer it is).
    pub(crate) fn push(&self, frame: Bytes) {
        match self.pipeline.get() {
            Some(pipeline) => pipeline.reply(frame),
            // No send was ever made: none is owed an answer.
            None => self.push_now(frame),
        }
    }

    /// Queues `frame` for the client now, ahead of any answer still owed: for control frames
    /// (pongs), which are no answer to a request.
    pub(crate) fn push_now(&self, frame: Bytes) {
        if let Err(Refused::Full) = self.outbox.push(frame) {
            self.node.metrics.slow_consumer_disconnects_total.inc();
        }
    }

    /// The connection's sends in flight (made now if none was): a clone waits for room or
    /// for them to be answered without the chat state. Its bounds are the node's limits as
    /// they are when it is made.
    pub(crate) fn pipeline(&self) -> &Pipeline<P> {
        self.pipeline
            .get_or_init(|| Pipeline::new(self.node.clone(), self.outbox.clone()))
    }

    /// Ready while the connection may read another request (see [`Pipeline::poll_room`]).
    pub(crate) fn poll_room(&self, cx: &mut Context<'_>) -> Poll<()> {
        self.pipeline
            .get()
            .map_or(Poll::Ready(()), |pipeline| pipeline.poll_room(cx))
    }

    /// Resolves once every send so far is answered: requests other than `send` wait for it,
    /// so that they are answered, and take effect, after the sends before them.
    pub(crate) async fn drained(&self) {
        if let Some(pipeline) = self.pipeline.get() {
            pipeline.drained().await;
        }
    }

    /// Answers a `send` that could not be decoded, with `err`, in its turn.
    pub(crate) fn refuse_send(&self, tag: P::SendTag, err: ProtocolError) {
        match self.pipeline.get() {
            Some(pipeline) => pipeline.refuse(tag, err),
            None => {
                self.node.metrics.error(err.code);
                if let Some(frame) = P::sent(tag, Err(err)) {
                    self.push_now(frame);
                }
            }
        }
    }

    /// Takes a token for a join, leave or history request, or says why not.
    fn take_request(&mut self) -> Result<(), ProtocolError> {
        let limits = &self.live().limits;
        let (rate, burst) = (limits.requests_per_second, limits.request_burst);
        if self.requests.take(Instant::now(), rate, burst) {
            return Ok(());
        }
        Err(ProtocolError::new(
            ErrorCode::RateLimited,
            format!("join, leave and history faster than {rate} per second; not done"),
        ))
    }

    fn check_member(&self, room: &RoomName) -> Result<(), ProtocolError> {
        if self.rooms.rooms.contains(room) {
            return Ok(());
        }
        Err(ProtocolError::new(
            ErrorCode::NotJoined,
            format!("not in room {room}"),
        ))
    }

    /// Leaves `room`.
    pub(crate) fn leave(&mut self, room: &RoomName) -> Result<(), ProtocolError> {
        self.take_request()?;
        self.check_member(room)?;
        self.rooms.leave(&self.node, self.conn, room);
        Ok(())
    }

    /// Sends `text` to `room` (the first room when `None`) as the signed-in user: checks its
    /// length, the membership and the rate, and publishes it after the sends before it; its
    /// answer (the ack with its id, or the error), built from `tag`, is queued in its turn.
    /// A `reference` (the client's `ref`) makes a repeated send within the dedupe window
    /// answer the first id instead of delivering again. The caller waits for room in the
    /// pipeline before it reads the request.
    pub(crate) fn send(
        &mut self,
        room: Option<RoomName>,
        text: String,
        reference: Option<&str>,
        tag: P::SendTag,
    ) {
        match self.check_send(room, text, reference) {
            Ok(envelope) => self.pipeline().send(envelope, tag),
            Err(e) => self.refuse_send(tag, e),
        }
    }

    /// A `send`'s checks; the message to publish once they pass.
    fn check_send(
        &mut self,
        room: Option<RoomName>,
        text: String,
        reference: Option<&str>,
    ) -> Result<Envelope, ProtocolError> {
        let (Some(user), Some(first_room)) = (&self.rooms.user, &self.first_room) else {
            return Err(ProtocolError::new(ErrorCode::BadField, "not connected"));
        };
        let user = user.clone();
        let room = room.unwrap_or_else(|| first_room.clone());
        let limits = &self.live().limits;
        let (max_chars, rate) = (limits.max_message_chars, limits.messages_per_second);
        let burst = limits.message_burst;
        check_message(&text, max_chars)?;
        self.check_member(&room)?;
        if self.rooms.is_read_only(&room) {
            return Err(ProtocolError::new(
                ErrorCode::ReadOnly,
                format!("you may read room {room} but not send to it"),
            ));
        }
        if !self.sends.take(Instant::now(), rate, burst) {
            return Err(ProtocolError::new(
                ErrorCode::RateLimited,
                format!("sending faster than {rate} messages per second; not delivered"),
            ));
        }
        Ok(crate::node::envelope(room, &user, text, reference))
    }

    /// Up to `limit` messages of `room` older than `before` (the newest when `None`), cut to
    /// the newest that fit in half the connection's queue, once that half is free: a reader
    /// as slow as its requests are fast stalls rather than piling up pages.
    pub(crate) async fn history(
        &mut self,
        room: &RoomName,
        before: Option<u64>,
        limit: usize,
    ) -> Result<HistoryPage, ProtocolError> {
        self.take_request()?;
        self.check_member(room)?;
        let page = self
            .node
            .page(room, before, limit)
            .await
            .map_err(|e| unavailable(room, &e))?;
        let (messages, more) = fit_page(&page.messages, page.more, self.outbox.max_bytes() / 2);
        let messages = messages.to_vec();
        self.outbox.wait_room().await;
        Ok(HistoryPage {
            epoch: page.epoch,
            messages,
            more,
        })
    }
}

impl<P: Protocol> Chat<P> {
    /// A page of `room`'s members over every node, from `cursor` (a page's own), at most
    /// `limit` (1 to [`MAX_PAGE`]).
    pub(crate) async fn presence(
        &mut self,
        room: &RoomName,
        cursor: Option<&str>,
        limit: usize,
    ) -> Result<presence::Page, ProtocolError> {
        self.take_request()?;
        self.check_member(room)?;
        if !(1..=MAX_PAGE).contains(&limit) {
            return Err(ProtocolError::new(
                ErrorCode::BadField,
                format!("`limit` must be 1 to {MAX_PAGE}"),
            ));
        }
        if cursor.is_some_and(|c| c.len() > MAX_CURSOR_LEN) {
            return Err(ProtocolError::new(
                ErrorCode::BadField,
                "`cursor` must be one a presence page returned",
            ));
        }
        let page = self.node.transport.presence_page(room, cursor, limit).await;
        page.map_err(|e| match e {
            TransportError::BadRequest(why) => ProtocolError::new(ErrorCode::BadField, why),
            e => ProtocolError::new(
                ErrorCode::Unavailable,
                format!("the members of room {room} are unavailable: {e}"),
            ),
        })
    }
}

/// The error for a history the transport could not read.
fn unavailable(room: &RoomName, e: &impl std::fmt::Display) -> ProtocolError {
    ProtocolError::new(
        ErrorCode::Unavailable,
        format!("the history of room {room} is unavailable: {e}"),
    )
}

/// The newest of `messages` (oldest first) whose `history` frame stays within `max_bytes`, at
/// least one, and whether older ones are left (the client pages on from the oldest it got).
fn fit_page(messages: &[Arc<Message>], more: bool, max_bytes: usize) -> (&[Arc<Message>], bool) {
    /// The frame's header and fields around the messages, with room to spare.
    const FRAME_OVERHEAD: usize = 256;
    let size_of = |m: &Arc<Message>| m.frame(Codec::Native).len();
    let mut size = FRAME_OVERHEAD;
    let mut first = messages.len();
    while first > 0 && (first == messages.len() || size + size_of(&messages[first - 1]) < max_bytes)
    {
        size += size_of(&messages[first - 1]) + 1;
        first -= 1;
    }
    (&messages[first..], more || first > 0)
}

/// The user and the rooms a connection is in, left by [`Chat`] when it drops, however the
/// connection ends. Kept small: every connection holds one.
#[derive(Default)]
struct Memberships {
    user: Option<Arc<str>>,
    rooms: Vec<RoomName>,
    /// Those of `rooms` the user may only read: boxed, as only some tokens restrict rooms so.
    #[expect(
        clippy::box_collection,
        reason = "a pointer where a `Vec` takes 24 bytes in every connection"
    )]
    read_only: Option<Box<Vec<RoomName>>>,
}

impl Memberships {
    /// Records `room` as joined. Most connections stay in the one room they opened with, so
    /// the first room takes a list of one.
    fn join(&mut self, room: RoomName, read_only: bool) {
        if self.rooms.is_empty() {
            self.rooms.reserve_exact(1);
        }
        if read_only {
            self.read_only.get_or_insert_default().push(room.clone());
        }
        self.rooms.push(room);
    }

    fn is_read_only(&self, room: &RoomName) -> bool {
        self.read_only.as_ref().is_some_and(|r| r.contains(room))
    }

    /// Leaves `room` on `node` for connection `conn`: the user's presence there ends with
    /// their last connection, and the node's subscription with its last local member.
    fn leave(&mut self, node: &Node, conn: ConnId, room: &RoomName) {
        if let Some(at) = self.rooms.iter().position(|r| r == room) {
            self.rooms.swap_remove(at);
        }
        if let Some(read_only) = &mut self.read_only {
            read_only.retain(|r| r != room);
        }
        let Some(left) = node.hub.leave(room.as_str(), conn) else {
            return;
        };
        if left.user_first_or_last
            && let Some(user) = &self.user
        {
            node.transport.presence_left(room, user);
        }
        if left.first_or_last {
            node.transport.unsubscribe(room);
        }
    }

    fn leave_all(&mut self, node: &Node, conn: ConnId) {
        for room in std::mem::take(&mut self.rooms) {
            self.leave(node, conn, &room);
        }
    }
}

impl<P: Protocol> Drop for Chat<P> {
    fn drop(&mut self) {
        self.rooms.leave_all(&self.node, self.conn);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::message::Draft;

    #[test]
    fn a_page_is_cut_to_its_newest_messages_that_fit() {
        let room = RoomName::new("dev").unwrap();
        let messages: Vec<Arc<Message>> = (1..=10)
            .map(|id| {
                let draft = Draft::new(room.clone(), "ann".into(), 1, "x".into());
                Arc::new(draft.accept(id, "e".into()))
            })
            .collect();
        let one = messages[0].frame(Codec::Native).len();
        let (all, more) = fit_page(&messages, false, 10_000);
        assert_eq!((all.len(), more), (10, false));
        let (cut, more) = fit_page(&messages, false, 256 + 3 * (one + 1) + 1);
        assert_eq!((cut.len(), more), (3, true));
        assert!(Arc::ptr_eq(cut.last().unwrap(), messages.last().unwrap()));
        let (one, more) = fit_page(&messages, true, 10);
        assert_eq!((one.len(), more), (1, true));
        let (none, more) = fit_page(&[], false, 10);
        assert_eq!((none.len(), more), (0, false));
    }
}
