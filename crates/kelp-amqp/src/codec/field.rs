//! AMQP field tables and values (the RabbitMQ / 0-9-1 errata type set) and short strings.

use std::fmt;
use std::ops::Deref;

use bytes::Bytes;
use bytestring::ByteString;

use super::error::{DecodeError, EncodeError};
use super::wire::{Reader, Writer};

/// How deeply tables and arrays may nest before decoding fails with [`DecodeError::TooDeep`].
pub const MAX_NESTING: usize = 32;

/// An AMQP short string: UTF-8, at most 255 bytes on the wire. Cheap to clone (shares its bytes),
/// and decoded without copying from the frame it arrived in.
///
/// ```
/// use kelp_amqp::ShortString;
/// let q = ShortString::from("tasks");
/// assert_eq!(q.as_str(), "tasks");
/// assert_eq!(&*q, "tasks");
/// ```
#[derive(Clone, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ShortString(ByteString);

impl ShortString {
    /// The empty string.
    pub const fn empty() -> Self {
        ShortString(ByteString::from_static(""))
    }
    /// A short string from a static str, without allocating.
    pub const fn from_static(s: &'static str) -> Self {
        ShortString(ByteString::from_static(s))
    }
    /// Validate `b` as UTF-8 and wrap it without copying.
    pub fn from_utf8(b: Bytes) -> Result<Self, DecodeError> {
        ByteString::try_from(b)
            .map(ShortString)
            .map_err(|_| DecodeError::InvalidUtf8)
    }
    /// The string.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl Deref for ShortString {
    type Target = str;
    fn deref(&self) -> &str {
        &self.0
    }
}
impl AsRef<str> for ShortString {
    fn as_ref(&self) -> &str {
        &self.0
    }
}
impl From<&str> for ShortString {
    fn from(s: &str) -> Self {
        ShortString(ByteString::from(s))
    }
}
impl From<String> for ShortString {
    fn from(s: String) -> Self {
        ShortString(ByteString::from(s))
    }
}
impl From<&String> for ShortString {
    fn from(s: &String) -> Self {
        ShortString(ByteString::from(s.as_str()))
    }
}
impl From<ShortString> for String {
    fn from(s: ShortString) -> Self {
        s.0.to_string()
    }
}
impl PartialEq<str> for ShortString {
    fn eq(&self, o: &str) -> bool {
        self.as_str() == o
    }
}
impl PartialEq<&str> for ShortString {
    fn eq(&self, o: &&str) -> bool {
        self.as_str() == *o
    }
}
impl fmt::Debug for ShortString {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self.as_str(), f)
    }
}
impl fmt::Display for ShortString {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A decimal value: `value / 10^scale`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Decimal {
    /// Number of decimal digits after the point.
    pub scale: u8,
    /// The unscaled value.
    pub value: u32,
}

/// One value of a field table or array.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub enum FieldValue {
    /// `t`
    Bool(bool),
    /// `b`
    I8(i8),
    /// `B`
    U8(u8),
    /// `s` (RabbitMQ: signed 16-bit)
    I16(i16),
    /// `u`
    U16(u16),
    /// `I`
    I32(i32),
    /// `i`
    U32(u32),
    /// `l`
    I64(i64),
    /// `f`
    F32(f32),
    /// `d`
    F64(f64),
    /// `D`
    Decimal(Decimal),
    /// `S` — a long string; bytes, usually UTF-8.
    LongString(Bytes),
    /// `x` — a byte array.
    ByteArray(Bytes),
    /// `A`
    Array(Vec<FieldValue>),
    /// `T` — seconds since the epoch.
    Timestamp(u64),
    /// `F`
    Table(FieldTable),
    /// `V`
    Void,
}

impl FieldValue {
    /// The long string as `&str` if this is a UTF-8 [`FieldValue::LongString`].
    pub fn as_str(&self) -> Option<&str> {
        match self {
            FieldValue::LongString(b) => std::str::from_utf8(b).ok(),
            _ => None,
        }
    }
    /// The value as i64 if it is any integer type.
    pub fn as_i64(&self) -> Option<i64> {
        Some(match *self {
            FieldValue::I8(v) => v.into(),
            FieldValue::U8(v) => v.into(),
            FieldValue::I16(v) => v.into(),
            FieldValue::U16(v) => v.into(),
            FieldValue::I32(v) => v.into(),
            FieldValue::U32(v) => v.into(),
            FieldValue::I64(v) => v,
            FieldValue::Timestamp(v) => i64::try_from(v).ok()?,
            _ => return None,
        })
    }
    /// The value as bool if it is a [`FieldValue::Bool`].
    pub fn as_bool(&self) -> Option<bool> {
        match self {
            FieldValue::Bool(b) => Some(*b),
            _ => None,
        }
    }

