//! Errors and the exit codes scripts rely on.

use std::fmt;

use serde_json::json;

/// Bad arguments, a bad URL or an unknown transport.
pub const USAGE: u8 = 1;
/// Cannot connect, or the broker refused.
pub const BROKER: u8 = 2;
/// Nothing there: an empty queue, a consume timeout without a message.
pub const EMPTY: u8 = 3;
/// A publish was nacked or returned.
pub const NACKED: u8 = 4;
/// An RPC call failed remotely, timed out or expired.
pub const RPC_FAILED: u8 = 5;

/// An error with the exit code it maps to.
#[derive(Debug)]
pub struct CliError {
    /// The process exit code.
    pub code: u8,
    /// A short machine-readable kind (`usage`, `connection`, `broker`, `nacked`, …).
    pub kind: &'static str,
    /// What went wrong.
    pub message: String,
    /// A hint on what to do about it.
    pub hint: Option<String>,
}

impl CliError {
    /// A usage error (exit 1).
    pub fn usage(message: impl Into<String>) -> Self {
        CliError {
            code: USAGE,
            kind: "usage",
            message: message.into(),
            hint: None,
        }
    }

    /// An error with an explicit code and kind.
    pub fn new(code: u8, kind: &'static str, message: impl Into<String>) -> Self {
        CliError {
            code,
            kind,
            message: message.into(),
            hint: None,
        }
    }

    /// A kelp error, with what kelp was doing (`context`), mapped to its exit code.
    pub fn kelp(e: kelp::Error, context: impl fmt::Display) -> Self {
        use kelp::Error as E;
        let (code, kind) = match &e {
            E::UnknownTransport { .. } => (USAGE, "unknown_transport"),
            E::Url { .. } => (USAGE, "invalid_url"),
            E::InvalidArgument { .. } | E::ImmediateNotSupported => (USAGE, "usage"),
            E::Serialization(_) | E::Compression(_) => (USAGE, "encoding"),
            E::Nacked { .. } => (NACKED, "nacked"),
            E::Returned { .. } => (NACKED, "returned"),
            E::QueueEmpty { .. } => (EMPTY, "empty"),
            e if e.is_connection_error() => (BROKER, "connection"),
            _ => (BROKER, "broker"),
        };
        let hint = match &e {
            E::UnknownTransport { scheme, .. } if scheme.eq_ignore_ascii_case("sqlite") => Some(
                "the sqlite:// transport is not part of this build of kelp yet; pass --url (or \
set KELP_URL) to amqp://..., redis://... or memory://"
                    .to_owned(),
            ),
            E::UnknownTransport { .. } => {
                Some("pass --url (or set KELP_URL) to a URL kelp knows".to_owned())
            }
            _ => None,
        };
        CliError {
            code,
            kind,
            message: format!("{context}: {e}"),
            hint,
        }
    }

    /// Print it on stderr, as text or as one JSON object.
    pub fn report(&self, json_mode: bool) {
        if json_mode {
            let mut v = json!({
                "error": self.message,
                "kind": self.kind,
                "exit_code": self.code,
            });
            if let (Some(h), Some(m)) = (&self.hint, v.as_object_mut()) {
                m.insert("hint".into(), json!(h));
            }
            eprintln!("{v}");
        } else if self.code == EMPTY {
            eprintln!("kelp: {}", self.message);
        } else {
            eprintln!("kelp: error: {}", self.message);
            if let Some(h) = &self.hint {
                eprintln!("kelp: hint: {h}");
            }
        }
    }
}

impl fmt::Display for CliError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

/// Map a kelp result with context.
pub trait Context<T> {
    /// Attach what kelp was doing.
    fn ctx(self, context: impl fmt::Display) -> Result<T, CliError>;
}

impl<T> Context<T> for Result<T, kelp::Error> {
    fn ctx(self, context: impl fmt::Display) -> Result<T, CliError> {
        self.map_err(|e| CliError::kelp(e, context))
    }
}
