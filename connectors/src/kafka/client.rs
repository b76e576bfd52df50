//! The librdkafka side (feature `kafka`): topic creation, ordered producing, link reasons.

use std::time::Duration;

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::ToBytes;
use rdkafka::producer::{DeliveryFuture, FutureProducer, FutureRecord};
use tracing::info;

/// A client context that keeps what librdkafka reports about the link (a refused SASL login, a
/// failed TLS handshake), so `check` can say why a broker did not answer.
#[derive(Debug, Clone, Default)]
pub struct ReasonContext {
    reasons: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
}

impl ReasonContext {
    /// The distinct reasons reported so far, oldest first.
    pub fn reasons(&self) -> Vec<String> {
        self.reasons.lock().map(|r| r.clone()).unwrap_or_default()
    }
}

impl rdkafka::ClientContext for ReasonContext {
    fn error(&self, error: KafkaError, reason: &str) {
        tracing::warn!(%error, reason, "Kafka client error");
        if let Ok(mut r) = self.reasons.lock() {
            // "n/m brokers are down" repeats what the caller learns anyway.
            let noise = reason.ends_with("brokers are down");
            let reason = reason.split(" (after ").next().unwrap_or(reason);
            if !noise && r.len() < 8 && !r.iter().any(|seen| seen == reason) {
                r.push(reason.to_string());
            }
        }
    }
}

impl rdkafka::producer::ProducerContext for ReasonContext {
    type DeliveryOpaque = ();
    fn delivery(&self, _: &rdkafka::message::DeliveryResult<'_>, _: ()) {}
}

/// Creates `topic` with `partitions` and `replication_factor` unless it exists (an existing topic
/// is left as it is).
pub async fn ensure_topic(
    config: &ClientConfig,
    topic: &str,
    partitions: i32,
    replication_factor: i32,
) -> Result<(), KafkaError> {
    let admin: AdminClient<DefaultClientContext> = config.create()?;
    let new = NewTopic::new(topic, partitions, TopicReplication::Fixed(replication_factor));
    let options = AdminOptions::new().operation_timeout(Some(Duration::from_secs(10)));
    for result in admin.create_topics([&new], &options).await? {
        match result {
            Ok(_) => info!(topic, partitions, "topic created"),
            Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
            Err((_, code)) => return Err(KafkaError::AdminOp(code)),
        }
    }
    Ok(())
}

/// Hands `record` to the producer, waiting while its queue is full. Records enqueued one after
/// another (never concurrently) keep their order in their partition.
pub async fn enqueue<K, P>(
    producer: &FutureProducer,
    mut record: FutureRecord<'_, K, P>,
) -> Result<DeliveryFuture, KafkaError>
where
    K: ToBytes + ?Sized,
    P: ToBytes + ?Sized,
{
    loop {
        match producer.send_result(record) {
            Ok(delivery) => return Ok(delivery),
            Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), r)) => {
                record = r;
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            Err((e, _)) => return Err(e),
        }
    }
}

/// Waits until the broker acknowledged every one of `deliveries`; the first failure otherwise.
pub async fn acknowledged(deliveries: Vec<DeliveryFuture>) -> Result<(), KafkaError> {
    for d in deliveries {
        match d.await {
            Ok(Ok(_)) => {}
            Ok(Err((e, _))) => return Err(e),
            Err(_) => return Err(KafkaError::Canceled),
        }
    }
    Ok(())
}
