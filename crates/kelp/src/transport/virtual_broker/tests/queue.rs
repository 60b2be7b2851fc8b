//! Queues and sessions: declaration, exclusivity, auto-delete, purge, delete, basic.get,
//! acknowledgements, requeueing, prefetch and consumers.

use kelp_amqp::FieldValue;

use super::super::*;
use super::{bodies_of, body, exclusive, Fx, T0};

fn durable() -> QueueOptions {
    QueueOptions {
        durable: true,
        ..QueueOptions::default()
    }
}

fn passive() -> QueueOptions {
    QueueOptions {
        passive: true,
        ..QueueOptions::default()
    }
}

fn auto_delete() -> QueueOptions {
    QueueOptions {
        auto_delete: true,
        ..QueueOptions::default()
    }
}

// ---------------------------------------------------------------- declare

#[test]
fn declare_named_queue_and_redeclare_reports_counts() {
    let mut f = Fx::new();
    let ok = f.declare("tasks", durable(), &[]).unwrap();
    assert_eq!(&*ok.queue, "tasks");
    assert_eq!((ok.message_count, ok.consumer_count), (0, 0));
    f.send("tasks", "a");
    f.send("tasks", "b");
    f.consume("tasks", "c1");
    let again = f.declare("tasks", durable(), &[]).unwrap();
    assert_eq!(&*again.queue, "tasks");
    assert_eq!((again.message_count, again.consumer_count), (2, 1));
    let info = f.b.queue_info("tasks").unwrap();
    assert!(info.durable);
    assert!(!info.auto_delete);
    assert_eq!(info.exclusive_owner, None);
    assert_eq!(info.message_bytes, 2);
    assert_eq!(f.b.queue_names().count(), 1);
}

#[test]
fn server_named_queues_are_unique_amq_gen_names() {
    let mut f = Fx::new();
    let a = f.declare("", QueueOptions::default(), &[]).unwrap().queue;
    let b = f.declare("", QueueOptions::default(), &[]).unwrap().queue;
    assert_ne!(a, b);
    for n in [&a, &b] {
        assert!(n.starts_with("amq.gen-"), "{n}");
        assert_eq!(n.len(), "amq.gen-".len() + 22, "{n}");
        assert!(n["amq.gen-".len()..]
            .bytes()
            .all(|c| c.is_ascii_alphanumeric() || c == b'-' || c == b'_'));
    }
    // The generated queue exists and the default exchange routes to it by name.
    assert_eq!(f.send(&a, "x").queues.len(), 1);
    assert_eq!(f.count(&a), 1);
    assert_eq!(f.count(&b), 0);
}

#[test]
fn passive_declare_of_a_missing_queue_is_not_found() {
    let mut f = Fx::new();
    let e = f.declare("nope", passive(), &[]).unwrap_err();
    assert_eq!(e.amqp_reply_code(), 404);
    assert!(!e.is_connection_error());
    assert_eq!(
        e,
        BrokerError::NotFound {
            kind: EntityKind::Queue,
            name: "nope".into()
        }
    );
    assert!(e.to_string().contains("queue 'nope'"), "{e}");
    // It was not created.
    assert!(!f.exists("nope"));
}

#[test]
fn passive_declare_checks_existence_only() {
    let mut f = Fx::new();
    f.queue_args("q", &[("x-message-ttl", FieldValue::I32(1000))]);
    f.send("q", "a");
    // Different flags and arguments are ignored by a passive declaration.
    let p = QueueOptions {
        passive: true,
        durable: true,
        auto_delete: true,
        ..QueueOptions::default()
    };
    let ok = f.declare("q", p, &[]).unwrap();
    assert_eq!(ok.message_count, 1);
}

#[test]
fn redeclare_with_other_flags_or_arguments_is_precondition_failed() {
    let mut f = Fx::new();
    f.queue_args("q", &[("x-message-ttl", FieldValue::I32(1000))]);
    let ttl = [("x-message-ttl", FieldValue::I32(1000))];

    let e = f.declare("q", durable(), &ttl).unwrap_err();
    assert_eq!(e.amqp_reply_code(), 406);
    assert!(matches!(&e, BrokerError::Inequivalent { argument, .. } if argument == "durable"));

    let e = f.declare("q", auto_delete(), &ttl).unwrap_err();
    assert_eq!(e.amqp_reply_code(), 406);
    assert!(matches!(&e, BrokerError::Inequivalent { argument, .. } if argument == "auto_delete"));

    let e = f
        .declare(
            "q",
            QueueOptions::default(),
            &[("x-message-ttl", FieldValue::I32(2000))],
        )
        .unwrap_err();
    assert_eq!(e.amqp_reply_code(), 406);
    assert!(
        matches!(&e, BrokerError::Inequivalent { argument, .. } if argument == "x-message-ttl"),
        "{e:?}"
    );
    assert!(e.to_string().contains("queue 'q'"), "{e}");

    // Missing the argument is a difference too.
    let e = f.declare("q", QueueOptions::default(), &[]).unwrap_err();
    assert_eq!(e.amqp_reply_code(), 406);

    // The same value with another integer type is equivalent.
    f.declare(
        "q",
        QueueOptions::default(),
        &[("x-message-ttl", FieldValue::I64(1000))],
    )
    .unwrap();
}

