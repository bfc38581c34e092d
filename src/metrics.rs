//! The node's counters and gauges, and their Prometheus text exposition (format 0.0.4) for
//! `GET /metrics`, written by the `prometheus-client` encoder.
//!
//! Every counter and gauge is one atomic updated with `Relaxed` ordering: an event costs one
//! atomic add, a fan-out adds its recipient count once, and nothing is formatted until a scrape.
//! Labelled series are created once, when [`Metrics`] is built, and kept in arrays indexed like
//! their label lists, so counting one takes no lookup and no lock; they are exposed in that
//! order. The publish latency histogram keeps per-bucket atomics of its own, where the crate's
//! histogram would take a lock on every observation. Values read during one scrape are not a
//! consistent snapshot of each other, which Prometheus does not expect either.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use prometheus_client::encoding::{
    EncodeLabelValue, EncodeMetric, MetricEncoder, NoLabelSet, prometheus_text,
};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::{counter, gauge};
use prometheus_client::registry::Registry;

use crate::protocol::ErrorCode;
use crate::protocol::ws::close_code;

/// `Content-Type` of the exposition.
pub const CONTENT_TYPE: &str = prometheus_text::CONTENT_TYPE;

/// A counter: only goes up.
#[derive(Debug, Clone, Default)]
pub struct Counter(counter::Counter);

impl Counter {
    /// Adds one.
    pub fn inc(&self) {
        self.0.inc();
    }

    /// Adds `n`.
    pub fn add(&self, n: u64) {
        self.0.inc_by(n);
    }

    /// The current value.
    pub fn get(&self) -> u64 {
        self.0.get()
    }
}

/// A gauge: a value that goes up and down.
#[derive(Debug, Clone, Default)]
pub struct Gauge(gauge::Gauge<u64, AtomicU64>);

impl Gauge {
    /// Adds one.
    pub fn inc(&self) {
        self.0.inc();
    }

    /// Subtracts one.
    pub fn dec(&self) {
        self.0.dec();
    }

    /// Sets the value.
    pub fn set(&self, n: u64) {
        self.0.set(n);
    }

    /// The current value.
    pub fn get(&self) -> u64 {
        self.0.get()
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
    /// The client address has too many connections open or connects too fast (429).
    PerIp,
    /// Token authentication is on and the token is missing or invalid (401).
    Unauthorized,
}

impl Refusal {
    const ALL: [Refusal; 6] = [
        Refusal::Origin,
        Refusal::Capacity,
        Refusal::BadRequest,
        Refusal::ShuttingDown,
        Refusal::PerIp,
        Refusal::Unauthorized,
    ];

    fn label(self) -> &'static str {
        match self {
            Refusal::Origin => "origin",
            Refusal::Capacity => "capacity",
            Refusal::BadRequest => "bad_request",
            Refusal::ShuttingDown => "shutting_down",
            Refusal::PerIp => "per_ip",
            Refusal::Unauthorized => "unauthorized",
        }
    }
}

/// Close codes the server sends that are counted.
const CLOSE_CODES: [u16; 7] = [
    close_code::PROTOCOL_ERROR,
    close_code::UNSUPPORTED_DATA,
    close_code::INVALID_DATA,
    close_code::MESSAGE_TOO_BIG,
    close_code::SLOW_CONSUMER,
    close_code::PING_TIMEOUT,
    close_code::GOING_AWAY,
];

/// Upper bounds of the publish latency buckets, in seconds; the last bucket (`+Inf`) is
/// implicit.
const PUBLISH_BUCKETS: [f64; 11] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
];

/// A fixed-bucket latency histogram: per-bucket (not cumulative) counts and the sum in
/// nanoseconds. The count is the buckets' total, so one observation is two atomic adds.
/// Clones share their values.
#[derive(Debug, Clone, Default)]
pub struct Histogram(Arc<HistogramValues>);

#[derive(Debug, Default)]
struct HistogramValues {
    buckets: [AtomicU64; PUBLISH_BUCKETS.len() + 1],
    sum_nanos: AtomicU64,
}

