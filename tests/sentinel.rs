//! Sentinel mode with real processes: a master, two replicas and three sentinels (all
//! `redis-server`, on free ports, with short failure-detection times), scalechat nodes that
//! find the master through the sentinels, and a master killed with SIGKILL under traffic or
//! demoted by `SENTINEL FAILOVER`; with a PostgreSQL cluster, the archive through both.

mod common;

use common::backplane::free_port;
use common::within;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use common::postgres::Postgres;
use common::{Client, http_get, readyz};
use serde_json::Value;
use tokio::net::TcpStream;
use tokio::process::{Child, Command};
use tokio::time::Instant;

/// How long a failover may take to be noticed and carried out by the sentinels.
const DOWN_AFTER_MS: u64 = 1000;
/// The bound this test holds a failover to: from the master's death to the first `send`
/// acked by the new master (detection `DOWN_AFTER_MS`, the sentinels' vote and promotion,
/// then the node's reconnect with its backoff of at most 5 s).
const RESUME_WITHIN: Duration = Duration::from_secs(15);

/// One `redis-server` process of the topology.
struct Server {
    port: u16,
    child: Option<Child>,
}

impl Server {
    fn spawn(port: u16, args: &[&str]) -> Server {
        let child = Command::new("redis-server")
            .args(args)
            .stdout(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("redis-server is installed");
        Server {
            port,
            child: Some(child),
        }
    }

    async fn answers(&self) {
        let port = self.port;
        within(Duration::from_secs(10), "redis answers", || async move {
            TcpStream::connect(("127.0.0.1", port)).await.is_ok()
        })
        .await;
    }

    async fn query<T: redis::FromRedisValue>(&self, cmd: &redis::Cmd) -> Option<T> {
        let client = redis::Client::open(format!("redis://127.0.0.1:{}/", self.port)).ok()?;
        let mut conn = client.get_multiplexed_async_connection().await.ok()?;
        cmd.query_async(&mut conn).await.ok()
    }
}

/// A master, its two replicas and three sentinels watching it as `mymaster`. Two replicas,
/// so that after a failover the new master still has one for `redis.wait_replicas = 1`.
struct Topology {
    master: Server,
    replicas: Vec<Server>,
    sentinels: Vec<Server>,
    dir: PathBuf,
}

impl Topology {
    /// The ports the sentinels will listen on, chosen before they start.
    fn sentinel_ports() -> Vec<u16> {
        (0..3).map(|_| free_port()).collect()
    }

