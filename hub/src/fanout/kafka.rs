//! Kafka delivery: each record of a subscription is produced as JSON to the subscription's topic,
//! keyed by citizen id, so one citizen's records stay in one partition, in order.
//!
//! A page of records is read from the subscription's cursor, projected to its purpose, written to the
//! audit log, produced in log order by an idempotent producer, and the cursor moves past the page only
//! once the broker acknowledged every record of it. A broker that is down only delays; a crash in
//! between produces the page again, which at-least-once with stable event ids (`event_id` in every
//! record) allows.

use std::sync::Arc;
use std::time::Duration;

use dongbo_connectors::kafka::{acknowledged, enqueue, ensure_topic};
use rdkafka::error::KafkaError;
use rdkafka::producer::{FutureProducer, FutureRecord};
use tokio::sync::mpsc;
use tracing::{info, warn};

use super::projection::Subscription;
use super::subscription::Delivery;
use super::{Command, Fanout};
use crate::config::KafkaConfig;

/// Records read from the log per page.
const PAGE: usize = 1000;
/// Partitions of a subscription topic the hub creates.
const PARTITIONS: i32 = 4;

/// Delivers one subscription until it is removed or replaced.
pub async fn run(
    fanout: Arc<Fanout>,
    sub: Arc<Subscription>,
    kafka: KafkaConfig,
    mut commands: mpsc::Receiver<Command>,
) {
    let Delivery::Kafka { topic } = &sub.def.delivery else { return };
    let id = sub.def.id.clone();
    let mut end = fanout.log.end();
    let mut producer: Option<FutureProducer> = None;
    loop {
        if !fanout.is_current(&sub).await {
            return;
        }
        while let Ok(Command::Replay(reply)) = commands.try_recv() {
            let _ = reply.send(Err("a Kafka subscription has no dead letters: it waits for the broker".into()));
        }
        let result = match &producer {
            Some(p) => deliver_page(&fanout, &sub, p, topic).await,
            None => connect(&kafka, topic).await.map(|p| {
                info!(subscription = %id, %topic, "delivering to Kafka");
                producer = Some(p);
                true
            }),
        };
        match result {
            Ok(true) => continue,
            Ok(false) => {
                tokio::select! {
                    _ = end.changed() => {}
                    cmd = commands.recv() => if cmd.is_none() { return },
                    _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                }
            }
            Err(e) => {
                warn!(subscription = %id, %topic, error = %e, "Kafka delivery paused; retrying in 5 s");
                producer = None;
                tokio::time::sleep(Duration::from_secs(5)).await;
            }
        }
    }
}

async fn connect(kafka: &KafkaConfig, topic: &str) -> Result<FutureProducer, String> {
    let admin = crate::kafka::client_config(kafka, &[]).map_err(|e| e.to_string())?;
    ensure_topic(&admin, topic, PARTITIONS, 1).await.map_err(|e| e.to_string())?;
    let defaults =
        [("enable.idempotence", "true"), ("message.timeout.ms", "0"), ("compression.type", "lz4"), ("linger.ms", "5")];
    crate::kafka::client_config(kafka, &defaults).and_then(|c| c.create()).map_err(|e: KafkaError| e.to_string())
}

/// Delivers one page from the cursor; `Ok(true)` when there may be more right away.
async fn deliver_page(
    fanout: &Fanout,
    sub: &Subscription,
    producer: &FutureProducer,
    topic: &str,
) -> Result<bool, String> {
    let id = &sub.def.id;
    let Some((outs, scanned)) = fanout.next_page(sub, PAGE)? else { return Ok(false) };
    let entries: Vec<_> = outs.iter().map(|o| sub.audit_entry(&o.citizen_id, &o.event_id, &o.fields)).collect();
    fanout.audit.record(&entries).await.map_err(|e| e.to_string())?;
    let mut deliveries = Vec::with_capacity(outs.len());
    for o in &outs {
        let body = serde_json::to_vec(&o.body).expect("records serialise");
        // One after another, so each partition holds a citizen's records in log order.
        let record = FutureRecord::to(topic).key(o.citizen_id.as_str()).payload(&body);
        deliveries.push(enqueue(producer, record).await.map_err(|e| e.to_string())?);
    }
    acknowledged(deliveries).await.map_err(|e| e.to_string())?;
    crate::metrics::hub().delivered(id, outs.len() as u64, outs.iter().map(|o| o.committed_at_us).max());
    fanout.state.ack(id, scanned).await.map_err(|e| e.to_string())?;
    Ok(true)
}
