//! A worker loop (Kombu's `ConsumerMixin`): run consumers until SIGINT or SIGTERM (or any
//! future you choose), then stop taking new messages, let the handlers in flight finish and
//! settle their messages, and close cleanly.
//!
//! Each message goes to its handler; `Ok` acks it, `Err` rejects it (requeued or not, see
//! [`WorkerBuilder::requeue_on_error`]); a handler may also settle the message itself. Messages
//! the worker had prefetched but not started when it stops are not touched: closing the channel
//! returns them to the queue, and the broker redelivers them (with `redelivered` set). So a
//! graceful stop loses nothing and processes nothing twice without `redelivered`.
//!
//! ```no_run
//! # async fn demo() -> Result<(), kelp::Error> {
//! use kelp::{worker::Worker, Connection, Queue};
//! let conn = Connection::open("amqp://guest:guest@localhost//").await?;
//! let stats = Worker::builder(&conn)
//!     .consume(Queue::new("tasks"), |msg| async move {
//!         println!("got {:?}", msg.body());
//!         Ok::<_, kelp::Error>(())
//!     })
//!     .concurrency(8)
//!     .prefetch_count(16)
//!     .run()
//!     .await?;
//! println!("{} handled", stats.handled);
//! # Ok(()) }
//! ```

use std::fmt::Display;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Semaphore;
use tokio::task::JoinSet;

use crate::connection::Connection;
use crate::consumer::Consumer;
use crate::entity::Queue;
use crate::error::Error;
use crate::message::{Message, Settler};

type BoxFut<T> = Pin<Box<dyn Future<Output = T> + Send>>;
type Handler = Arc<dyn Fn(Message) -> BoxFut<Result<(), String>> + Send + Sync>;
type BatchHandler = Arc<dyn Fn(Vec<Message>) -> BoxFut<Result<(), String>> + Send + Sync>;

enum Route {
    One(Handler),
    Batch {
        handler: BatchHandler,
        size: usize,
        max_wait: Duration,
    },
}

struct Binding {
    queues: Vec<Queue>,
    route: Route,
}

/// What a worker did, returned when it stops.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct WorkerStats {
    /// Messages whose handler finished (`Ok` or `Err`).
    pub handled: u64,
    /// Of those, handlers that returned `Err`.
    pub failed: u64,
}

/// Runs consumers until a shutdown signal (see the [module docs](self)).
///
/// ```no_run
/// # async fn demo(conn: kelp::Connection) -> Result<(), kelp::Error> {
/// let stats = kelp::worker::Worker::builder(&conn)
///     .consume(kelp::Queue::new("jobs"), |msg| async move { Ok::<_, kelp::Error>(()) })
///     .run()
///     .await?;
/// # Ok(()) }
/// ```
#[derive(Debug)]
pub struct Worker;

impl Worker {
    /// Start building a worker on `conn`.
    ///
    /// ```no_run
    /// # fn demo(conn: &kelp::Connection) {
    /// let b = kelp::worker::Worker::builder(conn).concurrency(4);
    /// # }
    /// ```
    pub fn builder(conn: &Connection) -> WorkerBuilder {
        WorkerBuilder {
            conn: conn.clone(),
            bindings: Vec::new(),
            concurrency: 1,
            prefetch_count: None,
            requeue_on_error: false,
            shutdown: None,
            shutdown_grace: Duration::from_secs(30),
        }
    }
}

/// Builds and runs a [`Worker`].
pub struct WorkerBuilder {
    conn: Connection,
    bindings: Vec<Binding>,
    concurrency: usize,
    prefetch_count: Option<u16>,
    requeue_on_error: bool,
    shutdown: Option<BoxFut<()>>,
    shutdown_grace: Duration,
}

impl std::fmt::Debug for WorkerBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WorkerBuilder")
            .field("consumers", &self.bindings.len())
            .field("concurrency", &self.concurrency)
            .field("prefetch_count", &self.prefetch_count)
            .finish_non_exhaustive()
    }
}

