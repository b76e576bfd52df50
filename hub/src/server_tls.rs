//! The hub's TLS server side, shared by the gRPC and the admin listener, reloaded without a restart.
//!
//! Contract:
//! - The `[tls]` files (`cert_file`, `key_file`, `client_ca_file`) and `revoked_file` are read at
//!   start; a start with files that do not load fails.
//! - They are read again on SIGHUP and when any of them changes (checked every [`WATCH_EVERY`]). A
//!   reload that fails (a half-written key, a CA that does not parse) keeps the settings in force
//!   and logs why: a mistake while rotating never takes the listeners down.
//! - New handshakes use the newest settings; open connections keep the session they have, except:
//! - A client certificate whose SHA-256 fingerprint is in `revoked_file` is refused at the
//!   handshake, and every open connection that presented it is cut as soon as a list naming it is
//!   loaded. The list is one fingerprint per line (64 hex digits, `:` allowed), `#` comments; a line
//!   that does not parse is logged and skipped, the others take effect.
//! - Refusals are logged with the peer address and the reason, never with key material.

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::path::Path;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::task::{Context, Poll};
use std::time::Duration;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{CertificateError, DigitallySignedStruct, DistinguishedName, SignatureScheme};
use sha2::{Digest, Sha256};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::{mpsc, watch};
use tokio_util::sync::{CancellationToken, WaitForCancellationFutureOwned};
use tracing::{info, warn};

use crate::config::{AuthMode, TlsConfig};
use crate::listener::{Guarded, GuardedListener};

/// How often the files are checked for changes.
pub const WATCH_EVERY: Duration = Duration::from_secs(2);

/// A certificate's SHA-256 fingerprint.
pub type Fingerprint = [u8; 32];

/// The SHA-256 fingerprint of a DER certificate, as `revoked_file` lists it (lowercase hex).
pub fn fingerprint_hex(der: &[u8]) -> String {
    hex::encode(Sha256::digest(der))
}

/// Which listener a handshake is for: they differ in ALPN and in whether a certificate is needed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Listener {
    /// Agents and subscribers (HTTP/2).
    Grpc,
    /// Operators (HTTP/1.1; a browser may come with a token alone).
    Admin,
}

/// The settings in force: one rustls config per listener.
struct Loaded {
    grpc: Arc<rustls::ServerConfig>,
    admin: Arc<rustls::ServerConfig>,
}

/// Open connections that presented a client certificate, so a revocation can cut them.
#[derive(Default)]
struct OpenConnections {
    next: AtomicU64,
    by_id: Mutex<HashMap<u64, (Fingerprint, SocketAddr, CancellationToken)>>,
}

/// The hub's TLS server state, shared by both listeners.
pub struct ServerTls {
    config: TlsConfig,
    loaded: RwLock<Loaded>,
    revoked: Arc<RwLock<HashSet<Fingerprint>>>,
    open: Arc<OpenConnections>,
}

impl ServerTls {
    /// Loads `[tls]`; fails if a file does not load.
    pub fn load(config: &TlsConfig) -> Result<Arc<Self>, String> {
        let revoked = Arc::new(RwLock::new(read_revoked(config.revoked_file.as_deref())?));
        let loaded = build(config, &revoked)?;
        log_expiry(&config.cert_file);
        Ok(Arc::new(Self { config: config.clone(), loaded: RwLock::new(loaded), revoked, open: Arc::default() }))
    }

    fn files(&self) -> Vec<std::path::PathBuf> {
        let t = &self.config;
        let mut f = vec![t.cert_file.clone(), t.key_file.clone(), t.client_ca_file.clone()];
        f.extend(t.revoked_file.clone());
        f
    }

