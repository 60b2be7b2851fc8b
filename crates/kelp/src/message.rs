//! A received message: body, properties, delivery info, and acknowledgement.

use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, OnceLock};

use bytes::Bytes;
use kelp_amqp::{BasicProperties, FieldTable};
use serde::de::DeserializeOwned;

use crate::compression::Compression;
use crate::error::Error;
use crate::serialization::{Accept, Registry, Value};
use crate::transport::{RawDelivery, TransportChannel};

/// Kombu's default whitelist (everything but pickle, yaml and msgpack), used when no
/// `accept` was given.
pub(crate) fn default_accept() -> &'static Accept {
    static DEFAULT: std::sync::OnceLock<Accept> = std::sync::OnceLock::new();
    DEFAULT.get_or_init(Accept::default)
}

/// How bodies are encoded and decoded on a connection.
#[derive(Debug, Clone)]
pub(crate) struct Codec {
    pub(crate) registry: Registry,
    pub(crate) compression: Compression,
    pub(crate) max_decompressed: usize,
}

/// Where and how a message was delivered (Kombu's `delivery_info`).
///
/// ```no_run
/// # fn demo(msg: &kelp::Message) {
/// let info = msg.delivery_info();
/// println!("{} via {} (redelivered: {})", info.routing_key, info.exchange, info.redelivered);
/// # }
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeliveryInfo<'a> {
    /// The exchange it was published to.
    pub exchange: &'a str,
    /// The routing key it was published with.
    pub routing_key: &'a str,
    /// True if it was delivered before and not acknowledged.
    pub redelivered: bool,
    /// The consumer it came to (empty for `get`).
    pub consumer_tag: &'a str,
    /// The tag to acknowledge it with.
    pub delivery_tag: u64,
}

/// What has been done with a message.
///
/// ```no_run
/// # async fn demo(mut msg: kelp::Message) -> Result<(), kelp::Error> {
/// assert_eq!(msg.state(), kelp::MessageState::Received);
/// msg.ack().await?;
/// assert_eq!(msg.state(), kelp::MessageState::Acked);
/// assert!(msg.ack().await.is_err()); // acting twice is a MessageStateError
/// # Ok(()) }
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MessageState {
    /// Received, not yet acknowledged or rejected.
    Received,
    /// Acknowledged.
    Acked,
    /// Rejected (dropped or dead-lettered).
    Rejected,
    /// Rejected with requeue.
    Requeued,
}

impl MessageState {
    fn from_u8(v: u8) -> MessageState {
        match v {
            1 => MessageState::Acked,
            2 => MessageState::Rejected,
            3 => MessageState::Requeued,
            _ => MessageState::Received,
        }
    }
    fn as_u8(self) -> u8 {
        match self {
            MessageState::Received => 0,
            MessageState::Acked => 1,
            MessageState::Rejected => 2,
            MessageState::Requeued => 3,
        }
    }
    fn name(self) -> &'static str {
        match self {
            MessageState::Received => "received",
            MessageState::Acked => "acknowledged",
            MessageState::Rejected => "rejected",
            MessageState::Requeued => "requeued",
        }
    }
}

/// A received message.
///
/// ```no_run
/// # async fn demo(mut consumer: kelp::Consumer) -> Result<(), kelp::Error> {
/// #[derive(serde::Deserialize)]
/// struct Order { id: u64 }
/// while let Some(msg) = consumer.next().await {
///     let mut msg = msg?;
///     let order: Order = msg.decode()?;
///     println!("order {} via {}", order.id, msg.delivery_info().routing_key);
///     msg.ack().await?;
/// }
/// # Ok(()) }
/// ```
#[derive(Debug)]
pub struct Message {
    d: RawDelivery,
    channel: Option<Arc<dyn TransportChannel>>,
    state: MessageState,
    no_ack: bool,
    codec: Arc<Codec>,
    accept: Option<Arc<Accept>>,
    payload: OnceLock<Value>,
    plain: OnceLock<Bytes>,
    /// Shared with a [`Settler`] when something else (a worker loop) settles the message if
    /// its handler did not: whoever acts first wins, the other sees it settled.
    shared: Option<Arc<AtomicU8>>,
}

