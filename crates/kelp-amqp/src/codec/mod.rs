//! The AMQP 0-9-1 codec: frames, methods, properties and field tables. Bytes in, typed values
//! out; no I/O and no state beyond a frame.

mod error;
mod field;
mod frame;
mod method;
mod properties;
mod wire;

pub use error::{DecodeError, EncodeError};
pub use field::{Decimal, FieldTable, FieldValue, ShortString, MAX_NESTING};
pub use frame::{
    decode_frame, encode_body_frame_start, encode_header, encode_heartbeat, encode_method,
    frame_to_bytes, max_body_chunk, split_frame, Frame, RawFrame, FRAME_BODY, FRAME_END,
    FRAME_HEADER, FRAME_HEARTBEAT, FRAME_METHOD, FRAME_MIN_SIZE, FRAME_OVERHEAD, PROTOCOL_HEADER,
};
pub use method::*;
pub use properties::{decode_header_into, BasicProperties, ContentHeader};
pub use wire::{Reader, Wire, Writer};
