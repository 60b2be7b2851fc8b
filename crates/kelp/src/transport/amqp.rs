//! `amqp://` and `amqps://`: RabbitMQ (or any AMQP 0-9-1 broker) through `kelp-amqp`.

use std::collections::VecDeque;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use bytes::Bytes;
use futures_core::Stream;
use kelp_amqp::options::{
    ConsumeOptions, ExchangeDeclareOptions, ExchangeDeleteOptions, ExchangeKind, PublishOptions,
    QosOptions, QueueDeclareOptions, QueueDeleteOptions,
};
use kelp_amqp::{BasicProperties, Confirmation, FieldTable};
use tokio::sync::mpsc;

use super::{
    BoxFuture, ConsumeSpec, DeliveryStream, ExchangeFlags, PublishOutcome, QueueDeclared,
    QueueFlags, RawDelivery, RawReturn, Transport, TransportChannel,
};
use crate::connection::ConnectOptions;
use crate::error::Error;

/// A connection to an AMQP broker.
#[derive(Debug)]
pub struct AmqpTransport {
    conn: kelp_amqp::Connection,
    /// Set by [`Transport::close`], so `is_closed` holds as soon as `close` returns (the
    /// driver marks the `kelp_amqp` handle closed a moment later).
    closed_by_us: AtomicBool,
}

impl AmqpTransport {
    /// Connect to `url` (the RabbitMQ URI spec, or Kombu's `amqp://host//` form).
    pub async fn connect(url: &str, options: &ConnectOptions) -> Result<Self, Error> {
        let mut parsed = kelp_amqp::AmqpUrl::parse(url)
            .map_err(|e| kelp_amqp::Error::Url(std::sync::Arc::new(e)))?;
        if let Some(hb) = options.heartbeat {
            // An explicit `?heartbeat=` in the URL wins over the builder's default.
            if parsed.heartbeat.is_none() {
                parsed.heartbeat = Some(u16::try_from(hb.as_secs()).unwrap_or(u16::MAX));
            }
        }
        let mut b = kelp_amqp::ConnectionBuilder::from_url(parsed);
        if let Some(name) = &options.connection_name {
            b = b.connection_name(name.clone());
        }
        if let Some(props) = &options.client_properties {
            b = b.client_properties(props.clone());
        }
        let fut = b.connect();
        let conn = match options.connect_timeout {
            Some(t) => tokio::time::timeout(t, fut)
                .await
                .map_err(|_| Error::Timeout {
                    what: "the AMQP connection to open",
                    after: t,
                })??,
            None => fut.await?,
        };
        Ok(AmqpTransport {
            conn,
            closed_by_us: AtomicBool::new(false),
        })
    }

    /// The underlying `kelp-amqp` connection.
    pub fn inner(&self) -> &kelp_amqp::Connection {
        &self.conn
    }
}

impl Transport for AmqpTransport {
    fn name(&self) -> &'static str {
        "amqp"
    }
    fn open_channel(&self) -> BoxFuture<'_, Result<Arc<dyn TransportChannel>, Error>> {
        Box::pin(async move {
            if self.closed_by_us.load(Ordering::Acquire) {
                return Err(Error::Closed { what: "connection" });
            }
            let ch = self.conn.channel().await?;
            let returns = ch.returns();
            let ch: Arc<dyn TransportChannel> = Arc::new(AmqpChannel {
                ch,
                closed_by_us: AtomicBool::new(false),
                mandatory: tokio::sync::Mutex::new(()),
                returns: Arc::new(ReturnRouter {
                    state: Mutex::new(RouterState {
                        rx: returns,
                        ended: false,
                        waiting: Vec::new(),
                        unclaimed: VecDeque::new(),
                        user_waker: None,
                        user_taken: false,
                        next_id: 0,
                    }),
                }),
            });
            Ok(ch)
        })
    }
    fn close(&self) -> BoxFuture<'_, Result<(), Error>> {
        Box::pin(async move {
            self.closed_by_us.store(true, Ordering::Release);
            Ok(self.conn.close().await?)
        })
    }
    fn is_closed(&self) -> bool {
        self.closed_by_us.load(Ordering::Acquire) || self.conn.is_closed()
    }
    fn close_signal(&self) -> BoxFuture<'static, Error> {
        let signal = self.conn.close_signal();
        Box::pin(async move { Error::Amqp(signal.wait().await) })
    }
    fn heartbeat(&self) -> Option<Duration> {
        let hb = self.conn.tuning().heartbeat;
        (!hb.is_zero()).then_some(hb)
    }
}

