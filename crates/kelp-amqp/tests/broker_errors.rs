//! Error paths against the real RabbitMQ: every broker refusal arrives as a typed error with the
//! broker's reply code and the method that caused it, the closed channel or connection says so,
//! and later calls fail at once instead of hanging.
//!
//! Needs RabbitMQ on 127.0.0.1:5672 (guest/guest); without one each test prints SKIP and passes
//! (unless KELP_REQUIRE_BROKERS=1).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod common;

use std::future::Future;
use std::time::Duration;

use kelp_amqp::error::reply_code;
use kelp_amqp::options::*;
use kelp_amqp::{
    BasicProperties, Channel, Confirmation, Connection, ConnectionBuilder, Error, FieldTable,
    ProtocolError,
};

const LIMIT: Duration = Duration::from_secs(10);
/// "At once": a call on a closed channel must not wait for the network.
const FAST: Duration = Duration::from_millis(500);

async fn connect() -> Connection {
    common::within("connect", LIMIT, Connection::open(&common::amqp_url()))
        .await
        .unwrap()
}

async fn chan(conn: &Connection) -> Channel {
    common::within("channel.open", LIMIT, conn.channel())
        .await
        .unwrap()
}

fn excl() -> QueueDeclareOptions {
    QueueDeclareOptions {
        exclusive: true,
        ..Default::default()
    }
}

fn passive() -> QueueDeclareOptions {
    QueueDeclareOptions {
        passive: true,
        ..Default::default()
    }
}

/// Assert a broker channel close with `code`, caused by `method`, on channel `ch`.
#[track_caller]
fn assert_channel_closed(err: &Error, ch: &Channel, code: u16, method: &str) {
    match err {
        Error::ChannelClosed { channel, reason } => {
            assert_eq!(*channel, ch.id(), "{err}");
            assert_eq!(reason.code, code, "{err}");
            assert_eq!(reason.method(), Some(method), "{err}");
            assert!(!reason.text.is_empty());
        }
        other => panic!("expected channel close {code} by {method}, got {other:?}"),
    }
    assert!(!err.is_connection_error());
    assert_eq!(err.reply_code(), Some(code));
}

/// After a broker channel close: the channel says closed, and the next calls fail at once with
/// the same error; the connection is unharmed.
async fn assert_channel_dead(conn: &Connection, ch: &Channel, first: &Error) {
    assert!(ch.is_closed());
    let recorded = ch.close_error().expect("close_error on a closed channel");
    assert_eq!(recorded.to_string(), first.to_string());
    let again = common::within(
        "call on a broker-closed channel",
        FAST,
        ch.queue_declare("", excl(), FieldTable::new()),
    )
    .await
    .unwrap_err();
    assert_eq!(again.to_string(), first.to_string());
    assert!(matches!(again, Error::ChannelClosed { .. }));
    let again = common::within(
        "publish on a broker-closed channel",
        FAST,
        ch.basic_publish(
            "",
            "x",
            PublishOptions::default(),
            BasicProperties::default(),
            "x",
        ),
    )
    .await
    .unwrap_err();
    assert_eq!(again.to_string(), first.to_string());
    let again = common::within("consume on a broker-closed channel", FAST, async {
        ch.basic_consume("x", ConsumeOptions::default())
            .await
            .map(|_| ())
    })
    .await
    .unwrap_err();
    assert_eq!(again.to_string(), first.to_string());
    assert!(!conn.is_closed());
    let ok = chan(conn).await;
    ok.queue_declare("", excl(), FieldTable::new())
        .await
        .unwrap();
}

#[tokio::test]
async fn passive_declare_of_missing_queue_is_404_and_closes_the_channel() {
    require_rabbitmq!("passive_declare_of_missing_queue_is_404_and_closes_the_channel");
    let conn = connect().await;
    let ch = chan(&conn).await;
    let missing = common::unique("missing");
    assert!(!ch.is_closed());
    let err = common::within(
        "passive declare",
        LIMIT,
        ch.queue_declare(&missing, passive(), FieldTable::new()),
    )
    .await
    .unwrap_err();
    assert_channel_closed(&err, &ch, reply_code::NOT_FOUND, "queue.declare");
    let text = err.close_reason().unwrap().text.clone();
    assert!(text.starts_with("NOT_FOUND"), "{text}");
    assert!(text.contains(&missing), "{text}");
    // Display names the code, the broker's text and the method.
    let shown = err.to_string();
    assert!(shown.contains("404"), "{shown}");
    assert!(shown.contains("queue.declare"), "{shown}");
    assert_channel_dead(&conn, &ch, &err).await;
    conn.close().await.unwrap();
}

