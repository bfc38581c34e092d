//! The Redis Pub/Sub backplane: any number of nodes share rooms through one Redis, over two
//! connections per node. The publisher (multiplexed, reconnecting by itself) runs one script
//! per message that checks the sender's `ref` against the dedupe window, takes the room's next
//! id, `PUBLISH`es the message text with that id and stores it in the room's history,
//! atomically: the order on a room's channel is the order of its ids, and a message is stored
//! exactly once, whatever the number of nodes. The subscriber is a dedicated connection
//! subscribed to exactly the rooms that have local members (plus a short linger); when it
//! drops, the node keeps its clients, reconnects and resubscribes, and `/readyz` says not
//! ready meanwhile. Each node follows every room it receives by id: a gap is filled from the
//! history before the next message is delivered, so members see every id once, in order; with
//! `redis.local_history` a join to a room the node already receives makes no Redis call.
//!
//! In sentinel mode the master is whichever the sentinels name: the subscriber asks them at
//! every (re)connect, moves the publisher there when it changed, and drops its connection
//! when a sentinel announces `+switch-master`, so a failover is a reconnect like any other,
//! healed from the history. The archive stream's consumer has a locator of its own and asks
//! the sentinels whenever its connection fails (a failover kills the clients of a demoted
//! master, and a replica refuses the consumer's writes).
//!
//! The parts: `scripts` (the Lua scripts, the keys they use, the publisher connection),
//! `subscriptions` (which rooms the node wants and has), `subscriber` (the subscriber task:
//! reconnect, reconcile, receive), `recent` (per room, the last id delivered and the newest
//! messages), `heal` (filling gaps from the history), `connect` (client, sentinels, backoff,
//! outages), `sentinel` (listening for failovers), `probe` (bounding the subscriber's
//! backlog by its age).
//! This file holds the transport's state and the calls the rest of the server makes.

mod connect;
mod control;
mod feed;
mod heal;
mod presence;
mod probe;
mod publisher;
mod recent;
mod scripts;
mod sentinel;
mod subscriber;
mod subscriptions;

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use tokio::sync::{Notify, watch};
use tokio::time::Instant;

pub use subscriptions::Joining;

use self::connect::Locator;
use self::presence::PresenceSync;
use self::recent::{LocalAnswer, RoomStream};
use self::scripts::Scripts;
use self::subscriptions::Interest;
use crate::archive::stream::StreamSource;
use crate::config::{RedisConfig, RedisMode, RoomsConfig};
use crate::hub::Hub;
use crate::metrics::Metrics;
use crate::protocol::RoomName;
use crate::protocol::native::Since;
use crate::transport::{Envelope, Page, Published, Snapshot, TransportError};
use crate::webhooks::{Event, EventKind, Webhooks};

/// How long a join waits for its room's subscription before answering anyway.
const SUBSCRIBE_WAIT: Duration = Duration::from_secs(2);

/// Redis Pub/Sub transport.
pub struct RedisTransport {
    hub: Arc<Hub>,
    /// The scripts, run on the publisher connection.
    scripts: Scripts,
    /// Finds the master for the archive stream's consumer (archive on, standalone or
    /// sentinel mode); taken by [`RedisTransport::archive_source`].
    archive_locator: Mutex<Option<Locator>>,
    heartbeat: Duration,
    /// `redis.subscriber_lag_max_ms`: how far behind the subscriber may fall.
    lag_max: Duration,
    policy: RoomsConfig,
    /// Per room: the epoch and last id this node delivered, to find gaps, and the newest
    /// messages, to answer joins.
    streams: Mutex<HashMap<RoomName, RoomStream>>,
    /// Held by the subscriber from `streams` taking a message until the hub delivered it.
    delivering: Mutex<()>,
    /// Joins waiting in `caught_up`, and what wakes them.
    waiting: AtomicUsize,
    progress: Notify,
    /// How many of each room's newest messages `streams` keeps: `rooms.history_on_join` with
    /// `redis.local_history`, else none.
    keep_recent: usize,
    publish_timeout: Duration,
    linger: Duration,
    /// Rooms this node wants to receive, and since when.
    wanted: Mutex<HashMap<RoomName, Interest>>,
    /// Rooms the subscriber connection has confirmed.
    subscribed: Mutex<HashSet<RoomName>>,
    /// Bumped whenever `subscribed` changes.
    subscribed_version: watch::Sender<u64>,
    /// Wakes the subscriber loop to reconcile `wanted` with `subscribed`.
    reconcile_needed: Notify,
    ready: AtomicBool,
    /// Bumped when a sentinel announces that the master moved.
    master_switches: watch::Sender<u64>,
    metrics: Arc<Metrics>,
    /// This node's presence writer.
    presence: PresenceSync,
    /// `{prefix}:presence`, where presence changes go out.
    presence_channel: String,
    /// `{prefix}:control`, where requests for every node go out.
    control_channel: String,
    /// `{prefix}:probe:{node}`, where this node measures its subscriber's backlog.
    probe_channel: String,
    /// `server.internal_addr`: where other nodes reach this one.
    internal_addr: String,
    /// Where this node reports the messages it published and the presence changes its
    /// scripts made.
    webhooks: Arc<Webhooks>,
}

