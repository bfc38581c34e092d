//! The server, the top of the library: it binds the listener, builds the [`Node`], accepts
//! connections and hands each HTTP request to `http`, which routes it to the protocols
//! ([`native`](crate::native) at `/ws`, [`socketio`](crate::socketio) at `/socket.io/`).
//!
//! Shutdown: the token is cancelled, the accept loop stops, HTTP connections end gracefully,
//! every session sends Close 1001, and [`Server::run`] waits for them up to
//! `shutdown_grace_secs`.

mod http;

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::{TcpListener, TcpSocket};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn};

use crate::api::Api;
use crate::config::{Config, MetricsEndpoint};
use crate::node::Node;
use crate::socketio::EngineSessions;

/// A bound, not yet running server.
#[derive(Debug)]
pub struct Server {
    listener: TcpListener,
    /// The listener of `server.metrics_listen`, when it names an address.
    metrics_listener: Option<TcpListener>,
    node: Arc<Node>,
    /// The node's Socket.IO sessions, by id.
    socketio: Arc<EngineSessions>,
    /// The server API's keys and rate limits.
    api: Arc<Api>,
}

impl Server {
    /// Binds the listener from `config.server`; `shutdown` stops the server when cancelled.
    pub async fn bind(config: Config, shutdown: CancellationToken) -> io::Result<Self> {
        let ip: IpAddr = config.server.host.parse().map_err(|_| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                "server.host is not an IP address",
            )
        })?;
        let addr = SocketAddr::new(ip, config.server.port);
        let socket = if addr.is_ipv4() {
            TcpSocket::new_v4()?
        } else {
            TcpSocket::new_v6()?
        };
        socket.set_reuseaddr(true)?;
        socket.bind(addr)?;
        // tokio's default backlog of 1,024 drops SYNs under connection bursts.
        let listener = socket.listen(config.server.listen_backlog)?;
        let metrics_listener = match config.server.metrics_endpoint() {
            Some(MetricsEndpoint::Listen(addr)) => Some(TcpListener::bind(addr).await?),
            _ => None,
        };
        let api = Arc::new(Api::new(&config.api));
        let mut config = config;
        if config.server.internal_addr.is_empty() {
            let bound = listener.local_addr()?;
            let host = if bound.ip().is_unspecified() {
                IpAddr::from([127, 0, 0, 1])
            } else {
                bound.ip()
            };
            config.server.internal_addr = SocketAddr::new(host, bound.port()).to_string();
        }
        let node = Arc::new(Node::new(config, shutdown).await?);
        Ok(Self {
            listener,
            metrics_listener,
            node,
            socketio: Arc::default(),
            api,
        })
    }

    /// The address the listener is bound to.
    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// The address `/metrics` has its own listener at, if `server.metrics_listen` names one.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics_listener
            .as_ref()
            .and_then(|l| l.local_addr().ok())
    }

    /// The node's shared state.
    pub fn node(&self) -> &Arc<Node> {
        &self.node
    }

    /// The node's Socket.IO sessions.
    pub fn socketio(&self) -> &Arc<EngineSessions> {
        &self.socketio
    }

    /// Serves until the shutdown token is cancelled, then shuts down gracefully.
    pub async fn run(self) {
        let Server {
            listener,
            metrics_listener,
            node,
            socketio,
            api,
        } = self;
        info!(
            addr = %listener.local_addr().map(|a| a.to_string()).unwrap_or_default(),
            node = %node.id,
            transport = ?node.config.transport,
            "scalechat listening"
        );
        let http_conns = TaskTracker::new();
        if let Some(metrics_listener) = metrics_listener {
            let serve = serve_metrics(metrics_listener, node.clone(), http_conns.clone());
            http_conns.spawn(serve);
        }
        let mut http = http1::Builder::new();
        http.timer(TokioTimer::new())
            .header_read_timeout(Duration::from_secs(
                node.config.server.header_read_timeout_secs,
            ))
            .keep_alive(true);
        let mut accept_errors = AcceptErrors::default();
        loop {
            let (stream, peer) = tokio::select! {
                _ = node.shutdown.cancelled() => break,
                accepted = listener.accept() => match accepted {
                    Ok(conn) => conn,
                    Err(e) => {
                        accept_errors.backoff(e).await;
                        continue;
                    }
                },
            };
            // Chat frames are small and latency matters more than packet count.
            let _ = stream.set_nodelay(true);
            let service = {
                let node = node.clone();
                let socketio = socketio.clone();
                let api = api.clone();
                service_fn(move |req| {
                    http::route(node.clone(), socketio.clone(), api.clone(), peer, req)
                })
            };
            let conn = http
                .serve_connection(TokioIo::new(stream), service)
                .with_upgrades();
            // Upgraded sessions are no longer hyper's: they are tracked in `node.sessions`.
            http_conns.spawn(until_shutdown(
                conn,
                |conn| conn.graceful_shutdown(),
                node.shutdown.clone(),
                peer,
            ));
        }
        drop(listener);
        let grace = Duration::from_secs(node.config.server.shutdown_grace_secs);
        info!(
            connections = node.connections(),
            grace_secs = grace.as_secs(),
            "shutting down: closing every connection"
        );
        node.sessions.close();
        http_conns.close();
        let done = tokio::time::timeout(grace, async {
            http_conns.wait().await;
            node.sessions.wait().await;
        })
        .await;
        match done {
            Ok(()) => info!("shutdown complete"),
            Err(_) => warn!(
                remaining = node.connections(),
                "shutdown grace period over; dropping the remaining connections"
            ),
        }
        if let Some(archive) = &node.archive {
            // What was accepted before the shutdown is written before the process exits.
            archive.closed().await;
        }
    }
}

