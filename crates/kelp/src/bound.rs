//! Exchanges and queues bound to a channel — the aio-pika way in to the same core.
//!
//! [`Channel::declare_exchange`](crate::Channel::declare_exchange) and
//! [`Channel::declare_queue`](crate::Channel::declare_queue) return a [`BoundExchange`]
//! and a [`BoundQueue`]: the entity plus the channel it was declared on, so they can
//! publish, consume, get, bind and delete by themselves, as aio-pika's `Exchange` and
//! `Queue` do. They dereference to [`Exchange`] / [`Queue`] and convert into them, so
//! they also go wherever Kombu-style code expects an entity. Everything runs through
//! the same [`Producer`] and [`Consumer`] as the Kombu-style API.
//!
//! ```
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), kelp::Error> {
//! use std::time::Duration;
//! use kelp::{Connection, Exchange, Queue};
//!
//! let conn = Connection::open("memory://bound-doc").await?;
//! let ch = conn.channel().await?;
//! let logs = ch.declare_exchange(Exchange::direct("logs")).await?;
//! let errors = ch.declare_queue(Queue::new("errors")).await?;
//! errors.bind(&logs.name, "error").await?;
//!
//! logs.publish("disk full", "error").await?;
//! // fail = true: an empty queue is Err(QueueEmpty), so this is always Some.
//! let mut msg = errors.get(false, true, Some(Duration::from_secs(1))).await?.unwrap();
//! assert_eq!(&msg.body()[..], b"disk full");
//! msg.ack().await?;
//! # Ok(()) }
//! ```

use std::collections::HashMap;
use std::future::Future;
use std::ops::Deref;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use kelp_amqp::FieldTable;
use serde::Serialize;
use tokio::sync::oneshot;

use crate::channel::Channel;
use crate::consumer::Consumer;
use crate::entity::{Exchange, Queue};
use crate::error::Error;
use crate::message::Message;
use crate::producer::{Body, Producer, PublishOptions};

/// An [`Exchange`] declared on a channel, able to publish and bind by itself
/// (aio-pika's `Exchange`).
///
/// ```no_run
/// # async fn demo(ch: &kelp::Channel) -> Result<(), kelp::Error> {
/// let ex = ch.declare_exchange(kelp::Exchange::topic("events")).await?;
/// ex.publish("hello", "user.created").await?;
/// # Ok(()) }
/// ```
#[derive(Debug, Clone)]
pub struct BoundExchange {
    exchange: Exchange,
    producer: Producer,
}

impl Deref for BoundExchange {
    type Target = Exchange;
    fn deref(&self) -> &Exchange {
        &self.exchange
    }
}

impl From<BoundExchange> for Exchange {
    fn from(b: BoundExchange) -> Exchange {
        b.exchange
    }
}

impl From<&BoundExchange> for Exchange {
    fn from(b: &BoundExchange) -> Exchange {
        b.exchange.clone()
    }
}

impl BoundExchange {
    pub(crate) fn new(exchange: Exchange, channel: &Channel) -> Self {
        let producer = Producer::new(channel)
            .exchange(exchange.clone())
            .auto_declare(false);
        BoundExchange { exchange, producer }
    }

    /// The channel it is bound to.
    ///
    /// ```no_run
    /// # fn demo(ex: &kelp::BoundExchange) { let ch = ex.channel(); }
    /// ```
    pub fn channel(&self) -> &Channel {
        self.producer.channel()
    }

    /// Publish `body` (bytes or text, as is) with `routing_key`.
    ///
    /// ```no_run
    /// # async fn demo(ex: &kelp::BoundExchange) -> Result<(), kelp::Error> {
    /// ex.publish(&b"\x01\x02"[..], "bin").await?;
    /// # Ok(()) }
    /// ```
    pub async fn publish(&self, body: impl Into<Body>, routing_key: &str) -> Result<(), Error> {
        self.producer
            .publish(body, PublishOptions::default().routing_key(routing_key))
            .await
    }

    /// Publish `body` with every property and option of [`PublishOptions`] (headers, priority,
    /// expiration, correlation_id, reply_to, mandatory, …) — aio-pika's `Message(...)` fields.
    /// The options' own routing key is replaced by `routing_key`.
    ///
    /// ```no_run
    /// # async fn demo(ex: &kelp::BoundExchange) -> Result<(), kelp::Error> {
    /// let opts = kelp::PublishOptions::default().priority(5).correlation_id("42");
    /// ex.publish_with("job", "jobs", opts).await?;
    /// # Ok(()) }
    /// ```
    pub async fn publish_with(
        &self,
        body: impl Into<Body>,
        routing_key: &str,
        options: PublishOptions,
    ) -> Result<(), Error> {
        self.producer
            .publish(body, options.routing_key(routing_key))
            .await
    }

    /// Serialize `value` (JSON unless the options name another serializer) and publish it.
    ///
    /// ```no_run
    /// # async fn demo(ex: &kelp::BoundExchange) -> Result<(), kelp::Error> {
    /// ex.publish_serde(&serde_json::json!({"id": 1}), "user.created", Default::default()).await?;
    /// # Ok(()) }
    /// ```
    pub async fn publish_serde<T: Serialize + ?Sized>(
        &self,
        value: &T,
        routing_key: &str,
        options: PublishOptions,
    ) -> Result<(), Error> {
        self.producer
            .publish_serde(value, options.routing_key(routing_key))
            .await
    }

    /// Bind this exchange to `source` (exchange-to-exchange binding): what `source` routes
    /// with `routing_key` comes through this one too.
    ///
    /// ```no_run
    /// # async fn demo(ex: &kelp::BoundExchange) -> Result<(), kelp::Error> {
    /// ex.bind("amq.topic", "audit.#").await?;
    /// # Ok(()) }
    /// ```
    pub async fn bind(&self, source: &str, routing_key: &str) -> Result<(), Error> {
        self.bind_with(source, routing_key, FieldTable::new()).await
    }

    /// [`BoundExchange::bind`] with binding arguments.
    ///
    /// ```no_run
    /// # async fn demo(ex: &kelp::BoundExchange) -> Result<(), kelp::Error> {
    /// ex.bind_with("amq.headers", "", Default::default()).await?;
    /// # Ok(()) }
    /// ```
    pub async fn bind_with(
        &self,
        source: &str,
        routing_key: &str,
        arguments: FieldTable,
    ) -> Result<(), Error> {
        self.exchange
            .bind_to(self.channel(), source, routing_key, arguments)
            .await
    }

    /// Remove a binding made with [`BoundExchange::bind`].
    ///
    /// ```no_run
    /// # async fn demo(ex: &kelp::BoundExchange) -> Result<(), kelp::Error> {
    /// ex.unbind("amq.topic", "audit.#").await?;
    /// # Ok(()) }
    /// ```
    pub async fn unbind(&self, source: &str, routing_key: &str) -> Result<(), Error> {
        self.exchange
            .unbind_from(self.channel(), source, routing_key, FieldTable::new())
            .await
    }

    /// Delete the exchange; with `if_unused`, only when nothing is bound to it.
    ///
    /// ```no_run
    /// # async fn demo(ex: kelp::BoundExchange) -> Result<(), kelp::Error> {
    /// ex.delete(false).await?;
    /// # Ok(()) }
    /// ```
    pub async fn delete(&self, if_unused: bool) -> Result<(), Error> {
        self.exchange.delete(self.channel(), if_unused).await
    }
}

/// A background consumer started by [`BoundQueue::consume`].
#[derive(Debug)]
struct Running {
    stop: oneshot::Sender<oneshot::Sender<Result<(), Error>>>,
    task: tokio::task::JoinHandle<Result<(), Error>>,
}

/// A [`Queue`] declared on a channel, able to consume, get, bind and delete by itself
/// (aio-pika's `Queue`).
///
/// ```no_run
/// # async fn demo(ch: &kelp::Channel) -> Result<(), kelp::Error> {
/// let q = ch.declare_queue(kelp::Queue::new("tasks").durable(true)).await?;
/// let tag = q.consume(|mut msg| async move {
///     println!("{:?}", msg.body());
///     msg.ack_log_error().await;
/// }).await?;
/// // … later
/// q.cancel(&tag).await?;
/// # Ok(()) }
/// ```
#[derive(Debug, Clone)]
pub struct BoundQueue {
    queue: Queue,
    channel: Channel,
    running: Arc<Mutex<HashMap<String, Running>>>,
}

impl Deref for BoundQueue {
    type Target = Queue;
    fn deref(&self) -> &Queue {
        &self.queue
    }
}

impl From<BoundQueue> for Queue {
    fn from(b: BoundQueue) -> Queue {
        b.queue
    }
}

impl From<&BoundQueue> for Queue {
    fn from(b: &BoundQueue) -> Queue {
        b.queue.clone()
    }
}

/// How [`BoundQueue::consume_with`] consumes.
///
/// ```
/// let o = kelp::bound::QueueConsumeOptions { prefetch_count: Some(5), ..Default::default() };
/// assert!(!o.no_ack);
/// ```
#[derive(Debug, Clone, Default)]
pub struct QueueConsumeOptions {
    /// Deliveries count as acknowledged when sent (default false).
    pub no_ack: bool,
    /// The prefetch limit set on the channel first (default: leave the channel's).
    pub prefetch_count: Option<u16>,
}

impl BoundQueue {
    pub(crate) fn new(queue: Queue, channel: &Channel) -> Self {
        BoundQueue {
            queue,
            channel: channel.clone(),
            running: Arc::new(Mutex::new(HashMap::new())),
        }
    }

    /// The channel it is bound to.
    ///
    /// ```no_run
    /// # fn demo(q: &kelp::BoundQueue) { let ch = q.channel(); }
    /// ```
    pub fn channel(&self) -> &Channel {
        &self.channel
    }

    /// Consume in the background, running `handler` on each message in turn (it acks).
    /// Returns the consumer tag for [`BoundQueue::cancel`]. If the broker cancels the
    /// consumer (queue deleted), the error is logged and returned by `cancel`.
    ///
    /// ```no_run
    /// # async fn demo(q: &kelp::BoundQueue) -> Result<(), kelp::Error> {
    /// let tag = q.consume(|msg| async move {
    ///     // ack on Ok, reject on Err
    ///     let _ = msg
    ///         .process(Default::default(), async |m| {
    ///             println!("{:?}", m.body());
    ///             Ok::<(), kelp::Error>(())
    ///         })
    ///         .await;
    /// }).await?;
    /// # Ok(()) }
    /// ```
    pub async fn consume<F, Fut>(&self, handler: F) -> Result<String, Error>
    where
        F: FnMut(Message) -> Fut + Send + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        self.consume_with(QueueConsumeOptions::default(), handler)
            .await
    }

    /// [`BoundQueue::consume`] with options.
    ///
    /// ```no_run
    /// # async fn demo(q: &kelp::BoundQueue) -> Result<(), kelp::Error> {
    /// let opts = kelp::bound::QueueConsumeOptions { prefetch_count: Some(10), ..Default::default() };
    /// let tag = q.consume_with(opts, |mut msg| async move { msg.ack_log_error().await }).await?;
    /// # Ok(()) }
    /// ```
    pub async fn consume_with<F, Fut>(
        &self,
        options: QueueConsumeOptions,
        mut handler: F,
    ) -> Result<String, Error>
    where
        F: FnMut(Message) -> Fut + Send + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let mut b = Consumer::builder(&self.channel)
            .queue(self.queue.clone())
            .no_ack(options.no_ack)
            .auto_declare(false);
        if let Some(n) = options.prefetch_count {
            b = b.prefetch_count(n);
        }
        let mut consumer = b.build().await?;
        let tag = consumer
            .consumer_tags()
            .await
            .into_iter()
            .next()
            .unwrap_or_default();
        let (stop, mut stop_rx) = oneshot::channel::<oneshot::Sender<Result<(), Error>>>();
        let queue = self.queue.name.clone();
        let task = tokio::spawn(async move {
            loop {
                tokio::select! {
                    biased;
                    asked = &mut stop_rx => {
                        let r = consumer.cancel().await;
                        if let Ok(reply) = asked {
                            let _ = reply.send(r.clone());
                        }
                        return r;
                    }
                    next = consumer.next() => match next {
                        Some(Ok(m)) => handler(m).await,
                        Some(Err(e)) => {
                            tracing::error!(queue = %queue, error = %e, "consumer ended by the broker");
                            return Err(e);
                        }
                        None => return Ok(()),
                    }
                }
            }
        });
        if let Ok(mut running) = self.running.lock() {
            running.insert(tag.clone(), Running { stop, task });
        }
        Ok(tag)
    }

    /// Stop the consumer `tag` started by [`BoundQueue::consume`]. Returns the error that
    /// ended it, if the broker cancelled it first.
    ///
    /// ```no_run
    /// # async fn demo(q: &kelp::BoundQueue, tag: &str) -> Result<(), kelp::Error> {
    /// q.cancel(tag).await?;
    /// # Ok(()) }
    /// ```
    pub async fn cancel(&self, tag: &str) -> Result<(), Error> {
        let running = self.running.lock().ok().and_then(|mut r| r.remove(tag));
        let Some(Running { stop, task }) = running else {
            return self.channel.raw().cancel(tag).await;
        };
        let (reply, answer) = oneshot::channel();
        if stop.send(reply).is_ok() {
            if let Ok(r) = answer.await {
                return r;
            }
        }
        // The task had already ended: report how.
        match task.await {
            Ok(r) => r,
            Err(_) => Err(Error::Closed { what: "consumer" }),
        }
    }

    /// A [`Consumer`] on this queue to iterate with `while let Some(m) = c.next().await`
    /// (aio-pika's `queue.iterator()`).
    ///
    /// ```no_run
    /// # async fn demo(q: &kelp::BoundQueue) -> Result<(), kelp::Error> {
    /// let mut it = q.iterator().await?;
    /// while let Some(msg) = it.next().await {
    ///     msg?.ack().await?;
    /// }
    /// # Ok(()) }
    /// ```
    pub async fn iterator(&self) -> Result<Consumer, Error> {
        self.iterator_with(false).await
    }

    /// [`BoundQueue::iterator`], with deliveries acknowledged when sent if `no_ack`.
    ///
    /// ```no_run
    /// # async fn demo(q: &kelp::BoundQueue) -> Result<(), kelp::Error> {
    /// let mut it = q.iterator_with(true).await?;
    /// # Ok(()) }
    /// ```
    pub async fn iterator_with(&self, no_ack: bool) -> Result<Consumer, Error> {
        Consumer::builder(&self.channel)
            .queue(self.queue.clone())
            .no_ack(no_ack)
            .auto_declare(false)
            .build()
            .await
    }

    /// Fetch one message (`basic.get`), waiting for the broker's answer up to `timeout`.
    /// An empty queue is `Ok(None)`, or [`Error::QueueEmpty`] when `fail` (aio-pika's
    /// default).
    ///
    /// ```no_run
    /// # async fn demo(q: &kelp::BoundQueue) -> Result<(), kelp::Error> {
    /// if let Some(mut m) = q.get(false, false, Some(std::time::Duration::from_secs(5))).await? {
    ///     m.ack().await?;
    /// }
    /// # Ok(()) }
    /// ```
    pub async fn get(
        &self,
        no_ack: bool,
        fail: bool,
        timeout: Option<Duration>,
    ) -> Result<Option<Message>, Error> {
        let get = self.queue.get(&self.channel, no_ack);
        let got = match timeout {
            Some(t) => tokio::time::timeout(t, get)
                .await
                .map_err(|_| Error::Timeout {
                    what: "basic.get",
                    after: t,
                })??,
            None => get.await?,
        };
        match got {
            None if fail => Err(Error::QueueEmpty {
                queue: self.queue.name.clone(),
            }),
            other => Ok(other),
        }
    }

    /// Bind to `exchange` with `routing_key`.
    ///
    /// ```no_run
    /// # async fn demo(q: &kelp::BoundQueue) -> Result<(), kelp::Error> {
    /// q.bind("amq.topic", "logs.#").await?;
    /// # Ok(()) }
    /// ```
    pub async fn bind(&self, exchange: &str, routing_key: &str) -> Result<(), Error> {
        self.bind_with(exchange, routing_key, FieldTable::new())
            .await
    }

    /// [`BoundQueue::bind`] with binding arguments (e.g. `x-match` for a headers exchange).
    ///
    /// ```no_run
    /// # async fn demo(q: &kelp::BoundQueue) -> Result<(), kelp::Error> {
    /// let mut args = kelp::amqp::FieldTable::new();
    /// args.insert("x-match", "any");
    /// q.bind_with("amq.headers", "", args).await?;
    /// # Ok(()) }
    /// ```
    pub async fn bind_with(
        &self,
        exchange: &str,
        routing_key: &str,
        arguments: FieldTable,
    ) -> Result<(), Error> {
        self.queue
            .bind_to(&self.channel, exchange, routing_key, arguments)
            .await
    }

    /// Remove a binding.
    ///
    /// ```no_run
    /// # async fn demo(q: &kelp::BoundQueue) -> Result<(), kelp::Error> {
    /// q.unbind("amq.topic", "logs.#").await?;
    /// # Ok(()) }
    /// ```
    pub async fn unbind(&self, exchange: &str, routing_key: &str) -> Result<(), Error> {
        self.queue
            .unbind_from(&self.channel, exchange, routing_key, FieldTable::new())
            .await
    }

    /// Remove every ready message; returns how many.
    ///
    /// ```no_run
    /// # async fn demo(q: &kelp::BoundQueue) -> Result<(), kelp::Error> {
    /// let n = q.purge().await?;
    /// # Ok(()) }
    /// ```
    pub async fn purge(&self) -> Result<u32, Error> {
        self.queue.purge(&self.channel).await
    }

    /// Delete the queue (only if unused / empty when asked); returns the messages deleted.
    ///
    /// ```no_run
    /// # async fn demo(q: kelp::BoundQueue) -> Result<(), kelp::Error> {
    /// q.delete(false, false).await?;
    /// # Ok(()) }
    /// ```
    pub async fn delete(&self, if_unused: bool, if_empty: bool) -> Result<u32, Error> {
        self.queue.delete(&self.channel, if_unused, if_empty).await
    }
}
