//! The quarantine as an operator works with it: list and filter, show one change, replay a
//! selection through the pipeline, drop with a recorded reason. Transport-neutral: the admin API
//! ([`crate::admin`]) and through it the CLI and the dashboard call these.
//!
//! # Contract
//! - [`list`] and [`show`] only read. A filter names an agent, a table, a rule, words of the
//!   reason, seqs (with an agent), and whether resolved entries are included; at most
//!   [`MAX_ENTRIES`] entries answer one call.
//! - [`replay`] takes the unresolved entries a filter selects (at most [`MAX_ENTRIES`], the answer
//!   says when more match), per agent
//!   in seq order, and applies them as [`crate::apply::replay`] says: exactly once, order per
//!   source row kept. Then it logs what the replay applied, and the events it raised, for fan-out
//!   ([`log_replays`]); a hub that dies between the NDC commit and that append logs it when it
//!   starts again, so subscribers see each replayed change once.
//! - [`drop_entries`] resolves the unresolved entries a filter selects as `dropped`, with the
//!   operator and the reason, which may not be empty. A dropped entry is never applied; the later
//!   entries of its source row stay quarantined until replayed.
//! - A replay or a drop needs a filter: to take everything, say so (`all`).
//! - Refused with a reason (the admin API answers 400): a filter naming more than [`MAX_ENTRIES`]
//!   seqs, a filter text or a drop reason over [`MAX_FILTER_TEXT`] bytes, seqs without their agent,
//!   `resolved` on a replay or a drop. Filter values reach SQL only as parameters; reason words
//!   match as plain text (`strpos`), never as a pattern.
//! - Kafka messages that were not change batches at all (`dongbo.stream_quarantine`: no agent's
//!   seq, nothing to map) are listed by [`list_messages`] and dropped with a reason by
//!   [`drop_messages`], under the same limits. They cannot be replayed: a message the hub could not
//!   decode holds no change it could apply in order with the partition's later ones; the agent's
//!   spool still has what it meant to send, and a resnapshot repairs the rest.

use std::collections::BTreeMap;

use dongbo_connectors::model::{ChangeBatch, ChangeEvent, Value};
use dongbo_connectors::postgres::text::write_value;
use dongbo_connectors::wire;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value as Json};
use tokio_postgres::Client;
use tracing::info;

use crate::apply::replay::{replay_stream, EntryOutcome};
use crate::apply::{ApplyError, NdcApplier};
use crate::config::HubConfig;
use crate::fanout::log::{Append, FanoutLog};
use crate::fanout::record::{rfc3339_micros, DomainEvent};
use crate::fanout::Fanout;

/// Entries one call answers or works on at most, so no request makes the hub hold an unbounded
/// quarantine in memory; call again for the rest.
pub const MAX_ENTRIES: usize = 10_000;

/// The longest text a filter field (or a drop's reason) may hold: what a peer can make each query
/// carry.
pub const MAX_FILTER_TEXT: usize = 1024;

