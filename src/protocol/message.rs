//! A chat message as it travels from the transport to the hub and the outboxes: its fields,
//! typed, and its frame in each protocol's encoding, each built at most once per node and
//! shared by every recipient (a reference-count bump, never a copy).
//!
//! The native frame is built when the message is: from the sender's [`MessageTemplate`] where
//! the id is assigned, or from the native JSON text a Redis node receives (which is that same
//! encoding, checked and decoded once here). The Socket.IO form is built from the native one
//! the first time a Socket.IO member needs it.

use std::sync::{Arc, OnceLock};

use bytes::Bytes;
use serde::Deserialize;

use super::native::MessageTemplate;
use super::{RoomName, socketio, ws};

/// The wire format a member reads chat messages in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Codec {
    /// scalechat's native protocol: the `message` frame (docs/protocol.md).
    Native,
    /// Socket.IO: the `message` event carrying the native JSON as a string
    /// (docs/socketio.md).
    SocketIo,
}

/// One accepted chat message.
#[derive(Debug)]
pub struct Message {
    room: RoomName,
    id: u64,
    epoch: Arc<str>,
    ts: u64,
    user: Arc<str>,
    text: String,
    /// The native `message` frame, a whole WebSocket text frame.
    native: Bytes,
    /// The Socket.IO form, once a Socket.IO member needed it.
    socketio: OnceLock<Bytes>,
}

/// The fields of a message before the transport accepted it: everything but its id and
/// epoch, and the native JSON already encoded around them.
#[derive(Debug, Clone)]
pub struct Draft {
    /// The room.
    pub room: RoomName,
    /// The sender's display name.
    pub user: Arc<str>,
    /// When the node accepted it, in milliseconds since the Unix epoch.
    pub ts: u64,
    /// The chat text.
    pub text: String,
    /// The native JSON around the id and epoch (see [`MessageTemplate`]).
    pub template: MessageTemplate,
}

impl Draft {
    /// Encodes a message from `user` in `room`, sent at `ts` (ms since the Unix epoch). The
    /// text is kept as it is (the decoded request's own string).
    pub fn new(room: RoomName, user: Arc<str>, ts: u64, text: String) -> Self {
        let template = MessageTemplate::new(&room, &user, ts, &text);
        Self {
            room,
            user,
            ts,
            text,
            template,
        }
    }

    /// The bytes it holds until it is accepted: the text and its encoded JSON.
    pub fn size(&self) -> usize {
        self.text.len() + self.template.head().len() + self.template.tail().len()
    }

    /// The accepted message: id `id` of `epoch`. Its native frame is built now, once.
    pub fn accept(self, id: u64, epoch: Arc<str>) -> Message {
        let native = self.template.frame(id, &epoch);
        Message {
            room: self.room,
            id,
            epoch,
            ts: self.ts,
            user: self.user,
            text: self.text,
            native,
            socketio: OnceLock::new(),
        }
    }
}

/// Why a stored or received message text is not one scalechat wrote.
#[derive(Debug, thiserror::Error)]
#[error("not a scalechat message: {0}")]
pub struct NotAMessage(String);

/// The native JSON of a message, as [`Message::decode`] reads it.
#[derive(Deserialize)]
struct Wire<'a> {
    #[serde(rename = "type")]
    kind: &'a str,
    #[serde(borrow)]
    room: std::borrow::Cow<'a, str>,
    id: u64,
    #[serde(borrow)]
    epoch: std::borrow::Cow<'a, str>,
    #[serde(borrow)]
    user: std::borrow::Cow<'a, str>,
    ts: u64,
    #[serde(borrow)]
    message: std::borrow::Cow<'a, str>,
}

impl Message {
    /// Decodes the native JSON text of a message (as the Redis transport publishes and
    /// stores it); its native frame carries that very text. Ids start at 1.
    pub fn decode(json: &[u8]) -> Result<Self, NotAMessage> {
        let wire: Wire<'_> =
            serde_json::from_slice(json).map_err(|e| NotAMessage(e.to_string()))?;
        if wire.kind != "message" {
            return Err(NotAMessage(format!("type {:?}", wire.kind)));
        }
        if wire.id == 0 {
            return Err(NotAMessage("id 0".into()));
        }
        let room = RoomName::new(&wire.room).map_err(|e| NotAMessage(e.message))?;
        Ok(Self {
            room,
            id: wire.id,
            epoch: wire.epoch.into(),
            ts: wire.ts,
            user: wire.user.into(),
            text: wire.message.into_owned(),
            native: ws::text(json),
            socketio: OnceLock::new(),
        })
    }

