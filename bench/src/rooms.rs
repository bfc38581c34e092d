//! Many rooms: R rooms of M members each (by default 2,000 × 20 = 40,000 connections) over the
//! nodes, member j of room r on node (r + j) mod nodes, so every room has members on several
//! nodes; the first P members of each room also publish, the total rate shared between all
//! publishers and their sends spread evenly over each second. A ramp of offered rates, as in
//! max-rate, until p99 passes the limit or a message is lost, on each setup (by default four
//! nodes sharing one Redis, then four nodes on a three-shard Redis Cluster): deliveries per
//! second, loss, duplicates, latency, and the CPU of the nodes and of each Redis.
//!
//! One process may hold only so many files, so the connections live in worker processes of
//! the tool (`room-worker`, at most `--per-process` connections each, whole rooms each, spread
//! over `--sources` source addresses). Each worker runs a step when told on its standard input
//! (a JSON line: rate per publisher, seconds, drain) and answers with one JSON line: its
//! counters and its latency histograms as (value, count) pairs, which the tool adds up.

use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::process::Stdio;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader, Lines};
use tokio::net::TcpStream;
use tokio::process::{Child, ChildStdin, ChildStdout, Command};
use tokio::sync::{Semaphore, watch};

use crate::cluster::{Cluster, CpuSample, MachineSample, ServerOpts, Setup, key_slot};
use crate::fanout::Step;
use crate::report::{Table, count, ms, percentiles, ratio};
use crate::suite::{Plan, failure};
use crate::track::{Seqs, encode_send, error_code, histogram, now_ns, parse_delivery};
use crate::ws::{self, FrameReader, OP_CLOSE, OP_PING, OP_TEXT, Target};

const OP_PONG: u8 = 0xA;

/// How long a drain waits with no delivery arriving before it gives up.
const STALL: Duration = Duration::from_secs(2);

/// Latency histograms per worker, each shared by the connections whose index has its number
/// modulo this (one histogram per connection would cost 40 KiB each).
const SHARDS: usize = 16;

/// The nodes' extra environment: presence through Redis off, as it always is in cluster mode,
/// so that every setup does the same work per message and per join.
const NODE_ENV: [(&str, &str); 1] = [("SCALECHAT_REDIS__PRESENCE", "false")];

fn room_name(room: usize) -> String {
    format!("rm{room}")
}

/// The sizes of a run: rooms, members of each, publishers among them.
#[derive(Clone, Copy)]
pub struct Shape {
    pub rooms: usize,
    pub members: usize,
    pub publishers: usize,
}

impl Shape {
    fn of(plan: &Plan) -> Shape {
        let members = plan.room_members.max(1);
        Shape {
            rooms: plan.rooms.max(1),
            members,
            publishers: plan.room_publishers.clamp(1, members),
        }
    }
}

