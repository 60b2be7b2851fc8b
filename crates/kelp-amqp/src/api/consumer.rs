//! [`Consumer`]: a stream of deliveries; [`Returns`]: a stream of returned messages.

use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::sync::mpsc;

use super::channel::Channel;
use crate::codec::ShortString;
use crate::engine::{Delivery, ReturnedMessage};
use crate::error::Error;

/// The deliveries of one `basic.consume`, as a `Stream` (or with [`Consumer::recv`]).
///
/// Items are `Err` when the consumer ends abnormally: [`Error::ConsumerCancelled`] when the
/// broker cancelled it (queue deleted), or the channel's or connection's close error. After an
/// `Err` the stream ends.
///
/// ```no_run
/// # async fn demo(ch: kelp_amqp::Channel) -> Result<(), kelp_amqp::Error> {
/// use kelp_amqp::options::ConsumeOptions;
/// let mut consumer = ch.basic_consume("tasks", ConsumeOptions::default()).await?;
/// while let Some(delivery) = consumer.recv().await {
///     let delivery = delivery?;
///     ch.basic_ack(delivery.delivery_tag, false).await?;
/// }
/// # Ok(()) }
/// ```
#[derive(Debug)]
pub struct Consumer {
    tag: ShortString,
    queue: ShortString,
    channel: Channel,
    rx: mpsc::Receiver<Result<Box<Delivery>, Error>>,
    ended: bool,
}

impl Consumer {
    pub(crate) fn new(
        tag: ShortString,
        queue: ShortString,
        channel: Channel,
        rx: mpsc::Receiver<Result<Box<Delivery>, Error>>,
    ) -> Self {
        Consumer {
            tag,
            queue,
            channel,
            rx,
            ended: false,
        }
    }

    /// The consumer tag.
    pub fn tag(&self) -> &str {
        &self.tag
    }

    /// The queue consumed from.
    pub fn queue(&self) -> &str {
        &self.queue
    }

    /// The channel it consumes on (ack with it).
    pub fn channel(&self) -> &Channel {
        &self.channel
    }

    /// The next delivery; `None` once the consumer ended.
    pub async fn recv(&mut self) -> Option<Result<Delivery, Error>> {
        std::future::poll_fn(|cx| self.poll_recv(cx)).await
    }

    fn poll_recv(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<Delivery, Error>>> {
        if self.ended {
            return Poll::Ready(None);
        }
        match self.rx.poll_recv(cx) {
            Poll::Ready(Some(Err(e))) => {
                self.ended = true;
                Poll::Ready(Some(Err(e)))
            }
            Poll::Ready(None) => {
                self.ended = true;
                Poll::Ready(None)
            }
            Poll::Ready(Some(Ok(d))) => Poll::Ready(Some(Ok(*d))),
            Poll::Pending => Poll::Pending,
        }
    }

    /// `basic.cancel` this consumer. Deliveries already buffered can still be received.
    pub async fn cancel(&self) -> Result<(), Error> {
        self.channel.basic_cancel(&self.tag).await
    }
}

impl Drop for Consumer {
    /// A dropped consumer is cancelled (`basic.cancel`, no-wait) so the broker stops sending to
    /// it; messages it had received but not acked are requeued when the channel closes.
    fn drop(&mut self) {
        if !self.ended && !self.tag.is_empty() {
            self.channel.cancel_on_drop(&self.tag);
        }
    }
}

impl futures_core::Stream for Consumer {
    type Item = Result<Delivery, Error>;
    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.get_mut().poll_recv(cx)
    }
}

/// Messages the broker returned (mandatory publishes it could not route).
#[derive(Debug)]
pub struct Returns {
    rx: mpsc::UnboundedReceiver<ReturnedMessage>,
}

impl Returns {
    pub(crate) fn new(rx: mpsc::UnboundedReceiver<ReturnedMessage>) -> Self {
        Returns { rx }
    }
    /// The next returned message; `None` once the channel closed.
    pub async fn recv(&mut self) -> Option<ReturnedMessage> {
        self.rx.recv().await
    }
}

impl futures_core::Stream for Returns {
    type Item = ReturnedMessage;
    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.get_mut().rx.poll_recv(cx)
    }
}
