//! What this node knows of each room it receives: the epoch and the last id it delivered,
//! against which every message from the channel is checked (the next one is taken, one
//! already delivered is dropped, anything else is a gap to heal), and, with
//! `redis.local_history`, the room's newest `rooms.history_on_join` messages, followed on the
//! channel, from which a join is answered without a Redis call when they hold exactly what
//! Redis would send.

use std::collections::VecDeque;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;

use crate::protocol::native::{self, Since};
use crate::protocol::ws;
use crate::transport::Snapshot;

/// What this node knows of a room it receives: the newest message it delivered (to find
/// gaps) and the messages up to it (to answer joins).
#[derive(Debug)]
pub(super) struct Seen {
    pub(super) epoch: String,
    pub(super) last: u64,
    /// The newest messages, oldest first, with consecutive ids up to `last`; at most `keep`.
    recent: VecDeque<Bytes>,
    /// The history stores no message older than `recent`'s first.
    whole: bool,
    /// The newest id this node's publishes were acked with: a join waits until `last`
    /// reaches it, so a client's own messages are in the history it joins with.
    pub(super) acked: u64,
}

/// What [`Seen::follow`] made of a message.
pub(super) enum Step {
    /// Delivered already.
    Had,
    /// The next message: now the newest.
    Took,
    /// Not the next one: a gap, or another epoch.
    Gap,
}

/// What [`Seen::answer`] can answer.
pub(super) enum Local {
    Ready(Snapshot),
    /// The channel has not brought every message this node acked yet: up to `acked` of
    /// `epoch`.
    Behind {
        epoch: String,
        acked: u64,
    },
    /// Only Redis can answer.
    No,
}

impl Seen {
    /// Starts from `frames`, the newest stored messages up to `last` (consecutive ids);
    /// `whole` when the history stores none older.
    pub(super) fn new(
        epoch: String,
        last: u64,
        frames: &[Bytes],
        whole: bool,
        keep: usize,
    ) -> Self {
        let skip = frames.len().saturating_sub(keep);
        Self {
            epoch,
            last,
            recent: frames[skip..].iter().cloned().collect(),
            whole: whole && skip == 0,
            acked: 0,
        }
    }

    /// Starts over at a message that does not follow `last`: a new epoch, or a gap the
    /// history could not fill. Ids start at 1: a message claiming id 0 is not kept, and the
    /// epoch starts before its first message.
    pub(super) fn restart(epoch: &str, id: u64, frame: Bytes, keep: usize) -> Self {
        let mut seen = Self {
            epoch: epoch.to_owned(),
            last: id.saturating_sub(1),
            recent: VecDeque::new(),
            // The first id of an epoch: there is nothing older.
            whole: id <= 1,
            acked: 0,
        };
        if id > 0 {
            seen.push(frame, keep);
        }
        seen
    }

    /// Follows the next message, `last + 1`.
    pub(super) fn push(&mut self, frame: Bytes, keep: usize) {
        self.last += 1;
        self.recent.push_back(frame);
        if self.recent.len() > keep {
            self.recent.pop_front();
            self.whole = false;
        }
    }

    /// Takes message `id` of `epoch` if it is the next one.
    pub(super) fn follow(&mut self, epoch: &str, id: u64, frame: &Bytes, keep: usize) -> Step {
        if self.epoch != epoch || id > self.last + 1 {
            return Step::Gap;
        }
        if id <= self.last {
            return Step::Had;
        }
        self.push(frame.clone(), keep);
        Step::Took
    }

    /// The id of `recent`'s first message (`last + 1` when it is empty).
    fn first(&self) -> u64 {
        self.last + 1 - self.recent.len() as u64
    }

