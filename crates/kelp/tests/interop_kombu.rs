//! kelp against real Python Kombu (5.7), both directions, over `amqp://` and `redis://`.
//!
//! Each test runs `tests/python/kombu_peer.py` as the other side with a JSON spec (what to
//! declare, publish and consume); the script prints what Kombu received as one JSON line.
//! Cells:
//!
//! - `messages_*`: serializers json, msgpack, yaml, pickle, raw bytes (`application/data`);
//!   compression zlib (`application/x-gzip`), bzip2, lzma, and brotli / zstd when the venv's
//!   Kombu has them (else a visible SKIP line); headers, priority, correlation_id, reply_to
//!   and expiration — all batched through one queue, told apart by a `cell` header;
//! - `topic_*`: a consumer in one language on a queue bound by the other; both publish;
//! - `fanout_*`: the consumer listens first (`READY`), then the other side publishes (on Redis
//!   fanout is PUB/SUB);
//! - `requeue_*`: a message rejected with requeue in one language comes to the other marked
//!   `redelivered`.
//!
//! The Python is `$KELP_PYTHON`, else `/work/pyenv/bin/python` if it exists; it must be able
//! to `import kombu`. Without one (or without the broker) each test prints a `SKIP` line and
//! passes — unless `KELP_REQUIRE_BROKERS=1`, where that is a failure.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

#[allow(unused_macros)]
mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use base64::Engine as _;
use common::python::{Peer, Python};
use common::within;
use kelp::amqp::{FieldTable, FieldValue};
use kelp::{Channel, Connection, Consumer, Exchange, Message, Producer, PublishOptions, Queue};
use serde_json::{json, Value};

/// How long a peer may take to print a line or to exit.
const PEER_WAIT: Duration = Duration::from_secs(30);
/// Everything kelp's consumers here accept (Kombu's defaults refuse pickle, yaml, msgpack).
const ACCEPT: [&str; 5] = ["json", "msgpack", "yaml", "pickle", "application/data"];

/// The Python with Kombu, and the compression methods its Kombu has.
static PYTHON: Python<(String, Vec<String>)> =
    Python::with("kombu", &["kombu_peer.py", "caps"], compression_methods);

