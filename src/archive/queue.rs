//! The archive's queue: accepted messages waiting to be written, bounded in messages and in
//! bytes. The bounds count a message from the moment it is queued until its batch is
//! committed, so a PostgreSQL outage holds at most the bounds in memory. Pushing never waits:
//! past a bound the message is refused and the caller counts it (the policy is the caller's,
//! see the module docs of `archive`).

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, PoisonError};

use tokio::sync::Notify;

use crate::protocol::message::Message;

/// Bytes a queued message is counted for: its fields and a fixed overhead.
pub fn size_of(message: &Message) -> usize {
    message.room().as_str().len()
        + message.epoch().len()
        + message.user().len()
        + message.text().len()
        + 64
}

/// A bounded queue of messages to archive, and the count of those being written.
#[derive(Debug)]
pub struct Queue {
    inner: Mutex<Inner>,
    max_messages: usize,
    max_bytes: usize,
    /// Wakes the writer when a message arrives.
    arrived: Notify,
}

#[derive(Debug, Default)]
struct Inner {
    waiting: VecDeque<Arc<Message>>,
    /// Waiting and being written.
    messages: usize,
    bytes: usize,
}

impl Queue {
    /// An empty queue holding at most `max_messages` messages and `max_bytes` bytes.
    pub fn new(max_messages: usize, max_bytes: usize) -> Self {
        Self {
            inner: Mutex::new(Inner::default()),
            max_messages,
            max_bytes,
            arrived: Notify::new(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // Nothing in the lock scope panics; a poisoned lock still holds consistent counts.
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Queues `message`; `false` (and nothing queued) when either bound would be passed.
    pub fn push(&self, message: Arc<Message>) -> bool {
        let size = size_of(&message);
        {
            let mut inner = self.lock();
            if inner.messages + 1 > self.max_messages || inner.bytes + size > self.max_bytes {
                return false;
            }
            inner.messages += 1;
            inner.bytes += size;
            inner.waiting.push_back(message);
        }
        self.arrived.notify_one();
        true
    }

    /// Takes up to `max` waiting messages, oldest first; they stay counted until
    /// [`Queue::written`].
    pub fn take(&self, max: usize) -> Vec<Arc<Message>> {
        let mut inner = self.lock();
        let n = max.min(inner.waiting.len());
        inner.waiting.drain(..n).collect()
    }

    /// A batch taken with [`Queue::take`] is committed (or given up): no longer counted.
    pub fn written(&self, batch: &[Arc<Message>]) {
        let bytes: usize = batch.iter().map(|m| size_of(m)).sum();
        let mut inner = self.lock();
        inner.messages = inner.messages.saturating_sub(batch.len());
        inner.bytes = inner.bytes.saturating_sub(bytes);
    }

    /// Messages and bytes waiting or being written.
    pub fn depth(&self) -> (usize, usize) {
        let inner = self.lock();
        (inner.messages, inner.bytes)
    }

    /// Messages waiting to be taken.
    pub fn waiting(&self) -> usize {
        self.lock().waiting.len()
    }

    /// When the oldest waiting message was accepted (ms since the Unix epoch).
    pub fn oldest_waiting_ts(&self) -> Option<u64> {
        self.lock().waiting.front().map(|m| m.ts())
    }

    /// Waits until a message may be waiting (returns at once if one arrived since the last
    /// call).
    pub async fn arrived(&self) {
        self.arrived.notified().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::RoomName;
    use crate::protocol::message::Draft;

    fn message(id: u64, text: &str) -> Arc<Message> {
        let room = RoomName::new("dev").unwrap();
        Arc::new(Draft::new(room, "ann".into(), 1, text.to_owned()).accept(id, "e".into()))
    }

    #[test]
    fn both_bounds_refuse_and_count_until_written() {
        let q = Queue::new(2, 1000);
        assert!(q.push(message(1, "a")));
        assert!(q.push(message(2, "b")));
        assert!(!q.push(message(3, "c")), "item bound");
        let batch = q.take(10);
        assert_eq!(batch.len(), 2);
        assert!(
            !q.push(message(3, "c")),
            "still counted while being written"
        );
        q.written(&batch);
        assert_eq!(q.depth(), (0, 0));
        assert!(q.push(message(3, "c")));
        let q = Queue::new(100, 200);
        assert!(!q.push(message(1, &"x".repeat(200))), "byte bound");
        assert!(q.push(message(1, "short")));
    }
}
