//! carrot's classic example — the feed importer — with `kelp::compat::carrot`: a `Publisher`
//! sends feed URLs, a `Consumer` with a callback imports them, then `fetch`, `iterqueue`,
//! `discard_all` with a filter, a `ConsumerSet` configured `from_dict`, and `Messaging`.
//! Runs on the in-process `memory://` transport, so no broker is needed:
//!
//! ```text
//! cargo run -p kelp --example carrot
//! ```
//!
//! Point it at RabbitMQ with `KELP_URL`, e.g.
//! `KELP_URL=amqp://guest:guest@localhost:5672// cargo run -p kelp --example carrot`
//! (it deletes the queues and exchanges it declared when it is done).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use kelp::compat::carrot::{
    Consumer, ConsumerOptions, ConsumerSet, FetchOptions, Messaging, MessagingOptions, Publisher,
    PublisherOptions, SendOptions,
};
use kelp::{Connection, Exchange, Message, Queue};
use serde_json::json;

const FEEDS: [&str; 3] = [
    "http://cnn.com/rss/edition.rss",
    "http://feeds.bbci.co.uk/news/rss.xml",
    "http://rss.slashdot.org/Slashdot/slashdotMain",
];

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let url = std::env::var("KELP_URL").unwrap_or_else(|_| "memory://carrot-example".to_owned());
    let conn = Connection::open(&url).await?;
    println!("connected to {} ({})", conn.url(), conn.transport_name());
    // Publishes with confirms, so a message is in its queue when `send` returns.
    let publish_ch = conn.channel().await?;
    publish_ch.confirm_select().await?;

    // consumer = Consumer(connection=conn, queue="feed", exchange="feed", routing_key="importer")
    // (declared first: a message sent before its queue exists goes nowhere)
    let mut consumer = Consumer::new(
        &conn,
        ConsumerOptions::new("kelp.example.feed", "kelp.example.feed", "importer"),
    )
    .await?;

    // publisher = Publisher(connection=conn, exchange="feed", routing_key="importer")
    let publisher = Publisher::new(
        &publish_ch,
        PublisherOptions::new("kelp.example.feed", "importer"),
    )
    .await?;
    for feed in FEEDS {
        publisher
            .send(&json!({ "import_feed": feed }), SendOptions::default())
            .await?;
    }

    // def import_feed_callback(message_data, message): ...; message.ack()
    let imported = Arc::new(AtomicUsize::new(0));
    let counter = imported.clone();
    consumer.register_callback(move |message_data, message| {
        let feed_url = message_data
            .get("import_feed")
            .and_then(|v| v.as_str())
            .unwrap_or("?")
            .to_owned();
        counter.fetch_add(1, Ordering::Relaxed);
        Box::pin(async move {
            println!(" [x] Got feed import message for: {feed_url}");
            message.ack_log_error().await;
        })
    });
    // consumer.wait()  — here until the three messages are handled
    let handled = consumer.wait(Some(FEEDS.len())).await?;
    println!(" [.] wait handled {handled} messages");
    consumer.cancel().await?;

    // fetch(): basic.get, one at a time; with enable_callbacks the callback runs too.
    publisher
        .send(&json!({"import_feed": FEEDS[0]}), SendOptions::default())
        .await?;
    let fetched = consumer
        .fetch(FetchOptions::default().enable_callbacks(true))
        .await?;
    println!(
        " [.] fetch(enable_callbacks) got a message: {}",
        fetched.is_some()
    );

    // iterqueue(): the waiting messages, until the queue is empty.
    for n in 0..3 {
        publisher
            .send(&json!({"n": n}), SendOptions::default())
            .await?;
    }
    let mut it = consumer.iterqueue(None, false);
    while let Some(message) = it.next().await {
        let mut message = message?;
        println!(
            " [.] iterqueue: {}",
            message
                .payload()?
                .get("n")
                .map_or(-1, |v| v.as_i64().unwrap_or(-1))
        );
        message.ack().await?;
    }
    drop(it);

    // discard_all(filterfunc): throw away the feed messages only, keep the rest.
    publisher
        .send(
            &json!({"type": "feed", "url": FEEDS[1]}),
            SendOptions::default(),
        )
        .await?;
    publisher
        .send(&json!({"type": "other"}), SendOptions::default())
        .await?;
    let mut waiting_feeds_only = |message: &Message| {
        message
            .decode::<serde_json::Value>()
            .is_ok_and(|v| v["type"] == "feed")
    };
    let discarded = consumer.discard_all(Some(&mut waiting_feeds_only)).await?;
    println!(" [.] discard_all(filter) discarded {discarded}");
    let purged = consumer.discard_all(None).await?;
    println!(" [.] discard_all() purged {purged}");

    // ConsumerSet(connection, from_dict={...}): two queues on a topic exchange.
    let mut set = ConsumerSet::from_dict(
        &conn,
        &json!({
            "kelp.example.webshot": {
                "exchange": "kelp.example.links", "exchange_type": "topic",
                "binding_key": "links.webshot", "default_routing_key": "links.webshot",
            },
            "kelp.example.retrieve": {
                "exchange": "kelp.example.links", "exchange_type": "topic",
                "binding_key": "links.*", "default_routing_key": "links.retrieve",
            },
        }),
    )
    .await?;
    set.register_callback(|message_data, message| {
        println!(
            " [x] ConsumerSet: {} via {message_data:?}",
            message.delivery_info().routing_key
        );
        Box::pin(async move { message.ack_log_error().await })
    });
    let links = Publisher::new(
        &publish_ch,
        PublisherOptions {
            exchange_type: "topic".into(),
            ..PublisherOptions::new("kelp.example.links", "links.retrieve")
        },
    )
    .await?;
    links
        .send(&"http://example.com/", SendOptions::default())
        .await?; // retrieve only
    links
        .send(
            &"http://example.com/shot",
            SendOptions::default().routing_key("links.webshot"),
        )
        .await?; // both queues
    let mut it = set.iterconsume(Some(3));
    while let Some(message) = it.next().await {
        message?;
    }
    drop(it);

    // Messaging: publisher and consumer in one.
    let mut messaging = Messaging::new(
        &conn,
        MessagingOptions::new("kelp.example.echo", "kelp.example.echo", "echo"),
    )
    .await?;
    messaging
        .send(&json!({"say": "hello"}), SendOptions::default())
        .await?;
    if let Some(message) = messaging
        .fetch(FetchOptions::default().auto_ack(true))
        .await?
    {
        println!(" [x] Messaging echoed {:?}", message.payload()?);
    }

    println!("imported {} feeds in all", imported.load(Ordering::Relaxed));

    messaging.close().await?;
    set.close().await?;
    links.close().await?;
    consumer.close().await?;
    publisher.close().await?;

    // carrot's defaults are durable and not auto-deleted: tidy up a real broker.
    let ch = conn.channel().await?;
    for q in [
        "kelp.example.feed",
        "kelp.example.webshot",
        "kelp.example.retrieve",
        "kelp.example.echo",
    ] {
        Queue::new(q).delete(&ch, false, false).await?;
    }
    for x in [
        "kelp.example.feed",
        "kelp.example.links",
        "kelp.example.echo",
    ] {
        Exchange::new(x).delete(&ch, false).await?;
    }
    conn.close().await?;
    Ok(())
}
