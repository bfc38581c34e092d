//! Presence on the wire: the events a member can ask for when it joins (`member_joined`,
//! `member_left`: a user's first connection entered the room, their last one left), the page a
//! `presence` request answers, in both protocols' encodings (docs/protocol.md,
//! docs/socketio.md); and the change one node tells the others through Redis.

use std::sync::Arc;

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use serde_json::json;

use super::message::Codec;
use super::{RoomName, socketio, ws};

/// A user in a room's member list.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Member {
    /// The display name.
    pub user: Arc<str>,
    /// Their connections in the room, over every node.
    pub connections: u64,
    /// When their first connection entered, in milliseconds since the Unix epoch.
    pub since: u64,
}

/// A user who entered a room, in a `member_joined` event.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Arrival {
    /// The display name.
    pub user: Arc<str>,
    /// When their first connection entered, in milliseconds since the Unix epoch.
    pub since: u64,
}

/// A user who left a room, in a `member_left` event.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Departure {
    /// The display name.
    pub user: Arc<str>,
}

/// One page of a room's members.
#[derive(Debug, Clone, Default)]
pub struct Page {
    /// Users in the room, over every node.
    pub online: usize,
    /// This page's members.
    pub members: Vec<Member>,
    /// Where the next page starts; `None` on the last.
    pub cursor: Option<String>,
}

/// The largest `cursor` a client may send back (the server's own are much shorter).
pub const MAX_CURSOR_LEN: usize = 128;

/// Most members one `presence` page lists.
pub const MAX_PAGE: usize = 200;

/// The `presence` reply (native) or ack (Socket.IO) for a page of `room`'s members.
pub fn page_json(room: &RoomName, page: &Page) -> serde_json::Value {
    json!({
        "room": room,
        "online": page.online,
        "members": page.members,
        "cursor": page.cursor,
    })
}

/// The native `presence` reply.
pub fn page_frame(room: &RoomName, page: &Page) -> Bytes {
    let mut value = page_json(room, page);
    value["type"] = "presence".into();
    ws::text(value.to_string().as_bytes())
}

/// The frame of a `member_joined` (`arrivals`) or `member_left` (`departures`) event in
/// `codec`.
pub fn event_frame<T: Serialize>(
    codec: Codec,
    name: &'static str,
    room: &RoomName,
    online: usize,
    members: &[T],
) -> Bytes {
    let mut value = json!({ "room": room, "online": online, "members": members });
    match codec {
        Codec::Native => {
            value["type"] = name.into();
            ws::text(value.to_string().as_bytes())
        }
        Codec::SocketIo => socketio::event(name, &value),
    }
}

/// A change of one user's presence in a room, as one node tells the others (the JSON the
/// Redis presence script publishes: an array of these, one message per script run).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct Change {
    /// The room.
    pub room: String,
    /// The user.
    pub user: String,
    /// `true`: their first connection entered; `false`: their last one left.
    pub joined: bool,
    /// When they entered (joins only).
    #[serde(default)]
    pub since: u64,
    /// Users in the room after the change.
    pub online: usize,
}

impl Change {
    /// Decodes the changes one presence script run published: an array of changes, or one
    /// change on its own.
    pub fn decode_all(json: &[u8]) -> Result<Vec<Self>, serde_json::Error> {
        // Told apart by the first byte rather than by an untagged enum, which would parse
        // every message twice (into a generic value first).
        if json.trim_ascii_start().starts_with(b"[") {
            serde_json::from_slice(json)
        } else {
            serde_json::from_slice(json).map(|change| vec![change])
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_and_pages_encode_in_both_codecs() {
        let room = RoomName::new("dev").unwrap();
        let arrivals = [Arrival {
            user: "ann".into(),
            since: 5,
        }];
        let native = event_frame(Codec::Native, "member_joined", &room, 2, &arrivals);
        let value: serde_json::Value = serde_json::from_slice(&ws::text_payload(&native)).unwrap();
        assert_eq!(
            value,
            json!({"type":"member_joined","room":"dev","online":2,
                "members":[{"user":"ann","since":5}]})
        );
        let sio = event_frame(
            Codec::SocketIo,
            "member_left",
            &room,
            1,
            &[Departure { user: "ann".into() }],
        );
        assert_eq!(
            &ws::text_payload(&sio)[..],
            br#"42["member_left",{"members":[{"user":"ann"}],"online":1,"room":"dev"}]"#
        );
        let page = Page {
            online: 1,
            members: vec![Member {
                user: "ann".into(),
                connections: 2,
                since: 5,
            }],
            cursor: None,
        };
        let value: serde_json::Value =
            serde_json::from_slice(&ws::text_payload(&page_frame(&room, &page))).unwrap();
        assert_eq!(
            value,
            json!({"type":"presence","room":"dev","online":1,"cursor":null,
                "members":[{"user":"ann","connections":2,"since":5}]})
        );
    }

    #[test]
    fn changes_decode_from_the_scripts_json() {
        let one = br#"{"room":"dev","user":"ann","joined":true,"since":5,"online":3}"#;
        let changes = Change::decode_all(one).unwrap();
        assert_eq!(
            changes
                .iter()
                .map(|c| (c.user.as_str(), c.joined, c.online))
                .collect::<Vec<_>>(),
            [("ann", true, 3)]
        );
        let many = br#"[{"room":"dev","user":"ann","joined":true,"since":5,"online":3},
            {"room":"dev","user":"bob","joined":false,"online":2}]"#;
        let changes = Change::decode_all(many).unwrap();
        assert_eq!(
            changes
                .iter()
                .map(|c| (c.user.as_str(), c.joined, c.since, c.online))
                .collect::<Vec<_>>(),
            [("ann", true, 5, 3), ("bob", false, 0, 2)]
        );
        assert!(Change::decode_all(br#"{"room":"dev"}"#).is_err());
        assert!(Change::decode_all(br#"[{"room":"dev"}]"#).is_err());
    }
}
