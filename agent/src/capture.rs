//! Capture: source → spool, for any [`Source`]. Changes are gathered in memory for at most
//! `batch_max_wait_ms` (or `batch_max_changes`), then spooled with the resume point in one flushed
//! write; only after that write is the source told it may release up to the last spooled commit.

use std::sync::Arc;
use std::time::Duration;

use dongbo_connectors::error::SourceError;
use dongbo_connectors::model::{ChangeBatch, ChangeEvent, Operation, TableId};
use dongbo_connectors::mysql::MySqlSource;
use dongbo_connectors::poll::mysql::MyPoller;
use dongbo_connectors::poll::postgres::PgPoller;
use dongbo_connectors::poll::{self, PollSource};
use dongbo_connectors::postgres::PostgresSource;
use dongbo_connectors::source::{Captured, OpenTxn, ResumePoint, SnapshottedTable, Source};
use dongbo_connectors::wire;
use tokio::sync::watch;
use tokio::time::Instant;
use tracing::{debug, info, warn};

use crate::config::SourceConfig;
use crate::snapshot_progress::SnapshotProgress;
use crate::spool::{Spool, SpoolError, SpooledBatch};

/// Why capture stopped.
#[derive(Debug, thiserror::Error)]
pub enum CaptureError {
    /// The source failed.
    #[error(transparent)]
    Source(#[from] SourceError),
    /// The spool failed.
    #[error(transparent)]
    Spool(#[from] SpoolError),
}

impl CaptureError {
    /// Whether restarting capture later can succeed.
    pub fn is_transient(&self) -> bool {
        match self {
            CaptureError::Source(e) => e.is_transient(),
            CaptureError::Spool(_) => false,
        }
    }
}

/// Why a capture session ended without an error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stopped {
    /// The agent is shutting down.
    Shutdown,
    /// `[source]` was reloaded: start again with it.
    Reload,
}

/// How often a paused capture says so and reports its position to the source.
const PAUSED_TICK: Duration = Duration::from_secs(1);
/// How long a capture with nothing to do waits for the source before looking around again.
const IDLE_WAIT: Duration = Duration::from_millis(500);

/// One capture session: from the source's start until an error or shutdown.
pub struct Capture<'a> {
    source_id: &'a str,
    spool: &'a Arc<Spool>,
    batch_max_changes: usize,
    batch_max_wait: Duration,
    compress: bool,
}

impl<'a> Capture<'a> {
    /// A capture writing into `spool` for `source_id`.
    pub fn new(source_id: &'a str, spool: &'a Arc<Spool>, batch_max_changes: usize, batch_max_wait: Duration) -> Self {
        Self { source_id, spool, batch_max_changes, batch_max_wait, compress: false }
    }

    /// Spools batches as compressed frames (`spool.compress`).
    pub fn compressing(mut self, compress: bool) -> Self {
        self.compress = compress;
        self
    }

    /// Starts the configured source from the spool's resume point and captures until `shutdown`
    /// turns true or `reload` changes (then flushes what it holds), or an error.
    pub async fn run(
        &self,
        config: &SourceConfig,
        shutdown: &mut watch::Receiver<bool>,
        reload: &mut watch::Receiver<SourceConfig>,
    ) -> Result<Stopped, CaptureError> {
        let resume = self.spool.resume_point()?;
        match config {
            SourceConfig::Postgres(pg) => {
                let source = PostgresSource::start(pg.clone(), resume.clone()).await?;
                self.capture(source, resume, shutdown, reload).await
            }
            SourceConfig::MySql(my) => {
                let source = MySqlSource::start(my.clone(), resume.clone()).await?;
                self.capture(source, resume, shutdown, reload).await
            }
            SourceConfig::Poll(poll) => {
                let shadow = self.spool.shadow();
                if let Some(pg) = &poll.postgres {
                    let engine = PgPoller::connect(pg).await?;
                    let source = PollSource::start(engine, (**poll).clone(), resume.clone(), shadow).await?;
                    self.capture(source, resume, shutdown, reload).await
                } else if let Some(my) = &poll.mysql {
                    let engine = MyPoller::connect(my).await?;
                    let source = PollSource::start(engine, (**poll).clone(), resume.clone(), shadow).await?;
                    self.capture(source, resume, shutdown, reload).await
                } else {
                    self.capture_odbc(poll, resume, shadow, shutdown, reload).await
                }
            }
        }
    }

