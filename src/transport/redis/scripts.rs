//! The Lua scripts that keep each room's ids, history and dedupe window in Redis, each in one
//! atomic step, and the publisher connection that runs them. Keys, under
//! `redis.channel_prefix`: `meta:<room>` (hash: `epoch`, `seq`, the last id), `hist:<room>`
//! (sorted set of message texts scored by id, trimmed by count and age),
//! `ref:<room>:<user>\x1f<ref>` (the id a `ref` got, expiring after the dedupe window). The
//! channel is `room:<room>`. Every key expires: `meta` `rooms.history_ttl_secs` after the
//! room's last join, page or publish, `hist` as long after its newest message, so a room
//! nobody uses leaves nothing behind; a room whose `meta` is gone starts a new epoch. A call
//! waits at most `redis.publish_timeout_ms`; a connection that stopped answering is replaced.
//! In cluster mode the room in every key and in the channel is a hash tag (`meta:{<room>}`,
//! `room:{<room>}`, …), so a room's keys and channel live in one slot, its scripts run on the
//! shard owning it, and messages go out with `SPUBLISH` (sharded Pub/Sub). Standalone and
//! sentinel modes keep the names without braces.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use redis::cluster_async::ClusterConnection;
use redis::{Client, RedisError, Script};
use tracing::{debug, warn};

use super::connect::{closed_error, manager_config, timeout_error};
use super::publisher::{Conn, Publisher};
use crate::config::{RedisConfig, RedisMode, RoomsConfig};
use crate::protocol::RoomName;
use crate::protocol::message::Message;
use crate::protocol::native::Since;
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

/// Dedupe check, id, publish and history for a batch of messages of one room, in their order,
/// in one atomic step. Returns `{epoch, {id, duplicate, id, duplicate, ...}}`, one pair per
/// message. KEYS: meta, hist, the archive stream, then each message's ref key. ARGV: channel,
/// epoch candidate, history size, history TTL (ms), the epoch and last id the publishing node
/// delivered (`""`, 0: none), the publish command (`SPUBLISH` in cluster mode), the archive
/// stream's cap (0: no archive; never in cluster mode, where the stream would be on another
/// shard), then per message: JSON before the id, JSON after it, dedupe window (s, 0 = off).
/// With the archive on, each message is also appended to the archive stream (capped,
/// approximately), which the nodes consume (`archive::stream`). In a new epoch a `ref` is
/// looked up only among the batch's own: the id it got before belongs to the old epoch. Ids
/// never go back below what the node delivered: a Redis that lost its newest writes (a
/// failover before they reached the replica) gives the next message a new id, and the lost
/// ones are a gap the receivers report.
const PUBLISH_LUA: &str = r#"
local epoch, fresh = room_epoch(KEYS[1], KEYS[2], ARGV[2], ARGV[4])
if ARGV[5] == epoch and tonumber(redis.call('HGET', KEYS[1], 'seq') or '0') < tonumber(ARGV[6]) then
  redis.call('HSET', KEYS[1], 'seq', ARGV[6])
