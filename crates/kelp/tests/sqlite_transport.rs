//! The `sqlite://` transport across OS processes: this test binary runs itself as a child
//! (`KELP_SQLITE_CHILD=<role>`) to publish or consume from another process, and kills a
//! consumer with SIGKILL to show its unacked messages come back after the visibility timeout.
//! Also: durability across connections and clear errors for bad files.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

#[allow(unused_macros)]
mod common;

use std::collections::HashSet;
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use kelp::{Connection, Consumer, Producer, PublishOptions, Queue};

fn temp_db(name: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join("kelp-sqlite-tests");
    std::fs::create_dir_all(&dir).unwrap();
    let p = dir.join(format!("{}.db", common::unique(name)));
    let _ = std::fs::remove_file(&p);
    p
}

fn url(path: &std::path::Path, query: &str) -> String {
    format!("sqlite://{}{query}", path.display())
}

/// Run this test binary as a child process in `role`.
fn child(role: &str, db_url: &str, queue: &str) -> Command {
    let exe = std::env::current_exe().unwrap();
    let mut c = Command::new(exe);
    c.args(["--exact", "child_role", "--nocapture", "--test-threads=1"])
        .env("KELP_SQLITE_CHILD", role)
        .env("KELP_SQLITE_URL", db_url)
        .env("KELP_SQLITE_QUEUE", queue)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    c
}

