//! Who may join which room: rooms granted by the token, public rooms, read-only rooms, the
//! application's join hook, and direct-message rooms that admit only their two users, on the
//! embedded transport and across real processes sharing a real Redis.

mod common;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use common::backplane::{Node, Redis};
use common::{Client, config, http_get, start};
use http_body_util::{BodyExt, Full};
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};

const SECRET: &str = "0123456789abcdef0123456789abcdef-access";

/// A token for `name`, valid for an hour, with `extra` claims (or expired, with `exp` in it).
fn token(name: &str, extra: Value) -> String {
    let exp = jsonwebtoken::get_current_timestamp() + 3600;
    let mut claims = json!({"name": name, "exp": exp});
    claims
        .as_object_mut()
        .unwrap()
        .extend(extra.as_object().unwrap().clone());
    jsonwebtoken::encode(
        &jsonwebtoken::Header::default(),
        &claims,
        &jsonwebtoken::EncodingKey::from_secret(SECRET.as_bytes()),
    )
    .unwrap()
}

/// Connects to `addr` with `query` and reads `welcome`; the first room's answer follows.
async fn connect(addr: SocketAddr, query: &str) -> Client {
    let mut client = Client::connect(&format!("ws://{addr}/ws?{query}")).await;
    client.expect("welcome").await;
    client
}

/// Sends `request` and returns the answer: `joined` (after its history) or `error`.
async fn ask(client: &mut Client, request: Value) -> Value {
    client.send(request).await;
    loop {
        let frame = client.recv().await;
        match frame["type"].as_str() {
            Some("message") => continue,
            _ => return frame,
        }
    }
}

#[tokio::test]
async fn tokens_grant_rooms_and_read_only_rooms_and_public_rooms_are_open() {
    let mut cfg = config();
    cfg.auth.jwt_secret = SECRET.into();
    cfg.auth.public_rooms = vec!["general".into(), "lobby-*".into()];
    let server = start(cfg).await;
    let addr = server.addr;
    let grant = json!({"rooms": ["team-*"], "read_only_rooms": ["news"]});
    let mut ann = connect(addr, &format!("token={}", token("ann", grant))).await;
    assert_eq!(ann.expect("joined").await["room"], "general", "public");
    for room in ["team-a", "lobby-1"] {
        let joined = ask(&mut ann, json!({"type":"join","room":room})).await;
        assert_eq!(
            (&joined["type"], &joined["room"]),
            (&json!("joined"), &json!(room))
        );
    }
    let refused = ask(&mut ann, json!({"type":"join","room":"secret"})).await;
    assert_eq!(refused["code"], "forbidden", "{refused}");
    for request in [
        json!({"type":"history","room":"secret"}),
        json!({"type":"presence","room":"secret"}),
        json!({"type":"send","room":"secret","message":"hi"}),
    ] {
        assert_eq!(ask(&mut ann, request).await["code"], "not_joined");
    }
    let news = ask(&mut ann, json!({"type":"join","room":"news"})).await;
    assert_eq!(news["read_only"], true, "{news}");
    let refused = ask(
        &mut ann,
        json!({"type":"send","room":"news","message":"hi"}),
    )
    .await;
    assert_eq!(refused["code"], "read_only", "{refused}");
    // A reader still reads what others send there.
    let mut editor = connect(
        addr,
        &format!("token={}", token("ed", json!({"rooms":["news"]}))),
    )
    .await;
    editor.expect("joined").await; // general
    ask(&mut editor, json!({"type":"join","room":"news"})).await;
    editor.say("news", "extra!", "e1").await;
    assert_eq!(ann.expect_chat().await["message"], "extra!");

    // A token that lists no rooms keeps every room open, as before rooms were granted.
    let mut open = connect(addr, &format!("token={}", token("olga", json!({})))).await;
    open.expect("joined").await;
    assert_eq!(
        ask(&mut open, json!({"type":"join","room":"secret"})).await["type"],
        "joined"
    );

    // Forged and expired tokens are refused at the door.
    let forged = jsonwebtoken::encode(
        &jsonwebtoken::Header::default(),
        &json!({"name":"eve","exp": jsonwebtoken::get_current_timestamp() + 3600,
            "rooms":["*"]}),
        &jsonwebtoken::EncodingKey::from_secret(b"not-the-secret-not-the-secret-xx"),
    )
    .unwrap();
    let expired = token("eve", json!({"exp": 1000}));
    for t in [forged, expired] {
        let (status, _) = http_get(
            addr,
            &format!("/ws?token={t}"),
            &[
                ("connection", "upgrade"),
                ("upgrade", "websocket"),
                ("sec-websocket-version", "13"),
                ("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ=="),
            ],
        )
        .await;
        assert_eq!(status, 401);
    }
}

