//! Joining a room: the room limit, the node's subscription, and, when the protocol wants the
//! room's history, the staged catch-up that sends it with no gap and no duplicate before the
//! live messages.

use std::sync::Arc;
use std::time::Duration;

use tracing::warn;

use super::{Chat, Protocol, unavailable};
use crate::hub::Staging;
use crate::outbox::Refused;
use crate::protocol::native::Since;
use crate::protocol::ws::close_code;
use crate::protocol::{ErrorCode, ProtocolError, RoomName};
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
}

impl Joined<'_> {
    /// With `since`: whether the messages that follow are exactly those missed.
    pub(crate) fn recovered(&self) -> Option<bool> {
        self.recovering
            .then(|| self.history.and_then(|s| s.recovered) == Some(true))
    }
}

impl<P: Protocol> Chat<P> {
    /// Joins `room`, answering the local member count. With `history`, the client is sent
    /// `joined`, then the room's history (what it missed since `since`, or the newest
    /// messages), then live messages, with no gap and no duplicate between the two; without,
    /// `joined` and then live messages.
    ///
    /// The history is staged: the connection joins the hub with a queue that keeps live
    /// messages while the history is read. The history's snapshot is atomic with publishing,
    /// so every id up to its `last_id` is either in it or was delivered before the staging
    /// began; staged messages up to `last_id` are dropped as duplicates, the rest follow the
    /// history.
    pub(crate) async fn join(
        &mut self,
        room: RoomName,
        since: Option<Since>,
        history: bool,
    ) -> Result<usize, ProtocolError> {
        self.take_request()?;
        self.join_room(room, since, history).await
    }

    /// [`Chat::join`] for the room a connection opens with, which takes no request token:
    /// the connection's admission counted it.
    pub(crate) async fn join_first(
        &mut self,
        room: RoomName,
        since: Option<Since>,
        history: bool,
    ) -> Result<usize, ProtocolError> {
        self.join_room(room, since, history).await
    }

    async fn join_room(
        &mut self,
        room: RoomName,
        since: Option<Since>,
        history: bool,
    ) -> Result<usize, ProtocolError> {
        let node = self.node.clone();
        if self.rooms.rooms.contains(&room) {
            // Already in: the live stream is running, so there is no history to add.
            let online = node.hub.online(room.as_str());
            if let Some(frame) = P::already_joined(&room, online) {
                self.push(frame);
            }
            return Ok(online);
        }
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
        if !history {
            let joined = node
                .hub
                .join_as(P::CODEC, &room, self.conn, &self.outbox, |online| {
                    P::joined(&Joined {
                        room: &room,
                        online,
                        history: None,
                        recovering: false,
                    })
                });
            self.rooms.rooms.push(room);
            subscription.joined();
            return Ok(joined.online);
        }
        let staging = Arc::new(Staging::like(&self.outbox));
        let online = node
            .hub
            .join_staged(P::CODEC, &room, self.conn, &staging)
            .online;
        self.rooms.rooms.push(room.clone());
        subscription.joined();
        let snapshot = node.transport.snapshot(&room, since.as_ref()).await;
        let joined = |history| Joined {
            room: &room,
            online,
            history,
            recovering: since.is_some(),
        };
        match &snapshot {
            Ok(s) => {
                self.push(P::joined(&joined(Some(s))));
                for message in &s.messages {
                    // A long history never makes its reader a slow consumer.
                    self.outbox.wait_room().await;
                    self.push(message.frame(P::CODEC));
                }
            }
            Err(e) => {
                self.push(P::joined(&joined(None)));
                node.metrics.error(ErrorCode::Unavailable);
                self.push(P::error(&unavailable(&room, e)));
            }
        }
        self.catch_up(&room, snapshot.as_ref().ok()).await;
        Ok(online)
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
        node.hub
            .promote(room.as_str(), self.conn, outbox, |staged| {
                let Some(staged) = staged else {
                    metrics.slow_consumer_disconnects_total.inc();
                    return outbox.close(close_code::SLOW_CONSUMER, "slow consumer", false);
                };
                let new = staged
                    .iter()
                    .filter(|m| covered.is_none_or(|(epoch, id)| m.is_after(epoch, id)));
                for message in new {
                    if outbox.push(message.frame(P::CODEC)) == Err(Refused::Full) {
                        metrics.slow_consumer_disconnects_total.inc();
                    }
                }
            });
    }
}