/// Settles a message its handler left unsettled (see [`Message::settler`]).
#[derive(Debug)]
pub(crate) struct Settler {
    channel: Option<Arc<dyn TransportChannel>>,
    delivery_tag: u64,
    no_ack: bool,
    shared: Arc<AtomicU8>,
}

impl Settler {
    /// Ack (`ok`) or reject it, unless it was settled already. Returns true if this call
    /// settled it.
    pub(crate) async fn settle(self, ok: bool, requeue: bool) -> Result<bool, Error> {
        if self.no_ack {
            return Ok(false);
        }
        let next = match (ok, requeue) {
            (true, _) => MessageState::Acked,
            (false, true) => MessageState::Requeued,
            (false, false) => MessageState::Rejected,
        };
        if self
            .shared
            .compare_exchange(
                MessageState::Received.as_u8(),
                next.as_u8(),
                Ordering::AcqRel,
                Ordering::Acquire,
            )
            .is_err()
        {
            return Ok(false);
        }
        if let Some(ch) = self.channel {
            if ok {
                ch.ack(self.delivery_tag, false).await?;
            } else {
                ch.reject(self.delivery_tag, requeue).await?;
            }
        }
        Ok(true)
    }
}

impl Message {
    /// A handle that settles this message later unless it is settled first (by the message
    /// itself, wherever it went).
    pub(crate) fn settler(&mut self) -> Settler {
        let shared = self
            .shared
            .get_or_insert_with(|| Arc::new(AtomicU8::new(self.state.as_u8())))
            .clone();
        Settler {
            channel: self.channel.clone(),
            delivery_tag: self.d.delivery_tag,
            no_ack: self.no_ack,
            shared,
        }
    }

    pub(crate) fn new(
        d: RawDelivery,
        channel: Arc<dyn TransportChannel>,
        no_ack: bool,
        codec: Arc<Codec>,
    ) -> Self {
        Message {
            d,
            channel: Some(channel),
            state: if no_ack {
                MessageState::Acked
            } else {
                MessageState::Received
            },
            no_ack,
            codec,
            accept: None,
            payload: OnceLock::new(),
            plain: OnceLock::new(),
            shared: None,
        }
    }

    pub(crate) fn with_accept(mut self, accept: Option<Arc<Accept>>) -> Self {
        self.accept = accept;
        self
    }

    /// The body as it arrived (still compressed, if it was).
    ///
    /// ```no_run
    /// # fn demo(msg: &kelp::Message) {
    /// let raw: &[u8] = msg.body();
    /// # }
    /// ```
    pub fn body(&self) -> &Bytes {
        &self.d.body
    }

    /// The body decompressed (per the `compression` header), not deserialized.
    ///
    /// ```no_run
    /// # fn demo(msg: &kelp::Message) -> Result<(), kelp::Error> {
    /// let plain = msg.decompressed_body()?;
    /// # Ok(()) }
    /// ```
    pub fn decompressed_body(&self) -> Result<Bytes, Error> {
        if let Some(b) = self.plain.get() {
            return Ok(b.clone());
        }
        let b = match self.compression() {
            Some(method) => self.codec.compression.decompress(
                method,
                &self.d.body,
                self.codec.max_decompressed,
            )?,
            None => self.d.body.clone(),
        };
        Ok(self.plain.get_or_init(|| b).clone())
    }

    /// The `compression` header (e.g. `application/x-gzip`), if the body is compressed.
    ///
    /// ```no_run
    /// # fn demo(msg: &kelp::Message) {
    /// if let Some(c) = msg.compression() { println!("compressed with {c}"); }
    /// # }
    /// ```
    pub fn compression(&self) -> Option<&str> {
        self.headers()
            .and_then(|h| h.get("compression"))
            .and_then(|v| v.as_str())
    }

    fn check_accept(&self) -> Result<(), Error> {
        // A transport entry that was not a message at all (e.g. a Redis list entry that is not
        // Kombu's envelope): its raw bytes are the body, but it never decodes.
        if self.content_type() == Some(crate::transport::INVALID_ENTRY_CONTENT_TYPE) {
            let reason = self
                .headers()
                .and_then(|h| h.get("x-kelp-envelope-error"))
                .and_then(kelp_amqp::FieldValue::as_str)
                .unwrap_or("not a message")
                .to_owned();
            return Err(Error::InvalidEntry {
                transport: self.channel.as_ref().map(|c| c.transport()).unwrap_or(""),
                reason,
            });
        }
        match &self.accept {
            Some(a) => a.check(self.content_type())?,
            None => default_accept().check(self.content_type())?,
        }
        Ok(())
    }

