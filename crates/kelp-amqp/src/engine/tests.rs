#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
//! Unit tests of the sans-IO [`Engine`]: byte vectors in, frames and events out. No sockets, no
//! runtime. Server frames are built with the codec; what the engine writes is decoded back.

use super::*;
use crate::codec::*;
use crate::error::reply_code;

// ----- harness ---------------------------------------------------------------------------------

type Ev = Event<u32>;

struct H {
    e: Engine<u32>,
    t0: Instant,
}

impl H {
    fn new(config: Config) -> H {
        let t0 = Instant::now();
        H {
            e: Engine::new(config, t0),
            t0,
        }
    }

    fn at(&self, millis: u64) -> Instant {
        self.t0 + Duration::from_millis(millis)
    }

    fn feed(&mut self, b: impl AsRef<[u8]>) {
        let t0 = self.t0;
        self.feed_at(b, t0);
    }

    fn feed_at(&mut self, b: impl AsRef<[u8]>, now: Instant) {
        let mut buf = BytesMut::from(b.as_ref());
        self.e.handle_input(&mut buf, now);
    }

    fn raw_out(&mut self) -> Vec<Bytes> {
        let mut q = VecDeque::new();
        self.e.transmit().drain_into(&mut q);
        q.into_iter().collect()
    }

    fn out(&mut self) -> Vec<u8> {
        self.raw_out()
            .iter()
            .flat_map(|b| b.iter().copied())
            .collect()
    }

    fn sent(&mut self) -> Vec<Frame> {
        decode_all(&self.out())
    }

    fn sent_methods(&mut self) -> Vec<(u16, Method)> {
        self.sent()
            .into_iter()
            .map(|f| match f {
                Frame::Method { channel, method } => (channel, method),
                other => panic!("expected only method frames, got {other:?}"),
            })
            .collect()
    }

    fn events(&mut self) -> Vec<Ev> {
        std::iter::from_fn(|| self.e.poll_event()).collect()
    }

    /// Open channel `id` (token 1000 + id) and complete it with open-ok.
    fn open_channel(&mut self, id: u16) -> u16 {
        let got = self.e.open_channel(Some(id), 1000 + u32::from(id)).unwrap();
        assert_eq!(got, id);
        let sent = self.sent_methods();
        assert_eq!(
            sent,
            vec![(id, Method::ChannelOpen(ChannelOpen::default()))]
        );
        self.feed(mframe(id, ChannelOpenOk::default()));
        let ev = self.events();
        assert!(
            matches!(ev.as_slice(), [Event::Reply { token, reply: Reply::ChannelOpened(c) }]
                if *token == 1000 + u32::from(id) && *c == id),
            "{ev:?}"
        );
        id
    }
}

/// Decode every frame of a byte stream (skipping a leading protocol header).
fn decode_all(bytes: &[u8]) -> Vec<Frame> {
    let mut b = BytesMut::from(bytes);
    if b.starts_with(PROTOCOL_HEADER) {
        let _ = b.split_to(PROTOCOL_HEADER.len());
    }
    let mut v = Vec::new();
    while let Some(f) = decode_frame(&mut b, 0).unwrap() {
        v.push(f);
    }
    assert!(b.is_empty(), "partial frame left in output: {b:?}");
    v
}

fn mframe(channel: u16, m: impl Into<Method>) -> Vec<u8> {
    let mut b = BytesMut::new();
    encode_method(&mut b, channel, &m.into(), 0).unwrap();
    b.to_vec()
}

fn hframe(channel: u16, size: u64, props: &BasicProperties) -> Vec<u8> {
    let mut b = BytesMut::new();
    encode_header(&mut b, channel, size, props, 0).unwrap();
    b.to_vec()
}

fn bframe(channel: u16, payload: &[u8]) -> Vec<u8> {
    frame_to_bytes(
        &Frame::Body {
            channel,
            payload: Bytes::copy_from_slice(payload),
        },
        0,
    )
    .unwrap()
    .to_vec()
}

/// Method + header + body frames of at most `chunk` payload bytes each.
fn content(
    channel: u16,
    m: impl Into<Method>,
    props: &BasicProperties,
    body: &[u8],
    chunk: usize,
) -> Vec<u8> {
    let mut v = mframe(channel, m);
    v.extend(hframe(channel, body.len() as u64, props));
    for part in body.chunks(chunk.max(1)) {
        v.extend(bframe(channel, part));
    }
    v
}

fn cat(parts: &[&[u8]]) -> Vec<u8> {
    parts.iter().flat_map(|p| p.iter().copied()).collect()
}

fn start_method(mechanisms: &str) -> ConnectionStart {
    ConnectionStart {
        version_major: 0,
        version_minor: 9,
        server_properties: FieldTable::new()
            .with("product", "RabbitMQ")
            .with("version", "4.0.0")
            .with(
                "capabilities",
                FieldValue::Table(FieldTable::new().with("publisher_confirms", true)),
            ),
        mechanisms: Bytes::copy_from_slice(mechanisms.as_bytes()),
        locales: Bytes::from_static(b"en_US"),
    }
}

fn tune(channel_max: u16, frame_max: u32, heartbeat: u16) -> ConnectionTune {
    ConnectionTune {
        channel_max,
        frame_max,
        heartbeat,
    }
}

fn cfg() -> Config {
    Config::default()
}

fn cfg_hb(hb: Option<u16>) -> Config {
    Config {
        heartbeat: hb,
        ..Config::default()
    }
}

fn negotiate(h: &mut H, t: ConnectionTune) {
    h.feed(mframe(0, start_method("PLAIN AMQPLAIN EXTERNAL")));
    h.feed(mframe(0, t));
    h.feed(mframe(0, ConnectionOpenOk::default()));
}

fn connected_with(config: Config, t: ConnectionTune) -> H {
    let mut h = H::new(config);
    negotiate(&mut h, t);
    assert!(h.e.is_open(), "not open: {:?}", h.e.error());
    let _ = h.out();
    let ev = h.events();
    assert!(matches!(ev.as_slice(), [Event::Connected { .. }]), "{ev:?}");
    h
}

fn connected() -> H {
    connected_with(cfg(), tune(2047, 131_072, 60))
}

/// A connected engine with channel 1 open.
fn with_ch1() -> H {
    let mut h = connected();
    h.open_channel(1);
    h
}

fn deliver(tag: u64) -> BasicDeliver {
    BasicDeliver {
        consumer_tag: "ctag".into(),
        delivery_tag: tag,
        redelivered: false,
        exchange: "ex".into(),
        routing_key: "rk".into(),
    }
}

fn closed_error(ev: &[Ev]) -> Option<&Error> {
    let mut it = ev.iter().filter_map(|e| match e {
        Event::Closed { error } => Some(error.as_ref()),
        _ => None,
    });
    let first = it
        .next()
        .unwrap_or_else(|| panic!("no Closed event in {ev:?}"));
    assert!(it.next().is_none(), "two Closed events in {ev:?}");
    first
}

fn sent_close(frames: &[Frame]) -> Option<ConnectionClose> {
    frames.iter().find_map(|f| match f {
        Frame::Method {
            channel: 0,
            method: Method::ConnectionClose(c),
        } => Some(c.clone()),
        _ => None,
    })
}

/// Assert the engine closed with a protocol error and told the server with `code`.
fn assert_protocol_close(h: &mut H, code: u16) -> ProtocolError {
    assert!(h.e.is_closed());
    let frames = h.sent();
    let close = sent_close(&frames).unwrap_or_else(|| panic!("no connection.close in {frames:?}"));
    assert_eq!(close.reply_code, code, "{close:?}");
    let ev = h.events();
    match closed_error(&ev) {
        Some(Error::Protocol(p)) => p.clone(),
        other => panic!("expected a protocol error, got {other:?}"),
    }
}

fn delivery(ev: &[Ev]) -> Vec<Delivery> {
    ev.iter()
        .filter_map(|e| match e {
            Event::Delivery(d) => Some((**d).clone()),
            _ => None,
        })
        .collect()
}

// ----- negotiation -----------------------------------------------------------------------------

#[test]
fn first_output_is_the_protocol_header() {
    let mut h = H::new(cfg());
    assert_eq!(h.out(), b"AMQP\x00\x00\x09\x01".to_vec());
    assert!(!h.e.is_open());
    assert!(!h.e.is_closed());
    assert!(h.events().is_empty());
    assert_eq!(h.e.poll_timeout(), None, "no heartbeat before tune");
}

#[test]
fn full_plain_negotiation() {
    let mut h = H::new(Config {
        vhost: "prod".into(),
        heartbeat: Some(30),
        ..cfg()
    });
    assert_eq!(h.out(), PROTOCOL_HEADER.to_vec());

    h.feed(mframe(0, start_method("AMQPLAIN PLAIN")));
    let sent = h.sent_methods();
    assert_eq!(sent.len(), 1);
    let (0, Method::ConnectionStartOk(ok)) = &sent[0] else {
        panic!("{sent:?}")
    };
    assert_eq!(ok.mechanism, "PLAIN");
    assert_eq!(&ok.response[..], b"\0guest\0guest");
    assert_eq!(ok.locale, "en_US");
    let props = &ok.client_properties;
    assert_eq!(
        props.get("product").and_then(FieldValue::as_str),
        Some("kelp")
    );
    assert!(props.get("version").is_some());
    assert!(props.get("platform").is_some());
    let Some(FieldValue::Table(caps)) = props.get("capabilities") else {
        panic!("no capabilities table in {props:?}")
    };
    for cap in [
        "publisher_confirms",
        "exchange_exchange_bindings",
        "basic.nack",
        "consumer_cancel_notify",
        "connection.blocked",
        "authentication_failure_close",
        "per_consumer_qos",
    ] {
        assert_eq!(
            caps.get(cap).and_then(FieldValue::as_bool),
            Some(true),
            "{cap}"
        );
    }
    assert!(h.events().is_empty());
    assert!(!h.e.is_open());
    assert_eq!(
        h.e.server_properties()
            .get("product")
            .and_then(FieldValue::as_str),
        Some("RabbitMQ")
    );

    h.feed(mframe(0, tune(2047, 131_072, 60)));
    let sent = h.sent_methods();
    assert_eq!(
        sent,
        vec![
            (
                0,
                Method::ConnectionTuneOk(ConnectionTuneOk {
                    channel_max: 2047,
                    frame_max: 131_072,
                    heartbeat: 30
                })
            ),
            (
                0,
                Method::ConnectionOpen(ConnectionOpen {
                    virtual_host: "prod".into(),
                    ..Default::default()
                })
            ),
        ]
    );
    assert!(h.events().is_empty());
    assert!(!h.e.is_open());

    h.feed(mframe(0, ConnectionOpenOk::default()));
    assert!(h.e.is_open());
    assert!(h.out().is_empty());
    let ev = h.events();
    let [Event::Connected { server_properties }] = ev.as_slice() else {
        panic!("{ev:?}")
    };
    assert_eq!(
        server_properties
            .get("product")
            .and_then(FieldValue::as_str),
        Some("RabbitMQ")
    );
    assert_eq!(h.e.frame_max(), 131_072);
    assert_eq!(h.e.channel_max(), 2047);
    assert_eq!(h.e.heartbeat(), Duration::from_secs(30));
}

#[test]
fn negotiation_pipelined_in_one_buffer_and_byte_by_byte() {
    let server = cat(&[
        &mframe(0, start_method("PLAIN")),
        &mframe(0, tune(0, 0, 0)),
        &mframe(0, ConnectionOpenOk::default()),
    ]);
    let mut h1 = H::new(cfg());
    h1.feed(&server);
    let mut h2 = H::new(cfg());
    let mut buf = BytesMut::new();
    for b in &server {
        buf.extend_from_slice(&[*b]);
        h2.e.handle_input(&mut buf, h2.t0);
    }
    assert!(buf.is_empty());
    for h in [&mut h1, &mut h2] {
        assert!(h.e.is_open());
        let ev = h.events();
        assert!(matches!(ev.as_slice(), [Event::Connected { .. }]), "{ev:?}");
        let methods: Vec<_> = h
            .sent_methods()
            .into_iter()
            .map(|(_, m)| m.name())
            .collect();
        assert_eq!(
            methods,
            [
                "connection.start-ok",
                "connection.tune-ok",
                "connection.open"
            ]
        );
    }
}

