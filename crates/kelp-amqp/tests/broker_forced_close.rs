//! The broker closes our connection (`rabbitmqctl close_connection`, reply 320
//! CONNECTION_FORCED): the close reaches every handle as `Error::ConnectionClosed`.
//!
//! Its own test binary, and only our connection (found by its connection_name) is closed, so
//! other tests running against the same broker are not hit.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use kelp_amqp::error::reply_code;
use kelp_amqp::options::*;
use kelp_amqp::{BasicProperties, ConnectionBuilder, Error, FieldTable};

const LIMIT: Duration = Duration::from_secs(30);
const FAST: Duration = Duration::from_millis(500);

fn rabbitmqctl(args: &[&str]) -> Option<String> {
    let out = Command::new("rabbitmqctl").args(args).output().ok()?;
    if !out.status.success() {
        eprintln!(
            "rabbitmqctl {args:?} failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        return None;
    }
    Some(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The Erlang pid of the connection whose client_properties carry `name`, polling until the
/// broker lists it.
fn connection_pid(name: &str) -> Option<String> {
    let deadline = Instant::now() + Duration::from_secs(15);
    while Instant::now() < deadline {
        let out = rabbitmqctl(&[
            "-q",
            "list_connections",
            "--no-table-headers",
            "pid",
            "client_properties",
        ])?;
        for line in out.lines() {
            if line.contains(&format!("\"{name}\"")) {
                let pid = line.split_whitespace().next()?;
                return Some(pid.to_owned());
            }
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    None
}

#[tokio::test]
async fn broker_forced_close_reaches_every_handle_as_connection_closed_320() {
    require_rabbitmq!("broker_forced_close_reaches_every_handle_as_connection_closed_320");
    if rabbitmqctl(&["-q", "list_connections", "--no-table-headers", "pid"]).is_none() {
        if std::env::var("KELP_REQUIRE_BROKERS").as_deref() == Ok("1") {
            panic!("rabbitmqctl is not usable and KELP_REQUIRE_BROKERS=1");
        }
        eprintln!("SKIP broker_forced_close: rabbitmqctl is not usable here");
        return;
    }
    let name = format!("kelp-forced-close-{}", std::process::id());
    let conn = common::within(
        "connect",
        LIMIT,
        ConnectionBuilder::new(&common::amqp_url())
            .unwrap()
            .connection_name(&name)
            .connect(),
    )
    .await
    .unwrap();
    let ch = conn.channel().await.unwrap();
    let q = ch
        .queue_declare(
            "",
            QueueDeclareOptions {
                exclusive: true,
                ..Default::default()
            },
            FieldTable::new(),
        )
        .await
        .unwrap()
        .queue;
    let mut consumer = ch
        .basic_consume(&q, ConsumeOptions::default())
        .await
        .unwrap();
    let confirm_ch = conn.channel().await.unwrap();
    confirm_ch.confirm_select().await.unwrap();

    let pid = {
        let name = name.clone();
        tokio::task::spawn_blocking(move || connection_pid(&name))
            .await
            .unwrap()
            .expect("our connection is not listed by rabbitmqctl")
    };
    // Somebody waiting for the close hears it.
    let waiter = {
        let conn = conn.clone();
        tokio::spawn(async move { conn.closed().await })
    };
    let reason = "kelp forced-close test";
    let closed = tokio::task::spawn_blocking(move || {
        rabbitmqctl(&["-q", "close_connection", &pid, reason]).is_some()
    })
    .await
    .unwrap();
    assert!(closed, "rabbitmqctl close_connection failed");

    // The consumer ends with the close.
    let item = common::within("consumer after forced close", LIMIT, consumer.recv()).await;
    let err = match item {
        Some(Err(e)) => e,
        other => panic!("consumer should end with an error, got {other:?}"),
    };
    match &err {
        Error::ConnectionClosed(r) => {
            assert_eq!(r.code, reply_code::CONNECTION_FORCED, "{err}");
            assert!(r.text.contains("CONNECTION_FORCED"), "{err}");
            assert!(r.text.contains(reason), "{err}");
        }
        other => panic!("expected ConnectionClosed 320, got {other:?}"),
    }
    assert!(err.is_connection_error());
    assert!(common::within("consumer end", FAST, consumer.recv())
        .await
        .is_none());

    // Everything reports it, and fails at once with it.
    let why = common::within("closed() after forced close", FAST, waiter)
        .await
        .unwrap();
    assert_eq!(why.to_string(), err.to_string());
    let again = common::within("closed() on a closed connection", FAST, conn.closed()).await;
    assert_eq!(again.to_string(), err.to_string());
    assert!(conn.is_closed());
    assert!(ch.is_closed());
    assert_eq!(
        conn.close_error().map(|e| e.to_string()),
        Some(err.to_string())
    );
    let e = common::within(
        "declare after forced close",
        FAST,
        ch.queue_declare("", QueueDeclareOptions::default(), FieldTable::new()),
    )
    .await
    .unwrap_err();
    assert_eq!(e.to_string(), err.to_string());
    let e = common::within("channel after forced close", FAST, conn.channel())
        .await
        .unwrap_err();
    assert_eq!(e.to_string(), err.to_string());
    let e = common::within(
        "publish after forced close",
        FAST,
        confirm_ch.basic_publish(
            "",
            &q,
            PublishOptions::default(),
            BasicProperties::default(),
            "x",
        ),
    )
    .await
    .unwrap_err();
    assert_eq!(e.to_string(), err.to_string());
    let e = common::within("close after forced close", FAST, conn.close())
        .await
        .unwrap_err();
    assert_eq!(e.to_string(), err.to_string());
}
