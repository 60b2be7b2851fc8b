//! The API of Python's `carrot.messaging` (the ancestor of Kombu) on kelp's core.
//!
//! [`Publisher`], [`Consumer`], [`ConsumerSet`] and [`Messaging`] keep carrot's names, options
//! and defaults — direct exchanges, durable queues and exchanges, persistent messages, the
//! `json` serializer, `routing_key` as the binding key, `auto_ack`, `no_ack`,
//! `warn_if_exists` — but are thin layers over kelp's own [`Producer`],
//! [`Consumer`](crate::Consumer), [`Queue`], [`Exchange`] and [`Message`]: messages are kelp
//! messages, errors are [`Error`]s, and anything carrot could not do (typed decoding,
//! compression, robust connections) is one accessor away.
//!
//! Carrot's blocking calls become `async fn`s; its generators (`iterqueue`, `iterconsume`)
//! become [`Messages`] streams; its callbacks take the decoded payload (a
//! [`Value`]) and the message, and return a boxed future so they can `ack` it.
//!
//! Carrot's classic example — the feed importer — on the in-process transport:
//!
//! ```
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), kelp::Error> {
//! use kelp::compat::carrot::{
//!     Consumer, ConsumerOptions, FetchOptions, Publisher, PublisherOptions, SendOptions,
//! };
//!
//! let conn = kelp::Connection::open("memory://doc-carrot-module").await?;
//! // Consumer(connection, queue="feed", exchange="feed", routing_key="importer")
//! let mut consumer = Consumer::new(&conn, ConsumerOptions::new("feed", "feed", "importer")).await?;
//! // Publisher(connection, exchange="feed", routing_key="importer")
//! let publisher = Publisher::new(&conn, PublisherOptions::new("feed", "importer")).await?;
//! publisher
//!     .send(&serde_json::json!({"import_feed": "http://cnn.com/rss/edition.rss"}), SendOptions::default())
//!     .await?;
//!
//! consumer.register_callback(|payload, message| {
//!     let feed = payload.get("import_feed").and_then(|v| v.as_str()).map(str::to_owned);
//!     Box::pin(async move {
//!         println!("Got feed import message for: {feed:?}");
//!         message.ack_log_error().await;
//!     })
//! });
//! let message = consumer.fetch(FetchOptions::default().enable_callbacks(true)).await?;
//! assert!(message.is_some_and(|m| m.acknowledged()));
//! consumer.close().await?;
//! publisher.close().await?;
//! # Ok(()) }
//! ```

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use futures_core::Stream;
use kelp_amqp::{FieldTable, FieldValue};
use serde::{Deserialize, Serialize};

use crate::channel::Channel;
use crate::connection::Connection;
use crate::consumer::Consumer as CoreConsumer;
use crate::entity::{DeliveryMode, Exchange, Queue};
use crate::error::Error;
use crate::message::Message;
use crate::producer::{Body, Producer, PublishOptions};
use crate::serialization::{Accept, Value};
use crate::transport::BoxFuture;

type Callback = Box<dyn for<'a> FnMut(&'a Value, &'a mut Message) -> BoxFuture<'a, ()> + Send>;
type OnDecodeError = Box<dyn for<'a> FnMut(&'a mut Message, &'a Error) -> BoxFuture<'a, ()> + Send>;

/// Carrot numbers consumer tags with one process-wide counter (`count(1)`); so does kelp, so
/// two consumers on one channel never share a tag.
static NEXT_TAG: AtomicU64 = AtomicU64::new(1);

fn tag_prefix(class: &str) -> String {
    let n = NEXT_TAG.fetch_add(1, Ordering::Relaxed);
    format!("kelp.compat.carrot.{class}{n}")
}

fn no_callbacks(what: &'static str) -> Error {
    Error::InvalidArgument {
        what,
        reason: "no consumer callbacks registered (register_callback first)".into(),
    }
}

/// Makes its holder `Sync` (so `&self` futures are `Send`) without asking callbacks to be
/// `Sync`: the value is only reached through `&mut` (`Mutex::get_mut`, which never locks).
struct Exclusive<T>(std::sync::Mutex<T>);

impl<T> Exclusive<T> {
    fn new(value: T) -> Self {
        Exclusive(std::sync::Mutex::new(value))
    }
    fn get_mut(&mut self) -> &mut T {
        self.0
            .get_mut()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

impl<T> Exclusive<Vec<T>> {
    fn len(&self) -> usize {
        self.0
            .lock()
            .map_or_else(|p| p.into_inner().len(), |v| v.len())
    }
}

async fn run_callbacks(callbacks: &mut [Callback], payload: &Value, message: &mut Message) {
    for cb in callbacks.iter_mut() {
        cb(payload, message).await;
    }
}

/// The message's payload, or — when it cannot be decoded — the error, after rejecting the
/// message without requeue (kelp's decode-error policy: never silently acked, never looping).
async fn payload_or_reject(message: &mut Message) -> Result<Value, Error> {
    let decoded = message.payload().cloned();
    match decoded {
        Ok(v) => Ok(v),
        Err(e) => {
            if !message.acknowledged() {
                message.reject_log_error(false).await;
            }
            Err(e)
        }
    }
}

/// Parse one of carrot's delivery-mode names (`Publisher.DELIVERY_MODES`): `"transient"`,
/// `"non-persistent"` and `"1"` are transient, `"persistent"` and `"2"` persistent.
///
/// ```
/// use kelp::compat::carrot::parse_delivery_mode;
/// use kelp::DeliveryMode;
/// assert_eq!(parse_delivery_mode("persistent")?, DeliveryMode::Persistent);
/// assert_eq!(parse_delivery_mode("non-persistent")?, DeliveryMode::Transient);
/// assert!(parse_delivery_mode("eventually").is_err());
/// # Ok::<(), kelp::Error>(())
/// ```
pub fn parse_delivery_mode(name: &str) -> Result<DeliveryMode, Error> {
    match name.trim().to_ascii_lowercase().as_str() {
        "transient" | "non-persistent" | "1" => Ok(DeliveryMode::Transient),
        "persistent" | "2" => Ok(DeliveryMode::Persistent),
        other => Err(Error::InvalidArgument {
            what: "delivery mode",
            reason: format!("`{other}` is none of transient, non-persistent, persistent, 1 or 2"),
        }),
    }
}

/// What carrot's classes are built on: a connection (they open a channel of their own and
/// close it in `close()`) or a channel (shared: `close()` leaves it open).
///
/// ```
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), kelp::Error> {
/// use kelp::compat::carrot::ChannelSource;
/// let conn = kelp::Connection::open("memory://doc-carrot-source").await?;
/// let ch = conn.channel().await?;
/// assert!(matches!(ChannelSource::from(&conn), ChannelSource::Connection(_)));
/// assert!(matches!(ChannelSource::from(&ch), ChannelSource::Channel(_)));
/// # Ok(()) }
/// ```
#[derive(Debug, Clone)]
pub enum ChannelSource {
    /// Open a channel of its own on this connection.
    Connection(Connection),
    /// Use this channel (not closed by `close()`).
    Channel(Channel),
}

impl From<&Connection> for ChannelSource {
    fn from(c: &Connection) -> Self {
        ChannelSource::Connection(c.clone())
    }
}
impl From<Connection> for ChannelSource {
    fn from(c: Connection) -> Self {
        ChannelSource::Connection(c)
    }
}
impl From<&Channel> for ChannelSource {
    fn from(c: &Channel) -> Self {
        ChannelSource::Channel(c.clone())
    }
}
impl From<Channel> for ChannelSource {
    fn from(c: Channel) -> Self {
        ChannelSource::Channel(c)
    }
}

impl ChannelSource {
    /// The channel, and whether it was opened here (and so is closed by `close()`).
    async fn resolve(self) -> Result<(Channel, bool), Error> {
        match self {
            ChannelSource::Connection(c) => Ok((c.channel().await?, true)),
            ChannelSource::Channel(ch) => Ok((ch, false)),
        }
    }
}

/// A stream of messages from [`Consumer::iterqueue`], [`Consumer::iterconsume`],
/// [`ConsumerSet::iterconsume`] or [`Messaging::iterqueue`] — carrot's generators. Use
/// [`Messages::next`], or any `Stream` combinator.
///
/// ```
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), kelp::Error> {
/// use kelp::compat::carrot::{Consumer, ConsumerOptions};
/// let conn = kelp::Connection::open("memory://doc-carrot-messages").await?;
/// let mut c = Consumer::new(&conn, ConsumerOptions::new("q", "", "")).await?;
/// let mut it = c.iterqueue(None, false);
/// assert!(it.next().await.is_none()); // empty queue, not infinite: the stream ends
/// # Ok(()) }
/// ```
pub struct Messages<'a> {
    inner: Pin<Box<dyn Stream<Item = Result<Message, Error>> + Send + 'a>>,
}

impl fmt::Debug for Messages<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Messages").finish_non_exhaustive()
    }
}

impl<'a> Messages<'a> {
    fn new(s: impl Stream<Item = Result<Message, Error>> + Send + 'a) -> Self {
        Messages { inner: Box::pin(s) }
    }

    /// The next message; `None` once the stream ended (limit reached, queue empty for a
    /// finite `iterqueue`, consumer cancelled, or after an error that stops it).
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), kelp::Error> {
    /// use kelp::compat::carrot::{Consumer, ConsumerOptions, Publisher, PublisherOptions, SendOptions};
    /// let conn = kelp::Connection::open("memory://doc-carrot-messages-next").await?;
    /// let mut c = Consumer::new(&conn, ConsumerOptions::new("q", "ex", "k")).await?;
    /// Publisher::new(&conn, PublisherOptions::new("ex", "k")).await?.send(&1, SendOptions::default()).await?;
    /// let mut it = c.iterqueue(Some(1), false);
    /// let mut m = it.next().await.expect("one message")?;
    /// m.ack().await?;
    /// # Ok(()) }
    /// ```
    pub async fn next(&mut self) -> Option<Result<Message, Error>> {
        std::future::poll_fn(|cx| self.inner.as_mut().poll_next(cx)).await
    }
}

impl Stream for Messages<'_> {
    type Item = Result<Message, Error>;
    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.inner.as_mut().poll_next(cx)
    }
}

// ---------------------------------------------------------------------------------------------
// Publisher
// ---------------------------------------------------------------------------------------------

/// The options of a [`Publisher`] (carrot's `Publisher.__init__` keywords), with carrot's
/// defaults: a durable, not auto-deleted `direct` exchange, persistent messages, `json`.
///
/// ```
/// use kelp::compat::carrot::PublisherOptions;
/// let o = PublisherOptions { exchange_type: "topic".into(), ..PublisherOptions::new("feed", "feed.import") };
/// assert!(o.durable && !o.auto_delete && o.auto_declare);
/// assert_eq!(o.delivery_mode, kelp::DeliveryMode::Persistent);
/// ```
#[derive(Debug, Clone, PartialEq)]
pub struct PublisherOptions {
    /// The exchange messages go to (`""`: the default exchange, routing by queue name).
    pub exchange: String,
    /// Its type: `direct` (default), `topic`, `fanout`, `headers`.
    pub exchange_type: String,
    /// The default routing key of [`Publisher::send`].
    pub routing_key: String,
    /// The exchange survives a broker restart (default true).
    pub durable: bool,
    /// The exchange goes when its last queue unbinds (default false).
    pub auto_delete: bool,
    /// The default delivery mode (default persistent, carrot's `2`).
    pub delivery_mode: DeliveryMode,
    /// The default serializer (`None`: `json`).
    pub serializer: Option<String>,
    /// Declare the exchange in [`Publisher::new`] when it has a name (default true).
    pub auto_declare: bool,
}

impl Default for PublisherOptions {
    fn default() -> Self {
        PublisherOptions {
            exchange: String::new(),
            exchange_type: "direct".into(),
            routing_key: String::new(),
            durable: true,
            auto_delete: false,
            delivery_mode: DeliveryMode::Persistent,
            serializer: None,
            auto_declare: true,
        }
    }
}

impl PublisherOptions {
    /// Carrot's positional arguments, `Publisher(connection, exchange, routing_key)`; the rest
    /// default.
    ///
    /// ```
    /// let o = kelp::compat::carrot::PublisherOptions::new("feed", "importer");
    /// assert_eq!((o.exchange.as_str(), o.routing_key.as_str(), o.exchange_type.as_str()), ("feed", "importer", "direct"));
    /// ```
    pub fn new(exchange: impl Into<String>, routing_key: impl Into<String>) -> Self {
        PublisherOptions {
            exchange: exchange.into(),
            routing_key: routing_key.into(),
            ..Default::default()
        }
    }
}

