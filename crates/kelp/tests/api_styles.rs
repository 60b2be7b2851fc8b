//! The three ways in beside the Consumer stream — Kombu's callbacks + `Connection::drain_events`,
//! `kombu.simple` (SimpleQueue / SimpleBuffer), and aio-pika's bound exchanges and queues — each
//! run against `memory://` and the local RabbitMQ.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use kelp::{
    Connection, Consumer, Error, Exchange, Producer, PublishOptions, Queue, SimpleBuffer,
    SimpleQueue,
};

static N: AtomicU32 = AtomicU32::new(0);

fn unique(prefix: &str) -> String {
    format!(
        "kelp-api-{prefix}-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

/// The URL for `transport`, or None (with a visible SKIP) when its broker is down outside CI.
fn url(transport: &str, test: &str) -> Option<String> {
    match transport {
        "memory" => Some(format!("memory://{}", unique(test))),
        _ => {
            let addr: SocketAddr = "127.0.0.1:5672".parse().unwrap();
            if TcpStream::connect_timeout(&addr, Duration::from_secs(2)).is_ok() {
                return Some(
                    std::env::var("KELP_AMQP_URL")
                        .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into()),
                );
            }
            if std::env::var("KELP_REQUIRE_BROKERS").as_deref() == Ok("1") {
                panic!("{test}: RabbitMQ is not answering on {addr} and KELP_REQUIRE_BROKERS=1");
            }
            eprintln!("SKIP {test} on amqp: no RabbitMQ on {addr}");
            None
        }
    }
}

async fn within<F: std::future::Future>(what: &str, fut: F) -> F::Output {
    match tokio::time::timeout(Duration::from_secs(10), fut).await {
        Ok(v) => v,
        Err(_) => panic!("{what}: no answer within 10 s (hang)"),
    }
}

/// Run `body(url)` once per transport as separate tests.
macro_rules! on_every_transport {
    ($name:ident, $body:expr) => {
        mod $name {
            use super::*;
            #[tokio::test]
            async fn memory() {
                if let Some(u) = url("memory", stringify!($name)) {
                    within(stringify!($name), $body(u)).await;
                }
            }
            #[tokio::test]
            async fn amqp() {
                if let Some(u) = url("amqp", stringify!($name)) {
                    within(stringify!($name), $body(u)).await;
                }
            }
        }
    };
}

on_every_transport!(
    connection_drain_events_runs_callbacks_of_every_consumer,
    |url: String| async move {
        let conn = Connection::open(&url).await.unwrap();
        let ch = conn.channel().await.unwrap();
        let (qa, qb) = (unique("a"), unique("b"));
        let seen: Arc<Mutex<Vec<String>>> = Arc::default();
        let mut consumers = Vec::new();
        for q in [&qa, &qb] {
            let seen = seen.clone();
            consumers.push(
                Consumer::builder(&ch)
                    .queue(Queue::new(q.clone()))
                    .callback(move |body, msg| {
                        let seen = seen.clone();
                        let text = format!(
                            "{}:{}",
                            msg.delivery_info().routing_key,
                            body.as_str().unwrap_or("?")
                        );
                        Box::pin(async move {
                            seen.lock().unwrap().push(text);
                            msg.ack_log_error().await;
                        })
                    })
                    .build()
                    .await
                    .unwrap(),
            );
        }
        let p = Producer::new(&ch);
        for (q, body) in [(&qa, "one"), (&qb, "two"), (&qa, "three")] {
            p.publish_serde(body, PublishOptions::default().routing_key(q.as_str()))
                .await
                .unwrap();
        }
        for _ in 0..3 {
            assert!(conn
                .drain_events(Some(Duration::from_secs(5)))
                .await
                .unwrap());
        }
        let mut got = seen.lock().unwrap().clone();
        got.sort();
        let mut want = vec![
            format!("{qa}:one"),
            format!("{qa}:three"),
            format!("{qb}:two"),
        ];
        want.sort();
        assert_eq!(got, want);
        // Nothing left: a timeout, typed.
        let err = conn
            .drain_events(Some(Duration::from_millis(100)))
            .await
            .unwrap_err();
        assert!(matches!(err, Error::Timeout { .. }), "{err:?}");
        // Everything was acked: after cancelling, the queues are empty.
        for mut c in consumers {
            c.cancel().await.unwrap();
        }
        for q in [&qa, &qb] {
            assert!(Queue::new(q.clone())
                .get(&ch, true)
                .await
                .unwrap()
                .is_none());
            Queue::new(q.clone())
                .delete(&ch, false, false)
                .await
                .unwrap();
        }
        conn.close().await.unwrap();
    }
);

on_every_transport!(
    drain_events_without_callbacks_is_an_error,
    |url: String| async move {
        let conn = Connection::open(&url).await.unwrap();
        let ch = conn.channel().await.unwrap();
        let _plain = Consumer::builder(&ch)
            .queue(Queue::new(unique("plain")).auto_delete(true))
            .build()
            .await
            .unwrap();
        let err = conn
            .drain_events(Some(Duration::from_millis(50)))
            .await
            .unwrap_err();
        assert!(matches!(err, Error::InvalidArgument { .. }), "{err:?}");
        conn.close().await.unwrap();
    }
);

on_every_transport!(simple_queue_put_get_qsize_clear, |url: String| async move {
    let conn = Connection::open(&url).await.unwrap();
    let name = unique("simple");
    let mut q = SimpleQueue::new(&conn, &name).await.unwrap();
    assert!(matches!(
        q.get_nowait().await,
        Err(Error::QueueEmpty { .. })
    ));
    for i in 0..3 {
        q.put(&serde_json::json!({ "i": i })).await.unwrap();
    }
    // RabbitMQ counts asynchronously; give it a moment.
    let mut size = 0;
    for _ in 0..50 {
        size = q.qsize().await.unwrap();
        if size == 3 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(size, 3);
    let mut first = q.get_nowait().await.unwrap();
    assert_eq!(first.decode::<serde_json::Value>().unwrap()["i"], 0);
    first.ack().await.unwrap();
    let mut second = q.get(Some(Duration::from_secs(5))).await.unwrap();
    assert_eq!(second.decode::<serde_json::Value>().unwrap()["i"], 1);
    assert_eq!(
        second.properties().delivery_mode,
        Some(2),
        "SimpleQueue messages are persistent"
    );
    second.ack().await.unwrap();
    let mut third = q.get(Some(Duration::from_secs(5))).await.unwrap();
    assert_eq!(third.decode::<serde_json::Value>().unwrap()["i"], 2);
    third.ack().await.unwrap();
    let err = q.get(Some(Duration::from_millis(100))).await.unwrap_err();
    assert!(matches!(err, Error::QueueEmpty { .. }), "{err:?}");
    q.put(&"left over").await.unwrap();
    tokio::time::sleep(Duration::from_millis(50)).await;
    // The consumer may already hold it; clear() purges only ready ones.
    let cleared = q.clear().await.unwrap();
    assert!(cleared <= 1);
    q.close().await.unwrap();
    let ch = conn.channel().await.unwrap();
    Queue::new(name.clone())
        .delete(&ch, false, false)
        .await
        .unwrap();
    Exchange::new(name).delete(&ch, false).await.unwrap();
    conn.close().await.unwrap();
});

on_every_transport!(
    simple_buffer_is_transient_and_needs_no_ack,
    |url: String| async move {
        let conn = Connection::open(&url).await.unwrap();
        let name = unique("buffer");
        let mut b = SimpleBuffer::new(&conn, &name).await.unwrap();
        b.put(&"a").await.unwrap();
        b.put(&"b").await.unwrap();
        let m = b.get(Some(Duration::from_secs(5))).await.unwrap();
        assert_eq!(m.decode::<String>().unwrap(), "a");
        assert_eq!(
            m.properties().delivery_mode,
            Some(1),
            "SimpleBuffer messages are transient"
        );
        let m = b.get(Some(Duration::from_secs(5))).await.unwrap();
        assert_eq!(m.decode::<String>().unwrap(), "b");
        b.close().await.unwrap();
        conn.close().await.unwrap();
    }
);

on_every_transport!(
    bound_exchange_and_queue_publish_get_bind_delete,
    |url: String| async move {
        let conn = Connection::open(&url).await.unwrap();
        let ch = conn.channel().await.unwrap();
        let src = ch
            // Not auto-delete: like RabbitMQ, an auto-delete source exchange goes away with its
            // last binding, and this test unbinds it.
            .declare_exchange(Exchange::topic(unique("src")))
            .await
            .unwrap();
        let dst = ch
            .declare_exchange(Exchange::direct(unique("dst")).auto_delete(true))
            .await
            .unwrap();
        let q = ch
            .declare_queue(Queue::new(unique("q")).auto_delete(true))
            .await
            .unwrap();
        q.bind(&dst.name, "k").await.unwrap();
        // exchange-to-exchange: src routes "k" on to dst.
        dst.bind(&src.name, "k").await.unwrap();
        src.publish("via src", "k").await.unwrap();
        dst.publish_with("direct", "k", PublishOptions::default().priority(3))
            .await
            .unwrap();
        src.publish("nowhere", "other").await.unwrap();
        let mut bodies = Vec::new();
        for _ in 0..2 {
            let mut m = q
                .get(false, true, Some(Duration::from_secs(5)))
                .await
                .unwrap()
                .unwrap();
            bodies.push(String::from_utf8(m.body().to_vec()).unwrap());
            m.ack().await.unwrap();
        }
        assert_eq!(bodies, ["via src", "direct"]);
        let err = q
            .get(false, true, Some(Duration::from_secs(5)))
            .await
            .unwrap_err();
        assert!(matches!(err, Error::QueueEmpty { .. }), "{err:?}");
        assert!(q.get(false, false, None).await.unwrap().is_none());
        dst.unbind(&src.name, "k").await.unwrap();
        src.publish("after unbind", "k").await.unwrap();
        assert!(q.get(true, false, None).await.unwrap().is_none());
        // default exchange routes by queue name
        ch.default_exchange()
            .publish("by name", &q.name)
            .await
            .unwrap();
        let m = q
            .get(true, true, Some(Duration::from_secs(5)))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(&m.body()[..], b"by name");
        assert_eq!(q.delete(false, false).await.unwrap(), 0);
        dst.delete(false).await.unwrap();
        src.delete(false).await.unwrap();
        conn.close().await.unwrap();
    }
);

on_every_transport!(bound_queue_consume_and_cancel, |url: String| async move {
    let conn = Connection::open(&url).await.unwrap();
    let ch = conn.channel().await.unwrap();
    let q = ch
        .declare_queue(Queue::new(unique("consume")).auto_delete(false))
        .await
        .unwrap();
    let count = Arc::new(AtomicUsize::new(0));
    let c2 = count.clone();
    let tag = q
        .consume(move |mut msg| {
            let c2 = c2.clone();
            async move {
                c2.fetch_add(1, Ordering::SeqCst);
                msg.ack_log_error().await;
            }
        })
        .await
        .unwrap();
    assert!(!tag.is_empty());
    for i in 0..5 {
        ch.default_exchange()
            .publish(format!("m{i}"), &q.name)
            .await
            .unwrap();
    }
    for _ in 0..200 {
        if count.load(Ordering::SeqCst) == 5 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(count.load(Ordering::SeqCst), 5);
    q.cancel(&tag).await.unwrap();
    // After cancel, new messages stay in the queue.
    ch.default_exchange()
        .publish("after", &q.name)
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(count.load(Ordering::SeqCst), 5);
    let m = q
        .get(true, true, Some(Duration::from_secs(5)))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(&m.body()[..], b"after");
    q.delete(false, false).await.unwrap();
    conn.close().await.unwrap();
});

on_every_transport!(
    bound_queue_consumer_cancelled_by_broker_is_reported,
    |url: String| async move {
        let conn = Connection::open(&url).await.unwrap();
        let ch = conn.channel().await.unwrap();
        let q = ch.declare_queue(Queue::new(unique("gone"))).await.unwrap();
        let tag = q
            .consume(|mut m| async move { m.ack_log_error().await })
            .await
            .unwrap();
        // Delete the queue from another channel: the broker cancels the consumer.
        let other = conn.channel().await.unwrap();
        Queue::new(q.name.clone())
            .delete(&other, false, false)
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(200)).await;
        let err = q.cancel(&tag).await.unwrap_err();
        assert!(matches!(err, Error::ConsumerCancelled { .. }), "{err:?}");
        conn.close().await.unwrap();
    }
);

on_every_transport!(
    dropping_the_connection_closes_it,
    |url: String| async move {
        let name = unique("exclusive");
        {
            let conn = Connection::open(&url).await.unwrap();
            let ch = conn.channel().await.unwrap();
            ch.declare_queue(Queue::new(name.clone()).exclusive(true))
                .await
                .unwrap();
            // While it lives, nobody else may use its exclusive queue.
            let other = Connection::open(&url).await.unwrap();
            let och = other.channel().await.unwrap();
            let err = och
                .declare_queue(Queue::new(name.clone()).exclusive(true))
                .await
                .unwrap_err();
            assert_eq!(err.reply_code(), Some(405), "{err:?}");
        }
        // Dropped (no close call): the broker hears a clean close and frees the queue.
        let conn = Connection::open(&url).await.unwrap();
        let mut last = None;
        for _ in 0..100 {
            let ch = conn.channel().await.unwrap();
            match ch
                .declare_queue(Queue::new(name.clone()).exclusive(true))
                .await
            {
                Ok(_) => {
                    last = None;
                    break;
                }
                Err(e) => last = Some(e),
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(last.is_none(), "queue still locked after drop: {last:?}");
        conn.close().await.unwrap();
    }
);

on_every_transport!(
    on_close_fires_on_close_and_on_drop,
    |url: String| async move {
        // Explicit close.
        let conn = Connection::open(&url).await.unwrap();
        let (tx, rx) = tokio::sync::oneshot::channel();
        conn.on_close(move |why| {
            let _ = tx.send(why);
        });
        let watcher = conn.clone();
        let waiting = tokio::spawn(async move { watcher.closed().await });
        conn.close().await.unwrap();
        rx.await.unwrap();
        waiting.await.unwrap();
        // Dropping every handle: the callback does not keep the connection alive, and hears it.
        let conn = Connection::open(&url).await.unwrap();
        let (tx, rx) = tokio::sync::oneshot::channel();
        conn.on_close(move |why| {
            let _ = tx.send(why);
        });
        drop(conn);
        tokio::time::timeout(Duration::from_secs(5), rx)
            .await
            .expect("on_close did not fire after the last handle was dropped")
            .unwrap();
    }
);

#[tokio::test]
async fn amqp_heartbeat_option_and_broker_close_reach_the_user() {
    let Some(url) = url(
        "amqp",
        "amqp_heartbeat_option_and_broker_close_reach_the_user",
    ) else {
        return;
    };
    let name = unique("named");
    let conn = Connection::builder()
        .url(url)
        .heartbeat(Duration::from_secs(7))
        .connection_name(name.clone())
        .connect()
        .await
        .unwrap();
    assert_eq!(conn.transport().heartbeat(), Some(Duration::from_secs(7)));
    let (tx, rx) = tokio::sync::oneshot::channel();
    conn.on_close(move |why| {
        let _ = tx.send(why);
    });
    // Find our connection by its name (client_properties) and have the broker close it.
    let closed = tokio::task::spawn_blocking(move || {
        for _ in 0..50 {
            let out = std::process::Command::new("rabbitmqctl")
                .args([
                    "-q",
                    "list_connections",
                    "--no-table-headers",
                    "pid",
                    "client_properties",
                ])
                .output()
                .ok()?;
            let text = String::from_utf8_lossy(&out.stdout).into_owned();
            if let Some(line) = text.lines().find(|l| l.contains(&name)) {
                let pid = line.split_whitespace().next()?.to_owned();
                let ok = std::process::Command::new("rabbitmqctl")
                    .args(["-q", "close_connection", &pid, "kelp on_close test"])
                    .status()
                    .ok()?
                    .success();
                return Some(ok);
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        None
    })
    .await
    .unwrap();
    if closed.is_none() && std::env::var("KELP_REQUIRE_BROKERS").as_deref() != Ok("1") {
        eprintln!("SKIP broker close part: rabbitmqctl not usable here");
        return;
    }
    assert_eq!(closed, Some(true), "rabbitmqctl close_connection failed");
    let why = tokio::time::timeout(Duration::from_secs(10), rx)
        .await
        .expect("on_close did not fire after the broker closed the connection")
        .unwrap();
    assert_eq!(why.reply_code(), Some(320), "{why:?}");
    assert!(why.to_string().contains("kelp on_close test"), "{why}");
    assert!(conn.is_closed());
}

on_every_transport!(
    values_amqp_cannot_carry_are_typed_errors,
    |url: String| async move {
        let conn = Connection::open(&url).await.unwrap();
        let ch = conn.channel().await.unwrap();
        let q = ch
            .declare_queue(Queue::new(unique("long")).auto_delete(true))
            .await
            .unwrap();
        let long = "x".repeat(300);
        // A short string (content type, routing key) holds at most 255 bytes in AMQP 0-9-1.
        let p = Producer::new(&ch);
        let err = p
            .publish(
                "body",
                PublishOptions::default()
                    .routing_key(q.name.as_str())
                    .content_type(long.as_str()),
            )
            .await
            .unwrap_err();
        let text = err.to_string();
        assert!(text.contains("255") || text.contains("long"), "{text}");
        let ch = conn.channel().await.unwrap();
        let err = Producer::new(&ch)
            .publish("body", PublishOptions::default().routing_key(long.as_str()))
            .await
            .unwrap_err();
        assert!(
            err.to_string().contains("255") || err.to_string().contains("long"),
            "{err}"
        );
        conn.close().await.unwrap();
    }
);
