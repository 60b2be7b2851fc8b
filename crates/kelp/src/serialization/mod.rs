//! Serializers: Kombu's serializer registry, in Rust.
//!
//! | name | content type | content encoding | crate |
//! |---|---|---|---|
//! | `json` | `application/json` | `utf-8` | serde_json (+ Kombu's `__type__` markers on decode) |
//! | `msgpack` | `application/x-msgpack` | `binary` | rmp-serde |
//! | `yaml` | `application/x-yaml` | `utf-8` | serde_norway |
//! | `pickle` | `application/x-python-serialize` | `binary` | serde-pickle (encode), kelp's safe reader (decode) |
//! | `raw` | `application/data` | `binary` | — |
//! | `text` | `text/plain` | `utf-8` | — |
//!
//! The [`Registry`] encodes with a serializer chosen by name and decodes by the message's
//! content type. Typed calls ([`Registry::encode`], [`Registry::decode`]) go straight from `T`
//! to bytes and back for the built-in formats; [`Value`] is the dynamically-typed model used
//! for user serializers and for [`Registry::decode_value`].
//!
//! Decoding follows Kombu's `loads` (`kombu/serialization.py`):
//! * a missing content type means `application/data`;
//! * an empty body, `application/data`, `text/plain` and content types nobody registered are
//!   not parsed: the body is returned as text when the content encoding is a text encoding
//!   (`utf-8`, `ascii`, `latin-1`; also when it is missing and the body is valid UTF-8) and as
//!   bytes when it is `binary` (or missing and the body is not UTF-8);
//! * the [`Accept`] whitelist is checked by the caller *before* decoding.
//!
//! Every decoder bounds nesting at 128 levels and never panics on hostile input.

mod builtin;
mod pickle;
mod value;

use std::borrow::Cow;
use std::fmt;
use std::sync::Arc;

use bytes::Bytes;
use serde::de::DeserializeOwned;
use serde::Serialize;

use builtin::{Builtin, RAW_CT};
pub use builtin::{
    JsonSerializer, MsgpackSerializer, PickleSerializer, RawSerializer, TextSerializer,
    YamlSerializer,
};
pub use value::{Value, ValueError};

/// Errors from serializing, deserializing and content-type checks.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SerializationError {
    /// No serializer is registered under this name.
    #[error("no serializer named {name:?} is registered")]
    UnknownSerializer {
        /// The name asked for.
        name: String,
    },
    /// No serializer is registered for this content type.
    #[error("no serializer is registered for content type {content_type:?}")]
    UnknownContentType {
        /// The content type asked for.
        content_type: String,
    },
    /// The content type is not in the consumer's [`Accept`] list (checked before decoding).
    #[error("refusing to deserialize content of type {content_type:?}: it is not accepted")]
    ContentDisallowed {
        /// The message's content type.
        content_type: String,
    },
    /// A serializer could not encode a value.
    #[error("{serializer} serializer could not encode the value: {message}")]
    Encode {
        /// Name of the serializer.
        serializer: String,
        /// What went wrong.
        message: String,
    },
    /// A body could not be decoded.
    #[error("could not decode {content_type} body: {message}")]
    Decode {
        /// Content type of the body.
        content_type: String,
        /// What went wrong.
        message: String,
    },
}

/// A serialization format: encodes a [`Value`] to bytes and back.
///
/// Implement it to add a format, and [`Registry::register`] it. Typed calls through the
/// registry convert `T` to and from [`Value`] for user serializers.
pub trait Serializer: Send + Sync {
    /// Short name used to pick the serializer when publishing (`"json"`).
    fn name(&self) -> &str;
    /// MIME type written to the message's `content_type` (`"application/json"`).
    fn content_type(&self) -> &str;
    /// Written to the message's `content_encoding`: a charset such as `"utf-8"`, or `"binary"`.
    fn content_encoding(&self) -> &str;
    /// Encodes a value.
    fn encode(&self, value: &Value) -> Result<Bytes, SerializationError>;
    /// Decodes a body. Must not panic on any input.
    fn decode(&self, body: &[u8]) -> Result<Value, SerializationError>;
}

