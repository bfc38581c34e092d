//! The hub's tests: joins, leaves, shared delivery, slow members, presence.

use super::*;

fn room(name: &str) -> RoomName {
    RoomName::new(name).unwrap()
}

fn reply(online: usize) -> Bytes {
    Bytes::from(online.to_string())
}

/// Joins `conn` to `room` as user `u<conn>` and queues `reply(online)` before any frame of
/// the room, as a join with no history does.
fn join_as(
    hub: &Hub,
    codec: Codec,
    room: &RoomName,
    conn: ConnId,
    outbox: &Arc<Outbox>,
    reply: impl FnOnce(usize) -> Bytes,
) -> Membership {
    let joiner = Joiner {
        conn,
        outbox: outbox.clone(),
        user: format!("u{}", conn.0).into(),
        codec,
        presence: false,
    };
    let staging = Arc::new(Staging::like(outbox));
    let membership = hub.join_staged(room, &joiner, &staging);
    hub.promote(room.as_str(), conn, |staged| {
        outbox.push(reply(membership.online)).unwrap();
        assert!(staged.unwrap().is_empty());
    });
    membership
}

fn message(room: &str, text: &str) -> Arc<Message> {
    let draft = crate::protocol::message::Draft::new(
        RoomName::new(room).unwrap(),
        "ann".into(),
        1,
        text.into(),
    );
    Arc::new(draft.accept(1, "e".into()))
}

fn drain(outbox: &Outbox) -> VecDeque<Bytes> {
    let mut batch = VecDeque::new();
    outbox.take(&mut batch);
    batch
}

#[test]
fn join_and_leave_report_first_and_last_members_and_counts() {
    let hub = Hub::default();
    let a = Arc::new(Outbox::new(8, 1 << 20));
    let b = Arc::new(Outbox::new(8, 1 << 20));
    let general = room("general");
    assert_eq!(
        join_as(&hub, Codec::Native, &general, ConnId(1), &a, reply),
        Membership {
            online: 1,
            first_or_last: true,
            user_first_or_last: true,
        }
    );
    assert_eq!(
        join_as(&hub, Codec::Native, &general, ConnId(2), &b, reply),
        Membership {
            online: 2,
            first_or_last: false,
            user_first_or_last: true,
        }
    );
    assert_eq!(
        join_as(&hub, Codec::Native, &general, ConnId(2), &b, reply).online,
        2
    );
    assert_eq!(hub.leave("general", ConnId(3)), None);
    assert_eq!(
        hub.leave("general", ConnId(1)),
        Some(Membership {
            online: 1,
            first_or_last: false,
            user_first_or_last: true,
        })
    );
    assert_eq!(
        hub.leave("general", ConnId(2)),
        Some(Membership {
            online: 0,
            first_or_last: true,
            user_first_or_last: true,
        })
    );
    assert!(hub.read().is_empty(), "no room left");
}

#[test]
fn deliver_shares_one_buffer_with_members_of_that_room_only() {
    let hub = Hub::default();
    let a = Arc::new(Outbox::new(8, 1 << 20));
    let b = Arc::new(Outbox::new(8, 1 << 20));
    let other = Arc::new(Outbox::new(8, 1 << 20));
    join_as(&hub, Codec::Native, &room("general"), ConnId(1), &a, reply);
    join_as(&hub, Codec::Native, &room("general"), ConnId(2), &b, reply);
    join_as(&hub, Codec::Native, &room("dev"), ConnId(3), &other, reply);
    assert_eq!(
        drain(&a),
        [&b"1"[..]],
        "the joined reply with the online count"
    );
    assert_eq!(drain(&b), [&b"2"[..]]);
    drain(&other);
    let message = message("general", "hi");
    let frame = message.frame(Codec::Native);
    assert_eq!(hub.deliver(&message), Delivered { queued: 2, slow: 0 });
    for outbox in [&a, &b] {
        let batch = drain(outbox);
        assert_eq!(batch.len(), 1);
        assert_eq!(batch[0].as_ptr(), frame.as_ptr(), "same bytes, not a copy");
    }
    assert!(other.is_empty());
}

