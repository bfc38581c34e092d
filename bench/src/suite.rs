//! The scenarios run side by side: each one on every setup in turn (raw-TCP ceiling first, so
//! the others read as ratios to it), a fresh set of servers for each, results as tables. The
//! Socket.IO setups (scalechat's Socket.IO path, and socketioxide as its peer) run fan-out and
//! max-rate, with a table of ratios to what each is compared with. The presence group and the
//! Socket.IO relay pick their own setups (see `presence`, `sio_relay`); `rooms` runs on the
//! setups given (by default one Redis and a Redis Cluster, see `rooms`); the archive scenario
//! runs when a setup with the archive is among them (see `archive`), and every setup with the
//! archive ends with its rows counted against the messages accepted; `scale` runs on the
//! setups given (by default four nodes on one Redis, see `scale`). `rooms` and `scale` drive
//! native members only.

use std::time::Duration;

use crate::cluster::{Cluster, Protocol, ServerOpts, Setup};
use crate::fanout::{self, Shape, Step};
use crate::idle::{self, IdleOpts};
use crate::report::{self, Table, count, ms, ratio};
use crate::{archive, churn, machine, presence, rooms, scale, sio_relay};

/// Sizes, rates and durations of a run.
#[derive(Clone, Debug, clap::Args)]
pub struct Plan {
    /// Small sizes and short steps: the whole suite in well under a minute.
    #[arg(long)]
    pub quick: bool,
    /// Members of the fan-out room.
    #[arg(long, default_value_t = 1000)]
    pub members: usize,
    /// Members that publish in the steady and fan-out steps (the total rate is shared
    /// between them).
    #[arg(long, default_value_t = 10)]
    pub publishers: usize,
    /// Members that publish in the second fan-out step and in max-rate: a session waits for
    /// each `send`'s publish before it reads the next, so few publishers can limit the rate.
    #[arg(long, default_value_t = 100)]
    pub many_publishers: usize,
    /// Fan-out: total messages per second (deliveries = this × members).
    #[arg(long, default_value_t = 1500.0)]
    pub rate: f64,
    /// Steady-latency step: total messages per second.
    #[arg(long, default_value_t = 20.0)]
    pub latency_rate: f64,
    /// Members of the small room that carries the same deliveries per second as the steady
    /// step (more messages, each to fewer members): latency without the wide fan-out.
    #[arg(long, default_value_t = 20)]
    pub small_members: usize,
    /// Seconds of publishing in the fan-out and steady-latency steps.
    #[arg(long, default_value_t = 10.0)]
    pub secs: f64,
    /// Seconds a step waits at most for the last deliveries (it stops earlier once nothing
    /// has arrived for 2 s, or 5 s in the scenarios with worker processes); what has not
    /// arrived by then counts as lost (those scenarios then report what arrives later as
    /// late).
    #[arg(long, default_value_t = 60.0)]
    pub drain_secs: f64,
    /// max-rate: the first step's total messages per second.
    #[arg(long, default_value_t = 250.0)]
    pub start_rate: f64,
    /// max-rate: each step's rate is the previous one's times this.
    #[arg(long, default_value_t = 1.25)]
    pub factor: f64,
    /// max-rate: seconds of publishing per step.
    #[arg(long, default_value_t = 4.0)]
    pub step_secs: f64,
    /// max-rate: a step fails when its p99 latency exceeds this (ms).
    #[arg(long, default_value_t = 100.0)]
    pub p99_limit_ms: f64,
    /// max-rate: steps at most.
    #[arg(long, default_value_t = 16)]
    pub max_steps: usize,
    /// churn: seconds.
    #[arg(long, default_value_t = 5.0)]
    pub churn_secs: f64,
    /// churn: connections opened in parallel.
    #[arg(long, default_value_t = 128)]
    pub churn_workers: usize,
    /// idle: connection counts, one run each.
    #[arg(long, value_delimiter = ',', default_value = "10000,19000")]
    pub conns: Vec<usize>,
    /// idle, presence and rooms: connections per worker process at most (each needs a file
    /// per connection).
    #[arg(long, default_value_t = 9000)]
    pub per_process: usize,
    /// idle: seconds between the last connection and the memory reading.
    #[arg(long, default_value_t = 3.0)]
    pub settle_secs: f64,
    /// idle: seconds over which idle CPU is measured (more than the servers' 20 s ping
    /// interval, so it includes a round of pings).
    #[arg(long, default_value_t = 25.0)]
    pub idle_secs: f64,
    /// Local source addresses (127.0.0.2 onwards) the connections are spread over.
    #[arg(long, default_value_t = 16)]
    pub sources: usize,
    /// presence churn: pairs of runs with `redis.presence` on, then off.
    #[arg(long, default_value_t = 2)]
    pub presence_rounds: usize,
    /// join storm: members in the room (each asked for presence events) before it starts;
    /// 0 skips the join storm.
    #[arg(long, default_value_t = 10_000)]
    pub storm_members: usize,
    /// join storm: members (of those) whose presence frames are counted, in this process.
    #[arg(long, default_value_t = 200)]
    pub storm_sample: usize,
    /// join storm: new users joining per second.
    #[arg(long, default_value_t = 500.0)]
    pub storm_rate: f64,
    /// join storm: seconds of joining.
    #[arg(long, default_value_t = 10.0)]
    pub storm_secs: f64,
    /// presence pages: members of the room; 0 skips the pages.
    #[arg(long, default_value_t = 19_000)]
    pub page_members: usize,
    /// presence pages: requests for the first page, timed one by one.
    #[arg(long, default_value_t = 100)]
    pub page_requests: usize,
    /// presence pages: `limit` of each request (1 to 200).
    #[arg(long, default_value_t = 100)]
    pub page_limit: usize,
    /// rooms: how many rooms.
    #[arg(long, default_value_t = 2000)]
    pub rooms: usize,
    /// rooms: members of each room, each a connection of its own, spread over the nodes.
    #[arg(long, default_value_t = 20)]
    pub room_members: usize,
    /// rooms: members of each room that also publish (the total rate is shared between all
    /// of them).
    #[arg(long, default_value_t = 1)]
    pub room_publishers: usize,
    /// rooms: the first step's total messages per second over all rooms (deliveries = this
    /// × members); each step is the last times --factor, for --step-secs, up to --max-steps,
    /// until p99 passes --p99-limit-ms or a message is lost.
    #[arg(long, default_value_t = 2000.0)]
    pub rooms_start_rate: f64,
    /// sio-relay: Socket.IO sessions connected each way (direct and relayed).
    #[arg(long, default_value_t = 200)]
    pub sio_connects: usize,
    /// sio-relay: messages each of the four clients sends and waits for.
    #[arg(long, default_value_t = 1000)]
    pub sio_messages: usize,
    /// archive: rooms, each with one publisher.
    #[arg(long, default_value_t = 500)]
    pub archive_rooms: usize,
    /// archive: members of each room (the publisher included).
    #[arg(long, default_value_t = 2)]
    pub archive_members: usize,
    /// archive: total messages per second of each step, in order; the ramp stops at the first
    /// step that fails.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "10000,25000,50000,75000,100000"
    )]
    pub archive_rates: Vec<f64>,
    /// archive: seconds of publishing per step.
    #[arg(long, default_value_t = 10.0)]
    pub archive_secs: f64,
    /// archive: a step fails when more than this many seconds of messages wait to be archived
    /// when publishing stops.
    #[arg(long, default_value_t = 2.0)]
    pub archive_lag_secs: f64,
    /// scale: members on each node, all in one room (each node holds a file per member: keep
    /// it under the open-file limit).
    #[arg(long, default_value_t = 19_000)]
    pub scale_members: usize,
    /// scale: members that publish (the first ones, spread over the nodes; the total rate is
    /// shared between them).
    #[arg(long, default_value_t = 8)]
    pub scale_publishers: usize,
    /// scale: steady steps, total messages per second into the room (deliveries = this ×
    /// members), one step of --secs each.
    #[arg(long, value_delimiter = ',', default_value = "5,20")]
    pub scale_rates: Vec<f64>,
    /// scale: the ramp's first rate, messages per second (default: the last steady rate ×
    /// --factor); then as max-rate: × --factor each --step-secs, up to --max-steps, until p99
    /// passes --p99-limit-ms or a message is lost.
    #[arg(long)]
    pub scale_start_rate: Option<f64>,
    /// scale: one member in this many on each node records latency; every member counts
    /// losses and duplicates of every message.
    #[arg(long, default_value_t = 8)]
    pub scale_latency_every: usize,
}

