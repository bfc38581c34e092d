//! The read side of a WebSocket connection: client frames off the socket, with no buffer held
//! while the connection is idle.
//!
//! Most connections are idle most of the time, so an idle connection costs only its socket:
//! the reader waits for readiness with nothing allocated, reads what arrived into a buffer
//! sized for it, hands out each whole frame (checked by [`Decoder`]), and frees the buffer
//! once every byte in it was consumed. A buffer outlives that only while a frame is partly
//! received, and then holds at most that frame.

use std::io;
use std::task::{Context, Poll, ready};

use tokio::io::{AsyncRead, AsyncReadExt, ReadBuf};
use tokio::net::TcpStream;

use crate::protocol::frame::{Decoded, Decoder, FrameError, Opcode};

/// Bytes read at once when no frame header says how many are coming.
const READ_CHUNK: usize = 4096;

/// The buffer a closing connection's input is read into and dropped from.
const DISCARD_CHUNK: usize = 512;

/// One whole client frame, its payload unmasked.
#[derive(Debug)]
pub(crate) struct Frame<'a> {
    /// Whether this is the last frame of its message.
    pub(crate) fin: bool,
    /// The opcode.
    pub(crate) opcode: Opcode,
    /// The payload.
    pub(crate) payload: &'a [u8],
}