impl std::fmt::Debug for RedisTransport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisTransport")
            .field("channel_prefix", &self.scripts.channel_prefix())
            .field("ready", &self.ready)
            .finish_non_exhaustive()
    }
}

/// Counts a join in [`RedisTransport::caught_up`] for as long as it waits, however it ends.
struct Waiting<'a>(&'a AtomicUsize);

impl<'a> Waiting<'a> {
    fn new(count: &'a AtomicUsize) -> Self {
        count.fetch_add(1, Ordering::AcqRel);
        Self(count)
    }
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

impl RedisTransport {
    /// Builds the transport and starts its subscriber task.
    // Each argument is a separate piece of the node the transport serves; a struct of them
    // would only be built here.
    #[allow(clippy::too_many_arguments)]
    pub fn spawn(
        config: &RedisConfig,
        policy: &RoomsConfig,
        node: &str,
        internal_addr: &str,
        hub: Arc<Hub>,
        metrics: Arc<Metrics>,
        webhooks: Arc<Webhooks>,
        archive_cap: usize,
    ) -> Result<Arc<Self>, TransportError> {
        let unavailable = |e: redis::RedisError| TransportError::Unavailable(e.to_string());
        let locator = Locator::new(config).map_err(unavailable)?;
        let fixed = match &locator {
            Locator::Fixed(client) => Some(client.clone()),
            Locator::Sentinel { .. } | Locator::Cluster(_) => None,
        };
        // The archive stream's consumer reads the master (not in cluster mode, where the
        // archive is refused): its own locator, so it asks the sentinels at its own reconnects.
        let archive_locator = match config.mode {
            RedisMode::Standalone | RedisMode::Sentinel if archive_cap > 0 => {
                Some(Locator::new(config).map_err(unavailable)?)
            }
            _ => None,
        };
        let scripts = Scripts::new(fixed, config, policy, archive_cap).map_err(unavailable)?;
        let transport = Arc::new(Self {
            hub,
            scripts,
            archive_locator: Mutex::new(archive_locator),
            heartbeat: Duration::from_secs(config.heartbeat_secs),
            lag_max: Duration::from_millis(config.subscriber_lag_max_ms),
            policy: policy.clone(),
            streams: Mutex::new(HashMap::new()),
            delivering: Mutex::new(()),
            waiting: AtomicUsize::new(0),
            progress: Notify::new(),
            keep_recent: if config.local_history {
                policy.history_on_join
            } else {
                0
            },
            publish_timeout: Duration::from_millis(config.publish_timeout_ms),
            linger: Duration::from_secs(config.unsubscribe_linger_secs),
            wanted: Mutex::new(HashMap::new()),
            subscribed: Mutex::new(HashSet::new()),
            subscribed_version: watch::Sender::new(0),
            reconcile_needed: Notify::new(),
            ready: AtomicBool::new(false),
            master_switches: watch::Sender::new(0),
            metrics,
            presence_channel: format!("{}:presence", config.channel_prefix),
            control_channel: format!("{}:control", config.channel_prefix),
            probe_channel: format!("{}:probe:{node}", config.channel_prefix),
            internal_addr: internal_addr.to_owned(),
            // A room's presence keys carry no hash tag (they would land on several shards)
            // and are found by scanning a prefix: in cluster mode each node reports its own
            // members, as with `redis.presence = false`.
            webhooks,
            presence: PresenceSync::new(
                config.presence && config.mode != RedisMode::Cluster,
                node,
                Duration::from_secs(policy.presence_timeout_secs),
            ),
        });
        if config.mode == RedisMode::Sentinel {
            let (_, sentinels) = connect::sentinel_clients(config).map_err(unavailable)?;
            let master_name = config.master_name.clone();
            tokio::spawn(transport.clone().watch_sentinels(sentinels, master_name));
        }
        tokio::spawn(transport.clone().run_subscriber(locator));
        tokio::spawn(transport.clone().run_presence());
        Ok(transport)
    }

    /// Where the archive reads this deployment's messages: the archive stream on the master
    /// (in sentinel mode the one the sentinels name, asked again at each reconnect), through
    /// connections of its own, as consumer `node` (stable across restarts when
    /// `server.node_id` is set). `None` without the archive, in cluster mode, which the
    /// archive does not serve (refused by the configuration's checks), and once taken.
    pub fn archive_source(&self, node: &str) -> Option<StreamSource> {
        let locator = self
            .archive_locator
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take()?;
        Some(StreamSource {
            server: Box::new(locator),
            key: self.scripts.archive_key(),
            consumer: node.to_owned(),
        })
    }

