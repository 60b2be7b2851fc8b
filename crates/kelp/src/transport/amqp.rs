//! `amqp://` and `amqps://`: RabbitMQ (or any AMQP 0-9-1 broker) through `kelp-amqp`.

use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
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
        Ok(AmqpTransport { conn })
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
            let ch = self.conn.channel().await?;
            // Listen from the start, so returns that come before the user takes the stream
            // wait for it.
            let returns = ch.returns();
            let ch: Arc<dyn TransportChannel> = Arc::new(AmqpChannel {
                ch,
                returns: Mutex::new(Some(returns)),
            });
            Ok(ch)
        })
    }
    fn close(&self) -> BoxFuture<'_, Result<(), Error>> {
        Box::pin(async move { Ok(self.conn.close().await?) })
    }
    fn is_closed(&self) -> bool {
        self.conn.is_closed()
    }
    fn close_signal(&self) -> BoxFuture<'static, Error> {
        let signal = self.conn.close_signal();
        Box::pin(async move { Error::Amqp(signal.wait().await) })
    }
    fn heartbeat(&self) -> Option<Duration> {
        let hb = self.conn.tuning().heartbeat;
        (!hb.is_zero()).then_some(hb)
    }
    fn blocked(&self) -> Option<tokio::sync::watch::Receiver<Option<String>>> {
        Some(self.conn.blocked())
    }
}

/// A channel on an AMQP connection. Dropping it drops its `kelp_amqp` channel, which closes
/// the channel on the broker (and requeues its unacked deliveries) once no consumer stream of
/// it is left either.
#[derive(Debug)]
pub struct AmqpChannel {
    ch: kelp_amqp::Channel,
    /// The returns no publish claimed (see [`Confirmation::Returned`]), until taken.
    returns: Mutex<Option<kelp_amqp::Returns>>,
}

fn raw_return(m: kelp_amqp::ReturnedMessage) -> RawReturn {
    RawReturn {
        reply_code: m.reply_code,
        reply_text: m.reply_text.to_string(),
        exchange: m.exchange.to_string(),
        routing_key: m.routing_key.to_string(),
        properties: m.properties,
        body: m.body,
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
            let opts = PublishOptions {
                mandatory,
                immediate: false,
            };
            let confirm = self
                .ch
                .basic_publish(exchange, routing_key, opts, properties, body)
                .await?;
            match confirm.await? {
                Confirmation::Ack => Ok(PublishOutcome::Acked),
                Confirmation::Nack => Ok(PublishOutcome::Nacked),
                Confirmation::NotRequested => Ok(PublishOutcome::Sent),
                Confirmation::Returned(r) => Err(Error::Returned {
                    reply_code: r.reply_code,
                    reply_text: r.reply_text.to_string(),
                    exchange: r.exchange.to_string(),
                    routing_key: r.routing_key.to_string(),
                }),
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
        Box::pin(async move { Ok(self.ch.basic_ack(delivery_tag, multiple).await?) })
    }
    fn nack(
        &self,
        delivery_tag: u64,
        multiple: bool,
        requeue: bool,
    ) -> BoxFuture<'_, Result<(), Error>> {
        Box::pin(async move { Ok(self.ch.basic_nack(delivery_tag, multiple, requeue).await?) })
    }
    fn reject(&self, delivery_tag: u64, requeue: bool) -> BoxFuture<'_, Result<(), Error>> {
        Box::pin(async move { Ok(self.ch.basic_reject(delivery_tag, requeue).await?) })
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
        let mut returns = self.returns.lock().ok()?.take()?;
        // Forward them, converted, into a plain channel the caller owns; it ends with the
        // channel.
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            while let Some(m) = returns.recv().await {
                if tx.send(raw_return(m)).is_err() {
                    break;
                }
            }
        });
        Some(rx)
    }
    fn close(&self) -> BoxFuture<'_, Result<(), Error>> {
        Box::pin(async move { Ok(self.ch.close().await?) })
    }
    fn is_closed(&self) -> bool {
        self.ch.is_closed()
    }
    fn transport(&self) -> &'static str {
        "amqp"
    }
}
