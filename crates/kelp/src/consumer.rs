//! Consuming (Kombu's `Consumer`): one or more queues, callbacks or a stream of messages.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use futures_core::Stream;
use futures_util::stream::SelectAll;
use tokio::sync::Mutex as AsyncMutex;

use crate::channel::Channel;
use crate::entity::Queue;
use crate::error::Error;
use crate::message::Message;
use crate::serialization::{Accept, Value};
use crate::transport::{BoxFuture, ConsumeSpec, DeliveryStream, RawDelivery};

/// One item off a consumer's streams: its queue, and a delivery or the consumer's end.
pub(crate) type RawItem = (Arc<str>, Result<RawDelivery, Error>);

type Callback = Box<dyn for<'a> FnMut(&'a Value, &'a mut Message) -> BoxFuture<'a, ()> + Send>;
type OnMessage = Box<dyn for<'a> FnMut(&'a mut Message) -> BoxFuture<'a, ()> + Send>;
type OnDecodeError = Box<dyn for<'a> FnMut(&'a mut Message, &'a Error) -> BoxFuture<'a, ()> + Send>;

struct Tagged {
    queue: Arc<str>,
    inner: DeliveryStream,
}

impl Stream for Tagged {
    type Item = RawItem;
    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let q = self.queue.clone();
        self.inner.as_mut().poll_next(cx).map(|o| o.map(|r| (q, r)))
    }
}

/// Consumes from one or more queues (Kombu's `Consumer`). Use it as a stream
/// (`while let Some(msg) = consumer.next().await`) or with callbacks and
/// [`Consumer::drain_events`].
///
/// ```no_run
/// # async fn demo() -> Result<(), kelp::Error> {
/// use kelp::{Connection, Consumer, Queue};
/// let conn = Connection::open("memory://").await?;
/// let ch = conn.channel().await?;
/// let mut consumer = Consumer::builder(&ch)
///     .queue(Queue::new("tasks"))
///     .prefetch_count(10)
///     .accept(["json"])
///     .build()
///     .await?;
/// while let Some(msg) = consumer.next().await {
///     let mut msg = msg?;
///     let task: serde_json::Value = msg.decode()?;
///     msg.ack().await?;
/// }
/// # Ok(()) }
/// ```
pub struct Consumer {
    core: Arc<AsyncMutex<Core>>,
    channel: Channel,
}

/// The consumer's state, behind the lock [`Consumer`] and [`crate::Connection::drain_events`] share.
pub(crate) struct Core {
    channel: Channel,
    queues: Vec<Queue>,
    no_ack: bool,
    auto_declare: bool,
    accept: Option<Arc<Accept>>,
    prefetch_count: Option<u16>,
    tag_prefix: String,
    callbacks: Vec<Callback>,
    on_message: Option<OnMessage>,
    on_decode_error: Option<OnDecodeError>,
    active: Vec<(String, String)>,
    streams: SelectAll<Tagged>,
    next_tag: u32,
}

impl std::fmt::Debug for Core {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Core")
            .field(
                "queues",
                &self.queues.iter().map(|q| &q.name).collect::<Vec<_>>(),
            )
            .field("no_ack", &self.no_ack)
            .field("prefetch_count", &self.prefetch_count)
            .field("active", &self.active)
            .finish_non_exhaustive()
    }
}

/// Builds a [`Consumer`].
///
/// ```no_run
/// # async fn demo(ch: &kelp::Channel) -> Result<(), kelp::Error> {
/// let consumer = kelp::Consumer::builder(ch)
///     .queue(kelp::Queue::new("tasks"))
///     .accept(["json", "msgpack"])
///     .prefetch_count(20)
///     .tag_prefix("worker")
///     .build()
///     .await?;
/// # Ok(()) }
/// ```
#[must_use = "call .build().await to start consuming"]
pub struct ConsumerBuilder {
    c: Core,
    err: Option<Error>,
}

impl std::fmt::Debug for ConsumerBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.c.fmt(f)
    }
}

