//! The node's counters and gauges, and their Prometheus text exposition (format 0.0.4) for
//! `GET /metrics`.
//!
//! Every value is one `AtomicU64` updated with `Relaxed` ordering: an event costs one atomic
//! add, a fan-out adds its recipient count once, and nothing is formatted until a scrape.
//! Values read during one scrape are not a consistent snapshot of each other, which
//! Prometheus does not expect either.

use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use crate::protocol::ErrorCode;
use crate::protocol::ws::close_code;

/// `Content-Type` of the exposition.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// One counter or gauge.
#[derive(Debug, Default)]
pub struct Count(AtomicU64);

impl Count {
    /// Adds one.
    pub fn inc(&self) {
        self.add(1);
    }

    /// Adds `n`.
    pub fn add(&self, n: u64) {
        self.0.fetch_add(n, Ordering::Relaxed);
    }

    /// Subtracts one (gauges only).
    pub fn dec(&self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }

    /// Sets the value (gauges only).
    pub fn set(&self, n: u64) {
        self.0.store(n, Ordering::Relaxed);
    }

    /// The current value.
    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// Why an upgrade request to `/ws` was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// The `Origin` is not in `server.allowed_origins` (403).
    Origin,
    /// `server.max_connections` are open (503).
    Capacity,
    /// Not an upgrade request, a bad query, or a bad handshake (426 or 400).
    BadRequest,
    /// The node is shutting down (503).
    ShuttingDown,
}

impl Refusal {
    const ALL: [Refusal; 4] = [
        Refusal::Origin,
        Refusal::Capacity,
        Refusal::BadRequest,
        Refusal::ShuttingDown,
    ];

    fn label(self) -> &'static str {
        match self {
            Refusal::Origin => "origin",
            Refusal::Capacity => "capacity",
            Refusal::BadRequest => "bad_request",
            Refusal::ShuttingDown => "shutting_down",
        }
    }
}

/// Close codes the server sends that are counted, in exposition order.
const CLOSE_CODES: [u16; 7] = [
    close_code::PROTOCOL_ERROR,
    close_code::UNSUPPORTED_DATA,
    close_code::INVALID_DATA,
    close_code::MESSAGE_TOO_BIG,
    close_code::SLOW_CONSUMER,
    close_code::PING_TIMEOUT,
    close_code::GOING_AWAY,
];

/// Upper bounds of the publish latency buckets, in seconds, with their labels; the last
/// bucket (`+Inf`) is implicit.
const PUBLISH_BUCKETS: [(f64, &str); 11] = [
    (0.0005, "0.0005"),
    (0.001, "0.001"),
    (0.0025, "0.0025"),
    (0.005, "0.005"),
    (0.01, "0.01"),
    (0.025, "0.025"),
    (0.05, "0.05"),
    (0.1, "0.1"),
    (0.25, "0.25"),
    (0.5, "0.5"),
    (1.0, "1"),
];

/// A fixed-bucket latency histogram: per-bucket (not cumulative) counts and the sum in
/// nanoseconds. The count is the buckets' total, so one observation is two atomic adds.
#[derive(Debug, Default)]
pub struct Histogram {
    buckets: [Count; PUBLISH_BUCKETS.len() + 1],
    sum_nanos: Count,
}

impl Histogram {
    /// Records one duration.
    pub fn observe(&self, took: Duration) {
        let secs = took.as_secs_f64();
        let at = PUBLISH_BUCKETS
            .iter()
            .position(|(le, _)| secs <= *le)
            .unwrap_or(PUBLISH_BUCKETS.len());
        self.buckets[at].inc();
        self.sum_nanos
            .add(u64::try_from(took.as_nanos()).unwrap_or(u64::MAX));
    }

    fn render(&self, out: &mut String, name: &str, help: &str) {
        header(out, name, help, "histogram");
        let mut total = 0;
        for (i, bucket) in self.buckets.iter().enumerate() {
            total += bucket.get();
            let le = PUBLISH_BUCKETS.get(i).map_or("+Inf", |(_, label)| label);
            let _ = writeln!(out, "{name}_bucket{{le=\"{le}\"}} {total}");
        }
        let sum = self.sum_nanos.get() as f64 / 1e9;
        let _ = writeln!(out, "{name}_sum {sum}");
        let _ = writeln!(out, "{name}_count {total}");
    }
}

