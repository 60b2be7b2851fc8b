#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
//! Encode → decode round trips of every method, field value, property set and frame, plus a
//! check that the codec knows every AMQP 0-9-1 method and RabbitMQ extension.
//!
//! The method list below is transcribed from the AMQP 0-9-1 specification (amqp0-9-1.xml with
//! RabbitMQ's extensions) independently of `src/codec/method.rs`: a struct whose fields differ
//! from the specification fails to compile here, a missing or extra method fails
//! `all_method_ids_match_the_specification`.

use std::collections::{BTreeMap, BTreeSet};

use bytes::{Bytes, BytesMut};
use kelp_amqp::codec::*;
use proptest::prelude::*;
use proptest::strategy::{Union, ValueTree};

// ----- value strategies ------------------------------------------------------------------------

fn shortstr() -> impl Strategy<Value = ShortString> {
    prop_oneof![
        4 => "[a-zA-Z0-9._/-]{0,16}",
        2 => "\\PC{0,40}",
        1 => "[a-z]{255}",
    ]
    .prop_map(ShortString::from)
}

fn longstr() -> impl Strategy<Value = Bytes> {
    prop_oneof![
        3 => proptest::collection::vec(any::<u8>(), 0..48),
        1 => proptest::collection::vec(any::<u8>(), 0..2000),
    ]
    .prop_map(Bytes::from)
}

fn finite_f32() -> impl Strategy<Value = f32> {
    use proptest::num::f32::*;
    POSITIVE | NEGATIVE | NORMAL | SUBNORMAL | ZERO
}

fn finite_f64() -> impl Strategy<Value = f64> {
    use proptest::num::f64::*;
    POSITIVE | NEGATIVE | NORMAL | SUBNORMAL | ZERO
}

fn leaf_value() -> impl Strategy<Value = FieldValue> {
    prop_oneof![
        any::<bool>().prop_map(FieldValue::Bool),
        any::<i8>().prop_map(FieldValue::I8),
        any::<u8>().prop_map(FieldValue::U8),
        any::<i16>().prop_map(FieldValue::I16),
        any::<u16>().prop_map(FieldValue::U16),
        any::<i32>().prop_map(FieldValue::I32),
        any::<u32>().prop_map(FieldValue::U32),
        any::<i64>().prop_map(FieldValue::I64),
        finite_f32().prop_map(FieldValue::F32),
        finite_f64().prop_map(FieldValue::F64),
        (any::<u8>(), any::<u32>())
            .prop_map(|(scale, value)| FieldValue::Decimal(Decimal { scale, value })),
        longstr().prop_map(FieldValue::LongString),
        longstr().prop_map(FieldValue::ByteArray),
        any::<u64>().prop_map(FieldValue::Timestamp),
        Just(FieldValue::Void),
    ]
}

/// Any field value, with tables and arrays nested up to 4 levels.
fn field_value() -> BoxedStrategy<FieldValue> {
    leaf_value()
        .prop_recursive(4, 48, 6, |inner| {
            prop_oneof![
                proptest::collection::vec(inner.clone(), 0..6).prop_map(FieldValue::Array),
                proptest::collection::vec((shortstr(), inner), 0..6)
                    .prop_map(|kv| FieldValue::Table(kv.into_iter().collect())),
            ]
        })
        .boxed()
}

fn field_table() -> BoxedStrategy<FieldTable> {
    proptest::collection::vec((shortstr(), field_value()), 0..6)
        .prop_map(|kv| kv.into_iter().collect::<FieldTable>())
        .boxed()
}

/// Arbitrary values per AMQP argument type.
trait Gen: Sized + std::fmt::Debug + 'static {
    fn strat() -> BoxedStrategy<Self>;
}
macro_rules! gen_any {
    ($($t:ty),*) => {$(
        impl Gen for $t {
            fn strat() -> BoxedStrategy<Self> {
                any::<$t>().boxed()
            }
        }
    )*};
}
gen_any!(u8, u16, u32, u64, bool);
impl Gen for ShortString {
    fn strat() -> BoxedStrategy<Self> {
        shortstr().boxed()
    }
}
impl Gen for Bytes {
    fn strat() -> BoxedStrategy<Self> {
        longstr().boxed()
    }
}
impl Gen for FieldTable {
    fn strat() -> BoxedStrategy<Self> {
        field_table()
    }
}