    fn read(r: &mut Reader, depth: usize) -> Result<Self, DecodeError> {
        let tag = r.u8()?;
        Ok(match tag {
            b't' => FieldValue::Bool(r.u8()? != 0),
            b'b' => FieldValue::I8(r.u8()? as i8),
            b'B' => FieldValue::U8(r.u8()?),
            b's' => FieldValue::I16(r.u16()? as i16),
            b'u' => FieldValue::U16(r.u16()?),
            b'I' => FieldValue::I32(r.u32()? as i32),
            b'i' => FieldValue::U32(r.u32()?),
            b'l' => FieldValue::I64(r.u64()? as i64),
            b'f' => FieldValue::F32(f32::from_bits(r.u32()?)),
            b'd' => FieldValue::F64(f64::from_bits(r.u64()?)),
            b'D' => FieldValue::Decimal(Decimal {
                scale: r.u8()?,
                value: r.u32()?,
            }),
            b'S' => FieldValue::LongString(r.longstr()?),
            b'x' => FieldValue::ByteArray(r.longstr()?),
            b'T' => FieldValue::Timestamp(r.u64()?),
            b'V' => FieldValue::Void,
            b'F' => FieldValue::Table(FieldTable::read(r, depth + 1)?),
            b'A' => {
                if depth + 1 > MAX_NESTING {
                    return Err(DecodeError::TooDeep(MAX_NESTING));
                }
                let body = r.longstr()?;
                let mut inner = Reader::new(body);
                let mut items = Vec::new();
                while inner.remaining() > 0 {
                    items.push(FieldValue::read(&mut inner, depth + 1)?);
                }
                FieldValue::Array(items)
            }
            other => return Err(DecodeError::UnknownFieldType(char::from(other))),
        })
    }

    fn write(&self, w: &mut Writer<'_>, depth: usize) -> Result<(), EncodeError> {
        match self {
            FieldValue::Bool(v) => {
                w.u8(b't');
                w.u8(u8::from(*v));
            }
            FieldValue::I8(v) => {
                w.u8(b'b');
                w.u8(*v as u8);
            }
            FieldValue::U8(v) => {
                w.u8(b'B');
                w.u8(*v);
            }
            FieldValue::I16(v) => {
                w.u8(b's');
                w.u16(*v as u16);
            }
            FieldValue::U16(v) => {
                w.u8(b'u');
                w.u16(*v);
            }
            FieldValue::I32(v) => {
                w.u8(b'I');
                w.u32(*v as u32);
            }
            FieldValue::U32(v) => {
                w.u8(b'i');
                w.u32(*v);
            }
            FieldValue::I64(v) => {
                w.u8(b'l');
                w.u64(*v as u64);
            }
            FieldValue::F32(v) => {
                w.u8(b'f');
                w.u32(v.to_bits());
            }
            FieldValue::F64(v) => {
                w.u8(b'd');
                w.u64(v.to_bits());
            }
            FieldValue::Decimal(d) => {
                w.u8(b'D');
                w.u8(d.scale);
                w.u32(d.value);
            }
            FieldValue::LongString(b) => {
                w.u8(b'S');
                w.longstr(b)?;
            }
            FieldValue::ByteArray(b) => {
                w.u8(b'x');
                w.longstr(b)?;
            }
            FieldValue::Timestamp(t) => {
                w.u8(b'T');
                w.u64(*t);
            }
            FieldValue::Void => w.u8(b'V'),
            FieldValue::Table(t) => {
                w.u8(b'F');
                t.write_to(w, depth + 1)?;
            }
            FieldValue::Array(items) => {
                if depth + 1 > MAX_NESTING {
                    return Err(EncodeError::TooDeep(MAX_NESTING));
                }
                w.u8(b'A');
                let at = w.placeholder_u32();
                for it in items {
                    it.write(w, depth + 1)?;
                }
                w.patch_len(at)?;
            }
        }
        Ok(())
    }
}

macro_rules! from_value {
    ($($t:ty => $v:ident),*) => {$(
        impl From<$t> for FieldValue {
            fn from(v: $t) -> Self {
                FieldValue::$v(v)
            }
        }
    )*};
}
from_value!(bool => Bool, i8 => I8, u8 => U8, i16 => I16, u16 => U16, i32 => I32, u32 => U32,
    i64 => I64, f32 => F32, f64 => F64, Decimal => Decimal, FieldTable => Table,
    Vec<FieldValue> => Array);

