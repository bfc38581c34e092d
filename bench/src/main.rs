//! scalechat-bench: a load generator for scalechat's native protocol and Socket.IO. It starts
//! the servers itself (scalechat nodes on the embedded transport or on a Redis or Redis Cluster
//! of its own, with or without a PostgreSQL archive of its own, a raw-TCP relay as the ceiling,
//! and socketioxide nodes as a Socket.IO peer) or drives running nodes given with `--url`, and
//! reports idle memory and CPU, fan-out throughput and latency (native and Socket.IO members
//! side by side), the highest sustained rate, connection churn, the cost of presence (who is
//! in a room), many rooms on one Redis against a Redis Cluster, one room of tens of thousands
//! of members over several nodes, what relaying a Socket.IO session's requests between nodes
//! costs, and the PostgreSQL archive's sustained write rate.
//! See BENCHMARKS.md.

mod archive;
mod churn;
mod cluster;
mod fanout;
mod idle;
mod machine;
mod members;
mod postgres;
mod presence;
mod relay;
mod report;
mod rooms;
mod scale;
mod sio;
mod sio_relay;
mod soak;
mod storm;
mod suite;
mod track;
mod ws;

use std::path::PathBuf;

use clap::{Parser, Subcommand};

use crate::cluster::{ServerOpts, Setup};
use crate::suite::{Plan, Scenarios};

#[derive(Parser)]
#[command(version, about = "Load generator for scalechat (see BENCHMARKS.md)")]
struct Cli {
    #[command(subcommand)]
    command: Command,
    #[command(flatten)]
    servers: ServerOpts,
    /// Setups to run, in order (the raw-TCP ceiling first, so the others read as ratios).
    /// Default: raw,memory,redis1,redis2 (with --quick also memory-sio); for `rooms`,
    /// redis4,cluster4; for `scale`, redis4; for `archive`, memory,memory-pg,redis2,redis2-pg.
    /// The Socket.IO setups (memory-sio, redis1-sio, redis2-sio: scalechat with Socket.IO
    /// members; sioxide1, sioxide2: the socketioxide peer) run fan-out and max-rate only.
    #[arg(long, global = true, value_delimiter = ',')]
    setups: Option<Vec<Setup>>,
    /// Also write the report to this file.
    #[arg(long, global = true)]
    out: Option<PathBuf>,
}

