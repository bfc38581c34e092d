//! Sends in flight: a client that sends without waiting for each ack gets every answer in the
//! order it sent, and every member sees its messages in that order, on the embedded transport
//! and across two nodes sharing a real `redis-server`; a slow Redis makes a connection stop
//! reading at `limits.publishes_in_flight`; an outage answers each send in flight, in turn.

mod common;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::Duration;

use common::backplane::{Node, Redis};
use common::{Client, WAIT, config, eventually_async, http_get, readyz, start, within};
use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;

/// What a client's frame should be answered with.
#[derive(Debug, Clone, PartialEq)]
enum Answer {
    Ack {
        reference: String,
        room: String,
    },
    Error {
        code: String,
        reference: Option<String>,
    },
}

/// Frames to send back-to-back, the answers due in order, and the texts each room should
/// show, in order.
struct Plan {
    frames: Vec<String>,
    answers: Vec<Answer>,
    texts: HashMap<String, Vec<String>>,
}

/// `count` sends from `who`: every third to dev (when `dev`), the rest to general; every
/// tenth empty (`empty_message`), every 25th to a room the client is not in (`not_joined`),
/// and a frame that is not JSON (`bad_json`, no `ref`) in the middle.
fn plan(who: &str, count: usize, dev: bool) -> Plan {
    let mut plan = Plan {
        frames: Vec::new(),
        answers: Vec::new(),
        texts: HashMap::new(),
    };
    for n in 0..count {
        let reference = format!("{who}-{n}");
        let room = if dev && n % 3 == 0 { "dev" } else { "general" };
        let (room, text, error) = match n {
            _ if n % 10 == 9 => (room, String::new(), Some("empty_message")),
            _ if n % 25 == 24 => ("nowhere", format!("{who} {n}"), Some("not_joined")),
            _ => (room, format!("{who} {n}"), None),
        };
        let frame = json!({"type":"send","room":room,"message":text,"ref":reference});
        plan.frames.push(frame.to_string());
        plan.answers.push(match error {
            Some(code) => Answer::Error {
                code: code.into(),
                reference: Some(reference),
            },
            None => {
                plan.texts.entry(room.into()).or_default().push(text);
                Answer::Ack {
                    reference,
                    room: room.into(),
                }
            }
        });
        if n == count / 2 {
            plan.frames.push("{\"type\":".into());
            plan.answers.push(Answer::Error {
                code: "bad_json".into(),
                reference: None,
            });
        }
    }
    plan
}

/// Writes every frame of `plan` without waiting for any answer, flushing once.
async fn send_all(client: &mut Client, plan: &Plan) {
    for frame in &plan.frames {
        client.ws.feed(Message::text(frame.clone())).await.unwrap();
    }
    client.ws.flush().await.unwrap();
}

/// Reads until every answer `plan` is due has come, checks them, in order, and returns the
/// rooms and ids the acks gave and the chat messages that came meanwhile.
async fn answers(client: &mut Client, plan: &Plan) -> (Vec<(String, u64)>, Vec<Value>) {
    let (mut got, mut ids, mut messages) = (Vec::new(), Vec::new(), Vec::new());
    while got.len() < plan.answers.len() {
        let frame = client.recv().await;
        let reference = frame["ref"].as_str().map(str::to_owned);
        match frame["type"].as_str() {
            Some("message") => messages.push(frame),
            Some("ack") => {
                assert!(frame.get("duplicate").is_none(), "{frame}");
                let room = frame["room"].as_str().unwrap().to_owned();
                ids.push((room, frame["id"].as_u64().unwrap()));
                got.push(Answer::Ack {
                    reference: reference.unwrap(),
                    room: frame["room"].as_str().unwrap().into(),
                });
            }
            Some("error") => got.push(Answer::Error {
                code: frame["code"].as_str().unwrap().into(),
                reference,
            }),
            _ => panic!("unexpected {frame}"),
        }
    }
    if let Some(at) = (0..got.len()).find(|&i| got[i] != plan.answers[i]) {
        panic!(
            "answer {at}: got {:?}, due {:?}",
            &got[at..(at + 3).min(got.len())],
            &plan.answers[at..(at + 3).min(got.len())]
        );
    }
    (ids, messages)
}

