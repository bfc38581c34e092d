//! The archive's source on the Redis transport: one Redis stream that the publish script
//! appends every accepted message to, read by every node in one consumer group, so each
//! message goes to one node, which acknowledges it (`XACK`) only once its batch is committed.
//! Entries a node read and never acknowledged (it died, or PostgreSQL was down for it) stay
//! pending in Redis: a restarted node reads its own again first, and after [`CLAIM_IDLE`] any
//! node takes them over (`XAUTOCLAIM`). Delivery is at least once; the idempotent insert makes
//! it one row per message.
//!
//! While PostgreSQL is down the consumer stops reading and retries its batch: the stream,
//! bounded in Redis by the publish script's `MAXLEN`, is the queue.
//!
//! The stream lives on the master: the one server, or in sentinel mode whichever master the
//! sentinels name, asked again at every (re)connect ([`Locate`]). After a failover the
//! consumer reconnects to the new master and goes on there: the group, its pending entries
//! and the stream are replicated, as far as the replica had them.

use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use futures_util::future::BoxFuture;
use futures_util::stream::FuturesUnordered;
use redis::aio::MultiplexedConnection;
use redis::streams::{StreamAutoClaimReply, StreamId, StreamReadReply};
use redis::{AsyncConnectionConfig, Client, RedisError, Script};
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::writer::{Backoff, insert, now_ms};
use super::{Archive, Shared};
use crate::protocol::message::Message;

/// The stream field that holds a message's native JSON.
pub const FIELD: &str = "m";
/// The consumer group every node reads in.
pub const GROUP: &str = "scalechat-archive";
/// How long an entry stays pending with a consumer before another may take it over.
pub const CLAIM_IDLE: Duration = Duration::from_secs(60);
/// How long one read waits for new entries.
const BLOCK: Duration = Duration::from_secs(1);
/// How often pending entries of other consumers are looked for.
const CLAIM_EVERY: Duration = Duration::from_secs(10);

/// Reads up to ARGV[3] new entries for consumer ARGV[2] of group ARGV[1] (`XREADGROUP >`),
/// after counting the entries trimmed from the stream (by the publisher's `MAXLEN`) before the
/// group read them and moving the group's count of entries read past them, so each loss is
/// counted once, by one node. Both in one script: entries trimmed between a check and a read
/// would be skipped by the read and never counted. KEYS: the stream. Returns the count (-1 when
/// Redis cannot tell how many), the stream's last id, and the entries read.
///
/// Trimming removes entries from the head: the undelivered entries can have lost some only
/// when the group's last delivered id is older than the stream's first entry; then every entry
/// left is undelivered, and the rest of `entries-added - entries-read` was trimmed. A group
/// that has read nothing yet (last delivered `0-0`) has no `entries-read` in Redis 7: every
/// entry added and gone was trimmed unread, `entries-added - length` (none, when the entries
/// are simply waiting for their first read). Redis before 7.0 does not count entries added:
/// nothing is counted there.
const READ_LUA: &str = r"
local function field(list, name)
  for i = 1, #list, 2 do
    if list[i] == name then return list[i + 1] end
  end
  return nil
end
local function older(a, b)
  local am, as = string.match(a, '^(%d+)-(%d+)$')
  local bm, bs = string.match(b, '^(%d+)-(%d+)$')
  am, as, bm, bs = tonumber(am), tonumber(as), tonumber(bm), tonumber(bs)
  return am < bm or (am == bm and as < bs)
end
local info = redis.call('XINFO', 'STREAM', KEYS[1])
local function trimmed()
  local first = field(info, 'first-entry')
  local added = field(info, 'entries-added')
  if not first or not added then return 0 end
  local length = field(info, 'length')
  for _, group in ipairs(redis.call('XINFO', 'GROUPS', KEYS[1])) do
    if field(group, 'name') == ARGV[1] then
      local last = field(group, 'last-delivered-id')
      if not older(last, first[1]) then return 0 end
      local read = field(group, 'entries-read')
      local count = -1
      if read then
        count = added - read - length
      elseif last == '0-0' then
        count = added - length
      end
      if count == 0 then return 0 end
      redis.call('XGROUP', 'SETID', KEYS[1], ARGV[1], last, 'ENTRIESREAD', added - length)
      return count
    end
  end
  return 0
end
local count = trimmed()
local entries = redis.call('XREADGROUP', 'GROUP', ARGV[1], ARGV[2], 'COUNT', ARGV[3], 'STREAMS', KEYS[1], '>')
if not entries then entries = {} end
return {count, field(info, 'last-generated-id'), entries}
";

