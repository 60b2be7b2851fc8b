//! `kelp::compat::carrot`: carrot's Publisher, Consumer, ConsumerSet and Messaging, on every
//! transport (memory always; RabbitMQ when it answers, else a SKIP line).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

#[allow(unused_macros)]
mod common;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::StreamExt;
use kelp::compat::carrot::{
    parse_delivery_mode, Consumer, ConsumerOptions, ConsumerSet, FetchOptions, Messaging,
    MessagingOptions, Publisher, PublisherOptions, QueueConfig, SendOptions,
};
use kelp::serialization::Value;
use kelp::{Connection, DeliveryMode, Error, Exchange, Message, MessageState, Queue};
use serde_json::json;

/// Runs each listed `async fn name(url: String)` as `name::memory` and `name::amqp`.
macro_rules! on_every_transport {
    ($($name:ident),* $(,)?) => {$(
        mod $name {
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn memory() {
                let test = concat!("carrot::", stringify!($name), "::memory");
                let url = crate::common::memory_url(test).unwrap();
                crate::bounded(test, super::$name(url)).await;
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn amqp() {
                let test = concat!("carrot::", stringify!($name), "::amqp");
                let Some(url) = crate::common::amqp_url(test) else {
                    return;
                };
                crate::bounded(test, super::$name(url)).await;
            }
        }
    )*};
}

on_every_transport! {
    send_fetch_round_trip_json,
    send_options_map_to_properties,
    callbacks_via_fetch_and_wait,
    iterqueue_limit_and_infinite,
    iterconsume_streams_consumed_messages,
    discard_all_with_and_without_filter,
    consumer_set_from_dict_topic_and_direct,
    consumer_set_add_consumer_and_own_callbacks,
    messaging_round_trip,
    auto_ack_and_no_ack_semantics,
    headers_exchange_with_binding_arguments,
    qos_flow_and_warn_if_exists,
}

async fn bounded(test: &str, fut: impl std::future::Future<Output = ()>) {
    if tokio::time::timeout(common::TEST_LIMIT, fut).await.is_err() {
        panic!(
            "{test}: did not finish within {:?} (hang)",
            common::TEST_LIMIT
        );
    }
}

/// Unique queue and exchange names, deleted at the end so RabbitMQ does not collect them
/// (carrot's defaults are durable and not auto-deleted).
struct Names {
    conn: Connection,
    /// A channel with publisher confirms: a publish on it is in its queues when `send`
    /// returns, so a `basic.get` on another channel finds it (RabbitMQ).
    confirmed: kelp::Channel,
    queues: Vec<String>,
    exchanges: Vec<String>,
}

impl Names {
    async fn new(url: &str) -> Names {
        let conn = common::within("connect", Connection::open(url))
            .await
            .unwrap();
        let confirmed = common::channel(&conn).await;
        confirmed.confirm_select().await.unwrap();
        Names {
            conn,
            confirmed,
            queues: Vec::new(),
            exchanges: Vec::new(),
        }
    }
    fn queue(&mut self, what: &str) -> String {
        let n = common::unique(&format!("carrot-q-{what}"));
        self.queues.push(n.clone());
        n
    }
    fn exchange(&mut self, what: &str) -> String {
        let n = common::unique(&format!("carrot-x-{what}"));
        self.exchanges.push(n.clone());
        n
    }
    /// Ready messages in `queue`, asked on a fresh channel.
    async fn count(&self, queue: &str) -> u32 {
        let ch = common::channel(&self.conn).await;
        let n = common::count(&ch, queue).await;
        ch.close().await.ok();
        n
    }
    /// Wait until `queue` has `expected` ready messages (RabbitMQ requeues asynchronously).
    async fn count_eventually(&self, queue: &str, expected: u32) {
        let deadline = std::time::Instant::now() + common::WAIT;
        loop {
            let got = self.count(queue).await;
            if got == expected {
                return;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "{queue}: {got} ready messages, not {expected}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    async fn cleanup(self) {
        let ch = common::channel(&self.conn).await;
        for q in &self.queues {
            Queue::new(q).delete(&ch, false, false).await.ok();
        }
        for x in &self.exchanges {
            Exchange::new(x).delete(&ch, false).await.ok();
        }
        ch.close().await.ok();
        self.conn.close().await.ok();
    }
}

async fn fetch(c: &mut Consumer) -> Message {
    common::within("fetch", c.fetch(FetchOptions::default()))
        .await
        .unwrap()
        .expect("a message")
}

fn json_of(m: &Message) -> serde_json::Value {
    m.decode().unwrap()
}

/// A callback that records each payload (as JSON) and acks the message.
type Seen = Arc<Mutex<Vec<serde_json::Value>>>;

fn recording(
    seen: &Seen,
) -> impl for<'a> FnMut(&'a Value, &'a mut Message) -> kelp::transport::BoxFuture<'a, ()> + Send + 'static
{
    let seen = seen.clone();
    move |payload, message| {
        seen.lock()
            .unwrap()
            .push(payload.clone().deserialize_into().unwrap());
        Box::pin(async move { message.ack_log_error().await })
    }
}

async fn send_fetch_round_trip_json(url: String) {
    let mut n = Names::new(&url).await;
    let (q, x) = (n.queue("rt"), n.exchange("rt"));
    let mut consumer = Consumer::new(&n.conn, ConsumerOptions::new(&q, &x, "importer"))
        .await
        .unwrap();
    let publisher = Publisher::new(&n.confirmed, PublisherOptions::new(&x, "importer"))
        .await
        .unwrap();
    let body = json!({"import_feed": "http://cnn.com/rss/edition.rss", "n": [1, 2, 3]});
    publisher.send(&body, SendOptions::default()).await.unwrap();

    let mut m = common::within("fetch", consumer.fetch(FetchOptions::default()))
        .await
        .unwrap()
        .expect("the message");
    assert_eq!(json_of(&m), body);
    assert_eq!(m.content_type(), Some("application/json"));
    // carrot's defaults: persistent messages, routed by the publisher's routing key
    assert_eq!(m.properties().delivery_mode, Some(2));
    assert_eq!(m.delivery_info().routing_key, "importer");
    assert_eq!(m.delivery_info().exchange, x);
    assert_eq!(m.state(), MessageState::Received);
    m.ack().await.unwrap();
    assert!(consumer
        .fetch(FetchOptions::default())
        .await
        .unwrap()
        .is_none());

    // A routing key nothing is bound to: dropped, as carrot's direct exchange would.
    publisher
        .send(&1, SendOptions::default().routing_key("nobody"))
        .await
        .unwrap();
    assert_eq!(n.count(&q).await, 0);

    consumer.close().await.unwrap();
    publisher.close().await.unwrap();
    n.cleanup().await;
}

async fn send_options_map_to_properties(url: String) {
    let mut n = Names::new(&url).await;
    let (q, x) = (n.queue("props"), n.exchange("props"));
    let mut consumer = Consumer::new(
        &n.conn,
        ConsumerOptions {
            auto_ack: true,
            ..ConsumerOptions::new(&q, &x, "k")
        },
    )
    .await
    .unwrap();
    let publisher = Publisher::new(
        &n.confirmed,
        PublisherOptions {
            delivery_mode: parse_delivery_mode("transient").unwrap(),
            ..PublisherOptions::new(&x, "k")
        },
    )
    .await
    .unwrap();

    publisher.send(&"t", SendOptions::default()).await.unwrap();
    let m = fetch(&mut consumer).await;
    assert_eq!(m.properties().delivery_mode, Some(1));
    assert!(m.acknowledged(), "auto_ack acks on fetch");

    publisher
        .send(
            &"p",
            SendOptions::default()
                .delivery_mode(Publisher::PERSISTENT_DELIVERY_MODE)
                .priority(7)
                .header("source", "test"),
        )
        .await
        .unwrap();
    let m = fetch(&mut consumer).await;
    assert_eq!(m.properties().delivery_mode, Some(2));
    assert_eq!(m.properties().priority, Some(7));
    assert_eq!(common::header_str(&m, "source"), Some("test"));

    // content_type: no serialization, text as it is (utf-8), bytes as binary
    publisher
        .send(&"a,b\n1,2", SendOptions::default().content_type("text/csv"))
        .await
        .unwrap();
    let m = fetch(&mut consumer).await;
    assert_eq!(m.body().as_ref(), b"a,b\n1,2");
    assert_eq!(
        (m.content_type(), m.content_encoding()),
        (Some("text/csv"), Some("utf-8"))
    );
    publisher
        .send_raw(
            &b"\x00\x01"[..],
            SendOptions::default().content_type("application/x-thing"),
        )
        .await
        .unwrap();
    let m = fetch(&mut consumer).await;
    assert_eq!(m.body().as_ref(), b"\x00\x01");
    assert_eq!(m.content_encoding(), Some("binary"));
    let err = publisher
        .send(
            &json!({"a": 1}),
            SendOptions::default().content_type("text/csv"),
        )
        .await
        .unwrap_err();
    assert!(matches!(err, Error::InvalidArgument { .. }), "{err}");

    // another serializer
    publisher
        .send(
            &json!({"m": 1}),
            SendOptions::default().serializer("msgpack"),
        )
        .await
        .unwrap();
    let m = fetch(&mut consumer).await;
    assert_eq!(m.content_type(), Some("application/x-msgpack"));

    // immediate: refused, as RabbitMQ 3+ does
    let err = publisher
        .send(&1, SendOptions::default().immediate(true))
        .await
        .unwrap_err();
    assert!(matches!(err, Error::ImmediateNotSupported), "{err}");

    consumer.close().await.unwrap();
    publisher.close().await.unwrap();
    n.cleanup().await;
}

async fn callbacks_via_fetch_and_wait(url: String) {
    let mut n = Names::new(&url).await;
    let (q, x) = (n.queue("cb"), n.exchange("cb"));
    let mut consumer = Consumer::new(&n.conn, ConsumerOptions::new(&q, &x, "k"))
        .await
        .unwrap();
    let publisher = Publisher::new(&n.confirmed, PublisherOptions::new(&x, "k"))
        .await
        .unwrap();
    publisher
        .send(&json!({"n": 0}), SendOptions::default())
        .await
        .unwrap();

    // No callbacks: carrot's NotImplementedError, before anything is fetched.
    let err = consumer
        .fetch(FetchOptions::default().enable_callbacks(true))
        .await
        .unwrap_err();
    assert!(matches!(err, Error::InvalidArgument { .. }), "{err}");
    assert!(matches!(
        consumer.wait(Some(1)).await,
        Err(Error::InvalidArgument { .. })
    ));
    assert_eq!(n.count(&q).await, 1, "nothing was taken");

    let seen: Seen = Arc::default();
    consumer.register_callback(recording(&seen));
    let m = consumer
        .fetch(FetchOptions::default().enable_callbacks(true))
        .await
        .unwrap()
        .expect("the message");
    assert!(m.acknowledged(), "the callback acked it");
    assert_eq!(*seen.lock().unwrap(), [json!({"n": 0})]);

    // A second callback runs too, after the first.
    let order: Arc<Mutex<Vec<&str>>> = Arc::default();
    let o = order.clone();
    consumer.register_callback(move |_, _| {
        o.lock().unwrap().push("second");
        Box::pin(async {})
    });

    for i in 1..=3 {
        publisher
            .send(&json!({"n": i}), SendOptions::default())
            .await
            .unwrap();
    }
    let handled = common::within("wait", consumer.wait(Some(3)))
        .await
        .unwrap();
    assert_eq!(handled, 3);
    assert_eq!(
        *seen.lock().unwrap(),
        [
            json!({"n": 0}),
            json!({"n": 1}),
            json!({"n": 2}),
            json!({"n": 3})
        ]
    );
    assert_eq!(order.lock().unwrap().len(), 3);
    assert!(consumer.is_consuming());
    consumer.cancel().await.unwrap();
    assert!(!consumer.is_consuming());
    assert_eq!(n.count(&q).await, 0);

    consumer.close().await.unwrap();
    publisher.close().await.unwrap();
    n.cleanup().await;
}

async fn iterqueue_limit_and_infinite(url: String) {
    let mut n = Names::new(&url).await;
    let (q, x) = (n.queue("iq"), n.exchange("iq"));
    let mut consumer = Consumer::new(
        &n.conn,
        ConsumerOptions {
            poll_interval: Duration::from_millis(20),
            ..ConsumerOptions::new(&q, &x, "k")
        },
    )
    .await
    .unwrap();
    let publisher = Publisher::new(&n.confirmed, PublisherOptions::new(&x, "k"))
        .await
        .unwrap();
    for i in 0..5 {
        publisher.send(&i, SendOptions::default()).await.unwrap();
    }

    let mut got = Vec::new();
    let mut it = consumer.iterqueue(Some(2), false);
    while let Some(m) = common::within("iterqueue", it.next()).await {
        let mut m = m.unwrap();
        got.push(m.decode::<i32>().unwrap());
        m.ack().await.unwrap();
    }
    drop(it);
    assert_eq!(got, [0, 1]);
    assert_eq!(n.count(&q).await, 3, "the limit fetched no more than 2");

    // Not infinite: ends when the queue is empty (a Stream, so combinators work).
    let rest: Vec<Message> = consumer
        .iterqueue(None, false)
        .map(|m| m.unwrap())
        .collect()
        .await;
    assert_eq!(rest.len(), 3);
    for mut m in rest {
        m.ack().await.unwrap();
    }
    assert!(
        common::within("iterqueue", consumer.iterqueue(None, false).next())
            .await
            .is_none()
    );

    // Infinite: keeps polling an empty queue, and picks up what arrives later.
    let late = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(200)).await;
        for i in 10..12 {
            publisher.send(&i, SendOptions::default()).await.unwrap();
        }
        publisher
    });
    let mut it = consumer.iterqueue(None, true);
    let mut got = Vec::new();
    for _ in 0..2 {
        let mut m = tokio::time::timeout(common::WAIT, it.next())
            .await
            .expect("the late messages")
            .unwrap()
            .unwrap();
        got.push(m.decode::<i32>().unwrap());
        m.ack().await.unwrap();
    }
    assert_eq!(got, [10, 11]);
    // Nothing more: the infinite stream does not end, a timeout stops it.
    assert!(tokio::time::timeout(common::QUIET, it.next())
        .await
        .is_err());
    drop(it);
    let publisher = late.await.unwrap();

    // Infinite with a limit ends at the limit.
    publisher.send(&20, SendOptions::default()).await.unwrap();
    let mut it = consumer.iterqueue(Some(1), true);
    it.next().await.unwrap().unwrap().ack().await.unwrap();
    assert!(it.next().await.is_none());
    drop(it);

    consumer.close().await.unwrap();
    publisher.close().await.unwrap();
    n.cleanup().await;
}

