//! Idle connections: open N, spread over the nodes, over several source addresses and over
//! worker processes (`hold`, each below the per-process file limit), hold them (answering
//! pings), and measure the servers' resident memory per connection and their idle CPU.

use std::net::SocketAddr;
use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use anyhow::{Context, bail};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::process::{Child, Command};
use tokio::sync::Semaphore;

use crate::cluster::{Cluster, CpuSample, rss_kib};
use crate::ws::{self, FrameReader, OP_CLOSE, OP_PING, Target};

/// What an idle run measured.
pub struct Idle {
    pub conns: usize,
    pub failed: usize,
    pub rss_before_kib: u64,
    pub rss_after_kib: u64,
    pub idle_cpu: f64,
    pub processes: usize,
    pub connect_secs: f64,
}

impl Idle {
    /// Server resident memory added per connection, in bytes.
    pub fn bytes_per_conn(&self) -> f64 {
        (self.rss_after_kib as f64 - self.rss_before_kib as f64) * 1024.0 / self.conns.max(1) as f64
    }
}

/// Options of an idle run.
#[derive(Clone, Debug)]
pub struct IdleOpts {
    pub conns: usize,
    pub per_process: usize,
    pub sources: usize,
    pub settle_secs: f64,
    pub idle_secs: f64,
}

/// Runs one idle measurement against `cluster`.
pub async fn run(cluster: &Cluster, opts: &IdleOpts) -> anyhow::Result<Idle> {
    let pids = cluster.node_pids();
    let rss = |pids: &[u32]| pids.iter().map(|&p| rss_kib(p)).sum::<u64>();
    let rss_before_kib = rss(&pids);
    let started = std::time::Instant::now();
    let spec = HoldSpec {
        conns: opts.conns,
        per_process: opts.per_process,
        sources: opts.sources,
        room: "idle".into(),
        name: "i".into(),
        presence: false,
    };
    let holders = Holders::spawn(cluster, &spec).await?;
    let connect_secs = started.elapsed().as_secs_f64();
    tokio::time::sleep(Duration::from_secs_f64(opts.settle_secs)).await;
    let rss_after_kib = rss(&pids);
    let cpu = CpuSample::take(&pids);
    tokio::time::sleep(Duration::from_secs_f64(opts.idle_secs)).await;
    let idle_cpu = cpu.percent_since(&pids);
    let (conns, failed, processes) = (holders.joined, holders.failed, holders.processes());
    holders.release().await;
    Ok(Idle {
        conns,
        failed,
        rss_before_kib,
        rss_after_kib,
        idle_cpu,
        processes,
        connect_secs,
    })
}

/// What `hold` worker processes should open.
#[derive(Clone, Debug)]
pub struct HoldSpec {
    /// Connections in all.
    pub conns: usize,
    /// Connections per worker process at most.
    pub per_process: usize,
    /// Source addresses to spread them over.
    pub sources: usize,
    /// The room they join.
    pub room: String,
    /// Display-name prefix; each connection's name is unique (`<name><worker>-<i>`).
    pub name: String,
    /// Whether they ask for presence events.
    pub presence: bool,
}

/// Worker processes holding connections open, killed when dropped.
pub struct Holders {
    workers: Vec<Child>,
    /// Connections that joined.
    pub joined: usize,
    /// Connections that failed.
    pub failed: usize,
}

impl Holders {
    /// Starts the workers of `spec` against the nodes of `cluster` (each worker's connections
    /// spread over every node) and waits until each connection has joined or failed.
    pub async fn spawn(cluster: &Cluster, spec: &HoldSpec) -> anyhow::Result<Holders> {
        let processes = spec.conns.div_ceil(spec.per_process.max(1)).max(1);
        let nodes = cluster.nodes.len();
        let mut holders = Holders {
            workers: Vec::new(),
            joined: 0,
            failed: 0,
        };
        let mut handed = 0;
        for w in 0..processes {
            let count = (spec.conns - handed) / (processes - w);
            handed += count;
            let addrs: Vec<String> = (0..nodes)
                .map(|n| cluster.nodes[(n + w) % nodes].addr.to_string())
                .collect();
            let mut cmd = Command::new(std::env::current_exe()?);
            cmd.args(["hold", "--count", &count.to_string()])
                .args(["--sources", &spec.sources.to_string()])
                .args(["--first-source", &(w * 7).to_string()])
                .args(["--addrs", &addrs.join(",")])
                .args(["--room", &spec.room])
                .args(["--name", &format!("{}{w}-", spec.name)]);
            if spec.presence {
                cmd.arg("--presence");
            }
            let child = cmd
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .kill_on_drop(true)
                .spawn()?;
            holders.workers.push(child);
        }
        for worker in &mut holders.workers {
            let stdout = worker.stdout.take().context("worker stdout")?;
            let mut line = String::new();
            BufReader::new(stdout).read_line(&mut line).await?;
            let mut parts = line.split_whitespace().skip(1).map(str::parse::<usize>);
            match (parts.next(), parts.next()) {
                (Some(Ok(o)), Some(Ok(f))) => {
                    holders.joined += o;
                    holders.failed += f;
                }
                _ => bail!("hold worker: unexpected report {line:?}"),
            }
        }
        Ok(holders)
    }

