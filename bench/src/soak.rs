//! `soak`: steady traffic through two nodes on a Redis with an append-only file while Redis is
//! killed and restarted (at 1/3 of the run) and one node is stopped with SIGTERM and started
//! again (at 2/3). The clients behave as a careful client should: each remembers the last id
//! and the epoch of its room, reconnects to the same node with `since` and `epoch` when its
//! connection closes (retrying until the node is back), resends every `send` not yet acked with
//! the same `ref`, and resends a `send` refused with `unavailable` after a short delay. The run
//! reports the messages lost (acked messages a member never received) and the duplicates (a
//! member receiving the same message twice), which must both be 0, and each node's resident
//! memory before and after the load.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, AtomicU8, AtomicU64, Ordering::Relaxed};
use std::time::{Duration, Instant};

use memchr::memmem;
use tokio::io::AsyncWriteExt;

use crate::cluster::{self, Cluster, ServerOpts};
use crate::report::Table;
use crate::track;
use crate::ws::{self, FrameReader, OP_CLOSE, OP_PING, OP_TEXT, Target};

/// Sizes and durations of a soak run.
#[derive(Clone, Debug, clap::Args)]
pub struct SoakOpts {
    /// Connections, spread over both nodes and all rooms.
    #[arg(long, default_value_t = 200)]
    pub clients: usize,
    /// Rooms.
    #[arg(long, default_value_t = 4)]
    pub rooms: usize,
    /// Clients that also publish (the total rate is shared between them).
    #[arg(long, default_value_t = 20)]
    pub publishers: usize,
    /// Total messages per second.
    #[arg(long, default_value_t = 200.0)]
    pub rate: f64,
    /// Seconds of publishing; Redis restarts at 1/3, a node at 2/3.
    #[arg(long, default_value_t = 60.0)]
    pub secs: f64,
    /// Seconds, at most, to wait for the last acks and deliveries.
    #[arg(long, default_value_t = 30.0)]
    pub drain_secs: f64,
    /// Seconds of idle between the drain and the "after" memory reading.
    #[arg(long, default_value_t = 5.0)]
    pub idle_secs: f64,
    /// Folder for Redis's append-only file (Redis files left there by an earlier run are
    /// removed first).
    #[arg(long, default_value = "target/soak-redis")]
    pub redis_dir: PathBuf,
}

const RUN: u8 = 0;
const DRAIN: u8 = 1;
const STOP: u8 = 2;

/// What the orchestrator and the clients share.
struct Shared {
    phase: AtomicU8,
    started: Instant,
    per_publisher_rate: f64,
    /// Sends not yet acked.
    outstanding: AtomicI64,
    acked_per_room: Vec<AtomicU64>,
    /// Messages received once, over all clients.
    unique: AtomicU64,
    /// Clients currently joined, per node.
    joined: Vec<AtomicI64>,
    /// Anomalies printed so far (the first few are, for diagnosis).
    printed: AtomicU64,
}

/// One client's place in the run.
#[derive(Clone, Copy)]
struct Spec {
    index: usize,
    room: usize,
    node: usize,
    publisher: Option<u32>,
}

/// What one client saw.
#[derive(Default)]
struct Outcome {
    room: usize,
    /// (publisher, seq) of every message received.
    seen: HashSet<(u32, u64)>,
    duplicates: u64,
    /// Messages received with an id other than the last one + 1 (same epoch).
    id_gaps: u64,
    epoch_changes: u64,
    /// Seqs acked, for a publisher.
    acked: HashSet<u64>,
    duplicate_acks: u64,
    unavailable: u64,
    errors: HashMap<String, u64>,
    close_codes: HashMap<u16, u64>,
    reconnects: u64,
    failed_connects: u64,
    recovered_true: u64,
    recovered_false: u64,
    joined_without_epoch: u64,
}

struct Client {
    spec: Spec,
    room: String,
    last_id: u64,
    epoch: Option<Vec<u8>>,
    /// Sent, not yet acked: seq → send time.
    pending: BTreeMap<u64, u64>,
    /// Refused with `unavailable`: resend at that moment.
    retry: Vec<(Instant, u64)>,
    next_seq: u64,
    /// `last_id` and `history` of the latest `joined`, and messages received since it.
    joined_at: (u64, u64, u64),
    out: Vec<u8>,
    closed: bool,
    outcome: Outcome,
}

