//! Dead-lettering: rejection, nack, expiry and overflow; the `x-death` history; cycles.

use std::sync::Arc;

use kelp_amqp::{BasicProperties, FieldTable, FieldValue};

use super::super::*;
use super::{body, headers_of, hstr, msg_body, s, table, x_death, Fx, T0};

fn dlx(exchange: &str) -> (&'static str, FieldValue) {
    ("x-dead-letter-exchange", s(exchange))
}

fn dlrk(key: &str) -> (&'static str, FieldValue) {
    ("x-dead-letter-routing-key", s(key))
}

fn ttl(ms: i32) -> (&'static str, FieldValue) {
    ("x-message-ttl", FieldValue::I32(ms))
}

/// Exchange "dlx" (direct) → queue "dead" on key "dead"; queue "work" dead-letters to it, and
/// is bound to exchange "in" (direct) with key "job".
fn setup(f: &mut Fx, work_args: &[(&str, FieldValue)]) {
    f.exchange("dlx", ExchangeKind::Direct);
    f.exchange("in", ExchangeKind::Direct);
    f.queue("dead");
    f.bind("dead", "dlx", "dead");
    let mut args = vec![dlx("dlx"), dlrk("dead")];
    args.extend(work_args.iter().cloned());
    f.queue_args("work", &args);
    f.bind("work", "in", "job");
}

fn ready_message(f: &Fx, queue: &str) -> MessageData {
    let ready = f.ready(queue);
    assert_eq!(ready.len(), 1, "{queue} should hold one message");
    (*ready[0].message).clone()
}

fn entry_str(e: &FieldTable, key: &str) -> String {
    hstr(e, key).unwrap_or_else(|| panic!("x-death entry without {key}: {e:?}"))
}

fn entry_count(e: &FieldTable) -> i64 {
    e.get("count").and_then(FieldValue::as_i64).unwrap()
}

fn entry_keys(e: &FieldTable) -> Vec<String> {
    match e.get("routing-keys") {
        Some(FieldValue::Array(a)) => a.iter().map(|v| v.as_str().unwrap().to_owned()).collect(),
        other => panic!("routing-keys: {other:?}"),
    }
}

#[test]
fn reject_without_requeue_dead_letters_with_x_death() {
    let mut f = Fx::new();
    setup(&mut f, &[]);
    let props = BasicProperties::default()
        .with_message_id("m-1")
        .with_headers(table(&[("app", s("billing"))]));
    let m = MessageData::new("in", "job", props, "payload");
    assert!(f.b.publish(m, false, T0).unwrap().queues.contains("work"));
    let d = f.get("work").unwrap();
    f.b.take_notices();
    f.b.reject(f.s, d.delivery_tag, false, T0 + 2500).unwrap();

    assert_eq!(f.count("work"), 0);
    assert_eq!(f.b.take_notices(), [Notice::QueueReady(Arc::from("dead"))]);
    let dead = ready_message(&f, "dead");
    assert_eq!(&dead.body[..], b"payload");
    assert_eq!(dead.exchange.as_str(), "dlx");
    assert_eq!(dead.routing_key.as_str(), "dead");
    assert_eq!(dead.properties.message_id.as_ref().unwrap().as_str(), "m-1");
    let h = headers_of(&dead);
    assert_eq!(hstr(&h, "app").as_deref(), Some("billing"));
    let deaths = x_death(&dead);
    assert_eq!(deaths.len(), 1);
    let e = &deaths[0];
    assert_eq!(entry_count(e), 1);
    assert_eq!(entry_str(e, "reason"), "rejected");
    assert_eq!(entry_str(e, "queue"), "work");
    assert_eq!(entry_str(e, "exchange"), "in");
    assert_eq!(entry_keys(e), ["job"]);
    assert_eq!(
        e.get("time"),
        Some(&FieldValue::Timestamp((T0 + 2500) / 1000))
    );
    assert!(e.get("original-expiration").is_none());
    for (k, v) in [
        ("x-first-death-reason", "rejected"),
        ("x-first-death-queue", "work"),
        ("x-first-death-exchange", "in"),
        ("x-last-death-reason", "rejected"),
        ("x-last-death-queue", "work"),
        ("x-last-death-exchange", "in"),
    ] {
        assert_eq!(hstr(&h, k).as_deref(), Some(v), "{k}");
    }
    // The dead-lettered copy is a fresh delivery.
    let again = f.get("dead").unwrap();
    assert!(!again.redelivered);
}