/// A channel on an AMQP connection.
#[derive(Debug)]
pub struct AmqpChannel {
    ch: kelp_amqp::Channel,
    /// Set by [`TransportChannel::close`]: the fire-and-forget methods (ack, nack, reject,
    /// publish) must fail once we closed the channel, even before the driver has marked the
    /// `kelp_amqp` handle closed (it does so only after `close()` has returned).
    closed_by_us: AtomicBool,
    /// Held across a mandatory publish under confirms, from publish to confirm. A
    /// `basic.return` names only the exchange, routing key and properties, so two such
    /// publishes in flight with the same ones (one routed, one not — by headers, say) could
    /// not be told apart; one at a time they always can.
    mandatory: tokio::sync::Mutex<()>,
    returns: Arc<ReturnRouter>,
}

/// Matches returned messages to the mandatory publishes waiting for their confirm, and hands
/// the rest to the user's stream. Any reader of the channel's returns routes what it reads, so
/// no reader can steal a return another one waits for. The broker sends `basic.return` before
/// the `basic.ack` of the same message, and the driver queues the return before it resolves
/// the confirm, so a publisher that checks after its ack sees its return.
#[derive(Debug)]
struct ReturnRouter {
    state: Mutex<RouterState>,
}

#[derive(Debug)]
struct RouterState {
    rx: kelp_amqp::Returns,
    ended: bool,
    waiting: Vec<Waiting>,
    unclaimed: VecDeque<RawReturn>,
    user_waker: Option<Waker>,
    user_taken: bool,
    next_id: u64,
}

#[derive(Debug)]
struct Waiting {
    id: u64,
    exchange: String,
    routing_key: String,
    message_id: Option<String>,
    got: Option<RawReturn>,
}

impl RouterState {
    fn route(&mut self, r: RawReturn) {
        let mid = r.properties.message_id.as_ref().map(|m| m.as_str());
        let slot = self.waiting.iter_mut().find(|w| {
            w.got.is_none()
                && w.exchange == r.exchange
                && w.routing_key == r.routing_key
                && w.message_id.as_deref() == mid
        });
        match slot {
            Some(w) => w.got = Some(r),
            None => {
                self.unclaimed.push_back(r);
                if let Some(w) = &self.user_waker {
                    w.wake_by_ref();
                }
            }
        }
    }

    /// Read everything already queued, registering `cx` (or the user's waker) for more.
    fn pump(&mut self, cx: Option<&mut Context<'_>>) {
        let waker = match cx {
            Some(cx) => cx.waker().clone(),
            None => self
                .user_waker
                .clone()
                .unwrap_or_else(|| Waker::noop().clone()),
        };
        let mut cx = Context::from_waker(&waker);
        while !self.ended {
            match Pin::new(&mut self.rx).poll_next(&mut cx) {
                Poll::Ready(Some(m)) => self.route(RawReturn {
                    reply_code: m.reply_code,
                    reply_text: m.reply_text.to_string(),
                    exchange: m.exchange.to_string(),
                    routing_key: m.routing_key.to_string(),
                    properties: m.properties,
                    body: m.body,
                }),
                Poll::Ready(None) => self.ended = true,
                Poll::Pending => break,
            }
        }
    }
}

impl ReturnRouter {
    fn register(&self, exchange: &str, routing_key: &str, message_id: Option<&str>) -> u64 {
        let Ok(mut s) = self.state.lock() else {
            return u64::MAX;
        };
        s.next_id += 1;
        let id = s.next_id;
        s.waiting.push(Waiting {
            id,
            exchange: exchange.to_owned(),
            routing_key: routing_key.to_owned(),
            message_id: message_id.map(str::to_owned),
            got: None,
        });
        id
    }

