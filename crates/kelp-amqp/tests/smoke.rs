#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod common;

use kelp_amqp::options::*;
use kelp_amqp::{BasicProperties, Connection, FieldTable};

#[tokio::test]
async fn publish_consume_ack_round_trip() {
    require_rabbitmq!("publish_consume_ack_round_trip");
    let conn = Connection::open(&common::amqp_url()).await.unwrap();
    let ch = conn.channel().await.unwrap();
    let q = common::unique("smoke");
    let ok = ch
        .queue_declare(
            &q,
            QueueDeclareOptions {
                auto_delete: true,
                ..Default::default()
            },
            FieldTable::new(),
        )
        .await
        .unwrap();
    assert_eq!(ok.queue.as_str(), q);
    for i in 0..10 {
        ch.basic_publish(
            "",
            &q,
            PublishOptions::default(),
            BasicProperties::default().with_message_id(format!("m{i}")),
            format!("body-{i}"),
        )
        .await
        .unwrap();
    }
    let mut consumer = ch
        .basic_consume(&q, ConsumeOptions::default())
        .await
        .unwrap();
    for i in 0..10 {
        let d = consumer.recv().await.unwrap().unwrap();
        assert_eq!(&d.body[..], format!("body-{i}").as_bytes());
        assert_eq!(
            d.properties.message_id.as_deref(),
            Some(format!("m{i}").as_str())
        );
        ch.basic_ack(d.delivery_tag, false).await.unwrap();
    }
    conn.close().await.unwrap();
    assert!(conn.is_closed());
}
