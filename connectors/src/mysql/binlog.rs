//! The row-based binlog, read as a replica reads it, into captured changes.
//!
//! Transactions: a MariaDB GTID event (or a `BEGIN` query from an older server) opens one; its
//! changes follow in row events, each after the table map event naming its table; an XID event
//! (or a `COMMIT` query, for non-transactional tables) ends it, and its end position is what the
//! spool resumes from. A transaction is named by the position just past its GTID event, the same on
//! every read of the binlog, so a restart inside a large transaction skips the changes the spool
//! already holds.
//!
//! DDL (a query event that is neither `BEGIN` nor `COMMIT`) makes the source read the captured
//! tables' shapes again from `information_schema`, so the next rows carry the new schema and the
//! hub follows the drift. A row image whose column count differs from the table's shape (the table
//! changed again since that point of the binlog) is reread once, then refused with the reason:
//! never decoded against the wrong shape. Columns left out of a `MINIMAL` row image are
//! [`Value::UnchangedToast`]: the NDC keeps what it has.
//!
//! Refused: compressed binlog events (`log_bin_compress`), which the decoder does not read, and
//! MySQL 8's binary JSON (not decoded yet); both stop capture with the setting to change.

use std::collections::{HashMap, VecDeque};

use futures::StreamExt;
use mysql_async::binlog::events::{EventData, RowsEventData, TableMapEvent};
use mysql_async::binlog::value::BinlogValue;
use mysql_async::prelude::Queryable;
use mysql_async::BinlogStreamRequest;
use mysql_common::io::ParseBuf;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tracing::info;

use super::chunks::{self, Chunk, OnlineTable};
use super::position::BinlogFiles;
use super::schema::{self, Kind, MyTable};
use super::snapshot::closed;
use super::value::{from_binlog, ZeroDates};
use crate::error::SourceError;
use crate::model::{BinlogPos, ChangeEvent, Operation, Position, Row, TableId, Value};
use crate::source::{Captured, OpenTxn, TableProgress};

/// MariaDB's own event types.
const MARIADB_GTID_EVENT: u8 = 162;
const MARIADB_QUERY_COMPRESSED_EVENT: u8 = 165;
const MARIADB_DELETE_ROWS_COMPRESSED_EVENT: u8 = 171;
/// Set on events the server makes up for the reader (the rotate that opens a stream).
const LOG_EVENT_ARTIFICIAL_F: u16 = 0x20;
/// How close to the binlog's end the stream must be before an online snapshot chunk starts.
const NEAR_END_BYTES: u64 = 4 << 20;
/// How often the binlog's end is asked for while a chunk waits to start.
const END_CHECK_EVERY: std::time::Duration = std::time::Duration::from_millis(200);

/// The server's binlog end, `None` if it does not say.
async fn server_end(conn: &mut mysql_async::Conn, files: &BinlogFiles) -> Result<Option<BinlogPos>, SourceError> {
    let status: Option<(String, u64, String, String)> = conn.query_first("SHOW MASTER STATUS").await?;
    status.map(|(file, pos, _, _)| files.position(&file, pos)).transpose()
}

/// The GTID event's flag for a statement outside any transaction (DDL).
const FL_STANDALONE: u8 = 1;

/// What the stream needs to know to start.
pub struct StreamStart {
    /// The captured tables by name.
    pub tables: HashMap<TableId, MyTable>,
    /// Where to read from: just past the last transaction spooled, or the snapshot's position.
    pub from: BinlogPos,
    /// A transaction spooled in part.
    pub open_txn: Option<OpenTxn>,
    /// Tables snapshotted after the stream began: their changes in transactions that started
    /// before the position are in the snapshot already.
    pub snapshotted_at: HashMap<TableId, BinlogPos>,
    /// How zero dates travel.
    pub zero_dates: ZeroDates,
    /// Tables to snapshot online, in order; the first may be under way.
    pub online: VecDeque<OnlineTable>,
    /// Rows per online snapshot chunk.
    pub chunk_rows: u64,
}

struct Txn {
    name: BinlogPos,
    txid: u64,
    order: u32,
    skip: u32,
    commit_time_us: i64,
}