#[test]
fn reserved_queue_names_are_refused() {
    let mut f = Fx::new();
    let e = f
        .declare("amq.mine", QueueOptions::default(), &[])
        .unwrap_err();
    assert_eq!(e.amqp_reply_code(), 403);
    assert!(!f.exists("amq.mine"));
}

#[test]
fn exclusive_queue_of_another_owner_is_resource_locked() {
    let mut f = Fx::new();
    f.declare("mine", exclusive(), &[]).unwrap();
    f.send("mine", "a");
    let other = OwnerId(2);
    let s2 = f.b.open_session(other);
    let none = kelp_amqp::FieldTable::new();
    let checks: Vec<BrokerError> = vec![
        f.b.declare_queue(other, "mine", exclusive(), &none, T0)
            .unwrap_err(),
        f.b.declare_queue(other, "mine", QueueOptions::default(), &none, T0)
            .unwrap_err(),
        f.b.declare_queue(other, "mine", passive(), &none, T0)
            .unwrap_err(),
        f.b.bind_queue(other, "mine", "amq.direct", "k", &none)
            .unwrap_err(),
        f.b.get(s2, "mine", false, T0).unwrap_err(),
        f.b.consume(s2, "mine", "", ConsumeOptions::default(), T0)
            .unwrap_err(),
        f.b.purge_queue(other, "mine").unwrap_err(),
        f.b.delete_queue(other, "mine", false, false).unwrap_err(),
    ];
    for e in checks {
        assert_eq!(e.amqp_reply_code(), 405, "{e:?}");
        assert!(
            matches!(&e, BrokerError::ResourceLocked { queue } if queue == "mine"),
            "{e:?}"
        );
    }
    // Nothing happened to it; publishing to it is allowed (as in RabbitMQ).
    assert_eq!(f.count("mine"), 1);
    assert_eq!(
        f.b.publish(super::msg_body("", "mine", "b"), false, T0)
            .unwrap()
            .queues
            .len(),
        1
    );
    // Its owner can use it, and redeclares it only as exclusive.
    assert_eq!(f.b.queue_info("mine").unwrap().exclusive_owner, Some(f.o));
    assert_eq!(body(&f.get("mine").unwrap()), "a");
    f.declare("mine", exclusive(), &[]).unwrap();
    let e = f.declare("mine", QueueOptions::default(), &[]).unwrap_err();
    assert_eq!(e.amqp_reply_code(), 405);
}

#[test]
fn redeclaring_a_shared_queue_as_exclusive_is_resource_locked() {
    let mut f = Fx::new();
    f.queue("shared");
    let e = f.declare("shared", exclusive(), &[]).unwrap_err();
    assert_eq!(e.amqp_reply_code(), 405);
    assert_eq!(f.b.queue_info("shared").unwrap().exclusive_owner, None);
}

// ---------------------------------------------------------------- auto-delete

#[test]
fn auto_delete_queue_goes_when_its_last_consumer_cancels() {
    let mut f = Fx::new();
    f.declare("ad", auto_delete(), &[]).unwrap();
    // Without ever having a consumer it stays, whatever happens to it.
    f.send("ad", "a");
    let d = f.get("ad").unwrap();
    f.ack(d.delivery_tag);
    assert!(f.exists("ad"));

    f.consume("ad", "c1");
    f.consume("ad", "c2");
    f.b.take_notices();
    assert!(f.b.cancel(f.s, "c1", T0).unwrap());
    assert!(f.exists("ad"), "one consumer left");
    assert!(f.b.take_notices().is_empty());
    assert!(f.b.cancel(f.s, "c2", T0).unwrap());
    assert!(!f.exists("ad"));
    assert!(f.b.router().queue("ad").is_none());
    assert_eq!(
        f.b.take_notices(),
        [Notice::QueueDeleted(std::sync::Arc::from("ad"))]
    );
}

#[test]
fn auto_delete_queue_goes_when_its_consumers_session_closes() {
    let mut f = Fx::new();
    f.declare("ad", auto_delete(), &[]).unwrap();
    let s2 = f.b.open_session(f.o);
    f.b.consume(s2, "ad", "c", ConsumeOptions::default(), T0)
        .unwrap();
    f.b.close_session(s2, T0).unwrap();
    assert!(!f.exists("ad"));
}

// ---------------------------------------------------------------- purge, delete

#[test]
fn purge_drops_ready_messages_and_keeps_unacked_ones() {
    let mut f = Fx::new();
    f.queue("q");
    for b in ["a", "b", "c"] {
        f.send("q", b);
    }
    let d = f.get("q").unwrap();
    assert_eq!(f.b.purge_queue(f.o, "q").unwrap(), 2);
    assert_eq!(f.count("q"), 0);
    assert_eq!(f.b.queue_info("q").unwrap().message_bytes, 0);
    assert_eq!(f.b.purge_queue(f.o, "q").unwrap(), 0);
    // The unacked one survives the purge and can be requeued.
    f.reject(d.delivery_tag, true);
    assert_eq!(f.bodies("q"), ["a"]);
    let e = f.b.purge_queue(f.o, "missing").unwrap_err();
    assert_eq!(e.amqp_reply_code(), 404);
}

