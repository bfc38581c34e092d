//! The join storm: a room of M members that all asked for presence events (held by worker
//! processes, plus a sample in this process that counts what it receives), then new users
//! joining it at a set rate. Measures the presence frames each sampled member gets per
//! second, the users they are told of, the redis-server's CPU time over the storm, and the
//! joins' latency.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use hdrhistogram::Histogram;
use tokio::io::AsyncWriteExt;
use tokio::sync::{Semaphore, oneshot};
use tokio::task::JoinSet;

use crate::cluster::{Cluster, CpuSample, ServerOpts, Setup, cpu_secs};
use crate::idle::{self, HoldSpec, Holders};
use crate::presence::{count_users, frame_type, node_env};
use crate::report::{Table, count, percentiles};
use crate::suite::Plan;
use crate::track::{histogram, now_ns};
use crate::ws::{self, FrameReader, OP_CLOSE, OP_PING, OP_TEXT, Target};

const OP_PONG: u8 = 0xA;

/// The room of the storm.
const ROOM: &str = "storm";

/// What one sampled member has received so far.
#[derive(Default)]
struct Counts {
    /// `member_joined` and `member_left` frames.
    frames: AtomicU64,
    /// Their payload bytes.
    bytes: AtomicU64,
    /// Users announced by `member_joined`.
    arrivals: AtomicU64,
}

/// A snapshot of every sampled member's counts: (frames, bytes, arrivals) each.
type Snapshot = Vec<(u64, u64, u64)>;

/// What a storm measured.
struct Storm {
    members: usize,
    /// Seconds to connect the members (and for their own arrivals to be announced).
    setup_secs: f64,
    joins: Joins,
    latency: Histogram<u64>,
    /// Seconds over which the joins were started.
    storm_secs: f64,
    /// Seconds from the first join until the sample went quiet.
    window_secs: f64,
    /// Per sampled member: presence frames and KiB per second during the joins, and users
    /// announced over the window.
    frames: Vec<f64>,
    kib: Vec<f64>,
    arrivals: Vec<f64>,
    redis_secs: f64,
    server_cpu: f64,
    trouble: String,
}

/// Runs the storm on two nodes on Redis with presence on; its Markdown table.
pub async fn run(plan: &Plan, opts: &ServerOpts) -> anyhow::Result<String> {
    let mut table = Table::new(
        &format!(
            "Join storm: {} members joined with presence, then {} joins/s of new users (asking \
             for presence too) for {} s, redis 2 nodes; presence frames counted on {} members",
            count(plan.storm_members as f64),
            plan.storm_rate,
            plan.storm_secs,
            plan.storm_sample.clamp(1, plan.storm_members.max(1))
        ),
        &[
            "members",
            "setup s",
            "joins made",
            "joins/s",
            "failed",
            "join p50 / p99 / max ms",
            "frames/s per member: mean",
            "max",
            "KiB/s per member",
            "arrivals told per member: mean / min",
            "redis CPU s",
            "redis CPU %",
            "server CPU %",
            "server reports",
        ],
    );
    eprintln!("presence join storm");
    let s = measure(plan, opts).await?;
    let [p50, p99, _, max] = percentiles(&s.latency);
    let mut reports: Vec<String> = s.joins.first_error.into_iter().collect();
    reports.extend((!s.trouble.is_empty()).then_some(s.trouble));
    table.push(vec![
        count(s.members as f64),
        format!("{:.1}", s.setup_secs),
        count(s.joins.joined as f64),
        format!("{:.0}", s.joins.joined as f64 / s.storm_secs),
        s.joins.failed.to_string(),
        format!("{p50} / {p99} / {max}"),
        format!("{:.1}", mean(&s.frames)),
        format!("{:.1}", max_of(&s.frames)),
        format!("{:.1}", mean(&s.kib)),
        format!(
            "{:.0} / {:.0} of {}",
            mean(&s.arrivals),
            s.arrivals.iter().copied().fold(f64::INFINITY, f64::min),
            s.joins.joined
        ),
        format!("{:.2}", s.redis_secs),
        format!("{:.0}", 100.0 * s.redis_secs / s.window_secs.max(1e-9)),
        format!("{:.0}", s.server_cpu),
        if reports.is_empty() {
            "-".into()
        } else {
            reports.join("; ")
        },
    ]);
    Ok(format!(
        "{}\nFrames and KiB per second over the {} s of joins; arrivals told: users announced \
         by `member_joined` to a sampled member from the first join until 1 s without any \
         (window {:.1} s, over which the redis CPU % is taken).\n\n",
        table.markdown(),
        plan.storm_secs,
        s.window_secs
    ))
}