impl From<&str> for FieldValue {
    fn from(v: &str) -> Self {
        FieldValue::LongString(Bytes::copy_from_slice(v.as_bytes()))
    }
}
impl From<String> for FieldValue {
    fn from(v: String) -> Self {
        FieldValue::LongString(Bytes::from(v))
    }
}

/// An AMQP field table: an ordered list of `(name, value)` pairs with unique names.
///
/// ```
/// use kelp_amqp::{FieldTable, FieldValue};
/// let mut args = FieldTable::new();
/// args.insert("x-max-length", 100i32);
/// args.insert("x-queue-type", "quorum");
/// assert_eq!(args.get("x-max-length").and_then(FieldValue::as_i64), Some(100));
/// assert_eq!(args.get("x-queue-type").and_then(FieldValue::as_str), Some("quorum"));
/// ```
#[derive(Debug, Clone, PartialEq, Default)]
pub struct FieldTable(Vec<(ShortString, FieldValue)>);

impl FieldTable {
    /// An empty table.
    pub const fn new() -> Self {
        FieldTable(Vec::new())
    }
    /// Set `key` to `value`, replacing an earlier value of the same key.
    pub fn insert(&mut self, key: impl Into<ShortString>, value: impl Into<FieldValue>) {
        let key = key.into();
        let value = value.into();
        if let Some(slot) = self.0.iter_mut().find(|(k, _)| *k == key) {
            slot.1 = value;
        } else {
            self.0.push((key, value));
        }
    }
    /// Builder form of [`FieldTable::insert`].
    pub fn with(mut self, key: impl Into<ShortString>, value: impl Into<FieldValue>) -> Self {
        self.insert(key, value);
        self
    }
    /// The value of `key`.
    pub fn get(&self, key: &str) -> Option<&FieldValue> {
        self.0
            .iter()
            .find(|(k, _)| k.as_str() == key)
            .map(|(_, v)| v)
    }
    /// Remove `key`, returning its value.
    pub fn remove(&mut self, key: &str) -> Option<FieldValue> {
        let i = self.0.iter().position(|(k, _)| k.as_str() == key)?;
        Some(self.0.remove(i).1)
    }
    /// Number of entries.
    pub fn len(&self) -> usize {
        self.0.len()
    }
    /// True when empty.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
    /// Iterate over entries in order.
    pub fn iter(&self) -> impl Iterator<Item = (&ShortString, &FieldValue)> {
        self.0.iter().map(|(k, v)| (k, v))
    }

    pub(crate) fn read(r: &mut Reader, depth: usize) -> Result<Self, DecodeError> {
        if depth > MAX_NESTING {
            return Err(DecodeError::TooDeep(MAX_NESTING));
        }
        let body = r.longstr()?;
        Self::read_entries(Reader::new(body), depth)
    }

    fn read_entries(mut inner: Reader, depth: usize) -> Result<Self, DecodeError> {
        let mut entries = Vec::new();
        while inner.remaining() > 0 {
            let k = inner.shortstr()?;
            let v = FieldValue::read(&mut inner, depth)?;
            entries.push((k, v));
        }
        Ok(FieldTable(entries))
    }

    /// Decode the entries of a table from bytes that hold no length prefix
    /// (the form AMQPLAIN uses for its response).
    pub fn decode_entries(b: Bytes) -> Result<Self, DecodeError> {
        Self::read_entries(Reader::new(b), 0)
    }

    pub(crate) fn write_to(&self, w: &mut Writer<'_>, depth: usize) -> Result<(), EncodeError> {
        if depth > MAX_NESTING {
            return Err(EncodeError::TooDeep(MAX_NESTING));
        }
        let at = w.placeholder_u32();
        for (k, v) in &self.0 {
            w.shortstr(k)?;
            v.write(w, depth)?;
        }
        w.patch_len(at)
    }

    /// Encode the entries without the length prefix (AMQPLAIN's response form).
    pub fn encode_entries(&self) -> Result<Bytes, EncodeError> {
        let mut buf = bytes::BytesMut::new();
        let mut w = Writer::new(&mut buf);
        self.write_to(&mut w, 0)?;
        let mut b = buf.freeze();
        Ok(b.split_off(4))
    }
}

impl<K: Into<ShortString>, V: Into<FieldValue>> FromIterator<(K, V)> for FieldTable {
    fn from_iter<I: IntoIterator<Item = (K, V)>>(iter: I) -> Self {
        let mut t = FieldTable::new();
        for (k, v) in iter {
            t.insert(k, v);
        }
        t
    }
}
