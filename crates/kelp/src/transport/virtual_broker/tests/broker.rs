//! The broker as a whole: publish outcomes, exchanges through the broker, notices, owners,
//! and routing cost with many topic bindings.

use std::sync::Arc;

use kelp_amqp::{BasicProperties, FieldTable, FieldValue};

use super::super::*;
use super::{body, exclusive, msg, names, s, table, Fx, T0};

fn q(name: &str) -> Arc<str> {
    Arc::from(name)
}

// ---------------------------------------------------------------- publish outcome

#[test]
fn publish_reports_the_queues_that_took_the_message() {
    let mut f = Fx::new();
    f.exchange("fan", ExchangeKind::Fanout);
    for n in ["a", "b", "c"] {
        f.queue(n);
        f.bind(n, "fan", "");
    }
    f.bind("a", "fan", "again");
    let out = f.b.publish(msg("fan", "k"), true, T0).unwrap();
    assert_eq!(names(&out.queues), ["a", "b", "c"]);
    assert!(!out.returned);
    assert!(!out.is_unroutable());
    assert!(!out.should_nack());
    assert!(!out.delayed);
    for n in ["a", "b", "c"] {
        assert_eq!(f.count(n), 1, "{n}");
    }
    // The stored message is shared, not copied.
    let a = f.ready("a")[0].message.clone();
    let b = f.ready("b")[0].message.clone();
    assert!(Arc::ptr_eq(&a, &b));
}

#[test]
fn mandatory_unroutable_messages_are_returned() {
    let mut f = Fx::new();
    f.exchange("x", ExchangeKind::Direct);
    f.queue("q");
    f.bind("q", "x", "k");

    let out = f.b.publish(msg("x", "other"), true, T0).unwrap();
    assert!(out.returned);
    assert!(out.is_unroutable());
    assert!(!out.should_nack(), "unroutable is acked in confirm mode");

    let out = f.b.publish(msg("x", "other"), false, T0).unwrap();
    assert!(!out.returned);
    assert!(out.is_unroutable());

    // Default exchange, no such queue.
    let out = f.b.publish(msg("", "missing"), true, T0).unwrap();
    assert!(out.returned);
    let out = f.b.publish(msg("", "q"), true, T0).unwrap();
    assert!(!out.returned);
    assert_eq!(f.count("q"), 1);
}

#[test]
fn a_message_refused_by_a_full_queue_is_nacked_not_returned() {
    let mut f = Fx::new();
    f.queue_args(
        "q",
        &[
            ("x-max-length", FieldValue::I32(0)),
            ("x-overflow", s("reject-publish")),
        ],
    );
    let out = f.b.publish(msg("", "q"), true, T0).unwrap();
    assert!(out.should_nack());
    assert!(!out.returned);
    assert!(out.queues.is_empty());
    assert_eq!(out.rejected, [q("q")]);
}

#[test]
fn publish_errors() {
    let mut f = Fx::new();
    let e = f.b.publish(msg("nope", "k"), false, T0).unwrap_err();
    assert_eq!(e.amqp_reply_code(), 404);
    assert!(e.to_string().contains("exchange 'nope'"), "{e}");

    let internal = ExchangeOptions {
        internal: true,
        ..ExchangeOptions::default()
    };
    f.b.declare_exchange("inner", ExchangeKind::Fanout, internal, &FieldTable::new())
        .unwrap();
    f.queue("q");
    f.bind("q", "inner", "");
    let e = f.b.publish(msg("inner", "k"), false, T0).unwrap_err();
    assert_eq!(e.amqp_reply_code(), 403);
    assert_eq!(f.count("q"), 0);
    // Reachable through an exchange-to-exchange binding.
    f.exchange("outer", ExchangeKind::Fanout);
    f.b.bind_exchange("inner", "outer", "", &FieldTable::new())
        .unwrap();
    assert_eq!(names(&f.publish("outer", "k", "x").queues), ["q"]);
}

// ---------------------------------------------------------------- exchanges