/// Why no frame came.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ReadError {
    /// The stream ended or failed: no close frame can be exchanged.
    #[error("stream ended: {0}")]
    Gone(#[from] io::Error),
    /// The peer broke a rule: fail the connection with this close code.
    #[error(transparent)]
    Protocol(#[from] FrameError),
}

/// A checked frame waiting in the buffer (kept small: every connection has a reader).
#[derive(Debug)]
struct Ready {
    fin: bool,
    opcode: Opcode,
    /// Header bytes: at most 14.
    payload_offset: u8,
    /// At most `max_frame_bytes` (16 MiB) and its header.
    frame_len: u32,
}

/// Reads client frames from a socket, which its owner lends to each call: the connection
/// that owns the socket owns the reader too, and its writer writes to the same socket.
#[derive(Debug)]
pub(crate) struct FrameReader {
    /// Received bytes not yet consumed start at `start` (the frame last handed out ends
    /// there); empty, without capacity, when idle. It holds at most one frame and what was
    /// read past it, so `u32` offsets will do.
    buf: Vec<u8>,
    start: u32,
    decoder: Decoder,
    /// The frame at `start`, found by `poll_ready` and not yet handed out.
    ready: Option<Ready>,
}

impl FrameReader {
    /// A reader starting with `early`, the bytes read past the handshake (copied), refusing a
    /// frame, or a fragmented message in total, above `max_frame_bytes`.
    pub(crate) fn new(early: &[u8], max_frame_bytes: usize) -> Self {
        Self {
            buf: early.to_vec(),
            start: 0,
            decoder: Decoder::new(max_frame_bytes),
            ready: None,
        }
    }

    /// Bytes held for frames not yet handed out (0 while idle).
    #[cfg(test)]
    fn buffered_capacity(&self) -> usize {
        self.buf.capacity()
    }

    /// The next frame from `stream`. Cancel-safe: bytes read stay in the reader until a frame
    /// is returned.
    pub async fn next(&mut self, stream: &TcpStream) -> Result<Frame<'_>, ReadError> {
        std::future::poll_fn(|cx| self.poll_ready(stream, cx)).await?;
        Ok(self.ready_frame())
    }

    /// Ready once a whole frame (or an error) is waiting; [`FrameReader::ready_frame`] then
    /// hands the frame out. Reads what the socket has; with nothing to read, registers for the
    /// socket's readiness and holds no buffer.
    pub fn poll_ready(
        &mut self,
        stream: &TcpStream,
        cx: &mut Context<'_>,
    ) -> Poll<Result<(), ReadError>> {
        loop {
            if self.start as usize == self.buf.len() {
                // Everything consumed: free the buffer before waiting for the next bytes.
                self.buf = Vec::new();
                self.start = 0;
            }
            match self.decoder.decode(&mut self.buf[self.start as usize..])? {
                Decoded::Frame(header) => {
                    self.ready = Some(Ready {
                        fin: header.fin,
                        opcode: header.opcode,
                        payload_offset: header.payload_offset as u8,
                        frame_len: header.frame_len() as u32,
                    });
                    return Poll::Ready(Ok(()));
                }
                Decoded::Incomplete { frame_len } => ready!(self.poll_fill(stream, frame_len, cx))?,
            }
        }
    }

    /// The frame [`FrameReader::poll_ready`] found, consumed now; its payload stays in place
    /// until the reader is polled again.
    ///
    /// # Panics
    /// When `poll_ready` did not just return `Ready(Ok(()))`.
    pub fn ready_frame(&mut self) -> Frame<'_> {
        let ready = self.ready.take().expect("poll_ready found a frame");
        let at = self.start as usize;
        self.start += ready.frame_len;
        Frame {
            fin: ready.fin,
            opcode: ready.opcode,
            payload: &self.buf[at + usize::from(ready.payload_offset)..self.start as usize],
        }
    }

    /// Reads and discards what the peer sends until it closes its side, or until `max_bytes`
    /// were discarded; returns how many. For a closing connection: frames no longer matter,
    /// and input left unread when the socket closes would make the kernel reset the connection.
    pub async fn discard(
        &mut self,
        stream: impl AsyncRead + Unpin,
        max_bytes: u64,
    ) -> io::Result<u64> {
        // Into this reader's own buffer (a closing client sends little, if anything), rather
        // than `tokio::io::copy`, which allocates and zeroes 8 KiB for every connection that
        // closes.
        self.buf.clear();
        self.buf.resize(DISCARD_CHUNK, 0);
        self.buf.shrink_to(DISCARD_CHUNK);
        self.start = 0;
        self.ready = None;
        let mut rest = stream.take(max_bytes);
        let mut discarded = 0;
        loop {
            match rest.read(&mut self.buf).await? {
                0 => return Ok(discarded),
                n => discarded += n as u64,
            }
        }
    }

    /// Appends what arrived, reading at least the rest of the frame whose length is known.
    /// `Pending` while nothing is there, holding no buffer if it held none.
    fn poll_fill(
        &mut self,
        stream: &TcpStream,
        frame_len: Option<usize>,
        cx: &mut Context<'_>,
    ) -> Poll<io::Result<()>> {
        if self.start > 0 {
            self.buf.drain(..self.start as usize);
            self.start = 0;
        }
        let missing = frame_len.map_or(0, |len| len.saturating_sub(self.buf.len()));
        loop {
            ready!(poll_readable(stream, cx))?;
            // Only now, with bytes waiting, is there a buffer to read them into.
            self.buf.reserve_exact(missing.max(READ_CHUNK));
            match stream.try_read_buf(&mut self.buf) {
                Ok(0) => return Poll::Ready(Err(io::ErrorKind::UnexpectedEof.into())),
                Ok(_) => return Poll::Ready(Ok(())),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    if self.buf.is_empty() {
                        self.buf = Vec::new(); // the readiness was stale: stay idle
                    }
                }
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
    }
}

/// Ready when the stream has bytes to read (or has ended), without reading them.
///
/// A one-byte peek rather than `TcpStream::readable`: polling the socket this way stores this
/// task's waker in the socket's read slot, which drops the waker hyper left there while it
/// served the handshake. That stale waker would keep hyper's finished connection task
/// allocated for the whole life of the connection.
fn poll_readable(stream: &TcpStream, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
    let mut byte = [0; 1];
    stream
        .poll_peek(cx, &mut ReadBuf::new(&mut byte))
        .map_ok(drop)
}

