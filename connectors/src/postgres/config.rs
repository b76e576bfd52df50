//! Configuration of the Postgres source.

use std::fmt;
use std::path::PathBuf;

use serde::Deserialize;

use crate::model::TableId;
use crate::tls::DbTlsConfig;

/// How to reach a Postgres source and what to capture from it.
#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PostgresConfig {
    /// Host name or IP address, or a Unix socket directory (starting with `/`).
    pub host: String,
    /// Server port.
    #[serde(default = "default_port")]
    pub port: u16,
    /// Database to capture.
    pub database: String,
    /// Role with the REPLICATION attribute and SELECT on the captured tables.
    pub user: String,
    /// Password, if the server asks for one. Prefer `password_file` on shared machines.
    #[serde(default)]
    pub password: Option<String>,
    /// File holding the password (first line), read at start-up.
    #[serde(default)]
    pub password_file: Option<PathBuf>,
    /// Tables to capture, as `schema.table` (or `table` for schema `public`).
    pub tables: Vec<String>,
    /// Publication to stream from.
    #[serde(default = "default_publication")]
    pub publication: String,
    /// Logical replication slot name; one per agent.
    #[serde(default = "default_slot")]
    pub slot: String,
    /// Create the publication (and add missing tables to it) when allowed.
    #[serde(default = "default_true")]
    pub create_publication: bool,
    /// How often the agent reports its released position to the server, in milliseconds.
    #[serde(default = "default_feedback_ms")]
    pub feedback_interval_ms: u64,
    /// TLS to the server (`[source.tls]`), for the query and the replication connection alike.
    #[serde(default)]
    pub tls: DbTlsConfig,
    /// Rows per chunk of an online snapshot (a table added to `tables` later): each chunk is one
    /// short read, resumed after on restart.
    #[serde(default = "default_chunk_rows")]
    pub snapshot_chunk_rows: u64,
    /// Tables the initial snapshot reads at once, each on its own connection in the one exported
    /// snapshot.
    #[serde(default = "default_parallel_tables")]
    pub snapshot_parallel_tables: usize,
}

fn default_parallel_tables() -> usize {
    2
}

fn default_chunk_rows() -> u64 {
    20_000
}

fn default_port() -> u16 {
    5432
}
fn default_publication() -> String {
    "dongbo".into()
}
fn default_slot() -> String {
    "dongbo".into()
}
fn default_true() -> bool {
    true
}
/// Postgres drops a silent walsender after wal_sender_timeout (60 s by default); feedback every 10 s
/// stays well inside it and keeps the slot's confirmed position fresh.
fn default_feedback_ms() -> u64 {
    10_000
}

impl fmt::Debug for PostgresConfig {
    // Hand-written so the password never reaches a log line.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PostgresConfig")
            .field("host", &self.host)
            .field("port", &self.port)
            .field("database", &self.database)
            .field("user", &self.user)
            .field("password", &self.password.as_ref().map(|_| "<redacted>"))
            .field("password_file", &self.password_file)
            .field("tables", &self.tables)
            .field("publication", &self.publication)
            .field("slot", &self.slot)
            .field("tls", &self.tls)
            .finish_non_exhaustive()
    }
}

impl PostgresConfig {
    /// Every problem with the config at once, without I/O.
    pub fn validate(&self) -> Vec<String> {
        let mut problems = Vec::new();
        if self.host.is_empty() {
            problems.push("source.host is empty".to_string());
        }
        if self.tables.is_empty() {
            problems.push("source.tables is empty: list the tables to capture as schema.table".into());
        }
        for t in &self.tables {
            if TableId::parse(t).is_none() {
                problems.push(format!("source.tables entry {t:?} is not schema.table"));
            }
        }
        if self.password.is_some() && self.password_file.is_some() {
            problems.push("set source.password or source.password_file, not both".into());
        }
        let ident_ok =
            |s: &str| !s.is_empty() && s.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
        if !ident_ok(&self.slot) || self.slot.len() > 57 {
            // 63 bytes at most, less the "_added" of the temporary slot for tables added later.
            problems.push(format!("source.slot {:?} must be up to 57 lowercase letters, digits and _", self.slot));
        }
        if !ident_ok(&self.publication) {
            problems.push(format!("source.publication {:?} must be lowercase letters, digits and _", self.publication));
        }
        if self.feedback_interval_ms == 0 || self.feedback_interval_ms > 50_000 {
            problems.push("source.feedback_interval_ms must be between 1 and 50000 (below wal_sender_timeout)".into());
        }
        problems.extend(self.tls.validate(&self.host, "source.tls"));
        problems
    }

    /// The captured tables, parsed. Call after `validate`.
    pub fn table_ids(&self) -> Vec<TableId> {
        self.tables.iter().filter_map(|t| TableId::parse(t)).collect()
    }

    /// The password from `password` or `password_file`.
    pub fn resolve_password(&self) -> std::io::Result<Option<String>> {
        crate::config_file::resolve_secret(self.password.as_deref(), self.password_file.as_deref())
    }

    /// Opens the regular (query) connection, its driver task spawned on the runtime.
    pub async fn connect_query(&self) -> Result<tokio_postgres::Client, crate::error::SourceError> {
        let password = self.resolve_password()?;
        Ok(super::session::connect(&self.target(password.as_deref())).await?)
    }

    /// Where and as whom the agent connects, with `password`.
    pub fn target<'a>(&'a self, password: Option<&'a str>) -> super::session::Target<'a> {
        super::session::Target {
            host: &self.host,
            port: self.port,
            user: &self.user,
            database: &self.database,
            password,
            application: "dongbo-agent",
            tls: &self.tls,
        }
    }
}