impl ConsumerBuilder {
    /// Consume from `queue` too.
    ///
    /// ```no_run
    /// # fn demo(ch: &kelp::Channel) { let b = kelp::Consumer::builder(ch).queue(kelp::Queue::new("a")); }
    /// ```
    pub fn queue(mut self, queue: impl Into<Queue>) -> Self {
        self.c.queues.push(queue.into());
        self
    }
    /// Consume from all of `queues`.
    ///
    /// ```no_run
    /// # fn demo(ch: &kelp::Channel) {
    /// let b = kelp::Consumer::builder(ch).queues([kelp::Queue::new("a"), kelp::Queue::new("b")]);
    /// # }
    /// ```
    pub fn queues(mut self, queues: impl IntoIterator<Item = Queue>) -> Self {
        self.c.queues.extend(queues);
        self
    }
    /// Deliveries count as acknowledged when sent (default false).
    ///
    /// ```no_run
    /// # fn demo(ch: &kelp::Channel) { let b = kelp::Consumer::builder(ch).no_ack(true); }
    /// ```
    pub fn no_ack(mut self, on: bool) -> Self {
        self.c.no_ack = on;
        self
    }
    /// Declare the queues (and their exchanges and bindings) before consuming (default true).
    ///
    /// ```no_run
    /// # fn demo(ch: &kelp::Channel) { let b = kelp::Consumer::builder(ch).auto_declare(false); }
    /// ```
    pub fn auto_declare(mut self, on: bool) -> Self {
        self.c.auto_declare = on;
        self
    }
    /// Accept only these content types or serializer names; other messages go to the
    /// decode-error handler without being decoded. Without it, Kombu's default applies:
    /// everything except pickle, yaml and msgpack (use
    /// `.accept(["json", "pickle", …])` to trust more).
    ///
    /// ```no_run
    /// # fn demo(ch: &kelp::Channel) { let b = kelp::Consumer::builder(ch).accept(["json", "application/x-msgpack"]); }
    /// ```
    pub fn accept<I, S>(mut self, accept: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        match Accept::new(accept) {
            Ok(a) => self.c.accept = Some(Arc::new(a)),
            Err(e) => self.err = Some(e.into()),
        }
        self
    }
    /// The prefetch limit (`basic.qos` on the channel before consuming).
    ///
    /// ```no_run
    /// # fn demo(ch: &kelp::Channel) { let b = kelp::Consumer::builder(ch).prefetch_count(50); }
    /// ```
    pub fn prefetch_count(mut self, n: u16) -> Self {
        self.c.prefetch_count = Some(n);
        self
    }
    /// Prefix of the consumer tags kelp generates.
    ///
    /// ```no_run
    /// # fn demo(ch: &kelp::Channel) { let b = kelp::Consumer::builder(ch).tag_prefix("billing"); }
    /// ```
    pub fn tag_prefix(mut self, prefix: impl Into<String>) -> Self {
        self.c.tag_prefix = prefix.into();
        self
    }
    /// Add a callback `(body, message)` run by [`Consumer::drain_events`].
    ///
    /// ```no_run
    /// # fn demo(ch: &kelp::Channel) {
    /// let b = kelp::Consumer::builder(ch).callback(|body, msg| Box::pin(async move {
    ///     println!("{body:?}");
    ///     msg.ack_log_error().await;
    /// }));
    /// # }
    /// ```
    pub fn callback<F>(mut self, f: F) -> Self
    where
        F: for<'a> FnMut(&'a Value, &'a mut Message) -> BoxFuture<'a, ()> + Send + 'static,
    {
        self.c.callbacks.push(Box::new(f));
        self
    }
    /// Handle raw messages instead of decoding them for the callbacks (Kombu's `on_message`).
    ///
    /// ```no_run
    /// # fn demo(ch: &kelp::Channel) {
    /// let b = kelp::Consumer::builder(ch).on_message(|msg| Box::pin(async move {
    ///     msg.ack_log_error().await;
    /// }));
    /// # }
    /// ```
    pub fn on_message<F>(mut self, f: F) -> Self
    where
        F: for<'a> FnMut(&'a mut Message) -> BoxFuture<'a, ()> + Send + 'static,
    {
        self.c.on_message = Some(Box::new(f));
        self
    }
    /// Handle messages that cannot be decoded or are not accepted (default: log, and reject
    /// without requeue so they are dead-lettered or dropped, never silently acked).
    ///
    /// ```no_run
    /// # fn demo(ch: &kelp::Channel) {
    /// let b = kelp::Consumer::builder(ch).on_decode_error(|msg, err| Box::pin(async move {
    ///     eprintln!("bad message: {err}");
    ///     msg.reject_log_error(false).await;
    /// }));
    /// # }
    /// ```
    pub fn on_decode_error<F>(mut self, f: F) -> Self
    where
        F: for<'a> FnMut(&'a mut Message, &'a Error) -> BoxFuture<'a, ()> + Send + 'static,
    {
        self.c.on_decode_error = Some(Box::new(f));
        self
    }

    /// Declare (unless `auto_declare(false)`), set QoS and start consuming every queue.
    ///
    /// ```no_run
    /// # async fn demo(ch: &kelp::Channel) -> Result<(), kelp::Error> {
    /// let consumer = kelp::Consumer::builder(ch).queue(kelp::Queue::new("q")).build().await?;
    /// # Ok(()) }
    /// ```
    pub async fn build(mut self) -> Result<Consumer, Error> {
        if let Some(e) = self.err {
            return Err(e);
        }
        self.c.consume().await?;
        Ok(Consumer::from_core(self.c))
    }

    /// Build without starting to consume (call [`Consumer::consume`] later).
    ///
    /// ```no_run
    /// # fn demo(ch: &kelp::Channel) -> Result<(), kelp::Error> {
    /// let consumer = kelp::Consumer::builder(ch).queue(kelp::Queue::new("q")).build_idle()?;
    /// # Ok(()) }
    /// ```
    pub fn build_idle(self) -> Result<Consumer, Error> {
        match self.err {
            Some(e) => Err(e),
            None => Ok(Consumer::from_core(self.c)),
        }
    }
}

