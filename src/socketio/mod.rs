//! Socket.IO v5 over Engine.IO v4 at `/socket.io/`, for apps built on `socket.io-client` 4.x
//! (docs/socketio.md). The packets themselves are encoded and decoded by
//! [`protocol::socketio`](crate::protocol::socketio).
//!
//! - `session`: one Engine.IO session (sid → [`EngineSessions`]), its queue, heartbeat and
//!   end.
//! - `client`: the Socket.IO side of a session: CONNECT, events (`event:message`, `join`,
//!   `leave`), acks, DISCONNECT; publishing goes through the one transport path.
//! - `polling`: the HTTP long-polling transport (GET drains the queue, POST carries packets).
//! - `websocket`: the WebSocket transport, direct or upgraded from polling.
//! - `relay`: requests for sessions of other nodes, relayed to them (no sticky sessions).
//!
//! A session's queue is an [`Outbox`](crate::outbox::Outbox) of WebSocket text frames, each one
//! Engine.IO packet: the WebSocket transport writes them as they are, the polling transport
//! sends their payloads (the same bytes, without the frame header) joined by `\x1e`. So a chat
//! message's Socket.IO form is built once per node and shared by every Socket.IO member, on
//! either transport.

mod client;
mod polling;
mod relay;
mod session;
mod websocket;

use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{self, HeaderMap, HeaderValue};
use hyper::{Method, Request, Response, StatusCode};

pub use session::EngineSessions;

use crate::metrics::Refusal;
use crate::node::Node;
use crate::node::admission::{admit, cookie_allowed, origin_allowed, trusted_origin};
use crate::node::guard;

type Body = Full<Bytes>;

/// The Engine.IO errors a request can get, with their protocol codes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum EngineError {
    /// 0: `transport` is missing or not `polling` / `websocket`.
    TransportUnknown,
    /// 1: the `sid` names no session on this node.
    SessionIdUnknown,
    /// 2: a handshake that is not a GET.
    BadHandshakeMethod,
    /// 3: anything else the request got wrong.
    BadRequest,
    /// 4: the `Origin` is not allowed (403).
    Forbidden,
    /// 5: `EIO` is not 4.
    UnsupportedProtocolVersion,
}

impl EngineError {
    fn response(self) -> Response<Body> {
        let (code, message) = match self {
            Self::TransportUnknown => (0, "Transport unknown"),
            Self::SessionIdUnknown => (1, "Session ID unknown"),
            Self::BadHandshakeMethod => (2, "Bad handshake method"),
            Self::BadRequest => (3, "Bad request"),
            Self::Forbidden => (4, "Forbidden"),
            Self::UnsupportedProtocolVersion => (5, "Unsupported protocol version"),
        };
        let body = format!("{{\"code\":{code},\"message\":\"{message}\"}}");
        let status = if self == Self::Forbidden {
            StatusCode::FORBIDDEN
        } else {
            StatusCode::BAD_REQUEST
        };
        respond(status, "application/json", Bytes::from(body))
    }
}

fn respond(status: StatusCode, content_type: &'static str, body: Bytes) -> Response<Body> {
    let mut res = Response::new(Full::new(body));
    *res.status_mut() = status;
    res.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    res
}

/// What an Engine.IO request says in its query.
#[derive(Debug, Default)]
struct Query {
    eio: Option<String>,
    transport: Option<String>,
    sid: Option<String>,
    name: Option<String>,
    room: Option<String>,
    /// With `auth.jwt_secret`: the signed token, unless the CONNECT packet carries it.
    token: Option<String>,
    /// With `auth.jwt_secret`: the token of the `scalechat_token` cookie, used when neither
    /// the query nor the CONNECT packet carries one. Set only for requests whose origin may
    /// use it.
    cookie: Option<String>,
}

impl Query {
    fn parse(query: &str) -> Self {
        let mut q = Self::default();
        for (key, value) in form_urlencoded::parse(query.as_bytes()) {
            let slot = match &*key {
                "EIO" => &mut q.eio,
                "transport" => &mut q.transport,
                "sid" => &mut q.sid,
                "name" => &mut q.name,
                "room" => &mut q.room,
                "token" => &mut q.token,
                _ => continue,
            };
            *slot = Some(value.into_owned());
        }
        q
    }
}

