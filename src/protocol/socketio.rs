//! Pure codecs of Engine.IO v4 and Socket.IO v5: Engine.IO packets (a type digit and a text),
//! the HTTP long-polling payload (packets joined by `\x1e`), and Socket.IO packets (a type
//! digit, an optional `/namespace,`, an optional ack id, then JSON).
//!
//! Every decoder takes what a client sent and returns a value or a [`CodecError`]; none
//! panics, whatever the input.

use bytes::Bytes;
use serde_json::Value;

use super::ws;

/// Why a client's packet was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CodecError {
    /// An empty packet.
    #[error("empty packet")]
    Empty,
    /// The type digit is not one of the protocol's.
    #[error("unknown packet type")]
    UnknownType,
    /// A binary packet (`b…` in a polling payload, Socket.IO types 5 and 6): not supported.
    #[error("binary packets are not supported")]
    Binary,
    /// The ack id does not fit a 64-bit number.
    #[error("bad ack id")]
    BadAckId,
    /// The data after the header is not JSON.
    #[error("packet data is not valid JSON")]
    BadJson,
    /// The data does not have the shape its packet type needs.
    #[error("packet data has the wrong shape")]
    BadData,
}

/// The record separator between packets of a long-polling payload.
pub(crate) const SEPARATOR: u8 = 0x1e;

/// An Engine.IO packet as a client sends it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EnginePacket<'a> {
    /// `1`: the client closes the session.
    Close,
    /// `2` and its data (`2probe` during an upgrade).
    Ping(&'a str),
    /// `3` and its data: the answer to the server's ping.
    Pong(&'a str),
    /// `4`: a Socket.IO packet.
    Message(&'a str),
    /// `5`: the client switches to the WebSocket it probed.
    Upgrade,
    /// `6`: nothing.
    Noop,
}

/// Decodes one Engine.IO text packet.
pub fn decode_engine(packet: &str) -> Result<EnginePacket<'_>, CodecError> {
    let mut chars = packet.char_indices();
    let (_, kind) = chars.next().ok_or(CodecError::Empty)?;
    let data = &packet[kind.len_utf8()..];
    match kind {
        '1' => Ok(EnginePacket::Close),
        '2' => Ok(EnginePacket::Ping(data)),
        '3' => Ok(EnginePacket::Pong(data)),
        '4' => Ok(EnginePacket::Message(data)),
        '5' => Ok(EnginePacket::Upgrade),
        '6' => Ok(EnginePacket::Noop),
        'b' => Err(CodecError::Binary),
        _ => Err(CodecError::UnknownType),
    }
}

/// Splits a long-polling request body into its packets; fails on an empty packet.
pub fn split_payload(body: &str) -> Result<Vec<&str>, CodecError> {
    let packets: Vec<&str> = body.split(SEPARATOR as char).collect();
    if packets.iter().any(|p| p.is_empty()) {
        return Err(CodecError::Empty);
    }
    Ok(packets)
}

/// Joins the payloads of WebSocket text frames built by [`crate::protocol::ws`] (each an
/// Engine.IO packet) into one long-polling response body. A single frame's payload is
/// returned as a slice of the frame, without a copy.
pub(crate) fn join_frames<'a>(
    mut frames: impl ExactSizeIterator<Item = &'a Bytes> + Clone,
) -> Bytes {
    if frames.len() == 1 {
        return frames.next().map(ws::text_payload).unwrap_or_default();
    }
    let len: usize = frames.clone().map(|f| f.len() + 1).sum();
    let mut body = Vec::with_capacity(len);
    for (i, frame) in frames.enumerate() {
        if i > 0 {
            body.push(SEPARATOR);
        }
        body.extend_from_slice(&ws::text_payload(frame));
    }
    Bytes::from(body)
}

/// The type of a Socket.IO packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PacketType {
    /// `0`: connect to a namespace (client), or connected (server).
    Connect,
    /// `1`: leave the namespace.
    Disconnect,
    /// `2`: an event: a JSON array, the event name first.
    Event,
    /// `3`: the answer to an event that asked for one.
    Ack,
    /// `4`: the server refused the connect.
    ConnectError,
}

/// A decoded Socket.IO packet.
#[derive(Debug, Clone, PartialEq)]
pub struct Packet<'a> {
    /// The type.
    pub kind: PacketType,
    /// The namespace, `/` when the packet names none.
    pub nsp: &'a str,
    /// The ack id, when the sender wants an answer.
    pub(crate) ack: Option<u64>,
    /// The JSON data, if any.
    pub data: Option<Value>,
}

