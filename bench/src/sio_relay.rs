//! What relaying costs a Socket.IO client whose requests reach a node that does not own its
//! session (no sticky sessions): two nodes on Redis, every session opened on node 0 (the
//! owner), its later requests sent either to node 0 (direct) or to node 1, which relays them
//! (relayed). In the same run, alternating: the polling handshake and CONNECT, the upgrade to
//! WebSocket, and the round trip of a message from `emit` to the sender's own `message` event,
//! over polling and over WebSocket. One client at a time: the cost of the extra hop, not of a
//! load.

use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use anyhow::bail;
use hdrhistogram::Histogram;

use crate::cluster::{Cluster, ServerOpts, Setup, http_get};
use crate::report::{Table, percentiles};
use crate::sio::{self, Http, Polling, WebSocket};
use crate::suite::Plan;
use crate::track::{histogram, now_ns};
use crate::ws;

/// How long one connect or one round trip may take before it counts as failed: less than
/// the nodes' `server.header_read_timeout_secs` (10), after which they close the keep-alive
/// connections of the clients that waited meanwhile.
const TIMEOUT: Duration = Duration::from_secs(5);

/// Where a session's requests after the handshake go.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Path {
    Direct,
    Relayed,
}

impl Path {
    fn name(self) -> &'static str {
        match self {
            Path::Direct => "direct (to the owner)",
            Path::Relayed => "relayed (through the other node)",
        }
    }
}

/// The two nodes: the owner of every session, and the one that relays.
struct Nodes {
    owner: SocketAddr,
    other: SocketAddr,
    source: IpAddr,
}

impl Nodes {
    fn via(&self, path: Path) -> SocketAddr {
        match path {
            Path::Direct => self.owner,
            Path::Relayed => self.other,
        }
    }

    /// A polling session opened at the owner, its requests sent to `via`; connections are
    /// opened before `started` is taken, so a connect time is the protocol's alone.
    async fn session(&self, path: Path, name: &str) -> anyhow::Result<(Polling, Instant)> {
        let via = self.via(path);
        let query = format!("&name={name}&room={name}");
        let mut open = Http::connect(self.owner, self.source).await?;
        let get = Http::connect(via, self.source).await?;
        let post = Http::connect(via, self.source).await?;
        let started = Instant::now();
        let sid = sio::handshake(&mut open, &query).await?;
        Ok((Polling::new(sid, get, post), started))
    }
}

/// Runs the scenario; its Markdown tables.
pub async fn run(plan: &Plan, opts: &ServerOpts) -> anyhow::Result<String> {
    if !opts.urls.is_empty() {
        return Ok("Socket.IO relay: skipped (it starts its own servers; drop --url).\n\n".into());
    }
    eprintln!("socket.io relay on {}", Setup::Redis2);
    let cluster = Cluster::start(Setup::Redis2, opts).await?;
    let nodes = Nodes {
        owner: cluster.nodes[0].addr,
        other: cluster.nodes[1].addr,
        source: ws::source_addr(0, 1),
    };
    relay_ready(&nodes).await?;
    let mut out = connects(plan.sio_connects, &nodes).await?;
    out.push_str(&round_trips(plan.sio_messages, &nodes).await?);
    let text = http_get(nodes.other, "/metrics").await.unwrap_or_default();
    let relayed = text
        .lines()
        .find_map(|l| l.strip_prefix("scalechat_socketio_relayed_total "))
        .unwrap_or("?");
    let trouble = cluster.trouble().await;
    out.push_str(&format!(
        "Requests relayed by node 1 (`scalechat_socketio_relayed_total`): {relayed}. \
         Server reports: {}.\n\n",
        if trouble.is_empty() { "-" } else { &trouble }
    ));
    Ok(out)
}

/// Waits until node 1 relays to node 0: it learns node 0's address from Redis.
async fn relay_ready(nodes: &Nodes) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(15);
    let (mut session, _) = nodes.session(Path::Relayed, "probe").await?;
    loop {
        match session.connect("").await {
            Ok(()) => return Ok(()),
            Err(e) if Instant::now() > deadline => return Err(e.context("node 1 never relayed")),
            Err(_) => {
                tokio::time::sleep(Duration::from_millis(100)).await;
                (session, _) = nodes.session(Path::Relayed, "probe").await?;
            }
        }
    }
}

/// `count` sessions each way, alternating: handshake + CONNECT, then the upgrade.
async fn connects(count: usize, nodes: &Nodes) -> anyhow::Result<String> {
    let mut table = Table::new(
        &format!(
            "Socket.IO connect, {count} sessions each way: polling handshake (at the owner) + \
             CONNECT, then the upgrade to WebSocket"
        ),
        &[
            "requests after the handshake",
            "handshake + CONNECT p50 / p99 / max ms",
            "upgrade p50 / p99 / max ms",
            "failed",
            "first error",
        ],
    );
    let mut results = [Connects::new(), Connects::new()];
    for i in 0..count {
        // ABBA, so that neither way always goes first.
        let order = if i % 2 == 0 {
            [Path::Direct, Path::Relayed]
        } else {
            [Path::Relayed, Path::Direct]
        };
        for path in order {
            let r = &mut results[path as usize];
            match tokio::time::timeout(TIMEOUT, connect_once(nodes, path, i)).await {
                Ok(Ok((connect, upgrade))) => {
                    r.connect.saturating_record(connect.max(1));
                    r.upgrade.saturating_record(upgrade.max(1));
                }
                Ok(Err(e)) => r.fail(e.to_string()),
                Err(_) => r.fail("timed out".into()),
            }
        }
    }
    for path in [Path::Direct, Path::Relayed] {
        let r = &results[path as usize];
        table.push(vec![
            path.name().into(),
            three(&r.connect),
            three(&r.upgrade),
            r.failed.to_string(),
            r.first_error.clone().unwrap_or_else(|| "-".into()),
        ]);
    }
    Ok(table.markdown() + "\n")
}

