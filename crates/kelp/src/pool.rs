//! Pools of connections, channels and producers (Kombu's `kombu.pools`, aio-pika's `Pool`).
//!
//! A [`Pool`] hands out items made by an async factory, at most `max_size` of them at a time.
//! [`Pool::acquire`] waits for a free slot ([`Pool::acquire_timeout`] gives up with
//! [`Error::Timeout`]); the [`PooledItem`] guard derefs to the item and gives it back when
//! dropped. Items are created lazily, reused most-recently-released first, and checked with the
//! pool's health check both when they are released and before they are handed out: a broken item
//! (a closed connection or channel) is dropped and a fresh one is made in its place, so a broken
//! item is never handed out again.
//!
//! [`ConnectionPool`], [`ChannelPool`] and [`ProducerPool`] are pools of kelp's own handles,
//! with the health check built in.
//!
//! ```
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), kelp::Error> {
//! use kelp::pool::ProducerPool;
//! use kelp::{Connection, PublishOptions};
//!
//! let conn = Connection::open("memory://pool-module-doc").await?;
//! let producers = ProducerPool::new(&conn, 4)?;
//! {
//!     let producer = producers.acquire().await?;
//!     producer.publish("hello", PublishOptions::default().routing_key("nowhere")).await?;
//! } // back in the pool here
//! assert_eq!((producers.size(), producers.idle()), (1, 1));
//! # Ok(()) }
//! ```

use std::collections::VecDeque;
use std::fmt;
use std::future::Future;
use std::ops::{Deref, DerefMut};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::channel::Channel;
use crate::connection::{Connection, ConnectionBuilder};
use crate::error::Error;
use crate::producer::Producer;
use crate::transport::BoxFuture;

type Factory<T> = Box<dyn Fn() -> BoxFuture<'static, Result<T, Error>> + Send + Sync>;
type HealthCheck<T> = Box<dyn Fn(&T) -> bool + Send + Sync>;

/// A pool of at most `max_size` items made by an async factory. Cheap to clone: clones share
/// the pool.
///
/// ```
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), kelp::Error> {
/// use std::sync::atomic::{AtomicU32, Ordering};
/// use std::sync::Arc;
/// use kelp::pool::Pool;
///
/// let made = Arc::new(AtomicU32::new(0));
/// let counter = made.clone();
/// let pool = Pool::new(
///     2,
///     move || {
///         let n = counter.fetch_add(1, Ordering::SeqCst);
///         async move { Ok::<_, kelp::Error>(n) }
///     },
///     |_item: &u32| true,
/// )?;
/// let a = pool.acquire().await?;
/// let b = pool.acquire().await?;
/// assert_eq!((*a, *b), (0, 1));
/// assert!(pool.acquire_timeout(std::time::Duration::from_millis(10)).await.is_err()); // full
/// drop(a);
/// assert_eq!(*pool.acquire().await?, 0); // reused, not made again
/// assert_eq!(made.load(Ordering::SeqCst), 2);
/// # Ok(()) }
/// ```
pub struct Pool<T> {
    inner: Arc<Inner<T>>,
}

struct Inner<T> {
    factory: Factory<T>,
    health: HealthCheck<T>,
    max_size: usize,
    /// One permit per item that may be handed out; an acquirer holds one for as long as it
    /// holds the item (or while it makes one).
    permits: Arc<Semaphore>,
    /// Released items, most recently released last. Locked only for a push or a pop, never
    /// across an await.
    idle: Mutex<VecDeque<T>>,
    /// Live items: idle plus handed out.
    size: AtomicUsize,
    created: AtomicU64,
    evicted: AtomicU64,
    closed: AtomicBool,
}

impl<T> Clone for Pool<T> {
    fn clone(&self) -> Self {
        Pool {
            inner: self.inner.clone(),
        }
    }
}

impl<T> fmt::Debug for Pool<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Pool")
            .field("max_size", &self.inner.max_size)
            .field("size", &self.size())
            .field("idle", &self.idle())
            .field("in_use", &self.in_use())
            .field("closed", &self.is_closed())
            .finish_non_exhaustive()
    }
}

