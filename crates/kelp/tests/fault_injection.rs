//! The fault-injection suite: a producer in confirm mode and a consumer, both on robust
//! connections through a TCP proxy, while the proxy and the broker inject faults of seven kinds
//! (drop, reset, stall, latency, 1-byte slicing, `rabbitmqctl close_all_connections`, broker
//! restart). After the faults: every message the producer was told was confirmed was consumed
//! (lost = 0), consumers resumed, and the topology (server-named and exclusive queues, an
//! exchange-to-exchange binding, a headers binding with arguments, prefetch) is what it was.
//!
//! This binary stops and restarts RabbitMQ, so its tests run one at a time and, however they
//! end, leave the broker running (a guard restarts it on drop). Cargo runs test binaries one
//! after another, so no other broker test runs meanwhile.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

#[allow(unused_macros)]
mod common;
mod fault;

use std::collections::{BTreeSet, HashMap};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use fault::broker::{self, BrokerRestart};
use fault::FaultProxy;
use kelp::recovery::{ReconnectPolicy, RecoveryEvent, RecoveryOptions};
use kelp::{
    Connection, Consumer, DeliveryMode, Error, Exchange, Message, Producer, PublishOptions, Queue,
};

const UPSTREAM: &str = "127.0.0.1:5672";
const WORK: &str = "kelp-fault-work";
const SRC: &str = "kelp-fault-src";
const TOPIC: &str = "kelp-fault-topic";
const HDR: &str = "kelp-fault-hdr";
const HQ: &str = "kelp-fault-hq";

/// One test at a time in this binary.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Whatever happens, the broker is left running with its normal memory watermark.
struct LeaveBrokerRunning;

