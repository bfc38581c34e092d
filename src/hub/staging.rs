//! What a joining member is sent while its history is read: the room's live messages and
//! presence events, kept in order in a queue bounded like the member's outbox, in items and in
//! bytes, and handed over when the join ends.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, PoisonError};

use bytes::Bytes;

use crate::outbox::Outbox;
use crate::protocol::message::{Codec, Message};

/// One thing kept for a joining member.
#[derive(Debug)]
pub enum Staged {
    /// A chat message: sent unless its history already held it.
    Message(Arc<Message>),
    /// Any other frame of the room (a presence event), already in the member's codec.
    Frame(Bytes),
}

impl Staged {
    fn size(&self) -> usize {
        match self {
            Staged::Message(message) => message.frame(Codec::Native).len(),
            Staged::Frame(frame) => frame.len(),
        }
    }
}

/// The room's traffic for a joining member while it is sent the room's history.
#[derive(Debug)]
pub struct Staging {
    max_items: usize,
    max_bytes: usize,
    queue: Mutex<StagedQueue>,
}

#[derive(Debug, Default)]
struct StagedQueue {
    items: VecDeque<Staged>,
    bytes: usize,
    overflowed: bool,
}

impl Staging {
    /// A staging queue as bounded as `outbox`.
    pub fn like(outbox: &Outbox) -> Self {
        Self {
            max_items: outbox.capacity(),
            max_bytes: outbox.max_bytes(),
            queue: Mutex::default(),
        }
    }

    /// Keeps `item`; `false` once the bounds are passed (everything is dropped then: the
    /// member is a slow consumer).
    pub(super) fn push(&self, item: Staged) -> bool {
        let mut queue = self.queue.lock().unwrap_or_else(PoisonError::into_inner);
        if queue.overflowed {
            return false;
        }
        let size = item.size();
        if queue.items.len() >= self.max_items || queue.bytes + size > self.max_bytes {
            *queue = StagedQueue {
                overflowed: true,
                ..StagedQueue::default()
            };
            return false;
        }
        queue.bytes += size;
        queue.items.push_back(item);
        true
    }

    /// What was kept, oldest first; `None` if it overflowed.
    pub(super) fn take(&self) -> Option<VecDeque<Staged>> {
        let mut queue = self.queue.lock().unwrap_or_else(PoisonError::into_inner);
        let queue = std::mem::take(&mut *queue);
        (!queue.overflowed).then_some(queue.items)
    }
}
