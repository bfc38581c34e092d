//! The native protocol's session: one WebSocket connection at `/ws` (or the echo endpoint),
//! its reader loop, request handling, and lifetime.
//!
//! The socket is split: this reader (frames from [`FrameReader`], which holds no buffer while
//! the connection is idle) and the [`writer`](crate::conn::writer), the only code that
//! writes. Both run in the session's one task. Replies and chat messages reach the writer
//! through the connection's [`Outbox`].

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use bytes::Bytes;
use hyper::upgrade::{OnUpgrade, Upgraded};
use hyper_util::rt::TokioIo;
use tokio::io::AsyncWrite;
use tokio::net::TcpStream;
use tokio::time::Instant;
use tracing::{debug, error, warn};

use crate::config::Reloadable;
use crate::conn::close::{CLOSE_TIMEOUT, ReadEnd, linger, peer_close, read_error};
use crate::conn::rate::TokenBucket;
use crate::conn::reader::{Assembler, FrameReader};
use crate::conn::writer::{Liveness, WriteEnd, Writer};
use crate::hub::ConnId;
use crate::metrics::OpenSession;
use crate::node::{ConnSlot, Node};
use crate::outbox::{Outbox, Refused};
use crate::protocol::frame::Opcode;
use crate::protocol::native::{self, Reply, Request, Since};
use crate::protocol::ws::close_code;
use crate::protocol::{ErrorCode, ProtocolError, RoomName};
use crate::transport::Snapshot;

/// How long a join waits for the node's live stream to reach the history it sent.
const CATCH_UP_WAIT: Duration = Duration::from_secs(2);

/// What the client asked for in the `/ws` query.
#[derive(Debug)]
pub(crate) struct Params {
    /// The first room.
    pub(crate) room: RoomName,
    /// The display name.
    pub(crate) name: String,
    /// Where the client left the first room, to receive what it missed.
    pub(crate) since: Option<Since>,
    /// The echo endpoint (`server.echo_path`): messages come back to the sender, nothing
    /// else happens; binary messages are allowed.
    pub(crate) echo: bool,
}

/// Runs one connection from the completed upgrade to the closed socket.
pub(crate) fn run(
    node: Arc<Node>,
    upgrade: OnUpgrade,
    params: Params,
    slot: ConnSlot,
) -> impl Future<Output = ()> {
    // An async fn keeps its arguments for its whole life: boxed, `params` costs a pointer
    // there rather than its size, in every connection's task.
    serve(node, upgrade, Box::new(params), slot)
}

/// [`run`] itself. Its future is allocated whole for every connection and idle connections
/// are the many, so it holds only the [`Connection`] state machine while the connection is
/// open; whatever a session needs only briefly (joining, handling a request, the close
/// handshake) is boxed while it runs.
async fn serve(node: Arc<Node>, upgrade: OnUpgrade, params: Box<Params>, _slot: ConnSlot) {
    let upgraded = match upgrade.await {
        Ok(upgraded) => upgraded,
        Err(e) => {
            debug!(error = %e, "websocket upgrade did not complete");
            return;
        }
    };
    let Some((mut stream, early)) = take_stream(upgraded) else {
        error!("upgraded connection is not a TCP stream");
        return;
    };
    let _open = OpenSession::new(&node.metrics);
    let (read_half, mut write_half) = stream.split();
    // Frame size, queue and ping limits are fixed for the connection's life; the message
    // limits follow a reload (see `Session::refresh_limits`).
    let limits = node.live();
    let reader = FrameReader::new(read_half, &early, limits.limits.max_frame_bytes);
    // Copied into the reader: hyper's read buffer is freed now.
    drop(early);
    let id = node.next_conn_id();
    let outbox = Arc::new(Outbox::new(
        limits.limits.max_queued_frames,
        limits.limits.max_queued_bytes,
    ));
    let writer = Writer::new(outbox.clone(), &limits.limits);
    drop(limits);
    // Moved out in a block of its own, so the box is freed now rather than at the end.
    let mut params = {
        let boxed = params;
        *boxed
    };
    let since = params.since.take();
    let mut session = Session::new(node.clone(), id, params, outbox);
    let mut conn = Connection {
        // Greets the client and joins its first room while the writer already runs.
        busy: Some(Box::pin(async move {
            session.start(since).await;
            session
        })),
        session: None,
        reader,
        writer,
        liveness: Liveness::new(),
        message: Assembler::default(),
        binary: false,
    };
    let end = std::future::poll_fn(|cx| conn.poll(&mut write_half, &node, cx)).await;
    // The close handshake, boxed: its timer need not be part of every idle connection's task.
    let closing = Box::pin(tokio::time::timeout(
        CLOSE_TIMEOUT,
        conn.close(id, end, &mut write_half, &node),
    ));
    let _ = closing.await;
}

