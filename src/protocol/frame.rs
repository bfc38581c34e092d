//! Client-to-server WebSocket frames (RFC 6455 section 5): the header parser and the rules a
//! sequence of frames must follow, as plain functions over bytes with no I/O.
//!
//! [`Decoder::decode`] takes the bytes received so far and answers "need more bytes", or one
//! whole frame (its payload unmasked in place), or the close code and reason that fail the
//! connection. Every rule is checked as early as the bytes allow: a header is refused before
//! its payload arrives, invalid UTF-8 in a fragmented text message as soon as the fragment that
//! holds it is complete. No extension is negotiated, so the RSV bits must be clear.

use crate::protocol::ws::close_code;

/// A frame's opcode.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Opcode {
    /// The next fragment of a text or binary message.
    Continuation,
    /// A text message (or its first fragment).
    Text,
    /// A binary message (or its first fragment).
    Binary,
    /// Close.
    Close,
    /// Ping.
    Ping,
    /// Pong.
    Pong,
}

impl Opcode {
    fn from_bits(bits: u8) -> Option<Self> {
        Some(match bits {
            0x0 => Self::Continuation,
            0x1 => Self::Text,
            0x2 => Self::Binary,
            0x8 => Self::Close,
            0x9 => Self::Ping,
            0xA => Self::Pong,
            _ => return None,
        })
    }

    /// Whether this is a control frame (close, ping, pong).
    pub fn is_control(self) -> bool {
        matches!(self, Self::Close | Self::Ping | Self::Pong)
    }
}

/// A parsed frame header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    /// Whether this is the last frame of its message.
    pub fin: bool,
    /// The opcode.
    pub opcode: Opcode,
    /// The masking key (every client frame is masked).
    pub mask: [u8; 4],
    /// Header bytes before the payload.
    pub payload_offset: usize,
    /// Payload bytes.
    pub payload_len: usize,
}

impl Header {
    /// Bytes of the whole frame, header and payload.
    pub fn frame_len(&self) -> usize {
        self.payload_offset + self.payload_len
    }
}

/// A broken rule: the close code and reason that fail the connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("{reason} (close code {code})")]
pub struct FrameError {
    /// The close code to send.
    pub code: u16,
    /// The close reason to send.
    pub reason: &'static str,
}

const fn protocol(reason: &'static str) -> FrameError {
    FrameError {
        code: close_code::PROTOCOL_ERROR,
        reason,
    }
}

const TOO_BIG: FrameError = FrameError {
    code: close_code::MESSAGE_TOO_BIG,
    reason: "message too large",
};

const NOT_UTF8: FrameError = FrameError {
    code: close_code::INVALID_DATA,
    reason: "text is not valid UTF-8",
};

/// Parses the header at the front of `buf`: `Ok(None)` when more bytes are needed. Checks the
/// rules one header shows on its own; a data payload above `max_payload` is refused with 1009.
pub fn parse_header(buf: &[u8], max_payload: usize) -> Result<Option<Header>, FrameError> {
    let Some(&first) = buf.first() else {
        return Ok(None);
    };
    if first & 0x70 != 0 {
        return Err(protocol("reserved bits set without an extension"));
    }
    let opcode = Opcode::from_bits(first & 0x0F).ok_or(protocol("unknown opcode"))?;
    let fin = first & 0x80 != 0;
    if opcode.is_control() && !fin {
        return Err(protocol("fragmented control frame"));
    }
    let Some(&second) = buf.get(1) else {
        return Ok(None);
    };
    if second & 0x80 == 0 {
        return Err(protocol("client frames must be masked"));
    }
    let (len, len_bytes) = match second & 0x7F {
        126 if opcode.is_control() => return Err(protocol("control frame over 125 bytes")),
        127 if opcode.is_control() => return Err(protocol("control frame over 125 bytes")),
        126 => match buf.get(2..4) {
            Some(b) => (u64::from(u16::from_be_bytes([b[0], b[1]])), 2),
            None => return Ok(None),
        },
        127 => match buf.get(2..10) {
            Some(b) => {
                let mut be = [0; 8];
                be.copy_from_slice(b);
                (u64::from_be_bytes(be), 8)
            }
            None => return Ok(None),
        },
        n => (u64::from(n), 0),
    };
    if len >> 63 != 0 {
        return Err(protocol("64-bit length with the top bit set"));
    }
    let payload_len = match usize::try_from(len) {
        Ok(n) if n <= max_payload => n,
        _ => return Err(TOO_BIG),
    };
    let mask_at = 2 + len_bytes;
    let Some(key) = buf.get(mask_at..mask_at + 4) else {
        return Ok(None);
    };
    Ok(Some(Header {
        fin,
        opcode,
        mask: [key[0], key[1], key[2], key[3]],
        payload_offset: mask_at + 4,
        payload_len,
    }))
}

