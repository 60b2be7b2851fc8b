//! Ordering, acknowledgement, rejection, requeue, nack, basic.get and prefetch.

use std::time::Duration;

use kelp::{Consumer, Error, MessageState};

use crate::common::*;

conformance_tests! {
    fifo_per_queue,
    basic_get_in_order_then_none,
    basic_get_no_ack,
    ack_removes_message,
    settling_twice_is_an_error,
    unacked_returns_redelivered_when_channel_closes,
    requeue_redelivers_with_flag,
    #[not_on(redis; "N/A on redis: Kombu requeues with LPUSH, after what is already queued")]
    requeue_goes_back_to_the_head,
    reject_without_requeue_drops,
    nack_multiple_requeues_all_earlier,
    nack_single_without_requeue_drops_only_it,
    ack_multiple_acks_all_earlier,
    recover_redelivers_unacked,
    prefetch_limits_unacked_deliveries,
    #[not_on(redis; "N/A on redis: Kombu's Redis QoS is per channel")]
    prefetch_is_per_consumer,
    prefetch_zero_is_unlimited,
    no_ack_consumer_ignores_prefetch,
    #[not_on(redis; "N/A on redis: Kombu requeues with LPUSH, after what is already queued")]
    nack_multiple_requeues_in_original_order,
    #[not_on(redis; "N/A on redis: Kombu requeues with LPUSH, after what is already queued")]
    individual_requeues_restore_original_order,
    prefetch_global_limits_the_channel,
    #[not_on(redis; "N/A on redis: Kombu's Redis QoS is per channel")]
    prefetch_change_applies_to_new_consumers,
    #[not_on(redis; "N/A on redis: no AMQP channel-level errors on Redis")]
    ack_of_settled_tag_closes_the_channel,
    #[not_on(redis; "N/A on redis: no AMQP channel-level errors on Redis")]
    channel_error_closes_the_channel,
    ack_after_channel_close_is_an_error,
    #[not_on(redis; "N/A on redis: every name is a queue (lists spring into being) and exchanges live in the declaring process")]
    consume_and_get_missing_queue_is_404,
    empty_and_large_bodies,
    dropping_a_channel_requeues_its_unacked,
}

/// A queue is FIFO: one consumer sees messages in publish order.
async fn fifo_per_queue(t: &Target) {
    let (_conn, ch) = t.open().await;
    let q = declare(&ch, t.queue("fifo")).await;
    let n = 200;
    for i in 0..n {
        publish(&ch, "", &q.name, &i.to_string()).await;
    }
    let mut c = consumer(&ch, &q).await;
    for i in 0..n {
        let mut m = recv(&mut c).await;
        assert_eq!(text(&m), i.to_string());
        within("ack", m.ack()).await.unwrap();
    }
    recv_nothing(&mut c).await;
}

/// basic.get takes messages in order too, and returns `None` on an empty queue.
async fn basic_get_in_order_then_none(t: &Target) {
    let (_conn, ch) = t.open().await;
    let q = declare(&ch, t.queue("get")).await;
    assert!(get(&ch, &q.name).await.is_none());
    for body in ["a", "b", "c"] {
        publish(&ch, "", &q.name, body).await;
    }
    let mut got = Vec::new();
    while let Some(mut m) = get(&ch, &q.name).await {
        assert!(!m.redelivered());
        assert_eq!(m.delivery_info().consumer_tag, "");
        got.push(text(&m));
        within("ack", m.ack()).await.unwrap();
    }
    assert_eq!(got, ["a", "b", "c"]);
    assert!(get(&ch, &q.name).await.is_none());
}

/// basic.get with no_ack: the message is gone at once; acking it is a no-op.
async fn basic_get_no_ack(t: &Target) {
    let (conn, ch) = t.open().await;
    let q = declare(&ch, t.queue("get")).await;
    publish(&ch, "", &q.name, "once").await;
    let mut m = within("get", q.get(&ch, true)).await.unwrap().unwrap();
    assert_eq!(text(&m), "once");
    within("ack", m.ack()).await.unwrap();
    within("close", ch.close()).await.unwrap();
    let ch2 = channel(&conn).await;
    assert!(
        get(&ch2, &q.name).await.is_none(),
        "no_ack message came back"
    );
}

