//! The connection the scripts run on: to one server (standalone, or the master the sentinels
//! named), reconnecting by itself and replaced after a timeout, or the cluster connection,
//! which routes each command to the shard owning its keys and follows `MOVED`/`ASK` and
//! failovers by itself. `None` until the node knows where Redis is (sentinel and cluster
//! modes, before their first connect).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use redis::aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig};
use redis::cluster_async::ClusterConnection;
use redis::{Client, Cmd, Pipeline, RedisFuture, Value};
use tracing::{debug, warn};

use crate::transport::TransportError;

/// A connection the scripts can run on; cheap to clone (a handle).
#[derive(Clone)]
pub(super) enum Conn {
    Single(ConnectionManager),
    Cluster(ClusterConnection),
}

impl ConnectionLike for Conn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Self::Single(conn) => conn.req_packed_command(cmd),
            Self::Cluster(conn) => conn.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        cmd: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Self::Single(conn) => conn.req_packed_commands(cmd, offset, count),
            Self::Cluster(conn) => conn.req_packed_commands(cmd, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Self::Single(conn) => conn.get_db(),
            Self::Cluster(conn) => conn.get_db(),
        }
    }
}

impl Conn {
    /// `PING`; on a cluster, one primary's `CLUSTER INFO` (see [`ping_cluster`]; a cluster
    /// connection sends a plain `PING` to every node, and one node down would fail it until
    /// the cluster forgets that node).
    pub(super) async fn ping(&mut self) -> redis::RedisResult<()> {
        match self {
            Self::Single(conn) => redis::cmd("PING").query_async(conn).await,
            Self::Cluster(conn) => ping_cluster(conn).await,
        }
    }
}

/// The cluster's heartbeat: `CLUSTER INFO` of one primary, which must say `cluster_state:ok`
/// (a cluster with a slot not served, or that lost its majority, refuses every command).
pub(super) async fn ping_cluster(conn: &mut ClusterConnection) -> redis::RedisResult<()> {
    use redis::cluster_routing::{RoutingInfo, SingleNodeRoutingInfo};
    let route = RoutingInfo::SingleNode(SingleNodeRoutingInfo::RandomPrimary);
    let mut info = redis::cmd("CLUSTER");
    info.arg("INFO");
    let reply = conn.route_command(info, route).await?;
    let text: String = redis::from_redis_value(reply)?;
    if text.lines().any(|l| l.trim() == "cluster_state:ok") {
        return Ok(());
    }
    let state = text
        .lines()
        .find(|l| l.starts_with("cluster_state:"))
        .unwrap_or("cluster_state:unknown")
        .trim();
    Err(redis::RedisError::from(std::io::Error::other(format!(
        "the redis cluster is down ({state}: a slot is not served, or too few masters are \
         reachable); not ready until it is ok"
    ))))
}

/// The publisher connection, swapped when the master moves or a connection stalls.
pub(super) struct Publisher {
    /// The connection, and the client it was made from (to make another one).
    current: Mutex<Option<(Option<Client>, Conn)>>,
    manager_config: ConnectionManagerConfig,
    /// Set when the cluster connection stopped answering: the subscriber then replaces it.
    cluster_stalled: AtomicBool,
}

impl Publisher {
    /// A publisher of `client` (connecting at its first use), or of none yet.
    pub(super) fn new(
        client: Option<Client>,
        manager_config: ConnectionManagerConfig,
    ) -> Result<Self, redis::RedisError> {
        let current = match client {
            Some(client) => Some((
                Some(client.clone()),
                Conn::Single(ConnectionManager::new_lazy_with_config(
                    client,
                    manager_config.clone(),
                )?),
            )),
            None => None,
        };
        Ok(Self {
            current: Mutex::new(current),
            manager_config,
            cluster_stalled: AtomicBool::new(false),
        })
    }

    /// The connection to run a command on.
    pub(super) fn get(&self) -> Result<Conn, TransportError> {
        self.lock()
            .as_ref()
            .map(|(_, conn)| conn.clone())
            .ok_or_else(|| TransportError::Unavailable("redis: no master found yet".into()))
    }

    /// Whether there is a connection to run commands on.
    pub(super) fn has_master(&self) -> bool {
        self.lock().is_some()
    }

    /// `WAIT`s until `replicas` replicas have every write of the connection so far, within
    /// `left` (what is left of the publish timeout, `timeout` in all).
    pub(super) async fn wait_for_replicas(
        &self,
        replicas: u32,
        left: Duration,
        timeout: Duration,
    ) -> Result<(), TransportError> {
        let not_kept = || {
            TransportError::Timeout(format!(
                "redis: fewer than {replicas} replicas confirmed the message within {} ms",
                timeout.as_millis()
            ))
        };
        if left.is_zero() {
            return Err(not_kept());
        }
        let mut conn = self.get()?;
        let mut wait = redis::cmd("WAIT");
        wait.arg(replicas).arg(left.as_millis().max(1) as u64);
        // WAIT itself blocks up to `left`; the outer timeout covers a stalled connection.
        let waited = wait.query_async::<u32>(&mut conn);
        match tokio::time::timeout(left + Duration::from_millis(100), waited).await {
            Ok(Ok(acked)) if acked >= replicas => Ok(()),
            Ok(Ok(_)) | Err(_) => Err(not_kept()),
            Ok(Err(e)) => Err(TransportError::Timeout(format!("redis: {e}"))),
        }
    }

    /// Publishes through `client` from now on (the master changed); commands in flight on
    /// the old connection end as they would.
    pub(super) fn use_master(&self, client: Client) {
        self.connect(client, "redis publisher connection moved to the new master");
    }

    /// Publishes through the cluster connection `conn` from now on.
    pub(super) fn use_cluster(&self, conn: ClusterConnection) {
        *self.lock() = Some((None, Conn::Cluster(conn)));
        self.cluster_stalled.store(false, Ordering::Release);
    }

    /// Whether the cluster connection stopped answering since it was made.
    pub(super) fn cluster_stalled(&self) -> bool {
        self.cluster_stalled.load(Ordering::Acquire)
    }

    /// Swaps a single server's connection for a new one (made at its first use) after Redis
    /// stopped answering on it; commands in flight on the old one fail with a timeout, as
    /// they would. A cluster connection is marked stalled, for the subscriber to make a new
    /// one from the seeds (one that routes a shard's slots to a master that died can keep
    /// doing so until it learns the new topology).
    pub(super) fn replace(&self) {
        let client = match self.lock().as_ref() {
            Some((client, _)) => client.clone(),
            None => return,
        };
        match client {
            Some(client) => self.connect(
                client,
                "redis publisher connection replaced after a timeout",
            ),
            None => self.cluster_stalled.store(true, Ordering::Release),
        }
    }

    fn connect(&self, client: Client, why: &str) {
        match ConnectionManager::new_lazy_with_config(client.clone(), self.manager_config.clone()) {
            Ok(fresh) => {
                *self.lock() = Some((Some(client), Conn::Single(fresh)));
                debug!("{why}");
            }
            Err(e) => warn!(error = %e, "could not replace the redis publisher connection"),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Option<(Option<Client>, Conn)>> {
        self.current.lock().unwrap_or_else(PoisonError::into_inner)
    }
}
