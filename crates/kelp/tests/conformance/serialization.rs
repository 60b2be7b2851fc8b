//! Serializers × compression through a real publish and consume; the accept whitelist;
//! decode failures and the decode-error handler; decompression limits.

use std::sync::{Arc, Mutex};

use kelp::compression::CompressionError;
use kelp::serialization::SerializationError;
use kelp::{Connection, Consumer, Error, Message, MessageState, Producer, PublishOptions};
use serde::{Deserialize, Serialize};

use crate::common::*;

conformance_tests! {
    json_round_trips_with_every_compression,
    msgpack_round_trips_with_every_compression,
    yaml_round_trips_with_every_compression,
    pickle_round_trips_with_every_compression,
    raw_round_trips_with_every_compression,
    text_round_trips_with_every_compression,
    accept_whitelist_refuses_other_content_types,
    default_accept_refuses_pickle_yaml_msgpack,
    #[not_on(redis; "N/A on redis: Kombu's Redis transport has no dead-lettering")]
    accept_whitelist_default_rejects_to_dead_letter,
    accept_list_by_content_type_and_name,
    undecodable_body_goes_to_on_decode_error,
    #[not_on(redis; "N/A on redis: Kombu's Redis transport has no dead-lettering")]
    default_on_decode_error_rejects_without_requeue,
    compression_bomb_is_a_typed_error,
    compression_bomb_reaches_on_decode_error,
    unknown_compression_header_is_a_typed_error,
}