/// Decodes one Socket.IO packet (the text of an Engine.IO message packet).
pub fn decode_packet(text: &str) -> Result<Packet<'_>, CodecError> {
    let kind = match text.as_bytes().first() {
        None => return Err(CodecError::Empty),
        Some(b'0') => PacketType::Connect,
        Some(b'1') => PacketType::Disconnect,
        Some(b'2') => PacketType::Event,
        Some(b'3') => PacketType::Ack,
        Some(b'4') => PacketType::ConnectError,
        Some(b'5' | b'6') => return Err(CodecError::Binary),
        Some(_) => return Err(CodecError::UnknownType),
    };
    let mut rest = &text[1..];
    let mut nsp = "/";
    if rest.starts_with('/') {
        let end = rest.find(',').unwrap_or(rest.len());
        nsp = &rest[..end];
        rest = rest.get(end + 1..).unwrap_or("");
    }
    let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
    let ack = if digits > 0 {
        Some(rest[..digits].parse().map_err(|_| CodecError::BadAckId)?)
    } else {
        None
    };
    rest = &rest[digits..];
    let data = if rest.is_empty() {
        None
    } else {
        Some(serde_json::from_str::<Value>(rest).map_err(|_| CodecError::BadJson)?)
    };
    check_shape(kind, &data)?;
    Ok(Packet {
        kind,
        nsp,
        ack,
        data,
    })
}

fn check_shape(kind: PacketType, data: &Option<Value>) -> Result<(), CodecError> {
    let ok = match (kind, data) {
        (PacketType::Connect, None | Some(Value::Object(_))) => true,
        (PacketType::Disconnect, None) => true,
        (PacketType::Event, Some(Value::Array(args))) => {
            matches!(args.first(), Some(Value::String(_)))
        }
        (PacketType::Ack, Some(Value::Array(_))) => true,
        (PacketType::ConnectError, Some(_)) => true,
        _ => false,
    };
    if ok { Ok(()) } else { Err(CodecError::BadData) }
}

/// An Engine.IO packet of `kind` (a digit) with `data`, as a WebSocket text frame: the form
/// every packet for a session is queued in, whatever its transport.
pub(crate) fn engine_frame(kind: u8, data: &[u8]) -> Bytes {
    ws::text_parts(&[&[kind], data])
}

/// A Socket.IO packet for the main namespace inside an Engine.IO message, as a WebSocket
/// text frame: `4` + type digit + optional ack id + JSON.
fn socketio_frame(kind: u8, nsp: &str, ack: Option<u64>, json: &[u8]) -> Bytes {
    let mut digits = itoa::Buffer::new();
    let ack = ack.map_or(&b""[..], |id| digits.format(id).as_bytes());
    let (nsp, comma): (&[u8], &[u8]) = if nsp == "/" {
        (b"", b"")
    } else {
        (nsp.as_bytes(), b",")
    };
    ws::text_parts(&[b"4", &[kind], nsp, comma, ack, json])
}

/// `40{"sid":…}`: the client is connected to the main namespace.
pub(crate) fn connected(sid: &str) -> Bytes {
    let json = serde_json::json!({ "sid": sid }).to_string();
    socketio_frame(b'0', "/", None, json.as_bytes())
}

/// `40{"sid":…,"pid":…}`: connected, with the private id the client recovers the session
/// with; the `pid` it had before when the session was recovered.
pub(crate) fn connected_with_pid(sid: &str, pid: &str) -> Bytes {
    let json = serde_json::json!({ "sid": sid, "pid": pid }).to_string();
    socketio_frame(b'0', "/", None, json.as_bytes())
}

/// `44[/nsp,]{"message":…}`: a refused connect.
pub(crate) fn connect_error(nsp: &str, message: &str) -> Bytes {
    let json = serde_json::json!({ "message": message }).to_string();
    socketio_frame(b'4', nsp, None, json.as_bytes())
}

/// `42["name",data]`: an event from the server.
pub(crate) fn event(name: &str, data: &Value) -> Bytes {
    let json = Value::Array(vec![Value::String(name.to_owned()), data.clone()]).to_string();
    socketio_frame(b'2', "/", None, json.as_bytes())
}

/// `43<id>[data]`: the answer to the client's event `id`.
pub(crate) fn ack(id: u64, data: &Value) -> Bytes {
    let json = Value::Array(vec![data.clone()]).to_string();
    socketio_frame(b'3', "/", Some(id), json.as_bytes())
}

/// `43<id>[json]`: the answer to the client's event `id`, from JSON already encoded (one
/// value).
pub(crate) fn ack_json(id: u64, json: &[u8]) -> Bytes {
    let mut digits = itoa::Buffer::new();
    let id = digits.format(id).as_bytes();
    ws::text_parts(&[b"43", id, b"[", json, b"]"])
}