    /// The room.
    pub fn room(&self) -> &RoomName {
        &self.room
    }

    /// Its id in the room, from 1.
    pub fn id(&self) -> u64 {
        self.id
    }

    /// The epoch of the room's history it belongs to.
    pub fn epoch(&self) -> &str {
        &self.epoch
    }

    /// When it was accepted, in milliseconds since the Unix epoch.
    pub fn ts(&self) -> u64 {
        self.ts
    }

    /// The sender's display name.
    pub fn user(&self) -> &str {
        &self.user
    }

    /// The chat text.
    pub fn text(&self) -> &str {
        &self.text
    }

    /// Whether it comes after position `id` of `epoch` (a client's or a snapshot's): a
    /// different epoch, or a greater id.
    pub fn is_after(&self, epoch: &str, id: u64) -> bool {
        &*self.epoch != epoch || self.id > id
    }

    /// The message as a whole WebSocket text frame in `codec`, shared.
    pub fn frame(&self, codec: Codec) -> Bytes {
        match codec {
            Codec::Native => self.native.clone(),
            Codec::SocketIo => self
                .socketio
                .get_or_init(|| {
                    let offset = socketio::Offset {
                        room: self.room.as_str(),
                        epoch: &self.epoch,
                        id: self.id,
                    };
                    socketio::message_frame(&self.native, offset)
                })
                .clone(),
        }
    }

    /// The native JSON text (the native frame's payload, shared): what `history` pages list
    /// and what the Redis transport stores.
    pub fn json(&self) -> Bytes {
        ws::text_payload(&self.native)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn draft(text: &str) -> Draft {
        Draft::new(RoomName::new("dev").unwrap(), "ann".into(), 17, text.into())
    }

    #[test]
    fn an_accepted_draft_is_typed_and_encoded_once() {
        let message = draft("hi \"there\"").accept(7, "e1".into());
        assert_eq!((message.id(), message.epoch(), message.ts()), (7, "e1", 17));
        assert_eq!((message.user(), message.text()), ("ann", "hi \"there\""));
        let json = message.json();
        let value: serde_json::Value = serde_json::from_slice(&json).unwrap();
        assert_eq!(value["type"], "message");
        assert_eq!(value["room"], "dev");
        assert_eq!(value["id"], 7);
        assert_eq!(value["epoch"], "e1");
        assert_eq!(value["message"], "hi \"there\"");
        let a = message.frame(Codec::Native);
        assert_eq!(a.as_ptr(), message.frame(Codec::Native).as_ptr());
        let b = message.frame(Codec::SocketIo);
        assert_eq!(b.as_ptr(), message.frame(Codec::SocketIo).as_ptr());
    }

    #[test]
    fn decode_reads_back_what_accept_wrote() {
        let sent = draft("é\u{1}\\").accept(3, "abc".into());
        let received = Message::decode(&sent.json()).unwrap();
        assert_eq!(received.room().as_str(), "dev");
        assert_eq!((received.id(), received.epoch()), (3, "abc"));
        assert_eq!(
            (received.user(), received.text(), received.ts()),
            ("ann", "é\u{1}\\", 17)
        );
        assert_eq!(received.frame(Codec::Native), sent.frame(Codec::Native));
        assert_eq!(received.frame(Codec::SocketIo), sent.frame(Codec::SocketIo));
    }

    #[test]
    fn decode_refuses_what_is_not_a_message() {
        for bad in [
            &b"nope"[..],
            br#"{"type":"joined","room":"dev","id":1,"epoch":"e","user":"a","ts":1,"message":"m"}"#,
            br#"{"type":"message","room":"dev","id":0,"epoch":"e","user":"a","ts":1,"message":"m"}"#,
            br#"{"type":"message","room":"a b","id":1,"epoch":"e","user":"a","ts":1,"message":"m"}"#,
            br#"{"type":"message","room":"dev","id":1,"epoch":"e","user":"a","message":"m"}"#,
        ] {
            assert!(Message::decode(bad).is_err(), "{}", String::from_utf8_lossy(bad));
        }
    }

    #[test]
    fn is_after_compares_within_an_epoch_only() {
        let message = draft("x").accept(5, "e1".into());
        assert!(message.is_after("e1", 4));
        assert!(!message.is_after("e1", 5));
        assert!(message.is_after("e0", 9));
    }
}