impl<T: Send + 'static> Pool<T> {
    /// A pool of at most `max_size` items made by `factory` and checked by `health_check`
    /// (`false`: the item is broken and is dropped instead of handed out or kept). No item is
    /// made until one is acquired. `max_size` must be at least 1.
    ///
    /// ```
    /// # fn demo() -> Result<(), kelp::Error> {
    /// let pool = kelp::pool::Pool::new(8, || async { Ok(Vec::<u8>::new()) }, |_| true)?;
    /// assert_eq!(pool.max_size(), 8);
    /// assert!(kelp::pool::Pool::new(0, || async { Ok(()) }, |_| true).is_err());
    /// # Ok(()) }
    /// ```
    pub fn new<F, Fut, H>(max_size: usize, factory: F, health_check: H) -> Result<Self, Error>
    where
        F: Fn() -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<T, Error>> + Send + 'static,
        H: Fn(&T) -> bool + Send + Sync + 'static,
    {
        if max_size == 0 || max_size > Semaphore::MAX_PERMITS {
            return Err(Error::InvalidArgument {
                what: "pool max_size",
                reason: format!("{max_size} is not between 1 and {}", Semaphore::MAX_PERMITS),
            });
        }
        let factory: Factory<T> = Box::new(move || Box::pin(factory()));
        Ok(Pool {
            inner: Arc::new(Inner {
                factory,
                health: Box::new(health_check),
                max_size,
                permits: Arc::new(Semaphore::new(max_size)),
                idle: Mutex::new(VecDeque::new()),
                size: AtomicUsize::new(0),
                created: AtomicU64::new(0),
                evicted: AtomicU64::new(0),
                closed: AtomicBool::new(false),
            }),
        })
    }

    /// An item: an idle healthy one if there is one, else a new one from the factory. Waits
    /// while `max_size` items are out. A factory error is returned (and frees the slot);
    /// after [`Pool::close`] it is `Error::Closed`.
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), kelp::Error> {
    /// let pool = kelp::pool::Pool::new(1, || async { Ok(String::from("item")) }, |_| true)?;
    /// let mut item = pool.acquire().await?;
    /// item.push('!');
    /// assert_eq!(&*item, "item!");
    /// # Ok(()) }
    /// ```
    pub async fn acquire(&self) -> Result<PooledItem<T>, Error> {
        let closed = || Error::Closed { what: "pool" };
        if self.is_closed() {
            return Err(closed());
        }
        let permit = self
            .inner
            .permits
            .clone()
            .acquire_owned()
            .await
            .map_err(|_| closed())?;
        // Idle items first, most recently released first; broken ones are evicted.
        while let Some(item) = self.pop_idle() {
            if (self.inner.health)(&item) {
                return Ok(self.guard(item, permit));
            }
            self.inner.evict(item);
        }
        // Nothing idle: make one. The permit is held meanwhile (and freed if this fails or
        // is cancelled), so at most `max_size` items ever exist.
        let item = (self.inner.factory)().await?;
        self.inner.size.fetch_add(1, Ordering::AcqRel);
        self.inner.created.fetch_add(1, Ordering::Relaxed);
        Ok(self.guard(item, permit))
    }

    /// [`Pool::acquire`], giving up after `timeout` (waiting for a slot and making the item)
    /// with `Error::Timeout`.
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), kelp::Error> {
    /// use std::time::Duration;
    /// let pool = kelp::pool::Pool::new(1, || async { Ok(()) }, |_| true)?;
    /// let held = pool.acquire().await?;
    /// let err = pool.acquire_timeout(Duration::from_millis(20)).await.unwrap_err();
    /// assert!(matches!(err, kelp::Error::Timeout { .. }));
    /// # Ok(()) }
    /// ```
    pub async fn acquire_timeout(&self, timeout: Duration) -> Result<PooledItem<T>, Error> {
        tokio::time::timeout(timeout, self.acquire())
            .await
            .map_err(|_| Error::Timeout {
                what: "an item from the pool",
                after: timeout,
            })?
    }

    fn pop_idle(&self) -> Option<T> {
        self.inner.idle.lock().ok().and_then(|mut q| q.pop_back())
    }

    fn guard(&self, item: T, permit: OwnedSemaphorePermit) -> PooledItem<T> {
        PooledItem {
            item: Some(item),
            permit: Some(permit),
            pool: self.inner.clone(),
        }
    }
}