/// A serialized body and the properties that describe it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Encoded {
    /// The body.
    pub body: Bytes,
    /// For the message's `content_type` property.
    pub content_type: Cow<'static, str>,
    /// For the message's `content_encoding` property.
    pub content_encoding: Cow<'static, str>,
}

#[derive(Clone)]
struct Entry {
    serializer: Arc<dyn Serializer>,
    builtin: Option<Builtin>,
}

impl fmt::Debug for Entry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} ({})",
            self.serializer.name(),
            self.serializer.content_type()
        )
    }
}

/// `"Application/JSON; charset=utf-8"` → `"Application/JSON"` (compare case-insensitively).
fn essence(content_type: &str) -> &str {
    content_type.split(';').next().unwrap_or_default().trim()
}

/// The serializer registry: built-ins plus user serializers, looked up by name or content type.
///
/// Cheap to clone (an `Arc` inside); [`register`](Registry::register) copies on write, so
/// clones taken earlier keep the serializers they had. Names and content types match
/// case-insensitively; content-type parameters (`; charset=…`) are ignored.
///
/// ```
/// use kelp::serialization::Registry;
///
/// #[derive(serde::Serialize, serde::Deserialize, Debug, PartialEq)]
/// struct Order { id: u32, items: Vec<String> }
///
/// let registry = Registry::default();
/// let order = Order { id: 7, items: vec!["tea".into()] };
/// let encoded = registry.encode("json", &order)?;
/// assert_eq!(encoded.content_type, "application/json");
/// // Byte for byte what Python's json.dumps (so Kombu) writes.
/// assert_eq!(&encoded.body[..], br#"{"id": 7, "items": ["tea"]}"#);
///
/// let back: Order = registry.decode(Some(&encoded.content_type), Some(&encoded.content_encoding), &encoded.body)?;
/// assert_eq!(back, order);
/// # Ok::<(), kelp::serialization::SerializationError>(())
/// ```
#[derive(Clone, Debug)]
pub struct Registry {
    entries: Arc<Vec<Entry>>,
}

impl Default for Registry {
    /// The built-ins: json, msgpack, yaml, pickle, raw, text.
    fn default() -> Self {
        let builtin = |s: Arc<dyn Serializer>, b| Entry {
            serializer: s,
            builtin: Some(b),
        };
        Registry {
            entries: Arc::new(vec![
                builtin(Arc::new(JsonSerializer), Builtin::Json),
                builtin(Arc::new(MsgpackSerializer), Builtin::Msgpack),
                builtin(Arc::new(YamlSerializer), Builtin::Yaml),
                builtin(Arc::new(PickleSerializer), Builtin::Pickle),
                builtin(Arc::new(RawSerializer), Builtin::Raw),
                builtin(Arc::new(TextSerializer), Builtin::Text),
            ]),
        }
    }
}

/// What decodes a given body.
enum Target<'a> {
    Builtin(Builtin),
    Custom(&'a dyn Serializer),
    /// Not parsed: text or bytes by content encoding.
    Passthrough,
}

impl Registry {
    /// Same as [`Registry::default`].
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a serializer, replacing any registered under the same name or content type
    /// (a user `json` replaces the built-in one, typed fast path included).
    pub fn register(&mut self, serializer: Arc<dyn Serializer>) {
        let entries = Arc::make_mut(&mut self.entries);
        entries.retain(|e| {
            !e.serializer.name().eq_ignore_ascii_case(serializer.name())
                && !essence(e.serializer.content_type())
                    .eq_ignore_ascii_case(essence(serializer.content_type()))
        });
        entries.push(Entry {
            serializer,
            builtin: None,
        });
    }

    /// Removes the serializer with this name; false if there was none.
    pub fn unregister(&mut self, name: &str) -> bool {
        let before = self.entries.len();
        Arc::make_mut(&mut self.entries)
            .retain(|e| !e.serializer.name().eq_ignore_ascii_case(name));
        self.entries.len() != before
    }

