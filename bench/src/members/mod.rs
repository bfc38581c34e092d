//! Member connections held by worker processes of the tool, for the scenarios with more
//! connections than one process may hold files (`rooms`, `archive`, `scale`). A [`Layout`]
//! numbers them: connection g is member g mod M of room g / M (rooms `rm0`, `rm1`, …, M
//! members each), on node (room + member) mod nodes, so every room has members on every node;
//! the first P members of each room also publish. Each worker process (`room-worker`, see
//! [`worker`]) holds a range of consecutive connections, at most `per_process`, so a big room
//! is split over several of them.
//!
//! A step is two orders to every worker, one JSON line each on its standard input: `publish`
//! (a rate per publisher, for some seconds), answered with the sequence numbers each of its
//! publishers sent (every message belongs to exactly one step); then `drain`, carrying every
//! publisher's numbers of the step, answered once each of its members has every message of
//! its room's publishers in them, or the drain gave up, with its counters and latency
//! histograms as (value, count) pairs. A worker counts the step's messages by their numbers,
//! not by what arrived meanwhile: a delivery of an earlier step that comes late is counted as
//! late, never as one of this step's. Its answer names the messages some of its members lack
//! (and on which node those members are), and the sends its publishers had refused (the
//! server's `error` for them, in the order they were sent). The tool adds the answers up: a
//! send answered with an error is owed to nobody (`unavailable` may still be delivered), so
//! it leaves the expected deliveries and its deliveries are reported on their own.

mod member;
mod worker;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::ops::Range;
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader, Lines};
use tokio::process::{Child, ChildStdin, ChildStdout, Command};

pub use worker::{WorkerArgs, worker};

use crate::cluster::{Cluster, Cpu, Usage, rss_kib};
use crate::fanout::Step;
use crate::track::histogram;

/// Connections of one worker process in their TCP or WebSocket handshake at once.
pub const IN_FLIGHT: usize = 512;

/// The name of room `room`.
pub fn room_name(room: usize) -> String {
    format!("rm{room}")
}

/// Who is where: rooms, members and publishers, over the nodes, the source addresses and the
/// worker processes.
#[derive(Clone, Copy, Debug)]
pub struct Layout {
    pub rooms: usize,
    /// Members of each room.
    pub members: usize,
    /// Members of each room that publish (the first ones).
    pub publishers: usize,
    /// Connections per worker process at most.
    pub per_process: usize,
    /// Source addresses (127.0.0.2 onwards); connection g uses number g mod this.
    pub sources: usize,
    /// One member in this many on each node records latency (every member counts losses and
    /// duplicates).
    pub latency_every: usize,
}

impl Layout {
    /// Member connections in all.
    pub fn connections(&self) -> usize {
        self.rooms * self.members
    }

    /// Publishers over all rooms.
    pub fn all_publishers(&self) -> usize {
        self.rooms * self.publishers
    }

    /// The node (of `nodes`) connection `g` connects to.
    pub fn node_of(&self, g: usize, nodes: usize) -> usize {
        (g / self.members + g % self.members) % nodes.max(1)
    }

    /// Whether connection `g` records latency: one in `latency_every` of each block of
    /// `nodes` consecutive connections' turns, so that every node has its share.
    fn samples_latency(&self, g: usize, nodes: usize) -> bool {
        (g / nodes.max(1)).is_multiple_of(self.latency_every.max(1))
    }

    /// Connections on each of `nodes` nodes.
    pub fn per_node(&self, nodes: usize) -> Vec<usize> {
        let mut counts = vec![0; nodes.max(1)];
        for g in 0..self.connections() {
            counts[self.node_of(g, nodes)] += 1;
        }
        counts
    }

    /// The most connections any one (source address, node) pair carries: each pair has only
    /// the machine's ephemeral port range.
    pub fn busiest_pair(&self, nodes: usize) -> usize {
        let mut counts = HashMap::new();
        for g in 0..self.connections() {
            *counts
                .entry((g % self.sources.max(1), self.node_of(g, nodes)))
                .or_insert(0) += 1;
        }
        counts.into_values().max().unwrap_or(0)
    }

