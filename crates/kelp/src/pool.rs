//! Pools of connections, channels and producers (kombu.pools, aio-pika Pool).
