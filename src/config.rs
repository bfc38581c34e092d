//! Configuration: the `Config` tree with its defaults, loading it from built-in defaults < TOML
//! file < `SCALECHAT_…` environment < the plain `PORT` / `REDIS_*` names (figment), and
//! validation that reports every problem at once, each naming its key.

use std::fmt;
use std::net::IpAddr;
use std::path::{Path, PathBuf};

use figment::providers::{Env, Format, Serialized, Toml};
use figment::value::{Dict, Value};
use figment::{Figment, Provider};
use ipnet::IpNet;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// The file read when `--config` is not given, if it exists.
pub const DEFAULT_CONFIG_PATH: &str = "config/scalechat.toml";

/// Prefix of the environment variables that set any key (`SCALECHAT_SERVER__PORT`).
pub const ENV_PREFIX: &str = "SCALECHAT_";

/// The longest `rooms.history_ttl_secs`: ten years.
const MAX_HISTORY_TTL_SECS: u64 = 10 * 365 * 24 * 3600;

/// The longest header a server's WebSocket frame has: 2 bytes, 8 of length, a 4-byte margin.
const MAX_FRAME_HEADER: usize = 14;

/// Plain environment names that the original app's users already set, and the keys they set.
pub const PLAIN_ENV: &[(&str, &str)] = &[
    ("PORT", "server.port"),
    ("REDIS_HOST", "redis.host"),
    ("REDIS_PORT", "redis.port"),
    ("REDIS_PASSWORD", "redis.password"),
    ("REDIS_SENTINELS", "redis.sentinels"),
    ("REDIS_MASTER_NAME", "redis.master_name"),
    ("DATABASE_URL", "archive.url"),
];

/// The whole configuration of one scalechat node.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Which transport carries messages between the hub and the rooms.
    pub transport: TransportKind,
    /// Listener, HTTP and lifecycle settings.
    pub server: ServerConfig,
    /// Per-connection limits.
    pub limits: LimitsConfig,
    /// Room history, recovery and duplicate suppression.
    pub rooms: RoomsConfig,
    /// Optional signed-token authentication.
    pub auth: AuthConfig,
    /// The Socket.IO endpoint.
    pub socketio: SocketIoConfig,
    /// The server API for the application's backend.
    pub api: ApiConfig,
    /// Signed event batches for the application's backend.
    pub webhooks: WebhooksConfig,
    /// The same events, appended to a Redis stream.
    pub event_stream: EventStreamConfig,
    /// Redis connection settings (used by the `redis` transport).
    pub redis: RedisConfig,
    /// The PostgreSQL archive (off while its URL is empty).
    pub archive: ArchiveConfig,
    /// Logging.
    pub log: LogConfig,
}

/// The message transport.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TransportKind {
    /// In-process: one node, no external service.
    #[default]
    Memory,
    /// Redis Pub/Sub: any number of nodes share rooms.
    Redis,
}

/// `[server]`: listener, HTTP and lifecycle settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ServerConfig {
    /// Address to listen on.
    pub host: String,
    /// TCP port to listen on (`PORT` in the environment). 0 picks a free port.
    pub port: u16,
    /// Name of this node, sent in `welcome`; empty means a random `node-…` name.
    pub node_id: String,
    /// The `host:port` other nodes reach this one at, to relay Socket.IO requests for its
    /// sessions; empty: `server.host` and the bound port (127.0.0.1 when `host` is
    /// 0.0.0.0 or ::, right only for nodes on one machine).
    pub internal_addr: String,
    /// WebSocket connections accepted at once; more get HTTP 503.
    pub max_connections: usize,
    /// Browser origins allowed to open a WebSocket; empty allows any.
    pub allowed_origins: Vec<String>,
    /// Time an HTTP client has to send its request headers.
    pub header_read_timeout_secs: u64,
    /// Time clients get to close after a shutdown signal before the process exits.
    pub shutdown_grace_secs: u64,
    /// Listen backlog for bursts of new connections.
    pub listen_backlog: u32,
    /// Proxies (addresses or networks) whose `X-Forwarded-For` names the client.
    pub trusted_proxies: Vec<String>,
    /// WebSocket connections one client address may hold; 0 for no limit.
    pub max_connections_per_ip: usize,
    /// Connection attempts per second one client address may make, sustained; 0 for no limit.
    pub connects_per_ip_per_second: f64,
    /// Connection attempts one client address may make in a burst.
    pub connect_burst_per_ip: u32,
    /// Leading bits of an IPv6 address that name one client for the per-address limits
    /// (32 to 128); IPv4 addresses count one by one.
    pub ipv6_prefix_len: u8,
    /// Path of a WebSocket echo endpoint for protocol-compliance testing; empty turns it off.
    pub echo_path: String,
    /// Where `/metrics` is served: empty for the main listener, `off` for nowhere, or an
    /// `address:port` of its own listener (and then not on the main one).
    pub metrics_listen: String,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            host: "0.0.0.0".into(),
            port: 8000,
            node_id: String::new(),
            internal_addr: String::new(),
            max_connections: 100_000,
            allowed_origins: Vec::new(),
            header_read_timeout_secs: 10,
            shutdown_grace_secs: 10,
            listen_backlog: 4096,
            trusted_proxies: Vec::new(),
            max_connections_per_ip: 0,
            connects_per_ip_per_second: 0.0,
            connect_burst_per_ip: 20,
            ipv6_prefix_len: 64,
            echo_path: String::new(),
            metrics_listen: String::new(),
        }
    }
}

/// Where `/metrics` is served, from `server.metrics_listen`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MetricsEndpoint {
    /// On the main listener, with everything else.
    Main,
    /// Nowhere: `/metrics` answers 404.
    Off,
    /// On a listener of its own at this address, and not on the main one.
    Listen(std::net::SocketAddr),
}

impl ServerConfig {
    /// `server.metrics_listen` parsed; `None` when it is neither empty, `off` nor an address.
    pub fn metrics_endpoint(&self) -> Option<MetricsEndpoint> {
        match self.metrics_listen.trim() {
            "" => Some(MetricsEndpoint::Main),
            "off" => Some(MetricsEndpoint::Off),
            addr => addr.parse().ok().map(MetricsEndpoint::Listen),
        }
    }

    /// `server.trusted_proxies` parsed. Checked by validation, so entries that do not parse
    /// are skipped here.
    pub fn trusted_proxy_nets(&self) -> Vec<IpNet> {
        self.trusted_proxies
            .iter()
            .filter_map(|entry| parse_net(entry))
            .collect()
    }
}

/// An address (`10.0.0.1`) or network (`10.0.0.0/8`).
pub(crate) fn parse_net(entry: &str) -> Option<IpNet> {
    entry
        .parse::<IpNet>()
        .ok()
        .or_else(|| entry.parse::<IpAddr>().ok().map(IpNet::from))
}