/// Finds the server that holds the stream now: the one server, or the master the sentinels
/// name. Asked at every (re)connect of the consumer, so a consumer whose connection failed
/// (its master died, or was demoted by a failover) finds the new master.
pub trait Locate: Send + Sync {
    /// A client of the master (the consumer opens its own connections from it).
    fn master(&mut self) -> BoxFuture<'_, Result<Client, RedisError>>;
}

/// One fixed server (`redis.mode = "standalone"`).
impl Locate for Client {
    fn master(&mut self) -> BoxFuture<'_, Result<Client, RedisError>> {
        let client = self.clone();
        Box::pin(async move { Ok(client) })
    }
}

/// Where the archive reads from on Redis.
pub struct StreamSource {
    /// Finds the master, where the consumer opens its own connections (its blocking reads
    /// must not hold up others).
    pub server: Box<dyn Locate>,
    /// The stream's key.
    pub key: String,
    /// This node's consumer name in the group: stable across restarts of the node, so that
    /// it reads back its own pending entries first.
    pub consumer: String,
}

impl std::fmt::Debug for StreamSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StreamSource")
            .field("key", &self.key)
            .field("consumer", &self.consumer)
            .finish_non_exhaustive()
    }
}

impl Archive {
    /// Starts consuming `source` until `shutdown`: the archive's input on the Redis transport.
    pub fn spawn_stream_consumer(&self, source: StreamSource, shutdown: CancellationToken) {
        tokio::spawn(run(self.shared.clone(), source, shutdown));
    }
}

async fn run(shared: Arc<Shared>, mut source: StreamSource, shutdown: CancellationToken) {
    // Nothing is read before the writer has the schema ready.
    let mut ready = shared.schema_ready.subscribe();
    tokio::select! {
        _ = shutdown.cancelled() => return,
        // The sender lives in `shared`, held here: waiting cannot fail.
        _ = ready.wait_for(|ready| *ready) => {}
    }
    let mut backoff = Backoff::new();
    let mut failing = false;
    // The master read last, `host:port`, to log a move to another one.
    let mut reading: Option<String> = None;
    loop {
        let consumed = match source.server.master().await {
            Ok(client) => {
                let address = client.get_connection_info().addr().to_string();
                if reading.as_ref().is_some_and(|old| *old != address) {
                    info!(key = %source.key, to = %address, "archive stream: reading from the new redis master");
                }
                reading = Some(address);
                consume(&shared, &client, &source, &shutdown, &mut failing).await
            }
            Err(e) => Err(e),
        };
        match consumed {
            Ok(()) => return,
            Err(e) => {
                if !failing {
                    // It had connected: a new outage (or a failover) starts a new backoff.
                    backoff = Backoff::new();
                    warn!(error = %e, key = %source.key, "archive stream: Redis failed; retrying");
                    failing = true;
                }
            }
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(backoff.next()) => {}
        }
    }
}

