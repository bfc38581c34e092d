//! The raw-TCP ceiling: a relay with no framework in the way, run as its own process so its
//! CPU and memory are measured like a node's. It answers the same handshake with a fixed 101
//! and the `welcome` and `joined` frames, reads `send` frames, and writes a `message` frame of
//! the same shape and size as scalechat's to every connection. Connections are spread over one
//! writer per core; each writer puts every frame that is waiting into one buffer and writes it
//! to each of its sockets, so a delivery costs a share of one write call and nothing else.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use bytes::Bytes;
use tokio::io::AsyncWriteExt;
use tokio::net::tcp::OwnedWriteHalf;
use tokio::net::{TcpSocket, TcpStream};
use tokio::sync::mpsc;

use crate::ws::{FrameReader, OP_CLOSE, OP_TEXT, encode_server_frame};

enum Cmd {
    Add(u64, OwnedWriteHalf),
    Frame(Bytes),
    Close(u64, Bytes),
}

const RESPONSE: &[u8] = b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\
Connection: Upgrade\r\nSec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n\r\n";

/// Serves on 127.0.0.1:`port` until killed.
pub async fn run(port: u16) -> anyhow::Result<()> {
    let socket = TcpSocket::new_v4()?;
    socket.set_reuseaddr(true)?;
    socket.bind(SocketAddr::from(([127, 0, 0, 1], port)))?;
    let listener = socket.listen(4096)?;
    let shards = std::thread::available_parallelism().map_or(2, |n| n.get());
    let writers: Arc<[mpsc::Sender<Cmd>]> = (0..shards)
        .map(|_| {
            let (tx, rx) = mpsc::channel(1 << 16);
            tokio::spawn(write_shard(rx));
            tx
        })
        .collect();
    let ids = Arc::new(AtomicU64::new(0));
    for conn in 0u64.. {
        let (stream, _) = listener.accept().await?;
        let _ = stream.set_nodelay(true);
        let writers = writers.clone();
        let ids = ids.clone();
        tokio::spawn(async move {
            let _ = connection(stream, conn, writers, ids).await;
        });
    }
    Ok(())
}

async fn connection(
    mut stream: TcpStream,
    conn: u64,
    writers: Arc<[mpsc::Sender<Cmd>]>,
    ids: Arc<AtomicU64>,
) -> anyhow::Result<()> {
    let mut reader = FrameReader::new(512);
    loop {
        if reader.fill(&mut stream).await? == 0 {
            return Ok(());
        }
        if let Some(end) = memchr::memmem::find(reader.pending(), b"\r\n\r\n") {
            reader.consume(end + 4);
            break;
        }
    }
    let mut hello = RESPONSE.to_vec();
    let welcome = format!(
        r#"{{"type":"welcome","conn":"{conn:x}","name":"m","node":"relay","rooms":["bench"]}}"#
    );
    encode_server_frame(&mut hello, OP_TEXT, welcome.as_bytes());
    encode_server_frame(
        &mut hello,
        OP_TEXT,
        br#"{"type":"joined","room":"bench","online":1}"#,
    );
    stream.write_all(&hello).await?;
    let (mut read, write) = stream.into_split();
    let mine = &writers[conn as usize % writers.len()];
    mine.send(Cmd::Add(conn, write)).await?;
    let mut out = Vec::new();
    loop {
        let mut close = None;
        reader.parse(|op, payload| match op {
            OP_TEXT => out.extend(delivery(payload, &ids)),
            OP_CLOSE => close = Some(Bytes::copy_from_slice(payload)),
            _ => {}
        });
        for frame in out.drain(..) {
            for writer in writers.iter() {
                writer.send(Cmd::Frame(frame.clone())).await?;
            }
        }
        if let Some(payload) = close {
            let mut frame = Vec::new();
            encode_server_frame(&mut frame, OP_CLOSE, &payload);
            mine.send(Cmd::Close(conn, frame.into())).await?;
            return Ok(());
        }
        if reader.fill(&mut read).await? == 0 {
            mine.send(Cmd::Close(conn, Bytes::new())).await?;
            return Ok(());
        }
    }
}

/// The `message` frame for a `send` payload, shaped like scalechat's.
fn delivery(send: &[u8], ids: &AtomicU64) -> Option<Bytes> {
    if !send.starts_with(b"{\"type\":\"send\"") {
        return None;
    }
    let at = memchr::memmem::find(send, b"\"message\":\"")? + 11;
    let len = memchr::memchr(b'"', &send[at..])?;
    let id = ids.fetch_add(1, Ordering::Relaxed) + 1;
    let mut text = Vec::with_capacity(128);
    text.extend_from_slice(b"{\"type\":\"message\",\"room\":\"bench\",\"id\":");
    text.extend_from_slice(itoa::Buffer::new().format(id).as_bytes());
    text.extend_from_slice(b",\"user\":\"m0\",\"ts\":1764288000000,\"message\":\"");
    text.extend_from_slice(&send[at..at + len]);
    text.extend_from_slice(b"\"}");
    let mut frame = Vec::with_capacity(text.len() + 4);
    encode_server_frame(&mut frame, OP_TEXT, &text);
    Some(frame.into())
}

/// One writer: owns the write halves of its connections; writes every frame waiting in one
/// buffer to each of them.
async fn write_shard(mut rx: mpsc::Receiver<Cmd>) {
    let mut sockets: Vec<(u64, OwnedWriteHalf)> = Vec::new();
    let mut batch = Vec::with_capacity(1 << 16);
    while let Some(mut cmd) = rx.recv().await {
        loop {
            match cmd {
                Cmd::Frame(frame) => batch.extend_from_slice(&frame),
                Cmd::Add(id, socket) => {
                    flush(&mut batch, &mut sockets).await;
                    sockets.push((id, socket));
                }
                Cmd::Close(id, frame) => {
                    flush(&mut batch, &mut sockets).await;
                    if let Some(i) = sockets.iter().position(|(s, _)| *s == id) {
                        let (_, mut socket) = sockets.swap_remove(i);
                        let _ = socket.write_all(&frame).await;
                    }
                }
            }
            if batch.len() > 1 << 20 {
                break;
            }
            match rx.try_recv() {
                Ok(next) => cmd = next,
                Err(_) => break,
            }
        }
        flush(&mut batch, &mut sockets).await;
    }
}

async fn flush(batch: &mut Vec<u8>, sockets: &mut Vec<(u64, OwnedWriteHalf)>) {
    if batch.is_empty() {
        return;
    }
    let mut failed = Vec::new();
    for (i, (_, socket)) in sockets.iter_mut().enumerate() {
        if socket.write_all(batch).await.is_err() {
            failed.push(i);
        }
    }
    for i in failed.into_iter().rev() {
        sockets.swap_remove(i);
    }
    batch.clear();
}
