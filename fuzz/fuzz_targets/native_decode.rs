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
    // The Redis receive path's decoder: what it accepts reads back the same.
    if let Ok(message) = scalechat::protocol::message::Message::decode(data) {
        let again = scalechat::protocol::message::Message::decode(&message.json()).unwrap();
        assert_eq!((again.id(), again.text()), (message.id(), message.text()));
    }
});
