#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
//! Malformed and hostile input: the decoder and the engine must never panic, never allocate
//! more than the input (bounded by frame_max) justifies, and the engine must close the
//! connection, telling the server why, on any error.

use std::collections::VecDeque;
use std::time::Instant;

use bytes::{BufMut, Bytes, BytesMut};
use kelp_amqp::codec::*;
use kelp_amqp::engine::{Config, Engine, Event};
use kelp_amqp::Error;
use proptest::prelude::*;

const FRAME_MAX: u32 = 131_072;

// ----- helpers ---------------------------------------------------------------------------------

fn frame(kind: u8, channel: u16, payload: &[u8]) -> Vec<u8> {
    let mut v = vec![kind];
    v.extend_from_slice(&channel.to_be_bytes());
    v.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    v.extend_from_slice(payload);
    v.push(FRAME_END);
    v
}

fn mframe(channel: u16, m: impl Into<Method>) -> Vec<u8> {
    let mut b = BytesMut::new();
    encode_method(&mut b, channel, &m.into(), 0).unwrap();
    b.to_vec()
}

fn hframe(channel: u16, size: u64, p: &BasicProperties) -> Vec<u8> {
    let mut b = BytesMut::new();
    encode_header(&mut b, channel, size, p, 0).unwrap();
    b.to_vec()
}

fn bframe(channel: u16, payload: &[u8]) -> Vec<u8> {
    frame(FRAME_BODY, channel, payload)
}

fn decode_one(bytes: &[u8]) -> Result<Option<Frame>, DecodeError> {
    decode_frame(&mut BytesMut::from(bytes), FRAME_MAX)
}

fn method_payload(m: impl Into<Method>) -> Vec<u8> {
    m.into().to_bytes().unwrap().to_vec()
}

