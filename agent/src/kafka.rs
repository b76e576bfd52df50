//! Shipping: spool → a Kafka topic, instead of the hub's gRPC stream.
//!
//! Each spooled batch becomes one Kafka message per change, keyed by `schema.table` and the row's
//! primary key, so every change of one row lands in one partition in commit order. The value is an
//! encoded `ChangeBatch` holding that one change (with its table schema), the same contract the gRPC
//! path carries, so the hub decodes both alike.
//!
//! The producer is idempotent (`enable.idempotence`, gapless): the broker keeps each partition in the
//! order produced, with no duplicates from retries and no gaps. Batches are produced in seq order with
//! at most `max_in_flight_batches` unacknowledged, and the spool lets a batch go only when the broker
//! acknowledged every message of it and of all earlier batches. After any failure the session starts
//! again from the spool: messages the broker had but the spool did not know about are produced again
//! and the hub skips them by seq.
//!
//! A change too large for a message is refused *before* any later change is produced, so a later
//! change can never overtake it on its partition: shipping stops with a clear error and resumes, in
//! order, once the limit is raised.

use std::sync::Arc;
use std::time::Duration;

use dongbo_connectors::kafka::{acknowledged, enqueue};
use dongbo_connectors::model::{ChangeBatch, ChangeEvent};
use dongbo_connectors::postgres::text::key_text;
use dongbo_connectors::wire;
use futures::stream::{FuturesOrdered, StreamExt};
use rdkafka::config::ClientConfig;
use rdkafka::error::KafkaError;
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use tokio::sync::watch;
use tracing::info;

use crate::config::KafkaLinkConfig;
use crate::ship::{keep_linked, LinkFailure, Progress};
use crate::spool::{Spool, SpoolError};

/// Why one Kafka session ended.
#[derive(Debug, thiserror::Error)]
pub enum KafkaShipError {
    /// The client could not be built, the topic not created, or the broker refused a message.
    #[error("Kafka: {0}")]
    Kafka(#[from] KafkaError),
    /// A change does not fit in one message; nothing after it was produced.
    #[error(
        "change seq {seq} of table {table} encodes to {bytes} bytes, above kafka.max_message_bytes \
         ({limit}): raise it in agent.toml and the topic's max.message.bytes on the broker; \
         shipping waits here, in order, until then"
    )]
    TooLarge {
        /// The change.
        seq: u64,
        /// Its table.
        table: String,
        /// Its encoded size.
        bytes: usize,
        /// The configured limit.
        limit: usize,
    },
    /// A spooled batch could not be decoded: the spool is damaged.
    #[error("spooled batch {0} cannot be decoded: {1}")]
    Decode(u64, wire::WireError),
    /// The spool failed.
    #[error(transparent)]
    Spool(#[from] SpoolError),
}

/// Ships the spool to Kafka until `shutdown` turns true, putting the agent's status on its topic
/// every `report_every` (key [`dongbo_proto::KAFKA_STATUS_KEY`]) for the hubs' fleet registry.
pub async fn run(
    source_id: String,
    link: KafkaLinkConfig,
    spool: Arc<Spool>,
    shutdown: watch::Receiver<bool>,
    report_every: Duration,
) -> Result<(), SpoolError> {
    let progress = Progress::default();
    keep_linked("Kafka", link.max_backoff_ms, &spool, shutdown, &progress, || {
        session(&source_id, &link, &spool, &progress, report_every)
    })
    .await
}

impl LinkFailure for KafkaShipError {
    fn into_spool(self) -> Result<SpoolError, Self> {
        match self {
            KafkaShipError::Spool(e) => Ok(e),
            other => Err(other),
        }
    }
}

/// The librdkafka settings shared by the producer and the admin client.
fn client_config(link: &KafkaLinkConfig) -> Result<ClientConfig, KafkaError> {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", &link.brokers);
    for (k, v) in &link.properties {
        c.set(k, v);
    }
    link.security().apply(&mut c).map_err(KafkaError::ClientCreation)?;
    Ok(c)
}

