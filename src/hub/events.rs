//! Presence events, gathered: the changes of each room's members (a user's first connection
//! entered, their last one left) are kept per room for a short interval, a user's change
//! replacing their earlier one, and then sent as at most one `member_joined` and one
//! `member_left` frame per room to the members that asked for them. A join storm into a big
//! room costs each member a few frames, not one per joiner.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};

use crate::protocol::RoomName;
use crate::protocol::presence::{Arrival, Departure};

/// This node's connections of one user in one room.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LocalUser {
    /// Connections in the room.
    pub connections: usize,
    /// When the first of them entered, in milliseconds since the Unix epoch.
    pub since: u64,
}

/// A change of a room's members, as this node learned it (locally or from another node).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    /// The user's first connection entered, at `since`.
    Joined {
        /// The user.
        user: Arc<str>,
        /// When, in milliseconds since the Unix epoch.
        since: u64,
    },
    /// The user's last connection left.
    Left {
        /// The user.
        user: Arc<str>,
    },
}

/// One room's changes since the last flush.
#[derive(Debug, Default)]
struct Pending {
    /// Per user, the change to announce: `Some(since)` joined, `None` left.
    changes: HashMap<Arc<str>, Option<u64>>,
    online: usize,
}

/// The changes waiting for the next flush, per room.
#[derive(Debug, Default)]
pub(super) struct PendingEvents {
    rooms: Mutex<HashMap<RoomName, Pending>>,
}

/// What one room's flush announces.
#[derive(Debug, Default, PartialEq, Eq)]
pub(super) struct Announcement {
    pub(super) joined: Vec<Arrival>,
    pub(super) left: Vec<Departure>,
    pub(super) online: usize,
}

impl PendingEvents {
    /// Records `change` of `room`, after which `online` users are in it. A user who joins
    /// and leaves within one interval is not announced at all; one who leaves and comes back
    /// is not announced either (they are still there).
    pub(super) fn record(&self, room: &RoomName, change: Change, online: usize) {
        let mut rooms = self.rooms.lock().unwrap_or_else(PoisonError::into_inner);
        let pending = rooms.entry(room.clone()).or_default();
        pending.online = online;
        match change {
            Change::Joined { user, since } => match pending.changes.get(&user) {
                Some(None) => {
                    pending.changes.remove(&user);
                }
                _ => {
                    pending.changes.insert(user, Some(since));
                }
            },
            Change::Left { user } => match pending.changes.get(&user) {
                Some(Some(_)) => {
                    pending.changes.remove(&user);
                }
                _ => {
                    pending.changes.insert(user, None);
                }
            },
        }
    }

    /// Takes every room's changes, as announcements.
    pub(super) fn take(&self) -> Vec<(RoomName, Announcement)> {
        let rooms = std::mem::take(&mut *self.rooms.lock().unwrap_or_else(PoisonError::into_inner));
        rooms
            .into_iter()
            .map(|(room, pending)| {
                let mut announcement = Announcement {
                    online: pending.online,
                    ..Announcement::default()
                };
                for (user, change) in pending.changes {
                    match change {
                        Some(since) => announcement.joined.push(Arrival { user, since }),
                        None => announcement.left.push(Departure { user }),
                    }
                }
                announcement.joined.sort_by(|a, b| a.user.cmp(&b.user));
                announcement.left.sort_by(|a, b| a.user.cmp(&b.user));
                (room, announcement)
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn joined(user: &str) -> Change {
        Change::Joined {
            user: user.into(),
            since: 7,
        }
    }

    fn left(user: &str) -> Change {
        Change::Left { user: user.into() }
    }

    #[test]
    fn changes_within_an_interval_are_one_announcement_per_room() {
        let pending = PendingEvents::default();
        let dev = RoomName::new("dev").unwrap();
        pending.record(&dev, joined("b"), 1);
        pending.record(&dev, joined("a"), 2);
        pending.record(&dev, left("c"), 1);
        // In and out again: never announced. Out and in again: still there.
        pending.record(&dev, joined("d"), 2);
        pending.record(&dev, left("d"), 1);
        pending.record(&dev, left("e"), 0);
        pending.record(&dev, joined("e"), 2);
        let taken = pending.take();
        assert_eq!(taken.len(), 1);
        let (room, announcement) = &taken[0];
        assert_eq!(room, &dev);
        let users = |list: Vec<&Arc<str>>| list.iter().map(|u| u.to_string()).collect::<Vec<_>>();
        assert_eq!(
            users(announcement.joined.iter().map(|a| &a.user).collect()),
            ["a", "b"]
        );
        assert_eq!(
            users(announcement.left.iter().map(|d| &d.user).collect()),
            ["c"]
        );
        assert_eq!(announcement.online, 2);
        assert!(pending.take().is_empty());
    }
}