/// Reads until `count` chat messages came (skipping acks) and returns them.
async fn messages(client: &mut Client, count: usize, mut seen: Vec<Value>) -> Vec<Value> {
    while seen.len() < count {
        let frame = client.recv().await;
        match frame["type"].as_str() {
            Some("message") => seen.push(frame),
            Some("ack") => {}
            _ => panic!("unexpected {frame}"),
        }
    }
    seen
}

/// The texts `messages` show in `room`, in order, of those sent by `user`.
fn texts(messages: &[Value], room: &str, user: &str) -> Vec<String> {
    messages
        .iter()
        .filter(|m| m["room"] == room && m["user"] == user)
        .map(|m| m["message"].as_str().unwrap().to_owned())
        .collect()
}

/// Every message of `room` in `messages` has the next id.
fn consecutive(messages: &[Value], room: &str) {
    let ids: Vec<u64> = messages
        .iter()
        .filter(|m| m["room"] == room)
        .map(|m| m["id"].as_u64().unwrap())
        .collect();
    assert!(
        ids.windows(2).all(|w| w[1] == w[0] + 1),
        "{room}: ids out of order: {ids:?}"
    );
}

/// The ids acked in each room grow in the order the acks came.
fn increasing(ids: &[(String, u64)]) {
    let mut last: HashMap<&str, u64> = HashMap::new();
    for (room, id) in ids {
        let before = last.insert(room, *id).unwrap_or(0);
        assert!(before < *id, "{room}: id {id} acked after {before}");
    }
}

fn chat_count(plan: &Plan, room: &str) -> usize {
    plan.texts.get(room).map_or(0, Vec::len)
}

#[tokio::test]
async fn sends_back_to_back_are_answered_and_seen_in_the_order_sent_on_one_node() {
    let server = start(config()).await;
    let mut ann = server.client("name=ann").await;
    ann.join("dev").await;
    let mut bob = server.client("name=bob").await;
    let plan = plan("ann", 200, true);
    send_all(&mut ann, &plan).await;

    let (ids, seen) = answers(&mut ann, &plan).await;
    increasing(&ids);
    let total = chat_count(&plan, "general") + chat_count(&plan, "dev");
    let own = messages(&mut ann, total, seen).await;
    for room in ["general", "dev"] {
        assert_eq!(texts(&own, room, "ann"), plan.texts[room], "{room}");
        consecutive(&own, room);
    }
    let general = messages(&mut bob, chat_count(&plan, "general"), Vec::new()).await;
    assert_eq!(texts(&general, "general", "ann"), plan.texts["general"]);
    consecutive(&general, "general");
    server.stop().await;
}

async fn next_text<S>(ws: &mut S) -> String
where
    S: StreamExt<Item = Result<Message, tokio_tungstenite::tungstenite::Error>> + Unpin,
{
    loop {
        match tokio::time::timeout(WAIT, ws.next()).await.unwrap() {
            Some(Ok(Message::Text(text))) => return text.to_string(),
            Some(Ok(Message::Ping(_) | Message::Pong(_))) => {}
            other => panic!("expected a text frame, got {other:?}"),
        }
    }
}

