//! The PostgreSQL archive under load. The `archive` scenario: many rooms (500 by default, two
//! members each, one of them publishing; the connections held by the `rooms` scenario's worker
//! processes), the total rate raised step by step; during each step
//! the nodes' `/metrics` are read every 250 ms for messages accepted, rows written, the archive
//! queue and its refusals, so each step reports the rate the archive sustained (rows written
//! per second while publishing), the backlog (messages accepted and not yet written) and how
//! long it took to clear, beside delivery loss and latency. Run on setups with and without the
//! archive, the same steps show what the archive costs delivery.
//!
//! The check: at the end of a setup's run, once the archive has caught up, the rows in the
//! table are counted and compared with the messages the nodes accepted.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use crate::cluster::{Cluster, Protocol, ServerOpts, Setup, http_get};
use crate::fanout::Step;
use crate::members::{Layout, Workers};
use crate::report::{Table, count, ms, optional_cpu, percentiles};
use crate::suite::{Plan, failure};

/// How often the nodes' metrics are read during a step.
const SAMPLE_EVERY: Duration = Duration::from_millis(250);
/// How long the archive may write nothing before a wait for it gives up.
const STALL: Duration = Duration::from_secs(5);

/// The archive's counters, summed over the nodes.
#[derive(Clone, Copy, Debug, Default)]
pub struct Counters {
    /// `scalechat_messages_in_total`: `send`s accepted.
    pub accepted: u64,
    /// `scalechat_archive_messages_written_total`: rows inserted.
    pub written: u64,
    /// `scalechat_archive_queue_messages`: the in-process queue (embedded transport).
    pub queued: u64,
    /// `scalechat_archive_dropped_total`: refused by the full queue (caught up later).
    pub dropped: u64,
    /// `scalechat_archive_missed_total`: lost to the archive.
    pub missed: u64,
    /// `scalechat_archive_write_errors_total`: batches that failed and were retried.
    pub write_errors: u64,
    /// Nodes reporting `scalechat_archive_up 1`.
    pub up: u64,
}

impl Counters {
    /// Messages accepted and not yet in the archive.
    pub fn backlog(&self) -> u64 {
        self.accepted.saturating_sub(self.written)
    }
}

/// Reads and sums the nodes' archive counters; a node that does not answer adds nothing.
pub async fn counters(addrs: &[SocketAddr]) -> Counters {
    let mut c = Counters::default();
    for &addr in addrs {
        let Ok(text) = http_get(addr, "/metrics").await else {
            continue;
        };
        for line in text.lines() {
            let Some((name, value)) = line.split_once(' ') else {
                continue;
            };
            let Ok(value) = value.trim().parse::<f64>() else {
                continue;
            };
            let slot = match name {
                "scalechat_messages_in_total" => &mut c.accepted,
                "scalechat_archive_messages_written_total" => &mut c.written,
                "scalechat_archive_queue_messages" => &mut c.queued,
                "scalechat_archive_dropped_total" => &mut c.dropped,
                "scalechat_archive_missed_total" => &mut c.missed,
                "scalechat_archive_write_errors_total" => &mut c.write_errors,
                "scalechat_archive_up" => &mut c.up,
                _ => continue,
            };
            *slot += value as u64;
        }
    }
    c
}

fn addrs(cluster: &Cluster) -> Vec<SocketAddr> {
    cluster.nodes.iter().map(|n| n.addr).collect()
}

/// Waits until the archive holds every accepted message, or has written nothing for
/// [`STALL`], or `max_secs` passed; the counters then and the seconds waited.
pub async fn caught_up(addrs: &[SocketAddr], max_secs: f64) -> (Counters, f64) {
    let started = Instant::now();
    let mut last = counters(addrs).await;
    let mut moved = Instant::now();
    while last.backlog() > 0 && started.elapsed().as_secs_f64() < max_secs {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let now = counters(addrs).await;
        if now.written != last.written {
            moved = Instant::now();
        } else if moved.elapsed() > STALL {
            break;
        }
        last = now;
    }
    (last, started.elapsed().as_secs_f64())
}

/// Rows against messages accepted, at the end of a setup's run.
pub struct Tally {
    pub counters: Counters,
    pub rows: u64,
    pub waited_secs: f64,
}

impl Tally {
    /// Whether the table holds exactly one row per accepted message.
    pub fn matches(&self) -> bool {
        self.rows == self.counters.accepted
    }
}

