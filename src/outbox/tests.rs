//! Tests of the outbox: what the writer takes, the frame and byte bounds (the batch being
//! written included), closing as a slow consumer, and the wake-ups of the writer and of a
//! task waiting for room.

use super::*;

#[test]
fn take_moves_everything_queued() {
    let outbox = Outbox::new(8, 1 << 20);
    outbox.push(Bytes::from_static(b"a")).unwrap();
    outbox.push(Bytes::from_static(b"b")).unwrap();
    let mut batch = VecDeque::new();
    assert!(matches!(outbox.take(&mut batch), Next::Frames));
    assert_eq!(batch, [&b"a"[..], &b"b"[..]]);
    batch.clear();
    assert!(matches!(outbox.take(&mut batch), Next::Empty));
}

#[test]
fn overflow_drops_the_queue_and_closes_as_slow() {
    let outbox = Outbox::new(8, 1 << 20);
    for _ in 0..8 {
        outbox.push(Bytes::from_static(b"x")).unwrap();
    }
    assert_eq!(outbox.push(Bytes::from_static(b"x")), Err(Refused::Full));
    assert_eq!(outbox.push(Bytes::from_static(b"x")), Err(Refused::Closed));
    let mut batch = VecDeque::new();
    let Next::Close(frame) = outbox.take(&mut batch) else {
        panic!("expected a close");
    };
    assert!(batch.is_empty());
    assert_eq!(&frame[2..4], &close_code::SLOW_CONSUMER.to_be_bytes());
}

#[test]
fn flushing_close_comes_after_queued_frames() {
    let outbox = Outbox::new(8, 1 << 20);
    outbox.push(Bytes::from_static(b"a")).unwrap();
    outbox.close(close_code::GOING_AWAY, "bye", true);
    outbox.close(close_code::NORMAL, "ignored", true);
    let mut batch = VecDeque::new();
    assert!(matches!(outbox.take(&mut batch), Next::Frames));
    batch.clear();
    let Next::Close(frame) = outbox.take(&mut batch) else {
        panic!("expected a close");
    };
    assert_eq!(&frame[2..4], &close_code::GOING_AWAY.to_be_bytes());
}

#[tokio::test]
async fn push_to_an_empty_queue_wakes_the_writer() {
    let outbox = std::sync::Arc::new(Outbox::new(8, 1 << 20));
    let waiter = tokio::spawn({
        let outbox = outbox.clone();
        async move { outbox.wait().await }
    });
    tokio::task::yield_now().await;
    outbox.push(Bytes::from_static(b"a")).unwrap();
    waiter.await.unwrap();
}

#[test]
fn too_many_bytes_close_as_slow_like_too_many_frames() {
    let outbox = Outbox::new(8, 10);
    outbox.push(Bytes::from_static(b"abcd")).unwrap();
    outbox.push(Bytes::from_static(b"efghij")).unwrap();
    assert_eq!(outbox.push(Bytes::from_static(b"k")), Err(Refused::Full));
    let mut batch = VecDeque::new();
    let Next::Close(frame) = outbox.take(&mut batch) else {
        panic!("expected a close");
    };
    assert!(batch.is_empty());
    assert_eq!(&frame[2..4], &close_code::SLOW_CONSUMER.to_be_bytes());
    // A single frame over the bound is refused too.
    let outbox = Outbox::new(8, 10);
    assert_eq!(outbox.push(Bytes::from(vec![0; 11])), Err(Refused::Full));
}

#[test]
fn the_batch_being_written_counts_until_the_writer_takes_again() {
    let outbox = Outbox::new(8, 10);
    outbox.push(Bytes::from(vec![0; 6])).unwrap();
    let mut batch = VecDeque::new();
    assert!(matches!(outbox.take(&mut batch), Next::Frames));
    // The writer still holds those 6 bytes.
    outbox.push(Bytes::from(vec![0; 4])).unwrap();
    batch.clear();
    assert!(matches!(outbox.take(&mut batch), Next::Frames));
    batch.clear();
    assert!(matches!(outbox.take(&mut batch), Next::Empty));
    // Everything is written: the whole bound is free again.
    outbox.push(Bytes::from(vec![0; 10])).unwrap();
    let outbox = Outbox::new(8, 10);
    outbox.push(Bytes::from(vec![0; 6])).unwrap();
    assert!(matches!(outbox.take(&mut batch), Next::Frames));
    assert_eq!(outbox.push(Bytes::from(vec![0; 5])), Err(Refused::Full));
}

