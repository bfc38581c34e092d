//! Fan-out load: N members in one room, the first P of them also publishing at a set total
//! rate. Each member is one task that reads with one reusable buffer; publishers write the
//! messages due every millisecond in one write, their sends spread evenly over each interval
//! rather than all at the same instants. Members speak the setup's protocol: native
//! (`send`, `message` frames) or Socket.IO on the WebSocket transport (`event:message`,
//! `message` events), with the same message text. A step runs the load at one rate, drains,
//! and measures deliveries per second, loss, duplicates, latency and CPU; `max-rate` is a
//! series of steps.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::bail;
use hdrhistogram::Histogram;
use tokio::io::AsyncWriteExt;
use tokio::sync::{Semaphore, oneshot};
use tokio::task::JoinSet;

use crate::cluster::{Cluster, CpuSample, MachineSample, Protocol};
use crate::sio;
use crate::track::{Receiver, encode_send, histogram, now_ns};
use crate::ws::{self, FrameReader, OP_PING, OP_PONG, OP_TEXT, Target};

/// How long a drain waits with no delivery arriving before it gives up.
const STALL: Duration = Duration::from_secs(2);

/// How many, and where.
#[derive(Clone, Debug)]
pub struct Shape {
    pub members: usize,
    pub publishers: usize,
    pub room: String,
    pub sources: usize,
}

/// A publisher's controls, shared with its task.
#[derive(Default)]
pub struct Publisher {
    /// Messages per second, in thousandths.
    rate_milli: AtomicU64,
    /// Bumped at every rate change: the publisher restarts its schedule.
    epoch: AtomicU64,
    /// How long the current rate lasts, in nanoseconds from the publisher's first tick.
    period_ns: AtomicU64,
    /// Where this publisher's sends fall within its interval (`1 / rate`), in millionths of
    /// it: publisher i of k sends at `(n + i / k) / rate`, so the room gets one message every
    /// `1 / (k × rate)` rather than a burst of k at once every `1 / rate`.
    offset_ppm: AtomicU64,
    /// Messages sent so far (the next sequence number).
    sent: AtomicU64,
}

/// The connected members of a fan-out.
pub struct Load {
    receivers: Vec<Arc<Mutex<Receiver>>>,
    publishers: Vec<Arc<Publisher>>,
    _tasks: JoinSet<()>,
}

/// Opens every member connection (publishers first) and waits for each one's `joined`.
pub async fn connect(cluster: &Cluster, shape: &Shape) -> anyhow::Result<Load> {
    let nodes = cluster.nodes.len();
    let protocol = cluster.setup.protocol();
    let publisher_nodes: Vec<usize> = (0..shape.publishers).map(|p| p % nodes).collect();
    let publishers: Vec<Arc<Publisher>> = (0..shape.publishers)
        .map(|_| Arc::new(Publisher::default()))
        .collect();
    let gate = Arc::new(Semaphore::new(256));
    let mut tasks = JoinSet::new();
    let mut receivers = Vec::new();
    let mut ready = Vec::new();
    for i in 0..shape.members {
        let node = i % nodes;
        let name = format!("m{i}");
        let path = match protocol {
            Protocol::Native => format!("/ws?room={}&name={name}", shape.room),
            Protocol::SocketIo => sio::websocket_path(&shape.room, &name),
        };
        let target = Target {
            addr: cluster.nodes[node].addr,
            path,
        };
        let state = Arc::new(Mutex::new(Receiver::new(node, publisher_nodes.clone())));
        receivers.push(state.clone());
        let publisher = publishers.get(i).map(|p| (i as u32, p.clone()));
        let (tx, rx) = oneshot::channel();
        ready.push(rx);
        let member = Member {
            target,
            source: ws::source_addr(i, shape.sources),
            state,
            publisher,
            room: shape.room.clone(),
            protocol,
        };
        tasks.spawn(member.run(gate.clone(), tx));
    }
    let mut failed = Vec::new();
    for rx in ready {
        if let Ok(Err(e)) | Err(e) = rx.await.map_err(anyhow::Error::from) {
            failed.push(e.to_string());
        }
    }
    if !failed.is_empty() {
        bail!(
            "{} of {} members failed: {}",
            failed.len(),
            shape.members,
            failed[0]
        );
    }
    Ok(Load {
        receivers,
        publishers,
        _tasks: tasks,
    })
}

struct Member {
    target: Target,
    source: IpAddr,
    state: Arc<Mutex<Receiver>>,
    publisher: Option<(u32, Arc<Publisher>)>,
    room: String,
    protocol: Protocol,
}