/// The Socket.IO form of a chat message, built from a native `message` frame (a WebSocket
/// text frame), as one WebSocket text frame:
/// `42["message","<the native JSON as a string>","<room>:<epoch>:<id>"]`. The last argument is
/// the message's offset, which socket.io-client keeps for connection-state recovery (and
/// which handlers that take one argument never see).
pub(crate) fn message_frame(native_frame: &Bytes, offset: Offset<'_>) -> Bytes {
    const HEAD: &[u8] = b"42[\"message\",\"";
    const MIDDLE: &[u8] = b"\",\"";
    const TAIL: &[u8] = b"\"]";
    let json = ws::text_payload(native_frame);
    let mut escaped = 0;
    escape_json(&json, |part| escaped += part.len());
    let mut digits = itoa::Buffer::new();
    let id = digits.format(offset.id).as_bytes();
    // Room names and epochs hold no character JSON escapes.
    let offset_len = offset.room.len() + 1 + offset.epoch.len() + 1 + id.len();
    // Measured first, so the frame is built in one allocation.
    ws::text_with(
        HEAD.len() + escaped + MIDDLE.len() + offset_len + TAIL.len(),
        |buf| {
            buf.extend_from_slice(HEAD);
            escape_json(&json, |part| buf.extend_from_slice(part));
            buf.extend_from_slice(MIDDLE);
            buf.extend_from_slice(offset.room.as_bytes());
            buf.extend_from_slice(b":");
            buf.extend_from_slice(offset.epoch.as_bytes());
            buf.extend_from_slice(b":");
            buf.extend_from_slice(id);
            buf.extend_from_slice(TAIL);
        },
    )
}

/// Where a message stands: its room, the room's epoch and its id. A Socket.IO client sends
/// the last one it got back when it recovers its connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Offset<'a> {
    /// The room.
    pub room: &'a str,
    /// The room history's epoch.
    pub epoch: &'a str,
    /// The message's id.
    pub id: u64,
}

impl<'a> Offset<'a> {
    /// Reads an offset as [`message_frame`] writes it.
    pub fn parse(text: &'a str) -> Option<Self> {
        let mut parts = text.splitn(3, ':');
        let (room, epoch, id) = (parts.next()?, parts.next()?, parts.next()?);
        Some(Self {
            room,
            epoch,
            id: id.parse().ok()?,
        })
    }
}

