//! Many nodes, one chat: real scalechat processes sharing rooms through a real
//! `redis-server` that each test starts on a free port (and stops, kills and restarts).

mod common;

use std::net::SocketAddr;
use std::process::Stdio;
use std::time::Duration;

use common::backplane::{Node, Redis, free_port};
use common::proxy::{Fault, FaultProxy};
use common::{Client, RawClient, consecutive_until, eventually_async, http_get, ids, readyz};
use serde_json::{Value, json};
use tokio::net::TcpStream;
use tokio::process::Command;

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

#[tokio::test]
async fn history_written_on_one_node_is_served_on_join_by_another() {
    let redis = Redis::start(None).await;
    let a_node = Node::start("node-a", &redis, None).await;
    let b_node = Node::start("node-b", &redis, None).await;
    let mut a = a_node.client("name=ann").await;
    a.say_acked("m", 5).await;
    let (mut b, joined, history) = b_node.connect("name=bob").await;
    assert_eq!(joined["last_id"], 5);
    assert_eq!(ids(&history), [1, 2, 3, 4, 5]);
    assert_eq!(history[4]["message"], "m4");
    a.say("general", "live", "l").await;
    assert_eq!(b.expect("message").await["id"], 6);
    // Scroll-back through node b reads the same store.
    b.send(serde_json::json!({"type":"history","room":"general","before":3,"limit":10}))
        .await;
    let page = b.expect("history").await;
    assert_eq!(ids(page["messages"].as_array().unwrap()), [1, 2]);
    assert_eq!(
        (page["more"].as_bool(), &page["epoch"]),
        (Some(false), &joined["epoch"])
    );
}

/// Reads of a room's stored history Redis has run (the history scripts' `ZRANGEBYSCORE` and
/// `ZREVRANGEBYSCORE`).
async fn history_reads(redis: &Redis) -> u64 {
    let info: String = redis::cmd("INFO")
        .arg("commandstats")
        .query_async(&mut redis.conn().await)
        .await
        .unwrap();
    info.lines()
        .filter(|l| {
            l.starts_with("cmdstat_zrangebyscore:") || l.starts_with("cmdstat_zrevrangebyscore:")
        })
        .filter_map(|l| {
            l.split("calls=")
                .nth(1)?
                .split(',')
                .next()?
                .parse::<u64>()
                .ok()
        })
        .sum()
}

#[tokio::test]
async fn joins_to_a_room_the_node_receives_are_answered_without_redis() {
    let redis = Redis::start(None).await;
    let a_node = Node::start("node-a", &redis, None).await;
    let b_node = Node::start("node-b", &redis, None).await;
    // node-c reads every join's history from Redis: the reference.
    let c_node = Node::spawn_with(
        "node-c",
        redis.port,
        None,
        &[("SCALECHAT_REDIS__LOCAL_HISTORY", "false")],
    );
    wait_ready(&c_node, 200, "node-c ready").await;
    let (mut watcher, joined, _) = b_node.connect("name=wes").await;
    let epoch = joined["epoch"].as_str().unwrap().to_owned();
    let mut a = a_node.client("name=ann").await;
    a.say_acked("m", 60).await;
    assert_eq!(messages(&mut watcher, 60).await.last().unwrap()["id"], 60);

    let before = history_reads(&redis).await;
    for i in 0..20 {
        let (_, joined, history) = b_node.connect(&format!("name=j{i}")).await;
        assert_eq!(
            (joined["last_id"].as_u64(), joined["history"].as_u64()),
            (Some(60), Some(50))
        );
        assert_eq!(ids(&history), (11..=60).collect::<Vec<_>>());
    }
    let (_, joined, missed) = b_node
        .connect(&format!("name=r&since=55&epoch={epoch}"))
        .await;
    assert_eq!(joined["recovered"], true, "{joined}");
    assert_eq!(ids(&missed), [56, 57, 58, 59, 60]);
    let (_, joined, newest) = b_node.connect("name=r&since=3&epoch=other").await;
    assert_eq!(joined["recovered"], false, "{joined}");
    assert_eq!(ids(&newest), (11..=60).collect::<Vec<_>>());
    assert_eq!(
        history_reads(&redis).await,
        before,
        "joins to a room node-b receives read no history from Redis"
    );

    // Further back than node-b keeps: Redis answers, as it does for node-c.
    let (_, from_b, missed_b) = b_node
        .connect(&format!("name=r&since=5&epoch={epoch}"))
        .await;
    assert!(
        history_reads(&redis).await > before,
        "Redis read the history"
    );
    let (_, from_c, missed_c) = c_node
        .connect(&format!("name=r&since=5&epoch={epoch}"))
        .await;
    assert_eq!(from_b["recovered"], true, "{from_b}");
    assert_eq!(ids(&missed_b), (6..=60).collect::<Vec<_>>());
    assert_eq!(ids(&missed_b), ids(&missed_c));
    assert_eq!(
        (from_b["last_id"].as_u64(), &from_b["epoch"]),
        (from_c["last_id"].as_u64(), &from_c["epoch"])
    );
    // The newest fifty, the same from both.
    let (_, _, newest_c) = c_node.connect("name=n").await;
    assert_eq!(ids(&newest_c), (11..=60).collect::<Vec<_>>());
    assert_eq!(newest_c[49]["message"], "m59");
}

