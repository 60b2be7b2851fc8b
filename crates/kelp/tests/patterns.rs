//! `kelp::patterns` against the local RabbitMQ: RPC (JSON and pickle, typed, errors,
//! expiration, local timeout, unknown methods, direct reply-to, a named exchange, 100
//! concurrent calls) and master/worker (JSON and pickle, reject, nack, non-dict payloads,
//! unroutable tasks). Skipped with a SKIP line when RabbitMQ is not running.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

#[allow(unused_macros)]
mod common;

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::within;
use kelp::patterns::{
    CallOptions, Format, Master, MasterOptions, RemoteError, Rpc, RpcError, RpcOptions, TaskError,
    WorkerOptions,
};
use kelp::{Channel, Connection, Queue};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use tokio::sync::mpsc;

async fn open(test: &str) -> Option<(Connection, Channel)> {
    let url = common::amqp_url(test)?;
    let conn = within("connect", Connection::open(&url)).await.unwrap();
    let ch = within("channel", conn.channel()).await.unwrap();
    Some((conn, ch))
}

async fn delete_queue(ch: &Channel, name: &str) {
    let _ = within("queue.delete", Queue::new(name).delete(ch, false, false)).await;
}

#[derive(Debug, Serialize, Deserialize, PartialEq)]
struct Add {
    x: i64,
    y: i64,
}

#[derive(Debug, Serialize, Deserialize, PartialEq)]
struct Sum {
    sum: i64,
    who: String,
}