/// `[limits]`: what one connection may do.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LimitsConfig {
    /// Longest chat message, in characters.
    pub max_message_chars: usize,
    /// Largest WebSocket message (one frame or all fragments together), in bytes.
    pub max_frame_bytes: usize,
    /// Rooms one connection may be in at once.
    pub max_rooms_per_connection: usize,
    /// Sustained messages per second one connection may send.
    pub messages_per_second: f64,
    /// Messages one connection may send in a burst above the sustained rate.
    pub message_burst: u32,
    /// Frames queued for one connection before it is disconnected as a slow consumer.
    pub max_queued_frames: usize,
    /// Bytes queued for one connection (with the batch being written) before it is
    /// disconnected as a slow consumer; a `history` page is cut to half of this.
    pub max_queued_bytes: usize,
    /// Sustained `join`, `leave` and `history` requests per second one connection may make.
    pub requests_per_second: f64,
    /// Such requests one connection may make in a burst above the sustained rate.
    pub request_burst: u32,
    /// `send`s one connection may have in flight: read, not yet answered.
    pub publishes_in_flight: usize,
    /// Bytes of messages one connection's sends in flight may hold before it reads no more.
    pub publish_bytes_in_flight: usize,
    /// Seconds between server pings.
    pub ping_interval_secs: u64,
    /// Seconds a peer has to answer a ping (or to accept queued bytes) before it is closed.
    pub ping_timeout_secs: u64,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        Self {
            max_message_chars: 4000,
            max_frame_bytes: 64 * 1024,
            max_rooms_per_connection: 32,
            messages_per_second: 10.0,
            message_burst: 20,
            max_queued_frames: 1024,
            max_queued_bytes: 1 << 20,
            requests_per_second: 5.0,
            request_burst: 50,
            publishes_in_flight: 16,
            publish_bytes_in_flight: 64 * 1024,
            ping_interval_secs: 20,
            ping_timeout_secs: 20,
        }
    }
}

/// `[rooms]`: what each room keeps, and what a client gets when it joins.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RoomsConfig {
    /// Messages kept per room (the newest), for history on join, recovery and paging.
    pub history_size: usize,
    /// Seconds a message stays in a room's history.
    pub history_ttl_secs: u64,
    /// Newest messages a client gets when it joins without `since`.
    pub history_on_join: usize,
    /// Seconds during which a `send` repeating an accepted `ref` is acked again and not
    /// delivered twice.
    pub dedupe_window_secs: u64,
    /// Milliseconds over which presence changes are gathered into one `member_joined` and
    /// one `member_left` frame per room.
    pub presence_interval_ms: u64,
    /// Seconds after which the members of a node that stopped (crashed, cut off from Redis)
    /// are removed from every room's presence; nodes renew their presence every third of it.
    pub presence_timeout_secs: u64,
}

impl Default for RoomsConfig {
    fn default() -> Self {
        Self {
            history_size: 200,
            history_ttl_secs: 24 * 3600,
            history_on_join: 50,
            dedupe_window_secs: 300,
            presence_interval_ms: 250,
            presence_timeout_secs: 6,
        }
    }
}

/// `[auth]`: signed-token (HS256 JWT) authentication of WebSocket clients.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AuthConfig {
    /// The HS256 secret; empty turns authentication off. Masked in logs and `check-config`.
    pub jwt_secret: Secret,
    /// Seconds of clock difference allowed when checking `exp` and `nbf`.
    pub leeway_secs: u64,
    /// The `aud` a token must carry; empty: tokens carrying any `aud` are refused.
    pub jwt_audience: String,
    /// The `iss` a token must carry; empty: `iss` is not checked.
    pub jwt_issuer: String,
    /// Rooms every user may join (names, or prefixes followed by `*`), whatever their token
    /// lists and the join hook says.
    pub public_rooms: Vec<String>,
    /// An `http://` endpoint asked whether a user may join a room their token does not
    /// list (POST `{"user","room"}`, answered `{"allow": bool, "read_only": bool}`); empty:
    /// not asked.
    pub join_hook_url: String,
    /// Milliseconds the join hook has to answer; no answer in time refuses the join.
    pub join_hook_timeout_ms: u64,
    /// Seconds an answer of the join hook is kept.
    pub join_hook_cache_secs: u64,
}

impl Default for AuthConfig {
    fn default() -> Self {
        Self {
            jwt_secret: Secret::default(),
            leeway_secs: 30,
            jwt_audience: String::new(),
            jwt_issuer: String::new(),
            public_rooms: Vec::new(),
            join_hook_url: String::new(),
            join_hook_timeout_ms: 1000,
            join_hook_cache_secs: 30,
        }
    }
}

/// `[api]`: the server API at `/api/v1/` for the application's backend.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ApiConfig {
    /// The API keys (`Authorization: Bearer <key>`), at least 16 bytes each; with none (here
    /// or in `keys_file`) the API is off. Masked by `check-config`.
    pub keys: Vec<Secret>,
    /// A file of more keys, one per line (blank lines and `#` comments ignored).
    pub keys_file: String,
    /// The largest request body accepted, in bytes; larger gets 413.
    pub max_body_bytes: usize,
    /// Requests a second each key may make (sustained), and its burst.
    pub requests_per_second: f64,
    /// Requests a key may make at once before the rate applies.
    pub request_burst: u32,
    /// The user name of messages posted without one.
    pub system_name: String,
}

impl Default for ApiConfig {
    fn default() -> Self {
        Self {
            keys: Vec::new(),
            keys_file: String::new(),
            max_body_bytes: 64 * 1024,
            requests_per_second: 50.0,
            request_burst: 100,
            system_name: "system".into(),
        }
    }
}

impl ApiConfig {
    /// Every key: `keys`, then those of `keys_file`; why not, when the file cannot be read.
    pub fn all_keys(&self) -> Result<Vec<Secret>, String> {
        let mut keys = self.keys.clone();
        if !self.keys_file.is_empty() {
            let text = std::fs::read_to_string(&self.keys_file)
                .map_err(|e| format!("{}: {e}", self.keys_file))?;
            keys.extend(
                text.lines()
                    .map(str::trim)
                    .filter(|l| !l.is_empty() && !l.starts_with('#'))
                    .map(Secret::from),
            );
        }
        Ok(keys)
    }
}

/// `[webhooks]`: endpoints that receive signed batches of chat events (docs/webhooks.md).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct WebhooksConfig {
    /// The endpoints; none: no events are gathered at all.
    pub endpoints: Vec<WebhookEndpoint>,
    /// Events each endpoint's queue holds, at most; past it the oldest is dropped.
    pub queue_items: usize,
    /// Bytes of events each endpoint's queue holds, at most; past it the oldest are dropped.
    pub queue_bytes: usize,
    /// Events sent in one request, at most.
    pub batch_max: usize,
    /// How long a request may take, answer included, before it counts as failed.
    pub timeout_ms: u64,
    /// Attempts at one batch (the first included) before it is dropped.
    pub max_attempts: u32,
    /// The wait before the first retry; doubled after each failure up to `retry_max_ms`.
    pub retry_initial_ms: u64,
    /// The longest wait between two attempts.
    pub retry_max_ms: u64,
}

impl Default for WebhooksConfig {
    fn default() -> Self {
        Self {
            endpoints: Vec::new(),
            queue_items: 10_000,
            queue_bytes: 8 << 20,
            batch_max: 100,
            timeout_ms: 5_000,
            max_attempts: 8,
            retry_initial_ms: 500,
            retry_max_ms: 30_000,
        }
    }
}

/// One `[[webhooks.endpoints]]`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct WebhookEndpoint {
    /// Where batches are `POST`ed: an `http://` URL (put a TLS proxy in front for https).
    pub url: String,
    /// The HMAC-SHA256 key of the signature, at least 16 bytes. Masked by `check-config`.
    pub secret: Secret,
    /// The event types sent (`message`, `room_occupied`, `room_vacated`, `member_joined`,
    /// `member_left`); empty: all of them.
    pub events: Vec<String>,
}

/// `[event_stream]`: the webhooks' events, appended to a Redis stream for analytics and
/// logging, with the queue, batch and retry settings of `[webhooks]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct EventStreamConfig {
    /// `redis://[user:password@]host:port[/db]`; empty: no stream. Masked by `check-config`.
    pub redis_url: Secret,
    /// The stream's key.
    pub stream: String,
    /// Entries the stream keeps, about (`XADD … MAXLEN ~`).
    pub max_len: u64,
    /// The event types appended; empty: all.
    pub events: Vec<String>,
}

impl Default for EventStreamConfig {
    fn default() -> Self {
        Self {
            redis_url: Secret::default(),
            stream: "scalechat:events".into(),
            max_len: 1_000_000,
            events: Vec::new(),
        }
    }
}

