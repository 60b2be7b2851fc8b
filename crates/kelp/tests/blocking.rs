//! `kelp::blocking`: the synchronous facade, on `memory://` and on the local RabbitMQ (skipped
//! with a SKIP line when it is not running). Plain `#[test]` functions: no tokio in sight.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

#[allow(unused_macros)]
mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use kelp::blocking::{Channel, Connection, Consumer, Producer};
use kelp::simple::SimpleOptions;
use kelp::{Error, Exchange, MessageState, PublishOptions, Queue};

const WAIT: Duration = Duration::from_secs(5);

/// The URLs a test runs on: a fresh `memory://` broker, and RabbitMQ when it is up.
fn targets(test: &str) -> Vec<String> {
    let mut out = vec![common::memory_url(test).unwrap()];
    if let Some(url) = common::amqp_url(&format!("blocking::{test}")) {
        out.push(url);
    }
    out
}

fn is_memory(url: &str) -> bool {
    url.starts_with("memory://")
}

/// A unique queue that cleans up after itself on RabbitMQ.
fn queue(url: &str, what: &str) -> Queue {
    let q = Queue::new(common::unique(what)).durable(false);
    if is_memory(url) {
        q
    } else {
        q.expires(Duration::from_secs(120))
    }
}

fn open(url: &str) -> (Connection, Channel) {
    let conn = Connection::open(url).unwrap_or_else(|e| panic!("connect to {url}: {e}"));
    let ch = conn.channel().unwrap();
    (conn, ch)
}

fn publish(ch: &Channel, queue: &str, body: &str) {
    Producer::new(ch)
        .publish(body, PublishOptions::default().routing_key(queue))
        .unwrap();
}

#[test]
fn publish_consume_round_trip() {
    for url in targets("round_trip") {
        let (conn, ch) = open(&url);
        ch.confirm_select().unwrap();
        let q = ch.declare_queue(queue(&url, "round-trip")).unwrap();
        let mut consumer = Consumer::builder(&ch)
            .queue(q.clone())
            .auto_declare(false)
            .accept(["json", "text/plain"])
            .build()
            .unwrap();
        let producer = Producer::new(&ch).routing_key(q.name.clone());
        producer
            .publish_serde(
                &serde_json::json!({"order": 7}),
                PublishOptions::default().header("trace", "abc"),
            )
            .unwrap();
        producer
            .publish("plain", PublishOptions::default())
            .unwrap();

        let mut first = consumer.next(Some(WAIT)).unwrap().expect("a message");
        let v: serde_json::Value = first.decode().unwrap();
        assert_eq!(v["order"], 7, "{url}");
        assert_eq!(first.content_type(), Some("application/json"));
        assert!(first.headers().and_then(|h| h.get("trace")).is_some());
        assert_eq!(first.delivery_info().routing_key, q.name);
        assert!(!first.redelivered());
        first.ack().unwrap();

        let mut second = consumer.next(Some(WAIT)).unwrap().expect("a message");
        assert_eq!(&second.body()[..], b"plain");
        assert_eq!(second.payload().unwrap().as_str(), Some("plain"));
        second.ack().unwrap();

        consumer.cancel().unwrap();
        assert_eq!(ch.queue_size(&q.name).unwrap(), 0);
        ch.delete_queue(&q, false, false).unwrap();
        conn.close().unwrap();
        assert!(conn.is_closed());
    }
}

