//! A small Socket.IO client for the scenarios: Engine.IO v4 long-polling (the handshake, `GET`
//! and `POST`) over keep-alive HTTP/1.1 connections written by hand, the upgrade to WebSocket
//! (`2probe`, `3probe`, `5`) on the native client's frame code, a session opened on the
//! WebSocket transport alone (the fan-out's members), Socket.IO CONNECT, emitting
//! `event:message` with the bench marker, and finding a delivery in a `message` event. Any
//! request may go to any node: the one that owns the session, or another that relays it.
//!
//! Cheap per message: each connection reads into one buffer it keeps and writes from another,
//! a session's request paths are built once, and a delivery is found with one byte search in
//! the packet as received.

use std::net::{IpAddr, SocketAddr};
use std::sync::LazyLock;
use std::time::Duration;

use anyhow::{Context, bail};
use memchr::memmem::{self, Finder};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::track::{Delivery, now_ns, push_marker};
use crate::ws::{self, FrameReader, OP_CLOSE, OP_PING, OP_PONG, OP_TEXT, Target};

/// The Engine.IO record separator between packets of one polling payload.
const SEPARATOR: u8 = 0x1e;

/// A keep-alive HTTP/1.1 connection to one node, one request at a time.
pub struct Http {
    stream: TcpStream,
    host: SocketAddr,
    out: Vec<u8>,
    buf: Vec<u8>,
    /// Bytes of `buf` received.
    filled: usize,
    /// The last answer's body in `buf`, and where that answer ends.
    body: (usize, usize),
}

impl Http {
    /// Connects to `addr` from `source`.
    pub async fn connect(addr: SocketAddr, source: IpAddr) -> anyhow::Result<Http> {
        Ok(Http {
            stream: ws::tcp_connect(addr, source).await?,
            host: addr,
            out: Vec::with_capacity(512),
            buf: vec![0; 4096],
            filled: 0,
            body: (0, 0),
        })
    }

    /// Writes a request for `path`; its answer is read with [`Http::answer`].
    pub async fn send(&mut self, method: &str, path: &str, body: &[u8]) -> anyhow::Result<()> {
        let out = &mut self.out;
        out.clear();
        for part in [method, " ", path, " HTTP/1.1\r\nhost: "] {
            out.extend_from_slice(part.as_bytes());
        }
        let mut digits = itoa::Buffer::new();
        out.extend_from_slice(digits.format(self.host.port()).as_bytes());
        out.extend_from_slice(b"\r\ncontent-length: ");
        out.extend_from_slice(digits.format(body.len()).as_bytes());
        out.extend_from_slice(b"\r\ncontent-type: text/plain;charset=UTF-8\r\n\r\n");
        out.extend_from_slice(body);
        self.stream.write_all(&self.out).await?;
        Ok(())
    }

    /// Reads the answer to the request sent: its status; the body is [`Http::body`].
    pub async fn answer(&mut self) -> anyhow::Result<u16> {
        // Drops the previous answer, keeping whatever came after it.
        let (_, end) = self.body;
        self.buf.copy_within(end..self.filled, 0);
        self.filled -= end;
        self.body = (0, 0);
        let (head, status, length) = loop {
            if let Some(head) = memmem::find(&self.buf[..self.filled], b"\r\n\r\n") {
                let (status, length) = parse_head(&self.buf[..head])?;
                break (head + 4, status, length);
            }
            self.fill().await?;
        };
        while self.filled < head + length {
            self.fill().await?;
        }
        self.body = (head, head + length);
        Ok(status)
    }

    /// The body of the last answer.
    pub fn body(&self) -> &[u8] {
        &self.buf[self.body.0..self.body.1]
    }

    /// One request and its answer, which must be `200`; the body is [`Http::body`].
    pub async fn call(&mut self, method: &str, path: &str, body: &[u8]) -> anyhow::Result<()> {
        self.send(method, path, body).await?;
        let status = self.answer().await?;
        if status != 200 {
            let body = String::from_utf8_lossy(self.body()).into_owned();
            bail!("{method} {path}: {status} {body}");
        }
        Ok(())
    }

    async fn fill(&mut self) -> anyhow::Result<()> {
        if self.filled == self.buf.len() {
            let len = self.buf.len() * 2;
            self.buf.resize(len, 0);
        }
        let n = self.stream.read(&mut self.buf[self.filled..]).await?;
        if n == 0 {
            let line = self.out.split(|&b| b == b'\r').next().unwrap_or_default();
            bail!(
                "{} closed the connection before answering {}",
                self.host,
                lossy(line)
            );
        }
        self.filled += n;
        Ok(())
    }
}