/// An acked message is gone for good, even after the channel closes.
async fn ack_removes_message(t: &Target) {
    let (conn, ch) = t.open().await;
    let q = declare(&ch, t.queue("ack")).await;
    publish(&ch, "", &q.name, "done").await;
    let mut m = get(&ch, &q.name).await.unwrap();
    within("ack", m.ack()).await.unwrap();
    assert_eq!(m.state(), MessageState::Acked);
    within("close", ch.close()).await.unwrap();
    let ch2 = channel(&conn).await;
    assert!(get(&ch2, &q.name).await.is_none());
}

/// Acting on a message twice is `Error::MessageState`, whatever the two actions.
async fn settling_twice_is_an_error(t: &Target) {
    let (_conn, ch) = t.open().await;
    let q = declare(&ch, t.queue("twice")).await;
    publish(&ch, "", &q.name, "x").await;
    let mut m = get(&ch, &q.name).await.unwrap();
    within("ack", m.ack()).await.unwrap();
    for r in [
        within("ack", m.ack()).await,
        within("reject", m.reject(false)).await,
        within("requeue", m.requeue()).await,
        within("nack", m.nack(false, true)).await,
    ] {
        assert!(matches!(r, Err(Error::MessageState { .. })), "{r:?}");
    }
    // The channel is fine: nothing was sent for the refused actions.
    publish(&ch, "", &q.name, "y").await;
    assert_eq!(drain(&ch, &q.name).await, ["y"]);
}

/// An unacked message comes back, flagged redelivered, when its channel closes.
async fn unacked_returns_redelivered_when_channel_closes(t: &Target) {
    let (conn, ch) = t.open().await;
    let q = declare(&ch, t.queue("unacked")).await;
    publish(&ch, "", &q.name, "pending").await;
    let mut c = consumer(&ch, &q).await;
    let m = recv(&mut c).await;
    assert!(!m.redelivered());
    drop(m);
    within("close", ch.close()).await.unwrap();
    let ch2 = channel(&conn).await;
    let mut again = get_eventually(&ch2, &q.name).await;
    assert_eq!(text(&again), "pending");
    assert!(again.redelivered(), "redelivered flag not set");
    within("ack", again.ack()).await.unwrap();
}

/// `requeue` puts the message back at the head; it comes again flagged redelivered.
async fn requeue_redelivers_with_flag(t: &Target) {
    let (_conn, ch) = t.open().await;
    let q = declare(&ch, t.queue("requeue")).await;
    publish(&ch, "", &q.name, "first").await;
    publish(&ch, "", &q.name, "second").await;
    let mut c = consumer(&ch, &q).await;
    let mut m = recv(&mut c).await;
    assert_eq!((text(&m).as_str(), m.redelivered()), ("first", false));
    within("requeue", m.requeue()).await.unwrap();
    assert_eq!(m.state(), MessageState::Requeued);
    // RabbitMQ may have sent "second" before the requeue; take both and compare as a set,
    // but "first" must come back redelivered.
    let mut seen = Vec::new();
    for _ in 0..2 {
        let mut m = recv(&mut c).await;
        seen.push((text(&m), m.redelivered()));
        within("ack", m.ack()).await.unwrap();
    }
    seen.sort();
    assert_eq!(
        seen,
        [("first".to_owned(), true), ("second".to_owned(), false)]
    );
    recv_nothing(&mut c).await;
}

/// With prefetch 1 (so nothing else is in flight) a requeued message is the next one.
async fn requeue_goes_back_to_the_head(t: &Target) {
    let (_conn, ch) = t.open().await;
    let q = declare(&ch, t.queue("requeue")).await;
    for body in ["first", "second", "third"] {
        publish(&ch, "", &q.name, body).await;
    }
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
    let mut m = recv(&mut c).await;
    assert_eq!(text(&m), "first");
    within("requeue", m.requeue()).await.unwrap();
    let mut order = Vec::new();
    for _ in 0..3 {
        let mut m = recv(&mut c).await;
        order.push(text(&m));
        within("ack", m.ack()).await.unwrap();
    }
    assert_eq!(order, ["first", "second", "third"]);
}

