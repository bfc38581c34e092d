//! The hub: which local connections are in which room, and delivery of an encoded frame to
//! every local member of a room.
//!
//! Everything here is synchronous and never awaits a member: [`Hub::deliver`] clones the
//! message's frame (a reference-count bump) into each member's bounded [`Outbox`]. A member
//! whose outbox is full is closed as a slow consumer by the outbox itself and skipped.
//!
//! Members read chat messages in a [`Codec`]; each gets the [`Message`]'s frame in its codec,
//! which the message builds at most once per node and shares. A member that is joining gets
//! the room's traffic in a bounded [`Staging`] queue until its history is sent.
//!
//! The hub also counts each room's local members by user, and sends the room's presence
//! events, gathered per interval ([`events`]), to the members that asked for them.

mod events;
mod staging;

use std::collections::{BinaryHeap, HashMap, VecDeque};
use std::fmt;
use std::sync::{Arc, RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::time::{SystemTime, UNIX_EPOCH};

use bytes::Bytes;

use self::events::PendingEvents;
pub use self::events::{Change, LocalUser};
pub use self::staging::{Staged, Staging};
use crate::metrics::Metrics;
use crate::outbox::{Outbox, Refused};
use crate::protocol::RoomName;
use crate::protocol::message::{Codec, Message};
use crate::protocol::presence::event_frame;

/// A connection's id, unique within one node's lifetime.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ConnId(pub u64);

impl fmt::Display for ConnId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:x}", self.0)
    }
}

/// A local member of a room: who, where its frames go, and in which form.
#[derive(Debug)]
struct Member {
    /// Its connection's queue.
    outbox: Arc<Outbox>,
    /// While it joins: where the room's traffic is kept until its history is sent
    /// ([`Hub::promote`] moves it to the outbox).
    staging: Option<Arc<Staging>>,
    codec: Codec,
    user: Arc<str>,
    /// Sent the room's presence events.
    presence: bool,
}

/// A room's local members, by connection and by user.
#[derive(Debug, Default)]
struct Room {
    members: HashMap<ConnId, Member>,
    users: HashMap<Arc<str>, LocalUser>,
    /// Members sent presence events.
    watchers: usize,
}

type Rooms = HashMap<RoomName, Room>;

/// Who joins a room.
#[derive(Debug, Clone)]
pub struct Joiner {
    /// The connection.
    pub conn: ConnId,
    /// The connection's queue.
    pub outbox: Arc<Outbox>,
    /// The user it is signed in as.
    pub user: Arc<str>,
    /// How it reads chat messages.
    pub codec: Codec,
    /// Whether it is sent the room's presence events.
    pub presence: bool,
}

/// Result of a join or leave, as seen by this node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Membership {
    /// Local members (connections) of the room after the change.
    pub online: usize,
    /// The connection is the room's first local member (join) or was its last (leave): the
    /// node should subscribe to the room or unsubscribe.
    pub first_or_last: bool,
    /// The connection is its user's first local one in the room (join) or was their last
    /// (leave).
    pub user_first_or_last: bool,
}

/// What one delivery did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Delivered {
    /// Members the frame was queued for.
    pub queued: usize,
    /// Members disconnected as slow consumers by this delivery.
    pub slow: usize,
}

/// Rooms and their local members.
#[derive(Debug, Default)]
pub struct Hub {
    // Read-locked for delivery (deliveries run in parallel), write-locked for the O(1) join
    // and leave. Never held across an await.
    rooms: RwLock<Rooms>,
    metrics: Arc<Metrics>,
    presence: PendingEvents,
}

impl Hub {
    /// An empty hub counting rooms and deliveries in `metrics`.
    pub(crate) fn with_metrics(metrics: Arc<Metrics>) -> Self {
        Self {
            metrics,
            ..Self::default()
        }
    }