async fn iterconsume_streams_consumed_messages(url: String) {
    let mut n = Names::new(&url).await;
    let (q, x) = (n.queue("ic"), n.exchange("ic"));
    let mut consumer = Consumer::new(&n.conn, ConsumerOptions::new(&q, &x, "k"))
        .await
        .unwrap();
    let publisher = Publisher::new(&n.confirmed, PublisherOptions::new(&x, "k"))
        .await
        .unwrap();
    for i in 0..3 {
        publisher.send(&i, SendOptions::default()).await.unwrap();
    }
    let mut got = Vec::new();
    let mut it = consumer.iterconsume(Some(3));
    while let Some(m) = common::within("iterconsume", it.next()).await {
        let mut m = m.unwrap();
        assert!(
            !m.acknowledged(),
            "no auto_ack, no callbacks: left to the caller"
        );
        assert!(!m.delivery_info().consumer_tag.is_empty());
        got.push(m.decode::<i32>().unwrap());
        m.ack().await.unwrap();
    }
    drop(it);
    assert_eq!(got, [0, 1, 2]);
    assert!(consumer.is_consuming());

    // Messages sent while consuming come through the same basic.consume.
    publisher.send(&3, SendOptions::default()).await.unwrap();
    let mut m = common::within("iterconsume", consumer.iterconsume(Some(1)).next())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(m.decode::<i32>().unwrap(), 3);
    m.ack().await.unwrap();
    consumer.close().await.unwrap();
    assert_eq!(n.count(&q).await, 0);

    // With auto_ack and callbacks: acked, then the callbacks, then yielded.
    let mut consumer = Consumer::new(
        &n.conn,
        ConsumerOptions {
            auto_ack: true,
            ..ConsumerOptions::new(&q, &x, "k")
        },
    )
    .await
    .unwrap();
    let seen: Arc<Mutex<Vec<bool>>> = Arc::default();
    let s = seen.clone();
    consumer.register_callback(move |_, m| {
        s.lock().unwrap().push(m.acknowledged());
        Box::pin(async {})
    });
    publisher.send(&4, SendOptions::default()).await.unwrap();
    let m = common::within("iterconsume", consumer.iterconsume(Some(1)).next())
        .await
        .unwrap()
        .unwrap();
    assert!(m.acknowledged());
    assert_eq!(*seen.lock().unwrap(), [true]);

    consumer.close().await.unwrap();

    // A payload the callbacks cannot decode is rejected and is an error item; the stream goes
    // on. A content type not accepted (pickle, by default) never reaches them: rejected too.
    let mut consumer = Consumer::new(&n.conn, ConsumerOptions::new(&q, &x, "k"))
        .await
        .unwrap();
    consumer.register_callback(|_, m| Box::pin(async move { m.ack_log_error().await }));
    publisher
        .send_raw(
            &b"{not json"[..],
            SendOptions::default().content_type("application/json"),
        )
        .await
        .unwrap();
    publisher
        .send(&"x", SendOptions::default().serializer("pickle"))
        .await
        .unwrap();
    publisher.send(&5, SendOptions::default()).await.unwrap();
    let mut it = consumer.iterconsume(Some(2));
    let first = common::within("iterconsume", it.next()).await.unwrap();
    assert!(matches!(first, Err(Error::Serialization(_))), "{first:?}");
    let second = common::within("iterconsume", it.next())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(second.decode::<i32>().unwrap(), 5);
    assert!(second.acknowledged());
    drop(it);
    consumer.close().await.unwrap();
    assert_eq!(n.count(&q).await, 0, "nothing requeued");
    publisher.close().await.unwrap();
    n.cleanup().await;
}