/// The doc promise "once the broker closes it, every further call fails at once with that same
/// error" under a multi-threaded runtime, where the task that got the first error runs in
/// parallel with the connection task that is still failing the channel's other waiters.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]

async fn next_call_after_broker_channel_close_fails_with_the_same_error_multithreaded() {
    require_rabbitmq!(
        "next_call_after_broker_channel_close_fails_with_the_same_error_multithreaded"
    );
    let conn = connect().await;
    for round in 0..200 {
        let ch = chan(&conn).await;
        let existing = ch
            .queue_declare("", excl(), FieldTable::new())
            .await
            .unwrap()
            .queue
            .to_string();
        let missing = common::unique("missing-mt");
        let failing = {
            let ch = ch.clone();
            async move {
                let first = ch
                    .queue_declare(&missing, passive(), FieldTable::new())
                    .await
                    .unwrap_err();
                let next = ch
                    .queue_declare("", excl(), FieldTable::new())
                    .await
                    .unwrap_err();
                (first, next)
            }
        };
        // Many callers queued behind the failing request on the same channel, all sent in the
        // same poll so they are pending when the broker's channel.close arrives.
        let crowd: Vec<_> = (0..2000)
            .map(|_| {
                let ch = ch.clone();
                let q = existing.clone();
                Box::pin(async move { ch.queue_declare(&q, passive(), FieldTable::new()).await })
            })
            .collect();
        let mut failing = Box::pin(failing);
        let mut crowd: Vec<_> = crowd.into_iter().map(Some).collect();
        let mut result = None;
        common::within(
            "failing channel",
            LIMIT,
            std::future::poll_fn(|cx| {
                if result.is_none() {
                    if let std::task::Poll::Ready(r) = failing.as_mut().poll(cx) {
                        result = Some(r);
                    }
                }
                for slot in crowd.iter_mut() {
                    if let Some(f) = slot {
                        if let std::task::Poll::Ready(r) = f.as_mut().poll(cx) {
                            assert!(r.is_err(), "a request after the failing one succeeded");
                            *slot = None;
                        }
                    }
                }
                if result.is_some() && crowd.iter().all(Option::is_none) {
                    std::task::Poll::Ready(())
                } else {
                    std::task::Poll::Pending
                }
            }),
        )
        .await;
        let (first, next) = result.unwrap();
        assert_eq!(first.reply_code(), Some(reply_code::NOT_FOUND), "{first:?}");
        assert_eq!(
            next.to_string(),
            first.to_string(),
            "round {round}: the call after the channel error failed differently"
        );
    }
    conn.close().await.unwrap();
}

#[tokio::test]
async fn redeclare_with_other_flags_is_406() {
    require_rabbitmq!("redeclare_with_other_flags_is_406");
    let conn = connect().await;
    let ch = chan(&conn).await;
    // Not exclusive: RabbitMQ forces exclusive queues to be non-durable, so the flag would not
    // clash. Deleted explicitly below.
    let q = common::unique("redeclare");
    let plain = QueueDeclareOptions::default();
    ch.queue_declare(&q, plain, FieldTable::new())
        .await
        .unwrap();
    // Same flags again: fine.
    ch.queue_declare(&q, plain, FieldTable::new())
        .await
        .unwrap();
    let err = ch
        .queue_declare(
            &q,
            QueueDeclareOptions {
                durable: true,
                ..Default::default()
            },
            FieldTable::new(),
        )
        .await
        .unwrap_err();
    let cleanup = chan(&conn).await;
    cleanup
        .queue_delete(&q, QueueDeleteOptions::default())
        .await
        .unwrap();
    assert_channel_closed(&err, &ch, reply_code::PRECONDITION_FAILED, "queue.declare");
    assert!(err.to_string().contains("durable"), "{err}");
    assert_channel_dead(&conn, &ch, &err).await;

    // Exchanges too.
    let ch = chan(&conn).await;
    let ex = common::unique("redeclare-ex");
    ch.exchange_declare(
        &ex,
        ExchangeKind::Direct,
        ExchangeDeclareOptions {
            auto_delete: true,
            ..Default::default()
        },
        FieldTable::new(),
    )
    .await
    .unwrap();
    let err = ch
        .exchange_declare(
            &ex,
            ExchangeKind::Direct,
            ExchangeDeclareOptions::default(),
            FieldTable::new(),
        )
        .await
        .unwrap_err();
    assert_channel_closed(
        &err,
        &ch,
        reply_code::PRECONDITION_FAILED,
        "exchange.declare",
    );
    let ch = chan(&conn).await;
    ch.exchange_delete(&ex, ExchangeDeleteOptions::default())
        .await
        .unwrap();
    conn.close().await.unwrap();
}

