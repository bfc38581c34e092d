//! One WebSocket connection: the reader loop, request handling, and the session's lifetime.
//!
//! The socket is split: this reader (fastwebsockets' frame parser, which is not cancel-safe,
//! so it is never raced against anything it could lose to and then resumed) and the
//! [`writer`](super::writer), the only code that writes. Both run in the session's one task.
//! Replies and chat messages reach the writer through the connection's [`Outbox`].

use std::convert::Infallible;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::{Buf, Bytes};
use fastwebsockets::upgrade::UpgradeFut;
use fastwebsockets::{CloseCode, Frame, OpCode, Role, WebSocketError, WebSocketRead};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, ReadBuf};
use tokio::net::TcpStream;
use tokio::time::Instant;
use tracing::{debug, error};

use super::writer::{self, Liveness, WriteEnd};
use super::{ConnSlot, Node};
use crate::config::Reloadable;
use crate::hub::ConnId;
use crate::metrics::OpenSession;
use crate::outbox::{Outbox, Refused};
use crate::protocol::native::{self, MessageTemplate, Reply, Request, Since};
use crate::protocol::ws::close_code;
use crate::protocol::{ErrorCode, ProtocolError, RoomName};
use crate::transport::{Envelope, Snapshot, dedupe_key};

/// How long either side waits for the other's close frame once one was sent.
pub(crate) const CLOSE_TIMEOUT: Duration = Duration::from_secs(5);

/// What the client asked for in the `/ws` query.
#[derive(Debug)]
pub struct Params {
    /// The first room.
    pub room: RoomName,
    /// The display name.
    pub name: String,
    /// Where the client left the first room, to receive what it missed.
    pub since: Option<Since>,
}

/// Runs one connection from the completed upgrade to the closed socket.
pub async fn run(node: Arc<Node>, upgrade: UpgradeFut, params: Params, slot: ConnSlot) {
    let _slot = slot;
    let upgraded = match upgrade.await {
        Ok(ws) => ws.into_inner().into_inner(),
        Err(e) => {
            debug!(error = %e, "websocket upgrade did not complete");
            return;
        }
    };
    // The server only ever serves `TokioIo<TcpStream>`, so the downcast cannot fail; taking
    // the raw stream back frees hyper's connection buffers.
    let Ok(parts) = upgraded.downcast::<TokioIo<TcpStream>>() else {
        error!("upgraded connection is not a TCP stream");
        return;
    };
    let _open = OpenSession::new(&node.metrics);
    let mut stream = parts.io.into_inner();
    // Bytes the client sent right after its handshake: copied out so hyper's buffer is freed.
    let early = Bytes::copy_from_slice(&parts.read_buf);
    drop(parts.read_buf);

    let conn = node.next_conn_id();
    // Frame size, queue and ping limits are fixed for the connection's life; the message
    // limits follow a reload (see `Session::refresh_limits`).
    let live = node.live();
    let outbox = Arc::new(Outbox::new(live.limits.max_queued_frames));
    let mut session = Session::new(node.clone(), conn, params, outbox.clone());
    session.start().await;

    let (read_half, mut write_half) = stream.split();
    let (mut reader, _) = fastwebsockets::after_handshake_split(
        Early {
            bytes: early,
            inner: read_half,
        },
        tokio::io::sink(),
        Role::Server,
    );
    reader.set_auto_close(false);
    reader.set_auto_pong(false);
    // fastwebsockets refuses frames of at least this size.
    reader.set_max_message_size(live.limits.max_frame_bytes + 1);

    let liveness = Liveness::new();
    let reading = session.read_loop(&mut reader, &liveness);
    let writing = writer::run(
        &mut write_half,
        &outbox,
        &live.limits,
        &liveness,
        &node.shutdown,
        &node.metrics,
    );
    tokio::pin!(reading, writing);
    let end = tokio::select! {
        end = &mut reading => {
            if let ReadEnd::Close(code, reason) = end {
                outbox.close(code, reason, true);
                let _ = tokio::time::timeout(CLOSE_TIMEOUT, &mut writing).await;
            }
            format!("{end:?}")
        }
        end = &mut writing => {
            if let WriteEnd::Failed(e) = &end {
                debug!(conn = %conn, error = %e, "write failed");
            }
            if let WriteEnd::Closed { await_peer: true } = end {
                // The reader is dropped after this, never resumed: its lack of cancel safety
                // cannot lose a frame that matters.
                let _ = tokio::time::timeout(CLOSE_TIMEOUT, &mut reading).await;
            }
            format!("{end:?}")
        }
    };
    debug!(conn = %conn, end, "connection closed");
}

