//! The Redis Pub/Sub backplane: any number of nodes share rooms through one Redis.
//!
//! Two connections per node. The publisher (multiplexed, reconnecting by itself) runs one
//! script per message that takes the room's next id with `INCR` and `PUBLISH`es the frame
//! text with that id, atomically, so the order on a room's channel is the order of its ids.
//! The subscriber is a dedicated connection subscribed to exactly the rooms that have local
//! members (plus a short linger); its loop only copies each payload once into a WebSocket
//! frame and hands it to the hub, so Redis never has to buffer for us. When the subscriber
//! connection drops, the node keeps its clients, reconnects with capped exponential backoff
//! and jitter, and resubscribes; `/readyz` says not ready meanwhile.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use futures_util::StreamExt;
use redis::aio::{ConnectionManager, ConnectionManagerConfig, PubSubSink, PubSubStream};
use redis::{Client, ConnectionAddr, IntoConnectionInfo, RedisError, Script};
use tokio::sync::{Notify, watch};
use tokio::time::Instant;
use tracing::{debug, error, info, warn};

use crate::config::RedisConfig;
use crate::hub::Hub;
use crate::metrics::Metrics;
use crate::protocol::{RoomName, ws};
use crate::transport::{Envelope, TransportError};

/// Takes the room's next id and publishes the message with it, in one atomic step.
/// KEYS[1]: the room's id counter. ARGV: channel, JSON before the id, JSON after it.
const PUBLISH_SCRIPT: &str = r"
local id = redis.call('INCR', KEYS[1])
redis.call('PUBLISH', ARGV[1], ARGV[2] .. id .. ARGV[3])
return id
";

/// How long a join waits for its room's subscription before answering anyway.
const SUBSCRIBE_WAIT: Duration = Duration::from_secs(2);
/// Reconnect backoff bounds.
const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(5);
/// How long connecting may take before it counts as failed.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);

/// Redis Pub/Sub transport.
pub struct RedisTransport {
    hub: Arc<Hub>,
    client: Client,
    publisher: ConnectionManager,
    script: Script,
    /// `{prefix}:room:`; a room's channel is this plus its name.
    channel_prefix: String,
    /// `{prefix}:seq:`; a room's id counter is this plus its name.
    seq_prefix: String,
    publish_timeout: Duration,
    linger: Duration,
    /// Rooms this node wants to receive, and since when.
    wanted: Mutex<HashMap<RoomName, Want>>,
    /// Rooms the subscriber connection has confirmed.
    subscribed: Mutex<HashSet<RoomName>>,
    /// Bumped whenever `subscribed` changes.
    generation: watch::Sender<u64>,
    /// Wakes the subscriber loop to reconcile `wanted` with `subscribed`.
    changed: Notify,
    ready: AtomicBool,
    metrics: Arc<Metrics>,
}

impl std::fmt::Debug for RedisTransport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisTransport")
            .field("channel_prefix", &self.channel_prefix)
            .field("ready", &self.ready)
            .finish_non_exhaustive()
    }
}

#[derive(Debug, Clone, Copy)]
struct Want {
    since: Instant,
    /// Set when the last local member left: unsubscribe once the linger is over.
    release_at: Option<Instant>,
}

