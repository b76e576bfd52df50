//! The hub's one pipeline for agents' changes, whatever carried them (a gRPC stream, a Kafka
//! partition): decode → validate → transform → apply → log → acknowledge. The transports only read messages
//! and answer in their own terms; every rule about what a batch may be, and about what is durable
//! when, lives here.
//!
//! # Contract
//! - [`decode`] opens one batch (a compressed one only if it says it holds at most
//!   `limits.max_message_bytes`), and refuses it whole ([`Refused`], a definite error naming the
//!   peer's mistake) when it holds more than `limits.max_changes_per_batch` changes, no change,
//!   changes of another agent than the authenticated one, seqs that do not rise (the wire
//!   decoder's rule), or seqs other than its envelope says.
//! - [`Staged::new`] maps each batch through the national dictionary (the transform stage,
//!   [`crate::dictionary::Dictionary::transform`]: mapped tables become national ones, changes that
//!   break a rule are set aside with the rule) and encodes what the log will hold. It needs no
//!   NDC, so a transport stages the next batch while the NDC applies the one before (the gRPC
//!   stream does, in its reader task).
//! - [`apply_and_log`] applies a run of staged batches in one NDC transaction (the set aside, and
//!   later changes of their source rows, to the quarantine), then appends the *transformed*
//!   batches to the fan-out log, so subscribers see national fields; it returns the seq durable at
//!   both, the only one a transport may acknowledge (or record as its consumer position).
//! - After a restart, whatever the NDC applied but the log does not hold yet (the hub died between
//!   the NDC commit and the append) is logged again, rows and events: the transport reads those
//!   batches again from where the log ends (the agent resends from the acknowledged seq; a Kafka
//!   partition seeks to the log's offset), the NDC skips the changes it has and the outbox gives
//!   their events ([`apply_and_log`]). Where nothing can be read again, the events alone come from
//!   the outbox ([`adopt_stream`], [`catch_up`]).
//! - Errors say what to do: [`PipelineError::is_transient`] means try again from the last durable
//!   position; anything else stops the stream with its reason.

use std::borrow::Cow;

use dongbo_connectors::model::ChangeBatch;
use dongbo_connectors::wire;
use tracing::warn;

use crate::apply::{ApplyError, NdcApplier, OffsetMark, Recorded};
use crate::dictionary::{ConflictRule, Dictionary, Mapped, PerStream, Refusal, Transformed};
use crate::fanout::log::{Append, FanoutLog};

/// Why a batch is refused: the peer's mistake, never retried as it is.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refused {
    /// Over `limits.max_message_bytes` once opened.
    #[error("{0} (limits.max_message_bytes)")]
    TooLarge(String),
    /// Over `limits.max_changes_per_batch`.
    #[error(
        "a batch of {count} changes is over the hub's limit of {max} (limits.max_changes_per_batch): lower \
         spool.batch_max_changes in the agent"
    )]
    TooManyChanges {
        /// Changes in the batch.
        count: usize,
        /// The limit.
        max: usize,
    },
    /// Changes claimed for another agent than the one the connection authenticated.
    #[error("the batch claims source {claimed:?} on a stream of agent {source_id}")]
    NotYours {
        /// What the batch says.
        claimed: String,
        /// Who sent it.
        source_id: String,
    },
    /// Not a valid batch.
    #[error("{0}")]
    Invalid(String),
}

