//! # kelp
//!
//! Messaging for Rust services: one API (Connection, Exchange, Queue, Producer, Consumer,
//! Message) over several transports — AMQP 0-9-1, Redis, in-process memory, and an embedded
//! durable store — in the spirit of Python's Kombu and aio-pika.
//!
//! This crate is at its first step: today it exposes the AMQP protocol engine it stands on,
//! [`kelp_amqp`], as [`kelp::amqp`](amqp). The transport-neutral API arrives with the library
//! core.
//!
//! ```no_run
//! # async fn demo() -> Result<(), kelp::amqp::Error> {
//! let conn = kelp::amqp::Connection::open("amqp://guest:guest@localhost:5672//").await?;
//! let channel = conn.channel().await?;
//! # Ok(()) }
//! ```

/// The AMQP 0-9-1 client kelp is built on (the `kelp-amqp` crate).
pub use kelp_amqp as amqp;