/// `reject(false)` drops the message (no dead-letter exchange configured).
async fn reject_without_requeue_drops(t: &Target) {
    let (conn, ch) = t.open().await;
    let q = declare(&ch, t.queue("reject")).await;
    publish(&ch, "", &q.name, "bad").await;
    let mut c = consumer(&ch, &q).await;
    let mut m = recv(&mut c).await;
    within("reject", m.reject(false)).await.unwrap();
    assert_eq!(m.state(), MessageState::Rejected);
    recv_nothing(&mut c).await;
    drop(c);
    within("close", ch.close()).await.unwrap();
    let ch2 = channel(&conn).await;
    assert!(
        get(&ch2, &q.name).await.is_none(),
        "rejected message came back"
    );
}

/// `nack(multiple, requeue)` settles every earlier unacked message of the channel too.
async fn nack_multiple_requeues_all_earlier(t: &Target) {
    let (_conn, ch) = t.open().await;
    let q = declare(&ch, t.queue("nack")).await;
    for body in ["1", "2", "3", "4"] {
        publish(&ch, "", &q.name, body).await;
    }
    let mut ms = Vec::new();
    for _ in 0..3 {
        ms.push(get(&ch, &q.name).await.unwrap());
    }
    within("nack", ms[2].nack(true, true)).await.unwrap();
    let mut back = Vec::new();
    while let Some(mut m) = get(&ch, &q.name).await {
        back.push((text(&m), m.redelivered()));
        within("ack", m.ack()).await.unwrap();
    }
    back.sort();
    let want: Vec<(String, bool)> = vec![
        ("1".into(), true),
        ("2".into(), true),
        ("3".into(), true),
        ("4".into(), false),
    ];
    assert_eq!(back, want);
}

/// `nack` without requeue drops; with one message and `multiple = false` only that one.
async fn nack_single_without_requeue_drops_only_it(t: &Target) {
    let (_conn, ch) = t.open().await;
    let q = declare(&ch, t.queue("nack")).await;
    for body in ["keep", "drop"] {
        publish(&ch, "", &q.name, body).await;
    }
    let keep = get(&ch, &q.name).await.unwrap();
    let mut drop_me = get(&ch, &q.name).await.unwrap();
    within("nack", drop_me.nack(false, false)).await.unwrap();
    within("recover", ch.recover(true)).await.unwrap();
    drop(keep);
    let left = drain(&ch, &q.name).await;
    assert_eq!(left, ["keep"]);
}

/// `ack_multiple` acks every earlier message of the channel.
async fn ack_multiple_acks_all_earlier(t: &Target) {
    let (conn, ch) = t.open().await;
    let q = declare(&ch, t.queue("ackm")).await;
    for body in ["1", "2", "3", "4"] {
        publish(&ch, "", &q.name, body).await;
    }
    let mut ms = Vec::new();
    for _ in 0..3 {
        ms.push(get(&ch, &q.name).await.unwrap());
    }
    within("ack multiple", ms[2].ack_multiple(true))
        .await
        .unwrap();
    within("close", ch.close()).await.unwrap();
    let ch2 = channel(&conn).await;
    let left = drain(&ch2, &q.name).await;
    assert_eq!(left, ["4"]);
}

/// `basic.recover(requeue)` redelivers what the channel holds unacked.
async fn recover_redelivers_unacked(t: &Target) {
    let (_conn, ch) = t.open().await;
    let q = declare(&ch, t.queue("recover")).await;
    publish(&ch, "", &q.name, "again").await;
    let m = get(&ch, &q.name).await.unwrap();
    drop(m);
    within("recover", ch.recover(true)).await.unwrap();
    let mut m = get_eventually(&ch, &q.name).await;
    assert_eq!(text(&m), "again");
    assert!(m.redelivered());
    within("ack", m.ack()).await.unwrap();
}

