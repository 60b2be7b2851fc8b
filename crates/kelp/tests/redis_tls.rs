//! `rediss://` against a TLS-only `redis-server` each test starts on a free port, with a CA,
//! server and client certificates made by rcgen at test time: the CA file, verification on by
//! default, a wrong CA failing (not hanging), `ssl_cert_reqs=none`, host name checks, client
//! certificates, and bad options reported as URL errors.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

#[allow(unused_macros)]
mod common;
mod redis_procs;

use std::path::PathBuf;
use std::time::Duration;

use kelp::{Connection, Consumer, Error, Producer, PublishOptions, Queue};
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DistinguishedName, DnType, IsCa, KeyPair,
};
use redis_procs::{base_args, RedisProc, TempDir};

/// The most a connect that must fail may take before it counts as a hang.
const FAIL_LIMIT: Duration = Duration::from_secs(15);

/// Certificates in a temp dir: a CA, a server certificate for `server_names`, a client
/// certificate, and an unrelated CA.
struct Pki {
    dir: TempDir,
    ca: PathBuf,
    other_ca: PathBuf,
    server_cert: PathBuf,
    server_key: PathBuf,
    client_cert: PathBuf,
    client_key: PathBuf,
    /// Client certificate and key in one file.
    client_both: PathBuf,
}

/// Certificate parameters for `names`, with a subject of their own (OpenSSL takes a
/// certificate whose subject is its issuer's for a self-signed one).
fn params(common_name: &str, names: Vec<String>) -> CertificateParams {
    let mut p = CertificateParams::new(names).unwrap();
    p.distinguished_name = DistinguishedName::new();
    p.distinguished_name
        .push(DnType::CommonName, common_name.to_owned());
    p
}

fn new_ca(name: &str) -> CertifiedIssuer<'static, KeyPair> {
    let mut params = params(name, Vec::new());
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap()
}

fn make_pki(tag: &str, server_names: &[&str]) -> Pki {
    let dir = TempDir::new(&format!("redis-tls-{tag}"));
    let ca = new_ca("kelp test CA");
    let other = new_ca("another CA");
    let server_key = KeyPair::generate().unwrap();
    let names: Vec<String> = server_names.iter().map(|s| s.to_string()).collect();
    let server = params("kelp test redis", names)
        .signed_by(&server_key, &ca)
        .unwrap();
    let client_key = KeyPair::generate().unwrap();
    let client = params("kelp-client", vec!["kelp-client".to_string()])
        .signed_by(&client_key, &ca)
        .unwrap();
    Pki {
        ca: dir.write("ca.pem", ca.pem()),
        other_ca: dir.write("other-ca.pem", other.pem()),
        server_cert: dir.write("server.pem", server.pem()),
        server_key: dir.write("server.key", server_key.serialize_pem()),
        client_cert: dir.write("client.pem", client.pem()),
        client_key: dir.write("client.key", client_key.serialize_pem()),
        client_both: dir.write(
            "client-both.pem",
            format!("{}{}", client.pem(), client_key.serialize_pem()),
        ),
        dir,
    }
}

/// A client that reaches the test server whatever its settings (our CA, our client
/// certificate, any host name), for readiness checks and looking at what landed.
fn probe(pki: &Pki, port: u16) -> redis::Client {
    let client = redis::Client::build_with_tls(
        format!("rediss://127.0.0.1:{port}/0"),
        redis::TlsCertificates {
            client_tls: Some(redis::ClientTlsConfig {
                client_cert: std::fs::read(&pki.client_cert).unwrap(),
                client_key: std::fs::read(&pki.client_key).unwrap(),
            }),
            root_cert: Some(std::fs::read(&pki.ca).unwrap()),
        },
    )
    .unwrap();
    let info = client.get_connection_info().clone();
    let mut addr = info.addr().clone();
    addr.set_danger_accept_invalid_hostnames(true);
    redis::Client::open(info.set_addr(addr)).unwrap()
}