#[test]
fn nack_without_requeue_dead_letters_each_message() {
    let mut f = Fx::new();
    setup(&mut f, &[]);
    for b in ["a", "b", "c"] {
        f.publish("in", "job", b);
    }
    for _ in 0..3 {
        f.get("work").unwrap();
    }
    assert_eq!(f.b.nack(f.s, 2, true, false, T0).unwrap(), 2);
    assert_eq!(f.bodies("dead"), ["a", "b"]);
    assert_eq!(f.b.unacked_count(f.s), Some(1));
    for m in f.ready("dead") {
        assert_eq!(entry_str(&x_death(&m.message)[0], "reason"), "rejected");
    }
    // Requeueing nacks do not dead-letter.
    f.b.nack(f.s, 3, false, true, T0).unwrap();
    assert_eq!(f.bodies("work"), ["c"]);
    assert_eq!(f.count("dead"), 2);
}

#[test]
fn without_a_dead_letter_routing_key_the_original_key_is_used() {
    let mut f = Fx::new();
    f.exchange("dlx", ExchangeKind::Topic);
    f.queue("dead-jobs");
    f.bind("dead-jobs", "dlx", "job.#");
    f.queue_args("work", &[dlx("dlx")]);
    f.exchange("in", ExchangeKind::Topic);
    f.bind("work", "in", "job.*");
    f.publish("in", "job.email", "a");
    let d = f.get("work").unwrap();
    f.reject(d.delivery_tag, false);
    let dead = ready_message(&f, "dead-jobs");
    assert_eq!(dead.routing_key.as_str(), "job.email");
    assert_eq!(dead.exchange.as_str(), "dlx");
    assert_eq!(entry_keys(&x_death(&dead)[0]), ["job.email"]);
}

#[test]
fn the_default_exchange_can_be_the_dead_letter_exchange() {
    let mut f = Fx::new();
    f.queue("parking");
    f.queue_args("work", &[dlx(""), dlrk("parking")]);
    f.send("work", "a");
    let d = f.get("work").unwrap();
    f.reject(d.delivery_tag, false);
    let dead = ready_message(&f, "parking");
    assert_eq!(dead.exchange.as_str(), "");
    assert_eq!(entry_str(&x_death(&dead)[0], "exchange"), "");
    assert_eq!(entry_keys(&x_death(&dead)[0]), ["work"]);
}

#[test]
fn expired_messages_are_dead_lettered_by_expire() {
    let mut f = Fx::new();
    setup(&mut f, &[ttl(1000)]);
    f.publish("in", "job", "a");
    f.b.take_notices();
    assert_eq!(f.b.expire(T0 + 1000), 1);
    assert_eq!(f.count("work"), 0);
    assert_eq!(f.b.take_notices(), [Notice::QueueReady(Arc::from("dead"))]);
    let dead = ready_message(&f, "dead");
    let e = &x_death(&dead)[0];
    assert_eq!(entry_str(e, "reason"), "expired");
    assert_eq!(entry_str(e, "queue"), "work");
    assert_eq!(entry_count(e), 1);
    assert!(e.get("original-expiration").is_none());
    assert_eq!(
        hstr(&headers_of(&dead), "x-first-death-reason").as_deref(),
        Some("expired")
    );
}

#[test]
fn per_message_expiration_is_recorded_and_removed_when_dead_lettered() {
    let mut f = Fx::new();
    setup(&mut f, &[]);
    let m = MessageData::new(
        "in",
        "job",
        BasicProperties::default().with_expiration("250"),
        "a",
    );
    f.b.publish(m, false, T0).unwrap();
    // Met lazily by basic.get at the head.
    assert!(f.get_at("work", T0 + 250).is_none());
    let dead = ready_message(&f, "dead");
    assert_eq!(dead.properties.expiration, None);
    assert_eq!(entry_str(&x_death(&dead)[0], "original-expiration"), "250");
    // So it does not expire again in the dead-letter queue.
    assert_eq!(f.ready("dead")[0].expires_at, None);
    assert_eq!(f.b.next_expiry(), None);
}

