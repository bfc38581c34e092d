//! Transports carry every chat message from the session that sent it to the hub of each node
//! with members in its room, assigning the room's next id on the way. There is one delivery
//! path: `publish` an [`Envelope`]; the transport stores the message in the room's history and
//! hands it, a typed [`Message`] with its frames, to [`Hub::deliver`](crate::hub::Hub::deliver)
//! in id order, in one atomic step, so history and live delivery never disagree.
//!
//! Each room's history has an epoch, a random name given when the room's store is created:
//! ids restart at 1 only with a new epoch, so a client that comes back with an old epoch is
//! told its position is gone instead of being served the wrong messages.
//!
//! `memory` serves one node in-process; `redis` shares rooms among any number of nodes.

mod local_presence;
mod memory;
mod redis;

use std::sync::Arc;
use std::time::Duration;

pub use memory::MemoryTransport;
pub use redis::RedisTransport;

use crate::archive::{Archive, Position};
use crate::config::{Config, TransportKind};
use crate::hub::Hub;
use crate::metrics::Metrics;
use crate::protocol::RoomName;
use crate::protocol::message::{Draft, Message};
use crate::protocol::native::Since;
use crate::protocol::presence;
use crate::webhooks::Webhooks;

/// A chat message on its way to a room, already encoded but for its id.
#[derive(Debug, Clone)]
pub struct Envelope {
    /// The message, with its room.
    pub draft: Draft,
    /// The sender's name and `ref`, when it sent one: a second `send` with the same key
    /// within the dedupe window is not delivered again.
    pub dedupe: Option<String>,
}

/// The key under which a `ref` is remembered: unique per user name and room.
pub fn dedupe_key(user: &str, reference: &str) -> String {
    // Names hold no control characters, so the separator cannot be forged.
    format!("{user}\u{1f}{reference}")
}

/// A message the transport accepted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Published {
    /// Its id in the room.
    pub id: u64,
    /// The `ref` had already been accepted as message `id`; nothing was delivered now.
    pub duplicate: bool,
}

/// What a client joining a room is sent before live messages.
#[derive(Debug, Clone)]
pub struct Snapshot {
    /// The room history's epoch.
    pub epoch: String,
    /// The newest id when the snapshot was taken (0: no message yet).
    pub last_id: u64,
    /// Messages, oldest first, all with ids up to `last_id`.
    pub messages: Vec<Arc<Message>>,
    /// With `since`: whether `frames` are exactly the messages after it.
    pub recovered: Option<bool>,
}

/// One page of older messages.
#[derive(Debug, Clone)]
pub struct Page {
    /// The room history's epoch.
    pub epoch: String,
    /// The messages, oldest first.
    pub messages: Vec<Arc<Message>>,
    /// Whether still older messages are stored.
    pub more: bool,
}

/// A join's hold on its room's subscription, from [`Transport::subscribe`] until the hub
/// has the member; dropped before [`Subscription::joined`], it gives the room up.
#[must_use = "dropped, the room is given up"]
#[derive(Debug)]
pub struct Subscription<'a>(Option<redis::Joining<'a>>);

impl Subscription<'_> {
    /// The hub has the member: from now on its leave gives the room up.
    pub fn joined(self) {
        if let Some(joining) = self.0 {
            joining.joined();
        }
    }
}

/// A page of rooms with their users online, and the next page's cursor.
pub type RoomList = (Vec<(RoomName, usize)>, Option<String>);

/// A new random epoch: 16 hex digits. Not a credential: it names a room's history so that a
/// client can tell a restart from a gap, and grants nothing (a non-cryptographic RNG will do).
pub fn new_epoch() -> String {
    format!("{:016x}", fastrand::u64(..))
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
    /// The request cannot be served as asked (a presence cursor the transport never gave).
    #[error("{0}")]
    BadRequest(String),
}

