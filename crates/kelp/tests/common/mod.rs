//! Shared by the conformance suite: which transports it runs on, unique names, timeouts and
//! small helpers that keep the tests about behaviour rather than plumbing. [`python`] finds and
//! runs the Python peers of the interop tests.
//!
//! # Adding a transport
//!
//! Write a `fn <name>_url(test: &str) -> Option<String>` below (`None` = its server is down:
//! print a SKIP line, or panic under `KELP_REQUIRE_BROKERS=1`) and add one line to the
//! `define_transports!` call. Every conformance test then runs on it as `<test>::<name>`.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used, clippy::panic)]

pub mod python;

use std::future::Future;
use std::io::Write;
use std::net::{TcpStream, ToSocketAddrs};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use kelp::amqp::{FieldTable, FieldValue};
use kelp::{
    Channel, Connection, ConnectionBuilder, Consumer, Error, Exchange, Message, Producer,
    PublishOptions, Queue,
};

/// Defines `for_each_transport!` and `if_transport!` from one list of `name => url_fn`.
/// `$d` is a `$` token handed in so the generated macros can have metavariables of their own.
macro_rules! define_transports {
    ($d:tt $($tr:ident => $url:path),+ $(,)?) => {
        /// `for_each_transport!(m!(args…))` expands `m!(transport, url_fn, args…);` per transport.
        macro_rules! for_each_transport {
            ($d m:ident ! ($d ($d args:tt)*)) => {
                $( $d m!($tr, $url, $d ($d args)*); )+
            };
        }
        /// `if_transport!(a, b, { yes } { no })`: `yes` when `a` and `b` name the same transport.
        #[allow(unused_macros)]
        macro_rules! if_transport {
            $( ($tr, $tr, { $d ($d yes:tt)* } { $d ($d no:tt)* }) => { $d ($d yes)* }; )+
            ($d a:ident, $d b:ident, { $d ($d yes:tt)* } { $d ($d no:tt)* }) => { $d ($d no)* };
        }
    };
}

// The transports every conformance test runs on. One line per transport.
define_transports! {$
    memory => crate::common::memory_url,
    amqp => crate::common::amqp_url,
    redis => crate::common::redis_url,
    sqlite => crate::common::sqlite_url,
}

