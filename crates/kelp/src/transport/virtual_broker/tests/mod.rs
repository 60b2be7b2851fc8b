//! Tests of the virtual broker core.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod broker;
mod deadletter;
mod props;
mod queue;
mod routing;

use std::sync::Arc;

use kelp_amqp::{BasicProperties, FieldTable, FieldValue};

use super::*;

pub(super) const T0: u64 = 1_700_000_000_000;

pub(super) fn table(pairs: &[(&str, FieldValue)]) -> FieldTable {
    pairs
        .iter()
        .map(|(k, v)| (*k, v.clone()))
        .collect::<FieldTable>()
}

pub(super) fn s(v: &str) -> FieldValue {
    FieldValue::from(v)
}

pub(super) fn msg(exchange: &str, key: &str) -> MessageData {
    MessageData::new(exchange, key, BasicProperties::default(), "body")
}

pub(super) fn msg_body(exchange: &str, key: &str, body: &str) -> MessageData {
    MessageData::new(
        exchange,
        key,
        BasicProperties::default(),
        bytes::Bytes::copy_from_slice(body.as_bytes()),
    )
}

pub(super) fn msg_props(exchange: &str, key: &str, props: BasicProperties) -> MessageData {
    MessageData::new(exchange, key, props, "body")
}

pub(super) fn names(r: &RoutedQueues) -> Vec<String> {
    let mut v: Vec<String> = r.iter().map(|q| q.to_string()).collect();
    v.sort();
    v
}

pub(super) fn body(d: &Delivery) -> String {
    String::from_utf8(d.message.body.to_vec()).unwrap()
}

pub(super) fn bodies_of(ds: &[Delivery]) -> Vec<String> {
    ds.iter().map(body).collect()
}

/// The message's headers (empty when it has none).
pub(super) fn headers_of(m: &MessageData) -> FieldTable {
    m.properties.headers.clone().unwrap_or_default()
}

/// A string header (long string).
pub(super) fn hstr(t: &FieldTable, key: &str) -> Option<String> {
    t.get(key).and_then(FieldValue::as_str).map(str::to_owned)
}

/// A message's `x-death` entries, most recent first.
pub(super) fn x_death(m: &MessageData) -> Vec<FieldTable> {
    match headers_of(m).get("x-death") {
        Some(FieldValue::Array(a)) => a
            .iter()
            .map(|v| match v {
                FieldValue::Table(t) => t.clone(),
                other => panic!("x-death entry is not a table: {other:?}"),
            })
            .collect(),
        None => Vec::new(),
        Some(other) => panic!("x-death is not an array: {other:?}"),
    }
}

/// Queue options with only `exclusive` set.
pub(super) fn exclusive() -> QueueOptions {
    QueueOptions {
        exclusive: true,
        ..QueueOptions::default()
    }
}

/// A broker, one owner, one session.
pub(super) struct Fx {
    pub b: VirtualBroker,
    pub o: OwnerId,
    pub s: SessionId,
}

impl Fx {
    pub fn new() -> Self {
        let mut b = VirtualBroker::new();
        let o = OwnerId(1);
        let s = b.open_session(o);
        Fx { b, o, s }
    }

    pub fn queue(&mut self, name: &str) -> Arc<str> {
        self.queue_args(name, &[])
    }

    pub fn queue_args(&mut self, name: &str, args: &[(&str, FieldValue)]) -> Arc<str> {
        self.b
            .declare_queue(self.o, name, QueueOptions::default(), &table(args), T0)
            .unwrap()
            .queue
    }

    pub fn declare(
        &mut self,
        name: &str,
        options: QueueOptions,
        args: &[(&str, FieldValue)],
    ) -> Result<QueueDeclareOk, BrokerError> {
        self.b
            .declare_queue(self.o, name, options, &table(args), T0)
    }

    pub fn exchange(&mut self, name: &str, kind: ExchangeKind) {
        self.b
            .declare_exchange(name, kind, ExchangeOptions::default(), &FieldTable::new())
            .unwrap();
    }

    pub fn bind(&mut self, queue: &str, exchange: &str, key: &str) {
        self.b
            .bind_queue(self.o, queue, exchange, key, &FieldTable::new())
            .unwrap();
    }

    pub fn publish(&mut self, exchange: &str, key: &str, body: &str) -> PublishOutcome {
        self.b
            .publish(msg_body(exchange, key, body), false, T0)
            .unwrap()
    }

    pub fn send(&mut self, queue: &str, body: &str) -> PublishOutcome {
        self.publish("", queue, body)
    }

    pub fn send_at(&mut self, queue: &str, body: &str, now: u64) -> PublishOutcome {
        self.b
            .publish(msg_body("", queue, body), false, now)
            .unwrap()
    }

    /// Publish `body` to `queue` through the default exchange with `props`, at `now`.
    pub fn send_props(
        &mut self,
        queue: &str,
        body: &str,
        props: BasicProperties,
        now: u64,
    ) -> PublishOutcome {
        let m = MessageData::new(
            "",
            queue,
            props,
            bytes::Bytes::copy_from_slice(body.as_bytes()),
        );
        self.b.publish(m, false, now).unwrap()
    }

    /// Start a consumer on the fixture's session (manual ack, not exclusive).
    pub fn consume(&mut self, queue: &str, tag: &str) -> String {
        self.b
            .consume(self.s, queue, tag, ConsumeOptions::default(), T0)
            .unwrap()
            .to_string()
    }

    /// The next delivery for consumer `tag` of the fixture's session.
    pub fn next(&mut self, tag: &str) -> Option<Delivery> {
        self.b.next_for_consumer(self.s, tag, T0).unwrap()
    }

    pub fn get(&mut self, queue: &str) -> Option<Delivery> {
        self.b.get(self.s, queue, false, T0).unwrap()
    }

    pub fn get_at(&mut self, queue: &str, now: u64) -> Option<Delivery> {
        self.b.get(self.s, queue, false, now).unwrap()
    }

    pub fn bodies(&mut self, queue: &str) -> Vec<String> {
        self.b
            .peek_queue(queue)
            .unwrap()
            .map(|m| String::from_utf8(m.message.body.to_vec()).unwrap())
            .collect()
    }

    pub fn count(&self, queue: &str) -> u32 {
        self.b.queue_info(queue).unwrap().message_count
    }

    pub fn exists(&self, queue: &str) -> bool {
        self.b.queue_info(queue).is_some()
    }

    /// Ack `tag` on the fixture's session.
    pub fn ack(&mut self, tag: u64) {
        assert_eq!(self.b.ack(self.s, tag, false).unwrap(), 1);
    }

    /// Reject `tag` on the fixture's session.
    pub fn reject(&mut self, tag: u64, requeue: bool) {
        self.b.reject(self.s, tag, requeue, T0).unwrap();
    }

    /// The ready messages of `queue`, in delivery order.
    pub fn ready(&self, queue: &str) -> Vec<QueuedMessage> {
        self.b.peek_queue(queue).unwrap().cloned().collect()
    }
}
