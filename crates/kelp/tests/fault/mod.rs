//! Fault-injection tools for tests of kelp's auto-reconnecting AMQP connection:
//!
//! - [`proxy::FaultProxy`]: a loopback TCP proxy that drops (FIN), resets (RST), stalls,
//!   delays, slices or refuses the connections going through it;
//! - [`broker`]: RabbitMQ-side faults (`close_connection`, `stop_app`/`start_app`) and
//!   inspection (`list_queues`, `list_bindings`, …) through `rabbitmqctl`.
//!
//! A test binary uses them with `mod fault;` (self-tests: `tests/fault_tools.rs`).
#![allow(dead_code)]

pub mod broker;
pub mod proxy;

pub use proxy::FaultProxy;