#[test]
fn callbacks_and_drain_events_with_timeout() {
    for url in targets("drain_events") {
        let (conn, ch) = open(&url);
        let qa = ch.declare_queue(queue(&url, "drain-a")).unwrap();
        let qb = ch.declare_queue(queue(&url, "drain-b")).unwrap();
        let seen = Arc::new(Mutex::new(Vec::<String>::new()));

        // Without callbacks, drain_events is refused.
        let _plain = Consumer::builder(&ch)
            .queue(qa.clone())
            .build_idle()
            .unwrap();
        assert!(matches!(
            conn.drain_events(Some(Duration::from_millis(10))),
            Err(Error::InvalidArgument { .. })
        ));

        let log = seen.clone();
        let _a = Consumer::builder(&ch)
            .queue(qa.clone())
            .auto_declare(false)
            .callback(move |body, msg| {
                log.lock()
                    .unwrap()
                    .push(format!("a:{}", body.as_str().unwrap_or("?")));
                // The blocking API works inside a callback.
                msg.ack().unwrap();
            })
            .build()
            .unwrap();
        let log = seen.clone();
        let mut b = Consumer::builder(&ch)
            .queue(qb.clone())
            .auto_declare(false)
            .on_message(move |msg| {
                log.lock()
                    .unwrap()
                    .push(format!("b:{}", String::from_utf8_lossy(msg.body())));
                msg.ack().unwrap();
            })
            .build()
            .unwrap();

        for i in 0..3 {
            publish(&ch, &qa.name, &format!("{i}"));
            publish(&ch, &qb.name, &format!("{i}"));
        }
        for _ in 0..6 {
            assert!(conn.drain_events(Some(WAIT)).unwrap(), "{url}");
        }
        {
            let mut got = seen.lock().unwrap().clone();
            got.sort();
            assert_eq!(got, ["a:0", "a:1", "a:2", "b:0", "b:1", "b:2"], "{url}");
        }

        // Idle: returns a timeout, within about the time given.
        let started = Instant::now();
        let idle = conn.drain_events(Some(Duration::from_millis(300)));
        let took = started.elapsed();
        assert!(matches!(idle, Err(Error::Timeout { .. })), "{idle:?}");
        assert!(
            took >= Duration::from_millis(300) && took < Duration::from_secs(2),
            "{took:?}"
        );

        // The consumer's own drain_events, and its timeout.
        publish(&ch, &qb.name, "3");
        assert!(b.drain_events(Some(WAIT)).unwrap());
        assert_eq!(seen.lock().unwrap().len(), 7);
        let started = Instant::now();
        assert!(matches!(
            b.drain_events(Some(Duration::from_millis(200))),
            Err(Error::Timeout { .. })
        ));
        assert!(started.elapsed() < Duration::from_secs(2));

        assert_eq!(ch.queue_size(&qa.name).unwrap(), 0);
        assert_eq!(ch.queue_size(&qb.name).unwrap(), 0);
        ch.delete_queue(&qa, false, false).unwrap();
        ch.delete_queue(&qb, false, false).unwrap();
    }
}

#[test]
fn callbacks_can_register_more_callbacks_and_publish() {
    let url = common::memory_url("callbacks_reentrant").unwrap();
    let (conn, ch) = open(&url);
    let q = ch.declare_queue(queue(&url, "reentrant")).unwrap();
    let count = Arc::new(AtomicUsize::new(0));
    let producer = Producer::new(&ch).routing_key(q.name.clone());
    let n = count.clone();
    let consumer = Consumer::builder(&ch)
        .queue(q.clone())
        .callback(move |body, msg| {
            let i = body.as_i64().unwrap();
            n.fetch_add(1, Ordering::SeqCst);
            msg.ack().unwrap();
            if i < 3 {
                producer
                    .publish_serde(&(i + 1), PublishOptions::default())
                    .unwrap();
            }
        })
        .build()
        .unwrap();
    let extra = Arc::new(AtomicUsize::new(0));
    let e = extra.clone();
    consumer.register_callback(move |_, _| {
        e.fetch_add(1, Ordering::SeqCst);
    });
    Producer::new(&ch)
        .publish_serde(&0, PublishOptions::default().routing_key(q.name.clone()))
        .unwrap();
    while conn.drain_events(Some(Duration::from_millis(300))).is_ok() {}
    assert_eq!(count.load(Ordering::SeqCst), 4);
    assert_eq!(extra.load(Ordering::SeqCst), 4);
}

