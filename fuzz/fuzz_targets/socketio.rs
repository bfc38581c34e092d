//! Socket.IO input: polling payloads (packets split by 0x1e), Engine.IO packets and the
//! Socket.IO packets inside them never panic the decoders.
#![no_main]

use libfuzzer_sys::fuzz_target;
use scalechat::socketio::codec;

fuzz_target!(|data: &[u8]| {
    let Ok(body) = std::str::from_utf8(data) else {
        return;
    };
    for packet in codec::split_payload(body).unwrap_or_default() {
        if let Ok(codec::EnginePacket::Message(text)) = codec::decode_engine(packet) {
            if let Ok(packet) = codec::decode_packet(text) {
                let _ = codec::event_name(&packet);
            }
        }
    }
});