#[test]
fn socketio_members_share_one_socketio_frame_built_once() {
    let hub = Hub::default();
    let native = Arc::new(Outbox::new(8, 1 << 20));
    let sio: Vec<_> = (0..3).map(|_| Arc::new(Outbox::new(8, 1 << 20))).collect();
    join_as(
        &hub,
        Codec::Native,
        &room("general"),
        ConnId(1),
        &native,
        reply,
    );
    for (i, outbox) in sio.iter().enumerate() {
        join_as(
            &hub,
            Codec::SocketIo,
            &room("general"),
            ConnId(10 + i as u64),
            outbox,
            reply,
        );
    }
    for outbox in sio.iter().chain([&native]) {
        drain(outbox);
    }
    let message = message("general", "hi");
    let frame = message.frame(Codec::Native);
    assert_eq!(hub.deliver(&message).queued, 4);
    assert_eq!(drain(&native)[0].as_ptr(), frame.as_ptr());
    let first = drain(&sio[0]);
    let payload = crate::protocol::ws::text_payload(&first[0]);
    assert_eq!(
        payload,
        crate::protocol::ws::text_payload(&message.frame(Codec::SocketIo))
    );
    assert!(payload.starts_with(br#"42["message","{\"type\":\"message\""#));
    for outbox in &sio[1..] {
        assert_eq!(
            drain(outbox)[0].as_ptr(),
            first[0].as_ptr(),
            "one Socket.IO frame"
        );
    }
}

#[test]
fn a_full_member_is_counted_slow_and_others_still_get_the_frame() {
    let hub = Hub::default();
    let slow = Arc::new(Outbox::new(8, 1 << 20));
    let fast = Arc::new(Outbox::new(8, 1 << 20));
    join_as(
        &hub,
        Codec::Native,
        &room("general"),
        ConnId(1),
        &slow,
        reply,
    );
    join_as(
        &hub,
        Codec::Native,
        &room("general"),
        ConnId(2),
        &fast,
        reply,
    );
    drain(&fast);
    while slow.len() < 8 {
        slow.push(Bytes::new()).unwrap();
    }
    let done = hub.deliver(&message("general", "m"));
    assert_eq!(done, Delivered { queued: 1, slow: 1 });
    assert!(slow.is_closed());
    assert_eq!(fast.len(), 1);
}

#[test]
fn users_count_once_and_watchers_get_one_frame_per_interval() {
    let hub = Hub::default();
    let dev = room("dev");
    let join = |conn: u64, user: &str, presence: bool| {
        let outbox = Arc::new(Outbox::new(8, 1 << 20));
        let joiner = Joiner {
            conn: ConnId(conn),
            outbox: outbox.clone(),
            user: user.into(),
            codec: Codec::Native,
            presence,
        };
        let staging = Arc::new(Staging::like(&outbox));
        let membership = hub.join_staged(&dev, &joiner, &staging);
        hub.promote("dev", ConnId(conn), |_| {});
        (membership, outbox)
    };
    let (first, watcher) = join(1, "ann", true);
    assert!(first.user_first_or_last);
    let (second, quiet) = join(2, "ann", false);
    assert!(!second.user_first_or_last, "ann's second connection");
    assert_eq!((hub.members("dev"), hub.user_count("dev")), (2, 1));
    assert_eq!(hub.local_user("dev", "ann").unwrap().connections, 2);
    for user in ["bob", "cat"] {
        let change = Change::Joined {
            user: user.into(),
            since: 9,
        };
        hub.record_presence(&dev, change, 3);
    }
    hub.flush_presence();
    let frames = drain(&watcher);
    assert_eq!(frames.len(), 1, "two arrivals, one frame");
    let event: serde_json::Value =
        serde_json::from_slice(&crate::protocol::ws::text_payload(&frames[0])).unwrap();
    assert_eq!(event["type"], "member_joined");
    assert_eq!(event["online"], 3);
    assert_eq!(event["members"][1]["user"], "cat");
    assert!(quiet.is_empty(), "did not ask for presence");
    assert!(!hub.leave("dev", ConnId(1)).unwrap().user_first_or_last);
    assert!(hub.leave("dev", ConnId(2)).unwrap().user_first_or_last);
    // Nobody watches an empty room: its changes are not kept.
    hub.record_presence(&dev, Change::Left { user: "bob".into() }, 0);
    assert!(hub.presence.take().is_empty());
}

#[test]
fn users_pages_walk_the_room_in_name_order_once() {
    let hub = Hub::default();
    let lobby = room("lobby");
    let outbox = Arc::new(Outbox::new(8, 1 << 20));
    // u0 … u24 joined out of order, u7 twice.
    for (conn, user) in (0..25).rev().chain([7]).enumerate() {
        let joiner = Joiner {
            conn: ConnId(conn as u64),
            outbox: outbox.clone(),
            user: format!("u{user:02}").into(),
            codec: Codec::Native,
            presence: false,
        };
        hub.join_staged(&lobby, &joiner, &Arc::new(Staging::like(&outbox)));
    }
    let mut seen = Vec::new();
    let mut after: Option<String> = None;
    loop {
        let (online, page, more) = hub.users_page("lobby", after.as_deref(), 10);
        assert_eq!(online, 25);
        seen.extend(page.iter().map(|(u, l)| (u.to_string(), l.connections)));
        if !more {
            break;
        }
        after = page.last().map(|(u, _)| u.to_string());
    }
    let want: Vec<_> = (0..25)
        .map(|i| (format!("u{i:02}"), if i == 7 { 2 } else { 1 }))
        .collect();
    assert_eq!(seen, want);
    assert_eq!(
        hub.users_page("lobby", Some("u24"), 10),
        (25, Vec::new(), false)
    );
    assert_eq!(hub.users_page("nowhere", None, 10), (0, Vec::new(), false));
    let (_, none, more) = hub.users_page("lobby", None, 0);
    assert!(none.is_empty() && more);
}