impl WorkerBuilder {
    /// Consume `queue`, one message per handler call.
    ///
    /// ```no_run
    /// # fn demo(conn: &kelp::Connection) {
    /// let b = kelp::worker::Worker::builder(conn).consume(kelp::Queue::new("q"), |msg| async move {
    ///     let n: i64 = msg.decode()?;
    ///     Ok::<_, kelp::Error>(())
    /// });
    /// # }
    /// ```
    pub fn consume<F, Fut, E>(self, queue: impl Into<Queue>, handler: F) -> Self
    where
        F: Fn(Message) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<(), E>> + Send + 'static,
        E: Display,
    {
        self.consume_many([queue.into()], handler)
    }

    /// Consume several queues with one handler.
    ///
    /// ```no_run
    /// # fn demo(conn: &kelp::Connection) {
    /// use kelp::Queue;
    /// let b = kelp::worker::Worker::builder(conn)
    ///     .consume_many([Queue::new("a"), Queue::new("b")], |msg| async move { Ok::<_, kelp::Error>(()) });
    /// # }
    /// ```
    pub fn consume_many<F, Fut, E>(
        mut self,
        queues: impl IntoIterator<Item = Queue>,
        handler: F,
    ) -> Self
    where
        F: Fn(Message) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<(), E>> + Send + 'static,
        E: Display,
    {
        let handler: Handler = Arc::new(move |m| {
            let fut = handler(m);
            Box::pin(async move { fut.await.map_err(|e| e.to_string()) })
        });
        self.bindings.push(Binding {
            queues: queues.into_iter().collect(),
            route: Route::One(handler),
        });
        self
    }

    /// Consume `queue` in batches: the handler gets up to `size` messages, or fewer once
    /// `max_wait` has passed since the first of the batch. `Ok` acks them all, `Err` rejects
    /// them all.
    ///
    /// ```no_run
    /// # fn demo(conn: &kelp::Connection) {
    /// use std::time::Duration;
    /// let b = kelp::worker::Worker::builder(conn).consume_batch(
    ///     kelp::Queue::new("events"),
    ///     100,
    ///     Duration::from_millis(50),
    ///     |batch| async move {
    ///         println!("{} events", batch.len());
    ///         Ok::<_, kelp::Error>(())
    ///     },
    /// );
    /// # }
    /// ```
    pub fn consume_batch<F, Fut, E>(
        mut self,
        queue: impl Into<Queue>,
        size: usize,
        max_wait: Duration,
        handler: F,
    ) -> Self
    where
        F: Fn(Vec<Message>) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<(), E>> + Send + 'static,
        E: Display,
    {
        let handler: BatchHandler = Arc::new(move |m| {
            let fut = handler(m);
            Box::pin(async move { fut.await.map_err(|e| e.to_string()) })
        });
        self.bindings.push(Binding {
            queues: vec![queue.into()],
            route: Route::Batch {
                handler,
                size: size.max(1),
                max_wait,
            },
        });
        self
    }

    /// How many handlers may run at once (default 1: one message at a time, in order).
    ///
    /// ```no_run
    /// # fn demo(conn: &kelp::Connection) { let b = kelp::worker::Worker::builder(conn).concurrency(16); }
    /// ```
    pub fn concurrency(mut self, n: usize) -> Self {
        self.concurrency = n.max(1);
        self
    }

    /// Prefetch per consumer (default: twice the concurrency).
    ///
    /// ```no_run
    /// # fn demo(conn: &kelp::Connection) { let b = kelp::worker::Worker::builder(conn).prefetch_count(32); }
    /// ```
    pub fn prefetch_count(mut self, n: u16) -> Self {
        self.prefetch_count = Some(n);
        self
    }

    /// Requeue a message whose handler failed (default false: reject it, so a poison message
    /// does not loop; it goes to the queue's dead-letter exchange if it has one).
    ///
    /// ```no_run
    /// # fn demo(conn: &kelp::Connection) { let b = kelp::worker::Worker::builder(conn).requeue_on_error(true); }
    /// ```
    pub fn requeue_on_error(mut self, on: bool) -> Self {
        self.requeue_on_error = on;
        self
    }

