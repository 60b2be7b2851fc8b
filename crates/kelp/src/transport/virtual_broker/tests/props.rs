//! Queue and message properties: TTLs and the clock, length limits, priorities, `x-expires`,
//! argument validation.

use std::sync::Arc;

use kelp_amqp::{BasicProperties, FieldValue};

use super::super::*;
use super::{body, Fx, T0};

fn ttl(ms: i32) -> (&'static str, FieldValue) {
    ("x-message-ttl", FieldValue::I32(ms))
}

fn expiring(ms: &str) -> BasicProperties {
    BasicProperties::default().with_expiration(ms)
}

fn priority(p: u8) -> BasicProperties {
    BasicProperties::default().with_priority(p)
}

// ---------------------------------------------------------------- TTL

#[test]
fn queue_ttl_expires_messages_at_the_head_by_the_given_clock() {
    let mut f = Fx::new();
    f.queue_args("q", &[ttl(1000)]);
    f.send_at("q", "a", T0);
    f.send_at("q", "b", T0 + 100);
    assert_eq!(f.b.next_expiry(), Some(T0 + 1000));
    let exp: Vec<Option<u64>> = f.ready("q").iter().map(|m| m.expires_at).collect();
    assert_eq!(exp, [Some(T0 + 1000), Some(T0 + 1100)]);
    // One ms before: still deliverable.
    let a = f.get_at("q", T0 + 999).unwrap();
    assert_eq!(body(&a), "a");
    assert_eq!(f.b.next_expiry(), Some(T0 + 1100));
    // At its expiry time it is gone.
    assert!(f.get_at("q", T0 + 1100).is_none());
    assert_eq!(f.count("q"), 0);
    assert_eq!(f.b.next_expiry(), None);
}

#[test]
fn expire_removes_due_messages_and_reports_how_many() {
    let mut f = Fx::new();
    f.queue_args("q", &[ttl(1000)]);
    for i in 0..3 {
        f.send_at("q", &format!("m{i}"), T0 + i * 10);
    }
    assert_eq!(f.b.expire(T0 + 999), 0);
    assert_eq!(f.count("q"), 3);
    assert_eq!(f.b.expire(T0 + 1010), 2);
    assert_eq!(f.bodies("q"), ["m2"]);
    assert_eq!(f.b.next_expiry(), Some(T0 + 1020));
    assert_eq!(f.b.expire(T0 + 5000), 1);
    assert_eq!(f.count("q"), 0);
    assert_eq!(f.b.next_expiry(), None);
    assert_eq!(f.b.queue_info("q").unwrap().message_bytes, 0);
}

#[test]
fn per_message_expiration_is_milliseconds_as_a_string() {
    let mut f = Fx::new();
    f.queue("q");
    f.send_props("q", "a", expiring("500"), T0);
    f.send("q", "b");
    assert_eq!(f.b.next_expiry(), Some(T0 + 500));
    assert_eq!(f.b.expire(T0 + 499), 0);
    assert_eq!(f.b.expire(T0 + 500), 1);
    assert_eq!(f.bodies("q"), ["b"]);
    assert_eq!(f.b.next_expiry(), None);
    // "0" is valid: the message is already due when it is enqueued.
    f.send_props("q", "c", expiring("0"), T0);
    assert_eq!(f.ready("q")[1].expires_at, Some(T0));
}

#[test]
fn the_sooner_of_queue_ttl_and_message_expiration_wins() {
    let mut f = Fx::new();
    f.queue_args("q", &[ttl(1000)]);
    f.send_props("q", "short", expiring("300"), T0);
    f.send_props("q", "long", expiring("5000"), T0);
    let exp: Vec<Option<u64>> = f.ready("q").iter().map(|m| m.expires_at).collect();
    assert_eq!(exp, [Some(T0 + 300), Some(T0 + 1000)]);
}

#[test]
fn invalid_expiration_is_refused() {
    let mut f = Fx::new();
    f.queue("q");
    for bad in [
        "",
        "abc",
        "-1",
        "1.5",
        " 10",
        "+5",
        "99999999999999999999999",
    ] {
        let m = MessageData::new("", "q", expiring(bad), "x");
        let e = f.b.publish(m, false, T0).unwrap_err();
        assert_eq!(e.amqp_reply_code(), 406, "{bad:?}");
        assert_eq!(
            e,
            BrokerError::InvalidExpiration {
                value: bad.to_owned()
            }
        );
    }
    assert_eq!(f.count("q"), 0);
}