/// Working with the quarantine failed.
#[derive(Debug, thiserror::Error)]
pub enum QuarantineError {
    /// The request cannot be carried out as asked.
    #[error("{0}")]
    Refused(String),
    /// No such entry.
    #[error("{0}")]
    NotFound(String),
    /// The NDC refused or is unreachable.
    #[error(transparent)]
    Apply(#[from] ApplyError),
    /// The NDC refused a query.
    #[error("NDC: {}", dongbo_connectors::postgres::session::error_text(.0))]
    Ndc(#[from] tokio_postgres::Error),
    /// The fan-out log could not be written.
    #[error("fan-out log: {0}")]
    Log(String),
}

/// Which entries a call is about.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Filter {
    /// The agent.
    #[serde(default)]
    pub agent: Option<String>,
    /// The source table, `schema.table`.
    #[serde(default)]
    pub table: Option<String>,
    /// The rule (`date.format`, `held`, …).
    #[serde(default)]
    pub rule: Option<String>,
    /// Words the reason contains.
    #[serde(default)]
    pub reason: Option<String>,
    /// These seqs of the agent only.
    #[serde(default)]
    pub seqs: Vec<u64>,
    /// Resolved entries too (listing only).
    #[serde(default)]
    pub resolved: bool,
    /// Every entry, when nothing else narrows a replay or a drop.
    #[serde(default)]
    pub all: bool,
}

impl Filter {
    fn check(&self, changing: bool) -> Result<(), QuarantineError> {
        if self.seqs.len() > MAX_ENTRIES {
            return Err(QuarantineError::Refused(format!(
                "{} seqs named; one call takes at most {MAX_ENTRIES}",
                self.seqs.len()
            )));
        }
        for (what, text) in
            [("agent", &self.agent), ("table", &self.table), ("rule", &self.rule), ("reason", &self.reason)]
        {
            if text.as_ref().is_some_and(|t| t.len() > MAX_FILTER_TEXT) {
                return Err(QuarantineError::Refused(format!("the {what} filter is over {MAX_FILTER_TEXT} bytes")));
            }
        }
        if !self.seqs.is_empty() && self.agent.is_none() {
            return Err(QuarantineError::Refused("seqs are an agent's: name the agent too".into()));
        }
        let narrowed = self.agent.is_some() || self.table.is_some() || self.rule.is_some() || self.reason.is_some();
        if changing && !narrowed && !self.all {
            return Err(QuarantineError::Refused(
                "say which entries (agent, table, rule, reason, seqs), or `all` for every unresolved one".into(),
            ));
        }
        if changing && self.resolved {
            return Err(QuarantineError::Refused("a resolved entry cannot be replayed or dropped again".into()));
        }
        Ok(())
    }
}

/// One quarantine entry, without its change.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Entry {
    /// The agent that sent the change.
    pub agent: String,
    /// Its seq in the agent's stream.
    pub seq: u64,
    /// The source table.
    pub table: String,
    /// insert, update, delete, truncate, snapshotread.
    pub operation: String,
    /// The rule it broke.
    pub rule: String,
    /// Why, in words.
    pub reason: String,
    /// When it was quarantined (RFC 3339).
    pub quarantined_at: String,
    /// When it was resolved, if it was.
    pub resolved_at: Option<String>,
    /// `replayed` or `dropped`.
    pub resolution: Option<String>,
    /// The operator who resolved it.
    pub resolved_by: Option<String>,
    /// The reason given for a drop, or what a replay noted.
    pub resolution_note: Option<String>,
    /// The replay that resolved it.
    pub replay_id: Option<i64>,
}

const ENTRY_COLUMNS: &str = "source_id, seq, source_table, operation, coalesce(rule, 'ndc.refused'), reason, \
     (extract(epoch FROM quarantined_at) * 1000000)::int8, (extract(epoch FROM resolved_at) * 1000000)::int8, \
     resolution, resolved_by, resolution_note, replay_id";

fn entry(r: &tokio_postgres::Row) -> Entry {
    Entry {
        agent: r.get(0),
        seq: r.get::<_, i64>(1) as u64,
        table: r.get(2),
        operation: r.get(3),
        rule: r.get(4),
        reason: r.get(5),
        quarantined_at: rfc3339_micros(r.get(6)),
        resolved_at: r.get::<_, Option<i64>>(7).map(rfc3339_micros),
        resolution: r.get(8),
        resolved_by: r.get(9),
        resolution_note: r.get(10),
        replay_id: r.get(11),
    }
}

/// The entries `filter` selects, by agent and seq, at most `limit`.
async fn select(client: &Client, filter: &Filter, limit: usize) -> Result<Vec<Entry>, QuarantineError> {
    let seqs: Vec<i64> = filter.seqs.iter().map(|&s| s as i64).collect();
    let sql = format!(
        "SELECT {ENTRY_COLUMNS} FROM dongbo.quarantine \
         WHERE ($1::text IS NULL OR source_id = $1) AND ($2::text IS NULL OR source_table = $2) \
         AND ($3::text IS NULL OR coalesce(rule, 'ndc.refused') = $3) AND ($4::text IS NULL OR strpos(reason, $4) > 0) \
         AND (cardinality($5::int8[]) = 0 OR seq = ANY($5)) AND ($6 OR resolved_at IS NULL) \
         ORDER BY source_id, seq LIMIT $7"
    );
    let rows = client
        .query(
            &sql,
            &[&filter.agent, &filter.table, &filter.rule, &filter.reason, &seqs, &filter.resolved, &(limit as i64)],
        )
        .await?;
    Ok(rows.iter().map(entry).collect())
}

