//! RabbitMQ tutorial 2, "Work Queues" (<https://www.rabbitmq.com/tutorials/tutorial-two-python>):
//! time-consuming tasks shared among several workers.
//!
//! - a durable queue and persistent messages, so tasks survive a broker restart;
//! - manual acknowledgements, so a task whose worker dies is given to another worker;
//! - fair dispatch with `prefetch_count(1)`: a worker gets no new task until it acked the last.
//!
//! The tutorial's `new_task` and two `worker`s run here in one process, each with its own
//! connection. A task takes 100 ms per dot in its text.
//!
//! ```text
//! cargo run -p kelp --example work_queues
//! ```
//!
//! It connects to `$KELP_URL`, else the embedded default `sqlite://kelp.db` (no broker);
//! `KELP_URL=amqp://guest:guest@localhost//` runs it against a local RabbitMQ.

use std::time::Duration;

use kelp::{Connection, Consumer, DeliveryMode, Producer, PublishOptions, Queue};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

type Error = Box<dyn std::error::Error + Send + Sync>;

const TASKS: [&str; 5] = [
    "First message.",
    "Second message..",
    "Third message...",
    "Fourth message....",
    "Fifth message.....",
];

#[tokio::main]
async fn main() -> Result<(), Error> {
    // Exit with an error rather than hang if a task is never done.
    tokio::time::timeout(Duration::from_secs(20), run())
        .await
        .map_err(|_| "timed out")?
}

async fn run() -> Result<(), Error> {
    // The tutorial's `task_queue`, durable. The process id keeps runs apart.
    let queue = Queue::new(format!("task_queue.{}", std::process::id())).durable(true);

    // Two workers. Each reports on `done` when it finished a task, so we know when to stop.
    let (done, mut finished) = mpsc::unbounded_channel();
    let workers = [
        worker(1, queue.clone(), done.clone()).await?,
        worker(2, queue.clone(), done).await?,
    ];

    // new_task: publish every task as a persistent message.
    let conn = Connection::open_default().await?; // $KELP_URL, else the embedded default (sqlite://kelp.db)
    let ch = conn.channel().await?;
    let producer = Producer::new(&ch);
    for task in TASKS {
        let options = PublishOptions::default()
            .routing_key(&queue.name)
            .delivery_mode(DeliveryMode::Persistent);
        producer.publish(task, options).await?;
        println!(" [x] Sent '{task}'");
    }

    for _ in TASKS {
        finished.recv().await.ok_or("the workers stopped")?;
    }
    // Stop the workers (Ctrl-C in the tutorial) and delete the durable queue.
    for w in workers {
        w.abort();
    }
    queue.delete(&ch, false, false).await?;
    conn.close().await?;
    Ok(())
}

/// The tutorial's `worker`: consume tasks one at a time, "work" and ack each.
async fn worker(
    id: u32,
    queue: Queue,
    done: mpsc::UnboundedSender<()>,
) -> Result<JoinHandle<Result<(), Error>>, Error> {
    let conn = Connection::open_default().await?;
    // Acks are manual unless `no_ack(true)`; prefetch 1 is what makes the dispatch fair.
    let mut consumer = Consumer::builder(&conn.channel().await?)
        .queue(queue)
        .prefetch_count(1)
        .build()
        .await?;
    println!(" [*] Worker {id} waiting for messages.");
    Ok(tokio::spawn(async move {
        while let Some(msg) = consumer.next().await {
            let mut msg = msg?;
            let task = std::str::from_utf8(msg.body())?.to_owned();
            println!(" [{id}] Received '{task}'");
            let dots = task.matches('.').count() as u64;
            tokio::time::sleep(Duration::from_millis(100 * dots)).await;
            println!(" [{id}] Done");
            // Ack only now: had the worker died while working, the task would go to another.
            msg.ack().await?;
            done.send(())?;
        }
        Ok(())
    }))
}
