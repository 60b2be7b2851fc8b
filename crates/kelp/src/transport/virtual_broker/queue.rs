//! One in-memory queue: FIFO per priority level, TTL, length limits.

use std::collections::VecDeque;
use std::sync::Arc;

use kelp_amqp::{FieldTable, FieldValue};

use super::error::{BrokerError, EntityKind};
use super::message::{Message, QueuedMessage};

/// What a full queue does with a new message (`x-overflow`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Overflow {
    /// Drop (and dead-letter, reason `maxlen`) messages from the head to make room.
    #[default]
    DropHead,
    /// Refuse the new message; a confirm-mode publisher gets a nack.
    RejectPublish,
    /// Refuse the new message and dead-letter it (reason `maxlen`).
    RejectPublishDlx,
}

impl Overflow {
    /// The `x-overflow` value.
    pub fn as_str(self) -> &'static str {
        match self {
            Overflow::DropHead => "drop-head",
            Overflow::RejectPublish => "reject-publish",
            Overflow::RejectPublishDlx => "reject-publish-dlx",
        }
    }
}

/// The queue arguments the core understands, parsed and validated. Other arguments are kept
/// in the declaration but ignored.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct QueueArgs {
    /// `x-message-ttl`: ms a message may stay in the queue.
    pub message_ttl: Option<u64>,
    /// `x-expires`: ms the queue may stay unused (no consumers, no get, no redeclare) before it
    /// is deleted.
    pub expires: Option<u64>,
    /// `x-max-length`: most ready messages.
    pub max_length: Option<u64>,
    /// `x-max-length-bytes`: most total body bytes of ready messages.
    pub max_length_bytes: Option<u64>,
    /// `x-overflow`.
    pub overflow: Overflow,
    /// `x-max-priority` (1..=255); `None` for a plain FIFO queue.
    pub max_priority: Option<u8>,
    /// `x-dead-letter-exchange` (`""` is the default exchange).
    pub dead_letter_exchange: Option<Arc<str>>,
    /// `x-dead-letter-routing-key`; without it the message's own routing key is used.
    pub dead_letter_routing_key: Option<Arc<str>>,
    /// `x-single-active-consumer`: only the earliest consumer still attached gets messages.
    pub single_active_consumer: bool,
}

const INT_ARGS: [&str; 5] = [
    "x-message-ttl",
    "x-expires",
    "x-max-length",
    "x-max-length-bytes",
    "x-max-priority",
];

impl QueueArgs {
    /// Parse the arguments of queue `queue` (the name is for error messages).
    pub fn parse(queue: &str, args: &FieldTable) -> Result<Self, BrokerError> {
        let bad = |arg: &str, reason: String| {
            BrokerError::invalid_arg(EntityKind::Queue, queue, arg, reason)
        };
        let int = |key: &str, min: i64| -> Result<Option<u64>, BrokerError> {
            match args.get(key) {
                None => Ok(None),
                Some(v) => match v.as_i64() {
                    Some(n) if n >= min => Ok(u64::try_from(n).ok()),
                    Some(n) => Err(bad(key, format!("{n} is below the minimum {min}"))),
                    None => Err(bad(key, format!("expected an integer, got {v:?}"))),
                },
            }
        };
        let string = |key: &str| -> Result<Option<&str>, BrokerError> {
            match args.get(key) {
                None => Ok(None),
                Some(v) => v
                    .as_str()
                    .map(Some)
                    .ok_or_else(|| bad(key, format!("expected a string, got {v:?}"))),
            }
        };
        let max_priority = match int("x-max-priority", 0)? {
            None | Some(0) => None,
            Some(p) => Some(
                u8::try_from(p)
                    .map_err(|_| bad("x-max-priority", format!("{p} is above the maximum 255")))?,
            ),
        };
        let overflow = match string("x-overflow")? {
            None | Some("drop-head") => Overflow::DropHead,
            Some("reject-publish") => Overflow::RejectPublish,
            Some("reject-publish-dlx") => Overflow::RejectPublishDlx,
            Some(other) => {
                return Err(bad(
                    "x-overflow",
                    format!(
                        "'{other}' is not one of drop-head, reject-publish, reject-publish-dlx"
                    ),
                ))
            }
        };
        let dead_letter_exchange = string("x-dead-letter-exchange")?.map(Arc::from);
        let dead_letter_routing_key = string("x-dead-letter-routing-key")?.map(Arc::from);
        if dead_letter_routing_key.is_some() && dead_letter_exchange.is_none() {
            return Err(bad(
                "x-dead-letter-routing-key",
                "x-dead-letter-exchange must be set too".to_owned(),
            ));
        }
        let single_active_consumer = match args.get("x-single-active-consumer") {
            None => false,
            Some(FieldValue::Bool(b)) => *b,
            Some(v) => {
                return Err(bad(
                    "x-single-active-consumer",
                    format!("expected a boolean, got {v:?}"),
                ))
            }
        };
        Ok(QueueArgs {
            message_ttl: int("x-message-ttl", 0)?,
            expires: int("x-expires", 1)?,
            max_length: int("x-max-length", 0)?,
            max_length_bytes: int("x-max-length-bytes", 0)?,
            overflow,
            max_priority,
            dead_letter_exchange,
            dead_letter_routing_key,
            single_active_consumer,
        })
    }

