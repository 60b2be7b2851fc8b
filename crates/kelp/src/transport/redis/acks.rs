//! Acks written in the background and coalesced, as an AMQP client writes `basic.ack` without
//! waiting for an answer: every ack waiting at the time goes in one round trip
//! (`ZREM unacked_index t1 t2 …` and `HDEL unacked t1 t2 …`).
//!
//! A consumer acks one message at a time; waking the writer for each would cost a thread
//! wake-up per message. The first ack after a write arms the writer, which lingers
//! [`ACK_LINGER`] for the ones that follow and writes them together.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;

use redis::aio::MultiplexedConnection;
use tokio::sync::{mpsc, oneshot, Notify};

use super::{rerr, Shared};
use crate::error::Error;

/// How many acks may wait for the writer before `ack` waits for it (backpressure).
const ACK_BACKLOG: usize = 4096;

/// How long the writer gathers acks before writing them.
const ACK_LINGER: Duration = Duration::from_millis(1);

#[derive(Debug)]
enum AckCmd {
    /// Remove a Kombu delivery tag from `unacked` and `unacked_index`.
    Remove(String),
    /// Answer once everything sent before is written.
    Flush(oneshot::Sender<()>),
}

#[derive(Debug, Default)]
struct Signal {
    /// The writer has been told there is work.
    armed: AtomicBool,
    wake: Notify,
}

/// The sending side, one per connection.
#[derive(Debug)]
pub(super) struct AckQueue {
    tx: mpsc::Sender<AckCmd>,
    signal: Arc<Signal>,
}

impl AckQueue {
    /// A queue and its writer, which writes through `conn` until the queue is dropped.
    pub(super) fn start(
        shared: Weak<Shared>,
        conn: MultiplexedConnection,
        index_key: String,
        unacked_key: String,
    ) -> AckQueue {
        let (tx, rx) = mpsc::channel(ACK_BACKLOG);
        let signal = Arc::new(Signal::default());
        tokio::spawn(writer(
            shared,
            conn,
            index_key,
            unacked_key,
            rx,
            signal.clone(),
        ));
        AckQueue { tx, signal }
    }

    /// Remove `tag` from the unacked indices, in the background.
    pub(super) async fn remove(&self, tag: String) -> Result<(), Error> {
        let cmd = match self.tx.try_send(AckCmd::Remove(tag)) {
            Ok(()) => {
                if !self.signal.armed.swap(true, Ordering::AcqRel) {
                    self.signal.wake.notify_one();
                }
                return Ok(());
            }
            Err(mpsc::error::TrySendError::Full(cmd)) => cmd,
            Err(mpsc::error::TrySendError::Closed(_)) => {
                return Err(Error::Closed { what: "connection" })
            }
        };
        // Full: make sure the writer runs, then wait for room.
        self.signal.wake.notify_one();
        self.tx
            .send(cmd)
            .await
            .map_err(|_| Error::Closed { what: "connection" })
    }

    /// Wait until every ack sent so far is written.
    pub(super) async fn flush(&self) {
        let (tx, rx) = oneshot::channel();
        if self.tx.send(AckCmd::Flush(tx)).await.is_ok() {
            self.signal.wake.notify_one();
            let _ = rx.await;
        }
    }
}

impl Drop for AckQueue {
    fn drop(&mut self) {
        // Let the writer write what is left and stop.
        self.signal.wake.notify_one();
    }
}

async fn writer(
    shared: Weak<Shared>,
    mut conn: MultiplexedConnection,
    index_key: String,
    unacked_key: String,
    mut rx: mpsc::Receiver<AckCmd>,
    signal: Arc<Signal>,
) {
    let mut cmds = Vec::with_capacity(256);
    let mut tags: Vec<String> = Vec::with_capacity(256);
    let mut flushes = Vec::new();
    loop {
        // Idle until armed; `Notify` keeps a wake-up sent while we were busy.
        signal.wake.notified().await;
        tokio::time::sleep(ACK_LINGER).await;
        // Acks after this point arm the writer again.
        signal.armed.store(false, Ordering::Release);
        while let Ok(c) = rx.try_recv() {
            cmds.push(c);
        }
        for c in cmds.drain(..) {
            match c {
                AckCmd::Remove(t) => tags.push(t),
                AckCmd::Flush(f) => flushes.push(f),
            }
        }
        if !tags.is_empty() {
            let mut pipe = redis::pipe();
            pipe.cmd("ZREM").arg(&index_key).arg(&tags).ignore();
            pipe.cmd("HDEL").arg(&unacked_key).arg(&tags).ignore();
            if let Err(e) = pipe.query_async::<()>(&mut conn).await {
                let mut err = rerr("acknowledging")(e);
                if let Some(s) = shared.upgrade() {
                    err = s.note(err);
                }
                tracing::warn!(
                    error = %err,
                    count = tags.len(),
                    "acks not written: the messages come back after the visibility timeout"
                );
            }
            tags.clear();
        }
        for f in flushes.drain(..) {
            let _ = f.send(());
        }
        // The queue is gone (the connection dropped) and everything is written.
        if rx.is_closed() && rx.is_empty() {
            return;
        }
    }
}
