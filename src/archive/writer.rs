//! The archive's writer: takes batches from the queue and writes each with one statement,
//! up to `archive.pool_size` at once, retrying a failed batch with capped backoff until it is
//! committed. First it brings the schema up to date (or checks it, without
//! `archive.migrate_on_start`), retrying the same way, so a node starts whether or not
//! PostgreSQL is there.

use std::borrow::Cow;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use super::{ArchiveError, Shared, schema};
use crate::protocol::message::Message;

/// One statement per batch: arrays in, one row per message, existing rows left alone.
const INSERT: &str = "INSERT INTO scalechat_messages (room, epoch, id, ts, \"user\", text) \
    SELECT * FROM UNNEST($1::text[], $2::text[], $3::bigint[], $4::bigint[], $5::text[], $6::text[]) \
    ON CONFLICT DO NOTHING";

/// Of a batch (the same arrays), the messages whose room, epoch and id the archive holds for
/// another message (another user, time or text): an id Redis gave twice, after a failover
/// lost the first message that had it. Asked only when a batch inserted fewer rows than it
/// had messages (a retry, a message read twice, or this).
const COLLISIONS: &str = "SELECT count(*) FROM scalechat_messages m \
    JOIN UNNEST($1::text[], $2::text[], $3::bigint[], $4::bigint[], $5::text[], $6::text[]) \
    AS b(room, epoch, id, ts, \"user\", text) \
    ON m.room = b.room AND m.epoch = b.epoch AND m.id = b.id \
    WHERE m.ts <> b.ts OR m.\"user\" <> b.\"user\" OR m.text <> b.text";

/// The first retry's wait; it doubles up to [`MAX_BACKOFF`].
const MIN_BACKOFF: Duration = Duration::from_millis(100);
const MAX_BACKOFF: Duration = Duration::from_secs(5);
/// How long a refused migration (a permission, an old schema) waits before it is tried
/// again: the operator has to act first.
const REFUSED_RETRY: Duration = Duration::from_secs(30);

/// Capped exponential backoff with jitter: each wait is a random time between half and all
/// of the step.
pub(super) struct Backoff(Duration);

impl Backoff {
    pub(super) fn new() -> Self {
        Self(MIN_BACKOFF)
    }

    pub(super) fn next(&mut self) -> Duration {
        let step = self.0;
        self.0 = (self.0 * 2).min(MAX_BACKOFF);
        step.mul_f64(0.5 + fastrand::f64() * 0.5)
    }
}

/// Milliseconds since the Unix epoch, now.
pub(super) fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// The oldest message of each batch being written, for the lag.
type InFlight = Mutex<Vec<(u64, u64)>>;

/// The writer task: schema first, then batches until `shutdown`.
pub(super) async fn run(shared: Arc<Shared>, shutdown: CancellationToken) {
    if !prepare(&shared, &shutdown).await {
        return;
    }
    let permits = Arc::new(Semaphore::new(shared.config.pool_size));
    let in_flight: Arc<InFlight> = Arc::default();
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    let mut batch_no = 0u64;
    loop {
        update_gauges(&shared, &in_flight);
        if shared.catch_up.pending() {
            super::catchup::run_once(&shared);
        }
        if shared.queue.waiting() == 0 {
            tokio::select! {
                biased;
                _ = shutdown.cancelled() => break,
                _ = shared.queue.arrived() => {}
                _ = tick.tick() => {}
            }
            continue;
        }
        let permit = tokio::select! {
            biased;
            _ = shutdown.cancelled() => break,
            // The semaphore is never closed.
            permit = permits.clone().acquire_owned() => permit.expect("semaphore open"),
        };
        let batch = shared.queue.take(shared.config.batch_max_messages);
        let Some(oldest) = batch.iter().map(|m| m.ts()).min() else {
            continue;
        };
        batch_no += 1;
        lock(&in_flight).push((batch_no, oldest));
        tokio::spawn(write_batch(
            shared.clone(),
            batch,
            (batch_no, in_flight.clone()),
            permit,
            shutdown.clone(),
        ));
    }
    flush(&shared).await;
    // Batches in flight get their last try (see `write_batch`); wait for them.
    let all = u32::try_from(shared.config.pool_size).unwrap_or(u32::MAX);
    let _ = tokio::time::timeout(shared.timeout, permits.acquire_many(all)).await;
}

fn lock(in_flight: &InFlight) -> std::sync::MutexGuard<'_, Vec<(u64, u64)>> {
    in_flight.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Queue depth and lag on `/metrics`.
fn update_gauges(shared: &Shared, in_flight: &InFlight) {
    let (messages, bytes) = shared.queue.depth();
    let m = &shared.metrics.archive;
    m.queue_messages.set(messages as u64);
    m.queue_bytes.set(bytes as u64);
    let oldest = lock(in_flight)
        .iter()
        .map(|(_, ts)| *ts)
        .chain(shared.queue.oldest_waiting_ts())
        .min();
    m.lag_ms
        .set(oldest.map_or(0, |ts| now_ms().saturating_sub(ts)));
}