    #[cfg(feature = "odbc")]
    async fn capture_odbc(
        &self,
        poll: &dongbo_connectors::poll::PollConfig,
        resume: ResumePoint,
        shadow: std::sync::Arc<dyn dongbo_connectors::poll::Shadow>,
        shutdown: &mut watch::Receiver<bool>,
        reload: &mut watch::Receiver<SourceConfig>,
    ) -> Result<Stopped, CaptureError> {
        let Some(odbc) = &poll.odbc else {
            return Err(SourceError::Prerequisite("kind = \"poll\" names no server".into()).into());
        };
        let engine = dongbo_connectors::poll::odbc::OdbcPoller::connect(odbc).await?;
        let source = PollSource::start(engine, poll.clone(), resume.clone(), shadow).await?;
        self.capture(source, resume, shutdown, reload).await
    }

    /// Without the `odbc` feature, `[source.odbc]` is refused when the config is read.
    #[cfg(not(feature = "odbc"))]
    async fn capture_odbc(
        &self,
        _: &dongbo_connectors::poll::PollConfig,
        _: ResumePoint,
        _: std::sync::Arc<dyn dongbo_connectors::poll::Shadow>,
        _: &mut watch::Receiver<bool>,
        _: &mut watch::Receiver<SourceConfig>,
    ) -> Result<Stopped, CaptureError> {
        Err(SourceError::Prerequisite("this agent was built without ODBC (the odbc feature)".into()).into())
    }

    async fn capture<S: Source>(
        &self,
        mut source: S,
        mut resume: ResumePoint,
        shutdown: &mut watch::Receiver<bool>,
        reload: &mut watch::Receiver<SourceConfig>,
    ) -> Result<Stopped, CaptureError> {
        let mut next_seq = self.spool.next_seq()?;
        let mut pending: Vec<ChangeEvent> = Vec::with_capacity(self.batch_max_changes);
        let mut dirty = false;
        let mut first_pending_at = Instant::now();
        let mut paused_since: Option<Instant> = None;
        let mut snapshot: Option<SnapshotProgress> = None;
        loop {
            if *shutdown.borrow() {
                self.flush(&source, &mut pending, &resume, next_seq).await?;
                info!("capture stopped");
                return Ok(Stopped::Shutdown);
            }
            if reload.has_changed().unwrap_or(false) {
                // What is complete is spooled with its resume point; the restarted source goes on
                // from there.
                self.flush(&source, &mut pending, &resume, next_seq).await?;
                return Ok(Stopped::Reload);
            }
            if self.spool.is_full() {
                if paused_since.is_none() {
                    warn!(
                        spool_bytes = self.spool.bytes(),
                        "spool is full: capture paused, the source now holds its WAL until the hub catches up"
                    );
                    paused_since = Some(Instant::now());
                }
                source.keep_alive().await?;
                tokio::select! {
                    _ = tokio::time::sleep(PAUSED_TICK) => {}
                    _ = shutdown.changed() => {}
                    _ = reload.changed() => {}
                }
                continue;
            }
            if let Some(since) = paused_since.take() {
                info!(paused_s = since.elapsed().as_secs(), "spool has room again: capture resumed");
            }
            let until = if pending.is_empty() && !dirty {
                Instant::now() + IDLE_WAIT
            } else {
                first_pending_at + self.batch_max_wait
            };
            // Dropping `next` mid-message is safe only because shutdown then spools what is complete
            // and drops the source; the server resends the rest after the restart.
            let item = tokio::select! {
                item = source.next(until) => item?,
                _ = shutdown.changed() => continue,
                Ok(()) = reload.changed() => {
                    // Seen again at the top of the loop.
                    reload.mark_changed();
                    continue;
                }
            };
            match item {
                Some(Captured::Change { mut change, txn }) => {
                    if pending.is_empty() && !dirty {
                        first_pending_at = Instant::now();
                    }
                    change.seq = next_seq;
                    next_seq += 1;
                    if let Some(txn) = txn {
                        resume.open_txn = Some(OpenTxn { txn, spooled: change.txn_order + 1 });
                    } else if change.op == Operation::SnapshotRead {
                        snapshot.get_or_insert_with(|| SnapshotProgress::start(None)).row();
                    }
                    pending.push(change);
                    if pending.len() >= self.batch_max_changes {
                        self.flush(&source, &mut pending, &resume, next_seq).await?;
                        dirty = false;
                    }
                }
                Some(Captured::Commit { end }) => {
                    if pending.is_empty() && !dirty {
                        first_pending_at = Instant::now();
                    }
                    resume.committed_end = Some(end);
                    resume.open_txn = None;
                    dirty = true;
                }
                Some(Captured::SnapshotPlanned { estimated_rows }) => {
                    snapshot = Some(SnapshotProgress::start(Some(estimated_rows)));
                }
                Some(Captured::SnapshotDone { at, tables }) => {
                    resume.snapshot_done = true;
                    resume.committed_end = Some(at);
                    resume.open_txn = None;
                    // A table read in a later view of a parallel snapshot keeps that view's position.
                    let later = resume.snapshotted.take().unwrap_or_default();
                    let taken_at = |t: &TableId| later.iter().find(|s| &s.table == t).and_then(|s| s.taken_at);
                    resume.snapshotted = Some(
                        tables
                            .into_iter()
                            .map(|table| SnapshottedTable { taken_at: taken_at(&table), table })
                            .collect(),
                    );
                    self.flush(&source, &mut pending, &resume, next_seq).await?;
                    dirty = false;
                    dongbo_connectors::fault::crash_at("snapshot-spooled");
                    if let Some(p) = snapshot.take() {
                        p.finish();
                    }
                    info!(at = %at, "snapshot spooled");
                }
                Some(Captured::ChunkDone { progress, done }) => {
                    // Spooled with the chunk's rows, atomically: a crash before this write reads
                    // the chunk again, one after it goes on after it.
                    let (table, rows) = (progress.table.clone(), progress.rows);
                    if done {
                        resume.snapshotting = None;
                        let known = resume.snapshotted.get_or_insert_with(Vec::new);
                        known.retain(|s| s.table != table);
                        known.push(SnapshottedTable { table: table.clone(), taken_at: None });
                    } else {
                        resume.snapshotting = Some(progress);
                    }
                    self.flush(&source, &mut pending, &resume, next_seq).await?;
                    dirty = false;
                    if done {
                        if let Some(p) = snapshot.take() {
                            p.finish();
                        }
                        info!(%table, rows, "online snapshot of table spooled");
                    } else {
                        debug!(%table, rows, "snapshot chunk spooled");
                    }
                }
                Some(Captured::Polled { end, marks }) => {
                    // Spooled no earlier than the changes before it: a watermark never runs ahead
                    // of what is durable.
                    if pending.is_empty() && !dirty {
                        first_pending_at = Instant::now();
                    }
                    resume.snapshot_done = true;
                    resume.committed_end = Some(end);
                    resume.poll_marks = marks;
                    dirty = true;
                }
                Some(Captured::TablesSnapshotted { at, tables }) => {
                    // Spooled with the rows before it, atomically: a crash before this write takes
                    // the snapshot of these tables again.
                    let known = resume.snapshotted.get_or_insert_with(Vec::new);
                    known.retain(|s| !tables.contains(&s.table));
                    known.extend(tables.into_iter().map(|table| SnapshottedTable { table, taken_at: Some(at) }));
                    self.flush(&source, &mut pending, &resume, next_seq).await?;
                    dirty = false;
                    // During an initial snapshot this is one of its read views, not its end.
                    if resume.snapshot_done {
                        if let Some(p) = snapshot.take() {
                            p.finish();
                        }
                    }
                    info!(at = %at, "snapshot of added tables spooled");
                }
                None => {
                    if !pending.is_empty() || dirty {
                        self.flush(&source, &mut pending, &resume, next_seq).await?;
                        dirty = false;
                    }
                }
            }
        }
    }