/// The status and `content-length` of a response head (without the blank line).
fn parse_head(head: &[u8]) -> anyhow::Result<(u16, usize)> {
    let text = std::str::from_utf8(head).context("a response head that is not UTF-8")?;
    let mut lines = text.split("\r\n");
    let status = lines
        .next()
        .and_then(|l| l.split(' ').nth(1))
        .and_then(|s| s.parse().ok())
        .with_context(|| format!("no status in {text:?}"))?;
    let length = lines
        .filter_map(|l| l.split_once(':'))
        .find(|(name, _)| name.eq_ignore_ascii_case("content-length"))
        .and_then(|(_, v)| v.trim().parse().ok())
        .with_context(|| format!("no content-length in {text:?}"))?;
    Ok((status, length))
}

/// Opens an Engine.IO session with a polling handshake over `http` (`query`: more parameters,
/// e.g. `&name=a&room=b`); its session id.
pub async fn handshake(http: &mut Http, query: &str) -> anyhow::Result<String> {
    let path = format!("/socket.io/?EIO=4&transport=polling{query}");
    http.call("GET", &path, b"").await?;
    let open = http.body();
    let at = memmem::find(open, b"\"sid\":\"").context("no sid in the open packet")? + 7;
    let len = memchr::memchr(b'"', &open[at..]).context("an unterminated sid")?;
    Ok(String::from_utf8_lossy(&open[at..at + len]).into_owned())
}

/// A session on the polling transport: one connection for long-polls, one for packets sent,
/// each to whichever node they were opened to.
pub struct Polling {
    pub sid: String,
    path: String,
    pub get: Http,
    pub post: Http,
}

impl Polling {
    /// Session `sid` over `get` and `post`.
    pub fn new(sid: String, get: Http, post: Http) -> Polling {
        let path = format!("/socket.io/?EIO=4&transport=polling&sid={sid}");
        Polling {
            sid,
            path,
            get,
            post,
        }
    }

    /// Sends one packet (or a payload of several) and reads the `ok`.
    pub async fn post(&mut self, payload: &[u8]) -> anyhow::Result<()> {
        self.post.call("POST", &self.path, payload).await
    }

    /// Starts a long-poll; its packets are read with [`Polling::poll_answer`].
    pub async fn send_poll(&mut self) -> anyhow::Result<()> {
        self.get.send("GET", &self.path, b"").await
    }

    /// The answer to the long-poll sent: its payload (packets separated by 0x1e).
    pub async fn poll_answer(&mut self) -> anyhow::Result<&[u8]> {
        let status = self.get.answer().await?;
        if status != 200 {
            bail!(
                "poll: {status} {}",
                String::from_utf8_lossy(self.get.body())
            );
        }
        Ok(self.get.body())
    }

    /// Posts `payload` with a long-poll out, as a client's is, and polls until `until` holds
    /// for a packet; when that packet was read (ns, the clock of `track::now_ns`). Pings that
    /// came meanwhile are answered.
    pub async fn post_and_poll(
        &mut self,
        payload: &[u8],
        mut until: impl FnMut(&[u8]) -> bool,
    ) -> anyhow::Result<u64> {
        self.get.send("GET", &self.path, b"").await?;
        let (path, get, post) = (&self.path, &mut self.get, &mut self.post);
        let polling = async {
            let mut pinged = false;
            loop {
                let status = get.answer().await?;
                if status != 200 {
                    bail!("poll: {status} {}", lossy(get.body()));
                }
                let mut found = false;
                for packet in packets(get.body()) {
                    found |= until(packet);
                    pinged |= packet == b"2";
                }
                if found {
                    return Ok((now_ns(), pinged));
                }
                get.send("GET", path, b"").await?;
            }
        };
        let (posted, polled) = tokio::join!(post.call("POST", path, payload), polling);
        posted?;
        let (at, pinged) = polled?;
        if pinged {
            self.post(b"3").await?;
        }
        Ok(at)
    }

    /// CONNECT to the main namespace with `auth` (a JSON object, or empty); waits for the
    /// answer, answering pings meanwhile.
    pub async fn connect(&mut self, auth: &str) -> anyhow::Result<()> {
        self.post(format!("40{auth}").as_bytes()).await?;
        loop {
            self.send_poll().await?;
            let (mut connected, mut pinged) = (false, false);
            for packet in packets(self.poll_answer().await?) {
                match packet {
                    [b'4', b'0', ..] => connected = true,
                    [b'4', b'4', ..] => bail!("CONNECT refused: {}", lossy(packet)),
                    [b'2'] => pinged = true,
                    [b'1'] => bail!("the session was closed"),
                    _ => {}
                }
            }
            if pinged {
                self.post(b"3").await?;
            }
            if connected {
                return Ok(());
            }
        }
    }
}

