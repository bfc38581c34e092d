//! scalechat: a real-time chat server over WebSocket, one binary, horizontally scalable.
//!
//! Module map, in the order a message travels:
//! - [`server`]: listener, HTTP routing (`/ws`, `/healthz`, `/readyz`, `/metrics`), one
//!   task per WebSocket session (a reader and the one writer), graceful shutdown.
//! - [`protocol`]: wire formats. `frame` decodes and checks the WebSocket frames clients
//!   send; `native` decodes client requests and encodes server frames once; `ws` builds whole
//!   WebSocket frames as shared `Bytes`.
//! - [`transport`]: the one delivery path. `publish` assigns a room's next id and hands the
//!   encoded frame to the hub of every node with members in the room.
//! - [`hub`]: rooms to local members; `deliver` queues the same bytes for each member.
//! - [`outbox`]: a connection's bounded frame queue; overflow closes a slow consumer.
//! - [`socketio`]: Socket.IO v5 over Engine.IO v4 at `/socket.io/` (long-polling, WebSocket,
//!   the upgrade between them) for `socket.io-client` apps; members share rooms with native
//!   clients and get each message's Socket.IO form, encoded once per node.
//! - [`metrics`]: counters and gauges, exposed on `/metrics` in Prometheus text format.
//! - [`web`]: the built-in chat page, embedded in the binary.
//! - [`config`]: defaults < TOML file < environment, validated all at once.

pub mod config;
pub mod hub;
pub mod metrics;
pub mod outbox;
pub mod protocol;
pub mod server;
pub mod socketio;
pub mod transport;
pub mod web;