/// The interpreter and the compression methods of `kombu_peer.py caps`'s report.
fn compression_methods(py: String, caps: Vec<u8>) -> Result<(String, Vec<String>), String> {
    let caps: Value = serde_json::from_slice(&caps)
        .map_err(|e| format!("kombu_peer.py caps printed no JSON: {e}"))?;
    let methods = caps["compression"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|v| v.as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default();
    Ok((py, methods))
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Tr {
    Amqp,
    Redis,
}

/// What a test runs with: the broker URL, the Python, and a kelp connection.
struct Env {
    test: String,
    tr: Tr,
    url: String,
    py: String,
    caps: Vec<String>,
    _conn: Connection,
    ch: Channel,
}

async fn setup(test: &str, tr: Tr) -> Option<Env> {
    let url = match tr {
        Tr::Amqp => common::amqp_url(test)?,
        Tr::Redis => common::redis_url(test)?,
    };
    let (py, caps) = PYTHON.find(test)?;
    let conn = within("connect", Connection::open(&url)).await.unwrap();
    let ch = within("channel", conn.channel()).await.unwrap();
    Some(Env {
        test: test.to_owned(),
        tr,
        url,
        py,
        caps,
        _conn: conn,
        ch,
    })
}

impl Env {
    fn name(&self, what: &str) -> String {
        common::unique(&format!("kombu-{what}"))
    }

    /// A queue spec for the Python side (`no_declare`: kelp declared it).
    fn py_queue(&self, q: &Queue, no_declare: bool) -> Value {
        let mut v = json!({
            "name": q.name,
            "routing_key": q.routing_key,
            "no_declare": no_declare,
        });
        if let Some(ex) = &q.exchange {
            v["exchange"] = json!({"name": ex.name, "type": ex.kind});
        }
        if self.tr == Tr::Amqp {
            v["expires"] = json!(120);
        }
        v
    }

    /// A non-durable queue bound to `exchange` with `key`, cleaned up by the broker on AMQP
    /// (`x-expires`, as the Python side declares it too).
    fn queue(&self, name: &str, exchange: Option<&Exchange>, key: &str) -> Queue {
        let mut q = Queue::new(name).durable(false).routing_key(key);
        if let Some(ex) = exchange {
            q = q.exchange(ex.clone());
        }
        if self.tr == Tr::Amqp {
            q = q.expires(Duration::from_secs(120));
        }
        q
    }

    async fn declare(&self, q: &Queue) {
        within("declare", q.clone().declare(&self.ch))
            .await
            .unwrap();
    }

    /// Run the peer with `spec` to the end and return its report.
    async fn run(&self, mut spec: Value) -> Value {
        let mut peer = self.spawn(&mut spec);
        let report = peer.json().await;
        peer.exit_ok().await;
        report
    }

    fn spawn(&self, spec: &mut Value) -> Peer {
        spec["url"] = json!(self.url);
        if spec.get("timeout").is_none() {
            spec["timeout"] = json!(20);
        }
        Peer::script(&self.py, "kombu_peer.py", &[&spec.to_string()], PEER_WAIT)
    }

    async fn consumer(&self, q: &Queue) -> Consumer {
        within(
            "consume",
            Consumer::builder(&self.ch)
                .queue(q.clone())
                .auto_declare(false)
                .accept(ACCEPT)
                .build(),
        )
        .await
        .unwrap()
    }

    async fn cleanup(&self, queues: &[&Queue], exchanges: &[&Exchange]) {
        for q in queues {
            let _ = within("queue.delete", q.delete(&self.ch, false, false)).await;
        }
        for ex in exchanges {
            let _ = within("exchange.delete", ex.delete(&self.ch, false)).await;
        }
    }
}

// ---- values ------------------------------------------------------------------------------

/// The payload every serializer cell sends: str, int, float, list, nested dict, unicode.
fn payload() -> Value {
    json!({
        "s": "h\u{e9}llo \u{2603} \u{65e5}\u{672c}\u{8a9e}",
        "i": 42,
        "neg": -7,
        "big": 1u64 << 40,
        "f": 2.718_5,
        "l": [1, "two", 3.5, [true, null]],
        "d": {"a": {"b": [1, 2], "\u{43a}\u{43b}\u{44e}\u{447}": "\u{fc}"}},
        "t": true,
        "n": null
    })
}

/// The raw-bytes cell's body (not UTF-8).
const RAW: &[u8] = b"\x00\x01\x02\xff\xfekelp\x80";

fn b64(b: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(b)
}

/// A header value as JSON (for comparing with what Kombu reports).
fn fv_json(v: &FieldValue) -> Value {
    match v {
        FieldValue::Bool(b) => json!(b),
        FieldValue::LongString(_) | FieldValue::ByteArray(_) => match v.as_str() {
            Some(s) => json!(s),
            None => json!(null),
        },
        FieldValue::F32(f) => json!(f),
        FieldValue::F64(f) => json!(f),
        FieldValue::Array(a) => Value::Array(a.iter().map(fv_json).collect()),
        FieldValue::Table(t) => table_json(t),
        FieldValue::Void => Value::Null,
        other => match other.as_i64() {
            Some(n) => json!(n),
            None => json!(format!("{other:?}")),
        },
    }
}

fn table_json(t: &FieldTable) -> Value {
    Value::Object(
        t.iter()
            .map(|(k, v)| (k.as_str().to_owned(), fv_json(v)))
            .collect(),
    )
}

fn headers_json(m: &Message) -> Value {
    m.headers().map(table_json).unwrap_or_else(|| json!({}))
}

/// `expected` ⊆ `got`, key by key.
fn assert_headers(cell: &str, got: &Value, expected: &Value) {
    for (k, v) in expected.as_object().unwrap() {
        assert_eq!(&got[k], v, "{cell}: header {k} (all headers: {got})");
    }
}

/// One message of the `messages_*` batch.
#[derive(Debug, Clone)]
struct Cell {
    name: String,
    /// `None`: raw bytes.
    serializer: Option<&'static str>,
    compression: Option<&'static str>,
    content_type: &'static str,
    content_encoding: &'static str,
    compression_header: Option<&'static str>,
    /// Carries the headers and properties checked by the `props` cell.
    props: bool,
}

fn ser_types(s: Option<&str>) -> (&'static str, &'static str) {
    match s {
        Some("json") => ("application/json", "utf-8"),
        Some("msgpack") => ("application/x-msgpack", "binary"),
        Some("yaml") => ("application/x-yaml", "utf-8"),
        Some("pickle") => ("application/x-python-serialize", "binary"),
        _ => ("application/data", "binary"),
    }
}

/// The cells of the batch; compression methods the venv's Kombu lacks get a SKIP line.
fn message_cells(env: &Env) -> Vec<Cell> {
    let mut cells = Vec::new();
    let mut add = |name: &str, serializer, compression, header, props| {
        let (ct, ce) = ser_types(serializer);
        cells.push(Cell {
            name: name.to_owned(),
            serializer,
            compression,
            content_type: ct,
            content_encoding: ce,
            compression_header: header,
            props,
        });
    };
    for s in ["json", "msgpack", "yaml", "pickle"] {
        add(s, Some(s), None, None, false);
    }
    add("raw", None, None, None, false);
    let methods: [(&'static str, &'static str, &str); 5] = [
        ("zlib", "application/x-gzip", ""),
        ("bzip2", "application/x-bz2", ""),
        ("lzma", "application/x-lzma", ""),
        (
            "brotli",
            "application/x-brotli",
            "needs the `brotli` package",
        ),
        (
            "zstd",
            "application/zstd",
            "needs `backports.zstd` on Python < 3.14",
        ),
    ];
    for (method, header, needs) in methods {
        if env.caps.iter().any(|m| m == method) {
            add(method, Some("json"), Some(method), Some(header), false);
        } else {
            common::skip(
                &format!("{} [compression {method}]", env.test),
                &format!("the venv's Kombu has no {method} ({needs})"),
            );
        }
    }
    add(
        "zlib+msgpack",
        Some("msgpack"),
        Some("zlib"),
        Some("application/x-gzip"),
        false,
    );
    add(
        "raw+bzip2",
        None,
        Some("bzip2"),
        Some("application/x-bz2"),
        false,
    );
    add("props", Some("json"), None, None, true);
    cells
}

/// The headers of the `props` cell, as JSON (the Python side sends exactly these).
fn props_headers() -> Value {
    json!({
        "x-str": "v\u{e9} \u{2603}",
        "x-int": 7,
        "x-neg": -3,
        "x-bool": true,
        "x-list": [1, "a"],
        "x-nested": {"k": "v", "n": 2}
    })
}

const CORR: &str = "corr-\u{e9}-1";
const REPLY_TO: &str = "reply-queue-1";

/// kelp's options for `cell` (routing key set by the caller).
fn kelp_options(cell: &Cell) -> PublishOptions {
    let mut o = PublishOptions::default().header("cell", cell.name.as_str());
    if let Some(c) = cell.compression {
        o = o.compression(c);
    }
    if let Some(s) = cell.serializer {
        o = o.serializer(s);
    }
    if cell.props {
        let mut nested = FieldTable::new();
        nested.insert("k", "v");
        nested.insert("n", 2i64);
        o = o
            .header("x-str", "v\u{e9} \u{2603}")
            .header("x-int", 7i64)
            .header("x-neg", -3i64)
            .header("x-bool", true)
            .header(
                "x-list",
                FieldValue::Array(vec![FieldValue::I64(1), FieldValue::from("a")]),
            )
            .header("x-nested", nested)
            .priority(5)
            .correlation_id(CORR)
            .reply_to(REPLY_TO)
            .expiration(Duration::from_secs(60));
    }
    o
}

/// The Python side's message spec for `cell`.
fn py_message(cell: &Cell, routing_key: &str) -> Value {
    let mut headers = json!({"cell": cell.name});
    let mut m = json!({"routing_key": routing_key, "compression": cell.compression});
    match cell.serializer {
        Some(s) => {
            m["serializer"] = json!(s);
            m["payload"] = payload();
        }
        None => m["raw_b64"] = json!(b64(RAW)),
    }
    if cell.props {
        for (k, v) in props_headers().as_object().unwrap() {
            headers[k] = v.clone();
        }
        m["priority"] = json!(5);
        m["correlation_id"] = json!(CORR);
        m["reply_to"] = json!(REPLY_TO);
        m["expiration"] = json!(60);
    }
    m["headers"] = headers;
    m
}

// ---- messages: serializers, compression, headers and properties ---------------------------

async fn messages_kelp_to_kombu(test: &str, tr: Tr) {
    let Some(env) = setup(test, tr).await else {
        return;
    };
    let ex = Exchange::direct(env.name("msg-ex")).durable(false);
    let q = env.queue(&env.name("msg"), Some(&ex), "m");
    env.declare(&q).await;
    let cells = message_cells(&env);
    let producer = Producer::new(&env.ch).exchange(ex.clone());
    for cell in &cells {
        let o = kelp_options(cell).routing_key("m");
        let sent = match cell.serializer {
            Some(_) => producer.publish_serde(&payload(), o).await,
            None => producer.publish(RAW.to_vec(), o).await,
        };
        sent.unwrap_or_else(|e| panic!("{test}: publish {}: {e}", cell.name));
    }
    let report = env
        .run(json!({"consume": {"queue": env.py_queue(&q, true), "count": cells.len()}}))
        .await;
    let got: BTreeMap<String, Value> = report["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| {
            (
                m["headers"]["cell"].as_str().unwrap_or("?").to_owned(),
                m.clone(),
            )
        })
        .collect();
    assert_eq!(got.len(), cells.len(), "{test}: Kombu got {report}");
    for cell in &cells {
        let m = got
            .get(&cell.name)
            .unwrap_or_else(|| panic!("{test}: Kombu did not get cell {}: {report}", cell.name));
        let what = format!("{test} [{}] Kombu received {m}", cell.name);
        assert_eq!(m["content_type"], json!(cell.content_type), "{what}");
        assert_eq!(
            m["content_encoding"],
            json!(cell.content_encoding),
            "{what}"
        );
        assert_eq!(
            m["headers"]["compression"],
            json!(cell.compression_header),
            "{what}"
        );
        match cell.serializer {
            Some(_) => assert_eq!(m["payload"], payload(), "{what}"),
            None => assert_eq!(m["raw_b64"], json!(b64(RAW)), "{what}"),
        }
        assert_eq!(m["properties"]["delivery_mode"], json!(2), "{what}");
        assert_eq!(m["delivery_info"]["routing_key"], json!("m"), "{what}");
        assert_eq!(m["delivery_info"]["redelivered"], json!(false), "{what}");
        if cell.props {
            assert_headers(&what, &m["headers"], &props_headers());
            let p = &m["properties"];
            assert_eq!(p["priority"], json!(5), "{what}");
            assert_eq!(p["correlation_id"], json!(CORR), "{what}");
            assert_eq!(p["reply_to"], json!(REPLY_TO), "{what}");
            assert_eq!(p["expiration"], json!("60000"), "{what}");
        }
    }
    env.cleanup(&[&q], &[&ex]).await;
}

async fn messages_kombu_to_kelp(test: &str, tr: Tr) {
    let Some(env) = setup(test, tr).await else {
        return;
    };
    let ex = Exchange::direct(env.name("msg-ex")).durable(false);
    let q = env.queue(&env.name("msg"), Some(&ex), "m");
    env.declare(&q).await;
    let cells = message_cells(&env);
    let msgs: Vec<Value> = cells.iter().map(|c| py_message(c, "m")).collect();
    let report = env
        .run(
            json!({"publish": {"exchange": {"name": ex.name, "type": "direct"}, "messages": msgs}}),
        )
        .await;
    assert_eq!(report["published"], json!(cells.len()), "{report}");

    let mut consumer = env.consumer(&q).await;
    let mut got: BTreeMap<String, Message> = BTreeMap::new();
    for _ in 0..cells.len() {
        let m = common::recv(&mut consumer).await;
        let cell = common::header_str(&m, "cell").unwrap_or("?").to_owned();
        got.insert(cell, m);
    }
    common::recv_nothing(&mut consumer).await;
    for cell in &cells {
        let m = got
            .get_mut(&cell.name)
            .unwrap_or_else(|| panic!("{test}: kelp did not get cell {}", cell.name));
        let what = format!("{test} [{}]: {m:?}", cell.name);
        assert_eq!(m.content_type(), Some(cell.content_type), "{what}");
        assert_eq!(m.content_encoding(), Some(cell.content_encoding), "{what}");
        assert_eq!(m.compression(), cell.compression_header, "{what}");
        match cell.serializer {
            Some(_) => {
                let v: Value = m.decode().unwrap_or_else(|e| panic!("{what}: decode: {e}"));
                assert_eq!(v, payload(), "{what}");
            }
            None => assert_eq!(m.decompressed_body().unwrap().as_ref(), RAW, "{what}"),
        }
        assert_eq!(m.properties().delivery_mode, Some(2), "{what}");
        assert_eq!(m.delivery_info().routing_key, "m", "{what}");
        assert!(!m.redelivered(), "{what}");
        if cell.props {
            assert_headers(&what, &headers_json(m), &props_headers());
            assert_eq!(m.properties().priority, Some(5), "{what}");
            assert_eq!(m.correlation_id(), Some(CORR), "{what}");
            assert_eq!(m.reply_to(), Some(REPLY_TO), "{what}");
            assert_eq!(
                m.properties().expiration.as_ref().map(|s| s.as_str()),
                Some("60000"),
                "{what}"
            );
        }
        m.ack().await.unwrap();
    }
    consumer.cancel().await.unwrap();
    env.cleanup(&[&q], &[&ex]).await;
}

// ---- topic routing across the languages -------------------------------------------------------

fn routing_keys(report: &Value) -> Vec<(String, String)> {
    let mut v: Vec<(String, String)> = report["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| {
            (
                m["payload"]["from"].as_str().unwrap_or("?").to_owned(),
                m["delivery_info"]["routing_key"]
                    .as_str()
                    .unwrap_or("?")
                    .to_owned(),
            )
        })
        .collect();
    v.sort();
    v
}

