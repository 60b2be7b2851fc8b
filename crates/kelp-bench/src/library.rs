//! The `memory` and `library` scenarios: kelp's high-level API (Producer / Consumer /
//! Message), on `memory://` against a `tokio::sync::mpsc` pass-through, and on `amqp://`
//! against kelp-amqp alone.

use std::sync::atomic::{AtomicU64, Ordering};

use bytes::Bytes;
use kelp::amqp::BasicProperties;
use kelp::{Connection, Consumer, DeliveryMode, Producer, PublishOptions, Queue};

use crate::common::{ack_each, expect_body_bytes, queue_size};
use crate::report::{Measurement, Timer};
use crate::{fresh_queue_name, BenchResult, Opts, PAYLOAD, POLL_INTERVAL, PREFETCH};

fn payload() -> Bytes {
    Bytes::from_static(&PAYLOAD)
}

async fn raw_consumer(ch: &kelp::Channel, queue: &str) -> BenchResult<Consumer> {
    Ok(Consumer::builder(ch)
        .queue(Queue::new(queue))
        .prefetch_count(PREFETCH)
        .auto_declare(false)
        .build()
        .await?)
}

/// A `memory://` broker no other run shares.
fn memory_url() -> String {
    static RUN: AtomicU64 = AtomicU64::new(0);
    format!(
        "memory://bench-{}-{}",
        std::process::id(),
        RUN.fetch_add(1, Ordering::Relaxed)
    )
}

/// Publish `count` raw bodies with a Producer while a Consumer on another channel takes and
/// acks each; timed from the first publish to the last ack.
///
/// A memory publish never waits, so a publishing loop would never yield: on one thread it
/// would publish all `count` before the consumer ran once (a backlog of ~1M messages, half a
/// gigabyte, measured instead of the pipeline). `consume_budget` after each publish makes it
/// yield where a tokio channel's `send` would, every 128 operations, so producer and consumer
/// take turns and the queue stays short, as in the mpsc reference.
pub async fn memory(count: u64) -> BenchResult<Measurement> {
    let conn = Connection::open(&memory_url()).await?;
    let (pch, cch) = (conn.channel().await?, conn.channel().await?);
    let queue = "bench";
    cch.declare_queue(Queue::new(queue)).await?;
    let mut consumer = raw_consumer(&cch, queue).await?;
    let producer = Producer::new(&pch).routing_key(queue).serializer("raw");

    let timer = Timer::start()?;
    let publishing = tokio::spawn(async move {
        for _ in 0..count {
            producer
                .publish(payload(), PublishOptions::default())
                .await?;
            tokio::task::consume_budget().await;
        }
        Ok::<_, kelp::Error>(())
    });
    let bytes = ack_each(&mut consumer, count, "kelp memory").await?;
    publishing.await??;
    let m = timer.stop(count)?;
    expect_body_bytes("kelp memory", bytes, count)?;
    conn.close().await?;
    Ok(m)
}

/// The physical reference for `memory`: the same bodies through a bounded mpsc channel.
pub async fn mpsc(count: u64) -> BenchResult<Measurement> {
    let (tx, mut rx) = tokio::sync::mpsc::channel::<Bytes>(usize::from(PREFETCH));
    let timer = Timer::start()?;
    let sending = tokio::spawn(async move {
        for _ in 0..count {
            if tx.send(payload()).await.is_err() {
                break;
            }
        }
    });
    let (mut got, mut bytes) = (0u64, 0usize);
    while got < count {
        match rx.recv().await {
            Some(b) => {
                bytes += b.len();
                got += 1;
            }
            None => break,
        }
    }
    sending.await?;
    let m = timer.stop(count)?;
    if got != count || bytes as u64 != count * PAYLOAD.len() as u64 {
        return Err(format!("mpsc: {got} of {count} received ({bytes} bytes)").into());
    }
    Ok(m)
}

fn transient() -> PublishOptions {
    PublishOptions::default().delivery_mode(DeliveryMode::Transient)
}

/// Polls a passive declare until the broker reports `count` messages.
async fn wait_enqueued(ch: &kelp::Channel, queue: &str, count: u64) -> BenchResult<()> {
    loop {
        let got = queue_size(ch, queue).await?;
        if got == count {
            return Ok(());
        }
        if got > count {
            return Err(format!("queue {queue} holds {got} messages, expected {count}").into());
        }
        tokio::time::sleep(POLL_INTERVAL).await;
    }
}

/// `publish` through the library: a Producer with serializer `raw` to a fresh queue, timed
/// until the broker holds all (the same work as kelp-amqp's `publish`).
pub async fn amqp_publish(opts: &Opts) -> BenchResult<Measurement> {
    let conn = Connection::open(&opts.url).await?;
    let ch = conn.channel().await?;
    let queue = fresh_queue_name("kelp-lib", "publish");
    // The same work as kelp_client: a non-durable queue, transient messages (Kombu's
    // defaults, durable + persistent, would make the broker write to disk).
    ch.declare_queue(Queue::new(queue.as_str()).durable(false))
        .await?;
    let producer = Producer::new(&ch)
        .routing_key(queue.as_str())
        .serializer("raw");
    let timer = Timer::start()?;
    for _ in 0..opts.count {
        producer.publish(payload(), transient()).await?;
    }
    wait_enqueued(&ch, &queue, opts.count).await?;
    let m = timer.stop(opts.count)?;
    Queue::new(queue.as_str()).delete(&ch, false, false).await?;
    conn.close().await?;
    Ok(m)
}

/// `consume` through the library: prefill (untimed), then a Consumer with prefetch 1000 acks
/// each message, timed until all are received.
///
/// The prefill is the kelp-amqp side's: the same bodies with no properties, published on the
/// transport channel. A Producer would add content type, encoding, delivery mode and headers,
/// which every delivery then carries and the consumer decodes: a difference in the messages,
/// not in the consuming layer this compares.
pub async fn amqp_consume(opts: &Opts) -> BenchResult<Measurement> {
    let conn = Connection::open(&opts.url).await?;
    let ch = conn.channel().await?;
    let queue = fresh_queue_name("kelp-lib", "consume");
    ch.declare_queue(Queue::new(queue.as_str()).durable(false))
        .await?;
    for _ in 0..opts.count {
        ch.raw()
            .publish("", &queue, false, BasicProperties::default(), payload())
            .await?;
    }
    wait_enqueued(&ch, &queue, opts.count).await?;
    let cch = conn.channel().await?;
    let timer = Timer::start()?;
    let mut consumer = raw_consumer(&cch, &queue).await?;
    ack_each(&mut consumer, opts.count, "kelp library").await?;
    let m = timer.stop(opts.count)?;
    consumer.cancel().await?;
    Queue::new(queue.as_str()).delete(&ch, false, false).await?;
    conn.close().await?;
    Ok(m)
}
