//! The polling source, for servers whose change log cannot be read: no replication rights, no
//! binlog, or an engine dongbo has no log reader for. It reads the tables themselves, with a
//! SELECT-only role, and finds what changed by comparing what it reads with a **shadow**: the key
//! and a 128-bit hash of every row it has shipped, kept in the agent's spool.
//!
//! # What it reads
//! - **First, each table whole** in key order, a chunk of `chunk_rows` at a time (opened by a
//!   TRUNCATE when the shadow holds nothing of the table, as a log source's snapshot is). The
//!   cursor's highest value is taken before the read starts: it is where polling starts.
//! - **Every `interval_ms`**, two sweeps by the cursor column, each in (cursor, key) pages:
//!   - *fresh*: the rows at or above the highest cursor value read so far (new writes, at once; rows
//!     sharing that value are read again, so none written later with the same value is missed);
//!   - *settled*: the rows from the settled mark up to the fresh mark less `safety_window`, so each
//!     row is read once more when it is a window old. A row committed late, with a cursor value
//!     older than what the fresh sweep had passed (a long transaction: `now()` is its start), is
//!     read then, as long as it committed within the window of its value.
//!
//!   A row whose hash equals the shadow's is not shipped again. Each changed row is read about
//!   twice, instead of every cycle for the length of the window.
//! - **Every `diff_interval_s`**, a diff, one chunk per poll cycle: every row in key order against
//!   the shadow (catches an update that left the cursor alone, or a row committed later than the
//!   window), then every key of the shadow against the table (catches deletes: polling alone never
//!   sees them).
//!
//! Reads happen one after the other on one session, each seeing what was committed when it ran,
//! so the shadow only moves forward in time: a diff never ships an older version of a row than a
//! poll already did.
//!
//! # Exactly once
//! A change is shipped when its row's hash differs from the shadow's; the spool writes the shadow
//! entries of a batch's changes in the same atomic write as the batch (see
//! [`crate::source::Source::keeps_shadow`]), and the watermarks with the resume point after them.
//! After a crash the shadow says exactly what was spooled, so nothing read again is shipped twice,
//! and nothing lost: what was not spooled differs from the shadow and is shipped.
//!
//! # What polling can miss, and for how long
//! - A row committed within `safety_window` of its cursor value but after the fresh sweep passed
//!   that value arrives when the settled sweep reaches it: once writes with values a window
//!   newer have been read (about `safety_window` later while the table is written to; in a quiet
//!   spell, at the next diff).
//! - A row committed more than `safety_window` after the time its cursor says (a transaction open
//!   longer than the window, or a writer whose clock lags) is missed by polling and found by the
//!   next diff: up to `diff_interval_s` plus one diff pass late. While the server shows the role
//!   an older open transaction, the settled sweep holds back by that transaction's age instead.
//! - A delete is found only by the diff: up to `diff_interval_s` plus one diff pass late.
//! - A row changed twice between two reads is shipped once, in its latest state: the states in
//!   between never existed for the NDC, and events see one change.
//! - A row with a NULL cursor is found only by the diff.
//! - A cursor value far in the future (bad legacy data) holds the watermark there: rows written
//!   with honest values are then found only by the diff. `check` shows the highest value.

pub mod check;
pub mod config;
mod engine;
pub mod mysql;
#[cfg(feature = "odbc")]
pub mod odbc;
pub mod postgres;
pub mod shadow;

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use tokio::time::Instant;
use tracing::{debug, info, warn};

pub use self::config::PollConfig;
pub use self::engine::{Bound, Engine, PolledTable};
pub use self::shadow::{row_hash, shadow_entry, shadow_key, shadow_prefix, RowHash, Shadow};
use crate::error::SourceError;
use crate::model::{ChangeEvent, Operation, Position, Row, Value};
use crate::source::{Captured, PollMark, ResumePoint, Source};
use crate::wire;

/// Whether this build polls through ODBC (the `odbc` feature of this crate).
pub const ODBC_BUILT: bool = cfg!(feature = "odbc");

/// Where the source is in its work.
#[derive(Debug, Clone)]
enum Phase {
    /// Reading table `table` whole, after `after`; `start_mark` is its cursor's highest value when
    /// the read began.
    Initial { table: usize, after: Option<Row>, start_mark: Option<Value> },
    /// Waiting for the next cycle.
    Idle,
    /// Polling table `table` by cursor in one of its two sweeps, after the (cursor, key) `after`;
    /// `last` is the highest cursor value this sweep has read.
    Cursor { table: usize, sweep: Sweep, after: Option<(Value, Row)>, last: Option<Value> },
}

