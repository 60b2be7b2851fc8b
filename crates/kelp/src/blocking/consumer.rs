//! The blocking consumer.

use std::fmt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use super::{check_not_async, Channel, Message};
use crate::entity::Queue;
use crate::error::Error;
use crate::serialization::Value;

type Callback = Box<dyn FnMut(&Value, &mut Message) + Send>;
type OnMessage = Box<dyn FnMut(&mut Message) + Send>;

/// The callbacks of one consumer.
#[derive(Default)]
struct Handlers {
    callbacks: Vec<Callback>,
    on_message: Option<OnMessage>,
}

/// A consumer's state, shared with its connection for [`super::Connection::drain_events`].
pub(crate) struct ConsumerShared {
    consumer: tokio::sync::Mutex<crate::Consumer>,
    handlers: Mutex<Handlers>,
    has_handlers: AtomicBool,
}

impl fmt::Debug for ConsumerShared {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ConsumerShared")
            .field("has_handlers", &self.has_handlers())
            .finish_non_exhaustive()
    }
}

impl ConsumerShared {
    pub(super) fn has_handlers(&self) -> bool {
        self.has_handlers.load(Ordering::Acquire)
    }

    pub(super) async fn next_async(&self) -> Option<Result<crate::Message, Error>> {
        self.consumer.lock().await.next().await
    }

    fn add_callback(&self, f: Callback) {
        if let Ok(mut h) = self.handlers.lock() {
            h.callbacks.push(f);
            self.has_handlers.store(true, Ordering::Release);
        }
    }

    /// Run the handlers on `msg`, on the calling thread (outside the runtime, so they may use
    /// the blocking API). The handlers are taken out meanwhile, so a callback may register
    /// more callbacks without deadlocking.
    pub(super) fn dispatch(&self, mut msg: Message) {
        let mut handlers = match self.handlers.lock() {
            Ok(mut h) => std::mem::take(&mut *h),
            Err(_) => Handlers::default(),
        };
        if let Some(h) = &mut handlers.on_message {
            h(&mut msg);
        } else {
            match msg.payload() {
                Ok(value) => {
                    let value = value.clone();
                    for cb in &mut handlers.callbacks {
                        cb(&value, &mut msg);
                    }
                }
                Err(e) => {
                    tracing::error!(error = %e, content_type = ?msg.content_type(),
                        delivery_tag = msg.delivery_tag(),
                        "cannot decode message; rejecting it without requeue");
                    msg.reject_log_error(false);
                }
            }
        }
        if let Ok(mut h) = self.handlers.lock() {
            let added = std::mem::replace(&mut *h, handlers);
            h.callbacks.extend(added.callbacks);
            if added.on_message.is_some() {
                h.on_message = added.on_message;
            }
        }
    }
}

pub(super) fn no_handlers() -> Error {
    Error::InvalidArgument {
        what: "drain_events",
        reason: "no consumer with callbacks or on_message to run".into(),
    }
}

/// Builds a blocking [`Consumer`].
///
/// ```
/// # fn main() -> Result<(), kelp::Error> {
/// let conn = kelp::blocking::Connection::open("memory://blocking-consumer-builder-doc")?;
/// let ch = conn.channel()?;
/// let consumer = kelp::blocking::Consumer::builder(&ch)
///     .queue(kelp::Queue::new("tasks"))
///     .accept(["json", "msgpack"])
///     .prefetch_count(20)
///     .callback(|body, msg| {
///         println!("{body:?}");
///         msg.ack_log_error();
///     })
///     .build()?;
/// # Ok(()) }
/// ```
#[must_use = "call .build() to start consuming"]
pub struct ConsumerBuilder {
    inner: crate::ConsumerBuilder,
    handlers: Handlers,
    channel: Channel,
}

impl fmt::Debug for ConsumerBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ConsumerBuilder")
            .field("inner", &self.inner)
            .field("callbacks", &self.handlers.callbacks.len())
            .finish_non_exhaustive()
    }
}

impl ConsumerBuilder {
    fn map(self, f: impl FnOnce(crate::ConsumerBuilder) -> crate::ConsumerBuilder) -> Self {
        ConsumerBuilder {
            inner: f(self.inner),
            handlers: self.handlers,
            channel: self.channel,
        }
    }