#[test]
fn exchange_to_exchange_bindings_deliver_through_the_broker() {
    let mut f = Fx::new();
    f.exchange("events", ExchangeKind::Topic);
    f.exchange("audit", ExchangeKind::Fanout);
    f.queue("orders");
    f.queue("audit-log");
    f.bind("orders", "events", "order.*");
    f.bind("audit-log", "audit", "");
    f.b.bind_exchange("audit", "events", "#", &FieldTable::new())
        .unwrap();
    let out = f.publish("events", "order.created", "o1");
    assert_eq!(names(&out.queues), ["audit-log", "orders"]);
    let out = f.publish("events", "user.created", "u1");
    assert_eq!(names(&out.queues), ["audit-log"]);
    assert_eq!(f.bodies("audit-log"), ["o1", "u1"]);

    f.b.unbind_exchange("audit", "events", "#", &FieldTable::new())
        .unwrap();
    assert!(f.publish("events", "user.created", "u2").is_unroutable());
    // Errors: missing destination, the default exchange.
    let e =
        f.b.bind_exchange("missing", "events", "#", &FieldTable::new())
            .unwrap_err();
    assert_eq!(e.amqp_reply_code(), 404);
    let e =
        f.b.bind_exchange("audit", "", "#", &FieldTable::new())
            .unwrap_err();
    assert_eq!(e.amqp_reply_code(), 403);
}

#[test]
fn deleting_an_exchange_stops_routing_through_it() {
    let mut f = Fx::new();
    f.exchange("x", ExchangeKind::Direct);
    f.queue("q");
    f.bind("q", "x", "k");
    f.send("q", "kept");
    f.b.delete_exchange("x", false).unwrap();
    assert_eq!(
        f.b.publish(msg("x", "k"), false, T0)
            .unwrap_err()
            .amqp_reply_code(),
        404
    );
    assert!(f.b.router().exchange("x").is_none());
    // The queue and its messages are untouched; a redeclared exchange has no bindings.
    assert_eq!(f.bodies("q"), ["kept"]);
    f.exchange("x", ExchangeKind::Direct);
    assert!(f.publish("x", "k", "m").is_unroutable());
    // Deleting a missing exchange is fine; if_unused refuses an exchange with bindings.
    f.b.delete_exchange("x-never", false).unwrap();
    f.bind("q", "x", "k");
    assert_eq!(
        f.b.delete_exchange("x", true)
            .unwrap_err()
            .amqp_reply_code(),
        406
    );
    f.b.unbind_queue(f.o, "q", "x", "k", &FieldTable::new())
        .unwrap();
    f.b.delete_exchange("x", true).unwrap();
}

#[test]
fn deleting_a_queue_removes_its_bindings() {
    let mut f = Fx::new();
    f.exchange("x", ExchangeKind::Direct);
    f.queue("q");
    f.bind("q", "x", "k");
    f.b.delete_queue(f.o, "q", false, false).unwrap();
    f.queue("q");
    assert!(f.publish("x", "k", "m").is_unroutable());
    assert_eq!(f.b.router().exchange("x").unwrap().binding_count(), 0);
}