macro_rules! setters {
    ($($(#[$m:meta])* $name:ident: $t:ty => $conv:expr;)*) => {$(
        $(#[$m])*
        pub fn $name(mut self, v: $t) -> Self {
            self.$name = $conv(v);
            self
        }
    )*};
}

/// The per-message options of [`Publisher::send`] (carrot's `send` keywords). Unset fields take
/// the publisher's defaults.
///
/// ```
/// use kelp::compat::carrot::SendOptions;
/// use kelp::DeliveryMode;
/// let o = SendOptions::default()
///     .routing_key("feed.urgent")
///     .delivery_mode(DeliveryMode::Transient)
///     .priority(9)
///     .serializer("msgpack");
/// assert_eq!(o.priority, Some(9));
/// ```
#[derive(Debug, Clone, Default)]
pub struct SendOptions {
    /// Override the publisher's routing key (an empty key falls back to it, as in carrot).
    pub routing_key: Option<String>,
    /// Override the publisher's delivery mode.
    pub delivery_mode: Option<DeliveryMode>,
    /// Return the message (instead of dropping it) when no queue takes it.
    pub mandatory: bool,
    /// Carrot's `immediate`: refused by RabbitMQ 3+ and by kelp ([`Error::ImmediateNotSupported`]).
    pub immediate: bool,
    /// The message priority (0–9 in carrot; queues need `x-max-priority`).
    pub priority: Option<u8>,
    /// A content type: the data is then not serialized but sent as it is — it must be a
    /// string (content encoding `utf-8` unless given) or bytes (`binary` unless given).
    pub content_type: Option<String>,
    /// The content encoding of data sent with `content_type`.
    pub content_encoding: Option<String>,
    /// Override the publisher's serializer (`json`, `msgpack`, `yaml`, `pickle`, `raw`, …).
    pub serializer: Option<String>,
    /// Publish to this (already declared) exchange instead (an empty name falls back).
    pub exchange: Option<String>,
    /// Application headers (what carrot sent as the routing key of a headers exchange).
    pub headers: FieldTable,
}

impl SendOptions {
    setters! {
        /// Set `routing_key`.
        ///
        /// ```
        /// let o = kelp::compat::carrot::SendOptions::default().routing_key("k");
        /// assert_eq!(o.routing_key.as_deref(), Some("k"));
        /// ```
        routing_key: impl Into<String> => |v: _| Some(Into::<String>::into(v));
        /// Set `delivery_mode`.
        ///
        /// ```
        /// let o = kelp::compat::carrot::SendOptions::default().delivery_mode(kelp::DeliveryMode::Transient);
        /// assert_eq!(o.delivery_mode, Some(kelp::DeliveryMode::Transient));
        /// ```
        delivery_mode: DeliveryMode => Some;
        /// Set `mandatory`.
        ///
        /// ```
        /// assert!(kelp::compat::carrot::SendOptions::default().mandatory(true).mandatory);
        /// ```
        mandatory: bool => |v| v;
        /// Set `immediate` (an error when sending, as RabbitMQ 3+ refuses it).
        ///
        /// ```
        /// assert!(kelp::compat::carrot::SendOptions::default().immediate(true).immediate);
        /// ```
        immediate: bool => |v| v;
        /// Set `priority`.
        ///
        /// ```
        /// assert_eq!(kelp::compat::carrot::SendOptions::default().priority(3).priority, Some(3));
        /// ```
        priority: u8 => Some;
        /// Set `content_type` (no serialization then).
        ///
        /// ```
        /// let o = kelp::compat::carrot::SendOptions::default().content_type("text/csv");
        /// assert_eq!(o.content_type.as_deref(), Some("text/csv"));
        /// ```
        content_type: impl Into<String> => |v: _| Some(Into::<String>::into(v));
        /// Set `content_encoding`.
        ///
        /// ```
        /// let o = kelp::compat::carrot::SendOptions::default().content_encoding("latin-1");
        /// assert_eq!(o.content_encoding.as_deref(), Some("latin-1"));
        /// ```
        content_encoding: impl Into<String> => |v: _| Some(Into::<String>::into(v));
        /// Set `serializer`.
        ///
        /// ```
        /// let o = kelp::compat::carrot::SendOptions::default().serializer("yaml");
        /// assert_eq!(o.serializer.as_deref(), Some("yaml"));
        /// ```
        serializer: impl Into<String> => |v: _| Some(Into::<String>::into(v));
        /// Set `exchange`.
        ///
        /// ```
        /// let o = kelp::compat::carrot::SendOptions::default().exchange("other");
        /// assert_eq!(o.exchange.as_deref(), Some("other"));
        /// ```
        exchange: impl Into<String> => |v: _| Some(Into::<String>::into(v));
    }

    /// Add an application header.
    ///
    /// ```
    /// let o = kelp::compat::carrot::SendOptions::default().header("format", "pdf");
    /// assert!(o.headers.get("format").is_some());
    /// ```
    pub fn header(mut self, key: &str, value: impl Into<FieldValue>) -> Self {
        self.headers.insert(key, value.into());
        self
    }
}

/// Sends messages to one exchange (carrot's `Publisher`), through a kelp
/// [`Producer`].
///
/// ```
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), kelp::Error> {
/// use kelp::compat::carrot::{Publisher, PublisherOptions, SendOptions};
/// let conn = kelp::Connection::open("memory://doc-carrot-publisher").await?;
/// let publisher = Publisher::new(&conn, PublisherOptions::new("feed", "importer")).await?;
/// publisher.send(&serde_json::json!({"import_feed": "http://example.com/rss"}), SendOptions::default()).await?;
/// publisher.close().await?;
/// # Ok(()) }
/// ```
pub struct Publisher {
    channel: Channel,
    owns_channel: bool,
    exchange: Exchange,
    producer: Producer,
    options: PublisherOptions,
}

impl fmt::Debug for Publisher {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Publisher")
            .field("options", &self.options)
            .field("owns_channel", &self.owns_channel)
            .finish_non_exhaustive()
    }
}

impl Publisher {
    /// Carrot's `Publisher.TRANSIENT_DELIVERY_MODE` (`1`).
    ///
    /// ```
    /// use kelp::compat::carrot::Publisher;
    /// assert_eq!(Publisher::TRANSIENT_DELIVERY_MODE as u8, 1);
    /// ```
    pub const TRANSIENT_DELIVERY_MODE: DeliveryMode = DeliveryMode::Transient;
    /// Carrot's `Publisher.NONE_PERSISTENT_DELIVERY_MODE` (`1`, the same as transient).
    ///
    /// ```
    /// use kelp::compat::carrot::Publisher;
    /// assert_eq!(Publisher::NONE_PERSISTENT_DELIVERY_MODE, Publisher::TRANSIENT_DELIVERY_MODE);
    /// ```
    pub const NONE_PERSISTENT_DELIVERY_MODE: DeliveryMode = DeliveryMode::Transient;
    /// Carrot's `Publisher.PERSISTENT_DELIVERY_MODE` (`2`, the default).
    ///
    /// ```
    /// use kelp::compat::carrot::Publisher;
    /// assert_eq!(Publisher::PERSISTENT_DELIVERY_MODE as u8, 2);
    /// ```
    pub const PERSISTENT_DELIVERY_MODE: DeliveryMode = DeliveryMode::Persistent;

    /// A publisher on `source` (a connection: a channel of its own; or a shared channel);
    /// declares the exchange when it has a name and `auto_declare` is on.
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), kelp::Error> {
    /// use kelp::compat::carrot::{Publisher, PublisherOptions};
    /// let conn = kelp::Connection::open("memory://doc-carrot-publisher-new").await?;
    /// let ch = conn.channel().await?;
    /// let p = Publisher::new(&ch, PublisherOptions {
    ///     exchange_type: "topic".into(),
    ///     serializer: Some("msgpack".into()),
    ///     ..PublisherOptions::new("logs", "app.info")
    /// }).await?;
    /// p.close().await?; // the channel was lent: it stays open
    /// assert!(!ch.is_closed());
    /// # Ok(()) }
    /// ```
    pub async fn new(
        source: impl Into<ChannelSource>,
        options: PublisherOptions,
    ) -> Result<Publisher, Error> {
        let (channel, owns_channel) = source.into().resolve().await?;
        let exchange = Exchange::new(options.exchange.clone())
            .kind(options.exchange_type.clone())
            .durable(options.durable)
            .auto_delete(options.auto_delete);
        let mut producer = Producer::new(&channel)
            .exchange(exchange.clone())
            .routing_key(options.routing_key.clone())
            .auto_declare(false);
        if let Some(s) = &options.serializer {
            producer = producer.serializer(s.clone());
        }
        let p = Publisher {
            channel,
            owns_channel,
            exchange,
            producer,
            options,
        };
        if p.options.auto_declare && !p.options.exchange.is_empty() {
            if let Err(e) = p.declare().await {
                p.close_channel().await;
                return Err(e);
            }
        }
        Ok(p)
    }

    /// Its options.
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), kelp::Error> {
    /// # let conn = kelp::Connection::open("memory://doc-carrot-publisher-options").await?;
    /// use kelp::compat::carrot::{Publisher, PublisherOptions};
    /// let p = Publisher::new(&conn, PublisherOptions::new("feed", "importer")).await?;
    /// assert_eq!(p.options().exchange, "feed");
    /// # Ok(()) }
    /// ```
    pub fn options(&self) -> &PublisherOptions {
        &self.options
    }

    /// The channel it publishes on.
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), kelp::Error> {
    /// # let conn = kelp::Connection::open("memory://doc-carrot-publisher-channel").await?;
    /// use kelp::compat::carrot::{Publisher, PublisherOptions};
    /// let p = Publisher::new(&conn, PublisherOptions::new("feed", "importer")).await?;
    /// assert!(!p.channel().is_closed());
    /// # Ok(()) }
    /// ```
    pub fn channel(&self) -> &Channel {
        &self.channel
    }

    /// The kelp [`Producer`] underneath (compression, typed publishing, returns, …).
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), kelp::Error> {
    /// # let conn = kelp::Connection::open("memory://doc-carrot-publisher-producer").await?;
    /// use kelp::compat::carrot::{Publisher, PublisherOptions};
    /// let p = Publisher::new(&conn, PublisherOptions::new("feed", "importer")).await?;
    /// p.producer().publish("plain", kelp::PublishOptions::default()).await?;
    /// # Ok(()) }
    /// ```
    pub fn producer(&self) -> &Producer {
        &self.producer
    }

    /// Declare the exchange (carrot's `declare`); [`Publisher::new`] does it already unless
    /// `auto_declare` is off.
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), kelp::Error> {
    /// # let conn = kelp::Connection::open("memory://doc-carrot-publisher-declare").await?;
    /// use kelp::compat::carrot::{Publisher, PublisherOptions};
    /// let p = Publisher::new(&conn, PublisherOptions { auto_declare: false, ..PublisherOptions::new("late", "k") }).await?;
    /// p.declare().await?;
    /// # Ok(()) }
    /// ```
    pub async fn declare(&self) -> Result<(), Error> {
        self.exchange.declare(&self.channel).await
    }

    fn publish_options(&self, o: &SendOptions) -> PublishOptions {
        let mut p = PublishOptions::default()
            .delivery_mode(o.delivery_mode.unwrap_or(self.options.delivery_mode))
            .mandatory(o.mandatory)
            .immediate(o.immediate);
        if let Some(rk) = o.routing_key.as_deref().filter(|k| !k.is_empty()) {
            p = p.routing_key(rk);
        }
        if let Some(ex) = o.exchange.as_deref().filter(|e| !e.is_empty()) {
            p = p.exchange(ex);
        }
        if let Some(v) = o.priority {
            p = p.priority(v);
        }
        p.headers = o.headers.clone();
        p
    }

    /// Send `data` (carrot's `send`): serialized with the serializer of `options`, else the
    /// publisher's, else `json` — unless `options.content_type` is set, in which case `data`
    /// must be a string or bytes and goes as it is (carrot's "no serialization occurs").
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), kelp::Error> {
    /// use kelp::compat::carrot::{Consumer, ConsumerOptions, FetchOptions, Publisher, PublisherOptions, SendOptions};
    /// let conn = kelp::Connection::open("memory://doc-carrot-send").await?;
    /// let mut c = Consumer::new(&conn, ConsumerOptions::new("csv", "files", "csv")).await?;
    /// let p = Publisher::new(&conn, PublisherOptions::new("files", "csv")).await?;
    /// p.send(&"a,b\n1,2\n", SendOptions::default().content_type("text/csv")).await?;
    /// p.send(&vec![1, 2, 3], SendOptions::default().priority(5)).await?;
    /// let m = c.fetch(FetchOptions::default().auto_ack(true)).await?.expect("a message");
    /// assert_eq!((m.content_type(), m.content_encoding()), (Some("text/csv"), Some("utf-8")));
    /// let m = c.fetch(FetchOptions::default().auto_ack(true)).await?.expect("a message");
    /// assert_eq!(m.decode::<Vec<i32>>()?, [1, 2, 3]);
    /// # Ok(()) }
    /// ```
    pub async fn send<T: Serialize + ?Sized>(
        &self,
        data: &T,
        options: SendOptions,
    ) -> Result<(), Error> {
        let mut p = self.publish_options(&options);
        if let Some(ct) = options.content_type {
            let value = Value::from_serialize(data)?;
            let (body, encoding) = match value {
                Value::String(s) => (Body::Text(s), "utf-8"),
                Value::Bytes(b) => (Body::Raw(b.into()), "binary"),
                _ => {
                    return Err(Error::InvalidArgument {
                        what: "message data",
                        reason: format!(
                            "with content_type `{ct}` the data is sent as it is, so it must be a \
                             string or bytes (use send_raw for a byte slice)"
                        ),
                    })
                }
            };
            p = p
                .content_type(ct)
                .content_encoding(options.content_encoding.as_deref().unwrap_or(encoding));
            return self.producer.publish(body, p).await;
        }
        if let Some(s) = options.serializer {
            p = p.serializer(s);
        }
        self.producer.publish_serde(data, p).await
    }

    /// Send a raw body (bytes or text) without serializing it; `options.content_type` and
    /// `content_encoding` default to `application/data`/`binary` for bytes and
    /// `text/plain`/`utf-8` for text.
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), kelp::Error> {
    /// use kelp::compat::carrot::{Publisher, PublisherOptions, SendOptions};
    /// let conn = kelp::Connection::open("memory://doc-carrot-send-raw").await?;
    /// let p = Publisher::new(&conn, PublisherOptions::new("images", "png")).await?;
    /// p.send_raw(&b"\x89PNG"[..], SendOptions::default().content_type("image/png")).await?;
    /// # Ok(()) }
    /// ```
    pub async fn send_raw(&self, body: impl Into<Body>, options: SendOptions) -> Result<(), Error> {
        let mut p = self.publish_options(&options);
        if let Some(ct) = options.content_type {
            p = p.content_type(ct);
        }
        if let Some(ce) = options.content_encoding {
            p = p.content_encoding(ce);
        }
        self.producer.publish(body, p).await
    }

    async fn close_channel(&self) {
        if self.owns_channel {
            if let Err(e) = self.channel.close().await {
                tracing::debug!(error = %e, "closing the carrot publisher's channel");
            }
        }
    }

    /// Close it (carrot's `close`): the channel it opened is closed; a lent channel stays open.
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), kelp::Error> {
    /// # let conn = kelp::Connection::open("memory://doc-carrot-publisher-close").await?;
    /// use kelp::compat::carrot::{Publisher, PublisherOptions};
    /// let p = Publisher::new(&conn, PublisherOptions::new("feed", "importer")).await?;
    /// let ch = p.channel().clone();
    /// p.close().await?;
    /// assert!(ch.is_closed());
    /// # Ok(()) }
    /// ```
    pub async fn close(self) -> Result<(), Error> {
        if self.owns_channel {
            self.channel.close().await?;
        }
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------------
// Consumer
// ---------------------------------------------------------------------------------------------

/// The options of a [`Consumer`] (carrot's `Consumer.__init__` keywords), with carrot's
/// defaults: a durable, not exclusive, not auto-deleted queue bound to a durable `direct`
/// exchange with `routing_key` as the binding key; manual acknowledgement.
///
/// ```
/// use kelp::compat::carrot::ConsumerOptions;
/// let o = ConsumerOptions { exchange_type: "topic".into(), auto_ack: true, ..ConsumerOptions::new("feed", "feed", "feed.#") };
/// assert!(o.durable && !o.exclusive && !o.auto_delete && !o.no_ack);
/// ```
#[derive(Debug, Clone, PartialEq)]
pub struct ConsumerOptions {
    /// The queue's name.
    pub queue: String,
    /// The exchange it binds to (`""`: none, only the default exchange reaches it).
    pub exchange: String,
    /// The exchange's type: `direct` (default), `topic`, `fanout`, `headers`.
    pub exchange_type: String,
    /// The binding key (carrot's `routing_key`; for a headers exchange use
    /// `binding_arguments`).
    pub routing_key: String,
    /// The queue and exchange survive a broker restart (default true).
    pub durable: bool,
    /// Only this connection may use the queue (default false; implies `auto_delete`).
    pub exclusive: bool,
    /// The queue (and exchange) go when no longer used (default false).
    pub auto_delete: bool,
    /// Acknowledgement off at the broker: messages count as acked when sent (default false).
    pub no_ack: bool,
    /// Acknowledge every message as soon as it is received (default false).
    pub auto_ack: bool,
    /// Declare queue, exchange and binding in [`Consumer::new`] (default true).
    pub auto_declare: bool,
    /// Log a warning when the queue exists already, since a redeclare with new settings is
    /// silently ignored by the broker (default false).
    pub warn_if_exists: bool,
    /// Queue declare arguments (carrot's `queue_arguments`: `x-max-length`, …).
    pub queue_arguments: FieldTable,
    /// Binding arguments (what carrot passed as the routing key of a headers exchange).
    pub binding_arguments: FieldTable,
    /// The content types or serializer names to decode (`None`: kelp's default — all but
    /// pickle, yaml and msgpack; carrot trusted everything).
    pub accept: Option<Vec<String>>,
    /// How long an infinite [`Consumer::iterqueue`] waits after finding the queue empty
    /// (default 100 ms; carrot yielded `None` and left the waiting to the caller).
    pub poll_interval: Duration,
}

impl Default for ConsumerOptions {
    fn default() -> Self {
        ConsumerOptions {
            queue: String::new(),
            exchange: String::new(),
            exchange_type: "direct".into(),
            routing_key: String::new(),
            durable: true,
            exclusive: false,
            auto_delete: false,
            no_ack: false,
            auto_ack: false,
            auto_declare: true,
            warn_if_exists: false,
            queue_arguments: FieldTable::new(),
            binding_arguments: FieldTable::new(),
            accept: None,
            poll_interval: Duration::from_millis(100),
        }
    }
}

impl ConsumerOptions {
    /// Carrot's positional arguments, `Consumer(connection, queue, exchange, routing_key)`; the
    /// rest default.
    ///
    /// ```
    /// let o = kelp::compat::carrot::ConsumerOptions::new("feed", "feed", "importer");
    /// assert_eq!((o.queue.as_str(), o.exchange.as_str(), o.routing_key.as_str()), ("feed", "feed", "importer"));
    /// ```
    pub fn new(
        queue: impl Into<String>,
        exchange: impl Into<String>,
        routing_key: impl Into<String>,
    ) -> Self {
        ConsumerOptions {
            queue: queue.into(),
            exchange: exchange.into(),
            routing_key: routing_key.into(),
            ..Default::default()
        }
    }

    /// The kelp [`Queue`] (with its exchange and binding) these options describe.
    ///
    /// ```
    /// let q = kelp::compat::carrot::ConsumerOptions::new("feed", "feed", "importer").to_queue();
    /// assert_eq!(q.routing_key, "importer");
    /// assert_eq!(q.exchange.map(|e| e.kind).as_deref(), Some("direct"));
    /// ```
    pub fn to_queue(&self) -> Queue {
        // Carrot: "exclusive implies auto-delete", for the exchange as well.
        let auto_delete = self.auto_delete || self.exclusive;
        let mut q = Queue::new(self.queue.clone())
            .durable(self.durable)
            .exclusive(self.exclusive)
            .auto_delete(auto_delete)
            .routing_key(self.routing_key.clone());
        q.queue_arguments = self.queue_arguments.clone();
        q.binding_arguments = self.binding_arguments.clone();
        if !self.exchange.is_empty() {
            q = q.exchange(
                Exchange::new(self.exchange.clone())
                    .kind(self.exchange_type.clone())
                    .durable(self.durable)
                    .auto_delete(auto_delete),
            );
        }
        q
    }
}

/// The options of one [`Consumer::fetch`] (carrot's `fetch` keywords). As in carrot, `no_ack`
/// and `auto_ack` can only switch the consumer's settings on, not off.
///
/// ```
/// let o = kelp::compat::carrot::FetchOptions::default().enable_callbacks(true);
/// assert!(o.enable_callbacks && !o.no_ack && !o.auto_ack);
/// ```
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FetchOptions {
    /// Fetch without acknowledgement (`basic.get` with `no_ack`).
    pub no_ack: bool,
    /// Acknowledge the message once fetched.
    pub auto_ack: bool,
    /// Run the registered callbacks on the message too.
    pub enable_callbacks: bool,
}

impl FetchOptions {
    setters! {
        /// Set `no_ack`.
        ///
        /// ```
        /// assert!(kelp::compat::carrot::FetchOptions::default().no_ack(true).no_ack);
        /// ```
        no_ack: bool => |v| v;
        /// Set `auto_ack`.
        ///
        /// ```
        /// assert!(kelp::compat::carrot::FetchOptions::default().auto_ack(true).auto_ack);
        /// ```
        auto_ack: bool => |v| v;
        /// Set `enable_callbacks`.
        ///
        /// ```
        /// assert!(kelp::compat::carrot::FetchOptions::default().enable_callbacks(true).enable_callbacks);
        /// ```
        enable_callbacks: bool => |v| v;
    }
}

/// Receives messages from one queue (carrot's `Consumer`): `basic.get` with
/// [`fetch`](Consumer::fetch) and [`iterqueue`](Consumer::iterqueue), `basic.consume` with
/// [`iterconsume`](Consumer::iterconsume) and [`wait`](Consumer::wait) (through a kelp
/// [`Consumer`](crate::Consumer)), callbacks `(payload, message)`.
///
/// ```
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), kelp::Error> {
/// use kelp::compat::carrot::{Consumer, ConsumerOptions, Publisher, PublisherOptions, SendOptions};
/// let conn = kelp::Connection::open("memory://doc-carrot-consumer").await?;
/// let mut consumer = Consumer::new(&conn, ConsumerOptions::new("feed", "feed", "importer")).await?;
/// let publisher = Publisher::new(&conn, PublisherOptions::new("feed", "importer")).await?;
/// for n in 0..3 {
///     publisher.send(&n, SendOptions::default()).await?;
/// }
/// consumer.register_callback(|payload, message| {
///     println!("Got message {}: {payload:?}", message.delivery_tag());
///     Box::pin(async move { message.ack_log_error().await })
/// });
/// assert_eq!(consumer.wait(Some(3)).await?, 3); // consume, running the callbacks, 3 times
/// consumer.close().await?;
/// # Ok(()) }
/// ```
pub struct Consumer {
    channel: Channel,
    owns_channel: bool,
    options: ConsumerOptions,
    queue: Queue,
    accept: Option<Arc<Accept>>,
    callbacks: Exclusive<Vec<Callback>>,
    consuming: Option<CoreConsumer>,
    tag_prefix: String,
}

impl fmt::Debug for Consumer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Consumer")
            .field("options", &self.options)
            .field("callbacks", &self.callbacks.len())
            .field("consuming", &self.consuming.is_some())
            .finish_non_exhaustive()
    }
}

impl Consumer {
    /// A consumer on `source` (a connection: a channel of its own; or a shared channel);
    /// declares the queue, the exchange and the binding unless `auto_declare` is off.
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), kelp::Error> {
    /// use kelp::compat::carrot::{Consumer, ConsumerOptions};
    /// let conn = kelp::Connection::open("memory://doc-carrot-consumer-new").await?;
    /// let c = Consumer::new(&conn, ConsumerOptions {
    ///     exchange_type: "topic".into(),
    ///     exclusive: true, // implies auto_delete
    ///     ..ConsumerOptions::new("news", "news", "news.#")
    /// }).await?;
    /// assert!(c.queue().auto_delete);
    /// # Ok(()) }
    /// ```
    pub async fn new(
        source: impl Into<ChannelSource>,
        options: ConsumerOptions,
    ) -> Result<Consumer, Error> {
        let accept = match &options.accept {
            Some(list) => Some(Arc::new(Accept::new(list)?)),
            None => None,
        };
        let (channel, owns_channel) = source.into().resolve().await?;
        let mut c = Consumer {
            channel,
            owns_channel,
            queue: options.to_queue(),
            options,
            accept,
            callbacks: Exclusive::new(Vec::new()),
            consuming: None,
            tag_prefix: tag_prefix("Consumer"),
        };
        if c.options.auto_declare {
            if let Err(e) = c.declare().await {
                c.close_channel().await;
                return Err(e);
            }
        }
        Ok(c)
    }

    /// Its options.
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), kelp::Error> {
    /// # let conn = kelp::Connection::open("memory://doc-carrot-consumer-options").await?;
    /// use kelp::compat::carrot::{Consumer, ConsumerOptions};
    /// let c = Consumer::new(&conn, ConsumerOptions::new("feed", "feed", "importer")).await?;
    /// assert_eq!(c.options().exchange_type, "direct");
    /// # Ok(()) }
    /// ```
    pub fn options(&self) -> &ConsumerOptions {
        &self.options
    }

    /// The kelp [`Queue`] it reads (with its exchange and binding).
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), kelp::Error> {
    /// # let conn = kelp::Connection::open("memory://doc-carrot-consumer-queue").await?;
    /// use kelp::compat::carrot::{Consumer, ConsumerOptions};
    /// let c = Consumer::new(&conn, ConsumerOptions::new("feed", "feed", "importer")).await?;
    /// assert_eq!(c.queue().name, "feed");
    /// # Ok(()) }
    /// ```
    pub fn queue(&self) -> &Queue {
        &self.queue
    }

    /// The channel it uses.
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), kelp::Error> {
    /// # let conn = kelp::Connection::open("memory://doc-carrot-consumer-channel").await?;
    /// use kelp::compat::carrot::{Consumer, ConsumerOptions};
    /// let c = Consumer::new(&conn, ConsumerOptions::new("feed", "feed", "importer")).await?;
    /// assert!(!c.channel().is_closed());
    /// # Ok(()) }
    /// ```
    pub fn channel(&self) -> &Channel {
        &self.channel
    }

    /// True while a `basic.consume` (from [`Consumer::consume`], `iterconsume` or `wait`) is
    /// active (carrot's `channel_open`).
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), kelp::Error> {
    /// # let conn = kelp::Connection::open("memory://doc-carrot-consumer-is-consuming").await?;
    /// use kelp::compat::carrot::{Consumer, ConsumerOptions};
    /// let mut c = Consumer::new(&conn, ConsumerOptions::new("feed", "feed", "importer")).await?;
    /// c.consume().await?;
    /// assert!(c.is_consuming());
    /// c.cancel().await?;
    /// assert!(!c.is_consuming());
    /// # Ok(()) }
    /// ```
    pub fn is_consuming(&self) -> bool {
        self.consuming.is_some()
    }

    /// Declare the queue, the exchange and the binding (carrot's `declare`). With
    /// `warn_if_exists`, logs a warning (`tracing`) when the queue exists already.
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), kelp::Error> {
    /// # let conn = kelp::Connection::open("memory://doc-carrot-consumer-declare").await?;
    /// use kelp::compat::carrot::{Consumer, ConsumerOptions};
    /// let mut c = Consumer::new(&conn, ConsumerOptions { auto_declare: false, ..ConsumerOptions::new("q", "ex", "k") }).await?;
    /// c.declare().await?;
    /// # Ok(()) }
    /// ```
    pub async fn declare(&mut self) -> Result<(), Error> {
        if self.options.queue.is_empty() {
            // Carrot declares no queue without a name, but still the exchange.
            if let Some(ex) = &self.queue.exchange {
                ex.declare(&self.channel).await?;
            }
            return Ok(());
        }
        if self.options.warn_if_exists && self.queue_exists().await {
            tracing::warn!(
                queue = %self.queue.name,
                "queue already exists: new settings of a redeclare are ignored by the broker"
            );
        }
        self.queue.declare(&self.channel).await?;
        Ok(())
    }

    /// Passive declare on a channel of its own (a missing queue closes the channel on AMQP).
    async fn queue_exists(&self) -> bool {
        let Ok(probe) = self.channel.connection().channel().await else {
            return false;
        };
        let exists = Queue::new(self.queue.name.clone())
            .passive(true)
            .declare(&probe)
            .await
            .is_ok();
        if let Err(e) = probe.close().await {
            tracing::debug!(error = %e, "closing the warn_if_exists probe channel");
        }
        exists
    }

    /// Add a callback run on each message by [`receive`](Consumer::receive): by
    /// `fetch` with `enable_callbacks`, `iterconsume` and `wait`. It gets the decoded payload
    /// and the message, and returns a boxed future (so it can `ack`).
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), kelp::Error> {
    /// # let conn = kelp::Connection::open("memory://doc-carrot-register-callback").await?;
    /// use kelp::compat::carrot::{Consumer, ConsumerOptions};
    /// let mut c = Consumer::new(&conn, ConsumerOptions::new("feed", "feed", "importer")).await?;
    /// c.register_callback(|payload, message| {
    ///     let n = payload.as_i64();
    ///     Box::pin(async move {
    ///         if n.is_some() { message.ack_log_error().await } else { message.reject_log_error(false).await }
    ///     })
    /// });
    /// # Ok(()) }
    /// ```
    pub fn register_callback<F>(&mut self, callback: F)
    where
        F: for<'a> FnMut(&'a Value, &'a mut Message) -> BoxFuture<'a, ()> + Send + 'static,
    {
        self.callbacks.get_mut().push(Box::new(callback));
    }

    /// Run every registered callback on `(payload, message)` (carrot's `receive`); an
    /// [`Error::InvalidArgument`] when none is registered (carrot's `NotImplementedError`).
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), kelp::Error> {
    /// use kelp::compat::carrot::{Consumer, ConsumerOptions, FetchOptions, Publisher, PublisherOptions, SendOptions};
    /// let conn = kelp::Connection::open("memory://doc-carrot-receive").await?;
    /// let mut c = Consumer::new(&conn, ConsumerOptions::new("q", "ex", "k")).await?;
    /// Publisher::new(&conn, PublisherOptions::new("ex", "k")).await?.send(&"hi", SendOptions::default()).await?;
    /// let mut m = c.fetch(FetchOptions::default()).await?.expect("a message");
    /// let payload = m.payload()?.clone();
    /// assert!(c.receive(&payload, &mut m).await.is_err()); // no callbacks yet
    /// c.register_callback(|_, m| Box::pin(async move { m.ack_log_error().await }));
    /// c.receive(&payload, &mut m).await?;
    /// assert!(m.acknowledged());
    /// # Ok(()) }
    /// ```
    pub async fn receive(&mut self, payload: &Value, message: &mut Message) -> Result<(), Error> {
        if self.callbacks.get_mut().is_empty() {
            return Err(no_callbacks("Consumer.receive"));
        }
        run_callbacks(self.callbacks.get_mut(), payload, message).await;
        Ok(())
    }

    /// What happens to each consumed message: `auto_ack`, then the callbacks (if any). A
    /// payload that cannot be decoded for the callbacks is rejected and is the error.
    async fn handle(&mut self, message: &mut Message, auto_ack: bool) -> Result<(), Error> {
        if auto_ack && !message.acknowledged() {
            message.ack().await?;
        }
        if self.callbacks.get_mut().is_empty() {
            return Ok(());
        }
        let payload = payload_or_reject(message).await?;
        run_callbacks(self.callbacks.get_mut(), &payload, message).await;
        Ok(())
    }

    /// The next waiting message (`basic.get`), or `None` when the queue is empty (carrot's
    /// `fetch`). With `auto_ack` (here or in the options) it is acknowledged; with
    /// `enable_callbacks` the callbacks run on it too (an error before fetching when none is
    /// registered; a payload that cannot be decoded is rejected and is the error).
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), kelp::Error> {
    /// use kelp::compat::carrot::{Consumer, ConsumerOptions, FetchOptions, Publisher, PublisherOptions, SendOptions};
    /// let conn = kelp::Connection::open("memory://doc-carrot-fetch").await?;
    /// let mut c = Consumer::new(&conn, ConsumerOptions::new("q", "ex", "k")).await?;
    /// assert!(c.fetch(FetchOptions::default()).await?.is_none());
    /// Publisher::new(&conn, PublisherOptions::new("ex", "k")).await?.send(&serde_json::json!({"n": 1}), SendOptions::default()).await?;
    /// let mut m = c.fetch(FetchOptions::default()).await?.expect("a message");
    /// assert_eq!(m.decode::<serde_json::Value>()?["n"], 1);
    /// m.ack().await?;
    /// # Ok(()) }
    /// ```
    pub async fn fetch(&mut self, options: FetchOptions) -> Result<Option<Message>, Error> {
        if options.enable_callbacks && self.callbacks.get_mut().is_empty() {
            return Err(no_callbacks("Consumer.fetch(enable_callbacks)"));
        }
        let no_ack = options.no_ack || self.options.no_ack;
        let auto_ack = options.auto_ack || self.options.auto_ack;
        let Some(message) = self.queue.get(&self.channel, no_ack).await? else {
            return Ok(None);
        };
        let mut message = message.with_accept(self.accept.clone());
        if auto_ack && !message.acknowledged() {
            message.ack().await?;
        }
        if options.enable_callbacks {
            let payload = payload_or_reject(&mut message).await?;
            run_callbacks(self.callbacks.get_mut(), &payload, &mut message).await;
        }
        Ok(Some(message))
    }

    /// A stream of waiting messages fetched one by one with `basic.get` (carrot's
    /// `iterqueue`), each as [`fetch`](Consumer::fetch) gives it (`auto_ack` applies, callbacks
    /// do not run). It ends after `limit` messages, and — unless `infinite` — when the queue is
    /// empty; an infinite one polls every `poll_interval` instead (end it with a timeout or
    /// `limit`). Unlike carrot it never fetches a message past the limit.
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), kelp::Error> {
    /// use kelp::compat::carrot::{Consumer, ConsumerOptions, Publisher, PublisherOptions, SendOptions};
    /// let conn = kelp::Connection::open("memory://doc-carrot-iterqueue").await?;
    /// let mut c = Consumer::new(&conn, ConsumerOptions { auto_ack: true, ..ConsumerOptions::new("q", "ex", "k") }).await?;
    /// let p = Publisher::new(&conn, PublisherOptions::new("ex", "k")).await?;
    /// for n in 0..5 { p.send(&n, SendOptions::default()).await?; }
    /// let mut got = Vec::new();
    /// let mut it = c.iterqueue(Some(3), false);
    /// while let Some(m) = it.next().await {
    ///     got.push(m?.decode::<i32>()?);
    /// }
    /// assert_eq!(got, [0, 1, 2]);
    /// # Ok(()) }
    /// ```
    pub fn iterqueue(&mut self, limit: Option<usize>, infinite: bool) -> Messages<'_> {
        let interval = self.options.poll_interval;
        Messages::new(futures_util::stream::unfold(
            (self, 0usize, false),
            move |(this, n, done)| async move {
                if done || limit.is_some_and(|l| n >= l) {
                    return None;
                }
                loop {
                    match this.fetch(FetchOptions::default()).await {
                        Ok(Some(m)) => return Some((Ok(m), (this, n + 1, false))),
                        Ok(None) if infinite => tokio::time::sleep(interval).await,
                        Ok(None) => return None,
                        Err(e) => return Some((Err(e), (this, n, true))),
                    }
                }
            },
        ))
    }

    /// Start consuming the queue (`basic.consume`; carrot's `consume`), unless it already is.
    /// [`iterconsume`](Consumer::iterconsume) and [`wait`](Consumer::wait) do it themselves.
    /// Until [`cancel`](Consumer::cancel) the broker pushes messages to this consumer (up to
    /// the [`qos`](Consumer::qos) prefetch limit), so `fetch` finds fewer.
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), kelp::Error> {
    /// # let conn = kelp::Connection::open("memory://doc-carrot-consume").await?;
    /// use kelp::compat::carrot::{Consumer, ConsumerOptions};
    /// let mut c = Consumer::new(&conn, ConsumerOptions::new("feed", "feed", "importer")).await?;
    /// c.consume().await?;
    /// assert!(c.is_consuming());
    /// # Ok(()) }
    /// ```
    pub async fn consume(&mut self) -> Result<(), Error> {
        if self.consuming.is_some() {
            return Ok(());
        }
        let mut b = CoreConsumer::builder(&self.channel)
            .queue(self.queue.clone())
            .no_ack(self.options.no_ack)
            .auto_declare(false)
            .tag_prefix(self.tag_prefix.clone());
        if let Some(accept) = &self.options.accept {
            b = b.accept(accept);
        }
        self.consuming = Some(b.build().await?);
        Ok(())
    }

    /// A stream of consumed messages (`basic.consume`; carrot's `iterconsume`). Each message
    /// is acknowledged first with `auto_ack` and passed to the callbacks, if any; then the
    /// stream yields it (carrot yielded `True`) — check `acknowledged()` before settling it
    /// again. It ends after `limit` messages or when the consumer is cancelled; a message whose
    /// payload the callbacks cannot get is rejected and comes as an `Err` item.
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), kelp::Error> {
    /// use kelp::compat::carrot::{Consumer, ConsumerOptions, Publisher, PublisherOptions, SendOptions};
    /// let conn = kelp::Connection::open("memory://doc-carrot-iterconsume").await?;
    /// let mut c = Consumer::new(&conn, ConsumerOptions::new("q", "ex", "k")).await?;
    /// let p = Publisher::new(&conn, PublisherOptions::new("ex", "k")).await?;
    /// for n in 0..2 { p.send(&n, SendOptions::default()).await?; }
    /// let mut it = c.iterconsume(Some(2));
    /// while let Some(m) = it.next().await {
    ///     m?.ack().await?;
    /// }
    /// # Ok(()) }
    /// ```
    pub fn iterconsume(&mut self, limit: Option<usize>) -> Messages<'_> {
        Messages::new(futures_util::stream::unfold(
            (self, 0usize, false),
            move |(this, n, done)| async move {
                if done || limit.is_some_and(|l| n >= l) {
                    return None;
                }
                if let Err(e) = this.consume().await {
                    return Some((Err(e), (this, n, true)));
                }
                let next = match this.consuming.as_mut() {
                    Some(c) => c.next().await,
                    None => None,
                };
                match next {
                    None => None,
                    Some(Err(e)) => Some((Err(e), (this, n, true))),
                    Some(Ok(mut m)) => {
                        let auto_ack = this.options.auto_ack;
                        let r = this.handle(&mut m, auto_ack).await;
                        Some((r.map(|()| m), (this, n + 1, false)))
                    }
                }
            },
        ))
    }

    /// Consume, running the callbacks on every message, until `limit` messages were handled
    /// (`None`: until the consumer is cancelled) — carrot's `wait`. Returns how many were
    /// handled; an error without callbacks, or on the first failure.
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), kelp::Error> {
    /// use std::sync::{Arc, Mutex};
    /// use kelp::compat::carrot::{Consumer, ConsumerOptions, Publisher, PublisherOptions, SendOptions};
    /// let conn = kelp::Connection::open("memory://doc-carrot-wait").await?;
    /// let mut c = Consumer::new(&conn, ConsumerOptions { auto_ack: true, ..ConsumerOptions::new("q", "ex", "k") }).await?;
    /// let p = Publisher::new(&conn, PublisherOptions::new("ex", "k")).await?;
    /// p.send(&"a", SendOptions::default()).await?;
    /// p.send(&"b", SendOptions::default()).await?;
    /// let seen = Arc::new(Mutex::new(Vec::new()));
    /// let s = seen.clone();
    /// c.register_callback(move |payload, _message| {
    ///     s.lock().unwrap().push(payload.as_str().unwrap_or_default().to_owned());
    ///     Box::pin(async {})
    /// });
    /// c.wait(Some(2)).await?;
    /// assert_eq!(*seen.lock().unwrap(), ["a", "b"]);
    /// # Ok(()) }
    /// ```
    pub async fn wait(&mut self, limit: Option<usize>) -> Result<usize, Error> {
        if self.callbacks.get_mut().is_empty() {
            return Err(no_callbacks("Consumer.wait"));
        }
        let mut handled = 0;
        let mut it = self.iterconsume(limit);
        while let Some(m) = it.next().await {
            m?;
            handled += 1;
        }
        Ok(handled)
    }

    /// Remove every waiting message (`queue.purge`) and return how many (carrot's `purge`).
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), kelp::Error> {
    /// # let conn = kelp::Connection::open("memory://doc-carrot-purge").await?;
    /// use kelp::compat::carrot::{Consumer, ConsumerOptions};
    /// let c = Consumer::new(&conn, ConsumerOptions::new("feed", "feed", "importer")).await?;
    /// assert_eq!(c.purge().await?, 0);
    /// # Ok(()) }
    /// ```
    pub async fn purge(&self) -> Result<u32, Error> {
        self.queue.purge(&self.channel).await
    }

    /// Discard waiting messages and return how many (carrot's `discard_all`). Without a filter
    /// the queue is purged. With one, every waiting message is fetched and those the filter
    /// accepts are acknowledged (discarded); the others go back to the queue once it is empty
    /// (requeued, so flagged `redelivered`; carrot left them unacknowledged until the channel
    /// closed). A filter with `auto_ack` or `no_ack` is an error, as in carrot. RabbitMQ
    /// requeues asynchronously: a count or purge right after may not see them yet.
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), kelp::Error> {
    /// use kelp::compat::carrot::{Consumer, ConsumerOptions, Publisher, PublisherOptions, SendOptions};
    /// let conn = kelp::Connection::open("memory://doc-carrot-discard-all").await?;
    /// let mut c = Consumer::new(&conn, ConsumerOptions::new("q", "ex", "k")).await?;
    /// let p = Publisher::new(&conn, PublisherOptions::new("ex", "k")).await?;
    /// for kind in ["feed", "other", "feed"] {
    ///     p.send(&serde_json::json!({"type": kind}), SendOptions::default()).await?;
    /// }
    /// let feeds_only = &mut |m: &kelp::Message| {
    ///     m.decode::<serde_json::Value>().is_ok_and(|v| v["type"] == "feed")
    /// };
    /// assert_eq!(c.discard_all(Some(feeds_only)).await?, 2);
    /// assert_eq!(c.discard_all(None).await?, 1); // purge the rest
    /// # Ok(()) }
    /// ```
    pub async fn discard_all(
        &mut self,
        filter: Option<&mut (dyn FnMut(&Message) -> bool + Send)>,
    ) -> Result<u32, Error> {
        let Some(filter) = filter else {
            return self.purge().await;
        };
        if self.options.no_ack || self.options.auto_ack {
            return Err(Error::InvalidArgument {
                what: "discard_all",
                reason: "can't use a filter with auto_ack or no_ack".into(),
            });
        }
        let mut kept = Vec::new();
        let mut discarded = 0u32;
        let outcome = loop {
            let message = match self.queue.get(&self.channel, false).await {
                Ok(Some(m)) => m.with_accept(self.accept.clone()),
                Ok(None) => break Ok(()),
                Err(e) => break Err(e),
            };
            let mut message = message;
            if filter(&message) {
                if let Err(e) = message.ack().await {
                    break Err(e);
                }
                discarded += 1;
            } else {
                kept.push(message);
            }
        };
        let mut requeued = Ok(());
        for mut m in kept {
            if let Err(e) = m.requeue().await {
                if requeued.is_ok() {
                    requeued = Err(e);
                }
            }
        }
        outcome.and(requeued).map(|()| discarded)
    }

    /// Stop consuming (`basic.cancel`; carrot's `cancel`). Messages already pushed to it but
    /// not acknowledged return to the queue when the channel closes.
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), kelp::Error> {
    /// # let conn = kelp::Connection::open("memory://doc-carrot-cancel").await?;
    /// use kelp::compat::carrot::{Consumer, ConsumerOptions};
    /// let mut c = Consumer::new(&conn, ConsumerOptions::new("feed", "feed", "importer")).await?;
    /// c.consume().await?;
    /// c.cancel().await?;
    /// assert!(!c.is_consuming());
    /// # Ok(()) }
    /// ```
    pub async fn cancel(&mut self) -> Result<(), Error> {
        match self.consuming.take() {
            Some(c) => c.close().await,
            None => Ok(()),
        }
    }

    async fn close_channel(&self) {
        if self.owns_channel {
            if let Err(e) = self.channel.close().await {
                tracing::debug!(error = %e, "closing the carrot consumer's channel");
            }
        }
    }

    /// Cancel, and close the channel it opened (a lent channel stays open) — carrot's `close`.
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), kelp::Error> {
    /// # let conn = kelp::Connection::open("memory://doc-carrot-consumer-close").await?;
    /// use kelp::compat::carrot::{Consumer, ConsumerOptions};
    /// let c = Consumer::new(&conn, ConsumerOptions::new("feed", "feed", "importer")).await?;
    /// let ch = c.channel().clone();
    /// c.close().await?;
    /// assert!(ch.is_closed());
    /// # Ok(()) }
    /// ```
    pub async fn close(mut self) -> Result<(), Error> {
        self.cancel().await?;
        if self.owns_channel {
            self.channel.close().await?;
        }
        Ok(())
    }

    /// Ask the broker to pause (`false`) or resume (`true`) deliveries (`channel.flow`;
    /// carrot's `flow`). The memory transport does not support it, nor does RabbitMQ pausing.
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), kelp::Error> {
    /// # let conn = kelp::Connection::open("memory://doc-carrot-flow").await?;
    /// use kelp::compat::carrot::{Consumer, ConsumerOptions};
    /// let c = Consumer::new(&conn, ConsumerOptions::new("feed", "feed", "importer")).await?;
    /// assert!(matches!(c.flow(false).await, Err(kelp::Error::NotSupported { .. })));
    /// # Ok(()) }
    /// ```
    pub async fn flow(&self, active: bool) -> Result<(), Error> {
        self.channel.flow(active).await
    }

    /// Set the prefetch limit (`basic.qos`; carrot's `qos`). `prefetch_size` (a window in
    /// bytes) must be 0: RabbitMQ and kelp's transports implement only `prefetch_count`.
    /// `apply_global` applies the limit to the whole channel.
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), kelp::Error> {
    /// # let conn = kelp::Connection::open("memory://doc-carrot-qos").await?;
    /// use kelp::compat::carrot::{Consumer, ConsumerOptions};
    /// let c = Consumer::new(&conn, ConsumerOptions::new("feed", "feed", "importer")).await?;
    /// c.qos(0, 10, false).await?;
    /// assert!(c.qos(4096, 10, false).await.is_err());
    /// # Ok(()) }
    /// ```
    pub async fn qos(
        &self,
        prefetch_size: u32,
        prefetch_count: u16,
        apply_global: bool,
    ) -> Result<(), Error> {
        qos(&self.channel, prefetch_size, prefetch_count, apply_global).await
    }
}

