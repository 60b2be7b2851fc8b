//! A worker loop (Kombu's ConsumerMixin): run consumers until a signal, then stop cleanly.