/// Reads and archives until `shutdown` (`Ok`) or a Redis error.
///
/// While the archive keeps up, one batch is written at a time and the next read takes what
/// arrived meanwhile; once it falls behind (reads fill batches), up to `archive.pool_size`
/// batches are written at once (each on its own pooled PostgreSQL connection) while the next
/// is read, as the embedded transport's writer does. Entries read are acknowledged batch by batch as each commits; a
/// batch still in flight when the node stops stays pending in Redis for the next reader.
async fn consume(
    shared: &Shared,
    client: &Client,
    source: &StreamSource,
    shutdown: &CancellationToken,
    failing: &mut bool,
) -> Result<(), RedisError> {
    let config = AsyncConnectionConfig::new()
        .set_connection_timeout(Some(shared.timeout))
        .set_response_timeout(Some(BLOCK + shared.timeout));
    // Blocking reads on one connection, acknowledgements on another: an `XACK` must not wait
    // behind a read that waits for new entries.
    let mut conn = client
        .get_multiplexed_async_connection_with_config(&config)
        .await?;
    let acks = client
        .get_multiplexed_async_connection_with_config(&config)
        .await?;
    create_group(&mut conn, &source.key).await?;
    if std::mem::take(failing) {
        info!(key = %source.key, "archive stream: Redis is back");
    }
    // Our own pending entries first: read before a restart, never acknowledged. One batch at
    // a time: reading pending entries again returns those not yet acknowledged.
    loop {
        let entries = read_pending(&mut conn, source, shared.config.batch_max_messages).await?;
        if entries.is_empty() {
            break;
        }
        let batch = decode(&entries);
        let oldest = batch.iter().map(|m| m.ts()).min();
        set_lag(shared, oldest);
        if !archive(shared, acks.clone(), &source.key, entries, batch, shutdown).await? {
            return Ok(());
        }
        set_lag(shared, None);
    }
    let depth = shared.config.pool_size.max(1);
    let batch_max = shared.config.batch_max_messages;
    // Batches handed to the writer and not yet written.
    let in_flight = watch::Sender::new(0usize);
    let in_flight = &in_flight;
    let (batches, mut next) = mpsc::channel::<Vec<StreamId>>(1);
    let reader = async move {
        let mut next_claim = tokio::time::Instant::now();
        let mut writes = in_flight.subscribe();
        let mut behind = false;
        while !shutdown.is_cancelled() {
            if tokio::time::Instant::now() >= next_claim {
                next_claim += CLAIM_EVERY;
                let claimed = claim(&mut conn, source, batch_max).await?;
                if !claimed.is_empty() {
                    in_flight.send_modify(|n| *n += 1);
                    if batches.send(claimed).await.is_err() {
                        break;
                    }
                }
            }
            // Reads run ahead of the writes only while the archive is behind (the last read
            // filled a batch). Otherwise the next read waits for the write in flight, so what
            // arrives meanwhile makes one batch: one transaction for many messages.
            tokio::select! {
                waited = writes.wait_for(|&n| n == 0 || (behind && n < depth)) => {
                    if waited.is_err() {
                        break;
                    }
                }
                () = shutdown.cancelled() => break,
            }
            let (entries, last) = read_new(&mut conn, source, shared, batch_max).await?;
            behind = entries.len() >= batch_max;
            if entries.is_empty() {
                wait_for_new(&mut conn, source, &last).await?;
            } else {
                in_flight.send_modify(|n| *n += 1);
                if batches.send(entries).await.is_err() {
                    break;
                }
            }
        }
        Ok::<(), RedisError>(())
    };
    let writer = async move {
        let mut writes = FuturesUnordered::new();
        let mut reading = true;
        // (batch number, messages, oldest timestamp) of each batch read and not yet written.
        let mut held: Vec<(u64, usize, u64)> = Vec::new();
        let mut batch_no = 0u64;
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        loop {
            tokio::select! {
                Some((no, written)) = writes.next(), if !writes.is_empty() => {
                    held.retain(|&(n, _, _)| n != no);
                    in_flight.send_modify(|n| *n = n.saturating_sub(1));
                    if !written? {
                        return Ok(());
                    }
                }
                batch = next.recv(), if reading && writes.len() < depth => match batch {
                    Some(entries) => {
                        let batch = decode(&entries);
                        batch_no += 1;
                        let oldest = batch.iter().map(|m| m.ts()).min().unwrap_or_else(now_ms);
                        held.push((batch_no, entries.len(), oldest));
                        let no = batch_no;
                        let write = archive(shared, acks.clone(), &source.key, entries, batch, shutdown);
                        writes.push(async move { (no, write.await) });
                    }
                    None => reading = false,
                },
                _ = tick.tick(), if reading || !writes.is_empty() => {}
                else => return Ok::<(), RedisError>(()),
            }
            // Queue depth and lag on `/metrics`: what this node read and has not yet written.
            let messages: usize = held.iter().map(|&(_, count, _)| count).sum();
            shared.metrics.archive.queue_messages.set(messages as u64);
            set_lag(shared, held.iter().map(|&(_, _, ts)| ts).min());
        }
    };
    tokio::try_join!(reader, writer).map(|_| ())
}

/// Reads new entries with [`READ_LUA`]; counts and logs the entries it found trimmed before
/// the group read them. Returns the entries and the stream's last id.
async fn read_new(
    conn: &mut MultiplexedConnection,
    source: &StreamSource,
    shared: &Shared,
    count: usize,
) -> Result<(Vec<StreamId>, String), RedisError> {
    let (trimmed, last, reply): (i64, String, redis::Value) = Script::new(READ_LUA)
        .key(&source.key)
        .arg(GROUP)
        .arg(&source.consumer)
        .arg(count)
        .invoke_async(conn)
        .await?;
    match trimmed {
        0 => {}
        n if n > 0 => {
            shared.metrics.archive.missed_total.add(n as u64);
            warn!(
                count = n,
                key = %source.key,
                "messages lost to the archive: trimmed from the archive stream before any node \
                 read them (PostgreSQL was down longer than archive.queue_max_messages lasts)"
            );
        }
        _ => warn!(
            key = %source.key,
            "messages lost to the archive: trimmed from the archive stream before any node read \
             them; Redis cannot tell how many"
        ),
    }
    let entries = match reply {
        redis::Value::Array(ref items) if items.is_empty() => Vec::new(),
        reply => {
            let reply: StreamReadReply = redis::from_redis_value(reply)?;
            reply.keys.into_iter().flat_map(|k| k.ids).collect()
        }
    };
    Ok((entries, last))
}

