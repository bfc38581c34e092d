//! Protocol violations, HTTP refusals, timeouts and slow consumers: each gets a clear answer
//! (a close code or an HTTP status) and never disturbs other clients.

mod common;

use std::sync::Arc;

use common::{Client, RawClient, WAIT, config, http_get, start};
use futures_util::{SinkExt, StreamExt};
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio_tungstenite::tungstenite::Message;

const TEXT: u8 = 0x1;
const BINARY: u8 = 0x2;
const CONTINUATION: u8 = 0x0;
const PING: u8 = 0x9;

/// A raw client past its `welcome` and `joined` frames.
async fn raw(addr: std::net::SocketAddr) -> RawClient {
    let mut c = RawClient::connect(addr, "/ws").await;
    for _ in 0..2 {
        let (opcode, _) = c.recv_frame().await.expect("greeting");
        assert_eq!(opcode, TEXT);
    }
    c
}

#[tokio::test]
async fn binary_frames_are_closed_with_1003() {
    let server = start(config()).await;
    let mut c = raw(server.addr).await;
    c.send_frame(true, BINARY, b"\x00\x01").await;
    assert_eq!(c.close_code().await, 1003);
}

#[tokio::test]
async fn invalid_utf8_is_closed_with_1007_whole_or_fragmented() {
    let server = start(config()).await;
    let mut c = raw(server.addr).await;
    c.send_frame(true, TEXT, b"{\"type\":\"send\",\"message\":\"\xff\"}")
        .await;
    assert_eq!(c.close_code().await, 1007);

    let mut c = raw(server.addr).await;
    c.send_frame(false, TEXT, b"{\"type\":\"send\",\"message\":\"\xC3")
        .await;
    c.send_frame(true, CONTINUATION, b"\"}").await;
    assert_eq!(c.close_code().await, 1007);
}

#[tokio::test]
async fn oversized_frames_and_fragmented_totals_are_closed_with_1009() {
    let mut cfg = config();
    cfg.limits.max_frame_bytes = 1024;
    cfg.limits.max_message_chars = 100;
    let server = start(cfg).await;
    let mut c = raw(server.addr).await;
    c.send_frame(true, TEXT, &[b' '; 1025]).await;
    assert_eq!(c.close_code().await, 1009);

    // Each fragment is small; together they pass the cap.
    let mut c = raw(server.addr).await;
    c.send_frame(false, TEXT, &[b' '; 600]).await;
    c.send_frame(false, CONTINUATION, &[b' '; 300]).await;
    c.send_frame(true, CONTINUATION, &[b' '; 300]).await;
    assert_eq!(c.close_code().await, 1009);

    // Exactly at the cap is fine.
    let mut c = raw(server.addr).await;
    let mut frame = br#"{"type":"send","message":"hi","ref":"edge"}"#.to_vec();
    frame.resize(1024, b' ');
    c.send_frame(true, TEXT, &frame).await;
    let mut saw_ack = false;
    while let Some((_, payload)) = c.recv_frame().await {
        let v: serde_json::Value = serde_json::from_slice(&payload).unwrap();
        if v["type"] == "ack" {
            saw_ack = true;
            break;
        }
    }
    assert!(saw_ack);
}

/// A client that joins a room with history and sends a 4 MiB frame at once, reading nothing
/// until it is sent, gets the 1009. The history (50 long messages) fills the client's receive
/// window, so the close frame waits in the node's send queue while the rest of the frame is
/// still arriving: the node must not reset the connection then, or the close frame is lost.
/// Twenty such clients at once; every one must see the code.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oversized_frame_into_a_room_with_history_is_always_closed_with_1009() {
    let server = start(config()).await;
    let mut author = server.client("").await;
    let long = "x".repeat(config().limits.max_message_chars);
    author.say_repeated_acked(&long, 50).await;
    let frame = Arc::new(common::encode_frame(true, TEXT, &vec![b' '; 4 << 20]));
    let runs = (0..20).map(|_| {
        let frame = frame.clone();
        async move {
            let mut c = RawClient::connect(server.addr, "/ws").await;
            c.close_code_after_sending(&frame).await
        }
    });
    let codes = tokio::time::timeout(WAIT, futures_util::future::join_all(runs))
        .await
        .expect("every client closed in time");
    assert!(codes.iter().all(|c| *c == Some(1009)), "{codes:?}");
}