/// Runs conformance tests on every transport. Each test is a plain
/// `async fn name(t: &Target)` in its file (so rustfmt and clippy see it whole), listed here:
///
/// ```ignore
/// conformance_tests! {
///     fifo_per_queue,
///     #[known_bug(memory; "BUG: …")]
///     something_memory_gets_wrong,
/// }
/// ```
///
/// Each name gets a module with one `#[tokio::test]` per transport (`name::memory`,
/// `name::amqp`, …). `#[known_bug(t1, t2; "BUG: …")]` marks the test `#[ignore]` on the
/// transports listed; it still runs with `--ignored`. `#[not_on(t; "N/A on t: why")]` does the
/// same for a behaviour the transport does not have by design (Kombu's Redis transport has no
/// TTLs, for one); the reason is printed with the ignored test. A test left out of the list is an
/// unused function, which `clippy -D warnings` refuses.
macro_rules! conformance_tests {
    ($( $(#[$mark:ident($($bug:ident),+ ; $why:literal)])? $name:ident ),* $(,)?) => {$(
        mod $name {
            for_each_transport!(conformance_test!($name, [$($($bug)+ ; $why)?]));
        }
    )*};
}

/// One test of one transport; scans the known-bug list for the transport.
macro_rules! conformance_test {
    ($tr:ident, $url:path, $name:ident, []) => {
        conformance_test_fn!($tr, $url, $name);
    };
    ($tr:ident, $url:path, $name:ident, [; $why:literal]) => {
        conformance_test_fn!($tr, $url, $name);
    };
    ($tr:ident, $url:path, $name:ident, [$b:ident $($rest:ident)* ; $why:literal]) => {
        if_transport!($tr, $b, {
            conformance_test_fn!($tr, $url, $name, $why);
        } {
            conformance_test!($tr, $url, $name, [$($rest)* ; $why]);
        });
    };
}

macro_rules! conformance_test_fn {
    ($tr:ident, $url:path, $name:ident $(, $why:literal)?) => {
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        $(#[ignore = $why])?
        async fn $tr() {
            $crate::common::run(stringify!($tr), $url, module_path!(), |t| async move {
                super::$name(&t).await
            })
            .await;
        }
    };
}

/// How long anything that should happen may take.
pub const WAIT: Duration = Duration::from_secs(5);
/// How long to watch before concluding that nothing is coming.
pub const QUIET: Duration = Duration::from_millis(300);
/// The most one await in a test may take before it counts as a hang.
pub const STEP: Duration = Duration::from_secs(10);
/// The most a whole test may take.
pub const TEST_LIMIT: Duration = Duration::from_secs(60);

static N: AtomicU32 = AtomicU32::new(0);

/// A name unique to this process and call.
pub fn unique(what: &str) -> String {
    format!(
        "kelp-conf-{}-{}-{what}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

/// `memory://`: always there; one broker per test, so tests never see each other.
pub fn memory_url(test: &str) -> Option<String> {
    Some(format!("memory://{}", unique(&test.replace("::", "."))))
}

/// The local RabbitMQ (`KELP_AMQP_URL`, `KELP_AMQP_ADDR` override), or `None` with a SKIP line.
pub fn amqp_url(test: &str) -> Option<String> {
    let addr = std::env::var("KELP_AMQP_ADDR").unwrap_or_else(|_| "127.0.0.1:5672".into());
    let url =
        std::env::var("KELP_AMQP_URL").unwrap_or_else(|_| format!("amqp://guest:guest@{addr}/%2f"));
    server_up(test, "RabbitMQ", &addr).then_some(url)
}

/// A fresh SQLite file per test under the system temp dir: always there, never shared.
pub fn sqlite_url(test: &str) -> Option<String> {
    let dir = std::env::temp_dir().join("kelp-conformance");
    let _ = std::fs::create_dir_all(&dir);
    Some(format!(
        "sqlite://{}/{}.db",
        dir.display(),
        unique(&test.replace("::", "."))
    ))
}

/// The local Redis (`KELP_REDIS_URL`, `KELP_REDIS_ADDR` override), or `None` with a SKIP line.
pub fn redis_url(test: &str) -> Option<String> {
    let addr = std::env::var("KELP_REDIS_ADDR").unwrap_or_else(|_| "127.0.0.1:6379".into());
    let url = std::env::var("KELP_REDIS_URL").unwrap_or_else(|_| format!("redis://{addr}/0"));
    server_up(test, "Redis", &addr).then_some(url)
}

/// True if something answers on `addr`. Otherwise a visible SKIP line, or a panic under
/// `KELP_REQUIRE_BROKERS=1` (CI).
pub fn server_up(test: &str, what: &str, addr: &str) -> bool {
    let up = addr
        .to_socket_addrs()
        .ok()
        .and_then(|mut addrs| addrs.next())
        .is_some_and(|a| TcpStream::connect_timeout(&a, Duration::from_secs(2)).is_ok());
    if up {
        return true;
    }
    if require_brokers() {
        panic!("{test}: no {what} at {addr} and KELP_REQUIRE_BROKERS=1");
    }
    skip(
        test,
        &format!("no broker at {addr} ({what} is not answering)"),
    );
    false
}

/// True under `KELP_REQUIRE_BROKERS=1` (CI): a missing broker or Python peer is a failure,
/// not a skip.
pub fn require_brokers() -> bool {
    std::env::var("KELP_REQUIRE_BROKERS").as_deref() == Ok("1")
}

/// Print `SKIP {test}: {why}` where it is seen: straight to the process's stderr, as the test
/// harness captures `eprintln!` of passing tests.
pub fn skip(test: &str, why: &str) {
    let _ = writeln!(std::io::stderr(), "SKIP {test}: {why}");
}

/// What a conformance test runs against.
#[derive(Debug)]
pub struct Target {
    /// The transport's name (`memory`, `amqp`, …).
    pub transport: &'static str,
    /// The test's path, for messages.
    pub test: &'static str,
    url: String,
}

/// Run one test on one transport, failing it (not hanging) after [`TEST_LIMIT`].
pub async fn run<F, Fut>(
    transport: &'static str,
    url: fn(&str) -> Option<String>,
    test: &'static str,
    f: F,
) where
    F: FnOnce(Target) -> Fut,
    Fut: Future<Output = ()>,
{
    let Some(url) = url(&format!("{test}::{transport}")) else {
        return;
    };
    let t = Target {
        transport,
        test,
        url,
    };
    if tokio::time::timeout(TEST_LIMIT, f(t)).await.is_err() {
        panic!("{test} on {transport}: did not finish within {TEST_LIMIT:?} (hang)");
    }
}

/// Await `fut`, failing the test (instead of hanging it) after [`STEP`].
pub async fn within<F: Future>(what: &str, fut: F) -> F::Output {
    match tokio::time::timeout(STEP, fut).await {
        Ok(v) => v,
        Err(_) => panic!("{what}: no answer within {STEP:?} (hang)"),
    }
}

impl Target {
    /// The URL to connect to.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// True for the in-process transport.
    pub fn is_memory(&self) -> bool {
        self.transport == "memory"
    }

    /// A unique queue or exchange name.
    pub fn name(&self, what: &str) -> String {
        unique(what)
    }

    /// Connect with the defaults.
    pub async fn connect(&self) -> Connection {
        self.connect_with(Connection::builder()).await
    }

    /// Connect with `builder`'s settings (its URL is replaced by the target's).
    pub async fn connect_with(&self, builder: ConnectionBuilder) -> Connection {
        within("connect", builder.url(self.url.clone()).connect())
            .await
            .unwrap_or_else(|e| panic!("{} on {}: connect: {e}", self.test, self.transport))
    }

    /// A connection and a channel on it.
    pub async fn open(&self) -> (Connection, Channel) {
        let conn = self.connect().await;
        let ch = channel(&conn).await;
        (conn, ch)
    }

    /// A connection and a channel in publisher-confirm mode. Use it where a test counts
    /// messages right after publishing: RabbitMQ answers a passive declare ahead of
    /// publishes it has not processed yet, so only confirmed publishes are sure to be counted.
    pub async fn open_confirmed(&self) -> (Connection, Channel) {
        let (conn, ch) = self.open().await;
        within("confirm.select", ch.confirm_select()).await.unwrap();
        (conn, ch)
    }

    /// A queue with a unique name that cleans up after itself on a real broker (non-durable,
    /// `x-expires` of two minutes; its auto-delete exchanges go with its bindings).
    pub fn queue(&self, what: &str) -> Queue {
        let q = Queue::new(self.name(what)).durable(false);
        if self.is_memory() {
            q
        } else {
            q.expires(Duration::from_secs(120))
        }
    }

    /// An exchange of `kind` with a unique name (non-durable, auto-delete).
    pub fn exchange(&self, kind: &str, what: &str) -> Exchange {
        Exchange::new(self.name(what))
            .kind(kind)
            .durable(false)
            .auto_delete(true)
    }
}

/// A new channel.
pub async fn channel(conn: &Connection) -> Channel {
    within("open a channel", conn.channel()).await.unwrap()
}

/// Declare `q` (with its exchange and bindings) and return it with its name filled in.
pub async fn declare(ch: &Channel, mut q: Queue) -> Queue {
    within("declare a queue", q.declare(ch)).await.unwrap();
    q
}

/// Declare `ex`.
pub async fn declare_exchange(ch: &Channel, ex: &Exchange) {
    within("declare an exchange", ex.declare(ch)).await.unwrap();
}

/// Delete exchanges an auto-delete would never remove (never bound, or bound in a cycle), so
/// a broker does not collect them run after run.
pub async fn delete_exchanges(ch: &Channel, exchanges: &[&Exchange]) {
    for ex in exchanges {
        within("exchange.delete", ex.delete(ch, false))
            .await
            .unwrap();
    }
}

/// Bind `q` to `exchange` with `key` and binding `args`.
pub async fn bind(ch: &Channel, q: &Queue, exchange: &Exchange, key: &str, args: FieldTable) {
    within("bind", q.bind_to(ch, &exchange.name, key, args))
        .await
        .unwrap();
}

/// Publish text `body` to `exchange` with `key`.
pub async fn publish(ch: &Channel, exchange: &str, key: &str, body: &str) {
    publish_with(ch, exchange, key, body, PublishOptions::default()).await;
}

/// Publish text `body` with `opts` (exchange and routing key set here).
pub async fn publish_with(
    ch: &Channel,
    exchange: &str,
    key: &str,
    body: &str,
    opts: PublishOptions,
) {
    try_publish(ch, exchange, key, body, opts).await.unwrap();
}

/// Publish text `body` with `opts`, returning the outcome.
pub async fn try_publish(
    ch: &Channel,
    exchange: &str,
    key: &str,
    body: &str,
    opts: PublishOptions,
) -> Result<(), Error> {
    let opts = opts.exchange(exchange).routing_key(key);
    within("publish", Producer::new(ch).publish(body, opts)).await
}

/// `basic.get` one message (to be acknowledged), or `None`.
pub async fn get(ch: &Channel, queue: &str) -> Option<Message> {
    within("basic.get", Queue::new(queue).get(ch, false))
        .await
        .unwrap()
}

/// `basic.get` until a message comes, failing after [`WAIT`] (for things that happen
/// asynchronously on a broker, such as dead-lettering).
pub async fn get_eventually(ch: &Channel, queue: &str) -> Message {
    let deadline = Instant::now() + WAIT;
    loop {
        if let Some(m) = get(ch, queue).await {
            return m;
        }
        assert!(
            Instant::now() < deadline,
            "no message arrived in {queue} within {WAIT:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Every message now in `queue`, taken with `no_ack`, as text.
pub async fn drain(ch: &Channel, queue: &str) -> Vec<String> {
    let mut out = Vec::new();
    while let Some(m) = within("basic.get", Queue::new(queue).get(ch, true))
        .await
        .unwrap()
    {
        out.push(text(&m));
        assert!(out.len() < 10_000, "{queue} never ran dry");
    }
    out
}

/// Ready messages in `queue` (a passive declare).
pub async fn count(ch: &Channel, queue: &str) -> u32 {
    within(
        "passive queue.declare",
        Queue::new(queue).passive(true).declare(ch),
    )
    .await
    .unwrap()
    .message_count
}

/// The body as text.
pub fn text(m: &Message) -> String {
    String::from_utf8_lossy(m.body()).into_owned()
}

/// The next message of `c`, failing after [`WAIT`].
pub async fn recv(c: &mut Consumer) -> Message {
    match within("consumer.next", c.next_timeout(WAIT)).await {
        Ok(Some(m)) => m,
        Ok(None) => panic!("the consumer ended while a message was expected"),
        Err(e) => panic!("no message within {WAIT:?}: {e}"),
    }
}

/// Assert that `c` gets nothing for [`QUIET`].
pub async fn recv_nothing(c: &mut Consumer) {
    match within("consumer.next", c.next_timeout(QUIET)).await {
        Err(Error::Timeout { .. }) => {}
        Ok(Some(m)) => panic!("unexpected message {:?}", text(&m)),
        Ok(None) => panic!("the consumer ended unexpectedly"),
        Err(e) => panic!("unexpected error {e}"),
    }
}

/// A consumer of `queue` (declared as given unless already declared: `auto_declare(false)`).
pub async fn consumer(ch: &Channel, queue: &Queue) -> Consumer {
    within(
        "start a consumer",
        Consumer::builder(ch)
            .queue(queue.clone())
            .auto_declare(false)
            .build(),
    )
    .await
    .unwrap()
}

/// A header as text.
pub fn header_str<'a>(m: &'a Message, key: &str) -> Option<&'a str> {
    m.headers()
        .and_then(|h| h.get(key))
        .and_then(|v| v.as_str())
}

/// The `reason` of the newest `x-death` entry of a dead-lettered message.
pub fn death_reason(m: &Message) -> Option<String> {
    let deaths = m.headers()?.get("x-death")?;
    let FieldValue::Array(list) = deaths else {
        return None;
    };
    let FieldValue::Table(first) = list.first()? else {
        return None;
    };
    first.get("reason")?.as_str().map(str::to_owned)
}

/// A binding-argument table from pairs of strings.
pub fn table(pairs: &[(&str, &str)]) -> FieldTable {
    let mut t = FieldTable::new();
    for (k, v) in pairs {
        t.insert(*k, *v);
    }
    t
}

/// Read `c` in the background, acking everything (after holding each message for `hold`),
/// until it has been quiet for `quiet` after at least `min_wait`; returns the consumer and the
/// bodies it got. Use it to make a consumer compete for messages while the test reads another.
pub fn collect_in_background(
    mut c: Consumer,
    min_wait: Duration,
    quiet: Duration,
    hold: Duration,
) -> tokio::task::JoinHandle<(Consumer, Vec<String>)> {
    tokio::spawn(async move {
        let start = Instant::now();
        let mut got = Vec::new();
        loop {
            match c.next_timeout(quiet).await {
                Ok(Some(mut m)) => {
                    got.push(text(&m));
                    tokio::time::sleep(hold).await;
                    m.ack().await.unwrap();
                }
                Ok(None) => break,
                Err(Error::Timeout { .. }) if start.elapsed() >= min_wait => break,
                Err(Error::Timeout { .. }) => {}
                Err(e) => panic!("background consumer: {e}"),
            }
        }
        (c, got)
    })
}
