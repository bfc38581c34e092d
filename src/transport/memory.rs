//! The embedded transport: one node, no external service. Ids come from a per-room counter;
//! the counter's lock is held while the frame is handed to the hub, so every member sees
//! messages in id order.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};

use crate::hub::Hub;
use crate::protocol::RoomName;
use crate::transport::Envelope;

/// In-process transport.
#[derive(Debug)]
pub struct MemoryTransport {
    hub: Arc<Hub>,
    // Room -> last id. Outer lock only to find the room's counter; the per-room lock orders
    // id assignment and delivery, so rooms do not wait on each other.
    last_ids: Mutex<HashMap<RoomName, Arc<Mutex<u64>>>>,
}

impl MemoryTransport {
    /// A transport delivering into `hub`.
    pub fn new(hub: Arc<Hub>) -> Self {
        Self {
            hub,
            last_ids: Mutex::new(HashMap::new()),
        }
    }

    /// Assigns the next id and delivers; returns the id.
    pub fn publish(&self, envelope: &Envelope) -> u64 {
        let counter = {
            let mut rooms = self.last_ids.lock().unwrap_or_else(PoisonError::into_inner);
            match rooms.get(&envelope.room) {
                Some(counter) => counter.clone(),
                None => rooms.entry(envelope.room.clone()).or_default().clone(),
            }
        };
        let mut last = counter.lock().unwrap_or_else(PoisonError::into_inner);
        *last += 1;
        let frame = envelope.message.frame(*last);
        self.hub.deliver(envelope.room.as_str(), &frame);
        *last
    }
}
