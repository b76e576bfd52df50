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
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::mpsc;

use crate::listener::{Guarded, GuardedListener};
use crate::server_tls::{Listener, ServerTls, TlsIo};

/// Accepted connections waiting for axum; handshakes beyond this wait in their tasks.
const READY_QUEUE: usize = 64;

/// A connection of the admin API.
pub enum AdminIo {
    /// Clear text (demo).
    Plain(Guarded),
    /// HTTPS.
    Tls(Box<TlsIo>),
}

/// The admin listener: connections come out TLS-handshaken (or plain in a demo).
pub struct AdminListener {
    ready: mpsc::Receiver<(AdminIo, SocketAddr)>,
    local: SocketAddr,
}

impl AdminListener {
    /// Starts accepting on `guarded`, with TLS when `tls` is given.
    pub fn start(mut guarded: GuardedListener, tls: Option<Arc<ServerTls>>, handshake: Duration) -> io::Result<Self> {
        let local = guarded.local_addr()?;
        let (tx, ready) = mpsc::channel(READY_QUEUE);
        match tls {
            Some(tls) => {
                let mut handshaken = tls.incoming(guarded, Listener::Admin, handshake);
                tokio::spawn(async move {
                    while let Some((io, addr)) = handshaken.recv().await {
                        if tx.send((AdminIo::Tls(Box::new(io)), addr)).await.is_err() {
                            return;
                        }
                    }
                });
            }
            None => {
                tokio::spawn(async move {
                    loop {
                        let (conn, addr) = guarded.accept_guarded().await;
                        if tx.send((AdminIo::Plain(conn), addr)).await.is_err() {
                            return;
                        }
                    }
                });
            }
        }
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
            AdminIo::Tls(t) => t.peer_certificate(),
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
