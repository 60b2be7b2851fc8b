//! Primitive readers and writers for AMQP's wire types, including packed bit fields.

use bytes::{Buf, BufMut, Bytes, BytesMut};

use super::error::{DecodeError, EncodeError};
use super::field::{FieldTable, ShortString};

/// Reads AMQP primitives from a `Bytes` slice without copying string or byte payloads.
#[derive(Debug)]
pub struct Reader {
    buf: Bytes,
    bits: u8,
    bit_pos: u8,
}

impl Reader {
    /// A reader over `buf`.
    pub fn new(buf: Bytes) -> Self {
        Reader {
            buf,
            bits: 0,
            bit_pos: 8,
        }
    }

    /// Bytes not yet read.
    pub fn remaining(&self) -> usize {
        self.buf.len()
    }

    #[inline]
    fn need(&self, n: usize, what: &'static str) -> Result<(), DecodeError> {
        if self.buf.len() < n {
            Err(DecodeError::Truncated {
                what,
                needed: n,
                available: self.buf.len(),
            })
        } else {
            Ok(())
        }
    }

    /// One octet.
    #[inline]
    pub fn u8(&mut self) -> Result<u8, DecodeError> {
        self.need(1, "octet")?;
        self.bit_pos = 8;
        Ok(self.buf.get_u8())
    }
    /// Big-endian u16.
    #[inline]
    pub fn u16(&mut self) -> Result<u16, DecodeError> {
        self.need(2, "short")?;
        self.bit_pos = 8;
        Ok(self.buf.get_u16())
    }
    /// Big-endian u32.
    #[inline]
    pub fn u32(&mut self) -> Result<u32, DecodeError> {
        self.need(4, "long")?;
        self.bit_pos = 8;
        Ok(self.buf.get_u32())
    }
    /// Big-endian u64.
    #[inline]
    pub fn u64(&mut self) -> Result<u64, DecodeError> {
        self.need(8, "long long")?;
        self.bit_pos = 8;
        Ok(self.buf.get_u64())
    }
    /// One packed bit; consecutive bits share octets, least significant bit first.
    #[inline]
    pub fn bit(&mut self) -> Result<bool, DecodeError> {
        if self.bit_pos >= 8 {
            self.need(1, "bit octet")?;
            self.bits = self.buf.get_u8();
            self.bit_pos = 0;
        }
        let v = (self.bits >> self.bit_pos) & 1 == 1;
        self.bit_pos += 1;
        Ok(v)
    }
    /// `n` raw bytes, zero-copy.
    #[inline]
    pub fn bytes(&mut self, n: usize, what: &'static str) -> Result<Bytes, DecodeError> {
        self.need(n, what)?;
        self.bit_pos = 8;
        Ok(self.buf.split_to(n))
    }
    /// A short string (u8 length, UTF-8), zero-copy.
    #[inline]
    pub fn shortstr(&mut self) -> Result<ShortString, DecodeError> {
        let len = self.u8()? as usize;
        let b = self.bytes(len, "short string")?;
        ShortString::from_utf8(b)
    }
    /// A long string (u32 length, arbitrary bytes), zero-copy.
    #[inline]
    pub fn longstr(&mut self) -> Result<Bytes, DecodeError> {
        let len = self.u32()? as usize;
        self.bytes(len, "long string")
    }
    /// A field table.
    pub fn table(&mut self) -> Result<FieldTable, DecodeError> {
        FieldTable::read(self, 0)
    }
    /// The rest of the input.
    pub fn rest(&mut self) -> Bytes {
        std::mem::take(&mut self.buf)
    }
}

/// Writes AMQP primitives into a `BytesMut`, packing consecutive bits.
#[derive(Debug)]
pub struct Writer<'a> {
    buf: &'a mut BytesMut,
    bit_at: Option<(usize, u8)>,
}

