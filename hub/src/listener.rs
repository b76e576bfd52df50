//! Accepting connections within limits, for the gRPC and the admin listeners alike.
//!
//! A stranger needs no token to open TCP connections, so what each costs is bounded before any
//! authentication: at most `max_connections` are open per listener (one more is closed at once,
//! with a warning at most every few seconds), a connection must send its first bytes within the
//! handshake timeout, and one that sends nothing for the idle timeout is closed. Only bytes
//! *received* count as activity: the gRPC server pings its HTTP/2 peers (see [`keepalive`]), so a
//! live agent or subscriber always answers within the idle timeout, while a silent socket does not.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Sleep;
use tracing::warn;

use crate::config::LimitsConfig;

/// Refused connections are reported at most this often: a flood must not flood the log too.
const WARN_EVERY: Duration = Duration::from_secs(5);

/// The HTTP/2 ping interval that keeps live peers inside the idle timeout (a third of it).
pub fn keepalive(limits: &LimitsConfig) -> Duration {
    Duration::from_millis(limits.idle_timeout_ms / 3)
}

/// A TCP listener that hands out only [`Guarded`] connections, within the limits.
pub struct GuardedListener {
    listener: TcpListener,
    permits: Arc<Semaphore>,
    max: usize,
    handshake: Duration,
    idle: Duration,
    name: &'static str,
    last_warning: Option<Instant>,
}

impl GuardedListener {
    /// Guards `listener` (named `name` in logs) with `limits`.
    pub fn new(listener: TcpListener, limits: &LimitsConfig, name: &'static str) -> Self {
        Self {
            listener,
            permits: Arc::new(Semaphore::new(limits.max_connections)),
            max: limits.max_connections,
            handshake: Duration::from_millis(limits.handshake_timeout_ms),
            idle: Duration::from_millis(limits.idle_timeout_ms),
            name,
            last_warning: None,
        }
    }

    /// The next connection within the cap; over it, connections are closed as they come.
    pub async fn accept_guarded(&mut self) -> (Guarded, SocketAddr) {
        loop {
            let (stream, addr) = match self.listener.accept().await {
                Ok(c) => c,
                Err(e) => {
                    // Out of file descriptors, say: wait instead of spinning.
                    self.warn(None, format_args!("accept failed: {e}"));
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let Ok(permit) = self.permits.clone().try_acquire_owned() else {
                drop(stream);
                let max = self.max;
                self.warn(
                    Some(addr),
                    format_args!("{max} connections open (limits.max_connections); closing new ones"),
                );
                continue;
            };
            let _ = stream.set_nodelay(true);
            let deadline = Box::pin(tokio::time::sleep(self.handshake));
            return (Guarded { inner: stream, _permit: permit, deadline, idle: self.idle }, addr);
        }
    }

    /// Logs a refused connection (`peer`) or a failed accept, at most once per [`WARN_EVERY`]: a
    /// flood must not fill the disk with the same line.
    fn warn(&mut self, peer: Option<SocketAddr>, reason: std::fmt::Arguments<'_>) {
        if self.last_warning.is_none_or(|t| t.elapsed() > WARN_EVERY) {
            self.last_warning = Some(Instant::now());
            match peer {
                Some(peer) => warn!(listener = self.name, %peer, %reason, "connection refused"),
                None => warn!(listener = self.name, %reason, "connection not accepted"),
            }
        }
    }

    /// The address it listens on.
    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// The connections as a stream, for `tonic`'s `serve_with_incoming`.
    pub fn into_stream(self) -> impl futures::Stream<Item = io::Result<Guarded>> {
        futures::stream::unfold(self, |mut l| async move {
            let (conn, _) = l.accept_guarded().await;
            Some((Ok(conn), l))
        })
    }
}

/// A connection holding its place under the cap, closed when silent past its deadline.
pub struct Guarded {
    inner: TcpStream,
    _permit: OwnedSemaphorePermit,
    /// Until the first bytes: the handshake deadline; then the idle deadline, pushed on by reads.
    deadline: Pin<Box<Sleep>>,
    idle: Duration,
}

impl AsyncRead for Guarded {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        match Pin::new(&mut self.inner).poll_read(cx, buf) {
            Poll::Ready(r) => {
                if buf.filled().len() > before {
                    let next = tokio::time::Instant::now() + self.idle;
                    self.deadline.as_mut().reset(next);
                }
                Poll::Ready(r)
            }
            Poll::Pending => match self.deadline.as_mut().poll(cx) {
                Poll::Ready(()) => Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "the peer sent nothing within the handshake or idle timeout",
                ))),
                Poll::Pending => Poll::Pending,
            },
        }
    }
}

impl AsyncWrite for Guarded {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

impl tonic::transport::server::Connected for Guarded {
    type ConnectInfo = tonic::transport::server::TcpConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.inner.connect_info()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    fn limits(max: usize) -> LimitsConfig {
        LimitsConfig { max_connections: max, handshake_timeout_ms: 200, idle_timeout_ms: 3_000, ..Default::default() }
    }

    #[tokio::test]
    async fn silent_peers_are_dropped_and_the_cap_holds() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let mut guarded = GuardedListener::new(listener, &limits(2), "test");
        let (tx, mut results) = tokio::sync::mpsc::unbounded_channel();
        tokio::spawn(async move {
            loop {
                let (mut c, _) = guarded.accept_guarded().await;
                let tx = tx.clone();
                tokio::spawn(async move {
                    let mut buf = [0u8; 4];
                    let start = Instant::now();
                    let r = c.read(&mut buf).await.map_err(|e| e.kind());
                    let _ = tx.send((r, start.elapsed()));
                    // Keep the place under the cap a while.
                    tokio::time::sleep(Duration::from_secs(2)).await;
                });
            }
        });
        let mut talker = TcpStream::connect(addr).await.unwrap();
        talker.write_all(b"ping").await.unwrap();
        assert_eq!(results.recv().await.unwrap().0, Ok(4), "the talker was read");
        let _silent = TcpStream::connect(addr).await.unwrap();
        // A third is over the cap while the first two are open: closed without a byte.
        tokio::time::sleep(Duration::from_millis(50)).await;
        let mut third = TcpStream::connect(addr).await.unwrap();
        let mut buf = [0u8; 1];
        let closed = tokio::time::timeout(Duration::from_secs(1), third.read(&mut buf)).await;
        assert!(matches!(closed, Ok(Ok(0)) | Ok(Err(_))), "{closed:?}");
        let (silent, waited) = results.recv().await.unwrap();
        assert_eq!(silent, Err(io::ErrorKind::TimedOut), "the silent one timed out");
        assert!(waited >= Duration::from_millis(200) && waited < Duration::from_secs(2), "{waited:?}");
    }
}
