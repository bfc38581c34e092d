//! The PostgreSQL archive: every accepted message stored once, for as long as
//! `archive.retention_days` says, and read back for history older than the hot store holds,
//! recovery, a room's position after a restart, and search (docs/archive.md).
//!
//! Off the delivery path: [`Archive::offer`] puts an accepted message in a bounded queue and
//! never waits. Past the queue's bounds the message is refused and counted
//! (`scalechat_archive_dropped_total`); delivery goes on, and the archive relies on taking it
//! from the room's history later (catch-up), while the history still holds it. A writer task
//! takes batches from the queue and writes each with one `INSERT … SELECT FROM UNNEST(…)
//! ON CONFLICT DO NOTHING`, up to `archive.pool_size` batches at once on the pool (tokio-postgres
//! pipelines them): the primary key (room, epoch, id) makes every write idempotent, so a
//! message written twice (a retry, a catch-up, two nodes) is one row.
//!
//! PostgreSQL being down never stops the node: the writer retries with capped backoff and
//! keeps the queued messages; the outage is logged once when it starts and once when it ends,
//! and readiness does not depend on it.
//!
//! The parts: `queue` (the bounded queue), `writer` (batches, retries, outage log), `schema`
//! (embedded migrations under an advisory lock), `read` (pages, recovery, a room's position,
//! search), `retention` (deleting old messages in small batches).

pub mod catchup;
mod queue;
mod read;
mod retention;
pub mod schema;
pub mod stream;
mod writer;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod, Runtime};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

pub use read::{Position, SearchCursor, is_consecutive_from};

use self::queue::Queue;
use crate::config::ArchiveConfig;
use crate::metrics::Metrics;
use crate::protocol::message::Message;

/// Why an archive operation failed. The delivery path never sees one: reads report it to
/// the caller, writes are retried.
#[derive(Debug, thiserror::Error)]
pub enum ArchiveError {
    /// `archive.url` is not usable (checked at load; here for `scalechat migrate`).
    #[error("archive.url: {0}")]
    Config(String),
    /// PostgreSQL refused or failed a statement, or the connection failed.
    #[error("PostgreSQL: {}", describe(.0))]
    Postgres(#[from] tokio_postgres::Error),
    /// No connection could be had from the pool.
    #[error("no connection to PostgreSQL: {0}")]
    Pool(String),
    /// PostgreSQL did not answer in time.
    #[error("PostgreSQL did not answer within {} s", .0.as_secs())]
    Timeout(Duration),
    /// The role may not create the archive's tables.
    #[error(
        "the database role may not create the archive's tables ({0}): run `scalechat migrate` \
         with a role that may (then set archive.migrate_on_start = false), or grant this one \
         CREATE on the schema"
    )]
    Permission(String),
    /// The schema is older than this binary and migrations are off.
    #[error(
        "the archive's schema is not up to date and archive.migrate_on_start is false: \
         run `scalechat migrate`"
    )]
    Schema,
}

/// What went wrong, in words: the server's message for a refused statement (the client's
/// `Display` says only "db error"), else the error and its cause.
fn describe(e: &tokio_postgres::Error) -> String {
    if let Some(db) = e.as_db_error() {
        return format!("{}: {}", db.severity(), db.message());
    }
    match std::error::Error::source(e) {
        Some(cause) => format!("{e}: {cause}"),
        None => e.to_string(),
    }
}

/// The archive of one node: its queue, its connections and its writer.
#[derive(Debug)]
pub struct Archive {
    shared: Arc<Shared>,
    /// The writer task, ending after shutdown once what was queued is written or given up.
    writer: Mutex<Option<tokio::task::JoinHandle<()>>>,
}

#[derive(Debug)]
struct Shared {
    pool: Pool,
    queue: Queue,
    config: ArchiveConfig,
    metrics: Arc<Metrics>,
    health: Health,
    timeout: Duration,
    /// Rooms whose messages the queue refused, to take from the hot store later.
    catch_up: catchup::CatchUp,
    /// Set once the schema is up to date: the stream consumer waits for it.
    schema_ready: tokio::sync::watch::Sender<bool>,
}

/// Whether PostgreSQL answered last time, so an outage is logged once when it starts and
/// once when it ends.
#[derive(Debug)]
struct Health {
    up: AtomicBool,
    down_since: Mutex<Option<Instant>>,
}

impl Health {
    fn new() -> Self {
        Self {
            up: AtomicBool::new(true),
            down_since: Mutex::new(None),
        }
    }

    fn failed(&self, metrics: &Metrics, what: &str, error: &ArchiveError) {
        metrics.archive.up.set(0);
        if self.up.swap(false, Ordering::AcqRel) {
            *self
                .down_since
                .lock()
                .unwrap_or_else(PoisonError::into_inner) = Some(Instant::now());
            warn!(%error, "PostgreSQL archive unavailable ({what}): messages wait in the \
                 archive queue and are written when it is back");
        }
    }

    fn succeeded(&self, metrics: &Metrics) {
        metrics.archive.up.set(1);
        if !self.up.swap(true, Ordering::AcqRel) {
            let since = self
                .down_since
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .take();
            let down_secs = since.map_or(0.0, |t| t.elapsed().as_secs_f64());
            info!(down_secs, "PostgreSQL archive is back");
        }
    }
}

