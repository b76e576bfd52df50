//! The Postgres source: a consistent initial snapshot, then logical replication with `pgoutput`.
//!
//! # Snapshot
//! On first start (or when the agent's spool says the snapshot never finished) the source drops any
//! slot of its name, creates it with `EXPORT_SNAPSHOT`, and reads every table with `COPY` inside that
//! snapshot ([`snapshot`]). Streaming then starts at the slot's consistent point: no gap, no overlap.
//!
//! # Streaming
//! `START_REPLICATION` with `proto_version '1'` over the replication protocol ([`protocol`]), decoded
//! by [`pgoutput`]. Each change carries its transaction's commit LSN; the last change of a
//! transaction is marked `txn_last`, followed by [`Captured::Commit`].
//!
//! # Progress and acknowledgement
//! The source never confirms on its own. The agent calls [`crate::source::Source::release`] with a
//! commit's end LSN once everything up to it is durable in the spool, and the source reports that
//! position in its standby status updates, so the slot holds WAL only for what the spool does not have yet. While
//! nothing is in flight, a server keepalive's WAL end is released too: an idle captured database
//! must not pin WAL that other databases on the server produce.
//!
//! After a restart the server resends from the slot's confirmed position, which may be behind the
//! spool. [`ResumePoint`] (stored by the agent atomically with its spool) drops that replayed prefix:
//! whole transactions whose commit precedes `committed_end`, and the first `spooled` changes of a
//! large transaction that was spooled in part.
//!
//! # Errors
//! [`SourceError::is_transient`] separates a dropped connection (retry with backoff) from a setup
//! problem such as `wal_level` or a table without primary key (stop and say what to change).

pub mod catalog;
pub mod check;
pub mod config;
pub mod pgoutput;
pub mod protocol;
pub mod session;
pub mod snapshot;
pub mod text;
pub mod tls;

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;
use tokio_postgres::Client;
use tracing::{info, warn};

pub use self::config::PostgresConfig;
use self::pgoutput::{PgOutput, TupleValue};
use self::protocol::{ReplicationConnection, ReplicationMessage};
use self::snapshot::SnapshotReader;
pub use crate::error::SourceError;
use crate::model::{ChangeEvent, Lsn, Operation, Position, Row, TableId, TableSchema, Value};
pub use crate::source::{Captured, OpenTxn, ResumePoint, SnapshottedTable};

/// The LSN of a position this source wrote. A position of another kind means the spool belongs to
/// another kind of source: a definite error, not something to guess around.
fn lsn_of(p: Position) -> Result<Lsn, SourceError> {
    match p {
        Position::Postgres(lsn) => Ok(lsn),
        Position::MySql(_) => Err(SourceError::Prerequisite(
            "the spool holds MySQL binlog positions but source.kind is postgres: a spool belongs to one \
             source; point spool.path at a new directory for this source"
                .into(),
        )),
    }
}

/// The position up to which everything is durable downstream, which the source reports to the
/// server. Only moves forward.
#[derive(Debug, Default)]
struct Released(AtomicU64);

impl Released {
    fn new(lsn: Lsn) -> Self {
        Self(AtomicU64::new(lsn.0))
    }

    fn release(&self, upto: Lsn) {
        self.0.fetch_max(upto.0, Ordering::AcqRel);
    }

    fn get(&self) -> Lsn {
        Lsn(self.0.load(Ordering::Acquire))
    }
}

struct TxnState {
    final_lsn: Lsn,
    commit_time_us: i64,
    xid: u32,
    next_order: u32,
    skip_all: bool,
    skip_first: u32,
}

enum Phase {
    /// The initial snapshot, or (`added`) the snapshot of tables configured since.
    Snapshot {
        reader: SnapshotReader,
        added: bool,
    },
    Streaming,
}

/// Captures changes from one Postgres database.
pub struct PostgresSource {
    config: PostgresConfig,
    client: Client,
    repl: ReplicationConnection,
    phase: Phase,
    relations: HashMap<u32, Arc<TableSchema>>,
    /// End of the last transaction the spool holds whole.
    committed_end: Lsn,
    /// A transaction the spool holds in part: its commit LSN and how many of its changes.
    open_txn: Option<(Lsn, u32)>,
    /// Tables snapshotted after the initial snapshot, with the LSN their snapshot was taken at.
    snapshotted_at: HashMap<TableId, Lsn>,
    txn: Option<TxnState>,
    held: Option<(ChangeEvent, Lsn)>,
    out: VecDeque<Captured>,
    last_commit_seen: Lsn,
    released: Released,
    next_feedback: Instant,
}