/// Why the pipeline stopped.
#[derive(Debug, thiserror::Error)]
pub enum PipelineError {
    /// The NDC refused or is unreachable.
    #[error(transparent)]
    Apply(#[from] ApplyError),
    /// The fan-out log could not be read or written.
    #[error("fan-out log: {0}")]
    Log(String),
}

impl PipelineError {
    /// Whether trying again from the last durable position can succeed.
    pub fn is_transient(&self) -> bool {
        match self {
            PipelineError::Apply(e) => e.is_transient(),
            PipelineError::Log(_) => false,
        }
    }
}

fn log_error(e: impl std::fmt::Display) -> PipelineError {
    PipelineError::Log(e.to_string())
}

/// The batch `payload` holds, sent by agent `source_id`; `envelope` is the seq range its
/// transport said it holds, when it says one.
pub fn decode(
    source_id: &str,
    payload: &[u8],
    envelope: Option<(u64, u64)>,
    max_changes: usize,
    max_bytes: usize,
) -> Result<ChangeBatch, Refused> {
    let opened = wire::open_batch(payload, max_bytes).map_err(|e| match e {
        e @ wire::WireError::TooLarge { .. } => Refused::TooLarge(e.to_string()),
        e => Refused::Invalid(format!("not a dongbo change batch: {e}")),
    })?;
    let count =
        wire::count_changes(&opened).map_err(|e| Refused::Invalid(format!("not a dongbo change batch: {e}")))?;
    if count > max_changes {
        return Err(Refused::TooManyChanges { count, max: max_changes });
    }
    let batch = wire::decode_batch(&opened).map_err(|e| Refused::Invalid(format!("not a dongbo change batch: {e}")))?;
    drop(opened);
    if batch.source_id != source_id {
        return Err(Refused::NotYours { claimed: batch.source_id, source_id: source_id.to_string() });
    }
    if batch.changes.is_empty() {
        return Err(Refused::Invalid("the batch holds no change".into()));
    }
    if let Some((first, last)) = envelope {
        if batch.first_seq() != first || batch.last_seq() != last {
            return Err(Refused::Invalid(format!(
                "batch envelope says seqs {first}..={last} but the batch holds {}..={}",
                batch.first_seq(),
                batch.last_seq()
            )));
        }
    }
    Ok(batch)
}

/// Starts the fan-out log's record of a stream it has never seen at the stream's applied seq, first
/// logging the events the NDC outbox still holds for it (at least once: another hub's log, or a log
/// since wiped, may have had them). Returns the stream's logged seq.
pub async fn adopt_stream(
    applier: &NdcApplier,
    log: &FanoutLog,
    source_id: &str,
    stream: &str,
    applied: u64,
    next_offset: Option<i64>,
) -> Result<u64, PipelineError> {
    if let Some(logged) = log.logged_seq(stream).map_err(log_error)? {
        return Ok(logged);
    }
    log_recorded(applier, log, source_id, stream, 0, applied, next_offset).await.inspect_err(|e| {
        warn!(stream, error = %e, "cannot start the fan-out log of this stream");
    })?;
    Ok(applied)
}

/// Logs for `stream` what the NDC recorded of seqs `after+1..=applied` (events, what to leave out)
/// without their rows, which nothing can read again. No batch is logged, so no truncate's deletes
/// either: a follower starts from the NDC's rows as they are.
async fn log_recorded(
    applier: &NdcApplier,
    log: &FanoutLog,
    source_id: &str,
    stream: &str,
    after: u64,
    applied: u64,
    next_offset: Option<i64>,
) -> Result<(), PipelineError> {
    let Recorded { events, excluded, .. } = applier.recorded(after, applied).await?;
    let removed = Default::default();
    log.append(Append {
        source_id,
        stream,
        next_offset,
        batches: Vec::new(),
        excluded,
        removed,
        events,
        upto: applied,
    })
    .await
    .map_err(log_error)?;
    Ok(())
}

/// Brings the fan-out log of `stream` up to the NDC's `applied` seq when the hub stopped between an
/// NDC commit and its log append: the outbox still has what those changes recorded.
pub async fn catch_up(
    applier: &NdcApplier,
    log: &FanoutLog,
    source_id: &str,
    stream: &str,
    logged: u64,
    applied: u64,
    next_offset: Option<i64>,
) -> Result<(), PipelineError> {
    if logged >= applied {
        return Ok(());
    }
    log_recorded(applier, log, source_id, stream, logged, applied, next_offset).await
}

/// What an agent's batches are mapped with: the dictionary in use and the agent's province.
#[derive(Debug, Clone, Copy)]
pub struct Transform<'d> {
    /// The national dictionary.
    pub dictionary: &'d Dictionary,
    /// The province the agent serves, recorded on its national rows.
    pub province: Option<&'d str>,
}

