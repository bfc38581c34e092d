//! Presence from this node's hub alone: the embedded transport's (this node is every node),
//! and the Redis transport's when `redis.presence` is off (each node reports its own members).

use std::sync::Arc;

use crate::hub::{Change, Hub};
use crate::protocol::RoomName;
use crate::protocol::presence::{Member, Page};

/// Tells `room`'s members that `user`'s presence here changed; returns the users in the room.
pub(super) fn changed(hub: &Hub, room: &RoomName, user: &Arc<str>) -> usize {
    let online = hub.user_count(room.as_str());
    let change = match hub.local_user(room.as_str(), user) {
        Some(local) => Change::Joined {
            user: user.clone(),
            since: local.since,
        },
        None => Change::Left { user: user.clone() },
    };
    hub.record_presence(room, change, online);
    online
}

/// Up to `limit` of `room`'s members in name order, after the name `cursor`.
pub(super) fn page(hub: &Hub, room: &RoomName, cursor: Option<&str>, limit: usize) -> Page {
    let (online, page, more) = hub.users_page(room.as_str(), cursor, limit);
    let cursor = more
        .then(|| page.last().map(|(u, _)| u.to_string()))
        .flatten();
    Page {
        online,
        members: page
            .into_iter()
            .map(|(user, local)| Member {
                user,
                connections: local.connections as u64,
                since: local.since,
            })
            .collect(),
        cursor,
    }
}

/// Rooms listed per page of [`rooms`].
const ROOMS_PAGE: usize = 200;

/// This node's rooms with members and their users, in name order after `cursor`.
pub(super) fn rooms(hub: &Hub, cursor: Option<&str>) -> super::RoomList {
    let mut names = hub.room_names();
    names.sort_unstable();
    let start = cursor.map_or(0, |after| names.partition_point(|r| r.as_str() <= after));
    let rest = &names[start..];
    let page = &rest[..rest.len().min(ROOMS_PAGE)];
    let next = (rest.len() > page.len()).then(|| page[page.len() - 1].to_string());
    let rooms = page
        .iter()
        .map(|room| (room.clone(), hub.user_count(room.as_str())))
        .collect();
    (rooms, next)
}
