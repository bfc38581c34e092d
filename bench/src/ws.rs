//! A minimal WebSocket client for the native protocol, cheap per delivery: the opening handshake
//! written by hand, server frames (unmasked) parsed in place from one reusable buffer, client
//! frames masked as RFC 6455 requires. Also the source-address spreading every scenario uses.

use std::io;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::os::fd::{AsRawFd, RawFd};
use std::time::Duration;

use anyhow::{Context, bail};
use tokio::io::{AsyncReadExt, AsyncWriteExt, Interest};
use tokio::net::{TcpSocket, TcpStream};

/// Frame opcodes the client cares about.
pub const OP_TEXT: u8 = 0x1;
pub const OP_CLOSE: u8 = 0x8;
pub const OP_PING: u8 = 0x9;
pub const OP_PONG: u8 = 0xA;

/// Where to connect: a scalechat node (or the raw relay, which speaks the same handshake).
#[derive(Clone, Debug)]
pub struct Target {
    pub addr: SocketAddr,
    /// Path and query, e.g. `/ws?room=bench&name=m1`.
    pub path: String,
}

/// Source address number `i` of `sources`: 127.0.0.2, 127.0.0.3, … (loopback answers on all of
/// 127/8), so that many connections do not run out of ephemeral ports on one address pair.
pub fn source_addr(i: usize, sources: usize) -> IpAddr {
    let k = 2 + (i % sources.max(1)) as u32;
    IpAddr::V4(Ipv4Addr::from(0x7f00_0000 | k))
}

/// Opens a TCP connection from `source` (port chosen at connect time, so TIME_WAIT entries of
/// other destinations do not exhaust the range).
pub async fn tcp_connect(addr: SocketAddr, source: IpAddr) -> anyhow::Result<TcpStream> {
    let socket = TcpSocket::new_v4()?;
    set_bind_address_no_port(&socket);
    socket.bind(SocketAddr::new(source, 0))?;
    let stream = socket.connect(addr).await?;
    stream.set_nodelay(true)?;
    Ok(stream)
}

fn set_bind_address_no_port(socket: &TcpSocket) {
    let one: libc::c_int = 1;
    // SAFETY: a valid socket fd and a c_int option value of the right size.
    unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::IPPROTO_IP,
            libc::IP_BIND_ADDRESS_NO_PORT,
            (&one as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        );
    }
}

/// Connects and performs the opening handshake. Bytes the server sent after its 101 response
/// are left in `reader`.
pub async fn connect(
    target: &Target,
    source: IpAddr,
    reader: &mut FrameReader,
) -> anyhow::Result<TcpStream> {
    let mut stream = tcp_connect(target.addr, source).await?;
    let request = format!(
        "GET {} HTTP/1.1\r\nHost: {}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
        target.path, target.addr
    );
    stream.write_all(request.as_bytes()).await?;
    reader.clear();
    loop {
        if reader.fill(&mut stream).await? == 0 {
            bail!("connection closed during the handshake");
        }
        let data = reader.pending();
        if let Some(end) = memchr::memmem::find(data, b"\r\n\r\n") {
            if !data.starts_with(b"HTTP/1.1 101") {
                let line = data.split(|&b| b == b'\r').next().unwrap_or_default();
                bail!("handshake refused: {}", String::from_utf8_lossy(line));
            }
            reader.consume(end + 4);
            return Ok(stream);
        }
        if data.len() > 8192 {
            bail!("handshake response too long");
        }
    }
}

