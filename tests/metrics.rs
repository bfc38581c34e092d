//! `/metrics` as a Prometheus scraper sees it: the values follow what clients did.

mod common;

use std::collections::HashMap;
use std::net::SocketAddr;

use common::{Client, config, eventually_async, http_get, start};
use futures_util::SinkExt;
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;

const UPGRADE: [(&str, &str); 4] = [
    ("Upgrade", "websocket"),
    ("Connection", "Upgrade"),
    ("Sec-WebSocket-Key", "dGhlIHNhbXBsZSBub25jZQ=="),
    ("Sec-WebSocket-Version", "13"),
];

/// Scrapes `/metrics`: every sample by its series (name and labels as written).
async fn scrape(addr: SocketAddr) -> HashMap<String, f64> {
    let (status, response) = http_get(addr, "/metrics", &[]).await;
    assert_eq!(status, 200, "{response}");
    let (head, body) = response.split_once("\r\n\r\n").expect("headers end");
    assert!(
        head.to_ascii_lowercase()
            .contains("content-type: text/plain; version=0.0.4; charset=utf-8"),
        "{head}"
    );
    body.lines()
        .filter(|line| !line.starts_with('#') && !line.is_empty())
        .map(|line| {
            let (series, value) = line.rsplit_once(' ').expect("series and value");
            (series.to_owned(), value.parse().expect("a number"))
        })
        .collect()
}

fn get(samples: &HashMap<String, f64>, series: &str) -> f64 {
    *samples
        .get(series)
        .unwrap_or_else(|| panic!("no {series} in {samples:?}"))
}

/// Reads until the ack arrives, returning the chat messages seen before it.
async fn until_ack(client: &mut Client) -> Vec<Value> {
    let mut seen = Vec::new();
    loop {
        let frame = client.recv().await;
        match frame["type"].as_str() {
            Some("ack") => return seen,
            Some("message") => seen.push(frame),
            _ => panic!("unexpected frame {frame}"),
        }
    }
}

#[tokio::test]
async fn metrics_follow_connections_messages_and_errors() {
    let mut cfg = config();
    cfg.server.allowed_origins = vec!["https://chat.example.com".into()];
    cfg.server.max_connections = 3;
    let server = start(cfg).await;

    let before = scrape(server.addr).await;
    assert_eq!(get(&before, "scalechat_connections"), 0.0);
    assert_eq!(get(&before, "scalechat_backplane_up"), 1.0);
    assert_eq!(
        get(&before, "scalechat_errors_total{code=\"bad_json\"}"),
        0.0
    );

    let mut alice = server.client("name=alice").await;
    let mut bob = server.client("name=bob").await;
    let mut carol = server.client("name=carol&room=dev").await;

    // Refusals: no upgrade headers, a foreign origin, and a fourth connection.
    assert_eq!(http_get(server.addr, "/ws", &[]).await.0, 426);
    let mut foreign = UPGRADE.to_vec();
    foreign.push(("Origin", "https://evil.example"));
    assert_eq!(http_get(server.addr, "/ws", &foreign).await.0, 403);
    assert_eq!(http_get(server.addr, "/ws", &UPGRADE).await.0, 503);

    // Two members get alice's message; carol alone gets hers.
    alice.say("general", "hello", "a1").await;
    assert_eq!(until_ack(&mut alice).await.len(), 1);
    assert_eq!(bob.expect("message").await["message"], "hello");
    carol.say("dev", "anyone?", "c1").await;
    assert_eq!(until_ack(&mut carol).await.len(), 1);
    // A frame that is not JSON.
    bob.ws.send(Message::text("not json")).await.unwrap();
    assert_eq!(bob.expect("error").await["code"], "bad_json");

    let m = scrape(server.addr).await;
    assert_eq!(get(&m, "scalechat_connections"), 3.0);
    assert_eq!(get(&m, "scalechat_connections_total"), 3.0);
    let refused = |reason: &str| {
        get(
            &m,
            &format!("scalechat_connections_refused_total{{reason=\"{reason}\"}}"),
        )
    };
    assert_eq!(refused("bad_request"), 1.0);
    assert_eq!(refused("origin"), 1.0);
    assert_eq!(refused("capacity"), 1.0);
    assert_eq!(refused("shutting_down"), 0.0);
    assert_eq!(get(&m, "scalechat_rooms"), 2.0);
    assert_eq!(get(&m, "scalechat_messages_in_total"), 2.0);
    assert_eq!(get(&m, "scalechat_messages_out_total"), 3.0);
    assert!(get(&m, "scalechat_bytes_out_total") > 0.0);
    assert_eq!(get(&m, "scalechat_errors_total{code=\"bad_json\"}"), 1.0);
    assert_eq!(
        get(&m, "scalechat_errors_total{code=\"rate_limited\"}"),
        0.0
    );
    assert_eq!(get(&m, "scalechat_slow_consumer_disconnects_total"), 0.0);
    assert_eq!(get(&m, "scalechat_publish_errors_total"), 0.0);
    assert_eq!(get(&m, "scalechat_backplane_reconnects_total"), 0.0);
    assert_eq!(get(&m, "scalechat_publish_seconds_count"), 2.0);
    assert_eq!(
        get(&m, "scalechat_publish_seconds_bucket{le=\"+Inf\"}"),
        2.0
    );

    // A binary frame closes carol's connection with 1003; her room empties.
    carol.ws.send(Message::binary(vec![1, 2, 3])).await.unwrap();
    assert_eq!(carol.closed().await.0, 1003);
    drop(carol);
    eventually_async("carol's session counted closed", || async {
        let m = scrape(server.addr).await;
        get(&m, "scalechat_connections") == 2.0 && get(&m, "scalechat_rooms") == 1.0
    })
    .await;
    let m = scrape(server.addr).await;
    assert_eq!(get(&m, "scalechat_close_codes_total{code=\"1003\"}"), 1.0);
    assert_eq!(get(&m, "scalechat_close_codes_total{code=\"4001\"}"), 0.0);
}

