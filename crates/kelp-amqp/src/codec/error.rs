//! Errors of the codec layer: what can go wrong turning bytes into frames and back.

use thiserror::Error;

/// A frame or value could not be decoded. Every malformed input maps to one of these;
/// the decoder never panics and never allocates more than the frame itself holds.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum DecodeError {
    /// The input ended before a value it announced was complete.
    #[error("truncated {what}: needed {needed} more byte(s), {available} available")]
    Truncated {
        /// What was being read.
        what: &'static str,
        /// Bytes needed.
        needed: usize,
        /// Bytes available.
        available: usize,
    },
    /// A frame announced a payload larger than the negotiated `frame_max`.
    #[error("frame of {size} bytes exceeds frame_max {frame_max}")]
    FrameTooLarge {
        /// Announced frame size including the 8 bytes of framing.
        size: u64,
        /// The limit in force.
        frame_max: u32,
    },
    /// The frame-end octet was not 0xCE.
    #[error("bad frame end octet 0x{0:02x} (expected 0xce)")]
    BadFrameEnd(u8),
    /// Unknown frame type octet.
    #[error("unknown frame type {0}")]
    UnknownFrameType(u8),
    /// A class/method pair this codec does not know.
    #[error("unknown method {class_id}.{method_id}")]
    UnknownMethod {
        /// Class id.
        class_id: u16,
        /// Method id.
        method_id: u16,
    },
    /// Bytes remained after the last argument of a method.
    #[error("{trailing} unexpected trailing byte(s) after {method}")]
    TrailingBytes {
        /// The method's name.
        method: &'static str,
        /// How many bytes were left over.
        trailing: usize,
    },
    /// Unknown field-table value type tag.
    #[error("unknown field value type {0:?}")]
    UnknownFieldType(char),
    /// Field tables or arrays nested deeper than allowed.
    #[error("field table nested deeper than {0} levels")]
    TooDeep(usize),
    /// A short string was not valid UTF-8.
    #[error("short string is not valid UTF-8")]
    InvalidUtf8,
    /// A heartbeat frame arrived on a channel other than 0.
    #[error("heartbeat frame on channel {0}")]
    HeartbeatOnChannel(u16),
    /// Property flags used the continuation bit, which basic properties never need.
    #[error("content header property flags 0x{0:04x} are not valid for basic properties")]
    BadPropertyFlags(u16),
    /// The content header names a class other than basic (60).
    #[error("content header for class {0}, only basic (60) carries content")]
    BadContentClass(u16),
    /// Malformed protocol header sent by the peer instead of a frame.
    #[error("peer sent an AMQP protocol header (it speaks {0}), not a frame")]
    ProtocolHeader(String),
}

/// A value could not be encoded (it does not fit the wire format).
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum EncodeError {
    /// A short string longer than 255 bytes.
    #[error("short string of {len} bytes exceeds 255 bytes: {preview:?}…")]
    ShortStringTooLong {
        /// Its length in bytes.
        len: usize,
        /// The first few characters, for context.
        preview: String,
    },
    /// A long string or table longer than 4 GiB.
    #[error("value of {0} bytes exceeds the 4 GiB limit of a long string")]
    TooLong(usize),
    /// Field tables or arrays nested deeper than the decoder accepts.
    #[error("field table nested deeper than {0} levels")]
    TooDeep(usize),
    /// A frame larger than the negotiated `frame_max` (only method/header frames; bodies are split).
    #[error("encoded frame of {size} bytes exceeds frame_max {frame_max}")]
    FrameTooLarge {
        /// Frame size.
        size: usize,
        /// Limit.
        frame_max: u32,
    },
}