/// A TLS-only server (`--port 0`) with `pki`'s certificate; `auth_clients` is `optional` or
/// `yes`.
async fn tls_server(pki: &Pki, auth_clients: &str) -> RedisProc {
    let p = |p: &PathBuf| p.display().to_string();
    let fixed = vec![
        "--port".to_owned(),
        "0".to_owned(),
        "--tls-cert-file".to_owned(),
        p(&pki.server_cert),
        "--tls-key-file".to_owned(),
        p(&pki.server_key),
        "--tls-ca-cert-file".to_owned(),
        p(&pki.ca),
        "--tls-auth-clients".to_owned(),
        auth_clients.to_owned(),
    ];
    RedisProc::start(
        "redis-tls",
        pki.dir.path(),
        |port| {
            let mut a = base_args();
            a.extend(fixed.iter().cloned());
            a.extend(["--tls-port".to_owned(), port.to_string()]);
            a
        },
        |port| probe(pki, port),
    )
    .await
}

async fn connect(url: &str) -> Result<Connection, Error> {
    match tokio::time::timeout(
        FAIL_LIMIT,
        Connection::builder()
            .url(url)
            .connect_timeout(Duration::from_secs(5))
            .connect(),
    )
    .await
    {
        Ok(r) => r,
        Err(_) => panic!("connect to {url}: no answer within {FAIL_LIMIT:?} (hang)"),
    }
}

/// Declare a queue, publish, see the message in the server's list (over our own TLS client),
/// consume and ack it.
async fn round_trip(url: &str, pki: &Pki, server: &RedisProc) {
    let conn = connect(url)
        .await
        .unwrap_or_else(|e| panic!("connect {url}: {e}"));
    let ch = common::within("channel", conn.channel()).await.unwrap();
    let q = common::unique("tls");
    common::within("declare", ch.declare_queue(Queue::new(&q)))
        .await
        .unwrap();
    common::within(
        "publish",
        Producer::new(&ch).publish("over TLS", PublishOptions::default().routing_key(&q)),
    )
    .await
    .unwrap();
    let mut raw = redis_procs::connection(&probe(pki, server.port))
        .await
        .unwrap();
    let len: i64 = redis::cmd("LLEN")
        .arg(&q)
        .query_async(&mut raw)
        .await
        .unwrap();
    assert_eq!(len, 1, "the message is in the TLS server's list");
    let mut c = common::within(
        "consumer",
        Consumer::builder(&ch)
            .queue(Queue::new(&q).no_declare(true))
            .build(),
    )
    .await
    .unwrap();
    let mut m = common::within("delivery", c.next()).await.unwrap().unwrap();
    assert_eq!(m.body().as_ref(), b"over TLS");
    common::within("ack", m.ack()).await.unwrap();
    conn.close().await.unwrap();
}