impl RedisTransport {
    /// Builds the transport and starts its subscriber task.
    pub fn spawn(
        config: &RedisConfig,
        hub: Arc<Hub>,
        metrics: Arc<Metrics>,
    ) -> Result<Arc<Self>, TransportError> {
        let client = client(config).map_err(|e| TransportError::Unavailable(e.to_string()))?;
        let publish_timeout = Duration::from_millis(config.publish_timeout_ms);
        let manager = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(CONNECT_TIMEOUT))
            .set_response_timeout(Some(publish_timeout))
            .set_min_delay(BACKOFF_MIN)
            .set_max_delay(BACKOFF_MAX);
        let publisher = ConnectionManager::new_lazy_with_config(client.clone(), manager)
            .map_err(|e| TransportError::Unavailable(e.to_string()))?;
        let transport = Arc::new(Self {
            hub,
            client,
            publisher,
            script: Script::new(PUBLISH_SCRIPT),
            channel_prefix: format!("{}:room:", config.channel_prefix),
            seq_prefix: format!("{}:seq:", config.channel_prefix),
            publish_timeout,
            linger: Duration::from_secs(config.unsubscribe_linger_secs),
            wanted: Mutex::new(HashMap::new()),
            subscribed: Mutex::new(HashSet::new()),
            generation: watch::Sender::new(0),
            changed: Notify::new(),
            ready: AtomicBool::new(false),
            metrics,
        });
        tokio::spawn(transport.clone().run_subscriber());
        Ok(transport)
    }

    /// Whether the subscriber is connected (and so Redis reachable).
    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Relaxed)
    }

    /// Assigns the id and publishes in one script call; the id once Redis accepted it.
    pub async fn publish(&self, envelope: &Envelope) -> Result<u64, TransportError> {
        let room = envelope.room.as_str();
        let mut conn = self.publisher.clone();
        let mut call = self.script.key(format!("{}{room}", self.seq_prefix));
        call.arg(format!("{}{room}", self.channel_prefix))
            .arg(envelope.message.head())
            .arg(envelope.message.tail());
        match tokio::time::timeout(self.publish_timeout, call.invoke_async::<u64>(&mut conn)).await
        {
            Ok(Ok(id)) => Ok(id),
            Ok(Err(e)) => {
                debug!(error = %e, "publish failed");
                // Only a command that never reached Redis is known not to have run.
                if e.is_timeout() || (e.is_io_error() && !e.is_connection_refusal()) {
                    Err(TransportError::Timeout(format!("redis: {e}")))
                } else {
                    Err(TransportError::Unavailable(format!("redis: {e}")))
                }
            }
            Err(_) => Err(TransportError::Timeout(format!(
                "redis did not answer within {} ms",
                self.publish_timeout.as_millis()
            ))),
        }
    }

    /// Wants `room`'s messages; returns once subscribed (or after a short wait if Redis is
    /// down: the subscription follows when it is back).
    pub async fn subscribe(&self, room: &RoomName) {
        let now = Instant::now();
        self.lock_wanted().insert(
            room.clone(),
            Want {
                since: now,
                release_at: None,
            },
        );
        if self.lock_subscribed().contains(room) {
            return;
        }
        self.changed.notify_one();
        let mut generation = self.generation.subscribe();
        let confirmed = async {
            while !self.lock_subscribed().contains(room) {
                if generation.changed().await.is_err() {
                    return;
                }
            }
        };
        let _ = tokio::time::timeout(SUBSCRIBE_WAIT, confirmed).await;
    }

    /// The last local member left `room`: unsubscribe after the linger.
    pub fn unsubscribe(&self, room: &RoomName) {
        if let Some(want) = self.lock_wanted().get_mut(room) {
            want.release_at = Some(Instant::now() + self.linger);
        }
        self.changed.notify_one();
    }

    fn lock_wanted(&self) -> MutexGuard<'_, HashMap<RoomName, Want>> {
        self.wanted.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn lock_subscribed(&self) -> MutexGuard<'_, HashSet<RoomName>> {
        self.subscribed
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Connects, subscribes, receives; on any loss reconnects with backoff. Runs for the
    /// life of the process.
    async fn run_subscriber(self: Arc<Self>) {
        let mut backoff = Backoff::default();
        let mut outage: Option<Instant> = None;
        loop {
            let connected = tokio::time::timeout(CONNECT_TIMEOUT, self.client.get_async_pubsub())
                .await
                .unwrap_or_else(|_| Err(timeout_error()));
            let reason = match connected {
                Ok(pubsub) => {
                    let (mut sink, mut stream) = pubsub.split();
                    let usable = match self.check_publisher().await {
                        Ok(()) => self.reconcile(&mut sink).await,
                        Err(e) => Err(e),
                    };
                    match usable {
                        Ok(()) => {
                            self.ready.store(true, Ordering::Relaxed);
                            self.metrics.backplane_up.set(1);
                            match outage.take() {
                                Some(since) => {
                                    self.metrics.backplane_reconnects_total.inc();
                                    info!(
                                        down_ms = since.elapsed().as_millis() as u64,
                                        "redis backplane reconnected"
                                    )
                                }
                                None => info!("redis backplane connected"),
                            }
                            backoff = Backoff::default();
                            self.receive(&mut sink, &mut stream).await
                        }
                        Err(e) => e,
                    }
                }
                Err(e) => e,
            };
            self.ready.store(false, Ordering::Relaxed);
            self.metrics.backplane_up.set(0);
            self.lock_subscribed().clear();
            self.generation.send_modify(|g| *g += 1);
            if outage.is_none() {
                outage = Some(Instant::now());
                log_outage(&reason);
            }
            tokio::time::sleep(backoff.next()).await;
        }
    }

    /// Makes sure the publisher works too before the node calls itself ready: a `PING` that
    /// fails on a connection broken by the outage makes the connection manager reconnect,
    /// so the first `send` after an outage does not hit the dead connection, and a Redis
    /// that wants a password nobody gave is refused here, not at the first join.
    async fn check_publisher(&self) -> Result<(), RedisError> {
        let mut conn = self.publisher.clone();
        let mut last = None;
        for _ in 0..3 {
            match redis::cmd("PING").query_async::<()>(&mut conn).await {
                Ok(()) => return Ok(()),
                Err(e) => last = Some(e),
            }
        }
        Err(last.unwrap_or_else(closed_error))
    }

    /// Delivers every message until the connection fails; reconciles subscriptions when
    /// asked and once a second (for lingering rooms).
    async fn receive(&self, sink: &mut PubSubSink, stream: &mut PubSubStream) -> RedisError {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        loop {
            tokio::select! {
                msg = stream.next() => match msg {
                    Some(msg) => self.deliver(msg.get_channel_name(), msg.get_payload_bytes()),
                    None => return closed_error(),
                },
                _ = self.changed.notified() => {
                    if let Err(e) = self.reconcile(sink).await {
                        return e;
                    }
                }
                _ = tick.tick() => {
                    if let Err(e) = self.reconcile(sink).await {
                        return e;
                    }
                }
            }
        }
    }

    /// The payload is the frame's text: one copy into the frame, none per member.
    fn deliver(&self, channel: &str, payload: &[u8]) {
        if let Some(room) = channel.strip_prefix(&self.channel_prefix) {
            self.hub.deliver(room, &ws::text(payload));
        }
    }

    /// Subscribes to wanted rooms not yet subscribed; unsubscribes from rooms whose linger
    /// is over and that still have no local member.
    async fn reconcile(&self, sink: &mut PubSubSink) -> Result<(), RedisError> {
        let now = Instant::now();
        let (add, remove) = {
            let mut wanted = self.lock_wanted();
            let subscribed = self.lock_subscribed();
            let mut remove = Vec::new();
            wanted.retain(|room, want| {
                let expired = want.release_at.is_some_and(|at| at <= now)
                    && now.duration_since(want.since) >= self.linger
                    && self.hub.online(room.as_str()) == 0;
                if expired && subscribed.contains(room) {
                    remove.push(room.clone());
                }
                !expired
            });
            let add: Vec<RoomName> = wanted
                .keys()
                .filter(|room| !subscribed.contains(*room))
                .cloned()
                .collect();
            (add, remove)
        };
        if !add.is_empty() {
            sink.subscribe(self.channels(&add)).await?;
            self.lock_subscribed().extend(add);
            self.generation.send_modify(|g| *g += 1);
        }
        if !remove.is_empty() {
            sink.unsubscribe(self.channels(&remove)).await?;
            let mut subscribed = self.lock_subscribed();
            for room in &remove {
                subscribed.remove(room);
            }
        }
        Ok(())
    }

    fn channels(&self, rooms: &[RoomName]) -> Vec<String> {
        rooms
            .iter()
            .map(|room| format!("{}{room}", self.channel_prefix))
            .collect()
    }
}