#[tokio::test]
async fn passive_declare_of_missing_exchange_is_404() {
    require_rabbitmq!("passive_declare_of_missing_exchange_is_404");
    let conn = connect().await;
    let ch = chan(&conn).await;
    let ex = common::unique("missing-ex");
    let err = ch
        .exchange_declare(
            &ex,
            ExchangeKind::Topic,
            ExchangeDeclareOptions {
                passive: true,
                ..Default::default()
            },
            FieldTable::new(),
        )
        .await
        .unwrap_err();
    assert_channel_closed(&err, &ch, reply_code::NOT_FOUND, "exchange.declare");
    assert!(err.to_string().contains(&ex), "{err}");
    assert_channel_dead(&conn, &ch, &err).await;
    conn.close().await.unwrap();
}

#[tokio::test]
async fn publish_to_missing_exchange_closes_the_channel_with_404() {
    require_rabbitmq!("publish_to_missing_exchange_closes_the_channel_with_404");
    let conn = connect().await;
    let ex = common::unique("missing-pub-ex");

    // Seen by the next call on the channel.
    let ch = chan(&conn).await;
    let _not_in_confirm_mode = ch
        .basic_publish(
            &ex,
            "k",
            PublishOptions::default(),
            BasicProperties::default(),
            "lost",
        )
        .await
        .unwrap();
    let err = common::within(
        "call after bad publish",
        LIMIT,
        ch.queue_declare("", excl(), FieldTable::new()),
    )
    .await
    .unwrap_err();
    assert_channel_closed(&err, &ch, reply_code::NOT_FOUND, "basic.publish");
    assert!(err.to_string().contains(&ex), "{err}");
    assert_channel_dead(&conn, &ch, &err).await;

    // Seen by the confirm future, for this publish and the ones after it.
    let ch = chan(&conn).await;
    ch.confirm_select().await.unwrap();
    let c1 = ch
        .basic_publish(
            &ex,
            "k",
            PublishOptions::default(),
            BasicProperties::default(),
            "lost",
        )
        .await
        .unwrap();
    let c2 = ch
        .basic_publish(
            "",
            "whatever",
            PublishOptions::default(),
            BasicProperties::default(),
            "after",
        )
        .await;
    let e1 = common::within("confirm of bad publish", LIMIT, c1)
        .await
        .unwrap_err();
    assert_channel_closed(&e1, &ch, reply_code::NOT_FOUND, "basic.publish");
    match c2 {
        Ok(c2) => {
            let r = common::within("confirm after bad publish", LIMIT, c2).await;
            assert!(
                !matches!(r, Ok(Confirmation::Ack)),
                "a publish after the channel died was acked"
            );
            assert_eq!(r.unwrap_err().to_string(), e1.to_string());
        }
        Err(e2) => assert_eq!(e2.to_string(), e1.to_string()),
    }
    assert_channel_dead(&conn, &ch, &e1).await;
    conn.close().await.unwrap();
}

