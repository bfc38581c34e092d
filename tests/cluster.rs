//! Cluster mode with real processes: a Redis Cluster of three masters with one or two
//! replicas each (`redis-server --cluster-enabled yes` on free ports, joined with
//! `redis-cli --cluster create`), three scalechat nodes on it, rooms spread over every shard.

mod common;

use common::backplane::free_port;
use common::within;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use common::{Client, readyz};
use futures_util::SinkExt;
use serde_json::{Value, json};
use tokio::net::TcpStream;
use tokio::process::{Child, Command};
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::Message;

async fn query<T: redis::FromRedisValue>(port: u16, cmd: &redis::Cmd) -> Option<T> {
    let client = redis::Client::open(format!("redis://127.0.0.1:{port}/")).ok()?;
    let mut conn = client.get_multiplexed_async_connection().await.ok()?;
    cmd.query_async(&mut conn).await.ok()
}

/// One cluster-enabled `redis-server` on free ports (client and bus), answering. Ports are
/// found free, released and then bound by the server, so another process may take one in
/// between: a server that exits at once is started again on other ports.
async fn start_node(dir: &std::path::Path) -> (u16, Child) {
    for _ in 0..5 {
        let port = free_port();
        let data = dir.join(port.to_string());
        std::fs::create_dir_all(&data).unwrap();
        let mut child = Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args([
                "--save",
                "",
                "--appendonly",
                "no",
                "--cluster-enabled",
                "yes",
            ])
            .args([
                "--cluster-node-timeout",
                "1000",
                "--repl-diskless-sync-delay",
                "0",
            ])
            // A free bus port of its own: the default, port + 10000, may be taken or beyond
            // 65535.
            .args(["--cluster-port", &free_port().to_string()])
            .arg("--dir")
            .arg(&data)
            .stdout(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("redis-server is installed");
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if TcpStream::connect(("127.0.0.1", port)).await.is_ok() {
                return (port, child);
            }
            if child.try_wait().expect("redis-server's status").is_some() {
                break; // a port was taken: other ports
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    panic!("no cluster-enabled redis-server answered after five starts");
}

/// Cluster-enabled servers: three masters with their replicas.
struct Cluster {
    ports: Vec<u16>,
    children: Vec<Option<Child>>,
    dir: PathBuf,
}

impl Cluster {
    async fn start() -> Cluster {
        Cluster::start_with(1).await
    }

    /// Three masters with `replicas` replicas each.
    async fn start_with(replicas: usize) -> Cluster {
        let dir = std::env::temp_dir().join(format!(
            "scalechat-cluster-{}-{}",
            std::process::id(),
            free_port()
        ));
        let mut ports = Vec::new();
        let mut children = Vec::new();
        for _ in 0..3 * (1 + replicas) {
            let (port, child) = start_node(&dir).await;
            ports.push(port);
            children.push(Some(child));
        }
        let created = Command::new("redis-cli")
            .arg("--cluster")
            .arg("create")
            .args(ports.iter().map(|p| format!("127.0.0.1:{p}")))
            .args(["--cluster-replicas", &replicas.to_string(), "--cluster-yes"])
            .output()
            .await
            .expect("redis-cli is installed");
        assert!(
            created.status.success(),
            "redis-cli --cluster create: {}",
            String::from_utf8_lossy(&created.stdout)
        );
        for &port in &ports {
            within(Duration::from_secs(20), "cluster_state:ok", || async move {
                let info: Option<String> = query(port, redis::cmd("CLUSTER").arg("INFO")).await;
                info.is_some_and(|i| i.contains("cluster_state:ok"))
            })
            .await;
            // A replica that never synced cannot take over its master.
            let synced = format!("connected_slaves:{replicas}");
            let synced = &synced;
            within(Duration::from_secs(20), "replicas in sync", || async move {
                let info: Option<String> = query(port, redis::cmd("INFO").arg("replication")).await;
                info.is_some_and(|i| {
                    i.contains("role:master") && i.contains(synced.as_str())
                        || i.contains("master_link_status:up")
                })
            })
            .await;
        }
        Cluster {
            ports,
            children,
            dir,
        }
    }

    /// The seeds, as `REDIS_HOST` takes them.
    fn seeds(&self) -> String {
        self.ports[..3]
            .iter()
            .map(|p| format!("127.0.0.1:{p}"))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// The port of the master owning `key`'s slot.
    async fn owner(&self, key: &str) -> u16 {
        let slot: u16 = query(self.ports[0], redis::cmd("CLUSTER").arg("KEYSLOT").arg(key))
            .await
            .unwrap();
        let slots: Vec<Vec<redis::Value>> = query(
            self.ports[0],
            &redis::cmd("CLUSTER").arg("SLOTS").to_owned(),
        )
        .await
        .unwrap();
        for range in slots {
            let start: u16 = redis::from_redis_value_ref(&range[0]).unwrap();
            let end: u16 = redis::from_redis_value_ref(&range[1]).unwrap();
            if (start..=end).contains(&slot) {
                let master: Vec<redis::Value> = redis::from_redis_value_ref(&range[2]).unwrap();
                return redis::from_redis_value_ref(&master[1]).unwrap();
            }
        }
        panic!("slot {slot} not covered");
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A scalechat process in cluster mode.
struct Node {
    addr: SocketAddr,
    _child: Child,
}

impl Node {
    fn spawn(name: &str, seeds: &str) -> Node {
        Node::spawn_with(name, seeds, &[])
    }

    fn spawn_with(name: &str, seeds: &str, extra: &[(&str, &str)]) -> Node {
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
            .env("SCALECHAT_LIMITS__REQUESTS_PER_SECOND", "100000")
            .env("SCALECHAT_LIMITS__REQUEST_BURST", "100000")
            .env("SCALECHAT_REDIS__MODE", "cluster")
            .env("REDIS_HOST", seeds)
            .envs(extra.iter().copied())
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

    async fn ready(&self) {
        let addr = self.addr;
        within(Duration::from_secs(15), "node ready", || async move {
            readyz(addr).await == Some(200)
        })
        .await;
    }

    /// A client in every room of `rooms`.
    async fn client(&self, name: &str, rooms: &[String]) -> Client {
        let mut c = Client::connect(&format!("ws://{}/ws?name={name}", self.addr)).await;
        c.expect("welcome").await;
        c.joined().await;
        for room in rooms {
            c.send(serde_json::json!({"type": "join", "room": room}))
                .await;
            c.joined().await;
        }
        c
    }
}

/// Reads chat messages until `count` arrived, skipping acks; by room, in arrival order.
async fn by_room(c: &mut Client, count: usize) -> HashMap<String, Vec<Value>> {
    let mut rooms: HashMap<String, Vec<Value>> = HashMap::new();
    let mut got = 0;
    while got < count {
        let f = c.recv().await;
        if f["type"] == "message" {
            rooms
                .entry(f["room"].as_str().unwrap().to_owned())
                .or_default()
                .push(f);
            got += 1;
        }
    }
    rooms
}

#[tokio::test]
async fn three_nodes_chat_over_a_three_shard_cluster_with_sharded_pubsub() {
    let cluster = Cluster::start().await;
    let seeds = cluster.seeds();
    // A seed list may hold unreachable entries: the others are enough.
    let with_a_dead_seed = format!("127.0.0.1:{},{seeds}", free_port());
    // Acks wait for each master's replica (WAIT goes to every master, the least count wins).
    let wait = [("SCALECHAT_REDIS__WAIT_REPLICAS", "1")];
    let nodes = [
        Node::spawn_with("node-a", &seeds, &wait),
        Node::spawn_with("node-b", &seeds, &wait),
        Node::spawn_with("node-c", &with_a_dead_seed, &wait),
    ];
    for node in &nodes {
        node.ready().await;
    }
    // Rooms until every master owns at least two.
    let mut rooms = Vec::new();
    let mut per_master: HashMap<u16, usize> = HashMap::new();
    for n in 0.. {
        let room = format!("room{n}");
        *per_master
            .entry(cluster.owner(&format!("{{{room}}}")).await)
            .or_default() += 1;
        rooms.push(room);
        if per_master.len() == 3 && per_master.values().all(|c| *c >= 2) {
            break;
        }
    }
    let mut clients = Vec::new();
    for (node, name) in nodes.iter().zip(["ann", "bob", "cy"]) {
        clients.push(node.client(name, &rooms).await);
    }
    const EACH: usize = 5;
    for (c, who) in clients.iter_mut().zip(["a", "b", "c"]) {
        for room in &rooms {
            for n in 0..EACH {
                c.say(room, &format!("{who}{n}"), &format!("{who}-{room}-{n}"))
                    .await;
            }
        }
    }
    let total = rooms.len() * EACH * 3;
    let mut seen = Vec::new();
    for c in &mut clients {
        seen.push(by_room(c, total).await);
    }
    for room in &rooms {
        let ids: Vec<u64> = seen[0][room]
            .iter()
            .map(|m| m["id"].as_u64().unwrap())
            .collect();
        assert_eq!(ids, (1..=(EACH * 3) as u64).collect::<Vec<_>>(), "{room}");
        assert_eq!(seen[1][room], seen[0][room], "{room}: same order on node b");
        assert_eq!(seen[2][room], seen[0][room], "{room}: same order on node c");
    }
    // Each room's keys live on the master owning its slot: every master holds some.
    for master in per_master.keys() {
        let keys: u64 = query(*master, &redis::cmd("DBSIZE")).await.unwrap();
        assert!(keys > 0, "master {master} holds rooms");
    }
    // Sharded Pub/Sub: each node subscribed to the room on the shard owning it.
    let owner = cluster.owner(&format!("{{{}}}", rooms[0])).await;
    let (_, subscribers): (String, u64) = query(
        owner,
        redis::cmd("PUBSUB")
            .arg("SHARDNUMSUB")
            .arg(format!("scalechat:room:{{{}}}", rooms[0])),
    )
    .await
    .unwrap();
    assert_eq!(subscribers, 3, "one sharded subscription per node");
    // A client joining later on another node gets the history from the room's shard.
    let mut late = Client::connect(&format!(
        "ws://{}/ws?name=dee&room={}",
        nodes[1].addr, rooms[0]
    ))
    .await;
    late.expect("welcome").await;
    let (joined, history) = late.joined().await;
    assert_eq!(joined["last_id"], (EACH * 3) as u64);
    assert_eq!(history.last(), seen[0][&rooms[0]].last());
}
/// Sends `text` with `reference` until it is acked, resending with the same `ref` after each
/// `unavailable`; returns the id. Chat messages arriving meanwhile are left out.
async fn send_until_acked(c: &mut Client, room: &str, text: &str, reference: &str) -> u64 {
    let deadline = Instant::now() + RESUME_WITHIN * 2;
    c.say(room, text, reference).await;
    loop {
        assert!(Instant::now() < deadline, "{reference} never acked");
        let frame = c.recv().await;
        match frame["type"].as_str() {
            Some("ack") if frame["ref"] == reference => return frame["id"].as_u64().unwrap(),
            Some("error") if frame["ref"] == reference => {
                assert_eq!(frame["code"], "unavailable", "{frame}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                c.say(room, text, reference).await;
            }
            _ => {}
        }
    }
}

/// The bound this test holds a shard's failover to: from its master's death to the first
/// `send` acked again in a room it owned (`cluster-node-timeout` 1 s, the replica's election,
/// the nodes' reconnect with a backoff of at most 5 s).
const RESUME_WITHIN: Duration = Duration::from_secs(20);

#[tokio::test]
async fn a_shard_master_killed_under_traffic_fails_over_without_losing_an_acked_message() {
    // Two replicas per master, so the promoted one still has one for `wait_replicas = 1`.
    let mut cluster = Cluster::start_with(2).await;
    let seeds = cluster.seeds();
    let wait = [("SCALECHAT_REDIS__WAIT_REPLICAS", "1")];
    let nodes = [
        Node::spawn_with("node-a", &seeds, &wait),
        Node::spawn_with("node-b", &seeds, &wait),
        Node::spawn_with("node-c", &seeds, &wait),
    ];
    for node in &nodes {
        node.ready().await;
    }
    let room = "busy".to_owned();
    let rooms = [room.clone()];
    let mut sender = nodes[0].client("ann", &rooms).await;
    let mut b = nodes[1].client("bob", &rooms).await;
    let mut c = nodes[2].client("cy", &rooms).await;
    let mut acked = Vec::new();
    for n in 0..20 {
        acked.push(send_until_acked(&mut sender, &room, &format!("m{n}"), &format!("r{n}")).await);
    }
    let owner = cluster.owner("{busy}").await;
    let at = cluster.ports.iter().position(|p| *p == owner).unwrap();
    let killed_at = Instant::now();
    cluster.children[at].take().unwrap().kill().await.unwrap();
    let mut resumed = None;
    for n in 20..60 {
        acked.push(send_until_acked(&mut sender, &room, &format!("m{n}"), &format!("r{n}")).await);
        resumed.get_or_insert_with(|| killed_at.elapsed());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let resumed = resumed.unwrap();
    println!("first send acked {resumed:?} after the shard's master was killed");
    assert!(resumed < RESUME_WITHIN, "resumed after {resumed:?}");
    for client in [&mut b, &mut c] {
        let mut got = Vec::new();
        loop {
            let f = client.recv().await;
            if f["type"] == "message" {
                let last = f["message"] == "m59";
                got.push(f);
                if last {
                    break;
                }
            }
        }
        let ids: Vec<u64> = got.iter().map(|m| m["id"].as_u64().unwrap()).collect();
        assert!(
            ids.windows(2).all(|w| w[0] < w[1]),
            "in order, each once: {ids:?}"
        );
        let texts: Vec<&str> = got.iter().map(|m| m["message"].as_str().unwrap()).collect();
        for id in &acked {
            assert!(ids.contains(id), "acked id {id} delivered: {ids:?}");
        }
        for n in 0..60 {
            let text = format!("m{n}");
            assert_eq!(
                texts.iter().filter(|t| **t == text).count(),
                1,
                "{text}: {texts:?}"
            );
        }
    }
}

/// Moves `slot` from the master at `from` to the one at `to`, keys and all, as
/// `redis-cli --cluster reshard` does: IMPORTING / MIGRATING, MIGRATE in batches, then the new
/// owner announced to every master.
async fn migrate_slot(cluster: &Cluster, slot: u16, from: u16, to: u16) {
    let id = |port: u16| async move {
        query::<String>(port, redis::cmd("CLUSTER").arg("MYID"))
            .await
            .unwrap()
    };
    let (from_id, to_id) = (id(from).await, id(to).await);
    let setslot = |port: u16, how: &'static str, node: String| async move {
        let _: () = query(
            port,
            redis::cmd("CLUSTER")
                .arg("SETSLOT")
                .arg(slot)
                .arg(how)
                .arg(node),
        )
        .await
        .unwrap_or_else(|| panic!("SETSLOT {how} on {port}"));
    };
    setslot(to, "IMPORTING", from_id.clone()).await;
    setslot(from, "MIGRATING", to_id.clone()).await;
    loop {
        let keys: Vec<String> = query(
            from,
            redis::cmd("CLUSTER")
                .arg("GETKEYSINSLOT")
                .arg(slot)
                .arg(100),
        )
        .await
        .unwrap();
        if keys.is_empty() {
            break;
        }
        let _: () = query(
            from,
            redis::cmd("MIGRATE")
                .arg("127.0.0.1")
                .arg(to)
                .arg("")
                .arg(0)
                .arg(5000)
                .arg("KEYS")
                .arg(&keys),
        )
        .await
        .expect("MIGRATE");
        // A little traffic lands between batches.
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    setslot(to, "NODE", to_id.clone()).await;
    setslot(from, "NODE", to_id.clone()).await;
    for &port in &cluster.ports {
        let info: Option<String> = query(port, redis::cmd("INFO").arg("replication")).await;
        if info.is_some_and(|i| i.contains("role:master")) && port != from && port != to {
            setslot(port, "NODE", to_id.clone()).await;
        }
    }
}

#[tokio::test]
async fn a_busy_room_migrated_to_another_shard_loses_and_repeats_nothing() {
    let cluster = Cluster::start().await;
    let seeds = cluster.seeds();
    let nodes = [
        Node::spawn("node-a", &seeds),
        Node::spawn("node-b", &seeds),
        Node::spawn("node-c", &seeds),
    ];
    for node in &nodes {
        node.ready().await;
    }
    let room = "busy".to_owned();
    let rooms = [room.clone()];
    let mut sender = nodes[0].client("ann", &rooms).await;
    let mut b = nodes[1].client("bob", &rooms).await;
    let mut c = nodes[2].client("cy", &rooms).await;
    for n in 0..20 {
        send_until_acked(&mut sender, &room, &format!("m{n}"), &format!("r{n}")).await;
    }
    let from = cluster.owner("{busy}").await;
    let to = cluster.ports[..3]
        .iter()
        .copied()
        .find(|p| *p != from)
        .unwrap();
    let slot: u16 = query(from, redis::cmd("CLUSTER").arg("KEYSLOT").arg("{busy}"))
        .await
        .unwrap();
    let mut acked = Vec::new();
    let traffic = async {
        for n in 20..80 {
            acked.push(
                send_until_acked(&mut sender, &room, &format!("m{n}"), &format!("r{n}")).await,
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    };
    let migration = async {
        tokio::time::sleep(Duration::from_millis(100)).await;
        migrate_slot(&cluster, slot, from, to).await;
    };
    tokio::join!(traffic, migration);
    assert_eq!(cluster.owner("{busy}").await, to, "the slot moved");
    for client in [&mut b, &mut c] {
        let mut got = Vec::new();
        loop {
            let f = client.recv().await;
            if f["type"] == "message" {
                let last = f["message"] == "m79";
                got.push(f);
                if last {
                    break;
                }
            }
        }
        let ids: Vec<u64> = got.iter().map(|m| m["id"].as_u64().unwrap()).collect();
        assert_eq!(
            ids,
            (1..=80).collect::<Vec<u64>>(),
            "every id once, in order"
        );
        let texts: Vec<&str> = got.iter().map(|m| m["message"].as_str().unwrap()).collect();
        let due: Vec<String> = (0..80).map(|n| format!("m{n}")).collect();
        assert_eq!(texts, due);
    }
    // Sent after the move, still delivered: the nodes subscribe on the new owner.
    send_until_acked(&mut sender, &room, "after", "after").await;
    assert_eq!(b.expect_chat().await["message"], "after");
    assert_eq!(c.expect_chat().await["message"], "after");
}

/// Sends without waiting for acks while the room's slot moves: the node's cluster connection
/// follows `ASK` and `MOVED` request by request, but a connection's sends reach the room one
/// script call at a time, so the acked ones keep the order sent, on every node.
#[tokio::test]
async fn sends_back_to_back_keep_their_order_while_the_room_migrates() {
    let cluster = Cluster::start().await;
    let seeds = cluster.seeds();
    let nodes = [Node::spawn("node-a", &seeds), Node::spawn("node-b", &seeds)];
    for node in &nodes {
        node.ready().await;
    }
    let rooms = ["busy".to_owned()];
    let mut sender = nodes[0].client("ann", &rooms).await;
    let mut bob = nodes[1].client("bob", &rooms).await;
    let from = cluster.owner("{busy}").await;
    let to = cluster.ports[..3]
        .iter()
        .copied()
        .find(|p| *p != from)
        .unwrap();
    let slot: u16 = query(from, redis::cmd("CLUSTER").arg("KEYSLOT").arg("{busy}"))
        .await
        .unwrap();
    const COUNT: usize = 200;
    let traffic = async {
        for n in 0..COUNT {
            let send = json!({"type":"send","room":"busy","message":format!("m{n}"),"ref":format!("r{n}")});
            sender
                .ws
                .feed(Message::text(send.to_string()))
                .await
                .unwrap();
            if n % 20 == 19 {
                sender.ws.flush().await.unwrap();
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }
        sender.ws.flush().await.unwrap();
    };
    let migration = async {
        tokio::time::sleep(Duration::from_millis(20)).await;
        migrate_slot(&cluster, slot, from, to).await;
    };
    tokio::join!(traffic, migration);
    // Every send is answered, in the order sent; the acked ones got growing ids.
    let (mut acked, mut answered, mut last_id) = (Vec::new(), 0, 0);
    while answered < COUNT {
        let f = sender.recv().await;
        match f["type"].as_str() {
            Some("ack") => {
                assert_eq!(f["ref"], format!("r{answered}"), "{f}");
                let id = f["id"].as_u64().unwrap();
                assert!(id > last_id, "id {id} acked after {last_id}");
                last_id = id;
                acked.push(format!("m{answered}"));
                answered += 1;
            }
            Some("error") => {
                assert_eq!(f["ref"], format!("r{answered}"), "{f}");
                assert_eq!(f["code"], "unavailable", "{f}");
                answered += 1;
            }
            Some("message") => {}
            _ => panic!("unexpected {f}"),
        }
    }
    assert!(acked.len() > COUNT / 2, "most were acked: {}", acked.len());
    // Bob sees every acked message, in the order sent (one refused after a timeout may
    // still come, anywhere: it is left out).
    let mut seen = Vec::new();
    while seen.len() < acked.len() {
        let f = bob.recv().await;
        if f["type"] == "message" {
            let text = f["message"].as_str().unwrap().to_owned();
            if acked.contains(&text) {
                seen.push(text);
            }
        }
    }
    assert_eq!(seen, acked);
}

#[tokio::test]
async fn a_server_not_in_cluster_mode_or_a_cluster_with_a_slot_uncovered_keeps_the_node_unready() {
    let plain_port = free_port();
    let _plain = Command::new("redis-server")
        .args([
            "--port",
            &plain_port.to_string(),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
        ])
        .args(["--appendonly", "no", "--dir", "/tmp"])
        .stdout(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("redis-server is installed");
    within(Duration::from_secs(10), "redis answers", || async move {
        TcpStream::connect(("127.0.0.1", plain_port)).await.is_ok()
    })
    .await;
    let cluster = Cluster::start().await;
    // One slot of the first master no longer served: the cluster is down.
    let slot: u16 = query(
        cluster.ports[0],
        redis::cmd("CLUSTER").arg("KEYSLOT").arg("{busy}"),
    )
    .await
    .unwrap();
    for &port in &cluster.ports {
        let _: Option<()> = query(port, redis::cmd("CLUSTER").arg("DELSLOTS").arg(slot)).await;
    }
    let owner_less = cluster.ports[0];
    within(
        Duration::from_secs(20),
        "cluster_state:fail",
        || async move {
            let info: Option<String> = query(owner_less, redis::cmd("CLUSTER").arg("INFO")).await;
            info.is_some_and(|i| i.contains("cluster_state:fail"))
        },
    )
    .await;
    let wrong = [
        Node::spawn("on-plain", &format!("127.0.0.1:{plain_port}")),
        Node::spawn("on-broken", &cluster.seeds()),
    ];
    for node in &wrong {
        let addr = node.addr;
        within(Duration::from_secs(10), "node listening", || async move {
            readyz(addr).await.is_some()
        })
        .await;
    }
    for _ in 0..10 {
        for node in &wrong {
            assert_eq!(readyz(node.addr).await, Some(503));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// `POST path` with the API key; the status code.
async fn api_post(addr: SocketAddr, path: &str) -> u16 {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = TcpStream::connect(addr).await.unwrap();
    let request = format!(
        "POST {path} HTTP/1.1\r\nhost: test\r\nconnection: close\r\n\
         authorization: Bearer {API_KEY}\r\ncontent-type: application/json\r\n\
         content-length: 2\r\n\r\n{{}}"
    );
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut answer = Vec::new();
    tokio::time::timeout(common::WAIT, stream.read_to_end(&mut answer))
        .await
        .expect("an answer in time")
        .unwrap();
    String::from_utf8_lossy(&answer)[9..12].parse().unwrap()
}

const API_KEY: &str = "cluster-test-key-0123456789";

#[tokio::test]
async fn a_disconnect_asked_of_one_node_reaches_a_user_on_another() {
    let cluster = Cluster::start().await;
    let seeds = cluster.seeds();
    let keys = format!("[\"{API_KEY}\"]");
    let api = [("SCALECHAT_API__KEYS", keys.as_str())];
    let a = Node::spawn_with("node-a", &seeds, &api);
    let b = Node::spawn_with("node-b", &seeds, &api);
    a.ready().await;
    b.ready().await;
    let mut bea = b.client("bea", &[]).await;
    assert_eq!(api_post(a.addr, "/api/v1/users/bea/disconnect").await, 200);
    let (code, _, _) = bea.closed().await;
    assert_eq!(code, 4003, "closed through the control channel");
}
