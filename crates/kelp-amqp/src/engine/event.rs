//! What the engine reports to its driver.

use bytes::Bytes;

use crate::codec::{BasicProperties, FieldTable, Method, ShortString};
use crate::error::Error;

/// A message delivered to a consumer (`basic.deliver`) or fetched (`basic.get-ok`).
#[derive(Debug, Clone, PartialEq)]
pub struct Delivery {
    /// Channel it arrived on; acks go to the same channel.
    pub channel: u16,
    /// The consumer it was delivered to (empty for `basic.get`).
    pub consumer_tag: ShortString,
    /// Tag to ack / nack / reject it with.
    pub delivery_tag: u64,
    /// True when the broker delivered it before.
    pub redelivered: bool,
    /// Exchange it was published to.
    pub exchange: ShortString,
    /// Routing key it was published with.
    pub routing_key: ShortString,
    /// Properties.
    pub properties: BasicProperties,
    /// Body, sharing memory with the frame it arrived in where it fit in one frame.
    pub body: Bytes,
}

/// A message `basic.get` fetched, with the count of messages left in the queue.
#[derive(Debug, Clone, PartialEq)]
pub struct GetMessage {
    /// The message.
    pub delivery: Delivery,
    /// Messages left in the queue.
    pub message_count: u32,
}

/// A mandatory message the broker could not route (`basic.return`).
#[derive(Debug, Clone, PartialEq)]
pub struct ReturnedMessage {
    /// Channel it was published on.
    pub channel: u16,
    /// Usually 312 NO_ROUTE.
    pub reply_code: u16,
    /// E.g. `NO_ROUTE`.
    pub reply_text: ShortString,
    /// Exchange it was published to.
    pub exchange: ShortString,
    /// Routing key.
    pub routing_key: ShortString,
    /// Properties.
    pub properties: BasicProperties,
    /// Body.
    pub body: Bytes,
}

/// The broker's answer to a publish on a channel in confirm mode.
#[derive(Debug, Clone, PartialEq)]
pub enum Confirmation {
    /// The broker took responsibility for the message.
    Ack,
    /// The broker could not take it (e.g. queue overflow with reject-publish).
    Nack,
    /// A mandatory message no queue took: the broker returned it (`basic.return`) and then
    /// acked it. It holds what came back. RabbitMQ sends the return just before the ack of the
    /// same publish on the same channel, which is how the two are matched; a return that
    /// cannot be matched to a publish someone waits for goes to the channel's
    /// [`Returns`](crate::Returns) stream instead.
    Returned(Box<ReturnedMessage>),
    /// The channel is not in confirm mode: nothing to wait for.
    NotRequested,
}

impl Confirmation {
    /// True for `Ack` (a returned message is acked by the broker but held by no queue: false).
    pub fn is_ack(&self) -> bool {
        matches!(self, Confirmation::Ack)
    }
    /// The message the broker returned, for `Returned`.
    pub fn returned(&self) -> Option<&ReturnedMessage> {
        match self {
            Confirmation::Returned(r) => Some(r),
            _ => None,
        }
    }
}

/// The answer to a synchronous request.
#[derive(Debug, Clone, PartialEq)]
pub enum Reply {
    /// The reply method (e.g. `queue.declare-ok`).
    Method(Method),
    /// `basic.get` found a message.
    Get(Box<GetMessage>),
    /// `basic.get` found the queue empty.
    GetEmpty,
    /// The request was sent with no-wait: no reply will come.
    Sent,
    /// A channel was opened.
    ChannelOpened(u16),
}

/// Something the driver must act on.
#[derive(Debug)]
pub enum Event<T> {
    /// Negotiation finished; the connection is open.
    Connected {
        /// The server's properties (product, version, capabilities).
        server_properties: FieldTable,
    },
    /// A request completed.
    Reply {
        /// The caller's token.
        token: T,
        /// The reply.
        reply: Reply,
    },
    /// A request failed (its channel or connection closed).
    Failed {
        /// The caller's token.
        token: T,
        /// Why.
        error: Error,
    },
    /// A publish was confirmed or nacked (or can never be, with `Failed`).
    Confirm {
        /// The publisher's token.
        token: T,
        /// Ack, Nack, or Returned.
        confirmation: Confirmation,
    },
    /// A message for a consumer (boxed: it is built in place and then only the pointer moves).
    Delivery(Box<Delivery>),
    /// A mandatory message came back that no publish token claims: outside confirm mode,
    /// or in confirm mode when its publish had no token (or could not be identified).
    Returned(Box<ReturnedMessage>),
    /// The broker cancelled a consumer (queue deleted, node down).
    ConsumerCancelled {
        /// Channel.
        channel: u16,
        /// Consumer tag.
        consumer_tag: ShortString,
    },
    /// A channel closed; `error` is `None` when this client closed it. It comes before the
    /// failures of the requests that waited on the channel and before the reply to this
    /// client's `channel.close`, so a driver can mark the channel closed before anyone learns.
    ChannelClosed {
        /// Channel.
        channel: u16,
        /// The broker's reason, if it closed it.
        error: Option<Error>,
    },
    /// The broker asked to pause (`active = false`) or resume publishing on a channel.
    Flow {
        /// Channel.
        channel: u16,
        /// Publishing allowed.
        active: bool,
    },
    /// `connection.blocked`: the broker stops reading from publishers (resource alarm).
    Blocked {
        /// E.g. `low on memory`.
        reason: String,
    },
    /// `connection.unblocked`.
    Unblocked,
    /// The connection is closed; `error` is `None` after a clean close by this client.
    Closed {
        /// Why, unless closed cleanly by this client.
        error: Option<Error>,
    },
}
