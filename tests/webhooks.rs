//! Webhooks end to end: two scalechat processes on one real Redis send their events to a
//! receiver in this test, which checks every signature and misbehaves at first (two 500s, a
//! hang past the timeout, a redirect). Every event arrives, and each idempotency key is
//! handled once: the message events are sent by the node that accepted each message, not
//! once per node.

mod common;

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use common::backplane::{Node, Redis};
use common::{eventually, eventually_async, http_get, readyz};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use ring::hmac;
use serde_json::Value;
use tokio::net::TcpListener;

const SECRET: &str = "whsec-test-0123456789abcdef";
/// The replay window docs/webhooks.md recommends.
const REPLAY_WINDOW_SECS: u64 = 300;

/// What the receiver saw.
#[derive(Default)]
struct Seen {
    requests: u32,
    bad_signatures: u32,
    /// Per idempotency key, how many times it was handled (in a request answered 200).
    handled: HashMap<String, u32>,
    events: Vec<Value>,
}

/// A webhook receiver: request 1 and 2 get 500, request 3 hangs, request 4 a redirect, the
/// rest are handled and answered 200.
async fn receiver() -> (SocketAddr, Arc<Mutex<Seen>>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let seen = Arc::new(Mutex::new(Seen::default()));
    let state = seen.clone();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            let state = state.clone();
            tokio::spawn(async move {
                let service = service_fn(move |req| answer(state.clone(), req));
                let _ = http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    (addr, seen)
}

async fn answer(
    seen: Arc<Mutex<Seen>>,
    req: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let header = |name: &str| {
        req.headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_owned()
    };
    let timestamp = header("x-scalechat-timestamp");
    let signature = header("x-scalechat-signature");
    let body = req.into_body().collect().await.unwrap().to_bytes();
    let n = {
        let mut seen = seen.lock().unwrap();
        seen.requests += 1;
        seen.requests
    };
    let status = match n {
        1 | 2 => StatusCode::INTERNAL_SERVER_ERROR,
        3 => {
            tokio::time::sleep(Duration::from_secs(30)).await;
            StatusCode::INTERNAL_SERVER_ERROR
        }
        4 => StatusCode::FOUND,
        _ => {
            let mut seen = seen.lock().unwrap();
            if !verified(&timestamp, &signature, &body) {
                seen.bad_signatures += 1;
                StatusCode::UNAUTHORIZED
            } else {
                let batch: Value = serde_json::from_slice(&body).unwrap();
                for event in batch["events"].as_array().unwrap() {
                    let key = event["key"].as_str().unwrap().to_owned();
                    let count = seen.handled.entry(key).or_default();
                    *count += 1;
                    if *count == 1 {
                        seen.events.push(event.clone());
                    }
                }
                StatusCode::OK
            }
        }
    };
    let mut res = Response::new(Full::new(Bytes::new()));
    *res.status_mut() = status;
    if status == StatusCode::FOUND {
        res.headers_mut()
            .insert("location", "http://127.0.0.1:1/".parse().unwrap());
    }
    Ok(res)
}

/// As a receiver should: the signature over `timestamp.body`, and a recent timestamp.
fn verified(timestamp: &str, signature: &str, body: &[u8]) -> bool {
    let Ok(ts) = timestamp.parse::<u64>() else {
        return false;
    };
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs();
    if now.abs_diff(ts) > REPLAY_WINDOW_SECS {
        return false;
    }
    let Some(hex) = signature.strip_prefix("v1=") else {
        return false;
    };
    let Some(tag) = (0..hex.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(hex.get(i..i + 2)?, 16).ok())
        .collect::<Option<Vec<u8>>>()
    else {
        return false;
    };
    let key = hmac::Key::new(hmac::HMAC_SHA256, SECRET.as_bytes());
    let signed = [timestamp.as_bytes(), b".", body].concat();
    hmac::verify(&key, &signed, &tag).is_ok()
}

fn of_type<'a>(seen: &'a Seen, kind: &str) -> Vec<&'a Value> {
    seen.events.iter().filter(|e| e["type"] == kind).collect()
}

async fn metric(addr: SocketAddr, name: &str) -> u64 {
    let (_, text) = http_get(addr, "/metrics", &[]).await;
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or(0)
}