#[test]
fn the_writer_taking_part_of_the_queue_frees_bytes_as_it_comes_back() {
    let outbox = Outbox::new(8, 10);
    for len in [3, 3, 4] {
        outbox.push(Bytes::from(vec![0; len])).unwrap();
    }
    let mut taken = Vec::new();
    assert!(matches!(
        outbox.take_up_to(2, |f| taken.push(f)),
        Next::Frames
    ));
    assert_eq!(taken.len(), 2);
    // The two taken (6 bytes) are being written and the third is queued: the bound is full.
    assert_eq!(outbox.lock().bytes, 10);
    assert!(matches!(
        outbox.take_up_to(2, |f| taken.push(f)),
        Next::Frames
    ));
    assert_eq!(outbox.lock().bytes, 4, "the first batch is written");
    assert!(matches!(
        outbox.take_up_to(2, |f| taken.push(f)),
        Next::Empty
    ));
    assert_eq!(outbox.lock().bytes, 0);
    // Many rounds of pushes and takes never leak bytes (half the bound is being written).
    for _ in 0..1000 {
        outbox.push(Bytes::from(vec![0; 5])).unwrap();
        assert!(matches!(outbox.take_up_to(64, drop), Next::Frames));
    }
    assert!(matches!(outbox.take_up_to(64, drop), Next::Empty));
    outbox.push(Bytes::from(vec![0; 10])).unwrap();
}

#[tokio::test]
async fn waiting_for_room_is_woken_by_the_writer_draining_or_a_close() {
    use futures_util::poll;
    let outbox = Outbox::new(8, 10);
    outbox.push(Bytes::from(vec![0; 6])).unwrap();
    let mut room = std::pin::pin!(outbox.wait_room());
    assert!(poll!(&mut room).is_pending());
    let mut batch = VecDeque::new();
    assert!(matches!(outbox.take(&mut batch), Next::Frames));
    // Taken but not written: still more than half of the bytes.
    assert!(poll!(&mut room).is_pending());
    batch.clear();
    assert!(matches!(outbox.take(&mut batch), Next::Empty));
    assert!(outbox.lock().room_waiter.is_none(), "the waiter was woken");
    assert!(poll!(&mut room).is_ready());

    outbox.push(Bytes::from(vec![0; 6])).unwrap();
    let mut room = std::pin::pin!(outbox.wait_room());
    assert!(poll!(&mut room).is_pending());
    outbox.close(close_code::GOING_AWAY, "bye", true);
    assert!(outbox.lock().room_waiter.is_none(), "the waiter was woken");
    assert!(poll!(&mut room).is_ready());
}

#[test]
fn the_writer_takes_the_close_frame_after_the_queue() {
    let outbox = Outbox::new(8, 1 << 20);
    for frame in [&b"a"[..], b"b", b"c"] {
        outbox.push(Bytes::from_static(frame)).unwrap();
    }
    outbox.close(close_code::GOING_AWAY, "bye", true);
    assert_eq!(outbox.len(), 3);
    let mut taken = Vec::new();
    assert!(matches!(
        outbox.take_up_to(2, |f| taken.push(f)),
        Next::Frames
    ));
    assert!(matches!(
        outbox.take_up_to(2, |f| taken.push(f)),
        Next::Frames
    ));
    assert_eq!(taken, [&b"a"[..], b"b", b"c"]);
    let Next::Close(frame) = outbox.take_up_to(2, |f| taken.push(f)) else {
        panic!("expected a close");
    };
    assert_eq!(&frame[2..4], &close_code::GOING_AWAY.to_be_bytes());
    assert!(matches!(
        outbox.take_up_to(2, |f| taken.push(f)),
        Next::Empty
    ));
    assert_eq!(taken.len(), 3);
}

#[test]
fn an_outbox_fits_a_128_byte_allocation() {
    // With its `Arc`'s two counts: every connection holds one.
    assert!(size_of::<Outbox>() <= 112, "{} bytes", size_of::<Outbox>());
}
