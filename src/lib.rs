//! scalechat: a real-time chat server over WebSocket, one binary, horizontally scalable.
//!
//! Module map, in the order a message travels:
//! - [`server`]: listener, HTTP routing (`/ws`, `/socket.io/`, `/healthz`, `/readyz`,
//!   `/metrics`, the page) to the protocols, graceful shutdown.
//! - [`native`] and [`socketio`]: the two protocols. Each decodes a client's requests, hands
//!   them to the chat core and encodes its answers: `native` at `/ws` (and the echo endpoint),
//!   `socketio` as Socket.IO v5 over Engine.IO v4 at `/socket.io/` (long-polling, WebSocket,
//!   the upgrade between them) for `socket.io-client` apps, relaying requests for other nodes'
//!   sessions to them.
//! - [`api`]: the server API at `/api/v1/` for the application's backend: posts through the
//!   same path as a client's `send`, reads history and members, disconnects users.
//! - [`chat`]: the chat core, one implementation for every protocol: joining (room limit,
//!   staged catch-up of history), leaving, sending (length and rate checks, publish, ack),
//!   history pages, and the rate limits on each.
//! - [`conn`]: what both protocols' WebSocket connections use: the frame reader, the one
//!   writer, the close handshake.
//! - [`node`]: the state a node's connections share (config and live settings, hub,
//!   transport, metrics, connection slots), the admission of new connections, who may join
//!   which room, the ticker.
//! - [`transport`]: the one delivery path. `publish` assigns a room's next id, stores the
//!   message and hands it, a typed [`Message`](protocol::message::Message), to the hub of
//!   every node with members in the room.
//! - [`hub`]: rooms to local members (and their users, for presence); `deliver` queues the
//!   message's frame in each member's codec, encoded once per node and shared, never copied
//!   per member; presence events are gathered per room and sent a few frames per interval.
//! - [`outbox`]: a connection's queue of frames, bounded in frames and bytes; overflow closes
//!   a slow consumer.
//! - [`archive`]: the optional PostgreSQL archive: every accepted message written once, off
//!   the delivery path, and read back for old history, recovery, search and retention.
//! - [`protocol`]: wire formats. `message` is a chat message and its frame per protocol;
//!   `native` and `socketio` decode client requests and encode server frames once; `frame`
//!   decodes and checks the WebSocket frames clients send; `ws` builds whole WebSocket frames
//!   as shared `Bytes`.
//! - [`webhooks`]: the chat's events (messages, rooms occupied and vacated, members joined
//!   and left), queued and sent in signed batches to the application's endpoints.
//! - [`metrics`]: counters and gauges, exposed on `/metrics` in Prometheus text format.
//! - [`web`]: the built-in chat page, embedded in the binary.
//! - [`config`]: defaults < TOML file < environment, validated all at once.
//!
//! The modules form a ladder, each using only those below it (tests/layers.rs checks that
//! their imports have no cycle): wire formats and settings ([`protocol`], [`web`], then
//! [`config`], [`metrics`], [`outbox`], [`webhooks`]), the [`archive`] above them, then
//! [`hub`], [`transport`], [`node`], the chat core [`chat`] beside [`conn`], the protocols
//! and the API ([`native`], [`socketio`], [`api`]), and [`server`] on top, which `main.rs`
//! runs.

pub mod api;
pub mod archive;
pub mod chat;
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
pub mod webhooks;
