//! Test utilities: a real scalechat server on a free port, a WebSocket chat client, and a raw
//! client that writes any bytes it is told to (for protocol violations).
#![allow(dead_code)] // each test binary uses its own part of this module

pub mod backplane;
pub mod postgres;
pub mod proxy;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use scalechat::config::Config;
use scalechat::node::Node;
use scalechat::server::Server;
use scalechat::socketio::EngineSessions;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::task::JoinHandle;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};
use tokio_util::sync::CancellationToken;

/// How long a test waits for something the server should send before failing.
pub const WAIT: Duration = Duration::from_secs(10);

/// Limits generous enough that only tests about limits hit them.
pub fn config() -> Config {
    let mut config = Config::default();
    config.server.host = "127.0.0.1".into();
    config.server.port = 0;
    config.server.node_id = "test-node".into();
    config.limits.messages_per_second = 100_000.0;
    config.limits.message_burst = 100_000;
    config.limits.requests_per_second = 100_000.0;
    config.limits.request_burst = 100_000;
    config
}

/// A server running in this test's runtime.
pub struct TestServer {
    pub addr: SocketAddr,
    pub node: Arc<Node>,
    /// The node's Socket.IO sessions.
    pub socketio: Arc<EngineSessions>,
    shutdown: CancellationToken,
    task: JoinHandle<()>,
}

/// Starts a server with `config` on a free port of 127.0.0.1.
pub async fn start(config: Config) -> TestServer {
    let shutdown = CancellationToken::new();
    let server = Server::bind(config, shutdown.clone()).await.expect("bind");
    let addr = server.local_addr().unwrap();
    let node = server.node().clone();
    let socketio = server.socketio().clone();
    let task = tokio::spawn(server.run());
    TestServer {
        addr,
        node,
        socketio,
        shutdown,
        task,
    }
}

impl TestServer {
    /// `ws://…/ws?query`.
    pub fn url(&self, query: &str) -> String {
        format!("ws://{}/ws?{query}", self.addr)
    }

    /// Connects a chat client and reads its `welcome` and first `joined`.
    pub async fn client(&self, query: &str) -> Client {
        let mut client = Client::connect(&self.url(query)).await;
        let welcome = client.recv().await;
        assert_eq!(welcome["type"], "welcome", "{welcome}");
        let joined = client.recv().await;
        assert_eq!(joined["type"], "joined", "{joined}");
        client.name = welcome["name"].as_str().unwrap().to_owned();
        client
    }

    /// Begins shutdown, as SIGTERM does.
    pub fn shutdown(&self) {
        self.shutdown.cancel();
    }

    /// Shuts down and waits for `run` to return.
    pub async fn stop(self) {
        self.shutdown.cancel();
        tokio::time::timeout(Duration::from_secs(30), self.task)
            .await
            .expect("server stops in time")
            .unwrap();
    }
}

/// The ids of chat `messages`.
pub fn ids(messages: &[Value]) -> Vec<u64> {
    messages.iter().map(|m| m["id"].as_u64().unwrap()).collect()
}

/// Reads what `client` is sent after joining (`joined`, then `history`) until id `last`, and
/// checks that history and live messages together are consecutive ids, each once. Returns
/// the first id.
pub async fn consecutive_until(
    client: &mut Client,
    joined: &Value,
    history: &[Value],
    last: u64,
) -> u64 {
    let joined_at = joined["last_id"].as_u64().unwrap();
    let mut seen = ids(history);
    assert!(
        seen.iter().all(|id| *id <= joined_at),
        "history beyond last_id"
    );
    while seen.last().copied().unwrap_or(joined_at) < last {
        let f = client.expect("message").await;
        seen.push(f["id"].as_u64().unwrap());
    }
    let first = *seen.first().unwrap();
    let due: Vec<u64> = (first..=last).collect();
    if let Some(at) = (0..due.len()).find(|&i| seen.get(i) != due.get(i)) {
        panic!(
            "joined at {joined_at}: ids {:?} where {} was due",
            &seen[at.saturating_sub(2)..(at + 3).min(seen.len())],
            due[at]
        );
    }
    assert_eq!(
        seen.len(),
        due.len(),
        "joined at {joined_at}: more than due"
    );
    first
}

