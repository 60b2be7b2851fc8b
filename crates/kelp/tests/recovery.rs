//! Robust connections against the local RabbitMQ, with faults injected by a TCP proxy between
//! kelp and the broker (so each test breaks only its own connections).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

#[allow(unused_macros)]
mod common;
mod fault;

use std::time::{Duration, Instant};

use fault::FaultProxy;
use kelp::recovery::{ReconnectPolicy, RecoveryEvent, RecoveryEvents, RecoveryOptions};
use kelp::{Connection, Consumer, Error, Exchange, Message, Producer, PublishOptions, Queue};

const UPSTREAM: &str = "127.0.0.1:5672";

fn options() -> RecoveryOptions {
    RecoveryOptions::default()
        .reconnect(
            ReconnectPolicy::default()
                .interval_step(Duration::from_millis(100))
                .interval_max(Duration::from_millis(300)),
        )
        .outage_timeout(Duration::from_secs(20))
}

async fn robust(proxy: &FaultProxy, opts: RecoveryOptions) -> Connection {
    Connection::builder()
        .url(proxy.url("amqp://guest:guest@{}/%2f"))
        .connect_timeout(Duration::from_secs(3))
        .recovery(opts)
        .connect()
        .await
        .expect("robust connect through the proxy")
}

async fn direct(url: &str) -> Connection {
    Connection::open(url).await.expect("direct connect")
}

/// Wait for the first event `pick` accepts.
async fn wait_event<T>(
    events: &mut RecoveryEvents,
    what: &str,
    mut pick: impl FnMut(&RecoveryEvent) -> Option<T>,
) -> T {
    let deadline = Duration::from_secs(20);
    tokio::time::timeout(deadline, async {
        loop {
            match events.recv().await {
                Some(e) => {
                    if let Some(v) = pick(&e) {
                        return v;
                    }
                }
                None => panic!("event stream ended waiting for {what}"),
            }
        }
    })
    .await
    .unwrap_or_else(|_| panic!("no {what} event within {deadline:?}"))
}

async fn next(c: &mut Consumer, what: &str) -> Message {
    match common::within(what, c.next()).await {
        Some(Ok(m)) => m,
        other => panic!("{what}: expected a message, got {other:?}"),
    }
}

