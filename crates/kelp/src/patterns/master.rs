//! Master/worker task queues, wire-compatible with aio-pika's `Master` (pickle) and
//! `JsonMaster` (JSON).
//!
//! ```no_run
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! use kelp::patterns::{Format, Master, TaskError};
//! use serde_json::json;
//!
//! let conn = kelp::Connection::open("amqp://guest:guest@localhost//").await?;
//! let ch = conn.channel().await?;
//! let master = Master::new(&ch, Format::Json);
//!
//! #[derive(serde::Deserialize)]
//! struct Resize { path: String, width: u32 }
//! let worker = master
//!     .create_worker("resize", |job: Resize| async move {
//!         if job.width == 0 {
//!             return Err(TaskError::Reject { requeue: false }); // dropped (or dead-lettered)
//!         }
//!         println!("resizing {} to {}", job.path, job.width);
//!         Ok(())
//!     })
//!     .await?;
//! master.create_task("resize", &json!({"path": "a.png", "width": 640})).await?;
//! // … later
//! worker.close().await?;
//! # Ok(()) }
//! ```
//!
//! # The wire, as aio-pika 9.5 (`aio_pika/patterns/master.py`) has it
//!
//! * **Queues** are named after the task: `create_worker("resize", f)` declares the queue
//!   `resize` with aio-pika's `declare_queue` defaults — **not durable**, not exclusive, not
//!   auto-delete, no arguments (aio-pika passes `create_worker`'s kwargs to `declare_queue`;
//!   here that is [`WorkerOptions`]) — and consumes it with acks. aio-pika sets no prefetch;
//!   neither does kelp unless [`WorkerOptions::prefetch_count`] says so. The master declares
//!   nothing.
//! * **A task** is published to the default exchange with the task name as routing key,
//!   `mandatory`, `delivery_mode` 2 (persistent), and `content_type`
//!   `application/python-pickle` (`Master`) or `application/json` (`JsonMaster`). The body is
//!   the keyword arguments. aio-pika only logs a returned (unroutable) task; kelp puts the
//!   channel in confirm mode and returns [`Error::Returned`].
//! * **A worker** decodes the body; a falsy payload (`None`, `{}`, `[]`, `0`, `""`, `False`)
//!   counts as `{}` (aio-pika's `kwargs or {}`); anything else that is not a dict is rejected
//!   without requeue. Then it calls the function with the keyword arguments, inside
//!   `message.process(requeue=True, reject_on_redelivered=False, ignore_processed=True)`:
//!   success acks; `RejectMessage(requeue)` rejects, `NackMessage(requeue)` nacks (kelp:
//!   [`TaskError::Reject`], [`TaskError::Nack`]); any other exception rejects with
//!   `requeue` = the master's `requeue` (default true), never requeueing a redelivered
//!   message when `reject_on_redelivered` (kelp: [`TaskError::Failed`], [`MasterOptions`]).
//!
//! Where kelp differs, on purpose: a body that cannot be decoded at all, or keyword
//! arguments that do not fit the handler's type, are rejected **without** requeue (aio-pika's
//! `process()` would requeue them forever); a handler that panics counts as
//! [`TaskError::Failed`]. Handlers run concurrently, one task per message, as aio-pika runs
//! each delivery as a task; bound them with [`WorkerOptions::prefetch_count`].

use std::fmt;
use std::future::Future;
use std::sync::Arc;

use bytes::Bytes;
use futures_util::StreamExt;
use kelp_amqp::{BasicProperties, FieldTable};
use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::Value as Json;
use tokio::sync::OnceCell;
use tokio::task::JoinHandle;

use super::Format;
use crate::channel::Channel;
use crate::entity::{DeliveryMode, Queue};
use crate::error::Error;
use crate::message::Message;
use crate::transport::{BoxFuture, ConsumeSpec, DeliveryStream, PublishOutcome};