    /// The first argument that differs from `current`, as (name, received, current), for
    /// [`BrokerError::Inequivalent`].
    pub fn difference(&self, current: &QueueArgs) -> Option<(&'static str, String, String)> {
        fn d<T: PartialEq + std::fmt::Debug>(
            name: &'static str,
            a: &T,
            b: &T,
        ) -> Option<(&'static str, String, String)> {
            (a != b).then(|| (name, format!("{a:?}"), format!("{b:?}")))
        }
        let ints = [
            (&self.message_ttl, &current.message_ttl),
            (&self.expires, &current.expires),
            (&self.max_length, &current.max_length),
            (&self.max_length_bytes, &current.max_length_bytes),
        ];
        for (name, (a, b)) in INT_ARGS.iter().zip(ints) {
            if let Some(x) = d(name, a, b) {
                return Some(x);
            }
        }
        d("x-max-priority", &self.max_priority, &current.max_priority)
            .or_else(|| {
                d(
                    "x-single-active-consumer",
                    &self.single_active_consumer,
                    &current.single_active_consumer,
                )
            })
            .or_else(|| {
                (self.overflow != current.overflow).then(|| {
                    (
                        "x-overflow",
                        self.overflow.as_str().to_owned(),
                        current.overflow.as_str().to_owned(),
                    )
                })
            })
            .or_else(|| {
                d(
                    "x-dead-letter-exchange",
                    &self.dead_letter_exchange,
                    &current.dead_letter_exchange,
                )
            })
            .or_else(|| {
                d(
                    "x-dead-letter-routing-key",
                    &self.dead_letter_routing_key,
                    &current.dead_letter_routing_key,
                )
            })
    }
}

/// The result of [`MessageQueue::push`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PushOutcome {
    /// Enqueued (possibly dropping older messages, with `drop-head`).
    Enqueued,
    /// Refused because the queue is full and its overflow is `reject-publish(-dlx)`.
    Rejected,
}

/// An in-memory queue. FIFO within a priority level; higher levels are served first.
/// Expired messages are removed when they reach the head (as in RabbitMQ), by
/// [`pop`](MessageQueue::pop) or [`expire`](MessageQueue::expire).
#[derive(Debug)]
pub struct MessageQueue {
    args: QueueArgs,
    /// Index = priority level; one level when the queue has no `x-max-priority`.
    levels: Vec<VecDeque<QueuedMessage>>,
    len: usize,
    bytes: usize,
    /// Messages with an `expires_at`.
    expiring: usize,
    /// The `seq` of the next message pushed; each level is sorted by `seq`.
    next_seq: u64,
}

impl MessageQueue {
    /// An empty queue with `args`.
    pub fn new(args: QueueArgs) -> Self {
        let n = args.max_priority.map_or(1, |p| usize::from(p) + 1);
        MessageQueue {
            args,
            levels: (0..n).map(|_| VecDeque::new()).collect(),
            len: 0,
            bytes: 0,
            expiring: 0,
            next_seq: 0,
        }
    }

    /// Its arguments.
    pub fn args(&self) -> &QueueArgs {
        &self.args
    }

    /// Ready messages (including expired ones not yet at the head).
    pub fn len(&self) -> usize {
        self.len
    }

    /// True when no message is ready.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Total body bytes of ready messages.
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// True when some ready message has an expiry time.
    pub fn has_expiring(&self) -> bool {
        self.expiring > 0
    }

    fn level_of(&self, priority: Option<u8>) -> u8 {
        match self.args.max_priority {
            None => 0,
            Some(max) => priority.unwrap_or(0).min(max),
        }
    }

    fn would_overflow(&self, extra_len: usize, extra_bytes: usize) -> bool {
        let over = |limit: Option<u64>, v: usize| limit.is_some_and(|l| v as u64 > l);
        over(self.args.max_length, self.len + extra_len)
            || over(self.args.max_length_bytes, self.bytes + extra_bytes)
    }

    fn account_in(&mut self, m: &QueuedMessage) {
        self.len += 1;
        self.bytes += m.message.body.len();
        self.expiring += usize::from(m.expires_at.is_some());
    }

    fn account_out(&mut self, m: &QueuedMessage) {
        self.len -= 1;
        self.bytes -= m.message.body.len();
        self.expiring -= usize::from(m.expires_at.is_some());
    }

