//! scalechat-sioxide: a Socket.IO v4 server on socketioxide that does what scalechat's
//! Socket.IO path does in scalechat-bench's fan-out, so that the two can be compared on the
//! same load. A client is put in the room named by its handshake's `room` query parameter (or
//! CONNECT's `auth.room`; default `general`) and gets the event `joined` (`{room}`, without
//! scalechat's `online` count, which would take a Redis round trip here); `event:message` is
//! broadcast to the room as the event `message` with the arguments scalechat sends: the JSON
//! string of a native `message` frame, then the offset `room:epoch:id`; `join` adds a room.
//! One node on socketioxide's in-memory adapter, or several sharing rooms through one Redis
//! with socketioxide-redis (`--redis`).
//!
//! What it leaves out, and scalechat does per message: no history, no message ids shared
//! between nodes (each node counts its own per room), no `ref` dedupe, no rate limits, no
//! authentication, no presence. Queues are bounded (`--max-queued-packets` per client,
//! `--redis-buffer` for what Redis delivers); what does not fit is dropped and logged.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::Context;
use clap::Parser;
use hyper::body::{Body, Incoming};
use hyper::service::Service;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use socketioxide::adapter::{Adapter, LocalAdapter};
use socketioxide::extract::{AckSender, Data, SocketRef};
use socketioxide::{SocketIo, SocketIoBuilder};
use socketioxide_redis::drivers::redis::redis_client;
use socketioxide_redis::{RedisAdapter, RedisAdapterConfig, RedisAdapterCtr};
use tokio::net::TcpListener;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(
    version,
    about = "socketioxide peer of scalechat's Socket.IO path (scalechat-bench)"
)]
struct Args {
    /// Port to listen on, on 127.0.0.1.
    #[arg(long)]
    port: u16,
    /// Share rooms with the other nodes through this Redis (`redis://127.0.0.1:6379`);
    /// without it, one node on the in-memory adapter.
    #[arg(long)]
    redis: Option<String>,
    /// Packets queued for one client at most (socketioxide's `max_buffer_size`); a broadcast
    /// finding a client's queue full skips that client and logs a warning.
    #[arg(long, default_value_t = 65536)]
    max_queued_packets: usize,
    /// Messages from Redis waiting for this node at most (socketioxide-redis's
    /// `stream_buffer`); past it they are dropped with a warning.
    #[arg(long, default_value_t = 65536)]
    redis_buffer: usize,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    tracing_subscriber::fmt().with_env_filter(filter).init();
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?
        .block_on(run(args))
}

async fn run(args: Args) -> anyhow::Result<()> {
    // scalechat's defaults for the heartbeat and the largest message.
    let builder = SocketIo::builder()
        .ping_interval(Duration::from_secs(20))
        .ping_timeout(Duration::from_secs(20))
        .max_payload(65_536)
        .ws_max_message_size(65_536)
        .max_buffer_size(args.max_queued_packets);
    let chat = Arc::new(Chat::new());
    match &args.redis {
        None => {
            let (svc, io) = builder.build_svc();
            io.ns("/", connect_handler::<LocalAdapter>(chat));
            serve(args.port, svc).await
        }
        Some(url) => {
            // socketioxide-redis's driver reads Pub/Sub messages as RESP3 pushes.
            let url = format!("{url}/?protocol=resp3");
            let client = redis_client::Client::open(url.as_str()).context("redis URL")?;
            let config = RedisAdapterConfig::new().with_stream_buffer(args.redis_buffer);
            let adapter = RedisAdapterCtr::new_with_redis_config(&client, config)
                .await
                .with_context(|| format!("connect to {url}"))?;
            let builder: SocketIoBuilder<RedisAdapter<_>> = builder.with_adapter(adapter);
            let (svc, io) = builder.build_svc();
            io.ns("/", connect_handler(chat))
                .await
                .context("subscribe to the namespace's channels")?;
            serve(args.port, svc).await
        }
    }
}

/// Serves HTTP/1.1 with upgrades on 127.0.0.1:`port`, one task per connection.
async fn serve<S, B>(port: u16, svc: S) -> anyhow::Result<()>
where
    S: Service<Request<Incoming>, Response = Response<B>> + Clone + Send + 'static,
    S::Future: Send,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    B: Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let listener = TcpListener::bind(("127.0.0.1", port)).await?;
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(e) => {
                // Out of files, most likely: wait for some to close rather than spin.
                tracing::warn!("accept: {e}");
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        // As scalechat does: each event is a small frame written on its own, which Nagle's
        // algorithm would hold until the previous one is acknowledged.
        let _ = stream.set_nodelay(true);
        let svc = svc.clone();
        tokio::spawn(async move {
            let conn = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), svc)
                .with_upgrades();
            if let Err(e) = conn.await {
                tracing::debug!("connection: {e}");
            }
        });
    }
}

/// What every node keeps: its epoch and each room's next message id.
struct Chat {
    epoch: String,
    ids: Mutex<HashMap<String, Arc<AtomicU64>>>,
}

impl Chat {
    fn new() -> Chat {
        // Tells this node's ids from another's and from a restarted one's; not a secret.
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos();
        Chat {
            epoch: format!("{:x}{:x}", nanos & 0xffff_ffff_ffff, std::process::id()),
            ids: Mutex::new(HashMap::new()),
        }
    }

    /// The id counter of `room` (its first id is 1).
    fn counter(&self, room: &str) -> Arc<AtomicU64> {
        let mut ids = self.ids.lock().expect("ids lock");
        ids.entry(room.to_owned()).or_default().clone()
    }
}