fn pairs(items: &[(&str, &str)]) -> Vec<(String, String)> {
    let mut v: Vec<_> = items
        .iter()
        .map(|(a, b)| ((*a).to_owned(), (*b).to_owned()))
        .collect();
    v.sort();
    v
}

fn py_publishes(from: &str, keys: &[&str]) -> Vec<Value> {
    keys.iter()
        .map(|k| json!({"routing_key": k, "payload": {"from": from, "rk": k}}))
        .collect()
}

async fn kelp_publishes(env: &Env, ex: &Exchange, keys: &[&str]) {
    let producer = Producer::new(&env.ch).exchange(ex.clone());
    for k in keys {
        within(
            "publish",
            producer.publish_serde(
                &json!({"from": "kelp", "rk": k}),
                PublishOptions::default().routing_key(*k),
            ),
        )
        .await
        .unwrap();
    }
}

/// kelp declares a topic binding; kelp and Kombu publish; a Kombu consumer gets what matches.
async fn topic_kelp_binding_kombu_consumer(test: &str, tr: Tr) {
    let Some(env) = setup(test, tr).await else {
        return;
    };
    let ex = Exchange::topic(env.name("topic-ex")).durable(false);
    let q = env.queue(&env.name("topic"), Some(&ex), "order.*");
    env.declare(&q).await;
    kelp_publishes(
        &env,
        &ex,
        &["order.paid", "user.created", "order.paid.late"],
    )
    .await;
    let report = env
        .run(json!({
            "consume": {"queue": env.py_queue(&q, true), "count": 2, "quiet": 0.5},
            "publish": {
                "exchange": {"name": ex.name, "type": "topic"},
                "messages": py_publishes("kombu", &["order.shipped", "invoice.sent", "order"]),
            },
        }))
        .await;
    assert_eq!(
        routing_keys(&report),
        pairs(&[("kelp", "order.paid"), ("kombu", "order.shipped")]),
        "{test}: {report}"
    );
    env.cleanup(&[&q], &[&ex]).await;
}