impl Drop for LeaveBrokerRunning {
    fn drop(&mut self) {
        let _ = broker::rabbitmqctl(&["set_vm_memory_high_watermark", "0.4"]);
        if let Err(e) = broker::ensure_rabbit_running() {
            eprintln!("fault_injection: could not bring RabbitMQ back: {e}");
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
enum Fault {
    Drop,
    Reset,
    Stall,
    Latency,
    Slicing,
    CloseAll,
    Restart,
}

const KINDS: [Fault; 7] = [
    Fault::Drop,
    Fault::Reset,
    Fault::Stall,
    Fault::Latency,
    Fault::Slicing,
    Fault::CloseAll,
    Fault::Restart,
];

fn recovery_options() -> RecoveryOptions {
    RecoveryOptions::default()
        .reconnect(
            ReconnectPolicy::default()
                .interval_step(Duration::from_millis(100))
                .interval_max(Duration::from_millis(500)),
        )
        .outage_timeout(Duration::from_secs(120))
}

async fn robust(proxy: &FaultProxy, name: &str) -> Connection {
    Connection::builder()
        .url(proxy.url("amqp://guest:guest@{}/%2f"))
        .heartbeat(Duration::from_secs(2))
        .connect_timeout(Duration::from_secs(3))
        .connection_name(name)
        .recovery(recovery_options())
        .connect()
        .await
        .expect("robust connect")
}

#[derive(Default)]
struct Tally {
    /// Message number → times consumed.
    seen: HashMap<u64, u32>,
    duplicates: u64,
    duplicates_redelivered: u64,
    stale_acks: u64,
    ack_errors: Vec<String>,
    last_delivery: Option<Instant>,
}

/// The topology as the broker lists it, with the server-named queue's current name replaced
/// by a placeholder so before and after compare.
fn topology(server_named: &str) -> BTreeSet<String> {
    let norm = |s: &str| {
        if s == server_named {
            "<server-named>".to_owned()
        } else {
            s.to_owned()
        }
    };
    let ours = |s: &str| s.starts_with("kelp-fault-") || s == server_named;
    let mut out = BTreeSet::new();
    for b in broker::list_bindings().expect("list_bindings") {
        if ours(&b.source) || ours(&b.destination) {
            out.insert(format!(
                "binding {} -> {} {} ({}) {}",
                norm(&b.source),
                b.destination_kind,
                norm(&b.destination),
                b.routing_key.replace(server_named, "<server-named>"),
                b.arguments
            ));
        }
    }
    for q in broker::list_queues().expect("list_queues") {
        if ours(&q.name) {
            out.insert(format!(
                "queue {} durable={} exclusive={} auto_delete={} {}",
                norm(&q.name),
                q.durable,
                q.exclusive,
                q.auto_delete,
                q.arguments
            ));
        }
    }
    for c in broker::list_consumers().expect("list_consumers") {
        if ours(&c.queue) {
            out.insert(format!(
                "consumer {} tag={} ack={} prefetch={} {}",
                norm(&c.queue),
                c.tag,
                c.ack_required,
                c.prefetch_count,
                c.arguments
            ));
        }
    }
    for (name, kind, durable, auto_delete, args) in broker::list_exchanges().expect("exchanges") {
        if ours(&name) {
            out.insert(format!(
                "exchange {name} {kind} durable={durable} auto_delete={auto_delete} {args}"
            ));
        }
    }
    out
}

async fn cleanup() {
    let Ok(conn) = Connection::open("amqp://guest:guest@127.0.0.1:5672/%2f").await else {
        return;
    };
    let Ok(ch) = conn.channel().await else { return };
    let raw = ch.raw();
    let _ = raw.queue_delete(WORK, false, false).await;
    for ex in [SRC, TOPIC, HDR] {
        let _ = raw.exchange_delete(ex, false).await;
    }
    let _ = conn.close().await;
}

/// Wait until `cond` holds, polling; panics with `what` after `limit`.
async fn wait_until(what: &str, limit: Duration, mut cond: impl FnMut() -> bool) {
    let started = Instant::now();
    while !cond() {
        if started.elapsed() > limit {
            panic!("{what}: not within {limit:?}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn faults_of_seven_kinds_lose_no_confirmed_message() {
    let _serial = SERIAL.lock().await;
    if common::amqp_url("fault_injection::faults").is_none() {
        return;
    }
    let _leave_running = LeaveBrokerRunning;
    cleanup().await;
    let proxy = FaultProxy::start(UPSTREAM).await.expect("proxy");
    let pconn = robust(&proxy, "kelp-fault-producer").await;
    let cconn = robust(&proxy, "kelp-fault-consumer").await;

    // The topology, declared through the consumer's connection.
    let cch = cconn.channel().await.expect("channel");
    cch.qos(400, true).await.expect("global qos");
    let src = Exchange::fanout(SRC).durable(false);
    let topic = Exchange::topic(TOPIC).durable(false);
    let hdr = Exchange::headers(HDR).durable(false);
    for ex in [&src, &topic, &hdr] {
        cch.declare_exchange(ex.clone()).await.expect("exchange");
    }
    cch.raw()
        .exchange_bind(TOPIC, SRC, "", &Default::default())
        .await
        .expect("e2e binding");
    let work = Queue::new(WORK).durable(true);
    cch.declare_queue(work.clone()).await.expect("work queue");
    let sn = cch
        .declare_queue(
            Queue::new("")
                .exclusive(true)
                .exchange(topic.clone())
                .routing_key("fault.#"),
        )
        .await
        .expect("server-named queue");
    let hq_name = format!("{HQ}-{}", std::process::id());
    let hq = cch
        .declare_queue(
            Queue::new(&hq_name)
                .exclusive(true)
                .exchange(hdr.clone())
                .binding_argument("x-match", "all")
                .binding_argument("kind", "fault"),
        )
        .await
        .expect("headers-bound queue");
    let mut work_consumer = Consumer::builder(&cch)
        .queue(work.clone())
        .prefetch_count(100)
        .tag_prefix("kelp-fault-work")
        .build()
        .await
        .expect("work consumer");
    let mut probe_consumer = Consumer::builder(&cch)
        .queues([
            Queue::from(sn.clone()).no_declare(true),
            Queue::from(hq.clone()).no_declare(true),
        ])
        .prefetch_count(10)
        .tag_prefix("kelp-fault-probe")
        .build()
        .await
        .expect("probe consumer");

    let reconnects = Arc::new([AtomicU64::new(0), AtomicU64::new(0)]);
    for (i, who, conn) in [(0, "producer", &pconn), (1, "consumer", &cconn)] {
        let reconnects = reconnects.clone();
        conn.on_event(move |e| match e {
            RecoveryEvent::ReconnectFailed { .. } => {}
            RecoveryEvent::Reconnected { .. } => {
                reconnects[i].fetch_add(1, Ordering::Relaxed);
                eprintln!("  [{who}] {e:?}");
            }
            e => eprintln!("  [{who}] {e:?}"),
        });
    }
    // Follow the server-named queue's renames.
    let sn_name = Arc::new(Mutex::new(sn.name.clone()));
    {
        let sn_name = sn_name.clone();
        cconn.on_event(move |e| {
            if let RecoveryEvent::QueueRenamed { old, new } = e {
                let mut cur = sn_name.lock().unwrap();
                if *cur == old {
                    *cur = new;
                }
            }
        });
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let before = topology(&sn_name.lock().unwrap().clone());

    // The consumer: ack each message, count duplicates.
    let tally = Arc::new(Mutex::new(Tally::default()));
    let consumed = Arc::new(AtomicU64::new(0));
    let consumer_task = {
        let tally = tally.clone();
        let consumed = consumed.clone();
        tokio::spawn(async move {
            while let Some(item) = work_consumer.next().await {
                let mut m: Message = match item {
                    Ok(m) => m,
                    Err(e) => panic!("work consumer error: {e}"),
                };
                let n: u64 = std::str::from_utf8(m.body())
                    .ok()
                    .and_then(|s| s.parse().ok())
                    .expect("numbered body");
                let redelivered = m.redelivered();
                let ack = m.ack().await;
                let mut t = tally.lock().unwrap();
                let count = t.seen.entry(n).or_insert(0);
                *count += 1;
                if *count > 1 {
                    t.duplicates += 1;
                    if redelivered {
                        t.duplicates_redelivered += 1;
                    }
                } else {
                    consumed.fetch_add(1, Ordering::Relaxed);
                }
                t.last_delivery = Some(Instant::now());
                match ack {
                    Ok(()) => {}
                    Err(Error::StaleDelivery { .. }) => t.stale_acks += 1,
                    Err(e) => t.ack_errors.push(e.to_string()),
                }
            }
        })
    };

    // The producer: persistent, confirmed, ~5k msg/s, up to 256 in flight.
    let pch = pconn.channel().await.expect("channel");
    pch.confirm_select().await.expect("confirm mode");
    let producer = Arc::new(Producer::new(&pch));
    let confirmed = Arc::new(Mutex::new(Vec::<u64>::new()));
    let publish_errors = Arc::new(Mutex::new(Vec::<String>::new()));
    let stop = Arc::new(AtomicBool::new(false));
    let producer_task = {
        let (producer, confirmed, errors, stop) = (
            producer.clone(),
            confirmed.clone(),
            publish_errors.clone(),
            stop.clone(),
        );
        tokio::spawn(async move {
            let window = Arc::new(tokio::sync::Semaphore::new(256));
            let mut tick = tokio::time::interval(Duration::from_millis(2));
            let mut n = 0u64;
            let mut inflight = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                tick.tick().await;
                for _ in 0..10 {
                    let permit = window.clone().acquire_owned().await.expect("permit");
                    let (producer, confirmed, errors) =
                        (producer.clone(), confirmed.clone(), errors.clone());
                    let seq = n;
                    n += 1;
                    inflight.push(tokio::spawn(async move {
                        let r = producer
                            .publish(
                                seq.to_string(),
                                PublishOptions::default()
                                    .routing_key(WORK)
                                    .delivery_mode(DeliveryMode::Persistent),
                            )
                            .await;
                        match r {
                            Ok(()) => confirmed.lock().unwrap().push(seq),
                            Err(e) => errors.lock().unwrap().push(format!("#{seq}: {e}")),
                        }
                        drop(permit);
                    }));
                }
                inflight.retain(|t: &tokio::task::JoinHandle<()>| !t.is_finished());
            }
            for t in inflight {
                let _ = t.await;
            }
            n
        })
    };

    // Probes through the e2e and headers bindings, published on the producer's connection.
    let probe_seq = AtomicU64::new(0);
    let probe = |what: &'static str| {
        let producer = producer.clone();
        let k = probe_seq.fetch_add(1, Ordering::Relaxed);
        async move {
            let body = format!("probe-{what}-{k}");
            for (exchange, rk, header) in [(SRC, "fault.probe", None), (HDR, "", Some("fault"))] {
                let mut opts = PublishOptions::default()
                    .exchange(exchange)
                    .routing_key(rk)
                    .mandatory(true);
                if let Some(h) = header {
                    opts = opts.header("kind", h);
                }
                producer
                    .publish(body.clone(), opts)
                    .await
                    .unwrap_or_else(|e| panic!("probe via {exchange}: {e}"));
            }
            body
        }
    };

    // Warm up, then inject.
    wait_until("first deliveries", Duration::from_secs(20), || {
        consumed.load(Ordering::Relaxed) >= 500
    })
    .await;
    let mut injected: Vec<Fault> = Vec::new();
    let mut back_to_first: Vec<Duration> = Vec::new();
    for round in 0..3 {
        for kind in KINDS {
            let at = consumed.load(Ordering::Relaxed);
            let reconnects_before = [
                reconnects[0].load(Ordering::Relaxed),
                reconnects[1].load(Ordering::Relaxed),
            ];
            match kind {
                Fault::Drop => proxy.drop_all(),
                Fault::Reset => proxy.reset_all(),
                Fault::Stall => {
                    proxy.stall();
                    // Heartbeat 2 s: both sides give up on the stalled connections.
                    tokio::time::sleep(Duration::from_secs(5)).await;
                    proxy.unstall();
                }
                Fault::Latency => {
                    proxy.set_latency(Duration::from_millis(30));
                    tokio::time::sleep(Duration::from_secs(2)).await;
                    proxy.set_latency(Duration::ZERO);
                }
                Fault::Slicing => {
                    proxy.set_slicing(true);
                    tokio::time::sleep(Duration::from_secs(2)).await;
                    proxy.set_slicing(false);
                }
                Fault::CloseAll => broker::close_all_connections("kelp fault injection")
                    .expect("close_all_connections"),
                Fault::Restart => {
                    let down = BrokerRestart::stop_async().await.expect("stop_app");
                    tokio::time::sleep(Duration::from_millis(500)).await;
                    down.start_async().await.expect("start_app");
                    let back = Instant::now();
                    let base = consumed.load(Ordering::Relaxed);
                    wait_until(
                        "first delivery after restart",
                        Duration::from_secs(60),
                        || consumed.load(Ordering::Relaxed) > base,
                    )
                    .await;
                    back_to_first.push(back.elapsed());
                }
            }
            injected.push(kind);
            // Recovered: both connections are back (for the faults that break them), the work
            // queue flows again, and both probes arrive.
            if !matches!(kind, Fault::Latency | Fault::Slicing) {
                wait_until(
                    &format!("both connections back after {kind:?}"),
                    Duration::from_secs(60),
                    || {
                        reconnects
                            .iter()
                            .zip(reconnects_before)
                            .all(|(r, b)| r.load(Ordering::Relaxed) > b)
                    },
                )
                .await;
            }
            wait_until(
                &format!("progress after {kind:?} (round {round})"),
                Duration::from_secs(60),
                || consumed.load(Ordering::Relaxed) >= at + 300,
            )
            .await;
            let body = probe("after").await;
            let mut got = 0;
            while got < 2 {
                let m = tokio::time::timeout(Duration::from_secs(30), probe_consumer.next())
                    .await
                    .unwrap_or_else(|_| {
                        let sn = sn_name.lock().unwrap().clone();
                        panic!(
                            "probe after {kind:?} did not arrive; broker: {:#?}",
                            topology(&sn)
                        )
                    })
                    .expect("probe consumer ended")
                    .expect("probe delivery");
                let mut m = m;
                if m.body().as_ref() == body.as_bytes() {
                    got += 1;
                }
                let _ = m.ack().await;
            }
            eprintln!(
                "fault {:>2} {kind:?}: recovered; {} consumed",
                injected.len(),
                consumed.load(Ordering::Relaxed)
            );
        }
    }

    stop.store(true, Ordering::Relaxed);
    let published = producer_task.await.expect("producer task");
    let confirmed: Vec<u64> = confirmed.lock().unwrap().clone();
    {
        let tally = tally.clone();
        let confirmed = confirmed.clone();
        wait_until(
            "every confirmed message consumed",
            Duration::from_secs(60),
            move || {
                let t = tally.lock().unwrap();
                confirmed.iter().all(|n| t.seen.contains_key(n))
            },
        )
        .await;
    }
    // Let late duplicates arrive before counting.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let after = topology(&sn_name.lock().unwrap().clone());

    let t = std::mem::take(&mut *tally.lock().unwrap());
    let lost = confirmed.iter().filter(|n| !t.seen.contains_key(n)).count();
    let kinds: BTreeSet<Fault> = injected.iter().copied().collect();
    back_to_first.sort();
    let p50 = back_to_first
        .get(back_to_first.len() / 2)
        .copied()
        .unwrap_or_default();
    let errors = publish_errors.lock().unwrap().clone();
    println!(
        "fault injection: faults injected {} ({} kinds), published {published}, confirmed {}, \
         consumed {} unique, lost {lost}, duplicates {} ({} redelivered, {} republished), \
         publish errors {}, stale acks {}, broker back -> first delivery p50 {:?} {:?}",
        injected.len(),
        kinds.len(),
        confirmed.len(),
        t.seen.len(),
        t.duplicates,
        t.duplicates_redelivered,
        t.duplicates - t.duplicates_redelivered,
        errors.len(),
        t.stale_acks,
        p50,
        back_to_first,
    );
    assert!(injected.len() >= 20 && kinds.len() >= 5);
    assert_eq!(lost, 0, "confirmed messages lost");
    assert!(t.ack_errors.is_empty(), "ack errors: {:?}", t.ack_errors);
    assert!(errors.is_empty(), "publish errors: {errors:?}");
    assert_eq!(
        before,
        after,
        "topology before vs after:\n-{:#?}\n+{:#?}",
        before.difference(&after).collect::<Vec<_>>(),
        after.difference(&before).collect::<Vec<_>>()
    );
    drop(t);
    consumer_task.abort();
    drop(probe_consumer);
    let _ = pconn.close().await;
    let _ = cconn.close().await;
    cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn blocked_broker_pauses_publishers_until_unblocked() {
    let _serial = SERIAL.lock().await;
    if common::amqp_url("fault_injection::blocked").is_none() {
        return;
    }
    let _leave_running = LeaveBrokerRunning;
    let conn = Connection::builder()
        .url("amqp://guest:guest@127.0.0.1:5672/%2f")
        .recovery(recovery_options())
        .connect()
        .await
        .expect("connect");
    let mut events = conn.events();
    let ch = conn.channel().await.expect("channel");
    let q = common::unique("blocked");
    ch.declare_queue(Queue::new(&q).durable(false).auto_delete(false))
        .await
        .expect("declare");
    let producer = Producer::new(&ch);
    broker::rabbitmqctl(&["set_vm_memory_high_watermark", "0.0000001"]).expect("alarm on");
    // RabbitMQ blocks a connection when it next publishes.
    let _ = producer
        .publish("trigger", PublishOptions::default().routing_key(&q))
        .await;
    let reason = tokio::time::timeout(Duration::from_secs(20), async {
        loop {
            if let Some(RecoveryEvent::Blocked { reason }) = events.recv().await {
                return reason;
            }
        }
    })
    .await
    .expect("a Blocked event");
    assert!(!reason.is_empty());
    let q2 = q.clone();
    let paused = tokio::spawn(async move {
        producer
            .publish("after", PublishOptions::default().routing_key(&q2))
            .await
    });
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(!paused.is_finished(), "the publish waits while blocked");
    broker::rabbitmqctl(&["set_vm_memory_high_watermark", "0.4"]).expect("alarm off");
    tokio::time::timeout(Duration::from_secs(20), async {
        loop {
            if let Some(RecoveryEvent::Unblocked) = events.recv().await {
                return;
            }
        }
    })
    .await
    .expect("an Unblocked event");
    tokio::time::timeout(Duration::from_secs(10), paused)
        .await
        .expect("the publish resumes")
        .expect("task")
        .expect("publish");
    let n = ch
        .raw()
        .queue_delete(&q, false, false)
        .await
        .expect("delete");
    assert_eq!(n, 2, "both messages arrived");
}

fn redis_up() -> bool {
    std::net::TcpStream::connect_timeout(
        &std::net::SocketAddr::from(([127, 0, 0, 1], 6379)),
        Duration::from_secs(1),
    )
    .is_ok()
}

fn start_redis() {
    let _ = std::process::Command::new("redis-server")
        .args([
            "--daemonize",
            "yes",
            "--bind",
            "127.0.0.1",
            "--port",
            "6379",
            "--save",
            "",
            "--appendonly",
            "no",
        ])
        .status();
    for _ in 0..100 {
        if redis_up() {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Whatever happens, Redis is left running.
struct LeaveRedisRunning;

impl Drop for LeaveRedisRunning {
    fn drop(&mut self) {
        if !redis_up() {
            start_redis();
        }
    }
}

async fn redis_round(producer: &Producer, exchange: &str, consumer: &mut Consumer, label: &str) {
    producer
        .publish(
            label.to_owned(),
            PublishOptions::default()
                .exchange(exchange)
                .routing_key("f.x"),
        )
        .await
        .unwrap_or_else(|e| panic!("publish {label}: {e}"));
    let mut m = tokio::time::timeout(Duration::from_secs(20), consumer.next())
        .await
        .unwrap_or_else(|_| panic!("{label}: no delivery"))
        .expect("consumer ended")
        .expect("delivery");
    assert_eq!(m.body().as_ref(), label.as_bytes());
    let _ = m.ack().await;
}

async fn redis_cli(args: &'static [&'static str]) {
    let status = tokio::task::spawn_blocking(move || {
        std::process::Command::new("redis-cli").args(args).status()
    })
    .await
    .unwrap()
    .expect("redis-cli");
    assert!(status.success(), "redis-cli {args:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_client_kill_and_restart_are_recovered() {
    let _serial = SERIAL.lock().await;
    let Some(url) = common::redis_url("fault_injection::redis") else {
        return;
    };
    let _leave_running = LeaveRedisRunning;
    let conn = Connection::builder()
        .url(&url)
        .connect_timeout(Duration::from_secs(2))
        .recovery(recovery_options())
        .connect()
        .await
        .expect("robust redis connection");
    let reconnects = Arc::new(AtomicU64::new(0));
    {
        let reconnects = reconnects.clone();
        conn.on_event(move |e| {
            if matches!(e, RecoveryEvent::Reconnected { .. }) {
                reconnects.fetch_add(1, Ordering::Relaxed);
            }
        });
    }
    let ch = conn.channel().await.expect("channel");
    let ex = common::unique("redis-fault-ex");
    let q = common::unique("redis-fault-q");
    let topic = Exchange::topic(&ex);
    ch.declare_exchange(topic.clone()).await.expect("exchange");
    let queue = Queue::new(&q).exchange(topic.clone()).routing_key("f.*");
    ch.declare_queue(queue.clone()).await.expect("queue");
    let mut consumer = Consumer::builder(&ch)
        .queue(queue.no_declare(true))
        .build()
        .await
        .expect("consumer");
    let producer = Producer::new(&ch);
    redis_round(&producer, &topic.name, &mut consumer, "before").await;
    let started = Instant::now();
    redis_cli(&["CLIENT", "KILL", "TYPE", "normal"]).await;
    wait_until(
        "reconnect after CLIENT KILL",
        Duration::from_secs(20),
        || reconnects.load(Ordering::Relaxed) >= 1,
    )
    .await;
    redis_round(&producer, &topic.name, &mut consumer, "after client kill").await;
    println!(
        "redis CLIENT KILL: recovered and delivering after {:?}",
        started.elapsed()
    );
    // A restart loses everything (no persistence here): the robust connection declares its
    // binding again, so routing works as soon as it is back.
    let started = Instant::now();
    let _ = tokio::task::spawn_blocking(|| {
        std::process::Command::new("redis-cli")
            .args(["SHUTDOWN", "NOSAVE"])
            .status()
    })
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    tokio::task::spawn_blocking(start_redis).await.unwrap();
    assert!(redis_up(), "Redis is back");
    wait_until("reconnect after restart", Duration::from_secs(30), || {
        reconnects.load(Ordering::Relaxed) >= 2
    })
    .await;
    redis_round(&producer, &topic.name, &mut consumer, "after restart").await;
    println!(
        "redis restart: recovered and delivering after {:?}",
        started.elapsed()
    );
    let _ = ch.raw().queue_delete(&q, false, false).await;
    let _ = ch.raw().exchange_delete(&ex, false).await;
}
