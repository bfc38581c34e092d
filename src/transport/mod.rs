//! Transports carry every chat message from the session that sent it to the hub of each node
//! with members in its room, assigning the room's next id on the way. There is one delivery
//! path: `publish` an [`Envelope`]; the transport hands the encoded frame to
//! [`Hub::deliver`](crate::hub::Hub::deliver) in id order.
//!
//! `memory` serves one node in-process; `redis` shares rooms among any number of nodes.

mod memory;
mod redis;

use std::sync::Arc;

pub use memory::MemoryTransport;
pub use redis::RedisTransport;

use crate::config::{Config, TransportKind};
use crate::hub::Hub;
use crate::metrics::Metrics;
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
    /// The transport cannot accept messages right now; the message was not delivered.
    #[error("{0}; not delivered")]
    Unavailable(String),
    /// The transport did not answer in time; the message may still be delivered.
    #[error("{0}; it may still be delivered")]
    Timeout(String),
}

/// The transport in use.
#[derive(Debug)]
pub enum Transport {
    /// In-process, one node.
    Memory(MemoryTransport),
    /// Redis Pub/Sub, many nodes.
    Redis(Arc<RedisTransport>),
}

impl Transport {
    /// Builds the transport `config` names, delivering into `hub` and reporting the
    /// backplane's state in `metrics`. The Redis transport starts its subscriber task, so
    /// this must run inside the runtime.
    pub fn new(
        config: &Config,
        hub: Arc<Hub>,
        metrics: Arc<Metrics>,
    ) -> Result<Self, TransportError> {
        Ok(match config.transport {
            TransportKind::Memory => {
                // In-process delivery is always up.
                metrics.backplane_up.set(1);
                Transport::Memory(MemoryTransport::new(hub))
            }
            TransportKind::Redis => {
                Transport::Redis(RedisTransport::spawn(&config.redis, hub, metrics)?)
            }
        })
    }

    /// Assigns the room's next id to `envelope` and delivers it to every member of its room,
    /// on every node; returns the id once the message is accepted.
    pub async fn publish(&self, envelope: Envelope) -> Result<u64, TransportError> {
        match self {
            Transport::Memory(t) => Ok(t.publish(&envelope)),
            Transport::Redis(t) => t.publish(&envelope).await,
        }
    }

    /// This node is about to have a member in `room`: receive its messages from now on.
    pub async fn subscribe(&self, room: &RoomName) {
        match self {
            Transport::Memory(_) => {}
            Transport::Redis(t) => t.subscribe(room).await,
        }
    }

    /// This node has no member left in `room`: stop receiving its messages.
    pub fn unsubscribe(&self, room: &RoomName) {
        match self {
            Transport::Memory(_) => {}
            Transport::Redis(t) => t.unsubscribe(room),
        }
    }

    /// Whether the transport can accept messages now.
    pub fn is_ready(&self) -> bool {
        match self {
            Transport::Memory(_) => true,
            Transport::Redis(t) => t.is_ready(),
        }
    }
}
