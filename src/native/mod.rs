//! The native protocol at `/ws` (and the echo endpoint): one WebSocket connection from the
//! upgrade to the closed socket. [`session`] handles its requests.
//!
//! The connection owns its socket and lends it to its reader (frames from [`FrameReader`],
//! which holds no buffer while the connection is idle) and to the
//! [`writer`](crate::conn::writer), the only code that writes. Both run in the connection's
//! one task. Replies and chat messages reach the writer through the connection's [`Outbox`].

mod session;

use std::sync::Arc;
use std::task::{Context, Poll, ready};

use bytes::Bytes;
use hyper::upgrade::{OnUpgrade, Upgraded};
use hyper_util::rt::TokioIo;
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
///
/// The future is allocated whole for every connection and idle connections are the many, so
/// it holds little besides the [`Connection`] while the connection is open: the connection is
/// built in a plain function, so its parts are no part of this state machine, and whatever a
/// session needs only briefly (joining, handling a request, the close handshake) is boxed
/// while it runs. An async block rather than an async fn: an async fn would keep its
/// arguments twice, as given and as moved into its body.
pub(crate) fn run(
    node: Arc<Node>,
    upgrade: OnUpgrade,
    params: Params,
    slot: ConnSlot,
) -> impl Future<Output = ()> {
    let mut start = Box::new(Start { upgrade, params });
    async move {
        // Awaited on its own: no part of building the connection waits with it.
        let upgraded = (&mut start.upgrade).await;
        let Some(mut conn) = Connection::open(&node, upgraded, start) else {
            return;
        };
        let _open = OpenSession::new(&node.metrics);
        let end = std::future::poll_fn(|cx| conn.poll(&node, cx)).await;
        // The close handshake, boxed: its timer need not be part of every idle connection's
        // task.
        let closing = Box::pin(tokio::time::timeout(CLOSE_TIMEOUT, conn.close(end, &node)));
        let _ = closing.await;
        drop(slot); // held to the end
    }
}

/// What a connection starts from, boxed: a pointer in its task rather than their size, freed
/// once the connection is built.
struct Start {
    /// Resolves once hyper has sent the 101 response.
    upgrade: OnUpgrade,
    params: Params,
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
struct Connection {
    /// The socket: read by `reader`, written by `writer` alone.
    stream: TcpStream,
    id: ConnId,
    /// The session, while no request holds it.
    session: Option<Session>,
    /// The request in progress (or the first join), owning the session until it is done.
    handling: Option<Handling>,
    reader: FrameReader,
    writer: Writer,
    liveness: Liveness,
    /// The fragmented message being received (whether it is binary, the session knows).
    message: Assembler,
}

/// Frames handled in one poll before the task yields to others.
const FRAMES_PER_POLL: usize = 32;

impl Connection {
    /// The connection of an `upgraded` request asking for `params`, its session greeting the
    /// client and joining its first room as soon as it is polled; `None` when the upgrade
    /// failed. A plain function: nothing it builds the connection from stays in the
    /// connection's task.
    #[expect(
        clippy::boxed_local,
        reason = "`run` keeps what it captured to its end: a box moved in here is freed now"
    )]
    fn open(
        node: &Arc<Node>,
        upgraded: hyper::Result<Upgraded>,
        start: Box<Start>,
    ) -> Option<Self> {
        let upgraded = match upgraded {
            Ok(upgraded) => upgraded,
            Err(e) => {
                debug!(error = %e, "websocket upgrade did not complete");
                return None;
            }
        };
        let Some((stream, early)) = take_stream(upgraded) else {
            error!("upgraded connection is not a TCP stream");
            return None;
        };
        // Frame size, queue and ping limits are fixed for the connection's life; the message
        // limits follow a reload (see `Chat::live`).
        let live = node.live();
        let limits = &live.limits;
        // Copies `early`: hyper's read buffer is freed with it.
        let reader = FrameReader::new(&early, limits.max_frame_bytes);
        let id = node.next_conn_id();
        let outbox = Arc::new(Outbox::new(
            limits.max_queued_frames,
            limits.max_queued_bytes,
        ));
        let writer = Writer::new(outbox.clone(), limits);
        let Start { mut params, .. } = *start;
        let since = params.since.take();
        let mut session = Session::new(node.clone(), id, params, outbox);
        Some(Self {
            stream,
            id,
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
        })
    }

    fn poll(&mut self, node: &Node, cx: &mut Context<'_>) -> Poll<OpenEnd> {
        for _ in 0..FRAMES_PER_POLL {
            let socket = &mut self.stream;
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
            if let Err(e) = ready!(self.reader.poll_ready(&self.stream, cx)) {
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
                    session.binary = frame.opcode == Opcode::Binary;
                }
                let binary = session.binary;
                if let Some(whole) = message.push(frame.payload, frame.fin) {
                    *handling = Session::message(slot, binary, &whole);
                }
            }
        }
        None
    }

    /// The close handshake after `end`: the close frame out, then a [`linger`] until the peer
    /// closes too.
    async fn close(&mut self, end: OpenEnd, node: &Node) {
        let id = self.id;
        debug!(conn = %id, ?end, "connection ending");
        let end = match end {
            // Sends in flight are answered before the close frame, the writer going on.
            OpenEnd::Read(ReadEnd::Close(..)) => match self.drain(node).await {
                Some(written) => OpenEnd::Write(written),
                None => end,
            },
            end => end,
        };
        match end {
            OpenEnd::Read(ReadEnd::Close(code, reason)) => {
                self.writer.outbox().close(code, reason, true);
                let Self {
                    stream,
                    writer,
                    liveness,
                    ..
                } = self;
                let writing = std::future::poll_fn(|cx| writer.poll(stream, liveness, node, cx));
                match writing.await {
                    WriteEnd::Failed(e) => debug!(error = %e, "write failed while closing"),
                    WriteEnd::Closed { .. } => linger(&mut self.reader, &mut self.stream).await,
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
                    linger(&mut self.reader, &mut self.stream).await;
                }
            }
        }
        debug!(conn = %id, "connection closed");
    }

    /// Waits until the session's sends in flight are answered while the writer goes on;
    /// `Some` if the writer ended first.
    async fn drain(&mut self, node: &Node) -> Option<WriteEnd> {
        let Self {
            stream: socket,
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

#[cfg(test)]
mod tests {
    use super::*;

    /// The size of what `f` returns, without calling it.
    fn output_size<A, B, C, D, R>(_: &impl FnOnce(A, B, C, D) -> R) -> usize {
        size_of::<R>()
    }

    #[test]
    fn a_connection_task_stays_small() {
        let task = output_size(&run);
        println!(
            "connection future: {task} bytes; Connection {}, Session {}, reader {}, writer {}",
            size_of::<Connection>(),
            size_of::<Session>(),
            size_of::<FrameReader>(),
            size_of::<Writer>(),
        );
        // Every connection's task holds this future, with the task tracker's token and the
        // runtime's header, scheduler, id and trailer (112 bytes), in a multiple of 128
        // bytes: up to 528 bytes it is a 640-byte task (1,152 when it held the session's
        // parts twice, its timers as `Instant`s and its arguments twice).
        assert!(task <= 528, "the connection future takes {task} bytes");
    }
}
