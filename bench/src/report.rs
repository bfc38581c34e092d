//! Result tables in Markdown, one per scenario, with each setup's ratio to the raw-TCP ceiling.

use hdrhistogram::Histogram;

use crate::churn::Churn;
use crate::cluster::Setup;
use crate::fanout::Step;
use crate::idle::Idle;

/// A Markdown table being filled.
pub struct Table {
    title: String,
    header: Vec<String>,
    rows: Vec<Vec<String>>,
}

impl Table {
    /// An empty table.
    pub fn new(title: &str, header: &[&str]) -> Table {
        Table {
            title: title.to_owned(),
            header: header.iter().map(|s| s.to_string()).collect(),
            rows: Vec::new(),
        }
    }

    /// Adds a row and prints it to stderr as progress.
    pub fn push(&mut self, row: Vec<String>) {
        eprintln!("  {}: {}", self.title, row.join(" | "));
        self.rows.push(row);
    }

    /// Whether it has no row yet.
    pub fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }

    /// The table as Markdown.
    pub fn markdown(&self) -> String {
        let mut out = format!("### {}\n\n| {} |\n|", self.title, self.header.join(" | "));
        out.push_str(&"---|".repeat(self.header.len()));
        out.push('\n');
        for row in &self.rows {
            out.push_str(&format!("| {} |\n", row.join(" | ")));
        }
        out
    }
}

/// A duration in microseconds, shown in ms.
pub fn ms(us: u64) -> String {
    format!("{:.2}", us as f64 / 1000.0)
}

/// p50 / p99 / p99.9 / max of a histogram, in ms; "-" when it is empty.
pub fn percentiles(h: &Histogram<u64>) -> [String; 4] {
    if h.is_empty() {
        return ["-".into(), "-".into(), "-".into(), "-".into()];
    }
    [
        ms(h.value_at_quantile(0.5)),
        ms(h.value_at_quantile(0.99)),
        ms(h.value_at_quantile(0.999)),
        ms(h.max()),
    ]
}

/// A count with thousands separators.
pub fn count(n: f64) -> String {
    let s = format!("{:.0}", n.max(0.0));
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// `x / ceiling` as a ratio, or "-" without a ceiling.
pub fn ratio(x: f64, ceiling: Option<f64>) -> String {
    match ceiling {
        Some(c) if c > 0.0 => format!("{:.2}", x / c),
        _ => "-".into(),
    }
}

/// The columns of a fan-out step.
pub const STEP_HEADER: &[&str] = &[
    "setup",
    "members",
    "publishers",
    "offered msg/s",
    "sent",
    "deliveries/s",
    "× raw",
    "lost",
    "dup",
    "p50 ms",
    "p99 ms",
    "p99.9 ms",
    "max ms",
    "cross-node p50/p99 ms",
    "as read p50/p99 ms",
    "server CPU %",
    "redis CPU %",
    "postgres CPU %",
    "generator CPU %",
    "other CPU %",
    "server reports",
];

/// One fan-out step as a row.
pub fn step_row(setup: Setup, step: &Step, raw: Option<f64>, trouble: &str) -> Vec<String> {
    let [p50, p99, p999, max] = percentiles(&step.latency);
    let cross = if step.cross_latency.is_empty() {
        "-".to_owned()
    } else {
        let c = &step.cross_latency;
        format!(
            "{} / {}",
            ms(c.value_at_quantile(0.5)),
            ms(c.value_at_quantile(0.99))
        )
    };
    let read = if step.read_latency.is_empty() {
        "-".to_owned()
    } else {
        let r = &step.read_latency;
        format!(
            "{} / {}",
            ms(r.value_at_quantile(0.5)),
            ms(r.value_at_quantile(0.99))
        )
    };
    let mut notes: Vec<String> = step
        .errors
        .iter()
        .map(|(code, n)| format!("error {code} ×{n}"))
        .collect();
    notes.extend(
        step.close_codes
            .iter()
            .map(|(code, n)| format!("closed {code} ×{n}")),
    );
    if step.disconnected > 0 {
        notes.push(format!("{} disconnected", step.disconnected));
    }
    if !trouble.is_empty() {
        notes.push(trouble.to_owned());
    }
    vec![
        setup.to_string(),
        step.members.to_string(),
        step.publishers.to_string(),
        count(step.rate),
        count(step.sent as f64),
        count(step.deliveries_per_sec),
        ratio(step.deliveries_per_sec, raw),
        step.lost().to_string(),
        step.duplicates.to_string(),
        p50,
        p99,
        p999,
        max,
        cross,
        read,
        format!("{:.0}", step.server_cpu.max(0.0)),
        optional_cpu(step.redis_cpu),
        optional_cpu(step.pg_cpu),
        format!("{:.0}", step.generator_cpu),
        format!("{:.0}", step.other_cpu),
        if notes.is_empty() {
            "-".into()
        } else {
            notes.join("; ")
        },
    ]
}

/// CPU of a process that may not be there: "-" when it used none.
pub fn optional_cpu(percent: f64) -> String {
    if percent > 0.0 {
        format!("{percent:.0}")
    } else {
        "-".into()
    }
}

/// The columns of an idle run.
pub const IDLE_HEADER: &[&str] = &[
    "setup",
    "connections",
    "failed",
    "worker processes",
    "connect s",
    "server RSS before MiB",
    "server RSS after MiB",
    "bytes/conn",
    "× raw",
    "idle server CPU %",
];

/// One idle run as a row.
pub fn idle_row(setup: Setup, idle: &Idle, raw: Option<f64>) -> Vec<String> {
    vec![
        setup.to_string(),
        count(idle.conns as f64),
        idle.failed.to_string(),
        idle.processes.to_string(),
        format!("{:.1}", idle.connect_secs),
        format!("{:.1}", idle.rss_before_kib as f64 / 1024.0),
        format!("{:.1}", idle.rss_after_kib as f64 / 1024.0),
        count(idle.bytes_per_conn()),
        ratio(idle.bytes_per_conn(), raw),
        format!("{:.1}", idle.idle_cpu),
    ]
}

/// The columns of a churn run.
pub const CHURN_HEADER: &[&str] = &[
    "setup",
    "connections",
    "upgrades/s",
    "× raw",
    "101 p50 / p99 / max ms",
    "joined p50 / p99 / max ms",
    "failed",
    "server CPU %",
    "generator CPU %",
    "first error",
];

/// One churn run as a row.
pub fn churn_row(setup: Setup, churn: &Churn, raw: Option<f64>) -> Vec<String> {
    let three = |h: &Histogram<u64>| {
        let [p50, p99, _, max] = percentiles(h);
        format!("{p50} / {p99} / {max}")
    };
    vec![
        setup.to_string(),
        count(churn.completed as f64),
        count(churn.per_sec),
        ratio(churn.per_sec, raw),
        three(&churn.upgrade),
        three(&churn.joined),
        churn.failed.to_string(),
        format!("{:.0}", churn.server_cpu),
        format!("{:.0}", churn.generator_cpu),
        churn.first_error.clone().unwrap_or_else(|| "-".into()),
    ]
}