/// A session on the WebSocket transport.
pub struct WebSocket {
    pub stream: TcpStream,
    pub reader: FrameReader,
    out: Vec<u8>,
}

/// Upgrades polling session `sid` at `via` to a WebSocket: the opening handshake, `2probe`
/// answered `3probe`, then `5`. Whatever the server sent after `3probe` stays in the reader.
pub async fn upgrade(via: SocketAddr, sid: &str, source: IpAddr) -> anyhow::Result<WebSocket> {
    let target = Target {
        addr: via,
        path: format!("/socket.io/?EIO=4&transport=websocket&sid={sid}"),
    };
    let mut reader = FrameReader::new(4096);
    let stream = ws::connect(&target, source, &mut reader).await?;
    let mut socket = WebSocket {
        stream,
        reader,
        out: Vec::with_capacity(256),
    };
    socket.send(b"2probe").await?;
    loop {
        let mut probed = false;
        let mut refused = None;
        socket.reader.parse(|op, payload| match (op, payload) {
            (OP_TEXT, b"3probe") => probed = true,
            (OP_CLOSE, payload) => refused = Some(ws::close_code(payload)),
            _ => {}
        });
        if probed {
            break;
        }
        if let Some(code) = refused {
            bail!("the probe was closed with {code}");
        }
        if socket.reader.fill(&mut socket.stream).await? == 0 {
            bail!("the server closed the probe");
        }
    }
    socket.send(b"5").await?;
    Ok(socket)
}

impl WebSocket {
    /// Sends one packet as a text frame.
    pub async fn send(&mut self, packet: &[u8]) -> anyhow::Result<()> {
        self.out.clear();
        ws::encode_client_frame(&mut self.out, OP_TEXT, packet);
        self.stream.write_all(&self.out).await?;
        Ok(())
    }

    /// Reads once from the socket and hands every complete packet to `on_packet`; Engine.IO
    /// pings are answered. `false` once the server closed the connection.
    pub async fn read(&mut self, mut on_packet: impl FnMut(&[u8])) -> anyhow::Result<bool> {
        if self.reader.fill(&mut self.stream).await? == 0 {
            return Ok(false);
        }
        let (mut pings, mut closed) = (0, false);
        self.reader.parse(|op, payload| match (op, payload) {
            (OP_TEXT, b"2") => pings += 1,
            (OP_TEXT, packet) => on_packet(packet),
            (OP_CLOSE, _) => closed = true,
            _ => {}
        });
        for _ in 0..pings {
            self.send(b"3").await?;
        }
        Ok(!closed)
    }
}

/// The path and query of a session opened on the WebSocket transport alone, in `room` as
/// `name` (both query parameters scalechat reads at the handshake).
pub fn websocket_path(room: &str, name: &str) -> String {
    format!("/socket.io/?EIO=4&transport=websocket&room={room}&name={name}")
}

/// On a WebSocket session whose opening handshake is done ([`ws::connect`] to
/// [`websocket_path`]): waits for the open packet, sends CONNECT (`40`, no auth) and waits for
/// its answer and for the event `joined`, in either order, answering pings meanwhile. What
/// the server sent after them stays in `reader`.
pub async fn connect_websocket(
    stream: &mut TcpStream,
    reader: &mut FrameReader,
    timeout: Duration,
) -> anyhow::Result<()> {
    let wait = async {
        let (mut opened, mut sent, mut connected, mut joined) = (false, false, false, false);
        let mut out = Vec::new();
        loop {
            let mut refused = None;
            let mut closed = None;
            reader.parse(|op, payload| match (op, payload) {
                (OP_TEXT, [b'0', ..]) => opened = true,
                (OP_TEXT, [b'4', b'0', ..]) => connected = true,
                (OP_TEXT, [b'4', b'4', ..]) => refused = Some(lossy(payload)),
                (OP_TEXT, b"2") => ws::encode_client_frame(&mut out, OP_TEXT, b"3"),
                (OP_TEXT, p) if p.starts_with(b"42[\"joined\"") => joined = true,
                (OP_PING, p) => ws::encode_client_frame(&mut out, OP_PONG, p),
                (OP_CLOSE, p) => closed = Some(ws::close_code(p)),
                _ => {}
            });
            if let Some(refusal) = refused {
                bail!("CONNECT refused: {refusal}");
            }
            if let Some(code) = closed {
                bail!("closed with {code} before joined");
            }
            if opened && !sent {
                ws::encode_client_frame(&mut out, OP_TEXT, b"40");
                sent = true;
            }
            if !out.is_empty() {
                stream.write_all(&out).await?;
                out.clear();
            }
            if connected && joined {
                return Ok(());
            }
            if reader.fill(stream).await? == 0 {
                bail!("connection closed before joined");
            }
        }
    };
    tokio::time::timeout(timeout, wait)
        .await
        .context("no joined in time")?
}

