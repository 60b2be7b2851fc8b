//! A robust channel: a [`TransportChannel`] that reopens itself on a new connection (or after
//! the broker closed it) with its confirm mode, QoS and consumers, and retries what the loss
//! interrupted.

use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use bytes::Bytes;
use futures_core::Stream;
use kelp_amqp::{BasicProperties, FieldTable};
use tokio::sync::mpsc;

use super::events::RecoveryEvent;
use super::transport::Shared;
use super::{is_connection_loss, EPOCH_SHIFT, TAG_MASK};
use crate::error::Error;
use crate::transport::{
    BoxFuture, ConsumeSpec, DeliveryStream, ExchangeFlags, PublishOutcome, QueueDeclared,
    QueueFlags, RawDelivery, RawReturn, TransportChannel,
};

/// The channel of one epoch: replaced whole when the channel is reopened.
#[derive(Debug)]
struct Slot {
    /// How many times the channel was reopened; carried in delivery tags.
    epoch: u64,
    /// The connection generation it was opened on.
    generation: u64,
    raw: Arc<dyn TransportChannel>,
}

/// A consumer as a robust channel remembers it, to consume again after a reopen.
struct ConsumerRec {
    tag: String,
    /// The queue as the user named it (resolved through renames when consuming again).
    queue: String,
    spec: ConsumeSpec,
    /// The per-consumer prefetch in effect when it started (RabbitMQ applies `basic.qos` with
    /// `global=false` to consumers started after it).
    prefetch: Option<u16>,
    /// A fresh stream for the user-facing one to switch to.
    next: Mutex<Option<(u64, DeliveryStream)>>,
    has_next: AtomicBool,
    /// An error to hand to the user-facing stream (e.g. the queue is gone after a reconnect).
    failed: Mutex<Option<Error>>,
    /// Cancelled (by the user, or by the broker without `reconsume_on_cancel`): ends the stream.
    cancelled: AtomicBool,
    waker: Mutex<Option<Waker>>,
}

impl std::fmt::Debug for ConsumerRec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConsumerRec")
            .field("tag", &self.tag)
            .field("queue", &self.queue)
            .finish_non_exhaustive()
    }
}

impl ConsumerRec {
    fn wake(&self) {
        if let Ok(mut w) = self.waker.lock() {
            if let Some(w) = w.take() {
                w.wake();
            }
        }
    }
    fn hand_over(&self, epoch: u64, stream: DeliveryStream) {
        if let Ok(mut n) = self.next.lock() {
            *n = Some((epoch, stream));
        }
        self.has_next.store(true, Ordering::Release);
        self.wake();
    }
    /// Its spec, under its own tag: to consume again with.
    fn respec(&self) -> ConsumeSpec {
        let mut spec = self.spec.clone();
        spec.tag = self.tag.clone();
        spec
    }
    fn fail(&self, e: Error) {
        if let Ok(mut f) = self.failed.lock() {
            *f = Some(e);
        }
        self.cancelled.store(true, Ordering::Release);
        self.wake();
    }
}

/// A channel of a robust connection.
#[derive(Debug)]
pub(crate) struct ChannelInner {
    me: std::sync::Weak<ChannelInner>,
    shared: Arc<Shared>,
    slot: ArcSwap<Slot>,
    reopen_lock: tokio::sync::Mutex<()>,
    confirm: AtomicBool,
    tx: AtomicBool,
    /// The last `basic.qos` of each kind: [per consumer, global].
    qos: Mutex<[Option<u16>; 2]>,
    consumers: Mutex<Vec<Arc<ConsumerRec>>>,
    returns_tx: mpsc::UnboundedSender<RawReturn>,
    returns_rx: Mutex<Option<mpsc::UnboundedReceiver<RawReturn>>>,
    user_closed: AtomicBool,
}

fn forward_returns(raw: &Arc<dyn TransportChannel>, tx: &mpsc::UnboundedSender<RawReturn>) {
    if let Some(mut rx) = raw.take_returns() {
        let tx = tx.clone();
        tokio::spawn(async move {
            while let Some(r) = rx.recv().await {
                if tx.send(r).is_err() {
                    break;
                }
            }
        });
    }
}

