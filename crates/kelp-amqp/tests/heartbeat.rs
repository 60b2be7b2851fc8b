//! Heartbeats against the real RabbitMQ, through a loopback TCP proxy that can stall the link
//! (stop forwarding both ways while keeping both sockets open, like a dead NAT or a pulled cable).
//!
//! Its own test binary: the tests sleep for seconds and measure time.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod common;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use kelp_amqp::options::*;
use kelp_amqp::{BasicProperties, Confirmation, Connection, Error, FieldTable};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const LIMIT: Duration = Duration::from_secs(10);

/// Bytes forwarded, per direction.
#[derive(Debug, Default)]
struct Counters {
    to_server: AtomicU64,
    to_client: AtomicU64,
}

#[derive(Debug)]
struct Proxy {
    addr: SocketAddr,
    stalled: Arc<AtomicBool>,
    counters: Arc<Counters>,
}

impl Proxy {
    /// Listen on 127.0.0.1:0 and forward every accepted connection to the broker.
    async fn start() -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let stalled = Arc::new(AtomicBool::new(false));
        let counters = Arc::new(Counters::default());
        let (s, c) = (stalled.clone(), counters.clone());
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let Ok(server) = TcpStream::connect(common::amqp_addr()).await else {
                    continue;
                };
                let _ = client.set_nodelay(true);
                let _ = server.set_nodelay(true);
                let (cr, cw) = client.into_split();
                let (sr, sw) = server.into_split();
                tokio::spawn(pump(cr, sw, s.clone(), c.clone(), true));
                tokio::spawn(pump(sr, cw, s.clone(), c.clone(), false));
            }
        });
        Proxy {
            addr,
            stalled,
            counters,
        }
    }

    fn url(&self, query: &str) -> String {
        format!("amqp://guest:guest@{}/%2f?{query}", self.addr)
    }

    /// Stop forwarding in both directions; the sockets stay open.
    fn stall(&self) {
        self.stalled.store(true, Ordering::SeqCst);
    }

    fn bytes(&self) -> (u64, u64) {
        (
            self.counters.to_server.load(Ordering::SeqCst),
            self.counters.to_client.load(Ordering::SeqCst),
        )
    }
}