#[tokio::test]
async fn socketio_messages_back_to_back_are_acked_in_the_order_sent() {
    let server = start(config()).await;
    let mut bob = server.client("name=bob").await;
    let url = format!(
        "ws://{}/socket.io/?EIO=4&transport=websocket&name=sia",
        server.addr
    );
    let (mut sia, _) = tokio_tungstenite::connect_async(&url).await.unwrap();
    assert!(next_text(&mut sia).await.starts_with('0'));
    sia.send(Message::text("40")).await.unwrap();
    assert!(next_text(&mut sia).await.starts_with("40"));
    assert!(next_text(&mut sia).await.starts_with("42[\"joined\""));
    // Every fifth asks for no ack; every seventh is empty (an error, in its ack or as an
    // `error` event); the rest are published, and acked with their ids in the order sent.
    let (mut due, mut sent) = (Vec::new(), Vec::new());
    for n in 0..100u64 {
        let text = if n % 7 == 6 {
            String::new()
        } else {
            format!("sia {n}")
        };
        let data = json!(["event:message", {"message": text, "ref": format!("s-{n}")}]);
        let ack = if n % 5 == 4 {
            String::new()
        } else {
            n.to_string()
        };
        sia.feed(Message::text(format!("42{ack}{data}")))
            .await
            .unwrap();
        if n % 7 != 6 {
            sent.push(text);
        }
        // Each published message takes the room's next id, acked or not.
        match (n % 7 == 6, n % 5 == 4) {
            (true, true) => due.push("error".to_owned()),
            (true, false) => due.push(format!("{n}:error")),
            (false, true) => {}
            (false, false) => due.push(format!("{n}:{}", sent.len())),
        }
    }
    sia.flush().await.unwrap();
    let mut got = Vec::new();
    while got.len() < due.len() {
        let packet = next_text(&mut sia).await;
        if packet.starts_with("42[\"message\"") {
            continue;
        }
        if let Some(error) = packet.strip_prefix("42[\"error\"") {
            assert!(error.contains("empty_message"), "{packet}");
            got.push("error".to_owned());
            continue;
        }
        let ack = packet.strip_prefix("43").expect("an ack");
        let at = ack.find('[').unwrap();
        let answer: Value = serde_json::from_str(&ack[at..]).unwrap();
        if answer[0].get("error").is_some() {
            assert_eq!(answer[0]["error"]["code"], "empty_message", "{packet}");
            got.push(format!("{}:error", &ack[..at]));
        } else {
            assert_eq!(answer[0]["room"], "general", "{packet}");
            got.push(format!("{}:{}", &ack[..at], answer[0]["id"]));
        }
    }
    assert_eq!(got, due);
    let seen = messages(&mut bob, sent.len(), Vec::new()).await;
    assert_eq!(texts(&seen, "general", "sia"), sent);
    server.stop().await;
}

/// The node's `scalechat_publishes_in_flight`.
async fn in_flight(addr: SocketAddr) -> u64 {
    let (status, text) = http_get(addr, "/metrics", &[]).await;
    assert_eq!(status, 200);
    text.lines()
        .find_map(|l| l.strip_prefix("scalechat_publishes_in_flight "))
        .expect("the gauge is exposed")
        .trim()
        .parse()
        .unwrap()
}

/// Holds every script call (and so every publish) until unpaused, or `ms` passed.
async fn pause_writes(redis: &Redis, ms: u64) {
    redis::cmd("CLIENT")
        .arg("PAUSE")
        .arg(ms)
        .arg("WRITE")
        .query_async::<()>(&mut redis.conn().await)
        .await
        .unwrap();
}

async fn unpause(redis: &Redis) {
    redis::cmd("CLIENT")
        .arg("UNPAUSE")
        .query_async::<()>(&mut redis.conn().await)
        .await
        .unwrap();
}

/// A node that waits `timeout_ms` for Redis, with `extra` environment.
async fn patient_node(name: &str, redis: &Redis, timeout_ms: &str, extra: &[(&str, &str)]) -> Node {
    let mut env = vec![("SCALECHAT_REDIS__PUBLISH_TIMEOUT_MS", timeout_ms)];
    env.extend_from_slice(extra);
    let node = Node::spawn_with(name, redis.port, None, &env);
    let addr = node.addr;
    eventually_async(
        "node ready",
        || async move { readyz(addr).await == Some(200) },
    )
    .await;
    node
}

