//! What the fan-out scenarios put in a message and what a receiver keeps: the message text
//! carries the publisher, its sequence number and the send time (`B<pub>.<seq>.<ns>`), found in
//! a delivery with one byte search; each receiver counts losses and duplicates per publisher
//! and records the latency in a histogram.

use std::collections::HashMap;

use std::sync::LazyLock;

use hdrhistogram::Histogram;
use memchr::memmem::Finder;

/// Wall-clock time in nanoseconds (CLOCK_REALTIME): the clock of the kernel's arrival stamps,
/// the same in every process of the machine.
pub fn now_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec.
    unsafe { libc::clock_gettime(libc::CLOCK_REALTIME, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// A latency histogram in microseconds, 1 µs to 60 s, 2 significant digits (1 % precision).
pub fn histogram() -> Histogram<u64> {
    // The bounds are constants that hdrhistogram accepts.
    Histogram::new_with_bounds(1, 60_000_000, 2).expect("valid histogram bounds")
}

/// Appends the masked `send` frame for message `seq` of publisher `publisher` to `out`.
pub fn encode_send(out: &mut Vec<u8>, room: &str, publisher: u32, seq: u64, sent_ns: u64) {
    let mut text = Vec::with_capacity(96);
    text.extend_from_slice(b"{\"type\":\"send\",\"room\":\"");
    text.extend_from_slice(room.as_bytes());
    text.extend_from_slice(b"\",\"message\":\"");
    push_marker(&mut text, publisher, seq, sent_ns);
    text.extend_from_slice(b"\"}");
    crate::ws::encode_client_frame(out, crate::ws::OP_TEXT, &text);
}

/// Appends the message text `B<publisher>.<seq>.<sent_ns>`.
pub fn push_marker(out: &mut Vec<u8>, publisher: u32, seq: u64, sent_ns: u64) {
    let mut b = itoa::Buffer::new();
    out.push(b'B');
    out.extend_from_slice(b.format(publisher).as_bytes());
    out.push(b'.');
    out.extend_from_slice(b.format(seq).as_bytes());
    out.push(b'.');
    out.extend_from_slice(b.format(sent_ns).as_bytes());
}

/// One delivery found in a `message` frame.
#[derive(Debug, PartialEq)]
pub struct Delivery {
    pub publisher: u32,
    pub seq: u64,
    pub sent_ns: u64,
}

/// Finds the marker in a server text frame; `None` for frames other than bench messages.
pub fn parse_delivery(payload: &[u8]) -> Option<Delivery> {
    if !payload.starts_with(b"{\"type\":\"message\"") {
        return None;
    }
    static MARKER: LazyLock<Finder<'static>> = LazyLock::new(|| Finder::new(b"\"message\":\"B"));
    let at = MARKER.find(payload)? + 12;
    parse_marker(&payload[at..])
}

/// The marker's fields at the start of `text` (past its `B`): `<publisher>.<seq>.<sent_ns>`,
/// ended by any byte that is not a digit (a quote in a native frame, a backslash in a
/// Socket.IO event).
pub fn parse_marker(text: &[u8]) -> Option<Delivery> {
    let mut fields = text.splitn(4, |b| !b.is_ascii_digit());
    let publisher = number(fields.next()?)?;
    let seq = number(fields.next()?)?;
    let sent_ns = number(fields.next()?)?;
    Some(Delivery {
        publisher: publisher as u32,
        seq,
        sent_ns,
    })
}

fn number(digits: &[u8]) -> Option<u64> {
    if digits.is_empty() {
        return None;
    }
    digits.iter().try_fold(0u64, |n, &d| {
        d.is_ascii_digit()
            .then(|| n.wrapping_mul(10).wrapping_add(u64::from(d - b'0')))
    })
}

/// The `code` of an `error` frame, if `payload` is one.
pub fn error_code(payload: &[u8]) -> Option<String> {
    if !payload.starts_with(b"{\"type\":\"error\"") {
        return None;
    }
    let at = memchr::memmem::find(payload, b"\"code\":\"")? + 8;
    let len = memchr::memchr(b'"', &payload[at..])?;
    Some(String::from_utf8_lossy(&payload[at..at + len]).into_owned())
}

/// Sequence numbers seen from one publisher: everything below `next` arrived except `missing`.
#[derive(Default, Clone)]
pub struct Seqs {
    next: u64,
    missing: std::collections::BTreeSet<u64>,
    duplicates: u64,
}

impl Seqs {
    /// Counts message `seq`; whether it is the first time it arrived.
    pub fn see(&mut self, seq: u64) -> bool {
        if seq >= self.next {
            self.missing.extend(self.next..seq);
            self.next = seq + 1;
            true
        } else if self.missing.remove(&seq) {
            true
        } else {
            self.duplicates += 1;
            false
        }
    }

    fn unique(&self) -> u64 {
        self.next - self.missing.len() as u64
    }

    /// How many of the messages `start..end` arrived.
    pub fn seen_in(&self, start: u64, end: u64) -> u64 {
        let below = self.next.clamp(start, end.max(start));
        let gaps = self.missing.range(start..below).count() as u64;
        below - start - gaps
    }

    /// The messages of `start..end` that have not arrived, in order.
    pub fn missing_in(&self, start: u64, end: u64) -> impl Iterator<Item = u64> + '_ {
        let below = self.next.clamp(start, end.max(start));
        self.missing
            .range(start..below)
            .copied()
            .chain(below..end.max(start))
    }
}

/// Everything one receiving connection saw.
pub struct Receiver {
    seqs: Vec<Seqs>,
    /// Node index of each publisher, to tell cross-node deliveries apart.
    publisher_nodes: Vec<usize>,
    node: usize,
    /// Send to arrival in the receiver's socket (the kernel's stamp).
    pub latency: Histogram<u64>,
    /// The same, for deliveries from a publisher on another node.
    pub cross_latency: Histogram<u64>,
    /// Send to the moment the generator read it: includes the generator's own delay.
    pub read_latency: Histogram<u64>,
    pub deliveries: u64,
    pub last_delivery_ns: u64,
    pub errors: HashMap<String, u64>,
    pub close_code: Option<u16>,
    pub disconnected: bool,
}

impl Receiver {
    /// A receiver on node `node`; `publisher_nodes[p]` is publisher `p`'s node.
    pub fn new(node: usize, publisher_nodes: Vec<usize>) -> Self {
        Self {
            seqs: vec![Seqs::default(); publisher_nodes.len()],
            publisher_nodes,
            node,
            latency: histogram(),
            cross_latency: histogram(),
            read_latency: histogram(),
            deliveries: 0,
            last_delivery_ns: 0,
            errors: HashMap::new(),
            close_code: None,
            disconnected: false,
        }
    }

    /// Handles one server frame read at `now` that reached the socket at `arrived`.
    pub fn frame(&mut self, op: u8, payload: &[u8], now: u64, arrived: u64) {
        if op == crate::ws::OP_CLOSE {
            self.close_code = Some(crate::ws::close_code(payload));
            return;
        }
        if op != crate::ws::OP_TEXT {
            return;
        }
        if let Some(d) = parse_delivery(payload) {
            self.delivered(&d, now, arrived);
        } else if let Some(code) = error_code(payload) {
            self.error(code);
        }
    }

    /// Counts delivery `d`, read at `now`, which reached the socket at `arrived`.
    pub fn delivered(&mut self, d: &Delivery, now: u64, arrived: u64) {
        let Some(seqs) = self.seqs.get_mut(d.publisher as usize) else {
            return;
        };
        seqs.see(d.seq);
        self.deliveries += 1;
        self.last_delivery_ns = now;
        let read_us = now.saturating_sub(d.sent_ns) / 1000;
        self.read_latency.saturating_record(read_us.max(1));
        let us = arrived.saturating_sub(d.sent_ns) / 1000;
        self.latency.saturating_record(us.max(1));
        if self.publisher_nodes[d.publisher as usize] != self.node {
            self.cross_latency.saturating_record(us.max(1));
        }
    }

    /// Counts an error the server reported, by its code.
    pub fn error(&mut self, code: String) {
        *self.errors.entry(code).or_default() += 1;
    }

    /// Unique messages received from each publisher so far.
    pub fn unique(&self) -> impl Iterator<Item = u64> + '_ {
        self.seqs.iter().map(Seqs::unique)
    }

    /// Repeated deliveries so far.
    pub fn duplicates(&self) -> u64 {
        self.seqs.iter().map(|s| s.duplicates).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_marker_in_a_message_frame() {
        let mut text = b"{\"type\":\"message\",\"room\":\"bench\",\"id\":7,\"user\":\"p1\",\"ts\":1,\"message\":\"".to_vec();
        push_marker(&mut text, 3, 42, 123456789);
        text.extend_from_slice(b"\"}");
        let d = parse_delivery(&text).unwrap();
        assert_eq!(
            d,
            Delivery {
                publisher: 3,
                seq: 42,
                sent_ns: 123456789
            }
        );
        assert_eq!(parse_delivery(b"{\"type\":\"ack\",\"id\":1}"), None);
    }

    #[test]
    fn counts_gaps_late_arrivals_and_duplicates() {
        let mut s = Seqs::default();
        for seq in [0, 1, 3, 2, 2, 5] {
            s.see(seq);
        }
        assert_eq!(s.unique(), 5);
        assert_eq!(s.duplicates, 1);
        assert_eq!(s.missing.len(), 1);
    }

    #[test]
    fn counts_what_arrived_of_a_range_of_messages() {
        let mut s = Seqs::default();
        for seq in [0, 1, 3, 5, 6] {
            s.see(seq);
        }
        // Seen 0, 1, 3, 5, 6; missing 2 and 4; nothing from 7 on yet.
        assert_eq!(s.seen_in(0, 7), 5);
        assert_eq!(s.seen_in(2, 5), 1);
        assert_eq!(s.seen_in(5, 10), 2);
        assert_eq!(s.seen_in(8, 10), 0);
        assert_eq!(s.seen_in(4, 4), 0);
        assert_eq!(s.missing_in(0, 9).collect::<Vec<_>>(), [2, 4, 7, 8]);
        assert_eq!(s.missing_in(3, 4).count(), 0);
        assert_eq!(s.missing_in(9, 9).count(), 0);
    }

    #[test]
    fn reads_error_codes() {
        let code = error_code(br#"{"type":"error","code":"rate_limited","message":"x"}"#);
        assert_eq!(code.as_deref(), Some("rate_limited"));
    }
}
