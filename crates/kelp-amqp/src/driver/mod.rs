//! The tokio side: one task per connection owns the socket, feeds the [`Engine`] and writes what
//! it produces. This is the only module that knows about tokio's I/O.
//!
//! Every loop turn takes all queued commands first, then reads, then writes everything pending in
//! one vectored write, so frames from many channels and many publishes share one syscall.
//! The outgoing queue is bounded: above [`HIGH_WATER`] bytes the task stops taking commands,
//! which makes publishers wait on the bounded command channel (backpressure).

mod connect;
mod task;

pub(crate) use connect::connect;
pub(crate) use task::{Command, Publish};

/// Outgoing bytes above which the driver stops taking new commands until the socket drains.
pub const HIGH_WATER: usize = 4 << 20;
/// Bytes read from the socket per read call, at most.
pub const READ_CHUNK: usize = 128 << 10;
/// Capacity of the command channel from handles to the driver.
pub const COMMAND_QUEUE: usize = 4096;