impl ChannelInner {
    pub(crate) async fn open(shared: Arc<Shared>) -> Result<Arc<ChannelInner>, Error> {
        let started = Instant::now();
        let (generation, raw) = loop {
            let (generation, t) = shared.wait_up(started).await?;
            match t.open_channel().await {
                Ok(raw) => break (generation, raw),
                Err(e) if is_connection_loss(&e) => {
                    shared.wait_newer(generation, started).await?;
                }
                Err(e) => return Err(e),
            }
        };
        let (returns_tx, returns_rx) = mpsc::unbounded_channel();
        forward_returns(&raw, &returns_tx);
        Ok(Arc::new_cyclic(|me| ChannelInner {
            me: me.clone(),
            shared,
            slot: ArcSwap::from_pointee(Slot {
                epoch: 0,
                generation,
                raw,
            }),
            reopen_lock: tokio::sync::Mutex::new(()),
            confirm: AtomicBool::new(false),
            tx: AtomicBool::new(false),
            qos: Mutex::new([None, None]),
            consumers: Mutex::new(Vec::new()),
            returns_tx,
            returns_rx: Mutex::new(Some(returns_rx)),
            user_closed: AtomicBool::new(false),
        }))
    }

    fn self_arc(&self) -> Option<Arc<ChannelInner>> {
        self.me.upgrade()
    }

    fn closed_error() -> Error {
        Error::Closed { what: "channel" }
    }

    /// The channel to use now: the current one if open, else a reopened one.
    async fn current(&self, started: Instant) -> Result<Arc<Slot>, Error> {
        let slot = self.slot.load_full();
        if !slot.raw.is_closed() {
            return Ok(slot);
        }
        self.reopen(slot.epoch, started).await
    }

    /// After a connection loss on `generation`: wait for the next connection and reopen.
    async fn after_loss(&self, slot: &Slot, started: Instant) -> Result<Arc<Slot>, Error> {
        if self.user_closed.load(Ordering::Acquire) {
            return Err(Self::closed_error());
        }
        self.shared.wait_newer(slot.generation, started).await?;
        self.reopen(slot.epoch, started).await
    }

    /// Called by the supervisor once connection `generation` is up.
    pub(crate) async fn reopen_after(&self, generation: u64) -> Result<(), Error> {
        let slot = self.slot.load_full();
        if slot.generation >= generation && !slot.raw.is_closed() {
            return Ok(());
        }
        self.reopen(slot.epoch, Instant::now()).await.map(|_| ())
    }

    /// Reopen the channel unless someone already did since `seen_epoch`: a new channel, its
    /// confirm/transaction mode and QoS, then its consumers.
    async fn reopen(&self, seen_epoch: u64, started: Instant) -> Result<Arc<Slot>, Error> {
        let _guard = self.reopen_lock.lock().await;
        loop {
            let cur = self.slot.load_full();
            if cur.epoch != seen_epoch && !cur.raw.is_closed() {
                return Ok(cur);
            }
            if self.user_closed.load(Ordering::Acquire) {
                return Err(Self::closed_error());
            }
            let (generation, t) = self.shared.wait_up(started).await?;
            let raw = match t.open_channel().await {
                Ok(raw) => raw,
                Err(e) if is_connection_loss(&e) => {
                    self.shared.wait_newer(generation, started).await?;
                    continue;
                }
                Err(e) => return Err(e),
            };
            match self.restore_modes(&raw).await {
                Ok(()) => {}
                Err(e) if is_connection_loss(&e) => continue,
                Err(e) => return Err(e),
            }
            forward_returns(&raw, &self.returns_tx);
            let slot = Arc::new(Slot {
                epoch: cur.epoch + 1,
                generation,
                raw,
            });
            self.slot.store(slot.clone());
            match self.restore_consumers(&slot).await {
                Ok(()) => {
                    tracing::debug!(epoch = slot.epoch, generation, "channel reopened");
                    return Ok(slot);
                }
                // The connection went again, or a consumer could not be restored and took the
                // channel down with it: start over on a new channel (the failed consumer is
                // gone from the list, so this ends).
                Err(_) => continue,
            }
        }
    }

    async fn restore_modes(&self, raw: &Arc<dyn TransportChannel>) -> Result<(), Error> {
        if self.confirm.load(Ordering::Acquire) {
            raw.confirm_select().await?;
        }
        if self.tx.load(Ordering::Acquire) {
            raw.tx_select().await?;
        }
        let qos = self.qos.lock().map(|q| *q).unwrap_or([None, None]);
        // Global first, so per-consumer prefetch applies to the consumers that follow.
        if let Some(n) = qos[1] {
            raw.qos(n, true).await?;
        }
        if let Some(n) = qos[0] {
            raw.qos(n, false).await?;
        }
        Ok(())
    }

