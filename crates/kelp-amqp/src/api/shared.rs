//! State shared between handles and the connection task. Written by the task, read by handles;
//! nothing here is touched per message except one atomic load.

use std::sync::atomic::{AtomicBool, AtomicU16, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

use tokio::sync::{mpsc, watch};

use crate::codec::FieldTable;
use crate::engine::ReturnedMessage;
use crate::error::Error;

/// Negotiated connection parameters.
#[derive(Debug, Clone, Default)]
pub struct Tuning {
    /// Server properties from `connection.start`.
    pub server_properties: FieldTable,
    /// Negotiated frame_max.
    pub frame_max: u32,
    /// Negotiated channel_max.
    pub channel_max: u16,
    /// Negotiated heartbeat.
    pub heartbeat: Duration,
}

#[derive(Debug)]
pub(crate) struct ConnShared {
    closed: OnceLock<Error>,
    /// Set by a handle as it asks for `connection.close`, before the command is queued.
    closing: AtomicBool,
    /// Flips to true once `closed` is set, for handles waiting on [`crate::Connection::closed`].
    closed_watch: watch::Sender<bool>,
    tuning: OnceLock<Tuning>,
    blocked: watch::Sender<Option<String>>,
}

impl ConnShared {
    pub(crate) fn new() -> Self {
        ConnShared {
            closed: OnceLock::new(),
            closing: AtomicBool::new(false),
            closed_watch: watch::channel(false).0,
            tuning: OnceLock::new(),
            blocked: watch::channel(None).0,
        }
    }
    pub(crate) fn set_closed(&self, e: Error) {
        let _ = self.closed.set(e);
        self.blocked.send_replace(None);
        self.closed_watch.send_replace(true);
    }
    pub(crate) fn closed(&self) -> Option<&Error> {
        self.closed.get()
    }
    /// Mark the connection as closing by this client; true if it already was.
    pub(crate) fn begin_close(&self) -> bool {
        self.closing.swap(true, Ordering::SeqCst)
    }
    pub(crate) fn is_closing(&self) -> bool {
        self.closing.load(Ordering::SeqCst)
    }
    pub(crate) fn closed_watch(&self) -> watch::Receiver<bool> {
        self.closed_watch.subscribe()
    }
    pub(crate) fn set_connected(
        &self,
        server_properties: FieldTable,
        frame_max: u32,
        channel_max: u16,
        heartbeat: Duration,
    ) {
        let _ = self.tuning.set(Tuning {
            server_properties,
            frame_max,
            channel_max,
            heartbeat,
        });
    }
    pub(crate) fn tuning(&self) -> Option<&Tuning> {
        self.tuning.get()
    }
    pub(crate) fn set_blocked(&self, reason: Option<String>) {
        self.blocked.send_replace(reason);
    }
    pub(crate) fn blocked(&self) -> watch::Receiver<Option<String>> {
        self.blocked.subscribe()
    }
}

#[derive(Debug)]
pub(crate) struct ChannelShared {
    closed: OnceLock<Error>,
    /// Set by a handle as it asks for `channel.close`, before the command is queued.
    closing: AtomicBool,
    pub(crate) confirm: AtomicBool,
    pub(crate) prefetch: AtomicU16,
    flow: AtomicBool,
    returns: Mutex<Option<mpsc::UnboundedSender<ReturnedMessage>>>,
}

impl ChannelShared {
    pub(crate) fn new() -> Self {
        ChannelShared {
            closed: OnceLock::new(),
            closing: AtomicBool::new(false),
            confirm: AtomicBool::new(false),
            prefetch: AtomicU16::new(0),
            flow: AtomicBool::new(true),
            returns: Mutex::new(None),
        }
    }
    pub(crate) fn set_closed(&self, e: Error) {
        let _ = self.closed.set(e);
        if let Ok(mut r) = self.returns.lock() {
            *r = None;
        }
    }
    pub(crate) fn closed(&self) -> Option<&Error> {
        self.closed.get()
    }
    /// Mark the channel as closing by this client; true if it already was.
    pub(crate) fn begin_close(&self) -> bool {
        self.closing.swap(true, Ordering::SeqCst)
    }
    pub(crate) fn is_closing(&self) -> bool {
        self.closing.load(Ordering::SeqCst)
    }
    pub(crate) fn set_flow(&self, active: bool) {
        self.flow.store(active, Ordering::Relaxed);
    }
    pub(crate) fn flow(&self) -> bool {
        self.flow.load(Ordering::Relaxed)
    }
    pub(crate) fn set_returns(&self, tx: mpsc::UnboundedSender<ReturnedMessage>) {
        if let Ok(mut r) = self.returns.lock() {
            *r = Some(tx);
        }
    }
    pub(crate) fn deliver_return(&self, m: ReturnedMessage) {
        let sent = match self.returns.lock() {
            Ok(r) => r.as_ref().map(|tx| tx.send(m).is_ok()).unwrap_or(false),
            Err(_) => false,
        };
        if !sent {
            tracing::warn!(
                "a mandatory message was returned but nobody listens for returns on its channel"
            );
        }
    }
}
