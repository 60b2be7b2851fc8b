//! The `memory` and `library` scenarios: kelp's high-level API (Producer / Consumer /
//! Message), on `memory://` against a `tokio::sync::mpsc` pass-through, and on `amqp://`
//! against kelp-amqp alone.

use bytes::Bytes;
use kelp::{Connection, Consumer, DeliveryMode, Producer, PublishOptions, Queue};

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

/// Publish `count` raw bodies with a Producer while a Consumer on another channel takes and
/// acks each; timed from the first publish to the last ack.
pub async fn memory(count: u64) -> BenchResult<Measurement> {
    let url = format!("memory://{}", fresh_queue_name("kelp", "memory"));
    let conn = Connection::open(&url).await?;
    let (pch, cch) = (conn.channel().await?, conn.channel().await?);
    let queue = "bench";
    cch.declare_queue(Queue::new(queue)).await?;
    let mut consumer = raw_consumer(&cch, queue).await?;
    let producer = Producer::new(&pch).routing_key(queue);

    let timer = Timer::start()?;
    let publishing = tokio::spawn(async move {
        for _ in 0..count {
            producer
                .publish(payload(), PublishOptions::default())
                .await?;
        }
        Ok::<_, kelp::Error>(())
    });
    for _ in 0..count {
        let mut msg = consumer
            .next()
            .await
            .ok_or("kelp memory: consumer ended early")??;
        msg.ack().await?;
    }
    publishing.await??;
    let m = timer.stop(count)?;
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
    let mut got = 0u64;
    while got < count {
        match rx.recv().await {
            Some(b) => {
                std::hint::black_box(b);
                got += 1;
            }
            None => break,
        }
    }
    sending.await?;
    let m = timer.stop(count)?;
    if got != count {
        return Err(format!("mpsc: {got} of {count} received").into());
    }
    Ok(m)
}

fn transient() -> PublishOptions {
    PublishOptions::default().delivery_mode(DeliveryMode::Transient)
}

/// Polls a passive declare until the broker reports `count` messages.
async fn wait_enqueued(ch: &kelp::Channel, queue: &str, count: u64) -> BenchResult<()> {
    loop {
        let got = u64::from(
            Queue::new(queue)
                .passive(true)
                .declare(ch)
                .await?
                .message_count,
        );
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
pub async fn amqp_consume(opts: &Opts) -> BenchResult<Measurement> {
    let conn = Connection::open(&opts.url).await?;
    let ch = conn.channel().await?;
    let queue = fresh_queue_name("kelp-lib", "consume");
    ch.declare_queue(Queue::new(queue.as_str()).durable(false))
        .await?;
    let producer = Producer::new(&ch).routing_key(queue.as_str());
    for _ in 0..opts.count {
        producer.publish(payload(), transient()).await?;
    }
    wait_enqueued(&ch, &queue, opts.count).await?;
    let cch = conn.channel().await?;
    let timer = Timer::start()?;
    let mut consumer = raw_consumer(&cch, &queue).await?;
    for _ in 0..opts.count {
        let mut msg = consumer
            .next()
            .await
            .ok_or("kelp library: consumer ended early")??;
        msg.ack().await?;
    }
    let m = timer.stop(opts.count)?;
    consumer.cancel().await?;
    Queue::new(queue.as_str()).delete(&ch, false, false).await?;
    conn.close().await?;
    Ok(m)
}
