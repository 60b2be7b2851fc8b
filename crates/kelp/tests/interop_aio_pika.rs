//! `kelp::patterns` against real aio-pika (9.x): each test runs a small aio-pika script from
//! `tests/python/` as the other side of an RPC or master/worker exchange, over the local
//! RabbitMQ.
//!
//! The Python is `$KELP_PYTHON`, else `/work/pyenv/bin/python` if it exists; it must be able
//! to `import aio_pika`. Without one (or without RabbitMQ) each test prints a `SKIP` line and
//! passes — unless `KELP_REQUIRE_BROKERS=1`, where that is a failure. The scripts bound every
//! wait and exit on their own; the tests bound theirs too and kill a peer left running.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

#[allow(unused_macros)]
mod common;

use std::time::Duration;

use common::python::{Peer, Python};
use common::within;
use kelp::patterns::{
    CallOptions, Format, Master, RemoteError, Rpc, RpcError, RpcOptions, TaskError,
};
use kelp::{Channel, Connection, Queue};
use serde_json::{json, Value};
use tokio::sync::mpsc;

/// How long a peer may take to print a line or to exit.
const PEER_WAIT: Duration = Duration::from_secs(40);

/// The Python with aio-pika.
static PYTHON: Python = Python::new(
    "aio_pika",
    &["-c", "import aio_pika; print(aio_pika.__version__)"],
);

/// Both RabbitMQ and aio-pika, or `None` after a SKIP line.
fn setup(test: &str) -> Option<(String, String)> {
    let url = common::amqp_url(test)?;
    let py = PYTHON.find(test)?;
    Some((url, py))
}

async fn open(url: &str) -> (Connection, Channel) {
    let conn = within("connect", Connection::open(url)).await.unwrap();
    let ch = within("channel", conn.channel()).await.unwrap();
    (conn, ch)
}

async fn delete_queue(ch: &Channel, name: &str) {
    let _ = within("queue.delete", Queue::new(name).delete(ch, false, false)).await;
}

fn fmt_name(format: Format) -> &'static str {
    match format {
        Format::Json => "json",
        Format::Pickle => "pickle",
    }
}

/// The kwargs `rpc_peer.py caller` sends (its `KWARGS`), as JSON.
fn python_kwargs() -> Value {
    json!({
        "x": 2, "y": 3, "text": "h\u{e9}llo \u{2603}", "ratio": 0.25, "big": 1u64 << 40,
        "neg": -7, "flag": true, "nothing": null, "items": [1, "two", [3.5]],
        "nested": {"a": {"b": [true, false]}}
    })
}

// ---- RPC: aio-pika caller → kelp callee -------------------------------------------------

