//! What nodes ask of one another: requests for every node on one control channel the
//! subscriber connection listens to (today, closing a user's connections wherever they are:
//! the server API's `disconnect`), and where each node can be reached (`node-addr:<node>`,
//! renewed with presence), so that a node can relay a Socket.IO request to the node that owns
//! its session.

use std::time::Duration;

use serde::{Deserialize, Serialize};
use tracing::{info, warn};

use super::RedisTransport;
use crate::protocol::ws::close_code;
use crate::transport::TransportError;

/// A request on the control channel.
#[derive(Debug, Serialize, Deserialize)]
struct Control {
    /// Close this user's connections.
    disconnect: String,
}

impl RedisTransport {
    /// The channel of requests for every node.
    pub(super) fn control_channel(&self) -> &str {
        &self.control_channel
    }

    /// Asks every node to close `user`'s connections; returns how many nodes heard it.
    pub async fn disconnect_user(&self, user: &str) -> Result<usize, TransportError> {
        let request = Control {
            disconnect: user.to_owned(),
        };
        let payload = serde_json::to_string(&request).unwrap_or_default();
        let mut publish = redis::cmd("PUBLISH");
        publish.arg(self.control_channel()).arg(payload);
        self.scripts.query(&publish).await
    }

    /// Advertises this node's internal address for `ttl`.
    pub(super) async fn advertise(&self, ttl: Duration) -> Result<(), TransportError> {
        let mut set = redis::cmd("SET");
        set.arg(format!(
            "{}node-addr:{}",
            self.scripts.key_prefix(),
            self.presence.node
        ))
        .arg(&self.internal_addr)
        .arg("PX")
        .arg(ttl.as_millis() as u64);
        self.scripts.query(&set).await
    }

    /// Where `node` can be reached, if it advertised an address and is alive.
    pub async fn node_addr(&self, node: &str) -> Result<Option<String>, TransportError> {
        let mut get = redis::cmd("GET");
        get.arg(format!("{}node-addr:{node}", self.scripts.key_prefix()));
        self.scripts.query(&get).await
    }

    /// A request heard on the control channel.
    pub(super) fn heard_control(&self, payload: &[u8]) {
        match serde_json::from_slice::<Control>(payload) {
            Ok(Control { disconnect }) => {
                let closed = self.hub.close_user(
                    &disconnect,
                    close_code::DISCONNECTED,
                    "disconnected by the application",
                );
                if closed > 0 {
                    info!(user = %disconnect, closed, "connections closed on request");
                }
            }
            Err(e) => warn!(error = %e, "the control channel carried a malformed request"),
        }
    }
}
