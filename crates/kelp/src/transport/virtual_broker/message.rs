//! Messages as the core stores and hands them out.

use std::sync::Arc;

use bytes::Bytes;
use kelp_amqp::{BasicProperties, ShortString};

use super::error::BrokerError;

/// The immutable part of a published message. Shared (behind an `Arc`) by every queue it is
/// routed to and by every delivery of it; the body is never copied.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct MessageData {
    /// The exchange it was published to (`""` for the default exchange).
    pub exchange: ShortString,
    /// The routing key it was published with.
    pub routing_key: ShortString,
    /// Its properties.
    pub properties: BasicProperties,
    /// Its body.
    pub body: Bytes,
}

impl MessageData {
    /// A message for `exchange` with `routing_key`.
    pub fn new(
        exchange: impl Into<ShortString>,
        routing_key: impl Into<ShortString>,
        properties: BasicProperties,
        body: impl Into<Bytes>,
    ) -> Self {
        MessageData {
            exchange: exchange.into(),
            routing_key: routing_key.into(),
            properties,
            body: body.into(),
        }
    }
}

/// A stored message: cheap to clone.
pub type Message = Arc<MessageData>;

/// One message in one queue: the shared message plus this queue's state for it.
#[derive(Debug, Clone)]
pub struct QueuedMessage {
    /// The message.
    pub message: Message,
    /// Delivered before and requeued.
    pub redelivered: bool,
    /// When it expires (ms since the epoch), from the queue's `x-message-ttl` and the message's
    /// `expiration`, whichever is sooner.
    pub expires_at: Option<u64>,
    /// Its priority level in this queue (0 when the queue has no `x-max-priority`).
    pub priority: u8,
    /// Its position in the queue's arrival order: a requeue puts it back where it was.
    pub(crate) seq: u64,
}

impl QueuedMessage {
    /// True when it has expired at `now_ms`.
    #[inline]
    pub fn is_expired(&self, now_ms: u64) -> bool {
        matches!(self.expires_at, Some(t) if t <= now_ms)
    }
}

/// A message handed to a session by [`get`](super::VirtualBroker::get) or a consumer.
#[derive(Debug, Clone)]
pub struct Delivery {
    /// The delivery tag: unique within the session, increasing from 1.
    pub delivery_tag: u64,
    /// True when the message was delivered before and requeued.
    pub redelivered: bool,
    /// The message (shared, not copied).
    pub message: Message,
    /// Messages left ready in the queue after this one (basic.get-ok's `message_count`).
    pub message_count: u32,
}

/// The per-message TTL in ms from the `expiration` property, validated like RabbitMQ does.
pub(crate) fn message_ttl(properties: &BasicProperties) -> Result<Option<u64>, BrokerError> {
    match &properties.expiration {
        None => Ok(None),
        Some(e) => {
            let s = e.as_str();
            let digits = !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
            match s.parse::<u64>() {
                Ok(ttl) if digits => Ok(Some(ttl)),
                _ => Err(BrokerError::InvalidExpiration {
                    value: s.to_owned(),
                }),
            }
        }
    }
}
