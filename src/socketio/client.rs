//! The Socket.IO side of a session: CONNECT to the main namespace, the events a client may
//! emit (`event:message`, `join`, `leave`, `presence`, `search`), their acks, and DISCONNECT.
//!
//! `event:message` is published through the same transport path as a native `send`, so ids,
//! history, Redis and `ref` dedupe apply alike; it is handed over at once, and the session
//! reads on while it is published (see [`Pipeline`](crate::chat::Pipeline)). Any other packet
//! waits until the messages before it are answered. What is answered is documented in
//! docs/socketio.md.

use std::sync::Arc;

use bytes::Bytes;
use serde_json::{Value, json};

use super::Query;
use super::session::random_id;
use crate::chat::{Chat, Join, Joined, Pipeline, Protocol, Sent};
use crate::hub::ConnId;
use crate::node::Node;
use crate::node::access::Grant;
use crate::outbox::Outbox;
use crate::protocol::message::Codec;
use crate::protocol::socketio::{self as codec, CodecError, PacketType};
use crate::protocol::{
    DEFAULT_ROOM, ErrorCode, MAX_REF_CHARS, ProtocolError, RoomName, RoomRef, valid_user_name,
};
use crate::protocol::{native, presence};

/// Socket.IO, as the chat core sees it.
pub(crate) struct SocketIo;

impl Protocol for SocketIo {
    const CODEC: Codec = Codec::SocketIo;

    /// The id of the ack the `event:message` asked for, if any.
    type SendTag = Option<u64>;

    fn sent(ack: Option<u64>, answer: Result<Sent, ProtocolError>) -> Option<Bytes> {
        match (ack, answer) {
            (Some(id), Ok(sent)) => {
                let (room, id_in_room) = (sent.room, sent.published.id);
                let value = if sent.published.duplicate {
                    json!({ "room": room, "id": id_in_room, "duplicate": true })
                } else {
                    json!({ "room": room, "id": id_in_room })
                };
                Some(codec::ack(id, &value))
            }
            (Some(id), Err(e)) => Some(codec::ack(id, &json!({ "error": error_json(&e) }))),
            (None, Ok(_)) => None,
            (None, Err(e)) => Some(error_event(&e)),
        }
    }

    fn joined(joined: &Joined<'_>) -> Bytes {
        let mut event = json!({ "room": joined.room, "online": joined.online });
        if let Some(peer) = joined.direct {
            event["dm"] = peer.into();
        }
        if joined.read_only {
            event["read_only"] = true.into();
        }
        codec::event("joined", &event)
    }

    fn already_joined(_: &RoomName, _: usize) -> Option<Bytes> {
        None // the ack answers
    }

    fn error(err: &ProtocolError) -> Bytes {
        error_event(err)
    }
}

/// The Socket.IO state of one session.
pub(super) struct Client {
    /// Signed in by CONNECT, with the display name and the first room.
    pub(super) chat: Chat<SocketIo>,
    /// The private id the session can be recovered with, once connected (recovery on).
    pub(super) pid: Option<String>,
    /// `name` and `room` from the handshake query, checked at CONNECT.
    query_name: Option<String>,
    query_room: Option<String>,
    query_token: Option<String>,
    /// The handshake's `scalechat_token` cookie, when its origin may use it.
    cookie_token: Option<String>,
}

/// What an event is answered with: an ack's value, or why it was refused.
type Answer = Result<Acked, ProtocolError>;

/// The value an ack carries.
enum Acked {
    /// Built as a JSON value.
    Value(Value),
    /// Already encoded: a search page, whose messages are copied from their encoded JSON
    /// rather than parsed back into values.
    Json(Vec<u8>),
}

impl From<Value> for Acked {
    fn from(value: Value) -> Self {
        Acked::Value(value)
    }
}

impl Client {
    pub fn new(node: Arc<Node>, conn: ConnId, outbox: Arc<Outbox>, query: &Query) -> Self {
        Self {
            chat: Chat::new(node, conn, outbox),
            pid: None,
            query_name: query.name.clone(),
            query_room: query.room.clone(),
            query_token: query.token.clone(),
            cookie_token: query.cookie.clone(),
        }
    }

