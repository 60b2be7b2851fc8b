//! `kelp::pool`: the generic pool on plain values and `memory://`, and connection eviction on
//! the local RabbitMQ (skipped with a SKIP line when it is not running), including a connection
//! closed from the broker side with `rabbitmqctl`.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

#[allow(unused_macros)]
mod common;
#[allow(unused_imports)]
mod fault;

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use kelp::pool::{ChannelPool, ConnectionPool, Pool, ProducerPool};
use kelp::{Connection, Error, PublishOptions, Queue};

fn same_connection(a: &Connection, b: &Connection) -> bool {
    Arc::ptr_eq(a.transport(), b.transport())
}

/// A pool of numbered items; `broken` marks items the health check refuses.
fn numbers(max: usize) -> (Pool<u32>, Arc<AtomicU32>) {
    let made = Arc::new(AtomicU32::new(0));
    let counter = made.clone();
    let pool = Pool::new(
        max,
        move || {
            let n = counter.fetch_add(1, Ordering::SeqCst);
            async move { Ok(n) }
        },
        |_: &u32| true,
    )
    .unwrap();
    (pool, made)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_size_is_respected() {
    let (pool, made) = numbers(2);
    let a = pool.acquire().await.unwrap();
    let b = pool.acquire().await.unwrap();
    assert_eq!((pool.size(), pool.in_use(), pool.idle()), (2, 2, 0));

    let started = Instant::now();
    let err = pool
        .acquire_timeout(Duration::from_millis(200))
        .await
        .unwrap_err();
    assert!(matches!(err, Error::Timeout { .. }), "{err:?}");
    assert!(started.elapsed() >= Duration::from_millis(200));

    // A waiter is served when an item comes back, with that item.
    let p2 = pool.clone();
    let waiter = tokio::spawn(async move { *p2.acquire().await.unwrap() });
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(
        !waiter.is_finished(),
        "acquire must wait while the pool is full"
    );
    let a_id = *a;
    drop(a);
    let got = tokio::time::timeout(Duration::from_secs(5), waiter)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(got, a_id);
    drop(b);
    assert_eq!(made.load(Ordering::SeqCst), 2);
    assert_eq!((pool.size(), pool.idle(), pool.in_use()), (2, 2, 0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn never_more_than_max_under_contention() {
    let (pool, made) = numbers(3);
    let out = Arc::new(AtomicUsize::new(0));
    let peak = Arc::new(AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for _ in 0..20 {
        let (pool, out, peak) = (pool.clone(), out.clone(), peak.clone());
        tasks.push(tokio::spawn(async move {
            for _ in 0..20 {
                let _item = pool.acquire().await.unwrap();
                let now = out.fetch_add(1, Ordering::SeqCst) + 1;
                peak.fetch_max(now, Ordering::SeqCst);
                assert!(pool.size() <= 3);
                tokio::task::yield_now().await;
                out.fetch_sub(1, Ordering::SeqCst);
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    assert!(peak.load(Ordering::SeqCst) <= 3);
    assert!(made.load(Ordering::SeqCst) <= 3);
    assert!(pool.size() <= 3);
    assert_eq!(pool.in_use(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unhealthy_items_are_evicted_on_acquire_and_release() {
    let broken = Arc::new(std::sync::Mutex::new(
        std::collections::HashSet::<u32>::new(),
    ));
    let made = Arc::new(AtomicU32::new(0));
    let (b2, m2) = (broken.clone(), made.clone());
    let pool = Pool::new(
        2,
        move || {
            let n = m2.fetch_add(1, Ordering::SeqCst);
            async move { Ok(n) }
        },
        move |n: &u32| !b2.lock().unwrap().contains(n),
    )
    .unwrap();

    // Broken while idle: evicted on acquire, a new one made.
    drop(pool.acquire().await.unwrap());
    broken.lock().unwrap().insert(0);
    let item = pool.acquire().await.unwrap();
    assert_eq!(*item, 1);
    assert_eq!((pool.evicted(), pool.size()), (1, 1));

    // Broken while in use: evicted on release.
    broken.lock().unwrap().insert(1);
    drop(item);
    assert_eq!((pool.evicted(), pool.size(), pool.idle()), (2, 0, 0));
    assert_eq!(*pool.acquire().await.unwrap(), 2);

    // discard() drops it too.
    pool.acquire().await.unwrap().discard();
    assert_eq!((pool.size(), pool.evicted()), (0, 3));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn factory_errors_free_the_slot() {
    let fail = Arc::new(AtomicBool::new(true));
    let f2 = fail.clone();
    let pool = Pool::new(
        1,
        move || {
            let fail = f2.load(Ordering::SeqCst);
            async move {
                if fail {
                    Err(Error::Closed { what: "test" })
                } else {
                    Ok(7u8)
                }
            }
        },
        |_| true,
    )
    .unwrap();
    assert!(matches!(pool.acquire().await, Err(Error::Closed { .. })));
    assert_eq!(pool.size(), 0);
    fail.store(false, Ordering::SeqCst);
    let item = pool
        .acquire_timeout(Duration::from_secs(1))
        .await
        .expect("the failed attempt freed its slot");
    assert_eq!(*item, 7);
    drop(item);
    pool.close();
    assert!(pool.is_closed());
    assert_eq!(pool.size(), 0);
    assert!(matches!(pool.acquire().await, Err(Error::Closed { .. })));
    assert!(Pool::new(0, || async { Ok(()) }, |_| true).is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_pool_reuses_and_evicts_on_memory() {
    let url = common::memory_url("pool.connections").unwrap();
    let pool = ConnectionPool::new(url.as_str(), 2).unwrap();
    let first = pool.acquire().await.unwrap();
    let kept = (*first).clone();
    first.channel().await.unwrap();
    drop(first);

    // Reused: the very same connection.
    let again = pool.acquire().await.unwrap();
    assert!(same_connection(&again, &kept));
    drop(again);
    assert_eq!((pool.created(), pool.size()), (1, 1));

    // Closed while idle in the pool: evicted, and a fresh working one handed out.
    kept.close().await.unwrap();
    let fresh = pool.acquire().await.unwrap();
    assert!(!same_connection(&fresh, &kept));
    assert!(!fresh.is_closed());
    fresh.channel().await.unwrap();
    assert_eq!((pool.evicted(), pool.created()), (1, 2));
    assert!(pool.size() <= pool.max_size());

    // Closed while in use: evicted when released.
    fresh.close().await.unwrap();
    drop(fresh);
    assert_eq!((pool.size(), pool.evicted()), (0, 2));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn channel_and_producer_pools_on_memory() {
    let url = common::memory_url("pool.channels").unwrap();
    let conn = Connection::open(&url).await.unwrap();

    let channels = ChannelPool::new(&conn, 2).unwrap();
    let ch = channels.acquire().await.unwrap();
    let q = ch.declare_queue(Queue::new("pooled")).await.unwrap();
    let raw = ch.raw().clone();
    drop(ch);
    let ch = channels.acquire().await.unwrap();
    assert!(Arc::ptr_eq(ch.raw(), &raw), "the channel is reused");
    ch.close().await.unwrap();
    drop(ch);
    assert_eq!((channels.size(), channels.evicted()), (0, 1));
    let ch = channels.acquire().await.unwrap();
    assert!(!ch.is_closed());
    drop(ch);

    let producers = ProducerPool::new(&conn, 2).unwrap();
    for i in 0..5 {
        let p = producers.acquire().await.unwrap();
        p.publish(
            format!("m{i}"),
            PublishOptions::default().routing_key(q.name.clone()),
        )
        .await
        .unwrap();
    }
    assert_eq!(producers.created(), 1);
    let p = producers.acquire().await.unwrap();
    p.channel().close().await.unwrap();
    drop(p);
    assert_eq!(producers.size(), 0);
    let p = producers.acquire().await.unwrap();
    p.publish("m5", PublishOptions::default().routing_key(q.name.clone()))
        .await
        .unwrap();
    assert_eq!(queue_size(&q.name, &p).await, 6);

    // Every pooled channel dies with its connection.
    drop(p);
    conn.close().await.unwrap();
    let p = producers.acquire().await;
    assert!(p.is_err(), "a closed connection cannot make producers");
    assert_eq!(producers.size(), 0);
}

/// Ready messages in `queue`, seen through `p`'s channel.
async fn queue_size(queue: &str, p: &kelp::Producer) -> u32 {
    let mut probe = Queue::new(queue).passive(true);
    probe.declare(p.channel()).await.unwrap().message_count
}

/// Wait until `conn` reports itself closed.
async fn wait_closed(conn: &Connection) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !conn.is_closed() {
        assert!(Instant::now() < deadline, "the connection never closed");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn works(conn: &Connection) {
    let ch = conn.channel().await.unwrap();
    let mut q = Queue::server_named().exclusive(true).auto_delete(true);
    q.declare(&ch).await.unwrap();
    ch.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn amqp_connection_closed_by_its_handle_is_evicted() {
    let Some(url) = common::amqp_url("pool::amqp_closed_by_handle") else {
        return;
    };
    let pool = ConnectionPool::new(url, 2).unwrap();
    let a = pool.acquire().await.unwrap();
    let b = pool.acquire().await.unwrap();
    works(&a).await;
    let (ka, kb) = ((*a).clone(), (*b).clone());
    drop(a);
    drop(b);
    assert_eq!(pool.idle(), 2);

    // Both idle; one closed from its own handle.
    kb.close().await.unwrap();
    let c = pool.acquire().await.unwrap();
    assert!(
        same_connection(&c, &ka),
        "the healthy idle one is handed out"
    );
    let d = pool.acquire().await.unwrap();
    assert!(!same_connection(&d, &kb) && !same_connection(&d, &ka));
    works(&d).await;
    assert_eq!(pool.evicted(), 1);
    assert!(pool.size() <= 2);
    c.close().await.unwrap();
    d.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn amqp_connection_killed_by_the_broker_is_evicted() {
    let Some(url) = common::amqp_url("pool::amqp_killed_by_broker") else {
        return;
    };
    let prefix = common::unique("pool-conn");
    let p = prefix.clone();
    let pool = ConnectionPool::with_builder_fn(2, move |n| {
        Connection::builder()
            .url(url.clone())
            .connection_name(format!("{p}-{n}#"))
    })
    .unwrap();

    // Idle in the pool when the broker closes it.
    let conn = pool.acquire().await.unwrap();
    works(&conn).await;
    let victim = (*conn).clone();
    drop(conn);
    let name = format!("{prefix}-0#");
    let killed = tokio::task::spawn_blocking(move || fault::broker::close_connections_named(&name))
        .await
        .unwrap()
        .expect("rabbitmqctl");
    assert_eq!(killed, 1);
    wait_closed(&victim).await;
    let fresh = pool.acquire().await.unwrap();
    assert!(
        !same_connection(&fresh, &victim),
        "the dead connection was handed out"
    );
    works(&fresh).await;
    assert_eq!(pool.evicted(), 1);
    assert!(pool.size() <= 2);

    // In use when the broker closes it: evicted on release.
    let victim = (*fresh).clone();
    let name = format!("{prefix}-1#");
    let killed = tokio::task::spawn_blocking(move || fault::broker::close_connections_named(&name))
        .await
        .unwrap()
        .expect("rabbitmqctl");
    assert_eq!(killed, 1);
    wait_closed(&victim).await;
    drop(fresh);
    assert_eq!((pool.size(), pool.evicted()), (0, 2));
    let third = pool.acquire().await.unwrap();
    assert!(!same_connection(&third, &victim));
    works(&third).await;
    assert_eq!((pool.size(), pool.created()), (1, 3));
    third.close().await.unwrap();
}
