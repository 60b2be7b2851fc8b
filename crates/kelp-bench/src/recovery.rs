//! The `recovery` scenario: how long after RabbitMQ accepts connections again (after a
//! `rabbitmqctl stop_app` / `start_app`) a kelp robust Consumer gets its first delivery,
//! while a robust Producer on a second connection keeps publishing persistent messages.
//!
//! Restarts the local broker `count` times, so it is not part of `all`. A [`BrokerGuard`]
//! runs `rabbitmqctl start_app` on the way out if the broker is not answering, whatever the
//! exit path (error, timeout, panic).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use kelp::recovery::{ReconnectPolicy, RecoveryOptions};
use kelp::{Connection, Consumer, DeliveryMode, Producer, PublishOptions, Queue};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::{BenchResult, PAYLOAD};

const QUEUE: &str = "kelp-bench-recovery";
/// The broker the bench restarts (the local node `rabbitmqctl` talks to).
const BROKER_ADDR: &str = "127.0.0.1:5672";
const STEP: Duration = Duration::from_millis(100);
const STEP_MAX: Duration = Duration::from_millis(500);
/// How long the broker stays stopped.
const DOWN_FOR: Duration = Duration::from_millis(500);
const BETWEEN_ROUNDS: Duration = Duration::from_secs(1);
const PROBE_INTERVAL: Duration = Duration::from_millis(2);
const PROBE_TIMEOUT: Duration = Duration::from_millis(500);
const BACK_TIMEOUT: Duration = Duration::from_secs(60);
const DELIVERY_TIMEOUT: Duration = Duration::from_secs(120);

/// On drop: `rabbitmqctl start_app` unless the broker's port answers.
struct BrokerGuard;

impl Drop for BrokerGuard {
    fn drop(&mut self) {
        let answering = BROKER_ADDR
            .parse()
            .ok()
            .and_then(|addr| {
                std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(1)).ok()
            })
            .is_some();
        if !answering {
            eprintln!("recovery: broker not answering, running rabbitmqctl start_app");
            if let Err(e) = rabbitmqctl("start_app") {
                eprintln!("recovery: rabbitmqctl start_app failed: {e}");
            }
        }
    }
}

