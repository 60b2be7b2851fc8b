//! Frames: the unit AMQP sends on the wire, and their encoding and decoding.
//!
//! A frame is `type:u8 channel:u16 size:u32 payload[size] 0xCE`. Decoding works on a growing
//! `BytesMut` (what a socket read appends to) and returns `Ok(None)` until a whole frame is there.
//! Payloads are split off without copying, so a body frame's bytes become the message body.

use bytes::{Buf, BufMut, Bytes, BytesMut};

use super::error::{DecodeError, EncodeError};
use super::method::Method;
use super::properties::{BasicProperties, ContentHeader};
use super::wire::Writer;

/// Frame type octet of a method frame.
pub const FRAME_METHOD: u8 = 1;
/// Frame type octet of a content header frame.
pub const FRAME_HEADER: u8 = 2;
/// Frame type octet of a body frame.
pub const FRAME_BODY: u8 = 3;
/// Frame type octet of a heartbeat frame.
pub const FRAME_HEARTBEAT: u8 = 8;
/// The frame-end octet.
pub const FRAME_END: u8 = 0xCE;
/// Bytes of framing around a payload (7 header + 1 end).
pub const FRAME_OVERHEAD: usize = 8;
/// The smallest frame_max a peer may impose (AMQP 0-9-1 §4.2.1).
pub const FRAME_MIN_SIZE: u32 = 4096;
/// The protocol header a client sends first.
pub const PROTOCOL_HEADER: &[u8; 8] = b"AMQP\x00\x00\x09\x01";

/// One decoded frame.
// Frames are short-lived values moved once from decoder to engine; boxing the header would cost
// an allocation per message.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, PartialEq)]
pub enum Frame {
    /// A method frame.
    Method {
        /// Channel number.
        channel: u16,
        /// The method.
        method: Method,
    },
    /// A content header frame.
    Header {
        /// Channel number.
        channel: u16,
        /// The header.
        header: ContentHeader,
    },
    /// A body frame; the payload shares memory with the read buffer.
    Body {
        /// Channel number.
        channel: u16,
        /// The payload.
        payload: Bytes,
    },
    /// A heartbeat (always channel 0).
    Heartbeat,
}

/// Decode one frame from the front of `buf`, splitting it off.
///
/// Returns `Ok(None)` when `buf` does not yet hold a whole frame. `frame_max` bounds the frame
/// size (0 means the protocol's maximum is not negotiated yet; the caller should pass its own
/// limit instead). Never panics, never allocates beyond the frame it returns.
///
/// ```
/// use bytes::BytesMut;
/// use kelp_amqp::codec::{decode_frame, Frame};
/// let mut buf = BytesMut::from(&[8u8, 0, 0, 0, 0, 0, 0, 0xCE][..]);
/// assert_eq!(decode_frame(&mut buf, 131072).unwrap(), Some(Frame::Heartbeat));
/// assert!(buf.is_empty());
/// ```
pub fn decode_frame(buf: &mut BytesMut, frame_max: u32) -> Result<Option<Frame>, DecodeError> {
    let Some(raw) = split_frame(buf, frame_max)? else {
        return Ok(None);
    };
    let RawFrame {
        kind,
        channel,
        payload,
    } = raw;
    Ok(Some(match kind {
        FRAME_METHOD => Frame::Method {
            channel,
            method: Method::decode(payload)?,
        },
        FRAME_HEADER => Frame::Header {
            channel,
            header: ContentHeader::decode(payload)?,
        },
        FRAME_BODY => Frame::Body { channel, payload },
        _ => Frame::Heartbeat,
    }))
}

/// A frame split off the input but not yet parsed: its type, channel and payload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RawFrame {
    /// [`FRAME_METHOD`], [`FRAME_HEADER`], [`FRAME_BODY`] or [`FRAME_HEARTBEAT`].
    pub kind: u8,
    /// Channel number.
    pub channel: u16,
    /// The payload, sharing memory with the input.
    pub payload: Bytes,
}

/// Split one whole frame off the front of `buf` and check its framing (size limit, type,
/// frame-end octet, heartbeat channel) without parsing the payload. `Ok(None)` until a whole
/// frame is there. This is what [`decode_frame`] and the engine's hot path build on.
pub fn split_frame(buf: &mut BytesMut, frame_max: u32) -> Result<Option<RawFrame>, DecodeError> {
    if buf.len() < 7 {
        if buf.len() >= 4 && &buf[..4] == b"AMQP" {
            return Err(protocol_header(buf));
        }
        return Ok(None);
    }
    if &buf[..4] == b"AMQP" {
        return Err(protocol_header(buf));
    }
    let kind = buf[0];
    let channel = u16::from_be_bytes([buf[1], buf[2]]);
    let size = u32::from_be_bytes([buf[3], buf[4], buf[5], buf[6]]) as u64;
    let total = size + FRAME_OVERHEAD as u64;
    if frame_max != 0 && total > u64::from(frame_max) {
        return Err(DecodeError::FrameTooLarge {
            size: total,
            frame_max,
        });
    }
    if !matches!(
        kind,
        FRAME_METHOD | FRAME_HEADER | FRAME_BODY | FRAME_HEARTBEAT
    ) {
        return Err(DecodeError::UnknownFrameType(kind));
    }
    if kind == FRAME_HEARTBEAT && channel != 0 {
        return Err(DecodeError::HeartbeatOnChannel(channel));
    }
    let total = total as usize;
    if buf.len() < total {
        // Reserve what the frame announced, but never more than a read's worth at a time: the
        // bytes must actually arrive before they cost memory.
        buf.reserve((total - buf.len()).min(256 << 10));
        return Ok(None);
    }
    let end = buf[total - 1];
    if end != FRAME_END {
        return Err(DecodeError::BadFrameEnd(end));
    }
    let mut payload = buf.split_to(total).freeze();
    payload.advance(7);
    payload.truncate(total - FRAME_OVERHEAD);
    Ok(Some(RawFrame {
        kind,
        channel,
        payload,
    }))
}