/// A connect that must fail: fails in time, with a connection error (not a URL error).
async fn refused(url: &str) -> Error {
    match connect(url).await {
        Ok(_) => panic!("{url}: connected, but it must not"),
        Err(e) => {
            assert!(
                matches!(e, Error::Redis { .. }) && e.is_connection_error(),
                "{url}: expected a Redis connection error, got {e:?}"
            );
            e
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publish_and_consume_over_tls_with_the_ca_file() {
    if !redis_procs::redis_server_available("redis_tls::ca_file") {
        return;
    }
    let pki = make_pki("ca", &["localhost", "127.0.0.1"]);
    let server = tls_server(&pki, "optional").await;
    let url = format!(
        "rediss://127.0.0.1:{}/0?ssl_ca_certs={}&ssl_cert_reqs=required",
        server.port,
        pki.ca.display()
    );
    round_trip(&url, &pki, &server).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_ca_fails_with_a_connection_error_not_a_hang() {
    if !redis_procs::redis_server_available("redis_tls::wrong_ca") {
        return;
    }
    let pki = make_pki("wrong-ca", &["127.0.0.1"]);
    let server = tls_server(&pki, "optional").await;
    let e = refused(&format!(
        "rediss://:s3cret@127.0.0.1:{}/0?ssl_ca_certs={}",
        server.port,
        pki.other_ca.display()
    ))
    .await;
    let text = e.to_string();
    assert!(text.contains("certificate"), "names the cause: {text}");
    assert!(!text.contains("s3cret"), "{text}");
    // Verification is on by default: the system's CAs do not know the test CA either.
    refused(&format!("rediss://127.0.0.1:{}/0", server.port)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cert_reqs_none_connects_without_a_ca() {
    if !redis_procs::redis_server_available("redis_tls::cert_reqs_none") {
        return;
    }
    let pki = make_pki("none", &["redis.invalid"]);
    let server = tls_server(&pki, "optional").await;
    let url = format!("rediss://127.0.0.1:{}/0?ssl_cert_reqs=none", server.port);
    round_trip(&url, &pki, &server).await;
    let url = format!(
        "rediss://127.0.0.1:{}/0?ssl_cert_reqs=CERT_NONE&ssl_ca_certs={}",
        server.port,
        pki.other_ca.display()
    );
    round_trip(&url, &pki, &server).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_host_name_is_checked_unless_ssl_check_hostname_is_false() {
    if !redis_procs::redis_server_available("redis_tls::check_hostname") {
        return;
    }
    // A certificate for `localhost` only, reached as 127.0.0.1.
    let pki = make_pki("hostname", &["localhost"]);
    let server = tls_server(&pki, "optional").await;
    let e = refused(&format!(
        "rediss://127.0.0.1:{}/0?ssl_ca_certs={}",
        server.port,
        pki.ca.display()
    ))
    .await;
    assert!(e.to_string().contains("certificate"), "{e}");
    let url = format!(
        "rediss://127.0.0.1:{}/0?ssl_ca_certs={}&ssl_check_hostname=false",
        server.port,
        pki.ca.display()
    );
    round_trip(&url, &pki, &server).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_certificate_when_the_server_requires_one() {
    if !redis_procs::redis_server_available("redis_tls::client_cert") {
        return;
    }
    let pki = make_pki("client", &["127.0.0.1"]);
    let server = tls_server(&pki, "yes").await;
    let base = format!(
        "rediss://127.0.0.1:{}/0?ssl_ca_certs={}",
        server.port,
        pki.ca.display()
    );
    refused(&base).await;
    let with_cert = format!(
        "{base}&ssl_certfile={}&ssl_keyfile={}",
        pki.client_cert.display(),
        pki.client_key.display()
    );
    round_trip(&with_cert, &pki, &server).await;
    // Certificate and key in one file, as Python's load_cert_chain takes them.
    let one_file = format!("{base}&ssl_certfile={}", pki.client_both.display());
    round_trip(&one_file, &pki, &server).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_tls_options_are_url_errors() {
    let dir = TempDir::new("redis-tls-bad");
    let not_pem = dir.write("not.pem", "hello");
    for (url, expect) in [
        (
            "rediss://:s3cret@127.0.0.1:1/0?ssl_ca_certs=/nonexistent/ca.pem".to_owned(),
            "/nonexistent/ca.pem",
        ),
        (
            format!(
                "rediss://:s3cret@127.0.0.1:1/0?ssl_ca_certs={}",
                not_pem.display()
            ),
            "no certificate",
        ),
        (
            format!(
                "rediss://:s3cret@127.0.0.1:1/0?ssl_certfile={}",
                not_pem.display()
            ),
            "ssl_certfile",
        ),
        (
            "rediss://:s3cret@127.0.0.1:1/0?ssl_cert_reqs=sometimes".to_owned(),
            "ssl_cert_reqs",
        ),
        (
            "redis://:s3cret@127.0.0.1:1/0?ssl_cert_reqs=required".to_owned(),
            "rediss://",
        ),
    ] {
        // Robust or not, a bad URL fails at once (it is not retried).
        let started = std::time::Instant::now();
        let e = Connection::builder()
            .url(&url)
            .robust(true)
            .fail_fast(false)
            .connect()
            .await
            .unwrap_err();
        assert!(started.elapsed() < Duration::from_secs(2), "{url}: retried");
        let Error::Url { url: shown, reason } = &e else {
            panic!("{url}: expected Error::Url, got {e:?}");
        };
        assert!(reason.contains(expect), "{url}: {reason}");
        assert!(
            !shown.contains("s3cret") && !reason.contains("s3cret"),
            "{e}"
        );
    }
}
