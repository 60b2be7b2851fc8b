//! Reaching the Redis server a `redis://` URL names: the client every connection of the
//! transport (commands, the blocking consumer loop, PUB/SUB) is made from.

use crate::connection::ConnectOptions;
use crate::error::{mask_url, Error};

use super::keys::RedisOptions;
use super::rerr;

/// The client for the server `opts` names, and the multiplexed connection commands go through.
pub(super) async fn open(
    url: &str,
    opts: &RedisOptions,
    options: &ConnectOptions,
) -> Result<(redis::Client, redis::aio::MultiplexedConnection), Error> {
    let client = redis::Client::open(opts.server_url.as_str()).map_err(|e| Error::Url {
        url: mask_url(url),
        reason: e.to_string(),
    })?;
    let mut config = redis::AsyncConnectionConfig::new();
    if let Some(t) = options.connect_timeout {
        config = config.set_connection_timeout(Some(t));
    }
    if let Some(t) = opts.socket_timeout {
        config = config.set_response_timeout(Some(t));
    }
    let conn = client
        .get_multiplexed_async_connection_with_config(&config)
        .await
        .map_err(rerr("connecting"))?;
    Ok((client, conn))
}
