//! Webhooks: the chat's events (a message accepted, a room occupied or vacated, a member
//! joined or left) `POST`ed in signed JSON batches to the endpoints of `[webhooks]`
//! (docs/webhooks.md). The transport that decided an event emits it, once per cluster: the
//! node whose publish got a message its id, the node whose presence script changed a room's
//! members. With `[event_stream]`, the same events are appended to a Redis stream, one more
//! [`Sink`] beside the endpoints. Emitting only queues: each sink has its own queue, bounded
//! in events and bytes (the oldest dropped past either), and its own task that sends
//! batches, retrying a failed one (an error, a timeout, any answer but 2xx: redirects are
//! not followed) with capped exponential backoff until `max_attempts`, then dropping it.
//! Nothing here is ever awaited on the chat's delivery path.

mod stream;

use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::header::{self, HeaderValue};
use hyper::{Method, Request};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use ring::hmac;
use serde_json::json;
use tokio::sync::Notify;
use tracing::{debug, warn};

use crate::config::{EventStreamConfig, WEBHOOK_EVENTS, WebhooksConfig};
use crate::metrics::Metrics;
use stream::RedisStream;

/// The most of an endpoint's answer read (and ignored), so its connection can be reused.
const ANSWER_MAX: usize = 64 * 1024;

/// What happened.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventKind {
    /// A message was accepted: it has its id and is delivered.
    Message,
    /// A room got its first member over every node.
    RoomOccupied,
    /// A room's last member over every node left.
    RoomVacated,
    /// A user's first connection entered a room.
    MemberJoined,
    /// A user's last connection left a room.
    MemberLeft,
}

impl EventKind {
    /// The event's `type` (as in `webhooks.endpoints.events`).
    pub fn as_str(self) -> &'static str {
        WEBHOOK_EVENTS[self as usize]
    }

    fn parse(name: &str) -> Option<Self> {
        [
            Self::Message,
            Self::RoomOccupied,
            Self::RoomVacated,
            Self::MemberJoined,
            Self::MemberLeft,
        ]
        .into_iter()
        .find(|k| k.as_str() == name)
    }
}

/// One event, encoded once as its JSON object.
#[derive(Debug, Clone)]
pub struct Event {
    kind: EventKind,
    json: Bytes,
}

impl Event {
    /// A message accepted in `room` as `id` of `epoch`. Its key, `room:epoch:id`, names the
    /// message itself: the same message never has another.
    pub fn message(room: &str, id: u64, epoch: &str, user: &str, ts: u64, text: &str) -> Self {
        let value = json!({
            "type": EventKind::Message.as_str(),
            "key": format!("message:{room}:{epoch}:{id}"),
            "room": room, "id": id, "epoch": epoch, "user": user, "ts": ts, "text": text,
        });
        Self::encoded(EventKind::Message, &value)
    }

    /// A room occupied or vacated at `ts` (ms since the Unix epoch).
    pub fn room(kind: EventKind, room: &str, ts: u64) -> Self {
        let value = json!({
            "type": kind.as_str(), "key": unique_key(kind, room, None, ts),
            "room": room, "ts": ts,
        });
        Self::encoded(kind, &value)
    }

    /// A member joined or left `room` at `ts`; `online`: users in the room after it.
    pub fn member(kind: EventKind, room: &str, user: &str, ts: u64, online: usize) -> Self {
        let value = json!({
            "type": kind.as_str(), "key": unique_key(kind, room, Some(user), ts),
            "room": room, "user": user, "ts": ts, "online": online,
        });
        Self::encoded(kind, &value)
    }

    fn encoded(kind: EventKind, value: &serde_json::Value) -> Self {
        Self {
            kind,
            json: Bytes::from(value.to_string()),
        }
    }
}

/// A presence event's key: its kind, room, user and time, and a random part, so that no two
/// events share one (a retry of the event keeps it).
fn unique_key(kind: EventKind, room: &str, user: Option<&str>, ts: u64) -> String {
    let nonce = fastrand::u64(..);
    match user {
        Some(user) => format!("{}:{room}:{user}:{ts}:{nonce:016x}", kind.as_str()),
        None => format!("{}:{room}:{ts}:{nonce:016x}", kind.as_str()),
    }
}

/// Events waiting for one endpoint.
#[derive(Debug, Default)]
struct Queue {
    events: VecDeque<Bytes>,
    bytes: usize,
}

/// Where batches of events go: a webhook endpoint, an event stream. A Kafka producer, say,
/// would be one more.
pub trait Sink: Send + Sync {
    /// Where, for logs (no secrets).
    fn describe(&self) -> String;

