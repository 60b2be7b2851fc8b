//! The lapin 4 side of each scenario.

use std::collections::VecDeque;
use std::time::Instant;

use amq_protocol::frame::{parse_frame, AMQPFrame};
use amq_protocol::protocol::{basic, AMQPClass};
use bytes::Bytes;
use futures_util::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions,
    ConfirmSelectOptions, QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::{FieldTable, ShortString};
use lapin::{BasicProperties, Channel, Confirmation, Connection, ConnectionProperties, Consumer};

use crate::report::{Measurement, Percentiles, Timer};
use crate::{fresh_queue_name, BenchResult, Opts, PAYLOAD, POLL_INTERVAL, PREFETCH};

async fn connect(url: &str) -> BenchResult<(Connection, Channel)> {
    let conn = Connection::connect(url, ConnectionProperties::default()).await?;
    let ch = conn.create_channel().await?;
    Ok((conn, ch))
}

async fn declare(
    ch: &Channel,
    queue: &str,
    options: QueueDeclareOptions,
) -> BenchResult<lapin::Queue> {
    Ok(ch
        .queue_declare(queue.into(), options, FieldTable::default())
        .await?)
}

async fn publish_one(ch: &Channel, queue: &str) -> BenchResult<lapin::PublisherConfirm> {
    let props = BasicProperties::default();
    Ok(ch
        .basic_publish(
            "".into(),
            queue.into(),
            BasicPublishOptions::default(),
            &PAYLOAD,
            props,
        )
        .await?)
}

/// Polls a passive queue.declare until the broker reports `count` messages.
async fn wait_enqueued(ch: &Channel, queue: &str, count: u64) -> BenchResult<()> {
    let passive = QueueDeclareOptions {
        passive: true,
        ..QueueDeclareOptions::default()
    };
    loop {
        let got = u64::from(declare(ch, queue, passive).await?.message_count());
        if got == count {
            return Ok(());
        }
        if got > count {
            return Err(format!("queue {queue} holds {got} messages, expected {count}").into());
        }
        tokio::time::sleep(POLL_INTERVAL).await;
    }
}

fn check_confirmation(c: &Confirmation) -> BenchResult<()> {
    if c.is_nack() {
        return Err("lapin: broker nacked a publish".into());
    }
    Ok(())
}

/// `publish` (no confirms, timed until the broker holds all) or `confirm` (timed until all acked).
pub async fn publish(opts: &Opts, confirm: bool) -> BenchResult<Measurement> {
    let (conn, ch) = connect(&opts.url).await?;
    let queue = fresh_queue_name("lapin", if confirm { "confirm" } else { "publish" });
    declare(&ch, &queue, QueueDeclareOptions::default()).await?;
    if confirm {
        ch.confirm_select(ConfirmSelectOptions::default()).await?;
    }

    let timer = Timer::start()?;
    if confirm {
        let mut window = VecDeque::with_capacity(opts.window);
        for _ in 0..opts.count {
            if window.len() >= opts.window {
                if let Some(pending) = window.pop_front() {
                    check_confirmation(&pending.await?)?;
                }
            }
            window.push_back(publish_one(&ch, &queue).await?);
        }
        while let Some(pending) = window.pop_front() {
            check_confirmation(&pending.await?)?;
        }
    } else {
        for _ in 0..opts.count {
            publish_one(&ch, &queue).await?;
        }
        wait_enqueued(&ch, &queue, opts.count).await?;
    }
    let m = timer.stop(opts.count)?;

    ch.queue_delete(queue.into(), QueueDeleteOptions::default())
        .await?;
    conn.close(200, "OK".into()).await?;
    Ok(m)
}

async fn next_delivery(consumer: &mut Consumer) -> BenchResult<lapin::message::Delivery> {
    Ok(consumer
        .next()
        .await
        .ok_or("lapin: consumer ended early")??)
}

