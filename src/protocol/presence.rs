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
/// Redis presence script publishes).
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
    /// Decodes a change as the presence script publishes it.
    pub fn decode(json: &[u8]) -> Result<Self, serde_json::Error> {
        serde_json::from_slice(json)
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
    fn a_change_decodes_from_the_scripts_json() {
        let change =
            Change::decode(br#"{"room":"dev","user":"ann","joined":true,"since":5,"online":3}"#)
                .unwrap();
        assert_eq!(
            (change.user.as_str(), change.joined, change.online),
            ("ann", true, 3)
        );
        assert!(Change::decode(br#"{"room":"dev"}"#).is_err());
    }
}