/// Unmasks `payload` in place (RFC 6455 section 5.3), eight bytes at a time.
pub fn unmask(payload: &mut [u8], mask: [u8; 4]) {
    let wide = u64::from_ne_bytes([
        mask[0], mask[1], mask[2], mask[3], mask[0], mask[1], mask[2], mask[3],
    ]);
    let mut chunks = payload.chunks_exact_mut(8);
    for chunk in &mut chunks {
        let mut word = [0; 8];
        word.copy_from_slice(chunk);
        chunk.copy_from_slice(&(u64::from_ne_bytes(word) ^ wide).to_ne_bytes());
    }
    // The tail starts at a multiple of 8, so the key lines up from its first byte again.
    for (byte, key) in chunks.into_remainder().iter_mut().zip(mask.iter().cycle()) {
        *byte ^= key;
    }
}

/// The code of a close frame's payload: `None` when it has none. Refuses a 1-byte payload, a
/// code no endpoint may send (RFC 6455 section 7.4) with 1002, and a reason that is not UTF-8
/// with 1007, as for text.
pub fn close_code(payload: &[u8]) -> Result<Option<u16>, FrameError> {
    match payload {
        [] => Ok(None),
        [_] => Err(protocol("malformed close frame")),
        [high, low, reason @ ..] => {
            let code = u16::from_be_bytes([*high, *low]);
            let allowed = matches!(code, 1000..=1003 | 1007..=1013 | 3000..=4999);
            if !allowed {
                Err(protocol("invalid close code"))
            } else if std::str::from_utf8(reason).is_err() {
                Err(FrameError {
                    reason: "close reason is not valid UTF-8",
                    ..NOT_UTF8
                })
            } else {
                Ok(Some(code))
            }
        }
    }
}

/// Checks a text message's UTF-8 fragment by fragment: a character may span fragments, so the
/// bytes of an unfinished one are carried (at most 3).
#[derive(Debug, Default)]
struct Utf8 {
    carry: [u8; 4],
    carried: u8,
}

impl Utf8 {
    fn push(&mut self, mut bytes: &[u8], fin: bool) -> Result<(), FrameError> {
        if self.carried > 0 {
            let carried = usize::from(self.carried);
            let want = match self.carry[0] {
                0xF0.. => 4,
                0xE0.. => 3,
                _ => 2,
            };
            let take = (want - carried).min(bytes.len());
            self.carry[carried..carried + take].copy_from_slice(&bytes[..take]);
            let carried = carried + take;
            bytes = &bytes[take..];
            match std::str::from_utf8(&self.carry[..carried]) {
                Ok(_) => self.carried = 0,
                Err(e) if e.error_len().is_some() => return Err(NOT_UTF8),
                // Still a valid start of a character: `bytes` is used up.
                Err(_) if fin => return Err(NOT_UTF8),
                Err(_) => {
                    self.carried = carried as u8; // at most 3
                    return Ok(());
                }
            }
        }
        if let Err(e) = std::str::from_utf8(bytes) {
            let tail = &bytes[e.valid_up_to()..];
            if e.error_len().is_some() || fin {
                return Err(NOT_UTF8);
            }
            // An unfinished character at the end: fewer than 4 bytes by definition.
            self.carry[..tail.len()].copy_from_slice(tail);
            self.carried = tail.len() as u8;
        }
        Ok(())
    }
}

/// The data message in progress, when it came in fragments.
#[derive(Debug)]
struct Fragmented {
    /// At most `max_frame_bytes`.
    len: u32,
    /// `None` for a binary message.
    utf8: Option<Utf8>,
}

/// What [`Decoder::decode`] found at the front of the buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decoded {
    /// More bytes are needed; `frame_len` is the whole frame's length once its header is known.
    Incomplete {
        /// Bytes the whole frame takes, header included, when known.
        frame_len: Option<usize>,
    },
    /// A whole frame, its payload unmasked in place at `payload_offset..frame_len()`.
    Frame(Header),
}