impl PostgresSource {
    /// Connects, checks prerequisites, and either resumes streaming after what `resume` says the
    /// spool holds or starts a new snapshot.
    pub async fn start(config: PostgresConfig, resume: ResumePoint) -> Result<Self, SourceError> {
        let committed_end = resume.committed_end.map(lsn_of).transpose()?.unwrap_or_default();
        let open_txn = resume.open_txn.map(|o| lsn_of(o.txn).map(|l| (l, o.spooled))).transpose()?;
        let password = config.resolve_password()?;
        let client = config.connect_query().await?;
        let report = check::run(&client, &config).await?;
        if let Some(problem) = report.first_problem() {
            return Err(SourceError::Prerequisite(problem));
        }
        check::ensure_publication(&client, &config).await?;
        let mut repl = ReplicationConnection::connect(&config.target(password.as_deref())).await?;
        let mut snapshotted_at = HashMap::new();
        let phase = if resume.snapshot_done {
            let slot = client
                .query_opt(
                    "SELECT 1 FROM pg_replication_slots WHERE slot_name = $1 AND database = current_database()",
                    &[&config.slot],
                )
                .await?;
            if slot.is_none() {
                return Err(SourceError::Prerequisite(format!(
                    "replication slot {} is gone, so changes since the spool's last position cannot be read: \
                     stop the agent, move its spool directory aside and start it again to take a new snapshot",
                    config.slot
                )));
            }
            // A spool from before the agent recorded its tables snapshotted the tables configured then.
            let snapshotted = resume.snapshotted.clone().unwrap_or_else(|| {
                config.table_ids().into_iter().map(|table| SnapshottedTable { table, taken_at: None }).collect()
            });
            for s in &snapshotted {
                if let Some(at) = s.taken_at {
                    snapshotted_at.insert(s.table.clone(), lsn_of(at)?);
                }
            }
            let added: Vec<TableId> =
                config.table_ids().into_iter().filter(|t| !snapshotted.iter().any(|s| &s.table == t)).collect();
            if added.is_empty() {
                // 0/0 lets the server start at the slot's confirmed position; the resume point drops
                // what the spool already has.
                repl.start_replication(&config.slot, Lsn(0), &config.publication).await?;
                info!(slot = %config.slot, %committed_end, "streaming resumed");
                Phase::Streaming
            } else {
                // A temporary slot exports a snapshot for the added tables; the stream resumes once
                // they are read, and drops their changes from before that snapshot.
                let temp = format!("{}_added", config.slot);
                let rows = repl
                    .simple_query(&format!("CREATE_REPLICATION_SLOT {temp} TEMPORARY LOGICAL pgoutput EXPORT_SNAPSHOT"))
                    .await?;
                let (at, snapshot_name) = exported_snapshot(&rows)?;
                begin_snapshot(&client, &snapshot_name).await?;
                // Imported: the temporary slot need not hold WAL any longer.
                repl.simple_query(&format!("DROP_REPLICATION_SLOT {temp}")).await?;
                for t in &added {
                    snapshotted_at.insert(t.clone(), at);
                }
                info!(tables = ?added.iter().map(ToString::to_string).collect::<Vec<_>>(), %at, "snapshot of tables added to source.tables or marked by resnapshot started");
                Phase::Snapshot { reader: SnapshotReader::new(added, at), added: true }
            }
        } else {
            client
                .execute(
                    "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE slot_name = $1 AND database = current_database()",
                    &[&config.slot],
                )
                .await?;
            let rows = repl
                .simple_query(&format!("CREATE_REPLICATION_SLOT {} LOGICAL pgoutput EXPORT_SNAPSHOT", config.slot))
                .await?;
            let (consistent_point, snapshot_name) = exported_snapshot(&rows)?;
            begin_snapshot(&client, &snapshot_name).await?;
            info!(slot = %config.slot, %consistent_point, "slot created, snapshot started");
            Phase::Snapshot { reader: SnapshotReader::new(config.table_ids(), consistent_point), added: false }
        };
        Ok(Self {
            next_feedback: Instant::now() + Duration::from_millis(config.feedback_interval_ms),
            config,
            client,
            repl,
            phase,
            relations: HashMap::new(),
            released: Released::new(committed_end),
            last_commit_seen: committed_end,
            committed_end,
            open_txn,
            snapshotted_at,
            txn: None,
            held: None,
            out: VecDeque::new(),
        })
    }

