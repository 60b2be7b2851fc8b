//! [`Channel`]: every AMQP request, as an async method.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{fence, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use tokio::sync::{mpsc, oneshot};

use super::consumer::{Consumer, Returns};
use super::options::*;
use super::shared::{ChannelShared, ConnShared};
use crate::codec::*;
use crate::driver::{Command, Publish};
use crate::engine::{Confirmation, GetMessage, Reply};
use crate::error::Error;

/// A channel: a lightweight session inside a [`Connection`](crate::Connection). Cheap to clone.
///
/// Once the broker closes it (e.g. `404 NOT_FOUND` after a passive declare of a missing queue),
/// every further call fails at once with that same [`Error::ChannelClosed`]; once this client
/// closes it ([`Channel::close`]), with [`Error::ChannelClosedByClient`].
///
/// Dropping the last clone closes the channel (`channel.close`, without waiting), so the broker
/// requeues the deliveries it holds unacknowledged at once rather than when the connection
/// closes. A [`Consumer`] counts as a clone: the channel stays open while one is alive. A
/// pending [`PublishConfirm`] does not: it fails if its channel is dropped first.
///
/// ```no_run
/// # async fn demo(conn: kelp_amqp::Connection) -> Result<(), kelp_amqp::Error> {
/// use kelp_amqp::{BasicProperties, FieldTable};
/// use kelp_amqp::options::{PublishOptions, QueueDeclareOptions};
/// let ch = conn.channel().await?;
/// let q = ch.queue_declare("tasks", QueueDeclareOptions { durable: true, ..Default::default() }, FieldTable::new()).await?;
/// ch.basic_publish("", "tasks", PublishOptions::default(), BasicProperties::default(), "hello").await?;
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct Channel {
    h: Arc<Handle>,
}

/// What the clones of a [`Channel`] share; the last one to go closes the channel.
struct Handle {
    id: u16,
    tx: mpsc::Sender<Command>,
    shared: Arc<ChannelShared>,
    conn: Arc<ConnShared>,
}

impl Drop for Handle {
    fn drop(&mut self) {
        if self.shared.closed().is_some()
            || self.conn.closed().is_some()
            || self.conn.is_closing()
            || self.shared.begin_close()
        {
            return;
        }
        let cmd = Command::CloseChannel { channel: self.id };
        match self.tx.try_send(cmd) {
            Ok(()) | Err(mpsc::error::TrySendError::Closed(_)) => {}
            Err(mpsc::error::TrySendError::Full(cmd)) => {
                // The command queue is full (a burst of publishes): queue it from a task.
                // Without a runtime it is lost, and the channel closes with its connection.
                if let Ok(rt) = tokio::runtime::Handle::try_current() {
                    let tx = self.tx.clone();
                    rt.spawn(async move {
                        let _ = tx.send(cmd).await;
                    });
                }
            }
        }
    }
}

impl std::fmt::Debug for Channel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Channel")
            .field("id", &self.h.id)
            .field("closed", &self.h.shared.closed())
            .finish()
    }
}

macro_rules! expect_reply {
    ($reply:expr, $variant:ident) => {
        match $reply {
            Reply::Method(Method::$variant(ok)) => Ok(Some(ok)),
            Reply::Sent => Ok(None),
            other => Err(Error::Protocol(
                crate::error::ProtocolError::UnexpectedFrame {
                    channel: 0,
                    what: format!("{other:?}"),
                    state: concat!("awaiting ", stringify!($variant)),
                },
            )),
        }
    };
}

impl Channel {
    pub(crate) fn new(
        id: u16,
        tx: mpsc::Sender<Command>,
        shared: Arc<ChannelShared>,
        conn: Arc<ConnShared>,
    ) -> Self {
        Channel {
            h: Arc::new(Handle {
                id,
                tx,
                shared,
                conn,
            }),
        }
    }

    /// The channel number.
    pub fn id(&self) -> u16 {
        self.h.id
    }

    /// True once the channel (or its connection) is closed, or this client began closing it.
    pub fn is_closed(&self) -> bool {
        self.check().is_err()
    }

    /// Why the channel closed (or is closing), if it did: what every call fails with now.
    pub fn close_error(&self) -> Option<Error> {
        self.check().err()
    }

    /// False while the broker asked this channel to pause publishing (`channel.flow`).
    pub fn is_flow_active(&self) -> bool {
        self.h.shared.flow()
    }

    /// True once `confirm.select` was sent on this channel.
    pub fn is_confirm_mode(&self) -> bool {
        self.h.shared.confirm.load(Ordering::Relaxed)
    }