    async fn start(sentinel_ports: &[u16]) -> Topology {
        let dir = std::env::temp_dir().join(format!(
            "scalechat-sentinel-{}-{}",
            std::process::id(),
            free_port()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let data = |port: u16| {
            let d = dir.join(port.to_string());
            std::fs::create_dir_all(&d).unwrap();
            d.display().to_string()
        };
        let base = ["--bind", "127.0.0.1", "--save", "", "--appendonly", "no"];
        let master_port = free_port();
        let mp = master_port.to_string();
        let master = Server::spawn(
            master_port,
            &[&["--port", &mp, "--dir", &data(master_port)], &base[..]].concat(),
        );
        master.answers().await;
        let mut replicas = Vec::new();
        for _ in 0..2 {
            let replica_port = free_port();
            let rp = replica_port.to_string();
            let replica = Server::spawn(
                replica_port,
                &[
                    &["--port", &rp, "--dir", &data(replica_port)],
                    &base[..],
                    &["--replicaof", "127.0.0.1", &mp],
                ]
                .concat(),
            );
            replica.answers().await;
            replicas.push(replica);
        }
        let mut sentinels = Vec::new();
        for &port in sentinel_ports {
            let conf = dir.join(format!("sentinel-{port}.conf"));
            std::fs::write(
                &conf,
                format!(
                    "port {port}\nbind 127.0.0.1\ndir {}\n\
                     sentinel monitor mymaster 127.0.0.1 {master_port} 2\n\
                     sentinel down-after-milliseconds mymaster {DOWN_AFTER_MS}\n\
                     sentinel failover-timeout mymaster 3000\n\
                     sentinel parallel-syncs mymaster 1\n",
                    dir.display()
                ),
            )
            .unwrap();
            let sentinel = Server::spawn(port, &[&conf.display().to_string(), "--sentinel"]);
            sentinel.answers().await;
            sentinels.push(sentinel);
        }
        let topology = Topology {
            master,
            replicas,
            sentinels,
            dir,
        };
        topology.settled().await;
        topology
    }

    /// Waits until the replicas are in sync and every sentinel knows the other two and the
    /// replicas, so that a failover can be voted.
    async fn settled(&self) {
        for replica in &self.replicas {
            within(
                Duration::from_secs(20),
                "the replica syncs",
                || async move {
                    let info: Option<String> =
                        replica.query(redis::cmd("INFO").arg("replication")).await;
                    info.is_some_and(|i| i.contains("master_link_status:up"))
                },
            )
            .await;
        }
        for sentinel in &self.sentinels {
            within(
                Duration::from_secs(20),
                "sentinels know each other",
                || async move {
                    let master: Option<Vec<String>> = sentinel
                        .query(redis::cmd("SENTINEL").arg("MASTER").arg("mymaster"))
                        .await;
                    let field = |name: &str| {
                        master.as_ref().and_then(|m| {
                            let at = m.iter().position(|f| f == name)?;
                            m.get(at + 1).cloned()
                        })
                    };
                    field("num-other-sentinels").as_deref() == Some("2")
                        && field("num-slaves").as_deref() == Some("2")
                },
            )
            .await;
        }
    }

    /// The master's port as the sentinels see it.
    async fn master_port(&self) -> Option<u16> {
        let (_, port): (String, u16) = self.sentinels[0]
            .query(
                redis::cmd("SENTINEL")
                    .arg("GET-MASTER-ADDR-BY-NAME")
                    .arg("mymaster"),
            )
            .await?;
        Some(port)
    }

    fn addresses(ports: &[u16]) -> String {
        ports
            .iter()
            .map(|p| format!("127.0.0.1:{p}"))
            .collect::<Vec<_>>()
            .join(",")
    }
}

impl Drop for Topology {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A scalechat process in sentinel mode.
struct Node {
    addr: SocketAddr,
    _child: Child,
}

impl Node {
    fn spawn(name: &str, sentinels: &str, master_name: &str, wait_replicas: u32) -> Node {
        Node::spawn_with(
            name,
            &[
                ("SCALECHAT_REDIS__MODE", "sentinel"),
                ("SCALECHAT_REDIS__WAIT_REPLICAS", &wait_replicas.to_string()),
                ("REDIS_SENTINELS", sentinels),
                ("REDIS_MASTER_NAME", master_name),
            ],
        )
    }

    /// A node in sentinel mode that archives to PostgreSQL at `url`.
    fn archiving(name: &str, sentinels: &str, wait_replicas: u32, url: &str) -> Node {
        Node::spawn_with(
            name,
            &[
                ("SCALECHAT_REDIS__MODE", "sentinel"),
                ("SCALECHAT_REDIS__WAIT_REPLICAS", &wait_replicas.to_string()),
                ("REDIS_SENTINELS", sentinels),
                ("REDIS_MASTER_NAME", "mymaster"),
                ("DATABASE_URL", url),
                ("SCALECHAT_ARCHIVE__TIMEOUT_SECS", "2"),
            ],
        )
    }

    /// Two archiving nodes (`node-a`, `node-b`), both ready.
    async fn archiving_pair(sentinels: &str, wait_replicas: u32, url: &str) -> [Node; 2] {
        let nodes = [
            Node::archiving("node-a", sentinels, wait_replicas, url),
            Node::archiving("node-b", sentinels, wait_replicas, url),
        ];
        for node in &nodes {
            node.ready(Duration::from_secs(10)).await;
        }
        nodes
    }

    /// A node in standalone mode, of the server at `redis_port`.
    fn standalone(name: &str, redis_port: u16) -> Node {
        Node::spawn_with(
            name,
            &[
                ("REDIS_HOST", "127.0.0.1"),
                ("REDIS_PORT", &redis_port.to_string()),
            ],
        )
    }

    fn spawn_with(name: &str, env: &[(&str, &str)]) -> Node {
        let port = free_port();
        let child = Command::new(env!("CARGO_BIN_EXE_scalechat"))
            .current_dir(std::env::temp_dir())
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("PORT", port.to_string())
            .env("SCALECHAT_SERVER__HOST", "127.0.0.1")
            .env("SCALECHAT_SERVER__NODE_ID", name)
            .env("SCALECHAT_LIMITS__MESSAGES_PER_SECOND", "100000")
            .env("SCALECHAT_LIMITS__MESSAGE_BURST", "100000")
            .env("SCALECHAT_ROOMS__HISTORY_SIZE", "2000")
            .env("SCALECHAT_TRANSPORT", "redis")
            .env("SCALECHAT_REDIS__PUBLISH_TIMEOUT_MS", "1000")
            .envs(env.iter().copied())
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("spawn scalechat");
        Node {
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
            _child: child,
        }
    }

    async fn ready(&self, limit: Duration) {
        let addr = self.addr;
        within(limit, "node ready", || async move {
            readyz(addr).await == Some(200)
        })
        .await;
    }

    /// Waits until the node answers `/readyz`, ready or not.
    async fn listening(&self) {
        let addr = self.addr;
        within(Duration::from_secs(10), "node listening", || async move {
            readyz(addr).await.is_some()
        })
        .await;
    }

    async fn client(&self, name: &str) -> Client {
        let mut c = Client::connect(&format!("ws://{}/ws?name={name}", self.addr)).await;
        c.expect("welcome").await;
        c.joined().await;
        c
    }

    async fn metric(&self, name: &str) -> f64 {
        let (_, text) = http_get(self.addr, "/metrics", &[]).await;
        text.lines()
            .find_map(|l| l.strip_prefix(name)?.trim().parse().ok())
            .unwrap_or(-1.0)
    }
}

/// Sends `text` with `reference` until it is acked, resending with the same `ref` after each
/// `unavailable`; returns the id. Chat messages arriving meanwhile are left out.
async fn send_until_acked(c: &mut Client, text: &str, reference: &str) -> u64 {
    let deadline = Instant::now() + RESUME_WITHIN * 2;
    c.say("general", text, reference).await;
    loop {
        assert!(Instant::now() < deadline, "{reference} never acked");
        let frame = c.recv().await;
        match frame["type"].as_str() {
            Some("ack") if frame["ref"] == reference => return frame["id"].as_u64().unwrap(),
            Some("error") if frame["ref"] == reference => {
                assert_eq!(frame["code"], "unavailable", "{frame}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                c.say("general", text, reference).await;
            }
            _ => {}
        }
    }
}

/// Reads `c`'s chat messages until one with `text` arrived; returns them all.
async fn read_until(c: &mut Client, text: &str) -> Vec<Value> {
    let mut out = Vec::new();
    loop {
        let frame = c.recv().await;
        if frame["type"] == "message" {
            let last = frame["message"] == text;
            out.push(frame);
            if last {
                return out;
            }
        }
    }
}

#[tokio::test]
async fn a_master_killed_under_traffic_fails_over_without_losing_an_acked_message() {
    let ports = Topology::sentinel_ports();
    let mut topology = Topology::start(&ports).await;
    let sentinels = Topology::addresses(&ports);
    let nodes = [
        Node::spawn("node-a", &sentinels, "mymaster", 1),
        Node::spawn("node-b", &sentinels, "mymaster", 1),
        Node::spawn("node-c", &sentinels, "mymaster", 1),
    ];
    for node in &nodes {
        node.ready(Duration::from_secs(10)).await;
    }
    let mut sender = nodes[0].client("ann").await;
    let mut b = nodes[1].client("bob").await;
    let mut c = nodes[2].client("cy").await;

    let mut acked = Vec::new();
    for n in 0..20 {
        acked.push(send_until_acked(&mut sender, &format!("m{n}"), &format!("r{n}")).await);
    }
    let old_master = topology.master.port;
    let killed_at = Instant::now();
    topology.master.child.take().unwrap().kill().await.unwrap();
    let mut resumed = None;
    for n in 20..60 {
        let id = send_until_acked(&mut sender, &format!("m{n}"), &format!("r{n}")).await;
        resumed.get_or_insert_with(|| killed_at.elapsed());
        acked.push(id);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let resumed = resumed.unwrap();
    println!("first send acked {resumed:?} after the master was killed");
    assert!(resumed < RESUME_WITHIN, "resumed after {resumed:?}");
    assert_ne!(topology.master_port().await, Some(old_master));

    for client in [&mut b, &mut c] {
        let got = read_until(client, "m59").await;
        let ids: Vec<u64> = got.iter().map(|m| m["id"].as_u64().unwrap()).collect();
        assert!(
            ids.windows(2).all(|w| w[0] < w[1]),
            "ids in order, each once: {ids:?}"
        );
        let texts: Vec<&str> = got.iter().map(|m| m["message"].as_str().unwrap()).collect();
        for n in 0..60 {
            let text = format!("m{n}");
            let copies = texts.iter().filter(|t| **t == text).count();
            assert_eq!(copies, 1, "{text} delivered once: {texts:?}");
        }
        for id in &acked {
            assert!(ids.contains(id), "acked id {id} delivered: {ids:?}");
        }
    }
    for node in &nodes {
        assert!(node.metric("scalechat_backplane_failovers_total").await >= 1.0);
        assert_eq!(readyz(node.addr).await, Some(200));
    }
    // A node started after the failover finds the new master and has every acked message.
    let late = Node::spawn("node-d", &sentinels, "mymaster", 1);
    late.ready(Duration::from_secs(10)).await;
    let mut d = Client::connect(&format!("ws://{}/ws?name=dee", late.addr)).await;
    d.expect("welcome").await;
    let (joined, history) = d.joined().await;
    assert_eq!(joined["last_id"].as_u64(), acked.last().copied());
    assert_eq!(history.last().unwrap()["message"], "m59");
}

#[tokio::test]
async fn a_wrong_master_name_or_unreachable_sentinels_keep_the_node_unready_until_fixed() {
    let ports = Topology::sentinel_ports();
    let sentinels = Topology::addresses(&ports);
    // Nothing listens on the sentinels' ports yet.
    let early = Node::spawn("node-early", &sentinels, "mymaster", 0);
    let topology = Topology::start(&ports).await;
    let wrong = Node::spawn("node-wrong", &sentinels, "nosuchmaster", 0);
    // The node that started before the sentinels kept asking and finds the master.
    early.ready(Duration::from_secs(15)).await;
    let mut ann = early.client("ann").await;
    send_until_acked(&mut ann, "hello", "h1").await;
    wrong.listening().await;
    for _ in 0..10 {
        assert_eq!(readyz(wrong.addr).await, Some(503), "no such master");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    drop(topology);
}

#[tokio::test]
async fn standalone_mode_refuses_a_replica_a_sentinel_or_a_cluster_node() {
    let ports = Topology::sentinel_ports();
    let topology = Topology::start(&ports).await;
    let cluster_port = free_port();
    let dir = topology.dir.join("cluster");
    std::fs::create_dir_all(&dir).unwrap();
    let cp = cluster_port.to_string();
    let dir = dir.display().to_string();
    let cluster_node = Server::spawn(
        cluster_port,
        &[
            "--port",
            &cp,
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--dir",
            &dir,
            "--cluster-enabled",
            "yes",
            "--cluster-port",
            &free_port().to_string(),
        ],
    );
    cluster_node.answers().await;
    let wrong = [
        Node::standalone("on-replica", topology.replicas[0].port),
        Node::standalone("on-sentinel", ports[0]),
        Node::standalone("on-cluster", cluster_port),
    ];
    let right = Node::standalone("on-master", topology.master.port);
    right.ready(Duration::from_secs(10)).await;
    for node in &wrong {
        node.listening().await;
    }
    for _ in 0..10 {
        for node in &wrong {
            assert_eq!(readyz(node.addr).await, Some(503));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The archived messages' texts, each with its number of rows.
async fn archived(pg: &Postgres) -> Vec<(String, i64)> {
    let client = pg.connect("postgres").await;
    let exists = "SELECT to_regclass('scalechat_messages') IS NOT NULL";
    if !client
        .query_one(exists, &[])
        .await
        .unwrap()
        .get::<_, bool>(0)
    {
        return Vec::new();
    }
    client
        .query(
            "SELECT text, count(*) FROM scalechat_messages GROUP BY text ORDER BY text",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|row| (row.get(0), row.get(1)))
        .collect()
}

/// Waits until the archive holds exactly `texts`, each in one row.
async fn archive_holds(pg: &Postgres, texts: &[String]) {
    let mut want: Vec<(String, i64)> = texts.iter().map(|t| (t.clone(), 1)).collect();
    want.sort();
    let deadline = Instant::now() + RESUME_WITHIN * 2;
    loop {
        let got = archived(pg).await;
        if got == want {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "the archive holds each acked message once:\n{got:?}\nwant {want:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn two_nodes_in_sentinel_mode_archive_every_acked_message_once() {
    let pg = Postgres::start().await;
    let ports = Topology::sentinel_ports();
    let topology = Topology::start(&ports).await;
    let sentinels = Topology::addresses(&ports);
    let url = pg.url();
    let nodes = Node::archiving_pair(&sentinels, 0, &url).await;
    let mut ann = nodes[0].client("ann").await;
    let mut bob = nodes[1].client("bob").await;
    ann.say_acked("a", 50).await;
    bob.say_acked("b", 50).await;
    let texts: Vec<String> = (0..50)
        .flat_map(|n| [format!("a{n}"), format!("b{n}")])
        .collect();
    archive_holds(&pg, &texts).await;
    for node in &nodes {
        assert_eq!(node.metric("scalechat_archive_missed_total").await, 0.0);
    }
    drop(topology);
}

#[tokio::test]
async fn the_archive_follows_the_master_through_a_failover_and_keeps_every_acked_message() {
    let mut pg = Postgres::start().await;
    let ports = Topology::sentinel_ports();
    let mut topology = Topology::start(&ports).await;
    let sentinels = Topology::addresses(&ports);
    let url = pg.url();
    // `wait_replicas = 1`: an ack means a replica has the message, so the failover keeps
    // every acked one (docs/redis.md); the archive must then have each of them once.
    let nodes = Node::archiving_pair(&sentinels, 1, &url).await;
    let mut ann = nodes[0].client("ann").await;
    let mut bob = nodes[1].client("bob").await;
    let mut texts = Vec::new();
    for n in 0..20 {
        let text = format!("m{n}");
        send_until_acked(&mut ann, &text, &format!("r{n}")).await;
        texts.push(text);
    }
    archive_holds(&pg, &texts).await;
    // PostgreSQL down: the nodes read what follows from the stream and hold it, pending in
    // the group; then the Redis master dies with those entries read and not acknowledged.
    pg.kill().await;
    for n in 20..40 {
        let text = format!("m{n}");
        let sender = if n % 2 == 0 { &mut ann } else { &mut bob };
        send_until_acked(sender, &text, &format!("r{n}")).await;
        texts.push(text);
    }
    let old_master = topology.master.port;
    topology.master.child.take().unwrap().kill().await.unwrap();
    pg.restart().await;
    for n in 40..60 {
        let text = format!("m{n}");
        let sender = if n % 2 == 0 { &mut ann } else { &mut bob };
        send_until_acked(sender, &text, &format!("r{n}")).await;
        texts.push(text);
    }
    assert_ne!(topology.master_port().await, Some(old_master));
    archive_holds(&pg, &texts).await;
    // A master demoted while it runs (`SENTINEL FAILOVER`) is left too: the archive goes on
    // on the next master.
    let demoted = topology.master_port().await.unwrap();
    // Refused (`NOGOODSLAVE`) until the sentinels see a replica in sync with this master.
    within(RESUME_WITHIN, "a sentinel starts a failover", || {
        let sentinel = &topology.sentinels[0];
        async move {
            let started: Option<String> = sentinel
                .query(redis::cmd("SENTINEL").arg("FAILOVER").arg("mymaster"))
                .await;
            started.is_some()
        }
    })
    .await;
    within(
        RESUME_WITHIN,
        "the sentinels promote another master",
        || {
            let topology = &topology;
            async move { topology.master_port().await.is_some_and(|p| p != demoted) }
        },
    )
    .await;
    // Until a node has followed, its sends may still reach the demoted master (which takes
    // writes until the sentinels reconfigure it) and be lost with it: the guarantee is for
    // messages acked once the nodes are on the new master.
    for node in &nodes {
        within(
            RESUME_WITHIN,
            "the node follows the new master",
            || async move {
                node.metric("scalechat_backplane_failovers_total").await >= 2.0
                    && readyz(node.addr).await == Some(200)
            },
        )
        .await;
    }
    for n in 60..80 {
        let text = format!("m{n}");
        let sender = if n % 2 == 0 { &mut ann } else { &mut bob };
        send_until_acked(sender, &text, &format!("r{n}")).await;
        texts.push(text);
    }
    archive_holds(&pg, &texts).await;
    for node in &nodes {
        assert_eq!(node.metric("scalechat_archive_missed_total").await, 0.0);
    }
}