async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    stalled: Arc<AtomicBool>,
    counters: Arc<Counters>,
    to_server: bool,
) {
    let mut buf = vec![0u8; 64 << 10];
    loop {
        // Stalled: neither read nor write (data already read is held, never forwarded).
        while stalled.load(Ordering::SeqCst) {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        while stalled.load(Ordering::SeqCst) {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        if to.write_all(&buf[..n]).await.is_err() {
            break;
        }
        let c = if to_server {
            &counters.to_server
        } else {
            &counters.to_client
        };
        c.fetch_add(n as u64, Ordering::SeqCst);
    }
    let _ = to.shutdown().await;
}

fn excl() -> QueueDeclareOptions {
    QueueDeclareOptions {
        exclusive: true,
        ..Default::default()
    }
}

#[tokio::test]
async fn stalled_link_is_detected_as_missed_heartbeats() {
    require_rabbitmq!("stalled_link_is_detected_as_missed_heartbeats");
    let proxy = Proxy::start().await;
    let conn = common::within(
        "connect",
        LIMIT,
        Connection::open(&proxy.url("heartbeat=1")),
    )
    .await
    .unwrap();
    assert_eq!(conn.tuning().heartbeat, Duration::from_secs(1));
    let ch = conn.channel().await.unwrap();
    let q = ch
        .queue_declare("", excl(), FieldTable::new())
        .await
        .unwrap()
        .queue;
    let mut consumer = ch
        .basic_consume(&q, ConsumeOptions::default())
        .await
        .unwrap();
    let other = conn.channel().await.unwrap();
    other.confirm_select().await.unwrap();
    assert!(!conn.is_closed());

    // The last reply just arrived: from here on the server is silent for us.
    proxy.stall();
    let stalled_at = Instant::now();

    // A call made during the stall waits for a reply that cannot come...
    let pending = {
        let other = other.clone();
        tokio::spawn(async move {
            let r = other.queue_declare("", excl(), FieldTable::new()).await;
            (r, Instant::now())
        })
    };
    // ...and so does a publish confirm.
    let confirm = other
        .basic_publish(
            "",
            &q,
            PublishOptions::default(),
            BasicProperties::default(),
            "stuck",
        )
        .await
        .unwrap();

    let item = common::within("consumer during stall", LIMIT, consumer.recv()).await;
    let detected = stalled_at.elapsed();
    let err = match item {
        Some(Err(e)) => e,
        other => panic!("consumer should end with an error, got {other:?}"),
    };
    match &err {
        Error::MissedHeartbeats(silence) => {
            assert!(*silence >= Duration::from_secs(2), "{err}");
        }
        other => panic!("expected MissedHeartbeats, got {other:?}"),
    }
    assert!(
        detected >= Duration::from_millis(1500),
        "detected after {detected:?}: too early for heartbeat=1"
    );
    assert!(
        detected <= Duration::from_millis(3500),
        "detected after {detected:?}: later than 2 x heartbeat + margin"
    );
    assert!(err.is_connection_error());
    assert!(consumer.recv().await.is_none());

    // The connection says so.
    assert!(conn.is_closed());
    assert!(matches!(
        conn.close_error(),
        Some(Error::MissedHeartbeats(_))
    ));
    assert!(ch.is_closed() && other.is_closed());

    // The pending call failed with it, at detection time (not later, not hanging).
    let (r, at) = common::within("pending call", LIMIT, pending)
        .await
        .unwrap();
    let e = r.unwrap_err();
    assert!(matches!(e, Error::MissedHeartbeats(_)), "{e:?}");
    assert!(
        at.duration_since(stalled_at) <= Duration::from_millis(3500),
        "pending call failed only after {:?}",
        at.duration_since(stalled_at)
    );
    let c = common::within("confirm during stall", Duration::from_secs(1), confirm).await;
    assert!(
        matches!(c, Err(Error::MissedHeartbeats(_))),
        "confirm of a publish during the stall: {c:?}"
    );

    // New calls fail at once.
    let fast = Duration::from_millis(500);
    let e = common::within(
        "call after detection",
        fast,
        ch.queue_declare("", excl(), FieldTable::new()),
    )
    .await
    .unwrap_err();
    assert!(matches!(e, Error::MissedHeartbeats(_)), "{e:?}");
    let e = common::within("channel after detection", fast, conn.channel())
        .await
        .unwrap_err();
    assert!(matches!(e, Error::MissedHeartbeats(_)), "{e:?}");
}

#[tokio::test]
async fn idle_connection_with_heartbeat_1_stays_alive() {
    require_rabbitmq!("idle_connection_with_heartbeat_1_stays_alive");
    let proxy = Proxy::start().await;
    let conn = common::within(
        "connect",
        LIMIT,
        Connection::open(&proxy.url("heartbeat=1")),
    )
    .await
    .unwrap();
    assert_eq!(conn.tuning().heartbeat, Duration::from_secs(1));
    let ch = conn.channel().await.unwrap();
    let (sent0, recv0) = proxy.bytes();
    tokio::time::sleep(Duration::from_secs(4)).await;
    let (sent1, recv1) = proxy.bytes();
    // Heartbeat frames are 8 bytes, sent by each side after half an interval of silence:
    // about 8 each way in 4 s. Without ours, RabbitMQ would have closed the connection.
    let (hb_out, hb_in) = ((sent1 - sent0) / 8, (recv1 - recv0) / 8);
    assert!(hb_out >= 4, "client sent only {hb_out} heartbeats in 4 s");
    assert!(hb_in >= 4, "server sent only {hb_in} heartbeats in 4 s");
    assert!(!conn.is_closed(), "{:?}", conn.close_error());
    assert!(!ch.is_closed());
    let q = common::within(
        "declare after idling",
        LIMIT,
        ch.queue_declare("", excl(), FieldTable::new()),
    )
    .await
    .unwrap();
    assert!(q.queue.starts_with("amq.gen-"));
    conn.close().await.unwrap();
}

/// A consumer that does not take its deliveries for a while makes the connection stop reading
/// (backpressure). The server is alive and its heartbeats are waiting in our socket buffer: that
/// must not be reported as missed heartbeats.
#[tokio::test]

async fn slow_consumer_is_not_mistaken_for_a_dead_server() {
    require_rabbitmq!("slow_consumer_is_not_mistaken_for_a_dead_server");
    // The publisher is another connection: with this one not reading, its confirms could not
    // arrive either (all channels share the socket).
    let publisher = common::within("connect", LIMIT, Connection::open(&common::amqp_url()))
        .await
        .unwrap();
    let pch = publisher.channel().await.unwrap();
    pch.confirm_select().await.unwrap();
    let q = common::unique("slow-consumer");
    pch.queue_declare(
        &q,
        QueueDeclareOptions {
            auto_delete: true,
            ..Default::default()
        },
        FieldTable::new(),
    )
    .await
    .unwrap();
    for i in 0..5 {
        let c = pch
            .basic_publish(
                "",
                &q,
                PublishOptions::default(),
                BasicProperties::default(),
                format!("m{i}"),
            )
            .await
            .unwrap();
        assert_eq!(c.await.unwrap(), Confirmation::Ack);
    }

    let url = common::amqp_url_with("guest", "guest", "%2f", "heartbeat=1");
    let conn = common::within("connect", LIMIT, Connection::open(&url))
        .await
        .unwrap();
    let ch = conn.channel().await.unwrap();
    let mut consumer = ch
        .basic_consume(
            &q,
            ConsumeOptions {
                no_ack: true,
                buffer: Some(1),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    // Busy with something else for 3 heartbeat intervals.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let mut got = Vec::new();
    while got.len() < 5 {
        match common::within("delivery", LIMIT, consumer.recv()).await {
            Some(Ok(d)) => got.push(String::from_utf8(d.body.to_vec()).unwrap()),
            Some(Err(e)) => panic!("after {got:?} the consumer failed: {e}"),
            None => panic!(
                "after {got:?} the consumer ended; the connection closed with {:?}",
                conn.close_error()
            ),
        }
    }
    assert_eq!(got, ["m0", "m1", "m2", "m3", "m4"]);
    assert!(!conn.is_closed(), "{:?}", conn.close_error());
    ch.queue_declare("", excl(), FieldTable::new())
        .await
        .unwrap();
    conn.close().await.unwrap();
    let _ = pch.queue_delete(&q, QueueDeleteOptions::default()).await;
    publisher.close().await.unwrap();
}

#[tokio::test]
async fn heartbeat_0_disables_heartbeats() {
    require_rabbitmq!("heartbeat_0_disables_heartbeats");
    let proxy = Proxy::start().await;
    let conn = common::within(
        "connect",
        LIMIT,
        Connection::open(&proxy.url("heartbeat=0")),
    )
    .await
    .unwrap();
    assert_eq!(conn.tuning().heartbeat, Duration::ZERO);
    let ch = conn.channel().await.unwrap();
    let (sent0, recv0) = proxy.bytes();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(
        proxy.bytes(),
        (sent0, recv0),
        "frames flowed on an idle link"
    );
    ch.queue_declare("", excl(), FieldTable::new())
        .await
        .unwrap();
    conn.close().await.unwrap();
}