/// The two reads of a table's cycle.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Sweep {
    /// Rows at or above the highest cursor value read: new writes, at once.
    Fresh,
    /// Rows between the settled mark and the fresh mark less the window: each row once more when
    /// it is a window old, which catches those committed late with an older value.
    Settled,
}

/// A table's marks once it has been read whole.
#[derive(Debug, Clone, PartialEq)]
struct Marks {
    /// The highest cursor value read (NULL: none yet).
    fresh: Value,
    /// Where the settled sweep goes on from.
    settled: Bound,
}

/// How far the diff is.
#[derive(Debug, Clone)]
enum Diff {
    /// Rows of table `table` against the shadow, after key `after`.
    Rows { table: usize, after: Option<Row> },
    /// Shadow keys of table `table` against the table, after shadow key `after`.
    Keys { table: usize, after: Option<Vec<u8>> },
}

/// Reads and changes counted since the source started, logged at the end of each diff pass.
#[derive(Debug, Clone, Copy, Default)]
pub struct PollStats {
    /// Statements run against the source.
    pub queries: u64,
    /// Rows (or keys) the source returned.
    pub rows_read: u64,
    /// Changes shipped.
    pub changes: u64,
    /// Completed diff passes.
    pub diffs: u64,
}

/// Shadow entries of changes yielded but not yet durable in the spool, by shadow key: the poller
/// consults them before the spool's shadow. `None` is a delete.
type Overlay = HashMap<Vec<u8>, (Option<RowHash>, u64)>;

/// A polling source over one engine.
pub struct PollSource<E: Engine> {
    engine: E,
    config: PollConfig,
    tables: Vec<PolledTable<E::Table>>,
    marks: Vec<Option<Marks>>,
    shadow: Arc<dyn Shadow>,
    overlay: Arc<Mutex<Overlay>>,
    queue: VecDeque<Captured>,
    phase: Phase,
    diff: Option<Diff>,
    cycle: u64,
    next_poll: Instant,
    next_diff: Instant,
    stats: PollStats,
    /// This cycle's safety window for time cursors, in seconds.
    window_s: u64,
    /// The server would not show its open transactions (said once).
    window_blind: bool,
}

fn now_us() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_micros() as i64)
}

impl<E: Engine> PollSource<E> {
    /// Opens the tables on `engine` and resumes from `resume` (its watermarks) and `shadow`.
    pub async fn start(
        mut engine: E,
        config: PollConfig,
        resume: ResumePoint,
        shadow: Arc<dyn Shadow>,
    ) -> Result<Self, SourceError> {
        let mut tables = Vec::new();
        let mut marks = Vec::new();
        for (id, cursor) in config.tables()? {
            let t = engine.table(&id, &cursor).await?;
            let mark = match resume.poll_marks.iter().find(|m| m.table == id) {
                Some(m) => Some(decode_marks(&m.cursor)?),
                None => None,
            };
            tables.push(t);
            marks.push(mark);
        }
        let cycle = match resume.committed_end {
            Some(Position::Poll(c)) => c,
            Some(other) => return Err(other.of_another_source("poll")),
            None => 0,
        };
        let first_initial = marks.iter().position(Option::is_none);
        let phase = match first_initial {
            Some(table) => Phase::Initial { table, after: None, start_mark: None },
            None => Phase::Idle,
        };
        info!(tables = tables.len(), cycle, initial = first_initial.is_some(), "polling source started");
        let now = Instant::now();
        Ok(Self {
            engine,
            next_diff: now + config.diff_interval(),
            window_s: config.safety_window,
            config,
            tables,
            marks,
            shadow,
            overlay: Arc::default(),
            queue: VecDeque::new(),
            phase,
            diff: None,
            cycle,
            next_poll: now,
            stats: PollStats::default(),
            window_blind: false,
        })
    }

    /// What the source has read and shipped so far.
    pub fn stats(&self) -> PollStats {
        self.stats
    }

    /// The hashes the NDC holds for `keys` as far as this agent knows: yielded but not yet durable
    /// first, then the spool's shadow.
    fn known(&self, keys: &[Vec<u8>]) -> Result<Vec<Option<RowHash>>, SourceError> {
        let mut known = vec![None; keys.len()];
        let mut unseen = Vec::new();
        {
            let overlay = self.overlay.lock().expect("overlay lock");
            for (i, key) in keys.iter().enumerate() {
                match overlay.get(key) {
                    Some((hash, _)) => known[i] = *hash,
                    None => unseen.push(i),
                }
            }
        }
        let stored = self.shadow.get_many(&unseen.iter().map(|&i| keys[i].as_slice()).collect::<Vec<_>>())?;
        for (i, hash) in unseen.into_iter().zip(stored) {
            known[i] = hash;
        }
        Ok(known)
    }

