//! The subscriber: a dedicated connection subscribed to exactly the rooms this node wants,
//! and the task that runs it for the life of the process. It connects, checks the publisher,
//! subscribes, heals what was missed while it was away and then receives, copying each
//! payload once into a WebSocket frame for the hub, so Redis never has to buffer for us. It
//! reconciles the subscriptions when a join or leave asks and once a second, sends a
//! heartbeat `PING`, and probes how far behind its channels it is (see `probe`); when the
//! connection drops, stalls or falls too far behind, the node keeps its clients, says not
//! ready, and reconnects with capped exponential backoff and jitter. In sentinel mode each
//! connect asks the sentinels for the master first; a new one is logged and counted as a
//! failover, and the publisher follows it.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use redis::RedisError;
use tokio::time::Instant;
use tracing::{debug, info, warn};

use super::connect::Locator;
use super::feed::{Feed, Incoming, connect_cluster};
use super::probe::Prober;

use super::RedisTransport;
use super::connect::{
    Backoff, CONNECT_TIMEOUT, check_standalone, closed_error, cluster_stalled_error,
    heartbeat_error, log_outage, master_switched_error, timeout_error,
};
use super::recent::{Arrival, RoomStream};
use crate::protocol::RoomName;
use crate::protocol::message::Message;

impl RedisTransport {
    /// Connects, subscribes, receives; on any loss reconnects with backoff. Runs for the
    /// life of the process.
    pub(super) async fn run_subscriber(self: Arc<Self>, mut locator: Locator) {
        let mut backoff = Backoff::default();
        let mut outage: Option<Instant> = None;
        let mut switches = self.master_switches.subscribe();
        loop {
            // A switch announced before this lookup is answered by it.
            switches.mark_unchanged();
            let reason = match self.open_feed(&mut locator).await {
                Ok(mut feed) => {
                    let usable = match self.scripts.check_publisher().await {
                        Ok(()) => {
                            let global = vec![
                                self.presence_channel().to_owned(),
                                self.control_channel().to_owned(),
                                self.probe_channel.clone(),
                            ];
                            match feed.subscribe_global(global).await {
                                Ok(()) => self.reconcile(&mut feed).await,
                                Err(e) => Err(e),
                            }
                        }
                        Err(e) => Err(e),
                    };
                    match usable {
                        Ok(()) => {
                            // Messages published while the subscriber was away come from the
                            // history before any new one is delivered.
                            self.heal_all().await;
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
                            self.receive(&mut feed, &mut switches).await
                        }
                        Err(e) => e,
                    }
                }
                Err(e) => e,
            };
            self.ready.store(false, Ordering::Relaxed);
            self.metrics.backplane_up.set(0);
            self.lock_subscribed().clear();
            self.subscribed_version.send_modify(|g| *g += 1);
            if outage.is_none() {
                outage = Some(Instant::now());
                log_outage(&reason);
            } else {
                debug!(error = %reason, "redis backplane still down");
            }
            tokio::time::sleep(backoff.next()).await;
        }
    }

    /// Delivers every message until the connection fails; reconciles subscriptions when
    /// asked and once a second (for lingering rooms); every `redis.heartbeat_secs` sends a
    /// `PING` on the subscriber connection and gives it up when no answer comes within
    /// `redis.publish_timeout_ms`, so a stalled or half-open connection is noticed even when
    /// no message is due; and probes how far behind the subscriber is (see `probe`), giving
    /// the connection up past `redis.subscriber_lag_max_ms`.
    async fn receive(
        &self,
        feed: &mut Feed,
        switches: &mut tokio::sync::watch::Receiver<u64>,
    ) -> RedisError {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        let mut heartbeat = tokio::time::interval(self.heartbeat);
        heartbeat.reset();
        let mut prober = Prober::new(self);
        loop {
            tokio::select! {
                incoming = feed.next() => match incoming {
                    Incoming::Message(msg) if msg.get_channel_name() == self.probe_channel => {
                        if let Some(e) = prober.arrived(msg.get_payload_bytes()) {
                            return e;
                        }
                    }
                    Incoming::Message(msg) if msg.get_channel_name() == self.presence_channel() => {
                        self.heard(msg.get_payload_bytes());
                    }
                    Incoming::Message(msg) if msg.get_channel_name() == self.control_channel() => {
                        self.heard_control(msg.get_payload_bytes());
                    }
                    Incoming::Message(msg) => {
                        self.receive_one(msg.get_channel_name(), msg.get_payload_bytes()).await
                    }
                    Incoming::Subscribed(channel) => self.resubscribed(&channel).await,
                    Incoming::Unsubscribed(channel) => self.unsubscribed(&channel),
                    Incoming::Other => {}
                    Incoming::Closed => return closed_error(),
                },
                _ = switches.changed() => return master_switched_error(),
                e = prober.run() => return e,
                _ = self.reconcile_needed.notified() => {
                    if let Err(e) = self.reconcile(feed).await {
                        return e;
                    }
                }
                _ = tick.tick() => {
                    if self.scripts.cluster_stalled() {
                        return cluster_stalled_error();
                    }
                    if let Err(e) = self.reconcile(feed).await {
                        return e;
                    }
                }
                _ = heartbeat.tick() => {
                    match tokio::time::timeout(self.publish_timeout, feed.ping()).await {
                        Ok(Ok(())) => {}
                        Ok(Err(e)) => return e,
                        Err(_) => return heartbeat_error(self.publish_timeout),
                    }
                }
            }
        }
    }