#[tokio::test]
async fn joiners_during_a_flood_from_another_node_see_every_id_once() {
    let redis = Redis::start(None).await;
    let a_node = Node::start("node-a", &redis, None).await;
    let b_node = Node::start("node-b", &redis, None).await;
    // node-b receives the room before the flood: joins are answered from its copy.
    let (mut watcher, joined, _) = b_node.connect("name=wes").await;
    let epoch = joined["epoch"].as_str().unwrap().to_owned();
    let mut ann = a_node.client("name=ann").await;
    const TOTAL: u64 = 2000;
    let flood = tokio::spawn(async move {
        for n in 0..TOTAL {
            ann.say("general", &format!("m{n}"), &format!("r{n}")).await;
        }
        ann
    });
    // Joiners arrive as node-b delivers the flood, every 250 ids.
    let (progress, mut at) = tokio::sync::mpsc::unbounded_channel();
    let watch = tokio::spawn(async move {
        for _ in 0..TOTAL {
            let id = messages(&mut watcher, 1).await[0]["id"].as_u64().unwrap();
            if id % 250 == 0 && id < TOTAL {
                let _ = progress.send(());
            }
        }
    });
    let mut joiners: Vec<(Client, Value, Vec<Value>)> = Vec::new();
    while at.recv().await.is_some() {
        let query = match joiners.len() {
            // A reconnect since what an earlier joiner's history ended at.
            3 => {
                let last = joiners[2].1["last_id"].as_u64().unwrap();
                format!("name=j3&since={last}&epoch={epoch}")
            }
            n => format!("name=j{n}"),
        };
        joiners.push(b_node.connect(&query).await);
    }
    let _ann = flood.await.unwrap();
    watch.await.unwrap();
    let since = joiners[2].1["last_id"].as_u64().unwrap();
    let joined_at: Vec<&Value> = joiners.iter().map(|j| &j.1["last_id"]).collect();
    println!("joined at ids {joined_at:?} of {TOTAL}");
    for (i, (mut client, joined, history)) in joiners.into_iter().enumerate() {
        let first = consecutive_until(&mut client, &joined, &history, TOTAL).await;
        if i == 3 {
            assert_eq!(joined["recovered"], true, "{joined}");
            assert_eq!(first, since + 1, "{joined}");
        }
    }
}

#[tokio::test]
async fn reconnecting_to_another_node_with_since_gets_exactly_what_was_missed() {
    let redis = Redis::start(None).await;
    let a_node = Node::start("node-a", &redis, None).await;
    let b_node = Node::start("node-b", &redis, None).await;
    let mut a = a_node.client("name=ann").await;
    let (mut b, joined, _) = b_node.connect("name=bob").await;
    let epoch = joined["epoch"].as_str().unwrap().to_owned();
    a.say_acked("x", 3).await;
    assert_eq!(ids(&messages(&mut b, 3).await), [1, 2, 3]);
    drop(b);
    a.say_acked("y", 4).await;

    let (mut b, joined, missed) = a_node
        .connect(&format!("name=bob&since=3&epoch={epoch}"))
        .await;
    assert_eq!(joined["recovered"], true, "{joined}");
    assert_eq!(ids(&missed), [4, 5, 6, 7]);
    a.say("general", "live", "l").await;
    assert_eq!(ids(&messages(&mut b, 1).await), [8]);
}

#[tokio::test]
async fn a_send_resent_through_another_node_is_delivered_once() {
    let redis = Redis::start(None).await;
    let a_node = Node::start("node-a", &redis, None).await;
    let b_node = Node::start("node-b", &redis, None).await;
    let mut watcher = b_node.client("name=wes").await;
    // The sender's connection drops before it reads the ack...
    let mut first = a_node.client("name=ann").await;
    first.say("general", "only once", "ann-42").await;
    drop(first);
    let delivered = messages(&mut watcher, 1).await;
    assert_eq!(delivered[0]["message"], "only once");
    // ...so it sends the same message again with the same ref, through node b.
    let mut again = b_node.client("name=ann").await;
    again.say("general", "only once", "ann-42").await;
    let ack = loop {
        let f = again.recv().await;
        if f["type"] == "ack" {
            break f;
        }
    };
    assert_eq!(
        (ack["id"].as_u64(), ack["duplicate"].as_bool()),
        (Some(1), Some(true)),
        "{ack}"
    );
    watcher.say("general", "after", "w-1").await;
    let seen = messages(&mut watcher, 1).await;
    assert_eq!(
        ids(&seen),
        [2],
        "the resent message was not delivered again"
    );
    assert_eq!(seen[0]["message"], "after");
}

