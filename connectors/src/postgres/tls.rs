//! TLS to PostgreSQL servers, for every dongbo connection to one: the agent's query and replication
//! connections and the hub's NDC connections, with the settings of [`crate::tls::DbTlsConfig`]
//! (libpq's modes, so a DBA reads them at once).
//!
//! Contract:
//! - `mode` defaults to `verify-full`, except for a Unix socket or a loopback address, where it
//!   defaults to `disable` (the traffic does not leave the machine; Postgres never speaks TLS on a
//!   Unix socket).
//! - `verify-full` checks that the server's certificate chains to `ca_file` and names the configured
//!   host; `verify-ca` checks only the chain. Both need `ca_file`: a provincial server's certificate
//!   comes from the province's or the NDC's CA, never from a public store, so there is no default.
//! - `require` encrypts without checking the certificate, as libpq does (safe from eavesdropping, not
//!   from a man in the middle); with `ca_file` set it checks the chain, as libpq does.
//! - In every mode but `disable` a server that refuses TLS is an error, never a fall-back to clear
//!   text.
//! - `cert_file`/`key_file` present a client certificate, for servers that ask for one
//!   (`hostssl … cert` in `pg_hba.conf`).
//! - Files are read at each connection, so a renewed CA or client certificate takes effect at the
//!   next reconnect without a restart.
//! - SCRAM uses `tls-server-end-point` channel binding when the server offers it, which ties the
//!   password exchange to this TLS session.

use std::future::Future;
use std::io;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{CertificateError, DigitallySignedStruct, SignatureScheme};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

pub use crate::tls::{is_local, DbTlsConfig, SslMode};

impl DbTlsConfig {
    /// The TLS client for a connection to `host`, reading the files now; `None` for clear text.
    pub fn connector(&self, host: &str) -> Result<Option<PgTls>, TlsSetupError> {
        let mode = self.mode_for(host);
        if mode == SslMode::Disable {
            return Ok(None);
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let webpki = match &self.ca_file {
            None => None,
            Some(path) => {
                let mut roots = rustls::RootCertStore::empty();
                let certs = CertificateDer::pem_file_iter(path)
                    .and_then(|i| i.collect::<Result<Vec<_>, _>>())
                    .map_err(|e| TlsSetupError(format!("cannot read the CA file {}: {e}", path.display())))?;
                let (added, _) = roots.add_parsable_certificates(certs);
                if added == 0 {
                    return Err(TlsSetupError(format!("{} holds no usable CA certificate", path.display())));
                }
                let v = WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider.clone())
                    .build()
                    .map_err(|e| TlsSetupError(format!("CA file {}: {e}", path.display())))?;
                Some(v)
            }
        };
        if mode != SslMode::Require && webpki.is_none() {
            return Err(TlsSetupError(format!("TLS mode {} needs ca_file", mode.as_str())));
        }
        let verifier =
            Arc::new(Verifier { check_name: mode == SslMode::VerifyFull, webpki, provider: provider.clone() });
        let builder = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| TlsSetupError(e.to_string()))?
            .dangerous()
            .with_custom_certificate_verifier(verifier);
        let config = match (&self.cert_file, &self.key_file) {
            (Some(cert), Some(key)) => {
                let chain = CertificateDer::pem_file_iter(cert)
                    .and_then(|i| i.collect::<Result<Vec<_>, _>>())
                    .map_err(|e| TlsSetupError(format!("cannot read the certificate {}: {e}", cert.display())))?;
                let key = PrivateKeyDer::from_pem_file(key)
                    .map_err(|e| TlsSetupError(format!("cannot read the key {}: {e}", key.display())))?;
                builder.with_client_auth_cert(chain, key).map_err(|e| TlsSetupError(e.to_string()))?
            }
            _ => builder.with_no_client_auth(),
        };
        let name = ServerName::try_from(host.to_string())
            .map_err(|_| TlsSetupError(format!("{host:?} is not a host name or address TLS can check")))?;
        Ok(Some(PgTls { config: Arc::new(config), name, mode, ca_file: self.ca_file.clone() }))
    }
}