impl Histogram {
    /// Records one duration.
    pub fn observe(&self, took: Duration) {
        let secs = took.as_secs_f64();
        let at = PUBLISH_BUCKETS
            .iter()
            .position(|le| secs <= *le)
            .unwrap_or(PUBLISH_BUCKETS.len());
        self.0.buckets[at].fetch_add(1, Ordering::Relaxed);
        self.0.sum_nanos.fetch_add(
            u64::try_from(took.as_nanos()).unwrap_or(u64::MAX),
            Ordering::Relaxed,
        );
    }
}

impl EncodeMetric for Histogram {
    fn encode(&self, mut encoder: MetricEncoder) -> Result<(), std::fmt::Error> {
        let counts = self.0.buckets.each_ref().map(|b| b.load(Ordering::Relaxed));
        let count = counts.iter().sum();
        // The encoder adds the `+Inf` bucket, valued at `count`.
        let buckets: [(f64, u64); PUBLISH_BUCKETS.len()] =
            std::array::from_fn(|i| (PUBLISH_BUCKETS[i], counts[i]));
        let sum = self.0.sum_nanos.load(Ordering::Relaxed) as f64 / 1e9;
        encoder.encode_histogram::<NoLabelSet>(sum, count, &buckets, None)
    }

    fn metric_type(&self) -> MetricType {
        MetricType::Histogram
    }
}

/// A counter family with one label whose values are fixed: every series exists from the
/// start, is exposed in the order given, and is counted through its own handle.
#[derive(Debug)]
struct Labelled<V: 'static, const N: usize> {
    key: &'static str,
    series: [(V, counter::Counter); N],
}

impl<V, const N: usize> Labelled<V, N> {
    /// The family and a handle on each of its series, in the order of `values`.
    fn new(key: &'static str, values: [V; N]) -> (Self, [Counter; N]) {
        let series = values.map(|value| (value, counter::Counter::default()));
        let handles = std::array::from_fn(|i| Counter(series[i].1.clone()));
        (Self { key, series }, handles)
    }
}

impl<V, const N: usize> EncodeMetric for Labelled<V, N>
where
    V: EncodeLabelValue + Copy + std::fmt::Debug,
{
    fn encode(&self, mut encoder: MetricEncoder) -> Result<(), std::fmt::Error> {
        for (value, count) in &self.series {
            count.encode(encoder.encode_family(&[(self.key, *value)])?)?;
        }
        Ok(())
    }

    fn metric_type(&self) -> MetricType {
        MetricType::Counter
    }
}

