//! scalechat: a real-time chat server over WebSocket, one binary, horizontally scalable.
//!
//! Module map, in the order a message travels:
//! - [`server`]: listener, HTTP routing (`/ws`, `/socket.io/`, `/healthz`, `/readyz`,
//!   `/metrics`, the page) to the protocols, graceful shutdown.
//! - [`native`]: one session of the native protocol at `/ws`: reads requests, joins rooms,
//!   publishes what its user sends.
//! - [`socketio`]: Socket.IO v5 over Engine.IO v4 at `/socket.io/` (long-polling, WebSocket,
//!   the upgrade between them) for `socket.io-client` apps; members share rooms with native
//!   clients.
//! - [`conn`]: what both protocols' connections use: the WebSocket frame reader, the one
//!   writer, the close handshake, rate limits.
//! - [`node`]: the state a node's connections share (config and live settings, hub,
//!   transport, metrics, connection slots), the admission of new connections, the ticker.
//! - [`protocol`]: wire formats. `native` and `socketio` decode client requests and encode
//!   server frames once; `frame` decodes and checks the WebSocket frames clients send; `ws`
//!   builds whole WebSocket frames as shared `Bytes`.
//! - [`transport`]: the one delivery path. `publish` assigns a room's next id and hands the
//!   encoded frame to the hub of every node with members in the room.
//! - [`hub`]: rooms to local members; `deliver` queues the same bytes for each member (the
//!   message's Socket.IO form for Socket.IO members, encoded once per node).
//! - [`outbox`]: a connection's bounded frame queue; overflow closes a slow consumer.
//! - [`metrics`]: counters and gauges, exposed on `/metrics` in Prometheus text format.
//! - [`web`]: the built-in chat page, embedded in the binary.
//! - [`config`]: defaults < TOML file < environment, validated all at once.
//!
//! The modules form a ladder, each using only those below it (tests/layers.rs checks that
//! their imports have no cycle): wire formats and settings ([`protocol`], [`config`],
//! [`metrics`], [`web`]), then [`outbox`] and [`hub`], [`transport`], [`node`], [`conn`], the
//! protocols ([`native`], [`socketio`]), and [`server`] on top, which `main.rs` runs.

pub mod config;
pub mod conn;
pub mod hub;
pub mod metrics;
pub mod native;
pub mod node;
pub mod outbox;
pub mod protocol;
pub mod server;
pub mod socketio;
pub mod transport;
pub mod web;
