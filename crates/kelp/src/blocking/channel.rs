//! The blocking channel and producer.

use std::sync::Arc;

use serde::Serialize;

use super::{Connection, Message, Shared};
use crate::entity::{Exchange, Queue};
use crate::error::Error;
use crate::producer::{Body, PublishOptions};
use crate::transport::RawReturn;

/// A blocking channel: declares entities and carries producers and consumers. Cheap to clone.
///
/// ```
/// # fn main() -> Result<(), kelp::Error> {
/// use kelp::{Exchange, Queue};
/// let conn = kelp::blocking::Connection::open("memory://blocking-channel-doc")?;
/// let ch = conn.channel()?;
/// let logs = ch.declare_exchange(Exchange::topic("logs"))?;
/// let errors = ch.declare_queue(Queue::new("errors").exchange(logs).routing_key("*.error"))?;
/// assert_eq!(errors.name, "errors");
/// ch.close()?;
/// # Ok(()) }
/// ```
#[derive(Debug, Clone)]
pub struct Channel {
    inner: crate::Channel,
    conn: Connection,
}

impl Channel {
    pub(super) fn new(inner: crate::Channel, conn: Connection) -> Self {
        Channel { inner, conn }
    }

    pub(super) fn shared(&self) -> &Arc<Shared> {
        &self.conn.shared
    }

    /// The async channel underneath (to use with [`Connection::block_on`]).
    ///
    /// ```
    /// # fn main() -> Result<(), kelp::Error> {
    /// let conn = kelp::blocking::Connection::open("memory://channel-as-async-doc")?;
    /// let ch = conn.channel()?;
    /// let n = conn.block_on(kelp::Queue::new("q").purge(ch.as_async()));
    /// # Ok(()) }
    /// ```
    pub fn as_async(&self) -> &crate::Channel {
        &self.inner
    }

    /// The connection it belongs to.
    ///
    /// ```
    /// # fn main() -> Result<(), kelp::Error> {
    /// let conn = kelp::blocking::Connection::open("memory://channel-conn-doc")?;
    /// let ch = conn.channel()?;
    /// assert_eq!(ch.connection().url(), "memory://channel-conn-doc");
    /// # Ok(()) }
    /// ```
    pub fn connection(&self) -> &Connection {
        &self.conn
    }

    /// Declare `exchange` and return it.
    ///
    /// ```
    /// # fn main() -> Result<(), kelp::Error> {
    /// let conn = kelp::blocking::Connection::open("memory://declare-exchange-doc")?;
    /// let ex = conn.channel()?.declare_exchange(kelp::Exchange::fanout("news"))?;
    /// assert_eq!(ex.name, "news");
    /// # Ok(()) }
    /// ```
    pub fn declare_exchange(&self, exchange: Exchange) -> Result<Exchange, Error> {
        self.shared().run(exchange.declare(&self.inner))?;
        Ok(exchange)
    }

    /// Declare `queue` (with its exchange and bindings) and return it, a server-generated name
    /// filled in.
    ///
    /// ```
    /// # fn main() -> Result<(), kelp::Error> {
    /// let conn = kelp::blocking::Connection::open("memory://declare-queue-doc")?;
    /// let q = conn.channel()?.declare_queue(kelp::Queue::server_named())?;
    /// assert!(!q.name.is_empty());
    /// # Ok(()) }
    /// ```
    pub fn declare_queue(&self, mut queue: Queue) -> Result<Queue, Error> {
        self.shared().run(queue.declare(&self.inner))?;
        Ok(queue)
    }

    /// Messages ready in the queue `name` (a passive declare: an error if it does not exist).
    ///
    /// ```
    /// # fn main() -> Result<(), kelp::Error> {
    /// let conn = kelp::blocking::Connection::open("memory://queue-size-doc")?;
    /// let ch = conn.channel()?;
    /// ch.declare_queue(kelp::Queue::new("jobs"))?;
    /// assert_eq!(ch.queue_size("jobs")?, 0);
    /// # Ok(()) }
    /// ```
    pub fn queue_size(&self, name: &str) -> Result<u32, Error> {
        let mut probe = Queue::new(name).passive(true);
        Ok(self.shared().run(probe.declare(&self.inner))?.message_count)
    }

