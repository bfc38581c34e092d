//! Connecting to Redis: the client built from `[redis]` (address, database, credentials, TLS
//! with an optional CA file), the master found through the sentinels in sentinel mode
//! ([`Locator`]), the settings of the publisher's self-reconnecting connection,
//! the capped exponential backoff with jitter the subscriber reconnects with, and the errors
//! and the one log line per outage that a lost connection produces.

use std::time::Duration;

use redis::aio::ConnectionManagerConfig;
use redis::sentinel::{SentinelClient, SentinelClientBuilder, SentinelServerType};
use redis::{Client, ConnectionAddr, IntoConnectionInfo, RedisError, TlsMode};
use tracing::{error, warn};

use crate::config::{RedisConfig, RedisMode, host_port};

/// Reconnect backoff bounds.
pub(super) const BACKOFF_MIN: Duration = Duration::from_millis(100);
pub(super) const BACKOFF_MAX: Duration = Duration::from_secs(5);
/// How long connecting may take before it counts as failed.
pub(super) const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);

/// The publisher connection's settings: it reconnects by itself with the same backoff, and a
/// command waits at most `publish_timeout` for its reply.
pub(super) fn manager_config(publish_timeout: Duration) -> ConnectionManagerConfig {
    ConnectionManagerConfig::new()
        .set_connection_timeout(Some(CONNECT_TIMEOUT))
        .set_response_timeout(Some(publish_timeout))
        .set_min_delay(BACKOFF_MIN)
        .set_max_delay(BACKOFF_MAX)
}

/// The client `[redis]` describes; it connects only when asked to.
pub(super) fn client(config: &RedisConfig) -> Result<Client, RedisError> {
    let addr = if config.tls {
        ConnectionAddr::TcpTls {
            host: config.host.clone(),
            port: config.port,
            insecure: false,
            tls_params: None,
        }
    } else {
        ConnectionAddr::Tcp(config.host.clone(), config.port)
    };
    let info = addr.into_connection_info()?;
    let mut settings = info.redis_settings().clone().set_db(i64::from(config.db));
    if !config.username.is_empty() {
        settings = settings.set_username(&config.username);
    }
    if !config.password.expose().is_empty() {
        settings = settings.set_password(config.password.expose());
    }
    let info = info.set_redis_settings(settings);
    if let Some(pem) = ca_file(config)? {
        return Client::build_with_tls(
            info,
            redis::TlsCertificates {
                client_tls: None,
                root_cert: Some(pem),
            },
        );
    }
    Client::open(info)
}

/// Where the master is: one fixed server, or whichever the sentinels name now.
pub(super) enum Locator {
    /// `redis.mode = "standalone"`.
    Fixed(Client),
    /// `redis.mode = "sentinel"`: asked at every (re)connect.
    Sentinel {
        sentinel: Box<SentinelClient>,
        master_name: String,
        /// The sentinels, as configured, for the error messages.
        sentinels: String,
        /// The master found last, `host:port`.
        current: Option<String>,
    },
    /// `redis.mode = "cluster"`: the seeds are in the settings; the cluster connection finds
    /// the shards.
    Cluster(Box<RedisConfig>),
}

/// What [`Locator::master`] found.
pub(super) struct Master {
    pub(super) client: Client,
    /// `host:port`.
    pub(super) address: String,
    /// The master before, when this is another one: a failover happened.
    pub(super) replaced: Option<String>,
}

impl Locator {
    /// The locator `[redis]` describes; it connects only when asked to.
    pub(super) fn new(config: &RedisConfig) -> Result<Self, RedisError> {
        match config.mode {
            RedisMode::Standalone => return client(config).map(Self::Fixed),
            RedisMode::Cluster => return Ok(Self::Cluster(Box::new(config.clone()))),
            RedisMode::Sentinel => {}
        }
        let (sentinel, _) = sentinel_clients(config)?;
        Ok(Self::Sentinel {
            sentinel: Box::new(sentinel),
            master_name: config.master_name.clone(),
            sentinels: config.sentinels.join(","),
            current: None,
        })
    }