    /// Consume from `queue` too.
    ///
    /// ```no_run
    /// # fn demo(ch: &kelp::blocking::Channel) {
    /// let b = kelp::blocking::Consumer::builder(ch).queue(kelp::Queue::new("a"));
    /// # }
    /// ```
    pub fn queue(self, queue: impl Into<Queue>) -> Self {
        self.map(|b| b.queue(queue))
    }

    /// Consume from all of `queues`.
    ///
    /// ```no_run
    /// # fn demo(ch: &kelp::blocking::Channel) {
    /// let b = kelp::blocking::Consumer::builder(ch).queues([kelp::Queue::new("a"), kelp::Queue::new("b")]);
    /// # }
    /// ```
    pub fn queues(self, queues: impl IntoIterator<Item = Queue>) -> Self {
        self.map(|b| b.queues(queues))
    }

    /// Deliveries count as acknowledged when sent (default false).
    ///
    /// ```no_run
    /// # fn demo(ch: &kelp::blocking::Channel) {
    /// let b = kelp::blocking::Consumer::builder(ch).no_ack(true);
    /// # }
    /// ```
    pub fn no_ack(self, on: bool) -> Self {
        self.map(|b| b.no_ack(on))
    }

    /// Declare the queues (and their exchanges and bindings) before consuming (default true).
    ///
    /// ```no_run
    /// # fn demo(ch: &kelp::blocking::Channel) {
    /// let b = kelp::blocking::Consumer::builder(ch).auto_declare(false);
    /// # }
    /// ```
    pub fn auto_declare(self, on: bool) -> Self {
        self.map(|b| b.auto_declare(on))
    }

    /// Accept only these content types or serializer names; other messages are logged and
    /// rejected without requeue (as are messages that cannot be decoded).
    ///
    /// ```no_run
    /// # fn demo(ch: &kelp::blocking::Channel) {
    /// let b = kelp::blocking::Consumer::builder(ch).accept(["json"]);
    /// # }
    /// ```
    pub fn accept<I, S>(self, accept: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        self.map(|b| b.accept(accept))
    }

    /// The prefetch limit (`basic.qos` on the channel before consuming).
    ///
    /// ```no_run
    /// # fn demo(ch: &kelp::blocking::Channel) {
    /// let b = kelp::blocking::Consumer::builder(ch).prefetch_count(50);
    /// # }
    /// ```
    pub fn prefetch_count(self, n: u16) -> Self {
        self.map(|b| b.prefetch_count(n))
    }

    /// Prefix of the consumer tags kelp generates.
    ///
    /// ```no_run
    /// # fn demo(ch: &kelp::blocking::Channel) {
    /// let b = kelp::blocking::Consumer::builder(ch).tag_prefix("billing");
    /// # }
    /// ```
    pub fn tag_prefix(self, prefix: impl Into<String>) -> Self {
        self.map(|b| b.tag_prefix(prefix))
    }

    /// Add a callback `(body, message)`, run on the calling thread by
    /// [`Consumer::drain_events`] and [`super::Connection::drain_events`]. The body is the
    /// decoded payload; the callback settles the message (`msg.ack()`…).
    ///
    /// ```no_run
    /// # fn demo(ch: &kelp::blocking::Channel) {
    /// let b = kelp::blocking::Consumer::builder(ch).callback(|body, msg| {
    ///     println!("{body:?}");
    ///     msg.ack_log_error();
    /// });
    /// # }
    /// ```
    pub fn callback(mut self, f: impl FnMut(&Value, &mut Message) + Send + 'static) -> Self {
        self.handlers.callbacks.push(Box::new(f));
        self
    }

    /// Handle raw messages instead of decoding them for the callbacks (Kombu's `on_message`).
    ///
    /// ```no_run
    /// # fn demo(ch: &kelp::blocking::Channel) {
    /// let b = kelp::blocking::Consumer::builder(ch).on_message(|msg| {
    ///     println!("{} bytes", msg.body().len());
    ///     msg.ack_log_error();
    /// });
    /// # }
    /// ```
    pub fn on_message(mut self, f: impl FnMut(&mut Message) + Send + 'static) -> Self {
        self.handlers.on_message = Some(Box::new(f));
        self
    }