    fn entry_by_name(&self, name: &str) -> Option<&Entry> {
        self.entries
            .iter()
            .find(|e| e.serializer.name().eq_ignore_ascii_case(name))
    }

    fn entry_by_content_type(&self, content_type: &str) -> Option<&Entry> {
        let wanted = essence(content_type);
        self.entries
            .iter()
            .find(|e| e.serializer.content_type().eq_ignore_ascii_case(wanted))
    }

    /// The serializer registered under `name`.
    pub fn get(&self, name: &str) -> Option<Arc<dyn Serializer>> {
        self.entry_by_name(name).map(|e| Arc::clone(&e.serializer))
    }

    /// The serializer registered for `content_type`.
    pub fn by_content_type(&self, content_type: &str) -> Option<Arc<dyn Serializer>> {
        self.entry_by_content_type(content_type)
            .map(|e| Arc::clone(&e.serializer))
    }

    /// Resolves a serializer name or a content type to a registered content type.
    pub fn content_type_of(&self, name_or_type: &str) -> Result<&str, SerializationError> {
        let entry = if name_or_type.contains('/') {
            self.entry_by_content_type(name_or_type).ok_or_else(|| {
                SerializationError::UnknownContentType {
                    content_type: name_or_type.to_owned(),
                }
            })?
        } else {
            self.entry_by_name(name_or_type).ok_or_else(|| {
                SerializationError::UnknownSerializer {
                    name: name_or_type.to_owned(),
                }
            })?
        };
        Ok(entry.serializer.content_type())
    }

