//! kelp's error type: one enum for the library layer, wrapping the layers below with context.

use std::time::Duration;

use crate::compression::CompressionError;
use crate::serialization::SerializationError;
use crate::transport::virtual_broker::BrokerError;

/// Everything that can go wrong in kelp.
///
/// ```
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() {
/// let err = kelp::Connection::open("carrier-pigeon://coop").await.unwrap_err();
/// assert!(matches!(err, kelp::Error::UnknownTransport { .. }));
/// println!("{err}");
/// # }
/// ```
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The URL names a scheme no transport handles.
    #[error(
        "unknown transport `{scheme}` in URL {url}: kelp knows amqp://, amqps://, redis://, rediss://, sentinel://, sqlite:// and memory://"
    )]
    UnknownTransport {
        /// The scheme found.
        scheme: String,
        /// The URL, password masked.
        url: String,
    },
    /// The URL is malformed.
    #[error("invalid URL {url}: {reason}")]
    Url {
        /// The URL, password masked.
        url: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The AMQP client failed (connection, channel, protocol).
    #[error(transparent)]
    Amqp(#[from] kelp_amqp::Error),
    /// The in-process broker refused an operation (404, 406, 405, 403 as in AMQP).
    #[error(transparent)]
    Broker(#[from] BrokerError),
    /// A body could not be serialized or deserialized, or its content type is not accepted.
    #[error(transparent)]
    Serialization(#[from] SerializationError),
    /// A body could not be compressed or decompressed.
    #[error(transparent)]
    Compression(#[from] CompressionError),
    /// `ack`, `reject` or `requeue` on a message already acknowledged, rejected or requeued.
    #[error("message already {state}: cannot {action} it")]
    MessageState {
        /// What was done to it before.
        state: &'static str,
        /// What was asked now.
        action: &'static str,
    },
    /// A mandatory publish could not be routed and came back.
    #[error("message returned by the broker: {reply_code} {reply_text} (exchange `{exchange}`, routing key `{routing_key}`)")]
    Returned {
        /// The reply code (312 NO_ROUTE).
        reply_code: u16,
        /// The reply text.
        reply_text: String,
        /// The exchange published to.
        exchange: String,
        /// The routing key published with.
        routing_key: String,
    },
    /// The broker refused a publish under publisher confirms.
    #[error("publish nacked by the broker (exchange `{exchange}`, routing key `{routing_key}`)")]
    Nacked {
        /// The exchange published to.
        exchange: String,
        /// The routing key published with.
        routing_key: String,
    },
    /// An operation did not finish in time.
    #[error("timed out after {after:?} waiting for {what}")]
    Timeout {
        /// What was waited for.
        what: &'static str,
        /// How long.
        after: Duration,
    },
    /// `immediate` publishing was asked for.
    #[error("the `immediate` flag is not supported by RabbitMQ 3.0 and later (nor by kelp's other transports); use a TTL of 0 or mandatory instead")]
    ImmediateNotSupported,
    /// The transport cannot do this.
    #[error("the {transport} transport does not support {what}")]
    NotSupported {
        /// The transport's name.
        transport: &'static str,
        /// The operation.
        what: &'static str,
    },
    /// The connection or channel is closed.
    #[error("{what} is closed")]
    Closed {
        /// Which handle.
        what: &'static str,
    },
    /// The broker cancelled a consumer (its queue was deleted, or its node failed).
    #[error("consumer `{consumer_tag}` on queue `{queue}` was cancelled by the broker")]
    ConsumerCancelled {
        /// The consumer's tag.
        consumer_tag: String,
        /// Its queue.
        queue: String,
    },
    /// A queue had no message to give (`get_nowait`, or `get` that timed out) — Kombu's
    /// `Empty` / aio-pika's `QueueEmpty`.
    #[error("queue {queue:?} is empty")]
    QueueEmpty {
        /// The queue.
        queue: String,
    },
    /// A header or property value cannot be carried by the transport.
    /// A stored entry is not a message (a Redis list entry that is not Kombu's envelope, …).
    /// Its raw bytes are the message body; reject it to drop it.
    #[error("the {transport} entry is not a message: {reason}")]
    InvalidEntry {
        /// The transport it came from.
        transport: &'static str,
        /// What is wrong with it.
        reason: String,
    },
    /// The SQLite file of a `sqlite://` transport could not be used.
    #[error("SQLite file {path}: {what}: {reason}")]
    Sqlite {
        /// The file.
        path: String,
        /// What kelp was doing.
        what: &'static str,
        /// SQLite's message (or what is wrong with the file).
        reason: String,
    },
    /// A Redis command failed.
    #[error("Redis {context}: {source}")]
    Redis {
        /// What kelp was doing.
        context: &'static str,
        /// The `redis` crate's error.
        #[source]
        source: std::sync::Arc<redis::RedisError>,
    },
    /// An ack, nack or reject for a message delivered before a robust connection recovered: its
    /// delivery tag means nothing on the new channel. The broker delivers the message again
    /// (with `redelivered` set), so the usual handling is to log and move on.
    #[error("delivery {delivery_tag} came on a channel that has since been recovered; the broker redelivers the message")]
    StaleDelivery {
        /// The broker's tag of the stale delivery.
        delivery_tag: u64,
    },
    /// A robust connection stayed down longer than its outage timeout while a call waited.
    #[error("the connection to {url} is down and did not come back within {waited:?}")]
    ConnectionDown {
        /// How long the call waited.
        waited: Duration,
        /// The broker's URL (password masked).
        url: String,
    },
    #[error("invalid {what}: {reason}")]
    InvalidArgument {
        /// What was given.
        what: &'static str,
        /// Why it is refused.
        reason: String,
    },
}

impl Error {
    /// The AMQP reply code behind this error, if there is one (404, 406, …).
    ///
    /// ```no_run
    /// # async fn demo(ch: &kelp::Channel) {
    /// let err = ch.get_queue("no-such-queue", true).await.unwrap_err();
    /// assert_eq!(err.reply_code(), Some(404));
    /// # }
    /// ```
    pub fn reply_code(&self) -> Option<u16> {
        match self {
            Error::Amqp(e) => e.reply_code(),
            Error::Broker(e) => Some(e.amqp_reply_code()),
            Error::Returned { reply_code, .. } => Some(*reply_code),
            _ => None,
        }
    }

    /// True for errors that a reconnect may cure (the connection broke, a timeout).
    ///
    /// ```
    /// let e = kelp::Error::Closed { what: "connection" };
    /// assert!(e.is_connection_error());
    /// ```
    pub fn is_connection_error(&self) -> bool {
        match self {
            Error::Amqp(e) => !matches!(
                e,
                kelp_amqp::Error::ChannelClosed { .. } | kelp_amqp::Error::ConsumerCancelled { .. }
            ),
            Error::Closed { what } => *what == "connection",
            Error::Timeout { .. } | Error::ConnectionDown { .. } => true,
            Error::Redis { source, .. } => {
                source.is_io_error()
                    || source.is_connection_dropped()
                    || source.is_connection_refusal()
                    || source.is_timeout()
            }
            _ => false,
        }
    }
}

/// `url` with any password replaced by `****`, for messages and logs.
///
/// ```
/// assert_eq!(kelp::error::mask_url("amqp://bob:s3cret@host//"), "amqp://bob:****@host//");
/// ```
pub fn mask_url(url: &str) -> String {
    // A failover list (`amqp://a;amqp://b`, `sentinel://a;sentinel://b`): each one masked.
    url.split(';').map(mask_one).collect::<Vec<_>>().join(";")
}

/// Query options that hold a secret.
const SECRET_OPTIONS: &[&str] = &["password", "sentinel_password"];

fn mask_one(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    let (authority, tail) = match rest.find(['/', '?', '#']) {
        Some(i) => rest.split_at(i),
        None => (rest, ""),
    };
    let authority = match authority.rsplit_once('@') {
        Some((userinfo, host)) => match userinfo.split_once(':') {
            Some((user, _)) => format!("{user}:****@{host}"),
            None => authority.to_owned(),
        },
        None => authority.to_owned(),
    };
    let tail = match tail.split_once('?') {
        Some((path, query)) => {
            let query: Vec<String> = query
                .split('&')
                .map(|pair| match pair.split_once('=') {
                    Some((k, _)) if SECRET_OPTIONS.contains(&k) => format!("{k}=****"),
                    _ => pair.to_owned(),
                })
                .collect();
            format!("{path}?{}", query.join("&"))
        }
        None => tail.to_owned(),
    };
    format!("{scheme}://{authority}{tail}")
}

#[cfg(test)]
mod tests {
    use super::mask_url;

    #[test]
    fn masks_passwords_only() {
        assert_eq!(
            mask_url("amqp://guest:s3cr3t@host:5672//"),
            "amqp://guest:****@host:5672//"
        );
        assert_eq!(mask_url("amqp://host//"), "amqp://host//");
        assert_eq!(mask_url("amqp://user@host/"), "amqp://user@host/");
        assert_eq!(mask_url("memory://"), "memory://");
        assert_eq!(mask_url("redis://:pw@h:1/0"), "redis://:****@h:1/0");
        assert_eq!(mask_url("no scheme"), "no scheme");
        assert_eq!(
            mask_url("sentinel://:a@h1:26379;sentinel://:b@h2:26380/0?master_name=m&sentinel_password=c"),
            "sentinel://:****@h1:26379;sentinel://:****@h2:26380/0?master_name=m&sentinel_password=****"
        );
        assert_eq!(
            mask_url("amqp://u:p@h1//;amqp://u:q@h2//"),
            "amqp://u:****@h1//;amqp://u:****@h2//"
        );
    }
}
