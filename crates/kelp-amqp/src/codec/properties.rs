//! The 14 basic properties and the content header frame that carries them.

use bytes::Bytes;

use super::error::{DecodeError, EncodeError};
use super::field::{FieldTable, FieldValue, ShortString};
use super::wire::{Reader, Writer};

/// The properties of a message (the `basic` class content header).
///
/// ```
/// use kelp_amqp::BasicProperties;
/// let p = BasicProperties::default()
///     .with_content_type("application/json")
///     .with_delivery_mode(2)
///     .with_correlation_id("42");
/// assert_eq!(p.content_type.as_deref(), Some("application/json"));
/// ```
#[derive(Debug, Clone, PartialEq, Default)]
pub struct BasicProperties {
    /// MIME content type.
    pub content_type: Option<ShortString>,
    /// MIME content encoding.
    pub content_encoding: Option<ShortString>,
    /// Application headers.
    pub headers: Option<FieldTable>,
    /// 1 = transient, 2 = persistent.
    pub delivery_mode: Option<u8>,
    /// Priority 0..=9 (or up to the queue's `x-max-priority`).
    pub priority: Option<u8>,
    /// Correlation identifier (RPC).
    pub correlation_id: Option<ShortString>,
    /// Queue to reply to (RPC).
    pub reply_to: Option<ShortString>,
    /// Per-message TTL in milliseconds, as a decimal string.
    pub expiration: Option<ShortString>,
    /// Application message identifier.
    pub message_id: Option<ShortString>,
    /// Seconds since the epoch.
    pub timestamp: Option<u64>,
    /// Message type name.
    pub kind: Option<ShortString>,
    /// Creating user id (validated by RabbitMQ).
    pub user_id: Option<ShortString>,
    /// Creating application id.
    pub app_id: Option<ShortString>,
    /// Deprecated cluster id.
    pub cluster_id: Option<ShortString>,
}

macro_rules! setters {
    ($($f:ident : $with:ident ($t:ty)),* $(,)?) => {$(
        #[doc = concat!("Set `", stringify!($f), "`.")]
        pub fn $with(mut self, v: impl Into<$t>) -> Self {
            self.$f = Some(v.into());
            self
        }
    )*};
}

impl BasicProperties {
    setters!(
        content_type: with_content_type(ShortString),
        content_encoding: with_content_encoding(ShortString),
        headers: with_headers(FieldTable),
        delivery_mode: with_delivery_mode(u8),
        priority: with_priority(u8),
        correlation_id: with_correlation_id(ShortString),
        reply_to: with_reply_to(ShortString),
        expiration: with_expiration(ShortString),
        message_id: with_message_id(ShortString),
        timestamp: with_timestamp(u64),
        kind: with_kind(ShortString),
        user_id: with_user_id(ShortString),
        app_id: with_app_id(ShortString),
        cluster_id: with_cluster_id(ShortString),
    );

    fn flags(&self) -> u16 {
        let mut f = 0u16;
        let bits = [
            self.content_type.is_some(),
            self.content_encoding.is_some(),
            self.headers.is_some(),
            self.delivery_mode.is_some(),
            self.priority.is_some(),
            self.correlation_id.is_some(),
            self.reply_to.is_some(),
            self.expiration.is_some(),
            self.message_id.is_some(),
            self.timestamp.is_some(),
            self.kind.is_some(),
            self.user_id.is_some(),
            self.app_id.is_some(),
            self.cluster_id.is_some(),
        ];
        for (i, set) in bits.iter().enumerate() {
            if *set {
                f |= 1 << (15 - i);
            }
        }
        f
    }

    pub(crate) fn write(&self, w: &mut Writer<'_>) -> Result<(), EncodeError> {
        w.u16(self.flags());
        let s = |w: &mut Writer<'_>, v: &Option<ShortString>| -> Result<(), EncodeError> {
            match v {
                Some(v) => w.shortstr(v),
                None => Ok(()),
            }
        };
        s(w, &self.content_type)?;
        s(w, &self.content_encoding)?;
        if let Some(h) = &self.headers {
            h.write_to(w, 0)?;
        }
        if let Some(v) = self.delivery_mode {
            w.u8(v);
        }
        if let Some(v) = self.priority {
            w.u8(v);
        }
        s(w, &self.correlation_id)?;
        s(w, &self.reply_to)?;
        s(w, &self.expiration)?;
        s(w, &self.message_id)?;
        if let Some(v) = self.timestamp {
            w.u64(v);
        }
        s(w, &self.kind)?;
        s(w, &self.user_id)?;
        s(w, &self.app_id)?;
        s(w, &self.cluster_id)
    }

    pub(crate) fn read(r: &mut Reader) -> Result<Self, DecodeError> {
        let mut p = BasicProperties::default();
        p.read_into(r)?;
        Ok(p)
    }

    /// Decode into `self` (which must be default), in place: a delivery's properties are
    /// written where they will live, not moved there.
    pub(crate) fn read_into(&mut self, r: &mut Reader) -> Result<(), DecodeError> {
        let f = r.u16()?;
        if f & 0x0003 != 0 {
            return Err(DecodeError::BadPropertyFlags(f));
        }
        if f == 0 {
            return Ok(());
        }
        let has = |i: u32| f & (1 << (15 - i)) != 0;
        let s = |r: &mut Reader, i| {
            if has(i) {
                r.shortstr().map(Some)
            } else {
                Ok(None)
            }
        };
        let p = self;
        p.content_type = s(r, 0)?;
        p.content_encoding = s(r, 1)?;
        if has(2) {
            p.headers = Some(r.table()?);
        }
        if has(3) {
            p.delivery_mode = Some(r.u8()?);
        }
        if has(4) {
            p.priority = Some(r.u8()?);
        }
        p.correlation_id = s(r, 5)?;
        p.reply_to = s(r, 6)?;
        p.expiration = s(r, 7)?;
        p.message_id = s(r, 8)?;
        if has(9) {
            p.timestamp = Some(r.u64()?);
        }
        p.kind = s(r, 10)?;
        p.user_id = s(r, 11)?;
        p.app_id = s(r, 12)?;
        p.cluster_id = s(r, 13)?;
        Ok(())
    }
}