impl<T> Pool<T> {
    /// The most items the pool holds at once.
    ///
    /// ```
    /// # fn demo() -> Result<(), kelp::Error> {
    /// let pool = kelp::pool::Pool::new(3, || async { Ok(()) }, |_| true)?;
    /// assert_eq!(pool.max_size(), 3);
    /// # Ok(()) }
    /// ```
    pub fn max_size(&self) -> usize {
        self.inner.max_size
    }

    /// Live items: idle plus in use (never more than [`Pool::max_size`]).
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), kelp::Error> {
    /// let pool = kelp::pool::Pool::new(3, || async { Ok(()) }, |_| true)?;
    /// assert_eq!(pool.size(), 0); // lazily made
    /// let _item = pool.acquire().await?;
    /// assert_eq!(pool.size(), 1);
    /// # Ok(()) }
    /// ```
    pub fn size(&self) -> usize {
        self.inner.size.load(Ordering::Acquire)
    }

    /// Items waiting in the pool.
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), kelp::Error> {
    /// let pool = kelp::pool::Pool::new(3, || async { Ok(()) }, |_| true)?;
    /// drop(pool.acquire().await?);
    /// assert_eq!(pool.idle(), 1);
    /// # Ok(()) }
    /// ```
    pub fn idle(&self) -> usize {
        self.inner.idle.lock().map(|q| q.len()).unwrap_or(0)
    }

    /// Items handed out now.
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), kelp::Error> {
    /// let pool = kelp::pool::Pool::new(3, || async { Ok(()) }, |_| true)?;
    /// let _item = pool.acquire().await?;
    /// assert_eq!(pool.in_use(), 1);
    /// # Ok(()) }
    /// ```
    pub fn in_use(&self) -> usize {
        self.size().saturating_sub(self.idle())
    }

    /// How many items the factory has made so far.
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), kelp::Error> {
    /// let pool = kelp::pool::Pool::new(3, || async { Ok(()) }, |_| true)?;
    /// drop(pool.acquire().await?);
    /// drop(pool.acquire().await?);
    /// assert_eq!(pool.created(), 1);
    /// # Ok(()) }
    /// ```
    pub fn created(&self) -> u64 {
        self.inner.created.load(Ordering::Relaxed)
    }

    /// How many items were dropped as broken (failed health check) or discarded.
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), kelp::Error> {
    /// let pool = kelp::pool::Pool::new(3, || async { Ok(()) }, |_| true)?;
    /// pool.acquire().await?.discard();
    /// assert_eq!((pool.evicted(), pool.size()), (1, 0));
    /// # Ok(()) }
    /// ```
    pub fn evicted(&self) -> u64 {
        self.inner.evicted.load(Ordering::Relaxed)
    }

    /// Drop the idle items (in-use ones are dropped when released) and refuse new acquires
    /// with `Error::Closed` (Kombu's `force_close_all`). To close connections gracefully,
    /// acquire and close them before.
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), kelp::Error> {
    /// let pool = kelp::pool::Pool::new(3, || async { Ok(()) }, |_| true)?;
    /// drop(pool.acquire().await?);
    /// pool.close();
    /// assert_eq!(pool.size(), 0);
    /// assert!(matches!(pool.acquire().await, Err(kelp::Error::Closed { .. })));
    /// # Ok(()) }
    /// ```
    pub fn close(&self) {
        self.inner.closed.store(true, Ordering::Release);
        self.inner.permits.close();
        let drained: Vec<T> = match self.inner.idle.lock() {
            Ok(mut q) => q.drain(..).collect(),
            Err(_) => Vec::new(),
        };
        for item in drained {
            self.inner.size.fetch_sub(1, Ordering::AcqRel);
            drop(item);
        }
    }

    /// True after [`Pool::close`].
    ///
    /// ```
    /// # fn demo() -> Result<(), kelp::Error> {
    /// let pool = kelp::pool::Pool::new(3, || async { Ok(()) }, |_| true)?;
    /// assert!(!pool.is_closed());
    /// # Ok(()) }
    /// ```
    pub fn is_closed(&self) -> bool {
        self.inner.closed.load(Ordering::Acquire)
    }
}