#[tokio::test]
async fn every_event_arrives_signed_once_per_key_from_one_node() {
    let (hooks, seen) = receiver().await;
    let redis = Redis::start(None).await;
    let endpoints = format!("[{{url=\"http://{hooks}/hooks\",secret=\"{SECRET}\"}}]");
    let env = [
        ("SCALECHAT_WEBHOOKS__ENDPOINTS", endpoints.as_str()),
        ("SCALECHAT_WEBHOOKS__TIMEOUT_MS", "1000"),
        ("SCALECHAT_WEBHOOKS__RETRY_INITIAL_MS", "50"),
        ("SCALECHAT_WEBHOOKS__RETRY_MAX_MS", "200"),
        ("SCALECHAT_WEBHOOKS__MAX_ATTEMPTS", "50"),
    ];
    let a = Node::spawn_with("node-a", redis.port, None, &env);
    let b = Node::spawn_with("node-b", redis.port, None, &env);
    for node in [&a, &b] {
        let addr = node.addr;
        eventually_async(
            "node ready",
            || async move { readyz(addr).await == Some(200) },
        )
        .await;
    }

    let mut alice = a.client("name=alice").await;
    let mut bob = b.client("name=bob").await;
    alice.say_acked("a", 5).await;
    bob.say_acked("b", 5).await;
    eventually("ten messages and two members arrive", || {
        let seen = seen.lock().unwrap();
        of_type(&seen, "message").len() == 10 && of_type(&seen, "member_joined").len() == 2
    })
    .await;
    drop(bob);
    drop(alice);
    eventually("both members leave and the room is vacated", || {
        let seen = seen.lock().unwrap();
        of_type(&seen, "member_left").len() == 2 && of_type(&seen, "room_vacated").len() == 1
    })
    .await;
    // Anything sent twice would arrive by now.
    tokio::time::sleep(Duration::from_millis(500)).await;

    // The 500s, the hang and the redirect were counted as failures and retried.
    let failed = metric(a.addr, "scalechat_webhook_requests_failed_total").await
        + metric(b.addr, "scalechat_webhook_requests_failed_total").await;
    assert!(failed >= 4, "{failed} failed requests");
    let dropped = metric(a.addr, "scalechat_webhook_events_dropped_total").await
        + metric(b.addr, "scalechat_webhook_events_dropped_total").await;
    assert_eq!(dropped, 0);

    let seen = seen.lock().unwrap();
    assert_eq!(seen.bad_signatures, 0);
    assert!(seen.requests >= 5, "{} requests", seen.requests);
    let twice: Vec<_> = seen.handled.iter().filter(|(_, n)| **n > 1).collect();
    assert!(twice.is_empty(), "handled more than once: {twice:?}");
    let mut ids: Vec<u64> = of_type(&seen, "message")
        .iter()
        .map(|m| {
            assert_eq!(m["room"], "general");
            assert_eq!(
                m["key"],
                format!(
                    "message:general:{}:{}",
                    m["epoch"].as_str().unwrap(),
                    m["id"]
                )
            );
            m["id"].as_u64().unwrap()
        })
        .collect();
    ids.sort_unstable();
    assert_eq!(ids, (1..=10).collect::<Vec<_>>());
    let texts: Vec<&str> = of_type(&seen, "message")
        .iter()
        .filter(|m| m["user"] == "alice")
        .map(|m| m["text"].as_str().unwrap())
        .collect();
    assert_eq!(texts.len(), 5, "{texts:?}");
    assert_eq!(of_type(&seen, "room_occupied").len(), 1);
    let mut joined: Vec<&str> = of_type(&seen, "member_joined")
        .iter()
        .map(|e| e["user"].as_str().unwrap())
        .collect();
    joined.sort_unstable();
    assert_eq!(joined, ["alice", "bob"]);
}

