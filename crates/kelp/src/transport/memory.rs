//! `memory://`: an in-process broker on the [`virtual_broker`](super::virtual_broker) core.
//!
//! Every connection in the process that names the same URL (`memory://`, `memory://name`)
//! shares one broker. Nothing is persisted. Consumers are woken by publishes, requeues and
//! acknowledgements (when prefetch credit frees up), never by polling. What time alone brings
//! about — messages expiring (and being dead-lettered), delayed messages falling due, unused
//! queues reaching their `x-expires` — is done by one sweeper thread per broker, started when
//! something first has a deadline: it sleeps until the broker's next deadline, and is woken
//! early whenever an operation schedules a sooner one, so consumers waiting on any queue
//! (a dead-letter target, say) see those messages on time.

use std::collections::{HashMap, VecDeque};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock, Weak};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use futures_core::Stream;
use kelp_amqp::{BasicProperties, FieldTable, ShortString};
use tokio::sync::mpsc;

use super::virtual_broker::{
    self as vb, BrokerError, ExchangeKind, ExchangeOptions, MessageData, Notice, OwnerId,
    QueueOptions, SessionId, VirtualBroker,
};
use super::{
    BoxFuture, ConsumeSpec, DeliveryStream, ExchangeFlags, PublishOutcome, QueueDeclared,
    QueueFlags, RawDelivery, RawReturn, Transport, TransportChannel,
};
use crate::error::Error;

/// How many messages a consumer takes from the broker per lock.
const BATCH: usize = 256;

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

/// One in-process broker and who waits on it.
#[derive(Debug, Default)]
struct Shared {
    state: Mutex<State>,
    next_owner: AtomicU64,
    sweeper: Arc<Sweeper>,
}

impl Drop for Shared {
    fn drop(&mut self) {
        self.sweeper.stop();
    }
}

/// The thread that does what falls due with time (see the module docs), and how to reach it.
#[derive(Debug, Default)]
struct Sweeper {
    signal: Mutex<SweepSignal>,
    cv: Condvar,
}

#[derive(Debug, Default)]
struct SweepSignal {
    /// A thread is running (or starting).
    running: bool,
    /// A sooner deadline was set in [`State::sweep_at`]: look again.
    rearm: bool,
    /// The broker is gone: end.
    stop: bool,
}

impl Sweeper {
    /// Have the thread look at the broker again (a sooner deadline is in
    /// [`State::sweep_at`]); start it if it is not running.
    fn rearm(self: &Arc<Self>, shared: &Arc<Shared>) {
        let Ok(mut sig) = self.signal.lock() else {
            return;
        };
        sig.rearm = true;
        if sig.running {
            self.cv.notify_all();
            return;
        }
        sig.running = true;
        drop(sig);
        let (weak, me) = (Arc::downgrade(shared), self.clone());
        let started = std::thread::Builder::new()
            .name("kelp-memory-sweeper".into())
            .spawn(move || sweep(&weak, &me));
        if let Err(e) = started {
            tracing::warn!(error = %e, "memory broker: cannot start the expiry thread; messages expire only when the broker is used");
            if let Ok(mut sig) = self.signal.lock() {
                sig.running = false;
            }
        }
    }

    fn stop(&self) {
        if let Ok(mut sig) = self.signal.lock() {
            sig.stop = true;
        }
        self.cv.notify_all();
    }
}

