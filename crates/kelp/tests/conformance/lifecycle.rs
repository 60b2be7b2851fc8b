//! Entity and consumer lifecycle: purge, delete, server-side cancel, client cancel, and the
//! broker's refusals (404, 405, 406).

use std::sync::{Arc, Mutex};
use std::time::Duration;

use kelp::{Consumer, Error, Queue};

use crate::common::*;

conformance_tests! {
    purge_returns_count,
    #[not_on(redis; "N/A on redis: every name is a queue (lists spring into being) and exchanges live in the declaring process")]
    queue_delete_returns_count_and_removes_queue,
    #[not_on(redis; "N/A on redis: no queue ownership, auto-delete, consumer registry or queue arguments on Kombu's Redis transport")]
    queue_delete_if_empty_and_if_unused,
    #[not_on(redis; "N/A on redis: a queue is a list; deleting it from elsewhere cancels no consumer")]
    server_side_cancel_reaches_consumer_stream,
    #[not_on(redis; "N/A on redis: a queue is a list; deleting it from elsewhere cancels no consumer")]
    server_side_cancel_reaches_next,
    #[not_on(redis; "N/A on redis: a queue is a list; deleting it from elsewhere cancels no consumer")]
    server_side_cancel_reaches_drain_events,
    client_cancel_ends_stream,
    one_consumer_many_queues,
    competing_consumers_share_a_queue,
    passive_declare_of_missing_entities_is_404,
    #[not_on(redis; "N/A on redis: no queue ownership, auto-delete, consumer registry or queue arguments on Kombu's Redis transport")]
    redeclare_with_different_arguments_is_406,
    #[not_on(redis; "N/A on redis: no queue ownership, auto-delete, consumer registry or queue arguments on Kombu's Redis transport")]
    exclusive_queue_is_locked_to_its_connection,
    #[not_on(redis; "N/A on redis: no queue ownership, auto-delete, consumer registry or queue arguments on Kombu's Redis transport")]
    auto_delete_queue_goes_with_last_consumer,
    closing_the_channel_ends_the_consumer,
    callbacks_run_in_order,
    #[not_on(redis; "N/A on redis: a queue is a list; deleting it from elsewhere cancels no consumer")]
    ack_after_server_side_cancel_is_fine,
    ack_after_client_cancel_is_fine,
    dropping_a_consumer_stops_deliveries_to_it,
    #[not_on(redis; "N/A on redis: every name is a queue (lists spring into being) and exchanges live in the declaring process")]
    idempotent_deletes_and_404s,
    queue_names_server_generated_and_reserved,
    #[not_on(redis; "N/A on redis: no queue ownership, auto-delete, consumer registry or queue arguments on Kombu's Redis transport")]
    exclusive_queue_refuses_other_connections,
    auto_delete_queue_without_consumers_stays,
    #[not_on(redis; "N/A on redis: no queue ownership, auto-delete, consumer registry or queue arguments on Kombu's Redis transport")]
    single_active_consumer,
    #[not_on(redis; "N/A on redis: no queue ownership, auto-delete, consumer registry or queue arguments on Kombu's Redis transport")]
    consumer_priority_prefers_higher,
    waiting_consumers_share_round_robin,
    closing_the_connection_requeues_unacked,
    #[not_on(redis; "N/A on redis: a queue is a list; deleting it from elsewhere cancels no consumer")]
    server_cancel_of_one_queue_leaves_the_others,
    #[not_on(redis; "N/A on redis: a queue is a list; deleting it from elsewhere cancels no consumer")]
    consume_again_after_server_cancel_resumes,
    add_queue_and_cancel_by_queue,
    consumer_tags_and_delivery_info,
    producer_declares_before_publishing,
    consumer_purge_sums_queues,
}

/// `purge` removes the ready messages and says how many; unacked ones stay.
async fn purge_returns_count(t: &Target) {
    let (_conn, ch) = t.open_confirmed().await;
    let q = declare(&ch, t.queue("purge")).await;
    assert_eq!(within("purge", q.purge(&ch)).await.unwrap(), 0);
    for i in 0..6 {
        publish(&ch, "", &q.name, &i.to_string()).await;
    }
    let held = get(&ch, &q.name).await.unwrap();
    assert_eq!(within("purge", q.purge(&ch)).await.unwrap(), 5);
    assert!(get(&ch, &q.name).await.is_none());
    // The unacked one was not purged: it comes back when released.
    drop(held);
    within("recover", ch.recover(true)).await.unwrap();
    assert_eq!(text(&get_eventually(&ch, &q.name).await), "0");
}

