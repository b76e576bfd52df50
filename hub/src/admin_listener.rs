//! The admin API's connections: HTTPS when the hub has `[tls]` (its certificate; operators may
//! present a client certificate signed by `tls.client_ca_file`, a token, or both), clear text in a
//! demo. Handshakes run in their own tasks under the handshake timeout, so a slow or silent client
//! delays only itself; the connection cap and timeouts of [`GuardedListener`] apply underneath.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::serve::IncomingStream;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::mpsc;

use crate::config::TlsConfig;
use crate::listener::{Guarded, GuardedListener};

/// Accepted connections waiting for axum; handshakes beyond this wait in their tasks.
const READY_QUEUE: usize = 64;

/// The rustls server settings of the admin listener from `[tls]`.
pub fn server_config(t: &TlsConfig) -> Result<Arc<rustls::ServerConfig>, String> {
    let err = |what: &str, e: &dyn std::fmt::Display| format!("admin TLS: {what}: {e}");
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&t.cert_file)
        .map_err(|e| err(&t.cert_file.display().to_string(), &e))?
        .collect::<Result<_, _>>()
        .map_err(|e| err(&t.cert_file.display().to_string(), &e))?;
    let key = PrivateKeyDer::from_pem_file(&t.key_file).map_err(|e| err(&t.key_file.display().to_string(), &e))?;
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_file_iter(&t.client_ca_file).map_err(|e| err("client CA", &e))? {
        roots.add(c.map_err(|e| err("client CA", &e))?).map_err(|e| err("client CA", &e))?;
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    // Operators may log in with a token alone (a browser without a client certificate).
    let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
        .allow_unauthenticated()
        .build()
        .map_err(|e| err("client CA", &e))?;
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| err("protocol versions", &e))?
        .with_client_cert_verifier(verifier)
        .with_single_cert(certs, key)
        .map_err(|e| err("certificate and key", &e))?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// A connection of the admin API.
pub enum AdminIo {
    /// Clear text (demo).
    Plain(Guarded),
    /// HTTPS.
    Tls(Box<tokio_rustls::server::TlsStream<Guarded>>),
}

/// The admin listener: connections come out TLS-handshaken (or plain in a demo).
pub struct AdminListener {
    ready: mpsc::Receiver<(AdminIo, SocketAddr)>,
    local: SocketAddr,
}

impl AdminListener {
    /// Starts accepting on `guarded`, with TLS when `tls` is given.
    pub fn start(
        mut guarded: GuardedListener,
        tls: Option<Arc<rustls::ServerConfig>>,
        handshake: Duration,
    ) -> io::Result<Self> {
        let local = guarded.local_addr()?;
        let (tx, ready) = mpsc::channel(READY_QUEUE);
        tokio::spawn(async move {
            let acceptor = tls.map(tokio_rustls::TlsAcceptor::from);
            loop {
                let (conn, addr) = guarded.accept_guarded().await;
                let Some(acceptor) = acceptor.clone() else {
                    if tx.send((AdminIo::Plain(conn), addr)).await.is_err() {
                        return;
                    }
                    continue;
                };
                let tx = tx.clone();
                tokio::spawn(async move {
                    match tokio::time::timeout(handshake, acceptor.accept(conn)).await {
                        Ok(Ok(tls)) => {
                            let _ = tx.send((AdminIo::Tls(Box::new(tls)), addr)).await;
                        }
                        Ok(Err(e)) => tracing::warn!(peer = %addr, error = %e, "admin API TLS handshake refused"),
                        Err(_) => tracing::warn!(peer = %addr, "admin API TLS handshake timed out"),
                    }
                });
            }
        });
        Ok(Self { ready, local })
    }
}

impl axum::serve::Listener for AdminListener {
    type Io = AdminIo;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        match self.ready.recv().await {
            Some(c) => c,
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> io::Result<Self::Addr> {
        Ok(self.local)
    }
}

/// Who is on an admin connection: its address and client certificate (DER), if it sent one.
#[derive(Debug, Clone)]
pub struct Peer {
    /// The peer's address.
    pub addr: SocketAddr,
    /// Its client certificate.
    pub certificate: Option<Vec<u8>>,
}

impl axum::extract::connect_info::Connected<IncomingStream<'_, AdminListener>> for Peer {
    fn connect_info(stream: IncomingStream<'_, AdminListener>) -> Self {
        let certificate = match stream.io() {
            AdminIo::Plain(_) => None,
            AdminIo::Tls(t) => t.get_ref().1.peer_certificates().and_then(|c| c.first()).map(|c| c.to_vec()),
        };
        Peer { addr: *stream.remote_addr(), certificate }
    }
}

macro_rules! both {
    ($self:ident, $io:ident => $e:expr) => {
        match $self.get_mut() {
            AdminIo::Plain($io) => $e,
            AdminIo::Tls($io) => $e,
        }
    };
}

impl AsyncRead for AdminIo {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        both!(self, io => Pin::new(io).poll_read(cx, buf))
    }
}

impl AsyncWrite for AdminIo {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        both!(self, io => Pin::new(io).poll_write(cx, buf))
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        both!(self, io => Pin::new(io).poll_flush(cx))
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        both!(self, io => Pin::new(io).poll_shutdown(cx))
    }
}
