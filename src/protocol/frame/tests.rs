//! Tests of the frame decoder: masked client frames built by hand, fed whole, cut short or
//! back to back, and the close code each broken rule earns; arbitrary bytes never panic.

use super::*;

const MAX: usize = 1024;
const KEY: [u8; 4] = [0x37, 0xFA, 0x21, 0x3D];

/// A masked client frame.
fn frame(fin: bool, opcode: u8, payload: &[u8]) -> Vec<u8> {
    let mut out = vec![u8::from(fin) << 7 | opcode];
    match payload.len() {
        n @ 0..=125 => out.push(0x80 | n as u8),
        n @ 126..=0xFFFF => {
            out.push(0x80 | 126);
            out.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            out.push(0x80 | 127);
            out.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    out.extend_from_slice(&KEY);
    let start = out.len();
    out.extend_from_slice(payload);
    unmask(&mut out[start..], KEY);
    out
}

/// Decodes `frames` back to back; each whole frame's opcode, fin and payload, or the error.
fn decode_all(frames: &[Vec<u8>]) -> Result<Vec<(Opcode, bool, Vec<u8>)>, FrameError> {
    let mut decoder = Decoder::new(MAX);
    let mut buf: Vec<u8> = frames.concat();
    let mut out = Vec::new();
    while !buf.is_empty() {
        match decoder.decode(&mut buf)? {
            Decoded::Frame(h) => {
                out.push((
                    h.opcode,
                    h.fin,
                    buf[h.payload_offset..h.frame_len()].to_vec(),
                ));
                buf.drain(..h.frame_len());
            }
            Decoded::Incomplete { .. } => panic!("incomplete"),
        }
    }
    Ok(out)
}

fn code(frames: &[Vec<u8>]) -> u16 {
    decode_all(frames).expect_err("refused").code
}

#[test]
fn a_masked_text_frame_is_unmasked() {
    let got = decode_all(&[frame(true, 0x1, b"hello")]).unwrap();
    assert_eq!(got, [(Opcode::Text, true, b"hello".to_vec())]);
}

#[test]
fn unmask_matches_the_bytewise_definition_at_every_length() {
    for len in 0..40 {
        let data: Vec<u8> = (0..len as u8).collect();
        let mut fast = data.clone();
        unmask(&mut fast, KEY);
        let slow: Vec<u8> = data
            .iter()
            .enumerate()
            .map(|(i, b)| b ^ KEY[i % 4])
            .collect();
        assert_eq!(fast, slow, "length {len}");
    }
}

#[test]
fn every_byte_short_of_a_frame_asks_for_more() {
    for payload_len in [0, 5, 125, 126, 300, 1024] {
        let bytes = frame(true, 0x1, &vec![b'a'; payload_len]);
        let mut decoder = Decoder::new(MAX);
        for cut in 0..bytes.len() {
            let mut part = bytes[..cut].to_vec();
            let got = decoder.decode(&mut part).unwrap();
            assert!(
                matches!(got, Decoded::Incomplete { .. }),
                "{payload_len} cut {cut}"
            );
        }
        let mut whole = bytes.clone();
        let Decoded::Frame(h) = decoder.decode(&mut whole).unwrap() else {
            panic!("whole frame");
        };
        assert_eq!((h.payload_len, h.frame_len()), (payload_len, bytes.len()));
    }
}

#[test]
fn the_frame_length_is_known_once_the_header_is() {
    let mut bytes = frame(true, 0x1, &[b'a'; 300]);
    bytes.truncate(20);
    let got = Decoder::new(MAX).decode(&mut bytes).unwrap();
    assert_eq!(
        got,
        Decoded::Incomplete {
            frame_len: Some(308)
        }
    );
}

#[test]
fn reserved_bits_are_refused_with_1002() {
    for rsv in [0x40, 0x20, 0x10] {
        assert_eq!(parse_header(&[0x81 | rsv], MAX).unwrap_err().code, 1002);
    }
}

#[test]
fn unknown_opcodes_are_refused_with_1002() {
    for op in [0x3, 0x4, 0x5, 0x6, 0x7, 0xB, 0xC, 0xD, 0xE, 0xF] {
        assert_eq!(code(&[frame(true, op, b"")]), 1002, "opcode {op:#x}");
    }
}

#[test]
fn control_frames_must_be_final_and_short() {
    for op in [0x8, 0x9, 0xA] {
        assert_eq!(code(&[frame(false, op, b"")]), 1002);
        assert_eq!(code(&[frame(true, op, &[b'a'; 126])]), 1002);
    }
    assert!(decode_all(&[frame(true, 0x9, &[b'a'; 125])]).is_ok());
}

#[test]
fn unmasked_frames_are_refused_with_1002() {
    assert_eq!(parse_header(&[0x81, 0x05], MAX).unwrap_err().code, 1002);
}

#[test]
fn a_64_bit_length_with_the_top_bit_set_is_refused_with_1002() {
    let mut bytes = vec![0x82, 0xFF, 0x80, 0, 0, 0, 0, 0, 0, 0];
    bytes.extend_from_slice(&KEY);
    assert_eq!(parse_header(&bytes, usize::MAX).unwrap_err().code, 1002);
    bytes[2] = 0x7F;
    assert_eq!(parse_header(&bytes, MAX).unwrap_err().code, 1009);
}

#[test]
fn a_payload_over_the_limit_is_refused_with_1009_from_its_header() {
    // Only the header: the payload never needs to arrive.
    let header = &frame(true, 0x1, &[b'a'; MAX + 1])[..8];
    assert_eq!(parse_header(header, MAX).unwrap_err().code, 1009);
    assert!(decode_all(&[frame(true, 0x1, &[b'a'; MAX])]).is_ok());
}

#[test]
fn a_fragmented_total_over_the_limit_is_refused_with_1009() {
    let frames = [
        frame(false, 0x1, &[b'a'; 600]),
        frame(true, 0x0, &[b'a'; 425]),
    ];
    assert_eq!(code(&frames), 1009);
    let mut decoder = Decoder::new(MAX);
    let mut first = frames[0].clone();
    assert!(matches!(decoder.decode(&mut first), Ok(Decoded::Frame(_))));
    // Refused from the second fragment's header alone.
    let mut header = frames[1][..8].to_vec();
    assert_eq!(decoder.decode(&mut header).unwrap_err().code, 1009);
}

#[test]
fn fragments_are_checked_in_order_with_control_frames_between() {
    let got = decode_all(&[
        frame(false, 0x1, b"ab"),
        frame(true, 0x9, b"ping"),
        frame(false, 0x0, b"cd"),
        frame(true, 0x0, b"ef"),
        frame(true, 0x1, b"next"),
    ])
    .unwrap();
    let opcodes: Vec<_> = got.iter().map(|(op, fin, _)| (*op, *fin)).collect();
    assert_eq!(
        opcodes,
        [
            (Opcode::Text, false),
            (Opcode::Ping, true),
            (Opcode::Continuation, false),
            (Opcode::Continuation, true),
            (Opcode::Text, true),
        ]
    );
}

#[test]
fn continuations_without_a_message_and_interleaved_messages_are_refused_with_1002() {
    assert_eq!(code(&[frame(true, 0x0, b"orphan")]), 1002);
    assert_eq!(
        code(&[frame(false, 0x1, b"a"), frame(true, 0x1, b"b")]),
        1002
    );
    assert_eq!(
        code(&[frame(false, 0x2, b"a"), frame(true, 0x1, b"b")]),
        1002
    );
    assert_eq!(
        code(&[frame(true, 0x1, b"a"), frame(true, 0x0, b"b")]),
        1002
    );
}

#[test]
fn invalid_close_payloads_are_refused() {
    assert_eq!(close_code(b""), Ok(None));
    assert_eq!(close_code(&[0x03, 0xE8, b'o', b'k']), Ok(Some(1000)));
    assert_eq!(close_code(&[0x0F, 0xA0]), Ok(Some(4000)));
    assert_eq!(close_code(&[3]).unwrap_err().code, 1002);
    for bad in [0, 999, 1004, 1005, 1006, 1014, 1015, 2999, 5000, 65535] {
        let payload = u16::to_be_bytes(bad);
        assert_eq!(close_code(&payload).unwrap_err().code, 1002, "code {bad}");
    }
    assert_eq!(close_code(&[0x03, 0xE8, 0xFF]).unwrap_err().code, 1007);
    assert_eq!(code(&[frame(true, 0x8, &[3])]), 1002);
}

#[test]
fn invalid_utf8_is_refused_with_1007_whole_or_fragmented() {
    assert_eq!(code(&[frame(true, 0x1, b"a\xFFb")]), 1007);
    // A character split over fragments is fine; one cut short at the end is not.
    let split = [
        frame(false, 0x1, b"\xF0"),
        frame(false, 0x0, b"\x9F\x98"),
        frame(true, 0x0, b"\x80!"),
    ];
    assert_eq!(decode_all(&split).unwrap()[2].2, b"\x80!");
    assert_eq!(
        code(&[frame(false, 0x1, b"\xC3"), frame(true, 0x0, b"x")]),
        1007
    );
    assert_eq!(
        code(&[frame(false, 0x1, b"ok"), frame(true, 0x0, b"\xE2\x82")]),
        1007
    );
    // Refused at the fragment that breaks it, before the message ends.
    let mut decoder = Decoder::new(MAX);
    let mut first = frame(false, 0x1, b"\xE0\x80");
    assert_eq!(decoder.decode(&mut first).unwrap_err().code, 1007);
    // Binary messages are not text.
    assert!(decode_all(&[frame(false, 0x2, b"\xFF"), frame(true, 0x0, b"\xFF")]).is_ok());
}

#[test]
fn arbitrary_bytes_never_panic() {
    let mut state = 0x2545_F491_4F6C_DD1Du64;
    for _ in 0..20_000 {
        let mut decoder = Decoder::new(64);
        let mut bytes: Vec<u8> = (0..24)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                state as u8
            })
            .collect();
        while let Ok(Decoded::Frame(h)) = decoder.decode(&mut bytes) {
            bytes.drain(..h.frame_len());
        }
    }
}