/// Kombu declares a topic binding; Kombu and kelp publish; a kelp consumer gets what matches.
async fn topic_kombu_binding_kelp_consumer(test: &str, tr: Tr) {
    let Some(env) = setup(test, tr).await else {
        return;
    };
    let ex = Exchange::topic(env.name("topic-ex")).durable(false);
    let q = env.queue(&env.name("topic"), Some(&ex), "*.critical.#");
    let report = env
        .run(json!({
            "declare": [env.py_queue(&q, false)],
            "publish": {
                "exchange": {"name": ex.name, "type": "topic"},
                "messages": py_publishes("kombu", &["db.critical.disk", "db.info", "app.critical"]),
            },
        }))
        .await;
    assert_eq!(report["published"], json!(3), "{report}");
    kelp_publishes(
        &env,
        &ex,
        &["net.critical.link.down", "net.warning", "net.critical"],
    )
    .await;
    // On AMQP `#` matches zero or more words. On Redis both sides use Kombu's regex for the
    // binding (`^[^\.]+\.critical\..*?$`): the dot before `#` is required, so `app.critical`
    // and `net.critical` stay out — in Kombu and in kelp alike.
    let expected = match tr {
        Tr::Amqp => pairs(&[
            ("kombu", "db.critical.disk"),
            ("kombu", "app.critical"),
            ("kelp", "net.critical.link.down"),
            ("kelp", "net.critical"),
        ]),
        Tr::Redis => pairs(&[
            ("kombu", "db.critical.disk"),
            ("kelp", "net.critical.link.down"),
        ]),
    };
    let mut consumer = env.consumer(&q).await;
    let mut got = Vec::new();
    for _ in 0..expected.len() {
        let mut m = common::recv(&mut consumer).await;
        let v: Value = m.decode().unwrap();
        got.push((
            v["from"].as_str().unwrap().to_owned(),
            m.delivery_info().routing_key.to_owned(),
        ));
        m.ack().await.unwrap();
    }
    common::recv_nothing(&mut consumer).await;
    got.sort();
    assert_eq!(got, expected, "{test}");
    consumer.cancel().await.unwrap();
    env.cleanup(&[&q], &[&ex]).await;
}

