//! Message and queue properties: TTL, expiration, priorities, dead-lettering, length
//! limits, publisher confirms and mandatory returns, and properties carried end to end.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use kelp::amqp::FieldValue;
use kelp::{DeliveryMode, Error, Producer, PublishOptions, Queue};

use crate::common::*;

conformance_tests! {
    #[not_on(redis; "N/A on redis: Kombu's Redis transport has no TTLs (x-message-ttl, expiration, x-expires)")]
    queue_message_ttl_expires,
    #[not_on(redis; "N/A on redis: Kombu's Redis transport has no TTLs (x-message-ttl, expiration, x-expires)")]
    per_message_expiration,
    #[not_on(redis; "N/A on redis: Kombu's Redis transport has no TTLs (x-message-ttl, expiration, x-expires)")]
    expired_message_not_delivered_to_waiting_consumer,
    #[not_on(redis; "N/A on redis: Kombu's Redis priority_steps serve lower numbers first, unlike AMQP")]
    priority_queue_serves_highest_first,
    plain_queue_ignores_priority,
    #[not_on(redis; "N/A on redis: Kombu's Redis transport has no dead-lettering")]
    dead_letter_on_reject,
    #[not_on(redis; "N/A on redis: Kombu's Redis transport has no dead-lettering")]
    dead_letter_on_nack_with_routing_key,
    requeue_does_not_dead_letter,
    #[not_on(redis; "N/A on redis: Kombu's Redis transport has no dead-lettering")]
    dead_letter_on_queue_ttl_expiry,
    #[not_on(redis; "N/A on redis: Kombu's Redis transport has no dead-lettering")]
    dead_letter_on_message_expiration,
    #[not_on(redis; "N/A on redis: Kombu's Redis transport has no dead-lettering")]
    expiry_dead_letter_wakes_waiting_consumer,
    #[not_on(redis; "N/A on redis: Kombu's Redis transport has no queue length limits")]
    max_length_drops_head,
    #[not_on(redis; "N/A on redis: Kombu's Redis transport has no queue length limits")]
    max_length_dead_letters_dropped_head,
    #[not_on(redis; "N/A on redis: Kombu's Redis transport has no queue length limits")]
    max_length_reject_publish_nacks,
    publisher_confirms_ack,
    #[not_on(redis; "N/A on redis: every name is a queue (lists spring into being) and exchanges live in the declaring process")]
    mandatory_unroutable_with_confirms_is_returned,
    #[not_on(redis; "N/A on redis: every name is a queue (lists spring into being) and exchanges live in the declaring process")]
    mandatory_unroutable_without_confirms_reaches_on_return,
    properties_round_trip,
    publish_defaults_match_kombu,
    immediate_is_refused,
    #[not_on(redis; "N/A on redis: Kombu's Redis transport has no TTLs (x-message-ttl, expiration, x-expires)")]
    expiration_zero_reaches_only_a_ready_consumer,
    #[not_on(redis; "N/A on redis: Kombu's Redis transport has no queue length limits")]
    max_length_bytes_drops_head,
    #[not_on(redis; "N/A on redis: Kombu's Redis transport has no TTLs (x-message-ttl, expiration, x-expires)")]
    queue_expires_when_unused,
    #[not_on(redis; "N/A on redis: Kombu's Redis transport has no dead-lettering")]
    x_death_counts_repeated_dead_lettering,
    #[not_on(redis; "N/A on redis: no queue ownership, auto-delete, consumer registry or queue arguments on Kombu's Redis transport")]
    declare_ok_reports_counts,
    #[not_on(redis; "N/A on redis: Kombu's Redis transport has no queue length limits")]
    max_length_reject_publish_dlx,
    #[not_on(redis; "N/A on redis: every name is a queue (lists spring into being) and exchanges live in the declaring process")]
    returned_under_confirms_is_not_also_sent_to_on_return,
    #[not_on(redis; "N/A on redis: Kombu's Redis priority_steps serve lower numbers first, unlike AMQP")]
    priority_order_reaches_a_consumer,
    concurrent_confirmed_publishes,
    #[not_on(redis; "N/A on redis: every name is a queue (lists spring into being) and exchanges live in the declaring process")]
    concurrent_mandatory_returns_go_to_the_right_publish,
}

