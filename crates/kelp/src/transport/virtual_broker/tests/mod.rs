//! Tests of the virtual broker core.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
// Fixtures shared by the test files; not every file uses every one.
#![allow(dead_code)]

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
}
