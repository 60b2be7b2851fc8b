//! Remote procedure calls over AMQP, wire-compatible with aio-pika's `RPC` (pickle) and
//! `JsonRPC` (JSON).
//!
//! ```no_run
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! use kelp::patterns::{CallOptions, Format, RemoteError, Rpc, RpcError, RpcOptions};
//! use serde_json::{json, Value};
//! use std::time::Duration;
//!
//! let conn = kelp::Connection::open("amqp://guest:guest@localhost//").await?;
//! let ch = conn.channel().await?;
//! let rpc = Rpc::create(&ch, RpcOptions::new(Format::Json)).await?;
//!
//! #[derive(serde::Deserialize)]
//! struct Div { a: f64, b: f64 }
//! rpc.register("divide", |d: Div| async move {
//!     if d.b == 0.0 {
//!         return Err(RpcError::remote("ZeroDivisionError", "division by zero"));
//!     }
//!     Ok(d.a / d.b)
//! })
//! .await?;
//!
//! let q: f64 = rpc
//!     .call_typed("divide", &json!({"a": 1, "b": 4}), CallOptions::default())
//!     .await?;
//! assert_eq!(q, 0.25);
//! match rpc.call("divide", &json!({"a": 1, "b": 0})).await {
//!     Err(RpcError::Remote(e)) => assert_eq!(e.kind, "ZeroDivisionError"),
//!     other => panic!("{other:?}"),
//! }
//! let opts = CallOptions::default().expiration(Duration::from_secs(5));
//! let _ = rpc.call_with("divide", &json!({"a": 1, "b": 2}), opts).await?;
//! rpc.close().await?;
//! # Ok(()) }
//! ```
//!
//! # The wire, as aio-pika 9.5 (`aio_pika/patterns/rpc.py`) has it
//!
//! * **Method queues.** `register("m", f)` declares a queue named after the method — `m`, or
//!   `<exchange>::m` when the RPC was created with an `exchange` — with aio-pika's
//!   `declare_queue` defaults (not durable, not exclusive, not auto-delete) and the argument
//!   `x-dead-letter-exchange: rpc.dlx`, and consumes it with acks. With an exchange, that
//!   exchange is declared `direct`, auto-delete (durable per the `durable` option) and the
//!   queue is bound to it with the same `<exchange>::m` key. The caller never declares method
//!   queues.
//! * **The result queue.** Each RPC declares a server-named queue (auto-delete by default,
//!   not exclusive, durable per `durable`) and consumes it `no_ack` and exclusive. It declares
//!   the headers exchange `rpc.dlx` (not durable, auto-delete) and binds the result queue to it
//!   with the arguments `{"From": <result queue>, "x-match": "any"}`.
//! * **A call** is published `mandatory` to the exchange (the default exchange `""` unless
//!   one was given) with the routing key above, and the properties `content_type`
//!   (`application/python-pickle` or `application/json`), `correlation_id` (a random UUID4),
//!   `delivery_mode` 1 (transient) by default, `timestamp`, `type: "call"`,
//!   `reply_to: <result queue>`, `headers: {"From": <result queue>}`, `priority: 5`, and
//!   `expiration` (milliseconds) when asked. The body is the keyword arguments, a dict (`{}`
//!   when none).
//! * **A reply** goes to the default exchange with the routing key `reply_to`, not mandatory,
//!   with `type: "result"` or `type: "error"`, the call's `correlation_id` and
//!   `delivery_mode`, `content_type` and a `timestamp`. The callee acks the call after the
//!   reply is published (rejects it without requeue if the publish failed); a call without
//!   `reply_to` is run and acked, its result dropped.
//! * **Errors.** Pickle: the body is `pickle.dumps(exception)` (`builtins.ValueError('bad')`
//!   is a `GLOBAL`, the `args` tuple and `REDUCE`). aio-pika's caller raises a pickled
//!   exception as is and wraps anything else in `RPCException("Wrapped non-exception
//!   object", payload)`. JSON: `{"error": {"type": exc.__class__.__name__, "message":
//!   repr(exc), "args": exc.args}}` (`json.dumps(default=repr)`), raised by aio-pika's caller
//!   as `JsonRPCError("RPC exception", payload)`.
//! * **Expiration.** A call that waits in the method queue past its `expiration` is
//!   dead-lettered to `rpc.dlx` with its headers intact; the `From` header routes it back to
//!   the caller's result queue, where a message of `type: "call"` means "timed out"
//!   (aio-pika raises `asyncio.TimeoutError`; kelp returns [`RpcError::Expired`]).
//! * **Unknown method.** No queue for the routing key: the mandatory call is returned
//!   (312 NO_ROUTE); aio-pika raises `MessageProcessError("Message has been returned")`,
//!   kelp returns [`RpcError::NoSuchMethod`].
//!
//! # What kelp adds
//!
//! * [`RpcOptions::direct_reply_to`]: replies come through RabbitMQ's direct reply-to
//!   (`reply_to: amq.rabbitmq.reply-to`, a `no_ack` consumer started on the RPC's channel
//!   before the first call), which skips the result queue for answers. The result queue is
//!   still declared and bound to `rpc.dlx`, and calls still carry `From: <result queue>`, so
//!   expired calls still come back. Callees need nothing special (aio-pika's work as is).
//! * [`CallOptions::timeout`]: a local limit on the wait ([`RpcError::Timeout`]), besides the
//!   broker-side `expiration`.
//! * The channel is put in publisher-confirm mode (unless [`RpcOptions::confirm`] is off), so
//!   an unroutable call fails at once from the publish itself.
//! * Handlers run concurrently, one task per call (aio-pika runs each delivery as a task
//!   too); a handler that panics answers with a `RuntimeError`.
//!
//! # Error mapping
//!
//! A handler returns `Result<R, RpcError>`. [`RpcError::Remote`] is sent as is: in JSON as
//! `{"error": {"type": kind, "message": message, "args": args}}`; in pickle as
//! `builtins.<kind>(*args)` when `kind` is a Python built-in exception name (`ValueError`,
//! `KeyError`, `TimeoutError`, …), else as `builtins.RuntimeError("<kind>: <message>")`
//! (then the arguments, if they are more than the message) so that any Python can unpickle it. Any other [`RpcError`] a handler returns (say, from a
//! nested call) is sent as `TimeoutError` (expired / timed out) or `RuntimeError`. Arguments
//! that cannot be decoded into the handler's type are answered with a `TypeError`, as Python
//! does for bad keyword arguments.
//!
//! On the caller's side, a pickled exception is read as data — class name and `args`, nothing
//! imported or run — into [`RemoteError`] (`message` is `str(exc)`: the single argument, or the
//! arguments as JSON); a JSON error keeps its `type`, `message` (aio-pika's is `repr(exc)`) and
//! `args`. A pickled non-exception becomes `RemoteError { kind: "RPCException", message:
//! "Wrapped non-exception object", args: [payload] }`, as in aio-pika.