/// One callee and one caller, each on its own connection, as in real life.
async fn call_round_trip(test: &str, format: Format) {
    let Some((_c1, callee_ch)) = open(test).await else {
        return;
    };
    let (_c2, caller_ch) = open(test).await.unwrap();
    let method = common::unique("add");
    let callee = within("create", Rpc::create(&callee_ch, RpcOptions::new(format)))
        .await
        .unwrap();
    within(
        "register",
        callee.register(&method, |a: Add| async move {
            Ok(Sum {
                sum: a.x + a.y,
                who: "kelp".into(),
            })
        }),
    )
    .await
    .unwrap();
    let caller = within("create", Rpc::create(&caller_ch, RpcOptions::new(format)))
        .await
        .unwrap();

    let v = within("call", caller.call(&method, &json!({"x": 2, "y": 3})))
        .await
        .unwrap();
    assert_eq!(v, json!({"sum": 5, "who": "kelp"}));
    let typed: Sum = within(
        "call_typed",
        caller.call_typed(&method, &Add { x: 40, y: 2 }, CallOptions::default()),
    )
    .await
    .unwrap();
    assert_eq!(typed.sum, 42);
    // Arguments that do not fit the handler: a TypeError, as Python raises for bad kwargs.
    match within("bad call", caller.call(&method, &json!({"x": "two"}))).await {
        Err(RpcError::Remote(e)) => assert_eq!(e.kind, "TypeError", "{e:?}"),
        other => panic!("expected a TypeError, got {other:?}"),
    }

    caller.close().await.unwrap();
    callee.close().await.unwrap();
    delete_queue(&callee_ch, &method).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rpc_json_round_trip() {
    call_round_trip("patterns::rpc_json_round_trip", Format::Json).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rpc_pickle_round_trip() {
    call_round_trip("patterns::rpc_pickle_round_trip", Format::Pickle).await;
}

async fn remote_error(test: &str, format: Format) {
    let Some((_c, ch)) = open(test).await else {
        return;
    };
    let rpc = Rpc::create(&ch, RpcOptions::new(format)).await.unwrap();
    let method = common::unique("fail");
    rpc.register(&method, |v: Value| async move {
        let n = v["n"].as_i64().unwrap_or(0);
        match n {
            1 => Err::<(), _>(RpcError::Remote(
                RemoteError::new("ValueError", "bad input")
                    .with_args(vec![json!("bad input"), json!(n)]),
            )),
            2 => Err(RpcError::remote("OrderNotFound", "sku-9")),
            _ => panic!("handler panics on purpose"),
        }
    })
    .await
    .unwrap();

    match within("call", rpc.call(&method, &json!({"n": 1}))).await {
        Err(RpcError::Remote(e)) => {
            assert_eq!(e.kind, "ValueError");
            assert_eq!(e.args, vec![json!("bad input"), json!(1)]);
        }
        other => panic!("expected a remote ValueError, got {other:?}"),
    }
    match within("call", rpc.call(&method, &json!({"n": 2}))).await {
        Err(RpcError::Remote(e)) => match format {
            Format::Json => assert_eq!(
                (e.kind.as_str(), e.message.as_str()),
                ("OrderNotFound", "sku-9")
            ),
            // Pickle can only carry classes Python can import: a RuntimeError that names it.
            Format::Pickle => {
                assert_eq!(
                    (e.kind.as_str(), e.message.as_str()),
                    ("RuntimeError", "OrderNotFound: sku-9")
                )
            }
        },
        other => panic!("expected a remote error, got {other:?}"),
    }
    match within("call", rpc.call(&method, &json!({"n": 3}))).await {
        Err(RpcError::Remote(e)) => {
            assert_eq!(e.kind, "RuntimeError");
            assert!(e.message.contains("panicked"), "{e:?}");
        }
        other => panic!("expected a RuntimeError for a panic, got {other:?}"),
    }
    rpc.close().await.unwrap();
    delete_queue(&ch, &method).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rpc_json_remote_error() {
    remote_error("patterns::rpc_json_remote_error", Format::Json).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rpc_pickle_remote_error() {
    remote_error("patterns::rpc_pickle_remote_error", Format::Pickle).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rpc_expired_call_comes_back_through_the_dlx() {
    for direct in [false, true] {
        let Some((_c, ch)) = open("patterns::rpc_expired").await else {
            return;
        };
        let rpc = Rpc::create(&ch, RpcOptions::new(Format::Json).direct_reply_to(direct))
            .await
            .unwrap();
        let method = common::unique("nobody-home");
        // A method queue (with its x-dead-letter-exchange) that nobody consumes.
        rpc.register(&method, |v: Value| async move { Ok(v) })
            .await
            .unwrap();
        rpc.unregister(&method).await.unwrap();
        let opts = CallOptions::default().expiration(Duration::from_millis(200));
        match within("expiring call", rpc.call_with(&method, &json!({}), opts)).await {
            Err(RpcError::Expired { method: m }) => assert_eq!(m, method),
            other => panic!("expected Expired (direct reply-to: {direct}), got {other:?}"),
        }
        rpc.close().await.unwrap();
        delete_queue(&ch, &method).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rpc_local_timeout() {
    let Some((_c, ch)) = open("patterns::rpc_local_timeout").await else {
        return;
    };
    let rpc = Rpc::create(&ch, RpcOptions::new(Format::Json))
        .await
        .unwrap();
    let method = common::unique("slow");
    rpc.register(&method, |_: Value| async move {
        tokio::time::sleep(Duration::from_secs(2)).await;
        Ok(1)
    })
    .await
    .unwrap();
    let opts = CallOptions::default().timeout(Duration::from_millis(200));
    match within("call", rpc.call_with(&method, &json!({}), opts)).await {
        Err(RpcError::Timeout { after, .. }) => assert_eq!(after, Duration::from_millis(200)),
        other => panic!("expected Timeout, got {other:?}"),
    }
    // The late answer is dropped quietly and the RPC still works.
    let v = within("call", rpc.call(&method, &json!({}))).await.unwrap();
    assert_eq!(v, json!(1));
    rpc.close().await.unwrap();
    delete_queue(&ch, &method).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rpc_unknown_method_is_returned() {
    for confirm in [true, false] {
        let Some((_c, ch)) = open("patterns::rpc_unknown_method").await else {
            return;
        };
        let rpc = Rpc::create(&ch, RpcOptions::new(Format::Pickle).confirm(confirm))
            .await
            .unwrap();
        let method = common::unique("no-such-method");
        match within("call", rpc.call(&method, &json!({}))).await {
            Err(RpcError::NoSuchMethod { method: m }) => assert_eq!(m, method),
            other => panic!("expected NoSuchMethod (confirm: {confirm}), got {other:?}"),
        }
        rpc.close().await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rpc_direct_reply_to() {
    let Some((_c1, callee_ch)) = open("patterns::rpc_direct_reply_to").await else {
        return;
    };
    let (_c2, caller_ch) = open("patterns::rpc_direct_reply_to").await.unwrap();
    let method = common::unique("echo");
    let callee = Rpc::create(&callee_ch, RpcOptions::new(Format::Pickle))
        .await
        .unwrap();
    callee
        .register(&method, |v: Value| async move { Ok(json!({"echo": v})) })
        .await
        .unwrap();
    let caller = Rpc::create(
        &caller_ch,
        RpcOptions::new(Format::Pickle).direct_reply_to(true),
    )
    .await
    .unwrap();
    for i in 0..10 {
        let v = within("call", caller.call(&method, &json!({"i": i})))
            .await
            .unwrap();
        assert_eq!(v, json!({"echo": {"i": i}}));
    }
    caller.close().await.unwrap();
    callee.close().await.unwrap();
    delete_queue(&callee_ch, &method).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rpc_through_a_named_exchange() {
    let Some((_c, ch)) = open("patterns::rpc_named_exchange").await else {
        return;
    };
    let exchange = common::unique("rpc-ex");
    let rpc = Rpc::create(&ch, RpcOptions::new(Format::Json).exchange(&exchange))
        .await
        .unwrap();
    let method = common::unique("mul");
    assert_eq!(rpc.routing_key(&method), format!("{exchange}::{method}"));
    rpc.register(&method, |a: Add| async move { Ok(a.x * a.y) })
        .await
        .unwrap();
    // The queue is named `<exchange>::<method>`, as in aio-pika.
    common::count(&ch, &format!("{exchange}::{method}")).await;
    let v = within("call", rpc.call(&method, &Add { x: 6, y: 7 }))
        .await
        .unwrap();
    assert_eq!(v, json!(42));
    rpc.close().await.unwrap();
    delete_queue(&ch, &format!("{exchange}::{method}")).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rpc_hundred_concurrent_calls() {
    for direct in [false, true] {
        let Some((_c1, callee_ch)) = open("patterns::rpc_hundred").await else {
            return;
        };
        let (_c2, caller_ch) = open("patterns::rpc_hundred").await.unwrap();
        let method = common::unique("square");
        let callee = Rpc::create(&callee_ch, RpcOptions::new(Format::Json))
            .await
            .unwrap();
        let running = Arc::new(AtomicU32::new(0));
        let peak = Arc::new(AtomicU32::new(0));
        let (r, p) = (running.clone(), peak.clone());
        callee
            .register(&method, move |v: Value| {
                let (r, p) = (r.clone(), p.clone());
                async move {
                    let now = r.fetch_add(1, Ordering::SeqCst) + 1;
                    p.fetch_max(now, Ordering::SeqCst);
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    r.fetch_sub(1, Ordering::SeqCst);
                    let n = v["n"].as_i64().unwrap();
                    Ok(n * n)
                }
            })
            .await
            .unwrap();
        let caller = Rpc::create(
            &caller_ch,
            RpcOptions::new(Format::Json).direct_reply_to(direct),
        )
        .await
        .unwrap();
        let mut set = tokio::task::JoinSet::new();
        for n in 0..100i64 {
            let caller = caller.clone();
            let method = method.clone();
            set.spawn(async move {
                let r: i64 = caller
                    .call_typed(&method, &json!({"n": n}), CallOptions::default())
                    .await
                    .unwrap();
                (n, r)
            });
        }
        let mut got = 0;
        while let Some(done) = within("100 calls", set.join_next()).await {
            let (n, r) = done.unwrap();
            assert_eq!(r, n * n);
            got += 1;
        }
        assert_eq!(got, 100);
        assert!(
            peak.load(Ordering::SeqCst) > 1,
            "handlers should run concurrently"
        );
        caller.close().await.unwrap();
        callee.close().await.unwrap();
        delete_queue(&callee_ch, &method).await;
    }
}

#[derive(Debug, Deserialize)]
struct Job {
    id: u32,
}

async fn master_worker(test: &str, format: Format) {
    let Some((_c1, worker_ch)) = open(test).await else {
        return;
    };
    let (_c2, master_ch) = open(test).await.unwrap();
    let name = common::unique("jobs");
    let (tx, mut rx) = mpsc::unbounded_channel();
    let worker = Master::new(&worker_ch, format)
        .create_worker(&name, move |job: Job| {
            let tx = tx.clone();
            async move {
                tx.send(job.id).unwrap();
                Ok(())
            }
        })
        .await
        .unwrap();
    let master = Master::new(&master_ch, format);
    for id in 0..20u32 {
        within("create_task", master.create_task(&name, &json!({"id": id})))
            .await
            .unwrap();
    }
    let mut seen = Vec::new();
    while seen.len() < 20 {
        seen.push(within("task", rx.recv()).await.unwrap());
    }
    seen.sort_unstable();
    assert_eq!(seen, (0..20).collect::<Vec<_>>());
    worker.close().await.unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(common::count(&master_ch, &name).await, 0);
    delete_queue(&master_ch, &name).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn master_worker_json() {
    master_worker("patterns::master_worker_json", Format::Json).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn master_worker_pickle() {
    master_worker("patterns::master_worker_pickle", Format::Pickle).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn worker_reject_nack_failure_and_non_dict_payloads() {
    let Some((_c, ch)) = open("patterns::worker_settles").await else {
        return;
    };
    // Rejected (requeue = false) tasks are dead-lettered here, so we can see them.
    let dlq = common::unique("dead");
    ch.declare_queue(Queue::new(&dlq).durable(false))
        .await
        .unwrap();
    let name = common::unique("settle");
    let mut args = kelp::amqp::FieldTable::new();
    args.insert("x-dead-letter-exchange", "");
    args.insert("x-dead-letter-routing-key", dlq.as_str());
    let options = WorkerOptions {
        arguments: args,
        ..Default::default()
    };
    let calls = Arc::new(std::sync::Mutex::new(Vec::<(String, bool)>::new()));
    let seen = calls.clone();
    let master = Master::with_options(
        &ch,
        MasterOptions::new(Format::Json).reject_on_redelivered(true),
    );
    let worker = master
        .create_worker_with(&name, options, move |v: Value| {
            let seen = seen.clone();
            async move {
                let what = v["what"].as_str().unwrap_or("empty").to_owned();
                let first = {
                    let mut s = seen.lock().unwrap();
                    let first = !s.iter().any(|(w, _)| *w == what);
                    s.push((what.clone(), first));
                    first
                };
                match what.as_str() {
                    "reject" => Err(TaskError::Reject { requeue: false }),
                    "nack-then-ok" if first => Err(TaskError::Nack { requeue: true }),
                    // Failed: requeued once, then (redelivered + reject_on_redelivered) dropped.
                    "fail" => Err(TaskError::failed("boom")),
                    _ => Ok(()),
                }
            }
        })
        .await
        .unwrap();

    for what in ["reject", "nack-then-ok", "fail"] {
        master
            .create_task(&name, &json!({"what": what}))
            .await
            .unwrap();
    }
    master.create_task(&name, &json!([1, 2, 3])).await.unwrap(); // not a dict
    master.create_task(&name, &json!(null)).await.unwrap(); // falsy: {}

    let mut dead = Vec::new();
    for _ in 0..3 {
        let m = common::get_eventually(&ch, &dlq).await;
        dead.push(common::text(&m));
    }
    dead.sort();
    assert_eq!(
        dead,
        vec!["[1,2,3]", r#"{"what":"fail"}"#, r#"{"what":"reject"}"#]
    );
    tokio::time::sleep(Duration::from_millis(200)).await;
    let calls = calls.lock().unwrap().clone();
    let count = |w: &str| calls.iter().filter(|(x, _)| x == w).count();
    assert_eq!(count("reject"), 1);
    assert_eq!(count("nack-then-ok"), 2);
    assert_eq!(count("fail"), 2);
    assert_eq!(
        count("empty"),
        1,
        "a null payload counts as {{}}: {calls:?}"
    );
    assert_eq!(calls.len(), 6, "the list payload never reaches the handler");
    assert_eq!(common::count(&ch, &name).await, 0);
    worker.close().await.unwrap();
    delete_queue(&ch, &name).await;
    delete_queue(&ch, &dlq).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unroutable_task_is_an_error() {
    let Some((_c, ch)) = open("patterns::unroutable_task").await else {
        return;
    };
    let master = Master::new(&ch, Format::Pickle);
    let err = master
        .create_task(&common::unique("no-workers"), &json!({}))
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            kelp::Error::Returned {
                reply_code: 312,
                ..
            }
        ),
        "{err:?}"
    );
}

/// The in-process transport has headers exchanges, confirms and returns too: the patterns
/// run there without a broker.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn patterns_on_the_memory_transport() {
    let url = common::memory_url("patterns::memory").unwrap();
    let conn = Connection::open(&url).await.unwrap();
    let ch = conn.channel().await.unwrap();
    for format in [Format::Json, Format::Pickle] {
        let rpc = Rpc::create(&ch, RpcOptions::new(format)).await.unwrap();
        let method = common::unique("mem-add");
        rpc.register(&method, |a: Add| async move { Ok(a.x + a.y) })
            .await
            .unwrap();
        let v = within("call", rpc.call(&method, &Add { x: 1, y: 2 }))
            .await
            .unwrap();
        assert_eq!(v, json!(3));
        match within("missing", rpc.call("nope", &json!({}))).await {
            Err(RpcError::NoSuchMethod { .. }) => {}
            other => panic!("expected NoSuchMethod, got {other:?}"),
        }
        // Expiration is left out here: on memory://, a call dead-lettered into the result
        // queue by its TTL stays there (message_count 1) and the waiting consumer is not woken
        // — a transport bug reported to its owner. RabbitMQ covers it above.
        rpc.close().await.unwrap();
    }
    let (tx, mut rx) = mpsc::unbounded_channel();
    let master = Master::new(&ch, Format::Pickle);
    let worker = master
        .create_worker("mem-jobs", move |j: Job| {
            let tx = tx.clone();
            async move {
                tx.send(j.id).unwrap();
                Ok(())
            }
        })
        .await
        .unwrap();
    master
        .create_task("mem-jobs", &json!({"id": 9}))
        .await
        .unwrap();
    assert_eq!(within("task", rx.recv()).await, Some(9));
    worker.close().await.unwrap();
}