/// A dead-letter exchange (fanout) with one queue bound; returns (exchange name, queue name).
async fn dead_letter_target(t: &Target, ch: &kelp::Channel) -> (String, String) {
    let dlx = t.exchange("fanout", "dlx");
    let dlq = declare(ch, t.queue("dlq").exchange(dlx.clone())).await;
    (dlx.name, dlq.name)
}

/// `x-message-ttl`: a message left in the queue past the TTL is gone.
async fn queue_message_ttl_expires(t: &Target) {
    let (_conn, ch) = t.open().await;
    let q = declare(&ch, t.queue("ttl").message_ttl(Duration::from_millis(100))).await;
    let keep = declare(&ch, t.queue("keep")).await;
    publish(&ch, "", &q.name, "short-lived").await;
    publish(&ch, "", &keep.name, "kept").await;
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert!(
        get(&ch, &q.name).await.is_none(),
        "expired message delivered"
    );
    assert_eq!(count(&ch, &q.name).await, 0);
    assert_eq!(drain(&ch, &keep.name).await, ["kept"]);
}

/// Per-message `expiration`: only the message that expired is gone.
async fn per_message_expiration(t: &Target) {
    let (_conn, ch) = t.open().await;
    let q = declare(&ch, t.queue("exp")).await;
    let opts = PublishOptions::default().expiration(Duration::from_millis(100));
    publish_with(&ch, "", &q.name, "short", opts).await;
    let long = PublishOptions::default().expiration(Duration::from_secs(60));
    publish_with(&ch, "", &q.name, "long", long).await;
    publish(&ch, "", &q.name, "forever").await;
    tokio::time::sleep(Duration::from_millis(400)).await;
    let m = get(&ch, &q.name).await.unwrap();
    assert_eq!(text(&m), "long");
    assert_eq!(
        m.properties().expiration.as_ref().map(|e| e.as_str()),
        Some("60000")
    );
    drop(m);
    assert_eq!(drain(&ch, &q.name).await, ["forever"]);
}

/// A message that expires while a consumer waits is never delivered (the consumer
/// must not be stuck on it either).
async fn expired_message_not_delivered_to_waiting_consumer(t: &Target) {
    let (_conn, ch) = t.open().await;
    let q = declare(&ch, t.queue("exp")).await;
    within("qos", ch.qos(1, false)).await.unwrap();
    publish(&ch, "", &q.name, "blocker").await;
    let opts = PublishOptions::default().expiration(Duration::from_millis(100));
    publish_with(&ch, "", &q.name, "short", opts).await;
    publish(&ch, "", &q.name, "after").await;
    let mut c = consumer(&ch, &q).await;
    let mut first = recv(&mut c).await;
    assert_eq!(text(&first), "blocker");
    tokio::time::sleep(Duration::from_millis(300)).await;
    within("ack", first.ack()).await.unwrap();
    let mut next = recv(&mut c).await;
    assert_eq!(text(&next), "after");
    within("ack", next.ack()).await.unwrap();
}

/// `x-max-priority`: higher priority first, FIFO within one priority; priorities above
/// the maximum count as the maximum.
async fn priority_queue_serves_highest_first(t: &Target) {
    let (_conn, ch) = t.open().await;
    let q = declare(&ch, t.queue("prio").max_priority(5)).await;
    let sends: [(&str, Option<u8>); 7] = [
        ("none-1", None),
        ("p1", Some(1)),
        ("p5-a", Some(5)),
        ("p3", Some(3)),
        ("p9", Some(9)),
        ("p5-b", Some(5)),
        ("none-2", None),
    ];
    for (body, p) in sends {
        let mut opts = PublishOptions::default();
        if let Some(p) = p {
            opts = opts.priority(p);
        }
        publish_with(&ch, "", &q.name, body, opts).await;
    }
    let got = drain(&ch, &q.name).await;
    assert_eq!(got, ["p5-a", "p9", "p5-b", "p3", "p1", "none-1", "none-2"]);
}

/// A queue without `x-max-priority` ignores priorities (FIFO).
async fn plain_queue_ignores_priority(t: &Target) {
    let (_conn, ch) = t.open().await;
    let q = declare(&ch, t.queue("fifo")).await;
    for (body, p) in [("low", 1u8), ("high", 9)] {
        publish_with(
            &ch,
            "",
            &q.name,
            body,
            PublishOptions::default().priority(p),
        )
        .await;
    }
    assert_eq!(drain(&ch, &q.name).await, ["low", "high"]);
}

