//! The initial snapshot: every captured table read with `COPY ... TO STDOUT` inside the snapshot the
//! replication slot exported when it was created. Streaming then starts at the slot's consistent
//! point, so the snapshot and the stream meet with no gap and no overlap.
//!
//! Each table's snapshot opens with a TRUNCATE event: if the agent dies mid-snapshot, the exported
//! snapshot is gone, so the next start drops the slot and takes a new snapshot, and the hub must not
//! keep rows from the first attempt that were deleted in between.

use std::collections::VecDeque;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use futures::StreamExt;
use tokio::time::Instant;
use tokio_postgres::{Client, CopyOutStream};
use tracing::info;

use crate::error::SourceError;
use crate::model::{Lsn, Operation, Position, TableId, TableSchema};
use crate::postgres::catalog;
use crate::postgres::text::{parse_value, split_copy_line};
use crate::postgres::Captured;

/// How often snapshot progress is logged: long tables must show that they move.
const PROGRESS_EVERY: Duration = Duration::from_secs(5);

struct TableCopy {
    schema: Arc<TableSchema>,
    rows: Pin<Box<CopyOutStream>>,
    copied: u64,
    estimated: i64,
    partial: Vec<u8>,
    /// Whole lines not yet read, without their newline: slices of the CopyData they came in.
    lines: VecDeque<Bytes>,
    /// A chunk: its progress is logged by the source, not here.
    quiet: bool,
}

/// One chunk of an online snapshot: its table, its `COPY (SELECT …)`, and whether it opens the
/// table (a TRUNCATE first).
struct ChunkQuery {
    schema: Arc<TableSchema>,
    sql: String,
    truncate: bool,
}

/// Reads the snapshot table by table (or one chunk of a table), one row per call.
pub struct SnapshotReader {
    all: Vec<TableId>,
    tables: VecDeque<TableId>,
    chunk: Option<ChunkQuery>,
    current: Option<TableCopy>,
    consistent_point: Lsn,
    order: u32,
    started_us: i64,
    last_progress: Instant,
}

