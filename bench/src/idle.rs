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
    let processes = opts.conns.div_ceil(opts.per_process.max(1)).max(1);
    let nodes = cluster.nodes.len();
    let mut workers: Vec<Child> = Vec::new();
    let mut handed = 0;
    for w in 0..processes {
        let count = (opts.conns - handed) / (processes - w);
        handed += count;
        let addrs: Vec<String> = (0..nodes)
            .map(|n| cluster.nodes[(n + w) % nodes].addr.to_string())
            .collect();
        let child = Command::new(std::env::current_exe()?)
            .args(["hold", "--count", &count.to_string()])
            .args(["--sources", &opts.sources.to_string()])
            .args(["--first-source", &(w * 7).to_string()])
            .args(["--addrs", &addrs.join(",")])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .kill_on_drop(true)
            .spawn()?;
        workers.push(child);
    }
    let mut ok = 0;
    let mut failed = 0;
    for worker in &mut workers {
        let stdout = worker.stdout.take().context("worker stdout")?;
        let mut line = String::new();
        BufReader::new(stdout).read_line(&mut line).await?;
        let mut parts = line.split_whitespace().skip(1).map(str::parse::<usize>);
        match (parts.next(), parts.next()) {
            (Some(Ok(o)), Some(Ok(f))) => {
                ok += o;
                failed += f;
            }
            _ => bail!("hold worker: unexpected report {line:?}"),
        }
    }
    let connect_secs = started.elapsed().as_secs_f64();
    tokio::time::sleep(Duration::from_secs_f64(opts.settle_secs)).await;
    let rss_after_kib = rss(&pids);
    let cpu = CpuSample::take(&pids);
    tokio::time::sleep(Duration::from_secs_f64(opts.idle_secs)).await;
    let idle_cpu = cpu.percent_since(&pids);
    for mut worker in workers {
        drop(worker.stdin.take());
        let _ = tokio::time::timeout(Duration::from_secs(10), worker.wait()).await;
    }
    Ok(Idle {
        conns: ok,
        failed,
        rss_before_kib,
        rss_after_kib,
        idle_cpu,
        processes,
        connect_secs,
    })
}

/// The `hold` worker: opens `count` connections spread over `addrs`, prints `ready OK FAILED`
/// once each has joined or failed, then holds them until standard input closes.
pub async fn hold(
    addrs: Vec<SocketAddr>,
    count: usize,
    sources: usize,
    first_source: usize,
) -> anyhow::Result<()> {
    let gate = Arc::new(Semaphore::new(512));
    let joined = Arc::new(AtomicUsize::new(0));
    let failed = Arc::new(AtomicUsize::new(0));
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..count {
        let target = Target {
            addr: addrs[i % addrs.len()],
            path: format!("/ws?room=idle&name=i{i}"),
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

/// Holds an idle connection, answering pings, until the server closes it.
async fn keep(mut stream: tokio::net::TcpStream, mut reader: FrameReader) {
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