/// How the reader ended.
#[derive(Debug)]
pub(crate) enum ReadEnd {
    /// The stream ended or failed; no close frame can be exchanged.
    Gone,
    /// Send a close frame with this code and reason (the peer closed, or broke a rule).
    Close(u16, &'static str),
}

/// The reader side of a connection: identity, rooms and limits.
struct Session {
    node: Arc<Node>,
    conn: ConnId,
    name: String,
    first_room: RoomName,
    /// `since` from the query, for the first room; taken by the first join.
    first_since: Option<Since>,
    outbox: Arc<Outbox>,
    rooms: Memberships,
    bucket: TokenBucket,
    /// The reloadable settings as of `live_version`.
    live: Arc<Reloadable>,
    live_version: u64,
}

impl Session {
    fn new(node: Arc<Node>, conn: ConnId, params: Params, outbox: Arc<Outbox>) -> Self {
        let live_version = node.live_version();
        let live = node.live();
        let bucket = TokenBucket::new(live.limits.messages_per_second, live.limits.message_burst);
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
            first_since: params.since,
            outbox,
            bucket,
        }
    }

    /// Greets the client and joins its first room.
    async fn start(&mut self) {
        let welcome = Reply::Welcome {
            conn: &self.conn.to_string(),
            name: &self.name,
            node: &self.node.id,
            rooms: std::slice::from_ref(&self.first_room),
        };
        self.reply(welcome.frame());
        let since = self.first_since.take();
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

    async fn read_loop<R: AsyncRead + Unpin>(
        &mut self,
        ws: &mut WebSocketRead<R>,
        liveness: &Liveness,
    ) -> ReadEnd {
        let mut message = Assembler::new(self.live.limits.max_frame_bytes);
        // With auto-close and auto-pong off, fastwebsockets has nothing to send itself.
        let mut no_send = |_: Frame<'_>| std::future::ready(Ok::<(), Infallible>(()));
        loop {
            let frame = match ws.read_frame(&mut no_send).await {
                Ok(frame) => frame,
                Err(e) => return read_error(e),
            };
            liveness.touch();
            match frame.opcode {
                OpCode::Close => return peer_close(&frame.payload),
                OpCode::Ping => self.reply(crate::protocol::ws::pong(&frame.payload)),
                OpCode::Pong => {}
                OpCode::Text if frame.fin && !message.started() => {
                    // Whole text frames were checked for UTF-8 by fastwebsockets.
                    self.handle(&frame.payload).await;
                }
                OpCode::Binary => {
                    return ReadEnd::Close(
                        close_code::UNSUPPORTED_DATA,
                        "binary messages are not supported; send JSON text",
                    );
                }
                OpCode::Text | OpCode::Continuation => {
                    match message.push(frame.opcode, frame.fin, &frame.payload) {
                        Ok(None) => {}
                        Ok(Some(text)) => self.handle(&text).await,
                        Err(end) => return end,
                    }
                }
            }
        }
    }

    /// Handles one complete text message.
    async fn handle(&mut self, payload: &[u8]) {
        if self.outbox.is_closed() {
            return; // closing: the close handshake is all that is left
        }
        // The writer runs in this task: while frames arrive back to back the reader never
        // waits, so let the writer drain our replies before they pile up to the slow-consumer
        // limit. A client that sends but does not read still ends up there.
        if self.outbox.len() >= self.outbox.capacity() / 4 {
            tokio::task::yield_now().await;
        }
        self.refresh_limits();
        let max_chars = self.live.limits.max_message_chars;
        match native::decode(payload, max_chars) {
            Ok(Request::Join { room, since }) => self.join(room, since).await,
            Ok(Request::Leave { room }) => self.leave(room),
            Ok(Request::History {
                room,
                before,
                limit,
            }) => self.history(room, before, limit).await,
            Ok(Request::Send {
                room,
                message,
                reference,
            }) => self.send(room, &message, reference.as_deref()).await,
            Err(err) => self.refuse(&err),
        }
    }

    /// Takes reloaded message limits (length, rooms, rate) once a SIGHUP changed them.
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
        self.rooms.rooms.push(room.clone());
        // Subscribed first, so that every message of the room published from now on reaches
        // this node.
        node.transport.subscribe(&room).await;
        let staging = Arc::new(Outbox::new(self.outbox.capacity()));
        let online = node.hub.join_staged(&room, self.conn, &staging).online;
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

    /// Queues `frames`, letting the writer drain the outbox when it fills up.
    async fn push_all(&self, frames: &[Bytes]) {
        for frame in frames {
            while self.outbox.len() >= self.outbox.capacity() / 2 && !self.outbox.is_closed() {
                // The writer runs in this task: give it a turn.
                tokio::task::yield_now().await;
            }
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
            Ok(page) => self.reply(native::history_frame(
                &room,
                &page.epoch,
                &page.messages,
                page.more,
            )),
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
        let ts = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        let envelope = Envelope {
            message: MessageTemplate::new(&room, &self.name, ts, message),
            room,
            dedupe: reference.map(|r| dedupe_key(&self.name, r)),
        };
        let room = envelope.room.clone();
        let metrics = &self.node.metrics;
        let started = std::time::Instant::now();
        let published = self.node.transport.publish(envelope).await;
        metrics.publish_seconds.observe(started.elapsed());
        match published {
            Ok(published) => {
                if published.duplicate {
                    metrics.duplicate_sends_total.inc();
                } else {
                    metrics.messages_in_total.inc();
                }
                self.reply(
                    Reply::Ack {
                        reference,
                        room: &room,
                        id: published.id,
                        duplicate: published.duplicate,
                    }
                    .frame(),
                )
            }
            Err(e) => {
                metrics.publish_errors_total.inc();
                self.refuse(&refuse(ErrorCode::Unavailable, e.to_string()))
            }
        }
    }
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
            && left.edge
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

pub(crate) fn read_error(e: WebSocketError) -> ReadEnd {
    use WebSocketError as E;
    match e {
        E::FrameTooLarge => ReadEnd::Close(close_code::MESSAGE_TOO_BIG, "frame too large"),
        E::InvalidUTF8 => ReadEnd::Close(close_code::INVALID_DATA, "text is not valid UTF-8"),
        E::UnexpectedEOF | E::IoError(_) | E::ConnectionClosed => ReadEnd::Gone,
        _ => ReadEnd::Close(close_code::PROTOCOL_ERROR, "websocket protocol error"),
    }
}

/// The answer to the peer's close frame: its code echoed, or a protocol error.
pub(crate) fn peer_close(payload: &[u8]) -> ReadEnd {
    match payload.len() {
        0 => ReadEnd::Close(close_code::NORMAL, ""),
        1 => ReadEnd::Close(close_code::PROTOCOL_ERROR, "malformed close frame"),
        _ => {
            let code = u16::from_be_bytes([payload[0], payload[1]]);
            if !CloseCode::from(code).is_allowed() {
                ReadEnd::Close(close_code::PROTOCOL_ERROR, "invalid close code")
            } else if std::str::from_utf8(&payload[2..]).is_err() {
                ReadEnd::Close(close_code::INVALID_DATA, "close reason is not valid UTF-8")
            } else {
                ReadEnd::Close(code, "")
            }
        }
    }
}

/// Collects a fragmented message, capping its total size (fastwebsockets caps frames only).
pub(crate) struct Assembler {
    buf: Option<Vec<u8>>,
    max_bytes: usize,
}

impl Assembler {
    pub(crate) fn new(max_bytes: usize) -> Self {
        Self {
            buf: None,
            max_bytes,
        }
    }

    pub(crate) fn started(&self) -> bool {
        self.buf.is_some()
    }

    /// Adds a text or continuation frame; returns the whole text once the last one arrives.
    pub(crate) fn push(
        &mut self,
        opcode: OpCode,
        fin: bool,
        payload: &[u8],
    ) -> Result<Option<Vec<u8>>, ReadEnd> {
        let buf = match (opcode, self.buf.as_mut()) {
            (OpCode::Text, None) => self.buf.insert(Vec::new()),
            (OpCode::Continuation, Some(buf)) => buf,
            (OpCode::Text, Some(_)) => {
                return Err(ReadEnd::Close(
                    close_code::PROTOCOL_ERROR,
                    "new message before the fragmented one ended",
                ));
            }
            _ => {
                return Err(ReadEnd::Close(
                    close_code::PROTOCOL_ERROR,
                    "continuation frame without a message",
                ));
            }
        };
        if buf.len() + payload.len() > self.max_bytes {
            return Err(ReadEnd::Close(
                close_code::MESSAGE_TOO_BIG,
                "message too large",
            ));
        }
        buf.extend_from_slice(payload);
        if !fin {
            return Ok(None);
        }
        let text = self.buf.take().unwrap_or_default();
        if std::str::from_utf8(&text).is_err() {
            return Err(ReadEnd::Close(
                close_code::INVALID_DATA,
                "text is not valid UTF-8",
            ));
        }
        Ok(Some(text))
    }
}

/// Message rate limit: `rate` tokens a second, at most `burst` saved up.
#[derive(Debug)]
pub(crate) struct TokenBucket {
    rate: f64,
    burst: f64,
    tokens: f64,
    last: Instant,
}

impl TokenBucket {
    pub(crate) fn new(rate: f64, burst: u32) -> Self {
        Self {
            rate,
            burst: f64::from(burst),
            tokens: f64::from(burst),
            last: Instant::now(),
        }
    }

    /// Changes the rate and burst, keeping the tokens saved up (at most the new burst).
    pub(crate) fn reconfigure(&mut self, rate: f64, burst: u32) {
        self.rate = rate;
        self.burst = f64::from(burst);
        self.tokens = self.tokens.min(self.burst);
    }

    pub(crate) fn take(&mut self, now: Instant) -> bool {
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.last = now;
        self.tokens = (self.tokens + elapsed * self.rate).min(self.burst);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

/// The read half with the bytes hyper had already read past the handshake in front.
pub(crate) struct Early<R> {
    pub(crate) bytes: Bytes,
    pub(crate) inner: R,
}

impl<R: AsyncRead + Unpin> AsyncRead for Early<R> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        if self.bytes.is_empty() {
            return Pin::new(&mut self.inner).poll_read(cx, buf);
        }
        let n = self.bytes.len().min(buf.remaining());
        buf.put_slice(&self.bytes[..n]);
        self.bytes.advance(n);
        Poll::Ready(Ok(()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn token_bucket_allows_a_burst_then_the_rate() {
        let mut bucket = TokenBucket::new(2.0, 3);
        let now = Instant::now();
        assert!((0..3).all(|_| bucket.take(now)));
        assert!(!bucket.take(now));
        assert!(bucket.take(now + Duration::from_millis(500)));
        assert!(!bucket.take(now + Duration::from_millis(600)));
        assert!((0..3).all(|_| bucket.take(now + Duration::from_secs(60))));
        assert!(!bucket.take(now + Duration::from_secs(60)));
    }

    #[test]
    fn assembler_caps_the_total_and_checks_utf8_at_the_end() {
        let mut a = Assembler::new(10);
        assert!(matches!(a.push(OpCode::Text, false, b"12345"), Ok(None)));
        assert!(matches!(
            a.push(OpCode::Continuation, false, b"123456"),
            Err(ReadEnd::Close(close_code::MESSAGE_TOO_BIG, _))
        ));
        let mut a = Assembler::new(10);
        a.push(OpCode::Text, false, b"\xC3").unwrap();
        assert_eq!(
            a.push(OpCode::Continuation, true, b"\xA9")
                .unwrap()
                .unwrap(),
            "é".as_bytes()
        );
        a.push(OpCode::Text, false, b"\xC3").unwrap();
        assert!(matches!(
            a.push(OpCode::Continuation, true, b"x"),
            Err(ReadEnd::Close(close_code::INVALID_DATA, _))
        ));
        assert!(matches!(
            Assembler::new(10).push(OpCode::Continuation, true, b"x"),
            Err(ReadEnd::Close(close_code::PROTOCOL_ERROR, _))
        ));
    }

    #[test]
    fn peer_close_is_echoed_or_refused() {
        assert!(matches!(peer_close(b""), ReadEnd::Close(1000, _)));
        assert!(matches!(peer_close(&[3, 233]), ReadEnd::Close(1001, _)));
        assert!(matches!(peer_close(&[0x03, 0xED]), ReadEnd::Close(1002, _)));
        assert!(matches!(peer_close(&[3]), ReadEnd::Close(1002, _)));
        assert!(matches!(
            peer_close(&[0x03, 0xE8, 0xFF]),
            ReadEnd::Close(1007, _)
        ));
    }
}