    fn finish(self, inner: crate::Consumer) -> Consumer {
        let has = !self.handlers.callbacks.is_empty() || self.handlers.on_message.is_some();
        let shared = Arc::new(ConsumerShared {
            consumer: tokio::sync::Mutex::new(inner),
            handlers: Mutex::new(self.handlers),
            has_handlers: AtomicBool::new(has),
        });
        self.channel
            .connection()
            .register_consumer(Arc::downgrade(&shared));
        Consumer {
            shared,
            channel: self.channel,
        }
    }

    /// Declare (unless `auto_declare(false)`), set QoS and start consuming every queue.
    ///
    /// ```
    /// # fn main() -> Result<(), kelp::Error> {
    /// let conn = kelp::blocking::Connection::open("memory://consumer-build-doc")?;
    /// let ch = conn.channel()?;
    /// let c = kelp::blocking::Consumer::builder(&ch).queue(kelp::Queue::new("q")).build()?;
    /// assert_eq!(c.consumer_tags()?.len(), 1);
    /// # Ok(()) }
    /// ```
    pub fn build(mut self) -> Result<Consumer, Error> {
        let shared = self.channel.shared().clone();
        let inner = std::mem::replace(
            &mut self.inner,
            crate::Consumer::builder(self.channel.as_async()),
        );
        let consumer = shared.run(inner.build())?;
        Ok(self.finish(consumer))
    }

    /// Build without starting to consume (call [`Consumer::consume`] later).
    ///
    /// ```
    /// # fn main() -> Result<(), kelp::Error> {
    /// let conn = kelp::blocking::Connection::open("memory://consumer-build-idle-doc")?;
    /// let ch = conn.channel()?;
    /// let mut c = kelp::blocking::Consumer::builder(&ch).queue(kelp::Queue::new("q")).build_idle()?;
    /// assert!(c.consumer_tags()?.is_empty());
    /// c.consume()?;
    /// # Ok(()) }
    /// ```
    pub fn build_idle(mut self) -> Result<Consumer, Error> {
        let inner = std::mem::replace(
            &mut self.inner,
            crate::Consumer::builder(self.channel.as_async()),
        );
        let consumer = inner.build_idle()?;
        Ok(self.finish(consumer))
    }
}

/// A blocking consumer of one or more queues (Kombu's `Consumer`): pull messages with
/// [`Consumer::next`] or [`Consumer::iter`], or register callbacks and call
/// [`Consumer::drain_events`] (or [`super::Connection::drain_events`] for every consumer of
/// the connection).
///
/// ```
/// # fn main() -> Result<(), kelp::Error> {
/// use std::time::Duration;
/// use kelp::blocking::{Connection, Consumer};
/// use kelp::{PublishOptions, Queue};
///
/// let conn = Connection::open("memory://blocking-consumer-doc")?;
/// let ch = conn.channel()?;
/// let mut consumer = Consumer::builder(&ch).queue(Queue::new("tasks")).build()?;
/// conn.producer()?.publish("job", PublishOptions::default().routing_key("tasks"))?;
/// let mut msg = consumer.next(Some(Duration::from_secs(1)))?.expect("a message");
/// assert_eq!(&msg.body()[..], b"job");
/// msg.ack()?;
/// consumer.cancel()?;
/// # Ok(()) }
/// ```
pub struct Consumer {
    shared: Arc<ConsumerShared>,
    channel: Channel,
}

impl fmt::Debug for Consumer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Consumer")
            .field("shared", &self.shared)
            .finish_non_exhaustive()
    }
}

impl Consumer {
    /// A builder for a consumer on `channel`.
    ///
    /// ```
    /// # fn main() -> Result<(), kelp::Error> {
    /// let conn = kelp::blocking::Connection::open("memory://consumer-builder-fn-doc")?;
    /// let c = kelp::blocking::Consumer::builder(&conn.channel()?)
    ///     .queue(kelp::Queue::new("tasks"))
    ///     .build()?;
    /// # Ok(()) }
    /// ```
    pub fn builder(channel: &Channel) -> ConsumerBuilder {
        ConsumerBuilder {
            inner: crate::Consumer::builder(channel.as_async()),
            handlers: Handlers::default(),
            channel: channel.clone(),
        }
    }