/// Serves `/metrics` alone on the listener of `server.metrics_listen` until shutdown.
async fn serve_metrics(listener: TcpListener, node: Arc<Node>, conns: TaskTracker) {
    info!(
        addr = %listener.local_addr().map(|a| a.to_string()).unwrap_or_default(),
        "metrics listening"
    );
    let mut http = http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(Duration::from_secs(
            node.config.server.header_read_timeout_secs,
        ));
    let mut accept_errors = AcceptErrors::default();
    loop {
        let (stream, peer) = tokio::select! {
            _ = node.shutdown.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok(conn) => conn,
                Err(e) => {
                    accept_errors.backoff(e).await;
                    continue;
                }
            },
        };
        let service = {
            let node = node.clone();
            service_fn(move |req| http::route_metrics(node.clone(), req))
        };
        let conn = http.serve_connection(TokioIo::new(stream), service);
        conns.spawn(until_shutdown(
            conn,
            |conn| conn.graceful_shutdown(),
            node.shutdown.clone(),
            peer,
        ));
    }
}

/// Serves one HTTP connection; at `shutdown`, `finish` lets it complete the request in
/// flight, and it closes.
async fn until_shutdown<C>(
    conn: C,
    finish: impl FnOnce(Pin<&mut C>),
    shutdown: CancellationToken,
    peer: SocketAddr,
) where
    C: Future<Output = hyper::Result<()>>,
{
    tokio::pin!(conn);
    let result = tokio::select! {
        result = conn.as_mut() => result,
        _ = shutdown.cancelled() => {
            finish(conn.as_mut());
            conn.await
        }
    };
    if let Err(e) = result {
        debug!(%peer, error = %e, "http connection ended with an error");
    }
}

/// Accept failures (out of file descriptors, mostly): log once a second, pause briefly so the
/// loop does not spin while the condition lasts.
#[derive(Default)]
struct AcceptErrors {
    last_log: Option<tokio::time::Instant>,
    suppressed: u64,
}

impl AcceptErrors {
    async fn backoff(&mut self, e: io::Error) {
        let now = tokio::time::Instant::now();
        if self
            .last_log
            .is_none_or(|t| now.duration_since(t) >= Duration::from_secs(1))
        {
            warn!(error = %e, suppressed = self.suppressed, "accept failed");
            self.last_log = Some(now);
            self.suppressed = 0;
        } else {
            self.suppressed += 1;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