#[test]
fn binding_arguments_identify_a_binding_in_any_order() {
    let mut f = Fx::new();
    f.exchange("h", ExchangeKind::Headers);
    f.queue("q");
    let ab = table(&[
        ("x-match", s("all")),
        ("a", FieldValue::I32(1)),
        ("b", FieldValue::I32(2)),
    ]);
    let ba = table(&[
        ("b", FieldValue::I32(2)),
        ("a", FieldValue::I32(1)),
        ("x-match", s("all")),
    ]);
    f.b.bind_queue(f.o, "q", "h", "", &ab).unwrap();
    // The same binding with its arguments in another order is not a second binding…
    f.b.bind_queue(f.o, "q", "h", "", &ba).unwrap();
    assert_eq!(f.b.router().exchange("h").unwrap().binding_count(), 1);
    let headers = table(&[("a", FieldValue::I32(1)), ("b", FieldValue::I32(2))]);
    let m = || {
        super::msg_props(
            "h",
            "",
            BasicProperties::default().with_headers(headers.clone()),
        )
    };
    assert_eq!(names(&f.b.publish(m(), false, T0).unwrap().queues), ["q"]);
    // …and unbinding with yet another order removes it.
    f.b.unbind_queue(f.o, "q", "h", "", &ba).unwrap();
    assert_eq!(f.b.router().exchange("h").unwrap().binding_count(), 0);
    assert!(f.b.publish(m(), false, T0).unwrap().is_unroutable());
    // The same for other exchange types and for exchange-to-exchange bindings.
    f.exchange("d", ExchangeKind::Direct);
    let xy = table(&[("x", s("1")), ("y", s("2"))]);
    let yx = table(&[("y", s("2")), ("x", s("1"))]);
    f.b.bind_queue(f.o, "q", "d", "k", &xy).unwrap();
    f.b.bind_exchange("h", "d", "k", &xy).unwrap();
    assert_eq!(f.b.router().exchange("d").unwrap().binding_count(), 2);
    f.b.unbind_queue(f.o, "q", "d", "k", &yx).unwrap();
    f.b.unbind_exchange("h", "d", "k", &yx).unwrap();
    assert_eq!(f.b.router().exchange("d").unwrap().binding_count(), 0);
    // Different values are different bindings.
    f.b.bind_queue(f.o, "q", "d", "k", &xy).unwrap();
    f.b.bind_queue(f.o, "q", "d", "k", &table(&[("x", s("1")), ("y", s("3"))]))
        .unwrap();
    assert_eq!(f.b.router().exchange("d").unwrap().binding_count(), 2);
}

#[test]
fn alternate_exchange_takes_what_the_exchange_cannot_route() {
    let mut f = Fx::new();
    f.b.declare_exchange(
        "main",
        ExchangeKind::Direct,
        ExchangeOptions::default(),
        &table(&[("alternate-exchange", s("unrouted"))]),
    )
    .unwrap();
    f.exchange("unrouted", ExchangeKind::Fanout);
    f.queue("q");
    f.queue("lost");
    f.bind("q", "main", "k");
    f.bind("lost", "unrouted", "");
    assert_eq!(names(&f.publish("main", "k", "a").queues), ["q"]);
    let out = f.b.publish(msg("main", "other"), true, T0).unwrap();
    assert_eq!(names(&out.queues), ["lost"]);
    assert!(!out.returned, "routed by the alternate exchange");
    // Without the alternate exchange the message is unroutable.
    f.b.delete_exchange("unrouted", false).unwrap();
    assert!(
        f.b.publish(msg("main", "other"), true, T0)
            .unwrap()
            .returned
    );
}

#[test]
fn delayed_message_exchange_holds_messages_until_due() {
    let mut f = Fx::new();
    f.b.declare_exchange(
        "later",
        ExchangeKind::parse("x-delayed-message"),
        ExchangeOptions::default(),
        &table(&[("x-delayed-type", s("direct"))]),
    )
    .unwrap();
    f.queue("q");
    f.bind("q", "later", "k");
    let props =
        BasicProperties::default().with_headers(table(&[("x-delay", FieldValue::I32(500))]));
    let out =
        f.b.publish(super::msg_props("later", "k", props), true, T0)
            .unwrap();
    assert!(out.delayed);
    assert!(!out.returned);
    assert!(out.queues.is_empty());
    assert_eq!(f.count("q"), 0);
    assert_eq!(f.b.next_expiry(), Some(T0 + 500));
    f.b.expire(T0 + 499);
    assert_eq!(f.count("q"), 0);
    f.b.take_notices();
    f.b.expire(T0 + 500);
    assert_eq!(f.bodies("q"), ["body"]);
    assert_eq!(f.b.take_notices(), [Notice::QueueReady(q("q"))]);
    assert_eq!(f.b.next_expiry(), None);
    // Without x-delay it routes at once.
    assert_eq!(names(&f.publish("later", "k", "now").queues), ["q"]);
}

// ---------------------------------------------------------------- notices

