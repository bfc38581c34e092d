//! The server API as a backend uses it: messages posted through it reach WebSocket and
//! Socket.IO members like any `send` (same ids, `ref` dedupe), history and members read back,
//! users disconnected on every node, and bad keys, bodies and floods refused; on the
//! embedded transport and on two real processes sharing a real Redis.

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use common::backplane::{Node, Redis};
use common::{config, start};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const KEY: &str = "test-api-key-0123456789";

/// One HTTP/1.1 request with `key`: the status and the JSON body.
async fn call(
    addr: SocketAddr,
    method: &str,
    path: &str,
    key: Option<&str>,
    body: Option<&str>,
) -> (u16, Value) {
    let (status, text) = request(
        addr,
        method,
        path,
        key,
        "application/json",
        body.unwrap_or(""),
    )
    .await;
    (status, serde_json::from_str(&text).unwrap_or(Value::Null))
}

/// One HTTP/1.1 request without a key: the status and the body as text.
async fn call_raw(addr: SocketAddr, method: &str, path: &str, body: &str) -> (u16, String) {
    request(addr, method, path, None, "text/plain", body).await
}

/// One HTTP/1.1 request (with `key`, when given): the status and the body as text.
async fn request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    key: Option<&str>,
    content_type: &str,
    body: &str,
) -> (u16, String) {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    let mut head = format!("{method} {path} HTTP/1.1\r\nhost: test\r\nconnection: close\r\n");
    if let Some(key) = key {
        head.push_str(&format!("authorization: Bearer {key}\r\n"));
    }
    head.push_str(&format!(
        "content-type: {content_type}\r\ncontent-length: {}\r\n\r\n",
        body.len()
    ));
    stream.write_all(head.as_bytes()).await.unwrap();
    stream.write_all(body.as_bytes()).await.unwrap();
    let mut answer = Vec::new();
    tokio::time::timeout(common::WAIT, stream.read_to_end(&mut answer))
        .await
        .expect("an answer in time")
        .unwrap();
    let text = String::from_utf8_lossy(&answer).into_owned();
    let status = text[9..12].parse().unwrap();
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    (status, body)
}

async fn post(addr: SocketAddr, path: &str, body: Value) -> (u16, Value) {
    call(addr, "POST", path, Some(KEY), Some(&body.to_string())).await
}

async fn get(addr: SocketAddr, path: &str) -> (u16, Value) {
    call(addr, "GET", path, Some(KEY), None).await
}

