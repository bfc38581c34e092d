//! The `room-worker` process: opens its range of the member connections of a [`Layout`],
//! reports when they are all open (with each one's connect time), then runs the orders it
//! reads on its standard input, one JSON line each, and answers each with one JSON line on its
//! standard output: `publish` (its publishers send at a rate for a while; answered with the
//! sequence numbers each sent) and `drain` (wait until its members have the step's messages;
//! answered with its counters, the messages some members lack, the sends refused, and latency
//! histograms). It closes everything when standard input closes.

use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, bail};
use hdrhistogram::Histogram;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::sync::{Semaphore, watch};

use super::member::{Member, Sender};
use super::{
    IN_FLIGHT, Layout, MessageId, Missing, Numbers, Order, Ready, Refusal, Report, Sent, pairs,
    room_name,
};
use crate::track::{Seqs, histogram, now_ns};
use crate::ws::{self, Target};

/// How long a drain waits with no delivery arriving before it gives up: that long by the
/// clock and in checks made (a worker that was not scheduled for a while has not read what
/// arrived meanwhile).
const STALL: Duration = Duration::from_secs(5);

/// How often a drain counts what its members have.
const CHECK: Duration = Duration::from_millis(50);

/// Messages a worker lists, at most, of those some of its members lack.
pub(super) const MISSING_LISTED: usize = 1000;

/// Latency histograms per worker, each shared by the connections whose index has its number
/// modulo this (one histogram per connection would cost 40 KiB each).
const SHARDS: usize = 16;

/// The arguments of the `room-worker` process.
#[derive(Clone, Debug, clap::Args)]
pub struct WorkerArgs {
    /// The nodes, in the same order in every worker (see [`Layout::node_of`]).
    #[arg(long, value_delimiter = ',')]
    addrs: Vec<SocketAddr>,
    /// Rooms in all (`rm0`, `rm1`, …).
    #[arg(long)]
    rooms: usize,
    /// Members of each room.
    #[arg(long)]
    members: usize,
    /// Members of each room that publish (the first ones).
    #[arg(long)]
    publishers: usize,
    /// Source addresses (127.0.0.2 onwards) the connections are spread over.
    #[arg(long)]
    sources: usize,
    /// One member in this many on each node records latency.
    #[arg(long, default_value_t = 1)]
    latency_every: usize,
    /// The first connection of this worker (connection g is member g mod members of room
    /// g / members).
    #[arg(long)]
    first: usize,
    /// How many connections, from the first.
    #[arg(long)]
    count: usize,
}

impl WorkerArgs {
    /// The arguments that start a worker for `range` of `layout`'s connections.
    pub fn argv(
        layout: &Layout,
        addrs: &[SocketAddr],
        range: &std::ops::Range<usize>,
    ) -> Vec<String> {
        let addrs: Vec<String> = addrs.iter().map(ToString::to_string).collect();
        let mut argv = vec!["room-worker".to_owned(), "--addrs".into(), addrs.join(",")];
        for (name, value) in [
            ("--rooms", layout.rooms),
            ("--members", layout.members),
            ("--publishers", layout.publishers),
            ("--sources", layout.sources),
            ("--latency-every", layout.latency_every),
            ("--first", range.start),
            ("--count", range.len()),
        ] {
            argv.extend([name.to_owned(), value.to_string()]);
        }
        argv
    }

    fn layout(&self) -> Layout {
        Layout {
            rooms: self.rooms.max(1),
            members: self.members.max(1),
            publishers: self.publishers.clamp(1, self.members.max(1)),
            per_process: self.count,
            sources: self.sources,
            latency_every: self.latency_every.max(1),
        }
    }
}

/// The publishers' current orders: `rate` messages per second each from `start_ns` for
/// `period_ns`.
#[derive(Clone, Copy, Default)]
pub(super) struct Phase {
    pub(super) rate: f64,
    pub(super) start_ns: u64,
    pub(super) period_ns: u64,
}

/// What the connections of one worker add up.
pub(super) struct Shared {
    pub(super) joined: AtomicUsize,
    pub(super) failed: AtomicUsize,
    pub(super) first_error: Mutex<Option<String>>,
    /// Time from the start of each connect to its `joined`, µs.
    pub(super) connect: Mutex<Histogram<u64>>,
    /// The first room any of this worker's connections is in.
    pub(super) first_room: usize,
    /// The next sequence number of each publisher of each room (from `first_room` on,
    /// `publishers` per room).
    pub(super) next_seq: Vec<AtomicU64>,
    /// The sequence numbers each member has seen from each publisher of its room, by
    /// connection (from the worker's first).
    pub(super) seqs: Vec<Mutex<Vec<Seqs>>>,
    /// Sends answered with an error, not reported yet.
    pub(super) refused: Mutex<Vec<Refusal>>,
    pub(super) duplicates: AtomicU64,
    pub(super) deliveries: AtomicU64,
    pub(super) last_delivery_ns: AtomicU64,
    pub(super) disconnected: AtomicUsize,
    pub(super) errors: Mutex<HashMap<String, u64>>,
    pub(super) close_codes: Mutex<HashMap<u16, u64>>,
    pub(super) latencies: Vec<Mutex<Latencies>>,
}