    /// Whether the client is connected to the namespace now.
    pub fn is_connected(&self) -> bool {
        self.chat.is_signed_in()
    }

    pub(super) fn push(&self, frame: Bytes) {
        self.chat.push(frame);
    }

    /// The session's messages in flight.
    pub(super) fn pipeline(&self) -> Pipeline<SocketIo> {
        self.chat.pipeline().clone()
    }

    /// Handles one Socket.IO packet. An error means the packet could not be decoded (or
    /// carries binary attachments): the session is to be closed, as Socket.IO does.
    pub async fn handle(&mut self, text: &str) -> Result<(), CodecError> {
        let packet = codec::decode_packet(text)?;
        if packet.nsp != "/" {
            // Only the main namespace exists; packets for others are answered or dropped.
            if packet.kind == PacketType::Connect {
                self.push(codec::connect_error(packet.nsp, "Invalid namespace"));
            }
            return Ok(());
        }
        let message = packet.kind == PacketType::Event
            && matches!(&packet.data, Some(Value::Array(args))
                if args.first().and_then(Value::as_str) == Some("event:message"));
        if !message {
            self.chat.drained().await;
        }
        match packet.kind {
            PacketType::Connect => self.connect(packet.data.as_ref()).await,
            PacketType::Disconnect => {
                // A client that leaves on purpose is not recovered.
                if let Some(pid) = self.pid.take() {
                    self.chat.node().transport.take_recovery(&pid).await;
                }
                self.chat.sign_out();
            }
            PacketType::Event if self.is_connected() => {
                let Some(Value::Array(args)) = packet.data else {
                    return Err(CodecError::BadData);
                };
                if message {
                    self.send(args.get(1).unwrap_or(&Value::Null), packet.ack);
                } else {
                    let answer = self.event(&args).await;
                    self.answer(packet.ack, answer);
                }
            }
            // Events before CONNECT, acks (the server asks for none) and connect errors
            // (a server's packet) are ignored.
            PacketType::Event | PacketType::Ack | PacketType::ConnectError => {}
        }
        Ok(())
    }

    async fn connect(&mut self, auth: Option<&Value>) {
        let Ok(id) = random_id() else {
            return self.push(codec::connect_error("/", "no random bytes for a socket id"));
        };
        if self.is_connected() {
            return self.push(codec::connected(&id));
        }
        let name = match auth.and_then(|a| a.get("name")) {
            None | Some(Value::Null) => self.query_name.clone(),
            Some(Value::String(name)) => Some(name.clone()),
            Some(_) => return self.push(codec::connect_error("/", "name must be a string")),
        };
        // With token authentication on, the token names the user, as on `/ws`.
        let node = self.chat.node().clone();
        let mut grant = Grant::default();
        let name = match &node.auth {
            None => name,
            Some(checker) => {
                let token = match auth.and_then(|a| a.get("token")) {
                    Some(Value::String(token)) => Some(token.as_str()),
                    _ => self.query_token.as_deref().or(self.cookie_token.as_deref()),
                };
                let user = token
                    .ok_or_else(|| {
                        "a token is required: auth.token, the token query parameter or the \
                         scalechat_token cookie"
                            .to_owned()
                    })
                    .and_then(|token| checker.user(token));
                match user {
                    Ok(identity) => {
                        grant = identity.grant;
                        Some(identity.name)
                    }
                    Err(why) => {
                        node.metrics.refused(crate::metrics::Refusal::Unauthorized);
                        return self.push(codec::connect_error("/", &why));
                    }
                }
            }
        };
        let recovery = node.config.socketio.recovery_secs > 0;
        if recovery && let Some(auth) = auth {
            let token_user = node.auth.as_ref().and(name.as_deref());
            if self.recover(auth, token_user, grant.clone(), &id).await {
                return;
            }
        }
        let name = match name {
            Some(name) if valid_user_name(&name) => name,
            Some(_) => {
                return self.push(codec::connect_error(
                    "/",
                    "display names are 1 to 32 characters, not blank, no control or invisible format characters",
                ));
            }
            None => format!("guest-{:04x}", fastrand::u16(..)),
        };
        let room = self.query_room.as_deref().unwrap_or(DEFAULT_ROOM);
        let room = match RoomName::new(room) {
            Ok(room) => room,
            Err(e) => return self.push(codec::connect_error("/", &e.message)),
        };
        let presence = auth
            .and_then(|a| a.get("presence"))
            .and_then(Value::as_bool);
        if recovery {
            let Ok(pid) = random_id() else {
                return self.push(codec::connect_error(
                    "/",
                    "no random bytes for a session id",
                ));
            };
            self.push(codec::connected_with_pid(&id, &pid));
            self.pid = Some(pid);
        } else {
            self.push(codec::connected(&id));
        }
        self.chat.sign_in(name.into(), room.clone(), grant);
        let join = Join {
            room: RoomRef::Named(room),
            since: None,
            history: self.chat.node().config.socketio.history_on_join,
            presence: presence.unwrap_or(false),
        };
        if let Err(e) = self.chat.join(join).await {
            self.push(error_event(&e));
        }
        self.save_recovery().await;
    }