    /// The subscriber's connection: to the cluster (which the publisher then uses too), or
    /// a Pub/Sub connection to the master.
    async fn open_feed(&self, locator: &mut Locator) -> Result<Feed, RedisError> {
        if let Locator::Cluster(config) = locator {
            let feed = connect_cluster(config).await?;
            if let Feed::Cluster { conn, .. } = &feed {
                self.scripts.use_cluster(conn.clone());
            }
            return Ok(feed);
        }
        let client = self.find_master(locator).await?;
        let pubsub = tokio::time::timeout(CONNECT_TIMEOUT, client.get_async_pubsub())
            .await
            .unwrap_or_else(|_| Err(timeout_error()))?;
        let (sink, stream) = pubsub.split();
        Ok(Feed::Single { sink, stream })
    }

    /// The cluster subscribed `channel` again (a shard's connection came back, or its slot
    /// moved): what was published meanwhile comes from the history.
    async fn resubscribed(&self, channel: &str) {
        let Some(room) = self.scripts.room_of(channel) else {
            return;
        };
        let position = self
            .lock_streams()
            .get(room)
            .map(|s| (s.epoch.clone(), s.last_id));
        let Ok(room) = RoomName::new(room) else {
            return;
        };
        if let Some((epoch, last_id)) = position
            && let Some((delivered, complete)) = self.heal(&room, &epoch, last_id).await
            && (delivered > 0 || !complete)
        {
            self.metrics.backplane_gaps_total.inc();
            if complete {
                self.metrics.backplane_gaps_healed_total.inc();
            }
        }
    }

    /// Redis ended `channel`'s sharded subscription (its slot moved to another shard): while
    /// the room is wanted, the next reconcile subscribes again, on the shard owning it now.
    fn unsubscribed(&self, channel: &str) {
        let Some(room) = self.scripts.room_of(channel) else {
            return;
        };
        if self.lock_wanted().contains_key(room) && self.lock_subscribed().remove(room) {
            self.reconcile_needed.notify_one();
        }
    }

    /// The master to connect to; in sentinel mode the publisher is moved to it when it is
    /// another one than before, which is logged and counted as a failover.
    async fn find_master(&self, locator: &mut Locator) -> Result<redis::Client, RedisError> {
        let master = locator.master().await?;
        if let Locator::Fixed(_) = locator {
            check_standalone(&master.client).await?;
        } else {
            if let Some(old) = &master.replaced {
                self.metrics.backplane_failovers_total.inc();
                warn!(
                    from = %old, to = %master.address,
                    "redis master failed over; reconnecting and healing from the history"
                );
            }
            if master.replaced.is_some() || !self.scripts.has_master() {
                self.scripts.use_master(master.client.clone());
            }
        }
        Ok(master.client)
    }