    /// Deserialize the body into `T` (after the accept whitelist and decompression).
    ///
    /// ```no_run
    /// # fn demo(msg: &kelp::Message) -> Result<(), kelp::Error> {
    /// let v: std::collections::HashMap<String, i64> = msg.decode()?;
    /// # Ok(()) }
    /// ```
    pub fn decode<T: DeserializeOwned>(&self) -> Result<T, Error> {
        self.check_accept()?;
        let body = self.decompressed_body()?;
        Ok(self
            .codec
            .registry
            .decode(self.content_type(), self.content_encoding(), &body)?)
    }

    /// The body decoded into kelp's dynamic value model, cached (Kombu's `payload`).
    ///
    /// ```no_run
    /// # fn demo(msg: &kelp::Message) -> Result<(), kelp::Error> {
    /// let payload = msg.payload()?;
    /// # Ok(()) }
    /// ```
    pub fn payload(&self) -> Result<&Value, Error> {
        if let Some(v) = self.payload.get() {
            return Ok(v);
        }
        self.check_accept()?;
        let body = self.decompressed_body()?;
        let v = self.codec.registry.decode_value(
            self.content_type(),
            self.content_encoding(),
            &body,
        )?;
        Ok(self.payload.get_or_init(|| v))
    }

    /// The `reply_to` property (where an RPC answer goes).
    ///
    /// ```no_run
    /// # fn demo(msg: &kelp::Message) {
    /// if let Some(queue) = msg.reply_to() { println!("answer to {queue}"); }
    /// # }
    /// ```
    pub fn reply_to(&self) -> Option<&str> {
        self.d.properties.reply_to.as_ref().map(|s| s.as_str())
    }

    /// The `correlation_id` property (which request an RPC answer belongs to).
    ///
    /// ```no_run
    /// # fn demo(msg: &kelp::Message) {
    /// let id = msg.correlation_id().unwrap_or_default();
    /// # }
    /// ```
    pub fn correlation_id(&self) -> Option<&str> {
        self.d
            .properties
            .correlation_id
            .as_ref()
            .map(|s| s.as_str())
    }

    /// The content type.
    ///
    /// ```no_run
    /// # fn demo(msg: &kelp::Message) {
    /// assert_eq!(msg.content_type(), Some("application/json"));
    /// # }
    /// ```
    pub fn content_type(&self) -> Option<&str> {
        self.d.properties.content_type.as_ref().map(|s| s.as_str())
    }

    /// The content encoding.
    ///
    /// ```no_run
    /// # fn demo(msg: &kelp::Message) {
    /// assert_eq!(msg.content_encoding(), Some("utf-8"));
    /// # }
    /// ```
    pub fn content_encoding(&self) -> Option<&str> {
        self.d
            .properties
            .content_encoding
            .as_ref()
            .map(|s| s.as_str())
    }

    /// The application headers.
    ///
    /// ```no_run
    /// # fn demo(msg: &kelp::Message) {
    /// let retries = msg.headers().and_then(|h| h.get("retries"));
    /// # }
    /// ```
    pub fn headers(&self) -> Option<&FieldTable> {
        self.d.properties.headers.as_ref()
    }

    /// All AMQP properties.
    ///
    /// ```no_run
    /// # fn demo(msg: &kelp::Message) {
    /// let reply_to = msg.properties().reply_to.as_ref();
    /// # }
    /// ```
    pub fn properties(&self) -> &BasicProperties {
        &self.d.properties
    }

