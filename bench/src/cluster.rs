//! The servers a scenario runs against: scalechat nodes on the embedded transport, on Redis
//! (with a `redis-server` of our own) or on a Redis Cluster of our own (`redis-server
//! --cluster-enabled yes` on free ports, joined with `redis-cli --cluster create`), with or
//! without the PostgreSQL archive (a cluster of our own, see `postgres`), the raw-TCP relay, or
//! nodes given by URL. Started on free ports with limits raised so that they do not shape the
//! results; read from /proc for CPU time and resident memory; stopped when dropped.

use std::fmt;
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::postgres::Postgres;

/// What the load is driven against.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Setup {
    /// The raw-TCP relay: the ceiling on this machine.
    Raw,
    /// One scalechat node, embedded transport.
    Memory,
    /// One scalechat node, embedded transport, archiving into a PostgreSQL of the tool's own.
    MemoryPg,
    /// One scalechat node on Redis.
    Redis1,
    /// Two scalechat nodes sharing the room through one Redis.
    Redis2,
    /// Four scalechat nodes sharing one Redis.
    Redis4,
    /// Four scalechat nodes on a Redis Cluster of three masters (sharded Pub/Sub, no
    /// replicas).
    Cluster4,
    /// Two scalechat nodes on one Redis, archiving into a PostgreSQL of the tool's own.
    Redis2Pg,
    /// One scalechat node, embedded transport, Socket.IO members.
    MemorySio,
    /// One scalechat node on Redis, Socket.IO members.
    Redis1Sio,
    /// Two scalechat nodes on one Redis, Socket.IO members.
    Redis2Sio,
    /// One socketioxide node (scalechat-sioxide), Socket.IO members: the peer.
    Sioxide1,
    /// Two socketioxide nodes sharing rooms through one Redis with socketioxide-redis.
    Sioxide2,
    /// The nodes given with --url (not started by the tool).
    External,
}

/// What the members of a setup speak.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Protocol {
    /// scalechat's native protocol on `/ws` (the raw relay speaks it too).
    Native,
    /// Socket.IO v4 on the WebSocket transport (`/socket.io/?EIO=4&transport=websocket`).
    SocketIo,
}

impl Setup {
    /// What its members speak.
    pub fn protocol(self) -> Protocol {
        match self {
            Setup::MemorySio
            | Setup::Redis1Sio
            | Setup::Redis2Sio
            | Setup::Sioxide1
            | Setup::Sioxide2 => Protocol::SocketIo,
            _ => Protocol::Native,
        }
    }

    /// The setup a Socket.IO setup is compared with: scalechat's native members on the same
    /// servers, and for socketioxide, scalechat's Socket.IO on as many nodes.
    pub fn compared_with(self) -> Option<Setup> {
        match self {
            Setup::MemorySio => Some(Setup::Memory),
            Setup::Redis1Sio => Some(Setup::Redis1),
            Setup::Redis2Sio => Some(Setup::Redis2),
            Setup::Sioxide1 => Some(Setup::MemorySio),
            Setup::Sioxide2 => Some(Setup::Redis2Sio),
            _ => None,
        }
    }

    /// The scalechat servers a setup starts (itself for a native setup); `None` for the
    /// others.
    fn scalechat(self) -> Option<Setup> {
        match self {
            Setup::Memory
            | Setup::MemoryPg
            | Setup::Redis1
            | Setup::Redis2
            | Setup::Redis2Pg
            | Setup::Redis4
            | Setup::Cluster4 => Some(self),
            Setup::MemorySio => Some(Setup::Memory),
            Setup::Redis1Sio => Some(Setup::Redis1),
            Setup::Redis2Sio => Some(Setup::Redis2),
            Setup::Raw | Setup::Sioxide1 | Setup::Sioxide2 | Setup::External => None,
        }
    }
}

impl fmt::Display for Setup {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Setup::Raw => "raw-tcp",
            Setup::Memory => "memory 1 node",
            Setup::MemoryPg => "memory 1 node + pg",
            Setup::Redis1 => "redis 1 node",
            Setup::Redis2 => "redis 2 nodes",
            Setup::Redis4 => "redis 4 nodes",
            Setup::Cluster4 => "cluster 4 nodes, 3 shards",
            Setup::Redis2Pg => "redis 2 nodes + pg",
            Setup::MemorySio => "memory 1 node, socket.io",
            Setup::Redis1Sio => "redis 1 node, socket.io",
            Setup::Redis2Sio => "redis 2 nodes, socket.io",
            Setup::Sioxide1 => "socketioxide 1 node",
            Setup::Sioxide2 => "socketioxide 2 nodes, redis",
            Setup::External => "external",
        })
    }
}

