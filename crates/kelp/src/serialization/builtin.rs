//! The built-in serializers: json, msgpack, yaml, pickle, raw and text.

use base64::Engine as _;
use bytes::Bytes;
use serde::de::DeserializeOwned;
use serde::Serialize;

use super::{pickle, SerializationError, Serializer, Value};

/// Nesting limit applied by every built-in decoder (serde_json and serde_norway use 128 too).
const MAX_DEPTH: usize = 128;

fn encode_err(serializer: &str, e: impl std::fmt::Display) -> SerializationError {
    SerializationError::Encode {
        serializer: serializer.to_owned(),
        message: e.to_string(),
    }
}

fn decode_err(content_type: &str, e: impl std::fmt::Display) -> SerializationError {
    SerializationError::Decode {
        content_type: content_type.to_owned(),
        message: e.to_string(),
    }
}

/// Which built-in a registry entry is, so the registry can take the typed fast paths.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Builtin {
    Json,
    Msgpack,
    Yaml,
    Pickle,
    Raw,
    Text,
}

impl Builtin {
    pub(crate) fn encode_typed<T: Serialize + ?Sized>(
        self,
        value: &T,
    ) -> Result<Vec<u8>, SerializationError> {
        match self {
            Builtin::Json => {
                let mut out = Vec::with_capacity(128);
                let mut ser = serde_json::Serializer::with_formatter(&mut out, PyJsonFormatter);
                value
                    .serialize(&mut ser)
                    .map_err(|e| encode_err("json", e))?;
                Ok(out)
            }
            Builtin::Msgpack => {
                rmp_serde::to_vec_named(value).map_err(|e| encode_err("msgpack", e))
            }
            Builtin::Yaml => serde_norway::to_string(value)
                .map(String::into_bytes)
                .map_err(|e| encode_err("yaml", e)),
            Builtin::Pickle => {
                // PROTO 3 header, the value, STOP (what `serde_pickle::to_vec` writes, for `?Sized`).
                let mut out = b"\x80\x03".to_vec();
                let mut ser =
                    serde_pickle::Serializer::new(&mut out, serde_pickle::SerOptions::new());
                value
                    .serialize(&mut ser)
                    .map_err(|e| encode_err("pickle", e))?;
                out.push(b'.');
                Ok(out)
            }
            Builtin::Raw => raw_bytes(Value::from_serialize(value)?),
            Builtin::Text => text_bytes(Value::from_serialize(value)?),
        }
    }

    pub(crate) fn decode_typed<T: DeserializeOwned>(
        self,
        body: &[u8],
    ) -> Result<T, SerializationError> {
        match self {
            Builtin::Json if !has_kombu_marker(body) => {
                serde_json::from_slice(body).map_err(|e| decode_err(JSON_CT, e))
            }
            Builtin::Msgpack => {
                let mut de = rmp_serde::Deserializer::from_read_ref(body);
                de.set_max_depth(MAX_DEPTH);
                T::deserialize(&mut de).map_err(|e| decode_err(MSGPACK_CT, e))
            }
            Builtin::Yaml if !contains(body, b"!binary") => {
                serde_norway::from_slice(body).map_err(|e| decode_err(YAML_CT, e))
            }
            other => {
                let ct = other.content_type();
                T::deserialize(other.decode_value(body)?).map_err(|e| decode_err(ct, e))
            }
        }
    }

    pub(crate) fn decode_value(self, body: &[u8]) -> Result<Value, SerializationError> {
        match self {
            Builtin::Json => {
                let value: Value =
                    serde_json::from_slice(body).map_err(|e| decode_err(JSON_CT, e))?;
                resolve_kombu_markers(value)
            }
            Builtin::Msgpack => self.decode_typed(body),
            Builtin::Yaml => {
                let value: Value =
                    serde_norway::from_slice(body).map_err(|e| decode_err(YAML_CT, e))?;
                if !contains(body, b"!!binary") {
                    return Ok(resolve_yaml_binary(value));
                }
                // serde_norway drops core tags such as `!!binary` (PyYAML's tag for bytes).
                // Parse once more with it spelled as the local tag `!binary`, which
                // serde_norway keeps, and take bytes only where the two parses agree that
                // a string sat under that tag; anything the textual swap touched
                // elsewhere (say, inside a quoted string) keeps its original value.
                let swapped = String::from_utf8_lossy(body).replace("!!binary", "!binary");
                match serde_norway::from_str::<Value>(&swapped) {
                    Ok(tagged) => Ok(resolve_yaml_binary(merge_binary(value, tagged))),
                    Err(_) => Ok(resolve_yaml_binary(value)),
                }
            }
            Builtin::Pickle => pickle::decode(body).map_err(|e| decode_err(PICKLE_CT, e)),
            Builtin::Raw => Ok(Value::Bytes(body.to_vec())),
            Builtin::Text => std::str::from_utf8(body)
                .map(|s| Value::String(s.to_owned()))
                .map_err(|e| decode_err(TEXT_CT, e)),
        }
    }