/// The connection pool `config` describes; connects lazily.
pub fn pool(config: &ArchiveConfig) -> Result<Pool, ArchiveError> {
    let mut pg = config.url.parse().map_err(ArchiveError::Config)?;
    let timeout = Duration::from_secs(config.timeout_secs);
    if pg.get_connect_timeout().is_none() {
        pg.connect_timeout(timeout);
    }
    pg.application_name("scalechat");
    let manager = Manager::from_config(
        pg,
        tokio_postgres::NoTls,
        ManagerConfig {
            recycling_method: RecyclingMethod::Fast,
        },
    );
    Pool::builder(manager)
        .max_size(config.pool_size)
        .runtime(Runtime::Tokio1)
        .wait_timeout(Some(timeout))
        .create_timeout(Some(timeout))
        .recycle_timeout(Some(timeout))
        .build()
        .map_err(|e| ArchiveError::Pool(e.to_string()))
}

/// Applies the schema's migrations to the database `config` names (for `scalechat
/// migrate`); returns how many were applied.
pub async fn migrate(config: &ArchiveConfig) -> Result<usize, ArchiveError> {
    let pool = pool(config)?;
    let timeout = Duration::from_secs(config.timeout_secs);
    let mut client = pool
        .get()
        .await
        .map_err(|e| ArchiveError::Pool(e.to_string()))?;
    // Waiting for another node's migration is fine; a hung server is not.
    tokio::time::timeout(timeout * 6, schema::migrate(&mut client))
        .await
        .map_err(|_| ArchiveError::Timeout(timeout * 6))?
}

impl Archive {
    /// Starts the archive: its writer (which first applies the migrations when
    /// `archive.migrate_on_start`) and its retention task, both ending with `shutdown`. Does
    /// not connect: a PostgreSQL that is down is retried in the background.
    pub fn spawn(
        config: &ArchiveConfig,
        metrics: Arc<Metrics>,
        shutdown: CancellationToken,
    ) -> Result<Self, ArchiveError> {
        let shared = Arc::new(Shared {
            pool: pool(config)?,
            queue: Queue::new(config.queue_max_messages, config.queue_max_bytes),
            config: config.clone(),
            metrics,
            health: Health::new(),
            timeout: Duration::from_secs(config.timeout_secs),
            schema_ready: tokio::sync::watch::Sender::new(false),
            catch_up: catchup::CatchUp::default(),
        });
        let writer = tokio::spawn(writer::run(shared.clone(), shutdown.clone()));
        if config.retention_days > 0 {
            tokio::spawn(retention::run(shared.clone(), shutdown));
        }
        Ok(Self {
            shared,
            writer: Mutex::new(Some(writer)),
        })
    }

    /// Queues an accepted message to be written. Never waits; `false` when the queue is full
    /// (counted in `scalechat_archive_dropped_total`: catch-up from the room's history is
    /// then the message's way into the archive).
    pub fn offer(&self, message: &Arc<Message>) -> bool {
        let queued = self.shared.queue.push(message.clone());
        let m = &self.shared.metrics.archive;
        if queued {
            let (messages, bytes) = self.shared.queue.depth();
            m.queue_messages.set(messages as u64);
            m.queue_bytes.set(bytes as u64);
        } else {
            m.dropped_total.inc();
            if !self.shared.catch_up.refused(message) {
                m.missed_total.inc();
                warn!(
                    room = message.room().as_str(),
                    "message lost to the archive: its queue is full and the room cannot be \
                     caught up from the hot store"
                );
            }
        }
        queued
    }

    /// Catches up from `store` the messages the queue refuses (the embedded transport's
    /// room logs).
    pub fn set_hot_store(&self, store: Arc<dyn catchup::HotStore>) {
        self.shared.catch_up.set_store(store);
    }

    /// Counts `count` messages that could not be archived because the room's history no
    /// longer held them when the archive came to take them; logged at warn.
    pub fn missed(&self, room: &str, count: u64) {
        if count > 0 {
            self.shared.metrics.archive.missed_total.add(count);
            warn!(
                room,
                count,
                "messages lost to the archive: the room's history no longer \
                 held them"
            );
        }
    }

    /// Messages waiting or being written, or rooms still to catch up (as 1).
    pub fn pending(&self) -> usize {
        self.shared.queue.depth().0 + usize::from(self.shared.catch_up.pending())
    }

    /// Waits, after shutdown, until the writer has written what was queued (one try each,
    /// within `archive.timeout_secs`) and ended. Returns at once the second time.
    pub async fn closed(&self) {
        let writer = self
            .writer
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        if let Some(writer) = writer {
            // A writer that panicked has nothing left to write.
            let _ = writer.await;
        }
    }

    /// Waits until the schema is up to date (the writer migrated or checked it).
    pub async fn schema_ready(&self) {
        let mut ready = self.shared.schema_ready.subscribe();
        // The sender lives in `shared`, held here: waiting cannot fail.
        let _ = ready.wait_for(|ready| *ready).await;
    }

    /// Whether PostgreSQL answered the last call.
    pub fn is_up(&self) -> bool {
        self.shared.health.up.load(Ordering::Acquire)
    }
}