#[test]
fn delete_if_unused_and_if_empty() {
    let mut f = Fx::new();
    f.queue("q");
    f.send("q", "a");
    f.consume("q", "c");

    let e = f.b.delete_queue(f.o, "q", true, false).unwrap_err();
    assert_eq!(e.amqp_reply_code(), 406);
    assert!(matches!(
        &e,
        BrokerError::InUse {
            kind: EntityKind::Queue,
            name
        } if name == "q"
    ));
    let e = f.b.delete_queue(f.o, "q", false, true).unwrap_err();
    assert_eq!(e.amqp_reply_code(), 406);
    assert!(matches!(&e, BrokerError::NotEmpty { queue } if queue == "q"));
    assert!(f.exists("q"));
    assert_eq!(f.count("q"), 1);

    // An unacked message does not make the queue non-empty.
    let d = f.next("c").unwrap();
    assert!(f.b.cancel(f.s, "c", T0).unwrap());
    assert_eq!(f.b.delete_queue(f.o, "q", true, true).unwrap(), 0);
    assert!(!f.exists("q"));
    // Settling the delivery of a deleted queue still works; it goes nowhere.
    f.ack(d.delivery_tag);

    // Deleting returns the ready messages dropped; a missing queue is fine.
    f.queue("r");
    f.send("r", "a");
    f.send("r", "b");
    assert_eq!(f.b.delete_queue(f.o, "r", false, false).unwrap(), 2);
    assert_eq!(f.b.delete_queue(f.o, "r", false, false).unwrap(), 0);
    assert!(f.send("r", "c").is_unroutable());
}

// ---------------------------------------------------------------- basic.get

#[test]
fn get_returns_messages_in_fifo_order_with_remaining_count() {
    let mut f = Fx::new();
    f.queue("q");
    assert!(f.get("q").is_none());
    for i in 0..100 {
        f.send("q", &format!("m{i}"));
    }
    for i in 0..100u32 {
        let d = f.get("q").unwrap();
        assert_eq!(body(&d), format!("m{i}"));
        assert_eq!(d.delivery_tag, u64::from(i) + 1);
        assert_eq!(d.message_count, 99 - i);
        assert!(!d.redelivered);
    }
    assert!(f.get("q").is_none());
    assert_eq!(f.b.unacked_count(f.s), Some(100));
    let e = f.b.get(f.s, "missing", false, T0).unwrap_err();
    assert_eq!(e.amqp_reply_code(), 404);
}

#[test]
fn get_no_ack_leaves_nothing_unacked() {
    let mut f = Fx::new();
    f.queue("q");
    f.send("q", "a");
    let d = f.b.get(f.s, "q", true, T0).unwrap().unwrap();
    assert_eq!(body(&d), "a");
    assert_eq!(f.b.unacked_count(f.s), Some(0));
    let e = f.b.ack(f.s, d.delivery_tag, false).unwrap_err();
    assert_eq!(e, BrokerError::UnknownDeliveryTag { tag: 1 });
    assert_eq!(e.amqp_reply_code(), 406);
}

#[test]
fn delivery_tags_are_per_session() {
    let mut f = Fx::new();
    f.queue("q");
    f.send("q", "a");
    f.send("q", "b");
    let s2 = f.b.open_session(f.o);
    let d1 = f.get("q").unwrap();
    let d2 = f.b.get(s2, "q", false, T0).unwrap().unwrap();
    assert_eq!((d1.delivery_tag, d2.delivery_tag), (1, 1));
    // Each session settles its own tag 1.
    f.ack(1);
    assert_eq!(f.b.unacked_count(s2), Some(1));
    assert_eq!(f.b.ack(s2, 1, false).unwrap(), 1);
}

// ---------------------------------------------------------------- ack / nack / reject

#[test]
fn ack_single_multiple_and_all() {
    let mut f = Fx::new();
    f.queue("q");
    for i in 0..6 {
        f.send("q", &format!("m{i}"));
    }
    for _ in 0..6 {
        f.get("q").unwrap();
    }
    // Out of order single ack, then multiple up to 4 (skips the settled 2).
    f.ack(2);
    assert_eq!(f.b.ack(f.s, 4, true).unwrap(), 3);
    assert_eq!(f.b.unacked_count(f.s), Some(2));
    // Already settled tags are unknown.
    for tag in [1, 2, 4] {
        let e = f.b.ack(f.s, tag, false).unwrap_err();
        assert_eq!(e, BrokerError::UnknownDeliveryTag { tag });
    }
    // An unknown tag with multiple settles nothing.
    assert!(f.b.ack(f.s, 99, true).is_err());
    assert_eq!(f.b.unacked_count(f.s), Some(2));
    // Tag 0 with multiple: everything.
    assert_eq!(f.b.ack(f.s, 0, true).unwrap(), 2);
    assert_eq!(f.b.unacked_count(f.s), Some(0));
    assert_eq!(f.count("q"), 0);
}