const COMPRESSIONS: [Option<(&str, &str)>; 6] = [
    None,
    Some(("zlib", "application/x-gzip")),
    Some(("bzip2", "application/x-bz2")),
    Some(("lzma", "application/x-lzma")),
    Some(("zstd", "application/zstd")),
    Some(("brotli", "application/x-brotli")),
];

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Order {
    id: u64,
    customer: String,
    lines: Vec<Line>,
    paid: bool,
    note: Option<String>,
    discount: f64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Line {
    sku: String,
    qty: i32,
}

fn order(i: u64) -> Order {
    Order {
        id: i,
        customer: format!("customer «{i}» ✓"),
        lines: vec![
            Line {
                sku: "A-1".into(),
                qty: 2,
            },
            Line {
                sku: "B-2".into(),
                qty: -1,
            },
        ],
        paid: i % 2 == 0,
        note: (i % 3 == 0).then(|| "x".repeat(300)),
        discount: 0.25,
    }
}

/// Publish `order(i)` with `serializer` under every compression, consume them all, and check
/// content type, encoding, compression header and the decoded value.
async fn round_trip_serializer(t: &Target, serializer: &str, content_type: &str, encoding: &str) {
    let (_conn, ch) = t.open().await;
    let q = declare(&ch, t.queue(serializer)).await;
    let p = Producer::new(&ch)
        .routing_key(q.name.as_str())
        .serializer(serializer);
    for (i, comp) in COMPRESSIONS.iter().enumerate() {
        let mut opts = PublishOptions::default();
        if let Some((method, _)) = comp {
            opts = opts.compression(*method);
        }
        within("publish", p.publish_serde(&order(i as u64), opts))
            .await
            .unwrap();
    }
    // Kombu's default refuses pickle, yaml and msgpack: trust this serializer explicitly.
    let mut c = within(
        "start a consumer",
        kelp::Consumer::builder(&ch)
            .queue(q.clone())
            .auto_declare(false)
            .accept([serializer])
            .build(),
    )
    .await
    .unwrap();
    for (i, comp) in COMPRESSIONS.iter().enumerate() {
        let mut m = recv(&mut c).await;
        assert_eq!(m.content_type(), Some(content_type));
        assert_eq!(m.content_encoding(), Some(encoding));
        assert_eq!(m.compression(), comp.map(|(_, header)| header), "{comp:?}");
        let got: Order = m
            .decode()
            .unwrap_or_else(|e| panic!("{serializer} with {comp:?}: {e}"));
        assert_eq!(got, order(i as u64), "{serializer} with {comp:?}");
        // The dynamic payload decodes too.
        let payload = m.payload().unwrap();
        assert_eq!(payload.get("id").and_then(|v| v.as_i64()), Some(i as i64));
        within("ack", m.ack()).await.unwrap();
    }
}

/// Record what the decode-error handler saw, then reject without requeue.
type Seen = Arc<Mutex<Vec<(String, Error, MessageState)>>>;

fn recording_consumer(ch: &kelp::Channel, q: &kelp::Queue, seen: &Seen) -> kelp::ConsumerBuilder {
    let sink = seen.clone();
    Consumer::builder(ch)
        .queue(q.clone())
        .auto_declare(false)
        .on_decode_error(move |m: &mut Message, e: &Error| {
            let sink = sink.clone();
            Box::pin(async move {
                sink.lock().unwrap().push((text(m), e.clone(), m.state()));
                m.reject_log_error(false).await;
            })
        })
}

/// json × every compression.
async fn json_round_trips_with_every_compression(t: &Target) {
    round_trip_serializer(t, "json", "application/json", "utf-8").await;
}

/// msgpack × every compression.
async fn msgpack_round_trips_with_every_compression(t: &Target) {
    round_trip_serializer(t, "msgpack", "application/x-msgpack", "binary").await;
}

/// yaml × every compression.
async fn yaml_round_trips_with_every_compression(t: &Target) {
    round_trip_serializer(t, "yaml", "application/x-yaml", "utf-8").await;
}

/// pickle × every compression.
async fn pickle_round_trips_with_every_compression(t: &Target) {
    round_trip_serializer(t, "pickle", "application/x-python-serialize", "binary").await;
}

/// raw bytes (and the `raw` serializer) × every compression: the bytes come back as sent.
async fn raw_round_trips_with_every_compression(t: &Target) {
    let (_conn, ch) = t.open().await;
    let q = declare(&ch, t.queue("raw")).await;
    let p = Producer::new(&ch).routing_key(q.name.as_str());
    let body: Vec<u8> = (0..=255u8).cycle().take(3000).collect();
    for comp in COMPRESSIONS {
        let mut opts = PublishOptions::default();
        if let Some((method, _)) = comp {
            opts = opts.compression(method);
        }
        within("publish", p.publish(body.clone(), opts.clone()))
            .await
            .unwrap();
        let opts = opts.serializer("raw");
        within("publish", p.publish_serde("raw text", opts))
            .await
            .unwrap();
    }
    let mut c = consumer(&ch, &q).await;
    for comp in COMPRESSIONS {
        let mut m = recv(&mut c).await;
        assert_eq!(m.content_type(), Some("application/data"));
        assert_eq!(m.content_encoding(), Some("binary"));
        assert_eq!(m.compression(), comp.map(|(_, h)| h));
        assert_eq!(&m.decompressed_body().unwrap()[..], &body[..], "{comp:?}");
        let bytes: Vec<u8> = m.decode().unwrap();
        assert_eq!(bytes, body, "{comp:?}");
        within("ack", m.ack()).await.unwrap();
        let mut m = recv(&mut c).await;
        assert_eq!(m.content_type(), Some("application/data"));
        assert_eq!(m.decode::<String>().unwrap(), "raw text", "{comp:?}");
        within("ack", m.ack()).await.unwrap();
    }
}

/// text (`text/plain`; `publish(&str)` and the `text` serializer) × every compression.
async fn text_round_trips_with_every_compression(t: &Target) {
    let (_conn, ch) = t.open().await;
    let q = declare(&ch, t.queue("text")).await;
    let p = Producer::new(&ch).routing_key(q.name.as_str());
    let body = "grüße, 世界 — ".repeat(100);
    for comp in COMPRESSIONS {
        let mut opts = PublishOptions::default();
        if let Some((method, _)) = comp {
            opts = opts.compression(method);
        }
        within("publish", p.publish(body.as_str(), opts.clone()))
            .await
            .unwrap();
        within("publish", p.publish_serde(&body, opts.serializer("text")))
            .await
            .unwrap();
    }
    let mut c = consumer(&ch, &q).await;
    for comp in COMPRESSIONS {
        for _ in 0..2 {
            let mut m = recv(&mut c).await;
            assert_eq!(m.content_type(), Some("text/plain"));
            assert_eq!(m.content_encoding(), Some("utf-8"));
            assert_eq!(m.compression(), comp.map(|(_, h)| h));
            assert_eq!(m.decode::<String>().unwrap(), body, "{comp:?}");
            assert_eq!(m.payload().unwrap().as_str(), Some(body.as_str()));
            within("ack", m.ack()).await.unwrap();
        }
    }
}

/// A content type outside the accept list goes to `on_decode_error` (as
/// `ContentDisallowed`, so never decoded), unacked; the consumer's stream skips it.
async fn accept_whitelist_refuses_other_content_types(t: &Target) {
    let (_conn, ch) = t.open().await;
    let q = declare(&ch, t.queue("accept")).await;
    let p = Producer::new(&ch).routing_key(q.name.as_str());
    // Not valid pickle: if it were decoded the error would be a Decode error.
    let bad = PublishOptions::default().content_type("application/x-python-serialize");
    within("publish", p.publish("not pickle at all", bad))
        .await
        .unwrap();
    within(
        "publish",
        p.publish_serde(&order(7), PublishOptions::default()),
    )
    .await
    .unwrap();
    let seen: Seen = Arc::default();
    let mut c = within(
        "consumer",
        recording_consumer(&ch, &q, &seen).accept(["json"]).build(),
    )
    .await
    .unwrap();
    let mut m = recv(&mut c).await;
    assert_eq!(m.decode::<Order>().unwrap(), order(7));
    within("ack", m.ack()).await.unwrap();
    let seen = seen.lock().unwrap().clone();
    assert_eq!(seen.len(), 1, "{seen:?}");
    let (body, err, state) = &seen[0];
    assert_eq!(body, "not pickle at all");
    assert!(
        matches!(
            err,
            Error::Serialization(SerializationError::ContentDisallowed { .. })
        ),
        "{err:?}"
    );
    assert_eq!(
        *state,
        MessageState::Received,
        "acked before the handler ran"
    );
    recv_nothing(&mut c).await;
    assert!(get(&ch, &q.name).await.is_none());
}

/// Without a handler, a refused content type is rejected without requeue: it is
/// dead-lettered, never redelivered, never acked.
async fn accept_whitelist_default_rejects_to_dead_letter(t: &Target) {
    let (_conn, ch) = t.open().await;
    let dlx = t.exchange("fanout", "dlx");
    let dlq = declare(&ch, t.queue("dlq").exchange(dlx.clone())).await;
    let q = declare(&ch, t.queue("accept").dead_letter(&dlx.name, None)).await;
    let p = Producer::new(&ch).routing_key(q.name.as_str());
    within(
        "publish",
        p.publish_serde(&order(1), PublishOptions::default().serializer("yaml")),
    )
    .await
    .unwrap();
    within(
        "publish",
        p.publish_serde(&order(2), PublishOptions::default()),
    )
    .await
    .unwrap();
    let mut c = within(
        "consumer",
        Consumer::builder(&ch)
            .queue(q.clone())
            .auto_declare(false)
            .accept(["json"])
            .build(),
    )
    .await
    .unwrap();
    let mut m = recv(&mut c).await;
    assert_eq!(m.decode::<Order>().unwrap(), order(2));
    within("ack", m.ack()).await.unwrap();
    let dead = get_eventually(&ch, &dlq.name).await;
    assert_eq!(dead.content_type(), Some("application/x-yaml"));
    assert_eq!(death_reason(&dead).as_deref(), Some("rejected"));
    recv_nothing(&mut c).await;
}

/// `decode` itself honours the whitelist when the message is read from a stream.
async fn accept_list_by_content_type_and_name(t: &Target) {
    let (_conn, ch) = t.open().await;
    let q = declare(&ch, t.queue("accept")).await;
    let p = Producer::new(&ch).routing_key(q.name.as_str());
    for s in ["json", "msgpack", "yaml"] {
        let opts = PublishOptions::default().serializer(s);
        within("publish", p.publish_serde(&order(3), opts))
            .await
            .unwrap();
    }
    // Trusted content (application/data) always passes a whitelist.
    within(
        "publish",
        p.publish(vec![1u8, 2, 3], PublishOptions::default()),
    )
    .await
    .unwrap();
    let seen: Seen = Arc::default();
    let b = recording_consumer(&ch, &q, &seen).accept(["application/x-msgpack", "json"]);
    let mut c = within("consumer", b.build()).await.unwrap();
    let mut types = Vec::new();
    for _ in 0..3 {
        let mut m = recv(&mut c).await;
        types.push(m.content_type().unwrap_or("").to_owned());
        within("ack", m.ack()).await.unwrap();
    }
    assert_eq!(
        types,
        [
            "application/json",
            "application/x-msgpack",
            "application/data"
        ]
    );
    recv_nothing(&mut c).await;
    let seen = seen.lock().unwrap();
    assert_eq!(seen.len(), 1);
    match &seen[0].1 {
        Error::Serialization(SerializationError::ContentDisallowed { content_type }) => {
            assert_eq!(content_type, "application/x-yaml");
        }
        other => panic!("expected ContentDisallowed, got {other:?}"),
    }
}

/// A body that fails to decode goes to `on_decode_error` (callbacks are not run).
async fn undecodable_body_goes_to_on_decode_error(t: &Target) {
    let (conn, ch) = t.open().await;
    let q = declare(&ch, t.queue("bad")).await;
    let bad = PublishOptions::default().content_type("application/json");
    publish_with(&ch, "", &q.name, "{not json", bad).await;
    let seen: Seen = Arc::default();
    let calls = Arc::new(Mutex::new(0));
    let calls2 = calls.clone();
    let _c = within(
        "consumer",
        recording_consumer(&ch, &q, &seen)
            .callback(move |_body, m| {
                let calls = calls2.clone();
                Box::pin(async move {
                    *calls.lock().unwrap() += 1;
                    m.ack_log_error().await;
                })
            })
            .build(),
    )
    .await
    .unwrap();
    let handled = within("drain_events", conn.drain_events(Some(WAIT)))
        .await
        .unwrap();
    assert!(handled);
    assert_eq!(
        *calls.lock().unwrap(),
        0,
        "callback ran on an undecodable body"
    );
    let seen = seen.lock().unwrap().clone();
    assert_eq!(seen.len(), 1);
    assert!(
        matches!(
            &seen[0].1,
            Error::Serialization(SerializationError::Decode { .. })
        ),
        "{:?}",
        seen[0].1
    );
    assert_eq!(seen[0].2, MessageState::Received);
}

/// The default decode-error handling rejects without requeue: the message is
/// dead-lettered, not requeued, and the consumer does not see it again.
async fn default_on_decode_error_rejects_without_requeue(t: &Target) {
    let (conn, ch) = t.open().await;
    let dlx = t.exchange("fanout", "dlx");
    let dlq = declare(&ch, t.queue("dlq").exchange(dlx.clone())).await;
    let q = declare(&ch, t.queue("bad").dead_letter(&dlx.name, None)).await;
    let bad = PublishOptions::default().content_type("application/json");
    publish_with(&ch, "", &q.name, "{not json", bad).await;
    let calls = Arc::new(Mutex::new(0));
    let calls2 = calls.clone();
    let mut c = within(
        "consumer",
        Consumer::builder(&ch)
            .queue(q.clone())
            .auto_declare(false)
            .callback(move |_body, m| {
                let calls = calls2.clone();
                Box::pin(async move {
                    *calls.lock().unwrap() += 1;
                    m.ack_log_error().await;
                })
            })
            .build(),
    )
    .await
    .unwrap();
    assert!(within("drain_events", c.drain_events(Some(WAIT)))
        .await
        .unwrap());
    assert_eq!(*calls.lock().unwrap(), 0);
    let dead = get_eventually(&ch, &dlq.name).await;
    assert_eq!(text(&dead), "{not json");
    assert_eq!(death_reason(&dead).as_deref(), Some("rejected"));
    assert!(dead.headers().is_some());
    // Not requeued: nothing more for the consumer.
    let again = within("drain_events", c.drain_events(Some(QUIET))).await;
    assert!(matches!(again, Err(Error::Timeout { .. })), "{again:?}");
    drop(c);
    let _ = conn;
    assert!(get(&ch, &q.name).await.is_none());
}

/// A compressed body that would expand past `max_decompressed_size` is a typed
/// `CompressionError::TooLarge`, in `decode` and through `on_decode_error`.
async fn compression_bomb_is_a_typed_error(t: &Target) {
    let conn = t
        .connect_with(Connection::builder().max_decompressed_size(64 * 1024))
        .await;
    let ch = channel(&conn).await;
    let q = declare(&ch, t.queue("bomb")).await;
    let bomb = vec![0u8; 4 * 1024 * 1024];
    let p = Producer::new(&ch).routing_key(q.name.as_str());
    for method in ["zlib", "bzip2", "lzma", "zstd", "brotli"] {
        let opts = PublishOptions::default().compression(method);
        within("publish", p.publish(bomb.clone(), opts))
            .await
            .unwrap();
    }
    // Under the limit: fine.
    let small = PublishOptions::default().compression("zlib");
    within("publish", p.publish(vec![0u8; 1000], small))
        .await
        .unwrap();
    let mut c = consumer(&ch, &q).await;
    for method in ["zlib", "bzip2", "lzma", "zstd", "brotli"] {
        let mut m = recv(&mut c).await;
        assert!(
            m.body().len() < 64 * 1024,
            "{method}: the bomb is not small on the wire"
        );
        let err = m.decode::<Vec<u8>>().unwrap_err();
        assert!(
            matches!(
                err,
                Error::Compression(CompressionError::TooLarge { limit: 65536, .. })
            ),
            "{method}: {err:?}"
        );
        let err = m.payload().unwrap_err();
        assert!(matches!(
            err,
            Error::Compression(CompressionError::TooLarge { .. })
        ));
        within("reject", m.reject(false)).await.unwrap();
    }
    let mut m = recv(&mut c).await;
    assert_eq!(m.decode::<Vec<u8>>().unwrap().len(), 1000);
    within("ack", m.ack()).await.unwrap();
}

/// Through callbacks, the bomb reaches `on_decode_error` with the typed error.
async fn compression_bomb_reaches_on_decode_error(t: &Target) {
    let conn = t
        .connect_with(Connection::builder().max_decompressed_size(1024))
        .await;
    let ch = channel(&conn).await;
    let q = declare(&ch, t.queue("bomb")).await;
    let opts = PublishOptions::default().compression("zstd");
    let p = Producer::new(&ch).routing_key(q.name.as_str());
    within("publish", p.publish(vec![7u8; 1 << 20], opts))
        .await
        .unwrap();
    let seen: Seen = Arc::default();
    let mut c = within(
        "consumer",
        recording_consumer(&ch, &q, &seen)
            .callback(|_b, m| Box::pin(async move { m.ack_log_error().await }))
            .build(),
    )
    .await
    .unwrap();
    assert!(within("drain_events", c.drain_events(Some(WAIT)))
        .await
        .unwrap());
    let seen = seen.lock().unwrap();
    assert_eq!(seen.len(), 1);
    assert!(
        matches!(
            &seen[0].1,
            Error::Compression(CompressionError::TooLarge { limit: 1024, .. })
        ),
        "{:?}",
        seen[0].1
    );
}

/// An unknown `compression` header is a typed error, not garbage.
async fn unknown_compression_header_is_a_typed_error(t: &Target) {
    let (_conn, ch) = t.open().await;
    let q = declare(&ch, t.queue("unknown-comp")).await;
    let opts = PublishOptions::default()
        .content_type("application/json")
        .header("compression", "application/x-snappy");
    publish_with(&ch, "", &q.name, "{}", opts).await;
    let m = get(&ch, &q.name).await.unwrap();
    let err = m.decode::<serde_json::Value>().unwrap_err();
    assert!(
        matches!(
            err,
            Error::Compression(CompressionError::UnknownContentType { .. })
        ),
        "{err:?}"
    );
}

/// Without `accept`, a consumer trusts what Kombu trusts by default: pickle, yaml and msgpack
/// are refused (to on_decode_error, never decoded), json and text go through.
async fn default_accept_refuses_pickle_yaml_msgpack(t: &Target) {
    let (_conn, ch) = t.open().await;
    let q = declare(&ch, t.queue("default-accept")).await;
    let p = Producer::new(&ch).routing_key(q.name.as_str());
    for serializer in ["pickle", "yaml", "msgpack", "json"] {
        within(
            "publish",
            p.publish_serde(&order(1), PublishOptions::default().serializer(serializer)),
        )
        .await
        .unwrap();
    }
    let seen: Seen = Arc::default();
    let mut c = within("consumer", recording_consumer(&ch, &q, &seen).build())
        .await
        .unwrap();
    let mut m = recv(&mut c).await;
    assert_eq!(m.content_type(), Some("application/json"));
    assert_eq!(m.decode::<Order>().unwrap(), order(1));
    within("ack", m.ack()).await.unwrap();
    let seen = seen.lock().unwrap().clone();
    assert_eq!(seen.len(), 3, "{seen:?}");
    for (_, err, state) in &seen {
        assert!(
            matches!(
                err,
                Error::Serialization(SerializationError::ContentDisallowed { .. })
            ),
            "{err:?}"
        );
        assert_eq!(*state, MessageState::Received);
    }
    recv_nothing(&mut c).await;
}