    fn run<T>(
        &self,
        f: impl AsyncFnOnce(&mut crate::Consumer) -> Result<T, Error>,
    ) -> Result<T, Error> {
        self.channel.shared().run(async {
            let mut c = self.shared.consumer.lock().await;
            f(&mut c).await
        })
    }

    /// The channel it consumes on.
    ///
    /// ```no_run
    /// # fn demo(c: &kelp::blocking::Consumer) { let ch = c.channel(); }
    /// ```
    pub fn channel(&self) -> &Channel {
        &self.channel
    }

    /// Its queues (server-generated names filled in once declared).
    ///
    /// ```no_run
    /// # fn demo(c: &kelp::blocking::Consumer) -> Result<(), kelp::Error> {
    /// for q in c.queues()? { println!("{}", q.name); }
    /// # Ok(()) }
    /// ```
    pub fn queues(&self) -> Result<Vec<Queue>, Error> {
        self.run(async |c| Ok(c.queues().await))
    }

    /// Start consuming every queue not consumed yet.
    ///
    /// ```no_run
    /// # fn demo(c: &mut kelp::blocking::Consumer) -> Result<(), kelp::Error> {
    /// c.consume()?;
    /// # Ok(()) }
    /// ```
    pub fn consume(&mut self) -> Result<(), Error> {
        self.run(async |c| c.consume().await)
    }

    /// Add a queue and, if the consumer is active, start consuming it.
    ///
    /// ```no_run
    /// # fn demo(c: &mut kelp::blocking::Consumer) -> Result<(), kelp::Error> {
    /// c.add_queue(kelp::Queue::new("more"))?;
    /// # Ok(()) }
    /// ```
    pub fn add_queue(&mut self, queue: Queue) -> Result<(), Error> {
        self.run(async |c| c.add_queue(queue).await)
    }

    /// The consumer tags of the queues it consumes now.
    ///
    /// ```no_run
    /// # fn demo(c: &kelp::blocking::Consumer) -> Result<(), kelp::Error> {
    /// println!("{:?}", c.consumer_tags()?);
    /// # Ok(()) }
    /// ```
    pub fn consumer_tags(&self) -> Result<Vec<String>, Error> {
        self.run(async |c| Ok(c.consumer_tags().await))
    }

    /// True if it consumes from `queue`.
    ///
    /// ```no_run
    /// # fn demo(c: &kelp::blocking::Consumer) -> Result<(), kelp::Error> {
    /// assert!(c.consuming_from("tasks")?);
    /// # Ok(()) }
    /// ```
    pub fn consuming_from(&self, queue: &str) -> Result<bool, Error> {
        self.run(async |c| Ok(c.consuming_from(queue).await))
    }

    /// Stop consuming every queue. Messages already delivered can still be read; after them
    /// [`Consumer::next`] returns `Ok(None)`.
    ///
    /// ```no_run
    /// # fn demo(c: &mut kelp::blocking::Consumer) -> Result<(), kelp::Error> {
    /// c.cancel()?;
    /// # Ok(()) }
    /// ```
    pub fn cancel(&mut self) -> Result<(), Error> {
        self.run(async |c| c.cancel().await)
    }

    /// Stop consuming `queue` only.
    ///
    /// ```no_run
    /// # fn demo(c: &mut kelp::blocking::Consumer) -> Result<(), kelp::Error> {
    /// c.cancel_by_queue("tasks")?;
    /// # Ok(()) }
    /// ```
    pub fn cancel_by_queue(&mut self, queue: &str) -> Result<(), Error> {
        self.run(async |c| c.cancel_by_queue(queue).await)
    }

    /// Purge every queue; returns the total removed.
    ///
    /// ```no_run
    /// # fn demo(c: &kelp::blocking::Consumer) -> Result<(), kelp::Error> {
    /// let n = c.purge()?;
    /// # Ok(()) }
    /// ```
    pub fn purge(&self) -> Result<u32, Error> {
        self.run(async |c| c.purge().await)
    }