// ---- fanout across the languages ----------------------------------------------------------------

/// A Kombu consumer listens on a fanout exchange kelp declared (beside a kelp consumer);
/// kelp publishes after READY.
async fn fanout_kelp_to_kombu(test: &str, tr: Tr) {
    let Some(env) = setup(test, tr).await else {
        return;
    };
    let ex = Exchange::fanout(env.name("fan-ex")).durable(false);
    within("exchange.declare", ex.declare(&env.ch))
        .await
        .unwrap();
    let mine = env.queue(&env.name("fan-kelp"), Some(&ex), "");
    env.declare(&mine).await;
    let mut consumer = env.consumer(&mine).await;
    let theirs = env.queue(&env.name("fan-kombu"), Some(&ex), "");
    let mut peer = env.spawn(&mut json!({
        "consume": {"queue": env.py_queue(&theirs, false), "count": 2, "quiet": 0.5, "ready": true},
    }));
    peer.ready().await;
    kelp_publishes(&env, &ex, &["", ""]).await;
    let report = peer.json().await;
    peer.exit_ok().await;
    assert_eq!(
        routing_keys(&report),
        pairs(&[("kelp", ""), ("kelp", "")]),
        "{test}: {report}"
    );
    for _ in 0..2 {
        let mut m = common::recv(&mut consumer).await;
        assert_eq!(m.decode::<Value>().unwrap()["from"], json!("kelp"));
        m.ack().await.unwrap();
    }
    common::recv_nothing(&mut consumer).await;
    consumer.cancel().await.unwrap();
    env.cleanup(&[&mine, &theirs], &[&ex]).await;
}