    /// Remove every ready message of `queue`; returns how many.
    ///
    /// ```
    /// # fn main() -> Result<(), kelp::Error> {
    /// let conn = kelp::blocking::Connection::open("memory://purge-doc")?;
    /// let ch = conn.channel()?;
    /// let q = ch.declare_queue(kelp::Queue::new("jobs"))?;
    /// assert_eq!(ch.purge_queue(&q)?, 0);
    /// # Ok(()) }
    /// ```
    pub fn purge_queue(&self, queue: &Queue) -> Result<u32, Error> {
        self.shared().run(queue.purge(&self.inner))
    }

    /// Delete `queue`; returns how many messages went with it.
    ///
    /// ```
    /// # fn main() -> Result<(), kelp::Error> {
    /// let conn = kelp::blocking::Connection::open("memory://delete-queue-doc")?;
    /// let ch = conn.channel()?;
    /// let q = ch.declare_queue(kelp::Queue::new("jobs"))?;
    /// ch.delete_queue(&q, false, false)?;
    /// # Ok(()) }
    /// ```
    pub fn delete_queue(
        &self,
        queue: &Queue,
        if_unused: bool,
        if_empty: bool,
    ) -> Result<u32, Error> {
        self.shared()
            .run(queue.delete(&self.inner, if_unused, if_empty))
    }

    /// Delete `exchange`.
    ///
    /// ```
    /// # fn main() -> Result<(), kelp::Error> {
    /// let conn = kelp::blocking::Connection::open("memory://delete-exchange-doc")?;
    /// let ch = conn.channel()?;
    /// let ex = ch.declare_exchange(kelp::Exchange::direct("d"))?;
    /// ch.delete_exchange(&ex, false)?;
    /// # Ok(()) }
    /// ```
    pub fn delete_exchange(&self, exchange: &Exchange, if_unused: bool) -> Result<(), Error> {
        self.shared().run(exchange.delete(&self.inner, if_unused))
    }

    /// Fetch one message from `queue` (`basic.get`), or `None` when it is empty.
    ///
    /// ```
    /// # fn main() -> Result<(), kelp::Error> {
    /// let conn = kelp::blocking::Connection::open("memory://get-doc")?;
    /// let ch = conn.channel()?;
    /// let q = ch.declare_queue(kelp::Queue::new("jobs"))?;
    /// assert!(ch.get(&q, false)?.is_none());
    /// # Ok(()) }
    /// ```
    pub fn get(&self, queue: &Queue, no_ack: bool) -> Result<Option<Message>, Error> {
        let got = self.shared().run(queue.get(&self.inner, no_ack))?;
        Ok(got.map(|m| Message::new(m, self.shared().clone())))
    }

    /// Set the prefetch limit (`basic.qos`); `global` applies it to the whole channel.
    ///
    /// ```
    /// # fn main() -> Result<(), kelp::Error> {
    /// let conn = kelp::blocking::Connection::open("memory://qos-doc")?;
    /// conn.channel()?.qos(10, false)?;
    /// # Ok(()) }
    /// ```
    pub fn qos(&self, prefetch_count: u16, global: bool) -> Result<(), Error> {
        self.shared().run(self.inner.qos(prefetch_count, global))
    }

    /// Turn on publisher confirms: each publish then waits for the broker's ack.
    ///
    /// ```
    /// # fn main() -> Result<(), kelp::Error> {
    /// let conn = kelp::blocking::Connection::open("memory://confirm-doc")?;
    /// conn.channel()?.confirm_select()?;
    /// # Ok(()) }
    /// ```
    pub fn confirm_select(&self) -> Result<(), Error> {
        self.shared().run(self.inner.confirm_select())
    }

    /// Redeliver this channel's unacknowledged messages.
    ///
    /// ```no_run
    /// # fn demo(ch: &kelp::blocking::Channel) -> Result<(), kelp::Error> {
    /// ch.recover(true)?;
    /// # Ok(()) }
    /// ```
    pub fn recover(&self, requeue: bool) -> Result<(), Error> {
        self.shared().run(self.inner.recover(requeue))
    }

    /// Ask the broker to pause (`false`) or resume (`true`) deliveries.
    ///
    /// ```no_run
    /// # fn demo(ch: &kelp::blocking::Channel) -> Result<(), kelp::Error> {
    /// ch.flow(false)?;
    /// # Ok(()) }
    /// ```
    pub fn flow(&self, active: bool) -> Result<(), Error> {
        self.shared().run(self.inner.flow(active))
    }