#[test]
fn a_message_expires_only_when_it_reaches_the_head() {
    let mut f = Fx::new();
    f.queue("q");
    f.send_props("q", "slow", expiring("10000"), T0);
    f.send_props("q", "fast", expiring("100"), T0);
    // "fast" is overdue but behind "slow": nothing to do yet (as in RabbitMQ).
    assert_eq!(f.b.next_expiry(), Some(T0 + 10_000));
    assert_eq!(f.b.expire(T0 + 200), 0);
    assert_eq!(f.count("q"), 2);
    assert_eq!(body(&f.get_at("q", T0 + 200).unwrap()), "slow");
    // Now it is at the head and overdue.
    assert_eq!(f.b.next_expiry(), Some(T0 + 100));
    assert_eq!(f.b.expire(T0 + 200), 1);
    assert_eq!(f.count("q"), 0);
}

#[test]
fn get_skips_expired_messages_at_the_head() {
    let mut f = Fx::new();
    f.queue("q");
    f.send_props("q", "a", expiring("10"), T0);
    f.send_props("q", "b", expiring("10"), T0);
    f.send("q", "c");
    let d = f.get_at("q", T0 + 10).unwrap();
    assert_eq!(body(&d), "c");
    assert_eq!(d.message_count, 0);
}

#[test]
fn consumers_skip_expired_messages_too() {
    let mut f = Fx::new();
    f.queue_args("q", &[ttl(50)]);
    f.send_at("q", "old", T0);
    f.send_at("q", "new", T0 + 40);
    f.consume("q", "c");
    let d = f.b.next_for_consumer(f.s, "c", T0 + 60).unwrap().unwrap();
    assert_eq!(body(&d), "new");
    assert_eq!(f.count("q"), 0);
}

#[test]
fn a_requeued_message_keeps_its_expiry() {
    let mut f = Fx::new();
    f.queue_args("q", &[ttl(1000)]);
    f.send_at("q", "a", T0);
    let d = f.get_at("q", T0 + 900).unwrap();
    f.b.nack(f.s, d.delivery_tag, false, true, T0 + 900)
        .unwrap();
    assert_eq!(f.ready("q")[0].expires_at, Some(T0 + 1000));
    assert_eq!(f.b.next_expiry(), Some(T0 + 1000));
    assert!(f.get_at("q", T0 + 1000).is_none());
}

#[test]
fn requeue_of_an_expiring_message_into_an_untimed_queue_is_swept() {
    let mut f = Fx::new();
    f.queue("q");
    f.send_props("q", "a", expiring("100"), T0);
    let d = f.get("q").unwrap();
    // The queue has nothing expiring now; expire() may forget it.
    assert_eq!(f.b.expire(T0 + 1), 0);
    assert_eq!(f.b.next_expiry(), None);
    f.reject(d.delivery_tag, true);
    assert_eq!(f.b.next_expiry(), Some(T0 + 100));
    assert_eq!(f.b.expire(T0 + 100), 1);
    assert_eq!(f.count("q"), 0);
}

#[test]
fn next_expiry_is_the_earliest_over_all_queues() {
    let mut f = Fx::new();
    f.queue_args("a", &[ttl(300)]);
    f.queue_args("b", &[ttl(200)]);
    f.queue("c");
    assert_eq!(f.b.next_expiry(), None);
    f.send("a", "x");
    assert_eq!(f.b.next_expiry(), Some(T0 + 300));
    f.send_props("c", "x", expiring("50"), T0 + 100);
    assert_eq!(f.b.next_expiry(), Some(T0 + 150));
    f.send("b", "x");
    assert_eq!(f.b.next_expiry(), Some(T0 + 150));
    assert_eq!(f.b.expire(T0 + 150), 1);
    assert_eq!(f.b.next_expiry(), Some(T0 + 200));
    assert_eq!(f.b.expire(T0 + 1000), 2);
    assert_eq!(f.b.next_expiry(), None);
}

// ---------------------------------------------------------------- length limits

#[test]
fn max_length_drops_from_the_head() {
    let mut f = Fx::new();
    f.queue_args("q", &[("x-max-length", FieldValue::I32(2))]);
    for b in ["a", "b", "c", "d"] {
        let out = f.send("q", b);
        assert!(out.queues.contains("q"));
        assert!(!out.should_nack());
    }
    assert_eq!(f.bodies("q"), ["c", "d"]);
    assert_eq!(f.count("q"), 2);
}