#[tokio::test]
async fn a_backend_posts_reads_lists_and_disconnects() {
    let mut cfg = config();
    cfg.api.keys = vec![KEY.into()];
    let server = start(cfg).await;
    let addr = server.addr;
    let mut ann = server.client("name=ann&room=dev").await;
    ann.say("dev", "from a client", "c1").await;
    assert_eq!(ann.expect("message").await["id"], 1);
    ann.expect("ack").await;

    let (status, answer) = post(
        addr,
        "/api/v1/rooms/dev/messages",
        json!({"message":"system says hi"}),
    )
    .await;
    assert_eq!((status, &answer), (200, &json!({"room":"dev","id":2})));
    let message = ann.expect("message").await;
    assert_eq!(
        (&message["user"], &message["id"]),
        (&json!("system"), &json!(2))
    );
    let bot = json!({"message":"beep","user":"bot","ref":"b-1"});
    assert_eq!(
        post(addr, "/api/v1/rooms/dev/messages", bot.clone())
            .await
            .1["id"],
        3
    );
    assert_eq!(ann.expect("message").await["user"], "bot");
    let (_, again) = post(addr, "/api/v1/rooms/dev/messages", bot).await;
    assert_eq!(
        again,
        json!({"room":"dev","id":3,"duplicate":true}),
        "not delivered twice"
    );

    let (status, page) = get(addr, "/api/v1/rooms/dev/messages?limit=2").await;
    assert_eq!(status, 200);
    let ids: Vec<u64> = page["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_u64().unwrap())
        .collect();
    assert_eq!((ids, &page["more"]), (vec![2, 3], &json!(true)));
    let (_, empty) = get(addr, "/api/v1/rooms/nobody-here/messages").await;
    assert_eq!(
        empty["messages"],
        json!([]),
        "an unknown room is an empty page"
    );
    let (_, members) = get(addr, "/api/v1/rooms/dev/presence").await;
    assert_eq!(
        (&members["online"], &members["members"][0]["user"]),
        (&json!(1), &json!("ann"))
    );
    let (_, rooms) = get(addr, "/api/v1/rooms").await;
    assert_eq!(rooms["rooms"], json!([{"room":"dev","online":1}]));

    let (status, done) = post(addr, "/api/v1/users/ann/disconnect", json!({})).await;
    assert_eq!((status, &done["reached"]), (200, &json!(1)));
    let (code, reason, _) = ann.closed().await;
    assert_eq!(code, 4003, "{reason}");

    let (status, spec) = call(addr, "GET", "/api/v1/openapi.json", None, None).await;
    assert_eq!((status, &spec["openapi"]), (200, &json!("3.0.3")));
}

#[tokio::test]
async fn bad_keys_bodies_and_floods_are_refused_and_do_nothing() {
    let mut cfg = config();
    cfg.api.keys = vec![KEY.into()];
    cfg.api.max_body_bytes = 1024;
    cfg.api.requests_per_second = 0.01;
    cfg.api.request_burst = 6;
    let server = start(cfg).await;
    let addr = server.addr;
    let mut ann = server.client("name=ann&room=dev").await;
    let body = json!({"message":"should not arrive"}).to_string();
    for key in [
        None,
        Some("wrong-key-0123456789xx"),
        Some("test-api-key-012345678"),
    ] {
        let (status, answer) =
            call(addr, "POST", "/api/v1/rooms/dev/messages", key, Some(&body)).await;
        assert_eq!(
            (status, &answer["error"]["code"]),
            (401, &json!("unauthorized"))
        );
    }
    let big = json!({"message": "x".repeat(2000)}).to_string();
    let (status, _) = call(
        addr,
        "POST",
        "/api/v1/rooms/dev/messages",
        Some(KEY),
        Some(&big),
    )
    .await;
    assert_eq!(status, 413);
    for (body, code) in [
        ("not json", "bad_json"),
        (r#"{"user":"bot"}"#, "bad_field"),
        (r#"{"message":"  "}"#, "empty_message"),
        (r#"{"message":"hi","user":""}"#, "bad_field"),
    ] {
        let (status, answer) = call(
            addr,
            "POST",
            "/api/v1/rooms/dev/messages",
            Some(KEY),
            Some(body),
        )
        .await;
        assert_eq!(
            (status, &answer["error"]["code"]),
            (400, &json!(code)),
            "{body}"
        );
    }
    let (status, answer) = post(addr, "/api/v1/rooms/a%20b/messages", json!({"message":"x"})).await;
    assert_eq!(
        (status, &answer["error"]["code"]),
        (400, &json!("bad_room"))
    );
    // The key's burst of 6 is spent (the 413 and the 400s counted): the next is refused.
    let (status, answer) = get(addr, "/api/v1/rooms").await;
    assert_eq!(
        (status, &answer["error"]["code"]),
        (429, &json!("rate_limited"))
    );
    // Nothing was posted.
    ann.send(json!({"type":"history","room":"dev"})).await;
    assert_eq!(ann.expect("history").await["messages"], json!([]));
}

#[tokio::test]
async fn the_api_is_off_without_keys() {
    let server = start(config()).await;
    let (status, _) = post(
        server.addr,
        "/api/v1/rooms/dev/messages",
        json!({"message":"x"}),
    )
    .await;
    assert_eq!(status, 404);
}

#[tokio::test]
async fn on_two_nodes_posts_reach_every_protocol_once_and_disconnects_reach_every_node() {
    let redis = Redis::start(None).await;
    let env = [("SCALECHAT_API__KEYS", format!("[\"{KEY}\"]"))];
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let a = Node::spawn_with("aa", redis.port, None, &env);
    let b = Node::spawn_with("ab", redis.port, None, &env);
    for n in [&a, &b] {
        let addr = n.addr;
        common::eventually_async("node ready", || async move {
            common::readyz(addr).await == Some(200)
        })
        .await;
    }
    let mut on_b = b.client("name=bea&room=dev").await;
    let mut on_a = a.client("name=al&room=dev").await;
    // A Socket.IO member on node b too, over long-polling.
    let (_, open) = call_raw(
        b.addr,
        "GET",
        "/socket.io/?EIO=4&transport=polling&room=dev",
        "",
    )
    .await;
    let open: Value = serde_json::from_str(open.strip_prefix('0').unwrap()).unwrap();
    let sid = open["sid"].as_str().unwrap().to_owned();
    let polling = format!("/socket.io/?EIO=4&transport=polling&sid={sid}");
    call_raw(b.addr, "POST", &polling, r#"40{"name":"sio"}"#).await;
    on_a.say("dev", "client first", "c1").await;
    // Messages `client` received, by id and text, until it has `count`.
    async fn messages(client: &mut common::Client, seen: &mut Vec<(u64, String)>, count: usize) {
        while seen.len() < count {
            let frame = client.recv().await;
            if frame["type"] == "message" {
                let id = frame["id"].as_u64().unwrap();
                seen.push((id, frame["message"].as_str().unwrap().to_owned()));
            }
        }
    }
    let mut seen_a = Vec::new();
    loop {
        let frame = on_a.recv().await;
        match frame["type"].as_str() {
            Some("ack") => break,
            Some("message") => seen_a.push((1, frame["message"].as_str().unwrap().to_owned())),
            _ => {}
        }
    }
    let (_, answer) = post(
        a.addr,
        "/api/v1/rooms/dev/messages",
        json!({"message":"api second"}),
    )
    .await;
    assert_eq!(answer["id"], 2);
    let mut seen_b = Vec::new();
    messages(&mut on_b, &mut seen_b, 2).await;
    let mut packets = String::new();
    for _ in 0..20 {
        packets.push_str(&call_raw(b.addr, "GET", &polling, "").await.1);
        if packets.contains("api second") {
            break;
        }
    }
    assert_eq!(packets.matches("api second").count(), 1, "{packets}");
    assert!(
        packets.find("client first") < packets.find("api second"),
        "{packets}"
    );
    messages(&mut on_a, &mut seen_a, 2).await;
    let expected = [(1, "client first".to_owned()), (2, "api second".to_owned())];
    assert_eq!(
        (seen_a.as_slice(), seen_b.as_slice()),
        (&expected[..], &expected[..])
    );
    // The user is on node b; the request goes to node a.
    let (status, done) = post(a.addr, "/api/v1/users/bea/disconnect", json!({})).await;
    assert_eq!(
        (status, &done["reached"]),
        (200, &json!(2)),
        "both nodes heard it"
    );
    let (code, _, _) = tokio::time::timeout(Duration::from_secs(10), on_b.closed())
        .await
        .unwrap();
    assert_eq!(code, 4003);
    let (_, rooms) = get(a.addr, "/api/v1/rooms").await;
    let mut listed = false;
    for _ in 0..50 {
        let (_, rooms) = get(a.addr, "/api/v1/rooms").await;
        if rooms["rooms"] == json!([{"room":"dev","online":2}]) {
            listed = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(listed, "al and sio are left in dev: {rooms}");
}