#[test]
fn connection_name_and_extra_client_properties_are_sent() {
    let mut h = H::new(Config {
        connection_name: Some("orders-worker".into()),
        client_properties: FieldTable::new().with("team", "payments"),
        ..cfg()
    });
    let _ = h.out();
    h.feed(mframe(0, start_method("PLAIN")));
    let sent = h.sent_methods();
    let Method::ConnectionStartOk(ok) = &sent[0].1 else {
        panic!("{sent:?}")
    };
    let p = &ok.client_properties;
    assert_eq!(
        p.get("connection_name").and_then(FieldValue::as_str),
        Some("orders-worker")
    );
    assert_eq!(p.get("team").and_then(FieldValue::as_str), Some("payments"));
    assert!(matches!(p.get("capabilities"), Some(FieldValue::Table(_))));
}

#[test]
fn amqplain_response_is_table_entries_without_length_prefix() {
    let mut h = H::new(Config {
        sasl: Sasl::AmqPlain {
            user: "guest".into(),
            password: "s3cret".into(),
        },
        ..cfg()
    });
    let _ = h.out();
    h.feed(mframe(0, start_method("PLAIN AMQPLAIN")));
    let sent = h.sent_methods();
    let Method::ConnectionStartOk(ok) = &sent[0].1 else {
        panic!("{sent:?}")
    };
    assert_eq!(ok.mechanism, "AMQPLAIN");
    let mut expected = Vec::new();
    expected.extend_from_slice(b"\x05LOGINS\x00\x00\x00\x05guest");
    expected.extend_from_slice(b"\x08PASSWORDS\x00\x00\x00\x06s3cret");
    assert_eq!(&ok.response[..], &expected[..]);
    let t = FieldTable::decode_entries(ok.response.clone()).unwrap();
    assert_eq!(t.get("LOGIN").and_then(FieldValue::as_str), Some("guest"));
    assert_eq!(
        t.get("PASSWORD").and_then(FieldValue::as_str),
        Some("s3cret")
    );
}

#[test]
fn external_sends_an_empty_response() {
    let mut h = H::new(Config {
        sasl: Sasl::External,
        ..cfg()
    });
    let _ = h.out();
    h.feed(mframe(0, start_method("EXTERNAL PLAIN")));
    let sent = h.sent_methods();
    let Method::ConnectionStartOk(ok) = &sent[0].1 else {
        panic!("{sent:?}")
    };
    assert_eq!(ok.mechanism, "EXTERNAL");
    assert!(ok.response.is_empty());
}

#[test]
fn secure_challenge_gets_a_secure_ok() {
    let mut h = H::new(cfg());
    let _ = h.out();
    h.feed(mframe(0, start_method("PLAIN")));
    let _ = h.out();
    h.feed(mframe(
        0,
        ConnectionSecure {
            challenge: Bytes::from_static(b"?"),
        },
    ));
    assert_eq!(
        h.sent_methods(),
        vec![(
            0,
            Method::ConnectionSecureOk(ConnectionSecureOk {
                response: Bytes::from_static(b"\0guest\0guest")
            })
        )]
    );
    assert!(!h.e.is_closed());
}

#[test]
fn tune_negotiation() {
    struct Case {
        ours: (u16, u32, Option<u16>),
        theirs: (u16, u32, u16),
        want: (u16, u32, u16),
    }
    let cases = [
        // channel_max: min of non-zero; 0 on both sides is "no limit" = 65535.
        Case {
            ours: (2047, 131_072, Some(60)),
            theirs: (2047, 131_072, 60),
            want: (2047, 131_072, 60),
        },
        Case {
            ours: (2047, 131_072, Some(60)),
            theirs: (100, 131_072, 60),
            want: (100, 131_072, 60),
        },
        Case {
            ours: (2047, 131_072, Some(60)),
            theirs: (0, 131_072, 60),
            want: (2047, 131_072, 60),
        },
        Case {
            ours: (0, 131_072, Some(60)),
            theirs: (300, 131_072, 60),
            want: (300, 131_072, 60),
        },
        Case {
            ours: (0, 131_072, Some(60)),
            theirs: (0, 131_072, 60),
            want: (u16::MAX, 131_072, 60),
        },
        // frame_max: min of non-zero.
        Case {
            ours: (2047, 131_072, Some(60)),
            theirs: (2047, 65_536, 60),
            want: (2047, 65_536, 60),
        },
        Case {
            ours: (2047, 8192, Some(60)),
            theirs: (2047, 131_072, 60),
            want: (2047, 8192, 60),
        },
        Case {
            ours: (2047, 131_072, Some(60)),
            theirs: (2047, 0, 60),
            want: (2047, 131_072, 60),
        },
        Case {
            ours: (2047, 0, Some(60)),
            theirs: (2047, 65_536, 60),
            want: (2047, 65_536, 60),
        },
        // heartbeat: None takes the server's; Some(0) disables; otherwise min of non-zero.
        Case {
            ours: (2047, 131_072, None),
            theirs: (2047, 131_072, 60),
            want: (2047, 131_072, 60),
        },
        Case {
            ours: (2047, 131_072, None),
            theirs: (2047, 131_072, 0),
            want: (2047, 131_072, 0),
        },
        Case {
            ours: (2047, 131_072, Some(0)),
            theirs: (2047, 131_072, 60),
            want: (2047, 131_072, 0),
        },
        Case {
            ours: (2047, 131_072, Some(10)),
            theirs: (2047, 131_072, 60),
            want: (2047, 131_072, 10),
        },
        Case {
            ours: (2047, 131_072, Some(120)),
            theirs: (2047, 131_072, 60),
            want: (2047, 131_072, 60),
        },
        Case {
            ours: (2047, 131_072, Some(15)),
            theirs: (2047, 131_072, 0),
            want: (2047, 131_072, 15),
        },
    ];
    for (i, c) in cases.iter().enumerate() {
        let mut h = H::new(Config {
            channel_max: c.ours.0,
            frame_max: c.ours.1,
            heartbeat: c.ours.2,
            ..cfg()
        });
        h.feed(mframe(0, start_method("PLAIN")));
        let _ = h.out();
        h.feed(mframe(0, tune(c.theirs.0, c.theirs.1, c.theirs.2)));
        let sent = h.sent_methods();
        let (want_cm, want_fm, want_hb) = c.want;
        assert_eq!(
            sent.first(),
            Some(&(
                0,
                Method::ConnectionTuneOk(ConnectionTuneOk {
                    channel_max: want_cm,
                    frame_max: want_fm,
                    heartbeat: want_hb
                })
            )),
            "case {i}"
        );
        assert_eq!(h.e.channel_max(), want_cm, "case {i}");
        assert_eq!(h.e.frame_max(), want_fm, "case {i}");
        assert_eq!(
            h.e.heartbeat(),
            Duration::from_secs(want_hb.into()),
            "case {i}"
        );
        assert!(
            matches!(sent.get(1), Some((0, Method::ConnectionOpen(o))) if o.virtual_host == "/"),
            "case {i}: {sent:?}"
        );
    }
}

#[test]
fn mechanism_the_server_does_not_offer_closes() {
    let mut h = H::new(cfg());
    let _ = h.out();
    h.feed(mframe(0, start_method("AMQPLAIN EXTERNAL")));
    assert!(h.e.is_closed());
    // No start-ok with our credentials went out.
    assert!(h.sent().iter().all(|f| !matches!(
        f,
        Frame::Method {
            method: Method::ConnectionStartOk(_),
            ..
        }
    )));
    let ev = h.events();
    match closed_error(&ev) {
        Some(Error::Protocol(ProtocolError::MechanismUnavailable { wanted, offered })) => {
            assert_eq!(*wanted, "PLAIN");
            assert!(offered.contains("AMQPLAIN"), "{offered}");
        }
        other => panic!("{other:?}"),
    }
    assert!(matches!(
        h.e.error(),
        Some(Error::Protocol(ProtocolError::MechanismUnavailable { .. }))
    ));
}

#[test]
fn mechanism_match_is_by_whole_word() {
    let mut h = H::new(cfg());
    let _ = h.out();
    h.feed(mframe(0, start_method("PLAINX XPLAIN")));
    assert!(h.e.is_closed());
}

#[test]
fn wrong_protocol_version_closes() {
    let mut h = H::new(cfg());
    let _ = h.out();
    h.feed(mframe(
        0,
        ConnectionStart {
            version_major: 0,
            version_minor: 8,
            ..start_method("PLAIN")
        },
    ));
    assert!(h.e.is_closed());
    let ev = h.events();
    assert!(matches!(
        closed_error(&ev),
        Some(Error::Protocol(ProtocolError::Version {
            major: 0,
            minor: 8
        }))
    ));
}

#[test]
fn access_refused_during_auth_is_authentication_failed() {
    let mut h = H::new(Config {
        sasl: Sasl::Plain {
            user: "alice".into(),
            password: "hunter2-very-secret".into(),
        },
        ..cfg()
    });
    let _ = h.out();
    h.feed(mframe(0, start_method("PLAIN")));
    let _ = h.out();
    h.feed(mframe(
        0,
        ConnectionClose {
            reply_code: 403,
            reply_text: "ACCESS_REFUSED - Login was refused using authentication mechanism PLAIN"
                .into(),
            class_id: 0,
            method_id: 0,
        },
    ));
    assert!(h.e.is_closed());
    assert_eq!(
        h.sent_methods(),
        vec![(0, Method::ConnectionCloseOk(ConnectionCloseOk {}))]
    );
    let ev = h.events();
    let err = closed_error(&ev).unwrap();
    let Error::AuthenticationFailed {
        user,
        mechanism,
        detail,
    } = err
    else {
        panic!("{err:?}")
    };
    assert_eq!(user, "alice");
    assert_eq!(*mechanism, "PLAIN");
    assert!(detail.contains("ACCESS_REFUSED"));
    let shown = err.to_string();
    assert!(shown.contains("alice"), "{shown}");
    assert!(!shown.contains("hunter2"), "password leaked: {shown}");
    assert!(!format!("{err:?}").contains("hunter2"));
    assert!(
        !format!("{:?}", h.e).contains("hunter2"),
        "password in Engine's Debug"
    );
}