/// Answers a request to `/socket.io/`; `sessions` are the node's.
pub(crate) async fn route(
    node: Arc<Node>,
    sessions: &Arc<EngineSessions>,
    peer: SocketAddr,
    req: Request<Incoming>,
) -> Response<Body> {
    let origin = req.headers().get(header::ORIGIN).cloned();
    let mut query = Query::parse(req.uri().query().unwrap_or(""));
    if !origin_allowed(&node, &req) {
        node.metrics.refused(Refusal::Origin);
        return EngineError::Forbidden.response();
    }
    if query.token.is_none() {
        // The cookie would be the session's credential: only this site's pages and
        // `server.allowed_origins` may use it.
        if !cookie_allowed(&node, req.headers()) {
            node.metrics.refused(Refusal::Origin);
            return EngineError::Forbidden.response();
        }
        query.cookie = guard::token(None, req.headers()).map(str::to_owned);
    }
    // Only this site and listed origins may make credentialed requests: another page, let
    // through when `server.allowed_origins` is empty, gets no
    // `Access-Control-Allow-Credentials`, so its browser sends no cookie and shows it nothing
    // of a credentialed answer.
    let credentials = trusted_origin(&node, req.headers()) == Some(true);
    let mut res = if req.method() == Method::OPTIONS {
        preflight(req.headers())
    } else {
        dispatch(node, sessions, peer, req, query).await
    };
    let headers = res.headers_mut();
    if let Some(origin) = origin {
        headers.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, origin);
        if credentials {
            headers.insert(
                header::ACCESS_CONTROL_ALLOW_CREDENTIALS,
                HeaderValue::from_static("true"),
            );
        }
    }
    headers.insert(header::VARY, HeaderValue::from_static("Origin"));
    res
}

/// The CORS preflight of a cross-origin POST.
fn preflight(headers: &HeaderMap) -> Response<Body> {
    let mut res = respond(StatusCode::NO_CONTENT, "text/plain", Bytes::new());
    let out = res.headers_mut();
    out.insert(
        header::ACCESS_CONTROL_ALLOW_METHODS,
        HeaderValue::from_static("GET, POST, OPTIONS"),
    );
    let asked = headers
        .get(header::ACCESS_CONTROL_REQUEST_HEADERS)
        .cloned()
        .unwrap_or_else(|| HeaderValue::from_static("content-type"));
    out.insert(header::ACCESS_CONTROL_ALLOW_HEADERS, asked);
    out.insert(
        header::ACCESS_CONTROL_MAX_AGE,
        HeaderValue::from_static("86400"),
    );
    res
}

async fn dispatch(
    node: Arc<Node>,
    sessions: &Arc<EngineSessions>,
    peer: SocketAddr,
    req: Request<Incoming>,
    query: Query,
) -> Response<Body> {
    let websocket = match query.transport.as_deref() {
        Some("polling") => false,
        Some("websocket") => true,
        _ => return EngineError::TransportUnknown.response(),
    };
    if query.eio.as_deref() != Some("4") {
        return EngineError::UnsupportedProtocolVersion.response();
    }
    let Some(sid) = query.sid.as_deref() else {
        if req.method() != Method::GET {
            return EngineError::BadHandshakeMethod.response();
        }
        return handshake(node, sessions, peer, req, &query, websocket);
    };
    let Some(session) = sessions.get(sid) else {
        // Another node's session (or none): relayed to its owner, if there is one.
        let max_body = node.live().limits.max_frame_bytes;
        let sid = sid.to_owned();
        return relay::relay(&node, req, &sid, websocket, max_body).await;
    };
    match (req.method(), websocket) {
        (&Method::GET, true) if session.begin_upgrade() => {
            websocket::upgrade(node, session, req, true, peer)
        }
        (&Method::GET, false) => polling::poll(&session).await,
        (&Method::POST, false) => polling::post(&session, req).await,
        _ => EngineError::BadRequest.response(),
    }
}

/// A new session: admitted as a `/ws` upgrade is (the per-address limits and the node's
/// capacity), its slots held until it ends.
fn handshake(
    node: Arc<Node>,
    sessions: &Arc<EngineSessions>,
    peer: SocketAddr,
    req: Request<Incoming>,
    query: &Query,
    websocket: bool,
) -> Response<Body> {
    if node.shutdown.is_cancelled() {
        node.metrics.refused(Refusal::ShuttingDown);
        return respond(
            StatusCode::SERVICE_UNAVAILABLE,
            "text/plain; charset=utf-8",
            Bytes::from_static(b"shutting down\n"),
        );
    }
    let slot = match admit(&node, peer, req.headers()) {
        Ok(slot) => slot,
        Err(refused) => return refused.response(),
    };
    match session::open(&node, sessions, query, websocket, slot) {
        Err(_) => respond(
            StatusCode::SERVICE_UNAVAILABLE,
            "text/plain; charset=utf-8",
            Bytes::from_static(b"no random bytes for a session id\n"),
        ),
        Ok(session) if websocket => websocket::upgrade(node, session, req, false, peer),
        Ok(session) => polling::handshake(&session),
    }
}