use std::collections::HashMap;
use std::fmt;
use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use futures_util::StreamExt;
use kelp_amqp::{BasicProperties, FieldTable};
use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::Value as Json;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use super::pyexc;
use super::{now_secs, uuid4, Format};
use crate::channel::Channel;
use crate::entity::{DeliveryMode, Exchange, Queue};
use crate::error::Error;
use crate::message::Message;
use crate::transport::{BoxFuture, ConsumeSpec, DeliveryStream, PublishOutcome};

/// The headers exchange expired calls are dead-lettered to (aio-pika's `RPC.DLX_NAME`).
pub const DLX_NAME: &str = "rpc.dlx";

/// RabbitMQ's direct reply-to pseudo-queue.
pub const DIRECT_REPLY_TO: &str = "amq.rabbitmq.reply-to";

/// How an [`Rpc`] is set up (aio-pika's `RPC.create(channel, **kwargs)`).
///
/// ```
/// use kelp::patterns::{Format, RpcOptions};
/// let o = RpcOptions::new(Format::Json).exchange("billing").direct_reply_to(true);
/// assert_eq!(o.format, Format::Json);
/// assert!(o.auto_delete && !o.durable && o.confirm);
/// ```
#[derive(Debug, Clone)]
pub struct RpcOptions {
    /// Pickle (aio-pika's `RPC`, the default) or JSON (`JsonRPC`).
    pub format: Format,
    /// The exchange calls go through; `""` (the default) is the default exchange, as in
    /// aio-pika. A named one is declared `direct` and auto-delete, and method queues become
    /// `<exchange>::<method>`.
    pub exchange: String,
    /// The result queue is auto-delete (default true).
    pub auto_delete: bool,
    /// The result queue (and a named exchange) are durable (default false).
    pub durable: bool,
    /// Take replies through RabbitMQ's direct reply-to (default false; kelp only).
    pub direct_reply_to: bool,
    /// Put the channel in publisher-confirm mode, so an unroutable call fails from its publish
    /// (default true). Off, returned calls are still caught, from the channel's returns.
    pub confirm: bool,
}

impl Default for RpcOptions {
    fn default() -> Self {
        RpcOptions {
            format: Format::Pickle,
            exchange: String::new(),
            auto_delete: true,
            durable: false,
            direct_reply_to: false,
            confirm: true,
        }
    }
}

impl RpcOptions {
    /// The defaults with `format`.
    ///
    /// ```
    /// let o = kelp::patterns::RpcOptions::new(kelp::patterns::Format::Pickle);
    /// assert!(o.exchange.is_empty());
    /// ```
    pub fn new(format: Format) -> Self {
        RpcOptions {
            format,
            ..Default::default()
        }
    }
    /// Set `exchange`.
    ///
    /// ```
    /// assert_eq!(kelp::patterns::RpcOptions::default().exchange("x").exchange, "x");
    /// ```
    pub fn exchange(mut self, name: impl Into<String>) -> Self {
        self.exchange = name.into();
        self
    }
    /// Set `auto_delete`.
    ///
    /// ```
    /// assert!(!kelp::patterns::RpcOptions::default().auto_delete(false).auto_delete);
    /// ```
    pub fn auto_delete(mut self, on: bool) -> Self {
        self.auto_delete = on;
        self
    }
    /// Set `durable`.
    ///
    /// ```
    /// assert!(kelp::patterns::RpcOptions::default().durable(true).durable);
    /// ```
    pub fn durable(mut self, on: bool) -> Self {
        self.durable = on;
        self
    }
    /// Set `direct_reply_to`.
    ///
    /// ```
    /// assert!(kelp::patterns::RpcOptions::default().direct_reply_to(true).direct_reply_to);
    /// ```
    pub fn direct_reply_to(mut self, on: bool) -> Self {
        self.direct_reply_to = on;
        self
    }
    /// Set `confirm`.
    ///
    /// ```
    /// assert!(!kelp::patterns::RpcOptions::default().confirm(false).confirm);
    /// ```
    pub fn confirm(mut self, on: bool) -> Self {
        self.confirm = on;
        self
    }
}

/// How one call is made (aio-pika's `call(..., expiration=, priority=, delivery_mode=)`).
///
/// ```
/// use std::time::Duration;
/// use kelp::patterns::CallOptions;
/// let o = CallOptions::default().expiration(Duration::from_secs(2)).timeout(Duration::from_secs(5));
/// assert_eq!(o.priority, 5);
/// assert_eq!(o.delivery_mode, kelp::DeliveryMode::Transient);
/// ```
#[derive(Debug, Clone)]
pub struct CallOptions {
    /// The call expires in the method queue after this long and comes back through `rpc.dlx`
    /// as [`RpcError::Expired`] (a call already taken by a callee does not expire).
    pub expiration: Option<Duration>,
    /// Give up waiting after this long with [`RpcError::Timeout`] (local; the call may still
    /// run).
    pub timeout: Option<Duration>,
    /// Message priority (default 5, as aio-pika).
    pub priority: u8,
    /// Delivery mode of the call, which the reply copies (default transient, as aio-pika).
    pub delivery_mode: DeliveryMode,
}

