//! Robust connections: reconnect after a connection loss, restore the topology, channels and
//! consumers, and republish what the broker had not confirmed (aio-pika's `connect_robust`,
//! Kombu's `ensure_connection`).
//!
//! A robust [`Connection`](crate::Connection) is built with
//! [`ConnectionBuilder::robust`](crate::ConnectionBuilder::robust) or
//! [`Connection::open_robust`](crate::Connection::open_robust). It records what its channels
//! declare and consume; when the connection is lost it reconnects (with backoff, over every
//! failover URL) and restores, in order:
//!
//! 1. exchanges, exchange-to-exchange bindings, queues (a server-named queue gets a new
//!    server-generated name, and every binding and consumer follows it), queue bindings;
//! 2. each channel: its confirm or transaction mode, its QoS (per-consumer and global), and its
//!    consumers with the same tags and settings.
//!
//! Meanwhile, calls on its channels wait (up to [`RecoveryOptions::outage_timeout`]) instead of
//! failing. A publish that was sent but not yet confirmed when the connection dropped is sent
//! again on the new connection: delivery is at-least-once, so a consumer may see a message twice
//! (the second copy has `redelivered` set, or is the republished one). A message delivered before
//! the loss can no longer be acknowledged: `ack` returns [`Error::StaleDelivery`](crate::Error)
//! and the broker delivers it again with `redelivered` set.
//!
//! ```no_run
//! # async fn demo() -> Result<(), kelp::Error> {
//! use kelp::recovery::RecoveryEvent;
//! let conn = kelp::Connection::open_robust("amqp://guest:guest@localhost//").await?;
//! let mut events = conn.events();
//! tokio::spawn(async move {
//!     while let Some(event) = events.recv().await {
//!         if let RecoveryEvent::Reconnected { url, downtime, .. } = event {
//!             println!("back on {url} after {downtime:?}");
//!         }
//!     }
//! });
//! # Ok(()) }
//! ```

mod channel;
mod events;
mod policy;
mod topology;
mod transport;

pub use events::{RecoveryEvent, RecoveryEvents};
pub use policy::{FailoverStrategy, ReconnectPolicy, RecoveryOptions};

pub(crate) use transport::{connect_first, split_urls, RobustTransport, Shared};

/// Delivery tags handed out by a robust channel carry the channel's epoch (how many times it was
/// reopened) above this bit, so an ack for a delivery of an earlier epoch is recognised as stale.
pub(crate) const EPOCH_SHIFT: u32 = 40;
/// The bits of a delivery tag that are the broker's own.
pub(crate) const TAG_MASK: u64 = (1 << EPOCH_SHIFT) - 1;

/// True for errors that mean the connection (not only a channel) is gone, so the operation can
/// be tried again once it is back.
pub(crate) fn is_connection_loss(e: &crate::Error) -> bool {
    match e {
        crate::Error::Amqp(e) => !matches!(
            e,
            kelp_amqp::Error::ChannelClosed { .. }
                | kelp_amqp::Error::ChannelClosedByClient(_)
                | kelp_amqp::Error::Encode(_)
                | kelp_amqp::Error::InvalidUse(_)
                | kelp_amqp::Error::ChannelsExhausted(_)
                | kelp_amqp::Error::ConsumerCancelled { .. }
                | kelp_amqp::Error::Url(_)
        ),
        crate::Error::Closed { what } => *what == "connection",
        crate::Error::Redis { .. } => e.is_connection_error(),
        _ => false,
    }
}