    /// Worker processes started.
    pub fn processes(&self) -> usize {
        self.workers.len()
    }

    /// Tells the workers to close their connections and waits for them (at most 10 s each;
    /// a worker still running then is killed when dropped).
    pub async fn release(mut self) {
        for worker in &mut self.workers {
            drop(worker.stdin.take());
            let _ = tokio::time::timeout(Duration::from_secs(10), worker.wait()).await;
        }
    }
}

/// The arguments of the `hold` worker.
#[derive(Clone, Debug, clap::Args)]
pub struct HoldArgs {
    #[arg(long, value_delimiter = ',')]
    addrs: Vec<SocketAddr>,
    #[arg(long)]
    count: usize,
    #[arg(long)]
    sources: usize,
    #[arg(long)]
    first_source: usize,
    #[arg(long, default_value = "idle")]
    room: String,
    /// Display-name prefix: connection `i` is `<name><i>`.
    #[arg(long, default_value = "i")]
    name: String,
    /// Ask for the room's presence events.
    #[arg(long)]
    presence: bool,
}

/// The `hold` worker: opens `count` connections spread over `addrs`, prints `ready OK FAILED`
/// once each has joined or failed, then holds them until standard input closes.
pub async fn hold(args: HoldArgs) -> anyhow::Result<()> {
    let HoldArgs {
        addrs,
        count,
        sources,
        first_source,
        room,
        name,
        presence,
    } = args;
    let presence = if presence { "&presence=1" } else { "" };
    let gate = Arc::new(Semaphore::new(512));
    let joined = Arc::new(AtomicUsize::new(0));
    let failed = Arc::new(AtomicUsize::new(0));
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..count {
        let target = Target {
            addr: addrs[i % addrs.len()],
            path: format!("/ws?room={room}&name={name}{i}{presence}"),
        };
        let source = ws::source_addr(first_source + i, sources);
        let (gate, joined, failed) = (gate.clone(), joined.clone(), failed.clone());
        tasks.spawn(async move {
            let mut reader = FrameReader::new(256);
            let open = async {
                let _permit = gate.acquire().await?;
                let mut stream = ws::connect(&target, source, &mut reader).await?;
                ws::wait_joined(&mut stream, &mut reader, Duration::from_secs(60)).await?;
                anyhow::Ok(stream)
            };
            match open.await {
                Ok(stream) => {
                    joined.fetch_add(1, Ordering::Relaxed);
                    keep(stream, reader).await;
                }
                Err(_) => {
                    failed.fetch_add(1, Ordering::Relaxed);
                }
            }
        });
    }
    while joined.load(Ordering::Relaxed) + failed.load(Ordering::Relaxed) < count {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let report = format!(
        "ready {} {}\n",
        joined.load(Ordering::Relaxed),
        failed.load(Ordering::Relaxed)
    );
    let mut stdout = tokio::io::stdout();
    stdout.write_all(report.as_bytes()).await?;
    stdout.flush().await?;
    let mut stdin = tokio::io::stdin();
    let mut buf = [0u8; 64];
    while stdin.read(&mut buf).await? > 0 {}
    tasks.shutdown().await;
    Ok(())
}

/// Holds a connection, answering pings and reading (and dropping) whatever else comes, until
/// the server closes it.
pub async fn keep(mut stream: tokio::net::TcpStream, mut reader: FrameReader) {
    let mut out = Vec::new();
    loop {
        let mut closed = false;
        reader.parse(|op, payload| match op {
            OP_PING => ws::encode_client_frame(&mut out, 0xA, payload),
            OP_CLOSE => closed = true,
            _ => {}
        });
        if closed || (!out.is_empty() && stream.write_all(&out).await.is_err()) {
            return;
        }
        out.clear();
        if !matches!(reader.fill(&mut stream).await, Ok(n) if n > 0) {
            return;
        }
    }
}
