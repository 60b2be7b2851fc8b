//! Kombu's message envelope on Redis: one JSON document per list entry.
//!
//! ```text
//! {"body": "<base64>", "content-encoding": "utf-8", "content-type": "application/json",
//!  "headers": {...}, "properties": {"delivery_mode": 2, "delivery_info": {"exchange": "ex",
//!  "routing_key": "a.b"}, "priority": 0, "body_encoding": "base64", "delivery_tag": "<uuid4>",
//!  "correlation_id": ..., "reply_to": ..., "expiration": "5000", ...}}
//! ```
//!
//! (`kombu/transport/virtual/base.py`: `prepare_message`, `_inplace_augment_message`,
//! `Message.__init__`.) Anything that does not look like this is a [`EnvelopeError`], never a
//! panic.

use base64::Engine as _;
use bytes::Bytes;
use kelp_amqp::{BasicProperties, FieldTable, FieldValue, ShortString};
use serde_json::{json, Map, Value};

/// Why a list entry is not a message kelp can read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum EnvelopeError {
    /// Not JSON at all.
    #[error("not a JSON document: {0}")]
    NotJson(String),
    /// JSON, but not an object with a `properties` object.
    #[error("not a Kombu message envelope: {0}")]
    Shape(&'static str),
    /// The body says base64 but is not.
    #[error("body is not valid base64: {0}")]
    BadBase64(String),
    /// A `body_encoding` Kombu does not produce.
    #[error("unknown body_encoding {0:?}")]
    UnknownBodyEncoding(String),
}

/// A message read from Redis.
#[derive(Debug, Clone)]
pub struct Decoded {
    /// The properties, headers included.
    pub properties: BasicProperties,
    /// The body, decoded from base64.
    pub body: Bytes,
    /// `delivery_info.exchange`.
    pub exchange: String,
    /// `delivery_info.routing_key`.
    pub routing_key: String,
    /// Kombu's delivery tag (a UUID string).
    pub tag: String,
    /// Restored after a reject with requeue or a visibility timeout.
    pub redelivered: bool,
}

/// A version-4 UUID, as Kombu's delivery tags are.
pub fn uuid4() -> String {
    crate::ids::uuid4()
}

fn field_to_json(v: &FieldValue) -> Value {
    match v {
        FieldValue::Bool(b) => Value::Bool(*b),
        FieldValue::I8(n) => json!(n),
        FieldValue::U8(n) => json!(n),
        FieldValue::I16(n) => json!(n),
        FieldValue::U16(n) => json!(n),
        FieldValue::I32(n) => json!(n),
        FieldValue::U32(n) => json!(n),
        FieldValue::I64(n) => json!(n),
        FieldValue::F32(n) => json!(n),
        FieldValue::F64(n) => json!(n),
        FieldValue::Decimal(d) => {
            json!(f64::from(d.value) / 10f64.powi(i32::from(d.scale)))
        }
        FieldValue::LongString(b) | FieldValue::ByteArray(b) => {
            Value::String(String::from_utf8_lossy(b).into_owned())
        }
        FieldValue::Array(a) => Value::Array(a.iter().map(field_to_json).collect()),
        FieldValue::Timestamp(t) => json!(t),
        FieldValue::Table(t) => table_to_json(t),
        FieldValue::Void => Value::Null,
        _ => Value::Null,
    }
}

fn table_to_json(t: &FieldTable) -> Value {
    let mut m = Map::new();
    for (k, v) in t.iter() {
        m.insert(k.as_str().to_owned(), field_to_json(v));
    }
    Value::Object(m)
}

fn json_to_field(v: &Value) -> FieldValue {
    match v {
        Value::Null => FieldValue::Void,
        Value::Bool(b) => FieldValue::Bool(*b),
        Value::Number(n) => match (n.as_i64(), n.as_f64()) {
            (Some(i), _) => FieldValue::I64(i),
            (None, Some(f)) => FieldValue::F64(f),
            // A u64 beyond i64: keep it readable.
            (None, None) => FieldValue::LongString(Bytes::from(n.to_string())),
        },
        Value::String(s) => FieldValue::LongString(Bytes::from(s.clone())),
        Value::Array(a) => FieldValue::Array(a.iter().map(json_to_field).collect()),
        Value::Object(o) => FieldValue::Table(json_to_table(o)),
    }
}

fn json_to_table(o: &Map<String, Value>) -> FieldTable {
    let mut t = FieldTable::default();
    for (k, v) in o {
        // Keys beyond a short string's 255 bytes cannot be AMQP headers: cut, not fail.
        let key: String = if k.len() > 255 {
            let mut end = 255;
            while !k.is_char_boundary(end) {
                end -= 1;
            }
            k[..end].to_owned()
        } else {
            k.clone()
        };
        t.insert(key, json_to_field(v));
    }
    t
}

fn short(v: Option<&Value>) -> Option<ShortString> {
    match v? {
        Value::String(s) => Some(ShortString::from(s.as_str())),
        Value::Number(n) => Some(ShortString::from(n.to_string())),
        _ => None,
    }
}