/// Everything the node counts, and the registry that encodes it.
#[derive(Debug)]
pub struct Metrics {
    /// Open WebSocket sessions.
    pub connections: Gauge,
    /// Accepted WebSocket upgrades.
    pub connections_total: Counter,
    refused: [Counter; Refusal::ALL.len()],
    /// Rooms with at least one local member.
    pub rooms: Gauge,
    /// `send`s accepted by the transport.
    pub messages_in_total: Counter,
    /// Message frames queued for local members, summed over deliveries.
    pub messages_out_total: Counter,
    /// Bytes the writers wrote to sockets.
    pub bytes_out_total: Counter,
    /// Connections closed because their outbox overflowed.
    pub slow_consumer_disconnects_total: Counter,
    errors: [Counter; ErrorCode::ALL.len()],
    close_codes: [Counter; CLOSE_CODES.len()],
    /// 1 while the transport can deliver across nodes; always 1 for `memory`.
    pub backplane_up: Gauge,
    /// Times the backplane came back after an outage.
    pub backplane_reconnects_total: Counter,
    /// Times the Redis master changed under the node (a Sentinel failover).
    pub backplane_failovers_total: Counter,
    /// Publishes the transport refused or did not answer.
    pub publish_errors_total: Counter,
    /// `send`s whose `ref` had already been accepted: acked again, not delivered twice.
    pub duplicate_sends_total: Counter,
    /// `send`s read from clients and not answered yet, over every connection.
    pub publishes_in_flight: Gauge,
    /// Times the subscriber fell further behind than `redis.subscriber_lag_max_ms` and
    /// dropped its connection.
    pub backplane_lag_cuts_total: Counter,
    /// Gaps in a room's ids seen on the backplane (a lost message or subscription).
    pub backplane_gaps_total: Counter,
    /// Gaps filled completely from the room's history.
    pub backplane_gaps_healed_total: Counter,
    /// Messages delivered from history to fill gaps.
    pub backplane_messages_healed_total: Counter,
    /// Presence events (`member_joined`, `member_left` frames) queued for members.
    pub presence_events_total: Counter,
    /// Writes of this node's presence share to Redis (one per room per batch).
    pub presence_writes_total: Counter,
    /// Presence writes, renewals or removals Redis refused or did not answer (retried).
    pub presence_errors_total: Counter,
    /// Nodes whose members this node removed from presence after they stopped renewing.
    pub presence_nodes_removed_total: Counter,
    /// Socket.IO requests relayed to the node that owns their session.
    pub socketio_relayed_total: Counter,
    /// Events queued for webhook endpoints (once per endpoint that wants them).
    pub webhook_events_queued_total: Counter,
    /// Events a webhook endpoint accepted (answered 2xx).
    pub webhook_events_sent_total: Counter,
    /// Webhook requests that failed (error, timeout, non-2xx answer) and are retried.
    pub webhook_requests_failed_total: Counter,
    /// Webhook events dropped: queue full, or every attempt at their batch failed.
    pub webhook_events_dropped_total: Counter,
    /// Transport publish latency.
    pub publish_seconds: Histogram,
    /// The PostgreSQL archive.
    pub archive: ArchiveMetrics,
    registry: Registry,
}

/// What the PostgreSQL archive counts (`scalechat_archive_*`).
#[derive(Debug, Default)]
pub struct ArchiveMetrics {
    /// 1 while PostgreSQL answers the archive; 0 while it does not, or the archive is off.
    pub up: Gauge,
    /// Messages waiting to be archived or being written.
    pub queue_messages: Gauge,
    /// Their bytes.
    pub queue_bytes: Gauge,
    /// Milliseconds since the oldest message not yet archived was accepted; 0 when none waits.
    pub lag_ms: Gauge,
    /// Batches committed.
    pub batches_total: Counter,
    /// Messages in the last batch committed.
    pub last_batch_messages: Gauge,
    /// Rows inserted.
    pub messages_written_total: Counter,
    /// Messages written again that were already archived (retries, catch-up, other nodes).
    pub duplicates_total: Counter,
    /// Batch writes that failed (each is retried).
    pub write_errors_total: Counter,
    /// Messages not queued because the queue was full.
    pub dropped_total: Counter,
    /// Messages lost to the archive: the room's history no longer held them at catch-up.
    pub missed_total: Counter,
    /// Rows deleted by retention.
    pub deleted_total: Counter,
}