/// How a worker's handler settles a task it did not finish (aio-pika's `RejectMessage`,
/// `NackMessage`, or any other exception).
///
/// ```
/// use kelp::patterns::TaskError;
/// let e = TaskError::failed("disk full");
/// assert_eq!(e.to_string(), "task failed: disk full");
/// ```
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum TaskError {
    /// `basic.reject` the message (aio-pika's `RejectMessage(requeue)`).
    #[error("task rejected (requeue: {requeue})")]
    Reject {
        /// Put it back in the queue; otherwise it is dropped or dead-lettered.
        requeue: bool,
    },
    /// `basic.nack` the message (aio-pika's `NackMessage(requeue)`).
    #[error("task nacked (requeue: {requeue})")]
    Nack {
        /// Put it back in the queue; otherwise it is dropped or dead-lettered.
        requeue: bool,
    },
    /// The task failed (any other Python exception): rejected, requeued per
    /// [`MasterOptions::requeue`] and [`MasterOptions::reject_on_redelivered`].
    #[error("task failed: {0}")]
    Failed(String),
}

impl TaskError {
    /// A [`TaskError::Failed`] with `reason`.
    ///
    /// ```
    /// let e = kelp::patterns::TaskError::failed(std::io::Error::other("boom"));
    /// assert!(matches!(e, kelp::patterns::TaskError::Failed(_)));
    /// ```
    pub fn failed(reason: impl fmt::Display) -> Self {
        TaskError::Failed(reason.to_string())
    }
}

/// How a [`Master`] publishes and its workers settle failures (aio-pika's
/// `Master(channel, requeue=True, reject_on_redelivered=False)`).
///
/// ```
/// use kelp::patterns::{Format, MasterOptions};
/// let o = MasterOptions::new(Format::Json).requeue(false);
/// assert!(!o.requeue && !o.reject_on_redelivered && o.confirm);
/// ```
#[derive(Debug, Clone)]
pub struct MasterOptions {
    /// Pickle (aio-pika's `Master`, the default) or JSON (`JsonMaster`).
    pub format: Format,
    /// Requeue a task whose handler failed with [`TaskError::Failed`] (default true).
    pub requeue: bool,
    /// Never requeue a failed task that was already redelivered (default false).
    pub reject_on_redelivered: bool,
    /// Put the channel in confirm mode before the first task, so a task no queue takes is an
    /// [`Error::Returned`] (default true).
    pub confirm: bool,
}

impl Default for MasterOptions {
    fn default() -> Self {
        MasterOptions {
            format: Format::Pickle,
            requeue: true,
            reject_on_redelivered: false,
            confirm: true,
        }
    }
}

impl MasterOptions {
    /// The defaults with `format`.
    ///
    /// ```
    /// let o = kelp::patterns::MasterOptions::new(kelp::patterns::Format::Json);
    /// assert!(o.requeue);
    /// ```
    pub fn new(format: Format) -> Self {
        MasterOptions {
            format,
            ..Default::default()
        }
    }
    /// Set `requeue`.
    ///
    /// ```
    /// assert!(!kelp::patterns::MasterOptions::default().requeue(false).requeue);
    /// ```
    pub fn requeue(mut self, on: bool) -> Self {
        self.requeue = on;
        self
    }
    /// Set `reject_on_redelivered`.
    ///
    /// ```
    /// assert!(kelp::patterns::MasterOptions::default().reject_on_redelivered(true).reject_on_redelivered);
    /// ```
    pub fn reject_on_redelivered(mut self, on: bool) -> Self {
        self.reject_on_redelivered = on;
        self
    }
    /// Set `confirm`.
    ///
    /// ```
    /// assert!(!kelp::patterns::MasterOptions::default().confirm(false).confirm);
    /// ```
    pub fn confirm(mut self, on: bool) -> Self {
        self.confirm = on;
        self
    }
}

/// How [`Master::create_worker_with`] declares and consumes the task queue.
///
/// ```
/// let o = kelp::patterns::WorkerOptions { durable: true, prefetch_count: Some(1), ..Default::default() };
/// assert!(!o.auto_delete);
/// ```
#[derive(Debug, Clone, Default)]
pub struct WorkerOptions {
    /// Declare the queue durable (default false, as aio-pika's `declare_queue`). Every
    /// declarer of a queue must agree: an aio-pika worker on the same queue needs
    /// `create_worker(name, f, durable=True)` too.
    pub durable: bool,
    /// Declare the queue auto-delete (default false).
    pub auto_delete: bool,
    /// Queue arguments (`x-dead-letter-exchange`, `x-max-priority`, …).
    pub arguments: FieldTable,
    /// Set the channel's prefetch before consuming (default: leave it, as aio-pika).
    pub prefetch_count: Option<u16>,
}

