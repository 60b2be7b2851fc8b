//! `amqps://` through a TLS-terminating proxy (rustls, certificates made by rcgen at test time)
//! in front of the local RabbitMQ: CA file, SNI, verification on by default, explicit
//! `verify_none`, and client certificates.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod common;

use std::path::PathBuf;
use std::sync::Arc;

use kelp_amqp::options::QueueDeclareOptions;
use kelp_amqp::{Connection, Error, FieldTable};
use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio::net::{TcpListener, TcpStream};

struct Pki {
    dir: PathBuf,
    ca: PathBuf,
    client_cert: PathBuf,
    client_key: PathBuf,
    server_chain: Vec<CertificateDer<'static>>,
    server_key: PrivateKeyDer<'static>,
    ca_der: CertificateDer<'static>,
}

impl Drop for Pki {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn make_pki(tag: &str) -> Pki {
    let dir = std::env::temp_dir().join(format!("kelp-tls-{tag}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate().unwrap()).unwrap();
    let server_key = KeyPair::generate().unwrap();
    let server = CertificateParams::new(vec!["localhost".to_string()])
        .unwrap()
        .signed_by(&server_key, &ca)
        .unwrap();
    let client_key = KeyPair::generate().unwrap();
    let client = CertificateParams::new(vec!["kelp-client".to_string()])
        .unwrap()
        .signed_by(&client_key, &ca)
        .unwrap();
    let write = |name: &str, s: String| {
        let p = dir.join(name);
        std::fs::write(&p, s).unwrap();
        p
    };
    Pki {
        ca: write("ca.pem", ca.pem()),
        client_cert: write("client.pem", client.pem()),
        client_key: write("client.key", client_key.serialize_pem()),
        server_chain: vec![server.der().clone()],
        server_key: PrivateKeyDer::from_pem_slice(server_key.serialize_pem().as_bytes()).unwrap(),
        ca_der: ca.der().clone(),
        dir,
    }
}

/// A TLS proxy in front of RabbitMQ; returns its port.
async fn tls_proxy(pki: &Pki, require_client_cert: bool) -> u16 {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .unwrap();
    let builder = if require_client_cert {
        let mut roots = rustls::RootCertStore::empty();
        roots.add(pki.ca_der.clone()).unwrap();
        let verifier =
            rustls::server::WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                .build()
                .unwrap();
        builder.with_client_cert_verifier(verifier)
    } else {
        builder.with_no_client_auth()
    };
    let cfg = builder
        .with_single_cert(pki.server_chain.clone(), pki.server_key.clone_key())
        .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(cfg));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        while let Ok((sock, _)) = listener.accept().await {
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(mut tls) = acceptor.accept(sock).await else {
                    return;
                };
                let Ok(mut upstream) = TcpStream::connect("127.0.0.1:5672").await else {
                    return;
                };
                let _ = tokio::io::copy_bidirectional(&mut tls, &mut upstream).await;
            });
        }
    });
    port
}

async fn declare_works(conn: &Connection) {
    let ch = conn.channel().await.unwrap();
    let ok = ch
        .queue_declare(
            "",
            QueueDeclareOptions {
                exclusive: true,
                ..Default::default()
            },
            FieldTable::new(),
        )
        .await
        .unwrap();
    assert!(
        ok.queue.starts_with("amq.gen-"),
        "server-named queue over TLS: {:?}",
        ok.queue
    );
}

#[tokio::test]
async fn amqps_with_ca_file_and_sni_connects() {
    require_rabbitmq!("amqps_with_ca_file_and_sni_connects");
    let pki = make_pki("ca");
    let port = tls_proxy(&pki, false).await;
    let url = format!(
        "amqps://guest:guest@127.0.0.1:{port}/%2f?cacertfile={}&server_name_indication=localhost",
        pki.ca.display()
    );
    let conn = Connection::open(&url).await.unwrap();
    declare_works(&conn).await;
    conn.close().await.unwrap();
}

#[tokio::test]
async fn amqps_verifies_by_default() {
    require_rabbitmq!("amqps_verifies_by_default");
    let pki = make_pki("verify");
    let port = tls_proxy(&pki, false).await;
    // No CA file: the public roots do not know our test CA, so the handshake must fail.
    let url = format!("amqps://guest:guest@localhost:{port}/%2f");
    match Connection::open(&url).await {
        Err(Error::Tls(msg)) => assert!(msg.contains("handshake"), "{msg}"),
        other => panic!("expected a TLS verification error, got {other:?}"),
    }
}

#[tokio::test]
async fn amqps_verify_none_must_be_explicit_and_works() {
    require_rabbitmq!("amqps_verify_none_must_be_explicit_and_works");
    let pki = make_pki("none");
    let port = tls_proxy(&pki, false).await;
    let url = format!("amqps://guest:guest@127.0.0.1:{port}/%2f?verify=verify_none");
    let conn = Connection::open(&url).await.unwrap();
    declare_works(&conn).await;
    conn.close().await.unwrap();
}

#[tokio::test]
async fn amqps_client_certificate() {
    require_rabbitmq!("amqps_client_certificate");
    let pki = make_pki("client");
    let port = tls_proxy(&pki, true).await;
    let base = format!(
        "amqps://guest:guest@127.0.0.1:{port}/%2f?cacertfile={}&server_name_indication=localhost",
        pki.ca.display()
    );
    // Without a client certificate the server refuses us.
    let res = Connection::open(&format!("{base}&connection_timeout=5000")).await;
    assert!(
        res.is_err(),
        "connected without the required client certificate"
    );
    let url = format!(
        "{base}&certfile={}&keyfile={}",
        pki.client_cert.display(),
        pki.client_key.display()
    );
    let conn = Connection::open(&url).await.unwrap();
    declare_works(&conn).await;
    conn.close().await.unwrap();
}