#[test]
fn simple_queue_put_get_qsize() {
    for url in targets("simple_queue") {
        let conn = Connection::open(&url).unwrap();
        let name = common::unique("simple");
        let options = if is_memory(&url) {
            SimpleOptions::default()
        } else {
            // Cleans up after itself on RabbitMQ.
            SimpleOptions {
                queue: Some(
                    Queue::new(name.clone())
                        .exchange(
                            Exchange::direct(name.clone())
                                .durable(false)
                                .auto_delete(true),
                        )
                        .routing_key(name.clone())
                        .durable(false)
                        .expires(Duration::from_secs(120)),
                ),
                ..Default::default()
            }
        };
        let mut q = conn.simple_queue_with(&name, options).unwrap();
        assert_eq!(q.queue().name, name);
        for i in 0..3 {
            q.put(&serde_json::json!({"n": i})).unwrap();
        }
        // The broker may count publishes a moment after they are sent.
        let deadline = Instant::now() + WAIT;
        while q.qsize().unwrap() < 3 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        assert_eq!(q.qsize().unwrap(), 3, "{url}");
        assert_eq!(q.clear().unwrap(), 3);
        assert_eq!(q.qsize().unwrap(), 0);
        // (Once `get` has started the queue's consumer, it holds what arrives: `clear` and
        // `qsize` see only messages not yet delivered, as in Kombu.)
        for i in 0..3 {
            q.put(&serde_json::json!({"n": i})).unwrap();
        }

        let mut m = q.get(true, Some(WAIT)).unwrap();
        assert_eq!(m.decode::<serde_json::Value>().unwrap()["n"], 0);
        m.ack().unwrap();
        let mut m = q.get(false, None).unwrap();
        assert_eq!(m.decode::<serde_json::Value>().unwrap()["n"], 1);
        m.ack().unwrap();
        let mut m = q.get_nowait().unwrap();
        assert_eq!(m.decode::<serde_json::Value>().unwrap()["n"], 2);
        m.ack().unwrap();

        // Empty: Kombu's Empty, after the timeout.
        let started = Instant::now();
        assert!(matches!(
            q.get(true, Some(Duration::from_millis(200))),
            Err(Error::QueueEmpty { .. })
        ));
        assert!(started.elapsed() >= Duration::from_millis(200));
        assert!(matches!(q.get_nowait(), Err(Error::QueueEmpty { .. })));

        q.close().unwrap();

        // The buffer flavour: transient, acked on delivery.
        let mut b = conn.simple_buffer(&common::unique("buffer")).unwrap();
        b.put(&42).unwrap();
        let m = b.get(true, Some(WAIT)).unwrap();
        assert_eq!(m.decode::<i32>().unwrap(), 42);
        assert!(m.acknowledged());
        b.close().unwrap();
    }
}

#[test]
fn consumer_iterator() {
    for url in targets("iterator") {
        let (_conn, ch) = open(&url);
        ch.confirm_select().unwrap();
        let q = ch.declare_queue(queue(&url, "iter")).unwrap();
        let mut consumer = Consumer::builder(&ch)
            .queue(q.clone())
            .prefetch_count(2)
            .build()
            .unwrap();
        for i in 0..5 {
            publish(&ch, &q.name, &format!("m{i}"));
        }
        let mut bodies = Vec::new();
        for msg in consumer.iter_timeout(Duration::from_millis(500)) {
            let mut msg = msg.unwrap();
            bodies.push(String::from_utf8_lossy(msg.body()).into_owned());
            msg.ack().unwrap();
        }
        assert_eq!(bodies, ["m0", "m1", "m2", "m3", "m4"], "{url}");

        // `for msg in &mut consumer` ends once the consumer is cancelled.
        publish(&ch, &q.name, "last");
        let mut got = consumer.next(Some(WAIT)).unwrap().unwrap();
        got.ack().unwrap();
        consumer.cancel().unwrap();
        let started = Instant::now();
        let rest: Vec<_> = (&mut consumer).into_iter().collect();
        assert!(rest.is_empty(), "{url}: {} left", rest.len());
        assert!(started.elapsed() < WAIT);
        assert!(consumer
            .next(Some(Duration::from_millis(50)))
            .unwrap()
            .is_none());
        ch.delete_queue(&q, false, false).unwrap();
    }
}