    /// The master's client: the fixed one, or the one the sentinels name now (each checked
    /// with `ROLE` by the redis crate, so a demoted master is never taken for the master).
    pub(super) async fn master(&mut self) -> Result<Master, RedisError> {
        match self {
            Self::Fixed(client) => Ok(Master {
                address: client.get_connection_info().addr().to_string(),
                client: client.clone(),
                replaced: None,
            }),
            Self::Sentinel {
                sentinel,
                master_name,
                sentinels,
                current,
            } => {
                let found = tokio::time::timeout(CONNECT_TIMEOUT, sentinel.async_get_client())
                    .await
                    .unwrap_or_else(|_| Err(timeout_error()))
                    .map_err(|e| {
                        RedisError::from(std::io::Error::other(format!(
                            "no master named {master_name:?} from the sentinels {sentinels}: {e}"
                        )))
                    })?;
                let address = found.get_connection_info().addr().to_string();
                let replaced = current
                    .replace(address.clone())
                    .filter(|old| *old != address);
                Ok(Master {
                    client: found,
                    address,
                    replaced,
                })
            }
            Self::Cluster(_) => Err(RedisError::from(std::io::Error::other(
                "a cluster has no single master",
            ))),
        }
    }
}

/// The archive stream's consumer finds the master as the subscriber does, through a locator of
/// its own (asked at each of its reconnects).
impl crate::archive::stream::Locate for Locator {
    fn master(&mut self) -> futures_util::future::BoxFuture<'_, Result<Client, RedisError>> {
        Box::pin(async move { Locator::master(self).await.map(|m| m.client) })
    }
}

/// Refuses a server that standalone mode cannot use, saying what to configure: a replica
/// (read-only), a sentinel, or a Redis Cluster node. A server that does not let this user ask
/// (`ROLE` or `INFO` refused by an ACL) is taken as it is.
pub(super) async fn check_standalone(client: &Client) -> Result<(), RedisError> {
    let checked = async {
        let mut conn = client.get_multiplexed_async_connection().await?;
        let address = client.get_connection_info().addr().to_string();
        let wrong = |what: &str| {
            Err(RedisError::from(std::io::Error::other(format!(
                "redis at {address} is {what}; not ready until redis.host names a master"
            ))))
        };
        if let Ok(role) = redis::cmd("ROLE")
            .query_async::<Vec<redis::Value>>(&mut conn)
            .await
        {
            let role = role
                .first()
                .and_then(|r| redis::from_redis_value_ref::<String>(r).ok());
            match role.as_deref() {
                Some("slave" | "replica") => return wrong("a replica (read-only)"),
                Some("sentinel") => {
                    return wrong("a Sentinel: use redis.mode = \"sentinel\" with redis.sentinels");
                }
                _ => {}
            }
        }
        if let Ok(info) = redis::cmd("INFO")
            .arg("cluster")
            .query_async::<String>(&mut conn)
            .await
            && info.contains("cluster_enabled:1")
        {
            return wrong("a Redis Cluster node, which scalechat does not support");
        }
        Ok(())
    };
    tokio::time::timeout(CONNECT_TIMEOUT, checked)
        .await
        .unwrap_or_else(|_| Err(timeout_error()))
}

/// A client of the master through the sentinels, and a client of each sentinel (to listen
/// for `+switch-master` on), with TLS and its CA file as `[redis]` says and no password.
pub(super) fn sentinel_clients(
    config: &RedisConfig,
) -> Result<(SentinelClient, Vec<Client>), RedisError> {
    let addrs: Vec<ConnectionAddr> = config
        .sentinels
        .iter()
        .filter_map(|s| host_port(s))
        .map(|(host, port)| ConnectionAddr::Tcp(host.to_owned(), port))
        .collect();
    let mut builder =
        SentinelClientBuilder::new(addrs, &config.master_name, SentinelServerType::Master)?
            .set_client_to_redis_db(i64::from(config.db));
    if !config.username.is_empty() {
        builder = builder.set_client_to_redis_username(&config.username);
    }
    if !config.password.expose().is_empty() {
        builder = builder.set_client_to_redis_password(config.password.expose());
    }
    if config.tls {
        builder = builder
            .set_client_to_redis_tls_mode(TlsMode::Secure)
            .set_client_to_sentinel_tls_mode(TlsMode::Secure);
        if let Some(pem) = ca_file(config)? {
            let certs = |pem: Vec<u8>| redis::TlsCertificates {
                client_tls: None,
                root_cert: Some(pem),
            };
            builder = builder
                .set_client_to_redis_certificates(certs(pem.clone()))
                .set_client_to_sentinel_certificates(certs(pem));
        }
    }
    let pem = ca_file(config)?;
    let listeners = config
        .sentinels
        .iter()
        .filter_map(|s| host_port(s))
        .map(|(host, port)| {
            let (host, port) = (host.to_owned(), port);
            let addr = if config.tls {
                ConnectionAddr::TcpTls {
                    host,
                    port,
                    insecure: false,
                    tls_params: None,
                }
            } else {
                ConnectionAddr::Tcp(host, port)
            };
            match &pem {
                Some(pem) => Client::build_with_tls(
                    addr.into_connection_info()?,
                    redis::TlsCertificates {
                        client_tls: None,
                        root_cert: Some(pem.clone()),
                    },
                ),
                None => Client::open(addr),
            }
        })
        .collect::<Result<_, _>>()?;
    Ok((builder.build()?, listeners))
}