#[tokio::test]
async fn direct_messages_reach_only_their_two_users() {
    let mut cfg = config();
    cfg.auth.jwt_secret = SECRET.into();
    let server = start(cfg).await;
    let addr = server.addr;
    let mut alice = connect(addr, &format!("token={}", token("alice", json!({})))).await;
    let mut bob = connect(addr, &format!("token={}", token("bob", json!({})))).await;
    let mut carol = connect(
        addr,
        &format!("token={}", token("carol", json!({"rooms":["*"]}))),
    )
    .await;
    for c in [&mut alice, &mut bob, &mut carol] {
        c.expect("joined").await;
    }
    let joined = ask(&mut alice, json!({"type":"join","dm":"bob"})).await;
    assert_eq!(joined["dm"], "bob", "{joined}");
    let room = joined["room"].as_str().unwrap().to_owned();
    assert!(room.starts_with("dm-"), "{room}");
    let joined = ask(&mut bob, json!({"type":"join","dm":"alice"})).await;
    assert_eq!(
        joined["room"],
        room.as_str(),
        "the same room, whoever joins first"
    );
    alice.say(&room, "psst", "a1").await;
    assert_eq!(bob.expect_chat().await["message"], "psst");

    // Carol cannot join it by name, even with every room granted; her own DM with Bob is
    // another room.
    let refused = ask(&mut carol, json!({"type":"join","room":room})).await;
    assert_eq!(refused["code"], "forbidden", "{refused}");
    let hers = ask(&mut carol, json!({"type":"join","dm":"bob"})).await;
    assert_ne!(hers["room"], room.as_str());
    let refused = ask(&mut carol, json!({"type":"history","room":room})).await;
    assert_eq!(refused["code"], "not_joined");

    // A reconnect gets the history of the DM, like any room.
    let mut again = connect(addr, &format!("token={}", token("bob", json!({})))).await;
    again.expect("joined").await;
    again.send(json!({"type":"join","dm":"alice"})).await;
    let (joined, history) = again.joined().await;
    assert_eq!(joined["dm"], "alice");
    assert_eq!(history[0]["message"], "psst");
}