// ----- the specification's method list ---------------------------------------------------------

macro_rules! spec {
    ($(
        $cid:literal $class:literal {
            $( $mid:literal $mname:literal $name:ident { $( $f:ident : $t:ty ),* $(,)? } )*
        }
    )*) => {
        /// `(class_id, method_id, "class.method")` for every method of the specification.
        const SPEC: &[(u16, u16, &str)] = &[ $( $( ($cid, $mid, concat!($class, ".", $mname)), )* )* ];

        /// An arbitrary instance of any method, with the ids the specification gives it.
        fn arb_method_with_ids() -> BoxedStrategy<((u16, u16), Method)> {
            Union::new(vec![ $( $(
                (Just(()), $( <$t as Gen>::strat(), )* )
                    .prop_map(|((), $( $f, )*)| (($cid, $mid), Method::from($name { $( $f ),* })))
                    .boxed(),
            )* )* ])
            .boxed()
        }
    };
}

spec! {
    10 "connection" {
        10 "start" ConnectionStart { version_major: u8, version_minor: u8, server_properties: FieldTable, mechanisms: Bytes, locales: Bytes }
        11 "start-ok" ConnectionStartOk { client_properties: FieldTable, mechanism: ShortString, response: Bytes, locale: ShortString }
        20 "secure" ConnectionSecure { challenge: Bytes }
        21 "secure-ok" ConnectionSecureOk { response: Bytes }
        30 "tune" ConnectionTune { channel_max: u16, frame_max: u32, heartbeat: u16 }
        31 "tune-ok" ConnectionTuneOk { channel_max: u16, frame_max: u32, heartbeat: u16 }
        40 "open" ConnectionOpen { virtual_host: ShortString, reserved_1: ShortString, reserved_2: bool }
        41 "open-ok" ConnectionOpenOk { reserved_1: ShortString }
        50 "close" ConnectionClose { reply_code: u16, reply_text: ShortString, class_id: u16, method_id: u16 }
        51 "close-ok" ConnectionCloseOk {}
        60 "blocked" ConnectionBlocked { reason: ShortString }
        61 "unblocked" ConnectionUnblocked {}
        70 "update-secret" ConnectionUpdateSecret { new_secret: Bytes, reason: ShortString }
        71 "update-secret-ok" ConnectionUpdateSecretOk {}
    }
    20 "channel" {
        10 "open" ChannelOpen { reserved_1: ShortString }
        11 "open-ok" ChannelOpenOk { reserved_1: Bytes }
        20 "flow" ChannelFlow { active: bool }
        21 "flow-ok" ChannelFlowOk { active: bool }
        40 "close" ChannelClose { reply_code: u16, reply_text: ShortString, class_id: u16, method_id: u16 }
        41 "close-ok" ChannelCloseOk {}
    }
    30 "access" {
        10 "request" AccessRequest { realm: ShortString, exclusive: bool, passive: bool, active: bool, write: bool, read: bool }
        11 "request-ok" AccessRequestOk { reserved_1: u16 }
    }
    40 "exchange" {
        10 "declare" ExchangeDeclare { reserved_1: u16, exchange: ShortString, kind: ShortString, passive: bool, durable: bool, auto_delete: bool, internal: bool, nowait: bool, arguments: FieldTable }
        11 "declare-ok" ExchangeDeclareOk {}
        20 "delete" ExchangeDelete { reserved_1: u16, exchange: ShortString, if_unused: bool, nowait: bool }
        21 "delete-ok" ExchangeDeleteOk {}
        30 "bind" ExchangeBind { reserved_1: u16, destination: ShortString, source: ShortString, routing_key: ShortString, nowait: bool, arguments: FieldTable }
        31 "bind-ok" ExchangeBindOk {}
        40 "unbind" ExchangeUnbind { reserved_1: u16, destination: ShortString, source: ShortString, routing_key: ShortString, nowait: bool, arguments: FieldTable }
        51 "unbind-ok" ExchangeUnbindOk {}
    }
    50 "queue" {
        10 "declare" QueueDeclare { reserved_1: u16, queue: ShortString, passive: bool, durable: bool, exclusive: bool, auto_delete: bool, nowait: bool, arguments: FieldTable }
        11 "declare-ok" QueueDeclareOk { queue: ShortString, message_count: u32, consumer_count: u32 }
        20 "bind" QueueBind { reserved_1: u16, queue: ShortString, exchange: ShortString, routing_key: ShortString, nowait: bool, arguments: FieldTable }
        21 "bind-ok" QueueBindOk {}
        30 "purge" QueuePurge { reserved_1: u16, queue: ShortString, nowait: bool }
        31 "purge-ok" QueuePurgeOk { message_count: u32 }
        40 "delete" QueueDelete { reserved_1: u16, queue: ShortString, if_unused: bool, if_empty: bool, nowait: bool }
        41 "delete-ok" QueueDeleteOk { message_count: u32 }
        50 "unbind" QueueUnbind { reserved_1: u16, queue: ShortString, exchange: ShortString, routing_key: ShortString, arguments: FieldTable }
        51 "unbind-ok" QueueUnbindOk {}
    }
    60 "basic" {
        10 "qos" BasicQos { prefetch_size: u32, prefetch_count: u16, global: bool }
        11 "qos-ok" BasicQosOk {}
        20 "consume" BasicConsume { reserved_1: u16, queue: ShortString, consumer_tag: ShortString, no_local: bool, no_ack: bool, exclusive: bool, nowait: bool, arguments: FieldTable }
        21 "consume-ok" BasicConsumeOk { consumer_tag: ShortString }
        30 "cancel" BasicCancel { consumer_tag: ShortString, nowait: bool }
        31 "cancel-ok" BasicCancelOk { consumer_tag: ShortString }
        40 "publish" BasicPublish { reserved_1: u16, exchange: ShortString, routing_key: ShortString, mandatory: bool, immediate: bool }
        50 "return" BasicReturn { reply_code: u16, reply_text: ShortString, exchange: ShortString, routing_key: ShortString }
        60 "deliver" BasicDeliver { consumer_tag: ShortString, delivery_tag: u64, redelivered: bool, exchange: ShortString, routing_key: ShortString }
        70 "get" BasicGet { reserved_1: u16, queue: ShortString, no_ack: bool }
        71 "get-ok" BasicGetOk { delivery_tag: u64, redelivered: bool, exchange: ShortString, routing_key: ShortString, message_count: u32 }
        72 "get-empty" BasicGetEmpty { reserved_1: ShortString }
        80 "ack" BasicAck { delivery_tag: u64, multiple: bool }
        90 "reject" BasicReject { delivery_tag: u64, requeue: bool }
        100 "recover-async" BasicRecoverAsync { requeue: bool }
        110 "recover" BasicRecover { requeue: bool }
        111 "recover-ok" BasicRecoverOk {}
        120 "nack" BasicNack { delivery_tag: u64, multiple: bool, requeue: bool }
    }
    85 "confirm" {
        10 "select" ConfirmSelect { nowait: bool }
        11 "select-ok" ConfirmSelectOk {}
    }
    90 "tx" {
        10 "select" TxSelect {}
        11 "select-ok" TxSelectOk {}
        20 "commit" TxCommit {}
        21 "commit-ok" TxCommitOk {}
        30 "rollback" TxRollback {}
        31 "rollback-ok" TxRollbackOk {}
    }
}

