//! Gap healing: a room whose ids jumped (a message lost by a dropped subscriber connection,
//! or published while it was reconnecting), or that moved to a new epoch, gets what this
//! node missed from the room's history before the next live message is delivered, so its
//! members see every id once, in order; after a reconnect every room is healed this way.
//! What the history no longer holds is counted and logged as lost.

use bytes::Bytes;
use tracing::warn;

use super::RedisTransport;
use super::recent::Seen;
use crate::protocol::native::{self, Since};
use crate::protocol::{RoomName, ws};

impl RedisTransport {
    /// Delivers from the history what this node missed in `room` since `seen_last` of
    /// `seen_epoch`, in order. Returns how many messages it delivered and whether the history
    /// still held every one (`false`: some are lost, e.g. the history was reset or trimmed
    /// past them); `None` when the history could not be read.
    pub(super) async fn heal(
        &self,
        room: &RoomName,
        seen_epoch: &str,
        seen_last: u64,
    ) -> Option<(usize, bool)> {
        let since = Since {
            id: seen_last,
            epoch: seen_epoch.to_owned(),
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
        // In a new epoch everything is new; in the same one, what follows `seen`.
        let same_epoch = snapshot.epoch == seen_epoch;
        let floor = if same_epoch { seen_last } else { 0 };
        let missed: Vec<&Bytes> = snapshot
            .frames
            .iter()
            .filter(|frame| {
                native::message_meta(&ws::text_payload(frame)).map_or(0, |(id, _)| id) > floor
            })
            .collect();
        let complete = snapshot.recovered == Some(true);
        let delivering = self.lock_delivering();
        {
            // `seen` takes the messages before the hub delivers them.
            let mut seen = self.lock_seen();
            match seen.get_mut(room) {
                Some(s)
                    if complete
                        && s.epoch == seen_epoch
                        && s.last == seen_last
                        && seen_last + missed.len() as u64 == snapshot.last_id =>
                {
                    for frame in &missed {
                        s.push((*frame).clone(), self.keep);
                    }
                }
                _ => {
                    // Start over from what the history still stores. Recovering in the same
                    // epoch without `since + 1`: nothing older is stored either. Otherwise the
                    // newest `history_size` came, all there are when fewer came.
                    let whole = if same_epoch && snapshot.last_id >= seen_last && !complete {
                        true
                    } else {
                        snapshot.frames.len() < self.policy.history_size
                    };
                    let restarted = Seen::new(
                        snapshot.epoch.clone(),
                        snapshot.last_id,
                        &snapshot.frames,
                        whole,
                        self.keep,
                    );
                    seen.insert(room.clone(), restarted);
                }
            }
        }
        for frame in &missed {
            self.hub.deliver(room.as_str(), frame);
        }
        drop(delivering);
        self.progressed();
        let delivered = missed.len();
        self.metrics
            .backplane_messages_healed_total
            .add(delivered as u64);
        if !complete {
            warn!(
                %room, after_id = seen_last, epoch = %seen_epoch, new_epoch = %snapshot.epoch,
                "messages were lost on the backplane and are no longer in the history"
            );
        }
        Some((delivered, complete))
    }

    /// After a reconnect: fills every room's gap from the history.
    pub(super) async fn catch_up(&self) {
        let rooms: Vec<(RoomName, String, u64)> = self
            .lock_seen()
            .iter()
            .map(|(room, seen)| (room.clone(), seen.epoch.clone(), seen.last))
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
