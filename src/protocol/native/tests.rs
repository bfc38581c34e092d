//! The native codec's tests: requests decoded and refused with stable codes, frames encoded once.

use super::*;

fn code(payload: &str) -> ErrorCode {
    decode(payload.as_bytes(), 10).unwrap_err().code
}

#[test]
fn search_requests_are_bounded() {
    assert_eq!(
        decode(
            br#"{"type":"search","room":"dev","query":"a \"b\" -c"}"#,
            10
        )
        .unwrap(),
        Request::Search {
            room: RoomName::new("dev").unwrap(),
            query: "a \"b\" -c".into(),
            cursor: None,
            limit: 20,
        }
    );
    for bad in [
        r#"{"type":"search","room":"dev"}"#,
        r#"{"type":"search","room":"dev","query":"  "}"#,
        r#"{"type":"search","room":"dev","query":"x","limit":51}"#,
        r#"{"type":"search","room":"dev","query":"x","limit":0}"#,
    ] {
        assert_eq!(code(bad), ErrorCode::BadField, "{bad}");
    }
    let long = format!(
        r#"{{"type":"search","room":"dev","query":"{}"}}"#,
        "é".repeat(257)
    );
    assert_eq!(code(&long), ErrorCode::BadField);
}

#[test]
fn decodes_each_request() {
    assert_eq!(
        decode(br#"{"type":"send","message":"hi","ref":"c-1"}"#, 10).unwrap(),
        Request::Send {
            room: None,
            message: "hi".into(),
            reference: Some("c-1".into())
        }
    );
    let room = RoomName::new("dev").unwrap();
    assert_eq!(
        decode(br#"{"type":"join","room":"dev"}"#, 10).unwrap(),
        Request::Join {
            room: RoomRef::Named(room.clone()),
            since: None,
            presence: false
        }
    );
    assert_eq!(
        decode(
            br#"{"type":"join","room":"dev","since":7,"epoch":"ab1"}"#,
            10
        )
        .unwrap(),
        Request::Join {
            room: RoomRef::Named(room.clone()),
            since: Some(Since {
                id: 7,
                epoch: "ab1".into()
            }),
            presence: false
        }
    );
    assert_eq!(
        decode(br#"{"type":"history","room":"dev","before":9}"#, 10).unwrap(),
        Request::History {
            room: room.clone(),
            before: Some(9),
            limit: 50
        }
    );
    assert_eq!(
        decode(br#"{"type":"leave","room":"dev","extra":1}"#, 10).unwrap(),
        Request::Leave { room }
    );
}

#[test]
fn refuses_bad_frames_with_stable_codes() {
    assert_eq!(code("nope"), ErrorCode::BadJson);
    assert_eq!(code("[1]"), ErrorCode::BadJson);
    assert_eq!(code(r#"{"message":"hi"}"#), ErrorCode::BadField);
    assert_eq!(code(r#"{"type":7}"#), ErrorCode::BadField);
    assert_eq!(code(r#"{"type":"shout"}"#), ErrorCode::UnknownType);
    assert_eq!(code(r#"{"type":"send"}"#), ErrorCode::BadField);
    assert_eq!(code(r#"{"type":"send","message":5}"#), ErrorCode::BadField);
    assert_eq!(
        code(r#"{"type":"send","message":"  "}"#),
        ErrorCode::EmptyMessage
    );
    assert_eq!(
        code(r#"{"type":"send","message":"12345678901"}"#),
        ErrorCode::MessageTooLong
    );
    assert_eq!(code(r#"{"type":"join","room":"a b"}"#), ErrorCode::BadRoom);
    assert_eq!(code(r#"{"type":"join"}"#), ErrorCode::BadField);
    assert_eq!(
        code(r#"{"type":"join","room":"a","since":3}"#),
        ErrorCode::BadField
    );
    assert_eq!(
        code(r#"{"type":"join","room":"a","since":-1,"epoch":"e"}"#),
        ErrorCode::BadField
    );
    assert_eq!(
        code(r#"{"type":"join","room":"a","since":1,"epoch":"e\"}"}"#),
        ErrorCode::BadField
    );
    assert_eq!(
        code(r#"{"type":"history","room":"a","limit":101}"#),
        ErrorCode::BadField
    );
    let long_ref = format!(
        r#"{{"type":"send","message":"x","ref":"{}"}}"#,
        "r".repeat(65)
    );
    assert_eq!(code(&long_ref), ErrorCode::BadRef);
}

#[test]
fn errors_echo_the_ref() {
    let err = decode(br#"{"type":"send","message":"","ref":"c-9"}"#, 10).unwrap_err();
    assert_eq!(err.reference.as_deref(), Some("c-9"));
}

#[test]
fn message_counts_characters_not_bytes() {
    assert!(decode(r#"{"type":"send","message":"éééééééééé"}"#.as_bytes(), 10).is_ok());
}

#[test]
fn message_frame_is_valid_json_with_the_id() {
    let room = RoomName::new("general").unwrap();
    let t = MessageTemplate::new(&room, "al\"ice", 1_764_288_000_000, "hi <b>\n");
    let frame = t.frame(17, "e1");
    let v: Value = serde_json::from_slice(&frame[2..]).unwrap();
    assert_eq!(
        v,
        serde_json::json!({"type":"message","room":"general","id":17,"epoch":"e1",
            "user":"al\"ice","ts":1_764_288_000_000u64,"message":"hi <b>\n"})
    );
}

#[test]
fn replies_are_tagged_objects() {
    let room = RoomName::new("dev").unwrap();
    let frame = Reply::Ack {
        reference: None,
        room: &room,
        id: 3,
        duplicate: false,
    }
    .frame();
    assert_eq!(&frame[2..], br#"{"type":"ack","room":"dev","id":3}"#);
    let draft = super::super::message::Draft::new(room.clone(), "ann".into(), 5, "hi".into());
    let message = Arc::new(draft.accept(1, "e1".into()));
    let page = history_frame(&room, "e1", &[message], true);
    let v: Value = serde_json::from_slice(&ws::text_payload(&page)).unwrap();
    assert_eq!(
        v,
        serde_json::json!({"type":"history","room":"dev","epoch":"e1",
            "messages":[{"type":"message","room":"dev","id":1,"epoch":"e1","user":"ann",
                "ts":5,"message":"hi"}],"more":true})
    );
}

#[test]
fn a_search_page_is_the_same_object_in_both_encodings() {
    let room = RoomName::new("dev").unwrap();
    let message = Arc::new(
        super::super::message::Draft::new(room.clone(), "ann".into(), 5, "a \"q\"".into())
            .accept(3, "e1".into()),
    );
    let frame = search_frame(&room, "q", std::slice::from_ref(&message), Some("5.3.e1"));
    let native: Value = serde_json::from_slice(&ws::text_payload(&frame)).unwrap();
    let json = search_json(&room, "q", &[message], Some("5.3.e1"));
    let mut acked: Value = serde_json::from_slice(&json).unwrap();
    assert_eq!(acked["messages"][0]["message"], "a \"q\"");
    assert_eq!(acked["cursor"], "5.3.e1");
    acked["type"] = "search".into();
    assert_eq!(acked, native);
    let last = search_json(&room, "q", &[], None);
    assert_eq!(
        std::str::from_utf8(&last).unwrap(),
        r#"{"room":"dev","query":"q","messages":[],"cursor":null}"#
    );
}