/// Starts the servers, fills the room, runs the joins and stops everything again.
async fn measure(plan: &Plan, opts: &ServerOpts) -> anyhow::Result<Storm> {
    let cluster = Cluster::start_with_env(Setup::Redis2, opts, &node_env(true)).await?;
    let redis = *cluster.redis_pids().first().context("no redis-server")?;
    let setup = Instant::now();
    let sample_size = plan.storm_sample.clamp(1, plan.storm_members.max(1));
    let spec = HoldSpec {
        conns: plan.storm_members.saturating_sub(sample_size),
        per_process: plan.per_process,
        sources: plan.sources,
        room: ROOM.into(),
        name: "m".into(),
        presence: true,
    };
    let holders = Holders::spawn(&cluster, &spec).await?;
    let (sample, _sample_tasks) = connect_sample(&cluster, sample_size, plan.sources).await?;
    // The members' own arrivals are announced for a while after the last one joined.
    wait_quiet(&sample, Duration::from_secs(120)).await;
    let setup_secs = setup.elapsed().as_secs_f64();
    let before = snapshot(&sample);
    let (redis_before, nodes) = (cpu_secs(redis), cluster.node_pids());
    let node_cpu = CpuSample::take(&nodes);
    let started = Instant::now();
    let joins = Arc::new(Mutex::new(Joins::default()));
    let total = (plan.storm_rate * plan.storm_secs).round() as usize;
    let joiners = spawn_joins(&cluster, plan, total, joins.clone()).await;
    let during = snapshot(&sample);
    let storm_secs = started.elapsed().as_secs_f64();
    wait_joins(&joins, total, Duration::from_secs(30)).await;
    wait_quiet(&sample, Duration::from_secs(30)).await;
    let after = snapshot(&sample);
    let window_secs = started.elapsed().as_secs_f64();
    let redis_secs = cpu_secs(redis) - redis_before;
    let server_cpu = node_cpu.percent_since(&nodes);
    let trouble = cluster.trouble().await;
    let mut joins = std::mem::take(&mut *joins.lock().expect("joins lock"));
    let latency = joins.latency.take().unwrap_or_else(histogram);
    drop(joiners);
    let members = holders.joined + sample.len();
    holders.release().await;
    drop(cluster);
    tokio::time::sleep(Duration::from_millis(500)).await;
    Ok(Storm {
        members,
        setup_secs,
        joins,
        latency,
        storm_secs,
        window_secs,
        frames: per_member(&before, &during, |c| c.0, storm_secs),
        kib: per_member(&before, &during, |c| c.1, storm_secs * 1024.0),
        arrivals: per_member(&before, &after, |c| c.2, 1.0),
        redis_secs,
        server_cpu,
        trouble,
    })
}

/// What the storm's joins measured.
#[derive(Default)]
struct Joins {
    latency: Option<Histogram<u64>>,
    joined: u64,
    failed: u64,
    first_error: Option<String>,
}

/// Opens `total` connections of new users into the room at `storm_rate` per second, each of
/// which asks for presence events and stays; returns once the last one has started.
async fn spawn_joins(
    cluster: &Cluster,
    plan: &Plan,
    total: usize,
    joins: Arc<Mutex<Joins>>,
) -> JoinSet<()> {
    joins.lock().expect("joins lock").latency = Some(histogram());
    let mut tasks = JoinSet::new();
    let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / plan.storm_rate.max(0.1)));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let nodes = cluster.nodes.len();
    for n in 0..total {
        tick.tick().await;
        let target = Target {
            addr: cluster.nodes[n % nodes].addr,
            path: format!("/ws?room={ROOM}&name=j{n}&presence=1"),
        };
        let source = ws::source_addr(n, plan.sources);
        let joins = joins.clone();
        tasks.spawn(async move {
            let mut reader = FrameReader::new(4096);
            let t0 = now_ns();
            let open = async {
                let mut stream = ws::connect(&target, source, &mut reader).await?;
                ws::wait_joined(&mut stream, &mut reader, Duration::from_secs(30)).await?;
                anyhow::Ok(stream)
            };
            let result = open.await;
            let us = (now_ns() - t0) / 1000;
            let stream = {
                let mut j = joins.lock().expect("joins lock");
                match result {
                    Ok(stream) => {
                        j.joined += 1;
                        if let Some(h) = j.latency.as_mut() {
                            h.saturating_record(us.max(1));
                        }
                        stream
                    }
                    Err(e) => {
                        j.failed += 1;
                        j.first_error.get_or_insert_with(|| e.to_string());
                        return;
                    }
                }
            };
            idle::keep(stream, reader).await;
        });
    }
    tasks
}

