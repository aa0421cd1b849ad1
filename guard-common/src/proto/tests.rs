use std::string::{String, ToString};
use std::vec::Vec;
use std::{format, vec};

use bytes::BytesMut;
use proptest::prelude::*;

use super::*;
use crate::addr::Prefix;
use crate::state::reason;

fn p(s: &str) -> Prefix {
    s.parse().unwrap()
}

fn requests() -> Vec<Request> {
    vec![
        Request::Hello {
            version: PROTO_VERSION,
            client_name: "chat-app".into(),
        },
        Request::Hello {
            version: u16::MAX,
            client_name: String::new(),
        },
        Request::Block(BlockRequest {
            prefix: p("198.18.0.0/24"),
            ttl_secs: 600,
            reason: reason::MESSAGE_FLOOD,
            detected_at_unix_ns: 1_700_000_000_123_456_789,
            detail: "412 msgs/s on /ws/chat — über the cap".into(),
        }),
        Request::Block(BlockRequest {
            prefix: p("2001:2::/48"),
            ttl_secs: 0,
            reason: reason::OTHER,
            detected_at_unix_ns: 0,
            detail: "x".repeat(MAX_DETAIL_LEN),
        }),
        Request::Unblock {
            prefix: p("198.18.0.7"),
        },
        Request::ListBlocks {
            offset: 10,
            limit: MAX_LIST_ENTRIES,
        },
        Request::Allow { prefix: p("::/0") },
        Request::Disallow {
            prefix: p("2001:db8::1"),
        },
        Request::ListAllows,
        Request::Stats,
        Request::GetConfig,
        Request::SetConfig {
            changes: vec![
                ("syn_rate".into(), "50".into()),
                ("dry_run".into(), "true".into()),
            ],
        },
        Request::SetConfig { changes: vec![] },
        Request::History {
            since_unix_secs: 1_700_000_000,
            prefix: Some(p("198.18.0.0/16")),
            limit: 100,
        },
        Request::History {
            since_unix_secs: 0,
            prefix: None,
            limit: 0,
        },
        Request::Escalation {
            prefix: p("198.18.0.3"),
        },
    ]
}

fn responses() -> Vec<Response> {
    vec![
        Response::HelloOk {
            version: PROTO_VERSION,
            agent_version: "0.1.0".into(),
        },
        Response::Ok,
        Response::BlockResult {
            outcome: BlockOutcome::Added,
            reason_text: "blocked for 600 s".into(),
            expires_in_secs: 600,
        },
        Response::BlockResult {
            outcome: BlockOutcome::Merged,
            reason_text: String::new(),
            expires_in_secs: 0,
        },
        Response::BlockResult {
            outcome: BlockOutcome::Refused,
            reason_text: "198.18.0.7/32 is allowlisted".into(),
            expires_in_secs: 0,
        },
        Response::Blocks {
            total: 12345,
            entries: vec![
                BlockInfo {
                    prefix: p("198.18.0.0/24"),
                    reason: reason::CONNECTION_FLOOD,
                    expires_in_secs: 30,
                    origin: "chat-app".into(),
                },
                BlockInfo {
                    prefix: p("2001:2::/64"),
                    reason: reason::OPERATOR,
                    expires_in_secs: 0,
                    origin: "operator".into(),
                },
            ],
        },
        Response::Blocks {
            total: 0,
            entries: vec![],
        },
        Response::Allows {
            entries: vec![p("10.0.0.0/8"), p("::1")],
        },
        Response::Stats {
            counters: vec![("drop_blocked".into(), u64::MAX), ("packets".into(), 0)],
        },
        Response::Config {
            entries: vec![("syn_rate".into(), "20".into())],
        },
        Response::History {
            lines: vec![
                "2026-01-01T00:00:00Z block 198.18.0.0/24".into(),
                String::new(),
            ],
        },
        Response::Escalation {
            tracked: true,
            strikes: 3,
            streak_secs: u32::MAX,
        },
        Response::Escalation {
            tracked: false,
            strikes: 0,
            streak_secs: 0,
        },
        Response::Error {
            code: ErrorCode::BadVersion,
            message: "agent speaks protocol 1".into(),
        },
        Response::Error {
            code: ErrorCode::Other(999),
            message: String::new(),
        },
    ]
}

fn all_messages() -> Vec<Message> {
    requests()
        .into_iter()
        .map(Message::from)
        .chain(responses().into_iter().map(Message::from))
        .collect()
}

fn frame(msg: &Message) -> Vec<u8> {
    let mut buf = BytesMut::new();
    encode(msg, &mut buf).unwrap();
    buf.to_vec()
}

