//! Throw-away MariaDB servers (Debian's 10.11, installed by `deploy/install-deps.sh`) in a temp
//! directory: row-based binlog, listening on 127.0.0.1 with a password for the agent's role and on a
//! private Unix socket for the test's own set-up statements (as root, by the `mariadb` client).

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

use crate::pg::free_port;

/// The role agents log in as.
pub const ROLE: &str = "dongbo";
/// Its password (test servers only).
pub const PASSWORD: &str = "dongbo-maria-secret";

/// A running server, killed and removed on drop.
pub struct MariaDb {
    /// TCP port on 127.0.0.1.
    pub port: u16,
    /// Its directory (data, socket, binlogs, error log).
    pub dir: PathBuf,
    child: Option<Child>,
}

fn is_root() -> bool {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata("/proc/self").map(|m| m.uid() == 0).unwrap_or(false)
}

/// A benchmark's `--source` value: `postgres` (false) or `mariadb`/`mysql` (true).
pub fn is_mariadb_source(value: &str) -> anyhow::Result<bool> {
    match value {
        "postgres" => Ok(false),
        "mariadb" | "mysql" => Ok(true),
        other => bail!("unknown source {other}; use postgres or mariadb"),
    }
}

impl MariaDb {
    /// Creates and starts a server named `name` with `extra` server options (e.g.
    /// `--binlog-format=MIXED`, to see `check` refuse it).
    pub async fn start(name: &str, extra: &[&str]) -> anyhow::Result<Self> {
        let dir =
            std::env::temp_dir().join(format!("dongbo-maria-{name}-{}-{}", std::process::id(), rand::random::<u32>()));
        let data = dir.join("data");
        std::fs::create_dir_all(&data)?;
        // Its own temp directory: servers bootstrapping at once in /tmp removed each other's
        // temporary tables ("Could not remove temporary table").
        let tmp = dir.join("tmp");
        std::fs::create_dir_all(&tmp)?;
        let user = if is_root() { "root".to_string() } else { std::env::var("USER").unwrap_or_default() };
        let out = Command::new("mariadb-install-db")
            .args(["--no-defaults", "--auth-root-authentication-method=socket", "--skip-test-db"])
            .arg(format!("--datadir={}", data.display()))
            .arg(format!("--user={user}"))
            .arg(format!("--tmpdir={}", tmp.display()))
            .output()
            .context("mariadb-install-db: install mariadb-server (./deploy/install-deps.sh)")?;
        if !out.status.success() {
            bail!("mariadb-install-db failed: {}", String::from_utf8_lossy(&out.stderr));
        }
        let port = free_port();
        let child = Command::new("mariadbd")
            .arg("--no-defaults")
            .arg(format!("--datadir={}", data.display()))
            .arg(format!("--tmpdir={}", tmp.display()))
            .arg(format!("--socket={}", dir.join("mysqld.sock").display()))
            .arg(format!("--pid-file={}", dir.join("mysqld.pid").display()))
            .arg(format!("--log-error={}", dir.join("error.log").display()))
            .arg(format!("--log-bin={}", dir.join("binlog").display()))
            .arg(format!("--port={port}"))
            .arg(format!("--user={user}"))
            .args([
                "--bind-address=127.0.0.1",
                "--server-id=1",
                "--binlog-format=ROW",
                "--binlog-row-image=FULL",
                "--character-set-server=utf8mb4",
                "--innodb-buffer-pool-size=64M",
                "--skip-name-resolve",
            ])
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("mariadbd")?;
        let mut db = Self { port, dir, child: Some(child) };
        let deadline = Instant::now() + Duration::from_secs(60);
        while tokio::net::TcpStream::connect(("127.0.0.1", port)).await.is_err() {
            let exited = db.child.as_mut().is_some_and(|c| c.try_wait().ok().flatten().is_some());
            if Instant::now() > deadline || exited {
                bail!(
                    "mariadbd did not start:\n{}",
                    std::fs::read_to_string(db.dir.join("error.log")).unwrap_or_default()
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        db.sql(&format!(
            "CREATE USER '{ROLE}'@'%' IDENTIFIED BY '{PASSWORD}';
             GRANT SELECT, REPLICATION SLAVE, BINLOG MONITOR ON *.* TO '{ROLE}'@'%';
             CREATE DATABASE province CHARACTER SET utf8mb4;"
        ))?;
        Ok(db)
    }

    /// The server's process id.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Runs `statements` as root over the private socket; returns what the client printed (tab
    /// separated, no headers).
    pub fn sql(&self, statements: &str) -> anyhow::Result<String> {
        let out = Command::new("mariadb")
            .arg(format!("--socket={}", self.socket().display()))
            .args(["-u", "root", "--default-character-set=utf8mb4", "--batch", "--skip-column-names", "-e", statements])
            .output()
            .context("mariadb client")?;
        if !out.status.success() {
            bail!("mariadb: {}", String::from_utf8_lossy(&out.stderr));
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// The output lines of `statements`, sorted (the server's collation is not the NDC's, so
    /// `ORDER BY` would not line the two up).
    pub fn sorted_lines(&self, statements: &str) -> anyhow::Result<Vec<String>> {
        let mut lines: Vec<String> = self.sql(statements)?.lines().map(str::to_string).collect();
        lines.sort();
        Ok(lines)
    }

    /// An agent config capturing `tables` of this server into `deployment`'s hub over gRPC,
    /// with `extra` lines in `[source]`.
    pub fn agent_config(&self, deployment: &crate::Deployment, tables: &[&str], extra: &str) -> String {
        let tables: Vec<String> = tables.iter().map(|t| format!("\"{t}\"")).collect();
        format!(
            "source_id = \"{id}\"\n\n[source]\nkind = \"mysql\"\nhost = \"127.0.0.1\"\nport = {port}\nuser = \"{ROLE}\"\n\
             password = \"{PASSWORD}\"\ntables = [{tables}]\n{extra}\n\n[spool]\npath = \"{spool}\"\n{spool_extra}\n\n\
             [status]\nlisten = \"127.0.0.1:{status}\"\nreport_interval_s = 1\n\n\
             [hub]\nurl = \"http://127.0.0.1:{hub}\"\ntoken = \"{token}\"\nmax_backoff_ms = 1000\n",
            id = deployment.source_id,
            port = self.port,
            tables = tables.join(", "),
            spool = deployment.dir.join("spool").display(),
            spool_extra = deployment.spool_extra,
            hub = deployment.hub_port,
            status = deployment.status_port,
            token = crate::TOKEN,
        )
    }

    /// The private socket.
    pub fn socket(&self) -> PathBuf {
        self.dir.join("mysqld.sock")
    }
}

impl Drop for MariaDb {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        if std::env::var_os("DONGBO_KEEP_TEST_DIRS").is_none() {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}