/// Reads frames until a text frame whose payload starts with `{"type":"joined"`; `welcome` and
/// anything else before it are skipped.
pub async fn wait_joined(
    stream: &mut TcpStream,
    reader: &mut FrameReader,
    timeout: Duration,
) -> anyhow::Result<()> {
    let wait = async {
        loop {
            let mut joined = false;
            let mut closed = None;
            reader.parse(|op, payload| match op {
                OP_TEXT if payload.starts_with(b"{\"type\":\"joined\"") => joined = true,
                OP_CLOSE => closed = Some(close_code(payload)),
                _ => {}
            });
            if joined {
                return Ok(());
            }
            if let Some(code) = closed {
                bail!("closed with {code} before joined");
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

/// The status code of a close frame's payload (1005 when it has none).
pub fn close_code(payload: &[u8]) -> u16 {
    if payload.len() >= 2 {
        u16::from_be_bytes([payload[0], payload[1]])
    } else {
        1005
    }
}

/// Appends one masked client frame with opcode `op` and `payload` to `out`.
pub fn encode_client_frame(out: &mut Vec<u8>, op: u8, payload: &[u8]) {
    const MASK: [u8; 4] = [0x5a, 0xc3, 0x96, 0x3c];
    out.push(0x80 | op);
    let len = payload.len();
    if len < 126 {
        out.push(0x80 | len as u8);
    } else if len <= u16::MAX as usize {
        out.push(0x80 | 126);
        out.extend_from_slice(&(len as u16).to_be_bytes());
    } else {
        out.push(0x80 | 127);
        out.extend_from_slice(&(len as u64).to_be_bytes());
    }
    out.extend_from_slice(&MASK);
    out.extend(payload.iter().enumerate().map(|(i, b)| b ^ MASK[i & 3]));
}

/// Appends one unmasked server frame (what scalechat sends) to `out`.
pub fn encode_server_frame(out: &mut Vec<u8>, op: u8, payload: &[u8]) {
    out.push(0x80 | op);
    let len = payload.len();
    if len < 126 {
        out.push(len as u8);
    } else if len <= u16::MAX as usize {
        out.push(126);
        out.extend_from_slice(&(len as u16).to_be_bytes());
    } else {
        out.push(127);
        out.extend_from_slice(&(len as u64).to_be_bytes());
    }
    out.extend_from_slice(payload);
}

/// Received bytes not yet parsed, in one buffer reused for the connection's life.
pub struct FrameReader {
    buf: Vec<u8>,
    start: usize,
    end: usize,
}

impl FrameReader {
    /// A reader whose buffer starts at `capacity` bytes (it grows for a larger frame).
    pub fn new(capacity: usize) -> Self {
        Self {
            buf: vec![0; capacity.max(64)],
            start: 0,
            end: 0,
        }
    }

    fn clear(&mut self) {
        self.start = 0;
        self.end = 0;
    }

    pub fn pending(&self) -> &[u8] {
        &self.buf[self.start..self.end]
    }

    pub fn consume(&mut self, n: usize) {
        self.start += n;
        if self.start == self.end {
            self.clear();
        }
    }

    /// Reads once from `stream` into the free end of the buffer; 0 means end of stream.
    /// Cancel-safe: it is one `read`.
    pub async fn fill(
        &mut self,
        stream: &mut (impl AsyncReadExt + Unpin),
    ) -> anyhow::Result<usize> {
        self.make_room();
        let n = stream.read(&mut self.buf[self.end..]).await?;
        self.end += n;
        Ok(n)
    }

    /// Makes free space at the end of the buffer: moves the unparsed bytes to the front, or
    /// doubles the buffer when they fill it.
    fn make_room(&mut self) {
        if self.end == self.buf.len() {
            if self.start > 0 {
                self.buf.copy_within(self.start..self.end, 0);
                self.end -= self.start;
                self.start = 0;
            } else {
                let len = self.buf.len() * 2;
                self.buf.resize(len, 0);
            }
        }
    }

    /// Like [`FrameReader::fill`], also returning when the kernel received the data read
    /// (CLOCK_REALTIME nanoseconds), once [`stamp_arrivals`] was called on the socket.
    /// Cancel-safe: it waits for readiness, then reads without waiting.
    pub async fn fill_stamped(&mut self, stream: &TcpStream) -> io::Result<(usize, Option<u64>)> {
        self.make_room();
        loop {
            stream.readable().await?;
            let free = &mut self.buf[self.end..];
            match stream.try_io(Interest::READABLE, || {
                recv_stamped(stream.as_raw_fd(), free)
            }) {
                Ok((n, stamp)) => {
                    self.end += n;
                    return Ok((n, stamp));
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return Err(e),
            }
        }
    }

    /// Calls `on_frame(opcode, payload)` for every complete frame received so far, then keeps
    /// the incomplete tail for the next read. Masked payloads (client frames, which the relay
    /// reads) are unmasked in place.
    pub fn parse(&mut self, mut on_frame: impl FnMut(u8, &[u8])) {
        loop {
            let data = &self.buf[self.start..self.end];
            let Some((header, len)) = frame_header(data) else {
                break;
            };
            if data.len() < header + len {
                break;
            }
            let op = data[0] & 0x0f;
            let at = self.start;
            if self.buf[at + 1] & 0x80 != 0 {
                let mut key = [0u8; 4];
                key.copy_from_slice(&self.buf[at + header - 4..at + header]);
                let payload = &mut self.buf[at + header..at + header + len];
                payload
                    .iter_mut()
                    .enumerate()
                    .for_each(|(i, b)| *b ^= key[i & 3]);
            }
            on_frame(op, &self.buf[at + header..at + header + len]);
            self.consume(header + len);
        }
    }
}

/// `SO_TIMESTAMPNS` (and `SCM_TIMESTAMPNS`) on Linux with a 64-bit `time_t`.
const SO_TIMESTAMPNS: libc::c_int = 35;

/// Asks the kernel to stamp the data this socket receives with its arrival time, so latency
/// can be measured to the moment a delivery reached the client's socket, not to the moment the
/// generator got round to reading it.
pub fn stamp_arrivals(stream: &TcpStream) {
    let one: libc::c_int = 1;
    // SAFETY: a valid socket fd and a c_int option value of the right size.
    unsafe {
        libc::setsockopt(
            stream.as_raw_fd(),
            libc::SOL_SOCKET,
            SO_TIMESTAMPNS,
            (&one as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        );
    }
}

/// One non-blocking recvmsg into `buf`: the bytes read and the arrival stamp, if any.
fn recv_stamped(fd: RawFd, buf: &mut [u8]) -> io::Result<(usize, Option<u64>)> {
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    let mut control = [0u64; 16];
    // SAFETY: msghdr is plain data; every pointer set below outlives the call, and the cmsg
    // walk stays inside `control` as the CMSG_* helpers guarantee.
    unsafe {
        let mut msg: libc::msghdr = std::mem::zeroed();
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = control.as_mut_ptr().cast();
        msg.msg_controllen = std::mem::size_of_val(&control);
        let n = libc::recvmsg(fd, &mut msg, libc::MSG_DONTWAIT);
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        let mut stamp = None;
        let mut c = libc::CMSG_FIRSTHDR(&msg);
        while !c.is_null() {
            if (*c).cmsg_level == libc::SOL_SOCKET && (*c).cmsg_type == SO_TIMESTAMPNS {
                let ts: libc::timespec = std::ptr::read_unaligned(libc::CMSG_DATA(c).cast());
                stamp = Some(ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64);
            }
            c = libc::CMSG_NXTHDR(&msg, c);
        }
        Ok((n as usize, stamp))
    }
}

/// The header length and payload length of the frame at the start of `data`, once both are in.
fn frame_header(data: &[u8]) -> Option<(usize, usize)> {
    if data.len() < 2 {
        return None;
    }
    let mask = if data[1] & 0x80 != 0 { 4 } else { 0 };
    let (header, len) = match data[1] & 0x7f {
        126 if data.len() >= 4 => (4, u16::from_be_bytes([data[2], data[3]]) as usize),
        127 if data.len() >= 10 => {
            let mut b = [0u8; 8];
            b.copy_from_slice(&data[2..10]);
            (10, u64::from_be_bytes(b) as usize)
        }
        126 | 127 => return None,
        n => (2, n as usize),
    };
    Some((header + mask, len))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_frames_split_anywhere() {
        let mut wire = Vec::new();
        encode_server_frame(&mut wire, OP_TEXT, b"hello");
        encode_server_frame(&mut wire, OP_TEXT, &[b'x'; 300]);
        encode_server_frame(&mut wire, OP_CLOSE, &4001u16.to_be_bytes());
        for split in 0..wire.len() {
            let mut r = FrameReader::new(1024);
            let mut got = Vec::new();
            for part in [&wire[..split], &wire[split..]] {
                r.buf[r.end..r.end + part.len()].copy_from_slice(part);
                r.end += part.len();
                r.parse(|op, p| got.push((op, p.len())));
            }
            assert_eq!(got, [(OP_TEXT, 5), (OP_TEXT, 300), (OP_CLOSE, 2)]);
        }
    }

    #[test]
    fn client_frames_are_masked_and_read_back() {
        let mut out = Vec::new();
        encode_client_frame(&mut out, OP_TEXT, b"hi");
        assert_eq!(out[0], 0x81);
        assert_eq!(out[1], 0x82);
        assert_eq!(out[6] ^ out[2], b'h');
        let mut r = FrameReader::new(64);
        r.buf[..out.len()].copy_from_slice(&out);
        r.end = out.len();
        let mut got = Vec::new();
        r.parse(|_, p| got.extend_from_slice(p));
        assert_eq!(got, b"hi");
    }
}
