//! Retention: messages older than `archive.retention_days` are deleted in the background,
//! [`BATCH`] rows per statement with a pause between statements, never in one large DELETE
//! that would hold locks and bloat the table in one go. A pass runs at start and then every
//! [`EVERY`]; a failed pass (PostgreSQL down) waits for the next.

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tracing::debug;

use super::writer::{now_ms, to_i64};
use super::{ArchiveError, Shared};

/// Rows one statement deletes at most.
pub const BATCH: i64 = 5000;
/// Time between passes.
const EVERY: Duration = Duration::from_secs(300);
/// Pause between two statements of a pass.
const PAUSE: Duration = Duration::from_millis(50);

/// The retention task.
pub(super) async fn run(shared: Arc<Shared>, shutdown: CancellationToken) {
    let keep_ms = shared.config.retention_days * 24 * 3600 * 1000;
    loop {
        let cutoff = now_ms().saturating_sub(keep_ms);
        if let Err(e) = pass(&shared, cutoff, &shutdown).await {
            debug!(error = %e, "archive retention pass failed; next one in {EVERY:?}");
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(EVERY) => {}
        }
    }
}

/// Deletes every message older than `cutoff` (ms since the Unix epoch), a batch at a time.
async fn pass(
    shared: &Shared,
    cutoff: u64,
    shutdown: &CancellationToken,
) -> Result<(), ArchiveError> {
    loop {
        let deleted = delete_batch(shared, cutoff).await?;
        shared.metrics.archive.deleted_total.add(deleted);
        if deleted < BATCH as u64 {
            return Ok(());
        }
        tokio::select! {
            _ = shutdown.cancelled() => return Ok(()),
            _ = tokio::time::sleep(PAUSE) => {}
        }
    }
}

async fn delete_batch(shared: &Shared, cutoff: u64) -> Result<u64, ArchiveError> {
    let delete = async {
        let client = shared
            .pool
            .get()
            .await
            .map_err(|e| ArchiveError::Pool(e.to_string()))?;
        let statement = client
            .prepare_cached(
                "DELETE FROM scalechat_messages WHERE ctid IN \
                 (SELECT ctid FROM scalechat_messages WHERE ts < $1 LIMIT $2)",
            )
            .await?;
        Ok::<_, ArchiveError>(
            client
                .execute(&statement, &[&to_i64(cutoff), &BATCH])
                .await?,
        )
    };
    tokio::time::timeout(shared.timeout, delete)
        .await
        .unwrap_or(Err(ArchiveError::Timeout(shared.timeout)))
}