async fn publish(conn: &Connection, queue: &str, body: &str) {
    let ch = conn.channel().await.expect("channel");
    Producer::new(&ch)
        .publish(
            body.to_owned(),
            PublishOptions::default().routing_key(queue),
        )
        .await
        .expect("publish");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consumer_resumes_after_the_connection_drops() {
    let Some(url) = common::amqp_url("recovery::consumer_resumes") else {
        return;
    };
    let proxy = FaultProxy::start(UPSTREAM).await.expect("proxy");
    let conn = robust(&proxy, options()).await;
    let mut events = conn.events();
    let ch = conn.channel().await.expect("channel");
    let q = common::unique("resume");
    ch.declare_queue(Queue::new(&q).durable(false).auto_delete(true))
        .await
        .expect("declare");
    let mut consumer = Consumer::builder(&ch)
        .queue(Queue::new(&q).durable(false).auto_delete(true))
        .prefetch_count(5)
        .build()
        .await
        .expect("consumer");
    let other = direct(&url).await;
    publish(&other, &q, "before").await;
    let mut m = next(&mut consumer, "before the fault").await;
    assert_eq!(m.body().as_ref(), b"before");
    m.ack().await.expect("ack before the fault");

    proxy.drop_all();
    wait_event(&mut events, "disconnected", |e| {
        matches!(e, RecoveryEvent::Disconnected { .. }).then_some(())
    })
    .await;
    wait_event(&mut events, "reconnected", |e| {
        matches!(e, RecoveryEvent::Reconnected { .. }).then_some(())
    })
    .await;
    publish(&other, &q, "after").await;
    let mut m = next(&mut consumer, "after the fault").await;
    assert_eq!(m.body().as_ref(), b"after");
    m.ack().await.expect("ack after the fault");
    // The auto-delete queue was recreated by the restore, so it is there to delete.
    other
        .channel()
        .await
        .expect("channel")
        .raw()
        .queue_delete(&q, false, false)
        .await
        .expect("delete");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ack_of_a_delivery_from_before_the_loss_is_stale_and_the_message_comes_back() {
    let Some(url) = common::amqp_url("recovery::stale_ack") else {
        return;
    };
    let proxy = FaultProxy::start(UPSTREAM).await.expect("proxy");
    let conn = robust(&proxy, options()).await;
    let mut events = conn.events();
    let ch = conn.channel().await.expect("channel");
    let q = common::unique("stale");
    let queue = Queue::new(&q).durable(false).auto_delete(false);
    ch.declare_queue(queue.clone()).await.expect("declare");
    let mut consumer = Consumer::builder(&ch)
        .queue(queue)
        .build()
        .await
        .expect("consumer");
    let other = direct(&url).await;
    publish(&other, &q, "once").await;
    let mut first = next(&mut consumer, "first delivery").await;
    assert!(!first.redelivered());

    proxy.reset_all();
    wait_event(&mut events, "reconnected", |e| {
        matches!(e, RecoveryEvent::Reconnected { .. }).then_some(())
    })
    .await;
    match first.ack().await {
        Err(Error::StaleDelivery { .. }) => {}
        other => panic!("ack after recovery: expected StaleDelivery, got {other:?}"),
    }
    let mut again = next(&mut consumer, "redelivery").await;
    assert_eq!(again.body().as_ref(), b"once");
    assert!(again.redelivered(), "the second copy carries redelivered");
    again.ack().await.expect("ack of the redelivery");
    let och = other.channel().await.expect("channel");
    assert!(
        och.raw().get(&q, true).await.expect("get").is_none(),
        "acked once, gone"
    );
    och.raw()
        .queue_delete(&q, false, false)
        .await
        .expect("delete");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_named_queue_gets_a_new_name_and_bindings_and_consumers_follow() {
    let Some(url) = common::amqp_url("recovery::server_named") else {
        return;
    };
    let proxy = FaultProxy::start(UPSTREAM).await.expect("proxy");
    let conn = robust(&proxy, options()).await;
    let mut events = conn.events();
    let ch = conn.channel().await.expect("channel");
    let ex = common::unique("sn-topic");
    let src = common::unique("sn-src");
    let exchange = Exchange::topic(&ex).durable(false).auto_delete(false);
    ch.declare_exchange(exchange.clone()).await.expect("topic");
    ch.declare_exchange(Exchange::fanout(&src).durable(false).auto_delete(false))
        .await
        .expect("fanout");
    ch.raw()
        .exchange_bind(&ex, &src, "", &Default::default())
        .await
        .expect("e2e bind");
    let queue = ch
        .declare_queue(
            Queue::new("")
                .exclusive(true)
                .exchange(exchange)
                .routing_key("sn.#"),
        )
        .await
        .expect("server-named queue");
    let old = queue.name.clone();
    assert!(old.starts_with("amq.gen-"), "{old}");
    let mut consumer = Consumer::builder(&ch)
        .queue(Queue::from(queue.clone()).no_declare(true))
        .build()
        .await
        .expect("consumer");

    proxy.drop_all();
    let new = wait_event(&mut events, "queue renamed", |e| match e {
        RecoveryEvent::QueueRenamed { old: o, new } if *o == old => Some(new.clone()),
        _ => None,
    })
    .await;
    assert_ne!(new, old);
    wait_event(&mut events, "reconnected", |e| {
        matches!(e, RecoveryEvent::Reconnected { .. }).then_some(())
    })
    .await;
    // Through the exchange-to-exchange binding, then the topic binding, to the new queue.
    let other = direct(&url).await;
    let och = other.channel().await.expect("channel");
    Producer::new(&och)
        .exchange(Exchange::fanout(&src).no_declare(true))
        .publish("routed", PublishOptions::default().routing_key("sn.a"))
        .await
        .expect("publish");
    let mut m = next(&mut consumer, "routed after rename").await;
    assert_eq!(m.body().as_ref(), b"routed");
    m.ack().await.expect("ack");
    // The old name still works through the robust connection's channels.
    publish(&conn, &old, "by old name").await;
    let m = next(&mut consumer, "by old name").await;
    assert_eq!(m.body().as_ref(), b"by old name");
    och.raw().exchange_delete(&ex, false).await.expect("del");
    och.raw().exchange_delete(&src, false).await.expect("del");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publish_waits_for_the_broker_then_succeeds() {
    let Some(url) = common::amqp_url("recovery::publish_waits") else {
        return;
    };
    let proxy = FaultProxy::start(UPSTREAM).await.expect("proxy");
    let conn = robust(&proxy, options()).await;
    let ch = conn.channel().await.expect("channel");
    ch.confirm_select().await.expect("confirm");
    let q = common::unique("waits");
    ch.declare_queue(Queue::new(&q).durable(false).auto_delete(false))
        .await
        .expect("declare");
    proxy.set_refuse(true);
    proxy.drop_all();
    let producer = Producer::new(&ch);
    let q2 = q.clone();
    let task = tokio::spawn(async move {
        producer
            .publish("waited", PublishOptions::default().routing_key(&q2))
            .await
    });
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(
        !task.is_finished(),
        "the publish waits while the broker is unreachable"
    );
    proxy.set_refuse(false);
    common::within("publish after the outage", task)
        .await
        .expect("task")
        .expect("publish confirmed after recovery");
    let other = direct(&url).await;
    let och = other.channel().await.expect("channel");
    let got = och
        .raw()
        .get(&q, true)
        .await
        .expect("get")
        .expect("message");
    assert_eq!(got.body.as_ref(), b"waited");
    och.raw()
        .queue_delete(&q, false, false)
        .await
        .expect("delete");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publish_gives_up_after_the_outage_timeout_with_a_clear_error() {
    if common::amqp_url("recovery::outage_timeout").is_none() {
        return;
    }
    let proxy = FaultProxy::start(UPSTREAM).await.expect("proxy");
    let conn = robust(&proxy, options().outage_timeout(Duration::from_secs(1))).await;
    let ch = conn.channel().await.expect("channel");
    // Confirm mode: the publish is only done when the broker says so, and it cannot.
    ch.confirm_select().await.expect("confirm");
    proxy.set_refuse(true);
    proxy.drop_all();
    let started = Instant::now();
    let r = Producer::new(&ch)
        .publish(
            "never",
            PublishOptions::default().routing_key("kelp-nowhere"),
        )
        .await;
    let waited = started.elapsed();
    assert!(
        matches!(r, Err(Error::ConnectionDown { .. })),
        "expected ConnectionDown, got {r:?}"
    );
    assert!(
        waited >= Duration::from_millis(900) && waited < Duration::from_secs(5),
        "{waited:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fail_fast_returns_at_once_and_retrying_does_not_spin() {
    // Nothing listens on port 1.
    let started = Instant::now();
    let r = Connection::open_robust("amqp://guest:guest@127.0.0.1:1/%2f").await;
    assert!(r.is_err());
    assert!(started.elapsed() < Duration::from_secs(2), "fail_fast");

    let cpu_before = cpu_time();
    let started = Instant::now();
    let r = Connection::builder()
        .url("amqp://guest:guest@127.0.0.1:1/%2f")
        .recovery(
            RecoveryOptions::default().fail_fast(false).reconnect(
                ReconnectPolicy::default()
                    .max_retries(Some(4))
                    .interval_start(Duration::from_millis(200))
                    .interval_step(Duration::from_millis(300))
                    .interval_max(Duration::from_millis(600))
                    .jitter(0.0),
            ),
        )
        .connect()
        .await;
    let wall = started.elapsed();
    let cpu = cpu_time().saturating_sub(cpu_before);
    assert!(r.is_err(), "gives up after max_retries");
    // 200 + 300 + 600 + 600 ms of backoff.
    assert!(wall >= Duration::from_millis(1600), "it waited: {wall:?}");
    assert!(
        cpu < wall / 4,
        "no busy loop while waiting: {cpu:?} CPU in {wall:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_login_fails_at_once_even_without_fail_fast() {
    if common::amqp_url("recovery::refused_login").is_none() {
        return;
    }
    let started = Instant::now();
    let r = Connection::builder()
        .url("amqp://guest:wrong@127.0.0.1:5672/%2f")
        .recovery(RecoveryOptions::default().fail_fast(false))
        .connect()
        .await;
    assert!(r.is_err(), "{r:?}");
    assert!(started.elapsed() < Duration::from_secs(5));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failover_uses_the_next_url() {
    if common::amqp_url("recovery::failover").is_none() {
        return;
    }
    let a = FaultProxy::start(UPSTREAM).await.expect("proxy a");
    let b = FaultProxy::start(UPSTREAM).await.expect("proxy b");
    a.set_refuse(true);
    let url = format!(
        "{};{}",
        a.url("amqp://guest:guest@{}/%2f"),
        b.url("amqp://guest:guest@{}/%2f")
    );
    let conn = Connection::builder()
        .url(url)
        .recovery(options())
        .connect()
        .await
        .expect("connects through b");
    assert!(b.total_accepted() >= 1);
    let mut events = conn.events();
    let ch = conn.channel().await.expect("channel");
    // Now b goes away and a comes back: the reconnect lands on a.
    a.set_refuse(false);
    b.set_refuse(true);
    b.drop_all();
    wait_event(&mut events, "reconnected", |e| {
        matches!(e, RecoveryEvent::Reconnected { .. }).then_some(())
    })
    .await;
    assert_eq!(a.live_connections(), 1, "reconnected through a");
    ch.raw()
        .queue_declare(
            &common::unique("failover"),
            kelp::transport::QueueFlags {
                exclusive: true,
                ..Default::default()
            },
            &Default::default(),
        )
        .await
        .expect("the channel works after failover");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missed_heartbeats_trigger_recovery() {
    let Some(url) = common::amqp_url("recovery::heartbeat") else {
        return;
    };
    let proxy = FaultProxy::start(UPSTREAM).await.expect("proxy");
    let conn = Connection::builder()
        .url(proxy.url("amqp://guest:guest@{}/%2f"))
        .heartbeat(Duration::from_secs(1))
        .connect_timeout(Duration::from_secs(2))
        .recovery(options())
        .connect()
        .await
        .expect("connect");
    let mut events = conn.events();
    let ch = conn.channel().await.expect("channel");
    let q = common::unique("hb");
    let queue = Queue::new(&q).durable(false).auto_delete(false);
    ch.declare_queue(queue.clone()).await.expect("declare");
    let mut consumer = Consumer::builder(&ch)
        .queue(queue)
        .build()
        .await
        .expect("consumer");
    proxy.stall();
    let started = Instant::now();
    wait_event(&mut events, "disconnected", |e| {
        matches!(e, RecoveryEvent::Disconnected { .. }).then_some(())
    })
    .await;
    let detected = started.elapsed();
    assert!(
        detected < Duration::from_secs(6),
        "detected after {detected:?}"
    );
    proxy.unstall();
    wait_event(&mut events, "reconnected", |e| {
        matches!(e, RecoveryEvent::Reconnected { .. }).then_some(())
    })
    .await;
    let other = direct(&url).await;
    publish(&other, &q, "after stall").await;
    let mut m = next(&mut consumer, "after the stall").await;
    m.ack().await.expect("ack");
    other
        .channel()
        .await
        .expect("channel")
        .raw()
        .queue_delete(&q, false, false)
        .await
        .expect("delete");
}

/// This process's user+system CPU time.
fn cpu_time() -> Duration {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    // Fields after the command name (which is in parentheses): utime is 14th, stime 15th.
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    // After ')': state is index 0, so utime (field 14) is index 11, stime index 12.
    let total = ticks(11) + ticks(12);
    Duration::from_millis(total * 10)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_cancel_is_an_event_and_the_consumer_resumes_when_asked() {
    let Some(url) = common::amqp_url("recovery::server_cancel") else {
        return;
    };
    let proxy = FaultProxy::start(UPSTREAM).await.expect("proxy");
    let conn = robust(&proxy, options().reconsume_on_cancel(true)).await;
    let mut events = conn.events();
    let ch = conn.channel().await.expect("channel");
    let q = common::unique("cancel");
    let queue = Queue::new(&q).durable(false).auto_delete(false);
    ch.declare_queue(queue.clone()).await.expect("declare");
    let mut consumer = Consumer::builder(&ch)
        .queue(queue)
        .build()
        .await
        .expect("consumer");
    let other = direct(&url).await;
    let och = other.channel().await.expect("channel");
    och.raw()
        .queue_delete(&q, false, false)
        .await
        .expect("delete");
    match common::within("cancel notice", consumer.next()).await {
        Some(Err(Error::ConsumerCancelled { queue, .. })) => assert_eq!(queue, q),
        other => panic!("expected ConsumerCancelled, got {other:?}"),
    }
    wait_event(&mut events, "consumer cancelled", |e| {
        matches!(e, RecoveryEvent::ConsumerCancelled { .. }).then_some(())
    })
    .await;
    // The queue comes back: the consumer follows by itself.
    och.declare_queue(Queue::new(&q).durable(false).auto_delete(false))
        .await
        .expect("redeclare");
    wait_event(&mut events, "consumer resumed", |e| {
        matches!(e, RecoveryEvent::ConsumerResumed { .. }).then_some(())
    })
    .await;
    publish(&other, &q, "back").await;
    let mut m = next(&mut consumer, "after resume").await;
    assert_eq!(m.body().as_ref(), b"back");
    m.ack().await.expect("ack");
    och.raw()
        .queue_delete(&q, false, false)
        .await
        .expect("delete");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn entities_declared_robust_false_are_not_restored() {
    if common::amqp_url("recovery::robust_false").is_none() {
        return;
    }
    let proxy = FaultProxy::start(UPSTREAM).await.expect("proxy");
    let conn = robust(&proxy, options()).await;
    let mut events = conn.events();
    let ch = conn.channel().await.expect("channel");
    let kept = common::unique("kept");
    let skipped = common::unique("skipped");
    ch.declare_queue(Queue::new(&kept).exclusive(true))
        .await
        .expect("kept");
    ch.declare_queue(Queue::new(&skipped).exclusive(true).robust(false))
        .await
        .expect("skipped");
    proxy.drop_all();
    wait_event(&mut events, "reconnected", |e| {
        matches!(e, RecoveryEvent::Reconnected { .. }).then_some(())
    })
    .await;
    let passive = kelp::transport::QueueFlags {
        passive: true,
        ..Default::default()
    };
    let ch2 = conn.channel().await.expect("channel");
    ch2.raw()
        .queue_declare(&kept, passive, &Default::default())
        .await
        .expect("the robust exclusive queue was recreated");
    let r = ch2
        .raw()
        .queue_declare(&skipped, passive, &Default::default())
        .await;
    assert_eq!(
        r.err().and_then(|e| e.reply_code()),
        Some(404),
        "robust(false) queue is not recreated"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ensure_retries_an_operation_across_an_outage() {
    if common::amqp_url("recovery::ensure").is_none() {
        return;
    }
    let proxy = FaultProxy::start(UPSTREAM).await.expect("proxy");
    let conn = robust(&proxy, options()).await;
    let ch = conn.channel().await.expect("channel");
    let q = common::unique("ensure");
    ch.declare_queue(Queue::new(&q).exclusive(true))
        .await
        .expect("declare");
    proxy.set_refuse(true);
    proxy.drop_all();
    let unrefuse = {
        let started = Instant::now();
        async move {
            tokio::time::sleep(Duration::from_millis(800)).await;
            started
        }
    };
    let policy = kelp::RetryPolicy::default().max_retries(Some(5));
    let (r, _) = tokio::join!(
        conn.ensure(
            &policy,
            || ch.raw().queue_purge(&q),
            |e, wait| eprintln!("ensure: {e}; retrying in {wait:?}"),
        ),
        async {
            unrefuse.await;
            proxy.set_refuse(false);
        }
    );
    assert_eq!(r.expect("purge after the outage"), 0);
    assert!(conn.is_connected());
}
