//! Connection churn: workers that open a connection, wait for its `joined`, close it with a
//! close frame and start again, as fast as the server lets them. Measures upgrades per second
//! and the time to the 101 response and to `joined`.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use hdrhistogram::Histogram;
use tokio::io::AsyncWriteExt;

use crate::cluster::{Cluster, CpuSample};
use crate::track::{histogram, now_ns};
use crate::ws::{self, FrameReader, OP_CLOSE, Target};

/// What a churn run measured.
pub struct Churn {
    pub completed: u64,
    pub failed: u64,
    pub first_error: Option<String>,
    pub per_sec: f64,
    pub upgrade: Histogram<u64>,
    pub joined: Histogram<u64>,
    pub server_cpu: f64,
    pub generator_cpu: f64,
}

#[derive(Default)]
struct Tally {
    completed: u64,
    failed: u64,
    first_error: Option<String>,
}

/// Runs `workers` loops for `secs` against the nodes of `cluster`.
pub async fn run(cluster: &Cluster, workers: usize, secs: f64, sources: usize) -> Churn {
    let pids = cluster.node_pids();
    let me = [std::process::id()];
    let cpu = (CpuSample::take(&pids), CpuSample::take(&me));
    let start = now_ns();
    let until = start + (secs * 1e9) as u64;
    let tally = Arc::new(Mutex::new(Tally::default()));
    let mut tasks = tokio::task::JoinSet::new();
    for w in 0..workers {
        let addr = cluster.nodes[w % cluster.nodes.len()].addr;
        let tally = tally.clone();
        tasks.spawn(async move {
            let target = Target {
                addr,
                path: format!("/ws?room=churn&name=c{w}"),
            };
            let (mut upgrade, mut joined) = (histogram(), histogram());
            let mut reader = FrameReader::new(1024);
            let mut n = w;
            while now_ns() < until {
                n += workers;
                let source = ws::source_addr(n, sources);
                match once(&target, source, &mut reader).await {
                    Ok((u, j)) => {
                        upgrade.saturating_record(u.max(1));
                        joined.saturating_record(j.max(1));
                        tally.lock().expect("tally lock").completed += 1;
                    }
                    Err(e) => {
                        {
                            let mut t = tally.lock().expect("tally lock");
                            t.failed += 1;
                            t.first_error.get_or_insert_with(|| e.to_string());
                        }
                        tokio::time::sleep(Duration::from_millis(10)).await;
                    }
                }
            }
            (upgrade, joined)
        });
    }
    let (mut upgrade, mut joined) = (histogram(), histogram());
    while let Some(Ok((u, j))) = tasks.join_next().await {
        let _ = upgrade.add(&u);
        let _ = joined.add(&j);
    }
    let elapsed = (now_ns() - start) as f64 * 1e-9;
    let t = std::mem::take(&mut *tally.lock().expect("tally lock"));
    Churn {
        completed: t.completed,
        failed: t.failed,
        first_error: t.first_error,
        per_sec: t.completed as f64 / elapsed,
        upgrade,
        joined,
        server_cpu: cpu.0.percent_since(&pids),
        generator_cpu: cpu.1.percent_since(&me),
    }
}

/// One connection's life; the microseconds to the 101 and to `joined`.
async fn once(
    target: &Target,
    source: std::net::IpAddr,
    reader: &mut FrameReader,
) -> anyhow::Result<(u64, u64)> {
    let t0 = now_ns();
    let mut stream = ws::connect(target, source, reader).await?;
    let t1 = now_ns();
    ws::wait_joined(&mut stream, reader, Duration::from_secs(10)).await?;
    let t2 = now_ns();
    let mut close = Vec::new();
    ws::encode_client_frame(&mut close, OP_CLOSE, &1000u16.to_be_bytes());
    stream.write_all(&close).await?;
    // Wait for the server's close frame or the end of the stream, briefly.
    let wait = async {
        loop {
            let mut closed = false;
            reader.parse(|op, _| closed |= op == OP_CLOSE);
            if closed || !matches!(reader.fill(&mut stream).await, Ok(n) if n > 0) {
                return;
            }
        }
    };
    let _ = tokio::time::timeout(Duration::from_secs(2), wait).await;
    Ok(((t1 - t0) / 1000, (t2 - t0) / 1000))
}