impl<T> Inner<T> {
    fn evict(&self, item: T) {
        self.size.fetch_sub(1, Ordering::AcqRel);
        self.evicted.fetch_add(1, Ordering::Relaxed);
        drop(item);
    }

    fn release(&self, item: T) {
        if self.closed.load(Ordering::Acquire) || !(self.health)(&item) {
            self.evict(item);
        } else {
            match self.idle.lock() {
                Ok(mut q) => q.push_back(item),
                // A poisoned lock: the pool's state is suspect, so drop the item.
                Err(_) => self.evict(item),
            }
        }
    }
}

/// An item on loan from a [`Pool`]: derefs to it, and goes back to the pool when dropped
/// (unless it is broken or [`discarded`](PooledItem::discard)).
///
/// ```
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), kelp::Error> {
/// let pool = kelp::pool::Pool::new(1, || async { Ok(vec![1, 2]) }, |_| true)?;
/// {
///     let mut v = pool.acquire().await?;
///     v.push(3);
/// }
/// assert_eq!(*pool.acquire().await?, vec![1, 2, 3]);
/// # Ok(()) }
/// ```
pub struct PooledItem<T> {
    /// `Some` until dropped or discarded.
    item: Option<T>,
    permit: Option<OwnedSemaphorePermit>,
    pool: Arc<Inner<T>>,
}

impl<T> PooledItem<T> {
    /// Drop the item instead of returning it (it is broken, say); the pool makes a fresh one
    /// when needed.
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), kelp::Error> {
    /// let pool = kelp::pool::Pool::new(1, || async { Ok(()) }, |_| true)?;
    /// pool.acquire().await?.discard();
    /// assert_eq!(pool.size(), 0);
    /// # Ok(()) }
    /// ```
    pub fn discard(mut self) {
        if let Some(item) = self.item.take() {
            self.pool.evict(item);
        }
        // Drop frees the slot.
    }
}

impl<T> Deref for PooledItem<T> {
    type Target = T;
    fn deref(&self) -> &T {
        match &self.item {
            Some(item) => item,
            // `item` is only taken by `discard` and `drop`, which consume the guard.
            None => unreachable!("pooled item used after release"),
        }
    }
}

impl<T> DerefMut for PooledItem<T> {
    fn deref_mut(&mut self) -> &mut T {
        match &mut self.item {
            Some(item) => item,
            None => unreachable!("pooled item used after release"),
        }
    }
}

impl<T> Drop for PooledItem<T> {
    fn drop(&mut self) {
        if let Some(item) = self.item.take() {
            self.pool.release(item);
        }
        // The slot is freed only once the item is back in the idle list (or gone), so the
        // next acquirer finds it.
        drop(self.permit.take());
    }
}

impl<T: fmt::Debug> fmt::Debug for PooledItem<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("PooledItem").field(&self.item).finish()
    }
}