    /// The connections of each worker process: consecutive ranges as even as can be, each at
    /// most `per_process`.
    pub fn ranges(&self) -> Vec<Range<usize>> {
        let total = self.connections();
        let count = total.div_ceil(self.per_process.max(1)).max(1);
        let mut first = 0;
        (0..count)
            .map(|w| {
                let n = (total - first) / (count - w);
                first += n;
                first - n..first
            })
            .collect()
    }

    /// The deliveries the members in `range` are due when `sent[room]` messages went into
    /// each room.
    fn due(&self, range: &Range<usize>, sent: &[u64]) -> u64 {
        if range.is_empty() {
            return 0;
        }
        let m = self.members;
        (range.start / m..=(range.end - 1) / m)
            .map(|room| {
                let here = range.end.min((room + 1) * m) - range.start.max(room * m);
                sent.get(room).copied().unwrap_or(0) * here as u64
            })
            .sum()
    }
}

/// The messages one publisher sent in one step: its sequence numbers `start..end`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub(super) struct Numbers {
    pub(super) room: usize,
    /// The publisher's number in its room (the `B<publisher>.` of its messages).
    pub(super) publisher: u32,
    pub(super) start: u64,
    pub(super) end: u64,
}

impl Numbers {
    fn len(&self) -> u64 {
        self.end.saturating_sub(self.start)
    }

    fn contains(&self, room: usize, publisher: u32, seq: u64) -> bool {
        self.room == room && self.publisher == publisher && (self.start..self.end).contains(&seq)
    }
}

/// One message: room, publisher, sequence number.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct MessageId {
    pub room: usize,
    pub publisher: u32,
    pub seq: u64,
}

impl std::fmt::Display for MessageId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}/B{}.{}",
            room_name(self.room),
            self.publisher,
            self.seq
        )
    }
}

/// A message of the step some members of a worker did not get.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub(super) struct Missing {
    pub(super) message: MessageId,
    /// Members without it, by node.
    pub(super) per_node: Vec<u64>,
    /// The first of them (its connection number).
    pub(super) first_member: usize,
}

/// A send the server answered with an error.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub(super) struct Refusal {
    pub(super) message: MessageId,
    pub(super) code: String,
}

/// An order to a worker.
#[derive(Serialize, Deserialize)]
#[serde(tag = "order", rename_all = "snake_case")]
enum Order {
    /// Publish `rate` messages per second from each publisher for `secs`.
    Publish { rate: f64, secs: f64 },
    /// Wait until the worker's members have the messages of `numbers` (`expected`
    /// deliveries), at most `max_secs`.
    Drain {
        expected: u64,
        numbers: Vec<Numbers>,
        max_secs: f64,
    },
}

/// A worker's answer once its connections are open.
#[derive(Serialize, Deserialize)]
struct Ready {
    joined: usize,
    failed: usize,
    first_error: Option<String>,
    /// Time from the start of each connect to its `joined`, µs: (value, count) pairs.
    connect: Vec<(u64, u64)>,
}

/// A worker's answer to `publish`: the numbers of the messages each of its publishers sent
/// since the step before (those that sent any).
#[derive(Serialize, Deserialize)]
struct Sent {
    numbers: Vec<Numbers>,
}

