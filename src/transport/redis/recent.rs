//! What this node knows of each room it receives: the epoch and the last id it delivered,
//! against which every message from the channel is checked (the next one is taken, one
//! already delivered is dropped, anything else is a gap to heal), and, with
//! `redis.local_history`, the room's newest `rooms.history_on_join` messages, followed on the
//! channel, from which a join is answered without a Redis call when they hold exactly what
//! Redis would send.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::protocol::message::Message;
use crate::protocol::native::Since;
use crate::transport::Snapshot;

/// What this node knows of a room it receives: the newest message it delivered (to find
/// gaps) and the messages up to it (to answer joins).
#[derive(Debug)]
pub(super) struct RoomStream {
    pub(super) epoch: String,
    pub(super) last_id: u64,
    /// The newest messages, oldest first, with consecutive ids up to `last_id`; at most
    /// `keep_recent`.
    recent: VecDeque<Arc<Message>>,
    /// The history stores no message older than `recent`'s first.
    nothing_older: bool,
    /// The newest id this node's publishes were acked with: a join waits until `last_id`
    /// reaches it, so a client's own messages are in the history it joins with.
    pub(super) acked_id: u64,
}

/// What [`RoomStream::follow`] made of a message.
pub(super) enum Arrival {
    /// Delivered already.
    AlreadyDelivered,
    /// The next message: now the newest.
    Next,
    /// Not the next one: a gap, or another epoch.
    Gap,
}

/// What [`RoomStream::answer`] can answer.
pub(super) enum LocalAnswer {
    /// The snapshot, as Redis would send it.
    Ready(Snapshot),
    /// The channel has not brought every message this node acked yet: up to `acked_id` of
    /// `epoch`.
    Behind { epoch: String, acked_id: u64 },
    /// Only Redis can answer.
    AskRedis,
}

impl RoomStream {
    /// Starts from `messages`, the newest stored ones up to `last_id` (consecutive ids);
    /// `nothing_older` when the history stores none older.
    pub(super) fn from_history(
        epoch: String,
        last_id: u64,
        messages: &[Arc<Message>],
        nothing_older: bool,
        keep_recent: usize,
    ) -> Self {
        let skip = messages.len().saturating_sub(keep_recent);
        Self {
            epoch,
            last_id,
            recent: messages[skip..].iter().cloned().collect(),
            nothing_older: nothing_older && skip == 0,
            acked_id: 0,
        }
    }

    /// Starts over at a message that does not follow `last_id`: a new epoch, or a gap the
    /// history could not fill. (Ids start at 1: the epoch starts before its first message.)
    pub(super) fn restart_at(message: &Arc<Message>, keep_recent: usize) -> Self {
        let id = message.id();
        let mut stream = Self {
            epoch: message.epoch().to_owned(),
            last_id: id.saturating_sub(1),
            recent: VecDeque::new(),
            // The first id of an epoch: there is nothing older.
            nothing_older: id <= 1,
            acked_id: 0,
        };
        if id > 0 {
            stream.push_next(message.clone(), keep_recent);
        }
        stream
    }

    /// Follows the next message, `last_id + 1`.
    pub(super) fn push_next(&mut self, message: Arc<Message>, keep_recent: usize) {
        self.last_id += 1;
        self.recent.push_back(message);
        if self.recent.len() > keep_recent {
            self.recent.pop_front();
            self.nothing_older = false;
        }
    }

    /// Takes `message` if it is the next one.
    pub(super) fn follow(&mut self, message: &Arc<Message>, keep_recent: usize) -> Arrival {
        let id = message.id();
        if self.epoch != message.epoch() || id > self.last_id + 1 {
            return Arrival::Gap;
        }
        if id <= self.last_id {
            return Arrival::AlreadyDelivered;
        }
        self.push_next(message.clone(), keep_recent);
        Arrival::Next
    }

    /// The id of `recent`'s first message (`last_id + 1` when it is empty).
    fn first_id(&self) -> u64 {
        self.last_id + 1 - self.recent.len() as u64
    }

    /// Drops messages older than the history keeps them, as the next publish would.
    fn expire(&mut self, ttl: Duration) {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_millis() as u64;
        let cutoff = now.saturating_sub(ttl.as_millis() as u64);
        while let Some(ts) = self.recent.front().map(|m| m.ts())
            && ts < cutoff
        {
            self.recent.pop_front();
            // Anything older is older still: the history no longer has it either.
            self.nothing_older = true;
        }
    }