/// A frame with the given body (type byte + payload) and a matching header.
fn raw_frame(body: &[u8]) -> Vec<u8> {
    let mut v = (body.len() as u32).to_be_bytes().to_vec();
    v.extend_from_slice(body);
    v
}

#[test]
fn every_message_round_trips() {
    let mut seen_types = std::collections::BTreeSet::new();
    for msg in all_messages() {
        let bytes = frame(&msg);
        seen_types.insert(bytes[HEADER_LEN]);
        assert_eq!(
            u32::from_be_bytes(bytes[..4].try_into().unwrap()) as usize,
            bytes.len() - HEADER_LEN
        );
        let (back, used) = decode_frame(&bytes).unwrap().unwrap();
        assert_eq!(back, msg);
        assert_eq!(used, bytes.len());
    }
    // 12 request kinds and 10 response kinds, each covered above.
    assert_eq!(seen_types.len(), 22);
}

#[test]
fn every_truncation_needs_more_bytes() {
    for msg in all_messages() {
        let bytes = frame(&msg);
        for cut in 0..bytes.len() {
            assert_eq!(
                decode_frame(&bytes[..cut]),
                Ok(None),
                "{msg:?} cut at {cut}"
            );
        }
    }
}

#[test]
fn every_truncated_body_with_a_consistent_header_is_an_error() {
    for msg in all_messages() {
        let bytes = frame(&msg);
        let body = &bytes[HEADER_LEN..];
        for cut in 0..body.len() {
            let short = raw_frame(&body[..cut]);
            assert!(
                decode_frame(&short).is_err(),
                "{msg:?} with its body cut at {cut} decoded"
            );
        }
    }
}

#[test]
fn a_stream_fed_byte_by_byte_yields_every_message_in_order() {
    let msgs = all_messages();
    let stream: Vec<u8> = msgs.iter().flat_map(frame).collect();
    let mut dec = FrameDecoder::new();
    let mut out = Vec::new();
    for b in &stream {
        dec.feed(std::slice::from_ref(b));
        while let Some(m) = dec.decode().unwrap() {
            out.push(m);
        }
    }
    assert_eq!(out, msgs);
    assert_eq!(dec.buffered(), 0);
}

#[test]
fn a_stream_fed_at_once_yields_every_message() {
    let msgs = all_messages();
    let stream: Vec<u8> = msgs.iter().flat_map(frame).collect();
    let mut dec = FrameDecoder::new();
    dec.feed(&stream);
    let mut out = Vec::new();
    while let Some(m) = dec.decode().unwrap() {
        out.push(m);
    }
    assert_eq!(out, msgs);
}

#[test]
fn oversized_length_is_refused_from_the_header_alone() {
    let header = ((MAX_FRAME + 1) as u32).to_be_bytes();
    assert_eq!(
        decode_frame(&header),
        Err(ProtoError::FrameTooLarge {
            len: MAX_FRAME + 1,
            max: MAX_FRAME
        })
    );
    let mut dec = FrameDecoder::new();
    dec.feed(&u32::MAX.to_be_bytes());
    let err = dec.decode().unwrap_err();
    assert_eq!(err.code(), ErrorCode::TooLarge);
    // The decoder did not make room for the announced frame.
    assert!(dec.capacity() < 1024);
    // And the error sticks: the stream cannot be resynchronised.
    assert_eq!(dec.decode().unwrap_err(), err);
}

#[test]
fn a_frame_of_exactly_max_size_is_accepted() {
    // A history reply padded to exactly MAX_FRAME bytes of type + payload.
    let fixed = 1 + 4 + 2;
    let line = "a".repeat(MAX_FRAME - fixed);
    let msg = Message::Response(Response::History { lines: vec![line] });
    let bytes = frame(&msg);
    assert_eq!(bytes.len(), HEADER_LEN + MAX_FRAME);
    assert_eq!(decode_frame(&bytes).unwrap().unwrap().0, msg);
}

#[test]
fn encoding_too_much_fails_and_leaves_the_buffer_alone() {
    let entries = (0..MAX_FRAME as u32)
        .map(|i| Prefix::new(crate::addr::v4_mapped(i.to_be_bytes()), 128))
        .collect();
    let mut buf = BytesMut::from(&b"keep"[..]);
    let err = Response::Allows { entries }.encode(&mut buf).unwrap_err();
    assert!(matches!(err, ProtoError::FrameTooLarge { .. }), "{err}");
    assert_eq!(&buf[..], b"keep");

    let long = Request::Block(BlockRequest {
        prefix: p("198.18.0.1"),
        ttl_secs: 0,
        reason: 0,
        detected_at_unix_ns: 0,
        detail: "x".repeat(MAX_DETAIL_LEN + 1),
    });
    assert!(matches!(
        long.encode(&mut buf),
        Err(ProtoError::StringTooLong {
            field: "detail",
            ..
        })
    ));
    assert_eq!(&buf[..], b"keep");
}