async fn qos(
    channel: &Channel,
    prefetch_size: u32,
    prefetch_count: u16,
    apply_global: bool,
) -> Result<(), Error> {
    if prefetch_size != 0 {
        return Err(Error::NotSupported {
            transport: channel.connection().transport_name(),
            what: "a prefetch window in bytes (prefetch_size); use prefetch_count",
        });
    }
    channel.qos(prefetch_count, apply_global).await
}

// ---------------------------------------------------------------------------------------------
// ConsumerSet
// ---------------------------------------------------------------------------------------------

/// One queue of a [`ConsumerSet`]'s `from_dict` configuration, as carrot reads it: every key
/// is optional and falls back to [`ConsumerOptions`]' defaults; `routing_key` is the binding
/// key, else `binding_key`; unknown keys are ignored (as carrot's `**kwargs` were).
///
/// ```
/// use kelp::compat::carrot::QueueConfig;
/// let c: QueueConfig = serde_json::from_value(serde_json::json!({
///     "exchange": "link_exchange", "exchange_type": "topic", "binding_key": "links.*",
///     "default_routing_key": "links.retrieve", "auto_delete": true,
/// })).unwrap();
/// let o = c.to_options("retrieve")?;
/// assert_eq!((o.routing_key.as_str(), o.auto_delete, o.durable), ("links.*", true, true));
/// # Ok::<(), kelp::Error>(())
/// ```
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct QueueConfig {
    /// The exchange to bind to.
    pub exchange: Option<String>,
    /// Its type (default `direct`).
    pub exchange_type: Option<String>,
    /// The binding key, used when `routing_key` is not given.
    pub binding_key: Option<String>,
    /// The binding key (wins over `binding_key`, as in carrot).
    pub routing_key: Option<String>,
    /// Where a producer would publish; accepted and not used by consumers (as in carrot).
    pub default_routing_key: Option<String>,
    /// See [`ConsumerOptions::durable`].
    pub durable: Option<bool>,
    /// See [`ConsumerOptions::exclusive`].
    pub exclusive: Option<bool>,
    /// See [`ConsumerOptions::auto_delete`].
    pub auto_delete: Option<bool>,
    /// See [`ConsumerOptions::no_ack`].
    pub no_ack: Option<bool>,
    /// See [`ConsumerOptions::auto_ack`].
    pub auto_ack: Option<bool>,
    /// See [`ConsumerOptions::auto_declare`].
    pub auto_declare: Option<bool>,
    /// See [`ConsumerOptions::warn_if_exists`].
    pub warn_if_exists: Option<bool>,
    /// Queue declare arguments (JSON strings, numbers, booleans, lists and objects).
    pub queue_arguments: Option<serde_json::Map<String, serde_json::Value>>,
}