/// The event types a webhook endpoint may ask for.
pub const WEBHOOK_EVENTS: [&str; 5] = [
    "message",
    "room_occupied",
    "room_vacated",
    "member_joined",
    "member_left",
];

/// `[socketio]`: the Socket.IO endpoint at `/socket.io/`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SocketIoConfig {
    /// Seconds an Engine.IO session has to connect to the namespace (a valid CONNECT, with
    /// its token when authentication is on) before it is closed.
    pub connect_timeout_secs: u64,
    /// Send a joining Socket.IO client the room's newest messages (`rooms.history_on_join`)
    /// as `message` events after `joined`, as native clients get them. Off keeps the original
    /// app's contract: live messages only.
    pub history_on_join: bool,
    /// Seconds a disconnected Socket.IO session can be recovered (socket.io-client's
    /// connection-state recovery: its rooms back and every message it missed, on any node);
    /// 0 turns recovery off.
    pub recovery_secs: u64,
}

impl Default for SocketIoConfig {
    fn default() -> Self {
        Self {
            connect_timeout_secs: 5,
            history_on_join: false,
            recovery_secs: 120,
        }
    }
}

/// `[redis]`: how to reach Redis.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RedisConfig {
    /// Redis host (`REDIS_HOST`).
    pub host: String,
    /// Redis port (`REDIS_PORT`).
    pub port: u16,
    /// Redis ACL user name; empty for the default user.
    pub username: String,
    /// Redis password (`REDIS_PASSWORD`); masked in logs and `check-config`.
    pub password: Secret,
    /// Redis database number.
    pub db: u32,
    /// Connect with TLS (`rediss://`), verifying the server's certificate.
    pub tls: bool,
    /// PEM file of the certificate authorities to trust for TLS instead of the built-in
    /// Mozilla roots; empty for the built-in ones.
    pub tls_ca_file: String,
    /// Prefix of every channel and key, so several deployments can share one Redis.
    pub channel_prefix: String,
    /// How long a `send` waits for Redis before it is refused with `unavailable`.
    pub publish_timeout_ms: u64,
    /// How long a node stays subscribed to a room after its last local member left.
    pub unsubscribe_linger_secs: u64,
    /// Seconds between heartbeat `PING`s on the subscriber connection.
    pub heartbeat_secs: u64,
    /// How far behind, in milliseconds, the subscriber may fall (the age of its backlog, as a
    /// probe the node publishes to itself measures it) before its connection is dropped,
    /// re-established and healed from the history.
    pub subscriber_lag_max_ms: u64,
    /// Keep each subscribed room's newest `rooms.history_on_join` messages in memory and
    /// answer joins and short reconnects from them, without a Redis round trip.
    pub local_history: bool,
    /// How the node finds Redis: one server, a master through Sentinel, or a Cluster.
    pub mode: RedisMode,
    /// With `mode = "sentinel"`: the sentinels' `host:port`s (`REDIS_SENTINELS`, comma
    /// separated).
    #[serde(deserialize_with = "list_or_commas")]
    pub sentinels: Vec<String>,
    /// With `mode = "sentinel"`: the name the sentinels monitor the master under
    /// (`REDIS_MASTER_NAME`).
    pub master_name: String,
    /// Replicas that must have a message (`WAIT`) before its `send` is acked; 0: the
    /// master's word is enough.
    pub wait_replicas: u32,
    /// Share presence through Redis: counts, member lists and events over every node. Off,
    /// each node reports its own members only and joins write nothing for presence.
    pub presence: bool,
}

/// `redis.mode`: where the node's Redis is.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RedisMode {
    /// One server at `redis.host`:`redis.port`.
    #[default]
    Standalone,
    /// The master the sentinels in `redis.sentinels` name `redis.master_name`, followed
    /// through failovers.
    Sentinel,
    /// A Redis Cluster found from the seeds in `redis.host` (comma separated, each `host` or
    /// `host:port`), rooms spread over its shards with sharded Pub/Sub.
    Cluster,
}

impl RedisConfig {
    /// `redis.host` as the list of `host:port` seeds cluster mode starts from (a seed without
    /// a port gets `redis.port`); `None` when one is not an address.
    pub fn cluster_seeds(&self) -> Option<Vec<(String, u16)>> {
        self.host
            .split(',')
            .map(str::trim)
            .filter(|seed| !seed.is_empty())
            .map(|seed| match host_port(seed) {
                Some((host, port)) => Some((host.to_owned(), port)),
                None if !seed.contains(':') => Some((seed.to_owned(), self.port)),
                None => None,
            })
            .collect()
    }
}

/// A list written as a TOML list or as one comma-separated string (as environment
/// variables are).
fn list_or_commas<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Either {
        List(Vec<String>),
        Text(String),
    }
    let items = match Either::deserialize(d)? {
        Either::List(items) => items,
        Either::Text(text) => text.split(',').map(str::to_owned).collect(),
    };
    Ok(items
        .into_iter()
        .map(|item| item.trim().to_owned())
        .filter(|item| !item.is_empty())
        .collect())
}

impl Default for RedisConfig {
    fn default() -> Self {
        Self {
            host: "127.0.0.1".into(),
            port: 6379,
            username: String::new(),
            password: Secret::default(),
            db: 0,
            tls: false,
            tls_ca_file: String::new(),
            channel_prefix: "scalechat".into(),
            publish_timeout_ms: 2000,
            unsubscribe_linger_secs: 5,
            heartbeat_secs: 5,
            subscriber_lag_max_ms: 5000,
            local_history: true,
            mode: RedisMode::Standalone,
            sentinels: Vec::new(),
            master_name: String::new(),
            wait_replicas: 0,
            presence: true,
        }
    }
}

/// `[archive]`: the PostgreSQL archive, every accepted message kept once. Off while `url` is
/// empty (`DATABASE_URL` sets it).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ArchiveConfig {
    /// libpq URL of the database (`DATABASE_URL`); empty turns the archive off. Its password
    /// is masked in logs and `check-config`.
    pub url: DatabaseUrl,
    /// Connections to PostgreSQL the node keeps at most.
    pub pool_size: usize,
    /// Messages waiting to be written at most; past it a message is not queued (counted).
    pub queue_max_messages: usize,
    /// Bytes of messages (room, user, text, epoch) waiting to be written at most.
    pub queue_max_bytes: usize,
    /// Messages written by one `INSERT` at most.
    pub batch_max_messages: usize,
    /// Days a message is kept; 0 keeps every message forever.
    pub retention_days: u64,
    /// Apply the schema's migrations at start (under an advisory lock); `false` leaves them to
    /// `scalechat migrate`.
    pub migrate_on_start: bool,
    /// Seconds to wait for a connection to PostgreSQL, and for one statement.
    pub timeout_secs: u64,
}

impl Default for ArchiveConfig {
    fn default() -> Self {
        Self {
            url: DatabaseUrl::default(),
            pool_size: 4,
            queue_max_messages: 100_000,
            queue_max_bytes: 64 << 20,
            batch_max_messages: 1000,
            retention_days: 0,
            migrate_on_start: true,
            timeout_secs: 10,
        }
    }
}

impl ArchiveConfig {
    /// Whether the archive is on.
    pub fn enabled(&self) -> bool {
        !self.url.expose().is_empty()
    }
}

/// A PostgreSQL URL (`postgres://user:password@host:port/database?options`): shown with its
/// password masked in `Debug`, logs and `check-config`.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct DatabaseUrl(String);

impl DatabaseUrl {
    /// The URL itself, password included, for the one place that connects.
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// The URL with its password (in the user part or a `password` parameter) masked.
    pub fn masked(&self) -> String {
        mask_url(&self.0)
    }

