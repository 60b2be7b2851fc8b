//! The blocking connection and its builder.

use std::future::Future;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Weak};
use std::task::Poll;
use std::time::Duration;

use kelp_amqp::FieldTable;

use super::consumer::{no_handlers, ConsumerShared};
use super::{check_not_async, new_runtime, Channel, Producer, Shared, SimpleBuffer, SimpleQueue};
use crate::compression::Compression;
use crate::error::Error;
use crate::recovery::RecoveryOptions;
use crate::serialization::Registry;
use crate::simple::SimpleOptions;

/// Builds a blocking [`Connection`]: every setting of [`crate::ConnectionBuilder`].
///
/// ```
/// # fn main() -> Result<(), kelp::Error> {
/// use std::time::Duration;
/// let conn = kelp::blocking::Connection::builder()
///     .url("memory://blocking-builder-doc")
///     .connection_name("billing-worker")
///     .connect_timeout(Duration::from_secs(5))
///     .connect()?;
/// assert_eq!(conn.transport_name(), "memory");
/// # Ok(()) }
/// ```
#[derive(Debug, Clone, Default)]
pub struct ConnectionBuilder {
    inner: crate::ConnectionBuilder,
}

impl From<crate::ConnectionBuilder> for ConnectionBuilder {
    fn from(inner: crate::ConnectionBuilder) -> Self {
        ConnectionBuilder { inner }
    }
}

