//! Where the subscriber's messages come from: a dedicated Pub/Sub connection to one server
//! (standalone and sentinel modes), or, in cluster mode, a cluster connection (RESP3) whose
//! `SSUBSCRIBE`s the redis crate routes to the shard owning each room's slot and renews
//! after a shard's connection drops. Its pushes come through a queue bounded in items and
//! bytes: a message that does not fit is dropped, which the room's ids show as a gap that is
//! filled from the history. When a slot moves, Redis ends its sharded subscriptions
//! (`SUNSUBSCRIBE` pushed to us); the subscriber subscribes again, now on the new owner, and
//! heals the room as after any resubscription. When a shard's connection drops, the
//! subscriber connects again from the seeds.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use futures_util::StreamExt;
use futures_util::future::try_join_all;
use redis::aio::{PubSubSink, PubSubStream};
use redis::cluster::ClusterClientBuilder;
use redis::cluster_async::ClusterConnection;
use redis::{Msg, ProtocolVersion, PushInfo, PushKind, RedisError, TlsMode};
use tokio::sync::mpsc;

use super::connect::{BACKOFF_MAX, BACKOFF_MIN, CONNECT_TIMEOUT, ca_file, timeout_error};
use super::publisher::ping_cluster;
use crate::config::RedisConfig;

/// Cluster pushes waiting for the subscriber, at most.
const PUSHES_MAX: usize = 4096;
/// Bytes of cluster pushes waiting for the subscriber, at most.
const PUSH_BYTES_MAX: usize = 16 << 20;

/// The subscriber's connection.
pub(super) enum Feed {
    /// One server's Pub/Sub connection.
    Single {
        sink: PubSubSink,
        stream: PubSubStream,
    },
    /// The cluster connection and the queue of its pushes.
    Cluster {
        conn: ClusterConnection,
        pushes: mpsc::Receiver<PushInfo>,
        queued_bytes: Arc<AtomicUsize>,
    },
}

/// What [`Feed::next`] brought.
pub(super) enum Incoming {
    /// A message on a room's channel.
    Message(Msg),
    /// The cluster (re)subscribed this channel: what it missed meanwhile is to be healed.
    Subscribed(String),
    /// Redis ended this channel's subscription (its slot moved): to subscribe again.
    Unsubscribed(String),
    /// Nothing the subscriber acts on.
    Other,
    /// The connection is gone.
    Closed,
}

impl Feed {
    /// Subscribes to `channels`: `SUBSCRIBE`, or one `SSUBSCRIBE` per channel on its shard.
    pub(super) async fn subscribe(&mut self, channels: Vec<String>) -> Result<(), RedisError> {
        match self {
            Self::Single { sink, .. } => sink.subscribe(channels).await,
            Self::Cluster { conn, .. } => {
                try_join_all(channels.into_iter().map(|channel| {
                    let mut conn = conn.clone();
                    async move { conn.ssubscribe(channel).await }
                }))
                .await?;
                Ok(())
            }
        }
    }

    /// Subscribes to channels every node shares (not a room's): `SUBSCRIBE`, which a
    /// cluster delivers from whichever node a message is published on.
    pub(super) async fn subscribe_global(
        &mut self,
        channels: Vec<String>,
    ) -> Result<(), RedisError> {
        match self {
            Self::Single { sink, .. } => sink.subscribe(channels).await,
            Self::Cluster { conn, .. } => conn.subscribe(channels).await,
        }
    }

    /// Unsubscribes from `channels`.
    pub(super) async fn unsubscribe(&mut self, channels: Vec<String>) -> Result<(), RedisError> {
        match self {
            Self::Single { sink, .. } => sink.unsubscribe(channels).await,
            Self::Cluster { conn, .. } => {
                try_join_all(channels.into_iter().map(|channel| {
                    let mut conn = conn.clone();
                    async move { conn.sunsubscribe(channel).await }
                }))
                .await?;
                Ok(())
            }
        }
    }

    /// A heartbeat `PING`.
    pub(super) async fn ping(&mut self) -> Result<(), RedisError> {
        match self {
            Self::Single { sink, .. } => sink.ping::<redis::Value>().await.map(drop),
            Self::Cluster { conn, .. } => ping_cluster(conn).await,
        }
    }

