//! The hub: which local connections are in which room, and delivery of an encoded frame to
//! every local member of a room.
//!
//! Everything here is synchronous and never awaits a member: [`Hub::deliver`] clones the
//! frame's `Bytes` (a reference-count bump) into each member's bounded [`Outbox`]. A member
//! whose outbox is full is closed as a slow consumer by the outbox itself and skipped.
//!
//! Members speak a [`Codec`]: native members get the native frame; Socket.IO members get its
//! Socket.IO form, built at most once per delivery (only if the room has one) and shared the
//! same way.

use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::sync::{Arc, RwLock, RwLockReadGuard, RwLockWriteGuard};

use bytes::Bytes;

use crate::metrics::Metrics;
use crate::outbox::{Next, Outbox, Refused};
use crate::protocol::{RoomName, socketio};

/// A connection's id, unique within one node's lifetime.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ConnId(pub u64);

impl fmt::Display for ConnId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:x}", self.0)
    }
}

/// The wire format a member reads chat messages in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Codec {
    /// scalechat's native protocol: the message frame as published.
    Native,
    /// Socket.IO: the `message` event built by [`socketio::message_frame`].
    SocketIo,
}

/// A local member of a room: where its frames go, and in which form.
#[derive(Debug)]
struct Member {
    outbox: Arc<Outbox>,
    codec: Codec,
}

type Rooms = HashMap<RoomName, HashMap<ConnId, Member>>;

/// Result of a join or leave, as seen by this node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Membership {
    /// Local members of the room after the change.
    pub online: usize,
    /// The connection is the room's first local member (join) or was its last (leave): the
    /// node should subscribe to the room or unsubscribe.
    pub first_or_last: bool,
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
}

impl Hub {
    /// An empty hub counting rooms and deliveries in `metrics`.
    pub(crate) fn with_metrics(metrics: Arc<Metrics>) -> Self {
        Self {
            rooms: RwLock::default(),
            metrics,
        }
    }