impl Member {
    async fn run(self, gate: Arc<Semaphore>, ready: oneshot::Sender<anyhow::Result<()>>) {
        let mut reader = FrameReader::new(64 * 1024);
        let joined = async {
            let _permit = gate.acquire().await?;
            let mut stream = ws::connect(&self.target, self.source, &mut reader).await?;
            let timeout = Duration::from_secs(30);
            match self.protocol {
                Protocol::Native => ws::wait_joined(&mut stream, &mut reader, timeout).await?,
                Protocol::SocketIo => {
                    sio::connect_websocket(&mut stream, &mut reader, timeout).await?
                }
            }
            ws::stamp_arrivals(&stream);
            anyhow::Ok(stream)
        };
        let mut stream = match joined.await {
            Ok(stream) => {
                let _ = ready.send(Ok(()));
                stream
            }
            Err(e) => {
                let _ = ready.send(Err(e));
                return;
            }
        };
        let mut tick = tokio::time::interval(Duration::from_millis(1));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut schedule = Schedule::default();
        let mut out = Vec::with_capacity(4096);
        loop {
            tokio::select! {
                read = reader.fill_stamped(&stream) => {
                    let Ok((n, stamp)) = read else { break };
                    if n == 0 {
                        break;
                    }
                    let now = now_ns();
                    let arrived = stamp.unwrap_or(now).min(now);
                    let mut state = self.state.lock().expect("receiver lock");
                    reader.parse(|op, payload| match (op, self.protocol) {
                        (OP_PING, _) => ws::encode_client_frame(&mut out, OP_PONG, payload),
                        (OP_TEXT, Protocol::SocketIo) => {
                            sio_packet(&mut state, payload, now, arrived, &mut out)
                        }
                        _ => state.frame(op, payload, now, arrived),
                    });
                    if state.close_code.is_some() {
                        break;
                    }
                }
                _ = tick.tick(), if self.publisher.is_some() => {
                    if let Some((id, publisher)) = &self.publisher {
                        schedule.due(*id, publisher, &self.room, self.protocol, &mut out);
                    }
                }
            }
            if !out.is_empty() {
                if stream.write_all(&out).await.is_err() {
                    break;
                }
                out.clear();
            }
        }
        self.state.lock().expect("receiver lock").disconnected = true;
    }
}

/// Handles one Socket.IO packet read at `now` that reached the socket at `arrived`: a
/// delivery, an error, or an Engine.IO ping, answered in `out`.
fn sio_packet(state: &mut Receiver, packet: &[u8], now: u64, arrived: u64, out: &mut Vec<u8>) {
    if packet == b"2" {
        ws::encode_client_frame(out, OP_TEXT, b"3");
    } else if let Some(d) = sio::delivery(packet) {
        state.delivered(&d, now, arrived);
    } else if let Some(code) = sio::error_code(packet) {
        state.error(code);
    }
}

/// A publisher's position in its current rate period.
#[derive(Default)]
struct Schedule {
    epoch: u64,
    start_ns: u64,
    sent: u64,
}

impl Schedule {
    /// Appends the frames (`send`, or `event:message` emits in `room`, the first room of a
    /// Socket.IO member) due by now to `out`.
    fn due(
        &mut self,
        id: u32,
        publisher: &Publisher,
        room: &str,
        protocol: Protocol,
        out: &mut Vec<u8>,
    ) {
        let now = now_ns();
        let epoch = publisher.epoch.load(Ordering::Acquire);
        if epoch != self.epoch {
            *self = Schedule {
                epoch,
                start_ns: now,
                sent: 0,
            };
        }
        let rate = publisher.rate_milli.load(Ordering::Acquire) as f64 / 1000.0;
        let period = publisher.period_ns.load(Ordering::Acquire);
        let offset = publisher.offset_ppm.load(Ordering::Acquire) as f64 / 1e6;
        let due = due_count(now - self.start_ns, period, rate, offset);
        for _ in self.sent..due {
            let seq = publisher.sent.load(Ordering::Relaxed);
            match protocol {
                Protocol::Native => encode_send(out, room, id, seq, now_ns()),
                Protocol::SocketIo => sio::encode_emit_frame(out, id, seq, now_ns()),
            }
            publisher.sent.store(seq + 1, Ordering::Release);
        }
        self.sent = self.sent.max(due);
    }
}

