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

use std::sync::Arc;
use std::time::Duration;

use redis::aio::MultiplexedConnection;
use redis::streams::{StreamAutoClaimReply, StreamId, StreamReadReply};
use redis::{AsyncConnectionConfig, Client, RedisError, Script};
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

/// Counts the entries trimmed from the stream (by the publisher's `MAXLEN`) before the group
/// read them, and moves the group's count of entries read past them, so each loss is counted
/// once, by one node. Returns the count, or -1 when Redis cannot tell how many. KEYS: the
/// stream. ARGV: the group.
///
/// Trimming removes entries from the head: the undelivered entries can have lost some only
/// when the group's last delivered id is older than the stream's first entry; then every entry
/// left is undelivered, and the rest of `entries-added - entries-read` was trimmed. A group
/// that has read nothing yet (last delivered `0-0`) has no `entries-read` in Redis 7: every
/// entry added and gone was trimmed unread, `entries-added - length` (none, when the entries
/// are simply waiting for their first read).
const TRIMMED_LUA: &str = r"
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
local first = field(info, 'first-entry')
if not first then return 0 end
local added = field(info, 'entries-added')
local length = field(info, 'length')
for _, group in ipairs(redis.call('XINFO', 'GROUPS', KEYS[1])) do
  if field(group, 'name') == ARGV[1] then
    local last = field(group, 'last-delivered-id')
    if not older(last, first[1]) then return 0 end
    local read = field(group, 'entries-read')
    local trimmed = -1
    if read then
      trimmed = added - read - length
    elseif last == '0-0' then
      trimmed = added - length
    end
    if trimmed == 0 then return 0 end
    redis.call('XGROUP', 'SETID', KEYS[1], ARGV[1], last, 'ENTRIESREAD', added - length)
    return trimmed
  end
end
return 0
";

/// Where the archive reads from on Redis.
#[derive(Debug, Clone)]
pub struct StreamSource {
    /// Opens the consumer's own connection (its blocking reads must not hold up others).
    pub client: Client,
    /// The stream's key.
    pub key: String,
    /// This node's consumer name in the group: stable across restarts of the node, so that
    /// it reads back its own pending entries first.
    pub consumer: String,
}

impl Archive {
    /// Starts consuming `source` until `shutdown`: the archive's input on the Redis transport.
    pub fn spawn_stream_consumer(&self, source: StreamSource, shutdown: CancellationToken) {
        tokio::spawn(run(self.shared.clone(), source, shutdown));
    }
}

async fn run(shared: Arc<Shared>, source: StreamSource, shutdown: CancellationToken) {
    // Nothing is read before the writer has the schema ready.
    let mut ready = shared.schema_ready.subscribe();
    tokio::select! {
        _ = shutdown.cancelled() => return,
        // The sender lives in `shared`, held here: waiting cannot fail.
        _ = ready.wait_for(|ready| *ready) => {}
    }
    let mut backoff = Backoff::new();
    let mut failing = false;
    loop {
        match consume(&shared, &source, &shutdown, &mut failing).await {
            Ok(()) => return,
            Err(e) => {
                if !failing {
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
async fn consume(
    shared: &Shared,
    source: &StreamSource,
    shutdown: &CancellationToken,
    failing: &mut bool,
) -> Result<(), RedisError> {
    let config = AsyncConnectionConfig::new()
        .set_connection_timeout(Some(shared.timeout))
        .set_response_timeout(Some(BLOCK + shared.timeout));
    let mut conn = source
        .client
        .get_multiplexed_async_connection_with_config(&config)
        .await?;
    create_group(&mut conn, &source.key).await?;
    if std::mem::take(failing) {
        info!(key = %source.key, "archive stream: Redis is back");
    }
    // Our own pending entries first: read before a restart, never acknowledged.
    loop {
        let entries = read(&mut conn, source, "0", shared.config.batch_max_messages).await?;
        if entries.is_empty() {
            break;
        }
        if !archive(shared, &mut conn, &source.key, &entries, shutdown).await? {
            return Ok(());
        }
    }
    let mut next_claim = tokio::time::Instant::now();
    while !shutdown.is_cancelled() {
        if tokio::time::Instant::now() >= next_claim {
            next_claim += CLAIM_EVERY;
            let claimed = claim(&mut conn, source, shared.config.batch_max_messages).await?;
            if !archive(shared, &mut conn, &source.key, &claimed, shutdown).await? {
                return Ok(());
            }
        }
        trimmed(&mut conn, source, shared).await;
        let entries = read(&mut conn, source, ">", shared.config.batch_max_messages).await?;
        if !archive(shared, &mut conn, &source.key, &entries, shutdown).await? {
            return Ok(());
        }
    }
    Ok(())
}

/// Looks for entries trimmed before the group read them; counts and logs them. A Redis older
/// than 7.0 cannot tell (the check fails) and nothing is counted.
async fn trimmed(conn: &mut MultiplexedConnection, source: &StreamSource, shared: &Shared) {
    let result: Result<i64, RedisError> = Script::new(TRIMMED_LUA)
        .key(&source.key)
        .arg(GROUP)
        .invoke_async(conn)
        .await;
    match result {
        Ok(0) => {}
        Ok(n) if n > 0 => {
            shared.metrics.archive.missed_total.add(n as u64);
            warn!(
                count = n,
                key = %source.key,
                "messages lost to the archive: trimmed from the archive stream before any node \
                 read them (PostgreSQL was down longer than archive.queue_max_messages lasts)"
            );
        }
        Ok(_) => warn!(
            key = %source.key,
            "messages lost to the archive: trimmed from the archive stream before any node read \
             them; Redis cannot tell how many"
        ),
        Err(e) => tracing::debug!(error = %e, "archive stream: trimmed entries not checked"),
    }
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

/// `XREADGROUP` from `id` (`>`: new entries, waiting up to [`BLOCK`]; `0`: our pending ones).
async fn read(
    conn: &mut MultiplexedConnection,
    source: &StreamSource,
    id: &str,
    count: usize,
) -> Result<Vec<StreamId>, RedisError> {
    let mut cmd = redis::cmd("XREADGROUP");
    cmd.arg("GROUP")
        .arg(GROUP)
        .arg(&source.consumer)
        .arg("COUNT")
        .arg(count);
    if id == ">" {
        cmd.arg("BLOCK").arg(BLOCK.as_millis() as u64);
    }
    cmd.arg("STREAMS").arg(&source.key).arg(id);
    let reply: Option<StreamReadReply> = cmd.query_async(conn).await?;
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

/// Writes `entries` until committed, then acknowledges them; `false` when shut down first
/// (they stay pending, for this node's next start or another node).
async fn archive(
    shared: &Shared,
    conn: &mut MultiplexedConnection,
    key: &str,
    entries: &[StreamId],
    shutdown: &CancellationToken,
) -> Result<bool, RedisError> {
    if entries.is_empty() {
        return Ok(true);
    }
    let batch: Vec<Arc<Message>> = entries
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
        .collect();
    let m = &shared.metrics.archive;
    let mut backoff = Backoff::new();
    while !batch.is_empty() {
        let oldest = batch.iter().map(|m| m.ts()).min().unwrap_or(0);
        m.lag_ms.set(now_ms().saturating_sub(oldest));
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
    m.lag_ms.set(0);
    let ids: Vec<&str> = entries.iter().map(|e| e.id.as_str()).collect();
    redis::cmd("XACK")
        .arg(key)
        .arg(GROUP)
        .arg(&ids)
        .query_async::<()>(conn)
        .await?;
    Ok(true)
}
