//! The transport conformance suite: every test is written once against kelp's public API and
//! runs on every transport (`memory://` and the local RabbitMQ today; see `common/mod.rs` to add
//! one). RabbitMQ is the reference: where the two differ, memory is wrong.
//!
//! Each test `foo` in `conformance/<area>.rs` becomes `<area>::foo::memory`, `<area>::foo::amqp`,
//! … Broker tests print `SKIP …` and pass when the broker is down, unless
//! `KELP_REQUIRE_BROKERS=1`.
//!
//! ```text
//! cargo test -p kelp --test conformance -- --test-threads=2
//! cargo test -p kelp --test conformance -- ::memory        # one transport
//! cargo test -p kelp --test conformance -- --ignored       # known bugs only
//! ```
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

#[macro_use]
mod common;

#[path = "conformance/ack.rs"]
mod ack;
#[path = "conformance/lifecycle.rs"]
mod lifecycle;
#[path = "conformance/props.rs"]
mod props;
#[path = "conformance/routing.rs"]
mod routing;
#[path = "conformance/serialization.rs"]
mod serialization;

/// An unknown URL scheme is a typed error on every entry point, before any I/O.
#[tokio::test]
async fn unknown_url_scheme_is_a_typed_error() {
    for url in [
        "carrier-pigeon://coop",
        "redis+nope://x/0",
        "no-scheme-at-all",
    ] {
        let err = common::within("open", kelp::Connection::open(url))
            .await
            .unwrap_err();
        match err {
            kelp::Error::UnknownTransport { .. } => {}
            other => panic!("{url}: expected Error::UnknownTransport, got {other:?}"),
        }
    }
    let err = common::within(
        "builder connect",
        kelp::Connection::builder()
            .url("carrier-pigeon://user:secret@coop")
            .connect(),
    )
    .await
    .unwrap_err();
    let shown = err.to_string();
    match &err {
        kelp::Error::UnknownTransport { scheme, .. } => assert_eq!(scheme, "carrier-pigeon"),
        other => panic!("expected Error::UnknownTransport, got {other:?}"),
    }
    assert!(!shown.contains("secret"), "password leaked: {shown}");
}
