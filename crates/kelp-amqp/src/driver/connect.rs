//! Opening the socket (TCP, optionally TLS) and starting the connection task.

use std::sync::Arc;
use std::time::{Duration, Instant};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot};
use tracing::debug;

use super::task::{Command, Driver};
use super::COMMAND_QUEUE;
use crate::api::shared::ConnShared;
use crate::engine::{Config, Engine};
use crate::error::Error;
use crate::url::{AmqpUrl, Verify};

/// Default time allowed for TCP connect, TLS and AMQP negotiation together.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(30);

/// Connect, negotiate, and return the command sender of the running connection task.
pub(crate) async fn connect(
    url: &AmqpUrl,
    config: Config,
    shared: Arc<ConnShared>,
) -> Result<mpsc::Sender<Command>, Error> {
    let timeout = url.connection_timeout.unwrap_or(DEFAULT_CONNECT_TIMEOUT);
    let addr = url.authority();
    match tokio::time::timeout(timeout, connect_inner(url, config, shared)).await {
        Ok(r) => r,
        Err(_) => Err(Error::ConnectTimeout { addr, timeout }),
    }
}

async fn connect_inner(
    url: &AmqpUrl,
    config: Config,
    shared: Arc<ConnShared>,
) -> Result<mpsc::Sender<Command>, Error> {
    let addr = url.authority();
    let tcp = TcpStream::connect(&addr)
        .await
        .map_err(|e| Error::io(format!("connecting to {addr}"), e))?;
    tcp.set_nodelay(true)
        .map_err(|e| Error::io("setting TCP_NODELAY", e))?;
    debug!(%addr, tls = url.is_tls(), "TCP connected");
    let (tx, rx) = mpsc::channel(COMMAND_QUEUE);
    let (ready_tx, ready_rx) = oneshot::channel();
    let engine = Engine::new(config, Instant::now());
    if url.is_tls() {
        let tls = tls_config(url)?;
        let name = ServerName::try_from(url.tls_server_name().to_owned()).map_err(|e| {
            Error::Tls(format!(
                "invalid server name {:?}: {e}",
                url.tls_server_name()
            ))
        })?;
        let stream = tokio_rustls::TlsConnector::from(Arc::new(tls))
            .connect(name, tcp)
            .await
            .map_err(|e| Error::Tls(format!("handshake with {addr} failed: {e}")))?;
        tokio::spawn(Driver::new(stream, engine, rx, shared, ready_tx).run());
    } else {
        tokio::spawn(Driver::new(tcp, engine, rx, shared, ready_tx).run());
    }
    match ready_rx.await {
        Ok(Ok(())) => Ok(tx),
        Ok(Err(e)) => Err(e),
        Err(_) => Err(Error::DriverGone),
    }
}

fn tls_config(url: &AmqpUrl) -> Result<ClientConfig, Error> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| Error::Tls(e.to_string()))?;
    let builder = match url.tls.verify {
        Verify::None => builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(NoVerify(provider))),
        _ => {
            let mut roots = RootCertStore::empty();
            match &url.tls.cacertfile {
                Some(path) => {
                    let certs = CertificateDer::pem_file_iter(path).map_err(|e| {
                        Error::Tls(format!("reading CA file {}: {e}", path.display()))
                    })?;
                    for cert in certs {
                        let cert = cert.map_err(|e| {
                            Error::Tls(format!("parsing CA file {}: {e}", path.display()))
                        })?;
                        roots.add(cert).map_err(|e| {
                            Error::Tls(format!("CA certificate in {}: {e}", path.display()))
                        })?;
                    }
                }
                None => roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned()),
            }
            builder.with_root_certificates(roots)
        }
    };
    let mut cfg = match (&url.tls.certfile, &url.tls.keyfile) {
        (Some(cert), Some(key)) => {
            let chain = CertificateDer::pem_file_iter(cert)
                .map_err(|e| {
                    Error::Tls(format!(
                        "reading client certificate {}: {e}",
                        cert.display()
                    ))
                })?
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| {
                    Error::Tls(format!(
                        "parsing client certificate {}: {e}",
                        cert.display()
                    ))
                })?;
            let key = PrivateKeyDer::from_pem_file(key)
                .map_err(|e| Error::Tls(format!("reading client key {}: {e}", key.display())))?;
            builder
                .with_client_auth_cert(chain, key)
                .map_err(|e| Error::Tls(format!("client certificate: {e}")))?
        }
        (None, None) => builder.with_no_client_auth(),
        _ => {
            return Err(Error::Tls(
                "certfile and keyfile must be given together".into(),
            ))
        }
    };
    cfg.enable_sni = !url.tls.sni_disabled;
    Ok(cfg)
}

/// `verify=verify_none`: accept any certificate (explicit opt-in only).
#[derive(Debug)]
struct NoVerify(Arc<rustls::crypto::CryptoProvider>);

impl ServerCertVerifier for NoVerify {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }
    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}