    fn finish(&self, id: u64) -> Option<RawReturn> {
        let mut s = self.state.lock().ok()?;
        s.pump(None);
        let i = s.waiting.iter().position(|w| w.id == id)?;
        s.waiting.swap_remove(i).got
    }
}

/// A publish's wait for its return; forgets itself if the publish is abandoned (cancelled or
/// timed out), so no later return is routed to it.
struct Slot<'a> {
    router: &'a ReturnRouter,
    id: u64,
}

impl Drop for Slot<'_> {
    fn drop(&mut self) {
        if let Ok(mut s) = self.router.state.lock() {
            if let Some(i) = s.waiting.iter().position(|w| w.id == self.id) {
                s.waiting.swap_remove(i);
            }
        }
    }
}

/// The user's stream of returned messages for one channel.
#[derive(Debug)]
pub struct AmqpReturns {
    router: Arc<ReturnRouter>,
}

impl Stream for AmqpReturns {
    type Item = RawReturn;
    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<RawReturn>> {
        let Ok(mut s) = self.router.state.lock() else {
            return Poll::Ready(None);
        };
        s.user_waker = Some(cx.waker().clone());
        s.pump(Some(cx));
        match s.unclaimed.pop_front() {
            Some(r) => Poll::Ready(Some(r)),
            None if s.ended => Poll::Ready(None),
            None => Poll::Pending,
        }
    }
}

fn delivery(d: kelp_amqp::Delivery) -> RawDelivery {
    RawDelivery {
        delivery_tag: d.delivery_tag,
        redelivered: d.redelivered,
        exchange: d.exchange,
        routing_key: d.routing_key,
        consumer_tag: d.consumer_tag,
        properties: d.properties,
        body: d.body,
    }
}

struct ConsumerStream {
    inner: kelp_amqp::Consumer,
}

impl Stream for ConsumerStream {
    type Item = Result<RawDelivery, Error>;
    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        match Pin::new(&mut self.inner).poll_next(cx) {
            Poll::Ready(Some(Ok(d))) => Poll::Ready(Some(Ok(delivery(d)))),
            Poll::Ready(Some(Err(kelp_amqp::Error::ConsumerCancelled {
                consumer_tag, ..
            }))) => Poll::Ready(Some(Err(Error::ConsumerCancelled {
                consumer_tag,
                queue: self.inner.queue().to_owned(),
            }))),
            Poll::Ready(Some(Err(e))) => Poll::Ready(Some(Err(e.into()))),
            Poll::Ready(None) => Poll::Ready(None),
            Poll::Pending => Poll::Pending,
        }
    }
}

fn kind(name: &str) -> ExchangeKind {
    match name {
        "direct" => ExchangeKind::Direct,
        "fanout" => ExchangeKind::Fanout,
        "topic" => ExchangeKind::Topic,
        "headers" => ExchangeKind::Headers,
        other => ExchangeKind::Custom(other.to_owned()),
    }
}

impl Drop for AmqpChannel {
    /// The last handle is gone, so nobody can settle its deliveries: close the channel so the
    /// broker requeues them (and frees the channel number) now, not at connection close.
    fn drop(&mut self) {
        if self.closed_by_us.load(Ordering::Acquire) || self.ch.is_closed() {
            return;
        }
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            let ch = self.ch.clone();
            rt.spawn(async move {
                let _ = ch.close().await;
            });
        }
    }
}

impl AmqpChannel {
    fn check_open(&self) -> Result<(), Error> {
        if self.closed_by_us.load(Ordering::Acquire) {
            return Err(Error::Closed { what: "channel" });
        }
        Ok(())
    }
}