/// One batch between decode and apply: as received, and as the dictionary mapped it (encoded for
/// the log). Made apart from the apply, so a transport can map the next batch while the NDC
/// applies the one before.
#[derive(Debug)]
pub struct Staged {
    /// As decoded, less the text moved into the mapped rows when `moved`.
    batch: ChangeBatch,
    /// As received: what a quarantined change is decoded from again when `moved`.
    raw: Vec<u8>,
    /// The mapped batch (refused changes left out) and its bytes for the log, when the dictionary
    /// changed anything.
    mapped: Option<(ChangeBatch, Vec<u8>)>,
    refused: Vec<Refusal>,
    moved: bool,
    per_stream: PerStream,
}

/// The zstd level of the batches the hub encodes for its log: zstd's fast mode. It compresses
/// twice as fast as level 1, at about half its ratio; the transform's reader thread shares two
/// cores with the NDC on a small server, and the log's disk is the cheaper of the two.
const LOG_COMPRESSION_LEVEL: i32 = -3;

impl Staged {
    /// `batch` (received as `raw`) mapped by `transform`.
    pub fn new(mut batch: ChangeBatch, raw: Vec<u8>, transform: Transform<'_>) -> Self {
        match transform.dictionary.transform_moving(&mut batch, transform.province) {
            None => {
                Self { batch, raw, mapped: None, refused: Vec::new(), moved: false, per_stream: PerStream::default() }
            }
            Some(Mapped { changes, refused, moved, per_stream }) => {
                let bytes = wire::compress_batch_at(&wire::encode_batch(&changes), LOG_COMPRESSION_LEVEL);
                Self { batch, raw, mapped: Some((changes, bytes)), refused, moved, per_stream }
            }
        }
    }

    /// The batch as decoded.
    pub fn batch(&self) -> &ChangeBatch {
        &self.batch
    }

    /// What the NDC applier takes.
    fn transformed(&self) -> Transformed<'_> {
        let changes = self.mapped.as_ref().map_or(&self.batch, |(m, _)| m);
        Transformed {
            original: &self.batch,
            changes: Cow::Borrowed(changes),
            refused: self.refused.clone(),
            sent: self.moved.then_some(self.raw.as_slice()),
            per_stream: Cow::Borrowed(&self.per_stream),
        }
    }

    /// What the fan-out log holds of it: the mapped batch if the dictionary changed it (nothing if
    /// it refused every change: their seqs are among the excluded), else the batch as received.
    fn logged(&self) -> Option<(&ChangeBatch, &[u8])> {
        match &self.mapped {
            Some((m, _)) if m.changes.is_empty() => None,
            Some((m, bytes)) => Some((m, bytes)),
            None => Some((&self.batch, &self.raw)),
        }
    }
}

/// Frees a logged run's batches (and `guard`, say the stream-buffer permits their memory holds) on
/// a blocking thread: dropping tens of thousands of decoded rows takes a few percent of the NDC
/// apply, which the stream's next run need not wait for.
pub fn release<G: Send + 'static>(run: Vec<Staged>, guard: G) {
    tokio::task::spawn_blocking(move || drop((run, guard)));
}