#[tokio::test]
async fn fragmented_messages_are_assembled_and_pings_answered() {
    let server = start(config()).await;
    let mut c = raw(server.addr).await;
    c.send_frame(false, TEXT, br#"{"type":"send","#).await;
    c.send_frame(false, CONTINUATION, br#""message":"in three ","#)
        .await;
    c.send_frame(true, PING, b"between").await; // control frames may interleave
    c.send_frame(true, CONTINUATION, br#""ref":"f-1"}"#).await;
    let (opcode, payload) = c.recv_frame().await.unwrap();
    assert_eq!(
        (opcode, &payload[..]),
        (0xA, &b"between"[..]),
        "pong echoes the ping"
    );
    let (_, payload) = c.recv_frame().await.unwrap();
    let msg: serde_json::Value = serde_json::from_slice(&payload).unwrap();
    assert_eq!(msg["message"], "in three ");
}

#[tokio::test]
async fn protocol_errors_are_closed_with_1002() {
    let server = start(config()).await;
    let mut c = raw(server.addr).await;
    c.send_frame(true, CONTINUATION, b"orphan").await;
    assert_eq!(c.close_code().await, 1002);

    let mut c = raw(server.addr).await;
    c.stream.write_all(&[0xC1, 0x80, 0, 0, 0, 0]).await.unwrap(); // RSV1 set, no extension
    assert_eq!(c.close_code().await, 1002);
}

#[tokio::test]
async fn unmasked_and_oversized_control_frames_are_closed_with_1002() {
    let server = start(config()).await;
    let mut c = raw(server.addr).await;
    c.stream.write_all(&[0x81, 0x02, b'h', b'i']).await.unwrap();
    assert_eq!(c.close_code().await, 1002);

    let mut c = raw(server.addr).await;
    c.send_frame(true, PING, &[b'p'; 126]).await;
    assert_eq!(c.close_code().await, 1002);
}

#[tokio::test]
async fn a_frame_sent_with_the_handshake_is_read() {
    let server = start(config()).await;
    let mut stream = TcpStream::connect(server.addr).await.unwrap();
    // The request and a ping in one write: the server reads both at once.
    let mut bytes = b"GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
        Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
        .to_vec();
    bytes.extend_from_slice(&common::encode_frame(true, PING, b"early"));
    stream.write_all(&bytes).await.unwrap();
    let pong = [0x8A, 5, b'e', b'a', b'r', b'l', b'y'];
    let mut received = Vec::new();
    while !received.windows(pong.len()).any(|w| w == pong) {
        let mut chunk = [0u8; 4096];
        let n = tokio::time::timeout(WAIT, stream.read(&mut chunk))
            .await
            .expect("the pong in time")
            .unwrap();
        assert!(n > 0, "server closed before answering the ping");
        received.extend_from_slice(&chunk[..n]);
    }
    assert!(received.starts_with(b"HTTP/1.1 101"));
}

#[tokio::test]
async fn client_close_is_echoed() {
    let server = start(config()).await;
    let mut c = raw(server.addr).await;
    c.send_frame(true, 0x8, &[0x03, 0xE8, b'b', b'y', b'e'])
        .await;
    assert_eq!(c.close_code().await, 1000);
    assert!(
        c.recv_frame().await.is_none(),
        "then the server closes the TCP stream"
    );
}

#[tokio::test]
async fn http_refusals_come_before_the_upgrade() {
    let mut cfg = config();
    cfg.server.allowed_origins = vec!["https://chat.example.com".into()];
    cfg.server.max_connections = 2;
    let server = start(cfg).await;
    let upgrade = [
        ("Upgrade", "websocket"),
        ("Connection", "Upgrade"),
        ("Sec-WebSocket-Key", "dGhlIHNhbXBsZSBub25jZQ=="),
        ("Sec-WebSocket-Version", "13"),
    ];
    let with = |extra: &[(&'static str, &'static str)]| {
        let mut h = upgrade.to_vec();
        h.extend_from_slice(extra);
        h
    };
    assert_eq!(http_get(server.addr, "/ws", &[]).await.0, 426);
    let (status, text) = http_get(
        server.addr,
        "/ws",
        &with(&[("Origin", "https://evil.example")]),
    )
    .await;
    assert_eq!(status, 403, "{text}");
    let (status, text) = http_get(server.addr, "/ws?room=no%20spaces", &upgrade).await;
    assert_eq!(status, 400, "{text}");
    assert!(text.contains("room"));
    assert_eq!(http_get(server.addr, "/ws?name=%20", &upgrade).await.0, 400);
    assert_eq!(http_get(server.addr, "/nope", &[]).await.0, 404);
    assert_eq!(http_get(server.addr, "/healthz", &[]).await.0, 200);
    assert_eq!(http_get(server.addr, "/readyz", &[]).await.0, 200);

    // The allowed origin upgrades; so does a client without Origin (not a browser).
    let _a = RawClient::connect(server.addr, "/ws").await;
    let mut b = TcpStream::connect(server.addr).await.unwrap();
    let req = "GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\
         Origin: https://chat.example.com\r\n\r\n";
    b.write_all(req.as_bytes()).await.unwrap();
    let mut head = [0u8; 12];
    b.read_exact(&mut head).await.unwrap();
    assert_eq!(&head, b"HTTP/1.1 101");
    // Two connections open: the third is refused.
    let (status, text) = http_get(server.addr, "/ws", &upgrade).await;
    assert_eq!(status, 503, "{text}");
    assert!(text.contains("Retry-After") || text.contains("retry-after"));
}

#[tokio::test]
async fn a_peer_that_ignores_pings_is_closed_with_4002() {
    let mut cfg = config();
    cfg.limits.ping_interval_secs = 1;
    cfg.limits.ping_timeout_secs = 1;
    let server = start(cfg).await;
    let mut silent = raw(server.addr).await;
    let (opcode, _) = silent.recv_frame().await.unwrap();
    assert_eq!(opcode, PING);
    assert_eq!(silent.close_code().await, 4002);

    // A client that answers (tungstenite pongs automatically) stays: three pings later it
    // still chats.
    let mut lively = server.client("").await;
    let mut pings = 0;
    while pings < 3 {
        match tokio::time::timeout(WAIT, lively.ws.next())
            .await
            .unwrap()
            .unwrap()
            .unwrap()
        {
            Message::Ping(_) => pings += 1,
            other => panic!("unexpected {other:?}"),
        }
    }
    lively.say("general", "still here", "p-1").await;
    assert_eq!(lively.expect("message").await["message"], "still here");
}

#[tokio::test]
async fn slow_http_clients_are_cut_off() {
    let mut cfg = config();
    cfg.server.header_read_timeout_secs = 1;
    let server = start(cfg).await;
    let mut slow = TcpStream::connect(server.addr).await.unwrap();
    slow.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
        .await
        .unwrap();
    let mut buf = Vec::new();
    let read = tokio::time::timeout(WAIT, slow.read_to_end(&mut buf)).await;
    assert!(read.is_ok(), "the server closed the connection");
    assert!(!String::from_utf8_lossy(&buf).contains("200 OK"));
}

#[tokio::test]
async fn a_reader_that_stops_is_closed_as_slow_and_others_get_everything() {
    let mut cfg = config();
    cfg.limits.max_queued_frames = 64;
    cfg.limits.ping_timeout_secs = 60; // long enough for the slow reader to resume
    let server = start(cfg).await;

    // A tiny receive buffer so the socket fills up after a few frames.
    let socket = TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let stream = socket.connect(server.addr).await.unwrap();
    let stream = tokio_tungstenite::MaybeTlsStream::Plain(stream);
    let (ws, _) = tokio_tungstenite::client_async(server.url("name=slow"), stream)
        .await
        .unwrap();
    let mut slow = Client {
        ws,
        name: "slow".into(),
    };
    slow.expect("welcome").await;
    slow.expect("joined").await;
    let mut fast = server.client("name=fast").await;
    let sender = server.client("name=sender").await;
    let (mut tx, mut rx) = sender.ws.split();
    // The sender reads its own copies and acks, as a live client does.
    let sender_acks = tokio::spawn(async move {
        let mut acks = 0;
        while let Some(Ok(msg)) = rx.next().await {
            if msg.to_text().unwrap_or("").contains(r#""type":"ack""#) {
                acks += 1;
            }
        }
        acks
    });

    // The slow client stops reading while 2,000 messages of 2 KiB go out.
    const COUNT: u64 = 2000;
    let text = "x".repeat(2000);
    let send = async {
        for n in 0..COUNT {
            let frame = json!({"type":"send","message":text,"ref":format!("r{n}")});
            tx.send(Message::text(frame.to_string())).await.unwrap();
        }
    };
    let receive = async {
        let mut last = 0;
        while last < COUNT {
            let m = fast.recv().await;
            assert_eq!(m["type"], "message");
            assert_eq!(m["id"].as_u64().unwrap(), last + 1, "in order, none lost");
            last += 1;
        }
    };
    tokio::join!(send, receive);
    // The slow client now reads: what was already in flight, then close 4001.
    let (code, reason, before) = slow.closed().await;
    assert_eq!(code, 4001, "{reason}");
    assert!(
        (before.len() as u64) < COUNT,
        "got {} of {COUNT}",
        before.len()
    );
    let node = server.node.clone();
    common::eventually("the slow client leaves the room", || {
        node.hub.members("general") == 2
    })
    .await;
    // The others were not disturbed.
    let frame = json!({"type":"send","message":"after","ref":"last"});
    tx.send(Message::text(frame.to_string())).await.unwrap();
    assert_eq!(fast.expect("message").await["message"], "after");
    server.shutdown(); // the sender's stream ends with the server's close
    let acks = tokio::time::timeout(WAIT, sender_acks)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(acks, COUNT + 1, "every send was acked");
    drop(tx);
}

#[tokio::test]
async fn the_echo_endpoint_is_off_by_default_and_echoes_text_and_binary_when_on() {
    let server = start(config()).await;
    let (status, _) = common::http_get(server.addr, "/echo", &[]).await;
    assert_eq!(status, 404, "off unless server.echo_path is set");

    let mut cfg = config();
    cfg.server.echo_path = "/echo".into();
    cfg.limits.max_frame_bytes = 1024;
    let server = start(cfg).await;
    let mut echo = RawClient::connect(server.addr, "/echo").await;
    echo.send_frame(true, 0x1, "héllo".as_bytes()).await;
    assert_eq!(
        echo.recv_frame().await,
        Some((0x1, "héllo".as_bytes().to_vec()))
    );
    // Fragmented binary comes back whole.
    echo.send_frame(false, 0x2, &[1, 2]).await;
    echo.send_frame(true, 0x0, &[3]).await;
    assert_eq!(echo.recv_frame().await, Some((0x2, vec![1, 2, 3])));
    // The same limits as chat.
    echo.send_frame(true, 0x2, &[0; 2000]).await;
    assert_eq!(echo.close_code().await, 1009);
}

/// Sends `message` to `room` and reads until its `ack`, skipping the chat messages meanwhile.
async fn say_acked(client: &mut Client, room: &str, message: &str, reference: &str) {
    client.say(room, message, reference).await;
    loop {
        let frame = client.recv().await;
        match frame["type"].as_str() {
            Some("ack") => break assert_eq!(frame["ref"], reference, "{frame}"),
            Some("message") => {}
            _ => panic!("expected an ack, got {frame}"),
        }
    }
}

#[tokio::test]
async fn join_leave_and_history_share_one_rate_and_a_loop_is_refused() {
    let mut cfg = config();
    cfg.limits.requests_per_second = 0.01;
    cfg.limits.request_burst = 4;
    let server = start(cfg).await;
    // The first room, joined by the upgrade itself, takes nothing.
    let mut client = server.client("name=looper").await;
    client.join("a").await;
    client
        .send(json!({"type":"history","room":"a","limit":10}))
        .await;
    client.expect("history").await;
    client.send(json!({"type":"leave","room":"a"})).await;
    client.expect("left").await;
    client.join("b").await;
    for request in [
        json!({"type":"history","room":"b"}),
        json!({"type":"join","room":"c"}),
        json!({"type":"leave","room":"b"}),
    ] {
        client.send(request).await;
        let refused = client.expect("error").await;
        assert_eq!(refused["code"], "rate_limited", "{refused}");
    }
    // Sending has a rate of its own.
    say_acked(&mut client, "b", "still here", "r1").await;

    // A reload applies to open connections at their next request.
    let mut live = server.node.live().as_ref().clone();
    live.limits.requests_per_second = 1_000_000.0;
    live.limits.request_burst = 100;
    server.node.reconfigure(live);
    client.send(json!({"type":"leave","room":"b"})).await;
    client.expect("left").await;
}

#[tokio::test]
async fn a_history_page_is_cut_to_half_the_queue_and_pages_on() {
    let mut cfg = config();
    cfg.limits.max_queued_bytes = 64 * 1024;
    cfg.rooms.history_on_join = 0;
    let server = start(cfg).await;
    let mut client = server.client("name=reader").await;
    // Control characters JSON-escape to 6 bytes each: one message is about 6 KB.
    let text = "\u{1}".repeat(1000);
    let mut writer = server.client("name=writer").await;
    for n in 0..20 {
        say_acked(&mut writer, "general", &text, &format!("r{n}")).await;
        assert_eq!(client.expect_chat().await["id"], n + 1);
    }
    let mut ids = Vec::new();
    let mut before = None;
    loop {
        let mut request = json!({"type":"history","room":"general","limit":100});
        if let Some(before) = before {
            request["before"] = json!(before);
        }
        client.send(request).await;
        let page = client.expect("history").await;
        let messages = page["messages"].as_array().unwrap();
        assert!(
            page.to_string().len() <= 32 * 1024,
            "a page of {} bytes",
            page.to_string().len()
        );
        assert!(!messages.is_empty());
        let mut page_ids = common::ids(messages);
        before = Some(page_ids[0]);
        page_ids.extend(ids);
        ids = page_ids;
        if page["more"] == false {
            break;
        }
    }
    assert_eq!(
        ids,
        (1..=20).collect::<Vec<u64>>(),
        "every message, once, in order"
    );
}