/// Rejected without requeue → dead-lettered with `x-death` reason `rejected`, original
/// exchange and routing key kept.
async fn dead_letter_on_reject(t: &Target) {
    let (_conn, ch) = t.open().await;
    let (dlx, dlq) = dead_letter_target(t, &ch).await;
    let q = declare(&ch, t.queue("work").dead_letter(&dlx, None)).await;
    publish(&ch, "", &q.name, "poison").await;
    let mut m = get(&ch, &q.name).await.unwrap();
    within("reject", m.reject(false)).await.unwrap();
    let dead = get_eventually(&ch, &dlq).await;
    assert_eq!(text(&dead), "poison");
    assert_eq!(death_reason(&dead).as_deref(), Some("rejected"));
    assert_eq!(dead.delivery_info().exchange, dlx);
    assert_eq!(dead.delivery_info().routing_key, q.name);
    assert!(get(&ch, &q.name).await.is_none());
}

/// nack without requeue dead-letters too; `x-dead-letter-routing-key` replaces the key.
async fn dead_letter_on_nack_with_routing_key(t: &Target) {
    let (_conn, ch) = t.open().await;
    let dlx = t.exchange("direct", "dlx");
    let dlq = declare(
        &ch,
        t.queue("dlq").exchange(dlx.clone()).routing_key("dead"),
    )
    .await;
    let q = declare(&ch, t.queue("work").dead_letter(&dlx.name, Some("dead"))).await;
    publish(&ch, "", &q.name, "nacked").await;
    let mut m = get(&ch, &q.name).await.unwrap();
    within("nack", m.nack(false, false)).await.unwrap();
    let dead = get_eventually(&ch, &dlq.name).await;
    assert_eq!(text(&dead), "nacked");
    assert_eq!(dead.delivery_info().routing_key, "dead");
    assert_eq!(death_reason(&dead).as_deref(), Some("rejected"));
}

/// Requeued messages are not dead-lettered.
async fn requeue_does_not_dead_letter(t: &Target) {
    let (_conn, ch) = t.open().await;
    let (dlx, dlq) = dead_letter_target(t, &ch).await;
    let q = declare(&ch, t.queue("work").dead_letter(&dlx, None)).await;
    publish(&ch, "", &q.name, "retry").await;
    let mut m = get(&ch, &q.name).await.unwrap();
    within("requeue", m.requeue()).await.unwrap();
    let again = get_eventually(&ch, &q.name).await;
    assert!(again.redelivered());
    tokio::time::sleep(QUIET).await;
    assert!(get(&ch, &dlq).await.is_none());
}

/// A message that expires in a queue with a dead-letter exchange is dead-lettered with
/// reason `expired` (queue TTL), with nobody consuming.
async fn dead_letter_on_queue_ttl_expiry(t: &Target) {
    let (_conn, ch) = t.open().await;
    let (dlx, dlq) = dead_letter_target(t, &ch).await;
    let q = t
        .queue("ttl")
        .message_ttl(Duration::from_millis(100))
        .dead_letter(&dlx, None);
    let q = declare(&ch, q).await;
    publish(&ch, "", &q.name, "stale").await;
    // A consumer on the dead-letter queue: expiry must reach it without anyone touching
    // the original queue.
    let mut c = consumer(&ch, &Queue::new(dlq.as_str())).await;
    let dead = recv(&mut c).await;
    assert_eq!(text(&dead), "stale");
    assert_eq!(death_reason(&dead).as_deref(), Some("expired"));
}

/// Per-message expiration dead-letters with reason `expired` too.
async fn dead_letter_on_message_expiration(t: &Target) {
    let (_conn, ch) = t.open().await;
    let (dlx, dlq) = dead_letter_target(t, &ch).await;
    let q = declare(&ch, t.queue("work").dead_letter(&dlx, None)).await;
    let opts = PublishOptions::default().expiration(Duration::from_millis(50));
    publish_with(&ch, "", &q.name, "expiring", opts).await;
    let dead = get_eventually(&ch, &dlq).await;
    assert_eq!(text(&dead), "expiring");
    assert_eq!(death_reason(&dead).as_deref(), Some("expired"));
    // RabbitMQ drops the per-message expiration when dead-lettering.
    assert!(dead.properties().expiration.is_none());
}

