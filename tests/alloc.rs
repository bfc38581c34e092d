//! Encode once, share the bytes: delivering one message allocates the same amount whether the
//! room has 1 member or 1,000 (counted on the publishing thread), and the members' writers
//! write it without allocating (counted on every thread of a real server's runtime); and an
//! idle connection holds only a handful of allocations.

mod common;

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicIsize, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use futures_util::StreamExt;
use futures_util::future::join_all;
use scalechat::config::RoomsConfig;
use scalechat::hub::{ConnId, Hub, Joiner, Staging};
use scalechat::outbox::Outbox;
use scalechat::protocol::RoomName;
use scalechat::protocol::message::{Codec, Draft};
use scalechat::server::Server;
use scalechat::transport::{Envelope, MemoryTransport};
use tokio::runtime::{Builder, Runtime};
use tokio_util::sync::CancellationToken;

struct Counting;

thread_local! {
    static COUNTING: Cell<bool> = const { Cell::new(false) };
    static ALLOCATIONS: Cell<usize> = const { Cell::new(0) };
    /// A thread of the server's runtime.
    static SERVER_THREAD: Cell<bool> = const { Cell::new(false) };
}

/// Whether allocations on server threads are being counted, and how many there were.
static COUNTING_SERVER: AtomicBool = AtomicBool::new(false);
static SERVER_ALLOCATIONS: AtomicUsize = AtomicUsize::new(0);
/// Allocations made less those freed on server threads, while `COUNTING_SERVER`.
static SERVER_LIVE: AtomicIsize = AtomicIsize::new(0);
/// Their bytes (as requested, before the allocator's rounding up).
static SERVER_LIVE_BYTES: AtomicIsize = AtomicIsize::new(0);
/// Held by a test counting on server threads: the counts are global, one test at a time.
static SERVER_COUNTING: Mutex<()> = Mutex::new(());

fn count(bytes: usize) {
    if COUNTING.with(Cell::get) {
        ALLOCATIONS.with(|n| n.set(n.get() + 1));
    }
    if COUNTING_SERVER.load(Ordering::Relaxed) && SERVER_THREAD.with(Cell::get) {
        SERVER_ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        SERVER_LIVE.fetch_add(1, Ordering::Relaxed);
        SERVER_LIVE_BYTES.fetch_add(bytes as isize, Ordering::Relaxed);
    }
}