impl Plan {
    /// The `--quick` sizes, keeping the setups.
    pub fn quick(self) -> Plan {
        Plan {
            quick: true,
            members: 100,
            publishers: 4,
            many_publishers: 10,
            rate: 200.0,
            latency_rate: 20.0,
            small_members: 10,
            secs: 1.0,
            drain_secs: 5.0,
            start_rate: 200.0,
            factor: 2.0,
            step_secs: 1.0,
            max_steps: 1,
            churn_secs: 1.0,
            churn_workers: 16,
            conns: vec![400],
            per_process: 250,
            settle_secs: 0.5,
            idle_secs: 1.0,
            sources: 4,
            p99_limit_ms: self.p99_limit_ms,
            presence_rounds: 1,
            storm_members: 300,
            storm_sample: 50,
            storm_rate: 50.0,
            storm_secs: 2.0,
            page_members: 1000,
            page_requests: 100,
            page_limit: self.page_limit,
            rooms: 100,
            room_members: 4,
            room_publishers: 1,
            rooms_start_rate: 200.0,
            sio_connects: 10,
            sio_messages: 50,
            archive_rooms: 20,
            archive_members: 2,
            archive_rates: vec![500.0, 1000.0],
            archive_secs: 1.0,
            archive_lag_secs: self.archive_lag_secs,
            scale_members: 250,
            scale_publishers: 4,
            scale_rates: vec![5.0, 20.0],
            scale_start_rate: None,
            scale_latency_every: 2,
        }
    }
}

