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

/// A change of one user's presence in a room, as one node tells the others.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Change {
    /// The user.
    pub user: String,
    /// `true`: their first connection entered; `false`: their last one left.
    pub joined: bool,
    /// When they entered (joins only).
    pub since: u64,
    /// Users in the room after the change.
    pub online: usize,
}

/// The changes of one room that one presence script run published, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Changes {
    /// The room.
    pub room: String,
    /// Its changes; never empty.
    pub changes: Vec<Change>,
}

/// A presence message that is not one a presence script publishes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Malformed(&'static str);

impl std::fmt::Display for Malformed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "malformed presence changes: {}", self.0)
    }
}

impl std::error::Error for Malformed {}

/// The JSON form of a change, which nodes of earlier versions publish (one change, or an
/// array of them).
#[derive(Deserialize)]
struct JsonChange {
    room: String,
    user: String,
    joined: bool,
    #[serde(default)]
    since: u64,
    online: usize,
}

impl Changes {
    /// Decodes what one presence script run published: the room on the first line, then a
    /// line per change, `+user<TAB>since<TAB>online` for a join, `-user<TAB>online` for a
    /// departure. (User names hold no control characters, room names no tab or newline.)
    /// The JSON that earlier versions publish is read as well.
    pub fn decode(payload: &[u8]) -> Result<Vec<Self>, Malformed> {
        if matches!(payload.trim_ascii_start().first(), Some(b'[' | b'{')) {
            return Self::decode_json(payload);
        }
        let text = std::str::from_utf8(payload).map_err(|_| Malformed("not UTF-8"))?;
        let mut lines = text.split('\n');
        let room = lines
            .next()
            .filter(|r| !r.is_empty())
            .ok_or(Malformed("no room"))?;
        let changes = lines
            .map(Self::decode_line)
            .collect::<Result<Vec<_>, _>>()?;
        if changes.is_empty() {
            return Err(Malformed("no change"));
        }
        Ok(vec![Self {
            room: room.to_owned(),
            changes,
        }])
    }

    fn decode_line(line: &str) -> Result<Change, Malformed> {
        fn number<T: std::str::FromStr>(field: Option<&str>) -> Result<T, Malformed> {
            field
                .and_then(|f| f.parse().ok())
                .ok_or(Malformed("bad number"))
        }
        let (joined, rest) = match line.as_bytes().first() {
            Some(b'+') => (true, &line[1..]),
            Some(b'-') => (false, &line[1..]),
            _ => return Err(Malformed("a change is neither + nor -")),
        };
        let mut fields = rest.split('\t');
        let user = fields
            .next()
            .filter(|u| !u.is_empty())
            .ok_or(Malformed("no user"))?;
        let since = if joined { number(fields.next())? } else { 0 };
        let online = number(fields.next())?;
        if fields.next().is_some() {
            return Err(Malformed("too many fields"));
        }
        Ok(Change {
            user: user.to_owned(),
            joined,
            since,
            online,
        })
    }

    fn decode_json(json: &[u8]) -> Result<Vec<Self>, Malformed> {
        let all: Vec<JsonChange> = if json.trim_ascii_start().starts_with(b"[") {
            serde_json::from_slice(json)
        } else {
            serde_json::from_slice(json).map(|change| vec![change])
        }
        .map_err(|_| Malformed("bad JSON"))?;
        let mut runs: Vec<Self> = Vec::new();
        for c in all {
            let change = Change {
                user: c.user,
                joined: c.joined,
                since: c.since,
                online: c.online,
            };
            match runs.last_mut() {
                Some(run) if run.room == c.room => run.changes.push(change),
                _ => runs.push(Self {
                    room: c.room,
                    changes: vec![change],
                }),
            }
        }
        Ok(runs)
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

    fn summary(runs: &[Changes]) -> Vec<(&str, &str, bool, u64, usize)> {
        runs.iter()
            .flat_map(|r| {
                r.changes.iter().map(|c| {
                    (
                        r.room.as_str(),
                        c.user.as_str(),
                        c.joined,
                        c.since,
                        c.online,
                    )
                })
            })
            .collect()
    }

    #[test]
    fn changes_decode_from_the_scripts_lines() {
        let runs = Changes::decode(b"dev\n+ann\t5\t3\n-bob \"b\"\t2").unwrap();
        assert_eq!(
            summary(&runs),
            [
                ("dev", "ann", true, 5, 3),
                ("dev", "bob \"b\"", false, 0, 2)
            ]
        );
        for bad in [
            &b""[..],
            b"dev",
            b"dev\n",
            b"dev\n*ann\t1",
            b"dev\n+ann\t1",
            b"dev\n+\t5\t1",
            b"dev\n-ann\tx",
            b"dev\n-ann\t1\t2",
            b"dev\n+ann\t5\t-1",
            b"\xff\n-ann\t1",
        ] {
            assert!(
                Changes::decode(bad).is_err(),
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
    }

    #[test]
    fn changes_of_earlier_versions_decode_from_json() {
        let one = br#"{"room":"dev","user":"ann","joined":true,"since":5,"online":3}"#;
        assert_eq!(
            summary(&Changes::decode(one).unwrap()),
            [("dev", "ann", true, 5, 3)]
        );
        let many = br#"[{"room":"dev","user":"ann","joined":true,"since":5,"online":3},
            {"room":"dev","user":"bob","joined":false,"online":2},
            {"room":"ops","user":"cy","joined":false,"online":0}]"#;
        let runs = Changes::decode(many).unwrap();
        assert_eq!(runs.len(), 2);
        assert_eq!(
            summary(&runs),
            [
                ("dev", "ann", true, 5, 3),
                ("dev", "bob", false, 0, 2),
                ("ops", "cy", false, 0, 0)
            ]
        );
        assert!(Changes::decode(br#"{"room":"dev"}"#).is_err());
        assert!(Changes::decode(br#"[{"room":"dev"}]"#).is_err());
    }
}