/// The child's work; a no-op when not run as a child.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn child_role() {
    let Ok(role) = std::env::var("KELP_SQLITE_CHILD") else {
        return;
    };
    let url = std::env::var("KELP_SQLITE_URL").unwrap();
    let queue = std::env::var("KELP_SQLITE_QUEUE").unwrap();
    let conn = Connection::open(&url).await.unwrap();
    let ch = conn.channel().await.unwrap();
    ch.declare_queue(Queue::new(&queue)).await.unwrap();
    match role.as_str() {
        "publish-100" => {
            let p = Producer::new(&ch);
            for i in 0..100 {
                p.publish(i.to_string(), PublishOptions::default().routing_key(&queue))
                    .await
                    .unwrap();
            }
            conn.close().await.unwrap();
            println!("PUBLISHED 100");
        }
        "consume-and-hold" => {
            let mut c = Consumer::builder(&ch)
                .queue(Queue::new(&queue).no_declare(true))
                .prefetch_count(10)
                .build()
                .await
                .unwrap();
            let mut held = Vec::new();
            while held.len() < 10 {
                held.push(c.next().await.unwrap().unwrap());
            }
            println!("HELD {}", held.len());
            // Wait to be killed, acking nothing.
            tokio::time::sleep(Duration::from_secs(120)).await;
        }
        other => panic!("unknown child role {other}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_process_publishes_this_one_consumes() {
    let db = temp_db("two-proc");
    let u = url(&db, "");
    let q = "jobs";
    let out = child("publish-100", &u, q).output().unwrap();
    assert!(out.status.success(), "the publishing process failed");
    assert!(String::from_utf8_lossy(&out.stdout).contains("PUBLISHED 100"));
    let conn = Connection::open(&u).await.unwrap();
    let ch = conn.channel().await.unwrap();
    let mut c = Consumer::builder(&ch)
        .queue(Queue::new(q))
        .build()
        .await
        .unwrap();
    let mut seen = Vec::new();
    while seen.len() < 100 {
        let mut m = common::within("delivery", c.next()).await.unwrap().unwrap();
        seen.push(
            std::str::from_utf8(m.body())
                .unwrap()
                .parse::<u32>()
                .unwrap(),
        );
        m.ack().await.unwrap();
    }
    assert_eq!(seen, (0..100).collect::<Vec<_>>(), "all, in order");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_consumer_killed_with_sigkill_gives_its_messages_back() {
    let db = temp_db("kill9");
    let q = "work";
    // The child's leases run out one second after it stops renewing them.
    let child_url = url(&db, "?visibility_timeout=1");
    let conn = Connection::open(&url(&db, "")).await.unwrap();
    let ch = conn.channel().await.unwrap();
    ch.declare_queue(Queue::new(q)).await.unwrap();
    let p = Producer::new(&ch);
    for i in 0..50 {
        p.publish(i.to_string(), PublishOptions::default().routing_key(q))
            .await
            .unwrap();
    }
    let mut proc = child("consume-and-hold", &child_url, q).spawn().unwrap();
    let mut lines = BufReader::new(proc.stdout.take().unwrap()).lines();
    let held = loop {
        match lines.next() {
            // libtest writes `test child_role ... ` on the same line first.
            Some(Ok(l)) if l.contains("HELD ") => break l,
            Some(Ok(_)) => continue,
            other => panic!("the consumer process ended early: {other:?}"),
        }
    };
    assert!(held.ends_with("HELD 10"), "{held}");
    Command::new("kill")
        .args(["-9", &proc.id().to_string()])
        .status()
        .unwrap();
    let _ = proc.wait();
    let killed_at = Instant::now();

    let mut c = Consumer::builder(&ch)
        .queue(Queue::new(q).no_declare(true))
        .build()
        .await
        .unwrap();
    let mut seen = HashSet::new();
    let mut redelivered = 0;
    while seen.len() < 50 {
        let mut m = tokio::time::timeout(Duration::from_secs(15), c.next())
            .await
            .unwrap_or_else(|_| panic!("only {} of 50 came back", seen.len()))
            .unwrap()
            .unwrap();
        if m.redelivered() {
            redelivered += 1;
        }
        seen.insert(std::str::from_utf8(m.body()).unwrap().to_owned());
        m.ack().await.unwrap();
    }
    assert_eq!(
        redelivered, 10,
        "the 10 the dead process held come back redelivered"
    );
    println!(
        "sqlite kill -9: all 50 consumed, 10 redelivered, the last {:?} after the kill",
        killed_at.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_survive_the_connection_and_reopening_the_file() {
    let db = temp_db("durable");
    let u = url(&db, "");
    {
        let conn = Connection::open(&u).await.unwrap();
        let ch = conn.channel().await.unwrap();
        ch.declare_queue(Queue::new("keep")).await.unwrap();
        Producer::new(&ch)
            .publish("kept", PublishOptions::default().routing_key("keep"))
            .await
            .unwrap();
        conn.close().await.unwrap();
    }
    let conn = Connection::open(&u).await.unwrap();
    let ch = conn.channel().await.unwrap();
    let got = ch
        .raw()
        .get("keep", true)
        .await
        .unwrap()
        .expect("still there");
    assert_eq!(got.body.as_ref(), b"kept");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_files_are_clear_errors_naming_the_file() {
    // A directory that does not exist.
    let missing = std::env::temp_dir().join("kelp-no-such-dir/x/y.db");
    match Connection::open(&url(&missing, "")).await {
        Err(kelp::Error::Sqlite { path, .. }) => assert!(path.contains("kelp-no-such-dir")),
        other => panic!("expected Error::Sqlite, got {other:?}"),
    }
    // A file that is not a database.
    let corrupt = temp_db("corrupt");
    std::fs::write(&corrupt, vec![0x42u8; 8192]).unwrap();
    match Connection::open(&url(&corrupt, "")).await {
        Err(e @ kelp::Error::Sqlite { .. }) => {
            let text = e.to_string();
            assert!(text.contains(&corrupt.display().to_string()), "{text}");
        }
        other => panic!("expected Error::Sqlite, got {other:?}"),
    }
    // A kelp database of another schema version.
    let future = temp_db("future");
    {
        let c = Connection::open(&url(&future, "")).await.unwrap();
        c.close().await.unwrap();
    }
    {
        // Bump the version with a plain SQLite connection.
        let conn = rusqlite::Connection::open(&future).unwrap();
        conn.execute(
            "UPDATE kelp_meta SET value = 99 WHERE key = 'schema_version'",
            [],
        )
        .unwrap();
    }
    match Connection::open(&url(&future, "")).await {
        Err(e @ kelp::Error::Sqlite { .. }) => {
            let text = e.to_string();
            assert!(text.contains("schema version 99"), "{text}");
        }
        other => panic!("expected Error::Sqlite, got {other:?}"),
    }
}

/// A no_ack consumer cancelled while the broker is taking messages for it loses none: every
/// message is either received (before the stream ends) or still in the queue. Raced many
/// times, cancelling at varied moments (right after the consumer starts, or after a few
/// messages, while the next batch is being taken).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancelling_a_no_ack_consumer_loses_no_message() {
    no_ack_rounds_lose_nothing(Stop::Cancel).await;
}

/// Closing a channel while its no_ack consumer's messages are being taken loses none of them:
/// what was taken but not handed over goes back to the queue.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn closing_a_channel_with_a_no_ack_consumer_loses_no_message() {
    no_ack_rounds_lose_nothing(Stop::Close).await;
}

/// How a round of [`no_ack_rounds_lose_nothing`] stops its consumer.
#[derive(Clone, Copy, Debug)]
enum Stop {
    /// `cancel()` the consumer (on the publishing channel).
    Cancel,
    /// Close the consumer's own channel.
    Close,
}

/// 200 rounds: publish 10 messages, start a no_ack consumer, receive 0, 1 or 2, yield a
/// varying number of times, stop it; every message must be either received (before the
/// stream ends) or still in the queue, never both.
async fn no_ack_rounds_lose_nothing(stop: Stop) {
    const ROUNDS: usize = 200;
    const N: usize = 10;
    let name = match stop {
        Stop::Cancel => "no-ack-cancel",
        Stop::Close => "no-ack-close",
    };
    let db = temp_db(name);
    let conn = Connection::open(&url(&db, "")).await.unwrap();
    let ch = conn.channel().await.unwrap();
    let p = Producer::new(&ch);
    let mut lost_rounds = Vec::new();
    for round in 0..ROUNDS {
        let queue = format!("{name}-{round}");
        ch.declare_queue(Queue::new(&queue)).await.unwrap();
        for i in 0..N {
            p.publish(i.to_string(), PublishOptions::default().routing_key(&queue))
                .await
                .unwrap();
        }
        let cch = match stop {
            Stop::Cancel => ch.clone(),
            Stop::Close => conn.channel().await.unwrap(),
        };
        let mut c = Consumer::builder(&cch)
            .queue(Queue::new(&queue).no_declare(true))
            .no_ack(true)
            .build()
            .await
            .unwrap();
        let mut received = HashSet::new();
        // Stop after 0, 1 or 2 messages, at a slightly different moment each round.
        let k = round % 3;
        while received.len() < k {
            let m = c.next_timeout(common::WAIT).await.unwrap().unwrap();
            received.insert(String::from_utf8_lossy(m.body()).into_owned());
        }
        for _ in 0..(round / 3) % 8 {
            tokio::task::yield_now().await;
        }
        match stop {
            Stop::Cancel => {
                c.cancel().await.unwrap();
                // What was handed to the consumer before the cancel still arrives; then it
                // ends.
                while let Some(m) = c.next_timeout(common::WAIT).await.unwrap() {
                    received.insert(String::from_utf8_lossy(m.body()).into_owned());
                }
            }
            Stop::Close => {
                cch.close().await.unwrap();
                // What was handed over before the close may still be read; then the stream
                // ends.
                while let Ok(Some(m)) = c.next_timeout(Duration::from_millis(200)).await {
                    received.insert(String::from_utf8_lossy(m.body()).into_owned());
                }
            }
        }
        let mut left = HashSet::new();
        while let Some(m) = ch.raw().get(&queue, true).await.unwrap() {
            left.insert(String::from_utf8_lossy(&m.body).into_owned());
        }
        assert!(
            received.is_disjoint(&left),
            "round {round}: delivered and still queued: {:?}",
            received.intersection(&left).collect::<Vec<_>>()
        );
        if received.len() + left.len() != N {
            lost_rounds.push((round, received.len(), left.len()));
        }
    }
    conn.close().await.unwrap();
    assert!(
        lost_rounds.is_empty(),
        "messages lost in {} of {ROUNDS} rounds (round, received, left): {lost_rounds:?}",
        lost_rounds.len()
    );
}