fn protocol_header(buf: &[u8]) -> DecodeError {
    let v: Vec<String> = buf.iter().skip(4).take(4).map(|b| b.to_string()).collect();
    DecodeError::ProtocolHeader(format!("AMQP {}", v.join(".")))
}

fn begin(buf: &mut BytesMut, kind: u8, channel: u16) -> usize {
    let start = buf.len();
    buf.put_u8(kind);
    buf.put_u16(channel);
    buf.put_u32(0);
    start
}

fn finish(buf: &mut BytesMut, start: usize, frame_max: u32) -> Result<(), EncodeError> {
    let size = buf.len() - start - 7;
    let total = size + FRAME_OVERHEAD;
    if frame_max != 0 && total > frame_max as usize {
        buf.truncate(start);
        return Err(EncodeError::FrameTooLarge {
            size: total,
            frame_max,
        });
    }
    let Ok(size32) = u32::try_from(size) else {
        buf.truncate(start);
        return Err(EncodeError::TooLong(size));
    };
    if let Some(slot) = buf.get_mut(start + 3..start + 7) {
        slot.copy_from_slice(&size32.to_be_bytes());
    }
    buf.put_u8(FRAME_END);
    Ok(())
}

/// Append a method frame to `buf`. On error `buf` is left as it was.
pub fn encode_method(
    buf: &mut BytesMut,
    channel: u16,
    method: &Method,
    frame_max: u32,
) -> Result<(), EncodeError> {
    let start = begin(buf, FRAME_METHOD, channel);
    if let Err(e) = method.encode(&mut Writer::new(buf)) {
        buf.truncate(start);
        return Err(e);
    }
    finish(buf, start, frame_max)
}

/// Append a content header frame to `buf`. On error `buf` is left as it was.
pub fn encode_header(
    buf: &mut BytesMut,
    channel: u16,
    body_size: u64,
    properties: &BasicProperties,
    frame_max: u32,
) -> Result<(), EncodeError> {
    let start = begin(buf, FRAME_HEADER, channel);
    let mut w = Writer::new(buf);
    w.u16(60);
    w.u16(0);
    w.u64(body_size);
    if let Err(e) = properties.write(&mut w) {
        buf.truncate(start);
        return Err(e);
    }
    finish(buf, start, frame_max)
}

/// Append the 7-byte header of a body frame holding `len` bytes; the caller appends the payload
/// and [`FRAME_END`].
pub fn encode_body_frame_start(buf: &mut BytesMut, channel: u16, len: u32) {
    buf.put_u8(FRAME_BODY);
    buf.put_u16(channel);
    buf.put_u32(len);
}

/// Append a heartbeat frame.
pub fn encode_heartbeat(buf: &mut BytesMut) {
    buf.extend_from_slice(&[FRAME_HEARTBEAT, 0, 0, 0, 0, 0, 0, FRAME_END]);
}

/// The largest body payload one body frame can carry under `frame_max` (0 = unlimited).
pub fn max_body_chunk(frame_max: u32) -> usize {
    if frame_max == 0 {
        // No negotiated limit: still split, so a frame's size fits its u32 field comfortably.
        1 << 20
    } else {
        (frame_max as usize).saturating_sub(FRAME_OVERHEAD).max(1)
    }
}

/// Encode a whole frame into a new buffer (for tests and tools).
pub fn frame_to_bytes(frame: &Frame, frame_max: u32) -> Result<Bytes, EncodeError> {
    let mut b = BytesMut::new();
    match frame {
        Frame::Method { channel, method } => encode_method(&mut b, *channel, method, frame_max)?,
        Frame::Header { channel, header } => encode_header(
            &mut b,
            *channel,
            header.body_size,
            &header.properties,
            frame_max,
        )?,
        Frame::Body { channel, payload } => {
            let len =
                u32::try_from(payload.len()).map_err(|_| EncodeError::TooLong(payload.len()))?;
            encode_body_frame_start(&mut b, *channel, len);
            b.extend_from_slice(payload);
            b.put_u8(FRAME_END);
        }
        Frame::Heartbeat => encode_heartbeat(&mut b),
    }
    Ok(b.freeze())
}