    /// Queues a change whose row (`after`, hashed `hash`; none for a delete) the NDC will hold.
    fn push_change(
        &mut self,
        table: usize,
        op: Operation,
        key: Row,
        after: Option<(Row, RowHash)>,
        shadow_key: Vec<u8>,
    ) {
        let schema = self.tables[table].schema.clone();
        let (after, hash) = after.map_or((None, None), |(row, hash)| (Some(row), Some(hash)));
        self.overlay.lock().expect("overlay lock").insert(shadow_key, (hash, self.cycle + 1));
        let change = ChangeEvent {
            seq: 0,
            table: schema,
            op,
            key,
            before: None,
            after,
            position: Position::Poll(self.cycle + 1),
            commit_time_us: now_us(),
            txid: 0,
            txn_order: self.queue.len() as u32,
            txn_last: false,
        };
        self.stats.changes += 1;
        self.queue.push_back(Captured::Change { change, txn: None });
    }

    /// Compares rows read from the table with what the NDC holds and queues what differs.
    fn compare(&mut self, table: usize, rows: Vec<Row>) -> Result<(), SourceError> {
        let schema = &self.tables[table].schema;
        let keys: Vec<Row> = rows.iter().map(|row| schema.key_of(row)).collect();
        let skeys: Vec<Vec<u8>> = keys.iter().map(|key| shadow_key(&schema.table, key)).collect();
        let known = self.known(&skeys)?;
        for (((row, key), skey), known) in rows.into_iter().zip(keys).zip(skeys).zip(known) {
            let hash = row_hash(&row);
            match known {
                Some(h) if h == hash => {}
                Some(_) => self.push_change(table, Operation::Update, key, Some((row, hash)), skey),
                None => self.push_change(table, Operation::Insert, key, Some((row, hash)), skey),
            }
        }
        Ok(())
    }

    /// Reads the next chunk of `table` in key order after `after` and compares it with what the
    /// NDC holds; returns whether the chunk was full (more may follow) and its last key.
    async fn compare_key_chunk(
        &mut self,
        table: usize,
        after: Option<&[Value]>,
    ) -> Result<(bool, Option<Row>), SourceError> {
        let limit = self.config.chunk_rows;
        self.stats.queries += 1;
        let rows = self.engine.after_key(&self.tables[table], after, limit).await?;
        self.stats.rows_read += rows.len() as u64;
        let full = rows.len() as u64 == limit;
        let last = rows.last().map(|r| self.tables[table].schema.key_of(r));
        self.compare(table, rows)?;
        Ok((full, last))
    }

    /// Ends a step: the cycle's changes are queued, then the item that spools them with the
    /// watermarks of every table read whole so far.
    fn end_step(&mut self) {
        self.cycle += 1;
        let marks = self
            .tables
            .iter()
            .zip(&self.marks)
            .filter_map(|(t, m)| {
                m.as_ref().map(|m| PollMark { table: t.schema.table.clone(), cursor: encode_marks(m) })
            })
            .collect();
        self.queue.push_back(Captured::Polled { end: Position::Poll(self.cycle), marks });
    }