/// A message dead-lettered on expiry wakes a consumer that was already waiting on the
/// dead-letter target (started, and idle, before the message was published): nothing else
/// touches either queue after the publish.
async fn expiry_dead_letter_wakes_waiting_consumer(t: &Target) {
    let (_conn, ch) = t.open().await;
    let target = declare(&ch, t.queue("dl-target")).await;
    let mut c = consumer(&ch, &target).await;
    let waiting = tokio::spawn(async move {
        let got = c.next_timeout(WAIT).await;
        (c, got)
    });
    // Let the consumer go idle on the empty target queue first.
    tokio::time::sleep(Duration::from_millis(100)).await;
    let source = t
        .queue("ttl")
        .message_ttl(Duration::from_millis(200))
        .dead_letter("", Some(&target.name));
    let source = declare(&ch, source).await;
    publish(&ch, "", &source.name, "expired-into-target").await;
    let (_c, got) = within("the waiting consumer", waiting).await.unwrap();
    let dead = match got {
        Ok(Some(m)) => m,
        Ok(None) => panic!("the consumer ended while a message was expected"),
        Err(e) => panic!("the waiting consumer got nothing within {WAIT:?}: {e}"),
    };
    assert_eq!(text(&dead), "expired-into-target");
    assert_eq!(death_reason(&dead).as_deref(), Some("expired"));
    assert_eq!(dead.delivery_info().routing_key, target.name);
}

/// `x-max-length` with the default overflow (drop-head): the oldest go.
async fn max_length_drops_head(t: &Target) {
    let (_conn, ch) = t.open_confirmed().await;
    let q = declare(&ch, t.queue("maxlen").max_length(3)).await;
    for i in 1..=5 {
        publish(&ch, "", &q.name, &i.to_string()).await;
    }
    assert_eq!(count(&ch, &q.name).await, 3);
    assert_eq!(drain(&ch, &q.name).await, ["3", "4", "5"]);
}

/// Dropped heads are dead-lettered with reason `maxlen`.
async fn max_length_dead_letters_dropped_head(t: &Target) {
    let (_conn, ch) = t.open().await;
    let (dlx, dlq) = dead_letter_target(t, &ch).await;
    let q = declare(&ch, t.queue("maxlen").max_length(2).dead_letter(&dlx, None)).await;
    for i in 1..=3 {
        publish(&ch, "", &q.name, &i.to_string()).await;
    }
    let dead = get_eventually(&ch, &dlq).await;
    assert_eq!(text(&dead), "1");
    assert_eq!(death_reason(&dead).as_deref(), Some("maxlen"));
    assert_eq!(drain(&ch, &q.name).await, ["2", "3"]);
}

/// `x-overflow: reject-publish`: new messages are refused (nacked under confirms).
async fn max_length_reject_publish_nacks(t: &Target) {
    let (_conn, ch) = t.open().await;
    within("confirm.select", ch.confirm_select()).await.unwrap();
    let q = t
        .queue("maxlen")
        .max_length(1)
        .argument("x-overflow", "reject-publish");
    let q = declare(&ch, q).await;
    publish(&ch, "", &q.name, "fits").await;
    let err = try_publish(&ch, "", &q.name, "refused", PublishOptions::default())
        .await
        .unwrap_err();
    assert!(matches!(err, Error::Nacked { .. }), "{err:?}");
    assert_eq!(drain(&ch, &q.name).await, ["fits"]);
}

/// Publisher confirms: a routed publish is confirmed (Ok).
async fn publisher_confirms_ack(t: &Target) {
    let (_conn, ch) = t.open_confirmed().await;
    let q = declare(&ch, t.queue("confirm")).await;
    for i in 0..20 {
        publish(&ch, "", &q.name, &i.to_string()).await;
    }
    // Unroutable but not mandatory: confirmed too.
    publish(&ch, "", &t.name("nowhere"), "dropped").await;
    assert_eq!(count(&ch, &q.name).await, 20);
}