#[derive(Subcommand)]
enum Command {
    /// Every scenario on every setup (`rooms` and `soak` run on their own).
    Suite(Plan),
    /// Open N connections, hold them, report server memory per connection and idle CPU.
    Idle(Plan),
    /// N members, P publishers at a set rate: deliveries/s, loss, duplicates, latency, CPU.
    Fanout(Plan),
    /// Raise the rate step by step until p99 passes the limit or messages are lost.
    MaxRate(Plan),
    /// Open and close connections as fast as possible: upgrades/s and handshake latency.
    Churn(Plan),
    /// Many rooms, publishers at rising rates, on setups with and without the PostgreSQL
    /// archive (`memory-pg`, `redis2-pg`): rows archived per second, the archive's backlog and
    /// refusals, delivery latency; then the rows counted against the messages accepted.
    Archive(Plan),
    /// Presence on two nodes on Redis: churn with `redis.presence` on and off, a join storm
    /// into a big room whose members asked for presence events, and the cost of `presence`
    /// pages.
    Presence(Plan),
    /// Many rooms (2,000 × 20 members by default) over four nodes, on one Redis and on a
    /// three-shard Redis Cluster: a ramp of rates until p99 passes the limit or messages are
    /// lost; deliveries/s, latency, CPU of the nodes and of each Redis.
    Rooms(Plan),
    /// Socket.IO on two nodes on Redis, sessions on node 0: connect, upgrade and message round
    /// trip with requests sent to node 0 (direct) or to node 1, which relays them.
    SioRelay(Plan),
    /// One room of `--scale-members` members on each node (19,000 × 4 nodes = 76,000 by
    /// default): connect time, steady steps and a ramp; deliveries/s, loss, latency, and the
    /// memory and CPU of each node, of Redis, of the generator and of the rest of the machine.
    Scale(Plan),
    /// Steady traffic on two nodes while Redis and then one node restart: lost messages,
    /// duplicates, reconnects, memory before and after.
    Soak(soak::SoakOpts),
    /// The raw-TCP relay (started by the tool for the `raw` setup).
    #[command(hide = true)]
    Relay {
        #[arg(long)]
        port: u16,
    },
    /// Holds connections for `idle` and `presence` (started by the tool, one per worker
    /// process).
    #[command(hide = true)]
    Hold(idle::HoldArgs),
    /// Holds member connections for `rooms`, `archive` and `scale` and runs their steps on
    /// command (started by the tool, one per worker process).
    #[command(hide = true)]
    RoomWorker(members::WorkerArgs),
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    machine::raise_file_limit();
    if let Command::Relay { port } = cli.command {
        return relay::run(port);
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    if let Command::Soak(opts) = &cli.command {
        let (text, clean) = runtime.block_on(soak::run(opts, &cli.servers))?;
        println!("{text}");
        if let Some(path) = &cli.out {
            std::fs::write(path, &text)?;
        }
        runtime.shutdown_timeout(std::time::Duration::from_secs(1));
        if !clean {
            eprintln!("scalechat-bench: messages were lost or duplicated");
            std::process::exit(3);
        }
        return Ok(());
    }
    let (plan, which) = match cli.command {
        Command::Relay { .. } | Command::Soak(_) => unreachable!("handled above"),
        Command::Hold(args) => return runtime.block_on(idle::hold(args)),
        Command::RoomWorker(args) => return runtime.block_on(members::worker(args)),
        Command::Suite(plan) => (plan, Scenarios::all()),
        Command::Idle(plan) => (plan, Scenarios::only(|s| s.idle = true)),
        Command::Fanout(plan) => (plan, Scenarios::only(|s| s.fanout = true)),
        Command::MaxRate(plan) => (plan, Scenarios::only(|s| s.max_rate = true)),
        Command::Churn(plan) => (plan, Scenarios::only(|s| s.churn = true)),
        Command::Presence(plan) => (plan, Scenarios::only(|s| s.presence = true)),
        Command::Rooms(plan) => (plan, Scenarios::only(|s| s.rooms = true)),
        Command::SioRelay(plan) => (plan, Scenarios::only(|s| s.sio_relay = true)),
        Command::Archive(plan) => (plan, Scenarios::only(|s| s.archive = true)),
        Command::Scale(plan) => (plan, Scenarios::only(|s| s.scale = true)),
    };
    let plan = if plan.quick { plan.quick() } else { plan };
    let setups = if !cli.servers.urls.is_empty() {
        vec![Setup::External]
    } else if let Some(setups) = cli.setups.clone() {
        setups
    } else if which.rooms {
        vec![Setup::Redis4, Setup::Cluster4]
    } else if which.archive_only() {
        vec![
            Setup::Memory,
            Setup::MemoryPg,
            Setup::Redis2,
            Setup::Redis2Pg,
        ]
    } else if which.scale {
        vec![Setup::Redis4]
    } else if plan.quick {
        // The Socket.IO fan-out costs the quick run a few seconds and smoke-tests its path.
        vec![
            Setup::Raw,
            Setup::Memory,
            Setup::MemorySio,
            Setup::Redis1,
            Setup::Redis2,
        ]
    } else {
        vec![Setup::Raw, Setup::Memory, Setup::Redis1, Setup::Redis2]
    };
    let (text, clean) = runtime.block_on(suite::run(&plan, &cli.servers, &setups, which))?;
    println!("{text}");
    if let Some(path) = &cli.out {
        std::fs::write(path, &text)?;
    }
    runtime.shutdown_timeout(std::time::Duration::from_secs(1));
    if !clean {
        eprintln!("scalechat-bench: messages were lost or duplicated");
        std::process::exit(3);
    }
    Ok(())
}

impl Scenarios {
    fn all() -> Scenarios {
        Scenarios {
            idle: true,
            fanout: true,
            max_rate: true,
            churn: true,
            presence: true,
            rooms: false,
            sio_relay: true,
            archive: true,
            scale: false,
        }
    }

    fn only(set: impl FnOnce(&mut Scenarios)) -> Scenarios {
        let mut s = Scenarios::default();
        set(&mut s);
        s
    }
}