    /// The snapshot a join gets, from these messages alone, when they hold exactly what
    /// Redis would send: all of what followed `since`, or the newest `history_on_join`.
    /// Messages older than `history_ttl` are dropped first, as the next publish would.
    pub(super) fn answer(
        &mut self,
        since: Option<&Since>,
        history_on_join: usize,
        history_ttl: Duration,
    ) -> LocalAnswer {
        if self.last_id < self.acked_id {
            return LocalAnswer::Behind {
                epoch: self.epoch.clone(),
                acked_id: self.acked_id,
            };
        }
        self.expire(history_ttl);
        let (skip, recovered) = match since {
            Some(since) if since.epoch == self.epoch && since.id <= self.last_id => {
                if since.id + 1 >= self.first_id() {
                    ((since.id + 1 - self.first_id()) as usize, Some(true))
                } else if self.nothing_older {
                    // `since + 1` is no longer stored: all that is, which is all here.
                    (0, Some(false))
                } else {
                    return LocalAnswer::AskRedis; // Redis may store more of what followed `since`.
                }
            }
            _ => {
                if !self.nothing_older && self.recent.len() < history_on_join {
                    return LocalAnswer::AskRedis;
                }
                (0, since.map(|_| false))
            }
        };
        LocalAnswer::Ready(Snapshot {
            epoch: self.epoch.clone(),
            last_id: self.last_id,
            messages: self.recent.iter().skip(skip).cloned().collect(),
            recovered,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message_in(epoch: &str, id: u64, ts: u64) -> Arc<Message> {
        let room = crate::protocol::RoomName::new("r").unwrap();
        let draft = crate::protocol::message::Draft::new(room, "a".into(), ts, "x".into());
        Arc::new(draft.accept(id, epoch.into()))
    }

    fn message(id: u64, ts: u64) -> Arc<Message> {
        message_in("e", id, ts)
    }

    fn ids(stream: &RoomStream) -> Vec<u64> {
        stream.recent.iter().map(|m| m.id()).collect()
    }

    #[test]
    fn stream_keeps_the_newest_and_knows_when_it_holds_all_there_is() {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_millis() as u64;
        let frames: Vec<Arc<Message>> = (1..=3).map(|id| message(id, now)).collect();
        let mut stream = RoomStream::from_history("e".into(), 3, &frames, true, 4);
        assert_eq!(
            (ids(&stream), stream.first_id(), stream.nothing_older),
            (vec![1, 2, 3], 1, true)
        );
        stream.push_next(message(4, now), 4);
        assert!(stream.nothing_older);
        stream.push_next(message(5, now), 4);
        assert_eq!(
            (ids(&stream), stream.first_id(), stream.nothing_older),
            (vec![2, 3, 4, 5], 2, false)
        );
        // More than it keeps: the oldest are left out, and others may be stored.
        let stream = RoomStream::from_history("e".into(), 3, &frames, true, 2);
        assert_eq!((ids(&stream), stream.nothing_older), (vec![2, 3], false));
        // Nothing kept: first is the next id.
        let stream = RoomStream::from_history("e".into(), 7, &[], false, 0);
        assert_eq!(stream.first_id(), 8);
        let stream = RoomStream::restart_at(&message_in("f", 1, now), 4);
        assert_eq!(
            (ids(&stream), stream.last_id, stream.nothing_older),
            (vec![1], 1, true)
        );
        let stream = RoomStream::restart_at(&message_in("f", 9, now), 4);
        assert_eq!(
            (ids(&stream), stream.first_id(), stream.nothing_older),
            (vec![9], 9, false)
        );
    }

    #[test]
    fn stream_restarting_at_id_0_keeps_nothing_and_does_not_underflow() {
        let mut stream = RoomStream::restart_at(&message_in("f", 0, 1), 4);
        assert_eq!(
            (
                ids(&stream),
                stream.last_id,
                stream.first_id(),
                stream.nothing_older
            ),
            (vec![], 0, 1, true)
        );
        // The epoch's first real message follows.
        assert!(matches!(
            stream.follow(&message_in("f", 1, 1), 4),
            Arrival::Next
        ));
        assert_eq!((ids(&stream), stream.last_id), (vec![1], 1));
    }

    #[test]
    fn stream_drops_what_the_history_no_longer_keeps() {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_millis() as u64;
        let frames = [
            message(4, now - 90_000),
            message(5, now - 70_000),
            message(6, now),
        ];
        let mut stream = RoomStream::from_history("e".into(), 6, &frames, false, 3);
        stream.expire(Duration::from_secs(80));
        assert_eq!((ids(&stream), stream.nothing_older), (vec![5, 6], true));
        stream.expire(Duration::from_secs(3600));
        assert_eq!(ids(&stream), [5, 6]);
    }
}
