//! scalechat's native protocol v1: JSON text frames, each one object with a `type`
//! (docs/protocol.md). Decodes what clients send; encodes what the server sends, each frame once.

use std::sync::Arc;

use bytes::Bytes;
use serde::Serialize;
use serde_json::{Map, Value};

use super::message::Message;
use super::presence::{MAX_CURSOR_LEN, MAX_PAGE};
use super::{ErrorCode, MAX_REF_CHARS, ProtocolError, RoomName, RoomRef, valid_user_name, ws};

/// What a client asks for.
#[derive(Debug, Clone, PartialEq)]
pub enum Request {
    /// Send `message` to `room` (the connection's first room when `None`).
    Send {
        /// Target room.
        room: Option<RoomName>,
        /// The chat text.
        message: String,
        /// Client id echoed in the ack.
        reference: Option<String>,
    },
    /// Join a room.
    Join {
        /// The room, or the other user of a direct-message room (`dm`).
        room: RoomRef,
        /// The last message the client saw there, to receive what it missed.
        since: Option<Since>,
        /// Send the room's presence events (`member_joined`, `member_left`).
        presence: bool,
    },
    /// A page of a room's members.
    Presence {
        /// The room.
        room: RoomName,
        /// Where the page starts: the previous page's `cursor`.
        cursor: Option<String>,
        /// At most this many.
        limit: usize,
    },
    /// Older messages of a room, for scroll-back.
    History {
        /// The room.
        room: RoomName,
        /// Only messages with a smaller id; the newest when `None`.
        before: Option<u64>,
        /// At most this many.
        limit: usize,
    },
    /// Leave a room.
    Leave {
        /// The room.
        room: RoomName,
    },
    /// Full-text search over a room's archived messages, newest first.
    Search {
        /// The room.
        room: RoomName,
        /// Words, "quoted phrases", `or`, `-word`; any text is valid.
        query: String,
        /// Where the page starts: the previous page's `cursor`.
        cursor: Option<String>,
        /// At most this many.
        limit: usize,
    },
}

/// Longest `search` query, in characters.
pub const MAX_SEARCH_QUERY_CHARS: usize = 256;
/// Most messages one `search` request returns.
pub const MAX_SEARCH_PAGE: usize = 50;
/// Longest `cursor` a `search` page returns (time, id and epoch).
pub const MAX_SEARCH_CURSOR_LEN: usize = 128;

/// Where a client left a room: the id of the last message it saw, and the room's epoch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Since {
    /// Last message id seen.
    pub id: u64,
    /// The room history's epoch, as the server sent it in `joined` or a message.
    pub epoch: String,
}

impl Since {
    /// Checks a `since` and `epoch` pair as a client sent it (in a `join` or the `/ws` query).
    pub fn new(id: u64, epoch: Option<&str>) -> Result<Self, ProtocolError> {
        let epoch = epoch.ok_or_else(|| {
            ProtocolError::new(
                ErrorCode::BadField,
                "`since` needs the room's `epoch` from `joined` or a message",
            )
        })?;
        if !valid_epoch(epoch) {
            return Err(ProtocolError::new(
                ErrorCode::BadField,
                "`epoch` must be 1 to 32 letters or digits",
            ));
        }
        Ok(Self {
            id,
            epoch: epoch.to_owned(),
        })
    }
}

/// Whether `epoch` could be one the server sent: 1 to 32 ASCII letters or digits.
pub(crate) fn valid_epoch(epoch: &str) -> bool {
    (1..=32).contains(&epoch.len()) && epoch.bytes().all(|b| b.is_ascii_alphanumeric())
}

/// Most messages one `history` request returns.
pub(crate) const MAX_HISTORY_PAGE: usize = 100;