fn json_to_field(key: &str, v: &serde_json::Value) -> Result<FieldValue, Error> {
    use serde_json::Value as J;
    Ok(match v {
        J::Null => FieldValue::Void,
        J::Bool(b) => FieldValue::Bool(*b),
        J::Number(n) => match (n.as_i64(), n.as_f64()) {
            (Some(i), _) => FieldValue::I64(i),
            (None, Some(f)) => FieldValue::F64(f),
            (None, None) => {
                return Err(Error::InvalidArgument {
                    what: "queue_arguments",
                    reason: format!("`{key}`: {n} does not fit an AMQP number"),
                })
            }
        },
        J::String(s) => FieldValue::from(s.as_str()),
        J::Array(items) => FieldValue::Array(
            items
                .iter()
                .map(|i| json_to_field(key, i))
                .collect::<Result<_, _>>()?,
        ),
        J::Object(map) => FieldValue::Table(json_to_table(map)?),
    })
}

fn json_to_table(map: &serde_json::Map<String, serde_json::Value>) -> Result<FieldTable, Error> {
    let mut t = FieldTable::new();
    for (k, v) in map {
        t.insert(k.as_str(), json_to_field(k, v)?);
    }
    Ok(t)
}

impl QueueConfig {
    /// The [`ConsumerOptions`] of queue `queue` with this configuration (carrot's
    /// `add_consumer_from_dict` keyword handling).
    ///
    /// ```
    /// use kelp::compat::carrot::QueueConfig;
    /// let c = QueueConfig { routing_key: Some("a".into()), binding_key: Some("b".into()), ..Default::default() };
    /// assert_eq!(c.to_options("q")?.routing_key, "a");
    /// # Ok::<(), kelp::Error>(())
    /// ```
    pub fn to_options(&self, queue: &str) -> Result<ConsumerOptions, Error> {
        let d = ConsumerOptions::default();
        Ok(ConsumerOptions {
            queue: queue.to_owned(),
            exchange: self.exchange.clone().unwrap_or(d.exchange),
            exchange_type: self.exchange_type.clone().unwrap_or(d.exchange_type),
            routing_key: self
                .routing_key
                .clone()
                .or_else(|| self.binding_key.clone())
                .unwrap_or(d.routing_key),
            durable: self.durable.unwrap_or(d.durable),
            exclusive: self.exclusive.unwrap_or(d.exclusive),
            auto_delete: self.auto_delete.unwrap_or(d.auto_delete),
            no_ack: self.no_ack.unwrap_or(d.no_ack),
            auto_ack: self.auto_ack.unwrap_or(d.auto_ack),
            auto_declare: self.auto_declare.unwrap_or(d.auto_declare),
            warn_if_exists: self.warn_if_exists.unwrap_or(d.warn_if_exists),
            queue_arguments: match &self.queue_arguments {
                Some(map) => json_to_table(map)?,
                None => d.queue_arguments,
            },
            ..d
        })
    }
}

