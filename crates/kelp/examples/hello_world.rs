//! RabbitMQ tutorial 1, "Hello World!" (<https://www.rabbitmq.com/tutorials/tutorial-one-python>):
//! a producer sends one message to a named queue through the default exchange, and a
//! consumer receives it and prints it.
//!
//! The tutorial's two programs, `send` and `receive`, run here in one process, each with its
//! own connection:
//!
//! ```text
//! cargo run -p kelp --example hello_world
//! ```
//!
//! It connects to `$KELP_URL`, else the embedded default `sqlite://kelp.db` (no broker);
//! `KELP_URL=amqp://guest:guest@localhost//` runs it against a local RabbitMQ.

use std::time::Duration;

use kelp::{Connection, Consumer, Producer, PublishOptions, Queue};

type Error = Box<dyn std::error::Error + Send + Sync>;

#[tokio::main]
async fn main() -> Result<(), Error> {
    // Exit with an error rather than hang if the message never comes.
    tokio::time::timeout(Duration::from_secs(10), run())
        .await
        .map_err(|_| "timed out")?
}

async fn run() -> Result<(), Error> {
    // The tutorial's `hello` queue. The process id keeps runs apart, and auto-delete removes
    // the queue once its consumer goes.
    let queue = Queue::new(format!("hello.{}", std::process::id()))
        .durable(false)
        .auto_delete(true);

    // receive: declare the queue and consume from it. This happens before anything is sent,
    // so the queue exists when the message comes. `no_ack` is the tutorial's `auto_ack=True`.
    let receiver = Connection::open_default().await?; // $KELP_URL, else the embedded default (sqlite://kelp.db)
    let mut consumer = Consumer::builder(&receiver.channel().await?)
        .queue(queue.clone())
        .no_ack(true)
        .build()
        .await?;
    println!(" [*] Waiting for messages.");
    let receiving = tokio::spawn(async move {
        let msg = consumer.next().await.ok_or("the consumer ended")??;
        println!(" [x] Received '{}'", std::str::from_utf8(msg.body())?);
        Ok::<_, Error>(())
    });

    // send: publish to the default exchange, which routes to the queue named by the key.
    let sender = Connection::open_default().await?;
    let producer = Producer::new(&sender.channel().await?);
    producer
        .publish(
            "Hello World!",
            PublishOptions::default().routing_key(&queue.name),
        )
        .await?;
    println!(" [x] Sent 'Hello World!'");
    sender.close().await?;

    receiving.await??;
    receiver.close().await?;
    Ok(())
}