#[test]
fn not_allowed_on_open_is_vhost_access() {
    let mut h = H::new(Config {
        vhost: "secret-vhost".into(),
        ..cfg()
    });
    h.feed(mframe(0, start_method("PLAIN")));
    h.feed(mframe(0, tune(0, 131_072, 60)));
    let _ = h.out();
    h.feed(mframe(
        0,
        ConnectionClose {
            reply_code: 530,
            reply_text: "NOT_ALLOWED - access to vhost 'secret-vhost' refused".into(),
            class_id: 10,
            method_id: 40,
        },
    ));
    assert!(h.e.is_closed());
    assert_eq!(
        h.sent_methods(),
        vec![(0, Method::ConnectionCloseOk(ConnectionCloseOk {}))]
    );
    let ev = h.events();
    match closed_error(&ev) {
        Some(Error::VhostAccess { vhost, reason }) => {
            assert_eq!(vhost, "secret-vhost");
            assert_eq!(reason.code, 530);
            assert_eq!(reason.method(), Some("connection.open"));
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn eof_during_auth_is_authentication_failed() {
    let mut h = H::new(cfg());
    h.feed(mframe(0, start_method("PLAIN")));
    h.e.handle_eof();
    assert!(h.e.is_closed());
    let ev = h.events();
    assert!(
        matches!(closed_error(&ev), Some(Error::AuthenticationFailed { user, .. }) if user == "guest"),
        "{ev:?}"
    );
    // A second EOF is a no-op.
    h.e.handle_eof();
    assert!(h.events().is_empty());
}

#[test]
fn eof_when_open_is_an_io_error() {
    let mut h = with_ch1();
    h.e.call(1, QueueDeclare::default().into(), 7);
    h.e.handle_eof();
    let ev = h.events();
    assert!(
        matches!(closed_error(&ev), Some(Error::Io { .. })),
        "{ev:?}"
    );
    assert!(ev.iter().any(|e| matches!(
        e,
        Event::Failed {
            token: 7,
            error: Error::Io { .. }
        }
    )));
}

#[test]
fn requests_before_open_fail() {
    let mut h = H::new(cfg());
    h.feed(mframe(0, start_method("PLAIN")));
    let _ = h.out();
    let err = h.e.open_channel(None, 1).unwrap_err();
    assert_eq!(err.0, 1);
    assert!(matches!(err.1, Error::InvalidUse(_)));
    h.e.call(1, QueueDeclare::default().into(), 2);
    let ev = h.events();
    assert!(
        matches!(ev.as_slice(), [Event::Failed { token: 2, .. }]),
        "{ev:?}"
    );
    assert!(h.out().is_empty());
}

#[test]
fn unexpected_connection_method_during_negotiation_is_a_protocol_error() {
    let mut h = H::new(cfg());
    h.feed(mframe(0, start_method("PLAIN")));
    let _ = h.out();
    // open-ok before tune.
    h.feed(mframe(0, ConnectionOpenOk::default()));
    let p = assert_protocol_close(&mut h, reply_code::UNEXPECTED_FRAME);
    assert!(
        matches!(p, ProtocolError::UnexpectedFrame { channel: 0, .. }),
        "{p:?}"
    );
}

// ----- channels and request/reply matching -----------------------------------------------------

#[test]
fn channel_open_replies_channel_opened() {
    let mut h = connected();
    let id = h.e.open_channel(None, 5).unwrap();
    assert_eq!(id, 1);
    assert!(h.e.has_channel(1));
    assert_eq!(
        h.sent_methods(),
        vec![(1, Method::ChannelOpen(ChannelOpen::default()))]
    );
    assert!(h.events().is_empty());
    h.feed(mframe(1, ChannelOpenOk::default()));
    let ev = h.events();
    assert!(
        matches!(
            ev.as_slice(),
            [Event::Reply {
                token: 5,
                reply: Reply::ChannelOpened(1)
            }]
        ),
        "{ev:?}"
    );
    // Next free id.
    assert_eq!(h.e.open_channel(None, 6).unwrap(), 2);
    // Explicit ids.
    assert!(matches!(
        h.e.open_channel(Some(0), 7),
        Err((7, Error::InvalidUse(_)))
    ));
    assert!(matches!(
        h.e.open_channel(Some(1), 8),
        Err((8, Error::InvalidUse(_)))
    ));
    assert!(matches!(
        h.e.open_channel(Some(2048), 9),
        Err((9, Error::ChannelsExhausted(2047)))
    ));
    assert_eq!(h.e.open_channel(Some(2047), 10).unwrap(), 2047);
}

#[test]
fn channels_exhausted() {
    let mut h = connected_with(cfg(), tune(2, 131_072, 60));
    assert_eq!(h.e.open_channel(None, 1).unwrap(), 1);
    assert_eq!(h.e.open_channel(None, 2).unwrap(), 2);
    assert!(matches!(
        h.e.open_channel(None, 3),
        Err((3, Error::ChannelsExhausted(2)))
    ));
}

#[test]
fn replies_match_requests_in_fifo_order_on_one_channel() {
    let mut h = with_ch1();
    h.e.call(
        1,
        QueueDeclare {
            queue: "a".into(),
            ..Default::default()
        }
        .into(),
        1,
    );
    h.e.call(
        1,
        ExchangeDeclare {
            exchange: "x".into(),
            kind: "topic".into(),
            ..Default::default()
        }
        .into(),
        2,
    );
    h.e.call(
        1,
        QueueDeclare {
            queue: "b".into(),
            ..Default::default()
        }
        .into(),
        3,
    );
    h.e.call(
        1,
        BasicQos {
            prefetch_count: 10,
            ..Default::default()
        }
        .into(),
        4,
    );
    let names: Vec<_> = h
        .sent_methods()
        .into_iter()
        .map(|(c, m)| (c, m.name()))
        .collect();
    assert_eq!(
        names,
        [
            (1, "queue.declare"),
            (1, "exchange.declare"),
            (1, "queue.declare"),
            (1, "basic.qos")
        ]
    );
    assert!(h.events().is_empty());

    let ok = |q: &str, n| QueueDeclareOk {
        queue: q.into(),
        message_count: n,
        consumer_count: 0,
    };
    h.feed(cat(&[
        &mframe(1, ok("a", 1)),
        &mframe(1, ExchangeDeclareOk {}),
        &mframe(1, ok("b", 2)),
        &mframe(1, BasicQosOk {}),
    ]));
    let ev = h.events();
    assert_eq!(ev.len(), 4, "{ev:?}");
    let replies: Vec<(u32, Method)> = ev
        .into_iter()
        .map(|e| match e {
            Event::Reply {
                token,
                reply: Reply::Method(m),
            } => (token, m),
            other => panic!("{other:?}"),
        })
        .collect();
    assert_eq!(
        replies,
        vec![
            (1, Method::QueueDeclareOk(ok("a", 1))),
            (2, Method::ExchangeDeclareOk(ExchangeDeclareOk {})),
            (3, Method::QueueDeclareOk(ok("b", 2))),
            (4, Method::BasicQosOk(BasicQosOk {})),
        ]
    );
    assert!(h.e.is_open());
}

#[test]
fn replies_match_requests_per_channel() {
    let mut h = with_ch1();
    h.open_channel(2);
    h.e.call(1, QueueDeclare::default().into(), 11);
    h.e.call(2, QueueDeclare::default().into(), 21);
    h.e.call(1, QueueBind::default().into(), 12);
    h.e.call(2, QueuePurge::default().into(), 22);
    let _ = h.out();
    let dok = |q: &str| QueueDeclareOk {
        queue: q.into(),
        ..Default::default()
    };
    // Channel 2 answers first, then channel 1.
    h.feed(mframe(2, dok("two")));
    h.feed(mframe(1, dok("one")));
    h.feed(mframe(2, QueuePurgeOk { message_count: 9 }));
    h.feed(mframe(1, QueueBindOk {}));
    let ev = h.events();
    let got: Vec<(u32, Method)> = ev
        .into_iter()
        .map(|e| match e {
            Event::Reply {
                token,
                reply: Reply::Method(m),
            } => (token, m),
            other => panic!("{other:?}"),
        })
        .collect();
    assert_eq!(
        got,
        vec![
            (21, Method::QueueDeclareOk(dok("two"))),
            (11, Method::QueueDeclareOk(dok("one"))),
            (22, Method::QueuePurgeOk(QueuePurgeOk { message_count: 9 })),
            (12, Method::QueueBindOk(QueueBindOk {})),
        ]
    );
}

#[test]
fn reply_that_does_not_match_the_pending_request_closes_with_505() {
    let mut h = with_ch1();
    h.e.call(1, QueueDeclare::default().into(), 1);
    h.e.call(1, QueueBind::default().into(), 2);
    let _ = h.out();
    h.feed(mframe(1, ExchangeDeclareOk {}));
    assert!(h.e.is_closed());
    let frames = h.sent();
    let close = sent_close(&frames).unwrap();
    assert_eq!(close.reply_code, 505);
    assert!(
        close.reply_text.contains("exchange.declare-ok"),
        "{close:?}"
    );
    let ev = h.events();
    let failed: Vec<u32> = ev
        .iter()
        .filter_map(|e| match e {
            Event::Failed {
                token,
                error: Error::Protocol(ProtocolError::UnexpectedFrame { .. }),
            } => Some(*token),
            _ => None,
        })
        .collect();
    assert_eq!(failed, vec![1, 2]);
    assert!(ev.iter().any(|e| matches!(
        e,
        Event::ChannelClosed {
            channel: 1,
            error: Some(_)
        }
    )));
    assert!(matches!(
        closed_error(&ev),
        Some(Error::Protocol(ProtocolError::UnexpectedFrame {
            channel: 1,
            ..
        }))
    ));
}

#[test]
fn reply_without_a_pending_request_is_a_protocol_error() {
    let mut h = with_ch1();
    h.feed(mframe(1, QueueDeclareOk::default()));
    let p = assert_protocol_close(&mut h, 505);
    assert!(matches!(
        p,
        ProtocolError::UnexpectedFrame { channel: 1, .. }
    ));
}

#[test]
fn methods_for_unknown_channels_are_ignored() {
    let mut h = with_ch1();
    h.feed(mframe(9, QueueDeclareOk::default()));
    h.feed(hframe(9, 3, &BasicProperties::default()));
    h.feed(bframe(9, b"abc"));
    assert!(h.e.is_open());
    assert!(h.events().is_empty());
    assert!(h.out().is_empty());
}

#[test]
fn nowait_requests_reply_sent_at_once() {
    let mut h = with_ch1();
    let nowait: Vec<Method> = vec![
        QueueDeclare {
            nowait: true,
            ..Default::default()
        }
        .into(),
        ExchangeDeclare {
            nowait: true,
            ..Default::default()
        }
        .into(),
        ExchangeDelete {
            nowait: true,
            ..Default::default()
        }
        .into(),
        ExchangeBind {
            nowait: true,
            ..Default::default()
        }
        .into(),
        ExchangeUnbind {
            nowait: true,
            ..Default::default()
        }
        .into(),
        QueueBind {
            nowait: true,
            ..Default::default()
        }
        .into(),
        QueuePurge {
            nowait: true,
            ..Default::default()
        }
        .into(),
        QueueDelete {
            nowait: true,
            ..Default::default()
        }
        .into(),
        BasicConsume {
            nowait: true,
            ..Default::default()
        }
        .into(),
        BasicCancel {
            nowait: true,
            ..Default::default()
        }
        .into(),
        BasicAck {
            delivery_tag: 1,
            multiple: false,
        }
        .into(),
        BasicRecoverAsync { requeue: true }.into(),
    ];
    for (i, m) in nowait.iter().enumerate() {
        h.e.call(1, m.clone(), i as u32);
        let ev = h.events();
        assert!(
            matches!(ev.as_slice(), [Event::Reply { token, reply: Reply::Sent }] if *token == i as u32),
            "{}: {ev:?}",
            m.name()
        );
        assert_eq!(h.sent_methods(), vec![(1, m.clone())]);
    }
    // A reply arriving now matches nothing.
    h.feed(mframe(1, QueueDeclareOk::default()));
    assert!(h.e.is_closed());
}

#[test]
fn send_writes_methods_without_replies() {
    let mut h = with_ch1();
    for m in [
        Method::from(BasicAck {
            delivery_tag: 3,
            multiple: true,
        }),
        BasicNack {
            delivery_tag: 4,
            multiple: false,
            requeue: true,
        }
        .into(),
        BasicReject {
            delivery_tag: 5,
            requeue: false,
        }
        .into(),
    ] {
        h.e.send(1, &m).unwrap();
        assert_eq!(h.sent_methods(), vec![(1, m)]);
    }
    assert!(h.events().is_empty());
    assert!(matches!(
        h.e.send(5, &BasicAck::default().into()),
        Err(Error::InvalidUse(_))
    ));
}

#[test]
fn basic_get_ok_with_content_replies_get() {
    let mut h = with_ch1();
    h.e.call(
        1,
        BasicGet {
            queue: "q".into(),
            no_ack: true,
            ..Default::default()
        }
        .into(),
        5,
    );
    assert_eq!(h.sent_methods()[0].1.name(), "basic.get");
    let props = BasicProperties::default().with_message_id("m-1");
    h.feed(content(
        1,
        BasicGetOk {
            delivery_tag: 77,
            redelivered: true,
            exchange: "ex".into(),
            routing_key: "rk".into(),
            message_count: 3,
        },
        &props,
        b"hello",
        100,
    ));
    let ev = h.events();
    let [Event::Reply {
        token: 5,
        reply: Reply::Get(msg),
    }] = ev.as_slice()
    else {
        panic!("{ev:?}")
    };
    assert_eq!(msg.message_count, 3);
    let d = &msg.delivery;
    assert_eq!(d.channel, 1);
    assert_eq!(d.delivery_tag, 77);
    assert!(d.redelivered);
    assert_eq!(d.exchange, "ex");
    assert_eq!(d.routing_key, "rk");
    assert_eq!(d.consumer_tag, "");
    assert_eq!(d.properties, props);
    assert_eq!(&d.body[..], b"hello");
}

#[test]
fn basic_get_empty_replies_get_empty() {
    let mut h = with_ch1();
    h.e.call(1, BasicGet::default().into(), 5);
    h.e.call(1, BasicGet::default().into(), 6);
    let _ = h.out();
    h.feed(mframe(1, BasicGetEmpty::default()));
    h.feed(content(
        1,
        BasicGetOk::default(),
        &BasicProperties::default(),
        b"x",
        10,
    ));
    let ev = h.events();
    assert!(
        matches!(
            ev.as_slice(),
            [
                Event::Reply {
                    token: 5,
                    reply: Reply::GetEmpty
                },
                Event::Reply {
                    token: 6,
                    reply: Reply::Get(_)
                }
            ]
        ),
        "{ev:?}"
    );
}

#[test]
fn get_ok_without_a_pending_get_is_a_protocol_error() {
    let mut h = with_ch1();
    h.e.call(1, QueueDeclare::default().into(), 5);
    let _ = h.out();
    h.feed(content(
        1,
        BasicGetOk::default(),
        &BasicProperties::default(),
        b"x",
        10,
    ));
    assert_protocol_close(&mut h, 505);
}

// ----- content assembly ------------------------------------------------------------------------

#[test]
fn deliver_header_body_in_one_input_shares_memory() {
    let mut h = with_ch1();
    let props = BasicProperties::default()
        .with_content_type("text/plain")
        .with_delivery_mode(2)
        .with_headers(FieldTable::new().with("k", 1i32));
    let bytes = content(1, deliver(42), &props, b"hello world", 1000);
    let mut buf = BytesMut::from(&bytes[..]);
    let start = buf.as_ptr() as usize;
    let range = start..start + buf.len();
    h.e.handle_input(&mut buf, h.t0);
    assert!(buf.is_empty());
    let ev = h.events();
    let [Event::Delivery(d)] = ev.as_slice() else {
        panic!("{ev:?}")
    };
    assert_eq!(d.channel, 1);
    assert_eq!(d.consumer_tag, "ctag");
    assert_eq!(d.delivery_tag, 42);
    assert_eq!(d.exchange, "ex");
    assert_eq!(d.routing_key, "rk");
    assert_eq!(d.properties, props);
    assert_eq!(&d.body[..], b"hello world");
    assert!(
        range.contains(&(d.body.as_ptr() as usize)),
        "single-frame body was copied"
    );
    assert!(h.out().is_empty());
}

#[test]
fn body_split_across_three_frames() {
    let mut h = with_ch1();
    let body: Vec<u8> = (0..3000u32).map(|i| (i % 251) as u8).collect();
    let bytes = content(1, deliver(1), &BasicProperties::default(), &body, 1000);
    // Fed in uneven pieces that cut frames anywhere.
    let mut buf = BytesMut::new();
    for piece in bytes.chunks(333) {
        buf.extend_from_slice(piece);
        h.e.handle_input(&mut buf, h.t0);
    }
    assert!(buf.is_empty());
    let ev = h.events();
    let ds = delivery(&ev);
    assert_eq!(ev.len(), 1, "{ev:?}");
    assert_eq!(ds[0].body.len(), 3000);
    assert_eq!(&ds[0].body[..], &body[..]);
}

#[test]
fn delivery_only_after_last_body_frame() {
    let mut h = with_ch1();
    h.feed(mframe(1, deliver(1)));
    h.feed(hframe(1, 6, &BasicProperties::default()));
    assert!(h.events().is_empty());
    h.feed(bframe(1, b"abc"));
    assert!(h.events().is_empty());
    h.feed(bframe(1, b""));
    assert!(h.events().is_empty());
    h.feed(bframe(1, b"def"));
    let ev = h.events();
    assert_eq!(&delivery(&ev)[0].body[..], b"abcdef");
}

#[test]
fn zero_size_body_is_header_only() {
    let mut h = with_ch1();
    h.feed(cat(&[
        &mframe(1, deliver(1)),
        &hframe(1, 0, &BasicProperties::default().with_kind("ping")),
    ]));
    let ev = h.events();
    let ds = delivery(&ev);
    assert_eq!(ds.len(), 1, "{ev:?}");
    assert!(ds[0].body.is_empty());
    assert_eq!(ds[0].properties.kind.as_deref(), Some("ping"));
    // The next message on the channel is unaffected.
    h.feed(content(
        1,
        deliver(2),
        &BasicProperties::default(),
        b"z",
        10,
    ));
    let ev = h.events();
    assert_eq!(delivery(&ev)[0].delivery_tag, 2);
}

#[test]
fn two_channels_interleave_contents() {
    let mut h = with_ch1();
    h.open_channel(2);
    let p = BasicProperties::default();
    h.feed(cat(&[
        &mframe(1, deliver(1)),
        &mframe(2, deliver(2)),
        &hframe(2, 4, &p),
        &hframe(1, 6, &p),
        &bframe(1, b"one"),
        &bframe(2, b"tw"),
        &bframe(1, b"111"),
        &bframe(2, b"o2"),
    ]));
    let ev = h.events();
    let ds = delivery(&ev);
    assert_eq!(ds.len(), 2, "{ev:?}");
    // Channel 1 completed first (its last frame came first).
    assert_eq!(
        (ds[0].channel, ds[0].delivery_tag, &ds[0].body[..]),
        (1, 1, &b"one111"[..])
    );
    assert_eq!(
        (ds[1].channel, ds[1].delivery_tag, &ds[1].body[..]),
        (2, 2, &b"two2"[..])
    );
}

#[test]
fn body_longer_than_announced_is_body_too_long() {
    let mut h = with_ch1();
    h.feed(cat(&[
        &mframe(1, deliver(1)),
        &hframe(1, 4, &BasicProperties::default()),
        &bframe(1, b"abc"),
        &bframe(1, b"de"),
    ]));
    let p = assert_protocol_close(&mut h, 505);
    assert_eq!(
        p,
        ProtocolError::BodyTooLong {
            channel: 1,
            announced: 4
        }
    );
}

#[test]
fn header_without_a_method_is_an_error() {
    let mut h = with_ch1();
    h.feed(hframe(1, 4, &BasicProperties::default()));
    let p = assert_protocol_close(&mut h, 505);
    assert!(
        matches!(p, ProtocolError::UnexpectedFrame { channel: 1, .. }),
        "{p:?}"
    );
}

#[test]
fn body_without_a_header_is_an_error() {
    let mut h = with_ch1();
    h.feed(cat(&[&mframe(1, deliver(1)), &bframe(1, b"abc")]));
    let p = assert_protocol_close(&mut h, 505);
    assert!(
        matches!(p, ProtocolError::UnexpectedFrame { channel: 1, .. }),
        "{p:?}"
    );
}

#[test]
fn second_header_is_an_error() {
    let mut h = with_ch1();
    let p0 = BasicProperties::default();
    h.feed(cat(&[
        &mframe(1, deliver(1)),
        &hframe(1, 4, &p0),
        &hframe(1, 4, &p0),
    ]));
    assert_protocol_close(&mut h, 505);
}

#[test]
fn method_during_content_is_an_error() {
    let mut h = with_ch1();
    h.feed(cat(&[
        &mframe(1, deliver(1)),
        &hframe(1, 4, &BasicProperties::default()),
        &mframe(1, deliver(2)),
    ]));
    let p = assert_protocol_close(&mut h, 505);
    assert!(
        matches!(p, ProtocolError::UnexpectedFrame { channel: 1, .. }),
        "{p:?}"
    );
}

#[test]
fn body_size_over_max_message_size_is_message_too_large() {
    let mut h = connected_with(
        Config {
            max_message_size: 1000,
            ..cfg()
        },
        tune(0, 131_072, 60),
    );
    h.open_channel(1);
    // Exactly the limit is fine.
    h.feed(content(
        1,
        deliver(1),
        &BasicProperties::default(),
        &[7; 1000],
        600,
    ));
    assert_eq!(delivery(&h.events()).len(), 1);
    // One more byte is not, and fails on the header (before any body arrives).
    h.feed(cat(&[
        &mframe(1, deliver(2)),
        &hframe(1, 1001, &BasicProperties::default()),
    ]));
    let p = assert_protocol_close(&mut h, reply_code::CONTENT_TOO_LARGE);
    assert_eq!(
        p,
        ProtocolError::MessageTooLarge {
            channel: 1,
            size: 1001,
            limit: 1000
        }
    );
}

#[test]
fn huge_announced_body_size_is_rejected_without_allocating() {
    let mut h = with_ch1();
    h.feed(cat(&[
        &mframe(1, deliver(1)),
        &hframe(1, u64::MAX, &BasicProperties::default()),
    ]));
    let p = assert_protocol_close(&mut h, reply_code::CONTENT_TOO_LARGE);
    assert!(matches!(
        p,
        ProtocolError::MessageTooLarge { size: u64::MAX, .. }
    ));
}

#[test]
fn frames_after_a_protocol_error_in_the_same_input_are_discarded() {
    let mut h = with_ch1();
    let mut buf = BytesMut::from(
        &cat(&[
            &hframe(1, 3, &BasicProperties::default()),
            &content(1, deliver(1), &BasicProperties::default(), b"abc", 10),
        ])[..],
    );
    h.e.handle_input(&mut buf, h.t0);
    assert!(buf.is_empty());
    assert!(h.e.is_closed());
    let ev = h.events();
    assert!(delivery(&ev).is_empty(), "{ev:?}");
    // Input after close is ignored.
    h.feed(content(
        1,
        deliver(2),
        &BasicProperties::default(),
        b"abc",
        10,
    ));
    assert!(h.events().is_empty());
}

#[test]
fn decode_errors_close_with_the_matching_reply_code() {
    // Unknown method → 540 NOT_IMPLEMENTED.
    let mut h = with_ch1();
    h.feed([1, 0, 1, 0, 0, 0, 4, 0, 99, 0, 1, 0xCE]);
    let p = assert_protocol_close(&mut h, reply_code::NOT_IMPLEMENTED);
    assert!(matches!(
        p,
        ProtocolError::Decode(DecodeError::UnknownMethod {
            class_id: 99,
            method_id: 1
        })
    ));

    // Invalid UTF-8 in a short string → 502 SYNTAX_ERROR.
    let mut h = with_ch1();
    // basic.cancel: class, method, shortstr of 2 invalid bytes, nowait bit.
    let payload = [0, 60, 0, 30, 2, 0xC3, 0x28, 0];
    let mut f = vec![1, 0, 1];
    f.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    f.extend_from_slice(&payload);
    f.push(0xCE);
    h.feed(f);
    let p = assert_protocol_close(&mut h, reply_code::SYNTAX_ERROR);
    assert_eq!(p, ProtocolError::Decode(DecodeError::InvalidUtf8));

    // Bad frame end → 501 FRAME_ERROR.
    let mut h = with_ch1();
    h.feed([8, 0, 0, 0, 0, 0, 0, 0xCD]);
    let p = assert_protocol_close(&mut h, reply_code::FRAME_ERROR);
    assert_eq!(p, ProtocolError::Decode(DecodeError::BadFrameEnd(0xCD)));
}

#[test]
fn heartbeat_on_a_channel_is_a_frame_error() {
    let mut h = with_ch1();
    h.feed([8, 0, 1, 0, 0, 0, 0, 0xCE]);
    let p = assert_protocol_close(&mut h, reply_code::FRAME_ERROR);
    assert_eq!(p, ProtocolError::Decode(DecodeError::HeartbeatOnChannel(1)));
}

#[test]
fn channel_method_on_channel_zero_is_unexpected() {
    let mut h = with_ch1();
    h.feed(mframe(0, deliver(1)));
    let p = assert_protocol_close(&mut h, 505);
    assert!(matches!(
        p,
        ProtocolError::UnexpectedFrame { channel: 0, .. }
    ));
}

// ----- publishing and publisher confirms -------------------------------------------------------

#[test]
fn publish_writes_method_header_and_body() {
    let mut h = with_ch1();
    let props = BasicProperties::default()
        .with_content_type("application/json")
        .with_correlation_id("c-1")
        .with_headers(FieldTable::new().with("x-trace", "abc"));
    let seq =
        h.e.publish(
            1,
            "amq.topic",
            "a.b",
            true,
            false,
            &props,
            Bytes::from_static(b"{}"),
            None,
        )
        .unwrap();
    assert_eq!(seq, None);
    let frames = h.sent();
    assert_eq!(
        frames,
        vec![
            Frame::Method {
                channel: 1,
                method: BasicPublish {
                    exchange: "amq.topic".into(),
                    routing_key: "a.b".into(),
                    mandatory: true,
                    immediate: false,
                    ..Default::default()
                }
                .into()
            },
            Frame::Header {
                channel: 1,
                header: ContentHeader {
                    class_id: 60,
                    body_size: 2,
                    properties: props
                }
            },
            Frame::Body {
                channel: 1,
                payload: Bytes::from_static(b"{}")
            },
        ]
    );
    // The hand-written publish frame equals the codec's encoding, bits included.
    for (m, i) in [(true, true), (false, true), (true, false)] {
        h.e.publish(
            1,
            "e",
            "k",
            m,
            i,
            &BasicProperties::default(),
            Bytes::new(),
            None,
        )
        .unwrap();
        let out = h.out();
        let mut want = BytesMut::new();
        let bp: Method = BasicPublish {
            exchange: "e".into(),
            routing_key: "k".into(),
            mandatory: m,
            immediate: i,
            ..Default::default()
        }
        .into();
        encode_method(&mut want, 1, &bp, 0).unwrap();
        encode_header(&mut want, 1, 0, &BasicProperties::default(), 0).unwrap();
        assert_eq!(out, want.to_vec(), "mandatory={m} immediate={i}");
    }
}

#[test]
fn publish_without_confirm_mode_is_not_requested() {
    let mut h = with_ch1();
    let r =
        h.e.publish(
            1,
            "",
            "q",
            false,
            false,
            &BasicProperties::default(),
            Bytes::from_static(b"x"),
            Some(9),
        )
        .unwrap();
    assert_eq!(r, None);
    let ev = h.events();
    assert!(
        matches!(
            ev.as_slice(),
            [Event::Confirm {
                token: 9,
                confirmation: Confirmation::NotRequested
            }]
        ),
        "{ev:?}"
    );
    assert!(!h.e.is_confirm(1));
    assert_eq!(h.e.unconfirmed(1), 0);
    // Without a token: no event.
    h.e.publish(
        1,
        "",
        "q",
        false,
        false,
        &BasicProperties::default(),
        Bytes::new(),
        None,
    )
    .unwrap();
    assert!(h.events().is_empty());
}

#[test]
fn publish_on_unknown_channel_fails() {
    let mut h = connected();
    let err =
        h.e.publish(
            3,
            "",
            "q",
            false,
            false,
            &BasicProperties::default(),
            Bytes::new(),
            Some(1),
        )
        .unwrap_err();
    assert!(matches!(err, (Some(1), Error::InvalidUse(_))));
    assert!(h.out().is_empty());
}

#[test]
fn publish_with_too_long_name_fails_and_writes_nothing() {
    let mut h = with_ch1();
    let long = "x".repeat(256);
    let err =
        h.e.publish(
            1,
            &long,
            "q",
            false,
            false,
            &BasicProperties::default(),
            Bytes::new(),
            Some(1),
        )
        .unwrap_err();
    assert!(matches!(
        err,
        (
            Some(1),
            Error::Encode(EncodeError::ShortStringTooLong { len: 256, .. })
        )
    ));
    let err =
        h.e.publish(
            1,
            "",
            "q",
            false,
            false,
            &BasicProperties::default().with_app_id(long.as_str()),
            Bytes::from_static(b"body"),
            None,
        )
        .unwrap_err();
    assert!(matches!(err, (None, Error::Encode(_))));
    assert!(h.out().is_empty());
    assert!(h.e.is_open());
}

fn confirm_channel() -> H {
    let mut h = with_ch1();
    h.e.call(1, ConfirmSelect { nowait: false }.into(), 1);
    assert!(h.e.is_confirm(1));
    assert_eq!(
        h.sent_methods(),
        vec![(1, Method::ConfirmSelect(ConfirmSelect { nowait: false }))]
    );
    h.feed(mframe(1, ConfirmSelectOk {}));
    let ev = h.events();
    assert!(
        matches!(
            ev.as_slice(),
            [Event::Reply {
                token: 1,
                reply: Reply::Method(Method::ConfirmSelectOk(_))
            }]
        ),
        "{ev:?}"
    );
    h
}

fn publish_n(h: &mut H, tokens: std::ops::Range<u32>) -> Vec<Option<u64>> {
    tokens
        .map(|t| {
            h.e.publish(
                1,
                "",
                "q",
                false,
                false,
                &BasicProperties::default(),
                Bytes::from_static(b"m"),
                Some(t),
            )
            .unwrap()
        })
        .collect()
}

fn confirms(ev: &[Ev]) -> Vec<(u32, Confirmation)> {
    ev.iter()
        .map(|e| match e {
            Event::Confirm {
                token,
                confirmation,
            } => (*token, confirmation.clone()),
            other => panic!("{other:?}"),
        })
        .collect()
}

#[test]
fn confirm_mode_numbers_publishes_from_one() {
    let mut h = confirm_channel();
    let seqs = publish_n(&mut h, 10..15);
    assert_eq!(seqs, vec![Some(1), Some(2), Some(3), Some(4), Some(5)]);
    assert_eq!(h.e.unconfirmed(1), 5);
    assert!(h.events().is_empty());
    // A publish without a token still takes a sequence number.
    let s =
        h.e.publish(
            1,
            "",
            "q",
            false,
            false,
            &BasicProperties::default(),
            Bytes::new(),
            None,
        )
        .unwrap();
    assert_eq!(s, Some(6));
    assert_eq!(h.e.unconfirmed(1), 5);
}

#[test]
fn single_multiple_acks_and_nacks() {
    let mut h = confirm_channel();
    publish_n(&mut h, 10..16); // seq 1..=6 → tokens 10..=15
    h.feed(mframe(
        1,
        BasicAck {
            delivery_tag: 2,
            multiple: false,
        },
    ));
    assert_eq!(confirms(&h.events()), vec![(11, Confirmation::Ack)]);
    h.feed(mframe(
        1,
        BasicAck {
            delivery_tag: 4,
            multiple: true,
        },
    ));
    assert_eq!(
        confirms(&h.events()),
        vec![
            (10, Confirmation::Ack),
            (12, Confirmation::Ack),
            (13, Confirmation::Ack)
        ]
    );
    assert_eq!(h.e.unconfirmed(1), 2);
    h.feed(mframe(
        1,
        BasicNack {
            delivery_tag: 5,
            multiple: false,
            requeue: false,
        },
    ));
    assert_eq!(confirms(&h.events()), vec![(14, Confirmation::Nack)]);
    // Duplicate / unknown tags are ignored.
    h.feed(mframe(
        1,
        BasicAck {
            delivery_tag: 2,
            multiple: false,
        },
    ));
    assert!(h.events().is_empty());
    h.feed(mframe(
        1,
        BasicNack {
            delivery_tag: 6,
            multiple: true,
            requeue: false,
        },
    ));
    assert_eq!(confirms(&h.events()), vec![(15, Confirmation::Nack)]);
    assert_eq!(h.e.unconfirmed(1), 0);
    assert!(h.e.is_open());
}

#[test]
fn confirm_select_nowait_replies_sent_and_numbers_publishes() {
    let mut h = with_ch1();
    h.e.call(1, ConfirmSelect { nowait: true }.into(), 1);
    let ev = h.events();
    assert!(matches!(
        ev.as_slice(),
        [Event::Reply {
            token: 1,
            reply: Reply::Sent
        }]
    ));
    assert_eq!(publish_n(&mut h, 5..7), vec![Some(1), Some(2)]);
    h.feed(mframe(
        1,
        BasicAck {
            delivery_tag: 2,
            multiple: true,
        },
    ));
    assert_eq!(
        confirms(&h.events()),
        vec![(5, Confirmation::Ack), (6, Confirmation::Ack)]
    );
}

#[test]
fn ack_without_confirm_mode_is_a_protocol_error() {
    let mut h = with_ch1();
    h.feed(mframe(
        1,
        BasicAck {
            delivery_tag: 1,
            multiple: false,
        },
    ));
    assert_protocol_close(&mut h, 505);
}

#[test]
fn basic_return_content_is_returned() {
    let mut h = with_ch1();
    let props = BasicProperties::default().with_message_id("lost");
    h.feed(content(
        1,
        BasicReturn {
            reply_code: 312,
            reply_text: "NO_ROUTE".into(),
            exchange: "ex".into(),
            routing_key: "nowhere".into(),
        },
        &props,
        b"returned body",
        5,
    ));
    let ev = h.events();
    let [Event::Returned(r)] = ev.as_slice() else {
        panic!("{ev:?}")
    };
    assert_eq!(r.channel, 1);
    assert_eq!(r.reply_code, 312);
    assert_eq!(r.reply_text, "NO_ROUTE");
    assert_eq!(r.exchange, "ex");
    assert_eq!(r.routing_key, "nowhere");
    assert_eq!(r.properties, props);
    assert_eq!(&r.body[..], b"returned body");
}

// ----- broker-initiated channel events ---------------------------------------------------------

#[test]
fn broker_cancel_sends_cancel_ok_unless_nowait() {
    let mut h = with_ch1();
    h.feed(mframe(
        1,
        BasicCancel {
            consumer_tag: "c1".into(),
            nowait: false,
        },
    ));
    assert_eq!(
        h.sent_methods(),
        vec![(
            1,
            Method::BasicCancelOk(BasicCancelOk {
                consumer_tag: "c1".into()
            })
        )]
    );
    let ev = h.events();
    assert!(
        matches!(ev.as_slice(), [Event::ConsumerCancelled { channel: 1, consumer_tag }] if consumer_tag == "c1"),
        "{ev:?}"
    );
    h.feed(mframe(
        1,
        BasicCancel {
            consumer_tag: "c2".into(),
            nowait: true,
        },
    ));
    assert!(h.out().is_empty());
    let ev = h.events();
    assert!(
        matches!(ev.as_slice(), [Event::ConsumerCancelled { channel: 1, consumer_tag }] if consumer_tag == "c2"),
        "{ev:?}"
    );
    assert!(h.e.is_open());
}

#[test]
fn broker_channel_close_fails_what_waits_on_the_channel() {
    let mut h = confirm_channel();
    h.open_channel(2);
    publish_n(&mut h, 20..22);
    h.e.call(
        1,
        QueueDeclare {
            queue: "missing".into(),
            passive: true,
            ..Default::default()
        }
        .into(),
        30,
    );
    h.e.call(2, QueueDeclare::default().into(), 40);
    let _ = h.out();
    h.feed(mframe(
        1,
        ChannelClose {
            reply_code: 404,
            reply_text: "NOT_FOUND - no queue 'missing' in vhost '/'".into(),
            class_id: 50,
            method_id: 10,
        },
    ));
    assert_eq!(
        h.sent_methods(),
        vec![(1, Method::ChannelCloseOk(ChannelCloseOk {}))]
    );
    let ev = h.events();
    let mut failed = Vec::new();
    let mut closed = None;
    for e in &ev {
        match e {
            Event::Failed {
                token,
                error: Error::ChannelClosed { channel: 1, reason },
            } => {
                assert_eq!(reason.code, 404);
                assert_eq!(reason.method(), Some("queue.declare"));
                failed.push(*token);
            }
            Event::ChannelClosed {
                channel: 1,
                error: Some(Error::ChannelClosed { reason, .. }),
            } => closed = Some(reason.code),
            other => panic!("unexpected {other:?}"),
        }
    }
    failed.sort_unstable();
    assert_eq!(failed, vec![20, 21, 30]);
    assert_eq!(closed, Some(404));
    assert!(h.e.is_open());
    assert!(!h.e.has_channel(1));

    // Later calls on channel 1 fail.
    h.e.call(1, QueueDeclare::default().into(), 50);
    let ev = h.events();
    assert!(
        matches!(ev.as_slice(), [Event::Failed { token: 50, .. }]),
        "{ev:?}"
    );
    assert!(h
        .e
        .publish(
            1,
            "",
            "q",
            false,
            false,
            &BasicProperties::default(),
            Bytes::new(),
            Some(51)
        )
        .is_err());
    assert!(h.e.send(1, &BasicAck::default().into()).is_err());
    assert!(h.out().is_empty());

    // Channel 2 is unaffected.
    h.feed(mframe(2, QueueDeclareOk::default()));
    let ev = h.events();
    assert!(
        matches!(ev.as_slice(), [Event::Reply { token: 40, .. }]),
        "{ev:?}"
    );

    // The id can be opened again.
    h.open_channel(1);
    assert!(!h.e.is_confirm(1));
}

#[test]
fn client_channel_close_round_trip() {
    let mut h = with_ch1();
    h.e.call(
        1,
        ChannelClose {
            reply_code: 200,
            reply_text: "bye".into(),
            ..Default::default()
        }
        .into(),
        5,
    );
    let sent = h.sent_methods();
    assert!(matches!(&sent[..], [(1, Method::ChannelClose(c))] if c.reply_code == 200));
    assert!(h.events().is_empty());
    // While closing, new requests fail.
    h.e.call(1, QueueDeclare::default().into(), 6);
    let ev = h.events();
    assert!(
        matches!(
            ev.as_slice(),
            [Event::Failed {
                token: 6,
                error: Error::ChannelClosedByClient(1)
            }]
        ),
        "{ev:?}"
    );
    assert!(matches!(
        h.e.publish(
            1,
            "",
            "q",
            false,
            false,
            &BasicProperties::default(),
            Bytes::new(),
            Some(7)
        ),
        Err((Some(7), Error::ChannelClosedByClient(1)))
    ));
    assert!(h.out().is_empty());
    h.feed(mframe(1, ChannelCloseOk {}));
    let ev = h.events();
    // The channel's close comes before the close's reply: a driver marks the handle closed
    // before the caller of close() can run again.
    assert!(
        matches!(
            ev.as_slice(),
            [
                Event::ChannelClosed {
                    channel: 1,
                    error: None
                },
                Event::Reply {
                    token: 5,
                    reply: Reply::Method(Method::ChannelCloseOk(_))
                },
            ]
        ),
        "{ev:?}"
    );
    assert!(!h.e.has_channel(1));
    assert!(h.e.is_open());
    assert_eq!(h.e.open_channel(None, 8).unwrap(), 1);
}

#[test]
fn client_channel_close_after_pending_request() {
    let mut h = with_ch1();
    h.e.call(1, QueueDeclare::default().into(), 1);
    h.e.call(1, ChannelClose::default().into(), 2);
    let _ = h.out();
    h.feed(mframe(1, QueueDeclareOk::default()));
    h.feed(mframe(1, ChannelCloseOk {}));
    let ev = h.events();
    assert!(
        matches!(
            ev.as_slice(),
            [
                Event::Reply {
                    token: 1,
                    reply: Reply::Method(Method::QueueDeclareOk(_))
                },
                Event::ChannelClosed {
                    channel: 1,
                    error: None
                },
                Event::Reply {
                    token: 2,
                    reply: Reply::Method(Method::ChannelCloseOk(_))
                },
            ]
        ),
        "{ev:?}"
    );
}

#[test]
fn channel_flow_from_server() {
    let mut h = with_ch1();
    h.feed(mframe(1, ChannelFlow { active: false }));
    assert_eq!(
        h.sent_methods(),
        vec![(1, Method::ChannelFlowOk(ChannelFlowOk { active: false }))]
    );
    let ev = h.events();
    assert!(
        matches!(
            ev.as_slice(),
            [Event::Flow {
                channel: 1,
                active: false
            }]
        ),
        "{ev:?}"
    );
    h.feed(mframe(1, ChannelFlow { active: true }));
    assert_eq!(
        h.sent_methods(),
        vec![(1, Method::ChannelFlowOk(ChannelFlowOk { active: true }))]
    );
    let ev = h.events();
    assert!(
        matches!(
            ev.as_slice(),
            [Event::Flow {
                channel: 1,
                active: true
            }]
        ),
        "{ev:?}"
    );
}

#[test]
fn channel_flow_request_from_client_gets_flow_ok() {
    let mut h = with_ch1();
    h.e.call(1, ChannelFlow { active: false }.into(), 3);
    let _ = h.out();
    h.feed(mframe(1, ChannelFlowOk { active: false }));
    let ev = h.events();
    assert!(
        matches!(
            ev.as_slice(),
            [Event::Reply {
                token: 3,
                reply: Reply::Method(Method::ChannelFlowOk(ChannelFlowOk { active: false }))
            }]
        ),
        "{ev:?}"
    );
}

#[test]
fn connection_blocked_and_unblocked() {
    let mut h = with_ch1();
    h.feed(mframe(
        0,
        ConnectionBlocked {
            reason: "low on memory".into(),
        },
    ));
    assert!(h.e.is_blocked());
    let ev = h.events();
    assert!(
        matches!(ev.as_slice(), [Event::Blocked { reason }] if reason == "low on memory"),
        "{ev:?}"
    );
    h.feed(mframe(0, ConnectionUnblocked {}));
    assert!(!h.e.is_blocked());
    let ev = h.events();
    assert!(matches!(ev.as_slice(), [Event::Unblocked]), "{ev:?}");
    assert!(h.out().is_empty());
}

// ----- heartbeats ------------------------------------------------------------------------------

const HEARTBEAT: [u8; 8] = [8, 0, 0, 0, 0, 0, 0, 0xCE];

fn hb10() -> H {
    connected_with(cfg_hb(Some(10)), tune(0, 131_072, 10))
}

#[test]
fn heartbeat_sent_after_half_the_interval_when_idle() {
    let mut h = hb10();
    assert_eq!(h.e.heartbeat(), Duration::from_secs(10));
    assert_eq!(h.e.poll_timeout(), Some(h.at(5_000)));
    h.e.handle_timeout(h.at(4_999));
    assert!(h.out().is_empty());
    h.e.handle_timeout(h.at(5_000));
    assert_eq!(h.out(), HEARTBEAT.to_vec());
    assert_eq!(h.e.poll_timeout(), Some(h.at(10_000)));
    // Writing output resets the send timer.
    h.e.on_transmit(h.at(8_000));
    assert_eq!(h.e.poll_timeout(), Some(h.at(13_000)));
    h.e.handle_timeout(h.at(12_000));
    assert!(h.out().is_empty());
    assert!(h.e.is_open());
    assert!(h.events().is_empty());
}

#[test]
fn no_heartbeat_while_output_is_pending() {
    let mut h = hb10();
    h.open_channel(1);
    h.e.call(1, QueueDeclare::default().into(), 1);
    h.e.handle_timeout(h.at(5_000));
    let frames = h.sent();
    assert!(frames.iter().all(|f| *f != Frame::Heartbeat), "{frames:?}");
    h.e.handle_timeout(h.at(5_000));
    assert_eq!(h.out(), HEARTBEAT.to_vec());
}

#[test]
fn missed_heartbeats_close_the_connection() {
    let mut h = hb10();
    h.open_channel(1);
    h.e.call(1, QueueDeclare::default().into(), 7);
    let _ = h.out();
    assert_eq!(h.e.poll_timeout(), Some(h.at(5_000)));
    h.e.handle_timeout(h.at(19_999));
    assert!(h.e.is_open());
    h.e.handle_timeout(h.at(20_000));
    assert!(h.e.is_closed());
    let ev = h.events();
    assert!(
        matches!(closed_error(&ev), Some(Error::MissedHeartbeats(d)) if *d == Duration::from_secs(20)),
        "{ev:?}"
    );
    assert!(ev.iter().any(|e| matches!(
        e,
        Event::Failed {
            token: 7,
            error: Error::MissedHeartbeats(_)
        }
    )));
    assert_eq!(h.e.poll_timeout(), None);
    h.e.handle_timeout(h.at(60_000));
    assert!(h.events().is_empty());
}

#[test]
fn input_resets_the_receive_deadline() {
    let mut h = hb10();
    h.e.handle_timeout(h.at(5_000));
    h.e.handle_timeout(h.at(10_000));
    h.e.on_transmit(h.at(10_000));
    let _ = h.out();
    h.feed_at(HEARTBEAT, h.at(15_000));
    assert!(h.events().is_empty());
    h.e.handle_timeout(h.at(20_000));
    assert!(h.e.is_open(), "{:?}", h.e.error());
    h.e.on_transmit(h.at(20_000));
    let _ = h.out();
    // Next deadline: 2 intervals after the last input.
    h.e.on_transmit(h.at(34_000));
    assert_eq!(h.e.poll_timeout(), Some(h.at(35_000)));
    h.e.handle_timeout(h.at(34_999));
    assert!(h.e.is_open());
    h.e.handle_timeout(h.at(35_000));
    assert!(h.e.is_closed());
    assert!(matches!(h.e.error(), Some(Error::MissedHeartbeats(_))));
}

#[test]
fn even_a_partial_frame_counts_as_input() {
    let mut h = hb10();
    let mut buf = BytesMut::from(&HEARTBEAT[..3]);
    h.e.handle_input(&mut buf, h.at(15_000));
    h.e.handle_timeout(h.at(20_000));
    assert!(h.e.is_open());
    buf.extend_from_slice(&HEARTBEAT[3..]);
    h.e.handle_input(&mut buf, h.at(16_000));
    assert!(buf.is_empty());
    assert!(h.e.is_open());
}

#[test]
fn heartbeat_disabled_means_no_timeout() {
    let mut h = connected_with(cfg_hb(Some(0)), tune(0, 131_072, 60));
    assert_eq!(h.e.heartbeat(), Duration::ZERO);
    assert_eq!(h.e.poll_timeout(), None);
    h.e.handle_timeout(h.at(3_600_000));
    assert!(h.e.is_open());
    assert!(h.out().is_empty());
}

#[test]
fn server_heartbeats_are_accepted_silently() {
    let mut h = hb10();
    h.feed(cat(&[&HEARTBEAT, &HEARTBEAT, &HEARTBEAT]));
    assert!(h.e.is_open());
    assert!(h.events().is_empty());
    assert!(h.out().is_empty());
}

// ----- frame_max -------------------------------------------------------------------------------

/// Split a byte stream into raw frames `(type, channel, payload)` and check each against
/// `frame_max`.
fn raw_frames(bytes: &[u8], frame_max: usize) -> Vec<(u8, u16, Vec<u8>)> {
    let mut v = Vec::new();
    let mut i = 0;
    while i < bytes.len() {
        let size =
            u32::from_be_bytes([bytes[i + 3], bytes[i + 4], bytes[i + 5], bytes[i + 6]]) as usize;
        assert!(
            size + 8 <= frame_max,
            "frame of {} bytes > frame_max {frame_max}",
            size + 8
        );
        assert_eq!(bytes[i + 7 + size], 0xCE);
        v.push((
            bytes[i],
            u16::from_be_bytes([bytes[i + 1], bytes[i + 2]]),
            bytes[i + 7..i + 7 + size].to_vec(),
        ));
        i += size + 8;
    }
    v
}

#[test]
fn publish_body_is_split_into_frames_of_at_most_frame_max() {
    let mut h = connected_with(cfg(), tune(0, 4096, 0));
    assert_eq!(h.e.frame_max(), 4096);
    h.open_channel(1);
    let body: Vec<u8> = (0..10_000u32).map(|i| (i * 7) as u8).collect();
    h.e.publish(
        1,
        "",
        "q",
        false,
        false,
        &BasicProperties::default(),
        Bytes::from(body.clone()),
        None,
    )
    .unwrap();
    let frames = raw_frames(&h.out(), 4096);
    let kinds: Vec<u8> = frames.iter().map(|f| f.0).collect();
    assert_eq!(kinds, vec![1, 2, 3, 3, 3]);
    let sizes: Vec<usize> = frames[2..].iter().map(|f| f.2.len()).collect();
    assert_eq!(sizes, vec![4088, 4088, 1824]);
    let joined: Vec<u8> = frames[2..]
        .iter()
        .flat_map(|f| f.2.iter().copied())
        .collect();
    assert_eq!(joined, body);
    // Exactly one frame's worth: one body frame.
    h.e.publish(
        1,
        "",
        "q",
        false,
        false,
        &BasicProperties::default(),
        Bytes::from(vec![1u8; 4088]),
        None,
    )
    .unwrap();
    let frames = raw_frames(&h.out(), 4096);
    assert_eq!(frames.iter().filter(|f| f.0 == 3).count(), 1);
}

#[test]
fn large_bodies_are_queued_by_reference() {
    let mut h = connected();
    h.open_channel(1);
    let body = Bytes::from(
        (0..300_000u32)
            .map(|i| (i % 253) as u8)
            .collect::<Vec<u8>>(),
    );
    let range = body.as_ptr() as usize..body.as_ptr() as usize + body.len();
    h.e.publish(
        1,
        "",
        "q",
        false,
        false,
        &BasicProperties::default(),
        body.clone(),
        None,
    )
    .unwrap();
    let chunks = h.raw_out();
    assert!(
        chunks
            .iter()
            .any(|c| range.contains(&(c.as_ptr() as usize))),
        "large body was copied"
    );
    let all: Vec<u8> = chunks.iter().flat_map(|c| c.iter().copied()).collect();
    let frames = raw_frames(&all, 131_072);
    let sizes: Vec<usize> = frames
        .iter()
        .filter(|f| f.0 == 3)
        .map(|f| f.2.len())
        .collect();
    assert_eq!(sizes, vec![131_064, 131_064, 37_872]);
    let joined: Vec<u8> = frames
        .iter()
        .filter(|f| f.0 == 3)
        .flat_map(|f| f.2.iter().copied())
        .collect();
    assert_eq!(&joined[..], &body[..]);
    // Decoding with the negotiated limit accepts every frame.
    let mut buf = BytesMut::from(&all[..]);
    let mut n = 0;
    while let Some(_f) = decode_frame(&mut buf, h.e.frame_max()).unwrap() {
        n += 1;
    }
    assert_eq!(n, 5);
}

#[test]
fn incoming_frame_over_frame_max_fails_without_waiting_for_it() {
    let mut h = connected_with(cfg(), tune(0, 4096, 0));
    h.open_channel(1);
    // Only the 7-byte frame header of a 5000-byte body frame.
    let mut head = vec![3, 0, 1];
    head.extend_from_slice(&5000u32.to_be_bytes());
    h.feed(head);
    let p = assert_protocol_close(&mut h, reply_code::FRAME_ERROR);
    assert!(matches!(
        p,
        ProtocolError::Decode(DecodeError::FrameTooLarge {
            size: 5008,
            frame_max: 4096
        })
    ));
}

#[test]
fn request_over_frame_max_fails_and_keeps_the_connection() {
    let mut h = connected_with(cfg(), tune(0, 4096, 0));
    h.open_channel(1);
    let mut args = FieldTable::new();
    args.insert("big", FieldValue::LongString(Bytes::from(vec![b'a'; 5000])));
    h.e.call(
        1,
        QueueDeclare {
            arguments: args,
            ..Default::default()
        }
        .into(),
        3,
    );
    let ev = h.events();
    assert!(
        matches!(
            ev.as_slice(),
            [Event::Failed {
                token: 3,
                error: Error::Encode(EncodeError::FrameTooLarge { .. })
            }]
        ),
        "{ev:?}"
    );
    assert!(h.out().is_empty());
    assert!(h.e.is_open());
    // The channel has no stray pending request: the next reply matches the next request.
    h.e.call(1, QueueDeclare::default().into(), 4);
    let _ = h.out();
    h.feed(mframe(1, QueueDeclareOk::default()));
    let ev = h.events();
    assert!(
        matches!(ev.as_slice(), [Event::Reply { token: 4, .. }]),
        "{ev:?}"
    );
}

// ----- closing ---------------------------------------------------------------------------------

#[test]
fn client_close_handshake() {
    let mut h = with_ch1();
    h.e.call(1, QueueDeclare::default().into(), 3);
    let _ = h.out();
    h.e.close(200, "bye", 9);
    assert!(!h.e.is_open());
    assert!(!h.e.is_closed());
    assert_eq!(h.e.state, State::Closing);
    let sent = h.sent_methods();
    assert!(
        matches!(&sent[..], [(0, Method::ConnectionClose(c))] if c.reply_code == 200 && c.reply_text == "bye"),
        "{sent:?}"
    );
    assert!(h.events().is_empty());
    // New requests fail while closing.
    h.e.call(1, QueueDeclare::default().into(), 4);
    assert!(matches!(
        h.events().as_slice(),
        [Event::Failed {
            token: 4,
            error: Error::ConnectionClosedByClient
        }]
    ));
    assert!(h.e.open_channel(None, 5).is_err());
    // A second close just acknowledges.
    h.e.close(200, "again", 6);
    assert!(matches!(
        h.events().as_slice(),
        [Event::Reply {
            token: 6,
            reply: Reply::Sent
        }]
    ));
    assert!(h.out().is_empty());

    h.feed(mframe(0, ConnectionCloseOk {}));
    assert!(h.e.is_closed());
    assert!(h.e.error().is_none());
    let ev = h.events();
    assert!(
        matches!(
            ev.as_slice(),
            [
                Event::ChannelClosed { channel: 1, .. },
                Event::Failed {
                    token: 3,
                    error: Error::ConnectionClosedByClient
                },
                Event::Reply {
                    token: 9,
                    reply: Reply::Method(Method::ConnectionCloseOk(_))
                },
                Event::Closed { error: None },
            ]
        ),
        "{ev:?}"
    );
    assert!(h.out().is_empty());
    assert_eq!(h.e.poll_timeout(), None);
}

#[test]
fn operations_after_close_fail() {
    let mut h = with_ch1();
    h.e.close(200, "bye", 1);
    h.feed(mframe(0, ConnectionCloseOk {}));
    let _ = h.events();
    let _ = h.out();
    assert!(matches!(
        h.e.open_channel(None, 2),
        Err((2, Error::ConnectionClosedByClient))
    ));
    h.e.call(1, QueueDeclare::default().into(), 3);
    assert!(matches!(
        h.events().as_slice(),
        [Event::Failed {
            token: 3,
            error: Error::ConnectionClosedByClient
        }]
    ));
    assert!(matches!(
        h.e.publish(
            1,
            "",
            "q",
            false,
            false,
            &BasicProperties::default(),
            Bytes::new(),
            Some(4)
        ),
        Err((Some(4), Error::ConnectionClosedByClient))
    ));
    assert!(h.e.send(1, &BasicAck::default().into()).is_err());
    h.e.update_secret(Bytes::from_static(b"t"), "r", 5);
    assert!(matches!(
        h.events().as_slice(),
        [Event::Failed { token: 5, .. }]
    ));
    h.e.close(200, "again", 6);
    assert!(matches!(
        h.events().as_slice(),
        [Event::Reply {
            token: 6,
            reply: Reply::Sent
        }]
    ));
    h.feed(mframe(1, QueueDeclareOk::default()));
    h.e.handle_eof();
    h.e.handle_timeout(h.at(1_000_000));
    assert!(h.events().is_empty());
    assert!(h.out().is_empty());
}

#[test]
fn eof_while_closing_is_a_clean_close() {
    let mut h = with_ch1();
    h.e.close(200, "bye", 1);
    h.e.handle_eof();
    assert!(h.e.is_closed());
    let ev = h.events();
    assert!(closed_error(&ev).is_none());
    assert!(ev
        .iter()
        .any(|e| matches!(e, Event::Reply { token: 1, .. })));
}

#[test]
fn frames_other_than_close_ok_are_ignored_while_closing() {
    let mut h = with_ch1();
    h.e.close(200, "bye", 1);
    let _ = h.out();
    h.feed(mframe(0, ConnectionBlocked { reason: "x".into() }));
    assert!(!h.e.is_closed());
    h.feed(mframe(0, ConnectionCloseOk {}));
    assert!(h.e.is_closed());
    assert!(h.e.error().is_none());
}

#[test]
fn server_close_when_open() {
    let mut h = with_ch1();
    h.e.call(1, QueueDeclare::default().into(), 3);
    let _ = h.out();
    h.feed(mframe(
        0,
        ConnectionClose {
            reply_code: 320,
            reply_text: "CONNECTION_FORCED - broker forced connection closure".into(),
            class_id: 0,
            method_id: 0,
        },
    ));
    assert!(h.e.is_closed());
    assert_eq!(
        h.sent_methods(),
        vec![(0, Method::ConnectionCloseOk(ConnectionCloseOk {}))]
    );
    let ev = h.events();
    assert!(ev.iter().any(|e| matches!(
        e,
        Event::Failed { token: 3, error: Error::ConnectionClosed(r) } if r.code == 320
    )));
    assert!(matches!(
        closed_error(&ev),
        Some(Error::ConnectionClosed(r)) if r.code == 320
    ));
    h.e.close(200, "late", 4);
    assert!(matches!(
        h.events().as_slice(),
        [Event::Failed {
            token: 4,
            error: Error::ConnectionClosed(_)
        }]
    ));
}

#[test]
fn io_error_closes_and_fails_everything() {
    let mut h = confirm_channel();
    publish_n(&mut h, 1..3);
    h.e.handle_io_error(Error::io("writing", std::io::ErrorKind::BrokenPipe.into()));
    assert!(h.e.is_closed());
    let ev = h.events();
    let failed = ev
        .iter()
        .filter(|e| matches!(e, Event::Failed { .. }))
        .count();
    assert_eq!(failed, 2, "{ev:?}");
    assert!(matches!(closed_error(&ev), Some(Error::Io { .. })));
}

// ----- update-secret ---------------------------------------------------------------------------

#[test]
fn update_secret_round_trip() {
    let mut h = connected();
    h.e.update_secret(Bytes::from_static(b"new-token"), "refresh", 1);
    assert_eq!(
        h.sent_methods(),
        vec![(
            0,
            Method::ConnectionUpdateSecret(ConnectionUpdateSecret {
                new_secret: Bytes::from_static(b"new-token"),
                reason: "refresh".into()
            })
        )]
    );
    h.e.update_secret(Bytes::from_static(b"other"), "again", 2);
    assert!(matches!(
        h.events().as_slice(),
        [Event::Failed {
            token: 2,
            error: Error::InvalidUse(_)
        }]
    ));
    h.feed(mframe(0, ConnectionUpdateSecretOk {}));
    assert!(matches!(
        h.events().as_slice(),
        [Event::Reply {
            token: 1,
            reply: Reply::Method(Method::ConnectionUpdateSecretOk(_))
        }]
    ));
}

#[test]
fn close_while_update_secret_pending_answers_both_tokens() {
    let mut h = connected();
    h.e.update_secret(Bytes::from_static(b"new-token"), "refresh", 1);
    h.e.close(200, "bye", 2);
    h.feed(mframe(0, ConnectionCloseOk {}));
    let ev = h.events();
    assert!(
        ev.iter().any(|e| matches!(
            e,
            Event::Reply { token: 1, .. } | Event::Failed { token: 1, .. }
        )),
        "update-secret token 1 got no event: {ev:?}"
    );
    assert!(ev
        .iter()
        .any(|e| matches!(e, Event::Reply { token: 2, .. })));
}

// ----- more edges ------------------------------------------------------------------------------

#[test]
fn server_protocol_header_instead_of_start_closes() {
    let mut h = H::new(cfg());
    let _ = h.out();
    h.feed(b"AMQP\x00\x00\x09\x01");
    assert!(h.e.is_closed());
    let ev = h.events();
    assert!(
        matches!(
            closed_error(&ev),
            Some(Error::Protocol(ProtocolError::Decode(
                DecodeError::ProtocolHeader(_)
            )))
        ),
        "{ev:?}"
    );
}

#[test]
fn broker_close_of_a_channel_the_client_is_closing_resolves_the_close_token() {
    let mut h = with_ch1();
    h.e.call(1, ChannelClose::default().into(), 5);
    let _ = h.out();
    h.feed(mframe(
        1,
        ChannelClose {
            reply_code: 406,
            reply_text: "PRECONDITION_FAILED".into(),
            class_id: 0,
            method_id: 0,
        },
    ));
    assert_eq!(
        h.sent_methods(),
        vec![(1, Method::ChannelCloseOk(ChannelCloseOk {}))]
    );
    let ev = h.events();
    assert!(
        ev.iter().any(|e| matches!(
            e,
            Event::Failed { token: 5, .. } | Event::Reply { token: 5, .. }
        )),
        "{ev:?}"
    );
    assert!(ev
        .iter()
        .any(|e| matches!(e, Event::ChannelClosed { channel: 1, .. })));
    // The broker's late close-ok for the old channel is harmless.
    h.feed(mframe(1, ChannelCloseOk {}));
    assert!(h.e.is_open());
}

#[test]
fn broker_refusing_channel_open_fails_the_open_token() {
    let mut h = connected();
    assert_eq!(h.e.open_channel(None, 5).unwrap(), 1);
    let _ = h.out();
    h.feed(mframe(
        1,
        ChannelClose {
            reply_code: 504,
            reply_text: "CHANNEL_ERROR".into(),
            class_id: 20,
            method_id: 10,
        },
    ));
    let ev = h.events();
    assert!(
        ev.iter().any(|e| matches!(
            e,
            Event::Failed { token: 5, error: Error::ChannelClosed { channel: 1, reason } } if reason.code == 504
        )),
        "{ev:?}"
    );
    assert!(!h.e.has_channel(1));
}

#[test]
fn multiple_ack_with_tag_zero_settles_everything_outstanding() {
    let mut h = confirm_channel();
    publish_n(&mut h, 10..13);
    h.feed(mframe(
        1,
        BasicAck {
            delivery_tag: 0,
            multiple: true,
        },
    ));
    assert_eq!(
        confirms(&h.events()),
        vec![
            (10, Confirmation::Ack),
            (11, Confirmation::Ack),
            (12, Confirmation::Ack)
        ]
    );
    assert_eq!(h.e.unconfirmed(1), 0);
}

#[test]
fn client_close_of_a_confirm_channel_fails_unconfirmed_publishes() {
    let mut h = confirm_channel();
    publish_n(&mut h, 20..23);
    h.feed(mframe(
        1,
        BasicAck {
            delivery_tag: 1,
            multiple: false,
        },
    ));
    assert_eq!(confirms(&h.events()), vec![(20, Confirmation::Ack)]);
    h.e.call(1, ChannelClose::default().into(), 5);
    let _ = h.out();
    h.feed(mframe(1, ChannelCloseOk {}));
    let ev = h.events();
    let mut failed: Vec<u32> = ev
        .iter()
        .filter_map(|e| match e {
            Event::Failed {
                token,
                error: Error::ChannelClosedByClient(1),
            } => Some(*token),
            _ => None,
        })
        .collect();
    failed.sort_unstable();
    assert_eq!(failed, vec![21, 22], "{ev:?}");
    assert!(ev
        .iter()
        .any(|e| matches!(e, Event::Reply { token: 5, .. })));
    assert!(ev.iter().any(|e| matches!(
        e,
        Event::ChannelClosed {
            channel: 1,
            error: None
        }
    )));
}

// ----- basic.return matched to its publish (confirm mode) ---------------------------------------

/// Publish on channel 1 with `token`, mandatory or not; returns the sequence number.
fn publish_one(h: &mut H, token: Option<u32>, mandatory: bool) -> u64 {
    h.e.publish(
        1,
        "ex",
        "same-key",
        mandatory,
        false,
        &BasicProperties::default(),
        Bytes::from_static(b"m"),
        token,
    )
    .unwrap()
    .unwrap()
}

/// The broker returns a message on channel 1 (body `body`).
fn feed_return(h: &mut H, body: &[u8]) {
    h.feed(content(
        1,
        BasicReturn {
            reply_code: 312,
            reply_text: "NO_ROUTE".into(),
            exchange: "ex".into(),
            routing_key: "same-key".into(),
        },
        &BasicProperties::default(),
        body,
        64,
    ));
}

fn feed_ack(h: &mut H, tag: u64, multiple: bool) {
    h.feed(mframe(
        1,
        BasicAck {
            delivery_tag: tag,
            multiple,
        },
    ));
}

/// Confirms as (token, "ack" | "nack" | "returned:<body>").
fn outcomes(ev: &[Ev]) -> Vec<(u32, String)> {
    confirms(ev)
        .into_iter()
        .map(|(t, c)| {
            let s = match c {
                Confirmation::Ack => "ack".to_owned(),
                Confirmation::Nack => "nack".to_owned(),
                Confirmation::NotRequested => "none".to_owned(),
                Confirmation::Returned(r) => {
                    assert_eq!(r.reply_code, 312);
                    assert_eq!(r.channel, 1);
                    format!("returned:{}", String::from_utf8_lossy(&r.body))
                }
            };
            (t, s)
        })
        .collect()
}

fn o(token: u32, s: &str) -> (u32, String) {
    (token, s.to_owned())
}

#[test]
fn return_resolves_the_publish_its_ack_names() {
    let mut h = confirm_channel();
    publish_one(&mut h, Some(10), true); // 1, routed
    publish_one(&mut h, Some(11), true); // 2, unroutable
    feed_return(&mut h, b"two");
    assert!(h.events().is_empty(), "the return waits for its ack");
    feed_ack(&mut h, 2, false);
    assert_eq!(outcomes(&h.events()), vec![o(11, "returned:two")]);
    feed_ack(&mut h, 1, false);
    assert_eq!(outcomes(&h.events()), vec![o(10, "ack")]);
    assert_eq!(h.e.unconfirmed(1), 0);
}

#[test]
fn multiple_ack_after_a_return_is_the_returned_publish_when_nothing_else_can_be() {
    let mut h = confirm_channel();
    publish_one(&mut h, Some(10), true);
    publish_one(&mut h, Some(11), true);
    feed_return(&mut h, b"two");
    // RabbitMQ coalesced 1's confirm (routed) with 2's (returned).
    feed_ack(&mut h, 2, true);
    assert_eq!(
        outcomes(&h.events()),
        vec![o(10, "ack"), o(11, "returned:two")]
    );
}

#[test]
fn return_is_not_claimed_by_an_earlier_flush_of_routed_confirms() {
    // 1, 2, 3 routed, 4 unroutable. When RabbitMQ routes 4 it has the queue's confirms of 1
    // and 2 but not of 3: it returns 4, then acks 1..=2 (multiple), then 4 alone.
    let mut h = confirm_channel();
    for t in 10..14 {
        publish_one(&mut h, Some(t), true);
    }
    feed_return(&mut h, b"four");
    feed_ack(&mut h, 2, true);
    assert_eq!(outcomes(&h.events()), vec![o(10, "ack")], "2 is held");
    feed_ack(&mut h, 4, false);
    assert_eq!(
        outcomes(&h.events()),
        vec![o(11, "ack"), o(13, "returned:four")]
    );
    feed_ack(&mut h, 3, false);
    assert_eq!(outcomes(&h.events()), vec![o(12, "ack")]);
}

#[test]
fn held_publish_keeps_the_return_when_the_next_ack_is_a_later_one() {
    // 1 routed, 2 unroutable (acked with 1), 3 and 4 in flight: the next ack, of 3, is not 2's
    // flush going on (nothing unconfirmed below 3), so the return was 2's.
    let mut h = confirm_channel();
    for t in 10..14 {
        publish_one(&mut h, Some(t), true);
    }
    feed_return(&mut h, b"two");
    feed_ack(&mut h, 2, true);
    assert_eq!(outcomes(&h.events()), vec![o(10, "ack")]);
    feed_ack(&mut h, 3, false);
    assert_eq!(
        outcomes(&h.events()),
        vec![o(11, "returned:two"), o(12, "ack")]
    );
    // And the next return is matched afresh.
    feed_return(&mut h, b"four");
    feed_ack(&mut h, 4, false);
    assert_eq!(outcomes(&h.events()), vec![o(13, "returned:four")]);
}

#[test]
fn held_publish_is_settled_by_any_other_frame() {
    let mut h = confirm_channel();
    for t in 10..13 {
        publish_one(&mut h, Some(t), true);
    }
    feed_return(&mut h, b"one");
    feed_ack(&mut h, 1, true);
    assert!(h.events().is_empty(), "1 is held");
    h.feed(content(
        1,
        deliver(7),
        &BasicProperties::default(),
        b"d",
        64,
    ));
    let ev = h.events();
    assert!(
        matches!(
            ev.as_slice(),
            [
                Event::Confirm {
                    token: 10,
                    confirmation: Confirmation::Returned(_)
                },
                Event::Delivery(_)
            ]
        ),
        "{ev:?}"
    );
}

#[test]
fn acks_of_publishes_that_cannot_be_returned_leave_the_return_waiting() {
    let mut h = confirm_channel();
    publish_one(&mut h, Some(10), false); // not mandatory: never returned
    publish_one(&mut h, Some(11), true);
    feed_return(&mut h, b"two");
    feed_ack(&mut h, 1, false);
    assert_eq!(outcomes(&h.events()), vec![o(10, "ack")]);
    feed_ack(&mut h, 2, false);
    assert_eq!(outcomes(&h.events()), vec![o(11, "returned:two")]);
}

#[test]
fn unclaimed_returns_go_to_the_returns_stream() {
    let mut h = confirm_channel();
    // No mandatory publish outstanding: nobody can claim it.
    publish_one(&mut h, Some(10), false);
    feed_return(&mut h, b"stray");
    let ev = h.events();
    assert!(
        matches!(ev.as_slice(), [Event::Returned(r)] if &r.body[..] == b"stray"),
        "{ev:?}"
    );
    feed_ack(&mut h, 1, false);
    assert_eq!(outcomes(&h.events()), vec![o(10, "ack")]);
    // A mandatory publish without a token: its return is nobody's either.
    publish_one(&mut h, None, true); // 2
    publish_one(&mut h, Some(12), true); // 3
    assert_eq!(h.e.unconfirmed(1), 2);
    feed_return(&mut h, b"tokenless");
    assert!(h.events().is_empty());
    feed_ack(&mut h, 2, false);
    let ev = h.events();
    assert!(
        matches!(ev.as_slice(), [Event::Returned(r)] if &r.body[..] == b"tokenless"),
        "{ev:?}"
    );
    feed_ack(&mut h, 3, false);
    assert_eq!(outcomes(&h.events()), vec![o(12, "ack")]);
}

#[test]
fn a_waiting_return_goes_to_the_returns_stream_when_the_channel_closes() {
    let mut h = confirm_channel();
    publish_one(&mut h, Some(10), true);
    feed_return(&mut h, b"orphan");
    h.feed(mframe(
        1,
        ChannelClose {
            reply_code: 406,
            reply_text: "PRECONDITION_FAILED".into(),
            class_id: 0,
            method_id: 0,
        },
    ));
    let ev = h.events();
    assert!(
        matches!(
            ev.as_slice(),
            [
                Event::Returned(_),
                Event::ChannelClosed { channel: 1, .. },
                Event::Failed { token: 10, .. }
            ]
        ),
        "{ev:?}"
    );
}

#[test]
fn returns_outside_confirm_mode_are_not_held() {
    let mut h = with_ch1();
    h.e.publish(
        1,
        "ex",
        "k",
        true,
        false,
        &BasicProperties::default(),
        Bytes::new(),
        Some(10),
    )
    .unwrap();
    assert!(matches!(
        h.events().as_slice(),
        [Event::Confirm {
            token: 10,
            confirmation: Confirmation::NotRequested
        }]
    ));
    feed_return(&mut h, b"x");
    assert!(matches!(h.events().as_slice(), [Event::Returned(_)]));
}

#[test]
fn broker_channel_close_is_reported_before_failing_its_waiters() {
    let mut h = with_ch1();
    h.e.call(1, QueueDeclare::default().into(), 7);
    let _ = h.out();
    h.feed(mframe(
        1,
        ChannelClose {
            reply_code: 404,
            reply_text: "NOT_FOUND".into(),
            class_id: 50,
            method_id: 10,
        },
    ));
    let ev = h.events();
    assert!(
        matches!(
            ev.as_slice(),
            [
                Event::ChannelClosed {
                    channel: 1,
                    error: Some(_)
                },
                Event::Failed { token: 7, .. }
            ]
        ),
        "{ev:?}"
    );
}