#[test]
fn notices_report_requeues_and_dead_letters_but_not_publishes() {
    let mut f = Fx::new();
    f.queue("q");
    f.queue("dead");
    f.queue_args(
        "work",
        &[
            ("x-dead-letter-exchange", s("")),
            ("x-dead-letter-routing-key", s("dead")),
        ],
    );
    f.send("q", "a");
    f.send("q", "b");
    f.send("work", "w");
    assert!(
        !f.b.has_notices(),
        "publishes are reported by their outcome"
    );
    let a = f.get("q").unwrap();
    let b = f.get("q").unwrap();
    f.reject(a.delivery_tag, true);
    f.reject(b.delivery_tag, true);
    assert!(f.b.has_notices());
    // Each ready queue once.
    assert_eq!(f.b.take_notices(), [Notice::QueueReady(q("q"))]);
    assert!(f.b.take_notices().is_empty());
    assert!(!f.b.has_notices());
    let w = f.get("work").unwrap();
    f.reject(w.delivery_tag, false);
    assert_eq!(f.b.take_notices(), [Notice::QueueReady(q("dead"))]);
}

#[test]
fn deleting_a_queue_cancels_its_consumers() {
    let mut f = Fx::new();
    f.queue("q");
    f.queue("other");
    f.consume("q", "c1");
    f.consume("other", "keep");
    let s2 = f.b.open_session(OwnerId(2));
    f.b.consume(s2, "q", "c2", ConsumeOptions::default(), T0)
        .unwrap();
    f.send("q", "a");
    let d = f.next("c1").unwrap();
    f.b.take_notices();

    assert_eq!(f.b.delete_queue(f.o, "q", false, false).unwrap(), 0);
    let mut notices = f.b.take_notices();
    assert_eq!(notices.pop(), Some(Notice::QueueDeleted(q("q"))));
    notices.sort_by_key(|n| match n {
        Notice::ConsumerCancelled { session, .. } => session.get(),
        _ => u64::MAX,
    });
    assert_eq!(
        notices,
        [
            Notice::ConsumerCancelled {
                session: f.s,
                consumer_tag: "c1".into(),
                queue: q("q"),
            },
            Notice::ConsumerCancelled {
                session: s2,
                consumer_tag: "c2".into(),
                queue: q("q"),
            },
        ]
    );
    // The cancelled consumers are gone; the other one is not.
    assert!(f.b.next_for_consumer(f.s, "c1", T0).is_err());
    assert!(f.b.next_for_consumer(s2, "c2", T0).is_err());
    assert!(!f.b.cancel(f.s, "c1", T0).unwrap());
    assert_eq!(f.b.queue_info("other").unwrap().consumer_count, 1);
    // The delivery of the deleted queue can still be settled, and is not requeued anywhere,
    // not even into a new queue of the same name.
    f.queue("q");
    assert_eq!(f.b.nack(f.s, d.delivery_tag, false, true, T0).unwrap(), 1);
    assert!(f.b.take_notices().is_empty());
    assert_eq!(f.count("q"), 0);
}

#[test]
fn deleting_a_queue_without_consumers_only_reports_the_deletion() {
    let mut f = Fx::new();
    f.queue("q");
    f.b.delete_queue(f.o, "q", false, false).unwrap();
    assert_eq!(f.b.take_notices(), [Notice::QueueDeleted(q("q"))]);
}

// ---------------------------------------------------------------- deadlines

fn ttl(ms: i32) -> (&'static str, FieldValue) {
    ("x-message-ttl", FieldValue::I32(ms))
}