    async fn flush(
        &self,
        source: &impl Source,
        pending: &mut Vec<ChangeEvent>,
        resume: &ResumePoint,
        next_seq: u64,
    ) -> Result<(), CaptureError> {
        // Computed before the changes are encoded: written in the same atomic write as them.
        let shadow: Vec<_> =
            if source.keeps_shadow() { pending.iter().filter_map(poll::shadow_entry).collect() } else { Vec::new() };
        let newest_commit_us = pending.iter().map(|c| c.commit_time_us).max();
        let batch = if pending.is_empty() {
            None
        } else {
            let batch = ChangeBatch { source_id: self.source_id.to_string(), changes: std::mem::take(pending) };
            let (first_seq, last_seq) = (batch.first_seq(), batch.last_seq());
            let encoded = wire::encode_batch(batch);
            let bytes = if self.compress { wire::compress_batch(&encoded) } else { encoded };
            Some(SpooledBatch { first_seq, last_seq, bytes })
        };
        let changes = batch.as_ref().map_or(0, |b| b.last_seq - b.first_seq + 1);
        self.spool.append_with_shadow(batch, resume, next_seq, shadow).await?;
        if let Some(t) = newest_commit_us {
            crate::metrics::agent().captured_commit(t);
        }
        if let Some(end) = resume.committed_end {
            debug!(upto = %end, changes, "spooled");
            source.release(end);
        }
        Ok(())
    }
}
