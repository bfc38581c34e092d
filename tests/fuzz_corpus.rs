//! Every input in the fuzz corpora (fuzz/corpus/<target>/), including the crashes fuzzing
//! found, replayed through the same decoders as the fuzz targets on every test run: none may
//! panic, and each target's properties hold.

use std::path::PathBuf;

use scalechat::protocol::message::Message;
use scalechat::protocol::native::{self, Request};

fn corpus(target: &str) -> Vec<(PathBuf, Vec<u8>)> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz/corpus")
        .join(target);
    let mut inputs: Vec<(PathBuf, Vec<u8>)> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|entry| {
            let path = entry.unwrap().path();
            let bytes = std::fs::read(&path).unwrap();
            (path, bytes)
        })
        .collect();
    inputs.sort();
    assert!(!inputs.is_empty(), "{} is empty", dir.display());
    inputs
}

#[test]
fn native_decode_corpus() {
    for (path, data) in corpus("native_decode") {
        if let Ok(Request::Send { message, .. }) = native::decode(&data, 4000) {
            assert!(message.chars().count() <= 4000, "{}", path.display());
        }
        // The Redis receive path's decoder: what it accepts reads back the same.
        if let Ok(message) = Message::decode(&data) {
            let again = Message::decode(&message.json()).unwrap();
            assert_eq!((again.id(), again.text()), (message.id(), message.text()));
        }
    }
}

#[test]
fn config_toml_corpus() {
    let mut valid = 0;
    for (path, data) in corpus("config_toml") {
        let Ok(text) = std::str::from_utf8(&data) else {
            continue;
        };
        if let Ok(config) = scalechat::config::from_toml(text) {
            valid += 1;
            assert!(config.validate().is_empty(), "{}", path.display());
            let secrets = !config.redis.password.expose().is_empty()
                || !config.auth.jwt_secret.expose().is_empty();
            if !secrets {
                let again = scalechat::config::from_toml(&config.to_toml());
                assert_eq!(again.ok(), Some(config), "{}", path.display());
            }
        }
    }
    assert!(
        valid > 0,
        "the corpus holds at least the example configuration"
    );
}

#[test]
fn ws_frames_corpus() {
    use scalechat::protocol::frame::{Decoded, Decoder};
    let mut frames = 0;
    for (path, data) in corpus("ws_frames") {
        let mut buf = data.clone();
        let mut decoder = Decoder::new(1 << 16);
        let mut at = 0;
        loop {
            match decoder.decode(&mut buf[at..]) {
                Ok(Decoded::Frame(header)) => {
                    assert!(header.frame_len() <= buf.len() - at, "{}", path.display());
                    at += header.frame_len();
                    frames += 1;
                }
                Ok(Decoded::Incomplete { .. }) => break,
                Err(e) => {
                    assert!(
                        [1002, 1007, 1009].contains(&e.code),
                        "{}: {e}",
                        path.display()
                    );
                    break;
                }
            }
        }
    }
    assert!(frames > 0, "the seeds hold valid frames");
}

#[test]
fn socketio_corpus() {
    use scalechat::protocol::socketio as codec;
    let mut decoded = 0;
    for (_, data) in corpus("socketio") {
        let Ok(body) = std::str::from_utf8(&data) else {
            continue;
        };
        for packet in codec::split_payload(body).unwrap_or_default() {
            if let Ok(codec::EnginePacket::Message(text)) = codec::decode_engine(packet)
                && codec::decode_packet(text).is_ok()
            {
                decoded += 1;
            }
        }
    }
    assert!(decoded > 0, "the seeds hold valid packets");
}