#[tokio::test]
async fn reserved_queue_name_is_403() {
    require_rabbitmq!("reserved_queue_name_is_403");
    let conn = connect().await;
    let ch = chan(&conn).await;
    let err = ch
        .queue_declare("amq.foo", QueueDeclareOptions::default(), FieldTable::new())
        .await
        .unwrap_err();
    assert_channel_closed(&err, &ch, reply_code::ACCESS_REFUSED, "queue.declare");
    assert!(err.to_string().contains("amq.foo"), "{err}");
    assert_channel_dead(&conn, &ch, &err).await;
    conn.close().await.unwrap();
}

#[tokio::test]
async fn exclusive_queue_of_another_connection_is_405() {
    require_rabbitmq!("exclusive_queue_of_another_connection_is_405");
    let owner = connect().await;
    let och = chan(&owner).await;
    let q = common::unique("locked");
    och.queue_declare(&q, excl(), FieldTable::new())
        .await
        .unwrap();

    let intruder = connect().await;
    let ch = chan(&intruder).await;
    let err = ch
        .basic_consume(&q, ConsumeOptions::default())
        .await
        .unwrap_err();
    assert_channel_closed(&err, &ch, reply_code::RESOURCE_LOCKED, "basic.consume");
    assert_channel_dead(&intruder, &ch, &err).await;

    let ch = chan(&intruder).await;
    let err = ch.basic_get(&q, true).await.unwrap_err();
    assert_channel_closed(&err, &ch, reply_code::RESOURCE_LOCKED, "basic.get");

    let ch = chan(&intruder).await;
    let err = ch
        .queue_delete(&q, QueueDeleteOptions::default())
        .await
        .unwrap_err();
    assert_channel_closed(&err, &ch, reply_code::RESOURCE_LOCKED, "queue.delete");

    // The owner is unaffected.
    assert!(!och.is_closed());
    och.queue_declare(&q, passive(), FieldTable::new())
        .await
        .unwrap();
    intruder.close().await.unwrap();
    owner.close().await.unwrap();
}

#[tokio::test]
async fn bad_credentials_are_authentication_failed_without_the_password() {
    require_rabbitmq!("bad_credentials_are_authentication_failed_without_the_password");
    let password = format!("s3cret-{}-pw", std::process::id());
    let url = common::amqp_url_with("guest", &password, "%2f", "");
    let err = common::within("connect with a bad password", LIMIT, Connection::open(&url))
        .await
        .unwrap_err();
    match &err {
        Error::AuthenticationFailed {
            user,
            mechanism,
            detail,
        } => {
            assert_eq!(user, "guest");
            assert_eq!(*mechanism, "PLAIN");
            assert!(detail.contains("ACCESS_REFUSED"), "{detail}");
        }
        other => panic!("expected AuthenticationFailed, got {other:?}"),
    }
    assert!(err.is_connection_error());
    let shown = err.to_string();
    assert!(shown.contains("guest"), "{shown}");
    assert!(!shown.contains(&password), "password leaked: {shown}");
    assert!(
        !format!("{err:?}").contains(&password),
        "password leaked: {err:?}"
    );

    // Unknown user: same error kind, names the user.
    let url = common::amqp_url_with("no-such-user", &password, "%2f", "");
    let err = common::within("connect as unknown user", LIMIT, Connection::open(&url))
        .await
        .unwrap_err();
    assert!(
        matches!(&err, Error::AuthenticationFailed { user, .. } if user == "no-such-user"),
        "{err:?}"
    );
    assert!(!err.to_string().contains(&password));

    // AMQPLAIN is refused the same way.
    let url = common::amqp_url_with("guest", &password, "%2f", "auth_mechanism=amqplain");
    let err = common::within("connect with AMQPLAIN", LIMIT, Connection::open(&url))
        .await
        .unwrap_err();
    assert!(
        matches!(
            &err,
            Error::AuthenticationFailed {
                mechanism: "AMQPLAIN",
                ..
            }
        ),
        "{err:?}"
    );
    assert!(!err.to_string().contains(&password));
}

