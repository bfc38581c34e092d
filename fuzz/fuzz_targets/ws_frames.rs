//! Client WebSocket frames as they arrive on a connection: the decoder never panics, every
//! frame it returns lies within the bytes given, and every refusal carries a close code the
//! server may send.
#![no_main]

use libfuzzer_sys::fuzz_target;
use scalechat::protocol::frame::{Decoded, Decoder};

fuzz_target!(|data: &[u8]| {
    let mut buf = data.to_vec();
    let mut decoder = Decoder::new(1 << 16);
    let mut at = 0;
    loop {
        match decoder.decode(&mut buf[at..]) {
            Ok(Decoded::Frame(header)) => {
                assert!(header.frame_len() <= buf.len() - at);
                at += header.frame_len();
            }
            Ok(Decoded::Incomplete { .. }) => break,
            Err(e) => {
                assert!([1002, 1007, 1009].contains(&e.code), "{e}");
                break;
            }
        }
    }
});