    /// Change the prefetch limit.
    ///
    /// ```no_run
    /// # fn demo(c: &mut kelp::blocking::Consumer) -> Result<(), kelp::Error> {
    /// c.qos(100, false)?;
    /// # Ok(()) }
    /// ```
    pub fn qos(&mut self, prefetch_count: u16, global: bool) -> Result<(), Error> {
        self.run(async |c| c.qos(prefetch_count, global).await)
    }

    /// Redeliver unacknowledged messages.
    ///
    /// ```no_run
    /// # fn demo(c: &kelp::blocking::Consumer) -> Result<(), kelp::Error> {
    /// c.recover(true)?;
    /// # Ok(()) }
    /// ```
    pub fn recover(&self, requeue: bool) -> Result<(), Error> {
        self.channel.recover(requeue)
    }

    /// Pause (`false`) or resume (`true`) deliveries (`channel.flow`).
    ///
    /// ```no_run
    /// # fn demo(c: &kelp::blocking::Consumer) -> Result<(), kelp::Error> {
    /// c.flow(false)?;
    /// # Ok(()) }
    /// ```
    pub fn flow(&self, active: bool) -> Result<(), Error> {
        self.channel.flow(active)
    }

    /// Add a callback `(body, message)`, run by the `drain_events` methods.
    ///
    /// ```no_run
    /// # fn demo(c: &kelp::blocking::Consumer) {
    /// c.register_callback(|_body, msg| msg.ack_log_error());
    /// # }
    /// ```
    pub fn register_callback(&self, f: impl FnMut(&Value, &mut Message) + Send + 'static) {
        self.shared.add_callback(Box::new(f));
    }

    /// The next message from any of the queues, waiting up to `timeout` (`None`: as long as
    /// it takes). `Ok(None)` once the consumer has ended (cancelled); `Err(Error::Timeout)`
    /// when nothing came in time; a broker-side cancel is `Err(Error::ConsumerCancelled)`.
    ///
    /// ```
    /// # fn main() -> Result<(), kelp::Error> {
    /// use std::time::Duration;
    /// let conn = kelp::blocking::Connection::open("memory://consumer-next-doc")?;
    /// let ch = conn.channel()?;
    /// let mut c = kelp::blocking::Consumer::builder(&ch).queue(kelp::Queue::new("q")).build()?;
    /// let idle = c.next(Some(Duration::from_millis(20)));
    /// assert!(matches!(idle, Err(kelp::Error::Timeout { .. })));
    /// # Ok(()) }
    /// ```
    pub fn next(&mut self, timeout: Option<Duration>) -> Result<Option<Message>, Error> {
        let got = self.run(async |c| match timeout {
            Some(t) => c.next_timeout(t).await,
            None => c.next().await.transpose(),
        })?;
        Ok(got.map(|m| Message::new(m, self.channel.shared().clone())))
    }