/// Brings the schema up to date (or checks it), retrying until it is or `shutdown`; `false`
/// when shut down first.
async fn prepare(shared: &Shared, shutdown: &CancellationToken) -> bool {
    let mut backoff = Backoff::new();
    let mut refused_logged = false;
    loop {
        let attempt = async {
            let mut client = shared
                .pool
                .get()
                .await
                .map_err(|e| ArchiveError::Pool(e.to_string()))?;
            if shared.config.migrate_on_start {
                schema::migrate(&mut client).await
            } else if schema::is_current(&client).await? {
                Ok(0)
            } else {
                Err(ArchiveError::Schema)
            }
        };
        // Waiting for another node's migration is fine; a hung server is not.
        let limit = shared.timeout * 6;
        let result = tokio::time::timeout(limit, attempt)
            .await
            .unwrap_or(Err(ArchiveError::Timeout(limit)));
        let wait = match result {
            Ok(applied) => {
                shared.health.succeeded(&shared.metrics);
                shared.schema_ready.send_replace(true);
                info!(applied, "PostgreSQL archive ready");
                return true;
            }
            Err(e @ (ArchiveError::Permission(_) | ArchiveError::Schema)) => {
                // PostgreSQL answers; the operator has to act. Said once, at error.
                shared.health.succeeded(&shared.metrics);
                if !refused_logged {
                    error!("{e}; messages are not archived until then");
                    refused_logged = true;
                }
                REFUSED_RETRY
            }
            Err(e) => {
                shared.health.failed(&shared.metrics, "schema", &e);
                backoff.next()
            }
        };
        tokio::select! {
            _ = shutdown.cancelled() => return false,
            _ = tokio::time::sleep(wait) => {}
        }
    }
}

/// Writes `batch` until it is committed; after `shutdown`, one more try at most.
async fn write_batch(
    shared: Arc<Shared>,
    batch: Vec<Arc<Message>>,
    (batch_no, in_flight): (u64, Arc<InFlight>),
    permit: OwnedSemaphorePermit,
    shutdown: CancellationToken,
) {
    let mut backoff = Backoff::new();
    loop {
        match insert(&shared, &batch).await {
            Ok(inserted) => {
                committed(&shared, batch.len(), inserted);
                break;
            }
            Err(e) => {
                shared.metrics.archive.write_errors_total.inc();
                shared.health.failed(&shared.metrics, "write", &e);
                if shutdown.is_cancelled() {
                    break;
                }
                tokio::select! {
                    _ = shutdown.cancelled() => {}
                    _ = tokio::time::sleep(backoff.next()) => {}
                }
            }
        }
    }
    shared.queue.written(&batch);
    lock(&in_flight).retain(|(no, _)| *no != batch_no);
    drop(permit);
}

pub(super) fn committed(shared: &Shared, len: usize, inserted: u64) {
    shared.health.succeeded(&shared.metrics);
    let m = &shared.metrics.archive;
    m.batches_total.inc();
    m.last_batch_messages.set(len as u64);
    m.messages_written_total.add(inserted);
    m.duplicates_total
        .add((len as u64).saturating_sub(inserted));
}

/// At shutdown: what is still waiting gets one try each, within `archive.timeout_secs`.
async fn flush(shared: &Shared) {
    let deadline = tokio::time::Instant::now() + shared.timeout;
    loop {
        let batch = shared.queue.take(shared.config.batch_max_messages);
        if batch.is_empty() {
            return;
        }
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        match tokio::time::timeout(left, insert(shared, &batch)).await {
            Ok(Ok(inserted)) => committed(shared, batch.len(), inserted),
            _ => {
                shared.queue.written(&batch);
                return;
            }
        }
        shared.queue.written(&batch);
    }
}

/// Writes one batch in one statement; returns the rows inserted (the rest were there).
/// Messages whose key the archive holds for another message are counted as missed.
pub(super) async fn insert(shared: &Shared, batch: &[Arc<Message>]) -> Result<u64, ArchiveError> {
    let write = async {
        let client = shared
            .pool
            .get()
            .await
            .map_err(|e| ArchiveError::Pool(e.to_string()))?;
        let statement = client.prepare_cached(INSERT).await?;
        let rooms: Vec<&str> = batch.iter().map(|m| m.room().as_str()).collect();
        let epochs: Vec<&str> = batch.iter().map(|m| m.epoch()).collect();
        let ids: Vec<i64> = batch.iter().map(|m| to_i64(m.id())).collect();
        let ts: Vec<i64> = batch.iter().map(|m| to_i64(m.ts())).collect();
        let users: Vec<&str> = batch.iter().map(|m| m.user()).collect();
        let texts: Vec<Cow<'_, str>> = batch.iter().map(|m| storable(m.text())).collect();
        let params: [&(dyn tokio_postgres::types::ToSql + Sync); 6] =
            [&rooms, &epochs, &ids, &ts, &users, &texts];
        let inserted = client.execute(&statement, &params).await?;
        let collided = if inserted < batch.len() as u64 {
            let statement = client.prepare_cached(COLLISIONS).await?;
            client
                .query_one(&statement, &params)
                .await?
                .get::<_, i64>(0)
        } else {
            0
        };
        Ok::<_, ArchiveError>((inserted, collided))
    };
    let (inserted, collided) = tokio::time::timeout(shared.timeout, write)
        .await
        .unwrap_or(Err(ArchiveError::Timeout(shared.timeout)))?;
    if collided > 0 {
        shared.metrics.archive.missed_total.add(collided as u64);
        warn!(
            count = collided,
            "messages lost to the archive: their room, epoch and id are archived for another \
             message (an id Redis gave again after a failover lost the message that had it)"
        );
    }
    Ok(inserted)
}

/// Ids and times fit in 63 bits; a larger value (never assigned) is stored as the largest.
pub(super) fn to_i64(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

/// PostgreSQL's `text` cannot hold NUL: it is stored as U+FFFD, so one such message cannot
/// fail a whole batch.
pub(super) fn storable(text: &str) -> Cow<'_, str> {
    if text.contains('\0') {
        Cow::Owned(text.replace('\0', "\u{FFFD}"))
    } else {
        Cow::Borrowed(text)
    }
}