/// How many messages of a publisher sending `rate` per second for `period_ns`, at `offset`
/// (0 to 1) of its interval, are due `elapsed_ns` into the period: message n is due at
/// `(n + offset) / rate`, before the end of the period, so T × rate messages in T seconds.
fn due_count(elapsed_ns: u64, period_ns: u64, rate: f64, offset: f64) -> u64 {
    if rate <= 0.0 {
        return 0;
    }
    let elapsed = elapsed_ns.min(period_ns.saturating_sub(1)) as f64 / 1e9;
    (elapsed * rate + 1.0 - offset.clamp(0.0, 1.0)).max(0.0) as u64
}

/// What one step measured.
pub struct Step {
    /// Offered messages per second (all publishers together).
    pub rate: f64,
    pub publishers: usize,
    pub members: usize,
    pub sent: u64,
    pub expected: u64,
    pub unique: u64,
    pub duplicates: u64,
    pub deliveries_per_sec: f64,
    pub latency: Histogram<u64>,
    pub cross_latency: Histogram<u64>,
    pub read_latency: Histogram<u64>,
    pub server_cpu: f64,
    pub redis_cpu: f64,
    /// The tool's PostgreSQL (setups with the archive), its processes at the step's start.
    pub pg_cpu: f64,
    pub generator_cpu: f64,
    /// Everything else the machine ran meanwhile (other processes, and kernel work not
    /// charged to a process), in percent of one core.
    pub other_cpu: f64,
    pub disconnected: usize,
    pub errors: HashMap<String, u64>,
    pub close_codes: HashMap<u16, u64>,
}

impl Step {
    /// An empty step at `rate` messages per second from `publishers` into `members`.
    pub fn new(rate: f64, publishers: usize, members: usize) -> Step {
        Step {
            rate,
            publishers,
            members,
            sent: 0,
            expected: 0,
            unique: 0,
            duplicates: 0,
            deliveries_per_sec: 0.0,
            latency: histogram(),
            cross_latency: histogram(),
            read_latency: histogram(),
            server_cpu: 0.0,
            redis_cpu: 0.0,
            pg_cpu: 0.0,
            generator_cpu: 0.0,
            other_cpu: 0.0,
            disconnected: 0,
            errors: HashMap::new(),
            close_codes: HashMap::new(),
        }
    }

    /// Deliveries expected but not received.
    pub fn lost(&self) -> u64 {
        self.expected.saturating_sub(self.unique)
    }
}

struct Totals {
    unique: u64,
    duplicates: u64,
    deliveries: u64,
}

impl Load {
    fn totals(&self) -> Totals {
        let mut t = Totals {
            unique: 0,
            duplicates: 0,
            deliveries: 0,
        };
        for r in &self.receivers {
            let r = r.lock().expect("receiver lock");
            t.unique += r.unique().sum::<u64>();
            t.duplicates += r.duplicates();
            t.deliveries += r.deliveries;
        }
        t
    }

    fn sent(&self) -> u64 {
        self.publishers
            .iter()
            .map(|p| p.sent.load(Ordering::Acquire))
            .sum()
    }

    /// Waits until `target` unique deliveries have arrived, or nothing has arrived for
    /// [`STALL`], or `max_secs` have passed: a backlog that is still moving is waited for, a
    /// stuck one is not.
    async fn drain(&self, target: u64, max_secs: f64) {
        let until = now_ns() + (max_secs * 1e9) as u64;
        let mut seen = self.totals().deliveries;
        let mut moved = now_ns();
        while self.totals().unique < target && now_ns() < until {
            tokio::time::sleep(Duration::from_millis(20)).await;
            let now = self.totals().deliveries;
            if now != seen {
                (seen, moved) = (now, now_ns());
            } else if now_ns() - moved > STALL.as_nanos() as u64 {
                return;
            }
        }
    }

    /// Waits until no delivery has arrived for [`STALL`] (at most `max_secs`), so a backlog
    /// left by an overloaded step does not count against the next one.
    pub async fn settle(&self, max_secs: f64) {
        self.drain(u64::MAX, max_secs).await;
    }

    /// Shares `total` messages per second between the first `publishers` publishers (the
    /// others stay silent) for `secs`, their sends spread evenly over each interval.
    fn set_rate(&self, total: f64, secs: f64, publishers: usize) {
        let k = publishers.clamp(1, self.publishers.len().max(1));
        for (i, p) in self.publishers.iter().enumerate() {
            let each = if i < k { total / k as f64 } else { 0.0 };
            p.rate_milli
                .store((each * 1000.0) as u64, Ordering::Release);
            p.period_ns.store((secs * 1e9) as u64, Ordering::Release);
            let offset = if i < k { i as f64 / k as f64 } else { 0.0 };
            p.offset_ppm.store((offset * 1e6) as u64, Ordering::Release);
            p.epoch.fetch_add(1, Ordering::AcqRel);
        }
    }