impl Default for CallOptions {
    fn default() -> Self {
        CallOptions {
            expiration: None,
            timeout: None,
            priority: 5,
            delivery_mode: DeliveryMode::Transient,
        }
    }
}

impl CallOptions {
    /// Set `expiration`.
    ///
    /// ```
    /// let o = kelp::patterns::CallOptions::default().expiration(std::time::Duration::from_millis(500));
    /// assert!(o.expiration.is_some());
    /// ```
    pub fn expiration(mut self, after: Duration) -> Self {
        self.expiration = Some(after);
        self
    }
    /// Set `timeout`.
    ///
    /// ```
    /// let o = kelp::patterns::CallOptions::default().timeout(std::time::Duration::from_secs(1));
    /// assert!(o.timeout.is_some());
    /// ```
    pub fn timeout(mut self, after: Duration) -> Self {
        self.timeout = Some(after);
        self
    }
    /// Set `priority`.
    ///
    /// ```
    /// assert_eq!(kelp::patterns::CallOptions::default().priority(9).priority, 9);
    /// ```
    pub fn priority(mut self, priority: u8) -> Self {
        self.priority = priority;
        self
    }
    /// Set `delivery_mode`.
    ///
    /// ```
    /// let o = kelp::patterns::CallOptions::default().delivery_mode(kelp::DeliveryMode::Persistent);
    /// assert_eq!(o.delivery_mode as u8, 2);
    /// ```
    pub fn delivery_mode(mut self, mode: DeliveryMode) -> Self {
        self.delivery_mode = mode;
        self
    }
}

/// How [`Rpc::register_with`] declares and consumes a method queue (aio-pika's
/// `register(name, func, **kwargs)` passes its kwargs to `declare_queue`).
///
/// ```
/// let o = kelp::patterns::RegisterOptions { prefetch_count: Some(10), ..Default::default() };
/// assert!(!o.durable && !o.auto_delete);
/// ```
#[derive(Debug, Clone, Default)]
pub struct RegisterOptions {
    /// Declare the method queue durable (default false, as aio-pika).
    pub durable: bool,
    /// Declare the method queue auto-delete (default false, as aio-pika).
    pub auto_delete: bool,
    /// More queue arguments (`x-dead-letter-exchange: rpc.dlx` is always added).
    pub arguments: FieldTable,
    /// Set the channel's prefetch before consuming (default: leave it, as aio-pika).
    pub prefetch_count: Option<u16>,
}

/// An exception raised by the callee: its Python class name, message and arguments.
///
/// ```
/// use kelp::patterns::RemoteError;
/// let e = RemoteError::new("ValueError", "x must be positive");
/// assert_eq!(e.args, vec![serde_json::json!("x must be positive")]);
/// assert_eq!(e.to_string(), "ValueError: x must be positive");
/// ```
#[derive(Debug, Clone, PartialEq)]
pub struct RemoteError {
    /// The exception's class name (`ValueError`, `KeyError`, …).
    pub kind: String,
    /// What it says: `str(exc)` for pickled exceptions, the JSON payload's `message`
    /// (aio-pika writes `repr(exc)`) for JSON.
    pub message: String,
    /// `exc.args`.
    pub args: Vec<Json>,
}

impl RemoteError {
    /// An error of class `kind` whose single argument is `message` (Python's
    /// `kind(message)`).
    ///
    /// ```
    /// let e = kelp::patterns::RemoteError::new("KeyError", "sku-1");
    /// assert_eq!(e.kind, "KeyError");
    /// ```
    pub fn new(kind: impl Into<String>, message: impl Into<String>) -> Self {
        let message = message.into();
        RemoteError {
            kind: kind.into(),
            args: vec![Json::String(message.clone())],
            message,
        }
    }

    /// Replace the arguments (Python's `kind(*args)`).
    ///
    /// ```
    /// use serde_json::json;
    /// let e = kelp::patterns::RemoteError::new("ValueError", "bad").with_args(vec![json!("bad"), json!(42)]);
    /// assert_eq!(e.args.len(), 2);
    /// ```
    pub fn with_args(mut self, args: Vec<Json>) -> Self {
        self.args = args;
        self
    }
}

impl fmt::Display for RemoteError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.kind, self.message)
    }
}

impl std::error::Error for RemoteError {}