/// Applies a run of staged batches of one stream to the NDC (with the Kafka `mark`, if any) under
/// the `conflict` rule, then logs them for fan-out; returns the seq durable at both.
pub async fn apply_and_log(
    applier: &mut NdcApplier,
    log: &FanoutLog,
    source_id: &str,
    stream: &str,
    staged: &[Staged],
    mark: Option<&OffsetMark>,
    conflict: ConflictRule,
) -> Result<u64, PipelineError> {
    let logged = log.logged_seq(stream).map_err(log_error)?.unwrap_or(0);
    applier.set_logged_seq(logged);
    let transformed: Vec<Transformed> = staged.iter().map(Staged::transformed).collect();
    let outcome = applier.apply_marked(&transformed, mark, conflict).await?;
    drop(transformed);
    // The window a restart must recover: committed in the NDC, not yet in the log.
    dongbo_connectors::fault::crash_at("hub-applied-not-logged");
    let last_seq = staged.iter().map(|s| s.batch.last_seq()).max().unwrap_or(0);
    let mut events = outcome.events;
    let mut excluded = outcome.quarantined;
    excluded.extend(outcome.superseded);
    let mut removed = outcome.removed;
    let replayed_upto = outcome.applied_before.min(last_seq);
    if replayed_upto > logged {
        // Applied before the hub last stopped but not logged: recover what that apply recorded.
        let old = applier.recorded(logged, replayed_upto).await.inspect_err(|e| {
            warn!(stream, error = %e, "cannot recover the events of changes applied before a restart");
        })?;
        events.splice(0..0, old.events);
        excluded.extend(old.excluded);
        removed.extend(old.removed);
    }
    let next_offset = mark.map(|m| m.next_offset);
    let batches = staged.iter().filter_map(Staged::logged).collect();
    let logged = log
        .append(Append { source_id, stream, next_offset, batches, excluded, removed, events, upto: last_seq })
        .await
        .map_err(log_error)?;
    Ok(logged.min(outcome.applied_seq))
}

#[cfg(test)]
mod tests {
    use super::*;
    use dongbo_connectors::model::{ChangeEvent, Column, Operation, TableId, TableSchema, Value};
    use std::sync::Arc;

    fn batch(source_id: &str, seqs: &[u64]) -> Vec<u8> {
        let schema = Arc::new(TableSchema::new(
            TableId::new("public", "t"),
            vec![Column { name: "id".into(), type_name: "int8".into(), type_oid: 20 }],
            vec![0],
        ));
        let changes = seqs
            .iter()
            .map(|s| {
                ChangeEvent::for_test(
                    *s,
                    &schema,
                    Operation::Insert,
                    vec![Value::Int(*s as i64)],
                    Some(vec![Value::Int(*s as i64)]),
                )
            })
            .collect();
        wire::encode_batch(ChangeBatch { source_id: source_id.into(), changes })
    }

    #[test]
    fn a_batch_is_refused_whole_for_each_rule_it_breaks() {
        let ok = decode("hcm", &batch("hcm", &[1, 2, 3]), Some((1, 3)), 10, 1 << 20).expect("a valid batch");
        assert_eq!((ok.first_seq(), ok.last_seq()), (1, 3));
        assert!(decode("hcm", &batch("hcm", &[1, 2, 3]), None, 10, 1 << 20).is_ok(), "Kafka has no envelope");
        assert_eq!(
            decode("hcm", &batch("hcm", &[1, 2, 3]), None, 2, 1 << 20),
            Err(Refused::TooManyChanges { count: 3, max: 2 })
        );
        assert!(matches!(decode("hcm", &batch("hanoi", &[1]), None, 10, 1 << 20), Err(Refused::NotYours { .. })));
        for seqs in [&[2u64, 2][..], &[3, 1]] {
            let e = decode("hcm", &batch("hcm", seqs), None, 10, 1 << 20).unwrap_err();
            // The wire decoder itself refuses seqs that do not rise.
            assert!(e.to_string().contains("not above the previous one"), "{e}");
        }
        let e = decode("hcm", &batch("hcm", &[1, 2]), Some((1, 3)), 10, 1 << 20).unwrap_err();
        assert!(e.to_string().contains("envelope says seqs 1..=3"), "{e}");
        let e = decode("hcm", b"\xff\xff not protobuf", None, 10, 1 << 20).unwrap_err();
        assert!(e.to_string().starts_with("not a dongbo change batch"), "{e}");
        let compressed = wire::compress_batch(&batch("hcm", &[1, 2, 3]));
        assert!(decode("hcm", &compressed, None, 10, 1 << 20).is_ok());
        assert!(matches!(decode("hcm", &compressed, None, 10, 16), Err(Refused::TooLarge(_))));
    }
}