/// The entries `filter` selects (see the module doc), at most `limit` (and [`MAX_ENTRIES`]).
pub async fn list(client: &Client, filter: &Filter, limit: usize) -> Result<Vec<Entry>, QuarantineError> {
    filter.check(false)?;
    select(client, filter, limit.min(MAX_ENTRIES)).await
}

/// One entry with its change as the agent sent it (column → value, text as the NDC would read it)
/// and, for a conflict, the NDC's row it would have replaced.
pub async fn show(client: &Client, agent: &str, seq: u64) -> Result<Json, QuarantineError> {
    let filter = Filter { agent: Some(agent.into()), seqs: vec![seq], resolved: true, ..Default::default() };
    let Some(e) = select(client, &filter, 1).await?.pop() else {
        return Err(QuarantineError::NotFound(format!("agent {agent} has no quarantined change of seq {seq}")));
    };
    let row = client
        .query_one(
            "SELECT change, detail, replayed_change FROM dongbo.quarantine WHERE source_id = $1 AND seq = $2",
            &[&agent, &(seq as i64)],
        )
        .await?;
    let change = |bytes: Option<&[u8]>| -> Json {
        match bytes.map(wire::decode_batch) {
            None => Json::Null,
            Some(Ok(b)) => b.changes.first().map_or(Json::Null, change_json),
            Some(Err(e)) => json!({ "undecodable": e.to_string() }),
        }
    };
    let detail: Option<&str> = row.get(1);
    Ok(json!({
        "entry": e,
        "change": change(row.get(0)),
        "detail": detail.map(|d| serde_json::from_str::<Json>(d).unwrap_or_else(|_| Json::String(d.into()))),
        "applied_as": change(row.get(2)),
    }))
}

/// A change as JSON: table, operation, seq, commit time, and its rows by column name.
pub fn change_json(c: &ChangeEvent) -> Json {
    let row = |values: &Option<Vec<Value>>| -> Json {
        let Some(values) = values else { return Json::Null };
        let fields: serde_json::Map<String, Json> = c
            .table
            .columns
            .iter()
            .zip(values)
            .map(|(col, v)| {
                let mut s = String::new();
                let text = match v {
                    Value::Null => Json::Null,
                    Value::UnchangedToast => Json::String("(unchanged)".into()),
                    // None: a value with no text form (a NUL in text, say).
                    v => match write_value(v, &mut s) {
                        Some(()) => Json::String(s),
                        None => Json::String("(no text form)".into()),
                    },
                };
                (col.name.clone(), text)
            })
            .collect();
        Json::Object(fields)
    };
    json!({
        "table": c.table.table.to_string(),
        "operation": format!("{:?}", c.op).to_lowercase(),
        "seq": c.seq,
        "committed_at": rfc3339_micros(c.commit_time_us),
        "before": row(&c.before),
        "after": row(&c.after),
    })
}

/// Drops the unresolved entries `filter` selects, as `operator`, for `reason`; returns them.
pub async fn drop_entries(
    client: &Client,
    filter: &Filter,
    operator: &str,
    reason: &str,
) -> Result<Vec<Entry>, QuarantineError> {
    filter.check(true)?;
    check_drop_reason(reason)?;
    let chosen = select(client, filter, MAX_ENTRIES).await?;
    let mut dropped = Vec::new();
    let mut by_agent: BTreeMap<&str, Vec<i64>> = BTreeMap::new();
    for e in &chosen {
        by_agent.entry(&e.agent).or_default().push(e.seq as i64);
    }
    for (agent, seqs) in by_agent {
        // A replay holds its entries' rows locked: this waits for it, then skips what it resolved.
        let rows = client
            .query(
                &format!(
                    "UPDATE dongbo.quarantine SET resolved_at = now(), resolution = 'dropped', resolved_by = $3, \
                     resolution_note = $4 WHERE source_id = $1 AND seq = ANY($2) AND resolved_at IS NULL \
                     RETURNING {ENTRY_COLUMNS}"
                ),
                &[&agent, &seqs, &operator, &reason],
            )
            .await?;
        info!(source_id = agent, operator, dropped = rows.len(), reason, "quarantined changes dropped");
        dropped.extend(rows.iter().map(entry));
    }
    Ok(dropped)
}