/// The sweeper thread: expire what is due, sleep until the next deadline (or until re-armed),
/// again, until the broker is dropped.
fn sweep(shared: &Weak<Shared>, sweeper: &Sweeper) {
    loop {
        let Some(strong) = shared.upgrade() else {
            break;
        };
        let at = with_state(&strong, |s, _| {
            let now = now_ms();
            if s.broker.next_expiry().is_some_and(|t| t <= now) {
                s.broker.expire(now);
            }
            // All of it is in `next_expiry` now.
            let _ = s.broker.take_new_deadline();
            s.sweep_at = s.broker.next_expiry();
            s.sweep_at
        });
        // The broker may be dropped while this sleeps (its drop stops this thread).
        drop(strong);
        let Ok(at) = at else {
            break;
        };
        let Ok(mut sig) = sweeper.signal.lock() else {
            return;
        };
        loop {
            if sig.stop {
                sig.running = false;
                return;
            }
            if sig.rearm {
                sig.rearm = false;
                break;
            }
            let Some(at) = at else {
                sig = match sweeper.cv.wait(sig) {
                    Ok(g) => g,
                    Err(_) => return,
                };
                continue;
            };
            let now = now_ms();
            if at <= now {
                break;
            }
            sig = match sweeper
                .cv
                .wait_timeout(sig, Duration::from_millis(at - now))
            {
                Ok((g, _)) => g,
                Err(_) => return,
            };
        }
    }
    if let Ok(mut sig) = sweeper.signal.lock() {
        sig.running = false;
    }
}

#[derive(Debug, Default)]
struct State {
    broker: VirtualBroker,
    /// Idle consumers: id → (queue, session, waker).
    waiters: HashMap<u64, (Arc<str>, SessionId, Waker)>,
    /// Consumers the broker cancelled (their queue was deleted).
    cancelled: HashMap<(SessionId, ShortString), Arc<str>>,
    /// Returned messages per session (no consumer of the returns yet: kept until taken).
    returns: HashMap<SessionId, mpsc::UnboundedSender<RawReturn>>,
    next_waiter: u64,
    /// When the sweeper thread looks at the broker next (`None`: nothing is scheduled).
    sweep_at: Option<u64>,
}

impl State {
    /// Wake consumers of `queue`.
    fn wake_queue(&mut self, queue: &str, out: &mut Vec<Waker>) {
        self.waiters.retain(|_, (q, _, w)| {
            if &**q == queue {
                out.push(w.clone());
                false
            } else {
                true
            }
        });
    }

    fn wake_session(&mut self, session: SessionId, out: &mut Vec<Waker>) {
        self.waiters.retain(|_, (_, s, w)| {
            if *s == session {
                out.push(w.clone());
                false
            } else {
                true
            }
        });
    }

    /// React to what the broker reports (requeues, dead-letters, cancels).
    fn notices(&mut self, out: &mut Vec<Waker>) {
        if !self.broker.has_notices() {
            return;
        }
        for n in self.broker.take_notices() {
            match n {
                Notice::QueueReady(q) => self.wake_queue(&q, out),
                Notice::ConsumerCancelled {
                    session,
                    consumer_tag,
                    queue,
                } => {
                    self.cancelled
                        .insert((session, consumer_tag.clone()), queue.clone());
                    self.wake_queue(&queue, out);
                }
                Notice::QueueDeleted(q) => self.wake_queue(&q, out),
            }
        }
    }
}

fn brokers() -> &'static Mutex<HashMap<String, Weak<Shared>>> {
    static B: OnceLock<Mutex<HashMap<String, Weak<Shared>>>> = OnceLock::new();
    B.get_or_init(|| Mutex::new(HashMap::new()))
}

/// Run `f` on the broker state, then wake whoever it made runnable (outside the lock), and
/// the sweeper when `f` scheduled something sooner than it will look.
fn with_state<T>(
    shared: &Arc<Shared>,
    f: impl FnOnce(&mut State, &mut Vec<Waker>) -> T,
) -> Result<T, Error> {
    let mut wake = Vec::new();
    let (out, rearm) = {
        let mut g: MutexGuard<'_, State> = shared.state.lock().map_err(|_| Error::Closed {
            what: "the memory broker (a thread panicked while holding it)",
        })?;
        let out = f(&mut g, &mut wake);
        g.notices(&mut wake);
        let sooner = g
            .broker
            .take_new_deadline()
            .filter(|t| g.sweep_at.is_none_or(|at| *t < at));
        if sooner.is_some() {
            g.sweep_at = sooner;
        }
        (out, sooner.is_some())
    };
    for w in wake {
        w.wake();
    }
    if rearm {
        shared.sweeper.rearm(shared);
    }
    Ok(out)
}

