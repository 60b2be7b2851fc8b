//! Every class and method of AMQP 0-9-1 with RabbitMQ's extensions, as typed structs.
//!
//! Names follow the specification: `queue.declare` is [`QueueDeclare`], and its arguments are
//! fields in specification order. Reserved (deprecated) arguments keep their place as
//! `reserved_*` fields so the encoding stays exact; `..Default::default()` fills them.

use bytes::{Bytes, BytesMut};

use super::error::{DecodeError, EncodeError};
use super::field::{FieldTable, ShortString};
use super::wire::{Reader, Wire, Writer};

macro_rules! amqp_methods {
    ($(
        $class_id:literal $class:literal {
            $(
                $(#[$doc:meta])*
                $method_id:literal $mname:literal $name:ident { $( $field:ident : $ty:ty ),* $(,)? }
            )*
        }
    )*) => {
        $( $(
            $(#[$doc])*
            #[doc = concat!("\n\nWire: `", $class, ".", $mname, "` (", stringify!($class_id), ", ", stringify!($method_id), ").")]
            #[derive(Debug, Clone, PartialEq, Default)]
            pub struct $name { $( #[allow(missing_docs)] pub $field: $ty, )* }

            impl $name {
                /// Class id on the wire.
                pub const CLASS_ID: u16 = $class_id;
                /// Method id on the wire.
                pub const METHOD_ID: u16 = $method_id;
                /// Decode the arguments (after class and method id).
                #[allow(unused_variables)]
                pub fn read(r: &mut Reader) -> Result<Self, DecodeError> {
                    Ok(Self { $( $field: <$ty as Wire>::read(r)?, )* })
                }
                #[allow(unused_variables)]
                fn write(&self, w: &mut Writer<'_>) -> Result<(), EncodeError> {
                    $( Wire::write(&self.$field, w)?; )*
                    Ok(())
                }
            }

            impl From<$name> for Method {
                fn from(m: $name) -> Method {
                    Method::$name(m)
                }
            }
        )* )*

        /// Any AMQP 0-9-1 method.
        #[derive(Debug, Clone, PartialEq)]
        #[allow(missing_docs)]
        pub enum Method { $( $( $name($name), )* )* }

        impl Method {
            /// `(class_id, method_id)`.
            pub fn ids(&self) -> (u16, u16) {
                match self { $( $( Method::$name(_) => ($class_id, $method_id), )* )* }
            }
            /// The specification name, e.g. `"queue.declare"`.
            pub fn name(&self) -> &'static str {
                match self { $( $( Method::$name(_) => concat!($class, ".", $mname), )* )* }
            }
            /// Decode a method frame payload (class id, method id, arguments).
            pub fn decode(payload: Bytes) -> Result<Method, DecodeError> {
                let mut r = Reader::new(payload);
                let class_id = r.u16()?;
                let method_id = r.u16()?;
                let (m, name) = match (class_id, method_id) {
                    $( $( ($class_id, $method_id) =>
                        (Method::$name($name::read(&mut r)?), concat!($class, ".", $mname)), )* )*
                    _ => return Err(DecodeError::UnknownMethod { class_id, method_id }),
                };
                if r.remaining() > 0 {
                    return Err(DecodeError::TrailingBytes { method: name, trailing: r.remaining() });
                }
                Ok(m)
            }
            /// Encode class id, method id and arguments.
            pub fn encode(&self, w: &mut Writer<'_>) -> Result<(), EncodeError> {
                let (c, m) = self.ids();
                w.u16(c);
                w.u16(m);
                match self { $( $( Method::$name(x) => x.write(w), )* )* }
            }
        }

        /// The specification name of a `(class_id, method_id)` pair, e.g. `Some("queue.declare")`.
        pub fn method_name(class_id: u16, method_id: u16) -> Option<&'static str> {
            match (class_id, method_id) {
                $( $( ($class_id, $method_id) => Some(concat!($class, ".", $mname)), )* )*
                _ => None,
            }
        }

        /// Every `(class_id, method_id)` pair known to the codec.
        pub const ALL_METHOD_IDS: &[(u16, u16)] = &[ $( $( ($class_id, $method_id), )* )* ];
    };
}

amqp_methods! {
    10 "connection" {
        10 "start" ConnectionStart { version_major: u8, version_minor: u8, server_properties: FieldTable, mechanisms: Bytes, locales: Bytes }
        11 "start-ok" ConnectionStartOk { client_properties: FieldTable, mechanism: ShortString, response: Bytes, locale: ShortString }
        20 "secure" ConnectionSecure { challenge: Bytes }
        21 "secure-ok" ConnectionSecureOk { response: Bytes }
        30 "tune" ConnectionTune { channel_max: u16, frame_max: u32, heartbeat: u16 }
        31 "tune-ok" ConnectionTuneOk { channel_max: u16, frame_max: u32, heartbeat: u16 }
        40 "open" ConnectionOpen { virtual_host: ShortString, reserved_1: ShortString, reserved_2: bool }
        41 "open-ok" ConnectionOpenOk { reserved_1: ShortString }
        50 "close" ConnectionClose { reply_code: u16, reply_text: ShortString, class_id: u16, method_id: u16 }
        51 "close-ok" ConnectionCloseOk {}
        60 "blocked" ConnectionBlocked { reason: ShortString }
        61 "unblocked" ConnectionUnblocked {}
        70 "update-secret" ConnectionUpdateSecret { new_secret: Bytes, reason: ShortString }
        71 "update-secret-ok" ConnectionUpdateSecretOk {}
    }
    20 "channel" {
        10 "open" ChannelOpen { reserved_1: ShortString }
        11 "open-ok" ChannelOpenOk { reserved_1: Bytes }
        20 "flow" ChannelFlow { active: bool }
        21 "flow-ok" ChannelFlowOk { active: bool }
        40 "close" ChannelClose { reply_code: u16, reply_text: ShortString, class_id: u16, method_id: u16 }
        41 "close-ok" ChannelCloseOk {}
    }
    30 "access" {
        10 "request" AccessRequest { realm: ShortString, exclusive: bool, passive: bool, active: bool, write: bool, read: bool }
        11 "request-ok" AccessRequestOk { reserved_1: u16 }
    }
    40 "exchange" {
        10 "declare" ExchangeDeclare { reserved_1: u16, exchange: ShortString, kind: ShortString, passive: bool, durable: bool, auto_delete: bool, internal: bool, nowait: bool, arguments: FieldTable }
        11 "declare-ok" ExchangeDeclareOk {}
        20 "delete" ExchangeDelete { reserved_1: u16, exchange: ShortString, if_unused: bool, nowait: bool }
        21 "delete-ok" ExchangeDeleteOk {}
        30 "bind" ExchangeBind { reserved_1: u16, destination: ShortString, source: ShortString, routing_key: ShortString, nowait: bool, arguments: FieldTable }
        31 "bind-ok" ExchangeBindOk {}
        40 "unbind" ExchangeUnbind { reserved_1: u16, destination: ShortString, source: ShortString, routing_key: ShortString, nowait: bool, arguments: FieldTable }
        51 "unbind-ok" ExchangeUnbindOk {}
    }
    50 "queue" {
        10 "declare" QueueDeclare { reserved_1: u16, queue: ShortString, passive: bool, durable: bool, exclusive: bool, auto_delete: bool, nowait: bool, arguments: FieldTable }
        11 "declare-ok" QueueDeclareOk { queue: ShortString, message_count: u32, consumer_count: u32 }
        20 "bind" QueueBind { reserved_1: u16, queue: ShortString, exchange: ShortString, routing_key: ShortString, nowait: bool, arguments: FieldTable }
        21 "bind-ok" QueueBindOk {}
        30 "purge" QueuePurge { reserved_1: u16, queue: ShortString, nowait: bool }
        31 "purge-ok" QueuePurgeOk { message_count: u32 }
        40 "delete" QueueDelete { reserved_1: u16, queue: ShortString, if_unused: bool, if_empty: bool, nowait: bool }
        41 "delete-ok" QueueDeleteOk { message_count: u32 }
        50 "unbind" QueueUnbind { reserved_1: u16, queue: ShortString, exchange: ShortString, routing_key: ShortString, arguments: FieldTable }
        51 "unbind-ok" QueueUnbindOk {}
    }
    60 "basic" {
        10 "qos" BasicQos { prefetch_size: u32, prefetch_count: u16, global: bool }
        11 "qos-ok" BasicQosOk {}
        20 "consume" BasicConsume { reserved_1: u16, queue: ShortString, consumer_tag: ShortString, no_local: bool, no_ack: bool, exclusive: bool, nowait: bool, arguments: FieldTable }
        21 "consume-ok" BasicConsumeOk { consumer_tag: ShortString }
        30 "cancel" BasicCancel { consumer_tag: ShortString, nowait: bool }
        31 "cancel-ok" BasicCancelOk { consumer_tag: ShortString }
        40 "publish" BasicPublish { reserved_1: u16, exchange: ShortString, routing_key: ShortString, mandatory: bool, immediate: bool }
        50 "return" BasicReturn { reply_code: u16, reply_text: ShortString, exchange: ShortString, routing_key: ShortString }
        60 "deliver" BasicDeliver { consumer_tag: ShortString, delivery_tag: u64, redelivered: bool, exchange: ShortString, routing_key: ShortString }
        70 "get" BasicGet { reserved_1: u16, queue: ShortString, no_ack: bool }
        71 "get-ok" BasicGetOk { delivery_tag: u64, redelivered: bool, exchange: ShortString, routing_key: ShortString, message_count: u32 }
        72 "get-empty" BasicGetEmpty { reserved_1: ShortString }
        80 "ack" BasicAck { delivery_tag: u64, multiple: bool }
        90 "reject" BasicReject { delivery_tag: u64, requeue: bool }
        100 "recover-async" BasicRecoverAsync { requeue: bool }
        110 "recover" BasicRecover { requeue: bool }
        111 "recover-ok" BasicRecoverOk {}
        120 "nack" BasicNack { delivery_tag: u64, multiple: bool, requeue: bool }
    }
    85 "confirm" {
        10 "select" ConfirmSelect { nowait: bool }
        11 "select-ok" ConfirmSelectOk {}
    }
    90 "tx" {
        10 "select" TxSelect {}
        11 "select-ok" TxSelectOk {}
        20 "commit" TxCommit {}
        21 "commit-ok" TxCommitOk {}
        30 "rollback" TxRollback {}
        31 "rollback-ok" TxRollbackOk {}
    }
}

impl Method {
    /// True for the methods followed by a content header and body frames.
    pub fn has_content(&self) -> bool {
        matches!(
            self,
            Method::BasicPublish(_)
                | Method::BasicReturn(_)
                | Method::BasicDeliver(_)
                | Method::BasicGetOk(_)
        )
    }

    /// Encode into a fresh buffer (convenience for tests and tools).
    pub fn to_bytes(&self) -> Result<Bytes, EncodeError> {
        let mut b = BytesMut::new();
        self.encode(&mut Writer::new(&mut b))?;
        Ok(b.freeze())
    }
}