    fn check(&self) -> Result<(), Error> {
        let h = &*self.h;
        if let Some(e) = h.shared.closed().or(h.conn.closed()) {
            return Err(e.clone());
        }
        if h.conn.is_closing() {
            return Err(Error::ConnectionClosedByClient);
        }
        if h.shared.is_closing() {
            return Err(Error::ChannelClosedByClient(h.id));
        }
        Ok(())
    }

    /// After queueing a command nobody answers (an ack, a publish outside confirm mode): a
    /// close that began meanwhile may be queued ahead of it, and the connection task drops
    /// methods for a closing channel. Report that rather than claim success. A close that
    /// begins after this check is queued behind the command (this fence and the one in
    /// `close` order the closing flag against the command queue), so a success is a real one.
    fn recheck(&self) -> Result<(), Error> {
        fence(Ordering::SeqCst);
        self.check()
    }

    fn gone(&self) -> Error {
        self.close_error().unwrap_or(Error::DriverGone)
    }

    async fn command(&self, cmd: Command) -> Result<(), Error> {
        self.h.tx.send(cmd).await.map_err(|_| self.gone())
    }

    /// Send any request and wait for its reply.
    pub async fn call(&self, method: Method) -> Result<Reply, Error> {
        self.check()?;
        let (reply, rx) = oneshot::channel();
        self.command(Command::Call {
            channel: self.h.id,
            method,
            reply,
        })
        .await?;
        rx.await.map_err(|_| self.gone())?
    }

    /// Send a method that has no reply. It fails, rather than vanish, when the channel closes
    /// (or begins closing) before the method is sure to go out ahead of the close.
    pub async fn send(&self, method: Method) -> Result<(), Error> {
        self.check()?;
        self.command(Command::Send {
            channel: self.h.id,
            method,
        })
        .await?;
        self.recheck()
    }

    // ----- exchange ----------------------------------------------------------------------------

    /// `exchange.declare`.
    pub async fn exchange_declare(
        &self,
        exchange: &str,
        kind: impl Into<ExchangeKind>,
        options: ExchangeDeclareOptions,
        arguments: FieldTable,
    ) -> Result<(), Error> {
        let m = ExchangeDeclare {
            reserved_1: 0,
            exchange: exchange.into(),
            kind: kind.into().as_str().into(),
            passive: options.passive,
            durable: options.durable,
            auto_delete: options.auto_delete,
            internal: options.internal,
            nowait: options.nowait,
            arguments,
        };
        expect_reply!(self.call(m.into()).await?, ExchangeDeclareOk).map(|_| ())
    }

    /// `exchange.delete`.
    pub async fn exchange_delete(
        &self,
        exchange: &str,
        options: ExchangeDeleteOptions,
    ) -> Result<(), Error> {
        let m = ExchangeDelete {
            reserved_1: 0,
            exchange: exchange.into(),
            if_unused: options.if_unused,
            nowait: options.nowait,
        };
        expect_reply!(self.call(m.into()).await?, ExchangeDeleteOk).map(|_| ())
    }

    /// `exchange.bind`: route messages from `source` to `destination` (RabbitMQ extension).
    pub async fn exchange_bind(
        &self,
        destination: &str,
        source: &str,
        routing_key: &str,
        arguments: FieldTable,
    ) -> Result<(), Error> {
        let m = ExchangeBind {
            reserved_1: 0,
            destination: destination.into(),
            source: source.into(),
            routing_key: routing_key.into(),
            nowait: false,
            arguments,
        };
        expect_reply!(self.call(m.into()).await?, ExchangeBindOk).map(|_| ())
    }

    /// `exchange.unbind`.
    pub async fn exchange_unbind(
        &self,
        destination: &str,
        source: &str,
        routing_key: &str,
        arguments: FieldTable,
    ) -> Result<(), Error> {
        let m = ExchangeUnbind {
            reserved_1: 0,
            destination: destination.into(),
            source: source.into(),
            routing_key: routing_key.into(),
            nowait: false,
            arguments,
        };
        expect_reply!(self.call(m.into()).await?, ExchangeUnbindOk).map(|_| ())
    }

    // ----- queue -------------------------------------------------------------------------------