    /// Names of the registered serializers.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.entries.iter().map(|e| e.serializer.name())
    }

    /// Serializes `value` with the serializer named `serializer` (`"json"`, `"msgpack"`, …).
    ///
    /// Built-in formats serialize `T` directly; user serializers get a [`Value`]. `raw` takes
    /// bytes or a string (a string gets content encoding `utf-8`, as Kombu's `raw_encode` does).
    pub fn encode<T: Serialize + ?Sized>(
        &self,
        serializer: &str,
        value: &T,
    ) -> Result<Encoded, SerializationError> {
        let entry = self.entry_by_name(serializer).ok_or_else(|| {
            SerializationError::UnknownSerializer {
                name: serializer.to_owned(),
            }
        })?;
        match entry.builtin {
            Some(Builtin::Raw) => Self::encode_raw(Value::from_serialize(value)?),
            Some(b) => Ok(Encoded {
                body: Bytes::from(b.encode_typed(value)?),
                content_type: Cow::Borrowed(b.content_type()),
                content_encoding: Cow::Borrowed(b.content_encoding()),
            }),
            None => Self::encode_custom(&*entry.serializer, &Value::from_serialize(value)?),
        }
    }

    /// Serializes a [`Value`] with the serializer named `serializer`.
    pub fn encode_value(
        &self,
        serializer: &str,
        value: &Value,
    ) -> Result<Encoded, SerializationError> {
        let entry = self.entry_by_name(serializer).ok_or_else(|| {
            SerializationError::UnknownSerializer {
                name: serializer.to_owned(),
            }
        })?;
        match entry.builtin {
            Some(Builtin::Raw) => Self::encode_raw(value.clone()),
            Some(b) => Ok(Encoded {
                body: Bytes::from(b.encode_typed(value)?),
                content_type: Cow::Borrowed(b.content_type()),
                content_encoding: Cow::Borrowed(b.content_encoding()),
            }),
            None => Self::encode_custom(&*entry.serializer, value),
        }
    }

    fn encode_raw(value: Value) -> Result<Encoded, SerializationError> {
        let encoding = if matches!(value, Value::String(_)) {
            "utf-8"
        } else {
            "binary"
        };
        Ok(Encoded {
            body: Bytes::from(builtin::raw_bytes(value)?),
            content_type: Cow::Borrowed(RAW_CT),
            content_encoding: Cow::Borrowed(encoding),
        })
    }

    fn encode_custom(
        serializer: &dyn Serializer,
        value: &Value,
    ) -> Result<Encoded, SerializationError> {
        Ok(Encoded {
            body: serializer.encode(value)?,
            content_type: Cow::Owned(serializer.content_type().to_owned()),
            content_encoding: Cow::Owned(serializer.content_encoding().to_owned()),
        })
    }

    fn target(&self, content_type: &str, body: &[u8]) -> Target<'_> {
        if body.is_empty() {
            return Target::Passthrough;
        }
        match self.entry_by_content_type(content_type) {
            None
            | Some(Entry {
                builtin: Some(Builtin::Raw | Builtin::Text),
                ..
            }) => Target::Passthrough,
            Some(Entry {
                builtin: Some(b), ..
            }) => Target::Builtin(*b),
            Some(Entry {
                serializer,
                builtin: None,
            }) => Target::Custom(&**serializer),
        }
    }

    /// Decodes a body into `T` by its content type (see the [module docs](self) for bodies
    /// that are not parsed). Does not check an [`Accept`] list: call [`Accept::check`] first.
    ///
    /// `text/plain` and `application/data` bodies can be read as `String`, `Vec<u8>` or
    /// `bytes::Bytes`.
    pub fn decode<T: DeserializeOwned>(
        &self,
        content_type: Option<&str>,
        content_encoding: Option<&str>,
        body: &[u8],
    ) -> Result<T, SerializationError> {
        let content_type = content_type.unwrap_or(RAW_CT);
        let into = |value: Value, ct: &str| {
            T::deserialize(value).map_err(|e| SerializationError::Decode {
                content_type: ct.to_owned(),
                message: e.to_string(),
            })
        };
        match self.target(content_type, body) {
            Target::Builtin(b) => b.decode_typed(body),
            Target::Custom(s) => into(s.decode(body)?, content_type),
            Target::Passthrough => into(
                passthrough(content_type, content_encoding, body)?,
                content_type,
            ),
        }
    }

    /// Decodes a body into a [`Value`] by its content type. Does not check an [`Accept`] list.
    pub fn decode_value(
        &self,
        content_type: Option<&str>,
        content_encoding: Option<&str>,
        body: &[u8],
    ) -> Result<Value, SerializationError> {
        let content_type = content_type.unwrap_or(RAW_CT);
        match self.target(content_type, body) {
            Target::Builtin(b) => b.decode_value(body),
            Target::Custom(s) => s.decode(body),
            Target::Passthrough => passthrough(content_type, content_encoding, body),
        }
    }

    /// Builds an [`Accept`] list from serializer names (resolved in this registry) and
    /// content types, like Kombu's `accept=['json', 'application/x-msgpack']`.
    pub fn accept<I, S>(&self, items: I) -> Result<Accept, SerializationError>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        let mut types = Vec::new();
        for item in items {
            let item = item.as_ref();
            let ct = if item.contains('/') {
                essence(item)
            } else {
                self.content_type_of(item)?
            };
            types.push(ct.to_ascii_lowercase());
        }
        Ok(Accept {
            rule: Rule::Only(types),
        })
    }
}