/// A connection to an in-process broker.
#[derive(Debug)]
pub struct MemoryTransport {
    shared: Arc<Shared>,
    owner: OwnerId,
    closed: AtomicBool,
    /// Flips to true on close, for `Transport::close_signal` waiters.
    closed_watch: tokio::sync::watch::Sender<bool>,
}

impl MemoryTransport {
    /// Attach to the broker `url` names (created on first use, dropped with its last
    /// connection).
    pub fn open(url: &str) -> Result<Self, Error> {
        let key = url
            .split_once("://")
            .map(|(_, rest)| rest.trim_end_matches('/'))
            .unwrap_or("")
            .to_owned();
        let mut map = brokers().lock().map_err(|_| Error::Closed {
            what: "the memory broker registry",
        })?;
        map.retain(|_, w| w.strong_count() > 0);
        let shared = match map.get(&key).and_then(Weak::upgrade) {
            Some(s) => s,
            None => {
                let s = Arc::new(Shared::default());
                map.insert(key, Arc::downgrade(&s));
                s
            }
        };
        let owner = OwnerId(shared.next_owner.fetch_add(1, Ordering::Relaxed) + 1);
        Ok(MemoryTransport {
            shared,
            owner,
            closed: AtomicBool::new(false),
            closed_watch: tokio::sync::watch::channel(false).0,
        })
    }
}

impl Drop for MemoryTransport {
    fn drop(&mut self) {
        if !self.closed.swap(true, Ordering::AcqRel) {
            let owner = self.owner;
            let _ = with_state(&self.shared, |s, _| s.broker.close_owner(owner, now_ms()));
        }
    }
}

impl Transport for MemoryTransport {
    fn name(&self) -> &'static str {
        "memory"
    }
    fn open_channel(&self) -> BoxFuture<'_, Result<Arc<dyn TransportChannel>, Error>> {
        Box::pin(async move {
            if self.closed.load(Ordering::Acquire) {
                return Err(Error::Closed { what: "connection" });
            }
            let owner = self.owner;
            let session = with_state(&self.shared, |s, _| s.broker.open_session(owner))?;
            let ch: Arc<dyn TransportChannel> = Arc::new(MemoryChannel {
                shared: self.shared.clone(),
                owner,
                session,
                confirm: AtomicBool::new(false),
                closed: AtomicBool::new(false),
                returns_rx: Mutex::new(None),
            });
            Ok(ch)
        })
    }
    fn close(&self) -> BoxFuture<'_, Result<(), Error>> {
        Box::pin(async move {
            if !self.closed.swap(true, Ordering::AcqRel) {
                let owner = self.owner;
                self.closed_watch.send_replace(true);
                with_state(&self.shared, |s, _| s.broker.close_owner(owner, now_ms()))?;
            }
            Ok(())
        })
    }
    fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Acquire)
    }
    fn close_signal(&self) -> BoxFuture<'static, Error> {
        let mut watch = self.closed_watch.subscribe();
        Box::pin(async move {
            // A dropped transport drops the sender: closed as well.
            let _ = watch.wait_for(|closed| *closed).await;
            Error::Closed { what: "connection" }
        })
    }
}

/// A channel (a broker session) on a memory connection.
#[derive(Debug)]
pub struct MemoryChannel {
    shared: Arc<Shared>,
    owner: OwnerId,
    session: SessionId,
    confirm: AtomicBool,
    closed: AtomicBool,
    returns_rx: Mutex<Option<mpsc::UnboundedReceiver<RawReturn>>>,
}

impl MemoryChannel {
    /// Run `f` on the broker, first expiring what is due: RabbitMQ expires (and dead-letters)
    /// messages on its own clock, so anything a caller can observe — a `get`, a declare's
    /// message count, a purge — must not still see them.
    fn run<T>(
        &self,
        f: impl FnOnce(&mut State, &mut Vec<Waker>) -> Result<T, BrokerError>,
    ) -> Result<T, Error> {
        self.run_unswept(|s, w| {
            let now = now_ms();
            if s.broker.next_expiry().is_some_and(|t| t <= now) {
                s.broker.expire(now);
            }
            f(s, w)
        })
    }

