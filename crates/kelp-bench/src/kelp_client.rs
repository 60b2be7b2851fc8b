//! The kelp-amqp side of each scenario (behind the `kelp` feature, on by default).
//!
//! Written against the kelp-amqp API as specified for the engine: names are passed as
//! `&str`, bodies as `bytes::Bytes`.

use std::collections::VecDeque;
use std::time::Instant;

use bytes::Bytes;
use kelp_amqp::options::{
    ConsumeOptions, PublishOptions, QosOptions, QueueDeclareOptions, QueueDeleteOptions,
};
use kelp_amqp::{
    BasicProperties, Channel, Confirmation, Connection, Consumer, Delivery, FieldTable,
    PublishConfirm,
};

use crate::report::{Measurement, Percentiles, Timer};
use crate::{fresh_queue_name, BenchResult, Opts, PAYLOAD, POLL_INTERVAL, PREFETCH};

fn payload() -> Bytes {
    Bytes::from_static(&PAYLOAD)
}

async fn connect(url: &str) -> BenchResult<(Connection, Channel)> {
    let conn = Connection::open(url).await?;
    let ch = conn.channel().await?;
    Ok((conn, ch))
}

async fn publish_one(ch: &Channel, routing_key: &str) -> BenchResult<PublishConfirm> {
    Ok(ch
        .basic_publish(
            "",
            routing_key,
            PublishOptions::default(),
            BasicProperties::default(),
            payload(),
        )
        .await?)
}

/// Outside confirm mode the returned [`PublishConfirm`] is already resolved (to
/// `NotRequested`): there is nothing to wait for, so it is dropped.
async fn publish_unconfirmed(ch: &Channel, routing_key: &str) -> BenchResult<()> {
    let _not_requested: PublishConfirm = publish_one(ch, routing_key).await?;
    Ok(())
}

