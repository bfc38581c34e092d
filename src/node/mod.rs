//! The shared state of one node: its configuration and live settings, the hub, the
//! transport, the metrics, the connection slots, and what every connection of the node
//! shares: the [`admission`] of new ones (per-address limits from [`guard`], the connection
//! cap, origin checks), and the [`ticker`] that wakes their writers.
//!
//! Below both protocols and the [`server`](crate::server), which builds the node and serves
//! its connections.

pub(crate) mod access;
pub(crate) mod admission;
pub(crate) mod archive;
pub(crate) mod guard;
pub(crate) mod ticker;

use std::io;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, PoisonError, RwLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::{Config, Reloadable};
use crate::hub::{ConnId, Hub};
use crate::metrics::Metrics;
use crate::protocol::message::Draft;
use crate::protocol::{ErrorCode, ProtocolError, RoomName};
use crate::transport::{Envelope, Published, Transport, dedupe_key};
use access::Access;
use guard::{Auth, IpSlot, PerIp};
use ticker::Ticker;

/// State shared by every connection of this node.
#[derive(Debug)]
pub struct Node {
    /// The configuration the node started with. The keys that SIGHUP reloads are read from
    /// [`Node::live`] instead.
    pub config: Config,
    /// This node's name, sent in `welcome`.
    pub id: String,
    /// Rooms and local members.
    pub hub: Arc<Hub>,
    /// The message transport.
    pub transport: Transport,
    /// The PostgreSQL archive, when `archive.url` is set.
    pub archive: Option<Arc<crate::archive::Archive>>,
    /// Counters and gauges for `/metrics`.
    pub(crate) metrics: Arc<Metrics>,
    /// Cancelled to shut the node down.
    pub(crate) shutdown: CancellationToken,
    /// The tasks of upgraded connections and Socket.IO sessions, waited for at shutdown.
    pub(crate) sessions: TaskTracker,
    /// Wakes connections at their ping deadlines and at the shutdown.
    pub(crate) ticker: Arc<Ticker>,
    connections: AtomicUsize,
    next_conn: AtomicU64,
    live: RwLock<Arc<Reloadable>>,
    live_version: AtomicU64,
    per_ip: Arc<PerIp>,
    trusted_proxies: Vec<ipnet::IpNet>,
    /// Token checking, when `auth.jwt_secret` is set.
    pub(crate) auth: Option<Auth>,
    /// Who may join which room.
    pub(crate) access: Access,
}

