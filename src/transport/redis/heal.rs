//! Gap healing: a room whose ids jumped (a message lost by a dropped subscriber connection,
//! or published while it was reconnecting), or that moved to a new epoch, gets what this
//! node missed from the room's history before the next live message is delivered, so its
//! members see every id once, in order; after a reconnect every room is healed this way.
//! What the history no longer holds is counted and logged as lost.

use std::sync::Arc;

use tracing::warn;

use super::RedisTransport;
use super::recent::RoomStream;
use crate::protocol::RoomName;
use crate::protocol::message::Message;
use crate::protocol::native::Since;

impl RedisTransport {
    /// Delivers from the history what this node missed in `room` since `delivered_id` of
    /// `delivered_epoch`, in order. Returns how many messages it delivered and whether the history
    /// still held every one (`false`: some are lost, e.g. the history was reset or trimmed
    /// past them); `None` when the history could not be read.
    pub(super) async fn heal(
        &self,
        room: &RoomName,
        delivered_epoch: &str,
        delivered_id: u64,
    ) -> Option<(usize, bool)> {
        let since = Since {
            id: delivered_id,
            epoch: delivered_epoch.to_owned(),
        };
        let snapshot = match self
            .scripts
            .snapshot(room, Some(&since), self.policy.history_size)
            .await
        {
            Ok(snapshot) => snapshot,
            Err(e) => {
                warn!(%room, error = %e, "could not read the history to fill a gap");
                return None;
            }
        };
        // In a new epoch everything is new; in the same one, what follows what was delivered.
        let same_epoch = snapshot.epoch == delivered_epoch;
        if same_epoch && snapshot.last_id < delivered_id {
            // Redis lost its newest writes (a failover before they were replicated): the room
            // stays where this node is, so the next publishes get ids above it (see the
            // publish script), and nothing delivered is delivered again.
            warn!(
                %room, redis_last_id = snapshot.last_id, delivered_id, epoch = %delivered_epoch,
                "redis has lost messages this node delivered (a failover?); ids go on after them"
            );
            return Some((0, false));
        }
        let floor = if same_epoch { delivered_id } else { 0 };
        let missed: Vec<&Arc<Message>> = snapshot
            .messages
            .iter()
            .filter(|message| message.id() > floor)
            .collect();
        let complete = snapshot.recovered == Some(true);
        let delivering = self.lock_delivering();
        {
            // The stream takes the messages before the hub delivers them.
            let mut streams = self.lock_streams();
            match streams.get_mut(room) {
                Some(s)
                    if complete
                        && s.epoch == delivered_epoch
                        && s.last_id == delivered_id
                        && delivered_id + missed.len() as u64 == snapshot.last_id =>
                {
                    for message in &missed {
                        s.push_next((*message).clone(), self.keep_recent);
                    }
                }
                _ => {
                    // Start over from what the history still stores. Recovering in the same
                    // epoch without `since + 1`: nothing older is stored either. Otherwise the
                    // newest `history_size` came, all there are when fewer came.
                    let nothing_older =
                        if same_epoch && snapshot.last_id >= delivered_id && !complete {
                            true
                        } else {
                            snapshot.messages.len() < self.policy.history_size
                        };
                    let restarted = RoomStream::from_history(
                        snapshot.epoch.clone(),
                        snapshot.last_id,
                        &snapshot.messages,
                        nothing_older,
                        self.keep_recent,
                    );
                    streams.insert(room.clone(), restarted);
                }
            }
        }
        for message in &missed {
            self.hub.deliver(message);
        }
        drop(delivering);
        self.progressed();
        let delivered = missed.len();
        self.metrics
            .backplane_messages_healed_total
            .add(delivered as u64);
        if !complete {
            warn!(
                %room, after_id = delivered_id, epoch = %delivered_epoch,
                new_epoch = %snapshot.epoch,
                "messages were lost on the backplane and are no longer in the history"
            );
        }
        Some((delivered, complete))
    }

    /// After a reconnect: fills every room's gap from the history.
    pub(super) async fn heal_all(&self) {
        let rooms: Vec<(RoomName, String, u64)> = self
            .lock_streams()
            .iter()
            .map(|(room, stream)| (room.clone(), stream.epoch.clone(), stream.last_id))
            .collect();
        for (room, epoch, last) in rooms {
            if let Some((delivered, complete)) = self.heal(&room, &epoch, last).await
                && (delivered > 0 || !complete)
            {
                self.metrics.backplane_gaps_total.inc();
                if complete {
                    self.metrics.backplane_gaps_healed_total.inc();
                }
            }
        }
    }
}