#[test]
fn requeue_restores_the_original_position_and_marks_redelivered() {
    let mut f = Fx::new();
    f.queue("q");
    for b in ["a", "b", "c", "d"] {
        f.send("q", b);
    }
    let a = f.get("q").unwrap();
    let b = f.get("q").unwrap();
    // Requeue a first, then b: each goes back where it was, not to the head.
    f.reject(a.delivery_tag, true);
    assert_eq!(f.bodies("q"), ["a", "c", "d"]);
    f.reject(b.delivery_tag, true);
    assert_eq!(f.bodies("q"), ["a", "b", "c", "d"]);
    let flags: Vec<bool> = f.ready("q").iter().map(|m| m.redelivered).collect();
    assert_eq!(flags, [true, true, false, false]);
    // The redelivered flag is reported on the next delivery.
    let again = f.get("q").unwrap();
    assert_eq!(body(&again), "a");
    assert!(again.redelivered);
    assert_eq!(again.message_count, 3);
    assert!(f.get("q").unwrap().redelivered);
    assert!(!f.get("q").unwrap().redelivered);
}

#[test]
fn requeue_in_reverse_order_and_behind_newer_messages() {
    let mut f = Fx::new();
    f.queue("q");
    for b in ["a", "b", "c"] {
        f.send("q", b);
    }
    let a = f.get("q").unwrap();
    let b = f.get("q").unwrap();
    f.send("q", "d");
    f.reject(b.delivery_tag, true);
    assert_eq!(f.bodies("q"), ["b", "c", "d"]);
    f.reject(a.delivery_tag, true);
    assert_eq!(f.bodies("q"), ["a", "b", "c", "d"]);
}

#[test]
fn nack_multiple_with_requeue() {
    let mut f = Fx::new();
    f.queue("q");
    for b in ["a", "b", "c", "d"] {
        f.send("q", b);
    }
    let ds: Vec<Delivery> = (0..3).map(|_| f.get("q").unwrap()).collect();
    assert_eq!(bodies_of(&ds), ["a", "b", "c"]);
    f.b.take_notices();
    assert_eq!(f.b.nack(f.s, 2, true, true, T0).unwrap(), 2);
    assert_eq!(f.bodies("q"), ["a", "b", "d"]);
    assert_eq!(f.b.unacked_count(f.s), Some(1));
    assert_eq!(
        f.b.take_notices(),
        [Notice::QueueReady(std::sync::Arc::from("q"))]
    );
    // Unknown tag: error, nothing requeued.
    let e = f.b.nack(f.s, 2, false, true, T0).unwrap_err();
    assert_eq!(e.amqp_reply_code(), 406);
    assert_eq!(f.count("q"), 3);
}

#[test]
fn reject_without_requeue_and_without_dlx_drops_the_message() {
    let mut f = Fx::new();
    f.queue("q");
    f.send("q", "a");
    f.send("q", "b");
    let d = f.get("q").unwrap();
    f.reject(d.delivery_tag, false);
    assert_eq!(f.bodies("q"), ["b"]);
    assert_eq!(f.b.unacked_count(f.s), Some(0));
    let e = f.b.reject(f.s, d.delivery_tag, false, T0).unwrap_err();
    assert_eq!(e.amqp_reply_code(), 406);
}

#[test]
fn closing_a_session_requeues_its_unacked_messages() {
    let mut f = Fx::new();
    f.queue("q");
    for b in ["a", "b", "c"] {
        f.send("q", b);
    }
    let s2 = f.b.open_session(f.o);
    let d1 = f.b.get(s2, "q", false, T0).unwrap().unwrap();
    let _d2 = f.b.get(s2, "q", false, T0).unwrap().unwrap();
    f.b.ack(s2, d1.delivery_tag, false).unwrap();
    f.b.consume(s2, "q", "c", ConsumeOptions::default(), T0)
        .unwrap();
    assert_eq!(f.b.queue_info("q").unwrap().consumer_count, 1);
    assert_eq!(f.b.close_session(s2, T0).unwrap(), 1);
    assert_eq!(f.bodies("q"), ["b", "c"]);
    assert!(f.ready("q")[0].redelivered);
    assert_eq!(f.b.queue_info("q").unwrap().consumer_count, 0);
    // The session is gone.
    let e = f.b.ack(s2, 2, false).unwrap_err();
    assert_eq!(e.amqp_reply_code(), 504);
    assert!(e.is_connection_error());
    assert!(f.b.close_session(s2, T0).is_err());
    assert_eq!(f.b.unacked_count(s2), None);
}

#[test]
fn recover_requeues_everything_unacked() {
    for requeue in [true, false] {
        let mut f = Fx::new();
        f.queue("q");
        for b in ["a", "b", "c"] {
            f.send("q", b);
        }
        f.get("q").unwrap();
        f.get("q").unwrap();
        assert_eq!(f.b.recover(f.s, requeue).unwrap(), 2);
        assert_eq!(f.b.unacked_count(f.s), Some(0));
        assert_eq!(f.bodies("q"), ["a", "b", "c"]);
        let flags: Vec<bool> = f.ready("q").iter().map(|m| m.redelivered).collect();
        assert_eq!(flags, [true, true, false]);
        // New deliveries get new tags.
        assert_eq!(f.get("q").unwrap().delivery_tag, 3);
    }
}

// ---------------------------------------------------------------- consumers, prefetch

