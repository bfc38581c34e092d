//! Presence: who is in a room, counted by user over every node, listed page by page, and
//! announced to the members that ask, on the embedded transport and across real scalechat
//! processes sharing a real Redis, including a node that is killed.

mod common;

use std::collections::BTreeSet;
use std::time::Duration;

use common::backplane::{Node, Redis};
use common::{Client, config, start};
use serde_json::{Value, json};

/// The names in a `members` list.
fn users(frame: &Value) -> BTreeSet<String> {
    frame["members"]
        .as_array()
        .unwrap_or_else(|| panic!("members in {frame}"))
        .iter()
        .map(|m| m["user"].as_str().unwrap().to_owned())
        .collect()
}

fn set(names: &[&str]) -> BTreeSet<String> {
    names.iter().map(|n| (*n).to_owned()).collect()
}

/// Every member of `room`, following the cursor page by page.
async fn list(client: &mut Client, room: &str, limit: u64) -> (BTreeSet<String>, Vec<Value>) {
    let mut cursor = Value::Null;
    let mut names = BTreeSet::new();
    let mut pages = Vec::new();
    loop {
        client
            .send(json!({"type":"presence","room":room,"limit":limit,"cursor":cursor}))
            .await;
        let page = client.expect("presence").await;
        for name in users(&page) {
            assert!(names.insert(name.clone()), "{name} listed twice");
        }
        cursor = page["cursor"].clone();
        pages.push(page);
        if cursor.is_null() {
            return (names, pages);
        }
    }
}

#[tokio::test]
async fn users_are_counted_once_and_announced_to_members_that_ask() {
    let server = start(config()).await;
    let mut ann = server.client("name=ann&room=dev&presence=1").await;
    let mut quiet = server.client("name=quiet&room=dev").await;
    // Ann is told of her own arrival too (the event is the room's), and of Quiet's.
    let arrived = until_event(&mut ann, "member_joined", "quiet").await;
    assert_eq!(arrived["online"], 2);
    let joined = ann.join("dev").await;
    assert_eq!(joined["online"], 2, "already in: the count over the room");

    // A user's second connection is the same member: no event, no new count.
    let mut bob1 = server.client("name=bob&room=dev").await;
    let arrived = ann.expect("member_joined").await;
    assert_eq!(
        (users(&arrived), &arrived["online"]),
        (set(&["bob"]), &json!(3))
    );
    let mut bob2 = Client::connect(&server.url("name=bob&room=dev")).await;
    bob2.expect("welcome").await;
    assert_eq!(bob2.expect("joined").await["online"], 3);
    let (names, pages) = list(&mut ann, "dev", 2).await;
    assert_eq!(names, set(&["ann", "bob", "quiet"]));
    assert_eq!(pages.len(), 2, "two a page");
    let bob = pages
        .iter()
        .flat_map(|p| p["members"].as_array().unwrap())
        .find(|m| m["user"] == "bob")
        .unwrap();
    assert_eq!(bob["connections"], 2);
    assert!(bob["since"].as_u64().unwrap() > 1_700_000_000_000);

    // Bob leaves when his last connection does.
    bob1.send(json!({"type":"leave","room":"dev"})).await;
    bob1.expect("left").await;
    drop(bob1);
    bob2.ws.close(None).await.unwrap();
    let left = ann.expect("member_left").await;
    assert_eq!((users(&left), &left["online"]), (set(&["bob"]), &json!(2)));
    let (names, _) = list(&mut ann, "dev", 100).await;
    assert_eq!(names, set(&["ann", "quiet"]));

    // The member that did not ask got nothing but what it asked for.
    quiet.send(json!({"type":"presence","room":"dev"})).await;
    assert_eq!(
        users(&quiet.expect("presence").await),
        set(&["ann", "quiet"])
    );
}