impl<'a> Writer<'a> {
    /// A writer appending to `buf`.
    pub fn new(buf: &'a mut BytesMut) -> Self {
        Writer { buf, bit_at: None }
    }
    /// Bytes in the underlying buffer.
    pub fn len(&self) -> usize {
        self.buf.len()
    }
    /// True when the underlying buffer is empty.
    pub fn is_empty(&self) -> bool {
        self.buf.is_empty()
    }
    /// One octet.
    #[inline]
    pub fn u8(&mut self, v: u8) {
        self.bit_at = None;
        self.buf.put_u8(v);
    }
    /// Big-endian u16.
    #[inline]
    pub fn u16(&mut self, v: u16) {
        self.bit_at = None;
        self.buf.put_u16(v);
    }
    /// Big-endian u32.
    #[inline]
    pub fn u32(&mut self, v: u32) {
        self.bit_at = None;
        self.buf.put_u32(v);
    }
    /// Big-endian u64.
    #[inline]
    pub fn u64(&mut self, v: u64) {
        self.bit_at = None;
        self.buf.put_u64(v);
    }
    /// One packed bit.
    #[inline]
    pub fn bit(&mut self, v: bool) {
        match self.bit_at {
            Some((idx, pos)) if pos < 8 => {
                if v {
                    if let Some(b) = self.buf.get_mut(idx) {
                        *b |= 1 << pos;
                    }
                }
                self.bit_at = Some((idx, pos + 1));
            }
            _ => {
                let idx = self.buf.len();
                self.buf.put_u8(u8::from(v));
                self.bit_at = Some((idx, 1));
            }
        }
    }
    /// Raw bytes.
    #[inline]
    pub fn raw(&mut self, b: &[u8]) {
        self.bit_at = None;
        self.buf.extend_from_slice(b);
    }
    /// A short string; fails if longer than 255 bytes.
    #[inline]
    pub fn shortstr(&mut self, s: &str) -> Result<(), EncodeError> {
        let len = u8::try_from(s.len()).map_err(|_| EncodeError::ShortStringTooLong {
            len: s.len(),
            preview: s.chars().take(32).collect(),
        })?;
        self.u8(len);
        self.raw(s.as_bytes());
        Ok(())
    }
    /// A long string.
    #[inline]
    pub fn longstr(&mut self, b: &[u8]) -> Result<(), EncodeError> {
        let len = u32::try_from(b.len()).map_err(|_| EncodeError::TooLong(b.len()))?;
        self.u32(len);
        self.raw(b);
        Ok(())
    }
    /// Reserve a u32 length slot, returning its position for [`Writer::patch_len`].
    pub fn placeholder_u32(&mut self) -> usize {
        let at = self.buf.len();
        self.u32(0);
        at
    }
    /// Fill a slot made by [`Writer::placeholder_u32`] with the number of bytes written since.
    pub fn patch_len(&mut self, at: usize) -> Result<(), EncodeError> {
        let len = self.buf.len() - at - 4;
        let v = u32::try_from(len).map_err(|_| EncodeError::TooLong(len))?;
        if let Some(slot) = self.buf.get_mut(at..at + 4) {
            slot.copy_from_slice(&v.to_be_bytes());
        }
        Ok(())
    }
}

/// A type with an AMQP wire encoding used as a method argument.
pub trait Wire: Sized {
    /// Decode one value.
    fn read(r: &mut Reader) -> Result<Self, DecodeError>;
    /// Encode one value.
    fn write(&self, w: &mut Writer<'_>) -> Result<(), EncodeError>;
}

macro_rules! wire_prim {
    ($t:ty, $f:ident) => {
        impl Wire for $t {
            #[inline]
            fn read(r: &mut Reader) -> Result<Self, DecodeError> {
                r.$f()
            }
            #[inline]
            fn write(&self, w: &mut Writer<'_>) -> Result<(), EncodeError> {
                w.$f(*self);
                Ok(())
            }
        }
    };
}
wire_prim!(u8, u8);
wire_prim!(u16, u16);
wire_prim!(u32, u32);
wire_prim!(u64, u64);
wire_prim!(bool, bit);

impl Wire for ShortString {
    #[inline]
    fn read(r: &mut Reader) -> Result<Self, DecodeError> {
        r.shortstr()
    }
    #[inline]
    fn write(&self, w: &mut Writer<'_>) -> Result<(), EncodeError> {
        w.shortstr(self.as_str())
    }
}

impl Wire for Bytes {
    #[inline]
    fn read(r: &mut Reader) -> Result<Self, DecodeError> {
        r.longstr()
    }
    #[inline]
    fn write(&self, w: &mut Writer<'_>) -> Result<(), EncodeError> {
        w.longstr(self)
    }
}

impl Wire for FieldTable {
    fn read(r: &mut Reader) -> Result<Self, DecodeError> {
        r.table()
    }
    fn write(&self, w: &mut Writer<'_>) -> Result<(), EncodeError> {
        self.write_to(w, 0)
    }
}