fn arb_method() -> BoxedStrategy<Method> {
    arb_method_with_ids().prop_map(|(_, m)| m).boxed()
}

fn arb_properties() -> impl Strategy<Value = BasicProperties> {
    let s = || proptest::option::of(shortstr());
    (
        (
            s(),
            s(),
            proptest::option::of(field_table()),
            any::<Option<u8>>(),
            any::<Option<u8>>(),
            s(),
            s(),
        ),
        (s(), s(), any::<Option<u64>>(), s(), s(), s(), s()),
    )
        .prop_map(
            |(
                (
                    content_type,
                    content_encoding,
                    headers,
                    delivery_mode,
                    priority,
                    correlation_id,
                    reply_to,
                ),
                (expiration, message_id, timestamp, kind, user_id, app_id, cluster_id),
            )| BasicProperties {
                content_type,
                content_encoding,
                headers,
                delivery_mode,
                priority,
                correlation_id,
                reply_to,
                expiration,
                message_id,
                timestamp,
                kind,
                user_id,
                app_id,
                cluster_id,
            },
        )
}

fn arb_frame() -> impl Strategy<Value = Frame> {
    prop_oneof![
        3 => (any::<u16>(), arb_method()).prop_map(|(channel, method)| Frame::Method { channel, method }),
        2 => (any::<u16>(), any::<u64>(), arb_properties()).prop_map(|(channel, body_size, properties)| {
            Frame::Header {
                channel,
                header: ContentHeader {
                    class_id: 60,
                    body_size,
                    properties,
                },
            }
        }),
        2 => (any::<u16>(), longstr()).prop_map(|(channel, payload)| Frame::Body { channel, payload }),
        1 => Just(Frame::Heartbeat),
    ]
}

