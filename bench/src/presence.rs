//! The presence group: what knowing who is in a room costs, on two nodes sharing a Redis.
//! Connection churn with `redis.presence` on and off in alternation; a join storm into a big
//! room whose members asked for presence events (see `storm`); and `presence` pages of a big
//! room, one page at a time and the whole room page by page. Also the few bytes of the
//! presence frames the scenarios read.

use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use hdrhistogram::Histogram;
use memchr::memmem;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

use crate::cluster::{Cluster, CpuSample, ServerOpts, Setup};
use crate::idle::{HoldSpec, Holders};
use crate::report::{Table, count, ms, percentiles};
use crate::suite::Plan;
use crate::track::{histogram, now_ns};
use crate::ws::{self, FrameReader, OP_CLOSE, OP_PING, OP_TEXT, Target};
use crate::{churn, storm};

const OP_PONG: u8 = 0xA;

/// The nodes' extra environment: `redis.presence` on or off, and the request rate limits
/// raised so that 100 `presence` requests in a row are not refused.
pub fn node_env(presence: bool) -> [(&'static str, &'static str); 3] {
    [
        (
            "SCALECHAT_REDIS__PRESENCE",
            if presence { "true" } else { "false" },
        ),
        ("SCALECHAT_LIMITS__REQUESTS_PER_SECOND", "1000000"),
        ("SCALECHAT_LIMITS__REQUEST_BURST", "1000000"),
    ]
}

/// Runs the group; its Markdown tables.
pub async fn run(plan: &Plan, opts: &ServerOpts) -> anyhow::Result<String> {
    if !opts.urls.is_empty() {
        return Ok("Presence: skipped (it starts its own servers; drop --url).\n\n".into());
    }
    let mut out = churn_on_off(plan, opts).await?;
    if plan.storm_members > 0 {
        out.push_str(&storm::run(plan, opts).await?);
    }
    if plan.page_members > 0 {
        out.push_str(&pages(plan, opts).await?);
    }
    Ok(out)
}