/// Bodies that are not parsed: text or bytes according to the content encoding.
fn passthrough(
    content_type: &str,
    encoding: Option<&str>,
    body: &[u8],
) -> Result<Value, SerializationError> {
    let err = |message: String| SerializationError::Decode {
        content_type: content_type.to_owned(),
        message,
    };
    let Some(encoding) = encoding.map(str::trim) else {
        // Kombu assumes utf-8; we fall back to bytes rather than fail on non-UTF-8 bodies.
        return Ok(match std::str::from_utf8(body) {
            Ok(s) => Value::String(s.to_owned()),
            Err(_) => Value::Bytes(body.to_vec()),
        });
    };
    let enc = encoding.to_ascii_lowercase().replace('_', "-");
    match enc.as_str() {
        "binary" | "ascii-8bit" => Ok(Value::Bytes(body.to_vec())),
        "utf-8" | "utf8" | "" => std::str::from_utf8(body)
            .map(|s| Value::String(s.to_owned()))
            .map_err(|e| err(format!("body is not valid utf-8: {e}"))),
        "ascii" | "us-ascii" => match std::str::from_utf8(body) {
            Ok(s) if s.is_ascii() => Ok(Value::String(s.to_owned())),
            _ => Err(err("body is not valid ascii".into())),
        },
        "latin-1" | "latin1" | "iso-8859-1" | "iso8859-1" => {
            Ok(Value::String(body.iter().map(|&b| char::from(b)).collect()))
        }
        _ => Err(err(format!("unsupported content encoding {encoding:?}"))),
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Rule {
    Any,
    Only(Vec<String>),
    Deny(Vec<String>),
}

/// Content types a consumer accepts, checked before any decoding.
///
/// * [`Accept::default()`] is Kombu 5's effective default for a consumer created without
///   `accept`: `kombu/serialization.py` calls `disable_insecure_serializers()` at import, so
///   `loads(accept=None)` refuses **pickle, yaml and msgpack** and allows everything else
///   (json, text, raw, unknown types). Celery narrows that to `['json']`.
/// * [`Accept::new`] / [`Registry::accept`] build a whitelist (`accept=['json', …]`). As in
///   Kombu, `application/data` and `application/text` are always trusted by a whitelist.
/// * [`Accept::any`] allows everything, pickle included — only for trusted producers.
///
/// A message without a content type is checked as `application/data`.
///
/// ```
/// use kelp::serialization::{Accept, SerializationError};
///
/// let accept = Accept::new(["json", "application/x-msgpack"])?;
/// assert!(accept.check(Some("application/json")).is_ok());
/// assert!(accept.check(Some("application/x-msgpack")).is_ok());
/// assert!(matches!(
///     accept.check(Some("application/x-python-serialize")),
///     Err(SerializationError::ContentDisallowed { .. })
/// ));
/// // Kombu's default refuses pickle, yaml and msgpack.
/// assert!(Accept::default().check(Some("application/x-python-serialize")).is_err());
/// assert!(Accept::default().check(Some("application/json")).is_ok());
/// # Ok::<(), SerializationError>(())
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Accept {
    rule: Rule,
}

/// Content types that a whitelist always accepts (Kombu's `TRUSTED_CONTENT`).
const TRUSTED: [&str; 2] = ["application/data", "application/text"];

impl Default for Accept {
    fn default() -> Self {
        Accept {
            rule: Rule::Deny(vec![
                builtin::PICKLE_CT.to_owned(),
                builtin::YAML_CT.to_owned(),
                builtin::MSGPACK_CT.to_owned(),
            ]),
        }
    }
}

impl Accept {
    /// Accepts every content type, pickle included.
    pub fn any() -> Self {
        Accept { rule: Rule::Any }
    }

    /// A whitelist of serializer names (built-in names) and content types.
    /// Fails with [`SerializationError::UnknownSerializer`] for an unknown name.
    pub fn new<I, S>(items: I) -> Result<Self, SerializationError>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        Registry::default().accept(items)
    }

    /// Whether a message with this content type may be decoded.
    pub fn allows(&self, content_type: Option<&str>) -> bool {
        let ct = essence(content_type.unwrap_or(RAW_CT));
        let listed = |list: &[String]| list.iter().any(|t| t.eq_ignore_ascii_case(ct));
        match &self.rule {
            Rule::Any => true,
            Rule::Only(list) => listed(list) || TRUSTED.iter().any(|t| t.eq_ignore_ascii_case(ct)),
            Rule::Deny(list) => !listed(list),
        }
    }

    /// `Ok(())` if a message with this content type may be decoded, else
    /// [`SerializationError::ContentDisallowed`].
    pub fn check(&self, content_type: Option<&str>) -> Result<(), SerializationError> {
        if self.allows(content_type) {
            Ok(())
        } else {
            Err(SerializationError::ContentDisallowed {
                content_type: content_type.unwrap_or(RAW_CT).to_owned(),
            })
        }
    }
}

#[cfg(test)]
mod tests;