macro_rules! forward {
    ($($(#[$m:meta])* $name:ident($($arg:ident: $t:ty),*);)*) => {$(
        $(#[$m])*
        pub fn $name(self, $($arg: $t),*) -> Self {
            ConnectionBuilder { inner: self.inner.$name($($arg),*) }
        }
    )*};
}

impl ConnectionBuilder {
    forward! {
        /// The broker URL (default: `$KELP_URL`, else [`crate::DEFAULT_URL`]).
        ///
        /// ```
        /// let b = kelp::blocking::Connection::builder().url("memory://");
        /// ```
        url(url: impl Into<String>);
        /// Give up connecting after `timeout`.
        ///
        /// ```
        /// let b = kelp::blocking::Connection::builder().connect_timeout(std::time::Duration::from_secs(2));
        /// ```
        connect_timeout(timeout: Duration);
        /// The heartbeat interval to ask the broker for; the background runtime sends the
        /// heartbeats even while the program is busy elsewhere.
        ///
        /// ```
        /// let b = kelp::blocking::Connection::builder().heartbeat(std::time::Duration::from_secs(10));
        /// ```
        heartbeat(interval: Duration);
        /// The connection's name in the broker's UI.
        ///
        /// ```
        /// let b = kelp::blocking::Connection::builder().connection_name("api");
        /// ```
        connection_name(name: impl Into<String>);
        /// Extra client properties.
        ///
        /// ```
        /// let b = kelp::blocking::Connection::builder().client_properties(Default::default());
        /// ```
        client_properties(props: FieldTable);
        /// The serializer registry messages use.
        ///
        /// ```
        /// let b = kelp::blocking::Connection::builder()
        ///     .serializers(kelp::serialization::Registry::default());
        /// ```
        serializers(registry: Registry);
        /// The compression methods messages use.
        ///
        /// ```
        /// let b = kelp::blocking::Connection::builder()
        ///     .compression(kelp::compression::Compression::default());
        /// ```
        compression(compression: Compression);
        /// The largest body a compressed message may expand to (default 64 MiB).
        ///
        /// ```
        /// let b = kelp::blocking::Connection::builder().max_decompressed_size(1 << 20);
        /// ```
        max_decompressed_size(bytes: usize);
        /// Make it a robust connection (reconnects and restores its topology after a loss).
        ///
        /// ```
        /// let b = kelp::blocking::Connection::builder().robust(true);
        /// ```
        robust(on: bool);
        /// Reconnection settings; makes the connection robust.
        ///
        /// ```
        /// let b = kelp::blocking::Connection::builder()
        ///     .recovery(kelp::recovery::RecoveryOptions::default());
        /// ```
        recovery(options: RecoveryOptions);
        /// On the first connect, fail at once (default) or keep retrying.
        ///
        /// ```
        /// let b = kelp::blocking::Connection::builder().fail_fast(false);
        /// ```
        fail_fast(on: bool);
    }

    /// Start the background runtime and connect.
    ///
    /// ```
    /// # fn main() -> Result<(), kelp::Error> {
    /// let conn = kelp::blocking::Connection::builder().url("memory://connect-doc").connect()?;
    /// # Ok(()) }
    /// ```
    pub fn connect(self) -> Result<Connection, Error> {
        check_not_async()?;
        let rt = new_runtime()?;
        let conn = rt.block_on(self.inner.connect())?;
        Ok(Connection {
            shared: Arc::new(Shared::new(rt, conn.clone())),
            inner: conn,
        })
    }
}

/// A blocking connection (Kombu's `Connection`). Cheap to clone; the connection and its
/// background runtime stop when [`Connection::close`] is called or the last handle made from it
/// (clone, channel, producer, consumer, message, simple queue) is dropped.
///
/// ```
/// # fn main() -> Result<(), kelp::Error> {
/// use kelp::blocking::{Connection, Producer};
/// use kelp::{PublishOptions, Queue};
///
/// let conn = Connection::open("memory://blocking-conn-doc")?;
/// let ch = conn.channel()?;
/// let queue = ch.declare_queue(Queue::new("tasks"))?;
/// Producer::new(&ch).publish("hi", PublishOptions::default().routing_key("tasks"))?;
/// let mut msg = ch.get(&queue, false)?.expect("a message");
/// msg.ack()?;
/// conn.close()?;
/// # Ok(()) }
/// ```
#[derive(Debug, Clone)]
pub struct Connection {
    inner: crate::Connection,
    pub(super) shared: Arc<Shared>,
}

impl Connection {
    /// A builder with Kombu's defaults.
    ///
    /// ```
    /// let b = kelp::blocking::Connection::builder();
    /// ```
    pub fn builder() -> ConnectionBuilder {
        ConnectionBuilder::default()
    }

    /// Connect to `url` with the default settings.
    ///
    /// ```
    /// # fn main() -> Result<(), kelp::Error> {
    /// let conn = kelp::blocking::Connection::open("memory://open-doc")?;
    /// # Ok(()) }
    /// ```
    pub fn open(url: &str) -> Result<Connection, Error> {
        Self::builder().url(url).connect()
    }

    /// Connect to `$KELP_URL`, or Kombu's default `amqp://guest:guest@localhost:5672//`.
    ///
    /// ```no_run
    /// # fn main() -> Result<(), kelp::Error> {
    /// let conn = kelp::blocking::Connection::open_default()?;
    /// # Ok(()) }
    /// ```
    pub fn open_default() -> Result<Connection, Error> {
        Self::builder().connect()
    }

    /// Open a robust connection (aio-pika's `connect_robust`): it reconnects after a loss
    /// and restores its topology, channels and consumers. `url` may list failover brokers
    /// separated by `;`.
    ///
    /// ```no_run
    /// # fn main() -> Result<(), kelp::Error> {
    /// let conn = kelp::blocking::Connection::open_robust("amqp://guest:guest@localhost//")?;
    /// assert!(conn.is_robust());
    /// # Ok(()) }
    /// ```
    pub fn open_robust(url: &str) -> Result<Connection, Error> {
        Self::builder().url(url).robust(true).connect()
    }

    /// The async connection underneath (to use with [`Connection::block_on`]).
    ///
    /// ```
    /// # fn main() -> Result<(), kelp::Error> {
    /// let conn = kelp::blocking::Connection::open("memory://as-async-doc")?;
    /// assert_eq!(conn.as_async().transport_name(), "memory");
    /// # Ok(()) }
    /// ```
    pub fn as_async(&self) -> &crate::Connection {
        &self.inner
    }

    /// Run any future on the connection's background runtime and wait for it — the way into
    /// the parts of kelp's async API that have no blocking twin.
    ///
    /// ```
    /// # fn main() -> Result<(), kelp::Error> {
    /// let conn = kelp::blocking::Connection::open("memory://block-on-doc")?;
    /// let ch = conn.channel()?;
    /// let q = ch.declare_queue(kelp::Queue::new("jobs"))?;
    /// let ready = conn.block_on(async { q.clone().passive(true).declare(ch.as_async()).await })??;
    /// assert_eq!(ready.message_count, 0);
    /// # Ok(()) }
    /// ```
    pub fn block_on<F: Future>(&self, fut: F) -> Result<F::Output, Error> {
        self.shared.block_on(fut)
    }

    /// Open a channel.
    ///
    /// ```
    /// # fn main() -> Result<(), kelp::Error> {
    /// let conn = kelp::blocking::Connection::open("memory://channel-doc")?;
    /// let ch = conn.channel()?;
    /// assert!(!ch.is_closed());
    /// # Ok(()) }
    /// ```
    pub fn channel(&self) -> Result<Channel, Error> {
        let ch = self.shared.run(self.inner.channel())?;
        Ok(Channel::new(ch, self.clone()))
    }

    /// A producer on a new channel of its own (Kombu's `connection.Producer()`).
    ///
    /// ```
    /// # fn main() -> Result<(), kelp::Error> {
    /// let conn = kelp::blocking::Connection::open("memory://producer-doc")?;
    /// let producer = conn.producer()?.routing_key("jobs");
    /// # Ok(()) }
    /// ```
    pub fn producer(&self) -> Result<Producer, Error> {
        Ok(Producer::new(&self.channel()?))
    }

    /// Open (declaring) the durable queue `name` on a new channel (Kombu's
    /// `connection.SimpleQueue(name)`).
    ///
    /// ```
    /// # fn main() -> Result<(), kelp::Error> {
    /// let conn = kelp::blocking::Connection::open("memory://simple-queue-doc")?;
    /// let mut q = conn.simple_queue("jobs")?;
    /// q.put(&1)?;
    /// assert_eq!(q.get(true, None)?.decode::<i32>()?, 1);
    /// # Ok(()) }
    /// ```
    pub fn simple_queue(&self, name: &str) -> Result<SimpleQueue, Error> {
        self.simple_queue_with(name, SimpleOptions::default())
    }

    /// [`Connection::simple_queue`] with non-default options.
    ///
    /// ```
    /// # fn main() -> Result<(), kelp::Error> {
    /// let conn = kelp::blocking::Connection::open("memory://simple-queue-with-doc")?;
    /// let opts = kelp::simple::SimpleOptions { serializer: "msgpack".into(), ..Default::default() };
    /// let q = conn.simple_queue_with("jobs", opts)?;
    /// # Ok(()) }
    /// ```
    pub fn simple_queue_with(
        &self,
        name: &str,
        options: SimpleOptions,
    ) -> Result<SimpleQueue, Error> {
        let q = self
            .shared
            .run(crate::SimpleQueue::with_options(&self.inner, name, options))?;
        Ok(SimpleQueue::new(q, self.shared.clone()))
    }

    /// Open the transient, auto-deleted buffer `name`, whose messages are acknowledged on
    /// delivery (Kombu's `connection.SimpleBuffer(name)`).
    ///
    /// ```
    /// # fn main() -> Result<(), kelp::Error> {
    /// let conn = kelp::blocking::Connection::open("memory://simple-buffer-doc")?;
    /// let mut b = conn.simple_buffer("events")?;
    /// b.put(&"e1")?;
    /// assert_eq!(b.get(true, Some(std::time::Duration::from_secs(1)))?.decode::<String>()?, "e1");
    /// # Ok(()) }
    /// ```
    pub fn simple_buffer(&self, name: &str) -> Result<SimpleBuffer, Error> {
        let b = self
            .shared
            .run(crate::SimpleBuffer::new(&self.inner, name))?;
        Ok(SimpleBuffer::new(b, self.shared.clone()))
    }

    pub(super) fn register_consumer(&self, consumer: Weak<ConsumerShared>) {
        if let Ok(mut list) = self.shared.consumers.lock() {
            list.retain(|w| w.strong_count() > 0 && !w.ptr_eq(&consumer));
            list.push(consumer);
        }
    }

    /// Wait up to `timeout` (`None`: as long as it takes) for one message on any consumer of
    /// this connection that has callbacks, and run them on it on this thread — Kombu's
    /// `connection.drain_events(timeout=…)`. Returns `Ok(true)` when a message was handled,
    /// `Ok(false)` when every such consumer has ended, `Err(Error::Timeout)` when nothing came
    /// in time, and `Error::InvalidArgument` when no consumer has callbacks. Consumers take
    /// turns, so a busy queue cannot starve the others.
    ///
    /// ```
    /// # fn main() -> Result<(), kelp::Error> {
    /// use std::sync::atomic::{AtomicUsize, Ordering};
    /// use std::sync::Arc;
    /// use std::time::Duration;
    /// use kelp::blocking::{Connection, Consumer, Producer};
    /// use kelp::{PublishOptions, Queue};
    ///
    /// let conn = Connection::open("memory://blocking-drain-doc")?;
    /// let ch = conn.channel()?;
    /// let seen = Arc::new(AtomicUsize::new(0));
    /// let counter = seen.clone();
    /// let _consumer = Consumer::builder(&ch)
    ///     .queue(Queue::new("jobs"))
    ///     .callback(move |body, msg| {
    ///         println!("got {body:?}");
    ///         counter.fetch_add(1, Ordering::SeqCst);
    ///         msg.ack_log_error();
    ///     })
    ///     .build()?;
    /// Producer::new(&ch).publish("hi", PublishOptions::default().routing_key("jobs"))?;
    /// assert!(conn.drain_events(Some(Duration::from_secs(1)))?);
    /// assert_eq!(seen.load(Ordering::SeqCst), 1);
    /// // Nothing more: a timeout, after about the time given.
    /// let idle = conn.drain_events(Some(Duration::from_millis(50)));
    /// assert!(matches!(idle, Err(kelp::Error::Timeout { .. })));
    /// # Ok(()) }
    /// ```
    pub fn drain_events(&self, timeout: Option<Duration>) -> Result<bool, Error> {
        check_not_async()?;
        let consumers: Vec<Arc<ConsumerShared>> = match self.shared.consumers.lock() {
            Ok(mut list) => {
                list.retain(|w| w.strong_count() > 0);
                list.iter()
                    .filter_map(Weak::upgrade)
                    .filter(|c| c.has_handlers())
                    .collect()
            }
            Err(_) => Vec::new(),
        };
        if consumers.is_empty() {
            return Err(no_handlers());
        }
        let start = self.shared.drain_cursor.fetch_add(1, Ordering::Relaxed);
        let picked = self.shared.run(async {
            type Next = std::pin::Pin<
                Box<dyn Future<Output = Option<Result<crate::Message, Error>>> + Send>,
            >;
            let mut waits: Vec<Option<Next>> = consumers
                .iter()
                .map(|c| {
                    let c = c.clone();
                    let next: Next = Box::pin(async move { c.next_async().await });
                    Some(next)
                })
                .collect();
            let n = waits.len();
            // Each wait is polled until one yields a message; the others are dropped before
            // taking anything (a consumer's `next` is cancel-safe).
            let any = std::future::poll_fn(|cx| {
                let mut pending = false;
                for off in 0..n {
                    let i = (start + off) % n;
                    let Some(slot) = waits.get_mut(i) else {
                        continue;
                    };
                    let Some(wait) = slot.as_mut() else {
                        continue;
                    };
                    match wait.as_mut().poll(cx) {
                        Poll::Ready(Some(item)) => return Poll::Ready(Some((i, item))),
                        Poll::Ready(None) => *slot = None,
                        Poll::Pending => pending = true,
                    }
                }
                if pending {
                    Poll::Pending
                } else {
                    Poll::Ready(None)
                }
            });
            match timeout {
                Some(t) => tokio::time::timeout(t, any)
                    .await
                    .map_err(|_| Error::Timeout {
                        what: "an event",
                        after: t,
                    }),
                None => Ok(any.await),
            }
        })?;
        match picked {
            Some((i, item)) => {
                let msg = item?;
                match consumers.get(i) {
                    Some(c) => {
                        c.dispatch(super::Message::new(msg, self.shared.clone()));
                        Ok(true)
                    }
                    None => Ok(false),
                }
            }
            None => Ok(false),
        }
    }

    /// Wait until connected (Kombu's `ensure_connection`): at once if connected; for a robust
    /// connection that is recovering, until it is back or `timeout` passes.
    ///
    /// ```
    /// # fn main() -> Result<(), kelp::Error> {
    /// let conn = kelp::blocking::Connection::open("memory://ensure-doc")?;
    /// conn.ensure_connection(std::time::Duration::from_secs(1))?;
    /// # Ok(()) }
    /// ```
    pub fn ensure_connection(&self, timeout: Duration) -> Result<(), Error> {
        self.shared.run(self.inner.ensure_connection(timeout))
    }

    /// The URL, password masked.
    ///
    /// ```
    /// # fn main() -> Result<(), kelp::Error> {
    /// let conn = kelp::blocking::Connection::open("memory://url-doc")?;
    /// assert_eq!(conn.url(), "memory://url-doc");
    /// # Ok(()) }
    /// ```
    pub fn url(&self) -> &str {
        self.inner.url()
    }

    /// The transport's name (`amqp`, `memory`, …).
    ///
    /// ```
    /// # fn main() -> Result<(), kelp::Error> {
    /// let conn = kelp::blocking::Connection::open("memory://transport-doc")?;
    /// assert_eq!(conn.transport_name(), "memory");
    /// # Ok(()) }
    /// ```
    pub fn transport_name(&self) -> &'static str {
        self.inner.transport_name()
    }

    /// True for a robust connection.
    ///
    /// ```
    /// # fn main() -> Result<(), kelp::Error> {
    /// let conn = kelp::blocking::Connection::open("memory://robust-doc")?;
    /// assert!(!conn.is_robust());
    /// # Ok(()) }
    /// ```
    pub fn is_robust(&self) -> bool {
        self.inner.is_robust()
    }

    /// True while connected.
    ///
    /// ```
    /// # fn main() -> Result<(), kelp::Error> {
    /// let conn = kelp::blocking::Connection::open("memory://connected-doc")?;
    /// assert!(conn.is_connected());
    /// # Ok(()) }
    /// ```
    pub fn is_connected(&self) -> bool {
        self.inner.is_connected()
    }

    /// Close the connection (Kombu's `release`). Idempotent. Handles made from it then fail
    /// with `Error::Closed` (or the transport's own error).
    ///
    /// ```
    /// # fn main() -> Result<(), kelp::Error> {
    /// let conn = kelp::blocking::Connection::open("memory://close-doc")?;
    /// conn.close()?;
    /// assert!(conn.is_closed());
    /// # Ok(()) }
    /// ```
    pub fn close(&self) -> Result<(), Error> {
        self.shared.run(self.inner.close())
    }

    /// True once closed.
    ///
    /// ```
    /// # fn main() -> Result<(), kelp::Error> {
    /// let conn = kelp::blocking::Connection::open("memory://is-closed-doc")?;
    /// assert!(!conn.is_closed());
    /// # Ok(()) }
    /// ```
    pub fn is_closed(&self) -> bool {
        self.inner.is_closed()
    }
}
