//! The node's PostgreSQL archive, when `archive.url` is set: started with the node, fed by
//! the transport (the embedded one queues each accepted message; on Redis every node
//! consumes the archive stream), and read when history or recovery reaches past the hot
//! store. PostgreSQL being down never stops the node: the archive retries in the background.

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tracing::warn;

use crate::archive::Archive;
use crate::config::{Config, TransportKind};
use crate::metrics::Metrics;
use crate::transport::Archived;

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
        match tokio::time::timeout(limit, archive.positions()).await {
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
