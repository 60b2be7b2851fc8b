//! Self-tests of the fault-injection tools in `tests/fault/`: the proxy against an in-test echo
//! server, and the `rabbitmqctl` listings against the local RabbitMQ (skipped with a message
//! when it is down, unless `KELP_REQUIRE_BROKERS=1`).
//!
//! ```text
//! cargo test -p kelp --test fault_tools -- --test-threads=2
//! ```
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod fault;

use std::io::ErrorKind;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use fault::{broker, FaultProxy};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// How long anything that should happen may take.
const WAIT: Duration = Duration::from_secs(3);
/// How long to watch before concluding that nothing is coming.
const QUIET: Duration = Duration::from_millis(300);

/// An echo server on 127.0.0.1:0: its address and a counter of the reads it made.
async fn echo_server() -> (String, Arc<AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let reads = Arc::new(AtomicUsize::new(0));
    let counter = reads.clone();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            let counter = counter.clone();
            tokio::spawn(async move {
                let mut buf = vec![0u8; 64 * 1024];
                while let Ok(n @ 1..) = s.read(&mut buf).await {
                    counter.fetch_add(1, Ordering::Relaxed);
                    if s.write_all(&buf[..n]).await.is_err() {
                        break;
                    }
                }
            });
        }
    });
    (addr, reads)
}

async fn setup() -> (FaultProxy, Arc<AtomicUsize>) {
    let (addr, reads) = echo_server().await;
    (FaultProxy::start(&addr).await.unwrap(), reads)
}

async fn connect(p: &FaultProxy) -> TcpStream {
    TcpStream::connect(("127.0.0.1", p.port())).await.unwrap()
}

/// Writes `msg` and reads the echo back.
async fn roundtrip(s: &mut TcpStream, msg: &[u8]) {
    s.write_all(msg).await.unwrap();
    let mut back = vec![0u8; msg.len()];
    tokio::time::timeout(WAIT, s.read_exact(&mut back))
        .await
        .expect("echo timed out")
        .unwrap();
    assert_eq!(back, msg);
}

/// The next read's result, within [`WAIT`].
async fn read_result(s: &mut TcpStream) -> std::io::Result<usize> {
    let mut buf = [0u8; 64];
    tokio::time::timeout(WAIT, s.read(&mut buf))
        .await
        .expect("read hung")
}

#[tokio::test]
async fn forwards_both_ways_and_half_close() {
    let (p, _) = setup().await;
    assert_eq!(
        p.url("amqp://guest:guest@{}/%2f"),
        format!("amqp://guest:guest@127.0.0.1:{}/%2f", p.port())
    );
    let mut s = connect(&p).await;
    roundtrip(&mut s, b"hello").await;
    roundtrip(&mut s, b"again").await;
    assert_eq!(p.live_connections(), 1);
    assert_eq!(p.total_accepted(), 1);
    // Our FIN reaches the echo server, whose close comes back as EOF.
    s.shutdown().await.unwrap();
    assert_eq!(read_result(&mut s).await.unwrap(), 0);
    assert!(p.wait_live(0, WAIT).await);
}

#[tokio::test]
async fn drop_all_gives_eof_and_new_connections_work() {
    let (p, _) = setup().await;
    let mut a = connect(&p).await;
    let mut b = connect(&p).await;
    roundtrip(&mut a, b"a").await;
    roundtrip(&mut b, b"b").await;
    p.drop_all();
    assert_eq!(read_result(&mut a).await.unwrap(), 0);
    assert_eq!(read_result(&mut b).await.unwrap(), 0);
    assert!(p.wait_live(0, WAIT).await);
    let mut c = connect(&p).await;
    roundtrip(&mut c, b"c").await;
    assert_eq!(p.total_accepted(), 3);
}

#[tokio::test]
async fn reset_all_gives_connection_reset() {
    let (p, _) = setup().await;
    let mut s = connect(&p).await;
    roundtrip(&mut s, b"x").await;
    p.reset_all();
    let err = read_result(&mut s).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::ConnectionReset, "{err}");
    assert!(p.wait_live(0, WAIT).await);
    let mut s = connect(&p).await;
    roundtrip(&mut s, b"y").await;
}

