//! RabbitMQ tutorial 5, "Topics" (<https://www.rabbitmq.com/tutorials/tutorial-five-python>):
//! receive messages by pattern. Log lines go to a `topic` exchange with a routing key
//! `<facility>.<severity>` (words separated by dots). Queues bind with patterns where `*`
//! stands for exactly one word and `#` for zero or more words:
//!
//! - `kern.#`: everything from the kernel, however many words follow;
//! - `*.critical`: critical lines from any facility;
//! - `kern.*` and `*.critical`: a queue with two bindings gets a line matching both only once.
//!
//! The tutorial's `emit_log_topic` and three `receive_logs_topic` run here in one process,
//! each with its own connection:
//!
//! ```text
//! cargo run -p kelp --example topics
//! ```
//!
//! It connects to `$KELP_URL`, else the embedded default `sqlite://kelp.db` (no broker);
//! `KELP_URL=amqp://guest:guest@localhost//` runs it against a local RabbitMQ.

use std::time::Duration;

use kelp::{Binding, Connection, Consumer, Exchange, Producer, PublishOptions, Queue};
use tokio::task::JoinHandle;

type Error = Box<dyn std::error::Error + Send + Sync>;

/// (routing key, message)
const LOGS: [(&str, &str); 5] = [
    ("kern.critical", "A critical kernel error"), // every receiver, the third only once
    ("kern.info", "Kernel booted"),               // `kern.#` and `kern.*`
    ("auth.info", "User logged in"),              // no binding matches: dropped
    ("cron.critical", "Cron job failed"),         // both `*.critical` bindings
    ("kern.usb.warning", "USB device slow"),      // `kern.#` only: `*` is exactly one word
];

#[tokio::main]
async fn main() -> Result<(), Error> {
    // Exit with an error rather than hang if a log line is never received.
    tokio::time::timeout(Duration::from_secs(10), run())
        .await
        .map_err(|_| "timed out")?
}

async fn run() -> Result<(), Error> {
    // The tutorial's `topic_logs` exchange. The process id keeps runs apart, and auto-delete
    // removes the exchange once the receivers' queues are gone.
    let topic_logs = Exchange::topic(format!("topic_logs.{}", std::process::id()))
        .durable(false)
        .auto_delete(true);

    // Start the receivers first, so their queues are bound before anything is sent.
    let receivers = [
        receive_logs(&topic_logs, &["kern.#"], 3).await?,
        receive_logs(&topic_logs, &["*.critical"], 2).await?,
        receive_logs(&topic_logs, &["kern.*", "*.critical"], 3).await?,
    ];

    // emit_log_topic
    let conn = Connection::open_default().await?; // $KELP_URL, else the embedded default (sqlite://kelp.db)
    let producer = Producer::new(&conn.channel().await?).exchange(topic_logs);
    for (key, message) in LOGS {
        producer
            .publish(message, PublishOptions::default().routing_key(key))
            .await?;
        println!(" [x] Sent {key}:'{message}'");
    }
    conn.close().await?;

    for r in receivers {
        r.await??;
    }
    Ok(())
}

/// The tutorial's `receive_logs_topic`: a server-named exclusive queue bound with each of
/// `patterns`, printing what comes (here: until `expected` lines came).
async fn receive_logs(
    exchange: &Exchange,
    patterns: &'static [&'static str],
    expected: usize,
) -> Result<JoinHandle<Result<(), Error>>, Error> {
    let conn = Connection::open_default().await?;
    let mut queue = Queue::server_named();
    for pattern in patterns {
        queue = queue.bind(Binding::new(exchange.clone(), *pattern));
    }
    // Declares the queue and its bindings, then consumes.
    let mut consumer = Consumer::builder(&conn.channel().await?)
        .queue(queue)
        .no_ack(true)
        .build()
        .await?;
    let name = patterns.join(" ");
    println!(" [*] Receiver '{name}' waiting for logs.");
    Ok(tokio::spawn(async move {
        for _ in 0..expected {
            let msg = consumer.next().await.ok_or("the consumer ended")??;
            let key = msg.delivery_info().routing_key;
            let text = std::str::from_utf8(msg.body())?;
            println!(" [{name}] {key}:'{text}'");
        }
        conn.close().await?;
        Ok(())
    }))
}