/// Decodes a connection's client frames one at a time and checks the rules that span them:
/// fragments in order, a message's total size, UTF-8 of text, close payloads.
///
/// Kept small (28 bytes): every connection's reader holds one.
#[derive(Debug)]
pub struct Decoder {
    /// At most 16 MiB (`limits.max_frame_bytes`), so frame and message lengths fit a `u32`.
    max_frame_bytes: u32,
    /// The header of the frame whose payload is still arriving (already checked).
    header: Option<Pending>,
    message: Option<Fragmented>,
}

/// A checked [`Header`] kept while its payload arrives, in 12 bytes rather than 24.
#[derive(Debug, Clone, Copy)]
struct Pending {
    fin: bool,
    opcode: Opcode,
    mask: [u8; 4],
    /// At most 14.
    payload_offset: u8,
    /// At most `max_frame_bytes`.
    payload_len: u32,
}

impl Pending {
    fn header(self) -> Header {
        Header {
            fin: self.fin,
            opcode: self.opcode,
            mask: self.mask,
            payload_offset: usize::from(self.payload_offset),
            payload_len: self.payload_len as usize,
        }
    }
}

impl Decoder {
    /// A decoder refusing a frame, or a fragmented message in total, above `max_frame_bytes`
    /// (`limits.max_frame_bytes`) with 1009.
    pub fn new(max_frame_bytes: usize) -> Self {
        Self {
            max_frame_bytes: u32::try_from(max_frame_bytes).unwrap_or(u32::MAX),
            header: None,
            message: None,
        }
    }

    /// Decodes the frame at the front of `buf`, the bytes received and not yet consumed. After
    /// [`Decoded::Frame`] the caller drops that frame's bytes before the next call; after
    /// [`Decoded::Incomplete`] it calls again with the same bytes and more.
    pub fn decode(&mut self, buf: &mut [u8]) -> Result<Decoded, FrameError> {
        let header = match self.header {
            Some(pending) => pending.header(),
            None => match parse_header(buf, self.max_frame_bytes as usize)? {
                Some(header) => {
                    self.check_sequence(&header)?;
                    // Header bytes are at most 14, and the payload at most `max_frame_bytes`.
                    self.header = Some(Pending {
                        fin: header.fin,
                        opcode: header.opcode,
                        mask: header.mask,
                        payload_offset: header.payload_offset as u8,
                        payload_len: header.payload_len as u32,
                    });
                    header
                }
                None => return Ok(Decoded::Incomplete { frame_len: None }),
            },
        };
        let Some(payload) = buf.get_mut(header.payload_offset..header.frame_len()) else {
            let frame_len = Some(header.frame_len());
            return Ok(Decoded::Incomplete { frame_len });
        };
        self.header = None;
        unmask(payload, header.mask);
        self.check_payload(&header, payload)?;
        Ok(Decoded::Frame(header))
    }

    /// The rules a header breaks given the frames before it.
    fn check_sequence(&mut self, header: &Header) -> Result<(), FrameError> {
        let text = header.opcode == Opcode::Text;
        match (header.opcode, self.message.as_mut()) {
            (Opcode::Text | Opcode::Binary, Some(_)) => {
                Err(protocol("new message before the fragmented one ended"))
            }
            (Opcode::Continuation, None) => Err(protocol("continuation frame without a message")),
            (Opcode::Continuation, Some(message)) => {
                message.len = message.len.saturating_add(header.payload_len as u32);
                if message.len > self.max_frame_bytes {
                    return Err(TOO_BIG);
                }
                Ok(())
            }
            (Opcode::Text | Opcode::Binary, None) if !header.fin => {
                self.message = Some(Fragmented {
                    len: header.payload_len as u32,
                    utf8: text.then(Utf8::default),
                });
                Ok(())
            }
            _ => Ok(()),
        }
    }

    /// The rules a whole frame's unmasked payload breaks.
    fn check_payload(&mut self, header: &Header, payload: &[u8]) -> Result<(), FrameError> {
        match header.opcode {
            Opcode::Close => close_code(payload).map(drop),
            Opcode::Text if header.fin => Utf8::default().push(payload, true),
            Opcode::Text | Opcode::Continuation => {
                let result = match self.message.as_mut().and_then(|m| m.utf8.as_mut()) {
                    Some(utf8) => utf8.push(payload, header.fin),
                    None => Ok(()),
                };
                if header.fin {
                    self.message = None;
                }
                result
            }
            Opcode::Binary | Opcode::Ping | Opcode::Pong => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests;