    fn read(&self) -> RwLockReadGuard<'_, Rooms> {
        // Poisoning needs a panic under the lock; the maps stay consistent regardless.
        self.rooms.read().unwrap_or_else(|e| e.into_inner())
    }

    fn write(&self) -> RwLockWriteGuard<'_, Rooms> {
        self.rooms.write().unwrap_or_else(|e| e.into_inner())
    }

    /// Adds `conn` to `room` as a member reading chat messages in `codec`, and queues
    /// `reply(online)` for it before any message of the room can be. Joining a room twice is
    /// harmless.
    pub fn join_as(
        &self,
        codec: Codec,
        room: &RoomName,
        conn: ConnId,
        outbox: &Arc<Outbox>,
        reply: impl FnOnce(usize) -> Bytes,
    ) -> Membership {
        let member = Member {
            outbox: outbox.clone(),
            codec,
        };
        let (membership, _locked) = self.insert(room, conn, member);
        // Queued while the lock is held: no frame of the room precedes it.
        // Refused only when the connection is closing; then nobody reads the reply.
        let _ = outbox.push(reply(membership.online));
        membership
    }

    /// Adds `member` to `room`, counting a room that gains its first member; returns the
    /// membership and the still-held write lock.
    fn insert(
        &self,
        room: &RoomName,
        conn: ConnId,
        member: Member,
    ) -> (Membership, RwLockWriteGuard<'_, Rooms>) {
        let mut rooms = self.write();
        let members = rooms.entry(room.clone()).or_default();
        let first_or_last = members.is_empty();
        if first_or_last {
            self.metrics.rooms.inc();
        }
        members.insert(conn, member);
        let online = members.len();
        (
            Membership {
                online,
                first_or_last,
            },
            rooms,
        )
    }

    /// Adds `conn` to `room` with a `staging` outbox that collects the room's live frames
    /// while the connection is sent the room's history; [`Hub::promote`] ends the staging.
    pub(crate) fn join_staged(
        &self,
        room: &RoomName,
        conn: ConnId,
        staging: &Arc<Outbox>,
    ) -> Membership {
        let member = Member {
            outbox: staging.clone(),
            codec: Codec::Native,
        };
        self.insert(room, conn, member).0
    }

    /// Ends a staged join: from now on `room`'s frames go to `outbox`. Under the lock, so no
    /// frame is delivered meanwhile, `flush` gets the staged frames (oldest first), or `None`
    /// if the staging overflowed. Returns `false` if `conn` is no longer in `room`.
    pub(crate) fn promote(
        &self,
        room: &str,
        conn: ConnId,
        staging: &Outbox,
        outbox: &Arc<Outbox>,
        flush: impl FnOnce(Option<VecDeque<Bytes>>),
    ) -> bool {
        let mut rooms = self.write();
        let Some(entry) = rooms.get_mut(room).and_then(|m| m.get_mut(&conn)) else {
            return false;
        };
        entry.outbox = outbox.clone();
        let mut staged = VecDeque::new();
        match staging.take(&mut staged) {
            Next::Close(_) => flush(None),
            Next::Frames | Next::Empty => flush(Some(staged)),
        }
        true
    }

    /// Removes `conn` from `room`; `None` if it was not a member.
    pub(crate) fn leave(&self, room: &str, conn: ConnId) -> Option<Membership> {
        let mut rooms = self.write();
        let members = rooms.get_mut(room)?;
        members.remove(&conn)?;
        let online = members.len();
        if online == 0 {
            rooms.remove(room);
            self.metrics.rooms.dec();
        }
        Some(Membership {
            online,
            first_or_last: online == 0,
        })
    }

    /// Local members of `room`.
    pub fn online(&self, room: &str) -> usize {
        self.read().get(room).map_or(0, HashMap::len)
    }

    /// Queues `frame` for every local member of `room`; never waits. Socket.IO members get
    /// its Socket.IO form, encoded on the first such member and shared by all of them.
    pub fn deliver(&self, room: &str, frame: &Bytes) -> Delivered {
        let rooms = self.read();
        let mut done = Delivered::default();
        let mut socketio: Option<Bytes> = None;
        for member in rooms.get(room).into_iter().flat_map(HashMap::values) {
            let frame = match member.codec {
                Codec::Native => frame.clone(),
                Codec::SocketIo => socketio
                    .get_or_insert_with(|| socketio::message_frame(frame))
                    .clone(),
            };
            match member.outbox.push(frame) {
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

#[cfg(test)]
mod tests {
    use super::*;

    fn room(name: &str) -> RoomName {
        RoomName::new(name).unwrap()
    }

    fn reply(online: usize) -> Bytes {
        Bytes::from(online.to_string())
    }

    fn drain(outbox: &Outbox) -> VecDeque<Bytes> {
        let mut batch = VecDeque::new();
        outbox.take(&mut batch);
        batch
    }

    #[test]
    fn join_and_leave_report_first_and_last_members_and_counts() {
        let hub = Hub::default();
        let a = Arc::new(Outbox::new(8, 1 << 20));
        let b = Arc::new(Outbox::new(8, 1 << 20));
        let general = room("general");
        assert_eq!(
            hub.join_as(Codec::Native, &general, ConnId(1), &a, reply),
            Membership {
                online: 1,
                first_or_last: true
            }
        );
        assert_eq!(
            hub.join_as(Codec::Native, &general, ConnId(2), &b, reply),
            Membership {
                online: 2,
                first_or_last: false
            }
        );
        assert_eq!(
            hub.join_as(Codec::Native, &general, ConnId(2), &b, reply)
                .online,
            2
        );
        assert_eq!(hub.leave("general", ConnId(3)), None);
        assert_eq!(
            hub.leave("general", ConnId(1)),
            Some(Membership {
                online: 1,
                first_or_last: false
            })
        );
        assert_eq!(
            hub.leave("general", ConnId(2)),
            Some(Membership {
                online: 0,
                first_or_last: true
            })
        );
        assert!(hub.read().is_empty(), "no room left");
    }

    #[test]
    fn deliver_shares_one_buffer_with_members_of_that_room_only() {
        let hub = Hub::default();
        let a = Arc::new(Outbox::new(8, 1 << 20));
        let b = Arc::new(Outbox::new(8, 1 << 20));
        let other = Arc::new(Outbox::new(8, 1 << 20));
        hub.join_as(Codec::Native, &room("general"), ConnId(1), &a, reply);
        hub.join_as(Codec::Native, &room("general"), ConnId(2), &b, reply);
        hub.join_as(Codec::Native, &room("dev"), ConnId(3), &other, reply);
        assert_eq!(
            drain(&a),
            [&b"1"[..]],
            "the joined reply with the online count"
        );
        assert_eq!(drain(&b), [&b"2"[..]]);
        drain(&other);
        let frame = Bytes::from(vec![1u8; 100]);
        assert_eq!(
            hub.deliver("general", &frame),
            Delivered { queued: 2, slow: 0 }
        );
        for outbox in [&a, &b] {
            let batch = drain(outbox);
            assert_eq!(batch.len(), 1);
            assert_eq!(batch[0].as_ptr(), frame.as_ptr(), "same bytes, not a copy");
        }
        assert!(other.is_empty());
    }

    #[test]
    fn socketio_members_share_one_socketio_frame_built_once() {
        let hub = Hub::default();
        let native = Arc::new(Outbox::new(8, 1 << 20));
        let sio: Vec<_> = (0..3).map(|_| Arc::new(Outbox::new(8, 1 << 20))).collect();
        hub.join_as(Codec::Native, &room("general"), ConnId(1), &native, reply);
        for (i, outbox) in sio.iter().enumerate() {
            hub.join_as(
                Codec::SocketIo,
                &room("general"),
                ConnId(10 + i as u64),
                outbox,
                reply,
            );
        }
        for outbox in sio.iter().chain([&native]) {
            drain(outbox);
        }
        let frame = crate::protocol::ws::text(br#"{"type":"message","message":"hi"}"#);
        assert_eq!(hub.deliver("general", &frame).queued, 4);
        assert_eq!(drain(&native)[0].as_ptr(), frame.as_ptr());
        let first = drain(&sio[0]);
        let payload = crate::protocol::ws::text_payload(&first[0]);
        assert_eq!(
            &payload[..],
            br#"42["message","{\"type\":\"message\",\"message\":\"hi\"}"]"#
        );
        for outbox in &sio[1..] {
            assert_eq!(
                drain(outbox)[0].as_ptr(),
                first[0].as_ptr(),
                "one Socket.IO frame"
            );
        }
    }

    #[test]
    fn a_full_member_is_counted_slow_and_others_still_get_the_frame() {
        let hub = Hub::default();
        let slow = Arc::new(Outbox::new(8, 1 << 20));
        let fast = Arc::new(Outbox::new(8, 1 << 20));
        hub.join_as(Codec::Native, &room("general"), ConnId(1), &slow, reply);
        hub.join_as(Codec::Native, &room("general"), ConnId(2), &fast, reply);
        drain(&fast);
        while slow.len() < 8 {
            slow.push(Bytes::new()).unwrap();
        }
        let done = hub.deliver("general", &Bytes::from_static(b"m"));
        assert_eq!(done, Delivered { queued: 1, slow: 1 });
        assert!(slow.is_closed());
        assert_eq!(fast.len(), 1);
    }
}