// ----- helpers ---------------------------------------------------------------------------------

fn encode_table(t: &FieldTable) -> Bytes {
    let mut b = BytesMut::new();
    t.write(&mut Writer::new(&mut b)).unwrap();
    b.freeze()
}

fn decode_table(b: Bytes) -> FieldTable {
    let mut r = Reader::new(b);
    let t = r.table().unwrap();
    assert_eq!(r.remaining(), 0, "bytes left after the table");
    t
}

fn encode_header_payload(p: &BasicProperties, body_size: u64) -> Bytes {
    let mut b = BytesMut::new();
    ContentHeader {
        class_id: 60,
        body_size,
        properties: p.clone(),
    }
    .encode(&mut Writer::new(&mut b))
    .unwrap();
    b.freeze()
}

fn decode_stream(bytes: &[u8], frame_max: u32) -> Vec<Frame> {
    let mut buf = BytesMut::from(bytes);
    let mut v = Vec::new();
    while let Some(f) = decode_frame(&mut buf, frame_max).unwrap() {
        v.push(f);
    }
    assert!(buf.is_empty());
    v
}

// ----- the specification list ------------------------------------------------------------------

#[test]
fn all_method_ids_match_the_specification() {
    let per_class: BTreeMap<u16, usize> =
        ALL_METHOD_IDS
            .iter()
            .fold(BTreeMap::new(), |mut m, (c, _)| {
                *m.entry(*c).or_default() += 1;
                m
            });
    let want: BTreeMap<u16, usize> = [
        (10, 14), // connection (incl. blocked/unblocked/update-secret)
        (20, 6),  // channel
        (30, 2),  // access
        (40, 8),  // exchange (incl. bind/unbind)
        (50, 10), // queue
        (60, 18), // basic (incl. nack, recover-async)
        (85, 2),  // confirm
        (90, 6),  // tx
    ]
    .into_iter()
    .collect();
    assert_eq!(per_class, want);
    assert_eq!(ALL_METHOD_IDS.len(), 66);

    let unique: BTreeSet<(u16, u16)> = ALL_METHOD_IDS.iter().copied().collect();
    assert_eq!(unique.len(), ALL_METHOD_IDS.len(), "duplicate ids");
    let spec: BTreeSet<(u16, u16)> = SPEC.iter().map(|(c, m, _)| (*c, *m)).collect();
    assert_eq!(unique, spec);

    for (c, m, name) in SPEC {
        assert_eq!(method_name(*c, *m), Some(*name), "{c}.{m}");
    }
    assert_eq!(method_name(60, 75), None);
    assert_eq!(method_name(0, 0), None);
}

#[test]
fn every_method_is_generated_and_round_trips() {
    // Deterministic companion of the property below: each method at least once, by id.
    let mut seen = BTreeSet::new();
    let mut runner = proptest::test_runner::TestRunner::deterministic();
    let strat = arb_method_with_ids();
    for _ in 0..20_000 {
        let ((c, m), method) = strat.new_tree(&mut runner).unwrap().current();
        if seen.insert((c, m)) {
            let bytes = method.to_bytes().unwrap();
            assert_eq!(Method::decode(bytes).unwrap(), method);
        }
        if seen.len() == SPEC.len() {
            break;
        }
    }
    assert_eq!(seen.len(), SPEC.len(), "not every method was generated");
}

