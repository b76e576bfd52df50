//! One Kafka partition of an agent's topic, applied as one stream.
//!
//! A worker reads its stream's row in the NDC (applied seq, next offset), brings the fan-out log up to
//! it, seeks the consumer there, then applies runs of messages: each run in one NDC transaction that
//! also records the offset after it and quarantines the messages that are not valid changes of the
//! topic's agent, so a bad message never stops the partition. Changes at or below the stream's seq
//! (an agent producing again what the broker already had) are skipped.
//!
//! On any failure the worker reconnects with backoff, re-reads the row and seeks back to it: the
//! messages of an unfinished run are read again, never lost.

use std::sync::Arc;
use std::time::Duration;

use backoff::backoff::Backoff;
use backoff::ExponentialBackoffBuilder;
use dongbo_connectors::wire;
use rdkafka::consumer::{CommitMode, Consumer};
use rdkafka::message::{Message, OwnedMessage};
use rdkafka::{Offset, TopicPartitionList};
use tokio::sync::mpsc;
use tracing::{info, warn};

use super::{Shared, TopicPartition};
use crate::apply::{ApplyError, NdcApplier, OffsetMark, RejectedMessage};
use crate::pipeline::{self, adopt_stream, apply_and_log, catch_up, PipelineError, Staged};

