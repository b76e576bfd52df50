//! Deriving domain events from row changes, inside the NDC transaction that applies them.
//!
//! Sources rarely send the old row (Postgres sends only the key unless a table has `REPLICA IDENTITY
//! FULL`), but the NDC holds it: before the transaction writes, the watched columns of every updated
//! key are read from the target table, then the run of changes is walked in seq order, so a citizen
//! who moves twice in one run raises two events (A→B, B→C), not one. The events are written to
//! `dongbo.event_outbox` in the same transaction, so they can always be recovered for the fan-out log
//! even if the hub dies right after the commit (the replay then skips the changes in the NDC).

use std::collections::HashMap;

use dongbo_connectors::model::{ChangeEvent, Operation, TableId, TableSchema, Value};
use dongbo_connectors::postgres::snapshot::quote_ident;
use dongbo_connectors::postgres::text::write_value;
use serde_json::{Map, Value as Json};
use tokio_postgres::Transaction;
use tracing::warn;

use super::record::{rfc3339_micros, value_json, DomainEvent};
use super::subscription::EventRule;
use crate::apply::plan::key_text;
use crate::apply::target::Target;
use crate::apply::{target_key, TargetKey};

/// An event rule with the citizen-id column of its table.
#[derive(Debug, Clone)]
pub struct ActiveRule {
    /// The rule.
    pub rule: EventRule,
    /// The table's citizen-id column.
    pub citizen_id: String,
}

/// Column positions of a rule in one schema version.
struct Positions {
    watch: Vec<usize>,
    carry: Vec<usize>,
    citizen: usize,
}

fn positions(rule: &ActiveRule, schema: &TableSchema) -> Option<Positions> {
    let find = |name: &str| schema.columns.iter().position(|c| c.name == name);
    Some(Positions {
        watch: rule.rule.watch.iter().map(|w| find(w)).collect::<Option<_>>()?,
        carry: rule.rule.carry.iter().map(|w| find(w)).collect::<Option<_>>()?,
        citizen: find(&rule.citizen_id)?,
    })
}

fn text(v: &Value) -> Option<String> {
    let mut s = String::new();
    write_value(v, &mut s).map(|()| s)
}

/// Watched values of a row (`None` inside for NULL).
type Watched = Vec<Option<String>>;

/// Derives the events `changes` (in seq order, all about to be applied) raise, reading pre-images
/// from the targets inside `txn` before anything is written.
pub async fn derive(
    txn: &Transaction<'_>,
    rules: &[ActiveRule],
    source_id: &str,
    changes: &[&ChangeEvent],
    targets: &HashMap<TargetKey, Target>,
) -> Result<Vec<DomainEvent>, tokio_postgres::Error> {
    let mut events = Vec::new();
    for rule in rules {
        let table = TableId::parse(&rule.rule.table);
        let relevant: Vec<&ChangeEvent> =
            changes.iter().copied().filter(|c| Some(&c.table.table) == table.as_ref()).collect();
        let mut by_version: HashMap<u64, Option<Positions>> = HashMap::new();
        for c in &relevant {
            by_version.entry(c.table.version).or_insert_with(|| {
                let p = positions(rule, &c.table);
                if p.is_none() {
                    warn!(source_id, table = %c.table.table, event = %rule.rule.name, "the source table lacks a watched column: no events from this shape");
                }
                p
            });
        }
        let updated: Vec<&ChangeEvent> = relevant.iter().copied().filter(|c| c.op == Operation::Update).collect();
        let Some(first) = updated.first() else { continue };
        if first.table.is_keyless() {
            // A keyless table's update carries its whole old row: that is the preimage.
            for c in &updated {
                let (Some(Some(pos)), Some(before), Some(after)) =
                    (by_version.get(&c.table.version), &c.before, &c.after)
                else {
                    continue;
                };
                let previous: Watched = pos.watch.iter().map(|&i| text(&before[i])).collect();
                let current: Watched = pos
                    .watch
                    .iter()
                    .map(|&i| match &after[i] {
                        Value::UnchangedToast => text(&before[i]),
                        v => text(v),
                    })
                    .collect();
                if previous != current {
                    events.push(event(rule, source_id, c, pos, after, &previous, &current));
                }
            }
            continue;
        }
        let Some(target) = targets.get(&target_key(&first.table)) else { continue };
        let mut state: HashMap<String, Option<Watched>> =
            preimages(txn, target, &first.table, &rule.rule.watch, &updated).await?;
        for c in relevant {
            let Some(Some(pos)) = by_version.get(&c.table.version) else { continue };
            match c.op {
                Operation::Truncate => {
                    state.clear();
                }
                Operation::Delete => {
                    state.insert(key_text(&c.key), None);
                }
                Operation::Insert | Operation::SnapshotRead => {
                    if let Some(after) = &c.after {
                        let key = key_text(&c.table.key_of(after));
                        state.insert(key, Some(pos.watch.iter().map(|&i| text(&after[i])).collect()));
                    }
                }
                Operation::Update => {
                    let Some(after) = &c.after else { continue };
                    let old_key = key_text(&c.key);
                    let new_key = key_text(&c.table.key_of(after));
                    // Not in the state: the NDC has no row under that key (or a truncate emptied it).
                    let previous = state.remove(&old_key).flatten();
                    let current: Watched = pos
                        .watch
                        .iter()
                        .enumerate()
                        .map(|(n, &i)| match &after[i] {
                            Value::UnchangedToast => previous.as_ref().and_then(|p| p[n].clone()),
                            v => text(v),
                        })
                        .collect();
                    if let Some(prev) = &previous {
                        if *prev != current {
                            events.push(event(rule, source_id, c, pos, after, prev, &current));
                        }
                    }
                    if old_key != new_key {
                        state.insert(old_key, None);
                    }
                    state.insert(new_key, Some(current));
                }
            }
        }
    }
    events.sort_by_key(|e| e.seq);
    Ok(events)
}