    /// The connection settings the URL gives, or why it is not a usable PostgreSQL URL (the
    /// reason never quotes the URL).
    pub fn parse(&self) -> Result<tokio_postgres::Config, String> {
        let url = self.0.as_str();
        if !(url.starts_with("postgres://") || url.starts_with("postgresql://")) {
            return Err("must be a URL starting with postgres:// or postgresql://".into());
        }
        let config: tokio_postgres::Config = url.parse().map_err(|e| format!("{e}"))?;
        if config.get_hosts().is_empty() {
            return Err("must name a host, as in postgres://user@db.example.com/chat".into());
        }
        if config
            .get_hosts()
            .iter()
            .any(|h| !matches!(h, tokio_postgres::config::Host::Tcp(_)))
        {
            return Err("must name hosts reached over TCP, not Unix socket directories".into());
        }
        if config.get_ssl_mode() == tokio_postgres::config::SslMode::Require {
            return Err(
                "sslmode=require is not supported: scalechat connects without TLS \
                 (use sslmode=disable or prefer, on a private network or through a TLS tunnel)"
                    .into(),
            );
        }
        Ok(config)
    }
}

impl From<&str> for DatabaseUrl {
    fn from(s: &str) -> Self {
        Self(s.to_owned())
    }
}

impl fmt::Debug for DatabaseUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", self.masked())
    }
}

impl Serialize for DatabaseUrl {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.masked())
    }
}

impl<'de> Deserialize<'de> for DatabaseUrl {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d).map(Self)
    }
}

/// `url` with the password of its user part and of a `password` parameter replaced by
/// `********`. What is not a URL is masked whole: a password in it could not be told apart.
fn mask_url(url: &str) -> String {
    const MASK: &str = "********";
    if url.is_empty() {
        return String::new();
    }
    let Some(scheme_end) = url.find("://").map(|at| at + 3) else {
        return MASK.into();
    };
    let (scheme, rest) = url.split_at(scheme_end);
    let authority_end = rest.find(['/', '?']).unwrap_or(rest.len());
    let (authority, tail) = rest.split_at(authority_end);
    let mut out = String::from(scheme);
    match authority.rfind('@') {
        Some(at) => {
            let userinfo = &authority[..at];
            match userinfo.find(':') {
                Some(colon) => {
                    out.push_str(&userinfo[..=colon]);
                    out.push_str(MASK);
                }
                None => out.push_str(userinfo),
            }
            out.push_str(&authority[at..]);
        }
        None => out.push_str(authority),
    }
    match tail.split_once('?') {
        Some((path, query)) => {
            out.push_str(path);
            out.push('?');
            let params: Vec<String> = query
                .split('&')
                .map(|param| match param.split_once('=') {
                    Some((key, _)) if key.eq_ignore_ascii_case("password") => {
                        format!("{key}={MASK}")
                    }
                    _ => param.to_owned(),
                })
                .collect();
            out.push_str(&params.join("&"));
        }
        None => out.push_str(tail),
    }
    out
}

/// `[log]`: log level and format.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LogConfig {
    /// Level or filter (`info`, `scalechat=debug`); `RUST_LOG` overrides it.
    pub level: String,
    /// `text` for people, `json` for log collectors.
    pub format: LogFormat,
}

impl Default for LogConfig {
    fn default() -> Self {
        Self {
            level: "info".into(),
            format: LogFormat::Text,
        }
    }
}

/// Log line format.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

/// A secret string: shown as `********` in `Debug`, logs and `check-config`.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    /// The secret itself, for the one place that needs it.
    pub fn expose(&self) -> &str {
        &self.0
    }

    fn masked(&self) -> &'static str {
        if self.0.is_empty() { "" } else { "********" }
    }
}

impl From<&str> for Secret {
    fn from(s: &str) -> Self {
        Self(s.to_owned())
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", self.masked())
    }
}

impl Serialize for Secret {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.masked())
    }
}

impl<'de> Deserialize<'de> for Secret {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        // The environment provider parses `REDIS_PASSWORD=1234` as a number: a password is
        // whatever was written, so take any scalar as its text.
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Scalar {
            Text(String),
            Int(i64),
            Float(f64),
            Bool(bool),
        }
        Ok(Secret(match Scalar::deserialize(d)? {
            Scalar::Text(s) => s,
            Scalar::Int(n) => n.to_string(),
            Scalar::Float(n) => n.to_string(),
            Scalar::Bool(b) => b.to_string(),
        }))
    }
}

/// `host:port` split, the port a number from 1 to 65535.
pub fn host_port(address: &str) -> Option<(&str, u16)> {
    let (host, port) = address.rsplit_once(':')?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let port = port.parse().ok().filter(|p| *p > 0)?;
    (!host.is_empty()).then_some((host, port))
}

/// Every problem found while loading the configuration.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file named with `--config` does not exist.
    #[error("config file {0} not found")]
    NotFound(PathBuf),
    /// The file or environment could not be read (TOML syntax, for one).
    #[error("{0}")]
    Unreadable(String),
    /// Keys that are unknown or whose values are invalid: one line each.
    #[error("{}", .0.join("\n"))]
    Invalid(Vec<String>),
}

/// Loads the configuration: defaults < TOML file < environment.
///
/// `path` is the `--config` argument; without it [`DEFAULT_CONFIG_PATH`] is read if present.
pub fn load(path: Option<&Path>) -> Result<Config, ConfigError> {
    let file = match path {
        Some(p) if !p.exists() => return Err(ConfigError::NotFound(p.to_owned())),
        Some(p) => Some(p.to_owned()),
        None => Some(PathBuf::from(DEFAULT_CONFIG_PATH)).filter(|p| p.exists()),
    };
    let mut user = Figment::new();
    if let Some(file) = &file {
        user = user.merge(Toml::file_exact(file));
    }
    // Setting REDIS_HOST, as users of the original app do, means "use Redis", over the file
    // (whose example sets "memory"); SCALECHAT_TRANSPORT still decides when set.
    if std::env::var_os("REDIS_HOST").is_some_and(|h| !h.is_empty()) {
        user = user.merge(Serialized::default("transport", "redis"));
    }
    user = user.merge(Env::prefixed(ENV_PREFIX).split("__"));
    for (var, key) in PLAIN_ENV {
        user = user.merge(Env::raw().only(&[var]).map(move |_| (*key).into()));
    }
    from_figment(&user)
}

/// Parses configuration from TOML text alone (defaults for what it leaves out).
pub fn from_toml(text: &str) -> Result<Config, ConfigError> {
    from_figment(&Figment::from(Toml::string(text)))
}

/// Extracts and validates a [`Config`] from user-provided sources layered over the defaults.
fn from_figment(user: &Figment) -> Result<Config, ConfigError> {
    let user_data = user
        .data()
        .map_err(|e| ConfigError::Unreadable(e.to_string()))?;
    let defaults = Value::serialize(Config::default())
        .ok()
        .and_then(|v| v.into_dict())
        .unwrap_or_default();
    let mut problems = Vec::new();
    let mut set_keys = Vec::new();
    for dict in user_data.values() {
        walk_keys(dict, &defaults, "", &mut set_keys, &mut problems, user);
    }
    let figment = Figment::from(Serialized::defaults(Config::default())).merge(user.clone());
    let config = match figment.extract::<Config>() {
        Ok(config) => Some(config),
        Err(_) => {
            // Extraction stops at the first bad value; try each key alone to name them all,
            // then validate the keys that parsed, so their problems are reported too.
            set_keys.sort_by(|a, b| a.0.cmp(&b.0));
            set_keys.dedup_by(|a, b| a.0 == b.0);
            let mut parsed = Figment::from(Serialized::defaults(Config::default()));
            for (key, value) in set_keys {
                let one = Figment::from(Serialized::defaults(Config::default()))
                    .merge(Serialized::default(&key, &value));
                match one.extract::<Config>() {
                    Ok(_) => parsed = parsed.merge(Serialized::default(&key, value)),
                    Err(e) => problems.push(format!("{key}: {}{}", e.kind, source_of(user, &key))),
                }
            }
            if let Ok(config) = parsed.extract::<Config>() {
                problems.extend(config.validate());
            }
            None
        }
    };
    if let Some(config) = &config {
        problems.extend(config.validate());
    }
    match config {
        Some(config) if problems.is_empty() => Ok(config),
        _ => {
            problems.dedup();
            Err(ConfigError::Invalid(problems))
        }
    }
}

