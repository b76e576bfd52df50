//! Apply to the NDC Postgres, exactly once in effect.
//!
//! One NDC transaction takes a run of consecutive batches of one source, locks the source's row in
//! `dongbo.applied_position`, skips every change at or below the recorded seq, applies the rest with
//! `COPY` into staging tables and set-based upserts/deletes ([`plan`]), and records the new seq in the
//! same transaction. A batch replayed after any crash therefore changes nothing, and a position is
//! acknowledged to the agent only after that commit.
//!
//! Bad input loses nothing: changes for a table the agent may not send, that break a rule of the
//! national dictionary ([`crate::dictionary`]), or that Postgres refuses (a definite SQLSTATE such
//! as a value out of range), go to `dongbo.quarantine` with the rule, the reason and the change as
//! the agent sent it, in the same transaction that advances the position.
//!
//! # Head of line
//! A quarantined change holds its source row (agent, table, key): every later change of that row
//! is quarantined behind it (rule `held`) until an operator resolves the first, so the NDC never
//! holds a state that skipped a change. A keyless table's rows have no key to hold.
//!
//! # National tables
//! Several agents feed one national table. Each agent's truncate and deletes touch only its own
//! rows; an upsert of a row another agent holds is decided by `national.conflict`: the higher
//! priority or the later source commit overwrites it (a guard on the upsert, so a concurrent
//! writer is decided the same way), or, by default, the change is quarantined (rule `conflict`)
//! with the row it would have replaced (the check and the write serialised per national table).
//! A national truncate is published as a delete of each of the agent's rows it removed
//! ([`ApplyOutcome::removed`], kept in `dongbo.removed_rows` until logged).

pub mod plan;
pub mod replay;
pub mod target;
pub mod types;

use std::collections::hash_map::Entry;
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::Arc;

use bytes::Bytes;
use dongbo_connectors::error::sqlstate_is_transient;
use dongbo_connectors::model::{present_columns, ChangeBatch, ChangeEvent, Operation, TableId, TableSchema, Value};
use dongbo_connectors::postgres::text::{push_copy_value, write_value};
use dongbo_connectors::wire;
use futures::SinkExt;
use tokio_postgres::{Client, Transaction};
use tracing::{info, warn};

use self::plan::{key_text, KeylessOp, Plan, RowOp};
use self::target::Target;
use crate::config::{AgentAcl, NdcConfig};
use crate::dictionary::{ConflictRule, Refusal, Transformed};
use crate::fanout::events::{self, ActiveRule};
use crate::fanout::record::DomainEvent;

/// Applying failed.
#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    /// The NDC refused or the connection broke.
    #[error("NDC apply failed: {}", dongbo_connectors::postgres::session::error_text(.0))]
    Ndc(#[from] tokio_postgres::Error),
    /// The NDC config could not be used.
    #[error("cannot read the NDC password file: {0}")]
    Config(#[from] std::io::Error),
    /// The TLS settings cannot be used, or the NDC's certificate was refused.
    #[error("NDC: {0}")]
    Tls(String),
    /// The hub already holds as many NDC connections as `limits.max_ndc_connections` allows.
    #[error("the hub holds as many NDC connections as limits.max_ndc_connections allows; retry later")]
    Saturated,
    /// A row the hub wrote itself no longer decodes: someone edited the NDC's `dongbo` schema.
    #[error("{0}: the hub's own bookkeeping in the NDC was altered; restore it or delete the row")]
    Corrupt(String),
    /// The hub broke one of its own invariants (a defect): the transaction is not committed.
    #[error("internal error, nothing of this run was committed: {0}")]
    Internal(String),
}

impl ApplyError {
    /// Whether retrying later can succeed.
    pub fn is_transient(&self) -> bool {
        match self {
            ApplyError::Ndc(e) => e.code().is_none_or(|c| sqlstate_is_transient(c.code())),
            ApplyError::Config(_) | ApplyError::Corrupt(_) | ApplyError::Tls(_) | ApplyError::Internal(_) => false,
            ApplyError::Saturated => true,
        }
    }
}

/// What one apply did.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ApplyOutcome {
    /// Every change up to here is durable in the NDC.
    pub applied_seq: u64,
    /// The applied seq before this transaction: changes at or below it were skipped.
    pub applied_before: u64,
    /// Changes applied now.
    pub applied: u64,
    /// Seqs quarantined now.
    pub quarantined: Vec<u64>,
    /// Seqs applied now but not logged for fan-out: changes whose national row another agent keeps
    /// (the conflict rule decided).
    pub superseded: Vec<u64>,
    /// For each truncate of a national table applied now (by seq), the keys of the agent's rows it
    /// removed: the log publishes it as a delete of each, since a follower cannot tell one agent's
    /// rows from the whole table.
    pub removed: BTreeMap<u64, Vec<String>>,
    /// Domain events the applied changes raised (also in `dongbo.event_outbox`).
    pub events: Vec<DomainEvent>,
}

/// What the NDC recorded of applied changes for the fan-out log.
#[derive(Debug, Default)]
pub struct Recorded {
    /// The events they raised (`dongbo.event_outbox`).
    pub events: Vec<DomainEvent>,
    /// The seqs the log leaves out: quarantined, or applied but not to be published.
    pub excluded: Vec<u64>,
    /// The keys each national truncate removed, by seq ([`ApplyOutcome::removed`]).
    pub removed: BTreeMap<u64, Vec<String>>,
}