/// Decodes one client frame, checking every field; `max_message_chars` bounds `send`.
pub fn decode(payload: &[u8], max_message_chars: usize) -> Result<Request, ProtocolError> {
    let value: Value = serde_json::from_slice(payload)
        .map_err(|e| ProtocolError::new(ErrorCode::BadJson, format!("not valid JSON: {e}")))?;
    let Value::Object(obj) = value else {
        return Err(ProtocolError::new(
            ErrorCode::BadJson,
            "a frame must be one JSON object",
        ));
    };
    let reference = optional_str(&obj, "ref")?;
    if let Some(r) = reference
        && r.chars().count() > MAX_REF_CHARS
    {
        return Err(ProtocolError::new(
            ErrorCode::BadRef,
            "`ref` must be at most 64 characters",
        ));
    }
    decode_typed(&obj, reference, max_message_chars).map_err(|e| e.with_ref(reference))
}

fn decode_typed(
    obj: &Map<String, Value>,
    reference: Option<&str>,
    max_message_chars: usize,
) -> Result<Request, ProtocolError> {
    let kind = optional_str(obj, "type")?
        .ok_or_else(|| ProtocolError::new(ErrorCode::BadField, "`type` is required"))?;
    match kind {
        "send" => {
            let room = optional_str(obj, "room")?.map(RoomName::new).transpose()?;
            let message = optional_str(obj, "message")?
                .ok_or_else(|| ProtocolError::new(ErrorCode::BadField, "`message` is required"))?;
            check_message(message, max_message_chars)?;
            Ok(Request::Send {
                room,
                message: message.to_owned(),
                reference: reference.map(str::to_owned),
            })
        }
        "join" => {
            let room = match optional_str(obj, "dm")? {
                Some(peer) if valid_user_name(peer) => RoomRef::Direct(peer.to_owned()),
                Some(_) => {
                    return Err(ProtocolError::new(
                        ErrorCode::BadField,
                        "`dm` must be a user's display name",
                    ));
                }
                None => RoomRef::Named(required_room(obj)?),
            };
            let epoch = optional_str(obj, "epoch")?;
            let since = optional_u64(obj, "since")?
                .map(|id| Since::new(id, epoch))
                .transpose()?;
            let presence = optional_bool(obj, "presence")?.unwrap_or(false);
            Ok(Request::Join {
                room,
                since,
                presence,
            })
        }
        "presence" => {
            let room = required_room(obj)?;
            let cursor = optional_str(obj, "cursor")?;
            if cursor.is_some_and(|c| c.len() > MAX_CURSOR_LEN) {
                return Err(ProtocolError::new(
                    ErrorCode::BadField,
                    "`cursor` must be one a presence page returned",
                ));
            }
            let limit = optional_u64(obj, "limit")?.unwrap_or(100);
            if limit == 0 || limit > MAX_PAGE as u64 {
                return Err(ProtocolError::new(
                    ErrorCode::BadField,
                    format!("`limit` must be 1 to {MAX_PAGE}"),
                ));
            }
            Ok(Request::Presence {
                room,
                cursor: cursor.map(str::to_owned),
                limit: limit as usize,
            })
        }
        "history" => {
            let room = required_room(obj)?;
            let before = optional_u64(obj, "before")?;
            let limit = optional_u64(obj, "limit")?.unwrap_or(50);
            if limit == 0 || limit > MAX_HISTORY_PAGE as u64 {
                return Err(ProtocolError::new(
                    ErrorCode::BadField,
                    format!("`limit` must be 1 to {MAX_HISTORY_PAGE}"),
                ));
            }
            Ok(Request::History {
                room,
                before,
                limit: limit as usize,
            })
        }
        "leave" => Ok(Request::Leave {
            room: required_room(obj)?,
        }),
        "search" => {
            let (room, query, cursor, limit) = search_fields(obj)?;
            Ok(Request::Search {
                room,
                query: query.to_owned(),
                cursor: cursor.map(str::to_owned),
                limit,
            })
        }
        other => Err(ProtocolError::new(
            ErrorCode::UnknownType,
            format!(
                "unknown type {other:?}; expected send, join, leave, history, presence or search"
            ),
        )),
    }
}