end
local size = tonumber(ARGV[3])
local archive_cap = tonumber(ARGV[8])
local out, mine = {}, {}
for i = 0, (#ARGV - 8) / 3 - 1 do
  local ref, window = KEYS[4 + i], tonumber(ARGV[11 + 3 * i])
  local prev = false
  if window > 0 then
    if fresh then prev = mine[ref] or false else prev = redis.call('GET', ref) end
  end
  if prev then
    out[#out + 1] = tonumber(prev)
    out[#out + 1] = 1
  else
    local id = redis.call('HINCRBY', KEYS[1], 'seq', 1)
    local msg = ARGV[9 + 3 * i] .. id .. ',"epoch":"' .. epoch .. '"' .. ARGV[10 + 3 * i]
    redis.call(ARGV[7], ARGV[1], msg)
    if archive_cap > 0 then
      redis.call('XADD', KEYS[3], 'MAXLEN', '~', archive_cap, '*', 'm', msg)
    end
    if size > 0 then redis.call('ZADD', KEYS[2], id, msg) end
    if window > 0 then
      redis.call('SET', ref, id, 'EX', window)
      mine[ref] = id
    end
    out[#out + 1] = id
    out[#out + 1] = 0
  end
end
if size > 0 then
  local ttl = tonumber(ARGV[4])
  redis.call('ZREMRANGEBYRANK', KEYS[2], 0, -(size + 1))
  local now = redis.call('TIME')
  local cutoff = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000) - ttl
  for _ = 1, 16 do
    local oldest = redis.call('ZRANGE', KEYS[2], 0, 0)
    local ok, stored = pcall(cjson.decode, oldest[1] or 'null')
    local ts = ok and type(stored) == 'table' and tonumber(stored.ts)
    if not (ts and ts < cutoff) then break end
    redis.call('ZREMRANGEBYRANK', KEYS[2], 0, 0)
  end
  redis.call('PEXPIRE', KEYS[2], ttl)
end
return {epoch, out}
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

/// The scripts, the publisher connection they run on, and the names of a room's keys and
/// channel.
pub(super) struct Scripts {
    /// The connection the scripts run on. A single server's is replaced after a timeout:
    /// one whose replies stopped (a half-open TCP connection, a stalled network path) would
    /// otherwise hold every later command.
    publisher: Publisher,
    publish_timeout: Duration,
    publish_script: Script,
    snapshot_script: Script,
    page_script: Script,
    /// `{prefix}:room:`; a room's channel is this plus its name.
    channel_prefix: String,
    /// `{prefix}:`; the room's keys are this plus `meta:`, `hist:`, `ref:` and its name.
    key_prefix: String,
    history_size: usize,
    /// `rooms.history_ttl_secs` in milliseconds: how long a room's keys outlive its last use.
    history_ttl_ms: u64,
    dedupe_window_secs: u64,
    /// `redis.wait_replicas`.
    wait_replicas: u32,
    /// Cluster mode: the room is a hash tag in key and channel names, published with
    /// `SPUBLISH`.
    sharded: bool,
    /// Entries the archive stream keeps at most (about); 0 when the archive is off.
    archive_cap: usize,
    /// Calls that got no answer in time, logged at most once per [`TIMEOUT_LOG_EVERY`].
    timeouts: TimeoutLog,
}

/// How often a node logs that Redis calls timed out, at most.
const TIMEOUT_LOG_EVERY: Duration = Duration::from_secs(10);

/// Counts calls that timed out and logs them at warn, at most once per
/// [`TIMEOUT_LOG_EVERY`] with how many there were since the last line: each is a request
/// answered `unavailable` (a send that may still be delivered), which an outage or a stalled
/// node makes by the thousand.
#[derive(Default)]
struct TimeoutLog {
    /// Timed out since the last line.
    unlogged: AtomicU64,
    /// When the next line may be written, ms since the Unix epoch.
    next_ms: AtomicU64,
}

impl TimeoutLog {
    fn note(&self, timeout: Duration, error: &str) {
        self.unlogged.fetch_add(1, Ordering::AcqRel);
        let now = crate::hub::now_ms();
        let next = self.next_ms.load(Ordering::Acquire);
        if now < next
            || self
                .next_ms
                .compare_exchange(
                    next,
                    now + TIMEOUT_LOG_EVERY.as_millis() as u64,
                    Ordering::AcqRel,
                    Ordering::Acquire,
                )
                .is_err()
        {
            return;
        }
        let timed_out = self.unlogged.swap(0, Ordering::AcqRel);
        warn!(
            timed_out,
            timeout_ms = timeout.as_millis() as u64,
            %error,
            "redis calls got no answer in time: answered `unavailable` (a send may still be \
             delivered) and the publisher connection replaced"
        );
    }
}

impl Scripts {
    /// The scripts over a publisher connection of `client` (made at its first use), or of
    /// the master [`Scripts::use_master`] is given later.
    pub(super) fn new(
        client: Option<Client>,
        config: &RedisConfig,
        policy: &RoomsConfig,
        archive_cap: usize,
    ) -> Result<Self, RedisError> {
        let publish_timeout = Duration::from_millis(config.publish_timeout_ms);
        Ok(Self {
            publisher: Publisher::new(client, manager_config(publish_timeout))?,
            publish_timeout,
            publish_script: Script::new(&format!("{EPOCH_LUA}{PUBLISH_LUA}")),
            snapshot_script: Script::new(&format!("{EPOCH_LUA}{SNAPSHOT_LUA}")),
            page_script: Script::new(&format!("{EPOCH_LUA}{PAGE_LUA}")),
            channel_prefix: format!("{}:room:", config.channel_prefix),
            key_prefix: format!("{}:", config.channel_prefix),
            history_size: policy.history_size,
            history_ttl_ms: policy.history_ttl_secs.saturating_mul(1000),
            dedupe_window_secs: policy.dedupe_window_secs,
            wait_replicas: config.wait_replicas,
            sharded: config.mode == RedisMode::Cluster,
            // One stream for every room cannot be written by a script on a room's shard.
            archive_cap: if config.mode == RedisMode::Cluster {
                0
            } else {
                archive_cap
            },
            timeouts: TimeoutLog::default(),
        })
    }

    /// The archive stream's key: `{prefix}:archive`.
    pub(super) fn archive_key(&self) -> String {
        format!("{}archive", self.key_prefix)
    }

    /// `{prefix}:room:`; a room's channel is this plus its name (in braces when sharded).
    pub(super) fn channel_prefix(&self) -> &str {
        &self.channel_prefix
    }

    /// The room a channel carries, if it is one of ours.
    pub(super) fn room_of<'a>(&self, channel: &'a str) -> Option<&'a str> {
        let room = channel.strip_prefix(self.channel_prefix.as_str())?;
        if self.sharded {
            room.strip_prefix('{')?.strip_suffix('}')
        } else {
            Some(room)
        }
    }

    fn channel(&self, room: &str) -> String {
        format!("{}{}", self.channel_prefix, self.tagged(room))
    }

    /// The channels of `rooms`.
    pub(super) fn channels(&self, rooms: &[RoomName]) -> Vec<String> {
        rooms
            .iter()
            .map(|room| self.channel(room.as_str()))
            .collect()
    }

    /// `{prefix}:`, before every key's name.
    pub(super) fn key_prefix(&self) -> &str {
        &self.key_prefix
    }

    /// `room`, as a hash tag when sharded.
    fn tagged<'a>(&self, room: &'a str) -> std::borrow::Cow<'a, str> {
        if self.sharded {
            format!("{{{room}}}").into()
        } else {
            room.into()
        }
    }

    fn key(&self, kind: &str, room: &str) -> String {
        format!("{}{kind}:{}", self.key_prefix, self.tagged(room))
    }

    /// Checks each `ref`, assigns the ids (after `delivered`, this node's epoch and last id
    /// of the room, if any), publishes and stores `envelopes`, all of one room, in their
    /// order, in one script call; their ids and the room's epoch once Redis accepted them,
    /// and with `redis.wait_replicas` once that many replicas have them. One call at a time
    /// per sender keeps its messages in order whatever happens beneath: the client library
    /// retries a script Redis does not know yet, a cluster connection follows redirects and
    /// reconnects, each request on its own.
    pub(super) async fn publish(
        &self,
        envelopes: &[Envelope],
        delivered: Option<(String, u64)>,
    ) -> Result<(Vec<Published>, String), TransportError> {
        let Some(first) = envelopes.first() else {
            return Ok((Vec::new(), String::new()));
        };
        let room = first.draft.room.as_str();
        let mut call = self.publish_script.key(self.key("meta", room));
        call.key(self.key("hist", room))
            // Without the archive, a key of the room's own (never written): in cluster mode
            // every key a script names must be on the room's shard.
            .key(if self.archive_cap > 0 {
                self.archive_key()
            } else {
                self.key("meta", room)
            });
        let (epoch, last_id) = delivered.unwrap_or_default();
        call.arg(self.channel(room))
            .arg(new_epoch())
            .arg(self.history_size)
            .arg(self.history_ttl_ms)
            .arg(epoch)
            .arg(last_id)
            .arg(if self.sharded { "SPUBLISH" } else { "PUBLISH" })
            .arg(self.archive_cap);
        let ref_prefix = self.key("ref", room);
        for envelope in envelopes {
            let dedupe = envelope.dedupe.as_deref().unwrap_or("");
            let window = if envelope.dedupe.is_some() {
                self.dedupe_window_secs
            } else {
                0
            };
            call.key(format!("{ref_prefix}:{dedupe}"))
                .arg(envelope.draft.template.head())
                .arg(envelope.draft.template.tail())
                .arg(window);
        }
        let started = tokio::time::Instant::now();
        let (epoch, ids) = self.invoke::<(String, Vec<u64>)>(call).await?;
        if ids.len() != 2 * envelopes.len() {
            return Err(TransportError::Unavailable(format!(
                "redis: the publish script answered {} values for {} messages",
                ids.len(),
                envelopes.len()
            )));
        }
        if self.wait_replicas > 0 {
            let left = self.publish_timeout.saturating_sub(started.elapsed());
            self.publisher
                .wait_for_replicas(self.wait_replicas, left, self.publish_timeout)
                .await?;
        }
        let published = ids
            .chunks_exact(2)
            .map(|pair| Published {
                id: pair[0],
                duplicate: pair[1] == 1,
            })
            .collect();
        Ok((published, epoch))
    }

    /// The history a client joining `room` gets, read from Redis (see [`Snapshot`]), with up
    /// to `newest` messages when not recovering.
    pub(super) async fn snapshot(
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
            .arg(self.history_ttl_ms);
        let (epoch, last_id, recovered, mut messages) = self
            .invoke::<(String, u64, i64, Vec<Vec<u8>>)>(call)
            .await?;
        let same_epoch = since.is_some_and(|s| s.epoch == epoch && s.id <= last_id);
        if !same_epoch {
            messages.reverse(); // the newest, newest first from Redis
        }
        Ok(Snapshot {
            messages: decode_stored(room, &messages),
            epoch,
            last_id,
            recovered: (recovered >= 0).then_some(recovered == 1),
        })
    }

    /// Up to `limit` messages of `room` older than `before`.
    pub(super) async fn page(
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
            .arg(self.history_ttl_ms);
        let (epoch, mut messages) = self.invoke::<(String, Vec<Vec<u8>>)>(call).await?;
        let more = messages.len() > limit;
        messages.truncate(limit);
        messages.reverse();
        Ok(Page {
            epoch,
            messages: decode_stored(room, &messages),
            more,
        })
    }

    fn publisher(&self) -> Result<Conn, TransportError> {
        self.publisher.get()
    }

    /// Whether the publisher has a connection to run the scripts on.
    pub(super) fn has_master(&self) -> bool {
        self.publisher.has_master()
    }

    /// Runs the scripts on `client`, the new master, from now on.
    pub(super) fn use_master(&self, client: Client) {
        self.publisher.use_master(client);
    }

    /// Runs the scripts on the cluster connection `conn` from now on.
    pub(super) fn use_cluster(&self, conn: ClusterConnection) {
        self.publisher.use_cluster(conn);
    }

    /// Whether the cluster connection stopped answering (see [`Publisher::replace`]).
    pub(super) fn cluster_stalled(&self) -> bool {
        self.publisher.cluster_stalled()
    }

    fn replace_publisher(&self) {
        self.publisher.replace();
    }

    /// Runs another part's script on the publisher connection, as [`Scripts::invoke`].
    pub(super) async fn run<T: redis::FromRedisValue>(
        &self,
        call: redis::ScriptInvocation<'_>,
    ) -> Result<T, TransportError> {
        self.invoke(call).await
    }

    /// Runs one command on the publisher connection within the publish timeout.
    pub(super) async fn query<T: redis::FromRedisValue>(
        &self,
        cmd: &redis::Cmd,
    ) -> Result<T, TransportError> {
        let mut conn = self.publisher()?;
        match tokio::time::timeout(self.publish_timeout, cmd.query_async::<T>(&mut conn)).await {
            Ok(Ok(value)) => Ok(value),
            Ok(Err(e)) => Err(TransportError::Unavailable(format!("redis: {e}"))),
            Err(_) => Err(TransportError::Timeout(format!(
                "redis did not answer within {} ms",
                self.publish_timeout.as_millis()
            ))),
        }
    }

    /// Runs a script on the publisher connection within the publish timeout.
    async fn invoke<T: redis::FromRedisValue>(
        &self,
        call: redis::ScriptInvocation<'_>,
    ) -> Result<T, TransportError> {
        let mut conn = self.publisher()?;
        match tokio::time::timeout(self.publish_timeout, call.invoke_async::<T>(&mut conn)).await {
            Ok(Ok(value)) => Ok(value),
            Ok(Err(e)) => {
                debug!(error = %e, "redis script failed");
                // Only a command that never reached Redis is known not to have run.
                if e.is_timeout() || (e.is_io_error() && !e.is_connection_refusal()) {
                    if e.is_timeout() {
                        self.timeouts.note(self.publish_timeout, &e.to_string());
                        self.replace_publisher();
                    }
                    Err(TransportError::Timeout(format!("redis: {e}")))
                } else {
                    Err(TransportError::Unavailable(format!("redis: {e}")))
                }
            }
            Err(_) => {
                let error = format!(
                    "redis did not answer within {} ms",
                    self.publish_timeout.as_millis()
                );
                self.timeouts.note(self.publish_timeout, &error);
                self.replace_publisher();
                Err(TransportError::Timeout(error))
            }
        }
    }

    /// Makes sure the publisher works too before the node calls itself ready: a `PING` that
    /// fails on a connection broken by the outage makes the connection manager reconnect,
    /// so the first `send` after an outage does not hit the dead connection, and a Redis
    /// that wants a password nobody gave is refused here, not at the first join.
    pub(super) async fn check_publisher(&self) -> Result<(), RedisError> {
        let mut last = None;
        for _ in 0..3 {
            let Ok(mut conn) = self.publisher() else {
                return Err(closed_error());
            };
            match tokio::time::timeout(self.publish_timeout, conn.ping()).await {
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
}

/// The messages of `room`'s history as stored (native JSON texts), decoded once; a text that
/// is not a message of the room (written by something else) is logged and left out.
fn decode_stored(room: &RoomName, stored: &[Vec<u8>]) -> Vec<Arc<Message>> {
    stored
        .iter()
        .filter_map(|json| match Message::decode(json) {
            Ok(message) if message.room() == room => Some(Arc::new(message)),
            Ok(_) => {
                warn!(%room, "the room's history holds another room's message; left out");
                None
            }
            Err(e) => {
                warn!(%room, error = %e, "the room's history holds a malformed entry; left out");
                None
            }
        })
        .collect()
}