/// Waits until every join has succeeded or failed, at most `cap`.
async fn wait_joins(joins: &Mutex<Joins>, total: usize, cap: Duration) {
    let deadline = Instant::now() + cap;
    while Instant::now() < deadline {
        let done = {
            let j = joins.lock().expect("joins lock");
            (j.joined + j.failed) as usize >= total
        };
        if done {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Connects the sampled members (asking for presence events) and waits for each `joined`.
async fn connect_sample(
    cluster: &Cluster,
    size: usize,
    sources: usize,
) -> anyhow::Result<(Vec<Arc<Counts>>, JoinSet<()>)> {
    let gate = Arc::new(Semaphore::new(64));
    let nodes = cluster.nodes.len();
    let mut tasks = JoinSet::new();
    let mut sample = Vec::new();
    let mut ready = Vec::new();
    for i in 0..size {
        let target = Target {
            addr: cluster.nodes[i % nodes].addr,
            path: format!("/ws?room={ROOM}&name=s{i}&presence=1"),
        };
        let counts = Arc::new(Counts::default());
        sample.push(counts.clone());
        let (tx, rx) = oneshot::channel();
        ready.push(rx);
        let source = ws::source_addr(i, sources);
        let gate = gate.clone();
        tasks.spawn(async move {
            let mut reader = FrameReader::new(64 * 1024);
            let open = async {
                let _permit = gate.acquire().await?;
                let mut stream = ws::connect(&target, source, &mut reader).await?;
                ws::wait_joined(&mut stream, &mut reader, Duration::from_secs(60)).await?;
                anyhow::Ok(stream)
            };
            match open.await {
                Ok(stream) => {
                    let _ = tx.send(Ok(()));
                    listen(stream, reader, &counts).await;
                }
                Err(e) => {
                    let _ = tx.send(Err(e));
                }
            }
        });
    }
    for rx in ready {
        match rx.await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => bail!("a sampled member could not join: {e}"),
            Err(_) => bail!("a sampled member's task ended"),
        }
    }
    Ok((sample, tasks))
}

/// Counts a sampled member's presence events, answering pings, until the connection ends.
async fn listen(mut stream: tokio::net::TcpStream, mut reader: FrameReader, counts: &Counts) {
    let mut out = Vec::new();
    loop {
        let mut closed = false;
        reader.parse(|op, payload| match op {
            OP_TEXT => {
                let joined = frame_type(payload, b"member_joined");
                if joined || frame_type(payload, b"member_left") {
                    counts.frames.fetch_add(1, Ordering::Relaxed);
                    let len = payload.len() as u64;
                    counts.bytes.fetch_add(len, Ordering::Relaxed);
                }
                if joined {
                    let users = count_users(payload) as u64;
                    counts.arrivals.fetch_add(users, Ordering::Relaxed);
                }
            }
            OP_PING => ws::encode_client_frame(&mut out, OP_PONG, payload),
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

fn snapshot(sample: &[Arc<Counts>]) -> Snapshot {
    sample
        .iter()
        .map(|c| {
            (
                c.frames.load(Ordering::Relaxed),
                c.bytes.load(Ordering::Relaxed),
                c.arrivals.load(Ordering::Relaxed),
            )
        })
        .collect()
}

/// Waits until the sample has received no presence frame for 1 s, at most `cap`.
async fn wait_quiet(sample: &[Arc<Counts>], cap: Duration) {
    let deadline = Instant::now() + cap;
    let mut last = snapshot(sample);
    while Instant::now() < deadline {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let now = snapshot(sample);
        if now == last {
            return;
        }
        last = now;
    }
}

/// Each member's growth of one count between two snapshots, divided by `per`.
fn per_member(
    before: &Snapshot,
    after: &Snapshot,
    field: impl Fn(&(u64, u64, u64)) -> u64,
    per: f64,
) -> Vec<f64> {
    before
        .iter()
        .zip(after)
        .map(|(b, a)| field(a).saturating_sub(field(b)) as f64 / per.max(1e-9))
        .collect()
}

/// The mean of `v`; 0 when it is empty.
fn mean(v: &[f64]) -> f64 {
    if v.is_empty() {
        0.0
    } else {
        v.iter().sum::<f64>() / v.len() as f64
    }
}

/// The largest of `v`; 0 when it is empty.
fn max_of(v: &[f64]) -> f64 {
    v.iter().copied().fold(0.0, f64::max)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn growth_per_member() {
        let before = vec![(1, 10, 0), (2, 20, 5)];
        let after = vec![(5, 50, 3), (2, 20, 9)];
        assert_eq!(per_member(&before, &after, |c| c.0, 2.0), [2.0, 0.0]);
        assert_eq!(per_member(&before, &after, |c| c.2, 1.0), [3.0, 4.0]);
        let v = per_member(&before, &after, |c| c.1, 1.0);
        assert_eq!((mean(&v), max_of(&v)), (20.0, 40.0));
        assert_eq!((mean(&[]), max_of(&[])), (0.0, 0.0));
    }
}
