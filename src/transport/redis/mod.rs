//! The Redis Pub/Sub backplane: any number of nodes share rooms through one Redis.
//!
//! Two connections per node. The publisher (multiplexed, reconnecting by itself) runs one
//! script per message that checks the sender's `ref` against the dedupe window, takes the
//! room's next id, `PUBLISH`es the message text with that id and stores it in the room's
//! history, atomically: the order on a room's channel is the order of its ids, and a message
//! is stored exactly once, whatever the number of nodes.
//!
//! Keys, under `redis.channel_prefix`: `meta:<room>` (hash: `epoch`, `seq`, the last id),
//! `hist:<room>` (sorted set of message texts scored by id, trimmed by count and age),
//! `ref:<room>:<user>\x1f<ref>` (the id a `ref` got, expiring after the dedupe window). The
//! channel is `room:<room>`. Every key expires: `meta` `rooms.history_ttl_secs` after the
//! room's last join, page or publish, `hist` as long after its newest message, so a room
//! nobody uses leaves nothing behind; a room whose `meta` is gone starts a new epoch.
//!
//! Each node remembers the last id it received per room. A gap in the ids (a message lost by
//! a dropped subscriber connection, or published while it was reconnecting) is filled from
//! the history before the next message is delivered, so members see every id once, in order.
//! With `redis.local_history` it also keeps each subscribed room's newest
//! `rooms.history_on_join` messages, read once when it subscribes and then followed on the
//! channel, and answers joins (and reconnects that missed no more than that) from them: a join
//! to a room the node already receives makes no Redis call.
//! The subscriber is a dedicated connection subscribed to exactly the rooms that have local
//! members (plus a short linger); its loop only copies each payload once into a WebSocket
//! frame and hands it to the hub, so Redis never has to buffer for us. When the subscriber
//! connection drops, the node keeps its clients, reconnects with capped exponential backoff
//! and jitter, and resubscribes; `/readyz` says not ready meanwhile.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use futures_util::StreamExt;
use redis::aio::{ConnectionManager, ConnectionManagerConfig, PubSubSink, PubSubStream};
use redis::{Client, ConnectionAddr, IntoConnectionInfo, RedisError, Script};
use tokio::sync::{Notify, watch};
use tokio::time::Instant;
use tracing::{debug, error, info, warn};

use crate::config::{RedisConfig, RoomsConfig};
use crate::hub::Hub;
use crate::metrics::Metrics;
use crate::protocol::native::{self, Since};
use crate::protocol::{RoomName, ws};
use crate::transport::{Envelope, Page, Published, Snapshot, TransportError, new_epoch};

/// The room's epoch, set to the candidate if it has none yet; whether it was new. Shared by
/// the scripts, which all call it first: it also gives `meta` the history's TTL again, so a
/// room nobody uses any more leaves no key behind. A room whose `meta` is gone (expired, or
/// lost by Redis) starts a new epoch with its ids at 1: the old history goes with it, so no
/// stored message ever shares an epoch with an id it did not get.
const EPOCH_LUA: &str = r"
local function room_epoch(meta, hist, candidate, ttl)
  local epoch = redis.call('HGET', meta, 'epoch')
  local fresh = false
  if not epoch then
    epoch = candidate
    fresh = true
    redis.call('HSET', meta, 'epoch', epoch)
    redis.call('DEL', hist)
  end
  redis.call('PEXPIRE', meta, ttl)
  return epoch, fresh
end
";

/// Dedupe check, id, publish and history, in one atomic step. Returns `{id, duplicate}`.
/// KEYS: meta, hist, ref. ARGV: channel, JSON before the id, JSON after it, epoch candidate,
/// history size, history TTL (ms), dedupe window (s, 0 = off). A `ref` is not looked up in
/// a new epoch: the id it got belongs to the old one.
const PUBLISH_LUA: &str = r#"
local epoch, fresh = room_epoch(KEYS[1], KEYS[2], ARGV[4], ARGV[6])
local window = tonumber(ARGV[7])
if window > 0 and not fresh then
  local prev = redis.call('GET', KEYS[3])
  if prev then return {tonumber(prev), 1} end
end
local id = redis.call('HINCRBY', KEYS[1], 'seq', 1)
local msg = ARGV[2] .. id .. ',"epoch":"' .. epoch .. '"' .. ARGV[3]
redis.call('PUBLISH', ARGV[1], msg)
local size = tonumber(ARGV[5])
if size > 0 then
  local ttl = tonumber(ARGV[6])
  redis.call('ZADD', KEYS[2], id, msg)
  redis.call('ZREMRANGEBYRANK', KEYS[2], 0, -(size + 1))
  local now = redis.call('TIME')
  local cutoff = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000) - ttl
  for _ = 1, 16 do
    local oldest = redis.call('ZRANGE', KEYS[2], 0, 0)
    local ts = oldest[1] and tonumber(string.match(oldest[1], ',"ts":(%d+)'))
    if not (ts and ts < cutoff) then break end
    redis.call('ZREMRANGEBYRANK', KEYS[2], 0, 0)
  end
  redis.call('PEXPIRE', KEYS[2], ttl)
