//! The connection: a transport chosen by URL, with Kombu's defaults.

use std::collections::HashSet;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::task::Poll;
use std::time::Duration;

use kelp_amqp::FieldTable;

use crate::channel::Channel;
use tokio::sync::Mutex as AsyncMutex;

use crate::compression::{Compression, DEFAULT_MAX_DECOMPRESSED};
use crate::consumer::{no_handlers, Core, RawItem};
use crate::error::{mask_url, Error};
use crate::message::Codec;
use crate::recovery::{self, RecoveryEvents, RecoveryOptions};
use crate::serialization::Registry;
use crate::transport::Transport;

/// The URL used when none is given and `KELP_URL` is unset: the embedded, durable SQLite
/// transport in the working directory, so kelp works with no broker at all.
///
/// ```
/// assert_eq!(kelp::DEFAULT_URL, "sqlite://kelp.db");
/// ```
pub const DEFAULT_URL: &str = "sqlite://kelp.db";

/// Kombu's default broker, the local RabbitMQ: what `amqp://` alone means.
///
/// ```
/// assert_eq!(kelp::AMQP_DEFAULT_URL, "amqp://guest:guest@localhost:5672//");
/// ```
pub const AMQP_DEFAULT_URL: &str = "amqp://guest:guest@localhost:5672//";

/// Connection settings beyond the URL.
///
/// ```
/// let opts = kelp::ConnectOptions::default();
/// assert_eq!(opts.connect_timeout, Some(std::time::Duration::from_secs(30)));
/// ```
#[derive(Debug, Clone)]
pub struct ConnectOptions {
    /// Give up connecting after this long (default 30 s; `None` waits as long as the OS).
    pub connect_timeout: Option<Duration>,
    /// The name shown in the RabbitMQ management UI.
    pub connection_name: Option<String>,
    /// Extra client properties sent to the broker.
    pub client_properties: Option<FieldTable>,
    /// The heartbeat to ask for (AMQP; a `?heartbeat=` in the URL wins). `None`: the
    /// broker's proposal.
    pub heartbeat: Option<Duration>,
}

impl Default for ConnectOptions {
    fn default() -> Self {
        ConnectOptions {
            connect_timeout: Some(Duration::from_secs(30)),
            connection_name: None,
            client_properties: None,
            heartbeat: None,
        }
    }
}

/// Builds a [`Connection`].
///
/// ```no_run
/// # async fn demo() -> Result<(), kelp::Error> {
/// let conn = kelp::Connection::builder()
///     .url("amqp://guest:guest@localhost:5672//")
///     .connection_name("billing-worker")
///     .connect_timeout(std::time::Duration::from_secs(5))
///     .connect()
///     .await?;
/// # Ok(()) }
/// ```
#[derive(Debug, Clone)]
pub struct ConnectionBuilder {
    url: Option<String>,
    options: ConnectOptions,
    registry: Registry,
    compression: Compression,
    max_decompressed: usize,
    robust: bool,
    recovery: RecoveryOptions,
}

impl Default for ConnectionBuilder {
    fn default() -> Self {
        ConnectionBuilder {
            url: None,
            options: ConnectOptions::default(),
            registry: Registry::default(),
            compression: Compression::default(),
            max_decompressed: DEFAULT_MAX_DECOMPRESSED,
            robust: false,
            recovery: RecoveryOptions::default(),
        }
    }
}