/// A worker's answer to `drain`.
#[derive(Serialize, Deserialize)]
struct Report {
    expected: u64,
    /// Deliveries of the step's messages that arrived (each member, each message once).
    unique: u64,
    /// The step's messages some members lack, at most [`worker::MISSING_LISTED`] of them.
    missing: Vec<Missing>,
    /// Whether `missing` lists every message some member lacks.
    missing_complete: bool,
    /// Deliveries of earlier steps' messages that arrived after their step's answer.
    late: u64,
    /// Sends of this worker's publishers answered with an error since the last answer.
    refused: Vec<Refusal>,
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

/// A message some members did not get, over every worker.
#[derive(Clone, Debug)]
pub struct Lacked {
    pub message: MessageId,
    /// Members without it, by node.
    pub per_node: Vec<u64>,
    /// The first of them (its connection number).
    pub first_member: usize,
}

impl Lacked {
    pub fn members(&self) -> u64 {
        self.per_node.iter().sum()
    }
}

/// A send answered with an error, and how many members got it all the same.
#[derive(Clone, Debug)]
pub struct Refused {
    pub message: MessageId,
    pub code: String,
    /// Whether it was sent in this step (else in an earlier one, answered only now).
    pub this_step: bool,
    /// Members that got it (of those in its room), when `this_step`.
    pub delivered: u64,
    pub members: u64,
}

/// What became of each message of a step, beyond the counts.
#[derive(Clone, Debug, Default)]
pub struct Accounting {
    /// Messages owed (not refused) that some members did not get, by message.
    pub lacked: Vec<Lacked>,
    /// Whether `lacked` names every such message (the workers list a bounded number each).
    pub lacked_complete: bool,
    /// Sends answered with an error, with what was delivered of them; they are not part
    /// of the step's expected deliveries.
    pub refused: Vec<Refused>,
    /// Deliveries of earlier steps' messages that arrived during this step, after their
    /// step had counted them lost.
    pub late: u64,
}

impl Accounting {
    /// What a reader needs to attribute a loss, in words; empty when there is nothing to say.
    pub fn describe(&self) -> String {
        let mut parts = Vec::new();
        if !self.lacked.is_empty() {
            let shown: Vec<String> = self
                .lacked
                .iter()
                .take(8)
                .map(|l| {
                    let by_node: Vec<String> = l.per_node.iter().map(u64::to_string).collect();
                    format!(
                        "{} by {} members (per node {}; first: member {})",
                        l.message,
                        l.members(),
                        by_node.join(" / "),
                        l.first_member
                    )
                })
                .collect();
            let more = self.lacked.len().saturating_sub(shown.len());
            parts.push(format!(
                "{} message(s) not delivered to every member{}: {}{}",
                self.lacked.len(),
                if self.lacked_complete {
                    ""
                } else {
                    " (at least)"
                },
                shown.join("; "),
                if more > 0 {
                    format!("; and {more} more")
                } else {
                    String::new()
                }
            ));
        }
        for r in &self.refused {
            if r.this_step {
                parts.push(format!(
                    "{} answered `{}`, delivered to {} of {} members{}",
                    r.message,
                    r.code,
                    r.delivered,
                    r.members,
                    if r.delivered == 0 || r.delivered == r.members {
                        ""
                    } else {
                        " (partly!)"
                    }
                ));
            } else {
                parts.push(format!(
                    "{} (an earlier step's) answered `{}` only now",
                    r.message, r.code
                ));
            }
        }
        if self.late > 0 {
            parts.push(format!(
                "{} deliveries of earlier steps arrived late, during this step",
                self.late
            ));
        }
        parts.join("; ")
    }
}

/// Adds the workers' reports of a step of `secs` into `step`; `numbers` are the step's
/// messages and `members` the members of each room. Returns what became of the messages
/// that did not reach everyone.
fn add_up(
    step: &mut Step,
    reports: &[Report],
    secs: f64,
    numbers: &[Numbers],
    members: usize,
) -> Accounting {
    let start = reports.iter().map(|r| r.start_ns).min().unwrap_or(0);
    let mut last = start;
    let mut deliveries = 0;
    let mut lacked: std::collections::BTreeMap<MessageId, Lacked> = Default::default();
    let mut accounting = Accounting {
        lacked_complete: true,
        ..Accounting::default()
    };
    let mut refused = Vec::new();
    for r in reports {
        step.expected += r.expected;
        step.unique += r.unique;
        accounting.late += r.late;
        accounting.lacked_complete &= r.missing_complete;
        for m in &r.missing {
            let entry = lacked.entry(m.message).or_insert_with(|| Lacked {
                message: m.message,
                per_node: vec![0; m.per_node.len()],
                first_member: m.first_member,
            });
            for (n, count) in entry.per_node.iter_mut().zip(&m.per_node) {
                *n += count;
            }
            entry.first_member = entry.first_member.min(m.first_member);
        }
        refused.extend(r.refused.iter().cloned());
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
    // From the first worker's start to the last delivery, at least the step's length.
    let secs = (last.saturating_sub(start) as f64 * 1e-9).max(secs);
    step.deliveries_per_sec = deliveries as f64 / secs;
    // A refused send is owed to nobody: out of the expected deliveries, and what was
    // delivered of it out of the unique ones.
    for refusal in refused {
        let m = refusal.message;
        let this_step = numbers
            .iter()
            .any(|n| n.contains(m.room, m.publisher, m.seq));
        let members = members as u64;
        let mut delivered = 0;
        if this_step {
            let lacking = lacked.remove(&m).map_or(0, |l| l.members());
            delivered = members.saturating_sub(lacking);
            step.expected = step.expected.saturating_sub(members);
            step.unique = step.unique.saturating_sub(delivered);
        }
        accounting.refused.push(Refused {
            message: m,
            code: refusal.code,
            this_step,
            delivered,
            members,
        });
    }
    accounting.lacked = lacked.into_values().collect();
    accounting
}

/// How the connections opened.
pub struct Opened {
    /// From starting the workers until every member had joined.
    pub secs: f64,
    /// From the start of each connect to its `joined`, µs.
    pub connect: Histogram<u64>,
    /// CPU meanwhile.
    pub cpu: Cpu,
    pub processes: usize,
    /// Resident memory of the worker processes together once every member has joined, KiB.
    pub workers_rss_kib: u64,
}

/// One step over every worker.
pub struct Measured {
    pub step: Step,
    /// The messages that did not reach everyone, sends refused, late deliveries.
    pub accounting: Accounting,
    /// CPU of each node, each redis-server, the generator and the rest of the machine.
    pub cpu: Cpu,
    /// Resident memory of each node at the end of the step, KiB.
    pub rss_kib: Vec<u64>,
}

/// The worker processes of one setup, killed when dropped.
pub struct Workers {
    procs: Vec<Worker>,
    layout: Layout,
}

struct Worker {
    child: Child,
    pid: u32,
    stdin: Option<ChildStdin>,
    lines: Lines<BufReader<ChildStdout>>,
    range: Range<usize>,
}

impl Workers {
    /// Starts the workers of `layout` against the nodes of `cluster` and waits until every
    /// member has joined.
    pub async fn spawn(cluster: &Cluster, layout: Layout) -> anyhow::Result<(Workers, Opened)> {
        let addrs: Vec<SocketAddr> = cluster.nodes.iter().map(|n| n.addr).collect();
        let started = Instant::now();
        let mut procs = Vec::new();
        for range in layout.ranges() {
            let mut child = Command::new(std::env::current_exe()?)
                .args(WorkerArgs::argv(&layout, &addrs, &range))
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
                range,
            });
        }
        let mut workers = Workers { procs, layout };
        let usage = Usage::take(cluster, &workers.generator_pids());
        let mut connect = histogram();
        let (mut failed, mut first_error) = (0, None);
        for worker in &mut workers.procs {
            let line = worker
                .lines
                .next_line()
                .await?
                .context("room worker ended before its connections were open")?;
            let ready: Ready = serde_json::from_str(&line)
                .with_context(|| format!("room worker: unexpected report {line:?}"))?;
            failed += ready.failed;
            first_error = first_error.or(ready.first_error);
            add_pairs(&mut connect, &ready.connect);
        }
        if failed > 0 {
            bail!(
                "{failed} of {} members failed to join: {}",
                layout.connections(),
                first_error.unwrap_or_default()
            );
        }
        let opened = Opened {
            secs: started.elapsed().as_secs_f64(),
            connect,
            cpu: usage.since(),
            processes: workers.procs.len(),
            workers_rss_kib: workers.procs.iter().map(|w| rss_kib(w.pid)).sum(),
        };
        Ok((workers, opened))
    }

