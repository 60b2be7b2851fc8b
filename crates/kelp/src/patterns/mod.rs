//! Messaging patterns: RPC and master/worker, wire-compatible with aio-pika.
