//! Publishing (Kombu's `Producer`).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use kelp_amqp::{BasicProperties, FieldTable, FieldValue, ShortString};
use serde::Serialize;

use crate::channel::Channel;
use crate::entity::{Declarable, DeliveryMode, Exchange};
use crate::error::Error;
use crate::retry::RetryPolicy;
use crate::transport::{PublishOutcome, RawReturn};

/// A body ready to publish: raw bytes, text, or an already-encoded payload.
///
/// ```
/// use kelp::Body;
/// assert!(matches!(Body::from("hi"), Body::Text(_)));
/// assert!(matches!(Body::from(vec![0u8, 1]), Body::Raw(_)));
/// ```
#[derive(Debug, Clone, PartialEq)]
pub enum Body {
    /// Bytes sent as they are (`application/data`, `binary` unless a content type is given).
    Raw(Bytes),
    /// Text (`text/plain`, `utf-8`).
    Text(String),
}

impl From<Bytes> for Body {
    fn from(b: Bytes) -> Self {
        Body::Raw(b)
    }
}
impl From<Vec<u8>> for Body {
    fn from(b: Vec<u8>) -> Self {
        Body::Raw(b.into())
    }
}
impl From<&'static [u8]> for Body {
    fn from(b: &'static [u8]) -> Self {
        Body::Raw(Bytes::from_static(b))
    }
}
impl From<String> for Body {
    fn from(s: String) -> Self {
        Body::Text(s)
    }
}
impl From<&str> for Body {
    fn from(s: &str) -> Self {
        Body::Text(s.to_owned())
    }
}

