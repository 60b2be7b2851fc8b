//! `kelp::celery` against real Celery (5.7): kelp sends tasks a Celery worker (started here as a
//! subprocess) runs, and reads their results from Celery's Redis result backend; a Celery
//! client's `send_task` is received and decoded by a kelp consumer. Over `redis://` and
//! `amqp://` brokers.
//!
//! The Python is `$KELP_PYTHON`, else `/work/pyenv/bin/python` if it exists; it must be able
//! to `import celery`. Without one (or without the brokers: the result backend is always
//! Redis) each test prints a `SKIP` line and passes — unless `KELP_REQUIRE_BROKERS=1`, where
//! that is a failure. Workers are killed at the end of a test, and by a drop guard when a
//! test fails.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

#[allow(unused_macros)]
mod common;

use std::process::Command;
use std::time::Duration;

use common::python::{self, Peer, Python};
use common::within;
use kelp::celery::{self, CeleryError, TaskMessage, TaskRoute};
use kelp::{Channel, Connection, Consumer, Exchange, PublishOptions, Queue};
use serde_json::{json, Value};

/// Celery's result backend for these tests (db 1, away from the broker's db 0).
const BACKEND: &str = "redis://127.0.0.1:6379/1";
/// How long a task may take from send to stored result (the worker starts in that time).
const RESULT_WAIT: Duration = Duration::from_secs(40);
/// How long `celery_app.py send` may take to exit.
const SEND_WAIT: Duration = Duration::from_secs(30);

/// The Python with Celery.
static PYTHON: Python = Python::new(
    "celery",
    &[
        "-c",
        "import kombu, celery, redis; print(celery.__version__)",
    ],
);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Tr {
    Amqp,
    Redis,
}

/// The broker URL, the Python, and a kelp channel — or `None` after a SKIP line.
async fn setup(test: &str, tr: Tr) -> Option<(String, String, Connection, Channel)> {
    let url = match tr {
        Tr::Amqp => common::amqp_url(test)?,
        Tr::Redis => common::redis_url(test)?,
    };
    // The result backend is Redis whatever the broker.
    common::redis_url(test)?;
    let py = PYTHON.find(test)?;
    let conn = within("connect", Connection::open(&url)).await.unwrap();
    let ch = within("channel", conn.channel()).await.unwrap();
    Some((url, py, conn, ch))
}

/// A real Celery worker consuming `queue` on `broker`.
fn worker(py: &str, broker: &str, queue: &str) -> Peer {
    let mut cmd = Command::new(py);
    cmd.current_dir(python::DIR)
        .args([
            "-m",
            "celery",
            "-A",
            "celery_app",
            "worker",
            "--pool=solo",
            "-c",
            "1",
        ])
        .args(["-Q", queue, "-n", &format!("{queue}@%h")])
        .args([
            "--without-gossip",
            "--without-mingle",
            "--without-heartbeat",
            "-l",
            "warning",
        ])
        .env("KELP_CELERY_BROKER", broker)
        .env("KELP_CELERY_BACKEND", BACKEND);
    // Never waited for (no line, no exit): it runs until the test drops it.
    Peer::spawn(
        cmd,
        format!("celery worker -Q {queue} ({broker})"),
        RESULT_WAIT,
    )
}

async fn result(worker: &Peer, id: &str) -> celery::TaskResult {
    match celery::result_from_redis(BACKEND, id, RESULT_WAIT).await {
        Ok(r) => r,
        Err(e) => panic!(
            "no result for {id}: {e}\nworker output:\n{}",
            worker.output()
        ),
    }
}

// ---- kelp sends, a Celery worker runs -----------------------------------------------------------