/// Two kelp consumers listen on a fanout exchange; Kombu publishes to it.
async fn fanout_kombu_to_kelp(test: &str, tr: Tr) {
    let Some(env) = setup(test, tr).await else {
        return;
    };
    let ex = Exchange::fanout(env.name("fan-ex")).durable(false);
    let qa = env.queue(&env.name("fan-a"), Some(&ex), "");
    let qb = env.queue(&env.name("fan-b"), Some(&ex), "");
    env.declare(&qa).await;
    env.declare(&qb).await;
    let mut ca = env.consumer(&qa).await;
    let mut cb = env.consumer(&qb).await;
    // Let the subscriptions settle (PUB/SUB on Redis delivers only to listeners).
    tokio::time::sleep(Duration::from_millis(300)).await;
    let report = env
        .run(json!({"publish": {
            "exchange": {"name": ex.name, "type": "fanout"},
            "messages": py_publishes("kombu", &["", ""]),
        }}))
        .await;
    assert_eq!(report["published"], json!(2), "{report}");
    for c in [&mut ca, &mut cb] {
        for _ in 0..2 {
            let mut m = common::recv(c).await;
            assert_eq!(m.decode::<Value>().unwrap()["from"], json!("kombu"));
            m.ack().await.unwrap();
        }
        common::recv_nothing(c).await;
        c.cancel().await.unwrap();
    }
    env.cleanup(&[&qa, &qb], &[&ex]).await;
}

// ---- reject with requeue in one language, redelivered in the other ---------------------------