/// Collects a fragmented text message (the decoder has checked its order, size and UTF-8).
#[derive(Default)]
pub(crate) struct Assembler {
    buf: Vec<u8>,
}

impl Assembler {
    /// Adds a fragment; returns the whole text once the last one arrives.
    pub(crate) fn push(&mut self, payload: &[u8], fin: bool) -> Option<Vec<u8>> {
        self.buf.extend_from_slice(payload);
        fin.then(|| std::mem::take(&mut self.buf))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;
    use tokio::net::{TcpListener, TcpStream};

    /// A masked client frame with a zero key: the payload goes as is.
    fn frame(fin: bool, opcode: u8, payload: &[u8]) -> Vec<u8> {
        assert!(payload.len() < 126);
        let mut out = vec![
            u8::from(fin) << 7 | opcode,
            0x80 | payload.len() as u8,
            0,
            0,
            0,
            0,
        ];
        out.extend_from_slice(payload);
        out
    }

    async fn pair() -> (TcpStream, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client = TcpStream::connect(listener.local_addr().unwrap());
        let (client, accepted) = tokio::join!(client, listener.accept());
        (client.unwrap(), accepted.unwrap().0)
    }

    #[tokio::test]
    async fn early_bytes_come_first_and_the_buffer_is_freed_when_consumed() {
        let (mut client, server) = pair().await;
        let mut early = frame(true, 0x1, b"early");
        early.extend_from_slice(&frame(true, 0x1, b"split")[..3]);
        let mut reader = FrameReader::new(&early, 1024);
        assert_eq!(reader.next(&server).await.unwrap().payload, b"early");
        client
            .write_all(&frame(true, 0x1, b"split")[3..])
            .await
            .unwrap();
        assert_eq!(reader.next(&server).await.unwrap().payload, b"split");

        // A frame in many small writes, then two in one.
        let bytes = frame(true, 0x9, &[7; 100]);
        let writes = async {
            for chunk in bytes.chunks(9) {
                client.write_all(chunk).await.unwrap();
                tokio::task::yield_now().await;
            }
            let mut two = frame(false, 0x1, b"a");
            two.extend_from_slice(&frame(true, 0x0, b"b"));
            client.write_all(&two).await.unwrap();
        };
        let reads = async {
            let ping = reader.next(&server).await.unwrap();
            assert_eq!((ping.opcode, ping.payload), (Opcode::Ping, &[7; 100][..]));
            assert_eq!(reader.next(&server).await.unwrap().payload, b"a");
            let last = reader.next(&server).await.unwrap();
            assert_eq!((last.opcode, last.fin), (Opcode::Continuation, true));
        };
        tokio::join!(writes, reads);
        // Idle again: the next read waits with nothing allocated.
        let waiting =
            tokio::time::timeout(std::time::Duration::from_millis(20), reader.next(&server));
        assert!(waiting.await.is_err());
        assert_eq!(reader.buffered_capacity(), 0);
        drop(client);
        assert!(matches!(
            reader.next(&server).await,
            Err(ReadError::Gone(_))
        ));
    }

    #[tokio::test]
    async fn a_broken_rule_is_a_protocol_error() {
        let (mut client, server) = pair().await;
        let mut reader = FrameReader::new(&[], 1024);
        client
            .write_all(&frame(true, 0x0, b"orphan"))
            .await
            .unwrap();
        let Err(ReadError::Protocol(e)) = reader.next(&server).await else {
            panic!("expected a protocol error");
        };
        assert_eq!(e.code, 1002);
    }

    #[test]
    fn assembler_joins_fragments_and_starts_over() {
        let mut a = Assembler::default();
        assert_eq!(a.push(b"\xC3", false), None);
        assert_eq!(a.push(b"\xA9", true).unwrap(), "é".as_bytes());
        assert_eq!(a.push(b"x", true).unwrap(), b"x");
    }
}