    /// Run `f` on the broker without the expiry sweep (the per-message hot paths: publish,
    /// ack, reject; nothing there observes an expired message).
    fn run_unswept<T>(
        &self,
        f: impl FnOnce(&mut State, &mut Vec<Waker>) -> Result<T, BrokerError>,
    ) -> Result<T, Error> {
        if self.closed.load(Ordering::Acquire) {
            return Err(Error::Closed { what: "channel" });
        }
        match with_state(&self.shared, f)? {
            Ok(v) => Ok(v),
            Err(e) => {
                // As in AMQP, a refused method closes its channel (RabbitMQ's channel
                // exception): unacked messages go back, consumers end, later calls fail.
                let _ = self.close_session();
                Err(e.into())
            }
        }
    }

    /// Close the broker session once; later calls are no-ops.
    fn close_session(&self) -> Result<(), Error> {
        if self.closed.swap(true, Ordering::AcqRel) {
            return Ok(());
        }
        let session = self.session;
        with_state(&self.shared, |s, w| {
            s.wake_session(session, w);
            s.returns.remove(&session);
            s.broker.close_session(session, now_ms())
        })?
        .map(drop)
        .map_err(Error::from)
    }
}

impl Drop for MemoryChannel {
    fn drop(&mut self) {
        let _ = self.close_session();
    }
}

fn ready<T: Send + 'static>(v: Result<T, Error>) -> BoxFuture<'static, Result<T, Error>> {
    Box::pin(std::future::ready(v))
}