/// Receives from several queues on one channel (carrot's `ConsumerSet`): consumers added
/// from a `from_dict` configuration or as [`Consumer`]s, one kelp
/// [`Consumer`](crate::Consumer) consuming all their queues, callbacks per consumer or for the
/// whole set.
///
/// ```
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), kelp::Error> {
/// use kelp::compat::carrot::{ConsumerSet, Publisher, PublisherOptions, SendOptions};
/// let conn = kelp::Connection::open("memory://doc-carrot-consumer-set").await?;
/// let mut set = ConsumerSet::from_dict(&conn, &serde_json::json!({
///     "webshot": {"exchange": "link_exchange", "exchange_type": "topic", "binding_key": "links.webshot"},
///     "retrieve": {"exchange": "link_exchange", "exchange_type": "topic", "binding_key": "links.*"},
/// })).await?;
/// set.register_callback(|payload, message| {
///     println!("{} got {payload:?}", message.delivery_info().routing_key);
///     Box::pin(async move { message.ack_log_error().await })
/// });
/// let p = Publisher::new(&conn, PublisherOptions { exchange_type: "topic".into(), ..PublisherOptions::new("link_exchange", "links.webshot") }).await?;
/// p.send(&"http://example.com", SendOptions::default()).await?; // to both queues
/// let mut it = set.iterconsume(Some(2));
/// while let Some(m) = it.next().await {
///     assert!(m?.acknowledged());
/// }
/// drop(it);
/// set.close().await?;
/// # Ok(()) }
/// ```
pub struct ConsumerSet {
    channel: Channel,
    owns_channel: bool,
    consumers: Vec<Consumer>,
    callbacks: Exclusive<Vec<Callback>>,
    auto_ack: bool,
    accept: Option<Vec<String>>,
    on_decode_error: Exclusive<Option<OnDecodeError>>,
    consuming: Option<CoreConsumer>,
    consuming_no_ack: bool,
    /// Queue name → consumer tag of the queues consumed now (carrot's `_open_consumers`).
    open: HashMap<String, String>,
    /// Consumer tag → index of the consumer whose callbacks handle its messages.
    routes: HashMap<String, usize>,
    /// Queues stopped by `cancel_by_queue`, left out of `consume` until a consumer of theirs
    /// is added again.
    stopped: HashSet<String>,
}

impl fmt::Debug for ConsumerSet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ConsumerSet")
            .field("consumers", &self.consumers)
            .field("callbacks", &self.callbacks.len())
            .field("auto_ack", &self.auto_ack)
            .field("open", &self.open)
            .finish_non_exhaustive()
    }
}

