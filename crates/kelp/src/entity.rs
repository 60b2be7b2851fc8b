//! Exchanges, queues and bindings: the topology a producer publishes into and a consumer
//! reads from (Kombu's `kombu.entity`).
//!
//! Entities are plain values: build them once, declare them on any channel. Defaults follow
//! Kombu: exchanges are `direct` and durable, queues are durable, an exclusive queue is also
//! auto-delete.

use std::time::Duration;

use kelp_amqp::{FieldTable, FieldValue};

use crate::channel::Channel;
use crate::error::Error;
use crate::transport::{ExchangeFlags, QueueDeclared, QueueFlags, RawDelivery};

/// How messages published to an exchange without an explicit delivery mode are stored.
///
/// ```
/// use kelp::{DeliveryMode, Exchange};
/// let ex = Exchange::direct("metrics").delivery_mode(DeliveryMode::Transient);
/// assert_eq!(ex.delivery_mode, Some(DeliveryMode::Transient));
/// assert_eq!(DeliveryMode::Persistent as u8, 2);
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeliveryMode {
    /// Kept in memory only (AMQP delivery mode 1).
    Transient = 1,
    /// Written to disk by a durable queue (AMQP delivery mode 2; Kombu's default).
    Persistent = 2,
}

/// An exchange: where producers publish and queues bind.
///
/// ```
/// use kelp::Exchange;
/// let ex = Exchange::topic("events").durable(false);
/// assert_eq!(ex.kind, "topic");
/// assert!(!ex.durable);
/// assert_eq!(Exchange::default_exchange().name, "");
/// ```
#[derive(Debug, Clone, PartialEq)]
pub struct Exchange {
    /// Its name; `""` is the default exchange, which routes to the queue named by the key.
    pub name: String,
    /// Its type: `direct`, `topic`, `fanout`, `headers`, or a plugin type such as
    /// `x-delayed-message` or `x-consistent-hash`.
    pub kind: String,
    /// Survives a broker restart (default true).
    pub durable: bool,
    /// Deleted when its last binding goes (default false).
    pub auto_delete: bool,
    /// Only reachable through exchange-to-exchange bindings (default false).
    pub internal: bool,
    /// The delivery mode of messages published to it without one.
    pub delivery_mode: Option<DeliveryMode>,
    /// Declare arguments (`alternate-exchange`, `x-delayed-type`, …).
    pub arguments: FieldTable,
    /// Never declare it: it is assumed to exist.
    pub no_declare: bool,
    /// Declare passively: only check that it exists.
    pub passive: bool,
    /// Declared again by a robust connection after a reconnect (default true).
    pub robust: bool,
}

impl Default for Exchange {
    fn default() -> Self {
        Exchange {
            name: String::new(),
            kind: "direct".into(),
            durable: true,
            auto_delete: false,
            internal: false,
            delivery_mode: None,
            arguments: FieldTable::new(),
            no_declare: false,
            passive: false,
            robust: true,
        }
    }
}