    async fn restore_consumers(&self, slot: &Slot) -> Result<(), Error> {
        let recs: Vec<Arc<ConsumerRec>> =
            self.consumers.lock().map(|c| c.clone()).unwrap_or_default();
        let channel_prefetch = self.qos.lock().map(|q| q[0]).unwrap_or(None);
        let mut applied = channel_prefetch;
        for rec in recs {
            if rec.cancelled.load(Ordering::Acquire) {
                continue;
            }
            if rec.prefetch != applied {
                slot.raw.qos(rec.prefetch.unwrap_or(0), false).await?;
                applied = rec.prefetch;
            }
            let queue = self.shared.resolve(&rec.queue).into_owned();
            match slot.raw.consume(&queue, rec.respec()).await {
                Ok((_, stream)) => rec.hand_over(slot.epoch, stream),
                Err(e) if is_connection_loss(&e) => return Err(e),
                Err(e) => {
                    let entity = format!("consumer {} on {}", rec.tag, queue);
                    tracing::warn!(%entity, error = %e, "could not restore");
                    self.forget_consumer(&rec.tag);
                    rec.fail(e.clone());
                    self.shared
                        .emit(RecoveryEvent::RestoreFailed { entity, error: e });
                    if slot.raw.is_closed() {
                        return Err(Self::closed_error());
                    }
                }
            }
        }
        if applied != channel_prefetch {
            slot.raw.qos(channel_prefetch.unwrap_or(0), false).await?;
        }
        Ok(())
    }

    fn forget_consumer(&self, tag: &str) -> Option<Arc<ConsumerRec>> {
        let mut list = self.consumers.lock().ok()?;
        let i = list.iter().position(|r| r.tag == tag)?;
        Some(list.remove(i))
    }

    pub(crate) fn wake_consumers(&self) {
        if let Ok(list) = self.consumers.lock() {
            for r in list.iter() {
                r.wake();
            }
        }
    }

    /// Run `op` on the current channel; after a connection loss, on the next one.
    async fn retrying<'a, T, F>(&'a self, mut op: F) -> Result<T, Error>
    where
        F: FnMut(Arc<dyn TransportChannel>) -> BoxFuture<'a, Result<T, Error>>,
    {
        let started = Instant::now();
        let mut slot = self.current(started).await?;
        loop {
            match op(slot.raw.clone()).await {
                Err(e) if is_connection_loss(&e) && !self.user_closed.load(Ordering::Acquire) => {
                    tracing::debug!(error = %e, "connection lost during a call; retrying after recovery");
                    slot = self.after_loss(&slot, started).await?;
                }
                r => return r,
            }
        }
    }

    fn stale(tag: u64) -> Error {
        Error::StaleDelivery {
            delivery_tag: tag & TAG_MASK,
        }
    }

    /// For ack/nack/reject: the raw tag if `tag` belongs to the channel's current epoch.
    fn settle_target(&self, tag: u64) -> Result<(Arc<Slot>, u64), Error> {
        let slot = self.slot.load_full();
        if tag >> EPOCH_SHIFT != slot.epoch || slot.raw.is_closed() {
            return Err(Self::stale(tag));
        }
        Ok((slot, tag & TAG_MASK))
    }

    /// The result of settling `tag`: lost with the connection, the delivery is stale.
    fn stale_if_lost(tag: u64, r: Result<(), Error>) -> Result<(), Error> {
        match r {
            Err(e) if is_connection_loss(&e) => Err(Self::stale(tag)),
            r => r,
        }
    }
}

fn tagged(mut d: RawDelivery, epoch: u64) -> RawDelivery {
    d.delivery_tag |= epoch << EPOCH_SHIFT;
    d
}

/// The user-facing stream of a robust consumer: follows the consumer across reopens.
struct RobustStream {
    chan: Arc<ChannelInner>,
    rec: Arc<ConsumerRec>,
    inner: Option<DeliveryStream>,
    epoch: u64,
}