/// Reads the binlog from `start.from` into `tx` until the link fails or `tx` closes.
pub async fn stream(
    opts: mysql_async::Opts,
    replica_server_id: u32,
    files: BinlogFiles,
    mut start: StreamStart,
    tx: mpsc::Sender<Result<Captured, SourceError>>,
) -> Result<(), SourceError> {
    let mut schema_conn = mysql_async::Conn::new(opts.clone()).await?;
    let mut conn = mysql_async::Conn::new(opts.clone()).await?;
    // Heartbeats every 5 s let a dead link show as an error instead of a silent wait; the GTID
    // capability makes MariaDB send its GTID events instead of BEGIN queries.
    conn.query_drop("SET @master_heartbeat_period = 5000000000, @mariadb_slave_capability = 4").await?;
    let file_name = files.file_name(start.from);
    let request =
        BinlogStreamRequest::new(replica_server_id).with_filename(file_name.as_bytes()).with_pos(start.from.pos);
    let mut binlog = conn.get_binlog_stream(request).await?;
    info!(from = %files.file_name(start.from), pos = start.from.pos, "reading the binlog");
    let mut file = start.from.file;
    let mut txn: Option<Txn> = None;
    let mut held: Option<Captured> = None;
    let send = |item: Captured| {
        let tx = tx.clone();
        async move { tx.send(Ok(item)).await.map_err(|_| closed()) }
    };
    let mut processed = start.from;
    let mut chunk_conn = None;
    let mut chunk: Option<Chunk> = None;
    let mut announced: Option<TableId> = None;
    let (mut next_end_check, mut near_end) = (Instant::now(), false);
    loop {
        // Online snapshots: a chunk is started once the stream is near the binlog's end (its read
        // view, which fixes its position, then stays open only briefly) and yielded when the
        // stream has read up to that position, between transactions.
        if txn.is_none() && chunk.is_none() && !start.online.is_empty() && Instant::now() >= next_end_check {
            next_end_check = Instant::now() + END_CHECK_EVERY;
            near_end = match server_end(&mut schema_conn, &files).await? {
                Some(end) => {
                    end <= processed || (end.file == processed.file && end.pos - processed.pos <= NEAR_END_BYTES)
                }
                None => true,
            };
        }
        if txn.is_none() {
            if let (None, Some(t), true) = (&chunk, start.online.front(), near_end) {
                let conn = match chunk_conn.take() {
                    Some(c) => c,
                    None => mysql_async::Conn::new(opts.clone()).await?,
                };
                if announced.as_ref() != Some(&t.table.schema.table) {
                    announced = Some(t.table.schema.table.clone());
                    if t.rows == 0 && t.after_key.is_none() {
                        info!(table = %t.table.schema.table, "online snapshot started");
                    } else {
                        info!(table = %t.table.schema.table, rows = t.rows, "online snapshot resumed after the last spooled chunk");
                    }
                }
                chunk = Some(chunks::start(conn, &files, t, start.chunk_rows, start.zero_dates).await?);
            }
            if chunk.as_ref().is_some_and(|c| processed >= c.at) {
                let c = chunk.take().expect("checked");
                let t = start.online.front_mut().expect("a chunk belongs to the first online table");
                chunk_conn = Some(emit_chunk(c, t, start.chunk_rows, &send).await?);
                if t.after_key.is_none() || t.table.schema.is_keyless() {
                    start.online.pop_front();
                }
                continue;
            }
        }
        let Some(event) = binlog.next().await else { break };
        let event = event.map_err(|e| purged(e, &files.file_name(start.from)))?;
        let header = event.header();
        let end = BinlogPos { file, pos: u64::from(header.log_pos()) };
        if header.log_pos() != 0 {
            processed = processed.max(end);
        }
        let time_us = i64::from(header.timestamp()) * 1_000_000;
        let raw_type = header.event_type_raw();
        if raw_type == MARIADB_GTID_EVENT {
            let data = event.data();
            let seq_no = data.get(..8).and_then(|b| b.try_into().ok()).map_or(0, u64::from_le_bytes);
            let flags = data.get(12).copied().unwrap_or(0);
            // A standalone group (DDL) has no XID: the query event that follows ends it.
            let _standalone = flags & FL_STANDALONE != 0;
            txn = Some(open(end, seq_no, time_us, &start.open_txn));
            continue;
        }
        if (MARIADB_QUERY_COMPRESSED_EVENT..=MARIADB_DELETE_ROWS_COMPRESSED_EVENT).contains(&raw_type) {
            return Err(SourceError::Prerequisite(
                "the server writes compressed binlog events, which the agent does not read: run SET GLOBAL \
                 log_bin_compress = OFF (the binlog from then on is read; restart the agent)"
                    .into(),
            ));
        }
        let Some(data) = event.read_data()? else { continue };
        match data {
            // The artificial rotate that opens the stream names the file asked for (and arrives
            // before the server says whether events carry checksums, so its name may too).
            EventData::RotateEvent(_) if header.log_pos() == 0 || header.flags_raw() & LOG_EVENT_ARTIFICIAL_F != 0 => {}
            EventData::RotateEvent(r) => {
                let next = files.position(&r.name(), r.position())?;
                file = next.file;
                processed = processed.max(next);
            }
            EventData::QueryEvent(q) => {
                let query = q.query();
                let word = query.split_whitespace().next().unwrap_or("").to_ascii_uppercase();
                match word.as_str() {
                    "BEGIN" => {
                        if txn.is_none() {
                            txn = Some(open(end, 0, time_us, &start.open_txn));
                        }
                    }
                    "COMMIT" => commit(&mut txn, &mut held, end, &send).await?,
                    _ => {
                        // DDL: reread every captured table (the statement's default database need
                        // not be the table's, and the tables are few).
                        let affected: Vec<TableId> = start.tables.keys().cloned().collect();
                        for t in affected {
                            match schema::read(&mut schema_conn, &t).await? {
                                Some(table) => {
                                    if start.tables.get(&t).map(|old| old.schema.version) != Some(table.schema.version)
                                    {
                                        info!(table = %t, "table shape changed in the binlog; following it");
                                    }
                                    start.tables.insert(t, table);
                                }
                                None => info!(table = %t, "captured table no longer exists"),
                            }
                        }
                        // A standalone statement ends its own GTID group.
                        commit(&mut txn, &mut held, end, &send).await?;
                    }
                }
            }
            EventData::XidEvent(_) => commit(&mut txn, &mut held, end, &send).await?,
            EventData::RowsEvent(rows) => {
                let Some(tme) = binlog.get_tme(rows.table_id()) else {
                    return Err(SourceError::Protocol(format!("row event for unknown table id {}", rows.table_id())));
                };
                let id = TableId::new(tme.database_name().to_string(), tme.table_name().to_string());
                let Some(t) = txn.as_mut() else {
                    return Err(SourceError::Protocol("row event outside a transaction".into()));
                };
                // Changes are numbered among all the transaction's rows, of every table, so a
                // restart inside it skips the same ones whatever source.tables says by then.
                let dropped = !start.tables.contains_key(&id)
                    || start.snapshotted_at.get(&id).is_some_and(|&at| t.name < at)
                    // A table whose online snapshot has not begun: its first chunk opens with a
                    // TRUNCATE, so its changes before that need not travel.
                    || start.online.iter().any(|o| o.table.schema.table == id && o.rows == 0 && o.after_key.is_none());
                if dropped {
                    let n = rows.rows(tme).count();
                    t.order = t.order.saturating_add(n as u32);
                    continue;
                }
                let columns = rows.num_columns() as usize;
                if start.tables[&id].schema.columns.len() != columns {
                    if let Some(table) = schema::read(&mut schema_conn, &id).await? {
                        start.tables.insert(id.clone(), table);
                    }
                }
                let table = &start.tables[&id];
                if table.schema.columns.len() != columns {
                    return Err(SourceError::Prerequisite(format!(
                        "the binlog's rows of {id} at {} have {columns} columns, the table now has {}: it changed \
                         again since that point, and the agent keeps no schema history; re-snapshot it \
                         (dongbo-agent resnapshot {id})",
                        files.file_name(end),
                        table.schema.columns.len()
                    )));
                }
                let changes = decode_rows(&rows, tme, table, start.zero_dates)?;
                for (op, before, after) in changes {
                    let order = t.order;
                    t.order += 1;
                    if order < t.skip {
                        continue;
                    }
                    // The old key for an update (the row it changes, which a key update moves).
                    let key = table.schema.key_of(before.as_deref().or(after.as_deref()).unwrap_or_default());
                    let change = ChangeEvent {
                        seq: 0,
                        table: table.schema.clone(),
                        op,
                        key,
                        before,
                        after,
                        position: Position::MySql(t.name),
                        commit_time_us: t.commit_time_us,
                        txid: t.txid,
                        txn_order: order,
                        txn_last: false,
                    };
                    if let Some(prev) = held.replace(Captured::Change { change, txn: Some(Position::MySql(t.name)) }) {
                        send(prev).await?;
                    }
                }
            }
            _ => {}
        }
    }
    Err(SourceError::Io(std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "the server ended the binlog stream")))
}