/// How the open phase of a connection ended.
#[derive(Debug)]
enum End {
    Read(ReadEnd),
    Write(WriteEnd),
}

/// One open connection, polled by its task: the writer first, then the request in progress,
/// then the client's next frames. Frames are read only while no request is in progress, so
/// a client's requests are handled one at a time, in order; the writer runs all along.
struct Connection<'a> {
    /// The session, while no request holds it.
    session: Option<Session>,
    /// The request in progress (or the first join), owning the session until it is done.
    busy: Option<Busy>,
    reader: FrameReader<'a>,
    writer: Writer,
    liveness: Liveness,
    /// The fragmented message being received.
    message: Assembler,
    /// Whether that message is binary (the decoder has checked the order).
    binary: bool,
}

/// A request in progress, owning the session until it hands it back.
type Busy = Pin<Box<dyn Future<Output = Session> + Send>>;

/// Frames handled in one poll before the task yields to others.
const FRAMES_PER_POLL: usize = 32;

impl Connection<'_> {
    fn poll<W: AsyncWrite + Unpin>(
        &mut self,
        socket: &mut W,
        node: &Node,
        cx: &mut Context<'_>,
    ) -> Poll<End> {
        for _ in 0..FRAMES_PER_POLL {
            if let Poll::Ready(end) = self.writer.poll(socket, &self.liveness, node, cx) {
                return Poll::Ready(End::Write(end));
            }
            if let Some(busy) = &mut self.busy {
                self.session = Some(ready!(busy.as_mut().poll(cx)));
                self.busy = None;
                continue; // its replies are queued: write them first
            }
            if let Err(e) = ready!(self.reader.poll_ready(cx)) {
                return Poll::Ready(End::Read(read_error(e)));
            }
            self.liveness.touch();
            if let Some(end) = self.on_frame() {
                return Poll::Ready(End::Read(end));
            }
        }
        cx.waker().wake_by_ref();
        Poll::Pending
    }

    /// Handles the frame the reader has ready.
    fn on_frame(&mut self) -> Option<ReadEnd> {
        let Self {
            session: slot,
            busy,
            reader,
            message,
            binary,
            ..
        } = self;
        let frame = reader.ready_frame();
        let session = slot.as_mut().expect("no request in progress");
        // The decoder checked the frame order, sizes, UTF-8 and close payloads.
        match frame.opcode {
            Opcode::Close => return Some(peer_close(frame.payload)),
            Opcode::Ping => session.reply(crate::protocol::ws::pong(frame.payload)),
            Opcode::Pong => {}
            Opcode::Binary if !session.echo => {
                return Some(ReadEnd::Close(
                    close_code::UNSUPPORTED_DATA,
                    "binary messages are not supported; send JSON text",
                ));
            }
            Opcode::Text | Opcode::Binary if frame.fin => {
                *busy = Session::message(slot, frame.opcode == Opcode::Binary, frame.payload);
            }
            Opcode::Text | Opcode::Binary | Opcode::Continuation => {
                if frame.opcode != Opcode::Continuation {
                    *binary = frame.opcode == Opcode::Binary;
                }
                if let Some(whole) = message.push(frame.payload, frame.fin) {
                    *busy = Session::message(slot, *binary, &whole);
                }
            }
        }
        None
    }

    /// The close handshake after `end`: the close frame out, then a [`linger`] until the peer
    /// closes too.
    async fn close<W: AsyncWrite + Unpin>(
        &mut self,
        id: ConnId,
        end: End,
        socket: &mut W,
        node: &Node,
    ) {
        debug!(conn = %id, ?end, "connection ending");
        match end {
            End::Read(ReadEnd::Close(code, reason)) => {
                self.writer.outbox().close(code, reason, true);
                let writing =
                    std::future::poll_fn(|cx| self.writer.poll(socket, &self.liveness, node, cx));
                match writing.await {
                    WriteEnd::Failed(e) => debug!(error = %e, "write failed while closing"),
                    WriteEnd::Closed { .. } => linger(&mut self.reader, socket).await,
                }
            }
            End::Read(ReadEnd::Gone) => {}
            End::Write(WriteEnd::Failed(e)) => debug!(error = %e, "write failed"),
            End::Write(WriteEnd::Closed { await_peer }) => {
                // A request in progress (a publish, say) finishes; its reply has no reader.
                if let Some(busy) = self.busy.take() {
                    self.session = Some(busy.await);
                }
                if await_peer {
                    linger(&mut self.reader, socket).await;
                }
            }
        }
        debug!(conn = %id, "connection closed");
    }
}

