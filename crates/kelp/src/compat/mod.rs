//! Compatibility surfaces of older Python APIs (carrot).

pub mod carrot;
