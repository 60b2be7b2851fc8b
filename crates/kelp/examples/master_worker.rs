//! Master/worker with `kelp::patterns::Master`, wire-compatible with aio-pika's `JsonMaster`
//! (and, with `Format::Pickle`, its `Master`): two workers share a task queue, one task at a
//! time each; a master publishes ten resize tasks and one bad task, which its worker rejects.
//! An aio-pika `Master` could publish the tasks, or an aio-pika worker take them.
//!
//! ```text
//! cargo run -p kelp --example master_worker
//! ```
//!
//! It connects to `$KELP_URL`, else the embedded default `sqlite://kelp.db` (no broker);
//! `KELP_URL=amqp://guest:guest@localhost//` runs it against a local RabbitMQ.

use std::time::Duration;

use kelp::patterns::{Format, Master, TaskError, WorkerOptions};
use kelp::{Connection, Queue};
use serde::Deserialize;
use serde_json::json;
use tokio::sync::mpsc;

type Error = Box<dyn std::error::Error + Send + Sync>;

#[derive(Deserialize)]
struct Resize {
    image: String,
    width: u32,
}

#[tokio::main]
async fn main() -> Result<(), Error> {
    // Exit with an error rather than hang if a task is never done.
    tokio::time::timeout(Duration::from_secs(20), run())
        .await
        .map_err(|_| "timed out")?
}

async fn run() -> Result<(), Error> {
    // The queue is named after the task; the process id keeps runs apart.
    let task = format!("resize.{}", std::process::id());
    let conn = Connection::open_default().await?;
    let (done_tx, mut done_rx) = mpsc::unbounded_channel();

    // Two workers, each on its own channel with a prefetch of 1, so they share the work.
    let mut workers = Vec::new();
    for n in 1..=2 {
        let ch = conn.channel().await?;
        let done = done_tx.clone();
        let opts = WorkerOptions {
            prefetch_count: Some(1),
            ..Default::default()
        };
        let worker = Master::new(&ch, Format::Json)
            .create_worker_with(&task, opts, move |job: Resize| {
                let done = done.clone();
                async move {
                    if job.width == 0 {
                        // aio-pika's RejectMessage(requeue=False): dropped (or dead-lettered).
                        let _ = done.send(format!("worker {n} rejected {}", job.image));
                        return Err(TaskError::Reject { requeue: false });
                    }
                    tokio::time::sleep(Duration::from_millis(20)).await; // the "work"
                    let _ = done.send(format!(
                        "worker {n} resized {} to {}px",
                        job.image, job.width
                    ));
                    Ok(())
                }
            })
            .await?;
        workers.push(worker);
    }

    let master_ch = conn.channel().await?;
    let master = Master::new(&master_ch, Format::Json);
    for i in 0..10 {
        master
            .create_task(
                &task,
                &json!({"image": format!("img{i}.png"), "width": 640}),
            )
            .await?;
    }
    master
        .create_task(&task, &json!({"image": "bad.png", "width": 0}))
        .await?;
    println!(" [x] sent 11 tasks");

    for _ in 0..11 {
        let line = done_rx.recv().await.ok_or("workers stopped")?;
        println!(" [.] {line}");
    }

    for w in workers {
        w.close().await?;
    }
    Queue::new(task.as_str())
        .delete(&master_ch, false, false)
        .await?;
    conn.close().await?;
    Ok(())
}