/// Churn on two nodes on Redis, `redis.presence` on, off, on, off…: each run and the ratio
/// of connects per second with it on to off.
async fn churn_on_off(plan: &Plan, opts: &ServerOpts) -> anyhow::Result<String> {
    let mut table = Table::new(
        &format!(
            "Presence churn: {} parallel connect → joined → close loops, {} s, redis 2 nodes, \
             redis.presence on and off in turn",
            plan.churn_workers, plan.churn_secs
        ),
        &[
            "run",
            "redis.presence",
            "connections",
            "connects/s",
            "on ÷ off",
            "101 p50 / p99 / max ms",
            "joined p50 / p99 / max ms",
            "failed",
            "server CPU %",
            "redis CPU %",
            "generator CPU %",
            "first error",
        ],
    );
    let (mut on, mut off) = (Vec::new(), Vec::new());
    for run in 0..plan.presence_rounds.max(1) * 2 {
        let presence = run % 2 == 0;
        eprintln!("presence churn, redis.presence={presence}");
        let cluster = Cluster::start_with_env(Setup::Redis2, opts, &node_env(presence)).await?;
        let redis = cluster.redis_pids();
        let redis_cpu = CpuSample::take(&redis);
        let c = churn::run(
            &cluster,
            plan.churn_workers,
            plan.churn_secs,
            plan.sources * 4,
        )
        .await;
        let redis_cpu = redis_cpu.percent_since(&redis);
        let vs = if presence {
            on.push(c.per_sec);
            "-".to_owned()
        } else {
            off.push(c.per_sec);
            on_off_ratio(&on[on.len().saturating_sub(1)..], &[c.per_sec])
                .map_or("-".into(), |r| format!("{r:.2}"))
        };
        let three = |h: &Histogram<u64>| {
            let [p50, p99, _, max] = percentiles(h);
            format!("{p50} / {p99} / {max}")
        };
        table.push(vec![
            (run + 1).to_string(),
            if presence { "on" } else { "off" }.into(),
            count(c.completed as f64),
            count(c.per_sec),
            vs,
            three(&c.upgrade),
            three(&c.joined),
            c.failed.to_string(),
            format!("{:.0}", c.server_cpu),
            format!("{redis_cpu:.0}"),
            format!("{:.0}", c.generator_cpu),
            c.first_error.clone().unwrap_or_else(|| "-".into()),
        ]);
        drop(cluster);
        // Let the connections' TIME_WAIT and the servers' exits settle before the next one.
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let summary = on_off_ratio(&on, &off).map_or("-".into(), |r| format!("{r:.2}"));
    Ok(format!(
        "{}\nConnects/s with presence on ÷ off (means over the runs): {summary}\n\n",
        table.markdown()
    ))
}

/// The mean of `on` divided by the mean of `off`; `None` when either is empty or `off` is 0.
pub fn on_off_ratio(on: &[f64], off: &[f64]) -> Option<f64> {
    let mean = |v: &[f64]| (!v.is_empty()).then(|| v.iter().sum::<f64>() / v.len() as f64);
    let (on, off) = (mean(on)?, mean(off)?);
    (off > 0.0).then(|| on / off)
}

/// `presence` pages of a room of `page_members` members, on two nodes on Redis and on one
/// node on the embedded transport.
async fn pages(plan: &Plan, opts: &ServerOpts) -> anyhow::Result<String> {
    let mut table = Table::new(
        &format!(
            "Presence pages: {} requests for the first page (limit {}) of a room of {} members, \
             then the whole room page by page",
            plan.page_requests,
            plan.page_limit,
            count(plan.page_members as f64)
        ),
        &[
            "setup",
            "members",
            "online",
            "page p50 ms",
            "page p99 ms",
            "page max ms",
            "members per page",
            "whole room: pages",
            "listed",
            "ms",
            "per page p50 / p99 ms",
            "server reports",
        ],
    );
    for setup in [Setup::Redis2, Setup::Memory] {
        eprintln!("presence pages on {setup}");
        let cluster = Cluster::start_with_env(setup, opts, &node_env(true)).await?;
        let spec = HoldSpec {
            conns: plan.page_members.saturating_sub(1),
            per_process: plan.per_process,
            sources: plan.sources,
            room: "page".into(),
            name: "p".into(),
            presence: false,
        };
        let holders = Holders::spawn(&cluster, &spec).await?;
        let members = holders.joined + 1;
        let mut asker = Asker::connect(&cluster, plan.sources).await?;
        let first = asker.page(plan.page_limit, None).await?; // warm-up, not timed
        let online = json_number(&first.1, "online").unwrap_or(0);
        let mut single = histogram();
        let mut per_page = 0;
        for _ in 0..plan.page_requests {
            let (us, reply) = asker.page(plan.page_limit, None).await?;
            single.saturating_record(us.max(1));
            per_page = count_users(&reply);
        }
        let whole = asker.whole_room(plan.page_limit).await?;
        let trouble = cluster.trouble().await;
        let [p50, p99, _, max] = percentiles(&single);
        let [w50, w99, _, _] = percentiles(&whole.per_page);
        table.push(vec![
            setup.to_string(),
            count(members as f64),
            count(online as f64),
            p50,
            p99,
            max,
            per_page.to_string(),
            whole.pages.to_string(),
            count(whole.listed as f64),
            ms(whole.total_us),
            format!("{w50} / {w99}"),
            if trouble.is_empty() {
                "-".into()
            } else {
                trouble
            },
        ]);
        drop(asker);
        holders.release().await;
        drop(cluster);
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    Ok(table.markdown() + "\n")
}

/// The whole room listed page by page.
struct Whole {
    pages: usize,
    listed: usize,
    total_us: u64,
    per_page: Histogram<u64>,
}

/// One member of the room that asks for pages.
struct Asker {
    stream: TcpStream,
    reader: FrameReader,
}

impl Asker {
    async fn connect(cluster: &Cluster, sources: usize) -> anyhow::Result<Asker> {
        let target = Target {
            addr: cluster.nodes[0].addr,
            path: "/ws?room=page&name=asker".into(),
        };
        let mut reader = FrameReader::new(64 * 1024);
        let mut stream = ws::connect(&target, ws::source_addr(sources, sources + 1), &mut reader)
            .await
            .context("asker")?;
        ws::wait_joined(&mut stream, &mut reader, Duration::from_secs(30)).await?;
        Ok(Asker { stream, reader })
    }

    /// Asks for one page; the microseconds to its reply, and the reply.
    async fn page(&mut self, limit: usize, cursor: Option<&str>) -> anyhow::Result<(u64, Vec<u8>)> {
        let mut out = Vec::new();
        ws::encode_client_frame(&mut out, OP_TEXT, &page_request("page", limit, cursor));
        let t0 = now_ns();
        self.stream.write_all(&out).await?;
        let reply = tokio::time::timeout(Duration::from_secs(30), self.reply())
            .await
            .context("no presence reply within 30 s")??;
        Ok(((now_ns() - t0) / 1000, reply))
    }

    /// Reads until the `presence` reply, answering pings on the way.
    async fn reply(&mut self) -> anyhow::Result<Vec<u8>> {
        loop {
            let (mut reply, mut pongs, mut closed) = (None, Vec::new(), false);
            self.reader.parse(|op, payload| match op {
                OP_TEXT if frame_type(payload, b"presence") || frame_type(payload, b"error") => {
                    reply = Some(payload.to_vec());
                }
                OP_PING => ws::encode_client_frame(&mut pongs, OP_PONG, payload),
                OP_CLOSE => closed = true,
                _ => {}
            });
            if !pongs.is_empty() {
                self.stream.write_all(&pongs).await?;
            }
            match reply {
                Some(r) if frame_type(&r, b"error") => {
                    bail!("presence refused: {}", String::from_utf8_lossy(&r))
                }
                Some(r) => return Ok(r),
                None if closed => bail!("closed while waiting for a presence reply"),
                None => {}
            }
            if self.reader.fill(&mut self.stream).await? == 0 {
                bail!("connection closed while waiting for a presence reply");
            }
        }
    }

    /// Lists the whole room, following each page's cursor to the end.
    async fn whole_room(&mut self, limit: usize) -> anyhow::Result<Whole> {
        let mut whole = Whole {
            pages: 0,
            listed: 0,
            total_us: 0,
            per_page: histogram(),
        };
        let started = Instant::now();
        let mut cursor: Option<String> = None;
        loop {
            let (us, reply) = self.page(limit, cursor.as_deref()).await?;
            whole.per_page.saturating_record(us.max(1));
            whole.pages += 1;
            whole.listed += count_users(&reply);
            match page_cursor(&reply).context("presence reply without a cursor")? {
                Some(next) => cursor = Some(String::from_utf8_lossy(next).into_owned()),
                None => break,
            }
            if whole.pages > 1_000_000 {
                bail!("more than a million pages: the cursor does not end");
            }
        }
        whole.total_us = started.elapsed().as_micros() as u64;
        Ok(whole)
    }
}

/// The `presence` request for a page of `room`; `cursor` as the server sent it (JSON string
/// contents, put back as they are).
pub fn page_request(room: &str, limit: usize, cursor: Option<&str>) -> Vec<u8> {
    match cursor {
        Some(c) => {
            format!(r#"{{"type":"presence","room":"{room}","limit":{limit},"cursor":"{c}"}}"#)
        }
        None => format!(r#"{{"type":"presence","room":"{room}","limit":{limit}}}"#),
    }
    .into_bytes()
}

/// Whether a server frame is of type `kind`. The server's JSON keys come in any order, and a
/// string value cannot hold `"type":"…"` unescaped, so a search is exact.
pub fn frame_type(payload: &[u8], kind: &[u8]) -> bool {
    let mut needle = Vec::with_capacity(kind.len() + 10);
    needle.extend_from_slice(b"\"type\":\"");
    needle.extend_from_slice(kind);
    needle.push(b'"');
    memmem::find(payload, &needle).is_some()
}

/// How many members a `presence` page or a `member_joined` / `member_left` frame lists.
pub fn count_users(payload: &[u8]) -> usize {
    memmem::find_iter(payload, b"\"user\":").count()
}

/// The number in `"<key>":<digits>`, if the frame has it.
pub fn json_number(payload: &[u8], key: &str) -> Option<u64> {
    let needle = format!("\"{key}\":");
    let at = memmem::find(payload, needle.as_bytes())? + needle.len();
    let digits = &payload[at..];
    let end = digits
        .iter()
        .position(|b| !b.is_ascii_digit())
        .unwrap_or(digits.len());
    std::str::from_utf8(&digits[..end]).ok()?.parse().ok()
}

/// A `presence` page's cursor: `Some(None)` on the last page (`null`), `Some(Some(raw))` with
/// the string's contents as sent (escapes kept), `None` when the frame has none.
pub fn page_cursor(payload: &[u8]) -> Option<Option<&[u8]>> {
    let at = memmem::find(payload, b"\"cursor\":")? + 9;
    let rest = &payload[at..];
    if rest.starts_with(b"null") {
        return Some(None);
    }
    let body = rest.strip_prefix(b"\"")?;
    let mut i = 0;
    while i < body.len() {
        match body[i] {
            b'\\' => i += 2,
            b'"' => return Some(Some(&body[..i])),
            _ => i += 1,
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ratio_of_means() {
        assert_eq!(on_off_ratio(&[90.0, 110.0], &[200.0, 200.0]), Some(0.5));
        assert_eq!(on_off_ratio(&[], &[1.0]), None);
        assert_eq!(on_off_ratio(&[1.0], &[0.0]), None);
    }

    #[test]
    fn reads_a_presence_page() {
        let page = br#"{"cursor":"17","members":[{"connections":1,"since":5,"user":"a"},{"connections":2,"since":6,"user":"b\"c"}],"online":3,"room":"dev","type":"presence"}"#;
        assert!(frame_type(page, b"presence"));
        assert!(!frame_type(page, b"error"));
        assert_eq!(count_users(page), 2);
        assert_eq!(json_number(page, "online"), Some(3));
        assert_eq!(page_cursor(page), Some(Some(&b"17"[..])));
        let last = br#"{"type":"presence","room":"dev","online":0,"members":[],"cursor":null}"#;
        assert_eq!(page_cursor(last), Some(None));
        assert_eq!(count_users(last), 0);
        let escaped = br#"{"cursor":"a\"b","type":"presence"}"#;
        assert_eq!(page_cursor(escaped), Some(Some(&br#"a\"b"#[..])));
        assert_eq!(page_cursor(br#"{"cursor":"open"#), None);
        assert_eq!(page_cursor(b"{}"), None);
    }

    #[test]
    fn a_user_named_like_a_type_is_not_a_type() {
        let frame = br#"{"members":[{"user":"\"type\":\"presence\""}],"type":"member_joined"}"#;
        assert!(frame_type(frame, b"member_joined"));
        assert!(!frame_type(frame, b"presence"));
    }

    #[test]
    fn page_requests_carry_the_cursor_back() {
        assert_eq!(
            page_request("dev", 100, None),
            br#"{"type":"presence","room":"dev","limit":100}"#
        );
        assert_eq!(
            page_request("dev", 5, Some(r#"a\"b"#)),
            br#"{"type":"presence","room":"dev","limit":5,"cursor":"a\"b"}"#
        );
    }
}