    /// The worker processes and this one.
    fn generator_pids(&self) -> Vec<u32> {
        let mut pids: Vec<u32> = self.procs.iter().map(|w| w.pid).collect();
        pids.push(std::process::id());
        pids
    }

    /// Sends every worker its order.
    async fn tell_all(&mut self, order: impl Fn(&Worker) -> Order) -> anyhow::Result<()> {
        for worker in &mut self.procs {
            let order = serde_json::to_string(&order(worker))? + "\n";
            let stdin = worker.stdin.as_mut().context("worker stdin closed")?;
            stdin.write_all(order.as_bytes()).await?;
            stdin.flush().await?;
        }
        Ok(())
    }

    /// Reads one answer of type `T` from every worker, each within `limit`.
    async fn hear_all<T: for<'a> Deserialize<'a>>(
        &mut self,
        limit: Duration,
    ) -> anyhow::Result<Vec<T>> {
        let mut answers = Vec::new();
        for worker in &mut self.procs {
            let line = tokio::time::timeout(limit, worker.lines.next_line())
                .await
                .context("a room worker did not answer in time")??
                .context("a room worker ended")?;
            let answer = serde_json::from_str(&line)
                .with_context(|| format!("room worker: unexpected answer {line:?}"))?;
            answers.push(answer);
        }
        Ok(answers)
    }