/// What a [`ConnectionPool`] connects with: a URL or a [`ConnectionBuilder`].
///
/// ```
/// use kelp::pool::IntoConnectionBuilder;
/// let b = "memory://".into_connection_builder();
/// ```
pub trait IntoConnectionBuilder {
    /// The builder.
    ///
    /// ```
    /// use kelp::pool::IntoConnectionBuilder;
    /// let b = kelp::Connection::builder().url("memory://").into_connection_builder();
    /// ```
    fn into_connection_builder(self) -> ConnectionBuilder;
}

impl IntoConnectionBuilder for ConnectionBuilder {
    fn into_connection_builder(self) -> ConnectionBuilder {
        self
    }
}

impl IntoConnectionBuilder for &str {
    fn into_connection_builder(self) -> ConnectionBuilder {
        Connection::builder().url(self)
    }
}

impl IntoConnectionBuilder for String {
    fn into_connection_builder(self) -> ConnectionBuilder {
        Connection::builder().url(self)
    }
}

impl IntoConnectionBuilder for &String {
    fn into_connection_builder(self) -> ConnectionBuilder {
        Connection::builder().url(self.as_str())
    }
}

fn connection_ok(conn: &Connection) -> bool {
    !conn.is_closed()
}

fn channel_ok(ch: &Channel) -> bool {
    !ch.is_closed() && !ch.connection().is_closed()
}