/// Prefill (untimed), then consume with prefetch 1000 and ack each, timed until all received.
pub async fn consume(opts: &Opts) -> BenchResult<Measurement> {
    let (conn, ch) = connect(&opts.url).await?;
    let queue = fresh_queue_name("lapin", "consume");
    declare(&ch, &queue, QueueDeclareOptions::default()).await?;
    for _ in 0..opts.count {
        publish_one(&ch, &queue).await?;
    }
    wait_enqueued(&ch, &queue, opts.count).await?;

    let timer = Timer::start()?;
    ch.basic_qos(PREFETCH, BasicQosOptions::default()).await?;
    let mut consumer = ch
        .basic_consume(
            queue.as_str().into(),
            "".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await?;
    for _ in 0..opts.count {
        let delivery = next_delivery(&mut consumer).await?;
        delivery.ack(BasicAckOptions::default()).await?;
    }
    let m = timer.stop(opts.count)?;

    ch.queue_delete(queue.into(), QueueDeleteOptions::default())
        .await?;
    conn.close(200, "OK".into()).await?;
    Ok(m)
}

/// Sequential request/reply round trips between two connections.
pub async fn rpc(opts: &Opts) -> BenchResult<Measurement> {
    // Server side: consumes requests, replies to reply_to with the same correlation id.
    let (server_conn, server_ch) = connect(&opts.url).await?;
    let request_queue = fresh_queue_name("lapin", "rpc");
    declare(&server_ch, &request_queue, QueueDeclareOptions::default()).await?;
    let mut requests = server_ch
        .basic_consume(
            request_queue.as_str().into(),
            "".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await?;

    // Client side: an exclusive, server-named reply queue.
    let (client_conn, client_ch) = connect(&opts.url).await?;
    let exclusive = QueueDeclareOptions {
        exclusive: true,
        ..QueueDeclareOptions::default()
    };
    let reply_queue: ShortString = declare(&client_ch, "", exclusive).await?.name().clone();
    let mut replies = client_ch
        .basic_consume(
            reply_queue.clone(),
            "".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await?;

    let count = opts.count;
    let server = tokio::spawn(async move {
        for _ in 0..count {
            let request = next_delivery(&mut requests).await?;
            let reply_to = request
                .properties
                .reply_to()
                .clone()
                .ok_or("lapin rpc: request without reply_to")?;
            let mut props = BasicProperties::default();
            if let Some(id) = request.properties.correlation_id() {
                props = props.with_correlation_id(id.clone());
            }
            server_ch
                .basic_publish(
                    "".into(),
                    reply_to,
                    BasicPublishOptions::default(),
                    &request.data,
                    props,
                )
                .await?;
            request.ack(BasicAckOptions::default()).await?;
        }
        BenchResult::Ok(server_conn)
    });

    let mut latencies = Vec::with_capacity(usize::try_from(count)?);
    let timer = Timer::start()?;
    for i in 0..count {
        let correlation_id = ShortString::from(i.to_string());
        let props = BasicProperties::default()
            .with_reply_to(reply_queue.clone())
            .with_correlation_id(correlation_id.clone());
        let sent = Instant::now();
        client_ch
            .basic_publish(
                "".into(),
                request_queue.as_str().into(),
                BasicPublishOptions::default(),
                &PAYLOAD,
                props,
            )
            .await?;
        let reply = next_delivery(&mut replies).await?;
        latencies.push(sent.elapsed());
        if reply.properties.correlation_id().as_ref() != Some(&correlation_id) {
            return Err(format!(
                "lapin rpc: reply {:?} to request {i}",
                reply.properties.correlation_id()
            )
            .into());
        }
        reply.ack(BasicAckOptions::default()).await?;
    }
    let m = timer
        .stop(count)?
        .with_latency(Percentiles::from_samples(&mut latencies));

    let server_conn = server.await??;
    client_ch
        .queue_delete(request_queue.into(), QueueDeleteOptions::default())
        .await?;
    client_conn.close(200, "OK".into()).await?;
    server_conn.close(200, "OK".into()).await?;
    Ok(m)
}

/// `sink`: publishes to the fake server, timed until its close-ok.
pub async fn sink(url: &str, count: u64) -> BenchResult<Measurement> {
    let (conn, ch) = connect(url).await?;
    let timer = Timer::start()?;
    for _ in 0..count {
        publish_one(&ch, "bench-q").await?;
    }
    conn.close(200, "OK".into()).await?;
    timer.stop(count)
}

/// `decode`: feeds the recorded stream through amq-protocol's `parse_frame`, which is what
/// lapin's IO loop calls; counts the `basic.deliver` frames. (Assembling frames into
/// `Delivery` values happens in lapin's private channel code and is not measured.)
pub fn decode(stream: &Bytes) -> BenchResult<usize> {
    let mut rest: &[u8] = stream;
    let mut deliveries = 0;
    while !rest.is_empty() {
        let (remaining, frame) =
            parse_frame(rest).map_err(|e| format!("amq-protocol parse_frame: {e:?}"))?;
        if let AMQPFrame::Method(_, AMQPClass::Basic(basic::AMQPMethod::Deliver(_))) = frame {
            deliveries += 1;
        }
        rest = remaining;
    }
    Ok(deliveries)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::decode::record_deliveries;

    #[test]
    fn amq_protocol_decodes_the_recorded_stream() -> BenchResult<()> {
        let stream = record_deliveries(10);
        assert_eq!(decode(&stream)?, 10);
        let (_, frame) = parse_frame(&stream[..]).map_err(|e| format!("{e:?}"))?;
        match frame {
            AMQPFrame::Method(1, AMQPClass::Basic(basic::AMQPMethod::Deliver(d))) => {
                assert_eq!(
                    (d.consumer_tag.as_str(), d.delivery_tag, d.redelivered),
                    ("ctag-1", 1, false)
                );
                assert_eq!(
                    (d.exchange.as_str(), d.routing_key.as_str()),
                    ("", "bench-q")
                );
            }
            other => return Err(format!("unexpected first frame {other:?}").into()),
        }
        Ok(())
    }
}