/// The options of one publish (every option of Kombu's `Producer.publish`). Unset fields take
/// the producer's defaults.
///
/// ```
/// use std::time::Duration;
/// use kelp::PublishOptions;
/// let o = PublishOptions::default()
///     .routing_key("orders.created")
///     .priority(5)
///     .expiration(Duration::from_secs(30))
///     .header("trace", "abc")
///     .compression("zlib");
/// assert_eq!(o.routing_key.as_deref(), Some("orders.created"));
/// ```
#[derive(Debug, Clone, Default)]
pub struct PublishOptions {
    /// The routing key (default: the producer's).
    pub routing_key: Option<String>,
    /// Publish to this exchange instead of the producer's.
    pub exchange: Option<String>,
    /// Transient or persistent (default: the exchange's, else persistent as in Kombu).
    pub delivery_mode: Option<DeliveryMode>,
    /// Return the message if no queue takes it.
    pub mandatory: bool,
    /// Not supported by RabbitMQ 3+: asking for it is an error.
    pub immediate: bool,
    /// Message priority (0–255; queues with `x-max-priority` honour it).
    pub priority: Option<u8>,
    /// The content type (for raw bodies; serializers set their own).
    pub content_type: Option<String>,
    /// The content encoding (for raw bodies).
    pub content_encoding: Option<String>,
    /// The serializer name (default: the producer's, `json`).
    pub serializer: Option<String>,
    /// Compress the body with this method (`zlib`, `bzip2`, `lzma`, `zstd`, `brotli`).
    pub compression: Option<String>,
    /// Application headers.
    pub headers: FieldTable,
    /// Discard the message if not consumed within this time.
    pub expiration: Option<Duration>,
    /// Entities to declare (once per connection) before publishing.
    pub declare: Vec<Declarable>,
    /// Retry on connection errors with `retry_policy`.
    pub retry: bool,
    /// How to retry.
    pub retry_policy: RetryPolicy,
    /// Give up sending after this long.
    pub timeout: Option<Duration>,
    /// Give up waiting for the broker's confirm after this long.
    pub confirm_timeout: Option<Duration>,
    /// `correlation_id` property.
    pub correlation_id: Option<String>,
    /// `reply_to` property.
    pub reply_to: Option<String>,
    /// `message_id` property.
    pub message_id: Option<String>,
    /// `timestamp` property (seconds since the Unix epoch); `Some(0)` stamps the current time.
    pub timestamp: Option<u64>,
    /// `type` property.
    pub kind: Option<String>,
    /// `user_id` property (RabbitMQ checks it against the connection's user).
    pub user_id: Option<String>,
    /// `app_id` property.
    pub app_id: Option<String>,
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

impl PublishOptions {
    setters! {
        /// Set `routing_key`.
        routing_key: impl Into<String> => |v: _| Some(Into::<String>::into(v));
        /// Set `exchange`.
        exchange: impl Into<String> => |v: _| Some(Into::<String>::into(v));
        /// Set `delivery_mode`.
        delivery_mode: DeliveryMode => Some;
        /// Set `mandatory`.
        mandatory: bool => |v| v;
        /// Set `immediate` (an error at publish time).
        immediate: bool => |v| v;
        /// Set `priority`.
        priority: u8 => Some;
        /// Set `content_type`.
        content_type: impl Into<String> => |v: _| Some(Into::<String>::into(v));
        /// Set `content_encoding`.
        content_encoding: impl Into<String> => |v: _| Some(Into::<String>::into(v));
        /// Set `serializer`.
        serializer: impl Into<String> => |v: _| Some(Into::<String>::into(v));
        /// Set `compression`.
        compression: impl Into<String> => |v: _| Some(Into::<String>::into(v));
        /// Set `expiration`.
        expiration: Duration => Some;
        /// Set `retry`.
        retry: bool => |v| v;
        /// Set `retry_policy`.
        retry_policy: RetryPolicy => |v| v;
        /// Set `timeout`.
        timeout: Duration => Some;
        /// Set `confirm_timeout`.
        confirm_timeout: Duration => Some;
        /// Set `correlation_id`.
        correlation_id: impl Into<String> => |v: _| Some(Into::<String>::into(v));
        /// Set `reply_to`.
        reply_to: impl Into<String> => |v: _| Some(Into::<String>::into(v));
        /// Set `message_id`.
        message_id: impl Into<String> => |v: _| Some(Into::<String>::into(v));
        /// Set `timestamp`.
        timestamp: u64 => Some;
        /// Set `type`.
        kind: impl Into<String> => |v: _| Some(Into::<String>::into(v));
        /// Set `user_id`.
        user_id: impl Into<String> => |v: _| Some(Into::<String>::into(v));
        /// Set `app_id`.
        app_id: impl Into<String> => |v: _| Some(Into::<String>::into(v));
    }

    /// Add a header.
    ///
    /// ```
    /// let o = kelp::PublishOptions::default().header("attempt", 2i32);
    /// assert!(o.headers.get("attempt").is_some());
    /// ```
    pub fn header(mut self, key: &str, value: impl Into<FieldValue>) -> Self {
        self.headers.insert(key, value.into());
        self
    }

    /// Declare `entity` (once per connection) before publishing.
    ///
    /// ```
    /// let o = kelp::PublishOptions::default().declare(kelp::Queue::new("tasks"));
    /// assert_eq!(o.declare.len(), 1);
    /// ```
    pub fn declare(mut self, entity: impl Into<Declarable>) -> Self {
        self.declare.push(entity.into());
        self
    }
}

type ReturnCallback = Arc<dyn Fn(RawReturn) + Send + Sync>;

/// Publishes messages to an exchange (Kombu's `Producer`).
///
/// ```no_run
/// # async fn demo() -> Result<(), kelp::Error> {
/// use kelp::{Connection, Exchange, Producer, PublishOptions};
/// let conn = Connection::open("memory://").await?;
/// let ch = conn.channel().await?;
/// let producer = Producer::new(&ch).exchange(Exchange::topic("events")).serializer("json");
/// producer
///     .publish_serde(&serde_json::json!({"id": 1}), PublishOptions::default().routing_key("user.created"))
///     .await?;
/// producer.publish("plain text", PublishOptions::default().routing_key("note")).await?;
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct Producer {
    channel: Channel,
    exchange: Exchange,
    routing_key: String,
    serializer: String,
    compression: Option<String>,
    auto_declare: bool,
    on_return: Option<ReturnCallback>,
    /// Set once the exchange is declared, so a publish costs no declare-cache lookup.
    exchange_declared: Arc<AtomicBool>,
}

impl std::fmt::Debug for Producer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Producer")
            .field("exchange", &self.exchange.name)
            .field("routing_key", &self.routing_key)
            .field("serializer", &self.serializer)
            .field("compression", &self.compression)
            .finish_non_exhaustive()
    }
}