/// Which scenarios to run.
#[derive(Clone, Copy, Debug, Default)]
pub struct Scenarios {
    pub idle: bool,
    pub fanout: bool,
    pub max_rate: bool,
    pub churn: bool,
    pub presence: bool,
    pub rooms: bool,
    pub sio_relay: bool,
    pub archive: bool,
    pub scale: bool,
}

impl Scenarios {
    /// Whether the archive scenario is the only one asked for (`scalechat-bench archive`).
    pub fn archive_only(&self) -> bool {
        let others = [
            self.idle,
            self.fanout,
            self.max_rate,
            self.churn,
            self.presence,
            self.rooms,
            self.sio_relay,
            self.scale,
        ];
        self.archive && !others.contains(&true)
    }
}

/// Runs the scenarios; the Markdown report and whether nothing was lost or duplicated.
pub async fn run(
    plan: &Plan,
    opts: &ServerOpts,
    setups: &[Setup],
    which: Scenarios,
) -> anyhow::Result<(String, bool)> {
    if (which.rooms || which.scale)
        && let Some(setup) = setups.iter().find(|s| s.protocol() == Protocol::SocketIo)
    {
        anyhow::bail!("rooms and scale drive native members only: {setup} is a Socket.IO setup");
    }
    let mut out = machine::describe();
    let mut clean = true;
    let mut checks = archive::tally_table();
    if which.fanout || which.max_rate {
        let (text, ok) = fanout_group(plan, opts, setups, which, &mut checks).await?;
        out.push_str(&text);
        clean &= ok;
    }
    if which.churn {
        out.push_str(&churn_group(plan, opts, setups).await?);
    }
    if which.idle {
        out.push_str(&idle_group(plan, opts, setups).await?);
    }
    if which.presence {
        out.push_str(&presence::run(plan, opts).await?);
    }
    if which.rooms {
        let (text, ok) = rooms::run(plan, opts, setups).await?;
        out.push_str(&text);
        clean &= ok;
    }
    if which.scale {
        let (text, ok) = scale::run(plan, opts, setups).await?;
        out.push_str(&text);
        clean &= ok;
    }
    if which.sio_relay {
        out.push_str(&sio_relay::run(plan, opts).await?);
    }
    if which.archive {
        if setups.iter().any(|s| s.archives()) {
            let (text, ok) = archive::run(plan, opts, setups, &mut checks).await?;
            out.push_str(&text);
            clean &= ok;
        } else if which.archive_only() {
            out.push_str(
                "Archive: skipped (no setup with the archive: add memory-pg or redis2-pg to \
                 --setups).\n\n",
            );
        }
    }
    if !checks.is_empty() {
        out.push_str(&checks.markdown());
        out.push('\n');
    }
    Ok((out, clean))
}