/// Sends `signal` (e.g. "-TERM", "-STOP") to process `pid` with kill(1).
pub fn send_signal(pid: u32, signal: &str) {
    let status = std::process::Command::new("kill")
        .args([signal, &pid.to_string()])
        .status()
        .expect("run kill");
    assert!(status.success(), "kill {signal} {pid}: {status}");
}

/// Polls the async `condition` until it holds, failing after `limit`.
pub async fn within<F, Fut>(limit: Duration, what: &str, condition: F)
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + limit;
    while !condition().await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting: {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Polls `condition` until it holds, failing after [`WAIT`].
pub async fn eventually(what: &str, condition: impl Fn() -> bool) {
    let deadline = tokio::time::Instant::now() + WAIT;
    while !condition() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting: {what}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Polls the async `condition` until it holds, failing after [`WAIT`].
pub async fn eventually_async<F, Fut>(what: &str, condition: F)
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + WAIT;
    while !condition().await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting: {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// `GET /readyz`: the status code, or `None` when nothing answers (not listening yet or any
/// more).
pub async fn readyz(addr: SocketAddr) -> Option<u16> {
    let ask = async {
        let mut s = TcpStream::connect(addr).await.ok()?;
        s.write_all(b"GET /readyz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .await
            .ok()?;
        let mut buf = Vec::new();
        s.read_to_end(&mut buf).await.ok()?;
        String::from_utf8_lossy(&buf)
            .split(' ')
            .nth(1)?
            .parse()
            .ok()
    };
    tokio::time::timeout(Duration::from_secs(2), ask)
        .await
        .ok()
        .flatten()
}

/// A plain HTTP/1.1 request; returns the status code and the raw response.
pub async fn http_get(addr: SocketAddr, path: &str, headers: &[(&str, &str)]) -> (u16, String) {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    let mut req = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n");
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    stream.write_all(req.as_bytes()).await.unwrap();
    let mut response = Vec::new();
    tokio::time::timeout(WAIT, stream.read_to_end(&mut response))
        .await
        .expect("response in time")
        .unwrap();
    let text = String::from_utf8_lossy(&response).into_owned();
    let status = text
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    (status, text)
}

/// A WebSocket chat client speaking the native protocol.
pub struct Client {
    pub ws: WebSocketStream<MaybeTlsStream<TcpStream>>,
    pub name: String,
}

impl Client {
    /// Connects without reading anything.
    pub async fn connect(url: &str) -> Client {
        let (ws, _) = tokio_tungstenite::connect_async(url)
            .await
            .expect("connect");
        Client {
            ws,
            name: String::new(),
        }
    }

    /// Sends one JSON frame.
    pub async fn send(&mut self, frame: Value) {
        self.ws
            .send(Message::text(frame.to_string()))
            .await
            .unwrap();
    }

    /// Sends a chat message to `room` with `reference`.
    pub async fn say(&mut self, room: &str, message: &str, reference: &str) {
        self.send(json!({"type":"send","room":room,"message":message,"ref":reference}))
            .await;
    }

    /// Joins `room` and returns the `joined` reply.
    pub async fn join(&mut self, room: &str) -> Value {
        self.send(json!({"type":"join","room":room})).await;
        let joined = self.recv().await;
        assert_eq!(joined["type"], "joined", "{joined}");
        joined
    }

    /// The next text frame, as JSON. Fails on close or after [`WAIT`].
    pub async fn recv(&mut self) -> Value {
        loop {
            let msg = tokio::time::timeout(WAIT, self.ws.next())
                .await
                .expect("a frame in time")
                .expect("connection open")
                .expect("valid frame");
            match msg {
                Message::Text(text) => return serde_json::from_str(&text).unwrap(),
                Message::Ping(_) | Message::Pong(_) => continue,
                other => panic!("expected a text frame, got {other:?}"),
            }
        }
    }

    /// Sends `count` messages (`prefix0`, `prefix1`, …) to general and reads until all are
    /// acked, skipping the chat messages that arrive meanwhile.
    pub async fn say_acked(&mut self, prefix: &str, count: usize) {
        for n in 0..count {
            self.say("general", &format!("{prefix}{n}"), &format!("{prefix}-{n}"))
                .await;
        }
        let mut acks = 0;
        while acks < count {
            let frame = self.recv().await;
            match frame["type"].as_str() {
                Some("ack") => acks += 1,
                Some("message") => {}
                _ => panic!("unexpected {frame}"),
            }
        }
    }

    /// Sends `count` copies of `text` to general and reads until all are acked, skipping
    /// whatever else arrives meanwhile: fills the room's history.
    pub async fn say_repeated_acked(&mut self, text: &str, count: usize) {
        for n in 0..count {
            self.say("general", text, &format!("h-{n}")).await;
        }
        let mut acks = 0;
        while acks < count {
            if self.recv().await["type"] == "ack" {
                acks += 1;
            }
        }
    }

    /// The next chat `message`, skipping acks.
    pub async fn expect_chat(&mut self) -> Value {
        loop {
            let frame = self.recv().await;
            match frame["type"].as_str() {
                Some("message") => return frame,
                Some("ack") => continue,
                _ => panic!("expected a message, got {frame}"),
            }
        }
    }

    /// Reads a `joined` reply and the history messages it announces.
    pub async fn joined(&mut self) -> (Value, Vec<Value>) {
        let joined = self.expect("joined").await;
        let count = joined["history"].as_u64().unwrap_or(0) as usize;
        let mut history = Vec::with_capacity(count);
        for _ in 0..count {
            history.push(self.expect("message").await);
        }
        (joined, history)
    }

    /// The next frame of `kind`, failing if another type comes first.
    pub async fn expect(&mut self, kind: &str) -> Value {
        let frame = self.recv().await;
        assert_eq!(frame["type"], kind, "{frame}");
        frame
    }

    /// Reads until the server closes; returns the close code and reason. Text frames still
    /// queued before the close are returned too.
    pub async fn closed(&mut self) -> (u16, String, Vec<Value>) {
        let mut before = Vec::new();
        loop {
            let next = tokio::time::timeout(WAIT, self.ws.next())
                .await
                .expect("close in time");
            match next {
                Some(Ok(Message::Text(text))) => before.push(serde_json::from_str(&text).unwrap()),
                Some(Ok(Message::Close(Some(frame)))) => {
                    return (u16::from(frame.code), frame.reason.to_string(), before);
                }
                Some(Ok(Message::Close(None))) => {
                    return (u16::from(CloseCode::Status), String::new(), before);
                }
                Some(Ok(_)) => continue,
                Some(Err(e)) => panic!("connection failed before a close frame: {e}"),
                None => panic!("connection ended without a close frame"),
            }
        }
    }
}

/// A WebSocket client that sends raw frames, for what a well-behaved client never sends.
pub struct RawClient {
    pub stream: TcpStream,
    buf: Vec<u8>,
}

impl RawClient {
    /// Connects and completes the handshake on `path` (e.g. `/ws`).
    pub async fn connect(addr: SocketAddr, path: &str) -> RawClient {
        let mut stream = TcpStream::connect(addr).await.unwrap();
        let req = format!(
            "GET {path} HTTP/1.1\r\nHost: {addr}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
        );
        stream.write_all(req.as_bytes()).await.unwrap();
        let mut buf = Vec::new();
        let end = loop {
            let mut chunk = [0u8; 4096];
            let n = stream.read(&mut chunk).await.unwrap();
            assert!(n > 0, "server closed during the handshake");
            buf.extend_from_slice(&chunk[..n]);
            if let Some(at) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break at + 4;
            }
        };
        assert!(
            buf.starts_with(b"HTTP/1.1 101"),
            "{}",
            String::from_utf8_lossy(&buf)
        );
        buf.drain(..end);
        RawClient { stream, buf }
    }

    /// The next frame if it has already been read (with an earlier one), without reading.
    #[allow(dead_code)] // not every test binary uses it
    pub fn read_along(&mut self) -> Option<(u8, Vec<u8>)> {
        let (opcode, payload, used) = parse_frame(&self.buf)?;
        self.buf.drain(..used);
        Some((opcode, payload))
    }

    /// Writes one masked frame.
    pub async fn send_frame(&mut self, fin: bool, opcode: u8, payload: &[u8]) {
        self.stream
            .write_all(&encode_frame(fin, opcode, payload))
            .await
            .unwrap();
    }

    /// Reads the next frame: (opcode, payload). `None` when the server closed the TCP stream.
    pub async fn recv_frame(&mut self) -> Option<(u8, Vec<u8>)> {
        loop {
            if let Some((opcode, payload, used)) = parse_frame(&self.buf) {
                self.buf.drain(..used);
                return Some((opcode, payload));
            }
            let mut chunk = [0u8; 65536];
            let n = tokio::time::timeout(WAIT, self.stream.read(&mut chunk))
                .await
                .expect("a frame in time")
                .ok()?;
            if n == 0 {
                return None;
            }
            self.buf.extend_from_slice(&chunk[..n]);
        }
    }

    /// Writes `bytes` whole before reading anything, as a client busy sending a long message
    /// does, then reads until the server's close frame; returns its code, or `None` when the
    /// connection ended without one (what a browser reports as 1006). A failed write is no
    /// error: the server stops reading once it has refused the message.
    pub async fn close_code_after_sending(&mut self, bytes: &[u8]) -> Option<u16> {
        let _ = tokio::time::timeout(WAIT, self.stream.write_all(bytes))
            .await
            .expect("the server reads or refuses in time");
        loop {
            if let Some((opcode, payload, used)) = parse_frame(&self.buf) {
                self.buf.drain(..used);
                if opcode == 0x8 {
                    return Some(u16::from_be_bytes([payload[0], payload[1]]));
                }
                continue;
            }
            let mut chunk = [0u8; 65536];
            match tokio::time::timeout(WAIT, self.stream.read(&mut chunk))
                .await
                .expect("a frame in time")
            {
                Ok(0) | Err(_) => return None,
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
            }
        }
    }

    /// Reads frames until a close frame; returns its code.
    pub async fn close_code(&mut self) -> u16 {
        while let Some((opcode, payload)) = self.recv_frame().await {
            if opcode == 0x8 {
                return u16::from_be_bytes([payload[0], payload[1]]);
            }
        }
        panic!("connection ended without a close frame");
    }
}

/// A masked client frame.
pub fn encode_frame(fin: bool, opcode: u8, payload: &[u8]) -> Vec<u8> {
    let mut out = vec![(u8::from(fin) << 7) | opcode];
    match payload.len() {
        n @ 0..=125 => out.push(0x80 | n as u8),
        n @ 126..=0xFFFF => {
            out.push(0x80 | 126);
            out.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            out.push(0x80 | 127);
            out.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    let mask = [0x12, 0x34, 0x56, 0x78];
    out.extend_from_slice(&mask);
    out.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
    out
}

/// Parses one unmasked server frame from `buf`: (opcode, payload, bytes used).
fn parse_frame(buf: &[u8]) -> Option<(u8, Vec<u8>, usize)> {
    if buf.len() < 2 {
        return None;
    }
    let opcode = buf[0] & 0x0F;
    let (len, head) = match buf[1] & 0x7F {
        126 if buf.len() >= 4 => (u16::from_be_bytes([buf[2], buf[3]]) as usize, 4),
        127 if buf.len() >= 10 => (
            u64::from_be_bytes(buf[2..10].try_into().unwrap()) as usize,
            10,
        ),
        126 | 127 => return None,
        n => (n as usize, 2),
    };
    if buf.len() < head + len {
        return None;
    }
    Some((opcode, buf[head..head + len].to_vec(), head + len))
}
