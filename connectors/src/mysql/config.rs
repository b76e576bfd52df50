//! Configuration of a MySQL/MariaDB source.

use std::fmt;
use std::path::PathBuf;

use serde::Deserialize;

use super::value::ZeroDates;
use crate::model::TableId;
use crate::tls::{DbTlsConfig, SslMode};

/// How to reach a MySQL/MariaDB server and what to capture from it.
#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MySqlConfig {
    /// Host name or address.
    pub host: String,
    /// Server port.
    #[serde(default = "default_port")]
    pub port: u16,
    /// Role with SELECT on the tables, REPLICATION SLAVE, and BINLOG MONITOR (MariaDB) or
    /// REPLICATION CLIENT (MySQL).
    pub user: String,
    /// Password. Prefer `password_file`.
    #[serde(default)]
    pub password: Option<String>,
    /// File holding the password (first line).
    #[serde(default)]
    pub password_file: Option<PathBuf>,
    /// Tables to capture, as `database.table`.
    pub tables: Vec<String>,
    /// The server id this agent uses as a replica; unique among the server's replicas.
    #[serde(default = "default_replica_id")]
    pub replica_server_id: u32,
    /// TLS to the server (`[source.tls]`), as for Postgres: `verify-full` unless on this machine.
    #[serde(default)]
    pub tls: DbTlsConfig,
    /// Zero dates (`0000-00-00`): `quarantine` (the default: the change is kept in quarantine with
    /// the reason) or `null`.
    #[serde(default)]
    pub zero_dates: ZeroDates,
    /// Rows per chunk of an online snapshot (a table added to `tables` later): each chunk is one
    /// short read, resumed after on restart.
    #[serde(default = "default_chunk_rows")]
    pub snapshot_chunk_rows: u64,
    /// Connections the initial snapshot reads tables on at once, each in a read view of its own
    /// (whose binlog position the stream then honours per table).
    #[serde(default = "default_parallel_tables")]
    pub snapshot_parallel_tables: usize,
}

fn default_chunk_rows() -> u64 {
    20_000
}

fn default_parallel_tables() -> usize {
    2
}

fn default_port() -> u16 {
    3306
}
/// Far from the small ids DBAs give real replicas.
fn default_replica_id() -> u32 {
    4_000_123
}

impl fmt::Debug for MySqlConfig {
    // Hand-written so the password never reaches a log line.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MySqlConfig")
            .field("host", &self.host)
            .field("port", &self.port)
            .field("user", &self.user)
            .field("password", &self.password.as_ref().map(|_| "<redacted>"))
            .field("tables", &self.tables)
            .field("replica_server_id", &self.replica_server_id)
            .field("tls", &self.tls)
            .field("zero_dates", &self.zero_dates)
            .field("snapshot_chunk_rows", &self.snapshot_chunk_rows)
            .field("snapshot_parallel_tables", &self.snapshot_parallel_tables)
            .finish_non_exhaustive()
    }
}

impl MySqlConfig {
    /// Every problem with the config at once, without I/O.
    pub fn validate(&self) -> Vec<String> {
        let mut p = Vec::new();
        if self.host.is_empty() || self.host.starts_with('/') {
            p.push("source.host must be a host name or address (MySQL sources are reached over TCP)".into());
        }
        if self.tables.is_empty() {
            p.push("source.tables is empty: list the tables to capture as database.table".into());
        }
        for t in &self.tables {
            if !t.contains('.') || TableId::parse(t).is_none() {
                p.push(format!("source.tables entry {t:?} is not database.table"));
            }
        }
        if self.password.is_some() && self.password_file.is_some() {
            p.push("set source.password or source.password_file, not both".into());
        }
        if self.replica_server_id == 0 {
            p.push("source.replica_server_id must not be 0".into());
        }
        p.extend(self.tls.validate(&self.host, "source.tls"));
        p
    }

    /// The captured tables, parsed (schema = database). Call after `validate`.
    pub fn table_ids(&self) -> Vec<TableId> {
        self.tables.iter().filter_map(|t| TableId::parse(t)).collect()
    }

    /// The password from `password` or `password_file`.
    pub fn resolve_password(&self) -> std::io::Result<Option<String>> {
        crate::config_file::resolve_secret(self.password.as_deref(), self.password_file.as_deref())
    }

    /// Connection options: TLS as `tls` asks, the session in UTC and utf8mb4 so values arrive as
    /// the server holds them.
    pub fn opts(&self) -> Result<mysql_async::Opts, String> {
        let password = self.resolve_password().map_err(|e| format!("cannot read source.password_file: {e}"))?;
        let mut b = mysql_async::OptsBuilder::default()
            .ip_or_hostname(self.host.clone())
            .tcp_port(self.port)
            .user(Some(self.user.clone()))
            .pass(password)
            .prefer_socket(false)
            .init(vec!["SET time_zone = '+00:00'", "SET NAMES utf8mb4"]);
        let mode = self.tls.mode_for(&self.host);
        if mode != SslMode::Disable {
            let mut ssl = mysql_async::SslOpts::default();
            if let Some(ca) = &self.tls.ca_file {
                ssl = ssl.with_root_certs(vec![ca.clone().into()]);
            }
            ssl = match mode {
                SslMode::Require if self.tls.ca_file.is_none() => ssl.with_danger_accept_invalid_certs(true),
                SslMode::Require | SslMode::VerifyCa => ssl.with_danger_skip_domain_validation(true),
                _ => ssl,
            };
            b = b.ssl_opts(Some(ssl));
        }
        Ok(b.into())
    }
}
