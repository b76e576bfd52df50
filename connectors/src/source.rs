//! The one contract between a source (Postgres logical replication today; MySQL/MariaDB binlog and
//! query polling next) and the agent's capture loop, with source-neutral positions.
//!
//! Contract:
//! - A source starts from the [`ResumePoint`] the agent stored atomically with its spool, and never
//!   yields again what that point says is spooled: whole transactions that ended at or before
//!   `committed_end`, and the first `spooled` changes of the transaction in `open_txn`.
//! - It yields changes in source commit order, each transaction's changes together, then a
//!   [`Captured::Commit`] with the position just past that transaction.
//! - An initial snapshot's rows come first (their `txn` is `None`), then [`Captured::SnapshotDone`]
//!   with the position the stream continues from: no gap, no overlap. It may open with
//!   [`Captured::SnapshotPlanned`], the rows the server expects it to read, for progress only.
//! - A table configured after the initial snapshot (not in `snapshotted`) is snapshotted when the
//!   source starts. Either before the stream resumes, announced by [`Captured::TablesSnapshotted`]
//!   with the position its snapshot was taken at (the stream then drops that table's changes which
//!   the snapshot already holds); or online ([`Captured::ChunkDone`]): in key-ordered chunks, each
//!   read at a known stream position and yielded exactly there, between transactions, so changes
//!   before it are older than its rows and changes after it newer, while the stream keeps
//!   flowing. A restart resumes after the last chunk in `snapshotting`.
//! - It releases nothing by itself: the agent calls [`Source::release`] once everything up to a
//!   position is durable in the spool; a source whose server keeps log for its readers (a
//!   Postgres slot) tells the server then, one whose server keeps log by time (a MySQL binlog) may
//!   ignore it.

use std::sync::Arc;

use tokio::time::Instant;

use crate::error::SourceError;
use crate::model::{ChangeEvent, Operation, Position, Row, TableId, TableSchema};

/// What the spool already holds, so a restart resumes without duplicates.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ResumePoint {
    /// The initial snapshot is fully spooled.
    pub snapshot_done: bool,
    /// Just past the last transaction fully spooled (or where the snapshot's stream starts);
    /// `None` before anything was spooled.
    pub committed_end: Option<Position>,
    /// A transaction spooled in part.
    pub open_txn: Option<OpenTxn>,
    /// The tables whose snapshot is spooled; `None` in a spool written before the agent recorded
    /// them (its snapshot then covered the tables configured at the time).
    pub snapshotted: Option<Vec<SnapshottedTable>>,
    /// A table whose online snapshot is under way, with the chunks spooled so far.
    pub snapshotting: Option<TableProgress>,
    /// A polled source's watermarks, one per table whose first full read is spooled.
    pub poll_marks: Vec<PollMark>,
}

/// A polled table's watermarks (the highest cursor value read, and where the settled sweep goes
/// on from; see [`crate::poll`]). Spooled only after every change read up to them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PollMark {
    /// The table.
    pub table: TableId,
    /// The marks, encoded by [`crate::wire::encode_row`] as one row.
    pub cursor: Vec<u8>,
}

/// An online snapshot under way: its chunks up to `after_key` are spooled, in stream order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TableProgress {
    /// The table.
    pub table: TableId,
    /// The key of the last row spooled, encoded by [`crate::wire::encode_row`]; empty before the
    /// first chunk.
    pub after_key: Vec<u8>,
    /// Rows spooled so far.
    pub rows: u64,
}

/// A table whose snapshot is spooled.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapshottedTable {
    /// The table.
    pub table: TableId,
    /// For a table snapshotted after the initial snapshot: the position its snapshot was taken at;
    /// the stream's changes of it from transactions before that are in the snapshot.
    pub taken_at: Option<Position>,
}

/// A transaction of which a prefix is spooled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OpenTxn {
    /// The transaction, as the source names it (Postgres: its commit LSN).
    pub txn: Position,
    /// Changes already spooled (they are `txn_order` 0 to `spooled - 1`).
    pub spooled: u32,
}

impl TableProgress {
    /// The progress of `table` after `rows` rows, the last of key `after_key`.
    pub fn new(table: TableId, after_key: Option<&Row>, rows: u64) -> Self {
        Self { table, after_key: after_key.cloned().map(crate::wire::encode_row).unwrap_or_default(), rows }
    }

