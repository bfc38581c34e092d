//! The WebSocket transport of a session: opened directly (`transport=websocket` without a
//! `sid`), or as an upgrade of a polling session: `2probe` is answered `3probe` and a `6` noop
//! releases the pending poll; the client's `5` moves the session onto the WebSocket.
//!
//! As for native connections, the socket is split: this reader, and the one
//! [`writer`](crate::conn::writer) that drains the session's queue.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::Request;
use hyper::body::Incoming;
use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tracing::debug;

use super::session::EngineSession;
use super::{Body, EngineError};
use crate::conn::close::{CLOSE_TIMEOUT, ReadEnd, linger, peer_close, read_error};
use crate::conn::reader::{Assembler, FrameReader};
use crate::conn::writer::{self, Liveness, WriteEnd};
use crate::node::Node;
use crate::protocol::frame::Opcode;
use crate::protocol::socketio::{self as codec, EnginePacket};
use crate::protocol::ws::{self, close_code};

/// How long a probing WebSocket has to complete the upgrade.
const UPGRADE_TIMEOUT: Duration = Duration::from_secs(10);

/// Upgrades the request to a WebSocket carrying `session`; `probe` for an upgrade from
/// polling.
pub(super) fn upgrade(
    node: Arc<Node>,
    session: Arc<EngineSession>,
    mut req: Request<Incoming>,
    probe: bool,
    peer: SocketAddr,
) -> hyper::Response<Body> {
    let give_up = |session: &EngineSession| {
        if probe {
            session.finish_upgrade(false);
        } else {
            session.end();
        }
        EngineError::BadRequest.response()
    };
    if !fastwebsockets::upgrade::is_upgrade_request(&req) {
        return give_up(&session);
    }
    // hyper's upgrade is taken first; fastwebsockets only checks the request and builds the
    // 101 response (see the `/ws` endpoint in the server's routing).
    let upgrade = hyper::upgrade::on(&mut req);
    let response = match fastwebsockets::upgrade::upgrade(&mut req) {
        Ok((response, _)) => response,
        Err(_) => return give_up(&session),
    };
    debug!(%peer, sid = %session.sid, probe, "socket.io websocket");
    node.sessions
        .spawn(run(node.clone(), session, upgrade, probe));
    response.map(|_| Full::new(Bytes::new()))
}

async fn run(node: Arc<Node>, session: Arc<EngineSession>, upgrade: OnUpgrade, probe: bool) {
    let Some((mut stream, early)) = accept(upgrade).await else {
        if probe {
            session.finish_upgrade(false);
        } else {
            session.end();
        }
        return;
    };
    let mut reader = FrameReader::new(&early, session.max_payload);
    drop(early);
    if probe {
        let upgraded = probe_upgrade(&mut reader, &mut stream, &session).await;
        session.finish_upgrade(upgraded);
        if !upgraded {
            return; // the session goes on polling
        }
    }
    let liveness = Liveness::new();
    let closed = {
        let (read_half, mut write_half) = stream.split();
        let reading = read_loop(&session, &mut reader, read_half.as_ref(), &liveness);
        let writing = writer::run(&mut write_half, &session.outbox, &liveness, &node);
        tokio::pin!(reading, writing);
        tokio::select! {
            end = &mut reading => match end {
                ReadEnd::Close(code, reason) => {
                    // Messages in flight are answered before the close, the writer going on.
                    let drained = tokio::time::timeout(CLOSE_TIMEOUT, async {
                        tokio::select! {
                            end = &mut writing => Some(end),
                            () = session.sends.drained() => None,
                        }
                    });
                    match drained.await {
                        Ok(Some(end)) => matches!(end, WriteEnd::Closed { await_peer: true }),
                        Ok(None) | Err(_) => {
                            session.outbox.close(code, reason, true);
                            let written = tokio::time::timeout(CLOSE_TIMEOUT, &mut writing).await;
                            matches!(written, Ok(WriteEnd::Closed { .. }))
                        }
                    }
                }
                ReadEnd::Gone => false,
            },
            end = &mut writing => matches!(end, WriteEnd::Closed { await_peer: true }),
        }
    };
    session.end();
    if closed {
        // The close frame is out: the peer gets it even while it is still sending.
        linger(&mut reader, &mut stream).await;
    }
}

