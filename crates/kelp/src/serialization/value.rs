//! [`Value`]: a dynamically-typed payload, the common currency of every serializer.

use std::fmt;

use serde::de::value::{MapAccessDeserializer, MapDeserializer, SeqDeserializer};
use serde::de::{self, DeserializeOwned, IntoDeserializer, Visitor};
use serde::ser::{self, Serialize};

use super::SerializationError;

/// The error type of `Value`'s serde `Deserializer` and of [`Value::from_serialize`]'s serializer.
pub type ValueError = serde::de::value::Error;

/// A dynamically-typed message payload, as Python sees one.
///
/// * Python tuples, lists, sets and frozensets all become [`Value::List`].
/// * Dicts become [`Value::Map`], which keeps insertion order and allows any key type.
/// * Integers are `i128` (Python ints wider than 128 bits are rejected by the decoders).
/// * Kombu's JSON markers and pickled `datetime`/`date`/`time`/`Decimal`/`UUID` objects become
///   [`Value::String`]s in their ISO 8601 / decimal / hyphenated-hex forms, which is also what
///   `chrono`, `rust_decimal` and `uuid` deserialize from.
///
/// `Value` implements `Serialize`, `Deserialize` and `serde::Deserializer`, so any
/// `T: DeserializeOwned` can be read out of it with [`Value::deserialize_into`].
///
/// ```
/// use kelp::serialization::Value;
///
/// let v = Value::Map(vec![("n".into(), 3.into()), ("tags".into(), vec![Value::from("a")].into())]);
/// #[derive(serde::Deserialize)]
/// struct Job { n: u8, tags: Vec<String> }
/// let job: Job = v.deserialize_into().unwrap();
/// assert_eq!((job.n, job.tags), (3, vec!["a".to_string()]));
/// ```
#[derive(Debug, Clone, PartialEq, Default)]
pub enum Value {
    /// `None` / `null` / `nil` / unit.
    #[default]
    Null,
    /// A boolean.
    Bool(bool),
    /// An integer (covers `i64` and `u64`; Python ints up to 128 bits).
    Int(i128),
    /// A floating-point number.
    Float(f64),
    /// A text string.
    String(String),
    /// A byte string.
    Bytes(Vec<u8>),
    /// A list, tuple or set.
    List(Vec<Value>),
    /// A map in insertion order; keys may be any value.
    Map(Vec<(Value, Value)>),
}

impl Value {
    /// Converts any `Serialize` value into a `Value` (structs become maps with string keys,
    /// unit enum variants become strings, other variants single-entry maps).
    pub fn from_serialize<T: Serialize + ?Sized>(value: &T) -> Result<Value, SerializationError> {
        value
            .serialize(ValueSerializer)
            .map_err(|e| SerializationError::Encode {
                serializer: "value".into(),
                message: e.to_string(),
            })
    }

    /// Deserializes this value into any `T: DeserializeOwned`.
    pub fn deserialize_into<T: DeserializeOwned>(self) -> Result<T, SerializationError> {
        T::deserialize(self).map_err(|e| SerializationError::Decode {
            content_type: "(kelp value)".into(),
            message: e.to_string(),
        })
    }

    /// Looks up a string key in a [`Value::Map`]; `None` for other variants.
    pub fn get(&self, key: &str) -> Option<&Value> {
        match self {
            Value::Map(entries) => entries
                .iter()
                .find(|(k, _)| k.as_str() == Some(key))
                .map(|(_, v)| v),
            _ => None,
        }
    }

    /// True for [`Value::Null`].
    pub fn is_null(&self) -> bool {
        matches!(self, Value::Null)
    }

    /// The boolean, if this is a [`Value::Bool`].
    pub fn as_bool(&self) -> Option<bool> {
        match self {
            Value::Bool(b) => Some(*b),
            _ => None,
        }
    }

    /// The integer, if this is a [`Value::Int`] that fits an `i64`.
    pub fn as_i64(&self) -> Option<i64> {
        match self {
            Value::Int(i) => i64::try_from(*i).ok(),
            _ => None,
        }
    }

    /// The number as `f64`, if this is a [`Value::Float`] or [`Value::Int`].
    pub fn as_f64(&self) -> Option<f64> {
        match self {
            Value::Float(f) => Some(*f),
            Value::Int(i) => Some(*i as f64),
            _ => None,
        }
    }