/// Decode a content header payload, writing the properties into `properties` in place.
/// Returns the announced body size.
pub fn decode_header_into(
    payload: Bytes,
    properties: &mut BasicProperties,
) -> Result<u64, DecodeError> {
    let mut r = Reader::new(payload);
    let class_id = r.u16()?;
    if class_id != 60 {
        return Err(DecodeError::BadContentClass(class_id));
    }
    let _weight = r.u16()?;
    let body_size = r.u64()?;
    properties.read_into(&mut r)?;
    if r.remaining() > 0 {
        return Err(DecodeError::TrailingBytes {
            method: "content header",
            trailing: r.remaining(),
        });
    }
    Ok(body_size)
}

/// A content header frame's payload.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct ContentHeader {
    /// Always 60 (basic) in practice.
    pub class_id: u16,
    /// Total body size announced for the following body frames.
    pub body_size: u64,
    /// The message properties.
    pub properties: BasicProperties,
}

impl ContentHeader {
    /// Decode a content header payload.
    pub fn decode(payload: Bytes) -> Result<Self, DecodeError> {
        let mut r = Reader::new(payload);
        let class_id = r.u16()?;
        if class_id != 60 {
            return Err(DecodeError::BadContentClass(class_id));
        }
        let _weight = r.u16()?;
        let body_size = r.u64()?;
        let properties = BasicProperties::read(&mut r)?;
        if r.remaining() > 0 {
            return Err(DecodeError::TrailingBytes {
                method: "content header",
                trailing: r.remaining(),
            });
        }
        Ok(ContentHeader {
            class_id,
            body_size,
            properties,
        })
    }

    /// Encode a content header payload.
    pub fn encode(&self, w: &mut Writer<'_>) -> Result<(), EncodeError> {
        w.u16(self.class_id);
        w.u16(0);
        w.u64(self.body_size);
        self.properties.write(w)
    }
}

fn short_ok(s: &str) -> Result<(), EncodeError> {
    if s.len() > 255 {
        return Err(EncodeError::ShortStringTooLong {
            len: s.len(),
            preview: s.chars().take(32).collect(),
        });
    }
    Ok(())
}

fn table_ok(t: &FieldTable, depth: usize) -> Result<(), EncodeError> {
    for (k, v) in t.iter() {
        short_ok(k)?;
        value_ok(v, depth)?;
    }
    Ok(())
}

fn value_ok(v: &FieldValue, depth: usize) -> Result<(), EncodeError> {
    // Deeper than this is refused by the decoder anyway; not worth walking.
    if depth > 64 {
        return Ok(());
    }
    match v {
        FieldValue::Table(t) => table_ok(t, depth + 1),
        FieldValue::Array(items) => items.iter().try_for_each(|i| value_ok(i, depth + 1)),
        _ => Ok(()),
    }
}

impl BasicProperties {
    /// Check that every short-string field (and header key) fits AMQP's 255-byte limit,
    /// so a publish can be refused up front with a clear error instead of failing inside
    /// the connection.
    ///
    /// ```
    /// use kelp_amqp::BasicProperties;
    /// assert!(BasicProperties::default().with_content_type("text/plain").check_encodable().is_ok());
    /// let long = "x".repeat(300);
    /// assert!(BasicProperties::default().with_content_type(long.as_str()).check_encodable().is_err());
    /// ```
    pub fn check_encodable(&self) -> Result<(), EncodeError> {
        for s in [
            &self.content_type,
            &self.content_encoding,
            &self.correlation_id,
            &self.reply_to,
            &self.expiration,
            &self.message_id,
            &self.kind,
            &self.user_id,
            &self.app_id,
            &self.cluster_id,
        ]
        .into_iter()
        .flatten()
        {
            short_ok(s)?;
        }
        match &self.headers {
            Some(h) => table_ok(h, 0),
            None => Ok(()),
        }
    }
}