#[test]
fn prefetch_limits_unacked_deliveries_per_consumer() {
    let mut f = Fx::new();
    f.queue("q");
    for i in 0..5 {
        f.send("q", &format!("m{i}"));
    }
    f.b.qos(f.s, 2, false).unwrap();
    f.consume("q", "c");
    let d0 = f.next("c").unwrap();
    let d1 = f.next("c").unwrap();
    assert_eq!(bodies_of(&[d0.clone(), d1.clone()]), ["m0", "m1"]);
    assert!(f.next("c").is_none(), "prefetch 2 reached");
    assert_eq!(f.count("q"), 3);
    // basic.get ignores prefetch.
    let g = f.get("q").unwrap();
    assert_eq!(body(&g), "m2");
    // Acking (or rejecting) one frees one slot.
    f.ack(d0.delivery_tag);
    assert_eq!(body(&f.next("c").unwrap()), "m3");
    assert!(f.next("c").is_none());
    f.reject(d1.delivery_tag, false);
    assert_eq!(body(&f.next("c").unwrap()), "m4");
    assert!(f.next("c").is_none());
}

#[test]
fn prefetch_applies_to_consumers_started_after_qos() {
    let mut f = Fx::new();
    f.queue("q");
    for i in 0..4 {
        f.send("q", &format!("m{i}"));
    }
    f.consume("q", "unlimited");
    f.b.qos(f.s, 1, false).unwrap();
    f.consume("q", "one");
    assert!(f.next("one").is_some());
    assert!(f.next("one").is_none());
    assert!(f.next("unlimited").is_some());
    assert!(f.next("unlimited").is_some());
    assert!(f.next("unlimited").is_some());
    assert!(f.next("unlimited").is_none(), "queue empty");
}

#[test]
fn global_prefetch_limits_the_session() {
    let mut f = Fx::new();
    f.queue("q");
    for i in 0..10 {
        f.send("q", &format!("m{i}"));
    }
    f.b.qos(f.s, 3, true).unwrap();
    f.consume("q", "a");
    f.consume("q", "b");
    let mut got = Vec::new();
    f.b.drain_for_consumer(f.s, "a", 2, T0, &mut got).unwrap();
    f.b.drain_for_consumer(f.s, "b", 10, T0, &mut got).unwrap();
    assert_eq!(bodies_of(&got), ["m0", "m1", "m2"]);
    assert!(f.next("a").is_none());
    f.ack(got[0].delivery_tag);
    assert_eq!(body(&f.next("a").unwrap()), "m3");
    assert!(f.next("b").is_none());
}

#[test]
fn no_ack_consumer_is_not_limited_and_tracks_nothing() {
    let mut f = Fx::new();
    f.queue("q");
    for i in 0..5 {
        f.send("q", &format!("m{i}"));
    }
    f.b.qos(f.s, 1, false).unwrap();
    let opts = ConsumeOptions {
        no_ack: true,
        ..ConsumeOptions::default()
    };
    f.b.consume(f.s, "q", "c", opts, T0).unwrap();
    let mut got = Vec::new();
    assert_eq!(
        f.b.drain_for_consumer(f.s, "c", 100, T0, &mut got).unwrap(),
        5
    );
    assert_eq!(bodies_of(&got)[4], "m4");
    assert_eq!(f.b.unacked_count(f.s), Some(0));
}

#[test]
fn drain_stops_at_max() {
    let mut f = Fx::new();
    f.queue("q");
    for i in 0..5 {
        f.send("q", &format!("m{i}"));
    }
    f.consume("q", "c");
    let mut got = Vec::new();
    assert_eq!(
        f.b.drain_for_consumer(f.s, "c", 3, T0, &mut got).unwrap(),
        3
    );
    assert_eq!(
        f.b.drain_for_consumer(f.s, "c", 3, T0, &mut got).unwrap(),
        2
    );
    assert_eq!(bodies_of(&got), ["m0", "m1", "m2", "m3", "m4"]);
    let tags: Vec<u64> = got.iter().map(|d| d.delivery_tag).collect();
    assert_eq!(tags, [1, 2, 3, 4, 5]);
}

/// The core does not schedule consumers: the caller asks for the next message of each in turn,
/// and each gets the queue's next message, within its own prefetch.
#[test]
fn consumers_taking_turns_share_the_queue_in_order() {
    let mut f = Fx::new();
    f.queue("q");
    for i in 0..6 {
        f.send("q", &format!("m{i}"));
    }
    f.b.qos(f.s, 1, false).unwrap();
    f.consume("q", "c1");
    let s2 = f.b.open_session(OwnerId(2));
    f.b.qos(s2, 1, false).unwrap();
    f.b.consume(s2, "q", "c2", ConsumeOptions::default(), T0)
        .unwrap();
    let a = f.next("c1").unwrap();
    let b = f.b.next_for_consumer(s2, "c2", T0).unwrap().unwrap();
    assert_eq!((body(&a), body(&b)), ("m0".into(), "m1".into()));
    // Both are at their prefetch.
    assert!(f.next("c1").is_none());
    assert!(f.b.next_for_consumer(s2, "c2", T0).unwrap().is_none());
    // c2 rejects with requeue: its message is next for c1 once c1 has room.
    f.b.reject(s2, b.delivery_tag, true, T0).unwrap();
    f.ack(a.delivery_tag);
    let again = f.next("c1").unwrap();
    assert_eq!(body(&again), "m1");
    assert!(again.redelivered);
    assert_eq!(
        body(&f.b.next_for_consumer(s2, "c2", T0).unwrap().unwrap()),
        "m2"
    );
    assert_eq!(f.b.queue_info("q").unwrap().consumer_count, 2);
}