fn count_free(bytes: usize) {
    if COUNTING_SERVER.load(Ordering::Relaxed) && SERVER_THREAD.with(Cell::get) {
        SERVER_LIVE.fetch_sub(1, Ordering::Relaxed);
        SERVER_LIVE_BYTES.fetch_sub(bytes as isize, Ordering::Relaxed);
    }
}

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        count(layout.size());
        unsafe { System.alloc(layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        count(new_size);
        count_free(layout.size());
        unsafe { System.realloc(ptr, layout, new_size) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        count_free(layout.size());
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

/// Allocations made by `f` on this thread.
fn allocations(f: impl FnOnce()) -> usize {
    ALLOCATIONS.with(|n| n.set(0));
    COUNTING.with(|c| c.set(true));
    f();
    COUNTING.with(|c| c.set(false));
    ALLOCATIONS.with(Cell::get)
}

/// Allocations to encode and deliver one message to a room of `members`, and the members'
/// queued frames afterwards.
fn deliver_to(members: usize) -> (usize, Vec<Arc<Outbox>>) {
    deliver_to_members(members, Codec::Native)
}

/// [`deliver_to`] with members reading `codec`.
fn deliver_to_members(members: usize, codec: Codec) -> (usize, Vec<Arc<Outbox>>) {
    let hub = Arc::new(Hub::default());
    let transport = MemoryTransport::new(hub.clone(), RoomsConfig::default());
    let room = RoomName::new("general").unwrap();
    let outboxes: Vec<Arc<Outbox>> = (0..members)
        .map(|i| {
            let outbox = Arc::new(Outbox::new(1024, 1 << 20));
            let joiner = Joiner {
                conn: ConnId(i as u64),
                outbox: outbox.clone(),
                user: format!("u{i}").into(),
                codec,
                presence: false,
            };
            let staging = Arc::new(Staging::like(&outbox));
            hub.join_staged(&room, &joiner, &staging);
            hub.promote(room.as_str(), joiner.conn, |_| {});
            outbox
        })
        .collect();
    // The room's first message creates its log: per room, not per member. The sender's
    // name is shared, as its session holds it.
    let alice: Arc<str> = "alice".into();
    let first = Draft::new(room.clone(), alice.clone(), 1, "warm-up".into());
    transport.publish(Envelope {
        draft: first,
        dedupe: None,
    });
    for outbox in &outboxes {
        outbox.take(&mut VecDeque::new()); // as each connection's writer does, once
    }
    // The text is the decoded request's string, which the message keeps.
    let text = String::from("hello, everyone");
    let count = allocations(|| {
        let draft = Draft::new(room.clone(), alice, 2, text);
        let id = transport.publish(Envelope {
            draft,
            dedupe: None,
        });
        assert_eq!(id.id, 2);
    });
    (count, outboxes)
}

#[test]
fn delivery_allocations_do_not_grow_with_members() {
    let (one, _) = deliver_to(1);
    let (thousand, outboxes) = deliver_to(1000);
    println!("allocations for one message: {one} with 1 member, {thousand} with 1,000");
    assert_eq!(
        one, thousand,
        "1 member: {one} allocations; 1,000 members: {thousand}"
    );
    // Encoding the JSON and building the frame (kept in the history too, by reference):
    // a couple of allocations per message.
    assert!(one <= 4, "{one} allocations per message");
    // And all 1,000 members hold the very same bytes.
    let mut first = VecDeque::new();
    outboxes[0].take(&mut first);
    for outbox in &outboxes[1..] {
        let mut batch = VecDeque::new();
        outbox.take(&mut batch);
        assert_eq!(batch.len(), 1);
        assert_eq!(batch[0].as_ptr(), first[0].as_ptr());
    }
}

#[test]
fn socketio_delivery_encodes_once_whatever_the_members() {
    let (native, _) = deliver_to(1);
    let (one, _) = deliver_to_members(1, Codec::SocketIo);
    let (thousand, outboxes) = deliver_to_members(1000, Codec::SocketIo);
    println!("Socket.IO members: {one} allocations with 1, {thousand} with 1,000");
    assert_eq!(one, thousand, "1 member: {one}; 1,000 members: {thousand}");
    // The Socket.IO form is one more encoding per message (its JSON and its frame).
    assert!(
        one <= native + 2,
        "{one} allocations, {native} for native members"
    );
    let mut first = VecDeque::new();
    outboxes[0].take(&mut first);
    for outbox in &outboxes[1..] {
        let mut batch = VecDeque::new();
        outbox.take(&mut batch);
        assert_eq!(batch[0].as_ptr(), first[0].as_ptr());
    }
}

/// A runtime whose threads count as the server's.
fn server_runtime() -> Runtime {
    Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .on_thread_start(|| SERVER_THREAD.with(|t| t.set(true)))
        .build()
        .unwrap()
}

/// Allocations on the server's threads while one message reaches `members` idle members of a
/// room, after a first message warmed every connection up. The message is published from the
/// clients' runtime, so what is counted is the writers' side: each member's writer taking the
/// message from its outbox and writing it.
fn burst_allocations(members: usize) -> usize {
    let _alone = SERVER_COUNTING
        .lock()
        .unwrap_or_else(PoisonError::into_inner);
    let server_rt = server_runtime();
    let mut config = common::config();
    config.limits.ping_interval_secs = 3600; // no ping during the test
    let shutdown = CancellationToken::new();
    let server = server_rt
        .block_on(Server::bind(config, shutdown.clone()))
        .unwrap();
    let (addr, node) = (server.local_addr().unwrap(), server.node().clone());
    server_rt.spawn(server.run());
    let clients_rt = Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let count = clients_rt.block_on(async {
        let url = format!("ws://{addr}/ws?room=burst");
        let mut clients = Vec::new();
        for _ in 0..members.div_ceil(50) {
            let batch = (clients.len()..members.min(clients.len() + 50)).map(|_| async {
                let mut client = common::Client::connect(&url).await;
                client.expect("welcome").await;
                client.expect("joined").await;
                client
            });
            clients.extend(join_all(batch).await);
        }
        let room = RoomName::new("burst").unwrap();
        let publish = |text: &str| {
            let envelope = Envelope {
                draft: Draft::new(room.clone(), "alice".into(), 1, text.into()),
                dedupe: None,
            };
            let transport = &node.transport;
            async move { transport.publish(vec![envelope]).await.unwrap() }
        };
        publish("warm-up").await;
        everyone_reads(&mut clients).await;
        SERVER_ALLOCATIONS.store(0, Ordering::Relaxed);
        COUNTING_SERVER.store(true, Ordering::Relaxed);
        publish("hello, everyone").await;
        everyone_reads(&mut clients).await;
        COUNTING_SERVER.store(false, Ordering::Relaxed);
        let count = SERVER_ALLOCATIONS.load(Ordering::Relaxed);
        for mut client in clients {
            let _ = client.ws.close(None).await;
            let _ = client.ws.next().await;
        }
        count
    });
    shutdown.cancel();
    server_rt.shutdown_timeout(std::time::Duration::from_secs(5));
    count
}

/// Every client reads its next frame, a chat message.
async fn everyone_reads(clients: &mut [common::Client]) {
    join_all(clients.iter_mut().map(|c| c.expect("message"))).await;
}

#[test]
fn writing_a_burst_to_idle_members_allocates_nothing_per_member() {
    let few = burst_allocations(10);
    let many = burst_allocations(1000);
    println!("server-side allocations for one message: {few} with 10 members, {many} with 1,000");
    // Waking and polling 1,000 connection tasks is free; a handful of allocations may come
    // from the runtime itself, never one per member.
    assert!(
        many <= 16,
        "{many} allocations on the server's threads for 1,000 members ({few} for 10)"
    );
}

/// Allocations, and their bytes, still held on the server's threads per connection, once
/// `members` clients have joined a room and gone idle.
fn idle_allocations(members: usize) -> (f64, f64) {
    let _alone = SERVER_COUNTING
        .lock()
        .unwrap_or_else(PoisonError::into_inner);
    let server_rt = server_runtime();
    let mut config = common::config();
    config.limits.ping_interval_secs = 3600; // no ping during the test
    let shutdown = CancellationToken::new();
    let server = server_rt
        .block_on(Server::bind(config, shutdown.clone()))
        .unwrap();
    let addr = server.local_addr().unwrap();
    server_rt.spawn(server.run());
    let clients_rt = Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let live = clients_rt.block_on(async {
        let connect = |i: usize| async move {
            let url = format!("ws://{addr}/ws?room=idle&name=user{i}");
            let mut client = common::Client::connect(&url).await;
            client.expect("welcome").await;
            client.expect("joined").await;
            client
        };
        // The room and the node's own lazily made state exist before counting.
        let first = connect(members).await;
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        SERVER_LIVE.store(0, Ordering::Relaxed);
        SERVER_LIVE_BYTES.store(0, Ordering::Relaxed);
        COUNTING_SERVER.store(true, Ordering::Relaxed);
        let mut clients = Vec::new();
        for _ in 0..members.div_ceil(50) {
            let batch = (clients.len()..members.min(clients.len() + 50)).map(connect);
            clients.extend(join_all(batch).await);
        }
        // Whatever the handshakes left to free is freed once each connection is idle.
        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
        COUNTING_SERVER.store(false, Ordering::Relaxed);
        let live = (
            SERVER_LIVE.load(Ordering::Relaxed),
            SERVER_LIVE_BYTES.load(Ordering::Relaxed),
        );
        for mut client in clients.into_iter().chain([first]) {
            let _ = client.ws.close(None).await;
            let _ = client.ws.next().await;
        }
        live
    });
    shutdown.cancel();
    server_rt.shutdown_timeout(std::time::Duration::from_secs(5));
    let per_conn = |n: isize| n as f64 / members as f64;
    (per_conn(live.0), per_conn(live.1))
}

#[test]
fn an_idle_connection_holds_six_allocations_of_about_1300_bytes() {
    let (per_conn, bytes) = idle_allocations(200);
    println!("held per idle connection: {per_conn:.2} allocations, {bytes:.0} bytes");
    // Its task (the connection's state machine), its socket's registration with the runtime,
    // its outbox and the outbox's slots, its list of rooms, and its user's name (the room's
    // is the hub's). No read buffer, no pipeline of sends until it sends, no timer. The
    // room's tables grow by doubling: a fraction of an allocation per member.
    assert!(
        per_conn <= 6.1,
        "{per_conn:.2} allocations held per idle connection"
    );
    // The task 640 bytes (the runtime's header and trailer around the connection's state
    // machine, in a multiple of 128 bytes; 1,152 when the state machine held the session's
    // parts twice, its timers as `Instant`s and its arguments twice), the socket's
    // registration 256, the outbox 128 and its slots 128, the user's name 24, the list of
    // one room 16: 1,192; and the room's member and user tables, about 110 a member at 200.
    assert!(bytes <= 1320.0, "{bytes:.0} bytes held per idle connection");
}