end
if window > 0 then redis.call('SET', KEYS[3], id, 'EX', window) end
return {id, 0}
"#;

/// A joining client's history, atomically with the last id. Returns
/// `{epoch, last_id, recovered (-1 not asked, 0, 1), messages}`.
/// KEYS: meta, hist. ARGV: epoch candidate, since (-1 = none), the client's epoch, how many
/// of the newest to return when not recovering, history TTL (ms).
const SNAPSHOT_LUA: &str = r"
local epoch = room_epoch(KEYS[1], KEYS[2], ARGV[1], ARGV[5])
local last = tonumber(redis.call('HGET', KEYS[1], 'seq') or '0')
local since = tonumber(ARGV[2])
local recovered = -1
if since >= 0 then
  recovered = 0
  if ARGV[3] == epoch and since <= last then
    if since == last then return {epoch, last, 1, {}} end
    local next = #redis.call('ZRANGEBYSCORE', KEYS[2], since + 1, since + 1)
    -- What is still stored after `since`: all of it, or what is left of it.
    return {epoch, last, next, redis.call('ZRANGEBYSCORE', KEYS[2], '(' .. since, last)}
  end
end
local n = tonumber(ARGV[4])
local msgs = {}
if n > 0 then
  msgs = redis.call('ZREVRANGEBYSCORE', KEYS[2], last, '-inf', 'LIMIT', 0, n)
end
return {epoch, last, recovered, msgs}
";

/// Older messages, newest first, one more than asked (to tell whether there are more).
/// Returns `{epoch, messages}`. KEYS: meta, hist. ARGV: epoch candidate, before (-1 =
/// newest), limit, history TTL (ms).
const PAGE_LUA: &str = r"
local epoch = room_epoch(KEYS[1], KEYS[2], ARGV[1], ARGV[4])
local max = '+inf'
if tonumber(ARGV[2]) >= 0 then max = '(' .. ARGV[2] end
return {epoch, redis.call('ZREVRANGEBYSCORE', KEYS[2], max, '-inf', 'LIMIT', 0, tonumber(ARGV[3]) + 1)}
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
    /// Replaced after a timeout: a connection whose replies stopped (a half-open TCP
    /// connection, a stalled network path) would otherwise hold every later command.
    publisher: Mutex<ConnectionManager>,
    manager_config: ConnectionManagerConfig,
    heartbeat: Duration,
    publish_script: Script,
    snapshot_script: Script,
    page_script: Script,
    /// `{prefix}:room:`; a room's channel is this plus its name.
    channel_prefix: String,
    /// `{prefix}:`; the room's keys are this plus `meta:`, `hist:`, `ref:` and its name.
    key_prefix: String,
    policy: RoomsConfig,
    /// Per room: the epoch and last id this node delivered, to find gaps, and the newest
    /// messages, to answer joins.
    seen: Mutex<HashMap<RoomName, Seen>>,
    /// Held by the subscriber from `seen` taking a message until the hub delivered it.
    delivering: Mutex<()>,
    /// Joins waiting in `caught_up`, and what wakes them.
    waiting: AtomicUsize,
    progress: Notify,
    /// How many of each room's newest messages `seen` keeps: `rooms.history_on_join` with
    /// `redis.local_history`, else none.
    keep: usize,
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

/// What this node knows of a room it receives: the newest message it delivered (to find
/// gaps) and the messages up to it (to answer joins).
#[derive(Debug)]
struct Seen {
    epoch: String,
    last: u64,
    /// The newest messages, oldest first, with consecutive ids up to `last`; at most `keep`.
    recent: VecDeque<Bytes>,
    /// The history stores no message older than `recent`'s first.
    whole: bool,
    /// The newest id this node's publishes were acked with: a join waits until `last`
    /// reaches it, so a client's own messages are in the history it joins with.
    acked: u64,
}

/// What [`Seen::follow`] made of a message.
enum Step {
    /// Delivered already.
    Had,
    /// The next message: now the newest.
    Took,
    /// Not the next one: a gap, or another epoch.
    Gap,
}

/// What [`RedisTransport::local_snapshot`] can answer.
enum Local {
    Ready(Snapshot),
    /// The channel has not brought every message this node acked yet: up to `acked` of
    /// `epoch`.
    Behind {
        epoch: String,
        acked: u64,
    },
    /// Only Redis can answer.
    No,
}