#[test]
fn expiry_met_by_a_consumer_dead_letters_too() {
    let mut f = Fx::new();
    setup(&mut f, &[ttl(100)]);
    f.publish("in", "job", "old");
    f.b.publish(msg_body("in", "job", "new"), false, T0 + 50)
        .unwrap();
    f.consume("work", "c");
    let d = f.b.next_for_consumer(f.s, "c", T0 + 120).unwrap().unwrap();
    assert_eq!(body(&d), "new");
    assert_eq!(f.bodies("dead"), ["old"]);
}

#[test]
fn the_dead_letter_queue_applies_its_own_ttl() {
    let mut f = Fx::new();
    f.queue_args("dead", &[ttl(5000)]);
    f.queue_args("work", &[dlx(""), dlrk("dead"), ttl(100)]);
    f.send("work", "a");
    f.b.expire(T0 + 100);
    assert_eq!(f.ready("dead")[0].expires_at, Some(T0 + 5100));
}

#[test]
fn overflow_drop_head_dead_letters_with_reason_maxlen() {
    let mut f = Fx::new();
    setup(&mut f, &[("x-max-length", FieldValue::I32(2))]);
    for b in ["a", "b", "c", "d"] {
        f.publish("in", "job", b);
    }
    assert_eq!(f.bodies("work"), ["c", "d"]);
    assert_eq!(f.bodies("dead"), ["a", "b"]);
    for m in f.ready("dead") {
        let e = &x_death(&m.message)[0];
        assert_eq!(entry_str(e, "reason"), "maxlen");
        assert_eq!(entry_str(e, "queue"), "work");
    }
}

#[test]
fn overflow_reject_publish_dlx_dead_letters_the_refused_message() {
    let mut f = Fx::new();
    setup(
        &mut f,
        &[
            ("x-max-length", FieldValue::I32(1)),
            ("x-overflow", s("reject-publish-dlx")),
        ],
    );
    assert!(!f.publish("in", "job", "a").should_nack());
    let out = f.publish("in", "job", "b");
    assert!(out.should_nack());
    assert_eq!(out.rejected, [Arc::<str>::from("work")]);
    assert_eq!(f.bodies("work"), ["a"]);
    assert_eq!(f.bodies("dead"), ["b"]);
    assert_eq!(
        entry_str(&x_death(&ready_message(&f, "dead"))[0], "reason"),
        "maxlen"
    );
}

#[test]
fn reject_publish_without_dlx_suffix_does_not_dead_letter() {
    let mut f = Fx::new();
    setup(
        &mut f,
        &[
            ("x-max-length", FieldValue::I32(1)),
            ("x-overflow", s("reject-publish")),
        ],
    );
    f.publish("in", "job", "a");
    assert!(f.publish("in", "job", "b").should_nack());
    assert_eq!(f.count("dead"), 0);
}

#[test]
fn a_missing_dead_letter_exchange_drops_the_message() {
    let mut f = Fx::new();
    f.queue_args("work", &[dlx("nowhere")]);
    f.send("work", "a");
    let d = f.get("work").unwrap();
    f.b.reject(f.s, d.delivery_tag, false, T0).unwrap();
    assert_eq!(f.count("work"), 0);
    assert!(f.b.take_notices().is_empty());
}

#[test]
fn retry_loop_through_rejection_counts_deaths_per_queue_and_reason() {
    let mut f = Fx::new();
    // work --reject--> retry --(ttl 100)--> work
    f.queue_args("work", &[dlx(""), dlrk("retry")]);
    f.queue_args("retry", &[dlx(""), dlrk("work"), ttl(100)]);
    f.send("work", "job");

    let mut now = T0;
    for round in 1..=3i64 {
        let d = f.get_at("work", now).unwrap();
        f.b.reject(f.s, d.delivery_tag, false, now).unwrap();
        assert_eq!(f.count("retry"), 1, "round {round}");
        now += 100;
        assert_eq!(f.b.expire(now), 1);
        assert_eq!(f.count("work"), 1, "round {round}: back in work");
        let m = ready_message(&f, "work");
        let deaths = x_death(&m);
        assert_eq!(deaths.len(), 2);
        // Most recent first; one entry per (queue, reason), counted.
        assert_eq!(entry_str(&deaths[0], "queue"), "retry");
        assert_eq!(entry_str(&deaths[0], "reason"), "expired");
        assert_eq!(entry_count(&deaths[0]), round);
        assert_eq!(entry_str(&deaths[1], "queue"), "work");
        assert_eq!(entry_str(&deaths[1], "reason"), "rejected");
        assert_eq!(entry_count(&deaths[1]), round);
        let h = headers_of(&m);
        assert_eq!(hstr(&h, "x-first-death-queue").as_deref(), Some("work"));
        assert_eq!(
            hstr(&h, "x-first-death-reason").as_deref(),
            Some("rejected")
        );
        assert_eq!(hstr(&h, "x-last-death-queue").as_deref(), Some("retry"));
        assert_eq!(hstr(&h, "x-last-death-reason").as_deref(), Some("expired"));
    }
}