    /// Reads every file again; on success the new settings and revocations are in force and the
    /// connections of newly revoked certificates are cut. On failure nothing changes.
    pub fn reload(&self) -> Result<(), String> {
        let revoked = read_revoked(self.config.revoked_file.as_deref())?;
        let loaded = build(&self.config, &Arc::new(RwLock::new(revoked.clone())))?;
        *self.revoked.write().unwrap_or_else(|p| p.into_inner()) = revoked.clone();
        // The verifiers of `loaded` hold their own copy; swap them in after the shared set so no
        // handshake sees an older list than the one just read.
        let fresh = Loaded { grpc: loaded.grpc, admin: loaded.admin };
        *self.loaded.write().unwrap_or_else(|p| p.into_inner()) = fresh;
        let open = self.open.by_id.lock().unwrap_or_else(|p| p.into_inner());
        let mut cut = 0;
        for (fingerprint, addr, token) in open.values() {
            if revoked.contains(fingerprint) && !token.is_cancelled() {
                warn!(peer = %addr, fingerprint = %hex::encode(fingerprint), "connection cut: its client certificate is revoked");
                token.cancel();
                cut += 1;
            }
        }
        info!(revoked = revoked.len(), connections_cut = cut, "TLS certificates and revocation list reloaded");
        log_expiry(&self.config.cert_file);
        Ok(())
    }

    /// Reloads on SIGHUP and when a file changes, until `stop` turns true.
    pub fn watch(self: &Arc<Self>, mut stop: watch::Receiver<bool>) {
        let me = self.clone();
        tokio::spawn(async move {
            let mut hangup = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) {
                Ok(s) => Some(s),
                Err(e) => {
                    warn!(error = %e, "cannot listen for SIGHUP: TLS files are reloaded when they change only");
                    None
                }
            };
            let mut tick = tokio::time::interval(WATCH_EVERY);
            let mut stamps = dongbo_connectors::tls::FileStamps::new(me.files());
            loop {
                let why = tokio::select! {
                    _ = stop.wait_for(|s| *s) => return,
                    Some(()) = async { match hangup.as_mut() { Some(h) => h.recv().await, None => None } } => "SIGHUP",
                    _ = tick.tick() => {
                        if !stamps.changed() {
                            continue;
                        }
                        "a TLS file changed"
                    }
                };
                if let Err(e) = me.reload() {
                    warn!(trigger = why, error = %e, "TLS reload failed: the previous certificates and revocation list stay in force");
                }
            }
        });
    }

    /// Whether `fingerprint` is revoked now.
    pub fn is_revoked(&self, fingerprint: &Fingerprint) -> bool {
        self.revoked.read().unwrap_or_else(|p| p.into_inner()).contains(fingerprint)
    }

    /// An acceptor with the settings in force, for one handshake on `listener`.
    pub fn acceptor(&self, listener: Listener) -> tokio_rustls::TlsAcceptor {
        let loaded = self.loaded.read().unwrap_or_else(|p| p.into_inner());
        tokio_rustls::TlsAcceptor::from(match listener {
            Listener::Grpc => loaded.grpc.clone(),
            Listener::Admin => loaded.admin.clone(),
        })
    }

    /// Starts handshaking the connections of `guarded`, each in its own task under `handshake`;
    /// the finished ones come out of the returned channel, registered for revocation.
    pub fn incoming(
        self: &Arc<Self>,
        mut guarded: GuardedListener,
        listener: Listener,
        handshake: Duration,
    ) -> mpsc::Receiver<(TlsIo, SocketAddr)> {
        let (tx, rx) = mpsc::channel(64);
        let me = self.clone();
        tokio::spawn(async move {
            loop {
                let (conn, addr) = guarded.accept_guarded().await;
                if tx.is_closed() {
                    return;
                }
                let (me, tx) = (me.clone(), tx.clone());
                tokio::spawn(async move {
                    let acceptor = me.acceptor(listener);
                    match tokio::time::timeout(handshake, acceptor.accept(conn)).await {
                        Ok(Ok(tls)) => {
                            let _ = tx.send((me.register(tls, addr), addr)).await;
                        }
                        Ok(Err(e)) => warn!(peer = %addr, ?listener, reason = %e, "TLS handshake refused"),
                        Err(_) => {
                            warn!(peer = %addr, ?listener, reason = "no handshake within limits.handshake_timeout_ms", "TLS handshake refused")
                        }
                    }
                });
            }
        });
        rx
    }

    fn register(&self, tls: tokio_rustls::server::TlsStream<Guarded>, addr: SocketAddr) -> TlsIo {
        let fingerprint = tls.get_ref().1.peer_certificates().and_then(|c| c.first()).map(|c| fingerprint(c));
        let token = CancellationToken::new();
        let id = self.open.next.fetch_add(1, Ordering::Relaxed);
        if let Some(f) = fingerprint {
            self.open.by_id.lock().unwrap_or_else(|p| p.into_inner()).insert(id, (f, addr, token.clone()));
            // Revoked between the handshake and now: cut at once.
            if self.is_revoked(&f) {
                token.cancel();
            }
        }
        TlsIo { inner: Box::new(tls), cut: Box::pin(token.cancelled_owned()), id, open: self.open.clone() }
    }
}

