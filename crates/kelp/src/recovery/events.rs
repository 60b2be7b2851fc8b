//! What a robust connection reports: disconnects, reconnects, restore failures, blocking.

use std::time::Duration;

use tokio::sync::broadcast;

use crate::error::Error;

/// Something that happened to a robust connection.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub enum RecoveryEvent {
    /// The connection was lost; recovery starts.
    Disconnected {
        /// Why it was lost.
        reason: Error,
    },
    /// A reconnection attempt failed; the next one follows after `retry_in`.
    ReconnectFailed {
        /// 1 for the first attempt after the loss.
        attempt: u32,
        /// The URL tried (password masked).
        url: String,
        /// Why it failed.
        error: Error,
        /// The wait before the next attempt.
        retry_in: Duration,
    },
    /// Connected again, with the topology restored; channels and consumers follow.
    Reconnected {
        /// The URL connected to (password masked).
        url: String,
        /// From the loss to now.
        downtime: Duration,
        /// How many times the connection has been re-established.
        generation: u64,
    },
    /// Something could not be restored (it is left out from now on).
    RestoreFailed {
        /// What: `exchange x`, `queue q`, `binding q <- x (rk)`, `consumer tag on q`, …
        entity: String,
        /// Why.
        error: Error,
    },
    /// A server-named queue got a new name on restore; bindings and consumers follow it, and
    /// the old name keeps working through this connection's channels.
    QueueRenamed {
        /// The name before the loss.
        old: String,
        /// The name the broker gave it now.
        new: String,
    },
    /// The broker cancelled a consumer (its queue was deleted, or the node hosting it failed).
    ConsumerCancelled {
        /// The consumer's tag.
        consumer_tag: String,
        /// Its queue.
        queue: String,
    },
    /// A consumer cancelled by the broker was consumed again (see
    /// [`RecoveryOptions::reconsume_on_cancel`](super::RecoveryOptions::reconsume_on_cancel)).
    ConsumerResumed {
        /// The consumer's tag.
        consumer_tag: String,
        /// Its queue.
        queue: String,
    },
    /// The broker blocked publishers (`connection.blocked`, a resource alarm); publishes wait.
    Blocked {
        /// The broker's reason (`low on memory`, …).
        reason: String,
    },
    /// The broker unblocked publishers.
    Unblocked,
    /// The reconnect policy ran out of retries; the connection is closed for good.
    GaveUp {
        /// The last error.
        error: Error,
    },
}

/// A subscription to a robust connection's [`RecoveryEvent`]s, from
/// [`Connection::events`](crate::Connection::events).
///
/// ```no_run
/// # async fn demo(conn: kelp::Connection) {
/// let mut events = conn.events();
/// while let Some(event) = events.recv().await {
///     println!("{event:?}");
/// }
/// # }
/// ```
#[derive(Debug)]
pub struct RecoveryEvents {
    pub(crate) rx: Option<broadcast::Receiver<RecoveryEvent>>,
}

impl RecoveryEvents {
    /// The next event; `None` once the connection is gone (or for a connection that is not
    /// robust). A subscriber that falls more than 256 events behind skips the oldest ones.
    pub async fn recv(&mut self) -> Option<RecoveryEvent> {
        let rx = self.rx.as_mut()?;
        loop {
            match rx.recv().await {
                Ok(e) => return Some(e),
                Err(broadcast::error::RecvError::Lagged(n)) => {
                    tracing::warn!(skipped = n, "recovery event subscriber fell behind");
                }
                Err(broadcast::error::RecvError::Closed) => return None,
            }
        }
    }

    /// The next event if one is waiting, without waiting.
    pub fn try_recv(&mut self) -> Option<RecoveryEvent> {
        let rx = self.rx.as_mut()?;
        loop {
            match rx.try_recv() {
                Ok(e) => return Some(e),
                Err(broadcast::error::TryRecvError::Lagged(_)) => continue,
                Err(_) => return None,
            }
        }
    }
}