/// A pool of connections to one broker (Kombu's `pools.connections[conn]`). Derefs to
/// [`Pool<Connection>`]; a closed connection is evicted and replaced.
///
/// ```
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), kelp::Error> {
/// let pool = kelp::pool::ConnectionPool::new("memory://conn-pool-doc", 2)?;
/// let conn = pool.acquire().await?;
/// let ch = conn.channel().await?;
/// # Ok(()) }
/// ```
#[derive(Debug, Clone)]
pub struct ConnectionPool {
    pool: Pool<Connection>,
}

impl ConnectionPool {
    /// At most `max_size` connections made with `target` (a URL or a
    /// [`ConnectionBuilder`]).
    ///
    /// ```
    /// # fn demo() -> Result<(), kelp::Error> {
    /// use std::time::Duration;
    /// let pool = kelp::pool::ConnectionPool::new(
    ///     kelp::Connection::builder().url("memory://").heartbeat(Duration::from_secs(10)),
    ///     10,
    /// )?;
    /// # Ok(()) }
    /// ```
    pub fn new(target: impl IntoConnectionBuilder, max_size: usize) -> Result<Self, Error> {
        let builder = target.into_connection_builder();
        Self::with_builder_fn(max_size, move |_| builder.clone())
    }

    /// At most `max_size` connections, the `n`th (from 0) made with the builder `make(n)`
    /// returns — to give each its own `connection_name`, say.
    ///
    /// ```
    /// # fn demo() -> Result<(), kelp::Error> {
    /// let pool = kelp::pool::ConnectionPool::with_builder_fn(4, |n| {
    ///     kelp::Connection::builder()
    ///         .url("amqp://guest:guest@localhost//")
    ///         .connection_name(format!("api-{n}"))
    /// })?;
    /// # Ok(()) }
    /// ```
    pub fn with_builder_fn(
        max_size: usize,
        make: impl Fn(u64) -> ConnectionBuilder + Send + Sync + 'static,
    ) -> Result<Self, Error> {
        let seq = AtomicU64::new(0);
        let pool = Pool::new(
            max_size,
            move || make(seq.fetch_add(1, Ordering::Relaxed)).connect(),
            connection_ok,
        )?;
        Ok(ConnectionPool { pool })
    }
}

impl Deref for ConnectionPool {
    type Target = Pool<Connection>;
    fn deref(&self) -> &Pool<Connection> {
        &self.pool
    }
}

/// A pool of channels on one connection. Derefs to [`Pool<Channel>`]; a closed channel (or
/// one whose connection closed) is evicted and replaced.
///
/// ```
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), kelp::Error> {
/// let conn = kelp::Connection::open("memory://channel-pool-doc").await?;
/// let channels = kelp::pool::ChannelPool::new(&conn, 8)?;
/// let ch = channels.acquire().await?;
/// ch.declare_queue(kelp::Queue::new("jobs")).await?;
/// # Ok(()) }
/// ```
#[derive(Debug, Clone)]
pub struct ChannelPool {
    pool: Pool<Channel>,
}

impl ChannelPool {
    /// At most `max_size` channels of `conn`.
    ///
    /// ```
    /// # async fn demo(conn: &kelp::Connection) -> Result<(), kelp::Error> {
    /// let channels = kelp::pool::ChannelPool::new(conn, 8)?;
    /// # Ok(()) }
    /// ```
    pub fn new(conn: &Connection, max_size: usize) -> Result<Self, Error> {
        let conn = conn.clone();
        let pool = Pool::new(
            max_size,
            move || {
                let conn = conn.clone();
                async move { conn.channel().await }
            },
            channel_ok,
        )?;
        Ok(ChannelPool { pool })
    }
}

impl Deref for ChannelPool {
    type Target = Pool<Channel>;
    fn deref(&self) -> &Pool<Channel> {
        &self.pool
    }
}

/// A pool of producers on one connection, each with its own channel (Kombu's
/// `pools.producers[conn]`). Derefs to [`Pool<Producer>`]; a producer whose channel closed is
/// evicted and replaced.
///
/// ```
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), kelp::Error> {
/// use kelp::{Connection, Exchange, PublishOptions};
/// let conn = Connection::open("memory://producer-pool-doc").await?;
/// let producers = kelp::pool::ProducerPool::with_setup(&conn, 4, true, |p| {
///     p.exchange(Exchange::topic("events")).serializer("json")
/// })?;
/// let p = producers.acquire().await?;
/// p.publish_serde(&serde_json::json!({"id": 1}), PublishOptions::default().routing_key("a.b")).await?;
/// # Ok(()) }
/// ```
#[derive(Debug, Clone)]
pub struct ProducerPool {
    pool: Pool<Producer>,
}

impl ProducerPool {
    /// At most `max_size` producers on `conn` (default exchange, `json`), each on a channel
    /// of its own.
    ///
    /// ```
    /// # async fn demo(conn: &kelp::Connection) -> Result<(), kelp::Error> {
    /// let producers = kelp::pool::ProducerPool::new(conn, 4)?;
    /// # Ok(()) }
    /// ```
    pub fn new(conn: &Connection, max_size: usize) -> Result<Self, Error> {
        Self::with_setup(conn, max_size, false, |p| p)
    }

    /// Producers set up by `setup` (exchange, serializer, compression…), their channels in
    /// publisher-confirm mode if `confirm`.
    ///
    /// ```
    /// # async fn demo(conn: &kelp::Connection) -> Result<(), kelp::Error> {
    /// let producers = kelp::pool::ProducerPool::with_setup(conn, 4, true, |p| p.compression("zstd"))?;
    /// # Ok(()) }
    /// ```
    pub fn with_setup(
        conn: &Connection,
        max_size: usize,
        confirm: bool,
        setup: impl Fn(Producer) -> Producer + Send + Sync + 'static,
    ) -> Result<Self, Error> {
        let conn = conn.clone();
        let setup = Arc::new(setup);
        let pool = Pool::new(
            max_size,
            move || {
                let conn = conn.clone();
                let setup = setup.clone();
                async move {
                    let ch = conn.channel().await?;
                    if confirm {
                        ch.confirm_select().await?;
                    }
                    Ok(setup(Producer::new(&ch)))
                }
            },
            |p: &Producer| channel_ok(p.channel()),
        )?;
        Ok(ProducerPool { pool })
    }
}

impl Deref for ProducerPool {
    type Target = Pool<Producer>;
    fn deref(&self) -> &Pool<Producer> {
        &self.pool
    }
}