impl Exchange {
    /// A durable direct exchange.
    ///
    /// ```
    /// let ex = kelp::Exchange::new("orders");
    /// assert_eq!((ex.name.as_str(), ex.kind.as_str(), ex.durable), ("orders", "direct", true));
    /// ```
    pub fn new(name: impl Into<String>) -> Self {
        Exchange {
            name: name.into(),
            ..Default::default()
        }
    }
    /// The default (nameless) exchange.
    ///
    /// ```
    /// assert!(kelp::Exchange::default_exchange().is_default());
    /// ```
    pub fn default_exchange() -> Self {
        Exchange::default()
    }
    /// A direct exchange.
    ///
    /// ```
    /// assert_eq!(kelp::Exchange::direct("d").kind, "direct");
    /// ```
    pub fn direct(name: impl Into<String>) -> Self {
        Exchange::new(name).kind("direct")
    }
    /// A topic exchange (`*` one word, `#` zero or more).
    ///
    /// ```
    /// assert_eq!(kelp::Exchange::topic("t").kind, "topic");
    /// ```
    pub fn topic(name: impl Into<String>) -> Self {
        Exchange::new(name).kind("topic")
    }
    /// A fanout exchange.
    ///
    /// ```
    /// assert_eq!(kelp::Exchange::fanout("f").kind, "fanout");
    /// ```
    pub fn fanout(name: impl Into<String>) -> Self {
        Exchange::new(name).kind("fanout")
    }
    /// A headers exchange.
    ///
    /// ```
    /// assert_eq!(kelp::Exchange::headers("h").kind, "headers");
    /// ```
    pub fn headers(name: impl Into<String>) -> Self {
        Exchange::new(name).kind("headers")
    }
    /// Set the type.
    ///
    /// ```
    /// let ex = kelp::Exchange::new("delayed").kind("x-delayed-message");
    /// assert_eq!(ex.kind, "x-delayed-message");
    /// ```
    pub fn kind(mut self, kind: impl Into<String>) -> Self {
        self.kind = kind.into();
        self
    }
    /// Set durability.
    ///
    /// ```
    /// assert!(!kelp::Exchange::new("e").durable(false).durable);
    /// ```
    pub fn durable(mut self, durable: bool) -> Self {
        self.durable = durable;
        self
    }
    /// Set auto-delete.
    ///
    /// ```
    /// assert!(kelp::Exchange::new("e").auto_delete(true).auto_delete);
    /// ```
    pub fn auto_delete(mut self, auto_delete: bool) -> Self {
        self.auto_delete = auto_delete;
        self
    }
    /// Set internal.
    ///
    /// ```
    /// assert!(kelp::Exchange::new("e").internal(true).internal);
    /// ```
    pub fn internal(mut self, internal: bool) -> Self {
        self.internal = internal;
        self
    }
    /// Set the default delivery mode of messages published to it.
    ///
    /// ```
    /// use kelp::{DeliveryMode, Exchange};
    /// let ex = Exchange::new("e").delivery_mode(DeliveryMode::Transient);
    /// assert_eq!(ex.delivery_mode, Some(DeliveryMode::Transient));
    /// ```
    pub fn delivery_mode(mut self, mode: DeliveryMode) -> Self {
        self.delivery_mode = Some(mode);
        self
    }
    /// Add a declare argument.
    ///
    /// ```
    /// let ex = kelp::Exchange::new("e").argument("alternate-exchange", "ae");
    /// assert!(ex.arguments.get("alternate-exchange").is_some());
    /// ```
    pub fn argument(mut self, key: &str, value: impl Into<FieldValue>) -> Self {
        self.arguments.insert(key, value.into());
        self
    }
    /// Never declare it.
    ///
    /// ```
    /// assert!(kelp::Exchange::new("e").no_declare(true).no_declare);
    /// ```
    pub fn no_declare(mut self, no_declare: bool) -> Self {
        self.no_declare = no_declare;
        self
    }
    /// Whether a robust connection declares it again after a reconnect (default true; with
    /// `false` it is left out of recovery, and so are its bindings).
    ///
    /// ```
    /// assert!(!kelp::Exchange::new("e").robust(false).robust);
    /// ```
    pub fn robust(mut self, robust: bool) -> Self {
        self.robust = robust;
        self
    }
    /// Declare passively (check it exists).
    ///
    /// ```
    /// assert!(kelp::Exchange::new("e").passive(true).passive);
    /// ```
    pub fn passive(mut self, passive: bool) -> Self {
        self.passive = passive;
        self
    }
    /// True for the default exchange, which is never declared.
    ///
    /// ```
    /// assert!(!kelp::Exchange::new("x").is_default());
    /// ```
    pub fn is_default(&self) -> bool {
        self.name.is_empty()
    }

    /// Declare it on `channel` (the default exchange and `no_declare` ones are skipped).
    ///
    /// ```no_run
    /// # async fn demo() -> Result<(), kelp::Error> {
    /// let conn = kelp::Connection::open("memory://").await?;
    /// let ch = conn.channel().await?;
    /// kelp::Exchange::topic("events").declare(&ch).await?;
    /// # Ok(()) }
    /// ```
    pub async fn declare(&self, channel: &Channel) -> Result<(), Error> {
        if self.is_default() || self.no_declare {
            return Ok(());
        }
        let flags = ExchangeFlags {
            passive: self.passive,
            durable: self.durable,
            auto_delete: self.auto_delete,
            internal: self.internal,
            skip_recovery: !self.robust,
        };
        channel
            .raw()
            .exchange_declare(&self.name, &self.kind, flags, &self.arguments)
            .await
    }