/// The TCP stream of a completed upgrade and the bytes already read past the handshake.
async fn accept(upgrade: OnUpgrade) -> Option<(TcpStream, Bytes)> {
    let upgraded = upgrade.await.ok()?;
    // The server only serves `TokioIo<TcpStream>`.
    let parts = upgraded.downcast::<TokioIo<TcpStream>>().ok()?;
    Some((parts.io.into_inner(), parts.read_buf))
}

/// Runs the probe: `2probe` → `3probe` (and a noop for the pending poll), then `5`. Returns
/// whether the client upgraded. Nothing else runs on the socket meanwhile.
async fn probe_upgrade(
    reader: &mut FrameReader,
    stream: &mut TcpStream,
    session: &EngineSession,
) -> bool {
    let deadline = tokio::time::Instant::now() + UPGRADE_TIMEOUT;
    let mut probed = false;
    loop {
        let read = tokio::time::timeout_at(deadline, reader.next(stream)).await;
        let Ok(Ok(frame)) = read else {
            return false;
        };
        let reply = match (frame.opcode, frame.fin, frame.payload, probed) {
            (Opcode::Ping, _, payload, _) => ws::pong(payload),
            (Opcode::Pong, ..) => continue,
            (Opcode::Text, true, b"2probe", false) => {
                probed = true;
                session.probed();
                // Releases the pending poll, so the client can pause polling and upgrade.
                let _ = session.outbox.push(codec::engine_frame(b'6', b""));
                codec::engine_frame(b'3', b"probe")
            }
            (Opcode::Text, true, b"5", true) => return true,
            _ => return false,
        };
        let sent = tokio::time::timeout_at(deadline, stream.write_all(&reply)).await;
        if !matches!(sent, Ok(Ok(()))) {
            return false;
        }
    }
}

async fn read_loop(
    session: &EngineSession,
    reader: &mut FrameReader,
    stream: &TcpStream,
    liveness: &Liveness,
) -> ReadEnd {
    let mut message = Assembler::default();
    loop {
        // With as many messages in flight as allowed, nothing more is read until one is
        // answered.
        session.sends.room().await;
        let frame = match reader.next(stream).await {
            Ok(frame) => frame,
            Err(e) => return read_error(e),
        };
        liveness.touch();
        // The decoder checked the frame order, sizes, UTF-8 and close payloads.
        let end = match frame.opcode {
            Opcode::Close => return peer_close(frame.payload),
            Opcode::Ping => {
                let _ = session.outbox.push(ws::pong(frame.payload));
                None
            }
            Opcode::Pong => None,
            Opcode::Binary => Some(ReadEnd::Close(
                close_code::UNSUPPORTED_DATA,
                "binary packets are not supported",
            )),
            Opcode::Text if frame.fin => handle(session, frame.payload).await,
            Opcode::Text | Opcode::Continuation => match message.push(frame.payload, frame.fin) {
                Some(text) => handle(session, &text).await,
                None => None,
            },
        };
        if let Some(end) = end {
            return end;
        }
    }
}

/// Handles one Engine.IO packet; `Some` ends the connection.
async fn handle(session: &EngineSession, payload: &[u8]) -> Option<ReadEnd> {
    let malformed = Some(ReadEnd::Close(close_code::INVALID_DATA, "malformed packet"));
    let Ok(text) = std::str::from_utf8(payload) else {
        return malformed;
    };
    match codec::decode_engine(text) {
        Ok(EnginePacket::Message(packet)) => {
            if session.client.lock().await.handle(packet).await.is_err() {
                return malformed;
            }
        }
        Ok(EnginePacket::Pong(_)) => session.ponged(),
        Ok(EnginePacket::Ping(data)) => {
            let _ = session
                .outbox
                .push(codec::engine_frame(b'3', data.as_bytes()));
        }
        Ok(EnginePacket::Close) => return Some(ReadEnd::Close(close_code::NORMAL, "")),
        Ok(EnginePacket::Noop | EnginePacket::Upgrade) => {}
        Err(_) => return malformed,
    }
    None
}
