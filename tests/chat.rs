//! Chat behaviour as clients see it: rooms, ids, order, acks, errors, limits.

mod common;

use std::collections::HashMap;

use common::{Client, config, start};
use futures_util::SinkExt;
use serde_json::{Value, json};

/// Reads frames until `count` chat messages arrived; returns them and any acks seen.
async fn messages(client: &mut Client, count: usize) -> (Vec<Value>, Vec<Value>) {
    let (mut msgs, mut acks) = (Vec::new(), Vec::new());
    while msgs.len() < count {
        let frame = client.recv().await;
        match frame["type"].as_str() {
            Some("message") => msgs.push(frame),
            Some("ack") => acks.push(frame),
            _ => panic!("unexpected frame {frame}"),
        }
    }
    (msgs, acks)
}

#[tokio::test]
async fn welcome_then_joined_with_names_rooms_and_online_counts() {
    let server = start(config()).await;
    let mut alice = Client::connect(&server.url("name=alice&room=lobby")).await;
    let welcome = alice.expect("welcome").await;
    assert_eq!(welcome["name"], "alice");
    assert_eq!(welcome["node"], "test-node");
    assert_eq!(welcome["rooms"], json!(["lobby"]));
    assert!(welcome["conn"].as_str().is_some_and(|c| !c.is_empty()));
    let joined = alice.expect("joined").await;
    assert!(joined["epoch"].as_str().is_some_and(|e| !e.is_empty()));
    assert_eq!(
        joined,
        json!({"type":"joined","room":"lobby","online":1,"epoch":joined["epoch"],
            "last_id":0,"history":0})
    );

    let mut guest = Client::connect(&server.url("room=lobby")).await;
    let welcome = guest.expect("welcome").await;
    assert!(welcome["name"].as_str().unwrap().starts_with("guest-"));
    assert_eq!(guest.expect("joined").await["online"], 2);

    let mut plain = server.client("").await;
    assert_eq!(plain.join("lobby").await["online"], 3);
}

#[tokio::test]
async fn two_rooms_many_members_one_order_and_consecutive_ids() {
    let server = start(config()).await;
    const MEMBERS: usize = 24;
    const PER_SENDER: usize = 40;
    let mut clients = Vec::new();
    for i in 0..MEMBERS {
        let mut c = server.client(&format!("name=user{i}")).await;
        if i % 2 == 0 {
            c.join("dev").await;
        }
        clients.push(c);
    }
    // Three senders, two of them in dev too, all sending at once.
    let mut senders: Vec<Client> = clients.drain(..3).collect();
    let sends = senders.iter_mut().enumerate().map(|(s, c)| async move {
        for n in 0..PER_SENDER {
            let room = if s != 1 && n % 2 == 1 {
                "dev"
            } else {
                "general"
            };
            c.say(room, &format!("s{s}-{n}"), &format!("r{s}-{n}"))
                .await;
        }
    });
    futures_util::future::join_all(sends).await;
    let in_dev = 2 * PER_SENDER / 2; // senders 0 and 2 send every other message to dev
    let in_general = 3 * PER_SENDER - in_dev;

    let mut general_seen: Option<Vec<Value>> = None;
    let mut dev_seen: Option<Vec<Value>> = None;
    for (i, c) in senders.iter_mut().chain(clients.iter_mut()).enumerate() {
        let member_of_dev = i % 2 == 0; // i is the order of connecting
        let expected = in_general + if member_of_dev { in_dev } else { 0 };
        let (msgs, _) = messages(c, expected).await;
        let general: Vec<Value> = msgs
            .iter()
            .filter(|m| m["room"] == "general")
            .cloned()
            .collect();
        let dev: Vec<Value> = msgs
            .iter()
            .filter(|m| m["room"] == "dev")
            .cloned()
            .collect();
        assert_eq!(general.len(), in_general);
        let ids: Vec<u64> = general.iter().map(|m| m["id"].as_u64().unwrap()).collect();
        assert_eq!(
            ids,
            (1..=in_general as u64).collect::<Vec<_>>(),
            "ids count up by one"
        );
        // Every member sees the very same sequence.
        match &general_seen {
            None => general_seen = Some(general),
            Some(seen) => assert_eq!(seen, &general),
        }
        if member_of_dev {
            assert_eq!(dev.len(), in_dev);
            match &dev_seen {
                None => dev_seen = Some(dev),
                Some(seen) => assert_eq!(seen, &dev),
            }
        } else {
            assert!(dev.is_empty(), "non-members get nothing from dev");
        }
    }
    // Each sender's own messages keep its sending order within a room.
    let general = general_seen.unwrap();
    let order: Vec<&str> = general
        .iter()
        .filter(|m| m["user"] == "user1")
        .map(|m| m["message"].as_str().unwrap())
        .collect();
    assert_eq!(
        order,
        (0..PER_SENDER)
            .map(|n| format!("s1-{n}"))
            .collect::<Vec<_>>()
    );
}

