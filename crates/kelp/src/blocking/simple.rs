//! The blocking `kombu.simple`.

use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;

use super::{Message, Shared};
use crate::entity::Queue;
use crate::error::Error;
use crate::producer::PublishOptions;

/// A durable work queue with a Python `Queue`-like interface (Kombu's `SimpleQueue`), from
/// [`super::Connection::simple_queue`]. Messages from `get` must be acked.
///
/// ```
/// # fn main() -> Result<(), kelp::Error> {
/// use std::time::Duration;
/// let conn = kelp::blocking::Connection::open("memory://blocking-simple-doc")?;
/// let mut q = conn.simple_queue("jobs")?;
/// q.put(&serde_json::json!({"n": 1}))?;
/// assert_eq!(q.qsize()?, 1);
/// let mut msg = q.get(true, Some(Duration::from_secs(1)))?;
/// assert_eq!(msg.decode::<serde_json::Value>()?["n"], 1);
/// msg.ack()?;
/// assert!(matches!(q.get_nowait(), Err(kelp::Error::QueueEmpty { .. })));
/// q.close()?;
/// # Ok(()) }
/// ```
#[derive(Debug)]
pub struct SimpleQueue {
    inner: crate::SimpleQueue,
    shared: Arc<Shared>,
}

impl SimpleQueue {
    pub(super) fn new(inner: crate::SimpleQueue, shared: Arc<Shared>) -> Self {
        SimpleQueue { inner, shared }
    }

    /// The queue it reads.
    ///
    /// ```
    /// # fn main() -> Result<(), kelp::Error> {
    /// let conn = kelp::blocking::Connection::open("memory://simple-queue-name-doc")?;
    /// assert_eq!(conn.simple_queue("jobs")?.queue().name, "jobs");
    /// # Ok(()) }
    /// ```
    pub fn queue(&self) -> &Queue {
        self.inner.queue()
    }

    /// Serialize and publish `value`.
    ///
    /// ```
    /// # fn main() -> Result<(), kelp::Error> {
    /// let conn = kelp::blocking::Connection::open("memory://simple-put-doc")?;
    /// conn.simple_queue("jobs")?.put(&serde_json::json!({"job": 1}))?;
    /// # Ok(()) }
    /// ```
    pub fn put<T: Serialize + ?Sized>(&self, value: &T) -> Result<(), Error> {
        self.shared.run(self.inner.put(value))
    }

    /// Publish with explicit options (headers, priority, serializer, …).
    ///
    /// ```
    /// # fn main() -> Result<(), kelp::Error> {
    /// let conn = kelp::blocking::Connection::open("memory://simple-put-with-doc")?;
    /// let q = conn.simple_queue("jobs")?;
    /// q.put_with(&"urgent", kelp::PublishOptions::default().header("level", "high"))?;
    /// # Ok(()) }
    /// ```
    pub fn put_with<T: Serialize + ?Sized>(
        &self,
        value: &T,
        options: PublishOptions,
    ) -> Result<(), Error> {
        self.shared.run(self.inner.put_with(value, options))
    }

    /// The next message (Kombu's `get(block, timeout)`): with `block`, wait up to `timeout`
    /// (`None`: as long as it takes); without, only take a message that is ready now. Nothing
    /// is [`Error::QueueEmpty`], Kombu's `Empty`.
    ///
    /// ```
    /// # fn main() -> Result<(), kelp::Error> {
    /// use std::time::{Duration, Instant};
    /// let conn = kelp::blocking::Connection::open("memory://simple-get-doc")?;
    /// let mut q = conn.simple_queue("jobs")?;
    /// let started = Instant::now();
    /// assert!(matches!(q.get(true, Some(Duration::from_millis(50))), Err(kelp::Error::QueueEmpty { .. })));
    /// assert!(started.elapsed() >= Duration::from_millis(50));
    /// # Ok(()) }
    /// ```
    pub fn get(&mut self, block: bool, timeout: Option<Duration>) -> Result<Message, Error> {
        if !block {
            return self.get_nowait();
        }
        let m = self.shared.run(self.inner.get(timeout))?;
        Ok(Message::new(m, self.shared.clone()))
    }

    /// A message if one is ready now, else [`Error::QueueEmpty`].
    ///
    /// ```
    /// # fn main() -> Result<(), kelp::Error> {
    /// let conn = kelp::blocking::Connection::open("memory://simple-nowait-doc")?;
    /// let mut q = conn.simple_queue("jobs")?;
    /// match q.get_nowait() {
    ///     Ok(mut m) => m.ack()?,
    ///     Err(kelp::Error::QueueEmpty { .. }) => println!("nothing yet"),
    ///     Err(e) => return Err(e),
    /// }
    /// # Ok(()) }
    /// ```
    pub fn get_nowait(&mut self) -> Result<Message, Error> {
        let m = self.shared.run(self.inner.get_nowait())?;
        Ok(Message::new(m, self.shared.clone()))
    }

    /// Messages ready in the queue (not counting those delivered and unacked).
    ///
    /// ```
    /// # fn main() -> Result<(), kelp::Error> {
    /// let conn = kelp::blocking::Connection::open("memory://simple-qsize-doc")?;
    /// let q = conn.simple_queue("jobs")?;
    /// q.put(&1)?;
    /// assert_eq!(q.qsize()?, 1);
    /// # Ok(()) }
    /// ```
    pub fn qsize(&self) -> Result<u32, Error> {
        self.shared.run(self.inner.qsize())
    }