    /// Stop when `signal` resolves instead of on SIGINT/SIGTERM.
    ///
    /// ```no_run
    /// # fn demo(conn: &kelp::Connection) {
    /// let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    /// let b = kelp::worker::Worker::builder(conn).shutdown_on(async move { let _ = rx.await; });
    /// # }
    /// ```
    pub fn shutdown_on(mut self, signal: impl Future<Output = ()> + Send + 'static) -> Self {
        self.shutdown = Some(Box::pin(signal));
        self
    }

    /// How long handlers in flight get to finish after the stop signal (default 30 s); after
    /// that they are abandoned and their messages go back to the queue with the channel.
    ///
    /// ```no_run
    /// # fn demo(conn: &kelp::Connection) {
    /// let b = kelp::worker::Worker::builder(conn).shutdown_grace(std::time::Duration::from_secs(5));
    /// # }
    /// ```
    pub fn shutdown_grace(mut self, d: Duration) -> Self {
        self.shutdown_grace = d;
        self
    }

    /// Run until the shutdown signal, then stop gracefully. Returns what was handled.
    ///
    /// ```no_run
    /// # async fn demo(conn: kelp::Connection) -> Result<(), kelp::Error> {
    /// let stats = kelp::worker::Worker::builder(&conn)
    ///     .consume(kelp::Queue::new("q"), |_m| async { Ok::<_, kelp::Error>(()) })
    ///     .run()
    ///     .await?;
    /// # Ok(()) }
    /// ```
    pub async fn run(self) -> Result<WorkerStats, Error> {
        if self.bindings.is_empty() {
            return Err(Error::InvalidArgument {
                what: "worker",
                reason: "no consumer: call consume() first".into(),
            });
        }
        let mut shutdown = match self.shutdown {
            Some(s) => s,
            None => Box::pin(termination()),
        };
        let channel = self.conn.channel().await?;
        let prefetch = self.prefetch_count.unwrap_or_else(|| {
            u16::try_from(self.concurrency.saturating_mul(2)).unwrap_or(u16::MAX)
        });
        let permits = Arc::new(Semaphore::new(self.concurrency));
        let requeue = self.requeue_on_error;
        let mut consumers = Vec::with_capacity(self.bindings.len());
        for b in self.bindings {
            let mut builder = Consumer::builder(&channel).prefetch_count(match b.route {
                Route::Batch { size, .. } => {
                    u16::try_from(size.max(usize::from(prefetch))).unwrap_or(u16::MAX)
                }
                Route::One(_) => prefetch,
            });
            for q in b.queues {
                builder = builder.queue(q);
            }
            consumers.push((builder.build().await?, b.route));
        }
        let (done_tx, mut done_rx) = tokio::sync::mpsc::unbounded_channel::<bool>();
        let mut pumps = JoinSet::new();
        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        for (consumer, route) in consumers {
            let (permits, done_tx, stop) = (permits.clone(), done_tx.clone(), stop_rx.clone());
            pumps.spawn(pump(consumer, route, permits, done_tx, stop, requeue));
        }
        drop(done_tx);
        let mut stats = WorkerStats::default();
        loop {
            tokio::select! {
                _ = &mut shutdown => break,
                r = done_rx.recv() => match r {
                    Some(ok) => { stats.handled += 1; if !ok { stats.failed += 1; } }
                    // Every consumer ended (cancelled by the broker, connection closed).
                    None => break,
                },
            }
        }
        tracing::info!("worker stopping: no new messages; waiting for handlers in flight");
        stop_tx.send_replace(true);
        // Every pump stops taking messages, then waits for its handlers.
        let grace = self.shutdown_grace;
        let drained = tokio::time::timeout(grace, async {
            while let Some(r) = pumps.join_next().await {
                if let Ok(Err(e)) = r {
                    tracing::warn!(error = %e, "consumer stopped with an error");
                }
            }
        })
        .await;
        if drained.is_err() {
            tracing::warn!(
                ?grace,
                "handlers still running after the grace period; abandoning them"
            );
            pumps.abort_all();
        }
        while let Ok(ok) = done_rx.try_recv() {
            stats.handled += 1;
            if !ok {
                stats.failed += 1;
            }
        }
        // Closing the channel hands prefetched, unstarted messages back to the queue.
        if let Err(e) = channel.close().await {
            tracing::debug!(error = %e, "closing the worker's channel");
        }
        Ok(stats)
    }
}