/// Creates the hub's own tables in the NDC. Idempotent, and safe when several hubs start at once.
pub async fn bootstrap(client: &mut Client) -> Result<(), ApplyError> {
    let txn = client.transaction().await?;
    // CREATE … IF NOT EXISTS races with itself across sessions: one hub at a time.
    txn.batch_execute("SELECT pg_advisory_xact_lock(7316092543)").await?;
    txn.batch_execute(
        "CREATE SCHEMA IF NOT EXISTS dongbo;
             CREATE TABLE IF NOT EXISTS dongbo.applied_position (
                 source_id text PRIMARY KEY,
                 applied_seq bigint NOT NULL DEFAULT 0,
                 source_position text,
                 changes_applied bigint NOT NULL DEFAULT 0,
                 changes_quarantined bigint NOT NULL DEFAULT 0,
                 updated_at timestamptz NOT NULL DEFAULT now());
             CREATE TABLE IF NOT EXISTS dongbo.quarantine (
                 source_id text NOT NULL,
                 seq bigint NOT NULL,
                 source_table text NOT NULL,
                 operation text NOT NULL,
                 reason text NOT NULL,
                 change bytea NOT NULL,
                 quarantined_at timestamptz NOT NULL DEFAULT now(),
                 PRIMARY KEY (source_id, seq));
             ALTER TABLE dongbo.applied_position ADD COLUMN IF NOT EXISTS kafka_next_offset bigint;
             -- rule: what the change broke; source_hold: the source row it holds back
             -- (JSON [table, key]); detail: what else an operator needs (the other version of a
             -- conflict); resolved_*: replayed or dropped, by whom, why.
             ALTER TABLE dongbo.quarantine ADD COLUMN IF NOT EXISTS rule text,
                 ADD COLUMN IF NOT EXISTS source_hold text,
                 ADD COLUMN IF NOT EXISTS detail text,
                 ADD COLUMN IF NOT EXISTS resolved_at timestamptz,
                 ADD COLUMN IF NOT EXISTS resolution text,
                 ADD COLUMN IF NOT EXISTS resolved_by text,
                 ADD COLUMN IF NOT EXISTS resolution_note text,
                 ADD COLUMN IF NOT EXISTS replay_id bigint,
                 ADD COLUMN IF NOT EXISTS replayed_change bytea;
             -- One row per replay that resolved anything; logged once its changes and events are
             -- in the fan-out log (crate::quarantine::log_replays).
             CREATE TABLE IF NOT EXISTS dongbo.quarantine_replay (
                 replay_id bigserial PRIMARY KEY,
                 source_id text NOT NULL,
                 replayed_by text NOT NULL,
                 replayed_at timestamptz NOT NULL DEFAULT now(),
                 changes integer NOT NULL,
                 logged boolean NOT NULL DEFAULT false);
             CREATE INDEX IF NOT EXISTS quarantine_replayed ON dongbo.quarantine (replay_id) WHERE replay_id IS NOT NULL;
             -- Applied changes the fan-out log must leave out (the conflict rule kept another
             -- agent's row; a national truncate before dongbo.removed_rows), kept until the log
             -- holds their seqs, so a batch
             -- read again after a crash is logged without them.
             CREATE TABLE IF NOT EXISTS dongbo.unpublished (
                 stream text NOT NULL,
                 seq bigint NOT NULL,
                 PRIMARY KEY (stream, seq));
             -- The keys each national truncate removed, kept until the log holds its seq, so a
             -- truncate applied before a crash but not logged is still published as its deletes.
             CREATE TABLE IF NOT EXISTS dongbo.removed_rows (
                 stream text NOT NULL,
                 seq bigint NOT NULL,
                 keys text[] NOT NULL,
                 PRIMARY KEY (stream, seq));
             CREATE INDEX IF NOT EXISTS quarantine_holds ON dongbo.quarantine (source_id, source_hold)
                 WHERE resolved_at IS NULL;
             CREATE TABLE IF NOT EXISTS dongbo.stream_quarantine (
                 stream text NOT NULL,
                 kafka_offset bigint NOT NULL,
                 reason text NOT NULL,
                 message_key bytea,
                 payload bytea,
                 quarantined_at timestamptz NOT NULL DEFAULT now(),
                 PRIMARY KEY (stream, kafka_offset));
             ALTER TABLE dongbo.stream_quarantine ADD COLUMN IF NOT EXISTS resolved_at timestamptz,
                 ADD COLUMN IF NOT EXISTS resolved_by text,
                 ADD COLUMN IF NOT EXISTS resolution_note text;
             CREATE TABLE IF NOT EXISTS dongbo.source_columns (
                 ndc_schema text NOT NULL,
                 ndc_table text NOT NULL,
                 column_name text NOT NULL,
                 source_type text NOT NULL,
                 ndc_type text NOT NULL,
                 PRIMARY KEY (ndc_schema, ndc_table, column_name));
             -- A keyless table's update or delete whose old row is not in the NDC: a definite
             -- error (no_data_found), so the change is quarantined with this reason.
             CREATE OR REPLACE FUNCTION dongbo.keyless_row_missing(target text) RETURNS void
                 LANGUAGE plpgsql AS $$BEGIN
                     RAISE EXCEPTION 'no row of % equals the old row of this change (the NDC drifted from the source)', target
                         USING ERRCODE = 'P0002';
                 END$$;",
    )
    .await?;
    txn.batch_execute(events::OUTBOX_DDL).await?;
    txn.batch_execute(crate::audit::AUDIT_DDL).await?;
    txn.batch_execute(crate::fleet::DDL).await?;
    txn.commit().await?;
    Ok(())
}

/// A message of a Kafka partition that is not a valid change of the topic's agent.
#[derive(Debug, Clone)]
pub struct RejectedMessage {
    /// Its offset.
    pub offset: i64,
    /// Why it was refused.
    pub reason: String,
    /// Its key, as received.
    pub key: Option<Vec<u8>>,
    /// Its value, as received.
    pub payload: Option<Vec<u8>>,
}

/// Where a run of Kafka messages ends, recorded in the transaction that applies them.
#[derive(Debug, Clone, Default)]
pub struct OffsetMark {
    /// The partition offset after the run's last message.
    pub next_offset: i64,
    /// Messages of the run that were refused, quarantined in the same transaction.
    pub rejected: Vec<RejectedMessage>,
}

/// Connects to the NDC.
pub async fn connect(ndc: &NdcConfig) -> Result<Client, ApplyError> {
    use dongbo_connectors::postgres::session::{connect, ConnectError};
    let password = ndc.resolve_password()?;
    connect(&ndc.target(password.as_deref())).await.map_err(|e| match e {
        ConnectError::Tls { .. } => ApplyError::Tls(e.to_string()),
        ConnectError::Postgres(e) => ApplyError::Ndc(e),
    })
}

/// How a transaction applies its batches.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// Snapshot rows of tables that took nothing else since their TRUNCATE are copied straight in.
    Direct,
    /// Every row is upserted.
    Upsert,
    /// One change at a time, each in a savepoint, to quarantine those the NDC refuses.
    OneByOne,
}

/// Applies one stream of a source's batches to the NDC: the agent's gRPC stream, or one Kafka
/// partition of its topic.
pub struct NdcApplier {
    client: Client,
    acl: AgentAcl,
    /// The key of this stream's row in `dongbo.applied_position`.
    stream: String,
    ndc_schema: String,
    targets: HashMap<TargetKey, Target>,
    broken: HashMap<TargetKey, String>,
    rules: std::sync::Arc<Vec<ActiveRule>>,
    /// Outbox events at or below this seq are in the fan-out log and may be deleted.
    logged_seq: u64,
    pruned_seq: u64,
    /// Tables that took changes other than snapshot rows since their last TRUNCATE (an online
    /// snapshot's chunks arrive between stream changes): their snapshot rows are upserted, never
    /// copied straight in.
    mixed: HashSet<TableId>,
    /// Its place among the hub's NDC connections, given back when the applier is dropped.
    _slot: tokio::sync::OwnedSemaphorePermit,
}

/// Which target a schema loads: a source table version, or a national table (never the same key,
/// whatever names and digest a peer's schema carries).
pub type TargetKey = (TableId, u64, bool);

/// The target key of `schema`.
pub fn target_key(schema: &TableSchema) -> TargetKey {
    (schema.table.clone(), schema.version, schema.national)
}

/// A change going to the quarantine, with what it broke.
struct Quarantined<'c> {
    /// As the agent sent it.
    original: &'c ChangeEvent,
    rule: &'static str,
    reason: String,
    detail: Option<String>,
}