/// Runs the soak; returns the report and whether nothing was lost or duplicated.
pub async fn run(opts: &SoakOpts, servers: &ServerOpts) -> anyhow::Result<(String, bool)> {
    // A fresh Redis: no history or epoch from an earlier run.
    let _ = std::fs::remove_dir_all(opts.redis_dir.join("appendonlydir"));
    for file in ["appendonly.aof", "dump.rdb"] {
        let _ = std::fs::remove_file(opts.redis_dir.join(file));
    }
    let env = [("SCALECHAT_REDIS__HEARTBEAT_SECS", "1")];
    let mut cluster = Cluster::start_persistent(servers, &opts.redis_dir, &env).await?;
    let addrs: Vec<SocketAddr> = cluster.nodes.iter().map(|n| n.addr).collect();
    let publishers = opts.publishers.clamp(1, opts.clients);
    let rooms = opts.rooms.clamp(1, opts.clients);
    let shared = Arc::new(Shared {
        phase: AtomicU8::new(RUN),
        started: Instant::now(),
        per_publisher_rate: opts.rate / publishers as f64,
        outstanding: AtomicI64::new(0),
        acked_per_room: (0..rooms).map(|_| AtomicU64::new(0)).collect(),
        unique: AtomicU64::new(0),
        joined: (0..2).map(|_| AtomicI64::new(0)).collect(),
        printed: AtomicU64::new(0),
    });
    let specs: Vec<Spec> = (0..opts.clients)
        .map(|i| Spec {
            index: i,
            room: i % rooms,
            node: (i / rooms) % 2,
            publisher: (i < publishers).then_some(i as u32),
        })
        .collect();
    let mut members = vec![0u64; rooms];
    let mut per_node = [0i64; 2];
    for s in &specs {
        members[s.room] += 1;
        per_node[s.node] += 1;
    }

    // Connect everyone, then read memory before the load.
    let (start_tx, start_rx) = tokio::sync::watch::channel(false);
    let tasks: Vec<_> = specs
        .iter()
        .map(|&spec| {
            let shared = shared.clone();
            let addr = addrs[spec.node];
            let mut start = start_rx.clone();
            tokio::spawn(async move {
                let mut client = Client::new(spec);
                client.run(addr, &shared, &mut start).await;
                client.outcome
            })
        })
        .collect();
    for (node, &want) in per_node.iter().enumerate() {
        wait_joined(&shared, node, want, Duration::from_secs(30)).await;
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let mut rss_before: Vec<u64> = cluster
        .node_pids()
        .iter()
        .map(|&p| cluster::rss_kib(p))
        .collect();
    eprintln!(
        "soak: {} clients joined; RSS {rss_before:?} KiB",
        opts.clients
    );

    // The load, with the two faults.
    let started = Instant::now();
    let _ = start_tx.send(true);
    let secs = Duration::from_secs_f64(opts.secs);
    tokio::time::sleep_until((started + secs / 3).into()).await;
    let redis_down = cluster.restart_redis().await?;
    eprintln!("soak: Redis killed and restarted ({redis_down:.2?})");
    tokio::time::sleep_until((started + secs * 2 / 3).into()).await;
    let (node_down, status) = cluster.restart_node(1, servers).await?;
    eprintln!("soak: node 1 stopped ({status}) and ready again ({node_down:.2?})");
    let rejoin = Instant::now();
    let back = wait_joined(&shared, 1, per_node[1], Duration::from_secs(20)).await;
    let rejoin_secs = rejoin.elapsed().as_secs_f64();
    rss_before[1] = cluster.nodes[1].pid.map_or(0, cluster::rss_kib);
    tokio::time::sleep_until((started + secs).into()).await;

    // Drain: no new sends; wait for every ack and every delivery they imply.
    shared.phase.store(DRAIN, Relaxed);
    let drain_until = Instant::now() + Duration::from_secs_f64(opts.drain_secs);
    while Instant::now() < drain_until {
        let expected: u64 = (0..rooms)
            .map(|r| shared.acked_per_room[r].load(Relaxed) * members[r])
            .sum();
        if shared.outstanding.load(Relaxed) == 0 && shared.unique.load(Relaxed) >= expected {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_secs_f64(opts.idle_secs)).await;
    let rss_after: Vec<u64> = cluster
        .node_pids()
        .iter()
        .map(|&p| cluster::rss_kib(p))
        .collect();
    let trouble = cluster.trouble().await;
    let mut gaps = Vec::new();
    for (i, addr) in addrs.iter().enumerate() {
        let text = cluster::http_get(*addr, "/metrics")
            .await
            .unwrap_or_default();
        for line in text.lines() {
            if line.starts_with("scalechat_backplane_gaps") {
                gaps.push(format!("n{i} {line}"));
            }
        }
    }
    shared.phase.store(STOP, Relaxed);
    let mut outcomes = Vec::new();
    for task in tasks {
        outcomes.push(task.await?);
    }
    drop(cluster);

    // Tally.
    let mut acked: HashSet<(u32, u64)> = HashSet::new();
    let mut acked_rooms = vec![0u64; rooms];
    for (spec, o) in specs.iter().zip(&outcomes) {
        if let Some(p) = spec.publisher {
            acked.extend(o.acked.iter().map(|&s| (p, s)));
            acked_rooms[o.room] += o.acked.len() as u64;
        }
    }
    let expected: u64 = (0..rooms).map(|r| acked_rooms[r] * members[r]).sum();
    let sum = |f: &dyn Fn(&Outcome) -> u64| outcomes.iter().map(f).sum::<u64>();
    let unique = sum(&|o| o.seen.iter().filter(|k| acked.contains(k)).count() as u64);
    let unacked_received = sum(&|o| o.seen.iter().filter(|k| !acked.contains(k)).count() as u64);
    let duplicates = sum(&|o| o.duplicates);
    let lost = expected.saturating_sub(unique);
    let stuck = outcomes
        .iter()
        .zip(&specs)
        .filter(|(o, s)| {
            (o.seen.iter().filter(|k| acked.contains(k)).count() as u64) < acked_rooms[s.room]
        })
        .count();
    let mut errors: BTreeMap<String, u64> = BTreeMap::new();
    let mut closes: BTreeMap<u16, u64> = BTreeMap::new();
    for o in &outcomes {
        for (k, v) in &o.errors {
            *errors.entry(k.clone()).or_default() += v;
        }
        for (k, v) in &o.close_codes {
            *closes.entry(*k).or_default() += v;
        }
    }
    let mut notes: Vec<String> = errors
        .iter()
        .map(|(k, v)| format!("error {k} ×{v}"))
        .collect();
    notes.extend(closes.iter().map(|(k, v)| format!("closed {k} ×{v}")));
    if unacked_received > 0 {
        notes.push(format!(
            "{unacked_received} deliveries of messages never acked"
        ));
    }
    notes.extend(gaps);
    if !trouble.is_empty() {
        notes.push(trouble);
    }
    let mib = |k: u64| format!("{:.1}", k as f64 / 1024.0);

    let mut table = Table::new(
        &format!(
            "Soak: {} clients in {rooms} rooms on 2 nodes (Redis, AOF fsync always), {} msg/s from {publishers} publishers, {} s; Redis killed at 1/3, node 1 restarted at 2/3",
            opts.clients, opts.rate, opts.secs
        ),
        &[
            "acked",
            "deliveries expected",
            "unique received",
            "lost",
            "duplicates",
            "members short",
            "id gaps",
            "dup acks",
            "unavailable resent",
            "reconnects",
            "recovered true / false",
            "Redis down s",
            "node 1 down / rejoined s",
            "n0 RSS before → after MiB",
            "n1 RSS before (after restart) → after MiB",
            "server reports",
        ],
    );
    table.push(vec![
        acked.len().to_string(),
        expected.to_string(),
        unique.to_string(),
        lost.to_string(),
        duplicates.to_string(),
        stuck.to_string(),
        sum(&|o| o.id_gaps).to_string(),
        sum(&|o| o.duplicate_acks).to_string(),
        sum(&|o| o.unavailable).to_string(),
        sum(&|o| o.reconnects).to_string(),
        format!(
            "{} / {}",
            sum(&|o| o.recovered_true),
            sum(&|o| o.recovered_false)
        ),
        format!("{:.2}", redis_down.as_secs_f64()),
        format!(
            "{:.2} / {}",
            node_down.as_secs_f64(),
            if back {
                format!("{rejoin_secs:.2}")
            } else {
                "not all".into()
            }
        ),
        format!("{} → {}", mib(rss_before[0]), mib(rss_after[0])),
        format!("{} → {}", mib(rss_before[1]), mib(rss_after[1])),
        if notes.is_empty() {
            "-".into()
        } else {
            notes.join("; ")
        },
    ]);
    let extra = format!(
        "\nepoch changes seen: {}; joined without epoch: {}; failed connection attempts: {}\n",
        sum(&|o| o.epoch_changes),
        sum(&|o| o.joined_without_epoch),
        sum(&|o| o.failed_connects),
    );
    Ok((table.markdown() + &extra, lost == 0 && duplicates == 0))
}

/// Waits until `want` clients of `node` are joined; false on timeout.
async fn wait_joined(shared: &Shared, node: usize, want: i64, timeout: Duration) -> bool {
    let until = Instant::now() + timeout;
    while shared.joined[node].load(Relaxed) < want {
        if Instant::now() > until {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    true
}

impl Client {
    fn new(spec: Spec) -> Client {
        Client {
            spec,
            room: format!("soak{}", spec.room),
            last_id: 0,
            epoch: None,
            pending: BTreeMap::new(),
            retry: Vec::new(),
            next_seq: 0,
            joined_at: (0, 0, 0),
            out: Vec::new(),
            closed: false,
            outcome: Outcome {
                room: spec.room,
                ..Outcome::default()
            },
        }
    }

    /// Connects, reconnects and publishes until the run stops.
    async fn run(
        &mut self,
        addr: SocketAddr,
        shared: &Shared,
        start: &mut tokio::sync::watch::Receiver<bool>,
    ) {
        let mut reader = FrameReader::new(16 * 1024);
        let source = ws::source_addr(self.spec.index, 8);
        let mut first = true;
        while shared.phase.load(Relaxed) != STOP {
            let mut path = format!("/ws?room={}&name=c{}", self.room, self.spec.index);
            if let Some(epoch) = &self.epoch {
                path.push_str(&format!(
                    "&since={}&epoch={}",
                    self.last_id,
                    String::from_utf8_lossy(epoch)
                ));
            }
            let target = Target { addr, path };
            let connect = ws::connect(&target, source, &mut reader);
            let stream = match tokio::time::timeout(Duration::from_secs(5), connect).await {
                Ok(Ok(s)) => s,
                _ => {
                    self.outcome.failed_connects += 1;
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            if !first {
                self.outcome.reconnects += 1;
            }
            first = false;
            self.closed = false;
            let (mut rd, mut wr) = stream.into_split();
            // Everything not acked goes again, with the same ref.
            self.retry.clear();
            let unacked: Vec<(u64, u64)> = self.pending.iter().map(|(&s, &t)| (s, t)).collect();
            for (seq, sent) in unacked {
                self.encode_send(seq, sent);
            }
            let mut joined = false;
            let mut tick = tokio::time::interval(Duration::from_millis(20));
            loop {
                let was_joined = joined;
                reader.parse(|op, payload| {
                    if self.frame(op, payload, shared) {
                        joined = true;
                    }
                });
                if joined && !was_joined {
                    shared.joined[self.spec.node].fetch_add(1, Relaxed);
                }
                if !self.out.is_empty() {
                    if wr.write_all(&self.out).await.is_err() {
                        break;
                    }
                    self.out.clear();
                }
                if self.closed {
                    break;
                }
                tokio::select! {
                    r = reader.fill(&mut rd) => {
                        if !matches!(r, Ok(n) if n > 0) {
                            break;
                        }
                    }
                    _ = tick.tick() => {
                        match shared.phase.load(Relaxed) {
                            STOP => break,
                            RUN if joined && *start.borrow_and_update() => self.publish(shared),
                            _ => {}
                        }
                        self.resend_due();
                    }
                }
            }
            if joined {
                shared.joined[self.spec.node].fetch_sub(1, Relaxed);
            }
        }
    }

    /// Sends this publisher's messages that are due by now.
    fn publish(&mut self, shared: &Shared) {
        if self.spec.publisher.is_none() {
            return;
        }
        let elapsed = shared.started.elapsed().as_secs_f64();
        let due = (elapsed * shared.per_publisher_rate) as u64;
        // A publisher that starts late does not burst to catch up.
        if self.next_seq == 0 {
            self.next_seq = due;
        }
        while self.next_seq < due {
            let seq = self.next_seq;
            self.next_seq += 1;
            let sent = track::now_ns();
            self.pending.insert(seq, sent);
            shared.outstanding.fetch_add(1, Relaxed);
            self.encode_send(seq, sent);
        }
    }

    fn resend_due(&mut self) {
        let now = Instant::now();
        let mut due = Vec::new();
        self.retry.retain(|&(at, seq)| {
            if at <= now {
                due.push(seq);
            }
            at > now
        });
        for seq in due {
            if let Some(&sent) = self.pending.get(&seq) {
                self.encode_send(seq, sent);
            }
        }
    }

    fn encode_send(&mut self, seq: u64, sent: u64) {
        let publisher = self.spec.publisher.unwrap_or(0);
        let mut text = Vec::with_capacity(128);
        text.extend_from_slice(b"{\"type\":\"send\",\"room\":\"");
        text.extend_from_slice(self.room.as_bytes());
        text.extend_from_slice(b"\",\"message\":\"");
        track::push_marker(&mut text, publisher, seq, sent);
        text.extend_from_slice(format!("\",\"ref\":\"p{publisher}-{seq}\"}}").as_bytes());
        ws::encode_client_frame(&mut self.out, OP_TEXT, &text);
    }

    /// Handles one server frame; true for the `joined` of the client's room.
    fn frame(&mut self, op: u8, payload: &[u8], shared: &Shared) -> bool {
        match op {
            OP_PING => ws::encode_client_frame(&mut self.out, 0xA, payload),
            OP_CLOSE => {
                *self
                    .outcome
                    .close_codes
                    .entry(ws::close_code(payload))
                    .or_default() += 1;
                self.closed = true;
            }
            OP_TEXT if payload.starts_with(b"{\"type\":\"message\"") => {
                self.message(payload, shared)
            }
            OP_TEXT if payload.starts_with(b"{\"type\":\"ack\"") => {
                let Some(seq) = ref_seq(payload) else {
                    return false;
                };
                if self.pending.remove(&seq).is_some() {
                    shared.outstanding.fetch_sub(1, Relaxed);
                    shared.acked_per_room[self.spec.room].fetch_add(1, Relaxed);
                    self.outcome.acked.insert(seq);
                }
                if memmem::find(payload, b"\"duplicate\":true").is_some() {
                    self.outcome.duplicate_acks += 1;
                }
            }
            OP_TEXT if payload.starts_with(b"{\"type\":\"joined\"") => {
                match str_field(payload, b"\"epoch\":\"") {
                    Some(epoch) => {
                        if self.epoch.as_deref().is_some_and(|e| e != epoch) {
                            self.outcome.epoch_changes += 1;
                        }
                        if memmem::find(payload, b"\"recovered\":").is_none() {
                            // A plain join: the history that follows ends at last_id.
                            let last = num_field(payload, b"\"last_id\":").unwrap_or(0);
                            let history = num_field(payload, b"\"history\":").unwrap_or(0);
                            self.last_id = last.saturating_sub(history);
                        }
                        self.epoch = Some(epoch.to_vec());
                    }
                    None => self.outcome.joined_without_epoch += 1,
                }
                self.joined_at = (
                    num_field(payload, b"\"last_id\":").unwrap_or(0),
                    num_field(payload, b"\"history\":").unwrap_or(0),
                    0,
                );
                if memmem::find(payload, b"\"recovered\":true").is_some() {
                    self.outcome.recovered_true += 1;
                }
                if memmem::find(payload, b"\"recovered\":false").is_some() {
                    self.outcome.recovered_false += 1;
                }
                return true;
            }
            OP_TEXT => {
                if let Some(code) = track::error_code(payload) {
                    if code == "unavailable"
                        && let Some(seq) = ref_seq(payload)
                    {
                        self.outcome.unavailable += 1;
                        let at = Instant::now() + Duration::from_millis(300);
                        self.retry.push((at, seq));
                    } else {
                        *self.outcome.errors.entry(code).or_default() += 1;
                    }
                }
            }
            _ => {}
        }
        false
    }

    fn message(&mut self, payload: &[u8], shared: &Shared) {
        self.joined_at.2 += 1;
        let id = num_field(payload, b"\"id\":").unwrap_or(0);
        let epoch = str_field(payload, b"\"epoch\":\"");
        match (epoch, &self.epoch) {
            (Some(e), Some(mine)) if e == mine.as_slice() => {
                if id != self.last_id + 1 {
                    self.outcome.id_gaps += 1;
                    if shared.printed.fetch_add(1, Relaxed) < 10 {
                        eprintln!(
                            "soak: c{} (node {}, {}) got id {id} after {} at {:.2} s, {} reconnects; \
                             message {} since its last joined (last_id {}, history {})",
                            self.spec.index,
                            self.spec.node,
                            self.room,
                            self.last_id,
                            shared.started.elapsed().as_secs_f64(),
                            self.outcome.reconnects,
                            self.joined_at.2,
                            self.joined_at.0,
                            self.joined_at.1,
                        );
                    }
                }
            }
            (Some(e), _) => {
                if self.epoch.is_some() {
                    self.outcome.epoch_changes += 1;
                }
                self.epoch = Some(e.to_vec());
            }
            (None, _) => {}
        }
        self.last_id = id;
        if let Some(d) = track::parse_delivery(payload) {
            if self.outcome.seen.insert((d.publisher, d.seq)) {
                shared.unique.fetch_add(1, Relaxed);
            } else {
                self.outcome.duplicates += 1;
            }
        }
    }
}

/// The seq of a `ref` of the form `p<publisher>-<seq>`.
fn ref_seq(payload: &[u8]) -> Option<u64> {
    let r = str_field(payload, b"\"ref\":\"p")?;
    let dash = memchr::memchr(b'-', r)?;
    std::str::from_utf8(&r[dash + 1..]).ok()?.parse().ok()
}

/// The string after `key` (which ends with the opening quote), up to the closing quote.
fn str_field<'a>(payload: &'a [u8], key: &[u8]) -> Option<&'a [u8]> {
    let at = memmem::find(payload, key)? + key.len();
    let len = memchr::memchr(b'"', &payload[at..])?;
    Some(&payload[at..at + len])
}

/// The whole number after `key`.
fn num_field(payload: &[u8], key: &[u8]) -> Option<u64> {
    let at = memmem::find(payload, key)? + key.len();
    let digits: &[u8] = &payload[at..];
    let len = digits.iter().take_while(|b| b.is_ascii_digit()).count();
    std::str::from_utf8(&digits[..len]).ok()?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_fields() {
        let ack = br#"{"type":"ack","ref":"p3-17","room":"soak0","id":42,"duplicate":true}"#;
        assert_eq!(ref_seq(ack), Some(17));
        assert_eq!(num_field(ack, b"\"id\":"), Some(42));
        let joined =
            br#"{"type":"joined","room":"r","online":2,"epoch":"ab12","last_id":41,"history":3}"#;
        assert_eq!(str_field(joined, b"\"epoch\":\""), Some(&b"ab12"[..]));
        assert_eq!(num_field(joined, b"\"id\":"), None);
        assert_eq!(num_field(joined, b"\"last_id\":"), Some(41));
    }
}
