//! Joining a room: the room limit, the node's subscription, the user's presence, and the
//! staged catch-up that sends the room's history, when the client wants it, with no gap and no
//! duplicate before the live messages.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tracing::warn;

use super::{Chat, Protocol, unavailable};
use crate::hub::{Joiner, Staged, Staging};
use crate::node::access::Mode;
use crate::outbox::Refused;
use crate::protocol::native::Since;
use crate::protocol::ws::close_code;
use crate::protocol::{ErrorCode, ProtocolError, RoomName, RoomRef, valid_user_name};
use crate::transport::Snapshot;

/// How long a join waits for the node's live stream to reach the history it sent.
const CATCH_UP_WAIT: Duration = Duration::from_secs(2);

/// What a join tells the client, before any of the room's messages.
#[derive(Debug)]
pub(crate) struct Joined<'a> {
    /// The room.
    pub(crate) room: &'a RoomName,
    /// Local members of the room now, the joiner included.
    pub(crate) online: usize,
    /// The history that follows, when the join asked for it and it could be read.
    pub(crate) history: Option<&'a Snapshot>,
    /// The join asked to recover from a position (`since`).
    pub(crate) recovering: bool,
    /// For a direct-message room, the other user.
    pub(crate) direct: Option<&'a str>,
    /// The user may read the room but not send to it.
    pub(crate) read_only: bool,
}

impl Joined<'_> {
    /// With `since`: whether the messages that follow are exactly those missed.
    pub(crate) fn recovered(&self) -> Option<bool> {
        self.recovering
            .then(|| self.history.and_then(|s| s.recovered) == Some(true))
    }
}

/// A room joined.
#[derive(Debug)]
pub(crate) struct Entered {
    /// Its name (for a direct-message room, the one derived from the two users).
    pub(crate) room: RoomName,
    /// The users in it over every node.
    pub(crate) online: usize,
    /// With `since`: whether the messages sent were exactly those missed.
    pub(crate) recovered: Option<bool>,
}

/// What a client asks of a join.
#[derive(Debug)]
pub(crate) struct Join {
    /// The room.
    pub(crate) room: RoomRef,
    /// Where the client left the room, to get what it missed.
    pub(crate) since: Option<Since>,
    /// Send the room's history before live messages.
    pub(crate) history: bool,
    /// Send the room's presence events.
    pub(crate) presence: bool,
}

impl<P: Protocol> Chat<P> {
    /// Joins a room, answering the users in it over every node. The client is sent `joined`,
    /// then, when it asked, the room's history (what it missed since `since`, or the newest
    /// messages), then live messages, with no gap and no duplicate between the two.
    ///
    /// The join is staged: the connection joins the hub with a queue that keeps the room's
    /// traffic while its presence is written and its history read. The history's snapshot is
    /// atomic with publishing, so every id up to its `last_id` is either in it or was
    /// delivered before the staging began; staged messages up to `last_id` are dropped as
    /// duplicates, the rest follow the history.
    pub(crate) async fn join(&mut self, join: Join) -> Result<Entered, ProtocolError> {
        self.take_request()?;
        self.join_room(join, &mut None).await
    }

    /// [`Chat::join`] for the room a connection opens with, which takes no request token:
    /// the connection's admission counted it. `greeting`, when given, is queued ahead of
    /// everything the join sends, once its answer is ready: the two leave in one write, so a
    /// client reads one segment rather than two while the join waits for Redis.
    pub(crate) async fn join_first(
        &mut self,
        join: Join,
        mut greeting: Option<Bytes>,
    ) -> Result<Entered, ProtocolError> {
        let entered = self.join_room(join, &mut greeting).await;
        // Refused before its answer was ready: the greeting goes ahead of the error.
        if let Some(frame) = greeting {
            self.push(frame);
        }
        entered
    }