/// Runs the ramp on each setup; the Markdown tables and whether no message was duplicated.
pub async fn run(
    plan: &Plan,
    opts: &ServerOpts,
    setups: &[Setup],
) -> anyhow::Result<(String, bool)> {
    let shape = Shape::of(plan);
    let title = format!(
        "Rooms: {} rooms × {} members = {} connections, {} publisher{} per room, steps of {} s \
         from {} msg/s, ×{} each, p99 limit {} ms",
        count(shape.rooms as f64),
        shape.members,
        count((shape.rooms * shape.members) as f64),
        shape.publishers,
        if shape.publishers == 1 { "" } else { "s" },
        plan.step_secs,
        count(plan.rooms_start_rate),
        plan.factor,
        plan.p99_limit_ms
    );
    let first = setups.first().map_or("-".into(), Setup::to_string);
    let mut steps = Table::new(&format!("{title}: every step"), STEP_HEADER);
    let best_header = [
        "setup",
        "best deliveries/s",
        &format!("× {first}"),
        "offered msg/s",
        "p99 ms at best",
        "node CPU % at best",
        "redis CPU % at best",
        "busiest shard CPU % at best",
        "next step failed because",
        "server reports",
    ];
    let mut best = Table::new(&format!("{title}: best sustained step"), &best_header);
    let mut notes = Vec::new();
    let mut baseline = None;
    let mut clean = true;
    for &setup in setups {
        eprintln!("rooms on {setup}");
        let cluster = Cluster::start_with_env(setup, opts, &NODE_ENV).await?;
        let started = Instant::now();
        let mut workers = Workers::spawn(&cluster, plan, shape).await?;
        let mut note = format!(
            "{setup}: {} members joined in {:.1} s, held by {} worker processes",
            count((shape.rooms * shape.members) as f64),
            started.elapsed().as_secs_f64(),
            workers.procs.len()
        );
        if let Some(per_shard) = rooms_per_shard(&cluster, shape.rooms) {
            let list: Vec<String> = per_shard.iter().map(|n| n.to_string()).collect();
            note.push_str(&format!("; rooms per shard {}", list.join(" / ")));
        }
        notes.push(note);
        // Warm-up, not reported: long enough for every publisher to send a message at the
        // start rate (within bounds).
        let publishers = (shape.rooms * shape.publishers) as f64;
        let warm_secs = (publishers / plan.rooms_start_rate.max(1e-3)).clamp(0.5, 5.0);
        let warm = workers
            .step(&cluster, plan.rooms_start_rate, warm_secs, 2.0)
            .await?;
        clean &= warm.step.duplicates == 0;
        let mut rate = plan.rooms_start_rate;
        let mut top: Option<RoomStep> = None;
        let mut why = format!("reached {} steps", plan.max_steps);
        for _ in 0..plan.max_steps {
            let s = workers
                .step(&cluster, rate, plan.step_secs, plan.drain_secs)
                .await?;
            clean &= s.step.duplicates == 0;
            let failed = failure(&s.step, plan.p99_limit_ms);
            steps.push(step_row(setup, &s, shape.members, &failed));
            if !failed.is_empty() {
                why = format!("{} msg/s: {failed}", count(rate));
                break;
            }
            top = Some(s);
            rate *= plan.factor;
        }
        let trouble = cluster.trouble().await;
        let best_rate = top.as_ref().map_or(0.0, |s| s.step.deliveries_per_sec);
        let reference = *baseline.get_or_insert(best_rate);
        best.push(match &top {
            Some(s) => vec![
                setup.to_string(),
                count(best_rate),
                ratio(best_rate, Some(reference)),
                count(s.step.rate),
                ms(s.step.latency.value_at_quantile(0.99)),
                format!("{:.0}", s.step.server_cpu),
                redis_cpu(s),
                s.shard_cpu
                    .iter()
                    .copied()
                    .reduce(f64::max)
                    .map_or("-".into(), |c| format!("{c:.0}")),
                why,
                dash(trouble),
            ],
            None => {
                let mut row = vec![setup.to_string(), "0".into()];
                row.extend(["-"; 6].map(String::from));
                row.extend([why, dash(trouble)]);
                row
            }
        });
        workers.release().await;
        drop(cluster);
        // Let the connections' TIME_WAIT and the servers' exits settle before the next one.
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let mut text = steps.markdown() + "\n" + &best.markdown() + "\n";
    for note in notes {
        text.push_str(&format!("{note}.\n"));
    }
    text.push('\n');
    Ok((text, clean))
}

fn dash(s: String) -> String {
    if s.is_empty() { "-".into() } else { s }
}

/// How many of the rooms each shard of a Redis Cluster owns (by the slot of the room's hash
/// tag); `None` unless the setup is a cluster.
fn rooms_per_shard(cluster: &Cluster, rooms: usize) -> Option<Vec<usize>> {
    let shards = cluster.redis_pids().len();
    if shards < 2 {
        return None;
    }
    let mut counts = vec![0; shards];
    for room in 0..rooms {
        counts[cluster.shard_of_slot(key_slot(&room_name(room)))?] += 1;
    }
    Some(counts)
}

/// The columns of a rooms step.
const STEP_HEADER: &[&str] = &[
    "setup",
    "offered msg/s",
    "offered deliveries/s",
    "sent",
    "deliveries/s",
    "lost",
    "dup",
    "p50 ms",
    "p99 ms",
    "p99.9 ms",
    "max ms",
    "as read p50 / p99 ms",
    "node CPU %",
    "redis CPU %",
    "per shard CPU %",
    "generator CPU %",
    "other CPU %",
    "failed because",
];

fn step_row(setup: Setup, s: &RoomStep, members: usize, failed: &str) -> Vec<String> {
    let step = &s.step;
    let [p50, p99, p999, max] = percentiles(&step.latency);
    let [r50, r99, _, _] = percentiles(&step.read_latency);
    vec![
        setup.to_string(),
        count(step.rate),
        count(step.rate * members as f64),
        count(step.sent as f64),
        count(step.deliveries_per_sec),
        step.lost().to_string(),
        step.duplicates.to_string(),
        p50,
        p99,
        p999,
        max,
        format!("{r50} / {r99}"),
        format!("{:.0}", step.server_cpu),
        redis_cpu(s),
        if s.shard_cpu.len() > 1 {
            let each: Vec<String> = s.shard_cpu.iter().map(|c| format!("{c:.0}")).collect();
            each.join(" / ")
        } else {
            "-".into()
        },
        format!("{:.0}", step.generator_cpu),
        format!("{:.0}", step.other_cpu),
        if failed.is_empty() {
            "-".into()
        } else {
            failed.to_owned()
        },
    ]
}

fn redis_cpu(s: &RoomStep) -> String {
    if s.shard_cpu.is_empty() {
        "-".into()
    } else {
        format!("{:.0}", s.step.redis_cpu)
    }
}

/// One step over every worker.
pub struct RoomStep {
    pub step: Step,
    /// CPU of each redis-server (each shard), in percent of one core.
    shard_cpu: Vec<f64>,
}

/// What the tool tells a worker: run one step.
#[derive(Serialize, Deserialize)]
struct StepCommand {
    /// Messages per second of each publisher.
    rate: f64,
    secs: f64,
    drain_secs: f64,
}

/// A worker's answer once its connections are open.
#[derive(Serialize, Deserialize)]
struct Ready {
    joined: usize,
    failed: usize,
    first_error: Option<String>,
}

/// A worker's answer to a step.
#[derive(Serialize, Deserialize)]
struct WorkerStep {
    sent: u64,
    expected: u64,
    unique: u64,
    duplicates: u64,
    deliveries: u64,
    start_ns: u64,
    last_delivery_ns: u64,
    /// Send to arrival in the socket, µs: (value, count) pairs of the histogram.
    latency: Vec<(u64, u64)>,
    /// Send to the moment the worker read it.
    read_latency: Vec<(u64, u64)>,
    /// Connections that have ended so far.
    disconnected: usize,
    /// `error` frames during the step, by code.
    errors: HashMap<String, u64>,
    /// Close codes of the connections the servers closed so far.
    close_codes: HashMap<u16, u64>,
}

fn pairs(h: &Histogram<u64>) -> Vec<(u64, u64)> {
    h.iter_recorded()
        .map(|v| (v.value_iterated_to(), v.count_at_value()))
        .collect()
}

fn add_pairs(h: &mut Histogram<u64>, pairs: &[(u64, u64)]) {
    for &(value, n) in pairs {
        h.saturating_record_n(value, n);
    }
}

/// The worker processes of one setup, killed when dropped.
pub struct Workers {
    procs: Vec<Worker>,
    /// Publishers over all rooms.
    publishers: usize,
    /// Member connections over all rooms.
    connections: usize,
}

struct Worker {
    child: Child,
    pid: u32,
    stdin: Option<ChildStdin>,
    lines: Lines<BufReader<ChildStdout>>,
}

impl Workers {
    /// Starts the workers (whole rooms each, at most `--per-process` connections each) and
    /// waits until every member has joined.
    pub async fn spawn(cluster: &Cluster, plan: &Plan, shape: Shape) -> anyhow::Result<Workers> {
        let addrs: Vec<String> = cluster.nodes.iter().map(|n| n.addr.to_string()).collect();
        let rooms_each = (plan.per_process / shape.members).max(1);
        let count = shape.rooms.div_ceil(rooms_each);
        let mut procs = Vec::new();
        let mut first = 0;
        for w in 0..count {
            let rooms = (shape.rooms - first) / (count - w);
            let mut cmd = Command::new(std::env::current_exe()?);
            cmd.arg("room-worker")
                .args(["--addrs", &addrs.join(",")])
                .args(["--first-room", &first.to_string()])
                .args(["--rooms", &rooms.to_string()])
                .args(["--total-rooms", &shape.rooms.to_string()])
                .args(["--members", &shape.members.to_string()])
                .args(["--publishers", &shape.publishers.to_string()])
                .args(["--sources", &plan.sources.to_string()]);
            first += rooms;
            let mut child = cmd
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .kill_on_drop(true)
                .spawn()?;
            let stdout = child.stdout.take().context("worker stdout")?;
            procs.push(Worker {
                pid: child.id().context("worker pid")?,
                stdin: child.stdin.take(),
                lines: BufReader::new(stdout).lines(),
                child,
            });
        }
        let mut failed = 0;
        let mut first_error = None;
        for worker in &mut procs {
            let line = worker
                .lines
                .next_line()
                .await?
                .context("room worker ended before its connections were open")?;
            let ready: Ready = serde_json::from_str(&line)
                .with_context(|| format!("room worker: unexpected report {line:?}"))?;
            failed += ready.failed;
            first_error = first_error.or(ready.first_error);
        }
        if failed > 0 {
            bail!(
                "{failed} of {} members failed to join: {}",
                shape.rooms * shape.members,
                first_error.unwrap_or_default()
            );
        }
        Ok(Workers {
            procs,
            publishers: shape.rooms * shape.publishers,
            connections: shape.rooms * shape.members,
        })
    }

    /// Publishes `rate` messages per second in all, for `secs`, waits up to `drain_secs` for
    /// the last deliveries, and measures.
    pub async fn step(
        &mut self,
        cluster: &Cluster,
        rate: f64,
        secs: f64,
        drain_secs: f64,
    ) -> anyhow::Result<RoomStep> {
        let command = StepCommand {
            rate: rate / self.publishers as f64,
            secs,
            drain_secs,
        };
        let line = serde_json::to_string(&command)? + "\n";
        let nodes = cluster.node_pids();
        let redis = cluster.redis_pids();
        let pg = cluster.pg_pids();
        let mut generator: Vec<u32> = self.procs.iter().map(|w| w.pid).collect();
        generator.push(std::process::id());
        let node_cpu = CpuSample::take(&nodes);
        let pg_cpu = CpuSample::take(&pg);
        let shard_cpu: Vec<CpuSample> = redis.iter().map(|&p| CpuSample::take(&[p])).collect();
        let generator_cpu = CpuSample::take(&generator);
        let machine = MachineSample::take();
        for worker in &mut self.procs {
            let stdin = worker.stdin.as_mut().context("worker stdin closed")?;
            stdin.write_all(line.as_bytes()).await?;
            stdin.flush().await?;
        }
        let limit = Duration::from_secs_f64(secs + drain_secs + 30.0);
        let mut reports = Vec::new();
        for worker in &mut self.procs {
            let answer = tokio::time::timeout(limit, worker.lines.next_line())
                .await
                .context("a room worker did not answer in time")??
                .context("a room worker ended")?;
            let report: WorkerStep = serde_json::from_str(&answer)
                .with_context(|| format!("room worker: unexpected report {answer:?}"))?;
            reports.push(report);
        }
        let server_cpu = node_cpu.percent_since(&nodes);
        let shard_cpu: Vec<f64> = shard_cpu
            .iter()
            .zip(&redis)
            .map(|(sample, &pid)| sample.percent_since(&[pid]))
            .collect();
        let redis_cpu: f64 = shard_cpu.iter().sum();
        let generator_cpu = generator_cpu.percent_since(&generator);
        let pg_cpu = pg_cpu.percent_since(&pg);
        let other_cpu =
            (machine.percent_since() - server_cpu - redis_cpu - generator_cpu - pg_cpu).max(0.0);
        let mut step = Step {
            rate,
            publishers: self.publishers,
            members: self.connections,
            sent: 0,
            expected: 0,
            unique: 0,
            duplicates: 0,
            deliveries_per_sec: 0.0,
            latency: histogram(),
            cross_latency: histogram(),
            read_latency: histogram(),
            server_cpu,
            redis_cpu,
            pg_cpu,
            generator_cpu,
            other_cpu,
            disconnected: 0,
            errors: HashMap::new(),
            close_codes: HashMap::new(),
        };
        let start = reports.iter().map(|r| r.start_ns).min().unwrap_or(0);
        let mut last = start;
        let mut deliveries = 0;
        for r in &reports {
            step.sent += r.sent;
            step.expected += r.expected;
            step.unique += r.unique;
            step.duplicates += r.duplicates;
            deliveries += r.deliveries;
            last = last.max(r.last_delivery_ns);
            add_pairs(&mut step.latency, &r.latency);
            add_pairs(&mut step.read_latency, &r.read_latency);
            step.disconnected += r.disconnected;
            for (code, n) in &r.errors {
                *step.errors.entry(code.clone()).or_default() += n;
            }
            for (code, n) in &r.close_codes {
                *step.close_codes.entry(*code).or_default() += n;
            }
        }
        let secs = ((last - start) as f64 * 1e-9).max(secs);
        step.deliveries_per_sec = deliveries as f64 / secs;
        Ok(RoomStep { step, shard_cpu })
    }

    /// Closes the workers' standard input (they close their connections and exit) and waits
    /// for them, at most 10 s each (one still running then is killed when dropped).
    pub async fn release(mut self) {
        for worker in &mut self.procs {
            drop(worker.stdin.take());
            let _ = tokio::time::timeout(Duration::from_secs(10), worker.child.wait()).await;
        }
    }
}

/// The arguments of the `room-worker` process.
#[derive(Clone, Debug, clap::Args)]
pub struct WorkerArgs {
    /// The nodes, in the same order in every worker: member j of room r connects to node
    /// (r + j) mod their number.
    #[arg(long, value_delimiter = ',')]
    addrs: Vec<SocketAddr>,
    /// The first room of this worker (rooms are `rm0`, `rm1`, …).
    #[arg(long)]
    first_room: usize,
    /// How many rooms, from the first.
    #[arg(long)]
    rooms: usize,
    /// Rooms over all workers, to spread every publisher's sends evenly over time.
    #[arg(long)]
    total_rooms: usize,
    #[arg(long)]
    members: usize,
    /// Members of each room that publish (the first ones).
    #[arg(long)]
    publishers: usize,
    /// Source addresses (127.0.0.2 onwards) to spread the connections over.
    #[arg(long)]
    sources: usize,
}

/// The publishers' current orders: `rate` messages per second each from `start_ns` for
/// `period_ns`.
#[derive(Clone, Copy, Default)]
struct Phase {
    rate: f64,
    start_ns: u64,
    period_ns: u64,
}

/// What the connections of one worker add up.
struct Shared {
    joined: AtomicUsize,
    failed: AtomicUsize,
    first_error: Mutex<Option<String>>,
    sent: AtomicU64,
    unique: AtomicU64,
    duplicates: AtomicU64,
    deliveries: AtomicU64,
    last_delivery_ns: AtomicU64,
    disconnected: AtomicUsize,
    errors: Mutex<HashMap<String, u64>>,
    close_codes: Mutex<HashMap<u16, u64>>,
    latencies: Vec<Mutex<Latencies>>,
}

struct Latencies {
    /// Send to arrival in the receiver's socket (the kernel's stamp).
    latency: Histogram<u64>,
    /// Send to the moment the worker read it.
    read: Histogram<u64>,
}

/// The `room-worker`: opens every member connection of its rooms, prints a [`Ready`] line,
/// then runs a step for each [`StepCommand`] line on standard input and prints a
/// [`WorkerStep`] line; closes everything when standard input closes.
pub async fn worker(args: WorkerArgs) -> anyhow::Result<()> {
    if args.addrs.is_empty() || args.members == 0 {
        bail!("room-worker: no nodes or no members");
    }
    let shared = Arc::new(Shared {
        joined: AtomicUsize::new(0),
        failed: AtomicUsize::new(0),
        first_error: Mutex::new(None),
        sent: AtomicU64::new(0),
        unique: AtomicU64::new(0),
        duplicates: AtomicU64::new(0),
        deliveries: AtomicU64::new(0),
        last_delivery_ns: AtomicU64::new(0),
        disconnected: AtomicUsize::new(0),
        errors: Mutex::new(HashMap::new()),
        close_codes: Mutex::new(HashMap::new()),
        latencies: (0..SHARDS)
            .map(|_| {
                Mutex::new(Latencies {
                    latency: histogram(),
                    read: histogram(),
                })
            })
            .collect(),
    });
    let (orders, phase) = watch::channel(Phase::default());
    let gate = Arc::new(Semaphore::new(512));
    let mut tasks = tokio::task::JoinSet::new();
    let publishers = args.publishers.clamp(1, args.members);
    let all_publishers = (args.total_rooms.max(1) * publishers) as f64;
    for room in args.first_room..args.first_room + args.rooms {
        let name = room_name(room);
        for j in 0..args.members {
            let index = room * args.members + j;
            let sender = (j < publishers).then(|| Sender {
                id: j as u32,
                offset: (room * publishers + j) as f64 / all_publishers,
                seq: 0,
                k: 0,
                phase: Phase::default(),
                orders: phase.clone(),
            });
            let member = Member {
                target: Target {
                    addr: args.addrs[(room + j) % args.addrs.len()],
                    path: format!("/ws?room={name}&name=u{room}-{j}"),
                },
                source: ws::source_addr(index, args.sources),
                room: name.clone(),
                publishers,
                shard: index % SHARDS,
                sender,
                shared: shared.clone(),
            };
            tasks.spawn(member.run(gate.clone()));
        }
    }
    let total = args.rooms * args.members;
    while shared.joined.load(Ordering::Relaxed) + shared.failed.load(Ordering::Relaxed) < total {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let ready = Ready {
        joined: shared.joined.load(Ordering::Relaxed),
        failed: shared.failed.load(Ordering::Relaxed),
        first_error: shared.first_error.lock().expect("error lock").clone(),
    };
    let mut stdout = tokio::io::stdout();
    stdout
        .write_all((serde_json::to_string(&ready)? + "\n").as_bytes())
        .await?;
    stdout.flush().await?;
    let mut commands = BufReader::new(tokio::io::stdin()).lines();
    let members = args.members as u64;
    while let Some(line) = commands.next_line().await? {
        let command: StepCommand = serde_json::from_str(&line)
            .with_context(|| format!("room-worker: unexpected command {line:?}"))?;
        let report = run_step(&shared, &orders, &command, members).await;
        stdout
            .write_all((serde_json::to_string(&report)? + "\n").as_bytes())
            .await?;
        stdout.flush().await?;
    }
    tasks.shutdown().await;
    Ok(())
}

/// Sums of the worker's counters at one moment.
struct Counts {
    sent: u64,
    unique: u64,
    duplicates: u64,
    deliveries: u64,
}

impl Counts {
    fn of(shared: &Shared) -> Counts {
        Counts {
            sent: shared.sent.load(Ordering::Acquire),
            unique: shared.unique.load(Ordering::Acquire),
            duplicates: shared.duplicates.load(Ordering::Acquire),
            deliveries: shared.deliveries.load(Ordering::Acquire),
        }
    }
}

/// One step in this worker: publish at `command.rate` each for `command.secs`, then wait
/// until every member has every message (or nothing has arrived for [`STALL`], or
/// `command.drain_secs` have passed).
async fn run_step(
    shared: &Shared,
    orders: &watch::Sender<Phase>,
    command: &StepCommand,
    members: u64,
) -> WorkerStep {
    let before = Counts::of(shared);
    for l in &shared.latencies {
        let mut l = l.lock().expect("latency lock");
        l.latency.reset();
        l.read.reset();
    }
    shared.errors.lock().expect("errors lock").clear();
    let start_ns = now_ns();
    orders.send_replace(Phase {
        rate: command.rate,
        start_ns,
        period_ns: (command.secs * 1e9) as u64,
    });
    // The publishers stop by themselves at the end of the period; the orders go back to
    // nothing after it, with a margin for a timer that is late.
    tokio::time::sleep(Duration::from_secs_f64(command.secs) + Duration::from_millis(50)).await;
    orders.send_replace(Phase::default());
    tokio::time::sleep(Duration::from_millis(5)).await;
    let sent = shared.sent.load(Ordering::Acquire) - before.sent;
    let expected = sent * members;
    drain(shared, before.unique + expected, command.drain_secs).await;
    let after = Counts::of(shared);
    let (mut latency, mut read) = (histogram(), histogram());
    for l in &shared.latencies {
        let l = l.lock().expect("latency lock");
        let _ = latency.add(&l.latency);
        let _ = read.add(&l.read);
    }
    WorkerStep {
        sent,
        expected,
        unique: after.unique - before.unique,
        duplicates: after.duplicates - before.duplicates,
        deliveries: after.deliveries - before.deliveries,
        start_ns,
        last_delivery_ns: shared.last_delivery_ns.load(Ordering::Acquire),
        latency: pairs(&latency),
        read_latency: pairs(&read),
        disconnected: shared.disconnected.load(Ordering::Acquire),
        errors: std::mem::take(&mut *shared.errors.lock().expect("errors lock")),
        close_codes: shared.close_codes.lock().expect("close lock").clone(),
    }
}

/// Waits until `target` unique deliveries have arrived, or nothing has arrived for [`STALL`],
/// or `max_secs` have passed.
async fn drain(shared: &Shared, target: u64, max_secs: f64) {
    let until = now_ns() + (max_secs * 1e9) as u64;
    let mut seen = shared.deliveries.load(Ordering::Acquire);
    let mut moved = now_ns();
    while shared.unique.load(Ordering::Acquire) < target && now_ns() < until {
        tokio::time::sleep(Duration::from_millis(20)).await;
        let now = shared.deliveries.load(Ordering::Acquire);
        if now != seen {
            (seen, moved) = (now, now_ns());
        } else if now_ns() - moved > STALL.as_nanos() as u64 {
            return;
        }
    }
}

/// A publishing member's schedule: message k of the current phase is due at
/// `start + (k + offset) / rate`, before the end of the period; `offset` (0 to 1, this
/// publisher's place among all of them) spreads the publishers' sends evenly over time.
struct Sender {
    /// The publisher's number in its room (the `B<id>.` of its messages).
    id: u32,
    offset: f64,
    /// The next sequence number (over all phases).
    seq: u64,
    /// Messages sent in the current phase.
    k: u64,
    phase: Phase,
    orders: watch::Receiver<Phase>,
}

impl Sender {
    /// When the next message is due (CLOCK_REALTIME ns); `None` when none is.
    fn due_ns(&self) -> Option<u64> {
        if self.phase.rate <= 0.0 {
            return None;
        }
        let at = ((self.k as f64 + self.offset) / self.phase.rate * 1e9) as u64;
        (at < self.phase.period_ns).then_some(self.phase.start_ns + at)
    }

    /// Appends the `send` frames due by now to `out`.
    fn write_due(&mut self, room: &str, out: &mut Vec<u8>, sent: &AtomicU64) {
        let now = now_ns();
        while let Some(due) = self.due_ns()
            && due <= now
        {
            encode_send(out, room, self.id, self.seq, now_ns());
            self.seq += 1;
            self.k += 1;
            sent.fetch_add(1, Ordering::AcqRel);
        }
    }
}

struct Member {
    target: Target,
    source: IpAddr,
    room: String,
    /// Publishers in the room.
    publishers: usize,
    /// Which of the worker's latency histograms this member records into.
    shard: usize,
    sender: Option<Sender>,
    shared: Arc<Shared>,
}

impl Member {
    async fn run(mut self, gate: Arc<Semaphore>) {
        let mut reader = FrameReader::new(4096);
        let open = async {
            let _permit = gate.acquire().await?;
            let joined = async {
                let mut stream = ws::connect(&self.target, self.source, &mut reader).await?;
                ws::wait_joined(&mut stream, &mut reader, Duration::from_secs(60)).await?;
                ws::stamp_arrivals(&stream);
                anyhow::Ok(stream)
            };
            tokio::time::timeout(Duration::from_secs(90), joined)
                .await
                .context("no joined in 90 s")?
        };
        let stream = match open.await {
            Ok(stream) => {
                self.shared.joined.fetch_add(1, Ordering::AcqRel);
                stream
            }
            Err(e) => {
                let mut first = self.shared.first_error.lock().expect("error lock");
                first.get_or_insert_with(|| format!("{}: {e:#}", self.target.path));
                drop(first);
                self.shared.failed.fetch_add(1, Ordering::AcqRel);
                return;
            }
        };
        let mut conn = Conn {
            stream,
            reader,
            seqs: vec![Seqs::default(); self.publishers],
            out: Vec::new(),
        };
        match self.sender.take() {
            Some(sender) => self.publish(&mut conn, sender).await,
            None => while conn.on_read(&self).await && conn.flush().await {},
        }
        self.shared.disconnected.fetch_add(1, Ordering::AcqRel);
    }

    /// Reads, and sends on the orders of the phase, until the connection ends.
    async fn publish(&self, conn: &mut Conn, mut sender: Sender) {
        loop {
            let due = sender.due_ns();
            let wake = tokio::time::Instant::now()
                + Duration::from_nanos(due.unwrap_or(0).saturating_sub(now_ns()));
            let go_on = tokio::select! {
                go_on = conn.on_read(self) => go_on,
                changed = sender.orders.changed() => {
                    if changed.is_err() {
                        break;
                    }
                    sender.phase = *sender.orders.borrow_and_update();
                    sender.k = 0;
                    true
                }
                _ = tokio::time::sleep_until(wake), if due.is_some() => {
                    sender.write_due(&self.room, &mut conn.out, &self.shared.sent);
                    true
                }
            };
            if !go_on || !conn.flush().await {
                break;
            }
        }
    }
}

/// One member's connection and what it has seen.
struct Conn {
    stream: TcpStream,
    reader: FrameReader,
    /// Sequence numbers seen from each publisher of the room.
    seqs: Vec<Seqs>,
    /// Frames to write (pongs, sends).
    out: Vec<u8>,
}

impl Conn {
    /// Reads once and handles every complete frame; false once the connection is over.
    /// Cancel-safe: the read is [`FrameReader::fill_stamped`], the rest runs without waiting.
    async fn on_read(&mut self, member: &Member) -> bool {
        let read: io::Result<(usize, Option<u64>)> = self.reader.fill_stamped(&self.stream).await;
        let Ok((n, stamp)) = read else {
            return false;
        };
        if n == 0 {
            return false;
        }
        let shared = &*member.shared;
        let now = now_ns();
        let arrived = stamp.unwrap_or(now).min(now);
        let (mut new, mut repeated) = (0u64, 0u64);
        let mut closed = None;
        let mut latencies = None;
        let (seqs, out) = (&mut self.seqs, &mut self.out);
        self.reader.parse(|op, payload| match op {
            OP_PING => ws::encode_client_frame(out, OP_PONG, payload),
            OP_CLOSE => closed = Some(ws::close_code(payload)),
            OP_TEXT => {
                if let Some(d) = parse_delivery(payload) {
                    let Some(seen) = seqs.get_mut(d.publisher as usize) else {
                        return;
                    };
                    if seen.see(d.seq) {
                        new += 1;
                    } else {
                        repeated += 1;
                    }
                    let l: &mut Latencies = latencies.get_or_insert_with(|| {
                        shared.latencies[member.shard].lock().expect("latency lock")
                    });
                    let us = |at: u64| (at.saturating_sub(d.sent_ns) / 1000).max(1);
                    l.latency.saturating_record(us(arrived));
                    l.read.saturating_record(us(now));
                } else if let Some(code) = error_code(payload) {
                    *shared
                        .errors
                        .lock()
                        .expect("errors lock")
                        .entry(code)
                        .or_default() += 1;
                }
            }
            _ => {}
        });
        drop(latencies);
        if new + repeated > 0 {
            shared.unique.fetch_add(new, Ordering::AcqRel);
            shared.duplicates.fetch_add(repeated, Ordering::AcqRel);
            shared
                .deliveries
                .fetch_add(new + repeated, Ordering::AcqRel);
            shared.last_delivery_ns.fetch_max(now, Ordering::AcqRel);
        }
        if let Some(code) = closed {
            *shared
                .close_codes
                .lock()
                .expect("close lock")
                .entry(code)
                .or_default() += 1;
            return false;
        }
        true
    }

    /// Writes what is waiting; false when the connection is gone.
    async fn flush(&mut self) -> bool {
        if self.out.is_empty() {
            return true;
        }
        let ok = self.stream.write_all(&self.out).await.is_ok();
        self.out.clear();
        ok
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histograms_travel_as_pairs() {
        let mut h = histogram();
        for v in [1, 5, 5, 900, 12_345, 59_000_000] {
            h.saturating_record(v);
        }
        let mut back = histogram();
        add_pairs(&mut back, &pairs(&h));
        assert_eq!(back.len(), h.len());
        for q in [0.0, 0.5, 0.9, 0.99, 1.0] {
            assert_eq!(back.value_at_quantile(q), h.value_at_quantile(q), "q {q}");
        }
    }

    #[test]
    fn publishers_send_their_share_spread_over_the_period() {
        let (_tx, rx) = watch::channel(Phase::default());
        let mut sent_at = Vec::new();
        for offset in [0.0, 0.25, 0.5, 0.75] {
            let mut s = Sender {
                id: 0,
                offset,
                seq: 0,
                k: 0,
                phase: Phase {
                    rate: 2.0,
                    start_ns: 0,
                    period_ns: 3_000_000_000,
                },
                orders: rx.clone(),
            };
            while let Some(due) = s.due_ns() {
                sent_at.push(due);
                s.k += 1;
            }
        }
        sent_at.sort_unstable();
        // 4 publishers at 2 msg/s each for 3 s: 24 messages, one every 125 ms.
        let expected: Vec<u64> = (0..24).map(|i| i * 125_000_000).collect();
        assert_eq!(sent_at, expected);
    }
}
