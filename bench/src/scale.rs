//! One big room over several nodes: `--scale-members` members on each node (by default
//! 19,000 on each of four nodes sharing one Redis: 76,000 members in one room). Measures the
//! time to connect them all, then steady steps at set rates and a ramp as in max-rate until
//! p99 passes the limit or a message is lost. Every step reports deliveries per second, loss,
//! duplicates and latency, and what each part of the machine used: each node's CPU and
//! resident memory (and that per connection), Redis's CPU, the generator's (all its
//! processes) and the rest of the machine's, so that a reader can tell when the machine rather
//! than scalechat is the limit. The members live in worker processes (see `members`), a few
//! thousand each, so the room is split over several of them; every member checks every
//! message for loss and duplicates, and one member in `--scale-latency-every` on each node
//! records latency.

use std::time::Duration;

use crate::cluster::{Cluster, Cpu, ServerOpts, Setup, rss_kib};
use crate::members::{IN_FLIGHT, Layout, Measured, Opened, Workers};
use crate::report::{Table, count, ms, percentiles};
use crate::suite::{Plan, failure};

/// How long after the last step the workers look for its late deliveries.
const SETTLE_LATE_SECS: f64 = 10.0;

/// Files a node or a worker process needs besides its connections (listener, Redis, logs,
/// epoll and the like).
const FILE_MARGIN: usize = 64;

/// The tables being filled, and notes under them.
struct Report {
    connect: Table,
    steps: Table,
    best: Table,
    notes: Vec<String>,
}

/// Runs the scenario on each setup; the Markdown tables and whether nothing was lost or
/// duplicated in the steady steps (and nothing duplicated in the ramp).
pub async fn run(
    plan: &Plan,
    opts: &ServerOpts,
    setups: &[Setup],
) -> anyhow::Result<(String, bool)> {
    let title = format!(
        "Scale: one room, {} members on each node, {} publishers",
        count(plan.scale_members as f64),
        plan.scale_publishers,
    );
    let rates: Vec<String> = plan.scale_rates.iter().map(|r| r.to_string()).collect();
    let plan_note = format!(
        "Steady steps of {} s at {} msg/s, then a ramp of {} s steps ×{} until a step loses or \
         duplicates a message, disconnects a member, gets an error or has p99 above {} ms (at \
         most {} steps)",
        plan.secs,
        rates.join(", "),
        plan.step_secs,
        plan.factor,
        plan.p99_limit_ms,
        plan.max_steps
    );
    let mut report = Report {
        connect: Table::new(&format!("{title}: connecting"), CONNECT_HEADER),
        steps: Table::new(&format!("{title}: every step"), STEP_HEADER),
        best: Table::new(&format!("{title}: best ramp step"), BEST_HEADER),
        notes: vec![plan_note],
    };
    let mut clean = true;
    for &setup in setups {
        eprintln!("scale on {setup}");
        clean &= run_setup(plan, opts, setup, &mut report).await?;
        // Let the connections' TIME_WAIT and the servers' exits settle before the next one.
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let mut text = String::new();
    for table in [&report.connect, &report.steps, &report.best] {
        text.push_str(&table.markdown());
        text.push('\n');
    }
    for note in report.notes {
        text.push_str(&format!("{note}.\n"));
    }
    text.push('\n');
    Ok((text, clean))
}

/// One setup: connect, steady steps, ramp; whether it was clean.
async fn run_setup(
    plan: &Plan,
    opts: &ServerOpts,
    setup: Setup,
    report: &mut Report,
) -> anyhow::Result<bool> {
    let cluster = Cluster::start(setup, opts).await?;
    let nodes = cluster.nodes.len();
    let members = plan.scale_members.max(1) * nodes;
    let layout = Layout {
        rooms: 1,
        members,
        publishers: plan.scale_publishers.clamp(1, members),
        per_process: plan.per_process,
        sources: plan.sources,
        latency_every: plan.scale_latency_every.max(1),
    };
    report.notes.extend(check_limits(
        &layout,
        nodes,
        !cluster.node_pids().is_empty(),
    )?);
    let memory = Memory {
        before_kib: node_rss(&cluster),
        members: layout.per_node(nodes),
    };
    let (mut workers, opened) = Workers::spawn(&cluster, layout).await?;
    tokio::time::sleep(Duration::from_secs_f64(plan.settle_secs)).await;
    report.connect.push(connect_row(
        setup,
        &layout,
        &opened,
        &memory,
        &node_rss(&cluster),
    ));
    let sampled = (0..nodes)
        .map(|n| memory.members[n].div_ceil(layout.latency_every))
        .sum::<usize>();
    report.notes.push(format!(
        "{setup}: latency from one member in {} on each node (about {} members); every member \
         checks every message for loss and duplicates",
        layout.latency_every,
        count(sampled as f64)
    ));
    let run = Run {
        plan,
        setup,
        cluster: &cluster,
        memory: &memory,
    };
    let clean = run.steps(&mut workers, report).await?;
    workers.release().await;
    Ok(clean)
}

/// What the steps of one setup run against.
struct Run<'a> {
    plan: &'a Plan,
    setup: Setup,
    cluster: &'a Cluster,
    memory: &'a Memory,
}