#[test]
fn golden_encodings() {
    let enc = |m: Method| m.to_bytes().unwrap().to_vec();
    assert_eq!(
        enc(ConnectionTuneOk {
            channel_max: 2047,
            frame_max: 131_072,
            heartbeat: 60
        }
        .into()),
        [0, 10, 0, 31, 0x07, 0xFF, 0, 2, 0, 0, 0, 60]
    );
    assert_eq!(
        enc(QueueDeclare {
            queue: "hello".into(),
            durable: true,
            ..Default::default()
        }
        .into()),
        [0, 50, 0, 10, 0, 0, 5, b'h', b'e', b'l', b'l', b'o', 0x02, 0, 0, 0, 0]
    );
    // Five consecutive bits in one octet, least significant first.
    assert_eq!(
        enc(ExchangeDeclare {
            exchange: "x".into(),
            kind: "topic".into(),
            durable: true,
            auto_delete: true,
            nowait: true,
            ..Default::default()
        }
        .into()),
        [0, 40, 0, 10, 0, 0, 1, b'x', 5, b't', b'o', b'p', b'i', b'c', 0b10110, 0, 0, 0, 0]
    );
    assert_eq!(
        enc(BasicDeliver {
            consumer_tag: "c".into(),
            delivery_tag: 1,
            redelivered: true,
            exchange: "".into(),
            routing_key: "k".into(),
        }
        .into()),
        [0, 60, 0, 60, 1, b'c', 0, 0, 0, 0, 0, 0, 0, 1, 1, 0, 1, b'k']
    );
    assert_eq!(
        enc(BasicNack {
            delivery_tag: 5,
            multiple: true,
            requeue: true
        }
        .into()),
        [0, 60, 0, 120, 0, 0, 0, 0, 0, 0, 0, 5, 3]
    );
    assert_eq!(enc(TxCommitOk {}.into()), [0, 90, 0, 21]);

    // Frames.
    assert_eq!(
        &frame_to_bytes(&Frame::Heartbeat, 0).unwrap()[..],
        [8, 0, 0, 0, 0, 0, 0, 0xCE]
    );
    let h = frame_to_bytes(
        &Frame::Header {
            channel: 1,
            header: ContentHeader {
                class_id: 60,
                body_size: 8,
                properties: BasicProperties::default()
                    .with_content_type("t")
                    .with_delivery_mode(2),
            },
        },
        0,
    )
    .unwrap();
    assert_eq!(
        &h[..],
        [2, 0, 1, 0, 0, 0, 17, 0, 60, 0, 0, 0, 0, 0, 0, 0, 0, 0, 8, 0x90, 0x00, 1, b't', 2, 0xCE]
    );
    let b = frame_to_bytes(
        &Frame::Body {
            channel: 2,
            payload: Bytes::from_static(b"hi"),
        },
        0,
    )
    .unwrap();
    assert_eq!(&b[..], [3, 0, 2, 0, 0, 0, 2, b'h', b'i', 0xCE]);

    // Field table: {"a": I32(1)}.
    assert_eq!(
        &encode_table(&FieldTable::new().with("a", 1i32))[..],
        [0, 0, 0, 7, 1, b'a', b'I', 0, 0, 0, 1]
    );
}

#[test]
fn every_subset_of_properties_round_trips() {
    let full = BasicProperties {
        content_type: Some("application/json".into()),
        content_encoding: Some("gzip".into()),
        headers: Some(FieldTable::new().with("x", 1i32).with("y", "z")),
        delivery_mode: Some(2),
        priority: Some(9),
        correlation_id: Some("corr".into()),
        reply_to: Some("amq.rabbitmq.reply-to".into()),
        expiration: Some("60000".into()),
        message_id: Some("id-1".into()),
        timestamp: Some(1_700_000_000),
        kind: Some("order.created".into()),
        user_id: Some("guest".into()),
        app_id: Some("kelp".into()),
        cluster_id: Some("c".into()),
    };
    for mask in 0u16..(1 << 14) {
        let bit = |i: u16| mask & (1 << i) != 0;
        let p = BasicProperties {
            content_type: full.content_type.clone().filter(|_| bit(0)),
            content_encoding: full.content_encoding.clone().filter(|_| bit(1)),
            headers: full.headers.clone().filter(|_| bit(2)),
            delivery_mode: full.delivery_mode.filter(|_| bit(3)),
            priority: full.priority.filter(|_| bit(4)),
            correlation_id: full.correlation_id.clone().filter(|_| bit(5)),
            reply_to: full.reply_to.clone().filter(|_| bit(6)),
            expiration: full.expiration.clone().filter(|_| bit(7)),
            message_id: full.message_id.clone().filter(|_| bit(8)),
            timestamp: full.timestamp.filter(|_| bit(9)),
            kind: full.kind.clone().filter(|_| bit(10)),
            user_id: full.user_id.clone().filter(|_| bit(11)),
            app_id: full.app_id.clone().filter(|_| bit(12)),
            cluster_id: full.cluster_id.clone().filter(|_| bit(13)),
        };
        let payload = encode_header_payload(&p, u64::from(mask));
        // Property flags: property i is bit 15 - i.
        let flags = u16::from_be_bytes([payload[12], payload[13]]);
        let want_flags = (0..14)
            .filter(|i| bit(*i))
            .fold(0u16, |f, i| f | (1 << (15 - i)));
        assert_eq!(flags, want_flags, "mask {mask:#06x}");
        let h = ContentHeader::decode(payload).unwrap();
        assert_eq!(h.properties, p, "mask {mask:#06x}");
        assert_eq!(h.body_size, u64::from(mask));
        assert_eq!(h.class_id, 60);
    }
}