#[test]
fn cancel_stops_deliveries_and_keeps_unacked() {
    let mut f = Fx::new();
    f.queue("q");
    f.send("q", "a");
    f.send("q", "b");
    let tag = f.consume("q", "");
    assert!(tag.starts_with("amq.ctag-"), "{tag}");
    let d = f.next(&tag).unwrap();
    assert!(f.b.cancel(f.s, &tag, T0).unwrap());
    assert!(!f.b.cancel(f.s, &tag, T0).unwrap(), "already cancelled");
    assert_eq!(f.b.queue_info("q").unwrap().consumer_count, 0);
    let e = f.b.next_for_consumer(f.s, &tag, T0).unwrap_err();
    assert_eq!(e.amqp_reply_code(), 404);
    assert!(matches!(
        e,
        BrokerError::NotFound {
            kind: EntityKind::Consumer,
            ..
        }
    ));
    assert_eq!(f.count("q"), 1);
    assert_eq!(f.b.unacked_count(f.s), Some(1));
    f.ack(d.delivery_tag);
    // The tag can be reused after the cancel.
    f.consume("q", &tag);
    assert_eq!(body(&f.next(&tag).unwrap()), "b");
}

#[test]
fn consumer_tags_and_exclusive_consumers() {
    let mut f = Fx::new();
    f.queue("q");
    f.queue("r");
    f.consume("q", "c");
    let e =
        f.b.consume(f.s, "r", "c", ConsumeOptions::default(), T0)
            .unwrap_err();
    assert_eq!(e.amqp_reply_code(), 530);
    assert!(e.is_connection_error());
    // The same tag on another session is fine.
    let s2 = f.b.open_session(f.o);
    f.b.consume(s2, "q", "c", ConsumeOptions::default(), T0)
        .unwrap();

    let excl = ConsumeOptions {
        exclusive: true,
        ..ConsumeOptions::default()
    };
    // A queue with consumers cannot get an exclusive one…
    let e = f.b.consume(f.s, "q", "x", excl, T0).unwrap_err();
    assert_eq!(e.amqp_reply_code(), 403);
    // …and a queue with an exclusive consumer takes no other.
    f.b.consume(f.s, "r", "x", excl, T0).unwrap();
    let e =
        f.b.consume(s2, "r", "y", ConsumeOptions::default(), T0)
            .unwrap_err();
    assert_eq!(e.amqp_reply_code(), 403);
    f.b.cancel(f.s, "x", T0).unwrap();
    f.b.consume(s2, "r", "y", ConsumeOptions::default(), T0)
        .unwrap();
    let e =
        f.b.consume(f.s, "missing", "z", ConsumeOptions::default(), T0)
            .unwrap_err();
    assert_eq!(e.amqp_reply_code(), 404);
}

#[test]
fn settled_deliveries_behind_an_old_unacked_one_are_not_kept() {
    let mut f = Fx::new();
    f.queue("q");
    for i in 0..10_001 {
        f.send("q", &format!("m{i}"));
    }
    // Tag 1 stays unacked (a long task) while 10 000 others come and go.
    let first = f.get("q").unwrap();
    for _ in 0..10_000 {
        let d = f.get("q").unwrap();
        f.ack(d.delivery_tag);
    }
    assert_eq!(f.b.unacked_count(f.s), Some(1));
    let tracked = f.b.tracked_entries(f.s).unwrap();
    assert!(
        tracked <= 100,
        "{tracked} entries kept for 1 unacked delivery"
    );
    f.ack(first.delivery_tag);
    assert_eq!(f.b.tracked_entries(f.s), Some(0));
}

#[test]
fn tags_stay_addressable_across_compaction() {
    let mut f = Fx::new();
    f.queue("q");
    for i in 0..1000 {
        f.send("q", &format!("m{i}"));
    }
    for _ in 0..1000 {
        f.get("q").unwrap();
    }
    // Keep every 10th tag (10, 20, …, 1000) and ack the rest out of order.
    for tag in (1..=1000u64).rev().filter(|t| t % 10 != 0) {
        f.ack(tag);
    }
    assert_eq!(f.b.unacked_count(f.s), Some(100));
    assert!(f.b.tracked_entries(f.s).unwrap() <= 100 + 64 + 100);
    assert!(f.b.ack(f.s, 15, false).is_err(), "settled tag");
    // Multiple up to 500 settles 10, 20, …, 500.
    assert_eq!(f.b.ack(f.s, 500, true).unwrap(), 50);
    assert_eq!(f.b.nack(f.s, 1000, false, true, T0).unwrap(), 1);
    assert_eq!(f.bodies("q"), ["m999"]);
    assert_eq!(f.b.ack(f.s, 0, true).unwrap(), 49);
    assert_eq!(f.b.unacked_count(f.s), Some(0));
}