impl std::fmt::Debug for Consumer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.core.try_lock() {
            Ok(core) => f
                .debug_struct("Consumer")
                .field(
                    "queues",
                    &core.queues.iter().map(|q| &q.name).collect::<Vec<_>>(),
                )
                .field("no_ack", &core.no_ack)
                .field("prefetch_count", &core.prefetch_count)
                .field("active", &core.active)
                .finish_non_exhaustive(),
            Err(_) => f.debug_struct("Consumer").finish_non_exhaustive(),
        }
    }
}

impl Consumer {
    /// A builder for a consumer on `channel`.
    ///
    /// ```no_run
    /// # async fn demo(ch: &kelp::Channel) -> Result<(), kelp::Error> {
    /// let consumer = kelp::Consumer::builder(ch)
    ///     .queue(kelp::Queue::new("tasks"))
    ///     .prefetch_count(10)
    ///     .build()
    ///     .await?;
    /// # Ok(()) }
    /// ```
    pub fn builder(channel: &Channel) -> ConsumerBuilder {
        Core::builder(channel)
    }

    fn from_core(core: Core) -> Self {
        let channel = core.channel.clone();
        let core = Arc::new(AsyncMutex::new(core));
        channel
            .connection()
            .register_consumer(Arc::downgrade(&core));
        Consumer { core, channel }
    }

    /// The channel it consumes on.
    ///
    /// ```no_run
    /// # fn demo(c: &kelp::Consumer) { let ch = c.channel(); }
    /// ```
    pub fn channel(&self) -> &Channel {
        &self.channel
    }

    /// Its queues (server-generated names filled in once declared).
    ///
    /// ```no_run
    /// # async fn demo(c: &kelp::Consumer) {
    /// for q in c.queues().await { println!("{}", q.name); }
    /// # }
    /// ```
    pub async fn queues(&self) -> Vec<Queue> {
        self.core.lock().await.queues.clone()
    }

