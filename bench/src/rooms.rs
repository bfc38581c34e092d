//! Many rooms: R rooms of M members each (by default 2,000 × 20 = 40,000 connections) over the
//! nodes, every room with members on several nodes; the first P members of each room also
//! publish, the total rate shared between all publishers and their sends spread evenly over
//! each second. A ramp of offered rates, as in max-rate, until p99 passes the limit or a
//! message is lost, on each setup (by default four nodes sharing one Redis, then four nodes on
//! a three-shard Redis Cluster): deliveries per second, loss, duplicates, latency, and the CPU
//! of the nodes and of each Redis. The connections live in worker processes (see `members`).

use std::time::Duration;

use crate::cluster::{Cluster, ServerOpts, Setup, key_slot};
use crate::members::{Layout, Measured, Workers, room_name};
use crate::report::{Table, count, ms, percentiles, ratio};
use crate::suite::{Plan, failure};

/// The nodes' extra environment: presence through Redis off, as it always is in cluster mode,
/// so that every setup does the same work per message and per join.
const NODE_ENV: [(&str, &str); 1] = [("SCALECHAT_REDIS__PRESENCE", "false")];

fn layout(plan: &Plan) -> Layout {
    let members = plan.room_members.max(1);
    Layout {
        rooms: plan.rooms.max(1),
        members,
        publishers: plan.room_publishers.clamp(1, members),
        per_process: plan.per_process,
        sources: plan.sources,
        latency_every: 1,
    }
}

/// Runs the ramp on each setup; the Markdown tables and whether no message was duplicated.
pub async fn run(
    plan: &Plan,
    opts: &ServerOpts,
    setups: &[Setup],
) -> anyhow::Result<(String, bool)> {
    let layout = layout(plan);
    let title = format!(
        "Rooms: {} rooms × {} members = {} connections, {} publisher{} per room, steps of {} s \
         from {} msg/s, ×{} each, p99 limit {} ms",
        count(layout.rooms as f64),
        layout.members,
        count((layout.rooms * layout.members) as f64),
        layout.publishers,
        if layout.publishers == 1 { "" } else { "s" },
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
        let (mut workers, opened) = Workers::spawn(&cluster, layout).await?;
        let [c50, c99, _, _] = percentiles(&opened.connect);
        let mut note = format!(
            "{setup}: {} members joined in {:.1} s (connect to joined p50 {c50} ms, p99 {c99} \
             ms), held by {} worker processes",
            count(layout.connections() as f64),
            opened.secs,
            opened.processes
        );
        if let Some(per_shard) = rooms_per_shard(&cluster, layout.rooms) {
            let list: Vec<String> = per_shard.iter().map(|n| n.to_string()).collect();
            note.push_str(&format!("; rooms per shard {}", list.join(" / ")));
        }
        notes.push(note);
        // Warm-up, not reported: long enough for every publisher to send a message at the
        // start rate (within bounds).
        let publishers = layout.all_publishers() as f64;
        let warm_secs = (publishers / plan.rooms_start_rate.max(1e-3)).clamp(0.5, 5.0);
        let warm = workers
            .step(&cluster, plan.rooms_start_rate, warm_secs, 2.0)
            .await?;
        clean &= warm.step.duplicates == 0;
        let mut rate = plan.rooms_start_rate;
        let mut top: Option<Measured> = None;
        let mut why = format!("reached {} steps", plan.max_steps);
        for _ in 0..plan.max_steps {
            let s = workers
                .step(&cluster, rate, plan.step_secs, plan.drain_secs)
                .await?;
            clean &= s.step.duplicates == 0;
            let what = s.accounting.describe();
            if !what.is_empty() {
                notes.push(format!("{setup} {} msg/s: {what}", count(rate)));
            }
            let failed = failure(&s.step, plan.p99_limit_ms);
            steps.push(step_row(setup, &s, layout.members, &failed));
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
                s.cpu
                    .redis
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

fn step_row(setup: Setup, s: &Measured, members: usize, failed: &str) -> Vec<String> {
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
        if s.cpu.redis.len() > 1 {
            let each: Vec<String> = s.cpu.redis.iter().map(|c| format!("{c:.0}")).collect();
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

fn redis_cpu(s: &Measured) -> String {
    if s.cpu.redis.is_empty() {
        "-".into()
    } else {
        format!("{:.0}", s.step.redis_cpu)
    }
}