    /// Publishes `rate` messages per second in all for `secs`, waits up to `drain_secs` for
    /// the last deliveries, and measures.
    pub async fn step(
        &mut self,
        cluster: &Cluster,
        rate: f64,
        secs: f64,
        drain_secs: f64,
    ) -> anyhow::Result<Measured> {
        let layout = self.layout;
        let usage = Usage::take(cluster, &self.generator_pids());
        let each = rate / layout.all_publishers().max(1) as f64;
        self.tell_all(|_| Order::Publish { rate: each, secs })
            .await?;
        let sent: Vec<Sent> = self.hear_all(Duration::from_secs_f64(secs + 30.0)).await?;
        let numbers: Vec<Numbers> = sent.into_iter().flat_map(|s| s.numbers).collect();
        let mut per_room = vec![0u64; layout.rooms];
        for n in &numbers {
            if let Some(sent) = per_room.get_mut(n.room) {
                *sent += n.len();
            }
        }
        self.tell_all(|w| Order::Drain {
            expected: layout.due(&w.range, &per_room),
            numbers: numbers.clone(),
            max_secs: drain_secs,
        })
        .await?;
        let reports: Vec<Report> = self
            .hear_all(Duration::from_secs_f64(drain_secs + 30.0))
            .await?;
        let cpu = usage.since();
        let rss_kib = cluster.node_pids().iter().map(|&p| rss_kib(p)).collect();
        let mut step = Step::new(rate, layout.all_publishers(), layout.connections());
        step.sent = per_room.iter().sum();
        step.server_cpu = cpu.nodes.iter().sum();
        step.redis_cpu = cpu.redis.iter().sum();
        step.pg_cpu = cpu.pg;
        step.generator_cpu = cpu.generator;
        step.other_cpu = cpu.other;
        let accounting = add_up(&mut step, &reports, secs, &numbers, layout.members);
        Ok(Measured {
            step,
            accounting,
            cpu,
            rss_kib,
        })
    }