/// Mandatory + confirms: an unroutable message comes back as `Error::Returned` (312).
async fn mandatory_unroutable_with_confirms_is_returned(t: &Target) {
    let (_conn, ch) = t.open().await;
    within("confirm.select", ch.confirm_select()).await.unwrap();
    let ex = t.exchange("direct", "mandatory");
    declare_exchange(&ch, &ex).await;
    let q = declare(
        &ch,
        t.queue("bound").exchange(ex.clone()).routing_key("known"),
    )
    .await;
    let opts = PublishOptions::default().mandatory(true);
    let err = try_publish(&ch, &ex.name, "unknown", "lost", opts.clone())
        .await
        .unwrap_err();
    match err {
        Error::Returned {
            reply_code,
            exchange,
            routing_key,
            ..
        } => {
            assert_eq!(reply_code, 312);
            assert_eq!(exchange, ex.name);
            assert_eq!(routing_key, "unknown");
        }
        other => panic!("expected Error::Returned, got {other:?}"),
    }
    // A routable mandatory publish succeeds, and the channel is still fine.
    try_publish(&ch, &ex.name, "known", "kept", opts.clone())
        .await
        .unwrap();
    // Default exchange, no such queue.
    let err = try_publish(&ch, "", &t.name("nowhere"), "lost", opts)
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            Error::Returned {
                reply_code: 312,
                ..
            }
        ),
        "{err:?}"
    );
    assert_eq!(drain(&ch, &q.name).await, ["kept"]);
}

