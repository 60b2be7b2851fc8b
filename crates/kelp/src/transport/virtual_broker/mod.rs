//! The virtual broker core shared by the non-AMQP transports.
//!
//! A pure, synchronous (no I/O, no threads, no clock) model of an AMQP 0-9-1 broker with
//! RabbitMQ's semantics, used by `memory://` and reusable by other transports:
//!
//! - [`Router`] — exchanges (direct, topic, fanout, headers, `x-delayed-message`), bindings
//!   (to queues and exchange-to-exchange), alternate exchanges, and routing. It needs no
//!   message storage, so a transport that keeps messages elsewhere can use it alone.
//! - [`MessageQueue`] — one in-memory queue: FIFO, `x-max-priority`, `x-message-ttl` and
//!   per-message `expiration`, `x-max-length`/`x-max-length-bytes` with `x-overflow`.
//! - [`VirtualBroker`] — ties them together with sessions (channels: delivery tags, unacked
//!   messages, prefetch), consumers (priorities, `x-single-active-consumer`), dead-lettering
//!   (`x-death`), exclusive and auto-delete queues, `x-expires`.
//!
//! Consumers pull: the transport asks for each consumer's messages
//! ([`VirtualBroker::take_turn`]) when it is woken, and the core hands out only what RabbitMQ
//! would push to that consumer (its prefetch room, the single active consumer, the highest
//! consumer priority with room). The exception is a message whose TTL is 0: RabbitMQ delivers
//! it on arrival or not at all, so the core hands it (with the ready messages ahead of it) to
//! a consumer with room when it is published, and it waits for that consumer to take it.
//!
//! Time: calls that depend on time take `now_ms` (ms since the Unix epoch); expired messages
//! are removed when they reach a queue's head (lazily on delivery, or by
//! [`VirtualBroker::expire`], whose next due time [`VirtualBroker::next_expiry`] reports).
//! A transport that sleeps until that time learns from [`VirtualBroker::take_new_deadline`]
//! when an operation scheduled something sooner (a message with a TTL reaching a head, a
//! delayed message, an unused queue's `x-expires`), so that what expiry brings — a
//! dead-lettered message for a consumer waiting on another queue — is not left for some
//! unrelated call to trigger.
//!
//! ```
//! use kelp::transport::virtual_broker::{MessageData, OwnerId, QueueOptions, VirtualBroker};
//! use kelp::amqp::{BasicProperties, FieldTable};
//!
//! let mut b = VirtualBroker::new();
//! let conn = OwnerId(1);
//! b.declare_queue(conn, "tasks", QueueOptions::default(), &FieldTable::new(), 0).unwrap();
//! let out = b.publish(MessageData::new("", "tasks", BasicProperties::default(), "hi"), false, 0).unwrap();
//! assert_eq!(out.queues.len(), 1);
//! let ch = b.open_session(conn);
//! let d = b.get(ch, "tasks", false, 0).unwrap().unwrap();
//! assert_eq!(&d.message.body[..], b"hi");
//! b.ack(ch, d.delivery_tag, false).unwrap();
//! ```
//!
//! Differences from RabbitMQ, by design:
//! - `basic.recover` with `requeue = false` requeues (RabbitMQ does not implement it).
//! - Sender-selected distribution (`CC`/`BCC` headers) is not implemented.
//! - A queue's length limits are not applied to requeued messages.
//! - `x-delayed-message` holds messages in the broker until [`VirtualBroker::expire`] runs at
//!   or after their due time; they are not counted as routed for `mandatory`.

mod broker;
mod deadletter;
pub(crate) use deadletter::dead_lettered;
mod error;
mod exchange;
mod headers;
mod message;
mod queue;
mod session;
mod topic;

#[cfg(test)]
mod tests;

pub use broker::{
    ConsumeOptions, Notice, PublishOutcome, QueueDeclareOk, QueueInfo, QueueOptions, Turn,
    VirtualBroker,
};
pub use deadletter::DeathReason;
pub use error::{BrokerError, EntityKind};
pub use exchange::{
    Binding, Destination, Exchange, ExchangeKind, ExchangeOptions, RoutedQueues, Router,
};
pub use headers::HeadersMatcher;
pub use message::{Delivery, Message, MessageData, QueuedMessage};
pub use queue::{MessageQueue, Overflow, PushOutcome, QueueArgs};
pub use session::{OwnerId, SessionId};
pub use topic::{topic_matches, TopicTrie};