/// CONNECT's `auth`: scalechat reads the display name there, and the peer also the room.
#[derive(Default, Deserialize)]
#[serde(default)]
struct Auth {
    name: Option<String>,
    room: Option<String>,
}

/// One connected client: who it is and its first room, where a message without `room` goes.
struct Member {
    chat: Arc<Chat>,
    user: String,
    room: String,
    ids: Arc<AtomicU64>,
}

/// The namespace's connect handler: joins the first room, answers `joined`, and registers the
/// client's events.
fn connect_handler<A: Adapter>(
    chat: Arc<Chat>,
) -> impl Fn(SocketRef<A>, Data<Option<Auth>>) -> std::future::Ready<()> + Clone + Send + Sync + 'static
{
    move |socket: SocketRef<A>, Data(auth): Data<Option<Auth>>| {
        let auth = auth.unwrap_or_default();
        let query = query_params(socket.req_parts().uri.query().unwrap_or(""));
        let room = auth
            .room
            .or_else(|| query.get("room").cloned())
            .unwrap_or_else(|| "general".into());
        let user = auth
            .name
            .or_else(|| query.get("name").cloned())
            .unwrap_or_else(|| format!("guest-{}", &socket.id.to_string()[..4]));
        socket.join(room.clone());
        let _ = socket.emit("joined", &json!({ "room": room }));
        let member = Arc::new(Member {
            ids: chat.counter(&room),
            chat: chat.clone(),
            user,
            room,
        });
        let m = member.clone();
        socket.on(
            "event:message",
            async move |s: SocketRef<A>, Data(data): Data<Value>, ack: AckSender<A>| {
                m.send(s, data, ack).await
            },
        );
        socket.on(
            "join",
            async move |s: SocketRef<A>, Data(data): Data<Value>, ack: AckSender<A>| {
                join(s, data, ack)
            },
        );
        std::future::ready(())
    }
}

impl Member {
    /// Publishes an `event:message` (`{message, room?}` or the text alone) to its room.
    async fn send<A: Adapter>(&self, s: SocketRef<A>, data: Value, ack: AckSender<A>) {
        let (text, room) = match &data {
            Value::String(text) => (text.as_str(), None),
            Value::Object(o) => (
                o.get("message").and_then(Value::as_str).unwrap_or(""),
                o.get("room").and_then(Value::as_str),
            ),
            _ => ("", None),
        };
        if text.is_empty() {
            return refuse(
                &s,
                "empty_message",
                "event:message takes {message} or a string",
            );
        }
        let (room, ids) = match room {
            None => (self.room.as_str(), self.ids.clone()),
            Some(r) if r == self.room => (r, self.ids.clone()),
            Some(r) if s.rooms().iter().any(|joined| joined == r) => (r, self.chat.counter(r)),
            Some(_) => return refuse(&s, "not_joined", "join the room first"),
        };
        let id = ids.fetch_add(1, Ordering::Relaxed) + 1;
        let epoch = self.chat.epoch.as_str();
        let ts = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_millis() as u64;
        let message = Message {
            kind: "message",
            room,
            id,
            epoch,
            user: &self.user,
            ts,
            message: text,
        };
        let Ok(frame) = serde_json::to_string(&message) else {
            return;
        };
        let offset = format!("{room}:{epoch}:{id}");
        // A tuple is sent as two arguments: `42["message","{…}","room:epoch:id"]`.
        if let Err(e) = s
            .within(room.to_owned())
            .emit("message", &(frame, offset))
            .await
        {
            tracing::warn!("broadcast to {room}: {e}");
        }
        let _ = ack.send(&json!({ "room": room, "id": id }));
    }
}

/// `join` with `{room}` or the name: adds the room and answers `joined`.
fn join<A: Adapter>(s: SocketRef<A>, data: Value, ack: AckSender<A>) {
    let room = match &data {
        Value::String(room) => room.as_str(),
        Value::Object(o) => o.get("room").and_then(Value::as_str).unwrap_or(""),
        _ => "",
    };
    if room.is_empty() {
        return refuse(&s, "bad_room", "join takes {room} or the name");
    }
    s.join(room.to_owned());
    let joined = json!({ "room": room });
    let _ = s.emit("joined", &joined);
    let _ = ack.send(&joined);
}

/// The event `error` `{code, message}`, as scalechat sends for a refused event.
fn refuse<A: Adapter>(s: &SocketRef<A>, code: &str, message: &str) {
    let _ = s.emit("error", &json!({ "code": code, "message": message }));
}

/// A native `message` frame, fields in scalechat's order.
#[derive(Serialize)]
struct Message<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    room: &'a str,
    id: u64,
    epoch: &'a str,
    user: &'a str,
    ts: u64,
    message: &'a str,
}

/// The handshake's query parameters (`room`, `name`), decoded.
fn query_params(query: &str) -> HashMap<String, String> {
    form_urlencoded::parse(query.as_bytes())
        .map(|(k, v)| (k.into_owned(), v.into_owned()))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_message_has_scalechats_shape() {
        let m = Message {
            kind: "message",
            room: "bench",
            id: 7,
            epoch: "e1",
            user: "m3",
            ts: 1,
            message: "B3.17.99",
        };
        assert_eq!(
            serde_json::to_string(&m).unwrap(),
            r#"{"type":"message","room":"bench","id":7,"epoch":"e1","user":"m3","ts":1,"message":"B3.17.99"}"#
        );
    }

    #[test]
    fn reads_the_handshake_query() {
        let q = query_params("EIO=4&transport=websocket&room=a%20b&name=m+1");
        assert_eq!(q["room"], "a b");
        assert_eq!(q["name"], "m 1");
    }
}
