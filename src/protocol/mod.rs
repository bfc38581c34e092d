//! Wire formats, pure codecs that know nothing of connections. `native` is scalechat's JSON
//! protocol v1 (docs/protocol.md); `socketio` is Engine.IO v4 and Socket.IO v5
//! (docs/socketio.md); `frame` decodes and checks the WebSocket frames clients send; `ws`
//! builds the WebSocket frames the server sends. Names shared by every codec live here: room
//! and user names, the default room, and the stable error codes a client sees.

pub mod frame;
pub mod message;
pub mod native;
pub mod presence;
pub mod socketio;
pub mod ws;

use std::borrow::Borrow;
use std::fmt;
use std::sync::Arc;

use serde::{Serialize, Serializer};

/// Longest room name, in bytes.
pub(crate) const MAX_ROOM_LEN: usize = 64;
/// Longest display name, in characters.
pub(crate) const MAX_NAME_CHARS: usize = 32;
/// Longest client `ref`, in characters.
pub(crate) const MAX_REF_CHARS: usize = 64;

/// The room a connection starts in when it names none.
pub(crate) const DEFAULT_ROOM: &str = "general";

/// A validated room name: 1 to 64 of `A-Za-z0-9_.-`. Cheap to clone.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RoomName(Arc<str>);

impl RoomName {
    /// Validates `name`.
    pub fn new(name: &str) -> Result<Self, ProtocolError> {
        let valid = !name.is_empty()
            && name.len() <= MAX_ROOM_LEN
            && name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'));
        if valid {
            Ok(Self(name.into()))
        } else {
            Err(ProtocolError::new(
                ErrorCode::BadRoom,
                "room names are 1 to 64 of A-Z a-z 0-9 _ . -",
            ))
        }
    }

    /// The name as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The direct-message room of users `a` and `b` (in either order): `dm-` and 32 hex
    /// digits of a SHA-256 of the two names, so that no other pair of names can reach it.
    pub fn direct(a: &str, b: &str) -> Self {
        let (first, second) = if a <= b { (a, b) } else { (b, a) };
        let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
        // Length-prefixed, so that ("ab", "c") and ("a", "bc") differ.
        ctx.update(&(first.len() as u64).to_be_bytes());
        ctx.update(first.as_bytes());
        ctx.update(second.as_bytes());
        let digest = ctx.finish();
        let mut name = String::with_capacity(DIRECT_PREFIX.len() + 32);
        name.push_str(DIRECT_PREFIX);
        for byte in &digest.as_ref()[..16] {
            name.push_str(&format!("{byte:02x}"));
        }
        Self(name.into())
    }

    /// Whether this is a direct-message room's name (`dm-` and 32 hex digits): such names
    /// are reached only through [`RoomName::direct`].
    pub fn is_direct(&self) -> bool {
        self.0
            .strip_prefix(DIRECT_PREFIX)
            .is_some_and(|hex| hex.len() == 32 && hex.bytes().all(|b| b.is_ascii_hexdigit()))
    }
}

/// The room a `join` names: by its name, or the direct-message room with another user.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RoomRef {
    /// A room by name.
    Named(RoomName),
    /// The direct-message room of the joining user and this one.
    Direct(String),
}

/// The start of every direct-message room's name.
const DIRECT_PREFIX: &str = "dm-";

/// A room name, or a prefix followed by `*`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RoomPattern {
    prefix: String,
    wildcard: bool,
}

impl RoomPattern {
    /// Parses a pattern; `None` if it could match no valid room name.
    pub fn parse(text: &str) -> Option<Self> {
        let (prefix, wildcard) = match text.strip_suffix('*') {
            Some(prefix) => (prefix, true),
            None => (text, false),
        };
        let valid = prefix.is_empty() && wildcard || RoomName::new(prefix).is_ok();
        valid.then(|| Self {
            prefix: prefix.to_owned(),
            wildcard,
        })
    }

    /// Whether `room` matches; never a direct-message room.
    pub fn matches(&self, room: &RoomName) -> bool {
        if room.is_direct() {
            return false;
        }
        if self.wildcard {
            room.as_str().starts_with(&self.prefix)
        } else {
            room.as_str() == self.prefix
        }
    }
}

impl Borrow<str> for RoomName {
    fn borrow(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for RoomName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for RoomName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&*self.0, f)
    }
}

impl Serialize for RoomName {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.0)
    }
}

/// Checks a display name: 1 to 32 characters, not only spaces, no control characters and
/// no invisible format characters (bidi controls, zero-width spaces and joiners), which
/// could make one name look like another or reorder the text around it.
pub(crate) fn valid_user_name(name: &str) -> bool {
    let chars = name.chars().count();
    (1..=MAX_NAME_CHARS).contains(&chars)
        && !name.chars().any(|c| c.is_control() || is_format(c))
        && !name.trim().is_empty()
}