    /// Start consuming every queue not consumed yet (declaring them first unless
    /// `auto_declare(false)`). [`ConsumerBuilder::build`] does this already.
    ///
    /// ```no_run
    /// # async fn demo(ch: &kelp::Channel) -> Result<(), kelp::Error> {
    /// let mut c = kelp::Consumer::builder(ch).queue(kelp::Queue::new("q")).build_idle()?;
    /// c.consume().await?;
    /// # Ok(()) }
    /// ```
    pub async fn consume(&mut self) -> Result<(), Error> {
        self.core.lock().await.consume().await
    }

    /// Add a queue and, if the consumer is active, start consuming it.
    ///
    /// ```no_run
    /// # async fn demo(c: &mut kelp::Consumer) -> Result<(), kelp::Error> {
    /// c.add_queue(kelp::Queue::new("more")).await?;
    /// # Ok(()) }
    /// ```
    pub async fn add_queue(&mut self, queue: Queue) -> Result<(), Error> {
        self.core.lock().await.add_queue(queue).await
    }

    /// The consumer tags of the queues it consumes now.
    ///
    /// ```no_run
    /// # async fn demo(c: &kelp::Consumer) { println!("{:?}", c.consumer_tags().await); }
    /// ```
    pub async fn consumer_tags(&self) -> Vec<String> {
        self.core
            .lock()
            .await
            .active
            .iter()
            .map(|(tag, _)| tag.clone())
            .collect()
    }

    /// True if it consumes from `queue`.
    ///
    /// ```no_run
    /// # async fn demo(c: &kelp::Consumer) { assert!(c.consuming_from("tasks").await); }
    /// ```
    pub async fn consuming_from(&self, queue: &str) -> bool {
        self.core.lock().await.consuming_from(queue)
    }

    /// Stop consuming every queue. Messages already delivered can still be read.
    ///
    /// ```no_run
    /// # async fn demo(c: &mut kelp::Consumer) -> Result<(), kelp::Error> {
    /// c.cancel().await?;
    /// # Ok(()) }
    /// ```
    pub async fn cancel(&mut self) -> Result<(), Error> {
        self.core.lock().await.cancel().await
    }

    /// Stop consuming `queue` only.
    ///
    /// ```no_run
    /// # async fn demo(c: &mut kelp::Consumer) -> Result<(), kelp::Error> {
    /// c.cancel_by_queue("tasks").await?;
    /// # Ok(()) }
    /// ```
    pub async fn cancel_by_queue(&mut self, queue: &str) -> Result<(), Error> {
        self.core.lock().await.cancel_by_queue(queue).await
    }

    /// Purge every queue; returns the total removed.
    ///
    /// ```no_run
    /// # async fn demo(c: &kelp::Consumer) -> Result<(), kelp::Error> {
    /// let n = c.purge().await?;
    /// # Ok(()) }
    /// ```
    pub async fn purge(&self) -> Result<u32, Error> {
        self.core.lock().await.purge().await
    }

    /// Pause (`false`) or resume (`true`) deliveries (`channel.flow`).
    ///
    /// ```no_run
    /// # async fn demo(c: &kelp::Consumer) -> Result<(), kelp::Error> {
    /// c.flow(false).await?;
    /// # Ok(()) }
    /// ```
    pub async fn flow(&self, active: bool) -> Result<(), Error> {
        self.channel.flow(active).await
    }

    /// Change the prefetch limit.
    ///
    /// ```no_run
    /// # async fn demo(c: &mut kelp::Consumer) -> Result<(), kelp::Error> {
    /// c.qos(100, false).await?;
    /// # Ok(()) }
    /// ```
    pub async fn qos(&mut self, prefetch_count: u16, global: bool) -> Result<(), Error> {
        self.core.lock().await.qos(prefetch_count, global).await
    }

