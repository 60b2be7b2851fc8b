//! Compatibility surfaces of older Python APIs (carrot).