#[tokio::test]
async fn a_join_storm_reaches_members_as_a_few_frames() {
    let mut cfg = config();
    cfg.rooms.presence_interval_ms = 300;
    let server = start(cfg).await;
    let mut watcher = server.client("name=watcher&room=big&presence=1").await;
    let mut joiners = Vec::new();
    for n in 0..40 {
        joiners.push(server.client(&format!("name=j{n}&room=big")).await);
    }
    let mut seen = BTreeSet::new();
    let mut frames = 0;
    while seen.len() < 40 {
        let event = watcher.expect("member_joined").await;
        frames += 1;
        seen.extend(users(&event));
    }
    assert!(frames < 40, "{frames} frames for 40 joins");
    assert_eq!(
        watcher.join("big").await["online"],
        41,
        "the joiners and the watcher"
    );
}

#[tokio::test]
async fn bad_presence_requests_get_clear_errors() {
    let mut cfg = config();
    cfg.limits.requests_per_second = 0.01;
    cfg.limits.request_burst = 3;
    let server = start(cfg).await;
    let mut client = server.client("name=ann&room=dev").await;
    for (request, code) in [
        (json!({"type":"presence","room":"other"}), "not_joined"),
        (
            json!({"type":"presence","room":"dev","cursor":"x".repeat(200)}),
            "bad_field",
        ),
        (
            json!({"type":"presence","room":"dev","limit":100_000}),
            "bad_field",
        ),
        (
            json!({"type":"join","room":"dev","presence":"yes"}),
            "bad_field",
        ),
    ] {
        client.send(request).await;
        let error = client.expect("error").await;
        assert_eq!(error["code"], code, "{error}");
    }
    // A flood is rate-limited like every other request.
    let mut limited = 0;
    for _ in 0..6 {
        client.send(json!({"type":"presence","room":"dev"})).await;
        let reply = client.recv().await;
        if reply["type"] == "error" {
            assert_eq!(reply["code"], "rate_limited", "{reply}");
            limited += 1;
        }
    }
    assert!(limited >= 3, "{limited} refused");
}

/// A node of this test's Redis with a short presence timeout.
fn node(name: &str, redis: &Redis) -> Node {
    Node::spawn_with(
        name,
        redis.port,
        None,
        &[("SCALECHAT_ROOMS__PRESENCE_TIMEOUT_SECS", "3")],
    )
}

async fn ready(node: &Node) {
    let addr = node.addr;
    common::eventually_async("node ready", || async move {
        common::readyz(addr).await == Some(200)
    })
    .await;
}

/// Reads until a presence event of `kind` naming `user`, skipping others.
async fn until_event(client: &mut Client, kind: &str, user: &str) -> Value {
    loop {
        let frame = client.recv().await;
        if frame["type"] == kind && users(&frame).contains(user) {
            return frame;
        }
        assert!(
            frame["type"] == "member_joined" || frame["type"] == "member_left",
            "{frame}"
        );
    }
}