impl Producer {
    /// A producer on `channel` publishing to the default exchange with the `json` serializer.
    ///
    /// ```no_run
    /// # fn demo(ch: &kelp::Channel) { let p = kelp::Producer::new(ch); }
    /// ```
    pub fn new(channel: &Channel) -> Self {
        Producer {
            channel: channel.clone(),
            exchange: Exchange::default_exchange(),
            routing_key: String::new(),
            serializer: "json".into(),
            compression: None,
            auto_declare: true,
            on_return: None,
            exchange_declared: Arc::new(AtomicBool::new(false)),
        }
    }
    /// The exchange to publish to (declared once per connection before the first publish
    /// unless `auto_declare(false)`).
    ///
    /// ```no_run
    /// # fn demo(ch: &kelp::Channel) { let p = kelp::Producer::new(ch).exchange(kelp::Exchange::fanout("f")); }
    /// ```
    pub fn exchange(mut self, exchange: impl Into<Exchange>) -> Self {
        let exchange = exchange.into();
        self.exchange = exchange;
        self.exchange_declared = Arc::new(AtomicBool::new(false));
        self
    }
    /// The default routing key.
    ///
    /// ```no_run
    /// # fn demo(ch: &kelp::Channel) { let p = kelp::Producer::new(ch).routing_key("tasks"); }
    /// ```
    pub fn routing_key(mut self, key: impl Into<String>) -> Self {
        self.routing_key = key.into();
        self
    }
    /// The default serializer for [`Producer::publish_serde`].
    ///
    /// ```no_run
    /// # fn demo(ch: &kelp::Channel) { let p = kelp::Producer::new(ch).serializer("msgpack"); }
    /// ```
    pub fn serializer(mut self, name: impl Into<String>) -> Self {
        self.serializer = name.into();
        self
    }
    /// The default compression method.
    ///
    /// ```no_run
    /// # fn demo(ch: &kelp::Channel) { let p = kelp::Producer::new(ch).compression("zstd"); }
    /// ```
    pub fn compression(mut self, method: impl Into<String>) -> Self {
        self.compression = Some(method.into());
        self
    }
    /// Declare the exchange before the first publish (default true).
    ///
    /// ```no_run
    /// # fn demo(ch: &kelp::Channel) { let p = kelp::Producer::new(ch).auto_declare(false); }
    /// ```
    pub fn auto_declare(mut self, on: bool) -> Self {
        self.auto_declare = on;
        self
    }
    /// Call `callback` with every mandatory message the broker returns on this channel that no
    /// confirmed publish claimed.
    ///
    /// ```no_run
    /// # fn demo(ch: &kelp::Channel) {
    /// let p = kelp::Producer::new(ch).on_return(|r| eprintln!("returned: {} {}", r.reply_code, r.routing_key));
    /// # }
    /// ```
    pub fn on_return(mut self, callback: impl Fn(RawReturn) + Send + Sync + 'static) -> Self {
        let cb: ReturnCallback = Arc::new(callback);
        if let Some(mut rx) = self.channel.raw().take_returns() {
            let cb2 = cb.clone();
            tokio::spawn(async move {
                while let Some(r) = rx.recv().await {
                    cb2(r);
                }
            });
        }
        self.on_return = Some(cb);
        self
    }
    /// The channel it publishes on.
    ///
    /// ```no_run
    /// # fn demo(p: &kelp::Producer) { let ch = p.channel(); }
    /// ```
    pub fn channel(&self) -> &Channel {
        &self.channel
    }
    /// Move to another channel (Kombu's `revive`, after a reconnect).
    ///
    /// ```no_run
    /// # fn demo(p: &mut kelp::Producer, ch: &kelp::Channel) { p.revive(ch); }
    /// ```
    pub fn revive(&mut self, channel: &Channel) {
        self.channel = channel.clone();
        self.exchange_declared = Arc::new(AtomicBool::new(false));
    }