    /// The key of the last row spooled, `None` before the first chunk; an error names a damaged spool.
    pub fn decoded_after_key(&self) -> Result<Option<Row>, SourceError> {
        if self.after_key.is_empty() {
            return Ok(None);
        }
        crate::wire::decode_row(&self.after_key).map(Some).map_err(|e| {
            SourceError::Prerequisite(format!("the spool's snapshot progress of {} is damaged: {e}", self.table))
        })
    }
}

/// What a source's server keeps of its log for one agent (the WAL behind a Postgres slot, the
/// binlog from a MySQL position), for operators: how much, and how much more before changes the
/// spool has not read are gone.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RetainedLog {
    /// Bytes of log kept from the agent's position to the server's end.
    pub retained_bytes: u64,
    /// Bytes more the server keeps before it gives the position up, when it is bounded by size
    /// (Postgres `max_slot_wal_keep_size`).
    pub headroom_bytes: Option<u64>,
    /// Seconds the server keeps the position at least, when it is bounded by time (MySQL binlog
    /// expiry).
    pub headroom_s: Option<f64>,
}

/// One item captured from a source.
#[derive(Debug, Clone, PartialEq)]
pub enum Captured {
    /// A row change of transaction `txn` (`None` for a snapshot row).
    Change {
        /// The change.
        change: ChangeEvent,
        /// Its transaction.
        txn: Option<Position>,
    },
    /// A transaction ended: once everything before is durable, release `end`.
    Commit {
        /// Just past the transaction.
        end: Position,
    },
    /// A snapshot starts and expects to read about `estimated_rows` rows in all (the server's
    /// statistics, or a count where it has none): shown as progress, never relied on.
    SnapshotPlanned {
        /// The estimate.
        estimated_rows: u64,
    },
    /// The snapshot is complete; streaming continues from `at`.
    SnapshotDone {
        /// Where the stream starts.
        at: Position,
        /// The tables it read.
        tables: Vec<TableId>,
    },
    /// A chunk of an online snapshot is complete (its rows came just before, at the stream
    /// position the chunk was read at): spool it with the table's progress, or (`done`) with the
    /// table among the snapshotted ones.
    ChunkDone {
        /// How far the table is.
        progress: TableProgress,
        /// The table is complete.
        done: bool,
    },
    /// A poll cycle is complete: every change it read came before. Spool `marks` (the watermarks
    /// of every table polled so far) with them, and `end` as the committed end.
    Polled {
        /// The cycle, as a position.
        end: Position,
        /// The watermarks.
        marks: Vec<PollMark>,
    },
    /// Tables added to the configuration are snapshotted (at `at`); the stream resumes where it was.
    TablesSnapshotted {
        /// Where their snapshot was taken.
        at: Position,
        /// The tables.
        tables: Vec<TableId>,
    },
}

impl Captured {
    /// A snapshot item, outside any transaction: the TRUNCATE that opens a table's snapshot, or a
    /// row it read (`after`), at stream position `at`; `order` numbers it within the snapshot.
    pub fn snapshot(
        table: &Arc<TableSchema>,
        op: Operation,
        after: Option<Row>,
        at: Position,
        read_at_us: i64,
        order: u32,
    ) -> Self {
        let key = after.as_ref().map(|r| table.key_of(r)).unwrap_or_default();
        let change = ChangeEvent {
            seq: 0,
            table: table.clone(),
            op,
            key,
            before: None,
            after,
            position: at,
            commit_time_us: read_at_us,
            txid: 0,
            txn_order: order,
            txn_last: false,
        };
        Captured::Change { change, txn: None }
    }
}

/// A running source.
#[allow(async_fn_in_trait)] // used generically by the agent, never as a trait object
pub trait Source: Send {
    /// The next captured item, or `Ok(None)` if `until` passed first. Not cancel safe: bound the
    /// wait with `until` instead of dropping the future.
    async fn next(&mut self, until: Instant) -> Result<Option<Captured>, SourceError>;

    /// Keeps the session alive while capture is paused (the spool is full).
    async fn keep_alive(&mut self) -> Result<(), SourceError>;

    /// Everything up to `upto` is durable in the spool.
    fn release(&self, upto: Position);

    /// Whether the spool keeps, atomically with each batch, the shadow entry of each change
    /// ([`crate::poll::shadow_entry`]): a polled source finds what changed by comparing with it.
    fn keeps_shadow(&self) -> bool {
        false
    }
}
