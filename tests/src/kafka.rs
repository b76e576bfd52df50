//! A real Kafka-API broker for tests: `tansu`, installed by `deploy/install-deps.sh`.
//!
//! It keeps messages in a SQLite file (the `libsql` feature we install it with; its `memory://`
//! engine needs a feature that build lacks), so every acknowledged message survives a `kill -9`.

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
}

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
        let mut b = Self { child: None, port: free_port(), db: dir.join("tansu.db"), log: dir.join("tansu.log") };
        b.spawn().await?;
        Ok(b)
    }

    /// `host:port` for clients.
    pub fn brokers(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    async fn spawn(&mut self) -> anyhow::Result<()> {
        // tansu reads the URL's path as relative to its working directory.
        let dir = self.db.parent().context("database path has no directory")?;
        let name = self.db.file_name().context("database path has no file name")?.to_string_lossy();
        let engine = format!("sqlite://{name}");
        let url = format!("tcp://127.0.0.1:{}", self.port);
        let out = std::fs::OpenOptions::new().create(true).append(true).open(&self.log)?;
        let child = Command::new(tansu_binary()?)
            .args(["broker", "--listener-url", &url, "--advertised-listener-url", &url, "--storage-engine", &engine])
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
        self.kill9();
    }
}