#[tokio::test]
async fn sends_back_to_back_keep_their_order_across_two_nodes() {
    let redis = Redis::start(None).await;
    let a = Node::start("node-a", &redis, None).await;
    let b = Node::start("node-b", &redis, None).await;
    let mut ann = a.client("name=ann").await;
    ann.join("dev").await;
    let mut dan = b.client("name=dan").await;
    let mut bob = b.client("name=bob").await;
    bob.join("dev").await;
    let mut cy = a.client("name=cy").await;
    // Two senders at once, one on each node; every member sees each one's messages in the
    // order that one sent them, and each room's ids one after the other.
    let ann_plan = plan("ann", 300, true);
    let dan_plan = plan("dan", 300, false);
    send_all(&mut ann, &ann_plan).await;
    send_all(&mut dan, &dan_plan).await;
    let ((ann_ids, ann_seen), (dan_ids, dan_seen)) =
        tokio::join!(answers(&mut ann, &ann_plan), answers(&mut dan, &dan_plan));
    increasing(&ann_ids);
    increasing(&dan_ids);
    let general = chat_count(&ann_plan, "general") + chat_count(&dan_plan, "general");
    let dev = chat_count(&ann_plan, "dev");
    let (ann_all, dan_all, bob_all, cy_all) = tokio::join!(
        messages(&mut ann, general + dev, ann_seen),
        messages(&mut dan, general, dan_seen),
        messages(&mut bob, general + dev, Vec::new()),
        messages(&mut cy, general, Vec::new()),
    );
    for seen in [&ann_all, &dan_all, &bob_all, &cy_all] {
        assert_eq!(texts(seen, "general", "ann"), ann_plan.texts["general"]);
        assert_eq!(texts(seen, "general", "dan"), dan_plan.texts["general"]);
        consecutive(seen, "general");
    }
    for seen in [&ann_all, &bob_all] {
        assert_eq!(texts(seen, "dev", "ann"), ann_plan.texts["dev"]);
        consecutive(seen, "dev");
    }
    assert_eq!(in_flight(a.addr).await, 0);
    assert_eq!(in_flight(b.addr).await, 0);
}

#[tokio::test]
async fn a_slow_redis_stops_the_reader_at_the_bound_of_sends_in_flight() {
    let redis = Redis::start(None).await;
    let node = patient_node(
        "node-a",
        &redis,
        "20000",
        &[("SCALECHAT_LIMITS__PUBLISHES_IN_FLIGHT", "4")],
    )
    .await;
    let mut ann = node.client("name=ann").await;
    let plan = Plan {
        frames: (0..12)
            .map(|n| json!({"type":"send","message":format!("m{n}"),"ref":format!("r{n}")}))
            .map(|f| f.to_string())
            .collect(),
        answers: (0..12)
            .map(|n| Answer::Ack {
                reference: format!("r{n}"),
                room: "general".into(),
            })
            .collect(),
        texts: HashMap::from([("general".into(), (0..12).map(|n| format!("m{n}")).collect())]),
    };
    pause_writes(&redis, 30_000).await;
    send_all(&mut ann, &plan).await;
    // The node read four sends and then stopped reading: the other eight wait in the socket.
    within(WAIT, "four sends in flight", || async {
        in_flight(node.addr).await == 4
    })
    .await;
    for _ in 0..10 {
        assert_eq!(in_flight(node.addr).await, 4, "at most four in flight");
        tokio::time::sleep(Duration::from_millis(30)).await;
    }
    unpause(&redis).await;
    let (ids, seen) = answers(&mut ann, &plan).await;
    let ids: Vec<u64> = ids.into_iter().map(|(_, id)| id).collect();
    assert_eq!(ids, (1..=12).collect::<Vec<u64>>());
    let seen = messages(&mut ann, 12, seen).await;
    assert_eq!(texts(&seen, "general", "ann"), plan.texts["general"]);
    assert_eq!(in_flight(node.addr).await, 0);
}