/// `x-single-active-consumer`: only the earliest attached consumer is served; when it goes,
/// the next one takes over (and waiters are told), and a redeclare without it is refused.
#[test]
fn single_active_consumer_serves_one_at_a_time() {
    let mut b = VirtualBroker::new();
    let o = OwnerId(1);
    let (s1, s2) = (b.open_session(o), b.open_session(o));
    let args = super::table(&[("x-single-active-consumer", FieldValue::Bool(true))]);
    b.declare_queue(o, "sac", QueueOptions::default(), &args, T0)
        .unwrap();
    let first = b
        .consume(s1, "sac", "first", ConsumeOptions::default(), T0)
        .unwrap();
    let second = b
        .consume(s2, "sac", "second", ConsumeOptions::default(), T0)
        .unwrap();
    for k in ["a", "b"] {
        b.publish(super::msg_body("", "sac", k), false, T0).unwrap();
    }
    assert!(b.next_for_consumer(s2, &second, T0).unwrap().is_none());
    let d = b.next_for_consumer(s1, &first, T0).unwrap().unwrap();
    assert_eq!(body(&d), "a");
    b.take_notices();
    b.cancel(s1, &first, T0).unwrap();
    assert!(b
        .take_notices()
        .iter()
        .any(|n| matches!(n, Notice::QueueReady(q) if &**q == "sac")));
    // "a" went back unacked on s1's session, so the next ready one is "b".
    let d = b.next_for_consumer(s2, &second, T0).unwrap().unwrap();
    assert_eq!(body(&d), "b");
    let err = b
        .declare_queue(
            o,
            "sac",
            QueueOptions::default(),
            &kelp_amqp::FieldTable::new(),
            T0,
        )
        .unwrap_err();
    assert_eq!(err.amqp_reply_code(), 406);
}

fn sac() -> (&'static str, FieldValue) {
    ("x-single-active-consumer", FieldValue::Bool(true))
}

fn with_priority(priority: i64) -> ConsumeOptions {
    ConsumeOptions {
        priority,
        ..ConsumeOptions::default()
    }
}

/// Deliveries for `tag` of session `s` (up to 100).
fn take(f: &mut Fx, s: SessionId, tag: &str) -> Vec<String> {
    let mut v = Vec::new();
    f.b.drain_for_consumer(s, tag, 100, T0, &mut v).unwrap();
    bodies_of(&v)
}

/// When the single active consumer goes (cancel or its session closing), the highest-priority
/// consumer left takes over, the earliest among equals; a newer higher-priority consumer does
/// not preempt the active one.
#[test]
fn single_active_consumer_hands_over_by_priority_then_age() {
    let mut f = Fx::new();
    f.queue_args("q", &[sac()]);
    let s1 = f.s;
    let s2 = f.b.open_session(OwnerId(2));
    let s3 = f.b.open_session(OwnerId(3));
    f.consume("q", "first");
    f.b.consume(s2, "q", "low-early", ConsumeOptions::default(), T0)
        .unwrap();
    f.b.consume(s3, "q", "high", with_priority(3), T0).unwrap();
    f.b.consume(s2, "q", "low-late", ConsumeOptions::default(), T0)
        .unwrap();
    for i in 0..3 {
        f.send("q", &format!("m{i}"));
    }
    assert!(take(&mut f, s3, "high").is_empty(), "no preemption");
    assert_eq!(take(&mut f, s1, "first"), ["m0", "m1", "m2"]);
    f.send("q", "m3");
    f.b.take_notices();
    f.b.close_session(f.s, T0).unwrap();
    // Its unacked messages came back, and waiters are told the queue has work.
    assert!(f.b.take_notices().contains(&Notice::QueueReady("q".into())));
    assert!(take(&mut f, s2, "low-early").is_empty());
    assert_eq!(take(&mut f, s3, "high"), ["m0", "m1", "m2", "m3"]);
    assert!(f.b.cancel(s3, "high", T0).unwrap());
    f.send("q", "m4");
    assert!(take(&mut f, s2, "low-late").is_empty());
    assert_eq!(take(&mut f, s2, "low-early"), ["m4"]);
    assert_eq!(f.b.queue_info("q").unwrap().consumer_count, 2);
    // With every consumer gone, the next one to come is active.
    f.b.cancel(s2, "low-early", T0).unwrap();
    f.b.cancel(s2, "low-late", T0).unwrap();
    f.b.consume(s2, "q", "again", ConsumeOptions::default(), T0)
        .unwrap();
    f.send("q", "m5");
    assert_eq!(take(&mut f, s2, "again"), ["m5"]);
}

/// `x-single-active-consumer` must be a boolean, and RabbitMQ grants no exclusive consumer
/// on such a queue; basic.get still works.
#[test]
fn single_active_consumer_argument_and_exclusive_consumers() {
    let mut f = Fx::new();
    let e = f
        .declare(
            "bad",
            QueueOptions::default(),
            &[("x-single-active-consumer", FieldValue::I32(1))],
        )
        .unwrap_err();
    assert_eq!(e.amqp_reply_code(), 406);
    f.queue_args("q", &[sac()]);
    let excl = ConsumeOptions {
        exclusive: true,
        ..ConsumeOptions::default()
    };
    let e = f.b.consume(f.s, "q", "x", excl, T0).unwrap_err();
    assert_eq!(e.amqp_reply_code(), 403);
    f.consume("q", "c");
    f.send("q", "a");
    assert_eq!(body(&f.get("q").unwrap()), "a");
    // Redeclaring with `false` differs as much as leaving it out.
    let e = f
        .declare(
            "q",
            QueueOptions::default(),
            &[("x-single-active-consumer", FieldValue::Bool(false))],
        )
        .unwrap_err();
    assert_eq!(e.amqp_reply_code(), 406);
}