    /// The text, if this is a [`Value::String`].
    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::String(s) => Some(s),
            _ => None,
        }
    }

    /// The bytes, if this is a [`Value::Bytes`].
    pub fn as_bytes(&self) -> Option<&[u8]> {
        match self {
            Value::Bytes(b) => Some(b),
            _ => None,
        }
    }

    /// The items, if this is a [`Value::List`].
    pub fn as_list(&self) -> Option<&[Value]> {
        match self {
            Value::List(l) => Some(l),
            _ => None,
        }
    }

    /// The entries, if this is a [`Value::Map`].
    pub fn as_map(&self) -> Option<&[(Value, Value)]> {
        match self {
            Value::Map(m) => Some(m),
            _ => None,
        }
    }
}

macro_rules! from_int {
    ($($t:ty),*) => {$(
        impl From<$t> for Value {
            fn from(v: $t) -> Self {
                Value::Int(i128::from(v))
            }
        }
    )*};
}
from_int!(i8, i16, i32, i64, u8, u16, u32, u64, i128);

impl From<bool> for Value {
    fn from(v: bool) -> Self {
        Value::Bool(v)
    }
}
impl From<f64> for Value {
    fn from(v: f64) -> Self {
        Value::Float(v)
    }
}
impl From<&str> for Value {
    fn from(v: &str) -> Self {
        Value::String(v.to_owned())
    }
}
impl From<String> for Value {
    fn from(v: String) -> Self {
        Value::String(v)
    }
}
impl From<&[u8]> for Value {
    fn from(v: &[u8]) -> Self {
        Value::Bytes(v.to_vec())
    }
}
impl From<Vec<u8>> for Value {
    fn from(v: Vec<u8>) -> Self {
        Value::Bytes(v)
    }
}
impl From<Vec<Value>> for Value {
    fn from(v: Vec<Value>) -> Self {
        Value::List(v)
    }
}
impl<T: Into<Value>> From<Option<T>> for Value {
    fn from(v: Option<T>) -> Self {
        v.map_or(Value::Null, Into::into)
    }
}

// ---------------------------------------------------------------------------------------------
// Serialize

impl Serialize for Value {
    fn serialize<S: ser::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        use ser::{SerializeMap, SerializeSeq};
        match self {
            Value::Null => serializer.serialize_unit(),
            Value::Bool(b) => serializer.serialize_bool(*b),
            Value::Int(i) => {
                if let Ok(v) = i64::try_from(*i) {
                    serializer.serialize_i64(v)
                } else if let Ok(v) = u64::try_from(*i) {
                    serializer.serialize_u64(v)
                } else {
                    serializer.serialize_i128(*i)
                }
            }
            Value::Float(f) => serializer.serialize_f64(*f),
            Value::String(s) => serializer.serialize_str(s),
            Value::Bytes(b) => serializer.serialize_bytes(b),
            Value::List(items) => {
                let mut seq = serializer.serialize_seq(Some(items.len()))?;
                for item in items {
                    seq.serialize_element(item)?;
                }
                seq.end()
            }
            Value::Map(entries) => {
                let mut map = serializer.serialize_map(Some(entries.len()))?;
                for (k, v) in entries {
                    map.serialize_entry(k, v)?;
                }
                map.end()
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Deserialize

/// Upper bound on capacity pre-allocated from an (untrusted) length hint.
const MAX_PREALLOC: usize = 4096;

struct ValueVisitor;

impl<'de> Visitor<'de> for ValueVisitor {
    type Value = Value;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any value")
    }
    fn visit_bool<E>(self, v: bool) -> Result<Value, E> {
        Ok(Value::Bool(v))
    }
    fn visit_i64<E>(self, v: i64) -> Result<Value, E> {
        Ok(Value::Int(v.into()))
    }
    fn visit_u64<E>(self, v: u64) -> Result<Value, E> {
        Ok(Value::Int(v.into()))
    }
    fn visit_i128<E>(self, v: i128) -> Result<Value, E> {
        Ok(Value::Int(v))
    }
    fn visit_u128<E: de::Error>(self, v: u128) -> Result<Value, E> {
        i128::try_from(v)
            .map(Value::Int)
            .map_err(|_| E::custom("integer wider than 128 bits"))
    }
    fn visit_f64<E>(self, v: f64) -> Result<Value, E> {
        Ok(Value::Float(v))
    }
    fn visit_str<E>(self, v: &str) -> Result<Value, E> {
        Ok(Value::String(v.to_owned()))
    }
    fn visit_string<E>(self, v: String) -> Result<Value, E> {
        Ok(Value::String(v))
    }
    fn visit_bytes<E>(self, v: &[u8]) -> Result<Value, E> {
        Ok(Value::Bytes(v.to_vec()))
    }
    fn visit_byte_buf<E>(self, v: Vec<u8>) -> Result<Value, E> {
        Ok(Value::Bytes(v))
    }
    fn visit_none<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }
    fn visit_unit<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }
    fn visit_some<D: de::Deserializer<'de>>(self, d: D) -> Result<Value, D::Error> {
        d.deserialize_any(ValueVisitor)
    }
    fn visit_newtype_struct<D: de::Deserializer<'de>>(self, d: D) -> Result<Value, D::Error> {
        d.deserialize_any(ValueVisitor)
    }
    fn visit_seq<A: de::SeqAccess<'de>>(self, mut seq: A) -> Result<Value, A::Error> {
        let mut items = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(MAX_PREALLOC));
        while let Some(item) = seq.next_element()? {
            items.push(item);
        }
        Ok(Value::List(items))
    }
    fn visit_map<A: de::MapAccess<'de>>(self, mut map: A) -> Result<Value, A::Error> {
        let mut entries = Vec::with_capacity(map.size_hint().unwrap_or(0).min(MAX_PREALLOC));
        while let Some(entry) = map.next_entry()? {
            entries.push(entry);
        }
        Ok(Value::Map(entries))
    }
    /// Enums (e.g. YAML `!tag value`) become a single-entry map `{tag: value}`.
    fn visit_enum<A: de::EnumAccess<'de>>(self, data: A) -> Result<Value, A::Error> {
        use de::VariantAccess;
        let (tag, variant): (Value, _) = data.variant()?;
        let content: Value = variant.newtype_variant()?;
        Ok(Value::Map(vec![(tag, content)]))
    }
}

