//! A real Kafka-API broker for tests: `tansu`, installed by `deploy/install-deps.sh`.
//!
//! It keeps messages in a SQLite file (the `libsql` feature we install it with; its `memory://`
//! engine needs a feature that build lacks), so every acknowledged message survives a `kill -9`.
//!
//! A secure broker ([`Broker::start_secure`]) requires SASL/SCRAM-SHA-512, which tansu checks
//! itself, and is reached only over TLS: tansu 0.6 parses `--cert`/`--key` but never wraps a
//! connection in TLS, so the harness terminates TLS in front of it ([`crate::tls::terminate`]), as
//! a load balancer in front of brokers does, and tansu advertises the TLS address.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

use crate::pg::free_port;

/// A running `tansu broker`; killed on drop.
pub struct Broker {
    child: Option<Child>,
    /// Its port on 127.0.0.1.
    pub port: u16,
    db: PathBuf,
    log: PathBuf,
    /// The TLS port clients use and the broker advertises, for a secure broker.
    tls_port: Option<u16>,
    /// Whether clients must authenticate with SASL.
    authentication: bool,
    proxy: Option<tokio::task::JoinHandle<()>>,
}

/// The SASL user of a secure broker's clients, and its password.
pub const SASL_USER: (&str, &str) = ("dongbo", "kafka-test-secret");

/// The `tansu` binary: on PATH or in `~/.cargo/bin`.
pub fn tansu_binary() -> anyhow::Result<PathBuf> {
    let on_path = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).map(|d| d.join("tansu")).find(|c| c.is_file()))
        .unwrap_or_default();
    let home = std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cargo/bin/tansu"));
    on_path
        .or(home.filter(|h| h.is_file()))
        .context("tansu is not installed: run deploy/install-deps.sh (cargo install tansu --locked --features libsql)")
}

impl Broker {
    /// Starts a broker on a free port, keeping messages in `dir/tansu.db` and logging to `dir/tansu.log`.
    pub async fn start(dir: &Path) -> anyhow::Result<Self> {
        let mut b = Self {
            child: None,
            port: free_port(),
            db: dir.join("tansu.db"),
            log: dir.join("tansu.log"),
            tls_port: None,
            authentication: false,
            proxy: None,
        };
        b.spawn().await?;
        Ok(b)
    }

    /// Starts a broker that takes only SASL/SCRAM-SHA-512 clients ([`SASL_USER`]) over TLS, with a
    /// server certificate for `localhost` from `pki`.
    pub async fn start_secure(dir: &Path, pki: &crate::tls::TestPki) -> anyhow::Result<Self> {
        let mut b = Self::start(dir).await?;
        // tansu refuses unauthenticated requests once --authentication is on, user creation too.
        let out = Command::new(tansu_binary()?)
            .args(["user", "create", "--broker", &format!("tcp://127.0.0.1:{}", b.port), "--mechanism", "scram512"])
            .args([SASL_USER.0, SASL_USER.1])
            .output()?;
        if !out.status.success() {
            bail!("tansu user create failed: {}", String::from_utf8_lossy(&out.stderr));
        }
        let cert = pki.server("kafka")?;
        let tls_port = free_port();
        b.proxy = Some(crate::tls::terminate(tls_port, &cert, b.port).await?);
        b.tls_port = Some(tls_port);
        b.authentication = true;
        b.restart().await?;
        Ok(b)
    }

    /// `host:port` for clients.
    pub fn brokers(&self) -> String {
        match self.tls_port {
            Some(p) => format!("localhost:{p}"),
            None => format!("127.0.0.1:{}", self.port),
        }
    }

    /// The `[kafka.tls]` and `[kafka.sasl]` tables for a client of this secure broker; the SASL
    /// password is written to `dir/kafka.password`.
    pub fn client_security_toml(&self, pki: &crate::tls::TestPki, dir: &Path) -> anyhow::Result<String> {
        let pw = dir.join("kafka.password");
        std::fs::write(&pw, SASL_USER.1)?;
        Ok(format!(
            "\n[kafka.tls]\nca_file = \"{}\"\n\n[kafka.sasl]\nmechanism = \"SCRAM-SHA-512\"\nusername = \"{}\"\npassword_file = \"{}\"\n",
            pki.dir.join("ca/ca.pem").display(),
            SASL_USER.0,
            pw.display()
        ))
    }

    async fn spawn(&mut self) -> anyhow::Result<()> {
        // tansu reads the URL's path as relative to its working directory.
        let dir = self.db.parent().context("database path has no directory")?;
        let name = self.db.file_name().context("database path has no file name")?.to_string_lossy();
        let engine = format!("sqlite://{name}");
        let url = format!("tcp://127.0.0.1:{}", self.port);
        let advertised = match self.tls_port {
            Some(p) => format!("tcp://localhost:{p}"),
            None => url.clone(),
        };
        let out = std::fs::OpenOptions::new().create(true).append(true).open(&self.log)?;
        let mut command = Command::new(tansu_binary()?);
        command.args([
            "broker",
            "--listener-url",
            &url,
            "--advertised-listener-url",
            &advertised,
            "--storage-engine",
            &engine,
        ]);
        if self.authentication {
            command.arg("--authentication");
        }
        let child = command
            .env("RUST_LOG", "warn")
            .current_dir(dir)
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out)
            .spawn()
            .context("spawn tansu")?;
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(20);
        while tokio::net::TcpStream::connect(("127.0.0.1", self.port)).await.is_err() {
            let exited = self.child.as_mut().is_some_and(|c| c.try_wait().ok().flatten().is_some());
            if Instant::now() > deadline || exited {
                bail!("tansu did not listen on {url}:\n{}", std::fs::read_to_string(&self.log).unwrap_or_default());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Ok(())
    }

    /// `kill -9` the broker.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts the broker again on the same port and storage.
    pub async fn restart(&mut self) -> anyhow::Result<()> {
        self.kill9();
        self.spawn().await
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        if let Some(p) = self.proxy.take() {
            p.abort();
        }
        self.kill9();
    }
}