#[tokio::test]
async fn nodes_agree_on_members_and_a_killed_node_leaves_no_ghost() {
    let redis = Redis::start(None).await;
    let nodes = [node("pa", &redis), node("pb", &redis), node("pc", &redis)];
    for n in &nodes {
        ready(n).await;
    }
    let mut watcher = nodes[0].client("name=watcher&room=lobby&presence=1").await;
    let mut others = Vec::new();
    for (i, n) in nodes.iter().enumerate() {
        for m in 0..3 {
            others.push(n.client(&format!("name=u{i}{m}&room=lobby")).await);
        }
    }
    // Ada is on two nodes: one member.
    others.push(nodes[1].client("name=ada&room=lobby").await);
    others.push(nodes[2].client("name=ada&room=lobby").await);
    let everyone: BTreeSet<String> = ["watcher", "ada"]
        .into_iter()
        .map(String::from)
        .chain((0..3).flat_map(|i| (0..3).map(move |m| format!("u{i}{m}"))))
        .collect();
    for n in &nodes {
        let mut asker = n.client("name=asker&room=lobby").await;
        let expected: BTreeSet<String> = everyone.iter().cloned().chain(["asker".into()]).collect();
        let mut names = BTreeSet::new();
        for _ in 0..50 {
            names = list(&mut asker, "lobby", 5).await.0;
            if names == expected {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert_eq!(names, expected, "the list on {}", n.name);
        asker.ws.close(None).await.unwrap();
        until_event(&mut watcher, "member_left", "asker").await;
    }

    // Kill node pc: its members leave everywhere within the bound, Ada stays (she is on pb).
    let [pa, pb, mut pc] = nodes;
    let killed_at = std::time::Instant::now();
    pc.child.kill().await.unwrap();
    let mut gone = BTreeSet::new();
    while gone.len() < 3 {
        let frame = tokio::time::timeout(Duration::from_secs(15), watcher.recv())
            .await
            .expect("member_left for pc's members within the bound");
        assert_eq!(frame["type"], "member_left", "{frame}");
        gone.extend(users(&frame));
    }
    assert_eq!(gone, set(&["u20", "u21", "u22"]));
    println!("pc's members left {:?} after the kill", killed_at.elapsed());
    let mut asker = pb.client("name=asker2&room=lobby").await;
    let (names, _) = list(&mut asker, "lobby", 100).await;
    assert!(names.contains("ada") && !names.contains("u20"), "{names:?}");

    // pc comes back with the same name: no duplicate, and its new member is there.
    let pc = node("pc", &redis);
    ready(&pc).await;
    let _back = pc.client("name=u20&room=lobby").await;
    until_event(&mut watcher, "member_joined", "u20").await;
    let (names, pages) = list(&mut asker, "lobby", 100).await;
    assert!(names.contains("u20") && !names.contains("u21"), "{names:?}");
    let u20 = pages
        .iter()
        .flat_map(|p| p["members"].as_array().unwrap())
        .find(|m| m["user"] == "u20")
        .unwrap();
    assert_eq!(u20["connections"], 1, "{u20}");
    drop(pa);
}

#[tokio::test]
async fn with_redis_presence_off_each_node_reports_its_own_members() {
    let redis = Redis::start(None).await;
    let off = [("SCALECHAT_REDIS__PRESENCE", "false")];
    let a = Node::spawn_with("qa", redis.port, None, &off);
    let b = Node::spawn_with("qb", redis.port, None, &off);
    ready(&a).await;
    ready(&b).await;
    let mut ann = a.client("name=ann&room=dev&presence=1").await;
    let _bob = b.client("name=bob&room=dev").await;
    let mut cat = Client::connect(&format!("ws://{}/ws?name=cat&room=dev", a.addr)).await;
    cat.expect("welcome").await;
    assert_eq!(
        cat.expect("joined").await["online"],
        2,
        "ann and cat, not bob"
    );
    until_event(&mut ann, "member_joined", "cat").await;
    let (names, _) = list(&mut ann, "dev", 100).await;
    assert_eq!(names, set(&["ann", "cat"]));
}

#[tokio::test]
async fn a_redis_restart_is_followed_by_the_nodes_writing_presence_again() {
    let mut redis = Redis::start(None).await;
    let a = node("ra", &redis);
    let b = node("rb", &redis);
    ready(&a).await;
    ready(&b).await;
    let mut ann = a.client("name=ann&room=r").await;
    let _bob = b.client("name=bob&room=r").await;
    redis.kill().await;
    redis.restart().await; // empty: it keeps nothing
    ready(&a).await;
    let mut names = BTreeSet::new();
    for _ in 0..100 {
        ann.send(json!({"type":"presence","room":"r"})).await;
        let reply = ann.recv().await;
        if reply["type"] == "presence" {
            names = users(&reply);
            if names == set(&["ann", "bob"]) {
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        names,
        set(&["ann", "bob"]),
        "both nodes wrote their members again"
    );
}
