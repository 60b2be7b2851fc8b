//! The error of the engine, driver and API layers.
//!
//! Broker-initiated closes carry the broker's [`CloseReason`] (reply code, text, and the class and
//! method that caused it), so `404 NOT_FOUND` after a passive `queue.declare` is a value the caller
//! can match on, not a string to parse.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use thiserror::Error;

use crate::codec::{method_name, DecodeError, EncodeError};

/// AMQP reply codes (AMQP 0-9-1 §1.9 constants).
pub mod reply_code {
    /// Normal close.
    pub const REPLY_SUCCESS: u16 = 200;
    /// Content too large.
    pub const CONTENT_TOO_LARGE: u16 = 311;
    /// No route for a mandatory message.
    pub const NO_ROUTE: u16 = 312;
    /// No consumers for an immediate message.
    pub const NO_CONSUMERS: u16 = 313;
    /// Operator forced the connection closed.
    pub const CONNECTION_FORCED: u16 = 320;
    /// Invalid path (e.g. an unknown vhost).
    pub const INVALID_PATH: u16 = 402;
    /// Access refused (permissions, or authentication failure).
    pub const ACCESS_REFUSED: u16 = 403;
    /// Entity not found.
    pub const NOT_FOUND: u16 = 404;
    /// Resource locked (exclusive queue of another connection).
    pub const RESOURCE_LOCKED: u16 = 405;
    /// Precondition failed (e.g. redeclare with other flags).
    pub const PRECONDITION_FAILED: u16 = 406;
    /// Frame error.
    pub const FRAME_ERROR: u16 = 501;
    /// Syntax error.
    pub const SYNTAX_ERROR: u16 = 502;
    /// Command invalid.
    pub const COMMAND_INVALID: u16 = 503;
    /// Channel error.
    pub const CHANNEL_ERROR: u16 = 504;
    /// Unexpected frame.
    pub const UNEXPECTED_FRAME: u16 = 505;
    /// Resource error.
    pub const RESOURCE_ERROR: u16 = 506;
    /// Not allowed (e.g. vhost access).
    pub const NOT_ALLOWED: u16 = 530;
    /// Not implemented.
    pub const NOT_IMPLEMENTED: u16 = 540;
    /// Internal error.
    pub const INTERNAL_ERROR: u16 = 541;
}

/// Why a peer closed a channel or connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CloseReason {
    /// AMQP reply code, see [`reply_code`].
    pub code: u16,
    /// The peer's text, e.g. `NOT_FOUND - no queue 'x' in vhost '/'`.
    pub text: String,
    /// Class of the method that caused the close (0 if none).
    pub class_id: u16,
    /// Method that caused the close (0 if none).
    pub method_id: u16,
}

impl CloseReason {
    /// The name of the method that caused the close, e.g. `Some("queue.declare")`.
    pub fn method(&self) -> Option<&'static str> {
        method_name(self.class_id, self.method_id)
    }
}

impl fmt::Display for CloseReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}", self.code, self.text)?;
        match self.method() {
            Some(m) => write!(f, " (caused by {m})"),
            None if self.class_id != 0 => {
                write!(f, " (caused by {}.{})", self.class_id, self.method_id)
            }
            None => Ok(()),
        }
    }
}

/// A protocol violation, by the peer or detected in its bytes.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum ProtocolError {
    /// The peer's bytes did not decode.
    #[error(transparent)]
    Decode(#[from] DecodeError),
    /// A frame that the protocol does not allow in the current state.
    #[error("unexpected {what} on channel {channel}{}", if .state.is_empty() { String::new() } else { format!(" while {}", .state) })]
    UnexpectedFrame {
        /// Channel.
        channel: u16,
        /// What arrived, e.g. `queue.declare-ok` or `body frame`.
        what: String,
        /// What the engine was doing.
        state: &'static str,
    },
    /// A body larger than its content header announced.
    #[error("body on channel {channel} exceeds the {announced} bytes its header announced")]
    BodyTooLong {
        /// Channel.
        channel: u16,
        /// Announced size.
        announced: u64,
    },
    /// A message larger than the configured maximum.
    #[error("message of {size} bytes on channel {channel} exceeds max_message_size {limit}")]
    MessageTooLarge {
        /// Channel.
        channel: u16,
        /// Announced size.
        size: u64,
        /// Configured maximum.
        limit: u64,
    },
    /// The server offered none of the SASL mechanisms we can use.
    #[error("server offers SASL mechanisms {offered:?}, not {wanted}")]
    MechanismUnavailable {
        /// What we wanted.
        wanted: &'static str,
        /// What the server offers.
        offered: String,
    },
    /// The server spoke an AMQP version other than 0-9-1.
    #[error("server speaks AMQP {major}-{minor}, not 0-9-1")]
    Version {
        /// Major.
        major: u8,
        /// Minor.
        minor: u8,
    },
}