async fn aio_pika_calls_kelp(test: &str, format: Format) {
    let Some((url, py)) = setup(test) else {
        return;
    };
    let (_conn, ch) = open(&url).await;
    let method = common::unique("py-to-kelp");
    let rpc = Rpc::create(&ch, RpcOptions::new(format)).await.unwrap();
    rpc.register(&method, |kw: Value| async move {
        let sum = kw["x"].as_i64().unwrap_or(0) + kw["y"].as_i64().unwrap_or(0);
        Ok(json!({"sum": sum, "kwargs": kw, "who": "kelp"}))
    })
    .await
    .unwrap();
    rpc.register(&format!("{method}_fail"), |kw: Value| async move {
        Err::<(), _>(RpcError::Remote(
            RemoteError::new("ValueError", "bad input")
                .with_args(vec![json!("bad input"), kw["n"].clone()]),
        ))
    })
    .await
    .unwrap();
    let idle = format!("{method}_idle");
    rpc.register(&idle, |v: Value| async move { Ok(v) })
        .await
        .unwrap();
    rpc.unregister(&idle).await.unwrap();

    let mut peer = Peer::script(
        &py,
        "rpc_peer.py",
        &["caller", &url, &method, fmt_name(format), "20"],
        PEER_WAIT,
    );
    let report: Value = serde_json::from_str(&peer.line().await).unwrap();
    peer.exit_ok().await;

    assert_eq!(report["result"]["sum"], json!(5), "{report}");
    assert_eq!(report["result"]["who"], json!("kelp"));
    assert_eq!(
        report["result"]["kwargs"],
        python_kwargs(),
        "every type survives the trip"
    );
    match format {
        // JsonRPC raises JsonRPCError("RPC exception", payload).
        Format::Json => {
            assert_eq!(report["error"]["class"], json!("JsonRPCError"), "{report}");
            assert_eq!(
                report["error"]["payload"]["error"]["type"],
                json!("ValueError")
            );
            assert_eq!(
                report["error"]["payload"]["error"]["args"],
                json!(["bad input", 7])
            );
        }
        // RPC raises the unpickled exception itself.
        Format::Pickle => {
            assert_eq!(report["error"]["class"], json!("ValueError"), "{report}");
            assert_eq!(report["error"]["args"], json!(["bad input", 7]));
        }
    }
    assert_eq!(report["missing"], json!("MessageProcessError"), "{report}");
    assert_eq!(report["expired"], json!("dead-lettered"), "{report}");

    rpc.close().await.unwrap();
    for q in [method.clone(), format!("{method}_fail"), idle] {
        delete_queue(&ch, &q).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn aio_pika_json_rpc_calls_kelp() {
    aio_pika_calls_kelp("interop::aio_pika_json_rpc_calls_kelp", Format::Json).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn aio_pika_pickle_rpc_calls_kelp() {
    aio_pika_calls_kelp("interop::aio_pika_pickle_rpc_calls_kelp", Format::Pickle).await;
}

// ---- RPC: kelp caller → aio-pika callee -------------------------------------------------

async fn kelp_calls_aio_pika(test: &str, format: Format) {
    let Some((url, py)) = setup(test) else {
        return;
    };
    let (_conn, ch) = open(&url).await;
    let method = common::unique("kelp-to-py");
    let mut peer = Peer::script(
        &py,
        "rpc_peer.py",
        &["callee", &url, &method, fmt_name(format), "30"],
        PEER_WAIT,
    );
    peer.ready().await;

    for direct in [false, true] {
        let rpc = Rpc::create(&ch, RpcOptions::new(format).direct_reply_to(direct))
            .await
            .unwrap();
        let kwargs = json!({"x": 40, "y": 2, "text": "\u{e9}t\u{e9}", "l": [1.5, null, false], "big": -(1i64 << 40)});
        let v = within("call", rpc.call(&method, &kwargs)).await.unwrap();
        assert_eq!(v["sum"], json!(42), "{v}");
        assert_eq!(v["who"], json!("aio-pika"));
        assert_eq!(v["kwargs"], kwargs, "every type survives the trip");

        #[derive(serde::Serialize)]
        struct Args {
            x: i32,
            y: i32,
        }
        #[derive(serde::Deserialize)]
        struct Answer {
            sum: i64,
        }
        let a: Answer = within(
            "typed call",
            rpc.call_typed(&method, &Args { x: 1, y: 1 }, CallOptions::default()),
        )
        .await
        .unwrap();
        assert_eq!(a.sum, 2);

        match within(
            "failing call",
            rpc.call(&format!("{method}_fail"), &json!({"n": 7})),
        )
        .await
        {
            Err(RpcError::Remote(e)) => {
                assert_eq!(e.kind, "ValueError", "{e:?}");
                assert_eq!(e.args, vec![json!("bad input"), json!(7)]);
                match format {
                    // JsonRPC's message is repr(exc).
                    Format::Json => assert_eq!(e.message, "ValueError('bad input', 7)"),
                    Format::Pickle => assert_eq!(e.message, r#"["bad input",7]"#),
                }
            }
            other => panic!("expected a remote ValueError, got {other:?}"),
        }
        match within(
            "missing",
            rpc.call(&format!("{method}_missing"), &json!({})),
        )
        .await
        {
            Err(RpcError::NoSuchMethod { .. }) => {}
            other => panic!("expected NoSuchMethod, got {other:?}"),
        }
        let opts = CallOptions::default().expiration(Duration::from_millis(300));
        match within(
            "expiring",
            rpc.call_with(&format!("{method}_idle"), &json!({}), opts),
        )
        .await
        {
            Err(RpcError::Expired { .. }) => {}
            other => panic!("expected Expired (direct reply-to: {direct}), got {other:?}"),
        }
        rpc.close().await.unwrap();
    }

    let rpc = Rpc::create(&ch, RpcOptions::new(format)).await.unwrap();
    let bye = within("stop", rpc.call(&format!("{method}_stop"), &json!({})))
        .await
        .unwrap();
    assert_eq!(bye, json!("bye"));
    rpc.close().await.unwrap();
    peer.exit_ok().await;
    delete_queue(&ch, &format!("{method}_idle")).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kelp_calls_aio_pika_json_rpc() {
    kelp_calls_aio_pika("interop::kelp_calls_aio_pika_json_rpc", Format::Json).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kelp_calls_aio_pika_pickle_rpc() {
    kelp_calls_aio_pika("interop::kelp_calls_aio_pika_pickle_rpc", Format::Pickle).await;
}

// ---- Master: aio-pika master → kelp worker ----------------------------------------------

async fn aio_pika_master_feeds_kelp(test: &str, format: Format) {
    let Some((url, py)) = setup(test) else {
        return;
    };
    let (_conn, ch) = open(&url).await;
    let queue = common::unique("py-tasks");
    let (tx, mut rx) = mpsc::unbounded_channel();
    let worker = Master::new(&ch, format)
        .create_worker(&queue, move |kw: Value| {
            let tx = tx.clone();
            async move {
                tx.send(kw).map_err(TaskError::failed)?;
                Ok(())
            }
        })
        .await
        .unwrap();
    let peer = Peer::script(
        &py,
        "master_peer.py",
        &["master", &url, &queue, fmt_name(format), "5"],
        PEER_WAIT,
    );
    peer.exit_ok().await;
    let mut got = Vec::new();
    for _ in 0..5 {
        got.push(within("task", rx.recv()).await.unwrap());
    }
    got.sort_by_key(|v| v["id"].as_i64());
    for (i, kw) in got.iter().enumerate() {
        assert_eq!(
            kw,
            &json!({"id": i, "text": "t\u{e2}che", "items": [i, null, true]})
        );
    }
    worker.close().await.unwrap();
    delete_queue(&ch, &queue).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn aio_pika_json_master_feeds_kelp_worker() {
    aio_pika_master_feeds_kelp("interop::aio_pika_json_master", Format::Json).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn aio_pika_pickle_master_feeds_kelp_worker() {
    aio_pika_master_feeds_kelp("interop::aio_pika_pickle_master", Format::Pickle).await;
}

// ---- Master: kelp master → aio-pika worker ----------------------------------------------

async fn kelp_master_feeds_aio_pika(test: &str, format: Format) {
    let Some((url, py)) = setup(test) else {
        return;
    };
    let (_conn, ch) = open(&url).await;
    let queue = common::unique("kelp-tasks");
    let mut peer = Peer::script(
        &py,
        "master_peer.py",
        &["worker", &url, &queue, fmt_name(format), "6", "30"],
        PEER_WAIT,
    );
    peer.ready().await;
    let master = Master::new(&ch, format);
    let mut sent = Vec::new();
    for i in 0..4 {
        let kw = json!({"id": i, "text": "\u{2603}", "l": [0.5, null], "big": 1u64 << 40});
        master.create_task(&queue, &kw).await.unwrap();
        sent.push(kw);
    }
    // Settled by the aio-pika worker with RejectMessage / NackMessage.
    for kw in [
        json!({"id": 4, "reject": true}),
        json!({"id": 5, "nack": true}),
    ] {
        master.create_task(&queue, &kw).await.unwrap();
        sent.push(kw);
    }
    let mut got = Vec::new();
    for _ in 0..6 {
        got.push(serde_json::from_str::<Value>(&peer.line().await).unwrap());
    }
    peer.exit_ok().await;
    got.sort_by_key(|v| v["id"].as_i64());
    assert_eq!(got, sent);
    // The worker's queue was auto-delete: gone with its consumer, nothing left behind.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let gone = Queue::new(&queue).passive(true).declare(&ch).await;
    assert_eq!(gone.unwrap_err().reply_code(), Some(404));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kelp_json_master_feeds_aio_pika_worker() {
    kelp_master_feeds_aio_pika("interop::kelp_json_master", Format::Json).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kelp_pickle_master_feeds_aio_pika_worker() {
    kelp_master_feeds_aio_pika("interop::kelp_pickle_master", Format::Pickle).await;
}
