//! The servers a scenario runs against: scalechat nodes on the embedded transport or on Redis
//! (with a `redis-server` of our own), the raw-TCP relay, or nodes given by URL. Started on free
//! ports with limits raised so that they do not shape the results; read from /proc for CPU time
//! and resident memory; stopped when dropped.

use std::fmt;
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// What the load is driven against.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Setup {
    /// The raw-TCP relay: the ceiling on this machine.
    Raw,
    /// One scalechat node, embedded transport.
    Memory,
    /// One scalechat node on Redis.
    Redis1,
    /// Two scalechat nodes sharing the room through one Redis.
    Redis2,
    /// The nodes given with --url (not started by the tool).
    External,
}

impl fmt::Display for Setup {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Setup::Raw => "raw-tcp",
            Setup::Memory => "memory 1 node",
            Setup::Redis1 => "redis 1 node",
            Setup::Redis2 => "redis 2 nodes",
            Setup::External => "external",
        })
    }
}

/// How to start servers.
#[derive(Clone, Debug, clap::Args)]
pub struct ServerOpts {
    /// The scalechat binary (default: `scalechat` next to this program).
    #[arg(long, global = true)]
    pub server_bin: Option<PathBuf>,
    /// The redis-server binary.
    #[arg(long, global = true, default_value = "redis-server")]
    pub redis_bin: String,
    /// `limits.max_queued_frames` for the started nodes.
    #[arg(long, global = true, default_value_t = 65536)]
    pub max_queued_frames: usize,
    /// `limits.max_queued_bytes` for the started nodes: as many frames of up to 1 KiB.
    #[arg(long, global = true, default_value_t = 64 << 20)]
    pub max_queued_bytes: usize,
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

/// The running servers of one setup.
pub struct Cluster {
    pub setup: Setup,
    pub nodes: Vec<Node>,
    redis: Option<Child>,
    logs: Vec<PathBuf>,
    /// How the redis-server was started (binary, then arguments), to start it again.
    redis_argv: Vec<String>,
    redis_port: Option<u16>,
    /// Extra environment of the started nodes, to start them again alike.
    node_env: Vec<(String, String)>,
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
            redis: None,
            logs: Vec::new(),
            redis_argv: Vec::new(),
            redis_port: None,
            node_env: env
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
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
            Setup::Memory | Setup::Redis1 | Setup::Redis2 => {
                let redis_port = match setup {
                    Setup::Memory => None,
                    _ => Some(cluster.spawn_redis(opts).await?),
                };
                let count = if setup == Setup::Redis2 { 2 } else { 1 };
                for i in 0..count {
                    let port = free_port()?;
                    let log = opts.log_dir.join(format!("node-{i}.log"));
                    let mut cmd = scalechat_command(opts, port, i, redis_port)?;
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
            redis: None,
            logs: Vec::new(),
            redis_argv: argv.iter().map(|s| s.to_string()).collect(),
            redis_port: Some(port),
            node_env: env
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        };
        cluster.start_redis().await?;
        for i in 0..2 {
            let port = free_port()?;
            let log = opts.log_dir.join(format!("soak-node-{i}.log"));
            let mut cmd = scalechat_command(opts, port, i, Some(cluster.redis_port.unwrap_or(0)))?;
            cmd.envs(cluster.node_env.iter().map(|(k, v)| (k, v)));
            cluster.spawn_node(cmd, port, &log)?;
        }
        for node in &cluster.nodes {
            wait_ready(node.addr).await?;
        }
        Ok(cluster)
    }

    async fn start_redis(&mut self) -> anyhow::Result<()> {
        let port = self.redis_port.context("no redis port")?;
        let child = Command::new(&self.redis_argv[0])
            .args(&self.redis_argv[1..])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("start redis-server (apt-get install redis-server)")?;
        self.redis = Some(child);
        wait_listening(SocketAddr::from(([127, 0, 0, 1], port))).await
    }

    /// Kills the redis-server (SIGKILL: what survives is what its append-only file holds) and
    /// starts it again on the same port with the same files; returns how long it was down.
    pub async fn restart_redis(&mut self) -> anyhow::Result<Duration> {
        let started = Instant::now();
        if let Some(mut child) = self.redis.take() {
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
        let mut cmd = scalechat_command(opts, port, i, self.redis_port)?;
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
        self.redis = Some(child);
        wait_listening(SocketAddr::from(([127, 0, 0, 1], port))).await?;
        Ok(port)
    }

    /// Process ids of the nodes that the tool started.
    pub fn node_pids(&self) -> Vec<u32> {
        self.nodes.iter().filter_map(|n| n.pid).collect()
    }

    /// The redis-server's pid, when the tool started one.
    pub fn redis_pid(&self) -> Option<u32> {
        self.redis.as_ref().map(Child::id)
    }

    /// Trouble the nodes report in /metrics (non-zero error, close-code, slow-consumer,
    /// refusal and publish-error counters), and warning or error lines in their logs.
    pub async fn trouble(&self) -> String {
        let mut out = Vec::new();
        if self.setup != Setup::Raw {
            for (i, node) in self.nodes.iter().enumerate() {
                if let Ok(text) = http_get(node.addr, "/metrics").await {
                    for line in text.lines().filter(|l| is_trouble(l)) {
                        out.push(format!("n{i} {line}"));
                    }
                    if self.redis.is_some()
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
    ];
    counters.iter().any(|c| line.starts_with(c)) && !line.ends_with(" 0")
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let children = self.nodes.iter_mut().filter_map(|n| n.child.as_mut());
        for child in children.chain(self.redis.as_mut()) {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

fn scalechat_command(
    opts: &ServerOpts,
    port: u16,
    index: usize,
    redis_port: Option<u16>,
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
    match redis_port {
        Some(p) => cmd
            .env("SCALECHAT_TRANSPORT", "redis")
            .env("SCALECHAT_REDIS__HOST", "127.0.0.1")
            .env("SCALECHAT_REDIS__PORT", p.to_string()),
        None => cmd.env("SCALECHAT_TRANSPORT", "memory"),
    };
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
        let used: f64 = pids
            .iter()
            .zip(&self.secs)
            .map(|(&p, &before)| cpu_secs(p) - before)
            .sum();
        100.0 * used / wall
    }
}