/// Collects the leaf keys the user set, and reports those the defaults do not know.
fn walk_keys(
    dict: &Dict,
    known: &Dict,
    prefix: &str,
    leaves: &mut Vec<(String, Value)>,
    problems: &mut Vec<String>,
    user: &Figment,
) {
    for (name, value) in dict {
        let key = if prefix.is_empty() {
            name.clone()
        } else {
            format!("{prefix}.{name}")
        };
        match (known.get(name), value) {
            (None, _) => problems.push(format!("{key}: unknown key{}", source_of(user, &key))),
            (Some(Value::Dict(_, inner_known)), Value::Dict(_, inner)) => {
                walk_keys(inner, inner_known, &key, leaves, problems, user)
            }
            _ => leaves.push((key, value.clone())),
        }
    }
}

/// " (in …)": where a key's value came from, for error messages.
fn source_of(user: &Figment, key: &str) -> String {
    let Some(md) = user.find_metadata(key) else {
        return String::new();
    };
    let keys: Vec<&str> = key.split('.').collect();
    match &md.source {
        Some(source) => format!(" (in {} {})", md.name, source),
        None => format!(
            " (in {}: {})",
            md.name,
            md.interpolate(&figment::Profile::Default, &keys)
        ),
    }
}

impl Config {
    /// Checks values that parse but make no sense; one line per problem, naming the key.
    pub fn validate(&self) -> Vec<String> {
        let mut p = Vec::new();
        let mut check = |ok: bool, key: &str, why: &str| {
            if !ok {
                p.push(format!("{key}: {why}"));
            }
        };
        let s = &self.server;
        check(
            s.host.parse::<std::net::IpAddr>().is_ok(),
            "server.host",
            "must be an IP address such as 0.0.0.0 or 127.0.0.1",
        );
        check(
            s.max_connections > 0,
            "server.max_connections",
            "must be at least 1",
        );
        check(
            s.header_read_timeout_secs > 0,
            "server.header_read_timeout_secs",
            "must be at least 1",
        );
        check(
            s.listen_backlog > 0,
            "server.listen_backlog",
            "must be at least 1",
        );
        check(
            s.node_id.len() <= 64 && !s.node_id.chars().any(char::is_control),
            "server.node_id",
            "must be at most 64 bytes with no control characters",
        );
        check(
            s.internal_addr.is_empty()
                || s.internal_addr.parse::<std::net::SocketAddr>().is_ok()
                || s.internal_addr
                    .rsplit_once(':')
                    .is_some_and(|(host, port)| !host.is_empty() && port.parse::<u16>().is_ok()),
            "server.internal_addr",
            "must be empty or host:port",
        );
        for proxy in &s.trusted_proxies {
            check(
                parse_net(proxy).is_some(),
                "server.trusted_proxies",
                "each entry must be an IP address or network such as 10.0.0.0/8",
            );
        }
        check(
            s.connects_per_ip_per_second.is_finite() && s.connects_per_ip_per_second >= 0.0,
            "server.connects_per_ip_per_second",
            "must be 0 (no limit) or a positive number",
        );
        check(
            s.echo_path.is_empty()
                || (s.echo_path.starts_with('/')
                    && !["/", "/ws", "/healthz", "/readyz", "/metrics"]
                        .contains(&s.echo_path.as_str())
                    && crate::web::asset(&s.echo_path).is_none()),
            "server.echo_path",
            "must be empty or a path such as /echo that no other endpoint uses",
        );
        check(
            s.connect_burst_per_ip > 0,
            "server.connect_burst_per_ip",
            "must be at least 1",
        );
        check(
            (32..=128).contains(&s.ipv6_prefix_len),
            "server.ipv6_prefix_len",
            "must be from 32 to 128",
        );
        check(
            s.metrics_endpoint().is_some(),
            "server.metrics_listen",
            "must be empty (the main listener), off, or an address and port such as 127.0.0.1:9100",
        );
        let a = &self.auth;
        check(
            a.jwt_secret.expose().is_empty() || a.jwt_secret.expose().len() >= 32,
            "auth.jwt_secret",
            "must be empty (no authentication) or at least 32 bytes",
        );
        for pattern in &a.public_rooms {
            check(
                crate::protocol::RoomPattern::parse(pattern).is_some(),
                "auth.public_rooms",
                &format!("{pattern:?} is not a room name or a prefix followed by *"),
            );
        }
        check(
            a.join_hook_url.is_empty()
                || a.join_hook_url
                    .parse::<hyper::Uri>()
                    .is_ok_and(|u| u.scheme_str() == Some("http") && u.host().is_some()),
            "auth.join_hook_url",
            "must be empty or an http:// URL",
        );
        check(
            (1..=60_000).contains(&a.join_hook_timeout_ms),
            "auth.join_hook_timeout_ms",
            "must be 1 to 60000",
        );
        let api = &self.api;
        match api.all_keys() {
            Ok(keys) => check(
                keys.iter().all(|k| k.expose().len() >= 16),
                "api.keys",
                "every key (here and in api.keys_file) must be at least 16 bytes",
            ),
            Err(why) => check(false, "api.keys_file", &format!("cannot be read: {why}")),
        }
        check(
            (1..=16 << 20).contains(&api.max_body_bytes),
            "api.max_body_bytes",
            "must be 1 to 16777216",
        );
        check(
            api.requests_per_second > 0.0 && api.request_burst > 0,
            "api.requests_per_second",
            "and api.request_burst must be above 0",
        );
        check(
            crate::protocol::valid_user_name(&api.system_name),
            "api.system_name",
            "must be a valid display name",
        );
        let w = &self.webhooks;
        for endpoint in &w.endpoints {
            check(
                endpoint.url.starts_with("http://")
                    && endpoint
                        .url
                        .parse::<hyper::Uri>()
                        .is_ok_and(|u| u.host().is_some()),
                "webhooks.endpoints.url",
                "must be an http:// URL such as http://127.0.0.1:9000/hooks",
            );
            check(
                endpoint.secret.expose().len() >= 16,
                "webhooks.endpoints.secret",
                "must be at least 16 bytes",
            );
            check(
                endpoint
                    .events
                    .iter()
                    .all(|e| WEBHOOK_EVENTS.contains(&e.as_str())),
                "webhooks.endpoints.events",
                "each must be one of message, room_occupied, room_vacated, member_joined, member_left",
            );
        }
        let e = &self.event_stream;
        let url = e.redis_url.expose();
        check(
            url.is_empty()
                || ((url.starts_with("redis://") || url.starts_with("rediss://"))
                    && redis::Client::open(url).is_ok()),
            "event_stream.redis_url",
            "must be empty or a URL such as redis://127.0.0.1:6379/0",
        );
        check(
            !e.stream.is_empty() && e.max_len > 0,
            "event_stream.stream",
            "must not be empty, and event_stream.max_len must be at least 1",
        );
        check(
            e.events
                .iter()
                .all(|k| WEBHOOK_EVENTS.contains(&k.as_str())),
            "event_stream.events",
            "each must be one of message, room_occupied, room_vacated, member_joined, member_left",
        );
        check(
            w.queue_items > 0 && w.queue_bytes >= 64 * 1024,
            "webhooks.queue_items",
            "must be at least 1, and webhooks.queue_bytes at least 65536",
        );
        check(
            (1..=10_000).contains(&w.batch_max),
            "webhooks.batch_max",
            "must be 1 to 10000",
        );
        check(
            (1..=600_000).contains(&w.timeout_ms),
            "webhooks.timeout_ms",
            "must be 1 to 600000",
        );
        check(
            w.max_attempts > 0,
            "webhooks.max_attempts",
            "must be at least 1",
        );
        check(
            w.retry_initial_ms > 0 && w.retry_initial_ms <= w.retry_max_ms,
            "webhooks.retry_initial_ms",
            "must be at least 1 and at most webhooks.retry_max_ms",
        );
        check(
            self.socketio.connect_timeout_secs > 0,
            "socketio.connect_timeout_secs",
            "must be at least 1",
        );
        for origin in &s.allowed_origins {
            check(
                origin.starts_with("http://") || origin.starts_with("https://"),
                "server.allowed_origins",
                "each entry must be an origin such as https://chat.example.com",
            );
        }
        let r = &self.redis;
        check(!r.host.is_empty(), "redis.host", "must not be empty");
        check(
            r.port > 0,
            "redis.port",
            "must be a port number from 1 to 65535",
        );
        check(
            !r.channel_prefix.is_empty()
                && r.channel_prefix.len() <= 64
                && !r.channel_prefix.contains(char::is_whitespace),
            "redis.channel_prefix",
            "must be 1 to 64 characters without spaces",
        );
        check(
            r.heartbeat_secs > 0,
            "redis.heartbeat_secs",
            "must be at least 1",
        );
        check(
            r.publish_timeout_ms > 0,
            "redis.publish_timeout_ms",
            "must be at least 1",
        );
        check(
            (1..=600_000).contains(&r.subscriber_lag_max_ms),
            "redis.subscriber_lag_max_ms",
            "must be from 1 to 600000",
        );
        check(
            r.mode != RedisMode::Sentinel
                || (!r.sentinels.is_empty() && r.sentinels.iter().all(|s| host_port(s).is_some())),
            "redis.sentinels",
            "with redis.mode = \"sentinel\", must list the sentinels as host:port",
        );
        check(
            r.mode != RedisMode::Sentinel || !r.master_name.is_empty(),
            "redis.master_name",
            "with redis.mode = \"sentinel\", must name the master the sentinels monitor",
        );
        let cluster = r.mode == RedisMode::Cluster;
        check(
            !cluster || r.cluster_seeds().is_some_and(|seeds| !seeds.is_empty()),
            "redis.host",
            "with redis.mode = \"cluster\", must list the seeds as host or host:port, comma separated",
        );
        check(
            !cluster || r.db == 0,
            "redis.db",
            "must be 0 with redis.mode = \"cluster\" (a cluster has one database)",
        );
        check(
            !cluster || !r.channel_prefix.contains(['{', '}']),
            "redis.channel_prefix",
            "must not contain { or } with redis.mode = \"cluster\" (rooms are hash tags)",
        );
        check(
            r.wait_replicas <= 16,
            "redis.wait_replicas",
            "must be at most 16",
        );
        let h = &self.rooms;
        check(
            h.history_size <= 100_000,
            "rooms.history_size",
            "must be at most 100000",
        );
        check(
            h.history_on_join <= h.history_size,
            "rooms.history_on_join",
            "must be at most rooms.history_size",
        );
        check(
            h.history_ttl_secs > 0,
            "rooms.history_ttl_secs",
            "must be at least 1",
        );
        check(
            (10..=10_000).contains(&h.presence_interval_ms),
            "rooms.presence_interval_ms",
            "must be 10 to 10000",
        );
        check(
            (3..=3600).contains(&h.presence_timeout_secs),
            "rooms.presence_timeout_secs",
            "must be 3 to 3600",
        );
        // Redis takes expiry times in milliseconds as a signed 64-bit count from now.
        check(
            h.history_ttl_secs <= MAX_HISTORY_TTL_SECS,
            "rooms.history_ttl_secs",
            "must be at most 315360000 (ten years)",
        );
        check(
            r.tls_ca_file.is_empty()
                || std::fs::metadata(&r.tls_ca_file).is_ok_and(|m| m.is_file()),
            "redis.tls_ca_file",
            "must be empty or a readable PEM file",
        );
        let a = &self.archive;
        if a.enabled()
            && let Err(why) = a.url.parse()
        {
            check(false, "archive.url", &why);
        }
        check(
            !a.enabled()
                || self.transport != TransportKind::Redis
                || self.redis.mode != RedisMode::Cluster,
            "archive.url",
            "the archive does not serve redis.mode = \"cluster\" (its stream is one key, on one \
             shard, which the publish scripts on the rooms' shards cannot write to); use \
             \"standalone\" or \"sentinel\"",
        );
        check(
            (1..=64).contains(&a.pool_size),
            "archive.pool_size",
            "must be from 1 to 64",
        );
        check(
            a.queue_max_messages >= 1,
            "archive.queue_max_messages",
            "must be at least 1",
        );
        check(
            a.queue_max_bytes >= 64 * 1024
                && a.queue_max_bytes / 8 >= self.limits.max_message_chars
                && a.queue_max_bytes <= 1 << 32,
            "archive.queue_max_bytes",
            "must be from 65536 (and 8 x limits.max_message_chars) to 4294967296",
        );
        check(
            (1..=10_000).contains(&a.batch_max_messages),
            "archive.batch_max_messages",
            "must be from 1 to 10000",
        );
        check(
            a.retention_days <= 36_500,
            "archive.retention_days",
            "must be 0 (keep forever) or at most 36500",
        );
        check(
            a.timeout_secs > 0,
            "archive.timeout_secs",
            "must be at least 1",
        );
        let l = &self.limits;
        check(
            l.max_message_chars > 0,
            "limits.max_message_chars",
            "must be at least 1",
        );
        check(
            l.max_frame_bytes >= 125 && l.max_frame_bytes <= 16 << 20,
            "limits.max_frame_bytes",
            "must be between 125 and 16777216",
        );
        check(
            l.max_message_chars.saturating_mul(4).saturating_add(256) <= l.max_frame_bytes,
            "limits.max_message_chars",
            "must fit in a frame: limits.max_frame_bytes must be at least 4 x max_message_chars + 256",
        );
        check(
            l.max_rooms_per_connection > 0,
            "limits.max_rooms_per_connection",
            "must be at least 1",
        );
        check(
            l.messages_per_second.is_finite() && l.messages_per_second > 0.0,
            "limits.messages_per_second",
            "must be a positive number",
        );
        check(
            l.message_burst > 0,
            "limits.message_burst",
            "must be at least 1",
        );
        check(
            l.max_queued_frames >= 8,
            "limits.max_queued_frames",
            "must be at least 8",
        );
        check(
            l.max_queued_bytes >= 64 * 1024
                && l.max_queued_bytes / 16 >= l.max_message_chars
                && l.max_queued_bytes <= 1 << 30,
            "limits.max_queued_bytes",
            "must be from 65536 (and 16 x limits.max_message_chars) to 1073741824",
        );
        // The echo endpoint queues each message back whole: the largest must fit the queue.
        check(
            self.server.echo_path.is_empty()
                || l.max_queued_bytes >= l.max_frame_bytes + MAX_FRAME_HEADER,
            "limits.max_queued_bytes",
            "must be at least limits.max_frame_bytes + 14 when server.echo_path is set",
        );
        check(
            l.requests_per_second.is_finite() && l.requests_per_second > 0.0,
            "limits.requests_per_second",
            "must be a positive number",
        );
        check(
            l.request_burst > 0,
            "limits.request_burst",
            "must be at least 1",
        );
        check(
            (1..=1024).contains(&l.publishes_in_flight),
            "limits.publishes_in_flight",
            "must be from 1 to 1024",
        );
        check(
            (4096..=1 << 30).contains(&l.publish_bytes_in_flight),
            "limits.publish_bytes_in_flight",
            "must be from 4096 to 1073741824",
        );
        check(
            l.ping_interval_secs > 0,
            "limits.ping_interval_secs",
            "must be at least 1",
        );
        check(
            l.ping_timeout_secs > 0,
            "limits.ping_timeout_secs",
            "must be at least 1",
        );
        check(
            tracing_subscriber::EnvFilter::try_new(&self.log.level).is_ok(),
            "log.level",
            "must be a level (error, warn, info, debug, trace) or a tracing filter",
        );
        p
    }