#[tokio::test]
async fn stall_forwards_nothing_then_unstall_closes_stalled() {
    let (p, _) = setup().await;
    let mut old = connect(&p).await;
    roundtrip(&mut old, b"before").await;
    p.stall();
    let mut during = connect(&p).await; // accepted, but not forwarded
    let mut buf = [0u8; 16];
    for s in [&mut old, &mut during] {
        s.write_all(b"lost?").await.unwrap();
        let quiet = tokio::time::timeout(QUIET, s.read(&mut buf)).await;
        assert!(quiet.is_err(), "bytes came back while stalled: {quiet:?}");
    }
    assert_eq!(p.live_connections(), 2);
    p.unstall();
    assert_eq!(read_result(&mut old).await.unwrap(), 0);
    assert_eq!(read_result(&mut during).await.unwrap(), 0);
    assert!(p.wait_live(0, WAIT).await);
    let mut new = connect(&p).await;
    roundtrip(&mut new, b"after").await;
}

#[tokio::test]
async fn latency_delays_each_direction() {
    let (p, _) = setup().await;
    let mut s = connect(&p).await;
    roundtrip(&mut s, b"warm").await;
    let d = Duration::from_millis(150);
    p.set_latency(d);
    let t = Instant::now();
    roundtrip(&mut s, b"slow").await;
    let took = t.elapsed();
    assert!(took >= 2 * d, "round trip took {took:?}");
    p.set_latency(Duration::ZERO);
    let t = Instant::now();
    roundtrip(&mut s, b"fast").await;
    assert!(t.elapsed() < d, "round trip took {:?}", t.elapsed());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slicing_delivers_everything_intact() {
    let (p, reads) = setup().await;
    p.set_slicing(true);
    let payload: Vec<u8> = (0..10 * 1024u32).map(|i| (i * 7 + i / 251) as u8).collect();
    let s = connect(&p).await;
    let (mut r, mut w) = s.into_split();
    let sent = payload.clone();
    let writer = tokio::spawn(async move { w.write_all(&sent).await.map(|()| w) });
    let mut back = vec![0u8; payload.len()];
    tokio::time::timeout(WAIT, r.read_exact(&mut back))
        .await
        .expect("sliced echo timed out")
        .unwrap();
    assert!(back == payload, "payload corrupted");
    let _w = writer.await.unwrap().unwrap();
    // Unsliced, 10 KiB arrive in one or two reads.
    let n = reads.load(Ordering::Relaxed);
    assert!(n > 50, "echo server saw only {n} reads");
}

#[tokio::test]
async fn refuse_closes_new_connections_at_once() {
    let (p, _) = setup().await;
    let mut kept = connect(&p).await;
    roundtrip(&mut kept, b"accepted before").await; // connect() returns before accept()
    p.set_refuse(true);
    let mut s = connect(&p).await;
    assert_eq!(read_result(&mut s).await.unwrap(), 0);
    roundtrip(&mut kept, b"existing ones live on").await;
    assert_eq!(p.total_refused(), 1);
    assert_eq!(p.total_accepted(), 2);
    assert_eq!(p.live_connections(), 1);
    p.set_refuse(false);
    let mut s = connect(&p).await;
    roundtrip(&mut s, b"ok").await;
}

#[tokio::test]
async fn upstream_down_closes_client() {
    // A port that was just free: nothing listens there.
    let free = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = free.local_addr().unwrap().to_string();
    drop(free);
    let p = FaultProxy::start(&addr).await.unwrap();
    let mut s = connect(&p).await;
    assert_eq!(read_result(&mut s).await.unwrap(), 0);
    assert!(p.wait_live(0, WAIT).await);
}

#[tokio::test]
async fn dropping_the_proxy_closes_everything() {
    let (p, _) = setup().await;
    let port = p.port();
    let mut s = connect(&p).await;
    roundtrip(&mut s, b"x").await;
    drop(p);
    assert!(matches!(read_result(&mut s).await, Ok(0) | Err(_)));
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert!(TcpStream::connect(("127.0.0.1", port)).await.is_err());
}

/// `true` if RabbitMQ answers; otherwise prints a SKIP line, or panics under
/// `KELP_REQUIRE_BROKERS=1`.
fn rabbit_or_skip(test: &str) -> bool {
    if broker::rabbit_up() {
        return true;
    }
    if std::env::var("KELP_REQUIRE_BROKERS").as_deref() == Ok("1") {
        panic!("{test}: RabbitMQ at {} is down", broker::RABBIT_ADDR);
    }
    println!("SKIP {test}: RabbitMQ at {} is down", broker::RABBIT_ADDR);
    false
}

/// Declares entities with arguments through the proxy, checks every `list_*` sees them as
/// declared, then closes the connection by name.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_listings_see_declared_entities() {
    use kelp::amqp::options::{ConsumeOptions, ExchangeDeclareOptions, QueueDeclareOptions};
    use kelp::amqp::{Connection, ConnectionBuilder, FieldTable};

    if !rabbit_or_skip("broker_listings_see_declared_entities") {
        return;
    }
    let p = FaultProxy::start(broker::RABBIT_ADDR).await.unwrap();
    let name = format!("kelp-fault-tools-{}", std::process::id());
    let (q, x) = (format!("{name}-q"), format!("{name}-x"));
    let url = p.url("amqp://guest:guest@{}/%2f");
    let conn: Connection = ConnectionBuilder::new(&url)
        .unwrap()
        .connection_name(name.clone())
        .connect()
        .await
        .unwrap();
    let ch = conn.channel().await.unwrap();
    let opts = QueueDeclareOptions {
        exclusive: true,
        ..Default::default()
    };
    let args = FieldTable::new()
        .with("x-queue-type", "classic")
        .with("x-max-length", 10i64);
    ch.queue_declare(&q, opts, args).await.unwrap();
    let opts = ExchangeDeclareOptions {
        auto_delete: true,
        ..Default::default()
    };
    let args = FieldTable::new().with("alternate-exchange", "amq.fanout");
    ch.exchange_declare(&x, "topic", opts, args).await.unwrap();
    let args = FieldTable::new().with("b", true).with("a", 1i32);
    ch.queue_bind(&q, &x, "k.#", args).await.unwrap();
    ch.basic_qos(7, Default::default()).await.unwrap();
    let consume = ConsumeOptions {
        consumer_tag: format!("{name}-tag").into(),
        arguments: FieldTable::new().with("x-priority", 3i32),
        ..Default::default()
    };
    let _consumer = ch.basic_consume(&q, consume).await.unwrap();

    // Four rabbitmqctl calls at once: ~0.7 s instead of ~3 s.
    let (queues, exchanges, bindings, consumers) = std::thread::scope(|s| {
        let q = s.spawn(broker::list_queues);
        let x = s.spawn(broker::list_exchanges);
        let b = s.spawn(broker::list_bindings);
        let c = broker::list_consumers();
        (q.join().unwrap(), x.join().unwrap(), b.join().unwrap(), c)
    });
    let queue = queues.unwrap().into_iter().find(|i| i.name == q).unwrap();
    assert!(queue.exclusive && !queue.durable && !queue.auto_delete);
    assert_eq!(
        queue.arguments,
        r#"{"x-max-length":10,"x-queue-type":"classic"}"#
    );
    assert_eq!(queue.consumers, 1);
    assert_eq!(queue.messages, 0);
    let exchange = exchanges.unwrap().into_iter().find(|e| e.0 == x).unwrap();
    assert_eq!(
        exchange,
        (
            x.clone(),
            "topic".into(),
            false,
            true,
            r#"{"alternate-exchange":"amq.fanout"}"#.into()
        )
    );
    let bindings = bindings.unwrap();
    let bound: Vec<_> = bindings.iter().filter(|b| b.destination == q).collect();
    assert_eq!(bound.len(), 2, "{bound:?}"); // the default exchange's, and ours
    let ours = bound.iter().find(|b| b.source == x).unwrap();
    assert_eq!(ours.routing_key, "k.#");
    assert_eq!(ours.destination_kind, "queue");
    assert_eq!(ours.arguments, r#"{"a":1,"b":true}"#);
    let consumer = consumers
        .unwrap()
        .into_iter()
        .find(|c| c.queue == q)
        .unwrap();
    assert_eq!(consumer.tag, format!("{name}-tag"));
    assert!(consumer.ack_required);
    assert_eq!(consumer.prefetch_count, 7);
    assert_eq!(consumer.arguments, r#"{"x-priority":3}"#);
    let pid = &consumer.channel_pid;
    assert!(
        pid.starts_with('<') && pid.ends_with('>') && !pid.contains('@'),
        "{pid}"
    );

    assert_eq!(broker::close_connections_named(&name).unwrap(), 1);
    tokio::time::timeout(WAIT, conn.closed())
        .await
        .expect("connection not closed by the broker");
    assert!(p.wait_live(0, WAIT).await);
}