    /// Delete it.
    ///
    /// ```no_run
    /// # async fn demo(ch: &kelp::Channel) -> Result<(), kelp::Error> {
    /// kelp::Exchange::new("old").delete(ch, false).await?;
    /// # Ok(()) }
    /// ```
    pub async fn delete(&self, channel: &Channel, if_unused: bool) -> Result<(), Error> {
        channel.raw().exchange_delete(&self.name, if_unused).await
    }

    /// Bind this exchange to `source`: messages published to `source` matching `routing_key`
    /// also go through this one (exchange-to-exchange binding).
    ///
    /// ```no_run
    /// # async fn demo(ch: &kelp::Channel) -> Result<(), kelp::Error> {
    /// let all = kelp::Exchange::fanout("all");
    /// kelp::Exchange::topic("audit").bind_to(ch, &all.name, "", Default::default()).await?;
    /// # Ok(()) }
    /// ```
    pub async fn bind_to(
        &self,
        channel: &Channel,
        source: &str,
        routing_key: &str,
        arguments: FieldTable,
    ) -> Result<(), Error> {
        channel
            .raw()
            .exchange_bind(&self.name, source, routing_key, &arguments)
            .await
    }

    /// Remove a binding made with [`Exchange::bind_to`].
    ///
    /// ```no_run
    /// # async fn demo(ch: &kelp::Channel) -> Result<(), kelp::Error> {
    /// kelp::Exchange::topic("audit").unbind_from(ch, "all", "", Default::default()).await?;
    /// # Ok(()) }
    /// ```
    pub async fn unbind_from(
        &self,
        channel: &Channel,
        source: &str,
        routing_key: &str,
        arguments: FieldTable,
    ) -> Result<(), Error> {
        channel
            .raw()
            .exchange_unbind(&self.name, source, routing_key, &arguments)
            .await
    }
}

/// One extra binding of a queue (Kombu's `binding`).
///
/// ```
/// use kelp::{Binding, Exchange, Queue};
/// let q = Queue::new("audit")
///     .bind(Binding::new(Exchange::topic("orders"), "order.*"))
///     .bind(Binding::new(Exchange::topic("users"), "user.#"));
/// assert_eq!(q.bindings.len(), 2);
/// ```
#[derive(Debug, Clone, PartialEq)]
pub struct Binding {
    /// The exchange to bind to (declared with the queue unless `no_declare`).
    pub exchange: Exchange,
    /// The binding key.
    pub routing_key: String,
    /// Binding arguments (`x-match` and header values for a headers exchange).
    pub arguments: FieldTable,
}

impl Binding {
    /// A binding to `exchange` with `routing_key`.
    ///
    /// ```
    /// let b = kelp::Binding::new(kelp::Exchange::topic("t"), "a.*");
    /// assert_eq!(b.routing_key, "a.*");
    /// ```
    pub fn new(exchange: Exchange, routing_key: impl Into<String>) -> Self {
        Binding {
            exchange,
            routing_key: routing_key.into(),
            arguments: FieldTable::new(),
        }
    }
    /// With binding arguments.
    ///
    /// ```
    /// use kelp::amqp::FieldTable;
    /// let mut args = FieldTable::new();
    /// args.insert("x-match", "all");
    /// let b = kelp::Binding::new(kelp::Exchange::headers("h"), "").arguments(args);
    /// assert!(b.arguments.get("x-match").is_some());
    /// ```
    pub fn arguments(mut self, arguments: FieldTable) -> Self {
        self.arguments = arguments;
        self
    }
}

/// The queue implementation RabbitMQ should use (`x-queue-type`).
///
/// ```
/// use kelp::{Queue, QueueType};
/// let q = Queue::new("orders").durable(true).queue_type(QueueType::Quorum);
/// assert!(q.queue_arguments.get("x-queue-type").is_some());
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QueueType {
    /// The classic queue.
    Classic,
    /// A replicated Raft queue.
    Quorum,
    /// An append-only log.
    Stream,
}

impl QueueType {
    fn as_str(self) -> &'static str {
        match self {
            QueueType::Classic => "classic",
            QueueType::Quorum => "quorum",
            QueueType::Stream => "stream",
        }
    }
}