/// The TLS settings could not be used (a file is missing or holds no certificate).
#[derive(Debug, Clone, thiserror::Error)]
#[error("{0}")]
pub struct TlsSetupError(pub String);

/// The TLS handshake with the server failed.
#[derive(Debug, thiserror::Error)]
pub enum HandshakeError {
    /// The server's certificate was refused: retrying will not help until the config or the
    /// certificate changes.
    #[error("{0}")]
    Certificate(String),
    /// The link failed during the handshake.
    #[error("TLS handshake: {0}")]
    Io(io::Error),
}

impl HandshakeError {
    fn from_io(e: io::Error, tls: &PgTls, host: &str) -> Self {
        let mode = tls.mode;
        let Some(rustls::Error::InvalidCertificate(c)) = e.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>())
        else {
            return HandshakeError::Io(e);
        };
        let why = match c {
            CertificateError::UnknownIssuer | CertificateError::BadSignature => format!(
                "is not signed by the CA in ca_file {}: is it the CA that signed the server's certificate?",
                tls.ca_file.as_deref().map_or_else(String::new, |p| p.display().to_string())
            ),
            CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. } => format!(
                "does not name {host:?}, which mode {} checks: connect by a name or address in the certificate",
                mode.as_str()
            ),
            CertificateError::Expired | CertificateError::ExpiredContext { .. } => {
                "has expired: the server needs a new one".to_string()
            }
            CertificateError::Revoked => "is revoked".to_string(),
            other => format!("was refused: {other:?}"),
        };
        HandshakeError::Certificate(format!("the server's TLS certificate {why}"))
    }
}

/// Checks the server's certificate as the mode asks.
#[derive(Debug)]
struct Verifier {
    check_name: bool,
    webpki: Option<Arc<WebPkiServerVerifier>>,
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for Verifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let Some(webpki) = &self.webpki else {
            // `require` without a CA: encryption only, as libpq.
            return Ok(ServerCertVerified::assertion());
        };
        match webpki.verify_server_cert(end_entity, intermediates, server_name, ocsp, now) {
            Err(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) if !self.check_name => Ok(ServerCertVerified::assertion()),
            other => other,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider.signature_verification_algorithms.supported_schemes()
    }
}

/// A TLS client for one Postgres server, ready to wrap a socket.
#[derive(Clone)]
pub struct PgTls {
    config: Arc<rustls::ClientConfig>,
    name: ServerName<'static>,
    mode: SslMode,
    ca_file: Option<PathBuf>,
}

impl PgTls {
    /// Runs the TLS handshake over `stream` (after the server accepted the SSLRequest).
    pub async fn handshake<S>(&self, stream: S) -> Result<PgTlsStream<S>, HandshakeError>
    where
        S: AsyncRead + AsyncWrite + Unpin,
    {
        let connector = tokio_rustls::TlsConnector::from(self.config.clone());
        let host = self.name.to_str().into_owned();
        connector
            .connect(self.name.clone(), stream)
            .await
            .map(PgTlsStream)
            .map_err(|e| HandshakeError::from_io(e, self, &host))
    }

    /// Asks the server for TLS on a fresh connection (the SSLRequest) and runs the handshake; for
    /// clients that speak the protocol themselves, as the replication client does.
    pub async fn start<S>(&self, mut stream: S) -> Result<PgTlsStream<S>, HandshakeError>
    where
        S: AsyncRead + AsyncWrite + Unpin,
    {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut buf = bytes::BytesMut::new();
        postgres_protocol::message::frontend::ssl_request(&mut buf);
        stream.write_all(&buf).await.map_err(HandshakeError::Io)?;
        let mut answer = [0u8];
        stream.read_exact(&mut answer).await.map_err(HandshakeError::Io)?;
        if answer[0] != b'S' {
            return Err(HandshakeError::Certificate(format!(
                "the server does not accept TLS (ssl = off in postgresql.conf?) and tls.mode is {}; \
                 turn ssl on at the server, or set mode = \"disable\" only where the link cannot be overheard",
                self.mode.as_str()
            )));
        }
        self.handshake(stream).await
    }
}