struct Connects {
    connect: Histogram<u64>,
    upgrade: Histogram<u64>,
    failed: u64,
    first_error: Option<String>,
}

impl Connects {
    fn new() -> Connects {
        Connects {
            connect: histogram(),
            upgrade: histogram(),
            failed: 0,
            first_error: None,
        }
    }

    fn fail(&mut self, error: String) {
        self.failed += 1;
        self.first_error.get_or_insert(error);
    }
}

/// One session: the microseconds of handshake + CONNECT, and of the upgrade.
async fn connect_once(nodes: &Nodes, path: Path, i: usize) -> anyhow::Result<(u64, u64)> {
    let (mut session, started) = nodes.session(path, &format!("c{i}")).await?;
    session.connect("").await?;
    let connected = started.elapsed();
    let started = Instant::now();
    let socket = sio::upgrade(nodes.via(path), &session.sid, nodes.source).await?;
    let upgraded = started.elapsed();
    drop(socket); // the session ends with its transport
    Ok((connected.as_micros() as u64, upgraded.as_micros() as u64))
}

/// A client for the round trips: a session on either transport.
enum Client {
    Polling(Box<Polling>),
    WebSocket(WebSocket),
}

/// `count` messages from each of four clients (polling and WebSocket, direct and relayed), in
/// turn: the time from `emit` to the client's own `message` event.
async fn round_trips(count: usize, nodes: &Nodes) -> anyhow::Result<String> {
    let mut clients = Vec::new();
    for (k, (path, upgraded)) in [
        (Path::Direct, false),
        (Path::Relayed, false),
        (Path::Direct, true),
        (Path::Relayed, true),
    ]
    .into_iter()
    .enumerate()
    {
        let (mut session, _) = nodes.session(path, &format!("rtt{k}")).await?;
        session.connect("").await?;
        let client = if upgraded {
            Client::WebSocket(sio::upgrade(nodes.via(path), &session.sid, nodes.source).await?)
        } else {
            Client::Polling(Box::new(session))
        };
        let label = format!(
            "{}, {}",
            if upgraded { "websocket" } else { "polling" },
            path.name()
        );
        clients.push((label, client, histogram()));
    }
    let mut emit = Vec::with_capacity(96);
    for seq in 0..count as u64 {
        let n = clients.len();
        for j in 0..n {
            let k = (j + seq as usize) % n; // each client first in turn
            let (label, client, latency) = &mut clients[k];
            let trip = round_trip(client, &mut emit, k as u32, seq);
            // A message that does not come back leaves its client in no state to go on (a
            // long-poll still out): the run ends there.
            match tokio::time::timeout(TIMEOUT, trip).await {
                Ok(Ok(us)) => latency.saturating_record(us.max(1)),
                Ok(Err(e)) => bail!("{label}: message {seq}: {e}"),
                Err(_) => bail!("{label}: message {seq} did not come back within {TIMEOUT:?}"),
            }
        }
    }
    let mut table = Table::new(
        &format!(
            "Socket.IO message round trip, {count} messages each: emit → the sender's own \
             `message` event, one client at a time"
        ),
        &[
            "transport, requests",
            "p50 ms",
            "p99 ms",
            "p99.9 ms",
            "max ms",
        ],
    );
    for (label, _, latency) in &clients {
        let [p50, p99, p999, max] = percentiles(latency);
        table.push(vec![label.clone(), p50, p99, p999, max]);
    }
    Ok(table.markdown() + "\n")
}

/// Emits message `seq` of `publisher` (encoded into `emit`) and waits for it to come back;
/// the microseconds taken.
async fn round_trip(
    client: &mut Client,
    emit: &mut Vec<u8>,
    publisher: u32,
    seq: u64,
) -> anyhow::Result<u64> {
    emit.clear();
    let sent = now_ns();
    sio::encode_emit(emit, publisher, seq, sent);
    let back = |packet: &[u8]| sio::delivery(packet).is_some_and(|d| d.seq == seq);
    let arrived = match client {
        Client::WebSocket(socket) => {
            socket.send(emit).await?;
            let mut found = false;
            while !found {
                if !socket.read(|packet| found |= back(packet)).await? {
                    bail!("the server closed the WebSocket");
                }
            }
            now_ns()
        }
        Client::Polling(session) => session.post_and_poll(emit, back).await?,
    };
    Ok(arrived.saturating_sub(sent) / 1000)
}

/// p50 / p99 / max in ms.
fn three(h: &Histogram<u64>) -> String {
    let [p50, p99, _, max] = percentiles(h);
    format!("{p50} / {p99} / {max}")
}