/// `delete` says how many messages went; the queue is gone (passive declare: 404).
async fn queue_delete_returns_count_and_removes_queue(t: &Target) {
    let (conn, ch) = t.open_confirmed().await;
    let q = declare(&ch, t.queue("delete")).await;
    for i in 0..3 {
        publish(&ch, "", &q.name, &i.to_string()).await;
    }
    assert_eq!(count(&ch, &q.name).await, 3);
    assert_eq!(
        within("delete", q.delete(&ch, false, false)).await.unwrap(),
        3
    );
    let ch2 = channel(&conn).await;
    let err = within(
        "passive",
        Queue::new(q.name.as_str()).passive(true).declare(&ch2),
    )
    .await
    .unwrap_err();
    assert_eq!(err.reply_code(), Some(404), "{err:?}");
    // Publishing to it now goes nowhere; re-declaring makes a fresh, empty queue.
    let ch3 = channel(&conn).await;
    publish(&ch3, "", &q.name, "lost").await;
    let mut again = Queue::new(q.name.as_str()).durable(false);
    if !t.is_memory() {
        again = again.expires(Duration::from_secs(120));
    }
    let again = declare(&ch3, again).await;
    assert!(get(&ch3, &again.name).await.is_none());
    within("delete", again.delete(&ch3, false, false))
        .await
        .unwrap();
}

/// `delete(if_empty)` refuses a queue with messages (406), `if_unused` one with consumers.
async fn queue_delete_if_empty_and_if_unused(t: &Target) {
    let conn = t.connect().await;
    let ch = channel(&conn).await;
    let q = declare(&ch, t.queue("cond")).await;
    publish(&ch, "", &q.name, "x").await;
    let err = within("delete", q.delete(&ch, false, true))
        .await
        .unwrap_err();
    assert_eq!(err.reply_code(), Some(406), "{err:?}");
    let ch = channel(&conn).await;
    let _c = consumer(&ch, &q).await;
    let ch2 = channel(&conn).await;
    let err = within("delete", q.delete(&ch2, true, false))
        .await
        .unwrap_err();
    assert_eq!(err.reply_code(), Some(406), "{err:?}");
}

/// Deleting the queue a consumer reads reaches that consumer as
/// `Err(Error::ConsumerCancelled)`, never as silence.
async fn server_side_cancel_reaches_consumer_stream(t: &Target) {
    let (conn, ch) = t.open().await;
    let q = declare(&ch, t.queue("cancelled")).await;
    let mut c = consumer(&ch, &q).await;
    publish(&ch, "", &q.name, "before").await;
    let mut m = recv(&mut c).await;
    within("ack", m.ack()).await.unwrap();

    let other = channel(&conn).await;
    within("delete", q.delete(&other, false, false))
        .await
        .unwrap();
    match within("next", c.next_timeout(WAIT)).await {
        Err(Error::ConsumerCancelled { queue, .. }) => assert_eq!(queue, q.name),
        Err(Error::Timeout { .. }) => panic!("queue deleted but the consumer heard nothing"),
        other => panic!("expected Error::ConsumerCancelled, got {other:?}"),
    }
    // After the cancel the stream ends.
    match within("next", c.next_timeout(QUIET)).await {
        Ok(None) | Err(Error::Timeout { .. }) => {}
        other => panic!("after the cancel: {other:?}"),
    }
    assert!(!c.consuming_from(&q.name).await);
    // The channel is still usable.
    let q2 = declare(&ch, t.queue("after")).await;
    publish(&ch, "", &q2.name, "ok").await;
    assert_eq!(drain(&ch, &q2.name).await, ["ok"]);
}

/// The same through `next()`: `Some(Err(ConsumerCancelled))`.
async fn server_side_cancel_reaches_next(t: &Target) {
    let (conn, ch) = t.open().await;
    let q = declare(&ch, t.queue("cancelled")).await;
    let mut c = consumer(&ch, &q).await;
    let other = channel(&conn).await;
    let waiter = tokio::spawn(async move {
        let r = c.next().await;
        (c, r)
    });
    tokio::time::sleep(Duration::from_millis(100)).await;
    within("delete", q.delete(&other, false, false))
        .await
        .unwrap();
    let (_c, r) = within("next", waiter).await.unwrap();
    match r {
        Some(Err(Error::ConsumerCancelled { .. })) => {}
        other => panic!("expected Some(Err(ConsumerCancelled)), got {other:?}"),
    }
}

