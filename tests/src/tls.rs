//! Certificates for the mutual-TLS scenarios, made by the real `dongbo-hub certs` commands: a CA,
//! the hub's certificate for `localhost`, and agent certificates on demand (also from another CA,
//! expired, or naming another agent).

use std::path::{Path, PathBuf};

use anyhow::{bail, Context};

/// A test CA and the hub's certificate, in a directory of the deployment.
#[derive(Debug, Clone)]
pub struct TestPki {
    /// Where everything is written.
    pub dir: PathBuf,
}

fn certs(args: &[&str]) -> anyhow::Result<()> {
    let out = std::process::Command::new(crate::procs::binary("dongbo-hub")?).arg("certs").args(args).output()?;
    if !out.status.success() {
        bail!("dongbo-hub certs {args:?} failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(())
}

impl TestPki {
    /// Makes the CA (`ca/`) and the hub's certificate (`hub.pem`) in `dir`.
    pub fn new(dir: &Path) -> anyhow::Result<Self> {
        let pki = Self { dir: dir.to_path_buf() };
        certs(&["ca", "--dir", &pki.path("ca")])?;
        pki.localhost_cert("hub", "hub", "hub").context("hub certificate")?;
        std::fs::write(pki.revoked_file(), "# revoked client certificates (SHA-256)\n")?;
        Ok(pki)
    }

    /// The hub's revocation list (`tls.revoked_file`), empty at first.
    pub fn revoked_file(&self) -> PathBuf {
        self.dir.join("revoked.txt")
    }

    /// The SHA-256 fingerprint of the certificate at `prefix`.pem, from `dongbo-hub certs fingerprint`.
    pub fn fingerprint(&self, prefix: &str) -> anyhow::Result<String> {
        let out = std::process::Command::new(crate::procs::binary("dongbo-hub")?)
            .args(["certs", "fingerprint", &format!("{prefix}.pem")])
            .output()?;
        if !out.status.success() {
            bail!("dongbo-hub certs fingerprint failed: {}", String::from_utf8_lossy(&out.stderr));
        }
        Ok(String::from_utf8(out.stdout)?.trim().to_string())
    }

    /// Issues a new hub certificate and moves it into place over `hub.pem` / `hub.key` (the
    /// certificate renamed last, so a reload never sees a new key with the old certificate for
    /// long); returns its fingerprint.
    pub fn rotate_hub(&self) -> anyhow::Result<String> {
        let next = self.localhost_cert("hub", "hub", "hub-next")?;
        let fingerprint = self.fingerprint(&next)?;
        std::fs::rename(format!("{next}.key"), self.dir.join("hub.key"))?;
        std::fs::rename(format!("{next}.pem"), self.dir.join("hub.pem"))?;
        Ok(fingerprint)
    }

    /// The fingerprint of the certificate the TLS server on localhost:`port` presents now.
    pub async fn served_fingerprint(&self, port: u16) -> anyhow::Result<String> {
        use rustls::pki_types::pem::PemObject;
        let mut roots = rustls::RootCertStore::empty();
        for c in rustls::pki_types::CertificateDer::pem_file_iter(self.dir.join("ca/ca.pem"))? {
            roots.add(c?)?;
        }
        let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
        let config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()?
            .with_root_certificates(roots)
            .with_no_client_auth();
        let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
        let name = rustls::pki_types::ServerName::try_from("localhost")?;
        let tls = tokio_rustls::TlsConnector::from(std::sync::Arc::new(config)).connect(name, tcp).await?;
        let der = tls.get_ref().1.peer_certificates().and_then(|c| c.first()).context("no certificate")?.to_vec();
        Ok(dongbo_hub::server_tls::fingerprint_hex(&der))
    }

    fn path(&self, name: &str) -> String {
        self.dir.join(name).to_string_lossy().into_owned()
    }

    /// Issues an agent certificate for `id` (signed by the CA in `ca`, default this PKI's) as
    /// `<name>.pem` / `<name>.key`; returns the path prefix.
    pub fn agent(&self, name: &str, id: &str, ca: Option<&str>, expired: bool) -> anyhow::Result<String> {
        self.issue("agent", name, id, ca, expired)
    }

    /// Issues an agent certificate for `id` valid for only `days` more days.
    pub fn agent_for_days(&self, name: &str, id: &str, days: u32) -> anyhow::Result<String> {
        let out = self.path(name);
        certs(&[
            "issue",
            "--ca-dir",
            &self.path("ca"),
            "--kind",
            "agent",
            "--id",
            id,
            "--out",
            &out,
            "--days",
            &days.to_string(),
        ])?;
        Ok(out)
    }

    /// Issues a server certificate for 127.0.0.1 and localhost (a Postgres server's) as
    /// `<name>.pem` / `<name>.key`; returns the path prefix.
    pub fn server(&self, name: &str) -> anyhow::Result<String> {
        self.localhost_cert("server", name, name)
    }

    /// Issues a `kind` certificate for `id`, naming localhost and 127.0.0.1, as `<name>.pem` /
    /// `<name>.key`; returns the path prefix.
    fn localhost_cert(&self, kind: &str, id: &str, name: &str) -> anyhow::Result<String> {
        let out = self.path(name);
        let ca = self.path("ca");
        certs(&[
            "issue",
            "--ca-dir",
            &ca,
            "--kind",
            kind,
            "--id",
            id,
            "--out",
            &out,
            "--host",
            "localhost",
            "--host",
            "127.0.0.1",
        ])?;
        Ok(out)
    }

    /// Issues a Postgres client certificate for role `role` as `<name>.pem` / `<name>.key`.
    pub fn pg_client(&self, name: &str, role: &str) -> anyhow::Result<String> {
        self.issue("client", name, role, None, false)
    }

    /// Issues an operator certificate for `id` as `<name>.pem` / `<name>.key`.
    pub fn operator(&self, name: &str, id: &str) -> anyhow::Result<String> {
        self.issue("operator", name, id, None, false)
    }

    /// An HTTPS client trusting this PKI's CA, presenting the certificate at `prefix` if given.
    pub fn https_client(&self, prefix: Option<&str>) -> anyhow::Result<reqwest::Client> {
        let ca = std::fs::read(self.dir.join("ca/ca.pem"))?;
        let mut b = reqwest::Client::builder().add_root_certificate(reqwest::Certificate::from_pem(&ca)?);
        if let Some(p) = prefix {
            let mut pem = std::fs::read(format!("{p}.pem"))?;
            pem.extend(std::fs::read(format!("{p}.key"))?);
            b = b.identity(reqwest::Identity::from_pem(&pem)?);
        }
        Ok(b.build()?)
    }

    /// Issues a subscriber certificate for `id` as `<name>.pem` / `<name>.key`.
    pub fn subscriber(&self, name: &str, id: &str) -> anyhow::Result<String> {
        self.issue("subscriber", name, id, None, false)
    }

    /// The TLS files of a subscriber whose certificate is at `prefix`.
    pub fn subscriber_files(&self, prefix: &str) -> dongbo_subscribers::grpc::TlsFiles {
        dongbo_subscribers::grpc::TlsFiles {
            ca_file: Some(self.dir.join("ca/ca.pem")),
            cert_file: Some(format!("{prefix}.pem").into()),
            key_file: Some(format!("{prefix}.key").into()),
        }
    }

    fn issue(&self, kind: &str, name: &str, id: &str, ca: Option<&str>, expired: bool) -> anyhow::Result<String> {
        let ca = ca.map_or_else(|| self.path("ca"), |c| self.path(c));
        let out = self.path(name);
        let mut args = vec!["issue", "--ca-dir", &ca, "--kind", kind, "--id", id, "--out", &out];
        if expired {
            args.push("--expired");
        }
        certs(&args)?;
        Ok(out)
    }

    /// Makes another CA, `name/`, that the hub does not trust.
    pub fn other_ca(&self, name: &str) -> anyhow::Result<()> {
        certs(&["ca", "--dir", &self.path(name), "--name", "someone else's CA"])
    }

    /// The hub's `[tls]` section.
    pub fn hub_toml(&self) -> String {
        format!(
            "[tls]\ncert_file = \"{}\"\nkey_file = \"{}\"\nclient_ca_file = \"{}\"\nrevoked_file = \"{}\"\n",
            self.path("hub.pem"),
            self.path("hub.key"),
            self.path("ca/ca.pem"),
            self.revoked_file().display()
        )
    }

    /// The agent's `[hub]` TLS fields for a certificate made for `source_id` (made if missing).
    pub fn agent_toml(&self, source_id: &str) -> String {
        let prefix = self.path(&format!("agent-{source_id}"));
        if !Path::new(&format!("{prefix}.pem")).exists() {
            if let Err(e) = self.agent(&format!("agent-{source_id}"), source_id, None, false) {
                return format!("# cannot issue the agent's certificate: {e}\n");
            }
        }
        self.link_toml(&prefix)
    }

    /// `[hub]` TLS fields naming the certificate at `prefix`.
    pub fn link_toml(&self, prefix: &str) -> String {
        format!("ca_file = \"{}\"\ncert_file = \"{prefix}.pem\"\nkey_file = \"{prefix}.key\"\n", self.path("ca/ca.pem"))
    }
}

/// Terminates TLS on 127.0.0.1:`port` with the certificate at `cert` (`.pem`/`.key`) and forwards
/// each connection's bytes to 127.0.0.1:`upstream`, until the task is aborted.
pub async fn terminate(port: u16, cert: &str, upstream: u16) -> anyhow::Result<tokio::task::JoinHandle<()>> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let chain = CertificateDer::pem_file_iter(format!("{cert}.pem"))?.collect::<Result<Vec<_>, _>>()?;
    let key = PrivateKeyDer::from_pem_file(format!("{cert}.key"))?;
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(chain, key)?;
    let acceptor = tokio_rustls::TlsAcceptor::from(std::sync::Arc::new(config));
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", port)).await?;
    Ok(tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(mut tls) = acceptor.accept(tcp).await else { return };
                let Ok(mut up) = tokio::net::TcpStream::connect(("127.0.0.1", upstream)).await else { return };
                let _ = tokio::io::copy_bidirectional(&mut tls, &mut up).await;
            });
        }
    }))
}