    /// Close the channel. Unacknowledged messages go back to their queues.
    ///
    /// ```
    /// # fn main() -> Result<(), kelp::Error> {
    /// let conn = kelp::blocking::Connection::open("memory://channel-close-doc")?;
    /// let ch = conn.channel()?;
    /// ch.close()?;
    /// assert!(ch.is_closed());
    /// # Ok(()) }
    /// ```
    pub fn close(&self) -> Result<(), Error> {
        self.shared().run(self.inner.close())
    }

    /// True once the channel is closed.
    ///
    /// ```
    /// # fn main() -> Result<(), kelp::Error> {
    /// let conn = kelp::blocking::Connection::open("memory://channel-is-closed-doc")?;
    /// assert!(!conn.channel()?.is_closed());
    /// # Ok(()) }
    /// ```
    pub fn is_closed(&self) -> bool {
        self.inner.is_closed()
    }
}

/// Publishes messages, blocking until each is sent (and confirmed, on a channel in confirm
/// mode) — Kombu's `Producer`.
///
/// ```
/// # fn main() -> Result<(), kelp::Error> {
/// use kelp::blocking::{Connection, Producer};
/// use kelp::{Exchange, PublishOptions, Queue};
///
/// let conn = Connection::open("memory://blocking-producer-doc")?;
/// let ch = conn.channel()?;
/// let events = Exchange::topic("events");
/// ch.declare_queue(Queue::new("audit").exchange(events.clone()).routing_key("user.*"))?;
/// let producer = Producer::new(&ch).exchange(events).serializer("json");
/// producer.publish_serde(&serde_json::json!({"id": 1}), PublishOptions::default().routing_key("user.created"))?;
/// assert_eq!(ch.queue_size("audit")?, 1);
/// # Ok(()) }
/// ```
#[derive(Debug, Clone)]
pub struct Producer {
    inner: crate::Producer,
    channel: Channel,
}

impl Producer {
    /// A producer on `channel` publishing to the default exchange with the `json` serializer.
    ///
    /// ```
    /// # fn main() -> Result<(), kelp::Error> {
    /// let conn = kelp::blocking::Connection::open("memory://producer-new-doc")?;
    /// let p = kelp::blocking::Producer::new(&conn.channel()?);
    /// # Ok(()) }
    /// ```
    pub fn new(channel: &Channel) -> Self {
        Producer {
            inner: crate::Producer::new(&channel.inner),
            channel: channel.clone(),
        }
    }

    fn map(self, f: impl FnOnce(crate::Producer) -> crate::Producer) -> Self {
        Producer {
            inner: f(self.inner),
            channel: self.channel,
        }
    }

    /// The exchange to publish to (declared once per connection before the first publish
    /// unless `auto_declare(false)`).
    ///
    /// ```
    /// # fn main() -> Result<(), kelp::Error> {
    /// # let conn = kelp::blocking::Connection::open("memory://producer-exchange-doc")?;
    /// let p = conn.producer()?.exchange(kelp::Exchange::fanout("f"));
    /// # Ok(()) }
    /// ```
    pub fn exchange(self, exchange: impl Into<Exchange>) -> Self {
        self.map(|p| p.exchange(exchange))
    }

    /// The default routing key.
    ///
    /// ```
    /// # fn main() -> Result<(), kelp::Error> {
    /// # let conn = kelp::blocking::Connection::open("memory://producer-rk-doc")?;
    /// let p = conn.producer()?.routing_key("tasks");
    /// # Ok(()) }
    /// ```
    pub fn routing_key(self, key: impl Into<String>) -> Self {
        self.map(|p| p.routing_key(key))
    }

    /// The default serializer for [`Producer::publish_serde`].
    ///
    /// ```
    /// # fn main() -> Result<(), kelp::Error> {
    /// # let conn = kelp::blocking::Connection::open("memory://producer-ser-doc")?;
    /// let p = conn.producer()?.serializer("msgpack");
    /// # Ok(()) }
    /// ```
    pub fn serializer(self, name: impl Into<String>) -> Self {
        self.map(|p| p.serializer(name))
    }

    /// The default compression method.
    ///
    /// ```
    /// # fn main() -> Result<(), kelp::Error> {
    /// # let conn = kelp::blocking::Connection::open("memory://producer-comp-doc")?;
    /// let p = conn.producer()?.compression("zstd");
    /// # Ok(()) }
    /// ```
    pub fn compression(self, method: impl Into<String>) -> Self {
        self.map(|p| p.compression(method))
    }

