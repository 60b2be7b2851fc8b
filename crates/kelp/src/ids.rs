//! Identifiers kelp makes: version-4 UUIDs (Kombu's delivery tags, aio-pika's correlation ids,
//! Celery task ids, server-named queues).

/// A fresh random version-4 UUID, hyphenated, as Python's `str(uuid.uuid4())`.
pub(crate) fn uuid4() -> String {
    let a = fastrand::u64(..);
    let b = fastrand::u64(..);
    // Version 4, variant 10xx.
    let hi = (a & 0xffff_ffff_ffff_0fff) | 0x0000_0000_0000_4000;
    let lo = (b & 0x3fff_ffff_ffff_ffff) | 0x8000_0000_0000_0000;
    format!(
        "{:08x}-{:04x}-{:04x}-{:04x}-{:012x}",
        hi >> 32,
        (hi >> 16) & 0xffff,
        hi & 0xffff,
        lo >> 48,
        lo & 0xffff_ffff_ffff
    )
}
