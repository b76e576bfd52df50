//! Throw-away PostgreSQL clusters made with `initdb`, with `wal_level = logical`, listening on
//! 127.0.0.1 with SCRAM passwords (so agents authenticate as they would in a province) and on a private
//! Unix socket with trust (for the test's own set-up queries). A TLS cluster
//! ([`PgCluster::start_tls`]) refuses clear text over TCP and asks the `ndc` database's clients for
//! a certificate, so a test proves every dongbo connection to it is encrypted.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context};
use tokio_postgres::{Client, NoTls};

/// Role agents and the hub log in as; it may replicate.
pub const ROLE: &str = "dongbo";
/// Its password (test clusters only).
pub const PASSWORD: &str = "dongbo-test-secret";

/// A running cluster, stopped and removed on drop.
pub struct PgCluster {
    /// TCP port on 127.0.0.1.
    pub port: u16,
    /// Cluster directory (data, socket, log).
    pub dir: PathBuf,
    /// Whether TCP clients must use TLS.
    pub tls: bool,
    bin: PathBuf,
}

fn is_root() -> bool {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata("/proc/self").map(|m| m.uid() == 0).unwrap_or(false)
}

/// Where the Postgres server binaries are: `PG_BIN`, the directory of `initdb` on PATH, or the newest
/// `/usr/lib/postgresql/*/bin`.
pub fn bin_dir() -> anyhow::Result<PathBuf> {
    if let Ok(dir) = std::env::var("PG_BIN") {
        return Ok(PathBuf::from(dir));
    }
    let mut versions: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .map(|rd| {
            rd.filter_map(|e| e.ok()).map(|e| e.path().join("bin")).filter(|p| p.join("initdb").exists()).collect()
        })
        .unwrap_or_default();
    versions.sort();
    versions
        .pop()
        .context("no PostgreSQL server binaries: install postgresql (run ./deploy/install-deps.sh) or set PG_BIN")
}

fn run(bin: &Path, tool: &str, args: &[&str]) -> anyhow::Result<()> {
    let exe = bin.join(tool);
    let mut cmd = if is_root() {
        let mut c = Command::new("runuser");
        c.args(["-u", "postgres", "--"]).arg(&exe);
        c
    } else {
        Command::new(&exe)
    };
    let out = cmd.args(args).output().with_context(|| format!("cannot run {}", exe.display()))?;
    if !out.status.success() {
        bail!("{tool} failed: {}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    }
    Ok(())
}

/// A free TCP port on 127.0.0.1.
///
/// Picked at random below Linux's ephemeral range (32768 and up): a port the kernel hands out for
/// `bind(0)` is one it also hands to outgoing connections, so between this call and the server's
/// own bind a test's client connection could take it ("Address already in use"). A port is never
/// handed out twice by one process.
pub fn free_port() -> u16 {
    use std::sync::Mutex;
    static GIVEN: Mutex<Vec<u16>> = Mutex::new(Vec::new());
    let mut given = GIVEN.lock().unwrap_or_else(|e| e.into_inner());
    for _ in 0..1000 {
        let port = 20_000 + (rand::random::<u16>() % 12_000);
        if given.contains(&port) {
            continue;
        }
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            given.push(port);
            return port;
        }
    }
    std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).map(|a| a.port()).unwrap_or(0)
}

impl PgCluster {
    /// Creates and starts a cluster named `name`.
    pub fn start(name: &str) -> anyhow::Result<Self> {
        Self::start_with(name, None)
    }

    /// Creates and starts a cluster named `name` with `ssl = on` and a server certificate for
    /// 127.0.0.1 and localhost from `pki`: clear-text TCP is refused, and clients of the `ndc`
    /// database must also present a certificate signed by `pki`'s CA.
    pub fn start_tls(name: &str, pki: &crate::tls::TestPki) -> anyhow::Result<Self> {
        Self::start_with(name, Some(pki))
    }