/// With prefetch N and no acks a consumer gets exactly N messages; each ack lets one
/// more through.
async fn prefetch_limits_unacked_deliveries(t: &Target) {
    let (_conn, ch) = t.open().await;
    let q = declare(&ch, t.queue("prefetch")).await;
    for i in 0..10 {
        publish(&ch, "", &q.name, &i.to_string()).await;
    }
    let mut c = within(
        "consumer",
        Consumer::builder(&ch)
            .queue(q.clone())
            .auto_declare(false)
            .prefetch_count(3)
            .build(),
    )
    .await
    .unwrap();
    let mut held = Vec::new();
    for i in 0..3 {
        let m = recv(&mut c).await;
        assert_eq!(text(&m), i.to_string());
        held.push(m);
    }
    recv_nothing(&mut c).await;
    within("ack", held[0].ack()).await.unwrap();
    let m = recv(&mut c).await;
    assert_eq!(text(&m), "3");
    held.push(m);
    recv_nothing(&mut c).await;
    // Acking all lets the rest flow, three at a time.
    let mut seen = 4;
    for mut m in held {
        if m.state() == MessageState::Received {
            within("ack", m.ack()).await.unwrap();
        }
    }
    while seen < 10 {
        let mut m = recv(&mut c).await;
        assert_eq!(text(&m), seen.to_string());
        within("ack", m.ack()).await.unwrap();
        seen += 1;
    }
    recv_nothing(&mut c).await;
}

/// Prefetch counts per consumer: two consumers on one channel each get their own N.
async fn prefetch_is_per_consumer(t: &Target) {
    let (_conn, ch) = t.open().await;
    let qa = declare(&ch, t.queue("a")).await;
    let qb = declare(&ch, t.queue("b")).await;
    for i in 0..5 {
        publish(&ch, "", &qa.name, &format!("a{i}")).await;
        publish(&ch, "", &qb.name, &format!("b{i}")).await;
    }
    within("qos", ch.qos(2, false)).await.unwrap();
    let mut ca = consumer(&ch, &qa).await;
    let mut cb = consumer(&ch, &qb).await;
    let mut held = Vec::new();
    for _ in 0..2 {
        held.push(recv(&mut ca).await);
        held.push(recv(&mut cb).await);
    }
    recv_nothing(&mut ca).await;
    recv_nothing(&mut cb).await;
}

/// Prefetch 0 means no limit.
async fn prefetch_zero_is_unlimited(t: &Target) {
    let (_conn, ch) = t.open().await;
    let q = declare(&ch, t.queue("unlimited")).await;
    for i in 0..50 {
        publish(&ch, "", &q.name, &i.to_string()).await;
    }
    let mut c = within(
        "consumer",
        Consumer::builder(&ch)
            .queue(q.clone())
            .auto_declare(false)
            .prefetch_count(0)
            .build(),
    )
    .await
    .unwrap();
    let mut held = Vec::new();
    for _ in 0..50 {
        held.push(recv(&mut c).await);
    }
    assert_eq!(held.len(), 50);
}

/// A no-ack consumer is not limited by prefetch and its messages never come back.
async fn no_ack_consumer_ignores_prefetch(t: &Target) {
    let (conn, ch) = t.open().await;
    let q = declare(&ch, t.queue("noack")).await;
    for i in 0..10 {
        publish(&ch, "", &q.name, &i.to_string()).await;
    }
    let mut c = within(
        "consumer",
        Consumer::builder(&ch)
            .queue(q.clone())
            .auto_declare(false)
            .prefetch_count(2)
            .no_ack(true)
            .build(),
    )
    .await
    .unwrap();
    for i in 0..10 {
        let m = recv(&mut c).await;
        assert_eq!(text(&m), i.to_string());
        assert_eq!(m.state(), MessageState::Acked);
    }
    drop(c);
    within("close", ch.close()).await.unwrap();
    let ch2 = channel(&conn).await;
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert!(get(&ch2, &q.name).await.is_none());
}