/// The raw stream back from hyper, and the bytes hyper read past the handshake. The server only
/// ever serves `TokioIo<TcpStream>`, so the downcast cannot fail. Not async, so that hyper's
/// parts are no part of the session's state.
fn take_stream(upgraded: Upgraded) -> Option<(TcpStream, Bytes)> {
    let parts = upgraded.downcast::<TokioIo<TcpStream>>().ok()?;
    Some((parts.io.into_inner(), parts.read_buf))
}

/// The reader side of a connection: identity, rooms and limits.
struct Session {
    node: Arc<Node>,
    conn: ConnId,
    name: String,
    first_room: RoomName,
    /// Serving the echo endpoint.
    echo: bool,
    outbox: Arc<Outbox>,
    rooms: Memberships,
    /// `send`s.
    bucket: TokenBucket,
    /// `join`, `leave` and `history`.
    requests: TokenBucket,
    /// The reloadable settings as of `live_version`.
    live: Arc<Reloadable>,
    live_version: u64,
}

impl Session {
    fn new(node: Arc<Node>, conn: ConnId, params: Params, outbox: Arc<Outbox>) -> Self {
        let live_version = node.live_version();
        let live = node.live();
        let bucket = TokenBucket::new(live.limits.messages_per_second, live.limits.message_burst);
        let requests = TokenBucket::new(live.limits.requests_per_second, live.limits.request_burst);
        Self {
            live,
            live_version,
            rooms: Memberships {
                node: node.clone(),
                conn,
                rooms: Vec::new(),
            },
            node,
            conn,
            name: params.name,
            first_room: params.room,
            echo: params.echo,
            outbox,
            bucket,
            requests,
        }
    }

    /// Greets the client and joins its first room.
    async fn start(&mut self, since: Option<Since>) {
        if self.echo {
            return;
        }
        let welcome = Reply::Welcome {
            conn: &self.conn.to_string(),
            name: &self.name,
            node: &self.node.id,
            rooms: std::slice::from_ref(&self.first_room),
        };
        self.reply(welcome.frame());
        self.join(self.first_room.clone(), since).await;
    }

    fn reply(&self, frame: Bytes) {
        // A refused push means the connection is closing; the reply has no reader.
        if let Err(Refused::Full) = self.outbox.push(frame) {
            self.node.metrics.slow_consumer_disconnects_total.inc();
        }
    }

    fn refuse(&self, err: &ProtocolError) {
        self.node.metrics.error(err.code);
        self.reply(native::error_frame(err));
    }

    /// One complete message: echoed on the echo endpoint, else handled as a request, in a
    /// future that owns the session (taken from `slot`) until it is done.
    fn message(slot: &mut Option<Session>, binary: bool, payload: &[u8]) -> Option<Busy> {
        let request = slot.as_mut()?.message_now(binary, payload)?;
        if !matches!(request, Request::Send { .. }) && !slot.as_mut()?.take_request() {
            return None;
        }
        let mut session = slot.take()?;
        Some(Box::pin(async move {
            match request {
                Request::Join { room, since } => session.join(room, since).await,
                Request::History {
                    room,
                    before,
                    limit,
                } => session.history(room, before, limit).await,
                Request::Send {
                    room,
                    message,
                    reference,
                } => session.send(room, &message, reference.as_deref()).await,
                Request::Leave { room } => session.leave(room),
            }
            session
        }))
    }

    /// Echoes, or decodes the request (refusing a bad one); returns the request to handle.
    fn message_now(&mut self, binary: bool, payload: &[u8]) -> Option<Request> {
        if self.echo {
            let ws = crate::protocol::ws::binary;
            self.reply(if binary {
                ws(payload)
            } else {
                crate::protocol::ws::text(payload)
            });
            return None;
        }
        if self.outbox.is_closed() {
            return None; // closing: the close handshake is all that is left
        }
        self.refresh_limits();
        let max_chars = self.live.limits.max_message_chars;
        match native::decode(payload, max_chars) {
            Ok(request) => Some(request),
            Err(err) => {
                self.refuse(&err);
                None
            }
        }
    }

    /// Takes a token for a `join`, `leave` or `history`, or refuses the request.
    fn take_request(&mut self) -> bool {
        if self.requests.take(Instant::now()) {
            return true;
        }
        let rate = self.live.limits.requests_per_second;
        self.refuse(&ProtocolError::new(
            ErrorCode::RateLimited,
            format!("join, leave and history faster than {rate} per second; not done"),
        ));
        false
    }