async fn requeue_kelp_to_kombu(test: &str, tr: Tr) {
    let Some(env) = setup(test, tr).await else {
        return;
    };
    let name = env.name("requeue");
    let q = env.queue(&name, None, &name);
    env.declare(&q).await;
    let body = json!({"from": "kelp", "n": 1, "s": "\u{2603}"});
    within(
        "publish",
        Producer::new(&env.ch).publish_serde(&body, PublishOptions::default().routing_key(&q.name)),
    )
    .await
    .unwrap();
    let mut m = common::get_eventually(&env.ch, &q.name).await;
    assert!(!m.redelivered());
    m.reject(true).await.unwrap();
    let report = env
        .run(json!({"consume": {"queue": env.py_queue(&q, true), "count": 1}}))
        .await;
    let got = &report["messages"];
    assert_eq!(got.as_array().map(Vec::len), Some(1), "{test}: {report}");
    assert_eq!(got[0]["payload"], body, "{test}: {report}");
    assert_eq!(
        got[0]["delivery_info"]["redelivered"],
        json!(true),
        "{test}: Kombu must see kelp's requeue as a redelivery: {report}"
    );
    env.cleanup(&[&q], &[]).await;
}

async fn requeue_kombu_to_kelp(test: &str, tr: Tr) {
    let Some(env) = setup(test, tr).await else {
        return;
    };
    let name = env.name("requeue");
    let q = env.queue(&name, None, &name);
    env.declare(&q).await;
    let report = env
        .run(json!({
            "consume": {"queue": env.py_queue(&q, true), "count": 1, "quiet": 0, "requeue": true},
            "publish": {"exchange": null, "messages": py_publishes("kombu", &[q.name.as_str()])},
        }))
        .await;
    let first = &report["messages"][0];
    assert_eq!(
        first["delivery_info"]["redelivered"],
        json!(false),
        "{report}"
    );
    let mut consumer = env.consumer(&q).await;
    let mut m = common::recv(&mut consumer).await;
    assert_eq!(
        m.decode::<Value>().unwrap(),
        json!({"from": "kombu", "rk": q.name}),
        "{test}"
    );
    assert!(
        m.redelivered(),
        "{test}: kelp must see Kombu's requeue as a redelivery"
    );
    m.ack().await.unwrap();
    common::recv_nothing(&mut consumer).await;
    consumer.cancel().await.unwrap();
    env.cleanup(&[&q], &[]).await;
}

// ---- the tests: cell × direction × transport ---------------------------------------------------

macro_rules! interop_tests {
    ($($(#[$attr:meta])* $name:ident => $f:ident($tr:expr);)*) => {$(
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        $(#[$attr])*
        async fn $name() {
            let test = concat!("interop_kombu::", stringify!($name));
            if tokio::time::timeout(Duration::from_secs(50), $f(test, $tr)).await.is_err() {
                panic!("{test}: did not finish within 50 s (hang)");
            }
        }
    )*};
}

interop_tests! {
    messages_kelp_to_kombu_amqp => messages_kelp_to_kombu(Tr::Amqp);
    messages_kelp_to_kombu_redis => messages_kelp_to_kombu(Tr::Redis);
    messages_kombu_to_kelp_amqp => messages_kombu_to_kelp(Tr::Amqp);
    messages_kombu_to_kelp_redis => messages_kombu_to_kelp(Tr::Redis);
    topic_kelp_binding_kombu_consumer_amqp => topic_kelp_binding_kombu_consumer(Tr::Amqp);
    topic_kelp_binding_kombu_consumer_redis => topic_kelp_binding_kombu_consumer(Tr::Redis);
    topic_kombu_binding_kelp_consumer_amqp => topic_kombu_binding_kelp_consumer(Tr::Amqp);
    topic_kombu_binding_kelp_consumer_redis => topic_kombu_binding_kelp_consumer(Tr::Redis);
    fanout_kelp_to_kombu_amqp => fanout_kelp_to_kombu(Tr::Amqp);
    fanout_kelp_to_kombu_redis => fanout_kelp_to_kombu(Tr::Redis);
    fanout_kombu_to_kelp_amqp => fanout_kombu_to_kelp(Tr::Amqp);
    fanout_kombu_to_kelp_redis => fanout_kombu_to_kelp(Tr::Redis);
    requeue_kelp_to_kombu_amqp => requeue_kelp_to_kombu(Tr::Amqp);
    requeue_kelp_to_kombu_redis => requeue_kelp_to_kombu(Tr::Redis);
    requeue_kombu_to_kelp_amqp => requeue_kombu_to_kelp(Tr::Amqp);
    requeue_kombu_to_kelp_redis => requeue_kombu_to_kelp(Tr::Redis);
}