/// How a call can fail. Transport problems are [`RpcError::Kelp`].
///
/// ```
/// use kelp::patterns::RpcError;
/// let e = RpcError::remote("ValueError", "bad");
/// assert!(matches!(e, RpcError::Remote(ref r) if r.kind == "ValueError"));
/// let e: RpcError = kelp::Error::Closed { what: "channel" }.into();
/// assert!(matches!(e, RpcError::Kelp(_)));
/// ```
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum RpcError {
    /// The callee raised (answered with `type: "error"`).
    #[error("remote error: {0}")]
    Remote(RemoteError),
    /// The call waited in the method queue past its expiration and was dead-lettered back
    /// (aio-pika's `asyncio.TimeoutError`); it never ran.
    #[error("the call to `{method}` expired before a callee took it")]
    Expired {
        /// The method called.
        method: String,
    },
    /// No answer within [`CallOptions::timeout`].
    #[error("no answer to `{method}` within {after:?}")]
    Timeout {
        /// The method called.
        method: String,
        /// How long the caller waited.
        after: Duration,
    },
    /// No queue takes calls to this method: the broker returned the call (312 NO_ROUTE).
    #[error("no callee for `{method}`: the broker returned the call as unroutable")]
    NoSuchMethod {
        /// The method called.
        method: String,
    },
    /// The RPC was closed, or its channel or consumer ended, while the call waited.
    #[error("the RPC was closed while the call to `{method}` waited")]
    Closed {
        /// The method called.
        method: String,
    },
    /// The answer had a `type` that is neither `result`, `error` nor `call`.
    #[error("unexpected answer type {kind:?} to `{method}`")]
    UnexpectedReply {
        /// The method called.
        method: String,
        /// The `type` property received.
        kind: String,
    },
    /// Publishing, consuming or (de)serializing failed.
    #[error(transparent)]
    Kelp(#[from] Error),
}

impl RpcError {
    /// A [`RpcError::Remote`] of class `kind` with `message` — what a handler returns to
    /// raise a Python exception at the caller.
    ///
    /// ```
    /// let e = kelp::patterns::RpcError::remote("PermissionError", "not yours");
    /// assert_eq!(e.to_string(), "remote error: PermissionError: not yours");
    /// ```
    pub fn remote(kind: impl Into<String>, message: impl Into<String>) -> Self {
        RpcError::Remote(RemoteError::new(kind, message))
    }

    /// What a handler's error becomes on the wire.
    fn into_remote(self) -> RemoteError {
        match self {
            RpcError::Remote(r) => r,
            e @ (RpcError::Expired { .. } | RpcError::Timeout { .. }) => {
                RemoteError::new("TimeoutError", e.to_string())
            }
            e => RemoteError::new("RuntimeError", e.to_string()),
        }
    }
}

impl From<RemoteError> for RpcError {
    fn from(e: RemoteError) -> Self {
        RpcError::Remote(e)
    }
}

/// What reaches a waiting call.
#[derive(Debug)]
enum Reply {
    Message { kind: Option<String>, body: Bytes },
    Returned,
}

type Pending = Arc<Mutex<HashMap<String, oneshot::Sender<Reply>>>>;
type Handler = Arc<dyn Fn(Bytes) -> BoxFuture<'static, Result<Bytes, RemoteError>> + Send + Sync>;

#[derive(Debug)]
struct Route {
    tag: String,
    task: JoinHandle<()>,
}

struct Inner {
    channel: Channel,
    options: RpcOptions,
    result_queue: String,
    reply_to: String,
    /// Consumers of the result queue (and of direct reply-to).
    reply_tags: Vec<String>,
    reply_tasks: Mutex<Vec<JoinHandle<()>>>,
    pending: Pending,
    routes: Mutex<HashMap<String, Route>>,
    closed: AtomicBool,
}

/// The RPC helper (aio-pika's `RPC` / `JsonRPC`): call methods served anywhere, and serve
/// methods to any caller, kelp or aio-pika. Cheap to clone. Its consumers run in background
/// tasks until [`Rpc::close`] (or the channel closes); dropping the handles does not stop them.
///
/// ```no_run
/// # async fn demo(ch: &kelp::Channel) -> Result<(), kelp::patterns::RpcError> {
/// use kelp::patterns::{Rpc, RpcOptions};
/// let rpc = Rpc::create(ch, RpcOptions::default()).await?; // pickle, like aio-pika's RPC
/// rpc.register("ping", |_: serde_json::Value| async { Ok("pong") }).await?;
/// assert_eq!(rpc.call("ping", &serde_json::json!({})).await?, "pong");
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct Rpc {
    inner: Arc<Inner>,
}

impl fmt::Debug for Rpc {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Rpc")
            .field("format", &self.inner.options.format)
            .field("exchange", &self.inner.options.exchange)
            .field("result_queue", &self.inner.result_queue)
            .field("reply_to", &self.inner.reply_to)
            .finish_non_exhaustive()
    }
}

fn from_binding(result_queue: &str) -> FieldTable {
    let mut args = FieldTable::new();
    args.insert("From", result_queue);
    args.insert("x-match", "any");
    args
}

impl Rpc {
    /// Set up RPC on `channel` (aio-pika's `await RPC.create(channel, **kwargs)`): declare the
    /// exchange if one is named, the result queue, `rpc.dlx` and their binding, and start
    /// consuming answers.
    ///
    /// ```no_run
    /// # async fn demo(ch: &kelp::Channel) -> Result<(), kelp::Error> {
    /// use kelp::patterns::{Format, Rpc, RpcOptions};
    /// let rpc = Rpc::create(ch, RpcOptions::new(Format::Json).direct_reply_to(true)).await?;
    /// # Ok(()) }
    /// ```
    pub async fn create(channel: &Channel, options: RpcOptions) -> Result<Rpc, Error> {
        let ch = channel.clone();
        if options.confirm {
            ch.confirm_select().await?;
        }
        if !options.exchange.is_empty() {
            Exchange::direct(&options.exchange)
                .durable(options.durable)
                .auto_delete(true)
                .declare(&ch)
                .await?;
        }
        let mut queue = Queue::new("")
            .durable(options.durable)
            .auto_delete(options.auto_delete);
        queue.declare(&ch).await?;
        Exchange::headers(DLX_NAME)
            .durable(false)
            .auto_delete(true)
            .declare(&ch)
            .await?;
        queue
            .bind_to(&ch, DLX_NAME, "", from_binding(&queue.name))
            .await?;

        let pending: Pending = Arc::default();
        let mut reply_tags = Vec::new();
        let mut reply_tasks = Vec::new();
        let spec = ConsumeSpec {
            no_ack: true,
            exclusive: true,
            ..Default::default()
        };
        let (tag, stream) = ch.raw().consume(&queue.name, spec).await?;
        reply_tags.push(tag);
        reply_tasks.push(tokio::spawn(dispatch_replies(stream, pending.clone())));
        let reply_to = if options.direct_reply_to {
            let spec = ConsumeSpec {
                no_ack: true,
                ..Default::default()
            };
            let (tag, stream) = ch.raw().consume(DIRECT_REPLY_TO, spec).await?;
            reply_tags.push(tag);
            reply_tasks.push(tokio::spawn(dispatch_replies(stream, pending.clone())));
            DIRECT_REPLY_TO.to_owned()
        } else {
            queue.name.clone()
        };
        if !options.confirm {
            if let Some(mut returns) = ch.raw().take_returns() {
                let pending = pending.clone();
                reply_tasks.push(tokio::spawn(async move {
                    while let Some(r) = returns.recv().await {
                        let Some(id) = r.properties.correlation_id.as_ref() else {
                            tracing::warn!(routing_key = %r.routing_key, "returned message without correlation_id");
                            continue;
                        };
                        let waiter = pending.lock().ok().and_then(|mut p| p.remove(id.as_str()));
                        match waiter {
                            Some(tx) => {
                                let _ = tx.send(Reply::Returned);
                            }
                            None => {
                                tracing::warn!(correlation_id = %id.as_str(), "unknown message was returned")
                            }
                        }
                    }
                }));
            }
        }
        tracing::debug!(result_queue = %queue.name, reply_to = %reply_to, "RPC ready");
        Ok(Rpc {
            inner: Arc::new(Inner {
                channel: ch,
                options,
                result_queue: queue.name,
                reply_to,
                reply_tags,
                reply_tasks: Mutex::new(reply_tasks),
                pending,
                routes: Mutex::new(HashMap::new()),
                closed: AtomicBool::new(false),
            }),
        })
    }