#[test]
fn max_length_zero_keeps_nothing() {
    let mut f = Fx::new();
    f.queue_args("q", &[("x-max-length", FieldValue::I32(0))]);
    f.send("q", "a");
    assert_eq!(f.count("q"), 0);
    assert!(f.get("q").is_none());
}

#[test]
fn max_length_bytes_counts_body_bytes() {
    let mut f = Fx::new();
    f.queue_args("q", &[("x-max-length-bytes", FieldValue::I32(10))]);
    f.send("q", "12345");
    f.send("q", "67890");
    assert_eq!(f.b.queue_info("q").unwrap().message_bytes, 10);
    f.send("q", "abc");
    assert_eq!(f.bodies("q"), ["67890", "abc"]);
    assert_eq!(f.b.queue_info("q").unwrap().message_bytes, 8);
    // A message bigger than the limit on its own does not stay either.
    f.send("q", "0123456789X");
    assert_eq!(f.count("q"), 0);
    assert_eq!(f.b.queue_info("q").unwrap().message_bytes, 0);
}

#[test]
fn reject_publish_refuses_new_messages_when_full() {
    let mut f = Fx::new();
    f.queue_args(
        "q",
        &[
            ("x-max-length", FieldValue::I32(1)),
            ("x-overflow", FieldValue::from("reject-publish")),
        ],
    );
    f.queue("other");
    f.exchange("fan", ExchangeKind::Fanout);
    f.bind("q", "fan", "");
    f.bind("other", "fan", "");
    let first = f.publish("fan", "", "a");
    assert!(!first.should_nack());
    let second = f.publish("fan", "", "b");
    assert!(second.should_nack());
    assert_eq!(second.rejected, [Arc::<str>::from("q")]);
    assert_eq!(second.queues.iter().count(), 1);
    assert!(second.queues.contains("other"));
    assert!(!second.is_unroutable());
    assert_eq!(f.bodies("q"), ["a"]);
    assert_eq!(f.bodies("other"), ["a", "b"]);
    // Making room lets the next one in.
    let d = f.get("q").unwrap();
    f.ack(d.delivery_tag);
    assert!(!f.publish("fan", "", "c").should_nack());
    assert_eq!(f.bodies("q"), ["c"]);
}

#[test]
fn reject_publish_by_bytes() {
    let mut f = Fx::new();
    f.queue_args(
        "q",
        &[
            ("x-max-length-bytes", FieldValue::I32(4)),
            ("x-overflow", FieldValue::from("reject-publish")),
        ],
    );
    assert!(!f.send("q", "abc").should_nack());
    assert!(f.send("q", "de").should_nack());
    assert!(!f.send("q", "f").should_nack());
    assert_eq!(f.bodies("q"), ["abc", "f"]);
}

// ---------------------------------------------------------------- priorities

#[test]
fn max_priority_serves_higher_first_fifo_within_a_level() {
    let mut f = Fx::new();
    f.queue_args("q", &[("x-max-priority", FieldValue::I32(5))]);
    let sends: [(&str, Option<u8>); 7] = [
        ("a", Some(1)),
        ("b", Some(3)),
        ("c", None),
        ("d", Some(3)),
        ("e", Some(9)),
        ("f", Some(5)),
        ("g", Some(0)),
    ];
    for (b, p) in sends {
        let props = p.map_or_else(BasicProperties::default, priority);
        f.send_props("q", b, props, T0);
    }
    assert_eq!(f.bodies("q"), ["e", "f", "b", "d", "a", "c", "g"]);
    // Priority 9 is clamped to the queue's maximum.
    let levels: Vec<u8> = f.ready("q").iter().map(|m| m.priority).collect();
    assert_eq!(levels, [5, 5, 3, 3, 1, 0, 0]);
    let got: Vec<String> = (0..7).map(|_| body(&f.get("q").unwrap())).collect();
    assert_eq!(got, ["e", "f", "b", "d", "a", "c", "g"]);
}

#[test]
fn requeue_keeps_the_priority_level_and_position() {
    let mut f = Fx::new();
    f.queue_args("q", &[("x-max-priority", FieldValue::I32(2))]);
    f.send_props("q", "low", priority(0), T0);
    f.send_props("q", "hi1", priority(2), T0);
    f.send_props("q", "hi2", priority(2), T0);
    let d = f.get("q").unwrap();
    assert_eq!(body(&d), "hi1");
    f.reject(d.delivery_tag, true);
    assert_eq!(f.bodies("q"), ["hi1", "hi2", "low"]);
}