/// Waits for the archive to catch up (at most `max_secs`) and counts its rows; `None` for
/// a setup without the tool's PostgreSQL.
pub async fn tally(cluster: &Cluster, max_secs: f64) -> anyhow::Result<Option<Tally>> {
    let Some(pg) = &cluster.pg else {
        return Ok(None);
    };
    let (counters, waited_secs) = caught_up(&addrs(cluster), max_secs).await;
    let rows = pg.rows().await?;
    Ok(Some(Tally {
        counters,
        rows,
        waited_secs,
    }))
}

/// The table of [`tally`] rows, one per scenario group and setup.
pub fn tally_table() -> Table {
    Table::new(
        "Archive check: rows in PostgreSQL against messages accepted, once the archive caught \
         up at the end of each setup's run",
        &[
            "scenario",
            "setup",
            "messages accepted",
            "rows",
            "rows − accepted",
            "dropped (queue full)",
            "missed",
            "write errors",
            "waited s",
        ],
    )
}

/// One [`tally`] as a row of [`tally_table`].
pub fn tally_row(scenario: &str, setup: Setup, t: &Tally) -> Vec<String> {
    let c = &t.counters;
    vec![
        scenario.to_owned(),
        setup.to_string(),
        count(c.accepted as f64),
        count(t.rows as f64),
        if t.matches() {
            "0".into()
        } else {
            format!("**{}**", t.rows as i64 - c.accepted as i64)
        },
        c.dropped.to_string(),
        c.missed.to_string(),
        c.write_errors.to_string(),
        format!("{:.1}", t.waited_secs),
    ]
}

/// The metrics read during one step, with their time from the step's start in seconds.
type Samples = Vec<(f64, Counters)>;

/// Reads the counters every [`SAMPLE_EVERY`] until `done`.
async fn sample_until(addrs: &[SocketAddr], started: Instant, done: &AtomicBool) -> Samples {
    let mut samples = Vec::new();
    while !done.load(Ordering::Acquire) {
        let c = counters(addrs).await;
        samples.push((started.elapsed().as_secs_f64(), c));
        tokio::time::sleep(SAMPLE_EVERY).await;
    }
    samples
}

/// What one step measured of the archive.
struct ArchiveStep {
    /// Messages accepted per second while publishing.
    accepted_per_sec: f64,
    /// Rows written per second while publishing.
    written_per_sec: f64,
    /// Accepted and not yet written when publishing stopped.
    backlog_at_end: u64,
    /// The largest backlog and in-process queue seen.
    max_backlog: u64,
    max_queued: u64,
    /// Seconds from the end of publishing until the backlog was cleared (`None`: it was not,
    /// within the drain time).
    catch_up_secs: Option<f64>,
    /// Counted during the step and its catch-up.
    dropped: u64,
    missed: u64,
    write_errors: u64,
}

/// Runs one step of the `workers` at `rate` while sampling the archive, then waits for the
/// archive to catch up.
async fn step(
    cluster: &Cluster,
    workers: &mut Workers,
    plan: &Plan,
    rate: f64,
) -> anyhow::Result<(Step, ArchiveStep)> {
    let addrs = addrs(cluster);
    let before = counters(&addrs).await;
    let started = Instant::now();
    let done = AtomicBool::new(false);
    let publish = async {
        let s = workers
            .step(cluster, rate, plan.archive_secs, plan.drain_secs)
            .await;
        done.store(true, Ordering::Release);
        s
    };
    let (delivery, mut samples) = tokio::join!(publish, sample_until(&addrs, started, &done));
    // The archive may still be behind once every delivery arrived.
    let (after, _) = caught_up(&addrs, plan.drain_secs).await;
    samples.push((started.elapsed().as_secs_f64(), after));
    let archive = measure(&before, &samples, plan.archive_secs);
    Ok((delivery?.step, archive))
}

/// The archive's rates and backlog from `samples` of a step that published for `secs`.
fn measure(before: &Counters, samples: &[(f64, Counters)], secs: f64) -> ArchiveStep {
    let first = samples.first().map_or((0.0, *before), |s| *s);
    // The sample taken closest to the end of publishing.
    let end = samples
        .iter()
        .min_by(|a, b| (a.0 - secs).abs().total_cmp(&(b.0 - secs).abs()))
        .copied()
        .unwrap_or(first);
    let window = (end.0 - first.0).max(1e-3);
    let last = samples.last().map_or(*before, |s| s.1);
    let catch_up_secs = samples
        .iter()
        .find(|(t, c)| *t >= end.0 && c.backlog() == 0)
        .map(|(t, _)| (t - secs).max(0.0));
    ArchiveStep {
        accepted_per_sec: (end.1.accepted - first.1.accepted) as f64 / window,
        written_per_sec: (end.1.written - first.1.written) as f64 / window,
        backlog_at_end: end.1.backlog(),
        max_backlog: samples.iter().map(|(_, c)| c.backlog()).max().unwrap_or(0),
        max_queued: samples.iter().map(|(_, c)| c.queued).max().unwrap_or(0),
        catch_up_secs,
        dropped: last.dropped - before.dropped,
        missed: last.missed - before.missed,
        write_errors: last.write_errors - before.write_errors,
    }
}