/// The archive as a transport feeds it: the archive, and where each of its rooms left off
/// (read at start, for the embedded transport to continue their epoch and ids).
#[derive(Debug)]
pub struct Archived {
    /// The archive.
    pub archive: Arc<Archive>,
    /// Each archived room's newest epoch and id.
    pub positions: Vec<(RoomName, Position)>,
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
    /// backplane's state in `metrics`, emitting the webhooks' events. It starts the webhooks'
    /// tasks (and the Redis transport its subscriber task), so this must run inside the
    /// runtime.
    pub fn new(
        config: &Config,
        node: &str,
        hub: Arc<Hub>,
        metrics: Arc<Metrics>,
        archived: Option<Archived>,
    ) -> Result<Self, TransportError> {
        let webhooks = Webhooks::spawn(
            &config.webhooks,
            &config.event_stream,
            node,
            metrics.clone(),
        );
        Ok(match config.transport {
            TransportKind::Memory => {
                // In-process delivery is always up.
                metrics.backplane_up.set(1);
                Transport::Memory(
                    match archived {
                        Some(archived) => {
                            MemoryTransport::with_archive(hub, config.rooms.clone(), archived)
                        }
                        None => MemoryTransport::new(hub, config.rooms.clone()),
                    }
                    .with_webhooks(webhooks),
                )
            }
            TransportKind::Redis => Transport::Redis(RedisTransport::spawn(
                &config.redis,
                &config.rooms,
                node,
                &config.server.internal_addr,
                hub,
                metrics,
                webhooks,
                // With the archive on, the publish script feeds its stream.
                archived.map_or(0, |_| config.archive.queue_max_messages),
            )?),
        })
    }

    /// Assigns the room's next ids to `envelopes`, all of one room, in their order; stores
    /// them and delivers them to every member of the room, on every node; returns their ids
    /// once they are accepted. The embedded transport publishes them one after the other,
    /// Redis in one script call: atomic, so no reconnect, retry or redirect beneath can
    /// reorder them, and they fail together (a timeout leaves each possibly delivered).
    pub async fn publish(
        &self,
        envelopes: Vec<Envelope>,
    ) -> Result<Vec<Published>, TransportError> {
        match self {
            Transport::Memory(t) => Ok(envelopes.into_iter().map(|e| t.publish(e)).collect()),
            Transport::Redis(t) => t.publish(&envelopes).await,
        }
    }

    /// The history a client joining `room` gets (see [`Snapshot`]).
    pub async fn snapshot(
        &self,
        room: &RoomName,
        since: Option<&Since>,
    ) -> Result<Snapshot, TransportError> {
        match self {
            Transport::Memory(t) => Ok(t.snapshot(room, since)),
            Transport::Redis(t) => t.snapshot(room, since).await,
        }
    }

    /// Up to `limit` messages of `room` older than `before`, for scroll-back.
    pub async fn page(
        &self,
        room: &RoomName,
        before: Option<u64>,
        limit: usize,
    ) -> Result<Page, TransportError> {
        match self {
            Transport::Memory(t) => Ok(t.page(room, before, limit)),
            Transport::Redis(t) => t.page(room, before, limit).await,
        }
    }

