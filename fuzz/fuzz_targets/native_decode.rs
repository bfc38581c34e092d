//! Native protocol client frames: decoding never panics, and whatever decodes is well formed.
#![no_main]

use libfuzzer_sys::fuzz_target;
use scalechat::protocol::native::{self, Request};

fuzz_target!(|data: &[u8]| {
    if let Ok(request) = native::decode(data, 4000) {
        if let Request::Send { message, .. } = request {
            assert!(message.chars().count() <= 4000);
        }
    }
    // The server's own reader of message ids and epochs sees relayed text too.
    let _ = native::message_meta(data);
});