impl TransportChannel for MemoryChannel {
    fn exchange_declare<'a>(
        &'a self,
        name: &'a str,
        kind: &'a str,
        flags: ExchangeFlags,
        arguments: &'a FieldTable,
    ) -> BoxFuture<'a, Result<(), Error>> {
        let opts = ExchangeOptions {
            passive: flags.passive,
            durable: flags.durable,
            auto_delete: flags.auto_delete,
            internal: flags.internal,
        };
        ready(self.run(|s, _| {
            s.broker
                .declare_exchange(name, ExchangeKind::parse(kind), opts, arguments)
        }))
    }
    fn exchange_delete<'a>(
        &'a self,
        name: &'a str,
        if_unused: bool,
    ) -> BoxFuture<'a, Result<(), Error>> {
        ready(self.run(|s, _| s.broker.delete_exchange(name, if_unused)))
    }
    fn exchange_bind<'a>(
        &'a self,
        destination: &'a str,
        source: &'a str,
        routing_key: &'a str,
        arguments: &'a FieldTable,
    ) -> BoxFuture<'a, Result<(), Error>> {
        ready(self.run(|s, _| {
            s.broker
                .bind_exchange(destination, source, routing_key, arguments)
        }))
    }
    fn exchange_unbind<'a>(
        &'a self,
        destination: &'a str,
        source: &'a str,
        routing_key: &'a str,
        arguments: &'a FieldTable,
    ) -> BoxFuture<'a, Result<(), Error>> {
        ready(self.run(|s, _| {
            s.broker
                .unbind_exchange(destination, source, routing_key, arguments)
        }))
    }
    fn queue_declare<'a>(
        &'a self,
        name: &'a str,
        flags: QueueFlags,
        arguments: &'a FieldTable,
    ) -> BoxFuture<'a, Result<QueueDeclared, Error>> {
        let opts = QueueOptions {
            passive: flags.passive,
            durable: flags.durable,
            exclusive: flags.exclusive,
            auto_delete: flags.auto_delete,
        };
        let owner = self.owner;
        ready(
            self.run(|s, _| {
                s.broker
                    .declare_queue(owner, name, opts, arguments, now_ms())
            })
            .map(|ok| QueueDeclared {
                name: ok.queue.to_string(),
                message_count: ok.message_count,
                consumer_count: ok.consumer_count,
            }),
        )
    }
    fn queue_bind<'a>(
        &'a self,
        queue: &'a str,
        exchange: &'a str,
        routing_key: &'a str,
        arguments: &'a FieldTable,
    ) -> BoxFuture<'a, Result<(), Error>> {
        let owner = self.owner;
        ready(self.run(|s, _| {
            s.broker
                .bind_queue(owner, queue, exchange, routing_key, arguments)
        }))
    }
    fn queue_unbind<'a>(
        &'a self,
        queue: &'a str,
        exchange: &'a str,
        routing_key: &'a str,
        arguments: &'a FieldTable,
    ) -> BoxFuture<'a, Result<(), Error>> {
        let owner = self.owner;
        ready(self.run(|s, _| {
            s.broker
                .unbind_queue(owner, queue, exchange, routing_key, arguments)
        }))
    }
    fn queue_purge<'a>(&'a self, queue: &'a str) -> BoxFuture<'a, Result<u32, Error>> {
        let owner = self.owner;
        ready(self.run(|s, _| s.broker.purge_queue(owner, queue)))
    }
    fn queue_delete<'a>(
        &'a self,
        queue: &'a str,
        if_unused: bool,
        if_empty: bool,
    ) -> BoxFuture<'a, Result<u32, Error>> {
        let owner = self.owner;
        ready(self.run(|s, _| s.broker.delete_queue(owner, queue, if_unused, if_empty)))
    }
    fn publish<'a>(
        &'a self,
        exchange: &'a str,
        routing_key: &'a str,
        mandatory: bool,
        properties: BasicProperties,
        body: Bytes,
    ) -> BoxFuture<'a, Result<PublishOutcome, Error>> {
        let confirm = self.confirm.load(Ordering::Relaxed);
        let session = self.session;
        let msg = MessageData::new(exchange, routing_key, properties, body);
        let returned_copy = mandatory.then(|| msg.clone());
        let r = self.run_unswept(|s, wake| {
            let out = s.broker.publish(msg, mandatory, now_ms())?;
            for q in out.queues.iter() {
                if !s.waiters.is_empty() {
                    s.wake_queue(q, wake);
                }
            }
            if out.returned {
                if let Some(m) = returned_copy {
                    let r = RawReturn {
                        reply_code: 312,
                        reply_text: "NO_ROUTE".into(),
                        exchange: m.exchange.to_string(),
                        routing_key: m.routing_key.to_string(),
                        properties: m.properties,
                        body: m.body,
                    };
                    if confirm {
                        return Ok(Err(r));
                    }
                    let tx = s.returns.entry(session).or_insert_with(|| {
                        let (tx, rx) = mpsc::unbounded_channel();
                        if let Ok(mut slot) = self.returns_rx.lock() {
                            *slot = Some(rx);
                        }
                        tx
                    });
                    let _ = tx.send(r);
                }
            }
            Ok(Ok(out.should_nack()))
        });
        ready(match r {
            Err(e) => Err(e),
            Ok(Err(r)) => Err(Error::Returned {
                reply_code: r.reply_code,
                reply_text: r.reply_text,
                exchange: r.exchange,
                routing_key: r.routing_key,
            }),
            Ok(Ok(nack)) if confirm => Ok(if nack {
                PublishOutcome::Nacked
            } else {
                PublishOutcome::Acked
            }),
            Ok(Ok(_)) => Ok(PublishOutcome::Sent),
        })
    }
    fn get<'a>(
        &'a self,
        queue: &'a str,
        no_ack: bool,
    ) -> BoxFuture<'a, Result<Option<RawDelivery>, Error>> {
        let session = self.session;
        ready(
            self.run(|s, _| s.broker.get(session, queue, no_ack, now_ms()))
                .map(|d| d.map(|d| raw(d, &ShortString::empty()))),
        )
    }
    fn consume<'a>(
        &'a self,
        queue: &'a str,
        spec: ConsumeSpec,
    ) -> BoxFuture<'a, Result<(String, DeliveryStream), Error>> {
        let session = self.session;
        let opts = vb::ConsumeOptions {
            no_ack: spec.no_ack,
            exclusive: spec.exclusive,
            priority: 0,
        };
        let r = self.run(|s, _| {
            let opts = opts.with_arguments(queue, &spec.arguments)?;
            let tag = s
                .broker
                .consume(session, queue, &spec.tag, opts, now_ms())?;
            s.next_waiter += 1;
            Ok((tag, s.next_waiter))
        });
        ready(r.map(|(tag, id)| {
            let stream: DeliveryStream = Box::pin(MemoryConsumer {
                shared: self.shared.clone(),
                session,
                tag: tag.clone(),
                queue: Arc::from(queue),
                id,
                buf: VecDeque::new(),
                scratch: Vec::new(),
                done: false,
            });
            (tag.to_string(), stream)
        }))
    }
    fn cancel<'a>(&'a self, consumer_tag: &'a str) -> BoxFuture<'a, Result<(), Error>> {
        let session = self.session;
        ready(self.run(|s, w| {
            s.cancelled
                .insert((session, ShortString::from(consumer_tag)), Arc::from(""));
            s.wake_session(session, w);
            s.broker.cancel(session, consumer_tag, now_ms()).map(drop)
        }))
    }
    fn ack(&self, delivery_tag: u64, multiple: bool) -> BoxFuture<'_, Result<(), Error>> {
        let session = self.session;
        ready(self.run_unswept(|s, w| {
            s.wake_session(session, w);
            s.broker.ack(session, delivery_tag, multiple).map(drop)
        }))
    }
    fn nack(
        &self,
        delivery_tag: u64,
        multiple: bool,
        requeue: bool,
    ) -> BoxFuture<'_, Result<(), Error>> {
        let session = self.session;
        ready(self.run_unswept(|s, w| {
            s.wake_session(session, w);
            s.broker
                .nack(session, delivery_tag, multiple, requeue, now_ms())
                .map(drop)
        }))
    }
    fn reject(&self, delivery_tag: u64, requeue: bool) -> BoxFuture<'_, Result<(), Error>> {
        let session = self.session;
        ready(self.run_unswept(|s, w| {
            s.wake_session(session, w);
            s.broker.reject(session, delivery_tag, requeue, now_ms())
        }))
    }
    fn recover(&self, requeue: bool) -> BoxFuture<'_, Result<(), Error>> {
        let session = self.session;
        ready(self.run(|s, w| {
            s.wake_session(session, w);
            s.broker.recover(session, requeue).map(drop)
        }))
    }
    fn qos(&self, prefetch_count: u16, global: bool) -> BoxFuture<'_, Result<(), Error>> {
        let session = self.session;
        ready(self.run(|s, w| {
            s.wake_session(session, w);
            s.broker.qos(session, prefetch_count, global)
        }))
    }
    fn flow(&self, _active: bool) -> BoxFuture<'_, Result<(), Error>> {
        ready(Err(Error::NotSupported {
            transport: "memory",
            what: "channel.flow",
        }))
    }
    fn confirm_select(&self) -> BoxFuture<'_, Result<(), Error>> {
        self.confirm.store(true, Ordering::Relaxed);
        ready(Ok(()))
    }
    fn tx_select(&self) -> BoxFuture<'_, Result<(), Error>> {
        ready(Err(Error::NotSupported {
            transport: "memory",
            what: "transactions",
        }))
    }
    fn tx_commit(&self) -> BoxFuture<'_, Result<(), Error>> {
        self.tx_select()
    }
    fn tx_rollback(&self) -> BoxFuture<'_, Result<(), Error>> {
        self.tx_select()
    }
    fn take_returns(&self) -> Option<mpsc::UnboundedReceiver<RawReturn>> {
        let session = self.session;
        let mut slot = self.returns_rx.lock().ok()?;
        if let Some(rx) = slot.take() {
            return Some(rx);
        }
        let (tx, rx) = mpsc::unbounded_channel();
        let fresh = with_state(&self.shared, |s, _| match s.returns.entry(session) {
            std::collections::hash_map::Entry::Occupied(_) => false,
            std::collections::hash_map::Entry::Vacant(v) => {
                v.insert(tx);
                true
            }
        })
        .ok()?;
        fresh.then_some(rx)
    }
    fn close(&self) -> BoxFuture<'_, Result<(), Error>> {
        ready(self.close_session())
    }
    fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Acquire)
    }
    fn transport(&self) -> &'static str {
        "memory"
    }
}