impl Setup {
    /// Whether its nodes archive into a PostgreSQL the tool starts.
    pub fn archives(self) -> bool {
        matches!(self, Setup::MemoryPg | Setup::Redis2Pg)
    }
}

/// How to start servers.
#[derive(Clone, Debug, clap::Args)]
pub struct ServerOpts {
    /// The scalechat binary (default: `scalechat` next to this program).
    #[arg(long, global = true)]
    pub server_bin: Option<PathBuf>,
    /// The socketioxide peer of the `sioxide1` and `sioxide2` setups (default:
    /// `scalechat-sioxide` next to this program; `cargo build --release -p scalechat-sioxide`).
    #[arg(long, global = true)]
    pub sioxide_bin: Option<PathBuf>,
    /// The redis-server binary.
    #[arg(long, global = true, default_value = "redis-server")]
    pub redis_bin: String,
    /// The redis-cli binary (joins the cluster of the `cluster4` setup).
    #[arg(long, global = true, default_value = "redis-cli")]
    pub redis_cli: String,
    /// `limits.max_queued_frames` for the started nodes.
    #[arg(long, global = true, default_value_t = 65536)]
    pub max_queued_frames: usize,
    /// `limits.max_queued_bytes` for the started nodes: as many frames of up to 1 KiB.
    #[arg(long, global = true, default_value_t = 64 << 20)]
    pub max_queued_bytes: usize,
    /// Runs the tool's PostgreSQL (setups `memory-pg`, `redis2-pg`) with `fsync`,
    /// `synchronous_commit` and `full_page_writes` off, as the archive's tests do; by default
    /// they are on, PostgreSQL's defaults.
    #[arg(long, global = true)]
    pub pg_no_fsync: bool,
    /// Folder for the servers' logs.
    #[arg(long, global = true, default_value = "target/bench-logs")]
    pub log_dir: PathBuf,
    /// Running nodes to drive instead of starting servers (`ws://host:port`), repeatable.
    #[arg(long = "url", global = true)]
    pub urls: Vec<String>,
}

/// One server the load connects to.
pub struct Node {
    pub addr: SocketAddr,
    pub pid: Option<u32>,
    child: Option<Child>,
}

/// What the scalechat nodes share rooms through.
#[derive(Clone, Debug)]
enum Backplane {
    Memory,
    /// One redis-server on this port.
    Redis(u16),
    /// A Redis Cluster: the seeds, `host:port,host:port,…`.
    Cluster(String),
}

/// The running servers of one setup.
pub struct Cluster {
    pub setup: Setup,
    pub nodes: Vec<Node>,
    /// The redis-servers the tool started: one, or a cluster's masters.
    redis: Vec<Child>,
    /// The hash slots each of `redis` serves (empty unless a cluster).
    slots: Vec<Vec<(u16, u16)>>,
    /// The cluster's data folder (its `nodes.conf` files), removed when dropped.
    redis_dir: Option<PathBuf>,
    logs: Vec<PathBuf>,
    /// How the redis-server was started (binary, then arguments), to start it again.
    redis_argv: Vec<String>,
    backplane: Backplane,
    /// Extra environment of the started nodes, to start them again alike.
    node_env: Vec<(String, String)>,
    /// The PostgreSQL the nodes archive into (setups with `-pg`); stopped after the nodes.
    pub pg: Option<Postgres>,
}

/// A free TCP port on 127.0.0.1 (free when asked; the server binds it right after).
pub fn free_port() -> anyhow::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

impl Cluster {
    /// Starts the servers of `setup`.
    pub async fn start(setup: Setup, opts: &ServerOpts) -> anyhow::Result<Cluster> {
        Cluster::start_with_env(setup, opts, &[]).await
    }