impl ArchiveMetrics {
    fn register(&self, registry: &mut Registry) {
        let gauges = [
            (
                "archive_up",
                "1 while PostgreSQL answers the archive",
                &self.up,
            ),
            (
                "archive_queue_messages",
                "Messages waiting to be archived or being written",
                &self.queue_messages,
            ),
            (
                "archive_queue_bytes",
                "Bytes of messages waiting to be archived or being written",
                &self.queue_bytes,
            ),
            (
                "archive_lag_milliseconds",
                "Age of the oldest message not yet archived",
                &self.lag_ms,
            ),
            (
                "archive_last_batch_messages",
                "Messages in the last batch written",
                &self.last_batch_messages,
            ),
        ];
        for (name, help, gauge) in gauges {
            registry.register(name, help, gauge.0.clone());
        }
        let counters = [
            (
                "archive_batches",
                "Archive batches committed",
                &self.batches_total,
            ),
            (
                "archive_messages_written",
                "Messages inserted into the archive",
                &self.messages_written_total,
            ),
            (
                "archive_duplicates",
                "Messages written again that the archive already held",
                &self.duplicates_total,
            ),
            (
                "archive_write_errors",
                "Archive batch writes that failed and were retried",
                &self.write_errors_total,
            ),
            (
                "archive_dropped",
                "Messages not queued for the archive because its queue was full",
                &self.dropped_total,
            ),
            (
                "archive_missed",
                "Messages lost to the archive: the room's history no longer held them",
                &self.missed_total,
            ),
            (
                "archive_deleted",
                "Archived messages deleted by retention",
                &self.deleted_total,
            ),
        ];
        for (name, help, counter) in counters {
            registry.register(name, help, counter.0.clone());
        }
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// Every metric at zero, registered for the exposition; labelled series are all present.
    pub fn new() -> Self {
        let (refusals, refused) = Labelled::new("reason", Refusal::ALL.map(Refusal::label));
        let (errors, error_counts) = Labelled::new("code", ErrorCode::ALL.map(ErrorCode::as_str));
        let (closes, close_counts) = Labelled::new("code", CLOSE_CODES);
        let mut metrics = Self {
            connections: Gauge::default(),
            connections_total: Counter::default(),
            refused,
            rooms: Gauge::default(),
            messages_in_total: Counter::default(),
            messages_out_total: Counter::default(),
            bytes_out_total: Counter::default(),
            slow_consumer_disconnects_total: Counter::default(),
            errors: error_counts,
            close_codes: close_counts,
            backplane_up: Gauge::default(),
            backplane_reconnects_total: Counter::default(),
            backplane_failovers_total: Counter::default(),
            publish_errors_total: Counter::default(),
            duplicate_sends_total: Counter::default(),
            publishes_in_flight: Gauge::default(),
            backplane_lag_cuts_total: Counter::default(),
            backplane_gaps_total: Counter::default(),
            backplane_gaps_healed_total: Counter::default(),
            backplane_messages_healed_total: Counter::default(),
            presence_events_total: Counter::default(),
            presence_writes_total: Counter::default(),
            presence_errors_total: Counter::default(),
            presence_nodes_removed_total: Counter::default(),
            socketio_relayed_total: Counter::default(),
            webhook_events_queued_total: Counter::default(),
            webhook_events_sent_total: Counter::default(),
            webhook_requests_failed_total: Counter::default(),
            webhook_events_dropped_total: Counter::default(),
            publish_seconds: Histogram::default(),
            archive: ArchiveMetrics::default(),
            registry: Registry::with_prefix("scalechat"),
        };
        // Counters are registered without `_total`, which the encoder appends. The encoder
        // ends every HELP text with a full stop.
        let registry = &mut metrics.registry;
        registry.register(
            "connections",
            "Open WebSocket sessions",
            metrics.connections.0.clone(),
        );
        registry.register(
            "connections",
            "Accepted WebSocket upgrades",
            metrics.connections_total.0.clone(),
        );
        registry.register(
            "rooms",
            "Rooms with at least one local member",
            metrics.rooms.0.clone(),
        );
        registry.register(
            "messages_in",
            "Chat messages accepted from local clients",
            metrics.messages_in_total.0.clone(),
        );
        registry.register(
            "messages_out",
            "Chat message frames queued for local members",
            metrics.messages_out_total.0.clone(),
        );
        registry.register(
            "bytes_out",
            "Bytes written to WebSocket connections",
            metrics.bytes_out_total.0.clone(),
        );
        registry.register(
            "connections_refused",
            "Refused WebSocket upgrade requests",
            refusals,
        );
        registry.register(
            "slow_consumer_disconnects",
            "Connections closed as slow consumers (4001)",
            metrics.slow_consumer_disconnects_total.0.clone(),
        );
        registry.register("errors", "Error frames sent to clients", errors);
        registry.register("close_codes", "Close frames sent, by code", closes);
        registry.register(
            "backplane_up",
            "1 when the transport is connected (always 1 for memory)",
            metrics.backplane_up.0.clone(),
        );
        registry.register(
            "backplane_reconnects",
            "Backplane reconnections after an outage",
            metrics.backplane_reconnects_total.0.clone(),
        );
        registry.register(
            "backplane_failovers",
            "Times the Redis master changed under the node (Sentinel failover)",
            metrics.backplane_failovers_total.0.clone(),
        );
        registry.register(
            "publish_errors",
            "Messages the transport refused or did not confirm in time",
            metrics.publish_errors_total.0.clone(),
        );
        registry.register(
            "duplicate_sends",
            "Sends repeating an accepted ref: acked again, not delivered twice",
            metrics.duplicate_sends_total.0.clone(),
        );
        registry.register(
            "publishes_in_flight",
            "Sends read from clients and not answered yet",
            metrics.publishes_in_flight.0.clone(),
        );
        registry.register(
            "backplane_lag_cuts",
            "Times the subscriber fell further behind than redis.subscriber_lag_max_ms and \
             dropped its connection",
            metrics.backplane_lag_cuts_total.0.clone(),
        );
        registry.register(
            "backplane_gaps",
            "Gaps in a room's message ids seen on the backplane",
            metrics.backplane_gaps_total.0.clone(),
        );
        registry.register(
            "backplane_gaps_healed",
            "Backplane gaps filled completely from the room's history",
            metrics.backplane_gaps_healed_total.0.clone(),
        );
        registry.register(
            "backplane_messages_healed",
            "Messages delivered from history to fill backplane gaps",
            metrics.backplane_messages_healed_total.0.clone(),
        );
        registry.register(
            "presence_events",
            "Presence event frames (member_joined, member_left) queued for members",
            metrics.presence_events_total.0.clone(),
        );
        registry.register(
            "presence_writes",
            "Writes of this node's share of a room's presence to Redis",
            metrics.presence_writes_total.0.clone(),
        );
        registry.register(
            "presence_errors",
            "Presence writes, renewals and removals that failed and are retried",
            metrics.presence_errors_total.0.clone(),
        );
        registry.register(
            "presence_nodes_removed",
            "Stopped nodes whose members this node removed from presence",
            metrics.presence_nodes_removed_total.0.clone(),
        );
        registry.register(
            "socketio_relayed",
            "Socket.IO requests relayed to the node that owns their session",
            metrics.socketio_relayed_total.0.clone(),
        );
        registry.register(
            "webhook_events_queued",
            "Events queued for webhook endpoints, once per endpoint",
            metrics.webhook_events_queued_total.0.clone(),
        );
        registry.register(
            "webhook_events_sent",
            "Events webhook endpoints accepted with a 2xx answer",
            metrics.webhook_events_sent_total.0.clone(),
        );
        registry.register(
            "webhook_requests_failed",
            "Webhook requests that failed (error, timeout, non-2xx) and are retried",
            metrics.webhook_requests_failed_total.0.clone(),
        );
        registry.register(
            "webhook_events_dropped",
            "Webhook events dropped: queue full, or every attempt at their batch failed",
            metrics.webhook_events_dropped_total.0.clone(),
        );
        registry.register(
            "publish_seconds",
            "Transport publish latency in seconds",
            metrics.publish_seconds.clone(),
        );
        metrics.archive.register(registry);
        metrics
    }

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
        prometheus_text::encode(&mut out, &self.registry).expect("a String takes any text");
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
                assert_eq!(kind == "counter", name.ends_with("_total"), "{line}");
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
        // 30, and the archive's 12.
        assert_eq!(families.len(), 42, "{families:?}");
        assert!(text.ends_with('\n'));
        assert!(!text.contains("# EOF"), "0.0.4 text has no EOF marker");
        for line in text.lines().filter(|l| l.starts_with("# HELP ")) {
            assert!(line.ends_with('.') && !line.ends_with(".."), "{line}");
        }
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
