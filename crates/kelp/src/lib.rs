//! # kelp
//!
//! Messaging for Rust services: one API (Connection, Exchange, Queue, Producer, Consumer,
//! Message) over several transports — AMQP 0-9-1, Redis, in-process memory, and an embedded
//! durable store — in the spirit of Python's Kombu and aio-pika.

/// The AMQP 0-9-1 client kelp is built on (the `kelp-amqp` crate).
pub use kelp_amqp as amqp;

pub mod compression;
pub mod serialization;
pub mod transport;

pub mod blocking;
pub mod bound;
pub mod celery;
pub mod channel;
pub mod compat;
pub mod connection;
pub mod consumer;
pub mod entity;
pub mod error;
mod ids;
pub mod message;
pub mod patterns;
pub mod pool;
pub mod producer;
pub mod recovery;
pub mod retry;
pub mod simple;
pub mod worker;

pub use bound::{BoundExchange, BoundQueue};
pub use channel::Channel;
pub use connection::{
    ConnectOptions, Connection, ConnectionBuilder, AMQP_DEFAULT_URL, DEFAULT_URL,
};
pub use consumer::{Consumer, ConsumerBuilder};
pub use entity::{Binding, Declarable, DeliveryMode, Exchange, Queue, QueueType};
pub use error::Error;
pub use message::{DeliveryInfo, Message, MessageState};
pub use producer::{Body, Producer, PublishOptions};
pub use retry::RetryPolicy;
pub use simple::{SimpleBuffer, SimpleQueue};

/// The README's code blocks, compiled as doc tests so they cannot rot.
#[cfg(doctest)]
#[doc = include_str!("../../../README.md")]
pub struct ReadmeDoctests;