impl ConnectionBuilder {
    /// The broker URL (default: `$KELP_URL`, else [`DEFAULT_URL`]).
    ///
    /// ```
    /// let b = kelp::Connection::builder().url("memory://");
    /// ```
    pub fn url(mut self, url: impl Into<String>) -> Self {
        self.url = Some(url.into());
        self
    }
    /// Give up connecting after `timeout`.
    ///
    /// ```
    /// let b = kelp::Connection::builder().connect_timeout(std::time::Duration::from_secs(2));
    /// ```
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.options.connect_timeout = Some(timeout);
        self
    }
    /// The heartbeat interval to ask the broker for (a dead peer is detected after two
    /// missed). A `?heartbeat=` in the URL takes precedence.
    ///
    /// ```
    /// let b = kelp::Connection::builder().heartbeat(std::time::Duration::from_secs(10));
    /// ```
    pub fn heartbeat(mut self, interval: Duration) -> Self {
        self.options.heartbeat = Some(interval);
        self
    }
    /// The connection's name in the broker's UI.
    ///
    /// ```
    /// let b = kelp::Connection::builder().connection_name("api");
    /// ```
    pub fn connection_name(mut self, name: impl Into<String>) -> Self {
        self.options.connection_name = Some(name.into());
        self
    }
    /// Extra client properties.
    ///
    /// ```
    /// let b = kelp::Connection::builder().client_properties(Default::default());
    /// ```
    pub fn client_properties(mut self, props: FieldTable) -> Self {
        self.options.client_properties = Some(props);
        self
    }
    /// The serializer registry messages use (default: Kombu's built-ins).
    ///
    /// ```
    /// let b = kelp::Connection::builder().serializers(kelp::serialization::Registry::default());
    /// ```
    pub fn serializers(mut self, registry: Registry) -> Self {
        self.registry = registry;
        self
    }
    /// The compression methods messages use (default: Kombu's).
    ///
    /// ```
    /// let b = kelp::Connection::builder().compression(kelp::compression::Compression::default());
    /// ```
    pub fn compression(mut self, compression: Compression) -> Self {
        self.compression = compression;
        self
    }
    /// The largest body a compressed message may expand to (default 64 MiB).
    ///
    /// ```
    /// let b = kelp::Connection::builder().max_decompressed_size(1 << 20);
    /// ```
    pub fn max_decompressed_size(mut self, bytes: usize) -> Self {
        self.max_decompressed = bytes;
        self
    }

    /// Make it a robust connection: it reconnects after a loss and restores its topology,
    /// channels and consumers (see [`crate::recovery`]).
    ///
    /// ```no_run
    /// # async fn demo() -> Result<(), kelp::Error> {
    /// let conn = kelp::Connection::builder()
    ///     .url("amqp://guest:guest@h1//;amqp://guest:guest@h2//")
    ///     .robust(true)
    ///     .connect()
    ///     .await?;
    /// # Ok(()) }
    /// ```
    pub fn robust(mut self, on: bool) -> Self {
        self.robust = on;
        self
    }

    /// Reconnection settings (backoff, failover order, outage timeout, `fail_fast`); makes the
    /// connection robust. `fail_fast` and the failover order apply to the first connect of any
    /// connection.
    ///
    /// ```
    /// use std::time::Duration;
    /// use kelp::recovery::{ReconnectPolicy, RecoveryOptions};
    /// let b = kelp::Connection::builder().recovery(
    ///     RecoveryOptions::default()
    ///         .reconnect(ReconnectPolicy::default().interval_max(Duration::from_secs(2))),
    /// );
    /// ```
    pub fn recovery(mut self, options: RecoveryOptions) -> Self {
        self.recovery = options;
        self.robust = true;
        self
    }

    /// On the first connect, fail at once (default) or keep retrying with the reconnect policy.
    ///
    /// ```
    /// let b = kelp::Connection::builder().fail_fast(false);
    /// ```
    pub fn fail_fast(mut self, on: bool) -> Self {
        self.recovery.fail_fast = on;
        self
    }

    /// Connect.
    ///
    /// ```no_run
    /// # async fn demo() -> Result<(), kelp::Error> {
    /// let conn = kelp::Connection::builder().url("memory://").connect().await?;
    /// # Ok(()) }
    /// ```
    pub async fn connect(self) -> Result<Connection, Error> {
        let url = match self.url {
            Some(u) => u,
            None => std::env::var("KELP_URL").unwrap_or_else(|_| DEFAULT_URL.to_owned()),
        };
        let urls = recovery::split_urls(&url);
        let (transport, robust): (Arc<dyn Transport>, _) = if self.robust {
            let t = recovery::RobustTransport::connect(urls, self.options, self.recovery).await?;
            let shared = t.shared().clone();
            (Arc::new(t), Some(shared))
        } else {
            (
                recovery::connect_first(&urls, &self.options, &self.recovery)
                    .await?
                    .1,
                None,
            )
        };
        Ok(Connection {
            inner: Arc::new(Inner {
                transport,
                url: mask_url(&url),
                codec: Arc::new(Codec {
                    registry: self.registry,
                    compression: self.compression,
                    max_decompressed: self.max_decompressed,
                }),
                declared: Mutex::new(HashSet::new()),
                consumers: Mutex::new(Vec::new()),
                drain_cursor: AtomicUsize::new(0),
                robust,
            }),
        })
    }
}