/// The fields of a `search` request, checked as every protocol takes them: `room`, `query`
/// (1 to [`MAX_SEARCH_QUERY_CHARS`] characters, not only white space), `cursor` (at most
/// [`MAX_SEARCH_CURSOR_LEN`] bytes) and `limit` (1 to [`MAX_SEARCH_PAGE`], 20 when absent).
pub(crate) fn search_fields(
    obj: &Map<String, Value>,
) -> Result<(RoomName, &str, Option<&str>, usize), ProtocolError> {
    let room = required_room(obj)?;
    let query = optional_str(obj, "query")?.unwrap_or_default();
    if query.trim().is_empty() || query.chars().count() > MAX_SEARCH_QUERY_CHARS {
        return Err(ProtocolError::new(
            ErrorCode::BadField,
            format!("`query` must be 1 to {MAX_SEARCH_QUERY_CHARS} characters"),
        ));
    }
    let cursor = optional_str(obj, "cursor")?;
    if cursor.is_some_and(|c| c.len() > MAX_SEARCH_CURSOR_LEN) {
        return Err(ProtocolError::new(
            ErrorCode::BadField,
            "`cursor` must be one a search page returned",
        ));
    }
    let limit = optional_u64(obj, "limit")?.unwrap_or(20);
    if limit == 0 || limit > MAX_SEARCH_PAGE as u64 {
        return Err(ProtocolError::new(
            ErrorCode::BadField,
            format!("`limit` must be 1 to {MAX_SEARCH_PAGE}"),
        ));
    }
    Ok((room, query, cursor, limit as usize))
}

/// Checks a chat message: not empty or only white space, at most `max_chars` characters.
pub(crate) fn check_message(message: &str, max_chars: usize) -> Result<(), ProtocolError> {
    if message.trim().is_empty() {
        return Err(ProtocolError::new(
            ErrorCode::EmptyMessage,
            "the message is empty",
        ));
    }
    let chars = message.chars().count();
    if chars > max_chars {
        return Err(ProtocolError::new(
            ErrorCode::MessageTooLong,
            format!("the message has {chars} characters; the limit is {max_chars}"),
        ));
    }
    Ok(())
}

fn optional_str<'a>(
    obj: &'a Map<String, Value>,
    field: &str,
) -> Result<Option<&'a str>, ProtocolError> {
    match obj.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s)),
        Some(_) => Err(ProtocolError::new(
            ErrorCode::BadField,
            format!("`{field}` must be a string"),
        )),
    }
}

fn optional_bool(obj: &Map<String, Value>, field: &str) -> Result<Option<bool>, ProtocolError> {
    match obj.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Bool(b)) => Ok(Some(*b)),
        Some(_) => Err(ProtocolError::new(
            ErrorCode::BadField,
            format!("`{field}` must be true or false"),
        )),
    }
}

fn optional_u64(obj: &Map<String, Value>, field: &str) -> Result<Option<u64>, ProtocolError> {
    match obj.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Number(n)) if n.as_u64().is_some() => Ok(n.as_u64()),
        Some(_) => Err(ProtocolError::new(
            ErrorCode::BadField,
            format!("`{field}` must be a whole number, 0 or more"),
        )),
    }
}

fn required_room(obj: &Map<String, Value>) -> Result<RoomName, ProtocolError> {
    let room = optional_str(obj, "room")?
        .ok_or_else(|| ProtocolError::new(ErrorCode::BadField, "`room` is required"))?;
    RoomName::new(room)
}