/// The error of every operation on a connection or channel.
#[derive(Debug, Clone, Error)]
#[non_exhaustive]
pub enum Error {
    /// The broker closed the channel; the channel is unusable from then on.
    #[error("channel {channel} closed by the broker: {reason}")]
    ChannelClosed {
        /// Channel id.
        channel: u16,
        /// The broker's reason.
        reason: CloseReason,
    },
    /// The broker closed the connection.
    #[error("connection closed by the broker: {0}")]
    ConnectionClosed(CloseReason),
    /// The channel was closed by this client.
    #[error("channel {0} was closed by the client")]
    ChannelClosedByClient(u16),
    /// The connection was closed by this client.
    #[error("connection was closed by the client")]
    ConnectionClosedByClient,
    /// The broker refused the credentials.
    #[error("authentication failed for user {user:?} (mechanism {mechanism}): {detail}")]
    AuthenticationFailed {
        /// The user name (never the password).
        user: String,
        /// SASL mechanism.
        mechanism: &'static str,
        /// What the broker said.
        detail: String,
    },
    /// The broker refused access to the virtual host.
    #[error("access to vhost {vhost:?} refused: {reason}")]
    VhostAccess {
        /// The vhost.
        vhost: String,
        /// The broker's reason.
        reason: CloseReason,
    },
    /// A protocol violation; the connection is closed.
    #[error("protocol error: {0}")]
    Protocol(#[from] ProtocolError),
    /// A value could not be encoded (too long a name, a frame over frame_max).
    #[error("cannot encode: {0}")]
    Encode(#[from] EncodeError),
    /// Socket error.
    #[error("I/O error on {context}: {source}")]
    Io {
        /// What was being done.
        context: String,
        /// The error.
        #[source]
        source: Arc<std::io::Error>,
    },
    /// No frame arrived for two heartbeat intervals.
    #[error("missed heartbeats: no frame from the server for {0:?}")]
    MissedHeartbeats(Duration),
    /// Connecting took longer than the connection timeout.
    #[error("connecting to {addr} timed out after {timeout:?}")]
    ConnectTimeout {
        /// host:port.
        addr: String,
        /// The timeout.
        timeout: Duration,
    },
    /// TLS set-up failed.
    #[error("TLS: {0}")]
    Tls(String),
    /// The URL was invalid.
    #[error("invalid URL: {0}")]
    Url(Arc<crate::url::UrlError>),
    /// The broker cancelled a consumer (its queue was deleted, or its node went down).
    #[error("consumer {consumer_tag:?} on channel {channel} was cancelled by the broker")]
    ConsumerCancelled {
        /// Channel.
        channel: u16,
        /// Consumer tag.
        consumer_tag: String,
    },
    /// All channel ids are in use.
    #[error("no free channel id (channel_max is {0})")]
    ChannelsExhausted(u16),
    /// The operation needs a state the channel is not in (e.g. a confirm on a non-confirm channel).
    #[error("invalid use: {0}")]
    InvalidUse(&'static str),
    /// The connection's driver task ended (runtime shut down or it panicked).
    #[error("the connection's I/O task is gone")]
    DriverGone,
}

impl Error {
    /// The broker's close reason, for channel and connection closes.
    pub fn close_reason(&self) -> Option<&CloseReason> {
        match self {
            Error::ChannelClosed { reason, .. }
            | Error::ConnectionClosed(reason)
            | Error::VhostAccess { reason, .. } => Some(reason),
            _ => None,
        }
    }
    /// The AMQP reply code, if the broker closed something.
    pub fn reply_code(&self) -> Option<u16> {
        self.close_reason().map(|r| r.code)
    }
    pub(crate) fn io(context: impl Into<String>, e: std::io::Error) -> Self {
        Error::Io {
            context: context.into(),
            source: Arc::new(e),
        }
    }
    /// True when the error means the whole connection is gone (as opposed to one channel).
    pub fn is_connection_error(&self) -> bool {
        !matches!(
            self,
            Error::ChannelClosed { .. }
                | Error::ChannelClosedByClient(_)
                | Error::Encode(_)
                | Error::InvalidUse(_)
                | Error::ChannelsExhausted(_)
                | Error::ConsumerCancelled { .. }
        )
    }
}

impl From<DecodeError> for Error {
    fn from(e: DecodeError) -> Self {
        Error::Protocol(ProtocolError::Decode(e))
    }
}