    /// An event other than `event:message` (which [`Client::send`] takes), answered.
    async fn event(&mut self, args: &[Value]) -> Answer {
        let data = args.get(1).unwrap_or(&Value::Null);
        match args.first().and_then(Value::as_str) {
            Some("join") => {
                let room = match data.get("dm") {
                    Some(Value::String(peer)) => RoomRef::Direct(peer.clone()),
                    Some(_) => return Err(bad_field("`dm` must be a user's display name")),
                    None => RoomRef::Named(room_field(data)?),
                };
                let join = Join {
                    room,
                    since: None,
                    history: self.chat.node().config.socketio.history_on_join,
                    presence: data.get("presence").and_then(Value::as_bool) == Some(true),
                };
                let entered = self.chat.join(join).await?;
                self.save_recovery().await;
                Ok(json!({ "room": entered.room, "online": entered.online }).into())
            }
            Some("presence") => {
                let room = room_field(data)?;
                let cursor = match data.get("cursor") {
                    None | Some(Value::Null) => None,
                    Some(Value::String(cursor)) => Some(cursor.as_str()),
                    Some(_) => return Err(bad_field("`cursor` must be a string")),
                };
                let limit = match data.get("limit") {
                    None | Some(Value::Null) => 100,
                    Some(limit) => limit
                        .as_u64()
                        .and_then(|l| usize::try_from(l).ok())
                        .ok_or_else(|| bad_field("`limit` must be a whole number"))?,
                };
                let page = self.chat.presence(&room, cursor, limit).await?;
                Ok(presence::page_json(&room, &page).into())
            }
            Some("search") => self.search(data).await,
            Some("leave") => {
                let room = room_field(data)?;
                self.chat.leave(&room)?;
                self.save_recovery().await;
                Ok(json!({ "room": room }).into())
            }
            other => Err(ProtocolError::new(
                ErrorCode::UnknownType,
                format!(
                    "unknown event {:?}; expected event:message, join, leave, presence or search",
                    other.unwrap_or_default()
                ),
            )),
        }
    }

    /// Acks the event when it asked (`43<id>[answer]`), else reports an error as an `error`
    /// event.
    fn answer(&mut self, ack: Option<u64>, answer: Answer) {
        if let Err(e) = &answer {
            self.chat.node().metrics.error(e.code);
        }
        match (ack, answer) {
            (Some(id), Ok(Acked::Value(value))) => self.push(codec::ack(id, &value)),
            (Some(id), Ok(Acked::Json(json))) => self.push(codec::ack_json(id, &json)),
            (Some(id), Err(e)) => self.push(codec::ack(id, &json!({ "error": error_json(&e) }))),
            (None, Ok(_)) => {}
            (None, Err(e)) => self.push(error_event(&e)),
        }
    }

    /// An `event:message`, published after the messages before it and answered (`ack`, the
    /// id of the ack it asked for) in its turn.
    fn send(&mut self, data: &Value, ack: Option<u64>) {
        match message_fields(data) {
            Ok((message, room, reference)) => {
                self.chat.send(room, message.to_owned(), reference, ack);
            }
            Err(e) => self.chat.refuse_send(ack, e),
        }
    }