#[tokio::test]
async fn a_redis_outage_answers_each_send_in_flight_in_turn() {
    let mut redis = Redis::start(None).await;
    // Long enough for the sends to be read while Redis holds them; shorter than the client's
    // patience (a reconnecting connection holds a command longer).
    let node = patient_node("node-a", &redis, "5000", &[]).await;
    let mut ann = node.client("name=ann").await;
    ann.say("general", "before", "r0").await;
    // The ack and the message come in either order (the message comes back through Redis).
    let mut frames = [ann.recv().await, ann.recv().await];
    frames.sort_by_key(|f| f["type"].as_str().map(str::to_owned));
    assert_eq!(frames[0]["type"], "ack", "{frames:?}");
    assert_eq!(frames[0]["ref"], "r0", "{frames:?}");
    assert_eq!(frames[1]["message"], "before", "{frames:?}");
    pause_writes(&redis, 30_000).await;
    for n in 1..=5 {
        ann.say("general", &format!("m{n}"), &format!("r{n}")).await;
    }
    within(WAIT, "five sends in flight", || async {
        in_flight(node.addr).await == 5
    })
    .await;
    redis.kill().await;
    // Each send in flight is answered, in the order sent: none was accepted.
    for n in 1..=5 {
        let error = ann.expect("error").await;
        assert_eq!(error["code"], "unavailable", "{error}");
        assert_eq!(error["ref"], format!("r{n}"), "{error}");
    }
    redis.restart().await;
    let addr = node.addr;
    within(Duration::from_secs(30), "node ready again", || async move {
        readyz(addr).await == Some(200)
    })
    .await;
    ann.say("general", "after", "r6").await;
    let mut answered = false;
    while !answered {
        let frame = ann.recv().await;
        match frame["type"].as_str() {
            Some("ack") => {
                assert_eq!(frame["ref"], "r6", "{frame}");
                answered = true;
            }
            Some("message") => assert_eq!(frame["message"], "after", "{frame}"),
            _ => panic!("unexpected {frame}"),
        }
    }
    assert_eq!(in_flight(node.addr).await, 0);
}

#[tokio::test]
async fn sends_that_time_out_are_logged_at_warn_once_for_many() {
    let redis = Redis::start(None).await;
    let path = std::env::temp_dir().join(format!(
        "scalechat-timeouts-{}-{}.log",
        std::process::id(),
        redis.port
    ));
    let log = std::fs::File::create(&path).unwrap();
    let env = [("SCALECHAT_REDIS__PUBLISH_TIMEOUT_MS", "300")];
    let node = Node::spawn_logged("node-a", redis.port, &env, log);
    let addr = node.addr;
    within(WAIT, "node ready", || async move {
        readyz(addr).await == Some(200)
    })
    .await;
    let mut ann = node.client("name=ann").await;
    // Redis holds every write for longer than the node waits: each send times out.
    pause_writes(&redis, 3_000).await;
    for n in 1..=3 {
        ann.say("general", &format!("m{n}"), &format!("r{n}")).await;
    }
    for n in 1..=3 {
        let error = ann.expect("error").await;
        assert_eq!(error["code"], "unavailable", "{error}");
        assert_eq!(error["ref"], format!("r{n}"), "{error}");
    }
    let text = || std::fs::read_to_string(&path).unwrap_or_default();
    within(WAIT, "a warning for the timeouts", || async {
        text().contains("redis calls got no answer in time")
    })
    .await;
    let log = text();
    let _ = std::fs::remove_file(&path);
    let lines: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("redis calls got no answer in time"))
        .collect();
    assert_eq!(
        lines.len(),
        1,
        "one line for three timeouts within 10 s:\n{log}"
    );
    assert!(lines[0].contains("WARN"), "{log}");
    assert!(lines[0].contains("timeout_ms=300"), "{log}");
}

