//! Shared by the broker tests: find the broker or skip visibly.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

/// The AMQP URL of the local RabbitMQ (`KELP_AMQP_URL` overrides).
pub fn amqp_url() -> String {
    std::env::var("KELP_AMQP_URL")
        .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into())
}

/// True if the broker answers. Under `KELP_REQUIRE_BROKERS=1` (CI) a missing broker fails the
/// test; otherwise the test prints a visible SKIP line and passes.
pub fn broker_up(test: &str) -> bool {
    let addr: SocketAddr = std::env::var("KELP_AMQP_ADDR")
        .unwrap_or_else(|_| "127.0.0.1:5672".into())
        .parse()
        .expect("KELP_AMQP_ADDR must be host:port");
    if TcpStream::connect_timeout(&addr, Duration::from_secs(2)).is_ok() {
        return true;
    }
    if std::env::var("KELP_REQUIRE_BROKERS").as_deref() == Ok("1") {
        panic!("{test}: RabbitMQ is not answering on {addr} and KELP_REQUIRE_BROKERS=1");
    }
    eprintln!("SKIP {test}: no RabbitMQ on {addr} (start it with `rabbitmq-server -detached`)");
    false
}

/// Skip the calling test unless RabbitMQ answers.
#[macro_export]
macro_rules! require_rabbitmq {
    ($name:expr) => {
        if !common::broker_up($name) {
            return;
        }
    };
}

static N: AtomicU32 = AtomicU32::new(0);

/// A name unique to this process and call, for queues and exchanges.
pub fn unique(prefix: &str) -> String {
    format!(
        "kelp-test-{prefix}-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

/// `host:port` of the local RabbitMQ (`KELP_AMQP_ADDR` overrides), as `broker_up` probes it.
pub fn amqp_addr() -> String {
    std::env::var("KELP_AMQP_ADDR").unwrap_or_else(|_| "127.0.0.1:5672".into())
}

/// A URL to the broker at [`amqp_addr`] with the given credentials, vhost path segment (already
/// percent-encoded, e.g. `%2f`) and query (without `?`, may be empty).
pub fn amqp_url_with(user: &str, password: &str, vhost: &str, query: &str) -> String {
    let q = if query.is_empty() {
        String::new()
    } else {
        format!("?{query}")
    };
    format!("amqp://{user}:{password}@{}/{vhost}{q}", amqp_addr())
}

/// Await `fut`, failing the test (instead of hanging it) after `limit`.
pub async fn within<F: std::future::Future>(what: &str, limit: Duration, fut: F) -> F::Output {
    match tokio::time::timeout(limit, fut).await {
        Ok(v) => v,
        Err(_) => panic!("{what}: no answer within {limit:?} (hang)"),
    }
}