    /// Takes reloaded message limits (length, rooms, rates) once a SIGHUP changed them.
    fn refresh_limits(&mut self) {
        let version = self.node.live_version();
        if version == self.live_version {
            return;
        }
        self.live = self.node.live();
        self.live_version = version;
        let limits = &self.live.limits;
        self.bucket
            .reconfigure(limits.messages_per_second, limits.message_burst);
        self.requests
            .reconfigure(limits.requests_per_second, limits.request_burst);
    }

    /// Joins `room`: `joined`, then the history (what was missed since `since`, or the newest
    /// messages), then live messages, with no gap and no duplicate between the two.
    ///
    /// The connection is registered with a staging outbox that collects live frames while
    /// the history is read. The history's snapshot is atomic with publishing, so every id up
    /// to its `last_id` is either in it or was delivered before the staging began; staged
    /// frames up to `last_id` are dropped as duplicates, the rest follow the history.
    async fn join(&mut self, room: RoomName, since: Option<Since>) {
        let node = self.node.clone();
        if self.rooms.rooms.contains(&room) {
            // Already in: the live stream is running, so there is no history to add.
            let online = node.hub.online(room.as_str());
            return self.reply(
                Reply::Joined {
                    room: &room,
                    online,
                    epoch: None,
                    last_id: None,
                    history: 0,
                    recovered: None,
                }
                .frame(),
            );
        }
        let limit = self.live.limits.max_rooms_per_connection;
        if self.rooms.rooms.len() >= limit {
            return self.refuse(&ProtocolError::new(
                ErrorCode::TooManyRooms,
                format!("a connection may be in at most {limit} rooms"),
            ));
        }
        // Subscribed first, so that every message of the room published from now on reaches
        // this node. Recorded with the hub join, with no await between: a join cancelled
        // before leaves neither a room to leave nor a subscription behind.
        let subscription = node.transport.subscribe(&room).await;
        let staging = Arc::new(Outbox::new(self.outbox.capacity(), self.outbox.max_bytes()));
        let online = node.hub.join_staged(&room, self.conn, &staging).online;
        self.rooms.rooms.push(room.clone());
        subscription.joined();
        let snapshot = node.transport.snapshot(&room, since.as_ref()).await;
        let joined = |s: Option<&Snapshot>| {
            Reply::Joined {
                room: &room,
                online,
                epoch: s.map(|s| s.epoch.as_str()),
                last_id: s.map(|s| s.last_id),
                history: s.map_or(0, |s| s.frames.len()),
                recovered: since
                    .as_ref()
                    .map(|_| s.and_then(|s| s.recovered) == Some(true)),
            }
            .frame()
        };
        match &snapshot {
            Ok(s) => {
                self.reply(joined(Some(s)));
                self.push_all(&s.frames).await;
            }
            Err(e) => {
                self.reply(joined(None));
                self.refuse(&ProtocolError::new(
                    ErrorCode::Unavailable,
                    format!("the history of room {room} is unavailable: {e}"),
                ));
            }
        }
        let covered = snapshot
            .as_ref()
            .ok()
            .map(|s| (s.epoch.as_str(), s.last_id));
        // The history may be ahead of this node's live stream (Redis): the messages in between
        // must reach the staging, where they are dropped as already sent, not the member.
        if let Some((epoch, last_id)) = covered
            && !node
                .transport
                .caught_up(&room, epoch, last_id, CATCH_UP_WAIT)
                .await
        {
            warn!(
                %room, last_id,
                "the live stream did not reach the history in time: \
                 the joiner may get some messages of its history again"
            );
        }
        let outbox = &self.outbox;
        let metrics = &node.metrics;
        node.hub
            .promote(room.as_str(), self.conn, &staging, outbox, |staged| {
                let Some(staged) = staged else {
                    metrics.slow_consumer_disconnects_total.inc();
                    return outbox.close(close_code::SLOW_CONSUMER, "slow consumer", false);
                };
                for frame in staged {
                    let payload = crate::protocol::ws::text_payload(&frame);
                    let in_history = matches!((native::message_meta(&payload), covered),
                        (Some((id, epoch)), Some((e, last))) if epoch == e && id <= last);
                    if !in_history && outbox.push(frame) == Err(Refused::Full) {
                        metrics.slow_consumer_disconnects_total.inc();
                    }
                }
            });
    }

    /// Queues `frames`, waiting for the writer to drain the outbox to half its bounds
    /// whenever it is fuller: a long history never makes its reader a slow consumer.
    async fn push_all(&self, frames: &[Bytes]) {
        for frame in frames {
            self.outbox.wait_room().await;
            self.reply(frame.clone());
        }
    }