#[tokio::test]
async fn sender_gets_its_message_then_an_ack_with_ref_and_id() {
    let server = start(config()).await;
    let mut alice = server.client("name=alice").await;
    let mut bob = server.client("name=bob").await;
    alice.say("general", "hi bob", "c-1").await;
    let own = alice.expect("message").await;
    let ack = alice.expect("ack").await;
    assert_eq!(
        ack,
        json!({"type":"ack","ref":"c-1","room":"general","id":own["id"]})
    );
    let seen = bob.expect("message").await;
    assert_eq!(seen, own);
    assert_eq!(seen["user"], "alice");
    assert_eq!(seen["message"], "hi bob");
    assert!(seen["ts"].as_u64().unwrap() > 1_700_000_000_000);

    // `room` defaults to the first room; `ref` is optional.
    alice.send(json!({"type":"send","message":"again"})).await;
    assert_eq!(alice.expect("message").await["id"], 2);
    assert_eq!(
        alice.expect("ack").await,
        json!({"type":"ack","room":"general","id":2})
    );
    assert_eq!(bob.expect("message").await["message"], "again");
}

#[tokio::test]
async fn leave_stops_delivery_and_unknown_rooms_are_refused() {
    let server = start(config()).await;
    let mut alice = server.client("name=alice").await;
    let mut bob = server.client("name=bob").await;
    assert_eq!(bob.join("dev").await["online"], 1);
    assert_eq!(alice.join("dev").await["online"], 2);
    bob.send(json!({"type":"leave","room":"dev"})).await;
    assert_eq!(
        bob.expect("left").await,
        json!({"type":"left","room":"dev"})
    );
    bob.send(json!({"type":"leave","room":"dev"})).await;
    assert_eq!(bob.expect("error").await["code"], "not_joined");
    bob.say("dev", "sneaky", "b-1").await;
    let err = bob.expect("error").await;
    assert_eq!(
        (err["code"].as_str(), err["ref"].as_str()),
        (Some("not_joined"), Some("b-1"))
    );

    alice.say("dev", "only me", "a-1").await;
    assert_eq!(alice.expect("message").await["message"], "only me");
    alice.expect("ack").await;
    // Bob, no longer in dev, gets the next general message and nothing from dev.
    alice.say("general", "to all", "a-2").await;
    let next = bob.expect("message").await;
    assert_eq!(
        (next["room"].as_str(), next["message"].as_str()),
        (Some("general"), Some("to all"))
    );
}