async fn discard_all_with_and_without_filter(url: String) {
    let mut n = Names::new(&url).await;
    let (q, x) = (n.queue("discard"), n.exchange("discard"));
    let mut consumer = Consumer::new(&n.conn, ConsumerOptions::new(&q, &x, "k"))
        .await
        .unwrap();
    let publisher = Publisher::new(&n.confirmed, PublisherOptions::new(&x, "k"))
        .await
        .unwrap();
    for (i, kind) in ["feed", "other", "feed", "other", "feed"]
        .iter()
        .enumerate()
    {
        publisher
            .send(&json!({"type": kind, "i": i}), SendOptions::default())
            .await
            .unwrap();
    }
    let mut looked_at = 0;
    let mut feeds = |m: &Message| {
        looked_at += 1;
        m.decode::<serde_json::Value>()
            .is_ok_and(|v| v["type"] == "feed")
    };
    let discarded = common::within("discard_all", consumer.discard_all(Some(&mut feeds)))
        .await
        .unwrap();
    assert_eq!(discarded, 3);
    assert_eq!(looked_at, 5);

    // Only the non-matching ones are left, back in the queue.
    n.count_eventually(&q, 2).await;
    let mut left = Vec::new();
    let mut held = Vec::new();
    while let Some(m) = consumer.fetch(FetchOptions::default()).await.unwrap() {
        let v = json_of(&m);
        assert_eq!(v["type"], "other");
        assert!(m.redelivered(), "requeued");
        left.push(v["i"].as_i64().unwrap());
        held.push(m);
    }
    for mut m in held {
        m.requeue().await.unwrap();
    }
    left.sort_unstable();
    assert_eq!(left, [1, 3]);

    // Without a filter: a purge, counting what it removed.
    let purged = consumer.discard_all(None).await.unwrap();
    assert_eq!(purged, 2);
    assert_eq!(common::count(consumer.channel(), &q).await, 0);
    assert_eq!(consumer.discard_all(None).await.unwrap(), 0);

    // A filter with auto_ack (or no_ack) is refused, as in carrot.
    let mut auto = Consumer::new(
        &n.conn,
        ConsumerOptions {
            auto_ack: true,
            ..ConsumerOptions::new(&q, &x, "k")
        },
    )
    .await
    .unwrap();
    let err = auto
        .discard_all(Some(&mut |_: &Message| true))
        .await
        .unwrap_err();
    assert!(matches!(err, Error::InvalidArgument { .. }), "{err}");

    auto.close().await.unwrap();
    consumer.close().await.unwrap();
    publisher.close().await.unwrap();
    n.cleanup().await;
}