    /// Redeliver unacknowledged messages.
    ///
    /// ```no_run
    /// # async fn demo(c: &kelp::Consumer) -> Result<(), kelp::Error> {
    /// c.recover(true).await?;
    /// # Ok(()) }
    /// ```
    pub async fn recover(&self, requeue: bool) -> Result<(), Error> {
        self.channel.recover(requeue).await
    }

    /// Add a callback `(body, message)`, run by [`Consumer::drain_events`] and
    /// [`crate::Connection::drain_events`].
    ///
    /// ```no_run
    /// # async fn demo(c: &mut kelp::Consumer) {
    /// c.register_callback(|_body, msg| Box::pin(async move { msg.ack_log_error().await })).await;
    /// # }
    /// ```
    pub async fn register_callback<F>(&mut self, f: F)
    where
        F: for<'a> FnMut(&'a Value, &'a mut Message) -> BoxFuture<'a, ()> + Send + 'static,
    {
        self.core.lock().await.register_callback(f);
    }

    /// Move to another channel (Kombu's `revive`); call [`Consumer::consume`] again after.
    ///
    /// ```no_run
    /// # async fn demo(c: &mut kelp::Consumer, ch: &kelp::Channel) -> Result<(), kelp::Error> {
    /// c.revive(ch).await;
    /// c.consume().await?;
    /// # Ok(()) }
    /// ```
    pub async fn revive(&mut self, channel: &Channel) {
        self.core.lock().await.revive(channel);
        self.channel = channel.clone();
        channel
            .connection()
            .register_consumer(Arc::downgrade(&self.core));
    }

    /// Cancel every consumer and let go of the consumer (Kombu's `close`); the channel stays
    /// open for others.
    ///
    /// ```no_run
    /// # async fn demo(c: kelp::Consumer) -> Result<(), kelp::Error> {
    /// c.close().await?;
    /// # Ok(()) }
    /// ```
    pub async fn close(mut self) -> Result<(), Error> {
        self.cancel().await
    }

    /// The next message from any of the queues; `None` once every consumer ended. A message
    /// whose content type is not accepted goes to the decode-error handler and is skipped. A
    /// broker-side cancel (queue deleted) comes as `Err(Error::ConsumerCancelled)`.
    ///
    /// ```no_run
    /// # async fn demo(mut c: kelp::Consumer) -> Result<(), kelp::Error> {
    /// while let Some(msg) = c.next().await {
    ///     msg?.ack().await?;
    /// }
    /// # Ok(()) }
    /// ```
    pub async fn next(&mut self) -> Option<Result<Message, Error>> {
        self.core.lock().await.next().await
    }

    /// Like [`Consumer::next`] but gives up after `timeout` with `Error::Timeout`.
    ///
    /// ```no_run
    /// # async fn demo(mut c: kelp::Consumer) -> Result<(), kelp::Error> {
    /// let msg = c.next_timeout(std::time::Duration::from_secs(1)).await?;
    /// # Ok(()) }
    /// ```
    pub async fn next_timeout(&mut self, timeout: Duration) -> Result<Option<Message>, Error> {
        self.core.lock().await.next_timeout(timeout).await
    }

    /// Wait up to `timeout` for one message and run the callbacks (or `on_message`) on it.
    /// Returns `Ok(true)` if a message was handled, `Ok(false)` once every consumer ended, and
    /// `Err(Error::Timeout)` when nothing came. Without callbacks or `on_message` it is an
    /// `Error::InvalidArgument` (as Kombu refuses a consumer without callbacks).
    ///
    /// ```no_run
    /// # async fn demo(mut c: kelp::Consumer) -> Result<(), kelp::Error> {
    /// loop {
    ///     match c.drain_events(Some(std::time::Duration::from_secs(1))).await {
    ///         Ok(true) => continue,
    ///         Ok(false) => break,
    ///         Err(kelp::Error::Timeout { .. }) => continue,
    ///         Err(e) => return Err(e),
    ///     }
    /// }
    /// # Ok(()) }
    /// ```
    pub async fn drain_events(&mut self, timeout: Option<Duration>) -> Result<bool, Error> {
        self.core.lock().await.drain_events(timeout).await
    }
}

