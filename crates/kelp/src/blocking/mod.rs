//! Synchronous programs: kelp without touching tokio (Kombu's style).