    /// Settings that are valid but probably a mistake; one line per warning, naming the key.
    pub fn warnings(&self) -> Vec<String> {
        let mut w = Vec::new();
        if !self.auth.jwt_secret.expose().is_empty() && self.server.allowed_origins.is_empty() {
            w.push(
                "server.allowed_origins: empty while auth.jwt_secret is set: pages of any site \
                 may connect with a token they hold; the scalechat_token cookie is accepted only \
                 from pages of this server's own origin. List the origins of your pages."
                    .to_owned(),
            );
        }
        w
    }

    /// The effective configuration as TOML, secrets masked.
    pub fn to_toml(&self) -> String {
        // Serializing plain structs of strings, numbers and lists cannot fail.
        toml::to_string_pretty(self).unwrap_or_default()
    }
}

/// Keys that SIGHUP applies to a running node; every other key needs a restart.
///
/// A key is reloadable if it equals an entry or starts with an entry ending in `.`.
pub const RELOADABLE: &[&str] = &[
    "log.level",
    "limits.",
    "server.allowed_origins",
    "server.max_connections",
];

/// Whether SIGHUP applies `key` (a dotted key such as `limits.message_burst`) at run time.
pub fn is_reloadable(key: &str) -> bool {
    RELOADABLE
        .iter()
        .any(|r| key == *r || (r.ends_with('.') && key.starts_with(r)))
}