    /// Runs one statement's worth of work and queues what it found.
    async fn step(&mut self) -> Result<(), SourceError> {
        let limit = self.config.chunk_rows;
        match self.phase.clone() {
            Phase::Initial { table, after, start_mark } => {
                let start_mark = match (&after, start_mark) {
                    (None, _) => {
                        let id = &self.tables[table].schema.table;
                        if self.shadow.keys_after(&shadow_prefix(id), None, 1)?.is_empty() {
                            let schema = self.tables[table].schema.clone();
                            let at = Position::Poll(self.cycle + 1);
                            self.queue.push_back(Captured::snapshot(
                                &schema,
                                Operation::Truncate,
                                None,
                                at,
                                now_us(),
                                0,
                            ));
                        }
                        self.stats.queries += 1;
                        self.engine.max_cursor(&self.tables[table]).await?.unwrap_or(Value::Null)
                    }
                    (Some(_), Some(m)) => m,
                    (Some(_), None) => Value::Null,
                };
                let (full, last) = self.compare_key_chunk(table, after.as_deref()).await?;
                self.phase = if full {
                    Phase::Initial { table, after: last, start_mark: Some(start_mark) }
                } else {
                    info!(table = %self.tables[table].schema.table, "polled table read whole: polling it from now on");
                    // Rows committed late during the read, with values below its start, are
                    // the settled sweep's.
                    let minus = if start_mark == Value::Null { 0 } else { self.config.safety_window };
                    let settled = Bound { value: start_mark.clone(), minus };
                    self.marks[table] = Some(Marks { fresh: start_mark, settled });
                    match self.marks.iter().position(Option::is_none) {
                        Some(next) => Phase::Initial { table: next, after: None, start_mark: None },
                        None => Phase::Idle,
                    }
                };
            }
            Phase::Idle => {
                self.next_poll = Instant::now() + self.config.interval();
                self.widen_window().await;
                self.phase = Phase::Cursor { table: 0, sweep: Sweep::Fresh, after: None, last: None };
                return Ok(());
            }
            Phase::Cursor { table, sweep, after, last } => {
                let marks = self.marks[table].clone().expect("a table is polled once read whole");
                let window = if self.tables[table].time_cursor { self.window_s } else { self.config.safety_window };
                let (lower, upper) = match sweep {
                    Sweep::Fresh => (Bound { value: marks.fresh.clone(), minus: 0 }, None),
                    Sweep::Settled => {
                        (marks.settled.clone(), Some(Bound { value: marks.fresh.clone(), minus: window }))
                    }
                };
                // Nothing is settled before anything was read.
                if sweep == Sweep::Settled && marks.fresh == Value::Null {
                    self.phase = self.after_sweep(table, sweep);
                    if matches!(self.phase, Phase::Idle) {
                        self.diff_step().await?;
                    }
                    self.end_step();
                    return Ok(());
                }
                self.stats.queries += 1;
                let paging = after.as_ref().map(|(c, k)| (c, k.as_slice()));
                let rows = self.engine.range(&self.tables[table], Some(&lower), upper.as_ref(), paging, limit).await?;
                self.stats.rows_read += rows.len() as u64;
                debug!(table = %self.tables[table].schema.table, ?sweep, rows = rows.len(), ?lower, ?upper, "cursor page read");
                let full = rows.len() as u64 == limit;
                let t = &self.tables[table];
                let tail = rows.last().map(|r| (r[t.cursor].clone(), t.schema.key_of(r)));
                self.compare(table, rows)?;
                let last = tail.as_ref().map(|(c, _)| c.clone()).or(last);
                if full {
                    self.phase = Phase::Cursor { table, sweep, after: tail, last };
                } else {
                    // Rows come in cursor order: `last` is the highest value this sweep read.
                    if let (Some(last), Some(m)) = (last, self.marks[table].as_mut()) {
                        match sweep {
                            Sweep::Fresh => m.fresh = last,
                            Sweep::Settled => m.settled = Bound { value: last, minus: 0 },
                        }
                    }
                    self.phase = self.after_sweep(table, sweep);
                    if matches!(self.phase, Phase::Idle) {
                        self.diff_step().await?;
                    }
                }
            }
        }
        self.end_step();
        Ok(())
    }

    /// What follows a table's sweep: its settled sweep, the next table, or the end of the cycle.
    fn after_sweep(&self, table: usize, sweep: Sweep) -> Phase {
        match sweep {
            Sweep::Fresh => Phase::Cursor { table, sweep: Sweep::Settled, after: None, last: None },
            Sweep::Settled if table + 1 < self.tables.len() => {
                Phase::Cursor { table: table + 1, sweep: Sweep::Fresh, after: None, last: None }
            }
            Sweep::Settled => Phase::Idle,
        }
    }

    /// Sizes the window of time cursors for this cycle: at least the configured one, and wide
    /// enough for the oldest transaction open on the server (its rows may carry a cursor value
    /// from when it began), plus one cycle.
    async fn widen_window(&mut self) {
        self.stats.queries += 1;
        match self.engine.oldest_transaction_s().await {
            Ok(age) => {
                let needed = age + self.config.interval().as_secs() + 1;
                let window = self.config.safety_window.max(needed);
                if window > self.config.safety_window && window != self.window_s {
                    info!(
                        oldest_transaction_s = age,
                        window_s = window,
                        "a transaction is open longer than source.safety_window: this cycle reads further back"
                    );
                }
                self.window_s = window;
            }
            Err(e) => {
                if !self.window_blind {
                    warn!(error = %e, window_s = self.config.safety_window, "the server does not show its open transactions to this role: the safety window stays as configured");
                    self.window_blind = true;
                }
                self.window_s = self.config.safety_window;
            }
        }
    }