/// A connection to a broker, picked by URL scheme. Cheap to clone; the connection closes when
/// the last clone (and every channel) is dropped, or at [`Connection::close`].
///
/// ```no_run
/// # async fn demo() -> Result<(), kelp::Error> {
/// let conn = kelp::Connection::open("memory://").await?;
/// let ch = conn.channel().await?;
/// conn.close().await?;
/// # Ok(()) }
/// ```
#[derive(Debug, Clone)]
pub struct Connection {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    transport: Arc<dyn Transport>,
    url: String,
    codec: Arc<Codec>,
    declared: Mutex<HashSet<String>>,
    /// Every consumer built on this connection, for [`Connection::drain_events`].
    consumers: Mutex<Vec<Weak<AsyncMutex<Core>>>>,
    /// Where the next `drain_events` starts looking, so no consumer starves the others.
    drain_cursor: AtomicUsize,
    robust: Option<Arc<recovery::Shared>>,
}

impl Connection {
    /// A builder with Kombu's defaults.
    ///
    /// ```
    /// let b = kelp::Connection::builder();
    /// ```
    pub fn builder() -> ConnectionBuilder {
        ConnectionBuilder::default()
    }

    /// Connect to `url` with the default settings.
    ///
    /// ```no_run
    /// # async fn demo() -> Result<(), kelp::Error> {
    /// let conn = kelp::Connection::open("amqp://guest:guest@localhost:5672//").await?;
    /// # Ok(()) }
    /// ```
    pub async fn open(url: &str) -> Result<Connection, Error> {
        ConnectionBuilder::default().url(url).connect().await
    }

    /// Connect to `$KELP_URL`, or Kombu's default `amqp://guest:guest@localhost:5672//`.
    ///
    /// ```no_run
    /// # async fn demo() -> Result<(), kelp::Error> {
    /// let conn = kelp::Connection::open_default().await?;
    /// # Ok(()) }
    /// ```
    pub async fn open_default() -> Result<Connection, Error> {
        ConnectionBuilder::default().connect().await
    }

    /// Open a robust connection to `url` (aio-pika's `connect_robust`): it reconnects after a
    /// loss and restores its topology, channels and consumers. `url` may list failover brokers
    /// separated by `;`.
    ///
    /// ```no_run
    /// # async fn demo() -> Result<(), kelp::Error> {
    /// let conn = kelp::Connection::open_robust("amqp://guest:guest@localhost//").await?;
    /// assert!(conn.is_robust());
    /// # Ok(()) }
    /// ```
    pub async fn open_robust(url: &str) -> Result<Connection, Error> {
        ConnectionBuilder::default()
            .url(url)
            .robust(true)
            .connect()
            .await
    }

    /// True for a robust connection.
    ///
    /// ```
    /// # async fn demo() -> Result<(), kelp::Error> {
    /// let conn = kelp::Connection::open("memory://").await?;
    /// assert!(!conn.is_robust());
    /// # Ok(()) }
    /// ```
    pub fn is_robust(&self) -> bool {
        self.inner.robust.is_some()
    }

    /// True while connected: a robust connection that is recovering, or any closed connection,
    /// says false.
    ///
    /// ```
    /// # async fn demo() -> Result<(), kelp::Error> {
    /// let conn = kelp::Connection::open("memory://").await?;
    /// assert!(conn.is_connected());
    /// # Ok(()) }
    /// ```
    pub fn is_connected(&self) -> bool {
        match &self.inner.robust {
            Some(r) => r.is_up(),
            None => !self.inner.transport.is_closed(),
        }
    }

    /// Subscribe to a robust connection's [`recovery events`](crate::recovery::RecoveryEvent)
    /// (disconnected, reconnected, restore failures, blocked…). For a connection that is not
    /// robust the subscription yields nothing.
    ///
    /// ```no_run
    /// # async fn demo(conn: kelp::Connection) {
    /// let mut events = conn.events();
    /// while let Some(e) = events.recv().await {
    ///     println!("{e:?}");
    /// }
    /// # }
    /// ```
    pub fn events(&self) -> RecoveryEvents {
        match &self.inner.robust {
            Some(r) => r.subscribe(),
            None => RecoveryEvents { rx: None },
        }
    }

