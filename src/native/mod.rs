//! The native protocol at `/ws` (and the echo endpoint): one WebSocket connection from the
//! upgrade to the closed socket. [`session`] handles its requests.
//!
//! The socket is split: this reader (frames from [`FrameReader`], which holds no buffer while
//! the connection is idle) and the [`writer`](crate::conn::writer), the only code that
//! writes. Both run in the connection's one task. Replies and chat messages reach the writer
//! through the connection's [`Outbox`].

mod session;

use std::sync::Arc;
use std::task::{Context, Poll, ready};

use bytes::Bytes;
use hyper::upgrade::{OnUpgrade, Upgraded};
use hyper_util::rt::TokioIo;
use tokio::io::AsyncWrite;
use tokio::net::TcpStream;
use tracing::{debug, error};

use self::session::{Handling, Session};
use crate::conn::close::{CLOSE_TIMEOUT, ReadEnd, linger, peer_close, read_error};
use crate::conn::reader::{Assembler, FrameReader};
use crate::conn::writer::{Liveness, WriteEnd, Writer};
use crate::hub::ConnId;
use crate::metrics::OpenSession;
use crate::node::access::Grant;
use crate::node::{ConnSlot, Node};
use crate::outbox::Outbox;
use crate::protocol::RoomName;
use crate::protocol::frame::Opcode;
use crate::protocol::native::Since;
use crate::protocol::ws::close_code;

/// What the client asked for in the `/ws` query.
#[derive(Debug)]
pub(crate) struct Params {
    /// The first room.
    pub(crate) room: RoomName,
    /// The display name.
    pub(crate) name: String,
    /// Where the client left the first room, to receive what it missed.
    pub(crate) since: Option<Since>,
    /// Send the first room's presence events.
    pub(crate) presence: bool,
    /// The rooms the user's token grants.
    pub(crate) grant: Grant,
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
        handling: Some(Box::pin(async move {
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

/// How the open phase of a connection ended: the client's side, or the writer's.
#[derive(Debug)]
enum OpenEnd {
    Read(ReadEnd),
    Write(WriteEnd),
}

/// One open connection, polled by its task: the writer first, then the request in progress,
/// then the client's next frames. Frames are read only while no request is in progress and
/// the session's sends in flight leave room, so a client's requests are handled in order,
/// `send`s while earlier ones are still being published; the writer runs all along.
struct Connection<'a> {
    /// The session, while no request holds it.
    session: Option<Session>,
    /// The request in progress (or the first join), owning the session until it is done.
    handling: Option<Handling>,
    reader: FrameReader<'a>,
    writer: Writer,
    liveness: Liveness,
    /// The fragmented message being received.
    message: Assembler,
    /// Whether that message is binary (the decoder has checked the order).
    binary: bool,
}

/// Frames handled in one poll before the task yields to others.
const FRAMES_PER_POLL: usize = 32;

impl Connection<'_> {
    fn poll<W: AsyncWrite + Unpin>(
        &mut self,
        socket: &mut W,
        node: &Node,
        cx: &mut Context<'_>,
    ) -> Poll<OpenEnd> {
        for _ in 0..FRAMES_PER_POLL {
            if let Poll::Ready(end) = self.writer.poll(socket, &self.liveness, node, cx) {
                return Poll::Ready(OpenEnd::Write(end));
            }
            if let Some(handling) = &mut self.handling {
                self.session = Some(ready!(handling.as_mut().poll(cx)));
                self.handling = None;
                continue; // its replies are queued: write them first
            }
            if let Some(session) = &self.session {
                ready!(session.poll_room(cx));
            }
            if let Err(e) = ready!(self.reader.poll_ready(cx)) {
                return Poll::Ready(OpenEnd::Read(read_error(e)));
            }
            self.liveness.touch();
            if let Some(end) = self.on_frame() {
                return Poll::Ready(OpenEnd::Read(end));
            }
        }
        cx.waker().wake_by_ref();
        Poll::Pending
    }

    /// Handles the frame the reader has ready.
    fn on_frame(&mut self) -> Option<ReadEnd> {
        let Self {
            session: slot,
            handling,
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
            Opcode::Ping => session.pong(frame.payload),
            Opcode::Pong => {}
            Opcode::Binary if !session.echo => {
                return Some(ReadEnd::Close(
                    close_code::UNSUPPORTED_DATA,
                    "binary messages are not supported; send JSON text",
                ));
            }
            Opcode::Text | Opcode::Binary if frame.fin => {
                *handling = Session::message(slot, frame.opcode == Opcode::Binary, frame.payload);
            }
            Opcode::Text | Opcode::Binary | Opcode::Continuation => {
                if frame.opcode != Opcode::Continuation {
                    *binary = frame.opcode == Opcode::Binary;
                }
                if let Some(whole) = message.push(frame.payload, frame.fin) {
                    *handling = Session::message(slot, *binary, &whole);
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
        end: OpenEnd,
        socket: &mut W,
        node: &Node,
    ) {
        debug!(conn = %id, ?end, "connection ending");
        let end = match end {
            // Sends in flight are answered before the close frame, the writer going on.
            OpenEnd::Read(ReadEnd::Close(..)) => match self.drain(socket, node).await {
                Some(written) => OpenEnd::Write(written),
                None => end,
            },
            end => end,
        };
        match end {
            OpenEnd::Read(ReadEnd::Close(code, reason)) => {
                self.writer.outbox().close(code, reason, true);
                let writing =
                    std::future::poll_fn(|cx| self.writer.poll(socket, &self.liveness, node, cx));
                match writing.await {
                    WriteEnd::Failed(e) => debug!(error = %e, "write failed while closing"),
                    WriteEnd::Closed { .. } => linger(&mut self.reader, socket).await,
                }
            }
            OpenEnd::Read(ReadEnd::Gone) => {}
            OpenEnd::Write(WriteEnd::Failed(e)) => debug!(error = %e, "write failed"),
            OpenEnd::Write(WriteEnd::Closed { await_peer }) => {
                // A request in progress (a publish, say) finishes; its reply has no reader.
                if let Some(handling) = self.handling.take() {
                    self.session = Some(handling.await);
                }
                if await_peer {
                    linger(&mut self.reader, socket).await;
                }
            }
        }
        debug!(conn = %id, "connection closed");
    }

    /// Waits until the session's sends in flight are answered while the writer goes on;
    /// `Some` if the writer ended first.
    async fn drain<W: AsyncWrite + Unpin>(
        &mut self,
        socket: &mut W,
        node: &Node,
    ) -> Option<WriteEnd> {
        let Self {
            session,
            writer,
            liveness,
            ..
        } = self;
        let session = session.as_ref()?;
        let drained = session.drained();
        tokio::pin!(drained);
        std::future::poll_fn(|cx| {
            if let Poll::Ready(end) = writer.poll(socket, liveness, node, cx) {
                return Poll::Ready(Some(end));
            }
            drained.as_mut().poll(cx).map(|()| None)
        })
        .await
    }
}

/// The raw stream back from hyper, and the bytes hyper read past the handshake. The server only
/// ever serves `TokioIo<TcpStream>`, so the downcast cannot fail. Not async, so that hyper's
/// parts are no part of the session's state.
fn take_stream(upgraded: Upgraded) -> Option<(TcpStream, Bytes)> {
    let parts = upgraded.downcast::<TokioIo<TcpStream>>().ok()?;
    Some((parts.io.into_inner(), parts.read_buf))
}