impl Run<'_> {
    /// A warm-up (not reported), the steady steps, then the ramp; whether nothing was lost or
    /// duplicated in the steady steps and nothing duplicated in the ramp.
    async fn steps(&self, workers: &mut Workers, report: &mut Report) -> anyhow::Result<bool> {
        let plan = self.plan;
        // Long enough for every publisher to send a message.
        let first = plan.scale_rates.first().copied().unwrap_or(1.0).max(0.1);
        let warm_secs = (plan.scale_publishers.max(1) as f64 / first).clamp(0.5, 5.0);
        let warm = workers.step(self.cluster, first, warm_secs, 2.0).await?;
        self.account(report, "warm-up", &warm);
        let mut clean = warm.step.duplicates == 0;
        for &rate in &plan.scale_rates {
            let s = workers
                .step(self.cluster, rate, plan.secs, plan.drain_secs)
                .await?;
            self.account(report, "steady", &s);
            clean &= s.step.lost() == 0 && s.step.duplicates == 0;
            let failed = failure(&s.step, plan.p99_limit_ms);
            report
                .steps
                .push(step_row(self.setup, "steady", &s, self.memory, &failed));
        }
        let next = plan.scale_rates.last().map_or(first, |r| r * plan.factor);
        let mut rate = plan.scale_start_rate.unwrap_or(next);
        let mut top: Option<Measured> = None;
        let mut why = format!("reached {} steps", plan.max_steps);
        for _ in 0..plan.max_steps {
            let s = workers
                .step(self.cluster, rate, plan.step_secs, plan.drain_secs)
                .await?;
            self.account(report, "ramp", &s);
            clean &= s.step.duplicates == 0;
            let failed = failure(&s.step, plan.p99_limit_ms);
            report
                .steps
                .push(step_row(self.setup, "ramp", &s, self.memory, &failed));
            if !failed.is_empty() {
                why = format!("{} msg/s: {failed}", count(rate));
                break;
            }
            top = Some(s);
            rate *= plan.factor;
        }
        // What the last steps counted lost and arrives later is late, not lost.
        let late = workers.late(self.cluster, SETTLE_LATE_SECS).await?;
        if late > 0 {
            report.notes.push(format!(
                "{}: {late} deliveries of the last steps arrived within {SETTLE_LATE_SECS} s after \
                 them: late, not lost",
                self.setup
            ));
        }
        let trouble = self.cluster.trouble().await;
        report
            .best
            .push(best_row(self.setup, top.as_ref(), why, trouble));
        Ok(clean)
    }
}

impl Run<'_> {
    /// A note naming what became of the step's messages that did not reach every member,
    /// the sends the server refused and the late deliveries, if any.
    fn account(&self, report: &mut Report, kind: &str, s: &Measured) {
        let what = s.accounting.describe();
        if !what.is_empty() {
            report.notes.push(format!(
                "{} {kind} {} msg/s: {what}",
                self.setup,
                count(s.step.rate)
            ));
        }
    }
}

/// Refuses a layout the machine cannot hold: a node or a worker process past the open-file
/// limit, or a (source address, node) pair past the ephemeral port range. Returns warnings
/// for what may slow the connect down: more handshakes at once than a node's listen backlog.
fn check_limits(
    layout: &Layout,
    nodes: usize,
    nodes_are_ours: bool,
) -> anyhow::Result<Vec<String>> {
    let files = crate::machine::file_limit() as usize;
    let per_node = layout.per_node(nodes).into_iter().max().unwrap_or(0);
    if nodes_are_ours && per_node + FILE_MARGIN > files {
        anyhow::bail!(
            "{per_node} members on one node, but a process may open only {files} files \
             (open-file limit): lower --scale-members to {} or less",
            files.saturating_sub(FILE_MARGIN)
        );
    }
    if layout.per_process.min(layout.connections()) + FILE_MARGIN > files {
        anyhow::bail!(
            "--per-process {} is past the open-file limit of {files}: lower it",
            layout.per_process
        );
    }
    let ports = crate::machine::ephemeral_ports();
    let pair = layout.busiest_pair(nodes);
    if pair > ports {
        anyhow::bail!(
            "{pair} connections from one source address to one node, but only {ports} \
             ephemeral ports: raise --sources"
        );
    }
    let mut warnings = Vec::new();
    let in_flight = layout.ranges().len() * IN_FLIGHT / nodes.max(1);
    let backlog = crate::machine::somaxconn();
    if in_flight > backlog {
        warnings.push(format!(
            "up to {in_flight} handshakes at once on each node, above the kernel's listen \
             backlog cap (net.core.somaxconn) of {backlog}: connects may be dropped and retried"
        ));
    }
    Ok(warnings)
}

/// The nodes' resident memory before the members connected, and how many each holds.
struct Memory {
    before_kib: Vec<u64>,
    members: Vec<usize>,
}