impl Core {
    fn builder(channel: &Channel) -> ConsumerBuilder {
        ConsumerBuilder {
            c: Core {
                channel: channel.clone(),
                queues: Vec::new(),
                no_ack: false,
                auto_declare: true,
                accept: None,
                prefetch_count: None,
                tag_prefix: String::new(),
                callbacks: Vec::new(),
                on_message: None,
                on_decode_error: None,
                active: Vec::new(),
                streams: SelectAll::new(),
                next_tag: 0,
            },
            err: None,
        }
    }

    pub(crate) async fn consume(&mut self) -> Result<(), Error> {
        if let Some(n) = self.prefetch_count {
            self.channel.qos(n, false).await?;
        }
        for i in 0..self.queues.len() {
            self.start(i).await?;
        }
        Ok(())
    }

    async fn start(&mut self, i: usize) -> Result<(), Error> {
        let Some(q) = self.queues.get_mut(i) else {
            return Ok(());
        };
        if self.auto_declare {
            q.declare(&self.channel).await?;
        }
        if self.active.iter().any(|(_, name)| *name == q.name) {
            return Ok(());
        }
        let tag = if self.tag_prefix.is_empty() {
            String::new()
        } else {
            self.next_tag += 1;
            format!("{}-{}", self.tag_prefix, self.next_tag)
        };
        let spec = ConsumeSpec {
            tag,
            no_ack: self.no_ack,
            exclusive: false,
            arguments: q.consumer_arguments.clone(),
        };
        let (tag, stream) = self.channel.raw().consume(&q.name, spec).await?;
        self.active.push((tag, q.name.clone()));
        self.streams.push(Tagged {
            queue: Arc::from(q.name.as_str()),
            inner: stream,
        });
        Ok(())
    }

    pub(crate) async fn add_queue(&mut self, queue: Queue) -> Result<(), Error> {
        self.queues.push(queue);
        if !self.active.is_empty() {
            self.start(self.queues.len() - 1).await?;
        }
        Ok(())
    }

    pub(crate) fn consuming_from(&self, queue: &str) -> bool {
        self.active.iter().any(|(_, q)| q == queue)
    }

    pub(crate) async fn cancel(&mut self) -> Result<(), Error> {
        for (tag, _) in std::mem::take(&mut self.active) {
            self.channel.raw().cancel(&tag).await?;
        }
        Ok(())
    }

    pub(crate) async fn cancel_by_queue(&mut self, queue: &str) -> Result<(), Error> {
        let mut keep = Vec::new();
        for (tag, q) in std::mem::take(&mut self.active) {
            if q == queue {
                self.channel.raw().cancel(&tag).await?;
            } else {
                keep.push((tag, q));
            }
        }
        self.active = keep;
        Ok(())
    }

    pub(crate) async fn purge(&self) -> Result<u32, Error> {
        let mut n = 0;
        for q in &self.queues {
            n += q.purge(&self.channel).await?;
        }
        Ok(n)
    }

    pub(crate) async fn qos(&mut self, prefetch_count: u16, global: bool) -> Result<(), Error> {
        self.prefetch_count = Some(prefetch_count);
        self.channel.qos(prefetch_count, global).await
    }

    pub(crate) fn register_callback<F>(&mut self, f: F)
    where
        F: for<'a> FnMut(&'a Value, &'a mut Message) -> BoxFuture<'a, ()> + Send + 'static,
    {
        self.callbacks.push(Box::new(f));
    }

    pub(crate) fn revive(&mut self, channel: &Channel) {
        self.channel = channel.clone();
        self.active.clear();
        self.streams = SelectAll::new();
    }

    fn wrap(&self, d: RawDelivery) -> Message {
        Message::new(
            d,
            self.channel.clone_raw(),
            self.no_ack,
            self.channel.codec(),
        )
        .with_accept(self.accept.clone())
    }