    /// Where and how it was delivered.
    ///
    /// ```no_run
    /// # fn demo(msg: &kelp::Message) {
    /// let info = msg.delivery_info();
    /// println!("{} {} {}", info.exchange, info.routing_key, info.redelivered);
    /// # }
    /// ```
    pub fn delivery_info(&self) -> DeliveryInfo<'_> {
        DeliveryInfo {
            exchange: &self.d.exchange,
            routing_key: &self.d.routing_key,
            redelivered: self.d.redelivered,
            consumer_tag: &self.d.consumer_tag,
            delivery_tag: self.d.delivery_tag,
        }
    }

    /// The delivery tag.
    ///
    /// ```no_run
    /// # fn demo(msg: &kelp::Message) { let t = msg.delivery_tag(); }
    /// ```
    pub fn delivery_tag(&self) -> u64 {
        self.d.delivery_tag
    }

    /// True if it was delivered before and not acknowledged.
    ///
    /// ```no_run
    /// # fn demo(msg: &kelp::Message) { if msg.redelivered() { /* maybe a poison message */ } }
    /// ```
    pub fn redelivered(&self) -> bool {
        self.d.redelivered
    }

    /// What has been done with it.
    ///
    /// ```no_run
    /// # fn demo(msg: &kelp::Message) { assert_eq!(msg.state(), kelp::MessageState::Received); }
    /// ```
    pub fn state(&self) -> MessageState {
        match &self.shared {
            Some(s) => MessageState::from_u8(s.load(Ordering::Acquire)),
            None => self.state,
        }
    }

    /// True once acknowledged, rejected or requeued.
    ///
    /// ```no_run
    /// # fn demo(msg: &kelp::Message) { assert!(!msg.acknowledged()); }
    /// ```
    pub fn acknowledged(&self) -> bool {
        self.state() != MessageState::Received
    }

    fn take(
        &mut self,
        action: &'static str,
        next: MessageState,
    ) -> Result<Option<Arc<dyn TransportChannel>>, Error> {
        if self.no_ack {
            // Kombu: acknowledging a no-ack message does nothing.
            return Ok(None);
        }
        if let Some(shared) = &self.shared {
            if let Err(cur) = shared.compare_exchange(
                MessageState::Received.as_u8(),
                next.as_u8(),
                Ordering::AcqRel,
                Ordering::Acquire,
            ) {
                self.state = MessageState::from_u8(cur);
                return Err(Error::MessageState {
                    state: self.state.name(),
                    action,
                });
            }
            self.state = next;
            return Ok(self.channel.clone());
        }
        if self.state != MessageState::Received {
            return Err(Error::MessageState {
                state: self.state.name(),
                action,
            });
        }
        self.state = next;
        Ok(self.channel.clone())
    }

    /// Acknowledge it.
    ///
    /// ```no_run
    /// # async fn demo(mut msg: kelp::Message) -> Result<(), kelp::Error> {
    /// msg.ack().await?;
    /// assert!(msg.ack().await.is_err()); // twice is an error
    /// # Ok(()) }
    /// ```
    pub async fn ack(&mut self) -> Result<(), Error> {
        self.ack_multiple(false).await
    }

    /// Acknowledge it, and with `multiple` every earlier message of its channel too.
    ///
    /// ```no_run
    /// # async fn demo(mut msg: kelp::Message) -> Result<(), kelp::Error> {
    /// msg.ack_multiple(true).await?;
    /// # Ok(()) }
    /// ```
    pub async fn ack_multiple(&mut self, multiple: bool) -> Result<(), Error> {
        if let Some(ch) = self.take("ack", MessageState::Acked)? {
            ch.ack(self.d.delivery_tag, multiple).await?;
        }
        Ok(())
    }

    /// Reject it: `requeue` puts it back in its queue, otherwise it is dropped or
    /// dead-lettered.
    ///
    /// ```no_run
    /// # async fn demo(mut msg: kelp::Message) -> Result<(), kelp::Error> {
    /// msg.reject(false).await?;
    /// # Ok(()) }
    /// ```
    pub async fn reject(&mut self, requeue: bool) -> Result<(), Error> {
        let next = if requeue {
            MessageState::Requeued
        } else {
            MessageState::Rejected
        };
        if let Some(ch) = self.take(if requeue { "requeue" } else { "reject" }, next)? {
            ch.reject(self.d.delivery_tag, requeue).await?;
        }
        Ok(())
    }

    /// Put it back in its queue (reject with requeue).
    ///
    /// ```no_run
    /// # async fn demo(mut msg: kelp::Message) -> Result<(), kelp::Error> {
    /// msg.requeue().await?;
    /// # Ok(()) }
    /// ```
    pub async fn requeue(&mut self) -> Result<(), Error> {
        self.reject(true).await
    }

    /// Negative-acknowledge it (RabbitMQ's `basic.nack`), optionally with every earlier one.
    ///
    /// ```no_run
    /// # async fn demo(mut msg: kelp::Message) -> Result<(), kelp::Error> {
    /// msg.nack(false, true).await?;
    /// # Ok(()) }
    /// ```
    pub async fn nack(&mut self, multiple: bool, requeue: bool) -> Result<(), Error> {
        let next = if requeue {
            MessageState::Requeued
        } else {
            MessageState::Rejected
        };
        if let Some(ch) = self.take("nack", next)? {
            ch.nack(self.d.delivery_tag, multiple, requeue).await?;
        }
        Ok(())
    }

    /// Acknowledge it, logging instead of returning an error (Kombu's `ack_log_error`).
    ///
    /// ```no_run
    /// # async fn demo(mut msg: kelp::Message) { msg.ack_log_error().await; }
    /// ```
    pub async fn ack_log_error(&mut self) {
        if let Err(e) = self.ack().await {
            tracing::error!(error = %e, delivery_tag = self.d.delivery_tag, "could not ack message");
        }
    }

    /// Reject it, logging instead of returning an error (Kombu's `reject_log_error`).
    ///
    /// ```no_run
    /// # async fn demo(mut msg: kelp::Message) { msg.reject_log_error(false).await; }
    /// ```
    pub async fn reject_log_error(&mut self, requeue: bool) {
        if let Err(e) = self.reject(requeue).await {
            tracing::error!(error = %e, delivery_tag = self.d.delivery_tag, "could not reject message");
        }
    }

    /// Run `handler` on the message and settle it by the outcome (aio-pika's
    /// `message.process()`): `Ok` acks; `Err` rejects, requeueing if `options.requeue`
    /// (but never a redelivered message when `options.reject_on_redelivered`). With
    /// `options.ignore_processed`, a message the handler settled itself is left alone.
    /// Returns the handler's result.
    ///
    /// ```no_run
    /// # async fn demo(msg: kelp::Message) -> Result<(), kelp::Error> {
    /// use kelp::message::ProcessOptions;
    /// let out = msg
    ///     .process(ProcessOptions::default().requeue(true), async |m| {
    ///         let n: i64 = m.decode()?;
    ///         Ok::<_, kelp::Error>(n * 2)
    ///     })
    ///     .await?;
    /// # Ok(()) }
    /// ```
    pub async fn process<F, T, E>(mut self, options: ProcessOptions, handler: F) -> Result<T, E>
    where
        F: AsyncFnOnce(&Message) -> Result<T, E>,
        E: From<Error>,
    {
        let out = handler(&self).await;
        if options.ignore_processed && self.acknowledged() {
            return out;
        }
        match &out {
            Ok(_) => self.ack().await?,
            Err(_) => {
                let requeue =
                    options.requeue && !(options.reject_on_redelivered && self.redelivered());
                self.reject(requeue).await?;
            }
        }
        out
    }
}