    fn read(&self) -> RwLockReadGuard<'_, Rooms> {
        // Poisoning needs a panic under the lock; the maps stay consistent regardless.
        self.rooms.read().unwrap_or_else(|e| e.into_inner())
    }

    fn write(&self) -> RwLockWriteGuard<'_, Rooms> {
        self.rooms.write().unwrap_or_else(|e| e.into_inner())
    }

    /// Adds `joiner` to `room` with a `staging` queue that keeps the room's live traffic
    /// while the connection is sent the room's history; [`Hub::promote`] ends the staging.
    /// Joining a room twice is harmless.
    pub fn join_staged(
        &self,
        room: &RoomName,
        joiner: &Joiner,
        staging: &Arc<Staging>,
    ) -> Membership {
        let mut rooms = self.write();
        let entry = rooms.entry(room.clone()).or_default();
        let first_or_last = entry.members.is_empty();
        if first_or_last {
            self.metrics.rooms.inc();
        }
        let member = Member {
            outbox: joiner.outbox.clone(),
            staging: Some(staging.clone()),
            codec: joiner.codec,
            user: joiner.user.clone(),
            presence: joiner.presence,
        };
        if let Some(old) = entry.members.insert(joiner.conn, member) {
            entry.forget(&old); // joined again: counted once
        }
        entry.watchers += usize::from(joiner.presence);
        let user = entry.users.entry(joiner.user.clone()).or_insert(LocalUser {
            connections: 0,
            since: now_ms(),
        });
        user.connections += 1;
        Membership {
            online: entry.members.len(),
            first_or_last,
            user_first_or_last: user.connections == 1,
        }
    }

    /// Ends a staged join: from now on `room`'s frames go to the member's outbox. Under the
    /// lock, so nothing is delivered meanwhile, `flush` gets what was staged (oldest first),
    /// or `None` if the staging overflowed. Returns `false` if `conn` is no longer in `room`.
    pub fn promote(
        &self,
        room: &str,
        conn: ConnId,
        flush: impl FnOnce(Option<VecDeque<Staged>>),
    ) -> bool {
        let mut rooms = self.write();
        let Some(entry) = rooms.get_mut(room).and_then(|r| r.members.get_mut(&conn)) else {
            return false;
        };
        if let Some(staging) = entry.staging.take() {
            flush(staging.take());
        }
        true
    }

    /// Closes every local connection of `user` (in any room) with `code` and `reason`;
    /// returns how many.
    pub(crate) fn close_user(&self, user: &str, code: u16, reason: &str) -> usize {
        let rooms = self.read();
        let mut outboxes: Vec<&Arc<Outbox>> = rooms
            .values()
            .flat_map(|r| r.members.values())
            .filter(|m| &*m.user == user)
            .map(|m| &m.outbox)
            .collect();
        outboxes.sort_by_key(|o| Arc::as_ptr(o));
        outboxes.dedup_by_key(|o| Arc::as_ptr(o));
        for outbox in &outboxes {
            outbox.close(code, reason, true);
        }
        outboxes.len()
    }

    /// Removes `conn` from `room`; `None` if it was not a member.
    pub(crate) fn leave(&self, room: &str, conn: ConnId) -> Option<Membership> {
        let mut rooms = self.write();
        let entry = rooms.get_mut(room)?;
        let member = entry.members.remove(&conn)?;
        let user_first_or_last = entry.forget(&member);
        let online = entry.members.len();
        if online == 0 {
            rooms.remove(room);
            self.metrics.rooms.dec();
        }
        Some(Membership {
            online,
            first_or_last: online == 0,
            user_first_or_last,
        })
    }

    /// The hub's own copy of `room`'s name, while it has local members: a member keeps this
    /// one rather than the copy it parsed from its request, so the name is held once.
    pub(crate) fn name(&self, room: &str) -> Option<RoomName> {
        self.read()
            .get_key_value(room)
            .map(|(name, _)| name.clone())
    }

    /// Local members (connections) of `room`.
    pub fn members(&self, room: &str) -> usize {
        self.read().get(room).map_or(0, |r| r.members.len())
    }

    /// This node's users in `room`.
    pub(crate) fn user_count(&self, room: &str) -> usize {
        self.read().get(room).map_or(0, |r| r.users.len())
    }

    /// This node's users in `room`, by name.
    pub(crate) fn local_users(&self, room: &str) -> Vec<(Arc<str>, LocalUser)> {
        let rooms = self.read();
        let users = rooms.get(room).map(|r| &r.users);
        users
            .into_iter()
            .flatten()
            .map(|(user, local)| (user.clone(), *local))
            .collect()
    }

    /// A page of `room`'s local users: the room's user count, up to `limit` users in name
    /// order after `after`, and whether more follow. Keeps only the page while it looks
    /// through the room, so a page of a big room costs one pass and `limit` clones.
    pub(crate) fn users_page(
        &self,
        room: &str,
        after: Option<&str>,
        limit: usize,
    ) -> (usize, Vec<(Arc<str>, LocalUser)>, bool) {
        let rooms = self.read();
        let Some(users) = rooms.get(room).map(|r| &r.users) else {
            return (0, Vec::new(), false);
        };
        // The `limit + 1` first names after `after`: the page, and whether one follows it.
        let keep = limit.saturating_add(1);
        let mut first: BinaryHeap<&str> = BinaryHeap::with_capacity(keep.min(users.len()));
        for name in users.keys().map(|u| &**u) {
            if after.is_some_and(|after| name <= after) {
                continue;
            }
            if first.len() < keep {
                first.push(name);
            } else if let Some(mut last) = first.peek_mut()
                && name < *last
            {
                *last = name;
            }
        }
        let more = first.len() > limit;
        let mut names = first.into_sorted_vec();
        names.truncate(limit);
        let page = names
            .into_iter()
            .filter_map(|name| users.get_key_value(name))
            .map(|(user, local)| (user.clone(), *local))
            .collect();
        (users.len(), page, more)
    }

    /// This node's connections of `user` in `room`.
    pub(crate) fn local_user(&self, room: &str, user: &str) -> Option<LocalUser> {
        self.read().get(room)?.users.get(user).copied()
    }

    /// The rooms with local members.
    pub(crate) fn room_names(&self) -> Vec<RoomName> {
        self.read().keys().cloned().collect()
    }

    /// A local member of `room` asked for presence events.
    pub(crate) fn presence_watched(&self, room: &str) -> bool {
        self.read().get(room).is_some_and(|r| r.watchers > 0)
    }

    /// Records a change of `room`'s members (after which `online` users are in it), for the
    /// next [`Hub::flush_presence`]; ignored where no local member asked for presence events.
    pub(crate) fn record_presence(&self, room: &RoomName, change: Change, online: usize) {
        if self.presence_watched(room.as_str()) {
            self.presence.record(room, change, online);
        }
    }

    /// Sends the recorded presence changes: per room, at most one `member_joined` and one
    /// `member_left` frame to each member that asked for them, each encoded once per codec.
    pub(crate) fn flush_presence(&self) {
        for (room, announcement) in self.presence.take() {
            let online = announcement.online;
            if !announcement.joined.is_empty() {
                let frame = |codec| {
                    event_frame(codec, "member_joined", &room, online, &announcement.joined)
                };
                self.deliver_presence(&room, frame);
            }
            if !announcement.left.is_empty() {
                let frame =
                    |codec| event_frame(codec, "member_left", &room, online, &announcement.left);
                self.deliver_presence(&room, frame);
            }
        }
    }

    /// Queues `frame(codec)` for the members of `room` that asked for presence events.
    fn deliver_presence(&self, room: &RoomName, frame: impl Fn(Codec) -> Bytes) {
        let rooms = self.read();
        let mut frames: [Option<Bytes>; 2] = [None, None];
        let (mut queued, mut slow) = (0, 0);
        let members = rooms.get(room).map(|r| &r.members);
        for member in members.into_iter().flat_map(HashMap::values) {
            if !member.presence {
                continue;
            }
            let slot = &mut frames[usize::from(member.codec == Codec::SocketIo)];
            let frame = slot.get_or_insert_with(|| frame(member.codec)).clone();
            queued += 1;
            match &member.staging {
                None => {
                    if member.outbox.push(frame) == Err(Refused::Full) {
                        slow += 1;
                    }
                }
                Some(staging) => {
                    staging.push(Staged::Frame(frame));
                }
            }
        }
        self.metrics.presence_events_total.add(queued);
        if slow > 0 {
            self.metrics.slow_consumer_disconnects_total.add(slow);
        }
    }

    /// Queues `message` for every local member of its room, as a frame in the member's
    /// codec (each form encoded once, on its first member, and shared); never waits.
    pub fn deliver(&self, message: &Arc<Message>) -> Delivered {
        let rooms = self.read();
        let mut done = Delivered::default();
        let members = rooms.get(message.room().as_str()).map(|r| &r.members);
        for member in members.into_iter().flat_map(HashMap::values) {
            if let Some(staging) = &member.staging {
                // An overflow is counted when the join ends, as the slow consumer it is.
                if staging.push(Staged::Message(message.clone())) {
                    done.queued += 1;
                }
                continue;
            }
            match member.outbox.push(message.frame(member.codec)) {
                Ok(()) => done.queued += 1,
                Err(Refused::Full) => done.slow += 1,
                Err(Refused::Closed) => {}
            }
        }
        drop(rooms);
        // Counted once per fan-out, not per member.
        self.metrics.messages_out_total.add(done.queued as u64);
        if done.slow > 0 {
            self.metrics
                .slow_consumer_disconnects_total
                .add(done.slow as u64);
        }
        done
    }
}

impl Room {
    /// Takes `member` out of the per-user counts; whether it was its user's last connection.
    fn forget(&mut self, member: &Member) -> bool {
        self.watchers -= usize::from(member.presence);
        let Some(user) = self.users.get_mut(&member.user) else {
            return false;
        };
        user.connections -= 1;
        if user.connections > 0 {
            return false;
        }
        self.users.remove(&member.user);
        true
    }
}

/// Now, in milliseconds since the Unix epoch.
pub(crate) fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

#[cfg(test)]
mod tests;
