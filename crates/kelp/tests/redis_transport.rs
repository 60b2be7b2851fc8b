//! The `redis://` transport against the local Redis: what lands in Redis is Kombu's layout,
//! unacked bookkeeping, restore after the visibility timeout, bad entries, priorities, fanout.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

#[allow(unused_macros)]
mod common;

use std::time::Duration;

use kelp::{Connection, Consumer, Exchange, Producer, PublishOptions, Queue};
use redis::AsyncCommands;

async fn raw() -> redis::aio::MultiplexedConnection {
    redis::Client::open("redis://127.0.0.1:6379/0")
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap()
}

fn url(test: &str, query: &str) -> Option<String> {
    common::redis_url(test).map(|u| format!("{u}{query}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn what_kelp_writes_is_kombus_layout() {
    let Some(url) = url("redis::layout", "") else {
        return;
    };
    let conn = Connection::open(&url).await.unwrap();
    let ch = conn.channel().await.unwrap();
    let ex = common::unique("layout-ex");
    let q = common::unique("layout-q");
    ch.declare_exchange(Exchange::topic(&ex)).await.unwrap();
    ch.declare_queue(
        Queue::new(&q)
            .exchange(Exchange::topic(&ex))
            .routing_key("a.*"),
    )
    .await
    .unwrap();
    Producer::new(&ch)
        .exchange(Exchange::topic(&ex).no_declare(true))
        .publish_serde(
            &serde_json::json!({"x": 1}),
            PublishOptions::default()
                .routing_key("a.b")
                .priority(3)
                .correlation_id("cid")
                .header("h", 1i64),
        )
        .await
        .unwrap();
    let mut r = raw().await;
    let members: Vec<String> = r.smembers(format!("_kombu.binding.{ex}")).await.unwrap();
    assert_eq!(
        members,
        vec![format!("a.*\x06\x16^a\\.[^\\.]+$\x06\x16{q}")]
    );
    let permanent: Vec<String> = r
        .smembers(format!("_kombu.binding_permanent.{ex}"))
        .await
        .unwrap();
    assert_eq!(permanent, members);
    // Priority 3 goes to the `\x06\x163` list.
    let entries: Vec<String> = r.lrange(format!("{q}\x06\x163"), 0, -1).await.unwrap();
    assert_eq!(entries.len(), 1);
    let doc: serde_json::Value = serde_json::from_str(&entries[0]).unwrap();
    assert_eq!(doc["content-type"], "application/json");
    assert_eq!(doc["headers"]["h"], 1);
    let p = &doc["properties"];
    assert_eq!(p["body_encoding"], "base64");
    assert_eq!(p["priority"], 3);
    assert_eq!(p["correlation_id"], "cid");
    assert_eq!(p["delivery_mode"], 2);
    assert_eq!(p["delivery_info"]["exchange"], ex.as_str());
    assert_eq!(p["delivery_info"]["routing_key"], "a.b");
    assert_eq!(p["delivery_tag"].as_str().unwrap().len(), 36);
    // Kombu 5.7 keeps a sorted set among the binding keys; deleting a queue skips it.
    let _: () = r
        .zadd("_kombu.binding_deadlines", "kelp-test", 1)
        .await
        .unwrap();
    ch.raw().queue_delete(&q, false, false).await.unwrap();
    let _: () = r
        .zrem("_kombu.binding_deadlines", "kelp-test")
        .await
        .unwrap();
    ch.raw().exchange_delete(&ex, false).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unacked_is_recorded_until_acked() {
    let Some(url) = url("redis::unacked", "") else {
        return;
    };
    let conn = Connection::open(&url).await.unwrap();
    let ch = conn.channel().await.unwrap();
    let q = common::unique("unacked");
    ch.declare_queue(Queue::new(&q)).await.unwrap();
    Producer::new(&ch)
        .publish("one", PublishOptions::default().routing_key(&q))
        .await
        .unwrap();
    let mut c = Consumer::builder(&ch)
        .queue(Queue::new(&q).no_declare(true))
        .build()
        .await
        .unwrap();
    let mut m = common::within("delivery", c.next()).await.unwrap().unwrap();
    let mut r = raw().await;
    let uuid = {
        let all: std::collections::HashMap<String, String> = r.hgetall("unacked").await.unwrap();
        let (uuid, entry) = all
            .into_iter()
            .find(|(_, v)| v.contains(&q))
            .expect("an unacked entry for the delivery");
        let parts: serde_json::Value = serde_json::from_str(&entry).unwrap();
        assert_eq!(parts[2], q.as_str(), "[envelope, exchange, routing_key]");
        uuid
    };
    let score: Option<f64> = r.zscore("unacked_index", &uuid).await.unwrap();
    assert!(score.is_some());
    m.ack().await.unwrap();
    // Acks are written in the background (as AMQP's basic.ack is sent without an answer),
    // coalesced with others: the entry goes within moments.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    loop {
        let left: Option<String> = r.hget("unacked", &uuid).await.unwrap();
        let score: Option<f64> = r.zscore("unacked_index", &uuid).await.unwrap();
        if left.is_none() && score.is_none() {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "ack removes it from unacked and unacked_index (left: {left:?}, score: {score:?})"
        );
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    ch.raw().queue_delete(&q, false, false).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_consumers_message_comes_back_after_the_visibility_timeout() {
    let Some(url) = url("redis::visibility", "?visibility_timeout=1") else {
        return;
    };
    let q = common::unique("visibility");
    {
        let conn = Connection::open(&url).await.unwrap();
        let ch = conn.channel().await.unwrap();
        ch.declare_queue(Queue::new(&q)).await.unwrap();
        Producer::new(&ch)
            .publish("orphan", PublishOptions::default().routing_key(&q))
            .await
            .unwrap();
        let got = ch.raw().get(&q, false).await.unwrap().expect("a message");
        assert!(!got.redelivered);
        // The process "dies": nothing runs its channel's close (which would requeue).
        std::mem::forget(ch);
        std::mem::forget(conn);
    }
    let conn = Connection::open(&url).await.unwrap();
    let ch = conn.channel().await.unwrap();
    let started = std::time::Instant::now();
    let back = loop {
        if let Some(d) = ch.raw().get(&q, true).await.unwrap() {
            break d;
        }
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "not restored within 10 s"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(back.body.as_ref(), b"orphan");
    assert!(back.redelivered, "a restored message is marked redelivered");
    ch.raw().queue_delete(&q, false, false).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_entry_reaches_on_decode_error_and_stays_unacked_until_rejected() {
    let Some(url) = url("redis::bad_entry", "") else {
        return;
    };
    let q = common::unique("bad");
    let mut r = raw().await;
    let _: () = r.lpush(&q, "this is not json").await.unwrap();
    let _: () = r
        .lpush(
            &q,
            r#"{"body": "!!", "properties": {"body_encoding": "base64"}}"#,
        )
        .await
        .unwrap();
    let conn = Connection::open(&url).await.unwrap();
    let ch = conn.channel().await.unwrap();
    let mut c = Consumer::builder(&ch)
        .queue(Queue::new(&q).no_declare(true))
        .build()
        .await
        .unwrap();
    for expected in ["this is not json", "\"!!\""] {
        let mut m = common::within("bad entry", c.next())
            .await
            .unwrap()
            .unwrap();
        assert!(m.decode::<serde_json::Value>().is_err(), "not decodable");
        assert!(
            std::str::from_utf8(m.body()).unwrap().contains(expected),
            "the raw entry is handed over"
        );
        let headers = m.headers().cloned().unwrap_or_default();
        assert!(headers.get("x-kelp-envelope-error").is_some());
        let n_unacked: usize = {
            let all: std::collections::HashMap<String, String> =
                r.hgetall("unacked").await.unwrap();
            all.values().filter(|v| v.contains(expected)).count()
        };
        assert_eq!(n_unacked, 1, "kept in unacked until settled");
        m.reject(false).await.unwrap();
        // Written in the background, like an ack.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        loop {
            let all: std::collections::HashMap<String, String> =
                r.hgetall("unacked").await.unwrap();
            if !all.values().any(|v| v.contains(expected)) {
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "reject removes {expected:?} from unacked"
            );
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn priorities_follow_kombus_redis_order() {
    let Some(url) = url("redis::priority", "") else {
        return;
    };
    let conn = Connection::open(&url).await.unwrap();
    let ch = conn.channel().await.unwrap();
    let q = common::unique("prio");
    ch.declare_queue(Queue::new(&q)).await.unwrap();
    let p = Producer::new(&ch);
    for prio in [9u8, 6, 3, 0] {
        p.publish(
            format!("p{prio}"),
            PublishOptions::default().routing_key(&q).priority(prio),
        )
        .await
        .unwrap();
    }
    let mut order = Vec::new();
    while let Some(d) = ch.raw().get(&q, true).await.unwrap() {
        order.push(String::from_utf8(d.body.to_vec()).unwrap());
    }
    // Kombu's Redis transport serves step 0 first.
    assert_eq!(order, ["p0", "p3", "p6", "p9"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fanout_reaches_listening_consumers_through_pubsub() {
    let Some(url) = url("redis::fanout", "") else {
        return;
    };
    let conn = Connection::open(&url).await.unwrap();
    let ch = conn.channel().await.unwrap();
    let ex = common::unique("fan");
    let fan = Exchange::fanout(&ex);
    ch.declare_exchange(fan.clone()).await.unwrap();
    let mut consumers = Vec::new();
    for i in 0..2 {
        let q = common::unique(&format!("fan-{i}"));
        let queue = Queue::new(&q).exchange(fan.clone());
        ch.declare_queue(queue.clone()).await.unwrap();
        consumers.push(
            Consumer::builder(&ch)
                .queue(queue.no_declare(true))
                .build()
                .await
                .unwrap(),
        );
    }
    // The subscriptions are made in the background.
    tokio::time::sleep(Duration::from_millis(300)).await;
    Producer::new(&ch)
        .exchange(fan.clone().no_declare(true))
        .publish("to all", PublishOptions::default())
        .await
        .unwrap();
    for c in &mut consumers {
        let mut m = common::within("fanout", c.next()).await.unwrap().unwrap();
        assert_eq!(m.body().as_ref(), b"to all");
        m.ack().await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn global_keyprefix_prefixes_every_key() {
    let Some(url) = url("redis::prefix", "?global_keyprefix=kelptest:") else {
        return;
    };
    let conn = Connection::open(&url).await.unwrap();
    let ch = conn.channel().await.unwrap();
    let ex = common::unique("pfx-ex");
    let q = common::unique("pfx-q");
    ch.declare_exchange(Exchange::direct(&ex)).await.unwrap();
    ch.declare_queue(
        Queue::new(&q)
            .exchange(Exchange::direct(&ex))
            .routing_key("k"),
    )
    .await
    .unwrap();
    Producer::new(&ch)
        .exchange(Exchange::direct(&ex).no_declare(true))
        .publish("x", PublishOptions::default().routing_key("k"))
        .await
        .unwrap();
    let mut r = raw().await;
    let n: usize = r.llen(format!("kelptest:{q}")).await.unwrap();
    assert_eq!(n, 1);
    let bound: bool = r
        .exists(format!("kelptest:_kombu.binding.{ex}"))
        .await
        .unwrap();
    assert!(bound);
    let unprefixed: usize = r.llen(&q).await.unwrap();
    assert_eq!(unprefixed, 0);
    let got = ch.raw().get(&q, false).await.unwrap().unwrap();
    let in_unacked: bool = r.exists("kelptest:unacked").await.unwrap();
    assert!(in_unacked, "unacked keys are prefixed too");
    ch.raw().ack(got.delivery_tag, false).await.unwrap();
    ch.raw().queue_delete(&q, false, false).await.unwrap();
    ch.raw().exchange_delete(&ex, false).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_urls_are_typed_errors() {
    for u in [
        "redis://localhost/notanumber",
        "redis://localhost/0?visibility_timeout=soon",
        "redis://localhost/0?priority_steps=0,12",
    ] {
        match Connection::open(u).await {
            Err(kelp::Error::Url { .. }) => {}
            other => panic!("{u}: expected Error::Url, got {other:?}"),
        }
    }
    // Nothing listens on port 1: a typed connection error, at once.
    let started = std::time::Instant::now();
    match Connection::open("redis://127.0.0.1:1/0").await {
        Err(e @ kelp::Error::Redis { .. }) => assert!(e.is_connection_error(), "{e}"),
        other => panic!("expected Error::Redis, got {other:?}"),
    }
    assert!(started.elapsed() < Duration::from_secs(5));
}

/// Entries the batched take cannot record itself (not UTF-8, not JSON) and entries it does
/// record (a Kombu envelope with a delivery tag but a body that is not base64) both reach the
/// consumer as undecodable deliveries, and both stay in `unacked` under a tag until rejected.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_entries_taken_in_a_batch_are_kept_until_rejected() {
    let Some(url) = url("redis::bad_batch", "") else {
        return;
    };
    let q = common::unique("badbatch");
    let tag = format!("tag-{q}");
    let not_utf8: Vec<u8> = b"\xff\xfe{not json".to_vec();
    let bad_body = format!(
        r#"{{"body": "!!not base64", "content-encoding": "utf-8", "content-type": "text/plain", "headers": {{}}, "properties": {{"delivery_mode": 2, "delivery_info": {{"exchange": "", "routing_key": "{q}"}}, "priority": 0, "body_encoding": "base64", "delivery_tag": "{tag}"}}}}"#
    );
    let mut r = raw().await;
    // Both are waiting before the consumer starts, so one take moves both.
    let _: () = r.lpush(&q, &not_utf8).await.unwrap();
    let _: () = r.lpush(&q, &bad_body).await.unwrap();
    let conn = Connection::open(&url).await.unwrap();
    let ch = conn.channel().await.unwrap();
    let mut c = Consumer::builder(&ch)
        .queue(Queue::new(&q).no_declare(true))
        .prefetch_count(10)
        .build()
        .await
        .unwrap();
    let mut first = common::within("first", c.next()).await.unwrap().unwrap();
    let mut second = common::within("second", c.next()).await.unwrap().unwrap();
    for m in [&first, &second] {
        let headers = m.headers().cloned().unwrap_or_default();
        assert!(
            headers.get("x-kelp-envelope-error").is_some(),
            "marked undecodable"
        );
    }
    assert_eq!(
        first.body().as_ref(),
        &not_utf8[..],
        "the raw bytes, served first"
    );
    assert_eq!(second.body().as_ref(), bad_body.as_bytes());
    let unacked: std::collections::HashMap<String, Vec<u8>> = r.hgetall("unacked").await.unwrap();
    assert!(
        unacked.contains_key(&tag),
        "the envelope is recorded under its own delivery tag"
    );
    let mine = |all: &std::collections::HashMap<String, Vec<u8>>| {
        all.iter()
            .filter(|(k, v)| **k == tag || String::from_utf8_lossy(v).contains("{not json"))
            .count()
    };
    assert_eq!(mine(&unacked), 2, "both kept in unacked");
    first.reject(false).await.unwrap();
    second.reject(false).await.unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        let all: std::collections::HashMap<String, Vec<u8>> = r.hgetall("unacked").await.unwrap();
        if mine(&all) == 0 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "rejecting removes both from unacked"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let left: u64 = r.llen(&q).await.unwrap();
    assert_eq!(left, 0);
}

/// Publishing to a named exchange matches bindings inside Redis (one round trip): the Lua
/// topic match agrees with kelp's own Kombu-regex matcher on awkward keys, for an exchange
/// declared here (`topic`) and one only another process declared (`auto`: a binding with a
/// pattern is a topic binding).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn named_exchange_routing_in_redis_matches_kombus_topic_rules() {
    use kelp::transport::redis::keys::topic_matches;
    let Some(url) = url("redis::topic_lua", "") else {
        return;
    };
    let bindings = [
        "#", "a.#", "#.a", "*.b", "a.*.c", "a..b", "a*b", "a-b.c_d", "ü.*", "%.x", "a.#.c", "(x)",
        "a.b", "[a].$",
    ];
    let keys = [
        "a", "a.b", "a.x.c", "a..b", "a*b", "axb", "a-b.c_d", "ü.z", "%.x", "b.a", "a.b.c", "a.c",
        "(x)", "x", "[a].$", "q.b", "",
    ];
    let mut r = raw().await;
    for declared in [true, false] {
        let conn = Connection::open(&url).await.unwrap();
        let ch = conn.channel().await.unwrap();
        let ex = common::unique("topic-lua");
        let queues: Vec<String> = (0..bindings.len())
            .map(|i| common::unique(&format!("topic-lua-{i}")))
            .collect();
        ch.declare_exchange(Exchange::topic(&ex)).await.unwrap();
        for (q, b) in queues.iter().zip(bindings) {
            ch.declare_queue(Queue::new(q).exchange(Exchange::topic(&ex)).routing_key(b))
                .await
                .unwrap();
        }
        // A second connection that never declared the exchange routes by the stored bindings.
        let pconn = if declared {
            conn.clone()
        } else {
            Connection::open(&url).await.unwrap()
        };
        let pch = pconn.channel().await.unwrap();
        let p = Producer::new(&pch).exchange(Exchange::topic(&ex).no_declare(true));
        for key in keys {
            p.publish(key, PublishOptions::default().routing_key(key))
                .await
                .unwrap();
            for (q, b) in queues.iter().zip(bindings) {
                let n: u64 = r.llen(q).await.unwrap();
                assert_eq!(
                    n == 1,
                    topic_matches(b, key),
                    "binding {b:?}, routing key {key:?} (exchange declared here: {declared})"
                );
                if n > 0 {
                    let _: () = r.del(q).await.unwrap();
                }
            }
        }
        for q in &queues {
            ch.raw().queue_delete(q, false, false).await.unwrap();
        }
        ch.raw().exchange_delete(&ex, false).await.unwrap();
    }
}