impl<'de> de::Deserialize<'de> for Value {
    fn deserialize<D: de::Deserializer<'de>>(d: D) -> Result<Value, D::Error> {
        d.deserialize_any(ValueVisitor)
    }
}

// ---------------------------------------------------------------------------------------------
// Value as a serde Deserializer

impl<'de> IntoDeserializer<'de, ValueError> for Value {
    type Deserializer = Value;
    fn into_deserializer(self) -> Value {
        self
    }
}

impl<'de> de::Deserializer<'de> for Value {
    type Error = ValueError;

    fn deserialize_any<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, ValueError> {
        match self {
            Value::Null => visitor.visit_unit(),
            Value::Bool(b) => visitor.visit_bool(b),
            Value::Int(i) => {
                if let Ok(v) = i64::try_from(i) {
                    visitor.visit_i64(v)
                } else if let Ok(v) = u64::try_from(i) {
                    visitor.visit_u64(v)
                } else {
                    visitor.visit_i128(i)
                }
            }
            Value::Float(f) => visitor.visit_f64(f),
            Value::String(s) => visitor.visit_string(s),
            Value::Bytes(b) => visitor.visit_byte_buf(b),
            Value::List(items) => {
                let mut seq = SeqDeserializer::new(items.into_iter());
                let out = visitor.visit_seq(&mut seq)?;
                seq.end()?;
                Ok(out)
            }
            Value::Map(entries) => {
                let mut map = MapDeserializer::new(entries.into_iter());
                let out = visitor.visit_map(&mut map)?;
                map.end()?;
                Ok(out)
            }
        }
    }

    fn deserialize_option<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, ValueError> {
        match self {
            Value::Null => visitor.visit_none(),
            other => visitor.visit_some(other),
        }
    }

    fn deserialize_newtype_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        visitor: V,
    ) -> Result<V::Value, ValueError> {
        visitor.visit_newtype_struct(self)
    }

    fn deserialize_enum<V: Visitor<'de>>(
        self,
        _name: &'static str,
        _variants: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, ValueError> {
        match self {
            Value::String(s) => visitor.visit_enum(s.into_deserializer()),
            Value::Map(entries) if entries.len() == 1 => visitor.visit_enum(
                MapAccessDeserializer::new(MapDeserializer::new(entries.into_iter())),
            ),
            other => other.deserialize_any(visitor),
        }
    }

    /// Byte strings (and text) can be read as a sequence of `u8`, so `Vec<u8>` works.
    fn deserialize_seq<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, ValueError> {
        match self {
            Value::Bytes(b) => visitor.visit_seq(SeqDeserializer::new(b.into_iter())),
            Value::String(s) => visitor.visit_seq(SeqDeserializer::new(s.into_bytes().into_iter())),
            other => other.deserialize_any(visitor),
        }
    }

    fn deserialize_bytes<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, ValueError> {
        self.deserialize_byte_buf(visitor)
    }

    fn deserialize_byte_buf<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, ValueError> {
        match self {
            Value::String(s) => visitor.visit_byte_buf(s.into_bytes()),
            other => other.deserialize_any(visitor),
        }
    }

    fn deserialize_ignored_any<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, ValueError> {
        visitor.visit_unit()
    }

    serde::forward_to_deserialize_any! {
        bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string
        unit unit_struct tuple tuple_struct map struct identifier
    }
}