async fn fanout_group(
    plan: &Plan,
    opts: &ServerOpts,
    setups: &[Setup],
    which: Scenarios,
    checks: &mut Table,
) -> anyhow::Result<(String, bool)> {
    let shape = Shape {
        members: plan.members,
        publishers: plan
            .publishers
            .max(plan.many_publishers)
            .clamp(1, plan.members),
        room: "bench".into(),
        sources: plan.sources,
    };
    let deliveries = |rate: f64| count(rate * shape.members as f64);
    let mut steady = Table::new(
        &format!(
            "Steady load: {} msg/s into {} members = {} deliveries/s, {} s",
            plan.latency_rate,
            shape.members,
            deliveries(plan.latency_rate),
            plan.secs
        ),
        report::STEP_HEADER,
    );
    let small = Shape {
        members: plan.small_members.max(1),
        publishers: plan.publishers.clamp(1, plan.small_members.max(1)),
        room: "small".into(),
        sources: plan.sources,
    };
    let small_rate = plan.latency_rate * shape.members as f64 / small.members as f64;
    let mut steady_small = Table::new(
        &format!(
            "Steady load, small room: {} msg/s into {} members = {} deliveries/s, {} s",
            small_rate,
            small.members,
            count(small_rate * small.members as f64),
            plan.secs
        ),
        report::STEP_HEADER,
    );
    let fan_table = |publishers: usize| {
        Table::new(
            &format!(
                "Fan-out: {} msg/s from {} publishers into {} members = {} deliveries/s offered, {} s",
                plan.rate,
                publishers,
                shape.members,
                deliveries(plan.rate),
                plan.secs
            ),
            report::STEP_HEADER,
        )
    };
    let few = plan.publishers.clamp(1, shape.publishers);
    let many = plan.many_publishers.clamp(1, shape.publishers);
    let mut fan = fan_table(few);
    let mut fan_many = fan_table(many);
    let mut best = Table::new(
        &format!(
            "max-rate: best sustained step (no loss, no duplicates, p99 < {} ms), {} publishers, {} s steps ×{}",
            plan.p99_limit_ms, many, plan.step_secs, plan.factor
        ),
        &[
            "setup",
            "best deliveries/s",
            "× raw",
            "offered msg/s",
            "p99 ms at best",
            "server CPU % at best",
            "next step failed because",
        ],
    );
    let mut steps = Table::new("max-rate: every step", report::STEP_HEADER);
    let (mut raw_fan, mut raw_fan_many, mut raw_best) = (None, None, None);
    let mut clean = true;
    let mut summaries = Vec::new();
    for &setup in setups {
        eprintln!("fan-out on {setup}");
        let mut summary = Summary::default();
        let cluster = Cluster::start(setup, opts).await?;
        let load = fanout::connect(&cluster, &shape).await?;
        load.step(&cluster, (plan.latency_rate, few), 0.5, 2.0)
            .await; // warm-up, not reported
        if which.fanout {
            let s = load
                .step(
                    &cluster,
                    (plan.latency_rate, few),
                    plan.secs,
                    plan.drain_secs,
                )
                .await;
            clean &= s.lost() == 0 && s.duplicates == 0;
            steady.push(report::step_row(setup, &s, None, ""));
            let small_load = fanout::connect(&cluster, &small).await?;
            let small_step = (small_rate, small.publishers);
            small_load.step(&cluster, small_step, 0.5, 2.0).await; // warm-up
            let s = small_load
                .step(&cluster, small_step, plan.secs, plan.drain_secs)
                .await;
            clean &= s.lost() == 0 && s.duplicates == 0;
            summary.small = Some(Figures::of(&s, 0.5));
            steady_small.push(report::step_row(setup, &s, None, ""));
            drop(small_load);
            for (publishers, table, raw, figures) in [
                (few, &mut fan, &mut raw_fan, &mut summary.fan),
                (
                    many,
                    &mut fan_many,
                    &mut raw_fan_many,
                    &mut summary.fan_many,
                ),
            ] {
                let s = load
                    .step(
                        &cluster,
                        (plan.rate, publishers),
                        plan.secs,
                        plan.drain_secs,
                    )
                    .await;
                clean &= s.lost() == 0 && s.duplicates == 0;
                *figures = Some(Figures::of(&s, 0.99));
                if setup == Setup::Raw {
                    *raw = Some(s.deliveries_per_sec);
                }
                let trouble = cluster.trouble().await;
                table.push(report::step_row(setup, &s, *raw, &trouble));
                if s.lost() > 0 {
                    load.settle(plan.drain_secs).await;
                }
            }
        }
        if which.max_rate {
            let mut rate = plan.start_rate;
            let mut top: Option<Step> = None;
            let mut why = format!("reached {} steps", plan.max_steps);
            for _ in 0..plan.max_steps {
                let s = load
                    .step(&cluster, (rate, many), plan.step_secs, plan.drain_secs)
                    .await;
                clean &= s.duplicates == 0;
                let failure = failure(&s, plan.p99_limit_ms);
                steps.push(report::step_row(setup, &s, None, &failure));
                if !failure.is_empty() {
                    why = format!("{} msg/s: {failure}", count(rate));
                    break;
                }
                top = Some(s);
                rate *= plan.factor;
            }
            let best_rate = top.as_ref().map_or(0.0, |s| s.deliveries_per_sec);
            summary.best = Some(best_rate);
            if setup == Setup::Raw {
                raw_best = Some(best_rate);
            }
            best.push(match &top {
                Some(s) => vec![
                    setup.to_string(),
                    count(best_rate),
                    ratio(best_rate, raw_best),
                    count(s.rate),
                    ms(s.latency.value_at_quantile(0.99)),
                    format!("{:.0}", s.server_cpu),
                    why,
                ],
                None => vec![
                    setup.to_string(),
                    "0".into(),
                    "-".into(),
                    "-".into(),
                    "-".into(),
                    "-".into(),
                    why,
                ],
            });
            let trouble = cluster.trouble().await;
            if !trouble.is_empty() {
                eprintln!("  {setup} after max-rate: {trouble}");
            }
        }
        if let Some(t) = archive::tally(&cluster, plan.drain_secs).await? {
            clean &= t.matches();
            checks.push(archive::tally_row("fan-out, max-rate", setup, &t));
        }
        drop(load);
        drop(cluster);
        summaries.push((setup, summary));
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let mut text = String::new();
    for (table, on) in [
        (&steady, which.fanout),
        (&steady_small, which.fanout),
        (&fan, which.fanout),
        (&fan_many, which.fanout),
        (&best, which.max_rate),
        (&steps, which.max_rate),
    ] {
        if on {
            text.push_str(&table.markdown());
            text.push('\n');
        }
    }
    if let Some(table) = comparison(&summaries, few, many) {
        text.push_str(&table.markdown());
        text.push_str(COMPARISON_NOTE);
    }
    Ok((text, clean))
}

/// A step's figures that the comparison table sets side by side.
#[derive(Clone, Copy)]
struct Figures {
    deliveries_per_sec: f64,
    /// Latency at the quantile asked for, µs.
    latency_us: u64,
    server_cpu: f64,
}

impl Figures {
    fn of(s: &Step, quantile: f64) -> Figures {
        Figures {
            deliveries_per_sec: s.deliveries_per_sec,
            latency_us: s.latency.value_at_quantile(quantile),
            server_cpu: s.server_cpu,
        }
    }
}

/// One setup's run, for the comparison table.
#[derive(Default)]
struct Summary {
    /// The steady small-room step, latency p50.
    small: Option<Figures>,
    /// The fan-out steps from few and from many publishers, latency p99.
    fan: Option<Figures>,
    fan_many: Option<Figures>,
    /// max-rate's best deliveries/s.
    best: Option<f64>,
}

const COMPARISON_NOTE: &str = "\nEach figure is the setup's divided by the one it is compared \
with, in the same run: under 1 for deliveries/s, over 1 for latency and server CPU, is worse. \
Server CPU compares the work per delivery only where both delivered the rate offered \
(deliveries/s × 1.00).\n\n";

/// Each Socket.IO setup against the one it is compared with (see [`Setup::compared_with`]),
/// where both ran; `None` when none did.
fn comparison(summaries: &[(Setup, Summary)], few: usize, many: usize) -> Option<Table> {
    let find = |setup: Setup| summaries.iter().find(|(s, _)| *s == setup).map(|(_, r)| r);
    let pairs: Vec<(Setup, Setup, &Summary, &Summary)> = summaries
        .iter()
        .filter_map(|(setup, summary)| {
            let other = setup.compared_with()?;
            Some((*setup, other, summary, find(other)?))
        })
        .collect();
    if pairs.is_empty() {
        return None;
    }
    let fan = |n: usize| format!("fan-out, {n} publishers");
    let mut table = Table::new(
        "Socket.IO against native, and socketioxide against scalechat's Socket.IO: ratios",
        &[
            "setup",
            "compared with",
            "small room p50 ×",
            &format!("{}: deliveries/s ×", fan(few)),
            &format!("{}: p99 ×", fan(few)),
            &format!("{}: server CPU ×", fan(few)),
            &format!("{}: deliveries/s ×", fan(many)),
            &format!("{}: p99 ×", fan(many)),
            &format!("{}: server CPU ×", fan(many)),
            "max-rate best ×",
        ],
    );
    for (setup, other, a, b) in pairs {
        let mut row = vec![setup.to_string(), other.to_string()];
        row.push(latency_ratio(a.small, b.small));
        for (x, y) in [(a.fan, b.fan), (a.fan_many, b.fan_many)] {
            match (x, y) {
                (Some(x), Some(y)) => {
                    row.push(ratio(x.deliveries_per_sec, Some(y.deliveries_per_sec)));
                    row.push(latency_ratio(Some(x), Some(y)));
                    row.push(ratio(x.server_cpu, Some(y.server_cpu)));
                }
                _ => row.extend(["-".into(), "-".into(), "-".into()]),
            }
        }
        row.push(match (a.best, b.best) {
            (Some(x), y) => ratio(x, y),
            _ => "-".into(),
        });
        table.push(row);
    }
    Some(table)
}

fn latency_ratio(x: Option<Figures>, y: Option<Figures>) -> String {
    match (x, y) {
        (Some(x), Some(y)) => ratio(x.latency_us as f64, Some(y.latency_us as f64)),
        _ => "-".into(),
    }
}

/// The setups churn and idle run on (they drive native members only), and a note naming the
/// Socket.IO setups left out, if any.
fn native_only(setups: &[Setup]) -> (Vec<Setup>, String) {
    let (native, sio): (Vec<Setup>, Vec<Setup>) = setups
        .iter()
        .partition(|s| s.protocol() == Protocol::Native);
    if sio.is_empty() {
        return (native, String::new());
    }
    let names: Vec<String> = sio.iter().map(Setup::to_string).collect();
    let note = format!(
        "Not run on {}: Socket.IO setups run fan-out and max-rate only.\n\n",
        names.join(", ")
    );
    (native, note)
}

/// Why a max-rate step does not count as sustained; empty when it does.
pub fn failure(s: &Step, p99_limit_ms: f64) -> String {
    let mut why = Vec::new();
    if s.lost() > 0 {
        why.push(format!("{} lost", s.lost()));
    }
    if s.duplicates > 0 {
        why.push(format!("{} duplicated", s.duplicates));
    }
    let p99 = s.latency.value_at_quantile(0.99) as f64 / 1000.0;
    if p99 > p99_limit_ms {
        why.push(format!("p99 {p99:.1} ms"));
    }
    if s.disconnected > 0 {
        why.push(format!("{} disconnected", s.disconnected));
    }
    why.extend(s.errors.iter().map(|(c, n)| format!("error {c} ×{n}")));
    why.join(", ")
}

async fn churn_group(plan: &Plan, opts: &ServerOpts, setups: &[Setup]) -> anyhow::Result<String> {
    let mut table = Table::new(
        &format!(
            "Churn: {} parallel connect → joined → close loops, {} s",
            plan.churn_workers, plan.churn_secs
        ),
        report::CHURN_HEADER,
    );
    let mut raw = None;
    let (setups, note) = native_only(setups);
    for setup in setups {
        eprintln!("churn on {setup}");
        let cluster = Cluster::start(setup, opts).await?;
        let c = churn::run(
            &cluster,
            plan.churn_workers,
            plan.churn_secs,
            plan.sources * 4,
        )
        .await;
        if setup == Setup::Raw {
            raw = Some(c.per_sec);
        }
        table.push(report::churn_row(setup, &c, raw));
        drop(cluster);
        // Let the connections' TIME_WAIT and the servers' exits settle before the next one.
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    Ok(table.markdown() + "\n" + &note)
}

async fn idle_group(plan: &Plan, opts: &ServerOpts, setups: &[Setup]) -> anyhow::Result<String> {
    let mut table = Table::new(
        &format!(
            "Idle: connections held {} s after connecting; memory after {} s",
            plan.idle_secs, plan.settle_secs
        ),
        report::IDLE_HEADER,
    );
    let (setups, note) = native_only(setups);
    for &conns in &plan.conns {
        let mut raw = None;
        for &setup in &setups {
            eprintln!("idle {conns} on {setup}");
            let cluster = Cluster::start(setup, opts).await?;
            let idle_opts = IdleOpts {
                conns,
                per_process: plan.per_process,
                sources: plan.sources,
                settle_secs: plan.settle_secs,
                idle_secs: plan.idle_secs,
            };
            let r = idle::run(&cluster, &idle_opts).await?;
            if setup == Setup::Raw {
                raw = Some(r.bytes_per_conn());
            }
            table.push(report::idle_row(setup, &r, raw));
            drop(cluster);
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }
    Ok(table.markdown() + "\n" + &note)
}
