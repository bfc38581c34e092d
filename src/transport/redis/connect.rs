//! Connecting to Redis: the client built from `[redis]` (address, database, credentials, TLS
//! with an optional CA file), the settings of the publisher's self-reconnecting connection,
//! the capped exponential backoff with jitter the subscriber reconnects with, and the errors
//! and the one log line per outage that a lost connection produces.

use std::time::Duration;

use redis::aio::ConnectionManagerConfig;
use redis::{Client, ConnectionAddr, IntoConnectionInfo, RedisError};
use tracing::{error, warn};

use crate::config::RedisConfig;

/// Reconnect backoff bounds.
const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(5);
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
    if config.tls && !config.tls_ca_file.is_empty() {
        let pem = std::fs::read(&config.tls_ca_file).map_err(|e| {
            RedisError::from(std::io::Error::new(
                e.kind(),
                format!("redis.tls_ca_file {}: {e}", config.tls_ca_file),
            ))
        })?;
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
