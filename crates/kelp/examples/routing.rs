//! RabbitMQ tutorial 4, "Routing" (<https://www.rabbitmq.com/tutorials/tutorial-four-python>):
//! receive only a subset of the messages. A logger publishes each line to a `direct` exchange
//! with its severity as the routing key; a direct exchange delivers a message to the queues
//! bound with exactly that key. One receiver binds `error` only (the tutorial saves those to
//! disk), the other binds `info`, `warning` and `error`.
//!
//! The tutorial's `emit_log_direct` and two `receive_logs_direct` run here in one process,
//! each with its own connection:
//!
//! ```text
//! cargo run -p kelp --example routing
//! ```
//!
//! It connects to `$KELP_URL`, else the embedded default `sqlite://kelp.db` (no broker);
//! `KELP_URL=amqp://guest:guest@localhost//` runs it against a local RabbitMQ.

use std::time::Duration;

use kelp::{Binding, Connection, Consumer, Exchange, Producer, PublishOptions, Queue};
use tokio::task::JoinHandle;

type Error = Box<dyn std::error::Error + Send + Sync>;

/// (severity, message)
const LOGS: [(&str, &str); 4] = [
    ("info", "Starting up"),
    ("warning", "Disk 90% full"),
    ("error", "Run. Run. Or it will explode."),
    ("info", "Shutting down"),
];

#[tokio::main]
async fn main() -> Result<(), Error> {
    // Exit with an error rather than hang if a log line is never received.
    tokio::time::timeout(Duration::from_secs(10), run())
        .await
        .map_err(|_| "timed out")?
}

async fn run() -> Result<(), Error> {
    // The tutorial's `direct_logs` exchange. The process id keeps runs apart, and
    // auto-delete removes the exchange once the receivers' queues are gone.
    let direct_logs = Exchange::direct(format!("direct_logs.{}", std::process::id()))
        .durable(false)
        .auto_delete(true);

    // Start the receivers first, so their queues are bound before anything is sent.
    let receivers = [
        receive_logs("errors", &direct_logs, &["error"], 1).await?,
        receive_logs("all", &direct_logs, &["info", "warning", "error"], 4).await?,
    ];

    // emit_log_direct: the severity is the routing key.
    let conn = Connection::open_default().await?; // $KELP_URL, else the embedded default (sqlite://kelp.db)
    let producer = Producer::new(&conn.channel().await?).exchange(direct_logs);
    for (severity, message) in LOGS {
        producer
            .publish(message, PublishOptions::default().routing_key(severity))
            .await?;
        println!(" [x] Sent {severity}:'{message}'");
    }
    conn.close().await?;

    for r in receivers {
        r.await??;
    }
    Ok(())
}

/// The tutorial's `receive_logs_direct`: a server-named exclusive queue bound once per
/// severity, printing what comes (here: until `expected` lines came).
async fn receive_logs(
    name: &'static str,
    exchange: &Exchange,
    severities: &[&str],
    expected: usize,
) -> Result<JoinHandle<Result<(), Error>>, Error> {
    let conn = Connection::open_default().await?;
    let mut queue = Queue::server_named();
    for severity in severities {
        queue = queue.bind(Binding::new(exchange.clone(), *severity));
    }
    // Declares the queue and its bindings, then consumes.
    let mut consumer = Consumer::builder(&conn.channel().await?)
        .queue(queue)
        .no_ack(true)
        .build()
        .await?;
    println!(" [*] Receiver '{name}' waiting for {severities:?} logs.");
    Ok(tokio::spawn(async move {
        for _ in 0..expected {
            let msg = consumer.next().await.ok_or("the consumer ended")??;
            let severity = msg.delivery_info().routing_key;
            let text = std::str::from_utf8(msg.body())?;
            println!(" [{name}] {severity}:'{text}'");
        }
        conn.close().await?;
        Ok(())
    }))
}