    /// Iterate over the messages, each waited for as long as it takes; the iteration ends
    /// when the consumer does (after a cancel, or when the connection closes).
    ///
    /// ```no_run
    /// # fn demo(mut c: kelp::blocking::Consumer) -> Result<(), kelp::Error> {
    /// for msg in c.iter() {
    ///     let mut msg = msg?;
    ///     msg.ack()?;
    /// }
    /// # Ok(()) }
    /// ```
    pub fn iter(&mut self) -> Iter<'_> {
        Iter {
            consumer: self,
            timeout: None,
            done: false,
        }
    }

    /// Iterate over the messages until none comes within `timeout` (or the consumer ends).
    ///
    /// ```
    /// # fn main() -> Result<(), kelp::Error> {
    /// use std::time::Duration;
    /// use kelp::PublishOptions;
    /// let conn = kelp::blocking::Connection::open("memory://consumer-iter-doc")?;
    /// let ch = conn.channel()?;
    /// let mut c = kelp::blocking::Consumer::builder(&ch).queue(kelp::Queue::new("q")).build()?;
    /// let p = conn.producer()?;
    /// for i in 0..3 {
    ///     p.publish(format!("m{i}"), PublishOptions::default().routing_key("q"))?;
    /// }
    /// let mut n = 0;
    /// for msg in c.iter_timeout(Duration::from_millis(200)) {
    ///     msg?.ack()?;
    ///     n += 1;
    /// }
    /// assert_eq!(n, 3);
    /// # Ok(()) }
    /// ```
    pub fn iter_timeout(&mut self, timeout: Duration) -> Iter<'_> {
        Iter {
            consumer: self,
            timeout: Some(timeout),
            done: false,
        }
    }

    /// Wait up to `timeout` for one message of this consumer and run its callbacks (or
    /// `on_message`) on it on this thread. `Ok(true)` if a message was handled, `Ok(false)`
    /// once the consumer has ended, `Err(Error::Timeout)` when nothing came, and
    /// `Error::InvalidArgument` without callbacks.
    ///
    /// ```
    /// # fn main() -> Result<(), kelp::Error> {
    /// use std::time::Duration;
    /// let conn = kelp::blocking::Connection::open("memory://consumer-drain-doc")?;
    /// let ch = conn.channel()?;
    /// let mut c = kelp::blocking::Consumer::builder(&ch)
    ///     .queue(kelp::Queue::new("q"))
    ///     .callback(|body, msg| {
    ///         assert_eq!(body.as_str(), Some("hi"));
    ///         msg.ack_log_error();
    ///     })
    ///     .build()?;
    /// conn.producer()?.publish_serde("hi", kelp::PublishOptions::default().routing_key("q"))?;
    /// assert!(c.drain_events(Some(Duration::from_secs(1)))?);
    /// # Ok(()) }
    /// ```
    pub fn drain_events(&mut self, timeout: Option<Duration>) -> Result<bool, Error> {
        check_not_async()?;
        if !self.shared.has_handlers() {
            return Err(no_handlers());
        }
        let got = self.run(async |c| match timeout {
            Some(t) => tokio::time::timeout(t, c.next())
                .await
                .map_err(|_| Error::Timeout {
                    what: "an event",
                    after: t,
                }),
            None => Ok(c.next().await),
        })?;
        match got {
            Some(msg) => {
                let msg = Message::new(msg?, self.channel.shared().clone());
                self.shared.dispatch(msg);
                Ok(true)
            }
            None => Ok(false),
        }
    }

    /// Cancel every consumer and let go of it (Kombu's `close`); the channel stays open.
    ///
    /// ```no_run
    /// # fn demo(c: kelp::blocking::Consumer) -> Result<(), kelp::Error> {
    /// c.close()?;
    /// # Ok(()) }
    /// ```
    pub fn close(mut self) -> Result<(), Error> {
        self.cancel()
    }
}

/// The messages of a [`Consumer`], from [`Consumer::iter`] or [`Consumer::iter_timeout`].
/// It ends when the consumer ends, on a timeout (`iter_timeout`), or after yielding an error
/// other than a broker-side cancel of one of the queues.
///
/// ```no_run
/// # fn demo(c: &mut kelp::blocking::Consumer) -> Result<(), kelp::Error> {
/// let msgs: Vec<kelp::blocking::Message> = c.iter_timeout(std::time::Duration::from_secs(1))
///     .collect::<Result<_, _>>()?;
/// # Ok(()) }
/// ```
#[derive(Debug)]
pub struct Iter<'a> {
    consumer: &'a mut Consumer,
    timeout: Option<Duration>,
    done: bool,
}

impl Iterator for Iter<'_> {
    type Item = Result<Message, Error>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.done {
            return None;
        }
        match self.consumer.next(self.timeout) {
            Ok(Some(m)) => Some(Ok(m)),
            Ok(None) | Err(Error::Timeout { .. }) => {
                self.done = true;
                None
            }
            Err(e @ Error::ConsumerCancelled { .. }) => Some(Err(e)),
            Err(e) => {
                self.done = true;
                Some(Err(e))
            }
        }
    }
}

impl<'a> IntoIterator for &'a mut Consumer {
    type Item = Result<Message, Error>;
    type IntoIter = Iter<'a>;

    fn into_iter(self) -> Iter<'a> {
        self.iter()
    }
}
