//! The worker loop: graceful stop on SIGTERM (this binary signals its own process, so it is a
//! binary of its own), concurrency limits, batches, settlement.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

#[allow(unused_macros)]
mod common;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use kelp::worker::Worker;
use kelp::{Connection, Producer, PublishOptions, Queue};

async fn fill(conn: &Connection, q: &str, n: u64) {
    let ch = conn.channel().await.unwrap();
    ch.confirm_select().await.ok();
    let p = Producer::new(&ch);
    for i in 0..n {
        p.publish(i.to_string(), PublishOptions::default().routing_key(q))
            .await
            .unwrap();
    }
}

fn number(m: &kelp::Message) -> u64 {
    std::str::from_utf8(m.body()).unwrap().parse().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_mid_stream_loses_nothing_and_repeats_nothing_unflagged() {
    let Some(url) = common::amqp_url("worker::sigterm") else {
        return;
    };
    const N: u64 = 2000;
    let conn = Connection::open(&url).await.unwrap();
    let q = common::unique("worker-term");
    let queue = Queue::new(&q).durable(false).auto_delete(false);
    conn.channel()
        .await
        .unwrap()
        .declare_queue(queue.clone())
        .await
        .unwrap();
    fill(&conn, &q, N).await;

    let seen: Arc<Mutex<Vec<(u64, bool)>>> = Arc::default();
    let handled = Arc::new(AtomicU64::new(0));
    let handler = {
        let (seen, handled) = (seen.clone(), handled.clone());
        move |m: kelp::Message| {
            let (seen, handled) = (seen.clone(), handled.clone());
            async move {
                seen.lock().unwrap().push((number(&m), m.redelivered()));
                tokio::time::sleep(Duration::from_millis(2)).await;
                handled.fetch_add(1, Ordering::Relaxed);
                Ok::<_, kelp::Error>(())
            }
        }
    };
    // SIGTERM to ourselves once the worker is well into the stream.
    let killer = {
        let handled = handled.clone();
        tokio::spawn(async move {
            while handled.load(Ordering::Relaxed) < 300 {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            let pid = std::process::id().to_string();
            std::process::Command::new("kill")
                .args(["-TERM", &pid])
                .status()
                .unwrap();
        })
    };
    let stats = tokio::time::timeout(
        Duration::from_secs(60),
        Worker::builder(&conn)
            .consume(queue.clone(), handler.clone())
            .concurrency(4)
            .prefetch_count(50)
            .run(),
    )
    .await
    .expect("the worker stops on SIGTERM")
    .unwrap();
    killer.await.unwrap();
    let first = seen.lock().unwrap().len() as u64;
    assert_eq!(stats.handled, first, "every started handler finished");
    assert!((300..N).contains(&first), "stopped mid-stream: {first}");

    // A second worker takes the rest.
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let watcher = {
        let seen = seen.clone();
        tokio::spawn(async move {
            loop {
                let done = {
                    let s = seen.lock().unwrap();
                    let distinct: std::collections::HashSet<u64> =
                        s.iter().map(|(n, _)| *n).collect();
                    distinct.len() as u64 == N
                };
                if done {
                    let _ = tx.send(());
                    return;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
    };
    tokio::time::timeout(
        Duration::from_secs(60),
        Worker::builder(&conn)
            .consume(queue, handler)
            .concurrency(4)
            .shutdown_on(async move {
                let _ = rx.await;
            })
            .run(),
    )
    .await
    .expect("second worker drains the queue")
    .unwrap();
    watcher.await.unwrap();

    let seen = std::mem::take(&mut *seen.lock().unwrap());
    let mut by_number: HashMap<u64, Vec<bool>> = HashMap::new();
    for (n, redelivered) in seen.iter() {
        by_number.entry(*n).or_default().push(*redelivered);
    }
    assert_eq!(by_number.len() as u64, N, "lost none");
    let unflagged_repeats: Vec<u64> = by_number
        .iter()
        .filter(|(_, times)| times.iter().skip(1).any(|r| !r))
        .map(|(n, _)| *n)
        .collect();
    assert!(
        unflagged_repeats.is_empty(),
        "processed twice without redelivered: {unflagged_repeats:?}"
    );
    let repeats = by_number.values().filter(|t| t.len() > 1).count();
    println!(
        "worker SIGTERM: first worker handled {first}, messages handled twice {repeats} (all redelivered), lost 0"
    );
    let ch = conn.channel().await.unwrap();
    assert_eq!(ch.raw().queue_delete(&q, false, false).await.unwrap(), 0);
}

async fn memory_conn(name: &str) -> Connection {
    Connection::open(&common::memory_url(name).unwrap())
        .await
        .unwrap()
}

/// Run a worker until `n` messages are handled; returns the most handlers seen at once.
async fn max_parallel(concurrency: usize) -> usize {
    let conn = memory_conn("worker::parallel").await;
    let q = "par";
    conn.channel()
        .await
        .unwrap()
        .declare_queue(Queue::new(q))
        .await
        .unwrap();
    fill(&conn, q, 40).await;
    let now = Arc::new(AtomicUsize::new(0));
    let max = Arc::new(AtomicUsize::new(0));
    let done = Arc::new(AtomicU64::new(0));
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let tx = Arc::new(Mutex::new(Some(tx)));
    let handler = {
        let (now, max, done) = (now.clone(), max.clone(), done.clone());
        move |_m: kelp::Message| {
            let (now, max, done, tx) = (now.clone(), max.clone(), done.clone(), tx.clone());
            async move {
                let cur = now.fetch_add(1, Ordering::SeqCst) + 1;
                max.fetch_max(cur, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(5)).await;
                now.fetch_sub(1, Ordering::SeqCst);
                if done.fetch_add(1, Ordering::SeqCst) + 1 == 40 {
                    if let Some(tx) = tx.lock().unwrap().take() {
                        let _ = tx.send(());
                    }
                }
                Ok::<_, kelp::Error>(())
            }
        }
    };
    let stats = Worker::builder(&conn)
        .consume(Queue::new(q), handler)
        .concurrency(concurrency)
        .shutdown_on(async move {
            let _ = rx.await;
        })
        .run()
        .await
        .unwrap();
    assert_eq!(stats.handled, 40);
    max.load(Ordering::SeqCst)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrency_one_is_sequential_and_n_runs_in_parallel() {
    assert_eq!(max_parallel(1).await, 1);
    let m = max_parallel(4).await;
    assert!(m > 1 && m <= 4, "{m}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ok_acks_err_rejects_and_a_handler_may_settle_itself() {
    let conn = memory_conn("worker::settle").await;
    let ch = conn.channel().await.unwrap();
    ch.declare_queue(Queue::new("settle")).await.unwrap();
    fill(&conn, "settle", 3).await;
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let tx = Arc::new(Mutex::new(Some(tx)));
    let count = Arc::new(AtomicU64::new(0));
    let handler = {
        let count = count.clone();
        move |mut m: kelp::Message| {
            let (count, tx) = (count.clone(), tx.clone());
            async move {
                let n = number(&m);
                let r = match n {
                    0 => Ok(()),
                    1 => Err("fails".to_owned()),
                    // Settled by the handler itself: the worker leaves it alone, whatever
                    // the handler returns.
                    _ if !m.redelivered() => {
                        m.requeue().await.unwrap();
                        Ok(())
                    }
                    _ => {
                        m.ack().await.unwrap();
                        Err("acked it myself".to_owned())
                    }
                };
                if count.fetch_add(1, Ordering::SeqCst) + 1 == 4 {
                    if let Some(tx) = tx.lock().unwrap().take() {
                        let _ = tx.send(());
                    }
                }
                r
            }
        }
    };
    let stats = Worker::builder(&conn)
        .consume(Queue::new("settle").no_declare(true), handler)
        .shutdown_on(async move {
            let _ = rx.await;
        })
        .run()
        .await
        .unwrap();
    // #0 acked by the worker, #1 rejected without requeue, #2 requeued then acked by the
    // handler (an Err after that does not reject it again, which would be an error).
    assert_eq!((stats.handled, stats.failed), (4, 2));
    assert!(ch.raw().get("settle", true).await.unwrap().is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batches_fill_up_or_flush_after_max_wait() {
    let conn = memory_conn("worker::batch").await;
    conn.channel()
        .await
        .unwrap()
        .declare_queue(Queue::new("b"))
        .await
        .unwrap();
    fill(&conn, "b", 25).await;
    let sizes: Arc<Mutex<Vec<usize>>> = Arc::default();
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let tx = Arc::new(Mutex::new(Some(tx)));
    let handler = {
        let sizes = sizes.clone();
        move |batch: Vec<kelp::Message>| {
            let (sizes, tx) = (sizes.clone(), tx.clone());
            async move {
                let total = {
                    let mut s = sizes.lock().unwrap();
                    s.push(batch.len());
                    s.iter().sum::<usize>()
                };
                if total == 25 {
                    if let Some(tx) = tx.lock().unwrap().take() {
                        let _ = tx.send(());
                    }
                }
                Ok::<_, kelp::Error>(())
            }
        }
    };
    let stats = Worker::builder(&conn)
        .consume_batch(Queue::new("b"), 10, Duration::from_millis(100), handler)
        .shutdown_on(async move {
            let _ = rx.await;
        })
        .run()
        .await
        .unwrap();
    assert_eq!(stats.handled, 25);
    let sizes = sizes.lock().unwrap().clone();
    assert_eq!(sizes.iter().sum::<usize>(), 25);
    assert!(sizes.iter().all(|s| *s <= 10), "{sizes:?}");
    assert!(sizes.contains(&10), "full batches: {sizes:?}");
    let ch = conn.channel().await.unwrap();
    assert!(
        ch.raw().get("b", true).await.unwrap().is_none(),
        "all acked"
    );
}