/// The settings a running node takes from a reloaded configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct Reloadable {
    /// `[limits]`.
    pub limits: LimitsConfig,
    /// `server.allowed_origins`.
    pub allowed_origins: Vec<String>,
    /// `server.max_connections`.
    pub max_connections: usize,
}

/// One key whose value differs between two configurations, secrets masked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Change {
    /// Dotted key, e.g. `limits.max_message_chars`.
    pub key: String,
    /// The value before, as TOML.
    pub from: String,
    /// The value after, as TOML.
    pub to: String,
    /// Whether SIGHUP applies it without a restart.
    pub reloadable: bool,
}

impl Config {
    /// The part of the configuration that SIGHUP applies at run time.
    pub fn reloadable(&self) -> Reloadable {
        Reloadable {
            limits: self.limits.clone(),
            allowed_origins: self.server.allowed_origins.clone(),
            max_connections: self.server.max_connections,
        }
    }

    /// This configuration with the reloadable keys taken from `new`, the rest kept.
    pub fn with_reloaded(&self, new: &Config) -> Config {
        let mut merged = self.clone();
        merged.limits = new.limits.clone();
        merged.server.allowed_origins = new.server.allowed_origins.clone();
        merged.server.max_connections = new.server.max_connections;
        merged.log.level = new.log.level.clone();
        merged
    }

    /// Every key whose value differs in `new`, in key order.
    pub fn changes(&self, new: &Config) -> Vec<Change> {
        let flat = |c: &Config| {
            let mut out = std::collections::BTreeMap::new();
            if let Ok(toml::Value::Table(t)) = toml::Value::try_from(c) {
                flatten(&t, "", &mut out);
            }
            out
        };
        let (before, after) = (flat(self), flat(new));
        let mut changes: Vec<Change> = after
            .iter()
            .filter(|(key, value)| before.get(*key) != Some(*value))
            .map(|(key, value)| Change {
                key: key.clone(),
                from: before.get(key).map(ToString::to_string).unwrap_or_default(),
                to: value.to_string(),
                reloadable: is_reloadable(key),
            })
            .collect();
        // Secrets serialize masked, so a changed secret can look unchanged above.
        let secrets = [
            ("redis.password", &self.redis.password, &new.redis.password),
            (
                "auth.jwt_secret",
                &self.auth.jwt_secret,
                &new.auth.jwt_secret,
            ),
        ];
        for (key, old, new) in secrets {
            if old != new && !changes.iter().any(|c| c.key == key) {
                changes.push(Change {
                    key: key.into(),
                    from: format!("\"{}\"", old.masked()),
                    to: format!("\"{}\"", new.masked()),
                    reloadable: false,
                });
            }
        }
        if self.event_stream.redis_url != new.event_stream.redis_url
            && !changes.iter().any(|c| c.key == "event_stream.redis_url")
        {
            changes.push(Change {
                key: "event_stream.redis_url".into(),
                from: format!("\"{}\"", self.event_stream.redis_url.masked()),
                to: format!("\"{}\"", new.event_stream.redis_url.masked()),
                reloadable: false,
            });
        }
        // An endpoint's secret is masked too.
        let endpoints = "webhooks.endpoints";
        if self.webhooks.endpoints != new.webhooks.endpoints
            && !changes.iter().any(|c| c.key == endpoints)
        {
            changes.push(Change {
                key: endpoints.into(),
                from: "(a secret changed)".into(),
                to: "(a secret changed)".into(),
                reloadable: false,
            });
        }
        let (old, new) = (&self.archive.url, &new.archive.url);
        if old != new && !changes.iter().any(|c| c.key == "archive.url") {
            changes.push(Change {
                key: "archive.url".into(),
                from: format!("\"{}\"", old.masked()),
                to: format!("\"{}\"", new.masked()),
                reloadable: false,
            });
        }
        changes.sort_by(|a, b| a.key.cmp(&b.key));
        changes
    }
}