/// Mandatory without confirms: the publish succeeds and the return reaches `on_return`.
async fn mandatory_unroutable_without_confirms_reaches_on_return(t: &Target) {
    let (_conn, ch) = t.open().await;
    let returned = Arc::new(Mutex::new(Vec::new()));
    let sink = returned.clone();
    let producer = Producer::new(&ch).on_return(move |r| {
        sink.lock()
            .unwrap()
            .push((r.reply_code, r.routing_key.clone(), r.body.clone()));
    });
    let key = t.name("nowhere");
    let opts = PublishOptions::default()
        .routing_key(key.as_str())
        .mandatory(true);
    within("publish", producer.publish("bounced", opts))
        .await
        .unwrap();
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        if let Some(r) = returned.lock().unwrap().first() {
            assert_eq!(r.0, 312);
            assert_eq!(r.1, key);
            assert_eq!(&r.2[..], b"bounced");
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "on_return never called"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Properties and headers travel end to end unchanged.
async fn properties_round_trip(t: &Target) {
    let (_conn, ch) = t.open().await;
    let q = declare(&ch, t.queue("props")).await;
    let opts = PublishOptions::default()
        .content_type("application/x-custom")
        .content_encoding("binary")
        .delivery_mode(DeliveryMode::Transient)
        .priority(4)
        .correlation_id("corr-1")
        .reply_to("replies")
        .message_id("msg-1")
        .timestamp(1_700_000_000)
        .kind("order.created")
        .app_id("kelp-tests")
        .header("s", "text")
        .header("i", 42i32)
        .header("b", true)
        .header("l", 1i64 << 40);
    publish_with(&ch, "", &q.name, "body", opts).await;
    let m = get(&ch, &q.name).await.unwrap();
    let p = m.properties();
    let s = |v: &Option<kelp::amqp::ShortString>| v.as_ref().map(|s| s.as_str().to_owned());
    assert_eq!(s(&p.content_type).as_deref(), Some("application/x-custom"));
    assert_eq!(s(&p.content_encoding).as_deref(), Some("binary"));
    assert_eq!(p.delivery_mode, Some(1));
    assert_eq!(p.priority, Some(4));
    assert_eq!(s(&p.correlation_id).as_deref(), Some("corr-1"));
    assert_eq!(s(&p.reply_to).as_deref(), Some("replies"));
    assert_eq!(s(&p.message_id).as_deref(), Some("msg-1"));
    assert_eq!(p.timestamp, Some(1_700_000_000));
    assert_eq!(s(&p.kind).as_deref(), Some("order.created"));
    assert_eq!(s(&p.app_id).as_deref(), Some("kelp-tests"));
    assert_eq!(header_str(&m, "s"), Some("text"));
    let h = m.headers().unwrap();
    assert_eq!(h.get("i").and_then(FieldValue::as_i64), Some(42));
    assert_eq!(h.get("b").and_then(FieldValue::as_bool), Some(true));
    assert_eq!(h.get("l").and_then(FieldValue::as_i64), Some(1 << 40));
    assert_eq!(text(&m), "body");
}

/// Kombu's defaults: persistent delivery mode; text bodies are `text/plain`/`utf-8`,
/// bytes are `application/data`/`binary`; an exchange's delivery mode applies.
async fn publish_defaults_match_kombu(t: &Target) {
    let (_conn, ch) = t.open().await;
    let q = declare(&ch, t.queue("defaults")).await;
    let p = Producer::new(&ch).routing_key(q.name.as_str());
    within("publish", p.publish("text", PublishOptions::default()))
        .await
        .unwrap();
    within(
        "publish",
        p.publish(vec![0u8, 159, 146, 150], PublishOptions::default()),
    )
    .await
    .unwrap();
    let ex = t
        .exchange("direct", "transient")
        .delivery_mode(DeliveryMode::Transient);
    let q2 = declare(&ch, t.queue("q2").exchange(ex.clone()).routing_key("k")).await;
    let p2 = Producer::new(&ch).exchange(ex).routing_key("k");
    within("publish", p2.publish("t", PublishOptions::default()))
        .await
        .unwrap();

    let m = get(&ch, &q.name).await.unwrap();
    assert_eq!(m.properties().delivery_mode, Some(2));
    assert_eq!(m.content_type(), Some("text/plain"));
    assert_eq!(m.content_encoding(), Some("utf-8"));
    assert_eq!(m.decode::<String>().unwrap(), "text");
    let m = get(&ch, &q.name).await.unwrap();
    assert_eq!(m.content_type(), Some("application/data"));
    assert_eq!(m.content_encoding(), Some("binary"));
    assert_eq!(&m.body()[..], &[0u8, 159, 146, 150]);
    let m = get(&ch, &q2.name).await.unwrap();
    assert_eq!(m.properties().delivery_mode, Some(1));
}

/// `immediate` is refused before anything is sent.
async fn immediate_is_refused(t: &Target) {
    let (_conn, ch) = t.open().await;
    let q = declare(&ch, t.queue("imm")).await;
    let err = try_publish(
        &ch,
        "",
        &q.name,
        "x",
        PublishOptions::default().immediate(true),
    )
    .await
    .unwrap_err();
    assert!(matches!(err, Error::ImmediateNotSupported), "{err:?}");
    assert!(get(&ch, &q.name).await.is_none());
}

/// Expiration 0: delivered if a consumer can take it at once, otherwise dropped
/// (RabbitMQ's replacement for `immediate`).
async fn expiration_zero_reaches_only_a_ready_consumer(t: &Target) {
    let (_conn, ch) = t.open().await;
    let idle = declare(&ch, t.queue("idle")).await;
    let zero = PublishOptions::default().expiration(Duration::ZERO);
    publish_with(&ch, "", &idle.name, "dropped", zero.clone()).await;
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert!(
        get(&ch, &idle.name).await.is_none(),
        "TTL-0 message kept with no consumer"
    );

    let busy = declare(&ch, t.queue("busy")).await;
    let mut c = consumer(&ch, &busy).await;
    tokio::time::sleep(Duration::from_millis(50)).await;
    publish_with(&ch, "", &busy.name, "taken", zero).await;
    let mut m = recv(&mut c).await;
    assert_eq!(text(&m), "taken");
    within("ack", m.ack()).await.unwrap();
}

/// `x-max-length-bytes` drops the oldest until the bodies fit.
async fn max_length_bytes_drops_head(t: &Target) {
    let (_conn, ch) = t.open_confirmed().await;
    let q = declare(&ch, t.queue("maxbytes").max_length_bytes(10)).await;
    for body in ["aaaa", "bbbb", "cccc"] {
        publish(&ch, "", &q.name, body).await;
    }
    assert_eq!(drain(&ch, &q.name).await, ["bbbb", "cccc"]);
}

/// `x-expires`: an unused queue is deleted after the idle time. (A passive declare
/// counts as use, on RabbitMQ as in memory, so probe only after the idle time.)
async fn queue_expires_when_unused(t: &Target) {
    let conn = t.connect().await;
    let ch = channel(&conn).await;
    let q = Queue::new(t.name("expiring"))
        .durable(false)
        .expires(Duration::from_millis(200));
    let q = declare(&ch, q).await;
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        tokio::time::sleep(Duration::from_millis(600)).await;
        let probe = channel(&conn).await;
        let mut passive = Queue::new(q.name.as_str()).passive(true);
        match within("passive", passive.declare(&probe)).await {
            Err(e) if e.reply_code() == Some(404) => break,
            Err(e) => panic!("{e:?}"),
            Ok(_) => assert!(
                std::time::Instant::now() < deadline,
                "x-expires queue never expired"
            ),
        }
    }
}

/// `x-death` counts repeated dead-letterings of the same (queue, reason), newest first.
async fn x_death_counts_repeated_dead_lettering(t: &Target) {
    let (_conn, ch) = t.open().await;
    let work = t.name("work");
    let dlx = t.exchange("fanout", "dlx");
    // The parking queue sends messages back to `work` after 50 ms.
    let parking = t
        .queue("parking")
        .exchange(dlx.clone())
        .message_ttl(Duration::from_millis(50))
        .dead_letter("", Some(&work));
    let parking = declare(&ch, parking).await;
    let mut wq = Queue::new(work.as_str())
        .durable(false)
        .dead_letter(&dlx.name, None);
    if !t.is_memory() {
        wq = wq.expires(Duration::from_secs(120));
    }
    let wq = declare(&ch, wq).await;
    publish(&ch, "", &wq.name, "boomerang").await;
    for round in 1..=2 {
        let mut m = get_eventually(&ch, &wq.name).await;
        assert_eq!(text(&m), "boomerang");
        if round == 2 {
            let deaths = match m.headers().and_then(|h| h.get("x-death")) {
                Some(FieldValue::Array(list)) => list.clone(),
                other => panic!("no x-death: {other:?}"),
            };
            let summary: Vec<(String, String, i64)> = deaths
                .iter()
                .map(|d| match d {
                    FieldValue::Table(t) => (
                        t.get("queue")
                            .and_then(FieldValue::as_str)
                            .unwrap_or("")
                            .to_owned(),
                        t.get("reason")
                            .and_then(FieldValue::as_str)
                            .unwrap_or("")
                            .to_owned(),
                        t.get("count").and_then(FieldValue::as_i64).unwrap_or(-1),
                    ),
                    other => panic!("x-death entry {other:?}"),
                })
                .collect();
            assert_eq!(
                summary,
                [
                    (parking.name.clone(), "expired".to_owned(), 1),
                    (wq.name.clone(), "rejected".to_owned(), 1),
                ]
            );
            assert_eq!(header_str(&m, "x-first-death-reason"), Some("rejected"));
            assert_eq!(
                header_str(&m, "x-first-death-queue"),
                Some(wq.name.as_str())
            );
            within("ack", m.ack()).await.unwrap();
            break;
        }
        within("reject", m.reject(false)).await.unwrap();
    }
}

/// Declare-ok reports ready messages and consumers.
async fn declare_ok_reports_counts(t: &Target) {
    let (_conn, ch) = t.open_confirmed().await;
    let q = declare(&ch, t.queue("counts")).await;
    for i in 0..4 {
        publish(&ch, "", &q.name, &i.to_string()).await;
    }
    let ok = within("declare", q.clone().declare(&ch)).await.unwrap();
    assert_eq!((ok.message_count, ok.consumer_count), (4, 0));
    let other = t.connect().await;
    let och = channel(&other).await;
    let empty = declare(&och, t.queue("empty")).await;
    let _c = consumer(&och, &empty).await;
    let ok = within("declare", empty.clone().declare(&ch)).await.unwrap();
    assert_eq!((ok.message_count, ok.consumer_count), (0, 1));
}

/// `x-overflow: reject-publish-dlx`: refused messages are nacked and dead-lettered.
async fn max_length_reject_publish_dlx(t: &Target) {
    let (_conn, ch) = t.open_confirmed().await;
    let (dlx, dlq) = dead_letter_target(t, &ch).await;
    let q = t
        .queue("maxlen")
        .max_length(1)
        .argument("x-overflow", "reject-publish-dlx")
        .dead_letter(&dlx, None);
    let q = declare(&ch, q).await;
    publish(&ch, "", &q.name, "fits").await;
    let err = try_publish(&ch, "", &q.name, "refused", PublishOptions::default())
        .await
        .unwrap_err();
    assert!(matches!(err, Error::Nacked { .. }), "{err:?}");
    let dead = get_eventually(&ch, &dlq).await;
    assert_eq!(text(&dead), "refused");
    assert_eq!(death_reason(&dead).as_deref(), Some("maxlen"));
    assert_eq!(drain(&ch, &q.name).await, ["fits"]);
}

/// Under confirms, a returned mandatory message is the publisher's error only: it does
/// not also reach `on_return`.
async fn returned_under_confirms_is_not_also_sent_to_on_return(t: &Target) {
    let (_conn, ch) = t.open_confirmed().await;
    let returned = Arc::new(Mutex::new(Vec::new()));
    let sink = returned.clone();
    let producer = Producer::new(&ch).on_return(move |r| sink.lock().unwrap().push(r.routing_key));
    let opts = PublishOptions::default()
        .routing_key(t.name("nowhere"))
        .mandatory(true);
    let err = within("publish", producer.publish("x", opts))
        .await
        .unwrap_err();
    assert!(matches!(err, Error::Returned { .. }), "{err:?}");
    tokio::time::sleep(QUIET).await;
    assert!(
        returned.lock().unwrap().is_empty(),
        "return delivered twice"
    );
}

/// Priorities apply to what waits in the queue when a consumer starts.
async fn priority_order_reaches_a_consumer(t: &Target) {
    let (_conn, ch) = t.open().await;
    let q = declare(&ch, t.queue("prio").max_priority(9)).await;
    for (body, p) in [("p1", 1u8), ("p7", 7), ("p4", 4)] {
        publish_with(
            &ch,
            "",
            &q.name,
            body,
            PublishOptions::default().priority(p),
        )
        .await;
    }
    let mut c = within(
        "consumer",
        kelp::Consumer::builder(&ch)
            .queue(q.clone())
            .auto_declare(false)
            .prefetch_count(1)
            .build(),
    )
    .await
    .unwrap();
    let mut got = Vec::new();
    for _ in 0..3 {
        let mut m = recv(&mut c).await;
        got.push(text(&m));
        within("ack", m.ack()).await.unwrap();
    }
    assert_eq!(got, ["p7", "p4", "p1"]);
}

/// Many confirmed publishes in flight at once on one channel all resolve, and all land.
async fn concurrent_confirmed_publishes(t: &Target) {
    let (_conn, ch) = t.open_confirmed().await;
    let q = declare(&ch, t.queue("concurrent")).await;
    let p = Producer::new(&ch).routing_key(q.name.as_str());
    let mut tasks = Vec::new();
    for w in 0..4 {
        let p = p.clone();
        tasks.push(tokio::spawn(async move {
            for i in 0..50 {
                p.publish(format!("{w}-{i}"), PublishOptions::default())
                    .await
                    .unwrap();
            }
        }));
    }
    for task in tasks {
        within("publisher", task).await.unwrap();
    }
    let got = drain(&ch, &q.name).await;
    assert_eq!(got.len(), 200);
    // Per publisher, FIFO.
    for w in 0..4 {
        let mine: Vec<&String> = got
            .iter()
            .filter(|b| b.starts_with(&format!("{w}-")))
            .collect();
        let want: Vec<String> = (0..50).map(|i| format!("{w}-{i}")).collect();
        assert_eq!(mine, want.iter().collect::<Vec<_>>());
    }
}

/// Concurrent mandatory publishes with the same exchange and routing key, some
/// routable (by their headers) and some not: exactly the unroutable ones are returned.
async fn concurrent_mandatory_returns_go_to_the_right_publish(t: &Target) {
    let (_conn, ch) = t.open_confirmed().await;
    let ex = t.exchange("headers", "h");
    declare_exchange(&ch, &ex).await;
    let q = declare(&ch, t.queue("q")).await;
    bind(
        &ch,
        &q,
        &ex.clone(),
        "",
        table(&[("x-match", "all"), ("route", "yes")]),
    )
    .await;
    let p = Producer::new(&ch).exchange(ex.clone()).auto_declare(false);
    let mut tasks = Vec::new();
    for i in 0..40 {
        let p = p.clone();
        let routable = i % 2 == 0;
        tasks.push(tokio::spawn(async move {
            let opts = PublishOptions::default()
                .routing_key("same")
                .mandatory(true)
                .header("route", if routable { "yes" } else { "no" });
            (routable, p.publish(format!("m{i}"), opts).await)
        }));
    }
    for task in tasks {
        let (routable, r) = within("publish", task).await.unwrap();
        if routable {
            assert!(r.is_ok(), "routable publish failed: {r:?}");
        } else {
            assert!(
                matches!(r, Err(Error::Returned { .. })),
                "unroutable: {r:?}"
            );
        }
    }
    assert_eq!(drain(&ch, &q.name).await.len(), 20);
}
