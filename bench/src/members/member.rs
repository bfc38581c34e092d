//! One member connection of a `room-worker`: opens it (timing the connect to `joined`),
//! then reads every frame, noting each delivery's sequence number among the publisher's (the
//! worker counts losses by them) and counting duplicates, and, if it is one of the sampled
//! members, recording its latency; answers pings; a publishing member also sends on the
//! worker's orders and matches each answer (`ack` or `error`, which come in the order of the
//! sends) to its send, so that a refused send is known by its number.

use std::collections::VecDeque;
use std::io;
use std::net::IpAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use anyhow::Context;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio::sync::{Semaphore, watch};

use super::worker::{Latencies, Phase, Shared};
use super::{MessageId, Refusal};
use crate::track::{encode_send, error_code, now_ns, parse_delivery};
use crate::ws::{self, FrameReader, OP_CLOSE, OP_PING, OP_TEXT, Target};

const OP_PONG: u8 = 0xA;

/// A publishing member's schedule: message k of the current phase is due at
/// `start + (k + offset) / rate`, before the end of the period; `offset` (0 to 1, this
/// publisher's place among all of them) spreads the publishers' sends evenly over time.
pub(super) struct Sender {
    /// The publisher's number in its room (the `B<id>.` of its messages).
    pub(super) id: u32,
    pub(super) room: usize,
    /// Its counter in [`Shared::next_seq`].
    pub(super) slot: usize,
    pub(super) offset: f64,
    /// The next sequence number (over all phases).
    pub(super) seq: u64,
    /// Messages sent in the current phase.
    pub(super) k: u64,
    pub(super) phase: Phase,
    pub(super) orders: watch::Receiver<Phase>,
}

impl Sender {
    /// When the next message is due (CLOCK_REALTIME ns); `None` when none is.
    fn due_ns(&self) -> Option<u64> {
        if self.phase.rate <= 0.0 {
            return None;
        }
        let at = ((self.k as f64 + self.offset) / self.phase.rate * 1e9) as u64;
        (at < self.phase.period_ns).then_some(self.phase.start_ns + at)
    }

    /// Appends the `send` frames due by now to the connection's, each stamped with the time
    /// it is written, and notes that each is owed an answer.
    fn write_due(&mut self, room: &str, conn: &mut Conn, shared: &Shared) {
        let now = now_ns();
        while let Some(due) = self.due_ns()
            && due <= now
        {
            encode_send(&mut conn.out, room, self.id, self.seq, now_ns());
            conn.unanswered.push_back(self.seq);
            self.seq += 1;
            self.k += 1;
            shared.next_seq[self.slot].store(self.seq, Ordering::Release);
        }
    }
}

pub(super) struct Member {
    /// The connection's number in its worker (from the worker's first).
    pub(super) index: usize,
    pub(super) target: Target,
    pub(super) source: IpAddr,
    pub(super) room: String,
    /// Which of the worker's latency histograms this member records into.
    pub(super) shard: usize,
    /// Whether this member records latency (every member counts losses and duplicates).
    pub(super) samples_latency: bool,
    pub(super) sender: Option<Sender>,
    pub(super) shared: Arc<Shared>,
}

impl Member {
    pub(super) async fn run(mut self, gate: Arc<Semaphore>) {
        let mut reader = FrameReader::new(4096);
        let open = async {
            let _permit = gate.acquire().await?;
            let began = Instant::now();
            let joined = async {
                let mut stream = ws::connect(&self.target, self.source, &mut reader).await?;
                ws::wait_joined(&mut stream, &mut reader, Duration::from_secs(60)).await?;
                if self.samples_latency {
                    ws::stamp_arrivals(&stream);
                }
                anyhow::Ok(stream)
            };
            let stream = tokio::time::timeout(Duration::from_secs(90), joined)
                .await
                .context("no joined in 90 s")??;
            let us = began.elapsed().as_micros() as u64;
            let mut connect = self.shared.connect.lock().expect("connect lock");
            connect.saturating_record(us.max(1));
            anyhow::Ok(stream)
        };
        let stream = match open.await {
            Ok(stream) => {
                self.shared.joined.fetch_add(1, Ordering::AcqRel);
                stream
            }
            Err(e) => {
                let mut first = self.shared.first_error.lock().expect("error lock");
                first.get_or_insert_with(|| format!("{}: {e:#}", self.target.path));
                drop(first);
                self.shared.failed.fetch_add(1, Ordering::AcqRel);
                return;
            }
        };
        let mut conn = Conn {
            stream,
            reader,
            out: Vec::new(),
            publisher: self.sender.as_ref().map(|s| (s.room, s.id)),
            unanswered: VecDeque::new(),
        };
        match self.sender.take() {
            Some(sender) => self.publish(&mut conn, sender).await,
            None => while conn.on_read(&self).await && conn.flush().await {},
        }
        self.shared.disconnected.fetch_add(1, Ordering::AcqRel);
    }