#[test]
fn ack_reject_requeue_nack() {
    for url in targets("settle") {
        let (_conn, ch) = open(&url);
        ch.confirm_select().unwrap();
        let q = ch.declare_queue(queue(&url, "settle")).unwrap();
        let mut consumer = Consumer::builder(&ch).queue(q.clone()).build().unwrap();
        for body in ["ack", "reject", "requeue", "nack"] {
            publish(&ch, &q.name, body);
        }
        let mut next = || consumer.next(Some(WAIT)).unwrap().expect("a message");

        let mut m = next();
        assert_eq!(&m.body()[..], b"ack");
        m.ack().unwrap();
        assert_eq!(m.state(), MessageState::Acked);
        assert!(matches!(m.ack(), Err(Error::MessageState { .. })));
        assert!(matches!(m.reject(false), Err(Error::MessageState { .. })));

        let mut m = next();
        assert_eq!(&m.body()[..], b"reject");
        m.reject(false).unwrap();
        assert_eq!(m.state(), MessageState::Rejected);

        let mut m = next();
        assert_eq!(&m.body()[..], b"requeue");
        m.requeue().unwrap();
        assert_eq!(m.state(), MessageState::Requeued);

        let mut m = next();
        assert_eq!(&m.body()[..], b"nack");
        m.nack(false, false).unwrap();

        // Only the requeued one comes back, marked redelivered.
        let mut again = next();
        assert_eq!(&again.body()[..], b"requeue", "{url}");
        assert!(again.redelivered());
        again.ack().unwrap();
        assert!(matches!(
            consumer.next(Some(Duration::from_millis(300))),
            Err(Error::Timeout { .. })
        ));
        assert_eq!(ch.queue_size(&q.name).unwrap(), 0);

        consumer.cancel().unwrap();

        // basic.get through the channel.
        let q2 = ch.declare_queue(queue(&url, "settle-get")).unwrap();
        assert!(ch.get(&q2, false).unwrap().is_none());
        publish(&ch, &q2.name, "got");
        let mut got = ch.get(&q2, false).unwrap().expect("basic.get");
        assert_eq!(&got.body()[..], b"got");
        got.requeue().unwrap();
        let mut got = ch.get(&q2, false).unwrap().expect("basic.get again");
        assert!(got.redelivered());
        got.ack().unwrap();
        assert!(ch.get(&q2, false).unwrap().is_none());
        ch.delete_queue(&q2, false, false).unwrap();
        ch.delete_queue(&q, false, false).unwrap();
    }
}

#[test]
fn calling_inside_a_tokio_runtime_is_a_clear_error() {
    let url = common::memory_url("in_runtime").unwrap();
    let (conn, ch) = open(&url);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let err = Connection::open("memory://in-runtime").unwrap_err();
        assert!(matches!(err, Error::InvalidArgument { .. }), "{err:?}");
        assert!(err.to_string().contains("async runtime"), "{err}");
        assert!(matches!(conn.channel(), Err(Error::InvalidArgument { .. })));
        assert!(matches!(
            ch.declare_queue(Queue::new("q")),
            Err(Error::InvalidArgument { .. })
        ));
        assert!(matches!(
            conn.drain_events(Some(Duration::from_millis(10))),
            Err(Error::InvalidArgument { .. })
        ));
        // spawn_blocking threads are inside the runtime too.
        let c2 = conn.clone();
        let r = tokio::task::spawn_blocking(move || c2.channel().map(|_| ()))
            .await
            .unwrap();
        assert!(matches!(r, Err(Error::InvalidArgument { .. })));
    });
    // Still fine outside.
    let q = ch.declare_queue(Queue::new("after")).unwrap();
    assert_eq!(q.name, "after");
    // Dropping the last handles inside a runtime does not panic either.
    rt.block_on(async move {
        drop(ch);
        drop(conn);
    });
}

#[test]
fn connection_kept_alive_between_calls() {
    let Some(url) = common::amqp_url("blocking::keepalive") else {
        return;
    };
    let conn = Connection::builder()
        .url(url.clone())
        .heartbeat(Duration::from_secs(1))
        .connection_name(common::unique("blocking-keepalive"))
        .connect()
        .unwrap();
    let ch = conn.channel().unwrap();
    let q = ch.declare_queue(queue(&url, "keepalive")).unwrap();
    // The program is busy elsewhere, not calling kelp, for three heartbeat intervals: without
    // the background runtime answering heartbeats the broker would drop the connection.
    std::thread::sleep(Duration::from_secs(4));
    assert!(conn.is_connected());
    publish(&ch, &q.name, "still here");
    let mut m = None;
    let deadline = Instant::now() + WAIT;
    while m.is_none() && Instant::now() < deadline {
        m = ch.get(&q, false).unwrap();
    }
    let mut m = m.expect("the message");
    assert_eq!(&m.body()[..], b"still here");
    m.ack().unwrap();
    ch.delete_queue(&q, false, false).unwrap();
    conn.close().unwrap();
}

#[test]
fn handles_outlive_the_connection_value() {
    let url = common::memory_url("outlive").unwrap();
    let ch = {
        let conn = Connection::open(&url).unwrap();
        conn.channel().unwrap()
    };
    // The runtime and the connection live as long as any handle made from them.
    let q = ch.declare_queue(Queue::new("outlive")).unwrap();
    publish(&ch, &q.name, "x");
    let mut m = ch.get(&q, false).unwrap().expect("message");
    drop(ch);
    m.ack().unwrap();
}