/// Warns when the hub's own certificate has expired or expires within 30 days, and exports when
/// it expires (`dongbo_tls_certificate_expiry_timestamp_seconds`).
fn log_expiry(cert_file: &Path) {
    use dongbo_connectors::tls::{certificate_validity, EXPIRY_WARNING_DAYS};
    let validity = certificate_validity(cert_file);
    if let Ok(v) = &validity {
        crate::metrics::hub().certificate_expires(v.not_after_s);
    }
    match validity {
        Ok(v) if v.days_left < 0 => {
            tracing::error!(not_after = %v.not_after, "the hub's TLS certificate has expired: agents and subscribers will refuse it")
        }
        Ok(v) if v.days_left < EXPIRY_WARNING_DAYS => {
            warn!(days_left = v.days_left, not_after = %v.not_after, "the hub's TLS certificate expires soon: renew it")
        }
        Ok(_) => {}
        Err(e) => warn!(error = %e, "cannot read the hub's TLS certificate's validity"),
    }
}

fn fingerprint(der: &[u8]) -> Fingerprint {
    Sha256::digest(der).into()
}

/// Parses a revocation list; a missing `path` is an empty list, a missing file an error.
fn read_revoked(path: Option<&Path>) -> Result<HashSet<Fingerprint>, String> {
    let Some(path) = path else { return Ok(HashSet::new()) };
    let text = std::fs::read_to_string(path).map_err(|e| format!("revocation list {}: {e}", path.display()))?;
    Ok(parse_revoked(&text, path))
}

fn parse_revoked(text: &str, path: &Path) -> HashSet<Fingerprint> {
    let mut set = HashSet::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.split('#').next().unwrap_or_default().trim();
        if line.is_empty() {
            continue;
        }
        let digits: String = line.chars().filter(|c| *c != ':').collect();
        match hex::decode(&digits).ok().and_then(|b| Fingerprint::try_from(b).ok()) {
            Some(f) => {
                set.insert(f);
            }
            None => warn!(
                file = %path.display(),
                line = n + 1,
                "revocation list line is not a SHA-256 fingerprint (64 hex digits): skipped"
            ),
        }
    }
    set
}

fn build(t: &TlsConfig, revoked: &Arc<RwLock<HashSet<Fingerprint>>>) -> Result<Loaded, String> {
    let err = |what: &Path, e: &dyn std::fmt::Display| format!("TLS: {}: {e}", what.display());
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&t.cert_file)
        .and_then(|i| i.collect::<Result<_, _>>())
        .map_err(|e| err(&t.cert_file, &e))?;
    let key = PrivateKeyDer::from_pem_file(&t.key_file).map_err(|e| err(&t.key_file, &e))?;
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_file_iter(&t.client_ca_file).map_err(|e| err(&t.client_ca_file, &e))? {
        roots.add(c.map_err(|e| err(&t.client_ca_file, &e))?).map_err(|e| err(&t.client_ca_file, &e))?;
    }
    let roots = Arc::new(roots);
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let make = |optional: bool, alpn: &[u8]| -> Result<Arc<rustls::ServerConfig>, String> {
        let builder = rustls::server::WebPkiClientVerifier::builder_with_provider(roots.clone(), provider.clone());
        let builder = if optional { builder.allow_unauthenticated() } else { builder };
        let webpki = builder.build().map_err(|e| err(&t.client_ca_file, &e))?;
        let verifier = Arc::new(Revocations { inner: webpki, revoked: revoked.clone() });
        let mut c = rustls::ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(|e| format!("TLS protocol versions: {e}"))?
            .with_client_cert_verifier(verifier)
            .with_single_cert(certs.clone(), key.clone_key())
            .map_err(|e| format!("TLS: {} and {}: {e}", t.cert_file.display(), t.key_file.display()))?;
        c.alpn_protocols = vec![alpn.to_vec()];
        Ok(Arc::new(c))
    };
    Ok(Loaded { grpc: make(t.mode == AuthMode::Token, b"h2")?, admin: make(true, b"http/1.1")? })
}

