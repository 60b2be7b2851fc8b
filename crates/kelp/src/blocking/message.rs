//! The blocking message.

use std::sync::Arc;

use bytes::Bytes;
use kelp_amqp::{BasicProperties, FieldTable};
use serde::de::DeserializeOwned;

use super::Shared;
use crate::error::Error;
use crate::message::{DeliveryInfo, MessageState};
use crate::serialization::Value;

/// A received message with blocking `ack`, `reject`, `requeue` and `nack` (Kombu's `Message`).
/// It keeps its connection's background runtime alive.
///
/// ```
/// # fn main() -> Result<(), kelp::Error> {
/// let conn = kelp::blocking::Connection::open("memory://blocking-message-doc")?;
/// let mut q = conn.simple_queue("jobs")?;
/// q.put(&serde_json::json!({"id": 7}))?;
/// let mut msg = q.get(true, Some(std::time::Duration::from_secs(1)))?;
/// assert_eq!(msg.decode::<serde_json::Value>()?["id"], 7);
/// assert!(msg.payload().is_ok());
/// assert_eq!(msg.delivery_info().routing_key, "jobs");
/// msg.ack()?;
/// assert_eq!(msg.state(), kelp::MessageState::Acked);
/// assert!(msg.ack().is_err()); // twice is an error
/// # Ok(()) }
/// ```
#[derive(Debug)]
pub struct Message {
    inner: crate::Message,
    shared: Arc<Shared>,
}

impl Message {
    pub(super) fn new(inner: crate::Message, shared: Arc<Shared>) -> Self {
        Message { inner, shared }
    }

    /// The async message underneath.
    ///
    /// ```no_run
    /// # fn demo(msg: &kelp::blocking::Message) {
    /// let m: &kelp::Message = msg.as_async();
    /// # }
    /// ```
    pub fn as_async(&self) -> &crate::Message {
        &self.inner
    }

    /// The async message underneath, for use in async code.
    ///
    /// ```no_run
    /// # fn demo(msg: kelp::blocking::Message) {
    /// let m: kelp::Message = msg.into_async();
    /// # }
    /// ```
    pub fn into_async(self) -> crate::Message {
        self.inner
    }

    /// The body as it arrived (still compressed, if it was).
    ///
    /// ```no_run
    /// # fn demo(msg: &kelp::blocking::Message) {
    /// let raw: &[u8] = msg.body();
    /// # }
    /// ```
    pub fn body(&self) -> &Bytes {
        self.inner.body()
    }

    /// The body decompressed, not deserialized.
    ///
    /// ```no_run
    /// # fn demo(msg: &kelp::blocking::Message) -> Result<(), kelp::Error> {
    /// let plain = msg.decompressed_body()?;
    /// # Ok(()) }
    /// ```
    pub fn decompressed_body(&self) -> Result<Bytes, Error> {
        self.inner.decompressed_body()
    }

    /// Deserialize the body into `T` (after the accept whitelist and decompression).
    ///
    /// ```no_run
    /// # fn demo(msg: &kelp::blocking::Message) -> Result<(), kelp::Error> {
    /// let v: std::collections::HashMap<String, i64> = msg.decode()?;
    /// # Ok(()) }
    /// ```
    pub fn decode<T: DeserializeOwned>(&self) -> Result<T, Error> {
        self.inner.decode()
    }

    /// The body decoded into kelp's dynamic value model, cached (Kombu's `payload`).
    ///
    /// ```no_run
    /// # fn demo(msg: &kelp::blocking::Message) -> Result<(), kelp::Error> {
    /// let payload = msg.payload()?;
    /// # Ok(()) }
    /// ```
    pub fn payload(&self) -> Result<&Value, Error> {
        self.inner.payload()
    }

    /// The content type.
    ///
    /// ```no_run
    /// # fn demo(msg: &kelp::blocking::Message) {
    /// assert_eq!(msg.content_type(), Some("application/json"));
    /// # }
    /// ```
    pub fn content_type(&self) -> Option<&str> {
        self.inner.content_type()
    }

    /// The content encoding.
    ///
    /// ```no_run
    /// # fn demo(msg: &kelp::blocking::Message) {
    /// assert_eq!(msg.content_encoding(), Some("utf-8"));
    /// # }
    /// ```
    pub fn content_encoding(&self) -> Option<&str> {
        self.inner.content_encoding()
    }

    /// The `compression` header, if the body is compressed.
    ///
    /// ```no_run
    /// # fn demo(msg: &kelp::blocking::Message) {
    /// if let Some(c) = msg.compression() { println!("compressed with {c}"); }
    /// # }
    /// ```
    pub fn compression(&self) -> Option<&str> {
        self.inner.compression()
    }

    /// The application headers.
    ///
    /// ```no_run
    /// # fn demo(msg: &kelp::blocking::Message) {
    /// let retries = msg.headers().and_then(|h| h.get("retries"));
    /// # }
    /// ```
    pub fn headers(&self) -> Option<&FieldTable> {
        self.inner.headers()
    }

    /// All AMQP properties.
    ///
    /// ```no_run
    /// # fn demo(msg: &kelp::blocking::Message) {
    /// let priority = msg.properties().priority;
    /// # }
    /// ```
    pub fn properties(&self) -> &BasicProperties {
        self.inner.properties()
    }