/// Through callbacks, the server-side cancel comes out of `drain_events` as an error.
async fn server_side_cancel_reaches_drain_events(t: &Target) {
    let (conn, ch) = t.open().await;
    let q = declare(&ch, t.queue("cancelled")).await;
    let mut c = within(
        "consumer",
        Consumer::builder(&ch)
            .queue(q.clone())
            .auto_declare(false)
            .callback(|_b, m| Box::pin(async move { m.ack_log_error().await }))
            .build(),
    )
    .await
    .unwrap();
    let other = channel(&conn).await;
    within("delete", q.delete(&other, false, false))
        .await
        .unwrap();
    match within("drain_events", c.drain_events(Some(WAIT))).await {
        Err(Error::ConsumerCancelled { .. }) => {}
        other => panic!("expected Err(ConsumerCancelled), got {other:?}"),
    }
}

/// A client-side cancel ends the stream after what was already delivered; the queue
/// keeps what was not.
async fn client_cancel_ends_stream(t: &Target) {
    let (_conn, ch) = t.open().await;
    let q = declare(&ch, t.queue("cancel")).await;
    let mut c = within(
        "consumer",
        Consumer::builder(&ch)
            .queue(q.clone())
            .auto_declare(false)
            .prefetch_count(1)
            .build(),
    )
    .await
    .unwrap();
    for i in 0..3 {
        publish(&ch, "", &q.name, &i.to_string()).await;
    }
    let mut m = recv(&mut c).await;
    assert_eq!(text(&m), "0");
    within("cancel", c.cancel()).await.unwrap();
    within("ack", m.ack()).await.unwrap();
    assert!(!c.consuming_from(&q.name).await);
    match within("next", c.next_timeout(WAIT)).await {
        Ok(None) => {}
        other => panic!("expected the stream to end, got {other:?}"),
    }
    assert_eq!(drain(&ch, &q.name).await, ["1", "2"]);
}

/// Several queues on one consumer: messages from all of them come through.
async fn one_consumer_many_queues(t: &Target) {
    let (_conn, ch) = t.open().await;
    let qa = declare(&ch, t.queue("a")).await;
    let qb = declare(&ch, t.queue("b")).await;
    let mut c = within(
        "consumer",
        Consumer::builder(&ch)
            .queues([qa.clone(), qb.clone()])
            .auto_declare(false)
            .build(),
    )
    .await
    .unwrap();
    publish(&ch, "", &qa.name, "from-a").await;
    publish(&ch, "", &qb.name, "from-b").await;
    let mut got = Vec::new();
    for _ in 0..2 {
        let mut m = recv(&mut c).await;
        got.push((text(&m), m.delivery_info().routing_key.to_owned()));
        within("ack", m.ack()).await.unwrap();
    }
    got.sort();
    assert_eq!(
        got,
        [
            ("from-a".to_owned(), qa.name.clone()),
            ("from-b".to_owned(), qb.name.clone())
        ]
    );
    assert_eq!(c.consumer_tags().await.len(), 2);
}

/// Two consumers on one queue share it round-robin: each message goes to one of them.
async fn competing_consumers_share_a_queue(t: &Target) {
    let conn = t.connect().await;
    let (ch1, ch2) = (channel(&conn).await, channel(&conn).await);
    let q = declare(&ch1, t.queue("shared")).await;
    let mk = |ch: kelp::Channel, q: Queue| async move {
        within(
            "consumer",
            Consumer::builder(&ch)
                .queue(q)
                .auto_declare(false)
                .prefetch_count(1)
                .build(),
        )
        .await
        .unwrap()
    };
    let mut c1 = mk(ch1.clone(), q.clone()).await;
    let mut c2 = mk(ch2.clone(), q.clone()).await;
    for i in 0..4 {
        publish(&ch1, "", &q.name, &i.to_string()).await;
    }
    let mut a = recv(&mut c1).await;
    let mut b = recv(&mut c2).await;
    assert_ne!(text(&a), text(&b));
    within("ack", a.ack()).await.unwrap();
    within("ack", b.ack()).await.unwrap();
    let mut rest = Vec::new();
    let mut a = recv(&mut c1).await;
    let mut b = recv(&mut c2).await;
    rest.push(text(&a));
    rest.push(text(&b));
    within("ack", a.ack()).await.unwrap();
    within("ack", b.ack()).await.unwrap();
    rest.sort();
    assert_eq!(rest, ["2", "3"]);
}

