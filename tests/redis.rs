//! Many nodes, one chat: real scalechat processes sharing rooms through a real
//! `redis-server` that each test starts on a free port (and stops, kills and restarts).

mod common;

use std::net::SocketAddr;
use std::process::Stdio;
use std::time::Duration;

use common::{Client, eventually_async, readyz};
use serde_json::Value;
use tokio::net::TcpStream;
use tokio::process::{Child, Command};

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port()
}

/// A `redis-server` of this test's own, keeping nothing on disk.
struct Redis {
    port: u16,
    password: Option<&'static str>,
    child: Option<Child>,
}

impl Redis {
    async fn start(password: Option<&'static str>) -> Redis {
        let mut redis = Redis {
            port: free_port(),
            password,
            child: None,
        };
        redis.restart().await;
        redis
    }

    /// (Re)starts the server on the same port and waits until it answers.
    async fn restart(&mut self) {
        let mut cmd = Command::new("redis-server");
        cmd.args(["--port", &self.port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no", "--dir", "/tmp"])
            .stdout(Stdio::null())
            .kill_on_drop(true);
        if let Some(pw) = self.password {
            cmd.args(["--requirepass", pw]);
        }
        self.child = Some(cmd.spawn().expect("redis-server is installed"));
        let port = self.port;
        common::eventually_async("redis answers", || async move {
            TcpStream::connect(("127.0.0.1", port)).await.is_ok()
        })
        .await;
    }

    /// Kills the server (SIGKILL) and waits for it to be gone.
    async fn kill(&mut self) {
        let mut child = self.child.take().expect("running");
        child.kill().await.unwrap();
    }

    async fn conn(&self) -> redis::aio::MultiplexedConnection {
        let url = match self.password {
            Some(pw) => format!("redis://:{pw}@127.0.0.1:{}/", self.port),
            None => format!("redis://127.0.0.1:{}/", self.port),
        };
        redis::Client::open(url)
            .unwrap()
            .get_multiplexed_async_connection()
            .await
            .unwrap()
    }

    /// Subscribers of a room's channel (one per interested node).
    async fn numsub(&self, room: &str) -> u64 {
        let (_, n): (String, u64) = redis::cmd("PUBSUB")
            .arg("NUMSUB")
            .arg(format!("scalechat:room:{room}"))
            .query_async(&mut self.conn().await)
            .await
            .unwrap();
        n
    }
}

/// A scalechat process on a free port.
struct Node {
    addr: SocketAddr,
    child: Child,
    name: String,
}

impl Node {
    async fn start(name: &str, redis: &Redis, password: Option<&str>) -> Node {
        let node = Node::spawn(name, redis, password);
        let addr = node.addr;
        eventually_async(
            "node ready",
            || async move { readyz(addr).await == Some(200) },
        )
        .await;
        node
    }

    fn spawn(name: &str, redis: &Redis, password: Option<&str>) -> Node {
        let port = free_port();
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_scalechat"));
        cmd.current_dir(std::env::temp_dir())
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("PORT", port.to_string())
            .env("SCALECHAT_SERVER__HOST", "127.0.0.1")
            .env("SCALECHAT_SERVER__NODE_ID", name)
            .env("SCALECHAT_LIMITS__MESSAGES_PER_SECOND", "100000")
            .env("SCALECHAT_LIMITS__MESSAGE_BURST", "100000")
            .env("REDIS_HOST", "127.0.0.1")
            .env("REDIS_PORT", redis.port.to_string())
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .kill_on_drop(true);
        if let Some(pw) = password {
            cmd.env("REDIS_PASSWORD", pw);
        }
        Node {
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
            child: cmd.spawn().expect("spawn scalechat"),
            name: name.into(),
        }
    }

    async fn client(&self, query: &str) -> Client {
        let mut c = Client::connect(&format!("ws://{}/ws?{query}", self.addr)).await;
        let welcome = c.expect("welcome").await;
        assert_eq!(welcome["node"], self.name.as_str());
        c.expect("joined").await;
        c
    }
}

/// Sends `EACH` messages, every other one to dev when `dev`.
async fn send(client: &mut Client, who: &str, dev: bool) {
    for n in 0..EACH {
        let room = if dev && n % 2 == 0 { "dev" } else { "general" };
        client
            .say(room, &format!("{who}{n}"), &format!("{who}-{n}"))
            .await;
    }
}

const EACH: usize = 30;

/// Reads until `count` chat messages arrived, skipping acks.
async fn messages(c: &mut Client, count: usize) -> Vec<Value> {
    let mut out = Vec::new();
    while out.len() < count {
        let f = c.recv().await;
        match f["type"].as_str() {
            Some("message") => out.push(f),
            Some("ack") => {}
            _ => panic!("unexpected {f}"),
        }
    }
    out
}

#[tokio::test]
async fn three_nodes_share_rooms_with_one_order_and_only_interested_nodes_subscribe() {
    let redis = Redis::start(None).await;
    let nodes = [
        Node::start("node-a", &redis, None).await,
        Node::start("node-b", &redis, None).await,
        Node::start("node-c", &redis, None).await,
    ];
    let mut a = nodes[0].client("name=ann").await;
    a.join("dev").await;
    let mut b = nodes[1].client("name=bob").await;
    let mut b_dev = nodes[1].client("name=bea&room=dev").await;
    let mut c = nodes[2].client("name=cy").await;
    // dev has members on a and b only.
    assert_eq!(redis.numsub("general").await, 3);
    assert_eq!(redis.numsub("dev").await, 2);

    tokio::join!(
        send(&mut a, "a", true),
        send(&mut b, "b", false),
        send(&mut c, "c", false)
    );
    let in_dev = EACH / 2;
    let in_general = 3 * EACH - in_dev;

    let a_all = messages(&mut a, in_general + in_dev).await;
    let general_of = |msgs: &[Value], room: &str| -> Vec<Value> {
        msgs.iter().filter(|m| m["room"] == room).cloned().collect()
    };
    let general = general_of(&a_all, "general");
    let ids: Vec<u64> = general.iter().map(|m| m["id"].as_u64().unwrap()).collect();
    assert_eq!(ids, (1..=in_general as u64).collect::<Vec<_>>());
    assert_eq!(
        general_of(&messages(&mut b, in_general).await, "general"),
        general
    );
    assert_eq!(
        messages(&mut c, in_general).await,
        general,
        "c gets general only"
    );
    let dev = general_of(&a_all, "dev");
    assert_eq!(dev.len(), in_dev);
    assert_eq!(
        messages(&mut b_dev, in_dev).await,
        dev,
        "same dev order on node b"
    );

    // When the last dev member of node b leaves, node b stops receiving dev (after a linger).
    drop(b_dev);
    let r = &redis;
    common::eventually_async("node b unsubscribes from dev", || async move {
        r.numsub("dev").await == 1
    })
    .await;
}

#[tokio::test]
async fn a_redis_restart_refuses_sends_then_heals_without_reconnecting_clients() {
    let mut redis = Redis::start(None).await;
    let a_node = Node::start("node-a", &redis, None).await;
    let b_node = Node::start("node-b", &redis, None).await;
    let mut a = a_node.client("name=ann").await;
    let mut b = b_node.client("name=bob").await;
    a.say("general", "before", "r1").await;
    assert_eq!(messages(&mut b, 1).await[0]["message"], "before");

    redis.kill().await;
    let addr = a_node.addr;
    common::eventually_async("node a not ready", || async move {
        readyz(addr).await == Some(503)
    })
    .await;
    a.say("general", "during", "r2").await;
    loop {
        let f = a.recv().await;
        if f["type"] == "error" {
            assert_eq!(
                (f["code"].as_str(), f["ref"].as_str()),
                (Some("unavailable"), Some("r2"))
            );
            break;
        }
    }

    redis.restart().await;
    for node in [&a_node, &b_node] {
        let addr = node.addr;
        common::eventually_async(
            "ready again",
            || async move { readyz(addr).await == Some(200) },
        )
        .await;
    }
    let r = &redis;
    common::eventually_async("both nodes resubscribed", || async move {
        r.numsub("general").await == 2
    })
    .await;
    // Node b sent nothing during the outage: its first send afterwards must work too.
    b.say("general", "after", "r3").await;
    let got = messages(&mut a, 1).await;
    assert_eq!(
        got[0]["message"], "after",
        "the same connections chat again"
    );
    a.say("general", "and back", "r4").await;
    assert_eq!(messages(&mut b, 2).await[1]["message"], "and back");
}

#[tokio::test]
async fn a_killed_subscriber_connection_is_replaced() {
    let redis = Redis::start(None).await;
    let a_node = Node::start("node-a", &redis, None).await;
    let b_node = Node::start("node-b", &redis, None).await;
    let mut a = a_node.client("name=ann").await;
    let mut b = b_node.client("name=bob").await;
    let killed: u64 = redis::cmd("CLIENT")
        .arg("KILL")
        .arg("TYPE")
        .arg("pubsub")
        .query_async(&mut redis.conn().await)
        .await
        .unwrap();
    assert_eq!(killed, 2);
    let r = &redis;
    common::eventually_async("both nodes resubscribed", || async move {
        r.numsub("general").await == 2
    })
    .await;
    b.say("general", "still here", "b1").await;
    assert_eq!(messages(&mut a, 1).await[0]["message"], "still here");
}

#[tokio::test]
async fn a_node_killed_with_sigkill_affects_only_its_own_clients() {
    let redis = Redis::start(None).await;
    let a_node = Node::start("node-a", &redis, None).await;
    let mut b_node = Node::start("node-b", &redis, None).await;
    let c_node = Node::start("node-c", &redis, None).await;
    let mut a = a_node.client("name=ann").await;
    let _b = b_node.client("name=bob").await;
    let mut c = c_node.client("name=cy").await;
    b_node.child.kill().await.unwrap(); // SIGKILL
    a.say("general", "anyone?", "a1").await;
    assert_eq!(messages(&mut c, 1).await[0]["message"], "anyone?");
    c.say("general", "yes", "c1").await;
    let got = messages(&mut a, 2).await;
    assert_eq!(got[1]["message"], "yes");
}

#[tokio::test]
async fn a_wrong_password_keeps_the_node_unready() {
    let redis = Redis::start(Some("s3cret")).await;
    let wrong = Node::spawn("node-wrong", &redis, Some("guess"));
    // A node with the right password becomes ready meanwhile: the wrong one never does.
    let _right = Node::start("node-right", &redis, Some("s3cret")).await;
    let addr = wrong.addr;
    eventually_async("the node answers", || async move {
        readyz(addr).await.is_some()
    })
    .await;
    for _ in 0..20 {
        assert_eq!(readyz(wrong.addr).await, Some(503));
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn a_frozen_redis_does_not_stall_local_sockets() {
    let redis = Redis::start(None).await;
    let node = Node::start("node-a", &redis, None).await;
    let mut a = node.client("name=ann").await;
    let mut b = node.client("name=bob&room=dev").await;
    let pid = redis.child.as_ref().unwrap().id().unwrap();
    let signal = |sig: &str| common::send_signal(pid, sig);
    signal("-STOP"); // Redis still holds its connections but answers nothing
    a.say("general", "into the void", "v1").await;
    // Meanwhile another connection on the same node is served at once.
    b.send(serde_json::json!({"type":"leave","room":"dev"}))
        .await;
    assert_eq!(b.expect("left").await["room"], "dev");
    // The stuck send is refused after publish_timeout_ms (2 s by default), not forever.
    let err = a.expect("error").await;
    assert_eq!(
        (err["code"].as_str(), err["ref"].as_str()),
        (Some("unavailable"), Some("v1"))
    );
    assert!(
        err["message"]
            .as_str()
            .unwrap()
            .contains("may still be delivered"),
        "a timeout does not claim the message was dropped: {err}"
    );
    signal("-CONT");
    a.say("general", "back", "v2").await;
    loop {
        let f = a.recv().await;
        if f["type"] == "ack" {
            assert_eq!(f["ref"], "v2");
            break;
        }
    }
}