/// Build the envelope for a publish to `exchange` with `routing_key`. Returns the JSON text
/// and the delivery tag it carries.
pub fn encode(
    properties: &BasicProperties,
    body: &[u8],
    exchange: &str,
    routing_key: &str,
) -> (String, String) {
    let tag = uuid4();
    let mut props = Map::new();
    let mut put = |k: &str, v: Option<&ShortString>| {
        if let Some(v) = v {
            props.insert(k.to_owned(), Value::String(v.as_str().to_owned()));
        }
    };
    put("correlation_id", properties.correlation_id.as_ref());
    put("reply_to", properties.reply_to.as_ref());
    put("expiration", properties.expiration.as_ref());
    put("message_id", properties.message_id.as_ref());
    put("type", properties.kind.as_ref());
    put("user_id", properties.user_id.as_ref());
    put("app_id", properties.app_id.as_ref());
    if let Some(ts) = properties.timestamp {
        props.insert("timestamp".into(), json!(ts));
    }
    props.insert(
        "delivery_mode".into(),
        json!(properties.delivery_mode.unwrap_or(2)),
    );
    props.insert(
        "delivery_info".into(),
        json!({"exchange": exchange, "routing_key": routing_key}),
    );
    props.insert("priority".into(), json!(properties.priority.unwrap_or(0)));
    props.insert("body_encoding".into(), json!("base64"));
    props.insert("delivery_tag".into(), json!(tag));
    let headers = properties
        .headers
        .as_ref()
        .map(table_to_json)
        .unwrap_or_else(|| Value::Object(Map::new()));
    let doc = json!({
        "body": base64::engine::general_purpose::STANDARD.encode(body),
        "content-encoding": properties.content_encoding.as_ref().map(|s| s.as_str()),
        "content-type": properties.content_type.as_ref().map(|s| s.as_str()),
        "headers": headers,
        "properties": Value::Object(props),
    });
    (doc.to_string(), tag)
}

/// Read an envelope.
pub fn decode(raw: &[u8]) -> Result<Decoded, EnvelopeError> {
    let doc: Value =
        serde_json::from_slice(raw).map_err(|e| EnvelopeError::NotJson(e.to_string()))?;
    let obj = doc
        .as_object()
        .ok_or(EnvelopeError::Shape("the document is not an object"))?;
    let props = obj
        .get("properties")
        .and_then(Value::as_object)
        .ok_or(EnvelopeError::Shape("no `properties` object"))?;
    let body = match obj.get("body") {
        None | Some(Value::Null) => Bytes::new(),
        Some(Value::String(s)) => match props.get("body_encoding").and_then(Value::as_str) {
            Some("base64") => Bytes::from(
                base64::engine::general_purpose::STANDARD
                    .decode(s.as_bytes())
                    .map_err(|e| EnvelopeError::BadBase64(e.to_string()))?,
            ),
            None | Some("utf-8") | Some("utf8") => Bytes::from(s.clone()),
            Some(other) => return Err(EnvelopeError::UnknownBodyEncoding(other.to_owned())),
        },
        Some(_) => return Err(EnvelopeError::Shape("`body` is not a string")),
    };
    let headers = match obj.get("headers") {
        Some(Value::Object(h)) => Some(json_to_table(h)),
        _ => None,
    };
    let info = props.get("delivery_info").and_then(Value::as_object);
    let text = |v: Option<&Value>| v.and_then(Value::as_str).unwrap_or("").to_owned();
    let redelivered = info
        .and_then(|i| i.get("redelivered"))
        .and_then(Value::as_bool)
        .unwrap_or(false)
        || obj
            .get("headers")
            .and_then(|h| h.get("redelivered"))
            .and_then(Value::as_bool)
            .unwrap_or(false);
    let mut headers = headers;
    // Kombu marks restored messages in the headers; that is transport state, not the user's.
    if let Some(h) = headers.as_mut() {
        h.remove("redelivered");
    }
    let small = |v: Option<&Value>| v.and_then(Value::as_u64).and_then(|n| u8::try_from(n).ok());
    let properties = BasicProperties {
        content_type: short(obj.get("content-type")),
        content_encoding: short(obj.get("content-encoding")),
        headers: headers.filter(|h| !h.is_empty()),
        delivery_mode: small(props.get("delivery_mode")),
        priority: small(props.get("priority")),
        correlation_id: short(props.get("correlation_id")),
        reply_to: short(props.get("reply_to")),
        expiration: short(props.get("expiration")),
        message_id: short(props.get("message_id")),
        timestamp: props
            .get("timestamp")
            .and_then(|t| t.as_u64().or_else(|| t.as_f64().map(|f| f.max(0.0) as u64))),
        kind: short(props.get("type")),
        user_id: short(props.get("user_id")),
        app_id: short(props.get("app_id")),
        cluster_id: None,
    };
    Ok(Decoded {
        properties,
        body,
        exchange: text(info.and_then(|i| i.get("exchange"))),
        routing_key: text(info.and_then(|i| i.get("routing_key"))),
        tag: text(props.get("delivery_tag")),
        redelivered,
    })
}