/// The idempotent producer.
pub fn producer(link: &KafkaLinkConfig) -> Result<FutureProducer, KafkaError> {
    let mut c = client_config(link)?;
    c.set("enable.idempotence", "true")
        // An error that could leave a gap in a partition stops the producer instead: the hub's
        // skip-by-seq relies on each partition holding the agent's changes in seq order.
        .set("enable.gapless.guarantee", "true")
        // Retried by librdkafka until the broker takes it: a dropped link only delays.
        .set("message.timeout.ms", "0")
        .set("compression.type", &link.compression)
        .set("linger.ms", "5")
        .set("message.max.bytes", (link.max_message_bytes + 4096).to_string())
        // Bounds what the agent buffers for the broker; the spool holds the rest on disk.
        .set("queue.buffering.max.kbytes", "32768");
    c.create()
}

/// Creates the topic with the configured partitions unless it exists.
pub async fn ensure_topic(link: &KafkaLinkConfig, topic: &str) -> Result<(), KafkaError> {
    dongbo_connectors::kafka::ensure_topic(&client_config(link)?, topic, link.partitions, link.replication_factor).await
}

/// How many brokers answer a metadata request, for `dongbo-agent check`; an error carries what
/// librdkafka reported about the link (SASL refusal, TLS failure).
pub async fn reachable(link: &KafkaLinkConfig) -> Result<usize, String> {
    let context = dongbo_connectors::kafka::ReasonContext::default();
    let producer: rdkafka::producer::BaseProducer<_> =
        client_config(link).and_then(|c| c.create_with_context(context.clone())).map_err(|e| e.to_string())?;
    let found = tokio::task::spawn_blocking(move || {
        let found = producer.client().fetch_metadata(None, Duration::from_secs(5)).map(|m| m.brokers().len());
        if found.is_err() {
            // Error callbacks are served by polling.
            for _ in 0..5 {
                producer.poll(Duration::from_millis(100));
            }
        }
        found
    })
    .await
    .map_err(|e| e.to_string())?;
    found.map_err(|e| match context.reasons() {
        r if r.is_empty() => e.to_string(),
        r => format!("{e}; the client reports: {}", r.join("; ")),
    })
}

/// The message key of a change: its table and primary key, so one row's changes share a partition.
pub fn message_key(c: &ChangeEvent) -> String {
    format!("{}\u{1}{}", c.table.table, key_text(&c.key))
}

/// A spooled batch, encoded as one message per change.
struct Outgoing {
    last_seq: u64,
    messages: Vec<(String, Vec<u8>)>,
}

fn encode(source_id: &str, first_seq: u64, bytes: &[u8], limit: usize) -> Result<Outgoing, KafkaShipError> {
    let batch = wire::decode_batch(bytes).map_err(|e| KafkaShipError::Decode(first_seq, e))?;
    let last_seq = batch.last_seq();
    let mut messages = Vec::with_capacity(batch.changes.len());
    for c in batch.changes {
        let (key, seq, table) = (message_key(&c), c.seq, c.table.table.to_string());
        let value = wire::encode_batch(ChangeBatch { source_id: source_id.to_string(), changes: vec![c] });
        if value.len() > limit {
            return Err(KafkaShipError::TooLarge { seq, table, bytes: value.len(), limit });
        }
        messages.push((key, value));
    }
    Ok(Outgoing { last_seq, messages })
}