fn rabbitmqctl(cmd: &str) -> BenchResult<()> {
    let out = std::process::Command::new("rabbitmqctl")
        .arg(cmd)
        .output()?;
    if !out.status.success() {
        return Err(format!(
            "rabbitmqctl {cmd}: {}: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        )
        .into());
    }
    Ok(())
}

async fn rabbitmqctl_async(cmd: &'static str) -> BenchResult<()> {
    tokio::task::spawn_blocking(move || rabbitmqctl(cmd)).await?
}

/// Does the broker accept a TCP connection and answer an AMQP protocol header?
async fn handshake_starts() -> bool {
    let attempt = async {
        let mut sock = tokio::net::TcpStream::connect(BROKER_ADDR).await?;
        sock.write_all(b"AMQP\x00\x00\x09\x01").await?;
        let mut buf = [0u8; 64];
        let n = sock.read(&mut buf).await?;
        std::io::Result::Ok(n > 0)
    };
    matches!(
        tokio::time::timeout(PROBE_TIMEOUT, attempt).await,
        Ok(Ok(true))
    )
}

/// The instant the broker answers again.
async fn wait_broker_back() -> BenchResult<Instant> {
    let deadline = Instant::now() + BACK_TIMEOUT;
    loop {
        if handshake_starts().await {
            return Ok(Instant::now());
        }
        if Instant::now() > deadline {
            return Err(format!("broker not back after {BACK_TIMEOUT:?}").into());
        }
        tokio::time::sleep(PROBE_INTERVAL).await;
    }
}

/// Wait until `consumed` exceeds `base`.
async fn wait_consumed(consumed: &AtomicU64, base: u64) -> BenchResult<Instant> {
    let deadline = Instant::now() + DELIVERY_TIMEOUT;
    loop {
        if consumed.load(Ordering::Acquire) > base {
            return Ok(Instant::now());
        }
        if Instant::now() > deadline {
            return Err(format!("no delivery within {DELIVERY_TIMEOUT:?}").into());
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

async fn robust_connection(url: &str) -> BenchResult<Connection> {
    Ok(Connection::builder()
        .url(url)
        .heartbeat(Duration::from_secs(2))
        .connect_timeout(Duration::from_secs(3))
        .recovery(
            RecoveryOptions::default()
                .reconnect(
                    ReconnectPolicy::default()
                        .interval_step(STEP)
                        .interval_max(STEP_MAX),
                )
                .outage_timeout(Duration::from_secs(120)),
        )
        .connect()
        .await?)
}

fn queue() -> Queue {
    Queue::new(QUEUE).durable(true)
}

/// `restarts` broker restarts; returns the result line.
pub async fn recovery(url: &str, restarts: u64) -> BenchResult<String> {
    let _guard = BrokerGuard;
    let cconn = robust_connection(url).await?;
    let pconn = robust_connection(url).await?;
    let cch = cconn.channel().await?;
    let bound = cch.declare_queue(queue()).await?;
    let mut consumer = Consumer::builder(&cch)
        .queue(queue())
        .prefetch_count(100)
        .build()
        .await?;

    let consumed = Arc::new(AtomicU64::new(0));
    let counter = Arc::clone(&consumed);
    let consuming = tokio::spawn(async move {
        while let Some(next) = consumer.next().await {
            // An error here is the outage as the consumer sees it: recovery carries on.
            if let Ok(mut msg) = next {
                // StaleDelivery after a reconnect: the broker redelivers it.
                msg.ack().await.ok();
                counter.fetch_add(1, Ordering::Release);
            }
        }
    });

    let pch = pconn.channel().await?;
    pch.confirm_select().await?;
    let producer = Producer::new(&pch);
    let publishing = tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_millis(1));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let opts = PublishOptions::default()
                .routing_key(QUEUE)
                .delivery_mode(DeliveryMode::Persistent);
            // Waits through the outage by itself; a failed publish is simply not counted.
            producer.publish(&PAYLOAD[..], opts).await.ok();
        }
    });

    let result = async {
        // Flowing before the first restart.
        wait_consumed(&consumed, 0).await?;
        let mut samples = Vec::new();
        for _ in 0..restarts {
            rabbitmqctl_async("stop_app").await?;
            tokio::time::sleep(DOWN_FOR).await;
            // Deliveries buffered before the stop are consumed by now: any later one came
            // after the restart.
            let base = consumed.load(Ordering::Acquire);
            let starting = tokio::spawn(rabbitmqctl_async("start_app"));
            let back = wait_broker_back().await?;
            let first = wait_consumed(&consumed, base).await?;
            starting.await??;
            samples.push(first.saturating_duration_since(back));
            tokio::time::sleep(BETWEEN_ROUNDS).await;
        }
        BenchResult::Ok(samples)
    }
    .await;

    publishing.abort();
    consuming.abort();
    let samples = result?;
    bound.delete(false, false).await?;
    pconn.close().await.ok();
    cconn.close().await.ok();
    format_result(samples)
}

fn format_result(mut samples: Vec<Duration>) -> BenchResult<String> {
    samples.sort();
    let (Some(min), Some(max)) = (samples.first(), samples.last()) else {
        return Err("no restarts".into());
    };
    let p50 = samples[(samples.len() - 1) / 2];
    let ms = |d: &Duration| d.as_millis();
    Ok(format!(
        "recovery  broker back -> first delivery  p50 {} ms  (min {} ms, max {} ms, {} restarts; \
         reconnect backoff step {} ms, max {} ms)",
        ms(&p50),
        ms(min),
        ms(max),
        samples.len(),
        ms(&STEP),
        ms(&STEP_MAX)
    ))
}
