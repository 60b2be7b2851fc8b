//! # kelp-amqp
//!
//! An AMQP 0-9-1 client with RabbitMQ's extensions, in layers that can be used on their own:
//!
//! - [`codec`]: frames, methods, properties and field tables (bytes in, typed values out);
//! - [`engine`]: a sans-IO state machine for one connection (no sockets, no tokio);
//! - `driver`: the tokio task that owns the socket (TCP or TLS) and runs the engine;
//! - the API handles: [`Connection`], [`Channel`], [`Consumer`].
//!
//! ```no_run
//! use kelp_amqp::{BasicProperties, Connection, FieldTable};
//! use kelp_amqp::options::{ConsumeOptions, PublishOptions, QueueDeclareOptions};
//!
//! # async fn demo() -> Result<(), kelp_amqp::Error> {
//! let conn = Connection::open("amqp://guest:guest@localhost:5672/%2f").await?;
//! let ch = conn.channel().await?;
//! ch.queue_declare("hello", QueueDeclareOptions::default(), FieldTable::new()).await?;
//! ch.basic_publish("", "hello", PublishOptions::default(), BasicProperties::default(), "hi").await?;
//! let mut consumer = ch.basic_consume("hello", ConsumeOptions::default()).await?;
//! if let Some(Ok(d)) = consumer.recv().await {
//!     assert_eq!(&d.body[..], b"hi");
//!     ch.basic_ack(d.delivery_tag, false).await?;
//! }
//! conn.close().await?;
//! # Ok(()) }
//! ```

mod api;
pub mod codec;
mod driver;
pub mod engine;
pub mod error;
pub mod url;

pub use api::options;
pub use api::{
    Channel, CloseSignal, Connection, ConnectionBuilder, Consumer, PublishConfirm, Returns, Tuning,
};
pub use codec::{BasicProperties, FieldTable, FieldValue, ShortString};
pub use engine::{Confirmation, Delivery, GetMessage, ReturnedMessage};
pub use error::{CloseReason, Error, ProtocolError};
pub use url::AmqpUrl;