async fn consumer_set_from_dict_topic_and_direct(url: String) {
    let mut n = Names::new(&url).await;
    let (links, jobs) = (n.queue("links"), n.queue("jobs"));
    let (topic, direct) = (n.exchange("topic"), n.exchange("direct"));
    let config = json!({
        links.clone(): {
            "exchange": topic, "exchange_type": "topic", "binding_key": "links.*",
            "default_routing_key": "links.retrieve", "durable": false, "auto_delete": false,
            "exclusive": false, "unknown_key": "ignored as carrot did",
        },
        jobs.clone(): {
            "exchange": direct, "exchange_type": "direct",
            "routing_key": "jobs", "binding_key": "not-this-one", "durable": true,
        },
    });
    let mut set = ConsumerSet::from_dict(&n.conn, &config).await.unwrap();
    assert_eq!(set.consumers().len(), 2);
    let seen: Arc<Mutex<Vec<(String, serde_json::Value)>>> = Arc::default();
    let s = seen.clone();
    set.register_callback(move |payload, message| {
        s.lock().unwrap().push((
            message.delivery_info().routing_key.to_owned(),
            payload.clone().deserialize_into().unwrap(),
        ));
        Box::pin(async move { message.ack_log_error().await })
    });

    let to_topic = Publisher::new(
        &n.confirmed,
        PublisherOptions {
            exchange_type: "topic".into(),
            durable: false,
            ..PublisherOptions::new(&topic, "links.webshot")
        },
    )
    .await
    .unwrap();
    let to_direct = Publisher::new(&n.confirmed, PublisherOptions::new(&direct, "jobs"))
        .await
        .unwrap();
    to_topic
        .send(&json!({"url": 1}), SendOptions::default())
        .await
        .unwrap();
    to_topic
        .send(
            &json!({"url": 2}),
            SendOptions::default().routing_key("other.thing"),
        )
        .await
        .unwrap(); // matches nothing
    to_direct
        .send(&json!({"job": 3}), SendOptions::default())
        .await
        .unwrap();
    to_direct
        .send(
            &json!({"job": 4}),
            SendOptions::default().routing_key("not-this-one"),
        )
        .await
        .unwrap(); // the binding key lost to routing_key

    let mut it = set.iterconsume(Some(2));
    for _ in 0..2 {
        let m = common::within("set.iterconsume", it.next())
            .await
            .unwrap()
            .unwrap();
        assert!(m.acknowledged());
    }
    drop(it);
    let mut got = seen.lock().unwrap().clone();
    got.sort_by(|a, b| a.0.cmp(&b.0));
    assert_eq!(
        got,
        [
            ("jobs".to_owned(), json!({"job": 3})),
            ("links.webshot".to_owned(), json!({"url": 1})),
        ]
    );
    assert_eq!(n.count(&links).await, 0);
    assert_eq!(n.count(&jobs).await, 0);

    // cancel, then discard_all purges both queues.
    set.cancel().await.unwrap();
    assert!(!set.is_consuming());
    to_topic
        .send(&1, SendOptions::default().routing_key("links.x"))
        .await
        .unwrap();
    to_direct.send(&2, SendOptions::default()).await.unwrap();
    to_direct.send(&3, SendOptions::default()).await.unwrap();
    assert_eq!(set.discard_all().await.unwrap(), 3);

    // consume again: both queues, each once.
    set.consume().await.unwrap();
    set.consume().await.unwrap();
    to_direct
        .send(&json!({"job": 5}), SendOptions::default())
        .await
        .unwrap();
    let m = common::within("set.iterconsume", set.iterconsume(Some(1)).next())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(json_of(&m), json!({"job": 5}));

    set.close().await.unwrap();
    to_topic.close().await.unwrap();
    to_direct.close().await.unwrap();
    n.cleanup().await;
}

