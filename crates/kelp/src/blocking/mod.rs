//! Synchronous programs: kelp without touching tokio (Kombu's synchronous API, in the style of
//! `reqwest::blocking`).
//!
//! Each [`Connection`] owns a small background tokio runtime (one worker thread) that keeps the
//! connection alive between calls — heartbeats, the AMQP socket, robust reconnects — while the
//! program does other things. Every blocking method runs its async counterpart to completion on
//! that runtime. Channels, producers, consumers, messages and simple queues made from a connection
//! share its runtime; it stops (closing the connection gracefully) when the last of them is
//! dropped.
//!
//! Callbacks registered on a [`Consumer`] are plain closures `|body, message|`, run by
//! [`Connection::drain_events`] or [`Consumer::drain_events`] on the calling thread, so they can
//! `message.ack()` and publish with the blocking API.
//!
//! The blocking API is for threads that are not running async code: called from inside a tokio
//! runtime (an async task, or a `spawn_blocking` closure) every method returns an
//! [`Error::InvalidArgument`] instead of blocking the runtime or panicking. Use the async API
//! there.
//!
//! ```
//! use std::time::Duration;
//! use kelp::blocking::Connection;
//!
//! # fn main() -> Result<(), kelp::Error> {
//! let conn = Connection::open("memory://blocking-module-doc")?;
//! let mut queue = conn.simple_queue("jobs")?;
//! queue.put(&serde_json::json!({"hello": "world"}))?;
//! let mut msg = queue.get(true, Some(Duration::from_secs(1)))?;
//! assert_eq!(msg.decode::<serde_json::Value>()?["hello"], "world");
//! msg.ack()?;
//! conn.close()?;
//! # Ok(()) }
//! ```

use std::fmt;
use std::future::Future;
use std::sync::atomic::AtomicUsize;
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use tokio::runtime::Runtime;

use crate::error::Error;

mod channel;
mod connection;
mod consumer;
mod message;
mod simple;

pub use channel::{Channel, Producer};
pub use connection::{Connection, ConnectionBuilder};
pub use consumer::{Consumer, ConsumerBuilder, Iter};
pub use message::Message;
pub use simple::{SimpleBuffer, SimpleQueue};

use consumer::ConsumerShared;

/// How long dropping the last handle of a connection waits for its graceful close.
const CLOSE_ON_DROP: Duration = Duration::from_secs(2);
/// How long the background runtime gets to stop.
const SHUTDOWN: Duration = Duration::from_secs(1);

/// The error every blocking call returns when made from inside an async runtime.
fn in_async_context() -> Error {
    Error::InvalidArgument {
        what: "blocking call",
        reason: "kelp::blocking was called from inside an async runtime (an async task or a \
                 spawn_blocking closure), where blocking would stall it: use kelp's async API \
                 (kelp::Connection) there, or call the blocking API from a plain thread"
            .into(),
    }
}

/// `Err` when the current thread is inside a tokio runtime.
fn check_not_async() -> Result<(), Error> {
    match tokio::runtime::Handle::try_current() {
        Ok(_) => Err(in_async_context()),
        Err(_) => Ok(()),
    }
}

/// The background runtime.
fn new_runtime() -> Result<Runtime, Error> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name("kelp-blocking")
        .enable_all()
        .build()
        .map_err(|e| {
            Error::Amqp(kelp_amqp::Error::Io {
                context: "starting kelp's background runtime".into(),
                source: Arc::new(e),
            })
        })
}

/// What every blocking handle of one connection shares: the runtime, the connection (closed
/// when the last handle goes) and the consumers [`Connection::drain_events`] serves.
pub(crate) struct Shared {
    runtime: Option<Runtime>,
    conn: Option<crate::Connection>,
    consumers: Mutex<Vec<Weak<ConsumerShared>>>,
    drain_cursor: AtomicUsize,
}

impl fmt::Debug for Shared {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Shared")
            .field("url", &self.conn.as_ref().map(|c| c.url()))
            .finish_non_exhaustive()
    }
}

impl Shared {
    fn new(runtime: Runtime, conn: crate::Connection) -> Self {
        Shared {
            runtime: Some(runtime),
            conn: Some(conn),
            consumers: Mutex::new(Vec::new()),
            drain_cursor: AtomicUsize::new(0),
        }
    }

    /// Run `fut` to completion on the background runtime, from a thread outside any runtime.
    pub(crate) fn block_on<F: Future>(&self, fut: F) -> Result<F::Output, Error> {
        check_not_async()?;
        match &self.runtime {
            Some(rt) => Ok(rt.block_on(fut)),
            None => Err(Error::Closed {
                what: "blocking runtime",
            }),
        }
    }

    /// [`Shared::block_on`] for a fallible future.
    pub(crate) fn run<T, F>(&self, fut: F) -> Result<T, Error>
    where
        F: Future<Output = Result<T, Error>>,
    {
        self.block_on(fut)?
    }

    /// Enter the runtime's context (for calls that spawn tasks but do not block).
    pub(crate) fn enter(&self) -> Option<tokio::runtime::EnterGuard<'_>> {
        self.runtime.as_ref().map(Runtime::enter)
    }
}

impl Drop for Shared {
    fn drop(&mut self) {
        let conn = self.conn.take();
        let Some(rt) = self.runtime.take() else {
            return;
        };
        if check_not_async().is_err() {
            // Dropped inside some async runtime: blocking here would stall it (and tokio
            // forbids it), so stop without the graceful close.
            {
                let _in_rt = rt.enter();
                drop(conn);
            }
            rt.shutdown_background();
            return;
        }
        if let Some(conn) = conn {
            rt.block_on(async {
                let _ = tokio::time::timeout(CLOSE_ON_DROP, conn.close()).await;
            });
            let _in_rt = rt.enter();
            drop(conn);
        }
        rt.shutdown_timeout(SHUTDOWN);
    }
}