impl RobustStream {
    fn lost(&mut self) {
        self.inner = None;
        let chan = self.chan.clone();
        let epoch = self.epoch;
        // A channel closed under a live connection is reopened here; after a connection loss
        // the supervisor reopens every channel once it is back.
        if chan.shared.is_up() && !chan.user_closed.load(Ordering::Acquire) {
            tokio::spawn(async move {
                if let Err(e) = chan.reopen(epoch, Instant::now()).await {
                    tracing::debug!(error = %e, "reopen after a consumer lost its channel");
                }
            });
        }
    }

    fn ended(&self) -> bool {
        self.rec.cancelled.load(Ordering::Acquire)
            || self.chan.user_closed.load(Ordering::Acquire)
            || self.chan.shared.is_closed_for_good()
    }
}

impl Stream for RobustStream {
    type Item = Result<RawDelivery, Error>;
    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = &mut *self;
        loop {
            if this.rec.has_next.load(Ordering::Acquire) {
                this.rec.has_next.store(false, Ordering::Release);
                if let Some((epoch, s)) = this.rec.next.lock().ok().and_then(|mut n| n.take()) {
                    this.inner = Some(s);
                    this.epoch = epoch;
                }
            }
            if let Some(inner) = this.inner.as_mut() {
                match inner.as_mut().poll_next(cx) {
                    Poll::Ready(Some(Ok(d))) => {
                        return Poll::Ready(Some(Ok(tagged(d, this.epoch))))
                    }
                    Poll::Ready(Some(Err(Error::ConsumerCancelled {
                        consumer_tag,
                        queue,
                    }))) => {
                        if this.rec.cancelled.load(Ordering::Acquire) {
                            continue;
                        }
                        this.chan.shared.emit(RecoveryEvent::ConsumerCancelled {
                            consumer_tag: consumer_tag.clone(),
                            queue: queue.clone(),
                        });
                        this.inner = None;
                        if this.chan.shared.recovery.reconsume_on_cancel {
                            spawn_reconsume(this.chan.clone(), this.rec.clone());
                        } else {
                            this.chan.forget_consumer(&this.rec.tag);
                            this.rec.cancelled.store(true, Ordering::Release);
                        }
                        return Poll::Ready(Some(Err(Error::ConsumerCancelled {
                            consumer_tag,
                            queue,
                        })));
                    }
                    Poll::Ready(Some(Err(e))) => {
                        if this.ended() {
                            return Poll::Ready(Some(Err(e)));
                        }
                        tracing::debug!(error = %e, "consumer lost its channel; waiting to resume");
                        this.lost();
                    }
                    Poll::Ready(None) => {
                        if this.ended() {
                            return Poll::Ready(None);
                        }
                        this.lost();
                    }
                    Poll::Pending => return Poll::Pending,
                }
            } else {
                if let Some(e) = this.rec.failed.lock().ok().and_then(|mut f| f.take()) {
                    return Poll::Ready(Some(Err(e)));
                }
                if this.ended() {
                    return Poll::Ready(None);
                }
                if let Ok(mut w) = this.rec.waker.lock() {
                    *w = Some(cx.waker().clone());
                }
                if !this.rec.has_next.load(Ordering::Acquire) && !this.ended() {
                    return Poll::Pending;
                }
            }
        }
    }
}

/// The broker cancelled `rec` (its queue went away): consume again once the queue is back.
fn spawn_reconsume(chan: Arc<ChannelInner>, rec: Arc<ConsumerRec>) {
    tokio::spawn(async move {
        let mut wait = Duration::from_millis(200);
        loop {
            tokio::time::sleep(wait).await;
            wait = (wait * 2).min(Duration::from_secs(5));
            if rec.cancelled.load(Ordering::Acquire)
                || chan.user_closed.load(Ordering::Acquire)
                || chan.shared.is_closed_for_good()
            {
                return;
            }
            if !chan.shared.is_up() {
                continue;
            }
            let queue = chan.shared.resolve(&rec.queue).into_owned();
            // Probe on a throwaway channel: a missing queue closes the channel it is asked on.
            let Ok((_, t)) = chan.shared.wait_up(Instant::now()).await else {
                continue;
            };
            let Ok(probe) = t.open_channel().await else {
                continue;
            };
            let passive = QueueFlags {
                passive: true,
                ..Default::default()
            };
            let exists = probe
                .queue_declare(&queue, passive, &FieldTable::default())
                .await
                .is_ok();
            let _ = probe.close().await;
            if !exists {
                continue;
            }
            let _guard = chan.reopen_lock.lock().await;
            let slot = chan.slot.load_full();
            if let Ok((_, stream)) = slot.raw.consume(&queue, rec.respec()).await {
                rec.hand_over(slot.epoch, stream);
                chan.shared.emit(RecoveryEvent::ConsumerResumed {
                    consumer_tag: rec.tag.clone(),
                    queue,
                });
                return;
            }
        }
    });
}

