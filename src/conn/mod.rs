//! The plumbing of one client connection, shared by both protocols (the native session and
//! Socket.IO's WebSocket transport): the socket is split into a [`reader`] of client frames
//! and the one [`writer`] that drains the connection's outbox; [`close`] ends the connection
//! so that the peer reads the close frame.
//!
//! Below the protocols, above the [`node`](crate::node): the writer wakes on the node's
//! ticker and stops at its shutdown.

pub(crate) mod close;
pub(crate) mod reader;
pub(crate) mod writer;