    /// Starts the servers of `setup`, with `env` added to the scalechat nodes' environment
    /// (e.g. `SCALECHAT_REDIS__PRESENCE`).
    pub async fn start_with_env(
        setup: Setup,
        opts: &ServerOpts,
        env: &[(&str, &str)],
    ) -> anyhow::Result<Cluster> {
        std::fs::create_dir_all(&opts.log_dir)?;
        let mut cluster = Cluster {
            setup,
            nodes: Vec::new(),
            redis: Vec::new(),
            slots: Vec::new(),
            redis_dir: None,
            logs: Vec::new(),
            redis_argv: Vec::new(),
            backplane: Backplane::Memory,
            node_env: env
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            pg: None,
        };
        match setup {
            Setup::External => {
                for url in &opts.urls {
                    cluster.nodes.push(external(url)?);
                }
            }
            Setup::Raw => {
                let port = free_port()?;
                let log = opts.log_dir.join("relay.log");
                let mut cmd = Command::new(std::env::current_exe()?);
                cmd.args(["relay", "--port", &port.to_string()]);
                cluster.spawn_node(cmd, port, &log)?;
                wait_listening(cluster.nodes[0].addr).await?;
            }
            Setup::Sioxide1 | Setup::Sioxide2 => {
                let redis = match setup {
                    Setup::Sioxide2 => Some(cluster.spawn_redis(opts).await?),
                    _ => None,
                };
                let count = if redis.is_some() { 2 } else { 1 };
                for i in 0..count {
                    let port = free_port()?;
                    let log = opts.log_dir.join(format!("sioxide-{i}.log"));
                    let cmd = sioxide_command(opts, port, redis)?;
                    cluster.spawn_node(cmd, port, &log)?;
                }
                for node in &cluster.nodes {
                    wait_listening(node.addr).await?;
                }
            }
            Setup::Memory
            | Setup::MemoryPg
            | Setup::Redis1
            | Setup::Redis2
            | Setup::Redis2Pg
            | Setup::Redis4
            | Setup::Cluster4
            | Setup::MemorySio
            | Setup::Redis1Sio
            | Setup::Redis2Sio => {
                let setup = setup.scalechat().unwrap_or(setup);
                if setup.archives() {
                    let pg = Postgres::start(opts).await?;
                    cluster.node_env.push(("DATABASE_URL".into(), pg.url()));
                    cluster.pg = Some(pg);
                }
                cluster.backplane = match setup {
                    Setup::Memory | Setup::MemoryPg => Backplane::Memory,
                    Setup::Cluster4 => {
                        Backplane::Cluster(cluster.spawn_redis_cluster(opts, 3).await?)
                    }
                    _ => Backplane::Redis(cluster.spawn_redis(opts).await?),
                };
                let count = match setup {
                    Setup::Redis2 | Setup::Redis2Pg => 2,
                    Setup::Redis4 | Setup::Cluster4 => 4,
                    _ => 1,
                };
                for i in 0..count {
                    let port = free_port()?;
                    let log = opts.log_dir.join(format!("node-{i}.log"));
                    let mut cmd = scalechat_command(opts, port, i, &cluster.backplane)?;
                    cmd.envs(cluster.node_env.iter().map(|(k, v)| (k, v)));
                    cluster.spawn_node(cmd, port, &log)?;
                }
                for node in &cluster.nodes {
                    wait_ready(node.addr).await?;
                }
            }
        }
        Ok(cluster)
    }

    /// Two nodes on a Redis of the tool's own that keeps an append-only file (fsync on every
    /// write) in `dir`, so that a Redis restart keeps every room's history and epoch; `env` is
    /// added to the nodes' environment.
    pub async fn start_persistent(
        opts: &ServerOpts,
        dir: &Path,
        env: &[(&str, &str)],
    ) -> anyhow::Result<Cluster> {
        std::fs::create_dir_all(&opts.log_dir)?;
        std::fs::create_dir_all(dir)?;
        let dir = std::fs::canonicalize(dir)?;
        let port = free_port()?;
        let argv = [
            &opts.redis_bin,
            "--port",
            &port.to_string(),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "yes",
            "--appendfsync",
            "always",
            "--dir",
            &dir.to_string_lossy(),
        ];
        let mut cluster = Cluster {
            setup: Setup::Redis2,
            nodes: Vec::new(),
            redis: Vec::new(),
            slots: Vec::new(),
            redis_dir: None,
            logs: Vec::new(),
            redis_argv: argv.iter().map(|s| s.to_string()).collect(),
            backplane: Backplane::Redis(port),
            node_env: env
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            pg: None,
        };
        cluster.start_redis().await?;
        for i in 0..2 {
            let port = free_port()?;
            let log = opts.log_dir.join(format!("soak-node-{i}.log"));
            let mut cmd = scalechat_command(opts, port, i, &cluster.backplane)?;
            cmd.envs(cluster.node_env.iter().map(|(k, v)| (k, v)));
            cluster.spawn_node(cmd, port, &log)?;
        }
        for node in &cluster.nodes {
            wait_ready(node.addr).await?;
        }
        Ok(cluster)
    }

    async fn start_redis(&mut self) -> anyhow::Result<()> {
        let Backplane::Redis(port) = self.backplane else {
            bail!("no redis port");
        };
        let child = Command::new(&self.redis_argv[0])
            .args(&self.redis_argv[1..])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("start redis-server (apt-get install redis-server)")?;
        self.redis.push(child);
        wait_listening(SocketAddr::from(([127, 0, 0, 1], port))).await
    }

