//! Kombu and kelp make the same publish (declare a topic exchange and a bound queue, publish one
//! JSON message with priority, headers and properties) on the same Redis under two key
//! prefixes; the Redis state each leaves must be the same, key for key and byte for byte, but
//! for the random delivery tag.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

#[allow(unused_macros)]
mod common;

use std::collections::BTreeMap;
use std::process::Command;
use std::time::Duration;

use common::python::{Peer, Python};
use kelp::{Connection, DeliveryMode, Exchange, Producer, PublishOptions, Queue};
use redis::AsyncCommands;

/// The Python with Kombu and redis-py.
static PYTHON: Python = Python::new("kombu and redis", &["-c", "import kombu, redis"]);

/// How long the Kombu publish may take.
const KOMBU_WAIT: Duration = Duration::from_secs(40);

const KOMBU: &str = r#"
import sys
from kombu import Connection, Exchange, Queue, Producer
prefix, ex_name, q_name = sys.argv[1], sys.argv[2], sys.argv[3]
with Connection('redis://127.0.0.1:6379/0',
                transport_options={'global_keyprefix': prefix}) as c:
    ex = Exchange(ex_name, type='topic')
    q = Queue(q_name, ex, routing_key='a.*')
    p = Producer(c.channel(), exchange=ex)
    p.publish({'a': 1, 'b': [1, 2.5, None], 's': 'é'}, routing_key='a.b', priority=3,
              headers={'h': 1}, correlation_id='cid', reply_to='rq', expiration=5,
              delivery_mode='persistent', declare=[q])
"#;

/// Every key under `prefix`: its type and contents, the prefix, test names and delivery tags
/// taken out.
async fn state(prefix: &str, names: &[(&str, &str)]) -> BTreeMap<String, String> {
    let mut r = redis::Client::open("redis://127.0.0.1:6379/0")
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let keys: Vec<String> = r.keys(format!("{prefix}*")).await.unwrap();
    let norm = |s: &str| {
        let mut s = s.replacen(prefix, "", 1);
        for (from, to) in names {
            s = s.replace(from, to);
        }
        s
    };
    let mut out = BTreeMap::new();
    for k in keys {
        let kind: String = redis::cmd("TYPE")
            .arg(&k)
            .query_async(&mut r)
            .await
            .unwrap();
        let value = match kind.as_str() {
            "set" => {
                let mut m: Vec<String> = r.smembers(&k).await.unwrap();
                m.sort();
                m.iter().map(|s| norm(s)).collect::<Vec<_>>().join(" | ")
            }
            "list" => {
                let items: Vec<String> = r.lrange(&k, 0, -1).await.unwrap();
                items
                    .iter()
                    .map(|e| {
                        let mut doc: serde_json::Value = serde_json::from_str(e).unwrap();
                        let tag = doc["properties"]["delivery_tag"].take();
                        assert_eq!(tag.as_str().map(str::len), Some(36), "a uuid4 tag");
                        norm(&doc.to_string())
                    })
                    .collect::<Vec<_>>()
                    .join(" | ")
            }
            other => format!("<{other}>"),
        };
        out.insert(format!("{} ({kind})", norm(&k)), value);
        let _: () = r.del(&k).await.unwrap();
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kelp_leaves_the_redis_state_kombu_leaves() {
    let Some(redis_url) = common::redis_url("redis_kombu_state") else {
        return;
    };
    let Some(py) = PYTHON.find("redis_kombu_state") else {
        return;
    };
    let tag = common::unique("cmp");
    let (ex, q) = (format!("{tag}-ex"), format!("{tag}-q"));
    let names = [(ex.as_str(), "<EX>"), (q.as_str(), "<Q>")];

    let kombu_prefix = format!("{tag}-kombu:");
    let mut kombu = Command::new(py);
    kombu.args(["-c", KOMBU, &kombu_prefix, &ex, &q]);
    Peer::spawn(kombu, "kombu publish".into(), KOMBU_WAIT)
        .exit_ok()
        .await;
    let kombu = state(&kombu_prefix, &names).await;

    let kelp_prefix = format!("{tag}-kelp:");
    let conn = Connection::open(&format!("{redis_url}?global_keyprefix={kelp_prefix}"))
        .await
        .unwrap();
    let ch = conn.channel().await.unwrap();
    let topic = Exchange::topic(&ex);
    ch.declare_exchange(topic.clone()).await.unwrap();
    ch.declare_queue(Queue::new(&q).exchange(topic.clone()).routing_key("a.*"))
        .await
        .unwrap();
    Producer::new(&ch)
        .exchange(topic.no_declare(true))
        .publish_serde(
            &serde_json::json!({"a": 1, "b": [1, 2.5, null], "s": "é"}),
            PublishOptions::default()
                .routing_key("a.b")
                .priority(3)
                .header("h", 1i64)
                .correlation_id("cid")
                .reply_to("rq")
                .expiration(Duration::from_secs(5))
                .delivery_mode(DeliveryMode::Persistent),
        )
        .await
        .unwrap();
    let kelp = state(&kelp_prefix, &names).await;

    assert!(!kombu.is_empty(), "Kombu wrote something");
    assert_eq!(
        kelp, kombu,
        "the Redis state after the same publish, kelp (left) vs Kombu (right)"
    );
}