impl ConsumerSet {
    /// An empty set on `source` (a connection: a channel of its own; or a shared channel).
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), kelp::Error> {
    /// use kelp::compat::carrot::{ConsumerSet, QueueConfig};
    /// let conn = kelp::Connection::open("memory://doc-carrot-set-new").await?;
    /// let mut set = ConsumerSet::new(&conn).await?.auto_ack(true);
    /// set.add_consumer_from_dict("jobs", QueueConfig::default()).await?;
    /// assert_eq!(set.consumers().len(), 1);
    /// # Ok(()) }
    /// ```
    pub async fn new(source: impl Into<ChannelSource>) -> Result<ConsumerSet, Error> {
        let (channel, owns_channel) = source.into().resolve().await?;
        Ok(ConsumerSet {
            channel,
            owns_channel,
            consumers: Vec::new(),
            callbacks: Exclusive::new(Vec::new()),
            auto_ack: false,
            accept: None,
            on_decode_error: Exclusive::new(None),
            consuming: None,
            consuming_no_ack: false,
            open: HashMap::new(),
            routes: HashMap::new(),
            stopped: HashSet::new(),
        })
    }

    /// A set with one consumer per queue of carrot's `from_dict` configuration — a JSON object
    /// `{"queue": {"exchange": …, "exchange_type": …, "binding_key": …, …}}` (see
    /// [`QueueConfig`]); queues are added in name order.
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), kelp::Error> {
    /// use kelp::compat::carrot::ConsumerSet;
    /// let conn = kelp::Connection::open("memory://doc-carrot-from-dict").await?;
    /// let set = ConsumerSet::from_dict(&conn, &serde_json::json!({
    ///     "a": {"exchange": "ex", "routing_key": "a"},
    ///     "b": {"exchange": "transient", "routing_key": "b", "durable": false},
    /// })).await?;
    /// assert_eq!(set.consumers()[1].queue().name, "b");
    /// assert!(ConsumerSet::from_dict(&conn, &serde_json::json!(["not", "a", "dict"])).await.is_err());
    /// # Ok(()) }
    /// ```
    pub async fn from_dict(
        source: impl Into<ChannelSource>,
        config: &serde_json::Value,
    ) -> Result<ConsumerSet, Error> {
        let parsed: BTreeMap<String, QueueConfig> = serde_json::from_value(config.clone())
            .map_err(|e| Error::InvalidArgument {
                what: "ConsumerSet from_dict configuration",
                reason: e.to_string(),
            })?;
        Self::from_config(source, parsed).await
    }

    /// A set with one consumer per `(queue, configuration)` pair, in order (the typed
    /// `from_dict`; a `HashMap<String, QueueConfig>` or a `BTreeMap` will do).
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), kelp::Error> {
    /// use kelp::compat::carrot::{ConsumerSet, QueueConfig};
    /// let conn = kelp::Connection::open("memory://doc-carrot-from-config").await?;
    /// let config = [("images", QueueConfig { exchange: Some("media".into()), routing_key: Some("image".into()), ..Default::default() })];
    /// let set = ConsumerSet::from_config(&conn, config).await?;
    /// assert_eq!(set.consumers()[0].options().exchange, "media");
    /// # Ok(()) }
    /// ```
    pub async fn from_config<K, I>(
        source: impl Into<ChannelSource>,
        config: I,
    ) -> Result<ConsumerSet, Error>
    where
        K: AsRef<str>,
        I: IntoIterator<Item = (K, QueueConfig)>,
    {
        let mut set = Self::new(source).await?;
        for (queue, c) in config {
            if let Err(e) = set.add_consumer_from_dict(queue.as_ref(), c).await {
                set.close().await.ok();
                return Err(e);
            }
        }
        Ok(set)
    }

    /// Acknowledge the messages the set's own callbacks handle as soon as they arrive
    /// (carrot's `ConsumerSet(auto_ack=…)`; consumers with callbacks of their own follow their
    /// own `auto_ack`).
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), kelp::Error> {
    /// # let conn = kelp::Connection::open("memory://doc-carrot-set-auto-ack").await?;
    /// let set = kelp::compat::carrot::ConsumerSet::new(&conn).await?.auto_ack(true);
    /// # Ok(()) }
    /// ```
    pub fn auto_ack(mut self, on: bool) -> Self {
        self.auto_ack = on;
        self
    }

    /// The content types or serializer names the set's consumer decodes (default: kelp's —
    /// all but pickle, yaml and msgpack). Takes effect at the next [`consume`](Self::consume).
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), kelp::Error> {
    /// # let conn = kelp::Connection::open("memory://doc-carrot-set-accept").await?;
    /// let set = kelp::compat::carrot::ConsumerSet::new(&conn).await?.accept(["json", "msgpack"]);
    /// # Ok(()) }
    /// ```
    pub fn accept<I, S>(mut self, accept: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.accept = Some(accept.into_iter().map(Into::into).collect());
        self
    }

    /// Handle messages the set's callbacks cannot decode (carrot's `on_decode_error`,
    /// `callback(message, exception)`). Without it such a message is rejected and
    /// `iterconsume` yields the error.
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), kelp::Error> {
    /// # let conn = kelp::Connection::open("memory://doc-carrot-set-on-decode-error").await?;
    /// let set = kelp::compat::carrot::ConsumerSet::new(&conn).await?.on_decode_error(|message, err| {
    ///     eprintln!("cannot decode: {err}");
    ///     Box::pin(async move { message.reject_log_error(false).await })
    /// });
    /// # Ok(()) }
    /// ```
    pub fn on_decode_error<F>(mut self, handler: F) -> Self
    where
        F: for<'a> FnMut(&'a mut Message, &'a Error) -> BoxFuture<'a, ()> + Send + 'static,
    {
        *self.on_decode_error.get_mut() = Some(Box::new(handler));
        self
    }

    /// Its consumers.
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), kelp::Error> {
    /// # let conn = kelp::Connection::open("memory://doc-carrot-set-consumers").await?;
    /// let set = kelp::compat::carrot::ConsumerSet::new(&conn).await?;
    /// assert!(set.consumers().is_empty());
    /// # Ok(()) }
    /// ```
    pub fn consumers(&self) -> &[Consumer] {
        &self.consumers
    }

    /// Its consumers, to register callbacks on one of them.
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), kelp::Error> {
    /// # let conn = kelp::Connection::open("memory://doc-carrot-set-consumers-mut").await?;
    /// use kelp::compat::carrot::{ConsumerSet, QueueConfig};
    /// let mut set = ConsumerSet::new(&conn).await?;
    /// set.add_consumer_from_dict("q", QueueConfig::default()).await?;
    /// set.consumers_mut()[0].register_callback(|_, m| Box::pin(async move { m.ack_log_error().await }));
    /// # Ok(()) }
    /// ```
    pub fn consumers_mut(&mut self) -> &mut [Consumer] {
        &mut self.consumers
    }

    /// The channel the set consumes on.
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), kelp::Error> {
    /// # let conn = kelp::Connection::open("memory://doc-carrot-set-channel").await?;
    /// let set = kelp::compat::carrot::ConsumerSet::new(&conn).await?;
    /// assert!(!set.channel().is_closed());
    /// # Ok(()) }
    /// ```
    pub fn channel(&self) -> &Channel {
        &self.channel
    }

    /// Add a consumer for `queue` configured as one entry of `from_dict` (carrot's
    /// `add_consumer_from_dict`); it is declared on the set's channel unless
    /// `auto_declare` is false.
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), kelp::Error> {
    /// # let conn = kelp::Connection::open("memory://doc-carrot-add-from-dict").await?;
    /// use kelp::compat::carrot::{ConsumerSet, QueueConfig};
    /// let mut set = ConsumerSet::new(&conn).await?;
    /// let c = set.add_consumer_from_dict("thumbs", QueueConfig { exchange: Some("media".into()), binding_key: Some("thumb".into()), ..Default::default() }).await?;
    /// assert_eq!(c.options().routing_key, "thumb");
    /// # Ok(()) }
    /// ```
    pub async fn add_consumer_from_dict(
        &mut self,
        queue: &str,
        config: QueueConfig,
    ) -> Result<&mut Consumer, Error> {
        let options = config.to_options(queue)?;
        let consumer = Consumer::new(&self.channel, options).await?;
        self.stopped.remove(&consumer.queue.name);
        let i = self.consumers.len();
        self.consumers.push(consumer);
        Ok(&mut self.consumers[i])
    }

    /// Add a consumer (carrot's `add_consumer`). It moves to the set's channel: its own
    /// `basic.consume` is cancelled and a channel it opened is closed. (An exclusive queue
    /// declared on another connection cannot be consumed here.)
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), kelp::Error> {
    /// use kelp::compat::carrot::{Consumer, ConsumerOptions, ConsumerSet};
    /// let conn = kelp::Connection::open("memory://doc-carrot-add-consumer").await?;
    /// let mut set = ConsumerSet::new(&conn).await?;
    /// set.add_consumer(Consumer::new(&conn, ConsumerOptions::new("q", "ex", "k")).await?).await?;
    /// assert_eq!(set.consumers().len(), 1);
    /// # Ok(()) }
    /// ```
    pub async fn add_consumer(&mut self, mut consumer: Consumer) -> Result<(), Error> {
        consumer.cancel().await?;
        consumer.close_channel().await;
        consumer.channel = self.channel.clone();
        consumer.owns_channel = false;
        self.stopped.remove(&consumer.queue.name);
        self.consumers.push(consumer);
        Ok(())
    }

    /// Add a callback for the messages of consumers without callbacks of their own (carrot's
    /// `register_callback`).
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), kelp::Error> {
    /// # let conn = kelp::Connection::open("memory://doc-carrot-set-register-callback").await?;
    /// let mut set = kelp::compat::carrot::ConsumerSet::new(&conn).await?;
    /// set.register_callback(|payload, message| {
    ///     println!("{payload:?}");
    ///     Box::pin(async move { message.ack_log_error().await })
    /// });
    /// # Ok(()) }
    /// ```
    pub fn register_callback<F>(&mut self, callback: F)
    where
        F: for<'a> FnMut(&'a Value, &'a mut Message) -> BoxFuture<'a, ()> + Send + 'static,
    {
        self.callbacks.get_mut().push(Box::new(callback));
    }

    /// Run the set's callbacks on `(payload, message)` (carrot's `receive`); an error when
    /// none is registered.
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), kelp::Error> {
    /// use kelp::compat::carrot::{ConsumerSet, FetchOptions, Publisher, PublisherOptions, QueueConfig, SendOptions};
    /// let conn = kelp::Connection::open("memory://doc-carrot-set-receive").await?;
    /// let mut set = ConsumerSet::new(&conn).await?;
    /// set.add_consumer_from_dict("q", QueueConfig { exchange: Some("ex".into()), routing_key: Some("k".into()), ..Default::default() }).await?;
    /// Publisher::new(&conn, PublisherOptions::new("ex", "k")).await?.send(&1, SendOptions::default()).await?;
    /// let mut m = set.consumers_mut()[0].fetch(FetchOptions::default()).await?.expect("a message");
    /// set.register_callback(|_, m| Box::pin(async move { m.ack_log_error().await }));
    /// let payload = m.payload()?.clone();
    /// set.receive(&payload, &mut m).await?;
    /// assert!(m.acknowledged());
    /// # Ok(()) }
    /// ```
    pub async fn receive(&mut self, payload: &Value, message: &mut Message) -> Result<(), Error> {
        if self.callbacks.get_mut().is_empty() {
            return Err(no_callbacks("ConsumerSet.receive"));
        }
        run_callbacks(self.callbacks.get_mut(), payload, message).await;
        Ok(())
    }

    /// Start consuming every consumer's queue not consumed yet (carrot's `consume`), each
    /// queue once (a queue stopped by [`cancel_by_queue`](Self::cancel_by_queue) excepted). Consumers with `no_ack` are consumed without acknowledgement when all of
    /// the set's are; in a mixed set their messages are acknowledged on arrival.
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), kelp::Error> {
    /// # let conn = kelp::Connection::open("memory://doc-carrot-set-consume").await?;
    /// use kelp::compat::carrot::{ConsumerSet, QueueConfig};
    /// let mut set = ConsumerSet::new(&conn).await?;
    /// set.add_consumer_from_dict("a", QueueConfig::default()).await?;
    /// set.add_consumer_from_dict("b", QueueConfig::default()).await?;
    /// set.consume().await?;
    /// assert!(set.is_consuming());
    /// # Ok(()) }
    /// ```
    pub async fn consume(&mut self) -> Result<(), Error> {
        if self.consumers.is_empty() {
            return Err(Error::InvalidArgument {
                what: "ConsumerSet.consume",
                reason: "the set has no consumers".into(),
            });
        }
        for i in 0..self.consumers.len() {
            let (queue, no_ack) = {
                let c = &self.consumers[i];
                (c.queue.clone(), c.options.no_ack)
            };
            if self.open.contains_key(&queue.name) || self.stopped.contains(&queue.name) {
                continue;
            }
            let new_tags = match self.consuming.as_mut() {
                None => {
                    let all_no_ack = self.consumers.iter().all(|c| c.options.no_ack);
                    let mut b = CoreConsumer::builder(&self.channel)
                        .queue(queue.clone())
                        .no_ack(all_no_ack)
                        .auto_declare(false)
                        .tag_prefix(tag_prefix("ConsumerSet"));
                    if let Some(accept) = &self.accept {
                        b = b.accept(accept);
                    }
                    let core = b.build().await?;
                    let tags = core.consumer_tags().await;
                    self.consuming = Some(core);
                    self.consuming_no_ack = all_no_ack;
                    tags
                }
                Some(core) => {
                    if self.consuming_no_ack && !no_ack {
                        return Err(Error::InvalidArgument {
                            what: "ConsumerSet.consume",
                            reason: format!(
                                "queue `{}` needs acknowledgements but the set consumes with \
                                 no_ack; cancel() and consume() again",
                                queue.name
                            ),
                        });
                    }
                    let before: HashSet<String> = core.consumer_tags().await.into_iter().collect();
                    core.add_queue(queue.clone()).await?;
                    core.consumer_tags()
                        .await
                        .into_iter()
                        .filter(|t| !before.contains(t))
                        .collect()
                }
            };
            for tag in new_tags {
                self.open.insert(queue.name.clone(), tag.clone());
                self.routes.insert(tag, i);
            }
        }
        Ok(())
    }

    /// True while the set consumes.
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), kelp::Error> {
    /// # let conn = kelp::Connection::open("memory://doc-carrot-set-is-consuming").await?;
    /// let set = kelp::compat::carrot::ConsumerSet::new(&conn).await?;
    /// assert!(!set.is_consuming());
    /// # Ok(()) }
    /// ```
    pub fn is_consuming(&self) -> bool {
        self.consuming.is_some()
    }

    /// Carrot's `_receive_callback`s: the message's own consumer if it has callbacks, else
    /// the set.
    async fn dispatch(&mut self, message: &mut Message) -> Result<(), Error> {
        let index = self
            .routes
            .get(message.delivery_info().consumer_tag)
            .copied();
        if let Some(c) = index.and_then(|i| self.consumers.get_mut(i)) {
            if c.options.no_ack && !self.consuming_no_ack && !message.acknowledged() {
                message.ack().await?;
            }
            if !c.callbacks.get_mut().is_empty() {
                let auto_ack = c.options.auto_ack;
                return c.handle(message, auto_ack).await;
            }
        }
        if self.auto_ack && !message.acknowledged() {
            message.ack().await?;
        }
        if self.callbacks.get_mut().is_empty() {
            return Ok(());
        }
        let decoded = message.payload().cloned();
        let payload = match decoded {
            Ok(v) => v,
            Err(e) => {
                return match self.on_decode_error.get_mut() {
                    Some(h) => {
                        h(message, &e).await;
                        Ok(())
                    }
                    None => {
                        if !message.acknowledged() {
                            message.reject_log_error(false).await;
                        }
                        Err(e)
                    }
                };
            }
        };
        run_callbacks(self.callbacks.get_mut(), &payload, message).await;
        Ok(())
    }

    /// A stream of the messages of all the set's queues (carrot's `iterconsume`): consumes
    /// them (see [`consume`](Self::consume)), runs the message's consumer's callbacks — or the
    /// set's when it has none — and yields the message. Ends after `limit` messages or when
    /// cancelled.
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), kelp::Error> {
    /// use kelp::compat::carrot::{ConsumerSet, Publisher, PublisherOptions, QueueConfig, SendOptions};
    /// let conn = kelp::Connection::open("memory://doc-carrot-set-iterconsume").await?;
    /// let mut set = ConsumerSet::new(&conn).await?.auto_ack(true);
    /// for q in ["a", "b"] {
    ///     set.add_consumer_from_dict(q, QueueConfig { exchange: Some("ex".into()), routing_key: Some(q.into()), ..Default::default() }).await?;
    /// }
    /// set.register_callback(|_, _| Box::pin(async {}));
    /// let p = Publisher::new(&conn, PublisherOptions::new("ex", "a")).await?;
    /// p.send(&1, SendOptions::default()).await?;
    /// p.send(&2, SendOptions::default().routing_key("b")).await?;
    /// let mut keys = Vec::new();
    /// let mut it = set.iterconsume(Some(2));
    /// while let Some(m) = it.next().await {
    ///     keys.push(m?.delivery_info().routing_key.to_owned());
    /// }
    /// keys.sort();
    /// assert_eq!(keys, ["a", "b"]);
    /// # Ok(()) }
    /// ```
    pub fn iterconsume(&mut self, limit: Option<usize>) -> Messages<'_> {
        Messages::new(futures_util::stream::unfold(
            (self, 0usize, false),
            move |(this, n, done)| async move {
                if done || limit.is_some_and(|l| n >= l) {
                    return None;
                }
                // Carrot's `iterconsume`: `consume()` once, then the deliveries.
                if n == 0 {
                    if let Err(e) = this.consume().await {
                        return Some((Err(e), (this, n, true)));
                    }
                }
                let next = match this.consuming.as_mut() {
                    Some(c) => c.next().await,
                    None => None,
                };
                match next {
                    None => None,
                    Some(Err(e)) => Some((Err(e), (this, n, true))),
                    Some(Ok(mut m)) => {
                        let r = this.dispatch(&mut m).await;
                        Some((r.map(|()| m), (this, n + 1, false)))
                    }
                }
            },
        ))
    }

    /// Discard every waiting message of every consumer's queue (purge; carrot's set does not
    /// filter) and return how many.
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), kelp::Error> {
    /// # let conn = kelp::Connection::open("memory://doc-carrot-set-discard-all").await?;
    /// use kelp::compat::carrot::{ConsumerSet, QueueConfig};
    /// let mut set = ConsumerSet::new(&conn).await?;
    /// set.add_consumer_from_dict("q", QueueConfig::default()).await?;
    /// assert_eq!(set.discard_all().await?, 0);
    /// # Ok(()) }
    /// ```
    pub async fn discard_all(&mut self) -> Result<u32, Error> {
        let mut n = 0;
        for c in &mut self.consumers {
            n += c.discard_all(None).await?;
        }
        Ok(n)
    }

    /// Stop consuming every queue (carrot's `cancel`).
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), kelp::Error> {
    /// # let conn = kelp::Connection::open("memory://doc-carrot-set-cancel").await?;
    /// use kelp::compat::carrot::{ConsumerSet, QueueConfig};
    /// let mut set = ConsumerSet::new(&conn).await?;
    /// set.add_consumer_from_dict("q", QueueConfig::default()).await?;
    /// set.consume().await?;
    /// set.cancel().await?;
    /// assert!(!set.is_consuming());
    /// # Ok(()) }
    /// ```
    pub async fn cancel(&mut self) -> Result<(), Error> {
        self.open.clear();
        self.routes.clear();
        match self.consuming.take() {
            Some(c) => c.close().await,
            None => Ok(()),
        }
    }

    /// Stop consuming one queue (carrot's `cancel_by_queue`). Unlike carrot, where the next
    /// `consume()` started it again, it stays stopped — a stream cannot be interrupted to
    /// cancel, so this happens between `iterconsume` calls — until a consumer of the queue is
    /// added again ([`add_consumer`](Self::add_consumer),
    /// [`add_consumer_from_dict`](Self::add_consumer_from_dict)).
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), kelp::Error> {
    /// # let conn = kelp::Connection::open("memory://doc-carrot-set-cancel-by-queue").await?;
    /// use kelp::compat::carrot::{ConsumerSet, QueueConfig};
    /// let mut set = ConsumerSet::new(&conn).await?;
    /// set.add_consumer_from_dict("a", QueueConfig::default()).await?;
    /// set.add_consumer_from_dict("b", QueueConfig::default()).await?;
    /// set.consume().await?;
    /// set.cancel_by_queue("a").await?;
    /// # Ok(()) }
    /// ```
    pub async fn cancel_by_queue(&mut self, queue: &str) -> Result<(), Error> {
        self.stopped.insert(queue.to_owned());
        if let Some(tag) = self.open.remove(queue) {
            self.routes.remove(&tag);
        }
        match self.consuming.as_mut() {
            Some(c) => c.cancel_by_queue(queue).await,
            None => Ok(()),
        }
    }

    /// Cancel, close every consumer, and close the channel the set opened (carrot's `close`).
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), kelp::Error> {
    /// # let conn = kelp::Connection::open("memory://doc-carrot-set-close").await?;
    /// let set = kelp::compat::carrot::ConsumerSet::new(&conn).await?;
    /// let ch = set.channel().clone();
    /// set.close().await?;
    /// assert!(ch.is_closed());
    /// # Ok(()) }
    /// ```
    pub async fn close(mut self) -> Result<(), Error> {
        let mut outcome = self.cancel().await;
        for c in std::mem::take(&mut self.consumers) {
            let r = c.close().await;
            outcome = outcome.and(r);
        }
        if self.owns_channel {
            outcome = outcome.and(self.channel.close().await);
        }
        outcome
    }

    /// Pause or resume deliveries on the set's channel (carrot's `flow`).
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), kelp::Error> {
    /// # let conn = kelp::Connection::open("memory://doc-carrot-set-flow").await?;
    /// let set = kelp::compat::carrot::ConsumerSet::new(&conn).await?;
    /// assert!(set.flow(true).await.is_err()); // the memory transport has no channel.flow
    /// # Ok(()) }
    /// ```
    pub async fn flow(&self, active: bool) -> Result<(), Error> {
        self.channel.flow(active).await
    }

    /// Set the prefetch limit of the set's channel (carrot's `qos`; `prefetch_size` must be 0).
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), kelp::Error> {
    /// # let conn = kelp::Connection::open("memory://doc-carrot-set-qos").await?;
    /// let set = kelp::compat::carrot::ConsumerSet::new(&conn).await?;
    /// set.qos(0, 50, false).await?;
    /// # Ok(()) }
    /// ```
    pub async fn qos(
        &self,
        prefetch_size: u32,
        prefetch_count: u16,
        apply_global: bool,
    ) -> Result<(), Error> {
        qos(&self.channel, prefetch_size, prefetch_count, apply_global).await
    }
}