/// Consumer priorities: the highest-priority consumers get the messages while they have
/// room; a lower one only while every higher one is blocked.
#[test]
fn consumer_priority_serves_higher_until_blocked() {
    let mut f = Fx::new();
    f.queue("q");
    let s1 = f.s;
    let s2 = f.b.open_session(OwnerId(2));
    f.b.qos(s2, 2, false).unwrap();
    f.consume("q", "low");
    f.b.consume(s2, "q", "high", with_priority(10), T0).unwrap();
    for i in 0..5 {
        f.send("q", &format!("m{i}"));
    }
    assert!(take(&mut f, s1, "low").is_empty(), "high has room");
    assert_eq!(take(&mut f, s2, "high"), ["m0", "m1"]);
    // High is at its prefetch: low may take the rest.
    assert_eq!(take(&mut f, s1, "low"), ["m2", "m3", "m4"]);
    f.b.ack(s2, 1, false).unwrap();
    f.send("q", "m5");
    assert!(take(&mut f, s1, "low").is_empty(), "high has room again");
    assert_eq!(take(&mut f, s2, "high"), ["m5"]);
    // Negative priorities rank below the default.
    f.queue("r");
    f.b.consume(f.s, "r", "neg", with_priority(-1), T0).unwrap();
    f.consume("r", "zero");
    f.send("r", "x");
    assert!(take(&mut f, s1, "neg").is_empty());
    assert_eq!(take(&mut f, s1, "zero"), ["x"]);
}

/// `x-priority` comes from the consume arguments: any integer type; anything else is
/// PRECONDITION_FAILED.
#[test]
fn consumer_priority_argument() {
    let args = |v: FieldValue| super::table(&[("x-priority", v)]);
    let o = ConsumeOptions::default();
    assert_eq!(
        o.with_arguments("q", &args(FieldValue::I32(7)))
            .unwrap()
            .priority,
        7
    );
    assert_eq!(
        o.with_arguments("q", &args(FieldValue::I8(-3)))
            .unwrap()
            .priority,
        -3
    );
    assert_eq!(
        o.with_arguments("q", &args(FieldValue::I64(1 << 40)))
            .unwrap()
            .priority,
        1 << 40
    );
    let none = o
        .with_arguments("q", &super::table(&[("x-other", FieldValue::Bool(true))]))
        .unwrap();
    assert_eq!(none, o);
    let e = o.with_arguments("q", &args(super::s("high"))).unwrap_err();
    assert_eq!(e.amqp_reply_code(), 406);
    assert!(e.to_string().contains("x-priority"), "{e}");
}

/// `take_turn` deals one message at a time to consumers of equal standing (so that consumers
/// woken together take turns) and says when to wake the others; a consumer nobody competes
/// with takes a batch.
#[test]
fn take_turn_deals_fairly_and_says_whom_to_wake() {
    let mut f = Fx::new();
    f.queue("q");
    for i in 0..6 {
        f.send("q", &format!("m{i}"));
    }
    let mut got = Vec::new();
    f.consume("q", "alone");
    let t = f.b.take_turn(f.s, "alone", 2, T0, &mut got).unwrap();
    assert_eq!((t.taken, t.wake_others), (2, false));
    f.consume("q", "peer");
    let t = f.b.take_turn(f.s, "alone", 10, T0, &mut got).unwrap();
    assert_eq!((t.taken, t.wake_others), (1, true));
    let t = f.b.take_turn(f.s, "peer", 10, T0, &mut got).unwrap();
    assert_eq!((t.taken, t.wake_others), (1, true));
    // The only consumer of the highest priority batches, and wakes the lower ones while
    // something is left (it may be blocked).
    f.b.consume(f.s, "q", "top", with_priority(1), T0).unwrap();
    let t = f.b.take_turn(f.s, "top", 1, T0, &mut got).unwrap();
    assert_eq!((t.taken, t.wake_others), (1, true));
    let t = f.b.take_turn(f.s, "top", 10, T0, &mut got).unwrap();
    assert_eq!((t.taken, t.wake_others), (1, false), "nothing left");
    assert_eq!(bodies_of(&got), ["m0", "m1", "m2", "m3", "m4", "m5"]);
    // The inactive consumers of a single-active-consumer queue get nothing and wake nobody.
    f.queue_args("s", &[sac()]);
    f.consume("s", "active");
    f.consume("s", "waiting");
    f.send("s", "a");
    f.send("s", "b");
    got.clear();
    let t = f.b.take_turn(f.s, "waiting", 10, T0, &mut got).unwrap();
    assert_eq!(t, Turn::default());
    let t = f.b.take_turn(f.s, "active", 10, T0, &mut got).unwrap();
    assert_eq!((t.taken, t.wake_others), (2, false));
}

/// A global prefetch change alters who has room: the queues of the session's consumers are
/// reported ready so that their other consumers look again.
#[test]
fn global_qos_change_reports_the_consumers_queues() {
    let mut f = Fx::new();
    f.queue("q");
    f.consume("q", "c");
    f.b.take_notices();
    f.b.qos(f.s, 1, true).unwrap();
    assert_eq!(f.b.take_notices(), [Notice::QueueReady("q".into())]);
    f.b.qos(f.s, 5, false).unwrap();
    assert!(f.b.take_notices().is_empty());
}
