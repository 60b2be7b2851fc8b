//! Queue-like helpers over a connection — Kombu's `kombu.simple`.
//!
//! [`SimpleQueue`] is a durable, persistent work queue with a Python `Queue`-like
//! interface: [`put`](SimpleQueue::put), [`get`](SimpleQueue::get) (blocking with
//! a timeout), [`get_nowait`](SimpleQueue::get_nowait), [`qsize`](SimpleQueue::qsize),
//! [`clear`](SimpleQueue::clear) and [`close`](SimpleQueue::close). Messages from
//! `get` must be acked. [`SimpleBuffer`] is the same over a transient, auto-deleted
//! queue whose messages are acknowledged on delivery.
//!
//! As in Kombu, the queue is bound to a direct exchange of the same name with the
//! queue's name as routing key.
//!
//! ```
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), kelp::Error> {
//! use std::time::Duration;
//! use kelp::{Connection, SimpleQueue};
//!
//! let conn = Connection::open("memory://simple-doc").await?;
//! let mut q = SimpleQueue::new(&conn, "jobs").await?;
//! q.put(&serde_json::json!({"n": 1})).await?;
//! assert_eq!(q.qsize().await?, 1);
//! let mut msg = q.get(Some(Duration::from_secs(1))).await?;
//! assert_eq!(msg.decode::<serde_json::Value>()?["n"], 1);
//! msg.ack().await?;
//! assert!(matches!(q.get_nowait().await, Err(kelp::Error::QueueEmpty { .. })));
//! q.close().await?;
//! # Ok(()) }
//! ```

use std::time::Duration;

use serde::Serialize;

use crate::channel::Channel;
use crate::connection::Connection;
use crate::consumer::Consumer;
use crate::entity::{DeliveryMode, Exchange, Queue};
use crate::error::Error;
use crate::message::Message;
use crate::producer::{Producer, PublishOptions};

/// A durable work queue with a `put`/`get` interface (Kombu's `SimpleQueue`).
///
/// ```no_run
/// # async fn demo(conn: &kelp::Connection) -> Result<(), kelp::Error> {
/// let mut q = kelp::SimpleQueue::new(conn, "jobs").await?;
/// q.put(&"job 1").await?;
/// let mut msg = q.get(Some(std::time::Duration::from_secs(1))).await?;
/// msg.ack().await?;
/// # Ok(()) }
/// ```
#[derive(Debug)]
pub struct SimpleQueue {
    channel: Channel,
    queue: Queue,
    producer: Producer,
    consumer: Option<Consumer>,
    no_ack: bool,
    accept: Option<Vec<String>>,
}

/// A transient, auto-deleted queue whose messages need no ack (Kombu's `SimpleBuffer`).
///
/// ```
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), kelp::Error> {
/// let conn = kelp::Connection::open("memory://buffer-doc").await?;
/// let mut buf = kelp::SimpleBuffer::new(&conn, "recent").await?;
/// buf.put(&"hello").await?;
/// let msg = buf.get(Some(std::time::Duration::from_secs(1))).await?;
/// assert_eq!(msg.decode::<String>()?, "hello");
/// # Ok(()) }
/// ```
#[derive(Debug)]
pub struct SimpleBuffer {
    inner: SimpleQueue,
}

/// Options for [`SimpleQueue::with_options`]; defaults are Kombu's.
///
/// ```
/// let o = kelp::simple::SimpleOptions::default();
/// assert_eq!(o.serializer, "json");
/// ```
#[derive(Debug, Clone)]
pub struct SimpleOptions {
    /// Serializer for [`SimpleQueue::put`] (default `json`).
    pub serializer: String,
    /// Compression for [`SimpleQueue::put`] (default none).
    pub compression: Option<String>,
    /// Content types or serializer names `get` accepts (default: everything kelp decodes safely).
    pub accept: Option<Vec<String>>,
    /// The queue (default: durable, bound to a durable direct exchange of the same name).
    pub queue: Option<Queue>,
}

impl Default for SimpleOptions {
    fn default() -> Self {
        SimpleOptions {
            serializer: "json".into(),
            compression: None,
            accept: None,
            queue: None,
        }
    }
}

impl SimpleQueue {
    /// Open (declaring) the durable queue `name` on a new channel of `conn`.
    ///
    /// ```no_run
    /// # async fn demo(conn: &kelp::Connection) -> Result<(), kelp::Error> {
    /// let q = kelp::SimpleQueue::new(conn, "jobs").await?;
    /// # Ok(()) }
    /// ```
    pub async fn new(conn: &Connection, name: &str) -> Result<Self, Error> {
        Self::with_options(conn, name, SimpleOptions::default()).await
    }

    /// Open with non-default options.
    ///
    /// ```no_run
    /// # async fn demo(conn: &kelp::Connection) -> Result<(), kelp::Error> {
    /// let opts = kelp::simple::SimpleOptions { serializer: "msgpack".into(), ..Default::default() };
    /// let q = kelp::SimpleQueue::with_options(conn, "jobs", opts).await?;
    /// # Ok(()) }
    /// ```
    pub async fn with_options(
        conn: &Connection,
        name: &str,
        options: SimpleOptions,
    ) -> Result<Self, Error> {
        let queue = options.queue.unwrap_or_else(|| {
            Queue::new(name)
                .exchange(Exchange::direct(name))
                .routing_key(name)
        });
        Self::open(
            conn,
            queue,
            false,
            None,
            options.serializer,
            options.compression,
            options.accept,
        )
        .await
    }

    async fn open(
        conn: &Connection,
        mut queue: Queue,
        no_ack: bool,
        delivery_mode: Option<DeliveryMode>,
        serializer: String,
        compression: Option<String>,
        accept: Option<Vec<String>>,
    ) -> Result<Self, Error> {
        let channel = conn.channel().await?;
        queue.declare(&channel).await?;
        let exchange = queue
            .exchange
            .clone()
            .unwrap_or_else(Exchange::default_exchange);
        let exchange = match delivery_mode {
            Some(m) => exchange.delivery_mode(m),
            None => exchange,
        };
        let mut producer = Producer::new(&channel)
            .exchange(exchange)
            .routing_key(if queue.routing_key.is_empty() {
                queue.name.clone()
            } else {
                queue.routing_key.clone()
            })
            .serializer(serializer)
            .auto_declare(false);
        if let Some(c) = compression {
            producer = producer.compression(c);
        }
        Ok(SimpleQueue {
            channel,
            queue,
            producer,
            consumer: None,
            no_ack,
            accept,
        })
    }

    /// The queue it reads.
    ///
    /// ```no_run
    /// # fn demo(q: &kelp::SimpleQueue) { assert_eq!(q.queue().name, "jobs"); }
    /// ```
    pub fn queue(&self) -> &Queue {
        &self.queue
    }

    /// Serialize and publish `value`.
    ///
    /// ```no_run
    /// # async fn demo(q: &kelp::SimpleQueue) -> Result<(), kelp::Error> {
    /// q.put(&serde_json::json!({"job": 1})).await?;
    /// # Ok(()) }
    /// ```
    pub async fn put<T: Serialize + ?Sized>(&self, value: &T) -> Result<(), Error> {
        self.producer
            .publish_serde(value, PublishOptions::default())
            .await
    }

    /// Publish with explicit options (headers, priority, serializer, …).
    ///
    /// ```no_run
    /// # async fn demo(q: &kelp::SimpleQueue) -> Result<(), kelp::Error> {
    /// q.put_with(&"urgent", kelp::PublishOptions::default().priority(9)).await?;
    /// # Ok(()) }
    /// ```
    pub async fn put_with<T: Serialize + ?Sized>(
        &self,
        value: &T,
        options: PublishOptions,
    ) -> Result<(), Error> {
        self.producer.publish_serde(value, options).await
    }

    async fn consumer(&mut self) -> Result<&mut Consumer, Error> {
        if self.consumer.is_none() {
            let mut b = Consumer::builder(&self.channel)
                .queue(self.queue.clone())
                .no_ack(self.no_ack)
                .auto_declare(false);
            if let Some(a) = &self.accept {
                b = b.accept(a);
            }
            self.consumer = Some(b.build().await?);
        }
        self.consumer
            .as_mut()
            .ok_or(Error::Closed { what: "consumer" })
    }

    /// The next message, waiting up to `timeout` (`None`: as long as it takes). Nothing in
    /// time is [`Error::QueueEmpty`], like Kombu's `Empty`.
    ///
    /// ```no_run
    /// # async fn demo(q: &mut kelp::SimpleQueue) -> Result<(), kelp::Error> {
    /// let mut msg = q.get(Some(std::time::Duration::from_secs(5))).await?;
    /// msg.ack().await?;
    /// # Ok(()) }
    /// ```
    pub async fn get(&mut self, timeout: Option<Duration>) -> Result<Message, Error> {
        let name = self.queue.name.clone();
        let consumer = self.consumer().await?;
        let next = match timeout {
            Some(t) => consumer.next_timeout(t).await,
            None => consumer.next().await.transpose(),
        };
        match next {
            Ok(Some(m)) => Ok(m),
            Ok(None) | Err(Error::Timeout { .. }) => Err(Error::QueueEmpty { queue: name }),
            Err(e) => Err(e),
        }
    }

    /// A message if one is ready now, else [`Error::QueueEmpty`].
    ///
    /// ```no_run
    /// # async fn demo(q: &mut kelp::SimpleQueue) -> Result<(), kelp::Error> {
    /// match q.get_nowait().await {
    ///     Ok(mut m) => m.ack().await?,
    ///     Err(kelp::Error::QueueEmpty { .. }) => println!("nothing yet"),
    ///     Err(e) => return Err(e),
    /// }
    /// # Ok(()) }
    /// ```
    pub async fn get_nowait(&mut self) -> Result<Message, Error> {
        // Messages the consumer already holds come first.
        if let Some(c) = self.consumer.as_mut() {
            match c.next_timeout(Duration::ZERO).await {
                Ok(Some(m)) => return Ok(m),
                Ok(None) | Err(Error::Timeout { .. }) => {}
                Err(e) => return Err(e),
            }
        }
        let got = self.queue.get(&self.channel, self.no_ack).await?;
        let mut m = got.ok_or_else(|| Error::QueueEmpty {
            queue: self.queue.name.clone(),
        })?;
        if let Some(a) = &self.accept {
            let accept = crate::serialization::Accept::new(a)?;
            if let Err(e) = accept.check(m.content_type()) {
                m.reject_log_error(false).await;
                return Err(e.into());
            }
        }
        Ok(m)
    }

    /// Messages ready in the queue (not counting those delivered and unacked).
    ///
    /// ```no_run
    /// # async fn demo(q: &kelp::SimpleQueue) -> Result<(), kelp::Error> {
    /// println!("{} waiting", q.qsize().await?);
    /// # Ok(()) }
    /// ```
    pub async fn qsize(&self) -> Result<u32, Error> {
        let mut probe = Queue::new(self.queue.name.clone()).passive(true);
        Ok(probe.declare(&self.channel).await?.message_count)
    }

    /// Remove every ready message; returns how many.
    ///
    /// ```no_run
    /// # async fn demo(q: &kelp::SimpleQueue) -> Result<(), kelp::Error> {
    /// let dropped = q.clear().await?;
    /// # Ok(()) }
    /// ```
    pub async fn clear(&self) -> Result<u32, Error> {
        self.queue.purge(&self.channel).await
    }

    /// Stop consuming and close the channel. Unacked messages go back to the queue.
    ///
    /// ```no_run
    /// # async fn demo(q: kelp::SimpleQueue) -> Result<(), kelp::Error> {
    /// q.close().await?;
    /// # Ok(()) }
    /// ```
    pub async fn close(mut self) -> Result<(), Error> {
        if let Some(mut c) = self.consumer.take() {
            c.cancel().await?;
        }
        self.channel.close().await
    }
}

impl SimpleBuffer {
    /// Open (declaring) the transient, auto-deleted buffer `name` on a new channel of `conn`.
    ///
    /// ```no_run
    /// # async fn demo(conn: &kelp::Connection) -> Result<(), kelp::Error> {
    /// let b = kelp::SimpleBuffer::new(conn, "events").await?;
    /// # Ok(()) }
    /// ```
    pub async fn new(conn: &Connection, name: &str) -> Result<Self, Error> {
        let queue = Queue::new(name)
            .exchange(Exchange::direct(name).durable(false).auto_delete(true))
            .routing_key(name)
            .durable(false)
            .auto_delete(true);
        let inner = SimpleQueue::open(
            conn,
            queue,
            true,
            Some(DeliveryMode::Transient),
            "json".into(),
            None,
            None,
        )
        .await?;
        Ok(SimpleBuffer { inner })
    }

    /// Serialize and publish `value` (transient).
    ///
    /// ```no_run
    /// # async fn demo(b: &kelp::SimpleBuffer) -> Result<(), kelp::Error> {
    /// b.put(&42).await?;
    /// # Ok(()) }
    /// ```
    pub async fn put<T: Serialize + ?Sized>(&self, value: &T) -> Result<(), Error> {
        self.inner.put(value).await
    }

    /// The next message, waiting up to `timeout`; already acknowledged.
    ///
    /// ```no_run
    /// # async fn demo(b: &mut kelp::SimpleBuffer) -> Result<(), kelp::Error> {
    /// let msg = b.get(Some(std::time::Duration::from_millis(100))).await?;
    /// # Ok(()) }
    /// ```
    pub async fn get(&mut self, timeout: Option<Duration>) -> Result<Message, Error> {
        self.inner.get(timeout).await
    }

    /// A message if one is ready now, else [`Error::QueueEmpty`].
    ///
    /// ```no_run
    /// # async fn demo(b: &mut kelp::SimpleBuffer) -> Result<(), kelp::Error> {
    /// let msg = b.get_nowait().await;
    /// # Ok(()) }
    /// ```
    pub async fn get_nowait(&mut self) -> Result<Message, Error> {
        self.inner.get_nowait().await
    }

    /// Messages ready in the buffer.
    ///
    /// ```no_run
    /// # async fn demo(b: &kelp::SimpleBuffer) -> Result<(), kelp::Error> {
    /// let n = b.qsize().await?;
    /// # Ok(()) }
    /// ```
    pub async fn qsize(&self) -> Result<u32, Error> {
        self.inner.qsize().await
    }

    /// Remove every ready message; returns how many.
    ///
    /// ```no_run
    /// # async fn demo(b: &kelp::SimpleBuffer) -> Result<(), kelp::Error> {
    /// b.clear().await?;
    /// # Ok(()) }
    /// ```
    pub async fn clear(&self) -> Result<u32, Error> {
        self.inner.clear().await
    }

    /// Close the channel (the buffer's queue is auto-deleted by the broker).
    ///
    /// ```no_run
    /// # async fn demo(b: kelp::SimpleBuffer) -> Result<(), kelp::Error> {
    /// b.close().await?;
    /// # Ok(()) }
    /// ```
    pub async fn close(self) -> Result<(), Error> {
        self.inner.close().await
    }
}
