//! What the engine needs to know to open a connection.

use std::fmt;

use crate::codec::{FieldTable, FieldValue};

/// SASL mechanism and credentials.
#[derive(Clone, PartialEq, Eq)]
pub enum Sasl {
    /// `PLAIN`: `\0user\0password`.
    Plain {
        /// User.
        user: String,
        /// Password (never printed).
        password: String,
    },
    /// `AMQPLAIN`: a field table with LOGIN and PASSWORD.
    AmqPlain {
        /// User.
        user: String,
        /// Password (never printed).
        password: String,
    },
    /// `EXTERNAL`: identity from the TLS client certificate.
    External,
}

impl Sasl {
    /// The mechanism name on the wire.
    pub fn mechanism(&self) -> &'static str {
        match self {
            Sasl::Plain { .. } => "PLAIN",
            Sasl::AmqPlain { .. } => "AMQPLAIN",
            Sasl::External => "EXTERNAL",
        }
    }
    /// The user name, for error messages.
    pub fn user(&self) -> &str {
        match self {
            Sasl::Plain { user, .. } | Sasl::AmqPlain { user, .. } => user,
            Sasl::External => "(certificate)",
        }
    }
    pub(crate) fn response(&self) -> Result<bytes::Bytes, crate::codec::EncodeError> {
        Ok(match self {
            Sasl::Plain { user, password } => {
                let mut v = Vec::with_capacity(user.len() + password.len() + 2);
                v.push(0);
                v.extend_from_slice(user.as_bytes());
                v.push(0);
                v.extend_from_slice(password.as_bytes());
                bytes::Bytes::from(v)
            }
            Sasl::AmqPlain { user, password } => FieldTable::new()
                .with("LOGIN", user.as_str())
                .with("PASSWORD", password.as_str())
                .encode_entries()?,
            Sasl::External => bytes::Bytes::new(),
        })
    }
}

impl fmt::Debug for Sasl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Sasl::External => f.write_str("External"),
            other => write!(
                f,
                "{}{{ user: {:?}, password: \"****\" }}",
                other.mechanism(),
                other.user()
            ),
        }
    }
}

/// Connection parameters the engine negotiates with.
#[derive(Debug, Clone)]
pub struct Config {
    /// Credentials.
    pub sasl: Sasl,
    /// Virtual host.
    pub vhost: String,
    /// Heartbeat we ask for, seconds; `None` takes the server's, `Some(0)` disables.
    pub heartbeat: Option<u16>,
    /// Largest frame we accept (the lower of ours and the server's wins).
    pub frame_max: u32,
    /// Most channels we want (the lower of ours and the server's wins).
    pub channel_max: u16,
    /// Largest message body we accept from the server.
    pub max_message_size: u64,
    /// Shown in the management UI.
    pub connection_name: Option<String>,
    /// Extra client properties.
    pub client_properties: FieldTable,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            sasl: Sasl::Plain {
                user: "guest".into(),
                password: "guest".into(),
            },
            vhost: "/".into(),
            heartbeat: Some(60),
            frame_max: 131_072,
            channel_max: 2047,
            max_message_size: 128 << 20,
            connection_name: None,
            client_properties: FieldTable::new(),
        }
    }
}

impl Config {
    pub(crate) fn client_properties(&self) -> FieldTable {
        let caps = FieldTable::new()
            .with("publisher_confirms", true)
            .with("exchange_exchange_bindings", true)
            .with("basic.nack", true)
            .with("consumer_cancel_notify", true)
            .with("connection.blocked", true)
            .with("authentication_failure_close", true)
            .with("per_consumer_qos", true)
            .with("direct_reply_to", true);
        let mut t = FieldTable::new()
            .with("product", "kelp")
            .with("version", env!("CARGO_PKG_VERSION"))
            .with("platform", "Rust")
            .with("information", "https://example.invalid/kelp")
            .with("capabilities", FieldValue::Table(caps));
        if let Some(n) = &self.connection_name {
            t.insert("connection_name", n.as_str());
        }
        for (k, v) in self.client_properties.iter() {
            t.insert(k.clone(), v.clone());
        }
        t
    }
}