#[tokio::test]
async fn the_embedded_transport_reports_messages_rooms_and_members() {
    let (hooks, seen) = receiver().await;
    let mut config = common::config();
    config.webhooks.endpoints = vec![scalechat::config::WebhookEndpoint {
        url: format!("http://{hooks}/hooks"),
        secret: SECRET.into(),
        events: Vec::new(),
    }];
    config.webhooks.timeout_ms = 1000;
    config.webhooks.retry_initial_ms = 50;
    config.webhooks.retry_max_ms = 200;
    config.webhooks.max_attempts = 50;
    let server = common::start(config).await;
    let mut ann = server.client("name=ann").await;
    let mut bo = server.client("name=bo").await;
    ann.say_acked("x", 3).await;
    bo.say_acked("y", 2).await;
    drop(ann);
    drop(bo);
    eventually("every event arrives", || {
        let seen = seen.lock().unwrap();
        of_type(&seen, "message").len() == 5
            && of_type(&seen, "member_left").len() == 2
            && of_type(&seen, "room_vacated").len() == 1
    })
    .await;
    {
        let seen = seen.lock().unwrap();
        assert_eq!(seen.bad_signatures, 0);
        assert!(seen.handled.values().all(|n| *n == 1));
        let kinds: Vec<&str> = seen
            .events
            .iter()
            .map(|e| e["type"].as_str().unwrap())
            .collect();
        // One node: its events arrive in the order they happened.
        assert_eq!(
            kinds,
            [
                "room_occupied",
                "member_joined",
                "member_joined",
                "message",
                "message",
                "message",
                "message",
                "message",
                "member_left",
                "member_left",
                "room_vacated"
            ]
        );
        let texts: Vec<&str> = of_type(&seen, "message")
            .iter()
            .map(|m| m["text"].as_str().unwrap())
            .collect();
        assert_eq!(texts, ["x0", "x1", "x2", "y0", "y1"]);
    }
    server.stop().await;
}

#[tokio::test]
async fn the_event_stream_on_redis_reads_back_every_event_once() {
    let redis = Redis::start(None).await;
    let url = format!("redis://127.0.0.1:{}/0", redis.port);
    let env = [
        ("SCALECHAT_EVENT_STREAM__REDIS_URL", url.as_str()),
        ("SCALECHAT_EVENT_STREAM__STREAM", "test:events"),
    ];
    let a = Node::spawn_with("node-a", redis.port, None, &env);
    let b = Node::spawn_with("node-b", redis.port, None, &env);
    for node in [&a, &b] {
        let addr = node.addr;
        eventually_async(
            "node ready",
            || async move { readyz(addr).await == Some(200) },
        )
        .await;
    }
    let mut alice = a.client("name=alice").await;
    let mut bob = b.client("name=bob").await;
    alice.say_acked("a", 3).await;
    bob.say_acked("b", 3).await;
    drop(alice);
    drop(bob);

    type Entry = (String, HashMap<String, String>);
    let read = || async {
        let mut conn = redis.conn().await;
        let mut xrange = redis::cmd("XRANGE");
        xrange.arg("test:events").arg("-").arg("+");
        xrange.query_async::<Vec<Entry>>(&mut conn).await.unwrap()
    };
    eventually_async("every event is in the stream", || async {
        let entries = read().await;
        let count = |kind: &str| entries.iter().filter(|(_, f)| f["type"] == kind).count();
        count("message") == 6 && count("member_left") == 2 && count("room_vacated") == 1
    })
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let entries = read().await;
    let mut keys: Vec<&str> = entries.iter().map(|(_, f)| f["key"].as_str()).collect();
    keys.sort_unstable();
    let total = keys.len();
    keys.dedup();
    assert_eq!(keys.len(), total, "a key appended twice");
    let mut ids: Vec<u64> = entries
        .iter()
        .filter(|(_, f)| f["type"] == "message")
        .map(|(_, f)| {
            let event: Value = serde_json::from_str(&f["event"]).unwrap();
            assert_eq!(event["key"].as_str(), Some(f["key"].as_str()));
            event["id"].as_u64().unwrap()
        })
        .collect();
    ids.sort_unstable();
    assert_eq!(ids, [1, 2, 3, 4, 5, 6]);
    let kinds = |kind: &str| entries.iter().filter(|(_, f)| f["type"] == kind).count();
    assert_eq!(kinds("room_occupied"), 1);
    assert_eq!(kinds("member_joined"), 2);
}