    /// The server-named queue answers (and expired calls) come back to.
    ///
    /// ```no_run
    /// # fn demo(rpc: &kelp::patterns::Rpc) { println!("{}", rpc.result_queue()); }
    /// ```
    pub fn result_queue(&self) -> &str {
        &self.inner.result_queue
    }

    /// The channel the RPC runs on.
    ///
    /// ```no_run
    /// # fn demo(rpc: &kelp::patterns::Rpc) { let ch = rpc.channel(); }
    /// ```
    pub fn channel(&self) -> &Channel {
        &self.inner.channel
    }

    /// The queue name and routing key of `method`: `method`, or `<exchange>::method`.
    ///
    /// ```no_run
    /// # fn demo(rpc: &kelp::patterns::Rpc) { assert_eq!(rpc.routing_key("sum"), "sum"); }
    /// ```
    pub fn routing_key(&self, method: &str) -> String {
        if self.inner.options.exchange.is_empty() {
            method.to_owned()
        } else {
            format!("{}::{method}", self.inner.options.exchange)
        }
    }

    /// Serve `method` with `handler`, which gets the call's keyword arguments decoded into `A`
    /// (a struct, a map, or `serde_json::Value`) and returns the result or an error (see the
    /// [module docs](self) for how errors cross the wire). Declares the method queue.
    ///
    /// ```no_run
    /// # async fn demo(rpc: &kelp::patterns::Rpc) -> Result<(), kelp::Error> {
    /// #[derive(serde::Deserialize)]
    /// struct Add { x: i64, y: i64 }
    /// rpc.register("add", |a: Add| async move { Ok(a.x + a.y) }).await?;
    /// # Ok(()) }
    /// ```
    pub async fn register<A, R, F, Fut>(&self, method: &str, handler: F) -> Result<(), Error>
    where
        A: DeserializeOwned + Send + 'static,
        R: Serialize + Send + 'static,
        F: Fn(A) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<R, RpcError>> + Send + 'static,
    {
        self.register_with(method, RegisterOptions::default(), handler)
            .await
    }

    /// [`Rpc::register`] with queue options.
    ///
    /// ```no_run
    /// # async fn demo(rpc: &kelp::patterns::Rpc) -> Result<(), kelp::Error> {
    /// let opts = kelp::patterns::RegisterOptions { prefetch_count: Some(4), ..Default::default() };
    /// rpc.register_with("echo", opts, |v: serde_json::Value| async move { Ok(v) }).await?;
    /// # Ok(()) }
    /// ```
    pub async fn register_with<A, R, F, Fut>(
        &self,
        method: &str,
        options: RegisterOptions,
        handler: F,
    ) -> Result<(), Error>
    where
        A: DeserializeOwned + Send + 'static,
        R: Serialize + Send + 'static,
        F: Fn(A) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<R, RpcError>> + Send + 'static,
    {
        let inner = &self.inner;
        if inner.closed.load(Ordering::Acquire) {
            return Err(Error::Closed { what: "RPC" });
        }
        let key = self.routing_key(method);
        let taken = inner
            .routes
            .lock()
            .map(|r| r.contains_key(&key))
            .unwrap_or(false);
        if taken {
            return Err(Error::InvalidArgument {
                what: "RPC method",
                reason: format!("`{method}` is already registered on this RPC"),
            });
        }
        let format = inner.options.format;
        let handler = Arc::new(handler);
        let name = method.to_owned();
        let boxed: Handler = Arc::new(move |body: Bytes| {
            let handler = handler.clone();
            let name = name.clone();
            Box::pin(async move {
                let args: A = format.decode(&body).map_err(|e| {
                    RemoteError::new(
                        "TypeError",
                        format!("{name}: cannot decode the keyword arguments: {e}"),
                    )
                })?;
                let result = handler(args).await.map_err(RpcError::into_remote)?;
                format.encode(&result).map_err(|e| {
                    RemoteError::new(
                        "TypeError",
                        format!("{name}: cannot serialize the result: {e}"),
                    )
                })
            })
        });

        let mut queue = Queue::new(&key)
            .durable(options.durable)
            .auto_delete(options.auto_delete);
        queue.queue_arguments = options.arguments;
        queue
            .queue_arguments
            .insert("x-dead-letter-exchange", DLX_NAME);
        let ch = &inner.channel;
        queue.declare(ch).await?;
        if !inner.options.exchange.is_empty() {
            queue
                .bind_to(ch, &inner.options.exchange, &key, FieldTable::new())
                .await?;
        }
        if let Some(n) = options.prefetch_count {
            ch.qos(n, false).await?;
        }
        let (tag, stream) = ch.raw().consume(&key, ConsumeSpec::default()).await?;
        let task = tokio::spawn(serve_calls(
            stream,
            ch.clone(),
            format,
            boxed,
            method.to_owned(),
        ));
        tracing::debug!(method, queue = %key, consumer_tag = %tag, "RPC method registered");
        if let Ok(mut routes) = inner.routes.lock() {
            routes.insert(key, Route { tag, task });
        }
        Ok(())
    }