    /// Call `callback` with each recovery event of a robust connection (from a spawned task).
    ///
    /// ```no_run
    /// # async fn demo(conn: kelp::Connection) {
    /// conn.on_event(|e| eprintln!("kelp: {e:?}"));
    /// # }
    /// ```
    pub fn on_event(&self, mut callback: impl FnMut(recovery::RecoveryEvent) + Send + 'static) {
        let mut events = self.events();
        tokio::spawn(async move {
            while let Some(e) = events.recv().await {
                callback(e);
            }
        });
    }

    /// Wait until connected (Kombu's `ensure_connection`): at once if connected; for a robust
    /// connection that is recovering, until it is back or `timeout` passes.
    ///
    /// ```no_run
    /// # async fn demo(conn: kelp::Connection) -> Result<(), kelp::Error> {
    /// conn.ensure_connection(std::time::Duration::from_secs(10)).await?;
    /// # Ok(()) }
    /// ```
    pub async fn ensure_connection(&self, timeout: Duration) -> Result<(), Error> {
        match &self.inner.robust {
            Some(r) => {
                let wait = r.wait_up(std::time::Instant::now());
                match tokio::time::timeout(timeout, wait).await {
                    Ok(r) => r.map(|_| ()),
                    Err(_) => Err(Error::ConnectionDown {
                        waited: timeout,
                        url: self.inner.url.clone(),
                    }),
                }
            }
            None if self.inner.transport.is_closed() => Err(Error::Closed { what: "connection" }),
            None => Ok(()),
        }
    }

    /// Run `op` and retry it on connection errors following `policy` (Kombu's
    /// `Connection.ensure` / `autoretry`): `errback` hears each error and the wait before the
    /// next try; on a robust connection each retry also waits for the connection to be back.
    /// Other errors are returned at once.
    ///
    /// ```no_run
    /// # async fn demo(conn: kelp::Connection, ch: kelp::Channel) -> Result<(), kelp::Error> {
    /// let policy = kelp::RetryPolicy::default().max_retries(Some(5));
    /// let n = conn
    ///     .ensure(&policy, || ch.raw().queue_purge("tasks"), |e, wait| {
    ///         eprintln!("purge failed ({e}), retrying in {wait:?}")
    ///     })
    ///     .await?;
    /// # Ok(()) }
    /// ```
    pub async fn ensure<T, F, Fut>(
        &self,
        policy: &crate::RetryPolicy,
        op: F,
        mut errback: impl FnMut(&Error, Duration),
    ) -> Result<T, Error>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Result<T, Error>>,
    {
        let op = std::sync::Mutex::new(op);
        policy
            .run(
                || {
                    let fut = op.lock().map(|mut f| f());
                    let robust = self.inner.robust.clone();
                    async move {
                        if let Some(r) = robust {
                            r.wait_up(std::time::Instant::now()).await?;
                        }
                        match fut {
                            Ok(fut) => fut.await,
                            Err(_) => Err(Error::Closed { what: "connection" }),
                        }
                    }
                },
                |e, wait| errback(e, wait),
            )
            .await
    }

    /// The URL, password masked.
    ///
    /// ```no_run
    /// # async fn demo() -> Result<(), kelp::Error> {
    /// let conn = kelp::Connection::open("memory://").await?;
    /// assert_eq!(conn.url(), "memory://");
    /// # Ok(()) }
    /// ```
    pub fn url(&self) -> &str {
        &self.inner.url
    }