    /// This node is about to have a member in `room`: receive its messages from now on.
    /// Call [`Subscription::joined`] once the hub has the member; a join that ends before
    /// (cancelled, even while this waits) gives the room up again, so no subscription
    /// outlives it.
    pub async fn subscribe(&self, room: &RoomName) -> Subscription<'_> {
        match self {
            Transport::Memory(_) => Subscription(None),
            Transport::Redis(t) => Subscription(Some(t.subscribe(room).await)),
        }
    }

    /// Waits (at most `limit`) until this node has delivered `room`'s messages up to
    /// `last_id` of `epoch`, so that a joiner sent the history up to there gets no live copy
    /// of it afterwards. Immediate for the embedded transport, which delivers as it stores.
    pub async fn caught_up(
        &self,
        room: &RoomName,
        epoch: &str,
        last_id: u64,
        limit: Duration,
    ) -> bool {
        match self {
            Transport::Memory(_) => true,
            Transport::Redis(t) => t.caught_up(room, epoch, last_id, limit).await,
        }
    }

    /// This node has no member left in `room`: stop receiving its messages.
    pub fn unsubscribe(&self, room: &RoomName) {
        match self {
            Transport::Memory(_) => {}
            Transport::Redis(t) => t.unsubscribe(room),
        }
    }

    /// `user`'s connections in `room` on this node went from none to some: the room's members
    /// over every node are told (as events, to those that asked). Returns the users in the
    /// room now, over every node.
    pub async fn presence_joined(&self, room: &RoomName, user: &Arc<str>) -> usize {
        match self {
            Transport::Memory(t) => t.presence_changed(room, user),
            Transport::Redis(t) => t.presence_changed(room, user).await,
        }
    }

    /// `user`'s last connection in `room` on this node left: as [`Transport::presence_joined`],
    /// without waiting.
    pub fn presence_left(&self, room: &RoomName, user: &Arc<str>) {
        match self {
            Transport::Memory(t) => {
                t.presence_changed(room, user);
            }
            Transport::Redis(t) => t.presence_left(room, user),
        }
    }

    /// The users in `room` over every node, as last known.
    pub fn online(&self, room: &RoomName) -> usize {
        match self {
            Transport::Memory(t) => t.online(room),
            Transport::Redis(t) => t.online(room),
        }
    }

    /// A page of `room`'s members over every node, from `cursor` (a page's `cursor`, or
    /// `None` for the first), at most about `limit`.
    pub async fn presence_page(
        &self,
        room: &RoomName,
        cursor: Option<&str>,
        limit: usize,
    ) -> Result<presence::Page, TransportError> {
        match self {
            Transport::Memory(t) => Ok(t.presence_page(room, cursor, limit)),
            Transport::Redis(t) => t.presence_page(room, cursor, limit).await,
        }
    }

    /// Rooms with members (over every node where presence is shared) and their users, a page
    /// at a time from `cursor` (a page's own); the next page's cursor, `None` on the last.
    pub async fn rooms(&self, cursor: Option<&str>) -> Result<RoomList, TransportError> {
        match self {
            Transport::Memory(t) => Ok(local_presence::rooms(t.hub(), cursor)),
            Transport::Redis(t) => t.rooms(cursor).await,
        }
    }

    /// Where node `node` can be reached (its `server.internal_addr`), if it is alive; never
    /// on the embedded transport, which has one node.
    pub async fn node_addr(&self, node: &str) -> Option<String> {
        match self {
            Transport::Memory(_) => None,
            Transport::Redis(t) => t.node_addr(node).await.ok().flatten(),
        }
    }

    /// Keeps a Socket.IO session's recovery state under `pid` for `ttl`, where every node can
    /// read it (Redis) or in this node (embedded).
    pub async fn save_recovery(&self, pid: &str, state: &str, ttl: Duration) {
        match self {
            Transport::Memory(t) => t.save_recovery(pid, state, ttl),
            Transport::Redis(t) => {
                if let Err(e) = t.save_recovery(pid, state, ttl).await {
                    tracing::debug!(error = %e, "recovery state not saved");
                }
            }
        }
    }

    /// Keeps the recovery state under `pid` for `ttl` more.
    pub async fn touch_recovery(&self, pid: &str, ttl: Duration) {
        match self {
            Transport::Memory(t) => t.touch_recovery(pid, ttl),
            Transport::Redis(t) => {
                let _ = t.touch_recovery(pid, ttl).await;
            }
        }
    }

    /// Takes the recovery state under `pid`, once: a second recovery with it finds nothing.
    pub async fn take_recovery(&self, pid: &str) -> Option<String> {
        match self {
            Transport::Memory(t) => t.take_recovery(pid),
            Transport::Redis(t) => t.take_recovery(pid).await.ok().flatten(),
        }
    }

    /// Closes `user`'s connections on every node (close code 4003). Returns, embedded, the
    /// connections closed; on Redis, the nodes told.
    pub async fn disconnect_user(&self, user: &str) -> Result<usize, TransportError> {
        match self {
            Transport::Memory(t) => Ok(t.disconnect_user(user)),
            Transport::Redis(t) => t.disconnect_user(user).await,
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