/// A queue, optionally bound to an exchange (Kombu's `Queue`).
///
/// ```
/// use std::time::Duration;
/// use kelp::{Exchange, Queue};
/// let q = Queue::new("tasks")
///     .exchange(Exchange::direct("work"))
///     .routing_key("tasks")
///     .max_length(10_000)
///     .message_ttl(Duration::from_secs(60))
///     .max_priority(9);
/// assert_eq!(q.routing_key, "tasks");
/// assert!(q.queue_arguments.get("x-max-length").is_some());
/// ```
#[derive(Debug, Clone, PartialEq)]
pub struct Queue {
    /// Its name; empty asks the broker for a generated one (filled in by [`Queue::declare`]).
    pub name: String,
    /// The exchange it binds to, if any.
    pub exchange: Option<Exchange>,
    /// The binding key used with `exchange`.
    pub routing_key: String,
    /// Survives a broker restart (default true).
    pub durable: bool,
    /// Used by one connection only, deleted when it closes (implies auto-delete).
    pub exclusive: bool,
    /// Deleted when its last consumer goes.
    pub auto_delete: bool,
    /// Declare arguments (`x-max-length`, `x-message-ttl`, …).
    pub queue_arguments: FieldTable,
    /// Arguments of the binding to `exchange`.
    pub binding_arguments: FieldTable,
    /// Arguments of consumers on it (`x-priority`, …).
    pub consumer_arguments: FieldTable,
    /// More bindings besides `exchange`/`routing_key`.
    pub bindings: Vec<Binding>,
    /// Never declare it: it is assumed to exist.
    pub no_declare: bool,
    /// Declare passively: only check that it exists.
    pub passive: bool,
    /// Declared again by a robust connection after a reconnect (default true).
    pub robust: bool,
}

impl Default for Queue {
    fn default() -> Self {
        Queue {
            name: String::new(),
            exchange: None,
            routing_key: String::new(),
            durable: true,
            exclusive: false,
            auto_delete: false,
            queue_arguments: FieldTable::new(),
            binding_arguments: FieldTable::new(),
            consumer_arguments: FieldTable::new(),
            bindings: Vec::new(),
            no_declare: false,
            passive: false,
            robust: true,
        }
    }
}

