//! A channel on a [`Connection`]: declares entities and carries producers
//! and consumers.

use std::sync::Arc;

use crate::bound::{BoundExchange, BoundQueue};
use crate::connection::Connection;
use crate::entity::{Exchange, Queue};
use crate::error::Error;
use crate::message::Codec;
use crate::transport::TransportChannel;

/// A channel: the unit that declares, publishes and consumes. Cheap to clone.
///
/// ```no_run
/// # async fn demo() -> Result<(), kelp::Error> {
/// let conn = kelp::Connection::open("memory://").await?;
/// let ch = conn.channel().await?;
/// let ex = ch.declare_exchange(kelp::Exchange::topic("logs")).await?;
/// let q = ch.declare_queue(kelp::Queue::new("errors").exchange(ex).routing_key("*.error")).await?;
/// # Ok(()) }
/// ```
#[derive(Debug, Clone)]
pub struct Channel {
    raw: Arc<dyn TransportChannel>,
    conn: Connection,
}

impl Channel {
    pub(crate) fn new(raw: Arc<dyn TransportChannel>, conn: Connection) -> Self {
        Channel { raw, conn }
    }

    /// The transport-level channel (for advanced use).
    ///
    /// ```no_run
    /// # fn demo(ch: &kelp::Channel) { assert!(!ch.raw().is_closed()); }
    /// ```
    pub fn raw(&self) -> &Arc<dyn TransportChannel> {
        &self.raw
    }

    pub(crate) fn clone_raw(&self) -> Arc<dyn TransportChannel> {
        self.raw.clone()
    }

    pub(crate) fn codec(&self) -> std::sync::Arc<Codec> {
        self.conn.codec()
    }

    /// The connection this channel belongs to.
    ///
    /// ```no_run
    /// # fn demo(ch: &kelp::Channel) { println!("{}", ch.connection().url()); }
    /// ```
    pub fn connection(&self) -> &Connection {
        &self.conn
    }

    /// Declare `exchange` and return it (aio-pika's `declare_exchange`).
    ///
    /// ```no_run
    /// # async fn demo(ch: &kelp::Channel) -> Result<(), kelp::Error> {
    /// let ex = ch.declare_exchange(kelp::Exchange::fanout("news")).await?;
    /// # Ok(()) }
    /// ```
    pub async fn declare_exchange(&self, exchange: Exchange) -> Result<BoundExchange, Error> {
        exchange.declare(self).await?;
        Ok(BoundExchange::new(exchange, self))
    }

    /// Check that an exchange exists (passive declare) and return a handle to it
    /// (aio-pika's `get_exchange(ensure=True)`); with `ensure = false` no broker round trip.
    ///
    /// ```no_run
    /// # async fn demo(ch: &kelp::Channel) -> Result<(), kelp::Error> {
    /// let ex = ch.get_exchange("amq.topic", true).await?;
    /// # Ok(()) }
    /// ```
    pub async fn get_exchange(&self, name: &str, ensure: bool) -> Result<BoundExchange, Error> {
        let ex = Exchange::new(name).passive(true);
        if ensure {
            ex.declare(self).await?;
        }
        Ok(BoundExchange::new(ex, self))
    }

    /// The default exchange (routes to the queue named by the routing key).
    ///
    /// ```
    /// # fn demo(ch: &kelp::Channel) {
    /// assert!(ch.default_exchange().is_default());
    /// # }
    /// ```
    pub fn default_exchange(&self) -> BoundExchange {
        BoundExchange::new(Exchange::default_exchange(), self)
    }

    /// Declare `queue` (with its exchange and bindings) and return it, name filled in.
    ///
    /// ```no_run
    /// # async fn demo(ch: &kelp::Channel) -> Result<(), kelp::Error> {
    /// let q = ch.declare_queue(kelp::Queue::server_named()).await?;
    /// assert!(!q.name.is_empty());
    /// # Ok(()) }
    /// ```
    pub async fn declare_queue(&self, mut queue: Queue) -> Result<BoundQueue, Error> {
        queue.declare(self).await?;
        Ok(BoundQueue::new(queue, self))
    }

    /// Check that a queue exists (passive declare) and return a handle to it.
    ///
    /// ```no_run
    /// # async fn demo(ch: &kelp::Channel) -> Result<(), kelp::Error> {
    /// let q = ch.get_queue("tasks", true).await?;
    /// # Ok(()) }
    /// ```
    pub async fn get_queue(&self, name: &str, ensure: bool) -> Result<BoundQueue, Error> {
        let mut q = Queue::new(name).passive(true);
        if ensure {
            q.declare(self).await?;
        }
        Ok(BoundQueue::new(q, self))
    }

    /// Set the prefetch limit (`basic.qos`); `global` applies it to the whole channel.
    ///
    /// ```no_run
    /// # async fn demo(ch: &kelp::Channel) -> Result<(), kelp::Error> {
    /// ch.qos(10, false).await?;
    /// # Ok(()) }
    /// ```
    pub async fn qos(&self, prefetch_count: u16, global: bool) -> Result<(), Error> {
        self.raw.qos(prefetch_count, global).await
    }

    /// Turn on publisher confirms: publishes then wait for the broker's ack.
    ///
    /// ```no_run
    /// # async fn demo(ch: &kelp::Channel) -> Result<(), kelp::Error> {
    /// ch.confirm_select().await?;
    /// # Ok(()) }
    /// ```
    pub async fn confirm_select(&self) -> Result<(), Error> {
        self.raw.confirm_select().await
    }

    /// Redeliver this channel's unacknowledged messages.
    ///
    /// ```no_run
    /// # async fn demo(ch: &kelp::Channel) -> Result<(), kelp::Error> {
    /// ch.recover(true).await?;
    /// # Ok(()) }
    /// ```
    pub async fn recover(&self, requeue: bool) -> Result<(), Error> {
        self.raw.recover(requeue).await
    }

    /// Ask the broker to pause (`false`) or resume (`true`) deliveries.
    ///
    /// ```no_run
    /// # async fn demo(ch: &kelp::Channel) -> Result<(), kelp::Error> {
    /// ch.flow(false).await?;
    /// # Ok(()) }
    /// ```
    pub async fn flow(&self, active: bool) -> Result<(), Error> {
        self.raw.flow(active).await
    }

    /// Close the channel. Unacknowledged messages go back to their queues.
    ///
    /// ```no_run
    /// # async fn demo(ch: &kelp::Channel) -> Result<(), kelp::Error> {
    /// ch.close().await?;
    /// # Ok(()) }
    /// ```
    pub async fn close(&self) -> Result<(), Error> {
        self.raw.close().await
    }

    /// True once the channel is closed.
    ///
    /// ```no_run
    /// # async fn demo(ch: &kelp::Channel) -> Result<(), kelp::Error> {
    /// assert!(!ch.is_closed());
    /// # Ok(()) }
    /// ```
    pub fn is_closed(&self) -> bool {
        self.raw.is_closed()
    }
}