impl Seen {
    /// Starts from `frames`, the newest stored messages up to `last` (consecutive ids);
    /// `whole` when the history stores none older.
    fn new(epoch: String, last: u64, frames: &[Bytes], whole: bool, keep: usize) -> Self {
        let skip = frames.len().saturating_sub(keep);
        Self {
            epoch,
            last,
            recent: frames[skip..].iter().cloned().collect(),
            whole: whole && skip == 0,
            acked: 0,
        }
    }

    /// Starts over at a message that does not follow `last`: a new epoch, or a gap the
    /// history could not fill. Ids start at 1: a message claiming id 0 is not kept, and the
    /// epoch starts before its first message.
    fn restart(epoch: &str, id: u64, frame: Bytes, keep: usize) -> Self {
        let mut seen = Self {
            epoch: epoch.to_owned(),
            last: id.saturating_sub(1),
            recent: VecDeque::new(),
            // The first id of an epoch: there is nothing older.
            whole: id <= 1,
            acked: 0,
        };
        if id > 0 {
            seen.push(frame, keep);
        }
        seen
    }

    /// Follows the next message, `last + 1`.
    fn push(&mut self, frame: Bytes, keep: usize) {
        self.last += 1;
        self.recent.push_back(frame);
        if self.recent.len() > keep {
            self.recent.pop_front();
            self.whole = false;
        }
    }

    /// Takes message `id` of `epoch` if it is the next one.
    fn follow(&mut self, epoch: &str, id: u64, frame: &Bytes, keep: usize) -> Step {
        if self.epoch != epoch || id > self.last + 1 {
            return Step::Gap;
        }
        if id <= self.last {
            return Step::Had;
        }
        self.push(frame.clone(), keep);
        Step::Took
    }

    /// The id of `recent`'s first message (`last + 1` when it is empty).
    fn first(&self) -> u64 {
        self.last + 1 - self.recent.len() as u64
    }

    /// Drops messages older than the history keeps them, as the next publish would.
    fn expire(&mut self, ttl: Duration) {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_millis() as u64;
        let cutoff = now.saturating_sub(ttl.as_millis() as u64);
        while let Some(ts) = self
            .recent
            .front()
            .and_then(|frame| native::message_ts(&ws::text_payload(frame)))
            && ts < cutoff
        {
            self.recent.pop_front();
            // Anything older is older still: the history no longer has it either.
            self.whole = true;
        }
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

#[derive(Debug, Clone, Copy)]
struct Want {
    since: Instant,
    /// Set when the last local member left: unsubscribe once the linger is over.
    release_at: Option<Instant>,
    /// Joins between `subscribe` and the hub: the room is kept for them.
    joining: usize,
}

/// A join's hold on its room, from [`RedisTransport::subscribe`] until the hub has the member
/// ([`Joining::joined`]); dropped before that, it gives the room up.
#[derive(Debug)]
pub struct Joining<'a> {
    transport: &'a RedisTransport,
    room: RoomName,
    joined: bool,
}

impl Joining<'_> {
    /// The hub has the member: from now on its leave gives the room up.
    pub fn joined(mut self) {
        self.joined = true;
    }
}

impl Drop for Joining<'_> {
    fn drop(&mut self) {
        self.transport.join_ended(&self.room, self.joined);
    }
}