/// Passive declares of missing entities are 404.
async fn passive_declare_of_missing_entities_is_404(t: &Target) {
    let conn = t.connect().await;
    let ch = channel(&conn).await;
    let err = within("passive", ch.get_queue(&t.name("nope"), true))
        .await
        .unwrap_err();
    assert_eq!(err.reply_code(), Some(404), "{err:?}");
    let ch = channel(&conn).await;
    let err = within("passive", ch.get_exchange(&t.name("nope"), true))
        .await
        .unwrap_err();
    assert_eq!(err.reply_code(), Some(404), "{err:?}");
    // Existing ones pass.
    let ch = channel(&conn).await;
    let q = declare(&ch, t.queue("there")).await;
    within("passive", ch.get_queue(&q.name, true))
        .await
        .unwrap();
    within("passive", ch.get_exchange("amq.topic", true))
        .await
        .unwrap();
}

/// Re-declaring with different settings is 406 PRECONDITION_FAILED.
async fn redeclare_with_different_arguments_is_406(t: &Target) {
    let conn = t.connect().await;
    let ch = channel(&conn).await;
    let q = declare(&ch, t.queue("args").max_length(10)).await;
    let mut changed = q.clone().max_length(20);
    let err = within("declare", changed.declare(&ch)).await.unwrap_err();
    assert_eq!(err.reply_code(), Some(406), "{err:?}");
    let ch = channel(&conn).await;
    let ex = t.exchange("direct", "kind");
    declare_exchange(&ch, &ex).await;
    let err = within("declare", ex.clone().kind("fanout").declare(&ch))
        .await
        .unwrap_err();
    assert_eq!(err.reply_code(), Some(406), "{err:?}");
    // Same settings again: fine.
    let ch = channel(&conn).await;
    let mut same = q.clone();
    within("declare", same.declare(&ch)).await.unwrap();
    delete_exchanges(&ch, &[&ex]).await;
}

