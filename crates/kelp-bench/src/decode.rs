//! The `decode` scenario's input: a pre-recorded server-to-client byte stream of deliveries.

use bytes::Bytes;

use crate::sink::wire;
use crate::MSG_SIZE;

/// Consumer tag, exchange and routing key of every recorded delivery.
pub const CONSUMER_TAG: &str = "ctag-1";
pub const EXCHANGE: &str = "";
pub const ROUTING_KEY: &str = "bench-q";

/// Bytes one recorded delivery takes: basic.deliver + content header + 100-byte body.
pub const BYTES_PER_DELIVERY: usize =
    (8 + 4 + 1 + CONSUMER_TAG.len() + 8 + 1 + 1 + EXCHANGE.len() + 1 + ROUTING_KEY.len())
        + (8 + 14)
        + (8 + MSG_SIZE);

/// `count` deliveries on channel 1, each as three frames: `basic.deliver` (class 60,
/// method 60: consumer-tag "ctag-1", delivery-tag 1.., redelivered false, exchange "",
/// routing-key "bench-q"), a content header (class 60, weight 0, body size 100, no
/// properties) and a 100-byte body frame.
pub fn record_deliveries(count: usize) -> Bytes {
    let mut out = Vec::with_capacity(count * BYTES_PER_DELIVERY);
    let body = [b'x'; MSG_SIZE];
    let mut args = Vec::with_capacity(32);
    for tag in 1..=count as u64 {
        args.clear();
        wire::shortstr(&mut args, CONSUMER_TAG);
        args.extend_from_slice(&tag.to_be_bytes());
        args.push(0); // redelivered: false
        wire::shortstr(&mut args, EXCHANGE);
        wire::shortstr(&mut args, ROUTING_KEY);
        wire::method(&mut out, 1, 60, 60, &args);
        wire::content_header(&mut out, 1, 60, MSG_SIZE as u64);
        wire::body(&mut out, 1, &body);
    }
    Bytes::from(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::BenchResult;

    #[test]
    fn stream_layout() -> BenchResult<()> {
        let stream = record_deliveries(3);
        assert_eq!(stream.len(), 3 * BYTES_PER_DELIVERY);
        assert_eq!(BYTES_PER_DELIVERY, 37 + 22 + 108);
        let mut rest = &stream[..];
        let mut tags = Vec::new();
        while let Some((frame, len)) = wire::split_frame(rest)? {
            if let Some((60, 60, args)) = frame.method() {
                assert_eq!(&args[..7], b"\x06ctag-1");
                tags.push(u64::from_be_bytes(args[7..15].try_into()?));
                assert_eq!(&args[15..], b"\x00\x00\x07bench-q");
            }
            rest = &rest[len..];
        }
        assert!(rest.is_empty());
        assert_eq!(tags, [1, 2, 3]);
        Ok(())
    }
}