#[test]
fn a_fully_automatic_cycle_is_broken() {
    let mut f = Fx::new();
    // a --(ttl)--> b --(ttl)--> a: RabbitMQ drops the message when it would re-enter a.
    f.queue_args("a", &[dlx(""), dlrk("b"), ttl(10)]);
    f.queue_args("b", &[dlx(""), dlrk("a"), ttl(10)]);
    f.send("a", "m");
    assert_eq!(f.b.expire(T0 + 10), 1);
    assert_eq!((f.count("a"), f.count("b")), (0, 1));
    assert_eq!(f.b.next_expiry(), Some(T0 + 20));
    assert_eq!(f.b.expire(T0 + 20), 1);
    assert_eq!((f.count("a"), f.count("b")), (0, 0));
    assert_eq!(f.b.next_expiry(), None);
}

#[test]
fn a_queue_dead_lettering_to_itself_on_expiry_drops() {
    let mut f = Fx::new();
    // No routing key: the message's own key ("self") routes it back to "self".
    f.queue_args("self", &[dlx(""), ttl(10)]);
    f.send("self", "m");
    assert_eq!(f.b.expire(T0 + 10), 1);
    assert_eq!(f.count("self"), 0);
    assert_eq!(f.b.next_expiry(), None);
}

#[test]
fn a_queue_dead_lettering_to_itself_on_overflow_terminates() {
    let mut f = Fx::new();
    f.queue_args(
        "full",
        &[dlx(""), dlrk("full"), ("x-max-length", FieldValue::I32(1))],
    );
    f.send("full", "a");
    f.send("full", "b");
    f.send("full", "c");
    assert_eq!(f.bodies("full"), ["c"]);
}

#[test]
fn a_dead_letter_fanning_out_to_its_own_queue_is_not_looped() {
    let mut f = Fx::new();
    // The DLX routes to the dying queue and to a collector: only the collector gets it.
    f.exchange("dlx", ExchangeKind::Fanout);
    f.queue("collector");
    f.queue_args("work", &[dlx("dlx"), ttl(10)]);
    f.bind("collector", "dlx", "");
    f.bind("work", "dlx", "");
    f.send("work", "m");
    f.b.expire(T0 + 10);
    assert_eq!(f.count("work"), 0);
    assert_eq!(f.count("collector"), 1);
}

#[test]
fn rejection_cycles_are_allowed() {
    let mut f = Fx::new();
    f.queue_args("self", &[dlx("")]);
    f.send("self", "m");
    for round in 1..=3i64 {
        let d = f.get("self").unwrap();
        f.reject(d.delivery_tag, false);
        let m = ready_message(&f, "self");
        let deaths = x_death(&m);
        assert_eq!(deaths.len(), 1);
        assert_eq!(entry_count(&deaths[0]), round);
        assert_eq!(entry_str(&deaths[0], "reason"), "rejected");
    }
}

#[test]
fn a_rejection_after_automatic_deaths_allows_reentry() {
    let mut f = Fx::new();
    // work --(ttl)--> hold; hold --reject--> work: the rejection in between makes the second
    // entry into work legitimate, and then work's expiry may go to hold again.
    f.queue_args("work", &[dlx(""), dlrk("hold"), ttl(10)]);
    f.queue_args("hold", &[dlx(""), dlrk("work")]);
    f.send("work", "m");
    f.b.expire(T0 + 10);
    assert_eq!(f.count("hold"), 1);
    let d = f.get_at("hold", T0 + 10).unwrap();
    f.b.reject(f.s, d.delivery_tag, false, T0 + 10).unwrap();
    assert_eq!(f.count("work"), 1);
    f.b.expire(T0 + 20);
    assert_eq!(f.count("hold"), 1, "expired into hold again");
    let deaths = x_death(&ready_message(&f, "hold"));
    assert_eq!(entry_str(&deaths[0], "queue"), "work");
    assert_eq!(entry_count(&deaths[0]), 2);
}