impl Memory {
    /// Each node's RSS in MiB and the RSS it added per member, in bytes, as two columns.
    fn columns(&self, now_kib: &[u64]) -> [String; 2] {
        let mib: Vec<String> = now_kib
            .iter()
            .map(|&k| format!("{:.1}", k as f64 / 1024.0))
            .collect();
        let per_conn: Vec<String> = now_kib
            .iter()
            .zip(&self.before_kib)
            .zip(&self.members)
            .map(|((&now, &before), &n)| {
                count((now as f64 - before as f64) * 1024.0 / n.max(1) as f64)
            })
            .collect();
        [each(&mib), each(&per_conn)]
    }
}

fn node_rss(cluster: &Cluster) -> Vec<u64> {
    cluster.node_pids().iter().map(|&p| rss_kib(p)).collect()
}

/// Several values as `a / b / c`; "-" for none.
fn each(values: &[String]) -> String {
    if values.is_empty() {
        "-".into()
    } else {
        values.join(" / ")
    }
}

/// The CPU columns: nodes (sum, then each), redis, generator, the rest of the machine.
fn cpu_columns(cpu: &Cpu) -> [String; 4] {
    let nodes: Vec<String> = cpu.nodes.iter().map(|c| format!("{c:.0}")).collect();
    let redis: f64 = cpu.redis.iter().sum();
    [
        if nodes.is_empty() {
            "-".into()
        } else {
            format!("{:.0} ({})", cpu.nodes.iter().sum::<f64>(), each(&nodes))
        },
        if cpu.redis.is_empty() {
            "-".into()
        } else {
            format!("{redis:.0}")
        },
        format!("{:.0}", cpu.generator),
        format!("{:.0}", cpu.other),
    ]
}

const CONNECT_HEADER: &[&str] = &[
    "setup",
    "nodes",
    "members",
    "worker processes",
    "workers' RSS MiB",
    "connect s",
    "connects/s",
    "connect → joined p50 / p99 / max ms",
    "node CPU % (each)",
    "redis CPU %",
    "generator CPU %",
    "other CPU %",
    "node RSS MiB (each)",
    "RSS bytes per member (each)",
];

fn connect_row(
    setup: Setup,
    layout: &Layout,
    opened: &Opened,
    memory: &Memory,
    rss_kib: &[u64],
) -> Vec<String> {
    let [p50, p99, _, max] = percentiles(&opened.connect);
    let mut row = vec![
        setup.to_string(),
        memory.members.len().to_string(),
        count(layout.connections() as f64),
        opened.processes.to_string(),
        format!("{:.1}", opened.workers_rss_kib as f64 / 1024.0),
        format!("{:.1}", opened.secs),
        count(layout.connections() as f64 / opened.secs.max(1e-3)),
        format!("{p50} / {p99} / {max}"),
    ];
    row.extend(cpu_columns(&opened.cpu));
    row.extend(memory.columns(rss_kib));
    row
}

const STEP_HEADER: &[&str] = &[
    "setup",
    "step",
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
    "node CPU % (each)",
    "redis CPU %",
    "generator CPU %",
    "other CPU %",
    "node RSS MiB (each)",
    "RSS bytes per member (each)",
    "failed because",
];

fn step_row(setup: Setup, kind: &str, s: &Measured, memory: &Memory, failed: &str) -> Vec<String> {
    let step = &s.step;
    let [p50, p99, p999, max] = percentiles(&step.latency);
    let [r50, r99, _, _] = percentiles(&step.read_latency);
    let mut row = vec![
        setup.to_string(),
        kind.to_owned(),
        count(step.rate),
        count(step.rate * step.members as f64),
        count(step.sent as f64),
        count(step.deliveries_per_sec),
        step.lost().to_string(),
        step.duplicates.to_string(),
        p50,
        p99,
        p999,
        max,
        format!("{r50} / {r99}"),
    ];
    row.extend(cpu_columns(&s.cpu));
    row.extend(memory.columns(&s.rss_kib));
    row.push(if failed.is_empty() {
        "-".into()
    } else {
        failed.to_owned()
    });
    row
}

const BEST_HEADER: &[&str] = &[
    "setup",
    "best deliveries/s",
    "offered msg/s",
    "p99 ms at best",
    "node CPU % at best",
    "redis CPU % at best",
    "generator CPU % at best",
    "other CPU % at best",
    "next step failed because",
    "server reports",
];

fn best_row(setup: Setup, top: Option<&Measured>, why: String, trouble: String) -> Vec<String> {
    let trouble = if trouble.is_empty() {
        "-".into()
    } else {
        trouble
    };
    let Some(s) = top else {
        let mut row = vec![setup.to_string(), "0".into()];
        row.extend(["-"; 6].map(String::from));
        row.extend([why, trouble]);
        return row;
    };
    let mut row = vec![
        setup.to_string(),
        count(s.step.deliveries_per_sec),
        count(s.step.rate),
        ms(s.step.latency.value_at_quantile(0.99)),
    ];
    row.extend(cpu_columns(&s.cpu));
    row.extend([why, trouble]);
    row
}