    /// Stop serving `method` (aio-pika's `unregister`): cancel its consumer. Calls already
    /// taken are still answered; the queue stays.
    ///
    /// ```no_run
    /// # async fn demo(rpc: &kelp::patterns::Rpc) -> Result<(), kelp::Error> {
    /// rpc.unregister("add").await?;
    /// # Ok(()) }
    /// ```
    pub async fn unregister(&self, method: &str) -> Result<(), Error> {
        let key = self.routing_key(method);
        let route = self
            .inner
            .routes
            .lock()
            .ok()
            .and_then(|mut r| r.remove(&key));
        if let Some(route) = route {
            self.inner.channel.raw().cancel(&route.tag).await?;
            drop(route.task);
        }
        Ok(())
    }

    /// Call `method` with keyword arguments `kwargs` (a struct or map; aio-pika's
    /// `await rpc.call("method", kwargs)`) and wait for the result, without a time limit.
    ///
    /// ```no_run
    /// # async fn demo(rpc: &kelp::patterns::Rpc) -> Result<(), kelp::patterns::RpcError> {
    /// let sum = rpc.call("add", &serde_json::json!({"x": 1, "y": 2})).await?;
    /// assert_eq!(sum, 3);
    /// # Ok(()) }
    /// ```
    pub async fn call<A: Serialize + ?Sized>(
        &self,
        method: &str,
        kwargs: &A,
    ) -> Result<Json, RpcError> {
        self.call_typed(method, kwargs, CallOptions::default())
            .await
    }

    /// [`Rpc::call`] with options (expiration, local timeout, priority, delivery mode).
    ///
    /// ```no_run
    /// # async fn demo(rpc: &kelp::patterns::Rpc) -> Result<(), kelp::patterns::RpcError> {
    /// use std::time::Duration;
    /// let opts = kelp::patterns::CallOptions::default().expiration(Duration::from_secs(1));
    /// match rpc.call_with("add", &serde_json::json!({"x": 1, "y": 2}), opts).await {
    ///     Err(kelp::patterns::RpcError::Expired { .. }) => println!("nobody took it in time"),
    ///     other => println!("{other:?}"),
    /// }
    /// # Ok(()) }
    /// ```
    pub async fn call_with<A: Serialize + ?Sized>(
        &self,
        method: &str,
        kwargs: &A,
        options: CallOptions,
    ) -> Result<Json, RpcError> {
        self.call_typed(method, kwargs, options).await
    }

    /// Call `method` and decode the result into `R`.
    ///
    /// ```no_run
    /// # async fn demo(rpc: &kelp::patterns::Rpc) -> Result<(), kelp::patterns::RpcError> {
    /// #[derive(serde::Serialize)]
    /// struct Add { x: i64, y: i64 }
    /// let sum: i64 = rpc.call_typed("add", &Add { x: 1, y: 2 }, Default::default()).await?;
    /// # Ok(()) }
    /// ```
    pub async fn call_typed<A: Serialize + ?Sized, R: DeserializeOwned>(
        &self,
        method: &str,
        kwargs: &A,
        options: CallOptions,
    ) -> Result<R, RpcError> {
        let body = self.call_raw(method, kwargs, options).await?;
        Ok(self.inner.options.format.decode(&body)?)
    }

    async fn call_raw<A: Serialize + ?Sized>(
        &self,
        method: &str,
        kwargs: &A,
        options: CallOptions,
    ) -> Result<Bytes, RpcError> {
        let inner = &self.inner;
        let closed = || RpcError::Closed {
            method: method.to_owned(),
        };
        if inner.closed.load(Ordering::Acquire) {
            return Err(closed());
        }
        let format = inner.options.format;
        let body = format.encode(kwargs)?;
        let id = uuid4();
        let (tx, rx) = oneshot::channel();
        if let Ok(mut p) = inner.pending.lock() {
            p.insert(id.clone(), tx);
        }
        let _guard = PendingGuard {
            pending: &inner.pending,
            id: &id,
        };
        let mut headers = FieldTable::new();
        headers.insert("From", inner.result_queue.as_str());
        let mut props = BasicProperties::default()
            .with_content_type(format.content_type())
            .with_correlation_id(id.as_str())
            .with_delivery_mode(options.delivery_mode as u8)
            .with_timestamp(now_secs())
            .with_kind("call")
            .with_reply_to(inner.reply_to.as_str())
            .with_headers(headers)
            .with_priority(options.priority);
        if let Some(e) = options.expiration {
            props = props.with_expiration(e.as_millis().to_string());
        }
        let key = self.routing_key(method);
        tracing::debug!(method, routing_key = %key, correlation_id = %id, "RPC call");
        let published = inner
            .channel
            .raw()
            .publish(&inner.options.exchange, &key, true, props, body)
            .await;
        match published {
            Ok(PublishOutcome::Nacked) => {
                return Err(RpcError::Kelp(Error::Nacked {
                    exchange: inner.options.exchange.clone(),
                    routing_key: key,
                }))
            }
            Ok(_) => {}
            Err(Error::Returned { .. }) => {
                return Err(RpcError::NoSuchMethod {
                    method: method.to_owned(),
                })
            }
            Err(e) => return Err(e.into()),
        }
        let reply = match options.timeout {
            Some(after) => {
                tokio::time::timeout(after, rx)
                    .await
                    .map_err(|_| RpcError::Timeout {
                        method: method.to_owned(),
                        after,
                    })?
            }
            None => rx.await,
        };
        match reply.map_err(|_| closed())? {
            Reply::Returned => Err(RpcError::NoSuchMethod {
                method: method.to_owned(),
            }),
            Reply::Message { kind, body } => match kind.as_deref() {
                Some("result") => Ok(body),
                Some("error") => Err(RpcError::Remote(decode_remote(format, &body))),
                Some("call") => Err(RpcError::Expired {
                    method: method.to_owned(),
                }),
                other => Err(RpcError::UnexpectedReply {
                    method: method.to_owned(),
                    kind: other.unwrap_or_default().to_owned(),
                }),
            },
        }
    }

