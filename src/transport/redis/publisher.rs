//! The connection the scripts run on: to one server (standalone, or the master the sentinels
//! named), reconnecting by itself and replaced after a timeout, or the cluster connection,
//! which routes each command to the shard owning its keys and follows `MOVED`/`ASK` and
//! failovers by itself. `None` until the node knows where Redis is (sentinel and cluster
//! modes, before their first connect).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, MutexGuard, PoisonError};

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
    /// `PING`; on a cluster, one primary's (a cluster connection sends a plain `PING` to
    /// every node, and one node down would fail it until the cluster forgets that node).
    pub(super) async fn ping(&mut self) -> redis::RedisResult<()> {
        match self {
            Self::Single(conn) => redis::cmd("PING").query_async(conn).await,
            Self::Cluster(conn) => ping_cluster(conn).await,
        }
    }
}

/// `PING` to one primary of the cluster.
pub(super) async fn ping_cluster(conn: &mut ClusterConnection) -> redis::RedisResult<()> {
    use redis::cluster_routing::{RoutingInfo, SingleNodeRoutingInfo};
    let route = RoutingInfo::SingleNode(SingleNodeRoutingInfo::RandomPrimary);
    conn.route_command(redis::cmd("PING"), route)
        .await
        .map(drop)
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