#[test]
fn without_max_priority_the_priority_property_is_ignored() {
    let mut f = Fx::new();
    f.queue("q");
    f.send_props("q", "a", priority(0), T0);
    f.send_props("q", "b", priority(9), T0);
    assert_eq!(f.bodies("q"), ["a", "b"]);
    assert!(f.ready("q").iter().all(|m| m.priority == 0));
}

#[test]
fn per_level_expiry_in_a_priority_queue() {
    let mut f = Fx::new();
    f.queue_args("q", &[("x-max-priority", FieldValue::I32(1))]);
    f.send_props("q", "lo", expiring("100"), T0);
    f.send_props("q", "hi", priority(1).with_expiration("300"), T0);
    assert_eq!(f.b.next_expiry(), Some(T0 + 100));
    assert_eq!(f.b.expire(T0 + 100), 1);
    assert_eq!(f.bodies("q"), ["hi"]);
    assert_eq!(f.b.next_expiry(), Some(T0 + 300));
}

// ---------------------------------------------------------------- x-expires

#[test]
fn x_expires_deletes_an_unused_queue() {
    let mut f = Fx::new();
    f.queue_args("q", &[("x-expires", FieldValue::I32(1000))]);
    f.send("q", "a");
    assert_eq!(f.b.next_expiry(), Some(T0 + 1000));
    f.b.expire(T0 + 999);
    assert!(f.exists("q"));
    // basic.get renews the lease (publishing does not).
    f.get_at("q", T0 + 999).unwrap();
    assert_eq!(f.b.next_expiry(), Some(T0 + 1999));
    f.send_at("q", "b", T0 + 1500);
    assert_eq!(f.b.next_expiry(), Some(T0 + 1999));
    f.b.expire(T0 + 1998);
    assert!(f.exists("q"));
    f.b.take_notices();
    f.b.expire(T0 + 1999);
    assert!(!f.exists("q"));
    assert!(f.b.router().queue("q").is_none());
    assert_eq!(f.b.take_notices(), [Notice::QueueDeleted(Arc::from("q"))]);
    assert_eq!(f.b.next_expiry(), None);
}

#[test]
fn x_expires_waits_while_the_queue_has_consumers() {
    let mut f = Fx::new();
    f.queue_args("q", &[("x-expires", FieldValue::I32(1000))]);
    f.consume("q", "c");
    assert_eq!(f.b.next_expiry(), None);
    f.b.expire(T0 + 10_000);
    assert!(f.exists("q"));
    f.b.cancel(f.s, "c", T0 + 10_000).unwrap();
    assert_eq!(f.b.next_expiry(), Some(T0 + 11_000));
    // Redeclaring renews it too.
    f.b.declare_queue(
        f.o,
        "q",
        QueueOptions::default(),
        &super::table(&[("x-expires", FieldValue::I32(1000))]),
        T0 + 10_500,
    )
    .unwrap();
    f.b.expire(T0 + 11_000);
    assert!(f.exists("q"));
    f.b.expire(T0 + 11_500);
    assert!(!f.exists("q"));
}

// ---------------------------------------------------------------- argument validation

#[test]
fn invalid_queue_arguments_are_precondition_failed() {
    let cases: [(&str, FieldValue); 9] = [
        ("x-message-ttl", FieldValue::I32(-1)),
        ("x-message-ttl", FieldValue::from("1000")),
        ("x-expires", FieldValue::I32(0)),
        ("x-max-length", FieldValue::I32(-1)),
        ("x-max-length-bytes", FieldValue::F64(1.0)),
        ("x-max-priority", FieldValue::I32(256)),
        ("x-max-priority", FieldValue::I32(-1)),
        ("x-overflow", FieldValue::from("drop-tail")),
        ("x-dead-letter-exchange", FieldValue::I32(1)),
    ];
    for (k, v) in cases {
        let mut f = Fx::new();
        let e = f
            .declare("q", QueueOptions::default(), &[(k, v.clone())])
            .unwrap_err();
        assert_eq!(e.amqp_reply_code(), 406, "{k} = {v:?}");
        assert!(
            matches!(&e, BrokerError::InvalidArgument { argument, .. } if argument == k),
            "{e:?}"
        );
        assert!(!f.exists("q"));
    }
    // A dead-letter routing key needs a dead-letter exchange.
    let mut f = Fx::new();
    let e = f
        .declare(
            "q",
            QueueOptions::default(),
            &[("x-dead-letter-routing-key", FieldValue::from("k"))],
        )
        .unwrap_err();
    assert_eq!(e.amqp_reply_code(), 406);
}