// ---------------------------------------------------------------------------------------------
// Serializer producing a Value

struct ValueSerializer;

fn variant_map(variant: &'static str, content: Value) -> Value {
    Value::Map(vec![(Value::String(variant.to_owned()), content)])
}

impl ser::Serializer for ValueSerializer {
    type Ok = Value;
    type Error = ValueError;
    type SerializeSeq = SeqBuilder;
    type SerializeTuple = SeqBuilder;
    type SerializeTupleStruct = SeqBuilder;
    type SerializeTupleVariant = SeqBuilder;
    type SerializeMap = MapBuilder;
    type SerializeStruct = MapBuilder;
    type SerializeStructVariant = MapBuilder;

    fn serialize_bool(self, v: bool) -> Result<Value, ValueError> {
        Ok(Value::Bool(v))
    }
    fn serialize_i8(self, v: i8) -> Result<Value, ValueError> {
        Ok(v.into())
    }
    fn serialize_i16(self, v: i16) -> Result<Value, ValueError> {
        Ok(v.into())
    }
    fn serialize_i32(self, v: i32) -> Result<Value, ValueError> {
        Ok(v.into())
    }
    fn serialize_i64(self, v: i64) -> Result<Value, ValueError> {
        Ok(v.into())
    }
    fn serialize_i128(self, v: i128) -> Result<Value, ValueError> {
        Ok(v.into())
    }
    fn serialize_u8(self, v: u8) -> Result<Value, ValueError> {
        Ok(v.into())
    }
    fn serialize_u16(self, v: u16) -> Result<Value, ValueError> {
        Ok(v.into())
    }
    fn serialize_u32(self, v: u32) -> Result<Value, ValueError> {
        Ok(v.into())
    }
    fn serialize_u64(self, v: u64) -> Result<Value, ValueError> {
        Ok(v.into())
    }
    fn serialize_u128(self, v: u128) -> Result<Value, ValueError> {
        i128::try_from(v)
            .map(Value::Int)
            .map_err(|_| ser::Error::custom("integer wider than 128 bits"))
    }
    fn serialize_f32(self, v: f32) -> Result<Value, ValueError> {
        Ok(Value::Float(v.into()))
    }
    fn serialize_f64(self, v: f64) -> Result<Value, ValueError> {
        Ok(Value::Float(v))
    }
    fn serialize_char(self, v: char) -> Result<Value, ValueError> {
        Ok(Value::String(v.to_string()))
    }
    fn serialize_str(self, v: &str) -> Result<Value, ValueError> {
        Ok(v.into())
    }
    fn serialize_bytes(self, v: &[u8]) -> Result<Value, ValueError> {
        Ok(v.into())
    }
    fn serialize_none(self) -> Result<Value, ValueError> {
        Ok(Value::Null)
    }
    fn serialize_some<T: Serialize + ?Sized>(self, value: &T) -> Result<Value, ValueError> {
        value.serialize(self)
    }
    fn serialize_unit(self) -> Result<Value, ValueError> {
        Ok(Value::Null)
    }
    fn serialize_unit_struct(self, _name: &'static str) -> Result<Value, ValueError> {
        Ok(Value::Null)
    }
    fn serialize_unit_variant(
        self,
        _: &'static str,
        _: u32,
        variant: &'static str,
    ) -> Result<Value, ValueError> {
        Ok(variant.into())
    }
    fn serialize_newtype_struct<T: Serialize + ?Sized>(
        self,
        _: &'static str,
        value: &T,
    ) -> Result<Value, ValueError> {
        value.serialize(self)
    }
    fn serialize_newtype_variant<T: Serialize + ?Sized>(
        self,
        _: &'static str,
        _: u32,
        variant: &'static str,
        value: &T,
    ) -> Result<Value, ValueError> {
        Ok(variant_map(variant, value.serialize(ValueSerializer)?))
    }
    fn serialize_seq(self, len: Option<usize>) -> Result<SeqBuilder, ValueError> {
        Ok(SeqBuilder {
            items: Vec::with_capacity(len.unwrap_or(0).min(MAX_PREALLOC)),
            variant: None,
        })
    }
    fn serialize_tuple(self, len: usize) -> Result<SeqBuilder, ValueError> {
        self.serialize_seq(Some(len))
    }
    fn serialize_tuple_struct(self, _: &'static str, len: usize) -> Result<SeqBuilder, ValueError> {
        self.serialize_seq(Some(len))
    }
    fn serialize_tuple_variant(
        self,
        _: &'static str,
        _: u32,
        variant: &'static str,
        len: usize,
    ) -> Result<SeqBuilder, ValueError> {
        Ok(SeqBuilder {
            items: Vec::with_capacity(len.min(MAX_PREALLOC)),
            variant: Some(variant),
        })
    }
    fn serialize_map(self, len: Option<usize>) -> Result<MapBuilder, ValueError> {
        Ok(MapBuilder {
            entries: Vec::with_capacity(len.unwrap_or(0).min(MAX_PREALLOC)),
            key: None,
            variant: None,
        })
    }
    fn serialize_struct(self, _: &'static str, len: usize) -> Result<MapBuilder, ValueError> {
        self.serialize_map(Some(len))
    }
    fn serialize_struct_variant(
        self,
        _: &'static str,
        _: u32,
        variant: &'static str,
        len: usize,
    ) -> Result<MapBuilder, ValueError> {
        Ok(MapBuilder {
            entries: Vec::with_capacity(len.min(MAX_PREALLOC)),
            key: None,
            variant: Some(variant),
        })
    }
}