fn ms(d: Duration) -> FieldValue {
    FieldValue::I64(i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

impl Queue {
    /// A durable queue named `name`, not bound to anything (the default exchange reaches it).
    ///
    /// ```
    /// let q = kelp::Queue::new("hello");
    /// assert!(q.durable && !q.exclusive);
    /// ```
    pub fn new(name: impl Into<String>) -> Self {
        Queue {
            name: name.into(),
            ..Default::default()
        }
    }
    /// A queue the broker names, exclusive to this connection (the usual reply or fanout queue).
    ///
    /// ```
    /// let q = kelp::Queue::server_named();
    /// assert!(q.name.is_empty() && q.exclusive && q.auto_delete);
    /// ```
    pub fn server_named() -> Self {
        Queue::new("").exclusive(true)
    }
    /// Bind to `exchange` (declared with the queue).
    ///
    /// ```
    /// let q = kelp::Queue::new("q").exchange(kelp::Exchange::fanout("f"));
    /// assert_eq!(q.exchange.unwrap().name, "f");
    /// ```
    pub fn exchange(mut self, exchange: impl Into<Exchange>) -> Self {
        let exchange = exchange.into();
        self.exchange = Some(exchange);
        self
    }
    /// The binding key for `exchange`.
    ///
    /// ```
    /// assert_eq!(kelp::Queue::new("q").routing_key("k").routing_key, "k");
    /// ```
    pub fn routing_key(mut self, key: impl Into<String>) -> Self {
        self.routing_key = key.into();
        self
    }
    /// Set durability.
    ///
    /// ```
    /// assert!(!kelp::Queue::new("q").durable(false).durable);
    /// ```
    pub fn durable(mut self, durable: bool) -> Self {
        self.durable = durable;
        self
    }
    /// Make it exclusive (and so auto-delete, as in Kombu).
    ///
    /// ```
    /// let q = kelp::Queue::new("q").exclusive(true);
    /// assert!(q.exclusive && q.auto_delete);
    /// ```
    pub fn exclusive(mut self, exclusive: bool) -> Self {
        self.exclusive = exclusive;
        if exclusive {
            self.auto_delete = true;
        }
        self
    }
    /// Set auto-delete.
    ///
    /// ```
    /// assert!(kelp::Queue::new("q").auto_delete(true).auto_delete);
    /// ```
    pub fn auto_delete(mut self, auto_delete: bool) -> Self {
        self.auto_delete = auto_delete;
        self
    }
    /// Add a declare argument.
    ///
    /// ```
    /// let q = kelp::Queue::new("q").argument("x-overflow", "reject-publish");
    /// assert!(q.queue_arguments.get("x-overflow").is_some());
    /// ```
    pub fn argument(mut self, key: &str, value: impl Into<FieldValue>) -> Self {
        self.queue_arguments.insert(key, value.into());
        self
    }
    /// Add a binding argument.
    ///
    /// ```
    /// let q = kelp::Queue::new("q").binding_argument("x-match", "any");
    /// assert!(q.binding_arguments.get("x-match").is_some());
    /// ```
    pub fn binding_argument(mut self, key: &str, value: impl Into<FieldValue>) -> Self {
        self.binding_arguments.insert(key, value.into());
        self
    }
    /// Add a consumer argument.
    ///
    /// ```
    /// let q = kelp::Queue::new("q").consumer_argument("x-priority", 10i32);
    /// assert!(q.consumer_arguments.get("x-priority").is_some());
    /// ```
    pub fn consumer_argument(mut self, key: &str, value: impl Into<FieldValue>) -> Self {
        self.consumer_arguments.insert(key, value.into());
        self
    }
    /// `x-max-length`: at most `n` ready messages (the oldest are dropped or dead-lettered).
    ///
    /// ```
    /// assert!(kelp::Queue::new("q").max_length(5).queue_arguments.get("x-max-length").is_some());
    /// ```
    pub fn max_length(self, n: u32) -> Self {
        self.argument("x-max-length", FieldValue::I64(i64::from(n)))
    }
    /// `x-max-length-bytes`: at most `n` bytes of ready message bodies.
    ///
    /// ```
    /// let q = kelp::Queue::new("q").max_length_bytes(1 << 20);
    /// assert!(q.queue_arguments.get("x-max-length-bytes").is_some());
    /// ```
    pub fn max_length_bytes(self, n: u64) -> Self {
        self.argument(
            "x-max-length-bytes",
            FieldValue::I64(i64::try_from(n).unwrap_or(i64::MAX)),
        )
    }
    /// `x-message-ttl`: messages expire after `ttl` in the queue.
    ///
    /// ```
    /// let q = kelp::Queue::new("q").message_ttl(std::time::Duration::from_secs(5));
    /// assert!(q.queue_arguments.get("x-message-ttl").is_some());
    /// ```
    pub fn message_ttl(self, ttl: Duration) -> Self {
        self.argument("x-message-ttl", ms(ttl))
    }
    /// `x-expires`: the queue is deleted after `idle` without use.
    ///
    /// ```
    /// let q = kelp::Queue::new("q").expires(std::time::Duration::from_secs(60));
    /// assert!(q.queue_arguments.get("x-expires").is_some());
    /// ```
    pub fn expires(self, idle: Duration) -> Self {
        self.argument("x-expires", ms(idle))
    }
    /// `x-max-priority`: a priority queue with levels `0..=max`.
    ///
    /// ```
    /// assert!(kelp::Queue::new("q").max_priority(9).queue_arguments.get("x-max-priority").is_some());
    /// ```
    pub fn max_priority(self, max: u8) -> Self {
        self.argument("x-max-priority", FieldValue::I32(i32::from(max)))
    }
    /// Dead-letter rejected, expired and dropped messages to `exchange` (with `routing_key`
    /// instead of their own, when given).
    ///
    /// ```
    /// let q = kelp::Queue::new("q").dead_letter("dlx", Some("dead"));
    /// assert!(q.queue_arguments.get("x-dead-letter-exchange").is_some());
    /// assert!(q.queue_arguments.get("x-dead-letter-routing-key").is_some());
    /// ```
    pub fn dead_letter(self, exchange: &str, routing_key: Option<&str>) -> Self {
        let q = self.argument("x-dead-letter-exchange", exchange);
        match routing_key {
            Some(k) => q.argument("x-dead-letter-routing-key", k),
            None => q,
        }
    }
    /// `x-queue-type`.
    ///
    /// ```
    /// use kelp::{Queue, QueueType};
    /// assert!(Queue::new("q").queue_type(QueueType::Quorum).queue_arguments.get("x-queue-type").is_some());
    /// ```
    pub fn queue_type(self, kind: QueueType) -> Self {
        self.argument("x-queue-type", kind.as_str())
    }
    /// Add an extra binding.
    ///
    /// ```
    /// use kelp::{Binding, Exchange, Queue};
    /// let q = Queue::new("q").bind(Binding::new(Exchange::topic("t"), "a.#"));
    /// assert_eq!(q.bindings.len(), 1);
    /// ```
    pub fn bind(mut self, binding: Binding) -> Self {
        self.bindings.push(binding);
        self
    }
    /// Never declare it.
    ///
    /// ```
    /// assert!(kelp::Queue::new("q").no_declare(true).no_declare);
    /// ```
    pub fn no_declare(mut self, no_declare: bool) -> Self {
        self.no_declare = no_declare;
        self
    }
    /// Whether a robust connection declares it again after a reconnect (default true; with
    /// `false` it is left out of recovery, and so are its bindings).
    ///
    /// ```
    /// assert!(!kelp::Queue::new("q").robust(false).robust);
    /// ```
    pub fn robust(mut self, robust: bool) -> Self {
        self.robust = robust;
        self
    }
    /// Declare passively (check it exists).
    ///
    /// ```
    /// assert!(kelp::Queue::new("q").passive(true).passive);
    /// ```
    pub fn passive(mut self, passive: bool) -> Self {
        self.passive = passive;
        self
    }

    /// Declare its exchange(s), itself and its bindings. A server-named queue gets its name
    /// filled in here.
    ///
    /// ```no_run
    /// # async fn demo() -> Result<(), kelp::Error> {
    /// let conn = kelp::Connection::open("memory://").await?;
    /// let ch = conn.channel().await?;
    /// let mut q = kelp::Queue::server_named();
    /// let ok = q.declare(&ch).await?;
    /// assert_eq!(ok.name, q.name);
    /// # Ok(()) }
    /// ```
    pub async fn declare(&mut self, channel: &Channel) -> Result<QueueDeclared, Error> {
        if let Some(ex) = &self.exchange {
            ex.declare(channel).await?;
        }
        for b in &self.bindings {
            b.exchange.declare(channel).await?;
        }
        let declared = if self.no_declare {
            QueueDeclared {
                name: self.name.clone(),
                message_count: 0,
                consumer_count: 0,
            }
        } else {
            let flags = QueueFlags {
                // `amq.*` names are the broker's own (a server-named queue declared before):
                // RabbitMQ refuses to declare them (403), so only check that it still exists.
                passive: self.passive || self.name.starts_with("amq."),
                durable: self.durable,
                exclusive: self.exclusive,
                auto_delete: self.auto_delete,
                skip_recovery: !self.robust,
            };
            channel
                .raw()
                .queue_declare(&self.name, flags, &self.queue_arguments)
                .await?
        };
        self.name.clone_from(&declared.name);
        if !self.no_declare {
            if let Some(ex) = &self.exchange {
                if !ex.is_default() {
                    channel
                        .raw()
                        .queue_bind(
                            &self.name,
                            &ex.name,
                            &self.routing_key,
                            &self.binding_arguments,
                        )
                        .await?;
                }
            }
            for b in &self.bindings {
                channel
                    .raw()
                    .queue_bind(&self.name, &b.exchange.name, &b.routing_key, &b.arguments)
                    .await?;
            }
        }
        Ok(declared)
    }

    /// Bind to `exchange` with `routing_key`.
    ///
    /// ```no_run
    /// # async fn demo(ch: &kelp::Channel) -> Result<(), kelp::Error> {
    /// kelp::Queue::new("q").bind_to(ch, "logs", "error", Default::default()).await?;
    /// # Ok(()) }
    /// ```
    pub async fn bind_to(
        &self,
        channel: &Channel,
        exchange: &str,
        routing_key: &str,
        arguments: FieldTable,
    ) -> Result<(), Error> {
        channel
            .raw()
            .queue_bind(&self.name, exchange, routing_key, &arguments)
            .await
    }

    /// Remove a binding.
    ///
    /// ```no_run
    /// # async fn demo(ch: &kelp::Channel) -> Result<(), kelp::Error> {
    /// kelp::Queue::new("q").unbind_from(ch, "logs", "error", Default::default()).await?;
    /// # Ok(()) }
    /// ```
    pub async fn unbind_from(
        &self,
        channel: &Channel,
        exchange: &str,
        routing_key: &str,
        arguments: FieldTable,
    ) -> Result<(), Error> {
        channel
            .raw()
            .queue_unbind(&self.name, exchange, routing_key, &arguments)
            .await
    }

    /// Remove every ready message; returns how many.
    ///
    /// ```no_run
    /// # async fn demo(ch: &kelp::Channel) -> Result<(), kelp::Error> {
    /// let n = kelp::Queue::new("q").purge(ch).await?;
    /// # Ok(()) }
    /// ```
    pub async fn purge(&self, channel: &Channel) -> Result<u32, Error> {
        channel.raw().queue_purge(&self.name).await
    }

    /// Delete it; returns how many messages went with it.
    ///
    /// ```no_run
    /// # async fn demo(ch: &kelp::Channel) -> Result<(), kelp::Error> {
    /// kelp::Queue::new("q").delete(ch, false, false).await?;
    /// # Ok(()) }
    /// ```
    pub async fn delete(
        &self,
        channel: &Channel,
        if_unused: bool,
        if_empty: bool,
    ) -> Result<u32, Error> {
        channel
            .raw()
            .queue_delete(&self.name, if_unused, if_empty)
            .await
    }

    /// Fetch one message (`basic.get`), or `None` when the queue is empty.
    ///
    /// ```no_run
    /// # async fn demo(ch: &kelp::Channel) -> Result<(), kelp::Error> {
    /// if let Some(mut m) = kelp::Queue::new("q").get(ch, false).await? {
    ///     m.ack().await?;
    /// }
    /// # Ok(()) }
    /// ```
    pub async fn get(
        &self,
        channel: &Channel,
        no_ack: bool,
    ) -> Result<Option<crate::Message>, Error> {
        let d: Option<RawDelivery> = channel.raw().get(&self.name, no_ack).await?;
        Ok(d.map(|d| crate::Message::new(d, channel.clone_raw(), no_ack, channel.codec())))
    }
}

/// Something [`Connection::maybe_declare`](crate::Connection::maybe_declare) and a producer's
/// `declare` list can declare.
///
/// ```
/// use kelp::{Declarable, Exchange, Queue};
/// let things: Vec<Declarable> = vec![Exchange::topic("events").into(), Queue::new("audit").into()];
/// assert!(matches!(things[0], Declarable::Exchange(_)));
/// ```
#[derive(Debug, Clone, PartialEq)]
pub enum Declarable {
    /// An exchange.
    Exchange(Exchange),
    /// A queue (with its exchange and bindings).
    Queue(Queue),
}

impl Declarable {
    /// The key the declare cache remembers it by (empty: never cached, e.g. server-named).
    pub(crate) fn cache_key(&self) -> String {
        match self {
            Declarable::Exchange(e) if e.is_default() => String::new(),
            Declarable::Exchange(e) => format!("exchange\u{0}{}", e.name),
            Declarable::Queue(q) if q.name.is_empty() => String::new(),
            Declarable::Queue(q) => format!("queue\u{0}{}", q.name),
        }
    }

    /// Declare it.
    pub(crate) async fn declare(&self, channel: &Channel) -> Result<(), Error> {
        match self {
            Declarable::Exchange(e) => e.declare(channel).await,
            Declarable::Queue(q) => q.clone().declare(channel).await.map(|_| ()),
        }
    }
}

impl From<Exchange> for Declarable {
    fn from(e: Exchange) -> Self {
        Declarable::Exchange(e)
    }
}
impl From<&Exchange> for Declarable {
    fn from(e: &Exchange) -> Self {
        Declarable::Exchange(e.clone())
    }
}
impl From<Queue> for Declarable {
    fn from(q: Queue) -> Self {
        Declarable::Queue(q)
    }
}
impl From<&Queue> for Declarable {
    fn from(q: &Queue) -> Self {
        Declarable::Queue(q.clone())
    }
}