/// Unicode general category Cf (format), plus the line and paragraph separators (Zl, Zp).
/// Cf ranges from the Unicode Character Database 16.0, `extracted/DerivedGeneralCategory.txt`.
const FORMAT_CHARS: &[(char, char)] = &[
    ('\u{ad}', '\u{ad}'),
    ('\u{600}', '\u{605}'),
    ('\u{61c}', '\u{61c}'),
    ('\u{6dd}', '\u{6dd}'),
    ('\u{70f}', '\u{70f}'),
    ('\u{890}', '\u{891}'),
    ('\u{8e2}', '\u{8e2}'),
    ('\u{180e}', '\u{180e}'),
    ('\u{200b}', '\u{200f}'),
    ('\u{2028}', '\u{2029}'), // Zl, Zp
    ('\u{202a}', '\u{202e}'),
    ('\u{2060}', '\u{2064}'),
    ('\u{2066}', '\u{206f}'),
    ('\u{feff}', '\u{feff}'),
    ('\u{fff9}', '\u{fffb}'),
    ('\u{110bd}', '\u{110bd}'),
    ('\u{110cd}', '\u{110cd}'),
    ('\u{13430}', '\u{1343f}'),
    ('\u{1bca0}', '\u{1bca3}'),
    ('\u{1d173}', '\u{1d17a}'),
    ('\u{e0001}', '\u{e0001}'),
    ('\u{e0020}', '\u{e007f}'),
];

fn is_format(c: char) -> bool {
    // Below U+00AD nothing is Cf; names are mostly ASCII, so most characters stop here.
    c >= '\u{ad}' && FORMAT_CHARS.iter().any(|&(lo, hi)| (lo..=hi).contains(&c))
}

/// The stable codes of `error` frames. Clients may match on them; never rename one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorCode {
    /// The frame is not a JSON object.
    BadJson,
    /// `type` names no request this server knows (a missing `type` is `BadField`).
    UnknownType,
    /// A field is missing or has the wrong type.
    BadField,
    /// The message is empty or only white space.
    EmptyMessage,
    /// The message is longer than `max_message_chars`.
    MessageTooLong,
    /// A room name is not 1 to 64 of `A-Za-z0-9_.-`.
    BadRoom,
    /// `ref` is longer than 64 characters.
    BadRef,
    /// The connection is not in that room.
    NotJoined,
    /// Joining would exceed `max_rooms_per_connection`.
    TooManyRooms,
    /// Sent faster than `messages_per_second` allows; the message was not delivered.
    RateLimited,
    /// The message could not be accepted right now (transport down); it was not delivered.
    Unavailable,
    /// The user may not join that room (not granted by the token, the public rooms or the
    /// join hook; a direct-message room of others).
    Forbidden,
    /// The user may read that room but not send to it.
    ReadOnly,
}

impl ErrorCode {
    /// Every code, in declaration order (`code as usize` is its index).
    pub(crate) const ALL: [ErrorCode; 13] = [
        Self::BadJson,
        Self::UnknownType,
        Self::BadField,
        Self::EmptyMessage,
        Self::MessageTooLong,
        Self::BadRoom,
        Self::BadRef,
        Self::NotJoined,
        Self::TooManyRooms,
        Self::RateLimited,
        Self::Unavailable,
        Self::Forbidden,
        Self::ReadOnly,
    ];

    /// The code as it appears on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::BadJson => "bad_json",
            Self::UnknownType => "unknown_type",
            Self::BadField => "bad_field",
            Self::EmptyMessage => "empty_message",
            Self::MessageTooLong => "message_too_long",
            Self::BadRoom => "bad_room",
            Self::BadRef => "bad_ref",
            Self::NotJoined => "not_joined",
            Self::TooManyRooms => "too_many_rooms",
            Self::RateLimited => "rate_limited",
            Self::Unavailable => "unavailable",
            Self::Forbidden => "forbidden",
            Self::ReadOnly => "read_only",
        }
    }
}

/// A refused client frame: what the client is told in an `error` frame.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{}: {message}", code.as_str())]
pub struct ProtocolError {
    /// The stable code.
    pub code: ErrorCode,
    /// A sentence for people.
    pub message: String,
    /// The client's `ref` of the refused frame, when it had one.
    pub reference: Option<String>,
}

impl ProtocolError {
    /// An error without a `ref`.
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
            reference: None,
        }
    }

    /// The same error, echoing the client's `ref`.
    pub(crate) fn with_ref(mut self, reference: Option<&str>) -> Self {
        self.reference = reference.map(str::to_owned);
        self
    }
}