    /// `queue.declare`. An empty name asks the broker to generate one (returned in the reply).
    pub async fn queue_declare(
        &self,
        queue: &str,
        options: QueueDeclareOptions,
        arguments: FieldTable,
    ) -> Result<QueueDeclareOk, Error> {
        let m = QueueDeclare {
            reserved_1: 0,
            queue: queue.into(),
            passive: options.passive,
            durable: options.durable,
            exclusive: options.exclusive,
            auto_delete: options.auto_delete,
            nowait: options.nowait,
            arguments,
        };
        Ok(
            expect_reply!(self.call(m.into()).await?, QueueDeclareOk)?.unwrap_or_else(|| {
                QueueDeclareOk {
                    queue: queue.into(),
                    message_count: 0,
                    consumer_count: 0,
                }
            }),
        )
    }

    /// `queue.bind`.
    pub async fn queue_bind(
        &self,
        queue: &str,
        exchange: &str,
        routing_key: &str,
        arguments: FieldTable,
    ) -> Result<(), Error> {
        let m = QueueBind {
            reserved_1: 0,
            queue: queue.into(),
            exchange: exchange.into(),
            routing_key: routing_key.into(),
            nowait: false,
            arguments,
        };
        expect_reply!(self.call(m.into()).await?, QueueBindOk).map(|_| ())
    }

    /// `queue.unbind`.
    pub async fn queue_unbind(
        &self,
        queue: &str,
        exchange: &str,
        routing_key: &str,
        arguments: FieldTable,
    ) -> Result<(), Error> {
        let m = QueueUnbind {
            reserved_1: 0,
            queue: queue.into(),
            exchange: exchange.into(),
            routing_key: routing_key.into(),
            arguments,
        };
        expect_reply!(self.call(m.into()).await?, QueueUnbindOk).map(|_| ())
    }

    /// `queue.purge`: returns the number of messages removed.
    pub async fn queue_purge(&self, queue: &str) -> Result<u32, Error> {
        let m = QueuePurge {
            reserved_1: 0,
            queue: queue.into(),
            nowait: false,
        };
        Ok(expect_reply!(self.call(m.into()).await?, QueuePurgeOk)?
            .map_or(0, |ok| ok.message_count))
    }

    /// `queue.delete`: returns the number of messages deleted with it.
    pub async fn queue_delete(
        &self,
        queue: &str,
        options: QueueDeleteOptions,
    ) -> Result<u32, Error> {
        let m = QueueDelete {
            reserved_1: 0,
            queue: queue.into(),
            if_unused: options.if_unused,
            if_empty: options.if_empty,
            nowait: options.nowait,
        };
        Ok(expect_reply!(self.call(m.into()).await?, QueueDeleteOk)?
            .map_or(0, |ok| ok.message_count))
    }

    // ----- basic -------------------------------------------------------------------------------

    /// `basic.qos`: at most `prefetch_count` unacked deliveries (0 = unlimited).
    pub async fn basic_qos(&self, prefetch_count: u16, options: QosOptions) -> Result<(), Error> {
        let m = BasicQos {
            prefetch_size: options.prefetch_size,
            prefetch_count,
            global: options.global,
        };
        expect_reply!(self.call(m.into()).await?, BasicQosOk)?;
        self.h
            .shared
            .prefetch
            .store(prefetch_count, Ordering::Relaxed);
        Ok(())
    }

    /// `basic.consume`: a [`Consumer`] stream of deliveries.
    pub async fn basic_consume(
        &self,
        queue: &str,
        options: ConsumeOptions,
    ) -> Result<Consumer, Error> {
        self.check()?;
        let prefetch = usize::from(self.h.shared.prefetch.load(Ordering::Relaxed));
        let cap = options
            .buffer
            .unwrap_or(if prefetch > 0 { prefetch } else { 1024 })
            .max(1);
        let (sender, rx) = mpsc::channel(cap);
        let m = BasicConsume {
            reserved_1: 0,
            queue: queue.into(),
            consumer_tag: options.consumer_tag,
            no_local: options.no_local,
            no_ack: options.no_ack,
            exclusive: options.exclusive,
            nowait: false,
            arguments: options.arguments,
        };
        let (reply, reply_rx) = oneshot::channel();
        self.command(Command::Consume {
            channel: self.h.id,
            method: m.into(),
            sender,
            reply,
        })
        .await?;
        let reply = reply_rx.await.map_err(|_| self.gone())??;
        let tag = match expect_reply!(reply, BasicConsumeOk)? {
            Some(ok) => ok.consumer_tag,
            None => ShortString::empty(),
        };
        Ok(Consumer::new(tag, queue.into(), self.clone(), rx))
    }