    /// The transport's name (`amqp`, `memory`, …).
    ///
    /// ```no_run
    /// # async fn demo() -> Result<(), kelp::Error> {
    /// let conn = kelp::Connection::open("memory://").await?;
    /// assert_eq!(conn.transport_name(), "memory");
    /// # Ok(()) }
    /// ```
    pub fn transport_name(&self) -> &'static str {
        self.inner.transport.name()
    }

    /// The transport (for advanced use).
    ///
    /// ```no_run
    /// # async fn demo(conn: &kelp::Connection) {
    /// assert!(!conn.transport().is_closed());
    /// # }
    /// ```
    pub fn transport(&self) -> &Arc<dyn Transport> {
        &self.inner.transport
    }

    pub(crate) fn codec(&self) -> Arc<Codec> {
        self.inner.codec.clone()
    }

    /// Open a channel.
    ///
    /// ```no_run
    /// # async fn demo(conn: &kelp::Connection) -> Result<(), kelp::Error> {
    /// let ch = conn.channel().await?;
    /// # Ok(()) }
    /// ```
    pub async fn channel(&self) -> Result<Channel, Error> {
        let raw = self.inner.transport.open_channel().await?;
        Ok(Channel::new(raw, self.clone()))
    }

    /// Declare `entity` unless this connection already did (Kombu's `maybe_declare`).
    /// Returns true when it was declared now.
    ///
    /// ```no_run
    /// # async fn demo(ch: &kelp::Channel) -> Result<(), kelp::Error> {
    /// let q = kelp::Queue::new("tasks");
    /// assert!(ch.connection().maybe_declare(ch, &q).await?);
    /// assert!(!ch.connection().maybe_declare(ch, &q).await?);
    /// # Ok(()) }
    /// ```
    pub async fn maybe_declare(
        &self,
        channel: &Channel,
        entity: impl Into<crate::Declarable>,
    ) -> Result<bool, Error> {
        let entity = entity.into();
        let key = entity.cache_key();
        if key.is_empty() {
            entity.declare(channel).await?;
            return Ok(true);
        }
        if self
            .inner
            .declared
            .lock()
            .map(|s| s.contains(&key))
            .unwrap_or(false)
        {
            return Ok(false);
        }
        entity.declare(channel).await?;
        if let Ok(mut s) = self.inner.declared.lock() {
            s.insert(key);
        }
        Ok(true)
    }

    /// [`Connection::maybe_declare`], retrying connection errors with `policy` (Kombu's
    /// `maybe_declare(entity, retry=True, **retry_policy)`).
    ///
    /// ```no_run
    /// # async fn demo(ch: &kelp::Channel) -> Result<(), kelp::Error> {
    /// let policy = kelp::RetryPolicy::default().max_retries(Some(3));
    /// ch.connection().maybe_declare_with_retry(ch, &kelp::Queue::new("tasks"), &policy).await?;
    /// # Ok(()) }
    /// ```
    pub async fn maybe_declare_with_retry(
        &self,
        channel: &Channel,
        entity: impl Into<crate::Declarable>,
        policy: &crate::RetryPolicy,
    ) -> Result<bool, Error> {
        let entity = entity.into();
        policy
            .run(
                || self.maybe_declare(channel, entity.clone()),
                |e, wait| tracing::warn!(error = %e, ?wait, "declare failed; retrying"),
            )
            .await
    }

    /// Forget what [`Connection::maybe_declare`] remembered (after a reconnect, say).
    ///
    /// ```no_run
    /// # async fn demo(conn: &kelp::Connection) {
    /// conn.forget_declared();
    /// # }
    /// ```
    pub fn forget_declared(&self) {
        if let Ok(mut s) = self.inner.declared.lock() {
            s.clear();
        }
    }

    pub(crate) fn register_consumer(&self, core: Weak<AsyncMutex<Core>>) {
        if let Ok(mut list) = self.inner.consumers.lock() {
            list.retain(|w| w.strong_count() > 0 && !w.ptr_eq(&core));
            list.push(core);
        }
    }

    /// Wait up to `timeout` for one message on any consumer of this connection that has
    /// callbacks (or `on_message`), and run them on it — Kombu's `connection.drain_events()`.
    /// Returns `Ok(true)` when a message was handled, `Ok(false)` when every such consumer has
    /// ended, `Err(Error::Timeout)` when nothing came in time, and `Error::InvalidArgument`
    /// when no consumer has callbacks. Consumers take turns, so a busy queue cannot starve the
    /// others. While it waits it holds each consumer, so don't call the same consumers'
    /// methods from another task at the same time.
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), kelp::Error> {
    /// use std::sync::{Arc, atomic::{AtomicUsize, Ordering}};
    /// use kelp::{Connection, Consumer, Producer, PublishOptions, Queue};
    ///
    /// let conn = Connection::open("memory://drain-doc").await?;
    /// let ch = conn.channel().await?;
    /// let seen = Arc::new(AtomicUsize::new(0));
    /// let counter = seen.clone();
    /// let _consumer = Consumer::builder(&ch)
    ///     .queue(Queue::new("jobs"))
    ///     .callback(move |body, msg| {
    ///         let counter = counter.clone();
    ///         Box::pin(async move {
    ///             println!("got {body:?}");
    ///             counter.fetch_add(1, Ordering::SeqCst);
    ///             msg.ack_log_error().await;
    ///         })
    ///     })
    ///     .build()
    ///     .await?;
    /// Producer::new(&ch).publish("hi", PublishOptions::default().routing_key("jobs")).await?;
    /// assert!(conn.drain_events(Some(std::time::Duration::from_secs(1))).await?);
    /// assert_eq!(seen.load(Ordering::SeqCst), 1);
    /// # Ok(()) }
    /// ```
    pub async fn drain_events(&self, timeout: Option<Duration>) -> Result<bool, Error> {
        let cores: Vec<Arc<AsyncMutex<Core>>> = match self.inner.consumers.lock() {
            Ok(mut list) => {
                list.retain(|w| w.strong_count() > 0);
                list.iter().filter_map(Weak::upgrade).collect()
            }
            Err(_) => Vec::new(),
        };
        let start = self.inner.drain_cursor.fetch_add(1, Ordering::Relaxed);
        let wait = async {
            let mut guards = Vec::with_capacity(cores.len());
            for core in &cores {
                let guard = core.lock().await;
                if guard.has_handlers() {
                    guards.push(guard);
                }
            }
            if guards.is_empty() {
                return Err(no_handlers());
            }
            let n = guards.len();
            let picked: Option<(usize, RawItem)> = std::future::poll_fn(|cx| {
                let mut ended = 0;
                for off in 0..n {
                    let i = (start + off) % n;
                    let Some(guard) = guards.get_mut(i) else {
                        continue;
                    };
                    match guard.poll_raw(cx) {
                        Poll::Ready(Some(item)) => return Poll::Ready(Some((i, item))),
                        Poll::Ready(None) => ended += 1,
                        Poll::Pending => {}
                    }
                }
                if ended == n {
                    Poll::Ready(None)
                } else {
                    Poll::Pending
                }
            })
            .await;
            Ok((guards, picked))
        };
        // Only the wait is timed: once a message is taken it is always handled.
        let (mut guards, picked) = match timeout {
            Some(t) => tokio::time::timeout(t, wait)
                .await
                .map_err(|_| Error::Timeout {
                    what: "an event",
                    after: t,
                })??,
            None => wait.await?,
        };
        match picked {
            Some((i, item)) => match guards.get_mut(i) {
                Some(guard) => guard.dispatch(item).await.map(|()| true),
                None => Ok(false),
            },
            None => Ok(false),
        }
    }

    /// Wait until the connection closes — by [`Connection::close`], by the broker, or by a
    /// lost network — and return why.
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), kelp::Error> {
    /// let conn = kelp::Connection::open("memory://closed-doc").await?;
    /// let watcher = conn.clone();
    /// let waiting = tokio::spawn(async move { watcher.closed().await });
    /// conn.close().await?;
    /// let why = waiting.await.map_err(|_| kelp::Error::Closed { what: "task" })?;
    /// assert!(matches!(why, kelp::Error::Closed { .. }));
    /// # Ok(()) }
    /// ```
    pub async fn closed(&self) -> Error {
        self.inner.transport.close_signal().await
    }

    /// Call `callback` with the reason once the connection closes, for any reason (aio-pika's
    /// `close_callbacks`). The callback does not keep the connection open.
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), kelp::Error> {
    /// let conn = kelp::Connection::open("memory://on-close-doc").await?;
    /// let (tx, rx) = tokio::sync::oneshot::channel();
    /// conn.on_close(move |why| { let _ = tx.send(why.to_string()); });
    /// conn.close().await?;
    /// assert!(rx.await.is_ok());
    /// # Ok(()) }
    /// ```
    pub fn on_close(&self, callback: impl FnOnce(Error) + Send + 'static) {
        let signal = self.inner.transport.close_signal();
        tokio::spawn(async move { callback(signal.await) });
    }

    /// Close the connection. Idempotent.
    ///
    /// ```no_run
    /// # async fn demo(conn: kelp::Connection) -> Result<(), kelp::Error> {
    /// conn.close().await?;
    /// # Ok(()) }
    /// ```
    pub async fn close(&self) -> Result<(), Error> {
        self.inner.transport.close().await
    }

    /// True once closed.
    ///
    /// ```no_run
    /// # async fn demo(conn: &kelp::Connection) {
    /// assert!(!conn.is_closed());
    /// # }
    /// ```
    pub fn is_closed(&self) -> bool {
        self.inner.transport.is_closed()
    }
}