/// Frames the server sends to one connection (not chat messages: see [`MessageTemplate`]).
#[derive(Serialize)]
#[serde(tag = "type", rename_all = "lowercase")]
pub(crate) enum Reply<'a> {
    /// First frame of every connection.
    Welcome {
        /// Connection id.
        conn: &'a str,
        /// Display name.
        name: &'a str,
        /// Node that serves the connection.
        node: &'a str,
        /// Rooms the connection is in.
        rooms: &'a [RoomName],
    },
    /// The connection is in `room`, where `online` members are now. `history` messages
    /// (ids up to `last_id`) follow, then live ones.
    Joined {
        /// The room.
        room: &'a RoomName,
        /// Members online in the room.
        online: usize,
        /// The room history's epoch: send it back with `since`.
        #[serde(skip_serializing_if = "Option::is_none")]
        epoch: Option<&'a str>,
        /// The room's newest message id when the client joined (0: none yet).
        #[serde(skip_serializing_if = "Option::is_none")]
        last_id: Option<u64>,
        /// Messages of history that follow this reply.
        history: usize,
        /// With `since`: whether the messages that follow are exactly those missed. `false`
        /// means some could not be served (too old, or the history was reset).
        #[serde(skip_serializing_if = "Option::is_none")]
        recovered: Option<bool>,
        /// A direct-message room: the other user.
        #[serde(skip_serializing_if = "Option::is_none")]
        dm: Option<&'a str>,
        /// The user may read the room but not send to it.
        #[serde(skip_serializing_if = "std::ops::Not::not")]
        read_only: bool,
    },
    /// The connection left `room`.
    Left {
        /// The room.
        room: &'a RoomName,
    },
    /// A `send` was accepted as message `id` of `room`.
    Ack {
        /// The client's `ref`, when it sent one.
        #[serde(rename = "ref", skip_serializing_if = "Option::is_none")]
        reference: Option<&'a str>,
        /// The room.
        room: &'a RoomName,
        /// The message's id in the room.
        id: u64,
        /// The `ref` had already been accepted: this is the first ack again, and the message
        /// was not delivered twice.
        #[serde(skip_serializing_if = "std::ops::Not::not")]
        duplicate: bool,
    },
    /// A frame was refused.
    Error {
        /// Stable error code.
        code: &'static str,
        /// A sentence for people.
        message: &'a str,
        /// The refused frame's `ref`, when it had one.
        #[serde(rename = "ref", skip_serializing_if = "Option::is_none")]
        reference: Option<&'a str>,
    },
}

impl Reply<'_> {
    /// The reply as a ready-to-send text frame.
    pub fn frame(&self) -> Bytes {
        // Serializing these plain structs into a Vec cannot fail.
        let json = serde_json::to_vec(self).unwrap_or_default();
        ws::text(&json)
    }
}

/// The frame for a refused request.
pub(crate) fn error_frame(err: &ProtocolError) -> Bytes {
    Reply::Error {
        code: err.code.as_str(),
        message: &err.message,
        reference: err.reference.as_deref(),
    }
    .frame()
}

/// A chat message encoded once, before its id is known: the JSON text around the id.
///
/// `{"type":"message","room":"general","id":` + id + `,"epoch":"…"` + `,"user":…,"ts":…,
/// "message":…}`. The transport that assigns the id joins the parts
/// ([`MessageTemplate::frame`]), so the message is serialized exactly once.
#[derive(Debug, Clone, PartialEq)]
pub struct MessageTemplate {
    json: Vec<u8>,
    id_at: usize,
}

impl MessageTemplate {
    /// Encodes a message from `user` in `room`, sent at `ts` (ms since the Unix epoch).
    pub fn new(room: &RoomName, user: &str, ts: u64, message: &str) -> Self {
        let mut json = Vec::with_capacity(64 + room.as_str().len() + user.len() + message.len());
        json.extend_from_slice(b"{\"type\":\"message\",\"room\":");
        push_json_str(&mut json, room.as_str());
        json.extend_from_slice(b",\"id\":");
        let id_at = json.len();
        json.extend_from_slice(b",\"user\":");
        push_json_str(&mut json, user);
        json.extend_from_slice(b",\"ts\":");
        json.extend_from_slice(itoa::Buffer::new().format(ts).as_bytes());
        json.extend_from_slice(b",\"message\":");
        push_json_str(&mut json, message);
        json.push(b'}');
        Self { json, id_at }
    }

    /// JSON before the id.
    pub fn head(&self) -> &[u8] {
        &self.json[..self.id_at]
    }

    /// JSON after the id.
    pub fn tail(&self) -> &[u8] {
        &self.json[self.id_at..]
    }