    /// Stop everything (aio-pika's `close`): cancel the method consumers and the answer
    /// consumers, fail waiting calls with [`RpcError::Closed`], unbind and delete the result
    /// queue. Method queues stay. The channel stays open.
    ///
    /// ```no_run
    /// # async fn demo(rpc: kelp::patterns::Rpc) -> Result<(), kelp::Error> {
    /// rpc.close().await?;
    /// # Ok(()) }
    /// ```
    pub async fn close(&self) -> Result<(), Error> {
        let inner = &self.inner;
        if inner.closed.swap(true, Ordering::AcqRel) {
            return Ok(());
        }
        let raw = inner.channel.raw();
        let mut first_err = None;
        // A queue already gone (auto-delete once its consumer went, or the broker's doing)
        // is what closing wants anyway.
        let mut keep = |r: Result<_, Error>| {
            if let Err(e) = r {
                if e.reply_code() != Some(404) {
                    first_err.get_or_insert(e);
                }
            }
        };
        // Unbind first: cancelling the consumer of an auto-delete result queue deletes it.
        let queue = Queue::new(&inner.result_queue);
        keep(
            queue
                .unbind_from(
                    &inner.channel,
                    DLX_NAME,
                    "",
                    from_binding(&inner.result_queue),
                )
                .await,
        );
        let routes: Vec<Route> = inner
            .routes
            .lock()
            .map(|mut r| r.drain().map(|(_, v)| v).collect())
            .unwrap_or_default();
        for r in routes {
            keep(raw.cancel(&r.tag).await);
        }
        for tag in &inner.reply_tags {
            keep(raw.cancel(tag).await);
        }
        if let Ok(mut tasks) = inner.reply_tasks.lock() {
            for t in tasks.drain(..) {
                t.abort();
            }
        }
        if let Ok(mut p) = inner.pending.lock() {
            p.clear();
        }
        keep(queue.delete(&inner.channel, false, false).await.map(|_| ()));
        match first_err {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }
}

/// Removes a call's waiter when the call ends, however it ends (dropped futures included).
struct PendingGuard<'a> {
    pending: &'a Pending,
    id: &'a str,
}

impl Drop for PendingGuard<'_> {
    fn drop(&mut self) {
        if let Ok(mut p) = self.pending.lock() {
            p.remove(self.id);
        }
    }
}

/// Route answers (and expired calls) to the calls waiting for them.
async fn dispatch_replies(mut stream: DeliveryStream, pending: Pending) {
    while let Some(item) = stream.next().await {
        let d = match item {
            Ok(d) => d,
            Err(e) => {
                tracing::warn!(error = %e, "RPC answer consumer ended");
                break;
            }
        };
        let Some(id) = d.properties.correlation_id.as_ref() else {
            tracing::warn!(routing_key = %d.routing_key.as_str(), "RPC answer without correlation_id");
            continue;
        };
        let waiter = pending.lock().ok().and_then(|mut p| p.remove(id.as_str()));
        match waiter {
            Some(tx) => {
                let kind = d.properties.kind.as_ref().map(|k| k.as_str().to_owned());
                let _ = tx.send(Reply::Message { kind, body: d.body });
            }
            None => tracing::warn!(correlation_id = %id.as_str(), "RPC answer for no waiting call"),
        }
    }
    // The answers stopped: nothing waiting can be answered any more.
    if let Ok(mut p) = pending.lock() {
        p.clear();
    }
}

/// Take calls off a method queue, each handled in its own task.
async fn serve_calls(
    mut stream: DeliveryStream,
    channel: Channel,
    format: Format,
    handler: Handler,
    method: String,
) {
    while let Some(item) = stream.next().await {
        match item {
            Ok(d) => {
                let msg = Message::new(d, channel.clone_raw(), false, channel.codec());
                tokio::spawn(answer(
                    msg,
                    channel.clone(),
                    format,
                    handler.clone(),
                    method.clone(),
                ));
            }
            Err(e) => {
                tracing::warn!(method = %method, error = %e, "RPC method consumer ended");
                break;
            }
        }
    }
}

async fn answer(
    mut msg: Message,
    channel: Channel,
    format: Format,
    handler: Handler,
    method: String,
) {
    let body = msg.body().clone();
    let run = tokio::spawn(async move { handler(body).await });
    let outcome = match run.await {
        Ok(r) => r,
        Err(e) => Err(RemoteError::new(
            "RuntimeError",
            format!("the handler of `{method}` panicked: {e}"),
        )),
    };
    let (kind, body) = match outcome {
        Ok(b) => ("result", b),
        Err(e) => {
            tracing::debug!(method = %method, error = %e, "RPC handler failed");
            ("error", encode_remote(format, &e))
        }
    };
    let Some(reply_to) = msg.reply_to().map(str::to_owned) else {
        tracing::info!(method = %method, "RPC call without reply_to: its result is lost");
        msg.ack_log_error().await;
        return;
    };
    let mut props = BasicProperties::default()
        .with_content_type(format.content_type())
        .with_timestamp(now_secs())
        .with_kind(kind);
    if let Some(id) = msg.correlation_id() {
        props = props.with_correlation_id(id);
    }
    if let Some(mode) = msg.properties().delivery_mode {
        props = props.with_delivery_mode(mode);
    }
    match channel
        .raw()
        .publish("", &reply_to, false, props, body)
        .await
    {
        Ok(_) => msg.ack_log_error().await,
        Err(e) => {
            tracing::error!(method = %method, reply_to = %reply_to, error = %e, "could not send the RPC answer");
            msg.reject_log_error(false).await;
        }
    }
}

