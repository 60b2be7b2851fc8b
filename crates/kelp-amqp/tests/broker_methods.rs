//! Every AMQP method of the client against the real RabbitMQ: exchanges, queues, bindings,
//! basic.*, confirms, returns, transactions, flow, cancellation, closes and tuning.
//!
//! Needs RabbitMQ on 127.0.0.1:5672 (guest/guest); without one each test prints SKIP and passes
//! (unless KELP_REQUIRE_BROKERS=1). Queues are exclusive (or deleted explicitly), exchanges are
//! deleted at the end of their test.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod common;

use std::collections::HashSet;
use std::time::{Duration, Instant};

use bytes::Bytes;
use kelp_amqp::codec::Decimal;
use kelp_amqp::error::reply_code;
use kelp_amqp::options::*;
use kelp_amqp::{
    BasicProperties, Channel, Confirmation, Connection, Consumer, Delivery, Error, FieldTable,
    FieldValue,
};

const LIMIT: Duration = Duration::from_secs(10);
/// How long we watch for a delivery that must not come.
const QUIET: Duration = Duration::from_millis(300);

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

/// A channel in confirm mode, so a publish's ack means the broker routed it.
async fn confirm_chan(conn: &Connection) -> Channel {
    let ch = chan(conn).await;
    ch.confirm_select().await.unwrap();
    ch
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

/// An exclusive queue with a unique name.
async fn tmp_queue(ch: &Channel, prefix: &str) -> String {
    let q = common::unique(prefix);
    let ok = ch
        .queue_declare(&q, excl(), FieldTable::new())
        .await
        .unwrap();
    assert_eq!(ok.queue.as_str(), q);
    q
}

/// Publish and wait for the confirm (Ack/Nack in confirm mode, NotRequested otherwise).
async fn publish(
    ch: &Channel,
    exchange: &str,
    key: &str,
    props: BasicProperties,
    body: impl Into<Bytes>,
) -> Confirmation {
    let confirm = ch
        .basic_publish(exchange, key, PublishOptions::default(), props, body)
        .await
        .unwrap();
    common::within("publish confirm", LIMIT, confirm)
        .await
        .unwrap()
}

/// Publish to the default exchange (a queue by name), expecting an Ack in confirm mode.
async fn put(ch: &Channel, queue: &str, body: &str) {
    let c = publish(ch, "", queue, BasicProperties::default(), body.to_owned()).await;
    assert!(
        matches!(c, Confirmation::Ack | Confirmation::NotRequested),
        "publish of {body:?} to {queue} was {c:?}"
    );
}

/// message_count of a queue, by passive declare.
async fn count(ch: &Channel, queue: &str) -> u32 {
    ch.queue_declare(queue, passive(), FieldTable::new())
        .await
        .unwrap()
        .message_count
}

/// Poll the message count until it equals `n` (acks/nacks are asynchronous on the broker).
async fn wait_count(ch: &Channel, queue: &str, n: u32) {
    let deadline = Instant::now() + Duration::from_secs(3);
    loop {
        let c = count(ch, queue).await;
        if c == n {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "queue {queue} has {c} messages, expected {n}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn next(consumer: &mut Consumer) -> Delivery {
    common::within("delivery", LIMIT, consumer.recv())
        .await
        .expect("consumer ended")
        .expect("consumer failed")
}

async fn assert_quiet(consumer: &mut Consumer) {
    if let Ok(item) = tokio::time::timeout(QUIET, consumer.recv()).await {
        panic!("expected no delivery, got {item:?}");
    }
}

/// Bodies of everything in `queue`, fetched with basic.get (no-ack) until empty.
async fn drain(ch: &Channel, queue: &str) -> Vec<String> {
    let mut out = Vec::new();
    while let Some(m) = ch.basic_get(queue, true).await.unwrap() {
        out.push(String::from_utf8(m.delivery.body.to_vec()).unwrap());
    }
    out
}

#[track_caller]
fn assert_channel_error(err: &Error, code: u16, method: &str) {
    match err {
        Error::ChannelClosed { reason, .. } => {
            assert_eq!(reason.code, code, "{err}");
            assert_eq!(reason.method(), Some(method), "{err}");
        }
        other => panic!("expected a channel close {code} by {method}, got {other:?}"),
    }
}

async fn delete_exchange(conn: &Connection, name: &str) {
    let ch = chan(conn).await;
    ch.exchange_delete(name, ExchangeDeleteOptions::default())
        .await
        .unwrap();
    ch.close().await.unwrap();
}

// ----- exchanges ----------------------------------------------------------------------------------

#[tokio::test]
async fn exchange_declare_every_builtin_type_routes_by_its_kind() {
    require_rabbitmq!("exchange_declare_every_builtin_type_routes_by_its_kind");
    // x-delayed-message is not installed on the test broker: not tested.
    let conn = connect().await;
    let ch = confirm_chan(&conn).await;
    // (kind, routed "a.b" to a queue bound with "a.*", routed "x.y")
    let cases: [(ExchangeKind, bool, bool); 4] = [
        (ExchangeKind::Direct, false, false),
        (ExchangeKind::Fanout, true, true),
        (ExchangeKind::Topic, true, false),
        // A headers binding without arguments matches every message.
        (ExchangeKind::Headers, true, true),
    ];
    for (kind, routes_ab, routes_xy) in cases {
        let ex = common::unique(&format!("ex-{}", kind.as_str()));
        ch.exchange_declare(
            &ex,
            kind.clone(),
            ExchangeDeclareOptions::default(),
            FieldTable::new(),
        )
        .await
        .unwrap();
        // The exact-match key must route on direct too.
        let q = tmp_queue(&ch, "ex-type").await;
        ch.queue_bind(&q, &ex, "a.*", FieldTable::new())
            .await
            .unwrap();
        publish(&ch, &ex, "a.*", BasicProperties::default(), "exact").await;
        publish(&ch, &ex, "a.b", BasicProperties::default(), "ab").await;
        publish(&ch, &ex, "x.y", BasicProperties::default(), "xy").await;
        let mut want = vec!["exact".to_owned()];
        if routes_ab {
            want.push("ab".into());
        }
        if routes_xy {
            want.push("xy".into());
        }
        assert_eq!(
            drain(&ch, &q).await,
            want,
            "routing of a {:?} exchange",
            kind
        );
        // Passive declare sees it, whatever type we name.
        ch.exchange_declare(
            &ex,
            ExchangeKind::Fanout,
            ExchangeDeclareOptions {
                passive: true,
                ..Default::default()
            },
            FieldTable::new(),
        )
        .await
        .unwrap();
        ch.exchange_delete(&ex, ExchangeDeleteOptions::default())
            .await
            .unwrap();
    }
    // Redeclaring with another type is refused: the type was really sent.
    let ex = common::unique("ex-type-clash");
    ch.exchange_declare(
        &ex,
        "topic",
        ExchangeDeclareOptions::default(),
        FieldTable::new(),
    )
    .await
    .unwrap();
    let ch2 = chan(&conn).await;
    let err = ch2
        .exchange_declare(
            &ex,
            "direct",
            ExchangeDeclareOptions::default(),
            FieldTable::new(),
        )
        .await
        .unwrap_err();
    assert_channel_error(&err, reply_code::PRECONDITION_FAILED, "exchange.declare");
    ch.exchange_delete(&ex, ExchangeDeleteOptions::default())
        .await
        .unwrap();
    conn.close().await.unwrap();
}

#[tokio::test]
async fn exchange_declare_flags_durable_auto_delete_internal() {
    require_rabbitmq!("exchange_declare_flags_durable_auto_delete_internal");
    let conn = connect().await;
    let ch = chan(&conn).await;

    // durable: a non-durable redeclare is inequivalent.
    let durable = common::unique("ex-durable");
    ch.exchange_declare(
        &durable,
        ExchangeKind::Direct,
        ExchangeDeclareOptions {
            durable: true,
            ..Default::default()
        },
        FieldTable::new(),
    )
    .await
    .unwrap();
    let err = ch
        .exchange_declare(
            &durable,
            ExchangeKind::Direct,
            ExchangeDeclareOptions::default(),
            FieldTable::new(),
        )
        .await
        .unwrap_err();
    assert_channel_error(&err, reply_code::PRECONDITION_FAILED, "exchange.declare");
    assert!(err.to_string().contains("durable"), "{err}");
    delete_exchange(&conn, &durable).await;

    // auto_delete: goes away when its last binding goes.
    let ch = chan(&conn).await;
    let auto = common::unique("ex-auto");
    ch.exchange_declare(
        &auto,
        ExchangeKind::Fanout,
        ExchangeDeclareOptions {
            auto_delete: true,
            ..Default::default()
        },
        FieldTable::new(),
    )
    .await
    .unwrap();
    let q = tmp_queue(&ch, "ex-auto").await;
    ch.queue_bind(&q, &auto, "", FieldTable::new())
        .await
        .unwrap();
    ch.queue_unbind(&q, &auto, "", FieldTable::new())
        .await
        .unwrap();
    let err = ch
        .exchange_declare(
            &auto,
            ExchangeKind::Fanout,
            ExchangeDeclareOptions {
                passive: true,
                ..Default::default()
            },
            FieldTable::new(),
        )
        .await
        .unwrap_err();
    assert_channel_error(&err, reply_code::NOT_FOUND, "exchange.declare");

    // internal: clients may not publish to it.
    let ch = chan(&conn).await;
    let internal = common::unique("ex-internal");
    ch.exchange_declare(
        &internal,
        ExchangeKind::Fanout,
        ExchangeDeclareOptions {
            internal: true,
            auto_delete: true,
            ..Default::default()
        },
        FieldTable::new(),
    )
    .await
    .unwrap();
    let _not_in_confirm_mode = ch
        .basic_publish(
            &internal,
            "",
            PublishOptions::default(),
            BasicProperties::default(),
            "x",
        )
        .await
        .unwrap();
    let err = common::within(
        "call after publish to internal exchange",
        LIMIT,
        ch.queue_declare("", excl(), FieldTable::new()),
    )
    .await
    .unwrap_err();
    assert_channel_error(&err, reply_code::ACCESS_REFUSED, "basic.publish");
    assert!(ch.is_closed());
    delete_exchange(&conn, &internal).await;
    conn.close().await.unwrap();
}

#[tokio::test]
async fn exchange_passive_declare_of_existing() {
    require_rabbitmq!("exchange_passive_declare_of_existing");
    let conn = connect().await;
    let ch = chan(&conn).await;
    let p = ExchangeDeclareOptions {
        passive: true,
        ..Default::default()
    };
    ch.exchange_declare("amq.direct", "direct", p, FieldTable::new())
        .await
        .unwrap();
    ch.exchange_declare("amq.topic", "topic", p, FieldTable::new())
        .await
        .unwrap();
    let ex = common::unique("ex-passive");
    ch.exchange_declare(
        &ex,
        "headers",
        ExchangeDeclareOptions::default(),
        FieldTable::new(),
    )
    .await
    .unwrap();
    ch.exchange_declare(&ex, "headers", p, FieldTable::new())
        .await
        .unwrap();
    assert!(!ch.is_closed());
    ch.exchange_delete(&ex, ExchangeDeleteOptions::default())
        .await
        .unwrap();
    conn.close().await.unwrap();
}

#[tokio::test]
async fn exchange_delete_if_unused() {
    require_rabbitmq!("exchange_delete_if_unused");
    let conn = connect().await;
    let ch = chan(&conn).await;
    let ex = common::unique("ex-ifunused");
    ch.exchange_declare(&ex, "direct", Default::default(), FieldTable::new())
        .await
        .unwrap();
    let q = tmp_queue(&ch, "ex-ifunused").await;
    ch.queue_bind(&q, &ex, "k", FieldTable::new())
        .await
        .unwrap();
    let if_unused = ExchangeDeleteOptions {
        if_unused: true,
        ..Default::default()
    };
    let err = ch.exchange_delete(&ex, if_unused).await.unwrap_err();
    assert_channel_error(&err, reply_code::PRECONDITION_FAILED, "exchange.delete");

    let ch = chan(&conn).await;
    ch.queue_unbind(&q, &ex, "k", FieldTable::new())
        .await
        .unwrap();
    ch.exchange_delete(&ex, if_unused).await.unwrap();
    let err = ch
        .exchange_declare(
            &ex,
            "direct",
            ExchangeDeclareOptions {
                passive: true,
                ..Default::default()
            },
            FieldTable::new(),
        )
        .await
        .unwrap_err();
    assert_channel_error(&err, reply_code::NOT_FOUND, "exchange.declare");
    conn.close().await.unwrap();
}

#[tokio::test]
async fn exchange_to_exchange_bind_and_unbind() {
    require_rabbitmq!("exchange_to_exchange_bind_and_unbind");
    let conn = connect().await;
    let ch = confirm_chan(&conn).await;
    let src = common::unique("e2e-src");
    let dst = common::unique("e2e-dst");
    ch.exchange_declare(&src, "topic", Default::default(), FieldTable::new())
        .await
        .unwrap();
    ch.exchange_declare(&dst, "direct", Default::default(), FieldTable::new())
        .await
        .unwrap();
    let q = tmp_queue(&ch, "e2e").await;
    ch.queue_bind(&q, &dst, "k.1", FieldTable::new())
        .await
        .unwrap();
    ch.exchange_bind(&dst, &src, "k.*", FieldTable::new())
        .await
        .unwrap();
    publish(&ch, &src, "k.1", BasicProperties::default(), "via-src").await;
    publish(&ch, &src, "z.1", BasicProperties::default(), "not-bound").await;
    assert_eq!(drain(&ch, &q).await, vec!["via-src".to_owned()]);

    ch.exchange_unbind(&dst, &src, "k.*", FieldTable::new())
        .await
        .unwrap();
    publish(&ch, &src, "k.1", BasicProperties::default(), "after-unbind").await;
    publish(&ch, &dst, "k.1", BasicProperties::default(), "direct").await;
    assert_eq!(drain(&ch, &q).await, vec!["direct".to_owned()]);

    ch.exchange_delete(&src, Default::default()).await.unwrap();
    ch.exchange_delete(&dst, Default::default()).await.unwrap();
    conn.close().await.unwrap();
}

// ----- queues -------------------------------------------------------------------------------------

#[tokio::test]
async fn queue_declare_named_and_server_named() {
    require_rabbitmq!("queue_declare_named_and_server_named");
    let conn = connect().await;
    let ch = chan(&conn).await;
    let name = common::unique("named");
    let ok = ch
        .queue_declare(&name, excl(), FieldTable::new())
        .await
        .unwrap();
    assert_eq!(ok.queue.as_str(), name);
    assert_eq!((ok.message_count, ok.consumer_count), (0, 0));

    let a = ch
        .queue_declare("", excl(), FieldTable::new())
        .await
        .unwrap();
    let b = ch
        .queue_declare("", excl(), FieldTable::new())
        .await
        .unwrap();
    assert!(a.queue.starts_with("amq.gen-"), "{}", a.queue.as_str());
    assert!(b.queue.starts_with("amq.gen-"), "{}", b.queue.as_str());
    assert_ne!(a.queue, b.queue);
    // The generated name is a real queue.
    put(&ch, &a.queue, "x").await;
    let m = common::within("get", LIMIT, async {
        loop {
            if let Some(m) = ch.basic_get(&a.queue, true).await.unwrap() {
                return m;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    assert_eq!(&m.delivery.body[..], b"x");
    assert_eq!(m.delivery.routing_key, a.queue);
    conn.close().await.unwrap();
}

#[tokio::test]
async fn queue_passive_declare_reports_counts() {
    require_rabbitmq!("queue_passive_declare_reports_counts");
    let conn = connect().await;
    let ch = confirm_chan(&conn).await;
    let q = tmp_queue(&ch, "passive").await;
    for i in 0..3 {
        put(&ch, &q, &format!("m{i}")).await;
    }
    let ok = ch
        .queue_declare(&q, passive(), FieldTable::new())
        .await
        .unwrap();
    assert_eq!(ok.queue.as_str(), q);
    assert_eq!(ok.message_count, 3);
    assert_eq!(ok.consumer_count, 0);

    let ch2 = chan(&conn).await;
    ch2.basic_qos(1, QosOptions::default()).await.unwrap();
    let _consumer = ch2
        .basic_consume(&q, ConsumeOptions::default())
        .await
        .unwrap();
    let ok = ch
        .queue_declare(&q, passive(), FieldTable::new())
        .await
        .unwrap();
    assert_eq!(ok.consumer_count, 1);
    conn.close().await.unwrap();
}

#[tokio::test]
async fn queue_exclusive_dies_with_its_connection() {
    require_rabbitmq!("queue_exclusive_dies_with_its_connection");
    let owner = connect().await;
    let other = connect().await;
    let ch = chan(&owner).await;
    let q = tmp_queue(&ch, "exclusive").await;
    let och = chan(&other).await;
    let err = och
        .queue_declare(&q, passive(), FieldTable::new())
        .await
        .unwrap_err();
    assert_channel_error(&err, reply_code::RESOURCE_LOCKED, "queue.declare");
    owner.close().await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(3);
    loop {
        // Each failed passive declare closes its channel: a fresh one per try.
        let och = chan(&other).await;
        match och.queue_declare(&q, passive(), FieldTable::new()).await {
            Err(e) if e.reply_code() == Some(reply_code::NOT_FOUND) => break,
            // The broker removes the queue asynchronously after the close.
            Err(e) if e.reply_code() == Some(reply_code::RESOURCE_LOCKED) => {}
            other => panic!("exclusive queue after its connection closed: {other:?}"),
        }
        assert!(
            Instant::now() < deadline,
            "exclusive queue survived its connection"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    other.close().await.unwrap();
}

#[tokio::test]
async fn queue_declare_with_arguments() {
    require_rabbitmq!("queue_declare_with_arguments");
    let conn = connect().await;
    let ch = confirm_chan(&conn).await;

    // x-max-length: oldest dropped.
    let q = common::unique("maxlen");
    ch.queue_declare(
        &q,
        excl(),
        FieldTable::new()
            .with("x-max-length", 2i32)
            .with("x-queue-type", "classic"),
    )
    .await
    .unwrap();
    for b in ["a", "b", "c"] {
        put(&ch, &q, b).await;
    }
    assert_eq!(count(&ch, &q).await, 2);
    assert_eq!(drain(&ch, &q).await, vec!["b".to_owned(), "c".to_owned()]);

    // x-message-ttl: expired messages are gone.
    let t = common::unique("ttl");
    ch.queue_declare(&t, excl(), FieldTable::new().with("x-message-ttl", 100i32))
        .await
        .unwrap();
    put(&ch, &t, "short-lived").await;
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(ch.basic_get(&t, true).await.unwrap(), None);

    // The arguments are part of the queue: a redeclare with other ones is refused.
    let err = ch
        .queue_declare(
            &q,
            excl(),
            FieldTable::new()
                .with("x-max-length", 3i32)
                .with("x-queue-type", "classic"),
        )
        .await
        .unwrap_err();
    assert_channel_error(&err, reply_code::PRECONDITION_FAILED, "queue.declare");
    assert!(err.to_string().contains("x-max-length"), "{err}");
    conn.close().await.unwrap();
}

#[tokio::test]
async fn queue_bind_unbind_with_routing_keys() {
    require_rabbitmq!("queue_bind_unbind_with_routing_keys");
    let conn = connect().await;
    let ch = confirm_chan(&conn).await;
    let q = tmp_queue(&ch, "bind").await;
    ch.queue_bind(&q, "amq.direct", &format!("{q}.k1"), FieldTable::new())
        .await
        .unwrap();
    ch.queue_bind(&q, "amq.direct", &format!("{q}.k2"), FieldTable::new())
        .await
        .unwrap();
    for k in ["k1", "k2", "k3"] {
        publish(
            &ch,
            "amq.direct",
            &format!("{q}.{k}"),
            BasicProperties::default(),
            k,
        )
        .await;
    }
    assert_eq!(drain(&ch, &q).await, vec!["k1".to_owned(), "k2".to_owned()]);
    ch.queue_unbind(&q, "amq.direct", &format!("{q}.k1"), FieldTable::new())
        .await
        .unwrap();
    for k in ["k1", "k2"] {
        publish(
            &ch,
            "amq.direct",
            &format!("{q}.{k}"),
            BasicProperties::default(),
            k,
        )
        .await;
    }
    assert_eq!(drain(&ch, &q).await, vec!["k2".to_owned()]);
    conn.close().await.unwrap();
}

#[tokio::test]
async fn headers_exchange_x_match_all_and_any() {
    require_rabbitmq!("headers_exchange_x_match_all_and_any");
    let conn = connect().await;
    let ch = confirm_chan(&conn).await;
    let ex = common::unique("headers");
    ch.exchange_declare(&ex, "headers", Default::default(), FieldTable::new())
        .await
        .unwrap();
    let q_all = tmp_queue(&ch, "hall").await;
    let q_any = tmp_queue(&ch, "hany").await;
    let args = |m: &str| {
        FieldTable::new()
            .with("x-match", m)
            .with("a", 1i32)
            .with("b", "two")
    };
    ch.queue_bind(&q_all, &ex, "", args("all")).await.unwrap();
    ch.queue_bind(&q_any, &ex, "", args("any")).await.unwrap();
    let send = |h: FieldTable, body: &'static str| {
        let ch = ch.clone();
        let ex = ex.clone();
        async move {
            publish(
                &ch,
                &ex,
                "",
                BasicProperties::default().with_headers(h),
                body,
            )
            .await;
        }
    };
    send(FieldTable::new().with("a", 1i32), "only-a").await;
    send(
        FieldTable::new().with("a", 1i32).with("b", "two"),
        "a-and-b",
    )
    .await;
    send(FieldTable::new().with("c", 3i32), "only-c").await;
    send(FieldTable::new().with("a", 2i32), "wrong-a").await;
    assert_eq!(drain(&ch, &q_all).await, vec!["a-and-b".to_owned()]);
    assert_eq!(
        drain(&ch, &q_any).await,
        vec!["only-a".to_owned(), "a-and-b".to_owned()]
    );
    ch.queue_unbind(&q_any, &ex, "", args("any")).await.unwrap();
    send(FieldTable::new().with("a", 1i32).with("b", "two"), "after").await;
    assert_eq!(drain(&ch, &q_all).await, vec!["after".to_owned()]);
    assert!(drain(&ch, &q_any).await.is_empty());
    ch.exchange_delete(&ex, Default::default()).await.unwrap();
    conn.close().await.unwrap();
}

#[tokio::test]
async fn queue_purge_returns_count() {
    require_rabbitmq!("queue_purge_returns_count");
    let conn = connect().await;
    let ch = confirm_chan(&conn).await;
    let q = tmp_queue(&ch, "purge").await;
    for i in 0..5 {
        put(&ch, &q, &i.to_string()).await;
    }
    assert_eq!(ch.queue_purge(&q).await.unwrap(), 5);
    assert_eq!(count(&ch, &q).await, 0);
    assert_eq!(ch.queue_purge(&q).await.unwrap(), 0);
    conn.close().await.unwrap();
}

#[tokio::test]
async fn queue_delete_returns_count_and_honours_if_empty_if_unused() {
    require_rabbitmq!("queue_delete_returns_count_and_honours_if_empty_if_unused");
    let conn = connect().await;
    let ch = confirm_chan(&conn).await;
    let q = tmp_queue(&ch, "delete").await;
    for i in 0..3 {
        put(&ch, &q, &i.to_string()).await;
    }
    let err = ch
        .queue_delete(
            &q,
            QueueDeleteOptions {
                if_empty: true,
                ..Default::default()
            },
        )
        .await
        .unwrap_err();
    assert_channel_error(&err, reply_code::PRECONDITION_FAILED, "queue.delete");

    let ch = chan(&conn).await;
    let consumer = ch
        .basic_consume(&q, ConsumeOptions::default())
        .await
        .unwrap();
    let ch2 = chan(&conn).await;
    let err = ch2
        .queue_delete(
            &q,
            QueueDeleteOptions {
                if_unused: true,
                ..Default::default()
            },
        )
        .await
        .unwrap_err();
    assert_channel_error(&err, reply_code::PRECONDITION_FAILED, "queue.delete");
    consumer.cancel().await.unwrap();
    // Cancelling requeues nothing while unacked messages stay with the channel: close it.
    ch.close().await.unwrap();

    let ch = chan(&conn).await;
    wait_count(&ch, &q, 3).await;
    assert_eq!(
        ch.queue_delete(&q, QueueDeleteOptions::default())
            .await
            .unwrap(),
        3
    );
    let err = ch
        .queue_declare(&q, passive(), FieldTable::new())
        .await
        .unwrap_err();
    assert_channel_error(&err, reply_code::NOT_FOUND, "queue.declare");
    conn.close().await.unwrap();
}

// ----- basic: qos, consume, cancel, get -----------------------------------------------------------

#[tokio::test]
async fn basic_qos_per_consumer_limits_unacked() {
    require_rabbitmq!("basic_qos_per_consumer_limits_unacked");
    let conn = connect().await;
    let pch = confirm_chan(&conn).await;
    let q = tmp_queue(&pch, "qos").await;
    for i in 0..3 {
        put(&pch, &q, &format!("m{i}")).await;
    }
    let ch = chan(&conn).await;
    ch.basic_qos(1, QosOptions::default()).await.unwrap();
    let mut c = ch
        .basic_consume(&q, ConsumeOptions::default())
        .await
        .unwrap();
    let d0 = next(&mut c).await;
    assert_eq!(&d0.body[..], b"m0");
    assert_quiet(&mut c).await;
    ch.basic_ack(d0.delivery_tag, false).await.unwrap();
    let d1 = next(&mut c).await;
    assert_eq!(&d1.body[..], b"m1");
    assert_quiet(&mut c).await;
    ch.basic_ack(d1.delivery_tag, false).await.unwrap();
    assert_eq!(&next(&mut c).await.body[..], b"m2");
    conn.close().await.unwrap();
}

#[tokio::test]
async fn basic_qos_global_is_shared_by_the_channels_consumers() {
    require_rabbitmq!("basic_qos_global_is_shared_by_the_channels_consumers");
    let conn = connect().await;
    let pch = confirm_chan(&conn).await;
    let qa = tmp_queue(&pch, "gqos-a").await;
    let qb = tmp_queue(&pch, "gqos-b").await;
    put(&pch, &qa, "a").await;
    put(&pch, &qb, "b").await;

    // Per consumer (global=false): each consumer gets its one message.
    let ch = chan(&conn).await;
    ch.basic_qos(1, QosOptions::default()).await.unwrap();
    let mut ca = ch
        .basic_consume(&qa, ConsumeOptions::default())
        .await
        .unwrap();
    let mut cb = ch
        .basic_consume(&qb, ConsumeOptions::default())
        .await
        .unwrap();
    next(&mut ca).await;
    next(&mut cb).await;
    ch.close().await.unwrap(); // requeues both
    drop((ca, cb));

    // Global: one unacked message for the whole channel.
    let ch = chan(&conn).await;
    ch.basic_qos(
        1,
        QosOptions {
            global: true,
            ..Default::default()
        },
    )
    .await
    .unwrap();
    let mut ca = ch
        .basic_consume(&qa, ConsumeOptions::default())
        .await
        .unwrap();
    let mut cb = ch
        .basic_consume(&qb, ConsumeOptions::default())
        .await
        .unwrap();
    let first = tokio::select! {
        d = ca.recv() => d.unwrap().unwrap(),
        d = cb.recv() => d.unwrap().unwrap(),
        _ = tokio::time::sleep(LIMIT) => panic!("no delivery"),
    };
    let (waiting, other_body) = if &first.body[..] == b"a" {
        (&mut cb, b"b")
    } else {
        (&mut ca, b"a")
    };
    assert_quiet(waiting).await;
    ch.basic_ack(first.delivery_tag, false).await.unwrap();
    assert_eq!(&next(waiting).await.body[..], other_body);
    conn.close().await.unwrap();
}

#[tokio::test]
async fn consume_with_explicit_and_generated_tags() {
    require_rabbitmq!("consume_with_explicit_and_generated_tags");
    let conn = connect().await;
    let ch = confirm_chan(&conn).await;
    let q = tmp_queue(&ch, "tags").await;
    let tag = common::unique("ctag");
    let mut explicit = ch
        .basic_consume(
            &q,
            ConsumeOptions {
                consumer_tag: tag.as_str().into(),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    assert_eq!(explicit.tag(), tag);
    assert_eq!(explicit.queue(), q);
    put(&ch, &q, "one").await;
    let d = next(&mut explicit).await;
    assert_eq!(d.consumer_tag.as_str(), tag);
    assert_eq!(d.routing_key.as_str(), q);
    assert_eq!(d.exchange.as_str(), "");
    assert!(!d.redelivered);
    ch.basic_ack(d.delivery_tag, false).await.unwrap();
    explicit.cancel().await.unwrap();

    let mut generated = ch
        .basic_consume(&q, ConsumeOptions::default())
        .await
        .unwrap();
    assert!(
        generated.tag().starts_with("amq.ctag-"),
        "{}",
        generated.tag()
    );
    put(&ch, &q, "two").await;
    let d = next(&mut generated).await;
    assert_eq!(d.consumer_tag.as_str(), generated.tag());
    assert_eq!(&d.body[..], b"two");
    ch.basic_ack(d.delivery_tag, false).await.unwrap();
    conn.close().await.unwrap();
}

#[tokio::test]
async fn consume_no_ack_needs_no_ack() {
    require_rabbitmq!("consume_no_ack_needs_no_ack");
    let conn = connect().await;
    let pch = confirm_chan(&conn).await;
    let q = tmp_queue(&pch, "noack").await;
    put(&pch, &q, "fire-and-forget").await;
    put(&pch, &q, "needs-ack").await;

    let ch = chan(&conn).await;
    let mut c = ch
        .basic_consume(
            &q,
            ConsumeOptions {
                no_ack: true,
                ..Default::default()
            },
        )
        .await
        .unwrap();
    assert_eq!(&next(&mut c).await.body[..], b"fire-and-forget");
    assert_eq!(&next(&mut c).await.body[..], b"needs-ack");
    ch.close().await.unwrap();
    // Nothing comes back: no_ack deliveries count as acked.
    assert_eq!(count(&pch, &q).await, 0);

    // Contrast: unacked deliveries of an acking consumer come back when its channel closes.
    put(&pch, &q, "requeued").await;
    let ch = chan(&conn).await;
    let mut c = ch
        .basic_consume(&q, ConsumeOptions::default())
        .await
        .unwrap();
    assert_eq!(&next(&mut c).await.body[..], b"requeued");
    ch.close().await.unwrap();
    wait_count(&pch, &q, 1).await;
    conn.close().await.unwrap();
}

#[tokio::test]
async fn exclusive_consumer_refuses_a_second_one() {
    require_rabbitmq!("exclusive_consumer_refuses_a_second_one");
    let conn = connect().await;
    let ch = chan(&conn).await;
    let q = tmp_queue(&ch, "xconsumer").await;
    let _c = ch
        .basic_consume(
            &q,
            ConsumeOptions {
                exclusive: true,
                ..Default::default()
            },
        )
        .await
        .unwrap();
    for exclusive in [true, false] {
        let ch2 = chan(&conn).await;
        let err = ch2
            .basic_consume(
                &q,
                ConsumeOptions {
                    exclusive,
                    ..Default::default()
                },
            )
            .await
            .unwrap_err();
        assert_channel_error(&err, reply_code::ACCESS_REFUSED, "basic.consume");
        assert!(ch2.is_closed());
    }
    // The first consumer's channel is unaffected.
    assert!(!ch.is_closed());
    ch.queue_declare(&q, passive(), FieldTable::new())
        .await
        .unwrap();
    conn.close().await.unwrap();
}

#[tokio::test]
async fn cancel_ends_the_stream_and_stops_deliveries() {
    require_rabbitmq!("cancel_ends_the_stream_and_stops_deliveries");
    let conn = connect().await;
    let ch = confirm_chan(&conn).await;
    let q = tmp_queue(&ch, "cancel").await;
    let mut c = ch
        .basic_consume(&q, ConsumeOptions::default())
        .await
        .unwrap();
    put(&ch, &q, "before").await;
    let d = next(&mut c).await;
    ch.basic_ack(d.delivery_tag, false).await.unwrap();
    c.cancel().await.unwrap();
    let end = common::within("stream end after cancel", LIMIT, c.recv()).await;
    assert!(end.is_none(), "after cancel: {end:?}");
    assert!(c.recv().await.is_none());
    put(&ch, &q, "after").await;
    // Not delivered to the cancelled consumer: still in the queue.
    let m = ch.basic_get(&q, true).await.unwrap().expect("message");
    assert_eq!(&m.delivery.body[..], b"after");
    // And the broker forgot the consumer.
    let ok = ch
        .queue_declare(&q, passive(), FieldTable::new())
        .await
        .unwrap();
    assert_eq!(ok.consumer_count, 0);
    conn.close().await.unwrap();
}

#[tokio::test]
async fn basic_get_some_then_none() {
    require_rabbitmq!("basic_get_some_then_none");
    let conn = connect().await;
    let ch = confirm_chan(&conn).await;
    let q = tmp_queue(&ch, "get").await;
    assert_eq!(ch.basic_get(&q, false).await.unwrap(), None);
    put(&ch, &q, "first").await;
    put(&ch, &q, "second").await;
    let m1 = ch.basic_get(&q, false).await.unwrap().expect("first");
    assert_eq!(&m1.delivery.body[..], b"first");
    assert_eq!(m1.message_count, 1);
    assert_eq!(m1.delivery.routing_key.as_str(), q);
    assert!(!m1.delivery.redelivered);
    let m2 = ch.basic_get(&q, false).await.unwrap().expect("second");
    assert_eq!(&m2.delivery.body[..], b"second");
    assert_eq!(m2.message_count, 0);
    assert!(m2.delivery.delivery_tag > m1.delivery.delivery_tag);
    assert_eq!(ch.basic_get(&q, false).await.unwrap(), None);
    ch.basic_ack(m2.delivery.delivery_tag, true).await.unwrap();
    // Still usable after an empty get.
    assert_eq!(count(&ch, &q).await, 0);
    conn.close().await.unwrap();
}

// ----- basic: acknowledgements --------------------------------------------------------------------

#[tokio::test]
async fn ack_single_and_multiple() {
    require_rabbitmq!("ack_single_and_multiple");
    let conn = connect().await;
    let pch = confirm_chan(&conn).await;
    let q = tmp_queue(&pch, "ack").await;
    for i in 1..=5 {
        put(&pch, &q, &format!("m{i}")).await;
    }
    let ch = chan(&conn).await;
    let mut c = ch
        .basic_consume(&q, ConsumeOptions::default())
        .await
        .unwrap();
    let mut ds = Vec::new();
    for _ in 0..5 {
        ds.push(next(&mut c).await);
    }
    // multiple: acks m1..m3; single: m5. m4 stays unacked.
    ch.basic_ack(ds[2].delivery_tag, true).await.unwrap();
    ch.basic_ack(ds[4].delivery_tag, false).await.unwrap();
    ch.close().await.unwrap();
    wait_count(&pch, &q, 1).await;
    assert_eq!(drain(&pch, &q).await, vec!["m4".to_owned()]);
    conn.close().await.unwrap();
}

#[tokio::test]
async fn nack_requeue_redelivers_and_nack_without_requeue_drops() {
    require_rabbitmq!("nack_requeue_redelivers_and_nack_without_requeue_drops");
    let conn = connect().await;
    let ch = confirm_chan(&conn).await;
    let q = tmp_queue(&ch, "nack").await;
    put(&ch, &q, "n").await;
    let mut c = ch
        .basic_consume(&q, ConsumeOptions::default())
        .await
        .unwrap();
    let d = next(&mut c).await;
    assert!(!d.redelivered);
    ch.basic_nack(d.delivery_tag, false, true).await.unwrap();
    let again = next(&mut c).await;
    assert_eq!(&again.body[..], b"n");
    assert!(again.redelivered);
    ch.basic_nack(again.delivery_tag, false, false)
        .await
        .unwrap();
    assert_quiet(&mut c).await;
    c.cancel().await.unwrap();
    wait_count(&ch, &q, 0).await;

    // nack multiple.
    for b in ["x", "y", "z"] {
        put(&ch, &q, b).await;
    }
    let mut c = ch
        .basic_consume(&q, ConsumeOptions::default())
        .await
        .unwrap();
    let mut last = 0;
    for _ in 0..3 {
        last = next(&mut c).await.delivery_tag;
    }
    ch.basic_nack(last, true, false).await.unwrap();
    assert_quiet(&mut c).await;
    c.cancel().await.unwrap();
    wait_count(&ch, &q, 0).await;
    conn.close().await.unwrap();
}

#[tokio::test]
async fn reject_requeue_and_no_requeue() {
    require_rabbitmq!("reject_requeue_and_no_requeue");
    let conn = connect().await;
    let ch = confirm_chan(&conn).await;
    let q = tmp_queue(&ch, "reject").await;
    put(&ch, &q, "r").await;
    let mut c = ch
        .basic_consume(&q, ConsumeOptions::default())
        .await
        .unwrap();
    let d = next(&mut c).await;
    ch.basic_reject(d.delivery_tag, true).await.unwrap();
    let again = next(&mut c).await;
    assert_eq!(&again.body[..], b"r");
    assert!(again.redelivered);
    assert_ne!(again.delivery_tag, d.delivery_tag);
    ch.basic_reject(again.delivery_tag, false).await.unwrap();
    assert_quiet(&mut c).await;
    c.cancel().await.unwrap();
    wait_count(&ch, &q, 0).await;
    conn.close().await.unwrap();
}

#[tokio::test]
async fn recover_requeue_redelivers_unacked() {
    require_rabbitmq!("recover_requeue_redelivers_unacked");
    let conn = connect().await;
    let ch = confirm_chan(&conn).await;
    let q = tmp_queue(&ch, "recover").await;
    put(&ch, &q, "a").await;
    put(&ch, &q, "b").await;
    let mut c = ch
        .basic_consume(&q, ConsumeOptions::default())
        .await
        .unwrap();
    let a = next(&mut c).await;
    let b = next(&mut c).await;
    ch.basic_ack(a.delivery_tag, false).await.unwrap();
    ch.basic_recover(true).await.unwrap();
    let again = next(&mut c).await;
    assert_eq!(&again.body[..], b"b");
    assert!(again.redelivered);
    assert_ne!(again.delivery_tag, b.delivery_tag);
    ch.basic_ack(again.delivery_tag, false).await.unwrap();
    assert_quiet(&mut c).await;
    conn.close().await.unwrap();
}

// ----- basic.publish: properties, sizes, confirms, returns -----------------------------------------

fn every_field_type() -> FieldTable {
    FieldTable::new()
        .with("bool", true)
        .with("i8", -8i8)
        .with("u8", 200u8)
        .with("i16", -16_000i16)
        .with("u16", 60_000u16)
        .with("i32", -2_000_000_000i32)
        .with("u32", 4_000_000_000u32)
        .with("i64", -9_000_000_000_000_000_000i64)
        .with("f32", 1.5f32)
        .with("f64", -2.25e100f64)
        .with(
            "decimal",
            Decimal {
                scale: 3,
                value: 123_456,
            },
        )
        .with("longstr", "héllo wörld")
        .with(
            "bytes",
            FieldValue::ByteArray(Bytes::from_static(b"\x00\x01\xfe\xff")),
        )
        .with(
            "array",
            vec![
                FieldValue::I32(1),
                FieldValue::from("two"),
                FieldValue::Bool(false),
                FieldValue::Array(vec![FieldValue::Void]),
                FieldValue::Table(FieldTable::new().with("in", 1i64)),
            ],
        )
        .with("timestamp", FieldValue::Timestamp(1_700_000_000))
        .with(
            "table",
            FieldTable::new()
                .with("nested", "yes")
                .with("deeper", FieldTable::new().with("n", 7u8)),
        )
        .with("void", FieldValue::Void)
        .with("empty-array", Vec::<FieldValue>::new())
        .with("empty-table", FieldTable::new())
}

fn all_properties() -> BasicProperties {
    BasicProperties::default()
        .with_content_type("application/x-kelp")
        .with_content_encoding("gzip")
        .with_headers(every_field_type())
        .with_delivery_mode(2)
        .with_priority(7)
        .with_correlation_id("corr-42")
        .with_reply_to("reply-queue")
        .with_expiration("600000")
        .with_message_id("msg-1")
        .with_timestamp(1_700_000_123u64)
        .with_kind("kelp.test")
        .with_user_id("guest")
        .with_app_id("kelp-tests")
}

#[tokio::test]
async fn publish_all_properties_and_header_types_round_trip() {
    require_rabbitmq!("publish_all_properties_and_header_types_round_trip");
    let conn = connect().await;
    let ch = confirm_chan(&conn).await;
    let q = tmp_queue(&ch, "props").await;
    let props = all_properties();
    assert_eq!(
        publish(&ch, "", &q, props.clone(), "with props").await,
        Confirmation::Ack
    );
    let m = ch.basic_get(&q, true).await.unwrap().expect("message");
    assert_eq!(&m.delivery.body[..], b"with props");
    assert_eq!(m.delivery.properties, props);
    // Same through a consumer.
    publish(&ch, "", &q, props.clone(), "consumed").await;
    let mut c = ch
        .basic_consume(
            &q,
            ConsumeOptions {
                no_ack: true,
                ..Default::default()
            },
        )
        .await
        .unwrap();
    let d = next(&mut c).await;
    assert_eq!(&d.body[..], b"consumed");
    assert_eq!(d.properties, props);
    // No properties at all round-trips as no properties.
    publish(&ch, "", &q, BasicProperties::default(), "bare").await;
    let d = next(&mut c).await;
    assert_eq!(d.properties, BasicProperties::default());
    conn.close().await.unwrap();
}

#[tokio::test]
async fn large_body_split_over_frames_round_trips() {
    require_rabbitmq!("large_body_split_over_frames_round_trips");
    let conn = connect().await;
    let frame_max = conn.tuning().frame_max as usize;
    let ch = confirm_chan(&conn).await;
    let q = tmp_queue(&ch, "large").await;
    let len = (1 << 20) + 7;
    assert!(len > frame_max * 4);
    let body: Vec<u8> = (0..len).map(|i| (i * 31 % 251) as u8).collect();
    let body = Bytes::from(body);
    assert_eq!(
        publish(&ch, "", &q, BasicProperties::default(), body.clone()).await,
        Confirmation::Ack
    );
    let m = ch.basic_get(&q, true).await.unwrap().expect("message");
    assert_eq!(m.delivery.body.len(), len);
    assert!(m.delivery.body == body, "1 MiB body changed on the way");
    // And through a consumer, twice in a row (frames of two messages must not mix).
    publish(&ch, "", &q, BasicProperties::default(), body.clone()).await;
    publish(&ch, "", &q, BasicProperties::default(), body.slice(1..)).await;
    let mut c = ch
        .basic_consume(&q, ConsumeOptions::default())
        .await
        .unwrap();
    let d1 = next(&mut c).await;
    let d2 = next(&mut c).await;
    assert!(d1.body == body);
    assert!(d2.body == body.slice(1..));
    ch.basic_ack(d2.delivery_tag, true).await.unwrap();
    conn.close().await.unwrap();
}

#[tokio::test]
async fn empty_body_round_trips() {
    require_rabbitmq!("empty_body_round_trips");
    let conn = connect().await;
    let ch = confirm_chan(&conn).await;
    let q = tmp_queue(&ch, "empty").await;
    let props = BasicProperties::default().with_message_id("empty");
    assert_eq!(
        publish(&ch, "", &q, props.clone(), Bytes::new()).await,
        Confirmation::Ack
    );
    put(&ch, &q, "after-empty").await;
    let m = ch.basic_get(&q, true).await.unwrap().expect("message");
    assert!(m.delivery.body.is_empty());
    assert_eq!(m.delivery.properties, props);
    assert_eq!(m.message_count, 1);
    let mut c = ch
        .basic_consume(
            &q,
            ConsumeOptions {
                no_ack: true,
                ..Default::default()
            },
        )
        .await
        .unwrap();
    assert_eq!(&next(&mut c).await.body[..], b"after-empty");
    publish(&ch, "", &q, props.clone(), Bytes::new()).await;
    let d = next(&mut c).await;
    assert!(d.body.is_empty());
    conn.close().await.unwrap();
}

#[tokio::test]
async fn confirm_mode_acks_every_publish() {
    require_rabbitmq!("confirm_mode_acks_every_publish");
    let conn = connect().await;
    let ch = chan(&conn).await;
    assert!(!ch.is_confirm_mode());
    let q = tmp_queue(&ch, "confirm").await;
    // Before confirm.select: nothing to wait for.
    let c = ch
        .basic_publish(
            "",
            &q,
            PublishOptions::default(),
            BasicProperties::default(),
            "pre",
        )
        .await
        .unwrap();
    assert_eq!(c.await.unwrap(), Confirmation::NotRequested);
    ch.confirm_select().await.unwrap();
    assert!(ch.is_confirm_mode());
    let mut pending = Vec::new();
    for i in 0..200 {
        pending.push(
            ch.basic_publish(
                "",
                &q,
                PublishOptions::default(),
                BasicProperties::default(),
                format!("{i}"),
            )
            .await
            .unwrap(),
        );
    }
    for (i, p) in pending.into_iter().enumerate() {
        let c = common::within("confirm", LIMIT, p).await.unwrap();
        assert_eq!(c, Confirmation::Ack, "publish {i}");
    }
    assert_eq!(count(&ch, &q).await, 201);
    conn.close().await.unwrap();
}

#[tokio::test]
async fn confirm_nack_on_reject_publish_overflow() {
    require_rabbitmq!("confirm_nack_on_reject_publish_overflow");
    let conn = connect().await;
    let ch = confirm_chan(&conn).await;
    let q = common::unique("overflow");
    ch.queue_declare(
        &q,
        excl(),
        FieldTable::new()
            .with("x-max-length", 1i32)
            .with("x-overflow", "reject-publish"),
    )
    .await
    .unwrap();
    let first = publish(&ch, "", &q, BasicProperties::default(), "1").await;
    let second = publish(&ch, "", &q, BasicProperties::default(), "2").await;
    assert_eq!(first, Confirmation::Ack);
    assert_eq!(second, Confirmation::Nack);
    assert!(!second.is_ack());
    // The channel survives a nack.
    assert_eq!(drain(&ch, &q).await, vec!["1".to_owned()]);
    assert_eq!(
        publish(&ch, "", &q, BasicProperties::default(), "3").await,
        Confirmation::Ack
    );
    conn.close().await.unwrap();
}

#[tokio::test]
async fn mandatory_unroutable_publish_is_returned() {
    require_rabbitmq!("mandatory_unroutable_publish_is_returned");
    let conn = connect().await;
    let ch = chan(&conn).await;
    let mut returns = ch.returns();
    let key = common::unique("nowhere");
    let props = BasicProperties::default().with_message_id("lost");
    let _not_in_confirm_mode = ch
        .basic_publish(
            "",
            &key,
            PublishOptions {
                mandatory: true,
                ..Default::default()
            },
            props.clone(),
            "return me",
        )
        .await
        .unwrap();
    let r = common::within("basic.return", LIMIT, returns.recv())
        .await
        .expect("returns stream ended");
    assert_eq!(r.reply_code, reply_code::NO_ROUTE);
    assert_eq!(r.reply_text.as_str(), "NO_ROUTE");
    assert_eq!(r.exchange.as_str(), "");
    assert_eq!(r.routing_key.as_str(), key);
    assert_eq!(r.channel, ch.id());
    assert_eq!(&r.body[..], b"return me");
    assert_eq!(r.properties, props);

    // Not mandatory: silently dropped, nothing returned.
    let _not_in_confirm_mode = ch
        .basic_publish(
            "",
            &key,
            PublishOptions::default(),
            BasicProperties::default(),
            "drop me",
        )
        .await
        .unwrap();
    ch.queue_declare("", excl(), FieldTable::new())
        .await
        .unwrap(); // round trip
    assert!(
        tokio::time::timeout(QUIET, returns.recv()).await.is_err(),
        "a non-mandatory publish was returned"
    );

    // In confirm mode the return resolves its publish's confirm, and only that.
    ch.confirm_select().await.unwrap();
    let mandatory = PublishOptions {
        mandatory: true,
        ..Default::default()
    };
    let c = ch
        .basic_publish("", &key, mandatory, BasicProperties::default(), "again")
        .await
        .unwrap();
    match c.await.unwrap() {
        Confirmation::Returned(r) => {
            assert_eq!(&r.body[..], b"again");
            assert_eq!(r.reply_code, reply_code::NO_ROUTE);
            assert_eq!(r.routing_key.as_str(), key);
        }
        other => panic!("expected Returned, got {other:?}"),
    }
    assert!(
        returns.try_recv_now().is_none(),
        "claimed return also streamed"
    );
    // A publish whose confirm nobody awaits: its return goes to the stream.
    drop(
        ch.basic_publish("", &key, mandatory, BasicProperties::default(), "dropped")
            .await
            .unwrap(),
    );
    let r = common::within("basic.return", LIMIT, returns.recv())
        .await
        .expect("returns stream ended");
    assert_eq!(&r.body[..], b"dropped");
    conn.close().await.unwrap();
}

/// `Returns` has only async `recv`; poll it once without waiting.
trait TryRecvNow {
    fn try_recv_now(&mut self) -> Option<kelp_amqp::ReturnedMessage>;
}
impl TryRecvNow for kelp_amqp::Returns {
    fn try_recv_now(&mut self) -> Option<kelp_amqp::ReturnedMessage> {
        futures_now(self.recv())
    }
}

fn futures_now<F: std::future::Future<Output = Option<T>>, T>(f: F) -> Option<T> {
    let waker = noop_waker();
    let mut cx = std::task::Context::from_waker(&waker);
    let mut f = std::pin::pin!(f);
    match f.as_mut().poll(&mut cx) {
        std::task::Poll::Ready(r) => r,
        std::task::Poll::Pending => None,
    }
}

fn noop_waker() -> std::task::Waker {
    struct Noop;
    impl std::task::Wake for Noop {
        fn wake(self: std::sync::Arc<Self>) {}
    }
    std::task::Waker::from(std::sync::Arc::new(Noop))
}

#[tokio::test]
async fn tx_commit_publishes_and_rollback_discards() {
    require_rabbitmq!("tx_commit_publishes_and_rollback_discards");
    let conn = connect().await;
    let observer = chan(&conn).await;
    let q = tmp_queue(&observer, "tx").await;
    let ch = chan(&conn).await;
    ch.tx_select().await.unwrap();
    put(&ch, &q, "committed").await;
    // A round trip on the tx channel: the broker has the publish, but holds it.
    ch.queue_declare(&q, passive(), FieldTable::new())
        .await
        .unwrap();
    assert_eq!(count(&observer, &q).await, 0);
    assert_eq!(observer.basic_get(&q, true).await.unwrap(), None);
    ch.tx_commit().await.unwrap();
    wait_count(&observer, &q, 1).await;

    put(&ch, &q, "rolled-back").await;
    ch.tx_rollback().await.unwrap();
    ch.tx_commit().await.unwrap(); // commits nothing
    assert_eq!(count(&observer, &q).await, 1);
    assert_eq!(drain(&observer, &q).await, vec!["committed".to_owned()]);

    // Acks are transactional too.
    put(&ch, &q, "acked-in-tx").await;
    ch.tx_commit().await.unwrap();
    let m = ch.basic_get(&q, false).await.unwrap().expect("message");
    ch.basic_ack(m.delivery.delivery_tag, false).await.unwrap();
    ch.tx_rollback().await.unwrap();
    ch.basic_recover(true).await.unwrap();
    let m = common::within("requeued after rolled-back ack", LIMIT, async {
        loop {
            if let Some(m) = ch.basic_get(&q, false).await.unwrap() {
                return m;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    assert_eq!(&m.delivery.body[..], b"acked-in-tx");
    assert!(m.delivery.redelivered);
    conn.close().await.unwrap();
}

#[tokio::test]
async fn channel_flow_true_is_acknowledged() {
    require_rabbitmq!("channel_flow_true_is_acknowledged");
    let conn = connect().await;
    let ch = confirm_chan(&conn).await;
    assert!(ch.is_flow_active());
    assert!(ch.flow(true).await.unwrap());
    assert!(ch.is_flow_active());
    // Still fully usable.
    let q = tmp_queue(&ch, "flow").await;
    put(&ch, &q, "x").await;
    assert_eq!(count(&ch, &q).await, 1);
    conn.close().await.unwrap();
}

// ----- cancellation and closes --------------------------------------------------------------------

#[tokio::test]
async fn consumer_cancelled_by_broker_when_queue_deleted() {
    require_rabbitmq!("consumer_cancelled_by_broker_when_queue_deleted");
    let conn = connect().await;
    let ch = confirm_chan(&conn).await;
    let q = tmp_queue(&ch, "cancel-notify").await;
    let mut c = ch
        .basic_consume(&q, ConsumeOptions::default())
        .await
        .unwrap();
    put(&ch, &q, "before").await;
    let d = next(&mut c).await;
    ch.basic_ack(d.delivery_tag, false).await.unwrap();

    let other = chan(&conn).await;
    other
        .queue_delete(&q, QueueDeleteOptions::default())
        .await
        .unwrap();
    let item = common::within("cancel notification", LIMIT, c.recv()).await;
    match item {
        Some(Err(Error::ConsumerCancelled {
            channel,
            consumer_tag,
        })) => {
            assert_eq!(channel, ch.id());
            assert_eq!(consumer_tag, c.tag());
        }
        other => panic!("expected ConsumerCancelled, got {other:?}"),
    }
    assert!(c.recv().await.is_none());
    // Only the consumer ended; the channel goes on.
    assert!(!ch.is_closed());
    let q2 = tmp_queue(&ch, "after-cancel").await;
    put(&ch, &q2, "y").await;
    conn.close().await.unwrap();
}

/// A no-ack consumer on its own connection, with a buffer of one delivery, on a queue holding
/// `n` messages that all reach the client before the consumer reads any.
async fn slow_consumer(conn: &Connection, q: &str, n: usize) -> (Connection, Consumer) {
    let pch = confirm_chan(conn).await;
    pch.queue_declare(
        q,
        QueueDeclareOptions {
            auto_delete: true,
            ..Default::default()
        },
        FieldTable::new(),
    )
    .await
    .unwrap();
    for i in 0..n {
        put(&pch, q, &format!("m{i}")).await;
    }
    // Its own connection, so its stalled socket does not hold up `conn`.
    let cconn = connect().await;
    let cch = chan(&cconn).await;
    let c = cch
        .basic_consume(
            q,
            ConsumeOptions {
                no_ack: true,
                buffer: Some(1),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    // Let the broker push them all.
    tokio::time::sleep(Duration::from_millis(200)).await;
    (cconn, c)
}

/// Drain a consumer: its deliveries' bodies, and how it ended.
async fn drain_consumer(c: &mut Consumer) -> (Vec<String>, Option<Result<Delivery, Error>>) {
    let mut got = Vec::new();
    loop {
        match tokio::time::timeout(Duration::from_secs(2), c.recv()).await {
            Ok(Some(Ok(d))) => got.push(String::from_utf8(d.body.to_vec()).unwrap()),
            Ok(other) => return (got, other),
            Err(_) => return (got, Some(Err(Error::InvalidUse("(test) no item for 2 s")))),
        }
    }
}

/// Backpressure must not lose deliveries: with a full consumer buffer every delivery that was
/// already read from the socket is kept until the consumer takes it.
#[tokio::test]

async fn consumer_with_a_full_buffer_loses_no_deliveries() {
    require_rabbitmq!("consumer_with_a_full_buffer_loses_no_deliveries");
    let conn = connect().await;
    let q = common::unique("full-buffer");
    let (cconn, mut c) = slow_consumer(&conn, &q, 5).await;
    let mut got = Vec::new();
    while got.len() < 5 {
        match tokio::time::timeout(Duration::from_secs(2), c.recv()).await {
            Ok(Some(Ok(d))) => got.push(String::from_utf8(d.body.to_vec()).unwrap()),
            other => panic!("after {got:?}: {other:?}"),
        }
    }
    assert_eq!(got, ["m0", "m1", "m2", "m3", "m4"]);
    cconn.close().await.unwrap();
    let ch = chan(&conn).await;
    ch.queue_delete(&q, QueueDeleteOptions::default())
        .await
        .unwrap();
    conn.close().await.unwrap();
}

/// The broker's cancel must reach a consumer even when the consumer's buffer is full: after the
/// buffered deliveries, the stream yields `Err(ConsumerCancelled)`, not a silent end.
#[tokio::test]

async fn consumer_cancelled_with_a_full_buffer_still_gets_the_error() {
    require_rabbitmq!("consumer_cancelled_with_a_full_buffer_still_gets_the_error");
    let conn = connect().await;
    let q = common::unique("cancel-full");
    // Two messages: one in the buffer, one parked (no more, see the test above).
    let (cconn, mut c) = slow_consumer(&conn, &q, 2).await;
    let ch = chan(&conn).await;
    let deleted = ch
        .queue_delete(&q, QueueDeleteOptions::default())
        .await
        .unwrap();
    assert_eq!(deleted, 0, "no_ack deliveries left the queue at once");
    let (got, end) = drain_consumer(&mut c).await;
    assert_eq!(got, ["m0", "m1"]);
    assert!(
        matches!(end, Some(Err(Error::ConsumerCancelled { .. }))),
        "after the buffered deliveries: {end:?}"
    );
    cconn.close().await.unwrap();
    conn.close().await.unwrap();
}

#[tokio::test]
async fn connection_close_by_client_then_everything_fails_fast() {
    require_rabbitmq!("connection_close_by_client_then_everything_fails_fast");
    let conn = connect().await;
    let ch = chan(&conn).await;
    let q = tmp_queue(&ch, "conn-close").await;
    let mut c = ch
        .basic_consume(&q, ConsumeOptions::default())
        .await
        .unwrap();
    assert!(!conn.is_closed());
    conn.close().await.unwrap();
    assert!(conn.is_closed());
    assert!(ch.is_closed());
    assert!(matches!(
        conn.close_error(),
        Some(Error::ConnectionClosedByClient)
    ));
    let fast = Duration::from_secs(2);
    let e = common::within("channel after close", fast, conn.channel())
        .await
        .unwrap_err();
    assert!(matches!(e, Error::ConnectionClosedByClient), "{e:?}");
    let e = common::within(
        "declare after close",
        fast,
        ch.queue_declare("", excl(), FieldTable::new()),
    )
    .await
    .unwrap_err();
    assert!(matches!(e, Error::ConnectionClosedByClient), "{e:?}");
    assert!(e.is_connection_error());
    let e = common::within(
        "publish after close",
        fast,
        ch.basic_publish(
            "",
            &q,
            PublishOptions::default(),
            BasicProperties::default(),
            "x",
        ),
    )
    .await
    .unwrap_err();
    assert!(matches!(e, Error::ConnectionClosedByClient), "{e:?}");
    let e = common::within("ack after close", fast, ch.basic_ack(1, false))
        .await
        .unwrap_err();
    assert!(matches!(e, Error::ConnectionClosedByClient), "{e:?}");
    // The consumer ends (possibly with the close as its last item), it does not hang.
    let item = common::within("consumer after close", fast, c.recv()).await;
    assert!(
        matches!(item, None | Some(Err(Error::ConnectionClosedByClient))),
        "{item:?}"
    );
    assert!(common::within("consumer end", fast, c.recv())
        .await
        .is_none());
    // Closing again is fine.
    conn.close().await.unwrap();
}

#[tokio::test]
async fn channel_close_then_reuse_fails() {
    require_rabbitmq!("channel_close_then_reuse_fails");
    let conn = connect().await;
    let ch = chan(&conn).await;
    let id = ch.id();
    let q = tmp_queue(&ch, "ch-close").await;
    let mut c = ch
        .basic_consume(&q, ConsumeOptions::default())
        .await
        .unwrap();
    ch.close().await.unwrap();
    assert!(ch.is_closed());
    assert!(!conn.is_closed());
    let fast = Duration::from_secs(2);
    let e = common::within(
        "declare on closed channel",
        fast,
        ch.queue_declare("", excl(), FieldTable::new()),
    )
    .await
    .unwrap_err();
    assert!(
        matches!(e, Error::ChannelClosedByClient(n) if n == id),
        "{e:?}"
    );
    assert!(!e.is_connection_error());
    let e = common::within(
        "publish on closed channel",
        fast,
        ch.basic_publish(
            "",
            &q,
            PublishOptions::default(),
            BasicProperties::default(),
            "x",
        ),
    )
    .await
    .unwrap_err();
    assert!(matches!(e, Error::ChannelClosedByClient(_)), "{e:?}");
    let item = common::within("consumer of closed channel", fast, c.recv()).await;
    assert!(
        matches!(item, None | Some(Err(Error::ChannelClosedByClient(_)))),
        "{item:?}"
    );
    ch.close().await.unwrap(); // idempotent
                               // The connection and other channels are fine; the id can be reused.
    let ch2 = chan(&conn).await;
    ch2.queue_declare(&q, passive(), FieldTable::new())
        .await
        .unwrap();
    conn.close().await.unwrap();
}

#[tokio::test]
async fn hundred_channels_open_concurrently() {
    require_rabbitmq!("hundred_channels_open_concurrently");
    let conn = connect().await;
    let mut set = tokio::task::JoinSet::new();
    for _ in 0..100 {
        let conn = conn.clone();
        set.spawn(async move {
            let ch = conn.channel().await.unwrap();
            let ok = ch
                .queue_declare("", excl(), FieldTable::new())
                .await
                .unwrap();
            (ch, ok.queue.to_string())
        });
    }
    let mut channels = Vec::new();
    let mut ids = HashSet::new();
    let mut queues = HashSet::new();
    while let Some(r) = common::within("100 channels", LIMIT, set.join_next()).await {
        let (ch, q) = r.unwrap();
        assert!(ids.insert(ch.id()), "channel id {} given twice", ch.id());
        assert!(queues.insert(q));
        channels.push(ch);
    }
    assert_eq!(channels.len(), 100);
    // All of them work at once.
    for (ch, q) in channels.iter().zip(queues.iter()) {
        let _not_in_confirm_mode = ch
            .basic_publish(
                "",
                q,
                PublishOptions::default(),
                BasicProperties::default(),
                "p",
            )
            .await
            .unwrap();
    }
    for ch in &channels {
        ch.close().await.unwrap();
    }
    conn.close().await.unwrap();
}

#[tokio::test]
async fn tuning_shows_negotiated_values_and_server_properties() {
    require_rabbitmq!("tuning_shows_negotiated_values_and_server_properties");
    let conn = connect().await;
    let t = conn.tuning();
    // RabbitMQ defaults (frame_max 131072, heartbeat 60 s, channel_max 2047) equal ours.
    assert_eq!(t.frame_max, 131_072);
    assert_eq!(t.heartbeat, Duration::from_secs(60));
    assert_eq!(t.channel_max, 2047);
    let product = t
        .server_properties
        .get("product")
        .and_then(FieldValue::as_str);
    assert_eq!(product, Some("RabbitMQ"));
    let version = t
        .server_properties
        .get("version")
        .and_then(FieldValue::as_str);
    assert!(version.is_some_and(|v| v.starts_with("3.")), "{version:?}");
    match t.server_properties.get("capabilities") {
        Some(FieldValue::Table(caps)) => {
            assert_eq!(
                caps.get("publisher_confirms").and_then(FieldValue::as_bool),
                Some(true)
            );
        }
        other => panic!("capabilities: {other:?}"),
    }
    conn.close().await.unwrap();

    // The URL's requests lower them.
    let url = common::amqp_url_with(
        "guest",
        "guest",
        "%2f",
        "heartbeat=7&frame_max=65536&channel_max=10",
    );
    let conn = common::within("connect", LIMIT, Connection::open(&url))
        .await
        .unwrap();
    let t = conn.tuning();
    assert_eq!(t.heartbeat, Duration::from_secs(7));
    assert_eq!(t.frame_max, 65_536);
    assert_eq!(t.channel_max, 10);
    let mut chans = Vec::new();
    for _ in 0..10 {
        chans.push(chan(&conn).await);
    }
    let e = conn.channel().await.unwrap_err();
    assert!(matches!(e, Error::ChannelsExhausted(10)), "{e:?}");
    // A freed id can be used again; a body of several 64 KiB frames goes through.
    chans.pop().unwrap().close().await.unwrap();
    let ch = confirm_chan(&conn).await;
    let q = tmp_queue(&ch, "small-frames").await;
    let body = Bytes::from(vec![7u8; 200_000]);
    assert_eq!(
        publish(&ch, "", &q, BasicProperties::default(), body.clone()).await,
        Confirmation::Ack
    );
    let m = ch.basic_get(&q, true).await.unwrap().expect("message");
    assert!(m.delivery.body == body);
    conn.close().await.unwrap();
}