    /// Let go of the producer (Kombu's `close` / `release`). The channel is shared, so it stays
    /// open; close it with [`Channel::close`] when nothing else uses it.
    ///
    /// ```no_run
    /// # fn demo(p: kelp::Producer) { p.release(); }
    /// ```
    pub fn release(self) {}

    /// Serialize `value` with the serializer (option, else the producer's) and publish it.
    ///
    /// ```no_run
    /// # async fn demo(p: &kelp::Producer) -> Result<(), kelp::Error> {
    /// #[derive(serde::Serialize)]
    /// struct Job { id: u32 }
    /// p.publish_serde(&Job { id: 7 }, kelp::PublishOptions::default().routing_key("jobs")).await?;
    /// # Ok(()) }
    /// ```
    pub async fn publish_serde<T: Serialize + ?Sized>(
        &self,
        value: &T,
        options: PublishOptions,
    ) -> Result<(), Error> {
        let name = options.serializer.as_deref().unwrap_or(&self.serializer);
        let codec = self.channel.codec();
        let enc = codec.registry.encode(name, value)?;
        let ct = static_or_owned(enc.content_type);
        let ce = static_or_owned(enc.content_encoding);
        self.publish_encoded(enc.body, ct, ce, options).await
    }

    /// Publish raw bytes or text as they are.
    ///
    /// ```no_run
    /// # async fn demo(p: &kelp::Producer) -> Result<(), kelp::Error> {
    /// p.publish(&b"\x00\x01"[..], kelp::PublishOptions::default().routing_key("bin")).await?;
    /// p.publish("hello", kelp::PublishOptions::default().routing_key("text")).await?;
    /// # Ok(()) }
    /// ```
    pub async fn publish(
        &self,
        body: impl Into<Body>,
        options: PublishOptions,
    ) -> Result<(), Error> {
        let (body, ct, ce) = match body.into() {
            Body::Raw(b) => (b, "application/data", "binary"),
            Body::Text(s) => (Bytes::from(s), "text/plain", "utf-8"),
        };
        // The defaults are static strings: no allocation per publish.
        let ct = match &options.content_type {
            Some(c) => ShortString::from(c.as_str()),
            None => ShortString::from_static(ct),
        };
        let ce = match &options.content_encoding {
            Some(c) => ShortString::from(c.as_str()),
            None => ShortString::from_static(ce),
        };
        self.publish_encoded(body, ct, ce, options).await
    }