/// A drop's reason: not blank, at most [`MAX_FILTER_TEXT`] bytes.
fn check_drop_reason(reason: &str) -> Result<(), QuarantineError> {
    if reason.trim().is_empty() {
        return Err(QuarantineError::Refused("a drop needs a reason, recorded with the entry".into()));
    }
    if reason.len() > MAX_FILTER_TEXT {
        return Err(QuarantineError::Refused(format!("a drop's reason is over {MAX_FILTER_TEXT} bytes")));
    }
    Ok(())
}

/// What a replay did, per entry.
#[derive(Debug, Clone, Serialize)]
pub struct Replayed {
    /// The agent.
    pub agent: String,
    /// The entry's seq.
    pub seq: u64,
    /// What became of it.
    #[serde(flatten)]
    pub outcome: EntryOutcome,
    /// The replay that resolved it.
    pub replay_id: Option<i64>,
}

/// What one replay call did.
#[derive(Debug, Clone, Serialize)]
pub struct ReplayReport {
    /// Each entry taken, by agent and seq.
    pub entries: Vec<Replayed>,
    /// The call took [`MAX_ENTRIES`]: more may match; call again.
    pub more: bool,
}

impl ReplayReport {
    /// One line for an operator: how many entries were replayed, refused again, left waiting.
    pub fn summary(&self) -> String {
        let count = |f: fn(&EntryOutcome) -> bool| self.entries.iter().filter(|e| f(&e.outcome)).count();
        let replayed = count(|o| matches!(o, EntryOutcome::Applied | EntryOutcome::Superseded));
        let refused = count(|o| matches!(o, EntryOutcome::Refused { .. }));
        let waiting = count(|o| matches!(o, EntryOutcome::Waits { .. }));
        let mut line = format!(
            "{replayed} of {} replayed, {refused} refused again, {waiting} waiting behind an earlier entry",
            self.entries.len()
        );
        if self.more {
            line.push_str("; more entries match than one call takes: replay again");
        }
        line
    }
}

/// Replays the unresolved entries `filter` selects, as `operator` (see the module doc).
pub async fn replay(
    fanout: &Fanout,
    config: &HubConfig,
    filter: &Filter,
    operator: &str,
) -> Result<ReplayReport, QuarantineError> {
    filter.check(true)?;
    let client = crate::apply::connect(&config.ndc).await?;
    let chosen = select(&client, filter, MAX_ENTRIES).await?;
    drop(client);
    let more = chosen.len() == MAX_ENTRIES;
    let mut by_agent: BTreeMap<String, Vec<u64>> = BTreeMap::new();
    for e in chosen {
        by_agent.entry(e.agent).or_default().push(e.seq);
    }
    let dictionary = crate::dictionary::current();
    let mut done = Vec::new();
    for (agent, seqs) in by_agent {
        let Some(acl) = config.agents.iter().find(|a| a.id == agent).cloned() else {
            let reason = format!("agent {agent} is no longer in this hub's configuration");
            done.extend(seqs.into_iter().map(|seq| Replayed {
                agent: agent.clone(),
                seq,
                outcome: EntryOutcome::Refused { rule: "agent.unknown".into(), reason: reason.clone() },
                replay_id: None,
            }));
            continue;
        };
        let mut applier = NdcApplier::connect(&config.ndc, &fanout.ndc_slots, acl, fanout.rules.clone()).await?;
        let outcome = applier.replay(&seqs, &dictionary, operator).await?;
        // The window a restart must recover: the replay committed, its changes not yet logged.
        dongbo_connectors::fault::crash_at("hub-replay-applied-not-logged");
        if outcome.to_log {
            log_replays(applier.ndc(), &fanout.log).await?;
        }
        let replay_id = outcome.replay_id;
        done.extend(outcome.entries.into_iter().map(|(seq, outcome)| {
            let resolved = matches!(outcome, EntryOutcome::Applied | EntryOutcome::Superseded);
            Replayed { agent: agent.clone(), seq, outcome, replay_id: replay_id.filter(|_| resolved) }
        }));
    }
    Ok(ReplayReport { entries: done, more })
}

