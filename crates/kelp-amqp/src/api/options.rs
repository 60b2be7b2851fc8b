//! Flags of the requests, with the defaults AMQP gives them (all off).

use crate::codec::{FieldTable, ShortString};

/// Flags of `exchange.declare`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ExchangeDeclareOptions {
    /// Only check that it exists.
    pub passive: bool,
    /// Survive a broker restart.
    pub durable: bool,
    /// Delete when the last binding goes.
    pub auto_delete: bool,
    /// Not publishable by clients (only via exchange-to-exchange bindings).
    pub internal: bool,
    /// Don't wait for the reply.
    pub nowait: bool,
}

/// Flags of `exchange.delete`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ExchangeDeleteOptions {
    /// Only if it has no bindings.
    pub if_unused: bool,
    /// Don't wait for the reply.
    pub nowait: bool,
}

/// Flags of `queue.declare`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct QueueDeclareOptions {
    /// Only check that it exists.
    pub passive: bool,
    /// Survive a broker restart.
    pub durable: bool,
    /// Owned by this connection, deleted with it.
    pub exclusive: bool,
    /// Delete when the last consumer goes.
    pub auto_delete: bool,
    /// Don't wait for the reply.
    pub nowait: bool,
}

/// Flags of `queue.delete`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct QueueDeleteOptions {
    /// Only if it has no consumers.
    pub if_unused: bool,
    /// Only if it has no messages.
    pub if_empty: bool,
    /// Don't wait for the reply.
    pub nowait: bool,
}

/// Flags of `basic.publish`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PublishOptions {
    /// Return the message if no queue takes it.
    pub mandatory: bool,
    /// Not supported by RabbitMQ 3+ (the broker closes the connection).
    pub immediate: bool,
}

/// Flags of `basic.qos`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct QosOptions {
    /// Byte limit (RabbitMQ ignores it; keep 0).
    pub prefetch_size: u32,
    /// RabbitMQ: `true` shares the limit across the channel's consumers, `false` applies it per
    /// consumer.
    pub global: bool,
}

/// Settings of `basic.consume`.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ConsumeOptions {
    /// Consumer tag; the broker generates one when empty.
    pub consumer_tag: ShortString,
    /// Don't deliver messages this connection published (RabbitMQ ignores it).
    pub no_local: bool,
    /// Messages count as acked when sent.
    pub no_ack: bool,
    /// The only consumer of the queue.
    pub exclusive: bool,
    /// Arguments (e.g. `x-priority`, `x-stream-offset`).
    pub arguments: FieldTable,
    /// Deliveries buffered for this consumer before the connection stops reading from the
    /// socket; `None` uses the channel's prefetch count (or 1024 without one).
    pub buffer: Option<usize>,
}

/// The exchange types RabbitMQ ships, plus any plugin's by name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExchangeKind {
    /// Routing key equals binding key.
    Direct,
    /// To every bound queue.
    Fanout,
    /// Pattern match with `*` and `#`.
    Topic,
    /// Match on headers (`x-match` all/any).
    Headers,
    /// Any other type, e.g. `x-consistent-hash`.
    Custom(String),
}

impl ExchangeKind {
    /// The type name on the wire.
    pub fn as_str(&self) -> &str {
        match self {
            ExchangeKind::Direct => "direct",
            ExchangeKind::Fanout => "fanout",
            ExchangeKind::Topic => "topic",
            ExchangeKind::Headers => "headers",
            ExchangeKind::Custom(s) => s,
        }
    }
}

impl From<&str> for ExchangeKind {
    fn from(s: &str) -> Self {
        match s {
            "direct" => ExchangeKind::Direct,
            "fanout" => ExchangeKind::Fanout,
            "topic" => ExchangeKind::Topic,
            "headers" => ExchangeKind::Headers,
            other => ExchangeKind::Custom(other.to_owned()),
        }
    }
}
