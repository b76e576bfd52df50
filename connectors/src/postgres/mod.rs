//! The Postgres source: a consistent initial snapshot, then logical replication with `pgoutput`.
//!
//! # Snapshot
//! On first start (or when the agent's spool says the snapshot never finished) the source drops any
//! slot of its name, creates it with `EXPORT_SNAPSHOT`, and reads every table with `COPY` inside that
//! snapshot ([`snapshot`]), `snapshot_parallel_tables` tables at once, each reader on its own
//! connection that imported the same snapshot. Streaming then starts at the slot's consistent point: no gap, no overlap.
//!
//! # Online snapshots
//! A table added to `source.tables` after the initial snapshot (or marked by `resnapshot`) is read
//! while the stream flows, in primary-key chunks of `snapshot_chunk_rows`. Each chunk is read in
//! the snapshot a temporary slot exports when it is created, so its rows hold exactly the
//! transactions that committed before the slot's consistent point C; the stream yields the chunk
//! just before the first transaction committing at or after C (or when the server, asked, says it
//! has sent everything before C), so the table's older changes precede the chunk's rows and its
//! newer ones follow: no gap, no overlap, no write to the source. The first chunk opens with a
//! TRUNCATE (the table's earlier changes are not sent); each chunk's end is spooled with the
//! table's progress, and a restart reads on after the last key. A table without primary key is
//! one chunk. The chunks use a second replication connection (for the temporary slots, named
//! `<slot>_chunk`) and a second query connection.
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
pub mod retention;
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
pub use crate::source::{Captured, OpenTxn, ResumePoint, SnapshottedTable, TableProgress};

