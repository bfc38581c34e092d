//! The node's PostgreSQL archive, when `archive.url` is set: started with the node, fed by
//! the transport (the embedded one queues each accepted message; on Redis every node
//! consumes the archive stream), and read when history or recovery reaches past the hot
//! store ([`Node::page`], [`Node::snapshot`]). PostgreSQL being down never stops the node:
//! the archive retries in the background, and reads fall back to the hot store alone.

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use super::Node;
use crate::archive::{Archive, is_consecutive_from};
use crate::config::{Config, TransportKind};
use crate::metrics::Metrics;
use crate::protocol::RoomName;
use crate::protocol::message::Message;
use crate::protocol::native::Since;
use crate::transport::{Archived, Page, Snapshot, TransportError};

/// Starts the archive `config` asks for. On the embedded transport it first reads every
/// room's position, so that the rooms continue their epoch and ids; a PostgreSQL that does not
/// answer within `archive.timeout_secs` is logged and the rooms start new epochs.
pub(crate) async fn start(
    config: &Config,
    metrics: &Arc<Metrics>,
    shutdown: &CancellationToken,
) -> Option<Archived> {
    if !config.archive.enabled() {
        return None;
    }
    let archive = match Archive::spawn(&config.archive, metrics.clone(), shutdown.clone()) {
        Ok(archive) => Arc::new(archive),
        Err(e) => {
            // The URL was validated with the configuration: this is not expected.
            warn!(error = %e, "the PostgreSQL archive could not start; messages are not archived");
            return None;
        }
    };
    let mut positions = Vec::new();
    if config.transport == TransportKind::Memory {
        let limit = Duration::from_secs(config.archive.timeout_secs);
        // A fresh database gets its tables first; then there is nothing to continue.
        let read = async {
            archive.schema_ready().await;
            archive.positions().await
        };
        match tokio::time::timeout(limit, read).await {
            Ok(Ok(found)) => positions = found,
            Ok(Err(e)) => warn!(
                error = %e,
                "rooms' positions not read from the archive: rooms start new epochs"
            ),
            Err(_) => warn!(
                "PostgreSQL did not answer in time: rooms' positions not read from the archive, \
                 rooms start new epochs"
            ),
        }
    }
    Some(Archived { archive, positions })
}

/// The most messages a recovery reads from the archive: a client that missed more is told
/// `recovered: false` and gets what the hot store holds, as without the archive.
const MAX_RECOVERY: u64 = 1000;

impl Node {
    /// Up to `limit` messages of `room` older than `before`: from the transport's history,
    /// then, once that has nothing older, from the archive, back to the first message kept.
    pub(crate) async fn page(
        &self,
        room: &RoomName,
        before: Option<u64>,
        limit: usize,
    ) -> Result<Page, TransportError> {
        let mut page = self.transport.page(room, before, limit).await?;
        let Some(archive) = &self.archive else {
            return Ok(page);
        };
        if page.more || page.messages.len() >= limit {
            return Ok(page);
        }
        let older_than = page
            .messages
            .first()
            .map(|m| m.id())
            .or(before)
            .unwrap_or(u64::MAX);
        let wanted = limit - page.messages.len();
        match archive.page(room, &page.epoch, older_than, wanted).await {
            Ok((older, more)) => {
                let mut messages: Vec<Arc<Message>> = older.into_iter().map(Arc::new).collect();
                messages.append(&mut page.messages);
                page.messages = messages;
                page.more = more;
            }
            // The hot history is still an answer; the archive's outage is logged by it.
            Err(e) => debug!(%room, error = %e, "history page not read from the archive"),
        }
        Ok(page)
    }

    /// What a client joining `room` gets (see [`Transport::snapshot`]); when the transport's
    /// history no longer reaches back to `since` (same epoch), the messages in between are
    /// read from the archive, and the client is told `recovered: true` if it holds them all.
    pub(crate) async fn snapshot(
        &self,
        room: &RoomName,
        since: Option<&Since>,
    ) -> Result<Snapshot, TransportError> {
        let mut snapshot = self.transport.snapshot(room, since).await?;
        let (Some(archive), Some(since)) = (&self.archive, since) else {
            return Ok(snapshot);
        };
        if snapshot.recovered != Some(false)
            || since.epoch != snapshot.epoch
            || since.id >= snapshot.last_id
        {
            return Ok(snapshot);
        }
        let first_held = snapshot
            .messages
            .first()
            .map_or(snapshot.last_id + 1, |m| m.id());
        let missing = first_held.saturating_sub(since.id + 1);
        if missing == 0 || missing > MAX_RECOVERY {
            return Ok(snapshot);
        }
        match archive
            .after(room, &since.epoch, since.id, missing as usize)
            .await
        {
            Ok(found) if found.len() as u64 == missing && is_consecutive_from(since.id, &found) => {
                let mut messages: Vec<Arc<Message>> = found.into_iter().map(Arc::new).collect();
                messages.append(&mut snapshot.messages);
                snapshot.messages = messages;
                snapshot.recovered = Some(true);
            }
            Ok(_) => {}
            Err(e) => debug!(%room, error = %e, "recovery not read from the archive"),
        }
        Ok(snapshot)
    }
}
