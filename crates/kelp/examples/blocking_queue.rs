//! Kombu's synchronous style, with no async in sight — the Rust twin of
//!
//! ```python
//! with Connection('memory://') as conn:
//!     queue = conn.SimpleQueue('kelp.blocking.queue')
//!     queue.put({'hello': 'world'})
//!     message = queue.get(block=True, timeout=1)
//!     print(message.payload)
//!     message.ack()
//!     queue.close()
//! ```
//!
//! ```text
//! cargo run -p kelp --example blocking_queue
//! KELP_URL=amqp://guest:guest@localhost:5672// cargo run -p kelp --example blocking_queue
//! ```

use std::time::Duration;

use kelp::blocking::{Connection, Consumer};
use kelp::{Error, PublishOptions};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let url = std::env::var("KELP_URL").unwrap_or_else(|_| "memory://blocking-queue".to_owned());
    // The connection (and the background thread that keeps it alive) is closed when the last
    // handle made from it goes out of scope, as at the end of Python's `with` block.
    let conn = Connection::open(&url)?;
    println!("connected to {} ({})", conn.url(), conn.transport_name());

    // kombu.simple: put / get(block, timeout) / ack.
    let mut queue = conn.simple_queue("kelp.blocking.queue")?;
    queue.put(&serde_json::json!({"hello": "world"}))?;
    let mut message = queue.get(true, Some(Duration::from_secs(1)))?;
    println!("got {:?}", message.payload()?);
    message.ack()?;
    match queue.get(true, Some(Duration::from_millis(100))) {
        Err(Error::QueueEmpty { queue }) => println!("{queue} is empty now"),
        other => println!("unexpected: {other:?}"),
    }
    println!("{} messages waiting", queue.qsize()?);
    // Closing it stops its consumer, so the callbacks below get every message.
    let jobs = queue.queue().clone();
    queue.close()?;

    // Kombu's callbacks + drain_events, on the same connection.
    let ch = conn.channel()?;
    let _consumer = Consumer::builder(&ch)
        .queue(jobs.clone())
        .auto_declare(false)
        .callback(|body, msg| {
            println!("callback got {body:?}");
            msg.ack_log_error();
        })
        .build()?;
    let producer = conn.producer()?;
    for i in 0..3 {
        producer.publish_serde(
            &serde_json::json!({"n": i}),
            PublishOptions::default().routing_key(jobs.name.clone()),
        )?;
    }
    loop {
        match conn.drain_events(Some(Duration::from_millis(500))) {
            Ok(true) => continue,
            Ok(false) | Err(Error::Timeout { .. }) => break,
            Err(e) => return Err(e.into()),
        }
    }
    // Leave nothing behind on a real broker.
    ch.delete_queue(&jobs, false, false)?;
    if let Some(exchange) = &jobs.exchange {
        ch.delete_exchange(exchange, false)?;
    }
    conn.close()?;
    Ok(())
}
