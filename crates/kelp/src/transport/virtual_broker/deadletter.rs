//! Dead-lettering: the `x-death` history RabbitMQ writes, and its cycle detection.

use bytes::Bytes;
use kelp_amqp::{FieldTable, FieldValue, ShortString};

use super::message::MessageData;

/// Why a message was dead-lettered (the `reason` of its `x-death` entry).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DeathReason {
    /// Rejected or nacked with `requeue = false`.
    Rejected,
    /// Its TTL ran out.
    Expired,
    /// Dropped or refused because the queue was full.
    Maxlen,
}

impl DeathReason {
    /// The reason as written in `x-death`.
    pub fn as_str(self) -> &'static str {
        match self {
            DeathReason::Rejected => "rejected",
            DeathReason::Expired => "expired",
            DeathReason::Maxlen => "maxlen",
        }
    }
}

fn long(s: &str) -> FieldValue {
    FieldValue::LongString(Bytes::copy_from_slice(s.as_bytes()))
}

fn table_str<'a>(t: &'a FieldTable, key: &str) -> Option<&'a str> {
    t.get(key).and_then(FieldValue::as_str)
}

/// The dead-lettered copy of `msg`, which died in `queue` for `reason` at `now_ms`, to be
/// published to `exchange` with `routing_key`.
///
/// As RabbitMQ does: the `x-death` array gets an entry `{count, reason, queue, time, exchange,
/// routing-keys[, original-expiration]}` for (queue, reason) — or that entry's `count` is
/// incremented — and the entry moves to the front; `x-first-death-{reason,queue,exchange}` are
/// set once; `x-last-death-{reason,queue,exchange}` every time; `expiration` is removed.
pub(crate) fn dead_lettered(
    msg: &MessageData,
    queue: &str,
    reason: DeathReason,
    exchange: &str,
    routing_key: &str,
    now_ms: u64,
) -> MessageData {
    let mut props = msg.properties.clone();
    let original_expiration = props.expiration.take();
    let mut headers = props.headers.take().unwrap_or_default();
    let mut deaths = match headers.remove("x-death") {
        Some(FieldValue::Array(a)) => a,
        _ => Vec::new(),
    };
    let found = deaths.iter().position(|d| match d {
        FieldValue::Table(t) => {
            table_str(t, "queue") == Some(queue) && table_str(t, "reason") == Some(reason.as_str())
        }
        _ => false,
    });
    let entry = match found.map(|i| deaths.remove(i)) {
        Some(FieldValue::Table(mut t)) => {
            let count = t.get("count").and_then(FieldValue::as_i64).unwrap_or(0);
            t.insert("count", FieldValue::I64(count.saturating_add(1)));
            t
        }
        _ => {
            let mut t = FieldTable::new();
            t.insert("count", FieldValue::I64(1));
            t.insert("reason", long(reason.as_str()));
            t.insert("queue", long(queue));
            t.insert("time", FieldValue::Timestamp(now_ms / 1000));
            t.insert("exchange", long(&msg.exchange));
            t.insert(
                "routing-keys",
                FieldValue::Array(vec![long(&msg.routing_key)]),
            );
            if let Some(e) = &original_expiration {
                t.insert("original-expiration", long(e));
            }
            t
        }
    };
    deaths.insert(0, FieldValue::Table(entry));
    headers.insert("x-death", FieldValue::Array(deaths));
    if headers.get("x-first-death-reason").is_none() {
        headers.insert("x-first-death-reason", long(reason.as_str()));
        headers.insert("x-first-death-queue", long(queue));
        headers.insert("x-first-death-exchange", long(&msg.exchange));
    }
    headers.insert("x-last-death-reason", long(reason.as_str()));
    headers.insert("x-last-death-queue", long(queue));
    headers.insert("x-last-death-exchange", long(&msg.exchange));
    props.headers = Some(headers);
    MessageData {
        exchange: ShortString::from(exchange),
        routing_key: ShortString::from(routing_key),
        properties: props,
        body: msg.body.clone(),
    }
}

/// Would dead-lettering `msg` (already carrying its new `x-death`) into `queue` close a fully
/// automatic cycle? RabbitMQ's rule: walking `x-death` from the most recent entry, the message
/// has been in `queue` before and no death on the way (including that one) was a rejection.
/// Such deliveries are dropped; cycles involving a rejection are allowed (retry patterns).
pub(crate) fn is_cycle(queue: &str, msg: &MessageData) -> bool {
    let Some(FieldValue::Array(deaths)) = msg
        .properties
        .headers
        .as_ref()
        .and_then(|h| h.get("x-death"))
    else {
        return false;
    };
    for d in deaths {
        let FieldValue::Table(t) = d else {
            return false;
        };
        if table_str(t, "reason") == Some(DeathReason::Rejected.as_str()) {
            return false;
        }
        if table_str(t, "queue") == Some(queue) {
            return true;
        }
    }
    false
}