/// Why the archive did not keep up in a step; empty when it did: nothing missed or refused
/// by the full queue, and no more than `lag_secs` of messages waiting when publishing stopped.
fn archive_failure(a: &ArchiveStep, lag_secs: f64) -> String {
    let mut why = Vec::new();
    if a.missed > 0 {
        why.push(format!("{} missed by the archive", a.missed));
    }
    if a.dropped > 0 {
        why.push(format!("{} refused by the full archive queue", a.dropped));
    }
    if a.backlog_at_end as f64 > lag_secs * a.accepted_per_sec.max(1.0) {
        why.push(format!(
            "archive {} behind at the end",
            count(a.backlog_at_end as f64)
        ));
    }
    if a.catch_up_secs.is_none() {
        why.push("archive did not catch up".into());
    }
    why.join(", ")
}

const STEP_HEADER: &[&str] = &[
    "setup",
    "offered msg/s",
    "sent",
    "accepted msg/s",
    "archived rows/s",
    "backlog at end",
    "max backlog",
    "max queue",
    "catch-up s",
    "dropped",
    "missed",
    "write errors",
    "lost deliveries",
    "p50 ms",
    "p99 ms",
    "max ms",
    "server CPU %",
    "postgres CPU %",
    "redis CPU %",
    "generator CPU %",
    "other CPU %",
    "failed because",
];

fn step_row(setup: Setup, s: &Step, a: Option<&ArchiveStep>, why: &str) -> Vec<String> {
    let [p50, p99, _, max] = percentiles(&s.latency);
    let dash = || "-".to_owned();
    let archive: Vec<String> = match a {
        Some(a) => vec![
            count(a.accepted_per_sec),
            count(a.written_per_sec),
            count(a.backlog_at_end as f64),
            count(a.max_backlog as f64),
            count(a.max_queued as f64),
            a.catch_up_secs.map_or("-".into(), |t| format!("{t:.1}")),
            a.dropped.to_string(),
            a.missed.to_string(),
            a.write_errors.to_string(),
        ],
        None => (0..9).map(|_| dash()).collect(),
    };
    let mut row = vec![setup.to_string(), count(s.rate), count(s.sent as f64)];
    row.extend(archive);
    row.extend([
        s.lost().to_string(),
        p50,
        p99,
        max,
        format!("{:.0}", s.server_cpu),
        optional_cpu(s.pg_cpu),
        optional_cpu(s.redis_cpu),
        format!("{:.0}", s.generator_cpu),
        format!("{:.0}", s.other_cpu),
        if why.is_empty() {
            dash()
        } else {
            why.to_owned()
        },
    ]);
    row
}

