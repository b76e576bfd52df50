//! Replaying quarantined changes in the NDC, once an operator fixed the data or the rule.
//!
//! # Contract
//! A replay takes unresolved quarantine entries of one agent, in seq order, maps each change again
//! (as the agent sent it) through the dictionary in use now, and applies those that pass in **one**
//! NDC transaction that also marks them resolved (`replayed`, by whom, under which replay), stores
//! each change as applied and the events it raised, and records the replay in
//! `dongbo.quarantine_replay`. A committed replay is never applied again (its entries are
//! resolved); one that did not commit changed nothing.
//!
//! - Order per source row holds: an entry waits, untouched, while an earlier unresolved entry of
//!   its row is not part of the replay or is refused again.
//! - An entry refused again stays quarantined with its new rule and reason.
//! - An entry quarantined as a `conflict` is the operator's decision for it: it overwrites the
//!   national row the other agent holds. Any other entry meets the conflict rule as a live change
//!   would (under `priority` or `latest_commit` it may be resolved without changing the row).
//! - The agent's live applies take a shared lock that a replay takes exclusively, so a live change
//!   of a replayed row is decided after the replay commits, never between its entries.
//!
//! Logging the replay for fan-out is the caller's ([`crate::quarantine`]): the changes keep their
//! seqs and go under the replay's own stream, [`replay_stream`].

use super::*;
use crate::dictionary::Dictionary;

/// The advisory lock key class of an agent's quarantine (with the agent's id hashed into it).
pub(super) const AGENT_LOCK: i64 = 7316092546;

/// The fan-out log stream a replay's changes are logged under: one per replay, so a replay's seqs
/// (old, below the agent's live stream) never meet the live stream's idempotence by seq.
pub fn replay_stream(source_id: &str, replay_id: i64) -> String {
    format!("replay/{source_id}/{replay_id}")
}

/// What a replay did with one entry.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[serde(tag = "outcome", rename_all = "snake_case")]
pub enum EntryOutcome {
    /// Applied; logged for fan-out under the replay's stream.
    Applied,
    /// Resolved without changing the national row: the conflict rule kept another agent's version.
    Superseded,
    /// Still breaks a rule: stays quarantined with it.
    Refused {
        /// The rule.
        rule: String,
        /// Why.
        reason: String,
    },
    /// Not tried: an earlier entry of its source row is unresolved.
    Waits {
        /// That entry's seq.
        behind: u64,
    },
    /// Resolved meanwhile (another replay or a drop), or never quarantined.
    NotPending,
}

/// What one replay did.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct ReplayOutcome {
    /// The replay's id, when it resolved anything.
    pub replay_id: Option<i64>,
    /// Each entry asked for, by seq.
    pub entries: Vec<(u64, EntryOutcome)>,
    /// Whether it holds changes to log for fan-out.
    pub to_log: bool,
}

/// A quarantined change read back for a replay.
struct Pending {
    seq: u64,
    rule: String,
    hold: Option<String>,
    /// As the agent sent it.
    original: ChangeBatch,
}

impl NdcApplier {
    /// The NDC connection, for the caller's own bookkeeping queries.
    pub fn ndc(&self) -> &Client {
        &self.client
    }

