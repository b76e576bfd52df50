//! The MySQL/MariaDB source: a consistent snapshot without a global read lock
//! ([`snapshot`]), then the row-based binlog read as a replica ([`binlog`]), behind the one
//! [`Source`] contract. Positions are binlog file numbers and offsets ([`BinlogPos`]); the source
//! releases nothing (the server keeps binlogs by time, which `check` weighs against the spool).
//!
//! The snapshot and the stream run in a task of their own that hands captured items to the
//! capture loop through a bounded channel: decoding overlaps spooling, and a full spool stops the
//! reading (the channel fills) without losing the place.
//!
//! Tables added to `source.tables` after the initial snapshot are snapshotted when the source
//! starts, at the server's position then; the stream resumes where the spool left it and drops
//! those tables' changes in transactions that began before that position (they are in the
//! snapshot).
//!
//! The client is `mysql_async` with `mysql_common`'s binlog events: maintained, tokio-native,
//! rustls, and the binlog reader ReadySet and Materialize run in production; writing our own
//! binlog parser would buy nothing. MariaDB's GTID and compressed events, which `mysql_common`
//! does not model, are read (GTID) or refused (compressed) here.

pub mod binlog;
pub mod check;
pub mod config;
pub mod position;
pub mod schema;
pub mod snapshot;
pub mod value;

use std::collections::HashMap;

use mysql_async::prelude::Queryable;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tracing::info;

pub use self::config::MySqlConfig;
use self::position::BinlogFiles;
use crate::error::SourceError;
use crate::model::{BinlogPos, Position, TableId};
use crate::source::{Captured, ResumePoint, Source};

/// Captured items in flight between the reading task and the capture loop.
const CHANNEL_ITEMS: usize = 4096;

/// A running MySQL/MariaDB source.
pub struct MySqlSource {
    rx: mpsc::Receiver<Result<Captured, SourceError>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for MySqlSource {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn binlog_pos(p: Option<Position>) -> Result<Option<BinlogPos>, SourceError> {
    match p {
        None => Ok(None),
        Some(Position::MySql(b)) => Ok(Some(b)),
        Some(Position::Postgres(_)) => Err(SourceError::Prerequisite(
            "the spool holds Postgres positions but source.kind is mysql: a spool belongs to one source; point \
             spool.path at a new directory for this source"
                .into(),
        )),
    }
}

impl MySqlSource {
    /// Connects, reads the tables' shapes and starts reading from `resume`: the initial snapshot if
    /// it is not spooled, else a snapshot of added tables if any, then the binlog.
    pub async fn start(config: MySqlConfig, resume: ResumePoint) -> Result<Self, SourceError> {
        let opts = config.opts().map_err(SourceError::Prerequisite)?;
        let mut conn = mysql_async::Conn::new(opts.clone()).await?;
        let configured = config.table_ids();
        let tables = schema::read_all(&mut conn, &configured).await?;
        let (file, pos): (String, u64) = conn
            .query_first("SHOW MASTER STATUS")
            .await?
            .map(|(f, p, _, _): (String, u64, String, String)| (f, p))
            .ok_or_else(|| {
                SourceError::Prerequisite("the server's binlog is off: set log_bin in its config and restart it".into())
            })?;
        let files = BinlogFiles::from_file_name(&file)?;
        let _ = pos;
        let committed = binlog_pos(resume.committed_end)?;
        let mut snapshotted_at = HashMap::new();
        for t in resume.snapshotted.iter().flatten() {
            if let Some(at) = binlog_pos(t.taken_at)? {
                snapshotted_at.insert(t.table.clone(), at);
            }
        }
        let added: Vec<TableId> = match (&resume.snapshotted, resume.snapshot_done) {
            (Some(done), true) => configured.iter().filter(|t| !done.iter().any(|d| &d.table == *t)).cloned().collect(),
            _ => Vec::new(),
        };
        let (tx, rx) = mpsc::channel(CHANNEL_ITEMS);
        let task = tokio::spawn(async move {
            let run = async {
                let from = match committed.filter(|_| resume.snapshot_done) {
                    None => {
                        let at = snapshot::begin(&mut conn, &files).await?;
                        info!(at = %files.file_name(at), pos = at.pos, tables = tables.len(), "snapshot started");
                        let rows = snapshot::read_tables(&mut conn, &tables, at, config.zero_dates, &tx).await?;
                        info!(rows, "snapshot read");
                        tx.send(Ok(Captured::SnapshotDone { at: Position::MySql(at), tables: configured.clone() }))
                            .await
                            .map_err(|_| snapshot::closed())?;
                        at
                    }
                    Some(committed) => {
                        if !added.is_empty() {
                            let chosen: Vec<_> =
                                tables.iter().filter(|t| added.contains(&t.schema.table)).cloned().collect();
                            let at = snapshot::begin(&mut conn, &files).await?;
                            info!(at = %files.file_name(at), pos = at.pos, tables = ?added, "snapshot of added tables started");
                            snapshot::read_tables(&mut conn, &chosen, at, config.zero_dates, &tx).await?;
                            for t in &added {
                                snapshotted_at.insert(t.clone(), at);
                            }
                            tx.send(Ok(Captured::TablesSnapshotted { at: Position::MySql(at), tables: added.clone() }))
                                .await
                                .map_err(|_| snapshot::closed())?;
                        }
                        committed
                    }
                };
                let _ = conn.disconnect().await;
                let start = binlog::StreamStart {
                    tables: tables.into_iter().map(|t| (t.schema.table.clone(), t)).collect(),
                    from,
                    open_txn: resume.open_txn,
                    snapshotted_at,
                    zero_dates: config.zero_dates,
                };
                binlog::stream(opts, config.replica_server_id, files, start, tx.clone()).await
            };
            if let Err(e) = run.await {
                let _ = tx.send(Err(e)).await;
            }
        });
        Ok(Self { rx, task })
    }
}

impl Source for MySqlSource {
    async fn next(&mut self, until: Instant) -> Result<Option<Captured>, SourceError> {
        match tokio::time::timeout_at(until, self.rx.recv()).await {
            Err(_) => Ok(None),
            Ok(Some(item)) => item.map(Some),
            Ok(None) => Err(SourceError::Io(std::io::Error::other("the MySQL reading task ended"))),
        }
    }

    async fn keep_alive(&mut self) -> Result<(), SourceError> {
        // The server sends heartbeats on the binlog link; nothing to report back.
        Ok(())
    }

    fn release(&self, _upto: Position) {
        // The server keeps binlogs by time (binlog_expire_logs_seconds), not by reader.
    }
}