/// SIGINT or SIGTERM.
async fn termination() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = term.recv() => {}
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot listen for SIGTERM; stopping on SIGINT only");
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

async fn settle(settler: Settler, ok: bool, requeue: bool) {
    if let Err(e) = settler.settle(ok, requeue).await {
        tracing::warn!(error = %e, "could not settle a message");
    }
}

/// Take messages from one consumer and hand them to handlers, until told to stop.
async fn pump(
    mut consumer: Consumer,
    route: Route,
    permits: Arc<Semaphore>,
    done: tokio::sync::mpsc::UnboundedSender<bool>,
    mut stop: tokio::sync::watch::Receiver<bool>,
    requeue: bool,
) -> Result<(), Error> {
    let mut running = JoinSet::new();
    'outer: loop {
        // Capacity first, so no message is taken that cannot start at once.
        let permit = tokio::select! {
            p = permits.clone().acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => break,
            },
            _ = stop.wait_for(|s| *s) => break,
        };
        match &route {
            Route::One(handler) => {
                let msg = tokio::select! {
                    m = consumer.next() => m,
                    _ = stop.wait_for(|s| *s) => break,
                };
                let msg = match msg {
                    Some(Ok(m)) => m,
                    Some(Err(e)) => {
                        tracing::warn!(error = %e, "consumer error");
                        if matches!(e, Error::ConsumerCancelled { .. }) {
                            continue;
                        }
                        break;
                    }
                    None => break,
                };
                let (handler, done) = (handler.clone(), done.clone());
                let mut msg = msg;
                let settler = msg.settler();
                running.spawn(async move {
                    let _permit = permit;
                    let r = handler(msg).await;
                    if let Err(e) = &r {
                        tracing::warn!(error = %e, "handler failed");
                    }
                    settle(settler, r.is_ok(), requeue).await;
                    let _ = done.send(r.is_ok());
                });
            }
            Route::Batch {
                handler,
                size,
                max_wait,
            } => {
                let mut batch = Vec::with_capacity(*size);
                let deadline = tokio::time::sleep(*max_wait);
                tokio::pin!(deadline);
                while batch.len() < *size {
                    tokio::select! {
                        m = consumer.next() => match m {
                            Some(Ok(m)) => {
                                if batch.is_empty() {
                                    deadline.as_mut().reset(tokio::time::Instant::now() + *max_wait);
                                }
                                batch.push(m);
                            }
                            Some(Err(e)) => {
                                tracing::warn!(error = %e, "consumer error");
                                if batch.is_empty() { break 'outer; }
                                break;
                            }
                            None => { if batch.is_empty() { break 'outer; } break; }
                        },
                        _ = &mut deadline, if !batch.is_empty() => break,
                        _ = stop.wait_for(|s| *s) => {
                            // Not started: they go back to the queue with the channel.
                            break 'outer;
                        }
                    }
                }
                let (handler, done) = (handler.clone(), done.clone());
                running.spawn(async move {
                    let _permit = permit;
                    let mut batch: Vec<Message> = batch;
                    let handles: Vec<Settler> = batch.iter_mut().map(Message::settler).collect();
                    let n = batch.len();
                    let r = handler(batch).await;
                    if let Err(e) = &r {
                        tracing::warn!(error = %e, "batch handler failed");
                    }
                    for m in handles {
                        settle(m, r.is_ok(), requeue).await;
                    }
                    for _ in 0..n {
                        let _ = done.send(r.is_ok());
                    }
                });
            }
        }
        // Reap finished handlers without waiting.
        while let Some(r) = running.try_join_next() {
            if let Err(e) = r {
                tracing::warn!(error = %e, "handler task panicked");
            }
        }
    }
    // Stop taking messages from the broker; what it already sent stays unstarted and goes
    // back to the queue when the channel closes.
    if let Err(e) = consumer.cancel().await {
        tracing::debug!(error = %e, "cancelling a consumer on stop");
    }
    while let Some(r) = running.join_next().await {
        if let Err(e) = r {
            tracing::warn!(error = %e, "handler task panicked");
        }
    }
    Ok(())
}