fn client(config: &RedisConfig) -> Result<Client, RedisError> {
    let addr = if config.tls {
        ConnectionAddr::TcpTls {
            host: config.host.clone(),
            port: config.port,
            insecure: false,
            tls_params: None,
        }
    } else {
        ConnectionAddr::Tcp(config.host.clone(), config.port)
    };
    let info = addr.into_connection_info()?;
    let mut settings = info.redis_settings().clone().set_db(i64::from(config.db));
    if !config.username.is_empty() {
        settings = settings.set_username(&config.username);
    }
    if !config.password.expose().is_empty() {
        settings = settings.set_password(config.password.expose());
    }
    Client::open(info.set_redis_settings(settings))
}

fn timeout_error() -> RedisError {
    RedisError::from(std::io::Error::new(
        std::io::ErrorKind::TimedOut,
        "connecting to redis timed out",
    ))
}

fn closed_error() -> RedisError {
    RedisError::from(std::io::Error::new(
        std::io::ErrorKind::ConnectionAborted,
        "redis closed the subscriber connection",
    ))
}

/// One line per outage, saying what an operator should check.
fn log_outage(e: &RedisError) {
    let text = e.to_string();
    if text.contains("WRONGPASS")
        || text.contains("NOAUTH")
        || text.contains("AuthenticationFailed")
    {
        error!(
            error = %text,
            "redis refused the credentials: check redis.username and redis.password \
             (REDIS_PASSWORD); not ready until it accepts them"
        );
    } else {
        warn!(error = %text, "redis backplane down: cross-node delivery paused, reconnecting");
    }
}

/// Capped exponential backoff with jitter: each wait is between half and all of the
/// current step, which doubles up to the cap.
#[derive(Debug)]
struct Backoff {
    step: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Self { step: BACKOFF_MIN }
    }
}

impl Backoff {
    fn next(&mut self) -> Duration {
        let step = self.step;
        self.step = (self.step * 2).min(BACKOFF_MAX);
        let half = step / 2;
        half + half.mul_f64(fastrand::f64())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_to_the_cap_with_jitter() {
        let mut b = Backoff::default();
        let waits: Vec<Duration> = (0..10).map(|_| b.next()).collect();
        assert!(waits[0] >= BACKOFF_MIN / 2 && waits[0] <= BACKOFF_MIN);
        assert!(waits.iter().all(|w| *w <= BACKOFF_MAX));
        assert!(waits[9] >= BACKOFF_MAX / 2);
    }
}