    pub(crate) fn name(self) -> &'static str {
        match self {
            Builtin::Json => "json",
            Builtin::Msgpack => "msgpack",
            Builtin::Yaml => "yaml",
            Builtin::Pickle => "pickle",
            Builtin::Raw => "raw",
            Builtin::Text => "text",
        }
    }

    pub(crate) fn content_type(self) -> &'static str {
        match self {
            Builtin::Json => JSON_CT,
            Builtin::Msgpack => MSGPACK_CT,
            Builtin::Yaml => YAML_CT,
            Builtin::Pickle => PICKLE_CT,
            Builtin::Raw => RAW_CT,
            Builtin::Text => TEXT_CT,
        }
    }

    pub(crate) fn content_encoding(self) -> &'static str {
        match self {
            Builtin::Json | Builtin::Yaml | Builtin::Text => "utf-8",
            Builtin::Msgpack | Builtin::Pickle | Builtin::Raw => "binary",
        }
    }
}

pub(crate) const JSON_CT: &str = "application/json";
pub(crate) const MSGPACK_CT: &str = "application/x-msgpack";
pub(crate) const YAML_CT: &str = "application/x-yaml";
pub(crate) const PICKLE_CT: &str = "application/x-python-serialize";
pub(crate) const RAW_CT: &str = "application/data";
pub(crate) const TEXT_CT: &str = "text/plain";

/// The bytes of a raw body: bytes as they are, strings as UTF-8, or a list of `u8`s.
pub(crate) fn raw_bytes(value: Value) -> Result<Vec<u8>, SerializationError> {
    match value {
        Value::Bytes(b) => Ok(b),
        Value::String(s) => Ok(s.into_bytes()),
        Value::List(items) => items
            .into_iter()
            .map(|v| match v {
                Value::Int(i) => u8::try_from(i).ok(),
                _ => None,
            })
            .collect::<Option<Vec<u8>>>()
            .ok_or_else(|| encode_err("raw", "the raw serializer takes bytes or a string")),
        _ => Err(encode_err(
            "raw",
            "the raw serializer takes bytes or a string",
        )),
    }
}

fn text_bytes(value: Value) -> Result<Vec<u8>, SerializationError> {
    match value {
        Value::String(s) => Ok(s.into_bytes()),
        Value::Bytes(b) => String::from_utf8(b)
            .map(String::into_bytes)
            .map_err(|e| encode_err("text", e)),
        _ => Err(encode_err("text", "the text serializer takes a string")),
    }
}

// -- Kombu's JSON markers -----------------------------------------------------------------------