/// Mark an envelope as redelivered, the way Kombu's `_do_restore_message` does (headers and
/// `delivery_info`). An entry that is not a JSON object is returned unchanged.
pub fn mark_redelivered(raw: &str) -> String {
    let Ok(mut doc) = serde_json::from_str::<Value>(raw) else {
        return raw.to_owned();
    };
    if let Some(h) = doc.get_mut("headers").and_then(Value::as_object_mut) {
        h.insert("redelivered".into(), Value::Bool(true));
    }
    if let Some(i) = doc
        .get_mut("properties")
        .and_then(|p| p.get_mut("delivery_info"))
        .and_then(Value::as_object_mut)
    {
        i.insert("redelivered".into(), Value::Bool(true));
    }
    doc.to_string()
}

/// The message's priority, clamped to 0–9 (Kombu's `_get_message_priority`).
pub fn priority_of(raw: &[u8]) -> u8 {
    serde_json::from_slice::<Value>(raw)
        .ok()
        .and_then(|d| d.get("properties")?.get("priority")?.as_u64())
        .map(|p| p.min(9) as u8)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_keeps_what_kombu_keeps() {
        let props = BasicProperties {
            content_type: Some("application/json".into()),
            content_encoding: Some("utf-8".into()),
            headers: Some(FieldTable::default().with("h", 1i64).with("s", "x")),
            delivery_mode: Some(2),
            priority: Some(3),
            correlation_id: Some("cid".into()),
            reply_to: Some("rq".into()),
            expiration: Some("5000".into()),
            ..Default::default()
        };
        let (raw, tag) = encode(&props, b"{\"x\": 1}", "ex", "a.b");
        let d = decode(raw.as_bytes()).unwrap();
        assert_eq!(d.tag, tag);
        assert_eq!(d.body.as_ref(), b"{\"x\": 1}");
        assert_eq!((d.exchange.as_str(), d.routing_key.as_str()), ("ex", "a.b"));
        assert_eq!(d.properties.priority, Some(3));
        assert_eq!(d.properties.correlation_id.as_deref(), Some("cid"));
        assert_eq!(d.properties.expiration.as_deref(), Some("5000"));
        let h = d.properties.headers.unwrap();
        assert_eq!(h.get("h").and_then(FieldValue::as_i64), Some(1));
        assert!(!d.redelivered);
        let again = decode(mark_redelivered(&raw).as_bytes()).unwrap();
        assert!(again.redelivered);
        assert!(again
            .properties
            .headers
            .unwrap()
            .get("redelivered")
            .is_none());
    }

    #[test]
    fn reads_what_kombu_wrote() {
        // Written by Kombu 5.7.0 to Redis (zlib-compressed JSON body).
        let raw = br#"{"body": "eJyrVqpQslIwrAUACm8CQA==", "content-encoding": "utf-8", "content-type": "application/json", "headers": {"h": 1, "compression": "application/x-gzip"}, "properties": {"correlation_id": "cid", "reply_to": "rq", "delivery_mode": 2, "expiration": "5000", "delivery_info": {"exchange": "envtest_ex", "routing_key": "a.b"}, "priority": 3, "body_encoding": "base64", "delivery_tag": "abac1e28-bf9a-4311-ac8a-f627d08383d9"}}"#;
        let d = decode(raw).unwrap();
        assert_eq!(d.tag, "abac1e28-bf9a-4311-ac8a-f627d08383d9");
        assert_eq!(d.routing_key, "a.b");
        assert_eq!(d.body.len(), 16);
        let h = d.properties.headers.unwrap();
        assert_eq!(
            h.get("compression").and_then(FieldValue::as_str),
            Some("application/x-gzip")
        );
    }

    #[test]
    fn bad_entries_are_typed_errors() {
        assert!(matches!(decode(b"nope"), Err(EnvelopeError::NotJson(_))));
        assert!(matches!(decode(b"[1]"), Err(EnvelopeError::Shape(_))));
        assert!(matches!(decode(b"{}"), Err(EnvelopeError::Shape(_))));
        assert!(matches!(
            decode(br#"{"body": "!!", "properties": {"body_encoding": "base64"}}"#),
            Err(EnvelopeError::BadBase64(_))
        ));
        assert!(matches!(
            decode(br#"{"body": "x", "properties": {"body_encoding": "rot13"}}"#),
            Err(EnvelopeError::UnknownBodyEncoding(_))
        ));
        assert!(matches!(
            decode(br#"{"body": 5, "properties": {}}"#),
            Err(EnvelopeError::Shape(_))
        ));
    }

    #[test]
    fn uuids_look_like_uuid4() {
        let u = uuid4();
        assert_eq!(u.len(), 36);
        assert_eq!(u.as_bytes()[14], b'4');
        assert!(matches!(u.as_bytes()[19], b'8' | b'9' | b'a' | b'b'));
    }
}
