//! The Socket.IO side of a session: CONNECT to the main namespace, the events a client may
//! emit (`event:message`, `join`, `leave`), their acks, and DISCONNECT.
//!
//! `event:message` is published through the same transport path as a native `send`, so ids,
//! history, Redis and `ref` dedupe apply alike. What is answered is documented in
//! docs/socketio.md.

use std::sync::Arc;

use serde_json::{Value, json};
use tokio::time::Instant;

use super::Query;
use super::session::random_id;
use crate::conn::rate::TokenBucket;
use crate::hub::{Codec, ConnId};
use crate::node::Node;
use crate::outbox::{Outbox, Refused};
use crate::protocol::native::check_message;
use crate::protocol::socketio::{self as codec, CodecError, PacketType};
use crate::protocol::{
    DEFAULT_ROOM, ErrorCode, MAX_REF_CHARS, ProtocolError, RoomName, valid_user_name,
};

/// The Socket.IO state of one session.
pub(super) struct Client {
    node: Arc<Node>,
    conn: ConnId,
    outbox: Arc<Outbox>,
    /// `name` and `room` from the handshake query, checked at CONNECT.
    query_name: Option<String>,
    query_room: Option<String>,
    query_token: Option<String>,
    /// The handshake's `scalechat_token` cookie, when its origin may use it.
    cookie_token: Option<String>,
    /// Set by CONNECT: the display name and the first room.
    connected: Option<(String, RoomName)>,
    rooms: Vec<RoomName>,
    /// `event:message`s.
    bucket: TokenBucket,
    /// Joins (CONNECT's and `join`) and `leave`s.
    requests: TokenBucket,
    /// The node's reloadable settings version the buckets were set up for.
    live_version: u64,
}

type Answer = Result<Value, ProtocolError>;

impl Client {
    pub fn new(node: Arc<Node>, conn: ConnId, outbox: Arc<Outbox>, query: &Query) -> Self {
        let live_version = node.live_version();
        let live = node.live();
        let bucket = TokenBucket::new(live.limits.messages_per_second, live.limits.message_burst);
        let requests = TokenBucket::new(live.limits.requests_per_second, live.limits.request_burst);
        Self {
            live_version,
            node,
            conn,
            outbox,
            query_name: query.name.clone(),
            query_room: query.room.clone(),
            query_token: query.token.clone(),
            cookie_token: query.cookie.clone(),
            connected: None,
            rooms: Vec::new(),
            bucket,
            requests,
        }
    }

    /// Whether the client is connected to the namespace now.
    pub fn is_connected(&self) -> bool {
        self.connected.is_some()
    }

    /// The node's reloadable settings, applied to the buckets once a SIGHUP changed them.
    fn live(&mut self) -> Arc<crate::config::Reloadable> {
        let live = self.node.live();
        let version = self.node.live_version();
        if version != self.live_version {
            // The rates apply from this event on.
            self.live_version = version;
            let limits = &live.limits;
            self.bucket
                .reconfigure(limits.messages_per_second, limits.message_burst);
            self.requests
                .reconfigure(limits.requests_per_second, limits.request_burst);
        }
        live
    }

    /// Takes a token for a join or a leave, or says why not.
    fn take_request(&mut self) -> Result<(), ProtocolError> {
        let rate = self.live().limits.requests_per_second;
        if self.requests.take(Instant::now()) {
            return Ok(());
        }
        Err(ProtocolError::new(
            ErrorCode::RateLimited,
            format!("join and leave faster than {rate} per second; not done"),
        ))
    }

    fn push(&self, frame: bytes::Bytes) {
        // A refused push means the session is closing; nobody reads the answer.
        if let Err(Refused::Full) = self.outbox.push(frame) {
            self.node.metrics.slow_consumer_disconnects_total.inc();
        }
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
        match packet.kind {
            PacketType::Connect => self.connect(packet.data.as_ref()).await,
            PacketType::Disconnect => {
                self.leave_all();
                self.connected = None;
            }
            PacketType::Event if self.connected.is_some() => {
                let Some(Value::Array(args)) = packet.data else {
                    return Err(CodecError::BadData);
                };
                let answer = self.event(&args).await;
                self.answer(packet.ack, answer);
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
        if self.connected.is_some() {
            return self.push(codec::connected(&id));
        }
        let name = match auth.and_then(|a| a.get("name")) {
            None | Some(Value::Null) => self.query_name.clone(),
            Some(Value::String(name)) => Some(name.clone()),
            Some(_) => return self.push(codec::connect_error("/", "name must be a string")),
        };
        // With token authentication on, the token names the user, as on `/ws`.
        let name = match &self.node.auth {
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
                    Ok(user) => Some(user),
                    Err(why) => {
                        self.node
                            .metrics
                            .refused(crate::metrics::Refusal::Unauthorized);
                        return self.push(codec::connect_error("/", &why));
                    }
                }
            }
        };
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
        self.push(codec::connected(&id));
        self.connected = Some((name, room.clone()));
        if let Err(e) = self.join(room).await {
            self.push(error_event(&e));
        }
    }