/// Restarts `redis` (SIGKILL, then start) and waits until `node` is ready again.
async fn restart_redis(redis: &mut Redis, nodes: &[&Node]) {
    redis.kill().await;
    redis.restart().await;
    for node in nodes {
        let addr = node.addr;
        eventually_async(
            "ready again",
            || async move { readyz(addr).await == Some(200) },
        )
        .await;
    }
}

/// A node of `redis`, ann's client, and the room's epoch as bob saw it before five messages
/// and a Redis restart (SIGKILL).
async fn five_messages_then_a_restart(redis: &mut Redis) -> (Node, Client, String) {
    let node = Node::start("node-a", redis, None).await;
    let mut a = node.client("name=ann").await;
    let (_b, joined, _) = node.connect("name=bob").await;
    let epoch = joined["epoch"].as_str().unwrap().to_owned();
    a.say_acked("m", 5).await;
    restart_redis(redis, &[&node]).await;
    (node, a, epoch)
}

#[tokio::test]
async fn a_redis_restart_without_persistence_is_reported_as_not_recovered() {
    let mut redis = Redis::start(None).await;
    let (node, mut a, epoch) = five_messages_then_a_restart(&mut redis).await;
    // Bob comes back from id 3: ids 4 and 5 are gone with Redis, and the server says so.
    let (_, joined, history) = node
        .connect(&format!("name=bob&since=3&epoch={epoch}"))
        .await;
    assert_eq!(joined["recovered"], false, "{joined}");
    assert_ne!(
        joined["epoch"].as_str(),
        Some(epoch.as_str()),
        "a new epoch"
    );
    assert!(history.is_empty());
    // The room goes on in its new epoch.
    a.say_acked("new era", 1).await;
    let (_, joined, history) = node.connect("name=cy").await;
    assert_eq!(
        (ids(&history), &joined["epoch"]),
        (vec![1], &history[0]["epoch"])
    );
}

#[tokio::test]
async fn a_redis_restart_with_an_append_only_file_loses_nothing() {
    let mut redis = Redis::start_persistent().await;
    let (node, mut a, epoch) = five_messages_then_a_restart(&mut redis).await;
    let (_, joined, missed) = node
        .connect(&format!("name=bob&since=3&epoch={epoch}"))
        .await;
    assert_eq!(joined["recovered"], true, "{joined}");
    assert_eq!(ids(&missed), [4, 5]);
    a.say("general", "still counting", "n").await;
    let next = loop {
        let f = a.recv().await;
        if f["type"] == "ack" {
            break f;
        }
    };
    assert_eq!(next["id"], 6);
    if let Some(dir) = &redis.aof {
        let _ = std::fs::remove_dir_all(dir);
    }
}