async fn consumer_set_add_consumer_and_own_callbacks(url: String) {
    let mut n = Names::new(&url).await;
    let (a, b, x) = (n.queue("a"), n.queue("b"), n.exchange("ab"));
    let mut set = ConsumerSet::new(&n.conn).await.unwrap();
    // A consumer built on its own channel moves to the set's.
    let own = Consumer::new(&n.conn, ConsumerOptions::new(&a, &x, "a"))
        .await
        .unwrap();
    let own_channel = own.channel().clone();
    set.add_consumer(own).await.unwrap();
    assert!(own_channel.is_closed());
    set.add_consumer_from_dict(
        &b,
        QueueConfig {
            exchange: Some(x.clone()),
            routing_key: Some("b".into()),
            no_ack: Some(true),
            ..Default::default()
        },
    )
    .await
    .unwrap();

    // `a` has a callback of its own; `b` falls back to the set's.
    let by_a: Seen = Arc::default();
    let by_set: Seen = Arc::default();
    set.consumers_mut()[0].register_callback(recording(&by_a));
    let s = by_set.clone();
    set.register_callback(move |payload, _message| {
        s.lock()
            .unwrap()
            .push(payload.clone().deserialize_into().unwrap());
        Box::pin(async {})
    });

    let p = Publisher::new(&n.confirmed, PublisherOptions::new(&x, "a"))
        .await
        .unwrap();
    p.send(&"for a", SendOptions::default()).await.unwrap();
    p.send(&"for b", SendOptions::default().routing_key("b"))
        .await
        .unwrap();
    let mut it = set.iterconsume(Some(2));
    let mut acked = 0;
    for _ in 0..2 {
        let m = common::within("set.iterconsume", it.next())
            .await
            .unwrap()
            .unwrap();
        // a: acked by its callback; b: no_ack in a mixed set, acked on arrival
        acked += usize::from(m.acknowledged());
    }
    drop(it);
    assert_eq!(acked, 2);
    assert_eq!(*by_a.lock().unwrap(), [json!("for a")]);
    assert_eq!(*by_set.lock().unwrap(), [json!("for b")]);

    // cancel_by_queue stops one queue only.
    set.cancel_by_queue(&b).await.unwrap();
    p.send(&"b again", SendOptions::default().routing_key("b"))
        .await
        .unwrap();
    p.send(&"a again", SendOptions::default()).await.unwrap();
    let m = common::within("set.iterconsume", set.iterconsume(Some(1)).next())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(json_of(&m), json!("a again"));
    set.consume().await.unwrap(); // still not `b`: stopped until added again
    tokio::time::sleep(common::QUIET).await;
    assert_eq!(n.count(&b).await, 1);
    set.add_consumer_from_dict(
        &b,
        QueueConfig {
            exchange: Some(x.clone()),
            routing_key: Some("b".into()),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    let m = common::within("set.iterconsume", set.iterconsume(Some(1)).next())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(json_of(&m), json!("b again"));

    set.close().await.unwrap();
    p.close().await.unwrap();
    n.cleanup().await;
}

async fn messaging_round_trip(url: String) {
    let mut n = Names::new(&url).await;
    let (q, x) = (n.queue("msging"), n.exchange("msging"));
    let mut m = Messaging::new(&n.conn, MessagingOptions::new(&q, &x, "importer"))
        .await
        .unwrap();
    m.send(&json!({"import_feed": "a"}), SendOptions::default())
        .await
        .unwrap();
    let mut msg = m.fetch(FetchOptions::default()).await.unwrap().unwrap();
    assert_eq!(json_of(&msg), json!({"import_feed": "a"}));
    assert_eq!(msg.delivery_info().routing_key, "importer");
    msg.ack().await.unwrap();

    let seen: Seen = Arc::default();
    m.register_callback(recording(&seen));
    m.send(&json!({"import_feed": "b"}), SendOptions::default())
        .await
        .unwrap();
    let msg = m
        .fetch(FetchOptions::default().enable_callbacks(true))
        .await
        .unwrap()
        .unwrap();
    assert!(msg.acknowledged());
    assert_eq!(*seen.lock().unwrap(), [json!({"import_feed": "b"})]);

    for i in 0..3 {
        m.send(&i, SendOptions::default()).await.unwrap();
    }
    let mut got = Vec::new();
    let mut it = m.iterqueue(None, false);
    while let Some(msg) = common::within("iterqueue", it.next()).await {
        let mut msg = msg.unwrap();
        got.push(msg.decode::<i32>().unwrap());
        msg.ack().await.unwrap();
    }
    drop(it);
    assert_eq!(got, [0, 1, 2]);
    let ch = m.publisher().channel().clone();
    assert!(!ch.is_closed());
    m.close().await.unwrap();
    assert!(ch.is_closed(), "the channel it opened is closed");
    n.cleanup().await;
}

async fn auto_ack_and_no_ack_semantics(url: String) {
    let mut n = Names::new(&url).await;
    let (q, x) = (n.queue("acks"), n.exchange("acks"));
    let publisher = Publisher::new(&n.confirmed, PublisherOptions::new(&x, "k"))
        .await
        .unwrap();
    let plain = ConsumerOptions::new(&q, &x, "k");

    // Without auto_ack an unacked message comes back when the consumer's channel closes.
    let mut c = Consumer::new(&n.conn, plain.clone()).await.unwrap();
    publisher.send(&1, SendOptions::default()).await.unwrap();
    let m = c.fetch(FetchOptions::default()).await.unwrap().unwrap();
    assert!(!m.acknowledged());
    assert!(!m.redelivered());
    c.close().await.unwrap();
    let mut c = Consumer::new(&n.conn, plain.clone()).await.unwrap();
    let mut m = common::within("fetch", async {
        loop {
            if let Some(m) = c.fetch(FetchOptions::default()).await.unwrap() {
                break m;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    assert!(m.redelivered());

    // FetchOptions::auto_ack switches auto_ack on for one fetch (and cannot switch it off).
    m.ack().await.unwrap();
    publisher.send(&2, SendOptions::default()).await.unwrap();
    let mut m = c
        .fetch(FetchOptions::default().auto_ack(true))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(m.state(), MessageState::Acked);
    assert!(matches!(m.ack().await, Err(Error::MessageState { .. })));
    c.close().await.unwrap();

    // auto_ack consumer: acked on receipt, never redelivered.
    publisher.send(&3, SendOptions::default()).await.unwrap();
    let mut c = Consumer::new(
        &n.conn,
        ConsumerOptions {
            auto_ack: true,
            ..plain.clone()
        },
    )
    .await
    .unwrap();
    let m = c
        .fetch(FetchOptions::default().auto_ack(false))
        .await
        .unwrap()
        .unwrap();
    assert!(m.acknowledged());
    c.close().await.unwrap();
    assert_eq!(n.count(&q).await, 0);

    // no_ack: nothing to acknowledge (ack is a no-op, as in Kombu), gone once fetched.
    publisher.send(&4, SendOptions::default()).await.unwrap();
    let mut c = Consumer::new(
        &n.conn,
        ConsumerOptions {
            no_ack: true,
            ..plain.clone()
        },
    )
    .await
    .unwrap();
    let mut m = c.fetch(FetchOptions::default()).await.unwrap().unwrap();
    assert!(m.acknowledged());
    m.ack().await.unwrap();
    c.close().await.unwrap();
    assert_eq!(n.count(&q).await, 0);

    // auto_ack with wait: messages are acked before the callbacks see them.
    let mut c = Consumer::new(
        &n.conn,
        ConsumerOptions {
            auto_ack: true,
            ..plain.clone()
        },
    )
    .await
    .unwrap();
    let states: Arc<Mutex<Vec<bool>>> = Arc::default();
    let s = states.clone();
    c.register_callback(move |_, m| {
        s.lock().unwrap().push(m.acknowledged());
        Box::pin(async {})
    });
    publisher.send(&5, SendOptions::default()).await.unwrap();
    publisher.send(&6, SendOptions::default()).await.unwrap();
    assert_eq!(common::within("wait", c.wait(Some(2))).await.unwrap(), 2);
    assert_eq!(*states.lock().unwrap(), [true, true]);
    c.close().await.unwrap();
    assert_eq!(n.count(&q).await, 0);

    publisher.close().await.unwrap();
    n.cleanup().await;
}

async fn headers_exchange_with_binding_arguments(url: String) {
    let mut n = Names::new(&url).await;
    let (q, x) = (n.queue("hdr"), n.exchange("hdr"));
    let mut c = Consumer::new(
        &n.conn,
        ConsumerOptions {
            exchange_type: "headers".into(),
            binding_arguments: common::table(&[("x-match", "all"), ("format", "pdf")]),
            ..ConsumerOptions::new(&q, &x, "")
        },
    )
    .await
    .unwrap();
    let p = Publisher::new(
        &n.confirmed,
        PublisherOptions {
            exchange_type: "headers".into(),
            ..PublisherOptions::new(&x, "")
        },
    )
    .await
    .unwrap();
    p.send(&"png", SendOptions::default().header("format", "png"))
        .await
        .unwrap();
    p.send(&"pdf", SendOptions::default().header("format", "pdf"))
        .await
        .unwrap();
    let mut m = c.fetch(FetchOptions::default()).await.unwrap().unwrap();
    assert_eq!(m.decode::<String>().unwrap(), "pdf");
    m.ack().await.unwrap();
    assert!(c.fetch(FetchOptions::default()).await.unwrap().is_none());
    c.close().await.unwrap();
    p.close().await.unwrap();
    n.cleanup().await;
}

async fn qos_flow_and_warn_if_exists(url: String) {
    let mut n = Names::new(&url).await;
    let (q, x) = (n.queue("qos"), n.exchange("qos"));
    let opts = ConsumerOptions {
        warn_if_exists: true,
        ..ConsumerOptions::new(&q, &x, "k")
    };
    // First declare (queue absent) and second (present, warned): both fine.
    let first = Consumer::new(&n.conn, opts.clone()).await.unwrap();
    let mut c = Consumer::new(&n.conn, opts).await.unwrap();
    first.close().await.unwrap();

    c.qos(0, 1, false).await.unwrap();
    let err = c.qos(1024, 1, false).await.unwrap_err();
    assert!(matches!(err, Error::NotSupported { .. }), "{err}");

    // prefetch_count 1: a consumer holds one unacked message, the other stays ready.
    let p = Publisher::new(&n.confirmed, PublisherOptions::new(&x, "k"))
        .await
        .unwrap();
    p.send(&1, SendOptions::default()).await.unwrap();
    p.send(&2, SendOptions::default()).await.unwrap();
    let mut m = common::within("iterconsume", c.iterconsume(Some(1)).next())
        .await
        .unwrap()
        .unwrap();
    tokio::time::sleep(common::QUIET).await;
    assert_eq!(n.count(&q).await, 1);
    m.ack().await.unwrap();
    c.cancel().await.unwrap();

    if c.channel().connection().transport_name() == "memory" {
        assert!(matches!(
            c.flow(true).await,
            Err(Error::NotSupported { .. })
        ));
    }

    c.close().await.unwrap();
    p.close().await.unwrap();
    n.cleanup().await;
}

#[test]
fn delivery_mode_names_and_constants() {
    assert_eq!(
        parse_delivery_mode("transient").unwrap(),
        DeliveryMode::Transient
    );
    assert_eq!(parse_delivery_mode("2").unwrap(), DeliveryMode::Persistent);
    assert!(parse_delivery_mode("sometimes").is_err());
    assert_eq!(
        Publisher::NONE_PERSISTENT_DELIVERY_MODE,
        Publisher::TRANSIENT_DELIVERY_MODE
    );
    assert_eq!(
        PublisherOptions::default().delivery_mode,
        DeliveryMode::Persistent
    );
}

#[test]
fn defaults_are_carrots() {
    let c = ConsumerOptions::default();
    assert_eq!(c.exchange_type, "direct");
    assert!(c.durable && !c.exclusive && !c.auto_delete && !c.no_ack && !c.auto_ack);
    assert!(c.auto_declare && !c.warn_if_exists);
    let p = PublisherOptions::default();
    assert_eq!(p.exchange_type, "direct");
    assert!(p.durable && !p.auto_delete && p.auto_declare && p.serializer.is_none());
    // exclusive implies auto_delete, for the exchange too
    let q = ConsumerOptions {
        exclusive: true,
        ..ConsumerOptions::new("q", "x", "k")
    }
    .to_queue();
    assert!(q.exclusive && q.auto_delete && q.exchange.unwrap().auto_delete);
}

#[test]
fn queue_config_parses_like_carrot() {
    let c: QueueConfig = serde_json::from_value(json!({
        "exchange": "e", "binding_key": "b", "queue_arguments": {"x-max-length": 10, "x-queue-mode": "lazy"},
        "auto_delete": true, "something_else": [1, 2],
    }))
    .unwrap();
    let o = c.to_options("q").unwrap();
    assert_eq!(
        (
            o.queue.as_str(),
            o.exchange.as_str(),
            o.routing_key.as_str()
        ),
        ("q", "e", "b")
    );
    assert!(o.auto_delete && o.durable);
    assert!(matches!(
        o.queue_arguments.get("x-max-length"),
        Some(kelp::amqp::FieldValue::I64(10))
    ));
    let c: QueueConfig =
        serde_json::from_value(json!({"routing_key": "r", "binding_key": "b"})).unwrap();
    assert_eq!(c.to_options("q").unwrap().routing_key, "r");
    assert!(serde_json::from_value::<QueueConfig>(json!({"durable": "yes"})).is_err());
}

/// Everything can move into a spawned task (a compile-time check).
#[test]
fn handles_and_their_futures_are_send() {
    fn send<T: Send>(_: &T) {}
    #[allow(dead_code, clippy::diverging_sub_expression)]
    async fn futures(c: &mut Consumer, s: &mut ConsumerSet, p: &Publisher, m: &mut Messaging) {
        send(&c.fetch(FetchOptions::default()));
        send(&c.wait(None));
        send(&c.discard_all(None));
        send(&c.iterqueue(None, true));
        send(&c.iterconsume(None));
        send(&s.iterconsume(None));
        send(&s.consume());
        send(&p.send(&1, SendOptions::default()));
        send(&m.iterqueue(None, false));
    }
    let _ = futures;
}
