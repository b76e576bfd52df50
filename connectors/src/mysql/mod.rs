//! The MySQL/MariaDB source: a consistent snapshot without a global read lock
//! ([`snapshot`]), then the row-based binlog read as a replica ([`binlog`]), behind the one
//! [`Source`] contract. Positions are binlog file numbers and offsets ([`BinlogPos`]); the source
//! releases nothing (the server keeps binlogs by time, which `check` weighs against the spool).
//!
//! The snapshot and the stream run in a task of their own that hands captured items to the
//! capture loop through a bounded channel: decoding overlaps spooling, and a full spool stops the
//! reading (the channel fills) without losing the place.
//!
//! Tables added to `source.tables` after the initial snapshot (or marked by `resnapshot`) are
//! snapshotted online, in chunks, while the binlog keeps flowing ([`chunks`]); a restart goes on
//! after the last spooled chunk.
//!
//! The client is `mysql_async` with `mysql_common`'s binlog events: maintained, tokio-native,
//! rustls, and the binlog reader ReadySet and Materialize run in production; writing our own
//! binlog parser would buy nothing. MariaDB's GTID and compressed events, which `mysql_common`
//! does not model, are read (GTID) or refused (compressed) here.

pub mod binlog;
pub mod check;
pub mod chunks;
pub mod config;
pub mod position;
pub mod retention;
pub mod schema;
pub mod snapshot;
pub mod value;

use std::collections::{HashMap, VecDeque};

use mysql_async::prelude::Queryable;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tracing::info;

use self::chunks::OnlineTable;
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
        Some(other) => Err(other.of_another_source("mysql")),
    }
}

impl MySqlSource {
    /// Connects, reads the tables' shapes and starts reading from `resume`: the initial snapshot if
    /// it is not spooled, then the binlog, with the online snapshots of added tables in it.
    pub async fn start(config: MySqlConfig, resume: ResumePoint) -> Result<Self, SourceError> {
        let opts = config.opts().map_err(SourceError::Prerequisite)?;
        let mut conn = mysql_async::Conn::new(opts.clone()).await?;
        let configured = config.table_ids();
        let tables = schema::read_all(&mut conn, &configured).await?;
        let file: String = conn
            .query_first("SHOW MASTER STATUS")
            .await?
            .map(|(f, _, _, _): (String, u64, String, String)| f)
            .ok_or_else(|| {
                SourceError::Prerequisite("the server's binlog is off: set log_bin in its config and restart it".into())
            })?;
        let files = BinlogFiles::from_file_name(&file)?;
        let committed = binlog_pos(resume.committed_end)?;
        let mut snapshotted_at = HashMap::new();
        for t in resume.snapshotted.iter().flatten() {
            if let Some(at) = binlog_pos(t.taken_at)? {
                snapshotted_at.insert(t.table.clone(), at);
            }
        }
        // Online snapshots: the one under way first, then tables configured since the snapshots.
        let mut online = VecDeque::new();
        if resume.snapshot_done {
            // A spool that never recorded its tables snapshotted those configured then.
            let done: Vec<TableId> = match &resume.snapshotted {
                Some(list) => list.iter().map(|s| s.table.clone()).collect(),
                None => configured.clone(),
            };
            let by_name = |id: &TableId| tables.iter().find(|t| &t.schema.table == id).cloned();
            if let Some(p) = &resume.snapshotting {
                if let Some(table) = by_name(&p.table) {
                    let after_key = p.decoded_after_key()?;
                    online.push_back(OnlineTable { table, after_key, rows: p.rows });
                }
            }
            for id in &configured {
                let under_way = resume.snapshotting.as_ref().is_some_and(|p| &p.table == id);
                if !done.contains(id) && !under_way {
                    online.extend(by_name(id).map(|table| OnlineTable { table, after_key: None, rows: 0 }));
                }
            }
        }
        let (tx, rx) = mpsc::channel(CHANNEL_ITEMS);
        let task = tokio::spawn(async move {
            let run = async {
                let from = match committed.filter(|_| resume.snapshot_done) {
                    None => {
                        // Positions of an interrupted attempt are not this one's.
                        snapshotted_at.clear();
                        let n = config.snapshot_parallel_tables.clamp(1, tables.len().max(1));
                        let estimated_rows = snapshot::estimated_rows(&mut conn, &tables).await?;
                        tx.send(Ok(Captured::SnapshotPlanned { estimated_rows }))
                            .await
                            .map_err(|_| snapshot::closed())?;
                        let mut conns = vec![conn];
                        for _ in 1..n {
                            conns.push(mysql_async::Conn::new(opts.clone()).await?);
                        }
                        let views = snapshot::begin_parallel(&mut conns, &tables, &files).await?;
                        let from = views.iter().map(|v| v.at).min().expect("at least one read view");
                        info!(at = %files.file_name(from), pos = from.pos, tables = tables.len(), connections = n, "snapshot started");
                        let reads = views.into_iter().zip(conns).map(|(view, mut c)| {
                            let (tx, zero_dates) = (tx.clone(), config.zero_dates);
                            tokio::spawn(async move {
                                let rows =
                                    snapshot::read_tables(&mut c, &view.tables, view.at, zero_dates, &tx).await?;
                                let _ = c.disconnect().await;
                                Ok::<_, SourceError>((rows, view))
                            })
                        });
                        let mut rows = 0;
                        for read in futures::future::join_all(reads).await {
                            let (n, view) = read.map_err(|e| SourceError::Io(std::io::Error::other(e)))??;
                            rows += n;
                            // A read view opened after the stream's start: its tables' changes in
                            // transactions begun before its position are in its rows already. Spooled
                            // before SnapshotDone, so a crash between the two takes the snapshot again.
                            if view.at != from {
                                let ids: Vec<TableId> = view.tables.iter().map(|t| t.schema.table.clone()).collect();
                                snapshotted_at.extend(ids.iter().map(|id| (id.clone(), view.at)));
                                tx.send(Ok(Captured::TablesSnapshotted { at: Position::MySql(view.at), tables: ids }))
                                    .await
                                    .map_err(|_| snapshot::closed())?;
                            }
                        }
                        info!(rows, "snapshot read");
                        tx.send(Ok(Captured::SnapshotDone { at: Position::MySql(from), tables: configured.clone() }))
                            .await
                            .map_err(|_| snapshot::closed())?;
                        from
                    }
                    Some(committed) => {
                        let _ = conn.disconnect().await;
                        committed
                    }
                };
                let start = binlog::StreamStart {
                    tables: tables.into_iter().map(|t| (t.schema.table.clone(), t)).collect(),
                    from,
                    open_txn: resume.open_txn,
                    snapshotted_at,
                    zero_dates: config.zero_dates,
                    online,
                    chunk_rows: config.snapshot_chunk_rows.max(1),
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