    /// The TTL a message gets in this queue: its own (`message_ttl`, from `expiration`) or the
    /// queue's `x-message-ttl`, whichever is shorter.
    pub fn effective_ttl(&self, message_ttl: Option<u64>) -> Option<u64> {
        match (self.args.message_ttl, message_ttl) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// True when a new `message` would be refused (`x-overflow: reject-publish(-dlx)` and the
    /// queue is full).
    pub fn would_reject(&self, message: &Message) -> bool {
        self.args.overflow != Overflow::DropHead && self.would_overflow(1, message.body.len())
    }

    /// This queue's entry for `message` arriving at `now_ms`, next in its arrival order, without
    /// enqueueing it (for a message handed straight to a consumer).
    pub(crate) fn admit(
        &mut self,
        message: &Message,
        message_ttl: Option<u64>,
        now_ms: u64,
    ) -> QueuedMessage {
        let qm = QueuedMessage {
            message: message.clone(),
            redelivered: false,
            expires_at: self
                .effective_ttl(message_ttl)
                .map(|t| now_ms.saturating_add(t)),
            priority: self.level_of(message.properties.priority),
            seq: self.next_seq,
        };
        self.next_seq += 1;
        qm
    }

    /// Enqueue `message` at `now_ms`. `message_ttl` is its own TTL (from `expiration`); the
    /// queue's `x-message-ttl` applies too, whichever ends sooner. With `drop-head`, messages
    /// dropped to respect the length limits are appended to `dropped` (to be dead-lettered with
    /// reason `maxlen`).
    pub fn push(
        &mut self,
        message: &Message,
        message_ttl: Option<u64>,
        now_ms: u64,
        dropped: &mut Vec<QueuedMessage>,
    ) -> PushOutcome {
        if self.would_reject(message) {
            return PushOutcome::Rejected;
        }
        let qm = self.admit(message, message_ttl, now_ms);
        self.account_in(&qm);
        if let Some(level) = self.levels.get_mut(usize::from(qm.priority)) {
            level.push_back(qm);
        }
        while self.len > 0 && self.would_overflow(0, 0) {
            match self.pop_head() {
                Some(m) => dropped.push(m),
                None => break,
            }
        }
        PushOutcome::Enqueued
    }

    /// Remove the next message to deliver, whether expired or not.
    fn pop_head(&mut self) -> Option<QueuedMessage> {
        let m = self.levels.iter_mut().rev().find_map(VecDeque::pop_front)?;
        self.account_out(&m);
        Some(m)
    }

    /// Remove and return the next deliverable message; expired messages met at the head on
    /// the way are appended to `expired`.
    pub fn pop(&mut self, now_ms: u64, expired: &mut Vec<QueuedMessage>) -> Option<QueuedMessage> {
        if self.len == 0 {
            return None;
        }
        loop {
            let m = self.pop_head()?;
            if m.is_expired(now_ms) {
                expired.push(m);
            } else {
                return Some(m);
            }
        }
    }

    /// Put a message taken from this queue back where it was (a requeue): ahead of every
    /// message that arrived after it, behind those that arrived before it and are still ready
    /// (as RabbitMQ does). Usually that is the head of its priority level.
    pub fn requeue(&mut self, message: QueuedMessage) {
        let level = usize::from(self.level_of(Some(message.priority)));
        self.account_in(&message);
        if let Some(l) = self.levels.get_mut(level) {
            let at = l.partition_point(|m| m.seq < message.seq);
            l.insert(at, message);
        }
    }

    /// Remove expired messages from the head of every priority level into `expired`; returns
    /// how many.
    pub fn expire(&mut self, now_ms: u64, expired: &mut Vec<QueuedMessage>) -> usize {
        if self.expiring == 0 {
            return 0;
        }
        let (mut n, mut bytes, mut expiring) = (0, 0, 0);
        for level in &mut self.levels {
            while let Some(m) = level.pop_front() {
                if !m.is_expired(now_ms) {
                    level.push_front(m);
                    break;
                }
                n += 1;
                bytes += m.message.body.len();
                expiring += usize::from(m.expires_at.is_some());
                expired.push(m);
            }
        }
        self.len -= n;
        self.bytes -= bytes;
        self.expiring -= expiring;
        n
    }

    /// The earliest expiry time among the heads of the priority levels.
    pub fn next_expiry(&self) -> Option<u64> {
        if self.expiring == 0 {
            return None;
        }
        self.levels
            .iter()
            .filter_map(|l| l.front().and_then(|m| m.expires_at))
            .min()
    }

    /// Remove all ready messages; returns how many there were.
    pub fn purge(&mut self) -> usize {
        let n = self.len;
        for l in &mut self.levels {
            l.clear();
        }
        self.len = 0;
        self.bytes = 0;
        self.expiring = 0;
        n
    }

    /// The ready messages in delivery order (for inspection and tests).
    pub fn iter(&self) -> impl Iterator<Item = &QueuedMessage> {
        self.levels.iter().rev().flat_map(|l| l.iter())
    }
}