/// The LSN of a position this source wrote. A position of another kind means the spool belongs to
/// another kind of source: a definite error, not something to guess around.
fn lsn_of(p: Position) -> Result<Lsn, SourceError> {
    match p {
        Position::Postgres(lsn) => Ok(lsn),
        other => Err(other.of_another_source("postgres")),
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
    /// The initial snapshot: tables split among readers that share the slot's exported snapshot,
    /// each on its own connection (the first on `client`), taken from in turn.
    Snapshot {
        readers: Vec<ParallelReader>,
        turn: usize,
        at: Lsn,
        tables: Vec<TableId>,
    },
    Streaming,
}

/// One reader of the initial snapshot and its connection (`None`: the source's `client`).
struct ParallelReader {
    client: Option<Client>,
    reader: SnapshotReader,
}

/// A table whose online snapshot is to be read or is under way.
struct OnlineTable {
    schema: Arc<TableSchema>,
    after_key: Option<Row>,
    rows: u64,
}

/// A chunk of an online snapshot: read in the snapshot a temporary slot exported at `at`, yielded
/// when the stream reaches `at`.
struct Chunk {
    at: Lsn,
    reader: SnapshotReader,
    due: bool,
    last_key: Option<Row>,
    count: u64,
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
    /// Online snapshots, in order; the first may be under way.
    online: VecDeque<OnlineTable>,
    chunk: Option<Chunk>,
    /// A Begin of a transaction after the chunk's position, handled once the chunk is yielded.
    deferred: Option<PgOutput>,
    /// The replication connection that makes each chunk's temporary slot.
    chunk_repl: Option<ReplicationConnection>,
    /// The query connection that reads chunks: apart from `client`, which the stream needs for
    /// catalog lookups while a chunk's `COPY` waits unread.
    chunk_client: Option<Client>,
    announced: Option<TableId>,
    next_reply_request: Instant,
    /// How far the stream has read (commits and keepalives), and whether that was near the WAL's
    /// end when last asked.
    seen_upto: Lsn,
    near_end: bool,
    next_end_check: Instant,
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
        let mut online = VecDeque::new();
        let mut planned = None;
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
            // Online snapshots: the table under way first, then tables configured since.
            if let Some(p) = &resume.snapshotting {
                if config.table_ids().contains(&p.table) {
                    let after_key = p.decoded_after_key()?;
                    online.push_back(OnlineTable {
                        schema: online_schema(&client, &p.table).await?,
                        after_key,
                        rows: p.rows,
                    });
                }
            }
            for t in config.table_ids() {
                let under_way = resume.snapshotting.as_ref().is_some_and(|p| p.table == t);
                if !snapshotted.iter().any(|s| s.table == t) && !under_way {
                    online.push_back(OnlineTable {
                        schema: online_schema(&client, &t).await?,
                        after_key: None,
                        rows: 0,
                    });
                }
            }
            // 0/0 lets the server start at the slot's confirmed position; the resume point drops
            // what the spool already has.
            repl.start_replication(&config.slot, Lsn(0), &config.publication).await?;
            info!(slot = %config.slot, %committed_end, "streaming resumed");
            Phase::Streaming
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
            let tables = config.table_ids();
            let n = config.snapshot_parallel_tables.clamp(1, tables.len().max(1));
            let mut groups: Vec<Vec<TableId>> = vec![Vec::new(); n];
            for (i, t) in tables.iter().enumerate() {
                groups[i % n].push(t.clone());
            }
            // Every reader imports the one exported snapshot before the replication connection
            // runs anything else (which would end the export).
            let mut readers = Vec::with_capacity(n);
            for (i, group) in groups.into_iter().enumerate() {
                let own = if i == 0 { None } else { Some(config.connect_query().await?) };
                begin_snapshot(own.as_ref().unwrap_or(&client), &snapshot_name).await?;
                readers.push(ParallelReader { client: own, reader: SnapshotReader::new(group, consistent_point) });
            }
            let estimated_rows = catalog::snapshot_rows(&client, &tables).await?;
            planned = Some(Captured::SnapshotPlanned { estimated_rows });
            info!(slot = %config.slot, %consistent_point, readers = n, estimated_rows, "slot created, snapshot started");
            Phase::Snapshot { readers, turn: 0, at: consistent_point, tables }
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
            out: planned.into_iter().collect(),
            online,
            chunk: None,
            deferred: None,
            chunk_repl: None,
            chunk_client: None,
            announced: None,
            next_reply_request: Instant::now(),
            seen_upto: committed_end,
            near_end: false,
            next_end_check: Instant::now(),
        })
    }

    async fn next_item(&mut self, until: Instant) -> Result<Option<Captured>, SourceError> {
        loop {
            if let Some(c) = self.out.pop_front() {
                return Ok(Some(c));
            }
            if let Phase::Snapshot { readers, turn, at, tables } = &mut self.phase {
                if readers.is_empty() {
                    let (at, tables) = (*at, std::mem::take(tables));
                    self.phase = Phase::Streaming;
                    self.repl.start_replication(&self.config.slot, at, &self.config.publication).await?;
                    self.released.release(at);
                    self.last_commit_seen = self.last_commit_seen.max(at);
                    info!(%at, "snapshot complete, streaming started");
                    return Ok(Some(Captured::SnapshotDone { at: Position::Postgres(at), tables }));
                }
                let i = *turn % readers.len();
                let r = &mut readers[i];
                let client = r.client.as_ref().unwrap_or(&self.client);
                match r.reader.next(client, until).await? {
                    Some(item) => {
                        *turn = i + 1;
                        return Ok(item);
                    }
                    None => {
                        client.batch_execute("COMMIT").await?;
                        readers.remove(i);
                        continue;
                    }
                }
            }
            let between_txns = self.txn.is_none() && self.held.is_none();
            if between_txns && self.chunk.is_none() && !self.online.is_empty() && self.near_wal_end().await? {
                self.start_chunk().await?;
            }
            if self.chunk.as_ref().is_some_and(|c| c.due) {
                match self.next_chunk_item(until).await? {
                    Some(Some(item)) => return Ok(Some(item)),
                    Some(None) => return Ok(None),
                    None => continue,
                }
            }
            if self.chunk.is_some() && Instant::now() >= self.next_reply_request {
                // An idle stream says how far it has sent only when asked.
                self.repl.send_status(self.released.get(), true).await?;
                self.next_reply_request = Instant::now() + Duration::from_millis(100);
            }
            let mut wake = until.min(self.next_feedback);
            if self.chunk.is_some() {
                wake = wake.min(self.next_reply_request);
            }
            match tokio::time::timeout_at(wake, self.repl.next_message()).await {
                Ok(msg) => self.handle(msg?).await?,
                Err(_) if Instant::now() >= self.next_feedback => self.send_feedback().await?,
                Err(_) if Instant::now() < until => {}
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
        self.repl.send_status(self.released.get(), false).await?;
        self.next_feedback = Instant::now() + Duration::from_millis(self.config.feedback_interval_ms);
        Ok(())
    }

    async fn handle(&mut self, msg: ReplicationMessage) -> Result<(), SourceError> {
        match msg {
            ReplicationMessage::Keepalive { wal_end, reply } => {
                self.seen_upto = self.seen_upto.max(wal_end);
                let quiet = self.txn.is_none() && self.held.is_none() && self.out.is_empty();
                if let Some(c) = self.chunk.as_mut() {
                    // The server has sent everything before the chunk's position.
                    if self.txn.is_none() && self.held.is_none() && wal_end >= c.at {
                        c.due = true;
                    }
                }
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
        if let (PgOutput::Begin { final_lsn, .. }, Some(c)) = (&msg, self.chunk.as_mut()) {
            // A transaction the chunk's snapshot does not hold: the chunk comes first.
            if *final_lsn >= c.at {
                c.due = true;
                self.deferred = Some(msg);
                return Ok(());
            }
        }
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
                self.seen_upto = self.seen_upto.max(end_lsn);
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

    /// Whether the stream has read close to the server's WAL end, asked at most every 200 ms: a
    /// chunk's snapshot is held open until the stream reaches its position, so a chunk does not
    /// start while the stream works through a backlog.
    async fn near_wal_end(&mut self) -> Result<bool, SourceError> {
        const NEAR_END_BYTES: u64 = 16 << 20;
        if Instant::now() >= self.next_end_check {
            self.next_end_check = Instant::now() + Duration::from_millis(200);
            let row = self.client.query_one("SELECT (pg_current_wal_lsn() - '0/0')::int8", &[]).await?;
            let end = row.try_get::<_, i64>(0)? as u64;
            self.near_end = end.saturating_sub(self.seen_upto.0) <= NEAR_END_BYTES;
            if !self.near_end {
                // The server says how far it has sent only when asked (or every wal_sender_timeout
                // / 2): WAL of other databases moves the end without a commit here.
                self.repl.send_status(self.released.get(), true).await?;
            }
        }
        Ok(self.near_end)
    }

    /// Opens the next chunk of the first online table: a temporary slot exports a snapshot (its
    /// consistent point is the chunk's position), the query connection imports it, the slot goes.
    async fn start_chunk(&mut self) -> Result<(), SourceError> {
        let Some(t) = self.online.front() else { return Ok(()) };
        let table = t.schema.table.clone();
        if self.announced.as_ref() != Some(&table) {
            self.announced = Some(table.clone());
            if t.rows == 0 && t.after_key.is_none() {
                info!(%table, "online snapshot started");
            } else {
                info!(%table, rows = t.rows, "online snapshot resumed after the last spooled chunk");
            }
        }
        let repl = match self.chunk_repl.as_mut() {
            Some(r) => r,
            None => {
                let password = self.config.resolve_password()?;
                let r = ReplicationConnection::connect(&self.config.target(password.as_deref())).await?;
                self.chunk_repl.insert(r)
            }
        };
        let temp = format!("{}_chunk", self.config.slot);
        let rows = repl
            .simple_query(&format!("CREATE_REPLICATION_SLOT {temp} TEMPORARY LOGICAL pgoutput EXPORT_SNAPSHOT"))
            .await?;
        let (at, snapshot_name) = exported_snapshot(&rows)?;
        let client = match self.chunk_client.as_ref() {
            Some(c) => c,
            None => self.chunk_client.insert(self.config.connect_query().await?),
        };
        begin_snapshot(client, &snapshot_name).await?;
        repl.simple_query(&format!("DROP_REPLICATION_SLOT {temp}")).await?;
        let sql = snapshot::chunk_sql(&t.schema, t.after_key.as_deref(), self.config.snapshot_chunk_rows.max(1));
        let opens = t.rows == 0 && t.after_key.is_none();
        let reader = SnapshotReader::chunk(t.schema.clone(), sql, at, opens);
        self.chunk = Some(Chunk { at, reader, due: false, last_key: None, count: 0 });
        self.next_reply_request = Instant::now();
        Ok(())
    }

    /// The next row of the due chunk (`Some(None)` if `until` passed first); `None` once the chunk
    /// is through, its end and the deferred transaction queued.
    async fn next_chunk_item(&mut self, until: Instant) -> Result<Option<Option<Captured>>, SourceError> {
        let c = self.chunk.as_mut().expect("a due chunk");
        let client = self.chunk_client.as_ref().expect("a chunk has its connection");
        match c.reader.next(client, until).await? {
            Some(Some(item)) => {
                if let Captured::Change { change, .. } = &item {
                    if change.op == Operation::SnapshotRead {
                        c.count += 1;
                        c.last_key = Some(change.key.clone());
                    }
                }
                return Ok(Some(Some(item)));
            }
            Some(None) => return Ok(Some(None)),
            None => {}
        }
        client.batch_execute("COMMIT").await?;
        let c = self.chunk.take().expect("a due chunk");
        let limit = self.config.snapshot_chunk_rows.max(1);
        let t = self.online.front_mut().expect("a chunk belongs to the first online table");
        t.rows += c.count;
        if let Some(last) = c.last_key {
            t.after_key = Some(last);
        }
        let done = t.schema.is_keyless() || c.count < limit;
        let progress = TableProgress::new(t.schema.table.clone(), t.after_key.as_ref(), t.rows);
        if done {
            info!(table = %t.schema.table, rows = t.rows, "online snapshot complete");
            self.online.pop_front();
        }
        self.out.push_back(Captured::ChunkDone { progress, done });
        if let Some(begin) = self.deferred.take() {
            self.handle_pgoutput(begin).await?;
        }
        Ok(None)
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
        // A table whose online snapshot has not begun: its first chunk opens with a TRUNCATE.
        let before_snapshot = !self.online.is_empty()
            && self.online.iter().any(|o| o.schema.table == table.table && o.rows == 0 && o.after_key.is_none());
        if txn.skip_all || order < txn.skip_first || in_snapshot || before_snapshot {
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

/// The current shape of a table to snapshot online.
async fn online_schema(client: &Client, table: &TableId) -> Result<Arc<TableSchema>, SourceError> {
    let found = catalog::find_table(client, table)
        .await?
        .ok_or_else(|| SourceError::Prerequisite(format!("table {table} does not exist at the source")))?;
    Ok(Arc::new(found.schema))
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