#[tokio::test]
async fn bad_frames_get_error_codes_and_the_connection_stays_open() {
    let mut cfg = config();
    cfg.limits.max_message_chars = 10;
    let server = start(cfg).await;
    let mut c = server.client("").await;
    let cases: Vec<(String, &str)> = vec![
        ("not json".into(), "bad_json"),
        ("[1,2]".into(), "bad_json"),
        (r#"{"room":"general"}"#.into(), "bad_field"),
        (r#"{"type":"shout"}"#.into(), "unknown_type"),
        (r#"{"type":"send"}"#.into(), "bad_field"),
        (r#"{"type":"send","message":42}"#.into(), "bad_field"),
        (r#"{"type":"send","message":"   "}"#.into(), "empty_message"),
        (
            r#"{"type":"send","message":"01234567890"}"#.into(),
            "message_too_long",
        ),
        (
            r#"{"type":"send","message":"hi","room":"no spaces"}"#.into(),
            "bad_room",
        ),
        (r#"{"type":"join","room":""}"#.into(), "bad_room"),
        (
            format!(r#"{{"type":"join","room":"{}"}}"#, "r".repeat(65)),
            "bad_room",
        ),
        (r#"{"type":"join","room":7}"#.into(), "bad_field"),
        (
            r#"{"type":"leave","room":"never-joined"}"#.into(),
            "not_joined",
        ),
        (
            format!(
                r#"{{"type":"send","message":"x","ref":"{}"}}"#,
                "r".repeat(65)
            ),
            "bad_ref",
        ),
    ];
    for (frame, code) in &cases {
        c.ws.send(tokio_tungstenite::tungstenite::Message::text(frame.clone()))
            .await
            .unwrap();
        let err = c.expect("error").await;
        assert_eq!(err["code"], *code, "for {frame}: {err}");
        assert!(err["message"].as_str().is_some_and(|m| !m.is_empty()));
    }
    // The ref of a refused send is echoed, so the client knows which one failed.
    c.say("general", "", "c-7").await;
    assert_eq!(c.expect("error").await["ref"], "c-7");
    // Still open and working.
    c.say("general", "fine", "c-8").await;
    assert_eq!(c.expect("message").await["message"], "fine");
    assert_eq!(c.expect("ack").await["ref"], "c-8");
}

#[tokio::test]
async fn rooms_per_connection_are_capped() {
    let mut cfg = config();
    cfg.limits.max_rooms_per_connection = 2;
    let server = start(cfg).await;
    let mut c = server.client("").await;
    c.join("dev").await;
    c.join("dev").await; // joining again is harmless and takes no slot
    c.send(json!({"type":"join","room":"ops"})).await;
    assert_eq!(c.expect("error").await["code"], "too_many_rooms");
    c.send(json!({"type":"leave","room":"dev"})).await;
    c.expect("left").await;
    c.join("ops").await;
}

#[tokio::test]
async fn rate_limit_refuses_by_ref_and_delivers_nothing_refused() {
    let mut cfg = config();
    cfg.limits.messages_per_second = 0.01; // no refill within the test, however slow the machine
    cfg.limits.message_burst = 3;
    let server = start(cfg).await;
    let mut alice = server.client("name=alice").await;
    let mut bob = server.client("name=bob").await;
    for n in 0..5 {
        alice
            .say("general", &format!("m{n}"), &format!("r{n}"))
            .await;
    }
    let mut outcome = HashMap::new();
    while outcome.len() < 5 {
        let f = alice.recv().await;
        match f["type"].as_str().unwrap() {
            "ack" => outcome.insert(f["ref"].as_str().unwrap().to_owned(), "ack"),
            "error" => {
                assert_eq!(f["code"], "rate_limited");
                outcome.insert(f["ref"].as_str().unwrap().to_owned(), "refused")
            }
            _ => None,
        };
    }
    let expected: HashMap<String, &str> = (0..5)
        .map(|n| (format!("r{n}"), if n < 3 { "ack" } else { "refused" }))
        .collect();
    assert_eq!(outcome, expected);
    // Bob sees exactly the three accepted messages; the next one he sees is a later send.
    let (msgs, _) = messages(&mut bob, 3).await;
    let texts: Vec<&str> = msgs
        .iter()
        .map(|m| m["message"].as_str().unwrap())
        .collect();
    assert_eq!(texts, ["m0", "m1", "m2"]);
}
