//! The API's endpoints: post to a room, read its history and members, list rooms, disconnect
//! a user.

use std::sync::Arc;

use hyper::StatusCode;
use serde_json::{Value, json};

use super::ApiError;
use crate::node::Node;
use crate::protocol::native::{MAX_HISTORY_PAGE, check_message};
use crate::protocol::presence::{MAX_CURSOR_LEN, MAX_PAGE, page_json};
use crate::protocol::{ErrorCode, MAX_REF_CHARS, ProtocolError, RoomName, valid_user_name};
use crate::transport::TransportError;

fn bad(message: impl Into<String>) -> ApiError {
    ProtocolError::new(ErrorCode::BadField, message).into()
}

fn room(name: &str) -> Result<RoomName, ApiError> {
    Ok(RoomName::new(name)?)
}

fn unavailable(e: &TransportError) -> ApiError {
    ApiError::new(
        StatusCode::SERVICE_UNAVAILABLE,
        ErrorCode::Unavailable.as_str(),
        e.to_string(),
    )
}

/// The value of `key` in a query string.
fn param(query: &str, key: &str) -> Option<String> {
    form_urlencoded::parse(query.as_bytes())
        .find(|(k, _)| k == key)
        .map(|(_, v)| v.into_owned())
}

/// A whole-number parameter within `range`, or `default`.
fn number(
    query: &str,
    key: &str,
    default: u64,
    range: std::ops::RangeInclusive<u64>,
) -> Result<u64, ApiError> {
    match param(query, key) {
        None => Ok(default),
        Some(v) => v
            .parse::<u64>()
            .ok()
            .filter(|n| range.contains(n))
            .ok_or_else(|| {
                bad(format!(
                    "`{key}` must be a whole number from {} to {}",
                    range.start(),
                    range.end()
                ))
            }),
    }
}

/// `POST /rooms/{room}/messages` `{"message", "user"?, "ref"?}`: published as a client's
/// `send` is; answers the id.
pub(super) async fn post(node: &Arc<Node>, name: &str, body: &Value) -> Result<Value, ApiError> {
    let room = room(name)?;
    let field = |key: &str| match body.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.as_str())),
        Some(_) => Err(bad(format!("`{key}` must be a string"))),
    };
    let text = field("message")?.ok_or_else(|| bad("`message` is required"))?;
    let user = field("user")?.unwrap_or(&node.config.api.system_name);
    if !valid_user_name(user) {
        return Err(bad("`user` must be a valid display name"));
    }
    let reference = field("ref")?;
    if reference.is_some_and(|r| r.chars().count() > MAX_REF_CHARS) {
        return Err(
            ProtocolError::new(ErrorCode::BadRef, "`ref` must be at most 64 characters").into(),
        );
    }
    check_message(text, node.live().limits.max_message_chars)?;
    let user: Arc<str> = user.into();
    let published = node
        .publish(room.clone(), &user, text.to_owned(), reference)
        .await?;
    let mut answer = json!({"room": room, "id": published.id});
    if published.duplicate {
        answer["duplicate"] = true.into();
    }
    Ok(answer)
}

/// `GET /rooms/{room}/messages?before=&limit=`: a page of the room's history, oldest first
/// (empty for a room that never had a message).
pub(super) async fn history(node: &Arc<Node>, name: &str, query: &str) -> Result<Value, ApiError> {
    let room = room(name)?;
    let before = param(query, "before")
        .map(|b| {
            b.parse::<u64>()
                .map_err(|_| bad("`before` must be a whole number"))
        })
        .transpose()?;
    let limit = number(query, "limit", 50, 1..=MAX_HISTORY_PAGE as u64)? as usize;
    let page = node
        .page(&room, before, limit)
        .await
        .map_err(|e| unavailable(&e))?;
    let messages: Vec<Value> = page
        .messages
        .iter()
        .filter_map(|m| serde_json::from_slice(&m.json()).ok())
        .collect();
    Ok(json!({"room": room, "epoch": page.epoch, "messages": messages, "more": page.more}))
}

/// `GET /rooms/{room}/presence?cursor=&limit=`: a page of the room's members.
pub(super) async fn presence(node: &Arc<Node>, name: &str, query: &str) -> Result<Value, ApiError> {
    let room = room(name)?;
    let cursor = param(query, "cursor");
    if cursor.as_ref().is_some_and(|c| c.len() > MAX_CURSOR_LEN) {
        return Err(bad("`cursor` must be one a presence page returned"));
    }
    let limit = number(query, "limit", 100, 1..=MAX_PAGE as u64)? as usize;
    let page = node
        .transport
        .presence_page(&room, cursor.as_deref(), limit)
        .await
        .map_err(|e| match e {
            TransportError::BadRequest(why) => bad(why),
            e => unavailable(&e),
        })?;
    Ok(page_json(&room, &page))
}

/// `GET /rooms?cursor=`: rooms with members (on every node where presence is shared).
pub(super) async fn list(node: &Arc<Node>, query: &str) -> Result<Value, ApiError> {
    let cursor = param(query, "cursor");
    if cursor.as_ref().is_some_and(|c| c.len() > MAX_CURSOR_LEN) {
        return Err(bad("`cursor` must be one a rooms page returned"));
    }
    let (rooms, next) = node
        .transport
        .rooms(cursor.as_deref())
        .await
        .map_err(|e| match e {
            TransportError::BadRequest(why) => bad(why),
            e => unavailable(&e),
        })?;
    let rooms: Vec<Value> = rooms
        .into_iter()
        .map(|(room, online)| json!({"room": room, "online": online}))
        .collect();
    Ok(json!({"rooms": rooms, "cursor": next}))
}

/// `POST /users/{user}/disconnect`: closes the user's connections on every node (close code
/// 4003).
pub(super) async fn disconnect(node: &Arc<Node>, user: &str) -> Result<Value, ApiError> {
    if !valid_user_name(user) {
        return Err(bad("the user must be a valid display name"));
    }
    let reached = node
        .transport
        .disconnect_user(user)
        .await
        .map_err(|e| unavailable(&e))?;
    Ok(json!({"user": user, "reached": reached}))
}
