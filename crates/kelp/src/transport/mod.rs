//! Transports: one module per transport, behind one trait.
//!
//! A URL's scheme picks the transport ([`open`]): `amqp://`/`amqps://` ([`amqp`]) talks to a
//! broker through `kelp-amqp`; `memory://` ([`memory`]) is an in-process broker built on the
//! [`virtual_broker`] core that the other non-AMQP transports share.
//!
//! The traits here are what the high-level API ([`crate::Connection`], [`crate::Producer`],
//! [`crate::Consumer`], [`crate::Message`]) is written against; users rarely touch them.

pub mod virtual_broker;

pub mod amqp;
mod core;
pub mod memory;
pub mod redis;
pub mod sqlite;
pub use self::core::*;