/// `str(exc)` from `exc.args`.
fn str_of(args: &[Json]) -> String {
    match args {
        [] => String::new(),
        [Json::String(s)] => s.clone(),
        [one] => one.to_string(),
        many => Json::Array(many.to_vec()).to_string(),
    }
}

/// An error answer's body, as aio-pika's caller reads it.
fn encode_remote(format: Format, e: &RemoteError) -> Bytes {
    match format {
        Format::Json => {
            let payload = serde_json::json!({
                "error": {"type": e.kind, "message": e.message, "args": e.args}
            });
            Bytes::from(payload.to_string())
        }
        Format::Pickle => {
            if pyexc::BUILTIN_EXCEPTIONS.contains(&e.kind.as_str()) {
                Bytes::from(pyexc::write_exception(&e.kind, &e.args))
            } else {
                // `RuntimeError("<kind>: <message>")`, then any arguments beyond the message.
                let mut args = vec![Json::String(format!("{}: {}", e.kind, e.message))];
                if e.args != [Json::String(e.message.clone())] {
                    args.extend(e.args.iter().cloned());
                }
                Bytes::from(pyexc::write_exception("RuntimeError", &args))
            }
        }
    }
}

/// An error answer's body, as aio-pika's callee writes it.
fn decode_remote(format: Format, body: &[u8]) -> RemoteError {
    match format {
        Format::Json => match serde_json::from_slice::<Json>(body) {
            Ok(v) => match v.get("error").filter(|e| e.is_object()) {
                Some(e) => {
                    let args = match e.get("args") {
                        Some(Json::Array(a)) => a.clone(),
                        Some(Json::Null) | None => Vec::new(),
                        Some(other) => vec![other.clone()],
                    };
                    let message = match e.get("message") {
                        Some(Json::String(s)) => s.clone(),
                        Some(other) => other.to_string(),
                        None => str_of(&args),
                    };
                    RemoteError {
                        kind: e
                            .get("type")
                            .and_then(Json::as_str)
                            .unwrap_or("JsonRPCError")
                            .to_owned(),
                        message,
                        args,
                    }
                }
                None => RemoteError {
                    kind: "JsonRPCError".into(),
                    message: "RPC exception".into(),
                    args: vec![v],
                },
            },
            Err(e) => RemoteError {
                kind: "JsonRPCError".into(),
                message: format!("undecodable error answer: {e}"),
                args: Vec::new(),
            },
        },
        Format::Pickle => match pyexc::read_exception(body) {
            Ok(Some(exc)) => RemoteError {
                kind: exc.name,
                message: str_of(&exc.args),
                args: exc.args,
            },
            Ok(None) => match Format::Pickle.decode::<Json>(body) {
                Ok(payload) => RemoteError {
                    kind: "RPCException".into(),
                    message: "Wrapped non-exception object".into(),
                    args: vec![payload],
                },
                Err(e) => RemoteError {
                    kind: "RPCException".into(),
                    message: format!("undecodable error answer: {e}"),
                    args: Vec::new(),
                },
            },
            Err(e) => RemoteError {
                kind: "RPCException".into(),
                message: format!("undecodable pickled exception: {e}"),
                args: Vec::new(),
            },
        },
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use serde_json::json;

    #[test]
    fn errors_round_trip_in_both_formats() {
        let e = RemoteError::new("ValueError", "bad input")
            .with_args(vec![json!("bad input"), json!(42)]);
        for f in [Format::Json, Format::Pickle] {
            let back = decode_remote(f, &encode_remote(f, &e));
            assert_eq!(back.kind, "ValueError");
            assert_eq!(back.args, e.args);
        }
        assert_eq!(
            decode_remote(Format::Pickle, &encode_remote(Format::Pickle, &e)).message,
            "[\"bad input\",42]"
        );
    }

    #[test]
    fn unknown_kinds_travel_as_runtime_error_in_pickle() {
        let e = RemoteError::new("OrderNotFound", "sku-1");
        let back = decode_remote(Format::Pickle, &encode_remote(Format::Pickle, &e));
        assert_eq!(back.kind, "RuntimeError");
        assert_eq!(back.message, "OrderNotFound: sku-1");
        let back = decode_remote(Format::Json, &encode_remote(Format::Json, &e));
        assert_eq!(back, e);
    }

    #[test]
    fn aio_pika_json_error_and_non_exceptions() {
        let body = br#"{"error": {"type": "KeyError", "message": "KeyError('k')", "args": ["k"]}}"#;
        let e = decode_remote(Format::Json, body);
        assert_eq!(
            (e.kind.as_str(), e.message.as_str()),
            ("KeyError", "KeyError('k')")
        );
        let e = decode_remote(Format::Json, b"[1, 2]");
        assert_eq!(e.kind, "JsonRPCError");
        // pickle.dumps("oops", protocol=2): not an exception.
        let e = decode_remote(Format::Pickle, b"\x80\x02X\x04\x00\x00\x00oopsq\x00.");
        assert_eq!(
            (e.kind.as_str(), e.args.clone()),
            ("RPCException", vec![json!("oops")])
        );
    }
}
