//! The event stream on Redis: each event appended with `XADD <stream> MAXLEN ~ <max_len> *`,
//! a batch in one pipeline, as the fields `type`, `key`, `node` and `event` (its JSON).

use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use bytes::Bytes;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};

use super::Sink;
use crate::config::EventStreamConfig;

/// How long connecting to the stream's Redis may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// A Redis stream the events are appended to.
pub(super) struct RedisStream {
    conn: ConnectionManager,
    stream: String,
    max_len: u64,
}

impl RedisStream {
    /// The stream of `config`; `None` when no URL is set. Connects at its first use.
    pub(super) fn new(config: &EventStreamConfig) -> Result<Option<Self>, redis::RedisError> {
        let url = config.redis_url.expose();
        if url.is_empty() {
            return Ok(None);
        }
        let client = redis::Client::open(url)?;
        let manager = ConnectionManagerConfig::new().set_connection_timeout(Some(CONNECT_TIMEOUT));
        Ok(Some(Self {
            conn: ConnectionManager::new_lazy_with_config(client, manager)?,
            stream: config.stream.clone(),
            max_len: config.max_len,
        }))
    }

    async fn append(&self, node: &str, batch: &[Bytes]) -> Result<(), String> {
        let mut pipe = redis::pipe();
        for event in batch {
            // The type and key, for consumers that filter without parsing the JSON.
            let (kind, key) = serde_json::from_slice::<serde_json::Value>(event)
                .ok()
                .map(|v| {
                    let field = |name: &str| v[name].as_str().unwrap_or_default().to_owned();
                    (field("type"), field("key"))
                })
                .unwrap_or_default();
            pipe.cmd("XADD")
                .arg(&self.stream)
                .arg("MAXLEN")
                .arg("~")
                .arg(self.max_len)
                .arg("*")
                .arg("type")
                .arg(kind)
                .arg("key")
                .arg(key)
                .arg("node")
                .arg(node)
                .arg("event")
                .arg(event.as_ref())
                .ignore();
        }
        let mut conn = self.conn.clone();
        pipe.query_async::<()>(&mut conn)
            .await
            .map_err(|e| e.to_string())
    }
}

impl Sink for RedisStream {
    fn describe(&self) -> String {
        format!("redis stream {}", self.stream)
    }

    fn send<'a>(
        &'a self,
        node: &'a str,
        batch: &'a [Bytes],
    ) -> Pin<Box<dyn Future<Output = Result<(), String>> + Send + 'a>> {
        Box::pin(self.append(node, batch))
    }
}