/// Waits, up to [`BLOCK`], until the stream has an entry after `last` (without reading it).
async fn wait_for_new(
    conn: &mut MultiplexedConnection,
    source: &StreamSource,
    last: &str,
) -> Result<(), RedisError> {
    let _: redis::Value = redis::cmd("XREAD")
        .arg("COUNT")
        .arg(1)
        .arg("BLOCK")
        .arg(BLOCK.as_millis() as u64)
        .arg("STREAMS")
        .arg(&source.key)
        .arg(last)
        .query_async(conn)
        .await?;
    Ok(())
}

/// Creates the group (reading from the stream's start) and the stream, unless they exist.
async fn create_group(conn: &mut MultiplexedConnection, key: &str) -> Result<(), RedisError> {
    let created: Result<(), RedisError> = redis::cmd("XGROUP")
        .arg("CREATE")
        .arg(key)
        .arg(GROUP)
        .arg("0")
        .arg("MKSTREAM")
        .query_async(conn)
        .await;
    match created {
        Err(e) if e.code() == Some("BUSYGROUP") => Ok(()),
        other => other,
    }
}

/// `XREADGROUP` from `0`: this consumer's pending entries (read before, never acknowledged).
async fn read_pending(
    conn: &mut MultiplexedConnection,
    source: &StreamSource,
    count: usize,
) -> Result<Vec<StreamId>, RedisError> {
    let reply: Option<StreamReadReply> = redis::cmd("XREADGROUP")
        .arg("GROUP")
        .arg(GROUP)
        .arg(&source.consumer)
        .arg("COUNT")
        .arg(count)
        .arg("STREAMS")
        .arg(&source.key)
        .arg("0")
        .query_async(conn)
        .await?;
    Ok(reply
        .map(|r| r.keys.into_iter().flat_map(|k| k.ids).collect())
        .unwrap_or_default())
}

/// Takes over entries pending with any consumer for longer than [`CLAIM_IDLE`].
async fn claim(
    conn: &mut MultiplexedConnection,
    source: &StreamSource,
    count: usize,
) -> Result<Vec<StreamId>, RedisError> {
    let reply: StreamAutoClaimReply = redis::cmd("XAUTOCLAIM")
        .arg(&source.key)
        .arg(GROUP)
        .arg(&source.consumer)
        .arg(CLAIM_IDLE.as_millis() as u64)
        .arg("0-0")
        .arg("COUNT")
        .arg(count)
        .query_async(conn)
        .await?;
    Ok(reply.claimed)
}

/// The archive's lag on `/metrics`: the age of the oldest message read and not yet written.
fn set_lag(shared: &Shared, oldest: Option<u64>) {
    let lag = oldest.map_or(0, |ts| now_ms().saturating_sub(ts));
    shared.metrics.archive.lag_ms.set(lag);
}

/// An entry's message, decoded for writing; entries that do not decode are skipped (logged)
/// and acknowledged with the batch.
fn decode(entries: &[StreamId]) -> Vec<Arc<Message>> {
    entries
        .iter()
        .filter_map(|entry| {
            let json: Vec<u8> = entry.get(FIELD)?;
            match Message::decode(&json) {
                Ok(message) => Some(Arc::new(message)),
                Err(e) => {
                    warn!(id = %entry.id, error = %e, "archive stream: entry skipped");
                    None
                }
            }
        })
        .collect()
}

/// Writes `entries` until committed, then acknowledges them; `false` when shut down first
/// (they stay pending, for this node's next start or another node).
async fn archive(
    shared: &Shared,
    mut conn: MultiplexedConnection,
    key: &str,
    entries: Vec<StreamId>,
    batch: Vec<Arc<Message>>,
    shutdown: &CancellationToken,
) -> Result<bool, RedisError> {
    if entries.is_empty() {
        return Ok(true);
    }
    let m = &shared.metrics.archive;
    let mut backoff = Backoff::new();
    while !batch.is_empty() {
        match insert(shared, &batch).await {
            Ok(inserted) => {
                super::writer::committed(shared, batch.len(), inserted);
                break;
            }
            Err(e) => {
                m.write_errors_total.inc();
                shared.health.failed(&shared.metrics, "write", &e);
                tokio::select! {
                    _ = shutdown.cancelled() => return Ok(false),
                    _ = tokio::time::sleep(backoff.next()) => {}
                }
            }
        }
    }
    let ids: Vec<&str> = entries.iter().map(|e| e.id.as_str()).collect();
    redis::cmd("XACK")
        .arg(key)
        .arg(GROUP)
        .arg(&ids)
        .query_async::<()>(&mut conn)
        .await?;
    Ok(true)
}