/// An exclusive queue belongs to its connection: others get 405 RESOURCE_LOCKED, and it
/// goes away when its connection closes.
async fn exclusive_queue_is_locked_to_its_connection(t: &Target) {
    let owner = t.connect().await;
    let ch = channel(&owner).await;
    let q = declare(&ch, Queue::server_named().durable(false)).await;
    assert!(!q.name.is_empty());
    let other = t.connect().await;
    let och = channel(&other).await;
    let err = within(
        "consume",
        Consumer::builder(&och)
            .queue(Queue::new(q.name.as_str()))
            .auto_declare(false)
            .build(),
    )
    .await
    .unwrap_err();
    assert_eq!(err.reply_code(), Some(405), "{err:?}");
    within("close", owner.close()).await.unwrap();
    let och = channel(&other).await;
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        let r = within(
            "passive",
            Queue::new(q.name.as_str()).passive(true).declare(&och),
        )
        .await;
        match r {
            Err(e) if e.reply_code() == Some(404) => break,
            _ => {
                assert!(
                    std::time::Instant::now() < deadline,
                    "exclusive queue outlived its connection"
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

/// An auto-delete queue goes when its last consumer cancels.
async fn auto_delete_queue_goes_with_last_consumer(t: &Target) {
    let conn = t.connect().await;
    let ch = channel(&conn).await;
    let q = declare(&ch, t.queue("auto").auto_delete(true)).await;
    let c = consumer(&ch, &q).await;
    within("close", c.close()).await.unwrap();
    let ch2 = channel(&conn).await;
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        let r = within(
            "passive",
            Queue::new(q.name.as_str()).passive(true).declare(&ch2),
        )
        .await;
        match r {
            Err(e) if e.reply_code() == Some(404) => break,
            Err(e) => panic!("{e:?}"),
            Ok(_) => {
                assert!(
                    std::time::Instant::now() < deadline,
                    "auto-delete queue stayed"
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

/// Closing the connection ends consumers' streams (None or an error, never a hang).
async fn closing_the_channel_ends_the_consumer(t: &Target) {
    let (_conn, ch) = t.open().await;
    let q = declare(&ch, t.queue("closing")).await;
    let mut c = consumer(&ch, &q).await;
    within("close", ch.close()).await.unwrap();
    let r = within("next", c.next_timeout(WAIT)).await;
    assert!(
        matches!(
            r,
            Ok(None)
                | Err(Error::Closed { .. })
                | Err(Error::Amqp(_))
                | Err(Error::ConsumerCancelled { .. })
        ),
        "{r:?}"
    );
}

/// Callbacks run for each message through `Consumer::drain_events`, in order.
async fn callbacks_run_in_order(t: &Target) {
    let (_conn, ch) = t.open().await;
    let q = declare(&ch, t.queue("cb")).await;
    let seen = Arc::new(Mutex::new(Vec::new()));
    let sink = seen.clone();
    let mut c = within(
        "consumer",
        Consumer::builder(&ch)
            .queue(q.clone())
            .auto_declare(false)
            .callback(move |body, m| {
                let sink = sink.clone();
                let v = body.as_i64();
                Box::pin(async move {
                    sink.lock().unwrap().push(v);
                    m.ack_log_error().await;
                })
            })
            .build(),
    )
    .await
    .unwrap();
    let p = kelp::Producer::new(&ch).routing_key(q.name.as_str());
    for i in 0..5 {
        within("publish", p.publish_serde(&i, Default::default()))
            .await
            .unwrap();
    }
    for _ in 0..5 {
        assert!(within("drain", c.drain_events(Some(WAIT))).await.unwrap());
    }
    assert_eq!(
        *seen.lock().unwrap(),
        [Some(0), Some(1), Some(2), Some(3), Some(4)]
    );
    let r = within("drain", c.drain_events(Some(QUIET))).await;
    assert!(matches!(r, Err(Error::Timeout { .. })), "{r:?}");
}

/// Messages a consumer received stay ackable after the broker cancelled it (queue
/// deleted): RabbitMQ accepts the ack and the channel stays open.
async fn ack_after_server_side_cancel_is_fine(t: &Target) {
    let (conn, ch) = t.open().await;
    let q = declare(&ch, t.queue("gone")).await;
    publish(&ch, "", &q.name, "held").await;
    let mut c = consumer(&ch, &q).await;
    let mut m = recv(&mut c).await;
    let other = channel(&conn).await;
    within("delete", q.delete(&other, false, false))
        .await
        .unwrap();
    let r = within("next", c.next_timeout(WAIT)).await;
    assert!(matches!(r, Err(Error::ConsumerCancelled { .. })), "{r:?}");
    within("ack", m.ack()).await.unwrap();
    let q2 = declare(&ch, t.queue("after")).await;
    publish(&ch, "", &q2.name, "ok").await;
    assert_eq!(
        drain(&ch, &q2.name).await,
        ["ok"],
        "channel broken after the ack"
    );
}

/// Messages received before a client-side cancel can still be acked.
async fn ack_after_client_cancel_is_fine(t: &Target) {
    let (conn, ch) = t.open().await;
    let q = declare(&ch, t.queue("cancel")).await;
    publish(&ch, "", &q.name, "held").await;
    let mut c = consumer(&ch, &q).await;
    let mut m = recv(&mut c).await;
    within("cancel", c.cancel()).await.unwrap();
    within("ack", m.ack()).await.unwrap();
    within("close", ch.close()).await.unwrap();
    let ch2 = channel(&conn).await;
    assert!(
        get(&ch2, &q.name).await.is_none(),
        "acked message came back"
    );
}

/// Dropping a consumer stops deliveries to it: later messages go to others, not into
/// a stream nobody reads.
async fn dropping_a_consumer_stops_deliveries_to_it(t: &Target) {
    let (conn, ch) = t.open().await;
    let q = declare(&ch, t.queue("dropped")).await;
    let c = consumer(&ch, &q).await;
    drop(c);
    tokio::time::sleep(Duration::from_millis(100)).await;
    publish(&ch, "", &q.name, "after-drop").await;
    let other = channel(&conn).await;
    assert_eq!(text(&get_eventually(&other, &q.name).await), "after-drop");
}

/// Deleting or unbinding what is not there is not an error (RabbitMQ: idempotent);
/// purging or binding what is not there is a 404.
async fn idempotent_deletes_and_404s(t: &Target) {
    let conn = t.connect().await;
    let ch = channel(&conn).await;
    let missing_q = Queue::new(t.name("missing-q"));
    assert_eq!(
        within("delete", missing_q.delete(&ch, false, false))
            .await
            .unwrap(),
        0
    );
    let missing_x = kelp::Exchange::direct(t.name("missing-x"));
    within("delete", missing_x.delete(&ch, false))
        .await
        .unwrap();
    let ex = t.exchange("direct", "x");
    let q = declare(&ch, t.queue("q").exchange(ex.clone()).routing_key("k")).await;
    let none = kelp::amqp::FieldTable::new();
    within(
        "unbind",
        q.unbind_from(&ch, &ex.name, "never-bound", none.clone()),
    )
    .await
    .unwrap();
    let err = within("purge", missing_q.purge(&ch)).await.unwrap_err();
    assert_eq!(err.reply_code(), Some(404), "{err:?}");
    let ch = channel(&conn).await;
    let err = within("bind", q.bind_to(&ch, &missing_x.name, "k", none.clone()))
        .await
        .unwrap_err();
    assert_eq!(err.reply_code(), Some(404), "{err:?}");
    let ch = channel(&conn).await;
    let err = within("bind", missing_q.bind_to(&ch, &ex.name, "k", none))
        .await
        .unwrap_err();
    assert_eq!(err.reply_code(), Some(404), "{err:?}");
}

/// Server-named queues are `amq.gen-…`; user queues may not start with `amq.` (RabbitMQ
/// 3.x answers 404 for a queue of that name that does not exist, later versions 403).
async fn queue_names_server_generated_and_reserved(t: &Target) {
    let conn = t.connect().await;
    let ch = channel(&conn).await;
    let q = declare(&ch, Queue::server_named().durable(false)).await;
    assert!(q.name.starts_with("amq.gen-"), "{}", q.name);
    let err = within(
        "declare",
        Queue::new(format!("amq.{}", t.name("q")))
            .durable(false)
            .declare(&ch),
    )
    .await
    .unwrap_err();
    assert!(matches!(err.reply_code(), Some(403 | 404)), "{err:?}");
}

/// Another connection may publish to an exclusive queue, but not get from, purge,
/// delete or passively declare it (405).
async fn exclusive_queue_refuses_other_connections(t: &Target) {
    let owner = t.connect().await;
    let och = channel(&owner).await;
    let q = declare(&och, Queue::server_named().durable(false)).await;
    let other = t.connect().await;
    let ch = channel(&other).await;
    publish(&ch, "", &q.name, "allowed").await;
    let err = within("get", q.get(&ch, false)).await.unwrap_err();
    assert_eq!(err.reply_code(), Some(405), "get: {err:?}");
    let ch = channel(&other).await;
    let err = within("purge", q.purge(&ch)).await.unwrap_err();
    assert_eq!(err.reply_code(), Some(405), "purge: {err:?}");
    let ch = channel(&other).await;
    let err = within(
        "passive",
        Queue::new(q.name.as_str()).passive(true).declare(&ch),
    )
    .await
    .unwrap_err();
    assert_eq!(err.reply_code(), Some(405), "passive declare: {err:?}");
    let ch = channel(&other).await;
    let err = within("delete", q.delete(&ch, false, false))
        .await
        .unwrap_err();
    assert_eq!(err.reply_code(), Some(405), "delete: {err:?}");
    assert_eq!(drain(&och, &q.name).await, ["allowed"]);
}

/// An auto-delete queue that never had a consumer stays.
async fn auto_delete_queue_without_consumers_stays(t: &Target) {
    let (_conn, ch) = t.open().await;
    let q = declare(&ch, t.queue("auto").auto_delete(true)).await;
    publish(&ch, "", &q.name, "x").await;
    tokio::time::sleep(QUIET).await;
    assert_eq!(drain(&ch, &q.name).await, ["x"]);
}

/// `x-single-active-consumer`: only the first consumer gets messages, even while the
/// second one waits; when the first goes the second takes over.
async fn single_active_consumer(t: &Target) {
    let conn = t.connect().await;
    let (ch1, ch2) = (channel(&conn).await, channel(&conn).await);
    let q = declare(
        &ch1,
        t.queue("sac").argument("x-single-active-consumer", true),
    )
    .await;
    let mut first = consumer(&ch1, &q).await;
    let second = consumer(&ch2, &q).await;
    let waiting = collect_in_background(second, Duration::from_millis(500), QUIET, Duration::ZERO);
    tokio::time::sleep(Duration::from_millis(50)).await;
    for i in 0..4 {
        publish(&ch1, "", &q.name, &i.to_string()).await;
    }
    for i in 0..4 {
        let mut m = recv(&mut first).await;
        assert_eq!(text(&m), i.to_string());
        within("ack", m.ack()).await.unwrap();
    }
    let (mut second, stolen) = within("background", waiting).await.unwrap();
    assert!(stolen.is_empty(), "the inactive consumer got {stolen:?}");
    within("close", first.close()).await.unwrap();
    publish(&ch1, "", &q.name, "next").await;
    let mut m = recv(&mut second).await;
    assert_eq!(text(&m), "next");
    within("ack", m.ack()).await.unwrap();
}

/// Consumer priorities (`x-priority`): the higher-priority consumer gets the messages
/// while it has room, even though a lower one is waiting too.
async fn consumer_priority_prefers_higher(t: &Target) {
    let conn = t.connect().await;
    let (ch_low, ch_high) = (channel(&conn).await, channel(&conn).await);
    let q = declare(&ch_low, t.queue("prio-consumers")).await;
    let low = consumer(&ch_low, &q).await;
    let mut high = consumer(&ch_high, &q.clone().consumer_argument("x-priority", 10i32)).await;
    let waiting = collect_in_background(low, Duration::from_millis(500), QUIET, Duration::ZERO);
    tokio::time::sleep(Duration::from_millis(50)).await;
    for i in 0..5 {
        publish(&ch_low, "", &q.name, &i.to_string()).await;
    }
    for i in 0..5 {
        let mut m = recv(&mut high).await;
        assert_eq!(text(&m), i.to_string());
        within("ack", m.ack()).await.unwrap();
    }
    let (_low, stolen) = within("background", waiting).await.unwrap();
    assert!(
        stolen.is_empty(),
        "the low-priority consumer got {stolen:?}"
    );
}

/// Two waiting consumers on one queue share it: both get messages (round-robin).
async fn waiting_consumers_share_round_robin(t: &Target) {
    let conn = t.connect().await;
    let (ch1, ch2) = (channel(&conn).await, channel(&conn).await);
    let q = declare(&ch1, t.queue("rr")).await;
    // Each holds a message for a moment, as a worker would, so both get the chance.
    let hold = Duration::from_millis(20);
    let wait = Duration::from_millis(500);
    let a = collect_in_background(consumer(&ch1, &q).await, wait, QUIET, hold);
    let b = collect_in_background(consumer(&ch2, &q).await, wait, QUIET, hold);
    tokio::time::sleep(Duration::from_millis(50)).await;
    for i in 0..10 {
        publish(&ch1, "", &q.name, &i.to_string()).await;
    }
    let (_a, got_a) = within("a", a).await.unwrap();
    let (_b, got_b) = within("b", b).await.unwrap();
    assert_eq!(got_a.len() + got_b.len(), 10, "{got_a:?} {got_b:?}");
    assert!(
        !got_a.is_empty() && !got_b.is_empty(),
        "one consumer got everything: {got_a:?} {got_b:?}"
    );
}

/// Closing a connection ends its consumers and returns their unacked messages.
async fn closing_the_connection_requeues_unacked(t: &Target) {
    let conn = t.connect().await;
    let ch = channel(&conn).await;
    let q = declare(&ch, t.queue("conn-close")).await;
    publish(&ch, "", &q.name, "held").await;
    let mut c = consumer(&ch, &q).await;
    let _m = recv(&mut c).await;
    within("close", conn.close()).await.unwrap();
    assert!(conn.is_closed());
    let r = within("next", c.next_timeout(WAIT)).await;
    assert!(
        !matches!(r, Err(Error::Timeout { .. }) | Ok(Some(_))),
        "{r:?}"
    );
    let conn2 = t.connect().await;
    let ch2 = channel(&conn2).await;
    let m = get_eventually(&ch2, &q.name).await;
    assert!(m.redelivered());
    // Opening a channel on the closed connection fails.
    assert!(within("channel", conn.channel()).await.is_err());
}

/// A consumer of two queues whose one queue is deleted reports the cancel for that
/// queue and keeps delivering from the other.
async fn server_cancel_of_one_queue_leaves_the_others(t: &Target) {
    let (conn, ch) = t.open().await;
    let qa = declare(&ch, t.queue("a")).await;
    let qb = declare(&ch, t.queue("b")).await;
    let mut c = within(
        "consumer",
        Consumer::builder(&ch)
            .queues([qa.clone(), qb.clone()])
            .auto_declare(false)
            .build(),
    )
    .await
    .unwrap();
    let other = channel(&conn).await;
    within("delete", qa.delete(&other, false, false))
        .await
        .unwrap();
    match within("next", c.next_timeout(WAIT)).await {
        Err(Error::ConsumerCancelled { queue, .. }) => assert_eq!(queue, qa.name),
        other => panic!("expected the cancel of {}, got {other:?}", qa.name),
    }
    assert!(!c.consuming_from(&qa.name).await);
    assert!(c.consuming_from(&qb.name).await);
    publish(&ch, "", &qb.name, "still-here").await;
    let mut m = recv(&mut c).await;
    assert_eq!(text(&m), "still-here");
    within("ack", m.ack()).await.unwrap();
}

/// After a server-side cancel, `consume()` re-declares the queue and resumes.
async fn consume_again_after_server_cancel_resumes(t: &Target) {
    let (conn, ch) = t.open().await;
    let q = t.queue("phoenix");
    let mut c = within("consumer", Consumer::builder(&ch).queue(q.clone()).build())
        .await
        .unwrap();
    let other = channel(&conn).await;
    within("delete", q.delete(&other, false, false))
        .await
        .unwrap();
    let r = within("next", c.next_timeout(WAIT)).await;
    assert!(matches!(r, Err(Error::ConsumerCancelled { .. })), "{r:?}");
    within("consume", c.consume()).await.unwrap();
    assert!(c.consuming_from(&q.name).await);
    publish(&other, "", &q.name, "reborn").await;
    let mut m = recv(&mut c).await;
    assert_eq!(text(&m), "reborn");
    within("ack", m.ack()).await.unwrap();
}

/// `add_queue` on an active consumer starts consuming it; `cancel_by_queue` stops only
/// that queue.
async fn add_queue_and_cancel_by_queue(t: &Target) {
    let (_conn, ch) = t.open().await;
    let qa = declare(&ch, t.queue("a")).await;
    let qb = declare(&ch, t.queue("b")).await;
    let mut c = consumer(&ch, &qa).await;
    within("add_queue", c.add_queue(qb.clone())).await.unwrap();
    assert!(c.consuming_from(&qb.name).await);
    publish(&ch, "", &qb.name, "from-b").await;
    let mut m = recv(&mut c).await;
    assert_eq!(text(&m), "from-b");
    within("ack", m.ack()).await.unwrap();
    within("cancel_by_queue", c.cancel_by_queue(&qb.name))
        .await
        .unwrap();
    assert!(!c.consuming_from(&qb.name).await);
    publish(&ch, "", &qb.name, "stays").await;
    publish(&ch, "", &qa.name, "from-a").await;
    let mut m = recv(&mut c).await;
    assert_eq!(text(&m), "from-a");
    within("ack", m.ack()).await.unwrap();
    recv_nothing(&mut c).await;
    assert_eq!(drain(&ch, &qb.name).await, ["stays"]);
}

/// Consumer tags: a `tag_prefix` names them, and deliveries carry their consumer's tag.
async fn consumer_tags_and_delivery_info(t: &Target) {
    let (_conn, ch) = t.open().await;
    let q = declare(&ch, t.queue("tags")).await;
    let mut c = within(
        "consumer",
        Consumer::builder(&ch)
            .queue(q.clone())
            .auto_declare(false)
            .tag_prefix("worker")
            .build(),
    )
    .await
    .unwrap();
    let tags = c.consumer_tags().await;
    assert_eq!(tags.len(), 1);
    assert!(tags[0].starts_with("worker-"), "{tags:?}");
    publish(&ch, "", &q.name, "x").await;
    let mut m = recv(&mut c).await;
    let info = m.delivery_info();
    assert_eq!(info.consumer_tag, tags[0]);
    assert_eq!(info.exchange, "");
    assert_eq!(info.routing_key, q.name);
    assert!(!info.redelivered);
    within("ack", m.ack()).await.unwrap();
}

/// `PublishOptions::declare` and a producer's exchange are declared before the publish.
async fn producer_declares_before_publishing(t: &Target) {
    let (_conn, ch) = t.open().await;
    let ex = t.exchange("topic", "auto");
    let q = t.queue("declared").exchange(ex.clone()).routing_key("a.*");
    let p = kelp::Producer::new(&ch).exchange(ex.clone());
    let opts = kelp::PublishOptions::default()
        .routing_key("a.b")
        .declare(q.clone());
    within("publish", p.publish("first", opts)).await.unwrap();
    within("passive", ch.get_exchange(&ex.name, true))
        .await
        .unwrap();
    assert_eq!(drain(&ch, &q.name).await, ["first"]);
}

/// Consumer-level purge sums over its queues.
async fn consumer_purge_sums_queues(t: &Target) {
    let (_conn, ch) = t.open_confirmed().await;
    let qa = declare(&ch, t.queue("a")).await;
    let qb = declare(&ch, t.queue("b")).await;
    for i in 0..3 {
        publish(&ch, "", &qa.name, &i.to_string()).await;
        publish(&ch, "", &qb.name, &i.to_string()).await;
    }
    let c = Consumer::builder(&ch)
        .queues([qa.clone(), qb.clone()])
        .build_idle()
        .unwrap();
    assert_eq!(within("purge", c.purge()).await.unwrap(), 6);
    assert!(get(&ch, &qa.name).await.is_none());
}
