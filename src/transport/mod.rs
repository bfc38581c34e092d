//! Transports carry every chat message from the session that sent it to the hub of each node
//! with members in its room, assigning the room's next id on the way. There is one delivery
//! path: `publish` an [`Envelope`]; the transport hands the encoded frame to
//! [`Hub::deliver`](crate::hub::Hub::deliver) in id order.
//!
//! `memory` serves one node in-process.

mod memory;

use std::sync::Arc;

pub use memory::MemoryTransport;

use crate::config::{Config, TransportKind};
use crate::hub::Hub;
use crate::protocol::RoomName;
use crate::protocol::native::MessageTemplate;

/// A chat message on its way to a room, already encoded but for its id.
#[derive(Debug, Clone)]
pub struct Envelope {
    /// The room.
    pub room: RoomName,
    /// The encoded message.
    pub message: MessageTemplate,
}

/// Why a message could not be accepted. The sender is told; nothing is retried silently.
#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    /// The transport cannot accept messages right now.
    #[error("transport unavailable: {0}")]
    Unavailable(String),
}

/// The transport in use.
#[derive(Debug)]
pub enum Transport {
    /// In-process, one node.
    Memory(MemoryTransport),
}

impl Transport {
    /// Builds the transport `config` names, delivering into `hub`.
    pub fn new(config: &Config, hub: Arc<Hub>) -> Self {
        match config.transport {
            TransportKind::Memory => Transport::Memory(MemoryTransport::new(hub)),
        }
    }

    /// Assigns the room's next id to `envelope` and delivers it to every member of its room,
    /// on every node; returns the id once the message is accepted.
    pub async fn publish(&self, envelope: Envelope) -> Result<u64, TransportError> {
        match self {
            Transport::Memory(t) => Ok(t.publish(&envelope)),
        }
    }

    /// This node now has a member in `room`: start receiving its messages.
    pub fn subscribe(&self, _room: &RoomName) {
        match self {
            Transport::Memory(_) => {}
        }
    }

    /// This node has no member left in `room`: stop receiving its messages.
    pub fn unsubscribe(&self, _room: &RoomName) {
        match self {
            Transport::Memory(_) => {}
        }
    }

    /// Whether the transport can accept messages now.
    pub fn is_ready(&self) -> bool {
        match self {
            Transport::Memory(_) => true,
        }
    }
}