/// Appends to the fan-out log every replay the NDC committed but the log does not hold yet, with
/// the events it raised, and marks it logged. Idempotent: the log takes each replay's stream once.
pub async fn log_replays(client: &Client, log: &FanoutLog) -> Result<usize, QuarantineError> {
    let pending = client
        .query("SELECT replay_id, source_id FROM dongbo.quarantine_replay WHERE NOT logged ORDER BY replay_id", &[])
        .await?;
    for r in &pending {
        let (replay_id, source_id): (i64, String) = (r.get(0), r.get(1));
        let stream = replay_stream(&source_id, replay_id);
        if log.logged_seq(&stream).map_err(|e| QuarantineError::Log(e.to_string()))?.is_none() {
            let mut changes = Vec::new();
            for row in client
                .query(
                    "SELECT seq, replayed_change FROM dongbo.quarantine WHERE replay_id = $1 \
                     AND replayed_change IS NOT NULL ORDER BY seq",
                    &[&replay_id],
                )
                .await?
            {
                let seq: i64 = row.get(0);
                let batch = wire::decode_batch(row.get::<_, &[u8]>(1)).map_err(|e| {
                    ApplyError::Corrupt(format!("dongbo.quarantine row of {source_id} seq {seq} does not decode ({e})"))
                })?;
                changes.extend(batch.changes);
            }
            let mut events = Vec::new();
            for row in client
                .query(
                    "SELECT body::text, seq FROM dongbo.event_outbox WHERE stream = $1 ORDER BY seq, event_id",
                    &[&stream],
                )
                .await?
            {
                let seq: i64 = row.get(1);
                events.push(serde_json::from_str::<DomainEvent>(row.get::<_, &str>(0)).map_err(|e| {
                    ApplyError::Corrupt(format!(
                        "dongbo.event_outbox row of stream {stream} seq {seq} does not decode ({e})"
                    ))
                })?);
            }
            let upto = changes.iter().map(|c| c.seq).max().unwrap_or(0);
            let batch = ChangeBatch { source_id: source_id.clone(), changes };
            let bytes = wire::encode_batch(&batch);
            let batches = if batch.changes.is_empty() { Vec::new() } else { vec![(&batch, bytes.as_slice())] };
            log.append(Append {
                source_id: &source_id,
                stream: &stream,
                next_offset: None,
                upto,
                batches,
                excluded: Vec::new(),
                // A replayed national truncate is not published (the replay records it as
                // superseded), so there are no deletes to read it as.
                removed: Default::default(),
                events,
            })
            .await
            .map_err(|e| QuarantineError::Log(e.to_string()))?;
        }
        client.execute("UPDATE dongbo.quarantine_replay SET logged = true WHERE replay_id = $1", &[&replay_id]).await?;
        client.execute("DELETE FROM dongbo.event_outbox WHERE stream = $1", &[&stream]).await?;
        info!(source_id, replay_id, "replayed changes logged for fan-out");
    }
    Ok(pending.len())
}
/// Which quarantined Kafka messages a call is about.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct MessageFilter {
    /// The partition's stream, `<topic>/<partition>`.
    #[serde(default)]
    pub stream: Option<String>,
    /// These offsets of the stream only.
    #[serde(default)]
    pub offsets: Vec<i64>,
    /// Resolved messages too (listing only).
    #[serde(default)]
    pub resolved: bool,
    /// Every message, when nothing else narrows a drop.
    #[serde(default)]
    pub all: bool,
}

impl MessageFilter {
    fn check(&self, changing: bool) -> Result<(), QuarantineError> {
        if self.offsets.len() > MAX_ENTRIES {
            return Err(QuarantineError::Refused(format!(
                "{} offsets named; one call takes at most {MAX_ENTRIES}",
                self.offsets.len()
            )));
        }
        if self.stream.as_ref().is_some_and(|t| t.len() > MAX_FILTER_TEXT) {
            return Err(QuarantineError::Refused(format!("the stream filter is over {MAX_FILTER_TEXT} bytes")));
        }
        if !self.offsets.is_empty() && self.stream.is_none() {
            return Err(QuarantineError::Refused("offsets are a stream's: name the stream too".into()));
        }
        if changing && self.stream.is_none() && !self.all {
            return Err(QuarantineError::Refused("say which messages (stream, offsets), or `all`".into()));
        }
        if changing && self.resolved {
            return Err(QuarantineError::Refused("a resolved message cannot be dropped again".into()));
        }
        Ok(())
    }
}