/// Everything the node counts.
#[derive(Debug, Default)]
pub struct Metrics {
    /// Open WebSocket sessions (gauge).
    pub connections: Count,
    /// Accepted WebSocket upgrades.
    pub connections_total: Count,
    refused: [Count; Refusal::ALL.len()],
    /// Rooms with at least one local member (gauge).
    pub rooms: Count,
    /// `send`s accepted by the transport.
    pub messages_in_total: Count,
    /// Message frames queued for local members, summed over deliveries.
    pub messages_out_total: Count,
    /// Bytes the writers wrote to sockets.
    pub bytes_out_total: Count,
    /// Connections closed because their outbox overflowed.
    pub slow_consumer_disconnects_total: Count,
    errors: [Count; ErrorCode::ALL.len()],
    close_codes: [Count; CLOSE_CODES.len()],
    /// 1 while the transport can deliver across nodes; always 1 for `memory` (gauge).
    pub backplane_up: Count,
    /// Times the backplane came back after an outage.
    pub backplane_reconnects_total: Count,
    /// Publishes the transport refused or did not answer.
    pub publish_errors_total: Count,
    /// Transport publish latency.
    pub publish_seconds: Histogram,
}

impl Metrics {
    /// Counts a refused `/ws` request.
    pub fn refused(&self, why: Refusal) {
        self.refused[why as usize].inc();
    }

    /// Counts an `error` frame sent to a client.
    pub fn error(&self, code: ErrorCode) {
        self.errors[code as usize].inc();
    }

    /// Counts a close frame the server sent, when its code is one of those tracked.
    pub fn close_code(&self, code: u16) {
        if let Some(at) = CLOSE_CODES.iter().position(|c| *c == code) {
            self.close_codes[at].inc();
        }
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        let mut out = String::with_capacity(4096);
        let simple: [(&str, &str, &str, &Count); 6] = [
            (
                "scalechat_connections",
                "Open WebSocket sessions.",
                "gauge",
                &self.connections,
            ),
            (
                "scalechat_connections_total",
                "Accepted WebSocket upgrades.",
                "counter",
                &self.connections_total,
            ),
            (
                "scalechat_rooms",
                "Rooms with at least one local member.",
                "gauge",
                &self.rooms,
            ),
            (
                "scalechat_messages_in_total",
                "Chat messages accepted from local clients.",
                "counter",
                &self.messages_in_total,
            ),
            (
                "scalechat_messages_out_total",
                "Chat message frames queued for local members.",
                "counter",
                &self.messages_out_total,
            ),
            (
                "scalechat_bytes_out_total",
                "Bytes written to WebSocket connections.",
                "counter",
                &self.bytes_out_total,
            ),
        ];
        for (name, help, kind, count) in simple {
            single(&mut out, name, help, kind, count);
        }
        let name = "scalechat_connections_refused_total";
        header(
            &mut out,
            name,
            "Refused WebSocket upgrade requests.",
            "counter",
        );
        for (why, count) in Refusal::ALL.iter().zip(&self.refused) {
            let _ = writeln!(out, "{name}{{reason=\"{}\"}} {}", why.label(), count.get());
        }
        single(
            &mut out,
            "scalechat_slow_consumer_disconnects_total",
            "Connections closed as slow consumers (4001).",
            "counter",
            &self.slow_consumer_disconnects_total,
        );
        let name = "scalechat_errors_total";
        header(&mut out, name, "Error frames sent to clients.", "counter");
        for (code, count) in ErrorCode::ALL.iter().zip(&self.errors) {
            let _ = writeln!(out, "{name}{{code=\"{}\"}} {}", code.as_str(), count.get());
        }
        let name = "scalechat_close_codes_total";
        header(&mut out, name, "Close frames sent, by code.", "counter");
        for (code, count) in CLOSE_CODES.iter().zip(&self.close_codes) {
            let _ = writeln!(out, "{name}{{code=\"{code}\"}} {}", count.get());
        }
        let backplane: [(&str, &str, &str, &Count); 3] = [
            (
                "scalechat_backplane_up",
                "1 when the transport is connected (always 1 for memory).",
                "gauge",
                &self.backplane_up,
            ),
            (
                "scalechat_backplane_reconnects_total",
                "Backplane reconnections after an outage.",
                "counter",
                &self.backplane_reconnects_total,
            ),
            (
                "scalechat_publish_errors_total",
                "Messages the transport refused or did not confirm in time.",
                "counter",
                &self.publish_errors_total,
            ),
        ];
        for (name, help, kind, count) in backplane {
            single(&mut out, name, help, kind, count);
        }
        self.publish_seconds.render(
            &mut out,
            "scalechat_publish_seconds",
            "Transport publish latency in seconds.",
        );
        out
    }
}

/// Open while a WebSocket session runs: counts it in `scalechat_connections`.
#[derive(Debug)]
pub struct OpenSession<'a>(&'a Metrics);