/// Dotted leaf keys of a TOML table and their values.
fn flatten(
    table: &toml::Table,
    prefix: &str,
    out: &mut std::collections::BTreeMap<String, toml::Value>,
) {
    for (name, value) in table {
        let key = format!("{prefix}{name}");
        match value {
            toml::Value::Table(inner) => flatten(inner, &format!("{key}."), out),
            _ => {
                out.insert(key, value.clone());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn problems(text: &str) -> Vec<String> {
        match from_toml(text) {
            Ok(_) => Vec::new(),
            Err(ConfigError::Invalid(p)) => p,
            Err(e) => panic!("{e}"),
        }
    }

    #[test]
    fn ipv6_prefix_len_is_checked() {
        assert!(problems("[server]\nipv6_prefix_len = 128").is_empty());
        assert!(problems("[server]\nipv6_prefix_len = 32").is_empty());
        for bad in [0, 16, 31, 129] {
            let found = problems(&format!("[server]\nipv6_prefix_len = {bad}"));
            assert!(found[0].starts_with("server.ipv6_prefix_len:"), "{found:?}");
        }
    }

    #[test]
    fn an_echo_endpoint_needs_a_queue_that_holds_the_largest_message() {
        let echo = "[server]\necho_path = \"/echo\"\n[limits]\nmax_frame_bytes = 16777216\n";
        let found = problems(echo);
        assert!(
            found[0].starts_with("limits.max_queued_bytes:"),
            "{found:?}"
        );
        assert!(problems(&format!("{echo}max_queued_bytes = 16777230")).is_empty());
        // Without the echo endpoint, chat messages are bounded by max_message_chars instead.
        assert!(problems("[limits]\nmax_frame_bytes = 16777216").is_empty());
    }

    #[test]
    fn the_sends_in_flight_are_bounded_in_count_and_bytes() {
        assert_eq!(Config::default().limits.publishes_in_flight, 16);
        let ok = "[limits]\npublishes_in_flight = 1\npublish_bytes_in_flight = 4096";
        assert!(problems(ok).is_empty());
        let found = problems("[limits]\npublishes_in_flight = 0\npublish_bytes_in_flight = 4095");
        assert!(
            found[0].starts_with("limits.publishes_in_flight:"),
            "{found:?}"
        );
        assert!(
            found[1].starts_with("limits.publish_bytes_in_flight:"),
            "{found:?}"
        );
        let found = problems("[limits]\npublishes_in_flight = 1025");
        assert!(
            found[0].starts_with("limits.publishes_in_flight:"),
            "{found:?}"
        );
    }

    #[test]
    fn the_subscriber_lag_bound_is_checked() {
        for bad in ["0", "600001"] {
            let found = problems(&format!("[redis]\nsubscriber_lag_max_ms = {bad}"));
            assert_eq!(found.len(), 1, "{found:?}");
            assert!(
                found[0].starts_with("redis.subscriber_lag_max_ms:"),
                "{found:?}"
            );
        }
        assert!(problems("[redis]\nsubscriber_lag_max_ms = 1").is_empty());
        assert_eq!(Config::default().redis.subscriber_lag_max_ms, 5000);
    }

    #[test]
    fn sentinel_mode_needs_sentinels_and_a_master_name() {
        let found = problems("[redis]\nmode = \"sentinel\"\nsentinels = [\"h:0\", \"h\"]");
        assert!(found[0].starts_with("redis.sentinels:"), "{found:?}");
        assert!(found[1].starts_with("redis.master_name:"), "{found:?}");
        let ok = "[redis]\nmode = \"sentinel\"\nmaster_name = \"m\"\nsentinels = ";
        let redis = from_toml(&format!("{ok}\"a:1, [::1]:2,\"")).unwrap().redis;
        assert_eq!(
            redis.sentinels,
            ["a:1", "[::1]:2"],
            "a comma-separated list"
        );
        assert_eq!(host_port(&redis.sentinels[1]), Some(("::1", 2)));
        assert!(problems(&format!("{ok}[\"a:26379\"]")).is_empty());
    }

    #[test]
    fn cluster_mode_takes_seeds_from_the_host() {
        let redis =
            from_toml("[redis]\nmode = \"cluster\"\nhost = \"a:7000, b,c:7002\"\nport = 7001")
                .unwrap()
                .redis;
        let seeds = redis.cluster_seeds().unwrap();
        assert_eq!(
            seeds,
            [("a".into(), 7000), ("b".into(), 7001), ("c".into(), 7002)]
        );
        let found = problems("[redis]\nmode = \"cluster\"\nhost = \"a:x\"\ndb = 1");
        assert!(found[0].starts_with("redis.host:"), "{found:?}");
        assert!(found[1].starts_with("redis.db:"), "{found:?}");
    }

    #[test]
    fn the_archive_url_is_checked_and_its_password_never_shown() {
        assert!(!Config::default().archive.enabled());
        let good = from_toml(
            "[archive]\nurl = \"postgres://chat:s3cr%2Ft@db.example.com:5433/chat?password=x\"",
        )
        .unwrap();
        assert!(good.archive.enabled());
        let shown = good.to_toml();
        assert!(!shown.contains("s3cr") && !shown.contains("=x"), "{shown}");
        assert!(
            shown.contains("postgres://chat:********@db.example.com:5433/chat?password=********"),
            "{shown}"
        );
        assert!(!format!("{good:?}").contains("s3cr"));
        for bad in [
            "localhost",
            "mysql://u@h/db",
            "postgres://u:pw@h:notaport/db",
            "postgres://u@h/db?sslmode=require",
            "postgres:///db",
        ] {
            let found = problems(&format!("[archive]\nurl = \"{bad}\""));
            assert!(found[0].starts_with("archive.url:"), "{bad}: {found:?}");
            assert!(!found[0].contains("pw"), "{found:?}");
        }
        let found = problems("[archive]\npool_size = 0\nbatch_max_messages = 0");
        assert_eq!(found.len(), 2, "{found:?}");
        let cluster = "transport = \"redis\"\n[redis]\nmode = \"cluster\"\n\
                       [archive]\nurl = \"postgres://u@h/db\"";
        let found = problems(cluster);
        assert!(
            found
                .iter()
                .any(|p| p.starts_with("archive.url:") && p.contains("cluster")),
            "{found:?}"
        );
        // Sentinel mode's consumer follows the master: the archive is accepted there.
        let sentinel = "transport = \"redis\"\n[redis]\nmode = \"sentinel\"\n\
                        sentinels = [\"h:26379\"]\nmaster_name = \"m\"\n\
                        [archive]\nurl = \"postgres://u@h/db\"";
        assert_eq!(problems(sentinel), Vec::<String>::new());
    }

    #[test]
    fn urls_are_masked_in_every_form() {
        let m = |u: &str| DatabaseUrl::from(u).masked();
        assert_eq!(m(""), "");
        assert_eq!(m("postgres://u@h/db"), "postgres://u@h/db");
        assert_eq!(m("postgres://u:p@h"), "postgres://u:********@h");
        assert_eq!(m("postgres://u:p@x@h/db"), "postgres://u:********@h/db");
        assert_eq!(
            m("postgresql://h/db?user=u&password=p&sslmode=disable"),
            "postgresql://h/db?user=u&password=********&sslmode=disable"
        );
        assert_eq!(m("host=h password=p"), "********");
    }

    #[test]
    fn metrics_listen_is_checked() {
        assert!(problems("[server]\nmetrics_listen = \"off\"").is_empty());
        let bad = problems("[server]\nmetrics_listen = \"localhost\"");
        assert!(bad[0].starts_with("server.metrics_listen:"), "{bad:?}");
        let server = from_toml("[server]\nmetrics_listen = \"127.0.0.1:9100\"")
            .unwrap()
            .server;
        assert_eq!(
            server.metrics_endpoint(),
            Some(MetricsEndpoint::Listen("127.0.0.1:9100".parse().unwrap()))
        );
        assert_eq!(
            ServerConfig::default().metrics_endpoint(),
            Some(MetricsEndpoint::Main)
        );
    }

    #[test]
    fn changes_name_each_key_and_whether_sighup_applies_it() {
        let old = Config::default();
        let mut new = old.clone();
        new.limits.max_message_chars = 100;
        new.server.allowed_origins = vec!["https://chat.example.com".into()];
        new.server.port = 9000;
        new.redis.password = Secret::from("hunter2");
        let changes = old.changes(&new);
        let summary: Vec<(&str, &str, bool)> = changes
            .iter()
            .map(|c| (c.key.as_str(), c.to.as_str(), c.reloadable))
            .collect();
        assert_eq!(
            summary,
            [
                ("limits.max_message_chars", "100", true),
                ("redis.password", "\"********\"", false),
                (
                    "server.allowed_origins",
                    "[\"https://chat.example.com\"]",
                    true
                ),
                ("server.port", "9000", false),
            ]
        );
        assert!(old.changes(&old).is_empty());
        // Both masked, yet reported.
        let mut other = new.clone();
        other.redis.password = Secret::from("hunter3");
        let changed: Vec<String> = new.changes(&other).into_iter().map(|c| c.key).collect();
        assert_eq!(changed, ["redis.password"]);
        let merged = old.with_reloaded(&new);
        assert_eq!(merged.limits.max_message_chars, 100);
        assert_eq!(merged.server.port, old.server.port);
        assert!(merged.changes(&new).iter().all(|c| !c.reloadable));
    }
}