    /// Kills the redis-server (SIGKILL: what survives is what its append-only file holds) and
    /// starts it again on the same port with the same files; returns how long it was down.
    pub async fn restart_redis(&mut self) -> anyhow::Result<Duration> {
        let started = Instant::now();
        if let Some(mut child) = self.redis.pop() {
            child.kill()?;
            child.wait()?;
        }
        self.start_redis().await?;
        Ok(started.elapsed())
    }

    /// Stops node `i` with SIGTERM (a graceful shutdown: its clients are closed with 1001),
    /// waits for it to exit, starts it again on the same port and waits until it is ready;
    /// returns how long it was down and how it exited.
    pub async fn restart_node(
        &mut self,
        i: usize,
        opts: &ServerOpts,
    ) -> anyhow::Result<(Duration, std::process::ExitStatus)> {
        let started = Instant::now();
        let node = &mut self.nodes[i];
        let mut child = node.child.take().context("node not started by the tool")?;
        // SAFETY: kill with a pid of a child we have not reaped yet.
        unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) };
        let status = loop {
            if let Some(status) = child.try_wait()? {
                break status;
            }
            if started.elapsed() > Duration::from_secs(30) {
                child.kill()?;
                bail!("node {i} did not exit within 30 s of SIGTERM");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        let port = node.addr.port();
        let mut cmd = scalechat_command(opts, port, i, &self.backplane)?;
        cmd.envs(self.node_env.iter().map(|(k, v)| (k, v)));
        let log = std::fs::OpenOptions::new()
            .append(true)
            .open(&self.logs[i])?;
        cmd.stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        let child = cmd.spawn().with_context(|| format!("start {cmd:?}"))?;
        node.pid = Some(child.id());
        node.child = Some(child);
        wait_ready(node.addr).await?;
        Ok((started.elapsed(), status))
    }

    fn spawn_node(&mut self, mut cmd: Command, port: u16, log: &Path) -> anyhow::Result<()> {
        let file = std::fs::File::create(log)?;
        cmd.stdin(Stdio::null())
            .stdout(file.try_clone()?)
            .stderr(file);
        let child = cmd.spawn().with_context(|| format!("start {cmd:?}"))?;
        self.logs.push(log.to_owned());
        self.nodes.push(Node {
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
            pid: Some(child.id()),
            child: Some(child),
        });
        Ok(())
    }

    async fn spawn_redis(&mut self, opts: &ServerOpts) -> anyhow::Result<u16> {
        let port = free_port()?;
        let child = Command::new(&opts.redis_bin)
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("start redis-server (apt-get install redis-server)")?;
        self.redis.push(child);
        wait_listening(SocketAddr::from(([127, 0, 0, 1], port))).await?;
        Ok(port)
    }

    /// Starts `masters` cluster-enabled redis-servers (no persistence, no replicas), joins
    /// them with `redis-cli --cluster create`, waits until each says `cluster_state:ok` and
    /// reads which slots each serves; returns the seeds for `redis.host`.
    async fn spawn_redis_cluster(
        &mut self,
        opts: &ServerOpts,
        masters: usize,
    ) -> anyhow::Result<String> {
        let dir = std::fs::canonicalize(&opts.log_dir)?.join(format!(
            "redis-cluster-{}-{}",
            std::process::id(),
            free_port()?
        ));
        self.redis_dir = Some(dir.clone());
        let mut ports = Vec::new();
        for _ in 0..masters {
            let port = free_port()?;
            let data = dir.join(port.to_string());
            std::fs::create_dir_all(&data)?;
            let child = Command::new(&opts.redis_bin)
                .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
                .args(["--save", "", "--appendonly", "no"])
                .args(["--cluster-enabled", "yes", "--cluster-node-timeout", "5000"])
                // A free bus port of its own: the default, port + 10000, may be taken or
                // beyond 65535.
                .args(["--cluster-port", &free_port()?.to_string()])
                .arg("--dir")
                .arg(&data)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .context("start redis-server (apt-get install redis-server)")?;
            self.redis.push(child);
            ports.push(port);
        }
        for &port in &ports {
            wait_listening(SocketAddr::from(([127, 0, 0, 1], port))).await?;
        }
        let seeds: Vec<String> = ports.iter().map(|p| format!("127.0.0.1:{p}")).collect();
        let created = tokio::process::Command::new(&opts.redis_cli)
            .args(["--cluster", "create"])
            .args(&seeds)
            .args(["--cluster-replicas", "0", "--cluster-yes"])
            .stdin(Stdio::null())
            .output()
            .await
            .context("run redis-cli (apt-get install redis-tools)")?;
        if !created.status.success() {
            bail!(
                "redis-cli --cluster create: {}{}",
                String::from_utf8_lossy(&created.stdout),
                String::from_utf8_lossy(&created.stderr)
            );
        }
        let deadline = Instant::now() + Duration::from_secs(20);
        for &port in &ports {
            loop {
                let info = redis_query(port, "CLUSTER INFO").await.unwrap_or_default();
                if info.contains("cluster_state:ok") {
                    break;
                }
                if Instant::now() > deadline {
                    bail!("redis cluster on {} not ok: {info}", seeds.join(","));
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        let nodes = redis_query(ports[0], "CLUSTER NODES").await?;
        self.slots = ports.iter().map(|&port| slots_of(&nodes, port)).collect();
        Ok(seeds.join(","))
    }

    /// Process ids of the nodes that the tool started.
    pub fn node_pids(&self) -> Vec<u32> {
        self.nodes.iter().filter_map(|n| n.pid).collect()
    }

    /// The pids of the redis-servers the tool started: one, or a cluster's masters (the
    /// shards).
    pub fn redis_pids(&self) -> Vec<u32> {
        self.redis.iter().map(Child::id).collect()
    }

    /// Which of [`Cluster::redis_pids`] serves the Redis Cluster hash slot `slot`; `None`
    /// unless the setup is a cluster.
    pub fn shard_of_slot(&self, slot: u16) -> Option<usize> {
        self.slots
            .iter()
            .position(|ranges| ranges.iter().any(|&(a, b)| (a..=b).contains(&slot)))
    }

    /// The processes of the tool's PostgreSQL now (none without one).
    pub fn pg_pids(&self) -> Vec<u32> {
        self.pg.as_ref().map(Postgres::pids).unwrap_or_default()
    }

    /// Trouble the nodes report in /metrics (non-zero error, close-code, slow-consumer,
    /// refusal and publish-error counters), and warning or error lines in their logs.
    pub async fn trouble(&self) -> String {
        let mut out = Vec::new();
        if self.setup.scalechat().is_some() {
            for (i, node) in self.nodes.iter().enumerate() {
                if let Ok(text) = http_get(node.addr, "/metrics").await {
                    for line in text.lines().filter(|l| is_trouble(l)) {
                        out.push(format!("n{i} {line}"));
                    }
                    if !self.redis.is_empty()
                        && let Some(mean) = publish_mean_ms(&text)
                    {
                        out.push(format!("n{i} mean publish {mean:.2} ms"));
                    }
                }
            }
        }
        for log in &self.logs {
            let text = std::fs::read_to_string(log).unwrap_or_default();
            let bad = text
                .lines()
                .filter(|l| l.contains("WARN") || l.contains("ERROR") || l.contains("panick"))
                .count();
            if bad > 0 {
                out.push(format!("{bad} warn/error lines in {}", log.display()));
            }
        }
        out.join("; ")
    }
}

/// The mean of `scalechat_publish_seconds` since the node started, in ms.
fn publish_mean_ms(metrics: &str) -> Option<f64> {
    let value = |name: &str| {
        metrics
            .lines()
            .find_map(|l| l.strip_prefix(name)?.trim().parse::<f64>().ok())
    };
    let count = value("scalechat_publish_seconds_count")?;
    let sum = value("scalechat_publish_seconds_sum")?;
    (count > 0.0).then(|| 1000.0 * sum / count)
}

fn is_trouble(line: &str) -> bool {
    let counters = [
        "scalechat_slow_consumer_disconnects_total",
        "scalechat_errors_total",
        "scalechat_close_codes_total",
        "scalechat_publish_errors_total",
        "scalechat_connections_refused_total",
        "scalechat_backplane_reconnects_total",
        // A gap in a room's ids on a node's subscriber, and what the history filled of it.
        "scalechat_backplane_gaps_total",
        "scalechat_backplane_gaps_healed_total",
        "scalechat_backplane_messages_healed_total",
        "scalechat_archive_write_errors_total",
        "scalechat_archive_dropped_total",
        "scalechat_archive_missed_total",
    ];
    counters.iter().any(|c| line.starts_with(c)) && !line.ends_with(" 0")
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let children = self.nodes.iter_mut().filter_map(|n| n.child.as_mut());
        for child in children.chain(self.redis.iter_mut()) {
            let _ = child.kill();
            let _ = child.wait();
        }
        if let Some(dir) = &self.redis_dir {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

/// The slot ranges the master on `port` serves, from `CLUSTER NODES` (`<id> <ip:port@bus>
/// <flags> <master> <ping> <pong> <epoch> <link> <slot or range>…`; ranges being moved, in
/// brackets, are left out).
fn slots_of(nodes: &str, port: u16) -> Vec<(u16, u16)> {
    let suffix = format!(":{port}");
    let Some(line) = nodes.lines().find(|line| {
        line.split_whitespace()
            .nth(1)
            .and_then(|a| a.split('@').next())
            .is_some_and(|a| a.ends_with(&suffix))
    }) else {
        return Vec::new();
    };
    line.split_whitespace()
        .skip(8)
        .filter_map(|range| {
            let (a, b) = range.split_once('-').unwrap_or((range, range));
            Some((a.parse().ok()?, b.parse().ok()?))
        })
        .collect()
}

/// The Redis Cluster hash slot of a key whose hash tag (the part in braces) is `tag`: CRC16
/// (XMODEM) of it, modulo 16384.
pub fn key_slot(tag: &str) -> u16 {
    let mut crc = 0u16;
    for &b in tag.as_bytes() {
        crc ^= u16::from(b) << 8;
        for _ in 0..8 {
            crc = if crc & 0x8000 != 0 {
                (crc << 1) ^ 0x1021
            } else {
                crc << 1
            };
        }
    }
    crc % 16384
}

/// Sends one inline command to the redis-server on `port` and returns its answer (the
/// content of a bulk string, or the line of a simple one).
async fn redis_query(port: u16, command: &str) -> anyhow::Result<String> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).await?;
    s.write_all(format!("{command}\r\n").as_bytes()).await?;
    let mut buf = Vec::new();
    let read = async {
        loop {
            let mut chunk = [0u8; 4096];
            let n = s.read(&mut chunk).await?;
            if n == 0 {
                bail!("redis closed the connection");
            }
            buf.extend_from_slice(&chunk[..n]);
            let Some(eol) = memchr::memmem::find(&buf, b"\r\n") else {
                continue;
            };
            let head = String::from_utf8_lossy(&buf[..eol]).into_owned();
            match head.as_bytes().first() {
                Some(b'$') => {
                    let len: usize = head[1..].parse().context("bulk length")?;
                    if buf.len() >= eol + 2 + len {
                        let body = &buf[eol + 2..eol + 2 + len];
                        return Ok(String::from_utf8_lossy(body).into_owned());
                    }
                }
                Some(b'+') => return Ok(head[1..].to_owned()),
                _ => bail!("redis answered {head}"),
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(5), read).await?
}

fn scalechat_command(
    opts: &ServerOpts,
    port: u16,
    index: usize,
    backplane: &Backplane,
) -> anyhow::Result<Command> {
    let bin = match &opts.server_bin {
        Some(bin) => bin.clone(),
        None => std::env::current_exe()?.with_file_name("scalechat"),
    };
    // Absolute, since the node runs in another working directory.
    let Ok(bin) = std::fs::canonicalize(&bin) else {
        bail!("{} not found: cargo build --release", bin.display());
    };
    let mut cmd = Command::new(bin);
    // An empty working directory, so no config/scalechat.toml is read: built-in defaults,
    // then these variables.
    cmd.current_dir(&opts.log_dir);
    for var in [
        "PORT",
        "REDIS_HOST",
        "REDIS_PORT",
        "REDIS_PASSWORD",
        "RUST_LOG",
    ] {
        cmd.env_remove(var);
    }
    let env = [
        ("SCALECHAT_SERVER__HOST", "127.0.0.1".to_owned()),
        ("SCALECHAT_SERVER__PORT", port.to_string()),
        ("SCALECHAT_SERVER__NODE_ID", format!("bench-{index}")),
        ("SCALECHAT_SERVER__MAX_CONNECTIONS", "1000000".to_owned()),
        // Every connection comes from a few loopback addresses: no per-address limits.
        ("SCALECHAT_SERVER__MAX_CONNECTIONS_PER_IP", "0".to_owned()),
        (
            "SCALECHAT_SERVER__CONNECTS_PER_IP_PER_SECOND",
            "0".to_owned(),
        ),
        // As many connects waiting to be accepted as the kernel allows (net.core.somaxconn
        // caps it), for the bursts of the scenarios that open tens of thousands.
        ("SCALECHAT_SERVER__LISTEN_BACKLOG", "65535".to_owned()),
        (
            "SCALECHAT_LIMITS__MESSAGES_PER_SECOND",
            "1000000".to_owned(),
        ),
        ("SCALECHAT_LIMITS__MESSAGE_BURST", "1000000".to_owned()),
        (
            "SCALECHAT_LIMITS__MAX_QUEUED_FRAMES",
            opts.max_queued_frames.to_string(),
        ),
        (
            "SCALECHAT_LIMITS__MAX_QUEUED_BYTES",
            opts.max_queued_bytes.to_string(),
        ),
        ("SCALECHAT_LOG__LEVEL", "warn".to_owned()),
    ];
    cmd.envs(env);
    match backplane {
        Backplane::Redis(p) => cmd
            .env("SCALECHAT_TRANSPORT", "redis")
            .env("SCALECHAT_REDIS__HOST", "127.0.0.1")
            .env("SCALECHAT_REDIS__PORT", p.to_string()),
        Backplane::Cluster(seeds) => cmd
            .env("SCALECHAT_TRANSPORT", "redis")
            .env("SCALECHAT_REDIS__MODE", "cluster")
            .env("SCALECHAT_REDIS__HOST", seeds),
        Backplane::Memory => cmd.env("SCALECHAT_TRANSPORT", "memory"),
    };
    Ok(cmd)
}

/// The socketioxide peer on 127.0.0.1:`port`, on the in-memory adapter or on the Redis at
/// `redis`, with a client's queue as long as the scalechat nodes'.
fn sioxide_command(opts: &ServerOpts, port: u16, redis: Option<u16>) -> anyhow::Result<Command> {
    let bin = match &opts.sioxide_bin {
        Some(bin) => bin.clone(),
        None => std::env::current_exe()?.with_file_name("scalechat-sioxide"),
    };
    let Ok(bin) = std::fs::canonicalize(&bin) else {
        bail!(
            "{} not found: cargo build --release -p scalechat-sioxide",
            bin.display()
        );
    };
    let mut cmd = Command::new(bin);
    cmd.current_dir(&opts.log_dir).env_remove("RUST_LOG");
    cmd.args(["--port", &port.to_string()]);
    cmd.args(["--max-queued-packets", &opts.max_queued_frames.to_string()]);
    if let Some(redis) = redis {
        cmd.args(["--redis", &format!("redis://127.0.0.1:{redis}")]);
    }
    Ok(cmd)
}

fn external(url: &str) -> anyhow::Result<Node> {
    let rest = url
        .strip_prefix("ws://")
        .with_context(|| format!("{url}: only ws:// URLs"))?;
    let host = rest.split('/').next().unwrap_or(rest);
    let addr = std::net::ToSocketAddrs::to_socket_addrs(host)?
        .next()
        .with_context(|| format!("{url}: no address"))?;
    Ok(Node {
        addr,
        pid: None,
        child: None,
    })
}

async fn wait_listening(addr: SocketAddr) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(10);
    while TcpStream::connect(addr).await.is_err() {
        if Instant::now() > deadline {
            bail!("nothing listens on {addr}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(())
}

async fn wait_ready(addr: SocketAddr) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        if let Ok(text) = http_get(addr, "/readyz").await
            && text.starts_with("HTTP/1.1 200")
        {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("scalechat on {addr} not ready (see its log)");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A plain HTTP GET; the whole response.
pub async fn http_get(addr: SocketAddr, path: &str) -> anyhow::Result<String> {
    let mut s = TcpStream::connect(addr).await?;
    let req = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    s.write_all(req.as_bytes()).await?;
    let mut buf = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut buf)).await??;
    Ok(String::from_utf8_lossy(&buf).into_owned())
}

/// CPU time (user + system) a process has used, in seconds.
pub fn cpu_secs(pid: u32) -> f64 {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return 0.0;
    };
    // Fields after the parenthesised command name: state is field 3, utime 14, stime 15.
    let Some(rest) = stat.rsplit_once(')').map(|(_, r)| r) else {
        return 0.0;
    };
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = [11, 12]
        .iter()
        .filter_map(|&i| fields.get(i)?.parse::<u64>().ok())
        .sum();
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    ticks as f64 / hz
}

/// CPU time the whole machine has spent busy (all cores, everything but idle and iowait), in
/// seconds.
pub fn machine_busy_secs() -> f64 {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let Some(line) = stat.lines().next() else {
        return 0.0;
    };
    let ticks: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .filter_map(|v| v.parse().ok())
        .collect();
    // user nice system idle iowait irq softirq steal …: busy is all but idle and iowait.
    let busy: u64 = ticks
        .iter()
        .enumerate()
        .filter(|&(i, _)| i != 3 && i != 4 && i < 8)
        .map(|(_, v)| v)
        .sum();
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    busy as f64 / hz
}

/// The machine's busy CPU since a moment, in percent of one core.
#[derive(Clone, Copy)]
pub struct MachineSample {
    at: Instant,
    busy: f64,
}

impl MachineSample {
    /// Samples now.
    pub fn take() -> MachineSample {
        MachineSample {
            at: Instant::now(),
            busy: machine_busy_secs(),
        }
    }

    /// Busy CPU since `self`, in percent of one core (summed over all cores).
    pub fn percent_since(&self) -> f64 {
        let wall = self.at.elapsed().as_secs_f64().max(1e-9);
        100.0 * (machine_busy_secs() - self.busy) / wall
    }
}

/// Resident memory of a process (VmRSS), in KiB.
pub fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

/// CPU seconds of several processes at one moment, to diff against a later sample.
#[derive(Clone)]
pub struct CpuSample {
    at: Instant,
    secs: Vec<f64>,
}

impl CpuSample {
    /// Samples `pids` now.
    pub fn take(pids: &[u32]) -> CpuSample {
        CpuSample {
            at: Instant::now(),
            secs: pids.iter().map(|&p| cpu_secs(p)).collect(),
        }
    }

    /// CPU used since `self` by the same `pids`, in percent of one core (summed over them).
    pub fn percent_since(&self, pids: &[u32]) -> f64 {
        let wall = self.at.elapsed().as_secs_f64().max(1e-9);
        // A process that ended meanwhile reads 0: it adds nothing rather than its past.
        let used: f64 = pids
            .iter()
            .zip(&self.secs)
            .map(|(&p, &before)| (cpu_secs(p) - before).max(0.0))
            .sum();
        100.0 * used / wall
    }
}

/// CPU time of every process of a run at one moment, to diff against a later one: each
/// node, each redis-server (a cluster's shards), the PostgreSQL's processes, the generator's
/// processes and the machine.
pub struct Usage {
    machine: MachineSample,
    nodes: Vec<(u32, f64)>,
    redis: Vec<(u32, f64)>,
    pg: Vec<(u32, f64)>,
    generator: Vec<(u32, f64)>,
}

/// CPU used since a [`Usage`], in percent of one core.
pub struct Cpu {
    /// Each node.
    pub nodes: Vec<f64>,
    /// Each redis-server.
    pub redis: Vec<f64>,
    /// The tool's PostgreSQL (its processes at the start), 0 without one.
    pub pg: f64,
    /// The generator's processes together.
    pub generator: f64,
    /// The rest of the machine's busy time: other processes, and kernel work not charged to
    /// any process.
    pub other: f64,
}

impl Usage {
    /// Samples the nodes and redis-servers of `cluster`, the `generator` processes and the
    /// machine now.
    pub fn take(cluster: &Cluster, generator: &[u32]) -> Usage {
        let each = |pids: &[u32]| pids.iter().map(|&p| (p, cpu_secs(p))).collect();
        Usage {
            machine: MachineSample::take(),
            nodes: each(&cluster.node_pids()),
            redis: each(&cluster.redis_pids()),
            pg: each(&cluster.pg_pids()),
            generator: each(generator),
        }
    }

    /// CPU used since the sample.
    pub fn since(&self) -> Cpu {
        let wall = self.machine.at.elapsed().as_secs_f64().max(1e-9);
        let each = |pids: &[(u32, f64)]| -> Vec<f64> {
            pids.iter()
                .map(|&(p, before)| 100.0 * (cpu_secs(p) - before) / wall)
                .collect()
        };
        let (nodes, redis) = (each(&self.nodes), each(&self.redis));
        let pg: f64 = each(&self.pg).iter().sum();
        let generator: f64 = each(&self.generator).iter().sum();
        let accounted = nodes.iter().sum::<f64>() + redis.iter().sum::<f64>() + pg + generator;
        Cpu {
            other: (self.machine.percent_since() - accounted).max(0.0),
            nodes,
            redis,
            pg,
            generator,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_slots_are_redis_cluster_slots() {
        // CLUSTER KEYSLOT answers of a Redis 7.
        assert_eq!(key_slot("123456789"), 0x31c3);
        assert_eq!(key_slot("foo"), 12182);
        assert_eq!(key_slot("rm0"), 15693);
        assert_eq!(key_slot("rm1"), 11628);
        assert_eq!(key_slot("rm17"), 1591);
        assert_eq!(key_slot(""), 0);
    }

    #[test]
    fn reads_a_masters_slots_from_cluster_nodes() {
        let nodes = "\
a1 127.0.0.1:7001@17001 myself,master - 0 0 1 connected 0-5460
b2 127.0.0.1:7002@17002 master - 0 1 2 connected 5461-10922 12000 [12001->-c3]
c3 127.0.0.1:7003@17003,host master - 0 1 3 connected 10923-11999 12001-16383
";
        assert_eq!(slots_of(nodes, 7001), [(0, 5460)]);
        assert_eq!(slots_of(nodes, 7002), [(5461, 10922), (12000, 12000)]);
        assert_eq!(slots_of(nodes, 7003), [(10923, 11999), (12001, 16383)]);
        assert!(slots_of(nodes, 700).is_empty());
    }
}
