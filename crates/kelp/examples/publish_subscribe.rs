//! RabbitMQ tutorial 3, "Publish/Subscribe"
//! (<https://www.rabbitmq.com/tutorials/tutorial-three-python>): one message to many
//! consumers. A logger publishes to a `fanout` exchange, which copies every message to every
//! queue bound to it; each receiver binds its own fresh, server-named, exclusive queue.
//!
//! The tutorial's `emit_log` and two `receive_logs` run here in one process, each with its
//! own connection:
//!
//! ```text
//! cargo run -p kelp --example publish_subscribe
//! ```
//!
//! It connects to `$KELP_URL`, else the embedded default `sqlite://kelp.db` (no broker);
//! `KELP_URL=amqp://guest:guest@localhost//` runs it against a local RabbitMQ.

use std::time::Duration;

use kelp::{Connection, Consumer, Exchange, Producer, PublishOptions, Queue};
use tokio::task::JoinHandle;

type Error = Box<dyn std::error::Error + Send + Sync>;

const LOGS: [&str; 3] = [
    "info: Hello World!",
    "warning: disk 90% full",
    "error: disk full",
];

#[tokio::main]
async fn main() -> Result<(), Error> {
    // Exit with an error rather than hang if a log line is never received.
    tokio::time::timeout(Duration::from_secs(10), run())
        .await
        .map_err(|_| "timed out")?
}

async fn run() -> Result<(), Error> {
    // The tutorial's `logs` exchange. The process id keeps runs apart, and auto-delete
    // removes the exchange once the receivers' queues are gone.
    let logs = Exchange::fanout(format!("logs.{}", std::process::id()))
        .durable(false)
        .auto_delete(true);

    // Start the receivers first: a fanout exchange drops what no queue is bound to yet.
    let receivers = [receive_logs(1, &logs).await?, receive_logs(2, &logs).await?];

    // emit_log: publish to the exchange (a fanout exchange ignores the routing key).
    let conn = Connection::open_default().await?; // $KELP_URL, else the embedded default (sqlite://kelp.db)
    let producer = Producer::new(&conn.channel().await?).exchange(logs);
    for line in LOGS {
        producer.publish(line, PublishOptions::default()).await?;
        println!(" [x] Sent '{line}'");
    }
    conn.close().await?;

    for r in receivers {
        r.await??;
    }
    Ok(())
}

/// The tutorial's `receive_logs`: print every log line (here: until all of `LOGS` came).
async fn receive_logs(id: u32, logs: &Exchange) -> Result<JoinHandle<Result<(), Error>>, Error> {
    let conn = Connection::open_default().await?;
    let ch = conn.channel().await?;
    // A fresh, empty queue with a name chosen by the broker, bound to the exchange. It is
    // exclusive: deleted when this receiver's connection closes.
    let queue = ch
        .declare_queue(Queue::server_named().exchange(logs.clone()))
        .await?;
    println!(" [*] Receiver {id} waiting for logs on {}", queue.name);
    let mut consumer = Consumer::builder(&ch)
        .queue(&queue)
        .no_ack(true)
        .build()
        .await?;
    Ok(tokio::spawn(async move {
        for _ in LOGS {
            let msg = consumer.next().await.ok_or("the consumer ended")??;
            println!(" [{id}] {}", std::str::from_utf8(msg.body())?);
        }
        conn.close().await?;
        Ok(())
    }))
}