#[test]
fn queue_args_parse_and_unknown_arguments_are_kept() {
    let args = super::table(&[
        ("x-message-ttl", FieldValue::I64(5)),
        ("x-max-priority", FieldValue::U8(10)),
        ("x-overflow", FieldValue::from("reject-publish-dlx")),
        ("x-dead-letter-exchange", FieldValue::from("")),
        ("x-queue-type", FieldValue::from("classic")),
    ]);
    let a = QueueArgs::parse("q", &args).unwrap();
    assert_eq!(a.message_ttl, Some(5));
    assert_eq!(a.max_priority, Some(10));
    assert_eq!(a.overflow, Overflow::RejectPublishDlx);
    assert_eq!(a.dead_letter_exchange.as_deref(), Some(""));
    assert_eq!(a.dead_letter_routing_key, None);
    let mut f = Fx::new();
    f.b.declare_queue(f.o, "q", QueueOptions::default(), &args, T0)
        .unwrap();
    assert_eq!(
        f.b.queue_info("q").unwrap().arguments.get("x-queue-type"),
        Some(&FieldValue::from("classic"))
    );
}

// ---------------------------------------------------------------- TTL 0

/// Queue "q" dead-letters through the default exchange to queue "dead".
fn ttl0_setup(f: &mut Fx, args: &[(&str, FieldValue)]) {
    f.queue("dead");
    let mut all = vec![
        ("x-dead-letter-exchange", super::s("")),
        ("x-dead-letter-routing-key", super::s("dead")),
    ];
    all.extend(args.iter().cloned());
    f.queue_args("q", &all);
}

fn death_reason(m: &QueuedMessage) -> String {
    let deaths = super::x_death(&m.message);
    super::hstr(&deaths[0], "reason").unwrap()
}

/// RabbitMQ hands a message with TTL 0 to a consumer with room when it arrives; it is then
/// that consumer's, however late it takes it.
#[test]
fn ttl_zero_goes_straight_to_a_consumer_with_room() {
    let mut f = Fx::new();
    ttl0_setup(&mut f, &[]);
    f.consume("q", "c");
    let out = f.send_props("q", "now", expiring("0"), T0);
    assert_eq!(out.queues.len(), 1, "routed");
    assert!(!out.returned);
    assert_eq!(f.count("q"), 0, "not left in the queue");
    assert_eq!(f.b.unacked_count(f.s), Some(1), "delivered at once");
    let d = f.b.next_for_consumer(f.s, "c", T0 + 5000).unwrap().unwrap();
    assert_eq!(body(&d), "now");
    assert!(!d.redelivered);
    f.ack(d.delivery_tag);
    assert!(f.bodies("dead").is_empty());
}

/// With no consumer that could take it, it expires on arrival: gone (dead-lettered as
/// `expired`) before anyone looks.
#[test]
fn ttl_zero_without_a_ready_consumer_expires_on_arrival() {
    let mut f = Fx::new();
    ttl0_setup(&mut f, &[]);
    f.send_props("q", "nobody", expiring("0"), T0);
    assert_eq!(f.count("q"), 0);
    assert_eq!(f.bodies("dead"), ["nobody"]);
    assert_eq!(death_reason(&f.ready("dead")[0]), "expired");
    // A consumer at its prefetch limit is no better.
    f.b.qos(f.s, 1, false).unwrap();
    f.consume("q", "c");
    f.send("q", "held");
    let held = f.next("c").unwrap();
    f.send_props("q", "blocked", expiring("0"), T0);
    assert_eq!(f.count("q"), 0);
    assert_eq!(f.bodies("dead"), ["nobody", "blocked"]);
    // Once it has room again, the next one is delivered.
    f.ack(held.delivery_tag);
    f.send_props("q", "room", expiring("0"), T0);
    assert_eq!(body(&f.next("c").unwrap()), "room");
    assert_eq!(f.bodies("dead"), ["nobody", "blocked"]);
}

