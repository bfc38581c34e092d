//! Server-to-client WebSocket frames, built whole: header and payload in one `Bytes`.
//!
//! Server frames are never masked, so one encoded frame is valid for every recipient and is
//! shared by reference count. Client frames are decoded by [`frame`](super::frame).

use bytes::{BufMut, Bytes, BytesMut};

/// Close codes scalechat sends (RFC 6455 section 7.4, and 4000-4999 for its own).
pub mod close_code {
    /// The peer asked to close, or the session ended normally.
    pub const NORMAL: u16 = 1000;
    /// The server is shutting down.
    pub const GOING_AWAY: u16 = 1001;
    /// The peer broke the WebSocket protocol.
    pub const PROTOCOL_ERROR: u16 = 1002;
    /// The peer sent a binary message; chat speaks JSON text.
    pub const UNSUPPORTED_DATA: u16 = 1003;
    /// A text message was not valid UTF-8.
    pub const INVALID_DATA: u16 = 1007;
    /// The peer broke a rule of the server's (a Socket.IO session that did not connect in
    /// time).
    pub const POLICY_VIOLATION: u16 = 1008;
    /// A frame, or a fragmented message in total, exceeded `max_frame_bytes`.
    pub const MESSAGE_TOO_BIG: u16 = 1009;
    /// The peer read too slowly: its queue passed `max_queued_frames`.
    pub const SLOW_CONSUMER: u16 = 4001;
    /// The peer did not answer a ping within `ping_timeout_secs`. (A socket that accepts no
    /// bytes for that long is dropped without a close frame: none could reach the peer.)
    pub const PING_TIMEOUT: u16 = 4002;
    /// The application disconnected the user (the server API's `disconnect`).
    pub const DISCONNECTED: u16 = 4003;
}

const OP_TEXT: u8 = 0x1;
const OP_BINARY: u8 = 0x2;
const OP_CLOSE: u8 = 0x8;
const OP_PING: u8 = 0x9;
const OP_PONG: u8 = 0xA;

/// Bytes of header a frame with `len` payload bytes needs.
fn header_len(len: usize) -> usize {
    match len {
        0..=125 => 2,
        126..=0xFFFF => 4,
        _ => 10,
    }
}

fn put_header(buf: &mut BytesMut, opcode: u8, len: usize) {
    buf.put_u8(0x80 | opcode); // FIN, no RSV bits
    match len {
        0..=125 => buf.put_u8(len as u8),
        126..=0xFFFF => {
            buf.put_u8(126);
            buf.put_u16(len as u16);
        }
        _ => {
            buf.put_u8(127);
            buf.put_u64(len as u64);
        }
    }
}

/// One final frame of `opcode` whose payload is `parts` joined: a single allocation.
fn frame(opcode: u8, parts: &[&[u8]]) -> Bytes {
    let len: usize = parts.iter().map(|p| p.len()).sum();
    let mut buf = BytesMut::with_capacity(header_len(len) + len);
    put_header(&mut buf, opcode, len);
    for part in parts {
        buf.put_slice(part);
    }
    buf.freeze()
}

/// A text frame carrying `payload`, which must be UTF-8.
pub fn text(payload: &[u8]) -> Bytes {
    frame(OP_TEXT, &[payload])
}

/// A binary frame carrying `payload` (only the echo endpoint sends these).
pub fn binary(payload: &[u8]) -> Bytes {
    frame(OP_BINARY, &[payload])
}

/// A text frame whose payload is `parts` joined (all UTF-8), built with one allocation.
pub(crate) fn text_parts(parts: &[&[u8]]) -> Bytes {
    frame(OP_TEXT, parts)
}

/// A text frame of `len` payload bytes, all written by `write` (which must write exactly
/// `len` UTF-8 bytes) straight into the frame: one allocation, no intermediate buffer.
pub(crate) fn text_with(len: usize, write: impl FnOnce(&mut BytesMut)) -> Bytes {
    let mut buf = BytesMut::with_capacity(header_len(len) + len);
    put_header(&mut buf, OP_TEXT, len);
    let start = buf.len();
    write(&mut buf);
    debug_assert_eq!(
        buf.len() - start,
        len,
        "the payload length the header announced"
    );
    buf.freeze()
}

/// The payload of a frame built here (its bytes after the header), sharing its memory.
pub(crate) fn text_payload(frame: &Bytes) -> Bytes {
    let header = match frame.get(1).map(|b| b & 0x7F) {
        Some(126) => 4,
        Some(127) => 10,
        Some(_) => 2,
        None => return Bytes::new(),
    };
    frame.slice(header.min(frame.len())..)
}

/// A close frame with `code` and a reason (cut to the 123 bytes a control frame allows).
pub fn close(code: u16, reason: &str) -> Bytes {
    let mut end = reason.len().min(123);
    while !reason.is_char_boundary(end) {
        end -= 1;
    }
    frame(OP_CLOSE, &[&code.to_be_bytes(), &reason.as_bytes()[..end]])
}

/// A ping frame.
pub fn ping(payload: &[u8]) -> Bytes {
    frame(OP_PING, &[payload])
}

/// A pong frame answering a ping with `payload`.
pub fn pong(payload: &[u8]) -> Bytes {
    frame(OP_PONG, &[payload])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn headers_use_the_shortest_length_form() {
        assert_eq!(&text(b"hi")[..], b"\x81\x02hi");
        let medium = text(&[b'a'; 300]);
        assert_eq!(&medium[..4], &[0x81, 126, 0x01, 0x2C]);
        assert_eq!(medium.len(), 304);
        let large = text(&vec![b'a'; 70_000]);
        assert_eq!(&large[..10], &[0x81, 127, 0, 0, 0, 0, 0, 1, 0x11, 0x70]);
    }

    #[test]
    fn close_reason_is_cut_on_a_char_boundary() {
        let frame = close(1001, &"é".repeat(100));
        assert_eq!(frame[0], 0x88);
        let len = frame[1] as usize;
        assert!(len <= 125);
        assert_eq!(&frame[2..4], &1001u16.to_be_bytes());
        assert!(std::str::from_utf8(&frame[4..]).is_ok());
    }

    #[test]
    fn payload_is_the_frame_without_its_header() {
        for len in [0, 5, 125, 126, 300, 70_000] {
            let payload = vec![b'a'; len];
            assert_eq!(&text_payload(&text(&payload))[..], &payload[..], "{len}");
        }
    }

    #[test]
    fn parts_are_joined() {
        assert_eq!(
            &text_parts(&[b"{\"id\":", b"17", b"}"])[..],
            b"\x81\x09{\"id\":17}"
        );
    }
}