type TaskHandler = Arc<dyn Fn(Json) -> BoxFuture<'static, Result<(), TaskError>> + Send + Sync>;

/// Publishes tasks and starts workers (aio-pika's `Master` / `JsonMaster`). Cheap to clone.
///
/// ```no_run
/// # async fn demo(ch: &kelp::Channel) -> Result<(), kelp::Error> {
/// use kelp::patterns::{Format, Master};
/// let master = Master::new(ch, Format::Pickle);
/// master.create_task("send_mail", &serde_json::json!({"to": "a@b.c"})).await?;
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct Master {
    channel: Channel,
    options: MasterOptions,
    confirmed: Arc<OnceCell<()>>,
}

impl fmt::Debug for Master {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Master")
            .field("options", &self.options)
            .finish_non_exhaustive()
    }
}

impl Master {
    /// A master on `channel` serializing with `format`, with the other options at their
    /// defaults.
    ///
    /// ```no_run
    /// # fn demo(ch: &kelp::Channel) {
    /// let master = kelp::patterns::Master::new(ch, kelp::patterns::Format::Json); // JsonMaster
    /// # }
    /// ```
    pub fn new(channel: &Channel, format: Format) -> Self {
        Self::with_options(channel, MasterOptions::new(format))
    }

    /// A master with every option.
    ///
    /// ```no_run
    /// # fn demo(ch: &kelp::Channel) {
    /// use kelp::patterns::{Format, Master, MasterOptions};
    /// let master = Master::with_options(ch, MasterOptions::new(Format::Pickle).requeue(false));
    /// # }
    /// ```
    pub fn with_options(channel: &Channel, options: MasterOptions) -> Self {
        Master {
            channel: channel.clone(),
            options,
            confirmed: Arc::new(OnceCell::new()),
        }
    }

    /// The channel it runs on.
    ///
    /// ```no_run
    /// # fn demo(m: &kelp::patterns::Master) { let ch = m.channel(); }
    /// ```
    pub fn channel(&self) -> &Channel {
        &self.channel
    }

    /// Publish a task for the workers of `name` with keyword arguments `kwargs` (aio-pika's
    /// `await master.create_task(name, kwargs)`): persistent, mandatory, to the default
    /// exchange. A task no queue takes is an [`Error::Returned`]
    /// (with [`MasterOptions::confirm`], the default).
    ///
    /// ```no_run
    /// # async fn demo(m: &kelp::patterns::Master) -> Result<(), kelp::Error> {
    /// #[derive(serde::Serialize)]
    /// struct Mail<'a> { to: &'a str }
    /// m.create_task("send_mail", &Mail { to: "a@b.c" }).await?;
    /// # Ok(()) }
    /// ```
    pub async fn create_task<A: Serialize + ?Sized>(
        &self,
        name: &str,
        kwargs: &A,
    ) -> Result<(), Error> {
        self.create_task_with(name, kwargs, BasicProperties::default())
            .await
    }

    /// [`Master::create_task`] with more message properties (aio-pika's `**message_kwargs`:
    /// priority, expiration, headers, message_id, …). `content_type` and `delivery_mode`
    /// are the master's.
    ///
    /// ```no_run
    /// # async fn demo(m: &kelp::patterns::Master) -> Result<(), kelp::Error> {
    /// let props = kelp::amqp::BasicProperties::default().with_priority(7).with_message_id("m-1");
    /// m.create_task_with("send_mail", &serde_json::json!({"to": "a@b.c"}), props).await?;
    /// # Ok(()) }
    /// ```
    pub async fn create_task_with<A: Serialize + ?Sized>(
        &self,
        name: &str,
        kwargs: &A,
        properties: BasicProperties,
    ) -> Result<(), Error> {
        if self.options.confirm {
            self.confirmed
                .get_or_try_init(|| self.channel.confirm_select())
                .await?;
        }
        let format = self.options.format;
        let body = format.encode(kwargs)?;
        let props = properties
            .with_content_type(format.content_type())
            .with_delivery_mode(DeliveryMode::Persistent as u8);
        let outcome = self
            .channel
            .raw()
            .publish("", name, true, props, body)
            .await?;
        if outcome == PublishOutcome::Nacked {
            return Err(Error::Nacked {
                exchange: String::new(),
                routing_key: name.to_owned(),
            });
        }
        Ok(())
    }