#[tokio::test]
async fn unknown_vhost_is_vhost_access_naming_the_vhost() {
    require_rabbitmq!("unknown_vhost_is_vhost_access_naming_the_vhost");
    let url = common::amqp_url_with("guest", "guest", "%2Fno-such-vhost", "");
    let err = common::within("connect to a missing vhost", LIMIT, Connection::open(&url))
        .await
        .unwrap_err();
    match &err {
        Error::VhostAccess { vhost, reason } => {
            assert_eq!(vhost, "/no-such-vhost");
            assert_eq!(reason.code, reply_code::NOT_ALLOWED);
            assert_eq!(reason.method(), Some("connection.open"));
        }
        other => panic!("expected VhostAccess, got {other:?}"),
    }
    assert!(err.to_string().contains("/no-such-vhost"), "{err}");
    assert_eq!(err.reply_code(), Some(reply_code::NOT_ALLOWED));

    // Without the leading slash, too.
    let url = common::amqp_url_with("guest", "guest", "no-such-vhost", "");
    let err = common::within("connect to a missing vhost", LIMIT, Connection::open(&url))
        .await
        .unwrap_err();
    assert!(
        matches!(&err, Error::VhostAccess { vhost, .. } if vhost == "no-such-vhost"),
        "{err:?}"
    );
    assert!(err.to_string().contains("no-such-vhost"), "{err}");
}

/// A connection-level error caused by a channel method: the pending call fails with
/// `ConnectionClosed`, every channel and consumer of the connection ends, calls fail fast.
#[tokio::test]
async fn unknown_exchange_type_closes_the_connection_with_503() {
    require_rabbitmq!("unknown_exchange_type_closes_the_connection_with_503");
    let conn = connect().await;
    let bystander = chan(&conn).await;
    let q = bystander
        .queue_declare("", excl(), FieldTable::new())
        .await
        .unwrap()
        .queue;
    let mut consumer = bystander
        .basic_consume(&q, ConsumeOptions::default())
        .await
        .unwrap();
    let ch = chan(&conn).await;
    // x-delayed-message is not installed on the test broker.
    let ex = common::unique("delayed");
    let err = common::within(
        "declare of an unknown exchange type",
        LIMIT,
        ch.exchange_declare(
            &ex,
            "x-delayed-message",
            ExchangeDeclareOptions {
                auto_delete: true,
                ..Default::default()
            },
            FieldTable::new().with("x-delayed-type", "direct"),
        ),
    )
    .await
    .unwrap_err();
    match &err {
        Error::ConnectionClosed(reason) => {
            assert_eq!(reason.code, reply_code::COMMAND_INVALID, "{err}");
            assert_eq!(reason.method(), Some("exchange.declare"));
            assert!(reason.text.contains("x-delayed-message"), "{err}");
        }
        other => panic!("expected ConnectionClosed 503, got {other:?}"),
    }
    assert!(err.is_connection_error());
    assert!(conn.is_closed());
    assert!(ch.is_closed());
    assert!(bystander.is_closed());
    let item = common::within("consumer of a dead connection", FAST, consumer.recv()).await;
    match item {
        Some(Err(e)) => assert_eq!(e.to_string(), err.to_string()),
        other => panic!("consumer should end with the connection's error, got {other:?}"),
    }
    assert!(consumer.recv().await.is_none());
    let again = common::within(
        "call on a dead connection",
        FAST,
        bystander.queue_declare("", excl(), FieldTable::new()),
    )
    .await
    .unwrap_err();
    assert_eq!(again.to_string(), err.to_string());
    let again = common::within("channel on a dead connection", FAST, conn.channel())
        .await
        .unwrap_err();
    assert_eq!(again.to_string(), err.to_string());
    assert_eq!(conn.close().await.unwrap_err().to_string(), err.to_string());
}

/// RabbitMQ refuses a consumer tag already used on the channel (530, a connection error).
/// The first consumer must then end with the connection's error, like every other consumer.
#[tokio::test]

