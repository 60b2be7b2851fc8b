//! Sessions (an AMQP channel's view of the broker): delivery tags, unacked messages,
//! consumers and prefetch.

use std::collections::VecDeque;
use std::fmt;
use std::sync::Arc;

use kelp_amqp::ShortString;

use super::error::BrokerError;
use super::message::{Delivery, QueuedMessage};

/// Identifies the owner of sessions and exclusive queues (an AMQP connection). Chosen by the
/// caller.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct OwnerId(pub u64);

/// Identifies an open session; allocated by [`open_session`](super::VirtualBroker::open_session).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SessionId(pub(crate) u64);

impl SessionId {
    /// The numeric id.
    pub fn get(self) -> u64 {
        self.0
    }
}

impl fmt::Display for SessionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// A consumer registered on a session.
#[derive(Debug)]
pub(crate) struct Consumer {
    pub tag: ShortString,
    pub id: u64,
    pub queue: Arc<str>,
    pub queue_id: u64,
    pub no_ack: bool,
    pub exclusive: bool,
    /// Per-consumer prefetch (0 = unlimited), fixed when the consumer starts.
    pub prefetch: u16,
    pub unacked: usize,
    /// `x-priority`: higher goes first while it has room.
    pub priority: i64,
    /// Deliveries the broker made to it that it has not taken yet (a message with TTL 0 is
    /// handed to a consumer when it arrives, as RabbitMQ does, or not at all). Already tracked
    /// as unacked.
    pub pending: VecDeque<Delivery>,
}

/// A delivered, not yet settled message. `message` is `None` once settled (a tombstone until
/// it reaches the front of the deque).
#[derive(Debug)]
struct Unacked {
    tag: u64,
    queue: Arc<str>,
    queue_id: u64,
    message: Option<QueuedMessage>,
    consumer: Option<u64>,
}

/// A settled delivery, handed back to the broker to drop, requeue or dead-letter.
#[derive(Debug)]
pub(crate) struct Settled {
    pub queue: Arc<str>,
    pub queue_id: u64,
    pub message: QueuedMessage,
}

#[derive(Debug)]
pub(crate) struct Session {
    pub owner: OwnerId,
    next_tag: u64,
    /// Ascending delivery tags.
    unacked: VecDeque<Unacked>,
    live: usize,
    /// Unacked deliveries made to consumers (what a global prefetch limits).
    pub consumer_unacked: usize,
    /// Prefetch given to consumers started from now on (basic.qos global = false).
    pub prefetch: u16,
    /// Limit on `consumer_unacked` (basic.qos global = true); 0 = unlimited.
    pub global_prefetch: u16,
    pub consumers: Vec<Consumer>,
    next_consumer_id: u64,
}

impl Session {
    pub fn new(owner: OwnerId) -> Self {
        Session {
            owner,
            next_tag: 1,
            unacked: VecDeque::new(),
            live: 0,
            consumer_unacked: 0,
            prefetch: 0,
            global_prefetch: 0,
            consumers: Vec::new(),
            next_consumer_id: 1,
        }
    }

    pub fn unacked_count(&self) -> usize {
        self.live
    }

    pub fn take_tag(&mut self) -> u64 {
        let t = self.next_tag;
        self.next_tag += 1;
        t
    }

    pub fn new_consumer_id(&mut self) -> u64 {
        let id = self.next_consumer_id;
        self.next_consumer_id += 1;
        id
    }

    pub fn consumer_index(&self, tag: &str) -> Option<usize> {
        self.consumers.iter().position(|c| c.tag.as_str() == tag)
    }

    pub fn consumer_by_id(&self, id: u64) -> Option<usize> {
        self.consumers.iter().position(|c| c.id == id)
    }

    /// May consumer `index` receive another message under the prefetch limits?
    pub fn consumer_has_credit(&self, index: usize) -> bool {
        let Some(c) = self.consumers.get(index) else {
            return false;
        };
        if c.no_ack {
            return true;
        }
        (c.prefetch == 0 || c.unacked < usize::from(c.prefetch))
            && (self.global_prefetch == 0
                || self.consumer_unacked < usize::from(self.global_prefetch))
    }

    /// Remember an unacked delivery (by consumer `consumer`, an index into `consumers`).
    pub fn track(
        &mut self,
        tag: u64,
        queue: Arc<str>,
        queue_id: u64,
        message: QueuedMessage,
        consumer: Option<usize>,
    ) {
        let consumer = consumer.and_then(|i| self.consumers.get_mut(i)).map(|c| {
            c.unacked += 1;
            c.id
        });
        if consumer.is_some() {
            self.consumer_unacked += 1;
        }
        self.live += 1;
        self.unacked.push_back(Unacked {
            tag,
            queue,
            queue_id,
            message: Some(message),
            consumer,
        });
    }

    fn position(&self, tag: u64) -> Option<usize> {
        let i = match self.unacked.front() {
            Some(f) if f.tag == tag => 0,
            _ => self.unacked.binary_search_by_key(&tag, |u| u.tag).ok()?,
        };
        self.unacked.get(i)?.message.is_some().then_some(i)
    }

    fn settle_at(&mut self, i: usize, out: &mut Vec<Settled>) {
        let Some(u) = self.unacked.get_mut(i) else {
            return;
        };
        let Some(message) = u.message.take() else {
            return;
        };
        self.live -= 1;
        if let Some(cid) = u.consumer {
            self.consumer_unacked -= 1;
            if let Some(c) = self.consumers.iter_mut().find(|c| c.id == cid) {
                c.unacked -= 1;
            }
        }
        out.push(Settled {
            queue: u.queue.clone(),
            queue_id: u.queue_id,
            message,
        });
    }

    /// Drop tombstones: those at the front at once, the others when they outnumber the live
    /// entries (so one old delivery left unacked does not keep every later settled one).
    fn compact(&mut self) {
        if self.live == 0 {
            self.unacked.clear();
            return;
        }
        while self.unacked.front().is_some_and(|u| u.message.is_none()) {
            self.unacked.pop_front();
        }
        if self.unacked.len() - self.live > self.live + 64 {
            self.unacked.retain(|u| u.message.is_some());
        }
    }

    /// Entries in the unacked list, tombstones included (tests).
    #[cfg(test)]
    pub fn tracked_entries(&self) -> usize {
        self.unacked.len()
    }

    /// Settle `tag` (with `multiple`, every unacked tag up to it; tag 0 with `multiple` means
    /// all), appending the settled messages to `out` in tag order. An unknown tag settles
    /// nothing and fails.
    pub fn settle(
        &mut self,
        tag: u64,
        multiple: bool,
        out: &mut Vec<Settled>,
    ) -> Result<(), BrokerError> {
        if multiple && tag == 0 {
            self.settle_all(out);
            return Ok(());
        }
        let i = self
            .position(tag)
            .ok_or(BrokerError::UnknownDeliveryTag { tag })?;
        if multiple {
            for j in 0..=i {
                self.settle_at(j, out);
            }
        } else {
            self.settle_at(i, out);
        }
        self.compact();
        Ok(())
    }

    /// Settle every unacked delivery.
    pub fn settle_all(&mut self, out: &mut Vec<Settled>) {
        for j in 0..self.unacked.len() {
            self.settle_at(j, out);
        }
        self.compact();
    }
}