/// Error 1236 (the server cannot send from that position, e.g. its binlog was purged while the
/// link was down) gets what to do, in words: it never fixes itself.
fn purged(e: mysql_async::Error, from: &str) -> SourceError {
    match &e {
        mysql_async::Error::Server(s) if s.code == 1236 => SourceError::Prerequisite(format!(
            "the server cannot send its binlog from {from} any more ({}): changes from there on are gone \
             from the binlog. Keep binlogs longer (binlog_expire_logs_seconds) and take a new snapshot: stop \
             the agent, move its spool directory aside, start it",
            s.message
        )),
        _ => SourceError::MySql(e),
    }
}

/// Yields a read chunk (a TRUNCATE first if it opens its table) and its end with the table's
/// progress; `t.after_key` becomes `None` once the table is complete. Returns the connection.
async fn emit_chunk<F, Fut>(
    mut c: Chunk,
    t: &mut OnlineTable,
    limit: u64,
    send: &F,
) -> Result<mysql_async::Conn, SourceError>
where
    F: Fn(Captured) -> Fut,
    Fut: std::future::Future<Output = Result<(), SourceError>>,
{
    let schema = &t.table.schema;
    let event =
        |op, after: Option<Row>, order: u32| Captured::snapshot(schema, op, after, Position::MySql(c.at), 0, order);
    let mut order = 0u32;
    if t.rows == 0 && t.after_key.is_none() {
        send(event(Operation::Truncate, None, order)).await?;
        order += 1;
    }
    while let Some(row) = c.rows.recv().await {
        send(event(Operation::SnapshotRead, Some(row?), order)).await?;
        order = order.wrapping_add(1);
    }
    let (conn, last, count) = c.finish().await?;
    t.rows += count;
    let done = schema.is_keyless() || count < limit;
    if let Some(last) = last {
        t.after_key = Some(last);
    }
    let progress = TableProgress::new(schema.table.clone(), t.after_key.as_ref(), t.rows);
    send(Captured::ChunkDone { progress, done }).await?;
    if done {
        info!(table = %schema.table, rows = t.rows, "online snapshot complete");
        t.after_key = None;
    }
    Ok(conn)
}