impl<'a> OpenSession<'a> {
    /// Counts a session as open until the guard drops.
    pub fn new(metrics: &'a Metrics) -> Self {
        metrics.connections.inc();
        Self(metrics)
    }
}

impl Drop for OpenSession<'_> {
    fn drop(&mut self) {
        self.0.connections.dec();
    }
}

fn header(out: &mut String, name: &str, help: &str, kind: &str) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
}

fn single(out: &mut String, name: &str, help: &str, kind: &str, count: &Count) {
    header(out, name, help, kind);
    let _ = writeln!(out, "{name} {}", count.get());
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The value of the sample `series` (name with labels, exactly as written).
    fn value(text: &str, series: &str) -> Option<f64> {
        text.lines()
            .find_map(|line| line.strip_prefix(series)?.strip_prefix(' '))
            .and_then(|v| v.parse().ok())
    }

    #[test]
    fn every_family_has_help_and_type_and_well_formed_samples() {
        let metrics = Metrics::default();
        metrics.connections.inc();
        metrics.refused(Refusal::Capacity);
        metrics.error(ErrorCode::BadJson);
        metrics.error(ErrorCode::Unavailable);
        metrics.close_code(close_code::SLOW_CONSUMER);
        metrics.close_code(close_code::NORMAL);
        let text = metrics.render();
        let mut families = Vec::new();
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                let (name, kind) = rest.split_once(' ').unwrap();
                assert!(["counter", "gauge", "histogram"].contains(&kind), "{line}");
                assert!(
                    text.contains(&format!("# HELP {name} ")),
                    "no HELP for {name}"
                );
                families.push(name.to_owned());
            } else if !line.starts_with('#') {
                let (series, value) = line.rsplit_once(' ').unwrap();
                assert!(value.parse::<f64>().is_ok(), "{line}");
                assert!(
                    families.iter().any(|f| series.starts_with(f.as_str())),
                    "sample before its TYPE: {line}"
                );
            }
        }
        assert_eq!(families.len(), 14, "{families:?}");
        assert!(text.ends_with('\n'));
        assert_eq!(value(&text, "scalechat_connections"), Some(1.0));
        let refused = "scalechat_connections_refused_total";
        assert_eq!(
            value(&text, &format!("{refused}{{reason=\"capacity\"}}")),
            Some(1.0)
        );
        assert_eq!(
            value(&text, &format!("{refused}{{reason=\"origin\"}}")),
            Some(0.0)
        );
        for code in ErrorCode::ALL {
            let series = format!("scalechat_errors_total{{code=\"{}\"}}", code.as_str());
            let expected = matches!(code, ErrorCode::BadJson | ErrorCode::Unavailable);
            assert_eq!(value(&text, &series), Some(f64::from(u8::from(expected))));
        }
        let closes = "scalechat_close_codes_total";
        assert_eq!(
            value(&text, &format!("{closes}{{code=\"4001\"}}")),
            Some(1.0)
        );
        assert!(
            !text.contains("code=\"1000\""),
            "untracked codes are not listed"
        );
    }

    #[test]
    fn label_lists_match_the_enum_indexes() {
        for (i, code) in ErrorCode::ALL.iter().enumerate() {
            assert_eq!(*code as usize, i, "{}", code.as_str());
        }
        for (i, why) in Refusal::ALL.iter().enumerate() {
            assert_eq!(*why as usize, i, "{}", why.label());
        }
    }

    #[test]
    fn histogram_buckets_are_cumulative_with_sum_and_count() {
        let metrics = Metrics::default();
        let h = &metrics.publish_seconds;
        h.observe(Duration::from_micros(200));
        h.observe(Duration::from_millis(3));
        h.observe(Duration::from_millis(3));
        h.observe(Duration::from_secs(2));
        let text = metrics.render();
        let bucket = |le: &str| {
            value(
                &text,
                &format!("scalechat_publish_seconds_bucket{{le=\"{le}\"}}"),
            )
        };
        assert_eq!(bucket("0.0005"), Some(1.0));
        assert_eq!(bucket("0.0025"), Some(1.0));
        assert_eq!(bucket("0.005"), Some(3.0));
        assert_eq!(bucket("1"), Some(3.0));
        assert_eq!(bucket("+Inf"), Some(4.0));
        assert_eq!(value(&text, "scalechat_publish_seconds_count"), Some(4.0));
        let sum = value(&text, "scalechat_publish_seconds_sum").unwrap();
        assert!((sum - 2.0062).abs() < 1e-9, "{sum}");
    }
}