    fn accepted(&self, m: &Message) -> Result<(), Error> {
        match &self.accept {
            Some(a) => Ok(a.check(m.content_type())?),
            None => Ok(crate::message::default_accept().check(m.content_type())?),
        }
    }

    /// Poll the delivery streams once. Cancel-safe: an item is either returned or stays queued.
    pub(crate) fn poll_raw(&mut self, cx: &mut Context<'_>) -> Poll<Option<RawItem>> {
        Pin::new(&mut self.streams).poll_next(cx)
    }

    /// Make a raw item the user's message; `None` when it went to the decode-error handler.
    async fn admit(&mut self, (queue, item): RawItem) -> Option<Result<Message, Error>> {
        match item {
            Ok(d) => {
                let mut m = self.wrap(d);
                if let Err(e) = self.accepted(&m) {
                    self.decode_error(&mut m, &e).await;
                    return None;
                }
                Some(Ok(m))
            }
            Err(e) => {
                self.active.retain(|(_, q)| **q != *queue);
                Some(Err(e))
            }
        }
    }

    pub(crate) async fn next(&mut self) -> Option<Result<Message, Error>> {
        loop {
            let raw = std::future::poll_fn(|cx| self.poll_raw(cx)).await?;
            if let Some(r) = self.admit(raw).await {
                return Some(r);
            }
        }
    }

    pub(crate) async fn next_timeout(
        &mut self,
        timeout: Duration,
    ) -> Result<Option<Message>, Error> {
        loop {
            let raw = tokio::time::timeout(timeout, std::future::poll_fn(|cx| self.poll_raw(cx)))
                .await
                .map_err(|_| Error::Timeout {
                    what: "a message",
                    after: timeout,
                })?;
            let Some(raw) = raw else {
                return Ok(None);
            };
            if let Some(r) = self.admit(raw).await {
                return r.map(Some);
            }
        }
    }

    async fn decode_error(&mut self, m: &mut Message, e: &Error) {
        match &mut self.on_decode_error {
            Some(h) => h(m, e).await,
            None => {
                tracing::error!(error = %e, content_type = ?m.content_type(), delivery_tag = m.delivery_tag(),
                    "cannot decode message; rejecting it without requeue");
                m.reject_log_error(false).await;
            }
        }
    }

    /// True when there is something to run for a message (callbacks or `on_message`).
    pub(crate) fn has_handlers(&self) -> bool {
        !self.callbacks.is_empty() || self.on_message.is_some()
    }

    /// Run the handlers on one raw item. An error is the consumer's own (e.g. cancelled by the
    /// broker); handler outcomes are the handlers' business.
    pub(crate) async fn dispatch(&mut self, raw: RawItem) -> Result<(), Error> {
        let Some(m) = self.admit(raw).await else {
            return Ok(());
        };
        let mut m = m?;
        if let Some(h) = &mut self.on_message {
            h(&mut m).await;
            return Ok(());
        }
        let value = match m.payload() {
            Ok(v) => v.clone(),
            Err(e) => {
                self.decode_error(&mut m, &e).await;
                return Ok(());
            }
        };
        for cb in &mut self.callbacks {
            cb(&value, &mut m).await;
        }
        Ok(())
    }

    pub(crate) async fn drain_events(&mut self, timeout: Option<Duration>) -> Result<bool, Error> {
        if !self.has_handlers() {
            return Err(no_handlers());
        }
        let poll = std::future::poll_fn(|cx| self.poll_raw(cx));
        // Only the wait is timed: once an item is taken it is always handled.
        let raw = match timeout {
            Some(t) => tokio::time::timeout(t, poll)
                .await
                .map_err(|_| Error::Timeout {
                    what: "an event",
                    after: t,
                })?,
            None => poll.await,
        };
        match raw {
            Some(raw) => self.dispatch(raw).await.map(|()| true),
            None => Ok(false),
        }
    }
}

pub(crate) fn no_handlers() -> Error {
    Error::InvalidArgument {
        what: "drain_events",
        reason: "no consumer with callbacks or on_message to run".into(),
    }
}