    /// Serve the tasks of `name`: declare the queue `name` and run `handler` on each task's
    /// keyword arguments, decoded into `A` (a struct, a map, or `serde_json::Value`). See the
    /// [module docs](self) for how the outcome settles the message.
    ///
    /// ```no_run
    /// # async fn demo(m: &kelp::patterns::Master) -> Result<(), kelp::Error> {
    /// let worker = m
    ///     .create_worker("send_mail", |kw: serde_json::Value| async move {
    ///         println!("mail to {}", kw["to"]);
    ///         Ok(())
    ///     })
    ///     .await?;
    /// # Ok(()) }
    /// ```
    pub async fn create_worker<A, F, Fut>(&self, name: &str, handler: F) -> Result<Worker, Error>
    where
        A: DeserializeOwned + Send + 'static,
        F: Fn(A) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<(), TaskError>> + Send + 'static,
    {
        self.create_worker_with(name, WorkerOptions::default(), handler)
            .await
    }

    /// [`Master::create_worker`] with queue options.
    ///
    /// ```no_run
    /// # async fn demo(m: &kelp::patterns::Master) -> Result<(), kelp::Error> {
    /// let opts = kelp::patterns::WorkerOptions { prefetch_count: Some(8), ..Default::default() };
    /// let worker = m
    ///     .create_worker_with("thumbs", opts, |_: serde_json::Value| async { Ok(()) })
    ///     .await?;
    /// # Ok(()) }
    /// ```
    pub async fn create_worker_with<A, F, Fut>(
        &self,
        name: &str,
        options: WorkerOptions,
        handler: F,
    ) -> Result<Worker, Error>
    where
        A: DeserializeOwned + Send + 'static,
        F: Fn(A) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<(), TaskError>> + Send + 'static,
    {
        let handler = Arc::new(handler);
        let task_name = name.to_owned();
        let boxed: TaskHandler = Arc::new(move |kwargs: Json| {
            let handler = handler.clone();
            let task_name = task_name.clone();
            Box::pin(async move {
                match serde_json::from_value::<A>(kwargs) {
                    Ok(a) => handler(a).await,
                    Err(e) => {
                        tracing::error!(task = %task_name, error = %e, "task arguments do not fit the worker; rejecting");
                        Err(TaskError::Reject { requeue: false })
                    }
                }
            })
        });
        let mut queue = Queue::new(name)
            .durable(options.durable)
            .auto_delete(options.auto_delete);
        queue.queue_arguments = options.arguments;
        queue.declare(&self.channel).await?;
        if let Some(n) = options.prefetch_count {
            self.channel.qos(n, false).await?;
        }
        let (tag, stream) = self
            .channel
            .raw()
            .consume(name, ConsumeSpec::default())
            .await?;
        tracing::debug!(task = name, consumer_tag = %tag, "worker started");
        let task = tokio::spawn(serve_tasks(
            stream,
            self.channel.clone(),
            self.options.clone(),
            boxed,
            name.to_owned(),
        ));
        Ok(Worker {
            channel: self.channel.clone(),
            queue: name.to_owned(),
            consumer_tag: tag,
            task,
        })
    }
}

/// A running worker (aio-pika's `Worker`): stop it with [`Worker::close`].
///
/// ```no_run
/// # async fn demo(w: kelp::patterns::Worker) -> Result<(), kelp::Error> {
/// println!("worker on {}", w.queue());
/// w.close().await?;
/// # Ok(()) }
/// ```
#[derive(Debug)]
pub struct Worker {
    channel: Channel,
    queue: String,
    consumer_tag: String,
    task: JoinHandle<()>,
}

