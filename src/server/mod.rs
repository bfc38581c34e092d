//! The server: the listener and accept loop, the shared [`Node`] state, and shutdown.
//!
//! `http` routes each request (health, readiness, the WebSocket upgrade); `session` runs one
//! upgraded WebSocket connection, `reader` reading its frames and `writer` writing them.
//! Shutdown: the token is cancelled, the accept loop stops, HTTP connections end gracefully,
//! every session sends Close 1001, and [`Server::run`] waits for them up to
//! `shutdown_grace_secs`.

pub(crate) mod guard;
pub(crate) mod http;
pub(crate) mod reader;
pub(crate) mod session;
pub mod ticker;
pub(crate) mod writer;

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, PoisonError, RwLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::{TcpListener, TcpSocket};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn};

use crate::config::{Config, MetricsEndpoint, Reloadable};
use crate::hub::{ConnId, Hub};
use crate::metrics::Metrics;
use crate::protocol::native::MessageTemplate;
use crate::protocol::{ErrorCode, ProtocolError, RoomName};
use crate::transport::{Envelope, Published, Transport, dedupe_key};

/// State shared by every connection of this node.
#[derive(Debug)]
pub struct Node {
    /// The configuration the node started with. The keys that SIGHUP reloads are read from
    /// [`Node::live`] instead.
    pub config: Config,
    /// This node's name, sent in `welcome`.
    pub id: String,
    /// Rooms and local members.
    pub hub: Arc<Hub>,
    /// The message transport.
    pub transport: Transport,
    /// Counters and gauges for `/metrics`.
    pub metrics: Arc<Metrics>,
    /// Socket.IO (Engine.IO) sessions of this node, by session id.
    pub socketio: crate::socketio::Sessions,
    pub(crate) shutdown: CancellationToken,
    pub(crate) sessions: TaskTracker,
    /// Wakes connections at their ping deadlines and at the shutdown.
    pub(crate) ticker: Arc<ticker::Ticker>,
    connections: AtomicUsize,
    next_conn: AtomicU64,
    live: RwLock<Arc<Reloadable>>,
    live_version: AtomicU64,
    per_ip: Arc<guard::PerIp>,
    trusted_proxies: Vec<ipnet::IpNet>,
    pub(crate) auth: Option<guard::Auth>,
}

