//! Encode once, share the bytes: delivering one message allocates the same amount whether the
//! room has 1 member or 1,000. Counted with a global allocator that counts only on the
//! measuring thread.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::collections::VecDeque;
use std::sync::Arc;

use scalechat::config::RoomsConfig;
use scalechat::hub::{Codec, ConnId, Hub};
use scalechat::outbox::Outbox;
use scalechat::protocol::RoomName;
use scalechat::protocol::native::MessageTemplate;
use scalechat::transport::{Envelope, MemoryTransport};

struct Counting;

thread_local! {
    static COUNTING: Cell<bool> = const { Cell::new(false) };
    static ALLOCATIONS: Cell<usize> = const { Cell::new(0) };
}

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if COUNTING.with(Cell::get) {
            ALLOCATIONS.with(|n| n.set(n.get() + 1));
        }
        unsafe { System.alloc(layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if COUNTING.with(Cell::get) {
            ALLOCATIONS.with(|n| n.set(n.get() + 1));
        }
        unsafe { System.realloc(ptr, layout, new_size) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
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
    let hub = Arc::new(Hub::new());
    let transport = MemoryTransport::new(hub.clone(), RoomsConfig::default());
    let room = RoomName::new("general").unwrap();
    let outboxes: Vec<Arc<Outbox>> = (0..members)
        .map(|i| {
            let outbox = Arc::new(Outbox::new(1024, 1 << 20));
            hub.join_as(codec, &room, ConnId(i as u64), &outbox, |_| {
                bytes::Bytes::new()
            });
            outbox
        })
        .collect();
    // The room's first message creates its log: per room, not per member.
    let first = MessageTemplate::new(&room, "alice", 1, "warm-up");
    transport.publish(&Envelope {
        room: room.clone(),
        message: first,
        dedupe: None,
    });
    for outbox in &outboxes {
        outbox.take(&mut VecDeque::new()); // as each connection's writer does, once
    }
    let count = allocations(|| {
        let message = MessageTemplate::new(&room, "alice", 2, "hello, everyone");
        let id = transport.publish(&Envelope {
            room: room.clone(),
            message,
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
