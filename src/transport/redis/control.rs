//! Requests for every node, on one control channel the subscriber connection listens to:
//! today, closing a user's connections wherever they are (the server API's `disconnect`).

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