impl RedisTransport {
    /// Builds the transport and starts its subscriber task.
    pub fn spawn(
        config: &RedisConfig,
        policy: &RoomsConfig,
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
        let publisher = ConnectionManager::new_lazy_with_config(client.clone(), manager.clone())
            .map_err(|e| TransportError::Unavailable(e.to_string()))?;
        let transport = Arc::new(Self {
            hub,
            client,
            publisher: Mutex::new(publisher),
            manager_config: manager,
            heartbeat: Duration::from_secs(config.heartbeat_secs),
            publish_script: Script::new(&format!("{EPOCH_LUA}{PUBLISH_LUA}")),
            snapshot_script: Script::new(&format!("{EPOCH_LUA}{SNAPSHOT_LUA}")),
            page_script: Script::new(&format!("{EPOCH_LUA}{PAGE_LUA}")),
            channel_prefix: format!("{}:room:", config.channel_prefix),
            key_prefix: format!("{}:", config.channel_prefix),
            policy: policy.clone(),
            seen: Mutex::new(HashMap::new()),
            delivering: Mutex::new(()),
            waiting: AtomicUsize::new(0),
            progress: Notify::new(),
            keep: if config.local_history {
                policy.history_on_join
            } else {
                0
            },
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

    /// `rooms.history_ttl_secs` in milliseconds: how long a room's keys outlive its last use.
    fn history_ttl_ms(&self) -> u64 {
        self.policy.history_ttl_secs.saturating_mul(1000)
    }

    fn key(&self, kind: &str, room: &str) -> String {
        format!("{}{kind}:{room}", self.key_prefix)
    }

    /// Checks the `ref`, assigns the id, publishes and stores, in one script call; the id once
    /// Redis accepted it.
    pub async fn publish(&self, envelope: &Envelope) -> Result<Published, TransportError> {
        let room = envelope.room.as_str();
        let dedupe = envelope.dedupe.as_deref().unwrap_or("");
        let window = if envelope.dedupe.is_some() {
            self.policy.dedupe_window_secs
        } else {
            0
        };
        let mut call = self.publish_script.key(self.key("meta", room));
        call.key(self.key("hist", room))
            .key(self.key("ref", &format!("{room}:{dedupe}")))
            .arg(format!("{}{room}", self.channel_prefix))
            .arg(envelope.message.head())
            .arg(envelope.message.tail())
            .arg(new_epoch())
            .arg(self.policy.history_size)
            .arg(self.history_ttl_ms())
            .arg(window);
        let (id, duplicate) = self.invoke::<(u64, u8)>(call).await?;
        if self.keep > 0
            && let Some(seen) = self.lock_seen().get_mut(room)
        {
            seen.acked = seen.acked.max(id);
        }
        Ok(Published {
            id,
            duplicate: duplicate == 1,
        })
    }

    /// The history a client joining `room` gets; see [`Snapshot`]. From this node's copy of
    /// the room's newest messages when it can answer exactly as Redis would, else from Redis.
    pub async fn snapshot(
        &self,
        room: &RoomName,
        since: Option<&Since>,
    ) -> Result<Snapshot, TransportError> {
        match self.local_snapshot(room, since) {
            Local::Ready(snapshot) => return Ok(snapshot),
            Local::Behind { epoch, acked } => {
                if self.caught_up(room, &epoch, acked, SUBSCRIBE_WAIT).await
                    && let Local::Ready(snapshot) = self.local_snapshot(room, since)
                {
                    return Ok(snapshot);
                }
            }
            Local::No => {}
        }
        self.snapshot_with(room, since, self.policy.history_on_join)
            .await
    }

    /// [`RedisTransport::snapshot`] from `seen`, while the subscriber is connected and caught
    /// up (so the copy is as current as the live stream) and the copy holds every message the
    /// answer needs. Messages are added to the copy before they are delivered, so a joiner's
    /// staging gets exactly the messages after the snapshot's `last_id`. Messages accepted
    /// through other nodes and still on their way here follow as live messages.
    fn local_snapshot(&self, room: &RoomName, since: Option<&Since>) -> Local {
        if self.keep == 0 || !self.is_ready() || !self.lock_subscribed().contains(room) {
            return Local::No;
        }
        let mut seen = self.lock_seen();
        let Some(seen) = seen.get_mut(room) else {
            return Local::No;
        };
        if seen.last < seen.acked {
            return Local::Behind {
                epoch: seen.epoch.clone(),
                acked: seen.acked,
            };
        }
        seen.expire(Duration::from_secs(self.policy.history_ttl_secs));
        let (skip, recovered) = match since {
            Some(since) if since.epoch == seen.epoch && since.id <= seen.last => {
                if since.id + 1 >= seen.first() {
                    ((since.id + 1 - seen.first()) as usize, Some(true))
                } else if seen.whole {
                    // `since + 1` is no longer stored: all that is, which is all here.
                    (0, Some(false))
                } else {
                    return Local::No; // Redis may store more of what followed `since`.
                }
            }
            _ => {
                if !seen.whole && seen.recent.len() < self.policy.history_on_join {
                    return Local::No;
                }
                (0, since.map(|_| false))
            }
        };
        Local::Ready(Snapshot {
            epoch: seen.epoch.clone(),
            last_id: seen.last,
            frames: seen.recent.iter().skip(skip).cloned().collect(),
            recovered,
        })
    }

    /// [`RedisTransport::snapshot`] returning up to `newest` messages when not recovering.
    async fn snapshot_with(
        &self,
        room: &RoomName,
        since: Option<&Since>,
        newest: usize,
    ) -> Result<Snapshot, TransportError> {
        let mut call = self.snapshot_script.key(self.key("meta", room.as_str()));
        call.key(self.key("hist", room.as_str()))
            .arg(new_epoch())
            .arg(since.map_or(-1, |s| s.id as i64))
            .arg(since.map_or("", |s| s.epoch.as_str()))
            .arg(newest)
            .arg(self.history_ttl_ms());
        let (epoch, last_id, recovered, mut messages) = self
            .invoke::<(String, u64, i64, Vec<Vec<u8>>)>(call)
            .await?;
        let same_epoch = since.is_some_and(|s| s.epoch == epoch && s.id <= last_id);
        if !same_epoch {
            messages.reverse(); // the newest, newest first from Redis
        }
        Ok(Snapshot {
            epoch,
            last_id,
            frames: messages.iter().map(|m| ws::text(m)).collect(),
            recovered: (recovered >= 0).then_some(recovered == 1),
        })
    }

    /// Up to `limit` messages of `room` older than `before`.
    pub async fn page(
        &self,
        room: &RoomName,
        before: Option<u64>,
        limit: usize,
    ) -> Result<Page, TransportError> {
        let mut call = self.page_script.key(self.key("meta", room.as_str()));
        call.key(self.key("hist", room.as_str()))
            .arg(new_epoch())
            .arg(before.map_or(-1, |b| b as i64))
            .arg(limit)
            .arg(self.history_ttl_ms());
        let (epoch, mut messages) = self.invoke::<(String, Vec<Vec<u8>>)>(call).await?;
        let more = messages.len() > limit;
        messages.truncate(limit);
        messages.reverse();
        Ok(Page {
            epoch,
            messages: messages.into_iter().map(bytes::Bytes::from).collect(),
            more,
        })
    }

    fn publisher(&self) -> ConnectionManager {
        self.publisher
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Swaps the publisher for a new connection (made at its first use) after Redis stopped
    /// answering on it; commands in flight on the old one fail with a timeout, as they would.
    fn replace_publisher(&self) {
        match ConnectionManager::new_lazy_with_config(
            self.client.clone(),
            self.manager_config.clone(),
        ) {
            Ok(fresh) => {
                *self
                    .publisher
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner) = fresh;
                debug!("redis publisher connection replaced after a timeout");
            }
            Err(e) => warn!(error = %e, "could not replace the redis publisher connection"),
        }
    }

    /// Runs a script on the publisher connection within the publish timeout.
    async fn invoke<T: redis::FromRedisValue>(
        &self,
        call: redis::ScriptInvocation<'_>,
    ) -> Result<T, TransportError> {
        let mut conn = self.publisher();
        match tokio::time::timeout(self.publish_timeout, call.invoke_async::<T>(&mut conn)).await {
            Ok(Ok(value)) => Ok(value),
            Ok(Err(e)) => {
                debug!(error = %e, "redis script failed");
                // Only a command that never reached Redis is known not to have run.
                if e.is_timeout() || (e.is_io_error() && !e.is_connection_refusal()) {
                    if e.is_timeout() {
                        self.replace_publisher();
                    }
                    Err(TransportError::Timeout(format!("redis: {e}")))
                } else {
                    Err(TransportError::Unavailable(format!("redis: {e}")))
                }
            }
            Err(_) => {
                self.replace_publisher();
                Err(TransportError::Timeout(format!(
                    "redis did not answer within {} ms",
                    self.publish_timeout.as_millis()
                )))
            }
        }
    }

    /// Wants `room`'s messages; returns once subscribed (or after a short wait if Redis is
    /// down: the subscription follows when it is back). The room is held for the join until
    /// the returned [`Joining`] is dropped: if the hub did not get the member by then (the
    /// join was cancelled, even while this waits), the room is given up as a leave would.
    pub async fn subscribe(&self, room: &RoomName) -> Joining<'_> {
        let now = Instant::now();
        {
            let mut wanted = self.lock_wanted();
            let want = wanted.entry(room.clone()).or_insert(Want {
                since: now,
                release_at: None,
                joining: 0,
            });
            want.since = now;
            want.release_at = None;
            want.joining += 1;
        }
        let joining = Joining {
            transport: self,
            room: room.clone(),
            joined: false,
        };
        if self.lock_subscribed().contains(room) {
            return joining;
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
        joining
    }

    /// A join of `room` ended: with the member in the hub (`joined`), whose leave gives the
    /// room up, or without (cancelled), when the room is given up now unless another join is
    /// under way or a member is there.
    fn join_ended(&self, room: &RoomName, joined: bool) {
        let mut wanted = self.lock_wanted();
        let Some(want) = wanted.get_mut(room) else {
            return;
        };
        want.joining = want.joining.saturating_sub(1);
        if !joined && want.joining == 0 && self.hub.online(room.as_str()) == 0 {
            want.release_at = Some(Instant::now() + self.linger);
            drop(wanted);
            self.changed.notify_one();
        }
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
                            // Messages published while the subscriber was away come from the
                            // history before any new one is delivered.
                            self.catch_up().await;
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
        let mut last = None;
        for _ in 0..3 {
            let mut conn = self.publisher();
            let ping = redis::cmd("PING");
            match tokio::time::timeout(self.publish_timeout, ping.query_async::<()>(&mut conn))
                .await
            {
                Ok(Ok(())) => return Ok(()),
                Ok(Err(e)) => {
                    if e.is_timeout() {
                        self.replace_publisher();
                    }
                    last = Some(e);
                }
                Err(_) => {
                    self.replace_publisher();
                    last = Some(timeout_error());
                }
            }
        }
        Err(last.unwrap_or_else(closed_error))
    }

    /// Delivers every message until the connection fails; reconciles subscriptions when
    /// asked and once a second (for lingering rooms); every `redis.heartbeat_secs` sends a
    /// `PING` on the subscriber connection and gives it up when no answer comes within
    /// `redis.publish_timeout_ms`, so a stalled or half-open connection is noticed even when
    /// no message is due.
    async fn receive(&self, sink: &mut PubSubSink, stream: &mut PubSubStream) -> RedisError {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        let mut heartbeat = tokio::time::interval(self.heartbeat);
        heartbeat.reset();
        loop {
            tokio::select! {
                msg = stream.next() => match msg {
                    Some(msg) => {
                        self.receive_one(msg.get_channel_name(), msg.get_payload_bytes()).await
                    }
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
                _ = heartbeat.tick() => {
                    match tokio::time::timeout(self.publish_timeout, sink.ping::<redis::Value>()).await {
                        Ok(Ok(_)) => {}
                        Ok(Err(e)) => return e,
                        Err(_) => return heartbeat_error(self.publish_timeout),
                    }
                }
            }
        }
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
                .lock_seen()
                .get(room)
                .is_some_and(|s| s.epoch == epoch && s.last >= last_id);
            // `seen` takes a message before the hub has it: wait for that delivery to end,
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

    /// Wakes the joins waiting in [`RedisTransport::caught_up`], if any: called after `seen`
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

    fn lock_seen(&self) -> MutexGuard<'_, HashMap<RoomName, Seen>> {
        self.seen.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Delivers one message from the channel in id order: the first of a gap is preceded by
    /// the missing ones from the history, and one already delivered is dropped. The payload
    /// is the frame's text: one copy into the frame, none per member. `seen` takes the
    /// message before the hub delivers it (see [`RedisTransport::local_snapshot`]).
    async fn receive_one(&self, channel: &str, payload: &[u8]) {
        let Some(room) = channel.strip_prefix(&self.channel_prefix) else {
            return;
        };
        let frame = ws::text(payload);
        // Ids start at 1: id 0 is no id.
        let Some((id, epoch)) = native::message_meta(payload).filter(|(id, _)| *id > 0) else {
            warn!(%room, "a message on the channel has no id; delivered as it is");
            self.hub.deliver(room, &frame);
            return;
        };
        // Held from `seen` taking the message until the hub has it (see `caught_up`).
        let delivering = self.lock_delivering();
        // The common case, the next id of the same epoch, allocates nothing more here.
        let gap = {
            let mut seen = self.lock_seen();
            match seen.get_mut(room) {
                Some(s) => match s.follow(epoch, id, &frame, self.keep) {
                    Step::Had => return,
                    Step::Took => None,
                    Step::Gap => Some(Some((s.epoch.clone(), s.last))),
                },
                None => Some(None),
            }
        };
        let Some(gap) = gap else {
            self.hub.deliver(room, &frame);
            drop(delivering);
            return self.progressed();
        };
        drop(delivering); // not held while the history is read
        let Ok(room_name) = RoomName::new(room) else {
            return;
        };
        if let Some((seen_epoch, seen_last)) = gap {
            // A gap, or a new epoch: what is missing comes from the history first.
            self.metrics.backplane_gaps_total.inc();
            if let Some((_, true)) = self.heal(&room_name, &seen_epoch, seen_last).await {
                self.metrics.backplane_gaps_healed_total.inc();
            }
        }
        let delivering = self.lock_delivering();
        {
            let mut seen = self.lock_seen();
            let step = seen
                .get_mut(&room_name)
                .map(|s| s.follow(epoch, id, &frame, self.keep));
            match step {
                Some(Step::Had) => return, // the history had it
                Some(Step::Took) => {}
                Some(Step::Gap) | None => {
                    let restarted = Seen::restart(epoch, id, frame.clone(), self.keep);
                    seen.insert(room_name, restarted);
                }
            }
        }
        self.hub.deliver(room, &frame);
        drop(delivering);
        self.progressed();
    }

    /// Delivers from the history what this node missed in `room` since `seen_last` of
    /// `seen_epoch`, in order. Returns how many messages it delivered and whether the history
    /// still held every one (`false`: some are lost, e.g. the history was reset or trimmed
    /// past them); `None` when the history could not be read.
    async fn heal(
        &self,
        room: &RoomName,
        seen_epoch: &str,
        seen_last: u64,
    ) -> Option<(usize, bool)> {
        let since = Since {
            id: seen_last,
            epoch: seen_epoch.to_owned(),
        };
        let snapshot = match self
            .snapshot_with(room, Some(&since), self.policy.history_size)
            .await
        {
            Ok(snapshot) => snapshot,
            Err(e) => {
                warn!(%room, error = %e, "could not read the history to fill a gap");
                return None;
            }
        };
        // In a new epoch everything is new; in the same one, what follows `seen`.
        let same_epoch = snapshot.epoch == seen_epoch;
        let floor = if same_epoch { seen_last } else { 0 };
        let missed: Vec<&Bytes> = snapshot
            .frames
            .iter()
            .filter(|frame| {
                native::message_meta(&ws::text_payload(frame)).map_or(0, |(id, _)| id) > floor
            })
            .collect();
        let complete = snapshot.recovered == Some(true);
        let delivering = self.lock_delivering();
        {
            // `seen` takes the messages before the hub delivers them.
            let mut seen = self.lock_seen();
            match seen.get_mut(room) {
                Some(s)
                    if complete
                        && s.epoch == seen_epoch
                        && s.last == seen_last
                        && seen_last + missed.len() as u64 == snapshot.last_id =>
                {
                    for frame in &missed {
                        s.push((*frame).clone(), self.keep);
                    }
                }
                _ => {
                    // Start over from what the history still stores. Recovering in the same
                    // epoch without `since + 1`: nothing older is stored either. Otherwise the
                    // newest `history_size` came, all there are when fewer came.
                    let whole = if same_epoch && snapshot.last_id >= seen_last && !complete {
                        true
                    } else {
                        snapshot.frames.len() < self.policy.history_size
                    };
                    let restarted = Seen::new(
                        snapshot.epoch.clone(),
                        snapshot.last_id,
                        &snapshot.frames,
                        whole,
                        self.keep,
                    );
                    seen.insert(room.clone(), restarted);
                }
            }
        }
        for frame in &missed {
            self.hub.deliver(room.as_str(), frame);
        }
        drop(delivering);
        self.progressed();
        let delivered = missed.len();
        self.metrics
            .backplane_messages_healed_total
            .add(delivered as u64);
        if !complete {
            warn!(
                %room, after_id = seen_last, epoch = %seen_epoch, new_epoch = %snapshot.epoch,
                "messages were lost on the backplane and are no longer in the history"
            );
        }
        Some((delivered, complete))
    }

    /// After a reconnect: fills every room's gap from the history.
    async fn catch_up(&self) {
        let rooms: Vec<(RoomName, String, u64)> = self
            .lock_seen()
            .iter()
            .map(|(room, seen)| (room.clone(), seen.epoch.clone(), seen.last))
            .collect();
        for (room, epoch, last) in rooms {
            if let Some((delivered, complete)) = self.heal(&room, &epoch, last).await
                && (delivered > 0 || !complete)
            {
                self.metrics.backplane_gaps_total.inc();
                if complete {
                    self.metrics.backplane_gaps_healed_total.inc();
                }
            }
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
                    && want.joining == 0
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
            // A room subscribed for the first time starts at its current last id: what was
            // published before belongs to joiners' histories, and what follows is owed to the
            // members. After a reconnect the rooms keep their positions, so `catch_up` finds
            // what was published meanwhile.
            for room in &add {
                if self.lock_seen().contains_key(room) {
                    continue;
                }
                // With `local_history`, the newest messages come along, for joins.
                if let Ok(position) = self.snapshot_with(room, None, self.keep).await {
                    let whole = position.frames.len() < self.keep;
                    self.lock_seen().entry(room.clone()).or_insert_with(|| {
                        Seen::new(
                            position.epoch,
                            position.last_id,
                            &position.frames,
                            whole,
                            self.keep,
                        )
                    });
                }
            }
            self.lock_subscribed().extend(add);
            self.generation.send_modify(|g| *g += 1);
            self.progressed();
        }
        if !remove.is_empty() {
            sink.unsubscribe(self.channels(&remove)).await?;
            let mut subscribed = self.lock_subscribed();
            let mut seen = self.lock_seen();
            for room in &remove {
                subscribed.remove(room);
                seen.remove(room);
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
    let info = info.set_redis_settings(settings);
    if config.tls && !config.tls_ca_file.is_empty() {
        let pem = std::fs::read(&config.tls_ca_file).map_err(|e| {
            RedisError::from(std::io::Error::new(
                e.kind(),
                format!("redis.tls_ca_file {}: {e}", config.tls_ca_file),
            ))
        })?;
        return Client::build_with_tls(
            info,
            redis::TlsCertificates {
                client_tls: None,
                root_cert: Some(pem),
            },
        );
    }
    Client::open(info)
}

fn timeout_error() -> RedisError {
    RedisError::from(std::io::Error::new(
        std::io::ErrorKind::TimedOut,
        "connecting to redis timed out",
    ))
}

fn heartbeat_error(waited: Duration) -> RedisError {
    RedisError::from(std::io::Error::new(
        std::io::ErrorKind::TimedOut,
        format!(
            "redis did not answer a heartbeat PING within {} ms",
            waited.as_millis()
        ),
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

    fn message(id: u64, ts: u64) -> Bytes {
        ws::text(
            format!(r#"{{"type":"message","room":"r","from":"a","message":"x","ts":{ts},"id":{id},"epoch":"e"}}"#)
                .as_bytes(),
        )
    }

    fn ids(seen: &Seen) -> Vec<u64> {
        let id = |f: &Bytes| native::message_meta(&ws::text_payload(f)).unwrap().0;
        seen.recent.iter().map(id).collect()
    }

    #[test]
    fn seen_keeps_the_newest_and_knows_when_it_holds_all_there_is() {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_millis() as u64;
        let frames: Vec<Bytes> = (1..=3).map(|id| message(id, now)).collect();
        let mut seen = Seen::new("e".into(), 3, &frames, true, 4);
        assert_eq!(
            (ids(&seen), seen.first(), seen.whole),
            (vec![1, 2, 3], 1, true)
        );
        seen.push(message(4, now), 4);
        assert!(seen.whole);
        seen.push(message(5, now), 4);
        assert_eq!(
            (ids(&seen), seen.first(), seen.whole),
            (vec![2, 3, 4, 5], 2, false)
        );
        // More than it keeps: the oldest are left out, and others may be stored.
        let seen = Seen::new("e".into(), 3, &frames, true, 2);
        assert_eq!((ids(&seen), seen.whole), (vec![2, 3], false));
        // Nothing kept: first is the next id.
        let seen = Seen::new("e".into(), 7, &[], false, 0);
        assert_eq!(seen.first(), 8);
        let seen = Seen::restart("f", 1, message(1, now), 4);
        assert_eq!((ids(&seen), seen.last, seen.whole), (vec![1], 1, true));
        let seen = Seen::restart("f", 9, message(9, now), 4);
        assert_eq!((ids(&seen), seen.first(), seen.whole), (vec![9], 9, false));
    }

    #[test]
    fn seen_restarting_at_id_0_keeps_nothing_and_does_not_underflow() {
        let mut seen = Seen::restart("f", 0, message(0, 1), 4);
        assert_eq!(
            (ids(&seen), seen.last, seen.first(), seen.whole),
            (vec![], 0, 1, true)
        );
        // The epoch's first real message follows.
        assert!(matches!(seen.follow("f", 1, &message(1, 1), 4), Step::Took));
        assert_eq!((ids(&seen), seen.last), (vec![1], 1));
    }

    /// A transport of a Redis that is not there: subscriptions are never confirmed.
    fn unreachable() -> Arc<RedisTransport> {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .unwrap()
            .port();
        let config = RedisConfig {
            host: "127.0.0.1".into(),
            port,
            ..RedisConfig::default()
        };
        let metrics = Arc::new(Metrics::default());
        let hub = Arc::new(Hub::with_metrics(metrics.clone()));
        RedisTransport::spawn(&config, &RoomsConfig::default(), hub, metrics).unwrap()
    }

    #[tokio::test(start_paused = true)]
    async fn a_join_cancelled_while_subscribing_gives_the_room_up() {
        let transport = unreachable();
        let room = RoomName::new("r").unwrap();
        let waited = tokio::time::timeout(Duration::from_millis(50), transport.subscribe(&room));
        assert!(waited.await.is_err(), "the join was still waiting");
        let want = transport.lock_wanted()[&room];
        assert!(want.release_at.is_some() && want.joining == 0);
        // A join that gets its member into the hub keeps the room for it.
        transport.subscribe(&room).await.joined();
        let want = transport.lock_wanted()[&room];
        assert!(want.release_at.is_none() && want.joining == 0);
    }

    #[test]
    fn seen_drops_what_the_history_no_longer_keeps() {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_millis() as u64;
        let frames = [
            message(4, now - 90_000),
            message(5, now - 70_000),
            message(6, now),
        ];
        let mut seen = Seen::new("e".into(), 6, &frames, false, 3);
        assert_eq!(native::message_ts(&ws::text_payload(&frames[2])), Some(now));
        seen.expire(Duration::from_secs(80));
        assert_eq!((ids(&seen), seen.whole), (vec![5, 6], true));
        seen.expire(Duration::from_secs(3600));
        assert_eq!(ids(&seen), [5, 6]);
    }
}