async fn kelp_sends_celery_runs(test: &str, tr: Tr) {
    let Some((url, py, _conn, ch)) = setup(test, tr).await else {
        return;
    };
    let queue = common::unique("celery");
    let route = TaskRoute::queue(&queue);
    // Sent before the worker is up: the queue is declared by send_task and holds them.
    let add = TaskMessage::new("kelp.add").arg(2).arg(3);
    let add_id = within("send add", celery::send_task(&ch, &add, &route))
        .await
        .unwrap();
    assert_eq!(add_id, add.id);
    let args = vec![
        json!("h\u{e9}llo \u{2603}"),
        json!(1.5),
        json!([1, null, true]),
        json!({"nested": {"k": "v"}}),
        json!(1u64 << 40),
    ];
    let echo = TaskMessage::new("kelp.echo")
        .args(args.clone())
        .kwarg("x", 1)
        .kwarg("s", "\u{65e5}\u{672c}")
        .retries(2)
        .priority(3)
        .time_limit(Some(30.0), Some(20.0))
        .expires_in(Duration::from_secs(600))
        .countdown(Duration::from_millis(500));
    within("send echo", celery::send_task(&ch, &echo, &route))
        .await
        .unwrap();
    let fail = TaskMessage::new("kelp.fail").arg("boom from kelp");
    within("send fail", celery::send_task(&ch, &fail, &route))
        .await
        .unwrap();

    let w = worker(&py, &url, &queue);
    let r = result(&w, &add_id).await;
    assert!(r.is_success(), "{r:?}");
    assert_eq!(r.result, json!(5));
    assert_eq!(r.task_id, add_id);

    let r = result(&w, &echo.id).await;
    assert!(r.is_success(), "{r:?}\n{}", w.output());
    let v = &r.result;
    assert_eq!(v["args"], Value::Array(args), "{v}");
    assert_eq!(v["kwargs"], json!({"x": 1, "s": "\u{65e5}\u{672c}"}), "{v}");
    assert_eq!(v["task"], json!("kelp.echo"));
    assert_eq!(v["id"], json!(echo.id));
    assert_eq!(v["correlation_id"], json!(echo.id));
    assert_eq!(v["root_id"], json!(echo.id), "root_id defaults to the id");
    assert_eq!(v["parent_id"], Value::Null);
    assert_eq!(v["retries"], json!(2));
    assert_eq!(v["timelimit"], json!([30.0, 20.0]));
    assert_eq!(v["eta"], json!(echo.eta), "{v}");
    assert_eq!(v["expires"], json!(echo.expires), "{v}");
    assert_eq!(v["ignore_result"], json!(false));
    assert_eq!(v["origin"], json!(echo.origin));
    assert_eq!(v["delivery_info"]["routing_key"], json!(queue));
    assert!(
        v["argsrepr"]
            .as_str()
            .is_some_and(|s| s.starts_with("['h\u{e9}llo")),
        "{v}"
    );

    let r = result(&w, &fail.id).await;
    assert_eq!(r.status, "FAILURE", "{r:?}");
    assert_eq!(r.result["exc_type"], json!("ValueError"), "{r:?}");
    assert_eq!(r.result["exc_message"], json!(["boom from kelp"]), "{r:?}");
    assert!(r.traceback.as_deref().unwrap_or("").contains("ValueError"));

    drop(w);
    let _ = Queue::new(&queue).delete(&ch, false, false).await;
    let _ = Exchange::new(&queue).delete(&ch, false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kelp_sends_celery_worker_runs_redis() {
    kelp_sends_celery_runs("celery::kelp_sends_celery_worker_runs_redis", Tr::Redis).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kelp_sends_celery_worker_runs_amqp() {
    kelp_sends_celery_runs("celery::kelp_sends_celery_worker_runs_amqp", Tr::Amqp).await;
}

// ---- a Celery client sends, kelp receives -------------------------------------------------------

async fn celery_sends_kelp_receives(test: &str, tr: Tr) {
    let Some((url, py, _conn, ch)) = setup(test, tr).await else {
        return;
    };
    let queue = common::unique("celery-in");
    // Declared as Celery declares a queue of that name, so its own declare agrees.
    let q = Queue::new(&queue)
        .exchange(Exchange::direct(&queue))
        .routing_key(&queue);
    within("declare", q.clone().declare(&ch)).await.unwrap();
    let mut consumer = within(
        "consume",
        Consumer::builder(&ch)
            .queue(q.clone())
            .auto_declare(false)
            .build(),
    )
    .await
    .unwrap();

    let args = json!(["\u{e9}t\u{e9}", 2, 2.5, [null, false], {"k": [1]}]);
    let kwargs = json!({"who": "celery", "n": 1u64 << 40});
    let spec = json!({
        "task": "kelp.remote", "args": args, "kwargs": kwargs, "queue": queue,
        "retries": 3, "priority": 4, "expires": 600, "time_limit": 30, "soft_time_limit": 20,
    });
    let mut cmd = Command::new(&py);
    cmd.current_dir(python::DIR)
        .arg("celery_app.py")
        .arg("send")
        .arg(spec.to_string())
        .env("KELP_CELERY_BROKER", &url)
        .env("KELP_CELERY_BACKEND", BACKEND);
    let out = Peer::spawn(cmd, "celery_app.py send".into(), SEND_WAIT)
        .exit_ok()
        .await;
    let sent: Value = out
        .lines()
        .find_map(|l| serde_json::from_str(l).ok())
        .unwrap_or_else(|| panic!("celery_app.py send printed no JSON:\n{out}"));
    let id = sent["id"].as_str().unwrap();

    let mut msg = common::recv(&mut consumer).await;
    let t = TaskMessage::from_message(&msg).unwrap_or_else(|e| panic!("{test}: {e}: {msg:?}"));
    assert_eq!(t.task, "kelp.remote");
    assert_eq!(t.id, id);
    assert_eq!(Value::Array(t.args.clone()), args);
    assert_eq!(Value::Object(t.kwargs.clone()), kwargs);
    assert_eq!(t.retries, 3);
    assert_eq!(t.lang, "py");
    assert_eq!(t.root_id.as_deref(), Some(id));
    assert_eq!(t.parent_id, None);
    assert_eq!(t.timelimit, (Some(30.0), Some(20.0)));
    assert!(
        t.expires.as_deref().is_some_and(|e| e.contains('T')),
        "{t:?}"
    );
    assert_eq!(t.eta, None);
    assert!(t.origin.as_deref().is_some_and(|o| o.starts_with("gen")));
    assert_eq!(t.priority, Some(4));
    assert!(t.reply_to.is_some(), "Celery sets reply_to: {t:?}");
    assert_eq!(msg.correlation_id(), Some(id));
    assert_eq!(t.callbacks, Value::Null);
    assert_eq!(t.chord, Value::Null);
    assert_eq!(
        t.argsrepr.as_deref(),
        Some("['\u{e9}t\u{e9}', 2, 2.5, [None, False], {'k': [1]}]")
    );
    // What kelp would send for the same task has the same headers and body.
    let again = TaskMessage::new(&t.task)
        .id(&t.id)
        .args(t.args.clone())
        .kwargs(t.kwargs.clone())
        .retries(3)
        .time_limit(Some(30.0), Some(20.0))
        .origin(t.origin.clone().unwrap());
    assert_eq!(again.body(), msg.decode::<Value>().unwrap());
    assert_eq!(
        again.headers_json()["argsrepr"],
        json!(t.argsrepr),
        "kelp's argsrepr is Celery's"
    );
    msg.ack().await.unwrap();

    // Anything else on the queue is a typed error, not a task.
    within(
        "publish",
        kelp::Producer::new(&ch).publish_serde(
            &json!({"task": "old.style", "id": "1", "args": []}),
            PublishOptions::default().routing_key(&queue),
        ),
    )
    .await
    .unwrap();
    let mut plain = common::recv(&mut consumer).await;
    match TaskMessage::from_message(&plain) {
        Err(CeleryError::NotProtocolV2(why)) => assert!(why.contains("v1"), "{why}"),
        other => panic!("expected NotProtocolV2, got {other:?}"),
    }
    plain.ack().await.unwrap();
    consumer.cancel().await.unwrap();
    let _ = q.delete(&ch, false, false).await;
    let _ = Exchange::new(&queue).delete(&ch, false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn celery_client_sends_kelp_receives_redis() {
    celery_sends_kelp_receives("celery::celery_client_sends_kelp_receives_redis", Tr::Redis).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn celery_client_sends_kelp_receives_amqp() {
    celery_sends_kelp_receives("celery::celery_client_sends_kelp_receives_amqp", Tr::Amqp).await;
}