/// Cheap pre-check: only bodies containing `"__type__"` can hold Kombu markers.
fn has_kombu_marker(body: &[u8]) -> bool {
    contains(body, b"\"__type__\"")
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

/// Replaces Kombu's `{"__type__": T, "__value__": V}` objects (written by
/// `kombu/utils/json.py`) with plain values:
///
/// | `__type__` | `__value__` | becomes |
/// |---|---|---|
/// | `datetime`, `date`, `time` | ISO 8601 text | [`Value::String`] (unchanged text) |
/// | `decimal` | decimal text | [`Value::String`] |
/// | `uuid` | `{"hex": "…"}` | [`Value::String`], hyphenated lowercase |
/// | `bytes` | text | [`Value::Bytes`] of its UTF-8 |
/// | `base64` | base64 text | [`Value::Bytes`] |
///
/// Any other `__type__` is an error, as it is in Kombu.
fn resolve_kombu_markers(value: Value) -> Result<Value, SerializationError> {
    Ok(match value {
        Value::List(items) => Value::List(
            items
                .into_iter()
                .map(resolve_kombu_markers)
                .collect::<Result<_, _>>()?,
        ),
        Value::Map(entries) => {
            if let Some(marker) = as_marker(&entries) {
                return marker;
            }
            let mut out = Vec::with_capacity(entries.len());
            for (k, v) in entries {
                out.push((k, resolve_kombu_markers(v)?));
            }
            Value::Map(out)
        }
        other => other,
    })
}

fn as_marker(entries: &[(Value, Value)]) -> Option<Result<Value, SerializationError>> {
    let [(k1, v1), (k2, v2)] = entries else {
        return None;
    };
    let (kind, value) = match (k1.as_str()?, k2.as_str()?) {
        ("__type__", "__value__") => (v1, v2),
        ("__value__", "__type__") => (v2, v1),
        _ => return None,
    };
    let bad = |what: &str| {
        Some(Err(decode_err(
            JSON_CT,
            format!("bad Kombu {what} marker value"),
        )))
    };
    let Some(kind) = kind.as_str() else {
        return bad("__type__");
    };
    Some(Ok(match (kind, value) {
        ("datetime" | "date" | "time" | "decimal", Value::String(s)) => Value::String(s.clone()),
        ("bytes", Value::String(s)) => Value::Bytes(s.as_bytes().to_vec()),
        ("base64", Value::String(s)) => {
            match base64::engine::general_purpose::STANDARD.decode(s.trim()) {
                Ok(b) => Value::Bytes(b),
                Err(_) => return bad("base64"),
            }
        }
        ("uuid", v) => match v.get("hex").and_then(Value::as_str).and_then(uuid_hex) {
            Some(s) => Value::String(s),
            None => return bad("uuid"),
        },
        ("datetime" | "date" | "time" | "decimal" | "bytes" | "base64", _) => return bad(kind),
        (other, _) => {
            return Some(Err(decode_err(
                JSON_CT,
                format!("unsupported Kombu JSON type marker {other:?}"),
            )));
        }
    }))
}

fn uuid_hex(hex: &str) -> Option<String> {
    let hex: String = hex
        .chars()
        .filter(|c| !matches!(c, '{' | '}' | '-'))
        .collect();
    if hex.len() != 32 {
        return None;
    }
    u128::from_str_radix(&hex, 16).ok().map(pickle::format_uuid)
}

/// Where `orig` holds a string and `tagged` holds `{binary: <same string>}`, yield the
/// tagged form; everywhere else keep `orig`.
fn merge_binary(orig: Value, tagged: Value) -> Value {
    match (orig, tagged) {
        (Value::String(o), Value::Map(t)) => {
            let is_tag = matches!(t.as_slice(), [(Value::String(tag), Value::String(d))] if tag == "binary" && *d == o);
            if is_tag {
                Value::Map(t)
            } else {
                Value::String(o)
            }
        }
        (Value::List(o), Value::List(t)) if o.len() == t.len() => Value::List(
            o.into_iter()
                .zip(t)
                .map(|(a, b)| merge_binary(a, b))
                .collect(),
        ),
        (Value::Map(o), Value::Map(t)) if o.len() == t.len() => Value::Map(
            o.into_iter()
                .zip(t)
                .map(|((k, a), (_, b))| (k, merge_binary(a, b)))
                .collect(),
        ),
        (o, _) => o,
    }
}

/// serde_norway reports YAML's `!!binary` (what PyYAML's `safe_dump` writes for bytes) as a
/// tagged string; turn it into bytes.
fn resolve_yaml_binary(value: Value) -> Value {
    match value {
        Value::List(items) => Value::List(items.into_iter().map(resolve_yaml_binary).collect()),
        Value::Map(entries) => {
            if let [(Value::String(tag), Value::String(data))] = entries.as_slice() {
                if matches!(
                    tag.as_str(),
                    "binary" | "!binary" | "!!binary" | "tag:yaml.org,2002:binary"
                ) {
                    let compact: String = data.chars().filter(|c| !c.is_whitespace()).collect();
                    if let Ok(bytes) = base64::engine::general_purpose::STANDARD.decode(compact) {
                        return Value::Bytes(bytes);
                    }
                }
            }
            Value::Map(
                entries
                    .into_iter()
                    .map(|(k, v)| (resolve_yaml_binary(k), resolve_yaml_binary(v)))
                    .collect(),
            )
        }
        other => other,
    }
}

// -- public serializer types ----------------------------------------------------------------

macro_rules! builtin_serializer {
    ($(#[$doc:meta])* $ty:ident => $kind:ident) => {
        $(#[$doc])*
        #[derive(Debug, Clone, Copy, Default)]
        pub struct $ty;

        impl Serializer for $ty {
            fn name(&self) -> &str {
                Builtin::$kind.name()
            }
            fn content_type(&self) -> &str {
                Builtin::$kind.content_type()
            }
            fn content_encoding(&self) -> &str {
                Builtin::$kind.content_encoding()
            }
            fn encode(&self, value: &Value) -> Result<Bytes, SerializationError> {
                Builtin::$kind.encode_typed(value).map(Bytes::from)
            }
            fn decode(&self, body: &[u8]) -> Result<Value, SerializationError> {
                Builtin::$kind.decode_value(body)
            }
        }
    };
}

builtin_serializer!(
    /// `json` — `application/json`, `utf-8`. Decodes Kombu's `__type__` markers (datetime,
    /// date, time, decimal → text; uuid → hyphenated text; bytes/base64 → bytes) and writes
    /// plain JSON (bytes are written as a list of numbers, as serde_json does).
    JsonSerializer => Json
);
builtin_serializer!(
    /// `msgpack` — `application/x-msgpack`, `binary`; structs are written as maps (like
    /// Python's `msgpack.packb(use_bin_type=True)` sees dicts), bytes as `bin`.
    MsgpackSerializer => Msgpack
);
builtin_serializer!(
    /// `yaml` — `application/x-yaml`, `utf-8`, via `serde_norway`. Reads PyYAML `!!binary`
    /// scalars as bytes; writing bytes is not supported (an encode error).
    YamlSerializer => Yaml
);
builtin_serializer!(
    /// `pickle` — `application/x-python-serialize`, `binary`. Writes protocol 3 (readable by
    /// every Python 3) with `serde-pickle`; reads protocols 0–5 with kelp's own safe reader,
    /// which never imports or calls anything: a pickle that references any class or function
    /// outside a small data-only allow-list (builtins containers, `datetime`, `Decimal`,
    /// `UUID`, `OrderedDict`) fails to decode with an error naming it.
    PickleSerializer => Pickle
);
builtin_serializer!(
    /// `raw` — `application/data`, `binary`: bytes in, bytes out (strings are written as UTF-8).
    RawSerializer => Raw
);
builtin_serializer!(
    /// `text` — `text/plain`, `utf-8`: a string in, the same string out.
    TextSerializer => Text
);

/// Writes JSON the way Python's `json.dumps` does by default, which is what Kombu sends:
/// `", "` and `": "` separators and non-ASCII characters escaped as `\uXXXX` (surrogate pairs
/// beyond the BMP). A Kombu peer and kelp then put the same bytes on the wire.
struct PyJsonFormatter;

impl serde_json::ser::Formatter for PyJsonFormatter {
    fn begin_array_value<W: ?Sized + std::io::Write>(
        &mut self,
        writer: &mut W,
        first: bool,
    ) -> std::io::Result<()> {
        if first {
            Ok(())
        } else {
            writer.write_all(b", ")
        }
    }
    fn begin_object_key<W: ?Sized + std::io::Write>(
        &mut self,
        writer: &mut W,
        first: bool,
    ) -> std::io::Result<()> {
        if first {
            Ok(())
        } else {
            writer.write_all(b", ")
        }
    }
    fn begin_object_value<W: ?Sized + std::io::Write>(
        &mut self,
        writer: &mut W,
    ) -> std::io::Result<()> {
        writer.write_all(b": ")
    }
    fn write_string_fragment<W: ?Sized + std::io::Write>(
        &mut self,
        writer: &mut W,
        fragment: &str,
    ) -> std::io::Result<()> {
        if fragment.is_ascii() {
            return writer.write_all(fragment.as_bytes());
        }
        let mut start = 0;
        for (i, c) in fragment.char_indices() {
            if c.is_ascii() {
                continue;
            }
            writer.write_all(&fragment.as_bytes()[start..i])?;
            let mut units = [0u16; 2];
            for u in c.encode_utf16(&mut units) {
                write!(writer, "\\u{u:04x}")?;
            }
            start = i + c.len_utf8();
        }
        writer.write_all(&fragment.as_bytes()[start..])
    }
}

#[cfg(test)]
mod py_json_tests {
    use super::*;

    #[test]
    fn json_bytes_match_pythons_json_dumps() {
        // json.dumps({"x": 1, "l": [1, 2], "s": "é😀"}) in Python 3.11.
        let v = serde_json::json!({"x": 1, "l": [1, 2], "s": "é😀"});
        let out = Builtin::Json.encode_typed(&v).unwrap();
        assert_eq!(
            String::from_utf8(out).unwrap(),
            r#"{"l": [1, 2], "s": "\u00e9\ud83d\ude00", "x": 1}"#
        );
    }
}