impl SnapshotReader {
    /// A reader for `tables` at the slot's `consistent_point`; the client's transaction already uses
    /// the exported snapshot.
    pub fn new(tables: Vec<TableId>, consistent_point: Lsn) -> Self {
        let started_us = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_micros() as i64).unwrap_or(0);
        Self {
            all: tables.clone(),
            tables: tables.into(),
            chunk: None,
            current: None,
            consistent_point,
            order: 0,
            started_us,
            last_progress: Instant::now(),
        }
    }

    /// A reader of one chunk of `schema`'s table: the rows `sql` (a `COPY … TO STDOUT`) returns in
    /// the client's snapshot, taken at `at`; a TRUNCATE first when `truncate`.
    pub fn chunk(schema: Arc<TableSchema>, sql: String, at: Lsn, truncate: bool) -> Self {
        let mut r = Self::new(Vec::new(), at);
        r.all = vec![schema.table.clone()];
        r.chunk = Some(ChunkQuery { schema, sql, truncate });
        r
    }

    /// The tables this snapshot reads.
    pub fn tables(&self) -> &[TableId] {
        &self.all
    }

    /// Where streaming continues after the snapshot.
    pub fn consistent_point(&self) -> Lsn {
        self.consistent_point
    }

    fn event(&mut self, schema: &Arc<TableSchema>, op: Operation, after: Option<Vec<crate::model::Value>>) -> Captured {
        let order = self.order;
        self.order = self.order.wrapping_add(1);
        Captured::snapshot(schema, op, after, Position::Postgres(self.consistent_point), self.started_us, order)
    }

    /// The next snapshot item, `Ok(None)` when every table is read, or `Err(Elapsed)`-like `Ok(Some(None))`
    /// when `until` passed first.
    pub async fn next(&mut self, client: &Client, until: Instant) -> Result<Option<Option<Captured>>, SourceError> {
        loop {
            let Some(copy) = self.current.as_mut() else {
                if let Some(q) = self.chunk.take() {
                    let rows = Box::pin(client.copy_out(&q.sql).await?);
                    self.current = Some(TableCopy {
                        schema: q.schema.clone(),
                        rows,
                        copied: 0,
                        estimated: 0,
                        partial: Vec::new(),
                        lines: VecDeque::new(),
                        quiet: true,
                    });
                    if q.truncate {
                        return Ok(Some(Some(self.event(&q.schema, Operation::Truncate, None))));
                    }
                    continue;
                }
                let Some(table) = self.tables.pop_front() else { return Ok(None) };
                let found = catalog::find_table(client, &table)
                    .await?
                    .ok_or_else(|| SourceError::Prerequisite(format!("table {table} does not exist at the source")))?;
                let cols: Vec<String> = found.schema.columns.iter().map(|c| quote_ident(&c.name)).collect();
                let sql = format!(
                    "COPY {}.{} ({}) TO STDOUT",
                    quote_ident(&table.schema),
                    quote_ident(&table.name),
                    cols.join(", ")
                );
                let rows = Box::pin(client.copy_out(&sql).await?);
                info!(table = %table, estimated_rows = found.estimated_rows, "snapshot of table started");
                let schema = Arc::new(found.schema);
                self.current = Some(TableCopy {
                    schema: schema.clone(),
                    rows,
                    copied: 0,
                    estimated: found.estimated_rows,
                    partial: Vec::new(),
                    lines: VecDeque::new(),
                    quiet: false,
                });
                return Ok(Some(Some(self.event(&schema, Operation::Truncate, None))));
            };
            if let Some(line) = copy.lines.pop_front() {
                let fields = split_copy_line(&line).map_err(SourceError::Protocol)?;
                if fields.len() != copy.schema.columns.len() {
                    return Err(SourceError::Protocol(format!(
                        "COPY row of {} has {} fields",
                        copy.schema.table,
                        fields.len()
                    )));
                }
                let row = fields
                    .into_iter()
                    .zip(&copy.schema.columns)
                    .map(|(f, c)| match f {
                        None => crate::model::Value::Null,
                        Some(t) => parse_value(c.type_oid, &c.type_name, t),
                    })
                    .collect();
                copy.copied += 1;
                if !copy.quiet && self.last_progress.elapsed() >= PROGRESS_EVERY {
                    self.last_progress = Instant::now();
                    info!(table = %copy.schema.table, rows = copy.copied, estimated_rows = copy.estimated, "snapshot progress");
                }
                let schema = copy.schema.clone();
                return Ok(Some(Some(self.event(&schema, Operation::SnapshotRead, Some(row)))));
            }
            match tokio::time::timeout_at(until, copy.rows.next()).await {
                Err(_) => return Ok(Some(None)),
                Ok(Some(chunk)) => {
                    let chunk = chunk?;
                    // Postgres sends one row per CopyData, but nothing in the protocol promises it:
                    // whole lines are sliced out of the message, a line split across messages is
                    // put together in `partial`.
                    let mut start = 0;
                    for nl in memchr::memchr_iter(b'\n', &chunk) {
                        if copy.partial.is_empty() {
                            copy.lines.push_back(chunk.slice(start..nl));
                        } else {
                            copy.partial.extend_from_slice(&chunk[start..nl]);
                            copy.lines.push_back(Bytes::from(std::mem::take(&mut copy.partial)));
                        }
                        start = nl + 1;
                    }
                    copy.partial.extend_from_slice(&chunk[start..]);
                }
                Ok(None) => {
                    if !copy.quiet {
                        info!(table = %copy.schema.table, rows = copy.copied, "snapshot of table done");
                    }
                    self.current = None;
                }
            }
        }
    }
}

/// The `COPY` of an online snapshot chunk: the next `limit` rows after `after` in key order, or
/// the whole table when it has no key. The key values come from the table's own rows and are
/// written as quoted literals cast to the column types `format_type` printed (`COPY` takes no
/// parameters).
pub fn chunk_sql(schema: &TableSchema, after: Option<&[crate::model::Value]>, limit: u64) -> String {
    let cols: Vec<String> = schema.columns.iter().map(|c| quote_ident(&c.name)).collect();
    let from = format!("{}.{}", quote_ident(&schema.table.schema), quote_ident(&schema.table.name));
    if schema.is_keyless() {
        return format!("COPY (SELECT {} FROM ONLY {from}) TO STDOUT", cols.join(", "));
    }
    let key: Vec<String> = schema.key_columns.iter().map(|&k| quote_ident(&schema.columns[k].name)).collect();
    let key = key.join(", ");
    let filter = match after {
        Some(after) => {
            let literals: Vec<String> = after
                .iter()
                .zip(&schema.key_columns)
                .map(|(v, &k)| {
                    let mut text = String::new();
                    match crate::postgres::text::write_value(v, &mut text) {
                        Some(()) => format!("'{}'::{}", text.replace('\'', "''"), schema.columns[k].type_name),
                        None => "NULL".to_string(),
                    }
                })
                .collect();
            format!(" WHERE ({key}) > ({})", literals.join(", "))
        }
        None => String::new(),
    };
    format!("COPY (SELECT {} FROM ONLY {from}{filter} ORDER BY {key} LIMIT {limit}) TO STDOUT", cols.join(", "))
}

/// Quotes an identifier for SQL.
pub fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}