/// The source row a change holds back when quarantined: `[table, key]` as JSON; none for a keyless
/// table.
fn source_hold(c: &ChangeEvent) -> Option<String> {
    (!c.table.is_keyless() && c.op != Operation::Truncate)
        .then(|| serde_json::json!([c.table.table.to_string(), key_text(&c.key)]).to_string())
}

/// `c` as the agent sent it: itself, or decoded again from its batch's bytes when the transform
/// moved values out of it (`resent` keeps each batch decoded once).
fn as_sent<'c>(
    staged: &'c [Transformed<'_>],
    c: &'c ChangeEvent,
    resent: &'c mut HashMap<usize, ChangeBatch>,
) -> Result<&'c ChangeEvent, ApplyError> {
    let Some((i, sent)) = staged.iter().enumerate().find_map(|(i, t)| {
        t.sent.filter(|_| t.original.changes.as_ptr_range().contains(&std::ptr::from_ref(c))).map(|s| (i, s))
    }) else {
        return Ok(c);
    };
    let batch = match resent.entry(i) {
        std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
        std::collections::hash_map::Entry::Vacant(e) => e.insert(
            wire::decode_batch(sent)
                .map_err(|e| ApplyError::Internal(format!("a batch decoded once no longer decodes: {e}")))?,
        ),
    };
    by_seq(batch, c.seq)
        .ok_or_else(|| ApplyError::Internal(format!("seq {} is not in the bytes its batch was decoded from", c.seq)))
}

/// The change of `batch` with seq `seq`.
fn by_seq(batch: &ChangeBatch, seq: u64) -> Option<&ChangeEvent> {
    batch.changes.binary_search_by_key(&seq, |c| c.seq).ok().map(|i| &batch.changes[i])
}

/// How long a new applier waits for a free NDC connection before saying the hub is saturated.
const SLOT_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

impl NdcApplier {
    /// An applier for the agent `acl`'s gRPC stream on its own NDC connection (one of `slots`),
    /// raising events by `rules`.
    pub async fn connect(
        ndc: &NdcConfig,
        slots: &std::sync::Arc<tokio::sync::Semaphore>,
        acl: AgentAcl,
        rules: std::sync::Arc<Vec<ActiveRule>>,
    ) -> Result<Self, ApplyError> {
        let stream = acl.id.clone();
        Self::connect_stream(ndc, slots, acl, rules, stream).await
    }

    /// An applier whose position is kept under `stream` (one per Kafka partition).
    pub async fn connect_stream(
        ndc: &NdcConfig,
        slots: &std::sync::Arc<tokio::sync::Semaphore>,
        acl: AgentAcl,
        rules: std::sync::Arc<Vec<ActiveRule>>,
        stream: String,
    ) -> Result<Self, ApplyError> {
        let slot = match tokio::time::timeout(SLOT_WAIT, slots.clone().acquire_owned()).await {
            Ok(Ok(slot)) => slot,
            _ => return Err(ApplyError::Saturated),
        };
        let client = connect(ndc).await?;
        client
            .execute("INSERT INTO dongbo.applied_position (source_id) VALUES ($1) ON CONFLICT DO NOTHING", &[&stream])
            .await?;
        Ok(Self {
            client,
            stream,
            ndc_schema: acl.schema(),
            acl,
            targets: HashMap::new(),
            broken: HashMap::new(),
            rules,
            logged_seq: 0,
            pruned_seq: 0,
            mixed: HashSet::new(),
            _slot: slot,
        })
    }

    /// Tells the applier the fan-out log holds everything up to `seq`, so the outbox can let go.
    pub fn set_logged_seq(&mut self, seq: u64) {
        self.logged_seq = seq;
    }

    /// What the NDC recorded for seqs in `after+1..=upto`: what logging already-applied changes
    /// again needs.
    pub async fn recorded(&self, after: u64, upto: u64) -> Result<Recorded, ApplyError> {
        let (a, u) = (after as i64, upto as i64);
        let events = self
            .client
            .query(
                "SELECT body::text, seq FROM dongbo.event_outbox WHERE stream = $1 AND seq > $2 AND seq <= $3 \
                 ORDER BY seq, event_id",
                &[&self.stream, &a, &u],
            )
            .await?
            .into_iter()
            .map(|r| {
                let seq: i64 = r.get(1);
                serde_json::from_str::<DomainEvent>(r.get::<_, &str>(0)).map_err(|e| {
                    ApplyError::Corrupt(format!(
                        "dongbo.event_outbox row of stream {} seq {seq} does not decode ({e})",
                        self.stream
                    ))
                })
            })
            .collect::<Result<_, _>>()?;
        let quarantined = self
            .client
            .query(
                "SELECT seq FROM dongbo.quarantine WHERE source_id = $1 AND seq > $2 AND seq <= $3",
                &[&self.acl.id, &a, &u],
            )
            .await?
            .into_iter()
            .chain(
                self.client
                    .query(
                        "SELECT seq FROM dongbo.unpublished WHERE stream = $1 AND seq > $2 AND seq <= $3",
                        &[&self.stream, &a, &u],
                    )
                    .await?,
            )
            .map(|r| r.get::<_, i64>(0) as u64)
            .collect();
        let removed = self
            .client
            .query(
                "SELECT seq, keys FROM dongbo.removed_rows WHERE stream = $1 AND seq > $2 AND seq <= $3",
                &[&self.stream, &a, &u],
            )
            .await?
            .into_iter()
            .map(|r| (r.get::<_, i64>(0) as u64, r.get::<_, Vec<String>>(1)))
            .collect();
        Ok(Recorded { events, excluded: quarantined, removed })
    }

    /// The last seq durable in the NDC for this stream.
    pub async fn applied_seq(&self) -> Result<u64, ApplyError> {
        Ok(self.position().await?.0)
    }

    /// The last seq durable in the NDC for this stream and, for a Kafka partition, the offset to
    /// consume next.
    pub async fn position(&self) -> Result<(u64, Option<i64>), ApplyError> {
        let row = self
            .client
            .query_one(
                "SELECT applied_seq, kafka_next_offset FROM dongbo.applied_position WHERE source_id = $1",
                &[&self.stream],
            )
            .await?;
        Ok((row.get::<_, i64>(0) as u64, row.get(1)))
    }

    /// Applies consecutive batches, as the agent sent them, in one transaction.
    pub async fn apply(&mut self, batches: &[&ChangeBatch]) -> Result<ApplyOutcome, ApplyError> {
        let staged: Vec<Transformed> = batches.iter().map(|b| Transformed::unchanged(b)).collect();
        self.apply_marked(&staged, None, ConflictRule::default()).await
    }