    async fn event(&mut self, args: &[Value]) -> Answer {
        let data = args.get(1).unwrap_or(&Value::Null);
        match args.first().and_then(Value::as_str) {
            Some("event:message") => self.send(data).await,
            Some("join") => self.join(room_field(data)?).await,
            Some("leave") => self.leave(room_field(data)?),
            other => Err(ProtocolError::new(
                ErrorCode::UnknownType,
                format!(
                    "unknown event {:?}; expected event:message, join or leave",
                    other.unwrap_or_default()
                ),
            )),
        }
    }

    /// Acks the event when it asked (`43<id>[answer]`), else reports an error as an `error`
    /// event.
    fn answer(&mut self, ack: Option<u64>, answer: Answer) {
        if let Err(e) = &answer {
            self.node.metrics.error(e.code);
        }
        match (ack, answer) {
            (Some(id), Ok(value)) => self.push(codec::ack(id, &value)),
            (Some(id), Err(e)) => self.push(codec::ack(id, &json!({ "error": error_json(&e) }))),
            (None, Ok(_)) => {}
            (None, Err(e)) => self.push(error_event(&e)),
        }
    }

    async fn join(&mut self, room: RoomName) -> Answer {
        self.take_request()?;
        let node = self.node.clone();
        if self.rooms.contains(&room) {
            let online = node.hub.online(room.as_str());
            return Ok(json!({ "room": room, "online": online }));
        }
        let limit = node.live().limits.max_rooms_per_connection;
        if self.rooms.len() >= limit {
            return Err(ProtocolError::new(
                ErrorCode::TooManyRooms,
                format!("a connection may be in at most {limit} rooms"),
            ));
        }
        // Subscribed first, so that every message published from now on reaches this node.
        // Recorded with the hub join, with no await between: a join cancelled before leaves
        // neither a room to leave nor a subscription behind.
        let subscription = node.transport.subscribe(&room).await;
        let joined = node
            .hub
            .join_as(Codec::SocketIo, &room, self.conn, &self.outbox, |online| {
                codec::event("joined", &json!({ "room": room, "online": online }))
            });
        self.rooms.push(room.clone());
        subscription.joined();
        Ok(json!({ "room": room, "online": joined.online }))
    }

    fn leave(&mut self, room: RoomName) -> Answer {
        self.take_request()?;
        let Some(at) = self.rooms.iter().position(|r| *r == room) else {
            return Err(ProtocolError::new(
                ErrorCode::NotJoined,
                format!("not in room {room}"),
            ));
        };
        self.rooms.swap_remove(at);
        self.leave_room(&room);
        Ok(json!({ "room": room }))
    }

    fn leave_room(&self, room: &RoomName) {
        if let Some(left) = self.node.hub.leave(room.as_str(), self.conn)
            && left.first_or_last
        {
            self.node.transport.unsubscribe(room);
        }
    }

    /// Leaves every room (at DISCONNECT and when the session ends).
    pub fn leave_all(&mut self) {
        for room in std::mem::take(&mut self.rooms) {
            self.leave_room(&room);
        }
    }

    async fn send(&mut self, data: &Value) -> Answer {
        let live = self.live();
        let Some((name, first_room)) = &self.connected else {
            return Err(ProtocolError::new(ErrorCode::BadField, "not connected"));
        };
        let (message, room, reference) = message_fields(data)?;
        check_message(message, live.limits.max_message_chars)?;
        let room = room.unwrap_or_else(|| first_room.clone());
        if !self.rooms.contains(&room) {
            return Err(ProtocolError::new(
                ErrorCode::NotJoined,
                format!("not in room {room}"),
            ));
        }
        if !self.bucket.take(Instant::now()) {
            let rate = live.limits.messages_per_second;
            return Err(ProtocolError::new(
                ErrorCode::RateLimited,
                format!("sending faster than {rate} messages per second; not delivered"),
            ));
        }
        let published = self
            .node
            .publish(room.clone(), name, message, reference)
            .await?;
        Ok(if published.duplicate {
            json!({ "room": room, "id": published.id, "duplicate": true })
        } else {
            json!({ "room": room, "id": published.id })
        })
    }
}

impl Drop for Client {
    fn drop(&mut self) {
        self.leave_all();
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

/// The `room` of a `join` or `leave`: `{room}` or the name as a string.
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

fn error_event(e: &ProtocolError) -> bytes::Bytes {
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