/// Hands `out` the contents of a JSON string holding `text`, in pieces: `"` and `\` escaped,
/// control characters as `\u00XX`. (The native JSON has none unescaped; the rule is total.)
fn escape_json(text: &[u8], mut out: impl FnMut(&[u8])) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut start = 0;
    for (i, &b) in text.iter().enumerate() {
        let control;
        let escape: &[u8] = match b {
            b'"' => b"\\\"",
            b'\\' => b"\\\\",
            0x00..=0x1f => {
                control = [
                    b'\\',
                    b'u',
                    b'0',
                    b'0',
                    HEX[(b >> 4) as usize],
                    HEX[(b & 15) as usize],
                ];
                &control
            }
            _ => continue,
        };
        out(&text[start..i]);
        out(escape);
        start = i + 1;
    }
    out(&text[start..]);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn engine_packets() {
        assert_eq!(decode_engine("2probe"), Ok(EnginePacket::Ping("probe")));
        assert_eq!(decode_engine("3"), Ok(EnginePacket::Pong("")));
        assert_eq!(decode_engine("40"), Ok(EnginePacket::Message("0")));
        assert_eq!(decode_engine("5"), Ok(EnginePacket::Upgrade));
        assert_eq!(decode_engine("6"), Ok(EnginePacket::Noop));
        assert_eq!(decode_engine("1"), Ok(EnginePacket::Close));
        assert_eq!(decode_engine(""), Err(CodecError::Empty));
        assert_eq!(decode_engine("bAAA="), Err(CodecError::Binary));
        assert_eq!(decode_engine("9"), Err(CodecError::UnknownType));
        assert_eq!(decode_engine("é"), Err(CodecError::UnknownType));
    }

    #[test]
    fn payloads_split_on_the_separator() {
        assert_eq!(split_payload("40\x1e3"), Ok(vec!["40", "3"]));
        assert_eq!(split_payload("6"), Ok(vec!["6"]));
        assert_eq!(split_payload(""), Err(CodecError::Empty));
        assert_eq!(split_payload("40\x1e"), Err(CodecError::Empty));
        let frames = [engine_frame(b'2', b""), engine_frame(b'4', b"2[\"a\"]")];
        assert_eq!(&join_frames(frames.iter())[..], b"2\x1e42[\"a\"]");
    }

    #[test]
    fn socketio_packets() {
        let p = decode_packet("0").unwrap();
        assert_eq!(
            (p.kind, p.nsp, p.ack, p.data),
            (PacketType::Connect, "/", None, None)
        );
        let p = decode_packet(r#"0{"name":"ann"}"#).unwrap();
        assert_eq!(p.data.unwrap()["name"], "ann");
        let p = decode_packet("0/admin,").unwrap();
        assert_eq!(p.nsp, "/admin");
        let p = decode_packet("0/admin").unwrap();
        assert_eq!(p.nsp, "/admin");
        let p = decode_packet(r#"2/x,12["event:message",{"message":"hi"}]"#).unwrap();
        assert_eq!((p.kind, p.nsp, p.ack), (PacketType::Event, "/x", Some(12)));
        assert_eq!(p.data.unwrap()[0], "event:message");
        let p = decode_packet(r#"27["join",{"room":"dev"}]"#).unwrap();
        assert_eq!(p.ack, Some(7));
        assert_eq!(decode_packet("1").unwrap().kind, PacketType::Disconnect);
    }

    #[test]
    fn bad_socketio_packets_are_refused() {
        assert_eq!(decode_packet(""), Err(CodecError::Empty));
        assert_eq!(decode_packet("51-[\"a\",{}]"), Err(CodecError::Binary));
        assert_eq!(decode_packet("7"), Err(CodecError::UnknownType));
        assert_eq!(decode_packet("2[\"a\""), Err(CodecError::BadJson));
        assert_eq!(decode_packet("2{}"), Err(CodecError::BadData));
        assert_eq!(decode_packet("2[1]"), Err(CodecError::BadData));
        assert_eq!(decode_packet("2[]"), Err(CodecError::BadData));
        assert_eq!(decode_packet("2"), Err(CodecError::BadData));
        assert_eq!(decode_packet("0[1]"), Err(CodecError::BadData));
        assert_eq!(
            decode_packet("299999999999999999999999[\"a\"]"),
            Err(CodecError::BadAckId)
        );
        assert_eq!(decode_packet("2/é"), Err(CodecError::BadData));
        let deep = format!("2{}", "[".repeat(10_000));
        assert_eq!(decode_packet(&deep), Err(CodecError::BadJson));
    }

    const OFFSET: Offset<'static> = Offset {
        room: "dev",
        epoch: "e1",
        id: 7,
    };

    #[test]
    fn one_frame_is_sent_without_a_copy() {
        let frame = message_frame(&ws::text(b"{}"), OFFSET);
        let body = join_frames([&frame].into_iter());
        assert_eq!(&body[..], &ws::text_payload(&frame)[..]);
        assert_eq!(body.as_ptr(), frame[2..].as_ptr());
    }

    #[test]
    fn decoders_never_panic_on_random_input() {
        let alphabet = b"0123456789/,[]{}\"\\:abe\x1e \xff\xc3\xa9-_";
        let mut rng = fastrand::Rng::with_seed(7);
        for _ in 0..20_000 {
            let len = rng.usize(0..24);
            let bytes: Vec<u8> = (0..len)
                .map(|_| alphabet[rng.usize(..alphabet.len())])
                .collect();
            let text = String::from_utf8_lossy(&bytes);
            let _ = decode_engine(&text);
            let _ = decode_packet(&text);
            let _ = split_payload(&text);
            let _ = message_frame(&Bytes::from(bytes), OFFSET);
        }
    }

    #[test]
    fn server_packets() {
        let payload = |f: Bytes| String::from_utf8(ws::text_payload(&f).to_vec()).unwrap();
        assert_eq!(payload(connected("abc")), r#"40{"sid":"abc"}"#);
        assert_eq!(
            payload(connect_error("/admin", "Invalid namespace")),
            r#"44/admin,{"message":"Invalid namespace"}"#
        );
        assert_eq!(
            payload(ack(3, &serde_json::json!({"id":1}))),
            r#"433[{"id":1}]"#
        );
        assert_eq!(payload(ack_json(12, br#"{"id":1}"#)), r#"4312[{"id":1}]"#);
        assert_eq!(
            payload(event("joined", &serde_json::json!({"room":"g"}))),
            r#"42["joined",{"room":"g"}]"#
        );
        let native = ws::text(br#"{"type":"message","message":"a \"b\""}"#);
        let text = payload(message_frame(&native, OFFSET));
        let parsed: Value = serde_json::from_str(&text[2..]).unwrap();
        assert_eq!(parsed[0], "message");
        assert_eq!(parsed[2], "dev:e1:7");
        assert_eq!(Offset::parse("dev:e1:7"), Some(OFFSET));
        assert_eq!(Offset::parse("dev:e1"), None);
        assert_eq!(Offset::parse("dev:e1:x"), None);
        let inner: Value = serde_json::from_str(parsed[1].as_str().unwrap()).unwrap();
        assert_eq!(inner["message"], "a \"b\"");
        let odd = ws::text("x\u{1}\\\"é".as_bytes());
        let text = payload(message_frame(&odd, OFFSET));
        let parsed: Value = serde_json::from_str(&text[2..]).unwrap();
        assert_eq!(parsed[1], "x\u{1}\\\"é");
    }
}