impl Node {
    /// The node of `config`, its transport and archive started; `shutdown` ends its
    /// connections.
    pub(crate) async fn new(config: Config, shutdown: CancellationToken) -> io::Result<Self> {
        let metrics = Arc::new(Metrics::default());
        let archived = archive::start(&config, &metrics, &shutdown).await;
        let archive = archived.as_ref().map(|a| a.archive.clone());
        let hub = Arc::new(Hub::with_metrics(metrics.clone()));
        let id = if config.server.node_id.is_empty() {
            format!("node-{:06x}", fastrand::u32(..1 << 24))
        } else {
            config.server.node_id.clone()
        };
        let transport = Transport::new(&config, &id, hub.clone(), metrics.clone(), archived)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e.to_string()))?;
        if let (Some(archive), Transport::Redis(redis)) = (&archive, &transport)
            && let Some(source) = redis.archive_source(&id)
        {
            archive.spawn_stream_consumer(source, shutdown.clone());
        }
        tokio::spawn(flush_presence(
            hub.clone(),
            Duration::from_millis(config.rooms.presence_interval_ms),
            shutdown.clone(),
        ));
        let ticker = Arc::new(Ticker::default());
        tokio::spawn(ticker.clone().run(shutdown.clone()));
        Ok(Self {
            ticker,
            per_ip: Arc::new(PerIp::new(config.server.ipv6_prefix_len)),
            trusted_proxies: config.server.trusted_proxy_nets(),
            auth: Auth::new(&config.auth),
            access: Access::new(&config.auth),
            live: RwLock::new(Arc::new(config.reloadable())),
            live_version: AtomicU64::new(0),
            config,
            id,
            hub,
            transport,
            archive,
            metrics,
            shutdown,
            sessions: TaskTracker::new(),
            connections: AtomicUsize::new(0),
            next_conn: AtomicU64::new(1),
        })
    }

    /// Whether the node takes new clients: not shutting down, transport up.
    pub fn is_ready(&self) -> bool {
        !self.shutdown.is_cancelled() && self.transport.is_ready()
    }

    /// WebSocket connections open now.
    pub fn connections(&self) -> usize {
        self.connections.load(Ordering::Relaxed)
    }

    /// The settings SIGHUP can change: limits, allowed origins, the connection cap.
    pub fn live(&self) -> Arc<Reloadable> {
        self.live
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Bumped by every [`Node::reconfigure`]: sessions compare it to refresh their limits.
    pub(crate) fn live_version(&self) -> u64 {
        self.live_version.load(Ordering::Acquire)
    }

    /// Applies reloaded settings: new connections and the next message of open ones see them.
    pub fn reconfigure(&self, live: Reloadable) {
        *self.live.write().unwrap_or_else(PoisonError::into_inner) = Arc::new(live);
        self.live_version.fetch_add(1, Ordering::AcqRel);
    }

    /// Publishes `message` from `user` to `room` (membership, length and rate are the
    /// caller's checks), as [`Node::publish_batch`] does.
    pub(crate) async fn publish(
        &self,
        room: RoomName,
        user: &Arc<str>,
        message: String,
        reference: Option<&str>,
    ) -> Result<Published, ProtocolError> {
        let envelope = envelope(room, user, message, reference);
        let published = self.publish_batch(vec![envelope]).await?;
        published.first().copied().ok_or_else(|| {
            ProtocolError::new(
                ErrorCode::Unavailable,
                "the transport gave no id; not delivered",
            )
        })
    }

    /// Publishes `envelopes`, all of one room, in their order (see
    /// [`Transport::publish`]); times and counts them. `unavailable`, for all of them, when
    /// the transport refused or did not answer.
    pub(crate) async fn publish_batch(
        &self,
        envelopes: Vec<Envelope>,
    ) -> Result<Vec<Published>, ProtocolError> {
        let count = envelopes.len() as u64;
        let started = std::time::Instant::now();
        let published = self.transport.publish(envelopes).await;
        let took = started.elapsed();
        for _ in 0..count {
            self.metrics.publish_seconds.observe(took);
        }
        match published {
            Ok(published) => {
                for p in &published {
                    if p.duplicate {
                        self.metrics.duplicate_sends_total.inc();
                    } else {
                        self.metrics.messages_in_total.inc();
                    }
                }
                Ok(published)
            }
            Err(e) => {
                self.metrics.publish_errors_total.add(count);
                Err(ProtocolError::new(ErrorCode::Unavailable, e.to_string()))
            }
        }
    }

    /// A new connection's id.
    pub(crate) fn next_conn_id(&self) -> ConnId {
        ConnId(self.next_conn.fetch_add(1, Ordering::Relaxed))
    }

    /// Takes one of `max_connections` slots for a connection holding `ip_slot`, one of its
    /// client address's; both are released when the returned guard drops.
    fn reserve_slot(self: &Arc<Self>, ip_slot: IpSlot) -> Option<ConnSlot> {
        let max = self.live().max_connections;
        let taken = self.connections.fetch_add(1, Ordering::AcqRel);
        let slot = ConnSlot {
            node: self.clone(),
            _ip_slot: ip_slot,
        };
        (taken < max).then_some(slot)
    }
}

/// `message` from `user` to `room`, encoded once and stamped with the time now. A
/// `reference` (the client's `ref`) is remembered for the dedupe window.
pub(crate) fn envelope(
    room: RoomName,
    user: &Arc<str>,
    message: String,
    reference: Option<&str>,
) -> Envelope {
    let ts = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    Envelope {
        dedupe: reference.map(|r| dedupe_key(user, r)),
        draft: Draft::new(room, user.clone(), ts, message),
    }
}

/// One of the node's `max_connections` slots, and of its client address's.
#[derive(Debug)]
pub(crate) struct ConnSlot {
    node: Arc<Node>,
    /// Held, never read: dropped with the slot, it frees the address's slot too.
    _ip_slot: IpSlot,
}

impl Drop for ConnSlot {
    fn drop(&mut self) {
        self.node.connections.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Sends each room's gathered presence changes every `interval` until `shutdown`.
async fn flush_presence(hub: Arc<Hub>, interval: Duration, shutdown: CancellationToken) {
    let mut ticks = tokio::time::interval(interval);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = ticks.tick() => hub.flush_presence(),
        }
    }
}