    fn start_with(name: &str, pki: Option<&crate::tls::TestPki>) -> anyhow::Result<Self> {
        let bin = bin_dir()?;
        let dir =
            std::env::temp_dir().join(format!("dongbo-pg-{name}-{}-{}", std::process::id(), rand::random::<u32>()));
        std::fs::create_dir_all(&dir)?;
        if is_root() {
            let ok = Command::new("chown").args(["-R", "postgres:postgres"]).arg(&dir).status()?.success();
            if !ok {
                bail!(
                    "cannot chown {} to postgres: is the postgres user there? (./deploy/install-deps.sh creates it)",
                    dir.display()
                );
            }
        }
        let data = dir.join("data");
        let data_s = data.to_string_lossy().to_string();
        let pwfile = dir.join("pw");
        std::fs::write(&pwfile, PASSWORD)?;
        if is_root() {
            Command::new("chown").args(["postgres:postgres"]).arg(&pwfile).status()?;
        }
        run(
            &bin,
            "initdb",
            &[
                "-D",
                &data_s,
                "-U",
                "postgres",
                "-E",
                "UTF8",
                "--no-locale",
                "--auth-local=trust",
                "--auth-host=scram-sha-256",
                "--pwfile",
                &pwfile.to_string_lossy(),
            ],
        )?;
        let port = free_port();
        let conf = format!(
            "\nport = {port}\nlisten_addresses = '127.0.0.1'\nunix_socket_directories = '{}'\nwal_level = logical\n\
             max_replication_slots = 20\nmax_wal_senders = 20\nshared_buffers = 128MB\nmax_connections = 100\n\
             wal_sender_timeout = 60s\nlog_min_messages = warning\n",
            dir.display()
        );
        let conf_path = data.join("postgresql.conf");
        let mut text = std::fs::read_to_string(&conf_path)?;
        text.push_str(&conf);
        if let Some(pki) = pki {
            let server = pki.server(&format!("pg-{name}"))?;
            for ext in ["pem", "key"] {
                let to = data.join(format!("server.{ext}"));
                std::fs::copy(format!("{server}.{ext}"), &to)?;
                if is_root() {
                    Command::new("chown").args(["postgres:postgres"]).arg(&to).status()?;
                }
            }
            std::fs::copy(pki.dir.join("ca/ca.pem"), data.join("ca.pem"))?;
            text.push_str(
                "ssl = on\nssl_cert_file = 'server.pem'\nssl_key_file = 'server.key'\nssl_ca_file = 'ca.pem'\n",
            );
            let hba_path = data.join("pg_hba.conf");
            let hba = std::fs::read_to_string(&hba_path)?;
            let tls_rules = "hostnossl all all all reject\nhostnossl replication all all reject\n\
                             hostssl ndc all 127.0.0.1/32 scram-sha-256 clientcert=verify-ca\n";
            std::fs::write(&hba_path, format!("{tls_rules}{hba}"))?;
        }
        std::fs::write(&conf_path, text)?;
        let log = dir.join("server.log").to_string_lossy().to_string();
        run(&bin, "pg_ctl", &["-D", &data_s, "-l", &log, "-w", "-t", "60", "start"])?;
        Ok(Self { port, dir, tls: pki.is_some(), bin })
    }

    /// The postmaster's process id (first line of `postmaster.pid`).
    pub fn postmaster_pid(&self) -> Option<u32> {
        let text = std::fs::read_to_string(self.dir.join("data/postmaster.pid")).ok()?;
        text.lines().next()?.trim().parse().ok()
    }

    /// A superuser connection over the private Unix socket.
    pub async fn connect(&self, database: &str) -> anyhow::Result<Client> {
        let mut c = tokio_postgres::Config::new();
        c.host_path(&self.dir).port(self.port).user("postgres").dbname(database);
        let (client, conn) =
            c.connect(NoTls).await.with_context(|| format!("connect to {database} on port {}", self.port))?;
        tokio::spawn(conn);
        Ok(client)
    }

    /// Creates a database owned by the dongbo role (creating the role on first use).
    pub async fn create_database(&self, name: &str) -> anyhow::Result<()> {
        let admin = self.connect("postgres").await?;
        let exists = admin.query_opt("SELECT 1 FROM pg_roles WHERE rolname = $1", &[&ROLE]).await?.is_some();
        if !exists {
            admin.batch_execute(&format!("CREATE ROLE {ROLE} LOGIN REPLICATION PASSWORD '{PASSWORD}'")).await?;
        }
        admin.batch_execute(&format!("CREATE DATABASE {name} OWNER {ROLE}")).await?;
        Ok(())
    }

    /// A connection as the dongbo role over TCP, as agents and the hub connect (over the Unix socket
    /// on a TLS cluster, which refuses clear-text TCP).
    pub async fn connect_as_role(&self, database: &str) -> anyhow::Result<Client> {
        let mut c = tokio_postgres::Config::new();
        if self.tls {
            c.host_path(&self.dir);
        } else {
            c.host("127.0.0.1");
        }
        c.port(self.port).user(ROLE).password(PASSWORD).dbname(database);
        let (client, conn) = c.connect(NoTls).await?;
        tokio::spawn(conn);
        Ok(client)
    }
}

impl Drop for PgCluster {
    fn drop(&mut self) {
        let data = self.dir.join("data").to_string_lossy().to_string();
        let _ = run(&self.bin, "pg_ctl", &["-D", &data, "-m", "immediate", "-w", "stop"]);
        if std::env::var_os("DONGBO_KEEP_TEST_DIRS").is_none() {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}
