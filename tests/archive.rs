//! The PostgreSQL archive against a real PostgreSQL cluster that each test starts on a free
//! port (and stops, kills and restarts).

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::postgres::Postgres;
use scalechat::archive::{self, Archive, ArchiveError, Position, SearchCursor};
use scalechat::config::{ArchiveConfig, DatabaseUrl};
use scalechat::metrics::Metrics;
use scalechat::protocol::RoomName;
use scalechat::protocol::message::{Draft, Message};
use tokio_util::sync::CancellationToken;

/// Archive settings for `url`, the rest at their defaults.
fn settings(url: &str) -> ArchiveConfig {
    ArchiveConfig {
        url: DatabaseUrl::from(url),
        timeout_secs: 2,
        ..ArchiveConfig::default()
    }
}

/// A running archive, stopped when dropped.
struct Running {
    archive: Archive,
    metrics: Arc<Metrics>,
    shutdown: CancellationToken,
}

impl Drop for Running {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

fn spawn(config: &ArchiveConfig) -> Running {
    let metrics = Arc::new(Metrics::new());
    let shutdown = CancellationToken::new();
    let archive = Archive::spawn(config, metrics.clone(), shutdown.clone()).expect("spawn");
    Running {
        archive,
        metrics,
        shutdown,
    }
}

impl Running {
    /// Waits until every queued message is written (PostgreSQL may be restarting).
    async fn settled(&self) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        while self.archive.pending() > 0 {
            assert!(
                tokio::time::Instant::now() < deadline,
                "archive settled: {} pending",
                self.archive.pending()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

fn message(room: &str, epoch: &str, id: u64, ts: u64, text: &str) -> Arc<Message> {
    let room = RoomName::new(room).unwrap();
    Arc::new(Draft::new(room, "ann".into(), ts, text.to_owned()).accept(id, epoch.into()))
}

/// Rows in the archive (0 before the schema is there).
async fn rows(pg: &Postgres) -> i64 {
    let exists = "SELECT (to_regclass('scalechat_messages') IS NOT NULL)::int::bigint";
    if pg.query_i64("postgres", exists).await == 0 {
        return 0;
    }
    pg.query_i64("postgres", "SELECT count(*) FROM scalechat_messages")
        .await
}

#[tokio::test]
async fn the_test_cluster_stops_is_killed_and_restarts() {
    let mut pg = Postgres::start().await;
    pg.execute(
        "postgres",
        "CREATE TABLE t (n int); INSERT INTO t VALUES (1)",
    )
    .await;
    pg.stop().await;
    pg.restart().await;
    pg.kill().await;
    pg.restart().await;
    assert_eq!(pg.query_i64("postgres", "SELECT count(*) FROM t").await, 1);
}

/// Runs the binary with `args` and only `env` (and `PATH`) in its environment, in an empty
/// directory; returns its exit code, stdout and stderr.
async fn scalechat(args: &[&str], env: &[(&str, &str)]) -> (i32, String, String) {
    let out = tokio::time::timeout(
        common::WAIT,
        tokio::process::Command::new(env!("CARGO_BIN_EXE_scalechat"))
            .args(args)
            .current_dir(std::env::temp_dir())
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .envs(env.iter().copied())
            .output(),
    )
    .await
    .expect("scalechat exits in time")
    .expect("run scalechat");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test]
async fn check_config_takes_database_url_and_masks_its_password() {
    let url = "postgres://chat:hunter2@db.example.com:5433/chat";
    let (code, out, err) = scalechat(&["check-config"], &[("DATABASE_URL", url)]).await;
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains(r#"url = "postgres://chat:********@db.example.com:5433/chat""#),
        "{out}"
    );
    assert!(!out.contains("hunter2") && !err.contains("hunter2"));
}

#[tokio::test]
async fn check_config_takes_the_archive_in_sentinel_mode_and_refuses_it_in_cluster_mode() {
    let url = ("DATABASE_URL", "postgres://chat@db.example.com/chat");
    let redis = ("SCALECHAT_TRANSPORT", "redis");
    let sentinel = [
        url,
        redis,
        ("SCALECHAT_REDIS__MODE", "sentinel"),
        ("REDIS_SENTINELS", "127.0.0.1:26379"),
        ("REDIS_MASTER_NAME", "mymaster"),
    ];
    let (code, _, err) = scalechat(&["check-config"], &sentinel).await;
    assert_eq!(code, 0, "{err}");
    let cluster = [url, redis, ("SCALECHAT_REDIS__MODE", "cluster")];
    let (code, _, err) = scalechat(&["check-config"], &cluster).await;
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains("archive.url:") && err.contains("cluster"),
        "{err}"
    );
}

#[tokio::test]
async fn a_malformed_database_url_is_refused_naming_the_key() {
    for url in ["db.example.com", "postgres://chat:hunter2@db:port/chat"] {
        let (code, out, err) = scalechat(&["check-config"], &[("DATABASE_URL", url)]).await;
        assert_eq!(code, 2, "{url}: {out}{err}");
        assert!(err.contains("archive.url:"), "{err}");
        assert!(!err.contains("hunter2"), "{err}");
        // The server refuses to start with it, the same way.
        let (code, _, err) = scalechat(&[], &[("DATABASE_URL", url), ("PORT", "0")]).await;
        assert_eq!(code, 2, "{err}");
    }
}

#[tokio::test]
async fn migrations_apply_once_from_many_processes_at_once() {
    let pg = Postgres::start().await;
    let url = pg.url();
    let env = [("DATABASE_URL", url.as_str())];
    let runs = (0..4).map(|_| scalechat(&["migrate"], &env));
    for (code, out, err) in futures_util::future::join_all(runs).await {
        assert_eq!(code, 0, "{out}{err}");
        assert!(out.contains("schema at version 1"), "{out}");
    }
    // Again, from the library: nothing left to apply.
    assert_eq!(archive::migrate(&settings(&url)).await.unwrap(), 0);
    assert_eq!(
        pg.query_i64("postgres", "SELECT count(*) FROM scalechat_schema_versions")
            .await,
        1
    );
    assert_eq!(rows(&pg).await, 0);
}

#[tokio::test]
async fn a_role_that_may_not_create_tables_gets_a_clear_error() {
    let pg = Postgres::start().await;
    pg.execute("postgres", "CREATE ROLE chat LOGIN").await;
    pg.execute("postgres", "CREATE DATABASE chat").await;
    pg.execute("chat", "REVOKE CREATE ON SCHEMA public FROM PUBLIC")
        .await;
    let url = pg.url_for("chat", "chat");
    let err = archive::migrate(&settings(&url)).await.unwrap_err();
    assert!(matches!(err, ArchiveError::Permission(_)), "{err}");
    let (code, _, stderr) = scalechat(&["migrate"], &[("DATABASE_URL", url.as_str())]).await;
    assert_eq!(code, 1);
    assert!(
        stderr.contains("may not create the archive's tables")
            && stderr.contains("permission denied for schema public"),
        "{stderr}"
    );
    // Migrated by the owner, the schema serves the role without CREATE.
    let owner = pg.url_for("postgres", "chat");
    assert_eq!(archive::migrate(&settings(&owner)).await.unwrap(), 1);
    pg.execute(
        "chat",
        "GRANT SELECT, INSERT, DELETE ON ALL TABLES IN SCHEMA public TO chat",
    )
    .await;
    assert_eq!(archive::migrate(&settings(&url)).await.unwrap(), 0);
}

#[tokio::test]
async fn batches_are_idempotent_one_row_per_message() {
    let pg = Postgres::start().await;
    let mut config = settings(&pg.url());
    config.batch_max_messages = 64;
    let running = spawn(&config);
    // 20 rooms x 100 messages, every one offered twice, as a retry or another node would.
    for round in 0..2 {
        for id in 1..=100 {
            for room in 0..20 {
                let m = message(&format!("room{room}"), "e1", id, 1_000 + id, "hello");
                assert!(running.archive.offer(&m), "queued (round {round})");
            }
        }
        running.settled().await;
    }
    assert_eq!(rows(&pg).await, 2000);
    let m = &running.metrics.archive;
    assert_eq!(m.messages_written_total.get(), 2000);
    assert_eq!(m.duplicates_total.get(), 2000);
    assert_eq!(
        m.missed_total.get(),
        0,
        "a message written twice is not lost"
    );
    assert!(
        m.batches_total.get() >= 2 * 2000 / 64,
        "{}",
        m.batches_total.get()
    );
    let text = running.metrics.render();
    assert!(
        text.contains("scalechat_archive_messages_written_total 2000"),
        "{text}"
    );
    assert!(text.contains("scalechat_archive_up 1"), "{text}");
}

#[tokio::test]
async fn a_message_whose_id_is_archived_for_another_is_counted_as_missed() {
    let pg = Postgres::start().await;
    let running = spawn(&settings(&pg.url()));
    // A failover lost the message with id 2 after the archive had it; the new master gave
    // id 2 again, to another message.
    for (id, text) in [(1, "one"), (2, "lost by redis"), (3, "three")] {
        assert!(
            running
                .archive
                .offer(&message("general", "e1", id, 1_000 + id, text))
        );
    }
    running.settled().await;
    for (id, text) in [(2, "sent after the failover"), (3, "three")] {
        assert!(
            running
                .archive
                .offer(&message("general", "e1", id, 1_010 + id, text))
        );
    }
    assert!(
        running
            .archive
            .offer(&message("general", "e1", 3, 1_003, "three"))
    );
    running.settled().await;
    let m = &running.metrics.archive;
    assert_eq!(
        m.missed_total.get(),
        2,
        "id 2 and the second id 3 have other messages"
    );
    assert_eq!(rows(&pg).await, 3);
    let kept = pg
        .query_i64(
            "postgres",
            "SELECT count(*) FROM scalechat_messages WHERE id = 2 AND text = 'lost by redis'",
        )
        .await;
    assert_eq!(kept, 1, "the first message with the id stays");
}

#[tokio::test]
async fn messages_queued_while_postgres_is_down_land_once_when_it_is_back() {
    let mut pg = Postgres::start().await;
    let running = spawn(&settings(&pg.url()));
    let mut id = 0;
    let mut offer = |n: u64| {
        for _ in 0..n {
            id += 1;
            assert!(
                running
                    .archive
                    .offer(&message("general", "e1", id, id, "m"))
            );
        }
    };
    offer(100);
    running.settled().await;
    pg.stop().await;
    offer(300);
    common::eventually("the archive sees the outage", || !running.archive.is_up()).await;
    offer(100);
    assert!(running.archive.pending() > 0);
    pg.restart().await;
    running.settled().await;
    assert!(running.archive.is_up());
    // Killed mid-stream this time, as a crash would.
    offer(200);
    pg.kill().await;
    offer(200);
    pg.restart().await;
    running.settled().await;
    assert_eq!(rows(&pg).await, 900);
    assert_eq!(
        pg.query_i64(
            "postgres",
            "SELECT count(DISTINCT id) FROM scalechat_messages WHERE id BETWEEN 1 AND 900"
        )
        .await,
        900
    );
    assert!(running.metrics.archive.write_errors_total.get() > 0);
}

#[tokio::test]
async fn an_archive_started_while_postgres_is_down_catches_up_when_it_comes() {
    let mut pg = Postgres::start().await;
    pg.stop().await;
    let running = spawn(&settings(&pg.url()));
    for id in 1..=50 {
        assert!(
            running
                .archive
                .offer(&message("general", "e1", id, id, "early"))
        );
    }
    common::eventually("the outage is seen", || !running.archive.is_up()).await;
    assert_eq!(running.metrics.archive.up.get(), 0);
    pg.restart().await;
    running.settled().await;
    assert_eq!(rows(&pg).await, 50);
}

#[tokio::test]
async fn a_full_queue_refuses_and_counts_without_waiting() {
    let mut pg = Postgres::start().await;
    pg.stop().await;
    let mut config = settings(&pg.url());
    config.queue_max_messages = 10;
    let running = spawn(&config);
    let offered: Vec<bool> = (1..=15)
        .map(|id| {
            running
                .archive
                .offer(&message("general", "e1", id, id, "x"))
        })
        .collect();
    assert_eq!(offered.iter().filter(|q| **q).count(), 10);
    assert_eq!(running.metrics.archive.dropped_total.get(), 5);
    // No hot store to catch up from: lost, and said so.
    assert_eq!(running.metrics.archive.missed_total.get(), 5);
    assert_eq!(running.metrics.archive.queue_messages.get(), 10);
}

#[tokio::test]
async fn reads_page_back_recover_and_find_a_rooms_position() {
    let pg = Postgres::start().await;
    let running = spawn(&settings(&pg.url()));
    // An older epoch, then the current one.
    for id in 1..=5 {
        running
            .archive
            .offer(&message("dev", "old", id, id, "before the reset"));
    }
    for id in 1..=30 {
        running.archive.offer(&message(
            "dev",
            "new",
            id,
            1_000 + id,
            &format!("message {id}"),
        ));
    }
    running
        .archive
        .offer(&message("other", "x", 1, 5_000, "elsewhere"));
    running.settled().await;
    let a = &running.archive;
    let dev = RoomName::new("dev").unwrap();
    let (page, more) = a.page(&dev, "new", 21, 10).await.unwrap();
    let ids: Vec<u64> = page.iter().map(|m| m.id()).collect();
    assert_eq!(ids, (11..=20).collect::<Vec<_>>());
    assert!(more);
    assert_eq!(page[0].text(), "message 11");
    assert_eq!(page[0].epoch(), "new");
    let (page, more) = a.page(&dev, "new", 6, 10).await.unwrap();
    assert_eq!(page.len(), 5);
    assert!(!more);
    let after = a.after(&dev, "new", 25, 100).await.unwrap();
    assert_eq!(after.len(), 5);
    assert!(archive::is_consecutive_from(25, &after));
    assert!(!archive::is_consecutive_from(24, &after));
    let position = a.position(&dev).await.unwrap();
    assert_eq!(
        position,
        Some(Position {
            epoch: "new".into(),
            last_id: 30
        })
    );
    let nobody = RoomName::new("empty").unwrap();
    assert_eq!(a.position(&nobody).await.unwrap(), None);
    let mut all = a.positions().await.unwrap();
    all.sort_by(|x, y| x.0.as_str().cmp(y.0.as_str()));
    let all: Vec<(&str, &str, u64)> = all
        .iter()
        .map(|(room, p)| (room.as_str(), p.epoch.as_str(), p.last_id))
        .collect();
    assert_eq!(all, [("dev", "new", 30), ("other", "x", 1)]);
    // What a message read back looks like to a client: the same frame as when it was sent.
    let sent = message("dev", "new", 30, 1_030, "message 30");
    let (back, _) = a.page(&dev, "new", 31, 1).await.unwrap();
    assert_eq!(back[0].json(), sent.json());
}

#[tokio::test]
async fn search_finds_newest_first_and_any_query_is_safe() {
    let pg = Postgres::start().await;
    let running = spawn(&settings(&pg.url()));
    let texts = [
        "deploy at five",
        "the deploy failed",
        "lunch?",
        "Deploy fixed, déjà vu",
        "it's a 'quoted' \"deploy\" -- really; DROP TABLE x",
    ];
    for (i, text) in texts.iter().enumerate() {
        let id = i as u64 + 1;
        running
            .archive
            .offer(&message("dev", "e", id, 100 + id, text));
    }
    running
        .archive
        .offer(&message("ops", "e", 1, 1, "deploy elsewhere"));
    running.settled().await;
    let a = &running.archive;
    let dev = RoomName::new("dev").unwrap();
    let found = a.search(&dev, "deploy", None, 10).await.unwrap();
    let ids: Vec<u64> = found.iter().map(|m| m.id()).collect();
    assert_eq!(ids, [5, 4, 2, 1]);
    // Paged: two, then the rest after the cursor.
    let first = a.search(&dev, "deploy", None, 2).await.unwrap();
    let cursor = SearchCursor::after(first.last().unwrap());
    let rest = a.search(&dev, "deploy", Some(&cursor), 10).await.unwrap();
    let ids: Vec<u64> = first.iter().chain(&rest).map(|m| m.id()).collect();
    assert_eq!(ids, [5, 4, 2, 1]);
    assert_eq!(
        a.search(&dev, "\"deploy failed\"", None, 10)
            .await
            .unwrap()
            .len(),
        1
    );
    assert_eq!(
        a.search(&dev, "deploy -failed", None, 10)
            .await
            .unwrap()
            .len(),
        3
    );
    assert_eq!(a.search(&dev, "DÉJÀ", None, 10).await.unwrap().len(), 1);
    for query in [
        "",
        "\"",
        "'",
        "&&||!!",
        "a & | ! ( ) : * <-> <2>",
        "'; DROP TABLE scalechat_messages; --",
        "\"unclosed phrase",
        "or or or",
        "-",
        "\\",
        "\0null",
        "%_%",
    ] {
        let found = a.search(&dev, query, None, 10).await;
        assert!(found.is_ok(), "{query:?}: {found:?}");
    }
    assert_eq!(rows(&pg).await, 6);
}

#[tokio::test]
async fn a_message_with_nul_is_archived_without_failing_its_batch() {
    let pg = Postgres::start().await;
    let running = spawn(&settings(&pg.url()));
    running.archive.offer(&message("dev", "e", 1, 1, "a\0b"));
    running.archive.offer(&message("dev", "e", 2, 2, "fine"));
    running.settled().await;
    assert_eq!(rows(&pg).await, 2);
    assert_eq!(running.metrics.archive.write_errors_total.get(), 0);
}

#[tokio::test]
async fn retention_deletes_old_messages_in_batches_and_keeps_new_ones() {
    let pg = Postgres::start().await;
    let running = spawn(&settings(&pg.url()));
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64;
    let old = now_ms - 3 * 24 * 3600 * 1000;
    for id in 1..=12_000 {
        running
            .archive
            .offer(&message("dev", "e", id, old + id, "old"));
    }
    for id in 12_001..=12_010 {
        running
            .archive
            .offer(&message("dev", "e", id, now_ms, "new"));
    }
    running.settled().await;
    assert_eq!(rows(&pg).await, 12_010);
    drop(running);
    let mut config = settings(&pg.url());
    config.retention_days = 2;
    let pruning = spawn(&config);
    common::eventually_async("old messages deleted", || async {
        pruning.metrics.archive.deleted_total.get() == 12_000
    })
    .await;
    assert_eq!(rows(&pg).await, 10);
}

/// A `redis-server` of this test's own on a free port, keeping nothing on disk.
struct Redis {
    port: u16,
    _child: tokio::process::Child,
}

impl Redis {
    async fn start() -> Redis {
        let port = common::postgres::free_port();
        let child = tokio::process::Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no", "--dir", "/tmp"])
            .stdout(std::process::Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("redis-server is installed");
        common::eventually_async("redis answers", || async move {
            tokio::net::TcpStream::connect(("127.0.0.1", port))
                .await
                .is_ok()
        })
        .await;
        Redis {
            port,
            _child: child,
        }
    }

    fn client(&self) -> redis::Client {
        redis::Client::open(format!("redis://127.0.0.1:{}/", self.port)).unwrap()
    }

    async fn conn(&self) -> redis::aio::MultiplexedConnection {
        self.client()
            .get_multiplexed_async_connection()
            .await
            .unwrap()
    }

    /// Appends messages `ids` of `room` to the stream, as the publish script does.
    async fn xadd(&self, room: &str, ids: std::ops::RangeInclusive<u64>) {
        self.xadd_capped(room, ids, None).await;
    }

    /// Appends messages, keeping at most `cap` entries in the stream when given.
    async fn xadd_capped(
        &self,
        room: &str,
        ids: std::ops::RangeInclusive<u64>,
        cap: Option<usize>,
    ) {
        let mut conn = self.conn().await;
        let mut pipe = redis::pipe();
        for id in ids {
            let json = message(room, "e", id, id, &format!("m{id}")).json();
            let cmd = pipe.cmd("XADD").arg(STREAM);
            if let Some(cap) = cap {
                cmd.arg("MAXLEN").arg(cap);
            }
            cmd.arg("*")
                .arg(archive::stream::FIELD)
                .arg(json.as_ref())
                .ignore();
        }
        pipe.query_async::<()>(&mut conn).await.unwrap();
    }

    /// Entries read by `consumer` and not acknowledged.
    async fn pending(&self, consumer: Option<&str>) -> usize {
        let mut cmd = redis::cmd("XPENDING");
        cmd.arg(STREAM)
            .arg(archive::stream::GROUP)
            .arg("-")
            .arg("+")
            .arg(100_000);
        if let Some(c) = consumer {
            cmd.arg(c);
        }
        let entries: Vec<redis::Value> = cmd.query_async(&mut self.conn().await).await.unwrap();
        entries.len()
    }
}

const STREAM: &str = "scalechat:archive";

fn stream_source(redis: &Redis, consumer: &str) -> archive::stream::StreamSource {
    archive::stream::StreamSource {
        server: Box::new(redis.client()),
        key: STREAM.into(),
        consumer: consumer.into(),
    }
}

#[tokio::test]
async fn nodes_sharing_the_stream_write_each_message_once() {
    let pg = Postgres::start().await;
    let redis = Redis::start().await;
    let nodes = [spawn(&settings(&pg.url())), spawn(&settings(&pg.url()))];
    for (n, node) in nodes.iter().enumerate() {
        node.archive.spawn_stream_consumer(
            stream_source(&redis, &format!("node-{n}")),
            node.shutdown.clone(),
        );
    }
    for chunk in 0..10 {
        redis
            .xadd("general", chunk * 300 + 1..=chunk * 300 + 300)
            .await;
    }
    common::eventually_async("3000 rows", || async { rows(&pg).await == 3000 }).await;
    common::eventually_async("all acknowledged", || async {
        redis.pending(None).await == 0
    })
    .await;
    let written: u64 = nodes
        .iter()
        .map(|n| n.metrics.archive.messages_written_total.get())
        .sum();
    let duplicates: u64 = nodes
        .iter()
        .map(|n| n.metrics.archive.duplicates_total.get())
        .sum();
    assert_eq!(
        (written, duplicates),
        (3000, 0),
        "each entry went to one node"
    );
}

#[tokio::test]
async fn entries_a_dead_node_read_are_archived_by_another_and_a_restarted_node_reads_its_own() {
    let pg = Postgres::start().await;
    let redis = Redis::start().await;
    redis.xadd("general", 1..=300).await;
    // Two nodes read entries and die before acknowledging them.
    let mut conn = redis.conn().await;
    redis::cmd("XGROUP")
        .arg("CREATE")
        .arg(STREAM)
        .arg(archive::stream::GROUP)
        .arg("0")
        .query_async::<()>(&mut conn)
        .await
        .unwrap();
    for (consumer, count) in [("dead", 100), ("restarting", 100)] {
        let _: redis::Value = redis::cmd("XREADGROUP")
            .arg("GROUP")
            .arg(archive::stream::GROUP)
            .arg(consumer)
            .arg("COUNT")
            .arg(count)
            .arg("STREAMS")
            .arg(STREAM)
            .arg(">")
            .query_async(&mut conn)
            .await
            .unwrap();
    }
    // The dead node's entries have been pending long enough to be taken over.
    let ids: Vec<(String, redis::Value)> = redis::cmd("XRANGE")
        .arg(STREAM)
        .arg("-")
        .arg("+")
        .arg("COUNT")
        .arg(100)
        .query_async(&mut conn)
        .await
        .unwrap();
    let mut xclaim = redis::cmd("XCLAIM");
    xclaim
        .arg(STREAM)
        .arg(archive::stream::GROUP)
        .arg("dead")
        .arg(0);
    for (id, _) in &ids {
        xclaim.arg(id);
    }
    xclaim
        .arg("IDLE")
        .arg(archive::stream::CLAIM_IDLE.as_millis() as u64 * 2)
        .arg("JUSTID");
    let _: redis::Value = xclaim.query_async(&mut conn).await.unwrap();
    assert_eq!(redis.pending(Some("dead")).await, 100);
    assert_eq!(redis.pending(Some("restarting")).await, 100);
    // The restarted node reads its own pending entries; the other takes the dead one's.
    let nodes = [spawn(&settings(&pg.url())), spawn(&settings(&pg.url()))];
    nodes[0].archive.spawn_stream_consumer(
        stream_source(&redis, "restarting"),
        nodes[0].shutdown.clone(),
    );
    nodes[1]
        .archive
        .spawn_stream_consumer(stream_source(&redis, "other"), nodes[1].shutdown.clone());
    common::eventually_async("300 rows", || async { rows(&pg).await == 300 }).await;
    common::eventually_async("all acknowledged", || async {
        redis.pending(None).await == 0
    })
    .await;
}

#[tokio::test]
async fn the_stream_holds_messages_while_postgres_is_down() {
    let mut pg = Postgres::start().await;
    let redis = Redis::start().await;
    let node = spawn(&settings(&pg.url()));
    node.archive
        .spawn_stream_consumer(stream_source(&redis, "node"), node.shutdown.clone());
    redis.xadd("general", 1..=100).await;
    common::eventually_async("100 rows", || async { rows(&pg).await == 100 }).await;
    pg.kill().await;
    redis.xadd("general", 101..=400).await;
    common::eventually("the outage is seen", || !node.archive.is_up()).await;
    pg.restart().await;
    common::eventually_async("400 rows", || async { rows(&pg).await == 400 }).await;
    common::eventually_async("all acknowledged", || async {
        redis.pending(None).await == 0
    })
    .await;
}

#[tokio::test]
async fn entries_trimmed_before_any_node_read_them_are_counted_once() {
    let mut pg = Postgres::start().await;
    let redis = Redis::start().await;
    let mut config = settings(&pg.url());
    config.batch_max_messages = 100;
    let node = spawn(&config);
    node.archive
        .spawn_stream_consumer(stream_source(&redis, "node"), node.shutdown.clone());
    common::eventually("schema ready", || node.metrics.archive.up.get() == 1).await;
    pg.kill().await;
    // The consumer takes batches (what had arrived when it woke, up to `pool_size` written at
    // once and one read ahead) and holds them while PostgreSQL is down; the publisher's cap
    // of 300 trims 700 entries meanwhile, all but those held never read.
    redis.xadd_capped("general", 1..=100, Some(300)).await;
    common::eventually_async("a batch is held", || async {
        redis.pending(None).await > 0
    })
    .await;
    redis.xadd_capped("general", 101..=1000, Some(300)).await;
    pg.restart().await;
    // Every message is either in the table or counted as missed, once.
    common::eventually_async("every message archived or counted", || async {
        redis.pending(None).await == 0
            && rows(&pg).await as u64 + node.metrics.archive.missed_total.get() == 1000
    })
    .await;
    let missed = node.metrics.archive.missed_total.get();
    assert!(
        (100..=700).contains(&missed),
        "missed {missed}: 700 trimmed, less what the consumer held"
    );
}

#[tokio::test]
async fn a_stream_filled_before_its_group_existed_counts_only_what_was_trimmed() {
    let pg = Postgres::start().await;
    // Nodes published before any consumer created the group (the schema was not ready yet):
    // 200 entries waiting lose nothing; 1000 under a cap of 300 lost 700 unread.
    for (added, cap, missed) in [(200, None, 0), (1000, Some(300), 700)] {
        let fresh = "DROP TABLE IF EXISTS scalechat_messages, scalechat_schema_versions";
        pg.execute("postgres", fresh).await;
        let redis = Redis::start().await;
        redis.xadd_capped("general", 1..=added, cap).await;
        let node = spawn(&settings(&pg.url()));
        node.archive
            .spawn_stream_consumer(stream_source(&redis, "node"), node.shutdown.clone());
        let kept = cap.map_or(added, |c| c as u64) as i64;
        common::eventually_async("what the stream held archived", || async {
            rows(&pg).await == kept
        })
        .await;
        common::eventually_async("all acknowledged", || async {
            redis.pending(None).await == 0
        })
        .await;
        assert_eq!(
            node.metrics.archive.missed_total.get(),
            missed,
            "{added} added"
        );
    }
}

/// A hot store holding messages `from..=to` of one room.
#[derive(Debug)]
struct Held {
    room: &'static str,
    from: u64,
    to: u64,
}

impl archive::catchup::HotStore for Held {
    fn since(&self, room: &RoomName, epoch: &str, from: u64) -> Vec<Arc<Message>> {
        if room.as_str() != self.room || epoch != "e1" {
            return Vec::new();
        }
        (from.max(self.from)..=self.to)
            .map(|id| message(self.room, "e1", id, id, "held"))
            .collect()
    }
}

#[tokio::test]
async fn messages_the_full_queue_refused_are_caught_up_from_the_hot_store() {
    for (held_from, rows_expected, missed) in [(5, 30, 0), (15, 26, 4)] {
        let mut pg = Postgres::start().await;
        pg.stop().await;
        let mut config = settings(&pg.url());
        config.queue_max_messages = 10;
        let running = spawn(&config);
        running.archive.set_hot_store(Arc::new(Held {
            room: "general",
            from: held_from,
            to: 30,
        }));
        let queued = (1..=30)
            .filter(|id| {
                running
                    .archive
                    .offer(&message("general", "e1", *id, *id, "x"))
            })
            .count();
        assert_eq!(queued, 10);
        pg.restart().await;
        running.settled().await;
        assert_eq!(rows(&pg).await, rows_expected, "held from {held_from}");
        let m = &running.metrics.archive;
        assert_eq!(m.dropped_total.get(), 20);
        assert_eq!(m.missed_total.get(), missed, "held from {held_from}");
    }
}

#[tokio::test]
async fn shutdown_writes_what_was_queued_before_the_writer_ends() {
    let pg = Postgres::start().await;
    let running = spawn(&settings(&pg.url()));
    common::eventually("schema ready", || running.metrics.archive.up.get() == 1).await;
    for id in 1..=5000 {
        assert!(
            running
                .archive
                .offer(&message("general", "e1", id, id, "bye"))
        );
    }
    running.shutdown.cancel();
    tokio::time::timeout(common::WAIT, running.archive.closed())
        .await
        .expect("the writer ends in time");
    assert_eq!(rows(&pg).await, 5000);
}

/// The archive's sustained write rate on this machine: 200,000 messages in 1,000 rooms.
/// Run with `cargo test --release --test archive -- --ignored --nocapture archive_rate`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a measurement, not a check"]
async fn archive_rate() {
    let pg = Postgres::start().await;
    let running = spawn(&settings(&pg.url()));
    common::eventually("schema ready", || running.metrics.archive.up.get() == 1).await;
    let messages: Vec<Arc<Message>> = (0..200_000u64)
        .map(|n| {
            let room = format!("room{}", n % 1000);
            message(
                &room,
                "e1",
                n / 1000 + 1,
                n,
                "a chat message of a typical length, about 60 B",
            )
        })
        .collect();
    let started = std::time::Instant::now();
    for m in &messages {
        while !running.archive.offer(m) {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }
    running.settled().await;
    let secs = started.elapsed().as_secs_f64();
    assert_eq!(rows(&pg).await, 200_000);
    let m = &running.metrics.archive;
    println!(
        "archived 200000 messages in {secs:.2} s: {:.0} messages/s, {} batches",
        200_000.0 / secs,
        m.batches_total.get()
    );
}

/// A test server on the embedded transport archiving into `url`, keeping `history` messages
/// per room in memory.
fn archived_config(url: &str, history: usize) -> scalechat::config::Config {
    let mut config = common::config();
    config.archive = settings(url);
    config.rooms.history_size = history;
    config.rooms.history_on_join = history.min(2);
    config
}

#[tokio::test]
async fn a_single_node_restarted_with_postgres_continues_its_rooms_and_pages_into_the_archive() {
    let pg = Postgres::start().await;
    let server = common::start(archived_config(&pg.url(), 3)).await;
    let mut alice = server.client("name=alice").await;
    alice.say_acked("m", 5).await;
    let first = server.client("name=bob").await;
    drop(first);
    server.stop().await;
    assert_eq!(rows(&pg).await, 5, "written at shutdown at the latest");

    let server = common::start(archived_config(&pg.url(), 3)).await;
    let mut bob = common::Client::connect(&server.url("name=bob")).await;
    bob.expect("welcome").await;
    let (joined, history) = bob.joined().await;
    let epoch = joined["epoch"].as_str().unwrap().to_owned();
    assert_eq!(joined["last_id"], 5, "{joined}");
    assert!(history.is_empty(), "the restarted node's memory holds none");
    bob.say("general", "after the restart", "b1").await;
    let sent = bob.expect_chat().await;
    assert_eq!(
        (sent["id"].as_u64(), sent["epoch"].as_str()),
        (Some(6), Some(epoch.as_str()))
    );
    // Paging back reaches the messages from before the restart, in the archive.
    bob.send(serde_json::json!({"type":"history","room":"general","before":6,"limit":10}))
        .await;
    let page = loop {
        let frame = bob.recv().await;
        if frame["type"] == "history" {
            break frame;
        }
    };
    let ids: Vec<u64> = page["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_u64().unwrap())
        .collect();
    assert_eq!(ids, [1, 2, 3, 4, 5], "{page}");
    assert_eq!(page["more"], false);
    assert_eq!(page["messages"][0]["message"], "m0");
    // A client that saw message 1 before the restart recovers every message since.
    let mut carol =
        common::Client::connect(&server.url(&format!("name=carol&since=1&epoch={epoch}"))).await;
    carol.expect("welcome").await;
    let (joined, history) = carol.joined().await;
    assert_eq!(joined["recovered"], true, "{joined}");
    assert_eq!(common::ids(&history), [2, 3, 4, 5, 6]);
    server.stop().await;
}

#[tokio::test]
async fn a_node_chats_while_postgres_is_down_and_archives_once_it_is_back() {
    let mut pg = Postgres::start().await;
    pg.stop().await;
    let server = common::start(archived_config(&pg.url(), 200)).await;
    assert_eq!(common::readyz(server.addr).await, Some(200));
    let mut alice = server.client("name=alice").await;
    alice.say_acked("down", 20).await;
    let (_, metrics) = common::http_get(server.addr, "/metrics", &[]).await;
    assert!(metrics.contains("scalechat_archive_up 0"), "{metrics}");
    assert!(
        metrics.contains("scalechat_archive_queue_messages 20"),
        "{metrics}"
    );
    pg.restart().await;
    common::eventually_async("archived once back", || async { rows(&pg).await == 20 }).await;
    server.stop().await;
}

fn node_env(url: &str) -> Vec<(&'static str, String)> {
    vec![
        ("DATABASE_URL", url.to_owned()),
        ("SCALECHAT_ARCHIVE__TIMEOUT_SECS", "2".to_owned()),
    ]
}

async fn redis_node(
    name: &str,
    redis: &common::backplane::Redis,
    url: &str,
) -> common::backplane::Node {
    let env = node_env(url);
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let node = common::backplane::Node::spawn_with(name, redis.port, None, &env);
    let addr = node.addr;
    common::eventually_async("node ready", || async move {
        common::readyz(addr).await == Some(200)
    })
    .await;
    node
}

#[tokio::test]
async fn many_nodes_on_redis_archive_every_message_once_even_when_the_publisher_is_killed() {
    let mut pg = Postgres::start().await;
    let redis = common::backplane::Redis::start(None).await;
    let url = pg.url();
    let mut a = redis_node("node-a", &redis, &url).await;
    let b = redis_node("node-b", &redis, &url).await;
    let mut alice = a.client("name=alice").await;
    let mut bob = b.client("name=bob").await;
    alice.say_acked("a", 50).await;
    bob.say_acked("b", 50).await;
    common::eventually_async("100 rows", || async { rows(&pg).await == 100 }).await;
    // PostgreSQL down: the nodes hold what they read. A burst acked on node A, then A is
    // killed (SIGKILL) before it could write; restarted under its name, it archives it.
    pg.kill().await;
    alice.say_acked("burst", 100).await;
    a.child.kill().await.unwrap();
    pg.restart().await;
    a = redis_node("node-a", &redis, &url).await;
    common::eventually_async("200 rows", || async { rows(&pg).await == 200 }).await;
    assert_eq!(
        pg.query_i64(
            "postgres",
            "SELECT count(*) FROM (SELECT DISTINCT room, epoch, id FROM scalechat_messages) d"
        )
        .await,
        200
    );
    let c = a.client("name=carol").await;
    drop(c);
}

/// The `search` reply to `query` in general (after `cursor`), skipping chat frames.
async fn search(
    client: &mut common::Client,
    query: &str,
    cursor: Option<&str>,
    limit: u64,
) -> serde_json::Value {
    client
        .send(serde_json::json!({
            "type":"search","room":"general","query":query,"cursor":cursor,"limit":limit
        }))
        .await;
    loop {
        let frame = client.recv().await;
        if frame["type"] == "search" || frame["type"] == "error" {
            return frame;
        }
    }
}

#[tokio::test]
async fn clients_search_a_rooms_archive_newest_first_and_any_query_is_answered() {
    let pg = Postgres::start().await;
    let server = common::start(archived_config(&pg.url(), 200)).await;
    let mut alice = server.client("name=alice").await;
    for (n, text) in [
        "deploy at five",
        "lunch?",
        "the deploy failed",
        "Deploy fixed",
    ]
    .iter()
    .enumerate()
    {
        alice.say("general", text, &format!("s{n}")).await;
        alice.expect_chat().await;
    }
    common::eventually_async("archived", || async { rows(&pg).await == 4 }).await;
    let page = search(&mut alice, "deploy", None, 2).await;
    let texts: Vec<&str> = page["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["message"].as_str().unwrap())
        .collect();
    assert_eq!(texts, ["Deploy fixed", "the deploy failed"], "{page}");
    let cursor = page["cursor"].as_str().unwrap().to_owned();
    let rest = search(&mut alice, "deploy", Some(&cursor), 2).await;
    assert_eq!(rest["messages"][0]["message"], "deploy at five", "{rest}");
    assert!(rest["cursor"].is_null(), "{rest}");
    for query in [
        "\"",
        "'; DROP TABLE scalechat_messages; --",
        "a & | ! ( ) <->",
        "-",
    ] {
        let answer = search(&mut alice, query, None, 10).await;
        assert_eq!(answer["type"], "search", "{query:?}: {answer}");
    }
    let bad = search(&mut alice, "deploy", Some("not-a-cursor"), 10).await;
    assert_eq!(bad["code"], "bad_field", "{bad}");
    server.stop().await;
    // Without the archive, search is refused in words.
    let server = common::start(common::config()).await;
    let mut bob = server.client("name=bob").await;
    let answer = search(&mut bob, "deploy", None, 10).await;
    assert_eq!(answer["code"], "unavailable", "{answer}");
    server.stop().await;
}

#[tokio::test]
async fn on_redis_history_and_recovery_reach_past_the_rooms_history_into_the_archive() {
    let pg = Postgres::start().await;
    let redis = common::backplane::Redis::start(None).await;
    let url = pg.url();
    let env = [
        ("DATABASE_URL", url.as_str()),
        ("SCALECHAT_ROOMS__HISTORY_SIZE", "5"),
        ("SCALECHAT_ROOMS__HISTORY_ON_JOIN", "5"),
    ];
    let node = common::backplane::Node::spawn_with("node-a", redis.port, None, &env);
    let addr = node.addr;
    common::eventually_async("node ready", || async move {
        common::readyz(addr).await == Some(200)
    })
    .await;
    let (mut alice, joined, _) = node.connect("name=alice").await;
    let epoch = joined["epoch"].as_str().unwrap().to_owned();
    alice.say_acked("r", 20).await;
    common::eventually_async("20 rows", || async { rows(&pg).await == 20 }).await;
    // Redis keeps 16..=20; a client that saw message 2 recovers 3..=20.
    let (_, joined, history) = node
        .connect(&format!("name=bob&since=2&epoch={epoch}"))
        .await;
    assert_eq!(joined["recovered"], true, "{joined}");
    assert_eq!(common::ids(&history), (3..=20).collect::<Vec<_>>());
    // Paging back from the oldest Redis still holds goes on in the archive.
    alice
        .send(serde_json::json!({"type":"history","room":"general","before":16,"limit":10}))
        .await;
    let page = loop {
        let frame = alice.recv().await;
        if frame["type"] == "history" {
            break frame;
        }
    };
    let ids: Vec<u64> = page["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_u64().unwrap())
        .collect();
    assert_eq!(ids, (6..=15).collect::<Vec<_>>(), "{page}");
    assert_eq!(page["more"], true);
}

/// A Socket.IO client over a WebSocket-only session (`transport=websocket`), connected to the
/// main namespace.
struct SocketIo {
    ws: tokio_tungstenite::WebSocketStream<
        tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>,
    >,
    next_ack: u64,
}

impl SocketIo {
    async fn connect(addr: std::net::SocketAddr, name: &str) -> SocketIo {
        use futures_util::SinkExt;
        let url = format!("ws://{addr}/socket.io/?EIO=4&transport=websocket&name={name}");
        let (ws, _) = tokio_tungstenite::connect_async(&url)
            .await
            .expect("connect");
        let mut client = SocketIo { ws, next_ack: 1 };
        assert!(client.packet().await.starts_with("0{"));
        client
            .ws
            .send(tokio_tungstenite::tungstenite::Message::text("40"))
            .await
            .unwrap();
        assert!(client.packet().await.starts_with("40{"));
        assert!(client.packet().await.starts_with(r#"42["joined""#));
        client
    }

    /// The next Engine.IO packet, answering the server's pings on the way.
    async fn packet(&mut self) -> String {
        use futures_util::{SinkExt, StreamExt};
        use tokio_tungstenite::tungstenite::Message;
        loop {
            let frame = tokio::time::timeout(common::WAIT, self.ws.next())
                .await
                .expect("a packet in time")
                .expect("connection open")
                .expect("valid frame");
            match frame {
                Message::Text(text) if text.as_str() == "2" => {
                    self.ws.send(Message::text("3")).await.unwrap();
                }
                Message::Text(text) => return text.as_str().to_owned(),
                Message::Ping(_) | Message::Pong(_) => {}
                other => panic!("expected a text frame, got {other:?}"),
            }
        }
    }

    /// Emits `event` with `data` asking for an ack; the ack's argument.
    async fn emit(&mut self, event: &str, data: serde_json::Value) -> serde_json::Value {
        use futures_util::SinkExt;
        let id = self.next_ack;
        self.next_ack += 1;
        let packet = format!("42{id}{}", serde_json::json!([event, data]));
        self.ws
            .send(tokio_tungstenite::tungstenite::Message::text(packet))
            .await
            .unwrap();
        let prefix = format!("43{id}[");
        loop {
            let packet = self.packet().await;
            if let Some(json) = packet.strip_prefix(&prefix[..prefix.len() - 1]) {
                let args: serde_json::Value = serde_json::from_str(json).unwrap();
                return args[0].clone();
            }
        }
    }

    /// Emits `event` with `data` without an ack; the `error` event that answers it.
    async fn emit_refused(&mut self, event: &str, data: serde_json::Value) -> serde_json::Value {
        use futures_util::SinkExt;
        let packet = format!("42{}", serde_json::json!([event, data]));
        self.ws
            .send(tokio_tungstenite::tungstenite::Message::text(packet))
            .await
            .unwrap();
        loop {
            let packet = self.packet().await;
            if let Some(json) = packet.strip_prefix(r#"42["error","#) {
                let args: serde_json::Value = serde_json::from_str(&format!("[{json}")).unwrap();
                return args[0].clone();
            }
        }
    }
}

/// The texts of a search answer's messages.
fn texts(page: &serde_json::Value) -> Vec<&str> {
    page["messages"]
        .as_array()
        .unwrap_or_else(|| panic!("a search page: {page}"))
        .iter()
        .map(|m| m["message"].as_str().unwrap())
        .collect()
}

#[tokio::test]
async fn socketio_clients_search_through_acks_with_the_same_checks_and_rate() {
    let pg = Postgres::start().await;
    let mut config = archived_config(&pg.url(), 200);
    // CONNECT's join takes one request, the searches below the other five.
    config.limits.requests_per_second = 0.01;
    config.limits.request_burst = 6;
    let server = common::start(config).await;
    let mut sio = SocketIo::connect(server.addr, "sio").await;
    for text in [
        "deploy at five",
        "lunch?",
        "the deploy failed",
        "Deploy fixed",
    ] {
        let ack = sio
            .emit("event:message", serde_json::json!({"message": text}))
            .await;
        assert_eq!(ack["room"], "general", "{ack}");
    }
    common::eventually_async("archived", || async { rows(&pg).await == 4 }).await;

    let search = |query: &str, cursor: Option<&str>| serde_json::json!({"room":"general","query":query,"cursor":cursor,"limit":2});
    let page = sio.emit("search", search("deploy", None)).await;
    assert_eq!(
        texts(&page),
        ["Deploy fixed", "the deploy failed"],
        "{page}"
    );
    assert_eq!(
        (&page["room"], &page["query"]),
        (&"general".into(), &"deploy".into())
    );
    assert_eq!(page["messages"][0]["type"], "message", "{page}");
    assert_eq!(page["messages"][0]["user"], "sio", "{page}");
    let cursor = page["cursor"].as_str().expect("a cursor").to_owned();
    let rest = sio.emit("search", search("deploy", Some(&cursor))).await;
    assert_eq!(texts(&rest), ["deploy at five"], "{rest}");
    assert!(rest["cursor"].is_null(), "{rest}");

    let code = |answer: &serde_json::Value| answer["error"]["code"].as_str().map(str::to_owned);
    let dev = serde_json::json!({"room":"dev","query":"deploy"});
    let answer = sio.emit("search", dev.clone()).await;
    assert_eq!(code(&answer).as_deref(), Some("not_joined"), "{answer}");
    // Bad fields are refused before they take a request from the rate.
    for bad in [
        serde_json::json!({"room":"general","query":"   "}),
        serde_json::json!({"room":"general"}),
        serde_json::json!({"room":"general","query":"x".repeat(257)}),
        serde_json::json!({"room":"general","query":"x","limit":51}),
        serde_json::json!({"room":"general","query":"x","cursor":"c".repeat(129)}),
        serde_json::json!({"room":"no spaces","query":"x"}),
        serde_json::json!("deploy"),
    ] {
        let answer = sio.emit("search", bad.clone()).await;
        let want = if bad["room"] == "no spaces" {
            "bad_room"
        } else {
            "bad_field"
        };
        assert_eq!(code(&answer).as_deref(), Some(want), "{bad}: {answer}");
        assert!(answer["error"]["message"].is_string(), "{answer}");
    }
    let answer = sio
        .emit("search", search("deploy", Some("not-a-cursor")))
        .await;
    assert_eq!(code(&answer).as_deref(), Some("bad_field"), "{answer}");
    // Without an ack, the refusal comes as the event `error`.
    let error = sio.emit_refused("search", dev).await;
    assert_eq!(error["code"], "not_joined", "{error}");
    // The sixth request of the burst was the last.
    let answer = sio.emit("search", search("deploy", None)).await;
    assert_eq!(code(&answer).as_deref(), Some("rate_limited"), "{answer}");
    server.stop().await;

    // Without the archive, search is refused in words.
    let server = common::start(common::config()).await;
    let mut sio = SocketIo::connect(server.addr, "sio").await;
    let answer = sio.emit("search", search("deploy", None)).await;
    assert_eq!(code(&answer).as_deref(), Some("unavailable"), "{answer}");
    assert!(
        answer["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("archive")),
        "{answer}"
    );
    server.stop().await;
}