/// A Kafka message quarantined because it was not a change batch.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Message {
    /// `<topic>/<partition>`.
    pub stream: String,
    /// Its offset.
    pub offset: i64,
    /// Why it was refused.
    pub reason: String,
    /// Its key, hex.
    pub key: Option<String>,
    /// Bytes of its value (the value itself stays in the NDC).
    pub payload_bytes: Option<i32>,
    /// When it was quarantined (RFC 3339).
    pub quarantined_at: String,
    /// When it was dropped, if it was.
    pub resolved_at: Option<String>,
    /// The operator who dropped it.
    pub resolved_by: Option<String>,
    /// The reason they gave.
    pub resolution_note: Option<String>,
}

const MESSAGE_COLUMNS: &str = "stream, kafka_offset, reason, encode(message_key, 'hex'), octet_length(payload), \
     (extract(epoch FROM quarantined_at) * 1000000)::int8, (extract(epoch FROM resolved_at) * 1000000)::int8, \
     resolved_by, resolution_note";

fn message(r: &tokio_postgres::Row) -> Message {
    Message {
        stream: r.get(0),
        offset: r.get(1),
        reason: r.get(2),
        key: r.get(3),
        payload_bytes: r.get(4),
        quarantined_at: rfc3339_micros(r.get(5)),
        resolved_at: r.get::<_, Option<i64>>(6).map(rfc3339_micros),
        resolved_by: r.get(7),
        resolution_note: r.get(8),
    }
}

/// The quarantined Kafka messages `filter` selects, by stream and offset, at most [`MAX_ENTRIES`].
pub async fn list_messages(client: &Client, filter: &MessageFilter) -> Result<Vec<Message>, QuarantineError> {
    filter.check(false)?;
    let rows = client
        .query(
            &format!(
                "SELECT {MESSAGE_COLUMNS} FROM dongbo.stream_quarantine WHERE ($1::text IS NULL OR stream = $1) \
                 AND (cardinality($2::int8[]) = 0 OR kafka_offset = ANY($2)) AND ($3 OR resolved_at IS NULL) \
                 ORDER BY stream, kafka_offset LIMIT $4"
            ),
            &[&filter.stream, &filter.offsets, &filter.resolved, &(MAX_ENTRIES as i64)],
        )
        .await?;
    Ok(rows.iter().map(message).collect())
}

/// Drops the unresolved messages `filter` selects, recording `operator` and `reason`; returns them.
pub async fn drop_messages(
    client: &Client,
    filter: &MessageFilter,
    operator: &str,
    reason: &str,
) -> Result<Vec<Message>, QuarantineError> {
    filter.check(true)?;
    check_drop_reason(reason)?;
    let rows = client
        .query(
            &format!(
                "WITH chosen AS (SELECT stream, kafka_offset FROM dongbo.stream_quarantine \
                 WHERE ($1::text IS NULL OR stream = $1) AND (cardinality($2::int8[]) = 0 OR kafka_offset = ANY($2)) \
                 AND resolved_at IS NULL ORDER BY stream, kafka_offset LIMIT $5) \
                 UPDATE dongbo.stream_quarantine q SET resolved_at = now(), resolved_by = $3, resolution_note = $4 \
                 FROM chosen WHERE q.stream = chosen.stream AND q.kafka_offset = chosen.kafka_offset AND q.resolved_at IS NULL \
                 RETURNING {}",
                MESSAGE_COLUMNS.replace("stream, kafka_offset", "q.stream, q.kafka_offset")
            ),
            &[&filter.stream, &filter.offsets, &operator, &reason, &(MAX_ENTRIES as i64)],
        )
        .await?;
    info!(operator, dropped = rows.len(), reason, "quarantined Kafka messages dropped");
    let mut dropped: Vec<Message> = rows.iter().map(message).collect();
    dropped.sort_by(|a, b| (&a.stream, a.offset).cmp(&(&b.stream, b.offset)));
    Ok(dropped)
}
