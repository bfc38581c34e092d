//! The WebSocket transport of a session: opened directly (`transport=websocket` without a
//! `sid`), or as an upgrade of a polling session: `2probe` is answered `3probe` and a `6` noop
//! releases the pending poll; the client's `5` moves the session onto the WebSocket.
//!
//! As for native connections, the socket is split: this reader, and the one
//! [`writer`](crate::server::writer) that drains the session's queue.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use fastwebsockets::upgrade::UpgradeFut;
use fastwebsockets::{Frame, OpCode, Role, WebSocketRead};
use http_body_util::Full;
use hyper::Request;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tracing::debug;

use super::codec::{self, EnginePacket};
use super::session::Session;
use super::{Body, EngineError};
use crate::protocol::ws::{self, close_code};
use crate::server::Node;
use crate::server::session::{Assembler, CLOSE_TIMEOUT, Early, ReadEnd, peer_close, read_error};
use crate::server::writer::{self, Liveness, WriteEnd};

/// How long a probing WebSocket has to complete the upgrade.
const UPGRADE_TIMEOUT: Duration = Duration::from_secs(10);

/// Upgrades the request to a WebSocket carrying `session`; `probe` for an upgrade from
/// polling.
pub(super) fn upgrade(
    node: Arc<Node>,
    session: Arc<Session>,
    mut req: Request<Incoming>,
    probe: bool,
    peer: SocketAddr,
) -> hyper::Response<Body> {
    let give_up = |session: &Session| {
        if probe {
            session.finish_upgrade(false);
        } else {
            session.end(&node);
        }
        EngineError::BadRequest.response()
    };
    if !fastwebsockets::upgrade::is_upgrade_request(&req) {
        return give_up(&session);
    }
    let (response, upgrade) = match fastwebsockets::upgrade::upgrade(&mut req) {
        Ok(pair) => pair,
        Err(_) => return give_up(&session),
    };
    debug!(%peer, sid = %session.sid, probe, "socket.io websocket");
    node.sessions
        .spawn(run(node.clone(), session, upgrade, probe));
    response.map(|_| Full::new(Bytes::new()))
}

async fn run(node: Arc<Node>, session: Arc<Session>, upgrade: UpgradeFut, probe: bool) {
    let Some((mut stream, early)) = accept(upgrade).await else {
        if probe {
            session.finish_upgrade(false);
        } else {
            session.end(&node);
        }
        return;
    };
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
    reader.set_max_message_size(session.max_payload + 1);
    if probe {
        let upgraded = probe_upgrade(&mut reader, &mut write_half, &session).await;
        session.finish_upgrade(upgraded);
        if !upgraded {
            return; // the session goes on polling
        }
    }
    let live = node.live();
    let liveness = Liveness::new();
    let reading = read_loop(&session, &mut reader, &liveness);
    let writing = writer::run(
        &mut write_half,
        &session.outbox,
        &live.limits,
        &liveness,
        &node.shutdown,
        &node.metrics,
    );
    tokio::pin!(reading, writing);
    tokio::select! {
        end = &mut reading => {
            if let ReadEnd::Close(code, reason) = end {
                session.outbox.close(code, reason, true);
                let _ = tokio::time::timeout(CLOSE_TIMEOUT, &mut writing).await;
            }
        }
        end = &mut writing => {
            if let WriteEnd::Closed { await_peer: true } = end {
                // Dropped after this, never resumed: its lack of cancel safety loses nothing.
                let _ = tokio::time::timeout(CLOSE_TIMEOUT, &mut reading).await;
            }
        }
    }
    session.end(&node);
}

/// The TCP stream of a completed upgrade and the bytes already read past the handshake.
async fn accept(upgrade: UpgradeFut) -> Option<(TcpStream, Bytes)> {
    let upgraded = upgrade.await.ok()?.into_inner().into_inner();
    // The server only serves `TokioIo<TcpStream>`.
    let parts = upgraded.downcast::<TokioIo<TcpStream>>().ok()?;
    let early = Bytes::copy_from_slice(&parts.read_buf);
    Some((parts.io.into_inner(), early))
}

/// Runs the probe: `2probe` → `3probe` (and a noop for the pending poll), then `5`. Returns
/// whether the client upgraded. Nothing else runs on the socket meanwhile.
async fn probe_upgrade<R, W>(
    reader: &mut WebSocketRead<R>,
    write: &mut W,
    session: &Session,
) -> bool
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let deadline = tokio::time::Instant::now() + UPGRADE_TIMEOUT;
    let mut no_send = |_: Frame<'_>| std::future::ready(Ok::<(), Infallible>(()));
    let mut probed = false;
    loop {
        let read = tokio::time::timeout_at(deadline, reader.read_frame(&mut no_send)).await;
        let Ok(Ok(frame)) = read else {
            return false;
        };
        let reply = match (frame.opcode, &frame.payload[..], probed) {
            (OpCode::Ping, payload, _) => ws::pong(payload),
            (OpCode::Pong, _, _) => continue,
            (OpCode::Text, b"2probe", false) => {
                probed = true;
                // Releases the pending poll, so the client can pause polling and upgrade.
                let _ = session.outbox.push(codec::engine_frame(b'6', b""));
                codec::engine_frame(b'3', b"probe")
            }
            (OpCode::Text, b"5", true) => return true,
            _ => return false,
        };
        let sent = tokio::time::timeout_at(deadline, write.write_all(&reply)).await;
        if !matches!(sent, Ok(Ok(()))) {
            return false;
        }
    }
}

async fn read_loop<R: AsyncRead + Unpin>(
    session: &Session,
    ws: &mut WebSocketRead<R>,
    liveness: &Liveness,
) -> ReadEnd {
    let mut message = Assembler::new(session.max_payload);
    // With auto-close and auto-pong off, fastwebsockets has nothing to send itself.
    let mut no_send = |_: Frame<'_>| std::future::ready(Ok::<(), Infallible>(()));
    loop {
        let frame = match ws.read_frame(&mut no_send).await {
            Ok(frame) => frame,
            Err(e) => return read_error(e),
        };
        liveness.touch();
        let end = match frame.opcode {
            OpCode::Close => return peer_close(&frame.payload),
            OpCode::Ping => {
                let _ = session.outbox.push(ws::pong(&frame.payload));
                None
            }
            OpCode::Pong => None,
            OpCode::Binary => Some(ReadEnd::Close(
                close_code::UNSUPPORTED_DATA,
                "binary packets are not supported",
            )),
            // Whole text frames were checked for UTF-8 by fastwebsockets.
            OpCode::Text if frame.fin && !message.started() => {
                handle(session, &frame.payload).await
            }
            OpCode::Text | OpCode::Continuation => {
                match message.push(frame.opcode, frame.fin, &frame.payload) {
                    Ok(None) => None,
                    Ok(Some(text)) => handle(session, &text).await,
                    Err(end) => Some(end),
                }
            }
        };
        if let Some(end) = end {
            return end;
        }
    }
}

/// Handles one Engine.IO packet; `Some` ends the connection.
async fn handle(session: &Session, payload: &[u8]) -> Option<ReadEnd> {
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
