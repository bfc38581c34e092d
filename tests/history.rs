//! History, recovery, paging and duplicate suppression on one node (the embedded transport).
//! The same guarantees across nodes through Redis are tested in tests/redis.rs.

mod common;

use common::{Client, TestServer, config, consecutive_until, ids, start};
use serde_json::{Value, json};

/// Connects with `query` and returns the client, its `joined` and the history that follows.
async fn connect(server: &TestServer, query: &str) -> (Client, Value, Vec<Value>) {
    let mut client = Client::connect(&server.url(query)).await;
    client.expect("welcome").await;
    let (joined, history) = client.joined().await;
    (client, joined, history)
}

#[tokio::test]
async fn joining_sends_the_history_then_live_messages_without_a_gap() {
    let server = start(config()).await;
    let (mut ann, ..) = connect(&server, "name=ann").await;
    ann.say_acked("m", 5).await;

    let (mut bob, joined, history) = connect(&server, "name=bob").await;
    assert_eq!(
        (joined["last_id"].as_u64(), joined["history"].as_u64()),
        (Some(5), Some(5))
    );
    assert_eq!(ids(&history), [1, 2, 3, 4, 5]);
    assert_eq!(history[0]["message"], "m0");
    assert_eq!(history[0]["epoch"], joined["epoch"]);
    assert!(
        joined.get("recovered").is_none(),
        "no since, no recovery claim"
    );
    ann.say("general", "live", "l").await;
    let live = bob.expect("message").await;
    assert_eq!(
        (live["id"].as_u64(), live["message"].as_str()),
        (Some(6), Some("live"))
    );
}

#[tokio::test]
async fn history_on_join_sends_only_the_newest_and_the_store_keeps_history_size() {
    let mut cfg = config();
    cfg.rooms.history_size = 10;
    cfg.rooms.history_on_join = 3;
    let server = start(cfg).await;
    let (mut ann, ..) = connect(&server, "name=ann").await;
    ann.say_acked("m", 12).await;
    let (mut bob, _, history) = connect(&server, "name=bob").await;
    assert_eq!(ids(&history), [10, 11, 12]);
    // Scroll back: the store holds the newest 10 (ids 3 to 12).
    bob.send(json!({"type":"history","room":"general","before":10,"limit":4}))
        .await;
    let page = bob.expect("history").await;
    assert_eq!(ids(page["messages"].as_array().unwrap()), [6, 7, 8, 9]);
    assert_eq!(page["more"], true);
    assert_eq!(page["epoch"], history[0]["epoch"]);
    bob.send(json!({"type":"history","room":"general","before":6,"limit":100}))
        .await;
    let page = bob.expect("history").await;
    assert_eq!(ids(page["messages"].as_array().unwrap()), [3, 4, 5]);
    assert_eq!(page["more"], false);
    // Only members may page, and limits are checked.
    bob.send(json!({"type":"history","room":"elsewhere"})).await;
    assert_eq!(bob.expect("error").await["code"], "not_joined");
    bob.send(json!({"type":"history","room":"general","limit":0}))
        .await;
    assert_eq!(bob.expect("error").await["code"], "bad_field");
}

#[tokio::test]
async fn reconnecting_with_since_gets_exactly_the_missed_messages_then_live_ones() {
    let server = start(config()).await;
    let (mut ann, ..) = connect(&server, "name=ann").await;
    let (mut bob, joined, _) = connect(&server, "name=bob").await;
    let epoch = joined["epoch"].as_str().unwrap().to_owned();
    ann.say_acked("a", 3).await;
    let seen = ids(&[
        bob.expect("message").await,
        bob.expect("message").await,
        bob.expect("message").await,
    ]);
    assert_eq!(seen, [1, 2, 3]);
    drop(bob);
    ann.say_acked("b", 4).await;

    let query = format!("name=bob&since=3&epoch={epoch}");
    let (mut bob, joined, missed) = connect(&server, &query).await;
    assert_eq!(joined["recovered"], true, "{joined}");
    assert_eq!(ids(&missed), [4, 5, 6, 7]);
    ann.say("general", "live", "l").await;
    assert_eq!(bob.expect("message").await["id"], 8);

    // The same on a `join`, for a second room, with nothing missed.
    let dev = bob.join("dev").await;
    let dev_epoch = dev["epoch"].as_str().unwrap().to_owned();
    bob.send(json!({"type":"leave","room":"dev"})).await;
    bob.expect("left").await;
    bob.send(json!({"type":"join","room":"dev","since":0,"epoch":dev_epoch}))
        .await;
    let (rejoined, missed) = bob.joined().await;
    assert_eq!(
        (rejoined["recovered"].as_bool(), missed.len()),
        (Some(true), 0)
    );
}