/// Requeued messages go back in their original order, ahead of what was never delivered.
async fn nack_multiple_requeues_in_original_order(t: &Target) {
    let (_conn, ch) = t.open().await;
    let q = declare(&ch, t.queue("nack")).await;
    for body in ["1", "2", "3", "4"] {
        publish(&ch, "", &q.name, body).await;
    }
    let mut ms = Vec::new();
    for _ in 0..3 {
        ms.push(get(&ch, &q.name).await.unwrap());
    }
    within("nack", ms[2].nack(true, true)).await.unwrap();
    assert_eq!(drain(&ch, &q.name).await, ["1", "2", "3", "4"]);
}

/// Requeueing messages one by one in reverse still restores the original order.
async fn individual_requeues_restore_original_order(t: &Target) {
    let (_conn, ch) = t.open().await;
    let q = declare(&ch, t.queue("requeue")).await;
    for body in ["1", "2", "3", "4"] {
        publish(&ch, "", &q.name, body).await;
    }
    let mut ms = Vec::new();
    for _ in 0..3 {
        ms.push(get(&ch, &q.name).await.unwrap());
    }
    for m in ms.iter_mut().rev() {
        within("requeue", m.requeue()).await.unwrap();
    }
    assert_eq!(drain(&ch, &q.name).await, ["1", "2", "3", "4"]);
}

/// `basic.qos(global = true)` limits the whole channel, across consumers.
async fn prefetch_global_limits_the_channel(t: &Target) {
    let (_conn, ch) = t.open().await;
    let qa = declare(&ch, t.queue("a")).await;
    let qb = declare(&ch, t.queue("b")).await;
    for i in 0..5 {
        publish(&ch, "", &qa.name, &format!("a{i}")).await;
        publish(&ch, "", &qb.name, &format!("b{i}")).await;
    }
    within("qos", ch.qos(3, true)).await.unwrap();
    let mut c = within(
        "consumer",
        Consumer::builder(&ch)
            .queues([qa.clone(), qb.clone()])
            .auto_declare(false)
            .build(),
    )
    .await
    .unwrap();
    let mut held = Vec::new();
    for _ in 0..3 {
        held.push(recv(&mut c).await);
    }
    recv_nothing(&mut c).await;
    within("ack", held[0].ack()).await.unwrap();
    held.push(recv(&mut c).await);
    recv_nothing(&mut c).await;
}

/// `basic.qos(global = false)` applies to consumers started after it (RabbitMQ's
/// per-consumer prefetch): changing it leaves a running consumer's limit alone, and a
/// consumer started afterwards gets the new one.
async fn prefetch_change_applies_to_new_consumers(t: &Target) {
    let (_conn, ch) = t.open().await;
    let q = declare(&ch, t.queue("qos")).await;
    for i in 0..6 {
        publish(&ch, "", &q.name, &i.to_string()).await;
    }
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
    let mut held = vec![recv(&mut c).await];
    recv_nothing(&mut c).await;
    within("qos", ch.qos(3, false)).await.unwrap();
    recv_nothing(&mut c).await;
    let mut c2 = consumer(&ch, &q).await;
    for _ in 0..3 {
        held.push(recv(&mut c2).await);
    }
    recv_nothing(&mut c2).await;
    let got: Vec<String> = held.iter().map(text).collect();
    assert_eq!(got, ["0", "1", "2", "3"]);
}

