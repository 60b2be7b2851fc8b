//! The engine's outgoing bytes: small frames are coalesced into one buffer, large bodies are
//! queued as shared `Bytes` without copying, and the driver takes everything in one go.

use std::collections::VecDeque;

use bytes::{BufMut, Bytes, BytesMut};

/// Bodies up to this size are copied next to their frames (one contiguous write beats a
/// scatter list for small payloads); larger ones are queued by reference.
pub const COPY_BODY_MAX: usize = 8 * 1024;

/// Pending outgoing bytes.
#[derive(Debug, Default)]
pub struct Transmit {
    chunks: VecDeque<Bytes>,
    cur: BytesMut,
    queued: usize,
}

impl Transmit {
    /// The buffer frames are encoded into.
    pub(crate) fn buf(&mut self) -> &mut BytesMut {
        &mut self.cur
    }

    /// Queue `body[range]` by reference, after what is encoded so far.
    pub(crate) fn push_shared(&mut self, b: Bytes) {
        if !self.cur.is_empty() {
            let head = self.cur.split().freeze();
            self.queued += head.len();
            self.chunks.push_back(head);
        }
        self.queued += b.len();
        self.chunks.push_back(b);
    }

    /// Append a body chunk: copied if small, shared if large.
    pub(crate) fn put_body(&mut self, b: Bytes) {
        if b.len() <= COPY_BODY_MAX {
            self.cur.put_slice(&b);
        } else {
            self.push_shared(b);
        }
    }

    /// Bytes waiting to be written.
    pub fn len(&self) -> usize {
        self.queued + self.cur.len()
    }

    /// True when nothing waits.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Move everything into `out`, in order.
    pub fn drain_into(&mut self, out: &mut VecDeque<Bytes>) {
        out.append(&mut self.chunks);
        if !self.cur.is_empty() {
            out.push_back(self.cur.split().freeze());
        }
        self.queued = 0;
    }
}