#[tokio::test]
async fn nodes_heal_gaps_when_their_subscriptions_are_killed_mid_stream() {
    let redis = Redis::start(None).await;
    let a_node = Node::start("node-a", &redis, None).await;
    let b_node = Node::start("node-b", &redis, None).await;
    let mut receivers = vec![
        a_node.client("name=ra").await,
        b_node.client("name=rb").await,
    ];
    let mut sender = a_node.client("name=sender").await;
    const TOTAL: usize = 400;
    let flood = async {
        for n in 0..TOTAL {
            sender
                .say("general", &format!("m{n}"), &format!("s-{n}"))
                .await;
            if n % 20 == 0 {
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        }
    };
    let kills = async {
        let mut killed = 0;
        for _ in 0..5 {
            tokio::time::sleep(Duration::from_millis(15)).await;
            killed += redis::cmd("CLIENT")
                .arg("KILL")
                .arg("TYPE")
                .arg("pubsub")
                .query_async::<u64>(&mut redis.conn().await)
                .await
                .unwrap();
        }
        killed
    };
    let ((), killed) = tokio::join!(flood, kills);
    assert!(killed >= 2, "subscriber connections killed: {killed}");
    let all: Vec<u64> = (1..=TOTAL as u64).collect();
    for r in &mut receivers {
        assert_eq!(
            ids(&messages(r, TOTAL).await),
            all,
            "every id once, in order"
        );
    }
    let mut healed = 0;
    for node in [&a_node, &b_node] {
        let (_, text) = common::http_get(node.addr, "/metrics", &[]).await;
        let value = |name: &str| -> u64 {
            text.lines()
                .find_map(|l| l.strip_prefix(name)?.trim().parse().ok())
                .unwrap_or_else(|| panic!("{name} missing"))
        };
        println!(
            "{}: {} gaps, {} healed, {} messages from history",
            node.name,
            value("scalechat_backplane_gaps_total "),
            value("scalechat_backplane_gaps_healed_total "),
            value("scalechat_backplane_messages_healed_total ")
        );
        assert_eq!(
            value("scalechat_backplane_gaps_total "),
            value("scalechat_backplane_gaps_healed_total "),
            "every gap found was healed"
        );
        healed += value("scalechat_backplane_messages_healed_total ");
    }
    assert!(
        healed > 0,
        "the kills during the flood made the nodes miss messages"
    );
}

/// What a failover that lost the newest writes leaves behind: the room's counter and history
/// behind what the nodes delivered.
#[tokio::test]
async fn ids_never_repeat_when_redis_loses_its_newest_messages() {
    let redis = Redis::start(None).await;
    let a_node = Node::start("node-a", &redis, None).await;
    let b_node = Node::start("node-b", &redis, None).await;
    let mut a = a_node.client("name=ann").await;
    let mut b = b_node.client("name=bob").await;
    a.say_acked("m", 10).await;
    assert_eq!(
        ids(&messages(&mut b, 10).await),
        (1..=10).collect::<Vec<_>>()
    );
    let mut conn = redis.conn().await;
    let _: () = redis::cmd("HSET")
        .arg("scalechat:meta:general")
        .arg("seq")
        .arg(6)
        .query_async(&mut conn)
        .await
        .unwrap();
    let _: () = redis::cmd("ZREMRANGEBYSCORE")
        .arg("scalechat:hist:general")
        .arg(7)
        .arg(10)
        .query_async(&mut conn)
        .await
        .unwrap();
    // The nodes reconnect and heal against the shortened history.
    let _: u64 = redis::cmd("CLIENT")
        .arg("KILL")
        .arg("TYPE")
        .arg("pubsub")
        .query_async(&mut conn)
        .await
        .unwrap();
    let r = &redis;
    common::eventually_async("both nodes resubscribed", || async move {
        r.numsub("general").await == 2
    })
    .await;
    b.say("general", "after", "after-1").await;
    let next = b.expect_chat().await;
    assert_eq!(
        (&next["message"], &next["id"]),
        (&"after".into(), &11.into())
    );
    // ann's own messages may still be on their way before it, each once.
    let mut seen = Vec::new();
    loop {
        let m = a.expect_chat().await;
        seen.push(m["id"].as_u64().unwrap());
        if m["message"] == "after" {
            break;
        }
    }
    assert_eq!(
        seen.last(),
        Some(&11),
        "ids go on after what was delivered: {seen:?}"
    );
    assert!(seen.windows(2).all(|w| w[0] < w[1]), "{seen:?}");
}

#[tokio::test]
async fn each_message_is_stored_once_whatever_the_number_of_nodes() {
    let redis = Redis::start(None).await;
    let nodes = [
        Node::start("node-a", &redis, None).await,
        Node::start("node-b", &redis, None).await,
        Node::start("node-c", &redis, None).await,
    ];
    for (i, node) in nodes.iter().enumerate() {
        let mut c = node.client(&format!("name=u{i}")).await;
        c.say_acked(&format!("n{i}-"), 10).await;
    }
    let mut conn = redis.conn().await;
    let stored: u64 = redis::cmd("ZCARD")
        .arg("scalechat:hist:general")
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(stored, 30);
    let last: u64 = redis::cmd("HGET")
        .arg("scalechat:meta:general")
        .arg("seq")
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(last, 30);
}

#[tokio::test]
async fn messages_published_while_subscribers_reconnect_are_delivered_from_the_history() {
    let redis = Redis::start(None).await;
    let a_node = Node::start("node-a", &redis, None).await;
    let b_node = Node::start("node-b", &redis, None).await;
    // A room with no message yet: the nodes know its position from when they subscribed.
    let mut receivers = vec![
        a_node.client("name=ra").await,
        b_node.client("name=rb").await,
    ];
    let mut sender = a_node.client("name=sender").await;
    let killed: u64 = redis::cmd("CLIENT")
        .arg("KILL")
        .arg("TYPE")
        .arg("pubsub")
        .query_async(&mut redis.conn().await)
        .await
        .unwrap();
    assert_eq!(killed, 2);
    // Published through the publisher connections while no node is subscribed.
    sender.say_acked("gap", 20).await;
    let all: Vec<u64> = (1..=20).collect();
    for r in &mut receivers {
        assert_eq!(ids(&messages(r, 20).await), all);
    }
}

/// Runs `openssl` with `args` in `dir`.
fn openssl(dir: &std::path::Path, args: &[&str]) {
    let status = std::process::Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .stderr(Stdio::null())
        .status()
        .expect("openssl is installed");
    assert!(status.success(), "openssl {args:?}");
}

#[tokio::test]
async fn redis_over_tls_with_a_private_ca() {
    let dir = std::env::temp_dir().join(format!("scalechat-tls-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    openssl(
        &dir,
        &[
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            "ca.key",
            "-out",
            "ca.crt",
            "-days",
            "2",
            "-subj",
            "/CN=scalechat test CA",
        ],
    );
    openssl(
        &dir,
        &[
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            "server.key",
            "-out",
            "server.csr",
            "-subj",
            "/CN=127.0.0.1",
        ],
    );
    std::fs::write(dir.join("ext.cnf"), "subjectAltName=IP:127.0.0.1\n").unwrap();
    openssl(
        &dir,
        &[
            "x509",
            "-req",
            "-in",
            "server.csr",
            "-CA",
            "ca.crt",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            "server.crt",
            "-days",
            "2",
            "-extfile",
            "ext.cnf",
        ],
    );
    let port = free_port();
    let _redis = Command::new("redis-server")
        .args([
            "--port",
            "0",
            "--tls-port",
            &port.to_string(),
            "--bind",
            "127.0.0.1",
        ])
        .args([
            "--tls-cert-file",
            "server.crt",
            "--tls-key-file",
            "server.key",
        ])
        .args(["--tls-ca-cert-file", "ca.crt", "--tls-auth-clients", "no"])
        .args(["--save", "", "--appendonly", "no"])
        .current_dir(&dir)
        .stdout(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("redis-server is installed");
    eventually_async("redis answers", || async move {
        TcpStream::connect(("127.0.0.1", port)).await.is_ok()
    })
    .await;
    let ca = dir.join("ca.crt");
    let ca = ca.to_str().unwrap();
    let tls = [
        ("SCALECHAT_REDIS__TLS", "true"),
        ("SCALECHAT_REDIS__TLS_CA_FILE", ca),
    ];
    let a_node = Node::spawn_with("node-a", port, None, &tls);
    let b_node = Node::spawn_with("node-b", port, None, &tls);
    // Without the private CA the certificate is not trusted: never ready.
    let untrusting = Node::spawn_with("node-c", port, None, &[("SCALECHAT_REDIS__TLS", "true")]);
    for node in [&a_node, &b_node] {
        let addr = node.addr;
        eventually_async("ready over TLS", || async move {
            readyz(addr).await == Some(200)
        })
        .await;
    }
    let mut a = a_node.client("name=ann").await;
    let mut b = b_node.client("name=bob").await;
    a.say("general", "encrypted", "t1").await;
    assert_eq!(messages(&mut b, 1).await[0]["message"], "encrypted");
    let addr = untrusting.addr;
    eventually_async(
        "node-c answers",
        || async move { readyz(addr).await.is_some() },
    )
    .await;
    assert_eq!(readyz(untrusting.addr).await, Some(503));
    let _ = std::fs::remove_dir_all(&dir);
}

/// Environment that makes a node notice a dead Redis path within about two seconds.
const FAST_FAILURE: [(&str, &str); 2] = [
    ("SCALECHAT_REDIS__HEARTBEAT_SECS", "1"),
    ("SCALECHAT_REDIS__PUBLISH_TIMEOUT_MS", "1000"),
];

/// Waits until `node`'s `/readyz` says `status`.
async fn wait_ready(node: &Node, status: u16, what: &str) {
    let addr = node.addr;
    eventually_async(what, || async move { readyz(addr).await == Some(status) }).await;
}

/// `a` (behind a proxy) and `b` (direct) nodes of `redis`, a reader on `a` and a sender on `b`.
async fn faulty_pair(redis: &Redis) -> (FaultProxy, Node, Node, Client, Client) {
    let proxy = FaultProxy::start(redis.port).await;
    let a_node = Node::spawn_with("node-a", proxy.port, None, &FAST_FAILURE);
    let b_node = Node::spawn_with("node-b", redis.port, None, &FAST_FAILURE);
    wait_ready(&a_node, 200, "node a ready").await;
    wait_ready(&b_node, 200, "node b ready").await;
    let reader = a_node.client("name=reader").await;
    let sender = b_node.client("name=sender").await;
    (proxy, a_node, b_node, reader, sender)
}

#[tokio::test]
async fn a_black_holed_redis_path_is_detected_and_nothing_is_lost() {
    let redis = Redis::start(None).await;
    let (proxy, a_node, _b_node, mut reader, mut sender) = faulty_pair(&redis).await;
    sender.say_acked("before", 3).await;
    assert_eq!(ids(&messages(&mut reader, 3).await), [1, 2, 3]);

    // The path to Redis swallows everything but stays open, like a half-open connection.
    proxy.set(Fault::BlackHole);
    wait_ready(&a_node, 503, "the heartbeat notices the dead path").await;
    // Local sockets on node a are served meanwhile.
    let started = std::time::Instant::now();
    reader
        .send(serde_json::json!({"type":"leave","room":"nowhere"}))
        .await;
    assert_eq!(reader.expect("error").await["code"], "not_joined");
    assert!(
        started.elapsed() < Duration::from_millis(500),
        "{:?}",
        started.elapsed()
    );
    sender.say_acked("during", 5).await;

    proxy.set(Fault::Pass);
    wait_ready(&a_node, 200, "node a recovers on new connections").await;
    sender.say_acked("after", 2).await;
    let got = messages(&mut reader, 7).await;
    assert_eq!(
        ids(&got),
        (4..=10).collect::<Vec<_>>(),
        "healed from the history"
    );
    assert_eq!(got[0]["message"], "during0");
    // And node a can publish again: its publisher connection was replaced.
    reader.say("general", "from a", "a-1").await;
    while sender.expect_chat().await["message"] != "from a" {}
}

#[tokio::test]
async fn a_stalled_then_reset_path_recovers_without_loss() {
    let redis = Redis::start(None).await;
    let (proxy, a_node, _b_node, mut reader, mut sender) = faulty_pair(&redis).await;
    proxy.set(Fault::Stall);
    wait_ready(&a_node, 503, "the heartbeat notices the stall").await;
    sender.say_acked("stalled", 4).await;
    proxy.reset();
    proxy.set(Fault::Pass);
    wait_ready(&a_node, 200, "node a reconnects").await;
    sender.say_acked("after", 1).await;
    assert_eq!(ids(&messages(&mut reader, 5).await), [1, 2, 3, 4, 5]);
}

#[tokio::test]
async fn a_slow_narrow_redis_path_delays_but_keeps_order() {
    let redis = Redis::start(None).await;
    let (proxy, _a_node, _b_node, mut reader, mut sender) = faulty_pair(&redis).await;
    proxy.set(Fault::Delay(Duration::from_millis(40)));
    sender.say_acked("slow", 10).await;
    proxy.set(Fault::Rate(4_000));
    sender.say_acked("narrow", 10).await;
    assert_eq!(
        ids(&messages(&mut reader, 20).await),
        (1..=20).collect::<Vec<_>>()
    );
    // node a publishes through the slow path too, within its timeout.
    reader.say("general", "uphill", "u-1").await;
    let ack = loop {
        let f = reader.recv().await;
        if f["type"] == "ack" || f["type"] == "error" {
            break f;
        }
    };
    assert_eq!(
        (ack["type"].as_str(), ack["id"].as_u64()),
        (Some("ack"), Some(21)),
        "{ack}"
    );
}

/// `name` from the node at `addr`'s `/metrics`.
async fn metric(addr: SocketAddr, name: &str) -> u64 {
    let (_, text) = http_get(addr, "/metrics", &[]).await;
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.trim().parse().ok())
        .unwrap_or_else(|| panic!("{name} missing"))
}

#[tokio::test]
async fn a_subscriber_that_falls_behind_is_cut_and_healed_from_the_history() {
    let redis = Redis::start(None).await;
    let proxy = FaultProxy::start(redis.port).await;
    // Node a may fall 300 ms behind; its heartbeat stays out of the way (its PING's answer
    // would wait behind the same backlog).
    let a_node = Node::spawn_with(
        "node-a",
        proxy.port,
        None,
        &[
            ("SCALECHAT_REDIS__SUBSCRIBER_LAG_MAX_MS", "300"),
            ("SCALECHAT_REDIS__HEARTBEAT_SECS", "60"),
        ],
    );
    let b_node = Node::spawn("node-b", &redis, None);
    wait_ready(&a_node, 200, "node a ready").await;
    wait_ready(&b_node, 200, "node b ready").await;
    let mut reader = a_node.client("name=reader").await;
    let mut sender = b_node.client("name=sender").await;
    sender.say_acked("before", 3).await;
    assert_eq!(ids(&messages(&mut reader, 3).await), [1, 2, 3]);
    assert_eq!(
        metric(a_node.addr, "scalechat_backplane_lag_cuts_total").await,
        0
    );

    // Node a's path from Redis carries 20 kB/s: a burst of about 200 kB takes it some ten
    // seconds, however fast the machine, and node a's probes wait behind it.
    proxy.set(Fault::Rate(20_000));
    let text = "x".repeat(2000);
    sender.say_repeated_acked(&text, 100).await;
    let addr = a_node.addr;
    eventually_async("node a cuts its lagging subscriber", || async move {
        metric(addr, "scalechat_backplane_lag_cuts_total").await >= 1
    })
    .await;

    proxy.set(Fault::Pass);
    wait_ready(&a_node, 200, "node a reconnects").await;
    sender.say_acked("after", 2).await;
    // Every message once, in order: what the cut connection held came from the history.
    let got = messages(&mut reader, 102).await;
    assert_eq!(ids(&got), (4..=105).collect::<Vec<_>>());
    assert_eq!(got[101]["message"], "after1");
    sender.say_acked("last", 1).await;
    assert_eq!(reader.expect_chat().await["id"], 106, "nothing twice");
    assert!(metric(addr, "scalechat_backplane_gaps_healed_total").await >= 1);
}

/// Keys in `redis`'s database.
/// The keys in Redis but those of the running nodes themselves (presence registry, address).
async fn keys(redis: &Redis) -> Vec<String> {
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg("*")
        .query_async(&mut redis.conn().await)
        .await
        .unwrap();
    keys.into_iter()
        .filter(|k| !k.ends_with(":presence-nodes:all") && !k.contains(":node-addr:"))
        .collect()
}

/// Reads until a frame of `kind`, skipping chat messages.
async fn until(c: &mut Client, kind: &str) -> Value {
    loop {
        let f = c.recv().await;
        if f["type"] == kind {
            return f;
        }
        assert_eq!(f["type"], "message", "{f}");
    }
}

#[tokio::test]
async fn one_off_rooms_leave_no_key_behind_after_the_history_ttl() {
    let redis = Redis::start(None).await;
    let node = Node::spawn_with(
        "node-ttl",
        redis.port,
        None,
        &[
            ("SCALECHAT_ROOMS__HISTORY_TTL_SECS", "2"),
            ("SCALECHAT_ROOMS__DEDUPE_WINDOW_SECS", "1"),
            ("SCALECHAT_REDIS__UNSUBSCRIBE_LINGER_SECS", "1"),
        ],
    );
    wait_ready(&node, 200, "node ready").await;
    for n in 0..20 {
        // A join and nothing else; a join, a message and a page of history.
        drop(node.client(&format!("name=j{n}&room=join-{n}")).await);
        let room = format!("send-{n}");
        let (mut c, ..) = node.connect(&format!("name=s{n}&room={room}")).await;
        c.say(&room, "once", &format!("r{n}")).await;
        until(&mut c, "ack").await;
        c.send(json!({"type":"history","room":room})).await;
        let page = until(&mut c, "history").await;
        assert_eq!(page["messages"].as_array().map(Vec::len), Some(1), "{page}");
    }
    assert!(!keys(&redis).await.is_empty(), "the rooms wrote keys");
    let redis = &redis;
    eventually_async("every key expired", || async move {
        keys(redis).await.is_empty()
    })
    .await;
}

/// Open WebSocket sessions on the node at `addr`, from `/metrics`.
async fn connections(addr: SocketAddr) -> Option<u64> {
    let (_, text) = http_get(addr, "/metrics", &[]).await;
    text.lines()
        .find_map(|line| line.strip_prefix("scalechat_connections "))
        .and_then(|n| n.trim().parse().ok())
}

#[tokio::test]
async fn the_greeting_leaves_with_the_first_rooms_answer() {
    let redis = Redis::start(None).await;
    let proxy = FaultProxy::start(redis.port).await;
    let node = Node::spawn_with("node-greet", proxy.port, None, &[]);
    wait_ready(&node, 200, "node ready").await;
    // Every exchange with Redis now takes 100 ms more, so the first room's answer (its
    // presence written, its history read) comes well after the handshake.
    proxy.set(Fault::Delay(Duration::from_millis(100)));
    let mut ann = RawClient::connect(node.addr, "/ws?name=ann&room=greet").await;
    let (_, welcome) = ann.recv_frame().await.expect("welcome");
    assert!(String::from_utf8_lossy(&welcome).contains(r#""type":"welcome""#));
    // The greeting waited for the answer: both came in the same read.
    let (_, joined) = ann.read_along().expect("joined read along with welcome");
    let joined: Value = serde_json::from_slice(&joined).unwrap();
    assert_eq!(joined["type"], "joined", "{joined}");
    assert_eq!(joined["online"], 1, "{joined}");
}

#[tokio::test]
async fn a_join_cancelled_while_subscribing_leaves_no_subscription() {
    let mut redis = Redis::start(None).await;
    let node = Node::spawn_with(
        "node-cancel",
        redis.port,
        None,
        &[
            ("SCALECHAT_REDIS__UNSUBSCRIBE_LINGER_SECS", "1"),
            ("SCALECHAT_LIMITS__PING_INTERVAL_SECS", "1"),
        ],
    );
    wait_ready(&node, 200, "node ready").await;
    redis.kill().await;
    wait_ready(&node, 503, "node sees redis gone").await;
    // The join of the first room waits for a subscription that cannot come yet, and the
    // greeting waits with its answer: the session's first frame is its ping, a second in.
    // The client vanishes then (a reset); the node's next write, the following ping, fails
    // and the session ends mid-join.
    let mut gone = RawClient::connect(node.addr, "/ws?name=gone&room=abandoned").await;
    let (opcode, _) = gone.recv_frame().await.expect("a ping");
    assert_eq!(
        opcode, 0x9,
        "a ping while the join waits, before any other frame"
    );
    gone.stream.set_zero_linger().unwrap();
    drop(gone);
    let addr = node.addr;
    eventually_async("the session ended", || async move {
        connections(addr).await == Some(0)
    })
    .await;
    redis.restart().await;
    wait_ready(&node, 200, "node reconnected").await;
    let live = node.client("name=live&room=kept").await;
    let redis = &redis;
    eventually_async("the abandoned room is not subscribed", || async move {
        redis.numsub("abandoned").await == 0
    })
    .await;
    assert_eq!(redis.numsub("kept").await, 1);
    drop(live);
}

#[tokio::test]
async fn a_frozen_node_drops_the_backlog_it_reads_in_and_heals_from_the_history() {
    const BURST: usize = 8000;
    let redis = Redis::start(None).await;
    // Redis's own limit on a subscriber's output would cut node a while it is frozen; the
    // node's bound is what is tested here.
    let _: () = redis::cmd("CONFIG")
        .arg("SET")
        .arg("client-output-buffer-limit")
        .arg("pubsub 0 0 0")
        .query_async(&mut redis.conn().await)
        .await
        .unwrap();
    // Room for the whole burst in the history and in the clients' queues.
    let history = (BURST + 100).to_string();
    let roomy = [
        ("SCALECHAT_ROOMS__HISTORY_SIZE", history.as_str()),
        ("SCALECHAT_LIMITS__MAX_QUEUED_FRAMES", "100000"),
        ("SCALECHAT_LIMITS__MAX_QUEUED_BYTES", "268435456"),
    ];
    let lagging = [
        ("SCALECHAT_REDIS__SUBSCRIBER_LAG_MAX_MS", "20"),
        ("SCALECHAT_REDIS__HEARTBEAT_SECS", "60"),
    ];
    let a_node = Node::spawn_with("node-a", redis.port, None, &[&roomy[..], &lagging].concat());
    let b_node = Node::spawn_with("node-b", redis.port, None, &roomy);
    wait_ready(&a_node, 200, "node a ready").await;
    wait_ready(&b_node, 200, "node b ready").await;
    let mut reader = a_node.client("name=reader").await;
    let mut sender = b_node.client("name=sender").await;
    sender.say_acked("before", 3).await;
    assert_eq!(ids(&messages(&mut reader, 3).await), [1, 2, 3]);

    // Node a is frozen (as if starved of CPU) while about 32 MB are published to it; once it
    // runs again the redis crate reads them all in at once, far faster than the subscriber
    // decodes and delivers them (thousands of messages against a 20 ms bound).
    let pid = a_node.child.id().unwrap();
    common::send_signal(pid, "-STOP");
    sender.say_repeated_acked(&"x".repeat(3900), BURST).await;
    common::send_signal(pid, "-CONT");
    let got = messages(&mut reader, BURST).await;
    assert_eq!(ids(&got), (4..=BURST as u64 + 3).collect::<Vec<_>>());
    sender.say_acked("last", 1).await;
    assert_eq!(reader.expect_chat().await["id"], BURST + 4, "nothing twice");
    let cuts = metric(a_node.addr, "scalechat_backplane_lag_cuts_total").await;
    let healed = metric(a_node.addr, "scalechat_backplane_messages_healed_total").await;
    println!("{cuts} cuts, {healed} of {BURST} messages healed from the history");
    assert!(cuts >= 1);
    // What the dropped connection held came from the history instead.
    assert!(healed > 0);
}
