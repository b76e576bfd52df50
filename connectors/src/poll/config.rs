//! `[source]` with `kind = "poll"`: the engine's connection (`[source.postgres]` or
//! `[source.mysql]`, the same settings as those source kinds, or `[source.odbc]`; their `tables`
//! are the polled ones),
//! each table's cursor column, and the poller's periods.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::Deserialize;

use crate::error::SourceError;
use crate::model::TableId;
use crate::mysql::MySqlConfig;
use crate::postgres::config::PostgresConfig;

/// The polling source's settings.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PollConfig {
    /// Per table (`schema.table`): the column that rises whenever a row is written (an
    /// `updated_at` timestamp, or an incrementing version or id).
    pub cursors: BTreeMap<String, String>,
    /// Time between the starts of two poll cycles.
    #[serde(default = "default_interval_ms")]
    pub interval_ms: u64,
    /// How far below the watermark each poll reads again: seconds for a date or time cursor,
    /// values for a number cursor. Size it above the longest write transaction on the server.
    #[serde(default = "default_safety_window")]
    pub safety_window: u64,
    /// Time between the starts of two diffs (which find deletes and whatever the cursor missed).
    #[serde(default = "default_diff_interval_s")]
    pub diff_interval_s: u64,
    /// Rows per statement.
    #[serde(default = "default_chunk_rows")]
    pub chunk_rows: u64,
    /// A PostgreSQL server.
    #[serde(default)]
    pub postgres: Option<PostgresConfig>,
    /// A MySQL or MariaDB server.
    #[serde(default)]
    pub mysql: Option<MySqlConfig>,
    /// Any server with an ODBC driver (an agent built with the `odbc` feature).
    #[serde(default)]
    pub odbc: Option<OdbcConfig>,
}

/// A server reached through ODBC (unixODBC and the server's driver).
#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OdbcConfig {
    /// The connection string without the password, e.g.
    /// `Driver={ODBC Driver 18 for SQL Server};Server=10.0.0.5;Database=hotich;UID=dongbo_reader`.
    pub connection_string: String,
    /// A file holding the password, added to the connection string as `PWD`.
    #[serde(default)]
    pub password_file: Option<std::path::PathBuf>,
    /// The polled tables, `schema.table`.
    pub tables: Vec<String>,
    /// What the first part of a table name is to the driver's catalog functions: `schema` (SQL
    /// Server, Oracle, PostgreSQL) or `catalog` (MySQL, MariaDB: a database).
    #[serde(default)]
    pub namespace: Namespace,
    /// How a statement asks for at most n rows: `limit` (`LIMIT n`: MySQL, MariaDB, PostgreSQL,
    /// SQLite), `top` (`SELECT TOP n`: SQL Server) or `fetch_first` (`FETCH FIRST n ROWS ONLY`:
    /// Oracle 12c, DB2, SQL:2008).
    #[serde(default)]
    pub row_limit: RowLimit,
}

impl std::fmt::Debug for OdbcConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The connection string may hold a password after all: never printed.
        f.debug_struct("OdbcConfig")
            .field("tables", &self.tables)
            .field("namespace", &self.namespace)
            .finish_non_exhaustive()
    }
}

/// See [`OdbcConfig::namespace`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Namespace {
    /// A schema.
    #[default]
    Schema,
    /// A catalog (a MySQL database).
    Catalog,
}

/// See [`OdbcConfig::row_limit`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RowLimit {
    /// `LIMIT n`.
    #[default]
    Limit,
    /// `SELECT TOP n`.
    Top,
    /// `FETCH FIRST n ROWS ONLY`.
    FetchFirst,
}

fn default_interval_ms() -> u64 {
    1_000
}
fn default_safety_window() -> u64 {
    300
}
fn default_diff_interval_s() -> u64 {
    600
}
fn default_chunk_rows() -> u64 {
    5_000
}

impl PollConfig {
    /// What is wrong with the settings, in words.
    pub fn validate(&self) -> Vec<String> {
        let mut problems = Vec::new();
        let tables = match (&self.postgres, &self.mysql, &self.odbc) {
            (None, None, Some(odbc)) => {
                if !super::ODBC_BUILT {
                    problems.push(
                        "[source.odbc]: this agent was built without ODBC; install the agent built with the odbc \
                         feature (cargo build --release -p dongbo-agent --features odbc)"
                            .into(),
                    );
                }
                if odbc.connection_string.to_ascii_lowercase().contains("pwd=") {
                    problems.push(
                        "source.odbc.connection_string holds a password (PWD=): put it in source.odbc.password_file"
                            .into(),
                    );
                }
                &odbc.tables
            }
            (Some(pg), None, None) => {
                // The replication settings do not apply; the connection's do.
                problems.extend(pg.validate().into_iter().map(|p| p.replacen("source.", "source.postgres.", 1)));
                &pg.tables
            }
            (None, Some(my), None) => {
                problems.extend(my.validate().into_iter().map(|p| p.replacen("source.", "source.mysql.", 1)));
                &my.tables
            }
            _ => {
                problems.push(
                    "kind = \"poll\" needs exactly one of [source.postgres], [source.mysql] or [source.odbc]".into(),
                );
                return problems;
            }
        };
        for t in tables {
            if !self.cursors.contains_key(t) {
                problems.push(format!(
                    "polled table {t} has no cursor: add it to source.cursors, e.g. \"{t}\" = \"updated_at\""
                ));
            }
        }
        for (t, c) in &self.cursors {
            if !tables.contains(t) {
                problems.push(format!("source.cursors names {t}, which is not in the tables polled"));
            }
            if c.is_empty() {
                problems.push(format!("source.cursors of {t} is empty"));
            }
        }
        if !(100..=3_600_000).contains(&self.interval_ms) {
            problems.push("source.interval_ms must be between 100 and 3600000".into());
        }
        if self.diff_interval_s == 0 {
            problems.push("source.diff_interval_s must be above 0".into());
        }
        if !(1..=100_000).contains(&self.chunk_rows) {
            problems.push("source.chunk_rows must be between 1 and 100000".into());
        }
        problems
    }

    /// The polled tables with their cursor columns, in configuration order.
    pub fn tables(&self) -> Result<Vec<(TableId, String)>, SourceError> {
        let names = match (&self.postgres, &self.mysql, &self.odbc) {
            (Some(pg), _, _) => &pg.tables,
            (_, Some(my), _) => &my.tables,
            (_, _, Some(odbc)) => &odbc.tables,
            _ => return Err(SourceError::Prerequisite("kind = \"poll\" names no server".into())),
        };
        names
            .iter()
            .map(|t| {
                let id = TableId::parse(t)
                    .ok_or_else(|| SourceError::Prerequisite(format!("polled table {t:?} is not schema.table")))?;
                let cursor = self
                    .cursors
                    .get(t)
                    .ok_or_else(|| SourceError::Prerequisite(format!("polled table {t} has no cursor")))?;
                Ok((id, cursor.clone()))
            })
            .collect()
    }

    /// The polled tables.
    pub fn table_ids(&self) -> Vec<TableId> {
        self.tables().map(|t| t.into_iter().map(|(id, _)| id).collect()).unwrap_or_default()
    }

    /// Time between poll cycles.
    pub fn interval(&self) -> Duration {
        Duration::from_millis(self.interval_ms)
    }

    /// Time between diffs.
    pub fn diff_interval(&self) -> Duration {
        Duration::from_secs(self.diff_interval_s)
    }
}