    /// The complete text frame for message `id` of `epoch`: one allocation, shared by every
    /// recipient.
    pub fn frame(&self, id: u64, epoch: &str) -> Bytes {
        let mut digits = itoa::Buffer::new();
        ws::text_parts(&[
            self.head(),
            digits.format(id).as_bytes(),
            EPOCH_OPEN,
            epoch.as_bytes(),
            EPOCH_CLOSE,
            self.tail(),
        ])
    }
}

const EPOCH_OPEN: &[u8] = b",\"epoch\":\"";
const EPOCH_CLOSE: &[u8] = b"\"";

/// A `history` reply: `{"type":"history","room":…,"epoch":…,"messages":[…],"more":…}` built
/// from the messages' JSON texts, oldest first.
pub(crate) fn history_frame(
    room: &RoomName,
    epoch: &str,
    messages: &[Arc<Message>],
    more: bool,
) -> Bytes {
    let size: usize = messages.iter().map(|m| m.json().len() + 1).sum();
    let mut json = Vec::with_capacity(64 + size);
    json.extend_from_slice(b"{\"type\":\"history\",\"room\":");
    push_json_str(&mut json, room.as_str());
    json.extend_from_slice(b",\"epoch\":");
    push_json_str(&mut json, epoch);
    json.extend_from_slice(b",\"messages\":[");
    for (i, message) in messages.iter().enumerate() {
        if i > 0 {
            json.push(b',');
        }
        json.extend_from_slice(&message.json());
    }
    json.extend_from_slice(b"],\"more\":");
    json.extend_from_slice(if more { b"true" } else { b"false" });
    json.push(b'}');
    ws::text(&json)
}

/// A `search` reply: `{"type":"search","room":…,"query":…,"messages":[…],"cursor":…}`, the
/// messages newest first; `cursor` (null on the last page) asks for the next page.
pub(crate) fn search_frame(
    room: &RoomName,
    query: &str,
    messages: &[Arc<Message>],
    cursor: Option<&str>,
) -> Bytes {
    let mut json = b"{\"type\":\"search\",".to_vec();
    push_search_page(&mut json, room, query, messages, cursor);
    ws::text(&json)
}

/// A search page as one JSON object, `{"room":…,"query":…,"messages":[…],"cursor":…}`: what a
/// Socket.IO `search` is acked with. The messages are the native `message` objects, copied
/// from their encoded JSON.
pub(crate) fn search_json(
    room: &RoomName,
    query: &str,
    messages: &[Arc<Message>],
    cursor: Option<&str>,
) -> Vec<u8> {
    let mut json = b"{".to_vec();
    push_search_page(&mut json, room, query, messages, cursor);
    json
}

/// Appends `"room":…,"query":…,"messages":[…],"cursor":…}` (the object's fields and its
/// closing brace) to `json`.
fn push_search_page(
    json: &mut Vec<u8>,
    room: &RoomName,
    query: &str,
    messages: &[Arc<Message>],
    cursor: Option<&str>,
) {
    let size: usize = messages.iter().map(|m| m.json().len() + 1).sum();
    json.reserve(96 + query.len() + size);
    json.extend_from_slice(b"\"room\":");
    push_json_str(json, room.as_str());
    json.extend_from_slice(b",\"query\":");
    push_json_str(json, query);
    json.extend_from_slice(b",\"messages\":[");
    for (i, message) in messages.iter().enumerate() {
        if i > 0 {
            json.push(b',');
        }
        json.extend_from_slice(&message.json());
    }
    json.extend_from_slice(b"],\"cursor\":");
    match cursor {
        Some(cursor) => push_json_str(json, cursor),
        None => json.extend_from_slice(b"null"),
    }
    json.push(b'}');
}

fn push_json_str(out: &mut Vec<u8>, s: &str) {
    // Writing a str into a Vec cannot fail.
    let _ = serde_json::to_writer(&mut *out, s);
}

#[cfg(test)]
mod tests;
