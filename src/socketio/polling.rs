//! The HTTP long-polling transport: the handshake, `GET` (wait for packets, then send
//! everything queued in one response) and `POST` (a payload of packets from the client).

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;
use hyper::header;
use hyper::{Request, Response, StatusCode};

use super::session::EngineSession;
use super::{Body, EngineError, respond};
use crate::outbox::Next;
use crate::protocol::socketio::{self as codec, EnginePacket};

const TEXT: &str = "text/plain; charset=UTF-8";

/// How long a poll waits for packets while an upgrade is pending before it is released with a
/// noop.
const PROBED_RELEASE: Duration = Duration::from_millis(100);

/// The answer to a polling handshake: the open packet queued by the new session.
pub(super) fn handshake(session: &EngineSession) -> Response<Body> {
    let mut batch = VecDeque::new();
    match session.outbox.take(&mut batch) {
        Next::Frames => respond(StatusCode::OK, TEXT, codec::join_frames(batch.iter())),
        // A session closed before its first response (shutdown raced the handshake).
        Next::Close(_) | Next::Empty => {
            session.end();
            EngineError::BadRequest.response()
        }
    }
}

/// Marks the session's one long-poll as running until dropped (the response was sent, or
/// the client went away).
struct PollGuard<'a>(&'a EngineSession);

impl Drop for PollGuard<'_> {
    fn drop(&mut self) {
        self.0.end_poll();
    }
}

/// A long-poll: waits until something is queued, then sends all of it.
pub(super) async fn poll(session: &Arc<EngineSession>) -> Response<Body> {
    if session.is_websocket() || !session.start_poll() {
        return EngineError::BadRequest.response();
    }
    let _guard = PollGuard(session);
    let mut batch = VecDeque::new();
    loop {
        if session.is_websocket() {
            // The upgrade completed while this poll waited: release it.
            return respond(StatusCode::OK, TEXT, Bytes::from_static(b"6"));
        }
        // Nothing awaits between the take and the response, so a dropped poll loses nothing.
        match session.outbox.take(&mut batch) {
            Next::Frames => {
                return respond(StatusCode::OK, TEXT, codec::join_frames(batch.iter()));
            }
            Next::Close(_) => {
                session.end();
                return respond(StatusCode::OK, TEXT, Bytes::from_static(b"1"));
            }
            Next::Empty => {
                // While the client upgrades it waits for its poll to end before it sends
                // `5`; the noop queued at the probe may have gone to the poll before this
                // one, so this one is released too (as Engine.IO's server does, every 100 ms
                // while the upgrade is pending, which also keeps a client that goes on
                // polling from spinning).
                let probed = session.is_probed();
                tokio::select! {
                    _ = session.outbox.wait() => {}
                    _ = session.ended() => {}
                    () = tokio::time::sleep(PROBED_RELEASE), if probed => {
                        return respond(StatusCode::OK, TEXT, Bytes::from_static(b"6"));
                    }
                }
            }
        }
    }
}

/// A payload of packets from the client.
pub(super) async fn post(session: &EngineSession, req: Request<Incoming>) -> Response<Body> {
    if session.is_websocket() {
        return EngineError::BadRequest.response();
    }
    let max = session.max_payload;
    let declared = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|len| len > max as u64) {
        return too_large(session);
    }
    let body = match Limited::new(req.into_body(), max).collect().await {
        Ok(body) => body.to_bytes(),
        Err(e) if e.is::<http_body_util::LengthLimitError>() => return too_large(session),
        Err(_) => return EngineError::BadRequest.response(),
    };
    let Ok(text) = std::str::from_utf8(&body) else {
        return bad(session);
    };
    let Ok(packets) = codec::split_payload(text) else {
        return bad(session);
    };
    let mut client = session.client.lock().await;
    for packet in packets {
        match codec::decode_engine(packet) {
            Ok(EnginePacket::Message(text)) => {
                // With as many messages in flight as allowed, the rest waits (and with it
                // the answer to the POST).
                session.sends.room().await;
                if client.handle(text).await.is_err() {
                    drop(client);
                    return bad(session);
                }
            }
            Ok(EnginePacket::Pong(_)) => session.ponged(),
            Ok(EnginePacket::Close) => {
                drop(client);
                session.end();
                break;
            }
            Ok(EnginePacket::Noop | EnginePacket::Ping(_)) => {}
            Ok(EnginePacket::Upgrade) | Err(_) => {
                drop(client);
                return bad(session);
            }
        }
    }
    respond(StatusCode::OK, "text/html", Bytes::from_static(b"ok"))
}

/// A malformed payload: the session is closed, as Engine.IO does on a parse error.
fn bad(session: &EngineSession) -> Response<Body> {
    session.end();
    EngineError::BadRequest.response()
}

/// A body over `maxPayload`: 413, and the session is closed.
fn too_large(session: &EngineSession) -> Response<Body> {
    session.end();
    respond(
        StatusCode::PAYLOAD_TOO_LARGE,
        TEXT,
        Bytes::from_static(b"payload too large"),
    )
}
