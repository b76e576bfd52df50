//! A consistent snapshot of MySQL/MariaDB tables without a global read lock.
//!
//! MariaDB: `START TRANSACTION WITH CONSISTENT SNAPSHOT` opens an InnoDB read view and, in the
//! same step, records the binlog position it matches in the session status
//! `binlog_snapshot_file` / `binlog_snapshot_position`: every transaction that committed before that
//! position is in the read view, none after. The snapshot's rows are read in that one transaction,
//! and the stream starts at that position: no gap, no overlap, no lock (tables on non-transactional
//! engines such as MyISAM are not covered by the read view; `check` names them).
//!
//! MySQL 8 does not publish that status. Its path, not built yet: `FLUSH TABLES t1, t2 WITH READ
//! LOCK` (the captured tables only, for milliseconds), `SHOW BINARY LOG STATUS`, `START TRANSACTION
//! WITH CONSISTENT SNAPSHOT`, `UNLOCK TABLES`, as Materialize and ReadySet do; until then a MySQL 8
//! server is refused with that reason.
//!
//! Each table's rows are preceded by a TRUNCATE, so a snapshot taken again after a crash replaces
//! what an interrupted one applied.

use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use mysql_async::prelude::Queryable;
use tokio::sync::mpsc;

use super::position::BinlogFiles;
use super::schema::MyTable;
use super::value::{from_snapshot, ZeroDates};
use crate::error::SourceError;
use crate::model::{BinlogPos, Operation, Position, TableSchema};
use crate::source::Captured;

/// Backquotes an identifier: the only way a name reaches a statement.
pub fn quote(name: &str) -> String {
    format!("`{}`", name.replace('`', "``"))
}

/// Opens the consistent read view on `conn` and returns the binlog position it matches.
pub async fn begin(conn: &mut mysql_async::Conn, files: &BinlogFiles) -> Result<BinlogPos, SourceError> {
    conn.query_drop("SET SESSION TRANSACTION ISOLATION LEVEL REPEATABLE READ").await?;
    conn.query_drop("START TRANSACTION WITH CONSISTENT SNAPSHOT, READ ONLY").await?;
    let status: Vec<(String, String)> = conn.query("SHOW STATUS LIKE 'binlog_snapshot_%'").await?;
    let get = |name: &str| status.iter().find(|(k, _)| k.eq_ignore_ascii_case(name)).map(|(_, v)| v.clone());
    match (get("binlog_snapshot_file"), get("binlog_snapshot_position")) {
        (Some(file), Some(pos)) if !file.is_empty() => {
            let pos = pos.parse().map_err(|_| SourceError::Protocol(format!("binlog_snapshot_position {pos:?}")))?;
            files.position(&file, pos)
        }
        _ => Err(SourceError::Prerequisite(
            "this server does not report the binlog position of a consistent snapshot (binlog_snapshot_file): \
             it is MySQL, or MariaDB without log_bin. The agent snapshots MariaDB without locks; MySQL 8's \
             short per-table lock path is not built yet"
                .into(),
        )),
    }
}

/// One connection's share of a parallel initial snapshot: its tables and the binlog position of
/// its read view.
pub struct ReadView {
    /// The tables read in this view.
    pub tables: Vec<MyTable>,
    /// The binlog position the view matches.
    pub at: BinlogPos,
}

/// Opens a read view on each of `conns` (one after another, so their positions differ only by what
/// committed in between) and deals `tables` out among them, round robin.
pub async fn begin_parallel(
    conns: &mut [mysql_async::Conn],
    tables: &[MyTable],
    files: &BinlogFiles,
) -> Result<Vec<ReadView>, SourceError> {
    let n = conns.len();
    let mut views = Vec::with_capacity(n);
    for (i, conn) in conns.iter_mut().enumerate() {
        if i > 0 && crate::fault::armed_at("mysql-pause-between-read-views") {
            // Lets a test commit changes between two views' positions.
            tracing::warn!("fault injection: pausing 3 s between read views");
            tokio::time::sleep(std::time::Duration::from_secs(3)).await;
        }
        let at = begin(conn, files).await?;
        let view = ReadView { tables: tables.iter().skip(i).step_by(n).cloned().collect(), at };
        let names: Vec<String> = view.tables.iter().map(|t| t.schema.table.to_string()).collect();
        tracing::info!(view = i, file = %files.file_name(at), pos = at.pos, tables = %names.join(" "), "read view opened");
        views.push(view);
    }
    Ok(views)
}

/// Reads every row of `tables` in the open read view into `tx`, each table opened by a TRUNCATE;
/// then ends the transaction. Returns the number of rows read.
pub async fn read_tables(
    conn: &mut mysql_async::Conn,
    tables: &[MyTable],
    at: BinlogPos,
    zero_dates: ZeroDates,
    tx: &mpsc::Sender<Result<Captured, SourceError>>,
) -> Result<u64, SourceError> {
    let started_us = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_micros() as i64);
    let mut order = 0u32;
    let mut rows = 0u64;
    let mut event = |schema: &Arc<TableSchema>, op, after: Option<Vec<crate::model::Value>>| {
        let item = Captured::snapshot(schema, op, after, Position::MySql(at), started_us, order);
        order = order.wrapping_add(1);
        item
    };
    for table in tables {
        tx.send(Ok(event(&table.schema, Operation::Truncate, None))).await.map_err(|_| closed())?;
        let columns: Vec<String> = table.schema.columns.iter().map(|c| quote(&c.name)).collect();
        let sql = format!(
            "SELECT {} FROM {}.{}",
            columns.join(", "),
            quote(&table.schema.table.schema),
            quote(&table.schema.table.name)
        );
        let mut result = conn.exec_iter(sql, ()).await?;
        while let Some(row) = result.next().await? {
            let values: Vec<crate::model::Value> = row
                .unwrap()
                .into_iter()
                .zip(&table.kinds)
                .map(|(v, kind)| from_snapshot(kind, v, zero_dates))
                .collect();
            rows += 1;
            tx.send(Ok(event(&table.schema, Operation::SnapshotRead, Some(values)))).await.map_err(|_| closed())?;
        }
        drop(result);
    }
    conn.query_drop("COMMIT").await?;
    Ok(rows)
}

/// The rows a snapshot of `tables` will read, as `information_schema.TABLES` estimates them
/// (InnoDB samples: often off by tens of percent). For progress only.
pub async fn estimated_rows(conn: &mut mysql_async::Conn, tables: &[MyTable]) -> Result<u64, SourceError> {
    let mut total = 0u64;
    for t in tables {
        let id = &t.schema.table;
        let rows: Option<Option<u64>> = conn
            .exec_first(
                "SELECT TABLE_ROWS FROM information_schema.TABLES WHERE TABLE_SCHEMA = ? AND TABLE_NAME = ?",
                (&id.schema, &id.name),
            )
            .await?;
        total += rows.flatten().unwrap_or(0);
    }
    Ok(total)
}

/// The capture loop went away: the task ends quietly.
pub(super) fn closed() -> SourceError {
    SourceError::Io(std::io::Error::new(std::io::ErrorKind::BrokenPipe, "capture stopped reading the source"))
}