#[test]
fn new_deadlines_report_message_expiries_as_they_reach_a_head() {
    let mut f = Fx::new();
    f.queue_args("ttl", &[ttl(200)]);
    assert_eq!(f.b.take_new_deadline(), None, "nothing to expire yet");
    f.send_at("ttl", "a", T0);
    assert_eq!(f.b.take_new_deadline(), Some(T0 + 200));
    assert_eq!(f.b.take_new_deadline(), None, "reported once");
    f.send_at("ttl", "b", T0 + 50);
    // The head still expires first.
    assert_eq!(f.b.take_new_deadline(), Some(T0 + 200));
    // Taking the head exposes the next one.
    assert_eq!(body(&f.get_at("ttl", T0 + 10).unwrap()), "a");
    assert_eq!(f.b.take_new_deadline(), Some(T0 + 250));

    // A short per-message expiration behind a long one is reported when it reaches the head.
    f.queue("exp");
    let long = BasicProperties::default().with_expiration("60000");
    let short = BasicProperties::default().with_expiration("100");
    f.send_props("exp", "long", long, T0);
    f.send_props("exp", "short", short, T0);
    assert_eq!(f.b.take_new_deadline(), Some(T0 + 60_000));
    let d = f.get_at("exp", T0 + 10).unwrap();
    assert_eq!(f.b.take_new_deadline(), Some(T0 + 100));
    // A requeue puts the long one back ahead of it.
    f.reject(d.delivery_tag, true);
    assert_eq!(f.b.take_new_deadline(), Some(T0 + 60_000));
}

#[test]
fn new_deadlines_report_dead_letters_delays_and_unused_queues() {
    let mut f = Fx::new();
    // Expiring into a dead-letter queue that has a TTL of its own.
    f.queue_args("dead", &[ttl(1000)]);
    f.queue_args(
        "src",
        &[
            ttl(100),
            ("x-dead-letter-exchange", s("")),
            ("x-dead-letter-routing-key", s("dead")),
        ],
    );
    f.send_at("src", "m", T0);
    assert_eq!(f.b.take_new_deadline(), Some(T0 + 100));
    assert_eq!(f.b.expire(T0 + 100), 1);
    assert_eq!(f.bodies("dead"), ["m"]);
    assert_eq!(f.b.take_new_deadline(), Some(T0 + 1100));

    // A delayed message.
    f.b.declare_exchange(
        "later",
        ExchangeKind::parse("x-delayed-message"),
        ExchangeOptions::default(),
        &table(&[("x-delayed-type", s("direct"))]),
    )
    .unwrap();
    let props =
        BasicProperties::default().with_headers(table(&[("x-delay", FieldValue::I32(500))]));
    f.b.publish(super::msg_props("later", "k", props), false, T0)
        .unwrap();
    assert_eq!(f.b.take_new_deadline(), Some(T0 + 500));

    // `x-expires` runs while a queue has no consumer: from its declaration, and again from
    // its last consumer's cancel.
    f.queue_args("idle", &[("x-expires", FieldValue::I32(1000))]);
    assert_eq!(f.b.take_new_deadline(), Some(T0 + 1000));
    let tag = f.consume("idle", "c");
    assert_eq!(f.b.take_new_deadline(), None);
    f.b.cancel(f.s, &tag, T0 + 300).unwrap();
    assert_eq!(f.b.take_new_deadline(), Some(T0 + 1300));
}

// ---------------------------------------------------------------- owners

#[test]
fn close_owner_deletes_its_exclusive_queues_and_closes_its_sessions() {
    let mut f = Fx::new();
    let o2 = OwnerId(2);
    let s2a = f.b.open_session(o2);
    let s2b = f.b.open_session(o2);
    let none = FieldTable::new();
    f.b.declare_queue(o2, "private", exclusive(), &none, T0)
        .unwrap();
    f.b.declare_queue(o2, "", exclusive(), &none, T0).unwrap();
    f.queue("shared");
    f.declare("mine", exclusive(), &[]).unwrap();
    f.b.bind_queue(o2, "private", "amq.fanout", "", &none)
        .unwrap();
    f.send("shared", "a");
    f.send("shared", "b");
    let d = f.b.get(s2a, "shared", false, T0).unwrap().unwrap();
    assert_eq!(body(&d), "a");
    f.b.consume(s2b, "shared", "c", ConsumeOptions::default(), T0)
        .unwrap();
    f.b.take_notices();

    let mut gone = f.b.close_owner(o2, T0);
    gone.sort();
    assert_eq!(gone.len(), 2);
    assert!(gone.contains(&q("private")));
    assert!(gone.iter().any(|n| n.starts_with("amq.gen-")));
    assert!(!f.exists("private"));
    assert!(f.b.router().queue("private").is_none());
    assert!(f
        .b
        .router()
        .bindings("amq.fanout")
        .iter()
        .all(|b| &**b.destination.name() != "private"));
    // Its unacked message went back, its consumer and sessions are gone.
    assert_eq!(f.bodies("shared"), ["a", "b"]);
    assert!(f.ready("shared")[0].redelivered);
    assert_eq!(f.b.queue_info("shared").unwrap().consumer_count, 0);
    for s in [s2a, s2b] {
        assert_eq!(f.b.unacked_count(s), None);
        assert_eq!(f.b.qos(s, 1, false).unwrap_err().amqp_reply_code(), 504);
    }
    let notices = f.b.take_notices();
    assert!(notices.contains(&Notice::QueueDeleted(q("private"))));
    assert!(notices.contains(&Notice::QueueReady(q("shared"))));
    // Other owners' queues and sessions are untouched.
    assert!(f.exists("mine"));
    assert_eq!(f.b.unacked_count(f.s), Some(0));
    // The name is free again, for anyone.
    f.declare("private", QueueOptions::default(), &[]).unwrap();
    // Closing an owner with nothing is a no-op.
    assert!(f.b.close_owner(OwnerId(99), T0).is_empty());
}

