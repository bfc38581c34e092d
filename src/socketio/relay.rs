//! Any node serves any session: a session id names the node that owns the session
//! (`<22 random characters>.<the node's name in hex>`), and a request for a session owned by
//! another node is relayed to it, at the address it advertises (`server.internal_addr`,
//! through Redis). Polling requests are forwarded with their bodies (each bounded, as the
//! owner bounds them) and answered with the owner's answer; a WebSocket upgrade is forwarded
//! as it is and, once the owner accepts it, the two sockets are joined byte for byte. The
//! owner keeps the session's state and delivery rules; the relay adds one hop.
//!
//! A node that shuts down does not wait for what it relays: a relayed poll is answered `503`
//! and a relayed WebSocket is cut, and socket.io-client reconnects and recovers the session.
//!
//! A relayed request carries [`RELAYED`]: it is never relayed again, so a stale address or a
//! forged id cannot make nodes relay in a loop. A session whose node is gone, unknown or
//! unreachable gets Engine.IO's "Session ID unknown", and the client starts a new session.

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::header::{self, HeaderName, HeaderValue};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tracing::debug;

use super::{Body, EngineError, respond};
use crate::node::Node;

/// Marks a relayed request.
pub(super) const RELAYED: &str = "x-scalechat-relayed";

/// How long connecting to the owner may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// The longest response head the owner may send to an upgrade.
const MAX_HEAD: usize = 8 * 1024;
/// The largest polling answer relayed (the owner's queue bounds it well below).
const MAX_ANSWER: usize = 32 << 20;

/// The session id of a new session of node `node`: `random`, a dot, the node's name in hex.
pub(super) fn session_id(random: &str, node: &str) -> String {
    let mut sid = String::with_capacity(random.len() + 1 + 2 * node.len());
    sid.push_str(random);
    sid.push('.');
    for byte in node.bytes() {
        sid.push_str(&format!("{byte:02x}"));
    }
    sid
}

/// The node a session id names, if it names one.
fn owner(sid: &str) -> Option<String> {
    let (_, hex) = sid.rsplit_once('.')?;
    if hex.is_empty() || hex.len() % 2 != 0 || hex.len() > 128 {
        return None;
    }
    let bytes = (0..hex.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).ok())
        .collect::<Option<Vec<u8>>>()?;
    String::from_utf8(bytes).ok()
}

/// The client that forwards polling requests, shared by the node's relays.
fn client() -> &'static Client<HttpConnector, Full<Bytes>> {
    static CLIENT: OnceLock<Client<HttpConnector, Full<Bytes>>> = OnceLock::new();
    CLIENT.get_or_init(|| {
        let mut connector = HttpConnector::new();
        connector.set_connect_timeout(Some(CONNECT_TIMEOUT));
        connector.set_nodelay(true);
        Client::builder(TokioExecutor::new()).build(connector)
    })
}

/// Relays a request for session `sid`, which this node does not hold, to its owner; or
/// answers "Session ID unknown".
pub(super) async fn relay(
    node: &Arc<Node>,
    req: Request<Incoming>,
    sid: &str,
    websocket: bool,
    max_body: usize,
) -> Response<Body> {
    let unknown = || EngineError::SessionIdUnknown.response();
    if req.headers().contains_key(RELAYED) {
        return unknown();
    }
    let Some(owner) = owner(sid).filter(|o| *o != node.id) else {
        return unknown();
    };
    let Some(addr) = node.transport.node_addr(&owner).await else {
        return unknown();
    };
    node.metrics.socketio_relayed_total.inc();
    let live = node.live();
    // A poll may wait for packets up to a ping interval; the owner answers before that.
    let limit = Duration::from_secs(live.limits.ping_interval_secs + live.limits.ping_timeout_secs)
        + Duration::from_secs(5);
    let relayed = if websocket {
        tokio::time::timeout(CONNECT_TIMEOUT * 2, upgrade(node, req, &addr)).await
    } else if req.method() == Method::GET {
        // A poll waits on the owner for up to a ping interval, longer than this node's
        // shutdown should wait for it: on shutdown the client is told to go elsewhere (its
        // transport fails, and socket.io-client reconnects and recovers the session).
        tokio::select! {
            relayed = tokio::time::timeout(limit, forward(req, &addr, max_body)) => relayed,
            () = node.shutdown.cancelled() => return shutting_down(),
        }
    } else {
        tokio::time::timeout(limit, forward(req, &addr, max_body)).await
    };
    match relayed {
        Ok(Ok(response)) => response,
        Ok(Err(why)) => {
            debug!(%sid, %owner, %addr, error = %why, "relay failed");
            unknown()
        }
        Err(_) => {
            debug!(%sid, %owner, %addr, "relay timed out");
            unknown()
        }
    }
}

/// The answer to a relayed poll when this node shuts down.
fn shutting_down() -> Response<Body> {
    respond(
        StatusCode::SERVICE_UNAVAILABLE,
        "text/plain; charset=utf-8",
        Bytes::from_static(b"shutting down\n"),
    )
}

