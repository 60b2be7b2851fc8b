//! Turning arguments into field tables and messages into text or JSON.

use std::io::Write;

use base64::Engine as _;
use bytes::Bytes;
use kelp::amqp::{BasicProperties, FieldTable, FieldValue};
use kelp::transport::RawDelivery;
use serde_json::{json, Map, Value as Json};

use crate::cli::OutputFormat;
use crate::error::CliError;

const B64: base64::engine::GeneralPurpose = base64::engine::general_purpose::STANDARD;

/// `k=v` (a number or true/false is typed, anything else is a string) or `k:=JSON`.
pub fn parse_kv(flag: &str, s: &str) -> Result<(String, FieldValue), CliError> {
    if let Some((k, v)) = s.split_once(":=") {
        if !k.is_empty() && !k.contains('=') {
            let j: Json = serde_json::from_str(v).map_err(|e| {
                CliError::usage(format!("{flag} {s}: the value after := is not JSON: {e}"))
            })?;
            return Ok((k.to_owned(), json_to_field(&j)));
        }
    }
    let Some((k, v)) = s.split_once('=') else {
        return Err(CliError::usage(format!(
            "{flag} {s}: expected KEY=VALUE (or KEY:=JSON)"
        )));
    };
    if k.is_empty() {
        return Err(CliError::usage(format!("{flag} {s}: the key is empty")));
    }
    let value = if let Ok(n) = v.parse::<i64>() {
        FieldValue::I64(n)
    } else if v == "true" || v == "false" {
        FieldValue::Bool(v == "true")
    } else {
        FieldValue::LongString(Bytes::from(v.to_owned()))
    };
    Ok((k.to_owned(), value))
}

/// Every `k=v` of a repeated flag, as a table.
pub fn parse_table(flag: &str, items: &[String]) -> Result<FieldTable, CliError> {
    let mut t = FieldTable::new();
    for s in items {
        let (k, v) = parse_kv(flag, s)?;
        if k.len() > 255 {
            return Err(CliError::usage(format!(
                "{flag} {s}: keys are at most 255 bytes"
            )));
        }
        t.insert(k, v);
    }
    Ok(t)
}

/// A JSON value as an AMQP field value.
pub fn json_to_field(j: &Json) -> FieldValue {
    match j {
        Json::Null => FieldValue::Void,
        Json::Bool(b) => FieldValue::Bool(*b),
        Json::Number(n) => match n.as_i64() {
            Some(i) => FieldValue::I64(i),
            None => FieldValue::F64(n.as_f64().unwrap_or(f64::NAN)),
        },
        Json::String(s) => FieldValue::LongString(Bytes::from(s.clone())),
        Json::Array(a) => FieldValue::Array(a.iter().map(json_to_field).collect()),
        Json::Object(o) => {
            let mut t = FieldTable::new();
            for (k, v) in o {
                t.insert(k.as_str(), json_to_field(v));
            }
            FieldValue::Table(t)
        }
    }
}

/// An AMQP field value as JSON (byte strings that are not UTF-8 become base64 strings).
pub fn field_to_json(v: &FieldValue) -> Json {
    match v {
        FieldValue::Bool(b) => json!(b),
        FieldValue::I8(n) => json!(n),
        FieldValue::U8(n) => json!(n),
        FieldValue::I16(n) => json!(n),
        FieldValue::U16(n) => json!(n),
        FieldValue::I32(n) => json!(n),
        FieldValue::U32(n) => json!(n),
        FieldValue::I64(n) => json!(n),
        FieldValue::F32(n) => json!(n),
        FieldValue::F64(n) => json!(n),
        FieldValue::Decimal(d) => json!(f64::from(d.value) / 10f64.powi(i32::from(d.scale))),
        FieldValue::LongString(b) => match std::str::from_utf8(b) {
            Ok(s) => json!(s),
            Err(_) => json!(B64.encode(b)),
        },
        FieldValue::ByteArray(b) => json!(B64.encode(b)),
        FieldValue::Array(a) => Json::Array(a.iter().map(field_to_json).collect()),
        FieldValue::Timestamp(t) => json!(t),
        FieldValue::Table(t) => table_to_json(t),
        _ => Json::Null,
    }
}

/// A field table as a JSON object.
pub fn table_to_json(t: &FieldTable) -> Json {
    let mut m = Map::new();
    for (k, v) in t.iter() {
        m.insert(k.to_string(), field_to_json(v));
    }
    Json::Object(m)
}