// ---------------------------------------------------------------- routing at scale

/// 10 000 distinct topic patterns, 10 000 messages: each lands exactly where its pattern
/// says, and matching one key visits a handful of trie nodes, not the bindings.
#[test]
fn topic_routing_does_not_scan_every_binding() {
    const N: usize = 10_000;
    const QUEUES: usize = 100;
    let mut f = Fx::new();
    f.exchange("t", ExchangeKind::Topic);
    for i in 0..QUEUES {
        f.queue(&format!("q{i}"));
    }
    for i in 0..N {
        let pattern = if i % 2 == 0 {
            format!("svc{i}.*.created")
        } else {
            format!("region.svc{i}.#")
        };
        f.bind(&format!("q{}", i % QUEUES), "t", &pattern);
    }
    assert_eq!(f.b.router().exchange("t").unwrap().binding_count(), N);

    let key = |i: usize| {
        if i % 2 == 0 {
            format!("svc{i}.eu.created")
        } else {
            format!("region.svc{i}.eu.west.1")
        }
    };
    let mut max_visited = 0;
    for i in 0..N {
        let k = key(i);
        let out = f.b.publish(msg("t", &k), true, T0).unwrap();
        assert_eq!(names(&out.queues), [format!("q{}", i % QUEUES)], "{k}");
        let visited = f.b.router().topic_nodes_visited("t", &k).unwrap();
        max_visited = max_visited.max(visited);
    }
    // Each key walks at most one branch per word (plus `#` expansions); nowhere near N.
    assert!(max_visited <= 10, "visited {max_visited} trie nodes");
    for i in 0..QUEUES {
        assert_eq!(f.count(&format!("q{i}")) as usize, N / QUEUES);
    }
    // Keys matching nothing stay cheap too.
    let miss = f.b.publish(msg("t", "svc1.eu.created"), true, T0).unwrap();
    assert!(miss.returned);
    assert!(
        f.b.router()
            .topic_nodes_visited("t", "nothing.here")
            .unwrap()
            <= 2
    );
}

#[test]
fn topic_routing_cost_with_wildcards_depends_on_key_length_not_bindings() {
    // The same wildcard-heavy key against 10 and 10 000 bindings visits the same nodes when
    // the extra bindings share no words with it.
    let visits = |n: usize| {
        let mut f = Fx::new();
        f.exchange("t", ExchangeKind::Topic);
        f.queue("q");
        for p in ["#", "*.b.#", "a.#.c", "#.c"] {
            f.bind("q", "t", p);
        }
        for i in 0..n {
            f.bind("q", "t", &format!("w{i}.x.#"));
        }
        let out = f.b.publish(msg("t", "a.b.c"), false, T0).unwrap();
        assert_eq!(names(&out.queues), ["q"]);
        f.b.router().topic_nodes_visited("t", "a.b.c").unwrap()
    };
    assert_eq!(visits(10), visits(10_000));
}
