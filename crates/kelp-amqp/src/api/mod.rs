//! The handles users hold: [`Connection`], [`Channel`], [`Consumer`]. Each is a thin front for
//! commands to the connection's task.

mod channel;
mod connection;
mod consumer;
pub mod options;
pub(crate) mod shared;

pub use channel::{Channel, PublishConfirm};
pub use connection::{CloseSignal, Connection, ConnectionBuilder};
pub use consumer::{Consumer, Returns};
pub use shared::Tuning;