/// The CA check, then the revocation list.
#[derive(Debug)]
struct Revocations {
    inner: Arc<dyn ClientCertVerifier>,
    revoked: Arc<RwLock<HashSet<Fingerprint>>>,
}

impl ClientCertVerifier for Revocations {
    fn offer_client_auth(&self) -> bool {
        self.inner.offer_client_auth()
    }
    fn client_auth_mandatory(&self) -> bool {
        self.inner.client_auth_mandatory()
    }
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.inner.root_hint_subjects()
    }
    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        if self.revoked.read().unwrap_or_else(|p| p.into_inner()).contains(&fingerprint(end_entity)) {
            return Err(rustls::Error::InvalidCertificate(CertificateError::Revoked));
        }
        self.inner.verify_client_cert(end_entity, intermediates, now)
    }
    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }
    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// A TLS connection that a revocation can cut: reads and writes fail once its certificate is
/// revoked, which makes the HTTP server close it.
pub struct TlsIo {
    inner: Box<tokio_rustls::server::TlsStream<Guarded>>,
    cut: Pin<Box<WaitForCancellationFutureOwned>>,
    id: u64,
    open: Arc<OpenConnections>,
}

impl TlsIo {
    /// The client's certificate (DER), if it presented one.
    pub fn peer_certificate(&self) -> Option<Vec<u8>> {
        self.inner.get_ref().1.peer_certificates().and_then(|c| c.first()).map(|c| c.to_vec())
    }

    fn check(&mut self, cx: &mut Context<'_>) -> io::Result<()> {
        match self.cut.as_mut().poll(cx) {
            Poll::Ready(()) => Err(io::Error::new(io::ErrorKind::ConnectionAborted, "client certificate revoked")),
            Poll::Pending => Ok(()),
        }
    }
}

impl Drop for TlsIo {
    fn drop(&mut self) {
        self.open.by_id.lock().unwrap_or_else(|p| p.into_inner()).remove(&self.id);
    }
}

impl AsyncRead for TlsIo {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        self.check(cx)?;
        Pin::new(&mut *self.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for TlsIo {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        self.check(cx)?;
        Pin::new(&mut *self.inner).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.inner).poll_shutdown(cx)
    }
}

impl tonic::transport::server::Connected for TlsIo {
    type ConnectInfo = <tokio_rustls::server::TlsStream<Guarded> as tonic::transport::server::Connected>::ConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.inner.connect_info()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_hub_certificate_expiry_is_exported() {
        let mut params = rcgen::CertificateParams::new(vec!["hub.test".to_string()]).expect("params");
        params.not_after = rcgen::date_time_ymd(2031, 3, 4);
        let key = rcgen::KeyPair::generate().expect("key");
        let cert = params.self_signed(&key).expect("certificate");
        let dir = std::env::temp_dir().join(format!("dongbo-expiry-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let file = dir.join("hub.pem");
        std::fs::write(&file, cert.pem()).expect("write");
        log_expiry(&file);
        let text = crate::metrics::hub().encode();
        // 2031-03-04T00:00:00Z
        assert!(
            text.contains(
                "dongbo_tls_certificate_expiry_timestamp_seconds{certificate=\"hub\",source_id=\"\"} 1930348800"
            ),
            "{text}"
        );
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn a_revocation_list_takes_fingerprints_with_or_without_colons_and_skips_bad_lines() {
        let a = "ab".repeat(32);
        let b: String =
            "cd".repeat(32).as_bytes().chunks(2).map(|c| std::str::from_utf8(c).unwrap()).collect::<Vec<_>>().join(":");
        let text = format!(
            "# revoked 2026-12-01\n{a}\n\n{} # lost laptop\nnot-a-fingerprint\n{}\n",
            b.to_uppercase(),
            "ab".repeat(31)
        );
        let set = parse_revoked(&text, Path::new("revoked.txt"));
        assert_eq!(set.len(), 2);
        assert!(set.contains(&[0xab; 32]) && set.contains(&[0xcd; 32]));
    }
}