/// A join hook of the test's own: allows `hook-ok`, allows `hook-ro` read-only, answers
/// `hook-slow` too late, refuses the rest; counts its requests.
async fn join_hook() -> (SocketAddr, Arc<AtomicUsize>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let asked = Arc::new(AtomicUsize::new(0));
    let counter = asked.clone();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            let counter = counter.clone();
            tokio::spawn(async move {
                let service = service_fn(move |req: Request<hyper::body::Incoming>| {
                    let counter = counter.clone();
                    async move {
                        counter.fetch_add(1, Ordering::SeqCst);
                        let body = req.into_body().collect().await.unwrap().to_bytes();
                        let asked: Value = serde_json::from_slice(&body).unwrap();
                        let answer = match asked["room"].as_str().unwrap() {
                            "hook-ok" => json!({"allow": true}),
                            "hook-ro" => json!({"allow": true, "read_only": true}),
                            "hook-slow" => {
                                tokio::time::sleep(Duration::from_secs(3)).await;
                                json!({"allow": true})
                            }
                            _ => json!({"allow": false}),
                        };
                        Ok::<_, Infallible>(Response::new(Full::new(Bytes::from(
                            answer.to_string(),
                        ))))
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    (addr, asked)
}

#[tokio::test]
async fn the_join_hook_decides_rooms_tokens_do_not_list_and_its_answers_are_cached() {
    let (hook, asked) = join_hook().await;
    let mut cfg = config();
    cfg.auth.jwt_secret = SECRET.into();
    cfg.auth.public_rooms = vec!["general".into()];
    cfg.auth.join_hook_url = format!("http://{hook}/may-join");
    cfg.auth.join_hook_timeout_ms = 500;
    cfg.limits.request_burst = 1000;
    cfg.limits.requests_per_second = 1000.0;
    let server = start(cfg).await;
    let mut ann = connect(server.addr, &format!("token={}", token("ann", json!({})))).await;
    ann.expect("joined").await;
    assert_eq!(asked.load(Ordering::SeqCst), 0, "public rooms ask nobody");
    let ok = ask(&mut ann, json!({"type":"join","room":"hook-ok"})).await;
    assert_eq!(ok["type"], "joined", "{ok}");
    let ro = ask(&mut ann, json!({"type":"join","room":"hook-ro"})).await;
    assert_eq!(ro["read_only"], true, "{ro}");
    for room in ["hook-no", "hook-slow"] {
        let refused = ask(&mut ann, json!({"type":"join","room":room})).await;
        assert_eq!(refused["code"], "forbidden", "{room}: {refused}");
    }
    // A flood of the same question reaches the backend once: answers are cached.
    let before = asked.load(Ordering::SeqCst);
    for _ in 0..30 {
        ask(&mut ann, json!({"type":"leave","room":"hook-ok"})).await;
        assert_eq!(
            ask(&mut ann, json!({"type":"join","room":"hook-ok"})).await["type"],
            "joined"
        );
        assert_eq!(
            ask(&mut ann, json!({"type":"join","room":"hook-no"})).await["code"],
            "forbidden"
        );
    }
    assert_eq!(
        asked.load(Ordering::SeqCst),
        before,
        "every answer came from the cache"
    );
}

#[tokio::test]
async fn a_third_user_cannot_join_a_dm_on_any_node() {
    let redis = Redis::start(None).await;
    let env = [("SCALECHAT_AUTH__JWT_SECRET", SECRET)];
    let a = Node::spawn_with("da", redis.port, None, &env);
    let b = Node::spawn_with("db", redis.port, None, &env);
    for n in [&a, &b] {
        let addr = n.addr;
        common::eventually_async("node ready", || async move {
            common::readyz(addr).await == Some(200)
        })
        .await;
    }
    let mut alice = connect(a.addr, &format!("token={}", token("alice", json!({})))).await;
    let mut bob = connect(b.addr, &format!("token={}", token("bob", json!({})))).await;
    alice.expect("joined").await;
    bob.expect("joined").await;
    let room = ask(&mut alice, json!({"type":"join","dm":"bob"})).await["room"].clone();
    assert_eq!(
        ask(&mut bob, json!({"type":"join","dm":"alice"})).await["room"],
        room
    );
    alice
        .say(room.as_str().unwrap(), "across nodes", "x1")
        .await;
    assert_eq!(bob.expect_chat().await["message"], "across nodes");
    for node in [&a, &b] {
        let mut carol = connect(node.addr, &format!("token={}", token("carol", json!({})))).await;
        carol.expect("joined").await;
        let refused = ask(&mut carol, json!({"type":"join","room":room})).await;
        assert_eq!(refused["code"], "forbidden", "on {}: {refused}", node.name);
    }
}