    /// One chunk of the diff, if one is under way or due.
    async fn diff_step(&mut self) -> Result<(), SourceError> {
        if self.diff.is_none() {
            if Instant::now() < self.next_diff {
                return Ok(());
            }
            debug!("diff pass starting");
            self.diff = Some(Diff::Rows { table: 0, after: None });
        }
        let limit = self.config.chunk_rows;
        match self.diff.clone().expect("a diff is under way") {
            Diff::Rows { table, after } => {
                let (full, last) = self.compare_key_chunk(table, after.as_deref()).await?;
                self.diff =
                    Some(if full { Diff::Rows { table, after: last } } else { Diff::Keys { table, after: None } });
            }
            Diff::Keys { table, after } => {
                let id = self.tables[table].schema.table.clone();
                let prefix = shadow_prefix(&id);
                let shadow_keys = self.shadow.keys_after(&prefix, after.as_deref(), limit as usize)?;
                let full = shadow_keys.len() as u64 == limit;
                let mut keys = Vec::with_capacity(shadow_keys.len());
                for k in &shadow_keys {
                    keys.push(wire::decode_row(&k[prefix.len()..]).map_err(|e| {
                        SourceError::Prerequisite(format!("the spool's shadow of {id} is damaged: {e}"))
                    })?);
                }
                let present = if keys.is_empty() {
                    Vec::new()
                } else {
                    self.stats.queries += 1;
                    self.engine.existing(&self.tables[table], &keys).await?
                };
                self.stats.rows_read += present.len() as u64;
                let present: std::collections::HashSet<Vec<u8>> = present.iter().map(|k| shadow_key(&id, k)).collect();
                let known = self.known(&shadow_keys)?;
                for ((skey, key), known) in shadow_keys.iter().zip(keys).zip(known) {
                    // Shipped as deleted already, or not in the table now: nothing, or a delete.
                    if present.contains(skey) || known.is_none() {
                        continue;
                    }
                    self.push_change(table, Operation::Delete, key, None, skey.clone());
                }
                self.diff = if full {
                    Some(Diff::Keys { table, after: shadow_keys.last().cloned() })
                } else if table + 1 < self.tables.len() {
                    Some(Diff::Rows { table: table + 1, after: None })
                } else {
                    self.stats.diffs += 1;
                    info!(
                        queries = self.stats.queries,
                        rows_read = self.stats.rows_read,
                        changes = self.stats.changes,
                        "diff pass complete"
                    );
                    self.next_diff = Instant::now() + self.config.diff_interval();
                    None
                };
            }
        }
        Ok(())
    }
}

/// A table's marks as the spool keeps them: a row of the fresh mark, the settled mark's value and
/// what the settled mark takes off it.
fn encode_marks(m: &Marks) -> Vec<u8> {
    wire::encode_row(vec![m.fresh.clone(), m.settled.value.clone(), Value::Int(m.settled.minus as i64)])
}

fn decode_marks(bytes: &[u8]) -> Result<Marks, SourceError> {
    let row = wire::decode_row(bytes)
        .map_err(|e| SourceError::Prerequisite(format!("the spool's poll watermark is damaged: {e}")))?;
    match <[Value; 3]>::try_from(row) {
        Ok([fresh, value, Value::Int(minus)]) if minus >= 0 => {
            Ok(Marks { fresh, settled: Bound { value, minus: minus as u64 } })
        }
        _ => Err(SourceError::Prerequisite("the spool's poll watermark is not three values".into())),
    }
}

impl<E: Engine> Source for PollSource<E> {
    async fn next(&mut self, until: Instant) -> Result<Option<Captured>, SourceError> {
        loop {
            if let Some(item) = self.queue.pop_front() {
                return Ok(Some(item));
            }
            // A long cycle must not hold back what it found: capture spools when this returns.
            if Instant::now() >= until {
                return Ok(None);
            }
            if matches!(self.phase, Phase::Idle) {
                let now = Instant::now();
                if now < self.next_poll {
                    if until <= now {
                        return Ok(None);
                    }
                    tokio::time::sleep_until(until.min(self.next_poll)).await;
                    if Instant::now() < self.next_poll {
                        return Ok(None);
                    }
                }
            }
            self.step().await?;
        }
    }

    async fn keep_alive(&mut self) -> Result<(), SourceError> {
        Ok(())
    }

    fn release(&self, upto: Position) {
        if let Position::Poll(cycle) = upto {
            self.overlay.lock().expect("overlay lock").retain(|_, (_, c)| *c > cycle);
        }
    }

    fn keeps_shadow(&self) -> bool {
        true
    }
}
