//! Per-channel state: pending synchronous requests, publisher confirms and content assembly.

use std::collections::VecDeque;

use bytes::{Bytes, BytesMut};

use super::event::{Delivery, GetMessage, ReturnedMessage};
use crate::codec::{BasicProperties, Method};

/// What reply a pending request waits for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Expect {
    /// One specific method.
    Method(u16, u16),
    /// `basic.get-ok` (+content) or `basic.get-empty`.
    Get,
    /// `channel.close-ok`.
    Close,
}

impl Expect {
    /// The reply a request waits for, or `None` if it gets no reply (no-wait or asynchronous).
    pub(crate) fn for_request(m: &Method) -> Option<Expect> {
        use Method::*;
        let e = |c, m| Some(Expect::Method(c, m));
        match m {
            ChannelOpen(_) => e(20, 11),
            ChannelFlow(_) => e(20, 21),
            ChannelClose(_) => Some(Expect::Close),
            AccessRequest(_) => e(30, 11),
            ExchangeDeclare(x) if !x.nowait => e(40, 11),
            ExchangeDelete(x) if !x.nowait => e(40, 21),
            ExchangeBind(x) if !x.nowait => e(40, 31),
            ExchangeUnbind(x) if !x.nowait => e(40, 51),
            QueueDeclare(x) if !x.nowait => e(50, 11),
            QueueBind(x) if !x.nowait => e(50, 21),
            QueuePurge(x) if !x.nowait => e(50, 31),
            QueueDelete(x) if !x.nowait => e(50, 41),
            QueueUnbind(_) => e(50, 51),
            BasicQos(_) => e(60, 11),
            BasicConsume(x) if !x.nowait => e(60, 21),
            BasicCancel(x) if !x.nowait => e(60, 31),
            BasicGet(_) => Some(Expect::Get),
            BasicRecover(_) => e(60, 111),
            ConfirmSelect(x) if !x.nowait => e(85, 11),
            TxSelect(_) => e(90, 11),
            TxCommit(_) => e(90, 21),
            TxRollback(_) => e(90, 31),
            _ => None,
        }
    }

    pub(crate) fn matches(self, m: &Method) -> bool {
        match self {
            Expect::Method(c, i) => m.ids() == (c, i),
            Expect::Get => matches!(m, Method::BasicGetOk(_) | Method::BasicGetEmpty(_)),
            Expect::Close => matches!(m, Method::ChannelCloseOk(_)),
        }
    }
}

#[derive(Debug)]
pub(crate) struct Pending<T> {
    pub(crate) token: T,
    pub(crate) expect: Expect,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ChanState {
    Opening,
    Open,
    Closing,
}

/// The message a content belongs to, built in place as its frames arrive.
#[derive(Debug)]
pub(crate) enum ContentKind {
    Deliver(Box<Delivery>),
    Return(Box<ReturnedMessage>),
    GetOk(Box<GetMessage>),
}

/// A body being reassembled from body frames.
#[derive(Debug)]
pub(crate) enum Body {
    Empty,
    /// One frame so far: kept by reference (the common case, no copy).
    One(Bytes),
    /// Several frames: concatenated.
    Many(BytesMut),
}

impl Body {
    pub(crate) fn len(&self) -> usize {
        match self {
            Body::Empty => 0,
            Body::One(b) => b.len(),
            Body::Many(b) => b.len(),
        }
    }
    pub(crate) fn push(&mut self, chunk: Bytes) {
        *self = match std::mem::replace(self, Body::Empty) {
            Body::Empty => Body::One(chunk),
            Body::One(first) => {
                let mut m = BytesMut::with_capacity(first.len() + chunk.len());
                m.extend_from_slice(&first);
                m.extend_from_slice(&chunk);
                Body::Many(m)
            }
            Body::Many(mut m) => {
                m.extend_from_slice(&chunk);
                Body::Many(m)
            }
        };
    }
    pub(crate) fn into_bytes(self) -> Bytes {
        match self {
            Body::Empty => Bytes::new(),
            Body::One(b) => b,
            Body::Many(m) => m.freeze(),
        }
    }
}

#[derive(Debug)]
pub(crate) struct Incoming {
    pub(crate) kind: ContentKind,
    /// Announced body size, once the header arrived.
    pub(crate) size: Option<u64>,
    pub(crate) body: Body,
}

impl Incoming {
    pub(crate) fn new(kind: ContentKind) -> Self {
        Incoming {
            kind,
            size: None,
            body: Body::Empty,
        }
    }
    pub(crate) fn properties_mut(&mut self) -> &mut BasicProperties {
        match &mut self.kind {
            ContentKind::Deliver(d) => &mut d.properties,
            ContentKind::Return(r) => &mut r.properties,
            ContentKind::GetOk(g) => &mut g.delivery.properties,
        }
    }
}

/// A publish awaiting its ack or nack (confirm mode).
#[derive(Debug)]
pub(crate) struct Unconfirmed<T> {
    pub(crate) seq: u64,
    /// Whom to tell; `None` for a publish nobody waits for (tracked only when mandatory, so a
    /// `basic.return` for it can still be told apart from the others').
    pub(crate) token: Option<T>,
    pub(crate) mandatory: bool,
}

/// A publish that a multiple ack settled right after a `basic.return`, when that ack may or
/// may not be the returned message's own (see `Engine::on_confirm`). Decided by the next frame.
#[derive(Debug)]
pub(crate) struct Held<T> {
    pub(crate) seq: u64,
    pub(crate) token: Option<T>,
    pub(crate) returned: Box<ReturnedMessage>,
}

#[derive(Debug)]
pub(crate) struct Chan<T> {
    pub(crate) state: ChanState,
    pub(crate) pending: VecDeque<Pending<T>>,
    pub(crate) confirm: bool,
    pub(crate) next_seq: u64,
    /// Publishes awaiting ack/nack, by sequence number, oldest first.
    pub(crate) unconfirmed: VecDeque<Unconfirmed<T>>,
    /// How many of `unconfirmed` are mandatory.
    pub(crate) mandatory: usize,
    /// A `basic.return` (confirm mode) waiting for the ack of the publish it returns.
    pub(crate) returned: Option<Box<ReturnedMessage>>,
    /// See [`Held`].
    pub(crate) held: Option<Held<T>>,
    pub(crate) incoming: Option<Incoming>,
    pub(crate) active: bool,
}

impl<T> Chan<T> {
    pub(crate) fn new() -> Self {
        Chan {
            state: ChanState::Opening,
            pending: VecDeque::new(),
            confirm: false,
            next_seq: 1,
            unconfirmed: VecDeque::new(),
            mandatory: 0,
            returned: None,
            held: None,
            incoming: None,
            active: true,
        }
    }
}