#[tokio::test]
async fn a_client_closing_with_sends_in_flight_gets_their_acks_and_its_messages_are_delivered() {
    let redis = Redis::start(None).await;
    let a = patient_node("node-a", &redis, "5000", &[]).await;
    let b = Node::start("node-b", &redis, None).await;
    let mut ann = a.client("name=ann").await;
    let mut bob = b.client("name=bob").await;
    pause_writes(&redis, 500).await;
    for n in 0..3 {
        ann.say("general", &format!("m{n}"), &format!("r{n}")).await;
    }
    ann.ws.close(None).await.unwrap();
    let (code, _, before) = ann.closed().await;
    assert_eq!(code, 1000);
    let acks: Vec<&Value> = before.iter().filter(|f| f["type"] == "ack").collect();
    let refs: Vec<&str> = acks.iter().map(|a| a["ref"].as_str().unwrap()).collect();
    assert_eq!(refs, ["r0", "r1", "r2"], "{before:?}");
    let seen = messages(&mut bob, 3, Vec::new()).await;
    assert_eq!(texts(&seen, "general", "ann"), ["m0", "m1", "m2"]);
    within(WAIT, "nothing in flight", || async {
        in_flight(a.addr).await == 0
    })
    .await;
}

/// One HTTP/1.1 request: the status and the body.
async fn http(addr: SocketAddr, method: &str, path: &str, body: &str) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let head = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).await.unwrap();
    stream.write_all(body.as_bytes()).await.unwrap();
    let mut raw = Vec::new();
    tokio::time::timeout(WAIT, stream.read_to_end(&mut raw))
        .await
        .expect("an answer in time")
        .unwrap();
    let raw = String::from_utf8(raw).unwrap();
    let (head, body) = raw.split_once("\r\n\r\n").unwrap();
    let status = head.split(' ').nth(1).unwrap().parse().unwrap();
    (status, body.to_owned())
}

#[tokio::test]
async fn a_polling_post_of_many_messages_waits_for_room_and_is_acked_in_order() {
    let redis = Redis::start(None).await;
    let node = patient_node(
        "node-a",
        &redis,
        "20000",
        &[("SCALECHAT_LIMITS__PUBLISHES_IN_FLIGHT", "4")],
    )
    .await;
    let addr = node.addr;
    let (status, open) = http(addr, "GET", "/socket.io/?EIO=4&transport=polling", "").await;
    assert_eq!(status, 200, "{open}");
    let open: Value = serde_json::from_str(open.strip_prefix('0').unwrap()).unwrap();
    let path = format!(
        "/socket.io/?EIO=4&transport=polling&sid={}",
        open["sid"].as_str().unwrap()
    );
    assert_eq!(
        http(addr, "POST", &path, "40{\"name\":\"pat\"}").await.1,
        "ok"
    );
    let mut packets = Vec::new();
    while !packets
        .iter()
        .any(|p: &String| p.starts_with("42[\"joined\""))
    {
        let (_, body) = http(addr, "GET", &path, "").await;
        packets.extend(body.split('\x1e').map(str::to_owned));
    }
    // Twelve messages in one POST while Redis holds every publish: the node takes four and
    // leaves the rest, and the POST's answer, waiting.
    pause_writes(&redis, 30_000).await;
    let payload: Vec<String> = (0..12)
        .map(|n| format!("42{n}[\"event:message\",{{\"message\":\"p{n}\",\"ref\":\"p-{n}\"}}]"))
        .collect();
    let post = tokio::spawn({
        let path = path.clone();
        let payload = payload.join("\x1e");
        async move { http(addr, "POST", &path, &payload).await }
    });
    within(WAIT, "four messages in flight", || async {
        in_flight(addr).await == 4
    })
    .await;
    for _ in 0..10 {
        assert_eq!(in_flight(addr).await, 4, "at most four in flight");
        assert!(!post.is_finished(), "the POST waits for room");
        tokio::time::sleep(Duration::from_millis(30)).await;
    }
    unpause(&redis).await;
    assert_eq!(post.await.unwrap(), (200, "ok".to_owned()));
    let mut acks = Vec::new();
    while acks.len() < 12 {
        let (_, body) = http(addr, "GET", &path, "").await;
        acks.extend(
            body.split('\x1e')
                .filter(|p| p.starts_with("43"))
                .map(str::to_owned),
        );
    }
    let due: Vec<String> = (0..12)
        .map(|n| format!("43{n}[{{\"id\":{},\"room\":\"general\"}}]", n + 1))
        .collect();
    assert_eq!(acks, due);
}