#[tokio::test]
async fn metrics_answers_get_only() {
    let server = start(config()).await;
    let mut stream = TcpStream::connect(server.addr).await.unwrap();
    stream
        .write_all(
            b"POST /metrics HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
        )
        .await
        .unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).await.unwrap();
    assert!(response.starts_with("HTTP/1.1 405"), "{response}");
    assert!(
        response.to_ascii_lowercase().contains("allow: get"),
        "{response}"
    );
}

#[tokio::test]
async fn metrics_can_be_switched_off() {
    let mut cfg = config();
    cfg.server.metrics_listen = "off".into();
    let server = start(cfg).await;
    let (status, response) = http_get(server.addr, "/metrics", &[]).await;
    assert_eq!(status, 404, "{response}");
    assert!(!response.contains("scalechat_connections"), "{response}");
    assert_eq!(http_get(server.addr, "/healthz", &[]).await.0, 200);
    server.stop().await;
}

#[tokio::test]
async fn metrics_on_their_own_listener_are_not_on_the_main_port() {
    let mut cfg = config();
    cfg.server.metrics_listen = "127.0.0.1:0".into();
    let shutdown = tokio_util::sync::CancellationToken::new();
    let server = scalechat::server::Server::bind(cfg, shutdown.clone())
        .await
        .expect("bind");
    let main = server.local_addr().unwrap();
    let metrics = server.metrics_addr().expect("a metrics listener");
    assert_ne!(main, metrics);
    let task = tokio::spawn(server.run());

    let mut alice = Client::connect(&format!("ws://{main}/ws?name=alice")).await;
    alice.expect("welcome").await;
    assert_eq!(get(&scrape(metrics).await, "scalechat_connections"), 1.0);
    let (status, response) = http_get(main, "/metrics", &[]).await;
    assert_eq!(status, 404, "{response}");
    // The metrics listener serves nothing else.
    for path in ["/healthz", "/ws", "/"] {
        assert_eq!(http_get(metrics, path, &[]).await.0, 404, "{path}");
    }

    shutdown.cancel();
    tokio::time::timeout(common::WAIT, task)
        .await
        .expect("server stops in time")
        .unwrap();
}