#[test]
fn short_string_limits() {
    let ok = QueueDeclare {
        queue: "q".repeat(255).as_str().into(),
        ..Default::default()
    };
    let m: Method = ok.into();
    assert_eq!(Method::decode(m.to_bytes().unwrap()).unwrap(), m);
    let too_long: Method = QueueDeclare {
        queue: "q".repeat(256).as_str().into(),
        ..Default::default()
    }
    .into();
    assert!(matches!(
        too_long.to_bytes(),
        Err(EncodeError::ShortStringTooLong { len: 256, .. })
    ));
    let mut buf = BytesMut::from(&b"keep"[..]);
    assert!(encode_method(&mut buf, 1, &too_long, 0).is_err());
    assert_eq!(&buf[..], b"keep", "buffer changed by a failed encode");
}

#[test]
fn encoder_and_decoder_agree_on_frame_max() {
    // A method frame of exactly frame_max bytes is accepted by both; one more byte by neither.
    for extra in [0usize, 1] {
        let fm = 4096u32;
        // connection.secure: 4 bytes of ids + 4 bytes of length + challenge.
        let challenge_len = fm as usize - 8 - 8 + extra;
        let m: Method = ConnectionSecure {
            challenge: Bytes::from(vec![b'c'; challenge_len]),
        }
        .into();
        let mut buf = BytesMut::new();
        let enc = encode_method(&mut buf, 0, &m, fm);
        let unlimited = frame_to_bytes(
            &Frame::Method {
                channel: 0,
                method: m.clone(),
            },
            0,
        )
        .unwrap();
        let dec = decode_frame(&mut BytesMut::from(&unlimited[..]), fm);
        if extra == 0 {
            assert!(enc.is_ok());
            assert_eq!(buf.len(), fm as usize);
            assert!(matches!(dec, Ok(Some(_))));
        } else {
            assert!(matches!(enc, Err(EncodeError::FrameTooLarge { .. })));
            assert!(buf.is_empty());
            assert!(matches!(dec, Err(DecodeError::FrameTooLarge { .. })));
        }
    }
}

#[test]
fn amqplain_entries_round_trip() {
    let t = FieldTable::new()
        .with("LOGIN", "guest")
        .with("PASSWORD", "guest");
    let e = t.encode_entries().unwrap();
    assert_eq!(&e[..], &encode_table(&t)[4..]);
    assert_eq!(FieldTable::decode_entries(e).unwrap(), t);
}

