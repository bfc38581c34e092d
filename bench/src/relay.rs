//! The raw-TCP ceiling: a relay with no framework in the way, run as its own process so its
//! CPU and memory are measured like a node's. It answers the same handshake with a fixed 101
//! and the `welcome` and `joined` frames, reads `send` frames, and writes a `message` frame of
//! the same shape and size as scalechat's to every connection. Connections are spread over one
//! thread per core; each thread's writer puts every frame that is waiting into one buffer and
//! writes it to each of its sockets, so a delivery costs a share of one write call and nothing
//! else.

use std::collections::HashMap;
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
    Add(u64, Arc<str>, OwnedWriteHalf),
    Frame(Arc<str>, Bytes),
    Close(u64, Arc<str>, Bytes),
}

const RESPONSE: &[u8] = b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\
Connection: Upgrade\r\nSec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n\r\n";

/// Serves on 127.0.0.1:`port` until killed: the accept loop on this thread, and one thread
/// per core, each with a runtime of its own running its connections and their writer.
pub fn run(port: u16) -> anyhow::Result<()> {
    let shards = std::thread::available_parallelism().map_or(2, |n| n.get());
    let mut writers = Vec::new();
    let mut runtimes = Vec::new();
    for _ in 0..shards {
        let (tx, rx) = mpsc::channel(1 << 16);
        writers.push(tx);
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        runtime.spawn(write_shard(rx));
        runtimes.push(Arc::new(runtime));
    }
    let writers: Arc<[mpsc::Sender<Cmd>]> = writers.into();
    let ids = Arc::new(AtomicU64::new(0));
    let mut handoff = Vec::new();
    for (i, runtime) in runtimes.into_iter().enumerate() {
        let (tx, mut rx) = mpsc::unbounded_channel::<(u64, std::net::TcpStream)>();
        handoff.push(tx);
        let writers = writers.clone();
        let ids = ids.clone();
        std::thread::Builder::new()
            .name(format!("relay-{i}"))
            .spawn(move || {
                runtime.block_on(async move {
                    while let Some((conn, stream)) = rx.recv().await {
                        let (writers, ids) = (writers.clone(), ids.clone());
                        tokio::spawn(async move {
                            let Ok(stream) = TcpStream::from_std(stream) else {
                                return;
                            };
                            let _ = connection(stream, conn, i, writers, ids).await;
                        });
                    }
                })
            })?;
    }
    let accept = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    accept.block_on(async move {
        let socket = TcpSocket::new_v4()?;
        socket.set_reuseaddr(true)?;
        socket.bind(SocketAddr::from(([127, 0, 0, 1], port)))?;
        let listener = socket.listen(4096)?;
        for conn in 0u64.. {
            let (stream, _) = listener.accept().await?;
            let _ = stream.set_nodelay(true);
            let stream = stream.into_std()?;
            // A send fails only if the shard's thread is gone, and then the process ends too.
            let _ = handoff[conn as usize % shards].send((conn, stream));
        }
        Ok(())
    })
}

async fn connection(
    mut stream: TcpStream,
    conn: u64,
    shard: usize,
    writers: Arc<[mpsc::Sender<Cmd>]>,
    ids: Arc<AtomicU64>,
) -> anyhow::Result<()> {
    let mut reader = FrameReader::new(512);
    let room: Arc<str> = loop {
        if reader.fill(&mut stream).await? == 0 {
            return Ok(());
        }
        if let Some(end) = memchr::memmem::find(reader.pending(), b"\r\n\r\n") {
            let room = room_of(&reader.pending()[..end]);
            reader.consume(end + 4);
            break room.into();
        }
    };
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
    let mine = &writers[shard];
    mine.send(Cmd::Add(conn, room.clone(), write)).await?;
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
                writer.send(Cmd::Frame(room.clone(), frame.clone())).await?;
            }
        }
        if let Some(payload) = close {
            let mut frame = Vec::new();
            encode_server_frame(&mut frame, OP_CLOSE, &payload);
            mine.send(Cmd::Close(conn, room, frame.into())).await?;
            return Ok(());
        }
        if reader.fill(&mut read).await? == 0 {
            mine.send(Cmd::Close(conn, room, Bytes::new())).await?;
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

/// The `room` query parameter of a request head (`general` without one).
fn room_of(head: &[u8]) -> String {
    let line = head.split(|&b| b == b'\r').next().unwrap_or_default();
    let line = String::from_utf8_lossy(line);
    let query = line.split(' ').nth(1).and_then(|p| p.split_once('?'));
    query
        .and_then(|(_, q)| q.split('&').find_map(|kv| kv.strip_prefix("room=")))
        .unwrap_or("general")
        .to_owned()
}

/// A room's connections on one writer, and the frames waiting for them.
#[derive(Default)]
struct Room {
    sockets: Vec<(u64, OwnedWriteHalf)>,
    batch: Vec<u8>,
}

/// One writer: owns the write halves of its connections; writes every frame waiting for a room
/// in one buffer to each of the room's connections.
async fn write_shard(mut rx: mpsc::Receiver<Cmd>) {
    let mut rooms: HashMap<Arc<str>, Room> = HashMap::new();
    while let Some(mut cmd) = rx.recv().await {
        let mut waiting = 0;
        loop {
            match cmd {
                Cmd::Frame(room, frame) => {
                    if let Some(room) = rooms.get_mut(&room) {
                        room.batch.extend_from_slice(&frame);
                        waiting += frame.len();
                    }
                }
                Cmd::Add(id, name, socket) => {
                    let room = rooms.entry(name).or_default();
                    flush(room).await;
                    room.sockets.push((id, socket));
                }
                Cmd::Close(id, name, frame) => {
                    if let Some(room) = rooms.get_mut(&name) {
                        flush(room).await;
                        if let Some(i) = room.sockets.iter().position(|(s, _)| *s == id) {
                            let (_, mut socket) = room.sockets.swap_remove(i);
                            let _ = socket.write_all(&frame).await;
                        }
                    }
                }
            }
            if waiting > 1 << 20 {
                break;
            }
            match rx.try_recv() {
                Ok(next) => cmd = next,
                Err(_) => break,
            }
        }
        for room in rooms.values_mut() {
            flush(room).await;
        }
    }
}

async fn flush(room: &mut Room) {
    if room.batch.is_empty() {
        return;
    }
    let mut failed = Vec::new();
    for (i, (_, socket)) in room.sockets.iter_mut().enumerate() {
        if socket.write_all(&room.batch).await.is_err() {
            failed.push(i);
        }
    }
    for i in failed.into_iter().rev() {
        room.sockets.swap_remove(i);
    }
    room.batch.clear();
}