struct SeqBuilder {
    items: Vec<Value>,
    variant: Option<&'static str>,
}

impl SeqBuilder {
    fn push<T: Serialize + ?Sized>(&mut self, value: &T) -> Result<(), ValueError> {
        self.items.push(value.serialize(ValueSerializer)?);
        Ok(())
    }
    fn finish(self) -> Value {
        let list = Value::List(self.items);
        match self.variant {
            Some(variant) => variant_map(variant, list),
            None => list,
        }
    }
}

impl ser::SerializeSeq for SeqBuilder {
    type Ok = Value;
    type Error = ValueError;
    fn serialize_element<T: Serialize + ?Sized>(&mut self, value: &T) -> Result<(), ValueError> {
        self.push(value)
    }
    fn end(self) -> Result<Value, ValueError> {
        Ok(self.finish())
    }
}
impl ser::SerializeTuple for SeqBuilder {
    type Ok = Value;
    type Error = ValueError;
    fn serialize_element<T: Serialize + ?Sized>(&mut self, value: &T) -> Result<(), ValueError> {
        self.push(value)
    }
    fn end(self) -> Result<Value, ValueError> {
        Ok(self.finish())
    }
}
impl ser::SerializeTupleStruct for SeqBuilder {
    type Ok = Value;
    type Error = ValueError;
    fn serialize_field<T: Serialize + ?Sized>(&mut self, value: &T) -> Result<(), ValueError> {
        self.push(value)
    }
    fn end(self) -> Result<Value, ValueError> {
        Ok(self.finish())
    }
}
impl ser::SerializeTupleVariant for SeqBuilder {
    type Ok = Value;
    type Error = ValueError;
    fn serialize_field<T: Serialize + ?Sized>(&mut self, value: &T) -> Result<(), ValueError> {
        self.push(value)
    }
    fn end(self) -> Result<Value, ValueError> {
        Ok(self.finish())
    }
}

struct MapBuilder {
    entries: Vec<(Value, Value)>,
    key: Option<Value>,
    variant: Option<&'static str>,
}

impl MapBuilder {
    fn finish(self) -> Value {
        let map = Value::Map(self.entries);
        match self.variant {
            Some(variant) => variant_map(variant, map),
            None => map,
        }
    }
    fn field<T: Serialize + ?Sized>(
        &mut self,
        key: &'static str,
        value: &T,
    ) -> Result<(), ValueError> {
        self.entries
            .push((key.into(), value.serialize(ValueSerializer)?));
        Ok(())
    }
}