    /// Applies consecutive transformed batches in one transaction that also records `mark`, the
    /// Kafka offset they end at and the messages refused among them; `conflict` decides between
    /// agents feeding one national row.
    pub async fn apply_marked(
        &mut self,
        staged: &[Transformed<'_>],
        mark: Option<&OffsetMark>,
        conflict: ConflictRule,
    ) -> Result<ApplyOutcome, ApplyError> {
        // Changes of one table share their schema: one lookup a run of them, not one a change.
        let mut last: Option<&Arc<TableSchema>> = None;
        for c in staged.iter().flat_map(|t| &t.changes.changes) {
            if !last.is_some_and(|l| Arc::ptr_eq(l, &c.table)) {
                self.ensure_target(c).await?;
                last = Some(&c.table);
            }
        }
        // Snapshot rows of a table just emptied are copied straight in; should one meet a row
        // after all (the table took other changes before a hub restart), the batch is applied
        // again with upserts, and only a batch the NDC still refuses goes change by change.
        let outcome = match self.apply_txn(staged, mark, Mode::Direct, conflict).await {
            Err(e) if !e.is_transient() => match self.apply_txn(staged, mark, Mode::Upsert, conflict).await {
                Err(e) if !e.is_transient() => {
                    warn!(stream = %self.stream, error = %e, "batch refused by the NDC; applying change by change to quarantine the bad ones");
                    self.apply_txn(staged, mark, Mode::OneByOne, conflict).await
                }
                other => other,
            },
            other => other,
        }?;
        // Once per run of a table's changes, not per change: this is every change's path.
        let mut marked: Option<&Arc<TableSchema>> = None;
        for c in staged.iter().flat_map(|t| &t.changes.changes) {
            match c.op {
                Operation::Truncate => {
                    self.mixed.remove(&c.table.table);
                    marked = None;
                }
                Operation::SnapshotRead => {}
                _ if marked.is_some_and(|m| Arc::ptr_eq(m, &c.table)) => {}
                _ => {
                    if !self.mixed.contains(&c.table.table) {
                        self.mixed.insert(c.table.table.clone());
                    }
                    marked = Some(&c.table);
                }
            }
        }
        Ok(outcome)
    }

    async fn ensure_target(&mut self, c: &ChangeEvent) -> Result<(), ApplyError> {
        let id = target_key(&c.table);
        if self.targets.contains_key(&id)
            || self.broken.contains_key(&id)
            || (!c.table.national && !self.acl.allows(&c.table.table.to_string()))
        {
            return Ok(());
        }
        let made = if c.table.national {
            Target::national(&c.table, self.targets.len())
        } else {
            Target::new(&self.ndc_schema, &c.table, self.targets.len())
        };
        let target = match made {
            Ok(t) => t,
            Err(reason) => {
                let reason = format!("no NDC table for {}: {reason}", c.table.table);
                warn!(source_id = %self.acl.id, %reason, "changes of this table will be quarantined");
                self.broken.insert(id, reason);
                return Ok(());
            }
        };
        match create_target(&mut self.client, &target, &c.table).await {
            Ok(()) => {
                info!(source_id = %self.acl.id, table = %target.qualified, version = c.table.version, "target table ready");
                self.targets.insert(id, target);
            }
            Err(e) if e.code().is_some_and(|code| !sqlstate_is_transient(code.code())) => {
                let reason = format!("cannot create or widen the NDC table for {}: {}", c.table.table, db_message(&e));
                warn!(source_id = %self.acl.id, %reason, "changes of this table will be quarantined");
                self.broken.insert(id, reason);
            }
            Err(e) => return Err(e.into()),
        }
        Ok(())
    }

    async fn apply_txn(
        &mut self,
        staged: &[Transformed<'_>],
        mark: Option<&OffsetMark>,
        mode: Mode,
        conflict: ConflictRule,
    ) -> Result<ApplyOutcome, ApplyError> {
        let last_seq = staged.iter().map(|t| t.original.last_seq()).max().unwrap_or(0);
        let Self { client, acl, stream, targets, broken, rules, logged_seq, pruned_seq, mixed, .. } = self;
        let started = std::time::Instant::now();
        let mut txn = client.transaction().await?;
        // The row lock orders this stream's transactions, even across two hubs that both believe
        // they own a Kafka partition during a rebalance: the later one sees the earlier one's seq.
        // The shared lock of the agent's quarantine: a replay of its entries (which takes it
        // exclusively) is never between this transaction's reading of what is held and its commit.
        let applied: i64 = txn
            .query_one(
                "SELECT applied_seq FROM dongbo.applied_position, pg_advisory_xact_lock_shared(hashtextextended($2, $3)) \
                 WHERE source_id = $1 FOR UPDATE OF applied_position",
                &[&*stream, &acl.id, &replay::AGENT_LOCK],
            )
            .await?
            .get(0);
        let applied = applied as u64;
        if let Some(mark) = mark {
            record_mark(&txn, stream, mark).await?;
        }
        // Each change with the change the agent sent, and each refusal, in seq order.
        let mut work: Vec<(u64, &ChangeEvent, Result<&ChangeEvent, &Refusal>)> = Vec::new();
        for t in staged {
            for c in t.changes.changes.iter().filter(|c| c.seq > applied) {
                let original =
                    if t.refused.is_empty() && t.is_unchanged() { c } else { by_seq(t.original, c.seq).unwrap_or(c) };
                work.push((c.seq, original, Ok(c)));
            }
            for r in t.refused.iter().filter(|r| r.seq > applied) {
                let Some(original) = by_seq(t.original, r.seq) else { continue };
                work.push((r.seq, original, Err(r)));
            }
        }
        // Already in order unless refusals were listed after their batch's changes (the sort is
        // then one pass); the one-by-one path below looks changes up in it by seq.
        work.sort_by_key(|(seq, ..)| *seq);
        let Some((_, last, _)) = work.last() else {
            txn.commit().await?;
            return Ok(ApplyOutcome { applied_seq: applied, applied_before: applied, ..Default::default() });
        };
        let position = last.position.to_string();
        let newest_commit_us = work.iter().map(|(_, c, _)| c.commit_time_us).max();
        let mut held = held_rows(&txn, &acl.id, &work).await?;
        let conflicts = if conflict == ConflictRule::Quarantine {
            national_conflicts(&txn, &acl.id, &work, targets).await?
        } else {
            HashMap::new()
        };
        let mut quarantine: Vec<Quarantined> = Vec::new();
        let mut accepted = Vec::with_capacity(work.len());
        for (seq, original, item) in &work {
            // Nearly always nothing is held: the row's hold is worked out only when something is,
            // or when this change is refused.
            let mut hold = (!held.is_empty()).then(|| source_hold(original)).flatten();
            let refused = match item {
                _ if hold.as_ref().is_some_and(|h| held.contains_key(h)) => {
                    let first = hold.as_ref().and_then(|h| held.get(h)).copied().unwrap_or_default();
                    Some((
                        "held",
                        format!("waits behind seq {first} of the same source row, quarantined before it"),
                        None,
                    ))
                }
                Err(r) => Some((r.rule, r.reason.clone(), None)),
                Ok(c) => match refusal(acl, broken, c) {
                    Some(r) => Some(r),
                    None => national_key(c).and_then(|k| {
                        let (holder, row) = conflicts.get(&(c.table.table.clone(), k.clone()))?;
                        let reason = format!(
                            "{} {k} is held by agent {holder}: both versions are kept (this change, and the NDC's row \
                             in detail); replay this change to let it win, or drop it",
                            c.table.table
                        );
                        Some(("conflict", reason, Some(row.clone())))
                    }),
                },
            };
            match refused {
                Some((rule, reason, detail)) => {
                    if let Some(h) = hold.take().or_else(|| source_hold(original)) {
                        held.entry(h).or_insert(*seq);
                    }
                    quarantine.push(Quarantined { original, rule, reason, detail });
                }
                None => accepted.push(*item.as_ref().expect("only changes pass")),
            }
        }
        // Before anything is written: events read the NDC rows as they were.
        let mut raised = if rules.is_empty() {
            Vec::new()
        } else {
            events::derive(&txn, rules, &acl.id, &accepted, targets).await?
        };
        let mut used_stages = HashSet::new();
        let mut superseded = Superseded::new();
        let mut removed = BTreeMap::new();
        if mode == Mode::OneByOne {
            let mut kept = Vec::with_capacity(accepted.len());
            let mut declared = Plan::default();
            staged.iter().for_each(|t| declared.declare(&t.per_stream));
            for c in accepted {
                // `work` is in seq order.
                let original = work.binary_search_by_key(&c.seq, |(s, ..)| *s).map_or(c, |i| work[i].1);
                let hold = source_hold(original);
                if let Some(first) = hold.as_ref().and_then(|h| held.get(h)) {
                    let reason = format!("waits behind seq {first} of the same source row, quarantined before it");
                    quarantine.push(Quarantined { original, rule: "held", reason, detail: None });
                    continue;
                }
                let mut plan = declared.anew();
                plan.add(c);
                let sp = txn.savepoint("dongbo_change").await?;
                match execute(&sp, &plan, targets, &mut used_stages, None, &acl.id, Some(conflict)).await {
                    Ok(done) => {
                        sp.commit().await?;
                        superseded.extend(done.superseded);
                        if let Some(keys) = done.truncated.into_values().next() {
                            removed.insert(c.seq, keys);
                        }
                        kept.push(c);
                    }
                    Err(e) if e.code().is_some_and(|code| !sqlstate_is_transient(code.code())) => {
                        sp.rollback().await?;
                        if let Some(h) = hold {
                            held.entry(h).or_insert(c.seq);
                        }
                        let reason = format!("the NDC refused the change: {}", db_message(&e));
                        quarantine.push(Quarantined { original, rule: "ndc.refused", reason, detail: None });
                    }
                    Err(e) => return Err(e.into()),
                }
            }
            accepted = kept;
            let refused: HashSet<u64> = quarantine.iter().map(|q| q.original.seq).collect();
            raised.retain(|e| !refused.contains(&e.seq));
        } else {
            let mut plan = Plan::default();
            staged.iter().for_each(|t| plan.declare(&t.per_stream));
            accepted.iter().for_each(|c| plan.add(c));
            let direct = (mode == Mode::Direct).then_some(&*mixed);
            let done = execute(&txn, &plan, targets, &mut used_stages, direct, &acl.id, Some(conflict)).await?;
            superseded = done.superseded;
            removed = removed_by_truncates(&accepted, done.truncated);
        }
        // A change the conflict rule decided against is applied in effect (the rule kept the
        // other agent's row) but raises nothing and is not logged: subscribers see what the NDC
        // holds.
        let superseded_seqs: Vec<u64> = accepted
            .iter()
            .filter(|c| c.table.national)
            .filter(|c| national_key(c).is_some_and(|k| superseded.contains(&(c.table.table.clone(), k))))
            .map(|c| c.seq)
            .collect();
        // A national truncate empties only this agent's rows, which a follower could not tell
        // from the whole table: the log publishes it as a delete of each, from this record (which
        // outlives a crash before the log append).
        for (seq, keys) in &removed {
            txn.execute(
                "INSERT INTO dongbo.removed_rows (stream, seq, keys) VALUES ($1, $2, $3) ON CONFLICT DO NOTHING",
                &[&*stream, &(*seq as i64), keys],
            )
            .await?;
        }
        if !superseded_seqs.is_empty() {
            let seqs: Vec<i64> = superseded_seqs.iter().map(|&s| s as i64).collect();
            txn.execute(
                "INSERT INTO dongbo.unpublished (stream, seq) SELECT $1, unnest($2::int8[]) ON CONFLICT DO NOTHING",
                &[&*stream, &seqs],
            )
            .await?;
            info!(source_id = %acl.id, changes = superseded_seqs.len(), "changes to national rows another agent holds, left as the conflict rule says");
            raised.retain(|e| !superseded_seqs.contains(&e.seq));
        }
        let mut resent = HashMap::new();
        for q in &quarantine {
            let c = as_sent(staged, q.original, &mut resent)?;
            let op = format!("{:?}", c.op).to_lowercase();
            let one = ChangeBatch { source_id: acl.id.clone(), changes: vec![c.clone()] };
            txn.execute(
                "INSERT INTO dongbo.quarantine (source_id, seq, source_table, operation, reason, change, rule, source_hold, detail) \
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9) ON CONFLICT DO NOTHING",
                &[
                    &acl.id,
                    &(c.seq as i64),
                    &c.table.table.to_string(),
                    &op,
                    &q.reason,
                    &wire::encode_batch(one),
                    &q.rule,
                    &source_hold(c),
                    &q.detail,
                ],
            )
            .await?;
            warn!(source_id = %acl.id, seq = c.seq, table = %c.table.table, rule = q.rule, reason = %q.reason, "change quarantined");
        }
        events::store(&txn, &acl.id, stream, &raised).await?;
        if *logged_seq > *pruned_seq {
            // Both in one statement: this runs after nearly every logged transaction.
            txn.execute(
                "WITH events AS (DELETE FROM dongbo.event_outbox WHERE stream = $1 AND seq <= $2), \
                 removed AS (DELETE FROM dongbo.removed_rows WHERE stream = $1 AND seq <= $2) \
                 DELETE FROM dongbo.unpublished WHERE stream = $1 AND seq <= $2",
                &[&*stream, &(*logged_seq as i64)],
            )
            .await?;
            *pruned_seq = *logged_seq;
        }
        let (n_applied, n_quarantined) = (accepted.len() as i64, quarantine.len() as i64);
        txn.execute(
            "UPDATE dongbo.applied_position SET applied_seq = $2, source_position = $3, \
             changes_applied = changes_applied + $4, changes_quarantined = changes_quarantined + $5, updated_at = now() \
             WHERE source_id = $1",
            &[&*stream, &(last_seq.max(applied) as i64), &position, &n_applied, &n_quarantined],
        )
        .await?;
        txn.commit().await?;
        crate::metrics::hub().applied(
            &acl.id,
            n_applied as u64,
            quarantine.len() as u64,
            newest_commit_us,
            started.elapsed(),
        );
        Ok(ApplyOutcome {
            applied_seq: last_seq.max(applied),
            applied_before: applied,
            applied: n_applied as u64,
            quarantined: quarantine.iter().map(|q| q.original.seq).collect(),
            superseded: superseded_seqs,
            removed,
            events: raised,
        })
    }
}

/// The source rows of `work` that an unresolved quarantined change of agent `source_id` holds back,
/// each with the first such seq.
async fn held_rows(
    txn: &Transaction<'_>,
    source_id: &str,
    work: &[(u64, &ChangeEvent, Result<&ChangeEvent, &Refusal>)],
) -> Result<HashMap<String, u64>, tokio_postgres::Error> {
    // Nearly always nothing is held: one probe of the partial index, not a look-up per row.
    let any: bool = txn
        .query_one(
            "SELECT EXISTS (SELECT 1 FROM dongbo.quarantine WHERE source_id = $1 AND resolved_at IS NULL AND source_hold IS NOT NULL)",
            &[&source_id],
        )
        .await?
        .get(0);
    if !any {
        return Ok(HashMap::new());
    }
    let holds: Vec<String> = work.iter().filter_map(|(_, o, _)| source_hold(o)).collect();
    let rows = txn
        .query(
            "SELECT source_hold, min(seq) FROM dongbo.quarantine WHERE source_id = $1 AND resolved_at IS NULL \
             AND source_hold = ANY($2) GROUP BY source_hold",
            &[&source_id, &holds],
        )
        .await?;
    Ok(rows.into_iter().map(|r| (r.get::<_, String>(0), r.get::<_, i64>(1) as u64)).collect())
}

/// National rows (table, key) an upsert left to the agent that holds them, as the conflict rule said.
type Superseded = HashSet<(TableId, String)>;

/// What executing a plan did besides writing rows.
#[derive(Debug, Default)]
struct Executed {
    superseded: Superseded,
    /// National tables the plan truncated (of the agent's rows), with the keys the NDC removed.
    truncated: HashMap<TableId, Vec<String>>,
}

/// For each truncate of a national table among `accepted` (in seq order), the keys of the agent's
/// rows it removed as followers have seen them: the rows the NDC held before the run (`before`, what
/// the plan's one delete returned; the plan skips the run's changes before a truncate) as the run's
/// earlier changes left them, or for a later truncate of the run, the rows the changes since the one
/// before it put there.
fn removed_by_truncates(
    accepted: &[&ChangeEvent],
    mut before: HashMap<TableId, Vec<String>>,
) -> BTreeMap<u64, Vec<String>> {
    let mut live: HashMap<&TableId, BTreeSet<String>> = HashMap::new();
    let mut removed = BTreeMap::new();
    for c in accepted.iter().filter(|c| c.table.national) {
        let rows = match live.entry(&c.table.table) {
            Entry::Occupied(e) => e.into_mut(),
            Entry::Vacant(e) => match before.remove(&c.table.table) {
                Some(held) => e.insert(held.into_iter().collect()),
                None => continue,
            },
        };
        change_live(rows, c, &mut removed);
    }
    removed
}

/// `c`'s effect on the set of the agent's rows of its national table.
fn change_live(rows: &mut BTreeSet<String>, c: &ChangeEvent, removed: &mut BTreeMap<u64, Vec<String>>) {
    let old_key = || c.key.first().and_then(pg_text);
    match c.op {
        Operation::Truncate => {
            removed.insert(c.seq, std::mem::take(rows).into_iter().collect());
        }
        Operation::Delete => {
            if let Some(k) = old_key() {
                rows.remove(&k);
            }
        }
        Operation::Insert | Operation::SnapshotRead | Operation::Update => {
            if let Some(k) = old_key() {
                rows.remove(&k);
            }
            if let Some(k) = national_key(c) {
                rows.insert(k);
            }
        }
    }
}

/// The key text of a national change's new row.
fn national_key(c: &ChangeEvent) -> Option<String> {
    if !c.table.national || !(c.op.is_new_row() || c.op == Operation::Update) {
        return None;
    }
    let after = c.after.as_ref()?;
    let mut s = String::new();
    write_value(after.first()?, &mut s).map(|()| s)
}

/// The national rows the upserts of `work` would overwrite although another agent holds them,
/// with that agent and the row as JSON. Serialised per national table (an advisory lock held to
/// the commit), so two agents inserting one new citizen at once are decided the same way.
async fn national_conflicts(
    txn: &Transaction<'_>,
    source_id: &str,
    work: &[(u64, &ChangeEvent, Result<&ChangeEvent, &Refusal>)],
    targets: &HashMap<TargetKey, Target>,
) -> Result<HashMap<(TableId, String), (String, String)>, tokio_postgres::Error> {
    let mut keys: HashMap<TargetKey, Vec<String>> = HashMap::new();
    for c in work.iter().filter_map(|(_, _, c)| c.ok()) {
        if let Some(k) = national_key(c) {
            keys.entry(target_key(&c.table)).or_default().push(k);
        }
    }
    let mut found = HashMap::new();
    for (key, ids) in keys {
        let Some(target) = targets.get(&key) else { continue };
        txn.execute("SELECT pg_advisory_xact_lock(hashtextextended($1, 7316092544))", &[&target.qualified]).await?;
        let sql = format!(
            "SELECT {k}::text, \"source_agent\", row_to_json(t)::text FROM {} t WHERE {k}::text = ANY($1) AND \"source_agent\" <> $2",
            target.qualified,
            k = target.key_columns[0]
        );
        for r in txn.query(&sql, &[&ids, &source_id]).await? {
            found.insert((key.0.clone(), r.get::<_, String>(0)), (r.get(1), r.get(2)));
        }
    }
    Ok(found)
}

/// Creates or widens `target` for `schema` in one transaction, one statement at a time on the
/// extended protocol, and records each column's source type as data.
async fn create_target(
    client: &mut Client,
    target: &Target,
    schema: &TableSchema,
) -> Result<(), tokio_postgres::Error> {
    let txn = client.transaction().await?;
    // Two agents' appliers creating one national table (or CREATE … IF NOT EXISTS of any table
    // racing itself across sessions) would fail one of them: one creation at a time.
    txn.execute("SELECT pg_advisory_xact_lock(7316092545)", &[]).await?;
    for statement in target.ddl() {
        txn.execute(statement.as_str(), &[]).await?;
    }
    for (c, t) in schema.columns.iter().zip(&target.types) {
        txn.execute(
            "INSERT INTO dongbo.source_columns (ndc_schema, ndc_table, column_name, source_type, ndc_type) \
             VALUES ($1, $2, $3, $4, $5) ON CONFLICT (ndc_schema, ndc_table, column_name) \
             DO UPDATE SET source_type = EXCLUDED.source_type, ndc_type = EXCLUDED.ndc_type",
            &[&target.schema_name, &target.table_name, &c.name, &c.type_name, &t.to_string()],
        )
        .await?;
    }
    txn.commit().await
}

/// Records a Kafka run's end offset and quarantines its refused messages; both idempotent, so a run
/// consumed twice (by a hub that lost its partition, say) records the same.
async fn record_mark(txn: &Transaction<'_>, stream: &str, mark: &OffsetMark) -> Result<(), tokio_postgres::Error> {
    txn.execute(
        "UPDATE dongbo.applied_position SET kafka_next_offset = GREATEST(COALESCE(kafka_next_offset, 0), $2), \
         updated_at = now() WHERE source_id = $1",
        &[&stream, &mark.next_offset],
    )
    .await?;
    for r in &mark.rejected {
        txn.execute(
            "INSERT INTO dongbo.stream_quarantine (stream, kafka_offset, reason, message_key, payload) \
             VALUES ($1, $2, $3, $4, $5) ON CONFLICT DO NOTHING",
            &[&stream, &r.offset, &r.reason, &r.key, &r.payload],
        )
        .await?;
        warn!(stream, offset = r.offset, reason = %r.reason, "Kafka message quarantined");
    }
    Ok(())
}

/// Why a change cannot be applied before trying, if it cannot: the rule, the reason, no detail.
fn refusal(
    acl: &AgentAcl,
    broken: &HashMap<TargetKey, String>,
    c: &ChangeEvent,
) -> Option<(&'static str, String, Option<String>)> {
    if !c.table.national && !acl.allows(&c.table.table.to_string()) {
        let reason = format!("table {} is not among the tables agent {} may send", c.table.table, acl.id);
        return Some(("table.not_allowed", reason, None));
    }
    broken.get(&target_key(&c.table)).map(|r| ("table.unusable", r.clone(), None))
}

fn db_message(e: &tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => format!("{} ({})", db.message(), db.code().code()),
        None => e.to_string(),
    }
}

async fn execute(
    txn: &Transaction<'_>,
    plan: &Plan<'_>,
    targets: &HashMap<TargetKey, Target>,
    used_stages: &mut HashSet<String>,
    direct_snapshot_copy: Option<&HashSet<TableId>>,
    agent: &str,
    conflict: Option<ConflictRule>,
) -> Result<Executed, tokio_postgres::Error> {
    let mut done = Executed::default();
    let scope: [&(dyn tokio_postgres::types::ToSql + Sync); 1] = [&agent];
    for table in &plan.tables {
        let Some(target) = targets.get(&target_key(&table.schema)) else { continue };
        // A national table's statements are scoped to the agent's rows by `$1`.
        let params: &[&(dyn tokio_postgres::types::ToSql + Sync)] = if target.national { &scope } else { &[] };
        if table.truncate && target.national {
            // Which of the agent's rows went, so followers are told of each.
            let sql = format!("{} RETURNING {}::text", target.truncate_sql(), target.key_columns[0]);
            let keys = txn.query(sql.as_str(), params).await?.into_iter().map(|r| r.get::<_, String>(0)).collect();
            done.truncated.insert(table.schema.table.clone(), keys);
        } else if table.truncate {
            txn.execute(target.truncate_sql().as_str(), params).await?;
        }
        if table.schema.is_keyless() {
            apply_keyless(txn, target, &table.sequence).await?;
            continue;
        }
        // Other agents' rows share a national table: its snapshot rows are always upserted.
        if table.snapshot_only
            && !target.national
            && direct_snapshot_copy.is_some_and(|mixed| !mixed.contains(&table.schema.table))
        {
            // Should a key exist after all, the unique violation rolls the transaction back and the
            // change-by-change retry applies these rows as upserts.
            let all: Vec<usize> = (0..target.columns.len()).collect();
            copy_rows(txn, &target.copy_target_sql(), table.snapshot_rows.iter().copied(), &all, None).await?;
            continue;
        }
        let mut deletes = Vec::new();
        let mut upserts: HashMap<Vec<usize>, Vec<&[Value]>> = HashMap::new();
        let mut whole: Vec<&[Value]> = table.snapshot_rows.clone();
        for op in table.ops.values() {
            match op {
                RowOp::Delete(key) => deletes.push(*key),
                RowOp::Upsert { row, toast_from: Some(old_key) } => {
                    // Rare (a key change on a row with out-of-line values), so one statement each,
                    // before the old key's row is deleted below.
                    let present = present_columns(row);
                    let params: Vec<Option<String>> =
                        present.iter().map(|&i| &row[i]).chain(old_key.iter()).map(pg_text).collect();
                    let refs: Vec<&(dyn tokio_postgres::types::ToSql + Sync)> = params.iter().map(|p| p as _).collect();
                    txn.execute(&target.rekey_sql(&present), &refs).await?;
                }
                RowOp::Upsert { row, toast_from: None } => {
                    // Almost every row has all its values: those share one entry without a
                    // presence list built and hashed for each.
                    if row.iter().any(Value::is_unchanged_toast) {
                        upserts.entry(present_columns(row)).or_default().push(row.as_ref());
                    } else {
                        whole.push(row.as_ref());
                    }
                }
            }
        }
        if !deletes.is_empty() {
            if !used_stages.insert(target.delete_stage.clone()) {
                txn.execute(format!("DELETE FROM {}", target.delete_stage).as_str(), &[]).await?;
            }
            let all: Vec<usize> = (0..target.key_columns.len()).collect();
            copy_rows(txn, &target.copy_delete_sql(), deletes.into_iter(), &all, None).await?;
            txn.execute(target.delete_sql().as_str(), params).await?;
        }
        let all_columns = || (0..target.columns.len()).collect::<Vec<usize>>();
        let whole = (!whole.is_empty()).then(|| (all_columns(), whole));
        for (present, rows) in whole.into_iter().chain(upserts) {
            if !used_stages.insert(target.stage.clone()) {
                txn.execute(format!("DELETE FROM {}", target.stage).as_str(), &[]).await?;
            }
            if target.national {
                let staged = rows.len() as u64;
                // The provenance the transform adds (agent, province, table, priority), and often
                // the code version, is the same on every row of a stream's batch: sent once as a
                // parameter instead of once a row through the COPY, the apply's critical path.
                let (bound, values) = per_stream_columns(&table.schema, &present, plan.shared(&table.schema.table));
                debug_assert!(
                    rows.iter().all(|r| bound.iter().zip(&values).all(|(&i, v)| r.get(i) == Some(*v))),
                    "a transform declared per-stream values its rows do not hold"
                );
                let copied: Vec<usize> = present.iter().copied().filter(|i| !bound.contains(i)).collect();
                let values: Vec<Option<String>> = values.into_iter().map(pg_text).collect();
                let values: Vec<&(dyn tokio_postgres::types::ToSql + Sync)> = values.iter().map(|v| v as _).collect();
                copy_rows(txn, &target.copy_stage_sql(&copied), rows.into_iter(), &copied, target.commit_micros)
                    .await?;
                let upsert = target.upsert_sql_under(&present, &bound, conflict);
                let written = txn.execute(upsert.as_str(), &values).await?;
                if written < staged {
                    // Rare: the conflict rule left some rows another agent's; which ones, by key.
                    let sql = format!(
                        "SELECT s.{k}::text FROM {stage} s JOIN {target} t ON t.{k} = s.{k} WHERE t.\"source_agent\" <> $1",
                        k = target.key_columns[0],
                        stage = target.stage,
                        target = target.qualified
                    );
                    let kept = txn.query(&sql, params).await?;
                    done.superseded
                        .extend(kept.into_iter().map(|r| (table.schema.table.clone(), r.get::<_, String>(0))));
                }
                continue;
            }
            copy_rows(txn, &target.copy_stage_sql(&present), rows.into_iter(), &present, target.commit_micros).await?;
            txn.execute(target.upsert_sql_under(&present, &[], conflict).as_str(), &[]).await?;
        }
    }
    Ok(done)
}

/// Applies a keyless table's changes in order: runs of inserts as one COPY, each update and delete
/// on one row equal to its old row. A change whose old row is not in the NDC (the NDC drifted) fails
/// with `P0002`, so the change-by-change retry quarantines it with the reason.
async fn apply_keyless(
    txn: &Transaction<'_>,
    target: &Target,
    sequence: &[KeylessOp<'_>],
) -> Result<(), tokio_postgres::Error> {
    let all: Vec<usize> = (0..target.columns.len()).collect();
    let mut i = 0;
    while i < sequence.len() {
        let inserts: Vec<&[Value]> = sequence[i..]
            .iter()
            .map_while(|op| match op {
                KeylessOp::Insert(row) => Some(*row),
                _ => None,
            })
            .collect();
        if !inserts.is_empty() {
            i += inserts.len();
            copy_rows(txn, &target.copy_columns_sql(&all), inserts.into_iter(), &all, None).await?;
            continue;
        }
        let (sql, params): (String, Vec<Option<String>>) = match &sequence[i] {
            KeylessOp::Delete(before) => (target.delete_one_sql(), before.iter().map(pg_text).collect()),
            KeylessOp::Update { before, after } => {
                // An unchanged out-of-line value keeps the one the row has.
                let present = present_columns(after);
                let values = present.iter().map(|&c| &after[c]).chain(before.iter());
                (target.update_one_sql(&present), values.map(pg_text).collect())
            }
            KeylessOp::Insert(_) => unreachable!("runs of inserts are copied above"),
        };
        i += 1;
        let refs: Vec<&(dyn tokio_postgres::types::ToSql + Sync)> = params.iter().map(|p| p as _).collect();
        if txn.execute(&sql, &refs).await? == 0 {
            txn.execute("SELECT dongbo.keyless_row_missing($1)", &[&target.qualified]).await?;
        }
    }
    Ok(())
}

/// The columns of `present` a national table's upsert takes as parameters, with their values: the
/// per-stream provenance, when the plan knows every row shares it.
fn per_stream_columns<'v>(
    schema: &TableSchema,
    present: &[usize],
    shared: Option<&'v [Value; 4]>,
) -> (Vec<usize>, Vec<&'v Value>) {
    let Some(shared) = shared else { return Default::default() };
    crate::dictionary::national::PER_STREAM
        .iter()
        .zip(shared)
        .filter_map(|(name, v)| Some((schema.columns.iter().position(|c| c.name == *name)?, v)))
        .filter(|(i, _)| present.contains(i))
        .unzip()
}

/// The microseconds of a commit time in the form the hub writes it.
fn commit_micros(v: &Value) -> Option<i64> {
    match v {
        Value::TimestampTz(s) => crate::fanout::record::parse_rfc3339_micros(s),
        _ => None,
    }
}

fn pg_text(v: &Value) -> Option<String> {
    let mut s = String::new();
    write_value(v, &mut s).map(|()| s)
}

/// Streams rows into `COPY ... FROM STDIN` in text format, sending about 1 MiB at a time. Column
/// `micros` (a national commit time, [`Target::copy_stage_sql`]) is sent as two: `NULL` and the
/// microseconds when the hub wrote the text, else the text and `NULL`.
async fn copy_rows<'r>(
    txn: &Transaction<'_>,
    sql: &str,
    rows: impl Iterator<Item = &'r [Value]>,
    columns: &[usize],
    micros: Option<usize>,
) -> Result<(), tokio_postgres::Error> {
    use std::io::Write as _;
    const CHUNK: usize = 1 << 20;
    let sink = txn.copy_in::<_, Bytes>(sql).await?;
    futures::pin_mut!(sink);
    let mut buf: Vec<u8> = Vec::with_capacity(CHUNK + 4096);
    let mut text = String::new();
    for row in rows {
        for (n, &i) in columns.iter().enumerate() {
            if n > 0 {
                buf.push(b'\t');
            }
            let value = row.get(i);
            if micros == Some(i) {
                if let Some(us) = value.and_then(commit_micros) {
                    buf.extend_from_slice(b"\\N\t");
                    write!(buf, "{us}").expect("writing to a Vec");
                    continue;
                }
            }
            match value {
                Some(v) if push_copy_value(v, &mut buf, &mut text) => {}
                _ => buf.extend_from_slice(b"\\N"),
            }
            if micros == Some(i) {
                buf.extend_from_slice(b"\t\\N");
            }
        }
        buf.push(b'\n');
        if buf.len() >= CHUNK {
            sink.send(Bytes::from(std::mem::take(&mut buf))).await?;
            buf.reserve(CHUNK + 4096);
        }
    }
    if !buf.is_empty() {
        sink.send(Bytes::from(buf)).await?;
    }
    sink.finish().await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn citizen(seq: u64, op: Operation, old: &str, new: Option<&str>) -> ChangeEvent {
        let schema = &crate::dictionary::national::table("citizens").expect("the citizens table").schema;
        let after = new.map(|id| {
            let mut row = vec![Value::Null; schema.columns.len()];
            row[0] = Value::Text(id.into());
            row
        });
        let key = if old.is_empty() { Vec::new() } else { vec![Value::Text(old.into())] };
        ChangeEvent::for_test(seq, schema, op, key, after)
    }

    #[test]
    fn a_truncate_removes_what_followers_saw_the_agent_hold() {
        let table = crate::dictionary::national::table("citizens").unwrap().schema.table.clone();
        let changes = [
            citizen(1, Operation::Insert, "c", Some("c")),
            citizen(2, Operation::Delete, "a", None),
            citizen(3, Operation::Update, "b", Some("b2")),
            citizen(4, Operation::Truncate, "", None),
            citizen(5, Operation::Insert, "d", Some("d")),
            citizen(6, Operation::Truncate, "", None),
            citizen(7, Operation::Truncate, "", None),
            citizen(8, Operation::Insert, "e", Some("e")),
        ];
        let accepted: Vec<&ChangeEvent> = changes.iter().collect();
        // The NDC held a, b and x before the run: the plan skips changes 1–3 and deletes those.
        let before = HashMap::from([(table, vec!["a".to_string(), "b".into(), "x".into()])]);
        let removed = removed_by_truncates(&accepted, before);
        let keys = |seq: u64| removed[&seq].iter().map(String::as_str).collect::<Vec<_>>();
        assert_eq!(keys(4), ["b2", "c", "x"], "as the changes before it left the rows");
        assert_eq!(keys(6), ["d"], "only what the run put there since");
        assert!(keys(7).is_empty());
        assert_eq!(removed.len(), 3);
        assert!(removed_by_truncates(&accepted[..3], HashMap::new()).is_empty(), "no truncate, nothing removed");
    }
}