async fn session(
    source_id: &str,
    link: &KafkaLinkConfig,
    spool: &Arc<Spool>,
    progress: &Progress,
    report_every: Duration,
) -> Result<(), KafkaShipError> {
    let topic = link.topic_for(source_id);
    let mut report_tick = tokio::time::interval(report_every);
    ensure_topic(link, &topic).await?;
    let producer = producer(link)?;
    info!(brokers = %link.brokers, %topic, spool_batches = spool.batch_count(), "producing to Kafka");
    crate::metrics::agent().link_up(true);
    let mut appended = spool.subscribe();
    let mut sent_upto = 0u64;
    let mut in_flight = FuturesOrdered::new();
    // A refused change ends the session only after everything produced before it is acknowledged.
    let mut refused: Option<KafkaShipError> = None;
    loop {
        if refused.is_none() && in_flight.len() < link.max_in_flight_batches {
            let room = link.max_in_flight_batches - in_flight.len();
            for b in spool.batches_after(sent_upto, room)? {
                let out = match encode(source_id, b.first_seq, &b.bytes, link.max_message_bytes) {
                    Ok(out) => out,
                    Err(e) => {
                        refused = Some(e);
                        break;
                    }
                };
                sent_upto = out.last_seq;
                let mut deliveries = Vec::with_capacity(out.messages.len());
                for (key, value) in &out.messages {
                    // No headers: the value already names the source and seq, and some brokers keep
                    // headers unindexed (tansu 0.6 scans them all for every record it serves).
                    let record = FutureRecord::to(&topic).key(key).payload(value);
                    // Enqueued one after another, never concurrently: the order produced is the order
                    // the partition keeps.
                    deliveries.push(enqueue(&producer, record).await?);
                }
                let last_seq = out.last_seq;
                in_flight.push_back(async move { acknowledged(deliveries).await.map(|()| last_seq) });
            }
        }
        if in_flight.is_empty() {
            if let Some(e) = refused.take() {
                return Err(e);
            }
        }
        let window_full = in_flight.len() >= link.max_in_flight_batches || refused.is_some();
        tokio::select! {
            Some(done) = in_flight.next(), if !in_flight.is_empty() => {
                let last_seq = done?;
                progress.made();
                spool.ack(last_seq)?;
            }
            changed = appended.changed(), if !window_full => {
                if changed.is_err() {
                    return Ok(());
                }
            }
            _ = report_tick.tick() => {
                // Not waited for: a status lost with a broker hiccup is replaced by the next one.
                let value = prost::Message::encode_to_vec(&crate::status::report(spool));
                let record = FutureRecord::to(&topic).key(dongbo_proto::KAFKA_STATUS_KEY).payload(&value);
                drop(enqueue(&producer, record).await?);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use dongbo_connectors::model::{Column, Lsn, Operation, Position, TableId, TableSchema, Value};

    use super::*;

    fn change(seq: u64, id: &str, payload: &str) -> ChangeEvent {
        let schema = TableSchema::new(
            TableId::new("public", "citizen"),
            vec![
                Column { name: "id".into(), type_name: "text".into(), type_oid: 25 },
                Column { name: "note".into(), type_name: "text".into(), type_oid: 25 },
            ],
            vec![0],
        );
        let row = vec![Value::Text(id.into()), Value::Text(payload.into())];
        ChangeEvent {
            seq,
            table: Arc::new(schema),
            op: Operation::Insert,
            key: vec![Value::Text(id.into())],
            before: None,
            after: Some(row),
            position: Position::Postgres(Lsn(seq)),
            commit_time_us: 0,
            txid: 1,
            txn_order: 0,
            txn_last: true,
        }
    }

    #[test]
    fn one_message_per_change_keyed_by_table_and_key_and_refuses_what_does_not_fit() {
        let batch = ChangeBatch { source_id: "hcm".into(), changes: vec![change(7, "a", "x"), change(8, "b", "y")] };
        let bytes = wire::encode_batch(batch);
        let out = encode("hcm", 7, &bytes, 1 << 20).unwrap();
        assert_eq!(out.last_seq, 8);
        let keys: Vec<&str> = out.messages.iter().map(|(k, _)| k.as_str()).collect();
        assert_eq!(keys, vec!["public.citizen\u{1}a\u{1}", "public.citizen\u{1}b\u{1}"]);
        let one = wire::decode_batch(&out.messages[1].1).unwrap();
        assert_eq!((one.source_id.as_str(), one.first_seq(), one.changes.len()), ("hcm", 8, 1));

        let big = ChangeBatch { source_id: "hcm".into(), changes: vec![change(9, "c", &"z".repeat(5000))] };
        match encode("hcm", 9, &wire::encode_batch(big), 4096) {
            Err(KafkaShipError::TooLarge { seq: 9, limit: 4096, .. }) => {}
            other => panic!("expected TooLarge, got {:?}", other.map(|o| o.last_seq)),
        }
    }
}