#[tokio::test]
async fn a_position_the_history_cannot_serve_is_reported_not_recovered() {
    let mut cfg = config();
    cfg.rooms.history_size = 5;
    cfg.rooms.history_on_join = 2;
    let server = start(cfg).await;
    let (mut ann, joined, _) = connect(&server, "name=ann").await;
    let epoch = joined["epoch"].as_str().unwrap().to_owned();
    ann.say_acked("m", 20).await;
    for (query, why, expected) in [
        (
            format!("since=1&epoch={epoch}"),
            "trimmed past",
            vec![16, 17, 18, 19, 20],
        ),
        (
            "since=19&epoch=0123abcd".to_owned(),
            "another epoch",
            vec![19, 20],
        ),
        (
            format!("since=99&epoch={epoch}"),
            "ahead of the room",
            vec![19, 20],
        ),
    ] {
        let (_, joined, history) = connect(&server, &query).await;
        assert_eq!(joined["recovered"], false, "{why}: {joined}");
        // What is left after `since` in the same epoch, else the newest.
        assert_eq!(ids(&history), expected, "{why}");
    }
    // A since without its epoch is refused at the upgrade.
    match tokio_tungstenite::connect_async(server.url("since=3")).await {
        Err(tokio_tungstenite::tungstenite::Error::Http(response)) => {
            let body = String::from_utf8_lossy(response.body().as_deref().unwrap_or_default());
            assert_eq!(response.status(), 400, "{body}");
            assert!(body.contains("epoch"), "{body}");
        }
        other => panic!("expected HTTP 400, got {other:?}"),
    }
}

#[tokio::test]
async fn a_resent_ref_is_acked_again_and_delivered_once() {
    let server = start(config()).await;
    let (mut ann, ..) = connect(&server, "name=ann").await;
    let (mut bob, ..) = connect(&server, "name=bob").await;
    ann.say("general", "hello", "ref-1").await;
    ann.expect("message").await;
    let first = ann.expect("ack").await;
    assert!(first.get("duplicate").is_none());
    ann.say("general", "hello", "ref-1").await;
    let again = ann.expect("ack").await;
    assert_eq!(
        (again["id"].clone(), again["duplicate"].clone()),
        (first["id"].clone(), json!(true))
    );
    // Another user's ref of the same text is their own message.
    bob.say("general", "hello", "ref-1").await;
    assert_eq!(bob.expect("message").await["id"], 1);
    let own = bob.expect("message").await;
    assert_eq!(
        (own["user"].as_str(), own["id"].as_u64()),
        (Some("bob"), Some(2))
    );
    assert_eq!(bob.expect("ack").await["id"], 2);
    // Bob saw message 1 once: the next one is 2.
    ann.say("general", "next", "ref-2").await;
    assert_eq!(bob.expect("message").await["id"], 3);
}

#[tokio::test]
async fn joining_while_messages_flow_loses_and_repeats_nothing() {
    let server = start(config()).await;
    let (mut ann, ..) = connect(&server, "name=ann").await;
    const TOTAL: u64 = 3000;
    let (progress, mut at) = tokio::sync::mpsc::unbounded_channel();
    let flood = tokio::spawn(async move {
        for n in 0..TOTAL {
            ann.say("general", &format!("m{n}"), &format!("r{n}")).await;
            if n % 400 == 0 {
                let _ = progress.send(n);
                tokio::task::yield_now().await;
            }
        }
        ann
    });
    // Joiners arrive while the flood runs; each must see consecutive ids from its first
    // history message to the end, exactly once.
    let mut joiners = Vec::new();
    while at.recv().await.is_some() {
        joiners.push(connect(&server, &format!("name=j{}", joiners.len())).await);
    }
    let _ann = flood.await.unwrap();
    let joined_at: Vec<u64> = joiners
        .iter()
        .map(|j| j.1["last_id"].as_u64().unwrap())
        .collect();
    println!("joined at ids {joined_at:?} of {TOTAL}");
    for (mut client, joined, history) in joiners {
        consecutive_until(&mut client, &joined, &history, TOTAL).await;
    }
}