    /// Publishes at `rate` messages per second, shared by the first `publishers`, for `secs`,
    /// then waits up to `drain_secs` for the last deliveries, and measures.
    pub async fn step(
        &self,
        cluster: &Cluster,
        (rate, publishers): (f64, usize),
        secs: f64,
        drain_secs: f64,
    ) -> Step {
        let before = self.totals();
        let sent_before = self.sent();
        for r in &self.receivers {
            let mut r = r.lock().expect("receiver lock");
            r.latency.reset();
            r.cross_latency.reset();
            r.read_latency.reset();
        }
        let pids = cluster.node_pids();
        let redis = cluster.redis_pids();
        let pg = cluster.pg_pids();
        let me = [std::process::id()];
        let cpu = (
            CpuSample::take(&pids),
            CpuSample::take(&redis),
            CpuSample::take(&me),
            CpuSample::take(&pg),
        );
        let machine = MachineSample::take();
        let start = now_ns();
        self.set_rate(rate, secs, publishers);
        // The publishers stop by themselves at the end of the period; the rate goes to 0
        // after it, with a margin for a tick that is late.
        tokio::time::sleep(Duration::from_secs_f64(secs) + Duration::from_millis(50)).await;
        self.set_rate(0.0, 0.0, publishers);
        tokio::time::sleep(Duration::from_millis(5)).await;
        let sent = self.sent() - sent_before;
        let expected = sent * self.receivers.len() as u64;
        self.drain(before.unique + expected, drain_secs).await;
        let (server_cpu, redis_cpu, generator_cpu, pg_cpu) = (
            cpu.0.percent_since(&pids),
            cpu.1.percent_since(&redis),
            cpu.2.percent_since(&me),
            cpu.3.percent_since(&pg),
        );
        let other_cpu =
            (machine.percent_since() - server_cpu - redis_cpu - generator_cpu - pg_cpu).max(0.0);
        let after = self.totals();
        let mut step = Step::new(
            rate,
            publishers.clamp(1, self.publishers.len().max(1)),
            self.receivers.len(),
        );
        step.sent = sent;
        step.expected = expected;
        step.unique = after.unique - before.unique;
        step.duplicates = after.duplicates - before.duplicates;
        (step.server_cpu, step.redis_cpu, step.pg_cpu) = (server_cpu, redis_cpu, pg_cpu);
        (step.generator_cpu, step.other_cpu) = (generator_cpu, other_cpu);
        let mut last = start;
        for r in &self.receivers {
            let r = r.lock().expect("receiver lock");
            let _ = step.latency.add(&r.latency);
            let _ = step.cross_latency.add(&r.cross_latency);
            let _ = step.read_latency.add(&r.read_latency);
            last = last.max(r.last_delivery_ns);
            step.disconnected += usize::from(r.disconnected);
            for (code, n) in &r.errors {
                *step.errors.entry(code.clone()).or_default() += n;
            }
            if let Some(code) = r.close_code {
                *step.close_codes.entry(code).or_default() += 1;
            }
        }
        let secs = ((last - start) as f64 * 1e-9).max(secs);
        step.deliveries_per_sec = (after.deliveries - before.deliveries) as f64 / secs;
        step
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SEC: u64 = 1_000_000_000;

    #[test]
    fn a_publisher_sends_rate_times_period_messages() {
        assert_eq!(due_count(0, SEC, 4.0, 0.0), 1);
        assert_eq!(due_count(SEC / 4, SEC, 4.0, 0.0), 2);
        assert_eq!(due_count(10 * SEC, SEC, 4.0, 0.0), 4);
        assert_eq!(due_count(10 * SEC, SEC, 4.0, 0.5), 4);
        assert_eq!(
            due_count(10 * SEC, SEC, 4.0, 0.0),
            due_count(SEC, SEC, 4.0, 0.99)
        );
        assert_eq!(due_count(0, SEC, 0.0, 0.0), 0);
    }

    #[test]
    fn publishers_take_turns_instead_of_sending_at_once() {
        // Four publishers at 1 msg/s each: one message every 250 ms, not four every second.
        let offsets = [0.0, 0.25, 0.5, 0.75];
        let due_at = |ms: u64| -> u64 {
            offsets
                .iter()
                .map(|&o| due_count(ms * 1_000_000, 10 * SEC, 1.0, o))
                .sum()
        };
        assert_eq!(due_at(0), 1);
        assert_eq!(due_at(249), 1);
        assert_eq!(due_at(250), 2);
        assert_eq!(due_at(500), 3);
        assert_eq!(due_at(999), 4);
        assert_eq!(due_at(1000), 5);
    }
}