// ---------------------------------------------------------------------------------------------
// Messaging
// ---------------------------------------------------------------------------------------------

/// The options of [`Messaging`] (carrot's `Messaging.__init__` keywords); the publisher and
/// the consumer take carrot's other defaults.
///
/// ```
/// let o = kelp::compat::carrot::MessagingOptions::new("feed", "feed", "importer");
/// assert_eq!(o.queue, "feed");
/// ```
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MessagingOptions {
    /// The queue the consumer reads.
    pub queue: String,
    /// The exchange both use.
    pub exchange: String,
    /// The publisher's routing key and the consumer's binding key.
    pub routing_key: String,
}

impl MessagingOptions {
    /// All three at once.
    ///
    /// ```
    /// let o = kelp::compat::carrot::MessagingOptions::new("q", "ex", "k");
    /// assert_eq!((o.exchange.as_str(), o.routing_key.as_str()), ("ex", "k"));
    /// ```
    pub fn new(
        queue: impl Into<String>,
        exchange: impl Into<String>,
        routing_key: impl Into<String>,
    ) -> Self {
        MessagingOptions {
            queue: queue.into(),
            exchange: exchange.into(),
            routing_key: routing_key.into(),
        }
    }
}

/// A publisher and a consumer on one exchange, queue and routing key (carrot's `Messaging`),
/// sharing one channel.
///
/// ```
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), kelp::Error> {
/// use kelp::compat::carrot::{FetchOptions, Messaging, MessagingOptions, SendOptions};
/// let conn = kelp::Connection::open("memory://doc-carrot-messaging").await?;
/// let mut m = Messaging::new(&conn, MessagingOptions::new("feed", "feed", "importer")).await?;
/// m.send(&serde_json::json!({"import_feed": "http://example.com/rss"}), SendOptions::default()).await?;
/// let msg = m.fetch(FetchOptions::default().auto_ack(true)).await?.expect("a message");
/// assert_eq!(msg.decode::<serde_json::Value>()?["import_feed"], "http://example.com/rss");
/// m.close().await?;
/// # Ok(()) }
/// ```
#[derive(Debug)]
pub struct Messaging {
    publisher: Publisher,
    consumer: Consumer,
    channel: Channel,
    owns_channel: bool,
}

impl Messaging {
    /// Declare the exchange, the queue and the binding, ready to send and receive.
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), kelp::Error> {
    /// # let conn = kelp::Connection::open("memory://doc-carrot-messaging-new").await?;
    /// use kelp::compat::carrot::{Messaging, MessagingOptions};
    /// let m = Messaging::new(&conn, MessagingOptions::new("q", "ex", "k")).await?;
    /// assert_eq!(m.consumer().queue().name, "q");
    /// # Ok(()) }
    /// ```
    pub async fn new(
        source: impl Into<ChannelSource>,
        options: MessagingOptions,
    ) -> Result<Messaging, Error> {
        let (channel, owns_channel) = source.into().resolve().await?;
        let parts = async {
            let publisher = Publisher::new(
                &channel,
                PublisherOptions::new(options.exchange.clone(), options.routing_key.clone()),
            )
            .await?;
            let consumer = Consumer::new(
                &channel,
                ConsumerOptions::new(options.queue, options.exchange, options.routing_key),
            )
            .await?;
            Ok::<_, Error>((publisher, consumer))
        }
        .await;
        match parts {
            Ok((publisher, consumer)) => Ok(Messaging {
                publisher,
                consumer,
                channel,
                owns_channel,
            }),
            Err(e) => {
                if owns_channel {
                    channel.close().await.ok();
                }
                Err(e)
            }
        }
    }

    /// The publisher.
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), kelp::Error> {
    /// # let conn = kelp::Connection::open("memory://doc-carrot-messaging-publisher").await?;
    /// use kelp::compat::carrot::{Messaging, MessagingOptions};
    /// let m = Messaging::new(&conn, MessagingOptions::new("q", "ex", "k")).await?;
    /// assert_eq!(m.publisher().options().routing_key, "k");
    /// # Ok(()) }
    /// ```
    pub fn publisher(&self) -> &Publisher {
        &self.publisher
    }

    /// The consumer.
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), kelp::Error> {
    /// # let conn = kelp::Connection::open("memory://doc-carrot-messaging-consumer").await?;
    /// use kelp::compat::carrot::{Messaging, MessagingOptions};
    /// let m = Messaging::new(&conn, MessagingOptions::new("q", "ex", "k")).await?;
    /// assert_eq!(m.consumer().options().routing_key, "k");
    /// # Ok(()) }
    /// ```
    pub fn consumer(&self) -> &Consumer {
        &self.consumer
    }

    /// The consumer, to `wait`, `iterconsume` or `discard_all` with it.
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), kelp::Error> {
    /// # let conn = kelp::Connection::open("memory://doc-carrot-messaging-consumer-mut").await?;
    /// use kelp::compat::carrot::{Messaging, MessagingOptions};
    /// let mut m = Messaging::new(&conn, MessagingOptions::new("q", "ex", "k")).await?;
    /// assert_eq!(m.consumer_mut().discard_all(None).await?, 0);
    /// # Ok(()) }
    /// ```
    pub fn consumer_mut(&mut self) -> &mut Consumer {
        &mut self.consumer
    }

    /// Add a callback for received messages (carrot's `register_callback`).
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), kelp::Error> {
    /// # let conn = kelp::Connection::open("memory://doc-carrot-messaging-register").await?;
    /// use kelp::compat::carrot::{Messaging, MessagingOptions};
    /// let mut m = Messaging::new(&conn, MessagingOptions::new("q", "ex", "k")).await?;
    /// m.register_callback(|_, msg| Box::pin(async move { msg.ack_log_error().await }));
    /// # Ok(()) }
    /// ```
    pub fn register_callback<F>(&mut self, callback: F)
    where
        F: for<'a> FnMut(&'a Value, &'a mut Message) -> BoxFuture<'a, ()> + Send + 'static,
    {
        self.consumer.register_callback(callback);
    }

    /// Run the callbacks on `(payload, message)` (carrot's `receive`).
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), kelp::Error> {
    /// # let conn = kelp::Connection::open("memory://doc-carrot-messaging-receive").await?;
    /// use kelp::compat::carrot::{FetchOptions, Messaging, MessagingOptions, SendOptions};
    /// let mut m = Messaging::new(&conn, MessagingOptions::new("q", "ex", "k")).await?;
    /// m.send(&1, SendOptions::default()).await?;
    /// let mut msg = m.fetch(FetchOptions::default()).await?.expect("a message");
    /// m.register_callback(|_, msg| Box::pin(async move { msg.ack_log_error().await }));
    /// let payload = msg.payload()?.clone();
    /// m.receive(&payload, &mut msg).await?;
    /// assert!(msg.acknowledged());
    /// # Ok(()) }
    /// ```
    pub async fn receive(&mut self, payload: &Value, message: &mut Message) -> Result<(), Error> {
        self.consumer.receive(payload, message).await
    }

    /// Send a message (see [`Publisher::send`]).
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), kelp::Error> {
    /// # let conn = kelp::Connection::open("memory://doc-carrot-messaging-send").await?;
    /// use kelp::compat::carrot::{Messaging, MessagingOptions, SendOptions};
    /// let m = Messaging::new(&conn, MessagingOptions::new("q", "ex", "k")).await?;
    /// m.send(&"hello", SendOptions::default().delivery_mode(kelp::DeliveryMode::Transient)).await?;
    /// # Ok(()) }
    /// ```
    pub async fn send<T: Serialize + ?Sized>(
        &self,
        data: &T,
        options: SendOptions,
    ) -> Result<(), Error> {
        self.publisher.send(data, options).await
    }

    /// Fetch a message (see [`Consumer::fetch`]).
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), kelp::Error> {
    /// # let conn = kelp::Connection::open("memory://doc-carrot-messaging-fetch").await?;
    /// use kelp::compat::carrot::{FetchOptions, Messaging, MessagingOptions};
    /// let mut m = Messaging::new(&conn, MessagingOptions::new("q", "ex", "k")).await?;
    /// assert!(m.fetch(FetchOptions::default()).await?.is_none());
    /// # Ok(()) }
    /// ```
    pub async fn fetch(&mut self, options: FetchOptions) -> Result<Option<Message>, Error> {
        self.consumer.fetch(options).await
    }

    /// Waiting messages as a stream (see [`Consumer::iterqueue`]).
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), kelp::Error> {
    /// # let conn = kelp::Connection::open("memory://doc-carrot-messaging-iterqueue").await?;
    /// use kelp::compat::carrot::{Messaging, MessagingOptions, SendOptions};
    /// let mut m = Messaging::new(&conn, MessagingOptions::new("q", "ex", "k")).await?;
    /// m.send(&1, SendOptions::default()).await?;
    /// let mut it = m.iterqueue(None, false);
    /// while let Some(msg) = it.next().await {
    ///     msg?.ack().await?;
    /// }
    /// # Ok(()) }
    /// ```
    pub fn iterqueue(&mut self, limit: Option<usize>, infinite: bool) -> Messages<'_> {
        self.consumer.iterqueue(limit, infinite)
    }

    /// Close the consumer and the publisher, and the channel if it opened it (carrot's
    /// `close`).
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), kelp::Error> {
    /// # let conn = kelp::Connection::open("memory://doc-carrot-messaging-close").await?;
    /// use kelp::compat::carrot::{Messaging, MessagingOptions};
    /// let m = Messaging::new(&conn, MessagingOptions::new("q", "ex", "k")).await?;
    /// m.close().await?;
    /// # Ok(()) }
    /// ```
    pub async fn close(self) -> Result<(), Error> {
        let mut outcome = self.consumer.close().await;
        outcome = outcome.and(self.publisher.close().await);
        if self.owns_channel {
            outcome = outcome.and(self.channel.close().await);
        }
        outcome
    }
}
