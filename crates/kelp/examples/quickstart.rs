//! kelp in one screen: publish typed messages to a topic exchange, consume them,
//! ack them. Runs on the in-process `memory://` transport, so no broker is needed:
//!
//! ```text
//! cargo run -p kelp --example quickstart
//! ```
//!
//! Point it at RabbitMQ (or any other transport) with `KELP_URL`, e.g.
//! `KELP_URL=amqp://guest:guest@localhost:5672// cargo run -p kelp --example quickstart`.

use std::time::Duration;

use kelp::{Connection, Consumer, Exchange, Producer, PublishOptions, Queue};
use serde::{Deserialize, Serialize};

#[derive(Debug, Serialize, Deserialize)]
struct OrderEvent {
    order_id: u32,
    status: String,
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let url = std::env::var("KELP_URL").unwrap_or_else(|_| "memory://quickstart".to_owned());
    let conn = Connection::open(&url).await?;
    println!("connected to {} ({})", conn.url(), conn.transport_name());

    // A topic exchange and a queue that takes every `order.*` event.
    let events = Exchange::topic("quickstart.events");
    let queue = Queue::new("quickstart.orders")
        .exchange(events.clone())
        .routing_key("order.*")
        .auto_delete(true);

    // Consume first, so the queue and its binding exist before we publish.
    let consume_ch = conn.channel().await?;
    let mut consumer = Consumer::builder(&consume_ch)
        .queue(queue)
        .accept(["json"])
        .prefetch_count(10)
        .build()
        .await?;

    let producer = Producer::new(&conn.channel().await?)
        .exchange(events)
        .serializer("json");
    for (order_id, status) in [(1, "created"), (2, "paid"), (1, "shipped")] {
        let event = OrderEvent {
            order_id,
            status: status.to_owned(),
        };
        let key = format!("order.{status}");
        producer
            .publish_serde(&event, PublishOptions::default().routing_key(&key))
            .await?;
        println!(" [x] sent {key}: {event:?}");
    }
    // Not routed anywhere: nothing is bound to `invoice.*`.
    producer
        .publish_serde(
            &OrderEvent {
                order_id: 9,
                status: "ignored".into(),
            },
            PublishOptions::default().routing_key("invoice.created"),
        )
        .await?;

    for _ in 0..3 {
        let Some(mut msg) = consumer.next_timeout(Duration::from_secs(5)).await? else {
            return Err("the consumer ended early".into());
        };
        let event: OrderEvent = msg.decode()?;
        let key = msg.delivery_info().routing_key.to_owned();
        msg.ack().await?;
        println!(" [✓] received {key}: {event:?} (acked)");
    }

    consumer.cancel().await?;
    conn.close().await?;
    println!("done");
    Ok(())
}