pub(super) struct Latencies {
    /// Send to arrival in the receiver's socket (the kernel's stamp).
    pub(super) latency: Histogram<u64>,
    /// Send to the moment the worker read it.
    pub(super) read: Histogram<u64>,
}

impl Shared {
    fn new(first_room: usize, rooms: usize, connections: usize, publishers: usize) -> Shared {
        Shared {
            joined: AtomicUsize::new(0),
            failed: AtomicUsize::new(0),
            first_error: Mutex::new(None),
            connect: Mutex::new(histogram()),
            first_room,
            next_seq: (0..rooms * publishers).map(|_| AtomicU64::new(0)).collect(),
            seqs: (0..connections)
                .map(|_| Mutex::new(vec![Seqs::default(); publishers]))
                .collect(),
            refused: Mutex::new(Vec::new()),
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
        }
    }
}

/// The `room-worker`: opens every connection of its range, prints a [`Ready`] line, then
/// answers each [`Order`] line on standard input; closes everything when standard input
/// closes.
pub async fn worker(args: WorkerArgs) -> anyhow::Result<()> {
    if args.addrs.is_empty() || args.count == 0 {
        bail!("room-worker: no nodes or no connections");
    }
    let layout = args.layout();
    let range = args.first..args.first + args.count;
    let first_room = range.start / layout.members;
    let last_room = (range.end - 1) / layout.members;
    let shared = Arc::new(Shared::new(
        first_room,
        last_room + 1 - first_room,
        range.len(),
        layout.publishers,
    ));
    let (orders, phase) = watch::channel(Phase::default());
    let mut tasks = spawn_members(&args, &shared, &phase);
    let total = range.len();
    while shared.joined.load(Ordering::Relaxed) + shared.failed.load(Ordering::Relaxed) < total {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let ready = Ready {
        joined: shared.joined.load(Ordering::Relaxed),
        failed: shared.failed.load(Ordering::Relaxed),
        first_error: shared.first_error.lock().expect("error lock").clone(),
        connect: pairs(&shared.connect.lock().expect("connect lock")),
    };
    answer(serde_json::to_string(&ready)?).await?;
    let mut accounts = Accounts {
        layout,
        first: range.start,
        nodes: args.addrs.len(),
        numbered: vec![0; shared.next_seq.len()],
        earlier: Vec::new(),
    };
    serve(&shared, &orders, &mut accounts).await?;
    tasks.shutdown().await;
    Ok(())
}

/// Starts a task for every member connection of the worker's range; `phase` carries the
/// publishers' orders.
fn spawn_members(
    args: &WorkerArgs,
    shared: &Arc<Shared>,
    phase: &watch::Receiver<Phase>,
) -> tokio::task::JoinSet<()> {
    let layout = args.layout();
    let gate = Arc::new(Semaphore::new(IN_FLIGHT));
    let mut tasks = tokio::task::JoinSet::new();
    let all_publishers = layout.all_publishers() as f64;
    for g in args.first..args.first + args.count {
        let (room, j) = (g / layout.members, g % layout.members);
        let sender = (j < layout.publishers).then(|| Sender {
            id: j as u32,
            room,
            slot: (room - shared.first_room) * layout.publishers + j,
            offset: (room * layout.publishers + j) as f64 / all_publishers,
            seq: 0,
            k: 0,
            phase: Phase::default(),
            orders: phase.clone(),
        });
        let name = room_name(room);
        let member = Member {
            index: g - args.first,
            target: Target {
                addr: args.addrs[layout.node_of(g, args.addrs.len())],
                path: format!("/ws?room={name}&name=u{room}-{j}"),
            },
            source: ws::source_addr(g, layout.sources),
            room: name,
            shard: g % SHARDS,
            samples_latency: layout.samples_latency(g, args.addrs.len()),
            sender,
            shared: shared.clone(),
        };
        tasks.spawn(member.run(gate.clone()));
    }
    tasks
}

/// What a worker keeps between steps to number and count them.
struct Accounts {
    layout: Layout,
    /// The worker's first connection.
    first: usize,
    nodes: usize,
    /// Each publisher's next sequence number at the end of the last step's publishing: the
    /// next step's messages start there.
    numbered: Vec<u64>,
    /// Each earlier step whose messages had not all arrived when it was answered: its
    /// messages, the deliveries of them counted so far and those due, to count the late ones.
    earlier: Vec<(Vec<Numbers>, u64, u64)>,
}

/// Answers each [`Order`] line on standard input until it closes.
async fn serve(
    shared: &Shared,
    orders: &watch::Sender<Phase>,
    accounts: &mut Accounts,
) -> anyhow::Result<()> {
    let mut commands = BufReader::new(tokio::io::stdin()).lines();
    let mut begun = None;
    while let Some(line) = commands.next_line().await? {
        let order: Order = serde_json::from_str(&line)
            .with_context(|| format!("room-worker: unexpected order {line:?}"))?;
        let reply = match order {
            Order::Publish { rate, secs } => {
                let (step, sent) = publish(shared, orders, accounts, rate, secs).await;
                begun = Some(step);
                serde_json::to_string(&sent)?
            }
            Order::Drain {
                expected,
                numbers,
                max_secs,
            } => {
                let step = begun.take().context("room-worker: drain before publish")?;
                let report = finish(shared, accounts, step, expected, numbers, max_secs).await;
                serde_json::to_string(&report)?
            }
        };
        answer(reply).await?;
    }
    Ok(())
}

/// Writes one line to standard output, at once.
async fn answer(line: String) -> io::Result<()> {
    let mut out = tokio::io::stdout();
    out.write_all((line + "\n").as_bytes()).await?;
    out.flush().await
}

/// Where a step began: the worker's counters then, and the time.
struct Begun {
    duplicates: u64,
    deliveries: u64,
    start_ns: u64,
}

/// The first half of a step: resets the latency histograms, publishes at `rate` messages per
/// second from each publisher for `secs`, and tells the numbers each publisher sent since the
/// last step (a send written after that step's count belongs to this one).
async fn publish(
    shared: &Shared,
    orders: &watch::Sender<Phase>,
    accounts: &mut Accounts,
    rate: f64,
    secs: f64,
) -> (Begun, Sent) {
    for l in &shared.latencies {
        let mut l = l.lock().expect("latency lock");
        l.latency.reset();
        l.read.reset();
    }
    shared.errors.lock().expect("errors lock").clear();
    let begun = Begun {
        duplicates: shared.duplicates.load(Ordering::Acquire),
        deliveries: shared.deliveries.load(Ordering::Acquire),
        start_ns: now_ns(),
    };
    orders.send_replace(Phase {
        rate,
        start_ns: begun.start_ns,
        period_ns: (secs * 1e9) as u64,
    });
    // The publishers stop by themselves at the end of the period; the orders go back to
    // nothing after it, with a margin for a timer that is late.
    tokio::time::sleep(Duration::from_secs_f64(secs) + Duration::from_millis(50)).await;
    orders.send_replace(Phase::default());
    tokio::time::sleep(Duration::from_millis(5)).await;
    let publishers = accounts.layout.publishers;
    let mut numbers = Vec::new();
    for (slot, (next, numbered)) in shared
        .next_seq
        .iter()
        .zip(&mut accounts.numbered)
        .enumerate()
    {
        let end = next.load(Ordering::Acquire);
        if end > *numbered {
            numbers.push(Numbers {
                room: shared.first_room + slot / publishers,
                publisher: (slot % publishers) as u32,
                start: *numbered,
                end,
            });
            *numbered = end;
        }
    }
    (begun, Sent { numbers })
}

/// The messages of `numbers`, by room.
fn by_room(numbers: &[Numbers]) -> HashMap<usize, Vec<Numbers>> {
    let mut rooms: HashMap<usize, Vec<Numbers>> = HashMap::new();
    for n in numbers {
        rooms.entry(n.room).or_default().push(*n);
    }
    rooms
}

/// Deliveries of the messages of `rooms` (see [`by_room`]) the worker's members have.
fn seen(shared: &Shared, accounts: &Accounts, rooms: &HashMap<usize, Vec<Numbers>>) -> u64 {
    let m = accounts.layout.members;
    let mut total = 0;
    for (i, seqs) in shared.seqs.iter().enumerate() {
        let Some(numbers) = rooms.get(&((accounts.first + i) / m)) else {
            continue;
        };
        let seqs = seqs.lock().expect("seqs lock");
        for n in numbers {
            if let Some(s) = seqs.get(n.publisher as usize) {
                total += s.seen_in(n.start, n.end);
            }
        }
    }
    total
}

/// The messages of `rooms` some of the worker's members lack (at most [`MISSING_LISTED`]),
/// and whether that is all of them.
fn missing(
    shared: &Shared,
    accounts: &Accounts,
    rooms: &HashMap<usize, Vec<Numbers>>,
) -> (Vec<Missing>, bool) {
    let m = accounts.layout.members;
    let mut lacked: HashMap<MessageId, Missing> = HashMap::new();
    let mut complete = true;
    for (i, seqs) in shared.seqs.iter().enumerate() {
        let g = accounts.first + i;
        let Some(numbers) = rooms.get(&(g / m)) else {
            continue;
        };
        let node = accounts.layout.node_of(g, accounts.nodes);
        let seqs = seqs.lock().expect("seqs lock");
        for n in numbers {
            let Some(s) = seqs.get(n.publisher as usize) else {
                continue;
            };
            for seq in s.missing_in(n.start, n.end) {
                let message = MessageId {
                    room: n.room,
                    publisher: n.publisher,
                    seq,
                };
                if !lacked.contains_key(&message) && lacked.len() >= MISSING_LISTED {
                    complete = false;
                    continue;
                }
                let entry = lacked.entry(message).or_insert_with(|| Missing {
                    message,
                    per_node: vec![0; accounts.nodes],
                    first_member: g,
                });
                if let Some(count) = entry.per_node.get_mut(node) {
                    *count += 1;
                }
            }
        }
    }
    let mut listed: Vec<Missing> = lacked.into_values().collect();
    listed.sort_by_key(|l| l.message);
    (listed, complete)
}

/// The second half of a step: waits until the members have the messages of `numbers`
/// (`expected` deliveries), or nothing has arrived for [`STALL`], or `max_secs` have passed,
/// and reports.
async fn finish(
    shared: &Shared,
    accounts: &mut Accounts,
    begun: Begun,
    expected: u64,
    numbers: Vec<Numbers>,
    max_secs: f64,
) -> Report {
    let rooms = by_room(&numbers);
    let unique = drain(shared, accounts, &rooms, expected, max_secs).await;
    let (missing, missing_complete) = if unique < expected {
        missing(shared, accounts, &rooms)
    } else {
        (Vec::new(), true)
    };
    let mut late = 0;
    let mut earlier = std::mem::take(&mut accounts.earlier);
    for (numbers, counted, _) in &mut earlier {
        let now = seen(shared, accounts, &by_room(numbers));
        late += now.saturating_sub(*counted);
        *counted = now;
    }
    // Once all of a step's messages arrived, none can come late.
    earlier.retain(|(_, counted, due)| counted < due);
    if unique < expected {
        earlier.push((numbers, unique, expected));
    }
    accounts.earlier = earlier;
    let refused = std::mem::take(&mut *shared.refused.lock().expect("refused lock"));
    let (mut latency, mut read) = (histogram(), histogram());
    for l in &shared.latencies {
        let l = l.lock().expect("latency lock");
        let _ = latency.add(&l.latency);
        let _ = read.add(&l.read);
    }
    Report {
        expected,
        unique,
        missing,
        missing_complete,
        late,
        refused,
        duplicates: shared.duplicates.load(Ordering::Acquire) - begun.duplicates,
        deliveries: shared.deliveries.load(Ordering::Acquire) - begun.deliveries,
        start_ns: begun.start_ns,
        last_delivery_ns: shared.last_delivery_ns.load(Ordering::Acquire),
        latency: pairs(&latency),
        read_latency: pairs(&read),
        disconnected: shared.disconnected.load(Ordering::Acquire),
        errors: std::mem::take(&mut *shared.errors.lock().expect("errors lock")),
        close_codes: shared.close_codes.lock().expect("close lock").clone(),
    }
}

/// Waits until the members have `expected` deliveries of the messages of `rooms`, or nothing
/// has arrived for [`STALL`] (by the clock and in checks), or `max_secs` have passed; what
/// they have.
async fn drain(
    shared: &Shared,
    accounts: &Accounts,
    rooms: &HashMap<usize, Vec<Numbers>>,
    expected: u64,
    max_secs: f64,
) -> u64 {
    let until = now_ns() + (max_secs * 1e9) as u64;
    let quiet_checks = STALL.as_nanos() / CHECK.as_nanos();
    let mut deliveries = shared.deliveries.load(Ordering::Acquire);
    let mut have = seen(shared, accounts, rooms);
    let (mut moved, mut quiet) = (now_ns(), 0);
    while have < expected && now_ns() < until {
        tokio::time::sleep(CHECK).await;
        let (now, now_have) = (
            shared.deliveries.load(Ordering::Acquire),
            seen(shared, accounts, rooms),
        );
        if now != deliveries || now_have != have {
            (deliveries, have, moved, quiet) = (now, now_have, now_ns(), 0);
        } else {
            quiet += 1;
            if quiet >= quiet_checks && now_ns() - moved > STALL.as_nanos() as u64 {
                break;
            }
        }
    }
    have
}