/// `retry!(self, method(args..))`: [`ChannelInner::retrying`] calling `method(args..)` on the raw
/// channel of each attempt. The arguments are copied into every attempt, so they are references
/// or `Copy`; owned ones named after `clone:` are cloned for each attempt instead.
macro_rules! retry {
    ($this:expr, $method:ident($($arg:expr),* $(,)?) $(, clone: $($owned:ident),+)?) => {
        $this.retrying(|raw| {
            $($(let $owned = $owned.clone();)+)?
            Box::pin(async move { raw.$method($($arg),*).await })
        })
    };
}

impl TransportChannel for ChannelInner {
    fn exchange_declare<'a>(
        &'a self,
        name: &'a str,
        kind: &'a str,
        flags: ExchangeFlags,
        arguments: &'a FieldTable,
    ) -> BoxFuture<'a, Result<(), Error>> {
        Box::pin(async move {
            retry!(self, exchange_declare(name, kind, flags, arguments)).await?;
            self.shared
                .record(|t| t.exchange_declared(name, kind, flags, arguments));
            Ok(())
        })
    }
    fn exchange_delete<'a>(
        &'a self,
        name: &'a str,
        if_unused: bool,
    ) -> BoxFuture<'a, Result<(), Error>> {
        Box::pin(async move {
            retry!(self, exchange_delete(name, if_unused)).await?;
            self.shared.record(|t| t.exchange_deleted(name));
            Ok(())
        })
    }
    fn exchange_bind<'a>(
        &'a self,
        destination: &'a str,
        source: &'a str,
        routing_key: &'a str,
        arguments: &'a FieldTable,
    ) -> BoxFuture<'a, Result<(), Error>> {
        Box::pin(async move {
            retry!(
                self,
                exchange_bind(destination, source, routing_key, arguments)
            )
            .await?;
            self.shared
                .record(|t| t.exchange_bound(destination, source, routing_key, arguments));
            Ok(())
        })
    }
    fn exchange_unbind<'a>(
        &'a self,
        destination: &'a str,
        source: &'a str,
        routing_key: &'a str,
        arguments: &'a FieldTable,
    ) -> BoxFuture<'a, Result<(), Error>> {
        Box::pin(async move {
            retry!(
                self,
                exchange_unbind(destination, source, routing_key, arguments)
            )
            .await?;
            self.shared
                .record(|t| t.exchange_unbound(destination, source, routing_key, arguments));
            Ok(())
        })
    }
    fn queue_declare<'a>(
        &'a self,
        name: &'a str,
        flags: QueueFlags,
        arguments: &'a FieldTable,
    ) -> BoxFuture<'a, Result<QueueDeclared, Error>> {
        Box::pin(async move {
            let resolved = self.shared.resolve(name);
            let resolved = resolved.as_ref();
            let declared = retry!(self, queue_declare(resolved, flags, arguments)).await?;
            self.shared
                .record(|t| t.queue_declared(resolved, &declared.name, flags, arguments));
            Ok(declared)
        })
    }
    fn queue_bind<'a>(
        &'a self,
        queue: &'a str,
        exchange: &'a str,
        routing_key: &'a str,
        arguments: &'a FieldTable,
    ) -> BoxFuture<'a, Result<(), Error>> {
        Box::pin(async move {
            let queue = self.shared.resolve(queue);
            let queue = queue.as_ref();
            retry!(self, queue_bind(queue, exchange, routing_key, arguments)).await?;
            self.shared
                .record(|t| t.queue_bound(queue, exchange, routing_key, arguments));
            Ok(())
        })
    }
    fn queue_unbind<'a>(
        &'a self,
        queue: &'a str,
        exchange: &'a str,
        routing_key: &'a str,
        arguments: &'a FieldTable,
    ) -> BoxFuture<'a, Result<(), Error>> {
        Box::pin(async move {
            let queue = self.shared.resolve(queue);
            let queue = queue.as_ref();
            retry!(self, queue_unbind(queue, exchange, routing_key, arguments)).await?;
            self.shared
                .record(|t| t.queue_unbound(queue, exchange, routing_key, arguments));
            Ok(())
        })
    }
    fn queue_purge<'a>(&'a self, queue: &'a str) -> BoxFuture<'a, Result<u32, Error>> {
        Box::pin(async move {
            let queue = self.shared.resolve(queue);
            let queue = queue.as_ref();
            retry!(self, queue_purge(queue)).await
        })
    }
    fn queue_delete<'a>(
        &'a self,
        queue: &'a str,
        if_unused: bool,
        if_empty: bool,
    ) -> BoxFuture<'a, Result<u32, Error>> {
        Box::pin(async move {
            let queue = self.shared.resolve(queue);
            let queue = queue.as_ref();
            let n = retry!(self, queue_delete(queue, if_unused, if_empty)).await?;
            self.shared.record(|t| t.queue_deleted(queue));
            Ok(n)
        })
    }
    fn publish<'a>(
        &'a self,
        exchange: &'a str,
        routing_key: &'a str,
        mandatory: bool,
        properties: BasicProperties,
        body: Bytes,
    ) -> BoxFuture<'a, Result<PublishOutcome, Error>> {
        Box::pin(async move {
            if self.shared.is_blocked() {
                self.shared.wait_unblocked().await;
            }
            // On the default exchange the routing key is a queue name: follow renames.
            let routing_key = if exchange.is_empty() {
                self.shared.resolve(routing_key)
            } else {
                std::borrow::Cow::Borrowed(routing_key)
            };
            let routing_key = routing_key.as_ref();
            // Sent but not confirmed when the connection went: send it again on the next one
            // (at-least-once).
            retry!(
                self,
                publish(exchange, routing_key, mandatory, properties, body),
                clone: properties, body
            )
            .await
        })
    }
    fn get<'a>(
        &'a self,
        queue: &'a str,
        no_ack: bool,
    ) -> BoxFuture<'a, Result<Option<RawDelivery>, Error>> {
        Box::pin(async move {
            let queue = self.shared.resolve(queue);
            let queue = queue.as_ref();
            // Not `retry!`: the delivery is tagged with the epoch of the channel it came from.
            let started = Instant::now();
            let mut slot = self.current(started).await?;
            loop {
                match slot.raw.get(queue, no_ack).await {
                    Ok(d) => return Ok(d.map(|d| tagged(d, slot.epoch))),
                    Err(e) if is_connection_loss(&e) => {
                        slot = self.after_loss(&slot, started).await?;
                    }
                    Err(e) => return Err(e),
                }
            }
        })
    }
    fn consume<'a>(
        &'a self,
        queue: &'a str,
        spec: ConsumeSpec,
    ) -> BoxFuture<'a, Result<(String, DeliveryStream), Error>> {
        Box::pin(async move {
            let started = Instant::now();
            let resolved = self.shared.resolve(queue).into_owned();
            loop {
                let slot = self.current(started).await?;
                let _guard = self.reopen_lock.lock().await;
                if slot.epoch != self.slot.load().epoch {
                    continue;
                }
                match slot.raw.consume(&resolved, spec.clone()).await {
                    Ok((tag, stream)) => {
                        let rec = Arc::new(ConsumerRec {
                            tag: tag.clone(),
                            queue: queue.to_owned(),
                            spec,
                            prefetch: self.qos.lock().map(|q| q[0]).unwrap_or(None),
                            next: Mutex::new(None),
                            has_next: AtomicBool::new(false),
                            failed: Mutex::new(None),
                            cancelled: AtomicBool::new(false),
                            waker: Mutex::new(None),
                        });
                        if let Ok(mut list) = self.consumers.lock() {
                            list.push(rec.clone());
                        }
                        let chan = match self.self_arc() {
                            Some(c) => c,
                            None => return Err(Self::closed_error()),
                        };
                        let s: DeliveryStream = Box::pin(RobustStream {
                            chan,
                            rec,
                            inner: Some(stream),
                            epoch: slot.epoch,
                        });
                        return Ok((tag, s));
                    }
                    Err(e) if is_connection_loss(&e) => {
                        drop(_guard);
                        self.after_loss(&slot, started).await?;
                    }
                    Err(e) => return Err(e),
                }
            }
        })
    }
    fn cancel<'a>(&'a self, consumer_tag: &'a str) -> BoxFuture<'a, Result<(), Error>> {
        Box::pin(async move {
            let _guard = self.reopen_lock.lock().await;
            let rec = self.forget_consumer(consumer_tag);
            if let Some(rec) = &rec {
                rec.cancelled.store(true, Ordering::Release);
            }
            let slot = self.slot.load_full();
            let r = if slot.raw.is_closed() {
                Ok(())
            } else {
                match slot.raw.cancel(consumer_tag).await {
                    // Gone with the connection: nothing is consuming any more either way.
                    Err(e) if is_connection_loss(&e) => Ok(()),
                    r => r,
                }
            };
            if let Some(rec) = rec {
                rec.wake();
            }
            r
        })
    }
    fn ack(&self, delivery_tag: u64, multiple: bool) -> BoxFuture<'_, Result<(), Error>> {
        Box::pin(async move {
            let (slot, tag) = self.settle_target(delivery_tag)?;
            Self::stale_if_lost(delivery_tag, slot.raw.ack(tag, multiple).await)
        })
    }
    fn nack(
        &self,
        delivery_tag: u64,
        multiple: bool,
        requeue: bool,
    ) -> BoxFuture<'_, Result<(), Error>> {
        Box::pin(async move {
            let (slot, tag) = self.settle_target(delivery_tag)?;
            Self::stale_if_lost(delivery_tag, slot.raw.nack(tag, multiple, requeue).await)
        })
    }
    fn reject(&self, delivery_tag: u64, requeue: bool) -> BoxFuture<'_, Result<(), Error>> {
        Box::pin(async move {
            let (slot, tag) = self.settle_target(delivery_tag)?;
            Self::stale_if_lost(delivery_tag, slot.raw.reject(tag, requeue).await)
        })
    }
    fn recover(&self, requeue: bool) -> BoxFuture<'_, Result<(), Error>> {
        Box::pin(async move { retry!(self, recover(requeue)).await })
    }
    fn qos(&self, prefetch_count: u16, global: bool) -> BoxFuture<'_, Result<(), Error>> {
        Box::pin(async move {
            retry!(self, qos(prefetch_count, global)).await?;
            if let Ok(mut q) = self.qos.lock() {
                q[usize::from(global)] = Some(prefetch_count);
            }
            Ok(())
        })
    }
    fn flow(&self, active: bool) -> BoxFuture<'_, Result<(), Error>> {
        Box::pin(async move { retry!(self, flow(active)).await })
    }
    fn confirm_select(&self) -> BoxFuture<'_, Result<(), Error>> {
        Box::pin(async move {
            retry!(self, confirm_select()).await?;
            self.confirm.store(true, Ordering::Release);
            Ok(())
        })
    }
    fn tx_select(&self) -> BoxFuture<'_, Result<(), Error>> {
        Box::pin(async move {
            retry!(self, tx_select()).await?;
            self.tx.store(true, Ordering::Release);
            Ok(())
        })
    }
    fn tx_commit(&self) -> BoxFuture<'_, Result<(), Error>> {
        // A transaction does not survive its channel: a commit after a loss fails (what it
        // held was rolled back by the broker), the caller decides whether to redo it.
        Box::pin(async move {
            let slot = self.current(Instant::now()).await?;
            slot.raw.tx_commit().await
        })
    }
    fn tx_rollback(&self) -> BoxFuture<'_, Result<(), Error>> {
        Box::pin(async move {
            let slot = self.current(Instant::now()).await?;
            slot.raw.tx_rollback().await
        })
    }
    fn take_returns(&self) -> Option<mpsc::UnboundedReceiver<RawReturn>> {
        self.returns_rx.lock().ok()?.take()
    }
    fn close(&self) -> BoxFuture<'_, Result<(), Error>> {
        Box::pin(async move {
            self.user_closed.store(true, Ordering::Release);
            self.wake_consumers();
            let slot = self.slot.load_full();
            if slot.raw.is_closed() {
                return Ok(());
            }
            match slot.raw.close().await {
                Err(e) if is_connection_loss(&e) => Ok(()),
                r => r,
            }
        })
    }
    fn is_closed(&self) -> bool {
        self.user_closed.load(Ordering::Acquire) || self.shared.is_closed_for_good()
    }
    fn transport(&self) -> &'static str {
        self.slot.load().raw.transport()
    }
}