#[test]
fn a_full_page_of_blocks_fits_in_a_frame() {
    let entries = (0..MAX_LIST_ENTRIES)
        .map(|i| BlockInfo {
            prefix: Prefix::new(crate::addr::v4_mapped(i.to_be_bytes()), 128),
            reason: reason::OTHER,
            expires_in_secs: u32::MAX,
            origin: "o".repeat(MAX_ORIGIN_LEN),
        })
        .collect();
    let mut buf = BytesMut::new();
    Response::Blocks {
        total: u64::MAX,
        entries,
    }
    .encode(&mut buf)
    .unwrap();
}

#[test]
fn malformed_bodies_are_specific_errors() {
    let prefix_body = |addr: [u8; 16], len: u8| {
        let mut b = vec![0x03];
        b.extend_from_slice(&addr);
        b.push(len);
        raw_frame(&b)
    };
    assert_eq!(
        decode_frame(&prefix_body([0; 16], 129)),
        Err(ProtoError::BadPrefixLen(129))
    );
    assert_eq!(
        decode_frame(&prefix_body([0xff; 16], 8)),
        Err(ProtoError::HostBitsSet)
    );
    assert_eq!(decode_frame(&[0, 0, 0, 0]), Err(ProtoError::EmptyFrame));
    assert_eq!(
        decode_frame(&raw_frame(&[0x42])),
        Err(ProtoError::UnknownType(0x42))
    );
    assert!(matches!(
        decode_frame(&raw_frame(&[0x82, 0])),
        Err(ProtoError::TrailingBytes { extra: 1, .. })
    ));
    // Hello with a 2-byte name that is not UTF-8.
    assert_eq!(
        decode_frame(&raw_frame(&[0x01, 0, 1, 0, 2, 0xc3, 0x28])),
        Err(ProtoError::BadUtf8 {
            field: "client_name"
        })
    );
    // A block result with an outcome no build knows.
    assert_eq!(
        decode_frame(&raw_frame(&[0x83, 7, 0, 0, 0, 0, 0, 0])),
        Err(ProtoError::BadTag {
            field: "outcome",
            value: 7
        })
    );
    // A history request whose prefix tag is neither 0 nor 1.
    let mut h = vec![0x0b];
    h.extend_from_slice(&[0; 8]);
    h.push(2);
    h.extend_from_slice(&[0; 4]);
    assert!(matches!(
        decode_frame(&raw_frame(&h)),
        Err(ProtoError::BadTag {
            field: "prefix tag",
            value: 2
        })
    ));
    // A hello with a name over the limit.
    let mut name = vec![0x01, 0, 1];
    name.extend_from_slice(&((MAX_NAME_LEN + 1) as u16).to_be_bytes());
    name.extend(std::iter::repeat_n(b'a', MAX_NAME_LEN + 1));
    assert!(matches!(
        decode_frame(&raw_frame(&name)),
        Err(ProtoError::StringTooLong {
            field: "client_name",
            ..
        })
    ));
}

#[test]
fn list_counts_are_bounded_by_the_bytes_present() {
    // A history reply claiming 4 billion lines in a 5-byte body.
    let body = [0x88, 0xff, 0xff, 0xff, 0xff];
    assert_eq!(
        decode_frame(&raw_frame(&body)),
        Err(ProtoError::CountTooLarge {
            field: "lines",
            count: u32::MAX.into()
        })
    );
    // Two empty lines need four bytes; three claimed with four present.
    let body = [0x88, 0, 0, 0, 3, 0, 0, 0, 0];
    assert!(matches!(
        decode_frame(&raw_frame(&body)),
        Err(ProtoError::CountTooLarge { count: 3, .. })
    ));
    let body = [0x88, 0, 0, 0, 2, 0, 0, 0, 0];
    assert_eq!(
        decode_frame(&raw_frame(&body)).unwrap().unwrap().0,
        Message::Response(Response::History {
            lines: vec![String::new(), String::new()]
        })
    );
}

#[test]
fn a_bad_payload_is_consumed_and_the_next_frame_still_decodes() {
    let mut dec = FrameDecoder::new();
    dec.feed(&raw_frame(&[0x42, 1, 2, 3]));
    dec.feed(&frame(&Message::Request(Request::Stats)));
    assert_eq!(dec.decode(), Err(ProtoError::UnknownType(0x42)));
    assert_eq!(dec.decode(), Ok(Some(Message::Request(Request::Stats))));
    assert_eq!(dec.decode(), Ok(None));
}