/// Peak virtual memory of this process in KiB (Linux), to catch huge reservations that never
/// touch their pages.
fn vm_peak_kib() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = s.lines().find(|l| l.starts_with("VmPeak:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

fn assert_no_huge_allocation(f: impl FnOnce()) {
    let before = vm_peak_kib();
    f();
    if let (Some(b), Some(a)) = (before, vm_peak_kib()) {
        assert!(
            a.saturating_sub(b) < 1 << 20,
            "virtual memory peak grew by {} MiB",
            (a - b) >> 10
        );
    }
}

/// A table value holding `depth` nested tables: {"a": {"a": … {} …}}, as raw bytes
/// (length-prefixed, like a method argument).
fn nested_tables(depth: usize) -> Vec<u8> {
    let mut t = vec![0, 0, 0, 0];
    for _ in 0..depth {
        let mut entry = vec![1, b'a', b'F'];
        entry.extend_from_slice(&t);
        t = (entry.len() as u32).to_be_bytes().to_vec();
        t.extend_from_slice(&entry);
    }
    t
}

/// A table {"a": [[[ … ]]]} with `depth` nested arrays.
fn nested_arrays(depth: usize) -> Vec<u8> {
    let mut a: Vec<u8> = Vec::new(); // items of the innermost array: none
    for _ in 0..depth {
        let mut v = vec![b'A'];
        v.extend_from_slice(&(a.len() as u32).to_be_bytes());
        v.extend_from_slice(&a);
        a = v;
    }
    let mut entry = vec![1, b'a'];
    entry.extend_from_slice(&a);
    let mut t = (entry.len() as u32).to_be_bytes().to_vec();
    t.extend_from_slice(&entry);
    t
}

/// connection.start with `table` as its server_properties.
fn start_with_table(table: &[u8]) -> Vec<u8> {
    let mut p = vec![0, 10, 0, 10, 0, 9];
    p.extend_from_slice(table);
    p.extend_from_slice(&[0, 0, 0, 5]);
    p.extend_from_slice(b"PLAIN");
    p.extend_from_slice(&[0, 0, 0, 5]);
    p.extend_from_slice(b"en_US");
    frame(FRAME_METHOD, 0, &p)
}

fn valid_frames() -> Vec<Vec<u8>> {
    let props = BasicProperties::default()
        .with_content_type("application/json")
        .with_headers(FieldTable::new().with("n", 1i64).with("s", "str").with(
            "t",
            FieldValue::Table(FieldTable::new().with(
                "arr",
                FieldValue::Array(vec![FieldValue::F64(1.5), FieldValue::Void]),
            )),
        ))
        .with_timestamp(1_700_000_000u64);
    vec![
        mframe(
            0,
            ConnectionTune {
                channel_max: 2047,
                frame_max: FRAME_MAX,
                heartbeat: 60,
            },
        ),
        mframe(
            1,
            QueueDeclare {
                queue: "q".into(),
                durable: true,
                arguments: FieldTable::new().with("x-max-length", 10i32),
                ..Default::default()
            },
        ),
        mframe(
            1,
            BasicDeliver {
                consumer_tag: "ctag".into(),
                delivery_tag: 7,
                redelivered: true,
                exchange: "ex".into(),
                routing_key: "rk".into(),
            },
        ),
        hframe(1, 5, &props),
        bframe(1, b"hello"),
        vec![8, 0, 0, 0, 0, 0, 0, 0xCE],
        mframe(
            0,
            ConnectionClose {
                reply_code: 320,
                reply_text: "bye".into(),
                class_id: 0,
                method_id: 0,
            },
        ),
    ]
}

// ----- truncation ------------------------------------------------------------------------------

#[test]
fn every_prefix_of_a_valid_frame_waits_for_more() {
    for f in valid_frames() {
        assert!(matches!(decode_one(&f), Ok(Some(_))));
        for n in 0..f.len() {
            let mut buf = BytesMut::from(&f[..n]);
            let r = decode_frame(&mut buf, FRAME_MAX);
            assert!(matches!(r, Ok(None)), "prefix {n} of {f:?}: {r:?}");
            assert_eq!(buf.len(), n, "a partial frame was consumed");
        }
    }
}

#[test]
fn every_truncated_payload_is_an_error() {
    // A complete frame whose payload is cut short (the frame size says so).
    for f in valid_frames() {
        let kind = f[0];
        if kind == FRAME_BODY || kind == FRAME_HEARTBEAT {
            continue;
        }
        let payload = &f[7..f.len() - 1];
        for n in 0..payload.len() {
            let r = decode_one(&frame(kind, 1, &payload[..n]));
            assert!(
                matches!(r, Err(DecodeError::Truncated { .. })),
                "payload cut to {n} of {payload:?}: {r:?}"
            );
        }
    }
}

// ----- framing errors --------------------------------------------------------------------------

#[test]
fn frame_over_frame_max_is_rejected_from_its_header() {
    let mut buf = BytesMut::new();
    buf.put_u8(FRAME_BODY);
    buf.put_u16(1);
    buf.put_u32(FRAME_MAX); // + 8 bytes of framing > frame_max
    assert_no_huge_allocation(|| {
        let r = decode_frame(&mut buf, FRAME_MAX);
        assert_eq!(
            r,
            Err(DecodeError::FrameTooLarge {
                size: u64::from(FRAME_MAX) + 8,
                frame_max: FRAME_MAX
            })
        );
    });
    assert!(
        buf.capacity() < 4096,
        "reserved {} bytes for a rejected frame",
        buf.capacity()
    );

    // 4 GiB claimed.
    let mut buf = BytesMut::from(&[FRAME_METHOD, 0, 0, 0xFF, 0xFF, 0xFF, 0xFF][..]);
    assert_no_huge_allocation(|| {
        assert!(matches!(
            decode_frame(&mut buf, FRAME_MAX),
            Err(DecodeError::FrameTooLarge { size, .. }) if size == u64::from(u32::MAX) + 8
        ));
    });

    // Exactly frame_max is fine: it waits for the payload.
    let mut buf = BytesMut::new();
    buf.put_u8(FRAME_BODY);
    buf.put_u16(1);
    buf.put_u32(FRAME_MAX - 8);
    assert_eq!(decode_frame(&mut buf, FRAME_MAX), Ok(None));
}

#[test]
fn unlimited_frame_max_does_not_reserve_the_announced_size() {
    let mut buf = BytesMut::from(&[FRAME_BODY, 0, 1, 0xFF, 0xFF, 0xFF, 0xF0][..]);
    assert_no_huge_allocation(|| {
        assert_eq!(decode_frame(&mut buf, 0), Ok(None));
    });
    assert!(
        buf.capacity() < 1 << 24,
        "reserved {} bytes",
        buf.capacity()
    );
}

#[test]
fn wrong_frame_end_octet() {
    let mut f = mframe(0, ConnectionOpenOk::default());
    let last = f.len() - 1;
    f[last] = 0x00;
    assert_eq!(decode_one(&f), Err(DecodeError::BadFrameEnd(0x00)));
    assert_eq!(
        decode_one(&[8, 0, 0, 0, 0, 0, 0, 0xCF]),
        Err(DecodeError::BadFrameEnd(0xCF))
    );
}

#[test]
fn unknown_frame_types() {
    for kind in [0u8, 4, 5, 7, 9, 0x41 + 1, 0xFF] {
        assert_eq!(
            decode_one(&frame(kind, 0, &[])),
            Err(DecodeError::UnknownFrameType(kind)),
            "type {kind}"
        );
    }
}

#[test]
fn unknown_class_or_method() {
    for (c, m) in [
        (99u16, 1u16),
        (60, 75),
        (10, 12),
        (0, 0),
        (0xFFFF, 0xFFFF),
        (20, 30),
    ] {
        let mut p = c.to_be_bytes().to_vec();
        p.extend_from_slice(&m.to_be_bytes());
        p.extend_from_slice(&[0; 16]);
        assert_eq!(
            decode_one(&frame(FRAME_METHOD, 1, &p)),
            Err(DecodeError::UnknownMethod {
                class_id: c,
                method_id: m
            })
        );
    }
}

#[test]
fn trailing_bytes_after_a_method_or_header() {
    let mut p = method_payload(BasicAck {
        delivery_tag: 1,
        multiple: false,
    });
    p.push(0);
    assert!(matches!(
        decode_one(&frame(FRAME_METHOD, 1, &p)),
        Err(DecodeError::TrailingBytes {
            method: "basic.ack",
            trailing: 1
        })
    ));
    let mut p = method_payload(TxSelectOk {});
    p.extend_from_slice(b"junk");
    assert!(matches!(
        decode_one(&frame(FRAME_METHOD, 1, &p)),
        Err(DecodeError::TrailingBytes { trailing: 4, .. })
    ));
    let h = hframe(1, 3, &BasicProperties::default());
    let mut p = h[7..h.len() - 1].to_vec();
    p.push(1);
    assert!(matches!(
        decode_one(&frame(FRAME_HEADER, 1, &p)),
        Err(DecodeError::TrailingBytes { trailing: 1, .. })
    ));
}

#[test]
fn bad_content_headers() {
    // Class other than basic.
    let mut p = vec![0, 50, 0, 0];
    p.extend_from_slice(&[0; 8]);
    p.extend_from_slice(&[0, 0]);
    assert_eq!(
        decode_one(&frame(FRAME_HEADER, 1, &p)),
        Err(DecodeError::BadContentClass(50))
    );
    // Continuation bit in the property flags.
    let mut p = vec![0, 60, 0, 0];
    p.extend_from_slice(&[0; 8]);
    p.extend_from_slice(&[0x00, 0x01]);
    assert_eq!(
        decode_one(&frame(FRAME_HEADER, 1, &p)),
        Err(DecodeError::BadPropertyFlags(1))
    );
}

#[test]
fn heartbeat_on_channel_one() {
    assert_eq!(
        decode_one(&[8, 0, 1, 0, 0, 0, 0, 0xCE]),
        Err(DecodeError::HeartbeatOnChannel(1))
    );
}

#[test]
fn protocol_header_where_a_frame_should_be() {
    for bytes in [
        &b"AMQP\x00\x00\x09\x01"[..],
        b"AMQP\x01\x01\x00\x0a",
        b"AMQP",
        b"AMQP\x00",
    ] {
        assert!(
            matches!(decode_one(bytes), Err(DecodeError::ProtocolHeader(_))),
            "{bytes:?}"
        );
    }
    // After a valid frame in the same buffer.
    let mut buf = BytesMut::from(&[8, 0, 0, 0, 0, 0, 0, 0xCE][..]);
    buf.extend_from_slice(b"AMQP\x00\x00\x09\x01");
    assert_eq!(
        decode_frame(&mut buf, FRAME_MAX),
        Ok(Some(Frame::Heartbeat))
    );
    let Err(DecodeError::ProtocolHeader(v)) = decode_frame(&mut buf, FRAME_MAX) else {
        panic!()
    };
    assert!(v.contains("0.0.9.1"), "{v}");
}

// ----- field tables and strings ----------------------------------------------------------------

#[test]
fn tables_nested_ten_thousand_deep_are_too_deep() {
    for (what, table) in [
        ("tables", nested_tables(10_000)),
        ("arrays", nested_arrays(10_000)),
    ] {
        let f = start_with_table(&table);
        assert!(f.len() < FRAME_MAX as usize);
        assert_eq!(
            decode_one(&f),
            Err(DecodeError::TooDeep(MAX_NESTING)),
            "{what}"
        );
        let mut r = Reader::new(Bytes::from(table));
        assert_eq!(r.table(), Err(DecodeError::TooDeep(MAX_NESTING)), "{what}");
    }
}

#[test]
fn nesting_limit_is_exact() {
    for build in [nested_tables as fn(usize) -> Vec<u8>, nested_arrays] {
        assert!(Reader::new(Bytes::from(build(MAX_NESTING))).table().is_ok());
        assert_eq!(
            Reader::new(Bytes::from(build(MAX_NESTING + 1))).table(),
            Err(DecodeError::TooDeep(MAX_NESTING))
        );
    }
    // Alternating tables and arrays count together.
    let mut v = FieldValue::Void;
    for i in 0..=MAX_NESTING {
        v = if i % 2 == 0 {
            FieldValue::Array(vec![v])
        } else {
            FieldValue::Table(FieldTable::new().with("k", v))
        };
    }
    let t = FieldTable::new().with("top", v);
    // The encoder refuses what the decoder would refuse, rather than writing it.
    let mut b = BytesMut::new();
    assert_eq!(
        t.write(&mut Writer::new(&mut b)),
        Err(kelp_amqp::codec::EncodeError::TooDeep(MAX_NESTING))
    );
}

#[test]
fn lengths_claiming_four_gib_in_a_small_frame_are_truncated() {
    assert_no_huge_allocation(|| {
        // Field table length.
        let f = start_with_table(&[0xFF, 0xFF, 0xFF, 0xFF, 1, b'a', b'V']);
        assert!(matches!(decode_one(&f), Err(DecodeError::Truncated { .. })));

        // Long string inside a table.
        let t = [0, 0, 0, 7, 1, b's', b'S', 0xFF, 0xFF, 0xFF, 0xFF];
        let f = start_with_table(&t);
        assert!(matches!(decode_one(&f), Err(DecodeError::Truncated { .. })));

        // Array length inside a table.
        let t = [0, 0, 0, 7, 1, b'a', b'A', 0xFF, 0xFF, 0xFF, 0xF0];
        assert!(matches!(
            decode_one(&start_with_table(&t)),
            Err(DecodeError::Truncated { .. })
        ));

        // Long string argument (connection.start mechanisms).
        let mut p = vec![0, 10, 0, 10, 0, 9, 0, 0, 0, 0, 0xFF, 0xFF, 0xFF, 0xFF];
        p.extend_from_slice(b"PLAIN");
        assert!(matches!(
            decode_one(&frame(FRAME_METHOD, 0, &p)),
            Err(DecodeError::Truncated { .. })
        ));

        // Headers table in a content header.
        let mut p = vec![0, 60, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0x20, 0x00];
        p.extend_from_slice(&[0xFF, 0xFF, 0xFF, 0xFF, 0, 0]);
        assert!(matches!(
            decode_one(&frame(FRAME_HEADER, 1, &p)),
            Err(DecodeError::Truncated { .. })
        ));

        // Short string claiming 255 bytes with 3 present.
        let p = [0, 60, 0, 30, 255, b'a', b'b', b'c'];
        assert!(matches!(
            decode_one(&frame(FRAME_METHOD, 1, &p)),
            Err(DecodeError::Truncated { .. })
        ));
    });
}

#[test]
fn invalid_utf8_short_strings() {
    // basic.cancel consumer tag.
    let p = [0, 60, 0, 30, 2, 0xC3, 0x28, 0];
    assert_eq!(
        decode_one(&frame(FRAME_METHOD, 1, &p)),
        Err(DecodeError::InvalidUtf8)
    );
    // A table key.
    let f = start_with_table(&[0, 0, 0, 3, 1, 0xFF, b'V']);
    assert_eq!(decode_one(&f), Err(DecodeError::InvalidUtf8));
    // A property (content type).
    let p = [0, 60, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0x80, 0x00, 1, 0x80];
    assert_eq!(
        decode_one(&frame(FRAME_HEADER, 1, &p)),
        Err(DecodeError::InvalidUtf8)
    );
    // Overlong encoding and a lone surrogate.
    for bad in [&[0xC0u8, 0xAF][..], &[0xED, 0xA0, 0x80]] {
        let mut p = vec![0, 60, 0, 30, bad.len() as u8];
        p.extend_from_slice(bad);
        p.push(0);
        assert_eq!(
            decode_one(&frame(FRAME_METHOD, 1, &p)),
            Err(DecodeError::InvalidUtf8)
        );
    }
}

#[test]
fn unknown_field_value_type() {
    let f = start_with_table(&[0, 0, 0, 3, 1, b'a', b'Z']);
    assert_eq!(decode_one(&f), Err(DecodeError::UnknownFieldType('Z')));
}

// ----- the engine under hostile input ----------------------------------------------------------

/// A negotiated engine with channel 1 open in confirm mode, two publishes unconfirmed and a
/// `basic.get` pending, so that many server frames are valid in context.
fn negotiated() -> Engine<u32> {
    let now = Instant::now();
    let mut e = Engine::new(Config::default(), now);
    let mut input = BytesMut::new();
    let start = ConnectionStart {
        version_major: 0,
        version_minor: 9,
        server_properties: FieldTable::new().with("product", "RabbitMQ"),
        mechanisms: Bytes::from_static(b"PLAIN AMQPLAIN"),
        locales: Bytes::from_static(b"en_US"),
    };
    input.extend_from_slice(&mframe(0, start));
    input.extend_from_slice(&mframe(
        0,
        ConnectionTune {
            channel_max: 2047,
            frame_max: FRAME_MAX,
            heartbeat: 60,
        },
    ));
    input.extend_from_slice(&mframe(0, ConnectionOpenOk::default()));
    e.handle_input(&mut input, now);
    assert!(e.is_open());
    e.open_channel(Some(1), 1).unwrap();
    e.handle_input(
        &mut BytesMut::from(&mframe(1, ChannelOpenOk::default())[..]),
        now,
    );
    e.call(1, ConfirmSelect { nowait: false }.into(), 2);
    e.handle_input(&mut BytesMut::from(&mframe(1, ConfirmSelectOk {})[..]), now);
    for t in [10, 11] {
        e.publish(
            1,
            "",
            "q",
            false,
            false,
            &BasicProperties::default(),
            Bytes::from_static(b"m"),
            Some(t),
        )
        .unwrap();
    }
    e.call(
        1,
        BasicGet {
            queue: "q".into(),
            ..Default::default()
        }
        .into(),
        3,
    );
    let mut sink = VecDeque::new();
    e.transmit().drain_into(&mut sink);
    while e.poll_event().is_some() {}
    assert!(e.is_open());
    e
}

/// Server messages that are valid for [`negotiated`], as byte strings.
fn server_messages() -> Vec<Vec<u8>> {
    let p = BasicProperties::default()
        .with_message_id("m")
        .with_headers(FieldTable::new().with("k", "v"));
    let deliver = BasicDeliver {
        consumer_tag: "c".into(),
        delivery_tag: 1,
        redelivered: false,
        exchange: "".into(),
        routing_key: "q".into(),
    };
    let cat = |parts: &[Vec<u8>]| parts.concat();
    vec![
        cat(&[
            mframe(1, deliver.clone()),
            hframe(1, 5, &p),
            bframe(1, b"hello"),
        ]),
        cat(&[mframe(1, deliver.clone()), hframe(1, 0, &p)]),
        cat(&[
            mframe(1, deliver),
            hframe(1, 6, &p),
            bframe(1, b"abc"),
            bframe(1, b"def"),
        ]),
        mframe(
            1,
            BasicAck {
                delivery_tag: 1,
                multiple: false,
            },
        ),
        mframe(
            1,
            BasicNack {
                delivery_tag: 2,
                multiple: true,
                requeue: false,
            },
        ),
        vec![8, 0, 0, 0, 0, 0, 0, 0xCE],
        mframe(1, ChannelFlow { active: false }),
        mframe(
            1,
            BasicCancel {
                consumer_tag: "c".into(),
                nowait: false,
            },
        ),
        mframe(
            0,
            ConnectionBlocked {
                reason: "low on memory".into(),
            },
        ),
        mframe(0, ConnectionUnblocked {}),
        cat(&[
            mframe(
                1,
                BasicReturn {
                    reply_code: 312,
                    reply_text: "NO_ROUTE".into(),
                    exchange: "".into(),
                    routing_key: "x".into(),
                },
            ),
            hframe(1, 2, &BasicProperties::default()),
            bframe(1, b"rt"),
        ]),
        mframe(1, BasicGetEmpty::default()),
        mframe(2, QueueDeclareOk::default()),
    ]
}

#[derive(Debug, Clone)]
enum Mutation {
    Set(prop::sample::Index, u8),
    Insert(prop::sample::Index, u8),
    Remove(prop::sample::Index),
    Truncate(prop::sample::Index),
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        4 => (any::<prop::sample::Index>(), any::<u8>()).prop_map(|(i, b)| Mutation::Set(i, b)),
        1 => (any::<prop::sample::Index>(), any::<u8>()).prop_map(|(i, b)| Mutation::Insert(i, b)),
        1 => any::<prop::sample::Index>().prop_map(Mutation::Remove),
        1 => any::<prop::sample::Index>().prop_map(Mutation::Truncate),
    ]
}

fn mutate(mut v: Vec<u8>, muts: &[Mutation]) -> Vec<u8> {
    for m in muts {
        if v.is_empty() {
            break;
        }
        match m {
            Mutation::Set(i, b) => {
                let i = i.index(v.len());
                v[i] = *b;
            }
            Mutation::Insert(i, b) => {
                let i = i.index(v.len() + 1);
                v.insert(i, *b);
            }
            Mutation::Remove(i) => {
                let i = i.index(v.len());
                v.remove(i);
            }
            Mutation::Truncate(i) => {
                let i = i.index(v.len());
                v.truncate(i);
            }
        }
    }
    v
}

/// Decode a stream like a reader loop would; true if it hit a decode error.
fn decoder_fails(bytes: &[u8], frame_max: u32) -> bool {
    let mut buf = BytesMut::from(bytes);
    let cap_limit = 2 * (bytes.len() + frame_max as usize + 64);
    loop {
        let before = buf.len();
        match decode_frame(&mut buf, frame_max) {
            Ok(Some(_)) => assert!(buf.len() < before, "no progress"),
            Ok(None) => {
                assert!(
                    buf.len() < frame_max as usize,
                    "waiting with a frame_max of input"
                );
                assert!(
                    buf.capacity() <= cap_limit,
                    "capacity {} for {} bytes",
                    buf.capacity(),
                    bytes.len()
                );
                return false;
            }
            Err(_) => return true,
        }
    }
}

/// Feed `bytes` to a negotiated engine in pieces cut at `cuts` and check the invariants.
fn feed_engine(bytes: &[u8], cuts: &[prop::sample::Index]) -> Result<(), TestCaseError> {
    let mut e = negotiated();
    let now = Instant::now();
    let mut points: Vec<usize> = cuts.iter().map(|i| i.index(bytes.len() + 1)).collect();
    points.push(bytes.len());
    points.sort_unstable();
    let mut buf = BytesMut::new();
    let mut at = 0;
    for p in points {
        buf.extend_from_slice(&bytes[at..p]);
        at = p;
        e.handle_input(&mut buf, now);
        if e.is_closed() {
            prop_assert!(buf.is_empty(), "closed engine kept input");
            break;
        }
        prop_assert!(buf.len() < FRAME_MAX as usize);
    }
    let events: Vec<Event<u32>> = std::iter::from_fn(|| e.poll_event()).collect();
    let closed_events = events
        .iter()
        .filter(|ev| matches!(ev, Event::Closed { .. }))
        .count();
    prop_assert_eq!(closed_events, usize::from(e.is_closed()));

    // A decode error anywhere in what was fed must close the connection.
    if decoder_fails(bytes, FRAME_MAX) {
        prop_assert!(
            e.is_closed(),
            "decoder fails on the stream but the engine is open"
        );
    }

    let mut out = VecDeque::new();
    e.transmit().drain_into(&mut out);
    let out: Vec<u8> = out.iter().flat_map(|b| b.iter().copied()).collect();
    let mut obuf = BytesMut::from(&out[..]);
    let mut sent = Vec::new();
    while let Some(f) = decode_frame(&mut obuf, 0).unwrap() {
        sent.push(f);
    }
    prop_assert!(obuf.is_empty(), "engine wrote a partial frame");

    if e.is_closed() {
        match e.error() {
            Some(Error::Protocol(p)) => {
                let close = sent.iter().find_map(|f| match f {
                    Frame::Method {
                        channel: 0,
                        method: Method::ConnectionClose(c),
                    } => Some(c.clone()),
                    _ => None,
                });
                let Some(close) = close else {
                    return Err(TestCaseError::fail(format!(
                        "protocol error {p} but no connection.close sent"
                    )));
                };
                prop_assert!(close.reply_code >= 300, "{:?}", close);
                // The close is the last thing written.
                let is_last = matches!(
                    sent.last(),
                    Some(Frame::Method {
                        method: Method::ConnectionClose(_),
                        ..
                    })
                );
                prop_assert!(is_last, "{} sent after the close for {}", sent.len(), p);
            }
            Some(Error::ConnectionClosed(_)) => {
                let acked = sent.iter().any(|f| {
                    matches!(
                        f,
                        Frame::Method {
                            channel: 0,
                            method: Method::ConnectionCloseOk(_)
                        }
                    )
                });
                prop_assert!(acked, "server close not acknowledged");
            }
            other => return Err(TestCaseError::fail(format!("closed with {other:?}"))),
        }
    } else {
        prop_assert!(e.error().is_none());
    }
    Ok(())
}

#[test]
fn engine_closes_on_each_hostile_frame() {
    // Deterministic companions of the property: each malformed frame alone.
    let cases: Vec<Vec<u8>> = vec![
        vec![8, 0, 1, 0, 0, 0, 0, 0xCE],
        b"AMQP\x00\x00\x09\x01".to_vec(),
        start_with_table(&nested_tables(10_000)),
        start_with_table(&[0xFF, 0xFF, 0xFF, 0xFF]),
        frame(FRAME_METHOD, 1, &[0, 60, 0, 30, 2, 0xC3, 0x28, 0]),
        frame(9, 0, &[]),
        frame(FRAME_METHOD, 1, &[0, 99, 0, 1]),
        vec![FRAME_BODY, 0, 1, 0xFF, 0xFF, 0xFF, 0xFF],
        vec![8, 0, 0, 0, 0, 0, 0, 0],
        hframe(1, 3, &BasicProperties::default()),
        bframe(1, b"x"),
    ];
    for c in cases {
        let mut e = negotiated();
        e.handle_input(&mut BytesMut::from(&c[..]), Instant::now());
        assert!(e.is_closed(), "{c:?}");
        assert!(
            matches!(e.error(), Some(Error::Protocol(_))),
            "{:?}",
            e.error()
        );
        feed_engine(&c, &[]).unwrap();
    }
}

#[test]
fn valid_server_messages_keep_the_engine_open() {
    // The basis of the mutation property: unmutated, each message alone is accepted (the last,
    // a reply on a channel that is not open, is ignored).
    for (i, m) in server_messages().iter().enumerate() {
        let mut e = negotiated();
        e.handle_input(&mut BytesMut::from(&m[..]), Instant::now());
        assert!(e.is_open(), "message {i}: {:?}", e.error());
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn random_bytes_never_panic_the_decoder(bytes in proptest::collection::vec(any::<u8>(), 0..4096)) {
        decoder_fails(&bytes, FRAME_MAX);
        decoder_fails(&bytes, 4096);
    }

    #[test]
    fn random_payloads_in_valid_envelopes(
        kind in prop::sample::select(vec![FRAME_METHOD, FRAME_HEADER, FRAME_BODY, FRAME_HEARTBEAT]),
        ids in prop::sample::select(ALL_METHOD_IDS.to_vec()),
        use_ids in any::<bool>(),
        channel in 0u16..4,
        tail in proptest::collection::vec(any::<u8>(), 0..300),
    ) {
        let mut payload = Vec::new();
        if use_ids && kind == FRAME_METHOD {
            payload.extend_from_slice(&ids.0.to_be_bytes());
            payload.extend_from_slice(&ids.1.to_be_bytes());
        } else if use_ids && kind == FRAME_HEADER {
            payload.extend_from_slice(&[0, 60, 0, 0]);
        }
        payload.extend_from_slice(&tail);
        let f = frame(kind, channel, &payload);
        if let Ok(Some(decoded)) = decode_one(&f) {
            // Whatever decodes re-encodes to a canonical form that is stable.
            let once = frame_to_bytes(&decoded, 0).unwrap();
            let again = frame_to_bytes(&decode_one(&once).unwrap().unwrap(), 0).unwrap();
            prop_assert_eq!(once, again);
        }
        feed_engine(&f, &[])?;
    }

    #[test]
    fn random_bytes_into_a_negotiated_engine(
        bytes in proptest::collection::vec(any::<u8>(), 0..2048),
        cuts in proptest::collection::vec(any::<prop::sample::Index>(), 0..4),
    ) {
        feed_engine(&bytes, &cuts)?;
    }

    #[test]
    fn mutated_server_streams_into_a_negotiated_engine(
        picks in proptest::collection::vec(any::<prop::sample::Index>(), 1..8),
        muts in proptest::collection::vec(mutation(), 0..4),
        cuts in proptest::collection::vec(any::<prop::sample::Index>(), 0..6),
    ) {
        let msgs = server_messages();
        let stream: Vec<u8> = picks.iter().flat_map(|i| msgs[i.index(msgs.len())].clone()).collect();
        let stream = mutate(stream, &muts);
        decoder_fails(&stream, FRAME_MAX);
        feed_engine(&stream, &cuts)?;
    }

    #[test]
    fn every_prefix_of_a_mutated_stream_is_safe(
        picks in proptest::collection::vec(any::<prop::sample::Index>(), 1..3),
        muts in proptest::collection::vec(mutation(), 1..3),
    ) {
        let msgs = server_messages();
        let stream: Vec<u8> = picks.iter().flat_map(|i| msgs[i.index(msgs.len())].clone()).collect();
        let stream = mutate(stream, &muts);
        for n in (0..=stream.len()).step_by(7) {
            decoder_fails(&stream[..n], FRAME_MAX);
        }
    }
}