    /// Sends one batch, sent by `node`, oldest event first; `Ok` once the far end has it.
    fn send<'a>(
        &'a self,
        node: &'a str,
        batch: &'a [Bytes],
    ) -> Pin<Box<dyn Future<Output = Result<(), String>> + Send + 'a>>;
}

/// One sink, what it wants and its queue.
struct Destination {
    sink: Box<dyn Sink>,
    /// Per [`EventKind`], whether it is sent.
    wants: [bool; 5],
    queue: Mutex<Queue>,
    wake: Notify,
}

impl Destination {
    fn new(sink: Box<dyn Sink>, events: &[String]) -> Arc<Self> {
        let mut wants = [events.is_empty(); 5];
        for name in events {
            if let Some(kind) = EventKind::parse(name) {
                wants[kind as usize] = true;
            }
        }
        Arc::new(Self {
            sink,
            wants,
            queue: Mutex::default(),
            wake: Notify::new(),
        })
    }
}

/// A webhook endpoint.
struct HttpSink {
    url: hyper::Uri,
    key: hmac::Key,
    client: Client<HttpConnector, Full<Bytes>>,
}

impl Sink for HttpSink {
    fn describe(&self) -> String {
        self.url.to_string()
    }

    fn send<'a>(
        &'a self,
        node: &'a str,
        batch: &'a [Bytes],
    ) -> Pin<Box<dyn Future<Output = Result<(), String>> + Send + 'a>> {
        Box::pin(post(self, body(node, batch)))
    }
}

/// The webhooks (and the event stream) of one node.
pub struct Webhooks {
    endpoints: Vec<Arc<Destination>>,
    config: WebhooksConfig,
    node: String,
    metrics: Arc<Metrics>,
}

impl std::fmt::Debug for Webhooks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Webhooks")
            .field("endpoints", &self.endpoints.len())
            .finish_non_exhaustive()
    }
}

impl Webhooks {
    /// The webhooks of `config` and the event stream of `stream` (validated before), sent as
    /// `node`, with one sending task per endpoint; must run inside the runtime.
    pub fn spawn(
        config: &WebhooksConfig,
        stream: &EventStreamConfig,
        node: &str,
        metrics: Arc<Metrics>,
    ) -> Arc<Self> {
        let mut webhooks = Self::new(config, node, metrics);
        match RedisStream::new(stream) {
            Ok(Some(sink)) => webhooks
                .endpoints
                .push(Destination::new(Box::new(sink), &stream.events)),
            Ok(None) => {}
            Err(e) => warn!(error = %e, "the event stream is off: bad event_stream.redis_url"),
        }
        let webhooks = Arc::new(webhooks);
        for endpoint in &webhooks.endpoints {
            tokio::spawn(webhooks.clone().run(endpoint.clone()));
        }
        webhooks
    }

    /// The webhooks of `config`, their tasks not started.
    fn new(config: &WebhooksConfig, node: &str, metrics: Arc<Metrics>) -> Self {
        let client = Client::builder(TokioExecutor::new()).build_http();
        let endpoints = config
            .endpoints
            .iter()
            .filter_map(|e| {
                let sink = HttpSink {
                    url: e.url.parse::<hyper::Uri>().ok()?,
                    key: hmac::Key::new(hmac::HMAC_SHA256, e.secret.expose().as_bytes()),
                    client: client.clone(),
                };
                Some(Destination::new(Box::new(sink), &e.events))
            })
            .collect();
        Self {
            endpoints,
            config: config.clone(),
            node: node.to_owned(),
            metrics,
        }
    }

    /// Whether any endpoint wants events of `kind`: check before building one.
    pub fn wants(&self, kind: EventKind) -> bool {
        self.endpoints.iter().any(|e| e.wants[kind as usize])
    }

    /// Queues `event` for every endpoint that wants it; never waits. A full queue drops its
    /// oldest events to make room (counted in `webhook_events_dropped_total`).
    pub fn emit(&self, event: Event) {
        for endpoint in self
            .endpoints
            .iter()
            .filter(|e| e.wants[event.kind as usize])
        {
            let len = event.json.len();
            let mut queue = endpoint
                .queue
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            if len > self.config.queue_bytes {
                self.metrics.webhook_events_dropped_total.inc();
                continue;
            }
            while queue.events.len() >= self.config.queue_items
                || queue.bytes + len > self.config.queue_bytes
            {
                let Some(oldest) = queue.events.pop_front() else {
                    break;
                };
                queue.bytes -= oldest.len();
                self.metrics.webhook_events_dropped_total.inc();
            }
            queue.events.push_back(event.json.clone());
            queue.bytes += len;
            drop(queue);
            self.metrics.webhook_events_queued_total.inc();
            endpoint.wake.notify_one();
        }
    }