/// Runs the scenario on `setups` (the raw relay and the Socket.IO setups left out), adding
/// each archive's check to `checks`; its tables, and whether nothing was duplicated or
/// missing from the archive.
pub async fn run(
    plan: &Plan,
    opts: &ServerOpts,
    setups: &[Setup],
    checks: &mut Table,
) -> anyhow::Result<(String, bool)> {
    let layout = Layout {
        rooms: plan.archive_rooms.max(1),
        members: plan.archive_members.max(1),
        publishers: 1,
        per_process: plan.per_process,
        sources: plan.sources,
        latency_every: 1,
    };
    let (mut best, mut steps) = tables(plan);
    let mut clean = true;
    let native = |s: &&Setup| **s != Setup::Raw && s.protocol() == Protocol::Native;
    for &setup in setups.iter().filter(native) {
        eprintln!("archive on {setup}");
        let cluster = Cluster::start(setup, opts).await?;
        let (mut workers, _) = Workers::spawn(&cluster, layout).await?;
        // Warm-up, not reported: long enough for every publisher to send a message.
        let warm_up = plan.archive_rates.first().map_or(1000.0, |r| r.min(1000.0));
        let warm_secs = (layout.rooms as f64 / warm_up).clamp(0.5, 5.0);
        let warm = workers.step(&cluster, warm_up, warm_secs, 2.0).await?;
        clean &= warm.step.duplicates == 0;
        let (top, why, ok) = ramp(&cluster, &mut workers, plan, &mut steps).await?;
        clean &= ok;
        best.push(best_row(setup, top.as_ref(), why));
        if let Some(t) = tally(&cluster, plan.drain_secs).await? {
            clean &= t.matches();
            checks.push(tally_row("archive", setup, &t));
        }
        workers.release().await;
        drop(cluster);
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    Ok((best.markdown() + "\n" + &steps.markdown() + "\n", clean))
}

/// The scenario's tables: the best step of each setup, and every step.
fn tables(plan: &Plan) -> (Table, Table) {
    let best = Table::new(
        &format!(
            "Archive: best step (no delivery lost, p99 < {} ms; with the archive: nothing \
             missed or refused, at most {} s of messages behind when publishing stopped)",
            plan.p99_limit_ms, plan.archive_lag_secs
        ),
        &[
            "setup",
            "offered msg/s",
            "archived rows/s",
            "p99 ms",
            "catch-up s",
            "next step failed because",
        ],
    );
    let steps = Table::new(
        &format!(
            "Archive: {} rooms of {} members, one publisher each, {} s steps; archived rows/s \
             while publishing, backlog = accepted − written",
            plan.archive_rooms, plan.archive_members, plan.archive_secs
        ),
        STEP_HEADER,
    );
    (best, steps)
}

/// The best step so far: delivery, and the archive's when it is on.
type Passed = (Step, Option<ArchiveStep>);

/// Runs the steps of `--archive-rates` on one setup until one fails, each as a row of
/// `steps`; the last that passed, why the ramp ended, and whether nothing was duplicated.
async fn ramp(
    cluster: &Cluster,
    workers: &mut Workers,
    plan: &Plan,
    steps: &mut Table,
) -> anyhow::Result<(Option<Passed>, String, bool)> {
    let archiving = counters(&addrs(cluster)).await.up > 0;
    let mut top = None;
    let mut clean = true;
    for &rate in &plan.archive_rates {
        let (s, a) = step(cluster, workers, plan, rate).await?;
        let a = archiving.then_some(a);
        clean &= s.duplicates == 0;
        let mut failed = failure(&s, plan.p99_limit_ms);
        if let Some(a) = &a {
            let archive = archive_failure(a, plan.archive_lag_secs);
            if !failed.is_empty() && !archive.is_empty() {
                failed.push_str(", ");
            }
            failed.push_str(&archive);
        }
        steps.push(step_row(cluster.setup, &s, a.as_ref(), &failed));
        if !failed.is_empty() {
            return Ok((top, format!("{} msg/s: {failed}", count(rate)), clean));
        }
        top = Some((s, a));
    }
    Ok((top, "every step passed".into(), clean))
}

fn best_row(setup: Setup, top: Option<&Passed>, why: String) -> Vec<String> {
    let Some((s, a)) = top else {
        let dash = || "-".to_owned();
        return vec![setup.to_string(), "0".into(), dash(), dash(), dash(), why];
    };
    vec![
        setup.to_string(),
        count(s.rate),
        a.as_ref().map_or("-".into(), |a| count(a.written_per_sec)),
        ms(s.latency.value_at_quantile(0.99)),
        a.as_ref()
            .and_then(|a| a.catch_up_secs)
            .map_or("-".into(), |t| format!("{t:.1}")),
        why,
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(t: f64, accepted: u64, written: u64) -> (f64, Counters) {
        let c = Counters {
            accepted,
            written,
            ..Counters::default()
        };
        (t, c)
    }

    #[test]
    fn rates_are_read_up_to_the_end_of_publishing_and_catch_up_after_it() {
        // 1,000 accepted a second for 2 s; the archive writes 800 a second, then catches up.
        let samples = vec![
            at(0.0, 0, 0),
            at(1.0, 1000, 800),
            at(1.9, 1900, 1520),
            at(2.6, 2000, 1900),
            at(3.1, 2000, 2000),
        ];
        let a = measure(&Counters::default(), &samples, 2.0);
        assert!(
            (a.accepted_per_sec - 1000.0).abs() < 1.0,
            "{}",
            a.accepted_per_sec
        );
        assert!(
            (a.written_per_sec - 800.0).abs() < 1.0,
            "{}",
            a.written_per_sec
        );
        assert_eq!((a.backlog_at_end, a.max_backlog), (380, 380));
        let catch_up = a.catch_up_secs.unwrap();
        assert!((catch_up - 1.1).abs() < 1e-9, "{catch_up}");
        assert_eq!(archive_failure(&a, 2.0), "");
        assert!(archive_failure(&a, 0.1).contains("380 behind"));
        let stuck = measure(&Counters::default(), &samples[..3], 2.0);
        assert_eq!(stuck.catch_up_secs, None);
        assert!(archive_failure(&stuck, 2.0).contains("did not catch up"));
    }
}
