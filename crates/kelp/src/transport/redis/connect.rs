//! Reaching the Redis server a `redis://`, `rediss://` or `sentinel://` URL names: the client
//! every connection of the transport (commands, the blocking consumer loop, PUB/SUB) is made
//! from.
//!
//! - `redis://`: the URL as the `redis` crate reads it;
//! - `rediss://`: TLS through rustls (ring), with the CA file and client certificate of the
//!   `ssl_*` options read on every connect (so a renewed certificate is picked up by the next
//!   reconnect);
//! - `sentinel://`: the sentinels are asked, in order, for the master; the client returned is
//!   the master's, so every later connection (BRPOP, PUB/SUB) goes to that master. When the
//!   master goes away the connection breaks, the robust connection reconnects, and this asks the
//!   sentinels again.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use redis::sentinel::{Sentinel, SentinelNodeConnectionInfo};
use redis::{
    ClientTlsConfig, ConnectionAddr, IntoConnectionInfo, RedisConnectionInfo, TlsCertificates,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

use crate::connection::ConnectOptions;
use crate::error::Error;

use super::keys::{mask, CertReqs, RedisOptions, RedisTls, SentinelOptions};
use super::rerr;

/// How long the sentinels may take to name a reachable master when no connect timeout is set.
const SENTINEL_LOOKUP_LIMIT: Duration = Duration::from_secs(30);

/// The client for the server `opts` names, and the multiplexed connection commands go through.
pub(super) async fn open(
    url: &str,
    opts: &RedisOptions,
    options: &ConnectOptions,
) -> Result<(redis::Client, redis::aio::MultiplexedConnection), Error> {
    let client = match (&opts.sentinel, &opts.tls) {
        (Some(s), _) => master_client(opts, s, options).await?,
        (None, Some(tls)) => tls_client(url, opts, tls)?,
        (None, None) => redis::Client::open(opts.server_url.as_str()).map_err(|e| Error::Url {
            url: mask(url),
            reason: e.to_string(),
        })?,
    };
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
        .map_err(rerr(match (&opts.sentinel, &opts.tls) {
            (Some(_), _) => "connecting to the master the sentinels named",
            (None, Some(_)) => "connecting over TLS",
            (None, None) => "connecting",
        }))?;
    Ok((client, conn))
}

/// rustls needs a process-wide crypto provider: ring's (as kelp-amqp's TLS), unless the
/// application installed one.
fn ensure_crypto_provider() {
    if rustls::crypto::CryptoProvider::get_default().is_none() {
        // Losing a race with another installer is fine: some provider is installed.
        let _ = rustls::crypto::ring::default_provider().install_default();
    }
}

/// The contents of the PEM file an `ssl_*` option names.
fn read_pem(url: &str, option: &str, file: &Path) -> Result<Vec<u8>, Error> {
    std::fs::read(file).map_err(|e| Error::Url {
        url: mask(url),
        reason: format!("{option}={}: {e}", file.display()),
    })
}

/// Certificates in `pem`, checked here so that a wrong file is reported as such rather than as
/// a failed handshake.
fn check_certs(url: &str, option: &str, file: &Path, pem: &[u8]) -> Result<(), Error> {
    let bad = |reason: String| Error::Url {
        url: mask(url),
        reason: format!("{option}={}: {reason}", file.display()),
    };
    let mut n = 0usize;
    for cert in CertificateDer::pem_slice_iter(pem) {
        cert.map_err(|e| bad(format!("not PEM certificates: {e}")))?;
        n += 1;
    }
    if n == 0 {
        return Err(bad("no certificate in it".to_owned()));
    }
    Ok(())
}

/// A `rediss://` client: TLS with the CA and client certificate the options name.
fn tls_client(url: &str, opts: &RedisOptions, tls: &RedisTls) -> Result<redis::Client, Error> {
    ensure_crypto_provider();
    let url_err = |e: redis::RedisError| Error::Url {
        url: mask(url),
        reason: e.to_string(),
    };
    let mut server = opts.server_url.clone();
    if tls.cert_reqs == CertReqs::Disabled {
        // The redis crate's spelling of "accept any certificate".
        server.push_str("#insecure");
    }
    let info = server.as_str().into_connection_info().map_err(url_err)?;
    let root_cert = match &tls.ca_certs {
        Some(file) => {
            let pem = read_pem(url, "ssl_ca_certs", file)?;
            check_certs(url, "ssl_ca_certs", file, &pem)?;
            Some(pem)
        }
        None => None,
    };
    let client_tls = match &tls.certfile {
        Some(certfile) => {
            let client_cert = read_pem(url, "ssl_certfile", certfile)?;
            check_certs(url, "ssl_certfile", certfile, &client_cert)?;
            let (key_option, keyfile) = match &tls.keyfile {
                Some(k) => ("ssl_keyfile", k),
                None => ("ssl_certfile", certfile),
            };
            let client_key = read_pem(url, key_option, keyfile)?;
            if let Err(e) = PrivateKeyDer::from_pem_slice(&client_key) {
                return Err(Error::Url {
                    url: mask(url),
                    reason: format!("{key_option}={}: no private key: {e}", keyfile.display()),
                });
            }
            Some(ClientTlsConfig {
                client_cert,
                client_key,
            })
        }
        None => None,
    };
    let mut client = if root_cert.is_none() && client_tls.is_none() {
        redis::Client::open(info).map_err(url_err)?
    } else {
        redis::Client::build_with_tls(
            info,
            TlsCertificates {
                client_tls,
                root_cert,
            },
        )
        .map_err(url_err)?
    };
    if !tls.check_hostname && tls.cert_reqs != CertReqs::Disabled {
        let info = client.get_connection_info().clone();
        let mut addr = info.addr().clone();
        addr.set_danger_accept_invalid_hostnames(true);
        client = redis::Client::open(info.set_addr(addr)).map_err(url_err)?;
    }
    Ok(client)
}

/// Ask the sentinels for the master and return a client for it, with the URL's credentials
/// and database.
async fn master_client(
    opts: &RedisOptions,
    s: &SentinelOptions,
    options: &ConnectOptions,
) -> Result<redis::Client, Error> {
    let context = "asking the sentinels for the master";
    let mut sentinel_login = RedisConnectionInfo::default();
    if let Some(u) = &s.sentinel_username {
        sentinel_login = sentinel_login.set_username(u);
    }
    if let Some(p) = &s.sentinel_password {
        sentinel_login = sentinel_login.set_password(p);
    }
    let sentinels = s
        .sentinels
        .iter()
        .map(|(host, port)| {
            ConnectionAddr::Tcp(host.clone(), *port)
                .into_connection_info()
                .map(|i| i.set_redis_settings(sentinel_login.clone()))
        })
        .collect::<Result<Vec<_>, _>>()
        .map_err(rerr(context))?;
    let mut sentinel = Sentinel::build(sentinels).map_err(rerr(context))?;
    let mut master_login = RedisConnectionInfo::default().set_db(opts.db);
    if let Some(u) = &s.username {
        master_login = master_login.set_username(u);
    }
    if let Some(p) = &s.password {
        master_login = master_login.set_password(p);
    }
    let node = SentinelNodeConnectionInfo::default().set_redis_connection_info(master_login);
    let limit = options.connect_timeout.unwrap_or(SENTINEL_LOOKUP_LIMIT);
    let asked = tokio::time::timeout(
        limit,
        sentinel.async_master_for(&s.master_name, Some(&node)),
    )
    .await
    .map_err(|_| Error::Timeout {
        what: "the Redis sentinels to name the master",
        after: limit,
    })?;
    asked.map_err(|e| {
        let list: Vec<String> = s
            .sentinels
            .iter()
            .map(|(h, p)| format!("{h}:{p}"))
            .collect();
        let list = list.join(", ");
        let wrapped = |kind: std::io::ErrorKind, what: String| {
            redis::RedisError::from(std::io::Error::new(kind, what))
        };
        let e = if e.kind() == redis::ErrorKind::MasterNameNotFoundBySentinel {
            // redis-py's MasterNotFoundError is a ConnectionError too: during a failover no
            // sentinel names an up master for a while, and a robust connection keeps asking.
            wrapped(
                std::io::ErrorKind::NotConnected,
                format!(
                    "no sentinel of {list} names an up master called {:?} ({e})",
                    s.master_name
                ),
            )
        } else if e.is_io_error() {
            // Which sentinels were asked, keeping the kind of failure.
            let kind = if e.is_connection_refusal() {
                std::io::ErrorKind::ConnectionRefused
            } else if e.is_timeout() {
                std::io::ErrorKind::TimedOut
            } else {
                std::io::ErrorKind::NotConnected
            };
            wrapped(
                kind,
                format!("sentinels {list}, master {:?}: {e}", s.master_name),
            )
        } else {
            e
        };
        Error::Redis {
            context,
            source: Arc::new(e),
        }
    })
}
