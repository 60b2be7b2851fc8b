//! Send a Celery task from Rust, and read one back.
//!
//! ```sh
//! # No broker: send a task on memory://, consume it with kelp and decode it as a worker would.
//! cargo run -p kelp --example celery_task
//!
//! # To a real Celery worker (`celery -A proj worker -Q celery` with a task `tasks.add`):
//! # send tasks.add(2, 3) to the `celery` queue and wait for the result in the Redis backend.
//! cargo run -p kelp --example celery_task -- redis://127.0.0.1:6379/0 redis://127.0.0.1:6379/1
//! ```

use std::time::Duration;

use kelp::celery::{self, TaskMessage, TaskRoute};
use kelp::{Connection, Consumer, Queue};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut argv = std::env::args().skip(1);
    let broker = argv.next();
    let backend = argv.next();

    let conn = Connection::open(broker.as_deref().unwrap_or("memory://celery-demo")).await?;
    let ch = conn.channel().await?;
    let task = TaskMessage::new("tasks.add")
        .arg(2)
        .arg(3)
        .kwarg("note", "sent by kelp");
    let id = celery::send_task(&ch, &task, &TaskRoute::default()).await?;
    println!("sent tasks.add(2, 3) as {id}");

    if broker.is_some() {
        if let Some(backend) = backend {
            let r = celery::result_from_redis(&backend, &id, Duration::from_secs(30)).await?;
            println!("{}: {}", r.status, r.result);
        }
    } else {
        // Play the worker: take the message off the `celery` queue and decode it.
        let mut consumer = Consumer::builder(&ch)
            .queue(Queue::new("celery"))
            .auto_declare(false)
            .build()
            .await?;
        if let Some(msg) = consumer.next_timeout(Duration::from_secs(5)).await? {
            let mut msg = msg;
            let got = TaskMessage::from_message(&msg)?;
            println!(
                "received {}[{}] args={:?} kwargs={:?} origin={:?}",
                got.task,
                got.id,
                got.args,
                got.kwargs,
                got.origin.as_deref().unwrap_or("")
            );
            msg.ack().await?;
        }
    }
    conn.close().await?;
    Ok(())
}