    /// The next message or event. Cancel-safe: both sources are queues.
    pub(super) async fn next(&mut self) -> Incoming {
        match self {
            Self::Single { stream, .. } => match stream.next().await {
                Some(msg) => Incoming::Message(msg),
                None => Incoming::Closed,
            },
            Self::Cluster {
                pushes,
                queued_bytes,
                ..
            } => match pushes.recv().await {
                Some(push) => {
                    queued_bytes.fetch_sub(push_size(&push), Ordering::AcqRel);
                    incoming(push)
                }
                None => Incoming::Closed,
            },
        }
    }
}

fn incoming(push: PushInfo) -> Incoming {
    let channel = |push: &PushInfo| {
        push.data
            .first()
            .and_then(|c| redis::from_redis_value_ref::<String>(c).ok())
    };
    match push.kind {
        PushKind::SMessage | PushKind::Message => {
            Msg::from_push_info(push).map_or(Incoming::Other, Incoming::Message)
        }
        PushKind::SSubscribe => channel(&push).map_or(Incoming::Other, Incoming::Subscribed),
        PushKind::SUnsubscribe => channel(&push).map_or(Incoming::Other, Incoming::Unsubscribed),
        // A shard's connection dropped: its master may be gone for good, and the cluster
        // connection learns the new owner of its slots only when a command there fails, so
        // the subscriber starts over from the seeds (and heals every room).
        PushKind::Disconnection => Incoming::Closed,
        _ => Incoming::Other,
    }
}

/// Bytes a push holds, roughly: its payloads.
fn push_size(push: &PushInfo) -> usize {
    push.data
        .iter()
        .map(|v| match v {
            redis::Value::BulkString(b) => b.len(),
            _ => 16,
        })
        .sum()
}

/// A connection to the cluster `redis.host` lists the seeds of, with its push queue.
pub(super) async fn connect_cluster(config: &RedisConfig) -> Result<Feed, RedisError> {
    let seeds: Vec<redis::ConnectionInfo> = config
        .cluster_seeds()
        .unwrap_or_default()
        .into_iter()
        .map(|(host, port)| {
            use redis::IntoConnectionInfo;
            let addr = if config.tls {
                redis::ConnectionAddr::TcpTls {
                    host,
                    port,
                    insecure: false,
                    tls_params: None,
                }
            } else {
                redis::ConnectionAddr::Tcp(host, port)
            };
            addr.into_connection_info()
        })
        .collect::<Result<_, _>>()?;
    let (tx, pushes) = mpsc::channel(PUSHES_MAX);
    let queued_bytes = Arc::new(AtomicUsize::new(0));
    let counted = queued_bytes.clone();
    // Past either bound a push is dropped: the room's ids show the gap, healed from history.
    let sender = move |push: PushInfo| {
        let size = push_size(&push);
        if counted.load(Ordering::Acquire) + size > PUSH_BYTES_MAX {
            return Err(());
        }
        counted.fetch_add(size, Ordering::AcqRel);
        tx.try_send(push).map_err(|_| {
            counted.fetch_sub(size, Ordering::AcqRel);
        })
    };
    let mut builder = ClusterClientBuilder::new(seeds)
        .use_protocol(ProtocolVersion::RESP3)
        .push_sender(sender)
        .connection_timeout(CONNECT_TIMEOUT)
        .response_timeout(std::time::Duration::from_millis(config.publish_timeout_ms))
        .min_retry_wait(BACKOFF_MIN.as_millis() as u64)
        .max_retry_wait(BACKOFF_MAX.as_millis() as u64);
    if !config.username.is_empty() {
        builder = builder.username(&config.username);
    }
    if !config.password.expose().is_empty() {
        builder = builder.password(config.password.expose());
    }
    if config.tls {
        builder = builder.tls(TlsMode::Secure);
        if let Some(pem) = ca_file(config)? {
            builder = builder.certs(redis::TlsCertificates {
                client_tls: None,
                root_cert: Some(pem),
            });
        }
    }
    let client = builder.build()?;
    let conn = tokio::time::timeout(CONNECT_TIMEOUT, client.get_async_connection())
        .await
        .unwrap_or_else(|_| Err(timeout_error()))
        .map_err(|e| {
            let hint = if e.to_string().contains("cluster support disabled") {
                " (a server not in cluster mode: use redis.mode = \"standalone\" for it)"
            } else {
                ""
            };
            RedisError::from(std::io::Error::other(format!(
                "no redis cluster from the seeds {}{hint}: {e}",
                config.host
            )))
        })?;
    Ok(Feed::Cluster {
        conn,
        pushes,
        queued_bytes,
    })
}