    /// Replays this agent's unresolved quarantine entries `seqs` (see the module doc) through
    /// `dictionary`, resolved as by `operator`.
    pub async fn replay(
        &mut self,
        seqs: &[u64],
        dictionary: &Dictionary,
        operator: &str,
    ) -> Result<ReplayOutcome, ApplyError> {
        let wanted: Vec<i64> = seqs.iter().map(|&s| s as i64).collect();
        let mut pending = Vec::new();
        for r in self
            .client
            .query(
                "SELECT seq, change, coalesce(rule, ''), source_hold FROM dongbo.quarantine \
                 WHERE source_id = $1 AND seq = ANY($2) AND resolved_at IS NULL ORDER BY seq",
                &[&self.acl.id, &wanted],
            )
            .await?
        {
            let seq = r.get::<_, i64>(0) as u64;
            let original = wire::decode_batch(r.get::<_, &[u8]>(1)).map_err(|e| {
                ApplyError::Corrupt(format!("dongbo.quarantine row of {} seq {seq} does not decode ({e})", self.acl.id))
            })?;
            pending.push(Pending { seq, rule: r.get(2), hold: r.get(3), original });
        }
        let province = self.acl.province.clone();
        let mapped: Vec<Transformed> =
            pending.iter().map(|p| dictionary.transform(&p.original, province.as_deref())).collect();
        for c in mapped.iter().flat_map(|t| &t.changes.changes) {
            self.ensure_target(c).await?;
        }
        let started = std::time::Instant::now();
        let Self { client, acl, targets, broken, rules, .. } = self;
        let mut txn = client.transaction().await?;
        txn.execute("SELECT pg_advisory_xact_lock(hashtextextended($1, $2))", &[&acl.id, &AGENT_LOCK]).await?;
        // Under the lock: entries another replay or a drop resolved meanwhile are not pending.
        let still: HashSet<u64> = txn
            .query(
                "SELECT seq FROM dongbo.quarantine WHERE source_id = $1 AND seq = ANY($2) AND resolved_at IS NULL \
                 FOR UPDATE",
                &[&acl.id, &wanted],
            )
            .await?
            .into_iter()
            .map(|r| r.get::<_, i64>(0) as u64)
            .collect();
        let holds: Vec<&str> = pending.iter().filter_map(|p| p.hold.as_deref()).collect();
        let pending_seqs: Vec<i64> = still.iter().map(|&s| s as i64).collect();
        // The first unresolved entry of each held row that this replay does not take.
        let mut outside: HashMap<String, u64> = txn
            .query(
                "SELECT source_hold, min(seq) FROM dongbo.quarantine WHERE source_id = $1 AND resolved_at IS NULL \
                 AND source_hold = ANY($2) AND NOT (seq = ANY($3)) GROUP BY source_hold",
                &[&acl.id, &holds, &pending_seqs],
            )
            .await?
            .into_iter()
            .map(|r| (r.get::<_, String>(0), r.get::<_, i64>(1) as u64))
            .collect();
        let mut outcome = ReplayOutcome::default();
        let mut waiting: HashMap<String, u64> = HashMap::new();
        let mut applied: Vec<(u64, ChangeEvent)> = Vec::new();
        let mut superseded_seqs = Vec::new();
        let mut raised = Vec::new();
        let mut used_stages = HashSet::new();
        let decided_rule = dictionary.conflict;
        for s in seqs.iter().filter(|s| !pending.iter().any(|p| p.seq == **s)) {
            outcome.entries.push((*s, EntryOutcome::NotPending));
        }
        for (p, t) in pending.iter().zip(&mapped) {
            if !still.contains(&p.seq) {
                outcome.entries.push((p.seq, EntryOutcome::NotPending));
                continue;
            }
            let behind = p.hold.as_ref().and_then(|h| {
                waiting.get(h).copied().or_else(|| outside.get(h).copied().filter(|first| *first < p.seq))
            });
            if let Some(behind) = behind {
                if let Some(h) = &p.hold {
                    waiting.entry(h.clone()).or_insert(behind);
                    outside.remove(h);
                }
                outcome.entries.push((p.seq, EntryOutcome::Waits { behind }));
                continue;
            }
            let refused = match (t.refused.first(), t.changes.changes.first()) {
                (Some(r), _) => Some((r.rule.to_string(), r.reason.clone(), None)),
                (None, None) => Some(("change.shape".into(), "the quarantined entry holds no change".into(), None)),
                (None, Some(c)) => match refusal(acl, broken, c) {
                    Some((rule, reason, detail)) => Some((rule.to_string(), reason, detail)),
                    None if p.rule != "conflict" && decided_rule == ConflictRule::Quarantine => {
                        let one = [(p.seq, c, Ok::<_, &Refusal>(c))];
                        national_conflicts(&txn, &acl.id, &one, targets).await?.into_values().next().map(
                            |(holder, row)| {
                                let reason = format!(
                                    "{} is held by agent {holder}: both versions are kept (this change, and the NDC's \
                                     row in detail); replay this change to let it win, or drop it",
                                    c.table.table
                                );
                                ("conflict".to_string(), reason, Some(row))
                            },
                        )
                    }
                    None => None,
                },
            };
            let refused = match refused {
                Some(r) => Some(r),
                None => {
                    let c = t.changes.changes.first().expect("checked above");
                    // The operator decided a conflict: this change overwrites the other agent's row.
                    let guard = (p.rule != "conflict").then_some(decided_rule);
                    let sp = txn.savepoint("dongbo_replay").await?;
                    let events = if rules.is_empty() {
                        Vec::new()
                    } else {
                        events::derive(&sp, rules, &acl.id, &[c], targets).await?
                    };
                    let mut plan = Plan::default();
                    plan.add(c);
                    match execute(&sp, &plan, targets, &mut used_stages, None, &acl.id, guard).await {
                        Ok(done) => {
                            sp.commit().await?;
                            let kept_elsewhere = c.op == Operation::Truncate && c.table.national
                                || national_key(c)
                                    .is_some_and(|k| done.superseded.contains(&(c.table.table.clone(), k)));
                            if kept_elsewhere {
                                superseded_seqs.push(p.seq);
                                outcome.entries.push((p.seq, EntryOutcome::Superseded));
                            } else {
                                raised.extend(events);
                                applied.push((p.seq, c.clone()));
                                outcome.entries.push((p.seq, EntryOutcome::Applied));
                            }
                            None
                        }
                        Err(e) if e.code().is_some_and(|code| !sqlstate_is_transient(code.code())) => {
                            sp.rollback().await?;
                            Some((
                                "ndc.refused".to_string(),
                                format!("the NDC refused the change: {}", db_message(&e)),
                                None,
                            ))
                        }
                        Err(e) => return Err(e.into()),
                    }
                }
            };
            if let Some((rule, reason, detail)) = refused {
                if let Some(h) = &p.hold {
                    waiting.entry(h.clone()).or_insert(p.seq);
                }
                txn.execute(
                    "UPDATE dongbo.quarantine SET rule = $3, reason = $4, detail = coalesce($5, detail) \
                     WHERE source_id = $1 AND seq = $2",
                    &[&acl.id, &(p.seq as i64), &rule, &reason, &detail],
                )
                .await?;
                outcome.entries.push((p.seq, EntryOutcome::Refused { rule, reason }));
            }
        }
        if !applied.is_empty() || !superseded_seqs.is_empty() {
            let n = (applied.len() + superseded_seqs.len()) as i32;
            let replay_id: i64 = txn
                .query_one(
                    "INSERT INTO dongbo.quarantine_replay (source_id, replayed_by, changes, logged) \
                     VALUES ($1, $2, $3, $4) RETURNING replay_id",
                    &[&acl.id, &operator, &n, &applied.is_empty()],
                )
                .await?
                .get(0);
            for (seq, c) in &applied {
                let one = wire::encode_batch(ChangeBatch { source_id: acl.id.clone(), changes: vec![c.clone()] });
                resolve(&txn, &acl.id, *seq, operator, replay_id, Some(one), None).await?;
            }
            for seq in &superseded_seqs {
                let note = "the conflict rule kept another agent's version of the row";
                resolve(&txn, &acl.id, *seq, operator, replay_id, None, Some(note)).await?;
            }
            events::store(&txn, &acl.id, &replay_stream(&acl.id, replay_id), &raised).await?;
            outcome.replay_id = Some(replay_id);
            outcome.to_log = !applied.is_empty();
        }
        txn.commit().await?;
        crate::metrics::hub().applied(&acl.id, applied.len() as u64, 0, None, started.elapsed());
        info!(source_id = %acl.id, operator, replay = ?outcome.replay_id, applied = applied.len(), "quarantine replayed");
        outcome.entries.sort_by_key(|(seq, _)| *seq);
        Ok(outcome)
    }
}

/// Marks one entry resolved by a replay.
async fn resolve(
    txn: &Transaction<'_>,
    source_id: &str,
    seq: u64,
    operator: &str,
    replay_id: i64,
    applied: Option<Vec<u8>>,
    note: Option<&str>,
) -> Result<(), tokio_postgres::Error> {
    txn.execute(
        "UPDATE dongbo.quarantine SET resolved_at = now(), resolution = 'replayed', resolved_by = $3, replay_id = $4, \
         replayed_change = $5, resolution_note = $6 WHERE source_id = $1 AND seq = $2",
        &[&source_id, &(seq as i64), &operator, &replay_id, &applied, &note],
    )
    .await?;
    Ok(())
}
