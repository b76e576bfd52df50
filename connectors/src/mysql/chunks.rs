//! Online snapshots of MySQL/MariaDB tables: a table added to `source.tables` (or marked by
//! `resnapshot`) is read in primary-key order, a chunk of `snapshot_chunk_rows` rows at a time, while
//! the binlog keeps being read.
//!
//! Each chunk is read in its own `START TRANSACTION WITH CONSISTENT SNAPSHOT`, whose binlog
//! position P the server reports: the chunk holds every transaction before P and none after. The
//! binlog reader yields the chunk exactly when it has read up to P, between transactions, so each
//! row's changes before P come before the chunk (and the chunk's copy, newer, replaces them) and
//! its changes after P come after. No gap, no overlap, no write to the source (the equivalent of
//! DBLog's watermarks, which MariaDB gives for free). The first chunk opens with a TRUNCATE.
//!
//! A chunk's end is spooled with the table's progress (the last key), so a restart reads on from
//! the next key instead of starting over. A table without a primary key has no order to resume
//! in: it is read as one chunk.
//!
//! Limitation: the keyset condition compares the key as MySQL compares its values; an `enum` key
//! orders by index but compares by label, so such a table should be re-snapshotted whole.

use std::sync::Arc;

use mysql_async::prelude::Queryable;
use mysql_async::Value as My;
use tokio::sync::mpsc;

use super::position::BinlogFiles;
use super::schema::MyTable;
use super::snapshot::{self, quote};
use super::value::{from_snapshot, ZeroDates};
use crate::error::SourceError;
use crate::model::{BinlogPos, Row, TableSchema, Value};

/// A table whose online snapshot is to be read or is under way.
#[derive(Debug, Clone)]
pub struct OnlineTable {
    /// The table.
    pub table: MyTable,
    /// The key of the last row already spooled, if any.
    pub after_key: Option<Row>,
    /// Rows spooled so far.
    pub rows: u64,
}

/// What a chunk read yields when done: the connection back, the last key read, the rows read.
type ChunkEnd = (mysql_async::Conn, Option<Row>, u64);

/// A chunk being read.
pub struct Chunk {
    /// The binlog position its read view matches.
    pub at: BinlogPos,
    /// Its rows, in key order.
    pub rows: mpsc::Receiver<Result<Row, SourceError>>,
    task: tokio::task::JoinHandle<Result<ChunkEnd, SourceError>>,
}

impl Chunk {
    /// Waits for the read to end (after its rows are taken).
    pub async fn finish(self) -> Result<ChunkEnd, SourceError> {
        self.task.await.map_err(|e| SourceError::Io(std::io::Error::other(format!("snapshot chunk task: {e}"))))?
    }
}

/// A key value as a statement parameter, in the session's terms (UTC, utf8mb4).
pub(crate) fn key_param(v: &Value) -> My {
    match v {
        Value::Null | Value::UnchangedToast => My::NULL,
        Value::Bool(b) => My::Int(i64::from(*b)),
        Value::Int(i) => My::Int(*i),
        Value::Float(f) => My::Double(*f),
        Value::Bytes(b) => My::Bytes(b.clone()),
        Value::TimestampTz(s) => My::Bytes(s.trim_end_matches("+00").as_bytes().to_vec()),
        Value::Numeric(s) | Value::Text(s) | Value::Date(s) | Value::Timestamp(s) | Value::Json(s) | Value::Uuid(s) => {
            My::Bytes(s.as_bytes().to_vec())
        }
        Value::Other { text, .. } => My::Bytes(text.as_bytes().to_vec()),
        Value::Array(_) => My::NULL,
    }
}

/// The chunk's statement and parameters: the next `limit` rows after `after` in key order, or the
/// whole table when it has no key.
fn statement(schema: &TableSchema, after: Option<&Row>, limit: u64) -> (String, Vec<My>) {
    let columns: Vec<String> = schema.columns.iter().map(|c| quote(&c.name)).collect();
    let from = format!("{}.{}", quote(&schema.table.schema), quote(&schema.table.name));
    if schema.is_keyless() {
        return (format!("SELECT {} FROM {from}", columns.join(", ")), Vec::new());
    }
    let key: Vec<String> = schema.key_columns.iter().map(|&k| quote(&schema.columns[k].name)).collect();
    let key = key.join(", ");
    let (filter, params) = match after {
        Some(after) => {
            (format!(" WHERE ({key}) > ({})", vec!["?"; after.len()].join(", ")), after.iter().map(key_param).collect())
        }
        None => (String::new(), Vec::new()),
    };
    (format!("SELECT {} FROM {from}{filter} ORDER BY {key} LIMIT {limit}", columns.join(", ")), params)
}

/// Opens the chunk's read view on `conn` (so its position is known before the binlog reader goes
/// on) and starts reading its rows.
pub async fn start(
    mut conn: mysql_async::Conn,
    files: &BinlogFiles,
    t: &OnlineTable,
    limit: u64,
    zero_dates: ZeroDates,
) -> Result<Chunk, SourceError> {
    let at = snapshot::begin(&mut conn, files).await?;
    let (sql, params) = statement(&t.table.schema, t.after_key.as_ref(), limit);
    let (schema, kinds) = (Arc::clone(&t.table.schema), t.table.kinds.clone());
    let (tx, rows) = mpsc::channel(1024);
    let task = tokio::spawn(async move {
        let mut last = None;
        let mut count = 0u64;
        {
            let mut result = conn.exec_iter(sql, params).await?;
            while let Some(row) = result.next().await? {
                let values: Row =
                    row.unwrap().into_iter().zip(&kinds).map(|(v, kind)| from_snapshot(kind, v, zero_dates)).collect();
                last = Some(schema.key_of(&values));
                count += 1;
                if tx.send(Ok(values)).await.is_err() {
                    return Err(snapshot::closed());
                }
            }
        }
        conn.query_drop("COMMIT").await?;
        Ok((conn, last, count))
    });
    Ok(Chunk { at, rows, task })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Column, Dialect, TableId};

    fn schema(key: Vec<usize>) -> TableSchema {
        let col = |n: &str| Column { name: n.into(), type_name: "int".into(), type_oid: 0 };
        TableSchema::in_dialect(Dialect::MySql, TableId::new("province", "hộ`khẩu"), vec![col("a"), col("b`c")], key)
    }

    #[test]
    fn chunks_go_on_after_the_last_key_and_quote_every_name() {
        let (sql, params) = statement(&schema(vec![1, 0]), Some(&vec![Value::Int(7), Value::Text("x".into())]), 500);
        assert_eq!(
            sql,
            "SELECT `a`, `b``c` FROM `province`.`hộ``khẩu` WHERE (`b``c`, `a`) > (?, ?) ORDER BY `b``c`, `a` LIMIT 500"
        );
        assert_eq!(params, vec![My::Int(7), My::Bytes(b"x".to_vec())]);
        let (first, params) = statement(&schema(vec![0]), None, 10);
        assert!(first.ends_with("ORDER BY `a` LIMIT 10") && params.is_empty(), "{first}");
        let (keyless, _) = statement(&schema(vec![]), None, 10);
        assert_eq!(keyless, "SELECT `a`, `b``c` FROM `province`.`hộ``khẩu`");
    }
}