/// The properties that are set, as a JSON object.
pub fn properties_to_json(p: &BasicProperties) -> Json {
    let mut m = Map::new();
    let mut s = |k: &str, v: &Option<kelp::amqp::ShortString>| {
        if let Some(v) = v {
            m.insert(k.to_owned(), json!(v.as_str()));
        }
    };
    s("content_type", &p.content_type);
    s("content_encoding", &p.content_encoding);
    s("correlation_id", &p.correlation_id);
    s("reply_to", &p.reply_to);
    s("expiration", &p.expiration);
    s("message_id", &p.message_id);
    s("type", &p.kind);
    s("user_id", &p.user_id);
    s("app_id", &p.app_id);
    s("cluster_id", &p.cluster_id);
    if let Some(h) = &p.headers {
        m.insert("headers".into(), table_to_json(h));
    }
    if let Some(v) = p.delivery_mode {
        m.insert("delivery_mode".into(), json!(v));
    }
    if let Some(v) = p.priority {
        m.insert("priority".into(), json!(v));
    }
    if let Some(v) = p.timestamp {
        m.insert("timestamp".into(), json!(v));
    }
    Json::Object(m)
}

/// How a body is shown.
#[derive(Debug)]
pub enum ShownBody {
    /// A JSON document.
    Json(Json),
    /// Text.
    Text(String),
    /// Anything else, as base64; `payload` is what a serializer (msgpack, yaml, pickle) made
    /// of it, when one could.
    Base64 { b64: String, payload: Option<Json> },
}

fn essence(ct: Option<&str>) -> String {
    ct.unwrap_or("")
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase()
}

/// Decode `body` (already decompressed) for display by its content type.
pub fn show_body(p: &BasicProperties, body: &[u8]) -> ShownBody {
    let ct = essence(p.content_type.as_deref());
    let utf8 = std::str::from_utf8(body).ok();
    if ct == "application/json" || ct.ends_with("+json") {
        if let Ok(j) = serde_json::from_slice::<Json>(body) {
            return ShownBody::Json(j);
        }
    }
    let texty = ct.starts_with("text/")
        || ct == "application/text"
        || ct.ends_with("json")
        || p.content_encoding
            .as_deref()
            .is_some_and(|e| e.eq_ignore_ascii_case("utf-8") || e.eq_ignore_ascii_case("utf8"));
    if let (true, Some(s)) = (texty, utf8) {
        return ShownBody::Text(s.to_owned());
    }
    let payload = if ct.is_empty() || ct == "application/data" {
        None
    } else {
        kelp::serialization::Registry::default()
            .decode_value(
                p.content_type.as_deref(),
                p.content_encoding.as_deref(),
                body,
            )
            .ok()
            .and_then(|v| serde_json::to_value(&v).ok())
    };
    ShownBody::Base64 {
        b64: B64.encode(body),
        payload,
    }
}

/// A delivered message, ready to print.
#[derive(Debug)]
pub struct Shown<'a> {
    /// The delivery.
    pub d: &'a RawDelivery,
    /// The queue it came from.
    pub queue: &'a str,
    /// The body, decompressed when it could be.
    pub body: Bytes,
    /// Why it could not be decompressed.
    pub body_error: Option<String>,
}

impl<'a> Shown<'a> {
    /// Decompress (per the `compression` header) `d`'s body.
    pub fn new(d: &'a RawDelivery, queue: &'a str) -> Self {
        let method = d
            .properties
            .headers
            .as_ref()
            .and_then(|h| h.get("compression"))
            .and_then(|v| v.as_str());
        let (body, body_error) = match method {
            None => (d.body.clone(), None),
            Some(m) => match kelp::compression::Compression::default().decompress(
                m,
                &d.body,
                kelp::compression::DEFAULT_MAX_DECOMPRESSED,
            ) {
                Ok(b) => (b, None),
                Err(e) => (d.body.clone(), Some(e.to_string())),
            },
        };
        Shown {
            d,
            queue,
            body,
            body_error,
        }
    }