fn event(
    rule: &ActiveRule,
    source_id: &str,
    c: &ChangeEvent,
    pos: &Positions,
    after: &[Value],
    previous: &Watched,
    current: &Watched,
) -> DomainEvent {
    let citizen_id = text(&after[pos.citizen]).unwrap_or_default();
    let event_id = format!("{source_id}:{}:{}", c.seq, rule.rule.name);
    let side = |values: &Watched| -> Json {
        Json::Object(
            rule.rule
                .watch
                .iter()
                .zip(values)
                .map(|(w, v)| (w.clone(), v.clone().map_or(Json::Null, Json::String)))
                .collect(),
        )
    };
    let mut payload = Map::new();
    payload.insert("citizen_id".into(), Json::String(citizen_id.clone()));
    payload.insert("source_id".into(), Json::String(source_id.into()));
    payload.insert("effective_at".into(), Json::String(rfc3339_micros(c.commit_time_us)));
    payload.insert("previous".into(), side(previous));
    payload.insert("current".into(), side(current));
    for (name, &i) in rule.rule.carry.iter().zip(&pos.carry) {
        payload.insert(name.clone(), value_json(&after[i]));
    }
    DomainEvent {
        event_id,
        event: rule.rule.name.clone(),
        source_id: source_id.into(),
        seq: c.seq,
        citizen_id,
        effective_at_us: c.commit_time_us,
        payload,
    }
}

/// The watched values of the NDC rows under the old keys of `updates`, by key text.
async fn preimages(
    txn: &Transaction<'_>,
    target: &Target,
    schema: &TableSchema,
    watch: &[String],
    updates: &[&ChangeEvent],
) -> Result<HashMap<String, Option<Watched>>, tokio_postgres::Error> {
    let nkeys = target.key_columns.len();
    let mut params: Vec<Vec<Option<String>>> = vec![Vec::with_capacity(updates.len()); nkeys];
    for c in updates {
        for (n, v) in c.key.iter().enumerate().take(nkeys) {
            params[n].push(text(v));
        }
    }
    let keys: Vec<String> = target.key_columns.iter().map(|k| format!("{k}::text")).collect();
    let watched: Vec<String> = watch.iter().map(|w| format!("{}::text", quote_ident(w))).collect();
    let unnest: Vec<String> = schema
        .key_columns
        .iter()
        .enumerate()
        .map(|(n, &i)| format!("${}::text[]::{}[]", n + 1, target.types[i]))
        .collect();
    let sql = format!(
        "SELECT {}, {} FROM {} WHERE ({}) IN (SELECT * FROM unnest({}))",
        keys.join(", "),
        watched.join(", "),
        target.qualified,
        target.key_columns.join(", "),
        unnest.join(", ")
    );
    let refs: Vec<&(dyn tokio_postgres::types::ToSql + Sync)> = params.iter().map(|p| p as _).collect();
    let mut out = HashMap::new();
    for row in txn.query(&sql, &refs).await? {
        let key: Vec<Value> =
            (0..nkeys).map(|i| row.get::<_, Option<String>>(i).map_or(Value::Null, Value::Text)).collect();
        let values: Watched = (nkeys..nkeys + watch.len()).map(|i| row.get::<_, Option<String>>(i)).collect();
        out.insert(key_text(&key), Some(values));
    }
    Ok(out)
}

/// SQL creating the outbox; part of the hub's bootstrap.
pub const OUTBOX_DDL: &str = "CREATE TABLE IF NOT EXISTS dongbo.event_outbox (
    source_id text NOT NULL,
    seq bigint NOT NULL,
    event_id text NOT NULL,
    body jsonb NOT NULL,
    PRIMARY KEY (source_id, seq, event_id));
ALTER TABLE dongbo.event_outbox ADD COLUMN IF NOT EXISTS stream text;
UPDATE dongbo.event_outbox SET stream = source_id WHERE stream IS NULL;
CREATE INDEX IF NOT EXISTS event_outbox_stream ON dongbo.event_outbox (stream, seq);";

/// Writes `events`, applied from `stream`, to the outbox in `txn`.
pub async fn store(
    txn: &Transaction<'_>,
    source_id: &str,
    stream: &str,
    events: &[DomainEvent],
) -> Result<(), tokio_postgres::Error> {
    if events.is_empty() {
        return Ok(());
    }
    let seqs: Vec<i64> = events.iter().map(|e| e.seq as i64).collect();
    let ids: Vec<&str> = events.iter().map(|e| e.event_id.as_str()).collect();
    let bodies: Vec<String> = events.iter().map(|e| serde_json::to_string(e).expect("events serialise")).collect();
    txn.execute(
        "INSERT INTO dongbo.event_outbox (source_id, seq, event_id, body, stream) \
         SELECT $1, s, i, b::jsonb, $5 FROM unnest($2::bigint[], $3::text[], $4::text[]) AS u(s, i, b) \
         ON CONFLICT DO NOTHING",
        &[&source_id, &seqs, &ids, &bodies, &stream],
    )
    .await?;
    Ok(())
}