impl ser::SerializeMap for MapBuilder {
    type Ok = Value;
    type Error = ValueError;
    fn serialize_key<T: Serialize + ?Sized>(&mut self, key: &T) -> Result<(), ValueError> {
        self.key = Some(key.serialize(ValueSerializer)?);
        Ok(())
    }
    fn serialize_value<T: Serialize + ?Sized>(&mut self, value: &T) -> Result<(), ValueError> {
        let key = self
            .key
            .take()
            .ok_or_else(|| ser::Error::custom("map value without a key"))?;
        self.entries.push((key, value.serialize(ValueSerializer)?));
        Ok(())
    }
    fn end(self) -> Result<Value, ValueError> {
        Ok(self.finish())
    }
}
impl ser::SerializeStruct for MapBuilder {
    type Ok = Value;
    type Error = ValueError;
    fn serialize_field<T: Serialize + ?Sized>(
        &mut self,
        key: &'static str,
        value: &T,
    ) -> Result<(), ValueError> {
        self.field(key, value)
    }
    fn end(self) -> Result<Value, ValueError> {
        Ok(self.finish())
    }
}
impl ser::SerializeStructVariant for MapBuilder {
    type Ok = Value;
    type Error = ValueError;
    fn serialize_field<T: Serialize + ?Sized>(
        &mut self,
        key: &'static str,
        value: &T,
    ) -> Result<(), ValueError> {
        self.field(key, value)
    }
    fn end(self) -> Result<Value, ValueError> {
        Ok(self.finish())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;
    use std::collections::BTreeMap;

    #[derive(Debug, PartialEq, serde::Serialize, Deserialize)]
    enum Shape {
        Dot,
        Circle(f64),
        Rect { w: u32, h: u32 },
        Pair(i8, i8),
    }

    #[derive(Debug, PartialEq, serde::Serialize, Deserialize)]
    struct Everything {
        a: Option<u8>,
        b: Option<String>,
        c: Vec<Shape>,
        d: BTreeMap<String, i64>,
        e: (bool, char),
        big: u64,
        neg: i64,
        f: f32,
        unit: (),
        nt: Wrapper,
    }

    #[derive(Debug, PartialEq, serde::Serialize, Deserialize)]
    struct Wrapper(String);

    #[test]
    fn round_trip_through_value() {
        let original = Everything {
            a: Some(7),
            b: None,
            c: vec![
                Shape::Dot,
                Shape::Circle(1.5),
                Shape::Rect { w: 2, h: 3 },
                Shape::Pair(-1, 1),
            ],
            d: [("x".to_string(), -5)].into_iter().collect(),
            e: (true, 'é'),
            big: u64::MAX,
            neg: i64::MIN,
            f: 0.25,
            unit: (),
            nt: Wrapper("w".into()),
        };
        let value = Value::from_serialize(&original).unwrap();
        assert_eq!(value.get("big"), Some(&Value::Int(u64::MAX.into())));
        assert_eq!(value.get("b"), Some(&Value::Null));
        let back: Everything = value.deserialize_into().unwrap();
        assert_eq!(back, original);
    }

    #[test]
    fn bytes_and_strings_deserialize_flexibly() {
        let v = Value::Bytes(b"hi".to_vec());
        assert_eq!(v.clone().deserialize_into::<Vec<u8>>().unwrap(), b"hi");
        assert_eq!(v.clone().deserialize_into::<String>().unwrap(), "hi");
        let s = Value::String("yo".into());
        assert_eq!(s.deserialize_into::<Vec<u8>>().unwrap(), b"yo");
        assert!(Value::Bytes(vec![0xff])
            .deserialize_into::<String>()
            .is_err());
    }

    #[test]
    fn value_deserializes_from_value() {
        let v = Value::Map(vec![(
            Value::Int(1),
            Value::List(vec![Value::Null, 2.5.into()]),
        )]);
        let back: Value = v.clone().deserialize_into().unwrap();
        assert_eq!(back, v);
    }

    #[test]
    fn errors_not_panics() {
        assert!(Value::String("x".into()).deserialize_into::<u8>().is_err());
        assert!(Value::Int(300).deserialize_into::<u8>().is_err());
        assert!(Value::Int(i128::MAX).deserialize_into::<u64>().is_err());
        assert!(Value::List(vec![1.into()])
            .deserialize_into::<(u8, u8)>()
            .is_err());
        assert!(Value::Map(vec![]).deserialize_into::<Shape>().is_err());
        assert!(Value::from_serialize(&u128::MAX).is_err());
    }
}