// ----- properties ------------------------------------------------------------------------------

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn method_round_trips(((c, m), method) in arb_method_with_ids(), channel in any::<u16>()) {
        prop_assert_eq!(method.ids(), (c, m));
        prop_assert_eq!(Some(method.name()), method_name(c, m));
        let bytes = method.to_bytes().unwrap();
        prop_assert_eq!(&bytes[..4], &[(c >> 8) as u8, c as u8, (m >> 8) as u8, m as u8][..]);
        prop_assert_eq!(Method::decode(bytes.clone()).unwrap(), method.clone());

        let frame = Frame::Method { channel, method: method.clone() };
        let wire = frame_to_bytes(&frame, 0).unwrap();
        prop_assert_eq!(wire.len(), bytes.len() + 8);
        let mut buf = BytesMut::from(&wire[..]);
        prop_assert_eq!(decode_frame(&mut buf, 0).unwrap(), Some(frame));
        prop_assert!(buf.is_empty());
    }

    #[test]
    fn method_decode_rejects_trailing_bytes(method in arb_method(), extra in 1usize..4) {
        let mut b = BytesMut::from(&method.to_bytes().unwrap()[..]);
        b.extend_from_slice(&vec![0u8; extra]);
        let is_trailing = matches!(Method::decode(b.freeze()), Err(DecodeError::TrailingBytes { .. }));
        prop_assert!(is_trailing);
    }

    #[test]
    fn field_value_round_trips(v in field_value()) {
        let t = FieldTable::new().with("v", v.clone());
        let bytes = encode_table(&t);
        let back = decode_table(bytes.clone());
        prop_assert_eq!(back.get("v"), Some(&v));
        // And re-encoding gives the same bytes.
        prop_assert_eq!(encode_table(&back), bytes);
    }

    #[test]
    fn field_table_round_trips(t in field_table()) {
        prop_assert_eq!(decode_table(encode_table(&t)), t.clone());
        let entries = t.encode_entries().unwrap();
        prop_assert_eq!(FieldTable::decode_entries(entries).unwrap(), t);
    }

    #[test]
    fn floats_round_trip_bit_exactly(f in any::<u32>(), d in any::<u64>()) {
        // Any bit pattern, NaNs included: compare bits, not values.
        let t = FieldTable::new()
            .with("f", FieldValue::F32(f32::from_bits(f)))
            .with("d", FieldValue::F64(f64::from_bits(d)))
            .with("a", FieldValue::Array(vec![FieldValue::F32(f32::from_bits(f))]));
        let back = decode_table(encode_table(&t));
        let Some(FieldValue::F32(f2)) = back.get("f") else { panic!("{back:?}") };
        let Some(FieldValue::F64(d2)) = back.get("d") else { panic!("{back:?}") };
        prop_assert_eq!(f2.to_bits(), f);
        prop_assert_eq!(d2.to_bits(), d);
        let Some(FieldValue::Array(a)) = back.get("a") else { panic!("{back:?}") };
        let [FieldValue::F32(f3)] = a.as_slice() else { panic!("{a:?}") };
        prop_assert_eq!(f3.to_bits(), f);
    }

    #[test]
    fn properties_round_trip(p in arb_properties(), body_size in any::<u64>()) {
        let h = ContentHeader::decode(encode_header_payload(&p, body_size)).unwrap();
        prop_assert_eq!(h.body_size, body_size);
        prop_assert_eq!(h.properties, p);
    }

    #[test]
    fn frame_round_trips(frame in arb_frame()) {
        let wire = frame_to_bytes(&frame, 0).unwrap();
        let mut buf = BytesMut::from(&wire[..]);
        prop_assert_eq!(decode_frame(&mut buf, 0).unwrap(), Some(frame.clone()));
        prop_assert!(buf.is_empty());
        // Any frame that encodes under a frame_max also decodes under it.
        if !matches!(frame, Frame::Body { .. }) {
            if let Ok(w) = frame_to_bytes(&frame, 4096) {
                let mut buf = BytesMut::from(&w[..]);
                prop_assert_eq!(decode_frame(&mut buf, 4096).unwrap(), Some(frame));
            }
        }
    }

    #[test]
    fn frame_streams_decode_in_order_however_they_are_split(
        frames in proptest::collection::vec(arb_frame(), 1..8),
        cuts in proptest::collection::vec(any::<prop::sample::Index>(), 0..6),
    ) {
        let wire: Vec<u8> = frames
            .iter()
            .flat_map(|f| frame_to_bytes(f, 0).unwrap().to_vec())
            .collect();
        prop_assert_eq!(&decode_stream(&wire, 0), &frames);

        // Feed it in pieces, as a socket would.
        let mut points: Vec<usize> = cuts.iter().map(|i| i.index(wire.len() + 1)).collect();
        points.push(wire.len());
        points.sort_unstable();
        let mut buf = BytesMut::new();
        let mut got = Vec::new();
        let mut at = 0;
        for p in points {
            buf.extend_from_slice(&wire[at..p]);
            at = p;
            while let Some(f) = decode_frame(&mut buf, 0).unwrap() {
                got.push(f);
            }
        }
        prop_assert!(buf.is_empty());
        prop_assert_eq!(got, frames);
    }
}