fn raw(d: vb::Delivery, consumer_tag: &ShortString) -> RawDelivery {
    RawDelivery {
        delivery_tag: d.delivery_tag,
        redelivered: d.redelivered,
        exchange: d.message.exchange.clone(),
        routing_key: d.message.routing_key.clone(),
        consumer_tag: consumer_tag.clone(),
        properties: d.message.properties.clone(),
        body: d.message.body.clone(),
    }
}

/// A consumer's stream: takes batches from the broker and sleeps on a waker when there is
/// nothing (or no prefetch credit). Messages that arrive with time (dead-lettered on expiry,
/// delayed) wake it through the broker's sweeper like any other arrival.
struct MemoryConsumer {
    shared: Arc<Shared>,
    session: SessionId,
    /// Cloned into every delivery: a refcount, not an allocation.
    tag: ShortString,
    queue: Arc<str>,
    id: u64,
    buf: VecDeque<RawDelivery>,
    scratch: Vec<vb::Delivery>,
    done: bool,
}

enum Step {
    Got,
    Cancelled(Arc<str>),
    Ended,
    Wait,
}

impl Stream for MemoryConsumer {
    type Item = Result<RawDelivery, Error>;
    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = &mut *self;
        if let Some(d) = this.buf.pop_front() {
            return Poll::Ready(Some(Ok(d)));
        }
        if this.done {
            return Poll::Ready(None);
        }
        let (session, id, queue) = (this.session, this.id, this.queue.clone());
        let tag = this.tag.clone();
        let scratch = &mut this.scratch;
        let step = with_state(&this.shared, |s, wake| {
            let cancelled = if s.cancelled.is_empty() {
                None
            } else {
                s.cancelled.remove(&(session, tag.clone()))
            };
            if let Some(q) = cancelled {
                s.waiters.remove(&id);
                return if q.is_empty() {
                    Step::Ended
                } else {
                    Step::Cancelled(q)
                };
            }
            let now = now_ms();
            if s.broker.next_expiry().is_some_and(|t| t <= now) {
                s.broker.expire(now);
            }
            scratch.clear();
            // A queue shared by consumers of equal standing is dealt out one message at a
            // time, so they take turns as RabbitMQ's round-robin has them; a lone consumer (or
            // the single active one, or the only one of the highest priority) takes a batch
            // per lock.
            match s.broker.take_turn(session, &tag, BATCH, now, scratch) {
                Ok(turn) if turn.taken > 0 => {
                    s.waiters.remove(&id);
                    if turn.wake_others {
                        // Let the idle ones have the next.
                        s.wake_queue(&queue, wake);
                    }
                    Step::Got
                }
                Ok(_) => {
                    s.waiters
                        .insert(id, (queue.clone(), session, cx.waker().clone()));
                    Step::Wait
                }
                Err(_) => {
                    s.waiters.remove(&id);
                    Step::Ended
                }
            }
        });
        match step {
            Err(e) => {
                this.done = true;
                Poll::Ready(Some(Err(e)))
            }
            Ok(Step::Got) => {
                for d in this.scratch.drain(..) {
                    this.buf.push_back(raw(d, &this.tag));
                }
                match this.buf.pop_front() {
                    Some(d) => Poll::Ready(Some(Ok(d))),
                    None => Poll::Pending,
                }
            }
            Ok(Step::Cancelled(q)) => {
                this.done = true;
                Poll::Ready(Some(Err(Error::ConsumerCancelled {
                    consumer_tag: this.tag.to_string(),
                    queue: q.to_string(),
                })))
            }
            Ok(Step::Ended) => {
                this.done = true;
                Poll::Ready(None)
            }
            Ok(Step::Wait) => Poll::Pending,
        }
    }
}

impl Drop for MemoryConsumer {
    fn drop(&mut self) {
        let (session, id) = (self.session, self.id);
        let tag = std::mem::take(&mut self.tag);
        let done = self.done;
        let _ = with_state(&self.shared, |s, _| {
            s.waiters.remove(&id);
            s.cancelled.remove(&(session, tag.clone()));
            if !done {
                let _ = s.broker.cancel(session, &tag, now_ms());
            }
        });
    }
}