#[test]
fn error_codes_map_to_the_reply_an_agent_sends() {
    assert_eq!(ProtoError::EmptyFrame.code(), ErrorCode::BadFrame);
    assert_eq!(ProtoError::UnknownType(9).code(), ErrorCode::UnknownType);
    assert_eq!(ProtoError::HostBitsSet.code(), ErrorCode::Invalid);
    for code in 0..=u16::MAX {
        assert_eq!(ErrorCode::from_u16(code).to_u16(), code);
    }
    assert_eq!(ErrorCode::Other(400).to_string(), "error 400");
    assert_eq!(ErrorCode::NotPermitted.to_string(), "not_permitted");
}

#[test]
fn request_names_follow_their_kinds() {
    for r in requests() {
        assert_eq!(Request::KINDS[r.kind_index()], r.name());
    }
    assert_eq!(Request::Stats.name(), "stats");
    assert_eq!(
        Request::History {
            since_unix_secs: 0,
            prefix: None,
            limit: 0
        }
        .name(),
        "history"
    );
}

#[test]
fn cap_str_cuts_on_a_character_boundary() {
    assert_eq!(cap_str("abc", 5), "abc");
    assert_eq!(cap_str("abc", 2), "ab");
    // 'ü' is two bytes: cutting inside it drops it whole.
    assert_eq!(cap_str("aü", 2), "a");
    assert_eq!(cap_str("aü", 3), "aü");
    assert_eq!(cap_str("", 0), "");
    assert_eq!(cap_str("ü", 0), "");
}

fn arb_prefix() -> impl Strategy<Value = Prefix> {
    (any::<[u8; 16]>(), 0u32..=128).prop_map(|(a, l)| Prefix::new(a, l))
}

fn arb_text(max: usize) -> impl Strategy<Value = String> {
    proptest::collection::vec(any::<char>(), 0..8)
        .prop_map(move |cs| cap_str(&cs.into_iter().collect::<String>(), max).to_string())
}

fn arb_message() -> impl Strategy<Value = Message> {
    let pairs = || proptest::collection::vec((arb_text(100), arb_text(100)), 0..5);
    prop_oneof![
        (any::<u16>(), arb_text(MAX_NAME_LEN)).prop_map(|(version, client_name)| {
            Request::Hello {
                version,
                client_name,
            }
            .into()
        }),
        (
            arb_prefix(),
            any::<u32>(),
            any::<u32>(),
            any::<u64>(),
            arb_text(MAX_DETAIL_LEN)
        )
            .prop_map(|(prefix, ttl_secs, reason, detected_at_unix_ns, detail)| {
                Message::Request(
                    BlockRequest {
                        prefix,
                        ttl_secs,
                        reason,
                        detected_at_unix_ns,
                        detail,
                    }
                    .into(),
                )
            }),
        pairs().prop_map(|changes| Request::SetConfig { changes }.into()),
        arb_prefix().prop_map(|prefix| Request::Escalation { prefix }.into()),
        (
            any::<u64>(),
            proptest::option::of(arb_prefix()),
            any::<u32>()
        )
            .prop_map(|(since_unix_secs, prefix, limit)| Request::History {
                since_unix_secs,
                prefix,
                limit,
            }
            .into()),
        (
            any::<u64>(),
            proptest::collection::vec(
                (
                    arb_prefix(),
                    any::<u32>(),
                    any::<u32>(),
                    arb_text(MAX_ORIGIN_LEN)
                ),
                0..5
            )
        )
            .prop_map(|(total, es)| Response::Blocks {
                total,
                entries: es
                    .into_iter()
                    .map(|(prefix, reason, expires_in_secs, origin)| BlockInfo {
                        prefix,
                        reason,
                        expires_in_secs,
                        origin,
                    })
                    .collect(),
            }
            .into()),
        proptest::collection::vec(arb_prefix(), 0..5)
            .prop_map(|entries| Response::Allows { entries }.into()),
        proptest::collection::vec((arb_text(50), any::<u64>()), 0..5)
            .prop_map(|counters| Response::Stats { counters }.into()),
        pairs().prop_map(|entries| Response::Config { entries }.into()),
        (any::<bool>(), any::<u32>(), any::<u32>()).prop_map(|(tracked, strikes, streak_secs)| {
            Response::Escalation {
                tracked,
                strikes,
                streak_secs,
            }
            .into()
        }),
        (any::<u16>(), arb_text(200)).prop_map(|(code, message)| Response::Error {
            code: ErrorCode::from_u16(code),
            message,
        }
        .into()),
    ]
}