    async fn next_item(&mut self, until: Instant) -> Result<Option<Captured>, SourceError> {
        loop {
            if let Some(c) = self.out.pop_front() {
                return Ok(Some(c));
            }
            if let Phase::Snapshot { reader, added } = &mut self.phase {
                match reader.next(&self.client, until).await? {
                    Some(item) => return Ok(item),
                    None => {
                        let (at, tables, added) = (reader.consistent_point(), reader.tables().to_vec(), *added);
                        self.client.batch_execute("COMMIT").await?;
                        self.phase = Phase::Streaming;
                        if added {
                            self.repl.start_replication(&self.config.slot, Lsn(0), &self.config.publication).await?;
                            info!(%at, "snapshot of added tables complete, streaming resumed");
                            return Ok(Some(Captured::TablesSnapshotted { at: Position::Postgres(at), tables }));
                        }
                        self.repl.start_replication(&self.config.slot, at, &self.config.publication).await?;
                        self.released.release(at);
                        self.last_commit_seen = self.last_commit_seen.max(at);
                        info!(%at, "snapshot complete, streaming started");
                        return Ok(Some(Captured::SnapshotDone { at: Position::Postgres(at), tables }));
                    }
                }
            }
            let wake = until.min(self.next_feedback);
            match tokio::time::timeout_at(wake, self.repl.next_message()).await {
                Ok(msg) => self.handle(msg?).await?,
                Err(_) if Instant::now() >= self.next_feedback => self.send_feedback().await?,
                Err(_) => return Ok(None),
            }
        }
    }

    /// Sends a status update if one is due, so the server keeps the connection of a paused capture.
    async fn keep_session(&mut self) -> Result<(), SourceError> {
        if matches!(self.phase, Phase::Streaming) && Instant::now() >= self.next_feedback {
            self.send_feedback().await?;
        }
        Ok(())
    }

    async fn send_feedback(&mut self) -> Result<(), SourceError> {
        // The slot's confirmed position is what the spool made durable, never more.
        self.repl.send_status(self.released.get()).await?;
        self.next_feedback = Instant::now() + Duration::from_millis(self.config.feedback_interval_ms);
        Ok(())
    }

    async fn handle(&mut self, msg: ReplicationMessage) -> Result<(), SourceError> {
        match msg {
            ReplicationMessage::Keepalive { wal_end, reply } => {
                let quiet = self.txn.is_none() && self.held.is_none() && self.out.is_empty();
                if quiet && self.released.get() >= self.last_commit_seen {
                    self.released.release(wal_end);
                }
                if reply {
                    self.send_feedback().await?;
                }
            }
            ReplicationMessage::XLogData { data, .. } => self.handle_pgoutput(pgoutput::decode(data)?).await?,
        }
        Ok(())
    }

    async fn handle_pgoutput(&mut self, msg: PgOutput) -> Result<(), SourceError> {
        match msg {
            PgOutput::Begin { final_lsn, commit_time_us, xid } => {
                let skip_first = match self.open_txn {
                    Some((open, spooled)) if open == final_lsn => spooled,
                    _ => 0,
                };
                let skip_all = final_lsn < self.committed_end;
                self.txn = Some(TxnState { final_lsn, commit_time_us, xid, next_order: 0, skip_all, skip_first });
            }
            PgOutput::Commit { end_lsn } => {
                let txn = self.txn.take().ok_or_else(|| SourceError::Protocol("Commit without Begin".into()))?;
                if let Some((mut change, lsn)) = self.held.take() {
                    change.txn_last = true;
                    self.out.push_back(Captured::Change { change, txn: Some(Position::Postgres(lsn)) });
                }
                if !txn.skip_all {
                    self.out.push_back(Captured::Commit { end: Position::Postgres(end_lsn) });
                    self.last_commit_seen = end_lsn;
                }
                if self.open_txn.is_some_and(|(open, _)| open == txn.final_lsn) {
                    self.open_txn = None;
                }
            }
            PgOutput::Relation { relid, namespace, name, replica_identity, columns } => {
                let table = TableId::new(namespace, name);
                let identity = replica_identity as char;
                let schema = catalog::relation_schema(&self.client, relid, table, identity, &columns).await?;
                if let Some(old) = self.relations.get(&relid) {
                    if old.version != schema.version {
                        info!(table = %schema.table, "table shape changed at the source");
                    }
                }
                self.relations.insert(relid, Arc::new(schema));
            }
            PgOutput::Insert { relid, new } => {
                let schema = self.relation(relid)?;
                let after = tuple_row(&schema, new)?;
                let key = schema.key_of(&after);
                self.push_change(schema, Operation::Insert, key, None, Some(after));
            }
            PgOutput::Update { relid, old, new } => {
                let schema = self.relation(relid)?;
                let after = tuple_row(&schema, new)?;
                let before = old.map(|o| tuple_row(&schema, o)).transpose()?;
                let key = schema.key_of(before.as_ref().unwrap_or(&after));
                self.push_change(schema, Operation::Update, key, before, Some(after));
            }
            PgOutput::Delete { relid, old } => {
                let schema = self.relation(relid)?;
                let before = tuple_row(&schema, old)?;
                let key = schema.key_of(&before);
                self.push_change(schema, Operation::Delete, key, Some(before), None);
            }
            PgOutput::Truncate { relids } => {
                for relid in relids {
                    let schema = self.relation(relid)?;
                    self.push_change(schema, Operation::Truncate, Vec::new(), None, None);
                }
            }
            PgOutput::Ignored => {}
        }
        Ok(())
    }