impl Worker {
    /// The queue it consumes (the task name).
    ///
    /// ```no_run
    /// # fn demo(w: &kelp::patterns::Worker) { assert!(!w.queue().is_empty()); }
    /// ```
    pub fn queue(&self) -> &str {
        &self.queue
    }

    /// Its consumer tag.
    ///
    /// ```no_run
    /// # fn demo(w: &kelp::patterns::Worker) { println!("{}", w.consumer_tag()); }
    /// ```
    pub fn consumer_tag(&self) -> &str {
        &self.consumer_tag
    }

    /// Stop consuming. Tasks already taken still finish and are settled.
    ///
    /// ```no_run
    /// # async fn demo(w: kelp::patterns::Worker) -> Result<(), kelp::Error> {
    /// w.close().await?;
    /// # Ok(()) }
    /// ```
    pub async fn close(self) -> Result<(), Error> {
        self.channel.raw().cancel(&self.consumer_tag).await?;
        // The consumer's stream ends once the cancel is through; let the loop finish.
        let _ = tokio::time::timeout(std::time::Duration::from_secs(5), self.task).await;
        Ok(())
    }
}

/// Python's truthiness for decoded data.
fn falsy(v: &Json) -> bool {
    match v {
        Json::Null => true,
        Json::Bool(b) => !b,
        Json::Number(n) => n.as_f64() == Some(0.0),
        Json::String(s) => s.is_empty(),
        Json::Array(a) => a.is_empty(),
        Json::Object(o) => o.is_empty(),
    }
}

async fn serve_tasks(
    mut stream: DeliveryStream,
    channel: Channel,
    options: MasterOptions,
    handler: TaskHandler,
    name: String,
) {
    while let Some(item) = stream.next().await {
        match item {
            Ok(d) => {
                let msg = Message::new(d, channel.clone_raw(), false, channel.codec());
                tokio::spawn(run_task(
                    msg,
                    options.clone(),
                    handler.clone(),
                    name.clone(),
                ));
            }
            Err(e) => {
                tracing::warn!(task = %name, error = %e, "worker consumer ended");
                break;
            }
        }
    }
}

async fn run_task(mut msg: Message, options: MasterOptions, handler: TaskHandler, name: String) {
    let body: Bytes = msg.body().clone();
    let kwargs: Json = match options.format.decode(&body) {
        Ok(v) => v,
        Err(e) => {
            tracing::error!(task = %name, error = %e, "cannot decode task; rejecting it without requeue");
            msg.reject_log_error(false).await;
            return;
        }
    };
    let kwargs = if falsy(&kwargs) {
        Json::Object(Default::default())
    } else {
        kwargs
    };
    if !kwargs.is_object() {
        tracing::error!(task = %name, kwargs = %kwargs, "bad kwargs (not a dict); rejecting without requeue");
        msg.reject_log_error(false).await;
        return;
    }
    let run = tokio::spawn(async move { handler(kwargs).await });
    let outcome = match run.await {
        Ok(r) => r,
        Err(e) => Err(TaskError::failed(format!("the handler panicked: {e}"))),
    };
    let settled = match outcome {
        Ok(()) => msg.ack().await,
        Err(TaskError::Reject { requeue }) => msg.reject(requeue).await,
        Err(TaskError::Nack { requeue }) => msg.nack(false, requeue).await,
        Err(TaskError::Failed(reason)) => {
            let requeue = options.requeue && !(options.reject_on_redelivered && msg.redelivered());
            tracing::warn!(task = %name, reason = %reason, requeue, "task failed");
            msg.reject(requeue).await
        }
    };
    if let Err(e) = settled {
        tracing::error!(task = %name, error = %e, "could not settle the task");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn python_truthiness() {
        for v in [
            json!(null),
            json!(false),
            json!(0),
            json!(0.0),
            json!(""),
            json!([]),
            json!({}),
        ] {
            assert!(falsy(&v), "{v}");
        }
        for v in [
            json!(true),
            json!(1),
            json!("x"),
            json!([0]),
            json!({"a": 1}),
        ] {
            assert!(!falsy(&v), "{v}");
        }
    }
}
