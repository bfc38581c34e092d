//! Catching up from the hot store: a message the queue refused (full) is not lost while the
//! room's history still holds it. The archive remembers, per room, the first id it refused;
//! once the queue has room again, the writer asks the hot store (the embedded transport's
//! room logs) for that room's messages from there on and queues them. Messages the history no
//! longer holds are counted as missed and logged. Re-queuing a message that was also queued
//! later is harmless: the insert is idempotent.
//!
//! The rooms remembered are bounded ([`MAX_ROOMS`]); a refusal in yet another room is counted
//! as missed at once.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};

use tracing::warn;

use super::Shared;
use crate::protocol::RoomName;
use crate::protocol::message::Message;

/// Rooms with refused messages remembered at most.
pub const MAX_ROOMS: usize = 10_000;

/// Where a room's archive fell behind: the epoch and the first id the queue refused.
#[derive(Debug, Clone)]
struct Behind {
    epoch: Arc<str>,
    from: u64,
}

/// What the archive asks of the hot store to catch up.
pub trait HotStore: Send + Sync + std::fmt::Debug {
    /// The messages of `room` in `epoch` with ids from `from` on that the store still holds,
    /// oldest first (none when the room is now in another epoch).
    fn since(&self, room: &RoomName, epoch: &str, from: u64) -> Vec<Arc<Message>>;
}

/// Rooms whose archive fell behind, and the hot store to catch up from.
#[derive(Debug, Default)]
pub struct CatchUp {
    behind: Mutex<HashMap<RoomName, Behind>>,
    store: Mutex<Option<Arc<dyn HotStore>>>,
}

impl CatchUp {
    fn rooms(&self) -> std::sync::MutexGuard<'_, HashMap<RoomName, Behind>> {
        self.behind.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Uses `store` from now on.
    pub fn set_store(&self, store: Arc<dyn HotStore>) {
        *self.store.lock().unwrap_or_else(PoisonError::into_inner) = Some(store);
    }

    /// The queue refused `message`: remember where its room fell behind. `false` when the
    /// room could not be remembered (too many rooms, or no hot store to catch up from).
    pub fn refused(&self, message: &Message) -> bool {
        if self
            .store
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .is_none()
        {
            return false;
        }
        let mut rooms = self.rooms();
        match rooms.get(message.room()) {
            // Already behind in this epoch from an earlier id: that covers this one.
            Some(behind) if &*behind.epoch == message.epoch() => return true,
            // Behind in an older epoch, which the store no longer serves: the new one counts.
            Some(_) => {}
            None if rooms.len() >= MAX_ROOMS => return false,
            None => {}
        }
        rooms.insert(
            message.room().clone(),
            Behind {
                epoch: Arc::from(message.epoch()),
                from: message.id(),
            },
        );
        true
    }

    /// Whether some room is behind.
    pub fn pending(&self) -> bool {
        !self.rooms().is_empty()
    }
}

/// Queues what the hot store still holds of the rooms that fell behind, while the queue has
/// room (below half of its bound, so live messages keep a place).
pub(super) fn run_once(shared: &Shared) {
    let Some(store) = shared
        .catch_up
        .store
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .clone()
    else {
        return;
    };
    loop {
        if shared.queue.depth().0 * 2 >= shared.config.queue_max_messages {
            return;
        }
        let next = {
            let mut rooms = shared.catch_up.rooms();
            let Some(room) = rooms.keys().next().cloned() else {
                return;
            };
            rooms.remove(&room).map(|behind| (room, behind))
        };
        let Some((room, behind)) = next else {
            return;
        };
        let held = store.since(&room, &behind.epoch, behind.from);
        let first = held.first().map_or(u64::MAX, |m| m.id());
        let missed = first.saturating_sub(behind.from);
        if missed > 0 {
            count_missed(shared, room.as_str(), missed, held.is_empty());
        }
        for message in held {
            if !shared.queue.push(message.clone()) {
                // Full again: behind from here.
                shared.catch_up.rooms().insert(
                    room.clone(),
                    Behind {
                        epoch: behind.epoch.clone(),
                        from: message.id(),
                    },
                );
                return;
            }
        }
    }
}

fn count_missed(shared: &Shared, room: &str, missed: u64, nothing_held: bool) {
    if nothing_held {
        // The store holds nothing after `from` (expired, or another epoch): how many were
        // lost is not known here; at least the refused one.
        shared.metrics.archive.missed_total.inc();
        warn!(
            room,
            "messages lost to the archive: the room's history no longer held them"
        );
    } else {
        shared.metrics.archive.missed_total.add(missed);
        warn!(
            room,
            count = missed,
            "messages lost to the archive: the room's history no longer held them"
        );
    }
}