/// How [`Message::process`] settles a message.
///
/// ```
/// let opts = kelp::message::ProcessOptions::default().requeue(true).reject_on_redelivered(true);
/// ```
#[derive(Debug, Clone, Copy, Default)]
pub struct ProcessOptions {
    /// Requeue on error (default false: reject).
    pub requeue: bool,
    /// Never requeue a message that was already redelivered.
    pub reject_on_redelivered: bool,
    /// Leave alone a message the handler acked or rejected itself.
    pub ignore_processed: bool,
}

impl ProcessOptions {
    /// Requeue on error.
    ///
    /// ```
    /// assert!(kelp::message::ProcessOptions::default().requeue(true).requeue);
    /// ```
    pub fn requeue(mut self, requeue: bool) -> Self {
        self.requeue = requeue;
        self
    }
    /// Never requeue a redelivered message.
    ///
    /// ```
    /// assert!(kelp::message::ProcessOptions::default().reject_on_redelivered(true).reject_on_redelivered);
    /// ```
    pub fn reject_on_redelivered(mut self, on: bool) -> Self {
        self.reject_on_redelivered = on;
        self
    }
    /// Leave alone a message the handler settled.
    ///
    /// ```
    /// assert!(kelp::message::ProcessOptions::default().ignore_processed(true).ignore_processed);
    /// ```
    pub fn ignore_processed(mut self, on: bool) -> Self {
        self.ignore_processed = on;
        self
    }
}