    /// Remove every ready message; returns how many.
    ///
    /// ```
    /// # fn main() -> Result<(), kelp::Error> {
    /// let conn = kelp::blocking::Connection::open("memory://simple-clear-doc")?;
    /// let q = conn.simple_queue("jobs")?;
    /// q.put(&1)?;
    /// assert_eq!(q.clear()?, 1);
    /// # Ok(()) }
    /// ```
    pub fn clear(&self) -> Result<u32, Error> {
        self.shared.run(self.inner.clear())
    }

    /// Stop consuming and close its channel. Unacked messages go back to the queue.
    ///
    /// ```
    /// # fn main() -> Result<(), kelp::Error> {
    /// let conn = kelp::blocking::Connection::open("memory://simple-close-doc")?;
    /// conn.simple_queue("jobs")?.close()?;
    /// # Ok(()) }
    /// ```
    pub fn close(self) -> Result<(), Error> {
        self.shared.run(self.inner.close())
    }
}

/// A transient, auto-deleted queue whose messages are acknowledged on delivery (Kombu's
/// `SimpleBuffer`), from [`super::Connection::simple_buffer`].
///
/// ```
/// # fn main() -> Result<(), kelp::Error> {
/// let conn = kelp::blocking::Connection::open("memory://blocking-buffer-doc")?;
/// let mut b = conn.simple_buffer("events")?;
/// b.put(&42)?;
/// assert_eq!(b.get(true, Some(std::time::Duration::from_secs(1)))?.decode::<i32>()?, 42);
/// # Ok(()) }
/// ```
#[derive(Debug)]
pub struct SimpleBuffer {
    inner: crate::SimpleBuffer,
    shared: Arc<Shared>,
}

impl SimpleBuffer {
    pub(super) fn new(inner: crate::SimpleBuffer, shared: Arc<Shared>) -> Self {
        SimpleBuffer { inner, shared }
    }

    /// Serialize and publish `value` (transient).
    ///
    /// ```
    /// # fn main() -> Result<(), kelp::Error> {
    /// let conn = kelp::blocking::Connection::open("memory://buffer-put-doc")?;
    /// conn.simple_buffer("events")?.put(&"e")?;
    /// # Ok(()) }
    /// ```
    pub fn put<T: Serialize + ?Sized>(&self, value: &T) -> Result<(), Error> {
        self.shared.run(self.inner.put(value))
    }

    /// The next message (already acknowledged), as [`SimpleQueue::get`].
    ///
    /// ```
    /// # fn main() -> Result<(), kelp::Error> {
    /// let conn = kelp::blocking::Connection::open("memory://buffer-get-doc")?;
    /// let mut b = conn.simple_buffer("events")?;
    /// assert!(b.get(true, Some(std::time::Duration::from_millis(10))).is_err());
    /// # Ok(()) }
    /// ```
    pub fn get(&mut self, block: bool, timeout: Option<Duration>) -> Result<Message, Error> {
        if !block {
            return self.get_nowait();
        }
        let m = self.shared.run(self.inner.get(timeout))?;
        Ok(Message::new(m, self.shared.clone()))
    }

    /// A message if one is ready now, else [`Error::QueueEmpty`].
    ///
    /// ```
    /// # fn main() -> Result<(), kelp::Error> {
    /// let conn = kelp::blocking::Connection::open("memory://buffer-nowait-doc")?;
    /// assert!(conn.simple_buffer("events")?.get_nowait().is_err());
    /// # Ok(()) }
    /// ```
    pub fn get_nowait(&mut self) -> Result<Message, Error> {
        let m = self.shared.run(self.inner.get_nowait())?;
        Ok(Message::new(m, self.shared.clone()))
    }

    /// Messages ready in the buffer.
    ///
    /// ```
    /// # fn main() -> Result<(), kelp::Error> {
    /// let conn = kelp::blocking::Connection::open("memory://buffer-qsize-doc")?;
    /// assert_eq!(conn.simple_buffer("events")?.qsize()?, 0);
    /// # Ok(()) }
    /// ```
    pub fn qsize(&self) -> Result<u32, Error> {
        self.shared.run(self.inner.qsize())
    }

    /// Remove every ready message; returns how many.
    ///
    /// ```
    /// # fn main() -> Result<(), kelp::Error> {
    /// let conn = kelp::blocking::Connection::open("memory://buffer-clear-doc")?;
    /// assert_eq!(conn.simple_buffer("events")?.clear()?, 0);
    /// # Ok(()) }
    /// ```
    pub fn clear(&self) -> Result<u32, Error> {
        self.shared.run(self.inner.clear())
    }

    /// Close the channel (the broker deletes the buffer's queue).
    ///
    /// ```
    /// # fn main() -> Result<(), kelp::Error> {
    /// let conn = kelp::blocking::Connection::open("memory://buffer-close-doc")?;
    /// conn.simple_buffer("events")?.close()?;
    /// # Ok(()) }
    /// ```
    pub fn close(self) -> Result<(), Error> {
        self.shared.run(self.inner.close())
    }
}