fn open(name: BinlogPos, txid: u64, commit_time_us: i64, open_txn: &Option<OpenTxn>) -> Txn {
    let skip = match open_txn {
        Some(o) if o.txn == Position::MySql(name) => {
            info!(txn = %name, spooled = o.spooled, "resuming inside a transaction: its first changes are spooled already");
            o.spooled
        }
        _ => 0,
    };
    Txn { name, txid, order: 0, skip, commit_time_us }
}

async fn commit<F, Fut>(
    txn: &mut Option<Txn>,
    held: &mut Option<Captured>,
    end: BinlogPos,
    send: &F,
) -> Result<(), SourceError>
where
    F: Fn(Captured) -> Fut,
    Fut: std::future::Future<Output = Result<(), SourceError>>,
{
    *txn = None;
    if let Some(mut last) = held.take() {
        if let Captured::Change { change, .. } = &mut last {
            change.txn_last = true;
        }
        send(last).await?;
    }
    send(Captured::Commit { end: Position::MySql(end) }).await
}

/// A row image's column bitmap as flags.
fn present<I, B>(bits: I) -> Vec<bool>
where
    I: IntoIterator<Item = B>,
    B: std::ops::Deref<Target = bool>,
{
    bits.into_iter().map(|b| *b).collect()
}