impl<S> tokio_postgres::tls::MakeTlsConnect<S> for PgTls
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    type Stream = PgTlsStream<S>;
    type TlsConnect = PgTls;
    type Error = io::Error;

    fn make_tls_connect(&mut self, _domain: &str) -> Result<PgTls, io::Error> {
        // The name was fixed from the configured host when this client was made.
        Ok(self.clone())
    }
}

impl<S> tokio_postgres::tls::TlsConnect<S> for PgTls
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    type Stream = PgTlsStream<S>;
    type Error = HandshakeError;
    type Future = Pin<Box<dyn Future<Output = Result<PgTlsStream<S>, HandshakeError>> + Send>>;

    fn connect(self, stream: S) -> Self::Future {
        Box::pin(async move { self.handshake(stream).await })
    }
}

/// A TLS session with a Postgres server.
pub struct PgTlsStream<S>(tokio_rustls::client::TlsStream<S>);

impl<S> PgTlsStream<S> {
    /// The `tls-server-end-point` channel binding data (RFC 5929): a hash of the server's
    /// certificate with the hash of its signature algorithm (SHA-256 for MD5 and SHA-1), or `None`
    /// where the RFC defines none (Ed25519, RSA-PSS).
    pub fn server_end_point(&self) -> Option<Vec<u8>> {
        use sha2::Digest;
        let cert = self.0.get_ref().1.peer_certificates()?.first()?;
        let (_, parsed) = x509_parser::parse_x509_certificate(cert.as_ref()).ok()?;
        let oid = parsed.signature_algorithm.algorithm.to_id_string();
        match oid.as_str() {
            // sha384WithRSAEncryption, ecdsa-with-SHA384
            "1.2.840.113549.1.1.12" | "1.2.840.10045.4.3.3" => Some(sha2::Sha384::digest(cert).to_vec()),
            // sha512WithRSAEncryption, ecdsa-with-SHA512
            "1.2.840.113549.1.1.13" | "1.2.840.10045.4.3.4" => Some(sha2::Sha512::digest(cert).to_vec()),
            // RSASSA-PSS, Ed25519, Ed448
            "1.2.840.113549.1.1.10" | "1.3.101.112" | "1.3.101.113" => None,
            _ => Some(sha2::Sha256::digest(cert).to_vec()),
        }
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> tokio_postgres::tls::TlsStream for PgTlsStream<S> {
    fn channel_binding(&self) -> tokio_postgres::tls::ChannelBinding {
        match self.server_end_point() {
            Some(hash) => tokio_postgres::tls::ChannelBinding::tls_server_end_point(hash),
            None => tokio_postgres::tls::ChannelBinding::none(),
        }
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncRead for PgTlsStream<S> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_read(cx, buf)
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncWrite for PgTlsStream<S> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.0).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_shutdown(cx)
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.0).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.0.is_write_vectored()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_or_empty_ca_file_is_a_setup_error_naming_it() {
        let dir = tempfile::tempdir().unwrap();
        let empty = dir.path().join("empty.pem");
        std::fs::write(&empty, "").unwrap();
        let c = DbTlsConfig { mode: Some(SslMode::VerifyFull), ca_file: Some(empty.clone()), ..Default::default() };
        let e = c.connector("db").err().unwrap();
        assert!(e.0.contains("empty.pem"), "{e}");
        let c = DbTlsConfig { ca_file: Some(dir.path().join("missing.pem")), ..c };
        assert!(c.connector("db").err().unwrap().0.contains("missing.pem"));
        let plain = DbTlsConfig { mode: Some(SslMode::Disable), ..Default::default() };
        assert!(plain.connector("db").unwrap().is_none());
    }
}