    /// The sending task of `endpoint`: a batch at a time, each retried until sent or out of
    /// attempts. Runs for the node's life.
    async fn run(self: Arc<Self>, endpoint: Arc<Destination>) {
        let timeout = Duration::from_millis(self.config.timeout_ms);
        let first_wait = Duration::from_millis(self.config.retry_initial_ms);
        let longest_wait = Duration::from_millis(self.config.retry_max_ms);
        let to = endpoint.sink.describe();
        loop {
            let batch = self.take(&endpoint).await;
            let mut wait = first_wait;
            let mut attempt = 1;
            loop {
                let sent = endpoint.sink.send(&self.node, &batch);
                match tokio::time::timeout(timeout, sent).await {
                    Ok(Ok(())) => {
                        self.metrics
                            .webhook_events_sent_total
                            .add(batch.len() as u64);
                        break;
                    }
                    Ok(Err(why)) => debug!(%to, attempt, %why, "event batch not sent"),
                    Err(_) => debug!(%to, attempt, "event batch timed out"),
                }
                self.metrics.webhook_requests_failed_total.inc();
                if attempt >= self.config.max_attempts {
                    warn!(%to, events = batch.len(), attempts = attempt,
                        "every attempt at an event batch failed: events dropped");
                    self.metrics
                        .webhook_events_dropped_total
                        .add(batch.len() as u64);
                    break;
                }
                attempt += 1;
                tokio::time::sleep(wait).await;
                wait = (wait * 2).min(longest_wait);
            }
        }
    }

    /// Waits for events, then takes up to `batch_max` of them.
    async fn take(&self, endpoint: &Destination) -> Vec<Bytes> {
        loop {
            {
                let mut queue = endpoint
                    .queue
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner);
                let n = queue.events.len().min(self.config.batch_max);
                if n > 0 {
                    let batch: Vec<Bytes> = queue.events.drain(..n).collect();
                    queue.bytes -= batch.iter().map(Bytes::len).sum::<usize>();
                    return batch;
                }
            }
            // `notify_one` keeps a permit for an emit between the check and this wait.
            endpoint.wake.notified().await;
        }
    }
}

/// `{"node":…,"events":[…]}` around the events' JSON, copied once.
fn body(node: &str, batch: &[Bytes]) -> Bytes {
    let node = serde_json::to_string(node).unwrap_or_else(|_| "\"\"".into());
    let size = batch.iter().map(|e| e.len() + 1).sum::<usize>() + node.len() + 24;
    let mut body = Vec::with_capacity(size);
    body.extend_from_slice(b"{\"node\":");
    body.extend_from_slice(node.as_bytes());
    body.extend_from_slice(b",\"events\":[");
    for (i, event) in batch.iter().enumerate() {
        if i > 0 {
            body.push(b',');
        }
        body.extend_from_slice(event);
    }
    body.extend_from_slice(b"]}");
    Bytes::from(body)
}

/// The signature header's value: `v1=` and the hex HMAC-SHA256 of `timestamp.body`.
pub fn signature(key: &hmac::Key, timestamp: u64, body: &[u8]) -> String {
    let mut ctx = hmac::Context::with_key(key);
    ctx.update(timestamp.to_string().as_bytes());
    ctx.update(b".");
    ctx.update(body);
    let tag = ctx.sign();
    let mut out = String::with_capacity(3 + 64);
    out.push_str("v1=");
    for byte in tag.as_ref() {
        out.push_str(&format!("{byte:02x}"));
    }
    out
}

