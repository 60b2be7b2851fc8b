//! Publish N small messages to a fresh queue and consume them back, printing rates.
//!
//! `cargo run --release -p kelp-amqp --example throughput -- [N] [URL]`

use std::time::Instant;

use kelp_amqp::options::{
    ConsumeOptions, PublishOptions, QosOptions, QueueDeclareOptions, QueueDeleteOptions,
};
use kelp_amqp::{BasicProperties, Connection, FieldTable};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let n: u32 = args.next().and_then(|s| s.parse().ok()).unwrap_or(100_000);
    let url = args
        .next()
        .unwrap_or_else(|| "amqp://guest:guest@127.0.0.1:5672/%2f".into());
    let conn = Connection::open(&url).await?;
    let ch = conn.channel().await?;
    let q = format!("kelp-throughput-{}", std::process::id());
    ch.queue_declare(&q, QueueDeclareOptions::default(), FieldTable::new())
        .await?;
    let body = bytes::Bytes::from(vec![b'x'; 100]);
    let t = Instant::now();
    for _ in 0..n {
        ch.basic_publish(
            "",
            &q,
            PublishOptions::default(),
            BasicProperties::default(),
            body.clone(),
        )
        .await?;
    }
    let sent = t.elapsed();
    loop {
        let ok = ch
            .queue_declare(
                &q,
                QueueDeclareOptions {
                    passive: true,
                    ..Default::default()
                },
                FieldTable::new(),
            )
            .await?;
        if ok.message_count >= n {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
    let all = t.elapsed();
    println!(
        "publish: {n} in {all:?} ({:.0} msg/s; client side done in {sent:?})",
        f64::from(n) / all.as_secs_f64()
    );
    ch.basic_qos(1000, QosOptions::default()).await?;
    let mut c = ch.basic_consume(&q, ConsumeOptions::default()).await?;
    let t = Instant::now();
    for _ in 0..n {
        match c.recv().await {
            Some(Ok(d)) => ch.basic_ack(d.delivery_tag, false).await?,
            other => return Err(format!("consumer ended: {other:?}").into()),
        }
    }
    let el = t.elapsed();
    println!(
        "consume: {n} in {el:?} ({:.0} msg/s)",
        f64::from(n) / el.as_secs_f64()
    );
    ch.queue_delete(&q, QueueDeleteOptions::default()).await?;
    conn.close().await?;
    Ok(())
}