    /// Drops messages older than the history keeps them, as the next publish would.
    fn expire(&mut self, ttl: Duration) {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_millis() as u64;
        let cutoff = now.saturating_sub(ttl.as_millis() as u64);
        while let Some(ts) = self
            .recent
            .front()
            .and_then(|frame| native::message_ts(&ws::text_payload(frame)))
            && ts < cutoff
        {
            self.recent.pop_front();
            // Anything older is older still: the history no longer has it either.
            self.whole = true;
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
    ) -> Local {
        if self.last < self.acked {
            return Local::Behind {
                epoch: self.epoch.clone(),
                acked: self.acked,
            };
        }
        self.expire(history_ttl);
        let (skip, recovered) = match since {
            Some(since) if since.epoch == self.epoch && since.id <= self.last => {
                if since.id + 1 >= self.first() {
                    ((since.id + 1 - self.first()) as usize, Some(true))
                } else if self.whole {
                    // `since + 1` is no longer stored: all that is, which is all here.
                    (0, Some(false))
                } else {
                    return Local::No; // Redis may store more of what followed `since`.
                }
            }
            _ => {
                if !self.whole && self.recent.len() < history_on_join {
                    return Local::No;
                }
                (0, since.map(|_| false))
            }
        };
        Local::Ready(Snapshot {
            epoch: self.epoch.clone(),
            last_id: self.last,
            frames: self.recent.iter().skip(skip).cloned().collect(),
            recovered,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message(id: u64, ts: u64) -> Bytes {
        ws::text(
            format!(r#"{{"type":"message","room":"r","from":"a","message":"x","ts":{ts},"id":{id},"epoch":"e"}}"#)
                .as_bytes(),
        )
    }

    fn ids(seen: &Seen) -> Vec<u64> {
        let id = |f: &Bytes| native::message_meta(&ws::text_payload(f)).unwrap().0;
        seen.recent.iter().map(id).collect()
    }

    #[test]
    fn seen_keeps_the_newest_and_knows_when_it_holds_all_there_is() {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_millis() as u64;
        let frames: Vec<Bytes> = (1..=3).map(|id| message(id, now)).collect();
        let mut seen = Seen::new("e".into(), 3, &frames, true, 4);
        assert_eq!(
            (ids(&seen), seen.first(), seen.whole),
            (vec![1, 2, 3], 1, true)
        );
        seen.push(message(4, now), 4);
        assert!(seen.whole);
        seen.push(message(5, now), 4);
        assert_eq!(
            (ids(&seen), seen.first(), seen.whole),
            (vec![2, 3, 4, 5], 2, false)
        );
        // More than it keeps: the oldest are left out, and others may be stored.
        let seen = Seen::new("e".into(), 3, &frames, true, 2);
        assert_eq!((ids(&seen), seen.whole), (vec![2, 3], false));
        // Nothing kept: first is the next id.
        let seen = Seen::new("e".into(), 7, &[], false, 0);
        assert_eq!(seen.first(), 8);
        let seen = Seen::restart("f", 1, message(1, now), 4);
        assert_eq!((ids(&seen), seen.last, seen.whole), (vec![1], 1, true));
        let seen = Seen::restart("f", 9, message(9, now), 4);
        assert_eq!((ids(&seen), seen.first(), seen.whole), (vec![9], 9, false));
    }

    #[test]
    fn seen_restarting_at_id_0_keeps_nothing_and_does_not_underflow() {
        let mut seen = Seen::restart("f", 0, message(0, 1), 4);
        assert_eq!(
            (ids(&seen), seen.last, seen.first(), seen.whole),
            (vec![], 0, 1, true)
        );
        // The epoch's first real message follows.
        assert!(matches!(seen.follow("f", 1, &message(1, 1), 4), Step::Took));
        assert_eq!((ids(&seen), seen.last), (vec![1], 1));
    }

    #[test]
    fn seen_drops_what_the_history_no_longer_keeps() {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_millis() as u64;
        let frames = [
            message(4, now - 90_000),
            message(5, now - 70_000),
            message(6, now),
        ];
        let mut seen = Seen::new("e".into(), 6, &frames, false, 3);
        assert_eq!(native::message_ts(&ws::text_payload(&frames[2])), Some(now));
        seen.expire(Duration::from_secs(80));
        assert_eq!((ids(&seen), seen.whole), (vec![5, 6], true));
        seen.expire(Duration::from_secs(3600));
        assert_eq!(ids(&seen), [5, 6]);
    }
}