proptest! {
    #[test]
    fn arbitrary_bytes_never_panic_the_decoder(
        chunks in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..64), 0..16)
    ) {
        let mut dec = FrameDecoder::new();
        for chunk in &chunks {
            dec.feed(chunk);
            // Bounded: a decoder that keeps failing is abandoned, as a server would.
            for _ in 0..8 {
                match dec.decode() {
                    Ok(Some(_)) => {}
                    Ok(None) | Err(_) => break,
                }
            }
            prop_assert!(dec.buffered() <= chunks.iter().map(Vec::len).sum::<usize>());
        }
    }

    #[test]
    fn arbitrary_bodies_behind_a_valid_header_never_panic(
        ty in any::<u8>(),
        body in proptest::collection::vec(any::<u8>(), 0..300),
    ) {
        let mut b = vec![ty];
        b.extend_from_slice(&body);
        let bytes = raw_frame(&b);
        match decode_frame(&bytes) {
            // Whatever decodes must re-encode to the same bytes: the wire
            // form is canonical.
            Ok(Some((msg, used))) => {
                prop_assert_eq!(used, bytes.len());
                prop_assert_eq!(frame(&msg), bytes);
            }
            Ok(None) => prop_assert!(false, "a complete frame asked for more"),
            Err(e) => { let _ = format!("{e}"); }
        }
    }

    #[test]
    fn arbitrary_messages_round_trip(msg in arb_message()) {
        let bytes = frame(&msg);
        let (back, used) = decode_frame(&bytes).unwrap().unwrap();
        prop_assert_eq!(used, bytes.len());
        prop_assert_eq!(back, msg);
    }
}

proptest! {
    #[test]
    fn a_page_is_that_slice_of_the_sorted_list(
        mut items in proptest::collection::vec(0u16..500, 0..300),
        offset in 0usize..320,
        limit in 0usize..320,
    ) {
        let mut sorted = items.clone();
        sorted.sort_unstable();
        let n = sorted.len();
        let want = &sorted[offset.min(n)..offset.saturating_add(limit).min(n)];
        prop_assert_eq!(page_sorted(&mut items, offset, limit), want);
    }
}

#[test]
fn a_page_past_the_end_is_empty() {
    let mut items = vec![3, 1, 2];
    assert!(page_sorted(&mut items, 3, 10).is_empty());
    assert!(page_sorted(&mut items, usize::MAX, usize::MAX).is_empty());
    assert_eq!(page_sorted(&mut items, 1, usize::MAX), [2, 3]);
    assert!(page_sorted(&mut items, 0, 0).is_empty());
}

fn history_frame_len(lines: &[String]) -> usize {
    let mut out = BytesMut::new();
    Response::History {
        lines: lines.to_vec(),
    }
    .encode(&mut out)
    .expect("fits a frame");
    out.len() - HEADER_LEN
}

#[test]
fn history_keeps_the_newest_lines_that_fit_one_frame() {
    let lines: Vec<String> = (0..1000)
        .map(|i| format!("{i:04}{}", "x".repeat(296)))
        .collect();
    // Within the limit.
    let kept = newest_history_lines(lines.clone(), 10);
    assert_eq!(kept, lines[990..]);
    // Within the frame: 500 lines of 300 bytes do not fit 64 KiB.
    let kept = newest_history_lines(lines.clone(), 500);
    let n = kept.len();
    assert!(n < 500 && n > 100, "{n}");
    assert_eq!(kept, lines[1000 - n..], "the newest, in order");
    assert!(history_frame_len(&kept) <= MAX_FRAME);
    let one_more = &lines[1000 - n - 1..];
    let mut out = BytesMut::new();
    assert!(
        Response::History {
            lines: one_more.to_vec()
        }
        .encode(&mut out)
        .is_err(),
        "as many as fit"
    );
    // A line no frame can carry is left out, not the reply.
    let mut odd = vec!["old".to_string(), "y".repeat(70_000), "new".to_string()];
    odd = newest_history_lines(odd, 500);
    assert_eq!(odd, ["old", "new"]);
    assert!(newest_history_lines(lines, 0).is_empty());
}

#[test]
fn an_escalation_reply_with_a_bad_tracked_flag_is_refused() {
    let mut body = vec![0x89, 2];
    body.extend_from_slice(&[0; 8]);
    assert_eq!(
        decode_frame(&raw_frame(&body)),
        Err(ProtoError::BadTag {
            field: "tracked",
            value: 2
        })
    );
}
