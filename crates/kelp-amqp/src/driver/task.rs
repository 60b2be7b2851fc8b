//! The connection task.

use std::collections::{HashMap, VecDeque};
use std::future::{poll_fn, Future};
use std::io::IoSlice;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use bytes::{Buf, Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::{mpsc, oneshot};
use tokio::time::Sleep;
use tokio_util::sync::PollSender;
use tracing::{debug, trace, warn};

use super::{HIGH_WATER, READ_CHUNK};
use crate::api::shared::{ChannelShared, ConnShared};
use crate::codec::{BasicProperties, Method, ShortString};
use crate::engine::{Confirmation, Delivery, Engine, Event, Reply, ReturnedMessage};
use crate::error::Error;

/// What a handle asks the driver to do.
#[derive(Debug)]
pub(crate) enum Command {
    OpenChannel {
        id: Option<u16>,
        shared: Arc<ChannelShared>,
        reply: oneshot::Sender<Result<u16, Error>>,
    },
    Call {
        channel: u16,
        method: Method,
        reply: oneshot::Sender<Result<Reply, Error>>,
    },
    Consume {
        channel: u16,
        method: Method,
        sender: mpsc::Sender<Result<Box<Delivery>, Error>>,
        reply: oneshot::Sender<Result<Reply, Error>>,
    },
    Send {
        channel: u16,
        method: Method,
    },
    /// `channel.close` (200) nobody waits for: the last handle of the channel was dropped.
    CloseChannel {
        channel: u16,
    },
    Publish(Box<Publish>),
    Close {
        code: u16,
        text: String,
        reply: oneshot::Sender<Result<Reply, Error>>,
    },
    UpdateSecret {
        secret: Bytes,
        reason: String,
        reply: oneshot::Sender<Result<Reply, Error>>,
    },
}

#[derive(Debug)]
pub(crate) struct Publish {
    pub(crate) channel: u16,
    pub(crate) exchange: ShortString,
    pub(crate) routing_key: ShortString,
    pub(crate) mandatory: bool,
    pub(crate) immediate: bool,
    pub(crate) properties: BasicProperties,
    pub(crate) body: Bytes,
    pub(crate) confirm: Option<oneshot::Sender<Result<Confirmation, Error>>>,
}

/// The engine's token: who waits for a reply.
#[derive(Debug)]
pub(crate) enum Responder {
    Reply(oneshot::Sender<Result<Reply, Error>>),
    Open(oneshot::Sender<Result<u16, Error>>, Arc<ChannelShared>),
    Consume(
        oneshot::Sender<Result<Reply, Error>>,
        mpsc::Sender<Result<Box<Delivery>, Error>>,
        u16,
    ),
    Confirm(oneshot::Sender<Result<Confirmation, Error>>),
    /// `basic.cancel`: the consumer's sender is dropped once the broker confirms, so its stream
    /// ends after the deliveries already buffered.
    Cancel(oneshot::Sender<Result<Reply, Error>>, u16, ShortString),
    Nobody,
}

impl Responder {
    fn fail(self, error: Error) {
        match self {
            Responder::Reply(tx) | Responder::Consume(tx, _, _) | Responder::Cancel(tx, _, _) => {
                let _ = tx.send(Err(error));
            }
            Responder::Open(tx, _) => {
                let _ = tx.send(Err(error));
            }
            Responder::Confirm(tx) => {
                let _ = tx.send(Err(error));
            }
            Responder::Nobody => {}
        }
    }
}

type ConsumerKey = (u16, ShortString);
type DeliveryItem = Result<Box<Delivery>, Error>;
type DeliverySender = PollSender<DeliveryItem>;

/// What a consumer's full buffer could not take yet, kept in order until it makes room.
/// While any consumer has deliveries waiting here, the driver stops reading the socket: the
/// backpressure reaches the broker through TCP, and nothing already read is lost.
struct Overflow {
    sender: DeliverySender,
    items: VecDeque<DeliveryItem>,
}

/// The state of one connection's task.
pub(crate) struct Driver<S> {
    io: S,
    engine: Engine<Responder>,
    commands: mpsc::Receiver<Command>,
    commands_done: bool,
    rbuf: BytesMut,
    wq: VecDeque<Bytes>,
    wq_bytes: usize,
    read_done: bool,
    timer: Pin<Box<Sleep>>,
    timer_at: Option<Instant>,
    consumers: HashMap<ConsumerKey, mpsc::Sender<Result<Box<Delivery>, Error>>>,
    channels: HashMap<u16, Arc<ChannelShared>>,
    overflow: HashMap<ConsumerKey, Overflow>,
    shared: Arc<ConnShared>,
    connected: Option<oneshot::Sender<Result<(), Error>>>,
}

impl<S> std::fmt::Debug for Driver<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Driver")
            .field("wq_bytes", &self.wq_bytes)
            .finish_non_exhaustive()
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> Driver<S> {
    pub(crate) fn new(
        io: S,
        engine: Engine<Responder>,
        commands: mpsc::Receiver<Command>,
        shared: Arc<ConnShared>,
        connected: oneshot::Sender<Result<(), Error>>,
    ) -> Self {
        Driver {
            io,
            engine,
            commands,
            commands_done: false,
            rbuf: BytesMut::with_capacity(READ_CHUNK),
            wq: VecDeque::new(),
            wq_bytes: 0,
            read_done: false,
            timer: Box::pin(tokio::time::sleep(std::time::Duration::from_secs(3600))),
            timer_at: None,
            consumers: HashMap::new(),
            channels: HashMap::new(),
            overflow: HashMap::new(),
            shared,
            connected: Some(connected),
        }
    }

    /// Run until the connection is closed and everything is written.
    pub(crate) async fn run(mut self) {
        poll_fn(|cx| self.poll(cx)).await;
        debug!("connection task finished");
    }

    fn poll(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        // Bound the work of one poll so the task yields to others under constant load.
        for _ in 0..64 {
            let mut progress = false;
            progress |= self.poll_commands(cx);
            progress |= self.poll_overflow(cx);
            progress |= self.poll_read(cx);
            self.handle_events();
            self.poll_timer(cx);
            self.handle_events();
            match self.poll_write(cx) {
                Poll::Ready(true) => progress = true,
                Poll::Ready(false) => {}
                Poll::Pending => {}
            }
            if self.engine.is_closed() && self.wq.is_empty() && self.engine.transmit().is_empty() {
                let _ = Pin::new(&mut self.io).poll_shutdown(cx);
                self.finish();
                return Poll::Ready(());
            }
            if !progress {
                return Poll::Pending;
            }
        }
        cx.waker().wake_by_ref();
        Poll::Pending
    }

    fn finish(&mut self) {
        self.handle_events();
        let err = self
            .engine
            .error()
            .cloned()
            .unwrap_or(Error::ConnectionClosedByClient);
        self.shared.set_closed(err.clone());
        for (_, s) in self.channels.drain() {
            s.set_closed(err.clone());
        }
        let consumers: Vec<_> = self.consumers.drain().collect();
        for (key, tx) in consumers {
            self.push_item(key, &tx, Err(err.clone()));
        }
        // What the consumers could not take yet is handed over by a task of its own: the
        // connection is gone, but every delivery already read and the final error still reach
        // them, in order.
        for (_, o) in self.overflow.drain() {
            if let Some(tx) = o.sender.get_ref().cloned() {
                tokio::spawn(async move {
                    for item in o.items {
                        if tx.send(item).await.is_err() {
                            break;
                        }
                    }
                });
            }
        }
        self.commands.close();
        while let Ok(cmd) = self.commands.try_recv() {
            fail_command(cmd, err.clone());
        }
    }

    fn poll_commands(&mut self, cx: &mut Context<'_>) -> bool {
        let mut progress = false;
        while !self.commands_done && self.wq_bytes + self.engine.transmit().len() < HIGH_WATER {
            match self.commands.poll_recv(cx) {
                Poll::Ready(Some(cmd)) => {
                    self.apply(cmd);
                    progress = true;
                }
                Poll::Ready(None) => {
                    // Every handle is gone: close the connection politely.
                    self.commands_done = true;
                    if !self.engine.is_closed() {
                        debug!("all handles dropped; closing connection");
                        self.engine
                            .close(200, "connection handles dropped", Responder::Nobody);
                    }
                    progress = true;
                }
                Poll::Pending => break,
            }
        }
        progress
    }

    fn apply(&mut self, cmd: Command) {
        match cmd {
            Command::OpenChannel { id, shared, reply } => {
                if let Err((r, e)) = self.engine.open_channel(id, Responder::Open(reply, shared)) {
                    r.fail(e);
                }
            }
            Command::Call {
                channel,
                method,
                reply,
            } => {
                let responder = match &method {
                    Method::BasicCancel(c) => {
                        Responder::Cancel(reply, channel, c.consumer_tag.clone())
                    }
                    _ => Responder::Reply(reply),
                };
                self.engine.call(channel, method, responder)
            }
            Command::Consume {
                channel,
                method,
                sender,
                reply,
            } => {
                if let Method::BasicConsume(c) = &method {
                    if !c.consumer_tag.is_empty() {
                        // A tag already in use keeps its consumer: the broker refuses the
                        // second one, and the first must still get its deliveries and errors.
                        self.consumers
                            .entry((channel, c.consumer_tag.clone()))
                            .or_insert_with(|| sender.clone());
                    }
                }
                self.engine
                    .call(channel, method, Responder::Consume(reply, sender, channel))
            }
            Command::Send { channel, method } => {
                if let Err(e) = self.engine.send(channel, &method) {
                    // The sender checked the channel after queueing this and was told (see
                    // `Channel::send`), unless the broker closed the channel meanwhile.
                    debug!(channel, method = method.name(), error = %e, "send failed");
                }
            }
            Command::CloseChannel { channel } => {
                let close = crate::codec::ChannelClose {
                    reply_code: 200,
                    reply_text: ShortString::from_static("channel handle dropped"),
                    class_id: 0,
                    method_id: 0,
                };
                self.engine.call(channel, close.into(), Responder::Nobody);
            }
            Command::Publish(p) => {
                let Publish {
                    channel,
                    exchange,
                    routing_key,
                    mandatory,
                    immediate,
                    properties,
                    body,
                    confirm,
                } = *p;
                let token = confirm.map(Responder::Confirm);
                if let Err((token, e)) = self.engine.publish(
                    channel,
                    &exchange,
                    &routing_key,
                    mandatory,
                    immediate,
                    &properties,
                    body,
                    token,
                ) {
                    if let Some(t) = token {
                        t.fail(e);
                    } else {
                        debug!(channel, error = %e, "publish failed");
                    }
                }
            }
            Command::Close { code, text, reply } => {
                self.engine.close(code, &text, Responder::Reply(reply))
            }
            Command::UpdateSecret {
                secret,
                reason,
                reply,
            } => self
                .engine
                .update_secret(secret, &reason, Responder::Reply(reply)),
        }
    }

    fn poll_read(&mut self, cx: &mut Context<'_>) -> bool {
        if self.read_done || self.engine.is_closed() {
            return false;
        }
        if self
            .overflow
            .values()
            .any(|o| o.items.iter().any(Result::is_ok))
        {
            // Paused on purpose: the server's silence while we do not read is not its fault.
            self.engine.note_read_paused(Instant::now());
            return false;
        }
        if self.rbuf.capacity() - self.rbuf.len() < READ_CHUNK / 4 {
            self.rbuf.reserve(READ_CHUNK);
        }
        match tokio_util::io::poll_read_buf(Pin::new(&mut self.io), cx, &mut self.rbuf) {
            Poll::Ready(Ok(0)) => {
                self.read_done = true;
                self.engine.handle_eof();
                true
            }
            Poll::Ready(Ok(n)) => {
                trace!(bytes = n, "read");
                self.engine.handle_input(&mut self.rbuf, Instant::now());
                true
            }
            Poll::Ready(Err(e)) => {
                self.read_done = true;
                self.engine
                    .handle_io_error(Error::io("reading from the server", e));
                true
            }
            Poll::Pending => false,
        }
    }

    /// Hand waiting deliveries to consumers that made room. True on progress.
    fn poll_overflow(&mut self, cx: &mut Context<'_>) -> bool {
        let mut progress = false;
        self.overflow.retain(|_, o| {
            while !o.items.is_empty() {
                match o.sender.poll_reserve(cx) {
                    Poll::Pending => return true,
                    Poll::Ready(Err(_)) => return false,
                    Poll::Ready(Ok(())) => {
                        let Some(item) = o.items.pop_front() else {
                            break;
                        };
                        progress = true;
                        if o.sender.send_item(item).is_err() {
                            return false;
                        }
                    }
                }
            }
            false
        });
        progress
    }

    /// Queue `item` for a consumer behind what is already waiting for it.
    fn push_item(&mut self, key: ConsumerKey, tx: &mpsc::Sender<DeliveryItem>, item: DeliveryItem) {
        if let Some(o) = self.overflow.get_mut(&key) {
            o.items.push_back(item);
            return;
        }
        match tx.try_send(item) {
            Ok(()) => {}
            Err(mpsc::error::TrySendError::Full(item)) => {
                self.overflow.insert(
                    key,
                    Overflow {
                        sender: PollSender::new(tx.clone()),
                        items: VecDeque::from([item]),
                    },
                );
            }
            Err(mpsc::error::TrySendError::Closed(_)) => {
                self.consumers.remove(&key);
            }
        }
    }

    fn poll_timer(&mut self, cx: &mut Context<'_>) {
        let next = self.engine.poll_timeout();
        if next != self.timer_at {
            self.timer_at = next;
            if let Some(at) = next {
                self.timer
                    .as_mut()
                    .reset(tokio::time::Instant::from_std(at));
            }
        }
        if self.timer_at.is_some() && self.timer.as_mut().poll(cx).is_ready() {
            self.engine.handle_timeout(Instant::now());
            self.timer_at = None;
            // Re-arm for the next deadline.
            if let Some(at) = self.engine.poll_timeout() {
                self.timer_at = Some(at);
                self.timer
                    .as_mut()
                    .reset(tokio::time::Instant::from_std(at));
                let _ = self.timer.as_mut().poll(cx);
            }
        }
    }

    /// Write as much as the socket takes. Ready(true) when bytes were written.
    fn poll_write(&mut self, cx: &mut Context<'_>) -> Poll<bool> {
        let tx = self.engine.transmit();
        if !tx.is_empty() {
            self.wq_bytes += tx.len();
            tx.drain_into(&mut self.wq);
            self.engine.on_transmit(Instant::now());
        }
        let mut wrote = false;
        while !self.wq.is_empty() {
            let mut slices = [IoSlice::new(&[]); 64];
            let mut n = 0;
            for (slot, b) in slices.iter_mut().zip(self.wq.iter()) {
                *slot = IoSlice::new(b);
                n += 1;
            }
            let res = if n == 1 {
                match self.wq.front() {
                    Some(b) => Pin::new(&mut self.io).poll_write(cx, b),
                    None => break,
                }
            } else {
                Pin::new(&mut self.io).poll_write_vectored(cx, &slices[..n])
            };
            match res {
                Poll::Ready(Ok(0)) => {
                    self.engine.handle_io_error(Error::io(
                        "writing to the server",
                        std::io::ErrorKind::WriteZero.into(),
                    ));
                    self.wq.clear();
                    self.wq_bytes = 0;
                    return Poll::Ready(true);
                }
                Poll::Ready(Ok(mut written)) => {
                    wrote = true;
                    self.wq_bytes -= written.min(self.wq_bytes);
                    while written > 0 {
                        let Some(front) = self.wq.front_mut() else {
                            break;
                        };
                        if written >= front.len() {
                            written -= front.len();
                            self.wq.pop_front();
                        } else {
                            front.advance(written);
                            written = 0;
                        }
                    }
                }
                Poll::Ready(Err(e)) => {
                    self.engine
                        .handle_io_error(Error::io("writing to the server", e));
                    self.wq.clear();
                    self.wq_bytes = 0;
                    return Poll::Ready(true);
                }
                Poll::Pending => {
                    return if wrote {
                        Poll::Ready(true)
                    } else {
                        Poll::Pending
                    }
                }
            }
        }
        if wrote {
            let _ = Pin::new(&mut self.io).poll_flush(cx);
        }
        Poll::Ready(wrote)
    }

    fn handle_events(&mut self) {
        if self.engine.is_closed() && self.shared.closed().is_none() {
            // Before any waiter (the close's own, say) learns of it: a handle that asks next
            // must find the connection closed.
            let err = self
                .engine
                .error()
                .cloned()
                .unwrap_or(Error::ConnectionClosedByClient);
            self.shared.set_closed(err);
        }
        while let Some(ev) = self.engine.poll_event() {
            match ev {
                Event::Delivery(d) => self.dispatch(d),
                Event::Confirm {
                    token,
                    confirmation,
                } => {
                    if let Responder::Confirm(tx) = token {
                        if let Err(Ok(Confirmation::Returned(r))) = tx.send(Ok(confirmation)) {
                            // The publisher stopped waiting: the return is nobody's, like one
                            // outside confirm mode.
                            self.deliver_return(r);
                        }
                    }
                }
                Event::Reply { token, reply } => match token {
                    Responder::Reply(tx) => {
                        let _ = tx.send(Ok(reply));
                    }
                    Responder::Open(tx, shared) => {
                        if let Reply::ChannelOpened(id) = reply {
                            self.channels.insert(id, shared);
                            let _ = tx.send(Ok(id));
                        }
                    }
                    Responder::Consume(tx, sender, channel) => {
                        // Registered before the reply is handed out, so no delivery that follows
                        // the consume-ok can miss its consumer.
                        if let Reply::Method(Method::BasicConsumeOk(ok)) = &reply {
                            self.consumers
                                .insert((channel, ok.consumer_tag.clone()), sender);
                        }
                        let _ = tx.send(Ok(reply));
                    }
                    Responder::Confirm(tx) => {
                        let _ = tx.send(Ok(Confirmation::NotRequested));
                    }
                    Responder::Cancel(tx, channel, tag) => {
                        self.consumers.remove(&(channel, tag));
                        let _ = tx.send(Ok(reply));
                    }
                    Responder::Nobody => {}
                },
                Event::Failed { token, error } => {
                    // Mark the handle closed before any waiter learns of it, so a call the
                    // waiter makes next fails with this same error instead of racing here.
                    match &error {
                        Error::ChannelClosed { channel, .. } => {
                            if let Some(s) = self.channels.get(channel) {
                                s.set_closed(error.clone());
                            }
                        }
                        Error::ConnectionClosed(_) => self.shared.set_closed(error.clone()),
                        _ => {}
                    }
                    token.fail(error)
                }
                Event::Returned(r) => self.deliver_return(r),
                Event::ConsumerCancelled {
                    channel,
                    consumer_tag,
                } => {
                    debug!(channel, %consumer_tag, "consumer cancelled by the broker");
                    let key = (channel, consumer_tag.clone());
                    if let Some(tx) = self.consumers.remove(&key) {
                        let err = Error::ConsumerCancelled {
                            channel,
                            consumer_tag: consumer_tag.to_string(),
                        };
                        self.push_item(key, &tx, Err(err));
                    }
                }
                Event::ChannelClosed { channel, error } => {
                    let err = error.unwrap_or(Error::ChannelClosedByClient(channel));
                    if let Some(s) = self.channels.remove(&channel) {
                        s.set_closed(err.clone());
                    }
                    let keys: Vec<ConsumerKey> = self
                        .consumers
                        .keys()
                        .filter(|(ch, _)| *ch == channel)
                        .cloned()
                        .collect();
                    for key in keys {
                        if let Some(tx) = self.consumers.remove(&key) {
                            self.push_item(key, &tx, Err(err.clone()));
                        }
                    }
                }
                Event::Flow { channel, active } => {
                    if let Some(s) = self.channels.get(&channel) {
                        s.set_flow(active);
                    }
                }
                Event::Blocked { reason } => self.shared.set_blocked(Some(reason)),
                Event::Unblocked => self.shared.set_blocked(None),
                Event::Connected { server_properties } => {
                    self.shared.set_connected(
                        server_properties,
                        self.engine.frame_max(),
                        self.engine.channel_max(),
                        self.engine.heartbeat(),
                    );
                    if let Some(tx) = self.connected.take() {
                        let _ = tx.send(Ok(()));
                    }
                }
                Event::Closed { error } => {
                    let err = error.clone().unwrap_or(Error::ConnectionClosedByClient);
                    if let Some(tx) = self.connected.take() {
                        let _ = tx.send(Err(err.clone()));
                    }
                    self.shared.set_closed(err);
                }
            }
        }
    }

    fn deliver_return(&self, r: Box<ReturnedMessage>) {
        match self.channels.get(&r.channel) {
            Some(s) => s.deliver_return(*r),
            None => warn!(
                channel = r.channel,
                "returned message for unknown channel dropped"
            ),
        }
    }

    fn dispatch(&mut self, d: Box<Delivery>) {
        let key = (d.channel, d.consumer_tag.clone());
        let Some(tx) = self.consumers.get(&key).cloned() else {
            debug!(channel = d.channel, consumer_tag = %d.consumer_tag, "delivery for unknown consumer dropped");
            return;
        };
        self.push_item(key, &tx, Ok(d));
    }
}

fn fail_command(cmd: Command, err: Error) {
    match cmd {
        Command::OpenChannel { reply, .. } => {
            let _ = reply.send(Err(err));
        }
        Command::Call { reply, .. }
        | Command::Consume { reply, .. }
        | Command::Close { reply, .. }
        | Command::UpdateSecret { reply, .. } => {
            let _ = reply.send(Err(err));
        }
        Command::Publish(p) => {
            if let Some(tx) = p.confirm {
                let _ = tx.send(Err(err));
            }
        }
        Command::Send { .. } | Command::CloseChannel { .. } => {}
    }
}