    fn relation(&self, relid: u32) -> Result<Arc<TableSchema>, SourceError> {
        self.relations
            .get(&relid)
            .cloned()
            .ok_or_else(|| SourceError::Protocol(format!("change for relation {relid} before its Relation message")))
    }

    fn push_change(
        &mut self,
        table: Arc<TableSchema>,
        op: Operation,
        key: Row,
        before: Option<Row>,
        after: Option<Row>,
    ) {
        let Some(txn) = self.txn.as_mut() else {
            warn!("change outside a transaction ignored");
            return;
        };
        let order = txn.next_order;
        txn.next_order += 1;
        // A table snapshotted after the initial snapshot: its changes from transactions that
        // committed before that snapshot are in it already.
        // (Empty but for a while after such a snapshot: no lookup per change otherwise.)
        let in_snapshot = !self.snapshotted_at.is_empty()
            && self.snapshotted_at.get(&table.table).is_some_and(|&at| txn.final_lsn < at);
        if txn.skip_all || order < txn.skip_first || in_snapshot {
            return;
        }
        let change = ChangeEvent {
            seq: 0,
            table,
            op,
            key,
            before,
            after,
            position: Position::Postgres(txn.final_lsn),
            commit_time_us: txn.commit_time_us,
            txid: u64::from(txn.xid),
            txn_order: order,
            txn_last: false,
        };
        if let Some((prev, lsn)) = self.held.replace((change, txn.final_lsn)) {
            self.out.push_back(Captured::Change { change: prev, txn: Some(Position::Postgres(lsn)) });
        }
    }
}

impl crate::source::Source for PostgresSource {
    async fn next(&mut self, until: Instant) -> Result<Option<Captured>, SourceError> {
        self.next_item(until).await
    }

    async fn keep_alive(&mut self) -> Result<(), SourceError> {
        self.keep_session().await
    }

    /// Reported to the server in the next standby status update: the slot then frees the WAL.
    fn release(&self, upto: Position) {
        if let Ok(lsn) = lsn_of(upto) {
            self.released.release(lsn);
        }
    }
}

/// The consistent point and snapshot name of a `CREATE_REPLICATION_SLOT … EXPORT_SNAPSHOT` answer.
fn exported_snapshot(rows: &[Vec<Option<String>>]) -> Result<(Lsn, String), SourceError> {
    let row = rows.first().ok_or_else(|| SourceError::Protocol("CREATE_REPLICATION_SLOT returned no row".into()))?;
    let field = |i: usize| {
        row.get(i).cloned().flatten().ok_or_else(|| SourceError::Protocol("short CREATE_REPLICATION_SLOT row".into()))
    };
    let consistent_point: Lsn = field(1)?.parse().map_err(SourceError::Protocol)?;
    Ok((consistent_point, field(2)?))
}

/// Opens the query connection's read-only transaction on an exported snapshot.
async fn begin_snapshot(client: &Client, snapshot_name: &str) -> Result<(), SourceError> {
    client.batch_execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY").await?;
    client.batch_execute(&format!("SET TRANSACTION SNAPSHOT '{}'", snapshot_name.replace('\'', "''"))).await?;
    Ok(())
}

fn tuple_row(schema: &TableSchema, values: Vec<TupleValue>) -> Result<Row, SourceError> {
    if values.len() != schema.columns.len() {
        return Err(SourceError::Protocol(format!(
            "tuple of {} has {} columns, its Relation message {}",
            schema.table,
            values.len(),
            schema.columns.len()
        )));
    }
    Ok(values
        .into_iter()
        .zip(&schema.columns)
        .map(|(v, c)| match v {
            TupleValue::Null => Value::Null,
            TupleValue::UnchangedToast => Value::UnchangedToast,
            TupleValue::Text(bytes) => {
                text::parse_value(c.type_oid, &c.type_name, String::from_utf8_lossy(&bytes).into_owned())
            }
        })
        .collect())
}
