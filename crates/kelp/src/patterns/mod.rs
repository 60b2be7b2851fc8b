//! Messaging patterns: RPC and master/worker, wire-compatible with aio-pika.
//!
//! | kelp | aio-pika (`aio_pika.patterns`) |
//! |---|---|
//! | [`Rpc`] with [`Format::Pickle`] | `RPC` |
//! | [`Rpc`] with [`Format::Json`] | `JsonRPC` |
//! | [`Master`] with [`Format::Pickle`] | `Master` |
//! | [`Master`] with [`Format::Json`] | `JsonMaster` |
//!
//! A kelp caller can call an aio-pika callee and the other way round, and an aio-pika master
//! can feed kelp workers (and back): queue names, exchanges, headers, message types, content
//! types and error payloads are aio-pika's (9.5), written down in [`rpc`] and [`master`].
//! Pickle bodies are read with kelp's safe pickle reader, which never imports or runs anything;
//! only plain data (and, for RPC errors, the class name and arguments of a pickled exception)
//! can be read.
//!
//! ```no_run
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! use kelp::patterns::{Format, Rpc, RpcOptions};
//! use serde_json::{json, Value};
//!
//! let conn = kelp::Connection::open("amqp://guest:guest@localhost//").await?;
//! let ch = conn.channel().await?;
//! let rpc = Rpc::create(&ch, RpcOptions::new(Format::Json)).await?;
//! rpc.register("multiply", |kw: Value| async move {
//!     Ok(kw["x"].as_i64().unwrap_or(0) * kw["y"].as_i64().unwrap_or(0))
//! })
//! .await?;
//! assert_eq!(rpc.call("multiply", &json!({"x": 6, "y": 7})).await?, json!(42));
//! # Ok(()) }
//! ```

pub mod master;
mod pyexc;
pub mod rpc;

use std::sync::OnceLock;

use bytes::Bytes;
use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::error::Error;
use crate::serialization::{Registry, SerializationError};

pub use master::{Master, MasterOptions, TaskError, Worker, WorkerOptions};
pub use rpc::{CallOptions, RegisterOptions, RemoteError, Rpc, RpcError, RpcOptions};

/// How a pattern serializes its bodies: aio-pika's `RPC`/`Master` use pickle, `JsonRPC` /
/// `JsonMaster` use JSON.
///
/// ```
/// use kelp::patterns::Format;
/// assert_eq!(Format::Json.content_type(), "application/json");
/// assert_eq!(Format::Pickle.content_type(), "application/python-pickle");
/// assert_eq!(Format::default(), Format::Pickle);
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Format {
    /// `pickle.dumps` / `pickle.loads` (aio-pika's `RPC` and `Master`); content type
    /// `application/python-pickle`. kelp writes protocol 3 and reads protocols 0–5 safely.
    #[default]
    Pickle,
    /// `json.dumps(ensure_ascii=False)` as UTF-8 (aio-pika's `JsonRPC` and `JsonMaster`);
    /// content type `application/json`.
    Json,
}

/// aio-pika's own content type for pickle (Kombu says `application/x-python-serialize`).
const PICKLE_CONTENT_TYPE: &str = "application/python-pickle";
/// What kelp's registry calls pickle.
const KOMBU_PICKLE: &str = "application/x-python-serialize";

fn builtins() -> &'static Registry {
    static R: OnceLock<Registry> = OnceLock::new();
    R.get_or_init(Registry::default)
}

impl Format {
    /// The `content_type` aio-pika writes for this format.
    ///
    /// ```
    /// assert_eq!(kelp::patterns::Format::Pickle.content_type(), "application/python-pickle");
    /// ```
    pub fn content_type(self) -> &'static str {
        match self {
            Format::Pickle => PICKLE_CONTENT_TYPE,
            Format::Json => "application/json",
        }
    }

    pub(crate) fn encode<T: Serialize + ?Sized>(self, value: &T) -> Result<Bytes, Error> {
        match self {
            Format::Json => serde_json::to_vec(value).map(Bytes::from).map_err(|e| {
                Error::Serialization(SerializationError::Encode {
                    serializer: "json".into(),
                    message: e.to_string(),
                })
            }),
            Format::Pickle => Ok(builtins().encode("pickle", value)?.body),
        }
    }

    pub(crate) fn decode<T: DeserializeOwned>(self, body: &[u8]) -> Result<T, Error> {
        match self {
            Format::Json => serde_json::from_slice(body).map_err(|e| {
                Error::Serialization(SerializationError::Decode {
                    content_type: self.content_type().into(),
                    message: e.to_string(),
                })
            }),
            Format::Pickle => Ok(builtins().decode(Some(KOMBU_PICKLE), Some("binary"), body)?),
        }
    }
}

/// A fresh random (version 4) UUID, hyphenated, as aio-pika's `str(uuid.uuid4())`.
pub(crate) use crate::ids::uuid4;

/// Seconds since the Unix epoch, for the `timestamp` property aio-pika sets.
pub(crate) fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn uuid4_has_the_shape() {
        let u = uuid4();
        assert_eq!(u.len(), 36);
        assert_eq!(&u[14..15], "4");
        assert!(matches!(&u[19..20], "8" | "9" | "a" | "b"));
        assert_ne!(u, uuid4());
    }

    #[test]
    fn formats_round_trip() {
        for f in [Format::Json, Format::Pickle] {
            let v = serde_json::json!({"x": 1, "s": "é", "l": [1.5, null, true]});
            let b = f.encode(&v).unwrap();
            let back: serde_json::Value = f.decode(&b).unwrap();
            assert_eq!(back, v);
        }
    }
}