/// The PEM of `redis.tls_ca_file`, when TLS is on and one is given.
pub(super) fn ca_file(config: &RedisConfig) -> Result<Option<Vec<u8>>, RedisError> {
    if !config.tls || config.tls_ca_file.is_empty() {
        return Ok(None);
    }
    std::fs::read(&config.tls_ca_file).map(Some).map_err(|e| {
        RedisError::from(std::io::Error::new(
            e.kind(),
            format!("redis.tls_ca_file {}: {e}", config.tls_ca_file),
        ))
    })
}

pub(super) fn timeout_error() -> RedisError {
    RedisError::from(std::io::Error::new(
        std::io::ErrorKind::TimedOut,
        "connecting to redis timed out",
    ))
}

pub(super) fn heartbeat_error(waited: Duration) -> RedisError {
    RedisError::from(std::io::Error::new(
        std::io::ErrorKind::TimedOut,
        format!(
            "redis did not answer a heartbeat PING within {} ms",
            waited.as_millis()
        ),
    ))
}

pub(super) fn closed_error() -> RedisError {
    RedisError::from(std::io::Error::new(
        std::io::ErrorKind::ConnectionAborted,
        "redis closed the subscriber connection",
    ))
}

pub(super) fn cluster_stalled_error() -> RedisError {
    RedisError::from(std::io::Error::new(
        std::io::ErrorKind::TimedOut,
        "the redis cluster stopped answering commands; connecting again from the seeds",
    ))
}

pub(super) fn master_switched_error() -> RedisError {
    RedisError::from(std::io::Error::new(
        std::io::ErrorKind::ConnectionAborted,
        "a sentinel announced a new redis master",
    ))
}

/// One line per outage, saying what an operator should check.
pub(super) fn log_outage(e: &RedisError) {
    let text = e.to_string();
    if text.contains("WRONGPASS")
        || text.contains("NOAUTH")
        || text.contains("AuthenticationFailed")
    {
        error!(
            error = %text,
            "redis refused the credentials: check redis.username and redis.password \
             (REDIS_PASSWORD); not ready until it accepts them"
        );
    } else {
        warn!(error = %text, "redis backplane down: cross-node delivery paused, reconnecting");
    }
}

/// Capped exponential backoff with jitter: each wait is between half and all of the
/// current step, which doubles up to the cap.
#[derive(Debug)]
pub(super) struct Backoff {
    step: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Self { step: BACKOFF_MIN }
    }
}

impl Backoff {
    pub(super) fn next(&mut self) -> Duration {
        let step = self.step;
        self.step = (self.step * 2).min(BACKOFF_MAX);
        let half = step / 2;
        half + half.mul_f64(fastrand::f64())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_to_the_cap_with_jitter() {
        let mut b = Backoff::default();
        let waits: Vec<Duration> = (0..10).map(|_| b.next()).collect();
        assert!(waits[0] >= BACKOFF_MIN / 2 && waits[0] <= BACKOFF_MIN);
        assert!(waits.iter().all(|w| *w <= BACKOFF_MAX));
        assert!(waits[9] >= BACKOFF_MAX / 2);
    }
}