    async fn join_room(
        &mut self,
        join: Join,
        greeting: &mut Option<Bytes>,
    ) -> Result<Entered, ProtocolError> {
        let Join {
            room,
            since,
            history,
            presence,
        } = join;
        let node = self.node.clone();
        let Some(user) = self.rooms.user.clone() else {
            return Err(ProtocolError::new(ErrorCode::BadField, "not connected"));
        };
        let (room, direct) = match room {
            RoomRef::Named(room) => (room, None),
            RoomRef::Direct(peer) => {
                if !valid_user_name(&peer) {
                    return Err(ProtocolError::new(
                        ErrorCode::BadField,
                        "`dm` must be a user's display name",
                    ));
                }
                (RoomName::direct(&user, &peer), Some(peer))
            }
        };
        if self.rooms.rooms.contains(&room) {
            // Already in: the live stream is running, so there is no history to add.
            let online = node.transport.online(&room);
            if let Some(frame) = greeting.take() {
                self.push(frame);
            }
            if let Some(frame) = P::already_joined(&room, online) {
                self.push(frame);
            }
            return Ok(Entered {
                room,
                online,
                recovered: None,
            });
        }
        // A direct-message room admits its two users; any other is decided by the rules.
        let mode = match direct {
            Some(_) => Mode::ReadWrite,
            None => node.access.decide(&user, &self.grant, &room).await?,
        };
        let limit = self.live().limits.max_rooms_per_connection;
        if self.rooms.rooms.len() >= limit {
            return Err(ProtocolError::new(
                ErrorCode::TooManyRooms,
                format!("a connection may be in at most {limit} rooms"),
            ));
        }
        // Subscribed first, so that every message of the room published from now on reaches
        // this node. Recorded with the hub join, with no await between: a join cancelled
        // before leaves neither a room to leave nor a subscription behind.
        let subscription = node.transport.subscribe(&room).await;
        let staging = Arc::new(Staging::like(&self.outbox));
        let joiner = Joiner {
            conn: self.conn,
            outbox: self.outbox.clone(),
            user: user.clone(),
            codec: P::CODEC,
            presence,
        };
        let membership = node.hub.join_staged(&room, &joiner, &staging);
        // The hub's copy of the name: the one the request came with is freed once the join
        // ends, rather than held by every member.
        let room = node.hub.name(room.as_str()).unwrap_or(room);
        if self.first_room.as_ref() == Some(&room) {
            self.first_room = Some(room.clone());
        }
        self.rooms.join(room.clone(), mode == Mode::ReadOnly);
        subscription.joined();
        // The presence write and the history read are independent round trips (on Redis):
        // made together, a join with presence costs about what one without it does.
        let online = async {
            if membership.user_first_or_last {
                node.transport.presence_joined(&room, &user).await
            } else {
                node.transport.online(&room)
            }
        };
        let snapshot = async {
            if history {
                Some(node.snapshot(&room, since.as_ref()).await)
            } else {
                None
            }
        };
        let (online, snapshot) = tokio::join!(online, snapshot);
        let joined = |history| Joined {
            room: &room,
            online,
            history,
            recovering: since.is_some(),
            direct: direct.as_deref(),
            read_only: mode == Mode::ReadOnly,
        };
        if let Some(frame) = greeting.take() {
            self.push(frame);
        }
        match &snapshot {
            None => self.push(P::joined(&joined(None))),
            Some(Ok(s)) => {
                self.push(P::joined(&joined(Some(s))));
                for message in &s.messages {
                    // A long history never makes its reader a slow consumer.
                    self.outbox.wait_room().await;
                    self.push(message.frame(P::CODEC));
                }
            }
            Some(Err(e)) => {
                self.push(P::joined(&joined(None)));
                node.metrics.error(ErrorCode::Unavailable);
                self.push(P::error(&unavailable(&room, e)));
            }
        }
        let sent = snapshot.as_ref().and_then(|s| s.as_ref().ok());
        let recovered = since
            .is_some()
            .then(|| sent.and_then(|s| s.recovered) == Some(true));
        self.catch_up(&room, sent).await;
        Ok(Entered {
            room,
            online,
            recovered,
        })
    }
    /// Ends a staged join: once this node's live stream has reached what `sent` held, the
    /// staged messages that came after it follow, and live ones from then on.
    async fn catch_up(&self, room: &RoomName, sent: Option<&Snapshot>) {
        let node = &self.node;
        let covered = sent.map(|s| (s.epoch.as_str(), s.last_id));
        // The history may be ahead of this node's live stream (Redis): the messages in between
        // must reach the staging, where they are dropped as already sent, not the member.
        if let Some((epoch, last_id)) = covered
            && !node
                .transport
                .caught_up(room, epoch, last_id, CATCH_UP_WAIT)
                .await
        {
            warn!(
                %room, last_id,
                "the live stream did not reach the history in time: \
                 the joiner may get some messages of its history again"
            );
        }
        let outbox = &self.outbox;
        let metrics = &node.metrics;
        node.hub.promote(room.as_str(), self.conn, |staged| {
            let Some(staged) = staged else {
                metrics.slow_consumer_disconnects_total.inc();
                return outbox.close(close_code::SLOW_CONSUMER, "slow consumer", false);
            };
            for staged in staged {
                let frame = match staged {
                    Staged::Message(m) => {
                        if covered.is_some_and(|(epoch, id)| !m.is_after(epoch, id)) {
                            continue; // in the history it was sent
                        }
                        m.frame(P::CODEC)
                    }
                    Staged::Frame(frame) => frame,
                };
                if outbox.push(frame) == Err(Refused::Full) {
                    metrics.slow_consumer_disconnects_total.inc();
                }
            }
        });
    }
}
