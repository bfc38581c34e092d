//! The hub: which local connections are in which room, and delivery of an encoded frame to
//! every local member of a room.
//!
//! Everything here is synchronous and never awaits a member: [`Hub::deliver`] clones the
//! message's frame (a reference-count bump) into each member's bounded [`Outbox`]. A member
//! whose outbox is full is closed as a slow consumer by the outbox itself and skipped.
//!
//! Members read chat messages in a [`Codec`]; each gets the [`Message`]'s frame in its codec,
//! which the message builds at most once per node and shares. A member that is joining gets
//! the messages themselves in a bounded [`Staging`] queue until its history is sent.

use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::sync::{Arc, Mutex, PoisonError, RwLock, RwLockReadGuard, RwLockWriteGuard};

use bytes::Bytes;

use crate::metrics::Metrics;
use crate::outbox::{Outbox, Refused};
use crate::protocol::RoomName;
use crate::protocol::message::{Codec, Message};

/// A connection's id, unique within one node's lifetime.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ConnId(pub u64);

impl fmt::Display for ConnId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:x}", self.0)
    }
}

/// A local member of a room: where its messages go, and in which form.
#[derive(Debug)]
struct Member {
    sink: Sink,
    codec: Codec,
}

/// Where a member's messages go.
#[derive(Debug)]
enum Sink {
    /// Its connection's outbox, as frames.
    Live(Arc<Outbox>),
    /// Kept while its history is sent; [`Hub::promote`] moves them to the outbox.
    Staging(Arc<Staging>),
}

/// The messages of a room that arrive while a joining member is sent its history: bounded
/// like the member's outbox, in messages and in bytes.
#[derive(Debug)]
pub(crate) struct Staging {
    max_messages: usize,
    max_bytes: usize,
    queue: Mutex<StagedQueue>,
}

#[derive(Debug, Default)]
struct StagedQueue {
    messages: VecDeque<Arc<Message>>,
    bytes: usize,
    overflowed: bool,
}

impl Staging {
    /// A staging queue as bounded as `outbox`.
    pub(crate) fn like(outbox: &Outbox) -> Self {
        Self {
            max_messages: outbox.capacity(),
            max_bytes: outbox.max_bytes(),
            queue: Mutex::default(),
        }
    }

    /// Keeps `message`; `false` once the bounds are passed (everything is dropped then: the
    /// member is a slow consumer).
    fn push(&self, message: &Arc<Message>) -> bool {
        let mut queue = self.queue.lock().unwrap_or_else(PoisonError::into_inner);
        if queue.overflowed {
            return false;
        }
        let size = message.frame(Codec::Native).len();
        if queue.messages.len() >= self.max_messages || queue.bytes + size > self.max_bytes {
            *queue = StagedQueue {
                overflowed: true,
                ..StagedQueue::default()
            };
            return false;
        }
        queue.bytes += size;
        queue.messages.push_back(message.clone());
        true
    }

    /// The staged messages, oldest first; `None` if they overflowed.
    fn take(&self) -> Option<VecDeque<Arc<Message>>> {
        let mut queue = self.queue.lock().unwrap_or_else(PoisonError::into_inner);
        let queue = std::mem::take(&mut *queue);
        (!queue.overflowed).then_some(queue.messages)
    }
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
            sink: Sink::Live(outbox.clone()),
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

    /// Adds `conn` to `room`, reading `codec`, with a `staging` queue that keeps the room's
    /// live messages while the connection is sent the room's history; [`Hub::promote`] ends
    /// the staging.
    pub(crate) fn join_staged(
        &self,
        codec: Codec,
        room: &RoomName,
        conn: ConnId,
        staging: &Arc<Staging>,
    ) -> Membership {
        let member = Member {
            sink: Sink::Staging(staging.clone()),
            codec,
        };
        self.insert(room, conn, member).0
    }

    /// Ends a staged join: from now on `room`'s messages go to `outbox`. Under the lock, so no
    /// message is delivered meanwhile, `flush` gets the staged messages (oldest first), or
    /// `None` if the staging overflowed. Returns `false` if `conn` is no longer in `room`.
    pub(crate) fn promote(
        &self,
        room: &str,
        conn: ConnId,
        outbox: &Arc<Outbox>,
        flush: impl FnOnce(Option<VecDeque<Arc<Message>>>),
    ) -> bool {
        let mut rooms = self.write();
        let Some(entry) = rooms.get_mut(room).and_then(|m| m.get_mut(&conn)) else {
            return false;
        };
        let Sink::Staging(staging) = std::mem::replace(&mut entry.sink, Sink::Live(outbox.clone()))
        else {
            return true; // not staged: nothing to flush
        };
        flush(staging.take());
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

    /// Queues `message` for every local member of its room, as a frame in the member's
    /// codec (each form encoded once, on its first member, and shared); never waits.
    pub fn deliver(&self, message: &Arc<Message>) -> Delivered {
        let rooms = self.read();
        let mut done = Delivered::default();
        let members = rooms.get(message.room().as_str());
        for member in members.into_iter().flat_map(HashMap::values) {
            let outbox = match &member.sink {
                Sink::Live(outbox) => outbox,
                Sink::Staging(staging) => {
                    // An overflow is counted when the join ends, as the slow consumer it is.
                    if staging.push(message) {
                        done.queued += 1;
                    }
                    continue;
                }
            };
            match outbox.push(message.frame(member.codec)) {
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

    fn message(room: &str, text: &str) -> Arc<Message> {
        let draft = crate::protocol::message::Draft::new(
            RoomName::new(room).unwrap(),
            "ann".into(),
            1,
            text.into(),
        );
        Arc::new(draft.accept(1, "e".into()))
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
        let message = message("general", "hi");
        let frame = message.frame(Codec::Native);
        assert_eq!(hub.deliver(&message), Delivered { queued: 2, slow: 0 });
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
        let message = message("general", "hi");
        let frame = message.frame(Codec::Native);
        assert_eq!(hub.deliver(&message).queued, 4);
        assert_eq!(drain(&native)[0].as_ptr(), frame.as_ptr());
        let first = drain(&sio[0]);
        let payload = crate::protocol::ws::text_payload(&first[0]);
        assert_eq!(
            payload,
            crate::protocol::ws::text_payload(&crate::protocol::socketio::message_frame(&frame))
        );
        assert!(payload.starts_with(br#"42["message","{\"type\":\"message\""#));
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
        let done = hub.deliver(&message("general", "m"));
        assert_eq!(done, Delivered { queued: 1, slow: 1 });
        assert!(slow.is_closed());
        assert_eq!(fast.len(), 1);
    }
}