/// One attempt: `Ok` on a 2xx answer.
async fn post(endpoint: &HttpSink, body: Bytes) -> Result<(), String> {
    let timestamp = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let signed = signature(&endpoint.key, timestamp, &body);
    let mut request = Request::new(Full::new(body));
    *request.method_mut() = Method::POST;
    *request.uri_mut() = endpoint.url.clone();
    let headers = request.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    headers.insert(header::USER_AGENT, HeaderValue::from_static("scalechat"));
    headers.insert("x-scalechat-timestamp", HeaderValue::from(timestamp));
    if let Ok(value) = HeaderValue::from_str(&signed) {
        headers.insert("x-scalechat-signature", value);
    }
    let answer = endpoint
        .client
        .request(request)
        .await
        .map_err(|e| e.to_string())?;
    let status = answer.status();
    // Read (a bounded part of) the answer, so the connection can carry the next batch.
    let _ = Limited::new(answer.into_body(), ANSWER_MAX).collect().await;
    if status.is_success() {
        Ok(())
    } else {
        Err(format!("answered {status}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_signature_is_hmac_sha256_of_timestamp_dot_body() {
        // RFC 4231 test case 2: key "Jefe", data "what do ya want for nothing?".
        let key = hmac::Key::new(hmac::HMAC_SHA256, b"Jefe");
        let mut ctx = hmac::Context::with_key(&key);
        ctx.update(b"what do ya want for nothing?");
        let expected = ctx.sign();
        assert_eq!(
            expected.as_ref()[..4],
            [0x5b, 0xdc, 0xc1, 0x46],
            "ring's HMAC-SHA256"
        );
        let signed = signature(&key, 1_764_288_000, b"{}");
        let mut ctx = hmac::Context::with_key(&key);
        ctx.update(b"1764288000.{}");
        let tag = ctx.sign();
        let hex: String = tag.as_ref().iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(signed, format!("v1={hex}"));
    }

    fn webhooks(queue_items: usize, events: &[&str]) -> Webhooks {
        let config = WebhooksConfig {
            endpoints: vec![crate::config::WebhookEndpoint {
                url: "http://127.0.0.1:9/hooks".into(),
                secret: "0123456789abcdef".into(),
                events: events.iter().map(|e| e.to_string()).collect(),
            }],
            queue_items,
            ..WebhooksConfig::default()
        };
        Webhooks::new(&config, "n1", Arc::new(Metrics::default()))
    }

    #[tokio::test]
    async fn a_full_queue_drops_its_oldest_events_and_counts_them() {
        let webhooks = webhooks(2, &[]);
        for id in 1..=3 {
            webhooks.emit(Event::message("dev", id, "e", "ann", 1, "hi"));
        }
        assert_eq!(webhooks.metrics.webhook_events_queued_total.get(), 3);
        assert_eq!(webhooks.metrics.webhook_events_dropped_total.get(), 1);
        let batch = webhooks.take(&webhooks.endpoints[0]).await;
        let body: serde_json::Value = serde_json::from_slice(&body("n1", &batch)).unwrap();
        assert_eq!(body["node"], "n1");
        let ids: Vec<u64> = body["events"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e["id"].as_u64().unwrap())
            .collect();
        assert_eq!(ids, [2, 3]);
    }

    #[tokio::test]
    async fn endpoints_get_only_the_types_they_asked_for() {
        let webhooks = webhooks(10, &["message", "room_vacated"]);
        assert!(webhooks.wants(EventKind::Message));
        assert!(webhooks.wants(EventKind::RoomVacated));
        assert!(!webhooks.wants(EventKind::MemberJoined));
        webhooks.emit(Event::member(EventKind::MemberJoined, "dev", "ann", 1, 1));
        assert_eq!(webhooks.metrics.webhook_events_queued_total.get(), 0);
    }

    #[test]
    fn bad_endpoints_are_refused_naming_each_key() {
        let text = r#"
            [[webhooks.endpoints]]
            url = "https://example.com/hooks"
            secret = "short"
            events = ["message", "typing"]
        "#;
        let err = crate::config::from_toml(text).unwrap_err().to_string();
        for key in ["url", "secret", "events"] {
            assert!(err.contains(&format!("webhooks.endpoints.{key}")), "{err}");
        }
        let unknown = "[[webhooks.endpoints]]\nurl = \"http://h/\"\nsecrets = \"x\"\n";
        assert!(crate::config::from_toml(unknown).is_err());
        let good =
            "[[webhooks.endpoints]]\nurl = \"http://h:9/x\"\nsecret = \"0123456789abcdef\"\n";
        let config = crate::config::from_toml(good).unwrap();
        assert_eq!(config.webhooks.endpoints.len(), 1);
        assert!(!format!("{config:?}").contains("0123456789abcdef"));
    }

    #[test]
    fn events_carry_their_type_and_key() {
        let event = Event::message("dev", 7, "abc", "ann", 1, "hi");
        let value: serde_json::Value = serde_json::from_slice(&event.json).unwrap();
        assert_eq!(value["type"], "message");
        assert_eq!(value["key"], "message:dev:abc:7");
        let left = Event::member(EventKind::MemberLeft, "dev", "ann", 5, 0);
        let value: serde_json::Value = serde_json::from_slice(&left.json).unwrap();
        assert_eq!(value["type"], "member_left");
        assert!(
            value["key"]
                .as_str()
                .unwrap()
                .starts_with("member_left:dev:ann:5:")
        );
    }
}