    /// Waits `secs`, then counts the deliveries of earlier steps' messages that arrived after
    /// their step's answer and were not counted late by a step since (a step with nothing
    /// sent): what the last steps counted lost may only have been late.
    pub async fn late(&mut self, cluster: &Cluster, secs: f64) -> anyhow::Result<u64> {
        tokio::time::sleep(Duration::from_secs_f64(secs)).await;
        let last = self.step(cluster, 0.0, 0.0, 0.0).await?;
        Ok(last.accounting.late)
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

#[cfg(test)]
mod tests {
    use super::*;

    fn layout(rooms: usize, members: usize, per_process: usize) -> Layout {
        Layout {
            rooms,
            members,
            publishers: 1,
            per_process,
            sources: 16,
            latency_every: 1,
        }
    }

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
    fn one_big_room_is_split_over_workers_and_spread_over_nodes() {
        // 4 nodes × 19,000 members in one room, at most 9,000 connections per worker.
        let l = layout(1, 76_000, 9000);
        let ranges = l.ranges();
        assert_eq!(ranges.len(), 9);
        assert!(ranges.iter().all(|r| r.len() <= 9000));
        assert_eq!(ranges.iter().map(Range::len).sum::<usize>(), 76_000);
        assert!(ranges.windows(2).all(|w| w[0].end == w[1].start));
        assert_eq!(l.per_node(4), [19_000; 4]);
        // 16 sources, 4 nodes: each source reaches one node.
        assert_eq!(l.busiest_pair(4), 4750);
    }

    #[test]
    fn every_worker_is_due_its_members_share_of_every_room() {
        // 3 rooms of 10 members, at most 7 per worker: 5 workers of 6, the second holding
        // members 6-9 of room 0 and 0-1 of room 1.
        let l = layout(3, 10, 7);
        let ranges = l.ranges();
        assert_eq!(ranges.len(), 5);
        assert_eq!(ranges[1], 6..12);
        let sent = [5, 100, 1000];
        assert_eq!(l.due(&ranges[1], &sent), 4 * 5 + 2 * 100);
        let total: u64 = ranges.iter().map(|r| l.due(r, &sent)).sum();
        assert_eq!(total, 10 * (5 + 100 + 1000));
    }

    fn report(expected: u64, unique: u64, missing: Vec<Missing>, refused: Vec<Refusal>) -> Report {
        Report {
            expected,
            unique,
            missing,
            missing_complete: true,
            late: 3,
            refused,
            duplicates: 0,
            deliveries: unique,
            start_ns: 0,
            last_delivery_ns: 0,
            latency: Vec::new(),
            read_latency: Vec::new(),
            disconnected: 0,
            errors: HashMap::new(),
            close_codes: HashMap::new(),
        }
    }

    fn message(publisher: u32, seq: u64) -> MessageId {
        MessageId {
            room: 0,
            publisher,
            seq,
        }
    }

    #[test]
    fn a_refused_send_is_owed_to_nobody_and_what_it_reached_is_told() {
        // One room of 10 members over two workers (6 + 4), two nodes; publishers 0 and 1 sent
        // seqs 0-4 each: 100 deliveries due. Message 0.3 was answered `unavailable` and
        // reached 4 members; 1.2 was acked and missed by 3 members; the rest arrived.
        let numbers = [
            Numbers {
                room: 0,
                publisher: 0,
                start: 0,
                end: 5,
            },
            Numbers {
                room: 0,
                publisher: 1,
                start: 0,
                end: 5,
            },
        ];
        let missing = |m, per_node: Vec<u64>, first_member| Missing {
            message: m,
            per_node,
            first_member,
        };
        let refusal = |m| Refusal {
            message: m,
            code: "unavailable".into(),
        };
        let reports = [
            report(
                60,
                60 - 4 - 2,
                vec![
                    missing(message(0, 3), vec![2, 2], 1),
                    missing(message(1, 2), vec![0, 2], 3),
                ],
                vec![refusal(message(0, 3)), refusal(message(1, 9))],
            ),
            report(
                40,
                40 - 2 - 1,
                vec![
                    missing(message(0, 3), vec![1, 1], 7),
                    missing(message(1, 2), vec![1, 0], 6),
                ],
                Vec::new(),
            ),
        ];
        let mut step = Step::new(1.0, 2, 10);
        let accounting = add_up(&mut step, &reports, 1.0, &numbers, 10);
        // 0.3 is not owed: 90 due, of which 87 arrived (1.2 missed by 3).
        assert_eq!((step.expected, step.unique, step.lost()), (90, 87, 3));
        assert_eq!(accounting.lacked.len(), 1);
        assert_eq!(accounting.lacked[0].message, message(1, 2));
        assert_eq!(accounting.lacked[0].per_node, [1, 2]);
        assert_eq!(accounting.lacked[0].first_member, 3);
        assert_eq!(accounting.refused.len(), 2);
        let r = &accounting.refused[0];
        assert_eq!((r.this_step, r.delivered, r.members), (true, 4, 10));
        // A refusal of an earlier step's send changes nothing of this one.
        assert!(!accounting.refused[1].this_step);
        assert_eq!(accounting.late, 6);
        let told = accounting.describe();
        assert!(
            told.contains("rm0/B1.2 by 3 members (per node 1 / 2; first: member 3)"),
            "{told}"
        );
        assert!(
            told.contains(
                "rm0/B0.3 answered `unavailable`, delivered to 4 of 10 members (partly!)"
            ),
            "{told}"
        );
        assert!(
            told.contains("6 deliveries of earlier steps arrived late"),
            "{told}"
        );
    }

    #[test]
    fn latency_samples_come_from_every_node() {
        let l = Layout {
            latency_every: 8,
            ..layout(1, 1000, 1000)
        };
        let mut per_node = [0; 4];
        for g in (0..1000).filter(|&g| l.samples_latency(g, 4)) {
            per_node[l.node_of(g, 4)] += 1;
        }
        assert_eq!(per_node, [32; 4]);
    }
}