    /// `basic.cancel`.
    pub async fn basic_cancel(&self, consumer_tag: &str) -> Result<(), Error> {
        let m = BasicCancel {
            consumer_tag: consumer_tag.into(),
            nowait: false,
        };
        expect_reply!(self.call(m.into()).await?, BasicCancelOk).map(|_| ())
    }

    pub(crate) fn cancel_on_drop(&self, consumer_tag: &ShortString) {
        if self.check().is_ok() {
            let m = BasicCancel {
                consumer_tag: consumer_tag.clone(),
                nowait: true,
            };
            let _ = self.h.tx.try_send(Command::Send {
                channel: self.h.id,
                method: m.into(),
            });
        }
    }

    /// `basic.get`: one message, or `None` when the queue is empty.
    pub async fn basic_get(&self, queue: &str, no_ack: bool) -> Result<Option<GetMessage>, Error> {
        let m = BasicGet {
            reserved_1: 0,
            queue: queue.into(),
            no_ack,
        };
        match self.call(m.into()).await? {
            Reply::Get(msg) => Ok(Some(*msg)),
            Reply::GetEmpty => Ok(None),
            other => Err(Error::Protocol(
                crate::error::ProtocolError::UnexpectedFrame {
                    channel: self.h.id,
                    what: format!("{other:?}"),
                    state: "awaiting basic.get-ok",
                },
            )),
        }
    }

    /// `basic.ack`.
    pub async fn basic_ack(&self, delivery_tag: u64, multiple: bool) -> Result<(), Error> {
        self.send(
            BasicAck {
                delivery_tag,
                multiple,
            }
            .into(),
        )
        .await
    }

    /// `basic.nack` (RabbitMQ extension: reject several at once).
    pub async fn basic_nack(
        &self,
        delivery_tag: u64,
        multiple: bool,
        requeue: bool,
    ) -> Result<(), Error> {
        self.send(
            BasicNack {
                delivery_tag,
                multiple,
                requeue,
            }
            .into(),
        )
        .await
    }

    /// `basic.reject`.
    pub async fn basic_reject(&self, delivery_tag: u64, requeue: bool) -> Result<(), Error> {
        self.send(
            BasicReject {
                delivery_tag,
                requeue,
            }
            .into(),
        )
        .await
    }

    /// `basic.recover`: redeliver unacked messages.
    pub async fn basic_recover(&self, requeue: bool) -> Result<(), Error> {
        expect_reply!(
            self.call(BasicRecover { requeue }.into()).await?,
            BasicRecoverOk
        )
        .map(|_| ())
    }

    /// `basic.publish`. Resolves once the message is queued for the socket; the returned
    /// [`PublishConfirm`] resolves to the broker's ack/nack in confirm mode (or to
    /// [`Confirmation::Returned`] when a mandatory message is returned; outside confirm mode
    /// returns go to [`Channel::returns`]), or at once to [`Confirmation::NotRequested`].
    pub async fn basic_publish(
        &self,
        exchange: &str,
        routing_key: &str,
        options: PublishOptions,
        properties: BasicProperties,
        body: impl Into<Bytes>,
    ) -> Result<PublishConfirm, Error> {
        self.check()?;
        // Refuse what cannot be encoded here, where the caller hears it: inside the
        // connection a publish without confirms has nobody to tell.
        for s in [exchange, routing_key] {
            if s.len() > 255 {
                return Err(Error::Encode(
                    crate::codec::EncodeError::ShortStringTooLong {
                        len: s.len(),
                        preview: s.chars().take(32).collect(),
                    },
                ));
            }
        }
        properties.check_encodable()?;
        let (confirm, wait) = if self.h.shared.confirm.load(Ordering::Relaxed) {
            let (tx, rx) = oneshot::channel();
            (
                Some(tx),
                PublishConfirm(ConfirmState::Wait(
                    rx,
                    self.h.conn.clone(),
                    self.h.shared.clone(),
                )),
            )
        } else {
            (None, PublishConfirm(ConfirmState::Ready))
        };
        let p = Publish {
            channel: self.h.id,
            exchange: ShortString::from(exchange),
            routing_key: ShortString::from(routing_key),
            mandatory: options.mandatory,
            immediate: options.immediate,
            properties,
            body: body.into(),
            confirm,
        };
        self.command(Command::Publish(Box::new(p))).await?;
        if matches!(wait.0, ConfirmState::Ready) {
            // Nothing will tell of a publish dropped for a closing channel: check now.
            // (In confirm mode the confirm fails instead.)
            self.recheck()?;
        }
        Ok(wait)
    }