/// Polls a passive queue.declare until the broker reports `count` messages.
async fn wait_enqueued(ch: &Channel, queue: &str, count: u64) -> BenchResult<()> {
    loop {
        let passive = QueueDeclareOptions {
            passive: true,
            ..QueueDeclareOptions::default()
        };
        let got = u64::from(
            ch.queue_declare(queue, passive, FieldTable::default())
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

async fn settle(pending: PublishConfirm) -> BenchResult<()> {
    match pending.await? {
        Confirmation::Nack => Err("kelp-amqp: broker nacked a publish".into()),
        _ => Ok(()),
    }
}

/// `publish` (no confirms, timed until the broker holds all) or `confirm` (timed until all acked).
pub async fn publish(opts: &Opts, confirm: bool) -> BenchResult<Measurement> {
    let (conn, ch) = connect(&opts.url).await?;
    let queue = fresh_queue_name("kelp", if confirm { "confirm" } else { "publish" });
    ch.queue_declare(
        &queue,
        QueueDeclareOptions::default(),
        FieldTable::default(),
    )
    .await?;
    if confirm {
        ch.confirm_select().await?;
    }

    let timer = Timer::start()?;
    if confirm {
        let mut window: VecDeque<PublishConfirm> = VecDeque::with_capacity(opts.window);
        for _ in 0..opts.count {
            if window.len() >= opts.window {
                if let Some(pending) = window.pop_front() {
                    settle(pending).await?;
                }
            }
            window.push_back(publish_one(&ch, &queue).await?);
        }
        while let Some(pending) = window.pop_front() {
            settle(pending).await?;
        }
    } else {
        for _ in 0..opts.count {
            publish_unconfirmed(&ch, &queue).await?;
        }
        wait_enqueued(&ch, &queue, opts.count).await?;
    }
    let m = timer.stop(opts.count)?;

    ch.queue_delete(&queue, QueueDeleteOptions::default())
        .await?;
    conn.close().await?;
    Ok(m)
}

async fn next_delivery(consumer: &mut Consumer) -> BenchResult<Delivery> {
    Ok(consumer
        .recv()
        .await
        .ok_or("kelp-amqp: consumer ended early")??)
}

/// Prefill (untimed), then consume with prefetch 1000 and ack each, timed until all received.
pub async fn consume(opts: &Opts) -> BenchResult<Measurement> {
    let (conn, ch) = connect(&opts.url).await?;
    let queue = fresh_queue_name("kelp", "consume");
    ch.queue_declare(
        &queue,
        QueueDeclareOptions::default(),
        FieldTable::default(),
    )
    .await?;
    for _ in 0..opts.count {
        publish_unconfirmed(&ch, &queue).await?;
    }
    wait_enqueued(&ch, &queue, opts.count).await?;

    let timer = Timer::start()?;
    ch.basic_qos(PREFETCH, QosOptions::default()).await?;
    let mut consumer = ch.basic_consume(&queue, ConsumeOptions::default()).await?;
    for _ in 0..opts.count {
        let delivery = next_delivery(&mut consumer).await?;
        ch.basic_ack(delivery.delivery_tag, false).await?;
    }
    let m = timer.stop(opts.count)?;

    ch.queue_delete(&queue, QueueDeleteOptions::default())
        .await?;
    conn.close().await?;
    Ok(m)
}

/// Sequential request/reply round trips between two connections.
pub async fn rpc(opts: &Opts) -> BenchResult<Measurement> {
    // Server side: consumes requests, replies to reply_to with the same correlation id.
    let (server_conn, server_ch) = connect(&opts.url).await?;
    let request_queue = fresh_queue_name("kelp", "rpc");
    server_ch
        .queue_declare(
            &request_queue,
            QueueDeclareOptions::default(),
            FieldTable::default(),
        )
        .await?;
    let mut requests = server_ch
        .basic_consume(&request_queue, ConsumeOptions::default())
        .await?;

    // Client side: an exclusive, server-named reply queue.
    let (client_conn, client_ch) = connect(&opts.url).await?;
    let exclusive = QueueDeclareOptions {
        exclusive: true,
        ..QueueDeclareOptions::default()
    };
    let reply_queue = client_ch
        .queue_declare("", exclusive, FieldTable::default())
        .await?
        .queue;
    let mut replies = client_ch
        .basic_consume(reply_queue.as_str(), ConsumeOptions::default())
        .await?;

    let count = opts.count;
    let server = tokio::spawn(async move {
        for _ in 0..count {
            let request = next_delivery(&mut requests).await?;
            let reply_to = request
                .properties
                .reply_to
                .as_ref()
                .ok_or("kelp rpc: request without reply_to")?;
            let mut props = BasicProperties::default();
            if let Some(id) = &request.properties.correlation_id {
                props = props.with_correlation_id(id.as_str());
            }
            let reply = server_ch.basic_publish(
                "",
                reply_to.as_str(),
                PublishOptions::default(),
                props,
                request.body.clone(),
            );
            let _not_requested: PublishConfirm = reply.await?;
            server_ch.basic_ack(request.delivery_tag, false).await?;
        }
        BenchResult::Ok(server_conn)
    });

    let mut latencies = Vec::with_capacity(usize::try_from(count)?);
    let timer = Timer::start()?;
    for i in 0..count {
        let correlation_id = i.to_string();
        let props = BasicProperties::default()
            .with_reply_to(reply_queue.as_str())
            .with_correlation_id(correlation_id.as_str());
        let sent = Instant::now();
        let request = client_ch.basic_publish(
            "",
            &request_queue,
            PublishOptions::default(),
            props,
            payload(),
        );
        let _not_requested: PublishConfirm = request.await?;
        let reply = next_delivery(&mut replies).await?;
        latencies.push(sent.elapsed());
        let got = reply
            .properties
            .correlation_id
            .as_ref()
            .map(|id| id.as_str());
        if got != Some(correlation_id.as_str()) {
            return Err(format!("kelp rpc: reply {got:?} to request {i}").into());
        }
        client_ch.basic_ack(reply.delivery_tag, false).await?;
    }
    let m = timer
        .stop(count)?
        .with_latency(Percentiles::from_samples(&mut latencies));

    let server_conn = server.await??;
    client_ch
        .queue_delete(&request_queue, QueueDeleteOptions::default())
        .await?;
    client_conn.close().await?;
    server_conn.close().await?;
    Ok(m)
}

/// `sink`: publishes to the fake server, timed until its close-ok.
pub async fn sink(url: &str, count: u64) -> BenchResult<Measurement> {
    let (conn, ch) = connect(url).await?;
    let timer = Timer::start()?;
    for _ in 0..count {
        publish_unconfirmed(&ch, "bench-q").await?;
    }
    conn.close().await?;
    timer.stop(count)
}

/// `decode`: feed the recorded stream (see [`crate::decode::record_deliveries`]: a
/// basic.deliver, a content header and a body frame per delivery, channel 1) through
/// kelp-amqp's frame decoder and return how many deliveries came out. The bench treats 0 as
/// "not wired up yet". It runs the engine's whole input path (frame decode, content assembly,
/// delivery events), fed in 64 KiB reads copied into the read buffer as a socket read would.
pub fn kelp_decode(stream: &bytes::Bytes) -> usize {
    use kelp_amqp::codec::{
        encode_method, ChannelOpenOk, ConnectionOpenOk, ConnectionStart, ConnectionTune,
        FieldTable, Method,
    };
    use kelp_amqp::engine::{Config, Engine, Event};
    use std::time::Instant;
    let now = Instant::now();
    let mut engine: Engine<()> = Engine::new(
        Config {
            heartbeat: Some(0),
            ..Config::default()
        },
        now,
    );
    let mut hs = bytes::BytesMut::new();
    let start = ConnectionStart {
        version_major: 0,
        version_minor: 9,
        server_properties: FieldTable::new(),
        mechanisms: bytes::Bytes::from_static(b"PLAIN AMQPLAIN"),
        locales: bytes::Bytes::from_static(b"en_US"),
    };
    let methods: [Method; 3] = [
        start.into(),
        ConnectionTune {
            channel_max: 2047,
            frame_max: 131072,
            heartbeat: 0,
        }
        .into(),
        ConnectionOpenOk::default().into(),
    ];
    for m in &methods {
        if encode_method(&mut hs, 0, m, 131072).is_err() {
            return 0;
        }
    }
    engine.handle_input(&mut hs, now);
    if engine.open_channel(Some(1), ()).is_err() {
        return 0;
    }
    let mut ok = bytes::BytesMut::new();
    if encode_method(&mut ok, 1, &ChannelOpenOk::default().into(), 131072).is_err() {
        return 0;
    }
    engine.handle_input(&mut ok, now);
    while engine.poll_event().is_some() {}
    let mut rbuf = bytes::BytesMut::with_capacity(128 << 10);
    let mut deliveries = 0usize;
    for chunk in stream.chunks(64 << 10) {
        rbuf.extend_from_slice(chunk);
        engine.handle_input(&mut rbuf, now);
        while let Some(ev) = engine.poll_event() {
            if let Event::Delivery(d) = ev {
                deliveries += usize::from(!d.body.is_empty());
            }
        }
    }
    deliveries
}
