//! The end of a WebSocket connection, for both protocols: how the reader ended
//! ([`ReadEnd`]), the answer to the peer's close frame, and the [`linger`] after the server's
//! close frame that lets the peer read it.

use std::time::Duration;

use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tracing::debug;

use super::reader::{FrameReader, ReadError};
use crate::protocol::frame;
use crate::protocol::ws::close_code;

/// How long a connection's close may take in all: the close frame out, then the [`linger`].
pub(crate) const CLOSE_TIMEOUT: Duration = Duration::from_secs(5);

/// How long a closing connection keeps reading, and discarding, what the peer still sends.
pub(crate) const LINGER_TIME: Duration = Duration::from_secs(2);

/// The most bytes a closing connection discards before it gives up on the peer. A client
/// refused a message too big may send the rest of it before its close frame (RFC 6455 §5.5.1),
/// and its kernel sends what it has buffered anyway: 16 MiB covers a message of the largest
/// size `limits.max_frame_bytes` can allow, and is read in a few milliseconds. A client that
/// sends more is reset, and may miss the close frame.
pub(crate) const LINGER_BYTES: u64 = 16 << 20;

/// How the reader ended.
#[derive(Debug)]
pub(crate) enum ReadEnd {
    /// The stream ended or failed; no close frame can be exchanged.
    Gone,
    /// Send a close frame with this code and reason (the peer closed, or broke a rule).
    Close(u16, &'static str),
}

/// The end a read error means: a protocol error closes with its code, anything else is gone.
pub(crate) fn read_error(e: ReadError) -> ReadEnd {
    match e {
        ReadError::Gone(_) => ReadEnd::Gone,
        ReadError::Protocol(e) => ReadEnd::Close(e.code, e.reason),
    }
}

/// The answer to the peer's close frame: its code echoed, or a protocol error.
pub(crate) fn peer_close(payload: &[u8]) -> ReadEnd {
    match frame::close_code(payload) {
        Ok(code) => ReadEnd::Close(code.unwrap_or(close_code::NORMAL), ""),
        Err(e) => ReadEnd::Close(e.code, e.reason),
    }
}

/// Ends a connection whose close frame is written, as RFC 6455 §7.1.1 asks: the write side
/// is shut down (a TCP FIN after the close frame), and what the peer still sends is read and
/// discarded until it closes its side too, for at most [`LINGER_TIME`] and [`LINGER_BYTES`].
///
/// Closing the socket at once would lose the close frame whenever input is still arriving
/// (the rest of a message refused as too big, say): the kernel answers unread input with a
/// reset, which discards whatever the peer has not read yet, the close frame included, and
/// the client sees 1006 instead of the code. Lingering holds nothing the connection did not
/// already hold (its socket, its slot, freed when it ends) and a small read buffer.
pub(crate) async fn linger(reader: &mut FrameReader, socket: &mut TcpStream) {
    let (read, mut write) = socket.split();
    if write.shutdown().await.is_err() {
        return; // the connection is gone: nothing can reach the peer any more
    }
    match tokio::time::timeout(LINGER_TIME, reader.discard(read, LINGER_BYTES)).await {
        Ok(Ok(n)) if n < LINGER_BYTES => {}
        Ok(Ok(_)) => debug!("closing connection kept sending; reset"),
        Ok(Err(e)) => debug!(error = %e, "read failed while closing"),
        Err(_) => debug!("closing connection did not close its side in time"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peer_close_is_echoed_or_refused() {
        assert!(matches!(peer_close(b""), ReadEnd::Close(1000, _)));
        assert!(matches!(peer_close(&[3, 233]), ReadEnd::Close(1001, _)));
        assert!(matches!(peer_close(&[0x03, 0xED]), ReadEnd::Close(1002, _)));
        assert!(matches!(peer_close(&[3]), ReadEnd::Close(1002, _)));
        assert!(matches!(
            peer_close(&[0x03, 0xE8, 0xFF]),
            ReadEnd::Close(1007, _)
        ));
    }
}