    /// Delivers one message from the channel in id order: the first of a gap is preceded by
    /// the missing ones from the history, and one already delivered is dropped. The payload
    /// is the message's native JSON, decoded once here; it becomes the native frame's text
    /// (one copy, none per member). The room's stream takes the message before the hub
    /// delivers it (see [`RedisTransport::local_snapshot`]).
    async fn receive_one(&self, channel: &str, payload: &[u8]) {
        let Some(room) = self.scripts.room_of(channel) else {
            return;
        };
        let message = match Message::decode(payload) {
            Ok(message) if message.room().as_str() == room => Arc::new(message),
            Ok(_) => {
                warn!(%room, "the room's channel carried another room's message; not delivered");
                return;
            }
            Err(e) => {
                warn!(%room, error = %e, "the room's channel carried a malformed message; not delivered");
                return;
            }
        };
        // Held from the stream taking the message until the hub has it (see `caught_up`).
        let delivering = self.lock_delivering();
        // The common case, the next id of the same epoch, allocates nothing more here.
        let gap = {
            let mut streams = self.lock_streams();
            match streams.get_mut(room) {
                Some(s) => match s.follow(&message, self.keep_recent) {
                    Arrival::AlreadyDelivered => return,
                    Arrival::Next => None,
                    Arrival::Gap => Some(Some((s.epoch.clone(), s.last_id))),
                },
                None => Some(None),
            }
        };
        let Some(gap) = gap else {
            self.hub.deliver(&message);
            drop(delivering);
            return self.progressed();
        };
        drop(delivering); // not held while the history is read
        let room_name = message.room().clone();
        if let Some((delivered_epoch, delivered_id)) = gap {
            // A gap, or a new epoch: what is missing comes from the history first.
            self.metrics.backplane_gaps_total.inc();
            if let Some((_, true)) = self.heal(&room_name, &delivered_epoch, delivered_id).await {
                self.metrics.backplane_gaps_healed_total.inc();
            }
        }
        let delivering = self.lock_delivering();
        {
            let mut streams = self.lock_streams();
            let arrival = streams
                .get_mut(&room_name)
                .map(|s| s.follow(&message, self.keep_recent));
            match arrival {
                Some(Arrival::AlreadyDelivered) => return, // the history had it
                Some(Arrival::Next) => {}
                Some(Arrival::Gap) | None => {
                    let restarted = RoomStream::restart_at(&message, self.keep_recent);
                    streams.insert(room_name, restarted);
                }
            }
        }
        self.hub.deliver(&message);
        drop(delivering);
        self.progressed();
    }

    /// Subscribes to wanted rooms not yet subscribed; unsubscribes from rooms whose linger
    /// is over and that still have no local member.
    async fn reconcile(&self, feed: &mut Feed) -> Result<(), RedisError> {
        let now = Instant::now();
        let (add, remove) = {
            let mut wanted = self.lock_wanted();
            let subscribed = self.lock_subscribed();
            let mut remove = Vec::new();
            wanted.retain(|room, interest| {
                let expired = interest.release_at.is_some_and(|at| at <= now)
                    && interest.joins_pending == 0
                    && now.duration_since(interest.since) >= self.linger
                    && self.hub.members(room.as_str()) == 0;
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
            feed.subscribe(self.scripts.channels(&add)).await?;
            // A room subscribed for the first time starts at its current last id: what was
            // published before belongs to joiners' histories, and what follows is owed to the
            // members. After a reconnect the rooms keep their positions, so `heal_all` finds
            // what was published meanwhile.
            for room in &add {
                if self.lock_streams().contains_key(room) {
                    continue;
                }
                // With `local_history`, the newest messages come along, for joins.
                if let Ok(position) = self.scripts.snapshot(room, None, self.keep_recent).await {
                    let nothing_older = position.messages.len() < self.keep_recent;
                    self.lock_streams().entry(room.clone()).or_insert_with(|| {
                        RoomStream::from_history(
                            position.epoch,
                            position.last_id,
                            &position.messages,
                            nothing_older,
                            self.keep_recent,
                        )
                    });
                }
            }
            self.lock_subscribed().extend(add);
            self.subscribed_version.send_modify(|g| *g += 1);
            self.progressed();
        }
        if !remove.is_empty() {
            feed.unsubscribe(self.scripts.channels(&remove)).await?;
            let mut subscribed = self.lock_subscribed();
            let mut streams = self.lock_streams();
            for room in &remove {
                subscribed.remove(room);
                streams.remove(room);
            }
        }
        Ok(())
    }
}
