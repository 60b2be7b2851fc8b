//! TLS with a client certificate and SASL EXTERNAL: the broker takes the user name from the
//! certificate, no password travels.
//!
//! ```text
//! KELP_TLS_HOST=rabbit.example.com:5671 \
//! KELP_TLS_CA=ca.pem KELP_TLS_CERT=client.pem KELP_TLS_KEY=client.key \
//!   cargo run -p kelp --example tls_client_cert
//! ```
//!
//! RabbitMQ needs the `rabbitmq_auth_mechanism_ssl` plugin, a TLS listener that asks for
//! client certificates (`ssl_options.verify = verify_peer`,
//! `ssl_options.fail_if_no_peer_cert = true`) and a user named after the certificate's subject
//! (or CN, with `ssl_cert_login_from = common_name`). Without the variables the example
//! prints what it would do and exits.

use std::time::Duration;

use kelp::{Connection, Producer, PublishOptions, Queue};

type Error = Box<dyn std::error::Error + Send + Sync>;

/// Percent-encode a file path for the URL's query.
fn enc(path: &str) -> String {
    percent_encoding::utf8_percent_encode(path, percent_encoding::NON_ALPHANUMERIC).to_string()
}

#[tokio::main]
async fn main() -> Result<(), Error> {
    let vars = [
        "KELP_TLS_HOST",
        "KELP_TLS_CA",
        "KELP_TLS_CERT",
        "KELP_TLS_KEY",
    ];
    let values: Vec<Option<String>> = vars.iter().map(|v| std::env::var(v).ok()).collect();
    let [Some(host), Some(ca), Some(cert), Some(key)] = values.as_slice() else {
        println!(
            "set {} to run against a broker; the URL would be \
             amqps://HOST/%2f?auth_mechanism=EXTERNAL&cacertfile=CA&certfile=CERT&keyfile=KEY",
            vars.join(", ")
        );
        return Ok(());
    };
    let url = format!(
        "amqps://{host}/%2f?auth_mechanism=EXTERNAL&cacertfile={}&certfile={}&keyfile={}",
        enc(ca),
        enc(cert),
        enc(key)
    );
    let conn = Connection::builder()
        .url(url)
        .connect_timeout(Duration::from_secs(10))
        .connect()
        .await?;
    let ch = conn.channel().await?;
    let queue = ch.declare_queue(Queue::new("").exclusive(true)).await?;
    Producer::new(&ch)
        .publish(
            "over TLS, as the certificate's user",
            PublishOptions::default().routing_key(&queue.name),
        )
        .await?;
    let got = ch.raw().get(&queue.name, true).await?;
    println!(
        "round trip over TLS with EXTERNAL: {:?}",
        got.map(|d| String::from_utf8_lossy(&d.body).into_owned())
    );
    conn.close().await?;
    Ok(())
}