    /// Declare the exchange before the first publish (default true).
    ///
    /// ```
    /// # fn main() -> Result<(), kelp::Error> {
    /// # let conn = kelp::blocking::Connection::open("memory://producer-ad-doc")?;
    /// let p = conn.producer()?.auto_declare(false);
    /// # Ok(()) }
    /// ```
    pub fn auto_declare(self, on: bool) -> Self {
        self.map(|p| p.auto_declare(on))
    }

    /// Call `callback` (on the background runtime's thread) with every mandatory message the
    /// broker returns on this channel.
    ///
    /// ```
    /// # fn main() -> Result<(), kelp::Error> {
    /// # let conn = kelp::blocking::Connection::open("memory://producer-return-doc")?;
    /// let p = conn.producer()?.on_return(|r| eprintln!("returned: {} {}", r.reply_code, r.routing_key));
    /// # Ok(()) }
    /// ```
    pub fn on_return(self, callback: impl Fn(RawReturn) + Send + Sync + 'static) -> Self {
        let shared = self.channel.shared().clone();
        let _in_rt = shared.enter();
        self.map(|p| p.on_return(callback))
    }

    /// The channel it publishes on.
    ///
    /// ```
    /// # fn main() -> Result<(), kelp::Error> {
    /// # let conn = kelp::blocking::Connection::open("memory://producer-channel-doc")?;
    /// let p = conn.producer()?;
    /// assert!(!p.channel().is_closed());
    /// # Ok(()) }
    /// ```
    pub fn channel(&self) -> &Channel {
        &self.channel
    }

    /// The async producer underneath.
    ///
    /// ```
    /// # fn main() -> Result<(), kelp::Error> {
    /// # let conn = kelp::blocking::Connection::open("memory://producer-as-async-doc")?;
    /// let p = conn.producer()?;
    /// let async_producer: &kelp::Producer = p.as_async();
    /// # Ok(()) }
    /// ```
    pub fn as_async(&self) -> &crate::Producer {
        &self.inner
    }

    /// Move to another channel (Kombu's `revive`).
    ///
    /// ```
    /// # fn main() -> Result<(), kelp::Error> {
    /// # let conn = kelp::blocking::Connection::open("memory://producer-revive-doc")?;
    /// let mut p = conn.producer()?;
    /// p.revive(&conn.channel()?);
    /// # Ok(()) }
    /// ```
    pub fn revive(&mut self, channel: &Channel) {
        self.inner.revive(&channel.inner);
        self.channel = channel.clone();
    }

    /// Publish raw bytes or text as they are.
    ///
    /// ```
    /// # fn main() -> Result<(), kelp::Error> {
    /// # let conn = kelp::blocking::Connection::open("memory://producer-publish-doc")?;
    /// let p = conn.producer()?;
    /// p.publish(&b"\x00\x01"[..], kelp::PublishOptions::default().routing_key("bin"))?;
    /// p.publish("hello", kelp::PublishOptions::default().routing_key("text"))?;
    /// # Ok(()) }
    /// ```
    pub fn publish(&self, body: impl Into<Body>, options: PublishOptions) -> Result<(), Error> {
        self.channel.shared().run(self.inner.publish(body, options))
    }

    /// Serialize `value` with the serializer (the option's, else the producer's) and publish
    /// it.
    ///
    /// ```
    /// # fn main() -> Result<(), kelp::Error> {
    /// # let conn = kelp::blocking::Connection::open("memory://producer-serde-doc")?;
    /// #[derive(serde::Serialize)]
    /// struct Job { id: u32 }
    /// conn.producer()?.publish_serde(&Job { id: 7 }, kelp::PublishOptions::default().routing_key("jobs"))?;
    /// # Ok(()) }
    /// ```
    pub fn publish_serde<T: Serialize + ?Sized>(
        &self,
        value: &T,
        options: PublishOptions,
    ) -> Result<(), Error> {
        self.channel
            .shared()
            .run(self.inner.publish_serde(value, options))
    }

    /// Let go of the producer (Kombu's `release`); the channel stays open.
    ///
    /// ```
    /// # fn main() -> Result<(), kelp::Error> {
    /// # let conn = kelp::blocking::Connection::open("memory://producer-release-doc")?;
    /// conn.producer()?.release();
    /// # Ok(()) }
    /// ```
    pub fn release(self) {}
}