/// The packets of a polling payload.
pub fn packets(payload: &[u8]) -> impl Iterator<Item = &[u8]> {
    payload
        .split(|&b| b == SEPARATOR)
        .filter(|packet| !packet.is_empty())
}

/// Appends the packet emitting `event:message` with the bench marker (see `track`).
pub fn encode_emit(out: &mut Vec<u8>, publisher: u32, seq: u64, sent_ns: u64) {
    out.extend_from_slice(b"42[\"event:message\",{\"message\":\"");
    push_marker(out, publisher, seq, sent_ns);
    out.extend_from_slice(b"\"}]");
}

/// Appends the masked WebSocket frame of the packet of [`encode_emit`] to `out`.
pub fn encode_emit_frame(out: &mut Vec<u8>, publisher: u32, seq: u64, sent_ns: u64) {
    let mut packet = Vec::with_capacity(96);
    encode_emit(&mut packet, publisher, seq, sent_ns);
    ws::encode_client_frame(out, OP_TEXT, &packet);
}

/// What a packet that is no delivery tells of trouble: the `code` of an event `error`
/// (`42["error",{"code":…}]`), `disconnect` for a DISCONNECT from the server (`41`),
/// `connect_error` for a refused CONNECT (`44`).
pub fn error_code(packet: &[u8]) -> Option<String> {
    match packet {
        [b'4', b'1', ..] => Some("disconnect".into()),
        [b'4', b'4', ..] => Some("connect_error".into()),
        p if p.starts_with(b"42[\"error\",") => {
            let at = memmem::find(p, b"\"code\":\"")? + 8;
            let len = memchr::memchr(b'"', &p[at..])?;
            Some(lossy(&p[at..at + len]))
        }
        _ => None,
    }
}

/// The bench marker in a `message` event (`42["message","{…\"message\":\"B…\"…}",offset]`);
/// `None` for any other packet.
pub fn delivery(packet: &[u8]) -> Option<Delivery> {
    if !packet.starts_with(b"42[\"message\",") {
        return None;
    }
    // The chat message is a JSON string inside the event: its quotes are escaped.
    const NEEDLE: &[u8] = br#"\"message\":\"B"#;
    static MARKER: LazyLock<Finder<'static>> = LazyLock::new(|| Finder::new(NEEDLE));
    let at = MARKER.find(packet)? + NEEDLE.len();
    crate::track::parse_marker(&packet[at..])
}

fn lossy(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_status_and_length_of_a_head() {
        let head = b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 12";
        assert_eq!(parse_head(head).unwrap(), (200, 12));
        let head = b"HTTP/1.1 400 Bad Request\r\ncontent-length:34\r\nvary: Origin";
        assert_eq!(parse_head(head).unwrap(), (400, 34));
        assert!(parse_head(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked").is_err());
    }

    #[test]
    fn finds_the_marker_in_a_message_event_and_nothing_else() {
        let mut emit = Vec::new();
        encode_emit(&mut emit, 3, 17, 1_764_288_000_000_000_123);
        assert_eq!(
            emit,
            br#"42["event:message",{"message":"B3.17.1764288000000000123"}]"#
        );
        let event = br#"42["message","{\"type\":\"message\",\"room\":\"r\",\"id\":5,\"epoch\":\"e\",\"user\":\"u\",\"ts\":1,\"message\":\"B3.17.1764288000000000123\"}","r:e:5"]"#;
        assert_eq!(
            delivery(event),
            Some(Delivery {
                publisher: 3,
                seq: 17,
                sent_ns: 1_764_288_000_000_000_123
            })
        );
        assert_eq!(delivery(br#"42["joined",{"room":"r","online":1}]"#), None);
        let plain = br#"42["message","{\"type\":\"message\",\"message\":\"hello\"}","r:e:6"]"#;
        assert_eq!(delivery(plain), None);
    }

    #[test]
    fn reads_what_went_wrong() {
        let error = br#"42["error",{"code":"rate_limited","message":"slow down"}]"#;
        assert_eq!(error_code(error).as_deref(), Some("rate_limited"));
        assert_eq!(error_code(b"41").as_deref(), Some("disconnect"));
        assert_eq!(error_code(br#"42["joined",{"room":"r"}]"#), None);
    }

    #[test]
    fn splits_a_polling_payload() {
        let payload = b"40{\"sid\":\"x\"}\x1e42[\"joined\",{}]\x1e2";
        let got: Vec<&[u8]> = packets(payload).collect();
        assert_eq!(got, [&b"40{\"sid\":\"x\"}"[..], b"42[\"joined\",{}]", b"2"]);
    }
}