impl TransportChannel for AmqpChannel {
    fn exchange_declare<'a>(
        &'a self,
        name: &'a str,
        kind_name: &'a str,
        flags: ExchangeFlags,
        arguments: &'a FieldTable,
    ) -> BoxFuture<'a, Result<(), Error>> {
        Box::pin(async move {
            let opts = ExchangeDeclareOptions {
                passive: flags.passive,
                durable: flags.durable,
                auto_delete: flags.auto_delete,
                internal: flags.internal,
                nowait: false,
            };
            Ok(self
                .ch
                .exchange_declare(name, kind(kind_name), opts, arguments.clone())
                .await?)
        })
    }
    fn exchange_delete<'a>(
        &'a self,
        name: &'a str,
        if_unused: bool,
    ) -> BoxFuture<'a, Result<(), Error>> {
        Box::pin(async move {
            let opts = ExchangeDeleteOptions {
                if_unused,
                nowait: false,
            };
            Ok(self.ch.exchange_delete(name, opts).await?)
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
            Ok(self
                .ch
                .exchange_bind(destination, source, routing_key, arguments.clone())
                .await?)
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
            Ok(self
                .ch
                .exchange_unbind(destination, source, routing_key, arguments.clone())
                .await?)
        })
    }
    fn queue_declare<'a>(
        &'a self,
        name: &'a str,
        flags: QueueFlags,
        arguments: &'a FieldTable,
    ) -> BoxFuture<'a, Result<QueueDeclared, Error>> {
        Box::pin(async move {
            let opts = QueueDeclareOptions {
                passive: flags.passive,
                durable: flags.durable,
                exclusive: flags.exclusive,
                auto_delete: flags.auto_delete,
                nowait: false,
            };
            let ok = self.ch.queue_declare(name, opts, arguments.clone()).await?;
            Ok(QueueDeclared {
                name: ok.queue.to_string(),
                message_count: ok.message_count,
                consumer_count: ok.consumer_count,
            })
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
            Ok(self
                .ch
                .queue_bind(queue, exchange, routing_key, arguments.clone())
                .await?)
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
            Ok(self
                .ch
                .queue_unbind(queue, exchange, routing_key, arguments.clone())
                .await?)
        })
    }
    fn queue_purge<'a>(&'a self, queue: &'a str) -> BoxFuture<'a, Result<u32, Error>> {
        Box::pin(async move { Ok(self.ch.queue_purge(queue).await?) })
    }
    fn queue_delete<'a>(
        &'a self,
        queue: &'a str,
        if_unused: bool,
        if_empty: bool,
    ) -> BoxFuture<'a, Result<u32, Error>> {
        Box::pin(async move {
            let opts = QueueDeleteOptions {
                if_unused,
                if_empty,
                nowait: false,
            };
            Ok(self.ch.queue_delete(queue, opts).await?)
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
            self.check_open()?;
            let opts = PublishOptions {
                mandatory,
                immediate: false,
            };
            let watch = mandatory && self.ch.is_confirm_mode();
            let one_at_a_time = if watch {
                Some(self.mandatory.lock().await)
            } else {
                None
            };
            let slot = if watch {
                let mid = properties.message_id.as_ref().map(|m| m.as_str());
                Some(Slot {
                    router: &self.returns,
                    id: self.returns.register(exchange, routing_key, mid),
                })
            } else {
                None
            };
            let sent = self
                .ch
                .basic_publish(exchange, routing_key, opts, properties, body)
                .await;
            let confirm = match sent {
                Ok(c) => c.await,
                Err(e) => Err(e),
            };
            let returned = slot.as_ref().and_then(|s| self.returns.finish(s.id));
            drop(slot);
            drop(one_at_a_time);
            match confirm? {
                Confirmation::Ack => match returned {
                    Some(r) => Err(Error::Returned {
                        reply_code: r.reply_code,
                        reply_text: r.reply_text,
                        exchange: r.exchange,
                        routing_key: r.routing_key,
                    }),
                    None => Ok(PublishOutcome::Acked),
                },
                Confirmation::Nack => Ok(PublishOutcome::Nacked),
                Confirmation::NotRequested => Ok(PublishOutcome::Sent),
            }
        })
    }
    fn get<'a>(
        &'a self,
        queue: &'a str,
        no_ack: bool,
    ) -> BoxFuture<'a, Result<Option<RawDelivery>, Error>> {
        Box::pin(async move {
            Ok(self
                .ch
                .basic_get(queue, no_ack)
                .await?
                .map(|g| delivery(g.delivery)))
        })
    }
    fn consume<'a>(
        &'a self,
        queue: &'a str,
        spec: ConsumeSpec,
    ) -> BoxFuture<'a, Result<(String, DeliveryStream), Error>> {
        Box::pin(async move {
            let opts = ConsumeOptions {
                consumer_tag: spec.tag.as_str().into(),
                no_local: false,
                no_ack: spec.no_ack,
                exclusive: spec.exclusive,
                arguments: spec.arguments,
                ..Default::default()
            };
            let c = self.ch.basic_consume(queue, opts).await?;
            let tag = c.tag().to_owned();
            let s: DeliveryStream = Box::pin(ConsumerStream { inner: c });
            Ok((tag, s))
        })
    }
    fn cancel<'a>(&'a self, consumer_tag: &'a str) -> BoxFuture<'a, Result<(), Error>> {
        Box::pin(async move { Ok(self.ch.basic_cancel(consumer_tag).await?) })
    }
    fn ack(&self, delivery_tag: u64, multiple: bool) -> BoxFuture<'_, Result<(), Error>> {
        Box::pin(async move {
            self.check_open()?;
            Ok(self.ch.basic_ack(delivery_tag, multiple).await?)
        })
    }
    fn nack(
        &self,
        delivery_tag: u64,
        multiple: bool,
        requeue: bool,
    ) -> BoxFuture<'_, Result<(), Error>> {
        Box::pin(async move {
            self.check_open()?;
            Ok(self.ch.basic_nack(delivery_tag, multiple, requeue).await?)
        })
    }
    fn reject(&self, delivery_tag: u64, requeue: bool) -> BoxFuture<'_, Result<(), Error>> {
        Box::pin(async move {
            self.check_open()?;
            Ok(self.ch.basic_reject(delivery_tag, requeue).await?)
        })
    }
    fn recover(&self, requeue: bool) -> BoxFuture<'_, Result<(), Error>> {
        Box::pin(async move { Ok(self.ch.basic_recover(requeue).await?) })
    }
    fn qos(&self, prefetch_count: u16, global: bool) -> BoxFuture<'_, Result<(), Error>> {
        Box::pin(async move {
            let opts = QosOptions {
                prefetch_size: 0,
                global,
            };
            Ok(self.ch.basic_qos(prefetch_count, opts).await?)
        })
    }
    fn flow(&self, active: bool) -> BoxFuture<'_, Result<(), Error>> {
        Box::pin(async move {
            self.ch.flow(active).await?;
            Ok(())
        })
    }
    fn confirm_select(&self) -> BoxFuture<'_, Result<(), Error>> {
        Box::pin(async move { Ok(self.ch.confirm_select().await?) })
    }
    fn tx_select(&self) -> BoxFuture<'_, Result<(), Error>> {
        Box::pin(async move { Ok(self.ch.tx_select().await?) })
    }
    fn tx_commit(&self) -> BoxFuture<'_, Result<(), Error>> {
        Box::pin(async move { Ok(self.ch.tx_commit().await?) })
    }
    fn tx_rollback(&self) -> BoxFuture<'_, Result<(), Error>> {
        Box::pin(async move { Ok(self.ch.tx_rollback().await?) })
    }
    fn take_returns(&self) -> Option<mpsc::UnboundedReceiver<RawReturn>> {
        {
            let mut s = self.returns.state.lock().ok()?;
            if s.user_taken {
                return None;
            }
            s.user_taken = true;
        }
        // Forward the router's unclaimed returns into a plain channel the caller owns.
        let (tx, rx) = mpsc::unbounded_channel();
        let mut stream = AmqpReturns {
            router: self.returns.clone(),
        };
        tokio::spawn(async move {
            while let Some(r) = std::future::poll_fn(|cx| Pin::new(&mut stream).poll_next(cx)).await
            {
                if tx.send(r).is_err() {
                    break;
                }
            }
        });
        Some(rx)
    }
    fn close(&self) -> BoxFuture<'_, Result<(), Error>> {
        Box::pin(async move {
            self.closed_by_us.store(true, Ordering::Release);
            Ok(self.ch.close().await?)
        })
    }
    fn is_closed(&self) -> bool {
        self.closed_by_us.load(Ordering::Acquire) || self.ch.is_closed()
    }
    fn transport(&self) -> &'static str {
        "amqp"
    }
}