    /// The `reply_to` property.
    ///
    /// ```no_run
    /// # fn demo(msg: &kelp::blocking::Message) {
    /// if let Some(queue) = msg.reply_to() { println!("answer to {queue}"); }
    /// # }
    /// ```
    pub fn reply_to(&self) -> Option<&str> {
        self.inner.reply_to()
    }

    /// The `correlation_id` property.
    ///
    /// ```no_run
    /// # fn demo(msg: &kelp::blocking::Message) {
    /// let id = msg.correlation_id().unwrap_or_default();
    /// # }
    /// ```
    pub fn correlation_id(&self) -> Option<&str> {
        self.inner.correlation_id()
    }

    /// Where and how it was delivered (Kombu's `delivery_info`).
    ///
    /// ```no_run
    /// # fn demo(msg: &kelp::blocking::Message) {
    /// let info = msg.delivery_info();
    /// println!("{} {} {}", info.exchange, info.routing_key, info.redelivered);
    /// # }
    /// ```
    pub fn delivery_info(&self) -> DeliveryInfo<'_> {
        self.inner.delivery_info()
    }

    /// The delivery tag.
    ///
    /// ```no_run
    /// # fn demo(msg: &kelp::blocking::Message) { let t = msg.delivery_tag(); }
    /// ```
    pub fn delivery_tag(&self) -> u64 {
        self.inner.delivery_tag()
    }

    /// True if it was delivered before and not acknowledged.
    ///
    /// ```no_run
    /// # fn demo(msg: &kelp::blocking::Message) { if msg.redelivered() { /* maybe a poison message */ } }
    /// ```
    pub fn redelivered(&self) -> bool {
        self.inner.redelivered()
    }

    /// What has been done with it.
    ///
    /// ```no_run
    /// # fn demo(msg: &kelp::blocking::Message) { assert_eq!(msg.state(), kelp::MessageState::Received); }
    /// ```
    pub fn state(&self) -> MessageState {
        self.inner.state()
    }

    /// True once acknowledged, rejected or requeued.
    ///
    /// ```no_run
    /// # fn demo(msg: &kelp::blocking::Message) { assert!(!msg.acknowledged()); }
    /// ```
    pub fn acknowledged(&self) -> bool {
        self.inner.acknowledged()
    }

    /// Acknowledge it. Twice is an `Error::MessageState`.
    ///
    /// ```no_run
    /// # fn demo(mut msg: kelp::blocking::Message) -> Result<(), kelp::Error> {
    /// msg.ack()?;
    /// # Ok(()) }
    /// ```
    pub fn ack(&mut self) -> Result<(), Error> {
        self.shared.run(self.inner.ack())
    }

    /// Acknowledge it, and with `multiple` every earlier message of its channel too.
    ///
    /// ```no_run
    /// # fn demo(mut msg: kelp::blocking::Message) -> Result<(), kelp::Error> {
    /// msg.ack_multiple(true)?;
    /// # Ok(()) }
    /// ```
    pub fn ack_multiple(&mut self, multiple: bool) -> Result<(), Error> {
        self.shared.run(self.inner.ack_multiple(multiple))
    }

    /// Reject it: `requeue` puts it back in its queue, otherwise it is dropped or
    /// dead-lettered.
    ///
    /// ```no_run
    /// # fn demo(mut msg: kelp::blocking::Message) -> Result<(), kelp::Error> {
    /// msg.reject(false)?;
    /// # Ok(()) }
    /// ```
    pub fn reject(&mut self, requeue: bool) -> Result<(), Error> {
        self.shared.run(self.inner.reject(requeue))
    }

    /// Put it back in its queue (reject with requeue).
    ///
    /// ```no_run
    /// # fn demo(mut msg: kelp::blocking::Message) -> Result<(), kelp::Error> {
    /// msg.requeue()?;
    /// # Ok(()) }
    /// ```
    pub fn requeue(&mut self) -> Result<(), Error> {
        self.shared.run(self.inner.requeue())
    }

    /// Negative-acknowledge it (`basic.nack`), optionally with every earlier one.
    ///
    /// ```no_run
    /// # fn demo(mut msg: kelp::blocking::Message) -> Result<(), kelp::Error> {
    /// msg.nack(false, true)?;
    /// # Ok(()) }
    /// ```
    pub fn nack(&mut self, multiple: bool, requeue: bool) -> Result<(), Error> {
        self.shared.run(self.inner.nack(multiple, requeue))
    }

    /// Acknowledge it, logging instead of returning an error (Kombu's `ack_log_error`).
    ///
    /// ```no_run
    /// # fn demo(mut msg: kelp::blocking::Message) { msg.ack_log_error(); }
    /// ```
    pub fn ack_log_error(&mut self) {
        if let Err(e) = self.ack() {
            tracing::error!(error = %e, delivery_tag = self.delivery_tag(), "could not ack message");
        }
    }

    /// Reject it, logging instead of returning an error (Kombu's `reject_log_error`).
    ///
    /// ```no_run
    /// # fn demo(mut msg: kelp::blocking::Message) { msg.reject_log_error(false); }
    /// ```
    pub fn reject_log_error(&mut self, requeue: bool) {
        if let Err(e) = self.reject(requeue) {
            tracing::error!(error = %e, delivery_tag = self.delivery_tag(), "could not reject message");
        }
    }
}