    /// Reads, and sends on the orders of the phase, until the connection ends.
    async fn publish(&self, conn: &mut Conn, mut sender: Sender) {
        loop {
            let due = sender.due_ns();
            let wake = tokio::time::Instant::now()
                + Duration::from_nanos(due.unwrap_or(0).saturating_sub(now_ns()));
            let go_on = tokio::select! {
                go_on = conn.on_read(self) => go_on,
                changed = sender.orders.changed() => {
                    if changed.is_err() {
                        break;
                    }
                    sender.phase = *sender.orders.borrow_and_update();
                    sender.k = 0;
                    true
                }
                _ = tokio::time::sleep_until(wake), if due.is_some() => {
                    sender.write_due(&self.room, conn, &self.shared);
                    true
                }
            };
            if !go_on || !conn.flush().await {
                break;
            }
        }
    }
}

/// One member's connection. The sequence numbers it has seen from each publisher of its
/// room are in [`Shared::seqs`], where the worker counts them.
struct Conn {
    stream: TcpStream,
    reader: FrameReader,
    /// Frames to write (pongs, sends).
    out: Vec<u8>,
    /// A publishing member's room and number.
    publisher: Option<(usize, u32)>,
    /// Its sends not answered yet, oldest first (their sequence numbers).
    unanswered: VecDeque<u64>,
}

impl Conn {
    /// Reads once and handles every complete frame; false once the connection is over.
    /// Cancel-safe: the read is [`FrameReader::fill_stamped`], the rest runs without waiting.
    async fn on_read(&mut self, member: &Member) -> bool {
        let read: io::Result<(usize, Option<u64>)> = self.reader.fill_stamped(&self.stream).await;
        let Ok((n, stamp)) = read else {
            return false;
        };
        if n == 0 {
            return false;
        }
        let shared = &*member.shared;
        let now = now_ns();
        let arrived = stamp.unwrap_or(now).min(now);
        let (mut new, mut repeated) = (0u64, 0u64);
        let mut closed = None;
        let mut latencies = None;
        let mut seqs = shared.seqs[member.index].lock().expect("seqs lock");
        let (out, unanswered, publisher) = (&mut self.out, &mut self.unanswered, self.publisher);
        self.reader.parse(|op, payload| match op {
            OP_PING => ws::encode_client_frame(out, OP_PONG, payload),
            OP_CLOSE => closed = Some(ws::close_code(payload)),
            OP_TEXT => {
                if payload.starts_with(b"{\"type\":\"ack\"") {
                    unanswered.pop_front();
                } else if let Some(d) = parse_delivery(payload) {
                    let Some(seen) = seqs.get_mut(d.publisher as usize) else {
                        return;
                    };
                    if seen.see(d.seq) {
                        new += 1;
                    } else {
                        repeated += 1;
                    }
                    if !member.samples_latency {
                        return;
                    }
                    let l: &mut Latencies = latencies.get_or_insert_with(|| {
                        shared.latencies[member.shard].lock().expect("latency lock")
                    });
                    let us = |at: u64| (at.saturating_sub(d.sent_ns) / 1000).max(1);
                    l.latency.saturating_record(us(arrived));
                    l.read.saturating_record(us(now));
                } else if let Some(code) = error_code(payload) {
                    // Every request of the tool is a send: an error answers the oldest one.
                    if let (Some((room, publisher)), Some(seq)) =
                        (publisher, unanswered.pop_front())
                    {
                        let message = MessageId {
                            room,
                            publisher,
                            seq,
                        };
                        let refusal = Refusal {
                            message,
                            code: code.clone(),
                        };
                        shared.refused.lock().expect("refused lock").push(refusal);
                    }
                    *shared
                        .errors
                        .lock()
                        .expect("errors lock")
                        .entry(code)
                        .or_default() += 1;
                }
            }
            _ => {}
        });
        drop(latencies);
        drop(seqs);
        if new + repeated > 0 {
            shared.duplicates.fetch_add(repeated, Ordering::AcqRel);
            shared
                .deliveries
                .fetch_add(new + repeated, Ordering::AcqRel);
            shared.last_delivery_ns.fetch_max(now, Ordering::AcqRel);
        }
        if let Some(code) = closed {
            *shared
                .close_codes
                .lock()
                .expect("close lock")
                .entry(code)
                .or_default() += 1;
            return false;
        }
        true
    }

    /// Writes what is waiting; false when the connection is gone.
    async fn flush(&mut self) -> bool {
        if self.out.is_empty() {
            return true;
        }
        let ok = self.stream.write_all(&self.out).await.is_ok();
        self.out.clear();
        ok
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn publishers_send_their_share_spread_over_the_period() {
        let (_tx, rx) = watch::channel(Phase::default());
        let mut sent_at = Vec::new();
        for offset in [0.0, 0.25, 0.5, 0.75] {
            let mut s = Sender {
                id: 0,
                room: 0,
                slot: 0,
                offset,
                seq: 0,
                k: 0,
                phase: Phase {
                    rate: 2.0,
                    start_ns: 0,
                    period_ns: 3_000_000_000,
                },
                orders: rx.clone(),
            };
            while let Some(due) = s.due_ns() {
                sent_at.push(due);
                s.k += 1;
            }
        }
        sent_at.sort_unstable();
        // 4 publishers at 2 msg/s each for 3 s: 24 messages, one every 125 ms.
        let expected: Vec<u64> = (0..24).map(|i| i * 125_000_000).collect();
        assert_eq!(sent_at, expected);
    }
}