type Decoded = (Operation, Option<Row>, Option<Row>);

/// Decodes a rows event's images value by value. `mysql_common`'s own row iterator builds a
/// column description (names, flags, charset) for every value of every row, which cost most of
/// the capture time; the values themselves are decoded by its `BinlogValue`, as there.
fn decode_rows<'a>(
    rows: &'a RowsEventData<'a>,
    tme: &'a TableMapEvent<'a>,
    table: &MyTable,
    zero: ZeroDates,
) -> Result<Vec<Decoded>, SourceError> {
    let op = match rows {
        RowsEventData::WriteRowsEvent(_) | RowsEventData::WriteRowsEventV1(_) => Operation::Insert,
        RowsEventData::UpdateRowsEvent(_) | RowsEventData::UpdateRowsEventV1(_) => Operation::Update,
        RowsEventData::DeleteRowsEvent(_) | RowsEventData::DeleteRowsEventV1(_) => Operation::Delete,
        RowsEventData::PartialUpdateRowsEvent(_) => {
            return Err(SourceError::Prerequisite(
                "the server logs partial JSON updates, which the agent does not apply: run SET GLOBAL \
                 binlog_row_value_options = ''"
                    .into(),
            ))
        }
    };
    let bad = |what: &str| SourceError::Protocol(format!("row event of {}: {what}", table.schema.table));
    let mut columns = Vec::with_capacity(table.kinds.len());
    for (i, kind) in table.kinds.iter().enumerate() {
        let col_type = tme.get_column_type(i).map_err(|e| bad(&e.to_string()))?.ok_or_else(|| bad("no column type"))?;
        let unsigned = matches!(kind, Kind::Int { unsigned: true, .. });
        columns.push((col_type, tme.get_column_metadata(i).unwrap_or(&[]), unsigned));
    }
    let before_cols = rows.columns_before_image().map(present);
    let after_cols = rows.columns_after_image().map(present);
    let image = |buf: &mut ParseBuf<'a>, cols: &[bool]| -> Result<Row, SourceError> {
        let n = cols.iter().filter(|&&c| c).count();
        let nulls: &[u8] = buf.parse(n.div_ceil(8))?;
        let mut out = Vec::with_capacity(table.kinds.len());
        let mut k = 0usize;
        for (i, kind) in table.kinds.iter().enumerate() {
            if !cols.get(i).copied().unwrap_or(false) {
                out.push(Value::UnchangedToast);
                continue;
            }
            let null = nulls[k / 8] & (1 << (k % 8)) != 0;
            k += 1;
            if null {
                out.push(Value::Null);
                continue;
            }
            let (col_type, meta, unsigned) = columns[i];
            match buf.parse::<BinlogValue<'a>>((col_type, meta, unsigned, false))? {
                BinlogValue::Value(v) => out.push(from_binlog(kind, v, zero)),
                _ => {
                    return Err(SourceError::Prerequisite(format!(
                        "column {} of {} holds MySQL binary JSON, which the agent does not decode yet",
                        table.schema.columns[i].name, table.schema.table
                    )))
                }
            }
        }
        Ok(out)
    };
    let mut buf = ParseBuf(rows.rows_data());
    let mut out = Vec::new();
    while !buf.is_empty() {
        let before = before_cols.as_deref().map(|c| image(&mut buf, c)).transpose()?;
        let mut after = after_cols.as_deref().map(|c| image(&mut buf, c)).transpose()?;
        // A column an update's after image leaves out (binlog_row_image MINIMAL or NOBLOB) did not
        // change: where the before image has it (the key, at least), that is its value, so an
        // update does not look like a key change.
        if let (Some(b), Some(a)) = (&before, &mut after) {
            for (new, old) in a.iter_mut().zip(b) {
                if *new == Value::UnchangedToast && *old != Value::UnchangedToast {
                    *new = old.clone();
                }
            }
        }
        out.push((op, before, after));
    }
    Ok(out)
}