impl Node {
    fn new(config: Config, shutdown: CancellationToken) -> io::Result<Self> {
        let metrics = Arc::new(Metrics::default());
        let hub = Arc::new(Hub::with_metrics(metrics.clone()));
        let transport = Transport::new(&config, hub.clone(), metrics.clone())
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e.to_string()))?;
        let id = if config.server.node_id.is_empty() {
            format!("node-{:06x}", fastrand::u32(..1 << 24))
        } else {
            config.server.node_id.clone()
        };
        let ticker = Arc::new(ticker::Ticker::default());
        tokio::spawn(ticker.clone().run(shutdown.clone()));
        Ok(Self {
            ticker,
            per_ip: Arc::new(guard::PerIp::new(config.server.ipv6_prefix_len)),
            trusted_proxies: config.server.trusted_proxy_nets(),
            auth: guard::Auth::new(&config.auth),
            live: RwLock::new(Arc::new(config.reloadable())),
            live_version: AtomicU64::new(0),
            config,
            id,
            hub,
            transport,
            metrics,
            socketio: crate::socketio::Sessions::default(),
            shutdown,
            sessions: TaskTracker::new(),
            connections: AtomicUsize::new(0),
            next_conn: AtomicU64::new(1),
        })
    }

    /// Whether the node takes new clients: not shutting down, transport up.
    pub fn is_ready(&self) -> bool {
        !self.shutdown.is_cancelled() && self.transport.is_ready()
    }

    /// WebSocket connections open now.
    pub fn connections(&self) -> usize {
        self.connections.load(Ordering::Relaxed)
    }

    /// The settings SIGHUP can change: limits, allowed origins, the connection cap.
    pub fn live(&self) -> Arc<Reloadable> {
        self.live
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Bumped by every [`Node::reconfigure`]: sessions compare it to refresh their limits.
    pub(crate) fn live_version(&self) -> u64 {
        self.live_version.load(Ordering::Acquire)
    }

    /// Applies reloaded settings: new connections and the next message of open ones see them.
    pub fn reconfigure(&self, live: Reloadable) {
        *self.live.write().unwrap_or_else(PoisonError::into_inner) = Arc::new(live);
        self.live_version.fetch_add(1, Ordering::AcqRel);
    }

    /// Publishes `message` from `user` to `room` (membership, length and rate are the
    /// caller's checks): encodes it once, stamps it, times and counts the publish. A
    /// `reference` (the client's `ref`) is remembered for the dedupe window. `unavailable`
    /// when the transport refused or did not answer.
    pub(crate) async fn publish(
        &self,
        room: RoomName,
        user: &str,
        message: &str,
        reference: Option<&str>,
    ) -> Result<Published, ProtocolError> {
        let ts = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        let envelope = Envelope {
            message: MessageTemplate::new(&room, user, ts, message),
            room,
            dedupe: reference.map(|r| dedupe_key(user, r)),
        };
        let started = std::time::Instant::now();
        let published = self.transport.publish(envelope).await;
        self.metrics.publish_seconds.observe(started.elapsed());
        match published {
            Ok(p) => {
                if p.duplicate {
                    self.metrics.duplicate_sends_total.inc();
                } else {
                    self.metrics.messages_in_total.inc();
                }
                Ok(p)
            }
            Err(e) => {
                self.metrics.publish_errors_total.inc();
                Err(ProtocolError::new(ErrorCode::Unavailable, e.to_string()))
            }
        }
    }

    pub(crate) fn next_conn_id(&self) -> ConnId {
        ConnId(self.next_conn.fetch_add(1, Ordering::Relaxed))
    }

    /// Takes one of `max_connections` slots, released when the guard drops.
    pub(crate) fn reserve_slot(self: &Arc<Self>) -> Option<ConnSlot> {
        let max = self.live().max_connections;
        let taken = self.connections.fetch_add(1, Ordering::AcqRel);
        let slot = ConnSlot {
            node: self.clone(),
            _ip: None,
        };
        (taken < max).then_some(slot)
    }
}

/// One of the node's `max_connections` slots, and of its client address's.
#[derive(Debug)]
pub(crate) struct ConnSlot {
    node: Arc<Node>,
    pub(crate) _ip: Option<guard::IpSlot>,
}

impl Drop for ConnSlot {
    fn drop(&mut self) {
        self.node.connections.fetch_sub(1, Ordering::AcqRel);
    }
}

/// A bound, not yet running server.
#[derive(Debug)]
pub struct Server {
    listener: TcpListener,
    /// The listener of `server.metrics_listen`, when it names an address.
    metrics_listener: Option<TcpListener>,
    node: Arc<Node>,
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
        let node = Arc::new(Node::new(config, shutdown)?);
        Ok(Self {
            listener,
            metrics_listener,
            node,
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

    /// Serves until the shutdown token is cancelled, then shuts down gracefully.
    pub async fn run(self) {
        let Server {
            listener,
            metrics_listener,
            node,
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
                service_fn(move |req| http::route(node.clone(), peer, req))
            };
            let conn = http
                .serve_connection(TokioIo::new(stream), service)
                .with_upgrades();
            let shutdown = node.shutdown.clone();
            http_conns.spawn(async move {
                tokio::pin!(conn);
                let result = tokio::select! {
                    result = conn.as_mut() => result,
                    _ = shutdown.cancelled() => {
                        // Finish the request in flight, then close; upgraded sessions are
                        // no longer hyper's and are tracked separately.
                        conn.as_mut().graceful_shutdown();
                        conn.await
                    }
                };
                if let Err(e) = result {
                    debug!(%peer, error = %e, "http connection ended with an error");
                }
            });
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
        let shutdown = node.shutdown.clone();
        conns.spawn(async move {
            tokio::pin!(conn);
            let result = tokio::select! {
                result = conn.as_mut() => result,
                _ = shutdown.cancelled() => {
                    conn.as_mut().graceful_shutdown();
                    conn.await
                }
            };
            if let Err(e) = result {
                debug!(%peer, error = %e, "metrics connection ended with an error");
            }
        });
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