/// Why a partition's worker starts its session again.
#[derive(Debug, thiserror::Error)]
enum WorkerError {
    /// Decoding, applying or logging failed.
    #[error(transparent)]
    Pipeline(#[from] PipelineError),
    /// The broker or the consumer's assignment.
    #[error("{0}")]
    Kafka(String),
}

impl From<ApplyError> for WorkerError {
    fn from(e: ApplyError) -> Self {
        WorkerError::Pipeline(e.into())
    }
}

/// Messages waiting for a partition's worker.
const QUEUE: usize = 4096;

/// The stream name of a partition: its row in `dongbo.applied_position`.
pub fn stream_name(topic: &str, partition: i32) -> String {
    format!("{topic}/{partition}")
}

/// Starts the worker of `tp`; it runs until the returned sender is dropped.
pub fn spawn(shared: Arc<Shared>, tp: TopicPartition) -> mpsc::Sender<OwnedMessage> {
    let (tx, rx) = mpsc::channel(QUEUE);
    tokio::spawn(worker(shared, tp, rx));
    tx
}

async fn worker(shared: Arc<Shared>, (topic, partition): TopicPartition, mut rx: mpsc::Receiver<OwnedMessage>) {
    let mut backoff = ExponentialBackoffBuilder::new()
        .with_initial_interval(Duration::from_millis(200))
        .with_max_interval(Duration::from_secs(10))
        .with_max_elapsed_time(None)
        .build();
    loop {
        match session(&shared, &topic, partition, &mut rx, &mut backoff).await {
            Ok(()) => return,
            Err(e) => {
                let wait = backoff.next_backoff().unwrap_or(Duration::from_secs(10));
                warn!(topic, partition, error = %e, retry_in_ms = wait.as_millis() as u64, "partition worker failed; it will seek back to the NDC's offset");
                tokio::time::sleep(wait).await;
                // Whatever the channel holds will be read again after the seek.
                while rx.try_recv().is_ok() {}
                if rx.is_closed() {
                    return;
                }
            }
        }
    }
}

async fn session(
    shared: &Shared,
    topic: &str,
    partition: i32,
    rx: &mut mpsc::Receiver<OwnedMessage>,
    backoff: &mut backoff::ExponentialBackoff,
) -> Result<(), WorkerError> {
    let Some(acl) = shared.agents.get(topic) else {
        return Err(WorkerError::Kafka(format!("no agent owns topic {topic}")));
    };
    let stream = stream_name(topic, partition);
    let mut applier = NdcApplier::connect_stream(
        &shared.config.ndc,
        &shared.fanout.ndc_slots,
        acl.clone(),
        shared.fanout.rules.clone(),
        stream.clone(),
    )
    .await?;
    let (applied, ndc_offset) = applier.position().await?;
    let log = &shared.fanout.log;
    let logged = adopt_stream(&applier, log, &acl.id, &stream, applied, ndc_offset).await?;
    let log_offset = log.logged_position(&stream).map_err(|e| PipelineError::Log(e.to_string()))?.and_then(|(_, o)| o);
    // The hub stopped between an NDC commit and its log append: read those messages again from
    // where the log ends, so their rows are logged too (the NDC skips the changes it has, and keeps
    // its offset and quarantine as they are). Without the log's offset, only their events can be
    // recovered, from the outbox.
    let reread = logged < applied && log_offset.is_some();
    if !reread {
        catch_up(&applier, log, &acl.id, &stream, logged, applied, ndc_offset).await?;
    }
    let resume_at = if reread { log_offset } else { ndc_offset };
    let start = resume_at.map_or(Offset::Beginning, Offset::Offset);
    seek(shared, topic, partition, start).await?;
    if reread {
        info!(topic, partition, applied_seq = applied, logged_seq = logged, from_offset = ?resume_at, "partition reads again what the NDC applied and the fan-out log lacks");
    } else {
        info!(topic, partition, applied_seq = applied, next_offset = ?ndc_offset, "partition resumed from the NDC's offset");
    }
    let max_changes = shared.config.apply.max_changes_per_txn;
    let max_bytes = shared.config.limits.max_message_bytes;
    let max_batch_changes = shared.config.limits.max_changes_per_batch;
    // Messages below this offset were applied already (or are being re-read from before the seek).
    let mut expect = resume_at.unwrap_or(0);
    // The highest seq taken in this session: a re-produced message repeats seqs.
    let mut high = if reread { logged } else { applied };
    loop {
        let Some(first) = rx.recv().await else { return Ok(()) };
        let mut run = vec![first];
        while run.len() < max_changes {
            match rx.try_recv() {
                Ok(m) => run.push(m),
                Err(_) => break,
            }
        }
        let dictionary = crate::dictionary::current();
        let transform = pipeline::Transform { dictionary: &dictionary, province: acl.province.as_deref() };
        let mut batches: Vec<Staged> = Vec::new();
        let mut mark = OffsetMark::default();
        let mut last_offset = None;
        for m in run.into_iter().filter(|m| m.offset() >= expect) {
            last_offset = Some(m.offset());
            if m.key() == Some(dongbo_proto::KAFKA_STATUS_KEY) {
                // The agent's status for the fleet registry: kept, never applied.
                let kept = match m.payload() {
                    Some(p) if p.len() > dongbo_proto::STATUS_REPORT_MAX => {
                        Err(crate::fleet::ReportTooLarge(p.len()).to_string())
                    }
                    Some(p) => match <dongbo_proto::v1::AgentStatusReport as prost::Message>::decode(p) {
                        Ok(report) => crate::fleet::report(&acl.id, crate::fleet::Transport::Kafka, report)
                            .map_err(|e| e.to_string()),
                        Err(_) => Err("a status record that is not an AgentStatusReport".into()),
                    },
                    None => Err("a status record that is not an AgentStatusReport".into()),
                };
                if let Err(reason) = kept {
                    mark.rejected.push(RejectedMessage {
                        offset: m.offset(),
                        reason,
                        key: m.key().map(<[u8]>::to_vec),
                        payload: m.payload().map(<[u8]>::to_vec),
                    });
                }
                continue;
            }
            let decoded = match m.payload() {
                None => Err("the message has no value".to_string()),
                Some(p) => pipeline::decode(&acl.id, p, None, max_batch_changes, max_bytes).map_err(|e| e.to_string()),
            };
            match decoded {
                Ok(mut batch) => {
                    let whole = batch.changes.len();
                    batch.changes.retain(|c| c.seq > high);
                    if let Some(last) = batch.changes.last() {
                        high = last.seq;
                        let raw = match m.payload() {
                            Some(p) if batch.changes.len() == whole => p.to_vec(),
                            _ => wire::encode_batch(batch.clone()),
                        };
                        batches.push(Staged::new(batch, raw, transform));
                    }
                }
                Err(reason) => mark.rejected.push(RejectedMessage {
                    offset: m.offset(),
                    reason,
                    key: m.key().map(<[u8]>::to_vec),
                    payload: m.payload().map(<[u8]>::to_vec),
                }),
            }
        }
        let Some(last_offset) = last_offset else { continue };
        mark.next_offset = last_offset + 1;
        let done = apply_and_log(&mut applier, log, &acl.id, &stream, &batches, Some(&mark), dictionary.conflict).await;
        pipeline::release(batches, ());
        done?;
        crate::fleet::contact(&acl.id, crate::fleet::Transport::Kafka);
        crate::metrics::hub().contact(&acl.id);
        backoff.reset();
        expect = mark.next_offset;
        let mut tpl = TopicPartitionList::new();
        if tpl.add_partition_offset(topic, partition, Offset::Offset(expect)).is_ok() {
            // For lag tools only; the NDC holds the offset that counts.
            if let Err(e) = shared.consumer.commit(&tpl, CommitMode::Async) {
                tracing::debug!(topic, partition, error = %e, "offset commit to Kafka failed");
            }
        }
    }
}

/// Moves the consumer's fetch position of the partition, retrying while the assignment settles.
async fn seek(shared: &Shared, topic: &str, partition: i32, offset: Offset) -> Result<(), WorkerError> {
    let mut last = None;
    for _ in 0..50 {
        let consumer = shared.consumer.clone();
        let t = topic.to_string();
        let r = tokio::task::spawn_blocking(move || consumer.seek(&t, partition, offset, Duration::from_secs(5)))
            .await
            .map_err(|e| WorkerError::Kafka(e.to_string()))?;
        match r {
            Ok(()) => return Ok(()),
            Err(e) => last = Some(e),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Err(WorkerError::Kafka(format!("cannot seek {topic}/{partition} to {offset:?}: {last:?}")))
}
