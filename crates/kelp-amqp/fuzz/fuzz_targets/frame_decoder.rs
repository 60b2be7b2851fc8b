//! Fuzz the frame decoder and the engine behind it.
//!
//! The input is treated as bytes from a hostile server: first decoded frame by frame the way a
//! reader loop would (frame_max 131072), then fed, split in two at an input-chosen point, to an
//! engine that has completed a scripted handshake and opened channel 1 in confirm mode with a
//! publish unconfirmed and a `basic.get` pending (so that deliveries, acks, get-ok and friends
//! reach deep states). Neither may panic; an engine that closed must say why.
#![no_main]

use std::collections::VecDeque;
use std::time::Instant;

use bytes::{Bytes, BytesMut};
use kelp_amqp::codec::{
    decode_frame, encode_method, BasicGet, BasicProperties, ChannelOpenOk, ConfirmSelect,
    ConfirmSelectOk, ConnectionOpenOk, ConnectionStart, ConnectionTune, FieldTable, Method,
};
use kelp_amqp::engine::{Config, Engine};
use libfuzzer_sys::fuzz_target;

const FRAME_MAX: u32 = 131_072;

fn method_frame(channel: u16, m: impl Into<Method>) -> BytesMut {
    let mut b = BytesMut::new();
    if encode_method(&mut b, channel, &m.into(), 0).is_err() {
        unreachable!("scripted frames encode");
    }
    b
}

fn negotiated_engine(now: Instant) -> Engine<u32> {
    let mut engine = Engine::new(Config::default(), now);
    let mut script = method_frame(
        0,
        ConnectionStart {
            version_major: 0,
            version_minor: 9,
            server_properties: FieldTable::new().with("product", "fuzz"),
            mechanisms: Bytes::from_static(b"PLAIN AMQPLAIN"),
            locales: Bytes::from_static(b"en_US"),
        },
    );
    script.extend_from_slice(&method_frame(
        0,
        ConnectionTune {
            channel_max: 2047,
            frame_max: FRAME_MAX,
            heartbeat: 60,
        },
    ));
    script.extend_from_slice(&method_frame(0, ConnectionOpenOk::default()));
    engine.handle_input(&mut script, now);
    assert!(engine.is_open(), "scripted handshake failed");

    let _ = engine.open_channel(Some(1), 1);
    engine.handle_input(&mut method_frame(1, ChannelOpenOk::default()), now);
    engine.call(1, ConfirmSelect { nowait: false }.into(), 2);
    engine.handle_input(&mut method_frame(1, ConfirmSelectOk {}), now);
    let _ = engine.publish(
        1,
        "",
        "q",
        false,
        false,
        &BasicProperties::default(),
        Bytes::from_static(b"m"),
        Some(3),
    );
    engine.call(
        1,
        BasicGet {
            queue: "q".into(),
            ..Default::default()
        }
        .into(),
        4,
    );
    let mut sink = VecDeque::new();
    engine.transmit().drain_into(&mut sink);
    while engine.poll_event().is_some() {}
    assert!(engine.is_open(), "scripted setup failed");
    engine
}

fuzz_target!(|data: &[u8]| {
    // 1. The decoder alone, in a loop like a socket reader's.
    let mut buf = BytesMut::from(data);
    loop {
        let before = buf.len();
        match decode_frame(&mut buf, FRAME_MAX) {
            Ok(Some(_)) => assert!(buf.len() < before, "decoder made no progress"),
            Ok(None) => {
                assert!(
                    buf.len() < FRAME_MAX as usize,
                    "waiting on a whole frame_max of input"
                );
                break;
            }
            Err(_) => break,
        }
    }

    // 2. The engine after a scripted handshake, with the input in two reads.
    let now = Instant::now();
    let mut engine = negotiated_engine(now);
    let split = data.first().map_or(0, |b| usize::from(*b)).min(data.len());
    let mut buf = BytesMut::new();
    for part in [&data[..split], &data[split..]] {
        buf.extend_from_slice(part);
        engine.handle_input(&mut buf, now);
        if engine.is_closed() {
            assert!(buf.is_empty(), "closed engine kept input");
            break;
        }
    }
    let mut closed = 0;
    while let Some(ev) = engine.poll_event() {
        if matches!(ev, kelp_amqp::engine::Event::Closed { .. }) {
            closed += 1;
        }
    }
    assert_eq!(closed, usize::from(engine.is_closed()));
    if engine.is_closed() {
        assert!(engine.error().is_some(), "closed without a reason");
    }
    let mut out = VecDeque::new();
    engine.transmit().drain_into(&mut out);
});