    /// The message as one JSON object.
    pub fn to_json(&self) -> Json {
        let (body, encoding, payload) = if self.body_error.is_some() {
            (json!(B64.encode(&self.body)), "base64", None)
        } else {
            match show_body(&self.d.properties, &self.body) {
                ShownBody::Json(j) => (j, "json", None),
                ShownBody::Text(s) => (json!(s), "text", None),
                ShownBody::Base64 { b64, payload } => (json!(b64), "base64", payload),
            }
        };
        let mut m = Map::new();
        m.insert("body".into(), body);
        m.insert("body_encoding".into(), json!(encoding));
        if let Some(p) = payload {
            m.insert("payload".into(), p);
        }
        if let Some(e) = &self.body_error {
            m.insert("body_error".into(), json!(e));
        }
        m.insert("properties".into(), properties_to_json(&self.d.properties));
        m.insert(
            "delivery_info".into(),
            json!({
                "queue": self.queue,
                "exchange": self.d.exchange.as_str(),
                "routing_key": self.d.routing_key.as_str(),
                "redelivered": self.d.redelivered,
                "delivery_tag": self.d.delivery_tag,
                "consumer_tag": self.d.consumer_tag.as_str(),
            }),
        );
        Json::Object(m)
    }

    /// Write the message to `out` in `format`, and flush.
    pub fn write(&self, out: &mut impl Write, format: OutputFormat) -> std::io::Result<()> {
        match format {
            OutputFormat::Json => {
                serde_json::to_writer(&mut *out, &self.to_json())?;
                out.write_all(b"\n")?;
            }
            OutputFormat::Raw => out.write_all(&self.body)?,
            OutputFormat::Text => {
                if let Some(e) = &self.body_error {
                    eprintln!("kelp: warning: cannot decompress the body ({e}); shown compressed");
                    writeln!(out, "base64:{}", B64.encode(&self.body))?;
                } else {
                    match show_body(&self.d.properties, &self.body) {
                        ShownBody::Json(j) => {
                            serde_json::to_writer(&mut *out, &j)?;
                            out.write_all(b"\n")?;
                        }
                        ShownBody::Text(s) => writeln!(out, "{s}")?,
                        ShownBody::Base64 {
                            payload: Some(p), ..
                        } => {
                            serde_json::to_writer(&mut *out, &p)?;
                            out.write_all(b"\n")?;
                        }
                        ShownBody::Base64 { b64, .. } => writeln!(out, "base64:{b64}")?,
                    }
                }
            }
        }
        out.flush()
    }
}

/// Write a line on stdout, ignoring a closed pipe (`kelp … | head`).
pub fn write_line(line: &str) {
    let mut out = std::io::stdout().lock();
    let _ = out.write_all(line.as_bytes());
    let _ = out.write_all(b"\n");
    let _ = out.flush();
}

/// `println!` that does not panic when stdout is a closed pipe.
macro_rules! outln {
    ($($t:tt)*) => {
        $crate::output::write_line(&format!($($t)*))
    };
}
pub(crate) use outln;

/// Print one JSON result line on stdout.
pub fn print_json(v: &Json) {
    let mut out = std::io::stdout().lock();
    let _ = serde_json::to_writer(&mut out, v);
    let _ = out.write_all(b"\n");
    let _ = out.flush();
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn key_values_are_typed() {
        let (k, v) = parse_kv("--arg", "x-max-length=10").unwrap();
        assert_eq!(k, "x-max-length");
        assert_eq!(v, FieldValue::I64(10));
        assert_eq!(parse_kv("-H", "a=true").unwrap().1, FieldValue::Bool(true));
        assert_eq!(parse_kv("-H", "a=x=y").unwrap().1.as_str(), Some("x=y"));
        assert_eq!(parse_kv("-H", "a:=\"7\"").unwrap().1.as_str(), Some("7"));
        assert!(matches!(
            parse_kv("-H", "a:=[1,2]").unwrap().1,
            FieldValue::Array(_)
        ));
        assert!(parse_kv("-H", "novalue").is_err());
        assert!(parse_kv("-H", "=v").is_err());
        assert!(parse_kv("-H", "a:=nope").is_err());
    }

    #[test]
    fn bodies_are_shown_by_content_type() {
        let json_p = BasicProperties::default().with_content_type("application/json");
        assert!(matches!(
            show_body(&json_p, b"{\"a\":1}"),
            ShownBody::Json(_)
        ));
        let text_p = BasicProperties::default().with_content_type("text/plain");
        assert!(matches!(show_body(&text_p, b"hi"), ShownBody::Text(_)));
        let raw = BasicProperties::default().with_content_type("application/data");
        assert!(matches!(
            show_body(&raw, &[0, 159]),
            ShownBody::Base64 { payload: None, .. }
        ));
        let j = field_to_json(&json_to_field(&json!({"a": [1, "x", true, null]})));
        assert_eq!(j, json!({"a": [1, "x", true, null]}));
    }
}