/// Whether `name` is a header that belongs to one connection, not to the request.
fn hop_by_hop(name: &HeaderName) -> bool {
    matches!(
        name.as_str(),
        "connection" | "keep-alive" | "transfer-encoding" | "upgrade" | "host" | "te" | "trailer"
    ) || name == header::CONTENT_LENGTH
}

/// Forwards a polling request and answers with the owner's answer.
async fn forward(
    req: Request<Incoming>,
    addr: &str,
    max_body: usize,
) -> Result<Response<Body>, String> {
    let (parts, body) = req.into_parts();
    let body = Limited::new(body, max_body)
        .collect()
        .await
        .map_err(|e| format!("request body: {e}"))?
        .to_bytes();
    let path = parts.uri.path_and_query().map_or("/", |p| p.as_str());
    let mut out = Request::builder()
        .method(parts.method)
        .uri(format!("http://{addr}{path}"));
    for (name, value) in &parts.headers {
        if !hop_by_hop(name) {
            out = out.header(name, value);
        }
    }
    let out = out
        .header(RELAYED, "1")
        .body(Full::new(body))
        .map_err(|e| e.to_string())?;
    let answer = client().request(out).await.map_err(|e| e.to_string())?;
    let (parts, body) = answer.into_parts();
    let body = Limited::new(body, MAX_ANSWER)
        .collect()
        .await
        .map_err(|e| format!("answer body: {e}"))?
        .to_bytes();
    let mut response = Response::new(Full::new(body));
    *response.status_mut() = parts.status;
    for (name, value) in &parts.headers {
        if !hop_by_hop(name) {
            response.headers_mut().append(name, value.clone());
        }
    }
    Ok(response)
}

/// Forwards a WebSocket upgrade; once the owner answers 101, the client gets that answer and
/// the two sockets are joined until either closes.
async fn upgrade(
    node: &Arc<Node>,
    mut req: Request<Incoming>,
    addr: &str,
) -> Result<Response<Body>, String> {
    let mut owner = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(addr))
        .await
        .map_err(|_| "connect timed out".to_owned())?
        .map_err(|e| e.to_string())?;
    let _ = owner.set_nodelay(true);
    let path = req.uri().path_and_query().map_or("/", |p| p.as_str());
    let mut head = format!("GET {path} HTTP/1.1\r\nhost: {addr}\r\n{RELAYED}: 1\r\n");
    for (name, value) in req.headers() {
        if name != header::HOST
            && let Ok(value) = value.to_str()
        {
            head.push_str(&format!("{name}: {value}\r\n"));
        }
    }
    head.push_str("\r\n");
    owner
        .write_all(head.as_bytes())
        .await
        .map_err(|e| e.to_string())?;
    // The owner's answer head, and whatever of the WebSocket stream came with it.
    let mut buf = Vec::with_capacity(1024);
    let head_len = loop {
        let mut chunk = [0u8; 1024];
        let n = owner.read(&mut chunk).await.map_err(|e| e.to_string())?;
        if n == 0 {
            return Err("the owner closed before answering".into());
        }
        buf.extend_from_slice(&chunk[..n]);
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break end + 4;
        }
        if buf.len() > MAX_HEAD {
            return Err("the owner's answer head is too long".into());
        }
    };
    let mut headers = [httparse::EMPTY_HEADER; 32];
    let mut parsed = httparse::Response::new(&mut headers);
    parsed
        .parse(&buf[..head_len])
        .map_err(|e| format!("the owner's answer: {e}"))?;
    let status = parsed.code.unwrap_or(502);
    if status != 101 {
        return Ok(EngineError::SessionIdUnknown.response());
    }
    let mut response = Response::new(Full::new(Bytes::new()));
    *response.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    for h in parsed.headers.iter() {
        if let (Ok(name), Ok(value)) = (
            HeaderName::from_bytes(h.name.as_bytes()),
            HeaderValue::from_bytes(h.value),
        ) {
            response.headers_mut().append(name, value);
        }
    }
    let early = buf.split_off(head_len);
    let on_upgrade = hyper::upgrade::on(&mut req);
    let shutdown = node.shutdown.clone();
    node.sessions.spawn(async move {
        let Ok(upgraded) = on_upgrade.await else {
            return;
        };
        let mut client = TokioIo::new(upgraded);
        if client.write_all(&early).await.is_err() {
            return;
        }
        // The session lives on the owner, which sends its Close frames; this node only
        // carries bytes, without knowing where a frame ends. On this node's shutdown both
        // sockets are closed at once: the client reconnects (and recovers the session), and
        // the shutdown does not wait for a connection that would outlive it.
        tokio::select! {
            _ = tokio::io::copy_bidirectional(&mut client, &mut owner) => {}
            () = shutdown.cancelled() => {}
        }
    });
    Ok(response)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_session_id_names_its_node() {
        let sid = session_id("AbC-_0123456789abcdefgh", "node-7f");
        assert!(sid.starts_with("AbC-_0123456789abcdefgh."));
        assert_eq!(owner(&sid).as_deref(), Some("node-7f"));
        assert_eq!(owner(&session_id("x", "nœud 2")).as_deref(), Some("nœud 2"));
        for forged in ["nodot", "a.", "a.zz", "a.123", "a.ffff"] {
            assert_eq!(owner(forged), None, "{forged}");
        }
    }
}