async fn reused_consumer_tag_closes_the_connection_and_ends_the_first_consumer_with_an_error() {
    require_rabbitmq!(
        "reused_consumer_tag_closes_the_connection_and_ends_the_first_consumer_with_an_error"
    );
    let conn = connect().await;
    let ch = chan(&conn).await;
    let q = ch
        .queue_declare("", excl(), FieldTable::new())
        .await
        .unwrap()
        .queue;
    let tag = common::unique("dup-tag");
    let opts = ConsumeOptions {
        consumer_tag: tag.as_str().into(),
        ..Default::default()
    };
    let mut first = ch.basic_consume(&q, opts.clone()).await.unwrap();
    let err = common::within("second consume with the same tag", LIMIT, async {
        ch.basic_consume(&q, opts.clone()).await.map(|_| ())
    })
    .await
    .unwrap_err();
    assert_eq!(err.reply_code(), Some(reply_code::NOT_ALLOWED), "{err:?}");
    assert!(matches!(err, Error::ConnectionClosed(_)), "{err:?}");
    let item = common::within("first consumer", FAST, first.recv()).await;
    match item {
        Some(Err(e)) => assert_eq!(e.to_string(), err.to_string()),
        other => panic!("first consumer should end with the connection's error, got {other:?}"),
    }
}

/// A message larger than `max_message_size` is refused before it is buffered: the pending get
/// fails with `MessageTooLarge` and the connection closes (reply 311 to the broker).
#[tokio::test]
async fn message_over_max_message_size_is_a_protocol_error() {
    require_rabbitmq!("message_over_max_message_size_is_a_protocol_error");
    let conn = connect().await;
    let ch = chan(&conn).await;
    ch.confirm_select().await.unwrap();
    let q = common::unique("too-large");
    // Not exclusive: the small connection reads it.
    ch.queue_declare(
        &q,
        QueueDeclareOptions {
            auto_delete: true,
            ..Default::default()
        },
        FieldTable::new(),
    )
    .await
    .unwrap();
    let c = ch
        .basic_publish(
            "",
            &q,
            PublishOptions::default(),
            BasicProperties::default(),
            vec![0u8; 2000],
        )
        .await
        .unwrap();
    assert_eq!(c.await.unwrap(), Confirmation::Ack);

    let small = common::within(
        "connect",
        LIMIT,
        ConnectionBuilder::new(&common::amqp_url())
            .unwrap()
            .max_message_size(1000)
            .connect(),
    )
    .await
    .unwrap();
    let sch = chan(&small).await;
    let err = common::within("get of a too-large message", LIMIT, sch.basic_get(&q, true))
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            Error::Protocol(ProtocolError::MessageTooLarge {
                size: 2000,
                limit: 1000,
                ..
            })
        ),
        "{err:?}"
    );
    assert!(small.is_closed());
    let again = common::within("call after protocol error", FAST, small.channel())
        .await
        .unwrap_err();
    assert_eq!(again.to_string(), err.to_string());
    ch.queue_delete(&q, QueueDeleteOptions::default())
        .await
        .unwrap();
    conn.close().await.unwrap();
}

/// A publish that AMQP cannot carry (a short string over 255 bytes) is refused at the call with
/// a clear error — without confirms nobody could be told later — and the channel stays usable.
#[tokio::test]
async fn unencodable_publish_is_refused_at_the_call() {
    require_rabbitmq!("unencodable_publish_is_refused_at_the_call");
    let conn = connect().await;
    let ch = chan(&conn).await;
    let q = ch
        .queue_declare("", excl(), FieldTable::new())
        .await
        .unwrap()
        .queue;
    let long = "k".repeat(300);
    let err = ch
        .basic_publish(
            "",
            &long,
            PublishOptions::default(),
            BasicProperties::default(),
            "x",
        )
        .await
        .unwrap_err();
    assert!(matches!(err, Error::Encode(_)), "{err:?}");
    assert!(err.to_string().contains("255"), "{err}");
    let mut headers = FieldTable::new();
    headers.insert(long.as_str(), "v");
    let err = ch
        .basic_publish(
            "",
            &q,
            PublishOptions::default(),
            BasicProperties::default().with_headers(headers),
            "x",
        )
        .await
        .unwrap_err();
    assert!(matches!(err, Error::Encode(_)), "{err:?}");
    // Nothing was half-sent: the channel still works and the queue got nothing.
    ch.basic_publish(
        "",
        &q,
        PublishOptions::default(),
        BasicProperties::default(),
        "ok",
    )
    .await
    .unwrap();
    let got = common::within("basic.get", LIMIT, ch.basic_get(&q, true))
        .await
        .unwrap()
        .expect("the valid publish arrives");
    assert_eq!(&got.delivery.body[..], b"ok");
    assert!(!ch.is_closed());
    conn.close().await.unwrap();
}