/// Acknowledging a delivery tag the channel no longer holds (already covered by
/// `ack_multiple`) is a channel error (406): the channel closes, the connection lives.
async fn ack_of_settled_tag_closes_the_channel(t: &Target) {
    let (conn, ch) = t.open().await;
    let q = declare(&ch, t.queue("tag")).await;
    for body in ["1", "2"] {
        publish(&ch, "", &q.name, body).await;
    }
    let mut first = get(&ch, &q.name).await.unwrap();
    let mut second = get(&ch, &q.name).await.unwrap();
    within("ack multiple", second.ack_multiple(true))
        .await
        .unwrap();
    // kelp does not know `first` went with it; the broker does.
    let _ = within("ack", first.ack()).await;
    // The error surfaces on the channel (asynchronously on a broker).
    let deadline = std::time::Instant::now() + WAIT;
    while !ch.is_closed() {
        let r = within("get", q.get(&ch, true)).await;
        if r.is_err() {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "channel survived an unknown delivery tag"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        within("get", q.get(&ch, true)).await.is_err(),
        "closed channel still works"
    );
    let ch2 = channel(&conn).await;
    assert!(get(&ch2, &q.name).await.is_none());
}

/// A channel error (here a 404) closes the channel, as in AMQP: later calls on it fail;
/// the connection and its other channels carry on.
async fn channel_error_closes_the_channel(t: &Target) {
    let (conn, ch) = t.open().await;
    let q = declare(&ch, t.queue("q")).await;
    let err = within("passive", ch.get_queue(&t.name("missing"), true))
        .await
        .unwrap_err();
    assert_eq!(err.reply_code(), Some(404));
    assert!(ch.is_closed(), "the channel survived a 404");
    let r = try_publish(&ch, "", &q.name, "x", Default::default()).await;
    assert!(r.is_err(), "publish on a closed channel succeeded");
    let ch2 = channel(&conn).await;
    publish(&ch2, "", &q.name, "y").await;
    assert_eq!(drain(&ch2, &q.name).await, ["y"]);
}

/// Settling a message after its channel closed is an error, not a silent success.
async fn ack_after_channel_close_is_an_error(t: &Target) {
    let (conn, ch) = t.open().await;
    let q = declare(&ch, t.queue("late")).await;
    publish(&ch, "", &q.name, "x").await;
    let mut m = get(&ch, &q.name).await.unwrap();
    within("close", ch.close()).await.unwrap();
    assert!(
        within("ack", m.ack()).await.is_err(),
        "ack on a closed channel succeeded"
    );
    let ch2 = channel(&conn).await;
    let mut again = get_eventually(&ch2, &q.name).await;
    assert!(again.redelivered());
    within("ack", again.ack()).await.unwrap();
}

/// Consuming or getting from a queue that does not exist is a 404.
async fn consume_and_get_missing_queue_is_404(t: &Target) {
    let conn = t.connect().await;
    let ch = channel(&conn).await;
    let missing = kelp::Queue::new(t.name("missing"));
    let err = within("get", missing.get(&ch, false)).await.unwrap_err();
    assert_eq!(err.reply_code(), Some(404), "{err:?}");
    let ch = channel(&conn).await;
    let err = within(
        "consume",
        Consumer::builder(&ch)
            .queue(missing.clone())
            .auto_declare(false)
            .build(),
    )
    .await
    .unwrap_err();
    assert_eq!(err.reply_code(), Some(404), "{err:?}");
}

/// Empty and large bodies (bigger than a frame) come through intact.
async fn empty_and_large_bodies(t: &Target) {
    let (_conn, ch) = t.open().await;
    let q = declare(&ch, t.queue("sizes")).await;
    let big: Vec<u8> = (0..3 * 1024 * 1024 + 7).map(|i| (i % 251) as u8).collect();
    let p = kelp::Producer::new(&ch).routing_key(q.name.as_str());
    within("publish", p.publish(Vec::<u8>::new(), Default::default()))
        .await
        .unwrap();
    within("publish", p.publish(big.clone(), Default::default()))
        .await
        .unwrap();
    let mut c = consumer(&ch, &q).await;
    let mut m = recv(&mut c).await;
    assert!(m.body().is_empty());
    within("ack", m.ack()).await.unwrap();
    let mut m = recv(&mut c).await;
    assert_eq!(m.body().len(), big.len());
    assert!(m.body()[..] == big[..]);
    within("ack", m.ack()).await.unwrap();
}

/// Dropping every handle of a channel closes it: its unacked messages go back.
async fn dropping_a_channel_requeues_its_unacked(t: &Target) {
    let conn = t.connect().await;
    let ch = channel(&conn).await;
    let q = declare(&ch, t.queue("dropped")).await;
    publish(&ch, "", &q.name, "held").await;
    let m = get(&ch, &q.name).await.unwrap();
    drop(m);
    drop(ch);
    let ch2 = channel(&conn).await;
    let mut again = get_eventually(&ch2, &q.name).await;
    assert!(again.redelivered());
    within("ack", again.ack()).await.unwrap();
}