    /// Answers a `history` request with up to `limit` messages older than `before`.
    async fn history(&mut self, room: RoomName, before: Option<u64>, limit: usize) {
        if !self.rooms.rooms.contains(&room) {
            return self.refuse(&ProtocolError::new(
                ErrorCode::NotJoined,
                format!("not in room {room}"),
            ));
        }
        match self.node.transport.page(&room, before, limit).await {
            Ok(page) => {
                // The page fits in half the outbox, and waits for that half to be free: a
                // reader as slow as its requests are fast stalls rather than piling up pages.
                let (messages, more) =
                    fit_page(&page.messages, page.more, self.outbox.max_bytes() / 2);
                self.outbox.wait_room().await;
                self.reply(native::history_frame(&room, &page.epoch, messages, more));
            }
            Err(e) => self.refuse(&ProtocolError::new(
                ErrorCode::Unavailable,
                format!("the history of room {room} is unavailable: {e}"),
            )),
        }
    }

    fn leave(&mut self, room: RoomName) {
        let Some(at) = self.rooms.rooms.iter().position(|r| *r == room) else {
            return self.refuse(&ProtocolError::new(
                ErrorCode::NotJoined,
                format!("not in room {room}"),
            ));
        };
        self.rooms.rooms.swap_remove(at);
        self.rooms.leave(&room);
        self.reply(Reply::Left { room: &room }.frame());
    }

    async fn send(&mut self, room: Option<RoomName>, message: &str, reference: Option<&str>) {
        let room = room.unwrap_or_else(|| self.first_room.clone());
        let refuse = |code, why: String| ProtocolError::new(code, why).with_ref(reference);
        if !self.rooms.rooms.contains(&room) {
            return self.refuse(&refuse(ErrorCode::NotJoined, format!("not in room {room}")));
        }
        if !self.bucket.take(Instant::now()) {
            let rate = self.live.limits.messages_per_second;
            return self.refuse(&refuse(
                ErrorCode::RateLimited,
                format!("sending faster than {rate} messages per second; not delivered"),
            ));
        }
        let published = self
            .node
            .publish(room.clone(), &self.name, message, reference)
            .await;
        match published {
            Ok(published) => self.reply(
                Reply::Ack {
                    reference,
                    room: &room,
                    id: published.id,
                    duplicate: published.duplicate,
                }
                .frame(),
            ),
            Err(e) => self.refuse(&e.with_ref(reference)),
        }
    }
}

/// The newest of `messages` (oldest first) whose `history` frame stays within `max_bytes`, at
/// least one, and whether older ones are left (the client pages on from the oldest it got).
fn fit_page(messages: &[Bytes], more: bool, max_bytes: usize) -> (&[Bytes], bool) {
    /// The frame's header and fields around the messages, with room to spare.
    const FRAME_OVERHEAD: usize = 256;
    let mut size = FRAME_OVERHEAD;
    let mut first = messages.len();
    while first > 0 && (first == messages.len() || size + messages[first - 1].len() < max_bytes) {
        size += messages[first - 1].len() + 1;
        first -= 1;
    }
    (&messages[first..], more || first > 0)
}

/// The rooms a connection is in; leaves them all when dropped, however the session ends.
struct Memberships {
    node: Arc<Node>,
    conn: ConnId,
    rooms: Vec<RoomName>,
}

impl Memberships {
    fn leave(&self, room: &RoomName) {
        if let Some(left) = self.node.hub.leave(room.as_str(), self.conn)
            && left.first_or_last
        {
            self.node.transport.unsubscribe(room);
        }
    }
}

impl Drop for Memberships {
    fn drop(&mut self) {
        for room in &self.rooms {
            self.leave(room);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_page_is_cut_to_its_newest_messages_that_fit() {
        let messages: Vec<Bytes> = (0..10).map(|_| Bytes::from(vec![b'x'; 100])).collect();
        let (all, more) = fit_page(&messages, false, 10_000);
        assert_eq!((all.len(), more), (10, false));
        let (cut, more) = fit_page(&messages, false, 256 + 3 * 101 + 1);
        assert_eq!((cut.len(), more), (3, true));
        assert!(std::ptr::eq(cut.last().unwrap(), messages.last().unwrap()));
        let (one, more) = fit_page(&messages, true, 10);
        assert_eq!((one.len(), more), (1, true));
        let (none, more) = fit_page(&[], false, 10);
        assert_eq!((none.len(), more), (0, false));
    }
}