    async fn publish_encoded(
        &self,
        body: Bytes,
        content_type: ShortString,
        content_encoding: ShortString,
        options: PublishOptions,
    ) -> Result<(), Error> {
        if options.immediate {
            return Err(Error::ImmediateNotSupported);
        }
        let codec = self.channel.codec();
        let mut headers = options.headers.clone();
        let compression = options
            .compression
            .as_deref()
            .or(self.compression.as_deref());
        let body = match compression {
            Some(method) => {
                let (b, header) = codec.compression.compress(method, &body)?;
                headers.insert("compression", header.to_string());
                b
            }
            None => body,
        };
        let mode = options
            .delivery_mode
            .or(self.exchange.delivery_mode)
            .unwrap_or(DeliveryMode::Persistent);
        let mut p = BasicProperties::default()
            .with_content_type(content_type)
            .with_content_encoding(content_encoding)
            .with_delivery_mode(mode as u8)
            .with_headers(headers);
        if let Some(v) = options.priority {
            p = p.with_priority(v);
        }
        if let Some(v) = options.expiration {
            p = p.with_expiration(v.as_millis().to_string().as_str());
        }
        if let Some(v) = &options.correlation_id {
            p = p.with_correlation_id(v.as_str());
        }
        if let Some(v) = &options.reply_to {
            p = p.with_reply_to(v.as_str());
        }
        if let Some(v) = &options.message_id {
            p = p.with_message_id(v.as_str());
        }
        if let Some(v) = options.timestamp {
            let v = if v == 0 {
                SystemTime::now()
                    .duration_since(UNIX_EPOCH)
                    .map(|d| d.as_secs())
                    .unwrap_or(0)
            } else {
                v
            };
            p = p.with_timestamp(v);
        }
        if let Some(v) = &options.kind {
            p = p.with_kind(v.as_str());
        }
        if let Some(v) = &options.user_id {
            p = p.with_user_id(v.as_str());
        }
        if let Some(v) = &options.app_id {
            p = p.with_app_id(v.as_str());
        }

        let exchange = options.exchange.as_deref().unwrap_or(&self.exchange.name);
        let routing_key = options.routing_key.as_deref().unwrap_or(&self.routing_key);
        // Every transport carries AMQP's limits (255-byte short strings): refuse here, with
        // the reason, rather than lose the message later.
        let invalid = |reason: String| Error::InvalidArgument {
            what: "message to publish",
            reason,
        };
        for (name, s) in [("exchange", exchange), ("routing key", routing_key)] {
            if s.len() > 255 {
                return Err(invalid(format!(
                    "{name} of {} bytes exceeds AMQP's 255-byte limit",
                    s.len()
                )));
            }
        }
        p.check_encodable().map_err(|e| invalid(e.to_string()))?;
        let conn = self.channel.connection();
        if self.auto_declare
            && options.exchange.is_none()
            && !self.exchange.is_default()
            && !self.exchange_declared.load(Ordering::Acquire)
        {
            conn.maybe_declare(&self.channel, &self.exchange).await?;
            self.exchange_declared.store(true, Ordering::Release);
        }
        for d in &options.declare {
            conn.maybe_declare(&self.channel, d.clone()).await?;
        }

        let once = |p: BasicProperties, body: Bytes| async move {
            let fut = self
                .channel
                .raw()
                .publish(exchange, routing_key, options.mandatory, p, body);
            let limit = match (options.timeout, options.confirm_timeout) {
                (Some(a), Some(b)) => Some(a + b),
                (a, b) => a.or(b),
            };
            let outcome = match limit {
                Some(t) => tokio::time::timeout(t, fut)
                    .await
                    .map_err(|_| Error::Timeout {
                        what: "the publish to be sent and confirmed",
                        after: t,
                    })??,
                None => fut.await?,
            };
            match outcome {
                PublishOutcome::Nacked => Err(Error::Nacked {
                    exchange: exchange.to_owned(),
                    routing_key: routing_key.to_owned(),
                }),
                PublishOutcome::Acked | PublishOutcome::Sent => Ok(()),
            }
        };
        if options.retry {
            options
                .retry_policy
                .run(
                    || once(p.clone(), body.clone()),
                    |e, wait| {
                        tracing::warn!(error = %e, ?wait, "publish failed; retrying");
                    },
                )
                .await
        } else {
            // No retry: no copy of the properties or body.
            once(p, body).await
        }
    }
}

fn static_or_owned(s: std::borrow::Cow<'static, str>) -> ShortString {
    match s {
        std::borrow::Cow::Borrowed(s) => ShortString::from_static(s),
        std::borrow::Cow::Owned(s) => ShortString::from(s),
    }
}