    /// A stream of the mandatory messages the broker returns on this channel that no publish
    /// claims: all of them outside confirm mode; in confirm mode, those whose
    /// [`PublishConfirm`] was dropped (a waiting one resolves to [`Confirmation::Returned`]).
    /// Only the latest stream receives them.
    pub fn returns(&self) -> Returns {
        let (tx, rx) = mpsc::unbounded_channel();
        self.h.shared.set_returns(tx);
        Returns::new(rx)
    }

    /// `confirm.select`: from now on every publish is acked or nacked by the broker.
    pub async fn confirm_select(&self) -> Result<(), Error> {
        self.h.shared.confirm.store(true, Ordering::Relaxed);
        expect_reply!(
            self.call(ConfirmSelect { nowait: false }.into()).await?,
            ConfirmSelectOk
        )
        .map(|_| ())
    }

    /// `tx.select`.
    pub async fn tx_select(&self) -> Result<(), Error> {
        expect_reply!(self.call(TxSelect {}.into()).await?, TxSelectOk).map(|_| ())
    }

    /// `tx.commit`.
    pub async fn tx_commit(&self) -> Result<(), Error> {
        expect_reply!(self.call(TxCommit {}.into()).await?, TxCommitOk).map(|_| ())
    }

    /// `tx.rollback`.
    pub async fn tx_rollback(&self) -> Result<(), Error> {
        expect_reply!(self.call(TxRollback {}.into()).await?, TxRollbackOk).map(|_| ())
    }

    /// `channel.flow`: ask the broker to pause (`false`) or resume deliveries.
    pub async fn flow(&self, active: bool) -> Result<bool, Error> {
        Ok(expect_reply!(
            self.call(ChannelFlow { active }.into()).await?,
            ChannelFlowOk
        )?
        .is_some_and(|ok| ok.active))
    }

    /// Close the channel (200 OK). Its consumers end; unconfirmed publishes fail. From the
    /// moment it is called every other call on the channel fails with
    /// [`Error::ChannelClosedByClient`]; when it returns, the channel is closed.
    pub async fn close(&self) -> Result<(), Error> {
        match self.check() {
            Err(Error::ChannelClosedByClient(_)) => return Ok(()),
            Err(e) => return Err(e),
            Ok(()) => {}
        }
        if self.h.shared.begin_close() {
            return Ok(());
        }
        fence(Ordering::SeqCst);
        let m = ChannelClose {
            reply_code: 200,
            reply_text: "bye".into(),
            class_id: 0,
            method_id: 0,
        };
        let (reply, rx) = oneshot::channel();
        let r = match self
            .command(Command::Call {
                channel: self.h.id,
                method: m.into(),
                reply,
            })
            .await
        {
            Ok(()) => rx.await.unwrap_or_else(|_| Err(self.gone())),
            Err(e) => Err(e),
        };
        match r {
            Ok(_) | Err(Error::ChannelClosedByClient(_)) => Ok(()),
            Err(e) => Err(e),
        }
    }
}

/// The broker's answer to a publish. In confirm mode it resolves when the broker acks or nacks
/// the message, or to [`Confirmation::Returned`] for a mandatory message no queue took;
/// otherwise at once with [`Confirmation::NotRequested`]. It does not keep its channel open:
/// if every handle of the channel is dropped first, it fails with the channel's close.
#[derive(Debug)]
pub struct PublishConfirm(ConfirmState);

#[derive(Debug)]
enum ConfirmState {
    Ready,
    Wait(
        oneshot::Receiver<Result<Confirmation, Error>>,
        Arc<ConnShared>,
        Arc<ChannelShared>,
    ),
    Done,
}

impl Future for PublishConfirm {
    type Output = Result<Confirmation, Error>;
    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match &mut self.0 {
            ConfirmState::Ready => {
                self.0 = ConfirmState::Done;
                Poll::Ready(Ok(Confirmation::NotRequested))
            }
            ConfirmState::Wait(rx, conn, ch) => match Pin::new(rx).poll(cx) {
                Poll::Pending => Poll::Pending,
                Poll::Ready(r) => {
                    let out = match r {
                        Ok(r) => r,
                        Err(_) => Err(ch
                            .closed()
                            .or(conn.closed())
                            .cloned()
                            .unwrap_or(Error::DriverGone)),
                    };
                    self.0 = ConfirmState::Done;
                    Poll::Ready(out)
                }
            },
            ConfirmState::Done => Poll::Ready(Err(Error::InvalidUse(
                "PublishConfirm polled after completion",
            ))),
        }
    }
}