    /// Whether the subscriber is connected (and so Redis reachable).
    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Relaxed)
    }

    /// Checks each `ref`, assigns the ids, publishes and stores `envelopes` (all of one room,
    /// in their order), in one script call; their ids once Redis accepted them. This node,
    /// the one that got the ids, reports the messages to the webhooks: every message is
    /// reported by exactly one node.
    pub async fn publish(&self, envelopes: &[Envelope]) -> Result<Vec<Published>, TransportError> {
        let Some(first) = envelopes.first() else {
            return Ok(Vec::new());
        };
        let room = first.draft.room.as_str();
        debug_assert!(envelopes.iter().all(|e| e.draft.room.as_str() == room));
        let delivered = self
            .lock_streams()
            .get(room)
            .map(|s| (s.epoch.clone(), s.last_id));
        let (published, epoch) = self.scripts.publish(envelopes, delivered).await?;
        if self.webhooks.wants(EventKind::Message) {
            for (envelope, published) in envelopes.iter().zip(&published) {
                if published.duplicate {
                    continue;
                }
                let draft = &envelope.draft;
                self.webhooks.emit(Event::message(
                    draft.room.as_str(),
                    published.id,
                    &epoch,
                    &draft.user,
                    draft.ts,
                    &draft.text,
                ));
            }
        }
        let newest = published.iter().map(|p| p.id).max().unwrap_or(0);
        if self.keep_recent > 0
            && let Some(stream) = self.lock_streams().get_mut(room)
        {
            stream.acked_id = stream.acked_id.max(newest);
        }
        Ok(published)
    }

    /// The history a client joining `room` gets; see [`Snapshot`]. From this node's copy of
    /// the room's newest messages when it can answer exactly as Redis would, else from Redis.
    pub async fn snapshot(
        &self,
        room: &RoomName,
        since: Option<&Since>,
    ) -> Result<Snapshot, TransportError> {
        match self.local_snapshot(room, since) {
            LocalAnswer::Ready(snapshot) => return Ok(snapshot),
            LocalAnswer::Behind { epoch, acked_id } => {
                if self.caught_up(room, &epoch, acked_id, SUBSCRIBE_WAIT).await
                    && let LocalAnswer::Ready(snapshot) = self.local_snapshot(room, since)
                {
                    return Ok(snapshot);
                }
            }
            LocalAnswer::AskRedis => {}
        }
        self.scripts
            .snapshot(room, since, self.policy.history_on_join)
            .await
    }

    /// [`RedisTransport::snapshot`] from `streams`, while the subscriber is connected and caught
    /// up (so the copy is as current as the live stream) and the copy holds every message the
    /// answer needs. Messages are added to the copy before they are delivered, so a joiner's
    /// staging gets exactly the messages after the snapshot's `last_id`. Messages accepted
    /// through other nodes and still on their way here follow as live messages.
    fn local_snapshot(&self, room: &RoomName, since: Option<&Since>) -> LocalAnswer {
        if self.keep_recent == 0 || !self.is_ready() || !self.lock_subscribed().contains(room) {
            return LocalAnswer::AskRedis;
        }
        match self.lock_streams().get_mut(room) {
            Some(stream) => stream.answer(
                since,
                self.policy.history_on_join,
                Duration::from_secs(self.policy.history_ttl_secs),
            ),
            None => LocalAnswer::AskRedis,
        }
    }

    /// Up to `limit` messages of `room` older than `before`.
    pub async fn page(
        &self,
        room: &RoomName,
        before: Option<u64>,
        limit: usize,
    ) -> Result<Page, TransportError> {
        self.scripts.page(room, before, limit).await
    }

    /// See [`Transport::caught_up`](super::Transport::caught_up). Woken by the subscriber
    /// whenever it moved a room on while a join waits, not polled.
    pub async fn caught_up(
        &self,
        room: &RoomName,
        epoch: &str,
        last_id: u64,
        limit: Duration,
    ) -> bool {
        let reached = || {
            let done = self
                .lock_streams()
                .get(room)
                .is_some_and(|s| s.epoch == epoch && s.last_id >= last_id);
            // The stream takes a message before the hub has it: wait for that delivery to end,
            // so that the joiner's staging, not its outbox, gets it.
            done && {
                drop(self.lock_delivering());
                true
            }
        };
        if reached() {
            return true;
        }
        let _waiting = Waiting::new(&self.waiting);
        let deadline = Instant::now() + limit;
        loop {
            // Made before the check, so a step between the two still wakes it.
            let progressed = self.progress.notified();
            if reached() {
                return true;
            }
            if tokio::time::timeout_at(deadline, progressed).await.is_err() {
                return reached();
            }
        }
    }

    /// Wakes the joins waiting in [`RedisTransport::caught_up`], if any: called after a stream
    /// moved on and the hub delivered.
    fn progressed(&self) {
        if self.waiting.load(Ordering::Acquire) > 0 {
            self.progress.notify_waiters();
        }
    }

    fn lock_delivering(&self) -> MutexGuard<'_, ()> {
        self.delivering
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    fn lock_streams(&self) -> MutexGuard<'_, HashMap<RoomName, RoomStream>> {
        self.streams.lock().unwrap_or_else(PoisonError::into_inner)
    }
}