/// `x-message-ttl: 0` does the same for every message of the queue.
#[test]
fn queue_ttl_zero_delivers_to_a_ready_consumer_or_drops() {
    let mut f = Fx::new();
    ttl0_setup(&mut f, &[ttl(0)]);
    f.send("q", "dropped");
    assert_eq!(f.count("q"), 0);
    assert_eq!(f.bodies("dead"), ["dropped"]);
    f.consume("q", "c");
    f.send("q", "kept");
    assert_eq!(body(&f.next("c").unwrap()), "kept");
    assert_eq!(f.bodies("dead"), ["dropped"]);
}

/// Ready messages ahead of a TTL-0 message (a consumer with room has not taken them yet) are
/// handed out first, in order, as RabbitMQ would have pushed them; the TTL-0 one only gets
/// the room that is left.
#[test]
fn ttl_zero_keeps_queue_order_and_prefetch() {
    let mut f = Fx::new();
    ttl0_setup(&mut f, &[]);
    f.b.qos(f.s, 2, false).unwrap();
    f.consume("q", "c");
    f.send("q", "a");
    f.send("q", "b");
    f.send_props("q", "late", expiring("0"), T0);
    assert_eq!(f.bodies("dead"), ["late"], "no room left for it");
    let mut got = Vec::new();
    f.b.drain_for_consumer(f.s, "c", 10, T0, &mut got).unwrap();
    assert_eq!(super::bodies_of(&got), ["a", "b"]);
    f.b.ack(f.s, 0, true).unwrap();
    f.send("q", "c");
    f.send_props("q", "fits", expiring("0"), T0);
    got.clear();
    f.b.drain_for_consumer(f.s, "c", 10, T0, &mut got).unwrap();
    assert_eq!(super::bodies_of(&got), ["c", "fits"]);
    let tags: Vec<u64> = got.iter().map(|d| d.delivery_tag).collect();
    assert!(tags[0] < tags[1], "{tags:?}");
}

/// A TTL-0 message goes to the highest-priority consumer with room, round-robin among
/// equals; with `x-single-active-consumer`, only to the active one.
#[test]
fn ttl_zero_follows_consumer_priority_and_single_active_consumer() {
    let mut f = Fx::new();
    f.queue("q");
    let high = ConsumeOptions {
        priority: 5,
        ..ConsumeOptions::default()
    };
    f.consume("q", "low");
    f.b.consume(f.s, "q", "h1", high, T0).unwrap();
    f.b.consume(f.s, "q", "h2", high, T0).unwrap();
    for i in 0..4 {
        f.send_props("q", &format!("m{i}"), expiring("0"), T0);
    }
    let take = |f: &mut Fx, tag: &str| {
        let mut v = Vec::new();
        f.b.drain_for_consumer(f.s, tag, 10, T0, &mut v).unwrap();
        super::bodies_of(&v)
    };
    assert_eq!(take(&mut f, "h1"), ["m0", "m2"]);
    assert_eq!(take(&mut f, "h2"), ["m1", "m3"]);
    assert!(take(&mut f, "low").is_empty());

    f.queue_args(
        "sac",
        &[("x-single-active-consumer", FieldValue::Bool(true))],
    );
    f.consume("sac", "first");
    f.b.consume(f.s, "sac", "second", high, T0).unwrap();
    f.send_props("sac", "x", expiring("0"), T0);
    assert!(take(&mut f, "second").is_empty());
    assert_eq!(take(&mut f, "first"), ["x"]);
}

/// A consumer cancelled before taking what the broker handed it: those messages go back to
/// the queue (redelivered), where a TTL-0 one then expires.
#[test]
fn cancel_requeues_what_a_consumer_was_handed_but_never_took() {
    let mut f = Fx::new();
    ttl0_setup(&mut f, &[]);
    f.consume("q", "c");
    f.send_props("q", "handed", expiring("0"), T0);
    assert_eq!(f.b.unacked_count(f.s), Some(1));
    assert!(f.b.cancel(f.s, "c", T0).unwrap());
    assert_eq!(f.b.unacked_count(f.s), Some(0));
    assert_eq!(f.count("q"), 1);
    assert!(f.ready("q")[0].redelivered);
    assert!(f
        .b
        .take_notices()
        .contains(&Notice::QueueReady(Arc::from("q"))));
    assert!(f.get("q").is_none(), "expired");
    assert_eq!(f.bodies("dead"), ["handed"]);
}
