//! Sentinel mode's ear on the sentinels: a connection to one of them, subscribed to
//! `+switch-master`, that tells the subscriber when the master it follows moved, so the node
//! reconnects to the new master at once rather than when the old connection happens to fail
//! (a master demoted by `SENTINEL FAILOVER` stays up, as a replica). When the sentinel goes
//! away, the next one in `redis.sentinels` is asked, with the reconnect backoff.

use std::sync::Arc;

use futures_util::StreamExt;
use redis::Client;
use tracing::{debug, info};

use super::RedisTransport;
use super::connect::{Backoff, CONNECT_TIMEOUT, timeout_error};

/// The channel on which sentinels announce a new master: `<name> <old ip> <old port> <new
/// ip> <new port>`.
const SWITCH_MASTER: &str = "+switch-master";

impl RedisTransport {
    /// Listens for `+switch-master` of `master_name` on the sentinels, one at a time, for the
    /// life of the process; bumps `master_switches` on each.
    pub(super) async fn watch_sentinels(
        self: Arc<Self>,
        sentinels: Vec<Client>,
        master_name: String,
    ) {
        let mut backoff = Backoff::default();
        for client in sentinels.iter().cycle() {
            match self.listen(client, &master_name).await {
                Ok(()) => backoff = Backoff::default(),
                Err(e) => debug!(
                    sentinel = %client.get_connection_info().addr(), error = %e,
                    "sentinel not listened to"
                ),
            }
            tokio::time::sleep(backoff.next()).await;
        }
    }

    /// One sentinel, until its connection ends.
    async fn listen(&self, client: &Client, master_name: &str) -> redis::RedisResult<()> {
        let addr = client.get_connection_info().addr();
        let mut pubsub = tokio::time::timeout(CONNECT_TIMEOUT, client.get_async_pubsub())
            .await
            .unwrap_or_else(|_| Err(timeout_error()))?;
        pubsub.subscribe(SWITCH_MASTER).await?;
        let mut messages = pubsub.on_message();
        while let Some(message) = messages.next().await {
            let Ok(text) = message.get_payload::<String>() else {
                continue;
            };
            let mut words = text.split(' ');
            if words.next() != Some(master_name) {
                continue;
            }
            let to: Vec<&str> = words.skip(2).collect();
            info!(
                sentinel = %addr, master = %master_name, to = %to.join(":"),
                "sentinel announced a new redis master; reconnecting to it"
            );
            self.master_switches.send_modify(|n| *n += 1);
        }
        Ok(())
    }
}