    /// `search` `{room, query, cursor?, limit?}`: the fields checked as on the native
    /// protocol, then the chat core's search (its request rate, membership, the archive).
    async fn search(&mut self, data: &Value) -> Answer {
        let Value::Object(obj) = data else {
            return Err(bad_field("search takes {room, query, cursor?, limit?}"));
        };
        let (room, query, cursor, limit) = native::search_fields(obj)?;
        let page = self.chat.search(&room, query, cursor, limit).await?;
        let cursor = page.cursor.as_deref();
        Ok(Acked::Json(native::search_json(
            &room,
            query,
            &page.messages,
            cursor,
        )))
    }

    /// Leaves every room, as the session ends.
    pub fn leave_all(&mut self) {
        self.chat.sign_out();
    }
}

/// `message`, `room` and `ref` of an `event:message`: an object, or the message as a string.
fn message_fields(data: &Value) -> Result<(&str, Option<RoomName>, Option<&str>), ProtocolError> {
    let bad = |why: &str| ProtocolError::new(ErrorCode::BadField, why);
    if let Value::String(message) = data {
        return Ok((message, None, None));
    }
    let Value::Object(obj) = data else {
        return Err(bad("event:message takes {message} or a string"));
    };
    let message = match obj.get("message") {
        Some(Value::String(m)) => m.as_str(),
        _ => return Err(bad("`message` must be a string")),
    };
    let room = match obj.get("room") {
        None | Some(Value::Null) => None,
        Some(Value::String(room)) => Some(RoomName::new(room)?),
        Some(_) => return Err(bad("`room` must be a string")),
    };
    let reference = match obj.get("ref") {
        None | Some(Value::Null) => None,
        Some(Value::String(r)) if r.chars().count() <= MAX_REF_CHARS => Some(r.as_str()),
        Some(Value::String(_)) => {
            return Err(ProtocolError::new(
                ErrorCode::BadRef,
                "`ref` must be at most 64 characters",
            ));
        }
        Some(_) => return Err(bad("`ref` must be a string")),
    };
    Ok((message, room, reference))
}

fn bad_field(why: &str) -> ProtocolError {
    ProtocolError::new(ErrorCode::BadField, why)
}

/// The `room` of a `join`, `leave` or `presence`: `{room}` or the name as a string.
fn room_field(data: &Value) -> Result<RoomName, ProtocolError> {
    match data.get("room").unwrap_or(data) {
        Value::String(room) => RoomName::new(room),
        _ => Err(ProtocolError::new(
            ErrorCode::BadField,
            "`room` is required: {room: NAME}",
        )),
    }
}

fn error_json(e: &ProtocolError) -> Value {
    json!({ "code": e.code.as_str(), "message": e.message })
}

pub(super) fn error_event(e: &ProtocolError) -> Bytes {
    codec::event("error", &error_json(e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn message_fields_accept_an_object_or_a_string() {
        let data = json!({"message":"hi","room":"dev","ref":"a"});
        let (m, room, r) = message_fields(&data).unwrap();
        assert_eq!((m, room.unwrap().as_str(), r), ("hi", "dev", Some("a")));
        let data = json!("hi");
        assert_eq!(message_fields(&data).unwrap().0, "hi");
        let code = |v: Value| message_fields(&v).unwrap_err().code;
        assert_eq!(code(json!({})), ErrorCode::BadField);
        assert_eq!(code(json!({"message":1})), ErrorCode::BadField);
        assert_eq!(
            code(json!({"message":"a","room":"a b"})),
            ErrorCode::BadRoom
        );
        assert_eq!(
            code(json!({"message":"a","ref":"x".repeat(65)})),
            ErrorCode::BadRef
        );
        assert_eq!(code(json!(null)), ErrorCode::BadField);
    }

    #[test]
    fn room_field_reads_an_object_or_a_string() {
        assert_eq!(room_field(&json!({"room":"dev"})).unwrap().as_str(), "dev");
        assert_eq!(room_field(&json!("dev")).unwrap().as_str(), "dev");
        assert!(room_field(&json!({})).is_err());
        assert!(room_field(&json!(3)).is_err());
    }
}
