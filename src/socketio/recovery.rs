//! Connection-state recovery, as socket.io-client 4.6+ speaks it, on any node. A connected
//! client gets a private id (`pid`) with its CONNECT answer, and every `message` event carries
//! its offset (room, epoch, id) as a last argument, which the client keeps. The session's
//! state (user, first room, rooms) is kept under the `pid` for `socketio.recovery_secs` after
//! the session ends, where every node can read it (Redis) or in the node (embedded). A client
//! that reconnects with `pid` and `offset`, to any node, gets its rooms back and every message
//! of the offset's room after the offset, once and in order, from the room's history; the
//! CONNECT answer then carries the same `pid`, which socket.io-client reports as
//! `socket.recovered === true`.
//!
//! Honest limits: the client keeps one offset, so only a session in one room can be recovered
//! exactly; a session in several rooms gets its rooms back, live, with `recovered === false`.
//! Messages older than the room's history are not recovered either (`recovered === false`).

use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::client::{Client, error_event};
use super::session::random_id;
use crate::chat::Join;
use crate::node::access::Grant;
use crate::protocol::native::Since;
use crate::protocol::socketio::{self as codec, Offset};
use crate::protocol::{RoomName, RoomRef};

/// What a session's recovery needs.
#[derive(Debug, Serialize, Deserialize)]
struct State {
    user: String,
    room: String,
    rooms: Vec<String>,
}

impl Client {
    /// How long a session's state is kept while it is open (renewed every heartbeat).
    pub(super) fn recovery_ttl_open(&self) -> Duration {
        let node = self.chat.node();
        let limits = &node.live().limits;
        Duration::from_secs(
            node.config.socketio.recovery_secs
                + limits.ping_interval_secs
                + limits.ping_timeout_secs,
        )
    }

    /// Saves the session's state under its `pid` (when recovery is on and it is connected).
    pub(super) async fn save_recovery(&self) {
        let (Some(pid), Some((user, room))) = (&self.pid, self.chat.user()) else {
            return;
        };
        let state = State {
            user: user.to_string(),
            room: room.to_string(),
            rooms: self.chat.rooms().iter().map(ToString::to_string).collect(),
        };
        let Ok(json) = serde_json::to_string(&state) else {
            return;
        };
        let ttl = self.recovery_ttl_open();
        self.chat
            .node()
            .transport
            .save_recovery(pid, &json, ttl)
            .await;
    }

    /// Keeps the state for `ttl` more (a heartbeat; the session's end).
    pub(super) async fn touch_recovery(&self, ttl: Duration) {
        if let Some(pid) = &self.pid {
            self.chat.node().transport.touch_recovery(pid, ttl).await;
        }
    }

    /// Recovers the session a CONNECT names with `pid` (and `offset`), if its state is kept
    /// and belongs to the same user (`token_user`, with authentication on). Answers the
    /// CONNECT itself and returns `true`; `false` when there is nothing to recover and the
    /// CONNECT goes on as a new one.
    pub(super) async fn recover(
        &mut self,
        auth: &Value,
        token_user: Option<&str>,
        grant: Grant,
        sid: &str,
    ) -> bool {
        let node = self.chat.node().clone();
        let Some(pid) = auth.get("pid").and_then(Value::as_str) else {
            return false;
        };
        let Some(json) = node.transport.take_recovery(pid).await else {
            return false;
        };
        let Ok(state) = serde_json::from_str::<State>(&json) else {
            return false;
        };
        if token_user.is_some_and(|user| user != state.user) {
            return false; // another user's session: never theirs to recover
        }
        let Ok(first) = RoomName::new(&state.room) else {
            return false;
        };
        let offset = auth
            .get("offset")
            .and_then(Value::as_str)
            .and_then(Offset::parse);
        self.chat.sign_in(state.user.as_str().into(), first, grant);
        let presence = auth.get("presence").and_then(Value::as_bool) == Some(true);
        // One offset tells where the client stands in one room only.
        let mut recovered = offset.is_some() && state.rooms.len() == 1;
        for name in &state.rooms {
            let Ok(room) = RoomName::new(name) else {
                recovered = false;
                continue;
            };
            let since = offset
                .filter(|o| o.room == room.as_str())
                .and_then(|o| Since::new(o.id, Some(o.epoch)).ok());
            recovered &= since.is_some();
            let join = Join {
                room: RoomRef::Named(room),
                history: since.is_some() || node.config.socketio.history_on_join,
                since,
                presence,
            };
            match self.chat.join_first(join, None).await {
                Ok(entered) => recovered &= entered.recovered != Some(false),
                Err(e) => {
                    recovered = false;
                    self.push(error_event(&e));
                }
            }
        }
        let pid = if recovered {
            pid.to_owned()
        } else {
            match random_id() {
                Ok(fresh) => fresh,
                Err(_) => return false,
            }
        };
        // The events above precede this answer: socket.io-client keeps events that come
        // before CONNECT's answer and hands them over, in order, once connected.
        self.push(codec::connected_with_pid(sid, &pid));
        self.pid = Some(pid);
        self.save_recovery().await;
        true
    }
}
